//! `pg_settings`: the connection limits, as postgres_exporter names them.

use super::{MARK, Run};

/// Publishes the limits and returns the usable maximum of client connections (what is left
/// after the slots reserved for superusers and, from PostgreSQL 16, for `pg_use_reserved_connections`).
pub(super) async fn collect(run: &mut Run<'_>) -> Result<Option<f64>, tokio_postgres::Error> {
    let rows = run
        .query(
            &format!(
                "{MARK} SELECT name, setting::float8 FROM pg_settings \
                 WHERE name IN ('max_connections', 'superuser_reserved_connections', 'reserved_connections')"
            ),
            &[],
        )
        .await?;
    let labels = run.labels;
    let (mut max, mut reserved) = (None, 0.0);
    for row in rows {
        let name: &str = row.get(0);
        let value: f64 = row.get(1);
        let (metric, help) = match name {
            "max_connections" => {
                max = Some(value);
                (
                    "pg_settings_max_connections",
                    "The max_connections setting.",
                )
            }
            "superuser_reserved_connections" => {
                reserved += value;
                (
                    "pg_settings_superuser_reserved_connections",
                    "The superuser_reserved_connections setting.",
                )
            }
            _ => {
                reserved += value;
                (
                    "pg_settings_reserved_connections",
                    "The reserved_connections setting (PostgreSQL 16 and newer).",
                )
            }
        };
        run.out.gauge(metric, help, &labels, value);
    }
    Ok(max.map(|m| m - reserved).filter(|u| *u > 0.0))
}
