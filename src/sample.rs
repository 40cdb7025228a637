//! Samples: what a collector measured, in the shape the registry stores and exposes.
//!
//! Owns `Labels`, `Sample`, `Family`, `Families` (the builder collectors fill) and `Snapshot` (one
//! collector's result at one time). Uses nothing of ours: every stage may use it.

use std::fmt;
use std::sync::Arc;

/// The kind of a metric family, as the exposition format names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MetricKind {
    /// A value that goes up and down.
    Gauge,
    /// A value that only goes up (reset on restart of its source); the name ends in `_total`.
    Counter,
}

/// A label set, sorted by label name so equal sets compare and hash equal whatever order a
/// collector wrote them in. The metric name is not a label here: it lives on the family.
///
/// Cheap to clone (shared), and its hash is computed once when it is built: the rule engine
/// hashes and compares label sets in every grouping and match of every evaluation, and hashing
/// all the strings each time was the largest single cost of a tick.
#[derive(Clone)]
pub struct Labels(Arc<Inner>);

/// Names and values are shared strings: deriving a set from another (dropping the metric name,
/// a grouping, a match signature) copies pointers, never text.
struct Inner {
    hash: u64,
    pairs: Box<[(Arc<str>, Arc<str>)]>,
    /// The same set without `__name__`, when it was built by `with_name`: a series' full
    /// label set is built once and every evaluation that drops the name (arithmetic,
    /// aggregation, a rule's instances) gets this instead of building a set.
    bare: Option<Labels>,
}

/// The hash a label set carries: FxHash (fast on short strings) with a key chosen at random
/// when the process starts, so that label values (which come from the monitored services and,
/// through the webhook receiver, from Alertmanager) cannot be chosen to collide. The maps keyed
/// by label sets use this hash as it is (`FxHashMap`), without hashing it again.
fn hash_of(pairs: &[(Arc<str>, Arc<str>)]) -> u64 {
    use std::hash::{Hash as _, Hasher as _};
    let mut h = hasher();
    pairs.hash(&mut h);
    h.finish()
}

/// A hasher with the process's random key, for hashes of labels (label sets, match signatures).
pub fn hasher() -> rustc_hash::FxHasher {
    static SEED: std::sync::LazyLock<usize> = std::sync::LazyLock::new(|| {
        use std::hash::BuildHasher as _;
        // Truncation on 32-bit targets is fine: any bits of a random value are random.
        std::collections::hash_map::RandomState::new().hash_one(0x5eed_u64) as usize
    });
    rustc_hash::FxHasher::with_seed(*SEED)
}

/// The label that holds the metric name in a series' full label set.
pub const NAME_LABEL: &str = "__name__";

/// At most this many distinct label names are shared; past it (a target sending a new name in
/// every scrape) names are stored as given. Sharing is an optimisation only: every comparison
/// falls back to the text when the pointers differ.
const SHARED_NAMES: usize = 10_000;

/// The shared copy of each label name: a rule set and the series it reads use a few dozen
/// names, and comparing two shared names is comparing two pointers, where comparing the text
/// was the largest single cost of grouping and matching (each comparison reads memory the
/// cache rarely holds).
static NAMES: std::sync::LazyLock<std::sync::Mutex<std::collections::HashSet<Arc<str>>>> =
    std::sync::LazyLock::new(Default::default);

/// `names` replaced, in place, by their shared copies (one lock for the whole set).
fn share_names<'a>(names: impl Iterator<Item = &'a mut Arc<str>>) {
    let mut shared = NAMES
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    for name in names {
        if let Some(s) = shared.get(&**name) {
            if !Arc::ptr_eq(s, name) {
                *name = s.clone();
            }
        } else if shared.len() < SHARED_NAMES {
            shared.insert(name.clone());
        }
    }
}

/// The shared copy of label name `name` (a fresh one past the limit).
pub fn label_name(name: &str) -> Arc<str> {
    let mut n: Arc<str> = Arc::from(name);
    share_names(std::iter::once(&mut n));
    n
}

/// Whether two label names are equal: by pointer when both are the shared copy, which is the
/// usual case, by text otherwise.
#[inline]
pub fn same_name(a: &Arc<str>, b: &Arc<str>) -> bool {
    Arc::ptr_eq(a, b) || (a.len() == b.len() && **a == **b)
}

impl Default for Labels {
    fn default() -> Self {
        Labels::from_sorted(Vec::new())
    }
}

impl PartialEq for Labels {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
            || (self.0.hash == other.0.hash
                && self.0.pairs.len() == other.0.pairs.len()
                && self.0.pairs.iter().zip(other.0.pairs.iter()).all(|(a, b)| {
                    // Sets derived from one another share their strings: no bytes compared.
                    (Arc::ptr_eq(&a.0, &b.0) || a.0 == b.0)
                        && (Arc::ptr_eq(&a.1, &b.1) || a.1 == b.1)
                }))
    }
}

