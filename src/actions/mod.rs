//! ③ Actions: what a rule may ask for (`ActionSpec`, typed so a typo is refused when the rule
//! file loads), the request the rule engine hands over (`ActionRequest`), and the stage that
//! carries requests out: the gate (`gate`), the knobs (`knobs`), the executors against the real
//! services (`exec`) and the runner that ties them to the audit log (`runner`).
//!
//! Uses `settings`, `targets`, `sample` and `audit`. Never imports `rules`: the engine depends
//! on these types, not the other way round; verification conditions are PromQL, evaluated
//! through the `Verifier` trait that the wiring implements.

pub mod exec;
pub mod gate;
pub mod knobs;
pub mod playbook;
pub mod redact;
pub mod runner;
pub mod simulate;

use std::collections::BTreeMap;

use serde::Deserialize;

use crate::sample::Labels;
use crate::settings::HumanDuration;

/// Whether a rule's actions run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    /// Evaluate and record, request nothing.
    Observe,
    /// Go through the gate and record what would be done, change nothing.
    DryRun,
    /// Act.
    Enforce,
}

impl Mode {
    /// As written in files and labels.
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Observe => "observe",
            Mode::DryRun => "dry_run",
            Mode::Enforce => "enforce",
        }
    }
}

/// Why the engine hands a request over.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Event {
    /// The instance started firing: act.
    Firing,
    /// Still firing, `repeat` elapsed: act again (a controller's next step).
    Repeat,
    /// The instance resolved: nothing is executed, but alerts sent for it are resolved, its
    /// circuit breaker count restarts, and the controller records the calm.
    Resolved,
}

/// What the rule engine hands to the actions stage.
#[derive(Debug, Clone)]
pub struct ActionRequest {
    /// The rule.
    pub rule: String,
    /// The instance's labels (the result's labels without `__name__`, plus the rule's labels).
    pub labels: Labels,
    /// The condition's value for the instance (NaN when it has none, e.g. `on_absent: fire`).
    pub value: f64,
    /// Why.
    pub event: Event,
    /// When the instance started firing (ms since the epoch): identifies the firing episode,
    /// so a request replayed after a restart or delivered twice is recognised.
    pub episode_ms: i64,
    /// The rule's own mode, if it has one.
    pub mode: Option<Mode>,
    /// The rule's cooldown.
    pub cooldown: std::time::Duration,
    /// Whether destructive actions may run in enforce.
    pub allow_destructive: bool,
    /// What to do.
    pub actions: Vec<ActionSpec>,
    /// How to tell whether the actions helped.
    pub verify: Option<VerifySpec>,
    /// The rule's annotations (for alerts and webhooks).
    pub annotations: BTreeMap<String, String>,
    /// A hash of the rule's definition: a changed rule is a new rule for idempotency.
    pub rule_version: String,
    /// When, in milliseconds since the Unix epoch.
    pub at_ms: i64,
    /// Who asks: `engine` for rules, the caller's name for the admin API.
    pub actor: String,
}

impl ActionRequest {
    /// The rule instance, `rule{labels}`: the unit of cooldowns and breakers.
    pub fn instance(&self) -> String {
        format!("{}{}", self.rule, self.labels)
    }

    /// The mode the request acts in: the rule's own (`dry_run` when it has none), capped by
    /// the global one.
    pub fn effective_mode(&self, cap: Mode) -> Mode {
        self.mode.unwrap_or(Mode::DryRun).min(cap)
    }

    /// The idempotency key of its `index`-th action: the rule and its version, the instance,
    /// the firing episode and, for a repeat, its time. A replay of the same request (after a
    /// restart, a duplicate delivery) has the same key and is not run twice.
    pub fn idempotency_key(&self, index: usize) -> String {
        use std::hash::{Hash, Hasher};
        let repeat_at = if self.event == Event::Repeat {
            self.at_ms
        } else {
            0
        };
        let mut h = std::collections::hash_map::DefaultHasher::new();
        (
            &self.rule,
            &self.rule_version,
            self.labels.to_string(),
            self.episode_ms,
            repeat_at,
            index,
        )
            .hash(&mut h);
        format!("{:016x}", h.finish())
    }
}

impl ActionSpec {
    /// Whether the breaker counts this action: a knob controller is bounded by its own
    /// limits, stabilization and change budget, and acting over and over is its job.
    pub fn counts_for_breaker(&self) -> bool {
        !matches!(self, ActionSpec::Knob(k) if k.controller.is_some())
    }
}

