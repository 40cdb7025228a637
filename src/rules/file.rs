//! What a rule file says: serde types mirroring the YAML, `deny_unknown_fields` throughout. The
//! shape is a Prometheus rule file's (groups of rules with `expr`, `for`, `labels`,
//! `annotations`) with a rule's `name` instead of `alert`, and the autotuner's additions:
//! `clear`, `mode`, `cooldown`, `repeat`, `on_absent`, `allow_destructive`, `actions` and
//! `verify`.
//!
//! Uses `actions` types (the input types of the next stage) and `settings::HumanDuration`.

use std::collections::BTreeMap;

use serde::Deserialize;

pub use crate::actions::Mode;
use crate::actions::{ActionSpec, VerifySpec};
use crate::settings::HumanDuration;

/// A rule file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleFileSpec {
    /// Its groups.
    pub groups: Vec<GroupSpec>,
}

/// A group: rules evaluated together on one interval.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GroupSpec {
    /// Unique within the file.
    pub name: String,
    /// How often its rules are evaluated (default 5s, the collectors' default interval).
    pub interval: Option<RuleDuration>,
    /// A PromQL server (declared under `sources:` in the configuration) that evaluates the
    /// group's conditions instead of the local history.
    pub source: Option<String>,
    /// Its rules.
    pub rules: Vec<RuleSpec>,
}

/// One rule.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleSpec {
    /// Unique among all loaded rules.
    pub name: String,
    /// The condition: PromQL; each label set it returns is one instance of the rule.
    pub expr: String,
    /// How long the condition must hold before the rule fires.
    #[serde(rename = "for")]
    pub for_: Option<RuleDuration>,
    /// A separate exit condition (hysteresis): once firing, the rule stays firing until this
    /// returns the label set, instead of until `expr` stops returning it.
    pub clear: Option<String>,
    /// How long the exit condition must hold before the rule resolves.
    pub keep_firing_for: Option<RuleDuration>,
    /// Labels added to the rule's instances.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Annotations (summary, description, runbook_url).
    #[serde(default)]
    pub annotations: BTreeMap<String, String>,
    /// Overrides the global mode for this rule.
    pub mode: Option<Mode>,
    /// After acting, do not act again for this long (per rule and label set).
    pub cooldown: Option<RuleDuration>,
    /// While firing, request the actions again this often (default: only on the firing edge).
    pub repeat: Option<RuleDuration>,
    /// What to do when the condition's data is absent altogether (default `hold`).
    pub on_absent: Option<OnAbsent>,
    /// Must be `true` for a rule in `enforce` mode with destructive actions (deleting keys or
    /// rows, terminating connections, running commands).
    #[serde(default)]
    pub allow_destructive: bool,
    /// What to do on the firing edge.
    #[serde(default)]
    pub actions: Vec<ActionSpec>,
    /// How to tell, some time after acting, whether the actions helped.
    pub verify: Option<VerifySpec>,
}

/// A duration in a rule file: Prometheus's syntax, where zero (`0`, `0s`, `0m0s`) is a
/// duration like any other, as in a Prometheus rule file (`for: 0s` is "no delay"). Whether
/// zero means something is for each field to say (`compile` refuses it for `interval` and
/// `repeat`, where it would not).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RuleDuration(pub std::time::Duration);

impl RuleDuration {
    /// Parses a duration, zero included.
    pub fn parse(text: &str) -> Result<Self, String> {
        match HumanDuration::parse(text) {
            Ok(d) => Ok(RuleDuration(d.0)),
            // The parser refuses zero; a zero written in a valid shape (the same text with its
            // digits made non-zero parses) is zero.
            Err(_) if is_zero(text) => Ok(RuleDuration(std::time::Duration::ZERO)),
            Err(e) => Err(e),
        }
    }
}

fn is_zero(text: &str) -> bool {
    text.starts_with('0')
        && text.chars().all(|c| c == '0' || c.is_ascii_alphabetic())
        && HumanDuration::parse(&text.replace('0', "1")).is_ok()
}

impl<'de> Deserialize<'de> for RuleDuration {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = RuleDuration;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a duration such as 0s, 30s, 5m or 1h30m")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<RuleDuration, E> {
                RuleDuration::parse(v).map_err(E::custom)
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<RuleDuration, E> {
                // A bare `0` in YAML is an integer, not a string.
                if v == 0 {
                    Ok(RuleDuration(std::time::Duration::ZERO))
                } else {
                    Err(E::custom(format!(
                        "invalid duration {v}: give a unit, such as {v}s"
                    )))
                }
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<RuleDuration, E> {
                match u64::try_from(v) {
                    Ok(v) => self.visit_u64(v),
                    Err(_) => Err(E::custom(format!(
                        "invalid duration {v}: a duration is not negative"
                    ))),
                }
            }
        }
        deserializer.deserialize_any(V)
    }
}

/// What an absent condition means.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum OnAbsent {
    /// Keep the current state (a scrape gap is not a recovery).
    Hold,
    /// Treat as not holding.
    Clear,
    /// Treat as holding (for "the thing disappeared" conditions).
    Fire,
}