impl Eq for Labels {}

impl std::hash::Hash for Labels {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        state.write_u64(self.0.hash);
    }
}

impl PartialOrd for Labels {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Labels {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.0.pairs.cmp(&other.0.pairs)
    }
}

impl fmt::Debug for Labels {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(self.0.pairs.iter()).finish()
    }
}

impl Labels {
    /// Builds a label set from pairs in any order. A later pair with the same name replaces an
    /// earlier one.
    pub fn new<K: Into<Arc<str>>, V: Into<Arc<str>>>(
        pairs: impl IntoIterator<Item = (K, V)>,
    ) -> Self {
        let mut v: Vec<(Arc<str>, Arc<str>)> = pairs
            .into_iter()
            .map(|(k, v)| (k.into(), v.into()))
            .collect();
        share_names(v.iter_mut().map(|(k, _)| k));
        v.sort_by(|a, b| a.0.cmp(&b.0));
        // Keep the last value given for a name.
        let mut out: Vec<(Arc<str>, Arc<str>)> = Vec::with_capacity(v.len());
        for pair in v {
            match out.last_mut() {
                Some(last) if last.0 == pair.0 => *last = pair,
                _ => out.push(pair),
            }
        }
        Labels::from_sorted(out)
    }

    fn from_sorted(pairs: Vec<(Arc<str>, Arc<str>)>) -> Self {
        Labels(Arc::new(Inner {
            hash: hash_of(&pairs),
            pairs: pairs.into_boxed_slice(),
            bare: None,
        }))
    }

    /// `bare` (a set without a metric name) with `__name__` set to `name`; dropping the name
    /// again gives `bare` back without building anything.
    pub fn with_name(bare: &Labels, name: &str) -> Labels {
        let mut pairs = Vec::with_capacity(bare.len() + 1);
        pairs.push((label_name(NAME_LABEL), Arc::<str>::from(name)));
        pairs.extend(
            bare.0
                .pairs
                .iter()
                .filter(|(k, _)| &**k != NAME_LABEL)
                .cloned(),
        );
        pairs.sort_by(|a, b| a.0.cmp(&b.0));
        let bare = if bare.get(NAME_LABEL).is_some() {
            bare.retain(|k| k != NAME_LABEL)
        } else {
            bare.clone()
        };
        Labels(Arc::new(Inner {
            hash: hash_of(&pairs),
            pairs: pairs.into_boxed_slice(),
            bare: Some(bare),
        }))
    }

    /// The set without `__name__`: shared, with nothing built, when it has none or was built
    /// by `with_name`.
    pub fn without_name(&self) -> Labels {
        match &self.0.bare {
            Some(b) => b.clone(),
            None => self.retain(|k| k != NAME_LABEL),
        }
    }

    /// The empty label set.
    pub fn empty() -> Self {
        Labels::default()
    }

    /// The value of label `name`, if present.
    pub fn get(&self, name: &str) -> Option<&str> {
        let pairs = &self.0.pairs;
        // Most sets have a handful of labels: comparing for equality (lengths first) beats
        // ordering comparisons in a binary search there.
        if pairs.len() <= 8 {
            return pairs.iter().find(|(k, _)| **k == *name).map(|(_, v)| &**v);
        }
        pairs
            .binary_search_by(|(k, _)| (**k).cmp(name))
            .ok()
            .map(|i| &*pairs[i].1)
    }

    /// The value of `__name__`, found by comparing pointers where the name is the shared copy.
    pub fn metric_name(&self) -> Option<&Arc<str>> {
        static SHARED: std::sync::LazyLock<Arc<str>> =
            std::sync::LazyLock::new(|| label_name(NAME_LABEL));
        self.0
            .pairs
            .iter()
            .find(|(k, _)| same_name(k, &SHARED))
            .map(|(_, v)| v)
    }

    /// The pairs as stored (sorted by name), for comparisons by pointer (`same_name`).
    pub fn pairs(&self) -> &[(Arc<str>, Arc<str>)] {
        &self.0.pairs
    }

