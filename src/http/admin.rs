//! The admin API under `/api/v1`, JSON in and out, behind bearer tokens (`auth`): reading needs
//! the `read` role (open when no token is configured), every change needs `operate` and is an
//! audit record with its actor.
//!
//! | method | path | role | does |
//! | --- | --- | --- | --- |
//! | GET | `/api/v1/status` | read | version, uptime, collectors, targets up, rules by state, knobs, breakers |
//! | GET | `/api/v1/rules` | read | every rule with state, health, errors, instances; the last reload |
//! | GET | `/api/v1/rules/{name}` | read | one rule, and each part of its conditions evaluated now |
//! | POST | `/api/v1/rules/{name}/mode` | operate | `{"mode": "observe"\|"dry_run"\|"enforce"\|null}` |
//! | GET | `/api/v1/audit` | read | audit records, newest first: `rule`, `decision`, `phase`, `since`, `until`, `limit`, `offset`, `cursor`; bounded (see [`AUDIT_SCAN_BYTES`], [`AUDIT_READERS`]) |
//! | GET | `/api/v1/knobs`, `/api/v1/knobs/{name}` | read | knobs with values, bounds, status |
//! | POST | `/api/v1/knobs/{name}` | operate | `{"value": N}` within the bounds |
//! | GET | `/api/v1/breakers` | read | open circuit breakers |
//! | POST | `/api/v1/breakers/{rule}/reset` | operate | close a rule's breakers |
//! | GET | `/api/v1/recommendations` | read | index advice |
//! | GET | `/api/v1/playbooks` | read | the playbooks |
//! | POST | `/api/v1/playbooks/{name}/run` | operate | run one now; per-step results and timings |
//! | POST | `/api/v1/alerts/webhook` | operate | Alertmanager's webhook receiver |
//!
//! Uses `auth`, `intake`, `registry`, `rules::engine`, `actions::runner` and `audit`.

// A refusal is the answer itself (a `Response`), returned early from handlers that answer with
// a `Response` anyway: boxing it would only add an allocation to the error path.
#![allow(clippy::result_large_err)]

use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::rejection::JsonRejection;
use axum::extract::{ConnectInfo, Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{Value, json};

use super::AppState;
use super::auth::{Auth, Caller, Role};
use super::intake::{AlertIntake, Payload};
use crate::actions::Mode;
use crate::actions::runner::Actions;
use crate::audit::{AuditError, Cursor, Record, rfc3339};

/// The admin API's parts.
pub struct Admin {
    /// The actions stage (knobs, breakers, playbooks, the audit log), when running.
    pub actions: Option<Actions>,
    /// The tokens.
    pub auth: Arc<Auth>,
    /// The Alertmanager webhook receiver.
    pub intake: Arc<AlertIntake>,
}

/// Largest request body accepted (an Alertmanager delivery of a few hundred alerts fits).
pub const MAX_BODY: usize = 1 << 20;

/// A JSON error answer.
pub fn error(status: StatusCode, message: impl Into<String>) -> Response {
    (
        status,
        Json(json!({ "status": "error", "error": message.into() })),
    )
        .into_response()
}

fn ok(data: impl serde::Serialize) -> Response {
    Json(json!({ "status": "success", "data": data })).into_response()
}

/// The token of a request: `Authorization: Bearer …`, or `X-Autotuner-Token` (for when basic
/// auth in front takes the `Authorization` header).
fn token(headers: &HeaderMap) -> Option<&str> {
    headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            v.strip_prefix("Bearer ")
                .or_else(|| v.strip_prefix("bearer "))
        })
        .or_else(|| {
            headers
                .get("x-autotuner-token")
                .and_then(|v| v.to_str().ok())
        })
        .map(str::trim)
}

