//! The Alertmanager webhook receiver's state: alerts received from Prometheus (through
//! Alertmanager) become the series `autotuner_alert{alertname, <the alert's labels>}` = 1 while
//! firing, published in the registry, so rules match them with PromQL like any other metric:
//!
//! ```yaml
//! expr: autotuner_alert{alertname="PostgresSlowQueries", severity="critical"}
//! ```
//!
//! An alert received as firing stays present until it is resolved: its sample is published
//! again every [`REFRESH`] by [`AlertIntake::run`], because Alertmanager delivers it again only
//! every `repeat_interval` (4 h by default), far beyond the evaluator's 5-minute lookback, and a
//! rule that lost sight of it would resolve (resetting its breaker), a `for:` longer than the
//! lookback could never fire, and the next redelivery would start a new episode and act again.
//! It goes when a resolved notification arrives, when its `endsAt` passes (senders that set
//! one; Alertmanager sends firing alerts without), or when it was not delivered again for a day.
//!
//! An alert's episode is its (fingerprint, startsAt): Alertmanager delivers at least once, and a
//! delivery of an episode already held changes nothing (counted as a duplicate). The held alerts
//! are kept in `received_alerts.json` in the data directory, so a restart does not lose sight of them
//! either.
//!
//! Uses `registry`, `sample`, `statefile` and `shutdown`.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::registry::Registry;
use crate::sample::Families;
use crate::statefile::StateFile;

/// The name of the collector whose snapshot holds the received alerts.
pub const COLLECTOR: &str = "alertmanager_webhook";

/// How often held alerts are published again: well within the evaluator's 5-minute lookback.
pub const REFRESH: Duration = Duration::from_secs(15);

/// The held alerts' file in the data directory.
pub const STATE_FILE: &str = "received_alerts.json";

/// How long deliveries and firing alerts are remembered.
const MEMORY_MS: i64 = 24 * 3600 * 1000;

/// Alertmanager's webhook payload (version 4), the parts we read.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Payload {
    /// `4`.
    #[serde(default)]
    pub version: String,
    /// Alerts left out because of `max_alerts`.
    #[serde(default)]
    pub truncated_alerts: u64,
    /// The alerts.
    pub alerts: Vec<Alert>,
}

/// One alert of a delivery.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Alert {
    /// `firing` or `resolved`.
    pub status: String,
    /// Its labels (`alertname` among them).
    pub labels: BTreeMap<String, String>,
    /// When it started.
    #[serde(default)]
    pub starts_at: String,
    /// When it ends: Alertmanager sends the zero time (`0001-01-01T00:00:00Z`) for a firing
    /// alert; other senders may give the time it stops being valid.
    #[serde(default)]
    pub ends_at: String,
    /// Alertmanager's identity of the label set.
    #[serde(default)]
    pub fingerprint: String,
}

/// What a delivery changed.
#[derive(Debug, Clone, Default, serde::Serialize, PartialEq, Eq)]
pub struct Received {
    /// New firing alerts (or firing again).
    pub firing: usize,
    /// Alerts resolved.
    pub resolved: usize,
    /// Alerts seen before in the same state (at-least-once delivery).
    pub duplicates: usize,
    /// Alerts Alertmanager left out of the delivery (`truncatedAlerts`).
    pub truncated: u64,
}

