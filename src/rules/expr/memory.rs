//! An in-memory `SeriesSource`, and the series notation Prometheus's test scripts and promtool's
//! `input_series` share (`metric{a="b"} 0+10x5 _ stale`). Used by the conformance tests and the
//! rule unit tests.

use std::collections::BTreeMap;

use promql_parser::label::MatchOp;
use promql_parser::parser::Expr;

use super::{NAME, SeriesSource};
use crate::registry::{Point, STALE_NAN_BITS};
use crate::sample::Labels;

/// Series kept in memory, by label set (with `__name__`).
#[derive(Debug, Default, Clone)]
pub struct MemorySeries {
    series: BTreeMap<Labels, Vec<Point>>,
}

impl MemorySeries {
    /// An empty set.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds points to a series, keeping its points in time order.
    pub fn add(&mut self, labels: Labels, points: impl IntoIterator<Item = Point>) {
        let s = self.series.entry(labels).or_default();
        s.extend(points);
        s.sort_by_key(|p| p.t_ms);
    }

    /// Drops everything.
    pub fn clear(&mut self) {
        self.series.clear();
    }

    /// Adds one line of the series notation with its `i`-th value at `start_ms + i * step_ms`.
    pub fn load_line(&mut self, line: &str, start_ms: i64, step_ms: i64) -> Result<(), String> {
        let (labels, values) = parse_series_line(line)?;
        let points = values.into_iter().enumerate().filter_map(|(i, v)| {
            v.map(|v| Point {
                t_ms: start_ms + i as i64 * step_ms,
                v,
            })
        });
        self.add(labels, points.collect::<Vec<_>>());
        Ok(())
    }
}

impl SeriesSource for MemorySeries {
    fn select(
        &self,
        matchers: &[promql_parser::label::Matcher],
        start_ms: i64,
        end_ms: i64,
    ) -> Vec<(Labels, Vec<Point>)> {
        self.series
            .iter()
            .filter(|(labels, _)| {
                matchers
                    .iter()
                    .all(|m| m.is_match(labels.get(&m.name).unwrap_or("")))
            })
            .filter_map(|(labels, points)| {
                let kept: Vec<Point> = points
                    .iter()
                    .filter(|p| p.t_ms >= start_ms && p.t_ms <= end_ms)
                    .copied()
                    .collect();
                (!kept.is_empty()).then(|| (labels.clone(), kept))
            })
            .collect()
    }
}

/// `metric{a="b"} 1 2+3x4 _ stale` → the label set and one entry per step (`None` = no sample).
pub fn parse_series_line(line: &str) -> Result<(Labels, Vec<Option<f64>>), String> {
    let line = line.trim();
    // The selector ends at the closing brace, or at the first blank when there are no labels.
    let split = match (line.find('{'), line.find(char::is_whitespace)) {
        (Some(brace), Some(ws)) if brace < ws => line.find('}').map(|i| i + 1),
        (_, ws) => ws,
    }
    .unwrap_or(line.len());
    let (selector, values) = line.split_at(split);
    let labels = parse_labels(selector.trim())?;
    let mut out = Vec::new();
    for token in values.split_whitespace() {
        expand(token, &mut out)?;
    }
    Ok((labels, out))
}

/// A series selector written with `=` matchers only → its label set.
pub fn parse_labels(selector: &str) -> Result<Labels, String> {
    let expr = promql_parser::parser::parse(selector).map_err(|e| format!("{selector}: {e}"))?;
    let Expr::VectorSelector(vs) = expr else {
        return Err(format!("{selector}: not a series"));
    };
    let mut pairs: Vec<(String, String)> = Vec::new();
    if let Some(name) = vs.name {
        pairs.push((NAME.to_owned(), name));
    }
    for m in vs.matchers.matchers {
        if !matches!(m.op, MatchOp::Equal) {
            return Err(format!("{selector}: a series has only `=` labels"));
        }
        pairs.push((m.name, m.value));
    }
    Ok(Labels::new(pairs))
}

fn number(text: &str) -> Result<f64, String> {
    if text == "stale" {
        return Ok(f64::from_bits(STALE_NAN_BITS));
    }
    text.parse::<f64>()
        .map_err(|_| format!("bad value {text:?}"))
}

/// One token of the expanding notation.
fn expand(token: &str, out: &mut Vec<Option<f64>>) -> Result<(), String> {
    if token.starts_with("{{") {
        return Err("native histograms are not supported".into());
    }
    let Some((head, times)) = token.rsplit_once('x') else {
        out.push(if token == "_" {
            None
        } else {
            Some(number(token)?)
        });
        return Ok(());
    };
    let n: usize = times
        .parse()
        .map_err(|_| format!("bad repeat count in {token:?}"))?;
    if head == "_" {
        out.extend(std::iter::repeat_n(None, n));
        return Ok(());
    }
    // `a+bxN` / `a-bxN`: the sign that is neither leading nor part of an exponent.
    let bytes = head.as_bytes();
    let split = (1..bytes.len())
        .rev()
        .find(|&i| (bytes[i] == b'+' || bytes[i] == b'-') && !matches!(bytes[i - 1], b'e' | b'E'));
    let (start, step) = match split {
        Some(i) => {
            let step = number(&head[i + 1..])?;
            (
                number(&head[..i])?,
                if bytes[i] == b'-' { -step } else { step },
            )
        }
        None => (number(head)?, 0.0),
    };
    for i in 0..=n {
        out.push(Some(start + step * i as f64));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_expanding_notation() {
        let (l, v) = parse_series_line(r#"m{a="b"} 0+10x3 _ -1-1x2 5x1 _x2 stale 1e3"#).unwrap();
        assert_eq!(l.get(NAME), Some("m"));
        assert_eq!(l.get("a"), Some("b"));
        let want = [
            Some(0.0),
            Some(10.0),
            Some(20.0),
            Some(30.0),
            None,
            Some(-1.0),
            Some(-2.0),
            Some(-3.0),
            Some(5.0),
            Some(5.0),
            None,
            None,
        ];
        assert_eq!(&v[..12], &want);
        assert!(crate::registry::is_stale_marker(v[12].unwrap()));
        assert_eq!(v[13], Some(1000.0));
        let (_, v) = parse_series_line("m 1 Inf -Inf NaN").unwrap();
        assert_eq!(v[1], Some(f64::INFINITY));
        assert!(v[3].unwrap().is_nan());
    }
}
