//! Changing the database, where the configuration allows it: building one advised index with
//! `CREATE INDEX CONCURRENTLY`, and `ANALYZE` of the tables whose statistics are stale.
//!
//! Index creation follows dexter's discipline and then some: bounded lock and statement
//! timeouts, one builder at a time across every autotuner on the server (an advisory lock), a
//! re-check of the catalog just before building, no locking build on a partitioned parent
//! unless that table is named, and no invalid index left behind by a failed build. How often
//! it may run is the caller's gate.

use std::time::{Duration, Instant};

use serde::Serialize;
use tokio_postgres::Client;

use super::{AdvisorError, IndexTarget, MARK, catalog, pg, quote_ident};
use crate::targets::error_chain;

/// The advisory lock key every index build of ours takes (`'autotune'` as eight bytes), so that
/// two autotuners, or two targets naming the same server, never build at once.
pub const ADVISORY_LOCK_KEY: i64 = 0x6175_746f_7475_6e65;

/// Longest identifier PostgreSQL keeps (NAMEDATALEN - 1 bytes).
const MAX_IDENTIFIER_BYTES: usize = 63;

/// How to build.
#[derive(Debug, Clone)]
pub struct CreateOptions {
    /// `lock_timeout` of the build: how long it may wait for a lock (default 5s, dexter's).
    pub lock_timeout: Duration,
    /// `statement_timeout` of the build (default 1h): a build cut short is dropped.
    pub statement_timeout: Duration,
    /// Partitioned tables (`schema.table` or `table`) on which a build is allowed. A
    /// partitioned parent cannot be indexed concurrently, so its build locks writes to every
    /// partition for its duration: only where the operator named the table.
    pub partitioned_allowed: Vec<String>,
}

impl Default for CreateOptions {
    fn default() -> Self {
        CreateOptions {
            lock_timeout: Duration::from_secs(5),
            statement_timeout: Duration::from_secs(3600),
            partitioned_allowed: Vec::new(),
        }
    }
}

/// What `create_index` did.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "result", rename_all = "snake_case")]
pub enum Creation {
    /// The index was built and is valid.
    Created {
        /// Its name.
        index: String,
        /// The statement run.
        statement: String,
        /// Whether it was built concurrently (false only on a named partitioned table).
        concurrently: bool,
        /// How long the build took.
        seconds: f64,
        /// Its size.
        size_bytes: i64,
        /// An invalid index of the same name, left by an earlier failed build, was dropped
        /// first.
        dropped_invalid: bool,
    },
    /// Nothing was built.
    Skipped {
        /// Why.
        reason: String,
    },
}

/// The name an advised index gets: `<table>_<columns>_autotuner_idx` (marking it as ours for
/// operators), shortened with a hash to PostgreSQL's 63 bytes when longer.
pub fn index_name(target: &IndexTarget) -> String {
    let full = format!(
        "{}_{}_autotuner_idx",
        target.table,
        target.columns.join("_")
    );
    if full.len() <= MAX_IDENTIFIER_BYTES {
        return full;
    }
    let suffix = format!("_{}_autotuner_idx", &target.id()[..8]);
    let mut cut = MAX_IDENTIFIER_BYTES - suffix.len();
    while !full.is_char_boundary(cut) {
        cut -= 1;
    }
    format!("{}{suffix}", &full[..cut])
}

