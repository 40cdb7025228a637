//! The aggregation operators, as Prometheus computes them (`promql/engine.go`): `sum`, `avg`,
//! `min`, `max`, `count`, `group`, `stddev`, `stdvar`, `quantile`, `topk`, `bottomk` and
//! `count_values`, each with `by`/`without`. Groups are found by the hash of the labels they
//! keep; a group's label set is built once, when it appears.
//!
//! Uses the evaluator (for the operand and the parameter), its `Mean` and `kahan_inc`, and
//! `over_time::quantile`.

use promql_parser::parser::token::{
    T_AVG, T_BOTTOMK, T_COUNT, T_COUNT_VALUES, T_GROUP, T_MAX, T_MIN, T_QUANTILE, T_STDDEV,
    T_STDVAR, T_SUM, T_TOPK,
};
use promql_parser::parser::{AggregateExpr, Expr, LabelModifier};
use rustc_hash::FxHashMap as HashMap;

use super::eval::{Evaluator, Mean, NamePick, Sample, Value, kahan_inc};
use super::{NAME, SeriesSource, over_time, strip_parens};
use crate::sample::Labels;

/// Evaluates one aggregation.
pub(super) fn aggregate<S: SeriesSource>(
    ev: &Evaluator<'_, S>,
    a: &AggregateExpr,
) -> Result<Value, String> {
    let id = a.op.id();
    let modifier = a.modifier.as_ref();
    // The parameter is evaluated before the operand, as Prometheus does.
    let param = match (&a.param, id) {
        (Some(p), T_COUNT_VALUES) => Param::Label(string_param(p)?),
        (Some(p), _) => match ev.expr(p)? {
            Value::Scalar(v) => Param::Number(v),
            _ => return Err(format!("`{}` needs a scalar parameter", a.op)),
        },
        (None, _) => Param::None,
    };
    let Value::Vector(input) = ev.expr(&a.expr)? else {
        return Err(format!("`{}` needs an instant vector", a.op));
    };
    match (id, param) {
        (T_TOPK | T_BOTTOMK, Param::Number(k)) => top_k(input, k, id == T_TOPK, modifier),
        (T_COUNT_VALUES, Param::Label(label)) => count_values(input, &label, modifier),
        (T_QUANTILE, Param::Number(q)) => {
            let mut groups: Groups<Vec<f64>> = Groups::default();
            for s in input {
                groups.of(&s.labels, modifier).push(s.value);
            }
            Ok(Value::Vector(
                groups
                    .list
                    .into_iter()
                    .map(|(labels, mut values)| Sample {
                        labels,
                        value: over_time::quantile(q, &mut values),
                    })
                    .collect(),
            ))
        }
        (_, Param::None) => {
            let mut groups: Groups<Group> = Groups::default();
            // Only stddev and stdvar pay for the running variance (a division per sample).
            let variance = matches!(id, T_STDDEV | T_STDVAR);
            for s in input {
                groups.of(&s.labels, modifier).add(s.value, variance);
            }
            let out = groups
                .list
                .into_iter()
                .map(|(labels, g)| {
                    let value = match id {
                        T_SUM => g.sum(),
                        T_AVG => g.mean.value(),
                        T_MIN => g.min,
                        T_MAX => g.max,
                        T_COUNT => g.count,
                        T_GROUP => 1.0,
                        T_STDVAR => g.var_sum / g.count,
                        T_STDDEV => (g.var_sum / g.count).sqrt(),
                        _ => f64::NAN,
                    };
                    Sample { labels, value }
                })
                .collect();
            Ok(Value::Vector(out))
        }
        _ => Err(format!("`{}` is given the wrong kind of parameter", a.op)),
    }
}

enum Param {
    None,
    Number(f64),
    Label(String),
}

fn string_param(p: &Expr) -> Result<String, String> {
    match strip_parens(p) {
        Expr::StringLiteral(s) => Ok(s.val.clone()),
        _ => Err("count_values needs a string parameter".into()),
    }
}

