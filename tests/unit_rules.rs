//! `autotuner test rules`: the shipped rules' unit tests pass; the PromQL cross-check file passes
//! under both our evaluator and Prometheus's own (`promtool test rules`); a wrong expectation
//! fails with what was expected and what came.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::path::Path;
use std::process::Command;

use common::{BIN, require};

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

#[test]
fn the_shipped_rules_pass_their_unit_tests() {
    let dir = root().join("rules/tests");
    let files = autotuner::rules::compile::rule_files(&dir).unwrap();
    assert_eq!(files.len(), 4, "{files:?}");
    let out = Command::new(BIN)
        .args(["test", "rules"])
        .args(&files)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stdout}");
    assert_eq!(stdout.matches("SUCCESS").count(), 4, "{stdout}");
}

/// The examples' rules check against the example configuration (the knob and the source it
/// names are declared there) and the local one passes its unit test.
#[test]
fn the_example_rules_check_and_pass_their_unit_tests() {
    let config = root().join("examples/app-latency/autotuner.yml");
    for rules in [
        "examples/app-latency/rules/app_latency.yml",
        "examples/app-latency-fleet/rules/app_latency.yml",
    ] {
        let out = Command::new(BIN)
            .args(["check", "rules"])
            .arg(format!("--config.file={}", config.display()))
            .arg(root().join(rules))
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(0), "{rules}: {stdout}{stderr}");
        assert!(stdout.contains("SUCCESS: 1 rules found"), "{stdout}");
    }
    let out = Command::new(BIN)
        .args(["test", "rules"])
        .arg(root().join("examples/app-latency/rules/tests/app_latency_test.yml"))
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stdout}");
    assert!(stdout.contains("SUCCESS"), "{stdout}");
}

#[test]
fn our_evaluator_and_promtool_agree_on_the_cross_check_cases() {
    let file = root().join("tests/promql/cross_check.yml");
    let ours = Command::new(BIN)
        .args(["test", "rules"])
        .arg(&file)
        .output()
        .unwrap();
    assert_eq!(
        ours.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&ours.stdout)
    );
    if require("promtool").is_none() {
        return;
    }
    let theirs = Command::new("promtool")
        .args(["test", "rules"])
        .arg(&file)
        .output()
        .unwrap();
    assert!(
        theirs.status.success(),
        "promtool disagrees with the expected values:\n{}{}",
        String::from_utf8_lossy(&theirs.stdout),
        String::from_utf8_lossy(&theirs.stderr)
    );
}

#[test]
fn a_wrong_expectation_fails_and_says_what_came() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("r.yml"), "groups:\n  - name: g\n    rules:\n      - name: Up\n        expr: up == 0\n        actions: [ {redis_memory_purge: {}} ]\n").unwrap();
    std::fs::write(
        dir.path().join("t.yml"),
        "rule_files: [r.yml]\nevaluation_interval: 1m\ntests:\n  - input_series:\n      - series: up{job=\"a\"}\n        values: 1 0 0\n    action_test:\n      - eval_time: 1m\n        rule: Up\n        exp_requests:\n          - labels: {job: a}\n            actions: [redis_memory_purge]\n            decisions: [applied]\n    promql_expr_test:\n      - expr: up\n        eval_time: 2m\n        exp_samples:\n          - labels: 'up{job=\"a\"}'\n            value: 1\n",
    )
    .unwrap();
    let out = Command::new(BIN)
        .args(["test", "rules"])
        .arg(dir.path().join("t.yml"))
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    // A rule without its own mode rehearses (dry_run): the gate's decision is would_apply.
    assert!(stdout.contains("rule \"Up\" at 1m: expected requests {({\"job\": \"a\"}, [\"redis_memory_purge\"], Some([\"applied\"]))}, got {({\"job\": \"a\"}, [\"redis_memory_purge\"], Some([\"would_apply\"]))}"), "{stdout}");
    assert!(
        stdout.contains("expr \"up\" at 2m: expected [up{job=\"a\"} 1], got [up{job=\"a\"} 0]"),
        "{stdout}"
    );
}
