//! The audit log's readers and the Alertmanager webhook receiver, against the real things:
//!
//! - a rule on an alert received from a real Alertmanager (with a 4 h `repeat_interval`) and a
//!   `for:` longer than the evaluator's 5-minute lookback fires once and stays firing, time
//!   driven past the lookback for the receiver and the rule engine alike;
//! - `/api/v1/audit` on a log of tens of MB written by the test answers with the newest
//!   records within its byte bound and goes on by cursor; a burst of reads is bounded, the
//!   excess refused with 503;
//! - the landing page shows the recent decisions with the log file moved away;
//! - the binary publishes the alerts held before a restart at once.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use autotuner::actions::{ActionRequest, Event};
use autotuner::http::intake::{AlertIntake, Payload};
use autotuner::registry::Registry;
use autotuner::rules::engine::Engine;
use common::{Alertmanager, Autotuner};
use serde_json::{Value, json};

fn now_ms() -> i64 {
    i64::try_from(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis(),
    )
    .unwrap()
}

fn rfc3339(ms: i64) -> String {
    humantime::format_rfc3339_millis(
        std::time::UNIX_EPOCH + Duration::from_millis(u64::try_from(ms).unwrap()),
    )
    .to_string()
}

/// A real Alertmanager routing everything to `hook` at once, repeating only every 4 h.
async fn alertmanager(hook: &str) -> Option<Alertmanager> {
    Alertmanager::start(&format!(
        "route:\n  receiver: autotuner\n  group_by: [alertname]\n  group_wait: 1s\n  group_interval: 1s\n  repeat_interval: 4h\nreceivers:\n  - name: autotuner\n    webhook_configs:\n      - url: '{hook}'\n        send_resolved: true\n"
    ))
    .await
}

