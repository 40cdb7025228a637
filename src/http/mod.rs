//! The HTTP surface: router, listeners and graceful shutdown.
//!
//! Routes (`GET` and `HEAD` unless said otherwise):
//! - `/metrics` (the `--web.telemetry-path`): the Prometheus text exposition, gzip when asked.
//! - `/`: a landing page naming the endpoints and each collector's status.
//! - `/-/healthy`: 200 whenever the process serves HTTP.
//! - `/-/ready`: 200 once every collector has run once, 503 before.
//! - `/-/reload` (`POST`, `PUT`): reload the rules now; 200 with the count, or 500 with every
//!   error (the running rules are kept).
//!   error (the running rules are kept). Needs the operate role once tokens are configured.
//! - `/api/v1/rules`: every rule's health, last error, pending and firing instances, and the
//!   last reload's outcome, as JSON.
//! - `/api/v1/recommendations`: the index advice of every PostgreSQL target, merged across
//!   runs (first and last seen, times seen, status), as JSON; 404 when no advisor runs.
//! - the rest of the admin API (`admin`): status, rules, audit, knobs, breakers, playbooks,
//!   the Alertmanager webhook receiver.
//!
//! Under `/api/` every answer is JSON, errors included (`{"status":"error","error":...}`):
//! unknown paths 404, wrong methods 405, malformed bodies 400, bodies over 1 MiB 413.
//!
//! With `--web.config.file` (`webconfig`), every route, `/metrics` included, can need TLS and
//! basic auth.
//!
//! Uses `registry` (read only), `advisor::Recommendations` (read only), the rule engine and the
//! actions stage (through `admin`), and `shutdown`.

pub mod admin;
pub mod auth;
mod guard;
pub mod intake;
mod landing;
mod metrics;
mod query;
pub mod webconfig;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Router;
use axum::http::StatusCode;
use axum::routing::get;
use tokio::net::TcpListener;

use crate::advisor::Recommendations;
use crate::registry::Registry;
use crate::rules::engine::Engine;
use crate::shutdown::Shutdown;

/// What the handlers share.
#[derive(Clone)]
pub struct AppState {
    /// Where the measurements are.
    pub registry: Arc<Registry>,
    /// The metrics path, for the landing page's link.
    pub telemetry_path: String,
    /// When the process started, for the uptime on the landing page.
    pub started: Instant,
    /// The rule engine, for `/api/v1/rules` and `/-/reload`.
    pub engine: Option<Arc<Engine>>,
    /// The index advice, for `/api/v1/recommendations`.
    pub recommendations: Option<Arc<Recommendations>>,
    /// The admin API's parts (tokens, actions, the webhook receiver); without them the API
    /// only reads.
    pub admin: Option<Arc<admin::Admin>>,
}

/// The router for `state`.
pub fn router(state: AppState) -> Router {
    // Prometheus asks for gzip; the exposition compresses about tenfold (the handler
    // compresses, once per published body).
    let metrics = Router::new().route(&state.telemetry_path, get(metrics::handler));
    Router::new()
        .route("/", get(landing::handler))
        .route("/-/healthy", get(healthy))
        .route("/-/ready", get(ready))
        .route("/-/reload", axum::routing::post(reload).put(reload))
        .route("/api/v1/rules", get(rules))
        .route("/api/v1/recommendations", get(recommendations))
        .merge(admin::routes())
        .merge(query::routes())
        .merge(metrics)
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(axum::extract::DefaultBodyLimit::max(admin::MAX_BODY))
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            guard::before_body,
        ))
        .with_state(state)
}

async fn healthy() -> &'static str {
    "autotuner is Healthy.\n"
}

async fn ready(
    axum::extract::State(state): axum::extract::State<AppState>,
) -> (StatusCode, &'static str) {
    if state.registry.is_ready() {
        (StatusCode::OK, "autotuner is Ready.\n")
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "autotuner is not ready: the first collection round has not finished.\n",
        )
    }
}

/// Reloads the rules now and answers with the outcome: 200 with the count, or 500 with every
/// error (the running rules are kept).
async fn reload(
    axum::extract::State(state): axum::extract::State<AppState>,
    headers: axum::http::HeaderMap,
    peer: admin::Peer,
) -> axum::response::Response {
    use axum::response::IntoResponse;
    // Reloading only re-reads the files on disk: open while no token is configured (as
    // before), the operate role's once there are tokens.
    if state.admin.as_ref().is_some_and(|a| a.auth.configured())
        && let Err(r) = admin::authorize(&state, &headers, admin::peer(&peer), auth::Role::Operate)
    {
        return r;
    }
    let Some(engine) = state.engine else {
        return (StatusCode::NOT_FOUND, "no rule engine\n").into_response();
    };
    match tokio::task::spawn_blocking(move || engine.reload()).await {
        Ok(Ok(n)) => (
            StatusCode::OK,
            axum::Json(serde_json::json!({"status": "success", "rules": n})),
        )
            .into_response(),
        Ok(Err(errors)) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            axum::Json(serde_json::json!({"status": "error", "errors": errors})),
        )
            .into_response(),
        Err(err) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("reload failed: {err}\n"),
        )
            .into_response(),
    }
}

