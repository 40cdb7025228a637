//! The actions stage at run time: takes the engine's requests off their channel and, for each
//! action, asks the gate, writes the intent to the audit log (fsynced) before running it,
//! runs it with a timeout in a task of its own (the engine never waits on an action), writes
//! the result, and counts everything. Also: knob moves with their mirrors and manual-override
//! detection, Alertmanager alerts resent while firing and resolved on resolve, verification
//! after a delay with the revert of a knob change that made things worse, and the gate's
//! persistence (`gate.json`).
//!
//! Uses its siblings, `audit`, `sample`, `settings` and `targets`.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use prometheus::{GaugeVec, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, Opts};
use serde_json::{Value, json};
use tokio::sync::mpsc;

use super::exec::{self, Outcome, Services};
use super::gate::{Ask, Gate, GateConfig, Limit, Persisted, Verdict};
use super::knobs::{self, KnobConfig, Knobs};
use super::playbook::Playbooks;
use super::{ActionRequest, ActionSpec, AlertmanagerAction, Event, KnobAction, Mode, Verifier};
use crate::audit::{Audit, Record, rfc3339};
use crate::settings::config::{ActionsConfig, GlobalMode, KnobDecl};

/// The self-metrics of the stage.
#[derive(Clone)]
struct Metrics {
    actions: IntCounterVec,
    duration: HistogramVec,
    breaker_open: GaugeVec,
    audit_errors: IntCounter,
    knob_value: GaugeVec,
    knob_min: GaugeVec,
    knob_max: GaugeVec,
    knob_paused: GaugeVec,
    verifications: IntCounterVec,
}

impl Metrics {
    fn new() -> Result<Self, prometheus::Error> {
        Ok(Metrics {
            actions: IntCounterVec::new(
                Opts::new(
                    "autotuner_actions_total",
                    "Action decisions by rule, action kind and decision (applied, would_apply, failed, timeout, unchanged, skipped_*).",
                ),
                &["rule", "action", "decision"],
            )?,
            duration: HistogramVec::new(
                HistogramOpts::new(
                    "autotuner_action_duration_seconds",
                    "How long executed actions ran.",
                )
                .buckets(vec![
                    0.005, 0.025, 0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
                ]),
                &["action"],
            )?,
            breaker_open: GaugeVec::new(
                Opts::new(
                    "autotuner_breaker_open",
                    "1 while the rule's circuit breaker is open (it acted too often without its condition clearing); reset it to resume.",
                ),
                &["rule"],
            )?,
            audit_errors: IntCounter::new(
                "autotuner_audit_write_errors_total",
                "Audit records that could not be written; while writing fails, no action runs.",
            )?,
            knob_value: GaugeVec::new(
                Opts::new("autotuner_knob_value", "The knob's current value."),
                &["knob"],
            )?,
            knob_min: GaugeVec::new(
                Opts::new("autotuner_knob_min", "The knob's lowest value."),
                &["knob"],
            )?,
            knob_max: GaugeVec::new(
                Opts::new("autotuner_knob_max", "The knob's highest value."),
                &["knob"],
            )?,
            knob_paused: GaugeVec::new(
                Opts::new(
                    "autotuner_knob_paused",
                    "1 while the knob's controller is paused because someone else changed its mirrored value.",
                ),
                &["knob"],
            )?,
            verifications: IntCounterVec::new(
                Opts::new(
                    "autotuner_action_verifications_total",
                    "Verifications after acting, by outcome (effective, ineffective, worsened, error).",
                ),
                &["rule", "outcome"],
            )?,
        })
    }

    fn collectors(&self) -> Vec<Box<dyn prometheus::core::Collector>> {
        vec![
            Box::new(self.actions.clone()),
            Box::new(self.duration.clone()),
            Box::new(self.breaker_open.clone()),
            Box::new(self.audit_errors.clone()),
            Box::new(self.knob_value.clone()),
            Box::new(self.knob_min.clone()),
            Box::new(self.knob_max.clone()),
            Box::new(self.knob_paused.clone()),
            Box::new(self.verifications.clone()),
        ]
    }
}

/// What became of one action of a request (the playbook API answers with these).
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct StepOutcome {
    /// The action kind (empty for a record about the whole request, e.g. a breaker opening).
    pub action: String,
    /// What it acted on.
    pub target: String,
    /// The decision.
    pub decision: String,
    /// Why it failed or was skipped.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// How long it ran.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub duration_ms: Option<f64>,
    /// State before.
    #[serde(skip_serializing_if = "Value::is_null")]
    pub before: Value,
    /// State after.
    #[serde(skip_serializing_if = "Value::is_null")]
    pub after: Value,
    /// What it reported.
    #[serde(skip_serializing_if = "Value::is_null")]
    pub result: Value,
}

/// One gate for acting and one for rehearsing: a dry-run rule's cooldowns, tokens and
/// breaker are its own, so rehearsals never use up what real actions need.
struct Gates {
    enforce: Gate,
    rehearsal: Gate,
}

/// An alert sent to an Alertmanager, resent while its rule fires.
#[derive(Debug, Clone)]
struct ActiveAlert {
    url: String,
    alert: Value,
}

struct Inner {
    config: ActionsConfig,
    services: Services,
    knobs: Knobs,
    audit: Arc<Audit>,
    gates: Mutex<Gates>,
    gate_path: Option<PathBuf>,
    verifier: Option<Arc<dyn Verifier>>,
    metrics: Metrics,
    alerts: Mutex<HashMap<String, Vec<ActiveAlert>>>,
    /// False while the audit log cannot be written: actions are refused.
    audit_ok: AtomicBool,
    playbooks: Playbooks,
    /// One index advisor per PostgreSQL target (it keeps the window of statement totals).
    advisors: tokio::sync::Mutex<HashMap<String, crate::advisor::Advisor>>,
}

