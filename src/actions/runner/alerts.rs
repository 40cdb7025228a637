//! The Alertmanager alert lifecycle. An `alertmanager` action of a rule registers its alert,
//! one per episode (rule, instance, episode start) and Alertmanager, in `alerts.json` in the
//! data directory **before** the first POST, so that nothing sent is ever unknown here. The
//! stage resends the registered alerts every `alert_resend` (each valid for four resends, so a
//! dead autotuner's alerts expire by themselves), also after a restart, and resolves them
//! (`endsAt` now, recorded in the audit log) when the rule resolves or when the rule itself is
//! gone (deleted or edited away: the wiring tells the stage the current rule names through
//! [`Actions::rules_changed`]), or when its instance is no longer firing although no resolution
//! arrived (one dropped on a full request channel: the wiring also reports the firing instances
//! through [`Actions::firing_now`]). A playbook's alert has no rule to keep it firing: it is
//! sent once and expires.
//!
//! Uses the stage (`super`), the executors' HTTP helper, the audit types and `statefile`.

use std::collections::{BTreeMap, HashSet};
use std::sync::PoisonError;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use super::super::exec::{self, Outcome};
use super::super::knobs;
use super::super::{ActionRequest, AlertmanagerAction};
use super::{Actions, labels_of, now_ms};
use crate::audit::{Record, rfc3339};

/// One alert episode sent to one Alertmanager.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(super) struct SentAlert {
    /// The rule that fires it.
    pub(super) rule: String,
    /// The rule instance (its labels, as text).
    pub(super) instance: String,
    /// The episode's start (ms).
    pub(super) episode_ms: i64,
    /// The Alertmanager's `/api/v2/alerts` URL.
    pub(super) url: String,
    /// The alert as posted (`endsAt` is renewed on every send).
    pub(super) alert: Value,
    /// The instance's labels.
    #[serde(default)]
    pub(super) labels: BTreeMap<String, String>,
    /// When it was registered (ms).
    #[serde(default)]
    pub(super) registered_ms: i64,
}

impl SentAlert {
    fn key(&self) -> (String, String, i64, String) {
        (
            self.rule.clone(),
            self.instance.clone(),
            self.episode_ms,
            self.url.clone(),
        )
    }
}

/// The registered alerts, in `alerts.json`.
#[derive(Debug, Default, Serialize, Deserialize)]
pub(super) struct AlertBook {
    pub(super) alerts: Vec<SentAlert>,
}

