//! Verification after acting: some time after a rule's actions ran, its `verify` condition is
//! evaluated and the outcome (effective, ineffective, worsened, error) recorded and counted; a
//! knob change that made things worse is reverted.
//!
//! Uses the stage (`super`), the knobs and the `Verifier` the wiring provides.

use serde_json::json;

use super::super::knobs;
use super::super::{ActionRequest, Verifier};
use super::Actions;

impl Actions {
    pub(super) async fn verify(
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
}
