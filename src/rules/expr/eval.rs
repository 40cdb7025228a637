//! Evaluation of a checked expression at one instant, with Prometheus's semantics for
//! selectors (lookback, staleness), vector matching, name dropping and aggregation.

use std::sync::Arc;
use std::time::Duration;

use promql_parser::label::{MatchOp, Matcher};
use promql_parser::parser::token::{
    T_ADD, T_ATAN2, T_DIV, T_EQLC, T_GTE, T_GTR, T_LAND, T_LOR, T_LSS, T_LTE, T_LUNLESS, T_MOD,
    T_MUL, T_NEQ, T_POW, T_SUB, TokenType,
};
use promql_parser::parser::{
    AtModifier, BinModifier, BinaryExpr, Expr, LabelModifier, Offset, SubqueryExpr,
    VectorMatchCardinality, VectorSelector,
};
use rustc_hash::{FxHashMap as HashMap, FxHashSet as HashSet};

use super::{LOOKBACK, NAME, Query, SeriesSource, aggregate, functions};
use crate::registry::{Point, is_stale_marker};
use crate::sample::{Labels, label_name, same_name};

/// One element of an instant vector: a label set (with `__name__` when kept) and a value.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    /// The labels, `__name__` included when the operation keeps it.
    pub labels: Labels,
    /// The value.
    pub value: f64,
}

/// What an expression evaluates to.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    /// A single number.
    Scalar(f64),
    /// An instant vector.
    Vector(Vec<Sample>),
    /// A range vector: each series' points within the range (a function's argument, or a
    /// query's answer, never a condition's).
    Matrix(Vec<(Labels, Vec<Point>)>),
    /// A string (a function's argument, or a query's answer, never a condition's).
    String(String),
}

/// The instant vectors computed during one rule-engine tick, by expression text: rules often
/// share selectors and aggregations (a warning and a critical threshold over the same rate), and
/// at one instant over one source the same expression has the same value, so each is computed
/// once per tick. Only selectors, aggregations and function calls are kept: they are where the
/// work is, and their text is cheap to write.
#[derive(Debug, Default)]
pub struct Memo {
    t_ms: i64,
    /// The texts worth keeping (`None`: all); the rest are computed without a copy kept.
    only: Option<std::sync::Arc<HashSet<String>>>,
    values: std::cell::RefCell<HashMap<String, Vec<Sample>>>,
}

impl Memo {
    /// An empty memo for evaluations at `t_ms`, keeping every result.
    pub fn new(t_ms: i64) -> Self {
        Memo {
            t_ms,
            only: None,
            values: std::cell::RefCell::default(),
        }
    }

    /// An empty memo for evaluations at `t_ms`, keeping only the results of `only` (the
    /// expressions written more than once).
    pub fn of(t_ms: i64, only: std::sync::Arc<HashSet<String>>) -> Self {
        Memo {
            t_ms,
            only: Some(only),
            values: std::cell::RefCell::default(),
        }
    }
}

/// Series with their points in a window: what a range selector or a subquery gives.
pub(super) type RangeSeries = Vec<(Labels, Vec<Point>)>;

/// The resolution of a subquery that names none (`x[10m:]`): Prometheus's default global
/// `evaluation_interval`, which is what its rule manager uses when none is configured.
pub const DEFAULT_SUBQUERY_STEP: Duration = Duration::from_secs(60);

/// Evaluates queries at one instant against one source.
pub struct Evaluator<'a, S: SeriesSource> {
    source: &'a S,
    /// The evaluation time, in milliseconds since the epoch.
    t_ms: i64,
    /// What `@ start()` and `@ end()` mean: the query's first and last instant (both the
    /// evaluation time for a rule, as in Prometheus's rule manager).
    start_ms: i64,
    end_ms: i64,
    /// Shared results of this instant, when the caller evaluates many queries at it.
    memo: Option<&'a Memo>,
}

impl<'a, S: SeriesSource> Evaluator<'a, S> {
    /// An evaluator at `t_ms`.
    pub fn new(source: &'a S, t_ms: i64) -> Self {
        Evaluator {
            source,
            t_ms,
            start_ms: t_ms,
            end_ms: t_ms,
            memo: None,
        }
    }

