//! The PromQL evaluator: a supported subset of PromQL, parsed by `promql-parser` and evaluated
//! over any `SeriesSource` (the registry's history, or an in-memory set for tests and rule unit
//! tests) with Prometheus's semantics.
//!
//! Owns what is supported: `check` refuses everything else, with the reason, before anything is
//! evaluated, so an expression is either evaluated as Prometheus would or not accepted at all.
//! Supported: all of PromQL over float samples without a Prometheus feature flag, with
//! Prometheus 3's semantics, except what is listed as refused: number and string literals
//! (strings as function and `count_values` arguments); unary minus; instant and range
//! selectors with all four matchers and `offset`; every binary operator with `bool`,
//! `on`/`ignoring` and `group_left`/`group_right`; every aggregation (`sum avg min max count
//! group stddev stdvar quantile topk bottomk count_values`, with `by`/`without`); every
//! function over floats (`functions`, `over_time`, `histogram`); subqueries with their own or
//! the default step; `@` with a time, `start()` or `end()`. Refused, with the reason:
//! functions and aggregations behind Prometheus's
//! `promql-experimental-functions` flag (`limitk`, `mad_over_time`, `sort_by_label`, ...), and
//! the native-histogram functions (`histogram_count`, ...).
//!
//! Uses `sample::Labels` and `registry::Point`; nothing else of ours.

mod aggregate;
mod eval;
mod functions;
mod histogram;
pub mod memory;
mod over_time;

use std::time::Duration;

use promql_parser::parser::{self, Expr};

pub use eval::{Evaluator, Memo, Sample, Value};

use crate::registry::Point;
use crate::sample::Labels;

/// Prometheus's default lookback: an instant selector sees the newest sample at most this old.
pub const LOOKBACK: Duration = Duration::from_secs(300);

/// The label that holds the metric name in a series' label set.
pub const NAME: &str = "__name__";

/// Where the evaluator reads series from.
pub trait SeriesSource {
    /// Every series whose label set (with `__name__`) satisfies all `matchers`, with its points in
    /// `[start_ms, end_ms]`, stale markers included. Series without points there may be left out.
    fn select(
        &self,
        matchers: &[promql_parser::label::Matcher],
        start_ms: i64,
        end_ms: i64,
    ) -> Vec<(Labels, Vec<Point>)>;

    /// Like `select`, but only each series' newest point in `[start_ms, end_ms]`: what an
    /// instant selector needs, without copying the rest of the window.
    fn select_last(
        &self,
        matchers: &[promql_parser::label::Matcher],
        start_ms: i64,
        end_ms: i64,
    ) -> Vec<(Labels, Point)> {
        self.select(matchers, start_ms, end_ms)
            .into_iter()
            .filter_map(|(labels, points)| {
                let last = points
                    .iter()
                    .rev()
                    .find(|p| p.t_ms >= start_ms && p.t_ms <= end_ms)?;
                Some((labels, *last))
            })
            .collect()
    }

    /// Calls `f` with each selected series' points in `[start_ms, end_ms]` (stale markers
    /// included; series without points there may be left out), read in place where the source
    /// can: what a range function needs, without a copy of each series.
    fn each_range(
        &self,
        matchers: &[promql_parser::label::Matcher],
        start_ms: i64,
        end_ms: i64,
        f: &mut dyn FnMut(&Labels, &[Point]),
    ) {
        for (labels, points) in self.select(matchers, start_ms, end_ms) {
            f(&labels, &points);
        }
    }
}

/// The registry's history is what rules read.
impl SeriesSource for crate::registry::Registry {
    fn select(
        &self,
        matchers: &[promql_parser::label::Matcher],
        start_ms: i64,
        end_ms: i64,
    ) -> Vec<(Labels, Vec<Point>)> {
        crate::registry::Registry::select(self, &compiled(matchers), start_ms, end_ms)
    }

    fn select_last(
        &self,
        matchers: &[promql_parser::label::Matcher],
        start_ms: i64,
        end_ms: i64,
    ) -> Vec<(Labels, Point)> {
        crate::registry::Registry::select_last(self, &compiled(matchers), start_ms, end_ms)
    }

