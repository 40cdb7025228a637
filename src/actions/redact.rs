//! What of an action's parameters may be shown: in the audit log, the admin API (audit,
//! playbooks), the landing page and the logs.
//!
//! An allow-list, never a deny-list: for each action kind, the fields known to hold no secret
//! are shown as written; a URL is shown as `scheme://host[:port]` with `/…` standing for
//! whatever else it had (path, query, user and password: Slack, Discord and Teams webhooks carry
//! their secret in the path); a command shows its program or command name only; everything
//! else, including any field added later, is `<redacted>`. A field that is absent stays `null`
//! (its absence is no secret).
//!
//! Owns the allow-list. Uses its parent's `ActionSpec` and the `url` crate only.

use serde_json::{Map, Value};

use super::ActionSpec;

/// What stands for a value that is not shown.
pub const REDACTED: &str = "<redacted>";

/// How one field is shown.
#[derive(Clone, Copy)]
enum Show {
    /// As written.
    AsIs,
    /// `scheme://host[:port]` plus `/…` when there was more.
    Url,
    /// A list whose first element (a program, a command name) is shown; the rest is not.
    FirstOnly,
}

/// The fields of each kind shown at all, and how. Every other field is `<redacted>`.
fn allowed(kind: &str, field: &str) -> Option<Show> {
    use Show::{AsIs, FirstOnly, Url};
    let shown = match kind {
        // The statement and its parameters may hold literals (`ALTER ROLE … PASSWORD '…'`).
        "sql" => &[("timeout", AsIs), ("target", AsIs)][..],
        // `CONFIG SET requirepass …`, `AUTH …`: only the command's name.
        "redis" => &[("command", FirstOnly), ("target", AsIs)][..],
        "redis_evict" => &[
            ("match", AsIs),
            ("max_keys", AsIs),
            ("time_budget", AsIs),
            ("target", AsIs),
        ][..],
        "redis_memory_purge" | "pg_analyze" => &[
            ("stale_ratio", AsIs),
            ("max_tables", AsIs),
            ("target", AsIs),
        ][..],
        // The query may hold literals; the key and value templates name columns.
        "cache_warm" => &[
            ("key", AsIs),
            ("value", AsIs),
            ("ttl", AsIs),
            ("max_rows", AsIs),
            ("postgres", AsIs),
            ("redis", AsIs),
        ][..],
        "pg_terminate_idle" => &[
            ("idle_for", AsIs),
            ("in_transaction", AsIs),
            ("database", AsIs),
            ("user", AsIs),
            ("application", AsIs),
            ("max", AsIs),
            ("target", AsIs),
        ][..],
        "index_advice" => &[
            ("create", AsIs),
            ("min_saving", AsIs),
            ("create_every", AsIs),
            ("partitioned_tables", AsIs),
            ("target", AsIs),
        ][..],
        "retention_delete" => &[
            ("table", AsIs),
            ("column", AsIs),
            ("older_than", AsIs),
            ("batch_size", AsIs),
            ("pause", AsIs),
            ("max_rows", AsIs),
            ("target", AsIs),
        ][..],
        "knob" => &[
            ("name", AsIs),
            ("set", AsIs),
            ("scale", AsIs),
            ("step", AsIs),
            ("controller", AsIs),
        ][..],
        // The body may hold a routing key (PagerDuty) or a token.
        "webhook" => &[("url", Url), ("timeout", AsIs), ("retries", AsIs)][..],
        "alertmanager" => &[("url", Url)][..],
        // Arguments may hold anything; the program is on the allow list of the configuration.
        "exec" => &[("command", FirstOnly), ("timeout", AsIs)][..],
        _ => &[][..],
    };
    shown.iter().find(|(f, _)| *f == field).map(|(_, s)| *s)
}

/// `text` as `scheme://host[:port]`, plus `/…` when it had a path, a query, a fragment or
/// credentials; `<redacted>` when it is no URL with a host.
pub fn url(text: &str) -> String {
    let Ok(u) = url::Url::parse(text) else {
        return REDACTED.to_owned();
    };
    let Some(host) = u.host_str() else {
        return REDACTED.to_owned();
    };
    let mut out = format!("{}://{host}", u.scheme());
    if let Some(port) = u.port() {
        out.push_str(&format!(":{port}"));
    }
    let more = (u.path() != "/" && !u.path().is_empty())
        || u.query().is_some()
        || u.fragment().is_some()
        || !u.username().is_empty()
        || u.password().is_some();
    if more {
        out.push_str("/…");
    }
    out
}