    /// An evaluator at `t_ms`, one step of a range query from `start_ms` to `end_ms` (what
    /// `@ start()` and `@ end()` refer to).
    pub fn in_range(source: &'a S, t_ms: i64, start_ms: i64, end_ms: i64) -> Self {
        Evaluator {
            source,
            t_ms,
            start_ms,
            end_ms,
            memo: None,
        }
    }

    /// An evaluator at the memo's instant that shares its results with every other evaluator
    /// given the same memo (over the same source).
    pub fn with_memo(source: &'a S, memo: &'a Memo) -> Self {
        Evaluator {
            source,
            t_ms: memo.t_ms,
            start_ms: memo.t_ms,
            end_ms: memo.t_ms,
            memo: Some(memo),
        }
    }

    /// The time an `@` modifier names, in ms (`None` without one).
    pub(super) fn at_time(&self, at: Option<&AtModifier>) -> Option<i64> {
        Some(match at? {
            AtModifier::Start => self.start_ms,
            AtModifier::End => self.end_ms,
            AtModifier::At(t) => match t.duration_since(std::time::UNIX_EPOCH) {
                Ok(d) => ms(d),
                Err(e) => -ms(e.duration()),
            },
        })
    }

    /// A subquery: its inner expression evaluated at every multiple of its step in
    /// `(t - offset - range, t - offset]` (`t` the `@` time when it has one), each result series
    /// a range of points, as Prometheus's engine does. Returns the series and the window's end.
    pub(super) fn subquery(&self, sq: &SubqueryExpr) -> Result<(RangeSeries, i64), String> {
        let base = self.at_time(sq.at.as_ref()).unwrap_or(self.t_ms);
        let end = base.saturating_sub(offset_ms(sq.offset.as_ref()));
        let range = ms(sq.range);
        let step = sq
            .step
            .map(ms)
            .filter(|s| *s > 0)
            .unwrap_or(ms(DEFAULT_SUBQUERY_STEP));
        // The first multiple of the step after the window's start (Go's division truncates
        // towards zero, as Rust's does).
        let lower = end.saturating_sub(range);
        let mut ts = step * (lower / step);
        if ts <= lower {
            ts = ts.saturating_add(step);
        }
        let mut series: Vec<(Labels, Vec<Point>)> = Vec::new();
        let mut index: HashMap<Labels, usize> = HashMap::default();
        while ts <= end {
            let inner = Evaluator::in_range(self.source, ts, self.start_ms, self.end_ms);
            let samples = match inner.expr(&sq.expr)? {
                Value::Vector(v) => v,
                Value::Scalar(v) => vec![Sample {
                    labels: Labels::empty(),
                    value: v,
                }],
                Value::Matrix(_) | Value::String(_) => {
                    return Err("a subquery needs an instant expression".into());
                }
            };
            for s in samples {
                let i = *index.entry(s.labels.clone()).or_insert_with(|| {
                    series.push((s.labels.clone(), Vec::new()));
                    series.len() - 1
                });
                series[i].1.push(Point {
                    t_ms: ts,
                    v: s.value,
                });
            }
            // Saturated at the end of time: nothing further to evaluate.
            match ts.checked_add(step) {
                Some(next) => ts = next,
                None => break,
            }
        }
        Ok((series, end))
    }

    /// Evaluates `query`. Errors are Prometheus's run-time errors (such as a many-to-many match
    /// or a result with two identical label sets).
    pub fn eval(&self, query: &Query) -> Result<Value, String> {
        match self.expr(query.expr())? {
            Value::Matrix(_) => Err("a range vector cannot be the result of a condition".into()),
            Value::String(_) => Err("a string cannot be the result of a condition".into()),
            v => Ok(v),
        }
    }

    /// Evaluates `query` as Prometheus's query API would: a range vector or a string is an
    /// answer too.
    pub fn query(&self, query: &Query) -> Result<Value, String> {
        self.expr(query.expr())
    }

