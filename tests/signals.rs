//! Published values compared with the server's own figure at the same moment, and the claims
//! about degraded targets, against real services:
//!
//! - Redis: `MEMORY PURGE` returns the allocator's dirty pages to the OS and keeps every key;
//!   evicted keys equal INFO's `evicted_keys`; the slow log length equals `SLOWLOG LEN`; an ACL
//!   user without `+slowlog` keeps every other figure.
//! - PostgreSQL: the longest active query and the active slow queries against
//!   `pg_stat_activity`; the `pg_stat_database` counters and the windowed buffer cache hit ratio
//!   against the server's row, in a database of the test's own that nobody else uses.
//! - PgBouncer: a private one killed and restarted on its port.
//!
//! Every test owns its servers, databases and keys, so the tests run in parallel with each other
//! and with other test binaries.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::collections::{BTreeSet, HashMap};
use std::time::{Duration, Instant};

use autotuner::actions::exec::{self, Services};
use autotuner::settings::Target;
use autotuner::settings::secret::SecretUrl;
use autotuner::targets::RedisHandle;
use common::{Autotuner, Bouncer, PgEnv, RedisServer, Scrape, pg_connect};

const MIB: f64 = 1024.0 * 1024.0;

/// The binary with `config` and an empty rules directory: no shipped rule may act on a target
/// of these tests.
async fn start_with(config: &str) -> (Autotuner, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let file = common::write_config(&dir, config);
    let rules = dir.path().join("rules");
    std::fs::create_dir(&rules).unwrap();
    let app = Autotuner::start(
        &[
            "--config.file",
            &file,
            &format!("--rules.dir={}", rules.display()),
        ],
        &[],
    );
    app.wait_ready().await;
    (app, dir)
}

/// A connection whose replies may take long on a loaded machine (the default gives up after
/// 500 ms, which a pipeline of a megabyte can exceed).
async fn redis_conn(url: &str) -> redis::aio::MultiplexedConnection {
    let config =
        redis::AsyncConnectionConfig::new().set_response_timeout(Some(Duration::from_secs(30)));
    redis::Client::open(url)
        .unwrap()
        .get_multiplexed_async_connection_with_config(&config)
        .await
        .unwrap()
}

/// One section of INFO as field → value.
async fn info(c: &mut redis::aio::MultiplexedConnection, section: &str) -> HashMap<String, String> {
    let text: String = redis::cmd("INFO")
        .arg(section)
        .query_async(c)
        .await
        .unwrap();
    text.lines()
        .filter_map(|l| l.trim_end().split_once(':'))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
}

fn num(info: &HashMap<String, String>, field: &str) -> f64 {
    info.get(field)
        .unwrap_or_else(|| panic!("{field} not in INFO"))
        .parse()
        .unwrap()
}

