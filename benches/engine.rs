//! Micro-benchmarks of the hot paths: one rule-engine tick of 1,000 rules over 10,000 series,
//! and encoding `/metrics` for 10,000 series. Run with `cargo bench --bench engine`; the README
//! shows the latest medians. Timings are never test assertions.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::hint::black_box;
use std::sync::Arc;
use std::time::Duration;

use autotuner::registry::Registry;
use autotuner::rules::engine::Engine;
use autotuner::sample::Families;
use criterion::{Criterion, criterion_group, criterion_main};

/// 100 metric names × 100 instances, published at 0, 5 and 10 s (counters growing).
fn registry() -> Arc<Registry> {
    let r = Arc::new(Registry::new(Duration::from_secs(600)).unwrap());
    for step in 0..3i64 {
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
        r.publish("bench", f.into_vec(), step * 5_000);
    }
    r
}

/// 1,000 rules: 700 plain thresholds, 200 aggregated rates, 100 set operations.
fn rules_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let mut text = String::from("groups:\n  - name: bench\n    interval: 1s\n    rules:\n");
    for k in 0..1000 {
        let m = k % 100;
        let expr = match k % 10 {
            0 | 1 => format!("sum by (job) (rate(metric_{m}_total[1m])) > 1"),
            2 => format!(
                "metric_{m}_total > 100 and on (instance) metric_{}_total > 50",
                (m + 1) % 100
            ),
            _ => format!("metric_{m}_total{{instance=\"i{}\"}} > 10", k % 100),
        };
        text.push_str(&format!(
            "      - name: R{k}\n        expr: '{expr}'\n        for: 1m\n"
        ));
    }
    std::fs::write(dir.path().join("bench.yml"), text).unwrap();
    dir
}

fn bench(c: &mut Criterion) {
    let registry = registry();
    let dir = rules_dir();
    let (tx, _rx) = tokio::sync::mpsc::channel(100_000);
    let engine = Engine::new(registry.clone(), dir.path().to_path_buf(), None, tx).unwrap();
    assert_eq!(engine.status().len(), 1000);
    c.bench_function("rule tick: 1,000 rules over 10,000 series", |b| {
        b.iter(|| black_box(engine.tick_all(10_000)))
    });
    c.bench_function("render /metrics: 10,000 series", |b| {
        b.iter(|| black_box(registry.render().len()))
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