    pub(super) fn t_ms(&self) -> i64 {
        self.t_ms
    }

    pub(super) fn expr(&self, expr: &Expr) -> Result<Value, String> {
        let Some(memo) = self.memo.filter(|_| {
            matches!(
                expr,
                Expr::VectorSelector(_) | Expr::Aggregate(_) | Expr::Call(_)
            )
        }) else {
            return self.compute(expr);
        };
        let key = expr.to_string();
        if memo.only.as_ref().is_some_and(|o| !o.contains(&key)) {
            return self.compute(expr);
        }
        if let Some(v) = memo.values.borrow().get(&key) {
            return Ok(Value::Vector(v.clone()));
        }
        let value = self.compute(expr)?;
        if let Value::Vector(v) = &value {
            memo.values.borrow_mut().insert(key, v.clone());
        }
        Ok(value)
    }

    fn compute(&self, expr: &Expr) -> Result<Value, String> {
        match expr {
            Expr::NumberLiteral(n) => Ok(Value::Scalar(n.val)),
            Expr::StringLiteral(s) => Ok(Value::String(s.val.clone())),
            Expr::Paren(p) => self.expr(&p.expr),
            Expr::Unary(u) => match self.expr(&u.expr)? {
                Value::Scalar(v) => Ok(Value::Scalar(-v)),
                Value::Vector(v) => Ok(Value::Vector(unique_unless(
                    one_name(v.iter().map(|s| &s.labels)),
                    v.into_iter()
                        .map(|s| Sample {
                            labels: drop_name(&s.labels),
                            value: -s.value,
                        })
                        .collect(),
                )?)),
                Value::Matrix(_) | Value::String(_) => {
                    Err("unary minus needs a scalar or an instant vector".into())
                }
            },
            Expr::VectorSelector(vs) => Ok(Value::Vector(self.instant(vs))),
            Expr::MatrixSelector(ms) => Ok(Value::Matrix(self.range(&ms.vs, ms.range))),
            Expr::Subquery(sq) => Ok(Value::Matrix(self.subquery(sq)?.0)),
            Expr::Binary(b) => self.binary(b),
            Expr::Aggregate(a) => aggregate::aggregate(self, a),
            Expr::Call(c) => functions::call(self, c),
            _ => Err("unsupported expression".into()),
        }
    }

    /// The selector's time: its `@` time or the evaluation time, shifted by its offset.
    fn at(&self, vs: &VectorSelector) -> i64 {
        self.at_time(vs.at.as_ref())
            .unwrap_or(self.t_ms)
            .saturating_sub(offset_ms(vs.offset.as_ref()))
    }

    /// An instant selector: each series' newest sample in `(t - 5m, t]`, unless that sample is
    /// a stale marker (the series ended).
    pub(super) fn instant(&self, vs: &VectorSelector) -> Vec<Sample> {
        self.newest(vs)
            .map(|(labels, last)| Sample {
                labels,
                value: last.v,
            })
            .collect()
    }

    /// The same samples with the time each was taken at (for `timestamp`).
    pub(super) fn instant_points(&self, vs: &VectorSelector) -> Vec<(Labels, Point)> {
        self.newest(vs).collect()
    }

    fn newest(&self, vs: &VectorSelector) -> impl Iterator<Item = (Labels, Point)> {
        let t = self.at(vs);
        let start = t - ms(LOOKBACK) + 1;
        self.source
            .select_last(&matchers(vs), start, t)
            .into_iter()
            .filter(|(_, last)| !is_stale_marker(last.v))
    }

    /// A range selector: each series' samples in `(t - range, t]`, stale markers left out.
    pub(super) fn range(&self, vs: &VectorSelector, range: Duration) -> Vec<(Labels, Vec<Point>)> {
        let t = self.at(vs);
        let start = t - ms(range) + 1;
        self.source
            .select(&matchers(vs), start, t)
            .into_iter()
            .filter_map(|(labels, mut points)| {
                points.retain(|p| p.t_ms >= start && p.t_ms <= t && !is_stale_marker(p.v));
                (!points.is_empty()).then_some((labels, points))
            })
            .collect()
    }

