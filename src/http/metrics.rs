//! `GET /metrics`: the text exposition, prepared by the registry at collection time.
//!
//! Uses `registry` only. The handler never waits on a collector: it copies the prepared body and
//! appends the exporter's own metrics.

use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;

use super::AppState;
use crate::registry::TEXT_CONTENT_TYPE;

pub(super) async fn handler(State(state): State<AppState>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, TEXT_CONTENT_TYPE)],
        state.registry.render(),
    )
}
