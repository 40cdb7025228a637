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
//!
//! Split by concern: this file holds the engine and its tick (evaluation, state transitions,
//! requests); `reload` the all-or-nothing reload, `watch` the file watcher, `persist` the rule
//! state and mode overrides on disk, `view` what the API shows.

mod persist;
mod reload;
mod remote;
mod view;
mod watch;

pub use remote::RemoteDue;
pub use view::{Explanation, Instance, Part, PartSample, ReloadStatus, RuleStatus};
pub use watch::watch;

use persist::persisted;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use prometheus::{Gauge, GaugeVec, IntCounterVec, Opts};
use rustc_hash::{FxHashMap as HashMap, FxHashSet as HashSet};
use tokio::sync::mpsc;

use super::compile::Rule;
use super::expr::{Evaluator, Memo, SeriesSource, Value};
use super::file::OnAbsent;
use super::state::{self, Observed, State};
use crate::actions::Event;
use crate::registry::Registry;
use crate::sample::Labels;
use crate::statefile::StateFile;

pub use crate::actions::ActionRequest;

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
    /// A remote rule's query in flight: which hand-out it is (`remote::RemoteDue::epoch`).
    remote_in_flight: Option<u64>,
    /// Hand-outs of a remote rule so far (numbers them).
    remote_epoch: u64,
}

struct Loaded {
    rules: Arc<Vec<Rule>>,
    runtime: HashMap<String, Runtime>,
    reload: ReloadStatus,
    /// The selections, aggregations and calls written in more than one place, worth keeping
    /// for the rest of a tick, and the rules that use any of them.
    shared: Arc<HashSet<String>>,
    sharing: HashSet<String>,
}

/// The engine.
pub struct Engine {
    registry: Arc<Registry>,
    dir: PathBuf,
    state_file: Option<StateFile>,
    inner: Mutex<Loaded>,
    /// What the API shows, published after every tick and reload, so that reading it never
    /// waits for a tick (which holds `inner` while it evaluates every due rule).
    view: Mutex<Arc<view::View>>,
    requests: mpsc::Sender<ActionRequest>,
    metrics: Metrics,
    /// Whether the loaded rules were checked against what the collectors publish (once the
    /// first collection round is in; again after each reload).
    names_checked: std::sync::atomic::AtomicBool,
    /// What was last written to the state file: unchanged state is not written (and fsynced)
    /// again every tick.
    last_persisted: Mutex<Vec<u8>>,
    /// The last write of the state file failed: the next tick writes it again.
    persist_retry: AtomicBool,
    /// Modes set through the admin API, by rule, overriding the files' (persisted in
    /// `modes.json`; the files stay the source of truth for everything else). A lock of their
    /// own: setting one never waits for a tick.
    modes: Mutex<persist::Modes>,
    modes_file: Option<StateFile>,
    /// State files found unreadable at start, shown with the reload warnings.
    state_problems: Mutex<Vec<String>>,
    /// The knobs the configuration declares (`None`: not checked).
    knobs: Option<BTreeSet<String>>,
    /// The sources the configuration declares (`None`: not checked).
    sources: Option<BTreeSet<String>>,
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

impl Engine {
    /// An engine over the rules in `dir`, persisting its state in `data_dir` (if given), sending
    /// requests on `requests`. Loads the rules once; an error there leaves it with none. Knob
    /// actions are not checked against a configuration (see [`Engine::with_knobs`]).
    pub fn new(
        registry: Arc<Registry>,
        dir: PathBuf,
        data_dir: Option<&Path>,
        requests: mpsc::Sender<ActionRequest>,
    ) -> Result<Arc<Self>, prometheus::Error> {
        Self::with_knobs(registry, dir, data_dir, requests, None)
    }

    /// [`Engine::new`], knowing the knobs the configuration declares: a rule whose knob action
    /// names another is skipped at every load, with a warning at the action's place, rather
    /// than failing each time it fires.
    pub fn with_knobs(
        registry: Arc<Registry>,
        dir: PathBuf,
        data_dir: Option<&Path>,
        requests: mpsc::Sender<ActionRequest>,
        knobs: Option<BTreeSet<String>>,
    ) -> Result<Arc<Self>, prometheus::Error> {
        Self::with_declared(registry, dir, data_dir, requests, knobs, None)
    }

