//! The connection limits (`current_setting`), as postgres_exporter names them.

use super::{MARK, Run};

/// Publishes the limits and returns the usable maximum of client connections (what is left
/// after the slots reserved for superusers and, from PostgreSQL 16, for `pg_use_reserved_connections`).
pub(super) async fn collect(run: &mut Run<'_>) -> Result<Option<f64>, tokio_postgres::Error> {
    // current_setting reads one setting; the pg_settings view builds a row for every one of
    // them first (about 1 ms of server CPU per collection instead of a few microseconds).
    // `reserved_connections` exists from PostgreSQL 16; missing_ok makes it NULL before.
    let rows = run
        .query(
            &format!(
                "{MARK} SELECT current_setting('max_connections')::float8, \
                 current_setting('superuser_reserved_connections')::float8, \
                 current_setting('reserved_connections', true)::float8"
            ),
            &[],
        )
        .await?;
    let labels = run.labels;
    let Some(row) = rows.first() else {
        return Ok(None);
    };
    let max: f64 = row.get(0);
    let superuser: f64 = row.get(1);
    let reserved: Option<f64> = row.get(2);
    run.out.gauge(
        "pg_settings_max_connections",
        "The max_connections setting.",
        &labels,
        max,
    );
    run.out.gauge(
        "pg_settings_superuser_reserved_connections",
        "The superuser_reserved_connections setting.",
        &labels,
        superuser,
    );
    if let Some(r) = reserved {
        run.out.gauge(
            "pg_settings_reserved_connections",
            "The reserved_connections setting (PostgreSQL 16 and newer).",
            &labels,
            r,
        );
    }
    let usable = max - superuser - reserved.unwrap_or(0.0);
    Ok(Some(usable).filter(|u| *u > 0.0))
}
