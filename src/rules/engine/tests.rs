//! The engine's tests: ticks, reloads, persistence and restarts over a real registry and
//! temporary rule files.

use super::*;
use std::path::Path;

use crate::rules::file::Mode;
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

/// A rule without `for`: each new label set of `m` fires at its first evaluation.
const AT_ONCE: &str = "groups:\n  - name: g\n    interval: 1s\n    rules:\n      - name: AtOnce\n        expr: m > 0\n        for: 0s\n        actions:\n          - redis_memory_purge: {}\n";

fn publish_m(r: &Registry, ids: std::ops::Range<usize>, at_ms: i64) {
    let mut f = Families::new();
    for i in ids {
        f.gauge("m", "h", &[("id", &i.to_string())], 1.0);
    }
    r.publish("test", f.into_vec(), at_ms);
}

/// Whether `rule_state.json` in `dir` holds the instance `id` of `AtOnce` as firing.
fn persisted_firing(dir: &Path, id: &str) -> bool {
    let Ok(bytes) = std::fs::read(dir.join("rule_state.json")) else {
        return false;
    };
    let v: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
    v["rules"]["AtOnce"]["instances"]
        .as_array()
        .into_iter()
        .flatten()
        .any(|i| i["labels"]["id"] == id && i["state"] == "firing")
}

/// A crash between sending a request and persisting the state would fire a `for: 0` rule (and
/// run its actions) again at restart: the state must be on disk before the request leaves.
/// Checked at the moment each request is received, for many firing edges.
#[test]
fn the_firing_state_is_on_disk_before_the_request_leaves() {
    let (dir, r, engine, mut rx) = setup(AT_ONCE);
    let state_dir = dir.path().to_owned();
    let (seen_tx, seen_rx) = std::sync::mpsc::channel();
    // Reads the state file the moment each request arrives: with the old order (send, then
    // persist) the tick thread is still serializing and fsyncing then.
    let reader = std::thread::spawn(move || {
        while let Some(req) = rx.blocking_recv() {
            let id = req.labels.get("id").unwrap().to_owned();
            let on_disk = persisted_firing(&state_dir, &id);
            if seen_tx.send((id, on_disk)).is_err() {
                break;
            }
        }
    });
    let mut missing = Vec::new();
    for round in 0..20 {
        let t = round as i64 * 1000;
        publish_m(&r, 0..round + 1, t);
        engine.tick(t);
        // One new instance fires each round: one request, checked before the next tick.
        let (id, on_disk) = seen_rx.recv_timeout(Duration::from_secs(30)).unwrap();
        assert_eq!(id, round.to_string());
        if !on_disk {
            missing.push(id);
        }
    }
    drop(engine);
    reader.join().unwrap();
    assert!(
        missing.is_empty(),
        "requests observed before their firing state was persisted: {missing:?}"
    );
}

/// `status`, `reload_status`, `explain` and `set_mode` answer while a tick holds the engine's
/// lock (a slow evaluation): they read the snapshot published after the last tick.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_never_waits_for_a_tick() {
    let (_dir, r, engine, _rx) = setup(RULE);
    publish_memory(&r, 0.9, 0);
    engine.tick(0);
    let busy = engine.clone();
    let (held_tx, held_rx) = std::sync::mpsc::channel();
    let (release_tx, release_rx) = std::sync::mpsc::channel::<()>();
    // A tick in progress: the lock held until the test says so.
    let holder = std::thread::spawn(move || {
        let _inner = busy.lock();
        held_tx.send(()).unwrap();
        let _ = release_rx.recv_timeout(Duration::from_secs(60));
    });
    held_rx.recv().unwrap();
    let e = engine.clone();
    let answers = tokio::time::timeout(Duration::from_secs(20), async move {
        let status = tokio::task::spawn_blocking({
            let e = e.clone();
            move || (e.status(), e.reload_status(), e.explain("HighMemory"))
        })
        .await
        .unwrap();
        let set = e.set_mode("HighMemory", Some(Mode::Observe)).await;
        (status, set)
    })
    .await;
    release_tx.send(()).unwrap();
    holder.join().unwrap();
    let ((status, reload, explain), set) =
        answers.expect("status and set_mode waited for the tick's lock");
    assert_eq!(status[0].name, "HighMemory");
    assert!(matches!(
        status[0].instances[0].state,
        State::Pending { .. }
    ));
    assert!(reload.success);
    assert!(explain.is_some());
    assert_eq!(set, Ok(()));
    assert_eq!(engine.status()[0].mode, Mode::Observe);
}

