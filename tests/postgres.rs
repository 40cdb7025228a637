//! The PostgreSQL and PgBouncer collectors against the real servers scripts/test provisions:
//! slow statements and mean latency from pg_stat_statements, idle connections (ours left out),
//! a PgBouncer pool with waiting clients, misconfigured targets, and a statement stuck behind
//! a lock being cancelled on the server, the connection limits and database sizes.
//!
//! The tests share one server whose statistics are global, so they run one at a time.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::sync::LazyLock;
use std::time::{Duration, Instant};

use common::{Autotuner, PgEnv, pg_connect, write_config};
use tokio::sync::Mutex;

static SERIAL: LazyLock<Mutex<()>> = LazyLock::new(|| Mutex::new(()));

fn pg_config(env: &PgEnv, extra_collector: &str, targets: &[(&str, String)]) -> String {
    let mut text = format!(
        "collectors:\n  postgres:\n    interval: 1s\n    timeout: 800ms\n    window: 6s\n{extra_collector}  pgbouncer:\n    interval: 1s\n    timeout: 800ms\ntargets:\n  pgbouncer:\n    - name: bouncer\n      url: '{}'\n  postgres:\n",
        env.pgbouncer_url
    );
    for (name, url) in targets {
        text.push_str(&format!("    - name: {name}\n      url: '{url}'\n"));
    }
    text
}

async fn start(
    env: &PgEnv,
    extra: &str,
    targets: &[(&str, String)],
) -> (Autotuner, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let file = write_config(&dir, &pg_config(env, extra, targets));
    let app = Autotuner::start(&["--config.file", &file], &[]);
    app.wait_ready().await;
    (app, dir)
}

const MAIN: [(&str, &str); 1] = [("target", "main")];

