//! The PostgreSQL collector: `pg_up`, the probe round trip, and one module per statistics view
//! (`settings`, `activity`, `database`, `statements`), each publishing the names operators know
//! from postgres_exporter plus the ready-to-compare gauges the rules use.
//!
//! Owns the `pg_*` metric names (README "Metrics" is the reference). Uses `sample`,
//! `targets::PgHandle`, `settings::PostgresConfig` and the `Collector` trait.
//!
//! One collector runs per target. A server that is down, refuses us, or hangs is a measurement,
//! not a collector failure: the run publishes `pg_up 0` (or the views it could read) with the
//! reason in `autotuner_target_error`. Every query carries a server-side `statement_timeout`, and
//! the run has a client-side deadline after which the query in flight is cancelled on the server
//! and its connection discarded, so nothing of ours piles up on a struggling database.

mod activity;
mod database;
mod settings;
pub mod statements;

use std::time::{Duration, Instant};

use deadpool_postgres::Object;

use super::{CollectError, Collector};
use crate::sample::Families;
use crate::settings::PostgresConfig;
use crate::targets::{FailureReason, PgHandle, TargetFailure};

/// Every query we send starts with this comment, so our own statements can be recognised in
/// `pg_stat_statements` and left out of the latency figures.
pub const MARK: &str = "/* autotuner */";

/// Oldest server we support: `pg_stat_statements` names its columns as we read them from 13 on.
const MIN_SERVER_VERSION: i32 = 130_000;

/// Measures one PostgreSQL server through one of its databases.
pub struct PostgresCollector {
    name: String,
    handle: PgHandle,
    config: PostgresConfig,
    deadline: Duration,
    databases: database::State,
    statements: statements::State,
    last_failure: Option<FailureReason>,
    /// Whether we said that pg_stat_statements is missing (said once, not every run).
    told_no_statements: bool,
}

/// What one run learned before anything failed.
struct Run<'a> {
    client: &'a Object,
    labels: [(&'a str, &'a str); 1],
    out: &'a mut Families,
}

impl Run<'_> {
    /// Runs a query of ours (prepared once per connection).
    async fn query(
        &self,
        sql: &str,
        params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
    ) -> Result<Vec<tokio_postgres::Row>, tokio_postgres::Error> {
        let statement = self.client.prepare_cached(sql).await?;
        self.client.query(&statement, params).await
    }
}

/// The target label followed by `extra`.
fn labels_with<'b>(
    base: [(&'b str, &'b str); 1],
    extra: &[(&'b str, &'b str)],
) -> Vec<(&'b str, &'b str)> {
    let mut l = base.to_vec();
    l.extend_from_slice(extra);
    l
}

/// The server-side limit on each of our statements: a quarter of the run's deadline, so one
/// stuck view still leaves time for the others and for publishing.
pub fn statement_timeout(timeout: Duration) -> Duration {
    run_deadline(timeout)
        .div_f64(4.0)
        .max(Duration::from_millis(50))
}

/// The deadline of one run inside the scheduler's `timeout` (nine tenths of it).
pub fn run_deadline(timeout: Duration) -> Duration {
    timeout.mul_f64(0.9)
}

impl PostgresCollector {
    /// A collector for `handle` with the collector settings in `config`.
    pub fn new(handle: PgHandle, config: PostgresConfig) -> Self {
        PostgresCollector {
            name: format!("postgres/{}", handle.name),
            deadline: run_deadline(config.timing.timeout),
            statements: statements::State::new(config.window),
            handle,
            config,
            databases: database::State::default(),
            last_failure: None,
            told_no_statements: false,
        }
    }

