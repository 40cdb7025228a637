//! The real binary on an ephemeral port: its host gauges agree with the kernel's own figures,
//! the exposition is well-formed (and gzipped when asked), the HTTP surface answers, and
//! SIGTERM stops it within the grace period.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::io::Read as _;
use std::time::Duration;

use common::{Autotuner, Scrape, client, meminfo};

#[tokio::test]
async fn host_gauges_agree_with_proc_meminfo_and_statvfs() {
    let app = Autotuner::start(&[], &[]);
    app.wait_ready().await;
    let response = client().get(app.url("/metrics")).send().await.unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(
        response.headers()["content-type"],
        "text/plain; version=0.0.4; charset=utf-8"
    );
    let scrape = Scrape::parse(&response.text().await.unwrap());

    // Memory: the total is a constant of the machine and must match exactly; what is available
    // moves between our reading and this one, so allow 5 % of the total.
    let total = meminfo("MemTotal");
    let available = meminfo("MemAvailable");
    assert_eq!(scrape.value("host_memory_total_bytes", &[]), Some(total));
    let ours = scrape.value("host_memory_available_bytes", &[]).unwrap();
    assert!(
        (ours - available).abs() <= 0.05 * total,
        "available: ours {ours}, kernel {available}, total {total}"
    );
    let ratio = scrape.value("host_memory_usage_ratio", &[]).unwrap();
    assert!(
        (ratio - (1.0 - ours / total)).abs() < 1e-9,
        "ratio {ratio} vs {ours}/{total}"
    );

    // Root filesystem: the size is fixed and must match statvfs exactly; the free space moves
    // with whatever else writes (this very build), so allow 2 % of the size.
    let st = rustix::fs::statvfs("/").unwrap();
    let size = (st.f_blocks * st.f_frsize) as f64;
    let avail = (st.f_bavail * st.f_frsize) as f64;
    let root = [("mountpoint", "/")];
    assert_eq!(scrape.value("host_disk_size_bytes", &root), Some(size));
    let ours = scrape.value("host_disk_available_bytes", &root).unwrap();
    assert!(
        (ours - avail).abs() <= 0.02 * size,
        "root available: ours {ours}, statvfs {avail}"
    );
    let usage = scrape.value("host_disk_usage_ratio", &root).unwrap();
    assert!((usage - (1.0 - ours / size)).abs() < 1e-9);

    // CPUs: one gauge per logical CPU, as many as /proc/stat lists.
    let stat = std::fs::read_to_string("/proc/stat").unwrap();
    let cpus = stat
        .lines()
        .filter(|l| l.starts_with("cpu") && l.as_bytes().get(3).is_some_and(u8::is_ascii_digit))
        .count();
    assert_eq!(scrape.value("host_cpus", &[]), Some(cpus as f64));
    assert_eq!(scrape.all("host_cpu_core_usage_ratio").len(), cpus);
    let cpu = scrape.value("host_cpu_usage_ratio", &[]).unwrap();
    assert!((0.0..=1.0).contains(&cpu), "cpu ratio {cpu}");

    // Load averages: same figures as /proc/loadavg, which only moves every 5 s.
    let loadavg = std::fs::read_to_string("/proc/loadavg").unwrap();
    let load15: f64 = loadavg.split_whitespace().nth(2).unwrap().parse().unwrap();
    let ours = scrape.value("host_load15", &[]).unwrap();
    assert!(
        (ours - load15).abs() < 0.05,
        "load15 ours {ours} kernel {load15}"
    );

    // Pseudo filesystems are excluded by default.
    for s in scrape.all("host_disk_size_bytes") {
        let fstype = s.labels.get("fstype").unwrap();
        assert!(
            !["proc", "sysfs", "cgroup2", "devpts"].contains(&fstype),
            "{fstype} not excluded"
        );
    }

    // Self-metrics.
    assert_eq!(
        scrape.value("autotuner_collector_up", &[("collector", "host")]),
        Some(1.0)
    );
    assert!(
        scrape
            .value(
                "autotuner_collector_duration_seconds",
                &[("collector", "host")]
            )
            .is_some()
    );
    assert!(
        scrape
            .value(
                "autotuner_collector_last_success_timestamp_seconds",
                &[("collector", "host")]
            )
            .is_some()
    );
    assert_eq!(
        scrape.value(
            "autotuner_build_info",
            &[("version", env!("CARGO_PKG_VERSION"))]
        ),
        Some(1.0)
    );
    assert!(scrape.value("process_resident_memory_bytes", &[]).unwrap() > 0.0);
}