/// The rules, their health and instances, and the last reload's outcome.
async fn rules(
    axum::extract::State(state): axum::extract::State<AppState>,
    headers: axum::http::HeaderMap,
    peer: admin::Peer,
) -> axum::response::Response {
    use axum::response::IntoResponse;
    if let Err(r) = admin::authorize(&state, &headers, admin::peer(&peer), auth::Role::Read) {
        return r;
    }
    let Some(engine) = state.engine else {
        return (StatusCode::NOT_FOUND, "no rule engine\n").into_response();
    };
    axum::Json(serde_json::json!({
        "status": "success",
        "data": { "rules": engine.status(), "reload": engine.reload_status() },
    }))
    .into_response()
}

/// The index advice, merged across runs, largest saving first within each target.
async fn recommendations(
    axum::extract::State(state): axum::extract::State<AppState>,
    headers: axum::http::HeaderMap,
    peer: admin::Peer,
) -> axum::response::Response {
    use axum::response::IntoResponse;
    if let Err(r) = admin::authorize(&state, &headers, admin::peer(&peer), auth::Role::Read) {
        return r;
    }
    let Some(store) = state.recommendations else {
        return (StatusCode::NOT_FOUND, "no index advisor\n").into_response();
    };
    axum::Json(serde_json::json!({
        "status": "success",
        "data": { "recommendations": store.list() },
    }))
    .into_response()
}

async fn not_found(uri: axum::http::Uri) -> axum::response::Response {
    use axum::response::IntoResponse;
    if uri.path().starts_with("/api/") {
        admin::error(
            StatusCode::NOT_FOUND,
            format!("no such endpoint: {}", uri.path()),
        )
    } else {
        (StatusCode::NOT_FOUND, "404 page not found\n").into_response()
    }
}

async fn method_not_allowed(
    method: axum::http::Method,
    uri: axum::http::Uri,
) -> axum::response::Response {
    admin::error(
        StatusCode::METHOD_NOT_ALLOWED,
        format!("{method} is not allowed on {}", uri.path()),
    )
}

/// Binds every address first, so a port in use fails the start before anything runs.
pub async fn bind(addrs: &[SocketAddr]) -> std::io::Result<Vec<TcpListener>> {
    let mut listeners = Vec::with_capacity(addrs.len());
    for addr in addrs {
        let listener = TcpListener::bind(addr).await.map_err(|err| {
            std::io::Error::new(err.kind(), format!("listening on {addr}: {err}"))
        })?;
        listeners.push(listener);
    }
    Ok(listeners)
}

/// Serves `router` on every listener until shutdown, then lets requests in flight finish for
/// at most `grace`. With `web` holding TLS settings, every listener speaks TLS.
pub async fn serve(
    listeners: Vec<TcpListener>,
    router: Router,
    shutdown: Shutdown,
    grace: Duration,
    web: Option<Arc<webconfig::WebConfig>>,
) {
    use axum::serve::ListenerExt;
    let tls = web.filter(|w| w.tls());
    let mut servers = tokio::task::JoinSet::new();
    for listener in listeners {
        let router = router.clone();
        let mut stop = shutdown.clone();
        let addr = listener.local_addr().ok();
        // The peer's address lets the admin API limit failed attempts per client.
        let service = router.into_make_service_with_connect_info::<SocketAddr>();
        match &tls {
            None => {
                servers.spawn(async move {
                    let result = axum::serve(listener, service)
                        .with_graceful_shutdown(async move { stop.wait().await })
                        .await;
                    if let Err(err) = result {
                        tracing::error!(address = ?addr, error = %err, "HTTP server failed");
                    }
                });
            }
            Some(web) => {
                let listener =
                    match webconfig::TlsListener::new(listener, web.clone(), shutdown.clone()) {
                        Ok(l) => l,
                        Err(err) => {
                            tracing::error!(address = ?addr, error = %err, "HTTPS listener failed");
                            continue;
                        }
                    };
                servers.spawn(async move {
                    // `tap_io` is there for its `Connected` impl: it gives handlers the peer's
                    // address (`ConnectInfo<SocketAddr>`) for any listener whose address is one.
                    let result = axum::serve(listener.tap_io(|_| {}), service)
                        .with_graceful_shutdown(async move { stop.wait().await })
                        .await;
                    if let Err(err) = result {
                        tracing::error!(address = ?addr, error = %err, "HTTPS server failed");
                    }
                });
            }
        }
    }
    let mut stop = shutdown;
    stop.wait().await;
    // Scrapes take microseconds; anything still running after the grace period is a stuck
    // client, not worth holding the exit for.
    if tokio::time::timeout(grace, async {
        while servers.join_next().await.is_some() {}
    })
    .await
    .is_err()
    {
        tracing::warn!(
            grace_seconds = grace.as_secs_f64(),
            "HTTP connections still open after the grace period; closing them"
        );
        servers.abort_all();
    }
}