    /// The pairs, sorted by name.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.0.pairs.iter().map(|(k, v)| (&**k, &**v))
    }

    /// The labels whose names pass `keep`: the same set (shared, nothing built) when all do.
    pub fn retain(&self, keep: impl Fn(&str) -> bool) -> Labels {
        if self.0.pairs.iter().all(|(k, _)| keep(k)) {
            return self.clone();
        }
        Labels::from_sorted(
            self.0
                .pairs
                .iter()
                .filter(|(k, _)| keep(k))
                .cloned()
                .collect(),
        )
    }

    /// The labels whose names pass `keep`, then those of `extra` (which win on a clash).
    pub fn retain_with(&self, keep: impl Fn(&str) -> bool, extra: &Labels) -> Labels {
        if extra.is_empty() {
            return self.retain(keep);
        }
        let mut out: Vec<(Arc<str>, Arc<str>)> =
            Vec::with_capacity(self.0.pairs.len() + extra.0.pairs.len());
        let (mut a, mut b) = (
            self.0.pairs.iter().peekable(),
            extra.0.pairs.iter().peekable(),
        );
        // Both are sorted: merge them.
        loop {
            match (a.peek(), b.peek()) {
                (Some(x), Some(y)) => match x.0.cmp(&y.0) {
                    std::cmp::Ordering::Less => {
                        if keep(&x.0) {
                            out.push((*x).clone());
                        }
                        a.next();
                    }
                    std::cmp::Ordering::Equal => {
                        out.push((*y).clone());
                        a.next();
                        b.next();
                    }
                    std::cmp::Ordering::Greater => {
                        out.push((*y).clone());
                        b.next();
                    }
                },
                (Some(x), None) => {
                    if keep(&x.0) {
                        out.push((*x).clone());
                    }
                    a.next();
                }
                (None, Some(y)) => {
                    out.push((*y).clone());
                    b.next();
                }
                (None, None) => break,
            }
        }
        Labels::from_sorted(out)
    }

    /// Number of labels.
    pub fn len(&self) -> usize {
        self.0.pairs.len()
    }

    /// True when there are no labels.
    pub fn is_empty(&self) -> bool {
        self.0.pairs.is_empty()
    }
}

impl fmt::Display for Labels {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("{")?;
        for (i, (k, v)) in self.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            write!(f, "{k}={v:?}")?;
        }
        f.write_str("}")
    }
}

/// One value of one series.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    /// The series' labels.
    pub labels: Labels,
    /// The value.
    pub value: f64,
}

/// All samples of one metric name, with its help text and kind.
#[derive(Debug, Clone, PartialEq)]
pub struct Family {
    /// Metric name, e.g. `host_memory_usage_ratio`.
    pub name: String,
    /// One-line help text for `# HELP`.
    pub help: String,
    /// Gauge or counter.
    pub kind: MetricKind,
    /// The samples, one per label set.
    pub samples: Vec<Sample>,
}

/// The builder collectors fill: families in first-seen order, samples appended by name.
#[derive(Debug, Default)]
pub struct Families {
    families: Vec<Family>,
}

impl Families {
    /// An empty set.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a gauge sample. Non-finite values are kept: NaN and ±Inf are legal in the
    /// exposition, and it is for the collector to decide whether to publish one at all.
    pub fn gauge(&mut self, name: &str, help: &str, labels: &[(&str, &str)], value: f64) {
        self.push(name, help, MetricKind::Gauge, labels, value);
    }

    /// Adds a counter sample.
    pub fn counter(&mut self, name: &str, help: &str, labels: &[(&str, &str)], value: f64) {
        self.push(name, help, MetricKind::Counter, labels, value);
    }

    fn push(
        &mut self,
        name: &str,
        help: &str,
        kind: MetricKind,
        labels: &[(&str, &str)],
        value: f64,
    ) {
        let sample = Sample {
            labels: Labels::new(labels.iter().copied()),
            value,
        };
        // Collectors add a family's samples together, so the last family is the usual hit.
        if let Some(family) = self.families.iter_mut().rev().find(|f| f.name == name) {
            family.samples.push(sample);
            return;
        }
        self.families.push(Family {
            name: name.to_owned(),
            help: help.to_owned(),
            kind,
            samples: vec![sample],
        });
    }

    /// Whether a family of this name has been added.
    pub fn contains(&self, name: &str) -> bool {
        self.families.iter().any(|f| f.name == name)
    }

    /// Number of samples over all families.
    pub fn sample_count(&self) -> usize {
        self.families.iter().map(|f| f.samples.len()).sum()
    }

    /// The families collected.
    pub fn into_vec(self) -> Vec<Family> {
        self.families
    }
}

/// One collector's result at one time.
#[derive(Debug, Clone, PartialEq)]
pub struct Snapshot {
    /// The collector that produced it.
    pub collector: String,
    /// When the collection finished, in milliseconds since the Unix epoch.
    pub timestamp_ms: i64,
    /// What was measured.
    pub families: Vec<Family>,
}