    /// A range selector read in place: `f` gets each series' samples in `(t - range, t]`,
    /// stale markers left out, without a copy of each series (the registry holds its lock
    /// meanwhile, so `f` must be quick).
    pub(super) fn each_range(
        &self,
        vs: &VectorSelector,
        range: Duration,
        mut f: impl FnMut(&Labels, &[Point]),
    ) {
        let t = self.at(vs);
        let start = t - ms(range) + 1;
        let mut kept = Vec::new();
        self.source
            .each_range(&matchers(vs), start, t, &mut |labels, points| {
                // Stale markers are rare: copy only the series that has one.
                if points.iter().any(|p| is_stale_marker(p.v)) {
                    kept.clear();
                    kept.extend(points.iter().filter(|p| !is_stale_marker(p.v)));
                    if !kept.is_empty() {
                        f(labels, &kept);
                    }
                } else if !points.is_empty() {
                    f(labels, points);
                }
            });
    }

    fn binary(&self, b: &BinaryExpr) -> Result<Value, String> {
        let lhs = self.expr(&b.lhs)?;
        let rhs = self.expr(&b.rhs)?;
        let op = b.op;
        let return_bool = b.modifier.as_ref().is_some_and(|m| m.return_bool);
        match (lhs, rhs) {
            (Value::Scalar(l), Value::Scalar(r)) => {
                let (v, keep) = scalar_op(op, l, r)?;
                if op.is_comparison_operator() {
                    // The parser only lets a scalar comparison through with `bool`.
                    Ok(Value::Scalar(if keep { 1.0 } else { 0.0 }))
                } else {
                    Ok(Value::Scalar(v))
                }
            }
            (Value::Vector(v), Value::Scalar(s)) => vector_scalar(op, v, s, false, return_bool),
            (Value::Scalar(s), Value::Vector(v)) => vector_scalar(op, v, s, true, return_bool),
            (Value::Vector(l), Value::Vector(r)) => vector_vector(op, l, r, b.modifier.as_ref()),
            _ => Err(format!("operator `{op}` needs scalars or instant vectors")),
        }
    }
}

/// Prometheus's mean: a compensated sum divided at the end, switching to an incremental mean
/// once the sum would overflow (so the mean of huge values stays finite).
#[derive(Debug, Default)]
pub(super) struct Mean {
    sum: f64,
    c: f64,
    count: f64,
    incremental: bool,
    mean: f64,
}

impl Mean {
    pub(super) fn add(&mut self, v: f64) {
        if self.count == 0.0 {
            // The first value starts the sum as it is, as in Prometheus.
            (self.sum, self.count) = (v, 1.0);
            return;
        }
        self.count += 1.0;
        if !self.incremental {
            let (sum, c) = kahan_inc(v, self.sum, self.c);
            if !sum.is_infinite() {
                (self.sum, self.c) = (sum, c);
                return;
            }
            self.incremental = true;
            self.mean = self.sum / (self.count - 1.0);
            self.c /= self.count - 1.0;
        }
        if self.mean.is_infinite() {
            if v.is_infinite() && (self.mean > 0.0) == (v > 0.0) {
                return;
            }
            if !v.is_infinite() && !v.is_nan() {
                return;
            }
        }
        let current = self.mean + self.c;
        (self.mean, self.c) = kahan_inc(v / self.count - current / self.count, self.mean, self.c);
    }

    pub(super) fn value(&self) -> f64 {
        if self.incremental {
            self.mean + self.c
        } else {
            (self.sum + self.c) / self.count
        }
    }
}

/// One step of Kahan-Neumaier summation (Prometheus's `kahanSumInc`).
pub(super) fn kahan_inc(inc: f64, sum: f64, c: f64) -> (f64, f64) {
    let t = sum + inc;
    let c = if t.is_infinite() {
        0.0
    } else if sum.abs() >= inc.abs() {
        c + ((sum - t) + inc)
    } else {
        c + ((inc - t) + sum)
    };
    (t, c)
}