#[tokio::test]
async fn slow_statements_are_counted_and_move_the_mean_fast_ones_do_not() {
    let Some(env) = PgEnv::get() else { return };
    let _serial = SERIAL.lock().await;
    // A database of its own: statements other test binaries run meanwhile (on the shared
    // database) are not counted here, and the reset below forgets only this database's.
    let db = env.scratch_db("autotuner_slow").await;
    let admin = pg_connect(&db.url).await;
    admin
        .batch_execute(
            "CREATE TABLE big AS SELECT g AS id, md5(g::text) AS v FROM generate_series(1, 100000) g; \
             ANALYZE big;",
        )
        .await
        .unwrap();
    db.reset_statements(&admin).await;
    // The top statements are the server's, by total time: statements of other tests and other
    // test binaries (in other databases) would push this test's out of the default 20.
    let (app, _dir) = start(
        &env,
        "    statements_limit: 1000\n",
        &[("main", db.monitor_url.clone())],
    )
    .await;
    // Once a baseline exists the collector publishes pg_slow_queries.
    app.scrape_until(Duration::from_secs(5), "pg_slow_queries", |s| {
        s.value("pg_slow_queries", &MAIN).is_some()
    })
    .await;

    // Fast statements only: trivial queries and an unindexed lookup in 100k rows (~10 ms).
    for i in 0..30 {
        admin.query("SELECT $1::int4 + 1", &[&i]).await.unwrap();
        if i % 10 == 0 {
            admin
                .query("SELECT count(*) FROM big WHERE id = $1", &[&i])
                .await
                .unwrap();
        }
    }
    let fast = app
        .scrape_until(
            Duration::from_secs(5),
            "a mean over the fast statements",
            |s| s.value("pg_query_mean_latency_seconds", &MAIN).is_some(),
        )
        .await;
    let fast_mean = fast.value("pg_query_mean_latency_seconds", &MAIN).unwrap();
    assert!(
        fast_mean < 0.1,
        "fast statements gave a mean of {fast_mean}s"
    );
    for _ in 0..3 {
        let s = app.scrape().await;
        assert_eq!(
            s.value("pg_slow_queries", &MAIN),
            Some(0.0),
            "fast statements counted as slow"
        );
        tokio::time::sleep(Duration::from_millis(400)).await;
    }
    assert_eq!(
        fast.value("pg_slow_query_threshold_seconds", &MAIN),
        Some(0.1)
    );
    assert_eq!(fast.value("pg_stat_statements_available", &MAIN), Some(1.0));

    // Slow statements: pg_sleep(0.15) and a full scan computing md5 twice per row (~200 ms).
    for _ in 0..2 {
        admin.query("SELECT pg_sleep(0.15)", &[]).await.unwrap();
        admin
            .query("SELECT count(*) FROM big WHERE md5(md5(v)) = 'x'", &[])
            .await
            .unwrap();
    }
    let slow = app
        .scrape_until(Duration::from_secs(5), "two slow statements", |s| {
            s.value("pg_slow_queries", &MAIN).is_some_and(|n| n >= 2.0)
        })
        .await;
    let slow_mean = slow.value("pg_query_mean_latency_seconds", &MAIN).unwrap();
    // The floor is what is known: the two pg_sleep(0.15) calls alone put 0.3 s in the window,
    // over the 37 statements above and a few of the scratch database's (fewer than 60 calls).
    // The md5 scans add a machine-dependent amount, so they are not counted on.
    assert!(
        slow_mean > 2.0 * fast_mean && slow_mean > 0.3 / 60.0,
        "mean went from {fast_mean}s to {slow_mean}s"
    );
    // The top statements by time carry postgres_exporter's counters; ours are not among them.
    let top = slow.all("pg_stat_statements_seconds_total");
    // The server's statistics are global: other databases' statements can be listed too. In
    // this test's database only the test's own role ran statements besides us.
    let here: Vec<_> = top
        .iter()
        .filter(|s| s.labels.get("datname") == Some(db.name.as_str()))
        .collect();
    assert!(here.len() >= 2, "{:?}", slow.text);
    assert!(
        here.iter()
            .all(|s| s.labels.get("user") == Some("postgres")),
        "{:?}",
        slow.text
    );
    // The pg_sleep statement's counters are pg_stat_statements' own (summed over its rows, as
    // the collector does), once the collection after its last call is published.
    let row = admin
        .query_one(
            "SELECT queryid::text, sum(calls)::float8, (sum(total_exec_time) / 1000)::float8 \
             FROM pg_stat_statements s JOIN pg_database d ON d.oid = s.dbid \
             WHERE d.datname = $1 AND query = 'SELECT pg_sleep($1)' GROUP BY queryid",
            &[&db.name],
        )
        .await
        .unwrap();
    let (queryid, calls, seconds): (String, f64, f64) = (row.get(0), row.get(1), row.get(2));
    assert_eq!(calls, 2.0, "the two pg_sleep(0.15) calls since the reset");
    let sleep = [
        ("target", "main"),
        ("datname", db.name.as_str()),
        ("queryid", queryid.as_str()),
    ];
    let s = app
        .scrape_until(Duration::from_secs(5), "the pg_sleep statement", |s| {
            s.value("pg_stat_statements_calls_total", &sleep) == Some(calls)
        })
        .await;
    let published = s.value("pg_stat_statements_seconds_total", &sleep).unwrap();
    // The exposition prints shortest round-trip floats; the division is done by the server.
    assert!(
        (published - seconds).abs() < 1e-9 && seconds >= 0.3,
        "published {published}s, pg_stat_statements says {seconds}s"
    );
    assert_eq!(
        s.value("pg_stat_statements_rows_total", &sleep),
        Some(2.0),
        "one row per call"
    );
    let log = app.log.lock().unwrap().join("\n");
    assert!(!log.contains("unreachable"), "{log}");

    // Once the slow statements leave the 6 s window, they are no longer counted.
    app.scrape_until(
        Duration::from_secs(12),
        "the slow statements to age out",
        |s| s.value("pg_slow_queries", &MAIN) == Some(0.0),
    )
    .await;
}

