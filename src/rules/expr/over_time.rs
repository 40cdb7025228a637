//! The functions of a range vector that reduce each series' window to one value, as Prometheus
//! computes them (`promql/functions.go`): the `*_over_time` family, `changes`, `resets`,
//! `deriv`, `predict_linear`, `irate` and `idelta`. The rate family (with its extrapolation)
//! stays in `functions`.
//!
//! Uses the evaluator's `Mean` and `kahan_inc` and `registry::Point`; nothing else.

use super::eval::{Mean, kahan_inc};
use crate::registry::Point;

/// `name` over one series' points, or `None` when the function gives no sample for them. `arg`
/// is the scalar argument of `quantile_over_time` (φ) and `predict_linear` (seconds ahead);
/// `t_ms` the evaluation time (`predict_linear` predicts from it).
pub(super) fn reduce(name: &str, points: &[Point], arg: f64, t_ms: i64) -> Option<f64> {
    let last = points.last()?;
    Some(match name {
        "count_over_time" => points.len() as f64,
        "last_over_time" => last.v,
        "present_over_time" => 1.0,
        "min_over_time" => points
            .iter()
            .fold(f64::NAN, |m, p| if p.v < m || m.is_nan() { p.v } else { m }),
        "max_over_time" => points
            .iter()
            .fold(f64::NAN, |m, p| if p.v > m || m.is_nan() { p.v } else { m }),
        "sum_over_time" => {
            let (mut sum, mut c) = (0.0, 0.0);
            for p in points {
                (sum, c) = kahan_inc(p.v, sum, c);
            }
            if sum.is_infinite() { sum } else { sum + c }
        }
        "avg_over_time" => {
            let mut mean = Mean::default();
            for p in points {
                mean.add(p.v);
            }
            mean.value()
        }
        "stddev_over_time" => variance(points).sqrt(),
        "stdvar_over_time" => variance(points),
        "quantile_over_time" => {
            let mut values: Vec<f64> = points.iter().map(|p| p.v).collect();
            quantile(arg, &mut values)
        }
        "changes" => {
            let mut n = 0.0;
            for w in points.windows(2) {
                let (prev, cur) = (w[0].v, w[1].v);
                if !(cur == prev || (cur.is_nan() && prev.is_nan())) {
                    n += 1.0;
                }
            }
            n
        }
        "resets" => points.windows(2).filter(|w| w[1].v < w[0].v).count() as f64,
        "deriv" => {
            if points.len() < 2 {
                return None;
            }
            linear_regression(points, points[0].t_ms).0
        }
        "predict_linear" => {
            if points.len() < 2 {
                return None;
            }
            let (slope, intercept) = linear_regression(points, t_ms);
            intercept + slope * arg
        }
        "irate" | "idelta" => {
            let [.., prev, last] = points else {
                return None;
            };
            let interval = last.t_ms - prev.t_ms;
            if interval == 0 {
                return None;
            }
            if name == "irate" {
                let delta = if last.v < prev.v {
                    last.v
                } else {
                    last.v - prev.v
                };
                delta / (interval as f64 / 1000.0)
            } else {
                last.v - prev.v
            }
        }
        _ => return None,
    })
}

/// The population variance, by Welford's method with compensated sums (Prometheus's
/// `stdvar_over_time`).
fn variance(points: &[Point]) -> f64 {
    let (mut count, mut mean, mut c_mean, mut aux, mut c_aux) = (0.0, 0.0, 0.0, 0.0, 0.0);
    for p in points {
        count += 1.0;
        let delta = p.v - (mean + c_mean);
        (mean, c_mean) = kahan_inc(delta / count, mean, c_mean);
        (aux, c_aux) = kahan_inc(delta * (p.v - (mean + c_mean)), aux, c_aux);
    }
    (aux + c_aux) / count
}

