//! The rule state machine, per rule and label set: inactive → pending (for `for`) → firing →
//! inactive, with an optional separate exit condition (`clear`, for hysteresis) and
//! `keep_firing_for`. A pure function of the previous state, what the conditions say now and
//! the time, which is passed in: no clock, no I/O, so every transition is tested by table.
//!
//! Actions are requested on the firing edge, and again every `repeat` while firing; never on
//! resolve. Uses nothing of ours.

use std::time::Duration;

/// Where one label set of one rule stands. Times are milliseconds since the Unix epoch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum State {
    /// The condition does not hold.
    Inactive,
    /// The condition holds, for less than `for` so far.
    Pending {
        /// When it started to hold.
        since_ms: i64,
    },
    /// The condition held for `for`; it stays firing until the exit condition has held for
    /// `keep_firing_for`.
    Firing {
        /// When it started firing.
        since_ms: i64,
        /// When actions were last requested.
        requested_ms: i64,
        /// When the exit condition started to hold, while waiting out `keep_firing_for`.
        exiting_since_ms: Option<i64>,
    },
}

/// A rule's timing, from its file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Timing {
    /// `for`: how long the condition must hold before firing.
    pub hold: Duration,
    /// `keep_firing_for`: how long the exit condition must hold before resolving.
    pub keep_firing_for: Duration,
    /// `repeat`: request the actions again this often while firing (`None`: only on the edge).
    pub repeat: Option<Duration>,
}

/// What the conditions say at one evaluation, for one label set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Observed {
    /// The rule's `expr` returned this label set.
    pub active: bool,
    /// With a `clear` condition: whether it returned this label set. `None` without one, in
    /// which case the rule exits when `expr` stops holding.
    pub clear: Option<bool>,
}

/// The result of one step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Step {
    /// The new state.
    pub state: State,
    /// Whether to request the rule's actions now (the firing edge, or a repeat).
    pub request: bool,
    /// Whether this step resolved a firing rule (for notifications; never an action).
    pub resolved: bool,
}

