//! The PgBouncer collector: pool usage from the admin console (`SHOW POOLS`, `SHOW DATABASES`,
//! `SHOW STATS`), with pgbouncer_exporter's names where it has one, plus the ready-to-compare
//! `pgbouncer_pool_usage_ratio` and `pgbouncer_clients_waiting`.
//!
//! Owns the `pgbouncer_*` metric names. Uses `sample`, `targets` (error classification) and the
//! `Collector` trait. The console speaks only the simple query protocol, so it gets one plain
//! tokio-postgres connection, reopened when it breaks, rather than a pool.

use std::collections::HashMap;
use std::time::Duration;

use tokio_postgres::{Client, SimpleQueryMessage, SimpleQueryRow};

use super::{CollectError, Collector};
use crate::sample::Families;
use crate::settings::Target;
use crate::settings::secret::SecretUrl;
use crate::targets::{FailureReason, TargetFailure, pg_failure};

/// Reads one PgBouncer's admin console.
pub struct PgBouncerCollector {
    name: String,
    target: String,
    url: SecretUrl,
    /// The connection settings, or why the URL gives none.
    config: Result<crate::pgtls::PgConnect, String>,
    client: Option<Client>,
    deadline: Duration,
    last_failure: Option<FailureReason>,
}

impl PgBouncerCollector {
    /// A collector for `target`; `timeout` is the scheduler's timeout for one run.
    pub fn new(target: &Target, timeout: Duration) -> Self {
        let deadline = timeout.mul_f64(0.9);
        let config = crate::pgtls::connect_config(&target.url).map(|mut c| {
            // As for PostgreSQL: a console that vanishes is noticed in half a minute, and
            // the connection's task does not linger for the kernel's two hours.
            c.config
                .connect_timeout(deadline)
                .keepalives_idle(Duration::from_secs(30))
                .tcp_user_timeout(Duration::from_secs(30));
            c
        });
        PgBouncerCollector {
            name: format!("pgbouncer/{}", target.name),
            target: target.name.clone(),
            url: target.url.clone(),
            config,
            client: None,
            deadline,
            last_failure: None,
        }
    }

    async fn connect(&mut self) -> Result<&Client, TargetFailure> {
        if self.client.as_ref().is_some_and(Client::is_closed) {
            self.client = None;
        }
        if self.client.is_none() {
            let config = match &self.config {
                Ok(c) => c,
                Err(e) => {
                    return Err(TargetFailure {
                        reason: FailureReason::Error,
                        message: e.clone(),
                    });
                }
            };
            let (client, connection) = config
                .config
                .connect(config.tls.clone())
                .await
                .map_err(|err| pg_failure(&self.url, &err))?;
            tokio::spawn(connection);
            self.client = Some(client);
        }
        self.client.as_ref().ok_or_else(|| TargetFailure {
            reason: FailureReason::Error,
            message: "no connection".into(),
        })
    }

    async fn measure(&mut self, out: &mut Families) -> Result<(), TargetFailure> {
        let url = self.url.clone();
        let target = self.target.clone();
        let client = self.connect().await?;
        let url = &url;
        let show = |what: &'static str| async move {
            client
                .simple_query(what)
                .await
                .map(rows)
                .map_err(|err| pg_failure(url, &err))
        };
        let databases = show("SHOW DATABASES").await?;
        let pools = show("SHOW POOLS").await?;
        let stats = show("SHOW STATS").await?;