/// Checks the caller against `need`; the refusal is the answer.
pub fn authorize(
    state: &AppState,
    headers: &HeaderMap,
    peer: Option<SocketAddr>,
    need: Role,
) -> Result<Caller, Response> {
    let Some(admin) = &state.admin else {
        // No admin state (a test rig): reading only.
        return match need {
            Role::Read => Ok(Caller {
                name: "anonymous".into(),
                role: Role::Read,
            }),
            Role::Operate => Err(error(StatusCode::FORBIDDEN, "changes are disabled")),
        };
    };
    admin
        .auth
        .check(token(headers), peer.map(|p| p.ip()), need)
        .map_err(|r| {
            let status = StatusCode::from_u16(r.status).unwrap_or(StatusCode::FORBIDDEN);
            let mut resp = error(status, r.message);
            if status == StatusCode::UNAUTHORIZED {
                resp.headers_mut().insert(
                    axum::http::header::WWW_AUTHENTICATE,
                    axum::http::HeaderValue::from_static("Bearer realm=\"autotuner\""),
                );
            }
            resp
        })
}

/// The client's address, when the server recorded it (`ConnectInfo`).
pub type Peer = Option<axum::Extension<ConnectInfo<SocketAddr>>>;

/// The address of `p`.
pub fn peer(p: &Peer) -> Option<SocketAddr> {
    p.as_ref().map(|c| (c.0).0)
}

/// The routes (the router adds `/api/v1/rules` and `/api/v1/recommendations` itself).
pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/api/v1/status", get(status))
        .route("/api/v1/mode", get(global_mode).put(set_global_mode))
        .route("/api/v1/rules/{name}", get(rule))
        .route("/api/v1/rules/{name}/mode", post(set_mode))
        .route("/api/v1/audit", get(audit))
        .route("/api/v1/knobs", get(knobs))
        .route("/api/v1/knobs/{name}", get(knob).post(set_knob))
        .route("/api/v1/breakers", get(breakers))
        .route("/api/v1/breakers/{rule}/reset", post(reset_breaker))
        .route("/api/v1/playbooks", get(playbooks))
        .route("/api/v1/playbooks/{name}/run", post(run_playbook))
        .route("/api/v1/alerts/webhook", post(webhook))
}

fn actions(state: &AppState) -> Result<&Actions, Response> {
    state
        .admin
        .as_ref()
        .and_then(|a| a.actions.as_ref())
        .ok_or_else(|| error(StatusCode::NOT_FOUND, "the actions stage is not running"))
}

/// The latest value of each target's `up`-style metric.
fn targets(state: &AppState) -> Vec<Value> {
    let now = crate::collect::now_ms();
    let mut out = Vec::new();
    for (kind, metric) in [
        ("postgres", "pg_up"),
        ("redis", "redis_up"),
        ("pgbouncer", "pgbouncer_up"),
        ("http", "probe_http_success"),
    ] {
        for (labels, points) in state.registry.range(metric, now - 120_000, now) {
            if let Some(p) = points.last() {
                out.push(json!({
                    "kind": kind,
                    "target": labels.get("target").unwrap_or(""),
                    "up": p.v == 1.0,
                    "at_ms": p.t_ms,
                }));
            }
        }
    }
    out
}

async fn status(State(state): State<AppState>, headers: HeaderMap, p: Peer) -> Response {
    if let Err(r) = authorize(&state, &headers, peer(&p), Role::Read) {
        return r;
    }
    let rules = state
        .engine
        .as_ref()
        .map(|e| e.status())
        .unwrap_or_default();
    let (mut pending, mut firing) = (0, 0);
    for r in &rules {
        for i in &r.instances {
            match i.state {
                crate::rules::state::State::Pending { .. } => pending += 1,
                crate::rules::state::State::Firing { .. } => firing += 1,
                crate::rules::state::State::Inactive => {}
            }
        }
    }
    let acts = state.admin.as_ref().and_then(|a| a.actions.as_ref());
    ok(json!({
        "version": env!("CARGO_PKG_VERSION"),
        "uptime_seconds": state.started.elapsed().as_secs_f64(),
        "collectors": state.registry.collectors(),
        "targets": targets(&state),
        "rules": {
            "loaded": rules.len(),
            "unhealthy": rules.iter().filter(|r| r.health == "err").count(),
            "pending_instances": pending,
            "firing_instances": firing,
            "reload": state.engine.as_ref().map(|e| e.reload_status()),
        },
        "knobs": acts.map(Actions::knobs).unwrap_or_default(),
        "breakers": acts.map(breaker_list).unwrap_or_default(),
        "actions": acts.map(|a| {
            let stopped = a.stopped();
            json!({ "stopped": stopped.is_some(), "reason": stopped, "mode": a.global_mode() })
        }),
    }))
}

