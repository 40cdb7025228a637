//! The action gate: for each action of a request, in order, duplicate (idempotency key),
//! mode, cooldown, rate limits, in-flight, circuit breaker; the first step that says no
//! decides, and every step taken is recorded. Pure state with the time passed in: no clock,
//! no I/O, so every path is tested here; the runner persists what `persisted` returns.
//!
//! Uses `Mode` from its parent only.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::Mode;

/// A token bucket's size: `count` actions per `per`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Limit {
    /// Tokens when full.
    pub count: f64,
    /// Time to refill from empty.
    pub per: Duration,
}

/// The gate's settings.
#[derive(Debug, Clone, PartialEq)]
pub struct GateConfig {
    /// For all actions.
    pub global: Option<Limit>,
    /// For each target separately.
    pub per_target: Option<Limit>,
    /// Per action kind.
    pub per_kind: BTreeMap<String, Limit>,
    /// The breaker opens after this many acting requests of one rule instance…
    pub breaker_max: u32,
    /// …within this window, with its condition never cleared in between.
    pub breaker_window: Duration,
    /// How long an idempotency key is remembered.
    pub key_ttl: Duration,
}

impl Default for GateConfig {
    fn default() -> Self {
        GateConfig {
            // Ten actions a minute in all: far more than a healthy rule set needs, far fewer
            // than a storm would take.
            global: Some(Limit {
                count: 10.0,
                per: Duration::from_secs(60),
            }),
            per_target: Some(Limit {
                count: 5.0,
                per: Duration::from_secs(60),
            }),
            per_kind: BTreeMap::new(),
            breaker_max: 5,
            breaker_window: Duration::from_secs(3600),
            key_ttl: Duration::from_secs(24 * 3600),
        }
    }
}

/// What the gate decided for one action.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Run it (enforce).
    Apply,
    /// Rehearsed: everything passed, nothing runs (dry_run).
    WouldApply,
    /// Not run; the decision's name (`skipped_cooldown`, …) and why.
    Skip(&'static str, String),
}

impl Verdict {
    /// The `decision` label and audit field.
    pub fn decision(&self) -> &'static str {
        match self {
            Verdict::Apply => "applied",
            Verdict::WouldApply => "would_apply",
            Verdict::Skip(d, _) => d,
        }
    }
}

/// One action as the gate sees it.
#[derive(Debug, Clone)]
pub struct Ask<'a> {
    /// The rule instance (`rule{labels}`): the unit of cooldown and breaker.
    pub instance: &'a str,
    /// The rule (the breaker's metric label).
    pub rule: &'a str,
    /// The effective mode.
    pub mode: Mode,
    /// The action kind.
    pub kind: &'a str,
    /// What it acts on.
    pub target: &'a str,
    /// The idempotency key.
    pub key: &'a str,
    /// Destructive and not allowed by the rule: refused in enforce.
    pub refused: Option<String>,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq)]
struct Bucket {
    tokens: f64,
    at_ms: i64,
}

impl Bucket {
    fn take(&mut self, limit: Limit, now_ms: i64, take: bool) -> bool {
        let per_ms = limit.per.as_millis().max(1) as f64;
        let elapsed = (now_ms - self.at_ms).max(0) as f64;
        self.tokens = (self.tokens + elapsed * limit.count / per_ms).min(limit.count);
        self.at_ms = now_ms;
        if self.tokens >= 1.0 {
            if take {
                self.tokens -= 1.0;
            }
            true
        } else {
            false
        }
    }
}

/// A rule instance's circuit breaker.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Breaker {
    /// When it acted since its condition last cleared.
    pub acted_ms: Vec<i64>,
    /// When it opened; open until reset.
    pub open_since_ms: Option<i64>,
}

/// What survives a restart.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Persisted {
    /// Cooldown ends per rule instance.
    pub cooldowns: BTreeMap<String, i64>,
    /// Breakers per rule instance.
    pub breakers: BTreeMap<String, Breaker>,
    /// Breakers' rules, per instance (for the metric label).
    #[serde(default)]
    pub breaker_rules: BTreeMap<String, String>,
    buckets: BTreeMap<String, Bucket>,
}

/// The gate.
#[derive(Debug, Default)]
pub struct Gate {
    config: GateConfig,
    state: Persisted,
    in_flight: HashSet<String>,
    keys: HashMap<String, i64>,
}

impl Gate {
    /// A gate with `config`, restored from `state`, remembering `keys` (idempotency keys on
    /// record, with their times).
    pub fn new(config: GateConfig, state: Persisted, keys: Vec<(String, i64)>) -> Gate {
        Gate {
            config,
            state,
            in_flight: HashSet::new(),
            keys: keys.into_iter().collect(),
        }
    }

