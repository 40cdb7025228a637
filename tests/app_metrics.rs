//! Rules that see what Prometheus sees (issue 18), against real programs no one here wrote:
//!
//! - Scrape targets: Debian's Prometheus and the autotuner scrape the same endpoints — a small
//!   application instrumented with Debian's `python3-prometheus-client` (OpenMetrics and text,
//!   gzip, histograms, summaries, info, stateset, NaN/±Inf, escapes), and payloads captured
//!   from `prometheus-node-exporter` and from Prometheus's own `/metrics` served byte for byte
//!   — and every series and value the rules see (`/api/v1/query` over the history) equals
//!   what Prometheus stores (its `/api/v1/query`). Then a series disappears (stale at once),
//!   a limit is exceeded (the whole scrape refused), the application dies (every series stale,
//!   `autotuner_scrape_up 0`, the reason in `autotuner_target_error`). A live node_exporter is
//!   scraped too.
//! - A remote PromQL source: a rule group with `source:` is evaluated by that Prometheus and
//!   acts through the gate and audit; a source that is down, never answers, or answers an
//!   error makes its rules' health `err` with the reason, acts on nothing, and holds up no
//!   other group.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::Value as Json;

use common::{Autotuner, require, spawn_on_free_port, until, write_config};

const PYTHON: &str = "/usr/bin/python3";

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Debian's python3 with its prometheus_client, or `None` after saying NOT RUN.
fn python_client() -> Option<()> {
    let ok = Command::new(PYTHON)
        .args(["-c", "import prometheus_client"])
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        common::not_run("python3-prometheus-client is not installed (scripts/test installs it)");
        return None;
    }
    Some(())
}

/// A program of the test with its output in a file, killed on drop.
struct Daemon {
    name: &'static str,
    child: Child,
    log: PathBuf,
}

impl Daemon {
    fn start(
        name: &'static str,
        program: &Path,
        args: impl Fn(u16) -> Vec<String>,
        dir: &Path,
    ) -> (u16, Daemon) {
        let log = dir.join(format!("{name}.log"));
        let (port, child) = spawn_on_free_port(
            name,
            |port| {
                let out = std::fs::File::create(&log).unwrap();
                Command::new(program)
                    .args(args(port))
                    .current_dir(dir)
                    .stdout(Stdio::from(out.try_clone().unwrap()))
                    .stderr(Stdio::from(out))
                    .spawn()
                    .unwrap_or_else(|e| panic!("starting {name}: {e}"))
            },
            || std::fs::read_to_string(&log).unwrap_or_default(),
        );
        (port, Daemon { name, child, log })
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            eprintln!(
                "----- {} log -----\n{}",
                self.name,
                std::fs::read_to_string(&self.log).unwrap_or_default()
            );
        }
    }
}

fn start_app(dir: &Path) -> (u16, Daemon) {
    let script = repo().join("tests/apps/metrics_app.py");
    let static_dir = dir.to_str().unwrap().to_owned();
    Daemon::start(
        "metrics_app",
        Path::new(PYTHON),
        move |port| {
            vec![
                script.to_str().unwrap().to_owned(),
                port.to_string(),
                static_dir.clone(),
            ]
        },
        dir,
    )
}

fn start_prometheus(dir: &Path, config: &str) -> Option<(u16, Daemon)> {
    let program = require("prometheus")?;
    std::fs::write(dir.join("prometheus.yml"), config).unwrap();
    let data = dir.join("prometheus-data");
    Some(Daemon::start(
        "prometheus",
        &program,
        move |port| {
            vec![
                "--config.file=prometheus.yml".into(),
                format!("--storage.tsdb.path={}", data.display()),
                format!("--web.listen-address=127.0.0.1:{port}"),
            ]
        },
        dir,
    ))
}

async fn get_json(url: &str, query: &[(&str, &str)]) -> Result<Json, String> {
    let url = url::Url::parse_with_params(url, query).map_err(|e| e.to_string())?;
    let r = common::client()
        .get(url)
        .send()
        .await
        .map_err(|e| e.to_string())?;
    let status = r.status();
    let text = r.text().await.map_err(|e| e.to_string())?;
    if !status.is_success() {
        return Err(format!("{status}: {text}"));
    }
    serde_json::from_str(&text).map_err(|e| format!("{e}: {text}"))
}

