//! The actions stage at run time: takes the engine's requests off their channel and hands
//! each to a task of its own (the engine never waits on an action). This file holds the stage
//! itself (its construction, the request loop, the audit writes and the self-metrics) and the
//! small services its parts share; each concern is a file of its own:
//!
//! - `act`: acting on one request (gate → intent → execute with a timeout → result);
//! - `knob`: knob moves with their mirrors and manual-override detection;
//! - `alerts`: Alertmanager alerts sent while a rule fires, resent, and resolved;
//! - `verify`: verification after a delay, with the revert of a knob change that made things worse;
//! - `playbooks`: an operator's playbook runs;
//! - `persist`: the gate's state file (`gate.json`).
//!
//! Uses its siblings, `audit`, `sample`, `settings` and `targets`.

mod act;
mod alerts;
mod knob;
pub mod mode;
mod persist;
mod playbooks;
mod schedule;
mod verify;

pub use playbooks::{PlaybookPart, PlaybookRun};

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use prometheus::{GaugeVec, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, Opts};
use serde_json::{Value, json};
use tokio::sync::mpsc;

use super::exec::Services;
use super::gate::{Gate, GateConfig, Limit};
use super::knobs::{self, KnobConfig, Knobs};
use super::playbook::Playbooks;
use super::{ActionRequest, ActionSpec, Event, Mode, Verifier};
use crate::audit::{Audit, Record, rfc3339};
use crate::settings::config::{ActionsConfig, GlobalMode, KnobDecl};
use crate::statefile::StateFile;
use persist::GateFile;

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

