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

use common::{Autotuner, PgEnv};

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
    let leftovers: Vec<String> = std::fs::read_dir(data.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n != "knobs.json" && n != "gate.json" && !n.starts_with("audit"))
        .collect();
    assert!(leftovers.is_empty(), "temporary files left: {leftovers:?}");
    drop(actions);
    let again = stage(&Registry::new(Duration::from_secs(600)).unwrap());
    assert_eq!(again.knobs()[0].value, newest);
    assert_eq!(again.stopped(), None);
}