/// The answer to a playbook run.
#[derive(Debug, Clone, serde::Serialize)]
pub struct PlaybookRun {
    /// The playbook asked for.
    pub playbook: String,
    /// Each playbook run (includes first) with its steps.
    pub parts: Vec<PlaybookPart>,
    /// How long it all took.
    pub duration_ms: f64,
}

/// One playbook of a run.
#[derive(Debug, Clone, serde::Serialize)]
pub struct PlaybookPart {
    /// Its name.
    pub playbook: String,
    /// The value its steps saw, when it has one.
    pub value: Option<f64>,
    /// Each step's outcome, in order.
    pub steps: Vec<StepOutcome>,
    /// How long it took.
    pub duration_ms: f64,
}

/// The actions stage. Cheap to clone.
#[derive(Clone)]
pub struct Actions {
    inner: Arc<Inner>,
}

fn now_ms() -> i64 {
    crate::collect::now_ms()
}

fn gate_config(c: &ActionsConfig) -> GateConfig {
    let limit = |l: &crate::settings::config::RateLimit| Limit {
        count: f64::from(l.count),
        per: l.per.0,
    };
    GateConfig {
        global: c.global_limit.as_ref().map(limit),
        per_target: c.target_limit.as_ref().map(limit),
        per_kind: c
            .kind_limits
            .iter()
            .map(|(k, l)| (k.clone(), limit(l)))
            .collect(),
        breaker_max: c.breaker_max_actions,
        breaker_window: c.breaker_window,
        key_ttl: Duration::from_secs(7 * 24 * 3600),
    }
}

#[derive(serde::Serialize, serde::Deserialize, Default)]
struct GateFile {
    enforce: Persisted,
    rehearsal: Persisted,
}

/// The global mode as the highest mode a rule acts in.
pub fn cap(mode: GlobalMode) -> Mode {
    match mode {
        GlobalMode::Observe => Mode::Observe,
        GlobalMode::DryRun => Mode::DryRun,
        GlobalMode::Enforce => Mode::Enforce,
    }
}

fn labels_of(req: &ActionRequest) -> BTreeMap<String, String> {
    req.labels
        .iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
}

fn finite(v: f64) -> Option<f64> {
    v.is_finite().then_some(v)
}

impl Actions {
    /// Builds the stage: opens the audit log (repairing a torn line), restores the gate and
    /// knobs from `data_dir`, and registers the metrics in `registry`.
    pub fn new(
        config: ActionsConfig,
        knob_decls: &[KnobDecl],
        services: Services,
        data_dir: Option<&std::path::Path>,
        verifier: Option<Arc<dyn Verifier>>,
        registry: &crate::registry::Registry,
    ) -> Result<Actions, prometheus::Error> {
        Self::with_playbooks(
            config,
            knob_decls,
            services,
            data_dir,
            verifier,
            registry,
            Playbooks::default(),
        )
    }

    /// `new`, with playbooks the admin API can run.
    pub fn with_playbooks(
        config: ActionsConfig,
        knob_decls: &[KnobDecl],
        services: Services,
        data_dir: Option<&std::path::Path>,
        verifier: Option<Arc<dyn Verifier>>,
        registry: &crate::registry::Registry,
        playbooks: Playbooks,
    ) -> Result<Actions, prometheus::Error> {
        let metrics = Metrics::new()?;
        for c in metrics.collectors() {
            registry.register(c)?;
        }
        let audit_dir = data_dir.map_or_else(|| PathBuf::from("."), std::path::Path::to_path_buf);
        let (audit, opened) = Audit::open(&audit_dir, config.audit_max_bytes, config.audit_keep);
        let (keys, audit_ok) = match opened {
            Ok(o) => {
                if o.repaired_bytes > 0 {
                    tracing::warn!(bytes = o.repaired_bytes, path = %audit.path().display(), "audit log ended in a torn line (a crash mid-write); cut it off");
                }
                (o.intents, data_dir.is_some())
            }
            Err(err) => {
                metrics.audit_errors.inc();
                tracing::error!(error = %err, "audit log unusable: actions are stopped until it can be written");
                (Vec::new(), false)
            }
        };
        let gate_path = data_dir.map(|d| d.join("gate.json"));
        let saved: GateFile = gate_path
            .as_ref()
            .and_then(|p| std::fs::read(p).ok())
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default();
        let gc = gate_config(&config);
        let gates = Gates {
            enforce: Gate::new(gc.clone(), saved.enforce, keys.clone()),
            rehearsal: Gate::new(gc, saved.rehearsal, keys),
        };
        for (rule, _, _) in gates.enforce.open_breakers() {
            metrics.breaker_open.with_label_values(&[&rule]).set(1.0);
        }
        let knob_configs: Vec<KnobConfig> = knob_decls
            .iter()
            .map(|k| KnobConfig {
                name: k.name.clone(),
                initial: k.initial,
                min: k.min,
                max: k.max,
                integer: k.integer,
                redis_key: k.redis_key.clone(),
                redis_target: k.redis_target.clone(),
                webhook: k.webhook.clone(),
            })
            .collect();
        let knobs = Knobs::load(knob_configs, data_dir);
        for v in knobs.views() {
            metrics
                .knob_value
                .with_label_values(&[&v.name])
                .set(v.value);
            metrics.knob_min.with_label_values(&[&v.name]).set(v.min);
            metrics.knob_max.with_label_values(&[&v.name]).set(v.max);
            metrics
                .knob_paused
                .with_label_values(&[&v.name])
                .set(if v.paused.is_some() { 1.0 } else { 0.0 });
        }
        if data_dir.is_none() {
            tracing::warn!(
                "no usable data directory: actions are stopped (they could not be audited)"
            );
        }
        Ok(Actions {
            inner: Arc::new(Inner {
                config,
                services,
                knobs,
                audit: Arc::new(audit),
                gates: Mutex::new(gates),
                gate_path,
                verifier,
                metrics,
                alerts: Mutex::new(HashMap::new()),
                audit_ok: AtomicBool::new(audit_ok),
                playbooks,
                advisors: tokio::sync::Mutex::new(HashMap::new()),
            }),
        })
    }

