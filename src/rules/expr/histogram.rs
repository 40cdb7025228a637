//! `histogram_quantile` over classic histograms (`le` buckets), as Prometheus computes it
//! (`promql/quantile.go`): buckets of one series grouped by their labels without `le`, sorted,
//! equal bounds merged, counts forced monotonic (and tiny float differences ignored), then
//! linear interpolation inside the bucket holding the rank.
//!
//! Uses the evaluator's `Sample` and `sample::Labels`; nothing else.

use rustc_hash::FxHashMap as HashMap;

use super::eval::Sample;
use crate::sample::Labels;

/// Tolerance under which two cumulative counts are taken as equal (Prometheus's
/// `smallDeltaTolerance`).
const SMALL_DELTA: f64 = 1e-12;

/// The φ-quantile of each histogram in `buckets` (samples with an `le` label; others are
/// ignored), labelled without `le` and `__name__`. Histograms are told apart by their name too,
/// as Prometheus does: two of them that differ only by name give two results with one label
/// set, which the caller refuses (they are never merged into one).
pub(super) fn quantile(q: f64, buckets: Vec<Sample>) -> Result<Vec<Sample>, String> {
    let mut groups: Vec<(Labels, Vec<(f64, f64)>)> = Vec::new();
    let mut index: HashMap<Labels, usize> = HashMap::default();
    for s in buckets {
        let Some(le) = s.labels.get("le") else {
            continue;
        };
        let Some(upper) = parse_le(le) else {
            continue;
        };
        let key = s.labels.retain(|k| k != "le");
        let i = *index.entry(key.clone()).or_insert_with(|| {
            groups.push((key, Vec::new()));
            groups.len() - 1
        });
        groups[i].1.push((upper, s.value));
    }
    Ok(groups
        .into_iter()
        .map(|(labels, mut b)| Sample {
            labels: labels.without_name(),
            value: bucket_quantile(q, &mut b),
        })
        .collect())
}

/// An `le` value as Prometheus reads it (Go's `strconv.ParseFloat`: `+Inf`, `Inf`, `inf`...).
fn parse_le(le: &str) -> Option<f64> {
    let t = le.trim();
    match t.to_ascii_lowercase().as_str() {
        "+inf" | "inf" | "+infinity" | "infinity" => Some(f64::INFINITY),
        "-inf" | "-infinity" => Some(f64::NEG_INFINITY),
        "nan" => Some(f64::NAN),
        _ => t.parse().ok(),
    }
}

/// One histogram's quantile from its `(upper bound, cumulative count)` buckets.
fn bucket_quantile(q: f64, buckets: &mut Vec<(f64, f64)>) -> f64 {
    if q.is_nan() {
        return f64::NAN;
    }
    if q < 0.0 {
        return f64::NEG_INFINITY;
    }
    if q > 1.0 {
        return f64::INFINITY;
    }
    buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
    if !buckets.last().is_some_and(|b| b.0 == f64::INFINITY) {
        return f64::NAN;
    }
    // Equal bounds (`le="1"` and `le="1.0"`) are one bucket.
    buckets.dedup_by(|cur, prev| {
        if cur.0 == prev.0 {
            prev.1 += cur.1;
            true
        } else {
            false
        }
    });
    ensure_monotonic(buckets);
    if buckets.len() < 2 {
        return f64::NAN;
    }
    let observations = buckets[buckets.len() - 1].1;
    if observations == 0.0 {
        return f64::NAN;
    }
    let mut rank = q * observations;
    // The first bucket (among all but the last) whose count reaches the rank.
    let b = buckets[..buckets.len() - 1]
        .iter()
        .position(|x| x.1 >= rank)
        .unwrap_or(buckets.len() - 1);
    if b == buckets.len() - 1 {
        return buckets[buckets.len() - 2].0;
    }
    if b == 0 && buckets[0].0 <= 0.0 {
        return buckets[0].0;
    }
    let end = buckets[b].0;
    let mut count = buckets[b].1;
    let mut start = 0.0;
    if b > 0 {
        start = buckets[b - 1].0;
        count -= buckets[b - 1].1;
        rank -= buckets[b - 1].1;
    }
    start + (end - start) * (rank / count)
}

/// Cumulative counts never fall: a lower one takes the previous value (a scrape that read
/// buckets at slightly different moments), and one within a relative 1e-12 of the previous is
/// taken as equal to it.
fn ensure_monotonic(buckets: &mut [(f64, f64)]) {
    let Some(first) = buckets.first() else { return };
    let mut prev = first.1;
    for b in buckets.iter_mut().skip(1) {
        let cur = b.1;
        if cur == prev {
            continue;
        }
        if almost_equal(prev, cur, SMALL_DELTA) || cur < prev {
            b.1 = prev;
            continue;
        }
        prev = cur;
    }
}

/// Prometheus's `AlmostEqual`.
fn almost_equal(a: f64, b: f64, epsilon: f64) -> bool {
    let min_normal = f64::MIN_POSITIVE;
    if a == b {
        return true;
    }
    let sum = a.abs() + b.abs();
    let diff = (a - b).abs();
    if a == 0.0 || b == 0.0 || sum < min_normal {
        return diff < epsilon * min_normal;
    }
    diff / sum.min(f64::MAX) < epsilon
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_rank_is_interpolated_inside_its_bucket() {
        // 10 observations ≤ 0.1, 20 more ≤ 0.5, none above: the median (rank 15) is a quarter
        // of the way into the second bucket.
        let mut b = vec![(0.1, 10.0), (0.5, 30.0), (f64::INFINITY, 30.0)];
        assert!((bucket_quantile(0.5, &mut b) - 0.2).abs() < 1e-12);
        // Beyond the last finite bucket: its bound.
        let mut b = vec![(0.1, 10.0), (f64::INFINITY, 20.0)];
        assert_eq!(bucket_quantile(0.99, &mut b), 0.1);
        // No +Inf bucket: NaN.
        let mut b = vec![(0.1, 10.0), (0.5, 20.0)];
        assert!(bucket_quantile(0.5, &mut b).is_nan());
        // A count that falls is raised to the one before.
        let mut b = vec![(0.1, 10.0), (0.5, 8.0), (f64::INFINITY, 10.0)];
        assert!((bucket_quantile(0.5, &mut b) - 0.05).abs() < 1e-12);
    }
}