/// A rule's `verify`: checked `after` its actions ran.
#[derive(Debug, Clone, PartialEq, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct VerifySpec {
    /// How long after the actions to check.
    pub after: HumanDuration,
    /// PromQL that returns the instance when the actions helped.
    pub expr: String,
    /// PromQL that returns the instance when things got worse: a knob change is reverted.
    pub worse: Option<String>,
}

/// Evaluates verification conditions (PromQL): implemented by the wiring over the rule
/// engine's evaluator, so this stage need not know PromQL.
pub trait Verifier: Send + Sync {
    /// Whether `expr` returns a sample whose labels include every label of `labels` that the
    /// result carries (an aggregated condition matches any instance).
    fn holds(&self, expr: &str, labels: &Labels) -> Result<bool, String>;

    /// The value of `expr` now: a scalar, or the first sample of a vector (`None` when empty).
    fn value(&self, expr: &str) -> Result<Option<f64>, String>;
}

/// One action of a rule, written as a one-entry mapping: `- webhook: { url: ... }`.
#[derive(Debug, Clone, PartialEq, Deserialize, serde::Serialize)]
#[serde(try_from = "ActionEntry", rename_all = "snake_case")]
pub enum ActionSpec {
    /// Run one SQL statement on a PostgreSQL target.
    Sql(SqlAction),
    /// Run one Redis command.
    Redis(RedisCommand),
    /// Delete keys matching a pattern (SCAN + UNLINK), bounded: the cache cleanup.
    RedisEvict(RedisEvict),
    /// `MEMORY PURGE`: return freed memory to the OS.
    RedisMemoryPurge(TargetOnly),
    /// Write the rows of a SQL query to Redis keys with a TTL: cache warming.
    CacheWarm(CacheWarm),
    /// Terminate idle (or idle-in-transaction) connections older than a limit.
    PgTerminateIdle(PgTerminateIdle),
    /// `ANALYZE` the tables whose statistics are stale.
    PgAnalyze(PgAnalyze),
    /// Advise (and, where allowed, create) indexes for the slow statements.
    IndexAdvice(IndexAdvice),
    /// Delete old rows in small batches.
    RetentionDelete(RetentionDelete),
    /// Move a knob (a bounded tunable such as the batch size).
    Knob(KnobAction),
    /// POST a JSON body to a URL.
    Webhook(Webhook),
    /// Send the rule's alert to an Alertmanager.
    Alertmanager(AlertmanagerAction),
    /// Run a command (refused unless the configuration allows that command).
    Exec(Exec),
}

/// How an action is read: a mapping whose one key names the kind. Decoding through a struct of
/// optional fields (rather than serde's enum form, which the YAML value tree only takes as a
/// `!tag`) keeps every error located: an unknown kind is an unknown field at its key, a bad
/// parameter is reported at the parameter.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct ActionEntry {
    sql: Option<SqlAction>,
    redis: Option<RedisCommand>,
    redis_evict: Option<RedisEvict>,
    redis_memory_purge: Option<TargetOnly>,
    cache_warm: Option<CacheWarm>,
    pg_terminate_idle: Option<PgTerminateIdle>,
    pg_analyze: Option<PgAnalyze>,
    index_advice: Option<IndexAdvice>,
    retention_delete: Option<RetentionDelete>,
    knob: Option<KnobAction>,
    webhook: Option<Webhook>,
    alertmanager: Option<AlertmanagerAction>,
    exec: Option<Exec>,
}

impl TryFrom<ActionEntry> for ActionSpec {
    type Error = String;

    fn try_from(e: ActionEntry) -> Result<Self, String> {
        let found: Vec<ActionSpec> = [
            e.sql.map(ActionSpec::Sql),
            e.redis.map(ActionSpec::Redis),
            e.redis_evict.map(ActionSpec::RedisEvict),
            e.redis_memory_purge.map(ActionSpec::RedisMemoryPurge),
            e.cache_warm.map(ActionSpec::CacheWarm),
            e.pg_terminate_idle.map(ActionSpec::PgTerminateIdle),
            e.pg_analyze.map(ActionSpec::PgAnalyze),
            e.index_advice.map(ActionSpec::IndexAdvice),
            e.retention_delete.map(ActionSpec::RetentionDelete),
            e.knob.map(ActionSpec::Knob),
            e.webhook.map(ActionSpec::Webhook),
            e.alertmanager.map(ActionSpec::Alertmanager),
            e.exec.map(ActionSpec::Exec),
        ]
        .into_iter()
        .flatten()
        .collect();
        match <[ActionSpec; 1]>::try_from(found) {
            Ok([one]) => Ok(one),
            Err(v) => Err(format!(
                "an action is one entry naming its kind, e.g. `- webhook: {{url: ...}}`; this one has {}",
                v.len()
            )),
        }
    }
}