    /// Takes requests until shutdown; each is handled in a task of its own. Also resends the
    /// active Alertmanager alerts.
    pub async fn run(
        self,
        mut requests: mpsc::Receiver<ActionRequest>,
        mut shutdown: crate::shutdown::Shutdown,
    ) {
        let mut resend =
            tokio::time::interval(self.inner.config.alert_resend.max(Duration::from_secs(1)));
        resend.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        resend.tick().await;
        loop {
            tokio::select! {
                () = shutdown.wait() => return,
                r = requests.recv() => match r {
                    Some(req) => {
                        let me = self.clone();
                        tokio::spawn(async move { me.handle(req).await });
                    }
                    None => return,
                },
                _ = resend.tick() => {
                    let me = self.clone();
                    tokio::spawn(async move { me.resend_alerts().await });
                }
            }
        }
    }

    /// Handles one request to the end (its actions run one after the other, in the order the
    /// rule lists them: "free memory, then clean the cache").
    pub async fn handle(&self, req: ActionRequest) -> Vec<StepOutcome> {
        match req.event {
            Event::Resolved => {
                self.resolved(&req).await;
                Vec::new()
            }
            Event::Firing | Event::Repeat => self.act(&req).await,
        }
    }

    /// Records one decision: in the audit log, and in the outcomes returned to the caller.
    async fn step(&self, outcomes: &mut Vec<StepOutcome>, record: Record) {
        outcomes.push(StepOutcome {
            action: record.action.clone().unwrap_or_default(),
            target: record.target.clone().unwrap_or_default(),
            decision: record.decision.clone(),
            error: record.error.clone(),
            duration_ms: record.duration_ms,
            before: record.before.clone(),
            after: record.after.clone(),
            result: record.result.clone(),
        });
        self.write(record).await;
    }

    fn mode(&self, req: &ActionRequest) -> Mode {
        req.effective_mode(cap(self.inner.config.mode))
    }

    fn gates(&self) -> std::sync::MutexGuard<'_, Gates> {
        self.inner
            .gates
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    fn persist_gates(&self) {
        let Some(path) = &self.inner.gate_path else {
            return;
        };
        let bytes = {
            let g = self.gates();
            serde_json::to_vec(&GateFile {
                enforce: g.enforce.persisted().clone(),
                rehearsal: g.rehearsal.persisted().clone(),
            })
        };
        if let Ok(bytes) = bytes
            && let Err(err) = knobs::write_atomically(path, &bytes)
        {
            tracing::warn!(error = %err, path = %path.display(), "persisting the gate's state failed");
        }
    }

    async fn write(&self, record: Record) -> bool {
        let audit = self.inner.audit.clone();
        let res = tokio::task::spawn_blocking(move || audit.append(&record)).await;
        match res {
            Ok(Ok(())) => {
                if !self.inner.audit_ok.swap(true, Ordering::SeqCst) {
                    tracing::info!("audit log writable again: actions resume");
                }
                true
            }
            Ok(Err(err)) => {
                self.inner.metrics.audit_errors.inc();
                if self.inner.audit_ok.swap(false, Ordering::SeqCst) {
                    tracing::error!(error = %err, "audit write failed: actions are stopped until it can be written");
                }
                false
            }
            Err(err) => {
                self.inner.metrics.audit_errors.inc();
                tracing::error!(error = %err, "audit writer task failed");
                false
            }
        }
    }

    fn base(
        &self,
        req: &ActionRequest,
        mode: Mode,
        spec: Option<&ActionSpec>,
        target: Option<&str>,
    ) -> Record {
        let now = now_ms();
        Record {
            time: rfc3339(now),
            ts_ms: now,
            phase: "decision".into(),
            actor: req.actor.clone(),
            rule: Some(req.rule.clone()),
            rule_version: Some(req.rule_version.clone()),
            labels: labels_of(req),
            event: Some(
                match req.event {
                    Event::Firing => "firing",
                    Event::Repeat => "repeat",
                    Event::Resolved => "resolved",
                }
                .into(),
            ),
            value: finite(req.value),
            mode: Some(mode.as_str().into()),
            action: spec.map(|s| s.kind().to_owned()),
            target: target.map(str::to_owned),
            params: spec.map_or(Value::Null, redacted_params),
            ..Record::default()
        }
    }

    fn count(&self, rule: &str, kind: &str, decision: &str) {
        self.inner
            .metrics
            .actions
            .with_label_values(&[rule, kind, decision])
            .inc();
    }

