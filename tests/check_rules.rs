//! `autotuner check rules`: the shipped rules pass; a broken set fails naming every problem;
//! given the configuration, a knob action on a knob it does not declare fails at its place.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::process::Command;

use common::BIN;

#[test]
fn the_shipped_rules_are_valid() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("rules");
    let files = autotuner::rules::compile::rule_files(&dir).unwrap();
    assert!(files.len() >= 3, "{files:?}");
    let out = Command::new(BIN)
        .arg("check")
        .arg("rules")
        .args(&files)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stdout}\n{stderr}");
    assert_eq!(
        stdout.matches("SUCCESS: 1 rules found").count(),
        files.len(),
        "{stdout}"
    );
    assert!(stderr.is_empty(), "warnings on shipped rules: {stderr}");
}

#[test]
fn a_broken_rule_file_fails_with_every_problem_located() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("broken.yml");
    std::fs::write(
        &file,
        "groups:\n  - name: g\n    rules:\n      - name: A\n        expr: host_memory_usage_ratio >\n        for: soon\n        actions:\n          - knob: {name: batch}\n",
    )
    .unwrap();
    let out = Command::new(BIN)
        .args(["check", "rules"])
        .arg(&file)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    let f = file.display().to_string();
    for want in [
        format!("{f}:5:15: invalid PromQL"),
        format!("{f}:6:14: invalid duration"),
        format!("{f}:8:13: knob \"batch\": give exactly one of set, scale, step"),
    ] {
        assert!(stderr.contains(&want), "missing {want:?} in:\n{stderr}");
    }
    assert!(String::from_utf8_lossy(&out.stdout).contains("FAILED"));
}

#[test]
fn given_the_configuration_an_undeclared_knob_is_an_error_at_its_action() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("knobs.yml");
    std::fs::write(
        &file,
        "groups:\n  - name: g\n    rules:\n      - name: A\n        expr: host_cpu_usage_ratio > 0.8\n        actions:\n          - knob: {name: workers, step: -1}\n      - name: B\n        expr: host_cpu_usage_ratio < 0.2\n        actions:\n          - webhook: {url: 'http://127.0.0.1:9/x'}\n          - knob: {name: batch_size, set: 100}\n",
    )
    .unwrap();
    let config = dir.path().join("autotuner.yml");
    std::fs::write(
        &config,
        "knobs:\n  batch_size: {initial: 500, min: 50, max: 5000}\n",
    )
    .unwrap();
    let check = |with_config: bool| {
        let mut c = Command::new(BIN);
        c.args(["check", "rules"])
            .env_remove("AUTOTUNER_CONFIG_FILE");
        if with_config {
            c.arg(format!("--config.file={}", config.display()));
        }
        c.arg(&file).output().unwrap()
    };
    let out = check(true);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    let f = file.display().to_string();
    assert_eq!(
        stderr.trim(),
        format!(
            "{f}:7:13: rule \"A\" moves knob \"workers\", which the configuration does not declare (add it under `knobs:`)"
        ),
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("FAILED"));
    // Without the configuration there is nothing to check knobs against.
    let out = check(false);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn the_shipped_rules_pass_with_a_configuration_declaring_their_knob() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("rules");
    let files = autotuner::rules::compile::rule_files(&dir).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let config = tmp.path().join("autotuner.yml");
    std::fs::write(
        &config,
        "knobs:\n  batch_size: {initial: 500, min: 50, max: 5000}\n",
    )
    .unwrap();
    let out = Command::new(BIN)
        .args(["check", "rules"])
        .arg(format!("--config.file={}", config.display()))
        .args(&files)
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
