//! The engine's tests: ticks, reloads, persistence and restarts over a real registry and
//! temporary rule files.

use super::*;
use crate::sample::Families;

fn publish_memory(r: &Registry, ratio: f64, at_ms: i64) {
    let mut f = Families::new();
    f.gauge("host_memory_usage_ratio", "h", &[], ratio);
    r.publish("host", f.into_vec(), at_ms);
}

const RULE: &str = "groups:\n  - name: memory\n    interval: 5s\n    rules:\n      - name: HighMemory\n        expr: host_memory_usage_ratio > 0.8\n        for: 10s\n        clear: host_memory_usage_ratio < 0.7\n        labels: {severity: warning}\n        actions:\n          - redis_memory_purge: {}\n";

fn setup(
    rules: &str,
) -> (
    tempfile::TempDir,
    Arc<Registry>,
    Arc<Engine>,
    mpsc::Receiver<ActionRequest>,
) {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("rules")).unwrap();
    std::fs::write(dir.path().join("rules/memory.yml"), rules).unwrap();
    let registry = Arc::new(Registry::new(Duration::from_secs(600)).unwrap());
    let (tx, rx) = mpsc::channel(16);
    let engine = Engine::new(
        registry.clone(),
        dir.path().join("rules"),
        Some(dir.path()),
        tx,
    )
    .unwrap();
    (dir, registry, engine, rx)
}

#[test]
fn fires_after_for_requests_once_and_resolves_through_clear() {
    let (_dir, r, engine, mut rx) = setup(RULE);
    let s = 1000;
    let mut requests = 0;
    let mut resolved = 0;
    // Memory 0.9 from t=0; evaluations every 5 s.
    for (t, ratio) in [
        (0, 0.9),
        (5, 0.9),
        (10, 0.9),
        (15, 0.9),
        (20, 0.75),
        (25, 0.65),
        (30, 0.65),
    ] {
        publish_memory(&r, ratio, t * s);
        engine.tick(t * s);
        while let Ok(req) = rx.try_recv() {
            if req.event == Event::Resolved {
                // The resolution is handed over too (alerts resolve, breakers count
                // again); it never executes anything.
                assert_eq!(
                    t, 25,
                    "resolved at the first evaluation under the clear level"
                );
                resolved += 1;
                continue;
            }
            assert_eq!(req.event, Event::Firing);
            requests += 1;
            assert_eq!(req.rule, "HighMemory");
            assert_eq!(req.labels.get("severity"), Some("warning"));
            assert_eq!(req.labels.get(crate::rules::expr::NAME), None);
            assert_eq!(req.value, 0.9);
            assert_eq!(req.actions[0].kind(), "redis_memory_purge");
        }
        let status = &engine.status()[0];
        let state = status.instances.first().map(|i| i.state);
        match t {
            0 | 5 => assert!(
                matches!(state, Some(State::Pending { .. })),
                "t={t}: {state:?}"
            ),
            // At 0.75 it is below the condition but above the clear level: still firing.
            10 | 15 | 20 => assert!(
                matches!(state, Some(State::Firing { .. })),
                "t={t}: {state:?}"
            ),
            _ => assert_eq!(state, None, "t={t}"),
        }
    }
    assert_eq!(
        requests, 1,
        "one request on the firing edge, none on resolve"
    );
    assert_eq!(resolved, 1);
    let text = r.render();
    assert!(
        text.contains("autotuner_rule_action_requests_total{rule=\"HighMemory\"} 1"),
        "{text}"
    );
    assert!(text.contains("autotuner_rules_last_reload_successful 1"));
}