/// Aggregation groups in the order they appear, found by the hash of the labels they keep (as
/// Prometheus does): a group's label set is built once, when it appears.
struct Groups<T> {
    list: Vec<(Labels, T)>,
    index: HashMap<u64, usize>,
    /// Built on the first sample: every call of one aggregation passes the same modifier.
    pick: Option<NamePick>,
}

impl<T> Default for Groups<T> {
    fn default() -> Self {
        Groups {
            list: Vec::new(),
            index: HashMap::default(),
            pick: None,
        }
    }
}

impl<T: Default> Groups<T> {
    /// The state of the group `labels` belongs to under `modifier`, new when it is the first.
    fn of(&mut self, labels: &Labels, modifier: Option<&LabelModifier>) -> &mut T {
        let list = &mut self.list;
        let hash = match modifier {
            // No `by`/`without`: one group.
            None => 0,
            Some(m) => self
                .pick
                .get_or_insert_with(|| NamePick::new(Some(m)))
                .hash(labels),
        };
        let i = *self.index.entry(hash).or_insert_with(|| {
            list.push((grouping(labels, modifier), T::default()));
            list.len() - 1
        });
        &mut list[i].1
    }
}

/// `topk`/`bottomk`: the k largest (smallest) samples of each group, with their own labels.
/// Kept in a heap exactly as Prometheus keeps it (Go's `container/heap`), so ties at the k-th
/// place are broken as Prometheus breaks them; NaN ranks below every number either way.
fn top_k(
    mut input: Vec<Sample>,
    k: f64,
    top: bool,
    modifier: Option<&LabelModifier>,
) -> Result<Value, String> {
    if k.is_nan() {
        return Err("Parameter value is NaN".into());
    }
    // Prometheus refuses what int64 cannot hold (2^63 and beyond).
    if k >= 9_223_372_036_854_775_808.0 {
        return Err(format!("Scalar value {k} overflows int64"));
    }
    if k < 1.0 {
        return Ok(Value::Vector(Vec::new()));
    }
    // Truncated as Go's int64() does; no group holds more than the input anyway.
    let k = if k >= input.len() as f64 {
        input.len()
    } else {
        k as usize
    };
    // A selector's series come sorted by their labels, as Prometheus reads them from storage.
    input.sort_by(|a, b| a.labels.cmp(&b.labels));
    // `less(a, b)`: a belongs nearer the heap's root, the sample to give up first.
    let less = |a: f64, b: f64| {
        if top {
            a < b || (a.is_nan() && !b.is_nan())
        } else {
            a > b || (a.is_nan() && !b.is_nan())
        }
    };
    let mut heaps: Groups<Vec<Sample>> = Groups::default();
    for s in input {
        let heap = heaps.of(&s.labels, modifier);
        if heap.len() < k {
            heap.push(s);
            let n = heap.len() - 1;
            up(heap, n, &less);
        } else if less(heap[0].value, s.value) {
            heap[0] = s;
            if !down(heap, 0, &less) {
                up(heap, 0, &less);
            }
        }
    }
    let mut out = Vec::new();
    for (_, mut heap) in heaps.list {
        // Best first, as Prometheus returns them.
        heap.sort_by(|a, b| {
            if less(b.value, a.value) {
                std::cmp::Ordering::Less
            } else if less(a.value, b.value) {
                std::cmp::Ordering::Greater
            } else {
                std::cmp::Ordering::Equal
            }
        });
        out.extend(heap);
    }
    Ok(Value::Vector(out))
}

/// Go's `heap.up`.
fn up(h: &mut [Sample], mut j: usize, less: &impl Fn(f64, f64) -> bool) {
    while j > 0 {
        let i = (j - 1) / 2;
        if !less(h[j].value, h[i].value) {
            break;
        }
        h.swap(i, j);
        j = i;
    }
}

