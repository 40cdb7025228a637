//! The index advisor: from the slow statements of `pg_stat_statements` to indexes proven, with
//! HypoPG's hypothetical indexes, to make them cheaper; the creation of such an index, safely;
//! `ANALYZE` of tables whose statistics are stale; and the store of the latest advice that the
//! HTTP API and `/metrics` show. What dexter does, inside the autotuner.
//!
//! Owns how statements are chosen (mean over the window above the slow threshold, enough
//! calls, never our own `/* autotuner */` statements), how a normalized statement with `$n`
//! parameters is planned (a generic plan: `EXPLAIN (GENERIC_PLAN)` from PostgreSQL 16, a
//! prepared statement under `plan_cache_mode = force_generic_plan` executed with NULLs in a
//! rolled-back transaction before), how candidates are read from the plan (`plan`), how they
//! are proven, and the advice id. Uses `targets` (error text), `sample` and `registry` (the
//! advice as metrics). Never `rules`, `actions` or `collect`: the actions stage calls this.
//!
//! Safety: advising never changes the schema. Planning can run code: the planner evaluates
//! immutable (and, to estimate, stable) functions with constant arguments, and those may be any
//! user's. So a statement is planned as a role that ran it (`pg_stat_statements.userid`): as
//! before when that is our role or a role holding every privilege ours has (a superuser); as
//! another role under `SET LOCAL ROLE` and inside a `SECURITY DEFINER` function that role owns
//! (created in `pg_temp`, rolled back), where PostgreSQL refuses `SET ROLE` and `RESET ROLE`,
//! so its code cannot take our role back; and not at all when we may take none of its roles
//! (`Verdict::NotPlanned`, with the reason). Every statement it sends carries the
//! `/* autotuner */` mark, runs in a transaction with `SET LOCAL statement_timeout` and
//! `lock_timeout`, and is parsed as a single command before it is explained. Hypothetical
//! indexes live only in the backend's memory; they are reset when advising starts (a run cut
//! off earlier may have left some on a reused connection) and before it returns, error or not.

mod catalog;
mod create;
pub mod plan;
mod store;

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use serde::Serialize;
use serde_json::Value;
use tokio_postgres::{Client, SimpleQueryMessage, Transaction};

pub use create::{
    ADVISORY_LOCK_KEY, AnalyzeReport, AnalyzedTable, CreateOptions, Creation, analyze_stale,
    create_index, index_name,
};
pub use store::{Recommendation, Recommendations, Status};

use crate::targets::error_chain;

/// Every statement we send starts with this, so our own statements can be recognised in
/// `pg_stat_statements` (the collector uses the same mark) and never advised on.
pub const MARK: &str = "/* autotuner */";

/// The name of the prepared statement the generic plan is taken from before PostgreSQL 16.
const PLAN_NAME: &str = "autotuner_advisor_plan";

/// Oldest server supported: `pg_stat_statements` names its columns as read here from 13 on,
/// and `plan_cache_mode` exists from 12.
const MIN_SERVER_VERSION: i32 = 130_000;

/// `EXPLAIN (GENERIC_PLAN)` exists from PostgreSQL 16.
const GENERIC_PLAN_VERSION: i32 = 160_000;

/// Longest statement text kept in reports (the plan is taken from the full text).
const REPORT_TEXT_CHARS: usize = 2000;

/// What goes wrong while advising, creating or analyzing, with what we were doing.
#[derive(Debug, thiserror::Error)]
pub enum AdvisorError {
    /// The server refused or failed a statement of ours, or the connection broke.
    #[error("{context}: {message}")]
    Postgres {
        /// What we were doing.
        context: String,
        /// The error and its causes on one line.
        message: String,
        /// The error.
        #[source]
        source: tokio_postgres::Error,
    },
    /// The server is older than we support.
    #[error(
        "server_version_num {0} is older than 130000: the advisor needs PostgreSQL 13 or newer"
    )]
    Unsupported(i32),
    /// There are no statement statistics to advise from.
    #[error(
        "pg_stat_statements is not installed in database {0:?} (CREATE EXTENSION pg_stat_statements)"
    )]
    NoStatements(String),
    /// An index build failed; the invalid index it left, if any, was dropped (or not: said).
    #[error("building index {index} on {table}: {message}")]
    Build {
        /// The table, qualified.
        table: String,
        /// The index's name.
        index: String,
        /// What failed, and what was done about the invalid index.
        message: String,
        /// The error.
        #[source]
        source: tokio_postgres::Error,
    },
}

impl AdvisorError {
    /// The SQLSTATE of a server error, if this is one.
    pub fn sqlstate(&self) -> Option<&str> {
        match self {
            AdvisorError::Postgres { source, .. } | AdvisorError::Build { source, .. } => {
                source.code().map(tokio_postgres::error::SqlState::code)
            }
            _ => None,
        }
    }
}

/// `map_err` helper: a tokio-postgres error with what we were doing.
fn pg(context: impl Into<String>) -> impl FnOnce(tokio_postgres::Error) -> AdvisorError {
    let context = context.into();
    move |source| AdvisorError::Postgres {
        context,
        message: error_chain(&source),
        source,
    }
}

