//! The rule engine: evaluates every loaded rule on its group's interval over the registry, keeps
//! the state of each rule and label set, requests actions on the firing edge, publishes its own
//! metrics, persists its state, and reloads the rules directory all-or-nothing.
//!
//! Uses `compile` (the rules), `expr` (evaluation), `state` (transitions), `registry` (read only
//! for samples; the engine registers its own metrics there) and `actions::ActionSpec`. The
//! requests it makes go out on a channel: the actions stage takes them from there.
//!
//! Reload is one function, `reload`, called by the file watcher (debounced), SIGHUP and
//! `POST /-/reload`. It compiles every file aside; on any error the running set stays, the
//! errors are kept for the API, and `autotuner_rules_last_reload_successful` goes to 0. On
//! success the new set replaces the old at once; rules whose definition did not change keep
//! their pending and firing state.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use prometheus::{Gauge, GaugeVec, IntCounterVec, Opts};
use rustc_hash::{FxHashMap as HashMap, FxHashSet as HashSet};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

use super::compile::{self, Problem, Rule};
use super::expr::{Evaluator, Memo, SeriesSource, Value};
use super::file::{Mode, OnAbsent};
use super::state::{self, Observed, State};
use crate::actions::Event;
use crate::registry::Registry;
use crate::sample::Labels;

pub use crate::actions::ActionRequest;

/// One instance of a rule, as the API shows it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Instance {
    /// Its labels.
    pub labels: BTreeMap<String, String>,
    /// Its state.
    #[serde(flatten)]
    pub state: State,
    /// The condition's last value for it.
    pub value: Option<f64>,
}

/// A rule's status, as the API shows it.
#[derive(Debug, Clone, Serialize)]
pub struct RuleStatus {
    /// The rule.
    pub name: String,
    /// Its group.
    pub group: String,
    /// Its file.
    pub file: String,
    /// Its condition.
    pub expr: String,
    /// Its exit condition.
    pub clear: Option<String>,
    /// `ok`, `err`, or `unknown` before its first evaluation.
    pub health: &'static str,
    /// The last evaluation's error.
    pub last_error: Option<String>,
    /// When it was last evaluated (ms since the epoch).
    pub last_evaluation_ms: Option<i64>,
    /// How long that took, in seconds.
    pub evaluation_seconds: f64,
    /// Its pending and firing instances.
    pub instances: Vec<Instance>,
    /// The mode it acts in (before the global cap).
    pub mode: Mode,
    /// Whether that mode was set through the admin API rather than in its file.
    pub mode_overridden: bool,
    /// Its action kinds.
    pub actions: Vec<String>,
}

/// The engine's view of the last reload.
#[derive(Debug, Clone, Serialize, Default)]
pub struct ReloadStatus {
    /// Whether the last reload succeeded.
    pub success: bool,
    /// When it happened (ms since the epoch).
    pub at_ms: i64,
    /// Its errors, `FILE:LINE:COL: message`.
    pub errors: Vec<String>,
    /// Its warnings.
    pub warnings: Vec<String>,
    /// A hash of the loaded rule set, to tell two deployments apart.
    pub hash: String,
}

/// Per-rule run-time state.
#[derive(Debug, Default)]
pub(crate) struct Runtime {
    /// Each instance's state and last value.
    pub(crate) instances: HashMap<Labels, (State, f64)>,
    /// Whether a state changed since the state file was last written (values alone do not
    /// count: they are informational there).
    dirty: bool,
    last_error: Option<String>,
    last_evaluation_ms: Option<i64>,
    evaluation_seconds: f64,
}

struct Loaded {
    rules: Vec<Rule>,
    runtime: HashMap<String, Runtime>,
    reload: ReloadStatus,
    /// The selections, aggregations and calls written in more than one place, worth keeping
    /// for the rest of a tick, and the rules that use any of them.
    shared: Arc<HashSet<String>>,
    sharing: HashSet<String>,
}

/// What the rules have in common (see `Loaded::shared`).
fn sharing(rules: &[Rule]) -> (Arc<HashSet<String>>, HashSet<String>) {
    let mut count: HashMap<String, usize> = HashMap::default();
    let keys: Vec<Vec<String>> = rules
        .iter()
        .map(|r| {
            let mut k = r.expr.memo_keys();
            if let Some(c) = &r.clear {
                k.extend(c.memo_keys());
            }
            k
        })
        .collect();
    for k in keys.iter().flatten() {
        *count.entry(k.clone()).or_default() += 1;
    }
    let shared: HashSet<String> = count
        .into_iter()
        .filter_map(|(k, n)| (n > 1).then_some(k))
        .collect();
    let sharing = rules
        .iter()
        .zip(&keys)
        .filter(|(_, k)| k.iter().any(|k| shared.contains(k)))
        .map(|(r, _)| r.name.clone())
        .collect();
    (Arc::new(shared), sharing)
}