    fn each_range(
        &self,
        matchers: &[promql_parser::label::Matcher],
        start_ms: i64,
        end_ms: i64,
        f: &mut dyn FnMut(&Labels, &[Point]),
    ) {
        crate::registry::Registry::each_range(self, &compiled(matchers), start_ms, end_ms, f)
    }
}

/// The metric name an equality matcher asks for (a direct lookup in the registry; anything
/// else walks every name), the label equalities (with a value: `x=""` also matches series
/// without `x`) that let the registry look series up, the filter's key (the matchers it tests,
/// in a canonical order, so the registry can remember what it accepted), and a filter for all the
/// matchers but the name's equality, sorted once per selection rather than once per series.
fn compiled(
    matchers: &[promql_parser::label::Matcher],
) -> crate::registry::Selection<'_, impl Fn(&str, &Labels) -> bool + '_> {
    use promql_parser::label::MatchOp;
    let name = matchers
        .iter()
        .find(|m| m.name == NAME && matches!(m.op, MatchOp::Equal))
        .map(|m| m.value.as_str());
    let (on_name, on_labels): (Vec<&promql_parser::label::Matcher>, Vec<_>) =
        matchers.iter().partition(|m| m.name == NAME);
    let equal = on_labels
        .iter()
        .filter(|m| matches!(m.op, MatchOp::Equal) && !m.value.is_empty())
        .map(|m| (m.name.as_str(), m.value.as_str()))
        .collect();
    // The equality one is already answered by the lookup.
    let on_name: Vec<_> = on_name
        .into_iter()
        .filter(|m| !(name.is_some() && matches!(m.op, MatchOp::Equal)))
        .collect();
    let mut parts: Vec<(&str, &str, &str)> = on_name
        .iter()
        .chain(on_labels.iter())
        .map(|m| {
            let op = match m.op {
                MatchOp::Equal => "=",
                MatchOp::NotEqual => "!=",
                MatchOp::Re(_) => "=~",
                MatchOp::NotRe(_) => "!~",
            };
            (m.name.as_str(), op, m.value.as_str())
        })
        .collect();
    parts.sort_unstable();
    // Each value carries its length, so no value can be read as another matcher:
    // `a="b,c"` and `a="b",c=""` give different keys; names carry theirs too, as a quoted
    // name may hold an operator (`{"job!"="x"}` is not `{job!="x"}`).
    let mut key = String::with_capacity(parts.iter().map(|p| p.0.len() + p.2.len() + 12).sum());
    for (name, op, value) in parts {
        // Writing to a String cannot fail.
        let _ = std::fmt::Write::write_fmt(&mut key, format_args!("{}:", name.len()));
        key.push_str(name);
        key.push_str(op);
        let _ = std::fmt::Write::write_fmt(&mut key, format_args!("{}:", value.len()));
        key.push_str(value);
    }
    let keep = move |n: &str, labels: &Labels| {
        on_name.iter().all(|m| m.is_match(n))
            && on_labels
                .iter()
                .all(|m| m.is_match(labels.get(&m.name).unwrap_or("")))
    };
    crate::registry::Selection {
        name,
        equal,
        key: Some(key),
        keep,
    }
}

/// A parsed expression that `check` accepted.
#[derive(Debug, Clone)]
pub struct Query {
    expr: Expr,
    /// The text as written, for messages.
    pub text: String,
}

impl Query {
    /// Parses and checks an expression: `Err` says why it cannot be evaluated.
    pub fn parse(text: &str) -> Result<Query, String> {
        let query = Query::parse_query(text)?;
        use promql_parser::parser::value::ValueType;
        match query.expr.value_type() {
            ValueType::Matrix => Err(
                "a condition must be an instant vector or a scalar, not a range vector (wrap it in a function such as rate or max_over_time)".into(),
            ),
            ValueType::String => {
                Err("a condition must be an instant vector or a scalar, not a string".into())
            }
            _ => Ok(query),
        }
    }