/// How to advise.
#[derive(Debug, Clone)]
pub struct AdviseOptions {
    /// A statement is a candidate when its mean execution time exceeds this (default 100ms).
    pub slow_threshold: Duration,
    /// ... and it ran at least this many times (default 10).
    pub min_calls: u64,
    /// Advice only when the plan cost falls by at least this share (default 0.5).
    pub min_saving: f64,
    /// Statements whose plan costs less than this are left alone (default 100, dexter's).
    pub min_cost: f64,
    /// At most this many statements per run, the most time-consuming first (default 20).
    pub max_statements: usize,
    /// At most this many hypothetical indexes tried per statement (default 12).
    pub max_candidates: usize,
    /// `statement_timeout` of each of our statements (default 5s).
    pub statement_timeout: Duration,
    /// `lock_timeout` of each of our statements (default 1s): planning takes the lightest
    /// lock, but must not queue behind a DDL and hold others up.
    pub lock_timeout: Duration,
}

impl Default for AdviseOptions {
    fn default() -> Self {
        AdviseOptions {
            slow_threshold: Duration::from_millis(100),
            min_calls: 10,
            min_saving: 0.5,
            min_cost: 100.0,
            max_statements: 20,
            max_candidates: 12,
            statement_timeout: Duration::from_secs(5),
            lock_timeout: Duration::from_secs(1),
        }
    }
}

/// An index: a table and its key columns, in order. Names are raw (unquoted); every use in
/// SQL quotes them.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct IndexTarget {
    /// The table's schema.
    pub schema: String,
    /// The table.
    pub table: String,
    /// The key columns.
    pub columns: Vec<String>,
}

impl IndexTarget {
    /// The stable advice id: a hash of schema, table and columns (FNV-1a, fixed across
    /// versions and processes), so the same advice from different runs and statements merges.
    pub fn id(&self) -> String {
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        let parts = [&self.schema, &self.table]
            .into_iter()
            .chain(self.columns.iter());
        for part in parts {
            for b in part.bytes().chain(std::iter::once(0)) {
                h ^= u64::from(b);
                h = h.wrapping_mul(0x0000_0100_0000_01b3);
            }
        }
        format!("{h:016x}")
    }

    /// `schema.table` as written in labels and messages (not SQL).
    pub fn table_name(&self) -> String {
        format!("{}.{}", self.schema, self.table)
    }

    /// The quoted `"schema"."table"`.
    pub fn quoted_table(&self) -> String {
        format!("{}.{}", quote_ident(&self.schema), quote_ident(&self.table))
    }

    /// The quoted column list, `("a", "b")`.
    pub fn quoted_columns(&self) -> String {
        let cols: Vec<String> = self.columns.iter().map(|c| quote_ident(c)).collect();
        format!("({})", cols.join(", "))
    }

    /// `CREATE INDEX ON "schema"."table" USING btree ("a", "b")`: what HypoPG takes, and what
    /// the advice says to run.
    pub fn definition(&self) -> String {
        format!(
            "CREATE INDEX ON {} USING btree {}",
            self.quoted_table(),
            self.quoted_columns()
        )
    }
}

/// An identifier in double quotes, embedded quotes doubled: always quoted, so no name can be
/// read as SQL and case is kept.
pub fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// A statement an index helps.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct HelpedStatement {
    /// `pg_stat_statements.queryid`.
    #[serde(serialize_with = "as_string")]
    pub queryid: i64,
    /// The normalized text (clipped for the report).
    pub query: String,
    /// Calls over the window.
    pub calls: f64,
    /// Mean execution time over the window, in seconds.
    pub mean_seconds: f64,
    /// The generic plan's cost without the index.
    pub before_cost: f64,
    /// With the (hypothetical) index, when verified.
    pub after_cost: Option<f64>,
}

/// One piece of advice: an index, what it saves, for which statements.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Advice {
    /// Stable id (schema + table + columns): repeats merge.
    pub id: String,
    /// The index.
    #[serde(flatten)]
    pub index: IndexTarget,
    /// What to run (quoted identifiers).
    pub definition: String,
    /// Sum of the helped statements' plan costs without the index.
    pub before_cost: f64,
    /// ... and with it, when verified with HypoPG.
    pub after_cost: Option<f64>,
    /// `1 - after / before`, when verified.
    pub saving_ratio: Option<f64>,
    /// HypoPG's estimate of the index's size.
    pub estimated_size_bytes: Option<i64>,
    /// The statements it helps.
    pub statements: Vec<HelpedStatement>,
    /// Proven with a hypothetical index (the re-planned statement used it and cost less);
    /// false when HypoPG is not installed and the advice comes from the plan alone.
    pub verified: bool,
}

/// What was concluded about one examined statement.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "verdict", rename_all = "snake_case")]
pub enum Verdict {
    /// Advice was given.
    Advised {
        /// The advice's id.
        advice_id: String,
    },
    /// The plan has no sequential scan with a filter, join key or sort an index could serve
    /// (or an index for each already exists).
    NoCandidate,
    /// Candidates were tried; none saved enough.
    NoSaving {
        /// The best saving seen.
        best_saving: Option<f64>,
    },
    /// The plan is already cheaper than `min_cost`.
    BelowMinCost,
    /// It could not be planned: see `unexplainable`.
    Unexplainable,
    /// Not planned: planning runs the statement's functions, and the autotuner may not act as
    /// any role that ran it, so it would run another role's code with its own privileges.
    NotPlanned {
        /// The role that ran it (the one with the most time), or `oid N` when it is gone.
        role: String,
        /// Why, in words.
        reason: String,
    },
}

