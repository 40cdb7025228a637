//! The global mode and its kill switch: the highest mode any rule acts in, as the configuration
//! sets it (`actions.mode`) or as an operator set it through `PUT /api/v1/mode`, which wins
//! until cleared, survives restarts (`global_mode.json` in the data directory) and is audited
//! with its actor and reason.
//!
//! Owns that state, `autotuner_actions_mode` and the file. Uses `statefile` and the runner's
//! own types. The mode is read before every single action (not once per request), so a switch
//! to `observe` stops a burst already in progress from starting anything new; an action
//! already running finishes (it cannot be un-run) and is recorded as usual.

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Mutex, PoisonError};

use prometheus::{GaugeVec, Opts};
use serde::{Deserialize, Serialize};

use crate::settings::config::GlobalMode;
use crate::statefile::StateFile;

/// A mode set through the API.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModeSet {
    /// The mode.
    pub mode: GlobalMode,
    /// Who set it (the token's name).
    pub actor: String,
    /// Why, as they said.
    pub reason: String,
    /// When, in milliseconds since the epoch.
    pub at_ms: i64,
}

/// What `GET /api/v1/mode` shows.
#[derive(Debug, Clone, Serialize)]
pub struct ModeView {
    /// The mode in force.
    pub mode: GlobalMode,
    /// The configuration's.
    pub configured: GlobalMode,
    /// The API's, when one is set (it wins over the configuration's).
    pub set: Option<ModeSet>,
}

/// Longest reason kept: it is an audit note, not a document.
const MAX_REASON: usize = 500;

const MODES: [GlobalMode; 3] = [GlobalMode::Observe, GlobalMode::DryRun, GlobalMode::Enforce];

fn code(m: GlobalMode) -> u8 {
    match m {
        GlobalMode::Observe => 0,
        GlobalMode::DryRun => 1,
        GlobalMode::Enforce => 2,
    }
}

/// The global mode's state.
pub(super) struct ModeState {
    configured: GlobalMode,
    /// The mode in force, read before each action without a lock.
    current: AtomicU8,
    set: Mutex<Option<ModeSet>>,
    /// One `set` at a time, from reading the mode to storing it: a raise waiting for its
    /// write must never land after a kill switch that came in meanwhile.
    setting: tokio::sync::Mutex<()>,
    file: Option<StateFile>,
    gauge: GaugeVec,
}

impl ModeState {
    /// The state at start: the file's mode when there is one. An unreadable file is an error
    /// for the caller to stop the actions on (it would otherwise silently lift a kill switch).
    pub(super) fn load(
        configured: GlobalMode,
        dir: Option<&std::path::Path>,
    ) -> Result<(ModeState, Option<String>), prometheus::Error> {
        let gauge = GaugeVec::new(
            Opts::new(
                "autotuner_actions_mode",
                "1 for the global mode in force (observe, dry_run, enforce): the configuration's, or the one set through PUT /api/v1/mode.",
            ),
            &["mode"],
        )?;
        let mut file = dir.map(|d| StateFile::new(d.join("global_mode.json")));
        let mut problem = None;
        // `null` is written when the API's mode is cleared.
        let set = match file.as_ref().map(StateFile::load::<Option<ModeSet>>) {
            None | Some(Ok(None)) => None,
            Some(Ok(Some(s))) => s,
            Some(Err(err)) => {
                file = None;
                problem = Some(format!(
                    "{err}; actions are stopped until it is repaired or removed and autotuner restarted"
                ));
                None
            }
        };
        let current = set.as_ref().map_or(configured, |s| s.mode);
        let state = ModeState {
            configured,
            current: AtomicU8::new(code(current)),
            set: Mutex::new(set),
            setting: tokio::sync::Mutex::new(()),
            file,
            gauge,
        };
        state.publish(current);
        Ok((state, problem))
    }

    pub(super) fn gauge(&self) -> GaugeVec {
        self.gauge.clone()
    }

    fn publish(&self, m: GlobalMode) {
        for mode in MODES {
            let name = match mode {
                GlobalMode::Observe => "observe",
                GlobalMode::DryRun => "dry_run",
                GlobalMode::Enforce => "enforce",
            };
            self.gauge
                .with_label_values(&[name])
                .set(if mode == m { 1.0 } else { 0.0 });
        }
    }

