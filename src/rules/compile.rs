//! Rule files → validated rules. Every problem in every file is collected with its file, line and
//! column (YAML shape, PromQL, actions, duplicates, two rules moving one knob), and warnings
//! that do not stop the load (`for` shorter than the group interval) are reported beside them.
//!
//! Uses `file` (what the YAML says), `expr` (PromQL), `state::Timing`, `yaml` for located
//! decoding, and `actions::ActionSpec`.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::expr::Query;
use super::file::{GroupSpec, Mode, OnAbsent, RuleFileSpec, RuleSpec};
use super::state::Timing;
use crate::actions::{ActionSpec, VerifySpec};
use crate::yaml::{self, Diagnostic, Locator, Seg};

/// A group's default interval: the collectors' default, since evaluating more often sees no
/// new data.
pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(5);

/// The largest rule file read: far beyond any real one; a bigger file is refused rather than
/// read into memory.
pub const MAX_FILE_BYTES: u64 = 4 << 20;

/// A validated rule.
#[derive(Debug, Clone)]
pub struct Rule {
    /// Its name, unique in the set.
    pub name: String,
    /// Its group's name.
    pub group: String,
    /// How often it is evaluated.
    pub interval: Duration,
    /// The condition.
    pub expr: Query,
    /// The exit condition, when there is one.
    pub clear: Option<Query>,
    /// `for`, `keep_firing_for`, `repeat`.
    pub timing: Timing,
    /// Labels added to its instances.
    pub labels: BTreeMap<String, String>,
    /// The same, as a label set, built once for every evaluation to merge.
    pub label_set: crate::sample::Labels,
    /// Its annotations.
    pub annotations: BTreeMap<String, String>,
    /// Its own mode, overriding the global one.
    pub mode: Option<Mode>,
    /// How long after acting it does not act again.
    pub cooldown: Duration,
    /// What absent data means.
    pub on_absent: OnAbsent,
    /// Whether destructive actions may run in `enforce`.
    pub allow_destructive: bool,
    /// Its actions.
    pub actions: Vec<ActionSpec>,
    /// Its verification.
    pub verify: Option<VerifySpec>,
    /// The knobs its actions move, each with where its action is written (line, column).
    pub knobs: Vec<(String, usize, usize)>,
    /// The PromQL server that evaluates it (its group's `source`), when not the local history.
    pub remote: Option<String>,
    /// Where it is written, for messages.
    pub source: PathBuf,
    /// Its line in the file.
    pub line: usize,
}

/// One problem, located.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// The file.
    pub file: PathBuf,
    /// Line, column and message.
    pub diagnostic: Diagnostic,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.file.display(), self.diagnostic)
    }
}

/// The outcome of loading a set of files.
#[derive(Debug, Default)]
pub struct Loaded {
    /// The rules, when there was no error.
    pub rules: Vec<Rule>,
    /// Problems that refuse the set.
    pub errors: Vec<Problem>,
    /// Problems worth knowing that do not.
    pub warnings: Vec<Problem>,
}

/// Loads and validates `files` as one set (names must be unique across them).
pub fn load_files(files: &[PathBuf]) -> Loaded {
    let mut loaded = Loaded::default();
    let mut names: HashMap<String, (PathBuf, usize)> = HashMap::new();
    let mut knobs: HashMap<String, String> = HashMap::new();
    for file in files {
        let text = match read(file) {
            Ok(t) => t,
            Err(message) => {
                loaded.errors.push(problem(file, 1, 1, message));
                continue;
            }
        };
        // Validate what decoded even when parts of the file did not, so one pass reports
        // every problem.
        let partial = yaml::from_str_partial::<RuleFileSpec>(&text);
        loaded
            .errors
            .extend(partial.diagnostics.into_iter().map(|d| Problem {
                file: file.clone(),
                diagnostic: d,
            }));
        if let Some(spec) = partial.value {
            let mut c = Compiler {
                file,
                loc: &partial.locator,
                loaded: &mut loaded,
            };
            c.file(spec, &mut names, &mut knobs);
        }
    }
    loaded
        .errors
        .sort_by(|a, b| (&a.file, a.diagnostic.line).cmp(&(&b.file, b.diagnostic.line)));
    if !loaded.errors.is_empty() {
        loaded.rules.clear();
    }
    loaded
}

/// Whether a path names a rule file: `*.yml` or `*.yaml`, not hidden (editors' swap and backup
/// files are hidden or end otherwise).
pub fn is_rule_file(path: &Path) -> bool {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    !name.starts_with('.') && (name.ends_with(".yml") || name.ends_with(".yaml"))
}