    async fn act(&self, req: &ActionRequest) -> Vec<StepOutcome> {
        let mut outcomes = Vec::new();
        let mode = self.mode(req);
        let instance = req.instance();
        self.inner
            .metrics
            .breaker_open
            .with_label_values(&[&req.rule])
            .add(0.0);
        // Acted: counts for the cooldown and the breaker. Executed: something ran and
        // succeeded, so a verification is due.
        let mut acted = false;
        let mut executed = false;
        let mut rehearsed = false;
        let mut knob_moves: Vec<(String, f64, f64)> = Vec::new();
        for (i, spec) in req.actions.iter().enumerate() {
            let kind = spec.kind();
            let target = exec::target_of(spec, &self.inner.services);
            let key = req.idempotency_key(i);
            let mut record = self.base(req, mode, Some(spec), Some(&target));
            record.idempotency_key = Some(key.clone());

            // A knob move is planned before the gate: a controller holding still is not an
            // action, and must not spend tokens or start a cooldown.
            let mut knob_plan = None;
            if let ActionSpec::Knob(k) = spec {
                match self.plan_knob(k, req).await {
                    Ok(p) if p.after == p.before => {
                        record.decision = "unchanged".into();
                        record.before = json!(p.before);
                        record.after = json!(p.after);
                        record.result = json!({ "status": p.status });
                        self.knob_status(&k.name, p.status);
                        self.count(&req.rule, kind, "unchanged");
                        self.step(&mut outcomes, record).await;
                        continue;
                    }
                    Ok(p) => knob_plan = Some(p),
                    Err((decision, why)) => {
                        record.decision = decision.into();
                        record.error = Some(why);
                        self.count(&req.rule, kind, decision);
                        self.step(&mut outcomes, record).await;
                        continue;
                    }
                }
            }

            let refused = if spec.is_destructive() && !req.allow_destructive {
                Some(format!(
                    "`{kind}` can delete data or disturb clients; the rule needs `allow_destructive: true`"
                ))
            } else {
                None
            };
            let ask = Ask {
                instance: &instance,
                rule: &req.rule,
                mode,
                kind,
                target: &target,
                key: &key,
                refused,
            };
            let mut steps = Vec::new();
            let audit_ok = self.inner.audit_ok.load(Ordering::SeqCst);
            let verdict = {
                let mut g = self.gates();
                let gate = if mode == Mode::DryRun {
                    &mut g.rehearsal
                } else {
                    &mut g.enforce
                };
                gate.admit(&ask, now_ms(), &mut steps)
            };
            record.gate = steps;
            if let Some(p) = &knob_plan {
                record.before = json!(p.before);
                record.after = json!(p.after);
                record.result = json!({ "status": p.status });
            }
            match verdict {
                Verdict::Apply => {
                    record.phase = "intent".into();
                    record.decision = "started".into();
                    // The intent is durable before anything runs; when it cannot be written
                    // the action cannot be accounted for, so it does not run. (A log that
                    // was broken is retried here, every time.)
                    if !self.write(record.clone()).await {
                        self.gates().enforce.finish(&target);
                        self.count(&req.rule, kind, "skipped_audit");
                        outcomes.push(StepOutcome {
                            action: kind.to_owned(),
                            target: target.clone(),
                            decision: "skipped_audit".into(),
                            error: Some(
                                "the audit log cannot be written: the action was not run".into(),
                            ),
                            ..StepOutcome::default()
                        });
                        if audit_ok {
                            tracing::error!(rule = %req.rule, action = kind, "action not run: its intent could not be audited");
                        }
                        continue;
                    }
                    let started = Instant::now();
                    let timeout = self.inner.config.timeout;
                    let outcome =
                        tokio::time::timeout(timeout, self.execute(spec, req, knob_plan.as_ref()))
                            .await;
                    let took = started.elapsed();
                    self.gates().enforce.finish(&target);
                    self.inner
                        .metrics
                        .duration
                        .with_label_values(&[kind])
                        .observe(took.as_secs_f64());
                    acted |= spec.counts_for_breaker();
                    let mut result = record;
                    result.phase = "result".into();
                    result.time = rfc3339(now_ms());
                    result.ts_ms = now_ms();
                    result.duration_ms = Some(took.as_secs_f64() * 1000.0);
                    match outcome {
                        Ok(Ok(o)) => {
                            executed = true;
                            result.decision = "applied".into();
                            if !o.before.is_null() {
                                result.before = o.before;
                            }
                            if !o.after.is_null() {
                                result.after = o.after;
                            }
                            result.result = o.result;
                            if let Some(p) = &knob_plan
                                && let ActionSpec::Knob(k) = spec
                            {
                                knob_moves.push((k.name.clone(), p.before, p.after));
                            }
                            tracing::info!(rule = %req.rule, labels = %req.labels, action = kind, target = %target, "action applied");
                        }
                        Ok(Err(e)) => {
                            result.decision = "failed".into();
                            result.error = Some(e.clone());
                            tracing::warn!(rule = %req.rule, action = kind, target = %target, error = %e, "action failed");
                        }
                        Err(_) => {
                            result.decision = "timeout".into();
                            result.error = Some(format!(
                                "still running after {:.1}s; abandoned",
                                timeout.as_secs_f64()
                            ));
                            tracing::warn!(rule = %req.rule, action = kind, target = %target, "action timed out");
                        }
                    }
                    self.count(&req.rule, kind, &result.decision);
                    self.step(&mut outcomes, result).await;
                }
                Verdict::WouldApply => {
                    rehearsed |= spec.counts_for_breaker();
                    record.decision = "would_apply".into();
                    self.count(&req.rule, kind, "would_apply");
                    self.step(&mut outcomes, record).await;
                }
                Verdict::Skip(decision, why) => {
                    record.decision = decision.into();
                    record.error = Some(why);
                    self.count(&req.rule, kind, decision);
                    self.step(&mut outcomes, record).await;
                }
            }
        }
        let now = now_ms();
        // The breaker and the cooldown guard against rules looping by themselves; an operator's
        // explicit run (a playbook) is neither.
        if req.actor != "engine" {
            acted = false;
            rehearsed = false;
        }
        let opened = {
            let mut g = self.gates();
            let mut opened = false;
            if acted {
                opened |= g.enforce.acted(&instance, &req.rule, req.cooldown, now);
            }
            if rehearsed {
                opened |= g.rehearsal.acted(&instance, &req.rule, req.cooldown, now);
            }
            opened
        };
        if acted || rehearsed {
            self.persist_gates();
        }
        if opened {
            self.inner
                .metrics
                .breaker_open
                .with_label_values(&[&req.rule])
                .set(1.0);
            tracing::error!(rule = %req.rule, labels = %req.labels, "circuit breaker opened: the rule keeps acting without its condition clearing; it is stopped until reset");
            let mut r = self.base(req, mode, None, None);
            r.decision = "breaker_opened".into();
            r.error = Some(format!(
                "{} actions within {:?} without the condition clearing",
                self.inner.config.breaker_max_actions, self.inner.config.breaker_window
            ));
            self.write(r).await;
        }
        if executed && let (Some(v), Some(verifier)) = (&req.verify, &self.inner.verifier) {
            let me = self.clone();
            let req = req.clone();
            let verifier = verifier.clone();
            let after = v.after.0;
            tokio::spawn(async move {
                tokio::time::sleep(after).await;
                me.verify(&req, verifier.as_ref(), &knob_moves).await;
            });
        }
        outcomes
    }

