//! The actions stage's safety promises, through the real binary against real services: a
//! playbook run that its client abandons still finishes, records its result and frees its
//! target; an action that hangs is cut at `actions.timeout` without holding anything else up;
//! no usable data directory or an unreadable state file means no actions, said at start and on
//! the status API; an operator's playbook runs never trip a breaker; a verification that does
//! not hold is recorded as `ineffective`; the shipped slow-query rule produces index advice in
//! `dry_run`.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use serde_json::Value;

use common::{Alertmanager, Autotuner, PgEnv};

const OPERATE: &str = "operator-token-safety-0123456789";

/// A unique name for this test's objects (tables, rules), so parallel test binaries never meet.
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

struct Rig {
    app: Autotuner,
    dir: tempfile::TempDir,
    data: PathBuf,
    rules: PathBuf,
    http: reqwest::Client,
}

impl Rig {
    /// The binary with `config`, `playbooks`, a rules directory holding `rules` (when not
    /// empty), an operate token, and a data directory of its own (or `data` when given).
    async fn start(config: &str, playbooks: &str, rules: &str, data: Option<&Path>) -> Rig {
        let rig = Self::spawn(config, playbooks, rules, data);
        rig.app.wait_ready().await;
        rig
    }

    fn spawn(config: &str, playbooks: &str, rules: &str, data: Option<&Path>) -> Rig {
        let dir = tempfile::tempdir().unwrap();
        let data = data.map_or_else(|| dir.path().join("data"), Path::to_path_buf);
        let rules_dir = dir.path().join("rules");
        std::fs::create_dir(&rules_dir).unwrap();
        if !rules.is_empty() {
            std::fs::write(rules_dir.join("r.yml"), rules).unwrap();
        }
        let config_path = common::write_config(&dir, config);
        let playbooks_path = dir.path().join("playbooks.yml");
        std::fs::write(
            &playbooks_path,
            if playbooks.is_empty() {
                "playbooks: {}\n"
            } else {
                playbooks
            },
        )
        .unwrap();
        let args = [
            format!("--config.file={config_path}"),
            format!("--rules.dir={}", rules_dir.display()),
            format!("--data.dir={}", data.display()),
            format!("--playbooks.file={}", playbooks_path.display()),
        ];
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let app = Autotuner::start(&args, &[("AUTOTUNER_OPERATE_TOKEN", OPERATE)]);
        Rig {
            app,
            dir,
            data,
            rules: rules_dir,
            http: common::client(),
        }
    }

    async fn post(&self, path: &str) -> (u16, Value) {
        let resp = self
            .http
            .post(self.app.url(path))
            .bearer_auth(OPERATE)
            .timeout(Duration::from_secs(120))
            .send()
            .await
            .unwrap();
        let status = resp.status().as_u16();
        let text = resp.text().await.unwrap();
        let v = serde_json::from_str(&text)
            .unwrap_or_else(|_| panic!("POST {path}: not JSON ({status}): {text}"));
        (status, v)
    }

    async fn get(&self, path: &str) -> (u16, Value) {
        let resp = self
            .http
            .get(self.app.url(path))
            .bearer_auth(OPERATE)
            .send()
            .await
            .unwrap();
        let status = resp.status().as_u16();
        let text = resp.text().await.unwrap();
        (
            status,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        )
    }