/// Prometheus's `quantile`: φ < 0 is -Inf, φ > 1 is +Inf, NaN is NaN; otherwise linear
/// interpolation between the two closest ranks of the sorted values (NaN sorting first, as Go's
/// `sort.Float64s` does). `None` without values.
pub(super) fn quantile(q: f64, values: &mut [f64]) -> f64 {
    if values.is_empty() || q.is_nan() {
        return f64::NAN;
    }
    if q < 0.0 {
        return f64::NEG_INFINITY;
    }
    if q > 1.0 {
        return f64::INFINITY;
    }
    values.sort_by(|a, b| match (a.is_nan(), b.is_nan()) {
        (true, true) => std::cmp::Ordering::Equal,
        (true, false) => std::cmp::Ordering::Less,
        (false, true) => std::cmp::Ordering::Greater,
        _ => a.total_cmp(b),
    });
    let n = values.len() as f64;
    let rank = q * (n - 1.0);
    let lower = rank.floor().max(0.0);
    let upper = (lower + 1.0).min(n - 1.0);
    let weight = rank - rank.floor();
    // Indexes within 0..n by construction.
    let (lo, hi) = (lower as usize, upper as usize);
    values[lo] * (1.0 - weight) + values[hi] * weight
}

/// Least-squares slope and intercept of the points, with x in seconds from `intercept_ms`
/// (Prometheus's `linearRegression`: a constant series has slope 0, or NaN when infinite).
fn linear_regression(points: &[Point], intercept_ms: i64) -> (f64, f64) {
    let init = points[0].v;
    let constant = points.iter().all(|p| p.v == init);
    let (mut n, mut sx, mut cx, mut sy, mut cy) = (0.0, 0.0, 0.0, 0.0, 0.0);
    let (mut sxy, mut cxy, mut sx2, mut cx2) = (0.0, 0.0, 0.0, 0.0);
    for p in points {
        n += 1.0;
        let x = (p.t_ms - intercept_ms) as f64 / 1e3;
        (sx, cx) = kahan_inc(x, sx, cx);
        (sy, cy) = kahan_inc(p.v, sy, cy);
        (sxy, cxy) = kahan_inc(x * p.v, sxy, cxy);
        (sx2, cx2) = kahan_inc(x * x, sx2, cx2);
    }
    if constant {
        if init.is_infinite() {
            return (f64::NAN, f64::NAN);
        }
        return (0.0, init);
    }
    let (sx, sy, sxy, sx2) = (sx + cx, sy + cy, sxy + cxy, sx2 + cx2);
    let cov = sxy - sx * sy / n;
    let var = sx2 - sx * sx / n;
    let slope = cov / var;
    (slope, sy / n - slope * sx / n)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pts(v: &[(i64, f64)]) -> Vec<Point> {
        v.iter().map(|&(t_ms, v)| Point { t_ms, v }).collect()
    }

    #[test]
    fn quantiles_interpolate_between_ranks_and_bound_phi() {
        let mut v = vec![4.0, 1.0, 3.0, 2.0];
        assert_eq!(quantile(0.5, &mut v), 2.5);
        assert_eq!(quantile(0.0, &mut v), 1.0);
        assert_eq!(quantile(1.0, &mut v), 4.0);
        assert_eq!(quantile(-0.1, &mut v), f64::NEG_INFINITY);
        assert_eq!(quantile(1.1, &mut v), f64::INFINITY);
        assert!(quantile(f64::NAN, &mut v).is_nan());
    }

    #[test]
    fn a_line_is_found_exactly() {
        // y = 2x + 1 with x in seconds.
        let p = pts(&[(0, 1.0), (1000, 3.0), (2000, 5.0)]);
        assert_eq!(reduce("deriv", &p, 0.0, 2000), Some(2.0));
        assert_eq!(reduce("predict_linear", &p, 10.0, 2000), Some(25.0));
        assert_eq!(reduce("changes", &p, 0.0, 0), Some(2.0));
        let r = pts(&[(0, 5.0), (1000, 2.0), (2000, 4.0)]);
        assert_eq!(reduce("resets", &r, 0.0, 0), Some(1.0));
        // irate after a reset takes the new value as the increase.
        assert_eq!(reduce("irate", &r, 0.0, 0), Some(2.0));
        assert_eq!(reduce("idelta", &r, 0.0, 0), Some(2.0));
    }
}