/// Polls INFO `section` until `check` accepts it.
async fn info_until(
    c: &mut redis::aio::MultiplexedConnection,
    section: &str,
    what: &str,
    check: impl Fn(&HashMap<String, String>) -> bool,
) -> HashMap<String, String> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let i = info(c, section).await;
        if check(&i) {
            return i;
        }
        assert!(Instant::now() < deadline, "{what} not seen in 10 s: {i:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn memory_purge_returns_the_dirty_pages_to_the_os_and_keeps_every_key() {
    // INFO's memory figures are what Redis's cron last sampled: every 100 ms at the default hz of
    // 10, every second at hz 1. The slower sampling makes a reading taken right after the purge
    // (a stale one) the rule rather than a matter of scheduling luck.
    // jemalloc also returns dirty pages by itself, after `dirty_decay_ms` (10 s), from Redis's
    // background thread: on a loaded machine that can happen before the purge, leaving nothing
    // to purge. Both are off here (Debian's redis-server links the system jemalloc, which reads
    // MALLOC_CONF), so the pages stay until MEMORY PURGE returns them.
    let Some(server) = RedisServer::start_with_env(
        &["--hz", "1", "--jemalloc-bg-thread", "no"],
        &[("MALLOC_CONF", "dirty_decay_ms:-1,muzzy_decay_ms:-1")],
    ) else {
        return;
    };
    let mut c = redis_conn(&server.url()).await;
    let fresh = info(&mut c, "memory").await;
    // With libc's malloc MEMORY PURGE does nothing; Debian's redis-server links jemalloc.
    assert!(
        fresh["mem_allocator"].starts_with("jemalloc"),
        "the test needs a jemalloc Redis: {}",
        fresh["mem_allocator"]
    );
    // `allocator_rss_bytes` is resident − active: pages jemalloc keeps resident that hold no
    // data (freed, "dirty"). They are what a purge returns. `allocator_frag_bytes` (active −
    // allocated, holes inside pages still in use) is untouched by a purge, so it is no measure.
    let idle_dirty = num(&fresh, "allocator_rss_bytes");

    // 96 MB of values, then deleted with DEL (FLUSHDB would purge by itself), 100 keys kept.
    let value = "v".repeat(1000);
    for chunk in 0..96 {
        let mut pipe = redis::pipe();
        for i in chunk * 1000..(chunk + 1) * 1000 {
            pipe.cmd("SET")
                .arg(format!("bulk:{i}"))
                .arg(&value)
                .ignore();
        }
        let _: () = pipe.query_async(&mut c).await.unwrap();
    }
    let mut pipe = redis::pipe();
    for i in 0..100 {
        pipe.cmd("SET").arg(format!("kept:{i}")).arg(i).ignore();
    }
    let _: () = pipe.query_async(&mut c).await.unwrap();
    for chunk in 0..96 {
        let mut del = redis::cmd("DEL");
        for i in chunk * 1000..(chunk + 1) * 1000 {
            del.arg(format!("bulk:{i}"));
        }
        let n: u64 = del.query_async(&mut c).await.unwrap();
        assert_eq!(n, 1000);
    }
    // The allocator's figures are sampled by Redis's cron, `used_memory` is counted live: wait
    // for a sample taken after the last DEL. A sample from before the fill satisfies "allocated
    // agrees with used_memory" too (a fast fill and delete can fall between two samples), so
    // the sample must also show the pages the fill made resident (decay is off: they stay).
    let idle_resident = num(&fresh, "allocator_resident");
    let before = info_until(&mut c, "memory", "the freed pages", |i| {
        num(i, "allocator_allocated") < num(i, "used_memory") + 1.5 * MIB
            && num(i, "allocator_resident") > idle_resident + 48.0 * MIB
    })
    .await;
    assert!(
        num(&before, "allocator_rss_bytes") > idle_dirty + 48.0 * MIB,
        "no dirty pages to purge: {before:?}"
    );

    let services = redis_services(&server.url());
    let out = exec::redis_memory_purge(&services, None).await.unwrap();

    let after = info_until(&mut c, "memory", "the purge's effect", |i| {
        num(i, "allocator_rss_bytes") < idle_dirty + 8.0 * MIB
    })
    .await;
    let returned = num(&before, "allocator_rss_bytes") - num(&after, "allocator_rss_bytes");
    let rss_drop = num(&before, "used_memory_rss") - num(&after, "used_memory_rss");
    assert!(
        rss_drop > 0.75 * returned,
        "the process gave back {rss_drop} bytes of the {returned} the allocator returned"
    );
    // Only unused pages went: the data and the pages holding it are the same.
    for field in ["used_memory", "allocator_allocated", "allocator_active"] {
        let (b, a) = (num(&before, field), num(&after, field));
        assert!((b - a).abs() < 3.0 * MIB, "{field}: {b} before, {a} after");
    }
    let keys: u64 = redis::cmd("DBSIZE").query_async(&mut c).await.unwrap();
    assert_eq!(keys, 100);
    let kept: Vec<Option<u64>> = redis::cmd("MGET")
        .arg((0..100).map(|i| format!("kept:{i}")).collect::<Vec<_>>())
        .query_async(&mut c)
        .await
        .unwrap();
    assert_eq!(kept, (0..100).map(Some).collect::<Vec<_>>());

    // What the action records is the purge's effect, not the figure Redis sampled before it.
    let rss = |v: &serde_json::Value| v["used_memory_rss"].as_f64().unwrap();
    let recorded_drop = rss(&out.before) - rss(&out.after);
    assert!(
        recorded_drop > 0.75 * returned,
        "the action recorded {} → {} bytes while the purge returned {returned}: {out:?}",
        rss(&out.before),
        rss(&out.after)
    );
}