/// The engine.
pub struct Engine {
    registry: Arc<Registry>,
    dir: PathBuf,
    state_file: Option<PathBuf>,
    inner: Mutex<Loaded>,
    requests: mpsc::Sender<ActionRequest>,
    metrics: Metrics,
    /// Whether the loaded rules were checked against what the collectors publish (once the
    /// first collection round is in; again after each reload).
    names_checked: std::sync::atomic::AtomicBool,
    /// What was last written to the state file: unchanged state is not written (and fsynced)
    /// again every tick.
    last_persisted: Mutex<Vec<u8>>,
    /// Modes set through the admin API, by rule, overriding the files' (persisted in
    /// `modes.json`; the files stay the source of truth for everything else).
    modes: Mutex<BTreeMap<String, Mode>>,
    modes_file: Option<PathBuf>,
}

/// A sample as the API shows it.
#[derive(Debug, Clone, Serialize)]
pub struct PartSample {
    /// Its labels.
    pub labels: BTreeMap<String, String>,
    /// Its value.
    pub value: f64,
}

/// One part of a condition and what it returns now.
#[derive(Debug, Clone, Serialize)]
pub struct Part {
    /// The part, as PromQL.
    pub expr: String,
    /// Its samples now (a scalar is one sample without labels).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub samples: Option<Vec<PartSample>>,
    /// Why it could not be evaluated.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// Why a rule is (or is not) firing: each condition and its operands, evaluated now.
#[derive(Debug, Clone, Serialize)]
pub struct Explanation {
    /// When it was evaluated (ms).
    pub at_ms: i64,
    /// The whole condition, then its operands.
    pub expr: Vec<Part>,
    /// The exit condition, then its operands.
    pub clear: Vec<Part>,
}

struct Metrics {
    state: GaugeVec,
    duration: GaugeVec,
    failures: IntCounterVec,
    requests: IntCounterVec,
    loaded: Gauge,
    reload_ok: Gauge,
    reload_ts: Gauge,
}

impl Metrics {
    fn new(registry: &Registry) -> Result<Self, prometheus::Error> {
        let m = Metrics {
            state: GaugeVec::new(
                Opts::new(
                    "autotuner_rule_state",
                    "Instances of the rule in each state (pending, firing).",
                ),
                &["rule", "state"],
            )?,
            duration: GaugeVec::new(
                Opts::new(
                    "autotuner_rule_evaluation_duration_seconds",
                    "How long the rule's last evaluation took.",
                ),
                &["rule"],
            )?,
            failures: IntCounterVec::new(
                Opts::new(
                    "autotuner_rule_evaluation_failures_total",
                    "Evaluations of the rule that failed.",
                ),
                &["rule"],
            )?,
            requests: IntCounterVec::new(
                Opts::new(
                    "autotuner_rule_action_requests_total",
                    "Times the rule requested its actions (firing edges and repeats).",
                ),
                &["rule"],
            )?,
            loaded: Gauge::new("autotuner_rules_loaded", "Rules loaded.")?,
            reload_ok: Gauge::new(
                "autotuner_rules_last_reload_successful",
                "Whether the last rule reload succeeded (1) or kept the previous rules (0).",
            )?,
            reload_ts: Gauge::new(
                "autotuner_rules_last_reload_timestamp_seconds",
                "When the rules were last reloaded, successfully or not.",
            )?,
        };
        registry.register(Box::new(m.state.clone()))?;
        registry.register(Box::new(m.duration.clone()))?;
        registry.register(Box::new(m.failures.clone()))?;
        registry.register(Box::new(m.requests.clone()))?;
        registry.register(Box::new(m.loaded.clone()))?;
        registry.register(Box::new(m.reload_ok.clone()))?;
        registry.register(Box::new(m.reload_ts.clone()))?;
        Ok(m)
    }
}

/// What is persisted: each rule's instances, with a fingerprint of its definition so a changed
/// rule does not inherit the state of its former self.
#[derive(Debug, Serialize, Deserialize, Default)]
struct Persisted {
    rules: BTreeMap<String, PersistedRule>,
}

#[derive(Debug, Serialize, Deserialize)]
struct PersistedRule {
    fingerprint: String,
    instances: Vec<Instance>,
}

impl Engine {
    /// An engine over the rules in `dir`, persisting its state in `data_dir` (if given), sending
    /// requests on `requests`. Loads the rules once; an error there leaves it with none.
    pub fn new(
        registry: Arc<Registry>,
        dir: PathBuf,
        data_dir: Option<&Path>,
        requests: mpsc::Sender<ActionRequest>,
    ) -> Result<Arc<Self>, prometheus::Error> {
        let metrics = Metrics::new(&registry)?;
        let engine = Arc::new(Engine {
            registry,
            dir,
            state_file: data_dir.map(|d| d.join("rule_state.json")),
            inner: Mutex::new(Loaded {
                rules: Vec::new(),
                runtime: HashMap::default(),
                reload: ReloadStatus::default(),
                shared: Arc::default(),
                sharing: HashSet::default(),
            }),
            requests,
            metrics,
            last_persisted: Mutex::new(Vec::new()),
            names_checked: std::sync::atomic::AtomicBool::new(false),
            modes: Mutex::new(
                data_dir
                    .and_then(|d| std::fs::read(d.join("modes.json")).ok())
                    .and_then(|b| serde_json::from_slice(&b).ok())
                    .unwrap_or_default(),
            ),
            modes_file: data_dir.map(|d| d.join("modes.json")),
        });
        let _ = engine.reload();
        engine.restore();
        Ok(engine)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Loaded> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Reloads the rules directory, all or nothing. Returns the number of rules loaded, or the
    /// errors (the running rules are kept).
    pub fn reload(&self) -> Result<usize, Vec<String>> {
        let now = crate::collect::now_ms();
        let files = match compile::rule_files(&self.dir) {
            Ok(f) => f,
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(err) => {
                let errors = vec![format!(
                    "{}: reading the rules directory: {err}",
                    self.dir.display()
                )];
                return Err(self.failed(errors, Vec::new(), now));
            }
        };
        let loaded = compile::load_files(&files);
        let text = |p: &[Problem]| p.iter().map(ToString::to_string).collect::<Vec<_>>();
        if !loaded.errors.is_empty() {
            return Err(self.failed(text(&loaded.errors), text(&loaded.warnings), now));
        }
        let mut inner = self.lock();
        let old: HashMap<String, String> = inner
            .rules
            .iter()
            .map(|r| (r.name.clone(), fingerprint(r)))
            .collect();
        let mut runtime = std::mem::take(&mut inner.runtime);
        let mut next = HashMap::default();
        for r in &loaded.rules {
            let keep = old.get(&r.name).is_some_and(|f| *f == fingerprint(r));
            let rt = if keep {
                runtime.remove(&r.name).unwrap_or_default()
            } else {
                Runtime::default()
            };
            next.insert(r.name.clone(), rt);
        }
        // The set changed: the next tick writes the state file afresh (gone rules drop out).
        if let Some(rt) = next.values_mut().next() {
            rt.dirty = true;
        }
        // Series of rules that are gone must not linger on /metrics.
        for gone in runtime.keys() {
            for s in ["pending", "firing"] {
                let _ = self.metrics.state.remove_label_values(&[gone, s]);
            }
            let _ = self.metrics.duration.remove_label_values(&[gone]);
        }
        // A range or offset reaching past the history is computed on whatever is left of it.
        let retention = self.registry.retention();
        let mut warnings = text(&loaded.warnings);
        for r in &loaded.rules {
            let reach = r.expr.lookback_needed().max(
                r.clear
                    .as_ref()
                    .map_or(Duration::ZERO, |c| c.lookback_needed()),
            );
            if reach > retention {
                warnings.push(format!(
                    "{}:{}: rule {:?} reads {}s back, more than the history keeps ({}s, history.retention)",
                    r.source.display(),
                    r.line,
                    r.name,
                    reach.as_secs(),
                    retention.as_secs()
                ));
            }
        }
        let count = loaded.rules.len();
        let hash = set_hash(&loaded.rules);
        (inner.shared, inner.sharing) = sharing(&loaded.rules);
        inner.rules = loaded.rules;
        inner.runtime = next;
        inner.reload = ReloadStatus {
            success: true,
            at_ms: now,
            errors: Vec::new(),
            warnings: warnings.clone(),
            hash,
        };
        drop(inner);
        for w in &warnings {
            tracing::warn!(warning = %w, "rule warning");
        }
        self.names_checked
            .store(false, std::sync::atomic::Ordering::Relaxed);
        self.metrics.loaded.set(count as f64);
        self.metrics.reload_ok.set(1.0);
        self.metrics.reload_ts.set(now as f64 / 1000.0);
        tracing::info!(rules = count, dir = %self.dir.display(), "rules loaded");
        Ok(count)
    }

    fn failed(&self, errors: Vec<String>, warnings: Vec<String>, now: i64) -> Vec<String> {
        for e in &errors {
            tracing::error!(error = %e, "rule reload failed; keeping the running rules");
        }
        let mut inner = self.lock();
        inner.reload = ReloadStatus {
            success: false,
            at_ms: now,
            errors: errors.clone(),
            warnings,
            hash: inner.reload.hash.clone(),
        };
        self.metrics.reload_ok.set(0.0);
        self.metrics.reload_ts.set(now as f64 / 1000.0);
        errors
    }

    fn modes(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Mode>> {
        self.modes.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Sets (or, with `None`, clears) a rule's mode override. `Err` when there is no such rule.
    pub fn set_mode(&self, rule: &str, mode: Option<Mode>) -> Result<(), String> {
        if !self.lock().rules.iter().any(|r| r.name == rule) {
            return Err(format!("no rule named {rule:?}"));
        }
        let bytes = {
            let mut modes = self.modes();
            match mode {
                Some(m) => modes.insert(rule.to_owned(), m),
                None => modes.remove(rule),
            };
            serde_json::to_vec(&*modes).unwrap_or_default()
        };
        if let Some(path) = &self.modes_file
            && let Err(err) = write_atomically(path, &bytes)
        {
            tracing::warn!(error = %err, path = %path.display(), "persisting mode overrides failed");
        }
        Ok(())
    }

    /// Evaluates a rule's conditions and their operands now: "why is it (not) firing?".
    pub fn explain(&self, rule: &str) -> Option<Explanation> {
        let (expr, clear) = {
            let inner = self.lock();
            let r = inner.rules.iter().find(|r| r.name == rule)?;
            (r.expr.clone(), r.clear.clone())
        };
        let now = crate::collect::now_ms();
        let ev = Evaluator::new(self.registry.as_ref(), now);
        let eval = |q: &super::expr::Query| {
            let result = ev.eval(q).map(|v| match v {
                Value::Scalar(x) => vec![PartSample {
                    labels: BTreeMap::new(),
                    value: x,
                }],
                Value::Vector(v) => v
                    .into_iter()
                    .map(|s| PartSample {
                        labels: s
                            .labels
                            .iter()
                            .map(|(k, v)| (k.to_owned(), v.to_owned()))
                            .collect(),
                        value: s.value,
                    })
                    .collect(),
                Value::Matrix(_) => Vec::new(),
            });
            match result {
                Ok(samples) => Part {
                    expr: q.text.clone(),
                    samples: Some(samples),
                    error: None,
                },
                Err(e) => Part {
                    expr: q.text.clone(),
                    samples: None,
                    error: Some(e),
                },
            }
        };
        let all = |q: &super::expr::Query| -> Vec<Part> {
            std::iter::once(eval(q))
                .chain(q.parts().iter().map(eval))
                .collect()
        };
        Some(Explanation {
            at_ms: now,
            expr: all(&expr),
            clear: clear.as_ref().map(all).unwrap_or_default(),
        })
    }

    /// The last reload's outcome.
    pub fn reload_status(&self) -> ReloadStatus {
        self.lock().reload.clone()
    }

    /// Every rule's status.
    pub fn status(&self) -> Vec<RuleStatus> {
        let modes = self.modes().clone();
        let inner = self.lock();
        inner
            .rules
            .iter()
            .map(|r| {
                let rt = inner.runtime.get(&r.name);
                let mut instances: Vec<Instance> = rt
                    .map(|rt| {
                        rt.instances
                            .iter()
                            .map(|(l, (s, v))| instance(l, *s, *v))
                            .collect()
                    })
                    .unwrap_or_default();
                instances.sort_by(|a, b| a.labels.cmp(&b.labels));
                RuleStatus {
                    name: r.name.clone(),
                    group: r.group.clone(),
                    file: r.source.display().to_string(),
                    expr: r.expr.text.clone(),
                    clear: r.clear.as_ref().map(|q| q.text.clone()),
                    health: match rt {
                        Some(rt) if rt.last_error.is_some() => "err",
                        Some(rt) if rt.last_evaluation_ms.is_some() => "ok",
                        _ => "unknown",
                    },
                    last_error: rt.and_then(|rt| rt.last_error.clone()),
                    last_evaluation_ms: rt.and_then(|rt| rt.last_evaluation_ms),
                    evaluation_seconds: rt.map_or(0.0, |rt| rt.evaluation_seconds),
                    instances,
                    mode: modes
                        .get(&r.name)
                        .copied()
                        .or(r.mode)
                        .unwrap_or(Mode::DryRun),
                    mode_overridden: modes.contains_key(&r.name),
                    actions: r.actions.iter().map(|a| a.kind().to_owned()).collect(),
                }
            })
            .collect()
    }

    /// Evaluates every rule that is due at `now_ms`. Returns how many were evaluated.
    pub fn tick(&self, now_ms: i64) -> usize {
        self.tick_where(now_ms, false)
    }

    /// Evaluates every rule at `now_ms`, due or not (benchmarks, and on-demand runs).
    pub fn tick_all(&self, now_ms: i64) -> usize {
        self.tick_where(now_ms, true)
    }

    /// Warns (in the log and the reload status) about metrics the rules name that no running
    /// collector publishes: usually a typo, or a collector that is not configured.
    fn check_names(&self) {
        use std::sync::atomic::Ordering;
        if self.names_checked.load(Ordering::Relaxed) || !self.registry.is_ready() {
            return;
        }
        self.names_checked.store(true, Ordering::Relaxed);
        let now = crate::collect::now_ms();
        let retention = i64::MAX / 2;
        let mut inner = self.lock();
        let mut warnings = Vec::new();
        for r in &inner.rules {
            let mut names = r.expr.metric_names();
            if let Some(c) = &r.clear {
                names.extend(c.metric_names());
            }
            names.sort();
            names.dedup();
            for n in names {
                if self.registry.range(&n, now - retention, now).is_empty() {
                    warnings.push(format!(
                        "{}:{}: rule {:?} reads {n}, which no running collector publishes",
                        r.source.display(),
                        r.line,
                        r.name
                    ));
                }
            }
        }
        for w in &warnings {
            tracing::warn!(warning = %w, "rule reads an unpublished metric");
        }
        inner.reload.warnings.extend(warnings);
    }

    fn tick_where(&self, now_ms: i64, all: bool) -> usize {
        self.check_names();
        let mut inner = self.lock();
        let Loaded {
            rules,
            runtime,
            shared,
            sharing,
            ..
        } = &mut *inner;
        let mut evaluated = 0;
        let mut requests = Vec::new();
        // Rules evaluated together share what they have in common; the others skip the memo.
        let memo = Memo::of(now_ms, shared.clone());
        for rule in rules.iter() {
            let rt = runtime.entry(rule.name.clone()).or_default();
            let due = rt.last_evaluation_ms.is_none_or(|t| {
                now_ms - t >= i64::try_from(rule.interval.as_millis()).unwrap_or(i64::MAX) - 50
            });
            if !due && !all {
                continue;
            }
            evaluated += 1;
            let started = Instant::now();
            let memo = sharing.contains(&rule.name).then_some(&memo);
            match evaluate(&*self.registry, memo, rule, rt, now_ms) {
                Ok(mut r) => {
                    rt.last_error = None;
                    requests.append(&mut r);
                }
                Err(e) => {
                    if rt.last_error.as_deref() != Some(e.as_str()) {
                        tracing::warn!(rule = %rule.name, error = %e, "rule evaluation failed");
                    }
                    rt.last_error = Some(e);
                    self.metrics.failures.with_label_values(&[&rule.name]).inc();
                }
            }
            rt.last_evaluation_ms = Some(now_ms);
            rt.evaluation_seconds = started.elapsed().as_secs_f64();
            self.metrics
                .duration
                .with_label_values(&[&rule.name])
                .set(rt.evaluation_seconds);
            let count = |want: fn(&State) -> bool| {
                rt.instances.values().filter(|(s, _)| want(s)).count() as f64
            };
            self.metrics
                .state
                .with_label_values(&[&rule.name, "pending"])
                .set(count(|s| matches!(s, State::Pending { .. })));
            self.metrics
                .state
                .with_label_values(&[&rule.name, "firing"])
                .set(count(|s| matches!(s, State::Firing { .. })));
        }
        // Only a change of state is worth a write: building and serializing the snapshot every
        // tick would put that work on the evaluation path for nothing.
        let dirty = runtime.values().any(|rt| rt.dirty);
        let snapshot = if dirty {
            runtime.values_mut().for_each(|rt| rt.dirty = false);
            Some(persisted(rules, runtime))
        } else {
            None
        };
        drop(inner);
        let modes = self.modes().clone();
        for mut r in requests {
            if let Some(m) = modes.get(&r.rule) {
                r.mode = Some(*m);
            }
            if r.event != Event::Resolved {
                self.metrics.requests.with_label_values(&[&r.rule]).inc();
            }
            // A full channel means the actions stage is behind; the request is dropped and
            // counted rather than blocking evaluation. It is only the edge that is lost: the
            // rule stays firing and its `repeat`, if any, asks again.
            if let Err(err) = self.requests.try_send(r) {
                tracing::warn!(error = %err, "action request dropped: the actions stage is not keeping up");
            }
        }
        if let (Some(snapshot), Some(path)) = (snapshot, &self.state_file) {
            self.persist(path, &snapshot);
        }
        evaluated
    }

    fn persist(&self, path: &Path, snapshot: &Persisted) {
        let Ok(bytes) = serde_json::to_vec(snapshot) else {
            return;
        };
        let mut last = self
            .last_persisted
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if *last == bytes {
            return;
        }
        match write_atomically(path, &bytes) {
            Ok(()) => *last = bytes,
            Err(err) => {
                tracing::warn!(error = %err, path = %path.display(), "persisting rule state failed")
            }
        }
    }

    /// Restores persisted state for rules whose definition is unchanged.
    fn restore(&self) {
        let Some(path) = &self.state_file else { return };
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => return,
            Err(err) => {
                tracing::warn!(error = %err, path = %path.display(), "reading persisted rule state failed; starting fresh");
                return;
            }
        };
        let saved: Persisted = match serde_json::from_str(&text) {
            Ok(s) => s,
            Err(err) => {
                tracing::warn!(error = %err, path = %path.display(), "persisted rule state unreadable; starting fresh");
                return;
            }
        };
        let mut inner = self.lock();
        let Loaded { rules, runtime, .. } = &mut *inner;
        let mut restored = 0;
        for r in rules.iter() {
            let Some(p) = saved.rules.get(&r.name) else {
                continue;
            };
            if p.fingerprint != fingerprint(r) {
                continue;
            }
            let rt = runtime.entry(r.name.clone()).or_default();
            for i in &p.instances {
                rt.instances.insert(
                    Labels::new(i.labels.clone()),
                    (i.state, i.value.unwrap_or(f64::NAN)),
                );
                restored += 1;
            }
        }
        if restored > 0 {
            tracing::info!(instances = restored, "rule state restored");
        }
    }

    /// Evaluates on every rule's interval until shutdown, and reloads when asked.
    pub async fn run(
        self: Arc<Self>,
        mut reloads: mpsc::Receiver<()>,
        mut shutdown: crate::shutdown::Shutdown,
    ) {
        // One second: the finest group interval we accept; each rule is evaluated when due.
        let mut ticker = tokio::time::interval(Duration::from_secs(1));
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.wait() => break,
                Some(()) = reloads.recv() => {
                    let engine = self.clone();
                    let _ = tokio::task::spawn_blocking(move || engine.reload()).await;
                }
                _ = ticker.tick() => {
                    let engine = self.clone();
                    let _ = tokio::task::spawn_blocking(move || engine.tick(crate::collect::now_ms())).await;
                }
            }
        }
    }
}

/// Evaluates one rule at `now_ms` over `source`, advancing each instance's state, and returns the
/// action requests it makes.
pub(crate) fn evaluate<S: SeriesSource>(
    source: &S,
    memo: Option<&Memo>,
    rule: &Rule,
    rt: &mut Runtime,
    now_ms: i64,
) -> Result<Vec<ActionRequest>, String> {
    let ev = match memo {
        Some(m) => Evaluator::with_memo(source, m),
        None => Evaluator::new(source, now_ms),
    };
    let active = instances(ev.eval(&rule.expr)?, rule)?;
    let clear = match &rule.clear {
        Some(q) => Some(
            instances(ev.eval(q)?, rule)?
                .into_keys()
                .collect::<HashSet<Labels>>(),
        ),
        None => None,
    };
    // No data at all behind the condition: `on_absent` decides.
    let absent = active.is_empty() && !rule.expr.has_data(source, now_ms);
    if absent {
        match rule.on_absent {
            OnAbsent::Hold => return Ok(Vec::new()),
            OnAbsent::Clear => {}
            OnAbsent::Fire => {
                let mut keys: Vec<Labels> = rt.instances.keys().cloned().collect();
                if keys.is_empty() {
                    keys.push(with_rule_labels(&Labels::empty(), rule));
                }
                let forced: HashMap<Labels, f64> =
                    keys.into_iter().map(|k| (k, f64::NAN)).collect();
                return Ok(advance(rule, rt, &forced, None, now_ms));
            }
        }
    }
    Ok(advance(rule, rt, &active, clear.as_ref(), now_ms))
}

fn advance(
    rule: &Rule,
    rt: &mut Runtime,
    active: &HashMap<Labels, f64>,
    clear: Option<&HashSet<Labels>>,
    now_ms: i64,
) -> Vec<ActionRequest> {
    // The instances the condition holds for, then the known ones it no longer holds for (no
    // union is built: most ticks change nothing, and this runs for every instance).
    let gone: Vec<Labels> = rt
        .instances
        .keys()
        .filter(|k| !active.contains_key(*k))
        .cloned()
        .collect();
    let mut requests = Vec::new();
    for key in active.keys().cloned().chain(gone) {
        let (prev, last_value) = rt
            .instances
            .get(&key)
            .copied()
            .unwrap_or((State::Inactive, f64::NAN));
        let value = active.get(&key).copied().unwrap_or(last_value);
        let seen = Observed {
            active: active.contains_key(&key),
            clear: clear.map(|c| c.contains(&key)),
        };
        let step = state::step(prev, seen, now_ms, &rule.timing);
        let request = |event, episode_ms| ActionRequest {
            rule: rule.name.clone(),
            labels: key.clone(),
            value,
            event,
            episode_ms,
            mode: rule.mode,
            cooldown: rule.cooldown,
            allow_destructive: rule.allow_destructive,
            actions: rule.actions.clone(),
            verify: rule.verify.clone(),
            annotations: rule.annotations.clone(),
            rule_version: fingerprint_hash(rule),
            at_ms: now_ms,
            actor: "engine".to_owned(),
        };
        if step.request {
            let (event, episode_ms) = match (prev, step.state) {
                (State::Firing { since_ms, .. }, _) => (Event::Repeat, since_ms),
                (_, State::Firing { since_ms, .. }) => (Event::Firing, since_ms),
                _ => (Event::Firing, now_ms),
            };
            requests.push(request(event, episode_ms));
        }
        // The resolution goes to the actions stage too (alerts it sent are resolved, breaker
        // counts restart), but never executes anything.
        if step.resolved
            && !rule.actions.is_empty()
            && let State::Firing { since_ms, .. } = prev
        {
            requests.push(request(Event::Resolved, since_ms));
        }
        if step.resolved {
            tracing::info!(rule = %rule.name, labels = %key, "rule resolved");
        } else if step.request && !matches!(prev, State::Firing { .. }) {
            tracing::info!(rule = %rule.name, labels = %key, value, "rule firing");
        }
        if step.state != prev {
            rt.dirty = true;
        }
        if matches!(step.state, State::Inactive) {
            rt.instances.remove(&key);
        } else {
            rt.instances.insert(key, (step.state, value));
        }
    }
    requests
}

/// The instances a result stands for: its label sets without `__name__`, plus the rule's labels.
fn instances(value: Value, rule: &Rule) -> Result<HashMap<Labels, f64>, String> {
    match value {
        Value::Vector(v) => Ok(v
            .into_iter()
            .map(|s| (with_rule_labels(&s.labels, rule), s.value))
            .collect()),
        // A scalar condition holds when it is non-zero (`bool` comparisons give 0 or 1).
        Value::Scalar(x) => Ok(if x != 0.0 && !x.is_nan() {
            HashMap::from_iter([(with_rule_labels(&Labels::empty(), rule), x)])
        } else {
            HashMap::default()
        }),
        Value::Matrix(_) => Err("the condition evaluates to a range vector".into()),
    }
}

fn with_rule_labels(labels: &Labels, rule: &Rule) -> Labels {
    let bare = labels.without_name();
    if rule.label_set.is_empty() {
        bare
    } else {
        bare.retain_with(|_| true, &rule.label_set)
    }
}

/// An instance as shown and persisted (a non-finite value, which JSON cannot hold, as none).
fn instance(labels: &Labels, state: State, value: f64) -> Instance {
    Instance {
        labels: labels
            .iter()
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect(),
        state,
        value: value.is_finite().then_some(value),
    }
}

/// What identifies a rule's definition: changed, it starts over.
fn fingerprint(r: &Rule) -> String {
    format!(
        "{}|{:?}|{:?}|{:?}|{:?}",
        r.expr.text,
        r.clear.as_ref().map(|q| &q.text),
        r.timing,
        r.labels,
        r.interval
    )
}

/// A short hash of what a rule says (condition, timing, labels, actions): its version, so a
/// changed rule counts as a new rule for idempotency keys.
fn fingerprint_hash(rule: &Rule) -> String {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    fingerprint(rule).hash(&mut h);
    format!("{:?}", rule.actions).hash(&mut h);
    format!("{:016x}", h.finish())
}

fn set_hash(rules: &[Rule]) -> String {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    for r in rules {
        r.name.hash(&mut h);
        fingerprint(r).hash(&mut h);
        format!("{:?}", r.actions).hash(&mut h);
    }
    format!("{:016x}", h.finish())
}

fn persisted(rules: &[Rule], runtime: &HashMap<String, Runtime>) -> Persisted {
    let mut out = Persisted::default();
    for r in rules {
        let Some(rt) = runtime.get(&r.name) else {
            continue;
        };
        if rt.instances.is_empty() {
            continue;
        }
        out.rules.insert(
            r.name.clone(),
            PersistedRule {
                fingerprint: fingerprint(r),
                instances: rt
                    .instances
                    .iter()
                    .map(|(l, (s, v))| instance(l, *s, *v))
                    .collect(),
            },
        );
    }
    out
}

/// Writes through a temporary file and a rename, so a crash leaves the old file or the new one,
/// never half of one.
fn write_atomically(path: &Path, text: &[u8]) -> std::io::Result<()> {
    use std::io::Write as _;
    let tmp = path.with_extension("json.tmp");
    {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(text)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path)
}

/// Watches `dir` for changes to rule files (editors save by rename, so the directory is
/// watched, not the files) and sends a reload request 250 ms after the last change. Returns
/// the watcher, which must be kept alive.
pub fn watch(
    dir: &Path,
    reloads: mpsc::Sender<()>,
) -> Result<
    notify_debouncer_full::Debouncer<
        notify::RecommendedWatcher,
        notify_debouncer_full::RecommendedCache,
    >,
    notify::Error,
> {
    // An editor's save is a burst of events a few milliseconds long (write a temporary file,
    // rename it over the old one); 100 ms covers it and keeps a saved rule active within about
    // 150 ms (the debouncer looks every quarter of the timeout).
    let mut debouncer = notify_debouncer_full::new_debouncer(
        Duration::from_millis(100),
        None,
        move |result: notify_debouncer_full::DebounceEventResult| {
            let relevant = match &result {
                Ok(events) => events
                    .iter()
                    .any(|e| e.paths.iter().any(|p| compile::is_rule_file(p))),
                Err(_) => true,
            };
            if relevant {
                // A reload already queued covers this change too.
                let _ = reloads.try_send(());
            }
        },
    )?;
    debouncer.watch(dir, notify::RecursiveMode::NonRecursive)?;
    Ok(debouncer)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sample::Families;

    fn publish_memory(r: &Registry, ratio: f64, at_ms: i64) {
        let mut f = Families::new();
        f.gauge("host_memory_usage_ratio", "h", &[], ratio);
        r.publish("host", f.into_vec(), at_ms);
    }

    const RULE: &str = "groups:\n  - name: memory\n    interval: 5s\n    rules:\n      - name: HighMemory\n        expr: host_memory_usage_ratio > 0.8\n        for: 10s\n        clear: host_memory_usage_ratio < 0.7\n        labels: {severity: warning}\n        actions:\n          - redis_memory_purge: {}\n";

    fn setup(
        rules: &str,
    ) -> (
        tempfile::TempDir,
        Arc<Registry>,
        Arc<Engine>,
        mpsc::Receiver<ActionRequest>,
    ) {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("rules")).unwrap();
        std::fs::write(dir.path().join("rules/memory.yml"), rules).unwrap();
        let registry = Arc::new(Registry::new(Duration::from_secs(600)).unwrap());
        let (tx, rx) = mpsc::channel(16);
        let engine = Engine::new(
            registry.clone(),
            dir.path().join("rules"),
            Some(dir.path()),
            tx,
        )
        .unwrap();
        (dir, registry, engine, rx)
    }