/// A rule's mode override, set through the API, is kept across a restart and applies to the
/// requests the restarted engine makes.
#[tokio::test]
async fn a_mode_override_survives_a_restart() {
    let (dir, r, engine, _rx) = setup(&AT_ONCE.replace("m > 0", "host_memory_usage_ratio > 0.8"));
    engine
        .set_mode("AtOnce", Some(Mode::Observe))
        .await
        .unwrap();
    assert_eq!(
        engine.set_mode("Nope", Some(Mode::Observe)).await,
        Err("no rule named \"Nope\"".to_owned())
    );
    drop(engine);
    drop(r);
    let fresh = Arc::new(Registry::new(Duration::from_secs(600)).unwrap());
    let (tx, mut rx) = mpsc::channel(16);
    let again = Engine::new(
        fresh.clone(),
        dir.path().join("rules"),
        Some(dir.path()),
        tx,
    )
    .unwrap();
    let s = &again.status()[0];
    assert_eq!((s.mode, s.mode_overridden), (Mode::Observe, true));
    publish_memory(&fresh, 0.9, 0);
    again.tick(0);
    let req = rx.try_recv().unwrap();
    assert_eq!(
        req.mode,
        Some(Mode::Observe),
        "the request carries the override"
    );
    // Cleared, it is gone after the next restart too.
    again.set_mode("AtOnce", None).await.unwrap();
    drop(again);
    let (tx, _rx) = mpsc::channel(16);
    let third = Engine::new(
        Arc::new(Registry::new(Duration::from_secs(600)).unwrap()),
        dir.path().join("rules"),
        Some(dir.path()),
        tx,
    )
    .unwrap();
    let s = &third.status()[0];
    assert_eq!((s.mode, s.mode_overridden), (Mode::DryRun, false));
}

/// Unreadable state files at start are errors, logged, counted and shown; never silently
/// replaced. The rule state is moved aside; unreadable mode overrides hold every rule in
/// `observe` (an override that stopped a rule must not fall back to its file's `enforce`).
#[tokio::test]
async fn unreadable_state_files_are_errors_not_fresh_state() {
    let (dir, r, engine, _rx) =
        setup(&AT_ONCE.replace("for: 0s", "for: 0s\n        mode: enforce"));
    publish_m(&r, 0..1, 0);
    engine.tick(0);
    drop(engine);
    std::fs::write(dir.path().join("rule_state.json"), b"{torn").unwrap();
    std::fs::write(dir.path().join("modes.json"), b"[not modes").unwrap();
    let counted = |file: &str| {
        crate::statefile::error_counter()
            .map(|c| {
                c.collect()
                    .iter()
                    .flat_map(|f| f.get_metric())
                    .filter(|m| m.get_label().iter().any(|l| l.value() == file))
                    .map(|m| m.get_counter().get_value())
                    .sum::<f64>()
            })
            .unwrap_or(0.0)
    };
    let (state_before, modes_before) = (counted("rule_state.json"), counted("modes.json"));
    let fresh = Arc::new(Registry::new(Duration::from_secs(600)).unwrap());
    let (tx, mut rx) = mpsc::channel(16);
    let again = Engine::new(
        fresh.clone(),
        dir.path().join("rules"),
        Some(dir.path()),
        tx,
    )
    .unwrap();
    assert!(counted("rule_state.json") > state_before, "counted");
    assert!(counted("modes.json") > modes_before, "counted");
    let warnings = again.reload_status().warnings.join("\n");
    assert!(
        warnings.contains("rule_state.json is unreadable"),
        "{warnings}"
    );
    assert!(warnings.contains("modes.json is unreadable"), "{warnings}");
    // The torn state is kept for inspection, the torn overrides stay where they are.
    assert_eq!(
        std::fs::read(dir.path().join("rule_state.json.unreadable")).unwrap(),
        b"{torn"
    );
    assert_eq!(
        std::fs::read(dir.path().join("modes.json")).unwrap(),
        b"[not modes"
    );
    let s = &again.status()[0];
    assert_eq!((s.mode, s.mode_overridden), (Mode::Observe, true));
    let refused = again
        .set_mode("AtOnce", Some(Mode::Enforce))
        .await
        .unwrap_err();
    assert!(refused.contains("modes.json is unreadable"), "{refused}");
    assert_eq!(
        std::fs::read(dir.path().join("modes.json")).unwrap(),
        b"[not modes"
    );
    publish_m(&fresh, 0..1, 1_000);
    again.tick(1_000);
    assert_eq!(rx.try_recv().unwrap().mode, Some(Mode::Observe));
}