/// The rule files of a directory: `*.yml` and `*.yaml`, sorted, hidden and editor backup files
/// left out.
pub fn rule_files(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| is_rule_file(p) && p.is_file())
        .collect();
    files.sort();
    Ok(files)
}

fn read(file: &Path) -> Result<String, String> {
    let meta = std::fs::metadata(file).map_err(|e| format!("reading: {e}"))?;
    if meta.len() > MAX_FILE_BYTES {
        return Err(format!(
            "file is {} bytes, more than the {MAX_FILE_BYTES} a rule file may have",
            meta.len()
        ));
    }
    std::fs::read_to_string(file).map_err(|e| format!("reading: {e}"))
}

fn problem(file: &Path, line: usize, column: usize, message: impl Into<String>) -> Problem {
    Problem {
        file: file.to_owned(),
        diagnostic: Diagnostic {
            line,
            column,
            message: message.into(),
        },
    }
}

struct Compiler<'a> {
    file: &'a Path,
    loc: &'a Locator,
    loaded: &'a mut Loaded,
}

impl Compiler<'_> {
    fn error(&mut self, path: &[Seg], message: impl Into<String>) {
        let d = self.loc.error_at(path, message);
        self.loaded.errors.push(Problem {
            file: self.file.to_owned(),
            diagnostic: d,
        });
    }

    fn warning(&mut self, path: &[Seg], message: impl Into<String>) {
        let d = self.loc.error_at(path, message);
        self.loaded.warnings.push(Problem {
            file: self.file.to_owned(),
            diagnostic: d,
        });
    }

    fn file(
        &mut self,
        spec: RuleFileSpec,
        names: &mut HashMap<String, (PathBuf, usize)>,
        knobs: &mut HashMap<String, String>,
    ) {
        let mut groups: HashMap<String, usize> = HashMap::new();
        for (g, group) in spec.groups.into_iter().enumerate() {
            let gpath: Vec<Seg> = vec!["groups".into(), g.into()];
            let at = |f: &str| -> Vec<Seg> { vec!["groups".into(), g.into(), f.into()] };
            if group.name.trim().is_empty() {
                self.error(&at("name"), "a group needs a name");
            }
            if let Some(first) = groups.insert(group.name.clone(), self.loc.value(&at("name")).line)
            {
                self.error(
                    &at("name"),
                    format!(
                        "group {:?} is defined twice in this file (first at line {first})",
                        group.name
                    ),
                );
            }
            let interval = group.interval.map_or(DEFAULT_INTERVAL, |d| d.0);
            if interval < Duration::from_secs(1) {
                self.error(
                    &at("interval"),
                    "interval must be at least 1s: the engine evaluates at most once a second (leave it out for the default 5s)",
                );
            }
            if let Some(s) = &group.source
                && s.trim().is_empty()
            {
                self.error(
                    &at("source"),
                    "source must name a source of the configuration",
                );
            }
            let GroupSpec {
                name: gname,
                rules,
                source,
                ..
            } = group;
            for (r, rule) in rules.into_iter().enumerate() {
                let mut rpath = gpath.clone();
                rpath.extend(["rules".into(), r.into()]);
                let group = (gname.as_str(), interval, source.as_deref());
                self.rule(rule, group, &rpath, names, knobs);
            }
        }
    }

    fn rule(
        &mut self,
        spec: RuleSpec,
        (group, interval, remote): (&str, Duration, Option<&str>),
        path: &[Seg],
        names: &mut HashMap<String, (PathBuf, usize)>,
        knobs: &mut HashMap<String, String>,
    ) {
        let at = |f: &str| -> Vec<Seg> {
            let mut p = path.to_vec();
            p.push(f.into());
            p
        };
        let line = self.loc.value(path).line;
        let name_ok = !spec.name.is_empty()
            && spec
                .name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-' || c == '.');
        if !name_ok {
            self.error(
                &at("name"),
                format!(
                    "rule name {:?} must be letters, digits, '_', '-' or '.'",
                    spec.name
                ),
            );
        } else if let Some((file, first)) = names.get(&spec.name) {
            let message = format!(
                "rule {:?} is already defined at {}:{first}",
                spec.name,
                file.display()
            );
            self.error(&at("name"), message);
        } else {
            names.insert(spec.name.clone(), (self.file.to_owned(), line));
        }
        let expr = match Query::parse(&spec.expr) {
            Ok(q) => Some(q),
            Err(e) => {
                self.error(&at("expr"), e);
                None
            }
        };
        let clear = match spec.clear.as_deref().map(Query::parse) {
            None => None,
            Some(Ok(q)) => Some(q),
            Some(Err(e)) => {
                self.error(&at("clear"), e);
                None
            }
        };
        if let (Some(e), Some(c)) = (&expr, &clear)
            && let Some(message) = overlap(e, c)
        {
            self.warning(&at("clear"), message);
        }
        if spec.repeat.is_some_and(|d| d.0.is_zero()) {
            self.error(
                &at("repeat"),
                "repeat must be greater than 0: it is how long to wait between requests while firing (leave it out to act only on the firing edge)",
            );
        }
        let hold = spec.for_.map_or(Duration::ZERO, |d| d.0);
        if !hold.is_zero() && hold < interval {
            self.warning(
                &at("for"),
                format!(
                    "`for` ({:?}) is shorter than the group interval ({:?}): the rule fires at its second evaluation at the earliest",
                    hold, interval
                ),
            );
        }
        // A received alert's series disappears when Alertmanager resolves it; with the default
        // `hold`, a rule on it would stay firing forever.
        if let Some(e) = &expr
            && e.metric_names().iter().any(|n| n == "autotuner_alert")
            && spec.on_absent.is_none_or(|o| o != OnAbsent::Clear)
        {
            self.warning(
                &at("expr"),
                "a rule on received alerts (autotuner_alert) needs `on_absent: clear`: the series disappears when the alert resolves",
            );
        }
        let mut moved = Vec::new();
        for (i, action) in spec.actions.iter().enumerate() {
            let mut apath = at("actions");
            apath.push(i.into());
            if let ActionSpec::Knob(k) = action {
                let place = self.loc.value(&apath);
                moved.push((k.name.clone(), place.line, place.column));
                let moves = [
                    k.set.is_some(),
                    k.scale.is_some(),
                    k.step.is_some(),
                    k.controller.is_some(),
                ]
                .iter()
                .filter(|b| **b)
                .count();
                if moves != 1 {
                    self.error(
                        &apath,
                        format!(
                            "knob {:?}: give exactly one of set, scale, step, controller",
                            k.name
                        ),
                    );
                }
                if let Some(c) = &k.controller {
                    let mut cpath = apath.clone();
                    cpath.extend(["knob".into(), "controller".into()]);
                    if let Err(message) = crate::actions::knobs::check_controller(c) {
                        self.error(&cpath, message);
                    }
                    if spec.repeat.is_none() {
                        self.warning(
                            &at("repeat"),
                            "a knob controller acts on every request: without `repeat` it moves the knob once per firing episode",
                        );
                    }
                }
                match knobs.get(&k.name) {
                    Some(owner) if *owner != spec.name => self.error(
                        &apath,
                        format!("knob {:?} is already moved by rule {owner:?}: one knob, one owning rule", k.name),
                    ),
                    _ => {
                        knobs.insert(k.name.clone(), spec.name.clone());
                    }
                }
            }
            if action.is_destructive()
                && spec.mode == Some(Mode::Enforce)
                && !spec.allow_destructive
            {
                self.error(
                    &apath,
                    format!(
                        "`{}` can delete data or disturb clients: a rule in enforce mode needs `allow_destructive: true` to run it",
                        action.kind()
                    ),
                );
            }
        }
        if remote.is_some() {
            // What these would mean depends on the local history, which a remote group does
            // not read: refused rather than given a meaning of our own.
            if spec.verify.is_some() {
                self.error(
                    &at("verify"),
                    "verify is evaluated over the local history; a rule of a group with a `source` cannot have one",
                );
            }
            if spec.on_absent.is_some() {
                self.error(
                    &at("on_absent"),
                    "on_absent does not apply to a group with a `source`: an empty answer is a condition that does not hold, as in Prometheus's rule manager",
                );
            }
        }
        if let Some(v) = &spec.verify {
            for (field, text) in [("expr", Some(&v.expr)), ("worse", v.worse.as_ref())] {
                if let Some(Err(e)) = text.map(|t| Query::parse(t)) {
                    let mut vpath = at("verify");
                    vpath.push(field.into());
                    self.error(&vpath, e);
                }
            }
        }
        if let Some(expr) = expr {
            self.loaded.rules.push(Rule {
                name: spec.name,
                group: group.to_owned(),
                interval,
                expr,
                clear,
                timing: Timing {
                    hold,
                    keep_firing_for: spec.keep_firing_for.map_or(Duration::ZERO, |d| d.0),
                    repeat: spec.repeat.map(|d| d.0),
                },
                label_set: crate::sample::Labels::new(
                    spec.labels.iter().map(|(k, v)| (k.as_str(), v.as_str())),
                ),
                labels: spec.labels,
                annotations: spec.annotations,
                mode: spec.mode,
                cooldown: spec.cooldown.map_or(Duration::ZERO, |d| d.0),
                on_absent: spec.on_absent.unwrap_or(OnAbsent::Hold),
                allow_destructive: spec.allow_destructive,
                actions: spec.actions,
                verify: spec.verify,
                knobs: moved,
                remote: remote.map(str::to_owned),
                source: self.file.to_owned(),
                line,
            });
        }
    }
}