/// An offset in ms (negative offsets look ahead).
pub(super) fn offset_ms(offset: Option<&Offset>) -> i64 {
    match offset {
        Some(Offset::Pos(d)) => ms(*d),
        Some(Offset::Neg(d)) => -ms(*d),
        None => 0,
    }
}

fn ms(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

/// The selector's matchers, with the metric name as a `__name__` matcher.
pub(super) fn matchers(vs: &VectorSelector) -> Vec<Matcher> {
    let mut m = vs.matchers.matchers.clone();
    if let Some(name) = &vs.name
        && !m.iter().any(|x| x.name == NAME)
    {
        m.push(Matcher::new(MatchOp::Equal, NAME, name));
    }
    m
}

/// `labels` without `__name__`.
pub(super) fn drop_name(labels: &Labels) -> Labels {
    labels.without_name()
}

/// Whether all these label sets have the same metric name (or none): dropping it then leaves
/// distinct sets distinct, and `unique` has nothing to check.
pub(super) fn one_name<'a>(sets: impl Iterator<Item = &'a Labels>) -> bool {
    let mut check = NameCheck::default();
    sets.for_each(|l| check.see(l));
    check.one()
}

/// `one_name`, for sets seen one at a time.
#[derive(Default)]
pub(super) struct NameCheck {
    first: Option<Option<Arc<str>>>,
    mixed: bool,
}

impl NameCheck {
    pub(super) fn see(&mut self, labels: &Labels) {
        let name = labels.metric_name();
        match &self.first {
            None => self.first = Some(name.cloned()),
            Some(first) if !self.mixed => {
                self.mixed = !match (first, name) {
                    (Some(a), Some(b)) => Arc::ptr_eq(a, b) || a == b,
                    (None, None) => true,
                    _ => false,
                }
            }
            Some(_) => {}
        }
    }

    pub(super) fn one(&self) -> bool {
        !self.mixed
    }
}

/// `v` (samples whose labels had their name dropped), refused when two samples have the same
/// labels; `one_name` says the input had a single name, so no two can.
pub(super) fn unique_unless(one_name: bool, v: Vec<Sample>) -> Result<Vec<Sample>, String> {
    if one_name { Ok(v) } else { unique(v) }
}

/// Refuses a vector in which two samples have the same labels (after a name was dropped).
pub(super) fn unique(v: Vec<Sample>) -> Result<Vec<Sample>, String> {
    let mut seen = HashSet::with_capacity_and_hasher(v.len(), Default::default());
    for s in &v {
        if !seen.insert(&s.labels) {
            return Err("vector cannot contain metrics with the same labelset".into());
        }
    }
    Ok(v)
}

/// Applies an arithmetic or comparison operator: the value, and for comparisons whether it held.
fn scalar_op(op: TokenType, l: f64, r: f64) -> Result<(f64, bool), String> {
    Ok(match op.id() {
        T_ADD => (l + r, true),
        T_SUB => (l - r, true),
        T_MUL => (l * r, true),
        T_DIV => (l / r, true),
        T_MOD => (l % r, true),
        T_POW => (l.powf(r), true),
        T_ATAN2 => (l.atan2(r), true),
        T_EQLC => (l, l == r),
        T_NEQ => (l, l != r),
        T_GTR => (l, l > r),
        T_LSS => (l, l < r),
        T_GTE => (l, l >= r),
        T_LTE => (l, l <= r),
        _ => return Err(format!("operator `{op}` is not defined between numbers")),
    })
}

