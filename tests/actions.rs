//! The actions stage against real services: each executor on the provisioned PostgreSQL, a
//! throw-away Redis, an HTTP server started here and a real Alertmanager; and the gate, run by
//! the real runner with its audit log on disk (cooldown under oscillation, the breaker,
//! dry_run). Requests are handed to the runner as the rule engine would hand them.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use autotuner::actions::exec::{self, Services};
use autotuner::actions::runner::Actions;
use autotuner::actions::{ActionRequest, ActionSpec, Event, Mode};
use autotuner::audit::Record;
use autotuner::registry::Registry;
use autotuner::sample::Labels;
use autotuner::settings::Target;
use autotuner::settings::config::{ActionsConfig, GlobalMode, KnobDecl};
use autotuner::settings::secret::SecretUrl;
use autotuner::targets::{PgHandle, RedisHandle};
use common::{PgEnv, RedisServer, pg_connect};

fn target(name: &str, url: &str) -> Target {
    Target {
        name: name.into(),
        url: SecretUrl::parse(url).unwrap(),
        tls_ca_file: None,
    }
}

fn services(pg: Option<&str>, redis: Option<&str>) -> Services {
    let mut s = Services {
        http: reqwest::Client::new(),
        ..Services::default()
    };
    if let Some(url) = pg {
        s.postgres.insert(
            "default".into(),
            PgHandle::new(
                &target("default", url),
                Duration::from_secs(30),
                Duration::from_secs(5),
                1,
            )
            .unwrap(),
        );
    }
    if let Some(url) = redis {
        s.redis.insert(
            "default".into(),
            RedisHandle::new(&target("default", url), Duration::from_secs(5)).unwrap(),
        );
    }
    s
}

fn spec(yaml: &str) -> ActionSpec {
    serde_yaml::from_str(yaml).unwrap()
}

fn request(rule: &str, mode: Mode, actions: Vec<ActionSpec>) -> ActionRequest {
    ActionRequest {
        rule: rule.into(),
        labels: Labels::new([("severity", "warning")]),
        value: 0.9,
        event: Event::Firing,
        episode_ms: 1,
        mode: Some(mode),
        cooldown: Duration::ZERO,
        allow_destructive: true,
        actions,
        verify: None,
        annotations: BTreeMap::from([("summary".into(), "test {{ $value }}".into())]),
        rule_version: "v1".into(),
        at_ms: 1,
        actor: "engine".into(),
    }
}

fn config() -> ActionsConfig {
    ActionsConfig {
        mode: GlobalMode::Enforce,
        timeout: Duration::from_secs(20),
        global_limit: None,
        target_limit: None,
        kind_limits: BTreeMap::new(),
        breaker_max_actions: 100,
        breaker_window: Duration::from_secs(3600),
        exec_allow: vec![],
        audit_max_bytes: 1 << 20,
        audit_keep: 2,
        alert_resend: Duration::from_secs(60),
    }
}

fn records(dir: &std::path::Path) -> Vec<Record> {
    let text = std::fs::read_to_string(dir.join("audit.jsonl")).unwrap_or_default();
    text.lines()
        .map(|l| {
            serde_json::from_str(l).unwrap_or_else(|e| panic!("unparsable audit line {l:?}: {e}"))
        })
        .collect()
}

fn decisions(dir: &std::path::Path) -> Vec<String> {
    records(dir)
        .into_iter()
        .filter(|r| r.phase != "intent")
        .map(|r| r.decision)
        .collect()
}

async fn redis_conn(url: &str) -> redis::aio::MultiplexedConnection {
    redis::Client::open(url)
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap()
}

/// A unique name for this test's tables.
fn unique(prefix: &str) -> String {
    format!(
        "{prefix}_{}_{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .subsec_nanos()
    )
}