    /// Replaces the settings, keeping the state.
    pub fn reconfigure(&mut self, config: GateConfig) {
        self.config = config;
    }

    /// What to persist.
    pub fn persisted(&self) -> &Persisted {
        &self.state
    }

    /// Decides one action. On `Apply` the target is held in flight until `finish`; on `Apply`
    /// and `WouldApply` the key is remembered and the rate-limit tokens are spent. `steps`
    /// receives each step taken, `step:outcome`.
    pub fn admit(&mut self, ask: &Ask<'_>, now_ms: i64, steps: &mut Vec<String>) -> Verdict {
        let ttl = i64::try_from(self.config.key_ttl.as_millis()).unwrap_or(i64::MAX);
        self.keys.retain(|_, at| now_ms - *at < ttl);
        if self.keys.contains_key(ask.key) {
            steps.push("idempotency:seen".into());
            return Verdict::Skip(
                "skipped_duplicate",
                "this firing episode's action is already on record".into(),
            );
        }
        steps.push("idempotency:new".into());

        steps.push(format!("mode:{}", ask.mode.as_str()));
        if ask.mode == Mode::Observe {
            return Verdict::Skip("skipped_observe", "the rule is in observe mode".into());
        }
        if let (Mode::Enforce, Some(why)) = (ask.mode, &ask.refused) {
            steps.push("allowed:no".into());
            return Verdict::Skip("skipped_not_allowed", why.clone());
        }

        if let Some(until) = self.state.cooldowns.get(ask.instance)
            && *until > now_ms
        {
            steps.push("cooldown:active".into());
            return Verdict::Skip(
                "skipped_cooldown",
                format!(
                    "cooling down for {:.1}s more",
                    (*until - now_ms) as f64 / 1000.0
                ),
            );
        }
        steps.push("cooldown:ok".into());

        // All buckets are checked before any is spent, so a refusal by one costs no other.
        let limits: Vec<(String, Limit)> = [
            self.config.global.map(|l| ("global".to_owned(), l)),
            self.config
                .per_target
                .map(|l| (format!("target:{}", ask.target), l)),
            self.config
                .per_kind
                .get(ask.kind)
                .map(|l| (format!("kind:{}", ask.kind), *l)),
        ]
        .into_iter()
        .flatten()
        .collect();
        for (name, limit) in &limits {
            let bucket = self.state.buckets.entry(name.clone()).or_insert(Bucket {
                tokens: limit.count,
                at_ms: now_ms,
            });
            if !bucket.take(*limit, now_ms, false) {
                steps.push(format!("ratelimit:{name}:exhausted"));
                return Verdict::Skip(
                    "skipped_ratelimit",
                    format!(
                        "rate limit {name} ({} per {:?}) exhausted",
                        limit.count, limit.per
                    ),
                );
            }
        }
        steps.push("ratelimit:ok".into());

        if ask.mode == Mode::Enforce && self.in_flight.contains(ask.target) {
            steps.push("inflight:busy".into());
            return Verdict::Skip(
                "skipped_inflight",
                format!("another action on {} is still running", ask.target),
            );
        }
        steps.push("inflight:ok".into());

        if let Some(b) = self.state.breakers.get(ask.instance)
            && let Some(since) = b.open_since_ms
        {
            steps.push("breaker:open".into());
            return Verdict::Skip(
                "skipped_breaker",
                format!(
                    "circuit breaker open since {} ({} actions within {:?} without the condition clearing); reset it to resume",
                    since, self.config.breaker_max, self.config.breaker_window
                ),
            );
        }
        steps.push("breaker:closed".into());

        for (name, limit) in &limits {
            if let Some(bucket) = self.state.buckets.get_mut(name) {
                bucket.take(*limit, now_ms, true);
            }
        }
        self.keys.insert(ask.key.to_owned(), now_ms);
        if ask.mode == Mode::Enforce {
            self.in_flight.insert(ask.target.to_owned());
            Verdict::Apply
        } else {
            Verdict::WouldApply
        }
    }

    /// An applied action on `target` ended.
    pub fn finish(&mut self, target: &str) {
        self.in_flight.remove(target);
    }

