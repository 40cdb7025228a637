//! The registry: the latest snapshot of every collector, a bounded history of every series, the
//! exporter's own metrics, and the text exposition served on `/metrics`.
//!
//! Owns what has been measured. Collectors write it (`publish`, `record_attempt`); `/metrics`,
//! the landing page and (later) the rule engine read it. Uses `sample` and the `prometheus`
//! crate only.
//!
//! Collection is decoupled from scraping: `publish` re-encodes the exposition body once per
//! collection, so a scrape copies a prepared buffer and encodes only the few self-metrics. A slow
//! or dead target can never slow `/metrics`, and concurrent scrapes never contend with
//! collection for more than a pointer swap. The gzip form is compressed once per published
//! body too (by the first scrape that asks for it), and a scrape compresses only the
//! self-metrics after it.

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::Duration;

use prometheus::core::Collector as _;
use prometheus::proto;
use prometheus::{Gauge, GaugeVec, IntCounterVec, Opts};
use rustc_hash::{FxHashMap as HashMap, FxHashSet as HashSet};

use crate::sample::{Family, Labels, MetricKind};

/// Prometheus's staleness marker: a NaN with this exact bit pattern means "the series ended
/// here". Stored in the history when a series disappears from its collector's snapshot, so range
/// reads can tell "stopped" from "still going".
pub const STALE_NAN_BITS: u64 = 0x7ff0_0000_0000_0002;

/// True when `v` is the staleness marker (and not an ordinary NaN).
pub fn is_stale_marker(v: f64) -> bool {
    v.to_bits() == STALE_NAN_BITS
}

/// One stored value of a series.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Point {
    /// Milliseconds since the Unix epoch.
    pub t_ms: i64,
    /// The value (may be the staleness marker).
    pub v: f64,
}

/// One sample scraped from another program, as the history stores it.
#[derive(Debug, Clone, PartialEq)]
pub struct Scraped {
    /// The series name.
    pub name: String,
    /// Its labels (without the name).
    pub labels: Labels,
    /// Its own timestamp, when the payload gave one and it is honoured.
    pub t_ms: Option<i64>,
    /// The value.
    pub value: f64,
}

/// The content type of the text exposition format we serve.
pub const TEXT_CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Errors building the registry's own metrics.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// A self-metric could not be created or registered (a bug: names are constants).
    #[error("registering the exporter's own metrics: {0}")]
    SelfMetrics(#[from] prometheus::Error),
}

/// What one collection attempt came to, for the self-metrics and the landing page.
#[derive(Debug, Clone)]
pub struct Attempt {
    /// How long it took.
    pub duration: Duration,
    /// When it finished, in milliseconds since the Unix epoch.
    pub finished_ms: i64,
    /// `None` when it succeeded, else why it failed (already free of secrets).
    pub error: Option<String>,
}

/// A collector's state as the landing page and the status API show it.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct CollectorStatus {
    /// The collector's name.
    pub name: String,
    /// Whether its last attempt succeeded.
    pub up: bool,
    /// How many attempts it has made.
    pub attempts: u64,
    /// How many of them failed.
    pub failures: u64,
    /// When it last succeeded, in milliseconds since the Unix epoch.
    pub last_success_ms: Option<i64>,
    /// How long its last attempt took, in seconds.
    pub last_duration_seconds: f64,
    /// Why its last attempt failed, when it did.
    pub last_error: Option<String>,
    /// How many samples its latest snapshot holds.
    pub samples: usize,
}

/// Latest snapshots, history and the prepared exposition.
pub struct Registry {
    /// Latest families of each collector, by collector name.
    latest: RwLock<BTreeMap<String, Arc<Vec<Family>>>>,
    /// The encoded exposition of every collector's latest snapshot, rebuilt on publish.
    body: RwLock<Arc<String>>,
    /// Serializes publishers (see `publish`).
    publishing: Mutex<()>,
    /// `body` compressed, for the gzip scrapes; made by the first that finds it out of date.
    gzipped: Mutex<Option<Arc<Deflated>>>,
    /// Per-collector bookkeeping for status and readiness.
    status: RwLock<BTreeMap<String, CollectorStatus>>,
    /// Collectors that must have made one attempt before we call ourselves ready.
    expected: RwLock<Vec<String>>,
    history: Mutex<History>,
    own: SelfMetrics,
}

impl Registry {
    /// A registry keeping `retention` of history for every series.
    pub fn new(retention: Duration) -> Result<Self, RegistryError> {
        Ok(Registry {
            latest: RwLock::new(BTreeMap::new()),
            body: RwLock::new(Arc::new(String::new())),
            publishing: Mutex::new(()),
            gzipped: Mutex::new(None),
            status: RwLock::new(BTreeMap::new()),
            expected: RwLock::new(Vec::new()),
            history: Mutex::new(History::new(retention)),
            own: SelfMetrics::new()?,
        })
    }

