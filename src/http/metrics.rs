//! `GET /metrics`: the text exposition, prepared by the registry at collection time.
//!
//! Uses `registry` only. The handler never waits on a collector: it copies the prepared body and
//! appends the exporter's own metrics. Gzip (which Prometheus always asks for) comes from the
//! registry too, compressed once per published body rather than on every scrape.

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};

use super::AppState;
use crate::registry::TEXT_CONTENT_TYPE;

pub(super) async fn handler(State(state): State<AppState>, headers: HeaderMap) -> Response {
    let vary = (header::VARY, "Accept-Encoding");
    if accepts_gzip(&headers) {
        // Compressing a new body takes milliseconds: off the async workers, so other
        // requests never wait behind it.
        let registry = state.registry.clone();
        match tokio::task::spawn_blocking(move || registry.render_gzip()).await {
            Ok(Ok(body)) => {
                return (
                    [
                        (header::CONTENT_TYPE, TEXT_CONTENT_TYPE),
                        (header::CONTENT_ENCODING, "gzip"),
                        vary,
                    ],
                    body,
                )
                    .into_response();
            }
            // Compressing into memory does not fail in practice; if it does, the plain
            // body still serves the scrape.
            Ok(Err(err)) => tracing::warn!(error = %err, "compressing /metrics failed"),
            Err(err) => tracing::warn!(error = %err, "compressing /metrics did not finish"),
        }
    }
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, TEXT_CONTENT_TYPE), vary],
        state.registry.render(),
    )
        .into_response()
}

/// Whether `Accept-Encoding` accepts gzip: named (or `*`) without `q=0` (RFC 9110 §12.5.3).
fn accepts_gzip(headers: &HeaderMap) -> bool {
    let mut gzip = None;
    let mut any = None;
    for value in headers.get_all(header::ACCEPT_ENCODING) {
        let Ok(value) = value.to_str() else {
            continue;
        };
        for item in value.split(',') {
            let mut parts = item.split(';');
            let coding = parts.next().unwrap_or("").trim().to_ascii_lowercase();
            let q = parts
                .filter_map(|p| p.trim().strip_prefix("q=").or(p.trim().strip_prefix("Q=")))
                .find_map(|q| q.trim().parse::<f64>().ok())
                .unwrap_or(1.0);
            match coding.as_str() {
                "gzip" | "x-gzip" => gzip = Some(q > 0.0),
                "*" => any = Some(q > 0.0),
                _ => {}
            }
        }
    }
    gzip.or(any).unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn accepts(value: &str) -> bool {
        let mut h = HeaderMap::new();
        h.insert(header::ACCEPT_ENCODING, value.parse().unwrap());
        accepts_gzip(&h)
    }

    #[test]
    fn gzip_is_used_only_when_the_client_accepts_it() {
        // What Prometheus sends.
        assert!(accepts("gzip"));
        assert!(accepts("br, gzip;q=0.5, deflate"));
        assert!(accepts("*"));
        assert!(accepts("GZIP"));
        assert!(!accepts("gzip;q=0"));
        assert!(!accepts("gzip; q=0.0"));
        assert!(!accepts("identity"));
        assert!(!accepts("deflate, br"));
        // Named with q=0, it is refused even when `*` would take it.
        assert!(!accepts("*, gzip;q=0"));
        assert!(!accepts("*;q=0"));
        assert!(!accepts(""));
    }
}
