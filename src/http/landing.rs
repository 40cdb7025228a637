//! `GET /`: a small server-rendered page for a person: what this is, where the endpoints are,
//! and how each collector is doing. Readable without JavaScript; refreshes itself.
//!
//! Uses `registry` (read only). Every dynamic value is HTML-escaped.

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
    let (series, points) = state.registry.history_size();
    let metrics = escape(&state.telemetry_path);
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
.wait {{ color: #8a6d00; }}
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
<p>History: {series} series, {points} points.</p>
</body>
</html>
"#,
        version = env!("CARGO_PKG_VERSION"),
    ))
}

/// Escapes text for HTML element content and quoted attribute values.
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
