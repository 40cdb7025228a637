//! The supported functions, each as Prometheus computes it (`promql/functions.go`).

use promql_parser::label::MatchOp;
use promql_parser::parser::{Call, Expr};

use super::eval::{
    Evaluator, NameCheck, Sample, Value, drop_name, offset_ms, unique, unique_unless,
};
use super::{NAME, SeriesSource, histogram, over_time, strip_parens};
use crate::registry::Point;
use crate::sample::Labels;

pub(super) fn call<S: SeriesSource>(ev: &Evaluator<'_, S>, c: &Call) -> Result<Value, String> {
    let args = &c.args.args;
    let name = c.func.name;
    match name {
        "time" => Ok(Value::Scalar(ev.t_ms() as f64 / 1000.0)),
        "pi" => Ok(Value::Scalar(std::f64::consts::PI)),
        "vector" => Ok(Value::Vector(vec![Sample {
            labels: Labels::empty(),
            value: scalar_arg(ev, args, 0)?,
        }])),
        "scalar" => match ev.expr(arg(args, 0)?)? {
            Value::Vector(v) if v.len() == 1 => Ok(Value::Scalar(v[0].value)),
            _ => Ok(Value::Scalar(f64::NAN)),
        },
        "absent" => absent(ev, arg(args, 0)?),
        "absent_over_time" => {
            let matrix = range_arg(ev, arg(args, 0)?)?;
            if matrix.is_empty() {
                absent_labels(arg(args, 0)?)
            } else {
                Ok(Value::Vector(Vec::new()))
            }
        }
        "abs" => map(ev, args, |v| Some(v.abs())),
        "ceil" => map(ev, args, |v| Some(v.ceil())),
        "floor" => map(ev, args, |v| Some(v.floor())),
        "sqrt" => map(ev, args, |v| Some(v.sqrt())),
        "exp" => map(ev, args, |v| Some(v.exp())),
        "ln" => map(ev, args, |v| Some(v.ln())),
        "log2" => map(ev, args, |v| Some(v.log2())),
        "log10" => map(ev, args, |v| Some(v.log10())),
        "sin" => map(ev, args, |v| Some(v.sin())),
        "cos" => map(ev, args, |v| Some(v.cos())),
        "tan" => map(ev, args, |v| Some(v.tan())),
        "asin" => map(ev, args, |v| Some(v.asin())),
        "acos" => map(ev, args, |v| Some(v.acos())),
        "atan" => map(ev, args, |v| Some(v.atan())),
        "sinh" => map(ev, args, |v| Some(v.sinh())),
        "cosh" => map(ev, args, |v| Some(v.cosh())),
        "tanh" => map(ev, args, |v| Some(v.tanh())),
        "asinh" => map(ev, args, |v| Some(v.asinh())),
        "acosh" => map(ev, args, |v| Some(v.acosh())),
        "atanh" => map(ev, args, |v| Some(v.atanh())),
        // As Prometheus writes them (Rust's to_degrees multiplies by 180/π, rounded once
        // more, and differs in the last bit for about a quarter of all values).
        "deg" => map(ev, args, |v| Some(v * 180.0 / std::f64::consts::PI)),
        "rad" => map(ev, args, |v| Some(v * std::f64::consts::PI / 180.0)),
        // Go's sign: NaN and ±0 are returned as they are.
        "sgn" => map(ev, args, |v| {
            Some(if v < 0.0 {
                -1.0
            } else if v > 0.0 {
                1.0
            } else {
                v
            })
        }),
        "round" => {
            let to = if args.len() > 1 {
                scalar_arg(ev, args, 1)?
            } else {
                1.0
            };
            // Prometheus rounds half up, on the multiple's inverse.
            let inverse = 1.0 / to;
            map(ev, args, |v| Some((v * inverse + 0.5).floor() / inverse))
        }
        "clamp_min" => {
            let lo = scalar_arg(ev, args, 1)?;
            map(ev, args, |v| Some(go_max(v, lo)))
        }
        "clamp_max" => {
            let hi = scalar_arg(ev, args, 1)?;
            map(ev, args, |v| Some(go_min(v, hi)))
        }
        "clamp" => {
            let lo = scalar_arg(ev, args, 1)?;
            let hi = scalar_arg(ev, args, 2)?;
            if hi < lo {
                return Ok(Value::Vector(Vec::new()));
            }
            map(ev, args, |v| Some(go_max(lo, go_min(hi, v))))
        }
        "minute" | "hour" | "day_of_week" | "day_of_month" | "day_of_year" | "days_in_month"
        | "month" | "year" => date(ev, name, args),
        "timestamp" => timestamp(ev, arg(args, 0)?),
        "sort" | "sort_desc" => {
            let Value::Vector(mut v) = ev.expr(arg(args, 0)?)? else {
                return Err("sort needs an instant vector".into());
            };
            // NaN last either way, as Prometheus sorts.
            let desc = name == "sort_desc";
            v.sort_by(|a, b| match (a.value.is_nan(), b.value.is_nan()) {
                (true, true) => std::cmp::Ordering::Equal,
                (true, false) => std::cmp::Ordering::Greater,
                (false, true) => std::cmp::Ordering::Less,
                _ if desc => b.value.total_cmp(&a.value),
                _ => a.value.total_cmp(&b.value),
            });
            Ok(Value::Vector(v))
        }
        "label_replace" => label_replace(ev, args),
        "label_join" => label_join(ev, args),
        "histogram_quantile" => {
            let q = scalar_arg(ev, args, 0)?;
            let Value::Vector(v) = ev.expr(arg(args, 1)?)? else {
                return Err("histogram_quantile needs an instant vector".into());
            };
            Ok(Value::Vector(unique(histogram::quantile(q, v)?)?))
        }
        "rate" | "increase" | "delta" => {
            let counter = name != "delta";
            let per_second = name == "rate";
            let range = arg(args, 0)?;
            let (range_s, start, end) = range_window(ev, range)?;
            let mut names = NameCheck::default();
            let mut out = Vec::new();
            each_series(ev, range, |labels, points| {
                names.see(labels);
                if let Some(value) = extrapolated(points, start, end, range_s, counter, per_second)
                {
                    out.push(Sample {
                        labels: drop_name(labels),
                        value,
                    });
                }
            })?;
            Ok(Value::Vector(unique_unless(names.one(), out)?))
        }
        "avg_over_time" | "min_over_time" | "max_over_time" | "sum_over_time"
        | "count_over_time" | "last_over_time" | "present_over_time" | "stddev_over_time"
        | "stdvar_over_time" | "quantile_over_time" | "changes" | "resets" | "deriv"
        | "predict_linear" | "irate" | "idelta" => {
            // φ comes first for quantile_over_time; predict_linear's seconds come second.
            let (range, arg) = match name {
                "quantile_over_time" => (arg(args, 1)?, scalar_arg(ev, args, 0)?),
                "predict_linear" => (arg(args, 0)?, scalar_arg(ev, args, 1)?),
                _ => (arg(args, 0)?, 0.0),
            };
            let keep_name = name == "last_over_time";
            let t_ms = ev.t_ms();
            let mut names = NameCheck::default();
            let mut out = Vec::new();
            each_series(ev, range, |labels, points| {
                names.see(labels);
                if let Some(value) = over_time::reduce(name, points, arg, t_ms) {
                    let labels = if keep_name {
                        labels.clone()
                    } else {
                        drop_name(labels)
                    };
                    out.push(Sample { labels, value });
                }
            })?;
            Ok(Value::Vector(unique_unless(keep_name || names.one(), out)?))
        }
        other => Err(format!("function `{other}` is not supported")),
    }
}