    async fn execute(
        &self,
        spec: &ActionSpec,
        req: &ActionRequest,
        knob_plan: Option<&knobs::Plan>,
    ) -> Result<Outcome, String> {
        let s = &self.inner.services;
        match spec {
            ActionSpec::Sql(a) => exec::sql(s, a, req).await,
            ActionSpec::Redis(a) => {
                exec::redis_command(s, &a.command, a.target.as_deref(), req).await
            }
            ActionSpec::RedisEvict(a) => exec::redis_evict(s, a).await,
            ActionSpec::RedisMemoryPurge(a) => {
                exec::redis_memory_purge(s, a.target.as_deref()).await
            }
            ActionSpec::CacheWarm(a) => exec::cache_warm(s, a).await,
            ActionSpec::PgTerminateIdle(a) => exec::pg_terminate_idle(s, a).await,
            ActionSpec::PgAnalyze(a) => exec::pg_analyze(s, a, self.inner.config.timeout).await,
            ActionSpec::IndexAdvice(a) => self.index_advice(a).await,
            ActionSpec::RetentionDelete(a) => exec::retention_delete(s, a).await,
            ActionSpec::Knob(k) => match knob_plan {
                Some(p) => self.apply_knob(&k.name, p, &req.rule).await,
                None => Err("no plan".into()),
            },
            ActionSpec::Webhook(w) => exec::webhook(s, w, req).await,
            ActionSpec::Alertmanager(a) => self.send_alert(a, req).await,
            ActionSpec::Exec(e) => exec::exec(s, e, req).await,
        }
    }

    /// `index_advice`: advise (windowed, per target), keep the advice for the API and the
    /// metric, and, with `create`, build the best verified index, at most one per
    /// `create_every` on the target.
    async fn index_advice(&self, a: &super::IndexAdvice) -> Result<Outcome, String> {
        use crate::advisor::{AdviseOptions, CreateOptions, Creation};
        let s = &self.inner.services;
        let h = s.pg(a.target.as_deref())?;
        let mut client = h.client().await.map_err(|f| f.message)?;
        let opts = AdviseOptions {
            slow_threshold: s.slow_threshold,
            min_saving: a.min_saving.unwrap_or(0.5),
            ..AdviseOptions::default()
        };
        let report = {
            let mut advisors = self.inner.advisors.lock().await;
            let advisor = advisors.entry(h.name.clone()).or_default();
            advisor
                .advise(&mut client, &opts)
                .await
                .map_err(|e| h.url().scrub(&e.to_string()))?
        };
        drop(client);
        let now = now_ms();
        if let Some(store) = &s.advice {
            store.merge(&h.name, &report, now);
            if let Some(r) = &s.registry {
                store.publish(r, now);
            }
        }
        let mut result = serde_json::Map::new();
        result.insert("advice".into(), json!(report.advice.len()));
        result.insert("unexplainable".into(), json!(report.unexplainable.len()));
        result.insert(
            "report".into(),
            serde_json::to_value(&report).unwrap_or(Value::Null),
        );
        if a.create {
            let best = report
                .advice
                .iter()
                .filter(|x| x.verified && x.saving_ratio.is_some_and(|r| r >= opts.min_saving))
                .max_by(|x, y| {
                    x.saving_ratio
                        .unwrap_or(0.0)
                        .total_cmp(&y.saving_ratio.unwrap_or(0.0))
                });
            let key = format!("index_create:{}", h.name);
            let every = a
                .create_every
                .map_or(Duration::from_secs(24 * 3600), |d| d.0);
            let held = self.gates().enforce.held(&key, now);
            let creation = match (best, held) {
                (None, _) => {
                    json!({ "result": "skipped", "reason": "no verified advice above min_saving" })
                }
                (Some(_), Some(until)) => json!({
                    "result": "skipped",
                    "reason": format!("one index per {every:?} on this target; the next may be built after {}", rfc3339(until)),
                }),
                (Some(best), None) => {
                    // A connection of its own, dropped if the action is cut short: the build
                    // holds a session advisory lock and session settings until it ends.
                    let mut config: tokio_postgres::Config = h
                        .url()
                        .expose()
                        .parse()
                        .map_err(|e| h.failure(&e).message)?;
                    config.application_name(crate::targets::PG_APPLICATION_NAME);
                    let (mut own, conn) = config
                        .connect(tokio_postgres::NoTls)
                        .await
                        .map_err(|e| h.failure(&e).message)?;
                    let task = tokio::spawn(conn);
                    let created = crate::advisor::create_index(
                        &mut own,
                        &best.index,
                        &CreateOptions {
                            partitioned_allowed: a.partitioned_tables.clone(),
                            ..CreateOptions::default()
                        },
                    )
                    .await;
                    drop(own);
                    task.abort();
                    let created = created.map_err(|e| h.url().scrub(&e.to_string()))?;
                    if let Creation::Created { index, .. } = &created {
                        let until = now + i64::try_from(every.as_millis()).unwrap_or(i64::MAX / 4);
                        self.gates().enforce.hold(&key, until);
                        self.persist_gates();
                        if let Some(store) = &s.advice {
                            store.mark_created(&h.name, &best.id, index, now_ms());
                            if let Some(r) = &s.registry {
                                store.publish(r, now_ms());
                            }
                        }
                    }
                    serde_json::to_value(&created).unwrap_or(Value::Null)
                }
            };
            result.insert("create".into(), creation);
        }
        Ok(Outcome {
            result: Value::Object(result),
            ..Outcome::default()
        })
    }