    /// Declares the collectors that will run, so readiness can wait for their first round and
    /// the landing page can list them before they report.
    pub fn expect_collectors(&self, names: &[&str]) {
        let mut expected = write(&self.expected);
        let mut status = write(&self.status);
        for name in names {
            expected.push((*name).to_owned());
            status
                .entry((*name).to_owned())
                .or_insert_with(|| CollectorStatus {
                    name: (*name).to_owned(),
                    ..CollectorStatus::default()
                });
        }
    }

    /// Ready once every expected collector has made its first attempt (successful or not: a
    /// target being down is what `*_up` says, not a reason to be unready).
    pub fn is_ready(&self) -> bool {
        let status = read(&self.status);
        read(&self.expected)
            .iter()
            .all(|name| status.get(name).is_some_and(|s| s.attempts > 0))
    }

    /// Replaces `collector`'s latest families, appends them to the history, and re-encodes the
    /// exposition. Series that the collector published before and not now are marked stale.
    pub fn publish(&self, collector: &str, families: Vec<Family>, at_ms: i64) {
        let families = Arc::new(families);
        {
            let mut history = lock(&self.history);
            history.append(collector, &families, at_ms);
            self.own.history_series.set(history.series as f64);
            self.own.history_points.set(history.points as f64);
        }
        self.serve(collector, families);
    }

    /// What a scrape of another program brought: appended to the history, each point at its
    /// own time (its timestamp in the payload, or the scrape's), series the previous scrape
    /// had and this one has not marked stale (except those that came with their own
    /// timestamps, which Prometheus exempts too). Served on `/metrics` only when `serve` gives
    /// the families to serve (an empty list withdraws what was served before).
    pub fn publish_scraped(
        &self,
        collector: &str,
        points: &[Scraped],
        at_ms: i64,
        serve: Option<Vec<Family>>,
    ) {
        {
            let mut history = lock(&self.history);
            history.append_scraped(collector, points, at_ms);
            self.own.history_series.set(history.series as f64);
            self.own.history_points.set(history.points as f64);
        }
        if let Some(families) = serve {
            self.serve(collector, Arc::new(families));
        }
    }

    /// Replaces what `collector` has on `/metrics` and re-encodes the exposition.
    fn serve(&self, collector: &str, families: Arc<Vec<Family>>) {
        let samples = families.iter().map(|f| f.samples.len()).sum();
        // One publisher at a time from snapshot to stored body: two collectors finishing
        // together must not store their bodies in the wrong order (an older body would bring
        // back series another collector just withdrew). Scrapes never take this lock.
        let _publishing = lock(&self.publishing);
        let snapshot: Vec<Arc<Vec<Family>>> = {
            let mut latest = write(&self.latest);
            latest.insert(collector.to_owned(), families);
            latest.values().cloned().collect()
        };
        let body = encode_merged(&snapshot);
        *write(&self.body) = Arc::new(body);
        if let Some(s) = write(&self.status).get_mut(collector) {
            s.samples = samples;
        }
    }

    /// Records one collection attempt in the self-metrics and the status.
    pub fn record_attempt(&self, collector: &str, attempt: &Attempt) {
        let ok = attempt.error.is_none();
        let labels = [collector];
        self.own
            .collector_up
            .with_label_values(&labels)
            .set(if ok { 1.0 } else { 0.0 });
        self.own
            .collector_duration
            .with_label_values(&labels)
            .set(attempt.duration.as_secs_f64());
        if ok {
            self.own
                .collector_last_success
                .with_label_values(&labels)
                .set(attempt.finished_ms as f64 / 1000.0);
        } else {
            self.own.collector_failures.with_label_values(&labels).inc();
        }
        let mut status = write(&self.status);
        let s = status
            .entry(collector.to_owned())
            .or_insert_with(|| CollectorStatus {
                name: collector.to_owned(),
                ..CollectorStatus::default()
            });
        s.up = ok;
        s.attempts += 1;
        s.last_duration_seconds = attempt.duration.as_secs_f64();
        if ok {
            s.last_success_ms = Some(attempt.finished_ms);
            s.last_error = None;
        } else {
            s.failures += 1;
            s.last_error = attempt.error.clone();
        }
    }

    /// The status of every known collector, by name.
    pub fn collectors(&self) -> Vec<CollectorStatus> {
        read(&self.status).values().cloned().collect()
    }

    /// The whole exposition: every collector's latest snapshot, then the exporter's own metrics.
    pub fn render(&self) -> String {
        let body = read(&self.body).clone();
        let mut out = String::with_capacity(body.len() + 4096);
        out.push_str(&body);
        self.encode_own(&mut out);
        out
    }

