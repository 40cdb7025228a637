//! The shipped dashboards (`dashboards/`) and alerting rules (`alerts/`), proven three ways:
//!
//! - offline: our lint of every dashboard (valid, canonical JSON; the datasource, job and
//!   instance variables present and used; no hard-coded datasource; units; current panel types
//!   only; `$__rate_interval` in every rate; every query parses as PromQL; panel thresholds equal
//!   to the alerts' thresholds in the alerts' colours) and of every alert (names, severity,
//!   annotations, runbook sections, a promtool test that fires it and one that keeps it quiet);
//! - with Prometheus's and Alertmanager's own tools: `promtool check rules`, `promtool test
//!   rules`, `promtool check config`, `amtool check-config` and routing by severity;
//! - end to end: a real Prometheus scrapes a real autotuner connected to the real PostgreSQL,
//!   PgBouncer and Redis of the test run, loads the rules and sends to a real Alertmanager; the
//!   test drives conditions (a burst of Redis misses, then a dead Redis) and sees the alerts
//!   arrive, routed by severity, at a webhook receiver; the example's inhibition mutes a warning
//!   twin; every dashboard query and variable returns data; every metric the dashboards and
//!   alerts name is on the live `/metrics` (or in the one list of metrics not published yet).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{Autotuner, PgEnv, RedisServer, pg_connect, require, until, write_config};
use promql_parser::parser::{self, Expr};
use serde_json::Value as Json;
use serde_yaml::Value as Yaml;

/// Metrics the dashboards and alerts name that a live `/metrics` does not have yet, each with
/// what makes it appear. The live check fails on a name in neither `/metrics` nor this list, and
/// on a name in this list that `/metrics` already has (so the list shrinks as they land). Empty
/// now: the end-to-end test drives every event that creates a series (a rule firing, an action
/// executed, a breaker opening, a knob configured); a metric added to a dashboard or an alert
/// before the exporter publishes it goes here, with the event that will publish it.
const NOT_PUBLISHED_YET: &[(&str, &str)] = &[];

/// Series Prometheus makes itself rather than scraping them.
const PROMETHEUS_SERIES: &[&str] = &["up", "ALERTS"];

/// Panel types of current Grafana (React); Angular ones (`graph`, `singlestat`, `table-old`)
/// no longer render since Grafana 11/12.
const PANEL_TYPES: &[&str] = &[
    "row",
    "timeseries",
    "stat",
    "gauge",
    "bargauge",
    "table",
    "state-timeline",
    "text",
];

/// The schema version the dashboards are written for (Grafana 10.3 to 11): Grafana migrates
/// older versions forward, never a newer one back.
const SCHEMA_VERSION: u64 = 39;

/// Alert thresholds that are not the documented threshold of a signal, so no panel needs to
/// draw them: (alert, metric, why).
const THRESHOLD_EXEMPTIONS: &[(&str, &str, &str)] = &[(
    "AutotunerHostDiskFillingUp",
    "host_disk_usage_ratio",
    "its 80 % is a floor that keeps the trend alert quiet on mostly empty disks; the disk panel draws the 90 % threshold",
)];

/// Alerts on events (a counter moved) rather than states, with no `for`.
const EVENT_ALERTS: &[&str] = &["AutotunerActionsFailing", "AutotunerAuditWriteErrors"];

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn files(dir: &str, ext: &str) -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = std::fs::read_dir(repo().join(dir))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.to_str().unwrap().ends_with(ext))
        .collect();
    out.sort();
    assert!(!out.is_empty(), "no {ext} files in {dir}");
    out
}

fn read_yaml(path: &Path) -> Yaml {
    serde_yaml::from_str(&std::fs::read_to_string(path).unwrap())
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

// ---------------------------------------------------------------------------------------------
// Dashboard queries

/// One PromQL query of a dashboard: a panel target or a variable's `label_values` selector.
#[derive(Debug, Clone)]
struct Query {
    dashboard: String,
    /// The panel's title, or `variable NAME`.
    place: String,
    expr: String,
    /// For a variable: the label whose values it lists.
    label: Option<String>,
    instant: bool,
}

fn dashboards() -> Vec<(String, Json)> {
    files("dashboards", ".json")
        .into_iter()
        .map(|p| {
            let text = std::fs::read_to_string(&p).unwrap();
            let json: Json = serde_json::from_str(&text)
                .unwrap_or_else(|e| panic!("{}: not JSON: {e}", p.display()));
            (p.file_name().unwrap().to_str().unwrap().to_owned(), json)
        })
        .collect()
}

/// Every panel, rows' nested panels included.
fn panels(dashboard: &Json) -> Vec<&Json> {
    let mut out = Vec::new();
    for p in dashboard["panels"].as_array().into_iter().flatten() {
        out.push(p);
        for q in p["panels"].as_array().into_iter().flatten() {
            out.push(q);
        }
    }
    out
}

fn variables(dashboard: &Json) -> Vec<&Json> {
    dashboard["templating"]["list"]
        .as_array()
        .into_iter()
        .flatten()
        .collect()
}

/// `label_values(SELECTOR, LABEL)` split into its parts.
fn label_values(query: &str) -> Option<(String, String)> {
    let inner = query
        .trim()
        .strip_prefix("label_values(")?
        .strip_suffix(')')?;
    let (selector, label) = inner.rsplit_once(',')?;
    Some((selector.trim().to_owned(), label.trim().to_owned()))
}

fn queries(name: &str, dashboard: &Json) -> Vec<Query> {
    let mut out = Vec::new();
    for v in variables(dashboard) {
        if v["type"] != "query" {
            continue;
        }
        let q = v["query"]["query"].as_str().or(v["query"].as_str());
        let (expr, label) = q
            .and_then(label_values)
            .unwrap_or_else(|| (q.unwrap_or("").to_owned(), String::new()));
        out.push(Query {
            dashboard: name.to_owned(),
            place: format!("variable {}", v["name"].as_str().unwrap_or("?")),
            expr,
            label: Some(label),
            instant: true,
        });
    }
    for p in panels(dashboard) {
        for t in p["targets"].as_array().into_iter().flatten() {
            out.push(Query {
                dashboard: name.to_owned(),
                place: p["title"].as_str().unwrap_or("?").to_owned(),
                expr: t["expr"].as_str().unwrap_or("").to_owned(),
                label: None,
                instant: t["instant"] == true,
            });
        }
    }
    out
}

/// Duration the offline lint puts for `$__rate_interval`: no one writes it by hand, so a range
/// of exactly this length is one that used the variable.
const RATE_INTERVAL_SENTINEL: &str = "7919s";

/// The query as Grafana would send it, with `rate_interval` for `$__rate_interval` and every
/// job and instance selected (the variables' `allValue`).
fn expand(expr: &str, rate_interval: &str) -> String {
    expr.replace("$__rate_interval", rate_interval)
        .replace("$__interval", "15s")
        .replace("$__range", "1h")
        .replace("$job", ".+")
        .replace("$instance", ".+")
}

/// Calls `f` on every selector of the expression, with the function it is an argument of.
fn walk<'a>(expr: &'a Expr, func: Option<&str>, f: &mut dyn FnMut(&'a Expr, Option<&str>)) {
    match expr {
        Expr::Aggregate(a) => {
            walk(&a.expr, None, f);
            if let Some(p) = &a.param {
                walk(p, None, f);
            }
        }
        Expr::Unary(u) => walk(&u.expr, None, f),
        Expr::Binary(b) => {
            walk(&b.lhs, None, f);
            walk(&b.rhs, None, f);
        }
        Expr::Paren(p) => walk(&p.expr, func, f),
        Expr::Subquery(s) => walk(&s.expr, None, f),
        Expr::Call(c) => {
            for a in &c.args.args {
                walk(a, Some(c.func.name), f);
            }
        }
        Expr::VectorSelector(_) | Expr::MatrixSelector(_) => f(expr, func),
        _ => {}
    }
}

fn selector_of(e: &Expr) -> Option<&parser::VectorSelector> {
    match e {
        Expr::VectorSelector(v) => Some(v),
        Expr::MatrixSelector(m) => Some(&m.vs),
        _ => None,
    }
}

/// The metric names an expression reads.
fn metric_names(expr: &Expr) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    walk(expr, None, &mut |e, _| {
        if let Some(name) = selector_of(e).and_then(|v| v.name.clone()) {
            out.insert(name);
        }
    });
    out
}