#[tokio::test]
async fn idle_connections_are_counted_and_ours_are_not() {
    let Some(env) = PgEnv::get() else { return };
    let _serial = SERIAL.lock().await;
    // The idle connections go to a database of the test's own: other test binaries may come
    // and go in autotuner_test meanwhile.
    let db = format!("autotuner_idle_{}", std::process::id());
    let admin = pg_connect(&env.url).await;
    admin
        .batch_execute(&format!("DROP DATABASE IF EXISTS {db} WITH (FORCE)"))
        .await
        .unwrap();
    admin
        .batch_execute(&format!("CREATE DATABASE {db}"))
        .await
        .unwrap();
    let (app, _dir) = start(&env, "", &[("main", env.monitor_url.clone())]).await;
    let idle = [
        ("target", "main"),
        ("datname", db.as_str()),
        ("state", "idle"),
    ];
    app.scrape_until(Duration::from_secs(5), "no connection yet", |s| {
        s.value("pg_stat_activity_count", &idle) == Some(0.0)
    })
    .await;
    let mut url = url::Url::parse(&env.url).unwrap();
    url.set_path(&format!("/{db}"));
    let mut extra = Vec::new();
    for _ in 0..5 {
        extra.push(pg_connect(url.as_str()).await);
    }
    app.scrape_until(Duration::from_secs(5), "five idle connections", |s| {
        s.value("pg_stat_activity_count", &idle) == Some(5.0)
    })
    .await;
    // An independent count, by the server, of every client connection except autotuner's,
    // before and after a scrape whose collection is later than the first (more than an
    // interval apart): when the two agree, the published count is that.
    let count = || async {
        let row = admin
            .query_one(
                "SELECT count(*) FILTER (WHERE application_name IS DISTINCT FROM 'autotuner')::float8, \
                 count(*) FILTER (WHERE application_name = 'autotuner')::float8 \
                 FROM pg_stat_activity WHERE backend_type = 'client backend'",
                &[],
            )
            .await
            .unwrap();
        (row.get::<_, f64>(0), row.get::<_, f64>(1))
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (others, ours) = count().await;
        tokio::time::sleep(Duration::from_millis(1_500)).await;
        let after = app.scrape().await;
        if count().await != (others, ours) {
            assert!(
                Instant::now() < deadline,
                "the connections never held still"
            );
            continue;
        }
        assert!(
            ours >= 1.0,
            "autotuner's own session should exist to be left out"
        );
        // The admin connection is active while it counts, idle at collection time: in both.
        let in_use = after.value("pg_connections_in_use", &MAIN).unwrap();
        assert_eq!(
            in_use, others,
            "ours excluded: {ours} of ours, {others} others"
        );
        let ratio = after.value("pg_connections_usage_ratio", &MAIN).unwrap();
        // max_connections 40 less 3 superuser-reserved slots.
        assert!(
            (ratio - in_use / 37.0).abs() < 1e-9,
            "ratio {ratio} for {in_use} in use"
        );
        break;
    }
    drop(extra);
    app.scrape_until(Duration::from_secs(5), "the idle connections gone", |s| {
        s.value("pg_stat_activity_count", &idle) == Some(0.0)
    })
    .await;
    admin
        .batch_execute(&format!("DROP DATABASE {db} WITH (FORCE)"))
        .await
        .unwrap();
}