    /// `render`, gzip-compressed: one gzip member whose deflate stream is the collected part,
    /// compressed once per published body and kept, followed by the exporter's own metrics,
    /// compressed now. Decompressed, it is what `render` gives at the same moment.
    pub fn render_gzip(&self) -> std::io::Result<Vec<u8>> {
        use std::io::Write as _;
        let collected = {
            // Held while compressing: concurrent scrapes of a new body wait for one
            // compression instead of each making their own. The body is read under it, so a
            // scrape that read an older body cannot replace a newer compression with its own.
            let mut kept = lock(&self.gzipped);
            let body = read(&self.body).clone();
            match kept.as_ref() {
                Some(d) if Arc::ptr_eq(&d.of, &body) => d.clone(),
                _ => {
                    let d = Arc::new(Deflated::new(body)?);
                    *kept = Some(d.clone());
                    d
                }
            }
        };
        let mut own = String::with_capacity(4096);
        self.encode_own(&mut own);
        let mut crc = collected.crc.clone();
        let mut own_crc = crc32fast::Hasher::new();
        own_crc.update(own.as_bytes());
        crc.combine(&own_crc);
        let len = collected.of.len().wrapping_add(own.len());
        let mut out = Vec::with_capacity(collected.deflate.len() + own.len() / 4 + 32);
        // ID1 ID2, deflate, no flags, no time, no extra flags, unknown OS (RFC 1952).
        out.extend_from_slice(&[0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, 0xff]);
        out.extend_from_slice(&collected.deflate);
        // A deflate stream may go on after a sync flush with blocks compressed afresh: the
        // own metrics end it with the final block.
        let mut tail = flate2::write::DeflateEncoder::new(out, flate2::Compression::fast());
        tail.write_all(own.as_bytes())?;
        let mut out = tail.finish()?;
        out.extend_from_slice(&crc.finalize().to_le_bytes());
        // ISIZE: the uncompressed length modulo 2^32, as the format defines it.
        out.extend_from_slice(&(len as u32).to_le_bytes());
        Ok(out)
    }

    fn encode_own(&self, out: &mut String) {
        let own = self.own.registry.gather();
        // Appending to a String cannot fail; an error would only mean an empty family, which
        // `gather` never returns.
        if let Err(err) = prometheus::TextEncoder::new().encode_utf8(&own, out) {
            tracing::warn!(error = %err, "encoding the exporter's own metrics failed");
        }
    }

    /// The stored points of every series named `name` with a point in `[start_ms, end_ms]`,
    /// by label set (without `__name__`).
    pub fn range(&self, name: &str, start_ms: i64, end_ms: i64) -> Vec<(Labels, Vec<Point>)> {
        let history = lock(&self.history);
        let Some(series) = history.by_name.get(name) else {
            return Vec::new();
        };
        let mut out: Vec<(Labels, Vec<Point>)> = series
            .iter()
            .filter_map(|(labels, s)| {
                let selected = s.between(start_ms, end_ms);
                (!selected.is_empty()).then(|| (labels.clone(), selected))
            })
            .collect();
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }

    /// Every stored series `sel` accepts, as its label set with `__name__` and its points in
    /// `[start_ms, end_ms]`; series without points there are left out. The read side of the
    /// history for the rule engine.
    pub fn select<K: Fn(&str, &Labels) -> bool>(
        &self,
        sel: &Selection<'_, K>,
        start_ms: i64,
        end_ms: i64,
    ) -> Vec<(Labels, Vec<Point>)> {
        let mut out = Vec::new();
        self.visit(sel, |s| {
            let selected = s.between(start_ms, end_ms);
            if !selected.is_empty() {
                out.push((s.full.clone(), selected));
            }
        });
        out
    }

    /// Like `select`, but only each series' newest point in `[start_ms, end_ms]` (what an
    /// instant selector reads), copying nothing else.
    pub fn select_last<K: Fn(&str, &Labels) -> bool>(
        &self,
        sel: &Selection<'_, K>,
        start_ms: i64,
        end_ms: i64,
    ) -> Vec<(Labels, Point)> {
        let mut out = Vec::new();
        self.visit(sel, |s| {
            if let Some(p) = s.last_until(end_ms).filter(|p| p.t_ms >= start_ms) {
                out.push((s.full.clone(), p));
            }
        });
        out
    }

    /// Like `select`, but `f` reads each series' points where they are stored (under the
    /// history's lock, so `f` must be quick): no copy of each series for a range function.
    pub fn each_range<K: Fn(&str, &Labels) -> bool>(
        &self,
        sel: &Selection<'_, K>,
        start_ms: i64,
        end_ms: i64,
        f: &mut dyn FnMut(&Labels, &[Point]),
    ) {
        // A window the ring buffer holds in two pieces is copied here (one buffer for all).
        let mut joined = Vec::new();
        self.visit(sel, |s| {
            let window = s.window(start_ms, end_ms);
            if window.is_empty() {
                return;
            }
            let (a, b) = s.points.as_slices();
            if window.end <= a.len() {
                f(&s.full, &a[window]);
            } else if window.start >= a.len() {
                f(&s.full, &b[window.start - a.len()..window.end - a.len()]);
            } else {
                joined.clear();
                joined.extend(s.points.range(window).copied());
                f(&s.full, &joined);
            }
        });
    }