/// `on_absent: fire`: no data at all behind the condition fires the rule (its rule labels as
/// the instance) and requests its actions; data back under the threshold resolves it.
#[test]
fn on_absent_fire_fires_when_the_data_is_gone() {
    let (_dir, r, engine, mut rx) = setup(
        "groups:\n  - name: g\n    interval: 1s\n    rules:\n      - name: Gone\n        expr: host_memory_usage_ratio > 0.8\n        on_absent: fire\n        labels: {team: db}\n        actions:\n          - redis_memory_purge: {}\n",
    );
    publish_memory(&r, 0.5, 0);
    engine.tick(0);
    assert!(engine.status()[0].instances.is_empty());
    assert!(rx.try_recv().is_err());
    r.publish("host", Vec::new(), 1_000);
    engine.tick(1_000);
    let i = &engine.status()[0].instances;
    assert_eq!(i.len(), 1, "{i:?}");
    assert!(matches!(i[0].state, State::Firing { .. }));
    assert_eq!(i[0].labels.get("team").map(String::as_str), Some("db"));
    let req = rx.try_recv().unwrap();
    assert_eq!((req.rule.as_str(), req.event), ("Gone", Event::Firing));
    assert_eq!(req.labels.get("team"), Some("db"));
    // Still gone: no second request.
    engine.tick(2_000);
    assert!(rx.try_recv().is_err());
    // Back, and below the threshold: resolved.
    publish_memory(&r, 0.5, 3_000);
    engine.tick(3_000);
    assert!(engine.status()[0].instances.is_empty());
    assert_eq!(rx.try_recv().unwrap().event, Event::Resolved);
}

/// A remote rule is not handed out again while its query is in flight, and an answer is
/// applied only to the hand-out that asked for it: a slow answer can neither overlap a newer
/// evaluation nor be applied after a reload reset the rule.
#[test]
fn remote_evaluations_never_overlap_and_stale_answers_are_dropped() {
    use crate::rules::expr::{Sample, Value};
    let dir = tempfile::tempdir().unwrap();
    let rules = dir.path().join("rules");
    std::fs::create_dir_all(&rules).unwrap();
    std::fs::write(
        rules.join("r.yml"),
        "groups:\n  - name: g\n    interval: 5s\n    source: fleet\n    rules:\n      - name: Remote\n        expr: up == 0\n        mode: dry_run\n        actions: [{ webhook: { url: 'http://127.0.0.1:9/x' } }]\n",
    )
    .unwrap();
    let registry = Arc::new(Registry::new(Duration::from_secs(600)).unwrap());
    let (tx, mut rx) = tokio::sync::mpsc::channel(16);
    let engine = Engine::with_declared(
        registry,
        rules.clone(),
        None,
        tx,
        None,
        Some(["fleet".to_owned()].into_iter().collect()),
    )
    .unwrap();
    let holds = || {
        Ok((
            Value::Vector(vec![Sample {
                labels: Labels::new([("job", "a")]),
                value: 0.0,
            }]),
            None,
        ))
    };
    let first = engine.due_remote(0);
    assert_eq!(first.len(), 1);
    // Due again, but the first query has not answered: missed, not handed out twice.
    assert!(engine.due_remote(5_000).is_empty());
    engine.apply_remote(&first[0], holds(), Duration::from_millis(1));
    assert_eq!(rx.try_recv().unwrap().event, crate::actions::Event::Firing);
    // Applying the same answer again does nothing.
    engine.apply_remote(&first[0], holds(), Duration::from_millis(1));
    assert!(rx.try_recv().is_err());
    let second = engine.due_remote(10_000);
    assert_eq!(second.len(), 1);
    // The rule is removed and restored while the query is out: the answer is dropped.
    std::fs::write(rules.join("r.yml"), "groups: []\n").unwrap();
    engine.reload().unwrap();
    std::fs::write(
        rules.join("r.yml"),
        "groups:\n  - name: g\n    interval: 5s\n    source: fleet\n    rules:\n      - name: Remote\n        expr: up == 0\n        mode: dry_run\n        actions: [{ webhook: { url: 'http://127.0.0.1:9/x' } }]\n",
    )
    .unwrap();
    engine.reload().unwrap();
    engine.apply_remote(
        &second[0],
        Ok((Value::Vector(vec![]), None)),
        Duration::ZERO,
    );
    assert!(rx.try_recv().is_err(), "no resolution from a stale answer");
    // An error leaves the state alone and says why.
    let third = engine.due_remote(15_000);
    engine.apply_remote(&third[0], Err("source fleet: down".into()), Duration::ZERO);
    let status = engine
        .status()
        .into_iter()
        .find(|r| r.name == "Remote")
        .unwrap();
    assert_eq!(status.health, "err");
    assert!(rx.try_recv().is_err());
}