    /// [`Engine::with_knobs`], knowing the PromQL sources the configuration declares too: a
    /// rule of a group naming another is skipped at every load, with a warning.
    pub fn with_declared(
        registry: Arc<Registry>,
        dir: PathBuf,
        data_dir: Option<&Path>,
        requests: mpsc::Sender<ActionRequest>,
        knobs: Option<BTreeSet<String>>,
        sources: Option<BTreeSet<String>>,
    ) -> Result<Arc<Self>, prometheus::Error> {
        let metrics = Metrics::new(&registry)?;
        let modes_file = data_dir.map(|d| StateFile::new(d.join("modes.json")));
        let mut state_problems = Vec::new();
        let modes = persist::Modes::load(modes_file.as_ref(), &mut state_problems);
        let engine = Arc::new(Engine {
            registry,
            dir,
            state_file: data_dir.map(|d| StateFile::new(d.join("rule_state.json"))),
            view: Mutex::new(Arc::default()),
            inner: Mutex::new(Loaded {
                rules: Arc::default(),
                runtime: HashMap::default(),
                reload: ReloadStatus::default(),
                shared: Arc::default(),
                sharing: HashSet::default(),
            }),
            requests,
            metrics,
            last_persisted: Mutex::new(Vec::new()),
            persist_retry: AtomicBool::new(false),
            names_checked: std::sync::atomic::AtomicBool::new(false),
            modes: Mutex::new(modes),
            modes_file,
            state_problems: Mutex::new(state_problems),
            knobs,
            sources,
        });
        let _ = engine.reload();
        engine.restore();
        engine.publish(&engine.lock());
        Ok(engine)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Loaded> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
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
        if self.names_checked.load(Ordering::Relaxed) || !self.registry.is_ready() {
            return;
        }
        self.names_checked.store(true, Ordering::Relaxed);
        let now = crate::collect::now_ms();
        let retention = i64::MAX / 2;
        let mut inner = self.lock();
        let mut warnings = Vec::new();
        // A remote group's metrics are the source's, not ours.
        for r in inner.rules.iter().filter(|r| r.remote.is_none()) {
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
        // Rules of a remote group are evaluated by their source (`remote`), not here.
        for rule in rules.iter().filter(|r| r.remote.is_none()) {
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
            self.record(rule, rt);
        }
        self.settle(inner, requests);
        evaluated
    }

    /// The per-rule metrics after an evaluation.
    fn record(&self, rule: &Rule, rt: &Runtime) {
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

    /// After evaluations: the state to disk if it changed, the view published, then the
    /// requests sent (in that order, see below).
    fn settle(&self, mut inner: std::sync::MutexGuard<'_, Loaded>, requests: Vec<ActionRequest>) {
        let Loaded { rules, runtime, .. } = &mut *inner;
        // Only a change of state is worth a write: building and serializing the snapshot every
        // tick would put that work on the evaluation path for nothing.
        let dirty = runtime.values().any(|rt| rt.dirty);
        let dirty = dirty || self.persist_retry.swap(false, Ordering::SeqCst);
        // Stamped under the lock, so that of two snapshots written concurrently (a tick and a
        // reload's), the newer is the one that stays on disk.
        let snapshot = match &self.state_file {
            Some(file) if dirty => {
                runtime.values_mut().for_each(|rt| rt.dirty = false);
                Some((file.stamp(), persisted(rules, runtime)))
            }
            _ => None,
        };
        self.publish(&inner);
        drop(inner);
        // The state goes to disk before any request leaves: a crash between the two must find
        // the instance already firing at restart, or a `for: 0` rule would fire (and act) again.
        // A failed write is logged and counted, and retried next tick; the requests still go,
        // since holding them back would lose the firing edge for good.
        if let (Some((stamp, snapshot)), Some(file)) = (snapshot, &self.state_file) {
            self.persist(file, stamp, &snapshot);
        }
        let modes = self.modes().clone();
        for mut r in requests {
            if let Some(m) = modes.mode_of(&r.rule) {
                r.mode = Some(m);
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
            OnAbsent::Hold => {
                hold(rt);
                return Ok(Vec::new());
            }
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

/// `on_absent: hold` over a rule's instances: firing ones stay, pending ones start over.
fn hold(rt: &mut Runtime) {
    let before = rt.instances.len();
    rt.instances
        .retain(|_, (s, _)| !matches!(state::step_absent_hold(*s).state, State::Inactive));
    if rt.instances.len() != before {
        rt.dirty = true;
    }
}

pub(crate) fn advance(
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
pub(crate) fn instances(value: Value, rule: &Rule) -> Result<HashMap<Labels, f64>, String> {
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
        Value::Matrix(_) | Value::String(_) => {
            Err("the condition evaluates to a range vector or a string".into())
        }
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

/// What identifies a rule's definition: changed, it starts over.
fn fingerprint(r: &Rule) -> String {
    format!(
        "{}|{:?}|{:?}|{:?}|{:?}|{:?}",
        r.expr.text,
        r.clear.as_ref().map(|q| &q.text),
        r.timing,
        r.labels,
        r.interval,
        r.remote
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

#[cfg(test)]
mod tests;