/// One hypothetical index tried for a statement.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Trial {
    /// The advice id it would have.
    pub id: String,
    /// The index.
    #[serde(flatten)]
    pub index: IndexTarget,
    /// The plan cost with it.
    pub after_cost: Option<f64>,
    /// Whether the plan used it.
    pub used: bool,
    /// Why it could not be tried (e.g. HypoPG refused the column type).
    pub error: Option<String>,
}

/// A statement that was examined.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Examined {
    /// `pg_stat_statements.queryid`.
    #[serde(serialize_with = "as_string")]
    pub queryid: i64,
    /// The normalized text (clipped).
    pub query: String,
    /// Calls over the window.
    pub calls: f64,
    /// Mean execution time over the window, in seconds.
    pub mean_seconds: f64,
    /// The generic plan's total cost.
    pub plan_cost: Option<f64>,
    /// The conclusion.
    #[serde(flatten)]
    pub verdict: Verdict,
    /// The hypothetical indexes tried.
    pub trials: Vec<Trial>,
}

/// A statement that could not be explained, and why: recorded, never guessed.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Unexplainable {
    /// `pg_stat_statements.queryid`.
    #[serde(serialize_with = "as_string")]
    pub queryid: i64,
    /// The normalized text (clipped).
    pub query: String,
    /// The server's error (or ours).
    pub reason: String,
    /// Its SQLSTATE, when the server gave one.
    pub sqlstate: Option<String>,
}

/// What one run found.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Report {
    /// The database advised on.
    pub database: String,
    /// `server_version_num`.
    pub server_version_num: i32,
    /// Whether HypoPG was installed, so advice could be verified.
    pub hypopg: bool,
    /// Whether the means are over the window since the previous run (false on the first run:
    /// cumulative since the statistics were last reset).
    pub windowed: bool,
    /// The advice, by id.
    pub advice: Vec<Advice>,
    /// Every statement examined.
    pub examined: Vec<Examined>,
    /// The statements that could not be planned.
    pub unexplainable: Vec<Unexplainable>,
}

fn as_string<S: serde::Serializer>(v: &i64, s: S) -> Result<S::Ok, S::Error> {
    // Query ids use all 64 bits: as JSON numbers, JavaScript readers would round them.
    s.collect_str(v)
}

/// Cumulative calls and seconds of one statement.
#[derive(Debug, Clone, Copy, Default)]
struct Totals {
    calls: f64,
    seconds: f64,
}

/// The advisor of one target: remembers the previous run's statement totals per database, so
/// that each run judges statements by their mean since then, not since the statistics reset.
#[derive(Debug, Default)]
pub struct Advisor {
    previous: HashMap<String, HashMap<i64, Totals>>,
}

/// Advises once, with cumulative means (no previous run to take a window from).
pub async fn advise(client: &mut Client, opts: &AdviseOptions) -> Result<Report, AdvisorError> {
    Advisor::new().advise(client, opts).await
}

/// A statement chosen for examination.
struct Candidate {
    queryid: i64,
    text: String,
    calls: f64,
    mean: f64,
    /// The roles that ran it (`pg_stat_statements.userid`), most time first.
    users: Vec<u32>,
}

/// As whom a statement is planned.
#[derive(Debug, Clone, PartialEq)]
enum PlanAs {
    /// As our own role, as before: it ran it, or one that holds every privilege ours has (a
    /// superuser, a member of ours), so its code gains nothing by running as us.
    Own,
    /// As this role (which ran it), which we may take.
    Role(String),
    /// Not at all: we may take none of the roles that ran it.
    Refused {
        /// The role named in the reason.
        role: String,
        /// Why.
        reason: String,
    },
}

/// A role that ran statements, as the catalog describes it to us.
struct RoleInfo {
    name: String,
    /// Ours, or one holding every privilege of ours.
    own: bool,
    may_set: bool,
}

/// Reads who the roles `users` are, and whether our session may `SET ROLE` to each (from 16
/// the membership's SET option, before that membership).
async fn roles(
    client: &Client,
    users: &[u32],
    version: i32,
) -> Result<HashMap<u32, RoleInfo>, AdvisorError> {
    let option = if version >= 160_000 { "SET" } else { "MEMBER" };
    Ok(client
        .query(
            &format!(
                "{MARK} SELECT r.oid, r.rolname::text, \
                 r.rolname = session_user OR pg_has_role(r.oid, session_user, 'USAGE'), \
                 pg_has_role(session_user, r.oid, '{option}') FROM pg_roles r WHERE r.oid = ANY($1)"
            ),
            &[&users],
        )
        .await
        .map_err(pg("reading the roles that ran the slow statements"))?
        .iter()
        .map(|r| {
            (
                r.get::<_, u32>(0),
                RoleInfo {
                    name: r.get(1),
                    own: r.get(2),
                    may_set: r.get(3),
                },
            )
        })
        .collect())
}

