//! The shipped rules as a new user first runs them (the binary, no configuration): nothing
//! fails, and a rule that could only fail is named once, at its place, instead.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::time::{Duration, Instant};

use common::{Autotuner, client};

/// README "Rules": with no configuration the batch-size rule's knob is not declared. Its knob
/// action could only fail; the rule is skipped with one warning at the action, the other
/// shipped rules run, and no decision is `failed`.
#[tokio::test]
async fn a_first_run_with_the_shipped_rules_records_no_failed_decisions() {
    let rules = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("rules");
    let app = Autotuner::start(&[&format!("--rules.dir={}", rules.display())], &[])
        .await_ready()
        .await;
    // A few evaluations of every loaded rule (the shortest group interval is 5 s).
    let deadline = Instant::now() + Duration::from_secs(60);
    let v = loop {
        let v: serde_json::Value = client()
            .get(app.url("/api/v1/rules"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let evaluated = v["data"]["rules"]
            .as_array()
            .unwrap()
            .iter()
            .all(|r| r["health"] != "unknown");
        if evaluated {
            break v;
        }
        assert!(Instant::now() < deadline, "rules never evaluated: {v:#}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let names: Vec<&str> = v["data"]["rules"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["name"].as_str().unwrap())
        .collect();
    assert!(!names.is_empty());
    assert!(
        !names.contains(&"BatchSizeController"),
        "the rule moving an undeclared knob is not loaded: {names:?}"
    );
    assert_eq!(v["data"]["reload"]["success"], true);
    let warnings: Vec<String> = v["data"]["reload"]["warnings"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| w.as_str().unwrap().to_owned())
        .collect();
    let path = rules.join("batch_size.yml");
    let file = path.display().to_string();
    // Where the knob action is written: the line of `- knob:`, the column of `knob`.
    let text = std::fs::read_to_string(&path).unwrap();
    let (line, column) = text
        .lines()
        .enumerate()
        .find_map(|(i, l)| l.find("- knob:").map(|c| (i + 1, c + 3)))
        .unwrap();
    let knob: Vec<&String> = warnings.iter().filter(|w| w.contains("knob")).collect();
    assert_eq!(knob.len(), 1, "{warnings:#?}");
    assert!(
        knob[0].starts_with(&format!("{file}:{line}:{column}: rule \"BatchSizeController\" moves knob \"batch_size\", which the configuration does not declare")),
        "{knob:?}"
    );
    assert!(knob[0].ends_with("the rule is skipped"), "{knob:?}");
    // Another few seconds of ticks: nothing failed.
    tokio::time::sleep(Duration::from_secs(6)).await;
    let s = app.scrape().await;
    let failed: Vec<_> = s
        .all("autotuner_actions_total")
        .into_iter()
        .filter(|m| m.labels.get("decision") == Some("failed"))
        .collect();
    assert!(failed.is_empty(), "{failed:?}");
    let log = app.log.lock().unwrap().join("\n");
    assert_eq!(
        log.matches("moves knob \\\"batch_size\\\"").count(),
        1,
        "one warning in the log: {log}"
    );
}
