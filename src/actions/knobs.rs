//! Knobs: named, bounded tunables (the batch size, a worker count) that `knob` actions move and
//! that the application owning the loop follows. Owns their declared bounds, their current
//! values and history (persisted in `knobs.json` in the data directory through `statefile`), the
//! planning of a move (`set`, `scale`, `step`, and the controller), and the controller's
//! stabilization and change budget. Pure planning with the time passed in; mirroring to Redis
//! or a webhook is the executor's job.
//!
//! Uses its parent's `KnobAction` and `Controller` specs and the shared `statefile`.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::{Controller, KnobAction};
use crate::statefile::{StateError, StateFile};

/// A knob as the configuration declares it.
#[derive(Debug, Clone, PartialEq)]
pub struct KnobConfig {
    /// Its name.
    pub name: String,
    /// Its value on first start (later starts restore the last value).
    pub initial: f64,
    /// Lowest value.
    pub min: f64,
    /// Highest value.
    pub max: f64,
    /// Whether values are whole numbers (a batch size is).
    pub integer: bool,
    /// Mirror each value to this Redis key (on the target, or the only Redis target).
    pub redis_key: Option<String>,
    /// The Redis target of the mirror.
    pub redis_target: Option<String>,
    /// POST each new value to this URL.
    pub webhook: Option<String>,
}

impl KnobConfig {
    fn clamp(&self, v: f64) -> f64 {
        let v = if self.integer { v.round() } else { v };
        v.clamp(self.min, self.max)
    }

    /// The value as written to the mirror: integers without a fraction.
    pub fn format(&self, v: f64) -> String {
        if self.integer {
            format!("{}", v.round() as i64)
        } else {
            format!("{v}")
        }
    }
}

/// Why the controller did (or did not) move: the answer to "why didn't it change?".
pub mod status {
    /// Moved down.
    pub const DECREASED: &str = "Decreased";
    /// Moved up.
    pub const INCREASED: &str = "Increased";
    /// Input between `low` and `high`.
    pub const WITHIN_DEAD_BAND: &str = "WithinDeadBand";
    /// Wants down, but the down window since the last decrease has not passed.
    pub const DOWN_STABILIZED: &str = "DownStabilized";
    /// Wants up, but the up window since the last change has not passed.
    pub const UP_STABILIZED: &str = "UpStabilized";
    /// Wants down, already at the minimum.
    pub const AT_MIN: &str = "AtMin";
    /// Wants up, already at the maximum.
    pub const AT_MAX: &str = "AtMax";
    /// The change budget of the period is spent.
    pub const BUDGET_EXHAUSTED: &str = "BudgetExhausted";
    /// Moved, less than wanted: the budget's remainder.
    pub const BUDGET_LIMITED: &str = "BudgetLimited";
    /// The input has no value.
    pub const NO_DATA: &str = "NoData";
    /// Set, scaled or stepped by an action or the API.
    pub const SET: &str = "Set";
}

/// A knob's run-time state.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct KnobState {
    /// The current value.
    pub value: f64,
    /// The text last written to the mirror, to tell a change made by someone else.
    pub mirrored: Option<String>,
    /// Why the controller is paused (someone else changed the mirrored value).
    pub paused: Option<String>,
    /// The last controller status.
    pub status: String,
    /// When the value last changed (ms).
    pub changed_ms: Option<i64>,
    /// When it last decreased (ms).
    pub last_decrease_ms: Option<i64>,
    /// When it last increased (ms).
    pub last_increase_ms: Option<i64>,
    /// Recent changes (time, absolute size), for the change budget.
    pub changes: Vec<(i64, f64)>,
}

/// A planned move.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    /// The value now.
    pub before: f64,
    /// The value after the move (equal to `before` when it holds).
    pub after: f64,
    /// Why.
    pub status: &'static str,
}