#[tokio::test]
async fn connection_limits_and_database_sizes_match_the_server() {
    let Some(env) = PgEnv::get() else { return };
    let _serial = SERIAL.lock().await;
    let admin = pg_connect(&env.url).await;
    // A database from an earlier, interrupted run would be counted as already present.
    admin
        .batch_execute("DROP DATABASE IF EXISTS autotuner_sizes")
        .await
        .unwrap();
    let size_now = || async {
        admin
            .query_one("SELECT pg_database_size('autotuner_test')::float8", &[])
            .await
            .unwrap()
            .get::<_, f64>(0)
    };
    let size_before = size_now().await;
    let (app, _dir) = start(&env, "", &[("main", env.monitor_url.clone())]).await;
    let test_db = [("target", "main"), ("datname", "autotuner_test")];
    let first = app
        .scrape_until(Duration::from_secs(5), "database sizes", |s| {
            s.value("pg_database_size_bytes", &test_db).is_some()
        })
        .await;
    let row = admin
        .query_one(
            "SELECT current_setting('max_connections')::float8, \
             current_setting('superuser_reserved_connections')::float8, \
             current_setting('reserved_connections', true)::float8, \
             pg_database_size('autotuner_test')::float8, \
             current_setting('server_version_num')::int4",
            &[],
        )
        .await
        .unwrap();
    let (max, superuser, reserved, size, version): (f64, f64, Option<f64>, f64, i32) =
        (row.get(0), row.get(1), row.get(2), row.get(3), row.get(4));
    assert_eq!(first.value("pg_settings_max_connections", &MAIN), Some(max));
    assert_eq!(
        first.value("pg_settings_superuser_reserved_connections", &MAIN),
        Some(superuser)
    );
    assert_eq!(
        first.value("pg_settings_reserved_connections", &MAIN),
        reserved
    );
    assert_eq!(reserved.is_some(), version >= 160_000);
    // Read at the first collection, between the two readings of the test: equal to the
    // server's figure when that held still (nothing wrote to the database), else between them.
    let published = first.value("pg_database_size_bytes", &test_db).unwrap();
    assert!(
        published >= size_before.min(size) && published <= size_before.max(size),
        "published {published} bytes, the server said {size_before} then {size}"
    );

    // A database created after start gets its size at the next collection, not a minute later.
    admin
        .batch_execute("CREATE DATABASE autotuner_sizes")
        .await
        .unwrap();
    let new_size = || async {
        admin
            .query_one("SELECT pg_database_size('autotuner_sizes')::float8", &[])
            .await
            .unwrap()
            .get::<_, f64>(0)
    };
    let created = new_size().await;
    let new_db = [("target", "main"), ("datname", "autotuner_sizes")];
    let later = app
        .scrape_until(Duration::from_secs(5), "the new database's size", |s| {
            s.value("pg_database_size_bytes", &new_db).is_some()
        })
        .await;
    let expected = new_size().await;
    let got = later.value("pg_database_size_bytes", &new_db).unwrap();
    // Nobody writes to the new database (autovacuum may, once): the server's figure, or between
    // its two readings.
    assert!(
        got >= created.min(expected) && got <= created.max(expected),
        "published {got} bytes, the server said {created} then {expected}"
    );
    // And a dropped one leaves with its size.
    admin
        .batch_execute("DROP DATABASE autotuner_sizes WITH (FORCE)")
        .await
        .unwrap();
    app.scrape_until(Duration::from_secs(5), "the dropped database gone", |s| {
        s.value("pg_database_size_bytes", &new_db).is_none()
            && s.value("pg_stat_database_numbackends", &new_db).is_none()
    })
    .await;
}