/// The knob actions of `rules` that name a knob `declared` does not hold, located at the
/// action: such an action could only ever fail (the knob has no bounds to move within).
pub fn undeclared_knobs(
    rules: &[Rule],
    declared: &std::collections::BTreeSet<String>,
) -> Vec<Problem> {
    let mut out = Vec::new();
    for r in rules {
        for (name, line, column) in &r.knobs {
            if !declared.contains(name) {
                out.push(problem(
                    &r.source,
                    *line,
                    *column,
                    format!(
                        "rule {:?} moves knob {name:?}, which the configuration does not declare (add it under `knobs:`)",
                        r.name
                    ),
                ));
            }
        }
    }
    out
}

/// The rules of `rules` whose group names a source `declared` does not hold, located at the
/// rule: such a rule could never be evaluated.
pub fn undeclared_sources(
    rules: &[Rule],
    declared: &std::collections::BTreeSet<String>,
) -> Vec<Problem> {
    rules
        .iter()
        .filter_map(|r| {
            let s = r.remote.as_ref()?;
            (!declared.contains(s)).then(|| {
                problem(
                    &r.source,
                    r.line,
                    1,
                    format!(
                        "rule {:?} is evaluated by source {s:?}, which the configuration does not declare (add it under `sources:`)",
                        r.name
                    ),
                )
            })
        })
        .collect()
}

