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
    pub interval: Option<HumanDuration>,
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
    pub for_: Option<HumanDuration>,
    /// A separate exit condition (hysteresis): once firing, the rule stays firing until this
    /// returns the label set, instead of until `expr` stops returning it.
    pub clear: Option<String>,
    /// How long the exit condition must hold before the rule resolves.
    pub keep_firing_for: Option<HumanDuration>,
    /// Labels added to the rule's instances.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Annotations (summary, description, runbook_url).
    #[serde(default)]
    pub annotations: BTreeMap<String, String>,
    /// Overrides the global mode for this rule.
    pub mode: Option<Mode>,
    /// After acting, do not act again for this long (per rule and label set).
    pub cooldown: Option<HumanDuration>,
    /// While firing, request the actions again this often (default: only on the firing edge).
    pub repeat: Option<HumanDuration>,
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
