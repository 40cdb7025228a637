//! The Alertmanager alert lifecycle: an `alertmanager` action sends an alert while its rule
//! fires, the stage resends the active ones (so they do not expire), and a resolve sends them
//! with `endsAt` now and records that in the audit log.
//!
//! Uses the stage (`super`), the executors' HTTP helper and the audit types.

use std::collections::BTreeMap;
use std::sync::PoisonError;
use std::time::Duration;

use serde_json::{Value, json};

use super::super::exec::{self, Outcome};
use super::super::{ActionRequest, AlertmanagerAction};
use super::{Actions, ActiveAlert, labels_of, now_ms};
use crate::audit::rfc3339;

impl Actions {
    pub(super) fn alert_body(&self, req: &ActionRequest, ends_ms: i64) -> Value {
        let mut labels = labels_of(req);
        labels.insert("alertname".into(), req.rule.clone());
        let filled: BTreeMap<String, String> = req
            .annotations
            .iter()
            .map(|(k, v)| {
                (
                    k.clone(),
                    crate::sample::template(v, &labels_of(req), req.value),
                )
            })
            .collect();
        json!({
            "labels": labels,
            "annotations": filled,
            "startsAt": rfc3339(req.episode_ms),
            "endsAt": rfc3339(ends_ms),
            "generatorURL": "",
        })
    }

    pub(super) fn alert_key(req: &ActionRequest) -> String {
        format!("{}{}", req.rule, req.labels)
    }

    pub(super) async fn send_alert(
        &self,
        a: &AlertmanagerAction,
        req: &ActionRequest,
    ) -> Result<Outcome, String> {
        // Prometheus's rule: an alert lasts four resend intervals unless renewed, so a dead
        // autotuner's alerts resolve by themselves.
        let resend = i64::try_from(self.inner.config.alert_resend.as_millis()).unwrap_or(60_000);
        let body = self.alert_body(req, now_ms() + 4 * resend);
        let url = format!("{}/api/v2/alerts", a.url.trim_end_matches('/'));
        let out = exec::post_json(
            &self.inner.services.http,
            &url,
            &json!([body.clone()]),
            Duration::from_secs(5),
            2,
        )
        .await?;
        let mut alerts = self
            .inner
            .alerts
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let list = alerts.entry(Self::alert_key(req)).or_default();
        list.retain(|x| x.url != url);
        list.push(ActiveAlert { url, alert: body });
        Ok(out)
    }

    pub(super) async fn resend_alerts(&self) {
        let resend = i64::try_from(self.inner.config.alert_resend.as_millis()).unwrap_or(60_000);
        let active: Vec<ActiveAlert> = {
            let alerts = self
                .inner
                .alerts
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            alerts.values().flatten().cloned().collect()
        };
        for mut a in active {
            a.alert["endsAt"] = json!(rfc3339(now_ms() + 4 * resend));
            if let Err(e) = exec::post_json(
                &self.inner.services.http,
                &a.url,
                &json!([a.alert]),
                Duration::from_secs(5),
                0,
            )
            .await
            {
                tracing::warn!(url = %crate::actions::redact::url(&a.url), error = %e, "resending an alert failed; the next resend retries");
            }
        }
    }

    pub(super) async fn resolved(&self, req: &ActionRequest) {
        let instance = req.instance();
        {
            let mut g = self.gates();
            g.enforce.cleared(&instance);
            g.rehearsal.cleared(&instance);
        }
        self.persist_gates();
        let sent = {
            let mut alerts = self
                .inner
                .alerts
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            alerts.remove(&Self::alert_key(req)).unwrap_or_default()
        };
        for mut a in sent {
            a.alert["endsAt"] = json!(rfc3339(now_ms()));
            let out = exec::post_json(
                &self.inner.services.http,
                &a.url,
                &json!([a.alert]),
                Duration::from_secs(5),
                2,
            )
            .await;
            let shown = crate::settings::secret::SecretUrl::parse(&a.url)
                .map_or_else(|_| String::new(), |u| u.redacted().to_owned());
            let mut r = self.base(req, self.mode(req), None, Some(&shown));
            r.phase = "resolved".into();
            r.action = Some("alertmanager".into());
            match out {
                Ok(o) => {
                    r.decision = "applied".into();
                    r.result = o.result;
                }
                Err(e) => {
                    r.decision = "failed".into();
                    r.error = Some(e);
                }
            }
            self.write(r).await;
        }
    }
}
