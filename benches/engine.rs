//! Micro-benchmarks of the hot paths: one rule-engine tick of 1,000 rules over 10,000 series,
//! and encoding `/metrics` for a realistic snapshot (a real scrape of host, PostgreSQL with its
//! top statements, PgBouncer and Redis: `benches/data/realistic.prom`) and for 10,000 series. Run with `cargo bench --bench engine`; the README
//! shows the latest medians. Timings are never test assertions.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::hint::black_box;
use std::sync::Arc;
use std::time::Duration;

use autotuner::registry::Registry;
use autotuner::rules::engine::Engine;
use autotuner::sample::Families;
use criterion::{Criterion, criterion_group, criterion_main};

// The binary's allocator, so the figures are the binary's.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// 100 metric names × 100 instances at step `step` (counters growing).
fn families(step: i64) -> Vec<autotuner::sample::Family> {
    let mut f = Families::new();
    for m in 0..100 {
        let name = format!("metric_{m}_total");
        for i in 0..100 {
            let inst = format!("i{i}");
            let job = format!("job{}", i % 10);
            f.counter(
                &name,
                "bench",
                &[("instance", &inst), ("job", &job)],
                (step * (i + m)) as f64,
            );
        }
    }
    f.into_vec()
}

/// 10 request-latency histograms × 10 jobs × 8 buckets (800 series), cumulative counts growing
/// with `step`.
fn histograms(step: i64) -> Vec<autotuner::sample::Family> {
    let mut f = Families::new();
    let bounds = ["0.01", "0.05", "0.1", "0.25", "0.5", "1", "2.5", "+Inf"];
    for h in 0..10 {
        let name = format!("latency_{h}_seconds_bucket");
        for j in 0..10 {
            let job = format!("job{j}");
            for (b, le) in bounds.iter().enumerate() {
                f.counter(
                    &name,
                    "bench",
                    &[("job", &job), ("le", le)],
                    (step * (b as i64 + 1) * (10 + h + j)) as f64,
                );
            }
        }
    }
    f.into_vec()
}

/// The families above and the histograms, published at 0, 5 and 10 s.
fn registry_with_histograms() -> Arc<Registry> {
    let r = Arc::new(Registry::new(Duration::from_secs(600)).unwrap());
    for step in 0..3i64 {
        let mut f = families(step);
        f.extend(histograms(step));
        r.publish("bench", f, step * 5_000);
    }
    r
}

/// 1,000 rules over the newer forms: 500 subqueries (`max_over_time(rate(...)[10s:5s])` over
/// the 100 counters) and 500 P90 latencies by job from the histograms, thresholds differing.
fn subquery_histogram_rules() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let mut text = String::from("groups:\n  - name: bench\n    interval: 1s\n    rules:\n");
    for k in 0..1000 {
        let t = k / 100;
        let expr = if k % 2 == 0 {
            format!(
                "max_over_time(rate(metric_{}_total[10s])[10s:5s]) > {t}",
                (k / 2) % 100
            )
        } else {
            format!(
                "histogram_quantile(0.9, sum by (le, job) (rate(latency_{}_seconds_bucket[10s]))) > 0.{t}",
                (k / 2) % 10
            )
        };
        text.push_str(&format!(
            "      - name: R{k}\n        expr: '{expr}'\n        for: 1m\n"
        ));
    }
    std::fs::write(dir.path().join("bench.yml"), text).unwrap();
    dir
}

/// The families above published at 0, 5 and 10 s.
fn registry() -> Arc<Registry> {
    let r = Arc::new(Registry::new(Duration::from_secs(600)).unwrap());
    for step in 0..3i64 {
        r.publish("bench", families(step), step * 5_000);
    }
    r
}

/// 1,000 rules: 700 plain thresholds, 200 aggregated rates, 100 set operations, over 100
/// metrics: each selection or aggregation is shared by ten rules with different thresholds.
///
/// With `shared` false, no two rules select the same series set: each adds a matcher of its
/// own, so nothing computed for one rule serves another.
fn rules_dir(shared: bool) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let mut text = String::from("groups:\n  - name: bench\n    interval: 1s\n    rules:\n");
    for k in 0..1000 {
        let m = k % 100;
        // Every rule's text differs (its threshold), as in a real rule set; rules share
        // selectors and aggregations, as warning and critical thresholds over one metric do.
        let t = k / 100;
        let expr = if shared {
            match k % 10 {
                0 | 1 => format!("sum by (job) (rate(metric_{m}_total[1m])) > {}", 1 + t),
                2 => format!(
                    "metric_{m}_total > {} and on (instance) metric_{}_total > 50",
                    100 + t,
                    (m + 1) % 100
                ),
                _ => format!("metric_{m}_total{{instance=\"i{}\"}} > {}", k % 100, 10 + t),
            }
        } else {
            // `job!="jobN"` keeps 90 of 100 series and makes each selector unique.
            match k % 10 {
                0 | 1 => {
                    format!("sum by (job) (rate(metric_{m}_total{{job!=\"job{t}\"}}[1m])) > 1")
                }
                2 => format!(
                    "metric_{m}_total{{job!=\"job{t}\"}} > 100 and on (instance) metric_{}_total{{job!=\"job{t}\"}} > 50",
                    (m + 1) % 100
                ),
                _ => format!(
                    "metric_{m}_total{{instance=\"i{}\",job!=\"job{t}\"}} > 10",
                    (k + t) % 100
                ),
            }
        };
        text.push_str(&format!(
            "      - name: R{k}\n        expr: '{expr}'\n        for: 1m\n"
        ));
    }
    std::fs::write(dir.path().join("bench.yml"), text).unwrap();
    dir
}

