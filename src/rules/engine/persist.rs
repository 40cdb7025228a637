//! What the engine keeps on disk in the data directory: each rule's instances (so state
//! survives a restart) and the mode overrides set through the admin API (`modes.json`).
//!
//! Uses the engine's loaded set and `view::Instance` (the persisted form of an instance).

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::PoisonError;

use rustc_hash::FxHashMap as HashMap;
use serde::{Deserialize, Serialize};

use super::view::{Instance, instance};
use super::{Engine, Loaded, Runtime, fingerprint};
use crate::rules::compile::Rule;
use crate::rules::file::Mode;
use crate::sample::Labels;

/// What is persisted: each rule's instances, with a fingerprint of its definition so a changed
/// rule does not inherit the state of its former self.
#[derive(Debug, Serialize, Deserialize, Default)]
pub(super) struct Persisted {
    rules: BTreeMap<String, PersistedRule>,
}

#[derive(Debug, Serialize, Deserialize)]
struct PersistedRule {
    fingerprint: String,
    instances: Vec<Instance>,
}

impl Engine {
    pub(super) fn modes(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Mode>> {
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

    pub(super) fn persist(&self, path: &Path, snapshot: &Persisted) {
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
    pub(super) fn restore(&self) {
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
}

pub(super) fn persisted(rules: &[Rule], runtime: &HashMap<String, Runtime>) -> Persisted {
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
pub(super) fn write_atomically(path: &Path, text: &[u8]) -> std::io::Result<()> {
    use std::io::Write as _;
    let tmp = path.with_extension("json.tmp");
    {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(text)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path)
}