    /// Calls `f` on every stored series `sel` accepts, under the history's lock.
    fn visit<K: Fn(&str, &Labels) -> bool>(
        &self,
        sel: &Selection<'_, K>,
        mut f: impl FnMut(&Series),
    ) {
        let Selection {
            name,
            equal,
            key,
            keep,
        } = sel;
        let (name, key) = (*name, key.as_deref());
        let mut guard = lock(&self.history);
        let history = &mut *guard;
        let Some(n) = name else {
            for (n, series) in &history.by_name {
                for (labels, s) in series {
                    if keep(n, labels) {
                        f(s);
                    }
                }
            }
            return;
        };
        let Some(series) = history.by_name.get(n) else {
            return;
        };
        if !history.index.contains_key(n) {
            history.index.insert(n.to_owned(), MetricIndex::default());
        }
        let Some(index) = history.index.get_mut(n) else {
            return;
        };
        if let Some(remembered) = key.and_then(|k| index.selections.get(k)) {
            for labels in remembered {
                if let Some(s) = series.get(labels) {
                    f(s);
                }
            }
            return;
        }
        // Remembered only while the metric has few selections: a rule set's selectors are a
        // bounded family, anything past that is computed each time.
        let mut accepted =
            (key.is_some() && index.selections.len() < SELECTIONS_PER_METRIC).then(Vec::new);
        let mut take = |labels: &Labels, s: &Series| {
            if keep(n, labels) {
                f(s);
                if let Some(a) = accepted.as_mut() {
                    a.push(labels.clone());
                }
            }
        };
        // A metric with few series is quicker to walk than to look up.
        if equal.is_empty() || series.len() <= POSTINGS_FROM {
            for (labels, s) in series {
                take(labels, s);
            }
        } else {
            let postings = index.postings.get_or_insert_with(|| postings(series));
            // The shortest list: an absent one means nothing can match.
            let candidates = equal
                .iter()
                .map(|(l, v)| postings.get(*l).and_then(|m| m.get(*v)))
                .min_by_key(|c| c.map_or(0, Vec::len))
                .flatten();
            for labels in candidates.into_iter().flatten() {
                if let Some(s) = series.get(labels) {
                    take(labels, s);
                }
            }
        }
        if let (Some(k), Some(a)) = (key, accepted) {
            index.selections.insert(k.to_owned(), a);
        }
    }

    /// Adds metrics of another stage (the rule engine, the actions) to the exporter's own, so
    /// they are served on `/metrics` with the rest.
    pub fn register(
        &self,
        collector: Box<dyn prometheus::core::Collector>,
    ) -> Result<(), prometheus::Error> {
        self.own.registry.register(collector)
    }

    /// How long the history keeps each series.
    pub fn retention(&self) -> Duration {
        Duration::from_millis(u64::try_from(lock(&self.history).retention_ms).unwrap_or(0))
    }

    /// Series and points held in the history (also published as self-metrics).
    pub fn history_size(&self) -> (usize, usize) {
        let history = lock(&self.history);
        (history.series, history.points)
    }
}

/// Encodes the union of several collectors' families. A family name appearing in two collectors
/// is written once, with all its samples, because the format forbids repeating a family; a
/// label set seen twice keeps its first value.
fn encode_merged(snapshots: &[Arc<Vec<Family>>]) -> String {
    let mut order: Vec<&str> = Vec::new();
    let mut merged: HashMap<&str, (proto::MetricFamily, HashSet<&Labels>)> = HashMap::default();
    for families in snapshots {
        for family in families.iter() {
            if family.samples.is_empty() {
                continue;
            }
            let (mf, seen) = merged.entry(family.name.as_str()).or_insert_with(|| {
                order.push(family.name.as_str());
                let mut mf = proto::MetricFamily::default();
                mf.set_name(family.name.clone());
                mf.set_help(family.help.clone());
                mf.set_field_type(match family.kind {
                    MetricKind::Gauge => proto::MetricType::GAUGE,
                    MetricKind::Counter => proto::MetricType::COUNTER,
                });
                (mf, HashSet::default())
            });
            for sample in &family.samples {
                if !seen.insert(&sample.labels) {
                    continue;
                }
                let mut metric = proto::Metric::default();
                metric.set_label(
                    sample
                        .labels
                        .iter()
                        .map(|(k, v)| {
                            let mut pair = proto::LabelPair::default();
                            pair.set_name(k.to_owned());
                            pair.set_value(v.to_owned());
                            pair
                        })
                        .collect(),
                );
                match family.kind {
                    MetricKind::Gauge => {
                        let mut g = proto::Gauge::default();
                        g.set_value(sample.value);
                        metric.set_gauge(g);
                    }
                    MetricKind::Counter => {
                        let mut c = proto::Counter::default();
                        c.set_value(sample.value);
                        metric.set_counter(c);
                    }
                }
                mf.mut_metric().push(metric);
            }
        }
    }
    let families: Vec<proto::MetricFamily> = order
        .iter()
        .filter_map(|name| merged.remove(name).map(|(mf, _)| mf))
        .collect();
    let mut out = String::new();
    if let Err(err) = prometheus::TextEncoder::new().encode_utf8(&families, &mut out) {
        tracing::warn!(error = %err, "encoding collected metrics failed");
    }
    out
}

/// A published body as the start of a raw deflate stream, ended by a sync flush (byte-aligned,
/// not final) so that more can follow, with the CRC of the text it holds.
struct Deflated {
    of: Arc<String>,
    deflate: Vec<u8>,
    crc: crc32fast::Hasher,
}

