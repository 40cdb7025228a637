//! Scheduled playbooks: a playbook with `schedule:` also runs on its own at the times its cron
//! pattern gives in its time zone, as actor `schedule`, through the same gate and audit log as
//! any run.
//!
//! Owns when scheduled runs start, `schedules.json` (the last time each schedule fired, so a
//! restart knows what it missed) and the audit records of runs not started. Uses the stage
//! (`super`), the playbooks' `ScheduleSpec`, croner (the patterns) and chrono-tz (the zones).
//!
//! Runs of one schedule never overlap: a time that comes while the previous run is still going
//! is skipped and recorded (`skipped_overlap`). A time missed while the process was down is,
//! at the next start, either recorded as missed (`skipped_missed`, the default) or run once
//! (`missed: run_once`), however many were missed. A first start runs nothing it "missed".

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use chrono::TimeZone as _;

use super::super::playbook::{Missed, ScheduleSpec};
use super::{Actions, now_ms};
use crate::audit::{Record, rfc3339};
use crate::statefile::StateFile;

/// The next time `cron` fires in `tz` strictly after `after_ms`.
fn next_fire(cron: &croner::Cron, tz: chrono_tz::Tz, after_ms: i64) -> Option<i64> {
    let at = tz.timestamp_millis_opt(after_ms).single()?;
    cron.find_next_occurrence(&at, false)
        .ok()
        .map(|d| d.timestamp_millis())
}

/// When each schedule last fired, kept in `schedules.json`.
struct Fired {
    file: Option<StateFile>,
    last: tokio::sync::Mutex<BTreeMap<String, i64>>,
}

impl Fired {
    fn load(dir: Option<&Path>) -> Fired {
        let mut file = dir.map(|d| StateFile::new(d.join("schedules.json")));
        let last = match file.as_ref().map(StateFile::load::<BTreeMap<String, i64>>) {
            Some(Ok(Some(m))) => m,
            Some(Err(err)) => {
                // Not knowing what was missed, nothing is caught up: a missed run is never
                // made up from a guess.
                tracing::error!(error = %err, "schedules.json unreadable: no missed run is made up, and it is kept as it is for inspection");
                file = None;
                BTreeMap::new()
            }
            _ => BTreeMap::new(),
        };
        Fired {
            file,
            last: tokio::sync::Mutex::new(last),
        }
    }

    async fn set(&self, name: &str, at_ms: i64) {
        let mut last = self.last.lock().await;
        last.insert(name.to_owned(), at_ms);
        if let Some(f) = &self.file {
            let Ok(bytes) = serde_json::to_vec(&*last) else {
                return;
            };
            if let Err(err) = f.write(f.stamp(), bytes).await {
                tracing::warn!(error = %err, "writing schedules.json failed");
            }
        }
    }
}

impl Actions {
    /// Runs every scheduled playbook at its times until shutdown.
    pub async fn run_schedules(
        self,
        data_dir: Option<std::path::PathBuf>,
        shutdown: crate::shutdown::Shutdown,
    ) {
        let fired = Arc::new(Fired::load(data_dir.as_deref()));
        let mut tasks = tokio::task::JoinSet::new();
        for (name, spec) in &self.inner.playbooks.by_name {
            let Some(schedule) = spec.schedule.clone() else {
                continue;
            };
            // Checked when the playbooks loaded; an error here cannot happen.
            let Ok((cron, tz)) = schedule.parsed() else {
                continue;
            };
            tasks.spawn(self.clone().schedule(
                name.clone(),
                schedule,
                cron,
                tz,
                fired.clone(),
                shutdown.clone(),
            ));
        }
        while tasks.join_next().await.is_some() {}
    }

    async fn schedule_note(&self, name: &str, decision: &str, why: String) {
        let now = now_ms();
        tracing::warn!(playbook = name, decision, reason = %why, "scheduled run not started");
        self.record(Record {
            time: rfc3339(now),
            ts_ms: now,
            phase: "schedule".into(),
            decision: decision.into(),
            actor: "schedule".into(),
            rule: Some(format!("playbook:{name}")),
            error: Some(why),
            ..Record::default()
        })
        .await;
    }