fn breaker_list(a: &Actions) -> Vec<Value> {
    a.open_breakers()
        .into_iter()
        .map(|(rule, instance, since)| {
            json!({ "rule": rule, "instance": instance, "open_since": rfc3339(since) })
        })
        .collect()
}

async fn rule(
    State(state): State<AppState>,
    Path(name): Path<String>,
    headers: HeaderMap,
    p: Peer,
) -> Response {
    if let Err(r) = authorize(&state, &headers, peer(&p), Role::Read) {
        return r;
    }
    let Some(engine) = &state.engine else {
        return error(StatusCode::NOT_FOUND, "no rule engine");
    };
    let Some(status) = engine.status().into_iter().find(|r| r.name == name) else {
        return error(StatusCode::NOT_FOUND, format!("no rule named {name:?}"));
    };
    let engine = engine.clone();
    let rule = name.clone();
    // Evaluation reads the history under its lock: off the async workers.
    let explain = tokio::task::spawn_blocking(move || engine.explain(&rule))
        .await
        .ok()
        .flatten();
    ok(json!({ "rule": status, "why": explain }))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ModeBody {
    mode: Option<Mode>,
}

async fn set_mode(
    State(state): State<AppState>,
    Path(name): Path<String>,
    headers: HeaderMap,
    p: Peer,
    body: Result<Json<ModeBody>, JsonRejection>,
) -> Response {
    let caller = match authorize(&state, &headers, peer(&p), Role::Operate) {
        Ok(c) => c,
        Err(r) => return r,
    };
    let body = match body {
        Ok(Json(b)) => b,
        Err(e) => return error(StatusCode::BAD_REQUEST, e.body_text()),
    };
    let Some(engine) = &state.engine else {
        return error(StatusCode::NOT_FOUND, "no rule engine");
    };
    if let Err(e) = engine.set_mode(&name, body.mode).await {
        // An unknown rule is the caller's mistake; an override that cannot be kept (modes.json
        // unreadable, or the write failed) is ours, and must not read as "no such rule".
        let status = if e.starts_with("no rule named") {
            StatusCode::NOT_FOUND
        } else {
            StatusCode::INTERNAL_SERVER_ERROR
        };
        return error(status, e);
    }
    audit_api(
        &state,
        &caller,
        "rule_mode",
        Some(&name),
        json!({ "mode": body.mode }),
    )
    .await;
    ok(json!({ "rule": name, "mode": body.mode }))
}

async fn global_mode(State(state): State<AppState>, headers: HeaderMap, p: Peer) -> Response {
    if let Err(r) = authorize(&state, &headers, peer(&p), Role::Read) {
        return r;
    }
    match actions(&state) {
        Ok(a) => ok(a.global_mode()),
        Err(r) => r,
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct GlobalModeBody {
    /// `None`: the key was left out (refused: a kill switch must say what it sets);
    /// `Some(None)`: `null`, back to the configuration's mode.
    #[serde(default, deserialize_with = "present")]
    mode: Option<Option<crate::settings::config::GlobalMode>>,
    reason: String,
}

fn present<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<Option<Option<crate::settings::config::GlobalMode>>, D::Error> {
    Option::deserialize(d).map(Some)
}

/// The kill switch: `PUT /api/v1/mode {"mode": "observe", "reason": "..."}` (`null` returns to
/// the configuration's mode).
async fn set_global_mode(
    State(state): State<AppState>,
    headers: HeaderMap,
    p: Peer,
    body: Result<Json<GlobalModeBody>, JsonRejection>,
) -> Response {
    let caller = match authorize(&state, &headers, peer(&p), Role::Operate) {
        Ok(c) => c,
        Err(r) => return r,
    };
    let body = match body {
        Ok(Json(b)) => b,
        Err(e) => return error(StatusCode::BAD_REQUEST, e.body_text()),
    };
    let Some(mode) = body.mode else {
        return error(
            StatusCode::BAD_REQUEST,
            "give `mode`: observe, dry_run, enforce, or null for the configuration's",
        );
    };
    if body.reason.trim().is_empty() {
        return error(
            StatusCode::BAD_REQUEST,
            "a reason is required: it goes into the audit log with the change",
        );
    }
    let a = match actions(&state) {
        Ok(a) => a,
        Err(r) => return r,
    };
    let result = a
        .set_global_mode(mode, &caller.name, body.reason.trim())
        .await;
    audit_api(
        &state,
        &caller,
        "global_mode",
        None,
        json!({ "mode": mode, "reason": body.reason.trim().chars().take(500).collect::<String>(), "error": result.as_ref().err() }),
    )
    .await;
    match result {
        Ok(view) => ok(view),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e),
    }
}

/// An audit record of an API change.
pub(super) async fn audit_api(
    state: &AppState,
    caller: &Caller,
    what: &str,
    rule: Option<&str>,
    params: Value,
) {
    let Some(a) = state.admin.as_ref().and_then(|a| a.actions.as_ref()) else {
        return;
    };
    let now = crate::collect::now_ms();
    a.record(Record {
        time: rfc3339(now),
        ts_ms: now,
        phase: "api".into(),
        decision: what.into(),
        actor: caller.name.clone(),
        rule: rule.map(str::to_owned),
        params,
        ..Record::default()
    })
    .await;
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AuditQuery {
    rule: Option<String>,
    decision: Option<String>,
    phase: Option<String>,
    action: Option<String>,
    actor: Option<String>,
    since: Option<String>,
    until: Option<String>,
    limit: Option<usize>,
    offset: Option<usize>,
    cursor: Option<String>,
}

/// Bytes of the log one audit request reads at most (after at least one whole line): the
/// answer then says `truncated` and gives the `next_cursor` to go on from.
pub const AUDIT_SCAN_BYTES: u64 = 4 << 20;

/// Audit requests read at once at most; more are refused (503) rather than queued, so a burst
/// of them never ties up the blocking threads or memory.
pub const AUDIT_READERS: usize = 4;

static AUDIT_READ_SLOTS: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(AUDIT_READERS);

/// Milliseconds since the epoch, from a number of them or RFC 3339.
fn time_arg(text: &str) -> Result<i64, String> {
    if let Ok(ms) = text.parse::<i64>() {
        return Ok(ms);
    }
    humantime::parse_rfc3339_weak(text)
        .map_err(|e| format!("{text:?}: {e} (milliseconds since the epoch, or RFC 3339)"))
        .and_then(|t| {
            t.duration_since(std::time::UNIX_EPOCH)
                .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
                .map_err(|e| e.to_string())
        })
}

async fn audit(
    State(state): State<AppState>,
    headers: HeaderMap,
    p: Peer,
    q: Result<Query<AuditQuery>, axum::extract::rejection::QueryRejection>,
) -> Response {
    if let Err(r) = authorize(&state, &headers, peer(&p), Role::Read) {
        return r;
    }
    let Query(q) = match q {
        Ok(q) => q,
        Err(e) => return error(StatusCode::BAD_REQUEST, e.body_text()),
    };
    let acts = match actions(&state) {
        Ok(a) => a.clone(),
        Err(r) => return r,
    };
    let since = match q.since.as_deref().map(time_arg).transpose() {
        Ok(v) => v,
        Err(e) => return error(StatusCode::BAD_REQUEST, format!("since: {e}")),
    };
    let until = match q.until.as_deref().map(time_arg).transpose() {
        Ok(v) => v,
        Err(e) => return error(StatusCode::BAD_REQUEST, format!("until: {e}")),
    };
    let limit = q.limit.unwrap_or(100).clamp(1, 1000);
    let offset = q.offset.unwrap_or(0);
    let from = match q
        .cursor
        .as_deref()
        .map(|c| Cursor::parse(c).ok_or(c))
        .transpose()
    {
        Ok(c) => c,
        Err(c) => {
            return error(
                StatusCode::BAD_REQUEST,
                format!("cursor: {c:?} is not a cursor this server gave (next_cursor)"),
            );
        }
    };
    let Ok(_slot) = AUDIT_READ_SLOTS.try_acquire() else {
        let mut resp = error(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("too many audit reads at once (at most {AUDIT_READERS}); retry shortly"),
        );
        resp.headers_mut().insert(
            axum::http::header::RETRY_AFTER,
            axum::http::HeaderValue::from_static("1"),
        );
        return resp;
    };
    let found = tokio::task::spawn_blocking(move || {
        acts.audit().query(
            |r| {
                q.rule
                    .as_deref()
                    .is_none_or(|x| r.rule.as_deref() == Some(x))
                    && q.decision.as_deref().is_none_or(|x| r.decision == x)
                    && q.phase.as_deref().is_none_or(|x| r.phase == x)
                    && q.action
                        .as_deref()
                        .is_none_or(|x| r.action.as_deref() == Some(x))
                    && q.actor.as_deref().is_none_or(|x| r.actor == x)
                    && since.is_none_or(|s| r.ts_ms >= s)
                    && until.is_none_or(|u| r.ts_ms <= u)
            },
            from,
            offset,
            limit,
            AUDIT_SCAN_BYTES,
        )
    })
    .await;
    match found {
        Ok(Ok(page)) => {
            let full = page.records.len() == limit;
            ok(json!({
                "records": page.records,
                "offset": offset,
                "limit": limit,
                // Offsets count from the newest record each time; the cursor goes on where
                // this read stopped, also when the byte bound stopped it.
                "next_offset": (full && from.is_none()).then_some(offset + limit),
                "next_cursor": page.next.map(|c| c.encode()),
                "truncated": page.truncated,
                // With `offset`, a read the byte bound stopped may not have skipped them all:
                // go on from `next_cursor` with the rest.
                "skipped": page.skipped,
                "scanned_bytes": page.scanned_bytes,
                "max_scan_bytes": AUDIT_SCAN_BYTES,
            }))
        }
        Ok(Err(AuditError::Expired)) => error(StatusCode::GONE, AuditError::Expired.to_string()),
        Ok(Err(e)) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

async fn knobs(State(state): State<AppState>, headers: HeaderMap, p: Peer) -> Response {
    if let Err(r) = authorize(&state, &headers, peer(&p), Role::Read) {
        return r;
    }
    match actions(&state) {
        Ok(a) => ok(a.knobs()),
        Err(r) => r,
    }
}

async fn knob(
    State(state): State<AppState>,
    Path(name): Path<String>,
    headers: HeaderMap,
    p: Peer,
) -> Response {
    if let Err(r) = authorize(&state, &headers, peer(&p), Role::Read) {
        return r;
    }
    match actions(&state) {
        Ok(a) => match a.knobs().into_iter().find(|k| k.name == name) {
            Some(k) => ok(k),
            None => error(StatusCode::NOT_FOUND, format!("no knob named {name:?}")),
        },
        Err(r) => r,
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct KnobBody {
    value: f64,
}

async fn set_knob(
    State(state): State<AppState>,
    Path(name): Path<String>,
    headers: HeaderMap,
    p: Peer,
    body: Result<Json<KnobBody>, JsonRejection>,
) -> Response {
    let caller = match authorize(&state, &headers, peer(&p), Role::Operate) {
        Ok(c) => c,
        Err(r) => return r,
    };
    let body = match body {
        Ok(Json(b)) => b,
        Err(e) => return error(StatusCode::BAD_REQUEST, e.body_text()),
    };
    let a = match actions(&state) {
        Ok(a) => a,
        Err(r) => return r,
    };
    if a.knobs().iter().all(|k| k.name != name) {
        return error(StatusCode::NOT_FOUND, format!("no knob named {name:?}"));
    }
    match a.set_knob(&name, body.value, &caller.name).await {
        Ok(k) => ok(k),
        Err(e) if e.contains("outside the bounds") => error(StatusCode::UNPROCESSABLE_ENTITY, e),
        Err(e) => error(StatusCode::BAD_GATEWAY, e),
    }
}

async fn breakers(State(state): State<AppState>, headers: HeaderMap, p: Peer) -> Response {
    if let Err(r) = authorize(&state, &headers, peer(&p), Role::Read) {
        return r;
    }
    match actions(&state) {
        Ok(a) => ok(breaker_list(a)),
        Err(r) => r,
    }
}

async fn reset_breaker(
    State(state): State<AppState>,
    Path(rule): Path<String>,
    headers: HeaderMap,
    p: Peer,
) -> Response {
    let caller = match authorize(&state, &headers, peer(&p), Role::Operate) {
        Ok(c) => c,
        Err(r) => return r,
    };
    match actions(&state) {
        Ok(a) => {
            let n = a.reset_breaker(&rule, &caller.name).await;
            ok(json!({ "rule": rule, "was_open": n }))
        }
        Err(r) => r,
    }
}

async fn playbooks(State(state): State<AppState>, headers: HeaderMap, p: Peer) -> Response {
    if let Err(r) = authorize(&state, &headers, peer(&p), Role::Read) {
        return r;
    }
    match actions(&state) {
        Ok(a) => ok(playbook_list(&a.playbooks().by_name)),
        Err(r) => r,
    }
}

/// The playbooks as they may be shown: every step's parameters through `actions::redact` (a
/// step's webhook URL, body or command may carry a secret).
fn playbook_list(
    by_name: &std::collections::BTreeMap<String, crate::actions::playbook::PlaybookSpec>,
) -> Value {
    by_name
        .iter()
        .map(|(name, p)| {
            let shown = json!({
                "description": p.description,
                "mode": p.mode,
                "allow_destructive": p.allow_destructive,
                "value": p.value,
                "include": p.include,
                "steps": p.steps.iter().map(crate::actions::redact::params).collect::<Vec<_>>(),
            });
            (name.clone(), shown)
        })
        .collect::<serde_json::Map<String, Value>>()
        .into()
}

async fn run_playbook(
    State(state): State<AppState>,
    Path(name): Path<String>,
    headers: HeaderMap,
    p: Peer,
) -> Response {
    let caller = match authorize(&state, &headers, peer(&p), Role::Operate) {
        Ok(c) => c,
        Err(r) => return r,
    };
    let a = match actions(&state) {
        Ok(a) => a,
        Err(r) => return r,
    };
    if !a.playbooks().by_name.contains_key(&name) {
        return error(StatusCode::NOT_FOUND, format!("no playbook named {name:?}"));
    }
    match a.run_playbook(&name, &caller.name).await {
        Ok(run) => ok(run),
        Err(e) => error(StatusCode::UNPROCESSABLE_ENTITY, e),
    }
}

async fn webhook(
    State(state): State<AppState>,
    headers: HeaderMap,
    p: Peer,
    body: Result<Json<Payload>, JsonRejection>,
) -> Response {
    let caller = match authorize(&state, &headers, peer(&p), Role::Operate) {
        Ok(c) => c,
        Err(r) => return r,
    };
    let payload = match body {
        Ok(Json(b)) => b,
        Err(e) => return error(e.status(), e.body_text()),
    };
    let Some(admin) = &state.admin else {
        return error(StatusCode::NOT_FOUND, "no receiver");
    };
    if payload.truncated_alerts > 0 {
        tracing::warn!(
            truncated = payload.truncated_alerts,
            "Alertmanager left alerts out of a delivery (max_alerts)"
        );
    }
    let got = admin.intake.receive(payload, crate::collect::now_ms());
    // A redelivery too: it renews the alert's day of grace, which must survive a restart.
    if got.firing + got.resolved + got.duplicates > 0 {
        admin.intake.persist().await;
    }
    if got.firing + got.resolved > 0 {
        audit_api(
            &state,
            &caller,
            "alerts_received",
            None,
            serde_json::to_value(&got).unwrap_or(Value::Null),
        )
        .await;
    }
    ok(got)
}