    #[test]
    fn fires_after_for_requests_once_and_resolves_through_clear() {
        let (_dir, r, engine, mut rx) = setup(RULE);
        let s = 1000;
        let mut requests = 0;
        let mut resolved = 0;
        // Memory 0.9 from t=0; evaluations every 5 s.
        for (t, ratio) in [
            (0, 0.9),
            (5, 0.9),
            (10, 0.9),
            (15, 0.9),
            (20, 0.75),
            (25, 0.65),
            (30, 0.65),
        ] {
            publish_memory(&r, ratio, t * s);
            engine.tick(t * s);
            while let Ok(req) = rx.try_recv() {
                if req.event == Event::Resolved {
                    // The resolution is handed over too (alerts resolve, breakers count
                    // again); it never executes anything.
                    assert_eq!(
                        t, 25,
                        "resolved at the first evaluation under the clear level"
                    );
                    resolved += 1;
                    continue;
                }
                assert_eq!(req.event, Event::Firing);
                requests += 1;
                assert_eq!(req.rule, "HighMemory");
                assert_eq!(req.labels.get("severity"), Some("warning"));
                assert_eq!(req.labels.get(crate::rules::expr::NAME), None);
                assert_eq!(req.value, 0.9);
                assert_eq!(req.actions[0].kind(), "redis_memory_purge");
            }
            let status = &engine.status()[0];
            let state = status.instances.first().map(|i| i.state);
            match t {
                0 | 5 => assert!(
                    matches!(state, Some(State::Pending { .. })),
                    "t={t}: {state:?}"
                ),
                // At 0.75 it is below the condition but above the clear level: still firing.
                10 | 15 | 20 => assert!(
                    matches!(state, Some(State::Firing { .. })),
                    "t={t}: {state:?}"
                ),
                _ => assert_eq!(state, None, "t={t}"),
            }
        }
        assert_eq!(
            requests, 1,
            "one request on the firing edge, none on resolve"
        );
        assert_eq!(resolved, 1);
        let text = r.render();
        assert!(
            text.contains("autotuner_rule_action_requests_total{rule=\"HighMemory\"} 1"),
            "{text}"
        );
        assert!(text.contains("autotuner_rules_last_reload_successful 1"));
    }