/// As whom to plan a statement run by `users` (most time first): ours if we ran it, else the
/// first role we may take, else none.
fn plan_as(users: &[u32], roles: &HashMap<u32, RoleInfo>) -> PlanAs {
    if users.iter().any(|u| roles.get(u).is_some_and(|r| r.own)) {
        return PlanAs::Own;
    }
    if let Some(r) = users
        .iter()
        .filter_map(|u| roles.get(u))
        .find(|r| r.may_set)
    {
        return PlanAs::Role(r.name.clone());
    }
    let role = users.first().map_or_else(
        || "unknown".to_owned(),
        |u| {
            roles
                .get(u)
                .map_or_else(|| format!("oid {u}"), |r| r.name.clone())
        },
    );
    let reason = match users.first().and_then(|u| roles.get(u)) {
        Some(_) => format!(
            "statement of role {role} not planned: the autotuner cannot act as {role} \
             (planning runs the statement's functions, which must not run with the autotuner's \
             privileges; GRANT {role} TO the autotuner's role to have it planned)"
        ),
        None => format!("statement of role {role} not planned: the role no longer exists"),
    };
    PlanAs::Refused { role, reason }
}

/// Why a plan could not be had.
enum PlanFailure {
    /// The statement's fault (or the server's refusal of it): recorded as unexplainable.
    Statement {
        reason: String,
        sqlstate: Option<String>,
    },
    /// The connection's: the run stops.
    Connection(tokio_postgres::Error),
}

impl From<tokio_postgres::Error> for PlanFailure {
    fn from(e: tokio_postgres::Error) -> Self {
        match e.as_db_error() {
            // A server error about the statement; FATAL and PANIC end the session.
            Some(db) if !matches!(db.severity(), "FATAL" | "PANIC") => PlanFailure::Statement {
                reason: db.message().to_owned(),
                sqlstate: Some(db.code().code().to_owned()),
            },
            _ => PlanFailure::Connection(e),
        }
    }
}

impl Advisor {
    /// A fresh advisor (no window yet).
    pub fn new() -> Self {
        Advisor::default()
    }

    /// Examines the slow statements of the connected database and advises indexes.
    ///
    /// `client` should be a connection of its own (hypothetical indexes are per backend): the
    /// advisor resets HypoPG before and after, so a reused connection neither brings nor
    /// keeps any. The role needs `pg_read_all_stats` (or `pg_monitor`) to see every user's
    /// statements, `SELECT` on the tables to plan them, and `EXECUTE` on HypoPG's functions.
    pub async fn advise(
        &mut self,
        client: &mut Client,
        opts: &AdviseOptions,
    ) -> Result<Report, AdvisorError> {
        let row = client
            .query_one(
                &format!(
                    "{MARK} SELECT current_setting('server_version_num')::int4, current_database()::text, \
                     EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'pg_stat_statements'), \
                     EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'hypopg')"
                ),
                &[],
            )
            .await
            .map_err(pg("reading the server version and extensions"))?;
        let version: i32 = row.get(0);
        let database: String = row.get(1);
        if version < MIN_SERVER_VERSION {
            return Err(AdvisorError::Unsupported(version));
        }
        if !row.get::<_, bool>(2) {
            return Err(AdvisorError::NoStatements(database));
        }
        let hypopg: bool = row.get(3);
        // Whatever a run cut off earlier left on this connection goes first.
        forget_plan(client).await.map_err(pg(
            "deallocating a prepared statement left by an interrupted run",
        ))?;
        if hypopg {
            hypopg_reset(client)
                .await
                .map_err(pg("resetting HypoPG's hypothetical indexes"))?;
        }
        let mut report = Report {
            database,
            server_version_num: version,
            hypopg,
            windowed: false,
            advice: Vec::new(),
            examined: Vec::new(),
            unexplainable: Vec::new(),
        };
        let outcome = self.examine(client, opts, &mut report).await;
        // Always, whatever happened: hypothetical indexes outlive transactions.
        let reset = if hypopg {
            hypopg_reset(client)
                .await
                .map_err(pg("resetting HypoPG's hypothetical indexes"))
        } else {
            Ok(())
        };
        outcome?;
        reset?;
        Ok(report)
    }

    async fn examine(
        &mut self,
        client: &mut Client,
        opts: &AdviseOptions,
        report: &mut Report,
    ) -> Result<(), AdvisorError> {
        let candidates = self.slow_statements(client, opts, report).await?;
        let mut all_users: Vec<u32> = candidates
            .iter()
            .flat_map(|c| c.users.iter().copied())
            .collect();
        all_users.sort_unstable();
        all_users.dedup();
        let roles = if candidates.is_empty() {
            HashMap::new()
        } else {
            roles(client, &all_users, report.server_version_num).await?
        };
        let mut advice: BTreeMap<String, Advice> = BTreeMap::new();
        let mut tables: HashMap<(String, String), Option<catalog::TableInfo>> = HashMap::new();
        for c in candidates {
            let as_whom = plan_as(&c.users, &roles);
            let examined =
                examine_statement(client, opts, report, &c, &as_whom, &mut tables).await?;
            let (examined, found) = examined;
            if let Some((target, helped, size, verified)) = found {
                let id = target.id();
                let entry = advice.entry(id.clone()).or_insert_with(|| Advice {
                    id,
                    definition: target.definition(),
                    index: target.clone(),
                    before_cost: 0.0,
                    after_cost: verified.then_some(0.0),
                    saving_ratio: None,
                    estimated_size_bytes: size,
                    statements: Vec::new(),
                    verified,
                });
                entry.before_cost += helped.before_cost;
                if let (Some(a), Some(h)) = (entry.after_cost.as_mut(), helped.after_cost) {
                    *a += h;
                }
                entry.statements.push(helped);
            }
            report.examined.push(examined);
        }
        for a in advice.values_mut() {
            a.saving_ratio = a
                .after_cost
                .filter(|_| a.before_cost > 0.0)
                .map(|after| 1.0 - after / a.before_cost);
        }
        report.advice = advice.into_values().collect();
        Ok(())
    }