/// A series' labels (without the ones naming the scrape) and its value, as the API wrote it.
type Series = BTreeMap<BTreeMap<String, String>, String>;

/// An instant query's vector, keyed by label set, the labels in `drop` removed and `rename`d.
async fn vector(
    base: &str,
    query: &str,
    drop: &[&str],
    rename: &[(&str, &str)],
) -> Result<Series, String> {
    let v = get_json(&format!("{base}/api/v1/query"), &[("query", query)]).await?;
    let result = v["data"]["result"]
        .as_array()
        .ok_or_else(|| format!("no vector: {v}"))?;
    let mut out = Series::new();
    for s in result {
        let mut labels = BTreeMap::new();
        for (k, val) in s["metric"].as_object().unwrap() {
            if drop.contains(&k.as_str()) {
                continue;
            }
            let k = rename
                .iter()
                .find(|(from, _)| from == k)
                .map_or(k.as_str(), |(_, to)| to);
            labels.insert(k.to_owned(), val.as_str().unwrap().to_owned());
        }
        let name = labels.get("__name__").cloned().unwrap_or_default();
        // The scrapers' own series about the scrape differ by design.
        if name == "up" || name.starts_with("scrape_") || name.starts_with("autotuner_") {
            continue;
        }
        out.insert(labels, s["value"][1].as_str().unwrap().to_owned());
    }
    Ok(out)
}

/// Equal as numbers (both write Go's or Rust's shortest form), NaN equal to NaN.
fn same_value(a: &str, b: &str) -> bool {
    let parse = |s: &str| match s {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        s => s.parse::<f64>().unwrap(),
    };
    let (x, y) = (parse(a), parse(b));
    (x.is_nan() && y.is_nan()) || x == y
}

/// What the autotuner's rules see for `target` and what Prometheus stored for `job`: the
/// differences, empty when they agree.
async fn differences(ours: &str, prom: &str, name: &str) -> Result<(usize, Vec<String>), String> {
    let mine = vector(
        ours,
        &format!("{{target=\"{name}\"}}"),
        &["target"],
        &[("exported_target", "target")],
    )
    .await?;
    let theirs = vector(
        prom,
        &format!("{{job=\"{name}\"}}"),
        &["job", "instance"],
        &[],
    )
    .await?;
    let mut diff = Vec::new();
    for (labels, v) in &theirs {
        match mine.get(labels) {
            None => diff.push(format!("missing here: {labels:?} = {v}")),
            Some(m) if !same_value(m, v) => {
                diff.push(format!("{labels:?}: here {m}, Prometheus {v}"))
            }
            Some(_) => {}
        }
    }
    for labels in mine.keys() {
        if !theirs.contains_key(labels) {
            diff.push(format!("only here: {labels:?}"));
        }
    }
    Ok((theirs.len(), diff))
}