impl ActionSpec {
    /// The kind, as written in the file (the `action` label of the metrics).
    pub fn kind(&self) -> &'static str {
        match self {
            ActionSpec::Sql(_) => "sql",
            ActionSpec::Redis(_) => "redis",
            ActionSpec::RedisEvict(_) => "redis_evict",
            ActionSpec::RedisMemoryPurge(_) => "redis_memory_purge",
            ActionSpec::CacheWarm(_) => "cache_warm",
            ActionSpec::PgTerminateIdle(_) => "pg_terminate_idle",
            ActionSpec::PgAnalyze(_) => "pg_analyze",
            ActionSpec::IndexAdvice(_) => "index_advice",
            ActionSpec::RetentionDelete(_) => "retention_delete",
            ActionSpec::Knob(_) => "knob",
            ActionSpec::Webhook(_) => "webhook",
            ActionSpec::Alertmanager(_) => "alertmanager",
            ActionSpec::Exec(_) => "exec",
        }
    }

    /// Whether the action can destroy data or disturb clients (deleting keys or rows,
    /// terminating connections, running commands): such actions run in `enforce` only when the
    /// rule says so explicitly.
    pub fn is_destructive(&self) -> bool {
        matches!(
            self,
            ActionSpec::RedisEvict(_)
                | ActionSpec::PgTerminateIdle(_)
                | ActionSpec::RetentionDelete(_)
                | ActionSpec::Exec(_)
                | ActionSpec::Sql(_)
                | ActionSpec::Redis(_)
        ) || matches!(self, ActionSpec::IndexAdvice(a) if a.create)
    }
}

/// An action whose only parameter is the target.
#[derive(Debug, Clone, PartialEq, Default, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct TargetOnly {
    /// The target's name (default: the only one of its kind).
    pub target: Option<String>,
}

/// `sql`.
#[derive(Debug, Clone, PartialEq, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct SqlAction {
    /// The statement, with `$1`… placeholders.
    pub query: String,
    /// The placeholders' values, as text; `{{ $labels.x }}` and `{{ $value }}` are filled in.
    #[serde(default)]
    pub params: Vec<String>,
    /// Server-side `statement_timeout` (default 10s).
    pub timeout: Option<HumanDuration>,
    /// The PostgreSQL target.
    pub target: Option<String>,
}

/// `redis`.
#[derive(Debug, Clone, PartialEq, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct RedisCommand {
    /// The command and its arguments, e.g. `[CONFIG, SET, maxmemory-policy, allkeys-lru]`.
    pub command: Vec<String>,
    /// The Redis target.
    pub target: Option<String>,
}

/// `redis_evict`.
#[derive(Debug, Clone, PartialEq, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct RedisEvict {
    /// The key pattern (`SCAN MATCH`), e.g. `cache:*`.
    #[serde(rename = "match")]
    pub pattern: String,
    /// At most this many keys per run.
    pub max_keys: u64,
    /// At most this long per run (default 5s).
    pub time_budget: Option<HumanDuration>,
    /// The Redis target.
    pub target: Option<String>,
}

/// `cache_warm`.
#[derive(Debug, Clone, PartialEq, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct CacheWarm {
    /// The query whose rows are cached.
    pub query: String,
    /// The key of each row, e.g. `product:{{ id }}`, from the row's columns.
    pub key: String,
    /// The column (or template) stored as the value; default: the row as JSON.
    pub value: Option<String>,
    /// The keys' time to live.
    pub ttl: HumanDuration,
    /// At most this many rows (default 10000).
    pub max_rows: Option<u64>,
    /// The PostgreSQL target read from.
    pub postgres: Option<String>,
    /// The Redis target written to.
    pub redis: Option<String>,
}

/// `pg_terminate_idle`.
#[derive(Debug, Clone, PartialEq, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct PgTerminateIdle {
    /// Only connections idle for longer than this.
    pub idle_for: HumanDuration,
    /// Also idle-in-transaction connections (default: only plain idle).
    #[serde(default)]
    pub in_transaction: bool,
    /// Only this database.
    pub database: Option<String>,
    /// Only this user.
    pub user: Option<String>,
    /// Only this application_name.
    pub application: Option<String>,
    /// At most this many per run (default 10).
    pub max: Option<u64>,
    /// The PostgreSQL target.
    pub target: Option<String>,
}

