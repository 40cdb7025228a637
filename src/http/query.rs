//! `GET /api/v1/query`: a PromQL expression evaluated over the history the rules read, answered
//! in Prometheus's own API format, so an operator (or a test) sees exactly what a rule would
//! see — collected series, scraped application series and all — with the same tools they use
//! on Prometheus (`curl`, Grafana's data source, `promtool query instant`).
//!
//! Owns that route. Uses the admin API's `authorize` (read role), the rule evaluator and the
//! registry; it reads only.

use axum::extract::{Query as Params, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde_json::{Value as JsonValue, json};

use super::AppState;
use super::admin::{Peer, authorize, error, peer};
use super::auth::Role;
use crate::rules::expr::{Evaluator, Query, Value};
use crate::sample::format_value as number;

/// The route.
pub fn routes() -> Router<AppState> {
    Router::new().route("/api/v1/query", get(query).post(query_form))
}

/// At most this many queries are evaluated at once; more get 503 (each reads the history
/// under its lock and builds its whole answer in memory).
static RUNNING: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(4);

/// Largest answer: a query past it is refused (422) rather than built.
const MAX_SERIES: usize = 50_000;
const MAX_POINTS: usize = 1_000_000;

/// The form POST Grafana's Prometheus data source sends by default.
async fn query_form(
    state: State<AppState>,
    headers: HeaderMap,
    p: Peer,
    form: Result<axum::Form<Form>, axum::extract::rejection::FormRejection>,
) -> Response {
    match form {
        Ok(axum::Form(f)) => query(state, headers, p, Params(f)).await,
        Err(e) => (
            StatusCode::BAD_REQUEST,
            Json(json!({"status": "error", "errorType": "bad_data", "error": e.body_text()})),
        )
            .into_response(),
    }
}

#[derive(serde::Deserialize)]
struct Form {
    query: Option<String>,
    time: Option<String>,
}

fn labels(l: &crate::sample::Labels) -> JsonValue {
    JsonValue::Object(
        l.iter()
            .map(|(k, v)| (k.to_owned(), JsonValue::String(v.to_owned())))
            .collect(),
    )
}

/// The evaluation time: RFC 3339 or Unix seconds, as Prometheus accepts it; now when absent.
fn time_ms(text: Option<&str>) -> Result<i64, String> {
    let Some(t) = text else {
        return Ok(crate::collect::now_ms());
    };
    if let Ok(secs) = t.parse::<f64>()
        && secs.is_finite()
    {
        return Ok((secs * 1000.0).round() as i64);
    }
    chrono::DateTime::parse_from_rfc3339(t)
        .map(|d| d.timestamp_millis())
        .map_err(|_| format!("invalid parameter \"time\": cannot parse {t:?} to a valid timestamp"))
}

async fn query(
    State(state): State<AppState>,
    headers: HeaderMap,
    p: Peer,
    Params(form): Params<Form>,
) -> Response {
    if let Err(r) = authorize(&state, &headers, peer(&p), Role::Read) {
        return r;
    }
    let bad = |m: String| {
        (
            StatusCode::BAD_REQUEST,
            Json(json!({"status": "error", "errorType": "bad_data", "error": m})),
        )
            .into_response()
    };
    let Some(text) = form.query else {
        return bad("invalid parameter \"query\": missing".to_owned());
    };
    let at_ms = match time_ms(form.time.as_deref()) {
        Ok(t) => t,
        Err(m) => return bad(m),
    };
    let q = match Query::parse(&text) {
        Ok(q) => q,
        Err(m) => return bad(m),
    };
    let Ok(_permit) = RUNNING.try_acquire() else {
        let mut r = (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"status": "error", "errorType": "unavailable", "error": "too many queries at once; retry"})),
        )
            .into_response();
        r.headers_mut().insert(
            axum::http::header::RETRY_AFTER,
            axum::http::HeaderValue::from_static("1"),
        );
        return r;
    };
    let registry = state.registry.clone();
    // Evaluation reads the history under its lock: off the async workers.
    let value =
        tokio::task::spawn_blocking(move || Evaluator::new(registry.as_ref(), at_ms).eval(&q))
            .await;
    let value = match value {
        Ok(Ok(v)) => v,
        Ok(Err(m)) => {
            return (
                StatusCode::UNPROCESSABLE_ENTITY,
                Json(json!({"status": "error", "errorType": "execution", "error": m})),
            )
                .into_response();
        }
        Err(e) => return error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    };
    let (series, points) = match &value {
        Value::Vector(v) => (v.len(), v.len()),
        Value::Matrix(m) => (m.len(), m.iter().map(|(_, p)| p.len()).sum()),
        Value::Scalar(_) | Value::String(_) => (1, 1),
    };
    if series > MAX_SERIES || points > MAX_POINTS {
        return (
            StatusCode::UNPROCESSABLE_ENTITY,
            Json(json!({"status": "error", "errorType": "execution", "error": format!(
                "the answer holds {series} series and {points} points, more than {MAX_SERIES} and {MAX_POINTS}: narrow the query"
            )})),
        )
            .into_response();
    }
    let t = at_ms as f64 / 1000.0;
    let data = match value {
        Value::Scalar(x) => json!({"resultType": "scalar", "result": [t, number(x)]}),
        Value::String(s) => json!({"resultType": "string", "result": [t, s]}),
        Value::Vector(v) => json!({
            "resultType": "vector",
            "result": v.iter().map(|s| json!({
                "metric": labels(&s.labels),
                "value": [t, number(s.value)],
            })).collect::<Vec<_>>(),
        }),
        Value::Matrix(m) => json!({
            "resultType": "matrix",
            "result": m.iter().map(|(l, points)| json!({
                "metric": labels(l),
                "values": points.iter().map(|p| json!([p.t_ms as f64 / 1000.0, number(p.v)])).collect::<Vec<_>>(),
            })).collect::<Vec<_>>(),
        }),
    };
    Json(json!({"status": "success", "data": data})).into_response()
}