    #[test]
    fn a_broken_reload_keeps_the_running_rules_and_state_survives_a_good_one() {
        let (dir, r, engine, _rx) = setup(RULE);
        publish_memory(&r, 0.9, 0);
        engine.tick(0);
        assert_eq!(engine.status()[0].instances.len(), 1);
        std::fs::write(
            dir.path().join("rules/memory.yml"),
            "groups: [ {name: x, rules: [ {name: A, expr: 'rate(x)'} ] } ]",
        )
        .unwrap();
        let errors = engine.reload().unwrap_err();
        assert!(errors[0].contains("invalid PromQL"), "{errors:?}");
        assert_eq!(engine.status()[0].name, "HighMemory");
        assert_eq!(engine.status()[0].instances.len(), 1, "state kept");
        assert!(
            r.render()
                .contains("autotuner_rules_last_reload_successful 0")
        );
        // The same rule again (a comment added): unchanged, so its pending state stays.
        std::fs::write(
            dir.path().join("rules/memory.yml"),
            format!("# edited\n{RULE}"),
        )
        .unwrap();
        assert_eq!(engine.reload(), Ok(1));
        assert_eq!(
            engine.status()[0].instances.len(),
            1,
            "state kept across a reload"
        );
        assert!(engine.reload_status().success);
    }

