//! The rule engine in the real binary: a rule fires over the host collector's samples, an edit
//! saved by rename is picked up without a restart, a broken edit changes nothing but the reload
//! status, and POST /-/reload and SIGHUP reload through the same function.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::{Autotuner, client};

const FIRING: &str = "groups:\n  - name: host\n    interval: 1s\n    rules:\n      - name: HasCpus\n        expr: host_cpus > 0\n        labels: {team: ops}\n";

/// Saves like an editor: write a temporary file beside, then rename over the old one.
fn save(dir: &Path, name: &str, text: &str) {
    let tmp = dir.join(format!(".{name}.swp"));
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, dir.join(name)).unwrap();
}

async fn rules(app: &Autotuner) -> serde_json::Value {
    app.get_json("/api/v1/rules").await
}

async fn rules_until(
    app: &Autotuner,
    what: &str,
    check: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(8);
    loop {
        let v = rules(app).await;
        if check(&v) {
            return v;
        }
        assert!(Instant::now() < deadline, "{what} not seen; last: {v:#}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

#[tokio::test]
async fn rules_fire_reload_on_save_and_survive_broken_edits() {
    let dir = tempfile::tempdir().unwrap();
    save(dir.path(), "host.yml", FIRING);
    let other = tempfile::tempdir().unwrap();
    let config = other.path().join("autotuner.yml");
    std::fs::write(&config, "collectors:\n  host:\n    interval: 1s\n").unwrap();
    let app = Autotuner::start(
        &[
            &format!("--rules.dir={}", dir.path().display()),
            &format!("--config.file={}", config.display()),
        ],
        &[],
    )
    .await_ready()
    .await;

    let v = rules_until(&app, "HasCpus firing", |v| {
        v["data"]["rules"][0]["instances"][0]["state"] == "firing"
    })
    .await;
    let rule = &v["data"]["rules"][0];
    assert_eq!(rule["health"], "ok");
    assert_eq!(rule["instances"][0]["labels"]["team"], "ops");
    assert_eq!(v["data"]["reload"]["success"], true);
    // The one line a rule without actions logs on its firing edge.
    let firing: Vec<serde_json::Value> = app
        .log
        .lock()
        .unwrap()
        .iter()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["message"] == "rule firing")
        .collect();
    assert_eq!(firing.len(), 1, "{firing:?}");
    assert_eq!(firing[0]["rule"], "HasCpus");

    // An edit saved by rename: picked up without a restart.
    let saved = Instant::now();
    save(
        dir.path(),
        "host.yml",
        &FIRING.replace("host_cpus > 0", "host_cpus > 100000"),
    );
    let v = rules_until(&app, "the edited rule", |v| {
        v["data"]["rules"][0]["expr"] == "host_cpus > 100000"
    })
    .await;
    eprintln!("rule file saved → new rule active: {:?}", saved.elapsed());
    assert_eq!(
        v["data"]["rules"][0]["instances"].as_array().unwrap().len(),
        0,
        "a changed rule starts over"
    );

    // A broken edit: the running rule stays; the reload status says why.
    save(
        dir.path(),
        "host.yml",
        "groups:\n  - name: host\n    rules:\n      - name: HasCpus\n        expr: host_cpus >\n",
    );
    let v = rules_until(&app, "the failed reload", |v| {
        v["data"]["reload"]["success"] == false
    })
    .await;
    assert_eq!(v["data"]["rules"][0]["expr"], "host_cpus > 100000");
    let errors = v["data"]["reload"]["errors"].to_string();
    assert!(errors.contains("host.yml:5:15: invalid PromQL"), "{errors}");
    let s = app.scrape().await;
    assert_eq!(
        s.value("autotuner_rules_last_reload_successful", &[]),
        Some(0.0)
    );
    assert_eq!(s.value("autotuner_rules_loaded", &[]), Some(1.0));

    // POST /-/reload answers with the errors while the file is broken...
    let r = client().post(app.url("/-/reload")).send().await.unwrap();
    assert_eq!(r.status(), 500);
    let body: serde_json::Value = r.json().await.unwrap();
    assert!(
        body["errors"][0]
            .as_str()
            .unwrap()
            .contains("invalid PromQL"),
        "{body}"
    );
    // ...and with the count once it is fixed (here before the watcher sees it: the write is
    // not a rename, and the POST comes first).
    std::fs::write(dir.path().join("host.yml"), FIRING).unwrap();
    let r = client().post(app.url("/-/reload")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["rules"], 1);

    // SIGHUP reloads too: the reload timestamp moves.
    let before = app
        .scrape()
        .await
        .value("autotuner_rules_last_reload_timestamp_seconds", &[])
        .unwrap();
    tokio::time::sleep(Duration::from_millis(1_100)).await;
    let pid = app.child.id().to_string();
    assert!(
        std::process::Command::new("kill")
            .args(["-HUP", &pid])
            .status()
            .unwrap()
            .success()
    );
    app.scrape_until(Duration::from_secs(5), "a reload after SIGHUP", |s| {
        s.value("autotuner_rules_last_reload_timestamp_seconds", &[])
            .is_some_and(|t| t > before)
    })
    .await;
}

/// The log lines saying a reload failed.
fn failed_reloads(app: &Autotuner) -> usize {
    app.log
        .lock()
        .unwrap()
        .iter()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["message"] == "rule reload failed; keeping the running rules")
        .count()
}

const BROKEN: &str =
    "groups:\n  - name: host\n    rules:\n      - name: HasCpus\n        expr: host_cpus >\n";

/// The engine's own reads of a broken file must not count as changes (they once made the
/// watcher reload it about nine times a second, forever): one failed reload per change.
#[tokio::test]
async fn a_broken_file_is_reloaded_once_per_change_not_on_the_engines_own_reads() {
    let dir = tempfile::tempdir().unwrap();
    save(dir.path(), "host.yml", BROKEN);
    let app = Autotuner::start(&[&format!("--rules.dir={}", dir.path().display())], &[])
        .await_ready()
        .await;
    let at_start = app
        .scrape()
        .await
        .value("autotuner_rules_last_reload_timestamp_seconds", &[])
        .unwrap();
    // Nothing changes for a few seconds: the load at start is the only attempt.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(failed_reloads(&app), 1, "only the load at start");
    assert_eq!(
        app.scrape()
            .await
            .value("autotuner_rules_last_reload_timestamp_seconds", &[]),
        Some(at_start),
        "no reload without a change"
    );

    // One change, still broken: exactly one more attempt, reported once.
    save(
        dir.path(),
        "host.yml",
        &BROKEN.replace("host_cpus >", "host_cpus > on("),
    );
    let deadline = Instant::now() + Duration::from_secs(8);
    while failed_reloads(&app) < 2 {
        assert!(Instant::now() < deadline, "the change was not reloaded");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(failed_reloads(&app), 2, "one attempt for one change");

    // Fixing it reloads.
    save(dir.path(), "host.yml", FIRING);
    let v = rules_until(&app, "the fixed rule", |v| {
        v["data"]["reload"]["success"] == true
    })
    .await;
    assert_eq!(v["data"]["rules"][0]["name"], "HasCpus");
    assert_eq!(failed_reloads(&app), 2);
}