/// Checks a controller's settings (called when rules load).
pub fn check_controller(c: &Controller) -> Result<(), String> {
    if !(c.low.is_finite() && c.high.is_finite() && c.low < c.high) {
        return Err(format!(
            "controller: low ({}) must be below high ({}): the band between them is where the knob holds",
            c.low, c.high
        ));
    }
    if let Some(f) = c.decrease_factor
        && !(f > 0.0 && f < 1.0)
    {
        return Err(format!(
            "controller: decrease_factor ({f}) must be between 0 and 1"
        ));
    }
    if !(c.increase_step > 0.0 && c.increase_step.is_finite()) {
        return Err(format!(
            "controller: increase_step ({}) must be positive",
            c.increase_step
        ));
    }
    if let Some(m) = c.max_change
        && (m.is_nan() || m <= 0.0)
    {
        return Err(format!("controller: max_change ({m}) must be positive"));
    }
    Ok(())
}

fn ms(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX / 2)
}

/// Plans a move of `cfg`'s knob in state `st` for `action`, fed `input` (the condition's
/// value), at `now_ms`. Does not change the value: `commit` does, once it is applied.
pub fn plan(
    cfg: &KnobConfig,
    st: &KnobState,
    action: &KnobAction,
    input: f64,
    now_ms: i64,
) -> Plan {
    let before = st.value;
    let simple = |after: f64| Plan {
        before,
        after: cfg.clamp(after),
        status: status::SET,
    };
    if let Some(v) = action.set {
        return simple(v);
    }
    if let Some(f) = action.scale {
        return simple(before * f);
    }
    if let Some(s) = action.step {
        return simple(before + s);
    }
    let Some(c) = &action.controller else {
        return simple(before);
    };
    let hold = |status| Plan {
        before,
        after: before,
        status,
    };
    if input.is_nan() {
        return hold(status::NO_DATA);
    }
    let (wanted, status) = if input > c.high {
        if before <= cfg.min {
            return hold(status::AT_MIN);
        }
        let window = ms(c.down_stabilization.map_or(Duration::ZERO, |d| d.0));
        if st.last_decrease_ms.is_some_and(|t| now_ms - t < window) {
            return hold(status::DOWN_STABILIZED);
        }
        (
            cfg.clamp(before * c.decrease_factor.unwrap_or(0.5)),
            status::DECREASED,
        )
    } else if input < c.low {
        if before >= cfg.max {
            return hold(status::AT_MAX);
        }
        // Relax slowly: one step per window, and a window after the last decrease.
        let window = ms(c.up_stabilization.map_or(Duration::from_secs(180), |d| d.0));
        let last = st.last_decrease_ms.max(st.last_increase_ms);
        if last.is_some_and(|t| now_ms - t < window) {
            return hold(status::UP_STABILIZED);
        }
        (cfg.clamp(before + c.increase_step), status::INCREASED)
    } else {
        return hold(status::WITHIN_DEAD_BAND);
    };
    let Some(budget) = c.max_change else {
        return Plan {
            before,
            after: wanted,
            status,
        };
    };
    let period = ms(c.budget_period.map_or(Duration::from_secs(600), |d| d.0));
    let used: f64 = st
        .changes
        .iter()
        .filter(|(t, _)| now_ms - *t < period)
        .map(|(_, d)| d)
        .sum();
    let left = budget - used;
    if left <= 0.0 {
        return hold(status::BUDGET_EXHAUSTED);
    }
    let delta = wanted - before;
    if delta.abs() <= left {
        Plan {
            before,
            after: wanted,
            status,
        }
    } else {
        let limited = cfg.clamp(before + left.copysign(delta));
        if limited == before {
            hold(status::BUDGET_EXHAUSTED)
        } else {
            Plan {
                before,
                after: limited,
                status: status::BUDGET_LIMITED,
            }
        }
    }
}

