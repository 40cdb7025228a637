//! The Redis collector against real redis-server processes started by the test on their own
//! loopback ports: the hit ratio over a window, ACL users and passwords, a server that dies or
//! hangs, and recovery without restarting us.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::collections::HashMap;
use std::time::Duration;

use common::{Autotuner, RedisServer, write_config};

fn config(targets: &[(&str, String)], window: &str) -> String {
    let mut text = format!(
        "collectors:\n  redis:\n    interval: 1s\n    timeout: 800ms\n    hit_ratio_window: {window}\ntargets:\n  redis:\n"
    );
    for (name, url) in targets {
        text.push_str(&format!("    - name: {name}\n      url: '{url}'\n"));
    }
    text
}

/// An autotuner watching `server` as target `cache`, once it has seen it up.
async fn watch_one(server: &RedisServer, window: &str) -> (Autotuner, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let file = write_config(&dir, &config(&[("cache", server.url())], window));
    let app = Autotuner::start(&["--config.file", &file], &[]);
    app.wait_ready().await;
    app.scrape_until(Duration::from_secs(5), "redis_up 1", |s| {
        s.value("redis_up", &[("target", "cache")]) == Some(1.0)
    })
    .await;
    (app, dir)
}

/// The server's own INFO, field → value.
async fn server_info(conn: &mut redis::aio::MultiplexedConnection) -> HashMap<String, String> {
    let text: String = redis::cmd("INFO").query_async(conn).await.unwrap();
    text.lines()
        .filter_map(|l| l.trim_end().split_once(':'))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
}

fn field(info: &HashMap<String, String>, name: &str) -> f64 {
    info[name].parse().unwrap()
}

/// What two client connections' buffers can make `used_memory` differ between the collector's
/// INFO and the test's.
const CLIENT_BUFFERS: f64 = 256.0 * 1024.0;

/// A connection whose replies may take long on a loaded machine (the default gives up after
/// 500 ms).
async fn redis_conn(url: &str) -> redis::aio::MultiplexedConnection {
    let config =
        redis::AsyncConnectionConfig::new().set_response_timeout(Some(Duration::from_secs(30)));
    redis::Client::open(url)
        .unwrap()
        .get_multiplexed_async_connection_with_config(&config)
        .await
        .unwrap()
}