fn redis_services(url: &str) -> Services {
    let mut s = Services {
        http: reqwest::Client::new(),
        ..Services::default()
    };
    let target = Target {
        name: "default".into(),
        url: SecretUrl::parse(url).unwrap(),
        tls_ca_file: None,
    };
    s.redis.insert(
        "default".into(),
        RedisHandle::new(&target, Duration::from_secs(5)).unwrap(),
    );
    s
}

fn redis_config(targets: &[(&str, String)]) -> String {
    let mut text = String::from(
        "collectors:\n  redis:\n    interval: 1s\n    timeout: 800ms\n    hit_ratio_window: 1m\ntargets:\n  redis:\n",
    );
    for (name, url) in targets {
        text.push_str(&format!("    - name: {name}\n      url: '{url}'\n"));
    }
    text
}

#[tokio::test]
async fn evicted_keys_and_keys_equal_the_servers_own_counts() {
    let Some(server) =
        RedisServer::start(&["--maxmemory", "4mb", "--maxmemory-policy", "allkeys-lru"])
    else {
        return;
    };
    let (app, _dir) = start_with(&redis_config(&[("lru", server.url())])).await;
    let t = [("target", "lru")];
    let mut c = redis_conn(&server.url()).await;
    // 20 MB into 4 MB: most keys are evicted.
    let value = "e".repeat(1000);
    for chunk in 0..20 {
        let mut pipe = redis::pipe();
        for i in chunk * 1000..(chunk + 1) * 1000 {
            pipe.cmd("SET").arg(format!("k:{i}")).arg(&value).ignore();
        }
        let _: () = pipe.query_async(&mut c).await.unwrap();
    }
    let s = app
        .scrape_until(Duration::from_secs(5), "evictions", |s| {
            s.value("redis_evicted_keys_total", &t)
                .is_some_and(|n| n > 0.0)
        })
        .await;
    assert_eq!(s.value("redis_memory_max_bytes", &t), Some(4.0 * MIB));
    // Lift the limit: nothing more is evicted, even by our own INFO replies, so the server's
    // count stands still and the published one must reach it exactly.
    let _: () = redis::cmd("CONFIG")
        .arg(&["SET", "maxmemory", "0"])
        .query_async(&mut c)
        .await
        .unwrap();
    let evicted = num(&info(&mut c, "stats").await, "evicted_keys");
    let keys: u64 = redis::cmd("DBSIZE").query_async(&mut c).await.unwrap();
    assert!(
        evicted > 10_000.0 && keys < 10_000,
        "{evicted} evicted, {keys} kept: the limit did not bite"
    );
    assert_eq!(evicted + keys as f64, 20_000.0);
    let s = app
        .scrape_until(Duration::from_secs(5), "the limit lifted", |s| {
            s.value("redis_memory_max_bytes", &t) == Some(0.0)
        })
        .await;
    assert_eq!(s.value("redis_evicted_keys_total", &t), Some(evicted));
    assert_eq!(
        s.value("redis_db_keys", &[("target", "lru"), ("db", "db0")]),
        Some(keys as f64)
    );
    assert_eq!(s.value("redis_memory_usage_ratio", &t), None);
}