#[tokio::test]
async fn redis_evict_removes_only_matching_keys_and_stops_at_its_bound() {
    let Some(server) = RedisServer::start(&[]) else {
        return;
    };
    let mut c = redis_conn(&server.url()).await;
    let mut pipe = redis::pipe();
    for i in 0..3000 {
        pipe.cmd("SET").arg(format!("cache:{i}")).arg(i).ignore();
        pipe.cmd("SET").arg(format!("session:{i}")).arg(i).ignore();
    }
    let _: () = pipe.query_async(&mut c).await.unwrap();
    let s = services(None, Some(&server.url()));

    let ActionSpec::RedisEvict(a) = spec("redis_evict: {match: 'cache:*', max_keys: 1000}") else {
        panic!()
    };
    let out = exec::redis_evict(&s, &a).await.unwrap();
    assert_eq!(out.result["deleted"], 1000, "{out:?}");
    assert_eq!(out.result["stopped"], "max_keys");
    let cache: Vec<String> = redis::cmd("KEYS")
        .arg("cache:*")
        .query_async(&mut c)
        .await
        .unwrap();
    let session: Vec<String> = redis::cmd("KEYS")
        .arg("session:*")
        .query_async(&mut c)
        .await
        .unwrap();
    assert_eq!(cache.len(), 2000);
    assert_eq!(
        session.len(),
        3000,
        "keys outside the pattern are never touched"
    );

    // Unbounded enough: the rest goes, and still nothing else.
    let ActionSpec::RedisEvict(a) = spec("redis_evict: {match: 'cache:*', max_keys: 100000}")
    else {
        panic!()
    };
    let out = exec::redis_evict(&s, &a).await.unwrap();
    assert_eq!(out.result["deleted"], 2000);
    assert_eq!(out.result["stopped"], "complete");
    assert_eq!(out.before["keys"], 5000);
    assert_eq!(out.after["keys"], 3000);

    // A time budget of 1 ms stops after a few SCAN calls (each is two round trips): bounded however many keys match.
    let mut pipe = redis::pipe();
    for i in 0..20_000 {
        pipe.cmd("SET").arg(format!("cache:{i}")).arg(i).ignore();
    }
    let _: () = pipe.query_async(&mut c).await.unwrap();
    let ActionSpec::RedisEvict(a) =
        spec("redis_evict: {match: 'cache:*', max_keys: 100000, time_budget: 1ms}")
    else {
        panic!()
    };
    let out = exec::redis_evict(&s, &a).await.unwrap();
    assert_eq!(out.result["stopped"], "time_budget", "{out:?}");
    assert!(out.result["deleted"].as_u64().unwrap() < 20_000);

    let purge = exec::redis_memory_purge(&s, None).await.unwrap();
    assert!(purge.before["used_memory_rss"].as_u64().unwrap() > 0);
}

#[tokio::test]
async fn cache_warm_writes_exactly_the_rows_of_a_real_query_with_the_ttl() {
    let (Some(env), Some(server)) = (PgEnv::get(), RedisServer::start(&[])) else {
        return;
    };
    let table = unique("products");
    let db = pg_connect(&env.url).await;
    db.batch_execute(&format!(
        "CREATE TABLE {table} (id int PRIMARY KEY, name text, views int, price numeric);
         INSERT INTO {table} SELECT g, 'p' || g, g % 100, g * 1.5 FROM generate_series(1, 500) g;"
    ))
    .await
    .unwrap();
    let s = services(Some(&env.url), Some(&server.url()));
    let ActionSpec::CacheWarm(a) = spec(&format!(
        "cache_warm: {{query: 'SELECT id, name, price FROM {table} WHERE views >= 90 ORDER BY id', key: 'product:{{{{ id }}}}', ttl: 10m}}"
    )) else {
        panic!()
    };
    let out = exec::cache_warm(&s, &a).await.unwrap();
    db.batch_execute(&format!("DROP TABLE {table}"))
        .await
        .unwrap();
    assert_eq!(out.result["rows"], 50, "{out:?}");
    assert_eq!(out.result["written"], 50);
    let mut c = redis_conn(&server.url()).await;
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg("product:*")
        .query_async(&mut c)
        .await
        .unwrap();
    assert_eq!(keys.len(), 50);
    let v: String = redis::cmd("GET")
        .arg("product:190")
        .query_async(&mut c)
        .await
        .unwrap();
    let row: serde_json::Value = serde_json::from_str(&v).unwrap();
    assert_eq!(row["name"], "p190");
    assert_eq!(row["price"], 285.0);
    let ttl: i64 = redis::cmd("TTL")
        .arg("product:190")
        .query_async(&mut c)
        .await
        .unwrap();
    assert!((590..=600).contains(&ttl), "ttl {ttl}");
    let none: Option<String> = redis::cmd("GET")
        .arg("product:189")
        .query_async(&mut c)
        .await
        .unwrap();
    assert_eq!(none, None, "rows outside the query are not written");
}