async fn metric(app: &Autotuner, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    app.scrape().await.value(name, labels)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scraped_series_are_what_prometheus_stores() {
    if python_client().is_none() {
        return;
    }
    let Some(node_exporter) = require("prometheus-node-exporter") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let (app_port, mut app_daemon) = start_app(dir.path());
    let app = format!("127.0.0.1:{app_port}");

    // node_exporter's real payload, captured once and then served unchanged to both scrapers
    // (its counters move between two live scrapes); a live one is scraped as well.
    let (node_port, _node) = Daemon::start(
        "node_exporter",
        &node_exporter,
        |port| vec![format!("--web.listen-address=127.0.0.1:{port}")],
        dir.path(),
    );
    let node_payload = common::client()
        .get(format!("http://127.0.0.1:{node_port}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(node_payload.lines().count() > 500, "{node_payload}");
    std::fs::write(dir.path().join("node.txt"), &node_payload).unwrap();

    let jobs = [
        ("app_om", app.clone(), "/metrics"),
        ("app_text", app.clone(), "/text"),
        ("node", app.clone(), "/static/node.txt"),
        ("prom", app.clone(), "/static/prom.txt"),
        ("node_live", format!("127.0.0.1:{node_port}"), "/metrics"),
    ];
    let mut prom_config =
        String::from("global:\n  scrape_interval: 2s\n  scrape_timeout: 1s\nscrape_configs:\n");
    for (job, addr, path) in &jobs {
        prom_config.push_str(&format!(
            "  - job_name: {job}\n    metrics_path: {path}\n    static_configs:\n      - targets: ['{addr}']\n"
        ));
    }
    let Some((prom_port, _prom)) = start_prometheus(dir.path(), &prom_config) else {
        return;
    };
    let prom = format!("http://127.0.0.1:{prom_port}");
    // Prometheus's own payload (real histograms), captured the same way.
    let prom_payload = until(Duration::from_secs(30), "Prometheus's /metrics", || async {
        let r = common::client()
            .get(format!("{prom}/metrics"))
            .send()
            .await
            .map_err(|e| e.to_string())?;
        r.text().await.map_err(|e| e.to_string())
    })
    .await;
    assert!(prom_payload.contains("_bucket{"), "{prom_payload}");
    std::fs::write(dir.path().join("prom.txt"), &prom_payload).unwrap();

    let mut targets =
        String::from("collectors:\n  host:\n    enabled: false\ntargets:\n  scrape:\n");
    for (job, addr, path) in &jobs {
        targets.push_str(&format!(
            "    - name: {job}\n      url: http://{addr}{path}\n      interval: 2s\n      timeout: 1s\n"
        ));
    }
    targets.push_str(&format!(
        "    - name: limited\n      url: http://{app}/metrics\n      interval: 2s\n      timeout: 1s\n      sample_limit: 10\n"
    ));
    targets.push_str(&format!(
        "    - name: filtered\n      url: http://{app}/metrics\n      interval: 2s\n      timeout: 1s\n      metric_relabel:\n        keep: 'app_.*'\n        drop: 'app_build_info|app_state'\n"
    ));
    let config_dir = tempfile::tempdir().unwrap();
    let config = write_config(&config_dir, &targets);
    let ours_app = Autotuner::start(&[&format!("--config.file={config}")], &[])
        .await_ready()
        .await;
    let ours = format!("http://{}", ours_app.addr);

    // Both have scraped every job since the payloads were in place.
    for (job, _, _) in &jobs {
        until(
            Duration::from_secs(30),
            &format!("both scraping {job}"),
            || async {
                let theirs = vector(&prom, &format!("up{{job=\"{job}\"}}"), &[], &[]).await;
                let v = get_json(
                    &format!("{prom}/api/v1/query"),
                    &[("query", &format!("up{{job=\"{job}\"}} == 1"))],
                )
                .await?;
                let up_there = v["data"]["result"].as_array().is_some_and(|r| r.len() == 1);
                let up_here =
                    metric(&ours_app, "autotuner_scrape_up", &[("target", job)]).await == Some(1.0);
                if up_there && up_here {
                    Ok(())
                } else {
                    Err(format!(
                        "Prometheus up: {theirs:?} {up_there}, ours: {up_here}"
                    ))
                }
            },
        )
        .await;
    }
    // Two more intervals, so both hold a scrape of the static payloads made after they were
    // written.
    tokio::time::sleep(Duration::from_secs(5)).await;

    for job in ["app_om", "app_text", "node", "prom"] {
        let (n, diff) = until(Duration::from_secs(20), &format!("{job} equal"), || async {
            let (n, diff) = differences(&ours, &prom, job).await?;
            if diff.is_empty() {
                Ok((n, diff))
            } else {
                Err(diff.join("\n"))
            }
        })
        .await;
        assert!(diff.is_empty());
        assert!(n > 10, "{job}: only {n} series compared");
        eprintln!("{job}: {n} series equal in both");
    }
    // The live node_exporter: the same series (values move between two scrapes).
    let live_here = vector(&ours, "{target=\"node_live\"}", &["target"], &[])
        .await
        .unwrap();
    let live_there = vector(&prom, "{job=\"node_live\"}", &["job", "instance"], &[])
        .await
        .unwrap();
    let (a, b): (Vec<_>, Vec<_>) = (live_here.keys().collect(), live_there.keys().collect());
    let common_n = a.iter().filter(|k| live_there.contains_key(**k)).count();
    assert!(
        common_n * 100 >= b.len() * 95 && a.len().abs_diff(b.len()) * 100 <= b.len() * 5,
        "live node_exporter: {} series here, {} in Prometheus, {common_n} in both",
        a.len(),
        b.len()
    );

    // What the OpenMetrics answer carried, spot-checked by name: the format's special values,
    // escapes and the renamed clashing label.
    let om = vector(&ours, "{target=\"app_om\"}", &["target"], &[])
        .await
        .unwrap();
    let find = |name: &str, label: (&str, &str)| {
        om.iter()
            .find(|(l, _)| {
                l.get("__name__").map(String::as_str) == Some(name)
                    && l.get(label.0).map(String::as_str) == Some(label.1)
            })
            .map(|(_, v)| v.clone())
    };
    assert_eq!(
        find("app_odd_values", ("kind", "nan")).as_deref(),
        Some("NaN")
    );
    assert_eq!(
        find("app_odd_values", ("kind", "neg_inf")).as_deref(),
        Some("-Inf")
    );
    assert_eq!(
        find(
            "app_label_escapes",
            (
                "value",
                "quote \" backslash \\ newline \n comma , brace } equals ="
            )
        )
        .as_deref(),
        Some("1")
    );
    assert_eq!(
        find("app_target_clash", ("exported_target", "theirs")).as_deref(),
        Some("7")
    );
    assert_eq!(
        find("http_request_duration_seconds_bucket", ("le", "+Inf")).as_deref(),
        Some("7")
    );

    // The name filter: only app_ series, less the two dropped.
    let filtered = vector(&ours, "{target=\"filtered\"}", &["target"], &[])
        .await
        .unwrap();
    assert!(!filtered.is_empty());
    for l in filtered.keys() {
        let n = &l["__name__"];
        assert!(
            n.starts_with("app_") && n != "app_build_info" && n != "app_state",
            "{n}"
        );
    }

    // A sample limit exceeded refuses the whole scrape.
    let s = ours_app.scrape().await;
    assert_eq!(
        s.value("autotuner_scrape_up", &[("target", "limited")]),
        Some(0.0)
    );
    assert!(
        s.value(
            "autotuner_scrape_limit_hits_total",
            &[("target", "limited")]
        )
        .unwrap()
            >= 1.0
    );
    assert!(
        vector(&ours, "{target=\"limited\"}", &[], &[])
            .await
            .unwrap()
            .is_empty()
    );
    // Scraped series are not served again on /metrics (republish is off by default).
    assert!(!s.text.contains("app_requests_total"), "{}", s.text);

    // A series that disappears is stale at the next scrape, here as in Prometheus.
    common::client()
        .get(format!("http://{app}/drop"))
        .send()
        .await
        .unwrap();
    let gone = "app_requests_total{route=\"/api/users\"}";
    until(
        Duration::from_secs(15),
        "the dropped series gone in both",
        || async {
            let here = vector(&ours, gone, &[], &[]).await?;
            let there = vector(&prom, gone, &[], &[]).await?;
            let (here_n, there_n) = (
                here.keys().filter(|l| l["target"] == "app_om").count(),
                there.keys().filter(|l| l["job"] == "app_om").count(),
            );
            if here_n == 0 && there_n == 0 {
                Ok(())
            } else {
                Err(format!("here {here:?}, Prometheus {there:?}"))
            }
        },
    )
    .await;

    // The application dies: every series of it stale at the next scrape, the reason given.
    app_daemon.kill();
    until(
        Duration::from_secs(15),
        "the dead application's series gone",
        || async {
            let here = vector(&ours, "{target=\"app_om\"}", &[], &[]).await?;
            let s = ours_app.scrape().await;
            let up = s.value("autotuner_scrape_up", &[("target", "app_om")]);
            let reason = s.value(
                "autotuner_target_error",
                &[
                    ("kind", "scrape"),
                    ("target", "app_om"),
                    ("reason", "connect"),
                ],
            );
            if here.is_empty() && up == Some(0.0) && reason == Some(1.0) {
                Ok(())
            } else {
                Err(format!(
                    "{} series, up {up:?}, connect {reason:?}",
                    here.len()
                ))
            }
        },
    )
    .await;
}

/// The rule status `/api/v1/rules` gives for `name`.
async fn rule_status(app: &Autotuner, name: &str) -> Json {
    let v = app.get_json("/api/v1/rules").await;
    v["data"]["rules"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["name"] == name)
        .cloned()
        .unwrap_or_else(|| panic!("no rule {name}: {v}"))
}

fn audit_rules(app: &Autotuner) -> Vec<(String, String)> {
    let path = app.data.as_ref().unwrap().path().join("audit.jsonl");
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| {
            let v: Json = serde_json::from_str(l).unwrap();
            (
                v["rule"].as_str().unwrap_or_default().to_owned(),
                v["decision"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rules_evaluated_by_a_prometheus_act_and_a_failing_source_acts_on_nothing() {
    if python_client().is_none() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (app_port, _app) = start_app(dir.path());
    let app = format!("127.0.0.1:{app_port}");
    let Some((prom_port, prom)) = start_prometheus(
        dir.path(),
        &format!(
            "global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: app\n    static_configs:\n      - targets: ['{app}']\n"
        ),
    ) else {
        return;
    };
    // Slow requests keep coming: the application's P95 is above 500 ms.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let load = {
        let stop = stop.clone();
        let app = app.clone();
        tokio::spawn(async move {
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let _ = common::client()
                    .get(format!(
                        "http://{app}/observe?route=/api/orders&seconds=1.5&n=5"
                    ))
                    .send()
                    .await;
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
        })
    };
    // A source that accepts connections and never answers.
    let hang = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let hang_addr = hang.local_addr().unwrap();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = hang.accept().await {
            held.push(s);
        }
    });
    let dead_port = common::free_port();

    let rules = tempfile::tempdir().unwrap();
    // The shipped example, every 2 s instead of 15 s.
    let example =
        std::fs::read_to_string(repo().join("examples/app-latency-fleet/rules/app_latency.yml"))
            .unwrap()
            .replace("interval: 15s", "interval: 2s")
            .replace("repeat: 15s", "repeat: 2s");
    std::fs::write(rules.path().join("app_latency.yml"), example).unwrap();
    std::fs::write(
        rules.path().join("others.yml"),
        "groups:
  - name: dead
    interval: 2s
    source: dead
    rules:
      - name: DeadSource
        expr: vector(1)
        mode: enforce
        actions: [{ knob: { name: other, set: 2 } }]
  - name: hang
    interval: 2s
    source: hang
    rules:
      - name: HangSource
        expr: vector(1)
        mode: enforce
        actions: [{ knob: { name: other3, set: 3 } }]
  - name: refused
    interval: 2s
    source: fleet
    rules:
      - name: RefusedQuery
        expr: app_requests_total + on(route) app_requests_total > 0
        mode: enforce
        actions: [{ knob: { name: other4, set: 4 } }]
  - name: local
    interval: 1s
    rules:
      - name: LocalTick
        expr: vector(1) < 0
",
    )
    .unwrap();
    let config_dir = tempfile::tempdir().unwrap();
    let config = write_config(
        &config_dir,
        &format!(
            "collectors:
  host:
    enabled: false
sources:
  fleet:
    url: http://127.0.0.1:{prom_port}
    timeout: 5s
  dead:
    url: http://127.0.0.1:{dead_port}
    timeout: 1s
  hang:
    url: http://{hang_addr}/
    timeout: 1s
knobs:
  batch_size: {{ initial: 1000, min: 100, max: 5000 }}
  other: {{ initial: 1, min: 0, max: 10 }}
  other3: {{ initial: 1, min: 0, max: 10 }}
  other4: {{ initial: 1, min: 0, max: 10 }}
"
        ),
    );
    let ours = Autotuner::start(
        &[
            &format!("--config.file={config}"),
            &format!("--rules.dir={}", rules.path().display()),
        ],
        &[],
    )
    .await_ready()
    .await;

    // The example fires from Prometheus's answer and its decisions are in the audit (dry_run).
    until(Duration::from_secs(60), "the fleet rule acting", || async {
        let r = rule_status(&ours, "AppLatencyControllerFleet").await;
        let audited = audit_rules(&ours)
            .iter()
            .any(|(rule, d)| rule == "AppLatencyControllerFleet" && d == "would_apply");
        if r["health"] == "ok" && audited {
            Ok(())
        } else {
            Err(format!("{r}"))
        }
    })
    .await;
    let fleet = rule_status(&ours, "AppLatencyControllerFleet").await;
    let value = fleet["instances"][0]["value"].as_f64().unwrap();
    assert!(value > 0.5, "P95 from Prometheus: {fleet}");

    // Measured, never asserted: a remote evaluation's round trip next to a local rule's
    // evaluation (docs/performance.md quotes these).
    let mut remote = Vec::new();
    let mut local = Vec::new();
    for _ in 0..10 {
        let s = ours.scrape().await;
        remote.extend(s.value(
            "autotuner_source_query_duration_seconds",
            &[("source", "fleet"), ("rule", "AppLatencyControllerFleet")],
        ));
        local.extend(s.value(
            "autotuner_rule_evaluation_duration_seconds",
            &[("rule", "LocalTick")],
        ));
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
    };
    eprintln!(
        "MEASURED remote evaluation (one query: the P95 histogram_quantile, to Prometheus) median {:.2} ms; local rule evaluation median {:.3} ms",
        median(&mut remote) * 1000.0,
        median(&mut local) * 1000.0
    );

    // Prometheus frozen (SIGSTOP): the rule's health turns err, its instance stays as it was
    // (nothing resolves, nothing more acts), and /metrics answers as before.
    let before = common::scrape_median(&ours, 20).await;
    let signal = |sig: &str| {
        assert!(
            Command::new("kill")
                .args([sig, &prom.child.id().to_string()])
                .status()
                .unwrap()
                .success()
        );
    };
    signal("-STOP");
    let frozen = until(
        Duration::from_secs(30),
        "the frozen source noticed",
        || async {
            let r = rule_status(&ours, "AppLatencyControllerFleet").await;
            if r["health"] == "err" {
                Ok(r)
            } else {
                Err(format!("{r}"))
            }
        },
    )
    .await;
    assert!(
        frozen["last_error"]
            .as_str()
            .unwrap()
            .contains("no answer within 5.0s"),
        "{frozen}"
    );
    assert_eq!(
        frozen["instances"].as_array().unwrap().len(),
        1,
        "state kept: {frozen}"
    );
    let fleet_records = || {
        audit_rules(&ours)
            .iter()
            .filter(|(r, _)| r == "AppLatencyControllerFleet")
            .count()
    };
    let acted_frozen = fleet_records();
    let during = common::scrape_median(&ours, 20).await;
    common::assert_scrapes_unaffected(before, during, "the PromQL source frozen");
    // Three evaluation intervals: a rule still acting would have asked again (repeat: 2s).
    tokio::time::sleep(Duration::from_secs(6)).await;
    assert_eq!(
        fleet_records(),
        acted_frozen,
        "acted while its source was frozen"
    );
    signal("-CONT");
    until(Duration::from_secs(30), "the source back", || async {
        let r = rule_status(&ours, "AppLatencyControllerFleet").await;
        if r["health"] == "ok" {
            Ok(())
        } else {
            Err(format!("{r}"))
        }
    })
    .await;

    // Meanwhile the failing sources: health err with the reason, state kept, nothing acted.
    let local_before = rule_status(&ours, "LocalTick").await["last_evaluation_ms"]
        .as_i64()
        .unwrap();
    for (rule, reason) in [
        ("DeadSource", "source dead"),
        ("HangSource", "no answer within 1.0s"),
        ("RefusedQuery", "execution"),
    ] {
        let r = until(
            Duration::from_secs(30),
            &format!("{rule} failing"),
            || async {
                let r = rule_status(&ours, rule).await;
                if r["health"] == "err" {
                    Ok(r)
                } else {
                    Err(format!("{r}"))
                }
            },
        )
        .await;
        let error = r["last_error"].as_str().unwrap();
        assert!(error.contains(reason), "{rule}: {error}");
        assert_eq!(r["instances"], serde_json::json!([]), "{rule}: {r}");
    }
    let s = ours.scrape().await;
    assert!(
        s.value("autotuner_source_queries_total", &[("source", "fleet")])
            .unwrap()
            >= 2.0
    );
    assert!(
        s.value(
            "autotuner_source_query_failures_total",
            &[("source", "dead"), ("reason", "connect")]
        )
        .unwrap()
            >= 1.0,
        "{}",
        s.text
    );
    assert!(
        s.value(
            "autotuner_source_query_failures_total",
            &[("source", "hang"), ("reason", "timeout")]
        )
        .unwrap()
            >= 1.0
    );
    assert!(
        s.value(
            "autotuner_source_query_failures_total",
            &[("source", "fleet"), ("reason", "error")]
        )
        .unwrap()
            >= 1.0
    );
    // The local group keeps its pace while the hung source holds its queries.
    until(
        Duration::from_secs(10),
        "the local rule evaluated on",
        || async {
            let now = rule_status(&ours, "LocalTick").await["last_evaluation_ms"]
                .as_i64()
                .unwrap();
            if now - local_before >= 3000 {
                Ok(())
            } else {
                Err(format!("{local_before} -> {now}"))
            }
        },
    )
    .await;
    let acted: Vec<_> = audit_rules(&ours)
        .into_iter()
        .filter(|(r, _)| ["DeadSource", "HangSource", "RefusedQuery"].contains(&r.as_str()))
        .collect();
    assert!(acted.is_empty(), "{acted:?}");
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let _ = load.await;
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

/// Targets that hang, answer garbage, or send a 50 MB body: each is `autotuner_scrape_up 0`
/// with its reason, the body is cut at `body_size_limit` (memory stays bounded), and
/// `/metrics` answers as fast as an autotuner with no scrape target.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broken_targets_are_reported_and_cost_nothing_else() {
    if python_client().is_none() {
        return;
    }
    let _hold = common::CpuHold::shared();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("garbage.txt"),
        "this is { not a metrics payload\n",
    )
    .unwrap();
    let mut big = String::with_capacity(52 << 20);
    let mut i = 0u64;
    while big.len() < 50 << 20 {
        big.push_str(&format!("big_series{{i=\"{i}\"}} 1\n"));
        i += 1;
    }
    std::fs::write(dir.path().join("big.txt"), &big).unwrap();
    drop(big);
    let (app_port, _app) = start_app(dir.path());
    let hang = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let hang_addr = hang.local_addr().unwrap();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = hang.accept().await {
            held.push(s);
        }
    });
    let config_dir = tempfile::tempdir().unwrap();
    let config = write_config(
        &config_dir,
        &format!(
            "targets:\n  scrape:\n    - {{ name: hang, url: 'http://{hang_addr}/metrics', interval: 2s, timeout: 1s }}\n    - {{ name: garbage, url: 'http://127.0.0.1:{app_port}/static/garbage.txt', interval: 2s, timeout: 1s }}\n    - {{ name: big, url: 'http://127.0.0.1:{app_port}/static/big.txt', interval: 2s, timeout: 1800ms }}\n"
        ),
    );
    let plain = Autotuner::start(&[], &[]).await_ready().await;
    let ours = Autotuner::start(&[&format!("--config.file={config}")], &[])
        .await_ready()
        .await;
    let s = ours
        .scrape_until(
            Duration::from_secs(30),
            "every broken target reported",
            |s| {
                ["hang", "garbage", "big"]
                    .iter()
                    .all(|t| s.value("autotuner_scrape_up", &[("target", t)]) == Some(0.0))
                    && s.value("autotuner_scrape_limit_hits_total", &[("target", "big")])
                        .is_some_and(|n| n >= 2.0)
            },
        )
        .await;
    let reason = |t: &str, r: &str| {
        s.value(
            "autotuner_target_error",
            &[("kind", "scrape"), ("target", t), ("reason", r)],
        )
    };
    assert_eq!(reason("hang", "timeout"), Some(1.0), "{}", s.text);
    assert_eq!(reason("garbage", "error"), Some(1.0));
    assert_eq!(reason("big", "error"), Some(1.0));
    let log = ours.log.lock().unwrap().join("\n");
    assert!(log.contains("body larger than body_size_limit"), "{log}");
    assert!(log.contains("parsing the Text payload"), "{log}");
    // Each big scrape stops reading at 32 MiB and drops what it read.
    let rss = rss_kib(ours.child.id());
    assert!(rss < 160 * 1024, "RSS {rss} KiB after the 50 MB bodies");
    let before = common::scrape_median(&plain, 30).await;
    let during = common::scrape_median(&ours, 30).await;
    common::assert_scrapes_unaffected(before, during, "three broken scrape targets");
}

/// The same API answered by VictoriaMetrics (Debian's `victoria-metrics`), not only
/// Prometheus: a rule group evaluated there fires and is audited, and VictoriaMetrics killed
/// turns the rule's health to err with nothing acted on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rules_evaluated_by_victoria_metrics() {
    if python_client().is_none() {
        return;
    }
    let Some(vm) = require("victoria-metrics") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let (app_port, _app) = start_app(dir.path());
    std::fs::write(
        dir.path().join("scrape.yml"),
        format!(
            "global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: app\n    static_configs:\n      - targets: ['127.0.0.1:{app_port}']\n"
        ),
    )
    .unwrap();
    let data = dir.path().join("vm-data");
    let (vm_port, mut vm_daemon) = Daemon::start(
        "victoria-metrics",
        &vm,
        move |port| {
            vec![
                format!("-httpListenAddr=127.0.0.1:{port}"),
                format!("-storageDataPath={}", data.display()),
                "-promscrape.config=scrape.yml".into(),
                // Its default hides the newest 30 s of data from queries.
                "-search.latencyOffset=1s".into(),
            ]
        },
        dir.path(),
    );
    let rules = tempfile::tempdir().unwrap();
    // The application served 60 requests in all (its counters are fixed).
    std::fs::write(
        rules.path().join("vm.yml"),
        "groups:\n  - name: vm\n    interval: 2s\n    source: vm\n    rules:\n      - name: ManyRequests\n        expr: sum(app_requests_total{job=\"app\"}) > 50\n        mode: dry_run\n        actions: [{ knob: { name: batch_size, set: 500 } }]\n",
    )
    .unwrap();
    let config_dir = tempfile::tempdir().unwrap();
    let config = write_config(
        &config_dir,
        &format!(
            "collectors:\n  host:\n    enabled: false\nsources:\n  vm:\n    url: http://127.0.0.1:{vm_port}\n    timeout: 3s\nknobs:\n  batch_size: {{ initial: 1000, min: 100, max: 5000 }}\n"
        ),
    );
    let ours = Autotuner::start(
        &[
            &format!("--config.file={config}"),
            &format!("--rules.dir={}", rules.path().display()),
        ],
        &[],
    )
    .await_ready()
    .await;
    let fired = until(
        Duration::from_secs(60),
        "the rule firing from VictoriaMetrics",
        || async {
            let r = rule_status(&ours, "ManyRequests").await;
            let audited = audit_rules(&ours)
                .iter()
                .any(|(rule, d)| rule == "ManyRequests" && d == "would_apply");
            if r["health"] == "ok" && audited {
                Ok(r)
            } else {
                Err(format!("{r}"))
            }
        },
    )
    .await;
    assert_eq!(
        fired["instances"][0]["value"].as_f64(),
        Some(60.0),
        "{fired}"
    );
    vm_daemon.kill();
    let down = until(
        Duration::from_secs(30),
        "VictoriaMetrics gone noticed",
        || async {
            let r = rule_status(&ours, "ManyRequests").await;
            if r["health"] == "err" {
                Ok(r)
            } else {
                Err(format!("{r}"))
            }
        },
    )
    .await;
    assert!(
        down["last_error"].as_str().unwrap().contains("source vm"),
        "{down}"
    );
    assert_eq!(
        down["instances"].as_array().unwrap().len(),
        1,
        "state kept: {down}"
    );
}