    /// A request of `instance` acted (at least one action applied or rehearsed): its cooldown
    /// starts now, when the actions have finished, and its breaker counts it. Returns true
    /// when this opened the breaker.
    pub fn acted(&mut self, instance: &str, rule: &str, cooldown: Duration, now_ms: i64) -> bool {
        if !cooldown.is_zero() {
            let until = now_ms + i64::try_from(cooldown.as_millis()).unwrap_or(i64::MAX / 2);
            self.state.cooldowns.insert(instance.to_owned(), until);
        }
        self.state.cooldowns.retain(|_, until| *until > now_ms);
        let window = i64::try_from(self.config.breaker_window.as_millis()).unwrap_or(i64::MAX);
        let max = self.config.breaker_max;
        self.state
            .breaker_rules
            .insert(instance.to_owned(), rule.to_owned());
        let b = self.state.breakers.entry(instance.to_owned()).or_default();
        b.acted_ms.push(now_ms);
        b.acted_ms.retain(|t| now_ms - *t < window);
        if max > 0 && b.open_since_ms.is_none() && b.acted_ms.len() >= max as usize {
            b.open_since_ms = Some(now_ms);
            return true;
        }
        false
    }

    /// The instance's condition cleared: its breaker count starts over (an open breaker stays
    /// open until reset: the rule was acting without effect).
    pub fn cleared(&mut self, instance: &str) {
        if let Some(b) = self.state.breakers.get_mut(instance) {
            b.acted_ms.clear();
            if b.open_since_ms.is_none() {
                self.state.breakers.remove(instance);
                self.state.breaker_rules.remove(instance);
            }
        }
    }

    /// Closes the breakers of `rule` (every instance); returns how many were open.
    pub fn reset_breakers(&mut self, rule: &str) -> usize {
        let instances: Vec<String> = self
            .state
            .breaker_rules
            .iter()
            .filter(|(_, r)| *r == rule)
            .map(|(i, _)| i.clone())
            .collect();
        let mut n = 0;
        for i in instances {
            if let Some(b) = self.state.breakers.remove(&i) {
                n += usize::from(b.open_since_ms.is_some());
            }
            self.state.breaker_rules.remove(&i);
        }
        n
    }

    /// Until when `key` is held (a period that is not an instance's cooldown, e.g. "one index
    /// per day on this target"), if it still is at `now_ms`.
    pub fn held(&self, key: &str, now_ms: i64) -> Option<i64> {
        self.state
            .cooldowns
            .get(key)
            .copied()
            .filter(|until| *until > now_ms)
    }

    /// Holds `key` until `until_ms` (persisted with the cooldowns).
    pub fn hold(&mut self, key: &str, until_ms: i64) {
        self.state.cooldowns.insert(key.to_owned(), until_ms);
    }

    /// Rules with an open breaker.
    pub fn open_breakers(&self) -> Vec<(String, String, i64)> {
        self.state
            .breakers
            .iter()
            .filter_map(|(i, b)| {
                let rule = self.state.breaker_rules.get(i)?;
                Some((rule.clone(), i.clone(), b.open_since_ms?))
            })
            .collect()
    }