/// A firing alert held until it is resolved.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
struct Held {
    labels: BTreeMap<String, String>,
    /// The episode, with the fingerprint.
    starts_at: String,
    /// When it stops being valid, when the sender said so.
    ends_at_ms: Option<i64>,
    /// The last delivery of it.
    last_ms: i64,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct Persisted {
    firing: BTreeMap<String, Held>,
}

#[derive(Debug, Default)]
struct State {
    /// (fingerprint, status, startsAt) → when seen.
    seen: HashMap<(String, String, String), i64>,
    /// fingerprint → the alert.
    firing: BTreeMap<String, Held>,
    /// Whether the last publication held any alert (nothing to withdraw otherwise).
    published_any: bool,
    /// When it was.
    published_ms: i64,
}

/// The receiver.
pub struct AlertIntake {
    registry: Arc<Registry>,
    state: Mutex<State>,
    file: Option<StateFile>,
}

/// Milliseconds since the epoch of an RFC 3339 time; `None` for the zero time (year 1) that
/// means "no end", and for text that is not a time.
fn time_ms(text: &str) -> Option<i64> {
    // Year 1 is before what humantime accepts: the zero time is `None` like any non-time.
    let t = humantime::parse_rfc3339_weak(text).ok()?;
    let ms = t.duration_since(std::time::UNIX_EPOCH).ok()?.as_millis();
    i64::try_from(ms).ok().filter(|ms| *ms > 0)
}

impl AlertIntake {
    /// A receiver publishing into `registry`, holding its alerts in memory only.
    pub fn new(registry: Arc<Registry>) -> AlertIntake {
        AlertIntake {
            registry,
            state: Mutex::new(State::default()),
            file: None,
        }
    }

