//! The kill switch (issue 19, item 3): `PUT /api/v1/mode` lowers the global mode at once —
//! an action burst in progress starts nothing new after the answer — persisted across a
//! restart, audited with its actor and reason, shown in `autotuner_actions_mode`,
//! `/api/v1/mode`, `/api/v1/status` and the landing page; `null` returns to the
//! configuration's mode.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::time::Duration;

use serde_json::{Value, json};

use common::{Autotuner, until, write_config};

const OPERATE: &str = "operate-token-kill-switch-0123456789";
const READ: &str = "read-token-kill-switch-0123456789";

fn audit(data: &std::path::Path) -> Vec<Value> {
    std::fs::read_to_string(data.join("audit.jsonl"))
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

async fn put_mode(app: &Autotuner, token: &str, body: Value) -> (u16, Value) {
    let r = common::client()
        .put(app.url("/api/v1/mode"))
        .bearer_auth(token)
        .json(&body)
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

async fn get_mode(app: &Autotuner) -> Value {
    common::client()
        .get(app.url("/api/v1/mode"))
        .bearer_auth(READ)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

fn start(config: &str, rules: &std::path::Path, data: &std::path::Path) -> Autotuner {
    Autotuner::start(
        &[
            &format!("--config.file={config}"),
            &format!("--rules.dir={}", rules.display()),
            &format!("--data.dir={}", data.display()),
        ],
        &[
            ("AUTOTUNER_OPERATE_TOKEN", OPERATE),
            ("AUTOTUNER_READ_TOKEN", READ),
        ],
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_kill_switch_stops_a_burst_at_once_and_survives_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(
        &dir,
        "collectors:\n  host:\n    enabled: false\nactions:\n  mode: enforce\n  exec_allow: [/usr/bin/sleep]\n  rate_limits:\n    global: { count: 1000, per: 1m }\n    per_target: { count: 1000, per: 1m }\n  breaker: { max_actions: 1000, window: 1h }\n",
    );
    let rules = tempfile::tempdir().unwrap();
    // One firing edge asks for twelve actions of 0.4 s each, one after another: a burst of
    // about five seconds.
    let mut actions = String::new();
    for _ in 0..12 {
        actions.push_str("          - exec: { command: [/usr/bin/sleep, '0.4'] }\n");
    }
    std::fs::write(
        rules.path().join("burst.yml"),
        format!(
            "groups:\n  - name: burst\n    interval: 1s\n    rules:\n      - name: Burst\n        expr: vector(1)\n        mode: enforce\n        allow_destructive: true\n        actions:\n{actions}"
        ),
    )
    .unwrap();
    let data = tempfile::tempdir().unwrap();
    let mut app = start(&config, rules.path(), data.path())
        .await_ready()
        .await;

    let applied = |records: &[Value]| {
        records
            .iter()
            .filter(|r| {
                r["rule"] == "Burst" && r["phase"] == "result" && r["decision"] == "applied"
            })
            .count()
    };
    until(Duration::from_secs(20), "the burst under way", || async {
        let n = applied(&audit(data.path()));
        if n >= 2 {
            Ok(())
        } else {
            Err(format!("{n} applied"))
        }
    })
    .await;

    // A body without `mode` is refused, never read as "back to the configuration's".
    assert_eq!(
        put_mode(&app, OPERATE, json!({"reason": "incident"}))
            .await
            .0,
        400
    );
    // Refused without a reason, and to the read role.
    assert_eq!(
        put_mode(&app, OPERATE, json!({"mode": "observe"})).await.0,
        400
    );
    assert_eq!(
        put_mode(&app, OPERATE, json!({"mode": "observe", "reason": " "}))
            .await
            .0,
        400
    );
    assert_eq!(
        put_mode(&app, READ, json!({"mode": "observe", "reason": "x"}))
            .await
            .0,
        403
    );

    let (status, answer) = put_mode(
        &app,
        OPERATE,
        json!({"mode": "observe", "reason": "incident 42: stop everything"}),
    )
    .await;
    let switched_ms = autotuner::collect::now_ms();
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["data"]["mode"], "observe");
    // Long enough for the rest of the burst to have run, had it gone on.
    tokio::time::sleep(Duration::from_secs(4)).await;
    let records = audit(data.path());
    let started_after: Vec<&Value> = records
        .iter()
        .filter(|r| {
            r["rule"] == "Burst"
                && r["phase"] == "intent"
                && r["ts_ms"].as_i64().unwrap() > switched_ms
        })
        .collect();
    assert!(
        started_after.is_empty(),
        "started after the switch: {started_after:?}"
    );
    let skipped = records
        .iter()
        .filter(|r| r["rule"] == "Burst" && r["decision"] == "skipped_observe")
        .count();
    let done = applied(&records);
    assert!(
        done < 12 && skipped >= 1 && done + skipped <= 12,
        "applied {done}, skipped {skipped}"
    );
    let api: Vec<&Value> = records
        .iter()
        .filter(|r| r["decision"] == "global_mode")
        .collect();
    assert_eq!(api.len(), 1, "{api:?}");
    assert_eq!(api[0]["params"]["reason"], "incident 42: stop everything");
    assert_eq!(api[0]["params"]["mode"], "observe");
    let actor = api[0]["actor"].as_str().unwrap().to_owned();
    assert!(!actor.is_empty());

    // Shown everywhere an operator looks.
    let m = get_mode(&app).await;
    assert_eq!(m["data"]["mode"], "observe");
    assert_eq!(m["data"]["configured"], "enforce");
    assert_eq!(m["data"]["set"]["actor"], actor.as_str());
    let s = app.scrape().await;
    assert_eq!(
        s.value("autotuner_actions_mode", &[("mode", "observe")]),
        Some(1.0)
    );
    assert_eq!(
        s.value("autotuner_actions_mode", &[("mode", "enforce")]),
        Some(0.0)
    );
    let status = common::client()
        .get(app.url("/api/v1/status"))
        .bearer_auth(READ)
        .send()
        .await
        .unwrap()
        .json::<Value>()
        .await
        .unwrap();
    assert_eq!(
        status["data"]["actions"]["mode"]["mode"], "observe",
        "{status}"
    );
    let page = common::client()
        .get(app.url("/"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(page.contains("<b class=observe>observe</b>"), "{page}");

    // A restart keeps it: a rule new to the restarted process fires and acts on nothing.
    app.terminate(Duration::from_secs(10));
    std::fs::write(
        rules.path().join("after.yml"),
        "groups:\n  - name: after\n    interval: 1s\n    rules:\n      - name: AfterRestart\n        expr: vector(1)\n        mode: enforce\n        allow_destructive: true\n        actions:\n          - exec: { command: [/usr/bin/sleep, '0.1'] }\n",
    )
    .unwrap();
    let app = start(&config, rules.path(), data.path())
        .await_ready()
        .await;
    assert_eq!(get_mode(&app).await["data"]["mode"], "observe");
    until(Duration::from_secs(20), "the new rule skipped", || async {
        let after: Vec<Value> = audit(data.path())
            .into_iter()
            .filter(|r| r["rule"] == "AfterRestart")
            .collect();
        if after.iter().any(|r| r["decision"] == "skipped_observe") {
            assert!(after.iter().all(|r| r["phase"] != "intent"), "{after:?}");
            Ok(())
        } else {
            Err(format!("{after:?}"))
        }
    })
    .await;

    // Cleared: the configuration's mode again, audited too.
    let (status, answer) = put_mode(
        &app,
        OPERATE,
        json!({"mode": null, "reason": "incident over"}),
    )
    .await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["data"]["mode"], "enforce");
    assert_eq!(answer["data"]["set"], Value::Null);
    assert_eq!(
        audit(data.path())
            .iter()
            .filter(|r| r["decision"] == "global_mode")
            .count(),
        2
    );
}