    /// The statements of this database whose mean since the previous run (or, on the first,
    /// ever) exceeds the threshold with enough calls, ours left out, the most time-consuming
    /// first.
    async fn slow_statements(
        &mut self,
        client: &Client,
        opts: &AdviseOptions,
        report: &mut Report,
    ) -> Result<Vec<Candidate>, AdvisorError> {
        let rows = client
            .query(
                &format!(
                    "{MARK} SELECT queryid, sum(calls)::float8, (sum(total_exec_time) / 1000)::float8, \
                       array_agg(userid ORDER BY total_exec_time DESC) \
                     FROM pg_stat_statements(false) \
                     WHERE dbid = (SELECT oid FROM pg_database WHERE datname = current_database()) \
                       AND queryid IS NOT NULL GROUP BY queryid"
                ),
                &[],
            )
            .await
            .map_err(pg("reading pg_stat_statements"))?;
        let mut users: HashMap<i64, Vec<u32>> = HashMap::new();
        for r in &rows {
            let mut u: Vec<u32> = Vec::new();
            for id in r.get::<_, Vec<u32>>(3) {
                if !u.contains(&id) {
                    u.push(id);
                }
            }
            users.insert(r.get(0), u);
        }
        let current: HashMap<i64, Totals> = rows
            .iter()
            .map(|r| {
                (
                    r.get(0),
                    Totals {
                        calls: r.get(1),
                        seconds: r.get(2),
                    },
                )
            })
            .collect();
        let previous = self
            .previous
            .insert(report.database.clone(), current.clone());
        report.windowed = previous.is_some();
        let mut slow: Vec<(i64, Totals)> = current
            .iter()
            .filter_map(|(&q, &now)| {
                let before = previous
                    .as_ref()
                    .and_then(|p| p.get(&q).copied())
                    // Fewer calls than before: reset or evicted and back. Count from zero.
                    .filter(|b| b.calls <= now.calls)
                    .unwrap_or_default();
                let d = Totals {
                    calls: now.calls - before.calls,
                    seconds: now.seconds - before.seconds,
                };
                (d.calls >= opts.min_calls.max(1) as f64
                    && d.seconds / d.calls > opts.slow_threshold.as_secs_f64())
                .then_some((q, d))
            })
            .collect();
        if slow.is_empty() {
            return Ok(Vec::new());
        }
        let ids: Vec<i64> = slow.iter().map(|(q, _)| *q).collect();
        // Texts are the expensive part of the view: read only for the slow ones. Ours are left
        // out here, by their mark.
        let texts: HashMap<i64, String> = client
            .query(
                &format!(
                    "{MARK} SELECT DISTINCT ON (queryid) queryid, query FROM pg_stat_statements(true) \
                     WHERE dbid = (SELECT oid FROM pg_database WHERE datname = current_database()) \
                       AND queryid = ANY($1) AND query IS NOT NULL \
                       AND query NOT LIKE '/* autotuner */%'"
                ),
                &[&ids],
            )
            .await
            .map_err(pg("reading the slow statements' texts"))?
            .iter()
            .map(|r| (r.get(0), r.get(1)))
            .collect();
        // Utility statements (SET, BEGIN, VACUUM, ...) have no plan and no index helps them.
        slow.retain(|(q, _)| texts.get(q).is_some_and(|t| plannable(t)));
        slow.sort_by(|a, b| b.1.seconds.total_cmp(&a.1.seconds).then(a.0.cmp(&b.0)));
        slow.truncate(opts.max_statements);
        Ok(slow
            .into_iter()
            .filter_map(|(q, d)| {
                Some(Candidate {
                    queryid: q,
                    text: texts.get(&q)?.clone(),
                    calls: d.calls,
                    mean: d.seconds / d.calls,
                    users: users.remove(&q).unwrap_or_default(),
                })
            })
            .collect())
    }
}

/// The examination of one statement and, when advised, the index, the statement's part in
/// the advice, the estimated size and whether it was verified.
type Examination = (
    Examined,
    Option<(IndexTarget, HelpedStatement, Option<i64>, bool)>,
);

