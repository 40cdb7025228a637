//! Sliding windows over counters: the increase of a few counters over the last N seconds, as
//! the ready-to-compare ratios (cache hit ratios) need it.
//!
//! Uses nothing of ours. Time is passed in, so the arithmetic is tested without sleeping.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// Readings of a fixed set of counters within a window.
#[derive(Debug)]
pub struct CounterWindow {
    window: Duration,
    readings: VecDeque<(Instant, Vec<f64>)>,
}

impl CounterWindow {
    /// A window of `window`.
    pub fn new(window: Duration) -> Self {
        CounterWindow {
            window,
            readings: VecDeque::new(),
        }
    }

    /// Records a reading taken at `now` and returns how much each counter grew since the oldest
    /// reading still in the window; `None` while there is only one reading. A counter that went
    /// down was reset (a restart, a statistics reset): the window starts over from this reading.
    pub fn push(&mut self, now: Instant, values: Vec<f64>) -> Option<Vec<f64>> {
        if self.readings.back().is_some_and(|(_, last)| {
            last.len() != values.len() || last.iter().zip(&values).any(|(a, b)| b < a)
        }) {
            self.readings.clear();
        }
        self.readings.push_back((now, values));
        while self
            .readings
            .front()
            .is_some_and(|(t, _)| now.duration_since(*t) > self.window)
        {
            self.readings.pop_front();
        }
        if self.readings.len() < 2 {
            return None;
        }
        let (_, first) = self.readings.front()?;
        let (_, last) = self.readings.back()?;
        Some(last.iter().zip(first).map(|(b, a)| b - a).collect())
    }
}

/// `part / (part + rest)` of two increases: `None` when both are zero, because a window with no
/// traffic has no ratio, and 0 or NaN would each be a lie.
pub fn share(part: f64, rest: f64) -> Option<f64> {
    let total = part + rest;
    (total > 0.0).then(|| part / total)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn increases_over_the_window_reset_safe() {
        let t0 = Instant::now();
        let s = Duration::from_secs;
        let mut w = CounterWindow::new(s(10));
        assert_eq!(w.push(t0, vec![0.0, 0.0]), None, "one reading is no window");
        assert_eq!(
            w.push(t0 + s(5), vec![100.0, 300.0]),
            Some(vec![100.0, 300.0])
        );
        assert_eq!(
            w.push(t0 + s(10), vec![100.0, 300.0]),
            Some(vec![100.0, 300.0])
        );
        // The first reading left the window: nothing happened since 5 s.
        assert_eq!(w.push(t0 + s(16), vec![100.0, 300.0]), Some(vec![0.0, 0.0]));
        // A reset starts over instead of giving a negative increase.
        assert_eq!(w.push(t0 + s(20), vec![10.0, 0.0]), None);
        assert_eq!(w.push(t0 + s(25), vec![40.0, 10.0]), Some(vec![30.0, 10.0]));
    }

    #[test]
    fn share_is_absent_without_traffic() {
        assert_eq!(share(100.0, 300.0), Some(0.25));
        assert_eq!(share(0.0, 0.0), None);
        assert_eq!(share(0.0, 5.0), Some(0.0));
    }
}
