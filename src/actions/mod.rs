//! ③ Actions: what a rule may ask for, as typed specifications (`ActionSpec`). The gate and the
//! executors that carry them out against the real services build on these types; rule files are
//! validated against them now, so a typo in an action is refused when the file loads.
//!
//! Uses `settings::HumanDuration` only. Never imports `rules`.

use std::collections::BTreeMap;

use serde::Deserialize;

use crate::settings::HumanDuration;

/// One action of a rule, written as a one-entry mapping: `- webhook: { url: ... }`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(try_from = "ActionEntry")]
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
#[derive(Debug, Clone, PartialEq, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TargetOnly {
    /// The target's name (default: the only one of its kind).
    pub target: Option<String>,
}

/// `sql`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
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
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RedisCommand {
    /// The command and its arguments, e.g. `[CONFIG, SET, maxmemory-policy, allkeys-lru]`.
    pub command: Vec<String>,
    /// The Redis target.
    pub target: Option<String>,
}

/// `redis_evict`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
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
#[derive(Debug, Clone, PartialEq, Deserialize)]
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
#[derive(Debug, Clone, PartialEq, Deserialize)]
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
#[derive(Debug, Clone, PartialEq, Default, Deserialize)]
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
#[derive(Debug, Clone, PartialEq, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct IndexAdvice {
    /// Create the advised index (`CREATE INDEX CONCURRENTLY`); off by default.
    pub create: bool,
    /// Advice only when the plan cost falls by at least this share (default 0.5).
    pub min_saving: Option<f64>,
    /// The PostgreSQL target.
    pub target: Option<String>,
}

/// `retention_delete`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
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

/// `knob`: exactly one of `set`, `scale`, `step`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
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
}

/// `webhook`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
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
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AlertmanagerAction {
    /// The Alertmanager's base URL, e.g. `http://127.0.0.1:9093`.
    pub url: String,
}

/// `exec`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Exec {
    /// The program and its arguments (no shell).
    pub command: Vec<String>,
    /// Longest it may run (default 30s).
    pub timeout: Option<HumanDuration>,
}
