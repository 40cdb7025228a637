//! What the engine keeps on disk in the data directory: each rule's instances (so state
//! survives a restart) and the mode overrides set through the admin API (`modes.json`).
//!
//! Both go through `statefile` (one writer per file, stamped snapshots, durable replacement
//! with a directory fsync); an unreadable file at start is an error, logged and counted, never
//! silently replaced. Uses the engine's loaded set and `view::Instance` (the persisted form of
//! an instance).

use std::collections::BTreeMap;
use std::sync::PoisonError;
use std::sync::atomic::Ordering;

use rustc_hash::FxHashMap as HashMap;
use serde::{Deserialize, Serialize};

use super::view::{Instance, instance};
use super::{Engine, Loaded, Runtime, fingerprint};
use crate::rules::compile::Rule;
use crate::rules::file::Mode;
use crate::sample::Labels;
use crate::statefile::StateFile;

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

/// The mode overrides set through the admin API, as loaded from `modes.json`.
#[derive(Debug, Default, Clone)]
pub(super) struct Modes {
    by_rule: BTreeMap<String, Mode>,
    /// Why `modes.json` could not be read at start. Until it is fixed (or removed) and the
    /// engine restarted, every rule is held in `observe`: an override the operator set to stop
    /// a rule from acting must not silently fall back to the file's mode.
    unreadable: Option<String>,
}

impl Modes {
    /// The overrides in `file`; an unreadable file is reported in `problems`, logged, counted
    /// (by `statefile`) and kept as it is.
    pub(super) fn load(file: Option<&StateFile>, problems: &mut Vec<String>) -> Modes {
        let Some(file) = file else {
            return Modes::default();
        };
        match file.load::<BTreeMap<String, Mode>>() {
            Ok(by_rule) => Modes {
                by_rule: by_rule.unwrap_or_default(),
                unreadable: None,
            },
            Err(err) => {
                let message = format!(
                    "{err}: every rule acts in observe mode until it is fixed or removed and the autotuner restarted"
                );
                tracing::error!(error = %message, "mode overrides unreadable");
                problems.push(message.clone());
                Modes {
                    by_rule: BTreeMap::new(),
                    unreadable: Some(message),
                }
            }
        }
    }

    /// The mode a rule's override gives it, if any.
    pub(super) fn mode_of(&self, rule: &str) -> Option<Mode> {
        if self.unreadable.is_some() {
            return Some(Mode::Observe);
        }
        self.by_rule.get(rule).copied()
    }

    /// Whether the rule's mode is set here rather than in its file.
    pub(super) fn overrides(&self, rule: &str) -> bool {
        self.unreadable.is_some() || self.by_rule.contains_key(rule)
    }
}

impl Engine {
    pub(super) fn modes(&self) -> std::sync::MutexGuard<'_, Modes> {
        self.modes.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Sets (or, with `None`, clears) a rule's mode override and writes the overrides durably
    /// (off the async workers) before answering. `Err` when there is no such rule, when the
    /// overrides file was unreadable at start, or when the write fails (the override then
    /// holds until restart, and the error says so). Never waits for a tick.
    pub async fn set_mode(&self, rule: &str, mode: Option<Mode>) -> Result<(), String> {
        if !self.view().rules.iter().any(|r| r.name == rule) {
            return Err(format!("no rule named {rule:?}"));
        }
        let (stamp, bytes) = {
            let mut modes = self.modes();
            if let Some(why) = &modes.unreadable {
                return Err(why.clone());
            }
            match mode {
                Some(m) => modes.by_rule.insert(rule.to_owned(), m),
                None => modes.by_rule.remove(rule),
            };
            let bytes = serde_json::to_vec(&modes.by_rule)
                .map_err(|e| format!("serializing the mode overrides: {e}"))?;
            (self.modes_file.as_ref().map(StateFile::stamp), bytes)
        };
        if let (Some(file), Some(stamp)) = (&self.modes_file, stamp)
            && let Err(err) = file.write(stamp, bytes).await
        {
            tracing::error!(error = %err, "persisting mode overrides failed");
            return Err(format!(
                "the mode is set but not persisted, so it will not survive a restart: {err}"
            ));
        }
        Ok(())
    }

    /// Writes the rule state durably, unless it is what was last written. Called on the
    /// engine's blocking thread, before the tick's requests are sent.
    pub(super) fn persist(&self, file: &StateFile, stamp: u64, snapshot: &Persisted) {
        let bytes = match serde_json::to_vec(snapshot) {
            Ok(b) => b,
            Err(err) => {
                tracing::error!(error = %err, "serializing the rule state failed");
                return;
            }
        };
        let mut last = self
            .last_persisted
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if *last == bytes {
            return;
        }
        match file.write_blocking(stamp, &bytes) {
            Ok(true) => *last = bytes,
            Ok(false) => {}
            Err(err) => {
                self.persist_retry.store(true, Ordering::SeqCst);
                tracing::error!(error = %err, "persisting rule state failed; retrying next tick");
            }
        }
    }

    /// Restores persisted state for rules whose definition is unchanged. An unreadable state
    /// file is an error, logged, counted (by `statefile`) and shown with the reload warnings;
    /// it is moved aside (`rule_state.json.unreadable`) for inspection rather than overwritten
    /// by the fresh state the engine then starts from.
    pub(super) fn restore(&self) {
        let Some(file) = &self.state_file else { return };
        let saved: Persisted = match file.load() {
            Ok(Some(s)) => s,
            Ok(None) => return,
            Err(err) => {
                let aside = file.path().with_extension("json.unreadable");
                let message = match std::fs::rename(file.path(), &aside) {
                    Ok(()) => format!(
                        "{err}; moved to {} and starting from fresh rule state",
                        aside.display()
                    ),
                    Err(e) => format!(
                        "{err}; moving it to {} failed ({e}): it will be overwritten by fresh rule state",
                        aside.display()
                    ),
                };
                tracing::error!(error = %message, "persisted rule state unreadable");
                self.state_problems
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .push(message);
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