/// Builds the index `target`, if it is still missing, under the advisory lock. Returns what
/// it did; an error means the build was tried and failed (the invalid index it left has been
/// dropped, or the message says why not) or the connection failed.
///
/// Needs a role that owns the table (or is a member of its owner). The session's
/// `statement_timeout` and `lock_timeout` are set for the build and reset afterwards (to the
/// connection's own defaults).
pub async fn create_index(
    client: &mut Client,
    target: &IndexTarget,
    opts: &CreateOptions,
) -> Result<Creation, AdvisorError> {
    let locked: bool = client
        .query_one(
            &format!("{MARK} SELECT pg_try_advisory_lock($1)"),
            &[&ADVISORY_LOCK_KEY],
        )
        .await
        .map_err(pg("taking the index-build advisory lock"))?
        .get(0);
    if !locked {
        return Ok(Creation::Skipped {
            reason: "another index build of ours holds the advisory lock".into(),
        });
    }
    let outcome = build(client, target, opts).await;
    // Both always, whatever happened: the lock is the session's, and so are the timeouts.
    let cleanup = client
        .batch_execute(&format!(
            "{MARK} SELECT pg_advisory_unlock({ADVISORY_LOCK_KEY}); {MARK} RESET statement_timeout; {MARK} RESET lock_timeout"
        ))
        .await
        .map_err(pg("releasing the advisory lock and resetting the timeouts"));
    let creation = outcome?;
    cleanup?;
    Ok(creation)
}

async fn build(
    client: &mut Client,
    target: &IndexTarget,
    opts: &CreateOptions,
) -> Result<Creation, AdvisorError> {
    let skipped = |reason: String| Ok(Creation::Skipped { reason });
    if target.columns.is_empty() {
        return skipped("no columns given".into());
    }
    let table = target.table_name();
    // CONCURRENTLY refuses to run in a transaction block, so these are the session's.
    client
        .batch_execute(&format!(
            "{MARK} SET statement_timeout = {}; {MARK} SET lock_timeout = {}",
            opts.statement_timeout.as_millis().max(1),
            opts.lock_timeout.as_millis().max(1)
        ))
        .await
        .map_err(pg("setting the build's timeouts"))?;
    let Some(info) = catalog::table_info(client, &target.schema, &target.table)
        .await
        .map_err(pg(format!("reading the catalog of {table}")))?
    else {
        return skipped(format!("table {table} does not exist"));
    };
    let concurrently = match info.relkind.as_str() {
        "r" | "m" => true,
        "p" => {
            let named = opts
                .partitioned_allowed
                .iter()
                .any(|n| *n == table || *n == target.table);
            if !named {
                return skipped(format!(
                    "{table} is a partitioned table: it cannot be indexed concurrently, and a locking build needs the table named in partitioned_allowed"
                ));
            }
            false
        }
        other => return skipped(format!("{table} has relkind {other:?}, not a table")),
    };
    if let Some(missing) = target
        .columns
        .iter()
        .find(|c| !info.columns.contains_key(*c))
    {
        return skipped(format!("{table} has no column {missing:?}"));
    }
    if let Some(existing) = info.covering_index(&target.columns) {
        return skipped(format!(
            "index {:?} already serves these columns",
            existing.name
        ));
    }
    let name = index_name(target);
    let qualified = format!("{}.{}", quote_ident(&target.schema), quote_ident(&name));
    let mut dropped_invalid = false;
    if let Some(same) = info.indexes.iter().find(|i| i.name == name) {
        if same.valid {
            return skipped(format!(
                "an index named {name:?} already exists on other columns"
            ));
        }
        // Left by a failed build of ours (the name is ours): drop it and build again.
        drop_index(client, &qualified, concurrently)
            .await
            .map_err(pg(format!(
                "dropping the invalid index {name} left by an earlier build"
            )))?;
        dropped_invalid = true;
    } else if let Some(row) = client
        .query_opt(
            &format!(
                "{MARK} SELECT c.relname::text FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
                 WHERE n.nspname = $1 AND c.relname = $2"
            ),
            &[&target.schema, &name],
        )
        .await
        .map_err(pg("checking the index name"))?
    {
        let taken: String = row.get(0);
        return skipped(format!(
            "the name {taken:?} is taken by another relation in schema {:?}",
            target.schema
        ));
    }
    let statement = format!(
        "CREATE INDEX {}{} ON {} USING btree {}",
        if concurrently { "CONCURRENTLY " } else { "" },
        quote_ident(&name),
        target.quoted_table(),
        target.quoted_columns()
    );
    let started = Instant::now();
    // One command per simple query: CONCURRENTLY runs in its implicit transaction.
    if let Err(err) = client.batch_execute(&format!("{MARK} {statement}")).await {
        // A failed concurrent build leaves an invalid index that still costs every write:
        // drop it if it is there.
        let message = error_chain(&err);
        let left = client
            .query_opt(
                &format!(
                    "{MARK} SELECT i.indisvalid FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid \
                     JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = $1 AND c.relname = $2"
                ),
                &[&target.schema, &name],
            )
            .await;
        let message = match left {
            Ok(Some(row)) if !row.get::<_, bool>(0) => {
                match drop_index(client, &qualified, concurrently).await {
                    Ok(()) => format!("{message}; the invalid index it left was dropped"),
                    Err(e) => format!(
                        "{message}; dropping the invalid index it left failed too: {}",
                        error_chain(&e)
                    ),
                }
            }
            Ok(_) => message,
            Err(e) => format!(
                "{message}; whether it left an invalid index is unknown: {}",
                error_chain(&e)
            ),
        };
        return Err(AdvisorError::Build {
            table,
            index: name,
            message,
            source: err,
        });
    }
    let seconds = started.elapsed().as_secs_f64();
    let row = client
        .query_one(
            &format!(
                "{MARK} SELECT i.indisvalid, pg_relation_size(i.indexrelid) FROM pg_index i \
                 JOIN pg_class c ON c.oid = i.indexrelid JOIN pg_namespace n ON n.oid = c.relnamespace \
                 WHERE n.nspname = $1 AND c.relname = $2"
            ),
            &[&target.schema, &name],
        )
        .await
        .map_err(pg(format!("checking the new index {name}")))?;
    if !row.get::<_, bool>(0) {
        // Not expected after a build that reported success; never leave it behind.
        drop_index(client, &qualified, concurrently)
            .await
            .map_err(pg(format!("dropping the invalid index {name}")))?;
        return skipped(format!(
            "the build of {name} finished but the index was invalid; it was dropped"
        ));
    }
    Ok(Creation::Created {
        index: name,
        statement,
        concurrently,
        seconds,
        size_bytes: row.get(1),
        dropped_invalid,
    })
}

