//! Rules of a group with a `source`: the engine hands out the ones that are due (`due_remote`)
//! and takes the source's answer back (`apply_remote`), moving the same state machine, under
//! the same gate and audit, as local rules. The query itself is not made here: `rules::source`
//! makes it, off the engine's lock, so a slow or dead source never holds up another group.
//!
//! An answer that is an error, a timeout or came with warnings (partial data) is unknown: the
//! rule's health is `err` with the reason, its state stays as it was (neither fires nor
//! resolves), and nothing acts, as Prometheus's rule manager does with a failed query.

use std::time::Duration;

use rustc_hash::FxHashSet as HashSet;

use super::{Engine, Loaded, Runtime, advance, fingerprint, instances};
use crate::rules::expr::Value;
use crate::sample::Labels;

/// A remote rule to evaluate now.
#[derive(Debug, Clone)]
pub struct RemoteDue {
    /// The rule.
    pub rule: String,
    /// The source that evaluates it.
    pub source: String,
    /// Its condition, as written.
    pub expr: String,
    /// Its exit condition, as written.
    pub clear: Option<String>,
    /// The evaluation time (the group's tick), in milliseconds since the epoch.
    pub at_ms: i64,
    /// The rule's definition when handed out: an answer for a rule changed since is dropped.
    version: String,
    /// Which hand-out of the rule this is: only the answer to the one in flight is applied.
    epoch: u64,
}

/// What a source answered for a rule: the condition's value and the exit condition's.
pub type RemoteAnswer = Result<(Value, Option<Value>), String>;

impl Engine {
    /// The remote rules due at `now_ms`. A rule whose previous query is still in flight is not
    /// handed out (that evaluation is missed, as in Prometheus's rule manager): evaluations of
    /// one rule never overlap, and answers are applied in the order they were asked for.
    pub fn due_remote(&self, now_ms: i64) -> Vec<RemoteDue> {
        let mut inner = self.lock();
        let Loaded { rules, runtime, .. } = &mut *inner;
        let mut out = Vec::new();
        for rule in rules.iter() {
            let Some(source) = &rule.remote else {
                continue;
            };
            let rt = runtime.entry(rule.name.clone()).or_default();
            let due = rt.last_evaluation_ms.is_none_or(|t| {
                now_ms - t >= i64::try_from(rule.interval.as_millis()).unwrap_or(i64::MAX) - 50
            });
            if !due {
                continue;
            }
            if rt.remote_in_flight.is_some() {
                tracing::debug!(rule = %rule.name, "remote evaluation missed: the previous query is still waiting for its answer");
                continue;
            }
            rt.last_evaluation_ms = Some(now_ms);
            rt.remote_epoch += 1;
            rt.remote_in_flight = Some(rt.remote_epoch);
            out.push(RemoteDue {
                rule: rule.name.clone(),
                source: source.clone(),
                expr: rule.expr.text.clone(),
                clear: rule.clear.as_ref().map(|q| q.text.clone()),
                at_ms: now_ms,
                version: fingerprint(rule),
                epoch: rt.remote_epoch,
            });
        }
        out
    }

    /// Applies a source's answer for `due`, which took `took`. A rule reloaded, removed or
    /// restored since it was handed out is left alone (its runtime no longer waits for this
    /// hand-out).
    pub fn apply_remote(&self, due: &RemoteDue, answer: RemoteAnswer, took: Duration) {
        let mut inner = self.lock();
        let mut requests = Vec::new();
        {
            let Loaded { rules, runtime, .. } = &mut *inner;
            let Some(rule) = rules
                .iter()
                .find(|r| r.name == due.rule && fingerprint(r) == due.version)
            else {
                return;
            };
            let Some(rt) = runtime.get_mut(&rule.name) else {
                return;
            };
            let rt: &mut Runtime = rt;
            if rt.remote_in_flight != Some(due.epoch) {
                return;
            }
            rt.remote_in_flight = None;
            let outcome = answer.and_then(|(value, clear)| {
                let active = instances(value, rule)?;
                let clear = match clear {
                    Some(v) => Some(instances(v, rule)?.into_keys().collect::<HashSet<Labels>>()),
                    None => None,
                };
                Ok((active, clear))
            });
            match outcome {
                Ok((active, clear)) => {
                    if rt.last_error.is_some() {
                        tracing::info!(rule = %rule.name, source = %due.source, "remote rule evaluated again");
                    }
                    rt.last_error = None;
                    requests = advance(rule, rt, &active, clear.as_ref(), due.at_ms);
                }
                Err(e) => {
                    if rt.last_error.as_deref() != Some(e.as_str()) {
                        tracing::warn!(rule = %rule.name, source = %due.source, error = %e, "remote rule evaluation failed; its state is kept and nothing acts");
                    }
                    rt.last_error = Some(e);
                    self.metrics.failures.with_label_values(&[&rule.name]).inc();
                }
            }
            rt.evaluation_seconds = took.as_secs_f64();
            self.record(rule, rt);
        }
        self.settle(inner, requests);
    }
}
