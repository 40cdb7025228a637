//! `autotuner check rules`: the shipped rules pass; a broken set fails naming every problem.
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