impl Deflated {
    fn new(of: Arc<String>) -> std::io::Result<Deflated> {
        use std::io::Write as _;
        let mut crc = crc32fast::Hasher::new();
        crc.update(of.as_bytes());
        let mut e = flate2::write::DeflateEncoder::new(
            Vec::with_capacity(of.len() / 8),
            flate2::Compression::default(),
        );
        e.write_all(of.as_bytes())?;
        // A sync flush: everything written so far is out, and the stream is not finished.
        e.flush()?;
        // Taken before the encoder is dropped (dropping it writes the end of the stream,
        // into the emptied buffer that is thrown away).
        let deflate = std::mem::take(e.get_mut());
        Ok(Deflated { of, deflate, crc })
    }
}

/// One stored series: its label set with `__name__` (built once, handed out by reference
/// count) and its points within the retention.
struct Series {
    full: Labels,
    points: VecDeque<Point>,
}

impl Series {
    /// The points in `[start_ms, end_ms]`, found by binary search: series are in time order.
    fn between(&self, start_ms: i64, end_ms: i64) -> Vec<Point> {
        self.points
            .range(self.window(start_ms, end_ms))
            .copied()
            .collect()
    }

    /// Where the points in `[start_ms, end_ms]` are (empty when there are none).
    fn window(&self, start_ms: i64, end_ms: i64) -> std::ops::Range<usize> {
        let from = self.points.partition_point(|p| p.t_ms < start_ms);
        // Usually the window ends at or after the newest point: no search for that end.
        let to = match self.points.back() {
            Some(p) if p.t_ms <= end_ms => self.points.len(),
            _ => self.points.partition_point(|p| p.t_ms <= end_ms),
        };
        from..to.max(from)
    }

    /// The newest point at or before `end_ms`.
    fn last_until(&self, end_ms: i64) -> Option<Point> {
        // Usually the newest point of all: look there before searching.
        match self.points.back() {
            Some(p) if p.t_ms <= end_ms => Some(*p),
            _ => {
                let to = self.points.partition_point(|p| p.t_ms <= end_ms);
                to.checked_sub(1).and_then(|i| self.points.get(i)).copied()
            }
        }
    }
}

/// What a selection from the history asks for.
pub struct Selection<'a, K> {
    /// Only this metric's series (a direct lookup); `None` walks every metric.
    pub name: Option<&'a str>,
    /// `(label, value)` pairs (values not empty) that every accepted series has: the
    /// candidates are then looked up rather than `keep` asked of each of the metric's series.
    pub equal: Vec<(&'a str, &'a str)>,
    /// With `name`, what `keep` accepts (the same key must always mean the same filter): the
    /// series it accepted are remembered until the metric's set of series changes, so a
    /// selection evaluated every tick tests its matchers only when series come or go
    /// (Prometheus's postings do the same work once per block).
    pub key: Option<String>,
    /// Whether a series (metric name, label set without it) is selected.
    pub keep: K,
}

/// A metric's series by label name and value, for equality matchers.
type Postings = HashMap<String, HashMap<String, Vec<Labels>>>;

/// What the history knows of one metric's series set, built on first need and dropped when
/// that set changes (rarely: series come and go far less often than rules are evaluated).
#[derive(Default)]
struct MetricIndex {
    postings: Option<Postings>,
    /// The series each selection (by its key) accepted.
    selections: HashMap<String, Vec<Labels>>,
}

/// At most this many selections per metric are remembered.
const SELECTIONS_PER_METRIC: usize = 256;

/// Metrics with more series than this get postings when an equality matcher selects from them.
const POSTINGS_FROM: usize = 16;

fn postings(series: &HashMap<Labels, Series>) -> Postings {
    let mut p = Postings::default();
    for labels in series.keys() {
        for (k, v) in labels.iter() {
            p.entry(k.to_owned())
                .or_default()
                .entry(v.to_owned())
                .or_default()
                .push(labels.clone());
        }
    }
    p
}

/// Bounded history: for each metric name and label set, its points within the retention.
struct History {
    retention_ms: i64,
    by_name: HashMap<String, HashMap<Labels, Series>>,
    /// Postings and remembered selections, by metric.
    index: HashMap<String, MetricIndex>,
    /// The series each collector published last time, to mark the ones it stops publishing.
    by_collector: HashMap<String, HashSet<(String, Labels)>>,
    /// Series and points held, kept up to date to publish them without a walk.
    series: usize,
    points: usize,
}

impl History {
    fn new(retention: Duration) -> Self {
        History {
            retention_ms: i64::try_from(retention.as_millis()).unwrap_or(i64::MAX),
            by_name: HashMap::default(),
            index: HashMap::default(),
            by_collector: HashMap::default(),
            series: 0,
            points: 0,
        }
    }