async fn examine_statement(
    client: &mut Client,
    opts: &AdviseOptions,
    report: &mut Report,
    c: &Candidate,
    as_whom: &PlanAs,
    tables: &mut HashMap<(String, String), Option<catalog::TableInfo>>,
) -> Result<Examination, AdvisorError> {
    let version = report.server_version_num;
    let mut examined = Examined {
        queryid: c.queryid,
        query: clip(&c.text),
        calls: c.calls,
        mean_seconds: c.mean,
        plan_cost: None,
        verdict: Verdict::NoCandidate,
        trials: Vec::new(),
    };
    let role = match as_whom {
        PlanAs::Own => None,
        PlanAs::Role(r) => Some(r.as_str()),
        PlanAs::Refused { role, reason } => {
            examined.verdict = Verdict::NotPlanned {
                role: role.clone(),
                reason: reason.clone(),
            };
            return Ok((examined, None));
        }
    };
    let plan = match generic_plan(client, &c.text, version, opts, None, role).await {
        Ok((plan, _)) => plan,
        Err(PlanFailure::Connection(e)) => return Err(pg("planning a statement")(e)),
        Err(PlanFailure::Statement { reason, sqlstate }) => {
            report.unexplainable.push(Unexplainable {
                queryid: c.queryid,
                query: clip(&c.text),
                reason,
                sqlstate,
            });
            examined.verdict = Verdict::Unexplainable;
            return Ok((examined, None));
        }
    };
    let Some(before) = plan::total_cost(&plan) else {
        report.unexplainable.push(Unexplainable {
            queryid: c.queryid,
            query: clip(&c.text),
            reason: "the plan has no total cost".into(),
            sqlstate: None,
        });
        examined.verdict = Verdict::Unexplainable;
        return Ok((examined, None));
    };
    examined.plan_cost = Some(before);
    if before < opts.min_cost || before <= 0.0 {
        examined.verdict = Verdict::BelowMinCost;
        return Ok((examined, None));
    }
    // Candidates, checked against the catalog: the names read from the plan must be real
    // columns of the real table, indexable by a btree, and not served by an existing index.
    let mut targets: Vec<IndexTarget> = Vec::new();
    for scan in plan::scans(&plan) {
        let key = (scan.schema.clone(), scan.table.clone());
        if !tables.contains_key(&key) {
            let info = catalog::table_info(client, &scan.schema, &scan.table)
                .await
                .map_err(pg(format!("reading the catalog of {}.{}", key.0, key.1)))?;
            tables.insert(key.clone(), info);
        }
        let Some(Some(info)) = tables.get(&key) else {
            continue;
        };
        for columns in scan.candidates() {
            if info.indexable(&columns) && info.covering_index(&columns).is_none() {
                let t = IndexTarget {
                    schema: scan.schema.clone(),
                    table: scan.table.clone(),
                    columns,
                };
                if !targets.contains(&t) {
                    targets.push(t);
                }
            }
        }
    }
    if targets.is_empty() {
        examined.verdict = Verdict::NoCandidate;
        return Ok((examined, None));
    }
    let helped = |after: Option<f64>| HelpedStatement {
        queryid: c.queryid,
        query: clip(&c.text),
        calls: c.calls,
        mean_seconds: c.mean,
        before_cost: before,
        after_cost: after,
    };
    if !report.hypopg {
        // Unverified: the first candidate is the one a btree serves the scan best with
        // (equality columns, then a range or the sort keys).
        let target = targets.swap_remove(0);
        examined.verdict = Verdict::Advised {
            advice_id: target.id(),
        };
        return Ok((examined, Some((target, helped(None), None, false))));
    }
    let mut best: Option<(IndexTarget, f64, i64)> = None;
    for target in targets.into_iter().take(opts.max_candidates.max(1)) {
        let mut trial = Trial {
            id: target.id(),
            index: target.clone(),
            after_cost: None,
            used: false,
            error: None,
        };
        match generic_plan(client, &c.text, version, opts, Some(&target), role).await {
            Ok((plan, hypo)) => {
                trial.after_cost = plan::total_cost(&plan);
                if let Some((name, size)) = hypo {
                    trial.used = plan::uses_index(&plan, &name);
                    if let Some(after) = trial.after_cost
                        && trial.used
                        && best.as_ref().is_none_or(|b| after < b.1)
                    {
                        best = Some((target, after, size));
                    }
                }
            }
            Err(PlanFailure::Connection(e)) => {
                return Err(pg("planning with a hypothetical index")(e));
            }
            Err(PlanFailure::Statement { reason, .. }) => trial.error = Some(reason),
        }
        examined.trials.push(trial);
    }
    let saving = best.as_ref().map(|b| 1.0 - b.1 / before);
    match best {
        Some((target, after, size)) if saving.is_some_and(|s| s >= opts.min_saving) => {
            examined.verdict = Verdict::Advised {
                advice_id: target.id(),
            };
            Ok((
                examined,
                Some((target, helped(Some(after)), Some(size), true)),
            ))
        }
        _ => {
            examined.verdict = Verdict::NoSaving {
                best_saving: saving,
            };
            Ok((examined, None))
        }
    }
}

/// Whether the statement is one that has a plan (not a utility statement), judged by its
/// first keyword after comments.
fn plannable(text: &str) -> bool {
    let mut rest = text.trim_start();
    loop {
        if let Some(r) = rest.strip_prefix("/*") {
            // Comments nest in PostgreSQL; a plain scan to the first end is enough to find
            // the keyword in the texts pg_stat_statements keeps.
            match r.find("*/") {
                Some(end) => rest = r[end + 2..].trim_start(),
                None => return false,
            }
        } else if let Some(r) = rest.strip_prefix("--") {
            rest = r
                .split_once('\n')
                .map_or("", |(_, after)| after)
                .trim_start();
        } else {
            break;
        }
    }
    let rest = rest.trim_start_matches('(').trim_start();
    let word: String = rest
        .chars()
        .take_while(char::is_ascii_alphabetic)
        .collect::<String>()
        .to_ascii_uppercase();
    matches!(
        word.as_str(),
        "SELECT" | "WITH" | "INSERT" | "UPDATE" | "DELETE" | "VALUES" | "TABLE" | "MERGE"
    )
}