    /// Reads every view; the first failure is returned after the others were tried.
    async fn measure(&mut self, client: &Object, out: &mut Families) -> Option<TargetFailure> {
        let target = self.handle.name.clone();
        let mut run = Run {
            client,
            labels: [("target", target.as_str())],
            out,
        };
        let started = Instant::now();
        let version: i32 = match run
            .query(
                &format!("{MARK} SELECT current_setting('server_version_num')::int4"),
                &[],
            )
            .await
        {
            Ok(rows) => rows.first().map(|r| r.get(0)).unwrap_or(0),
            Err(err) => return Some(self.handle.failure(&err)),
        };
        let labels = run.labels;
        run.out.gauge(
            "pg_probe_latency_seconds",
            "Round trip of a trivial query.",
            &labels,
            started.elapsed().as_secs_f64(),
        );
        run.out.gauge("pg_up", UP_HELP, &labels, 1.0);
        run.out.gauge(
            "pg_server_version_num",
            "The server's version as a number (150004 is 15.4).",
            &labels,
            f64::from(version),
        );
        let mut first: Option<TargetFailure> = None;
        let mut note = |r: Result<(), tokio_postgres::Error>, handle: &PgHandle| {
            if let Err(err) = r {
                let f = handle.failure(&err);
                tracing::debug!(target_name = %handle.name, error = %f.message, "PostgreSQL view failed");
                if first.is_none() {
                    first = Some(f);
                }
            }
        };
        let usable = match settings::collect(&mut run).await {
            Ok(usable) => usable,
            Err(err) => {
                note(Err(err), &self.handle);
                None
            }
        };
        let r = activity::collect(&mut run, usable, self.config.slow_query_threshold).await;
        note(r, &self.handle);
        let r = database::collect(&mut run, &mut self.databases, self.config.window).await;
        note(r, &self.handle);
        if version >= MIN_SERVER_VERSION {
            match statements::collect(&mut run, &mut self.statements, &self.config).await {
                Ok(true) => self.told_no_statements = false,
                Ok(false) => {
                    if !self.told_no_statements {
                        tracing::warn!(target_name = %target, "pg_stat_statements is not installed in this database; query latency and slow queries are not measured (CREATE EXTENSION pg_stat_statements, with it in shared_preload_libraries)");
                        self.told_no_statements = true;
                    }
                }
                Err(err) => note(Err(err), &self.handle),
            }
        } else if !self.told_no_statements {
            tracing::warn!(target_name = %target, version, "server older than PostgreSQL 13: statement statistics are not read");
            self.told_no_statements = true;
        }
        first
    }
}

const UP_HELP: &str =
    "Whether the last collection could connect to the PostgreSQL server (1) or not (0).";

impl Collector for PostgresCollector {
    fn name(&self) -> &str {
        &self.name
    }

    async fn collect(&mut self) -> Result<Families, CollectError> {
        let target = self.handle.name.clone();
        let labels = [("target", target.as_str())];
        let mut out = Families::new();
        let started = Instant::now();
        let failure = match tokio::time::timeout(self.deadline, self.handle.client()).await {
            Err(_) => Some(TargetFailure {
                reason: FailureReason::Timeout,
                message: format!("no connection within {:.1}s", self.deadline.as_secs_f64()),
            }),
            Ok(Err(f)) => Some(f),
            Ok(Ok(client)) => {
                let cancel = client.cancel_token();
                let tls = self.handle.tls();
                let left = self.deadline.saturating_sub(started.elapsed());
                let mut measured = Families::new();
                let result = tokio::time::timeout(left, self.measure(&client, &mut measured)).await;
                match result {
                    Ok(failure) => {
                        out = measured;
                        failure
                    }
                    Err(_) => {
                        // Stop the query on the server too, and do not reuse a connection
                        // whose state we no longer know.
                        tokio::spawn(async move {
                            let _ = tokio::time::timeout(
                                Duration::from_secs(5),
                                cancel.cancel_query(tls),
                            )
                            .await;
                        });
                        drop(Object::take(client));
                        // What was read before the deadline is still true.
                        out = measured;
                        Some(TargetFailure {
                            reason: FailureReason::Timeout,
                            message: format!(
                                "collection cut off after {:.1}s; the query in flight was cancelled",
                                self.deadline.as_secs_f64()
                            ),
                        })
                    }
                }
            }
        };
        let connected = out.contains("pg_up");
        if !connected {
            out.gauge("pg_up", UP_HELP, &labels, 0.0);
        }
        match &failure {
            None => {
                if let Some(was) = self.last_failure.take() {
                    tracing::info!(target_name = %target, url = %self.handle.url(), after = was.as_str(), "PostgreSQL reachable again");
                }
            }
            Some(f) => {
                if self.last_failure != Some(f.reason) {
                    let what = if connected {
                        "PostgreSQL statistics partly unreadable"
                    } else {
                        "PostgreSQL unreachable"
                    };
                    tracing::warn!(target_name = %target, url = %self.handle.url(), reason = f.reason.as_str(), error = %f.message, "{what}");
                }
                self.last_failure = Some(f.reason);
            }
        }
        super::target_error(
            &mut out,
            "postgres",
            &target,
            failure.as_ref().map(|f| f.reason),
        );
        Ok(out)
    }
}