#[tokio::test]
async fn hit_ratio_over_the_window_then_absent_when_quiet() {
    let Some(server) = RedisServer::start(&[]) else {
        return;
    };
    let (app, _dir) = watch_one(&server, "4s").await;
    let t = [("target", "cache")];
    // No lookups yet: no ratio, rather than 0 or NaN.
    assert_eq!(app.scrape().await.value("redis_cache_hit_ratio", &t), None);

    let mut conn = redis_conn(&server.url()).await;
    let _: () = redis::cmd("SET")
        .arg("present")
        .arg("1")
        .query_async(&mut conn)
        .await
        .unwrap();
    for i in 0..100 {
        let _: Option<String> = redis::cmd("GET")
            .arg("present")
            .query_async(&mut conn)
            .await
            .unwrap();
        for j in 0..3 {
            let _: Option<String> = redis::cmd("GET")
                .arg(format!("absent:{i}:{j}"))
                .query_async(&mut conn)
                .await
                .unwrap();
        }
    }
    // 100 hits and 300 misses: 0.25 exactly, since our own INFO and PING are not lookups. The
    // tolerance only covers float formatting.
    // (A collection in the middle of the loop sees 0.25 too: wait for the one after it.)
    let s = app
        .scrape_until(Duration::from_secs(5), "all the traffic counted", |s| {
            s.value("redis_keyspace_hits_total", &t) == Some(100.0)
        })
        .await;
    assert_eq!(s.value("redis_keyspace_misses_total", &t), Some(300.0));
    let ratio = s.value("redis_cache_hit_ratio", &t).unwrap();
    assert!((ratio - 0.25).abs() < 1e-9, "{ratio}");
    assert_eq!(
        s.value("redis_db_keys", &[("target", "cache"), ("db", "db0")]),
        Some(1.0)
    );
    // The rest is the server's own INFO: what holds still equal, used memory within what the
    // two clients' buffers make it move.
    let info = server_info(&mut conn).await;
    for (metric, name) in [
        ("redis_connected_clients", "connected_clients"),
        ("redis_max_clients", "maxclients"),
        ("redis_blocked_clients", "blocked_clients"),
        ("redis_evicted_keys_total", "evicted_keys"),
        ("redis_expired_keys_total", "expired_keys"),
    ] {
        assert_eq!(s.value(metric, &t), Some(field(&info, name)), "{metric}");
    }
    assert_eq!(
        field(&info, "connected_clients"),
        2.0,
        "ours and the test's"
    );
    let used = s.value("redis_memory_used_bytes", &t).unwrap();
    assert!(
        (used - field(&info, "used_memory")).abs() < CLIENT_BUFFERS,
        "published {used}, INFO says {}",
        info["used_memory"]
    );
    let uptime = s.value("redis_uptime_in_seconds", &t).unwrap();
    let server_uptime = field(&info, "uptime_in_seconds");
    assert!(uptime <= server_uptime && uptime >= server_uptime - 3.0);
    let version = [
        ("target", "cache"),
        ("redis_version", info["redis_version"].as_str()),
        ("redis_mode", "standalone"),
        ("role", "master"),
    ];
    assert_eq!(s.value("redis_instance_info", &version), Some(1.0));
    // A PING answered within the run's deadline (nine tenths of the 800 ms timeout).
    let ping = s.value("redis_probe_latency_seconds", &t).unwrap();
    assert!(ping > 0.0 && ping < 0.72, "{ping}");
    // No maxmemory set: no usage ratio.
    assert_eq!(s.value("redis_memory_max_bytes", &t), Some(0.0));
    assert_eq!(s.value("redis_memory_usage_ratio", &t), None);

    // Once the traffic has left the 4 s window, a quiet window publishes no ratio.
    app.scrape_until(Duration::from_secs(10), "the ratio to disappear", |s| {
        s.value("redis_up", &t) == Some(1.0) && s.value("redis_cache_hit_ratio", &t).is_none()
    })
    .await;
}

#[tokio::test]
async fn acl_user_password_and_a_wrong_password() {
    let Some(server) = RedisServer::start(&["--requirepass", "admin-pw-7"]) else {
        return;
    };
    let admin = format!("redis://:admin-pw-7@127.0.0.1:{}/", server.port);
    let mut conn = redis_conn(&admin).await;
    let _: () = redis::cmd("ACL")
        .arg(&[
            "SETUSER",
            "monitor",
            "on",
            ">mon-pw-3",
            "+ping",
            "+info",
            "+slowlog",
            "+config|get",
        ])
        .query_async(&mut conn)
        .await
        .unwrap();
    let _: () = redis::cmd("CONFIG")
        .arg(&["SET", "maxmemory", "100mb"])
        .query_async(&mut conn)
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let good = format!("redis://monitor:mon-pw-3@127.0.0.1:{}/", server.port);
    let bad = format!("redis://monitor:wrong-pw-9@127.0.0.1:{}/", server.port);
    let file = write_config(&dir, &config(&[("acl", good), ("badpw", bad)], "1m"));
    let app = Autotuner::start(&["--config.file", &file], &[]);
    app.wait_ready().await;
    let s = app
        .scrape_until(Duration::from_secs(5), "both targets reported", |s| {
            s.value("redis_up", &[("target", "acl")]) == Some(1.0)
                && s.value("redis_up", &[("target", "badpw")]) == Some(0.0)
        })
        .await;
    let ratio = s
        .value("redis_memory_usage_ratio", &[("target", "acl")])
        .unwrap();
    let info = server_info(&mut conn).await;
    assert_eq!(field(&info, "maxmemory"), 100.0 * 1024.0 * 1024.0);
    assert_eq!(
        s.value("redis_memory_max_bytes", &[("target", "acl")]),
        Some(field(&info, "maxmemory"))
    );
    assert!(
        (ratio * field(&info, "maxmemory") - field(&info, "used_memory")).abs() < CLIENT_BUFFERS,
        "memory usage ratio {ratio}, INFO says {} of {}",
        info["used_memory"],
        info["maxmemory"]
    );
    let auth = [("kind", "redis"), ("target", "badpw"), ("reason", "auth")];
    assert_eq!(s.value("autotuner_target_error", &auth), Some(1.0));
    assert_eq!(
        s.value(
            "autotuner_target_error",
            &[("target", "acl"), ("reason", "auth")]
        ),
        Some(0.0)
    );
    // A few more runs: still one log line about it, and no password anywhere.
    tokio::time::sleep(Duration::from_millis(2_500)).await;
    let s = app.scrape().await;
    let log = app.log.lock().unwrap().join("\n");
    let complaints = log
        .lines()
        .filter(|l| l.contains("Redis unreachable") && l.contains("badpw"))
        .count();
    assert_eq!(
        complaints, 1,
        "expected one log line for the wrong password:\n{log}"
    );
    assert!(log.contains("\"reason\":\"auth\""), "{log}");
    for secret in ["wrong-pw-9", "mon-pw-3", "admin-pw-7"] {
        assert!(
            !log.contains(secret),
            "{secret} leaked into the log:\n{log}"
        );
        assert!(!s.text.contains(secret), "{secret} leaked into the metrics");
    }
}