#[tokio::test]
async fn slowlog_length_equals_slowlog_len() {
    let Some(server) = RedisServer::start(&["--slowlog-max-len", "1000"]) else {
        return;
    };
    let (app, _dir) = start_with(&redis_config(&[("slow", server.url())])).await;
    let t = [("target", "slow")];
    app.scrape_until(Duration::from_secs(5), "an empty slow log", |s| {
        s.value("redis_slowlog_length", &t) == Some(0.0)
    })
    .await;
    // Every command is logged only inside this transaction (nothing can interleave with it):
    // the CONFIG SET that lowers the threshold to 0 (logged after it ran) and the 37 commands.
    // The last CONFIG SET disables the log again, so our own PING, INFO and SLOWLOG LEN are
    // never logged and the length stands still.
    let mut c = redis_conn(&server.url()).await;
    let mut tx = redis::pipe();
    tx.atomic()
        .cmd("CONFIG")
        .arg(&["SET", "slowlog-log-slower-than", "0"])
        .ignore();
    for i in 0..37 {
        tx.cmd("SET").arg(format!("s:{i}")).arg(i).ignore();
    }
    tx.cmd("CONFIG")
        .arg(&["SET", "slowlog-log-slower-than", "-1"])
        .ignore();
    let _: () = tx.query_async(&mut c).await.unwrap();
    let len: u64 = redis::cmd("SLOWLOG")
        .arg("LEN")
        .query_async(&mut c)
        .await
        .unwrap();
    assert_eq!(len, 38);
    app.scrape_until(Duration::from_secs(5), "the slow log length", |s| {
        s.value("redis_slowlog_length", &t) == Some(38.0)
    })
    .await;
    // A gauge, not a counter: a reset brings it back to the server's 0.
    let _: () = redis::cmd("SLOWLOG")
        .arg("RESET")
        .query_async(&mut c)
        .await
        .unwrap();
    app.scrape_until(Duration::from_secs(5), "the slow log reset", |s| {
        s.value("redis_slowlog_length", &t) == Some(0.0)
    })
    .await;
}

/// The metric names published with `target` (autotuner's own `target_error` left out).
fn names_of(s: &Scrape, target: &str) -> BTreeSet<String> {
    s.samples
        .iter()
        .filter(|x| x.labels.get("target") == Some(target) && x.metric.starts_with("redis_"))
        .map(|x| x.metric.clone())
        .collect()
}

#[tokio::test]
async fn an_acl_user_without_slowlog_gets_every_other_figure() {
    let Some(server) = RedisServer::start(&["--requirepass", "sig-admin-pw"]) else {
        return;
    };
    let admin = format!("redis://:sig-admin-pw@127.0.0.1:{}/", server.port);
    let mut c = redis_conn(&admin).await;
    // What the README says a monitoring user needs, less `+slowlog`.
    let _: () = redis::cmd("ACL")
        .arg(&["SETUSER", "noslow", "on", ">noslow-pw", "+ping", "+info"])
        .query_async(&mut c)
        .await
        .unwrap();
    let _: () = redis::cmd("CONFIG")
        .arg(&["SET", "maxmemory", "100mb"])
        .query_async(&mut c)
        .await
        .unwrap();
    let _: () = redis::cmd("SET")
        .arg("present")
        .arg("1")
        .query_async(&mut c)
        .await
        .unwrap();
    let noslow = format!("redis://noslow:noslow-pw@127.0.0.1:{}/", server.port);
    let (app, _dir) = start_with(&redis_config(&[
        ("admin", admin.clone()),
        ("noslow", noslow),
    ]))
    .await;
    let up = |s: &Scrape| {
        s.value("redis_up", &[("target", "admin")]) == Some(1.0)
            && s.value("redis_up", &[("target", "noslow")]) == Some(1.0)
    };
    app.scrape_until(Duration::from_secs(5), "both up", up)
        .await;
    // Three hits and a miss, seen by both collectors' windows.
    for key in ["present", "present", "present", "absent"] {
        let _: Option<String> = redis::cmd("GET")
            .arg(key)
            .query_async(&mut c)
            .await
            .unwrap();
    }
    let ratio = |t: &'static str| [("target", t)];
    let s = app
        .scrape_until(Duration::from_secs(5), "both hit ratios", |s| {
            up(s)
                && s.value("redis_cache_hit_ratio", &ratio("admin")) == Some(0.75)
                && s.value("redis_cache_hit_ratio", &ratio("noslow")) == Some(0.75)
        })
        .await;
    let mut expected = names_of(&s, "admin");
    assert!(expected.remove("redis_slowlog_length"), "{}", s.text);
    assert_eq!(names_of(&s, "noslow"), expected, "{}", s.text);
    for metric in ["redis_memory_max_bytes", "redis_db_keys"] {
        assert_eq!(
            s.value(metric, &[("target", "noslow")]),
            s.value(metric, &[("target", "admin")]),
            "{metric}"
        );
    }
    // A denied SLOWLOG is no failure of the target or the collector.
    for reason in ["connect", "auth", "timeout", "error"] {
        assert_eq!(
            s.value(
                "autotuner_target_error",
                &[("target", "noslow"), ("reason", reason)]
            ),
            Some(0.0),
            "{reason}"
        );
    }
    assert_eq!(
        s.value("autotuner_collector_up", &[("collector", "redis/noslow")]),
        Some(1.0)
    );
    let log = app.log.lock().unwrap().join("\n");
    assert!(!log.contains("Redis unreachable"), "{log}");
    assert!(!log.contains("noslow-pw") && !log.contains("sig-admin-pw"));
}