    /// A receiver that keeps its held alerts in `data_dir` (when there is one) and starts with
    /// the ones held there at `now_ms`, published at once so the rules never miss them. An
    /// unreadable file is logged and counted, kept for inspection, and not written over.
    pub fn restore(registry: Arc<Registry>, data_dir: Option<&Path>, now_ms: i64) -> AlertIntake {
        let mut intake = AlertIntake::new(registry);
        let Some(dir) = data_dir else {
            return intake;
        };
        let file = StateFile::new(dir.join(STATE_FILE));
        match file.load::<Persisted>() {
            Ok(saved) => {
                let mut st = intake.lock();
                for (fp, held) in saved.map(|p| p.firing).unwrap_or_default() {
                    st.seen.insert(
                        (fp.clone(), "firing".into(), held.starts_at.clone()),
                        held.last_ms,
                    );
                    st.firing.insert(fp, held);
                }
                if !st.firing.is_empty() {
                    tracing::info!(alerts = st.firing.len(), "received alerts restored");
                }
                drop(st);
                intake.file = Some(file);
            }
            Err(err) => {
                tracing::error!(error = %err, "received alerts not restored; their file is left as it is and not updated");
            }
        }
        intake.refresh(now_ms);
        intake
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Takes one delivery at `now_ms`.
    pub fn receive(&self, payload: Payload, now_ms: i64) -> Received {
        let mut out = Received {
            truncated: payload.truncated_alerts,
            ..Received::default()
        };
        let mut st = self.lock();
        for a in payload.alerts {
            // Without a fingerprint (another sender), the sorted labels identify the alert.
            let fp = if a.fingerprint.is_empty() {
                format!("{:?}", a.labels)
            } else {
                a.fingerprint.clone()
            };
            let key = (fp.clone(), a.status.clone(), a.starts_at.clone());
            if st.seen.insert(key, now_ms).is_some() {
                out.duplicates += 1;
                if a.status == "firing"
                    && let Some(f) = st.firing.get_mut(&fp)
                {
                    f.last_ms = now_ms;
                    f.ends_at_ms = time_ms(&a.ends_at);
                }
                continue;
            }
            match a.status.as_str() {
                "firing" => {
                    out.firing += 1;
                    let held = Held {
                        labels: a.labels,
                        starts_at: a.starts_at,
                        ends_at_ms: time_ms(&a.ends_at),
                        last_ms: now_ms,
                    };
                    st.firing.insert(fp, held);
                }
                "resolved" => {
                    out.resolved += 1;
                    // Only the episode it resolves: a late resolution of an earlier episode
                    // leaves a newer one firing.
                    if st
                        .firing
                        .get(&fp)
                        .is_some_and(|h| h.starts_at == a.starts_at || a.starts_at.is_empty())
                    {
                        st.firing.remove(&fp);
                    }
                }
                _ => {}
            }
        }
        self.publish(&mut st, now_ms);
        out
    }

    /// Publishes the held alerts again at `now_ms`, dropping those whose `endsAt` passed or
    /// that were not delivered for a day. Returns whether any was dropped.
    pub fn refresh(&self, now_ms: i64) -> bool {
        let mut st = self.lock();
        let before = st.firing.len();
        st.firing.retain(|_, h| {
            now_ms - h.last_ms < MEMORY_MS && h.ends_at_ms.is_none_or(|end| now_ms < end)
        });
        let dropped = st.firing.len() != before;
        self.publish(&mut st, now_ms);
        dropped
    }

    fn publish(&self, st: &mut State, now_ms: i64) {
        st.seen.retain(|_, t| now_ms - *t < MEMORY_MS);
        if st.firing.is_empty() && !st.published_any {
            return;
        }
        let mut f = Families::new();
        for held in st.firing.values() {
            let pairs: Vec<(&str, &str)> = held
                .labels
                .iter()
                .filter(|(k, _)| is_label_name(k) && k.as_str() != "__name__")
                .map(|(k, v)| (k.as_str(), v.as_str()))
                .collect();
            f.gauge(
                "autotuner_alert",
                "1 while an alert received from Alertmanager's webhook is firing; rules match it by alertname and labels.",
                &pairs,
                1.0,
            );
        }
        st.published_any = !st.firing.is_empty();
        // The history keeps one point per millisecond: a resolution in the same millisecond as
        // a republication would lose its staleness marker and leave the alert visible.
        let at = now_ms.max(st.published_ms + 1);
        st.published_ms = at;
        self.registry.publish(COLLECTOR, f.into_vec(), at);
    }

    /// Writes the held alerts to the data directory (off the async workers). A failure is
    /// logged; the alerts stay held in memory.
    pub async fn persist(&self) {
        let Some(file) = &self.file else { return };
        let (stamp, bytes) = {
            let st = self.lock();
            let stamp = file.stamp();
            let saved = Persisted {
                firing: st.firing.clone(),
            };
            (stamp, serde_json::to_vec(&saved))
        };
        let written = match bytes {
            Ok(b) => file
                .write(stamp, b)
                .await
                .map(|_| ())
                .map_err(|e| e.to_string()),
            Err(e) => Err(e.to_string()),
        };
        if let Err(err) = written {
            tracing::warn!(error = %err, "persisting the received alerts failed");
        }
    }

    /// Publishes the held alerts every [`REFRESH`] until shutdown.
    pub async fn run(self: Arc<Self>, mut shutdown: crate::shutdown::Shutdown) {
        let mut ticker = tokio::time::interval(REFRESH);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.wait() => break,
                _ = ticker.tick() => {
                    if self.refresh(crate::collect::now_ms()) {
                        self.persist().await;
                    }
                }
            }
        }
    }
}