fn vector_scalar(
    op: TokenType,
    v: Vec<Sample>,
    s: f64,
    scalar_left: bool,
    return_bool: bool,
) -> Result<Value, String> {
    if op.is_set_operator() {
        return Err(format!(
            "set operator `{op}` not allowed between a vector and a scalar"
        ));
    }
    let comparison = op.is_comparison_operator();
    // A filtering comparison keeps labels as they were: nothing to check.
    let same = (comparison && !return_bool) || one_name(v.iter().map(|s| &s.labels));
    let mut out = Vec::with_capacity(v.len());
    for sample in v {
        let (l, r) = if scalar_left {
            (s, sample.value)
        } else {
            (sample.value, s)
        };
        let (value, keep) = scalar_op(op, l, r)?;
        if comparison {
            if return_bool {
                out.push(Sample {
                    labels: drop_name(&sample.labels),
                    value: if keep { 1.0 } else { 0.0 },
                });
            } else if keep {
                // A comparison filters, and always keeps the vector's value.
                out.push(sample);
            }
        } else {
            out.push(Sample {
                labels: drop_name(&sample.labels),
                value,
            });
        }
    }
    Ok(Value::Vector(unique_unless(same, out)?))
}

/// Which labels a grouping (`by`/`without`) or a vector match (`on`/`ignoring`) looks at,
/// with the listed names in their shared copies (`sample::label_name`) so that each label of
/// each sample is picked by comparing pointers, not text. Built once per aggregation or match.
pub(super) struct NamePick {
    names: Vec<Arc<str>>,
    /// `by`/`on`: only the listed names; otherwise every name but those and `__name__`.
    include: bool,
    name_label: Arc<str>,
}

impl NamePick {
    pub(super) fn new(modifier: Option<&LabelModifier>) -> NamePick {
        let (names, include) = match modifier {
            None => (&[][..], false),
            Some(LabelModifier::Include(l)) => (&l.labels[..], true),
            Some(LabelModifier::Exclude(l)) => (&l.labels[..], false),
        };
        NamePick {
            names: names.iter().map(|n| label_name(n)).collect(),
            include,
            name_label: label_name(NAME),
        }
    }

    /// For a vector match: `on`/`ignoring`, or (without either) every label but the name.
    pub(super) fn matching(modifier: Option<&BinModifier>) -> NamePick {
        NamePick::new(modifier.and_then(|m| m.matching.as_ref()))
    }

    pub(super) fn picks(&self, k: &Arc<str>) -> bool {
        let listed = self.names.iter().any(|n| same_name(n, k));
        if self.include {
            listed
        } else {
            !listed && !same_name(k, &self.name_label)
        }
    }

    /// The hash of the picked labels: matching and grouping compare these, as Prometheus
    /// does, so no label set is built for it.
    pub(super) fn hash(&self, labels: &Labels) -> u64 {
        use std::hash::{Hash as _, Hasher as _};
        let mut h = crate::sample::hasher();
        for (k, v) in labels.pairs() {
            if self.picks(k) {
                k.hash(&mut h);
                v.hash(&mut h);
            }
        }
        h.finish()
    }
}

fn vector_vector(
    op: TokenType,
    lhs: Vec<Sample>,
    rhs: Vec<Sample>,
    modifier: Option<&BinModifier>,
) -> Result<Value, String> {
    let pick = NamePick::matching(modifier);
    let signature = |l: &Labels| pick.hash(l);
    match op.id() {
        T_LAND => {
            let right: HashSet<u64> = rhs.iter().map(|s| signature(&s.labels)).collect();
            Ok(Value::Vector(
                lhs.into_iter()
                    .filter(|s| right.contains(&signature(&s.labels)))
                    .collect(),
            ))
        }
        T_LUNLESS => {
            let right: HashSet<u64> = rhs.iter().map(|s| signature(&s.labels)).collect();
            Ok(Value::Vector(
                lhs.into_iter()
                    .filter(|s| !right.contains(&signature(&s.labels)))
                    .collect(),
            ))
        }
        T_LOR => {
            let left: HashSet<u64> = lhs.iter().map(|s| signature(&s.labels)).collect();
            let mut out = lhs;
            out.extend(
                rhs.into_iter()
                    .filter(|s| !left.contains(&signature(&s.labels))),
            );
            Ok(Value::Vector(out))
        }
        _ => matched(op, lhs, rhs, modifier),
    }
}