#[tokio::test]
async fn pgbouncer_pool_of_two_with_five_slow_clients() {
    let Some(env) = PgEnv::get() else { return };
    let _serial = SERIAL.lock().await;
    let (app, _dir) = start(&env, "", &[]).await;
    let mut clients = Vec::new();
    for _ in 0..5 {
        let url = env.pgbouncer_db_url.clone();
        clients.push(tokio::spawn(async move {
            let c = pg_connect(&url).await;
            c.simple_query("SELECT pg_sleep(3)").await.unwrap();
        }));
    }
    let pool = [
        ("target", "bouncer"),
        ("database", "autotuner_test"),
        ("user", "postgres"),
    ];
    let s = app
        .scrape_until(Duration::from_secs(5), "three waiting clients", |s| {
            s.value("pgbouncer_clients_waiting", &pool) == Some(3.0)
        })
        .await;
    assert_eq!(s.value("pgbouncer_pool_usage_ratio", &pool), Some(1.0));
    assert_eq!(
        s.value("pgbouncer_pools_server_active_connections", &pool),
        Some(2.0)
    );
    assert_eq!(
        s.value("pgbouncer_pools_client_active_connections", &pool),
        Some(2.0)
    );
    assert_eq!(s.value("pgbouncer_up", &[("target", "bouncer")]), Some(1.0));
    for c in clients {
        c.await.unwrap();
    }
    app.scrape_until(Duration::from_secs(12), "the queue drained", |s| {
        s.value("pgbouncer_clients_waiting", &pool) == Some(0.0)
            && s.value("pgbouncer_pools_client_maxwait_seconds", &pool) == Some(0.0)
    })
    .await;
    // Three clients waited for one of two connections held 3 s each (about 3 + 3 + 6 s): the
    // published total is the console's own, read before and after a scrape that agree.
    let console = pg_connect(&env.pgbouncer_url).await;
    let wait_total = || async {
        let rows = console.simple_query("SHOW STATS").await.unwrap();
        rows.iter()
            .find_map(|m| match m {
                tokio_postgres::SimpleQueryMessage::Row(r)
                    if r.get("database") == Some("autotuner_test") =>
                {
                    r.get("total_wait_time")?.parse::<f64>().ok()
                }
                _ => None,
            })
            .unwrap()
            / 1e6
    };
    let stats = [("target", "bouncer"), ("database", "autotuner_test")];
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let first = wait_total().await;
        tokio::time::sleep(Duration::from_millis(1_500)).await;
        let s = app.scrape().await;
        let second = wait_total().await;
        let published = s
            .value("pgbouncer_stats_client_wait_seconds_total", &stats)
            .unwrap();
        if first == second {
            assert_eq!(published, first, "the console says {first}s");
            assert!(first > 6.0, "three clients waited only {first}s in total");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the console's wait time never settled"
        );
    }
}

#[tokio::test]
async fn wrong_password_missing_database_and_missing_extension() {
    let Some(env) = PgEnv::get() else { return };
    let _serial = SERIAL.lock().await;
    let targets = [
        ("badpw", env.monitor_url_with(Some("not-the-pw-41"), None)),
        ("nodb", env.monitor_url_with(None, Some("no_such_db"))),
        // The `postgres` database has no pg_stat_statements extension.
        ("noext", env.monitor_url_with(None, Some("postgres"))),
    ];
    let (app, _dir) = start(&env, "", &targets).await;
    let reason = |s: &common::Scrape, t: &str, r: &str| {
        s.value(
            "autotuner_target_error",
            &[("kind", "postgres"), ("target", t), ("reason", r)],
        )
    };
    // (A loaded machine may first time out connecting: wait for the reasons themselves.)
    let s = app
        .scrape_until(Duration::from_secs(10), "all three reported", |s| {
            s.value("pg_up", &[("target", "noext")]) == Some(1.0)
                && s.value("pg_up", &[("target", "badpw")]) == Some(0.0)
                && s.value("pg_up", &[("target", "nodb")]) == Some(0.0)
                && reason(s, "badpw", "auth") == Some(1.0)
                && reason(s, "nodb", "missing_database") == Some(1.0)
                && s.value("pg_stat_statements_available", &[("target", "noext")])
                    .is_some()
        })
        .await;
    let err = |t: &str, r: &str| reason(&s, t, r);
    assert_eq!(err("noext", "error"), Some(0.0));
    assert_eq!(
        s.value("pg_stat_statements_available", &[("target", "noext")]),
        Some(0.0)
    );
    assert!(s.value("pg_slow_queries", &[("target", "noext")]).is_none());
    // Still one line each after several runs, and no password anywhere.
    tokio::time::sleep(Duration::from_millis(2_500)).await;
    let s = app.scrape().await;
    let log = app.log.lock().unwrap().join("\n");
    let count = |needle: &str, target: &str| {
        log.lines()
            .filter(|l| l.contains(needle) && l.contains(target))
            .count()
    };
    // One line per change of reason, never one per run (a loaded machine may first time out
    // connecting, a change of its own).
    let unreachable = |target: &str, reason: &str| {
        let lines: Vec<&str> = log
            .lines()
            .filter(|l| l.contains("PostgreSQL unreachable") && l.contains(target))
            .filter(|l| !l.contains("\"reason\":\"timeout\""))
            .collect();
        lines.len() == 1 && lines[0].contains(&format!("\"reason\":\"{reason}\""))
    };
    assert!(unreachable("badpw", "auth"), "{log}");
    assert!(unreachable("nodb", "missing_database"), "{log}");
    assert_eq!(
        count("pg_stat_statements is not installed", "noext"),
        1,
        "{log}"
    );
    for secret in ["not-the-pw-41", "autotuner-test-monitor-pw"] {
        assert!(!log.contains(secret), "{secret} in the log:\n{log}");
        assert!(!s.text.contains(secret), "{secret} in the metrics");
    }
}