/// For the common threshold form (`m > 0.8` with `clear: m < 0.7`): a `clear` that can hold
/// while `expr` does would resolve a rule whose condition still holds, so it flaps.
fn overlap(expr: &Query, clear: &Query) -> Option<String> {
    let (e_sel, e_lo, e_hi) = expr.threshold()?;
    let (c_sel, c_lo, c_hi) = clear.threshold()?;
    if e_sel != c_sel {
        return None;
    }
    let lo = e_lo.max(c_lo);
    let hi = e_hi.min(c_hi);
    (lo < hi).then(|| {
        format!(
            "`clear` ({}) can hold while `expr` ({}) does: the rule would resolve while its condition still holds; use a threshold on the other side of the condition's",
            clear.text, expr.text
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(files: &[(&str, &str)]) -> (tempfile::TempDir, Loaded) {
        let dir = tempfile::tempdir().unwrap();
        let paths: Vec<PathBuf> = files
            .iter()
            .map(|(n, t)| {
                let p = dir.path().join(n);
                std::fs::write(&p, t).unwrap();
                p
            })
            .collect();
        let loaded = load_files(&paths);
        (dir, loaded)
    }

    #[test]
    fn a_valid_file_compiles() {
        let (_d, l) = load(&[(
            "a.yml",
            "groups:\n  - name: memory\n    interval: 10s\n    rules:\n      - name: HighMemory\n        expr: host_memory_usage_ratio > 0.8\n        for: 30s\n        clear: host_memory_usage_ratio < 0.7\n        cooldown: 5m\n        mode: dry_run\n        actions:\n          - redis_memory_purge: {}\n          - webhook: {url: 'http://127.0.0.1:8000/gc'}\n",
        )]);
        assert!(l.errors.is_empty(), "{:?}", l.errors);
        let r = &l.rules[0];
        assert_eq!(r.name, "HighMemory");
        assert_eq!(r.interval, Duration::from_secs(10));
        assert_eq!(r.timing.hold, Duration::from_secs(30));
        assert!(r.clear.is_some());
        assert_eq!(r.actions.len(), 2);
        assert_eq!(r.actions[1].kind(), "webhook");
        assert_eq!(r.line, 5);
    }

    #[test]
    fn every_problem_in_every_file_is_reported_with_its_place() {
        let (_d, l) = load(&[
            (
                "a.yml",
                "groups:\n  - name: g\n    rules:\n      - name: A\n        expr: rate(x)\n        actions:\n          - knob: {name: batch, scale: 0.5}\n          - webhok: {url: x}\n      - name: B\n        expr: limitk(3, x)\n        fro: 5m\n",
            ),
            (
                "b.yml",
                "groups:\n  - name: g\n    rules:\n      - name: A\n        expr: up == 0\n      - name: C\n        expr: y > 1\n        mode: enforce\n        actions:\n          - knob: {name: batch, step: 10}\n          - redis_evict: {match: 'cache:*', max_keys: 10}\n",
            ),
        ]);
        let text: Vec<String> = l
            .errors
            .iter()
            .map(|p| {
                let f = p.file.file_name().unwrap().to_string_lossy().into_owned();
                format!("{f}:{}", p.diagnostic)
            })
            .collect();
        let all = text.join("\n");
        for want in [
            "a.yml:5:15: invalid PromQL",
            "a.yml:8:13: unknown field `webhok`",
            "a.yml:10:15: aggregation `limitk` is behind a Prometheus feature flag",
            "a.yml:11:9: unknown field `fro`",
            "b.yml:4:15: rule \"A\" is already defined at",
            "b.yml:10:13: knob \"batch\" is already moved by rule \"A\"",
            "b.yml:11:13: `redis_evict` can delete data",
        ] {
            assert!(all.contains(want), "missing {want:?} in:\n{all}");
        }
        assert!(l.rules.is_empty(), "an erroneous set loads nothing");
    }

    #[test]
    fn for_shorter_than_the_interval_is_a_warning() {
        let (_d, l) = load(&[(
            "a.yml",
            "groups:\n  - name: g\n    interval: 30s\n    rules:\n      - name: A\n        expr: x > 1\n        for: 10s\n",
        )]);
        assert!(l.errors.is_empty());
        assert_eq!(l.rules.len(), 1);
        assert!(
            l.warnings[0]
                .diagnostic
                .message
                .contains("shorter than the group interval")
        );
    }

    #[test]
    fn a_clear_overlapping_the_condition_is_a_warning() {
        let (_d, l) = load(&[(
            "a.yml",
            "groups:\n  - name: g\n    rules:\n      - name: A\n        expr: m > 0.8\n        clear: m < 0.9\n      - name: B\n        expr: m > 0.8\n        clear: m < 0.7\n      - name: C\n        expr: m < 0.5\n        clear: 0.4 < m\n",
        )]);
        assert!(l.errors.is_empty());
        let w: Vec<String> = l
            .warnings
            .iter()
            .map(|p| p.diagnostic.to_string())
            .collect();
        assert_eq!(w.len(), 2, "{w:?}");
        assert!(
            w[0].starts_with("6:16: `clear` (m < 0.9) can hold"),
            "{w:?}"
        );
        assert!(
            w[1].starts_with("12:16: `clear` (0.4 < m) can hold"),
            "{w:?}"
        );
    }

    #[test]
    fn zero_durations_are_accepted_where_prometheus_accepts_them() {
        let (_d, l) = load(&[(
            "a.yml",
            "groups:\n  - name: g\n    rules:\n      - name: A\n        expr: x > 1\n        for: 0s\n        keep_firing_for: 0\n        cooldown: 0m\n      - name: B\n        expr: x > 2\n        for: 0\n        keep_firing_for: 0s\n",
        )]);
        assert!(l.errors.is_empty(), "{:?}", l.errors);
        assert_eq!(l.rules.len(), 2);
        for r in &l.rules {
            assert_eq!(r.timing.hold, Duration::ZERO);
            assert_eq!(r.timing.keep_firing_for, Duration::ZERO);
            assert_eq!(r.cooldown, Duration::ZERO);
        }
    }

    #[test]
    fn zero_is_refused_where_it_means_nothing_with_the_reason() {
        let (_d, l) = load(&[(
            "a.yml",
            "groups:\n  - name: g\n    interval: 0s\n    rules:\n      - name: A\n        expr: x > 1\n        repeat: 0s\n      - name: B\n        expr: x > 1\n        for: -1s\n",
        )]);
        let text: Vec<String> = l.errors.iter().map(|p| p.diagnostic.to_string()).collect();
        assert_eq!(text.len(), 3, "{text:?}");
        assert!(
            text[0].starts_with(
                "3:15: interval must be at least 1s: the engine evaluates at most once a second"
            ),
            "{text:?}"
        );
        assert!(
            text[1].starts_with("7:17: repeat must be greater than 0: it is how long to wait"),
            "{text:?}"
        );
        assert!(
            text[2].starts_with("10:14: invalid duration \"-1s\""),
            "{text:?}"
        );
    }

    #[test]
    fn a_huge_file_is_refused_unread() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("huge.yml");
        let f = std::fs::File::create(&p).unwrap();
        f.set_len(MAX_FILE_BYTES + 1).unwrap();
        let l = load_files(&[p]);
        assert!(
            l.errors[0].diagnostic.message.contains("more than the"),
            "{:?}",
            l.errors
        );
    }
}
