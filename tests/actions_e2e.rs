//! End to end through the real binary: the shipped rules, fed by the real collectors, end in
//! real corrective actions on the real services, every decision in the audit log; the knob
//! comes back after a restart; and a SIGKILL in the middle of a burst of actions leaves an
//! audit log in which every line parses and every executed action has its intent.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use autotuner::audit::Record;
use common::{Autotuner, PgEnv, RedisServer, pg_connect};

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// A shipped rule file with `edits` applied, each of which must match: if the shipped file
/// changes, this test says so instead of testing something else.
fn shipped(name: &str, edits: &[(&str, &str)]) -> String {
    let mut text = std::fs::read_to_string(root().join("rules").join(name)).unwrap();
    for (from, to) in edits {
        assert!(
            text.contains(from),
            "rules/{name} no longer contains {from:?}"
        );
        text = text.replace(from, to);
    }
    text
}

fn audit(dir: &Path) -> Vec<Record> {
    let text = std::fs::read_to_string(dir.join("audit.jsonl")).unwrap_or_default();
    text.lines()
        .map(|l| {
            serde_json::from_str(l).unwrap_or_else(|e| panic!("unparsable audit line {l:?}: {e}"))
        })
        .collect()
}

/// Every result has its intent, written before it; no intent is executed twice.
fn check_intents(records: &[Record]) {
    let mut intents: HashMap<&str, usize> = HashMap::new();
    for (i, r) in records.iter().enumerate() {
        let Some(key) = r.idempotency_key.as_deref() else {
            continue;
        };
        match r.phase.as_str() {
            "intent" => {
                assert!(
                    intents.insert(key, i).is_none(),
                    "intent {key} recorded twice"
                );
            }
            "result" => {
                let at = intents
                    .get(key)
                    .unwrap_or_else(|| panic!("result without intent: {r:?}"));
                assert!(*at < i);
            }
            _ => {}
        }
    }
}

async fn redis_conn(url: &str) -> redis::aio::MultiplexedConnection {
    redis::Client::open(url)
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap()
}

/// Keeps both cores busy until dropped: real CPU pressure for the host collector to see. It
/// holds the machine's CPUs exclusively (`common::CpuHold`) for as long, so no test that bounds
/// a duration, in this binary or another running in parallel, shares its window.
struct Burn(
    Arc<AtomicBool>,
    Vec<std::thread::JoinHandle<()>>,
    #[allow(dead_code, reason = "held, never read: dropping it releases the CPUs")] common::CpuHold,
);

impl Burn {
    fn start() -> Burn {
        let hold = common::CpuHold::exclusive();
        let stop = Arc::new(AtomicBool::new(false));
        let threads = (0..std::thread::available_parallelism().map_or(2, |n| n.get()))
            .map(|_| {
                let stop = stop.clone();
                std::thread::spawn(move || {
                    let mut x = 0u64;
                    while !stop.load(Ordering::Relaxed) {
                        x = std::hint::black_box(
                            x.wrapping_mul(6364136223846793005).wrapping_add(1),
                        );
                    }
                })
            })
            .collect();
        Burn(stop, threads, hold)
    }
}

impl Drop for Burn {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
        for t in self.1.drain(..) {
            let _ = t.join();
        }
    }
}