    fn audit(&self) -> Vec<Value> {
        std::fs::read_to_string(self.data.join("audit.jsonl"))
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    /// Polls the audit log until `done` holds, or fails after `limit` with what it holds.
    async fn audit_until(&self, limit: Duration, done: impl Fn(&[Value]) -> bool) -> Vec<Value> {
        let deadline = Instant::now() + limit;
        loop {
            let records = self.audit();
            if done(&records) {
                return records;
            }
            assert!(
                Instant::now() < deadline,
                "the audit log never got there; it holds: {records:#?}\nlog: {:#?}",
                self.app.log.lock().unwrap()
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Installs `rules` as the rules directory's only file and reloads.
    async fn set_rules(&self, rules: &str) {
        std::fs::write(self.rules.join("r.yml"), rules).unwrap();
        let (s, v) = self.post("/-/reload").await;
        assert!(s == 200, "reload: {s} {v:#}");
    }
}

fn is(r: &Value, rule: &str, phase: &str, decision: &str) -> bool {
    r["rule"] == rule && r["phase"] == phase && r["decision"] == decision
}

/// A rule that fires at once (every host has CPUs) with `actions`, in `mode`.
fn always(name: &str, mode: &str, actions: &str) -> String {
    format!(
        "groups:\n  - name: g\n    interval: 1s\n    rules:\n      - name: {name}\n        expr: host_cpus > 0\n        mode: {mode}\n        allow_destructive: true\n        actions:\n{actions}"
    )
}

/// A local HTTP server that answers every request with 200 and counts them.
async fn answering_server() -> (String, Arc<AtomicUsize>) {
    let hits = Arc::new(AtomicUsize::new(0));
    let counter = hits.clone();
    let app = axum::Router::new().fallback(move || {
        let counter = counter.clone();
        async move {
            counter.fetch_add(1, Ordering::SeqCst);
            "ok"
        }
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    (format!("http://{addr}"), hits)
}

/// A TCP listener that accepts connections and never answers (nor closes them).
fn hanging_server() -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for stream in listener.incoming() {
            match stream {
                Ok(s) => held.push(s),
                Err(_) => break,
            }
        }
    });
    format!("http://{addr}")
}

// Issue 16 #3: a client that disconnects mid-run used to drop the run with it, after its target
// had been marked in flight: the audit kept an intent without a result, and every later action
// on the target was `skipped_inflight` until a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_playbook_run_its_client_abandons_finishes_records_its_result_and_frees_its_target() {
    let Some(env) = PgEnv::get() else {
        return;
    };
    let config = format!(
        "collectors:\n  host: {{interval: 1s}}\n  postgres: {{interval: 30s}}\ntargets:\n  postgres: [{{name: main, url: '{}'}}]\nactions:\n  mode: enforce\n  timeout: 60s\n",
        env.monitor_url
    );
    let playbooks = "playbooks:\n  slow:\n    allow_destructive: true\n    steps:\n      - sql: {query: 'SELECT pg_sleep(3)', timeout: 30s}\n";
    let rig = Rig::start(&config, playbooks, "", None).await;

    // The client gives up long before the step ends.
    let cut = rig
        .http
        .post(rig.app.url("/api/v1/playbooks/slow/run"))
        .bearer_auth(OPERATE)
        .timeout(Duration::from_millis(800))
        .send()
        .await;
    if let Ok(resp) = cut {
        panic!(
            "the run should outlast the client's patience: {}",
            resp.text().await.unwrap()
        );
    }
    rig.audit_until(Duration::from_secs(60), |a| {
        a.iter()
            .any(|r| is(r, "playbook:slow", "intent", "started"))
    })
    .await;

    // The run goes on and its result is recorded.
    let records = rig
        .audit_until(Duration::from_secs(60), |a| {
            a.iter()
                .any(|r| r["rule"] == "playbook:slow" && r["phase"] == "result")
        })
        .await;
    let result = records
        .iter()
        .find(|r| r["rule"] == "playbook:slow" && r["phase"] == "result")
        .unwrap();
    assert_eq!(result["decision"], "applied", "{result:#}");
    assert_eq!(result["target"], "postgres/main", "{result:#}");
    assert!(
        result["duration_ms"].as_f64().unwrap() >= 2900.0,
        "the step ran to its end: {result:#}"
    );

    // The target is free: a rule acting on it runs.
    rig.set_rules(&always(
        "AfterTheRun",
        "enforce",
        "          - sql: {query: 'SELECT 1'}\n",
    ))
    .await;
    let records = rig
        .audit_until(Duration::from_secs(60), |a| {
            a.iter()
                .any(|r| r["rule"] == "AfterTheRun" && r["phase"] != "intent")
        })
        .await;
    let decision = records
        .iter()
        .find(|r| r["rule"] == "AfterTheRun" && r["phase"] != "intent")
        .unwrap();
    assert_eq!(decision["decision"], "applied", "{decision:#}");
    assert_eq!(decision["target"], "postgres/main", "{decision:#}");
}

// Issue 23 #4: `actions.timeout` reached. A webhook whose server accepts and never answers
// (its own timeout far longer) is cut at the action timeout: `timeout`, within a bound, while
// /metrics keeps answering; the same target is free again afterwards and other actions run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_action_that_hangs_is_cut_at_the_timeout_and_holds_nothing_else_up() {
    let hang = hanging_server();
    let (ok, hits) = answering_server().await;
    let config = "collectors:\n  host: {interval: 1s}\nactions:\n  mode: enforce\n  timeout: 1s\n"
        .to_owned();
    let playbooks = format!(
        "playbooks:\n  hang:\n    steps:\n      - webhook: {{url: '{hang}/hook', timeout: 60s, retries: 0}}\n  fine:\n    steps:\n      - webhook: {{url: '{ok}/hook'}}\n"
    );
    let rig = Rig::start(&config, &playbooks, "", None).await;

    let run = {
        let http = rig.http.clone();
        let url = rig.app.url("/api/v1/playbooks/hang/run");
        tokio::spawn(async move {
            let started = Instant::now();
            let resp = http
                .post(url)
                .bearer_auth(OPERATE)
                .timeout(Duration::from_secs(120))
                .send()
                .await
                .unwrap();
            let v: Value = resp.json().await.unwrap();
            (v, started.elapsed())
        })
    };
    // While it hangs, /metrics answers.
    for _ in 0..3 {
        let started = Instant::now();
        let scrape = rig.app.scrape().await;
        assert!(scrape.value("host_cpus", &[]).is_some());
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "a scrape waited on the hung action: {:?}",
            started.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let (v, took) = run.await.unwrap();
    let step = &v["data"]["parts"][0]["steps"][0];
    assert_eq!(step["decision"], "timeout", "{v:#}");
    assert!(
        step["error"].as_str().unwrap().contains("1.0s"),
        "the error names the timeout: {v:#}"
    );
    // A generous bound: 1 s of timeout, plus a loaded machine; far below the webhook's 60 s.
    assert!(
        took < Duration::from_secs(20),
        "the run ended {took:?} after it started"
    );

    // The target was released: the same action runs (and is cut) again, not `skipped_inflight`.
    let (s, v) = rig.post("/api/v1/playbooks/hang/run").await;
    assert_eq!(s, 200, "{v:#}");
    assert_eq!(
        v["data"]["parts"][0]["steps"][0]["decision"], "timeout",
        "{v:#}"
    );
    // Other actions run.
    let (s, v) = rig.post("/api/v1/playbooks/fine/run").await;
    assert_eq!(s, 200, "{v:#}");
    assert_eq!(
        v["data"]["parts"][0]["steps"][0]["decision"], "applied",
        "{v:#}"
    );
    assert_eq!(hits.load(Ordering::SeqCst), 1);

    let scrape = rig.app.scrape().await;
    assert_eq!(
        scrape.value(
            "autotuner_actions_total",
            &[
                ("rule", "playbook:hang"),
                ("action", "webhook"),
                ("decision", "timeout")
            ]
        ),
        Some(2.0)
    );
    let results: Vec<Value> = rig
        .audit()
        .into_iter()
        .filter(|r| r["rule"] == "playbook:hang" && r["phase"] == "result")
        .collect();
    assert_eq!(results.len(), 2, "{results:#?}");
    assert!(results.iter().all(|r| r["decision"] == "timeout"));
    let _ = &rig.dir;
}

/// Waits until `/metrics` has `name` with `labels` at `value` or more; fails after `limit`.
async fn metric_at_least(app: &Autotuner, name: &str, labels: &[(&str, &str)], value: f64) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let scrape = app.scrape().await;
        if scrape.value(name, labels).is_some_and(|v| v >= value) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{name}{labels:?} never reached {value}; log: {:#?}",
            app.log.lock().unwrap()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

// Issue 16 #5: with an unusable data directory the runner used to audit into the working
// directory and act.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_usable_data_directory_no_action_runs_and_the_status_says_why() {
    let (ok, hits) = answering_server().await;
    let outer = tempfile::tempdir().unwrap();
    // A regular file where the directory should be: it can never be created.
    let data = outer.path().join("data");
    std::fs::write(&data, b"not a directory").unwrap();
    let rule = unique("NoDataDir");
    let rig = Rig::start(
        "collectors:\n  host: {interval: 1s}\nactions:\n  mode: enforce\n",
        "",
        &always(
            &rule,
            "enforce",
            &format!("          - webhook: {{url: '{ok}/hook'}}\n"),
        ),
        Some(&data),
    )
    .await;
    // The rule fires and its action is refused.
    metric_at_least(
        &rig.app,
        "autotuner_actions_total",
        &[
            ("rule", rule.as_str()),
            ("action", "webhook"),
            ("decision", "skipped_stopped"),
        ],
        1.0,
    )
    .await;
    assert_eq!(hits.load(Ordering::SeqCst), 0, "no action ran");
    let (s, v) = rig.get("/api/v1/status").await;
    assert_eq!(s, 200, "{v:#}");
    assert_eq!(v["data"]["actions"]["stopped"], true, "{v:#}");
    let reason = v["data"]["actions"]["reason"].as_str().unwrap();
    assert!(
        reason.contains("data directory") && reason.contains(&data.display().to_string()),
        "{reason}"
    );
    let log = rig.app.log.lock().unwrap().join("\n");
    assert!(
        log.contains("actions are stopped") && log.contains("ERROR"),
        "the start says so: {log}"
    );
    // Nothing was written in the working directory instead.
    assert!(
        !Path::new("audit.jsonl").exists() && !Path::new("gate.json").exists(),
        "a fallback to the working directory"
    );
    assert_eq!(std::fs::read(&data).unwrap(), b"not a directory");
}

// Issue 16 #6: an unreadable gate.json used to be ignored at start (open breakers and
// cooldowns forgotten) and written over by the next action.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreadable_gate_file_stops_the_actions_with_the_reason_and_is_kept() {
    let (ok, hits) = answering_server().await;
    let outer = tempfile::tempdir().unwrap();
    let data = outer.path().join("data");
    std::fs::create_dir(&data).unwrap();
    let torn = br#"{"enforce":{"breakers":{"#;
    std::fs::write(data.join("gate.json"), torn).unwrap();
    let rule = unique("TornGate");
    let rig = Rig::start(
        "collectors:\n  host: {interval: 1s}\nactions:\n  mode: enforce\n",
        "",
        &always(
            &rule,
            "enforce",
            &format!("          - webhook: {{url: '{ok}/hook'}}\n"),
        ),
        Some(&data),
    )
    .await;
    let records = rig
        .audit_until(Duration::from_secs(60), |a| {
            a.iter().any(|r| r["rule"] == rule.as_str())
        })
        .await;
    let refused = records.iter().find(|r| r["rule"] == rule.as_str()).unwrap();
    assert_eq!(refused["decision"], "skipped_stopped", "{refused:#}");
    assert!(
        refused["error"].as_str().unwrap().contains("gate.json"),
        "the reason is in the audit: {refused:#}"
    );
    assert_eq!(hits.load(Ordering::SeqCst), 0, "no action ran");
    let (_, v) = rig.get("/api/v1/status").await;
    assert_eq!(v["data"]["actions"]["stopped"], true, "{v:#}");
    assert!(
        v["data"]["actions"]["reason"]
            .as_str()
            .unwrap()
            .contains("gate.json"),
        "{v:#}"
    );
    let scrape = rig.app.scrape().await;
    assert_eq!(
        scrape.value(
            "autotuner_state_file_errors_total",
            &[("file", "gate.json"), ("op", "parse")]
        ),
        Some(1.0)
    );
    // An operator's reset writes no gate state over the file either.
    let (s, _) = rig.post(&format!("/api/v1/breakers/{rule}/reset")).await;
    assert_eq!(s, 200);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        std::fs::read(data.join("gate.json")).unwrap(),
        torn,
        "kept as it was"
    );
}

