//! Acting on one request: each action in the rule's order through the gate (mode, cooldown,
//! rate limits, one in flight per target, breaker), its intent written to the audit log before
//! it runs, its execution under `actions.timeout`, its result recorded and counted; then the
//! breaker and cooldown accounting and the verification that is due. Also the `index_advice`
//! action, which needs the stage's advisors and the gate's creation hold.
//!
//! Uses the stage (`super`), the executors, the gate, the advisor and the audit types.

use std::time::{Duration, Instant};

use serde_json::{Value, json};

use super::super::exec::{self, Outcome};
use super::super::gate::{Ask, Verdict};
use super::super::knobs;
use super::super::{ActionRequest, ActionSpec, Mode};
use super::{Actions, StepOutcome, now_ms};
use crate::audit::{Record, rfc3339};
use std::sync::atomic::Ordering;

/// A target's in-flight mark in the enforcing gate, held while its action runs.
struct InFlight<'a> {
    actions: &'a Actions,
    target: String,
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.actions.gates().enforce.finish(&self.target);
    }
}

impl Actions {
    pub(super) async fn act(&self, req: &ActionRequest) -> Vec<StepOutcome> {
        let mut outcomes = Vec::new();
        let mode = self.mode(req);
        if let Some(why) = &self.inner.halted {
            // Fail closed: nothing is run or rehearsed; each refusal is recorded (when the
            // audit can be written) with the reason.
            for spec in &req.actions {
                let target = exec::target_of(spec, &self.inner.services);
                let mut record = self.base(req, mode, Some(spec), Some(&target));
                record.decision = "skipped_stopped".into();
                record.error = Some(why.clone());
                self.count(&req.rule, spec.kind(), "skipped_stopped");
                self.step(&mut outcomes, record).await;
            }
            return outcomes;
        }
        let instance = req.instance();
        self.inner
            .metrics
            .breaker_open
            .with_label_values(&[&req.rule])
            .add(0.0);
        // Acted: counts for the cooldown and the breaker. Executed: something ran and
        // succeeded, so a verification is due.
        let mut acted = false;
        let mut executed = false;
        let mut rehearsed = false;
        let mut knob_moves: Vec<(String, f64, f64)> = Vec::new();
        for (i, spec) in req.actions.iter().enumerate() {
            // Read again before each action: the kill switch stops a burst in progress.
            let mode = self.mode(req);
            let kind = spec.kind();
            let target = exec::target_of(spec, &self.inner.services);
            let key = req.idempotency_key(i);
            let mut record = self.base(req, mode, Some(spec), Some(&target));
            record.idempotency_key = Some(key.clone());

            // A knob move is planned before the gate: a controller holding still is not an
            // action, and must not spend tokens or start a cooldown.
            let mut knob_plan = None;
            if let ActionSpec::Knob(k) = spec {
                match self.plan_knob(k, req).await {
                    Ok(p) if p.after == p.before => {
                        record.decision = "unchanged".into();
                        record.before = json!(p.before);
                        record.after = json!(p.after);
                        record.result = json!({ "status": p.status });
                        self.knob_status(&k.name, p.status);
                        self.count(&req.rule, kind, "unchanged");
                        self.step(&mut outcomes, record).await;
                        continue;
                    }
                    Ok(p) => knob_plan = Some(p),
                    Err((decision, why)) => {
                        record.decision = decision.into();
                        record.error = Some(why);
                        self.count(&req.rule, kind, decision);
                        self.step(&mut outcomes, record).await;
                        continue;
                    }
                }
            }

            let refused = if spec.is_destructive() && !req.allow_destructive {
                Some(format!(
                    "`{kind}` can delete data or disturb clients; the rule needs `allow_destructive: true`"
                ))
            } else {
                None
            };
            let ask = Ask {
                instance: &instance,
                rule: &req.rule,
                mode,
                kind,
                target: &target,
                key: &key,
                refused,
            };
            let mut steps = Vec::new();
            let audit_ok = self.inner.audit_ok.load(Ordering::SeqCst);
            let verdict = {
                let mut g = self.gates();
                let gate = if mode == Mode::DryRun {
                    &mut g.rehearsal
                } else {
                    &mut g.enforce
                };
                gate.admit(&ask, now_ms(), &mut steps)
            };
            record.gate = steps;
            if let Some(p) = &knob_plan {
                record.before = json!(p.before);
                record.after = json!(p.after);
                record.result = json!({ "status": p.status });
            }
            match verdict {
                Verdict::Apply => {
                    // Released however this ends, the task being dropped included (a
                    // shutdown, a cancelled caller): a mark left behind would refuse every
                    // later action on the target until a restart.
                    let in_flight = InFlight {
                        actions: self,
                        target: target.clone(),
                    };
                    record.phase = "intent".into();
                    record.decision = "started".into();
                    // The intent is durable before anything runs; when it cannot be written
                    // the action cannot be accounted for, so it does not run. (A log that
                    // was broken is retried here, every time.)
                    if !self.write(record.clone()).await {
                        drop(in_flight);
                        self.count(&req.rule, kind, "skipped_audit");
                        outcomes.push(StepOutcome {
                            action: kind.to_owned(),
                            target: target.clone(),
                            decision: "skipped_audit".into(),
                            error: Some(
                                "the audit log cannot be written: the action was not run".into(),
                            ),
                            ..StepOutcome::default()
                        });
                        if audit_ok {
                            tracing::error!(rule = %req.rule, action = kind, "action not run: its intent could not be audited");
                        }
                        continue;
                    }
                    let started = Instant::now();
                    let timeout = self.inner.config.timeout;
                    let outcome =
                        tokio::time::timeout(timeout, self.execute(spec, req, knob_plan.as_ref()))
                            .await;
                    let took = started.elapsed();
                    drop(in_flight);
                    self.inner
                        .metrics
                        .duration
                        .with_label_values(&[kind])
                        .observe(took.as_secs_f64());
                    acted |= spec.counts_for_breaker();
                    let mut result = record;
                    result.phase = "result".into();
                    result.time = rfc3339(now_ms());
                    result.ts_ms = now_ms();
                    result.duration_ms = Some(took.as_secs_f64() * 1000.0);
                    match outcome {
                        Ok(Ok(o)) => {
                            executed = true;
                            result.decision = "applied".into();
                            if !o.before.is_null() {
                                result.before = o.before;
                            }
                            if !o.after.is_null() {
                                result.after = o.after;
                            }
                            result.result = o.result;
                            if let Some(p) = &knob_plan
                                && let ActionSpec::Knob(k) = spec
                            {
                                knob_moves.push((k.name.clone(), p.before, p.after));
                            }
                            tracing::info!(rule = %req.rule, labels = %req.labels, action = kind, target = %target, "action applied");
                        }
                        Ok(Err(e)) => {
                            result.decision = "failed".into();
                            result.error = Some(e.clone());
                            tracing::warn!(rule = %req.rule, action = kind, target = %target, error = %e, "action failed");
                        }
                        Err(_) => {
                            result.decision = "timeout".into();
                            result.error = Some(format!(
                                "still running after {:.1}s; abandoned",
                                timeout.as_secs_f64()
                            ));
                            tracing::warn!(rule = %req.rule, action = kind, target = %target, "action timed out");
                        }
                    }
                    self.count(&req.rule, kind, &result.decision);
                    self.step(&mut outcomes, result).await;
                }
                Verdict::WouldApply => {
                    rehearsed |= spec.counts_for_breaker();
                    record.decision = "would_apply".into();
                    // Advice is read-only (plans and hypothetical indexes): a rehearsal
                    // produces it, so the recommendations fill in dry_run; only creating an
                    // index waits for enforce.
                    if let ActionSpec::IndexAdvice(a) = spec {
                        let started = Instant::now();
                        let timeout = self.inner.config.timeout;
                        match tokio::time::timeout(timeout, self.index_advice(a, req, false)).await
                        {
                            Ok(Ok(o)) => record.result = o.result,
                            Ok(Err(e)) => {
                                record.decision = "failed".into();
                                record.error = Some(e);
                            }
                            Err(_) => {
                                record.decision = "timeout".into();
                                record.error = Some(format!(
                                    "still running after {:.1}s; abandoned",
                                    timeout.as_secs_f64()
                                ));
                            }
                        }
                        record.duration_ms = Some(started.elapsed().as_secs_f64() * 1000.0);
                    }
                    self.count(&req.rule, kind, &record.decision);
                    self.step(&mut outcomes, record).await;
                }
                Verdict::Skip(decision, why) => {
                    record.decision = decision.into();
                    record.error = Some(why);
                    self.count(&req.rule, kind, decision);
                    self.step(&mut outcomes, record).await;
                }
            }
        }
        let now = now_ms();
        // The breaker and the cooldown guard against rules looping by themselves; an operator's
        // explicit run (a playbook) is neither.
        if req.actor != "engine" {
            acted = false;
            rehearsed = false;
        }
        let opened = {
            let mut g = self.gates();
            let mut opened = false;
            if acted {
                opened |= g.enforce.acted(&instance, &req.rule, req.cooldown, now);
            }
            if rehearsed {
                opened |= g.rehearsal.acted(&instance, &req.rule, req.cooldown, now);
            }
            opened
        };
        if acted || rehearsed {
            self.persist_gates();
        }
        if opened {
            self.inner
                .metrics
                .breaker_open
                .with_label_values(&[&req.rule])
                .set(1.0);
            tracing::error!(rule = %req.rule, labels = %req.labels, "circuit breaker opened: the rule keeps acting without its condition clearing; it is stopped until reset");
            let mut r = self.base(req, mode, None, None);
            r.decision = "breaker_opened".into();
            r.error = Some(format!(
                "{} actions within {:?} without the condition clearing",
                self.inner.config.breaker_max_actions, self.inner.config.breaker_window
            ));
            self.write(r).await;
        }
        if executed && let (Some(v), Some(verifier)) = (&req.verify, &self.inner.verifier) {
            let me = self.clone();
            let req = req.clone();
            let verifier = verifier.clone();
            let after = v.after.0;
            tokio::spawn(async move {
                tokio::time::sleep(after).await;
                me.verify(&req, &verifier, &knob_moves).await;
            });
        }
        outcomes
    }