    fn knob_status(&self, name: &str, status: &str) {
        self.inner
            .knobs
            .update(name, |st| st.status = status.to_owned());
    }

    /// Plans a knob move, first checking its mirror for a change made by someone else.
    async fn plan_knob(
        &self,
        k: &KnobAction,
        req: &ActionRequest,
    ) -> Result<knobs::Plan, (&'static str, String)> {
        let knobs = &self.inner.knobs;
        let (Some(cfg), Some(st)) = (knobs.config(&k.name), knobs.state(&k.name)) else {
            return Err((
                "failed",
                format!("no knob named {:?} in the configuration's `knobs`", k.name),
            ));
        };
        if let Some(key) = &cfg.redis_key
            && let Ok(h) = self.inner.services.redis(cfg.redis_target.as_deref())
        {
            let mut conn = h.connection();
            let found: Result<Option<String>, _> = redis::AsyncCommands::get(&mut conn, key).await;
            match found {
                Ok(found) => {
                    let ours = st.mirrored.clone();
                    let foreign = match (&found, &ours) {
                        (Some(f), Some(o)) => f != o,
                        // Never written by us, and someone set it: theirs.
                        (Some(_), None) => st.changed_ms.is_some(),
                        (None, _) => false,
                    };
                    if foreign {
                        let why = format!(
                            "Redis key {key:?} holds {:?}, not the {:?} written last: someone else is steering this knob; the controller stays paused until the key holds our value again or is deleted",
                            found.unwrap_or_default(),
                            ours.unwrap_or_default()
                        );
                        if st.paused.is_none() {
                            tracing::warn!(knob = %k.name, reason = %why, "knob controller paused");
                        }
                        knobs.update(&k.name, |s| s.paused = Some(why.clone()));
                        self.inner
                            .metrics
                            .knob_paused
                            .with_label_values(&[&k.name])
                            .set(1.0);
                        return Err(("skipped_manual_override", why));
                    }
                    if st.paused.is_some() {
                        tracing::info!(knob = %k.name, "knob controller resumed: the mirror holds our value again");
                        knobs.update(&k.name, |s| s.paused = None);
                        self.inner
                            .metrics
                            .knob_paused
                            .with_label_values(&[&k.name])
                            .set(0.0);
                    }
                }
                Err(err) => {
                    tracing::warn!(knob = %k.name, error = %h.failure(&err).message, "could not read the knob's mirror; cannot tell a manual change");
                }
            }
        }
        let st = knobs.state(&k.name).unwrap_or(st);
        Ok(knobs::plan(cfg, &st, k, req.value, now_ms()))
    }

    /// Commits a knob move and pushes it to its mirrors.
    async fn apply_knob(
        &self,
        name: &str,
        plan: &knobs::Plan,
        rule: &str,
    ) -> Result<Outcome, String> {
        let knobs = &self.inner.knobs;
        let cfg = knobs
            .config(name)
            .ok_or_else(|| format!("no knob named {name:?}"))?
            .clone();
        let text = cfg.format(plan.after);
        let mut result = serde_json::Map::new();
        result.insert("status".into(), json!(plan.status));
        if let Some(key) = &cfg.redis_key {
            let h = self.inner.services.redis(cfg.redis_target.as_deref())?;
            let mut conn = h.connection();
            let _: () = redis::AsyncCommands::set(&mut conn, key, &text)
                .await
                .map_err(|e| {
                    format!("mirroring to Redis key {key:?}: {}", h.failure(&e).message)
                })?;
            result.insert("redis_key".into(), json!(key));
        }
        let now = now_ms();
        knobs.update(name, |st| {
            knobs::commit(st, plan, now);
            st.mirrored = cfg.redis_key.as_ref().map(|_| text.clone());
        });
        self.inner
            .metrics
            .knob_value
            .with_label_values(&[name])
            .set(plan.after);
        if let Some(url) = &cfg.webhook {
            let body =
                json!({ "knob": name, "value": plan.after, "previous": plan.before, "rule": rule });
            match exec::post_json(
                &self.inner.services.http,
                url,
                &body,
                Duration::from_secs(5),
                2,
            )
            .await
            {
                Ok(o) => {
                    result.insert("webhook".into(), o.result);
                }
                Err(e) => {
                    // The value is set and mirrored; the push failing is recorded, not undone.
                    result.insert("webhook_error".into(), json!(e));
                }
            }
        }
        Ok(Outcome {
            before: json!(plan.before),
            after: json!(plan.after),
            result: Value::Object(result),
        })
    }