/// Our lint of one dashboard (mirroring grafana/dashboard-linter's rules, plus ours); returns
/// every problem found.
fn lint_dashboard(file: &str, d: &Json) -> Vec<String> {
    let mut problems = Vec::new();
    let mut bad = |what: String| problems.push(format!("{file}: {what}"));

    let uid = d["uid"].as_str().unwrap_or("");
    if !(8..=40).contains(&uid.len())
        || !uid.starts_with(|c: char| c.is_ascii_lowercase())
        || !uid
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
    {
        bad(format!("uid {uid:?} is not 8-40 of [a-z0-9-]"));
    }
    if file != format!("{uid}.json") {
        bad(format!("file name is not the uid {uid:?}"));
    }
    if d["schemaVersion"].as_u64() != Some(SCHEMA_VERSION) {
        bad(format!("schemaVersion is not {SCHEMA_VERSION}"));
    }
    if !d["id"].is_null() {
        bad("has an instance-local id".into());
    }
    for key in ["__inputs", "__requires", "__elements", "gnetId"] {
        if d.get(key).is_some() {
            bad(format!("has {key} (export-for-sharing leftovers)"));
        }
    }
    if d["editable"] != false {
        bad("is editable (the file is the source of truth)".into());
    }
    if !d["title"]
        .as_str()
        .unwrap_or("")
        .starts_with("Autotuner / ")
    {
        bad("title lacks the `Autotuner / ` prefix".into());
    }
    if !d["tags"]
        .as_array()
        .is_some_and(|t| t.iter().any(|t| t == "autotuner"))
    {
        bad("lacks the autotuner tag".into());
    }

    // Variables: a datasource variable, and job and instance query variables on it.
    let vars = variables(d);
    let var = |name: &str| vars.iter().find(|v| v["name"] == name).copied();
    match var("datasource") {
        Some(v) if v["type"] == "datasource" && v["query"] == "prometheus" => {}
        _ => bad("no `datasource` variable of type datasource for prometheus".into()),
    }
    for name in ["job", "instance"] {
        match var(name) {
            None => bad(format!("no `{name}` variable")),
            Some(v) => {
                if v["type"] != "query"
                    || v["datasource"]["uid"] != "${datasource}"
                    || v["multi"] != true
                    || v["includeAll"] != true
                    || v["allValue"] != ".+"
                    || v["refresh"] != 2
                {
                    bad(format!(
                        "variable `{name}` is not a multi, include-all (`.+`) query on ${{datasource}} refreshed on time range change"
                    ));
                }
            }
        }
    }
    if var("instance").is_some_and(|v| {
        !v["query"]["query"]
            .as_str()
            .unwrap_or("")
            .contains("job=~\"$job\"")
    }) {
        bad("variable `instance` is not filtered by $job".into());
    }

    // Panels.
    let mut ids = BTreeSet::new();
    let mut used_vars = BTreeSet::new();
    for p in panels(d) {
        let title = p["title"].as_str().unwrap_or("");
        let ptype = p["type"].as_str().unwrap_or("");
        if !ids.insert(p["id"].as_u64().unwrap_or(0)) {
            bad(format!("panel id {} used twice", p["id"]));
        }
        if !PANEL_TYPES.contains(&ptype) {
            bad(format!(
                "panel {title:?} has type {ptype:?}, not a current panel type"
            ));
        }
        let g = &p["gridPos"];
        if g["x"].as_u64().unwrap_or(99) + g["w"].as_u64().unwrap_or(99) > 24 {
            bad(format!("panel {title:?} is wider than the 24-column grid"));
        }
        if ptype == "row" || ptype == "text" {
            continue;
        }
        if title.is_empty() || p["description"].as_str().unwrap_or("").is_empty() {
            bad(format!("panel {title:?} lacks a title or a description"));
        }
        if p["datasource"]["uid"] != "${datasource}" {
            bad(format!(
                "panel {title:?} does not use the datasource variable: {}",
                p["datasource"]
            ));
        }
        let defaults = &p["fieldConfig"]["defaults"];
        if defaults["unit"].as_str().unwrap_or("").is_empty() {
            bad(format!("panel {title:?} has no unit"));
        }
        if defaults["unit"] == "percentunit"
            && (defaults["min"] != 0 || (ptype != "stat" && defaults["max"] != 1))
        {
            bad(format!(
                "panel {title:?} shows a ratio without min 0, max 1"
            ));
        }
        let steps = defaults["thresholds"]["steps"].as_array();
        if !steps.is_some_and(|s| {
            !s.is_empty()
                && s[0]["value"].is_null()
                && s.windows(2).all(|w| {
                    w[0]["value"].as_f64().unwrap_or(f64::MIN)
                        < w[1]["value"].as_f64().unwrap_or(f64::MIN)
                })
        }) {
            bad(format!(
                "panel {title:?}: thresholds are not sorted steps from a null base"
            ));
        }
        let targets = p["targets"].as_array().cloned().unwrap_or_default();
        if targets.is_empty() {
            bad(format!("panel {title:?} has no query"));
        }
        for t in &targets {
            if t["datasource"]["uid"] != "${datasource}" {
                bad(format!(
                    "panel {title:?}, query {}: hard-coded datasource {}",
                    t["refId"], t["datasource"]
                ));
            }
            let raw = t["expr"].as_str().unwrap_or("");
            for v in ["$job", "$instance"] {
                if raw.contains(v) {
                    used_vars.insert(v);
                }
            }
            lint_query(&format!("panel {title:?}"), raw, &mut bad);
        }
    }
    for v in ["$job", "$instance"] {
        if !used_vars.contains(v) {
            bad(format!("variable {v} is used by no query"));
        }
    }
    for q in queries(file, d).iter().filter(|q| q.label.is_some()) {
        if parser::parse(&expand(&q.expr, RATE_INTERVAL_SENTINEL)).is_err() {
            bad(format!("{}: selector {:?} does not parse", q.place, q.expr));
        }
    }
    problems
}