    /// The mode in force now.
    pub(super) fn current(&self) -> GlobalMode {
        match self.current.load(Ordering::SeqCst) {
            2 => GlobalMode::Enforce,
            1 => GlobalMode::DryRun,
            _ => GlobalMode::Observe,
        }
    }

    pub(super) fn view(&self) -> ModeView {
        ModeView {
            mode: self.current(),
            configured: self.configured,
            set: self
                .set
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .clone(),
        }
    }

    /// Sets (or, with `None`, clears) the API's mode. A lower mode takes effect at once, before
    /// it is written, so a kill switch never waits for a disk; a higher one only once it is on
    /// disk, so a failed write can never leave more armed after a restart than before.
    pub(super) async fn set(
        &self,
        mode: Option<GlobalMode>,
        actor: &str,
        reason: &str,
        now_ms: i64,
    ) -> Result<ModeView, String> {
        let Some(file) = &self.file else {
            return Err(
                "the global mode cannot be kept: no usable data directory or global_mode.json unreadable"
                    .to_owned(),
            );
        };
        let _one_at_a_time = self.setting.lock().await;
        let reason: String = reason.chars().take(MAX_REASON).collect();
        let set = mode.map(|mode| ModeSet {
            mode,
            actor: actor.to_owned(),
            reason,
            at_ms: now_ms,
        });
        let next = set.as_ref().map_or(self.configured, |s| s.mode);
        let lower = code(next) <= code(self.current());
        // Cleared, it is written as `null` ("none set"), never as an empty file.
        let bytes = serde_json::to_vec(&set).map_err(|e| e.to_string())?;
        let stamp = {
            let mut guard = self.set.lock().unwrap_or_else(PoisonError::into_inner);
            if lower {
                *guard = set.clone();
                self.current.store(code(next), Ordering::SeqCst);
                self.publish(next);
            }
            file.stamp()
        };
        if let Err(err) = file.write(stamp, bytes).await {
            return Err(if lower {
                format!("{err}; the mode is in force now but will not survive a restart")
            } else {
                format!("{err}; the mode was not raised")
            });
        }
        if !lower {
            *self.set.lock().unwrap_or_else(PoisonError::into_inner) = set;
            self.current.store(code(next), Ordering::SeqCst);
            self.publish(next);
        }
        Ok(self.view())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn set_persists_clear_returns_to_the_configuration_and_garbage_stops_the_actions() {
        let dir = tempfile::tempdir().unwrap();
        let (m, problem) = ModeState::load(GlobalMode::Enforce, Some(dir.path())).unwrap();
        assert!(problem.is_none());
        assert_eq!(m.current(), GlobalMode::Enforce);
        let v = m
            .set(Some(GlobalMode::Observe), "ops", "incident", 5)
            .await
            .unwrap();
        assert_eq!(v.mode, GlobalMode::Observe);
        // A new process reads it back.
        let (again, _) = ModeState::load(GlobalMode::Enforce, Some(dir.path())).unwrap();
        assert_eq!(again.current(), GlobalMode::Observe);
        assert_eq!(again.view().set.unwrap().reason, "incident");
        // Cleared: the configuration's mode, here and after a restart.
        let v = again.set(None, "ops", "over", 6).await.unwrap();
        assert_eq!(v.mode, GlobalMode::Enforce);
        let (third, problem) = ModeState::load(GlobalMode::DryRun, Some(dir.path())).unwrap();
        assert!(problem.is_none());
        assert_eq!(third.current(), GlobalMode::DryRun);
        // An unreadable file is never taken for "none set".
        std::fs::write(dir.path().join("global_mode.json"), b"{oops").unwrap();
        let (broken, problem) = ModeState::load(GlobalMode::Enforce, Some(dir.path())).unwrap();
        assert!(problem.unwrap().contains("global_mode.json"));
        // And it cannot be set over (it is kept for the operator).
        assert!(
            broken
                .set(Some(GlobalMode::Observe), "ops", "x", 7)
                .await
                .is_err()
        );
        // Without a data directory it cannot be kept, so it is not set.
        let (none, _) = ModeState::load(GlobalMode::Enforce, None).unwrap();
        assert!(
            none.set(Some(GlobalMode::Observe), "ops", "x", 8)
                .await
                .is_err()
        );
    }
}
