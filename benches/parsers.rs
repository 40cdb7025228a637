//! Micro-benchmarks of the parsers on the collection path: PromQL (the shipped rules and a few
//! larger expressions), Redis `INFO` (a real reply, `benches/data/redis-info.txt`), and one
//! `pg_stat_statements` run over 5,000 statements (the window's figures and the top-K order).
//! Run with `cargo bench --bench parsers`; the README shows the latest medians. Timings are
//! never test assertions.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::collections::HashMap;
use std::hint::black_box;
use std::time::{Duration, Instant};

use autotuner::collect::postgres::statements::{Key, State, Totals, publishable};
use autotuner::collect::redis::Info;
use criterion::{Criterion, criterion_group, criterion_main};

/// Every `expr:` of the shipped rules, plus larger expressions of the kinds operators write.
fn expressions() -> Vec<String> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/rules")).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "yml") {
            let doc: serde_yaml::Value =
                serde_yaml::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
            for g in doc["groups"].as_sequence().unwrap() {
                for r in g["rules"].as_sequence().unwrap() {
                    out.push(r["expr"].as_str().unwrap().to_owned());
                }
            }
        }
    }
    assert!(out.len() >= 4, "the shipped rules were not found");
    out.extend([
        "sum by (target) (rate(redis_keyspace_misses_total[5m])) / (sum by (target) (rate(redis_keyspace_hits_total[5m])) + sum by (target) (rate(redis_keyspace_misses_total[5m]))) > 0.2".to_owned(),
        "histogram_quantile(0.99, sum by (le, job) (rate(http_request_duration_seconds_bucket{job=~\"api|web\"}[5m]))) > 0.5 unless on (job) maintenance_mode == 1".to_owned(),
        "topk(5, sum by (datname, queryid) (rate(pg_stat_statements_seconds_total[10m])) / sum by (datname, queryid) (rate(pg_stat_statements_calls_total[10m])))".to_owned(),
        "avg_over_time(host_cpu_usage_ratio[5m]) > 0.8 and on () predict_linear(host_memory_available_bytes[30m], 3600) < 0".to_owned(),
    ]);
    out
}

/// 5,000 statements in 10 databases; each run adds calls to a third of them.
fn statements(step: u32) -> HashMap<Key, Totals> {
    (0..5_000i64)
        .map(|q| {
            let grow = if q % 3 == i64::from(step % 3) {
                f64::from(step)
            } else {
                0.0
            };
            (
                (q % 10, 10, q * 7919),
                Totals {
                    calls: 100.0 + grow * 10.0 + q as f64,
                    seconds: 1.0 + grow * 0.01 + q as f64 * 1e-3,
                },
            )
        })
        .collect()
}

fn bench(c: &mut Criterion) {
    let exprs = expressions();
    c.bench_function(&format!("PromQL parse: {} expressions", exprs.len()), |b| {
        b.iter(|| {
            for e in &exprs {
                black_box(promql_parser::parser::parse(e).unwrap());
            }
        })
    });

    let info = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/benches/data/redis-info.txt"
    ))
    .unwrap();
    assert!(Info::parse(&info).number("used_memory").is_some());
    c.bench_function("Redis INFO parse: a real INFO ALL reply", |b| {
        b.iter(|| {
            let i = Info::parse(black_box(&info));
            black_box(i.number("keyspace_hits"))
        })
    });

    // Collection runs 5 s apart over a 60 s window: the state holds its snapshots as in
    // production, and each iteration is one run's worth of work.
    let mut state = State::new(Duration::from_secs(60));
    let t0 = Instant::now();
    for step in 0..16u32 {
        state.advance(
            t0 + Duration::from_secs(u64::from(step) * 5),
            statements(step),
            Duration::from_millis(100),
        );
    }
    let mut step = 16u32;
    c.bench_function(
        "pg_stat_statements run: window figures and top 20 of 5,000 statements",
        |b| {
            b.iter_batched(
                || {
                    step += 1;
                    (step, statements(step))
                },
                |(step, current)| {
                    let mut top: Vec<(Key, Totals)> =
                        current.iter().map(|(k, t)| (*k, *t)).collect();
                    top.sort_by(|a, b| b.1.seconds.total_cmp(&a.1.seconds));
                    top.truncate(20);
                    let figures = state.advance(
                        t0 + Duration::from_secs(u64::from(step) * 5),
                        current,
                        Duration::from_millis(100),
                    );
                    black_box((top, figures))
                },
                criterion::BatchSize::LargeInput,
            )
        },
    );
    let text = "SELECT abalance FROM pgbench_accounts\n   WHERE aid = $1 AND bid IN ($2, $3, $4) ORDER BY aid";
    c.bench_function("pg_stat_statements query text check", |b| {
        b.iter(|| black_box(publishable(black_box(text))))
    });
}