impl Actions {
    fn alerts(&self) -> std::sync::MutexGuard<'_, AlertBook> {
        self.inner
            .alerts
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Changes the registered alerts with `f` and writes them (stamped under the lock, off the
    /// async workers).
    fn change_alerts<T>(&self, f: impl FnOnce(&mut AlertBook) -> T) -> T {
        let (out, snapshot) = {
            let mut book = self.alerts();
            let out = f(&mut book);
            let snapshot = self.inner.alert_file.as_ref().and_then(|file| {
                serde_json::to_vec(&*book)
                    .ok()
                    .map(|bytes| (file.clone(), file.stamp(), bytes))
            });
            (out, snapshot)
        };
        if let Some((file, stamp, bytes)) = snapshot {
            knobs::save_detached(file, stamp, bytes);
        }
        out
    }

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

    fn resend_ms(&self) -> i64 {
        i64::try_from(self.inner.config.alert_resend.as_millis()).unwrap_or(60_000)
    }

    pub(super) async fn send_alert(
        &self,
        a: &AlertmanagerAction,
        req: &ActionRequest,
    ) -> Result<Outcome, String> {
        // Prometheus's rule: an alert lasts four resend intervals unless renewed, so a dead
        // autotuner's alerts resolve by themselves.
        let body = self.alert_body(req, now_ms() + 4 * self.resend_ms());
        let url = format!("{}/api/v2/alerts", a.url.trim_end_matches('/'));
        let sent = SentAlert {
            rule: req.rule.clone(),
            instance: req.labels.to_string(),
            episode_ms: req.episode_ms,
            url: url.clone(),
            alert: body.clone(),
            labels: labels_of(req),
            registered_ms: now_ms(),
        };
        let key = sent.key();
        let tracked = req.actor == "engine";
        if tracked {
            // Registered first: a resolution that comes while this POST (or its retries) is
            // under way finds it.
            self.change_alerts(|book| {
                book.alerts.retain(|x| x.key() != key);
                book.alerts.push(sent);
            });
        }
        let out = exec::post_json(
            &self.inner.services.http,
            &url,
            &json!([body.clone()]),
            Duration::from_secs(5),
            2,
        )
        .await;
        // Resolved while it was being sent: the firing POST may have reached Alertmanager
        // after the resolution did, so the resolution is sent again.
        if tracked && !self.alerts().alerts.iter().any(|x| x.key() == key) {
            let mut resolved = body;
            resolved["endsAt"] = json!(rfc3339(now_ms()));
            if let Err(e) = exec::post_json(
                &self.inner.services.http,
                &url,
                &json!([resolved]),
                Duration::from_secs(5),
                2,
            )
            .await
            {
                tracing::warn!(error = %e, "resolving an alert resolved while it was sent failed");
            }
        }
        out
    }

    /// Resends every registered alert with its validity renewed.
    pub(super) async fn resend_alerts(&self) {
        let active = self.alerts().alerts.clone();
        for mut a in active {
            a.alert["endsAt"] = json!(rfc3339(now_ms() + 4 * self.resend_ms()));
            if let Err(e) = exec::post_json(
                &self.inner.services.http,
                &a.url,
                &json!([a.alert]),
                Duration::from_secs(5),
                0,
            )
            .await
            {
                tracing::warn!(error = %e, "resending an alert failed; the next resend retries");
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
        let labels = req.labels.to_string();
        let gone = self.take_alerts(|a| a.rule == req.rule && a.instance == labels);
        let base = self.base(req, self.mode(req), None, None);
        self.resolve_alerts(gone, &base, "resolved").await;
    }

    /// The rules that exist now (after a reload, and once at start): the alerts of a rule that
    /// is gone are resolved, as Prometheus resolves a deleted rule's alerts.
    pub async fn rules_changed(&self, names: &HashSet<String>) {
        let gone = self.take_alerts(|a| !names.contains(&a.rule));
        if gone.is_empty() {
            return;
        }
        let now = now_ms();
        for a in &gone {
            tracing::info!(rule = %a.rule, "the rule is gone: its Alertmanager alert is resolved");
        }
        let base = Record {
            time: rfc3339(now),
            ts_ms: now,
            actor: "engine".into(),
            event: Some("rule_removed".into()),
            ..Record::default()
        };
        self.resolve_alerts(gone, &base, "rule_removed").await;
    }

    /// The rule instances firing now, as the engine saw them at or after `seen_ms`: an alert
    /// registered before then whose instance is not among them lost its resolution (a request
    /// the engine dropped on a full channel) and is resolved now.
    pub async fn firing_now(
        &self,
        seen_ms: i64,
        firing: &HashSet<(String, BTreeMap<String, String>)>,
    ) {
        let gone = self.take_alerts(|a| {
            a.registered_ms < seen_ms && !firing.contains(&(a.rule.clone(), a.labels.clone()))
        });
        if gone.is_empty() {
            return;
        }
        for a in &gone {
            tracing::warn!(rule = %a.rule, instance = %a.instance, "an alert's rule instance is no longer firing but its resolution never arrived: resolved now");
        }
        let now = now_ms();
        let base = Record {
            time: rfc3339(now),
            ts_ms: now,
            actor: "engine".into(),
            event: Some("resolved".into()),
            ..Record::default()
        };
        self.resolve_alerts(gone, &base, "not_firing").await;
    }

    fn take_alerts(&self, which: impl Fn(&SentAlert) -> bool) -> Vec<SentAlert> {
        self.change_alerts(|book| {
            let (gone, kept) = std::mem::take(&mut book.alerts)
                .into_iter()
                .partition(|a| which(a));
            book.alerts = kept;
            gone
        })
    }

    /// Sends `gone` with `endsAt` now, each recorded in the audit log from `base`.
    async fn resolve_alerts(&self, gone: Vec<SentAlert>, base: &Record, why: &str) {
        for mut a in gone {
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
            let mut r = base.clone();
            r.time = rfc3339(now_ms());
            r.ts_ms = now_ms();
            r.rule = Some(a.rule.clone());
            r.phase = "resolved".into();
            r.action = Some("alertmanager".into());
            r.target = Some(shown);
            r.result = json!({ "why": why, "episode_start": rfc3339(a.episode_ms) });
            match out {
                Ok(o) => {
                    r.decision = "applied".into();
                    r.result["response"] = o.result;
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
