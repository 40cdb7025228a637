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