/// Go's `heap.down`: whether the element moved.
fn down(h: &mut [Sample], i0: usize, less: &impl Fn(f64, f64) -> bool) -> bool {
    let n = h.len();
    let mut i = i0;
    loop {
        let j1 = 2 * i + 1;
        if j1 >= n {
            break;
        }
        let mut j = j1;
        if j1 + 1 < n && less(h[j1 + 1].value, h[j1].value) {
            j = j1 + 1;
        }
        if !less(h[j].value, h[i].value) {
            break;
        }
        h.swap(i, j);
        i = j;
    }
    i > i0
}

/// `count_values("label", v)`: per group, how many samples have each value, the value written
/// as Go's `strconv.FormatFloat(v, 'f', -1, 64)` into `label` (a valid name: checked at load).
fn count_values(
    input: Vec<Sample>,
    label: &str,
    modifier: Option<&LabelModifier>,
) -> Result<Value, String> {
    let mut groups: Vec<(Labels, f64)> = Vec::new();
    let mut index: HashMap<Labels, usize> = HashMap::default();
    let extra = |v: f64| Labels::new([(label, crate::sample::format_value(v))]);
    for s in input {
        let with = s.labels.retain_with(|_| true, &extra(s.value));
        // The value's label is added to `by` (and is the whole group with no modifier); under
        // `without` it is kept unless the list names it, as Prometheus does.
        let without = matches!(modifier, Some(LabelModifier::Exclude(_)));
        let key = with.retain(|k| grouped(k, modifier) || (k == label && !without));
        let i = *index.entry(key.clone()).or_insert_with(|| {
            groups.push((key, 0.0));
            groups.len() - 1
        });
        groups[i].1 += 1.0;
    }
    Ok(Value::Vector(
        groups
            .into_iter()
            .map(|(labels, value)| Sample { labels, value })
            .collect(),
    ))
}

/// Running state of one aggregation group.
#[derive(Debug)]
struct Group {
    sum: f64,
    /// Kahan-Neumaier compensation, as Prometheus sums.
    c: f64,
    count: f64,
    min: f64,
    max: f64,
    mean: Mean,
    /// Welford's running mean and sum of squared deviations (stddev, stdvar).
    var_mean: f64,
    var_sum: f64,
}

impl Default for Group {
    fn default() -> Self {
        Group {
            sum: 0.0,
            c: 0.0,
            count: 0.0,
            min: f64::NAN,
            max: f64::NAN,
            mean: Mean::default(),
            var_mean: 0.0,
            var_sum: 0.0,
        }
    }
}

impl Group {
    fn add(&mut self, v: f64, variance: bool) {
        self.mean.add(v);
        (self.sum, self.c) = kahan_inc(v, self.sum, self.c);
        self.count += 1.0;
        // NaN loses to any number, as in Prometheus's min and max.
        if v < self.min || self.min.is_nan() {
            self.min = v;
        }
        if v > self.max || self.max.is_nan() {
            self.max = v;
        }
        // The first value seeds the mean, as Prometheus does; a group of one NaN or infinite
        // value has no variance.
        if !variance {
            return;
        }
        if self.count == 1.0 {
            self.var_mean = v;
            self.var_sum = if v.is_finite() { 0.0 } else { f64::NAN };
        } else {
            let delta = v - self.var_mean;
            self.var_mean += delta / self.count;
            self.var_sum += delta * (v - self.var_mean);
        }
    }

    fn sum(&self) -> f64 {
        if self.sum.is_infinite() {
            self.sum
        } else {
            self.sum + self.c
        }
    }
}

/// The group of a sample under `by`/`without` (no modifier: one group of everything).
fn grouping(labels: &Labels, modifier: Option<&LabelModifier>) -> Labels {
    match modifier {
        None => Labels::empty(),
        Some(_) => labels.retain(|k| grouped(k, modifier)),
    }
}

/// Whether label `k` is part of a sample's group under `modifier`.
fn grouped(k: &str, modifier: Option<&LabelModifier>) -> bool {
    match modifier {
        None => false,
        Some(LabelModifier::Include(keep)) => keep.labels.iter().any(|l| l == k),
        Some(LabelModifier::Exclude(drop)) => k != NAME && !drop.labels.iter().any(|l| l == k),
    }
}
