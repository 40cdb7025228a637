//! Prometheus's own PromQL test scripts, run against our evaluator. The scripts are read from
//! `../shared/promql-testdata` (never copied into this repository); where that folder is absent
//! the test says it did not run.
//!
//! Every instant `eval` whose expression our evaluator accepts must give Prometheus's result.
//! Cases it refuses (functions, aggregations or modifiers outside the supported subset), range
//! queries, native histograms and string results are counted as skipped.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::HashSet;
use std::path::PathBuf;
use std::time::Duration;

use autotuner::rules::expr::memory::{MemorySeries, parse_labels};
use autotuner::rules::expr::{Evaluator, Memo, Query, Value};
use autotuner::sample::Labels;

fn duration_ms(text: &str) -> i64 {
    if text
        .trim_start_matches('0')
        .trim_end_matches(|c: char| c.is_ascii_alphabetic())
        .is_empty()
    {
        return 0; // `0`, `0s`, `0m`: the parser refuses zero durations
    }
    let d: Duration =
        promql_parser::util::parse_duration(text).unwrap_or_else(|e| panic!("{text}: {e}"));
    d.as_millis() as i64
}

/// Prometheus's comparison: equal, both NaN, or within a relative 1e-6.
fn almost_equal(a: f64, b: f64) -> bool {
    if a == b || (a.is_nan() && b.is_nan()) {
        return true;
    }
    let diff = (a - b).abs();
    let norm = a.abs().min(f64::MAX) + b.abs().min(f64::MAX);
    diff < 1e-6 * norm.max(f64::MIN_POSITIVE)
}

/// Cases whose expected result depends on a Prometheus feature flag that is off by default,
/// and which our evaluator answers as default Prometheus does: (file, expression, why).
const DIFFERENT_SEMANTICS: &[(&str, &str, &str)] = &[
    (
        "name_label_dropping.test",
        "sum(rate({env=\"1\"}[10m])) by (env)",
        "delayed name removal (promql-delayed-name-removal) lets an intermediate vector hold duplicate label sets; default Prometheus errors, as we do",
    ),
    (
        "name_label_dropping.test",
        "sum by (__name__) (metric_total{env=\"1\"} or rate(metric_total{env=\"2\"}[5m]))",
        "delayed name removal keeps __name__ until the end of the query; by default rate drops it at once",
    ),
    (
        "name_label_dropping.test",
        "sum by (__name__) (rate(metric_total{env=\"2\"}[5m]) or metric_total{env=\"1\"})",
        "delayed name removal keeps __name__ until the end of the query; by default rate drops it at once",
    ),
];

/// Whether `expr` names the metric `name` (as a whole word, not a prefix of a longer name).
fn mentions(expr: &str, name: &str) -> bool {
    let word = |c: char| c.is_ascii_alphanumeric() || c == '_' || c == ':';
    expr.match_indices(name).any(|(i, _)| {
        let before = expr[..i].chars().next_back().is_none_or(|c| !word(c));
        let after = expr[i + name.len()..]
            .chars()
            .next()
            .is_none_or(|c| !word(c));
        before && after
    })
}

#[derive(Default)]
struct Tally {
    passed: usize,
    skipped: usize,
    failures: Vec<String>,
}

struct Case {
    line: usize,
    at_ms: i64,
    expr: String,
    expect_fail: bool,
    lines: Vec<String>,
    skip: bool,
}

