//! `pg_stat_database`: per-database counters with postgres_exporter's names, database sizes, and
//! the windowed buffer cache hit ratio.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use super::super::window::{CounterWindow, share};
use super::{MARK, Run, labels_with};

/// Column → counter metric (postgres_exporter's names, kept without `_total` so existing
/// dashboards work; the README lists them as promtool exceptions).
const COUNTERS: &[(&str, &str)] = &[
    ("xact_commit", "Transactions committed."),
    ("xact_rollback", "Transactions rolled back."),
    (
        "blks_read",
        "Disk blocks read (not found in shared buffers).",
    ),
    ("blks_hit", "Disk blocks found in shared buffers."),
    ("tup_returned", "Rows returned by queries."),
    ("tup_fetched", "Rows fetched by queries."),
    ("tup_inserted", "Rows inserted."),
    ("tup_updated", "Rows updated."),
    ("tup_deleted", "Rows deleted."),
    ("conflicts", "Queries cancelled by recovery conflicts."),
    ("temp_files", "Temporary files created."),
    ("temp_bytes", "Bytes written to temporary files."),
    ("deadlocks", "Deadlocks detected."),
];

pub(super) async fn collect(
    run: &mut Run<'_>,
    windows: &mut HashMap<String, CounterWindow>,
    window: Duration,
) -> Result<(), tokio_postgres::Error> {
    let columns: Vec<String> = COUNTERS
        .iter()
        .map(|(c, _)| format!("{c}::float8"))
        .collect();
    let rows = run
        .query(
            &format!(
                "{MARK} SELECT datname::text, numbackends::float8, pg_database_size(datid)::float8, {} \
                 FROM pg_stat_database WHERE datname IS NOT NULL ORDER BY datname",
                columns.join(", ")
            ),
            &[],
        )
        .await?;
    let now = Instant::now();
    let mut seen = Vec::with_capacity(rows.len());
    for row in &rows {
        let datname: &str = row.get(0);
        let labels = labels_with(run.labels, &[("datname", datname)]);
        run.out.gauge(
            "pg_stat_database_numbackends",
            "Backends connected to the database.",
            &labels,
            row.get(1),
        );
        // NULL when the database went away during the query: no size then, rather than 0.
        if let Ok(Some(size)) = row.try_get::<_, Option<f64>>(2) {
            run.out.gauge(
                "pg_database_size_bytes",
                "Disk space used by the database.",
                &labels,
                size,
            );
        }
        let mut hit = 0.0;
        let mut read = 0.0;
        for (i, (column, help)) in COUNTERS.iter().enumerate() {
            let value: f64 = row.get(3 + i);
            match *column {
                "blks_hit" => hit = value,
                "blks_read" => read = value,
                _ => {}
            }
            run.out
                .counter(&format!("pg_stat_database_{column}"), help, &labels, value);
        }
        let w = windows
            .entry(datname.to_owned())
            .or_insert_with(|| CounterWindow::new(window));
        if let Some(ratio) = w.push(now, vec![hit, read]).and_then(|d| share(d[0], d[1])) {
            run.out.gauge(
                "pg_buffer_cache_hit_ratio",
                "Blocks found in shared buffers over blocks needed, over the window; absent when no block was needed.",
                &labels,
                ratio,
            );
        }
        seen.push(datname.to_owned());
    }
    // Dropped databases take their window with them.
    windows.retain(|k, _| seen.contains(k));
    Ok(())
}