    /// Parses any query Prometheus's query API answers, range vectors and strings included
    /// (what a condition cannot be), refusing what we do not evaluate with the reason.
    pub fn parse_query(text: &str) -> Result<Query, String> {
        // The parser panics on some durations (`x[1e30]`: a float past `Duration`'s range); rule
        // text must never take the process down, so a panic is a refusal like any other.
        let parsed = std::panic::catch_unwind(|| parser::parse(text))
            .map_err(|_| "invalid PromQL: the parser failed on it (a duration out of range?)")?;
        let expr = parsed.map_err(|e| format!("invalid PromQL: {e}"))?;
        check(&expr)?;
        let steps = subquery_steps(&expr);
        if steps > MAX_SUBQUERY_STEPS {
            return Err(format!(
                "the subqueries evaluate their inner expression {steps} times per evaluation, more than {MAX_SUBQUERY_STEPS} (Prometheus's limit on one series' points); use a coarser step or a shorter range"
            ));
        }
        Ok(Query {
            expr,
            text: text.to_owned(),
        })
    }

    /// The operands of a binary expression (`a > b`, `a and on (x) b`), outermost
    /// parentheses removed, each as a query of its own: what `/api/v1/rules/{name}` shows to
    /// answer "why is it (not) firing?". Empty for anything else.
    pub fn parts(&self) -> Vec<Query> {
        let mut e = &self.expr;
        while let Expr::Paren(p) = e {
            e = &p.expr;
        }
        match e {
            Expr::Binary(b) => [&b.lhs, &b.rhs]
                .into_iter()
                .map(|x| Query {
                    expr: (**x).clone(),
                    text: x.to_string(),
                })
                .collect(),
            _ => Vec::new(),
        }
    }

    /// The texts under which a per-tick `Memo` would keep this expression's parts: every
    /// selector, aggregation and function call in it.
    pub fn memo_keys(&self) -> Vec<String> {
        fn walk(e: &Expr, out: &mut Vec<String>) {
            match e {
                Expr::VectorSelector(_) => out.push(e.to_string()),
                Expr::Aggregate(a) => {
                    out.push(e.to_string());
                    walk(&a.expr, out);
                }
                Expr::Call(c) => {
                    out.push(e.to_string());
                    c.args.args.iter().for_each(|a| walk(a, out));
                }
                Expr::Paren(p) => walk(&p.expr, out),
                Expr::Unary(u) => walk(&u.expr, out),
                Expr::Binary(b) => {
                    walk(&b.lhs, out);
                    walk(&b.rhs, out);
                }
                _ => {}
            }
        }
        let mut out = Vec::new();
        walk(&self.expr, &mut out);
        out
    }

    /// The longest range or offset reach back in time, for sizing the history it needs.
    pub fn lookback_needed(&self) -> Duration {
        reach(&self.expr)
    }

    /// Whether any selector of the expression selects anything at `now_ms`: tells "the
    /// condition does not hold" from "there is no data to judge".
    pub fn has_data<S: SeriesSource>(&self, source: &S, now_ms: i64) -> bool {
        // A subquery pinned by `@` reads a window no look back from now can cover: its data
        // is taken as there, so "no data" (and `on_absent: fire`) is never concluded from it.
        if pinned_subquery(&self.expr) {
            return true;
        }
        let mut selectors = Vec::new();
        leaves(&self.expr, &mut selectors);
        let ev = Evaluator::new(source, now_ms);
        // With Prometheus's own selection rules: a series that went stale is no data.
        selectors.iter().any(|(vs, range)| match range {
            Some(r) => !ev.range(vs, *r).is_empty(),
            None => !ev.instant(vs).is_empty(),
        })
    }

    /// The metric names its selectors name with `name` or `__name__="..."` (regular
    /// expressions on the name are left out: they name no single metric).
    pub fn metric_names(&self) -> Vec<String> {
        let mut selectors = Vec::new();
        leaves(&self.expr, &mut selectors);
        selectors
            .iter()
            .filter_map(|(vs, _)| {
                vs.name.clone().or_else(|| {
                    vs.matchers
                        .matchers
                        .iter()
                        .find(|m| {
                            m.name == NAME && matches!(m.op, promql_parser::label::MatchOp::Equal)
                        })
                        .map(|m| m.value.clone())
                })
            })
            .collect()
    }