    fn append(&mut self, collector: &str, families: &[Family], at_ms: i64) {
        let mut now_present: HashSet<(String, Labels)> = HashSet::default();
        for family in families {
            for sample in &family.samples {
                self.push(
                    &family.name,
                    &sample.labels,
                    Point {
                        t_ms: at_ms,
                        v: sample.value,
                    },
                );
                now_present.insert((family.name.clone(), sample.labels.clone()));
            }
        }
        self.end_gone(collector, now_present, at_ms);
    }

    fn append_scraped(&mut self, collector: &str, points: &[Scraped], at_ms: i64) {
        let mut now_present: HashSet<(String, Labels)> = HashSet::default();
        for p in points {
            self.push(
                &p.name,
                &p.labels,
                Point {
                    t_ms: p.t_ms.unwrap_or(at_ms),
                    v: p.value,
                },
            );
            if p.t_ms.is_none() {
                now_present.insert((p.name.clone(), p.labels.clone()));
            }
        }
        self.end_gone(collector, now_present, at_ms);
    }

    /// Marks stale the series `collector` had last time and not in `now_present`, remembers
    /// `now_present` for next time, and drops what is past the retention.
    fn end_gone(&mut self, collector: &str, now_present: HashSet<(String, Labels)>, at_ms: i64) {
        let before = self
            .by_collector
            .insert(collector.to_owned(), now_present.clone())
            .unwrap_or_default();
        for (name, labels) in before.difference(&now_present) {
            self.push(
                name,
                labels,
                Point {
                    t_ms: at_ms,
                    v: f64::from_bits(STALE_NAN_BITS),
                },
            );
        }
        self.prune(at_ms);
    }

    fn push(&mut self, name: &str, labels: &Labels, point: Point) {
        let by_labels = match self.by_name.get_mut(name) {
            Some(m) => m,
            None => self.by_name.entry(name.to_owned()).or_default(),
        };
        let series = match by_labels.get_mut(labels) {
            Some(s) => s,
            None => {
                self.series += 1;
                self.index.remove(name);
                let full = Labels::with_name(labels, name);
                by_labels.entry(labels.clone()).or_insert(Series {
                    full,
                    points: VecDeque::new(),
                })
            }
        };
        // Time only moves forward within a series; an older point would break range reads.
        if series
            .points
            .back()
            .is_some_and(|last| last.t_ms >= point.t_ms)
        {
            return;
        }
        series.points.push_back(point);
        self.points += 1;
    }

    /// Drops points older than the retention, and series left with none.
    fn prune(&mut self, now_ms: i64) {
        let cutoff = now_ms.saturating_sub(self.retention_ms);
        let (mut series_gone, mut points_gone) = (0, 0);
        let index = &mut self.index;
        self.by_name.retain(|name, by_labels| {
            let before = by_labels.len();
            by_labels.retain(|_, s| {
                while s.points.front().is_some_and(|p| p.t_ms < cutoff) {
                    s.points.pop_front();
                    points_gone += 1;
                }
                let keep = !s.points.is_empty();
                if !keep {
                    series_gone += 1;
                }
                keep
            });
            if by_labels.len() != before {
                index.remove(name);
            }
            !by_labels.is_empty()
        });
        self.series -= series_gone;
        self.points -= points_gone;
    }
}

/// The exporter's own metrics, encoded live at each scrape.
struct SelfMetrics {
    registry: prometheus::Registry,
    collector_up: GaugeVec,
    collector_duration: GaugeVec,
    collector_last_success: GaugeVec,
    collector_failures: IntCounterVec,
    history_series: Gauge,
    history_points: Gauge,
}

impl SelfMetrics {
    fn new() -> Result<Self, prometheus::Error> {
        let registry = prometheus::Registry::new();
        let build_info = GaugeVec::new(
            Opts::new(
                "autotuner_build_info",
                "A metric with a constant '1' value labelled by version, revision and rustc version of the build.",
            ),
            &["version", "revision", "rustversion"],
        )?;
        build_info
            .with_label_values(&[
                env!("CARGO_PKG_VERSION"),
                env!("AUTOTUNER_REVISION"),
                env!("AUTOTUNER_RUSTC_VERSION"),
            ])
            .set(1.0);
        let collector_up = GaugeVec::new(
            Opts::new(
                "autotuner_collector_up",
                "Whether the collector's last run succeeded (1) or failed or timed out (0).",
            ),
            &["collector"],
        )?;
        let collector_duration = GaugeVec::new(
            Opts::new(
                "autotuner_collector_duration_seconds",
                "How long the collector's last run took.",
            ),
            &["collector"],
        )?;
        let collector_last_success = GaugeVec::new(
            Opts::new(
                "autotuner_collector_last_success_timestamp_seconds",
                "When the collector last succeeded, in seconds since the Unix epoch.",
            ),
            &["collector"],
        )?;
        let collector_failures = IntCounterVec::new(
            Opts::new(
                "autotuner_collector_failures_total",
                "Collector runs that failed or timed out.",
            ),
            &["collector"],
        )?;
        let history_series = Gauge::new(
            "autotuner_history_series",
            "Series held in the in-memory history that rules read.",
        )?;
        let history_points = Gauge::new(
            "autotuner_history_points",
            "Points held in the in-memory history that rules read.",
        )?;
        registry.register(Box::new(build_info))?;
        registry.register(Box::new(collector_up.clone()))?;
        registry.register(Box::new(collector_duration.clone()))?;
        registry.register(Box::new(collector_last_success.clone()))?;
        registry.register(Box::new(collector_failures.clone()))?;
        registry.register(Box::new(history_series.clone()))?;
        registry.register(Box::new(history_points.clone()))?;
        // The process collector exists only on Linux; elsewhere it has nothing to report.
        let process = prometheus::process_collector::ProcessCollector::for_self();
        if !process.desc().is_empty() {
            registry.register(Box::new(process))?;
        }
        Ok(SelfMetrics {
            registry,
            collector_up,
            collector_duration,
            collector_last_success,
            collector_failures,
            history_series,
            history_points,
        })
    }
}

