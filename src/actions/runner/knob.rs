//! Knob moves made by rules and by the admin API: planning (after checking the mirror for a
//! change made by someone else, which pauses the controller), committing, and pushing the new
//! value to its Redis key and webhook.
//!
//! Uses the stage (`super`), the knobs and the executors' HTTP helper.

use std::time::{Duration, Instant};

use serde_json::{Value, json};

use super::super::exec::{self, Outcome};
use super::super::knobs;
use super::super::{ActionRequest, KnobAction};
use super::{Actions, now_ms};
use crate::audit::{Record, rfc3339};

impl Actions {
    pub(super) fn knob_status(&self, name: &str, status: &str) {
        self.inner
            .knobs
            .update(name, |st| st.status = status.to_owned());
    }

    /// Plans a knob move, first checking its mirror for a change made by someone else.
    pub(super) async fn plan_knob(
        &self,
        k: &KnobAction,
        req: &ActionRequest,
    ) -> Result<knobs::Plan, (&'static str, String)> {
        let knobs = &self.inner.knobs;
        let (Some(cfg), Some(st)) = (knobs.config(&k.name), knobs.state(&k.name)) else {
            return Err((
                "failed",
                format!("no knob named {:?} in the configuration's `knobs`", k.name),
            ));
        };
        if let Some(key) = &cfg.redis_key
            && let Ok(h) = self.inner.services.redis(cfg.redis_target.as_deref())
        {
            let mut conn = h.connection();
            let found: Result<Option<String>, _> = redis::AsyncCommands::get(&mut conn, key).await;
            match found {
                Ok(found) => {
                    let ours = st.mirrored.clone();
                    let foreign = match (&found, &ours) {
                        (Some(f), Some(o)) => f != o,
                        // Never written by us, and someone set it: theirs.
                        (Some(_), None) => st.changed_ms.is_some(),
                        (None, _) => false,
                    };
                    if foreign {
                        let why = format!(
                            "Redis key {key:?} holds {:?}, not the {:?} written last: someone else is steering this knob; the controller stays paused until the key holds our value again or is deleted",
                            found.unwrap_or_default(),
                            ours.unwrap_or_default()
                        );
                        if st.paused.is_none() {
                            tracing::warn!(knob = %k.name, reason = %why, "knob controller paused");
                        }
                        knobs.update(&k.name, |s| s.paused = Some(why.clone()));
                        self.inner
                            .metrics
                            .knob_paused
                            .with_label_values(&[&k.name])
                            .set(1.0);
                        return Err(("skipped_manual_override", why));
                    }
                    if st.paused.is_some() {
                        tracing::info!(knob = %k.name, "knob controller resumed: the mirror holds our value again");
                        knobs.update(&k.name, |s| s.paused = None);
                        self.inner
                            .metrics
                            .knob_paused
                            .with_label_values(&[&k.name])
                            .set(0.0);
                    }
                }
                Err(err) => {
                    tracing::warn!(knob = %k.name, error = %h.failure(&err).message, "could not read the knob's mirror; cannot tell a manual change");
                }
            }
        }
        let st = knobs.state(&k.name).unwrap_or(st);
        Ok(knobs::plan(cfg, &st, k, req.value, now_ms()))
    }

    /// Commits a knob move and pushes it to its mirrors.
    pub(super) async fn apply_knob(
        &self,
        name: &str,
        plan: &knobs::Plan,
        rule: &str,
    ) -> Result<Outcome, String> {
        let knobs = &self.inner.knobs;
        let cfg = knobs
            .config(name)
            .ok_or_else(|| format!("no knob named {name:?}"))?
            .clone();
        let text = cfg.format(plan.after);
        let mut result = serde_json::Map::new();
        result.insert("status".into(), json!(plan.status));
        if let Some(key) = &cfg.redis_key {
            let h = self.inner.services.redis(cfg.redis_target.as_deref())?;
            let mut conn = h.connection();
            let _: () = redis::AsyncCommands::set(&mut conn, key, &text)
                .await
                .map_err(|e| {
                    format!("mirroring to Redis key {key:?}: {}", h.failure(&e).message)
                })?;
            result.insert("redis_key".into(), json!(key));
        }
        let now = now_ms();
        knobs.update(name, |st| {
            knobs::commit(st, plan, now);
            st.mirrored = cfg.redis_key.as_ref().map(|_| text.clone());
        });
        self.inner
            .metrics
            .knob_value
            .with_label_values(&[name])
            .set(plan.after);
        if let Some(url) = &cfg.webhook {
            let body =
                json!({ "knob": name, "value": plan.after, "previous": plan.before, "rule": rule });
            match exec::post_json(
                &self.inner.services.http,
                url,
                &body,
                Duration::from_secs(5),
                2,
            )
            .await
            {
                Ok(o) => {
                    result.insert("webhook".into(), o.result);
                }
                Err(e) => {
                    // The value is set and mirrored; the push failing is recorded, not undone.
                    result.insert("webhook_error".into(), json!(e));
                }
            }
        }
        Ok(Outcome {
            before: json!(plan.before),
            after: json!(plan.after),
            result: Value::Object(result),
        })
    }

    /// Sets a knob through the API: within its bounds, mirrored, audited with its actor.
    pub async fn set_knob(
        &self,
        name: &str,
        value: f64,
        actor: &str,
    ) -> Result<knobs::KnobView, String> {
        if let Some(why) = &self.inner.halted {
            return Err(why.clone());
        }
        let knobs = &self.inner.knobs;
        let (Some(cfg), Some(st)) = (knobs.config(name), knobs.state(name)) else {
            return Err(format!("no knob named {name:?}"));
        };
        if !value.is_finite() || value < cfg.min || value > cfg.max {
            return Err(format!(
                "{value} is outside the bounds of {name:?} ([{}, {}])",
                cfg.min, cfg.max
            ));
        }
        let action = KnobAction {
            name: name.to_owned(),
            set: Some(value),
            scale: None,
            step: None,
            controller: None,
        };
        let plan = knobs::plan(cfg, &st, &action, f64::NAN, now_ms());
        let started = Instant::now();
        let outcome = self.apply_knob(name, &plan, &format!("api:{actor}")).await;
        // An operator's value is ours now: a paused controller resumes from it.
        knobs.update(name, |s| s.paused = None);
        self.inner
            .metrics
            .knob_paused
            .with_label_values(&[name])
            .set(0.0);
        let now = now_ms();
        let mut r = Record {
            time: rfc3339(now),
            ts_ms: now,
            phase: "api".into(),
            actor: actor.into(),
            action: Some("knob".into()),
            target: Some(format!("knob/{name}")),
            params: json!({ "set": value }),
            before: json!(plan.before),
            after: json!(plan.after),
            duration_ms: Some(started.elapsed().as_secs_f64() * 1000.0),
            ..Record::default()
        };
        match &outcome {
            Ok(o) => {
                r.decision = "applied".into();
                r.result = o.result.clone();
            }
            Err(e) => {
                r.decision = "failed".into();
                r.error = Some(e.clone());
            }
        }
        self.write(r).await;
        outcome?;
        self.knobs()
            .into_iter()
            .find(|k| k.name == name)
            .ok_or_else(|| format!("no knob named {name:?}"))
    }
}