    /// For a plain threshold (`selector OP number`, or `number OP selector`): the selector as
    /// written and the range of values that satisfy it, `(low, high)`; whether a bound itself
    /// satisfies it is not told (the lint that uses it only looks at overlaps of positive
    /// width).
    pub fn threshold(&self) -> Option<(String, f64, f64)> {
        use promql_parser::parser::token::{T_GTE, T_GTR, T_LSS, T_LTE};
        let mut e = &self.expr;
        while let Expr::Paren(p) = e {
            e = &p.expr;
        }
        let Expr::Binary(b) = e else { return None };
        if b.modifier.as_ref().is_some_and(|m| m.return_bool) {
            return None;
        }
        let (sel, n, flipped) = match (b.lhs.as_ref(), b.rhs.as_ref()) {
            (Expr::VectorSelector(_), Expr::NumberLiteral(n)) => (b.lhs.to_string(), n.val, false),
            (Expr::NumberLiteral(n), Expr::VectorSelector(_)) => (b.rhs.to_string(), n.val, true),
            _ => return None,
        };
        // `n < m` is `m > n`.
        let id = match (b.op.id(), flipped) {
            (T_GTR, true) => T_LSS,
            (T_LSS, true) => T_GTR,
            (T_GTE, true) => T_LTE,
            (T_LTE, true) => T_GTE,
            (id, _) => id,
        };
        match id {
            T_GTR | T_GTE => Some((sel, n, f64::INFINITY)),
            T_LSS | T_LTE => Some((sel, f64::NEG_INFINITY, n)),
            _ => None,
        }
    }

    pub(crate) fn expr(&self) -> &Expr {
        &self.expr
    }
}

/// The functions we evaluate: every function of PromQL over float samples that Prometheus
/// offers without a feature flag.
const FUNCTIONS: &[&str] = &[
    "abs",
    "absent",
    "absent_over_time",
    "acos",
    "acosh",
    "asin",
    "asinh",
    "atan",
    "atanh",
    "avg_over_time",
    "ceil",
    "changes",
    "clamp",
    "clamp_max",
    "clamp_min",
    "cos",
    "cosh",
    "count_over_time",
    "day_of_month",
    "day_of_week",
    "day_of_year",
    "days_in_month",
    "deg",
    "delta",
    "deriv",
    "exp",
    "floor",
    "histogram_quantile",
    "hour",
    "idelta",
    "increase",
    "irate",
    "label_join",
    "label_replace",
    "last_over_time",
    "ln",
    "log10",
    "log2",
    "max_over_time",
    "min_over_time",
    "minute",
    "month",
    "pi",
    "predict_linear",
    "present_over_time",
    "quantile_over_time",
    "rad",
    "rate",
    "resets",
    "round",
    "scalar",
    "sgn",
    "sin",
    "sinh",
    "sort",
    "sort_desc",
    "sqrt",
    "stddev_over_time",
    "stdvar_over_time",
    "sum_over_time",
    "tan",
    "tanh",
    "time",
    "timestamp",
    "vector",
    "year",
];

/// Functions Prometheus keeps behind its `promql-experimental-functions` flag that the parser
/// does not mark as experimental.
const EXPERIMENTAL_FUNCTIONS: &[&str] = &["first_over_time"];

/// Functions that only read native histograms: over float samples Prometheus returns nothing,
/// and native histograms are not collected here.
const NATIVE_HISTOGRAM_FUNCTIONS: &[&str] = &[
    "histogram_avg",
    "histogram_count",
    "histogram_fraction",
    "histogram_stddev",
    "histogram_stdvar",
    "histogram_sum",
];

/// Whether `expr` holds a subquery with an `@` modifier.
fn pinned_subquery(expr: &Expr) -> bool {
    match expr {
        Expr::Subquery(sq) => sq.at.is_some() || pinned_subquery(&sq.expr),
        Expr::Paren(p) => pinned_subquery(&p.expr),
        Expr::Unary(u) => pinned_subquery(&u.expr),
        Expr::Binary(b) => pinned_subquery(&b.lhs) || pinned_subquery(&b.rhs),
        Expr::Aggregate(a) => {
            pinned_subquery(&a.expr) || a.param.as_deref().is_some_and(pinned_subquery)
        }
        Expr::Call(c) => c.args.args.iter().any(|a| pinned_subquery(a)),
        _ => false,
    }
}