/// The date functions: each sample's value (or, without an argument, the evaluation time) read
/// as seconds since the epoch, in UTC.
fn date<S: SeriesSource>(
    ev: &Evaluator<'_, S>,
    name: &str,
    args: &[Box<Expr>],
) -> Result<Value, String> {
    use chrono::{Datelike as _, Timelike as _};
    let part = |secs: f64| -> f64 {
        // Go converts with int64(f): towards zero; a value beyond any date gives NaN here.
        if !secs.is_finite() {
            return f64::NAN;
        }
        let Some(t) = chrono::DateTime::from_timestamp(secs.trunc() as i64, 0) else {
            return f64::NAN;
        };
        f64::from(match name {
            "minute" => t.minute(),
            "hour" => t.hour(),
            "day_of_week" => t.weekday().num_days_from_sunday(),
            "day_of_month" => t.day(),
            "day_of_year" => t.ordinal(),
            "month" => t.month(),
            "year" => return f64::from(t.year()),
            _ => days_in_month(t.year(), t.month()),
        })
    };
    let Some(arg) = args.first() else {
        let now = (ev.t_ms().div_euclid(1000)) as f64;
        return Ok(Value::Vector(vec![Sample {
            labels: Labels::empty(),
            value: part(now),
        }]));
    };
    let Value::Vector(v) = ev.expr(arg)? else {
        return Err(format!("{name} needs an instant vector"));
    };
    let out = v
        .into_iter()
        .map(|s| Sample {
            labels: drop_name(&s.labels),
            value: part(s.value),
        })
        .collect();
    Ok(Value::Vector(unique(out)?))
}

fn days_in_month(year: i32, month: u32) -> u32 {
    let (ny, nm) = if month == 12 {
        (year + 1, 1)
    } else {
        (year, month + 1)
    };
    match (
        chrono::NaiveDate::from_ymd_opt(year, month, 1),
        chrono::NaiveDate::from_ymd_opt(ny, nm, 1),
    ) {
        (Some(a), Some(b)) => u32::try_from((b - a).num_days()).unwrap_or(0),
        _ => 0,
    }
}

