//! The gate's persistence: both gates' cooldowns, breakers, holds and idempotency keys in
//! `gate.json` in the data directory, written through `statefile` (durable, newest wins, off
//! the async workers). Reading it at start is the stage's construction: an unreadable file
//! stops the actions there.
//!
//! Uses the stage (`super`), the gate, and the state-file writer the knobs share.

use super::super::gate::Persisted;
use super::super::knobs;
use super::Actions;

#[derive(serde::Serialize, serde::Deserialize, Default)]
pub(super) struct GateFile {
    pub(super) enforce: Persisted,
    pub(super) rehearsal: Persisted,
}

impl Actions {
    /// Writes both gates' state to `gate.json`, off the async workers; the snapshot is stamped
    /// under the gates' lock so the newest one stays on disk whatever order the writes end in.
    pub(super) fn persist_gates(&self) {
        let Some(file) = &self.inner.gate_file else {
            return;
        };
        let (stamp, bytes) = {
            let g = self.gates();
            (
                file.stamp(),
                serde_json::to_vec(&GateFile {
                    enforce: g.enforce.persisted().clone(),
                    rehearsal: g.rehearsal.persisted().clone(),
                }),
            )
        };
        match bytes {
            Ok(bytes) => knobs::save_detached(file.clone(), stamp, bytes),
            Err(err) => tracing::warn!(error = %err, "serializing the gate's state failed"),
        }
    }
}
