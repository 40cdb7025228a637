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

/// The route.
pub fn routes() -> Router<AppState> {
    Router::new().route("/api/v1/query", get(query))
}

#[derive(serde::Deserialize)]
struct Form {
    query: Option<String>,
    time: Option<String>,
}

/// A value as Prometheus writes it: a string, with Go's spelling of the special values.
fn number(v: f64) -> String {
    if v.is_nan() {
        "NaN".to_owned()
    } else if v == f64::INFINITY {
        "+Inf".to_owned()
    } else if v == f64::NEG_INFINITY {
        "-Inf".to_owned()
    } else {
        format!("{v}")
    }
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
