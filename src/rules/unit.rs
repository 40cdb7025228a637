//! Rule unit tests in promtool's own test-file format (`rule_files`, `evaluation_interval`,
//! `tests` with `input_series` in the expanding notation, `promql_expr_test`, `alert_rule_test`),
//! extended with `action_test`: the action requests a rule makes at a given time, the
//! decisions the actions stage's gate would make for them, and the values of the knobs they
//! move (declared in a top-level `knobs:`). A file of
//! `promql_expr_test` cases (with `rule_files: []`) runs under `promtool test rules` too, which
//! is how the evaluator is checked against the real Prometheus.
//!
//! Uses `compile` (the rules under test), `expr` (evaluation over `MemorySeries`), `engine`
//! (the same per-rule evaluation the running engine does) and `yaml`.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::compile::{self, Rule};
use super::engine::{self, Runtime};
use super::expr::memory::{MemorySeries, parse_labels};
use super::expr::{Evaluator, NAME, Query, Value};
use super::state::State;
use crate::actions::knobs::KnobConfig;
use crate::actions::simulate::Simulator;
use crate::sample::{Labels, template};
use crate::yaml;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TestFile {
    #[serde(default)]
    rule_files: Vec<String>,
    evaluation_interval: Option<String>,
    /// Accepted for promtool compatibility; groups are evaluated in file order.
    #[serde(default)]
    #[allow(dead_code)]
    group_eval_order: Vec<String>,
    /// Knobs the rules move, as the configuration would declare them (our extension).
    #[serde(default)]
    knobs: BTreeMap<String, TestKnob>,
    tests: Vec<TestGroup>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TestKnob {
    initial: f64,
    min: f64,
    max: f64,
    #[serde(default = "yes")]
    integer: bool,
}

fn yes() -> bool {
    true
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TestGroup {
    name: Option<String>,
    interval: Option<String>,
    #[serde(default)]
    input_series: Vec<InputSeries>,
    #[serde(default)]
    promql_expr_test: Vec<ExprTest>,
    #[serde(default)]
    alert_rule_test: Vec<AlertTest>,
    #[serde(default)]
    action_test: Vec<ActionTest>,
    /// Accepted for promtool compatibility; not used by our rules.
    #[serde(default)]
    #[allow(dead_code)]
    external_labels: BTreeMap<String, String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct InputSeries {
    series: String,
    values: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ExprTest {
    expr: String,
    eval_time: String,
    #[serde(default)]
    exp_samples: Vec<ExpSample>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ExpSample {
    labels: String,
    value: f64,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct AlertTest {
    eval_time: String,
    alertname: String,
    #[serde(default)]
    exp_alerts: Vec<ExpAlert>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ExpAlert {
    #[serde(default)]
    exp_labels: BTreeMap<String, String>,
    #[serde(default)]
    exp_annotations: BTreeMap<String, String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ActionTest {
    eval_time: String,
    rule: String,
    #[serde(default)]
    exp_requests: Vec<ExpRequest>,
    /// Knob values after the evaluation at `eval_time`.
    #[serde(default)]
    exp_knobs: BTreeMap<String, f64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ExpRequest {
    #[serde(default)]
    labels: BTreeMap<String, String>,
    #[serde(default)]
    actions: Vec<String>,
    /// The gate's decision for each action, in order (`applied`, `would_apply`,
    /// `skipped_cooldown`, `unchanged`, …); left out, decisions are not checked.
    decisions: Option<Vec<String>>,
}

/// A duration that may be zero (`0`, `0s`, `5m`, `1h30m`), in milliseconds.
fn time_ms(text: &str) -> Result<i64, String> {
    let t = text.trim();
    if t.trim_start_matches('0')
        .trim_end_matches(|c: char| c.is_ascii_alphabetic())
        .is_empty()
    {
        return Ok(0);
    }
    crate::settings::HumanDuration::parse(t)
        .map(|d| i64::try_from(d.0.as_millis()).unwrap_or(i64::MAX))
}

/// Runs the unit tests in `file`; returns every failure (empty: all passed).
pub fn run_file(file: &Path) -> Vec<String> {
    let text = match std::fs::read_to_string(file) {
        Ok(t) => t,
        Err(e) => return vec![format!("{}: reading: {e}", file.display())],
    };
    let spec: TestFile = match yaml::from_str(&text) {
        Ok((s, _)) => s,
        Err(diags) => {
            return diags
                .iter()
                .map(|d| format!("{}:{d}", file.display()))
                .collect();
        }
    };
    let base = file.parent().unwrap_or(Path::new("."));
    let rule_files: Vec<PathBuf> = spec.rule_files.iter().map(|f| base.join(f)).collect();
    let loaded = compile::load_files(&rule_files);
    if !loaded.errors.is_empty() {
        return loaded.errors.iter().map(ToString::to_string).collect();
    }
    let default_interval = match spec.evaluation_interval.as_deref().map(time_ms).transpose() {
        Ok(v) => v.unwrap_or(60_000).max(1),
        Err(e) => return vec![format!("{}: evaluation_interval: {e}", file.display())],
    };
    let mut failures = Vec::new();
    for (i, group) in spec.tests.iter().enumerate() {
        let name = group.name.clone().unwrap_or_else(|| format!("tests[{i}]"));
        let knobs = spec
            .knobs
            .iter()
            .map(|(n, k)| KnobConfig {
                name: n.clone(),
                initial: k.initial,
                min: k.min,
                max: k.max,
                integer: k.integer,
                redis_key: None,
                redis_target: None,
                webhook: None,
            })
            .collect();
        let ctx = Ctx {
            rules: &loaded.rules,
            knobs,
            eval_interval: default_interval,
            name: &name,
        };
        if let Err(e) = run_group(group, &ctx, &mut failures) {
            failures.push(format!("{name}: {e}"));
        }
    }
    failures
}

/// What a test group runs against.
struct Ctx<'a> {
    rules: &'a [Rule],
    knobs: Vec<KnobConfig>,
    eval_interval: i64,
    name: &'a str,
}

fn run_group(group: &TestGroup, ctx: &Ctx<'_>, failures: &mut Vec<String>) -> Result<(), String> {
    let (rules, eval_interval, name) = (ctx.rules, ctx.eval_interval, ctx.name);
    let step = group
        .interval
        .as_deref()
        .map(time_ms)
        .transpose()?
        .unwrap_or(eval_interval)
        .max(1);
    let mut series = MemorySeries::new();
    for s in &group.input_series {
        series.load_line(&format!("{} {}", s.series, s.values), 0, step)?;
    }

    for t in &group.promql_expr_test {
        let at = time_ms(&t.eval_time)?;
        let query = Query::parse(&t.expr).map_err(|e| format!("{}: {e}", t.expr))?;
        let got: Vec<(Labels, f64)> = match Evaluator::new(&series, at).eval(&query)? {
            Value::Scalar(v) => vec![(Labels::empty(), v)],
            Value::Vector(v) => v.into_iter().map(|s| (s.labels, s.value)).collect(),
            Value::Matrix(_) | Value::String(_) => {
                return Err(format!("{}: not an instant vector or a scalar", t.expr));
            }
        };
        let mut want = Vec::new();
        for e in &t.exp_samples {
            let labels = if e.labels.trim() == "{}" {
                Labels::empty()
            } else {
                parse_labels(&e.labels)?
            };
            want.push((labels, e.value));
        }
        let same = got.len() == want.len()
            && want
                .iter()
                .all(|(l, v)| got.iter().any(|(gl, gv)| gl == l && close(*gv, *v)));
        if !same {
            failures.push(format!(
                "{name}: expr {:?} at {}: expected {}, got {}",
                t.expr,
                t.eval_time,
                show(&want),
                show(&got)
            ));
        }
    }

    // Alert and action tests: evaluate every rule at every interval up to the last time asked.
    let times: Vec<i64> = group
        .alert_rule_test
        .iter()
        .map(|a| time_ms(&a.eval_time))
        .chain(group.action_test.iter().map(|a| time_ms(&a.eval_time)))
        .collect::<Result<_, _>>()?;
    let Some(&last) = times.iter().max() else {
        return Ok(());
    };
    let mut runtimes: BTreeMap<&str, Runtime> = BTreeMap::new();
    let mut states_at: BTreeMap<i64, BTreeMap<String, Vec<Seen>>> = BTreeMap::new();
    let mut requests_at: BTreeMap<(i64, String), Vec<Requested>> = BTreeMap::new();
    let mut knobs_at: BTreeMap<i64, BTreeMap<String, f64>> = BTreeMap::new();
    let mut sim = Simulator::new(ctx.knobs.clone());
    let mut t = 0;
    while t <= last {
        for rule in rules {
            let rt = runtimes.entry(rule.name.as_str()).or_default();
            let memo = crate::rules::expr::Memo::new(t);
            let requests = engine::evaluate(&series, Some(&memo), rule, rt, t)
                .map_err(|e| format!("rule {} at {}ms: {e}", rule.name, t))?;
            for r in requests {
                let decisions = sim.request(&r);
                if r.event == crate::actions::Event::Resolved {
                    continue;
                }
                let kinds = r.actions.iter().map(|a| a.kind().to_owned()).collect();
                requests_at
                    .entry((t, rule.name.clone()))
                    .or_default()
                    .push((r.labels, kinds, decisions));
            }
            let snapshot = rt
                .instances
                .iter()
                .map(|(l, (s, v))| (l.clone(), *s, *v))
                .collect();
            states_at
                .entry(t)
                .or_default()
                .insert(rule.name.clone(), snapshot);
        }
        knobs_at.insert(
            t,
            ctx.knobs
                .iter()
                .filter_map(|k| Some((k.name.clone(), sim.knob(&k.name)?)))
                .collect(),
        );
        t += eval_interval;
    }

    for a in &group.alert_rule_test {
        let at = time_ms(&a.eval_time)?;
        let rule = rules
            .iter()
            .find(|r| r.name == a.alertname)
            .ok_or_else(|| format!("no rule named {:?}", a.alertname))?;
        // The latest evaluation at or before the time asked.
        let firing: Vec<(BTreeMap<String, String>, BTreeMap<String, String>)> = states_at
            .range(..=at)
            .next_back()
            .and_then(|(_, m)| m.get(&a.alertname))
            .map(|instances| {
                instances
                    .iter()
                    .filter(|(_, s, _)| matches!(s, State::Firing { .. }))
                    .map(|(l, _, v)| {
                        let mut labels: BTreeMap<String, String> = l
                            .iter()
                            .map(|(k, v)| (k.to_owned(), v.to_owned()))
                            .collect();
                        let annotations = rule
                            .annotations
                            .iter()
                            .map(|(k, t)| (k.clone(), template(t, &labels, *v)))
                            .collect();
                        labels.insert("alertname".into(), a.alertname.clone());
                        (labels, annotations)
                    })
                    .collect()
            })
            .unwrap_or_default();
        let want: BTreeSet<_> = a
            .exp_alerts
            .iter()
            .map(|e| (e.exp_labels.clone(), e.exp_annotations.clone()))
            .collect();
        let got: BTreeSet<_> = firing.into_iter().collect();
        if want != got {
            failures.push(format!(
                "{name}: alertname {:?} at {}: expected {want:?}, got {got:?}",
                a.alertname, a.eval_time
            ));
        }
    }

    for a in &group.action_test {
        let at = time_ms(&a.eval_time)?;
        let label_map = |l: &Labels| -> BTreeMap<String, String> {
            l.iter()
                .map(|(a, b)| (a.to_owned(), b.to_owned()))
                .collect()
        };
        let made = requests_at
            .get(&(at, a.rule.clone()))
            .cloned()
            .unwrap_or_default();
        // Decisions are compared only where the test states them.
        let got: BTreeSet<Stated> =
            made.iter()
                .map(|(l, k, d)| {
                    let with = a.exp_requests.iter().any(|e| {
                        e.labels == label_map(l) && e.actions == *k && e.decisions.is_some()
                    });
                    (label_map(l), k.clone(), with.then(|| d.clone()))
                })
                .collect();
        let want: BTreeSet<_> = a
            .exp_requests
            .iter()
            .map(|e| (e.labels.clone(), e.actions.clone(), e.decisions.clone()))
            .collect();
        if want != got {
            failures.push(format!(
                "{name}: rule {:?} at {}: expected requests {want:?}, got {got:?}",
                a.rule, a.eval_time
            ));
        }
        if !a.exp_knobs.is_empty() {
            let now = knobs_at
                .range(..=at)
                .next_back()
                .map(|(_, k)| k.clone())
                .unwrap_or_default();
            for (k, want) in &a.exp_knobs {
                let got = now.get(k).copied();
                if got.is_none_or(|g| !close(g, *want)) {
                    failures.push(format!(
                        "{name}: knob {k:?} at {}: expected {want}, got {got:?}",
                        a.eval_time
                    ));
                }
            }
        }
    }
    Ok(())
}

/// An instance seen at one evaluation: labels, state, value.
type Seen = (Labels, State, f64);

/// A request as an `action_test` states it: labels, action kinds, decisions if stated.
type Stated = (BTreeMap<String, String>, Vec<String>, Option<Vec<String>>);

/// A request made at one evaluation: labels, action kinds, and the simulated decisions.
type Requested = (Labels, Vec<String>, Vec<String>);

fn close(a: f64, b: f64) -> bool {
    a == b || (a.is_nan() && b.is_nan()) || (a - b).abs() <= 1e-9 * a.abs().max(b.abs())
}

fn show(v: &[(Labels, f64)]) -> String {
    let items: Vec<String> = v
        .iter()
        .map(|(l, x)| {
            let name = l.get(NAME).unwrap_or("");
            let rest = Labels::new(l.iter().filter(|(k, _)| *k != NAME));
            format!("{name}{rest} {x}")
        })
        .collect();
    format!("[{}]", items.join(", "))
}