fn show(how: Show, v: Value) -> Value {
    match (how, v) {
        (_, Value::Null) => Value::Null,
        (Show::AsIs, v) => v,
        (Show::Url, Value::String(s)) => Value::String(url(&s)),
        (Show::FirstOnly, Value::Array(items)) => Value::Array(
            items
                .into_iter()
                .enumerate()
                .map(|(i, v)| if i == 0 { v } else { Value::from(REDACTED) })
                .collect(),
        ),
        _ => Value::from(REDACTED),
    }
}

/// The parameters of `spec` as they may be shown: `{"kind": {field: value, ...}}`.
pub fn params(spec: &ActionSpec) -> Value {
    let kind = spec.kind();
    let fields = match serde_json::to_value(spec) {
        Ok(Value::Object(mut outer)) => outer.remove(kind),
        _ => None,
    };
    let shown: Map<String, Value> = match fields {
        Some(Value::Object(fields)) => fields
            .into_iter()
            .map(|(name, v)| {
                let v = match allowed(kind, &name) {
                    Some(how) => show(how, v),
                    None if v.is_null() => Value::Null,
                    None => Value::from(REDACTED),
                };
                (name, v)
            })
            .collect(),
        _ => Map::new(),
    };
    let mut out = Map::new();
    out.insert(kind.to_owned(), Value::Object(shown));
    Value::Object(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(yaml: &str) -> ActionSpec {
        serde_yaml::from_str(yaml).unwrap()
    }

    #[test]
    fn urls_show_scheme_host_and_port_only() {
        for (given, shown) in [
            (
                "https://hooks.slack.com/services/T000/B000/XXXXsecretXXXX",
                "https://hooks.slack.com/…",
            ),
            (
                "https://discord.com/api/webhooks/123/secret-token",
                "https://discord.com/…",
            ),
            (
                "https://example.webhook.office.com/webhookb2/abc@def/IncomingWebhook/s3cr3t/x",
                "https://example.webhook.office.com/…",
            ),
            ("http://am:p4ss@127.0.0.1:9093", "http://127.0.0.1:9093/…"),
            ("http://127.0.0.1:9093/", "http://127.0.0.1:9093"),
            ("http://h/x?token=t0k", "http://h/…"),
            ("not a url s3cret", REDACTED),
        ] {
            assert_eq!(url(given), shown, "{given}");
        }
    }

    #[test]
    fn only_allowed_fields_are_shown() {
        let v = params(&spec(
            "redis: {command: [CONFIG, SET, requirepass, s3cret], target: cache}",
        ));
        assert_eq!(
            v,
            serde_json::json!({"redis": {"command": ["CONFIG", REDACTED, REDACTED, REDACTED], "target": "cache"}})
        );
        let v = params(&spec(
            "webhook: {url: 'https://events.pagerduty.com/v2/enqueue', body: {routing_key: R0UT1NGKEY, event_action: trigger}}",
        ));
        assert_eq!(
            v,
            serde_json::json!({"webhook": {"url": "https://events.pagerduty.com/…", "body": REDACTED, "timeout": null, "retries": null}})
        );
        let v = params(&spec(
            "sql: {query: \"ALTER ROLE app PASSWORD 'pw1'\", params: ['x']}",
        ));
        assert!(!v.to_string().contains("pw1"), "{v}");
        assert_eq!(v["sql"]["params"], REDACTED);
        let v = params(&spec("exec: {command: [/usr/bin/notify, --key=abc]}"));
        assert_eq!(
            v["exec"]["command"],
            serde_json::json!(["/usr/bin/notify", REDACTED])
        );
        let v = params(&spec("knob: {name: batch_size, scale: 0.5}"));
        assert_eq!(v["knob"]["name"], "batch_size");
        assert_eq!(v["knob"]["scale"], 0.5);
    }
}