fn run_case(
    store: &MemorySeries,
    case: &Case,
    tally: &mut Tally,
    file: &str,
    unloadable: &HashSet<String>,
) {
    let differs = DIFFERENT_SEMANTICS
        .iter()
        .any(|(f, e, _)| *f == file && *e == case.expr);
    if case.skip || differs || unloadable.iter().any(|n| mentions(&case.expr, n)) {
        tally.skipped += 1;
        return;
    }
    let Ok(query) = Query::parse(&case.expr) else {
        tally.skipped += 1;
        return;
    };
    let result = Evaluator::new(store, case.at_ms).eval(&query);
    let fail = |msg: String| format!("{file}:{}: {} — {msg}", case.line, case.expr);
    // The rule engine evaluates through a per-tick memo: the first evaluation fills it (and
    // reuses it within the expression), the second is answered from it; both must agree with
    // the plain evaluation.
    let memo = Memo::new(case.at_ms);
    let first = Evaluator::with_memo(store, &memo).eval(&query);
    let again = Evaluator::with_memo(store, &memo).eval(&query);
    let plain = format!("{result:?}");
    if format!("{first:?}") != plain || format!("{again:?}") != plain {
        tally.failures.push(fail(format!(
            "through the memo: {first:?}, then {again:?}; plain: {plain}"
        )));
        return;
    }
    match (result, case.expect_fail) {
        (Err(_), true) => tally.passed += 1,
        (Ok(v), true) => tally
            .failures
            .push(fail(format!("expected an error, got {v:?}"))),
        (Err(e), false) => tally.failures.push(fail(format!("error: {e}"))),
        (Ok(Value::Scalar(v)), false) => {
            let want: Option<f64> = (case.lines.len() == 1)
                .then(|| case.lines[0].parse().ok())
                .flatten();
            match want {
                Some(w) if almost_equal(v, w) => tally.passed += 1,
                _ => tally
                    .failures
                    .push(fail(format!("scalar {v}, expected {:?}", case.lines))),
            }
        }
        (Ok(Value::Vector(got)), false) => {
            let mut want: Vec<(Labels, f64)> = Vec::new();
            for l in &case.lines {
                let (sel, val) = l.rsplit_once(char::is_whitespace).unwrap();
                let labels = if sel.trim() == "{}" {
                    Labels::empty()
                } else {
                    parse_labels(sel.trim()).unwrap()
                };
                let value = if val == "stale" {
                    f64::NAN
                } else {
                    val.parse().unwrap()
                };
                want.push((labels, value));
            }
            let mut ok = got.len() == want.len();
            for s in &got {
                if !want
                    .iter()
                    .any(|(l, v)| *l == s.labels && almost_equal(*v, s.value))
                {
                    ok = false;
                }
            }
            if ok {
                tally.passed += 1;
            } else {
                let got: Vec<String> = got
                    .iter()
                    .map(|s| format!("{} {}", s.labels, s.value))
                    .collect();
                tally
                    .failures
                    .push(fail(format!("got {got:?}, expected {:?}", case.lines)));
            }
        }
        (Ok(Value::Matrix(_)), false) => tally.skipped += 1,
    }
}

