//! What is refused before a request's body is read: a declared body longer than any route
//! takes (413), and a change to the admin API by a caller without the role for it (401/403).
//! A handler reads its body only after both, so a large or unwanted upload costs the server
//! its headers, never its bytes (issue 22).
//!
//! Owns that middleware. Uses the admin API's `authorize` and `MAX_BODY`.

use axum::extract::{Request, State};
use axum::http::{Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::Response;

use super::AppState;
use super::admin::{MAX_BODY, Peer, authorize, error, peer};
use super::auth::Role;

/// The middleware: passes the request on only when its body may be read.
pub async fn before_body(
    State(state): State<AppState>,
    p: Peer,
    request: Request,
    next: Next,
) -> Response {
    let declared = request
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok());
    if declared.is_some_and(|n| n > MAX_BODY as u64) {
        return error(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("request bodies are limited to {MAX_BODY} bytes"),
        );
    }
    // Every method but GET and HEAD under /api/v1 changes something and needs the operate
    // role, except the query API's form POST, which reads.
    let path = request.uri().path();
    let reading = matches!(*request.method(), Method::GET | Method::HEAD);
    if !reading && path.starts_with("/api/v1/") {
        let need = if path == "/api/v1/query" {
            Role::Read
        } else {
            Role::Operate
        };
        if let Err(refused) = authorize(&state, request.headers(), peer(&p), need) {
            return refused;
        }
    }
    next.run(request).await
}