/// Arithmetic and comparison between two vectors, one-to-one or with `group_left/right`.
fn matched(
    op: TokenType,
    lhs: Vec<Sample>,
    rhs: Vec<Sample>,
    modifier: Option<&BinModifier>,
) -> Result<Value, String> {
    let card = modifier.map_or(&VectorMatchCardinality::OneToOne, |m| &m.card);
    let return_bool = modifier.is_some_and(|m| m.return_bool);
    let comparison = op.is_comparison_operator();
    // The "many" side drives the match; for group_right that is the right-hand side.
    let one_to_many = matches!(card, VectorMatchCardinality::OneToMany(_));
    let (many, one) = if one_to_many { (rhs, lhs) } else { (lhs, rhs) };
    let pick = NamePick::matching(modifier);
    let signature = |l: &Labels| pick.hash(l);
    let mut by_sig: HashMap<u64, &Sample> =
        HashMap::with_capacity_and_hasher(one.len(), Default::default());
    for s in &one {
        if by_sig.insert(signature(&s.labels), s).is_some() {
            let side = if one_to_many { "left" } else { "right" };
            return Err(format!(
                "found duplicate series for the match group on the {side} hand-side of the operation; many-to-many matching not allowed: matching labels must be unique on one side"
            ));
        }
    }
    let include: Vec<String> = card.labels().map(|l| l.labels.clone()).unwrap_or_default();
    let mut matched_sigs: HashSet<u64> = HashSet::default();
    let mut out_labels: HashSet<Labels> = HashSet::default();
    let mut out = Vec::new();
    for m in &many {
        let sig = signature(&m.labels);
        let Some(o) = by_sig.get(&sig) else {
            continue;
        };
        // Prometheus 3 reports duplicates on the many side before a comparison filters them
        // (operators.test: "track many-to-one vector matching errors even when all but 0 or 1
        // series on the many side are filtered away"); Prometheus 2 checked after filtering.
        if matches!(card, VectorMatchCardinality::OneToOne) && !matched_sigs.insert(sig) {
            return Err("multiple matches for labels: many-to-one matching must be explicit (group_left/group_right)".into());
        }
        let (l, r) = if one_to_many {
            (o.value, m.value)
        } else {
            (m.value, o.value)
        };
        let (value, keep) = scalar_op(op, l, r)?;
        if comparison && !return_bool && !keep {
            continue;
        }
        let value = if comparison && return_bool {
            if keep { 1.0 } else { 0.0 }
        } else {
            value
        };
        let labels = result_labels(
            &m.labels,
            &o.labels,
            op,
            return_bool,
            card,
            modifier,
            &include,
        );
        if !matches!(card, VectorMatchCardinality::OneToOne) && !out_labels.insert(labels.clone()) {
            return Err(
                "multiple matches for labels: grouping labels must ensure unique matches".into(),
            );
        }
        out.push(Sample { labels, value });
    }
    Ok(Value::Vector(unique(out)?))
}

/// Prometheus's `resultMetric`: the many side's labels, without the name for arithmetic and
/// `bool`, reduced to the `on` labels for one-to-one, plus the `group_*` labels of the one side.
fn result_labels(
    many: &Labels,
    one: &Labels,
    op: TokenType,
    return_bool: bool,
    card: &VectorMatchCardinality,
    modifier: Option<&BinModifier>,
    include: &[String],
) -> Labels {
    let drop_name_too = !op.is_comparison_operator() || return_bool;
    let one_to_one = matches!(card, VectorMatchCardinality::OneToOne);
    let matching = modifier.and_then(|m| m.matching.as_ref());
    let kept = many.retain(|k| {
        let dropped = (drop_name_too && k == NAME) || include.iter().any(|n| n == k);
        !dropped
            && match (one_to_one, matching) {
                (true, Some(LabelModifier::Include(on))) => on.labels.iter().any(|l| l == k),
                (true, Some(LabelModifier::Exclude(ignoring))) => {
                    !ignoring.labels.iter().any(|l| l == k)
                }
                _ => true,
            }
    });
    if include.is_empty() {
        return kept;
    }
    let extra = Labels::new(include.iter().filter_map(|name| {
        one.get(name)
            .filter(|v| !v.is_empty())
            .map(|v| (name.as_str(), v))
    }));
    kept.retain_with(|_| true, &extra)
}