/// The rules for one PromQL query of a panel.
fn lint_query(place: &str, raw: &str, bad: &mut dyn FnMut(String)) {
    let expr = match parser::parse(&expand(raw, RATE_INTERVAL_SENTINEL)) {
        Ok(e) => e,
        Err(e) => return bad(format!("{place}: {raw:?} does not parse: {e}")),
    };
    let sentinel = promql_parser::util::parse_duration(RATE_INTERVAL_SENTINEL).unwrap();
    walk(&expr, None, &mut |e, func| {
        let Some(vs) = selector_of(e) else { return };
        let name = vs.name.clone().unwrap_or_default();
        for (label, value) in [("job", "$job"), ("instance", "$instance")] {
            let ok = vs.matchers.matchers.iter().any(|m| {
                m.name == label
                    && m.value == ".+"
                    && matches!(m.op, promql_parser::label::MatchOp::Re(_))
            }) && raw.contains(&format!("{label}=~\"{value}\""));
            if !ok {
                bad(format!("{place}: {name} lacks {label}=~\"{value}\""));
            }
        }
        if let Expr::MatrixSelector(m) = e
            && matches!(func, Some("rate" | "irate" | "increase"))
            && m.range != sentinel
        {
            bad(format!(
                "{place}: {name}: {func:?} without [$__rate_interval]"
            ));
        }
        // A counter graphed raw shows only that the process has been up a long time.
        if name.ends_with("_total") && !matches!(func, Some("rate" | "irate" | "increase")) {
            bad(format!("{place}: counter {name} outside rate()"));
        }
    });
}

