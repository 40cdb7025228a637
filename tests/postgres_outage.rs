//! A PostgreSQL that stops and comes back: `pg_up` goes to 0 within an interval while
//! `/metrics` keeps answering as fast as before, and returns to 1 without restarting us. Runs
//! its own private cluster, since it stops it.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::time::{Duration, Instant};

use common::{Autotuner, PgCluster, PgEnv, write_config};

#[tokio::test]
async fn stop_and_start_postgres_without_restarting_us() {
    let Some(env) = PgEnv::get() else { return };
    let cluster = PgCluster::start(&env.bin);
    let dir = tempfile::tempdir().unwrap();
    let file = write_config(
        &dir,
        &format!(
            "collectors:\n  postgres:\n    interval: 1s\n    timeout: 800ms\n    window: 5s\ntargets:\n  postgres:\n    - name: private\n      url: '{}'\n",
            cluster.url()
        ),
    );
    let app = Autotuner::start(&["--config.file", &file], &[]);
    app.wait_ready().await;
    let t = [("target", "private")];
    app.scrape_until(Duration::from_secs(5), "pg_up 1", |s| {
        s.value("pg_up", &t) == Some(1.0)
    })
    .await;
    // The scrape medians are compared: no CPU burn from another test in their window.
    let _cpu = common::CpuHold::shared();
    let up = common::scrape_median(&app, 21).await;

    cluster.stop();
    let stopped_at = Instant::now();
    let s = app
        .scrape_until(Duration::from_secs(3), "pg_up 0", |s| {
            s.value("pg_up", &t) == Some(0.0)
        })
        .await;
    eprintln!("pg_up 0 seen {:?} after the stop", stopped_at.elapsed());
    assert_eq!(
        s.value(
            "autotuner_target_error",
            &[("target", "private"), ("reason", "connect")]
        ),
        Some(1.0)
    );
    assert_eq!(
        s.value(
            "autotuner_collector_up",
            &[("collector", "postgres/private")]
        ),
        Some(1.0)
    );
    let down = common::scrape_median(&app, 21).await;
    common::assert_scrapes_unaffected(up, down, "PostgreSQL stopped");

    cluster.pg_ctl_start();
    app.scrape_until(Duration::from_secs(8), "pg_up back to 1", |s| {
        s.value("pg_up", &t) == Some(1.0)
    })
    .await;
    let log = app.log.lock().unwrap().join("\n");
    assert!(log.contains("PostgreSQL reachable again"), "{log}");
    assert!(!log.contains("panicked"), "{log}");
}
