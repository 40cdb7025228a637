//! The admin API through the real binary: every route with both roles, no token and a wrong
//! one; a token file rotated and a token expired; no operate token; JSON errors; the
//! Alertmanager webhook delivered twice acting once; the shipped `run_full_optimization`
//! playbook against the real PostgreSQL and Redis; and the landing page rendered by a real
//! headless Chromium.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::{Autotuner, PgEnv, RedisServer, pg_connect};
use serde_json::{Value, json};

const READ: &str = "reader-token-0123456789";
const OPERATE: &str = "operator-token-0123456789";

fn root() -> &'static std::path::Path {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
}

struct Rig {
    app: Autotuner,
    _dir: tempfile::TempDir,
    data: std::path::PathBuf,
    tokens: std::path::PathBuf,
    http: reqwest::Client,
}

impl Rig {
    /// The binary with a tokens file (`tokens` as its entries), `config`, `rules` (one file),
    /// and `extra` arguments.
    async fn start(
        tokens: &str,
        config: &str,
        rules: &str,
        extra: &[String],
        envs: &[(&str, &str)],
    ) -> Rig {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        let rules_dir = dir.path().join("rules");
        std::fs::create_dir(&rules_dir).unwrap();
        if !rules.is_empty() {
            std::fs::write(rules_dir.join("r.yml"), rules).unwrap();
        }
        let tokens_path = dir.path().join("tokens.yml");
        let config_path = common::write_config(&dir, config);
        let mut args = vec![
            format!("--config.file={config_path}"),
            format!("--rules.dir={}", rules_dir.display()),
            format!("--data.dir={}", data.display()),
            format!(
                "--playbooks.file={}",
                root().join("playbooks.yml").display()
            ),
        ];
        if !tokens.is_empty() {
            std::fs::write(&tokens_path, tokens).unwrap();
            args.push(format!("--web.tokens-file={}", tokens_path.display()));
        }
        args.extend(extra.iter().cloned());
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let app = Autotuner::start(&args, envs).await_ready().await;
        Rig {
            app,
            _dir: dir,
            data,
            tokens: tokens_path,
            http: common::client(),
        }
    }

    async fn call(
        &self,
        method: &str,
        path: &str,
        token: Option<&str>,
        body: Option<Value>,
    ) -> (u16, Value) {
        let mut req = self
            .http
            .request(method.parse().unwrap(), self.app.url(path));
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req.send().await.unwrap();
        let status = resp.status().as_u16();
        let text = resp.text().await.unwrap();
        let v = serde_json::from_str(&text)
            .unwrap_or_else(|_| panic!("{method} {path}: not JSON ({status}): {text}"));
        (status, v)
    }

    fn audit(&self) -> Vec<Value> {
        std::fs::read_to_string(self.data.join("audit.jsonl"))
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }
}

fn tokens_file() -> String {
    format!(
        "tokens:\n  - {{name: reader, role: read, token: {READ}}}\n  - {{name: operator, role: operate, token: {OPERATE}}}\n"
    )
}

const RULE: &str = "groups:\n  - name: g\n    interval: 1s\n    rules:\n      - name: Always\n        expr: host_cpus > 0\n        mode: dry_run\n        actions:\n          - knob: {name: batch_size, scale: 0.5}\n";