    pub(super) async fn execute(
        &self,
        spec: &ActionSpec,
        req: &ActionRequest,
        knob_plan: Option<&knobs::Plan>,
    ) -> Result<Outcome, String> {
        let s = &self.inner.services;
        match spec {
            ActionSpec::Sql(a) => exec::sql(s, a, req).await,
            ActionSpec::Redis(a) => {
                exec::redis_command(s, &a.command, a.target.as_deref(), req).await
            }
            ActionSpec::RedisEvict(a) => exec::redis_evict(s, a).await,
            ActionSpec::RedisMemoryPurge(a) => {
                exec::redis_memory_purge(s, a.target.as_deref()).await
            }
            ActionSpec::CacheWarm(a) => exec::cache_warm(s, a).await,
            ActionSpec::PgTerminateIdle(a) => exec::pg_terminate_idle(s, a).await,
            ActionSpec::PgAnalyze(a) => exec::pg_analyze(s, a, self.inner.config.timeout).await,
            ActionSpec::IndexAdvice(a) => self.index_advice(a, req, true).await,
            ActionSpec::RetentionDelete(a) => exec::retention_delete(s, a).await,
            ActionSpec::Knob(k) => match knob_plan {
                Some(p) => self.apply_knob(&k.name, p, &req.rule).await,
                None => Err("no plan".into()),
            },
            ActionSpec::Webhook(w) => exec::webhook(s, w, req).await,
            ActionSpec::Alertmanager(a) => self.send_alert(a, req).await,
            ActionSpec::Exec(e) => exec::exec(s, e, req).await,
        }
    }