    fn alert_body(&self, req: &ActionRequest, ends_ms: i64) -> Value {
        let mut labels = labels_of(req);
        labels.insert("alertname".into(), req.rule.clone());
        let filled: BTreeMap<String, String> = req
            .annotations
            .iter()
            .map(|(k, v)| {
                (
                    k.clone(),
                    crate::sample::template(v, &labels_of(req), req.value),
                )
            })
            .collect();
        json!({
            "labels": labels,
            "annotations": filled,
            "startsAt": rfc3339(req.episode_ms),
            "endsAt": rfc3339(ends_ms),
            "generatorURL": "",
        })
    }

    fn alert_key(req: &ActionRequest) -> String {
        format!("{}{}", req.rule, req.labels)
    }

    async fn send_alert(
        &self,
        a: &AlertmanagerAction,
        req: &ActionRequest,
    ) -> Result<Outcome, String> {
        // Prometheus's rule: an alert lasts four resend intervals unless renewed, so a dead
        // autotuner's alerts resolve by themselves.
        let resend = i64::try_from(self.inner.config.alert_resend.as_millis()).unwrap_or(60_000);
        let body = self.alert_body(req, now_ms() + 4 * resend);
        let url = format!("{}/api/v2/alerts", a.url.trim_end_matches('/'));
        let out = exec::post_json(
            &self.inner.services.http,
            &url,
            &json!([body.clone()]),
            Duration::from_secs(5),
            2,
        )
        .await?;
        let mut alerts = self
            .inner
            .alerts
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let list = alerts.entry(Self::alert_key(req)).or_default();
        list.retain(|x| x.url != url);
        list.push(ActiveAlert { url, alert: body });
        Ok(out)
    }

    async fn resend_alerts(&self) {
        let resend = i64::try_from(self.inner.config.alert_resend.as_millis()).unwrap_or(60_000);
        let active: Vec<ActiveAlert> = {
            let alerts = self
                .inner
                .alerts
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            alerts.values().flatten().cloned().collect()
        };
        for mut a in active {
            a.alert["endsAt"] = json!(rfc3339(now_ms() + 4 * resend));
            if let Err(e) = exec::post_json(
                &self.inner.services.http,
                &a.url,
                &json!([a.alert]),
                Duration::from_secs(5),
                0,
            )
            .await
            {
                tracing::warn!(url = %super::redact::url(&a.url), error = %e, "resending an alert failed; the next resend retries");
            }
        }
    }

    async fn resolved(&self, req: &ActionRequest) {
        let instance = req.instance();
        {
            let mut g = self.gates();
            g.enforce.cleared(&instance);
            g.rehearsal.cleared(&instance);
        }
        self.persist_gates();
        let sent = {
            let mut alerts = self
                .inner
                .alerts
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            alerts.remove(&Self::alert_key(req)).unwrap_or_default()
        };
        for mut a in sent {
            a.alert["endsAt"] = json!(rfc3339(now_ms()));
            let out = exec::post_json(
                &self.inner.services.http,
                &a.url,
                &json!([a.alert]),
                Duration::from_secs(5),
                2,
            )
            .await;
            let shown = crate::settings::secret::SecretUrl::parse(&a.url)
                .map_or_else(|_| String::new(), |u| u.redacted().to_owned());
            let mut r = self.base(req, self.mode(req), None, Some(&shown));
            r.phase = "resolved".into();
            r.action = Some("alertmanager".into());
            match out {
                Ok(o) => {
                    r.decision = "applied".into();
                    r.result = o.result;
                }
                Err(e) => {
                    r.decision = "failed".into();
                    r.error = Some(e);
                }
            }
            self.write(r).await;
        }
    }

    async fn verify(
        &self,
        req: &ActionRequest,
        verifier: &dyn Verifier,
        knob_moves: &[(String, f64, f64)],
    ) {
        let Some(v) = &req.verify else {
            return;
        };
        let mut r = self.base(req, self.mode(req), None, None);
        r.phase = "verification".into();
        let outcome = match verifier.holds(&v.expr, &req.labels) {
            Ok(true) => "effective",
            Ok(false) => match v.worse.as_deref().map(|w| verifier.holds(w, &req.labels)) {
                Some(Ok(true)) => "worsened",
                Some(Err(e)) => {
                    r.error = Some(e);
                    "error"
                }
                _ => "ineffective",
            },
            Err(e) => {
                r.error = Some(e);
                "error"
            }
        };
        r.decision = outcome.into();
        if outcome == "worsened" && !knob_moves.is_empty() {
            let mut reverted = Vec::new();
            for (name, before, after) in knob_moves {
                let plan = knobs::Plan {
                    before: *after,
                    after: *before,
                    status: "Reverted",
                };
                match self.apply_knob(name, &plan, &req.rule).await {
                    Ok(_) => reverted.push(json!({ "knob": name, "from": after, "to": before })),
                    Err(e) => reverted.push(json!({ "knob": name, "error": e })),
                }
            }
            r.result = json!({ "reverted": reverted });
            tracing::warn!(rule = %req.rule, "a knob change made things worse; reverted");
        }
        self.inner
            .metrics
            .verifications
            .with_label_values(&[&req.rule, outcome])
            .inc();
        self.write(r).await;
    }

    /// The playbooks.
    pub fn playbooks(&self) -> &Playbooks {
        &self.inner.playbooks
    }