// Issue 16 #6: concurrent persists used to share one temporary name and could leave an older
// snapshot (or none) behind. Many knob changes and breaker resets at once: both files are
// valid JSON and knobs.json holds the value in memory, which a new stage restores.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_persists_leave_valid_files_holding_the_newest_state() {
    use autotuner::actions::runner::Actions;
    use autotuner::registry::Registry;
    use autotuner::settings::config::{ActionsConfig, GlobalMode, KnobDecl};

    let data = tempfile::tempdir().unwrap();
    let config = ActionsConfig {
        mode: GlobalMode::Enforce,
        timeout: Duration::from_secs(20),
        global_limit: None,
        target_limit: None,
        kind_limits: std::collections::BTreeMap::new(),
        breaker_max_actions: 5,
        breaker_window: Duration::from_secs(3600),
        exec_allow: vec![],
        audit_max_bytes: 1 << 24,
        audit_keep: 2,
        alert_resend: Duration::from_secs(60),
    };
    let knob = KnobDecl {
        name: "workers".into(),
        initial: 1.0,
        min: 1.0,
        max: 10_000.0,
        integer: true,
        redis_key: None,
        redis_target: None,
        webhook: None,
    };
    let stage = |registry: &Registry| {
        Actions::new(
            config.clone(),
            std::slice::from_ref(&knob),
            autotuner::actions::exec::Services::default(),
            Some(data.path()),
            None,
            registry,
        )
        .unwrap()
    };
    let registry = Registry::new(Duration::from_secs(600)).unwrap();
    let actions = stage(&registry);
    let mut tasks = Vec::new();
    for i in 0..200_u32 {
        let a = actions.clone();
        tasks.push(tokio::spawn(async move {
            if i % 4 == 0 {
                a.reset_breaker(&format!("rule{i}"), "test").await;
            }
            a.set_knob("workers", f64::from(i + 1), "test")
                .await
                .unwrap();
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let newest = actions.knobs()[0].value;
    // The writes run off the async workers; wait (boundedly) for the last to land.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let text = std::fs::read_to_string(data.path().join("knobs.json")).unwrap();
        let saved: Value = serde_json::from_str(&text)
            .unwrap_or_else(|e| panic!("knobs.json is not valid JSON ({e}): {text}"));
        if saved["workers"]["value"].as_f64() == Some(newest) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "knobs.json holds {} and memory {newest}",
            saved["workers"]["value"]
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let gate = std::fs::read_to_string(data.path().join("gate.json")).unwrap();
    serde_json::from_str::<Value>(&gate)
        .unwrap_or_else(|e| panic!("gate.json is not valid JSON ({e}): {gate}"));
    // A write of the same newest value (a knob's status follows its value) may still be under
    // way when the value shows: wait, boundedly, for the writers to finish, then no temporary
    // file may remain.
    let leftovers = || -> Vec<String> {
        std::fs::read_dir(data.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n != "knobs.json" && n != "gate.json" && !n.starts_with("audit"))
            .collect()
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while !leftovers().is_empty() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        leftovers().is_empty(),
        "temporary files left: {:?}",
        leftovers()
    );
    drop(actions);
    let again = stage(&Registry::new(Duration::from_secs(600)).unwrap());
    assert_eq!(again.knobs()[0].value, newest);
    assert_eq!(again.stopped(), None);
}

// Issue 16 #22: the shipped slow-query rule is in dry_run, where `index_advice` used to be only
// recorded as `would_apply`: /api/v1/recommendations stayed empty however slow the statements.
// Shipped rules, no configuration file, the database from DATABASE_URL.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_shipped_slow_query_rule_produces_index_advice_in_dry_run() {
    let Some(env) = PgEnv::get() else {
        return;
    };
    let table = unique("slow_advice");
    let su = common::pg_connect(&env.url).await;
    su.batch_execute(&format!(
        "CREATE EXTENSION IF NOT EXISTS pg_stat_statements; CREATE EXTENSION IF NOT EXISTS hypopg; \
         CREATE TABLE {table} (id bigint PRIMARY KEY, v bigint NOT NULL, payload text NOT NULL) \
           WITH (autovacuum_enabled = off); \
         INSERT INTO {table} SELECT g, g, md5(g::text) FROM generate_series(1, 100000) g; \
         ANALYZE {table}; GRANT SELECT ON {table} TO monitor;"
    ))
    .await
    .unwrap();
    let rules = Path::new(env!("CARGO_MANIFEST_DIR")).join("rules");
    let app = Autotuner::start(
        &[&format!("--rules.dir={}", rules.display())],
        &[("DATABASE_URL", env.monitor_url.as_str())],
    )
    .await_ready()
    .await;

    // A statement far above 100 ms (one row found by a sequential scan, then 150 ms of sleep),
    // run until the advice is there: the rule waits a minute of slowness before it fires.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let load = {
        let (stop, table, url) = (stop.clone(), table.clone(), env.url.clone());
        tokio::spawn(async move {
            let db = common::pg_connect(&url).await;
            let mut i: i64 = 0;
            while !stop.load(Ordering::SeqCst) {
                i = (i + 7919) % 100_000;
                db.query(
                    &format!("SELECT id, pg_sleep(0.15) FROM {table} WHERE v = $1"),
                    &[&(i + 1)],
                )
                .await
                .unwrap();
            }
        })
    };
    let http = common::client();
    let deadline = Instant::now() + Duration::from_secs(240);
    let advice = loop {
        let body: Value = http
            .get(app.url("/api/v1/recommendations"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        if let Some(r) = body["data"]["recommendations"]
            .as_array()
            .and_then(|l| l.iter().find(|r| r["table"] == table.as_str()).cloned())
        {
            break r;
        }
        assert!(
            Instant::now() < deadline,
            "no advice for {table}: {body:#}\nlog: {:#?}",
            app.log.lock().unwrap()
        );
        tokio::time::sleep(Duration::from_secs(1)).await;
    };
    stop.store(true, Ordering::SeqCst);
    load.await.unwrap();
    assert_eq!(advice["columns"], serde_json::json!(["v"]), "{advice:#}");
    assert_eq!(advice["verified"], true, "{advice:#}");

    // Rehearsed, not applied: nothing was created.
    let data = app.data.as_ref().unwrap().path();
    let audit = std::fs::read_to_string(data.join("audit.jsonl")).unwrap();
    let record: Value = audit
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .find(|r| r["rule"] == "SlowQueries" && r["action"] == "index_advice")
        .unwrap();
    assert_eq!(record["decision"], "would_apply", "{record:#}");
    assert_eq!(record["mode"], "dry_run", "{record:#}");
    assert!(
        record["result"]["advice"].as_u64().unwrap() >= 1,
        "{record:#}"
    );
    let indexes = su
        .query(
            "SELECT indexname FROM pg_indexes WHERE tablename = $1",
            &[&table],
        )
        .await
        .unwrap();
    assert_eq!(indexes.len(), 1, "only the primary key");
    su.batch_execute(&format!("DROP TABLE {table}"))
        .await
        .unwrap();
}

// Issue 23: "an operator's playbook run does not count toward a breaker". With a breaker that
// opens after two acting requests, four runs of one playbook all act, and no breaker opens.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operators_playbook_runs_never_open_a_breaker() {
    let (ok, hits) = answering_server().await;
    let config = "collectors:\n  host: {interval: 1s}\nactions:\n  mode: enforce\n  rate_limits: {global: {count: 100, per: 1m}, per_target: {count: 100, per: 1m}}\n  breaker: {max_actions: 2, window: 1h}\n";
    let playbooks =
        format!("playbooks:\n  poke:\n    steps:\n      - webhook: {{url: '{ok}/hook'}}\n");
    let rig = Rig::start(config, &playbooks, "", None).await;
    for run in 0..4 {
        let (s, v) = rig.post("/api/v1/playbooks/poke/run").await;
        assert_eq!(s, 200, "{v:#}");
        assert_eq!(
            v["data"]["parts"][0]["steps"][0]["decision"], "applied",
            "run {run}: {v:#}"
        );
    }
    assert_eq!(hits.load(Ordering::SeqCst), 4);
    let (_, v) = rig.get("/api/v1/breakers").await;
    assert_eq!(v["data"], serde_json::json!([]), "{v:#}");
    assert!(
        !rig.audit()
            .iter()
            .any(|r| r["decision"] == "breaker_opened"),
        "{:#?}",
        rig.audit()
    );
    let scrape = rig.app.scrape().await;
    assert_ne!(
        scrape.value("autotuner_breaker_open", &[("rule", "playbook:poke")]),
        Some(1.0)
    );
}

// Issue 23: the `ineffective` verification outcome. A rule's knob move whose verification
// condition does not hold after the delay (and has no `worse`): recorded and counted as
// `ineffective`, and the move stays.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_verification_that_does_not_hold_is_recorded_as_ineffective() {
    let rule = unique("Unhelped");
    let config = "collectors:\n  host: {interval: 1s}\nactions:\n  mode: enforce\nknobs:\n  batch_size: {initial: 1000, min: 100, max: 2000}\n";
    let rules = format!(
        "groups:\n  - name: g\n    interval: 1s\n    rules:\n      - name: {rule}\n        expr: host_cpus > 0\n        mode: enforce\n        actions:\n          - knob: {{name: batch_size, scale: 0.5}}\n        verify:\n          after: 1s\n          expr: host_cpus < 0\n"
    );
    let rig = Rig::start(config, "", &rules, None).await;
    let records = rig
        .audit_until(Duration::from_secs(60), |a| {
            a.iter()
                .any(|r| r["rule"] == rule.as_str() && r["phase"] == "verification")
        })
        .await;
    let verification = records
        .iter()
        .find(|r| r["rule"] == rule.as_str() && r["phase"] == "verification")
        .unwrap();
    assert_eq!(verification["decision"], "ineffective", "{verification:#}");
    assert!(
        records
            .iter()
            .any(|r| is(r, &rule, "result", "applied") && r["action"] == "knob"),
        "{records:#?}"
    );
    let scrape = rig.app.scrape().await;
    assert_eq!(
        scrape.value(
            "autotuner_action_verifications_total",
            &[("rule", rule.as_str()), ("outcome", "ineffective")]
        ),
        Some(1.0)
    );
    assert_eq!(
        scrape.value("autotuner_knob_value", &[("knob", "batch_size")]),
        Some(500.0),
        "an ineffective move is not reverted"
    );
}

/// A database of one test with pg_stat_statements and HypoPG, dropped at the end.
struct ScratchDb {
    admin_url: String,
    name: String,
    url: String,
}

impl ScratchDb {
    async fn new(env: &PgEnv, prefix: &str) -> ScratchDb {
        let name = unique(prefix);
        let admin = common::pg_connect(&env.url).await;
        admin
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .await
            .unwrap();
        let mut u = url::Url::parse(&env.url).unwrap();
        u.set_path(&format!("/{name}"));
        let db = ScratchDb {
            admin_url: env.url.clone(),
            name,
            url: u.to_string(),
        };
        common::pg_connect(&db.url)
            .await
            .batch_execute("CREATE EXTENSION pg_stat_statements; CREATE EXTENSION hypopg;")
            .await
            .unwrap();
        db
    }
}

impl Drop for ScratchDb {
    fn drop(&mut self) {
        let (url, name) = (self.admin_url.clone(), self.name.clone());
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async {
                let admin = common::pg_connect(&url).await;
                let _ = admin
                    .batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                    .await;
            });
        })
        .join();
    }
}