#[tokio::test]
async fn pgbouncer_unreachable_and_back() {
    let Some(env) = PgEnv::get() else { return };
    if common::require("pgbouncer").is_none() {
        return;
    }
    let bouncer = Bouncer::start(&env);
    let (app, _dir) = start_with(&format!(
        "collectors:\n  pgbouncer:\n    interval: 1s\n    timeout: 800ms\ntargets:\n  pgbouncer:\n    - name: own\n      url: '{}'\n",
        bouncer.admin_url
    ))
    .await;
    let t = [("target", "own")];
    let pool = [
        ("target", "own"),
        ("database", "autotuner_test"),
        ("user", "postgres"),
    ];
    // One client in session mode holds one of the pool's two server connections.
    let pooled = |s: &Scrape| {
        s.value("pgbouncer_up", &t) == Some(1.0)
            && s.value("pgbouncer_pools_client_active_connections", &pool) == Some(1.0)
            && s.value("pgbouncer_pools_server_active_connections", &pool) == Some(1.0)
            && s.value("pgbouncer_pool_usage_ratio", &pool) == Some(0.5)
            && s.value("pgbouncer_clients_waiting", &pool) == Some(0.0)
            && s.value(
                "pgbouncer_databases_pool_size",
                &[("target", "own"), ("database", "autotuner_test")],
            ) == Some(2.0)
    };
    let client = pg_connect(&bouncer.client_url).await;
    client.simple_query("SELECT 1").await.unwrap();
    app.scrape_until(Duration::from_secs(5), "the pool", pooled)
        .await;
    let before = common::scrape_median(&app, 21).await;

    let err = |s: &Scrape, reason: &str| {
        s.value(
            "autotuner_target_error",
            &[("kind", "pgbouncer"), ("target", "own"), ("reason", reason)],
        )
    };
    bouncer.kill();
    let s = app
        .scrape_until(Duration::from_secs(5), "pgbouncer_up 0, refused", |s| {
            s.value("pgbouncer_up", &t) == Some(0.0) && err(s, "connect") == Some(1.0)
        })
        .await;
    // No pool figures from a console that did not answer: stale ones would look like a pool.
    assert!(
        s.all("pgbouncer_pools_client_active_connections")
            .is_empty()
    );
    assert!(s.all("pgbouncer_pool_usage_ratio").is_empty());
    assert_eq!(
        s.value("autotuner_collector_up", &[("collector", "pgbouncer/own")]),
        Some(1.0)
    );
    // /metrics keeps serving, about as fast: a generous bound on behaviour, not a speed test.
    let during = common::scrape_median(&app, 21).await;
    assert!(
        during <= before * 3 + Duration::from_millis(50),
        "median scrape {before:?} with PgBouncer up, {during:?} with it down"
    );
    drop(client);
    // Down for several intervals: still logged once, not once per interval.
    tokio::time::sleep(Duration::from_secs(3)).await;

    bouncer.launch();
    let client = pg_connect(&bouncer.client_url).await;
    client.simple_query("SELECT 1").await.unwrap();
    let s = app
        .scrape_until(Duration::from_secs(10), "the pool back", pooled)
        .await;
    assert_eq!(err(&s, "connect"), Some(0.0));
    let log = app.log.lock().unwrap().join("\n");
    let count = |needle: &str| log.lines().filter(|l| l.contains(needle)).count();
    // One line per change: the dead connection may be noticed as an error before the refused
    // reconnection, never a line per interval.
    let down = log.lines().filter(|l| l.contains("PgBouncer unreachable"));
    assert_eq!(
        down.clone()
            .filter(|l| l.contains("\"reason\":\"connect\""))
            .count(),
        1,
        "{log}"
    );
    assert!(down.count() <= 2, "{log}");
    assert_eq!(count("PgBouncer reachable again"), 1, "{log}");
    let password = url::Url::parse(&bouncer.admin_url).unwrap();
    assert!(!log.contains(password.password().unwrap()), "{log}");
}