// A panic while holding one of these locks is a bug elsewhere; the data behind them stays
// consistent between statements, so serving it is better than refusing every later scrape.
fn read<T>(lock: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    lock.read().unwrap_or_else(PoisonError::into_inner)
}

fn write<T>(lock: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    lock.write().unwrap_or_else(PoisonError::into_inner)
}

fn lock<T>(lock: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    lock.lock().unwrap_or_else(PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sample::Families;

    fn fams(values: &[(&str, &str, f64)]) -> Vec<Family> {
        let mut f = Families::new();
        for (name, dev, v) in values {
            f.gauge(name, "help", &[("device", dev)], *v);
        }
        f.into_vec()
    }

    #[test]
    fn range_reads_in_place_agree_with_copies_while_the_buffer_wraps() {
        // 10 s kept, a point a second: from the 11th on, each publish drops the oldest point
        // and appends one, so the ring buffer holding the points wraps around again and again.
        let r = Registry::new(Duration::from_secs(10)).unwrap();
        let keep = |_: &str, _: &Labels| true;
        let (mut pieces, mut reads) = (0, 0);
        for at in 0..60i64 {
            r.publish("a", fams(&[("m", "x", at as f64)]), at * 1_000);
            for (start, end) in [
                (0, i64::MAX),
                (at * 1_000 - 4_000, at * 1_000),
                (at * 1_000 - 9_500, at * 1_000 - 2_000),
            ] {
                let sel = |key: Option<&str>| Selection {
                    name: Some("m"),
                    equal: vec![],
                    key: key.map(str::to_owned),
                    keep,
                };
                let copied = r.select(&sel(None), start, end);
                let mut read = Vec::new();
                r.each_range(&sel(Some("all")), start, end, &mut |l, p| {
                    read.push((l.clone(), p.to_vec()))
                });
                assert_eq!(
                    format!("{read:?}"),
                    format!("{copied:?}"),
                    "at {at} s, [{start}, {end}]"
                );
                reads += 1;
            }
            let history = lock(&r.history);
            if let Some(s) = history.by_name.get("m").and_then(|m| m.values().next())
                && !s.points.as_slices().1.is_empty()
            {
                pieces += 1;
            }
        }
        // The case this is about happened: the points were held in two pieces.
        assert!(
            pieces > 10,
            "the buffer wrapped {pieces} times in {reads} reads"
        );
    }

    fn gunzip(bytes: &[u8]) -> String {
        use std::io::Read as _;
        let mut text = String::new();
        // A single gzip member: a reader that stops after the first one sees it all.
        flate2::read::GzDecoder::new(bytes)
            .read_to_string(&mut text)
            .unwrap();
        text
    }

    /// The exposition without the exporter's own metrics, which change from call to call.
    fn collected(text: &str) -> String {
        text.lines()
            .filter(|l| !l.contains("autotuner_") && !l.contains("process_"))
            .collect::<Vec<_>>()
            .join("\n")
    }

    #[test]
    fn gzip_is_the_plain_exposition_and_follows_each_published_body() {
        let r = Registry::new(Duration::from_secs(600)).unwrap();
        r.publish("a", fams(&[("m", "x", 1.0), ("m", "y", 2.0)]), 1_000);
        let (plain, gz) = (r.render(), gunzip(&r.render_gzip().unwrap()));
        assert_eq!(collected(&gz), collected(&plain));
        assert!(gz.contains("m{device=\"x\"} 1\n"), "{gz}");
        // The own metrics come after the collected part, in the same member.
        assert!(gz.contains("# TYPE autotuner_"), "{gz}");
        // Asked again, the kept compression serves; a new body is compressed anew.
        assert_eq!(
            collected(&gunzip(&r.render_gzip().unwrap())),
            collected(&plain)
        );
        r.publish("a", fams(&[("m", "x", 5.0)]), 2_000);
        let gz = gunzip(&r.render_gzip().unwrap());
        assert_eq!(collected(&gz), collected(&r.render()));
        assert!(
            gz.contains("m{device=\"x\"} 5\n") && !gz.contains("device=\"y\""),
            "{gz}"
        );
    }

    #[test]
    fn render_merges_families_shared_by_collectors() {
        let r = Registry::new(Duration::from_secs(600)).unwrap();
        r.publish("a", fams(&[("m", "x", 1.0)]), 1_000);
        r.publish("b", fams(&[("m", "y", 2.0), ("m", "x", 9.0)]), 1_000);
        let text = r.render();
        assert_eq!(text.matches("# TYPE m gauge").count(), 1, "{text}");
        assert!(text.contains("m{device=\"x\"} 1\n"), "{text}");
        assert!(text.contains("m{device=\"y\"} 2\n"), "{text}");
        assert!(!text.contains("m{device=\"x\"} 9"), "{text}");
        assert!(text.contains("autotuner_build_info{"), "{text}");
    }

    #[test]
    fn history_is_bounded_by_retention() {
        let r = Registry::new(Duration::from_secs(10)).unwrap();
        for i in 0..100 {
            r.publish("a", fams(&[("m", "x", i as f64)]), i * 1_000);
        }
        // Points from 89 s to 99 s inclusive survive.
        let got = r.range("m", 0, 1_000_000);
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].1.len(), 11);
        assert_eq!(got[0].1[0].v, 89.0);
        assert_eq!(r.history_size(), (1, 11));
    }

    #[test]
    fn lookups_by_label_see_series_come_and_go() {
        let r = Registry::new(Duration::from_secs(10)).unwrap();
        let devices: Vec<String> = (0..40).map(|i| format!("d{i}")).collect();
        let publish = |n: usize, at: i64| {
            let v: Vec<(&str, &str, f64)> = devices[..n]
                .iter()
                .map(|d| ("m", d.as_str(), 1.0))
                .collect();
            r.publish("a", fams(&v), at);
        };
        let find = |device: &str| {
            let keep = |_: &str, l: &Labels| l.get("device") == Some(device);
            let sel = |equal, key| Selection {
                name: Some("m"),
                equal,
                key,
                keep,
            };
            let by_lookup = r.select_last(&sel(vec![("device", device)], None), 0, i64::MAX);
            let by_walk = r.select_last(&sel(vec![], None), 0, i64::MAX);
            assert_eq!(format!("{by_lookup:?}"), format!("{by_walk:?}"), "{device}");
            // Remembered selections (asked twice: the second answer is the remembered one)
            // see the same series come and go.
            let key = format!("device={device}");
            for _ in 0..2 {
                let by_key = r.select_last(&sel(vec![], Some(key.clone())), 0, i64::MAX);
                assert_eq!(format!("{by_key:?}"), format!("{by_walk:?}"), "{device}");
            }
            by_lookup.len()
        };
        publish(30, 1_000);
        assert_eq!(find("d3"), 1);
        assert_eq!(find("d35"), 0);
        assert_eq!(find("nope"), 0);
        // A new series after the lookup table was built is found; an expired one is not.
        publish(40, 2_000);
        assert_eq!(find("d35"), 1);
        // (The others get a stale marker at 30 s, pruned with everything else by 50 s.)
        r.publish("a", fams(&[("m", "d1", 1.0)]), 30_000);
        r.publish("a", fams(&[("m", "d1", 1.0)]), 50_000);
        assert_eq!(find("d3"), 0);
        assert_eq!(find("d1"), 1);
    }

    #[test]
    fn vanished_series_get_a_stale_marker_then_expire() {
        let r = Registry::new(Duration::from_secs(10)).unwrap();
        r.publish("a", fams(&[("m", "x", 1.0), ("m", "y", 1.0)]), 1_000);
        r.publish("a", fams(&[("m", "x", 2.0)]), 2_000);
        let got = r.range("m", 0, 10_000);
        let y = &got
            .iter()
            .find(|(l, _)| l.get("device") == Some("y"))
            .unwrap()
            .1;
        assert_eq!(y.len(), 2);
        assert!(is_stale_marker(y[1].v));
        // Not marked twice, and gone after the retention.
        r.publish("a", fams(&[("m", "x", 3.0)]), 3_000);
        r.publish("a", fams(&[("m", "x", 4.0)]), 20_000);
        let got = r.range("m", 0, 100_000);
        assert_eq!(got.len(), 1);
        assert_eq!(r.history_size(), (1, 1));
    }

    #[test]
    fn readiness_waits_for_every_expected_collector() {
        let r = Registry::new(Duration::from_secs(10)).unwrap();
        r.expect_collectors(&["a", "b"]);
        assert!(!r.is_ready());
        let ok = Attempt {
            duration: Duration::from_millis(3),
            finished_ms: 1,
            error: None,
        };
        r.record_attempt("a", &ok);
        assert!(!r.is_ready());
        r.record_attempt(
            "b",
            &Attempt {
                error: Some("down".into()),
                ..ok
            },
        );
        assert!(r.is_ready());
        let b = r.collectors().into_iter().find(|c| c.name == "b").unwrap();
        assert!(!b.up);
        assert_eq!(b.last_error.as_deref(), Some("down"));
        let text = r.render();
        assert!(
            text.contains("autotuner_collector_up{collector=\"b\"} 0"),
            "{text}"
        );
        assert!(
            text.contains("autotuner_collector_failures_total{collector=\"b\"} 1"),
            "{text}"
        );
    }
}