/// Records an applied move.
pub fn commit(st: &mut KnobState, plan: &Plan, now_ms: i64) {
    st.status = plan.status.to_owned();
    if plan.after == plan.before {
        return;
    }
    if plan.after < plan.before {
        st.last_decrease_ms = Some(now_ms);
    } else {
        st.last_increase_ms = Some(now_ms);
    }
    st.changes.push((now_ms, (plan.after - plan.before).abs()));
    // A day of changes is more than any budget period needs.
    st.changes.retain(|(t, _)| now_ms - *t < 24 * 3600 * 1000);
    st.value = plan.after;
    st.changed_ms = Some(now_ms);
}

/// Every declared knob, with its state, persisted in the data directory.
#[derive(Debug)]
pub struct Knobs {
    configs: BTreeMap<String, KnobConfig>,
    states: Mutex<BTreeMap<String, KnobState>>,
    /// Where they persist; `None` without a data directory or when the file was unreadable.
    file: Option<StateFile>,
}

/// A knob's public view.
#[derive(Debug, Clone, Serialize)]
pub struct KnobView {
    /// Its name.
    pub name: String,
    /// Its value.
    pub value: f64,
    /// Lowest value.
    pub min: f64,
    /// Highest value.
    pub max: f64,
    /// The controller's last status.
    pub status: String,
    /// Why the controller is paused, when it is.
    pub paused: Option<String>,
    /// When it last changed (ms).
    pub changed_ms: Option<i64>,
}

impl Knobs {
    /// The declared knobs, with their values restored from `dir/knobs.json` when there (a
    /// restored value is clamped to the bounds declared now).
    ///
    /// A `knobs.json` that exists but cannot be read or parsed is returned as the error beside
    /// knobs at their initial values that are never persisted: the file is kept as it is for
    /// the operator, not reset by the next change.
    pub fn load(configs: Vec<KnobConfig>, dir: Option<&Path>) -> (Knobs, Option<StateError>) {
        let file = dir.map(|d| StateFile::new(d.join("knobs.json")));
        let (saved, file, error) = match file.as_ref().map(StateFile::load) {
            None => (BTreeMap::new(), None, None),
            Some(Ok(saved)) => (saved.unwrap_or_default(), file, None),
            Some(Err(err)) => (BTreeMap::new(), None, Some(err)),
        };
        let saved: BTreeMap<String, KnobState> = saved;
        let mut states = BTreeMap::new();
        for c in &configs {
            let st = match saved.get(&c.name) {
                Some(s) => KnobState {
                    value: c.clamp(s.value),
                    ..s.clone()
                },
                None => KnobState {
                    value: c.clamp(c.initial),
                    ..KnobState::default()
                },
            };
            states.insert(c.name.clone(), st);
        }
        let knobs = Knobs {
            configs: configs.into_iter().map(|c| (c.name.clone(), c)).collect(),
            states: Mutex::new(states),
            file,
        };
        (knobs, error)
    }

    /// A knob's declaration.
    pub fn config(&self, name: &str) -> Option<&KnobConfig> {
        self.configs.get(name)
    }