fn pg_config(url: &str, window: f64) -> String {
    format!(
        "collectors:\n  postgres:\n    interval: 1s\n    timeout: 800ms\n    window: {window}s\ntargets:\n  postgres:\n    - name: main\n      url: '{url}'\n"
    )
}

const MAIN: [(&str, &str); 1] = [("target", "main")];

/// The server's own figures for what `pg_active_*` measure: client backends other than the
/// autotuner's and the asking one.
async fn active_figures(c: &tokio_postgres::Client, slow: f64, sleeper: i32) -> (f64, f64, f64) {
    let row = c
        .query_one(
            "SELECT COALESCE(max(EXTRACT(EPOCH FROM clock_timestamp() - query_start)) FILTER (WHERE state = 'active'), 0)::float8, \
             count(*) FILTER (WHERE state = 'active' AND clock_timestamp() - query_start > make_interval(secs => $1))::float8, \
             COALESCE(max(EXTRACT(EPOCH FROM clock_timestamp() - query_start)) FILTER (WHERE pid = $2 AND state = 'active'), 0)::float8 \
             FROM pg_stat_activity \
             WHERE backend_type = 'client backend' AND pid <> pg_backend_pid() AND application_name IS DISTINCT FROM 'autotuner'",
            &[&slow, &sleeper],
        )
        .await
        .unwrap();
    (row.get(0), row.get(1), row.get(2))
}

/// Server figures just before and just after a scrape; the collection in the scrape lies
/// between one interval (plus slack for a loaded machine) before the first and the second.
/// Durations only grow while the same queries run, so the published longest duration lies
/// between the first figure less that lag and the second; the slow count, when both figures
/// agree, is that count.
async fn check_active(app: &Autotuner, c: &tokio_postgres::Client, slow: f64, sleeper: i32) {
    let mut last = String::from("the server's active queries never held still across a scrape");
    for _ in 0..5 {
        let (max1, slow1, mine1) = active_figures(c, slow, sleeper).await;
        let s = app.scrape().await;
        let (max2, slow2, mine2) = active_figures(c, slow, sleeper).await;
        if slow1 != slow2 || (mine1 > 0.0) != (mine2 > 0.0) {
            continue;
        }
        let published = s
            .value("pg_active_query_max_duration_seconds", &MAIN)
            .unwrap();
        assert!(
            published >= max1 - LAG && published >= mine1 - LAG && published <= max2 + 1e-3,
            "published {published}s; the server said {max1}s then {max2}s (ours {mine1}s)"
        );
        // Another client's query may have crossed the threshold between the collection and
        // the first figure: try again rather than accept a different count.
        let published = s.value("pg_active_slow_queries", &MAIN);
        if published == Some(slow1) {
            return;
        }
        last = format!("published {published:?} slow queries, the server says {slow1}");
    }
    panic!("{last}");
}

/// How long before a scrape the collection it shows may have run: one interval, plus slack
/// for a loaded machine.
const LAG: f64 = 2.5;

