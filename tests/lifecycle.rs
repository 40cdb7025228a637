//! The process's life through the real binary: `/-/ready` answers 503 until the first
//! collection round has finished (held off by a PostgreSQL target that accepts the connection
//! and never answers), and a request in flight when SIGTERM arrives still gets its answer
//! within the grace period, while the process refuses new work and then exits cleanly.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::io::{Read as _, Write as _};
use std::net::TcpStream;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::{Autotuner, client, write_config};

/// A TCP server on a loopback port of its own that accepts connections and never says a word
/// (a PostgreSQL that hangs before its greeting). Counts the connections it accepted; holds
/// them open until the test ends.
fn silent_server() -> (u16, Arc<AtomicUsize>) {
    let listener = common::listener();
    let port = listener.local_addr().unwrap().port();
    let accepted = Arc::new(AtomicUsize::new(0));
    let count = accepted.clone();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for stream in listener.incoming() {
            let Ok(stream) = stream else { break };
            held.push(stream);
            count.fetch_add(1, Ordering::SeqCst);
        }
    });
    (port, accepted)
}

#[tokio::test]
async fn ready_is_503_until_the_first_collection_round_has_finished() {
    let (port, accepted) = silent_server();
    let dir = tempfile::tempdir().unwrap();
    // The round cannot finish before the PostgreSQL collection's 6 s timeout: the server never
    // answers the startup message.
    let config = write_config(
        &dir,
        &format!(
            "collectors:\n  postgres:\n    interval: 10s\n    timeout: 6s\ntargets:\n  postgres:\n    - name: silent\n      url: 'postgres://monitor:pw@127.0.0.1:{port}/app'\n"
        ),
    );
    let app = Autotuner::start(&["--config.file", &config], &[]);
    let c = client();

    // Once the collector is inside its first attempt (our server saw its connection), the
    // round is known to be unfinished: readiness must say so.
    let deadline = Instant::now() + Duration::from_secs(20);
    while accepted.load(Ordering::SeqCst) == 0 {
        assert!(
            Instant::now() < deadline,
            "the PostgreSQL collector never connected"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let early = c.get(app.url("/-/ready")).send().await.unwrap();
    assert_eq!(early.status(), 503);
    assert!(
        early
            .text()
            .await
            .unwrap()
            .contains("first collection round"),
        "the 503 says why"
    );
    // Liveness is a different question: the process is healthy all along.
    assert_eq!(
        c.get(app.url("/-/healthy")).send().await.unwrap().status(),
        200
    );

    // When the hung attempt is cut off at its timeout, the round is over and the process is
    // ready, with the target reported down (a down target is not a reason to be unready).
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let r = c.get(app.url("/-/ready")).send().await.unwrap();
        if r.status() == 200 {
            break;
        }
        assert_eq!(r.status(), 503);
        assert!(
            Instant::now() < deadline,
            "not ready 30 s after start; log: {:#?}",
            app.log.lock().unwrap()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let s = app.scrape().await;
    assert_eq!(s.value("pg_up", &[("target", "silent")]), Some(0.0));
}

/// Reads one HTTP/1.1 response's status line and body (the server closes the connection after
/// it, as it does during a graceful shutdown).
fn read_response(stream: &mut TcpStream) -> String {
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut text = String::new();
    let _ = stream.read_to_string(&mut text);
    text
}

#[test]
fn a_request_in_flight_at_sigterm_is_answered_within_the_grace_period() {
    let dir = tempfile::tempdir().unwrap();
    let operate = "operate-token-for-the-lifecycle-test";
    let tokens = dir.path().join("tokens.yml");
    std::fs::write(
        &tokens,
        format!("tokens:\n  - {{name: oncall, role: operate, token: {operate}}}\n"),
    )
    .unwrap();
    let mut app = Autotuner::start(&[&format!("--web.tokens-file={}", tokens.display())], &[]);
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(app.wait_ready());

    // An Alertmanager delivery whose body is still on its way: the request is in flight (its
    // headers read, its handler waiting for the rest) when the signal arrives.
    let body = br#"{"version":"4","status":"firing","alerts":[]}"#;
    let (head, tail) = body.split_at(10);
    let mut stream = TcpStream::connect(app.addr).unwrap();
    write!(
        stream,
        "POST /api/v1/alerts/webhook HTTP/1.1\r\nHost: {}\r\nAuthorization: Bearer {operate}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        app.addr,
        body.len()
    )
    .unwrap();
    stream.write_all(head).unwrap();
    stream.flush().unwrap();
    std::thread::sleep(Duration::from_millis(300));

    let pid = app.child.id().to_string();
    assert!(
        std::process::Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success()
    );
    // The process waits for the request rather than exiting under it.
    let deadline = Instant::now() + Duration::from_secs(10);
    while !app
        .log
        .lock()
        .unwrap()
        .iter()
        .any(|l| l.contains("shutting down"))
    {
        assert!(Instant::now() < deadline, "no shutdown after SIGTERM");
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        app.child.try_wait().unwrap().is_none(),
        "exited with a request in flight, well within the grace period"
    );

    // The rest of the body arrives: the request is answered in full.
    stream.write_all(tail).unwrap();
    stream.flush().unwrap();
    let response = read_response(&mut stream);
    assert!(
        response.starts_with("HTTP/1.1 200"),
        "in-flight request after SIGTERM: {response:?}"
    );

    // Then the process exits cleanly, within the 5 s grace (plus room for a loaded machine).
    let started = Instant::now();
    let status = loop {
        if let Some(s) = app.child.try_wait().unwrap() {
            break s;
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "still running 10 s after its last request was answered"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success(), "exit status {status:?}");
    let log = app.log.lock().unwrap().join("\n");
    assert!(log.contains("\"stopped\""), "{log}");
    assert!(
        !log.contains("still open after the grace period"),
        "the request was cut off: {log}"
    );
}

/// The harness gives the binary an empty rules directory unless a test names one, so a shipped
/// rule (loaded from the crate root's `./rules` otherwise) can never act on a test's target.
#[tokio::test]
async fn the_harness_starts_the_binary_without_the_shipped_rules() {
    let app = Autotuner::start(&[], &[]).await_ready().await;
    let s = app
        .scrape_until(Duration::from_secs(10), "a rules reload", |s| {
            s.value("autotuner_rules_last_reload_successful", &[]) == Some(1.0)
        })
        .await;
    assert_eq!(s.value("autotuner_rules_loaded", &[]), Some(0.0));
    // The shipped rules are still there for the tests that name them.
    let shipped = concat!(env!("CARGO_MANIFEST_DIR"), "/rules");
    let app = Autotuner::start(&["--rules.dir", shipped], &[])
        .await_ready()
        .await;
    let s = app
        .scrape_until(Duration::from_secs(10), "the shipped rules", |s| {
            s.value("autotuner_rules_loaded", &[])
                .is_some_and(|n| n > 0.0)
        })
        .await;
    // Four shipped rules; with no `knobs:` configured, the batch-size controller (a knob action)
    // is skipped at load with a warning at that action, as docs/rules.md says, and the other
    // three run.
    assert_eq!(s.value("autotuner_rules_loaded", &[]), Some(3.0));
    let body = app.get_json("/api/v1/rules").await;
    let warnings = body["data"]["reload"]["warnings"].as_array().unwrap();
    let skipped: Vec<&str> = warnings
        .iter()
        .filter_map(|w| w.as_str())
        .filter(|w| w.contains("the rule is skipped"))
        .collect();
    assert_eq!(skipped.len(), 1, "{warnings:?}");
    assert!(
        skipped[0].contains("batch_size.yml") && skipped[0].contains("batch_size"),
        "{skipped:?}"
    );
    let names: Vec<&str> = body["data"]["rules"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|r| r["name"].as_str())
        .collect();
    assert!(!names.contains(&"BatchSizeController"), "{names:?}");
    for shipped in ["CacheMissRatioHigh", "HighMemory", "SlowQueries"] {
        assert!(names.contains(&shipped), "{shipped} not loaded: {names:?}");
    }
}

/// The harness's answer to a port taken between its choice and the server's bind: the server
/// fails ("Address already in use") and is started again on another port. Made real by taking
/// the first chosen port ourselves before a real redis-server tries it.
#[test]
fn a_server_whose_port_was_taken_is_started_on_another() {
    if common::require("redis-server").is_none() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("redis.log");
    let mut taken = Vec::new();
    let mut tried = Vec::new();
    let (port, mut child) = common::spawn_on_free_port(
        "redis-server",
        |port| {
            tried.push(port);
            if tried.len() == 1 {
                // Another process got there first.
                taken.push(std::net::TcpListener::bind(("127.0.0.1", port)).unwrap());
            }
            let _ = std::fs::remove_file(&log);
            std::process::Command::new("redis-server")
                .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
                .args(["--save", "", "--appendonly", "no"])
                .arg("--dir")
                .arg(dir.path())
                .arg("--logfile")
                .arg(&log)
                .spawn()
                .unwrap()
        },
        || std::fs::read_to_string(&log).unwrap_or_default(),
    );
    let alive = child.try_wait().unwrap().is_none();
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!(tried.len(), 2, "ports tried: {tried:?}");
    assert_eq!(port, tried[1]);
    assert_ne!(tried[0], tried[1]);
    assert!(alive, "the server on the second port is running");
}