    #[test]
    fn rules_reading_unpublished_metrics_are_warned_about_once_data_is_in() {
        let (_dir, r, engine, _rx) = setup(&RULE.replace(
            "host_memory_usage_ratio < 0.7",
            "hots_memory_usage_ratio < 0.7",
        ));
        r.expect_collectors(&["host"]);
        publish_memory(&r, 0.5, 0);
        engine.tick(0);
        assert!(
            engine.reload_status().warnings.is_empty(),
            "not before the first round"
        );
        r.record_attempt(
            "host",
            &crate::registry::Attempt {
                duration: Duration::ZERO,
                finished_ms: 0,
                error: None,
            },
        );
        engine.tick(5_000);
        let w = engine.reload_status().warnings;
        assert_eq!(w.len(), 1, "{w:?}");
        assert!(
            w[0].contains("reads hots_memory_usage_ratio, which no running collector publishes"),
            "{w:?}"
        );
    }

    #[test]
    fn a_rule_reading_past_the_history_is_warned_about() {
        let (_dir, _r, engine, _rx) =
            setup(&RULE.replace("host_memory_usage_ratio > 0.8", "rate(x[20m]) > 0.8"));
        let w = engine.reload_status().warnings;
        assert_eq!(w.len(), 1, "{w:?}");
        assert!(
            w[0].contains("reads 1200s back, more than the history keeps (600s"),
            "{w:?}"
        );
    }