        let mut pool_size: HashMap<String, f64> = HashMap::new();
        for row in &databases {
            let name = text(row, "name");
            let size = number(row, "pool_size");
            if name == "pgbouncer" {
                continue;
            }
            pool_size.insert(name.to_owned(), size);
            out.gauge(
                "pgbouncer_databases_pool_size",
                "Maximum server connections of the database's pools.",
                &[("target", &target), ("database", name)],
                size,
            );
        }
        for row in &pools {
            let database = text(row, "database");
            // The console's own pseudo-pool says nothing about the application.
            if database == "pgbouncer" {
                continue;
            }
            let labels = [
                ("target", target.as_str()),
                ("database", database),
                ("user", text(row, "user")),
            ];
            let sv_active = number(row, "sv_active");
            let per_pool: [(&str, &str, f64); 5] = [
                (
                    "pgbouncer_pools_client_active_connections",
                    "Client connections paired with a server connection.",
                    number(row, "cl_active"),
                ),
                (
                    "pgbouncer_clients_waiting",
                    "Client connections waiting for a server connection.",
                    number(row, "cl_waiting"),
                ),
                (
                    "pgbouncer_pools_server_active_connections",
                    "Server connections paired with a client.",
                    sv_active,
                ),
                (
                    "pgbouncer_pools_server_idle_connections",
                    "Server connections idle and ready for a client.",
                    number(row, "sv_idle"),
                ),
                (
                    "pgbouncer_pools_server_used_connections",
                    "Server connections idle for longer than server_check_delay.",
                    number(row, "sv_used"),
                ),
            ];
            for (metric, help, value) in per_pool {
                out.gauge(metric, help, &labels, value);
            }
            let maxwait = number(row, "maxwait") + number(row, "maxwait_us") / 1e6;
            out.gauge(
                "pgbouncer_pools_client_maxwait_seconds",
                "How long the oldest waiting client has waited.",
                &labels,
                maxwait,
            );
            if let Some(size) = pool_size.get(database).filter(|s| **s > 0.0) {
                out.gauge(
                    "pgbouncer_pool_usage_ratio",
                    "Server connections in use over the pool size.",
                    &labels,
                    sv_active / size,
                );
            }
        }
        for row in &stats {
            let database = text(row, "database");
            if database == "pgbouncer" {
                continue;
            }
            let labels = [("target", target.as_str()), ("database", database)];
            out.counter(
                "pgbouncer_stats_sql_transactions_pooled_total",
                "Transactions pooled.",
                &labels,
                number(row, "total_xact_count"),
            );
            out.counter(
                "pgbouncer_stats_queries_pooled_total",
                "Queries pooled.",
                &labels,
                number(row, "total_query_count"),
            );
            out.counter(
                "pgbouncer_stats_queries_duration_seconds_total",
                "Time spent by servers on queries.",
                &labels,
                number(row, "total_query_time") / 1e6,
            );
            out.counter(
                "pgbouncer_stats_client_wait_seconds_total",
                "Time spent by clients waiting for a server.",
                &labels,
                number(row, "total_wait_time") / 1e6,
            );
        }
        Ok(())
    }
}

fn rows(messages: Vec<SimpleQueryMessage>) -> Vec<SimpleQueryRow> {
    messages
        .into_iter()
        .filter_map(|m| match m {
            SimpleQueryMessage::Row(r) => Some(r),
            _ => None,
        })
        .collect()
}

fn text<'a>(row: &'a SimpleQueryRow, column: &str) -> &'a str {
    row.try_get(column).ok().flatten().unwrap_or("")
}

/// A numeric column; a column this PgBouncer version lacks reads as 0.
fn number(row: &SimpleQueryRow, column: &str) -> f64 {
    text(row, column).parse().unwrap_or(0.0)
}

const UP_HELP: &str =
    "Whether the last collection could read the PgBouncer admin console (1) or not (0).";

impl Collector for PgBouncerCollector {
    fn name(&self) -> &str {
        &self.name
    }

    async fn collect(&mut self) -> Result<Families, CollectError> {
        let target = self.target.clone();
        let mut measured = Families::new();
        let failure = match tokio::time::timeout(self.deadline, self.measure(&mut measured)).await {
            Ok(Ok(())) => None,
            Ok(Err(f)) => Some(f),
            Err(_) => Some(TargetFailure {
                reason: FailureReason::Timeout,
                message: format!("no answer within {:.1}s", self.deadline.as_secs_f64()),
            }),
        };
        let mut out = Families::new();
        match &failure {
            None => {
                if let Some(was) = self.last_failure.take() {
                    tracing::info!(target_name = %target, after = was.as_str(), "PgBouncer reachable again");
                }
                out = measured;
                out.gauge("pgbouncer_up", UP_HELP, &[("target", &target)], 1.0);
            }
            Some(f) => {
                // A connection that failed or timed out is not trusted again.
                self.client = None;
                if self.last_failure != Some(f.reason) {
                    tracing::warn!(target_name = %target, url = %self.url, reason = f.reason.as_str(), error = %f.message, "PgBouncer unreachable");
                }
                self.last_failure = Some(f.reason);
                out.gauge("pgbouncer_up", UP_HELP, &[("target", &target)], 0.0);
            }
        }
        super::target_error(
            &mut out,
            "pgbouncer",
            &target,
            failure.as_ref().map(|f| f.reason),
        );
        Ok(out)
    }
}