#[tokio::test]
async fn a_dead_then_restarted_server_without_restarting_us() {
    let Some(mut server) = RedisServer::start(&[]) else {
        return;
    };
    let (app, _dir) = watch_one(&server, "1m").await;
    let t = [("target", "cache")];
    let _cpu = common::CpuHold::shared();
    let before = common::scrape_median(&app, 21).await;

    server.kill();
    let s = app
        .scrape_until(Duration::from_secs(3), "redis_up 0", |s| {
            s.value("redis_up", &t) == Some(0.0)
        })
        .await;
    assert_eq!(
        s.value(
            "autotuner_target_error",
            &[("target", "cache"), ("reason", "connect")]
        ),
        Some(1.0)
    );
    // The collector itself is fine: a dead target is a measurement, not a collector failure.
    assert_eq!(
        s.value("autotuner_collector_up", &[("collector", "redis/cache")]),
        Some(1.0)
    );
    let during = common::scrape_median(&app, 21).await;
    common::assert_scrapes_unaffected(before, during, "Redis down");

    server.restart();
    app.scrape_until(Duration::from_secs(5), "redis_up back to 1", |s| {
        s.value("redis_up", &t) == Some(1.0)
    })
    .await;
}

#[tokio::test]
async fn a_hung_server_times_out_without_slowing_metrics() {
    let Some(server) = RedisServer::start(&[]) else {
        return;
    };
    let (app, _dir) = watch_one(&server, "1m").await;
    let t = [("target", "cache")];
    let _cpu = common::CpuHold::shared();
    let before = common::scrape_median(&app, 21).await;

    server.signal("STOP");
    let s = app
        .scrape_until(Duration::from_secs(4), "redis_up 0", |s| {
            s.value("redis_up", &t) == Some(0.0)
        })
        .await;
    assert_eq!(
        s.value(
            "autotuner_target_error",
            &[("target", "cache"), ("reason", "timeout")]
        ),
        Some(1.0)
    );
    let during = common::scrape_median(&app, 21).await;
    common::assert_scrapes_unaffected(before, during, "Redis hung (SIGSTOP)");

    server.signal("CONT");
    app.scrape_until(Duration::from_secs(6), "redis_up back to 1", |s| {
        s.value("redis_up", &t) == Some(1.0)
    })
    .await;
}