    /// `index_advice`: advise (windowed, per target), keep the advice for the API and the
    /// metric, and, with `create` and `may_create` (enforce), build the best verified index,
    /// at most one per `create_every` on the target.
    pub(super) async fn index_advice(
        &self,
        a: &super::super::IndexAdvice,
        req: &ActionRequest,
        may_create: bool,
    ) -> Result<Outcome, String> {
        use crate::advisor::AdviseOptions;
        let s = &self.inner.services;
        let h = s.pg(a.target.as_deref())?;
        let mut client = h.client().await.map_err(|f| f.message)?;
        let opts = AdviseOptions {
            slow_threshold: s.slow_threshold,
            min_saving: a.min_saving.unwrap_or(0.5),
            ..AdviseOptions::default()
        };
        let report = {
            let mut advisors = self.inner.advisors.lock().await;
            let advisor = advisors.entry(h.name.clone()).or_default();
            advisor
                .advise(&mut client, &opts)
                .await
                .map_err(|e| h.url().scrub(&e.to_string()))?
        };
        drop(client);
        let now = now_ms();
        if let Some(store) = &s.advice {
            store.merge(&h.name, &report, now);
            if let Some(r) = &s.registry {
                store.publish(r, now);
            }
        }
        let mut result = serde_json::Map::new();
        result.insert("advice".into(), json!(report.advice.len()));
        result.insert("unexplainable".into(), json!(report.unexplainable.len()));
        result.insert(
            "report".into(),
            serde_json::to_value(&report).unwrap_or(Value::Null),
        );
        if a.create {
            let best = report
                .advice
                .iter()
                .filter(|x| x.verified && x.saving_ratio.is_some_and(|r| r >= opts.min_saving))
                .max_by(|x, y| {
                    x.saving_ratio
                        .unwrap_or(0.0)
                        .total_cmp(&y.saving_ratio.unwrap_or(0.0))
                });
            let key = format!("index_create:{}", h.name);
            let every = a
                .create_every
                .map_or(Duration::from_secs(24 * 3600), |d| d.0);
            let held = self.gates().enforce.held(&key, now);
            let creation = match (best, held) {
                (None, _) => {
                    json!({ "result": "skipped", "reason": "no verified advice above min_saving" })
                }
                (Some(best), _) if !may_create => json!({
                    "result": "skipped",
                    "reason": "dry_run: an index is created only in enforce",
                    "would_create": best.definition,
                }),
                (Some(_), Some(until)) => json!({
                    "result": "skipped",
                    "reason": format!("one index per {every:?} on this target; the next may be built after {}", rfc3339(until)),
                }),
                (Some(best), None) => {
                    // The hold is taken when the build starts, so no second build starts on
                    // this target while one runs, even one whose action was cut off by
                    // `actions.timeout`: the build is a task of its own that runs to its end
                    // (a dropped CREATE INDEX CONCURRENTLY would go on on the server without
                    // anyone to record it), records its outcome, and gives the hold back if
                    // nothing was built.
                    let until = now + i64::try_from(every.as_millis()).unwrap_or(i64::MAX / 4);
                    self.gates().enforce.hold(&key, until);
                    self.persist_gates();
                    let record = self.base(
                        req,
                        self.mode(req),
                        Some(&ActionSpec::IndexAdvice(a.clone())),
                        Some(&format!("postgres/{}", h.name)),
                    );
                    let build = tokio::spawn(self.clone().build_index(
                        h.clone(),
                        best.clone(),
                        a.partitioned_tables.clone(),
                        key,
                        record,
                    ));
                    build
                        .await
                        .map_err(|e| format!("the index build task failed: {e}"))??
                }
            };
            result.insert("create".into(), creation);
        }
        Ok(Outcome {
            result: Value::Object(result),
            ..Outcome::default()
        })
    }

