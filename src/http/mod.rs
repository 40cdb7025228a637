//! The HTTP surface: router, listeners and graceful shutdown.
//!
//! Routes (every one answers `GET` and `HEAD`):
//! - `/metrics` (the `--web.telemetry-path`): the Prometheus text exposition, gzip when asked.
//! - `/`: a landing page naming the endpoints and each collector's status.
//! - `/-/healthy`: 200 whenever the process serves HTTP.
//! - `/-/ready`: 200 once every collector has run once, 503 before.
//!
//! Uses `registry` (read only) and `shutdown`. Unknown paths get a 404 with a plain-text body.

mod landing;
mod metrics;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Router;
use axum::http::StatusCode;
use axum::routing::get;
use tokio::net::TcpListener;
use tower_http::compression::CompressionLayer;

use crate::registry::Registry;
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
}

/// The router for `state`.
pub fn router(state: AppState) -> Router {
    let metrics = Router::new()
        .route(&state.telemetry_path, get(metrics::handler))
        // Prometheus asks for gzip; the exposition compresses about tenfold.
        .layer(
            CompressionLayer::new()
                .gzip(true)
                .no_br()
                .no_deflate()
                .no_zstd(),
        );
    Router::new()
        .route("/", get(landing::handler))
        .route("/-/healthy", get(healthy))
        .route("/-/ready", get(ready))
        .merge(metrics)
        .fallback(not_found)
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

async fn not_found() -> (StatusCode, &'static str) {
    (StatusCode::NOT_FOUND, "404 page not found\n")
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
/// at most `grace`.
pub async fn serve(
    listeners: Vec<TcpListener>,
    router: Router,
    shutdown: Shutdown,
    grace: Duration,
) {
    let mut servers = tokio::task::JoinSet::new();
    for listener in listeners {
        let router = router.clone();
        let mut stop = shutdown.clone();
        servers.spawn(async move {
            let addr = listener.local_addr().ok();
            let result = axum::serve(listener, router)
                .with_graceful_shutdown(async move { stop.wait().await })
                .await;
            if let Err(err) = result {
                tracing::error!(address = ?addr, error = %err, "HTTP server failed");
            }
        });
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