    #[test]
    fn state_survives_a_restart() {
        let (dir, r, engine, _rx) = setup(RULE);
        publish_memory(&r, 0.9, 0);
        engine.tick(0);
        publish_memory(&r, 0.9, 10_000);
        engine.tick(10_000);
        assert!(matches!(
            engine.status()[0].instances[0].state,
            State::Firing {
                since_ms: 10_000,
                ..
            }
        ));
        drop(engine);
        drop(r);
        // A restart: a new process, a new registry.
        let fresh = Arc::new(Registry::new(Duration::from_secs(600)).unwrap());
        let (tx, _rx2) = mpsc::channel(16);
        let again = Engine::new(fresh, dir.path().join("rules"), Some(dir.path()), tx).unwrap();
        assert!(matches!(
            again.status()[0].instances[0].state,
            State::Firing {
                since_ms: 10_000,
                ..
            }
        ));
    }

    #[test]
    fn on_absent_hold_keeps_state_through_a_data_gap() {
        let (_dir, r, engine, _rx) = setup(RULE);
        publish_memory(&r, 0.9, 0);
        engine.tick(0);
        // The series goes stale (the collector stopped publishing it): no data behind the rule.
        r.publish("host", Vec::new(), 5_000);
        engine.tick(5_000);
        assert!(matches!(
            engine.status()[0].instances[0].state,
            State::Pending { .. }
        ));
    }
}