    /// Runs a playbook now, includes first, each step through the gate and the audit log.
    pub async fn run_playbook(&self, name: &str, actor: &str) -> Result<PlaybookRun, String> {
        let parts = self.inner.playbooks.expand(name)?;
        let started = Instant::now();
        let mut out = Vec::new();
        for (pname, spec) in parts {
            let part_started = Instant::now();
            let value = match (&spec.value, &self.inner.verifier) {
                (Some(expr), Some(v)) => v.value(expr)?,
                _ => None,
            };
            let now = now_ms();
            let req = ActionRequest {
                rule: format!("playbook:{pname}"),
                labels: crate::sample::Labels::empty(),
                value: value.unwrap_or(f64::NAN),
                event: Event::Firing,
                // Each run is its own episode: running a playbook twice runs it twice.
                episode_ms: now,
                mode: Some(spec.mode.unwrap_or(Mode::Enforce)),
                cooldown: Duration::ZERO,
                allow_destructive: spec.allow_destructive,
                actions: spec.steps.clone(),
                verify: None,
                annotations: BTreeMap::new(),
                rule_version: format!("{:?}", spec.steps).len().to_string(),
                at_ms: now,
                actor: actor.to_owned(),
            };
            let steps = self.act(&req).await;
            out.push(PlaybookPart {
                playbook: pname,
                value,
                steps,
                duration_ms: part_started.elapsed().as_secs_f64() * 1000.0,
            });
        }
        Ok(PlaybookRun {
            playbook: name.to_owned(),
            parts: out,
            duration_ms: started.elapsed().as_secs_f64() * 1000.0,
        })
    }

    /// Sets a knob through the API: within its bounds, mirrored, audited with its actor.
    pub async fn set_knob(
        &self,
        name: &str,
        value: f64,
        actor: &str,
    ) -> Result<knobs::KnobView, String> {
        let knobs = &self.inner.knobs;
        let (Some(cfg), Some(st)) = (knobs.config(name), knobs.state(name)) else {
            return Err(format!("no knob named {name:?}"));
        };
        if !value.is_finite() || value < cfg.min || value > cfg.max {
            return Err(format!(
                "{value} is outside the bounds of {name:?} ([{}, {}])",
                cfg.min, cfg.max
            ));
        }
        let action = KnobAction {
            name: name.to_owned(),
            set: Some(value),
            scale: None,
            step: None,
            controller: None,
        };
        let plan = knobs::plan(cfg, &st, &action, f64::NAN, now_ms());
        let started = Instant::now();
        let outcome = self.apply_knob(name, &plan, &format!("api:{actor}")).await;
        // An operator's value is ours now: a paused controller resumes from it.
        knobs.update(name, |s| s.paused = None);
        self.inner
            .metrics
            .knob_paused
            .with_label_values(&[name])
            .set(0.0);
        let now = now_ms();
        let mut r = Record {
            time: rfc3339(now),
            ts_ms: now,
            phase: "api".into(),
            actor: actor.into(),
            action: Some("knob".into()),
            target: Some(format!("knob/{name}")),
            params: json!({ "set": value }),
            before: json!(plan.before),
            after: json!(plan.after),
            duration_ms: Some(started.elapsed().as_secs_f64() * 1000.0),
            ..Record::default()
        };
        match &outcome {
            Ok(o) => {
                r.decision = "applied".into();
                r.result = o.result.clone();
            }
            Err(e) => {
                r.decision = "failed".into();
                r.error = Some(e.clone());
            }
        }
        self.write(r).await;
        outcome?;
        self.knobs()
            .into_iter()
            .find(|k| k.name == name)
            .ok_or_else(|| format!("no knob named {name:?}"))
    }

    /// Writes an audit record made elsewhere (the admin API's mutations).
    pub async fn record(&self, record: Record) -> bool {
        self.write(record).await
    }

    /// The knobs.
    pub fn knobs(&self) -> Vec<knobs::KnobView> {
        self.inner.knobs.views()
    }

    /// The open breakers: rule, instance, since (ms).
    pub fn open_breakers(&self) -> Vec<(String, String, i64)> {
        self.gates().enforce.open_breakers()
    }

    /// Closes a rule's breakers (both gates), recording who did it. Returns how many were open.
    pub async fn reset_breaker(&self, rule: &str, actor: &str) -> usize {
        let n = {
            let mut g = self.gates();
            g.enforce.reset_breakers(rule) + g.rehearsal.reset_breakers(rule)
        };
        self.persist_gates();
        self.inner
            .metrics
            .breaker_open
            .with_label_values(&[rule])
            .set(0.0);
        let now = now_ms();
        self.write(Record {
            time: rfc3339(now),
            ts_ms: now,
            phase: "api".into(),
            decision: "breaker_reset".into(),
            actor: actor.into(),
            rule: Some(rule.into()),
            result: json!({ "was_open": n }),
            ..Record::default()
        })
        .await;
        n
    }

    /// The audit log.
    pub fn audit(&self) -> &Audit {
        &self.inner.audit
    }
}

/// An action's parameters for the audit log, as `redact` allows them to be shown: a webhook's
/// URL or body, a Redis command's arguments may carry a secret, which must not reach the log
/// or the API that serves it.
fn redacted_params(spec: &ActionSpec) -> Value {
    super::redact::params(spec)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_in_action_urls_never_reach_the_audit_log() {
        let spec: ActionSpec = serde_yaml::from_str(
            "webhook: {url: 'https://bot:hunter2@hooks.example/x?token=abc123'}",
        )
        .unwrap();
        let text = redacted_params(&spec).to_string();
        assert!(
            !text.contains("hunter2") && !text.contains("abc123"),
            "{text}"
        );
        assert!(text.contains("hooks.example"), "{text}");
    }
}