fn clip(text: &str) -> String {
    match text.char_indices().nth(REPORT_TEXT_CHARS) {
        Some((i, _)) => format!("{}…", &text[..i]),
        None => text.to_owned(),
    }
}

/// `SET LOCAL` of our timeouts, inside `tx`.
async fn set_local_timeouts(
    tx: &Transaction<'_>,
    statement_timeout: Duration,
    lock_timeout: Duration,
) -> Result<(), tokio_postgres::Error> {
    tx.batch_execute(&format!(
        "{MARK} SET LOCAL statement_timeout = {}; {MARK} SET LOCAL lock_timeout = {}",
        statement_timeout.as_millis().max(1),
        lock_timeout.as_millis().max(1)
    ))
    .await
}

/// The function another role's statement is planned in: `SECURITY DEFINER` and owned by that
/// role, so PostgreSQL refuses any `SET ROLE` or `RESET ROLE` the planned code attempts (it
/// would otherwise return to our role, a session-level escape from `SET LOCAL ROLE`). It runs
/// `q`, returning its rows as text when `rows`.
const PLAN_FUNCTION: &str = "CREATE FUNCTION pg_temp.autotuner_plan(q text, rows bool) \
     RETURNS SETOF text LANGUAGE plpgsql SECURITY DEFINER AS $autotuner$ \
     DECLARE line text; \
     BEGIN \
       IF NOT rows THEN EXECUTE q; RETURN; END IF; \
       FOR line IN EXECUTE q LOOP RETURN NEXT line; END LOOP; \
     END $autotuner$";

/// The generic plan of `text`, optionally with the hypothetical index `hypo` (then also its
/// HypoPG name and estimated size), in a transaction that is rolled back; as `role` when given
/// (see `PLAN_FUNCTION`), otherwise as our own role.
async fn generic_plan(
    client: &mut Client,
    text: &str,
    version: i32,
    opts: &AdviseOptions,
    hypo: Option<&IndexTarget>,
    role: Option<&str>,
) -> Result<(Value, Option<(String, i64)>), PlanFailure> {
    let result = async {
        let tx = client.transaction().await?;
        set_local_timeouts(&tx, opts.statement_timeout, opts.lock_timeout).await?;
        // The hypothetical index is ours (HypoPG's state is the backend's, whoever plans).
        let index = match hypo {
            Some(t) => {
                let row = tx
                    .query_one(
                        &format!(
                            "{MARK} SELECT indexrelid, indexname FROM hypopg_create_index($1)"
                        ),
                        &[&t.definition()],
                    )
                    .await?;
                let oid = row.get::<_, u32>(0);
                let size: i64 = tx
                    .query_one(&format!("{MARK} SELECT hypopg_relation_size($1)"), &[&oid])
                    .await?
                    .get(0);
                Some((oid, row.get::<_, String>(1), size))
            }
            None => None,
        };
        if let Some(role) = role {
            let as_role = async {
                tx.batch_execute(&format!("{MARK} SET LOCAL ROLE {}", quote_ident(role)))
                    .await?;
                tx.batch_execute(&format!("{MARK} {PLAN_FUNCTION}")).await
            };
            if let Err(e) = as_role.await {
                return Err(match PlanFailure::from(e) {
                    PlanFailure::Statement { reason, sqlstate } => PlanFailure::Statement {
                        reason: format!(
                            "statement of role {role} not planned: planning as {role} failed: {reason}"
                        ),
                        sqlstate,
                    },
                    other => other,
                });
            }
        }
        let plan = plan_in(&tx, text, version, role.is_some()).await?;
        if role.is_some() {
            tx.batch_execute(&format!("{MARK} RESET ROLE")).await?;
        }
        let mut named = None;
        if let Some((oid, name, size)) = index {
            tx.query(&format!("{MARK} SELECT hypopg_drop_index($1)"), &[&oid])
                .await?;
            named = Some((name, size));
        }
        tx.rollback().await?;
        Ok::<_, PlanFailure>((plan, named))
    }
    .await;
    if result.is_err() {
        // The transaction was rolled back (its drop sends ROLLBACK); what outlives it — the
        // prepared statement, a hypothetical index — goes now. A failure here is the
        // connection's, and the run stops.
        forget_plan(client).await.map_err(PlanFailure::Connection)?;
        if hypo.is_some() {
            hypopg_reset(client)
                .await
                .map_err(PlanFailure::Connection)?;
        }
    }
    result
}

/// Runs `sql` inside `tx`, directly or (`wrapped`) through `PLAN_FUNCTION`; the text of its
/// rows when `rows`.
async fn run_in(
    tx: &Transaction<'_>,
    sql: &str,
    rows: bool,
    wrapped: bool,
) -> Result<String, tokio_postgres::Error> {
    if !wrapped {
        if rows {
            return single_text(tx, sql).await;
        }
        tx.batch_execute(sql).await?;
        return Ok(String::new());
    }
    let mut out = String::new();
    for r in tx
        .query(
            &format!("{MARK} SELECT line FROM pg_temp.autotuner_plan($1, $2) AS p(line)"),
            &[&sql, &rows],
        )
        .await?
    {
        out.push_str(r.get::<_, Option<&str>>(0).unwrap_or(""));
    }
    Ok(out)
}

