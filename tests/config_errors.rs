//! A broken configuration file stops the start with every error named by file and line, and
//! `autotuner check config` reports the same without running anything.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::process::Command;

use common::BIN;

/// Line 3: unknown key; line 4: bad duration; line 7: duplicate key.
const BROKEN: &str = "\
collectors:
  host:
    intervall: 5s
    timeout: fast
history:
  retention: 10m
  retention: 20m
";

fn write(dir: &tempfile::TempDir, name: &str, text: &str) -> String {
    let path = dir.path().join(name);
    std::fs::write(&path, text).unwrap();
    path.to_str().unwrap().to_owned()
}

fn assert_names_each_line(output: &str, file: &str) {
    for (line, what) in [
        (3, "unknown field"),
        (4, "invalid duration"),
        (7, "duplicate key"),
    ] {
        let needle = format!("{file}:{line}:");
        let hit = output.lines().find(|l| l.contains(&needle));
        let hit = hit.unwrap_or_else(|| panic!("no error for line {line} in:\n{output}"));
        assert!(hit.contains(what), "line {line} should say {what:?}: {hit}");
    }
}

#[test]
fn the_binary_refuses_to_start_and_names_each_bad_line() {
    let dir = tempfile::tempdir().unwrap();
    let file = write(&dir, "broken.yml", BROKEN);
    let out = Command::new(BIN)
        .args(["--config.file", &file, "--web.listen-address=127.0.0.1:0"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_names_each_line(&stderr, &file);
    assert!(stderr.contains("not starting"), "{stderr}");
}

#[test]
fn check_config_reports_every_error_and_exits_one() {
    let dir = tempfile::tempdir().unwrap();
    let broken = write(&dir, "broken.yml", BROKEN);
    let good = write(
        &dir,
        "good.yml",
        "collectors:\n  host:\n    interval: 10s\n",
    );
    let out = Command::new(BIN)
        .args(["check", "config", &good, &broken])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stdout.contains(&format!("{good}: OK")), "{stdout}");
    assert!(stderr.contains(&format!("{broken}: FAILED")), "{stderr}");
    assert_names_each_line(&stderr, &broken);

    let ok = Command::new(BIN)
        .args(["check", "config", &good])
        .output()
        .unwrap();
    assert_eq!(ok.status.code(), Some(0), "{ok:?}");
}

#[test]
fn a_missing_file_and_a_bad_flag_are_clear_errors() {
    let out = Command::new(BIN)
        .args([
            "--config.file",
            "/nonexistent/autotuner.yml",
            "--web.listen-address=127.0.0.1:0",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("reading /nonexistent/autotuner.yml"),
        "{stderr}"
    );

    let out = Command::new(BIN)
        .args(["--web.telemetry-path", "metrics"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--web.telemetry-path"));

    let out = Command::new(BIN)
        .args(["--log.level", "loud"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "clap usage errors exit 2");
}

#[test]
fn a_port_in_use_fails_the_start_with_the_address() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let out = Command::new(BIN)
        .args([&format!("--web.listen-address={addr}")])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains(&format!("listening on {addr}")), "{stderr}");
}

/// The configuration examples the documentation shows are valid configurations: every ```yaml
/// block of README.md and docs/app-metrics.md that starts with a top-level configuration key
/// passes `autotuner check config`.
#[test]
fn the_documented_configuration_examples_are_valid() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let keys = [
        "collectors:",
        "targets:",
        "sources:",
        "history:",
        "actions:",
        "knobs:",
    ];
    let dir = tempfile::tempdir().unwrap();
    let mut checked = 0;
    for doc in ["README.md", "docs/app-metrics.md"] {
        let text = std::fs::read_to_string(root.join(doc)).unwrap();
        for (i, block) in text.split("```yaml\n").skip(1).enumerate() {
            let block = block.split("```").next().unwrap();
            let first = block
                .lines()
                .find(|l| !l.trim().is_empty() && !l.trim_start().starts_with('#'))
                .unwrap_or_default();
            if !keys.iter().any(|k| first.starts_with(k)) {
                continue;
            }
            let path = write(&dir, &format!("{}-{i}.yml", doc.replace('/', "-")), block);
            let out = Command::new(BIN)
                .args(["check", "config", &path])
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "{doc}, yaml block {i}:\n{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            checked += 1;
        }
    }
    // The README's full example and app-metrics.md's two.
    assert!(checked >= 3, "only {checked} blocks checked");
}