/// `timestamp(v)`: the time of each sample in seconds: a selector's samples keep the time they
/// were taken at; any other expression's samples are at the evaluation time.
fn timestamp<S: SeriesSource>(ev: &Evaluator<'_, S>, arg: &Expr) -> Result<Value, String> {
    if let Expr::VectorSelector(vs) = strip_parens(arg) {
        let out = ev
            .instant_points(vs)
            .into_iter()
            .map(|(labels, p)| Sample {
                labels: drop_name(&labels),
                value: p.t_ms as f64 / 1000.0,
            })
            .collect();
        return Ok(Value::Vector(unique(out)?));
    }
    let Value::Vector(v) = ev.expr(arg)? else {
        return Err("timestamp needs an instant vector".into());
    };
    let t = ev.t_ms() as f64 / 1000.0;
    let out = v
        .into_iter()
        .map(|s| Sample {
            labels: drop_name(&s.labels),
            value: t,
        })
        .collect();
    Ok(Value::Vector(unique(out)?))
}

/// A string argument (a literal, possibly in parentheses).
fn string_arg(args: &[Box<Expr>], i: usize) -> Result<&str, String> {
    match strip_parens(arg(args, i)?) {
        Expr::StringLiteral(s) => Ok(&s.val),
        _ => Err("expected a string argument".into()),
    }
}

/// Whether `name` is a valid label name (Prometheus's legacy rule, which label_replace and
/// label_join check on their destination).
pub(super) fn valid_label_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// `labels` with `name` set to `value`, or removed when `value` is empty.
fn set_label(labels: &Labels, name: &str, value: &str) -> Labels {
    if value.is_empty() {
        labels.retain(|k| k != name)
    } else {
        labels.retain_with(|k| k != name, &Labels::new([(name, value)]))
    }
}

/// Checks the string arguments of label_replace and label_join (the label names, the regular
/// expression), which are constants: wrong, they would fail every evaluation of the rule.
pub(super) fn check_constants(c: &Call) -> Result<(), String> {
    let args = &c.args.args;
    match c.func.name {
        "label_replace" => {
            replace_regex(string_arg(args, 4)?)?;
            check_label_name(string_arg(args, 1)?, "destination", "label_replace")
        }
        "label_join" => {
            for i in 3..args.len() {
                let s = string_arg(args, i)?;
                if s != NAME {
                    check_label_name(s, "source", "label_join")?;
                }
            }
            check_label_name(string_arg(args, 1)?, "destination", "label_join")
        }
        _ => Ok(()),
    }
}

fn check_label_name(name: &str, role: &str, function: &str) -> Result<(), String> {
    if valid_label_name(name) {
        Ok(())
    } else {
        Err(format!("invalid {role} label name in {function}(): {name}"))
    }
}

/// label_replace's regular expression, anchored at both ends as Prometheus anchors it.
fn replace_regex(regex: &str) -> Result<regex::Regex, String> {
    regex::Regex::new(&format!("^(?s:{regex})$"))
        .map_err(|e| format!("invalid regular expression in label_replace(): {regex}: {e}"))
}

/// `label_replace(v, dst, replacement, src, regex)`: where the anchored regex matches the
/// value of `src`, `dst` becomes the replacement with `$1`/`${name}` expanded (empty: removed).
fn label_replace<S: SeriesSource>(
    ev: &Evaluator<'_, S>,
    args: &[Box<Expr>],
) -> Result<Value, String> {
    let (dst, replacement, src, regex) = (
        string_arg(args, 1)?,
        string_arg(args, 2)?,
        string_arg(args, 3)?,
        string_arg(args, 4)?,
    );
    // The names were checked at load (`check_constants`).
    let re = replace_regex(regex)?;
    relabel(ev, args, |labels| {
        match re.captures(labels.get(src).unwrap_or("")) {
            Some(caps) => {
                let mut res = String::new();
                caps.expand(replacement, &mut res);
                set_label(labels, dst, &res)
            }
            None => labels.clone(),
        }
    })
}

/// `label_join(v, dst, separator, src...)`: `dst` becomes the values of the `src` labels
/// joined by the separator (a missing label is an empty value; an empty result removes `dst`).
fn label_join<S: SeriesSource>(ev: &Evaluator<'_, S>, args: &[Box<Expr>]) -> Result<Value, String> {
    let dst = string_arg(args, 1)?;
    let sep = string_arg(args, 2)?;
    let srcs = (3..args.len())
        .map(|i| string_arg(args, i))
        .collect::<Result<Vec<_>, _>>()?;
    relabel(ev, args, |labels| {
        let joined = srcs
            .iter()
            .map(|l| labels.get(l).unwrap_or(""))
            .collect::<Vec<_>>()
            .join(sep);
        set_label(labels, dst, &joined)
    })
}