#[tokio::test]
async fn the_environment_gives_the_default_target() {
    let Some(server) = RedisServer::start(&[]) else {
        return;
    };
    let app = Autotuner::start(&[], &[("REDIS_URL", &server.url())]);
    app.wait_ready().await;
    app.scrape_until(Duration::from_secs(8), "redis_up for target default", |s| {
        s.value("redis_up", &[("target", "default")]) == Some(1.0)
    })
    .await;
}

/// A CA and a server certificate for 127.0.0.1 signed by it, made with openssl.
fn make_certs(dir: &std::path::Path) -> bool {
    if common::require("openssl").is_none() {
        return false;
    }
    std::fs::write(dir.join("ext.cnf"), "subjectAltName=IP:127.0.0.1\n").unwrap();
    let run = |args: &[&str]| {
        let out = std::process::Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .output()
            .unwrap();
        assert!(out.status.success(), "openssl {args:?}: {out:?}");
    };
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    run(&[
        &["req", "-x509"][..],
        &ec,
        &[
            "-keyout",
            "ca.key",
            "-out",
            "ca.pem",
            "-days",
            "1",
            "-subj",
            "/CN=autotuner test CA",
        ],
    ]
    .concat());
    run(&[
        &["req"][..],
        &ec,
        &[
            "-keyout",
            "server.key",
            "-out",
            "server.csr",
            "-subj",
            "/CN=127.0.0.1",
        ],
    ]
    .concat());
    run(&[
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        "server.pem",
        "-days",
        "1",
        "-extfile",
        "ext.cnf",
    ]);
    true
}

#[tokio::test]
async fn rediss_with_a_private_ca() {
    let certs = tempfile::tempdir().unwrap();
    if !make_certs(certs.path()) {
        return;
    }
    let file = |f: &str| certs.path().join(f).to_str().unwrap().to_owned();
    let (cert, key, ca) = (file("server.pem"), file("server.key"), file("ca.pem"));
    let Some(server) = RedisServer::start(&[
        "--port",
        "0",
        "--tls-port",
        "{port}",
        "--tls-cert-file",
        &cert,
        "--tls-key-file",
        &key,
        "--tls-ca-cert-file",
        &ca,
        "--tls-auth-clients",
        "no",
    ]) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let text = format!(
        "collectors:\n  redis:\n    interval: 1s\n    timeout: 800ms\ntargets:\n  redis:\n\
         \x20   - {{name: tls, url: 'rediss://127.0.0.1:{p}/', tls_ca_file: '{ca}'}}\n\
         \x20   - {{name: untrusted, url: 'rediss://127.0.0.1:{p}/'}}\n\
         \x20   - {{name: plain, url: 'redis://127.0.0.1:{p}/'}}\n",
        p = server.port
    );
    let config = write_config(&dir, &text);
    let app = Autotuner::start(&["--config.file", &config], &[]);
    app.wait_ready().await;
    // Trusted through the CA file: up. Without it the certificate is unknown, and plain TCP to a
    // TLS port gets no Redis answer: both down, neither crashes anything.
    let s = app
        .scrape_until(Duration::from_secs(5), "the TLS target up", |s| {
            s.value("redis_up", &[("target", "tls")]) == Some(1.0)
                && s.value("redis_up", &[("target", "untrusted")]) == Some(0.0)
                && s.value("redis_up", &[("target", "plain")]) == Some(0.0)
        })
        .await;
    // The figures came through TLS from that server: its version, as the installed binary says.
    let out = std::process::Command::new("redis-server")
        .arg("--version")
        .output()
        .unwrap();
    let text = String::from_utf8(out.stdout).unwrap();
    let version = text
        .split_whitespace()
        .find_map(|w| w.strip_prefix("v="))
        .unwrap();
    assert_eq!(
        s.value(
            "redis_instance_info",
            &[
                ("target", "tls"),
                ("redis_version", version),
                ("role", "master")
            ]
        ),
        Some(1.0),
        "{}",
        s.text
    );
}