/// The most evaluations of inner expressions the subqueries of one condition may cost (nested
/// ones multiply): Prometheus's limit on the points of one series in a range query. Beyond it a
/// rule tick, which evaluates every due rule in turn, would be held up.
const MAX_SUBQUERY_STEPS: u128 = 11_000;

/// How many times the subqueries of `expr` evaluate their inner expressions (nested ones
/// multiplied; 1 without a subquery).
fn subquery_steps(expr: &Expr) -> u128 {
    match expr {
        Expr::Subquery(sq) => {
            let step = sq
                .step
                .filter(|s| !s.is_zero())
                .unwrap_or(eval::DEFAULT_SUBQUERY_STEP)
                .as_millis()
                .max(1);
            (sq.range.as_millis() / step + 1).saturating_mul(subquery_steps(&sq.expr))
        }
        Expr::Paren(p) => subquery_steps(&p.expr),
        Expr::Unary(u) => subquery_steps(&u.expr),
        Expr::Binary(b) => subquery_steps(&b.lhs).saturating_add(subquery_steps(&b.rhs)),
        Expr::Aggregate(a) => {
            subquery_steps(&a.expr).saturating_add(a.param.as_deref().map_or(0, subquery_steps))
        }
        Expr::Call(c) => c
            .args
            .args
            .iter()
            .map(|a| subquery_steps(a))
            .fold(1, u128::saturating_add),
        _ => 1,
    }
}

/// Refuses what we do not evaluate, naming it.
fn check(expr: &Expr) -> Result<(), String> {
    use promql_parser::parser::token::{T_LIMIT_RATIO, T_LIMITK};
    match expr {
        Expr::NumberLiteral(_) => Ok(()),
        // Where a string may stand, the parser has checked.
        Expr::StringLiteral(_) => Ok(()),
        Expr::Paren(p) => check(&p.expr),
        Expr::Unary(u) => check(&u.expr),
        Expr::VectorSelector(vs) => selector(vs),
        Expr::MatrixSelector(ms) => selector(&ms.vs),
        Expr::Subquery(sq) => {
            at_modifier(sq.at.as_ref())?;
            check(&sq.expr)
        }
        Expr::Extension(_) => Err("extension expressions are not supported".into()),
        Expr::Binary(b) => {
            if b.modifier
                .as_ref()
                .is_some_and(|m| m.fill_values.lhs.is_some() || m.fill_values.rhs.is_some())
            {
                return Err("fill modifiers are not supported".into());
            }
            check(&b.lhs)?;
            check(&b.rhs)
        }
        Expr::Aggregate(a) => {
            let id = a.op.id();
            if [T_LIMITK, T_LIMIT_RATIO].contains(&id) {
                return Err(format!(
                    "aggregation `{}` is behind a Prometheus feature flag (promql-experimental-functions) and is not offered",
                    a.op
                ));
            }
            if let Some(p) = &a.param {
                check(p)?;
            }
            if id == promql_parser::parser::token::T_COUNT_VALUES
                && let Some(Expr::StringLiteral(l)) = a.param.as_deref().map(strip_parens)
                && !functions::valid_label_name(&l.val)
            {
                return Err(format!("count_values: invalid label name {:?}", l.val));
            }
            check(&a.expr)
        }
        Expr::Call(c) => {
            if c.func.experimental || EXPERIMENTAL_FUNCTIONS.contains(&c.func.name) {
                return Err(format!(
                    "function `{}` is behind a Prometheus feature flag (promql-experimental-functions) and is not offered",
                    c.func.name
                ));
            }
            if NATIVE_HISTOGRAM_FUNCTIONS.contains(&c.func.name) {
                return Err(format!(
                    "function `{}` reads native histograms, which are not supported",
                    c.func.name
                ));
            }
            if !FUNCTIONS.contains(&c.func.name) {
                return Err(format!(
                    "function `{}` is not supported (supported: {})",
                    c.func.name,
                    FUNCTIONS.join(", ")
                ));
            }
            for arg in &c.args.args {
                check(arg)?;
            }
            // Constant arguments that could only fail at every evaluation fail at load.
            functions::check_constants(c)
        }
    }
}