#[tokio::test]
async fn pg_terminate_idle_ends_only_the_matching_idle_connections_and_none_of_ours() {
    let Some(env) = PgEnv::get() else {
        return;
    };
    let app = unique("app");
    let connect = |name: String, url: String| async move {
        let mut cfg: tokio_postgres::Config = url.parse().unwrap();
        cfg.application_name(&name);
        let (client, conn) = cfg.connect(tokio_postgres::NoTls).await.unwrap();
        let handle = tokio::spawn(conn);
        (client, handle)
    };
    // Two idle victims, one idle in a transaction (excluded: in_transaction is off), one
    // of another application, and the autotuner's own collector-style connection.
    let (_v1, h1) = connect(app.clone(), env.url.clone()).await;
    let (_v2, h2) = connect(app.clone(), env.url.clone()).await;
    let (tx_client, h3) = connect(app.clone(), env.url.clone()).await;
    tx_client.batch_execute("BEGIN; SELECT 1").await.unwrap();
    let (_other, h4) = connect("bystander".into(), env.url.clone()).await;
    let (_ours, h5) = connect("autotuner".into(), env.url.clone()).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;

    let s = services(Some(&env.url), None);
    let ActionSpec::PgTerminateIdle(a) = spec(&format!(
        "pg_terminate_idle: {{idle_for: 1s, application: {app}}}"
    )) else {
        panic!()
    };
    let out = exec::pg_terminate_idle(&s, &a).await.unwrap();
    assert_eq!(out.result["terminated"], 2, "{out:?}");
    // The victims' connections end; the others stay open.
    let deadline = Instant::now() + Duration::from_secs(5);
    while !(h1.is_finished() && h2.is_finished()) {
        assert!(
            Instant::now() < deadline,
            "terminated connections still open"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(!h3.is_finished() && !h4.is_finished() && !h5.is_finished());
    tx_client.batch_execute("COMMIT").await.unwrap();

    // With in_transaction, an idle-in-transaction session of the application goes too, and
    // an unfiltered sweep still spares the autotuner's own.
    tx_client.batch_execute("BEGIN; SELECT 1").await.unwrap();
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let ActionSpec::PgTerminateIdle(a) = spec(&format!(
        "pg_terminate_idle: {{idle_for: 1s, in_transaction: true, application: {app}}}"
    )) else {
        panic!()
    };
    let out = exec::pg_terminate_idle(&s, &a).await.unwrap();
    assert_eq!(out.result["terminated"], 1, "{out:?}");
    let ActionSpec::PgTerminateIdle(a) = spec("pg_terminate_idle: {idle_for: 1h}") else {
        panic!()
    };
    exec::pg_terminate_idle(&s, &a).await.unwrap();
    assert!(!h5.is_finished(), "never the autotuner's own connections");
}

#[tokio::test]
async fn retention_delete_removes_only_old_rows_in_batches() {
    let Some(env) = PgEnv::get() else {
        return;
    };
    let table = unique("events");
    let db = pg_connect(&env.url).await;
    db.batch_execute(&format!(
        "CREATE TABLE {table} (id serial, created_at timestamptz NOT NULL);
         INSERT INTO {table} (created_at) SELECT now() - interval '40 days' FROM generate_series(1, 2500);
         INSERT INTO {table} (created_at) SELECT now() - interval '1 day' FROM generate_series(1, 700);"
    ))
    .await
    .unwrap();
    let s = services(Some(&env.url), None);
    let count = |q: String| {
        let db = &db;
        async move { db.query_one(&q, &[]).await.unwrap().get::<_, i64>(0) }
    };
    // A row budget of 1,500: stops there, in batches of 400.
    let ActionSpec::RetentionDelete(a) = spec(&format!(
        "retention_delete: {{table: {table}, column: created_at, older_than: 30d, batch_size: 400, pause: 10ms, max_rows: 1500}}"
    )) else {
        panic!()
    };
    let out = exec::retention_delete(&s, &a).await.unwrap();
    assert_eq!(out.result["deleted"], 1500, "{out:?}");
    assert_eq!(out.result["batches"], 4);
    assert_eq!(out.result["stopped"], "max_rows");
    let ActionSpec::RetentionDelete(a) = spec(&format!(
        "retention_delete: {{table: public.{table}, column: created_at, older_than: 30d, batch_size: 400, max_rows: 100000}}"
    )) else {
        panic!()
    };
    let out = exec::retention_delete(&s, &a).await.unwrap();
    assert_eq!(out.result["deleted"], 1000);
    assert_eq!(out.result["stopped"], "complete");
    let old = count(format!(
        "SELECT count(*) FROM {table} WHERE created_at < now() - interval '30 days'"
    ))
    .await;
    let new = count(format!("SELECT count(*) FROM {table}")).await;
    db.batch_execute(&format!("DROP TABLE {table}"))
        .await
        .unwrap();
    assert_eq!((old, new), (0, 700), "only old rows go");
}

#[tokio::test]
async fn sql_runs_with_parameters_and_obeys_its_timeout() {
    let Some(env) = PgEnv::get() else {
        return;
    };
    let table = unique("t");
    let db = pg_connect(&env.url).await;
    db.batch_execute(&format!("CREATE TABLE {table} (k text, v int)"))
        .await
        .unwrap();
    let s = services(Some(&env.url), None);
    let mut req = request("R", Mode::Enforce, vec![]);
    req.labels = Labels::new([("target", "cache-1")]);
    let ActionSpec::Sql(a) = spec(&format!(
        "sql: {{query: 'INSERT INTO {table} VALUES ($1, $2::int)', params: ['{{{{ $labels.target }}}}', '42']}}"
    )) else {
        panic!()
    };
    let out = exec::sql(&s, &a, &req).await.unwrap();
    assert_eq!(out.result["rows"], 1);
    let row = db
        .query_one(&format!("SELECT k, v FROM {table}"), &[])
        .await
        .unwrap();
    assert_eq!(
        (row.get::<_, String>(0), row.get::<_, i32>(1)),
        ("cache-1".into(), 42)
    );

    let ActionSpec::Sql(a) = spec("sql: {query: 'SELECT pg_sleep(5)', timeout: 300ms}") else {
        panic!()
    };
    let started = Instant::now();
    let err = exec::sql(&s, &a, &req).await.unwrap_err();
    assert!(err.contains("statement timeout"), "{err}");
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "cut by the server, not waited out"
    );
    db.batch_execute(&format!("DROP TABLE {table}"))
        .await
        .unwrap();
}

/// A local HTTP server answering with `statuses` in turn (the last one repeated), after
/// `delay`, counting requests and keeping their bodies.
async fn http_server(
    statuses: Vec<u16>,
    delay: Duration,
) -> (
    String,
    Arc<AtomicUsize>,
    Arc<std::sync::Mutex<Vec<serde_json::Value>>>,
) {
    use axum::routing::post;
    let hits = Arc::new(AtomicUsize::new(0));
    let bodies = Arc::new(std::sync::Mutex::new(Vec::new()));
    let (h, b) = (hits.clone(), bodies.clone());
    let app = axum::Router::new().route(
        "/hook",
        post(move |body: axum::Json<serde_json::Value>| {
            let (h, b, statuses) = (h.clone(), b.clone(), statuses.clone());
            async move {
                let n = h.fetch_add(1, Ordering::SeqCst);
                b.lock().unwrap().push(body.0);
                tokio::time::sleep(delay).await;
                let code = statuses[n.min(statuses.len() - 1)];
                axum::http::StatusCode::from_u16(code).unwrap()
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/hook", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    (url, hits, bodies)
}

#[tokio::test]
async fn webhook_retries_a_failing_endpoint_and_gives_up_within_its_budget() {
    let s = services(None, None);
    let req = request("HighMemory", Mode::Enforce, vec![]);

    let (url, hits, _) = http_server(vec![500], Duration::ZERO).await;
    let ActionSpec::Webhook(w) = spec(&format!(
        "webhook: {{url: '{url}', retries: 2, timeout: 1s}}"
    )) else {
        panic!()
    };
    let started = Instant::now();
    let err = exec::webhook(&s, &w, &req).await.unwrap_err();
    assert_eq!(
        hits.load(Ordering::SeqCst),
        3,
        "one attempt and two retries"
    );
    assert!(
        err.contains("3 attempts failed") && err.contains("HTTP 500"),
        "{err}"
    );
    assert!(started.elapsed() < Duration::from_secs(3));

    // A hung endpoint costs one timeout per attempt, then it gives up.
    let (url, hits, _) = http_server(vec![200], Duration::from_secs(30)).await;
    let ActionSpec::Webhook(w) = spec(&format!(
        "webhook: {{url: '{url}', retries: 1, timeout: 300ms}}"
    )) else {
        panic!()
    };
    let started = Instant::now();
    exec::webhook(&s, &w, &req).await.unwrap_err();
    assert_eq!(hits.load(Ordering::SeqCst), 2);
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );

    // Failing twice, then answering: success on the third attempt, with the templated body.
    let (url, hits, bodies) = http_server(vec![503, 503, 204], Duration::ZERO).await;
    let ActionSpec::Webhook(w) = spec(&format!(
        "webhook: {{url: '{url}', retries: 3, body: {{text: 'memory at {{{{ $value }}}} ({{{{ $labels.severity }}}})'}}}}"
    )) else {
        panic!()
    };
    let out = exec::webhook(&s, &w, &req).await.unwrap();
    assert_eq!(out.result["attempts"], 3);
    assert_eq!(hits.load(Ordering::SeqCst), 3);
    let body = bodies.lock().unwrap()[2].clone();
    assert_eq!(body["text"], "memory at 0.9 (warning)");
    assert_eq!(body["rule"], "HighMemory");
    assert_eq!(body["event"], "firing");
}

#[tokio::test]
async fn an_oscillating_condition_acts_at_most_once_per_cooldown() {
    let data = tempfile::tempdir().unwrap();
    let (url, hits, _) = http_server(vec![200], Duration::ZERO).await;
    let registry = Registry::new(Duration::from_secs(600)).unwrap();
    let actions = Actions::new(
        config(),
        &[],
        services(None, None),
        Some(data.path()),
        None,
        &registry,
    )
    .unwrap();
    let cooldown = Duration::from_secs(3);
    // Fires and resolves every 250 ms for 7.5 s: a flapping metric. Each firing is a new
    // episode; only the cooldown stands between it and an action every time.
    let started = Instant::now();
    let mut episode = 0;
    while started.elapsed() < Duration::from_millis(7500) {
        episode += 1;
        let mut r = request(
            "Flappy",
            Mode::Enforce,
            vec![spec(&format!("webhook: {{url: '{url}'}}"))],
        );
        r.cooldown = cooldown;
        r.episode_ms = episode;
        actions.handle(r.clone()).await;
        tokio::time::sleep(Duration::from_millis(125)).await;
        r.event = Event::Resolved;
        actions.handle(r).await;
        tokio::time::sleep(Duration::from_millis(125)).await;
    }
    let n = hits.load(Ordering::SeqCst);
    // 7.5 s with a 3 s cooldown: at 0 s, ~3 s and ~6 s.
    assert!((2..=3).contains(&n), "{n} actions");
    let d = decisions(data.path());
    assert_eq!(d.iter().filter(|x| *x == "applied").count(), n);
    assert!(
        d.iter().filter(|x| *x == "skipped_cooldown").count() >= 20,
        "{d:?}"
    );
    let text = registry.render();
    assert!(
        text.contains(&format!(
            "autotuner_actions_total{{action=\"webhook\",decision=\"applied\",rule=\"Flappy\"}} {n}"
        )),
        "{text}"
    );
}

#[tokio::test]
async fn the_breaker_opens_after_k_ineffective_actions_and_waits_for_a_reset() {
    let data = tempfile::tempdir().unwrap();
    let (url, hits, _) = http_server(vec![200], Duration::ZERO).await;
    let registry = Registry::new(Duration::from_secs(600)).unwrap();
    let mut cfg = config();
    cfg.breaker_max_actions = 3;
    let actions = Actions::new(
        cfg,
        &[],
        services(None, None),
        Some(data.path()),
        None,
        &registry,
    )
    .unwrap();
    // Firing, then repeating while the condition never clears: each request acts, until the
    // third opens the breaker.
    for i in 0..6 {
        let mut r = request(
            "Stubborn",
            Mode::Enforce,
            vec![spec(&format!("webhook: {{url: '{url}'}}"))],
        );
        r.event = if i == 0 { Event::Firing } else { Event::Repeat };
        r.at_ms = 1000 + i;
        actions.handle(r).await;
    }
    assert_eq!(hits.load(Ordering::SeqCst), 3);
    let d = decisions(data.path());
    assert_eq!(
        d,
        [
            "applied",
            "applied",
            "applied",
            "breaker_opened",
            "skipped_breaker",
            "skipped_breaker",
            "skipped_breaker"
        ]
    );
    assert!(
        registry
            .render()
            .contains("autotuner_breaker_open{rule=\"Stubborn\"} 1")
    );
    assert_eq!(actions.open_breakers().len(), 1);

    // The breaker survives a restart of the stage…
    drop(actions);
    let registry = Registry::new(Duration::from_secs(600)).unwrap();
    let mut cfg = config();
    cfg.breaker_max_actions = 3;
    let actions = Actions::new(
        cfg,
        &[],
        services(None, None),
        Some(data.path()),
        None,
        &registry,
    )
    .unwrap();
    assert!(
        registry
            .render()
            .contains("autotuner_breaker_open{rule=\"Stubborn\"} 1")
    );
    let mut r = request(
        "Stubborn",
        Mode::Enforce,
        vec![spec(&format!("webhook: {{url: '{url}'}}"))],
    );
    r.event = Event::Repeat;
    r.at_ms = 2000;
    actions.handle(r.clone()).await;
    assert_eq!(hits.load(Ordering::SeqCst), 3);
    // …and a reset (recorded with its actor) lets the rule act again.
    assert_eq!(actions.reset_breaker("Stubborn", "test-operator").await, 1);
    r.at_ms = 2001;
    actions.handle(r).await;
    assert_eq!(hits.load(Ordering::SeqCst), 4);
    let recs = records(data.path());
    assert!(
        recs.iter().any(|r| r.phase == "api"
            && r.actor == "test-operator"
            && r.decision == "breaker_reset")
    );
    assert!(
        registry
            .render()
            .contains("autotuner_breaker_open{rule=\"Stubborn\"} 0")
    );
}

#[tokio::test]
async fn dry_run_changes_nothing_and_records_would_apply() {
    let Some(server) = RedisServer::start(&[]) else {
        return;
    };
    let mut c = redis_conn(&server.url()).await;
    for i in 0..100 {
        let _: () = redis::cmd("SET")
            .arg(format!("cache:{i}"))
            .arg(i)
            .query_async(&mut c)
            .await
            .unwrap();
    }
    let data = tempfile::tempdir().unwrap();
    let registry = Registry::new(Duration::from_secs(600)).unwrap();
    let knobs = [KnobDecl {
        name: "batch_size".into(),
        initial: 1000.0,
        min: 100.0,
        max: 5000.0,
        integer: true,
        redis_key: Some("app:batch_size".into()),
        redis_target: None,
        webhook: None,
    }];
    let actions = Actions::new(
        config(),
        &knobs,
        services(None, Some(&server.url())),
        Some(data.path()),
        None,
        &registry,
    )
    .unwrap();
    let r = request(
        "HighMemory",
        Mode::DryRun,
        vec![
            spec("redis_evict: {match: 'cache:*', max_keys: 1000}"),
            spec("knob: {name: batch_size, scale: 0.5}"),
        ],
    );
    actions.handle(r).await;
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg("cache:*")
        .query_async(&mut c)
        .await
        .unwrap();
    assert_eq!(keys.len(), 100, "nothing deleted");
    let mirrored: Option<String> = redis::cmd("GET")
        .arg("app:batch_size")
        .query_async(&mut c)
        .await
        .unwrap();
    assert_eq!(mirrored, None, "nothing mirrored");
    assert!(
        registry
            .render()
            .contains("autotuner_knob_value{knob=\"batch_size\"} 1000")
    );
    let recs = records(data.path());
    assert_eq!(recs.len(), 2, "{recs:?}");
    assert!(
        recs.iter()
            .all(|r| r.decision == "would_apply" && r.mode.as_deref() == Some("dry_run"))
    );
    // The rehearsal says what it would have done.
    assert_eq!(recs[1].before, serde_json::json!(1000.0));
    assert_eq!(recs[1].after, serde_json::json!(500.0));

    // The global kill switch caps an enforce rule to observe: recorded, nothing run.
    let mut cfg = config();
    cfg.mode = GlobalMode::Observe;
    let registry = Registry::new(Duration::from_secs(600)).unwrap();
    let observe = tempfile::tempdir().unwrap();
    let actions = Actions::new(
        cfg,
        &knobs,
        services(None, Some(&server.url())),
        Some(observe.path()),
        None,
        &registry,
    )
    .unwrap();
    actions
        .handle(request(
            "HighMemory",
            Mode::Enforce,
            vec![spec("redis_evict: {match: 'cache:*', max_keys: 1000}")],
        ))
        .await;
    assert_eq!(decisions(observe.path()), ["skipped_observe"]);
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg("cache:*")
        .query_async(&mut c)
        .await
        .unwrap();
    assert_eq!(keys.len(), 100);
}

#[tokio::test]
async fn destructive_actions_need_the_rules_permission_and_exec_its_allow_list() {
    let Some(server) = RedisServer::start(&[]) else {
        return;
    };
    let mut c = redis_conn(&server.url()).await;
    let _: () = redis::cmd("SET")
        .arg("cache:1")
        .arg(1)
        .query_async(&mut c)
        .await
        .unwrap();
    let data = tempfile::tempdir().unwrap();
    let registry = Registry::new(Duration::from_secs(600)).unwrap();
    let mut cfg = config();
    cfg.exec_allow = vec!["/bin/true".into()];
    let actions = Actions::new(
        cfg,
        &[],
        services(None, Some(&server.url())),
        Some(data.path()),
        None,
        &registry,
    )
    .unwrap();
    let mut r = request(
        "R",
        Mode::Enforce,
        vec![
            spec("redis_evict: {match: 'cache:*', max_keys: 10}"),
            spec("exec: {command: [/bin/echo, hi]}"),
        ],
    );
    r.allow_destructive = false;
    actions.handle(r.clone()).await;
    assert_eq!(
        decisions(data.path()),
        ["skipped_not_allowed", "skipped_not_allowed"]
    );
    r.allow_destructive = true;
    r.episode_ms = 2;
    actions.handle(r).await;
    let d = decisions(data.path());
    assert_eq!(
        &d[2..],
        ["applied", "failed"],
        "echo is not on the allow list"
    );
    let recs = records(data.path());
    assert!(
        recs.last()
            .unwrap()
            .error
            .as_deref()
            .unwrap()
            .contains("exec_allow")
    );
    let n: i64 = redis::cmd("EXISTS")
        .arg("cache:1")
        .query_async(&mut c)
        .await
        .unwrap();
    assert_eq!(n, 0);
}

#[tokio::test]
async fn a_broken_audit_log_stops_actions_but_nothing_else() {
    let (url, hits, _) = http_server(vec![200], Duration::ZERO).await;
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    std::fs::create_dir(&data).unwrap();
    let registry = Registry::new(Duration::from_secs(600)).unwrap();
    let actions = Actions::new(
        config(),
        &[],
        services(None, None),
        Some(&data),
        None,
        &registry,
    )
    .unwrap();
    // The audit file replaced by a directory: every write fails.
    std::fs::remove_file(data.join("audit.jsonl")).ok();
    std::fs::create_dir(data.join("audit.jsonl")).unwrap();
    // A fresh stage on that directory cannot open its log at all.
    let registry2 = Registry::new(Duration::from_secs(600)).unwrap();
    let broken = Actions::new(
        config(),
        &[],
        services(None, None),
        Some(&data),
        None,
        &registry2,
    )
    .unwrap();
    broken
        .handle(request(
            "R",
            Mode::Enforce,
            vec![spec(&format!("webhook: {{url: '{url}'}}"))],
        ))
        .await;
    assert_eq!(
        hits.load(Ordering::SeqCst),
        0,
        "an action that cannot be audited does not run"
    );
    let text = registry2.render();
    assert!(
        text.contains("autotuner_audit_write_errors_total 2"),
        "{text}"
    );
    assert!(text.contains("decision=\"skipped_audit\""), "{text}");
    // Once the path is writable again, actions resume.
    std::fs::remove_dir(data.join("audit.jsonl")).unwrap();
    let mut r = request(
        "R",
        Mode::Enforce,
        vec![spec(&format!("webhook: {{url: '{url}'}}"))],
    );
    r.episode_ms = 2;
    broken.handle(r).await;
    assert_eq!(hits.load(Ordering::SeqCst), 1);
    drop(actions);
}

#[tokio::test]
async fn alertmanager_shows_the_alert_while_firing_and_resolves_it() {
    let Some(am) =
        common::Alertmanager::start("route:\n  receiver: 'null'\nreceivers:\n  - name: 'null'\n")
            .await
    else {
        return;
    };
    let base = am.base.clone();
    let alerts = || am.active("CacheMissRatioHigh");
    let data = tempfile::tempdir().unwrap();
    let registry = Registry::new(Duration::from_secs(600)).unwrap();
    let actions = Actions::new(
        config(),
        &[],
        services(None, None),
        Some(data.path()),
        None,
        &registry,
    )
    .unwrap();
    let mut r = request(
        "CacheMissRatioHigh",
        Mode::Enforce,
        vec![spec(&format!("alertmanager: {{url: '{base}'}}"))],
    );
    r.episode_ms = autotuner::collect::now_ms() - 5000;
    actions.handle(r.clone()).await;
    let firing = alerts().await;
    assert_eq!(firing.len(), 1, "{firing:?}");
    assert_eq!(firing[0]["labels"]["severity"], "warning");
    assert_eq!(firing[0]["annotations"]["summary"], "test 0.9");
    assert_eq!(firing[0]["status"]["state"], "active");

    r.event = Event::Resolved;
    actions.handle(r).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let now = alerts().await;
        // A resolved alert leaves the list of current alerts.
        if now.is_empty() {
            break;
        }
        assert!(Instant::now() < deadline, "still listed: {now:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let recs = records(data.path());
    assert!(
        recs.iter()
            .any(|r| r.phase == "resolved" && r.decision == "applied"),
        "{recs:?}"
    );
}

#[tokio::test]
async fn a_knob_is_mirrored_and_its_controller_pauses_when_someone_else_changes_the_mirror() {
    let Some(server) = RedisServer::start(&[]) else {
        return;
    };
    let (hook, _hits, bodies) = http_server(vec![200], Duration::ZERO).await;
    let data = tempfile::tempdir().unwrap();
    let registry = Registry::new(Duration::from_secs(600)).unwrap();
    let knobs = [KnobDecl {
        name: "batch_size".into(),
        initial: 1000.0,
        min: 100.0,
        max: 5000.0,
        integer: true,
        redis_key: Some("app:batch_size".into()),
        redis_target: None,
        webhook: Some(hook),
    }];
    let actions = Actions::new(
        config(),
        &knobs,
        services(None, Some(&server.url())),
        Some(data.path()),
        None,
        &registry,
    )
    .unwrap();
    let mut c = redis_conn(&server.url()).await;
    let step = |episode: i64| {
        let mut r = request(
            "Grow",
            Mode::Enforce,
            vec![spec("knob: {name: batch_size, step: 100}")],
        );
        r.episode_ms = episode;
        r
    };
    actions.handle(step(1)).await;
    let mirrored: String = redis::cmd("GET")
        .arg("app:batch_size")
        .query_async(&mut c)
        .await
        .unwrap();
    assert_eq!(mirrored, "1100");
    let pushed = bodies.lock().unwrap().last().cloned().unwrap();
    assert_eq!(
        pushed,
        serde_json::json!({"knob": "batch_size", "value": 1100.0, "previous": 1000.0, "rule": "Grow"})
    );

    // Someone sets the key by hand: the next move is refused and the knob says it is paused.
    let _: () = redis::cmd("SET")
        .arg("app:batch_size")
        .arg("250")
        .query_async(&mut c)
        .await
        .unwrap();
    let out = actions.handle(step(2)).await;
    assert_eq!(out[0].decision, "skipped_manual_override", "{out:?}");
    assert!(
        out[0].error.as_deref().unwrap().contains("someone else"),
        "{out:?}"
    );
    let text = registry.render();
    assert!(
        text.contains("autotuner_knob_paused{knob=\"batch_size\"} 1"),
        "{text}"
    );
    assert!(
        text.contains("autotuner_knob_value{knob=\"batch_size\"} 1100"),
        "{text}"
    );
    let still: String = redis::cmd("GET")
        .arg("app:batch_size")
        .query_async(&mut c)
        .await
        .unwrap();
    assert_eq!(still, "250", "the operator's value is left alone");

    // The key back at our value: the controller resumes.
    let _: () = redis::cmd("SET")
        .arg("app:batch_size")
        .arg("1100")
        .query_async(&mut c)
        .await
        .unwrap();
    let out = actions.handle(step(3)).await;
    assert_eq!(out[0].decision, "applied", "{out:?}");
    assert!(
        registry
            .render()
            .contains("autotuner_knob_paused{knob=\"batch_size\"} 0")
    );
    let mirrored: String = redis::cmd("GET")
        .arg("app:batch_size")
        .query_async(&mut c)
        .await
        .unwrap();
    assert_eq!(mirrored, "1200");
}