#[cfg(test)]
mod tests {
    #[test]
    fn label_names_are_shared_and_compared_by_text_when_not() {
        let a = Labels::new([("job", "a"), ("instance", "i")]);
        let b = Labels::new([(String::from("job"), "b")]);
        let job = |l: &Labels| {
            l.pairs()
                .iter()
                .find(|(k, _)| &**k == "job")
                .unwrap()
                .0
                .clone()
        };
        // Built apart, the two sets hold one copy of the name.
        assert!(Arc::ptr_eq(&job(&a), &job(&b)));
        // A name that is not the shared copy (past the table's limit) still compares equal.
        let fresh: Arc<str> = Arc::from("job");
        assert!(!Arc::ptr_eq(&fresh, &job(&a)));
        assert!(same_name(&fresh, &job(&a)));
        assert!(!same_name(&Arc::from("jab"), &job(&a)));
        assert_eq!(a.metric_name(), None);
        let named = Labels::with_name(&a, "up");
        assert_eq!(named.metric_name().map(|n| &**n), Some("up"));
    }

    #[test]
    fn a_set_with_its_name_drops_it_back_to_the_same_set() {
        let bare = Labels::new([("job", "api"), ("instance", "a:1")]);
        let full = Labels::with_name(&bare, "up");
        let built = Labels::new([("__name__", "up"), ("instance", "a:1"), ("job", "api")]);
        assert_eq!(full, built);
        assert_eq!(full.cmp(&built), std::cmp::Ordering::Equal);
        assert_eq!(full.without_name(), bare);
        assert_eq!(built.without_name(), bare);
        // A name inside `bare` is replaced, not doubled.
        let again = Labels::with_name(&full, "down");
        assert_eq!(again.get("__name__"), Some("down"));
        assert_eq!(again.len(), 3);
        assert_eq!(again.without_name(), bare);
        let merged = bare.retain_with(
            |k| k != "job",
            &Labels::new([("severity", "page"), ("instance", "b:2")]),
        );
        assert_eq!(
            merged,
            Labels::new([("instance", "b:2"), ("severity", "page")])
        );
    }
    use super::*;

    #[test]
    fn labels_are_sorted_and_deduplicated() {
        let a = Labels::new([("b", "2"), ("a", "1"), ("b", "3")]);
        let b = Labels::new([("a", "1"), ("b", "3")]);
        assert_eq!(a, b);
        assert_eq!(a.get("b"), Some("3"));
        assert_eq!(a.get("c"), None);
        assert_eq!(a.to_string(), r#"{a="1",b="3"}"#);
    }

    #[test]
    fn families_group_samples_by_name_in_first_seen_order() {
        let mut f = Families::new();
        f.gauge("x", "help x", &[("k", "1")], 1.0);
        f.counter("y_total", "help y", &[], 2.0);
        f.gauge("x", "help x", &[("k", "2")], 3.0);
        assert_eq!(f.sample_count(), 3);
        let v = f.into_vec();
        assert_eq!(v.len(), 2);
        assert_eq!(v[0].name, "x");
        assert_eq!(v[0].samples.len(), 2);
        assert_eq!(v[1].kind, MetricKind::Counter);
    }
}

/// Fills `{{ $value }}` and `{{ $labels.name }}` in an annotation or an action's parameter, as
/// Prometheus's templates do for those two forms; anything else between braces is kept as
/// written.
pub fn template(
    text: &str,
    labels: &std::collections::BTreeMap<String, String>,
    value: f64,
) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(start) = rest.find("{{") {
        out.push_str(&rest[..start]);
        let Some(end) = rest[start..].find("}}") else {
            out.push_str(&rest[start..]);
            return out;
        };
        let inner = rest[start + 2..start + end].trim();
        match inner {
            "$value" => out.push_str(&format_value(value)),
            _ => match inner.strip_prefix("$labels.") {
                Some(name) => out.push_str(labels.get(name).map_or("", String::as_str)),
                None => out.push_str(&rest[start..start + end + 2]),
            },
        }
        rest = &rest[start + end + 2..];
    }
    out.push_str(rest);
    out
}

/// A value as Prometheus writes one (Go's spelling: `NaN`, `+Inf`, `-Inf`): in templates, in
/// `count_values`' label and in the query API's answers.
pub fn format_value(v: f64) -> String {
    if v.is_nan() {
        "NaN".into()
    } else if v.is_infinite() {
        if v > 0.0 {
            "+Inf".into()
        } else {
            "-Inf".into()
        }
    } else {
        format!("{v}")
    }
}

#[cfg(test)]
mod template_tests {
    use super::template;
    use std::collections::BTreeMap;

    #[test]
    fn templates_fill_value_and_labels() {
        let labels = BTreeMap::from([("target".to_owned(), "cache".to_owned())]);
        assert_eq!(
            template("{{ $labels.target }} at {{$value}}", &labels, 0.25),
            "cache at 0.25"
        );
        assert_eq!(
            template("no {{ .Other }} here", &labels, 1.0),
            "no {{ .Other }} here"
        );
        assert_eq!(
            template("{{ $labels.missing }}|{{ $value }}", &labels, f64::NAN),
            "|NaN"
        );
    }
}