fn run_file(path: &PathBuf, tally: &mut Tally) {
    let file = path.file_name().unwrap().to_string_lossy().into_owned();
    let text = std::fs::read_to_string(path).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    let mut store = MemorySeries::new();
    let mut unloadable: HashSet<String> = HashSet::new();
    let mut unloadable_sets: HashSet<Labels> = HashSet::new();
    let mut i = 0;
    let blank = |l: &str| l.trim().is_empty() || l.trim().starts_with('#');
    while i < lines.len() {
        let line = lines[i].trim();
        i += 1;
        if blank(line) {
            continue;
        }
        let mut body = Vec::new();
        let command = |l: &str| {
            let l = l.trim();
            l == "clear" || l.starts_with("load") || l.starts_with("eval")
        };
        while i < lines.len() && !blank(lines[i]) && !command(lines[i]) {
            body.push(lines[i].trim().to_owned());
            i += 1;
        }
        let line_no = i - body.len();
        if let Some(step) = line.strip_prefix("load ") {
            let step = duration_ms(step.trim());
            for l in &body {
                if store.load_line(l, 0, step).is_err() {
                    // Native histograms: remember the series so queries on it are skipped.
                    remember(l, &mut unloadable, &mut unloadable_sets);
                }
            }
        } else if let Some(step) = line.strip_prefix("load_with_nhcb ") {
            // The classic series load as usual; the native histograms made from them cannot.
            let step = duration_ms(step.trim());
            for l in &body {
                if store.load_line(l, 0, step).is_err() {
                    remember(l, &mut unloadable, &mut unloadable_sets);
                }
                let name: String = l
                    .chars()
                    .take_while(|c| *c != '{' && !c.is_whitespace())
                    .collect();
                for suffix in ["_bucket", "_count", "_sum"] {
                    if let Some(base) = name.strip_suffix(suffix) {
                        unloadable.insert(base.to_owned());
                    }
                }
            }
        } else if line == "clear" {
            store.clear();
            unloadable.clear();
            unloadable_sets.clear();
        } else if line.starts_with("eval") {
            let (cmd, rest) = line.split_once(' ').unwrap();
            let Some(rest) = rest.strip_prefix("instant at ") else {
                tally.skipped += 1; // range queries
                continue;
            };
            let (at, expr) = rest.split_once(' ').unwrap();
            let mut case = Case {
                line: line_no,
                at_ms: duration_ms(at),
                expr: expr.trim().to_owned(),
                expect_fail: cmd == "eval_fail",
                lines: Vec::new(),
                skip: false,
            };
            for l in body {
                if let Some(e) = l.strip_prefix("expect ") {
                    if e.starts_with("fail") {
                        case.expect_fail = true;
                    } else if e.starts_with("string") || e.starts_with("range") {
                        case.skip = true;
                    }
                } else if l.contains("{{") {
                    case.skip = true;
                } else {
                    case.lines.push(l);
                }
            }
            // A case expecting a series we could not load cannot be judged.
            if case.lines.iter().any(|l| {
                l.rsplit_once(char::is_whitespace)
                    .and_then(|(sel, _)| parse_labels(sel.trim()).ok())
                    .is_some_and(|ls| unloadable_sets.contains(&without_name(&ls)))
            }) {
                case.skip = true;
            }
            run_case(&store, &case, tally, &file, &unloadable);
        }
    }
}

fn without_name(l: &Labels) -> Labels {
    Labels::new(l.iter().filter(|(k, _)| *k != "__name__"))
}

/// Records a series line we could not load: its name (and, for classic histograms, the name
/// the native form gets) and its labels without the name.
fn remember(line: &str, names: &mut HashSet<String>, sets: &mut HashSet<Labels>) {
    let name: String = line
        .chars()
        .take_while(|c| *c != '{' && !c.is_whitespace())
        .collect();
    for suffix in ["_bucket", "_count", "_sum"] {
        if let Some(base) = name.strip_suffix(suffix) {
            names.insert(base.to_owned());
        }
    }
    if let Some(end) = line.find('}')
        && let Ok(l) = parse_labels(&line[..=end])
    {
        sets.insert(without_name(&l));
    }
    names.insert(name);
}

#[test]
fn prometheus_promql_test_scripts() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared/promql-testdata");
    if !dir.is_dir() {
        eprintln!(
            "NOT RUN: {} is absent; Prometheus's PromQL scripts were not checked",
            dir.display()
        );
        return;
    }
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "test"))
        .collect();
    files.sort();
    let mut total = Tally::default();
    for f in &files {
        let mut t = Tally::default();
        run_file(f, &mut t);
        eprintln!(
            "{}: {} passed, {} failed, {} skipped",
            f.file_name().unwrap().to_string_lossy(),
            t.passed,
            t.failures.len(),
            t.skipped
        );
        total.passed += t.passed;
        total.skipped += t.skipped;
        total.failures.extend(t.failures);
    }
    eprintln!(
        "PromQL scripts: {} passed, {} failed, {} skipped",
        total.passed,
        total.failures.len(),
        total.skipped
    );
    assert!(total.passed > 0, "no case ran");
    assert!(
        total.failures.is_empty(),
        "{} cases differ from Prometheus:\n{}",
        total.failures.len(),
        total.failures.join("\n")
    );
}