/// Prometheus's label name syntax; anything else is left out rather than breaking the
/// exposition.
fn is_label_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn payload(status: &str, fp: &str) -> Payload {
        serde_json::from_value(serde_json::json!({
            "version": "4",
            "status": status,
            "alerts": [{
                "status": status,
                "labels": {"alertname": "HighLatency", "service": "api", "bad-name": "x"},
                "annotations": {},
                "startsAt": "2026-12-03T10:00:00Z",
                "endsAt": "0001-01-01T00:00:00Z",
                "fingerprint": fp
            }]
        }))
        .unwrap()
    }

    #[test]
    fn deliveries_are_deduplicated_and_resolution_removes_the_series() {
        let registry = Arc::new(Registry::new(Duration::from_secs(600)).unwrap());
        let intake = AlertIntake::new(registry.clone());
        let r1 = intake.receive(payload("firing", "abc"), 1_000);
        let r2 = intake.receive(payload("firing", "abc"), 2_000);
        assert_eq!((r1.firing, r2.firing, r2.duplicates), (1, 0, 1));
        let text = registry.render();
        assert!(
            text.contains("autotuner_alert{alertname=\"HighLatency\",service=\"api\"} 1"),
            "{text}"
        );
        let r3 = intake.receive(payload("resolved", "abc"), 3_000);
        assert_eq!(r3.resolved, 1);
        assert!(!registry.render().contains("autotuner_alert{"));
        // A resolved notification delivered again changes nothing.
        assert_eq!(
            intake.receive(payload("resolved", "abc"), 4_000).duplicates,
            1
        );
    }

    fn visible(registry: &Registry, at: i64) -> bool {
        // What an instant selector sees at `at`: a sample within the 5-minute lookback.
        registry
            .range("autotuner_alert", at - 300_000 + 1, at)
            .iter()
            .any(|(_, points)| points.last().is_some_and(|p| p.v == 1.0))
    }

    #[test]
    fn a_firing_alert_stays_visible_until_resolved_or_its_end() {
        let registry = Arc::new(Registry::new(Duration::from_secs(3600)).unwrap());
        let intake = AlertIntake::new(registry.clone());
        let t0 = 1_800_000_000_000;
        intake.receive(payload("firing", "abc"), t0);
        for k in 1..=40 {
            let t = t0 + k * 15_000;
            intake.refresh(t);
            assert!(visible(&registry, t), "gone after {}s", k * 15);
        }
        // A late resolution of an earlier episode leaves this one firing.
        let mut late = payload("resolved", "abc");
        late.alerts[0].starts_at = "2026-12-03T09:00:00Z".into();
        intake.receive(late, t0 + 601_000);
        assert!(visible(&registry, t0 + 601_000));
        // Resolved in the millisecond it was published again: gone all the same.
        intake.refresh(t0 + 602_000);
        intake.receive(payload("resolved", "abc"), t0 + 602_000);
        assert!(!visible(&registry, t0 + 602_001));
        intake.refresh(t0 + 615_000);
        assert!(!visible(&registry, t0 + 615_000));

        // A sender's endsAt ends it.
        let mut ending = payload("firing", "def");
        ending.alerts[0].ends_at = "2027-03-01T00:00:30Z".into();
        let start = time_ms("2027-03-01T00:00:00Z").unwrap();
        intake.receive(ending, start);
        intake.refresh(start + 15_000);
        assert!(visible(&registry, start + 15_000));
        intake.refresh(start + 30_000);
        assert!(!visible(&registry, start + 30_000));
    }

    #[tokio::test]
    async fn held_alerts_survive_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let t0 = 1_800_000_000_000;
        let registry = Arc::new(Registry::new(Duration::from_secs(3600)).unwrap());
        let intake = AlertIntake::restore(registry, Some(dir.path()), t0);
        intake.receive(payload("firing", "abc"), t0);
        intake.persist().await;
        drop(intake);
        let registry = Arc::new(Registry::new(Duration::from_secs(3600)).unwrap());
        let intake = AlertIntake::restore(registry.clone(), Some(dir.path()), t0 + 3_600_000);
        assert!(visible(&registry, t0 + 3_600_000));
        // The episode is known: its redelivery is a duplicate, not a new firing.
        let again = intake.receive(payload("firing", "abc"), t0 + 3_700_000);
        assert_eq!((again.firing, again.duplicates), (0, 1));
        // An unreadable file is kept as it is and not written over.
        std::fs::write(dir.path().join(STATE_FILE), b"{not json").unwrap();
        let registry = Arc::new(Registry::new(Duration::from_secs(3600)).unwrap());
        let intake = AlertIntake::restore(registry, Some(dir.path()), t0);
        intake.receive(payload("firing", "xyz"), t0);
        intake.persist().await;
        assert_eq!(
            std::fs::read(dir.path().join(STATE_FILE)).unwrap(),
            b"{not json"
        );
    }
}