/// The expression inside any parentheses.
fn strip_parens(mut e: &Expr) -> &Expr {
    while let Expr::Paren(p) = e {
        e = &p.expr;
    }
    e
}

/// Refuses an `@` time before 1970 or after 9999: no sample is there, the parser prints every
/// time before 1970 alike (so two such expressions would share a memo entry), and times near
/// the ends of the range would overflow the evaluator's arithmetic.
fn at_modifier(at: Option<&promql_parser::parser::AtModifier>) -> Result<(), String> {
    const YEAR_9999_END: Duration = Duration::from_secs(253_402_300_800);
    if let Some(promql_parser::parser::AtModifier::At(t)) = at {
        match t.duration_since(std::time::UNIX_EPOCH) {
            Ok(d) if d < YEAR_9999_END => {}
            _ => return Err("an @ time must lie between 1970 and 9999".into()),
        }
    }
    Ok(())
}

fn selector(vs: &promql_parser::parser::VectorSelector) -> Result<(), String> {
    at_modifier(vs.at.as_ref())?;
    if !vs.matchers.or_matchers.is_empty() {
        return Err("`or` inside a selector is not supported".into());
    }
    Ok(())
}

/// The selectors of an expression, each with its range when it is a range selector.
fn leaves<'a>(
    expr: &'a Expr,
    out: &mut Vec<(&'a promql_parser::parser::VectorSelector, Option<Duration>)>,
) {
    match expr {
        Expr::VectorSelector(vs) => out.push((vs, None)),
        Expr::MatrixSelector(ms) => out.push((&ms.vs, Some(ms.range))),
        Expr::Paren(p) => leaves(&p.expr, out),
        Expr::Unary(u) => leaves(&u.expr, out),
        Expr::Binary(b) => {
            leaves(&b.lhs, out);
            leaves(&b.rhs, out);
        }
        Expr::Aggregate(a) => leaves(&a.expr, out),
        Expr::Call(c) => c.args.args.iter().for_each(|a| leaves(a, out)),
        // A subquery's selectors are read over its whole range, and as far back as its offset
        // (a window that covers the one it reads, so "no data" is never said of data it sees).
        Expr::Subquery(sq) => {
            let back = match &sq.offset {
                Some(promql_parser::parser::Offset::Pos(d)) => *d,
                _ => Duration::ZERO,
            };
            let mut inner = Vec::new();
            leaves(&sq.expr, &mut inner);
            out.extend(
                inner
                    .into_iter()
                    .map(|(vs, r)| (vs, Some(r.unwrap_or_default() + sq.range + back))),
            );
        }
        _ => {}
    }
}