async fn wait_for<F, Fut>(limit: Duration, what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + limit;
    while !check().await {
        assert!(
            Instant::now() < deadline,
            "{what} not seen within {limit:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_documented_triggers_end_in_real_actions_on_the_real_services() {
    let (Some(env), Some(redis)) = (PgEnv::get(), RedisServer::start(&[])) else {
        return;
    };
    let mut c = redis_conn(&redis.url()).await;
    let mut pipe = redis::pipe();
    for i in 0..500 {
        pipe.cmd("SET").arg(format!("cache:{i}")).arg(i).ignore();
        pipe.cmd("SET").arg(format!("session:{i}")).arg(i).ignore();
    }
    let _: () = pipe.query_async(&mut c).await.unwrap();
    // The application's hot data, exposed to the cache rule as the documented view.
    let db = pg_connect(&env.url).await;
    db.batch_execute(
        "DROP VIEW IF EXISTS autotuner_cache_warm;
         DROP TABLE IF EXISTS e2e_products;
         CREATE TABLE e2e_products (id int PRIMARY KEY, name text, views int);
         INSERT INTO e2e_products SELECT g, 'product ' || g, g FROM generate_series(1, 300) g;
         CREATE VIEW autotuner_cache_warm (key, value) AS
           SELECT 'product:' || id, row_to_json(p)::text FROM e2e_products p ORDER BY views DESC LIMIT 100;
         DROP TABLE IF EXISTS e2e_orders;
         CREATE TABLE e2e_orders (id serial PRIMARY KEY, customer_id int NOT NULL, total numeric);
         INSERT INTO e2e_orders (customer_id, total)
           SELECT g % 5000, g * 0.01 FROM generate_series(1, 200000) g;
         ANALYZE e2e_orders;",
    )
    .await
    .unwrap();

    let rules = tempfile::tempdir().unwrap();
    // Memory: the machine has far more memory than the tests use, so the threshold is set just
    // above zero (and the hysteresis level below it); everything else is the shipped rule.
    std::fs::write(
        rules.path().join("memory.yml"),
        shipped(
            "memory.yml",
            &[
                ("interval: 5s", "interval: 1s"),
                (
                    "expr: host_memory_usage_ratio > 0.80",
                    "expr: host_memory_usage_ratio > 0.01",
                ),
                (
                    "clear: host_memory_usage_ratio < 0.70",
                    "clear: host_memory_usage_ratio < 0.001",
                ),
                ("for: 30s", "for: 1s"),
                (
                    "mode: dry_run",
                    "mode: enforce\n        allow_destructive: true",
                ),
            ],
        ),
    )
    .unwrap();
    // CPU: real pressure (every core busy); only the timing is compressed.
    std::fs::write(
        rules.path().join("batch_size.yml"),
        shipped(
            "batch_size.yml",
            &[
                ("interval: 15s", "interval: 1s"),
                ("repeat: 15s", "repeat: 1s"),
                ("down_stabilization: 30s", "down_stabilization: 2s"),
            ],
        ),
    )
    .unwrap();
    // Cache: a real burst of misses; timing compressed.
    std::fs::write(
        rules.path().join("cache.yml"),
        shipped(
            "cache.yml",
            &[
                ("interval: 5s", "interval: 1s"),
                ("for: 2m", "for: 1s"),
                ("mode: dry_run", "mode: enforce"),
            ],
        ),
    )
    .unwrap();
    // Slow statements: the shipped rule, timing compressed; the threshold (the collector's
    // slow_query_threshold) is lowered in the configuration below so that a scan of 200k rows
    // counts as slow on this machine.
    std::fs::write(
        rules.path().join("slow_queries.yml"),
        shipped(
            "slow_queries.yml",
            &[
                ("interval: 15s", "interval: 1s"),
                ("for: 1m", "for: 1s"),
                ("mode: dry_run", "mode: enforce"),
            ],
        ),
    )
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let config = common::write_config(
        &dir,
        &format!(
            "collectors:
  host: {{interval: 1s}}
  redis: {{interval: 1s, hit_ratio_window: 5s}}
  postgres: {{interval: 1s, window: 5s, slow_query_threshold: 5ms}}
targets:
  redis: [{{name: cache, url: '{redis}'}}]
  postgres: [{{name: main, url: '{pg}'}}]
knobs:
  batch_size: {{initial: 1000, min: 100, max: 2000, mirror: {{redis_key: 'app:batch_size', redis_target: cache}}}}
actions:
  breaker: {{max_actions: 1000, window: 1h}}
",
            redis = redis.url(),
            pg = env.url,
        ),
    );
    let args = [
        format!("--config.file={config}"),
        format!("--rules.dir={}", rules.path().display()),
        format!("--data.dir={}", data.display()),
    ];
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let app = Autotuner::start(&args, &[]).await_ready().await;

    // Memory above the threshold → MEMORY PURGE and the cache keys evicted, the rest kept.
    wait_for(Duration::from_secs(20), "cache:* evicted", || {
        let mut c = c.clone();
        async move {
            let n: Vec<String> = redis::cmd("KEYS")
                .arg("cache:*")
                .query_async(&mut c)
                .await
                .unwrap();
            n.is_empty()
        }
    })
    .await;
    let sessions: Vec<String> = redis::cmd("KEYS")
        .arg("session:*")
        .query_async(&mut c)
        .await
        .unwrap();
    assert_eq!(sessions.len(), 500);

    // CPU above 80 % → the batch size shrinks, mirrored to the application's Redis key.
    {
        let _burn = Burn::start();
        app.scrape_until(Duration::from_secs(30), "batch size below 1000", |s| {
            s.value("autotuner_knob_value", &[("knob", "batch_size")])
                .is_some_and(|v| v < 1000.0)
        })
        .await;
    }
    // The controller may move again (the load goes on) between reading the metric and the
    // mirror: read both until one reading of each agrees.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let value = app
            .scrape()
            .await
            .value("autotuner_knob_value", &[("knob", "batch_size")])
            .unwrap();
        assert!((100.0..1000.0).contains(&value), "{value}");
        let mirrored: String = redis::cmd("GET")
            .arg("app:batch_size")
            .query_async(&mut c)
            .await
            .unwrap();
        if mirrored.parse::<f64>().ok() == Some(value) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the mirror never agreed with the knob: {value} against {mirrored:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // Misses above 20 % with traffic → the view's rows written to Redis with their TTL.
    let mut pipe = redis::pipe();
    for i in 0..3000 {
        pipe.cmd("GET").arg(format!("missing:{i}"));
    }
    let _: Vec<Option<String>> = pipe.query_async(&mut c).await.unwrap();
    wait_for(Duration::from_secs(30), "product keys warmed", || {
        let mut c = c.clone();
        async move {
            let n: Vec<String> = redis::cmd("KEYS")
                .arg("product:*")
                .query_async(&mut c)
                .await
                .unwrap();
            n.len() == 100
        }
    })
    .await;
    let ttl: i64 = redis::cmd("TTL")
        .arg("product:300")
        .query_async(&mut c)
        .await
        .unwrap();
    assert!((500..=600).contains(&ttl), "{ttl}");
    let row: String = redis::cmd("GET")
        .arg("product:300")
        .query_async(&mut c)
        .await
        .unwrap();
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&row).unwrap()["name"],
        "product 300"
    );

    // Slow statements → ANALYZE and index advice naming the filtered column, proven with a
    // hypothetical index, on the API.
    for i in 0..15 {
        db.query(
            "SELECT count(*) FROM e2e_orders WHERE customer_id = $1",
            &[&(i * 7)],
        )
        .await
        .unwrap();
    }
    let http = common::client();
    let url = app.url("/api/v1/recommendations");
    wait_for(
        Duration::from_secs(40),
        "index advice for e2e_orders(customer_id)",
        || {
            let (http, url) = (http.clone(), url.clone());
            async move {
                let body: serde_json::Value =
                    http.get(&url).send().await.unwrap().json().await.unwrap();
                body["data"]["recommendations"].as_array().is_some_and(|l| {
                    l.iter().any(|r| {
                        r["table"] == "e2e_orders"
                            && r["columns"] == serde_json::json!(["customer_id"])
                            && r["verified"] == true
                            && r["saving_ratio"].as_f64().is_some_and(|x| x > 0.9)
                    })
                })
            }
        },
    )
    .await;

    // Every decision is on record, and the metrics count them. The advice reaches the API
    // while its action is still finishing: its result record can come a moment later.
    wait_for(
        Duration::from_secs(20),
        "the index advice's result recorded",
        || {
            let data = data.clone();
            async move {
                audit(&data).iter().any(|r| {
                    r.rule.as_deref() == Some("SlowQueries")
                        && r.action.as_deref() == Some("index_advice")
                        && r.phase == "result"
                })
            }
        },
    )
    .await;
    let records = audit(&data);
    check_intents(&records);
    let applied = |rule: &str, action: &str| {
        records.iter().any(|r| {
            r.rule.as_deref() == Some(rule)
                && r.action.as_deref() == Some(action)
                && r.phase == "result"
                && r.decision == "applied"
        })
    };
    assert!(applied("HighMemory", "redis_memory_purge"));
    assert!(applied("HighMemory", "redis_evict"));
    assert!(applied("BatchSizeController", "knob"));
    assert!(applied("CacheMissRatioHigh", "cache_warm"));
    assert!(applied("SlowQueries", "pg_analyze"));
    assert!(applied("SlowQueries", "index_advice"));
    let s = app.scrape().await;
    assert!(
        s.value(
            "autotuner_actions_total",
            &[
                ("rule", "HighMemory"),
                ("action", "redis_evict"),
                ("decision", "applied")
            ]
        )
        .unwrap()
            >= 1.0
    );
    assert_eq!(
        s.value("autotuner_audit_write_errors_total", &[]),
        Some(0.0)
    );

    // A restart brings the knob back with its last value (the controller's rule is taken out
    // first, so what the scrape shows is what was restored, not a new move).
    let last = s
        .value("autotuner_knob_value", &[("knob", "batch_size")])
        .unwrap();
    drop(app);
    std::fs::remove_file(rules.path().join("batch_size.yml")).unwrap();
    let app = Autotuner::start(&args, &[]).await_ready().await;
    let again = app
        .scrape()
        .await
        .value("autotuner_knob_value", &[("knob", "batch_size")]);
    assert_eq!(again, Some(last));
    db.batch_execute(
        "DROP VIEW autotuner_cache_warm; DROP TABLE e2e_products; DROP TABLE e2e_orders;",
    )
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sigkill_in_a_burst_of_actions_leaves_an_audit_log_that_accounts_for_everything() {
    use axum::routing::post;
    let hits = Arc::new(AtomicUsize::new(0));
    let h = hits.clone();
    let hook = axum::Router::new().route(
        "/hook",
        post(move || {
            let h = h.clone();
            async move {
                h.fetch_add(1, Ordering::SeqCst);
                // Long enough that the kill lands while some are running.
                tokio::time::sleep(Duration::from_millis(30)).await;
                "ok"
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/hook", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, hook).await });

    let rules = tempfile::tempdir().unwrap();
    let mut actions = String::new();
    for i in 0..8 {
        actions.push_str(&format!("          - webhook: {{url: '{url}?n={i}'}}\n"));
    }
    std::fs::write(
        rules.path().join("burst.yml"),
        format!(
            "groups:\n  - name: burst\n    interval: 1s\n    rules:\n      - name: Burst\n        expr: host_cpus > 0\n        repeat: 1s\n        mode: enforce\n        actions:\n{actions}"
        ),
    )
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let config = common::write_config(
        &dir,
        "collectors:\n  host: {interval: 1s}\nactions:\n  rate_limits: {global: {count: 10000, per: 1s}, per_target: {count: 10000, per: 1s}}\n  breaker: {max_actions: 100000, window: 1m}\n",
    );
    let args = [
        format!("--config.file={config}"),
        format!("--rules.dir={}", rules.path().display()),
        format!("--data.dir={}", data.display()),
    ];
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut app = Autotuner::start(&args, &[]).await_ready().await;
    let deadline = Instant::now() + Duration::from_secs(30);
    while hits.load(Ordering::SeqCst) < 20 {
        assert!(Instant::now() < deadline, "the burst did not start");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    app.child.kill().unwrap();
    app.child.wait().unwrap();

    let records = audit(&data);
    check_intents(&records);
    let results = records.iter().filter(|r| r.phase == "result").count();
    let intents = records.iter().filter(|r| r.phase == "intent").count();
    assert!(intents >= 20, "{intents}");
    // One target, one action in flight at a time: at most one intent without its result.
    assert!(
        intents - results <= 1,
        "{intents} intents, {results} results"
    );
    // Nothing ran without its intent on record first: the server saw at most one request per
    // intent.
    assert!(
        hits.load(Ordering::SeqCst) <= intents,
        "{} requests, {intents} intents",
        hits.load(Ordering::SeqCst)
    );

    // After a restart the log is still whole, and no intent on record runs again.
    let before = records.len();
    let app = Autotuner::start(&args, &[]).await_ready().await;
    let deadline = Instant::now() + Duration::from_secs(20);
    while audit(&data).len() < before + 16 {
        assert!(
            Instant::now() < deadline,
            "no new actions after the restart"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    drop(app);
    let records = audit(&data);
    check_intents(&records);
    let by_decision: BTreeMap<String, usize> = records.iter().fold(BTreeMap::new(), |mut m, r| {
        *m.entry(r.decision.clone()).or_default() += 1;
        m
    });
    assert!(!by_decision.contains_key("failed"), "{by_decision:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verification_records_whether_it_helped_and_reverts_a_knob_change_that_made_things_worse() {
    let rules = tempfile::tempdir().unwrap();
    // Both conditions are evaluated by the real evaluator over the real host metrics; which
    // way they come out is fixed by choosing conditions that always or never hold.
    std::fs::write(
        rules.path().join("verify.yml"),
        "groups:
  - name: verify
    interval: 1s
    rules:
      - name: Helps
        expr: host_cpus > 0
        mode: enforce
        actions:
          - knob: {name: workers, step: 2}
        verify: {after: 1s, expr: 'host_cpus > 0'}
      - name: Hurts
        expr: host_cpus > 0
        mode: enforce
        actions:
          - knob: {name: batch_size, step: 100}
        verify: {after: 1s, expr: 'host_cpus < 0', worse: 'host_cpus > 0'}
",
    )
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let config = common::write_config(
        &dir,
        "collectors:\n  host: {interval: 1s}\nknobs:\n  batch_size: {initial: 1000, min: 100, max: 2000}\n  workers: {initial: 4, min: 1, max: 16}\n",
    );
    let args = [
        format!("--config.file={config}"),
        format!("--rules.dir={}", rules.path().display()),
        format!("--data.dir={}", data.display()),
    ];
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let app = Autotuner::start(&args, &[]).await_ready().await;
    let s = app
        .scrape_until(Duration::from_secs(20), "both verifications", |s| {
            s.value(
                "autotuner_action_verifications_total",
                &[("rule", "Hurts"), ("outcome", "worsened")],
            ) == Some(1.0)
                && s.value(
                    "autotuner_action_verifications_total",
                    &[("rule", "Helps"), ("outcome", "effective")],
                ) == Some(1.0)
        })
        .await;
    // The change that helped stays; the one that hurt is undone.
    assert_eq!(
        s.value("autotuner_knob_value", &[("knob", "workers")]),
        Some(6.0)
    );
    assert_eq!(
        s.value("autotuner_knob_value", &[("knob", "batch_size")]),
        Some(1000.0)
    );
    // A verification is counted just before its audit record is written: the file is read
    // until both records are there.
    let verified = |records: &[Record], rule: &str| {
        records
            .iter()
            .any(|r| r.phase == "verification" && r.rule.as_deref() == Some(rule))
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let records = loop {
        let records = audit(&data);
        if (verified(&records, "Hurts") && verified(&records, "Helps"))
            || std::time::Instant::now() > deadline
        {
            break records;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let hurt = records
        .iter()
        .find(|r| r.phase == "verification" && r.rule.as_deref() == Some("Hurts"))
        .unwrap();
    assert_eq!(hurt.decision, "worsened");
    assert_eq!(hurt.result["reverted"][0]["from"], 1100.0);
    assert_eq!(hurt.result["reverted"][0]["to"], 1000.0);
    let helped = records
        .iter()
        .find(|r| r.phase == "verification" && r.rule.as_deref() == Some("Helps"))
        .unwrap();
    assert_eq!(helped.decision, "effective");
}
