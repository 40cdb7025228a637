//! HTTP probes against a real local HTTP server started by the test: a fast endpoint, a slow one
//! (2.5 s), a failing one (500), a redirect not followed, and a refused port.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::time::Duration;

use axum::Router;
use axum::http::StatusCode;
use axum::response::Redirect;
use axum::routing::get;
use common::{Autotuner, write_config};

async fn start_app_server() -> std::net::SocketAddr {
    let app = Router::new()
        .route("/ok", get(|| async { "fine" }))
        .route(
            "/slow",
            get(|| async {
                tokio::time::sleep(Duration::from_millis(2_500)).await;
                "slow but fine"
            }),
        )
        .route(
            "/fail",
            get(|| async { (StatusCode::INTERNAL_SERVER_ERROR, "broken") }),
        )
        .route("/moved", get(|| async { Redirect::to("/ok") }));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    addr
}

#[tokio::test]
async fn probes_measure_slow_failing_redirected_and_refused_endpoints() {
    // The slow probe's duration is bounded below by the endpoint and above by the timeout:
    // no CPU burn from another test in its window.
    let _cpu = common::CpuHold::shared();
    let server = start_app_server().await;
    // A port held by a socket that is bound but not listening: connections to it are refused,
    // and no other process can take it and answer while the test runs.
    let held = tokio::net::TcpSocket::new_v4().unwrap();
    held.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let refused = held.local_addr().unwrap().port();
    let dir = tempfile::tempdir().unwrap();
    let file = write_config(
        &dir,
        &format!(
            "collectors:\n  http_probe:\n    interval: 5s\n    timeout: 4500ms\n    error_ratio_window: 1m\ntargets:\n  http:\n\
             \x20   - {{name: ok, url: 'http://{server}/ok', timeout: 4s}}\n\
             \x20   - {{name: slow, url: 'http://{server}/slow', timeout: 4s}}\n\
             \x20   - {{name: fail, url: 'http://{server}/fail', timeout: 4s}}\n\
             \x20   - {{name: moved, url: 'http://{server}/moved', timeout: 4s, follow_redirects: false, expected_status: [303]}}\n\
             \x20   - {{name: refused, url: 'http://127.0.0.1:{refused}/', timeout: 4s}}\n"
        ),
    );
    let app = Autotuner::start(&["--config.file", &file], &[]);
    // Ready after the first round, which waits for the slow endpoint.
    app.wait_ready().await;
    let s = app.scrape().await;
    let v = |name: &str, target: &str| s.value(name, &[("target", target)]).unwrap();

    assert_eq!(v("probe_http_success", "ok"), 1.0);
    assert_eq!(v("probe_http_status_code", "ok"), 200.0);
    assert_eq!(v("probe_http_error_ratio", "ok"), 0.0);

    assert_eq!(v("probe_http_success", "slow"), 1.0);
    let slow = v("probe_http_duration_seconds", "slow");
    assert!((2.5..4.0).contains(&slow), "slow endpoint measured {slow}s");

    assert_eq!(v("probe_http_success", "fail"), 0.0);
    assert_eq!(v("probe_http_status_code", "fail"), 500.0);
    assert_eq!(v("probe_http_error_ratio", "fail"), 1.0);

    // Not followed: the redirect itself is the answer, and 303 was what we expected.
    assert_eq!(v("probe_http_status_code", "moved"), 303.0);
    assert_eq!(v("probe_http_success", "moved"), 1.0);

    assert_eq!(v("probe_http_success", "refused"), 0.0);
    assert_eq!(v("probe_http_status_code", "refused"), 0.0);
    assert_eq!(
        s.value("autotuner_collector_up", &[("collector", "http_probe")]),
        Some(1.0)
    );

    let log = app.log.lock().unwrap().join("\n");
    assert!(
        log.contains("HTTP probe failing") && log.contains("unexpected status 500"),
        "{log}"
    );
    assert!(
        log.contains("Connection refused") || log.contains("connection refused"),
        "{log}"
    );
}
