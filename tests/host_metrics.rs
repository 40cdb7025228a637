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
    // /proc/cpuinfo gives the same number, one `processor` line per logical CPU.
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap();
    let processors = cpuinfo
        .lines()
        .filter(|l| l.split(':').next().is_some_and(|k| k.trim() == "processor"))
        .count();
    assert_eq!(scrape.value("host_cpus", &[]), Some(processors as f64));
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

/// `/proc/net/dev`: per interface, received bytes, receive errors, transmitted bytes and
/// transmit errors.
fn net_dev() -> std::collections::BTreeMap<String, [f64; 4]> {
    let text = std::fs::read_to_string("/proc/net/dev").unwrap();
    text.lines()
        .skip(2)
        .map(|line| {
            let (name, rest) = line.split_once(':').unwrap();
            let f: Vec<f64> = rest
                .split_whitespace()
                .map(|v| v.parse().unwrap())
                .collect();
            (name.trim().to_owned(), [f[0], f[2], f[8], f[10]])
        })
        .collect()
}

#[tokio::test]
async fn network_swap_and_boot_time_agree_with_the_kernel() {
    // Counters only grow: what we publish was read between these two readings of the kernel's.
    let before = net_dev();
    let app = Autotuner::start(&[], &[]);
    app.wait_ready().await;
    let scrape = app.scrape().await;
    let after = net_dev();

    let ours: std::collections::BTreeSet<&str> = scrape
        .all("host_network_receive_bytes_total")
        .iter()
        .map(|s| s.labels.get("device").unwrap())
        .collect();
    let kernel: std::collections::BTreeSet<&str> = after.keys().map(String::as_str).collect();
    assert_eq!(ours, kernel, "interfaces: ours vs /proc/net/dev");
    let names = [
        "host_network_receive_bytes_total",
        "host_network_receive_errors_total",
        "host_network_transmit_bytes_total",
        "host_network_transmit_errors_total",
    ];
    for (device, low) in &before {
        let high = &after[device];
        for (i, name) in names.iter().enumerate() {
            let v = scrape.value(name, &[("device", device)]).unwrap();
            assert!(
                low[i] <= v && v <= high[i],
                "{name}{{device={device}}}: ours {v}, kernel {} before and {} after",
                low[i],
                high[i]
            );
        }
    }

    // Swap: the total is fixed and must match exactly; the free space moves, so allow 5 % of
    // the total (exact when there is no swap), and the ratio follows from the two.
    let total = meminfo("SwapTotal");
    assert_eq!(scrape.value("host_swap_total_bytes", &[]), Some(total));
    let free = scrape.value("host_swap_free_bytes", &[]).unwrap();
    let kernel_free = meminfo("SwapFree");
    assert!(
        (free - kernel_free).abs() <= 0.05 * total,
        "swap free: ours {free}, kernel {kernel_free}, total {total}"
    );
    match scrape.value("host_swap_usage_ratio", &[]) {
        None => assert_eq!(total, 0.0, "no swap usage ratio with {total} bytes of swap"),
        Some(r) => assert!((r - (1.0 - free / total)).abs() < 1e-9, "swap ratio {r}"),
    }

    // Boot time: /proc/stat's btime, which the kernel derives from the clock and the uptime
    // (it can move by a second when the clock is stepped, never more here).
    let stat = std::fs::read_to_string("/proc/stat").unwrap();
    let btime: f64 = stat
        .lines()
        .find_map(|l| l.strip_prefix("btime "))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let ours = scrape.value("host_boot_time_seconds", &[]).unwrap();
    assert!(
        (ours - btime).abs() <= 1.0,
        "boot time: ours {ours}, /proc/stat btime {btime}"
    );
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
    // Keep one core fully busy across at least two whole collection intervals (a CPU burn:
    // no test that bounds a duration runs meanwhile).
    let _cpu = common::CpuHold::exclusive();
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

/// Kills the process holding the hung filesystem's FUSE device when dropped, which aborts the
/// connection: whatever waits on the mount then gets an error instead of waiting forever.
struct FuseHolder(std::process::Child);

impl Drop for FuseHolder {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// README: "a local mount that hangs anyway is cut off at the timeout, and the next collection
/// fails fast instead of piling up stuck threads". A real hung mount: a FUSE filesystem whose
/// server never answers (the test holds `/dev/fuse` open and never reads it), so `statvfs` on
/// it blocks in the kernel. It is mounted only inside the autotuner's own mount namespace
/// (`unshare --mount --propagation private`), so nothing else on the machine can trip on it,
/// and it goes away with the process.
#[tokio::test]
async fn a_hung_mount_is_cut_off_at_the_timeout_and_the_next_collection_fails_fast() {
    if !rustix::process::geteuid().is_root() || !std::path::Path::new("/dev/fuse").exists() {
        common::not_run("a hung FUSE mount needs root and /dev/fuse");
        return;
    }
    for program in ["unshare", "nsenter", "mount"] {
        if common::require(program).is_none() {
            return;
        }
    }
    let dir = tempfile::tempdir().unwrap();
    let mount_point = dir.path().join("hung");
    std::fs::create_dir(&mount_point).unwrap();
    let config = dir.path().join("autotuner.yml");
    std::fs::write(
        &config,
        "collectors:\n  host:\n    interval: 4s\n    timeout: 3s\n",
    )
    .unwrap();
    let app = Autotuner::start_in(
        &["unshare", "--mount", "--propagation", "private", "--"],
        &[
            "--config.file",
            config.to_str().unwrap(),
            "--log.level=debug",
        ],
        &[],
    );
    app.wait_ready().await;
    let host = [("collector", "host")];
    app.scrape_until(Duration::from_secs(10), "host collector up", |s| {
        s.value("autotuner_collector_up", &host) == Some(1.0)
    })
    .await;
    let _cpu = common::CpuHold::shared();
    let before = common::scrape_median(&app, 21).await;

    // Mount the never-answering filesystem in the autotuner's namespace; `sleep` inherits the
    // FUSE descriptor and holds the connection open.
    let mut helper = std::process::Command::new("nsenter")
        .args(["-t", &app.child.id().to_string(), "-m", "--", "sh", "-c"])
        .arg(format!(
            "exec 3<>/dev/fuse && mount -t fuse -o fd=3,rootmode=40000,user_id=0,group_id=0 autotuner-test-hung '{}' && echo mounted && exec sleep 600",
            mount_point.display()
        ))
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(helper.stdout.take().unwrap()),
        &mut line,
    )
    .unwrap();
    let holder = FuseHolder(helper);
    assert_eq!(
        line.trim(),
        "mounted",
        "mounting the hung filesystem failed"
    );

    // The collection that meets the mount is cut off at the 3 s timeout...
    let s = app
        .scrape_until(Duration::from_secs(20), "host collector down", |s| {
            s.value("autotuner_collector_up", &host) == Some(0.0)
        })
        .await;
    assert!(s.all("host_cpus").is_empty(), "stale host series withdrawn");
    let log = || app.log.lock().unwrap().join("\n");
    assert!(log().contains("timed out after 3.0s"), "{}", log());

    // ...and the next one, with the stuck thread still inside statvfs, fails at once instead of
    // starting another: its duration is a fraction of the timeout, not the timeout again.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while !log().contains("previous collection still running") {
        assert!(
            std::time::Instant::now() < deadline,
            "no fail-fast collection; log:\n{}",
            log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let s = app.scrape().await;
    assert_eq!(s.value("autotuner_collector_up", &host), Some(0.0));
    let took = s
        .value("autotuner_collector_duration_seconds", &host)
        .unwrap();
    assert!(
        took < 1.5,
        "a collection behind a stuck one took {took}s (timeout 3s)"
    );
    // /metrics never waits for the stuck collection.
    let during = common::scrape_median(&app, 21).await;
    common::assert_scrapes_unaffected(before, during, "a hung mount");

    // Once the filesystem's connection is aborted, statvfs returns an error, the stuck thread
    // ends and collections succeed again without a restart.
    drop(holder);
    app.scrape_until(Duration::from_secs(20), "host collector back up", |s| {
        s.value("autotuner_collector_up", &host) == Some(1.0)
    })
    .await;
}
