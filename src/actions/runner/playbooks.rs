//! An operator's playbook runs: the playbook and its includes expanded, each part's value
//! read, and its steps acted on like a rule's request (through the gate and the audit log),
//! under the operator's name.
//!
//! Uses the stage (`super`) and the playbooks.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use super::super::playbook::Playbooks;
use super::super::{ActionRequest, Event, Mode};
use super::{Actions, StepOutcome, now_ms};

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

impl Actions {
    /// The playbooks.
    pub fn playbooks(&self) -> &Playbooks {
        &self.inner.playbooks
    }

    /// Runs a playbook now, includes first, each step through the gate and the audit log.
    ///
    /// The run is a task of its own: a caller that goes away (a client disconnecting, a proxy
    /// timing out) stops waiting for it, not the run, so every step it started has its result
    /// in the audit log.
    pub async fn run_playbook(&self, name: &str, actor: &str) -> Result<PlaybookRun, String> {
        self.run_playbook_as(name, actor, None).await
    }

    /// [`Actions::run_playbook`] in `mode` instead of each part's own (a schedule's mode).
    pub(super) async fn run_playbook_as(
        &self,
        name: &str,
        actor: &str,
        mode: Option<Mode>,
    ) -> Result<PlaybookRun, String> {
        let me = self.clone();
        let (name, actor) = (name.to_owned(), actor.to_owned());
        tokio::spawn(async move { me.run_playbook_here(&name, &actor, mode).await })
            .await
            .map_err(|e| format!("the playbook run stopped: {e}"))?
    }

    async fn run_playbook_here(
        &self,
        name: &str,
        actor: &str,
        mode: Option<Mode>,
    ) -> Result<PlaybookRun, String> {
        let parts = self.inner.playbooks.expand(name)?;
        let started = Instant::now();
        let mut out = Vec::new();
        for (pname, spec) in parts {
            let part_started = Instant::now();
            let value = match (&spec.value, &self.inner.verifier) {
                (Some(expr), Some(v)) => super::verify::value(v, expr).await?,
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
                // A schedule's mode never raises a part above its own.
                mode: Some(match (mode, spec.mode) {
                    (Some(s), Some(p)) => s.min(p),
                    (s, p) => s.or(p).unwrap_or(Mode::Enforce),
                }),
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
}