fn reach(expr: &Expr) -> Duration {
    use promql_parser::parser::Offset;
    let offset = |o: &Option<Offset>| match o {
        Some(Offset::Pos(d)) => *d,
        _ => Duration::ZERO,
    };
    match expr {
        Expr::VectorSelector(vs) => LOOKBACK + offset(&vs.offset),
        Expr::MatrixSelector(ms) => ms.range + offset(&ms.vs.offset),
        Expr::Paren(p) => reach(&p.expr),
        Expr::Unary(u) => reach(&u.expr),
        Expr::Binary(b) => reach(&b.lhs).max(reach(&b.rhs)),
        Expr::Aggregate(a) => reach(&a.expr).max(a.param.as_deref().map_or(Duration::ZERO, reach)),
        Expr::Subquery(sq) => sq.range + offset(&sq.offset) + reach(&sq.expr),
        Expr::Call(c) => c
            .args
            .args
            .iter()
            .map(|a| reach(a))
            .max()
            .unwrap_or_default(),
        _ => Duration::ZERO,
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn selection_keys_tell_a_quoted_name_holding_an_operator_apart() {
        use promql_parser::label::{MatchOp, Matcher};
        let key = |m: Matcher| super::compiled(std::slice::from_ref(&m)).key;
        let quoted = key(Matcher::new(MatchOp::Equal, "job!", "x"));
        let negated = key(Matcher::new(MatchOp::NotEqual, "job", "x"));
        assert_ne!(quoted, negated);
    }

    use super::*;

    #[test]
    fn unsupported_parts_are_refused_with_the_reason() {
        for (text, why) in [
            ("limitk(3, x)", "feature flag"),
            ("mad_over_time(x[5m])", "feature flag"),
            ("first_over_time(x[5m])", "feature flag"),
            ("histogram_count(x)", "native histograms"),
            ("x +", "invalid PromQL"),
            // Constants that would fail every evaluation fail at load.
            (
                r#"label_replace(x, "a", "$1", "b", "(")"#,
                "invalid regular expression",
            ),
            (
                r#"label_replace(x, "a-b", "$1", "b", "(.*)")"#,
                "invalid destination label name",
            ),
            (
                r#"label_join(x, "a", ",", "b-c")"#,
                "invalid source label name",
            ),
            (r#"count_values("a-b", x)"#, "invalid label name"),
            // A subquery that would hold the tick up: a day at one second, or nested ones
            // whose steps multiply past the limit.
            ("max_over_time(x[1d:1s])", "more than 11000"),
            // ... also inside an aggregation's parameter.
            (
                "topk(scalar(count_over_time(vector(1)[30d:1ms])), up)",
                "more than 11000",
            ),
            // A duration the parser cannot hold (it panics on it) is refused, not a crash.
            ("x[1e30]", "invalid PromQL"),
            ("max_over_time(x[5m:1e30])", "invalid PromQL"),
            // `@` times that would overflow the evaluator, or that no sample can be at.
            (
                "max_over_time(up[1m:1m] @ 9223372036854775)",
                "between 1970 and 9999",
            ),
            ("up @ -10", "between 1970 and 9999"),
            (
                "max_over_time(max_over_time(x[10m:1s])[1h:10s])",
                "more than 11000",
            ),
        ] {
            let err = Query::parse(text).unwrap_err();
            assert!(err.contains(why), "{text}: {err}");
        }
        assert!(Query::parse("sum by (job) (rate(x[5m])) > 0.8").is_ok());
        assert!(Query::parse("histogram_quantile(0.95, sum by (le) (rate(x_bucket[5m])))").is_ok());
        assert!(Query::parse(r#"label_replace(topk(3, x), "a", "$1", "b", "(.*)")"#).is_ok());
        assert!(Query::parse(r#"count_values("v", x)"#).is_ok());
        // A condition is an instant vector or a scalar; a query may answer anything.
        for (text, why) in [
            ("x[5m]", "not a range vector"),
            (r#""foo""#, "not a string"),
        ] {
            assert!(Query::parse(text).unwrap_err().contains(why), "{text}");
            assert!(Query::parse_query(text).is_ok(), "{text}");
        }
        assert!(Query::parse("max_over_time(rate(x[1m] @ end())[10m:30s] offset -1m)").is_ok());
        // An hour at the default step of a minute is well within.
        assert!(Query::parse("max_over_time(x[1h:])").is_ok());
    }

    #[test]
    fn conditions_evaluate_over_the_registry_history() {
        use crate::registry::Registry;
        use crate::sample::Families;
        let r = Registry::new(Duration::from_secs(600)).unwrap();
        for (i, (mem, hits)) in [(0.5, 0.0), (0.85, 100.0), (0.9, 400.0)].iter().enumerate() {
            let mut f = Families::new();
            f.gauge("host_memory_usage_ratio", "h", &[], *mem);
            f.counter(
                "redis_keyspace_hits_total",
                "h",
                &[("target", "cache")],
                *hits,
            );
            r.publish("test", f.into_vec(), 10_000 * (i as i64 + 1));
        }
        let at = |q: &str| {
            Evaluator::new(&r, 30_000)
                .eval(&Query::parse(q).unwrap())
                .unwrap()
        };
        let Value::Vector(v) = at("host_memory_usage_ratio > 0.8") else {
            panic!()
        };
        assert_eq!(v.len(), 1);
        assert_eq!(v[0].value, 0.9);
        assert_eq!(v[0].labels.get(NAME), Some("host_memory_usage_ratio"));
        assert_eq!(at("host_memory_usage_ratio > 0.95"), Value::Vector(vec![]));
        // Samples 0, 100, 400 at 10 s, 20 s, 30 s in the window (0 s, 30 s]: the counter started
        // at zero at the first sample, so Prometheus extrapolates nothing: exactly 400.
        let Value::Vector(inc) = at("increase(redis_keyspace_hits_total[30s])") else {
            panic!()
        };
        let Value::Vector(rate) = at("rate(redis_keyspace_hits_total[30s])") else {
            panic!()
        };
        assert_eq!(inc[0].value, 400.0);
        assert!((inc[0].value / 30.0 - rate[0].value).abs() < 1e-9);
        assert_eq!(inc[0].labels.get("target"), Some("cache"));
        assert_eq!(inc[0].labels.get(NAME), None);
        let Value::Vector(v) = at(r#"{__name__=~"host_.*"}"#) else {
            panic!()
        };
        assert_eq!(v.len(), 1);
    }

    /// Cases found by reading the evaluator against Prometheus 3's engine.
    #[test]
    fn prometheus_answers_the_edge_cases() {
        use crate::registry::Point;
        let mut m = memory::MemorySeries::new();
        for (name, le, v) in [
            ("a_bucket", "1", 1.0),
            ("a_bucket", "+Inf", 2.0),
            ("b_bucket", "1", 5.0),
            ("b_bucket", "+Inf", 10.0),
        ] {
            m.add(
                Labels::new([(NAME, name), ("le", le)]),
                [Point { t_ms: 0, v }],
            );
        }
        for v in ["1", "2"] {
            m.add(
                Labels::new([(NAME, "x"), ("v", v)]),
                [Point { t_ms: 0, v: 1.0 }],
            );
        }
        let at = |q: &str| Evaluator::new(&m, 0).eval(&Query::parse(q).unwrap());
        // Two histograms that differ only by name are two quantiles with one label set: an
        // error, never one quantile of their buckets added together.
        let err = at(r#"histogram_quantile(0.9, {__name__=~"a_bucket|b_bucket"})"#).unwrap_err();
        assert!(err.contains("same labelset"), "{err}");
        // `without` naming the value's label drops it: the two values count as one group.
        assert_eq!(
            at(r#"count_values without (v) ("v", x)"#),
            Ok(Value::Vector(vec![Sample {
                labels: Labels::empty(),
                value: 2.0
            }]))
        );
        // k beyond int64 is an error, as in Prometheus.
        assert!(at("topk(1e19, x)").unwrap_err().contains("overflows int64"));
        // deg as Prometheus computes it, x·180/π: 5.729577951308232, not to_degrees' ...233.
        let Ok(Value::Vector(d)) = at("deg(vector(0.1))") else {
            panic!()
        };
        assert_eq!(d[0].value, 0.1 * 180.0 / std::f64::consts::PI);
    }

    #[test]
    fn a_subquerys_offset_window_is_never_called_empty() {
        use crate::registry::Point;
        let mut m = memory::MemorySeries::new();
        // Data from 20 to 35 minutes; at 90 minutes the condition reads 20 to 30 minutes.
        m.add(
            Labels::new([(NAME, "x")]),
            (20..=35).map(|i| Point {
                t_ms: i * 60_000,
                v: 1.0,
            }),
        );
        let q = Query::parse("max_over_time(x[10m:1m] offset 1h) > 0").unwrap();
        assert!(
            matches!(Evaluator::new(&m, 90 * 60_000).eval(&q), Ok(Value::Vector(v)) if !v.is_empty())
        );
        assert!(q.has_data(&m, 90 * 60_000));
    }

    #[test]
    fn the_reach_back_covers_ranges_and_offsets() {
        let q = Query::parse("rate(x[10m] offset 5m) + y").unwrap();
        assert_eq!(q.lookback_needed(), Duration::from_secs(900));
    }
}
