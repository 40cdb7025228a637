//! Scheduled playbooks (issue 19, item 4): a playbook with `schedule:` runs on its own at its
//! cron pattern's times, as actor `schedule`, through the gate and the audit log; runs of one
//! schedule never overlap (a time that comes during a run is recorded as `skipped_overlap`);
//! a time missed while the process was down is run once at start (`missed: run_once`) or
//! recorded as missed (`missed: skip`).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::time::Duration;

use serde_json::Value;

use common::{Autotuner, until, write_config};

fn audit(data: &std::path::Path) -> Vec<Value> {
    std::fs::read_to_string(data.join("audit.jsonl"))
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn of<'a>(records: &'a [Value], playbook: &str) -> Vec<&'a Value> {
    records
        .iter()
        .filter(|r| r["rule"] == format!("playbook:{playbook}"))
        .collect()
}

const CONFIG: &str = "collectors:\n  host:\n    enabled: false\nactions:\n  exec_allow: [/usr/bin/sleep, /usr/bin/true]\n  rate_limits:\n    global: { count: 1000, per: 1m }\n    per_target: { count: 1000, per: 1m }\n";

fn start(dir: &tempfile::TempDir, playbooks: &str, data: &std::path::Path) -> Autotuner {
    let config = write_config(dir, CONFIG);
    let file = dir.path().join("playbooks.yml");
    std::fs::write(&file, playbooks).unwrap();
    Autotuner::start(
        &[
            &format!("--config.file={config}"),
            &format!("--playbooks.file={}", file.display()),
            &format!("--data.dir={}", data.display()),
        ],
        &[],
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scheduled_runs_come_on_time_and_never_overlap() {
    let dir = tempfile::tempdir().unwrap();
    let data = tempfile::tempdir().unwrap();
    // `slow` takes 3 s and is due every 2 s; `quick` every 2 s too, in dry_run.
    let app = start(
        &dir,
        "playbooks:\n  slow:\n    allow_destructive: true\n    schedule: { cron: '*/2 * * * * *' }\n    steps:\n      - exec: { command: [/usr/bin/sleep, '3'] }\n  quick:\n    allow_destructive: true\n    schedule: { cron: '*/2 * * * * *', mode: dry_run }\n    steps:\n      - exec: { command: [/usr/bin/true] }\n",
        data.path(),
    )
    .await_ready()
    .await;
    until(Duration::from_secs(20), "three runs of quick", || async {
        let records = audit(data.path());
        let n = of(&records, "quick").len();
        if n >= 3 {
            Ok(())
        } else {
            Err(format!("{n} records"))
        }
    })
    .await;
    let records = audit(data.path());
    // quick: every run by the schedule, rehearsed, two seconds apart.
    let quick = of(&records, "quick");
    assert!(
        quick
            .iter()
            .all(|r| r["actor"] == "schedule" && r["decision"] == "would_apply"),
        "{quick:?}"
    );
    let times: Vec<i64> = quick.iter().map(|r| r["ts_ms"].as_i64().unwrap()).collect();
    for w in times.windows(2) {
        let gap = w[1] - w[0];
        // Two seconds apart, give or take a loaded machine's delay in writing the record.
        assert!(
            (1_000..=4_000).contains(&gap),
            "runs {gap} ms apart: {times:?}"
        );
    }
    // slow: runs in enforce, one at a time; the times that came during a run are recorded.
    until(Duration::from_secs(20), "an overlap skipped", || async {
        let records = audit(data.path());
        let slow = of(&records, "slow");
        if slow.iter().any(|r| r["decision"] == "skipped_overlap") {
            Ok(())
        } else {
            Err(format!("{slow:?}"))
        }
    })
    .await;
    let records = audit(data.path());
    let phases: Vec<&str> = of(&records, "slow")
        .iter()
        .filter(|r| r["phase"] == "intent" || r["phase"] == "result")
        .map(|r| r["phase"].as_str().unwrap())
        .collect();
    assert!(!phases.is_empty());
    for (i, p) in phases.iter().enumerate() {
        assert_eq!(
            *p,
            if i % 2 == 0 { "intent" } else { "result" },
            "overlapping runs: {phases:?}"
        );
    }
    assert!(
        of(&records, "slow")
            .iter()
            .all(|r| r["actor"] == "schedule")
    );
    drop(app);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_missed_while_down_is_run_once_or_recorded() {
    // Away from a minute boundary, so the every-minute schedules do not fire on their own
    // during the check.
    loop {
        let s = (autotuner::collect::now_ms() / 1000) % 60;
        if (2..45).contains(&s) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let dir = tempfile::tempdir().unwrap();
    let data = tempfile::tempdir().unwrap();
    // The last fire two minutes ago: the process was down for at least one.
    let two_min_ago = autotuner::collect::now_ms() - 120_000;
    std::fs::write(
        data.path().join("schedules.json"),
        format!("{{\"once\":{two_min_ago},\"skip\":{two_min_ago}}}"),
    )
    .unwrap();
    let app = start(
        &dir,
        "playbooks:\n  once:\n    allow_destructive: true\n    schedule: { cron: '* * * * *', missed: run_once }\n    steps:\n      - exec: { command: [/usr/bin/true] }\n  skip:\n    allow_destructive: true\n    schedule: { cron: '* * * * *' }\n    steps:\n      - exec: { command: [/usr/bin/true] }\n",
        data.path(),
    )
    .await_ready()
    .await;
    until(
        Duration::from_secs(10),
        "the missed runs handled",
        || async {
            let records = audit(data.path());
            let once = of(&records, "once");
            let skip = of(&records, "skip");
            let ran = once
                .iter()
                .any(|r| r["decision"] == "applied" && r["actor"] == "schedule");
            let noted = skip.iter().any(|r| r["decision"] == "skipped_missed");
            if ran && noted {
                Ok(())
            } else {
                Err(format!("once {once:?}, skip {skip:?}"))
            }
        },
    )
    .await;
    let records = audit(data.path());
    assert!(
        of(&records, "skip").iter().all(|r| r["phase"] != "intent"),
        "`missed: skip` ran it"
    );
    assert_eq!(
        of(&records, "once")
            .iter()
            .filter(|r| r["phase"] == "intent")
            .count(),
        1,
        "one run however many were missed"
    );
    drop(app);
}