    /// Builds one advised index on a connection of its own (the build holds a session
    /// advisory lock and session settings until it ends), then records the outcome in the
    /// audit log (`phase: index_build`), marks the advice created, or gives back the hold
    /// taken for it when nothing was built.
    async fn build_index(
        self,
        h: crate::targets::PgHandle,
        best: crate::advisor::Advice,
        partitioned_allowed: Vec<String>,
        hold_key: String,
        mut record: Record,
    ) -> Result<Value, String> {
        use crate::advisor::{CreateOptions, Creation};
        let started = Instant::now();
        let created = async {
            let mut own = h.connect_own().await.map_err(|f| f.message)?;
            let created = crate::advisor::create_index(
                &mut own,
                &best.index,
                &CreateOptions {
                    partitioned_allowed,
                    ..CreateOptions::default()
                },
            )
            .await;
            // Dropping the client ends its connection's task.
            drop(own);
            created.map_err(|e| h.url().scrub(&e.to_string()))
        }
        .await;
        let s = &self.inner.services;
        match &created {
            Ok(Creation::Created { index, .. }) => {
                if let Some(store) = &s.advice {
                    store.mark_created(&h.name, &best.id, index, now_ms());
                    if let Some(r) = &s.registry {
                        store.publish(r, now_ms());
                    }
                }
            }
            Ok(Creation::Skipped { .. }) | Err(_) => {
                self.gates().enforce.hold(&hold_key, now_ms());
                self.persist_gates();
            }
        }
        let now = now_ms();
        record.time = rfc3339(now);
        record.ts_ms = now;
        record.phase = "index_build".into();
        record.duration_ms = Some(started.elapsed().as_secs_f64() * 1000.0);
        match &created {
            Ok(c) => {
                record.decision = "applied".into();
                record.result = serde_json::to_value(c).unwrap_or(Value::Null);
            }
            Err(e) => {
                record.decision = "failed".into();
                record.error = Some(e.clone());
            }
        }
        self.write(record).await;
        created.map(|c| serde_json::to_value(&c).unwrap_or(Value::Null))
    }
}