fn ms(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

/// One transition.
pub fn step(prev: State, seen: Observed, now_ms: i64, timing: &Timing) -> Step {
    let fire = |since_ms| Step {
        state: State::Firing {
            since_ms,
            requested_ms: now_ms,
            exiting_since_ms: None,
        },
        request: true,
        resolved: false,
    };
    let stay = |state| Step {
        state,
        request: false,
        resolved: false,
    };
    match prev {
        State::Inactive if seen.active => {
            if timing.hold.is_zero() {
                fire(now_ms)
            } else {
                stay(State::Pending { since_ms: now_ms })
            }
        }
        State::Inactive => stay(State::Inactive),
        State::Pending { since_ms } if seen.active => {
            if now_ms - since_ms >= ms(timing.hold) {
                fire(now_ms)
            } else {
                stay(prev)
            }
        }
        State::Pending { .. } => stay(State::Inactive),
        State::Firing {
            since_ms,
            requested_ms,
            exiting_since_ms,
        } => {
            // With `clear`, only the clear condition ends it (hysteresis); without, the end of
            // the condition does.
            let exiting = seen.clear.unwrap_or(!seen.active);
            if exiting {
                let started = exiting_since_ms.unwrap_or(now_ms);
                if now_ms - started >= ms(timing.keep_firing_for) {
                    return Step {
                        state: State::Inactive,
                        request: false,
                        resolved: true,
                    };
                }
                return stay(State::Firing {
                    since_ms,
                    requested_ms,
                    exiting_since_ms: Some(started),
                });
            }
            let due = timing
                .repeat
                .is_some_and(|every| now_ms - requested_ms >= ms(every));
            Step {
                state: State::Firing {
                    since_ms,
                    requested_ms: if due { now_ms } else { requested_ms },
                    exiting_since_ms: None,
                },
                request: due,
                resolved: false,
            }
        }
    }
}

/// One transition when the condition's data is absent altogether and the rule says
/// `on_absent: hold`: a firing instance keeps firing (a scrape gap is not a recovery), but a
/// pending one starts over, since the condition was not seen to hold through the gap and
/// keeping its start would fire it at the first sample back however long the data was gone.
pub fn step_absent_hold(prev: State) -> Step {
    let state = match prev {
        State::Pending { .. } => State::Inactive,
        other => other,
    };
    Step {
        state,
        request: false,
        resolved: false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: i64 = 1000;

    fn on() -> Observed {
        Observed {
            active: true,
            clear: None,
        }
    }
    fn off() -> Observed {
        Observed {
            active: false,
            clear: None,
        }
    }

    /// Runs `(time in s, observed)` steps and returns `(state name, request, resolved)` each.
    fn run(timing: Timing, steps: &[(i64, Observed)]) -> Vec<(&'static str, bool, bool)> {
        let steps: Vec<(i64, Option<Observed>)> =
            steps.iter().map(|&(t, o)| (t, Some(o))).collect();
        run_with_gaps(timing, &steps)
    }

    /// The same, where `None` is an evaluation with no data at all under `on_absent: hold`.
    fn run_with_gaps(
        timing: Timing,
        steps: &[(i64, Option<Observed>)],
    ) -> Vec<(&'static str, bool, bool)> {
        let mut state = State::Inactive;
        steps
            .iter()
            .map(|&(t, seen)| {
                let s = match seen {
                    Some(seen) => step(state, seen, t * S, &timing),
                    None => step_absent_hold(state),
                };
                state = s.state;
                let name = match s.state {
                    State::Inactive => "inactive",
                    State::Pending { .. } => "pending",
                    State::Firing { .. } => "firing",
                };
                (name, s.request, s.resolved)
            })
            .collect()
    }

    #[test]
    fn pending_then_firing_after_for_then_resolved() {
        let t = Timing {
            hold: Duration::from_secs(30),
            ..Timing::default()
        };
        let got = run(
            t,
            &[
                (0, on()),
                (15, on()),
                (30, on()),
                (45, on()),
                (60, off()),
                (75, off()),
            ],
        );
        assert_eq!(
            got,
            vec![
                ("pending", false, false),
                ("pending", false, false),
                ("firing", true, false),
                ("firing", false, false),
                ("inactive", false, true),
                ("inactive", false, false),
            ]
        );
    }

    #[test]
    fn a_gap_while_pending_starts_the_wait_over() {
        let t = Timing {
            hold: Duration::from_secs(30),
            ..Timing::default()
        };
        let got = run(
            t,
            &[(0, on()), (20, off()), (25, on()), (50, on()), (55, on())],
        );
        let names: Vec<_> = got.iter().map(|g| g.0).collect();
        assert_eq!(
            names,
            ["pending", "inactive", "pending", "pending", "firing"]
        );
    }

    #[test]
    fn without_for_the_first_match_fires() {
        let got = run(Timing::default(), &[(0, on()), (5, on())]);
        assert_eq!(got, vec![("firing", true, false), ("firing", false, false)]);
    }

    #[test]
    fn clear_gives_hysteresis() {
        // expr: > 0.8; clear: < 0.7. At 0.75 the rule neither fires anew nor resolves.
        let above = Observed {
            active: true,
            clear: Some(false),
        };
        let between = Observed {
            active: false,
            clear: Some(false),
        };
        let below = Observed {
            active: false,
            clear: Some(true),
        };
        let got = run(
            Timing::default(),
            &[
                (0, above),
                (5, between),
                (10, between),
                (15, below),
                (20, between),
            ],
        );
        assert_eq!(
            got,
            vec![
                ("firing", true, false),
                ("firing", false, false),
                ("firing", false, false),
                ("inactive", false, true),
                ("inactive", false, false),
            ]
        );
    }

    #[test]
    fn keep_firing_for_waits_out_a_dip() {
        let t = Timing {
            keep_firing_for: Duration::from_secs(10),
            ..Timing::default()
        };
        let got = run(
            t,
            &[
                (0, on()),
                (5, off()),
                (10, on()),
                (15, off()),
                (20, off()),
                (25, off()),
            ],
        );
        assert_eq!(
            got,
            vec![
                ("firing", true, false),
                ("firing", false, false),
                ("firing", false, false),
                ("firing", false, false),
                ("firing", false, false),
                ("inactive", false, true),
            ]
        );
    }

    #[test]
    fn repeat_requests_again_while_firing_never_on_resolve() {
        let t = Timing {
            repeat: Some(Duration::from_secs(10)),
            ..Timing::default()
        };
        let got = run(
            t,
            &[
                (0, on()),
                (5, on()),
                (10, on()),
                (15, on()),
                (20, on()),
                (25, off()),
            ],
        );
        let requests: Vec<bool> = got.iter().map(|g| g.1).collect();
        assert_eq!(requests, [true, false, true, false, true, false]);
        assert!(got[5].2, "resolved");
    }

    #[test]
    fn on_absent_hold_resets_pending_and_holds_firing() {
        let t = Timing {
            hold: Duration::from_secs(300),
            ..Timing::default()
        };
        let gap = None;
        let on = Some(on());
        // (name, steps, expected state names, expected requests)
        #[allow(clippy::type_complexity)]
        let cases: &[(&str, Vec<(i64, Option<Observed>)>, Vec<&str>, Vec<bool>)] = &[
            (
                // Pending for 4 of 5 minutes, data gone for 10: the first sample back starts
                // the wait over instead of firing at once.
                "pending through a gap starts over",
                vec![
                    (0, on),
                    (240, on),
                    (300, gap),
                    (900, gap),
                    (960, on),
                    (1200, on),
                    (1260, on),
                ],
                vec![
                    "pending", "pending", "inactive", "inactive", "pending", "pending", "firing",
                ],
                vec![false, false, false, false, false, false, true],
            ),
            (
                // Firing, then a gap: still firing, no new request when data comes back.
                "firing holds through a gap",
                vec![(0, on), (300, on), (360, gap), (960, gap), (1020, on)],
                vec!["pending", "firing", "firing", "firing", "firing"],
                vec![false, true, false, false, false],
            ),
            (
                "inactive stays inactive",
                vec![(0, gap), (60, gap)],
                vec!["inactive", "inactive"],
                vec![false, false],
            ),
        ];
        for (name, steps, states, requests) in cases {
            let got = run_with_gaps(t, steps);
            let got_states: Vec<&str> = got.iter().map(|g| g.0).collect();
            let got_requests: Vec<bool> = got.iter().map(|g| g.1).collect();
            assert_eq!(&got_states, states, "{name}");
            assert_eq!(&got_requests, requests, "{name}");
            assert!(got.iter().all(|g| !g.2), "{name}: a gap never resolves");
        }
    }

    #[test]
    fn state_round_trips_through_json_for_persistence() {
        let s = State::Firing {
            since_ms: 1,
            requested_ms: 2,
            exiting_since_ms: Some(3),
        };
        let text = serde_json::to_string(&s).unwrap();
        assert_eq!(serde_json::from_str::<State>(&text).unwrap(), s);
    }
}