/// Posts one alert to `am`, as a Prometheus would.
async fn post(am: &Alertmanager, alert: Value) {
    let r = common::client()
        .post(format!("{}/api/v2/alerts", am.base))
        .json(&json!([alert]))
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success(), "{:?}", r.text().await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_received_alert_with_a_for_longer_than_the_lookback_fires_once_and_stays_firing() {
    let registry = Arc::new(Registry::new(Duration::from_secs(3 * 3600)).unwrap());
    let intake = Arc::new(AlertIntake::new(registry.clone()));
    // The receiver's clock: real time until the test drives it.
    let clock = Arc::new(AtomicI64::new(now_ms()));
    let deliveries: Arc<Mutex<Vec<Value>>> = Arc::default();
    let hook = {
        let (intake, clock, deliveries) = (intake.clone(), clock.clone(), deliveries.clone());
        axum::Router::new().route(
            "/hook",
            axum::routing::post(move |body: axum::Json<Value>| {
                let (intake, clock, deliveries) =
                    (intake.clone(), clock.clone(), deliveries.clone());
                async move {
                    let payload: Payload = serde_json::from_value(body.0.clone()).unwrap();
                    intake.receive(payload, clock.load(Ordering::SeqCst));
                    deliveries.lock().unwrap().push(body.0);
                    "ok"
                }
            }),
        )
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let hook_url = format!("http://{}/hook", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, hook).await });
    let Some(am) = alertmanager(&hook_url).await else {
        return;
    };

    let rules = tempfile::tempdir().unwrap();
    let run = format!("r{}", std::process::id());
    std::fs::write(
        rules.path().join("r.yml"),
        format!(
            "groups:\n  - name: g\n    interval: 30s\n    rules:\n      - name: OnDiskFull\n        expr: autotuner_alert{{alertname=\"DiskFull\", run=\"{run}\"}}\n        for: 7m\n        on_absent: clear\n        mode: dry_run\n        actions:\n          - webhook: {{url: 'http://127.0.0.1:9/never'}}\n"
        ),
    )
    .unwrap();
    let (tx, mut rx) = tokio::sync::mpsc::channel::<ActionRequest>(64);
    let engine = Engine::new(registry.clone(), rules.path().to_path_buf(), None, tx).unwrap();
    assert_eq!(engine.status().len(), 1, "{:?}", engine.reload_status());

    // Prometheus's way: the alert with an end a while ahead, which it would keep moving.
    let starts = now_ms();
    let alert = json!({
        "labels": {"alertname": "DiskFull", "run": run, "severity": "critical"},
        "startsAt": rfc3339(starts),
        "endsAt": rfc3339(starts + 3_600_000),
    });
    post(&am, alert.clone()).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    while deliveries.lock().unwrap().is_empty() {
        assert!(Instant::now() < deadline, "Alertmanager never delivered");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let first = deliveries.lock().unwrap()[0].clone();
    assert_eq!(first["alerts"][0]["status"], "firing", "{first}");

    // Twenty minutes, one rule interval at a time: the receiver republishes what it holds
    // (what its task does every 15 s), the engine evaluates. Alertmanager stays silent (its
    // repeat_interval is 4 h), but for one redelivery of the same episode at minute 12.
    let t0 = clock.load(Ordering::SeqCst);
    let mut requests = Vec::new();
    let mut t = t0;
    for k in 0..=40 {
        t = t0 + k * 30_000;
        clock.store(t, Ordering::SeqCst);
        if k == 24 {
            let again = intake.receive(serde_json::from_value(first.clone()).unwrap(), t);
            assert_eq!((again.firing, again.duplicates), (0, 1));
        }
        intake.refresh(t);
        engine.tick(t);
        while let Ok(r) = rx.try_recv() {
            requests.push((k, r));
        }
    }
    let events: Vec<(i64, Event)> = requests.iter().map(|(k, r)| (*k, r.event)).collect();
    assert_eq!(
        events,
        vec![(14, Event::Firing)],
        "one firing edge after `for: 7m`, no resolution, no second episode"
    );
    let status = engine.status();
    assert!(
        matches!(
            status[0].instances.as_slice(),
            [i] if matches!(i.state, autotuner::rules::state::State::Firing { .. })
        ),
        "still firing at minute 20: {:?}",
        status[0].instances
    );
    // At Alertmanager, still one firing alert: nothing was resolved behind the rule's back.
    let active: Value = common::client()
        .get(format!("{}/api/v2/alerts?filter=run=\"{run}\"", am.base))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(active.as_array().unwrap().len(), 1, "{active}");

    // Resolved at Alertmanager: the resolution is delivered, the series goes, the rule resolves
    // (a resolution request, which never executes anything).
    let mut resolved = alert.clone();
    resolved["endsAt"] = json!(rfc3339(now_ms()));
    post(&am, resolved).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    while !deliveries
        .lock()
        .unwrap()
        .iter()
        .any(|d| d["alerts"][0]["status"] == "resolved")
    {
        assert!(
            Instant::now() < deadline,
            "the resolution was not delivered"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    t += 30_000;
    intake.refresh(t);
    engine.tick(t);
    let after: Vec<Event> = std::iter::from_fn(|| rx.try_recv().ok())
        .map(|r| r.event)
        .collect();
    assert_eq!(after, vec![Event::Resolved]);
    assert!(engine.status()[0].instances.is_empty());
}

/// One audit line of about 400 bytes.
fn line(ts_ms: i64, rule: &str) -> String {
    let mut s = serde_json::to_string(&json!({
        "time": rfc3339(ts_ms), "ts_ms": ts_ms, "phase": "decision", "decision": "would_apply",
        "actor": "engine", "rule": rule, "action": "webhook", "target": "http/hooks.example",
        "error": "x".repeat(250),
    }))
    .unwrap();
    s.push('\n');
    s
}

/// A data directory holding about `mb` MB of audit records over four files: `Busy` records
/// everywhere, `Rare` ones at the very start of the oldest file and the very end of the
/// newest. Returns the directory and the `Rare` records' times, newest first.
fn big_log(mb: usize) -> (tempfile::TempDir, Vec<i64>) {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    std::fs::create_dir(&data).unwrap();
    let per_file = mb * 1_000_000 / 4;
    let mut ts = 1_700_000_000_000;
    let mut rare = Vec::new();
    for name in [
        "audit.jsonl.3",
        "audit.jsonl.2",
        "audit.jsonl.1",
        "audit.jsonl",
    ] {
        let mut text = String::with_capacity(per_file + 1000);
        if name == "audit.jsonl.3" {
            for _ in 0..3 {
                ts += 1;
                text.push_str(&line(ts, "Rare"));
                rare.push(ts);
            }
        }
        while text.len() < per_file {
            ts += 1;
            text.push_str(&line(ts, "Busy"));
        }
        if name == "audit.jsonl" {
            ts += 1;
            text.push_str(&line(ts, "Rare"));
            rare.push(ts);
        }
        std::fs::write(data.join(name), text).unwrap();
    }
    rare.reverse();
    (dir, rare)
}

fn start_on(dir: &tempfile::TempDir, config: &str, rules: &str) -> Autotuner {
    let rules_dir = dir.path().join("rules");
    std::fs::create_dir_all(&rules_dir).unwrap();
    if !rules.is_empty() {
        std::fs::write(rules_dir.join("r.yml"), rules).unwrap();
    }
    let config = common::write_config(dir, config);
    Autotuner::start(
        &[
            &format!("--config.file={config}"),
            &format!("--rules.dir={}", rules_dir.display()),
            &format!("--data.dir={}", dir.path().join("data").display()),
        ],
        &[],
    )
}

const CONFIG: &str = "collectors:\n  host: {interval: 1s}\nactions:\n  audit: {max_bytes: 33554432, keep: 5}\nknobs:\n  batch_size: {initial: 1000, min: 100, max: 2000}\n";

async fn get(app: &Autotuner, path: &str) -> (u16, Value) {
    let r = common::client().get(app.url(path)).send().await.unwrap();
    let status = r.status().as_u16();
    let text = r.text().await.unwrap();
    let v = serde_json::from_str(&text).unwrap_or_else(|_| panic!("{path}: {status}: {text}"));
    (status, v)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_query_on_a_large_log_answers_newest_first_within_its_byte_bound() {
    let (dir, rare) = big_log(40);
    let app = start_on(&dir, CONFIG, "").await_ready().await;
    let (status, v) = get(&app, "/api/v1/audit?rule=Rare&limit=10").await;
    assert_eq!(status, 200, "{v}");
    let data = &v["data"];
    let bound = data["max_scan_bytes"].as_u64().unwrap();
    assert!(bound <= 8 << 20, "a bound of {bound} bytes");
    assert_eq!(data["records"][0]["ts_ms"], rare[0], "the newest first");
    assert_eq!(data["truncated"], true, "{}", data["scanned_bytes"]);
    // Going on by cursor reaches the oldest file's records, each answer within the bound.
    let mut found = vec![rare[0]];
    let mut cursor = data["next_cursor"].as_str().unwrap().to_owned();
    let mut pages = 1;
    loop {
        let (status, v) = get(
            &app,
            &format!("/api/v1/audit?rule=Rare&limit=10&cursor={cursor}"),
        )
        .await;
        assert_eq!(status, 200, "{v}");
        let data = &v["data"];
        let scanned = data["scanned_bytes"].as_u64().unwrap();
        assert!(scanned <= bound + 64 * 1024, "read {scanned} bytes");
        pages += 1;
        found.extend(
            data["records"]
                .as_array()
                .unwrap()
                .iter()
                .map(|r| r["ts_ms"].as_i64().unwrap()),
        );
        match data["next_cursor"].as_str() {
            Some(c) => cursor = c.to_owned(),
            None => break,
        }
        assert!(pages < 100, "no end");
    }
    assert_eq!(found, rare);
    assert!(pages >= 40_000_000 / (bound + 64 * 1024), "{pages} pages");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_audit_reads_is_bounded_and_the_excess_refused() {
    let (dir, _) = big_log(20);
    let app = start_on(&dir, CONFIG, "").await_ready().await;
    let url = app.url("/api/v1/audit?rule=Nothing");
    let http = common::client();
    let burst: Vec<_> = (0..100)
        .map(|_| {
            let (http, url) = (http.clone(), url.clone());
            tokio::spawn(async move {
                match http.get(url).send().await {
                    Ok(r) => {
                        let status = r.status().as_u16();
                        let retry = r.headers().get("retry-after").is_some();
                        (status, retry, r.text().await.unwrap_or_default())
                    }
                    // No answer within the client's timeout: unbounded work piled up.
                    Err(e) => (0, false, e.to_string()),
                }
            })
        })
        .collect();
    let (mut answered, mut refused) = (0, 0);
    for task in burst {
        let (status, retry, text) = task.await.unwrap();
        match status {
            200 => answered += 1,
            503 => {
                assert!(retry, "no Retry-After");
                assert!(text.contains("too many audit reads at once"), "{text}");
                refused += 1;
            }
            _ => panic!("{status}: {text}"),
        }
    }
    assert!(
        answered >= 1 && refused >= 1,
        "{answered} answered, {refused} refused"
    );
    // The slots are free again afterwards.
    let (status, v) = get(&app, "/api/v1/audit?rule=Nothing").await;
    assert_eq!(status, 200, "{v}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_landing_page_shows_recent_decisions_without_reading_the_log() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("data")).unwrap();
    let rule = "groups:\n  - name: g\n    interval: 1s\n    rules:\n      - name: Always\n        expr: host_cpus > 0\n        mode: dry_run\n        actions:\n          - knob: {name: batch_size, scale: 0.5}\n";
    let app = start_on(&dir, CONFIG, rule).await_ready().await;
    let log = dir.path().join("data/audit.jsonl");
    let deadline = Instant::now() + Duration::from_secs(20);
    while !std::fs::read_to_string(&log)
        .unwrap_or_default()
        .contains("would_apply")
    {
        assert!(Instant::now() < deadline, "no decision recorded");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The log is moved away (its writer keeps its open handle): the page shows the decisions
    // all the same.
    std::fs::rename(&log, dir.path().join("moved.jsonl")).unwrap();
    let page = common::client()
        .get(app.url("/"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let start = page.find("<table id=\"decisions\">").unwrap();
    let table = &page[start..start + page[start..].find("</table>").unwrap()];
    assert!(
        table.contains("<td>Always</td><td>knob</td>") && table.contains("would_apply"),
        "{table}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alerts_held_before_a_restart_are_published_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    std::fs::create_dir(&data).unwrap();
    // What the receiver wrote before the restart: one alert firing, delivered an hour ago.
    std::fs::write(
        data.join("received_alerts.json"),
        serde_json::to_vec(&json!({"firing": {"6b5f9d1a2c3e4f50": {
            "labels": {"alertname": "HeldOver", "service": "api"},
            "starts_at": rfc3339(now_ms() - 7_200_000),
            "ends_at_ms": null,
            "last_ms": now_ms() - 3_600_000,
        }}}))
        .unwrap(),
    )
    .unwrap();
    let app = start_on(&dir, CONFIG, "").await_ready().await;
    let scrape = app.scrape().await;
    assert_eq!(
        scrape.value(
            "autotuner_alert",
            &[("alertname", "HeldOver"), ("service", "api")]
        ),
        Some(1.0)
    );
}