struct Inner {
    config: ActionsConfig,
    services: Services,
    knobs: Knobs,
    audit: Arc<Audit>,
    gates: Mutex<Gates>,
    /// `gate.json`; `None` without a data directory or when it was unreadable at start.
    gate_file: Option<StateFile>,
    /// Why no action may run until a restart (no usable data directory, an unreadable state
    /// file).
    halted: Option<String>,
    /// False without a usable data directory: the audit log is never written.
    audit_usable: bool,
    verifier: Option<Arc<dyn Verifier>>,
    metrics: Metrics,
    /// The Alertmanager alerts sent and not resolved, one per episode and Alertmanager.
    alerts: Mutex<alerts::AlertBook>,
    /// `alerts.json`; `None` without a data directory or when it was unreadable at start.
    alert_file: Option<StateFile>,
    /// False while the audit log cannot be written: actions are refused.
    audit_ok: AtomicBool,
    playbooks: Playbooks,
    /// One index advisor per PostgreSQL target (it keeps the window of statement totals).
    advisors: tokio::sync::Mutex<HashMap<String, crate::advisor::Advisor>>,
    /// The global mode: the configuration's, or the kill switch's.
    mode: mode::ModeState,
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
        // Without a data directory there is nowhere to audit or to keep the gate's state:
        // no action runs (never a fallback to the working directory).
        let mut halted: Option<String> = None;
        let dir = match data_dir {
            Some(d) => match usable_dir(d) {
                Ok(()) => Some(d),
                Err(why) => {
                    halted = Some(why);
                    None
                }
            },
            None => {
                halted = Some(
                    "no data directory: actions need one for their audit log and state".into(),
                );
                None
            }
        };
        // Without a usable directory the audit is opened where it cannot exist (`/dev/null` is
        // no directory) and is never written: `write` refuses first.
        let audit_dir =
            dir.map_or_else(|| PathBuf::from("/dev/null"), std::path::Path::to_path_buf);
        let (audit, opened) = Audit::open(&audit_dir, config.audit_max_bytes, config.audit_keep);
        let (keys, audit_ok) = match (dir, opened) {
            (None, _) => (Vec::new(), false),
            (Some(_), Ok(o)) => {
                if o.repaired_bytes > 0 {
                    tracing::warn!(bytes = o.repaired_bytes, path = %audit.path().display(), "audit log ended in a torn line (a crash mid-write); cut it off");
                }
                (o.intents, true)
            }
            (Some(_), Err(err)) => {
                metrics.audit_errors.inc();
                tracing::error!(error = %err, "audit log unusable: actions are stopped until it can be written");
                (Vec::new(), false)
            }
        };
        // An unreadable gate.json would silently forget open breakers, cooldowns and holds: it
        // stops the actions instead, and is kept as it is (never written over) for the operator.
        let mut gate_file = dir.map(|d| StateFile::new(d.join("gate.json")));
        let saved: GateFile = match gate_file.as_ref().map(StateFile::load::<GateFile>) {
            None | Some(Ok(None)) => GateFile::default(),
            Some(Ok(Some(saved))) => saved,
            Some(Err(err)) => {
                gate_file = None;
                halted.get_or_insert(format!(
                    "{err}; actions are stopped until it is repaired or removed and autotuner restarted"
                ));
                GateFile::default()
            }
        };
        // The alerts sent before a restart are resent (or resolved once the wiring says their
        // rule is gone); an unreadable file is kept and stops the actions, as gate.json does.
        let mut alert_file = dir.map(|d| StateFile::new(d.join("alerts.json")));
        let alert_book = match alert_file
            .as_ref()
            .map(StateFile::load::<alerts::AlertBook>)
        {
            None | Some(Ok(None)) => alerts::AlertBook::default(),
            Some(Ok(Some(book))) => book,
            Some(Err(err)) => {
                alert_file = None;
                halted.get_or_insert(format!(
                    "{err}; actions are stopped until it is repaired or removed and autotuner restarted"
                ));
                alerts::AlertBook::default()
            }
        };
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
        let (mode, mode_error) = mode::ModeState::load(config.mode, dir)?;
        registry.register(Box::new(mode.gauge()))?;
        if let Some(err) = mode_error {
            halted.get_or_insert(err);
        }
        let (knobs, knobs_error) = Knobs::load(knob_configs, dir);
        if let Some(err) = knobs_error {
            halted.get_or_insert(format!(
                "{err}; actions are stopped until it is repaired or removed and autotuner restarted"
            ));
        }
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
        if let Some(why) = &halted {
            tracing::error!(reason = %why, "actions are stopped: none will run");
        }
        Ok(Actions {
            inner: Arc::new(Inner {
                config,
                services,
                knobs,
                audit: Arc::new(audit),
                gates: Mutex::new(gates),
                gate_file,
                halted,
                audit_usable: dir.is_some(),
                verifier,
                metrics,
                alerts: Mutex::new(alert_book),
                alert_file,
                audit_ok: AtomicBool::new(audit_ok),
                playbooks,
                advisors: tokio::sync::Mutex::new(HashMap::new()),
                mode,
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

    /// The mode `req`'s next action runs in: read again before every action, so the kill
    /// switch stops a burst in progress.
    fn mode(&self, req: &ActionRequest) -> Mode {
        req.effective_mode(cap(self.inner.mode.current()))
    }

    /// The global mode: in force, configured, and the one set through the API.
    pub fn global_mode(&self) -> mode::ModeView {
        self.inner.mode.view()
    }

    /// Sets (or clears, with `None`) the global mode through the API; see `mode::ModeState::set`.
    pub async fn set_global_mode(
        &self,
        mode: Option<GlobalMode>,
        actor: &str,
        reason: &str,
    ) -> Result<mode::ModeView, String> {
        let view = self.inner.mode.set(mode, actor, reason, now_ms()).await?;
        tracing::warn!(mode = ?view.mode, actor, reason, "global mode set through the API");
        Ok(view)
    }

    fn gates(&self) -> std::sync::MutexGuard<'_, Gates> {
        self.inner
            .gates
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    async fn write(&self, record: Record) -> bool {
        if !self.inner.audit_usable {
            return false;
        }
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

    /// Why actions are stopped, when they are: no usable data directory or an unreadable state
    /// file (until a restart), or an audit log that cannot be written (until it can).
    pub fn stopped(&self) -> Option<String> {
        self.inner.halted.clone().or_else(|| {
            (!self.inner.audit_ok.load(Ordering::SeqCst)).then(|| {
                "the audit log cannot be written: actions are stopped until it can".to_owned()
            })
        })
    }

    /// The audit log.
    pub fn audit(&self) -> &Audit {
        &self.inner.audit
    }
}

/// Creates the data directory when missing and checks it is one: the audit log, the gate's
/// and the knobs' state live there.
fn usable_dir(dir: &std::path::Path) -> Result<(), String> {
    std::fs::create_dir_all(dir)
        .and_then(|()| std::fs::metadata(dir))
        .and_then(|m| {
            if m.is_dir() {
                Ok(())
            } else {
                Err(std::io::Error::other("not a directory"))
            }
        })
        .map_err(|e| format!("data directory {} unusable: {e}", dir.display()))
}

/// An action's parameters for the audit log, as `redact` allows them to be shown: a webhook's
/// URL or body, a Redis command's arguments may carry a secret, which must not reach the log
/// or the API that serves it.
fn redacted_params(spec: &ActionSpec) -> Value {
    crate::actions::redact::params(spec)
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