#[tokio::test]
async fn metrics_are_gzipped_when_the_scraper_asks() {
    let app = Autotuner::start(&[], &[]);
    app.wait_ready().await;
    let response = client()
        .get(app.url("/metrics"))
        .header("accept-encoding", "gzip")
        .send()
        .await
        .unwrap();
    assert_eq!(response.headers()["content-encoding"], "gzip");
    let body = response.bytes().await.unwrap();
    let mut text = String::new();
    flate2::read::GzDecoder::new(&body[..])
        .read_to_string(&mut text)
        .unwrap();
    assert!(text.len() > body.len(), "gzip did not shrink the body");
    let scrape = Scrape::parse(&text);
    assert!(scrape.value("host_memory_total_bytes", &[]).is_some());

    // Without the header, no compression.
    let plain = client().get(app.url("/metrics")).send().await.unwrap();
    assert!(plain.headers().get("content-encoding").is_none());
}

#[tokio::test]
async fn landing_page_health_readiness_and_unknown_paths() {
    let app = Autotuner::start(&[], &[]);
    app.wait_ready().await;
    let c = client();
    let page = c.get(app.url("/")).send().await.unwrap();
    assert_eq!(page.status(), 200);
    assert!(
        page.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/html")
    );
    let html = page.text().await.unwrap();
    assert!(html.contains(r#"<a href="/metrics">"#), "{html}");
    assert!(
        html.contains("<tr><td>host</td><td class=up>up</td>"),
        "{html}"
    );

    let healthy = c.get(app.url("/-/healthy")).send().await.unwrap();
    assert_eq!(healthy.status(), 200);
    let ready = c.get(app.url("/-/ready")).send().await.unwrap();
    assert_eq!(ready.status(), 200);
    let head = c.head(app.url("/-/healthy")).send().await.unwrap();
    assert_eq!(head.status(), 200);
    let missing = c.get(app.url("/nope")).send().await.unwrap();
    assert_eq!(missing.status(), 404);
}

#[tokio::test]
async fn telemetry_path_comes_from_the_environment_too() {
    let app = Autotuner::start(&[], &[("AUTOTUNER_WEB_TELEMETRY_PATH", "/custom/metrics")]);
    app.wait_ready().await;
    let c = client();
    let custom = c.get(app.url("/custom/metrics")).send().await.unwrap();
    assert_eq!(custom.status(), 200);
    assert!(
        Scrape::parse(&custom.text().await.unwrap())
            .value("host_cpus", &[])
            .is_some()
    );
    assert_eq!(
        c.get(app.url("/metrics")).send().await.unwrap().status(),
        404
    );
}

#[tokio::test]
async fn a_disabled_host_collector_leaves_only_self_metrics() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("autotuner.yml");
    std::fs::write(&file, "collectors:\n  host:\n    enabled: false\n").unwrap();
    let app = Autotuner::start(&["--config.file", file.to_str().unwrap()], &[]);
    app.wait_ready().await;
    let scrape = app.scrape().await;
    assert!(scrape.all("host_cpus").is_empty());
    assert!(scrape.value("autotuner_build_info", &[]).is_some());
}

#[test]
fn sigterm_stops_the_process_cleanly_within_the_grace_period() {
    let mut app = Autotuner::start(&[], &[]);
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(app.wait_ready());
    // The grace period is 5 s; a clean exit with nothing in flight takes milliseconds.
    let (status, _took) = app.terminate(Duration::from_secs(7));
    let status = status.expect("still running 7 s after SIGTERM");
    assert!(status.success(), "exit status {status:?}");
    let log = app.log.lock().unwrap().join("\n");
    assert!(log.contains("shutting down"), "{log}");
    assert!(log.contains("\"stopped\""), "{log}");
}

#[tokio::test]
async fn cpu_usage_sees_a_busy_core() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("fast.yml");
    std::fs::write(&file, "collectors:\n  host:\n    interval: 1s\n").unwrap();
    let app = Autotuner::start(&["--config.file", file.to_str().unwrap()], &[]);
    app.wait_ready().await;
    // Keep one core fully busy across at least two whole collection intervals.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let spin = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut x = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                x = std::hint::black_box(x.wrapping_add(1));
            }
        })
    };
    tokio::time::sleep(Duration::from_millis(2_500)).await;
    let scrape = app.scrape().await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    spin.join().unwrap();
    let cpus = scrape.value("host_cpus", &[]).unwrap();
    let total = scrape.value("host_cpu_usage_ratio", &[]).unwrap();
    let cores: f64 = scrape
        .all("host_cpu_core_usage_ratio")
        .iter()
        .map(|s| match s.value {
            prometheus_parse::Value::Gauge(v) => v,
            _ => f64::NAN,
        })
        .sum();
    // One busy core out of N is at least 1/N of the machine; other work only adds to it. The
    // 0.8 leaves room for the scheduler taking the spinning thread off now and then.
    assert!(
        total >= 0.8 / cpus,
        "machine usage {total} with one of {cpus} cores busy"
    );
    assert!(
        cores >= 0.8,
        "per-core usages sum to {cores} with one core busy"
    );
}