#[test]
fn every_dashboard_passes_the_lint() {
    let boards = dashboards();
    assert!(
        boards.len() >= 2,
        "the overview and the autotuner dashboards"
    );
    let mut problems = Vec::new();
    let mut uids = BTreeSet::new();
    for (file, d) in &boards {
        problems.extend(lint_dashboard(file, d));
        assert!(
            uids.insert(d["uid"].to_string()),
            "uid {} used twice",
            d["uid"]
        );
        // Canonical form (two-space indent, sorted keys): diffs stay readable.
        let text = std::fs::read_to_string(repo().join("dashboards").join(file)).unwrap();
        let canonical = serde_json::to_string_pretty(&sorted(d.clone())).unwrap() + "\n";
        if text != canonical {
            problems.push(format!(
                "{file}: not in canonical form (jq -S --indent 2 . FILE)"
            ));
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

/// The JSON with every object's keys sorted, whatever serde_json's map keeps.
fn sorted(v: Json) -> Json {
    match v {
        Json::Object(m) => {
            let b: BTreeMap<String, Json> = m.into_iter().map(|(k, v)| (k, sorted(v))).collect();
            Json::Object(b.into_iter().collect())
        }
        Json::Array(a) => Json::Array(a.into_iter().map(sorted).collect()),
        other => other,
    }
}

/// The lint is only worth something if it fails: each kind of mistake, made on a copy of the
/// shipped dashboard, is reported.
#[test]
fn the_dashboard_lint_reports_each_kind_of_mistake() {
    let (file, good) = dashboards().remove(0);
    assert!(lint_dashboard(&file, &good).is_empty());
    let first_query_panel = |d: &mut Json| -> usize {
        d["panels"]
            .as_array()
            .unwrap()
            .iter()
            .position(|p| p["targets"].is_array())
            .unwrap()
    };
    type Mistake = (&'static str, fn(&mut Json, usize));
    let mistakes: &[Mistake] = &[
        ("not a current panel type", |d, i| {
            d["panels"][i]["type"] = "graph".into()
        }),
        ("has no unit", |d, i| {
            d["panels"][i]["fieldConfig"]["defaults"]["unit"] = "".into()
        }),
        ("hard-coded datasource", |d, i| {
            d["panels"][i]["targets"][0]["datasource"]["uid"] = "P1809F7CD0C75ACF3".into()
        }),
        ("does not use the datasource variable", |d, i| {
            d["panels"][i]["datasource"] = serde_json::json!({"type": "prometheus", "uid": "prom"})
        }),
        ("without [$__rate_interval]", |d, _| {
            let p = d["panels"]
                .as_array_mut()
                .unwrap()
                .iter_mut()
                .find(|p| {
                    p["targets"][0]["expr"]
                        .as_str()
                        .is_some_and(|e| e.contains("rate("))
                })
                .unwrap();
            let e = p["targets"][0]["expr"]
                .as_str()
                .unwrap()
                .replace("$__rate_interval", "5m");
            p["targets"][0]["expr"] = e.into();
        }),
        ("lacks job=~\"$job\"", |d, i| {
            let e = d["panels"][i]["targets"][0]["expr"]
                .as_str()
                .unwrap()
                .replace("job=~\"$job\", ", "");
            d["panels"][i]["targets"][0]["expr"] = e.into();
        }),
        ("does not parse", |d, i| {
            d["panels"][i]["targets"][0]["expr"] = "sum by (instance (up".into()
        }),
        (
            "counter redis_keyspace_hits_total outside rate()",
            |d, i| {
                d["panels"][i]["targets"][0]["expr"] =
                    "redis_keyspace_hits_total{job=~\"$job\", instance=~\"$instance\"}".into()
            },
        ),
        ("no `instance` variable", |d, _| {
            d["templating"]["list"]
                .as_array_mut()
                .unwrap()
                .retain(|v| v["name"] != "instance")
        }),
        ("no `datasource` variable", |d, _| {
            d["templating"]["list"]
                .as_array_mut()
                .unwrap()
                .retain(|v| v["name"] != "datasource")
        }),
        ("schemaVersion is not", |d, _| {
            d["schemaVersion"] = 27.into()
        }),
        ("is editable", |d, _| d["editable"] = true.into()),
        ("has __inputs", |d, _| d["__inputs"] = serde_json::json!([])),
        ("uid", |d, _| d["uid"] = "Overview".into()),
    ];
    for (expected, mistake) in mistakes {
        let mut d = good.clone();
        let i = first_query_panel(&mut d);
        mistake(&mut d, i);
        let problems = lint_dashboard(&file, &d);
        assert!(
            problems.iter().any(|p| p.contains(expected)),
            "mistake {expected:?} not reported; got {problems:#?}"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Alert rules

struct Alert {
    name: String,
    expr: String,
    severity: String,
    has_for: bool,
    annotations: BTreeMap<String, String>,
}

fn alerts() -> Vec<Alert> {
    let mut out = Vec::new();
    for file in files("alerts", ".rules.yml") {
        for g in read_yaml(&file)["groups"].as_sequence().unwrap() {
            for r in g["rules"].as_sequence().unwrap() {
                let Some(name) = r["alert"].as_str() else {
                    continue;
                };
                let s = |v: &Yaml| v.as_str().unwrap_or("").to_owned();
                out.push(Alert {
                    name: name.to_owned(),
                    expr: s(&r["expr"]),
                    severity: s(&r["labels"]["severity"]),
                    has_for: r.get("for").is_some(),
                    annotations: r["annotations"]
                        .as_mapping()
                        .into_iter()
                        .flatten()
                        .map(|(k, v)| (s(k), s(v)))
                        .collect(),
                });
            }
        }
    }
    out
}

#[test]
fn every_alert_follows_the_conventions_and_is_tested_both_ways() {
    let alerts = alerts();
    let runbook = std::fs::read_to_string(repo().join("alerts/runbook.md")).unwrap();
    let sections: BTreeSet<&str> = runbook
        .lines()
        .filter_map(|l| l.strip_prefix("## "))
        .collect();
    let name_ok = regex::Regex::new("^Autotuner([A-Z][a-z0-9]+)+$").unwrap();
    let mut problems = Vec::new();
    for a in &alerts {
        let n = &a.name;
        if !name_ok.is_match(n) {
            problems.push(format!("{n}: not CamelCase with the Autotuner prefix"));
        }
        if !["critical", "warning", "info"].contains(&a.severity.as_str()) {
            problems.push(format!("{n}: severity {:?}", a.severity));
        }
        let summary = a.annotations.get("summary").cloned().unwrap_or_default();
        if summary.contains("{{")
            || !summary.ends_with('.')
            || !summary.starts_with(char::is_uppercase)
        {
            problems.push(format!("{n}: summary {summary:?} is not a static sentence"));
        }
        if !a.annotations.get("description").is_some_and(|d| {
            d.contains("{{ $labels.instance }}") || d.contains("{{ $labels.job }}")
        }) {
            problems.push(format!("{n}: description does not say which autotuner"));
        }
        let want = format!("alerts/runbook.md#{}", n.to_lowercase());
        if a.annotations.get("runbook_url") != Some(&want) {
            problems.push(format!("{n}: runbook_url is not {want}"));
        }
        if !sections.contains(n.as_str()) {
            problems.push(format!("{n}: no `## {n}` section in alerts/runbook.md"));
        }
        if a.has_for == EVENT_ALERTS.contains(&n.as_str()) {
            problems.push(format!(
                "{n}: state alerts need a `for`, event alerts (EVENT_ALERTS) none"
            ));
        }
        if parser::parse(&a.expr).is_err() {
            problems.push(format!("{n}: expr does not parse"));
        }
    }
    let names: BTreeSet<&str> = alerts.iter().map(|a| a.name.as_str()).collect();
    for s in &sections {
        if !names.contains(s) {
            problems.push(format!("runbook section {s} is no alert's"));
        }
    }
    // Coverage: for every alert, a promtool test case where it fires and one where it is quiet.
    let (mut fires, mut quiet) = (BTreeSet::new(), BTreeSet::new());
    for file in files("alerts/tests", ".test.yml") {
        for t in read_yaml(&file)["tests"].as_sequence().unwrap() {
            for c in t["alert_rule_test"].as_sequence().into_iter().flatten() {
                let name = c["alertname"].as_str().unwrap().to_owned();
                if c["exp_alerts"].as_sequence().is_some_and(|s| !s.is_empty()) {
                    fires.insert(name);
                } else {
                    quiet.insert(name);
                }
            }
        }
    }
    for n in &names {
        if !fires.contains(*n) {
            problems.push(format!("{n}: no promtool test makes it fire"));
        }
        if !quiet.contains(*n) {
            problems.push(format!("{n}: no promtool test keeps it quiet"));
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

/// (metric, value, alert, severity, comparison) for every `metric > N` / `metric < N` (N not 0)
/// in the alerts, the metric read bare or through `*_over_time`.
fn alert_thresholds() -> Vec<(String, f64, String, String, String)> {
    let mut out = Vec::new();
    for a in alerts() {
        let expr = parser::parse(&a.expr).unwrap();
        let mut stack = vec![&expr];
        while let Some(e) = stack.pop() {
            match e {
                Expr::Binary(b) => {
                    let op = b.op.to_string();
                    if let (Some(m), Expr::NumberLiteral(n), ">" | "<") =
                        (direct_metric(&b.lhs), &*b.rhs, op.as_str())
                        && n.val != 0.0
                    {
                        out.push((m, n.val, a.name.clone(), a.severity.clone(), op.clone()));
                    }
                    stack.push(&b.lhs);
                    stack.push(&b.rhs);
                }
                Expr::Paren(p) => stack.push(&p.expr),
                Expr::Aggregate(g) => stack.push(&g.expr),
                _ => {}
            }
        }
    }
    out
}

/// The metric a gauge comparison reads: a bare selector, or one under `*_over_time`.
fn direct_metric(e: &Expr) -> Option<String> {
    match e {
        Expr::VectorSelector(v) => v.name.clone(),
        Expr::Paren(p) => direct_metric(&p.expr),
        Expr::Call(c) if c.func.name.ends_with("_over_time") => {
            selector_of(c.args.args.first()?).and_then(|v| v.name.clone())
        }
        _ => None,
    }
}

/// Every panel that shows a metric an alert compares with a threshold draws that threshold, in
/// the alert's colour: orange for warning, red for critical; for a "below" alert the colour is
/// the base and green starts at the threshold.
#[test]
fn dashboard_thresholds_are_the_alerts_thresholds() {
    let thresholds = alert_thresholds();
    for want in [
        "host_cpu_usage_ratio",
        "host_memory_usage_ratio",
        "host_disk_usage_ratio",
        "redis_cache_hit_ratio",
        "pg_connections_usage_ratio",
        "pgbouncer_pool_usage_ratio",
        "probe_http_duration_seconds",
        "probe_http_error_ratio",
    ] {
        assert!(
            thresholds.iter().any(|t| t.0 == want),
            "no alert threshold found on {want}: {thresholds:?}"
        );
    }
    let mut problems = Vec::new();
    let mut checked = 0;
    for (file, d) in dashboards() {
        for p in panels(&d) {
            let title = p["title"].as_str().unwrap_or("");
            let shown: BTreeSet<String> = p["targets"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|t| parser::parse(&expand(t["expr"].as_str()?, "1m")).ok())
                .flat_map(|e| metric_names(&e))
                .collect();
            let steps = p["fieldConfig"]["defaults"]["thresholds"]["steps"]
                .as_array()
                .cloned()
                .unwrap_or_default();
            for (metric, value, alert, severity, op) in &thresholds {
                if !shown.contains(metric)
                    || THRESHOLD_EXEMPTIONS
                        .iter()
                        .any(|(a, m, _)| a == alert && m == metric)
                {
                    continue;
                }
                checked += 1;
                let colour = if severity == "critical" {
                    "red"
                } else {
                    "orange"
                };
                let step = steps.iter().find(|s| s["value"].as_f64() == Some(*value));
                let ok = match (op.as_str(), step) {
                    (">", Some(s)) => s["color"] == colour,
                    ("<", Some(s)) => s["color"] == "green" && steps[0]["color"] == colour,
                    _ => false,
                };
                if !ok {
                    problems.push(format!(
                        "{file}: panel {title:?} shows {metric} but not {alert}'s {severity} threshold {op} {value} in {colour}"
                    ));
                }
            }
        }
    }
    assert!(checked >= 9, "only {checked} panel thresholds checked");
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

// ---------------------------------------------------------------------------------------------
// Prometheus's and Alertmanager's own tools

fn run(program: &Path, args: &[&str]) -> String {
    let out = Command::new(program)
        .args(args)
        .current_dir(repo())
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "{} {args:?} failed ({}):\n{text}",
        program.display(),
        out.status
    );
    text
}

fn rel(p: &Path) -> String {
    p.strip_prefix(repo()).unwrap().to_str().unwrap().to_owned()
}

#[test]
fn promtool_checks_and_tests_the_rules() {
    let Some(promtool) = require("promtool") else {
        return;
    };
    let rules: Vec<String> = files("alerts", ".rules.yml")
        .iter()
        .map(|p| rel(p))
        .collect();
    let mut args = vec!["check", "rules", "--lint=all", "--lint-fatal"];
    args.extend(rules.iter().map(String::as_str));
    let out = run(&promtool, &args);
    assert!(out.contains("SUCCESS"), "{out}");

    let tests: Vec<String> = files("alerts/tests", ".test.yml")
        .iter()
        .map(|p| rel(p))
        .collect();
    let mut args = vec!["test", "rules"];
    args.extend(tests.iter().map(String::as_str));
    let out = run(&promtool, &args);
    assert_eq!(out.matches("SUCCESS").count(), tests.len(), "{out}");

    // The example scrape configuration, with the rule file it loads.
    run(
        &promtool,
        &["check", "config", "alerts/prometheus.example.yml"],
    );
}

#[test]
fn amtool_checks_the_example_and_routes_by_severity() {
    let Some(amtool) = require("amtool") else {
        return;
    };
    let file = "--config.file=alerts/alertmanager.example.yml";
    run(
        &amtool,
        &["check-config", "alerts/alertmanager.example.yml"],
    );
    let severities: BTreeSet<String> = alerts().into_iter().map(|a| a.severity).collect();
    for severity in severities {
        let receiver = match severity.as_str() {
            "critical" => "pager",
            "warning" => "tickets",
            _ => "blackhole",
        };
        run(
            &amtool,
            &[
                "config",
                "routes",
                "test",
                file,
                &format!("--verify.receivers={receiver}"),
                &format!("severity={severity}"),
                "alertname=AutotunerHostMemoryHigh",
            ],
        );
    }
    // And a wrong expectation fails, so the checks above mean something.
    let out = Command::new(&amtool)
        .args(["config", "routes", "test", file, "--verify.receivers=pager"])
        .arg("severity=warning")
        .current_dir(repo())
        .output()
        .unwrap();
    assert!(!out.status.success());
}

// ---------------------------------------------------------------------------------------------
// End to end

/// A process of the test (Prometheus, Alertmanager) with its output in a file; killed on drop.
struct Daemon {
    name: &'static str,
    child: Child,
    log: PathBuf,
}

impl Daemon {
    /// Starts the program with its output in `log` (truncated first: each attempt's own).
    fn spawn(name: &str, program: &Path, args: &[String], dir: &Path, log: &Path) -> Child {
        let out = std::fs::File::create(log).unwrap();
        Command::new(program)
            .args(args)
            .current_dir(dir)
            .stdout(Stdio::from(out.try_clone().unwrap()))
            .stderr(Stdio::from(out))
            .spawn()
            .unwrap_or_else(|e| panic!("starting {name}: {e}"))
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Starts the daemon on a free port given by `args(port)`, on another port when another
    /// process took the chosen one before the daemon bound it (`common::spawn_on_free_port`).
    fn start_on_free_port(
        name: &'static str,
        program: &Path,
        args: impl Fn(u16) -> Vec<String>,
        dir: &Path,
    ) -> (u16, Daemon) {
        let log = dir.join(format!("{name}.log"));
        let (port, child) = common::spawn_on_free_port(
            name,
            |port| Daemon::spawn(name, program, &args(port), dir, &log),
            || std::fs::read_to_string(&log).unwrap_or_default(),
        );
        (port, Daemon { name, child, log })
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        // The assertion that failed says what; the daemon's own log usually says why.
        if std::thread::panicking() {
            eprintln!("----- {} log -----\n{}", self.name, self.log());
        }
    }
}

async fn get_json(
    client: &reqwest::Client,
    url: &str,
    query: &[(&str, &str)],
) -> Result<Json, String> {
    // reqwest is built without its `query` feature; url encodes the parameters.
    let url = url::Url::parse_with_params(url, query).map_err(|e| e.to_string())?;
    let r = client.get(url).send().await.map_err(|e| e.to_string())?;
    let status = r.status();
    let text = r.text().await.map_err(|e| e.to_string())?;
    if !status.is_success() {
        return Err(format!("{status}: {text}"));
    }
    serde_json::from_str(&text).map_err(|e| format!("{e}: {text}"))
}

/// A copy of a rule file (Prometheus's, or ours in rules/) with every `for:` shortened, so an
/// alert fires within the test; the rule logic itself is what promtool's tests prove.
fn with_short_for(path: &Path, to: &str) -> String {
    let mut y = read_yaml(path);
    for g in y["groups"].as_sequence_mut().unwrap() {
        for r in g["rules"].as_sequence_mut().unwrap() {
            if r.get("for").is_some() {
                r["for"] = Yaml::from(to);
            }
        }
    }
    serde_yaml::to_string(&y).unwrap()
}

/// What the webhook receiver got: (path, body).
type Received = Arc<Mutex<Vec<(String, Json)>>>;

/// A small HTTP server: the Alertmanager receivers' webhook (`POST /pager`, `POST /tickets`),
/// the target of the test rule's webhook action (`POST /hook`), and the endpoint the autotuner
/// probes (`GET /health`).
async fn start_sink() -> (std::net::SocketAddr, Received) {
    use axum::routing::{get, post};
    let received: Received = Arc::default();
    let store = |path: &'static str, r: Received| {
        post(move |body: String| async move {
            r.lock().unwrap().push((
                path.to_owned(),
                serde_json::from_str(&body).unwrap_or(Json::Null),
            ));
            "ok"
        })
    };
    let app = axum::Router::new()
        .route("/pager", store("pager", received.clone()))
        .route("/tickets", store("tickets", received.clone()))
        .route("/hook", store("hook", received.clone()))
        .route("/health", get(|| async { "ok" }));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    (addr, received)
}

/// Alerts in Alertmanager named `name`, as its v2 API reports them.
async fn am_alerts(client: &reqwest::Client, am: &str, name: &str) -> Result<Vec<Json>, String> {
    let v = get_json(
        client,
        &format!("{am}/api/v2/alerts"),
        &[("filter", &format!("alertname=\"{name}\""))],
    )
    .await?;
    Ok(v.as_array().cloned().unwrap_or_default())
}

fn receivers(alert: &Json) -> Vec<String> {
    alert["receivers"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|r| r["name"].as_str().map(str::to_owned))
        .collect()
}

/// Whether the webhook got a firing notification of `name` on `path`.
fn notified(received: &Received, path: &str, name: &str) -> bool {
    received.lock().unwrap().iter().any(|(p, body)| {
        p == path
            && body["alerts"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|a| a["labels"]["alertname"] == name && a["status"] == "firing")
    })
}

/// Load for the autotuner to measure until `stop`: Redis lookups that mostly miss, slow and
/// ordinary PostgreSQL statements, and queries through PgBouncer.
fn drive_load(env: &PgEnv, redis_url: String, stop: Arc<std::sync::atomic::AtomicBool>) {
    use std::sync::atomic::Ordering;
    let s = stop.clone();
    tokio::spawn(async move {
        let client = redis::Client::open(redis_url).unwrap();
        let mut conn = client.get_multiplexed_async_connection().await.unwrap();
        let _: () = redis::cmd("SET")
            .arg("hot")
            .arg("1")
            .query_async(&mut conn)
            .await
            .unwrap();
        let mut i = 0u64;
        while !s.load(Ordering::Relaxed) {
            // One hit in five lookups: a hit ratio of 20 %, at about 200 lookups a second.
            let key = if i.is_multiple_of(5) {
                "hot".to_owned()
            } else {
                format!("cold:{i}")
            };
            let r: Result<Option<String>, _> =
                redis::cmd("GET").arg(&key).query_async(&mut conn).await;
            if r.is_err() {
                // The test kills the server at the end; nothing more to drive.
                break;
            }
            i += 1;
            if i.is_multiple_of(10) {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    });
    for url in [env.url.clone(), env.pgbouncer_db_url.clone()] {
        let s = stop.clone();
        tokio::spawn(async move {
            let db = pg_connect(&url).await;
            while !s.load(Ordering::Relaxed) {
                // Slow (150 ms, over the 100 ms threshold) and ordinary statements that read
                // blocks, for the latency, slow-query and buffer-cache figures.
                let _ = db.query("SELECT pg_sleep(0.15)", &[]).await;
                let _ = db
                    .query(
                        "SELECT count(*) FROM pg_class, pg_attribute WHERE attrelid = pg_class.oid",
                        &[],
                    )
                    .await;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        });
    }
}

/// Every metric name the dashboards and alerts read.
fn names_used() -> BTreeMap<String, Vec<String>> {
    let mut used: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (file, d) in dashboards() {
        for q in queries(&file, &d) {
            let e = parser::parse(&expand(&q.expr, "1m")).unwrap();
            for n in metric_names(&e) {
                used.entry(n)
                    .or_default()
                    .push(format!("{file}: {}", q.place));
            }
        }
    }
    for a in alerts() {
        for n in metric_names(&parser::parse(&a.expr).unwrap()) {
            used.entry(n).or_default().push(format!("alert {}", a.name));
        }
    }
    used
}

/// Whether `name` is one of NOT_PUBLISHED_YET (a histogram by its family name).
fn pending(name: &str) -> bool {
    pending_in(NOT_PUBLISHED_YET, name)
}

fn pending_in(list: &[(&str, &str)], name: &str) -> bool {
    list.iter().any(|(p, _)| {
        name == *p
            || ["_bucket", "_sum", "_count"]
                .iter()
                .any(|s| name == format!("{p}{s}"))
    })
}

/// The names on a live `/metrics` against those the dashboards and alerts read.
fn check_names_against(live: &BTreeSet<String>, not_yet: &[(&str, &str)]) -> Vec<String> {
    let used = names_used();
    let mut problems = Vec::new();
    for (name, places) in &used {
        let published = live.contains(name) || PROMETHEUS_SERIES.contains(&name.as_str());
        if pending_in(not_yet, name) {
            if published {
                problems.push(format!(
                    "{name} is published now: remove it from NOT_PUBLISHED_YET"
                ));
            }
        } else if !published {
            problems.push(format!(
                "{name} (read by {}) is not on the live /metrics",
                places.join(", ")
            ));
        }
    }
    for (p, _) in not_yet {
        if !used
            .keys()
            .any(|n| pending_in(not_yet, n) && n.starts_with(p))
        {
            problems.push(format!("{p} in NOT_PUBLISHED_YET is read by nothing"));
        }
    }
    problems
}

#[test]
fn the_metric_name_check_reports_unknown_and_stale_names() {
    let live: BTreeSet<String> = names_used().into_keys().filter(|n| !pending(n)).collect();
    assert_eq!(
        check_names_against(&live, NOT_PUBLISHED_YET),
        Vec::<String>::new()
    );
    let mut missing = live.clone();
    missing.remove("redis_cache_hit_ratio");
    let problems = check_names_against(&missing, NOT_PUBLISHED_YET);
    assert!(
        problems
            .iter()
            .any(|p| p.starts_with("redis_cache_hit_ratio (read by ")),
        "{problems:?}"
    );
    // A listed metric is excused while absent, reported once published, and a listed name no
    // query reads is reported too.
    let listed = [
        ("autotuner_breaker_open", "an event"),
        ("no_such_metric", "never"),
    ];
    missing.insert("redis_cache_hit_ratio".into());
    missing.remove("autotuner_breaker_open");
    let problems = check_names_against(&missing, &listed);
    assert_eq!(
        problems,
        ["no_such_metric in NOT_PUBLISHED_YET is read by nothing"],
        "{problems:?}"
    );
    let problems = check_names_against(&live, &listed[..1]);
    assert_eq!(
        problems,
        ["autotuner_breaker_open is published now: remove it from NOT_PUBLISHED_YET"]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_and_alertmanager_end_to_end() {
    let (Some(prometheus), Some(alertmanager)) =
        (require("prometheus"), require("prometheus-alertmanager"))
    else {
        return;
    };
    let Some(env) = PgEnv::get() else { return };
    let started = Instant::now();
    let Some(mut redis) = RedisServer::start(&["--maxmemory", "64mb"]) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let client = common::client();
    let (sink, received) = start_sink().await;

    // The autotuner, every collector on a 1 s interval with short windows, and the shipped
    // rules with short `for`s so that one fires (and publishes its action-request counter).
    let rules = dir.path().join("rules");
    std::fs::create_dir(&rules).unwrap();
    for f in std::fs::read_dir(repo().join("rules")).unwrap() {
        let p = f.unwrap().path();
        if p.extension().is_some_and(|e| e == "yml") {
            std::fs::write(rules.join(p.file_name().unwrap()), with_short_for(&p, "1s")).unwrap();
        }
    }
    // A rule that acts for real (a webhook to our server) every second while Redis is up, and
    // so opens its breaker after two actions: the action counters, durations and breaker
    // gauge get their series, and AutotunerBreakerOpen has something to say.
    std::fs::write(
        rules.join("e2e.yml"),
        format!(
            "groups:
  - name: e2e
    interval: 1s
    rules:
      - name: E2eWebhook
        expr: redis_up == 1
        repeat: 1s
        cooldown: 1s
        mode: enforce
        actions:
          - webhook: {{url: 'http://{sink}/hook', retries: 0}}
"
        ),
    )
    .unwrap();
    let config = write_config(
        &dir,
        &format!(
            "collectors:
  host: {{interval: 1s}}
  redis: {{interval: 1s, hit_ratio_window: 5s}}
  postgres: {{interval: 1s, window: 5s}}
  pgbouncer: {{interval: 1s}}
  http_probe: {{interval: 1s, error_ratio_window: 10s}}
targets:
  redis: [{{name: cache, url: '{}'}}]
  postgres: [{{name: main, url: '{}'}}]
  pgbouncer: [{{name: bouncer, url: '{}'}}]
  http: [{{name: health, url: 'http://{sink}/health', timeout: 500ms}}]
actions:
  breaker: {{max_actions: 2, window: 1h}}
knobs:
  batch_size: {{initial: 500, min: 50, max: 5000}}
",
            redis.url(),
            env.monitor_url,
            env.pgbouncer_url
        ),
    );
    let app = Autotuner::start(
        &[
            "--config.file",
            &config,
            "--rules.dir",
            rules.to_str().unwrap(),
        ],
        &[],
    )
    .await_ready()
    .await;

    // Alertmanager with the example configuration: its routes and inhibition as shipped, the
    // waits shortened and the receivers pointed at our webhook.
    let mut am_config = read_yaml(&repo().join("alerts/alertmanager.example.yml"));
    am_config["route"]["group_wait"] = Yaml::from("1s");
    am_config["route"]["group_interval"] = Yaml::from("1s");
    for r in am_config["receivers"].as_sequence_mut().unwrap() {
        let name = r["name"].as_str().unwrap().to_owned();
        for w in r["webhook_configs"].as_sequence_mut().into_iter().flatten() {
            w["url"] = Yaml::from(format!("http://{sink}/{name}"));
        }
    }
    let am_file = dir.path().join("alertmanager.yml");
    std::fs::write(&am_file, serde_yaml::to_string(&am_config).unwrap()).unwrap();
    let (am_port, am_daemon) = Daemon::start_on_free_port(
        "alertmanager",
        &alertmanager,
        |port| {
            vec![
                format!("--config.file={}", am_file.display()),
                format!("--storage.path={}", dir.path().join("am-data").display()),
                format!("--web.listen-address=127.0.0.1:{port}"),
                // No cluster: no gossip port of its own, and no wait for peers.
                "--cluster.listen-address=".into(),
            ]
        },
        dir.path(),
    );
    let am = format!("http://127.0.0.1:{am_port}");

    // Prometheus scraping the autotuner every second, evaluating a copy of alerts/ every second.
    for f in files("alerts", ".rules.yml") {
        std::fs::write(
            dir.path().join(f.file_name().unwrap()),
            with_short_for(&f, "1s"),
        )
        .unwrap();
    }
    std::fs::write(
        dir.path().join("prometheus.yml"),
        format!(
            "global: {{scrape_interval: 1s, evaluation_interval: 1s}}
rule_files: ['*.rules.yml']
alerting:
  alertmanagers: [{{static_configs: [{{targets: ['127.0.0.1:{am_port}']}}]}}]
scrape_configs:
  - job_name: autotuner
    static_configs: [{{targets: ['{}']}}]
",
            app.addr
        ),
    )
    .unwrap();
    let (prom_port, prom_daemon) = Daemon::start_on_free_port(
        "prometheus",
        &prometheus,
        |port| {
            vec![
                format!(
                    "--config.file={}",
                    dir.path().join("prometheus.yml").display()
                ),
                format!("--storage.tsdb.path={}", dir.path().join("tsdb").display()),
                format!("--web.listen-address=127.0.0.1:{port}"),
            ]
        },
        dir.path(),
    );
    let prom = format!("http://127.0.0.1:{prom_port}");
    for (what, url) in [
        ("Alertmanager ready", format!("{am}/-/ready")),
        ("Prometheus ready", format!("{prom}/-/ready")),
    ] {
        until(Duration::from_secs(20), what, || async {
            match client.get(&url).send().await {
                Ok(r) if r.status().is_success() => Ok(()),
                Ok(r) => Err(r.status().to_string()),
                Err(e) => Err(e.to_string()),
            }
        })
        .await;
    }

    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    drive_load(&env, redis.url(), stop.clone());

    // The example's inhibition, in the real Alertmanager: a critical alert mutes its warning
    // twin on the same instance, not the warning on another one.
    let twin = |severity: &str, instance: &str| {
        serde_json::json!({"labels": {"alertname": "AutotunerHostMemoryHigh", "severity": severity,
            "job": "autotuner", "instance": instance}})
    };
    let posted = client
        .post(format!("{am}/api/v2/alerts"))
        .json(&serde_json::json!([
            twin("critical", "inhibition-a:1"),
            twin("warning", "inhibition-a:1"),
            twin("warning", "inhibition-b:1")
        ]))
        .send()
        .await
        .unwrap();
    assert!(posted.status().is_success(), "{posted:?}");
    until(
        Duration::from_secs(10),
        "the warning twin inhibited",
        || async {
            let all = am_alerts(&client, &am, "AutotunerHostMemoryHigh").await?;
            let state = |severity: &str, instance: &str| {
                all.iter()
                    .find(|a| {
                        a["labels"]["severity"] == severity && a["labels"]["instance"] == instance
                    })
                    .map(|a| a["status"]["state"].as_str().unwrap_or("").to_owned())
            };
            match (
                state("critical", "inhibition-a:1").as_deref(),
                state("warning", "inhibition-a:1").as_deref(),
                state("warning", "inhibition-b:1").as_deref(),
            ) {
                (Some("active"), Some("suppressed"), Some("active")) => Ok(()),
                other => Err(format!("{other:?}")),
            }
        },
    )
    .await;

    // Prometheus scrapes the autotuner.
    until(
        Duration::from_secs(20),
        "the autotuner target up",
        || async {
            let v = get_json(&client, &format!("{prom}/api/v1/targets"), &[]).await?;
            let t = &v["data"]["activeTargets"][0];
            if t["health"] == "up" && t["lastError"] == "" {
                Ok(())
            } else {
                Err(t.to_string())
            }
        },
    )
    .await;

    // A burst of Redis misses: AutotunerRedisHitRatioLow (warning) reaches Alertmanager, routed
    // to the tickets receiver, and its notification reaches the webhook.
    let hit_ratio = until(
        Duration::from_secs(40),
        "AutotunerRedisHitRatioLow in Alertmanager and at the tickets webhook",
        || async {
            let found = am_alerts(&client, &am, "AutotunerRedisHitRatioLow").await?;
            match found.first() {
                Some(a) if notified(&received, "tickets", "AutotunerRedisHitRatioLow") => {
                    Ok(a.clone())
                }
                _ => Err(format!("{found:?}")),
            }
        },
    )
    .await;
    assert_eq!(receivers(&hit_ratio), ["tickets"]);
    assert_eq!(hit_ratio["labels"]["severity"], "warning");
    assert_eq!(hit_ratio["labels"]["target"], "cache");
    assert_eq!(hit_ratio["labels"]["job"], "autotuner");
    assert_eq!(
        hit_ratio["annotations"]["runbook_url"],
        "alerts/runbook.md#autotunerredishitratiolow"
    );

    // The test rule's breaker opens: AutotunerBreakerOpen (warning) reaches Alertmanager.
    let breaker = until(
        Duration::from_secs(30),
        "AutotunerBreakerOpen in Alertmanager",
        || async {
            let found = am_alerts(&client, &am, "AutotunerBreakerOpen").await?;
            found.first().cloned().ok_or_else(|| format!("{found:?}"))
        },
    )
    .await;
    assert_eq!(receivers(&breaker), ["tickets"]);
    assert_eq!(breaker["labels"]["rule"], "E2eWebhook");
    assert!(received.lock().unwrap().iter().any(|(p, _)| p == "hook"));

    // Every rule evaluates without error on real data (vector matching mistakes only show
    // there), and none of the alerts that would mean the setup itself is broken fires.
    let rules_now = get_json(&client, &format!("{prom}/api/v1/rules"), &[])
        .await
        .unwrap();
    let mut count = 0;
    for g in rules_now["data"]["groups"].as_array().unwrap() {
        for r in g["rules"].as_array().unwrap() {
            count += 1;
            assert_eq!(
                r["health"], "ok",
                "rule {} failed: {}",
                r["name"], r["lastError"]
            );
        }
    }
    assert_eq!(count, alerts().len());
    let firing = get_json(&client, &format!("{prom}/api/v1/alerts"), &[])
        .await
        .unwrap();
    for a in firing["data"]["alerts"].as_array().unwrap() {
        let name = a["labels"]["alertname"].as_str().unwrap_or("");
        assert!(
            ![
                "AutotunerDown",
                "AutotunerAbsent",
                "AutotunerPostgresDown",
                "AutotunerPgbouncerDown",
                "AutotunerRedisDown",
                "AutotunerCollectorFailing",
                "AutotunerRuleReloadFailed",
            ]
            .contains(&name),
            "{name} fires on a healthy setup: {a}"
        );
    }

    // Every metric the dashboards and alerts read is on the live /metrics, now that the load
    // has run and a rule has fired (or is listed as not published yet).
    let live = app
        .scrape_until(
            Duration::from_secs(20),
            "a fired rule's request counter and an executed action's duration",
            |s| {
                !s.all("autotuner_rule_action_requests_total").is_empty()
                    && !s.all("autotuner_action_duration_seconds_count").is_empty()
            },
        )
        .await;
    // From the text itself: the parser folds a histogram's `_bucket` lines into its family.
    let live_names: BTreeSet<String> = live
        .text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(|l| l.split(['{', ' ']).next().unwrap().to_owned())
        .collect();
    let problems = check_names_against(&live_names, NOT_PUBLISHED_YET);
    assert!(problems.is_empty(), "{}", problems.join("\n"));

    // Every dashboard query and variable returns data from Prometheus (those reading metrics
    // not published yet excepted). `$__rate_interval` is what Grafana would compute for a 1 s
    // scrape interval, with margin.
    let mut all: Vec<Query> = Vec::new();
    for (file, d) in dashboards() {
        all.extend(queries(&file, &d));
    }
    let mut skipped = Vec::new();
    all.retain(|q| {
        let e = parser::parse(&expand(&q.expr, "1m")).unwrap();
        let pending_only = metric_names(&e).iter().any(|n| pending(n));
        if pending_only {
            skipped.push(format!("{}: {}", q.dashboard, q.place));
        }
        !pending_only
    });
    let empty = until(
        Duration::from_secs(30),
        "every dashboard query with data",
        || async {
            let mut empty = Vec::new();
            let end = chrono_now();
            for q in &all {
                let expr = expand(&q.expr, "10s");
                let data = if let Some(label) = &q.label {
                    get_json(
                        &client,
                        &format!("{prom}/api/v1/label/{label}/values"),
                        &[("match[]", expr.as_str())],
                    )
                    .await?["data"]
                        .clone()
                } else if q.instant {
                    get_json(
                        &client,
                        &format!("{prom}/api/v1/query"),
                        &[("query", expr.as_str())],
                    )
                    .await?["data"]["result"]
                        .clone()
                } else {
                    let start = format!("{}", end - 30.0);
                    let end = format!("{end}");
                    get_json(
                        &client,
                        &format!("{prom}/api/v1/query_range"),
                        &[
                            ("query", expr.as_str()),
                            ("start", &start),
                            ("end", &end),
                            ("step", "1"),
                        ],
                    )
                    .await?["data"]["result"]
                        .clone()
                };
                if data.as_array().is_none_or(|a| a.is_empty()) {
                    empty.push(format!("{}: {}: {}", q.dashboard, q.place, expr));
                }
            }
            if empty.is_empty() {
                Ok(empty)
            } else {
                Err(empty.join("\n"))
            }
        },
    )
    .await;
    assert!(empty.is_empty());
    assert!(all.len() > 40, "only {} queries checked", all.len());
    eprintln!(
        "{} dashboard queries returned data; not published yet, so not run: {skipped:?}",
        all.len()
    );

    // Redis dies: AutotunerRedisDown (critical) reaches Alertmanager routed to the pager.
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    redis.kill();
    let down = until(
        Duration::from_secs(30),
        "AutotunerRedisDown in Alertmanager and at the pager webhook",
        || async {
            let found = am_alerts(&client, &am, "AutotunerRedisDown").await?;
            match found.first() {
                Some(a) if notified(&received, "pager", "AutotunerRedisDown") => Ok(a.clone()),
                _ => Err(format!("{found:?}")),
            }
        },
    )
    .await;
    assert_eq!(receivers(&down), ["pager"]);
    assert_eq!(down["labels"]["severity"], "critical");
    assert_eq!(down["labels"]["target"], "cache");

    eprintln!("end to end in {:?}", started.elapsed());
    drop(prom_daemon);
    drop(am_daemon);
}

/// Now, in seconds since the Unix epoch, as Prometheus's API takes it.
fn chrono_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}