    /// A copy of a knob's state.
    pub fn state(&self, name: &str) -> Option<KnobState> {
        self.lock().get(name).cloned()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, KnobState>> {
        self.states.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Changes a knob's state with `f` and persists the result.
    pub fn update<T>(&self, name: &str, f: impl FnOnce(&mut KnobState) -> T) -> Option<T> {
        let (out, snapshot) = {
            let mut states = self.lock();
            let st = states.get_mut(name)?;
            let out = f(st);
            // Stamped under the lock: the newest snapshot is the one that stays on disk.
            let snapshot = self.file.as_ref().and_then(|file| {
                serde_json::to_vec_pretty(&*states)
                    .ok()
                    .map(|bytes| (file.clone(), file.stamp(), bytes))
            });
            (out, snapshot)
        };
        if let Some((file, stamp, bytes)) = snapshot {
            save_detached(file, stamp, bytes);
        }
        Some(out)
    }

    /// Every knob's view.
    pub fn views(&self) -> Vec<KnobView> {
        let states = self.lock();
        self.configs
            .values()
            .filter_map(|c| {
                let s = states.get(&c.name)?;
                Some(KnobView {
                    name: c.name.clone(),
                    value: s.value,
                    min: c.min,
                    max: c.max,
                    status: s.status.clone(),
                    paused: s.paused.clone(),
                    changed_ms: s.changed_ms,
                })
            })
            .collect()
    }
}

/// Writes a state file's snapshot on the blocking pool (the async workers never wait on the
/// disk), or here when called outside a runtime. The writer keeps the newest snapshot, so
/// writes finishing out of order never leave an older one behind; a failure is logged (and
/// counted by the state file).
pub fn save_detached(file: StateFile, stamp: u64, bytes: Vec<u8>) {
    let write = move || {
        if let Err(err) = file.write_blocking(stamp, &bytes) {
            tracing::warn!(error = %err, "persisting state failed");
        }
    };
    match tokio::runtime::Handle::try_current() {
        Ok(rt) => {
            rt.spawn_blocking(write);
        }
        Err(_) => write(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::settings::HumanDuration;

    fn batch() -> KnobConfig {
        KnobConfig {
            name: "batch_size".into(),
            initial: 1000.0,
            min: 100.0,
            max: 2000.0,
            integer: true,
            redis_key: None,
            redis_target: None,
            webhook: None,
        }
    }

    fn controller() -> KnobAction {
        KnobAction {
            name: "batch_size".into(),
            set: None,
            scale: None,
            step: None,
            controller: Some(Controller {
                high: 0.8,
                low: 0.5,
                decrease_factor: Some(0.5),
                increase_step: 100.0,
                down_stabilization: Some(HumanDuration(Duration::from_secs(30))),
                up_stabilization: Some(HumanDuration(Duration::from_secs(60))),
                max_change: None,
                budget_period: None,
            }),
        }
    }

    /// Feeds (time s, cpu) pairs and returns (value, status) after each.
    fn run(cfg: &KnobConfig, action: &KnobAction, series: &[(i64, f64)]) -> Vec<(f64, String)> {
        let mut st = KnobState {
            value: cfg.initial,
            ..KnobState::default()
        };
        series
            .iter()
            .map(|(t, cpu)| {
                let p = plan(cfg, &st, action, *cpu, t * 1000);
                commit(&mut st, &p, t * 1000);
                (st.value, st.status.clone())
            })
            .collect()
    }

    #[test]
    fn the_controller_follows_a_scripted_cpu_series() {
        let got = run(
            &batch(),
            &controller(),
            &[
                (0, 0.9),   // pressure: halve at once
                (15, 0.95), // still: within the 30 s down window
                (30, 0.9),  // window passed: halve again
                (45, 0.7),  // dead band: hold
                (60, 0.3),  // calm, but within 60 s of the last decrease
                (90, 0.3),  // 60 s since the decrease: one step up
                (105, 0.3), // one step per minute
                (150, 0.3), // a minute on: another step
                (165, 0.99),
                (180, 0.99),
                (195, 0.99), // 30 s after: halve (min 100 bounds it)
                (225, 0.99),
            ],
        );
        let want = [
            (500.0, "Decreased"),
            (500.0, "DownStabilized"),
            (250.0, "Decreased"),
            (250.0, "WithinDeadBand"),
            (250.0, "UpStabilized"),
            (350.0, "Increased"),
            (350.0, "UpStabilized"),
            (450.0, "Increased"),
            (225.0, "Decreased"),
            (225.0, "DownStabilized"),
            (113.0, "Decreased"),
            (100.0, "Decreased"),
        ];
        let got: Vec<(f64, &str)> = got.iter().map(|(v, s)| (*v, s.as_str())).collect();
        assert_eq!(got, want);
        // And at the bound it says so.
        let again = run(
            &batch(),
            &controller(),
            &[
                (0, 0.9),
                (40, 0.9),
                (80, 0.9),
                (120, 0.9),
                (160, 0.9),
                (200, 0.9),
            ],
        );
        assert_eq!(again.last().unwrap(), &(100.0, "AtMin".to_owned()));
    }

    #[test]
    fn the_change_budget_limits_total_movement_per_period() {
        let mut action = controller();
        if let Some(c) = action.controller.as_mut() {
            c.max_change = Some(600.0);
            c.budget_period = Some(HumanDuration(Duration::from_secs(600)));
            c.down_stabilization = None;
        }
        let got = run(
            &batch(),
            &action,
            &[(0, 0.9), (10, 0.9), (20, 0.9), (700, 0.9)],
        );
        let got: Vec<(f64, &str)> = got.iter().map(|(v, s)| (*v, s.as_str())).collect();
        // 1000 → 500 (500 used), → 400 (only 100 left), exhausted; after the period, again.
        assert_eq!(
            got,
            [
                (500.0, "Decreased"),
                (400.0, "BudgetLimited"),
                (400.0, "BudgetExhausted"),
                (200.0, "Decreased")
            ]
        );
    }

    #[test]
    fn set_scale_and_step_stay_within_bounds() {
        let cfg = batch();
        let st = KnobState {
            value: 1000.0,
            ..KnobState::default()
        };
        let mk = |set, scale, step| KnobAction {
            name: "batch_size".into(),
            set,
            scale,
            step,
            controller: None,
        };
        assert_eq!(
            plan(&cfg, &st, &mk(Some(5000.0), None, None), 0.0, 0).after,
            2000.0
        );
        assert_eq!(
            plan(&cfg, &st, &mk(None, Some(0.01), None), 0.0, 0).after,
            100.0
        );
        assert_eq!(
            plan(&cfg, &st, &mk(None, None, Some(33.4)), 0.0, 0).after,
            1033.0
        );
        assert_eq!(plan(&cfg, &st, &controller(), f64::NAN, 0).status, "NoData");
    }

    #[test]
    fn values_persist_and_are_clamped_to_new_bounds() {
        let dir = tempfile::tempdir().unwrap();
        let (knobs, err) = Knobs::load(vec![batch()], Some(dir.path()));
        assert!(err.is_none());
        knobs.update("batch_size", |s| s.value = 1800.0).unwrap();
        let (again, _) = Knobs::load(vec![batch()], Some(dir.path()));
        assert_eq!(again.state("batch_size").unwrap().value, 1800.0);
        let mut narrower = batch();
        narrower.max = 1500.0;
        let (clamped, _) = Knobs::load(vec![narrower], Some(dir.path()));
        assert_eq!(clamped.state("batch_size").unwrap().value, 1500.0);
        assert!(clamped.update("missing", |_| ()).is_none());
    }

    #[test]
    fn an_unreadable_knobs_file_is_an_error_and_is_never_written_over() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("knobs.json");
        std::fs::write(&path, b"{\"batch_size\": {\"value\": 17").unwrap();
        let (knobs, err) = Knobs::load(vec![batch()], Some(dir.path()));
        let err = err.expect("a torn knobs.json is an error").to_string();
        assert!(err.contains("knobs.json"), "{err}");
        assert_eq!(knobs.state("batch_size").unwrap().value, 1000.0);
        knobs.update("batch_size", |s| s.value = 1800.0).unwrap();
        assert_eq!(
            std::fs::read(&path).unwrap(),
            b"{\"batch_size\": {\"value\": 17",
            "the file is kept for the operator"
        );
    }

    #[test]
    fn controller_settings_are_checked() {
        let mut c = controller().controller.unwrap();
        assert!(check_controller(&c).is_ok());
        c.low = 0.9;
        assert!(check_controller(&c).unwrap_err().contains("below high"));
        c.low = 0.5;
        c.decrease_factor = Some(1.5);
        assert!(check_controller(&c).is_err());
    }
}
