//! Property tests over the rule loader and the PromQL front end: arbitrary text, YAML-shaped
//! noise and PromQL-shaped token soup never panic or hang, and every rejection says where and
//! why. Bounded (a few thousand cases) so the suite stays fast.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use autotuner::rules::expr::memory::MemorySeries;
use autotuner::rules::expr::{Evaluator, Query};
use autotuner::rules::file::RuleFileSpec;
use autotuner::yaml;
use proptest::prelude::*;
use std::sync::mpsc;
use std::time::Duration;

const PROMQL_TOKENS: &[&str] = &[
    "x",
    "up",
    "rate(",
    "increase(",
    "sum",
    "avg",
    "by",
    "without",
    "(",
    ")",
    "[5m]",
    "[0s]",
    "{",
    "}",
    "a=\"b\"",
    "a=~\".*\"",
    "a!~\"(\"",
    ",",
    ">",
    "<",
    "==",
    "bool",
    "and",
    "or",
    "unless",
    "on",
    "ignoring",
    "group_left",
    "0.8",
    "-1",
    "1e308",
    "NaN",
    "Inf",
    "+",
    "-",
    "*",
    "/",
    "%",
    "^",
    "offset 5m",
    "@ 100",
    "absent(",
    "clamp(",
    "time()",
    "vector(",
    "scalar(",
    "max_over_time(",
    "topk(",
    "[5m:1m]",
    "\"s\"",
];

const YAML_TOKENS: &[&str] = &[
    "groups:",
    "- name: g",
    "rules:",
    "- name: A",
    "expr: x > 1",
    "for: 5m",
    "for: -1",
    "for: 1e400s",
    "clear: ",
    "actions:",
    "- knob: {name: k, set: 1}",
    "- webhook: {}",
    "mode: enforce",
    "labels: {a: b}",
    "interval: 0s",
    "&a",
    "*a",
    "<<: *a",
    "!!binary x",
    "? [a]",
    ": ",
    "- ",
    "{",
    "}",
    "[",
    "]",
    "'",
    "\"",
    "#",
    "\t",
    "\n",
    "  ",
    "    ",
    "~",
    "null",
    "yes",
    "0x10",
    ".inf",
    "%YAML 1.2",
    "---",
    "...",
];

fn soup(tokens: &'static [&'static str], sep: &'static str) -> impl Strategy<Value = String> {
    prop::collection::vec(prop::sample::select(tokens), 0..40).prop_map(move |v| v.join(sep))
}

/// How long one case may take before it counts as a hang: far above what any case needs (well
/// under a millisecond), even on a loaded machine.
const CASE_LIMIT: Duration = Duration::from_secs(10);

/// Runs `check` on `text` in its own thread and fails if it does not finish within
/// [`CASE_LIMIT`] ("never hangs", asserted rather than assumed); a panic inside is re-raised.
fn within_limit(text: &str, check: fn(&str)) {
    let owned = text.to_owned();
    let (tx, rx) = mpsc::channel();
    let worker = std::thread::spawn(move || {
        let outcome = std::panic::catch_unwind(|| check(&owned));
        let _ = tx.send(());
        outcome
    });
    match rx.recv_timeout(CASE_LIMIT) {
        Ok(()) | Err(mpsc::RecvTimeoutError::Disconnected) => {
            if let Err(panic) = worker.join().unwrap() {
                std::panic::resume_unwind(panic);
            }
        }
        // The hung thread is left behind: the failure ends the test binary's run of this test.
        Err(mpsc::RecvTimeoutError::Timeout) => {
            panic!("still running after {CASE_LIMIT:?} (a hang) on input {text:?}")
        }
    }
}

fn check_yaml(text: &str) {
    let partial = yaml::from_str_partial::<RuleFileSpec>(text);
    for d in &partial.diagnostics {
        assert!(d.line >= 1 && d.column >= 1, "{d:?}");
        assert!(!d.message.trim().is_empty(), "{d:?}");
    }
    // A document that yields nothing must say why: never a silent rejection.
    assert!(
        partial.value.is_some() || !partial.diagnostics.is_empty(),
        "no value and no diagnostic for {text:?}"
    );
}

fn check_promql(text: &str) {
    let Ok(q) = Query::parse(text) else { return };
    let mut s = MemorySeries::new();
    s.load_line(r#"x{a="b"} 0+1x20"#, 0, 15_000).unwrap();
    s.load_line(r#"up{a="c"} 1 0 stale 1"#, 0, 15_000).unwrap();
    // Evaluation may refuse (a run-time error), but must not panic.
    let _ = Evaluator::new(&s, 200_000).eval(&q);
    let _ = Evaluator::new(&MemorySeries::new(), 0).eval(&q);
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 1500, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_text_never_panics_the_loader(text in "\\PC{0,200}") {
        within_limit(&text, check_yaml);
        within_limit(&text, check_promql);
    }

    #[test]
    fn yaml_shaped_noise_never_panics_the_loader(text in soup(YAML_TOKENS, "\n")) {
        within_limit(&text, check_yaml);
    }

    #[test]
    fn promql_shaped_noise_never_panics(text in soup(PROMQL_TOKENS, " ")) {
        within_limit(&text, check_promql);
        within_limit(&format!("groups:\n  - name: g\n    rules:\n      - name: A\n        expr: '{}'\n", text.replace('\'', "''")), check_yaml);
    }
}