    /// Rules that have a breaker record (open or counting), for the metric.
    pub fn breaker_rules(&self) -> HashSet<String> {
        self.state.breaker_rules.values().cloned().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ask<'a>(mode: Mode, key: &'a str) -> Ask<'a> {
        Ask {
            instance: "HighMemory{}",
            rule: "HighMemory",
            mode,
            kind: "redis_evict",
            target: "cache",
            key,
            refused: None,
        }
    }

    fn config() -> GateConfig {
        GateConfig {
            global: Some(Limit {
                count: 3.0,
                per: Duration::from_secs(60),
            }),
            per_target: None,
            per_kind: BTreeMap::new(),
            breaker_max: 3,
            breaker_window: Duration::from_secs(600),
            key_ttl: Duration::from_secs(3600),
        }
    }

    #[test]
    fn steps_run_in_order_and_the_first_no_decides() {
        let mut g = Gate::new(config(), Persisted::default(), vec![]);
        let mut steps = vec![];
        assert_eq!(
            g.admit(&ask(Mode::Enforce, "k1"), 0, &mut steps),
            Verdict::Apply
        );
        assert_eq!(
            steps,
            [
                "idempotency:new",
                "mode:enforce",
                "cooldown:ok",
                "ratelimit:ok",
                "inflight:ok",
                "breaker:closed"
            ]
        );
        // Same target still running.
        let v = g.admit(&ask(Mode::Enforce, "k2"), 1, &mut vec![]);
        assert_eq!(v.decision(), "skipped_inflight");
        g.finish("cache");
        // The same key again: a duplicate, whatever else holds.
        assert_eq!(
            g.admit(&ask(Mode::Enforce, "k1"), 2, &mut vec![])
                .decision(),
            "skipped_duplicate"
        );
        assert_eq!(
            g.admit(&ask(Mode::Observe, "k3"), 3, &mut vec![])
                .decision(),
            "skipped_observe"
        );
    }

    #[test]
    fn dry_run_spends_tokens_but_holds_nothing_in_flight() {
        let mut g = Gate::new(config(), Persisted::default(), vec![]);
        assert_eq!(
            g.admit(&ask(Mode::DryRun, "a"), 0, &mut vec![]),
            Verdict::WouldApply
        );
        assert_eq!(
            g.admit(&ask(Mode::DryRun, "b"), 0, &mut vec![]),
            Verdict::WouldApply
        );
        assert_eq!(
            g.admit(&ask(Mode::DryRun, "c"), 0, &mut vec![]),
            Verdict::WouldApply
        );
        let mut steps = vec![];
        assert_eq!(
            g.admit(&ask(Mode::DryRun, "d"), 0, &mut steps).decision(),
            "skipped_ratelimit"
        );
        assert_eq!(steps.last().unwrap(), "ratelimit:global:exhausted");
        // 20 s later one token (3 per minute) is back.
        assert_eq!(
            g.admit(&ask(Mode::DryRun, "d"), 20_000, &mut vec![]),
            Verdict::WouldApply
        );
    }

    #[test]
    fn cooldown_starts_when_the_actions_finish() {
        let mut g = Gate::new(config(), Persisted::default(), vec![]);
        g.admit(&ask(Mode::Enforce, "a"), 0, &mut vec![]);
        g.finish("cache");
        g.acted("HighMemory{}", "HighMemory", Duration::from_secs(60), 5_000);
        assert_eq!(
            g.admit(&ask(Mode::Enforce, "b"), 64_999, &mut vec![])
                .decision(),
            "skipped_cooldown"
        );
        assert_eq!(
            g.admit(&ask(Mode::Enforce, "b"), 65_000, &mut vec![]),
            Verdict::Apply
        );
    }

    #[test]
    fn the_breaker_opens_after_k_acts_without_clearing_and_waits_for_a_reset() {
        let mut cfg = config();
        cfg.global = None;
        let mut g = Gate::new(cfg, Persisted::default(), vec![]);
        for i in 0..2 {
            assert!(!g.acted("HighMemory{}", "HighMemory", Duration::ZERO, i * 1000));
        }
        // Clearing restarts the count.
        g.cleared("HighMemory{}");
        for i in 0..2 {
            assert!(!g.acted("HighMemory{}", "HighMemory", Duration::ZERO, 10_000 + i));
        }
        assert!(g.acted("HighMemory{}", "HighMemory", Duration::ZERO, 10_010));
        assert_eq!(
            g.admit(&ask(Mode::Enforce, "x"), 10_020, &mut vec![])
                .decision(),
            "skipped_breaker"
        );
        // Clearing does not close an open breaker; a reset does.
        g.cleared("HighMemory{}");
        assert_eq!(g.open_breakers().len(), 1);
        assert_eq!(g.reset_breakers("HighMemory"), 1);
        assert_eq!(
            g.admit(&ask(Mode::Enforce, "x"), 10_030, &mut vec![]),
            Verdict::Apply
        );
    }

    #[test]
    fn acts_spread_wider_than_the_window_do_not_trip_it() {
        let mut cfg = config();
        cfg.breaker_window = Duration::from_secs(10);
        let mut g = Gate::new(cfg, Persisted::default(), vec![]);
        for i in 0..10 {
            assert!(!g.acted("r{}", "r", Duration::ZERO, i * 6_000));
        }
    }

    #[test]
    fn state_survives_a_restart() {
        let mut g = Gate::new(config(), Persisted::default(), vec![]);
        g.admit(&ask(Mode::Enforce, "a"), 0, &mut vec![]);
        g.finish("cache");
        g.acted("HighMemory{}", "HighMemory", Duration::from_secs(60), 0);
        let saved = serde_json::to_string(g.persisted()).unwrap();
        let mut g2 = Gate::new(
            config(),
            serde_json::from_str(&saved).unwrap(),
            vec![("a".into(), 0)],
        );
        assert_eq!(
            g2.admit(&ask(Mode::Enforce, "a"), 1_000, &mut vec![])
                .decision(),
            "skipped_duplicate"
        );
        assert_eq!(
            g2.admit(&ask(Mode::Enforce, "b"), 1_000, &mut vec![])
                .decision(),
            "skipped_cooldown"
        );
    }

    #[test]
    fn destructive_actions_are_refused_in_enforce_but_rehearsed_in_dry_run() {
        let mut g = Gate::new(config(), Persisted::default(), vec![]);
        let mut a = ask(Mode::Enforce, "a");
        a.refused = Some("needs allow_destructive".into());
        assert_eq!(
            g.admit(&a, 0, &mut vec![]).decision(),
            "skipped_not_allowed"
        );
        a.mode = Mode::DryRun;
        a.key = "b";
        assert_eq!(g.admit(&a, 0, &mut vec![]), Verdict::WouldApply);
    }
}