#[test]
fn a_broken_reload_keeps_the_running_rules_and_state_survives_a_good_one() {
    let (dir, r, engine, _rx) = setup(RULE);
    publish_memory(&r, 0.9, 0);
    engine.tick(0);
    assert_eq!(engine.status()[0].instances.len(), 1);
    std::fs::write(
        dir.path().join("rules/memory.yml"),
        "groups: [ {name: x, rules: [ {name: A, expr: 'rate(x)'} ] } ]",
    )
    .unwrap();
    let errors = engine.reload().unwrap_err();
    assert!(errors[0].contains("invalid PromQL"), "{errors:?}");
    assert_eq!(engine.status()[0].name, "HighMemory");
    assert_eq!(engine.status()[0].instances.len(), 1, "state kept");
    assert!(
        r.render()
            .contains("autotuner_rules_last_reload_successful 0")
    );
    // The same rule again (a comment added): unchanged, so its pending state stays.
    std::fs::write(
        dir.path().join("rules/memory.yml"),
        format!("# edited\n{RULE}"),
    )
    .unwrap();
    assert_eq!(engine.reload(), Ok(1));
    assert_eq!(
        engine.status()[0].instances.len(),
        1,
        "state kept across a reload"
    );
    assert!(engine.reload_status().success);
}

#[test]
fn rules_reading_unpublished_metrics_are_warned_about_once_data_is_in() {
    let (_dir, r, engine, _rx) = setup(&RULE.replace(
        "host_memory_usage_ratio < 0.7",
        "hots_memory_usage_ratio < 0.7",
    ));
    r.expect_collectors(&["host"]);
    publish_memory(&r, 0.5, 0);
    engine.tick(0);
    assert!(
        engine.reload_status().warnings.is_empty(),
        "not before the first round"
    );
    r.record_attempt(
        "host",
        &crate::registry::Attempt {
            duration: Duration::ZERO,
            finished_ms: 0,
            error: None,
        },
    );
    engine.tick(5_000);
    let w = engine.reload_status().warnings;
    assert_eq!(w.len(), 1, "{w:?}");
    assert!(
        w[0].contains("reads hots_memory_usage_ratio, which no running collector publishes"),
        "{w:?}"
    );
}

#[test]
fn a_rule_reading_past_the_history_is_warned_about() {
    let (_dir, _r, engine, _rx) =
        setup(&RULE.replace("host_memory_usage_ratio > 0.8", "rate(x[20m]) > 0.8"));
    let w = engine.reload_status().warnings;
    assert_eq!(w.len(), 1, "{w:?}");
    assert!(
        w[0].contains("reads 1200s back, more than the history keeps (600s"),
        "{w:?}"
    );
}

#[test]
fn state_survives_a_restart() {
    let (dir, r, engine, _rx) = setup(RULE);
    publish_memory(&r, 0.9, 0);
    engine.tick(0);
    publish_memory(&r, 0.9, 10_000);
    engine.tick(10_000);
    assert!(matches!(
        engine.status()[0].instances[0].state,
        State::Firing {
            since_ms: 10_000,
            ..
        }
    ));
    drop(engine);
    drop(r);
    // A restart: a new process, a new registry.
    let fresh = Arc::new(Registry::new(Duration::from_secs(600)).unwrap());
    let (tx, _rx2) = mpsc::channel(16);
    let again = Engine::new(fresh, dir.path().join("rules"), Some(dir.path()), tx).unwrap();
    assert!(matches!(
        again.status()[0].instances[0].state,
        State::Firing {
            since_ms: 10_000,
            ..
        }
    ));
}

#[test]
fn on_absent_hold_keeps_firing_through_a_data_gap_but_not_pending() {
    let (_dir, r, engine, _rx) = setup(RULE);
    publish_memory(&r, 0.9, 0);
    engine.tick(0);
    // The series goes stale (the collector stopped publishing it): no data behind the rule.
    r.publish("host", Vec::new(), 5_000);
    engine.tick(5_000);
    assert!(
        engine.status()[0].instances.is_empty(),
        "a pending instance starts over after a gap"
    );
    publish_memory(&r, 0.9, 10_000);
    engine.tick(10_000);
    publish_memory(&r, 0.9, 20_000);
    engine.tick(20_000);
    assert!(matches!(
        engine.status()[0].instances[0].state,
        State::Firing { .. }
    ));
    r.publish("host", Vec::new(), 25_000);
    engine.tick(25_000);
    assert!(
        matches!(engine.status()[0].instances[0].state, State::Firing { .. }),
        "a firing instance holds through a gap"
    );
}