async fn drop_index(
    client: &Client,
    qualified: &str,
    concurrently: bool,
) -> Result<(), tokio_postgres::Error> {
    client
        .batch_execute(&format!(
            "{MARK} DROP INDEX {}IF EXISTS {qualified}",
            if concurrently { "CONCURRENTLY " } else { "" }
        ))
        .await
}

/// A table `analyze_stale` analyzed.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct AnalyzedTable {
    /// The schema.
    pub schema: String,
    /// The table.
    pub table: String,
    /// Rows inserted, updated or deleted since its statistics were last gathered.
    pub modified_since_analyze: i64,
    /// `reltuples` before (-1: never analyzed or vacuumed).
    pub rows_before: f64,
    /// `reltuples` after.
    pub rows_after: f64,
    /// Whether it had never been analyzed.
    pub never_analyzed: bool,
    /// How long the ANALYZE took.
    pub seconds: f64,
}

/// What `analyze_stale` did.
#[derive(Debug, Clone, PartialEq, Default, Serialize)]
pub struct AnalyzeReport {
    /// The tables analyzed, stalest first.
    pub analyzed: Vec<AnalyzedTable>,
    /// Stale tables our role may not analyze (`schema.table`): the role needs to own them
    /// (or the database).
    pub not_permitted: Vec<String>,
}

