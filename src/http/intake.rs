//! The Alertmanager webhook receiver's state: alerts received from Prometheus (through
//! Alertmanager) become the series `autotuner_alert{alertname, <the alert's labels>}` = 1 while
//! firing, published in the registry, so rules match them with PromQL like any other metric:
//!
//! ```yaml
//! expr: autotuner_alert{alertname="PostgresSlowQueries", severity="critical"}
//! ```
//!
//! Alertmanager delivers at least once: a delivery is deduplicated by (fingerprint, status,
//! startsAt), remembered for a day. A resolved notification removes the alert's series, which
//! resolves the rule (and resolving never acts). A firing alert not delivered again for a day
//! is dropped (Alertmanager repeats firing alerts every `repeat_interval`, 4 h by default).
//!
//! Uses `registry` and `sample`.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, PoisonError};

use serde::Deserialize;

use crate::registry::Registry;
use crate::sample::Families;

/// The name of the collector whose snapshot holds the received alerts.
pub const COLLECTOR: &str = "alertmanager_webhook";

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

#[derive(Debug, Default)]
struct State {
    /// (fingerprint, status, startsAt) → when seen.
    seen: HashMap<(String, String, String), i64>,
    /// fingerprint → (labels, last delivery).
    firing: HashMap<String, (BTreeMap<String, String>, i64)>,
}

/// The receiver.
pub struct AlertIntake {
    registry: Arc<Registry>,
    state: Mutex<State>,
}

impl AlertIntake {
    /// A receiver publishing into `registry`.
    pub fn new(registry: Arc<Registry>) -> AlertIntake {
        AlertIntake {
            registry,
            state: Mutex::new(State::default()),
        }
    }

    /// Takes one delivery at `now_ms`.
    pub fn receive(&self, payload: Payload, now_ms: i64) -> Received {
        let mut out = Received {
            truncated: payload.truncated_alerts,
            ..Received::default()
        };
        let families = {
            let mut st = self.state.lock().unwrap_or_else(PoisonError::into_inner);
            st.seen.retain(|_, t| now_ms - *t < MEMORY_MS);
            st.firing.retain(|_, (_, t)| now_ms - *t < MEMORY_MS);
            for a in payload.alerts {
                // Without a fingerprint (another sender), the sorted labels identify the alert.
                let fp = if a.fingerprint.is_empty() {
                    format!("{:?}", a.labels)
                } else {
                    a.fingerprint.clone()
                };
                let key = (fp.clone(), a.status.clone(), a.starts_at.clone());
                if st.seen.contains_key(&key) {
                    out.duplicates += 1;
                    if a.status == "firing"
                        && let Some(f) = st.firing.get_mut(&fp)
                    {
                        f.1 = now_ms;
                    }
                    continue;
                }
                st.seen.insert(key, now_ms);
                match a.status.as_str() {
                    "firing" => {
                        out.firing += 1;
                        st.firing.insert(fp, (a.labels, now_ms));
                    }
                    "resolved" => {
                        out.resolved += 1;
                        st.firing.remove(&fp);
                    }
                    _ => {}
                }
            }
            let mut f = Families::new();
            for (labels, _) in st.firing.values() {
                let pairs: Vec<(&str, &str)> = labels
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
            f.into_vec()
        };
        self.registry.publish(COLLECTOR, families, now_ms);
        out
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
}