    async fn schedule(
        self,
        name: String,
        spec: ScheduleSpec,
        cron: croner::Cron,
        tz: chrono_tz::Tz,
        fired: Arc<Fired>,
        mut shutdown: crate::shutdown::Shutdown,
    ) {
        let running = Arc::new(AtomicBool::new(false));
        let start = |at_ms: i64| {
            let me = self.clone();
            let (name, running) = (name.clone(), running.clone());
            running.store(true, Ordering::SeqCst);
            tokio::spawn(async move {
                tracing::info!(playbook = %name, at = %rfc3339(at_ms), "scheduled run");
                if let Err(e) = me.run_playbook_as(&name, "schedule", spec.mode).await {
                    tracing::warn!(playbook = %name, error = %e, "scheduled run failed");
                }
                running.store(false, Ordering::SeqCst);
            });
        };
        let now = now_ms();
        let last = fired.last.lock().await.get(&name).copied();
        if let Some(due) = last
            .and_then(|l| next_fire(&cron, tz, l))
            .filter(|d| *d <= now)
        {
            match spec.missed {
                Missed::RunOnce => start(now),
                Missed::Skip => {
                    self.schedule_note(
                        &name,
                        "skipped_missed",
                        format!(
                            "the run due at {} (and any after it) was missed while autotuner was down; `missed: run_once` would run it now",
                            rfc3339(due)
                        ),
                    )
                    .await;
                }
            }
        }
        fired.set(&name, now).await;
        let mut after = now;
        loop {
            let Some(next) = next_fire(&cron, tz, after) else {
                tracing::warn!(playbook = %name, "the schedule never fires again");
                return;
            };
            let wait = Duration::from_millis(u64::try_from(next - now_ms()).unwrap_or(0));
            tokio::select! {
                _ = shutdown.wait() => return,
                _ = tokio::time::sleep(wait) => {}
            }
            after = next;
            // Woken long after the time (a paused machine, the clock stepped forward): the
            // times passed meanwhile are missed, not run in a burst one after another.
            let late = now_ms() - next;
            if late > 60_000 {
                self.schedule_note(
                    &name,
                    "skipped_missed",
                    format!(
                        "the run due at {} came {}s late (the machine paused or the clock jumped); the next is run on time",
                        rfc3339(next),
                        late / 1000
                    ),
                )
                .await;
                after = now_ms();
                fired.set(&name, after).await;
                continue;
            }
            if running.load(Ordering::SeqCst) {
                self.schedule_note(
                    &name,
                    "skipped_overlap",
                    format!(
                        "the run due at {} did not start: the previous run is still going",
                        rfc3339(next)
                    ),
                )
                .await;
            } else {
                start(next);
            }
            fired.set(&name, next).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn next_fire_follows_the_pattern_in_its_zone() {
        let spec = ScheduleSpec {
            cron: "0 3 * * *".into(),
            timezone: "Europe/Berlin".into(),
            missed: Missed::Skip,
            mode: None,
        };
        let (cron, tz) = spec.parsed().unwrap();
        // 2026-12-07 00:00 UTC: 03:00 in Berlin (UTC+1 in winter) is 02:00 UTC.
        let midnight = 1_796_601_600_000;
        assert_eq!(
            next_fire(&cron, tz, midnight),
            Some(midnight + 2 * 3_600_000)
        );
        // Seconds first when six fields are given.
        let every2 = ScheduleSpec {
            cron: "*/2 * * * * *".into(),
            ..spec.clone()
        };
        let (cron, tz) = every2.parsed().unwrap();
        assert_eq!(next_fire(&cron, tz, midnight), Some(midnight + 2_000));
        let bad = ScheduleSpec {
            cron: "61 * * * *".into(),
            ..spec.clone()
        };
        assert!(bad.parsed().unwrap_err().contains("invalid cron pattern"));
        let zone = ScheduleSpec {
            timezone: "Mars/Olympus".into(),
            ..spec
        };
        assert!(zone.parsed().unwrap_err().contains("unknown time zone"));
    }
}