/// An application's payload of `n` samples: request counters per route and code, and a latency
/// histogram per route (12 buckets, sum, count), as django-prometheus or prom-client publish.
fn app_payload(n: usize) -> String {
    let mut out =
        String::from("# HELP http_requests_total Requests.\n# TYPE http_requests_total counter\n");
    let mut count = 0;
    let mut route = 0;
    while count < n {
        for code in ["200", "404", "500"] {
            out.push_str(&format!(
                "http_requests_total{{route=\"/api/v1/items/{route}\",method=\"GET\",code=\"{code}\"}} {}\n",
                route * 7 + 3
            ));
        }
        for (i, le) in [
            "0.005", "0.01", "0.025", "0.05", "0.1", "0.25", "0.5", "1", "2.5", "5", "10", "+Inf",
        ]
        .iter()
        .enumerate()
        {
            out.push_str(&format!(
                "http_request_duration_seconds_bucket{{route=\"/api/v1/items/{route}\",le=\"{le}\"}} {}\n",
                i * 10 + route
            ));
        }
        out.push_str(&format!(
            "http_request_duration_seconds_sum{{route=\"/api/v1/items/{route}\"}} {}.25\nhttp_request_duration_seconds_count{{route=\"/api/v1/items/{route}\"}} {}\n",
            route, route + 110
        ));
        count += 17;
        route += 1;
    }
    out
}

/// Scrape ingestion: the CPU side of scraping an application (limits, parse, name filter,
/// labels) and storing the points in the history, per payload size.
fn bench_ingest(c: &mut Criterion) {
    use autotuner::collect::exposition::Format;
    use autotuner::collect::scrape::ingest;
    let config = autotuner::settings::Config::parse(
        "targets:\n  scrape:\n    - name: app\n      url: http://127.0.0.1:1/metrics\n",
    )
    .unwrap();
    let target = config.scrape.targets[0].clone();
    let realistic = std::fs::read(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/benches/data/realistic.prom"
    ))
    .unwrap();
    let app = app_payload(10_000).into_bytes();
    for (what, body) in [
        ("the autotuner's own 465-line scrape", &realistic),
        ("an application, 10,000 samples", &app),
    ] {
        let n = ingest(&target, body, Format::Text).unwrap().len();
        c.bench_function(&format!("scrape ingest: parse {what} ({n} samples)"), |b| {
            b.iter(|| black_box(ingest(&target, black_box(body), Format::Text).unwrap()))
        });
        let registry = autotuner::registry::Registry::new(Duration::from_secs(600)).unwrap();
        let points = ingest(&target, body, Format::Text).unwrap();
        let mut t = 1_000_000i64;
        c.bench_function(&format!("scrape ingest: store {what} ({n} samples)"), |b| {
            b.iter(|| {
                t += 15_000;
                registry.publish_scraped("bench", black_box(&points), t, None);
            })
        });
    }
}

criterion_group!(benches, bench, bench_ingest);
criterion_main!(benches);
