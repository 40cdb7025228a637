//! Verification after acting: some time after a rule's actions ran, its `verify` condition is
//! evaluated and the outcome (effective, ineffective, worsened, error) recorded and counted; a
//! knob change that made things worse is reverted.
//!
//! Uses the stage (`super`), the knobs and the `Verifier` the wiring provides.

use std::sync::Arc;

use serde_json::json;

use super::super::knobs;
use super::super::{ActionRequest, Verifier};
use super::Actions;
use crate::sample::Labels;

/// `Verifier::holds` on the blocking pool: PromQL over the history can take milliseconds, which
/// must not hold up an async worker (the one that serves `/metrics`, say).
pub(super) async fn holds(
    verifier: &Arc<dyn Verifier>,
    expr: &str,
    labels: &Labels,
) -> Result<bool, String> {
    let (v, e, l) = (verifier.clone(), expr.to_owned(), labels.clone());
    tokio::task::spawn_blocking(move || v.holds(&e, &l))
        .await
        .map_err(|e| format!("evaluating {expr:?}: {e}"))?
}

/// `Verifier::value` on the blocking pool, for the same reason.
pub(super) async fn value(verifier: &Arc<dyn Verifier>, expr: &str) -> Result<Option<f64>, String> {
    let (v, e) = (verifier.clone(), expr.to_owned());
    tokio::task::spawn_blocking(move || v.value(&e))
        .await
        .map_err(|e| format!("evaluating {expr:?}: {e}"))?
}

impl Actions {
    pub(super) async fn verify(
        &self,
        req: &ActionRequest,
        verifier: &Arc<dyn Verifier>,
        knob_moves: &[(String, f64, f64)],
    ) {
        let Some(v) = &req.verify else {
            return;
        };
        let mut r = self.base(req, self.mode(req), None, None);
        r.phase = "verification".into();
        let outcome = match holds(verifier, &v.expr, &req.labels).await {
            Ok(true) => "effective",
            Ok(false) => match match v.worse.as_deref() {
                Some(w) => Some(holds(verifier, w, &req.labels).await),
                None => None,
            } {
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
}