#[tokio::test]
async fn the_longest_active_query_and_the_slow_count_match_pg_stat_activity() {
    let Some(env) = PgEnv::get() else { return };
    let (app, _dir) = start_with(&pg_config(&env.monitor_url, 6.0)).await;
    let s = app
        .scrape_until(Duration::from_secs(5), "activity", |s| {
            s.value("pg_active_query_max_duration_seconds", &MAIN)
                .is_some()
        })
        .await;
    let slow = s.value("pg_slow_query_threshold_seconds", &MAIN).unwrap();
    let checker = pg_connect(&env.url).await;
    let sleeper = pg_connect(&format!("{}?application_name=signals_sleeper", env.url)).await;
    let pid: i32 = sleeper
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0);
    let sleeping = tokio::spawn(async move {
        let _ = sleeper.simple_query("SELECT pg_sleep(120)").await;
    });
    // Old enough that a figure in milliseconds, or one of a query just started, cannot pass.
    let deadline = Instant::now() + Duration::from_secs(20);
    while active_figures(&checker, slow, pid).await.2 < 4.0 {
        assert!(Instant::now() < deadline, "the sleeper never ran");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    check_active(&app, &checker, slow, pid).await;
    let published = app
        .scrape()
        .await
        .value("pg_active_query_max_duration_seconds", &MAIN)
        .unwrap();
    assert!(published > 1.0, "{published}");

    checker
        .query_one("SELECT pg_cancel_backend($1)", &[&pid])
        .await
        .unwrap();
    sleeping.await.unwrap();
    tokio::time::sleep(Duration::from_secs_f64(LAG)).await;
    check_active(&app, &checker, slow, pid).await;
}

/// The `pg_stat_database` columns published as `pg_stat_database_<column>`.
const COLUMNS: [&str; 14] = [
    "numbackends",
    "xact_commit",
    "xact_rollback",
    "blks_read",
    "blks_hit",
    "tup_returned",
    "tup_fetched",
    "tup_inserted",
    "tup_updated",
    "tup_deleted",
    "conflicts",
    "temp_files",
    "temp_bytes",
    "deadlocks",
];