// Issue 16 #4: at `actions.timeout` the index build used to be dropped while CREATE INDEX
// CONCURRENTLY went on on the server: `timeout` on record, no hold, and the next action
// started a second build. Now the build is a task of its own: the hold is taken when it starts
// (a second action while it runs builds nothing), its outcome is recorded when it ends, and a
// build that built nothing gives the hold back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_index_build_outlasting_the_action_timeout_is_tracked_to_its_end() {
    use autotuner::actions::exec::Services;
    use autotuner::actions::runner::Actions;
    use autotuner::actions::{ActionRequest, Event, Mode};
    use autotuner::registry::Registry;
    use autotuner::settings::config::{ActionsConfig, GlobalMode};

    let Some(env) = PgEnv::get() else {
        return;
    };
    let scratch = ScratchDb::new(&env, "idxbuild").await;
    let su = common::pg_connect(&scratch.url).await;
    su.batch_execute(
        "CREATE TABLE orders (id bigint PRIMARY KEY, customer_id bigint NOT NULL, payload text NOT NULL) \
           WITH (autovacuum_enabled = off); \
         INSERT INTO orders SELECT g, (g * 7919) % 50000, md5(g::text) FROM generate_series(1, 200000) g; \
         ANALYZE orders;",
    )
    .await
    .unwrap();
    // Slow statements since the advisor last looked: each action needs some to advise.
    let workload = || async {
        let db = common::pg_connect(&scratch.url).await;
        for i in 0..15_i64 {
            db.query(
                "SELECT count(*) FROM orders WHERE customer_id = $1",
                &[&(i * 7)],
            )
            .await
            .unwrap();
        }
    };

    let mut services = Services {
        http: reqwest::Client::new(),
        slow_threshold: Duration::from_millis(1),
        ..Services::default()
    };
    services.postgres.insert(
        "default".into(),
        autotuner::targets::PgHandle::new(
            &autotuner::settings::Target {
                name: "default".into(),
                url: autotuner::settings::secret::SecretUrl::parse(&scratch.url).unwrap(),
                tls_ca_file: None,
            },
            Duration::from_secs(30),
            Duration::from_secs(5),
            1,
        )
        .unwrap(),
    );
    let data = tempfile::tempdir().unwrap();
    let timeout = Duration::from_secs(2);
    let actions = Actions::new(
        ActionsConfig {
            mode: GlobalMode::Enforce,
            timeout,
            global_limit: None,
            target_limit: None,
            kind_limits: std::collections::BTreeMap::new(),
            breaker_max_actions: 100,
            breaker_window: Duration::from_secs(3600),
            exec_allow: vec![],
            audit_max_bytes: 1 << 24,
            audit_keep: 2,
            alert_resend: Duration::from_secs(60),
        },
        &[],
        services,
        Some(data.path()),
        None,
        &Registry::new(Duration::from_secs(600)).unwrap(),
    )
    .unwrap();
    let request = |episode: i64| ActionRequest {
        rule: "BuildIt".into(),
        labels: autotuner::sample::Labels::empty(),
        value: 1.0,
        event: Event::Firing,
        episode_ms: episode,
        mode: Some(Mode::Enforce),
        cooldown: Duration::ZERO,
        allow_destructive: true,
        actions: vec![
            serde_yaml::from_str("index_advice: {create: true, create_every: 1h, min_saving: 0.5}")
                .unwrap(),
        ],
        verify: None,
        annotations: std::collections::BTreeMap::new(),
        rule_version: "v1".into(),
        at_ms: episode,
        actor: "engine".into(),
    };
    let builds = || -> Vec<Value> {
        std::fs::read_to_string(data.path().join("audit.jsonl"))
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str::<Value>(l).unwrap())
            .filter(|r| r["phase"] == "index_build")
            .collect()
    };
    let index_count = || async {
        common::pg_connect(&scratch.url)
            .await
            .query(
                "SELECT 1 FROM pg_indexes WHERE tablename = 'orders' AND indexname <> 'orders_pkey'",
                &[],
            )
            .await
            .unwrap()
            .len()
    };

    // A transaction holding a lock the build needs: the build waits (up to its 5 s
    // lock_timeout), far longer than the action's 2 s.
    let locker = common::pg_connect(&scratch.url).await;
    locker
        .batch_execute("BEGIN; LOCK TABLE orders IN SHARE UPDATE EXCLUSIVE MODE;")
        .await
        .unwrap();
    let started = Instant::now();
    let first = {
        workload().await;
        actions.handle(request(1)).await
    };
    assert_eq!(first[0].decision, "timeout", "{first:#?}");
    assert!(started.elapsed() < Duration::from_secs(15));
    // While it waits, another action on the target builds nothing.
    let second = {
        workload().await;
        actions.handle(request(2)).await
    };
    assert!(
        builds().is_empty(),
        "the first build ended before the second action looked (a very slow machine?)"
    );
    assert_eq!(second[0].decision, "applied", "{second:#?}");
    assert_eq!(
        second[0].result["create"]["result"], "skipped",
        "{second:#?}"
    );
    assert!(
        second[0].result["create"]["reason"]
            .as_str()
            .unwrap()
            .contains("one index per"),
        "{second:#?}"
    );
    // The build ends at its lock timeout; its outcome is recorded and the hold given back.
    let deadline = Instant::now() + Duration::from_secs(60);
    while builds().is_empty() {
        assert!(
            Instant::now() < deadline,
            "the build's outcome was never recorded"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let failed = &builds()[0];
    assert_eq!(failed["decision"], "failed", "{failed:#}");
    assert_eq!(failed["rule"], "BuildIt", "{failed:#}");
    assert!(
        failed["error"].as_str().unwrap().contains("lock timeout"),
        "{failed:#}"
    );
    assert_eq!(index_count().await, 0);
    locker.batch_execute("COMMIT").await.unwrap();

    // With the lock gone the next action builds; its outcome is on record however long the
    // build takes, and one index per `create_every` holds after it.
    let third = {
        workload().await;
        actions.handle(request(3)).await
    };
    assert!(
        ["applied", "timeout"].contains(&third[0].decision.as_str()),
        "{third:#?}"
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    while builds().len() < 2 {
        assert!(
            Instant::now() < deadline,
            "the build's outcome was never recorded"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let built = &builds()[1];
    assert_eq!(built["decision"], "applied", "{built:#}");
    assert_eq!(built["result"]["result"], "created", "{built:#}");
    assert_eq!(index_count().await, 1);
    let fourth = {
        workload().await;
        actions.handle(request(4)).await
    };
    assert_eq!(
        fourth[0].result["create"]["result"], "skipped",
        "{fourth:#?}"
    );
    assert_eq!(index_count().await, 1);
    drop(su);
}

/// Alertmanager routing everything nowhere: the tests read its API.
const NULL_ROUTE: &str = "route:\n  receiver: 'null'\nreceivers:\n  - name: 'null'\n";

/// Waits until alert `name` is active (`want`) or resolved in `am`.
async fn wait_active(am: &Alertmanager, name: &str, want: bool, limit: Duration) {
    let deadline = Instant::now() + limit;
    while am.active(name).await.is_empty() == want {
        assert!(
            Instant::now() < deadline,
            "alert {name} never became {}",
            if want { "active" } else { "resolved" }
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

// Issue 16 #8: alerts used to live in memory only, registered after their POST: after a
// restart a firing rule's alert expired in Alertmanager, and a deleted rule's alert was never
// resolved. Fire; restart (the alert stays active, resent, well past its four-resend
// validity); delete the rule file (the alert resolves in Alertmanager, recorded).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alertmanager_alerts_survive_a_restart_and_resolve_when_their_rule_is_deleted() {
    let Some(am) = Alertmanager::start(NULL_ROUTE).await else {
        return;
    };
    let rule = unique("AmEpisode");
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let rules = dir.path().join("rules");
    std::fs::create_dir(&rules).unwrap();
    std::fs::write(
        rules.join("r.yml"),
        always(
            &rule,
            "enforce",
            &format!("          - alertmanager: {{url: '{}'}}\n", am.base),
        ),
    )
    .unwrap();
    let config = common::write_config(
        &dir,
        "collectors:\n  host: {interval: 1s}\nactions:\n  mode: enforce\n  alert_resend: 1s\n",
    );
    let args = [
        format!("--config.file={config}"),
        format!("--rules.dir={}", rules.display()),
        format!("--data.dir={}", data.display()),
    ];
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let envs = [("AUTOTUNER_OPERATE_TOKEN", OPERATE)];

    let mut app = Autotuner::start(&args, &envs).await_ready().await;
    wait_active(&am, &rule, true, Duration::from_secs(60)).await;
    let registered = std::fs::read_to_string(data.join("alerts.json")).unwrap();
    assert!(registered.contains(&rule), "{registered}");
    app.terminate(Duration::from_secs(10));

    // Restarted: the rule is still firing (its state survives), so nothing fires anew; the
    // alert is resent from alerts.json. Validity is four resends (4 s): wait three times that.
    let app = Autotuner::start(&args, &envs).await_ready().await;
    tokio::time::sleep(Duration::from_secs(12)).await;
    assert!(
        !am.active(&rule).await.is_empty(),
        "the alert expired after the restart; log: {:#?}",
        app.log.lock().unwrap()
    );

    // The rule file deleted: the alert resolves in Alertmanager.
    std::fs::remove_file(rules.join("r.yml")).unwrap();
    let _ = reqwest::Client::new()
        .post(app.url("/-/reload"))
        .bearer_auth(OPERATE)
        .send()
        .await;
    wait_active(&am, &rule, false, Duration::from_secs(30)).await;
    // Resolved for good: not resent afterwards.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(am.active(&rule).await.is_empty());
    let audit = std::fs::read_to_string(data.join("audit.jsonl")).unwrap();
    let resolved: Vec<Value> = audit
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .filter(|r| r["rule"] == rule.as_str() && r["phase"] == "resolved")
        .collect();
    assert_eq!(resolved.len(), 1, "{resolved:#?}");
    assert_eq!(resolved[0]["decision"], "applied", "{resolved:#?}");
    assert_eq!(
        resolved[0]["result"]["why"], "rule_removed",
        "{resolved:#?}"
    );
}

// Issue 16 #8: a resolution the engine dropped on a full request channel used to leave the
// alert firing forever (resent every interval). Told which instances fire now, the stage
// resolves a registered alert whose instance is not among them, and keeps one that is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_alert_whose_resolution_was_lost_is_resolved_when_its_instance_is_not_firing() {
    use autotuner::actions::exec::Services;
    use autotuner::actions::runner::Actions;
    use autotuner::actions::{ActionRequest, Event, Mode};
    use autotuner::registry::Registry;
    use autotuner::settings::config::{ActionsConfig, GlobalMode};
    use std::collections::{BTreeMap, HashSet};

    let Some(am) = Alertmanager::start(NULL_ROUTE).await else {
        return;
    };
    let data = tempfile::tempdir().unwrap();
    let actions = Actions::new(
        ActionsConfig {
            mode: GlobalMode::Enforce,
            timeout: Duration::from_secs(20),
            global_limit: None,
            target_limit: None,
            kind_limits: BTreeMap::new(),
            breaker_max_actions: 100,
            breaker_window: Duration::from_secs(3600),
            exec_allow: vec![],
            audit_max_bytes: 1 << 24,
            audit_keep: 2,
            alert_resend: Duration::from_secs(60),
        },
        &[],
        Services {
            http: reqwest::Client::new(),
            ..Services::default()
        },
        Some(data.path()),
        None,
        &Registry::new(Duration::from_secs(600)).unwrap(),
    )
    .unwrap();
    let (lost, kept) = (unique("LostResolution"), unique("StillFiring"));
    for rule in [&lost, &kept] {
        let out = actions
            .handle(ActionRequest {
                rule: rule.clone(),
                labels: autotuner::sample::Labels::new([("instance", "db1")]),
                value: 1.0,
                event: Event::Firing,
                episode_ms: 1_000,
                mode: Some(Mode::Enforce),
                cooldown: Duration::ZERO,
                allow_destructive: false,
                actions: vec![
                    serde_yaml::from_str(&format!("alertmanager: {{url: '{}'}}", am.base)).unwrap(),
                ],
                verify: None,
                annotations: BTreeMap::new(),
                rule_version: "v1".into(),
                at_ms: 1_000,
                actor: "engine".into(),
            })
            .await;
        assert_eq!(out[0].decision, "applied", "{out:#?}");
        wait_active(&am, rule, true, Duration::from_secs(30)).await;
    }
    let seen = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
        + 1;
    let firing: HashSet<(String, BTreeMap<String, String>)> = HashSet::from([(
        kept.clone(),
        BTreeMap::from([("instance".to_owned(), "db1".to_owned())]),
    )]);
    actions.firing_now(seen, &firing).await;
    wait_active(&am, &lost, false, Duration::from_secs(30)).await;
    assert!(!am.active(&kept).await.is_empty(), "a firing one stays");
    // Only alerts registered before the engine looked: one registered since is kept.
    actions.firing_now(0, &HashSet::new()).await;
    assert!(!am.active(&kept).await.is_empty());
    // alerts.json follows (written off the async workers).
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let book = std::fs::read_to_string(data.path().join("alerts.json")).unwrap();
        if book.contains(&kept) && !book.contains(&lost) {
            break;
        }
        assert!(Instant::now() < deadline, "{book}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