/// The real scrape in `benches/data/realistic.prom`, published as its collectors would.
fn realistic() -> Arc<Registry> {
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/benches/data/realistic.prom"
    ))
    .unwrap();
    let scrape = prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_owned()))).unwrap();
    let r = Arc::new(Registry::new(Duration::from_secs(600)).unwrap());
    let mut f = Families::new();
    for s in &scrape.samples {
        let help = scrape.docs.get(&s.metric).map_or("", String::as_str);
        let labels: Vec<(&str, &str)> = s
            .labels
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        match s.value {
            prometheus_parse::Value::Counter(v) => f.counter(&s.metric, help, &labels, v),
            prometheus_parse::Value::Gauge(v) | prometheus_parse::Value::Untyped(v) => {
                f.gauge(&s.metric, help, &labels, v)
            }
            _ => {}
        }
    }
    r.publish("realistic", f.into_vec(), 0);
    r
}

fn bench(c: &mut Criterion) {
    let real = realistic();
    let n = real
        .render()
        .lines()
        .filter(|l| !l.starts_with('#'))
        .count();
    assert!(n > 200, "{n} series");
    c.bench_function(
        &format!("render /metrics: a real scrape of {n} series"),
        |b| b.iter(|| black_box(real.render().len())),
    );
    for (registry, dir, what) in [
        (
            registry(),
            rules_dir(true),
            "1,000 rules over 10,000 series, rules sharing selections",
        ),
        (
            registry(),
            rules_dir(false),
            "1,000 rules over 10,000 series, every selection distinct",
        ),
        (
            registry_with_histograms(),
            subquery_histogram_rules(),
            "1,000 rules over 10,800 series, subqueries and histogram_quantile",
        ),
    ] {
        // Each engine registers its own metrics: a registry apiece.
        let (tx, _rx) = tokio::sync::mpsc::channel(100_000);
        let engine = Engine::new(registry.clone(), dir.path().to_path_buf(), None, tx).unwrap();
        assert_eq!(engine.status().len(), 1000);
        engine.tick_all(10_000);
        assert!(engine.status().iter().all(|r| r.last_error.is_none()));
        c.bench_function(&format!("rule tick: {what}"), |b| {
            b.iter(|| black_box(engine.tick_all(10_000)))
        });
    }
    // A collector's families are encoded when it publishes them and a scrape copies the
    // encoded text: both halves are measured, for 10,000 series.
    let registry = registry();
    let families = families(3);
    let mut at = 20_000;
    c.bench_function(
        "publish 10,000 series (encode, append to the history)",
        |b| {
            b.iter_batched(
                || families.clone(),
                |f| {
                    at += 5_000;
                    registry.publish("bench", f, at);
                },
                criterion::BatchSize::LargeInput,
            )
        },
    );
    c.bench_function("render /metrics: 10,000 series", |b| {
        b.iter(|| black_box(registry.render().len()))
    });
    // What Prometheus asks for: the collected part is compressed once per published body
    // (the first call below), each scrape compresses only the exporter's own metrics.
    c.bench_function("render /metrics gzip: 10,000 series", |b| {
        b.iter(|| black_box(registry.render_gzip().unwrap().len()))
    });
    // For comparison, what compressing the whole body on every scrape costs.
    c.bench_function(
        "gzip the whole of /metrics on every scrape: 10,000 series",
        |b| {
            b.iter(|| {
                use std::io::Write as _;
                let text = registry.render();
                let mut e =
                    flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
                e.write_all(text.as_bytes()).unwrap();
                black_box(e.finish().unwrap().len())
            })
        },
    );
    let real_gzip = realistic();
    c.bench_function(
        &format!("render /metrics gzip: a real scrape of {n} series"),
        |b| b.iter(|| black_box(real_gzip.render_gzip().unwrap().len())),
    );
}

criterion_group!(benches, bench);
criterion_main!(benches);