const CONFIG: &str = "collectors:\n  host: {interval: 1s}\nknobs:\n  batch_size: {initial: 1000, min: 100, max: 2000}\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_route_answers_by_role_and_records_every_change_with_its_actor() {
    let rig = Rig::start(&tokens_file(), CONFIG, RULE, &[], &[]).await;
    let reads = [
        "/api/v1/status",
        "/api/v1/rules",
        "/api/v1/rules/Always",
        "/api/v1/audit",
        "/api/v1/knobs",
        "/api/v1/knobs/batch_size",
        "/api/v1/breakers",
        "/api/v1/recommendations",
        "/api/v1/playbooks",
    ];
    for path in reads {
        let (s, v) = rig.call("GET", path, None, None).await;
        assert_eq!(s, 401, "{path}: {v}");
        assert_eq!(v["status"], "error");
        let (s, _) = rig
            .call("GET", path, Some("not-a-valid-token-at-all"), None)
            .await;
        assert_eq!(s, 401, "{path}");
        for t in [READ, OPERATE] {
            let (s, v) = rig.call("GET", path, Some(t), None).await;
            assert_eq!(s, 200, "{path}: {v}");
            assert_eq!(v["status"], "success", "{path}: {v}");
        }
    }
    // The playbook recomputes batch_size from the host's CPU usage (halved above 80 %, which a
    // loaded test machine reaches), so the operator's value is set after it and must stand.
    let writes: [(&str, Value); 5] = [
        ("/api/v1/rules/Always/mode", json!({"mode": "observe"})),
        ("/api/v1/playbooks/optimize_real_time/run", json!({})),
        ("/api/v1/breakers/Always/reset", json!({})),
        ("/api/v1/knobs/batch_size", json!({"value": 1500})),
        (
            "/api/v1/alerts/webhook",
            json!({"version": "4", "alerts": []}),
        ),
    ];
    for (path, body) in &writes {
        let (s, v) = rig.call("POST", path, None, Some(body.clone())).await;
        assert_eq!(s, 401, "{path}: {v}");
        let (s, v) = rig.call("POST", path, Some(READ), Some(body.clone())).await;
        assert_eq!(s, 403, "{path}: {v}");
        assert!(
            v["error"].as_str().unwrap().contains("may only read"),
            "{v}"
        );
    }
    for (path, body) in &writes {
        let (s, v) = rig
            .call("POST", path, Some(OPERATE), Some(body.clone()))
            .await;
        assert_eq!(s, 200, "{path}: {v}");
    }

    // What the writes did.
    let (_, v) = rig
        .call("GET", "/api/v1/rules/Always", Some(READ), None)
        .await;
    assert_eq!(v["data"]["rule"]["mode"], "observe");
    assert_eq!(v["data"]["rule"]["mode_overridden"], true);
    // "Why": the condition and each operand, evaluated now.
    assert_eq!(v["data"]["why"]["expr"][0]["expr"], "host_cpus > 0");
    assert_eq!(v["data"]["why"]["expr"][1]["expr"], "host_cpus");
    assert!(
        v["data"]["why"]["expr"][1]["samples"][0]["value"]
            .as_f64()
            .unwrap()
            >= 1.0,
        "{v}"
    );
    let (_, v) = rig
        .call("GET", "/api/v1/knobs/batch_size", Some(READ), None)
        .await;
    assert_eq!(v["data"]["value"], 1500.0);
    let scrape = rig.app.scrape().await;
    assert_eq!(
        scrape.value("autotuner_knob_value", &[("knob", "batch_size")]),
        Some(1500.0)
    );
    // Out of bounds, unknown names, bad bodies.
    let (s, v) = rig
        .call(
            "POST",
            "/api/v1/knobs/batch_size",
            Some(OPERATE),
            Some(json!({"value": 99999})),
        )
        .await;
    assert_eq!(s, 422, "{v}");
    let (s, _) = rig
        .call(
            "POST",
            "/api/v1/knobs/nope",
            Some(OPERATE),
            Some(json!({"value": 1})),
        )
        .await;
    assert_eq!(s, 404);
    let (s, _) = rig
        .call(
            "POST",
            "/api/v1/rules/Nope/mode",
            Some(OPERATE),
            Some(json!({"mode": null})),
        )
        .await;
    assert_eq!(s, 404);
    let (s, v) = rig
        .call(
            "POST",
            "/api/v1/rules/Always/mode",
            Some(OPERATE),
            Some(json!({"mode": "sometimes"})),
        )
        .await;
    assert_eq!(s, 400, "{v}");

    // The audit log names who did it.
    let audit = rig.audit();
    for what in ["rule_mode", "breaker_reset"] {
        assert!(
            audit
                .iter()
                .any(|r| r["phase"] == "api" && r["decision"] == what && r["actor"] == "operator"),
            "{what}: {audit:#?}"
        );
    }
    assert!(audit.iter().any(|r| r["phase"] == "api"
        && r["action"] == "knob"
        && r["actor"] == "operator"
        && r["after"] == 1500.0));
    assert!(
        audit
            .iter()
            .any(|r| r["rule"] == "playbook:optimize_real_time" && r["actor"] == "operator")
    );
    // Filtered and paginated.
    let (_, v) = rig
        .call("GET", "/api/v1/audit?phase=api&limit=2", Some(READ), None)
        .await;
    let page = v["data"]["records"].as_array().unwrap();
    assert_eq!(page.len(), 2);
    assert!(page.iter().all(|r| r["phase"] == "api"));
    assert_eq!(v["data"]["next_offset"], 2);
    let (s, _) = rig
        .call("GET", "/api/v1/audit?since=yesterday", Some(READ), None)
        .await;
    assert_eq!(s, 400);

    // /-/reload needs the operate role once tokens exist.
    let r = rig
        .http
        .post(rig.app.url("/-/reload"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let r = rig
        .http
        .post(rig.app.url("/-/reload"))
        .bearer_auth(OPERATE)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);

    // Failed attempts are counted, and from one address limited.
    for _ in 0..12 {
        rig.call(
            "GET",
            "/api/v1/status",
            Some("guessing-guessing-guessing"),
            None,
        )
        .await;
    }
    let (s, v) = rig.call("GET", "/api/v1/status", Some(READ), None).await;
    assert_eq!(s, 429, "{v}");
    let scrape = rig.app.scrape().await;
    assert!(
        scrape
            .value(
                "autotuner_http_auth_failures_total",
                &[("reason", "invalid")]
            )
            .unwrap()
            >= 10.0
    );
    assert!(
        scrape
            .value(
                "autotuner_http_auth_failures_total",
                &[("reason", "rate_limited")]
            )
            .unwrap()
            >= 1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_an_operate_token_changes_are_refused_with_an_explanation() {
    // No token at all: reading is open, changing is not.
    let rig = Rig::start("", CONFIG, RULE, &[], &[]).await;
    let (s, _) = rig.call("GET", "/api/v1/status", None, None).await;
    assert_eq!(s, 200);
    let (s, v) = rig
        .call(
            "POST",
            "/api/v1/knobs/batch_size",
            None,
            Some(json!({"value": 500})),
        )
        .await;
    assert_eq!(s, 403);
    assert!(
        v["error"]
            .as_str()
            .unwrap()
            .contains("no operate token is configured"),
        "{v}"
    );
    drop(rig);
    // Only a read token (from the environment): reading needs it, changing is refused for all.
    let rig = Rig::start("", CONFIG, RULE, &[], &[("AUTOTUNER_READ_TOKEN", READ)]).await;
    let (s, _) = rig.call("GET", "/api/v1/status", None, None).await;
    assert_eq!(s, 401);
    let (s, _) = rig.call("GET", "/api/v1/status", Some(READ), None).await;
    assert_eq!(s, 200);
    let (s, v) = rig
        .call(
            "POST",
            "/api/v1/knobs/batch_size",
            Some(READ),
            Some(json!({"value": 500})),
        )
        .await;
    assert_eq!(s, 403);
    assert!(
        v["error"]
            .as_str()
            .unwrap()
            .contains("no operate token is configured"),
        "{v}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotated_token_file_takes_effect_and_an_expired_token_is_refused() {
    let rig = Rig::start(&tokens_file(), CONFIG, RULE, &[], &[]).await;
    let (s, _) = rig.call("GET", "/api/v1/status", Some(READ), None).await;
    assert_eq!(s, 200);
    let rotated = "rotated-reader-token-0123456789";
    std::fs::write(
        &rig.tokens,
        format!(
            "tokens:\n  - {{name: reader, role: read, token: {rotated}}}\n  - {{name: old, role: operate, token: {OPERATE}, expires: 2001-01-01T00:00:00Z}}\n"
        ),
    )
    .unwrap();
    // The file is checked at most once a second.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (s, _) = rig.call("GET", "/api/v1/status", Some(READ), None).await;
        if s == 401 {
            break;
        }
        assert!(Instant::now() < deadline, "the old token still works");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let (s, _) = rig.call("GET", "/api/v1/status", Some(rotated), None).await;
    assert_eq!(s, 200);
    let (s, v) = rig
        .call(
            "POST",
            "/api/v1/knobs/batch_size",
            Some(OPERATE),
            Some(json!({"value": 500})),
        )
        .await;
    assert_eq!(s, 401);
    assert!(v["error"].as_str().unwrap().contains("expired"), "{v}");
    // A broken edit keeps the last good tokens: once the file was re-read (the log says so),
    // the token still works.
    std::fs::write(&rig.tokens, "tokens: [oops\n").unwrap();
    wait_for_log(
        &rig,
        "tokens file unreadable; keeping the previous tokens",
        rotated,
    )
    .await;
    let (s, _) = rig.call("GET", "/api/v1/status", Some(rotated), None).await;
    assert_eq!(s, 200);

    // A deleted file revokes its tokens (fail closed), logged; back, they count again.
    std::fs::remove_file(&rig.tokens).unwrap();
    wait_for_log(&rig, "tokens file missing or unreadable", rotated).await;
    let (s, v) = rig.call("GET", "/api/v1/status", Some(rotated), None).await;
    assert_eq!(s, 401, "{v}");
    std::fs::write(
        &rig.tokens,
        format!("tokens:\n  - {{name: reader, role: read, token: {rotated}}}\n"),
    )
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (s, _) = rig.call("GET", "/api/v1/status", Some(rotated), None).await;
        if s == 200 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the restored file's token never worked"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let log = rig.app.log.lock().unwrap().join("\n");
    for t in [READ, OPERATE, rotated] {
        assert!(!log.contains(t), "a token is in the log");
    }
}

/// Calls the API with `token` (the file is checked as requests come) until the log has `what`.
async fn wait_for_log(rig: &Rig, what: &str, token: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !rig.app.log.lock().unwrap().iter().any(|l| l.contains(what)) {
        assert!(Instant::now() < deadline, "the log never said {what:?}");
        rig.call("GET", "/api/v1/status", Some(token), None).await;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Wrong tokens sent all at once from one address: ten are checked, the rest answered 429.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_tokens_sent_at_once_are_limited_to_ten() {
    let rig = Rig::start(&tokens_file(), CONFIG, RULE, &[], &[]).await;
    let calls = (0..40).map(|i| {
        let req = rig
            .http
            .get(rig.app.url("/api/v1/status"))
            .bearer_auth(format!("wrong-token-number-{i:04}"));
        async move { req.send().await.unwrap().status().as_u16() }
    });
    let statuses = futures_util::future::join_all(calls).await;
    assert_eq!(
        statuses.iter().filter(|s| **s == 401).count(),
        10,
        "{statuses:?}"
    );
    assert_eq!(
        statuses.iter().filter(|s| **s == 429).count(),
        30,
        "{statuses:?}"
    );
    let scrape = rig.app.scrape().await;
    assert_eq!(
        scrape.value(
            "autotuner_http_auth_failures_total",
            &[("reason", "invalid")]
        ),
        Some(10.0)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_are_json() {
    let rig = Rig::start(&tokens_file(), CONFIG, RULE, &[], &[]).await;
    let (s, v) = rig
        .call("GET", "/api/v1/nothing-here", Some(READ), None)
        .await;
    assert_eq!((s, v["status"].as_str()), (404, Some("error")));
    let (s, v) = rig
        .call("DELETE", "/api/v1/knobs/batch_size", Some(OPERATE), None)
        .await;
    assert_eq!((s, v["status"].as_str()), (405, Some("error")));
    let r = rig
        .http
        .post(rig.app.url("/api/v1/knobs/batch_size"))
        .bearer_auth(OPERATE)
        .header("content-type", "application/json")
        .body("{\"value\": ")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["status"], "error");
    let big = format!(
        "{{\"version\":\"4\",\"alerts\":[],\"pad\":\"{}\"}}",
        "x".repeat(2 << 20)
    );
    let r = rig
        .http
        .post(rig.app.url("/api/v1/alerts/webhook"))
        .bearer_auth(OPERATE)
        .header("content-type", "application/json")
        .body(big)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 413);
    assert!(
        rig.app
            .scrape()
            .await
            .value("autotuner_build_info", &[])
            .is_some(),
        "still serving"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_alertmanager_delivery_made_twice_acts_once_and_resolved_acts_never() {
    use axum::routing::post;
    let hits = Arc::new(AtomicUsize::new(0));
    let h = hits.clone();
    let hook = axum::Router::new().route(
        "/hook",
        post(move || {
            let h = h.clone();
            async move {
                h.fetch_add(1, Ordering::SeqCst);
                "ok"
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/hook", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, hook).await });
    let rule = format!(
        "groups:\n  - name: g\n    interval: 1s\n    rules:\n      - name: OnLatencyAlert\n        expr: autotuner_alert{{alertname=\"HighLatency\", service=\"api\"}}\n        on_absent: clear\n        mode: enforce\n        actions:\n          - webhook: {{url: '{url}'}}\n"
    );
    let rig = Rig::start(&tokens_file(), CONFIG, &rule, &[], &[]).await;
    let delivery = |status: &str| {
        json!({
            "version": "4", "status": status, "receiver": "autotuner", "groupKey": "{}:{}",
            "truncatedAlerts": 0,
            "alerts": [{
                "status": status,
                "labels": {"alertname": "HighLatency", "service": "api", "severity": "warning"},
                "annotations": {"summary": "slow"},
                "startsAt": "2026-12-03T10:00:00.000Z",
                "endsAt": if status == "firing" { "0001-01-01T00:00:00Z" } else { "2026-12-03T10:05:00.000Z" },
                "fingerprint": "6b5f9d1a2c3e4f50"
            }]
        })
    };
    let (s, v) = rig
        .call(
            "POST",
            "/api/v1/alerts/webhook",
            Some(OPERATE),
            Some(delivery("firing")),
        )
        .await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["data"]["firing"], 1);
    let (_, v) = rig
        .call(
            "POST",
            "/api/v1/alerts/webhook",
            Some(OPERATE),
            Some(delivery("firing")),
        )
        .await;
    assert_eq!(v["data"]["duplicates"], 1);
    let deadline = Instant::now() + Duration::from_secs(10);
    while hits.load(Ordering::SeqCst) == 0 {
        assert!(
            Instant::now() < deadline,
            "the rule did not act on the alert"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Delivered again later (Alertmanager's repeat): the rule is already firing, no new edge.
    rig.call(
        "POST",
        "/api/v1/alerts/webhook",
        Some(OPERATE),
        Some(delivery("firing")),
    )
    .await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(hits.load(Ordering::SeqCst), 1);
    // Resolved: the series goes, the rule resolves, nothing acts.
    let (_, v) = rig
        .call(
            "POST",
            "/api/v1/alerts/webhook",
            Some(OPERATE),
            Some(delivery("resolved")),
        )
        .await;
    assert_eq!(v["data"]["resolved"], 1);
    rig.app
        .scrape_until(Duration::from_secs(10), "the alert's series gone", |s| {
            s.all("autotuner_alert").is_empty()
        })
        .await;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (_, v) = rig
            .call("GET", "/api/v1/rules/OnLatencyAlert", Some(READ), None)
            .await;
        if v["data"]["rule"]["instances"]
            .as_array()
            .unwrap()
            .is_empty()
        {
            break;
        }
        assert!(Instant::now() < deadline, "rule still firing: {v}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(hits.load(Ordering::SeqCst), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_full_optimization_playbook_runs_against_the_real_services() {
    let (Some(env), Some(redis)) = (PgEnv::get(), RedisServer::start(&[])) else {
        return;
    };
    let db = pg_connect(&env.url).await;
    db.batch_execute(
        "DROP VIEW IF EXISTS autotuner_cache_warm;
         DROP TABLE IF EXISTS pb_products;
         CREATE TABLE pb_products (id int PRIMARY KEY, name text);
         INSERT INTO pb_products SELECT g, 'p' || g FROM generate_series(1, 40) g;
         CREATE VIEW autotuner_cache_warm (key, value) AS SELECT 'pb:' || id, name FROM pb_products;",
    )
    .await
    .unwrap();
    let config = format!(
        "collectors:\n  host: {{interval: 1s}}\ntargets:\n  redis: [{{name: cache, url: '{}'}}]\n  postgres: [{{name: main, url: '{}'}}]\nknobs:\n  batch_size: {{initial: 1000, min: 100, max: 2000}}\n",
        redis.url(),
        env.url
    );
    let rig = Rig::start(&tokens_file(), &config, "", &[], &[]).await;
    let (s, v) = rig
        .call(
            "POST",
            "/api/v1/playbooks/run_full_optimization/run",
            Some(OPERATE),
            None,
        )
        .await;
    assert_eq!(s, 200, "{v:#}");
    let parts = v["data"]["parts"].as_array().unwrap();
    let names: Vec<&str> = parts
        .iter()
        .map(|p| p["playbook"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        [
            "optimize_database",
            "implement_caching",
            "optimize_real_time"
        ]
    );
    let decisions = |i: usize| -> Vec<(String, String)> {
        parts[i]["steps"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| {
                (
                    s["action"].as_str().unwrap().to_owned(),
                    s["decision"].as_str().unwrap().to_owned(),
                )
            })
            .collect()
    };
    assert_eq!(
        decisions(0),
        [
            ("pg_analyze".into(), "applied".into()),
            ("index_advice".into(), "applied".into()),
            ("pg_terminate_idle".into(), "applied".into())
        ],
        "{v:#}"
    );
    assert_eq!(
        decisions(1),
        [("cache_warm".into(), "applied".into())],
        "{v:#}"
    );
    // The controller either moves the knob or says why not; both are decisions on record.
    let (kind, decision) = &decisions(2)[0];
    assert_eq!(kind, "knob");
    assert!(decision == "applied" || decision == "unchanged", "{v:#}");
    assert!(
        parts[2]["value"].as_f64().is_some(),
        "the CPU value was read: {v:#}"
    );
    for p in parts {
        assert!(p["duration_ms"].as_f64().unwrap() > 0.0);
        for s in p["steps"].as_array().unwrap() {
            if s["decision"] == "applied" {
                assert!(s["duration_ms"].as_f64().is_some(), "{s}");
            }
        }
    }
    assert_eq!(parts[1]["steps"][0]["result"]["written"], 40);
    let mut c = redis::Client::open(redis.url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let v: String = redis::cmd("GET")
        .arg("pb:7")
        .query_async(&mut c)
        .await
        .unwrap();
    assert_eq!(v, "p7");
    // Every step is in the audit log, with its intent and the operator as actor.
    let audit = rig.audit();
    let results: Vec<&Value> = audit.iter().filter(|r| r["phase"] == "result").collect();
    // Four steps always run; the controller's step runs when it moves the knob.
    let executed = 4 + usize::from(decision == "applied");
    assert_eq!(results.len(), executed, "{audit:#?}");
    assert!(results.iter().all(|r| r["actor"] == "operator"));
    for r in &results {
        assert!(
            audit
                .iter()
                .any(|i| i["phase"] == "intent" && i["idempotency_key"] == r["idempotency_key"])
        );
    }
    db.batch_execute("DROP VIEW autotuner_cache_warm; DROP TABLE pb_products;")
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_landing_page_shows_rule_states_in_a_real_browser() {
    let Some(chromium) = common::require("chromium") else {
        return;
    };
    let rules = "groups:\n  - name: g\n    interval: 1s\n    rules:\n      - name: AlwaysFiring\n        expr: host_cpus > 0\n        mode: dry_run\n        actions:\n          - knob: {name: batch_size, step: 10}\n      - name: NeverFiring\n        expr: host_cpus < 0\n";
    let rig = Rig::start("", CONFIG, rules, &[], &[]).await;
    // Wait until the engine has evaluated and the rehearsal is on record.
    let deadline = Instant::now() + Duration::from_secs(15);
    while !rig.audit().iter().any(|r| r["decision"] == "would_apply") {
        assert!(Instant::now() < deadline, "no decision recorded");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let profile = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(chromium)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            &format!("--user-data-dir={}", profile.path().display()),
            "--dump-dom",
            &rig.app.url("/"),
        ])
        .output()
        .unwrap();
    let dom = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "chromium failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The DOM as the browser built it (attributes re-serialized by Chromium).
    assert!(
        dom.contains(r#"data-rule="AlwaysFiring" data-state="firing""#),
        "{dom}"
    );
    assert!(
        dom.contains(r#"data-rule="NeverFiring" data-state="inactive""#),
        "{dom}"
    );
    assert!(dom.contains(r#"<tr data-knob="batch_size">"#), "{dom}");
    assert!(dom.contains("would_apply"), "{dom}");
    assert!(dom.contains("<h2>Collectors</h2>"));
}

/// Sends only a request's head over a raw connection (the body it declares never comes) and
/// returns the status line the server answers with, if it answers within two seconds: a
/// server that reads the body first would wait for it.
async fn head_only(addr: std::net::SocketAddr, head: &str) -> Option<String> {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(head.as_bytes()).await.unwrap();
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(2), s.read(&mut buf))
        .await
        .ok()?
        .ok()?;
    String::from_utf8_lossy(&buf[..n])
        .lines()
        .next()
        .map(str::to_owned)
}

/// A body is refused before it is read when the route or the caller cannot accept it: a
/// declared length over 1 MiB gets 413, and a change without the operate role 401/403, both
/// answered before a byte of the body is sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodies_are_refused_before_they_are_read() {
    let rig = Rig::start(&tokens_file(), CONFIG, RULE, &[], &[]).await;
    let addr = rig.app.addr;
    let post = |auth: &str, len: u64| {
        format!(
            "POST /api/v1/knobs/batch_size HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n{auth}Content-Length: {len}\r\n\r\n"
        )
    };
    let status = head_only(
        addr,
        &post(&format!("Authorization: Bearer {OPERATE}\r\n"), 100 << 20),
    )
    .await;
    assert!(
        status.as_deref().is_some_and(|s| s.contains(" 413 ")),
        "{status:?}"
    );
    let status = head_only(addr, &post("", 100)).await;
    assert!(
        status.as_deref().is_some_and(|s| s.contains(" 401 ")),
        "{status:?}"
    );
    let status = head_only(
        addr,
        &post(&format!("Authorization: Bearer {READ}\r\n"), 100),
    )
    .await;
    assert!(
        status.as_deref().is_some_and(|s| s.contains(" 403 ")),
        "{status:?}"
    );
    // The operate role with an acceptable length is let through to read its body: no answer
    // until it comes.
    let status = head_only(
        addr,
        &post(&format!("Authorization: Bearer {OPERATE}\r\n"), 100),
    )
    .await;
    assert_eq!(status, None, "answered before the body came");
}