/// `pg_analyze`.
#[derive(Debug, Clone, PartialEq, Default, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct PgAnalyze {
    /// A table is stale when this share of its rows changed since its last analyze (default
    /// 0.1, autovacuum's own default).
    pub stale_ratio: Option<f64>,
    /// At most this many tables per run.
    pub max_tables: Option<u64>,
    /// The PostgreSQL target.
    pub target: Option<String>,
}

/// `index_advice`.
#[derive(Debug, Clone, PartialEq, Default, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct IndexAdvice {
    /// Create the advised index (`CREATE INDEX CONCURRENTLY`); off by default.
    pub create: bool,
    /// Advice only when the plan cost falls by at least this share (default 0.5).
    pub min_saving: Option<f64>,
    /// With `create`: at most one index per this long on the target (default 24h).
    pub create_every: Option<HumanDuration>,
    /// Partitioned tables that may be indexed (without `CONCURRENTLY`: the build blocks
    /// writes to every partition), as `table` or `schema.table`.
    #[serde(default)]
    pub partitioned_tables: Vec<String>,
    /// The PostgreSQL target.
    pub target: Option<String>,
}

/// `retention_delete`.
#[derive(Debug, Clone, PartialEq, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct RetentionDelete {
    /// The table.
    pub table: String,
    /// Its timestamp column.
    pub column: String,
    /// Rows older than this are deleted.
    pub older_than: HumanDuration,
    /// Rows per batch (default 1000).
    pub batch_size: Option<u64>,
    /// Pause between batches (default 100ms).
    pub pause: Option<HumanDuration>,
    /// At most this many rows per run.
    pub max_rows: u64,
    /// The PostgreSQL target.
    pub target: Option<String>,
}

/// `knob`: exactly one of `set`, `scale`, `step` or `controller`.
#[derive(Debug, Clone, PartialEq, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct KnobAction {
    /// The knob, as declared in the configuration.
    pub name: String,
    /// Set to this value.
    pub set: Option<f64>,
    /// Multiply by this factor (e.g. 0.5 to halve the batch size).
    pub scale: Option<f64>,
    /// Add this (e.g. 100 to grow the batch size step by step).
    pub step: Option<f64>,
    /// Follow the condition's value with a dead band (the CPU → batch size controller).
    pub controller: Option<Controller>,
}

/// A controller over one knob, fed by the condition's value: above `high` the knob shrinks
/// multiplicatively, below `low` it grows additively, in between it holds (the dead band).
/// Kubernetes HPA-style stabilization per direction and a change budget per period keep it
/// from oscillating.
#[derive(Debug, Clone, PartialEq, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct Controller {
    /// Above this the knob decreases.
    pub high: f64,
    /// Below this the knob increases.
    pub low: f64,
    /// Multiplier on decrease, in (0, 1) (default 0.5).
    pub decrease_factor: Option<f64>,
    /// Added on increase (> 0).
    pub increase_step: f64,
    /// A decrease goes only to the largest value wanted over this window (default 0: react
    /// at once, the protective direction).
    pub down_stabilization: Option<HumanDuration>,
    /// An increase goes only to the smallest value wanted over this window (default 3m: relax
    /// slowly).
    pub up_stabilization: Option<HumanDuration>,
    /// At most this much total change per `budget_period` (default: unlimited).
    pub max_change: Option<f64>,
    /// The change budget's period (default 10m).
    pub budget_period: Option<HumanDuration>,
}

/// `webhook`.
#[derive(Debug, Clone, PartialEq, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct Webhook {
    /// Where to POST.
    pub url: String,
    /// Total time per attempt (default 5s).
    pub timeout: Option<HumanDuration>,
    /// Further attempts after a failure (default 2).
    pub retries: Option<u32>,
    /// Extra JSON fields; string values may use `{{ $labels.x }}` and `{{ $value }}`.
    #[serde(default)]
    pub body: BTreeMap<String, serde_json::Value>,
}

/// `alertmanager`.
#[derive(Debug, Clone, PartialEq, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct AlertmanagerAction {
    /// The Alertmanager's base URL, e.g. `http://127.0.0.1:9093`.
    pub url: String,
}

/// `exec`.
#[derive(Debug, Clone, PartialEq, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct Exec {
    /// The program and its arguments (no shell).
    pub command: Vec<String>,
    /// Longest it may run (default 30s); then its process group is killed.
    pub timeout: Option<HumanDuration>,
    /// Let an argument start with `-` because of a substituted value (a label or the value):
    /// off by default, since a value would then be read as an option the rule never wrote.
    #[serde(default)]
    pub allow_option_values: bool,
}
