//! What the API shows of the engine: each rule's status and instances, the last reload's
//! outcome, and `explain` (each condition and its operands evaluated now).
//!
//! Uses the engine's loaded rules and run-time state (read only) and `expr` for `explain`.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use std::sync::{Arc, PoisonError};

use super::{Engine, Loaded};
use crate::rules::compile::Rule;
use crate::rules::expr::{Evaluator, Value};
use crate::rules::file::Mode;
use crate::rules::state::State;
use crate::sample::Labels;

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

impl Engine {
    /// Evaluates a rule's conditions and their operands now: "why is it (not) firing?".
    pub fn explain(&self, rule: &str) -> Option<Explanation> {
        let (expr, clear, remote) = {
            let view = self.view();
            let r = view.rules.iter().find(|r| r.name == rule)?;
            (r.expr.clone(), r.clear.clone(), r.remote.clone())
        };
        let now = crate::collect::now_ms();
        // A remote rule's operands are the source's: evaluating them over the local history
        // would explain a different rule.
        if let Some(source) = remote {
            let part = |q: &crate::rules::expr::Query| Part {
                expr: q.text.clone(),
                samples: None,
                error: Some(format!(
                    "evaluated by source {source:?}: ask it (its /api/v1/query) for the operands"
                )),
            };
            return Some(Explanation {
                at_ms: now,
                expr: vec![part(&expr)],
                clear: clear.as_ref().map(|c| vec![part(c)]).unwrap_or_default(),
            });
        }
        let ev = Evaluator::new(self.registry.as_ref(), now);
        let eval = |q: &crate::rules::expr::Query| {
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
                Value::Matrix(_) | Value::String(_) => Vec::new(),
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
        let all = |q: &crate::rules::expr::Query| -> Vec<Part> {
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

    /// The last reload's outcome (as of the last tick or reload: never waits for a tick).
    pub fn reload_status(&self) -> ReloadStatus {
        self.view().reload.clone()
    }

    /// Every rule's status, as of its last evaluation (never waits for a tick).
    pub fn status(&self) -> Vec<RuleStatus> {
        let view = self.view();
        let modes = self.modes().clone();
        statuses(&view.rules, &view.runtime)
            .into_iter()
            .map(|mut s| {
                if let Some(m) = modes.mode_of(&s.name) {
                    s.mode = m;
                }
                s.mode_overridden = modes.overrides(&s.name);
                s
            })
            .collect()
    }

    /// The snapshot last published.
    pub(super) fn view(&self) -> Arc<View> {
        self.view
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Publishes what the API shows from the loaded set (call with `inner` locked, at the end
    /// of a tick or reload).
    pub(super) fn publish(&self, inner: &Loaded) {
        let mut reload = inner.reload.clone();
        reload.warnings.extend(
            self.state_problems
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .iter()
                .cloned(),
        );
        // Only what changes is copied (label sets are shared): the API builds its answer from
        // it when asked, so a tick does not pay for formatting every rule's status.
        let runtime = inner
            .rules
            .iter()
            .map(|r| {
                inner.runtime.get(&r.name).map(|rt| RawStatus {
                    instances: rt
                        .instances
                        .iter()
                        .map(|(l, (st, v))| (l.clone(), *st, *v))
                        .collect(),
                    last_error: rt.last_error.clone(),
                    last_evaluation_ms: rt.last_evaluation_ms,
                    evaluation_seconds: rt.evaluation_seconds,
                })
            })
            .collect();
        let view = View {
            rules: inner.rules.clone(),
            runtime,
            reload,
        };
        *self.view.lock().unwrap_or_else(PoisonError::into_inner) = Arc::new(view);
    }
}

/// What the API reads, published by the engine after each tick and reload.
#[derive(Default)]
pub(super) struct View {
    /// The loaded rules (for `explain`, and to tell whether a rule exists).
    pub(super) rules: Arc<Vec<Rule>>,
    /// Each rule's evaluation state, in the order of `rules` (`None`: never evaluated).
    runtime: Vec<Option<RawStatus>>,
    reload: ReloadStatus,
}

/// A rule's evaluation state as a tick left it.
struct RawStatus {
    instances: Vec<(Labels, State, f64)>,
    last_error: Option<String>,
    last_evaluation_ms: Option<i64>,
    evaluation_seconds: f64,
}

fn statuses(rules: &[Rule], runtime: &[Option<RawStatus>]) -> Vec<RuleStatus> {
    rules
        .iter()
        .zip(runtime)
        .map(|(r, rt)| {
            let rt = rt.as_ref();
            let mut instances: Vec<Instance> = rt
                .map(|rt| {
                    rt.instances
                        .iter()
                        .map(|(l, s, v)| instance(l, *s, *v))
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
                mode: r.mode.unwrap_or(Mode::DryRun),
                mode_overridden: false,
                actions: r.actions.iter().map(|a| a.kind().to_owned()).collect(),
            }
        })
        .collect()
}

/// An instance as shown and persisted (a non-finite value, which JSON cannot hold, as none).
pub(super) fn instance(labels: &Labels, state: State, value: f64) -> Instance {
    Instance {
        labels: labels
            .iter()
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect(),
        state,
        value: value.is_finite().then_some(value),
    }
}