/// The server's row for `db`, once two readings agree (a backend's statistics reach the
/// shared counters when it flushes them).
async fn stable_row(c: &tokio_postgres::Client, db: &str) -> Vec<f64> {
    let sql = format!(
        "SELECT {} FROM pg_stat_database WHERE datname = $1",
        COLUMNS.map(|c| format!("{c}::float8")).join(", ")
    );
    let read = || async {
        let row = c.query_one(&sql, &[&db]).await.unwrap();
        (0..COLUMNS.len()).map(|i| row.get(i)).collect::<Vec<f64>>()
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut last = read().await;
    loop {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let now = read().await;
        if now == last {
            return now;
        }
        assert!(Instant::now() < deadline, "{db}'s statistics never settled");
        last = now;
    }
}

fn published_row(s: &Scrape, db: &str) -> Vec<Option<f64>> {
    COLUMNS
        .iter()
        .map(|c| {
            s.value(
                &format!("pg_stat_database_{c}"),
                &[("target", "main"), ("datname", db)],
            )
        })
        .collect()
}

#[tokio::test]
async fn stat_database_counters_and_the_hit_ratio_match_the_servers_row() {
    let Some(env) = PgEnv::get() else { return };
    let db = format!("autotuner_signals_{}", std::process::id());
    let admin = pg_connect(&env.url).await;
    admin
        .batch_execute(&format!("DROP DATABASE IF EXISTS {db} WITH (FORCE)"))
        .await
        .unwrap();
    admin
        .batch_execute(&format!("CREATE DATABASE {db}"))
        .await
        .unwrap();
    let mut db_url = url::Url::parse(&env.url).unwrap();
    db_url.set_path(&format!("/{db}"));
    let db_url = db_url.to_string();
    let setup = pg_connect(&db_url).await;
    setup
        .batch_execute(
            "CREATE TABLE t (id int, v text) WITH (autovacuum_enabled = off); \
             INSERT INTO t SELECT g, md5(g::text) FROM generate_series(1, 5000) g",
        )
        .await
        .unwrap();
    drop(setup);
    let deadline = Instant::now() + Duration::from_secs(20);
    while stable_row(&admin, &db).await[0] != 0.0 {
        assert!(Instant::now() < deadline, "the setup connection never left");
    }
    let window = 10.0;
    let (app, _dir) = start_with(&pg_config(&env.monitor_url, window)).await;
    let on_db = [("target", "main"), ("datname", db.as_str())];
    let as_published = |row: &[f64]| row.iter().map(|v| Some(*v)).collect::<Vec<_>>();
    // Nobody uses the database now, so every reading in the collector's window is the same row
    // once a window and the lag have passed: the published figures must be the server's, and a
    // window that needed no block has no ratio. Autovacuum may still connect to it (about once a
    // minute); a visit during the wait means waiting again.
    let deadline = Instant::now() + Duration::from_secs(60);
    let quiet = loop {
        let first = stable_row(&admin, &db).await;
        tokio::time::sleep(Duration::from_secs_f64(window + LAG)).await;
        let s = app.scrape().await;
        let last = stable_row(&admin, &db).await;
        if first == last {
            assert_eq!(published_row(&s, &db), as_published(&last));
            assert_eq!(s.value("pg_buffer_cache_hit_ratio", &on_db), None);
            break last;
        }
        assert!(Instant::now() < deadline, "{db} never held still");
    };

    // Work of every kind, by two sessions that stay connected (idle) once their statistics are
    // flushed.
    let writer = pg_connect(&db_url).await;
    writer
        .batch_execute(
            "INSERT INTO t SELECT g, md5(g::text) FROM generate_series(5001, 9000) g; \
             UPDATE t SET v = upper(v) WHERE id <= 100; DELETE FROM t WHERE id > 8900; \
             BEGIN; INSERT INTO t VALUES (0, 'rolled back'); ROLLBACK; \
             SELECT pg_stat_force_next_flush()",
        )
        .await
        .unwrap();
    let reader = pg_connect(&db_url).await;
    reader
        .batch_execute(
            "SELECT count(*) FROM t; SELECT count(*) FROM t WHERE v LIKE 'a%'; \
             SET work_mem = '64kB'; SELECT v FROM t ORDER BY v DESC; \
             SELECT pg_stat_force_next_flush()",
        )
        .await
        .unwrap();
    // The server's row as it stands when a collection has published it (an autovacuum visit
    // after the work moves both alike).
    let deadline = Instant::now() + Duration::from_secs(5);
    let (worked, s) = loop {
        let worked = stable_row(&admin, &db).await;
        let s = app.scrape().await;
        if published_row(&s, &db) == as_published(&worked) {
            break (worked, s);
        }
        assert!(
            Instant::now() < deadline,
            "published {:?}, the server says {worked:?}",
            published_row(&s, &db)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let delta = |c: &str| {
        let i = COLUMNS.iter().position(|x| *x == c).unwrap();
        worked[i] - quiet[i]
    };
    assert_eq!(worked[0], 2.0, "two sessions connected");
    for c in [
        "xact_commit",
        "xact_rollback",
        "blks_read",
        "blks_hit",
        "tup_inserted",
        "tup_updated",
        "tup_deleted",
        "temp_files",
    ] {
        assert!(
            delta(c) > 0.0,
            "{c} did not move: the test would not test it"
        );
    }
    let (hit, read) = (delta("blks_hit"), delta("blks_read"));
    let expected = hit / (hit + read);
    let since_creation = worked[4] / (worked[4] + worked[3]);
    assert!(
        (expected - since_creation).abs() > 1e-6,
        "the window's ratio must differ from the ratio since the database's creation"
    );
    let ratio = s.value("pg_buffer_cache_hit_ratio", &on_db).unwrap();
    assert!(
        (ratio - expected).abs() < 1e-9,
        "published {ratio}; the server's counters say {hit} hits and {read} reads over the window: {expected}"
    );
    drop((writer, reader));
    admin
        .batch_execute(&format!("DROP DATABASE {db} WITH (FORCE)"))
        .await
        .unwrap();
}
