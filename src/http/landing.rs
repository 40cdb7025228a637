//! `GET /`: a small server-rendered page for a person: what this is, where the endpoints are,
//! how each collector and target is doing, the rules and their state, the latest decisions of
//! the actions stage, and the knobs. Readable without JavaScript; refreshes itself.
//!
//! It shows what `/metrics` already shows (states, decisions by kind, values), never an action's
//! parameters or errors: protect both with basic auth (`--web.config.file`) where that matters.
//!
//! Uses `registry`, the rule engine and the actions stage, read only; its recent decisions come
//! from the audit writer's memory, never from the file. Every dynamic value is HTML-escaped.

use std::fmt::Write as _;

use axum::extract::State;
use axum::response::Html;

use super::AppState;
use crate::collect::now_ms;

pub(super) async fn handler(State(state): State<AppState>) -> Html<String> {
    let now = now_ms();
    let uptime = state.started.elapsed().as_secs();
    let mut rows = String::new();
    for c in state.registry.collectors() {
        let status = match (c.attempts, c.up) {
            (0, _) => "<td class=wait>waiting for first run</td>",
            (_, true) => "<td class=up>up</td>",
            (_, false) => "<td class=down>down</td>",
        };
        let last = c.last_success_ms.map_or_else(
            || "never".to_owned(),
            |t| format!("{:.1}s ago", (now - t) as f64 / 1000.0),
        );
        let _ = write!(
            rows,
            "<tr><td>{}</td>{status}<td>{last}</td><td>{:.3}s</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            escape(&c.name),
            c.last_duration_seconds,
            c.samples,
            c.failures,
            escape(c.last_error.as_deref().unwrap_or("")),
        );
    }
    let targets = target_rows(&state, now);
    let rules = rule_rows(&state, now);
    let (decisions, knobs) = action_rows(&state, now);
    let (series, points) = state.registry.history_size();
    let metrics = escape(&state.telemetry_path);
    let mode = mode_line(&state);
    Html(format!(
        r#"<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta http-equiv="refresh" content="10">
<title>autotuner</title>
<style>
body {{ font-family: sans-serif; margin: 2em; color: #222; }}
table {{ border-collapse: collapse; }}
td, th {{ border: 1px solid #ccc; padding: 0.3em 0.8em; text-align: left; }}
.up {{ color: #17702e; font-weight: bold; }}
.down {{ color: #b3261e; font-weight: bold; }}
.wait, .pending {{ color: #8a6d00; }}
.firing {{ color: #b3261e; font-weight: bold; }}
.inactive {{ color: #555; }}
</style>
</head>
<body>
<h1>autotuner</h1>
<p>Measures this host, PostgreSQL, PgBouncer and Redis for Prometheus, and corrects what goes wrong by rules.
Version {version}, up {uptime}s.</p>
<ul>
<li><a href="{metrics}">{metrics}</a>: metrics for Prometheus</li>
<li><a href="/-/healthy">/-/healthy</a>: liveness</li>
<li><a href="/-/ready">/-/ready</a>: readiness (after the first collection round)</li>
</ul>
<h2>Collectors</h2>
<table id="collectors">
<tr><th>collector</th><th>status</th><th>last success</th><th>last run took</th><th>samples</th><th>failures</th><th>last error</th></tr>
{rows}
</table>
<h2>Targets</h2>
<table id="targets">
<tr><th>kind</th><th>target</th><th>status</th><th>as of</th></tr>
{targets}
</table>
<h2>Rules</h2>
{mode}
<table id="rules">
<tr><th>rule</th><th>state</th><th>health</th><th>mode</th><th>instances</th><th>since</th><th>actions</th></tr>
{rules}
</table>
<h2>Recent decisions</h2>
<table id="decisions">
<tr><th>when</th><th>rule</th><th>action</th><th>target</th><th>decision</th></tr>
{decisions}
</table>
<h2>Knobs</h2>
<table id="knobs">
<tr><th>knob</th><th>value</th><th>min</th><th>max</th><th>controller</th></tr>
{knobs}
</table>
<p>History: {series} series, {points} points.</p>
</body>
</html>
"#,
        version = env!("CARGO_PKG_VERSION"),
    ))
}

fn ago(now: i64, t: i64) -> String {
    format!("{:.0}s ago", ((now - t) as f64 / 1000.0).max(0.0))
}

fn target_rows(state: &AppState, now: i64) -> String {
    let mut out = String::new();
    for (kind, metric) in [
        ("postgres", "pg_up"),
        ("redis", "redis_up"),
        ("pgbouncer", "pgbouncer_up"),
        ("http", "probe_http_success"),
    ] {
        for (labels, points) in state.registry.range(metric, now - 120_000, now) {
            let Some(p) = points.last() else { continue };
            let (class, word) = if p.v == 1.0 {
                ("up", "up")
            } else {
                ("down", "down")
            };
            let _ = write!(
                out,
                "<tr><td>{kind}</td><td>{}</td><td class={class}>{word}</td><td>{}</td></tr>",
                escape(labels.get("target").unwrap_or("")),
                ago(now, p.t_ms)
            );
        }
    }
    out
}

fn rule_rows(state: &AppState, now: i64) -> String {
    use crate::rules::state::State as S;
    let Some(engine) = &state.engine else {
        return String::new();
    };
    let mut out = String::new();
    for r in engine.status() {
        let firing: Vec<i64> = r
            .instances
            .iter()
            .filter_map(|i| match i.state {
                S::Firing { since_ms, .. } => Some(since_ms),
                _ => None,
            })
            .collect();
        let pending: Vec<i64> = r
            .instances
            .iter()
            .filter_map(|i| match i.state {
                S::Pending { since_ms } => Some(since_ms),
                _ => None,
            })
            .collect();
        let (word, since) = if !firing.is_empty() {
            ("firing", firing.iter().min().copied())
        } else if !pending.is_empty() {
            ("pending", pending.iter().min().copied())
        } else {
            ("inactive", None)
        };
        let _ = write!(
            out,
            "<tr data-rule=\"{name}\" data-state=\"{word}\"><td>{name}</td><td class={word}>{word}</td><td>{health}</td><td>{mode}{over}</td><td>{n}</td><td>{since}</td><td>{actions}</td></tr>",
            name = escape(&r.name),
            health = r.health,
            mode = r.mode.as_str(),
            over = if r.mode_overridden {
                " (set by API)"
            } else {
                ""
            },
            n = r.instances.len(),
            since = since.map_or_else(String::new, |t| ago(now, t)),
            actions = escape(&r.actions.join(", ")),
        );
    }
    out
}

fn action_rows(state: &AppState, now: i64) -> (String, String) {
    let Some(actions) = state.admin.as_ref().and_then(|a| a.actions.clone()) else {
        return (String::new(), String::new());
    };
    let mut knobs = String::new();
    for k in actions.knobs() {
        let _ = write!(
            knobs,
            "<tr data-knob=\"{name}\"><td>{name}</td><td>{value}</td><td>{min}</td><td>{max}</td><td>{status}</td></tr>",
            name = escape(&k.name),
            value = k.value,
            min = k.min,
            max = k.max,
            status = escape(if k.paused.is_some() {
                "paused: changed by someone else"
            } else {
                &k.status
            }),
        );
    }
    // The newest twenty decisions, from the audit writer's memory: the page never reads the
    // log, so loading it costs the same whatever the log's size and however many load it.
    let mut decisions = String::new();
    for r in actions.audit().recent(20) {
        let _ = write!(
            decisions,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            ago(now, r.ts_ms),
            escape(r.rule.as_deref().unwrap_or("")),
            escape(r.action.as_deref().unwrap_or("")),
            escape(r.target.as_deref().unwrap_or("")),
            escape(&r.decision),
        );
    }
    (decisions, knobs)
}

/// Escapes text for HTML element content and quoted attribute values.
/// The global mode, and who set it when it was set through the API (the kill switch).
fn mode_line(state: &AppState) -> String {
    let Some(a) = state.admin.as_ref().and_then(|a| a.actions.as_ref()) else {
        return String::new();
    };
    let v = a.global_mode();
    let word = |m: crate::settings::config::GlobalMode| match m {
        crate::settings::config::GlobalMode::Observe => "observe",
        crate::settings::config::GlobalMode::DryRun => "dry_run",
        crate::settings::config::GlobalMode::Enforce => "enforce",
    };
    let how = match &v.set {
        Some(s) => format!(
            " (set through the API by {}, {}; the configuration says {})",
            escape(&s.actor),
            crate::audit::rfc3339(s.at_ms),
            word(v.configured)
        ),
        None => " (the configuration's)".to_owned(),
    };
    format!(
        "<p id=\"actions-mode\">Actions mode, the highest any rule acts in: <b class={w}>{w}</b>{how}</p>",
        w = word(v.mode)
    )
}

fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for ch in text.chars() {
        match ch {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::escape;

    #[test]
    fn escapes_markup() {
        assert_eq!(
            escape(r#"<a href="x">&'"#),
            "&lt;a href=&quot;x&quot;&gt;&amp;&#39;"
        );
    }
}
