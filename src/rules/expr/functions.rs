//! The supported functions, each as Prometheus computes it (`promql/functions.go`).

use promql_parser::label::MatchOp;
use promql_parser::parser::{Call, Expr, Offset};

use super::eval::{Evaluator, Mean, Sample, Value, drop_name, kahan_inc, unique};
use super::{NAME, SeriesSource};
use crate::registry::Point;
use crate::sample::Labels;

pub(super) fn call<S: SeriesSource>(ev: &Evaluator<'_, S>, c: &Call) -> Result<Value, String> {
    let args = &c.args.args;
    let name = c.func.name;
    match name {
        "time" => Ok(Value::Scalar(ev.t_ms() as f64 / 1000.0)),
        "vector" => Ok(Value::Vector(vec![Sample {
            labels: Labels::empty(),
            value: scalar_arg(ev, args.first().map(|b| b.as_ref()))?,
        }])),
        "scalar" => match ev.expr(first(args)?)? {
            Value::Vector(v) if v.len() == 1 => Ok(Value::Scalar(v[0].value)),
            _ => Ok(Value::Scalar(f64::NAN)),
        },
        "absent" => absent(ev, first(args)?),
        "abs" => map(ev, args, |v| Some(v.abs())),
        "clamp_min" => {
            let lo = scalar_arg(ev, args.get(1).map(|b| b.as_ref()))?;
            map(ev, args, |v| Some(go_max(v, lo)))
        }
        "clamp_max" => {
            let hi = scalar_arg(ev, args.get(1).map(|b| b.as_ref()))?;
            map(ev, args, |v| Some(go_min(v, hi)))
        }
        "clamp" => {
            let lo = scalar_arg(ev, args.get(1).map(|b| b.as_ref()))?;
            let hi = scalar_arg(ev, args.get(2).map(|b| b.as_ref()))?;
            if hi < lo {
                return Ok(Value::Vector(Vec::new()));
            }
            map(ev, args, |v| Some(go_max(lo, go_min(hi, v))))
        }
        "rate" | "increase" | "delta" => {
            let RangeArg {
                series: matrix,
                range_s,
                start,
                end,
            } = range_arg(ev, first(args)?)?;
            let counter = name != "delta";
            let per_second = name == "rate";
            let out = matrix
                .into_iter()
                .filter_map(|(labels, points)| {
                    extrapolated(&points, start, end, range_s, counter, per_second).map(|value| {
                        Sample {
                            labels: drop_name(&labels),
                            value,
                        }
                    })
                })
                .collect();
            Ok(Value::Vector(unique(out)?))
        }
        "avg_over_time" | "min_over_time" | "max_over_time" | "sum_over_time"
        | "count_over_time" | "last_over_time" => {
            let matrix = range_arg(ev, first(args)?)?.series;
            let keep_name = name == "last_over_time";
            let out = matrix
                .into_iter()
                .filter_map(|(labels, points)| {
                    let value = over_time(name, &points)?;
                    let labels = if keep_name {
                        labels
                    } else {
                        drop_name(&labels)
                    };
                    Some(Sample { labels, value })
                })
                .collect();
            Ok(Value::Vector(unique(out)?))
        }
        other => Err(format!("function `{other}` is not supported")),
    }
}

/// Go's `math.Max`, which Prometheus's `clamp*` use: NaN in, NaN out (Rust's `f64::max`
/// returns the other operand, which would turn an idle cache's NaN ratio into a bound).
fn go_max(a: f64, b: f64) -> f64 {
    if a.is_nan() || b.is_nan() {
        f64::NAN
    } else {
        a.max(b)
    }
}

/// Go's `math.Min`: NaN in, NaN out.
fn go_min(a: f64, b: f64) -> f64 {
    if a.is_nan() || b.is_nan() {
        f64::NAN
    } else {
        a.min(b)
    }
}

fn first(args: &[Box<Expr>]) -> Result<&Expr, String> {
    args.first()
        .map(|b| b.as_ref())
        .ok_or_else(|| "missing argument".to_owned())
}

fn scalar_arg<S: SeriesSource>(ev: &Evaluator<'_, S>, arg: Option<&Expr>) -> Result<f64, String> {
    match arg.map(|a| ev.expr(a)).transpose()? {
        Some(Value::Scalar(v)) => Ok(v),
        _ => Err("expected a scalar argument".into()),
    }
}

/// Applies `f` to every sample of the first (instant vector) argument, dropping the name.
fn map<S: SeriesSource>(
    ev: &Evaluator<'_, S>,
    args: &[Box<Expr>],
    f: impl Fn(f64) -> Option<f64>,
) -> Result<Value, String> {
    let Value::Vector(v) = ev.expr(first(args)?)? else {
        return Err("expected an instant vector".into());
    };
    let out = v
        .into_iter()
        .filter_map(|s| {
            f(s.value).map(|value| Sample {
                labels: drop_name(&s.labels),
                value,
            })
        })
        .collect();
    Ok(Value::Vector(unique(out)?))
}

