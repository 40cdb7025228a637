//! `pg_stat_activity`: connections by database and state, how full the server is, and the
//! queries running right now. Our own sessions (`application_name = 'autotuner'`) are left out:
//! an exporter that counts itself distorts exactly the figures it exists to report.

use std::time::Duration;

use super::{MARK, Run, labels_with};

/// The states postgres_exporter reports for every database, even at zero, so a series does not
/// vanish when its count drops to nothing.
const STATES: &str = "('active'), ('idle'), ('idle in transaction'), ('idle in transaction (aborted)'), ('fastpath function call'), ('disabled')";

pub(super) async fn collect(
    run: &mut Run<'_>,
    usable: Option<f64>,
    slow: Duration,
) -> Result<(), tokio_postgres::Error> {
    let ours = crate::targets::PG_APPLICATION_NAME;
    let others = format!(
        "backend_type = 'client backend' AND pid <> pg_backend_pid() AND application_name IS DISTINCT FROM '{ours}'"
    );
    let rows = run
        .query(
            &format!(
                "{MARK} SELECT d.datname::text, s.state, COALESCE(a.n, 0)::float8 \
                 FROM pg_database d CROSS JOIN (VALUES {STATES}) AS s(state) \
                 LEFT JOIN (SELECT datname, state, count(*) AS n FROM pg_stat_activity WHERE {others} GROUP BY datname, state) a \
                 ON a.datname = d.datname AND a.state = s.state \
                 WHERE d.datallowconn ORDER BY 1, 2"
            ),
            &[],
        )
        .await?;
    for row in &rows {
        let labels = labels_with(
            run.labels,
            &[("datname", row.get(0)), ("state", row.get(1))],
        );
        run.out.gauge(
            "pg_stat_activity_count",
            "Client connections in this state (ours excluded).",
            &labels,
            row.get(2),
        );
    }
    let rows = run
        .query(
            &format!(
                "{MARK} SELECT count(*)::float8, \
                 COALESCE(max(EXTRACT(EPOCH FROM clock_timestamp() - query_start)) FILTER (WHERE state = 'active'), 0)::float8, \
                 count(*) FILTER (WHERE state = 'active' AND clock_timestamp() - query_start > make_interval(secs => $1))::float8 \
                 FROM pg_stat_activity WHERE {others}"
            ),
            &[&slow.as_secs_f64()],
        )
        .await?;
    let labels = run.labels;
    if let Some(row) = rows.first() {
        let in_use: f64 = row.get(0);
        run.out.gauge(
            "pg_connections_in_use",
            "Client connections open now (ours excluded).",
            &labels,
            in_use,
        );
        if let Some(usable) = usable {
            run.out.gauge(
                "pg_connections_usage_ratio",
                "Client connections in use over the usable maximum (max_connections less the reserved slots).",
                &labels,
                in_use / usable,
            );
        }
        run.out.gauge(
            "pg_active_query_max_duration_seconds",
            "How long the longest-running active query has been running; 0 when none is.",
            &labels,
            row.get(1),
        );
        run.out.gauge(
            "pg_active_slow_queries",
            "Active queries running longer than the slow query threshold right now.",
            &labels,
            row.get(2),
        );
    }
    Ok(())
}