/// The plan, as JSON, inside `tx`; planned inside `PLAN_FUNCTION` when `wrapped`.
async fn plan_in(
    tx: &Transaction<'_>,
    text: &str,
    version: i32,
    wrapped: bool,
) -> Result<Value, PlanFailure> {
    // Parsed (not run) through the extended protocol first, which refuses more than one
    // command: the text can then be embedded in EXPLAIN or PREPARE with nothing after it
    // able to run. The parse also says how many parameters it has.
    let params = tx.prepare(text).await?.params().len();
    let json = if version >= GENERIC_PLAN_VERSION {
        run_in(
            tx,
            &format!("{MARK} EXPLAIN (GENERIC_PLAN, VERBOSE, FORMAT JSON) {text}"),
            true,
            wrapped,
        )
        .await?
    } else {
        // Before 16: a prepared statement planned generically, executed by EXPLAIN with NULL
        // for every parameter (a generic plan never looks at the values; a custom plan with
        // NULLs would be a plan for NULLs, so the mode is forced).
        tx.batch_execute(&format!(
            "{MARK} SET LOCAL plan_cache_mode = force_generic_plan"
        ))
        .await?;
        run_in(
            tx,
            &format!("{MARK} PREPARE {PLAN_NAME} AS {text}"),
            false,
            wrapped,
        )
        .await?;
        let call = if params == 0 {
            PLAN_NAME.to_owned()
        } else {
            format!("{PLAN_NAME}({})", vec!["NULL"; params].join(", "))
        };
        let json = run_in(
            tx,
            &format!("{MARK} EXPLAIN (VERBOSE, FORMAT JSON) EXECUTE {call}"),
            true,
            wrapped,
        )
        .await?;
        tx.batch_execute(&format!("{MARK} DEALLOCATE {PLAN_NAME}"))
            .await?;
        json
    };
    serde_json::from_str(&json).map_err(|e| PlanFailure::Statement {
        reason: format!("the plan is not JSON: {e}"),
        sqlstate: None,
    })
}

/// The text of the one-column rows of a simple query, joined.
async fn single_text(tx: &Transaction<'_>, sql: &str) -> Result<String, tokio_postgres::Error> {
    let mut out = String::new();
    for m in tx.simple_query(sql).await? {
        if let SimpleQueryMessage::Row(r) = m {
            out.push_str(r.get(0).unwrap_or(""));
        }
    }
    Ok(out)
}

/// Deallocates our prepared statement if an interrupted plan left it.
async fn forget_plan(client: &Client) -> Result<(), tokio_postgres::Error> {
    let left = client
        .query_opt(
            &format!("{MARK} SELECT 1 FROM pg_prepared_statements WHERE name = $1"),
            &[&PLAN_NAME],
        )
        .await?;
    if left.is_some() {
        client
            .batch_execute(&format!("{MARK} DEALLOCATE {PLAN_NAME}"))
            .await?;
    }
    Ok(())
}

/// Drops every hypothetical index of this backend.
async fn hypopg_reset(client: &Client) -> Result<(), tokio_postgres::Error> {
    client
        .batch_execute(&format!("{MARK} SELECT hypopg_reset()"))
        .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identifiers_are_always_quoted() {
        assert_eq!(quote_ident("a"), "\"a\"");
        assert_eq!(quote_ident("we\"ird"), "\"we\"\"ird\"");
        let t = IndexTarget {
            schema: "Sales".into(),
            table: "order\"s".into(),
            columns: vec!["a b".into(), "c".into()],
        };
        assert_eq!(
            t.definition(),
            r#"CREATE INDEX ON "Sales"."order""s" USING btree ("a b", "c")"#
        );
    }

    #[test]
    fn advice_ids_are_stable_and_distinct() {
        let t = |s: &str, tb: &str, c: &[&str]| IndexTarget {
            schema: s.into(),
            table: tb.into(),
            columns: c.iter().map(|x| (*x).to_owned()).collect(),
        };
        // A fixed value: the id must not change between versions (stored advice and
        // acknowledgements refer to it).
        assert_eq!(t("public", "t", &["a"]).id(), "a3b5c61d183e175d");
        assert_eq!(t("public", "t", &["a"]).id().len(), 16);
        assert_ne!(
            t("public", "t", &["a", "b"]).id(),
            t("public", "t", &["b", "a"]).id()
        );
        assert_ne!(
            t("public", "ta", &["b"]).id(),
            t("public", "t", &["ab"]).id()
        );
    }

    #[test]
    fn only_statements_with_plans_are_planned() {
        assert!(plannable("SELECT * FROM t WHERE a = $1"));
        assert!(plannable(
            "  /* app */ -- x\n with q as (select 1) select * from q"
        ));
        assert!(plannable("(SELECT 1) UNION (SELECT 2)"));
        assert!(plannable("update t set a = $1 where b = $2"));
        assert!(!plannable("CREATE INDEX ON t (a)"));
        assert!(!plannable("VACUUM t"));
        assert!(!plannable("EXPLAIN SELECT 1"));
        assert!(!plannable("PREPARE p AS SELECT 1"));
        assert!(!plannable("/* unterminated SELECT"));
    }

    #[test]
    fn texts_are_clipped_on_characters() {
        let long = "é".repeat(REPORT_TEXT_CHARS + 5);
        let c = clip(&long);
        assert_eq!(c.chars().count(), REPORT_TEXT_CHARS + 1);
        assert_eq!(clip("short"), "short");
    }
}