/// The first (instant vector) argument with each sample's labels replaced by `f`'s, the
/// name kept: what label_replace and label_join share.
fn relabel<S: SeriesSource>(
    ev: &Evaluator<'_, S>,
    args: &[Box<Expr>],
    f: impl Fn(&Labels) -> Labels,
) -> Result<Value, String> {
    let Value::Vector(v) = ev.expr(arg(args, 0)?)? else {
        return Err("expected an instant vector".into());
    };
    let out = v
        .into_iter()
        .map(|s| Sample {
            labels: f(&s.labels),
            value: s.value,
        })
        .collect();
    Ok(Value::Vector(unique(out)?))
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

/// Argument `i`.
fn arg(args: &[Box<Expr>], i: usize) -> Result<&Expr, String> {
    args.get(i)
        .map(|b| b.as_ref())
        .ok_or_else(|| "missing argument".to_owned())
}

/// Argument `i`, evaluated to a scalar.
fn scalar_arg<S: SeriesSource>(
    ev: &Evaluator<'_, S>,
    args: &[Box<Expr>],
    i: usize,
) -> Result<f64, String> {
    match ev.expr(arg(args, i)?)? {
        Value::Scalar(v) => Ok(v),
        _ => Err("expected a scalar argument".into()),
    }
}

/// Applies `f` to every sample of the first (instant vector) argument, dropping the name.
fn map<S: SeriesSource>(
    ev: &Evaluator<'_, S>,
    args: &[Box<Expr>],
    f: impl Fn(f64) -> Option<f64>,
) -> Result<Value, String> {
    let Value::Vector(v) = ev.expr(arg(args, 0)?)? else {
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

/// The series of a range argument (a range selector or a subquery).
fn range_arg<S: SeriesSource>(
    ev: &Evaluator<'_, S>,
    arg: &Expr,
) -> Result<Vec<(Labels, Vec<Point>)>, String> {
    match arg {
        Expr::MatrixSelector(ms) => Ok(ev.range(&ms.vs, ms.range)),
        Expr::Subquery(sq) => Ok(ev.subquery(sq)?.0),
        Expr::Paren(p) => range_arg(ev, &p.expr),
        _ => Err("expected a range vector selector or a subquery".into()),
    }
}

/// A range argument's length in seconds and its window's bounds in ms (the same as
/// `range_arg` gives, without evaluating it).
fn range_window<S: SeriesSource>(
    ev: &Evaluator<'_, S>,
    arg: &Expr,
) -> Result<(f64, i64, i64), String> {
    let (range, at, offset) = match arg {
        Expr::MatrixSelector(ms) => (ms.range, ms.vs.at.as_ref(), ms.vs.offset.as_ref()),
        Expr::Subquery(sq) => (sq.range, sq.at.as_ref(), sq.offset.as_ref()),
        Expr::Paren(p) => return range_window(ev, &p.expr),
        _ => return Err("expected a range vector selector or a subquery".into()),
    };
    let range_ms = i64::try_from(range.as_millis()).unwrap_or(i64::MAX);
    let end = ev
        .at_time(at)
        .unwrap_or(ev.t_ms())
        .saturating_sub(offset_ms(offset));
    Ok((range.as_secs_f64(), end.saturating_sub(range_ms), end))
}

/// Calls `f` with each series of a range argument: a range selector's read in place, a
/// subquery's as it computed them.
fn each_series<S: SeriesSource>(
    ev: &Evaluator<'_, S>,
    arg: &Expr,
    mut f: impl FnMut(&Labels, &[Point]),
) -> Result<(), String> {
    match arg {
        Expr::MatrixSelector(ms) => {
            ev.each_range(&ms.vs, ms.range, f);
            Ok(())
        }
        Expr::Paren(p) => each_series(ev, &p.expr, f),
        _ => {
            for (labels, points) in range_arg(ev, arg)? {
                f(&labels, &points);
            }
            Ok(())
        }
    }
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

/// `absent(v)`: nothing when `v` has samples, else one sample of value 1 whose labels are the
/// equality matchers of the selector inside (a label named twice is left out).
fn absent<S: SeriesSource>(ev: &Evaluator<'_, S>, arg: &Expr) -> Result<Value, String> {
    let Value::Vector(v) = ev.expr(arg)? else {
        return Err("absent needs an instant vector".into());
    };
    if !v.is_empty() {
        return Ok(Value::Vector(Vec::new()));
    }
    absent_labels(arg)
}

/// The one sample `absent` and `absent_over_time` return: value 1, labelled with the equality
/// matchers of the selector inside `arg`.
fn absent_labels(arg: &Expr) -> Result<Value, String> {
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