#[tokio::test]
async fn a_statement_stuck_behind_a_lock_is_cancelled_on_the_server() {
    let Some(env) = PgEnv::get() else { return };
    let _serial = SERIAL.lock().await;
    let (app, _dir) = start(&env, "", &[("main", env.monitor_url.clone())]).await;
    app.scrape_until(Duration::from_secs(5), "statements read", |s| {
        s.value("pg_stat_statements_available", &MAIN) == Some(1.0)
    })
    .await;
    let mut holder = pg_connect(&env.url).await;
    let tx = holder.transaction().await.unwrap();
    // Our check of pg_extension now waits for this lock, every run.
    tx.batch_execute("LOCK TABLE pg_catalog.pg_extension IN ACCESS EXCLUSIVE MODE")
        .await
        .unwrap();
    let s = app
        .scrape_until(Duration::from_secs(5), "the timeout reported", |s| {
            s.value(
                "autotuner_target_error",
                &[("target", "main"), ("reason", "timeout")],
            ) == Some(1.0)
        })
        .await;
    // Still connected, and the other views still read.
    assert_eq!(s.value("pg_up", &MAIN), Some(1.0));
    assert!(s.value("pg_connections_in_use", &MAIN).is_some());
    // Watch for three seconds: a waiting query of ours never gets older
    // than its statement_timeout (800 ms × 0.9 / 4 = 180 ms) plus scheduling slack. Without the
    // cancellation it would wait as long as the lock is held.
    // (From a second connection: inside the holder's transaction pg_stat_activity is a
    // snapshot taken once.)
    let watcher = pg_connect(&env.url).await;
    let watch_until = Instant::now() + Duration::from_secs(3);
    let mut oldest: f64 = 0.0;
    let mut seen_waiting = false;
    while Instant::now() < watch_until {
        let row = watcher
            .query_one(
                "SELECT COALESCE(max(EXTRACT(EPOCH FROM clock_timestamp() - query_start)), 0)::float8, count(*)::int8 \
                 FROM pg_stat_activity WHERE application_name = 'autotuner' AND state = 'active' AND wait_event_type = 'Lock'",
                &[],
            )
            .await
            .unwrap();
        oldest = oldest.max(row.get(0));
        seen_waiting |= row.get::<_, i64>(1) > 0;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        seen_waiting,
        "our query never waited on the lock: the test did not test anything"
    );
    assert!(
        oldest < 0.6,
        "a query of ours waited {oldest}s behind the lock"
    );
    tx.commit().await.unwrap();
    app.scrape_until(Duration::from_secs(5), "recovery after the lock", |s| {
        s.value(
            "autotuner_target_error",
            &[("target", "main"), ("reason", "timeout")],
        ) == Some(0.0)
            && s.value("pg_stat_statements_available", &MAIN) == Some(1.0)
    })
    .await;
    let _ = holder.simple_query("SELECT 1").await;
    drop(holder);
}