/// `ANALYZE` of at most `max_tables` tables of the connected database whose rows changed since
/// their last analyze by more than `stale_ratio` of their row count, or that were never
/// analyzed. Each runs in its own transaction under `timeout` (statement and lock).
pub async fn analyze_stale(
    client: &mut Client,
    stale_ratio: f64,
    max_tables: usize,
    timeout: Duration,
) -> Result<AnalyzeReport, AdvisorError> {
    let version: i32 = client
        .query_one(
            &format!("{MARK} SELECT current_setting('server_version_num')::int4"),
            &[],
        )
        .await
        .map_err(pg("reading the server version"))?
        .get(0);
    // Who may ANALYZE: the table's owner or the database's (superusers are members of every
    // role), and from 17 whoever holds MAINTAIN on it.
    let maintain = if version >= 170_000 {
        " OR has_table_privilege(c.oid, 'MAINTAIN')"
    } else {
        ""
    };
    let rows = client
        .query(
            &format!(
                "{MARK} SELECT s.schemaname::text, s.relname::text, s.n_mod_since_analyze, c.reltuples::float8, \
                   (s.last_analyze IS NULL AND s.last_autoanalyze IS NULL), \
                   (pg_has_role(c.relowner, 'USAGE') \
                    OR pg_has_role((SELECT datdba FROM pg_database WHERE datname = current_database()), 'USAGE'){maintain}) \
                 FROM pg_stat_user_tables s JOIN pg_class c ON c.oid = s.relid \
                 WHERE c.relkind IN ('r', 'm', 'p') AND ( \
                   (s.last_analyze IS NULL AND s.last_autoanalyze IS NULL) \
                   OR s.n_mod_since_analyze > $1::float8 * greatest(c.reltuples, 0)::float8) \
                 ORDER BY (s.last_analyze IS NULL AND s.last_autoanalyze IS NULL) DESC, \
                   s.n_mod_since_analyze::float8 / greatest(c.reltuples, 1) DESC, 1, 2"
            ),
            &[&stale_ratio],
        )
        .await
        .map_err(pg("finding the tables with stale statistics"))?;
    let mut report = AnalyzeReport::default();
    for r in rows {
        let (schema, table): (String, String) = (r.get(0), r.get(1));
        if !r.get::<_, bool>(5) {
            report.not_permitted.push(format!("{schema}.{table}"));
            continue;
        }
        if report.analyzed.len() >= max_tables {
            continue;
        }
        let quoted = format!("{}.{}", quote_ident(&schema), quote_ident(&table));
        let started = Instant::now();
        let tx = client
            .transaction()
            .await
            .map_err(pg("starting a transaction for ANALYZE"))?;
        let ms = timeout.as_millis().max(1);
        tx.batch_execute(&format!(
            "{MARK} SET LOCAL statement_timeout = {ms}; {MARK} SET LOCAL lock_timeout = {ms}"
        ))
        .await
        .map_err(pg("setting the ANALYZE timeouts"))?;
        tx.batch_execute(&format!("{MARK} ANALYZE {quoted}"))
            .await
            .map_err(pg(format!("ANALYZE {schema}.{table}")))?;
        let after: f64 = tx
            .query_one(
                &format!(
                    "{MARK} SELECT c.reltuples::float8 FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
                     WHERE n.nspname = $1 AND c.relname = $2"
                ),
                &[&schema, &table],
            )
            .await
            .map_err(pg(format!("reading the row estimate of {schema}.{table}")))?
            .get(0);
        tx.commit()
            .await
            .map_err(pg(format!("committing ANALYZE {schema}.{table}")))?;
        report.analyzed.push(AnalyzedTable {
            schema,
            table,
            modified_since_analyze: r.get(2),
            rows_before: r.get(3),
            rows_after: after,
            never_analyzed: r.get(4),
            seconds: started.elapsed().as_secs_f64(),
        });
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn index_names_fit_postgres_identifiers() {
        let short = IndexTarget {
            schema: "public".into(),
            table: "orders".into(),
            columns: vec!["customer_id".into()],
        };
        assert_eq!(index_name(&short), "orders_customer_id_autotuner_idx");
        let long = IndexTarget {
            schema: "public".into(),
            table: "ä".repeat(40),
            columns: vec!["a_rather_long_column_name".into(), "another_one".into()],
        };
        let n = index_name(&long);
        assert!(n.len() <= MAX_IDENTIFIER_BYTES, "{n} is {} bytes", n.len());
        assert!(n.ends_with("_autotuner_idx"));
        // Two long targets that differ only at the end still get different names.
        let mut other = long.clone();
        other.columns[1] = "another_two".into();
        assert_ne!(index_name(&other), n);
    }
}