/// A range argument: its series, its length in seconds, and its window's bounds in ms.
struct RangeArg {
    series: Vec<(Labels, Vec<Point>)>,
    range_s: f64,
    start: i64,
    end: i64,
}

/// The range argument, with its length in seconds and the bounds of its window in ms.
fn range_arg<S: SeriesSource>(ev: &Evaluator<'_, S>, arg: &Expr) -> Result<RangeArg, String> {
    let ms = match arg {
        Expr::MatrixSelector(ms) => ms,
        Expr::Paren(p) => return range_arg(ev, &p.expr),
        _ => return Err("expected a range vector selector".into()),
    };
    let offset = match &ms.vs.offset {
        Some(Offset::Pos(d)) => i64::try_from(d.as_millis()).unwrap_or(i64::MAX),
        Some(Offset::Neg(d)) => -i64::try_from(d.as_millis()).unwrap_or(i64::MAX),
        None => 0,
    };
    let range_ms = i64::try_from(ms.range.as_millis()).unwrap_or(i64::MAX);
    let end = ev.t_ms() - offset;
    Ok(RangeArg {
        series: ev.range(&ms.vs, ms.range),
        range_s: ms.range.as_secs_f64(),
        start: end - range_ms,
        end,
    })
}

/// Prometheus's `extrapolatedRate`: the increase over the samples, corrected for counter resets,
/// extrapolated towards the window's edges (all the way when the samples reach within 110 % of
/// their average spacing of an edge, else by half a spacing; never below a counter's zero).
fn extrapolated(
    points: &[Point],
    range_start: i64,
    range_end: i64,
    range_s: f64,
    counter: bool,
    per_second: bool,
) -> Option<f64> {
    if points.len() < 2 {
        return None;
    }
    let (first, last) = (points.first()?, points.last()?);
    let mut result = last.v - first.v;
    if counter {
        let mut prev = first.v;
        for p in &points[1..] {
            if p.v < prev {
                result += prev;
            }
            prev = p.v;
        }
    }
    let mut to_start = (first.t_ms - range_start) as f64 / 1000.0;
    let mut to_end = (range_end - last.t_ms) as f64 / 1000.0;
    let sampled = (last.t_ms - first.t_ms) as f64 / 1000.0;
    let average = sampled / (points.len() - 1) as f64;
    let threshold = average * 1.1;
    if to_start >= threshold {
        to_start = average / 2.0;
    }
    if counter {
        let mut to_zero = to_start;
        if result > 0.0 && first.v >= 0.0 {
            to_zero = sampled * (first.v / result);
        }
        if to_zero < to_start {
            to_start = to_zero;
        }
    }
    if to_end >= threshold {
        to_end = average / 2.0;
    }
    let mut factor = (sampled + to_start + to_end) / sampled;
    if per_second {
        factor /= range_s;
    }
    Some(result * factor)
}

fn over_time(name: &str, points: &[Point]) -> Option<f64> {
    let last = points.last()?;
    Some(match name {
        "count_over_time" => points.len() as f64,
        "last_over_time" => last.v,
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
        _ => return None,
    })
}

/// `absent(v)`: nothing when `v` has samples, else one sample of value 1 whose labels are the
/// equality matchers of the selector inside (a label named twice is left out).
fn absent<S: SeriesSource>(ev: &Evaluator<'_, S>, arg: &Expr) -> Result<Value, String> {
    let Value::Vector(v) = ev.expr(arg)? else {
        return Err("absent needs an instant vector".into());
    };
    if !v.is_empty() {
        return Ok(Value::Vector(Vec::new()));
    }
    let mut pairs: Vec<(String, String)> = Vec::new();
    if let Some(vs) = selector_in(arg) {
        let all = &vs.matchers.matchers;
        for m in all {
            // A label matched twice (by any matchers) has no single value to report.
            let once = all.iter().filter(|o| o.name == m.name).count() == 1;
            if m.name != NAME && once && matches!(m.op, MatchOp::Equal) {
                pairs.push((m.name.clone(), m.value.clone()));
            }
        }
    }
    Ok(Value::Vector(vec![Sample {
        labels: Labels::new(pairs),
        value: 1.0,
    }]))
}

/// The selector an expression is, through parentheses.
fn selector_in(expr: &Expr) -> Option<&promql_parser::parser::VectorSelector> {
    match expr {
        Expr::VectorSelector(vs) => Some(vs),
        Expr::MatrixSelector(ms) => Some(&ms.vs),
        Expr::Paren(p) => selector_in(&p.expr),
        _ => None,
    }
}
