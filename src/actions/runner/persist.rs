//! The gate's persistence: both gates' cooldowns, breakers, holds and idempotency keys in
//! `gate.json` in the data directory.
//!
//! Uses the stage (`super`), the gate and the knobs' file writer.

use super::super::gate::Persisted;
use super::super::knobs;
use super::Actions;

#[derive(serde::Serialize, serde::Deserialize, Default)]
pub(super) struct GateFile {
    pub(super) enforce: Persisted,
    pub(super) rehearsal: Persisted,
}

impl Actions {
    pub(super) fn persist_gates(&self) {
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
}
