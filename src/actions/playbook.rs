//! Playbooks: named lists of actions, declared in a YAML file (`--playbooks.file`, default
//! `./playbooks.yml`), that the admin API runs on demand through the same gate and audit log
//! as rules. A playbook may include others (`run_full_optimization` runs the rest) and may take
//! its value from a PromQL expression (the input of a knob controller).
//!
//! Owns the file's schema, its located validation and the expansion of includes. Uses its
//! parent's `ActionSpec` and `Mode`, and `yaml`.

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

use super::{ActionSpec, Mode};
use crate::yaml::{self, Seg};

/// The file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileSpec {
    playbooks: BTreeMap<String, PlaybookSpec>,
}

/// One playbook, as written.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct PlaybookSpec {
    /// What it does, for people.
    #[serde(default)]
    pub description: String,
    /// `observe`, `dry_run` or `enforce` (default `enforce`: running a playbook is an
    /// operator's explicit request), capped by `actions.mode`.
    pub mode: Option<Mode>,
    /// Whether its destructive steps may run in enforce.
    #[serde(default)]
    pub allow_destructive: bool,
    /// PromQL whose value the steps see as `{{ $value }}` and a knob controller as its input.
    pub value: Option<String>,
    /// Other playbooks to run first, in order.
    #[serde(default)]
    pub include: Vec<String>,
    /// Its actions, in order.
    #[serde(default)]
    pub steps: Vec<ActionSpec>,
    /// When it also runs on its own, as actor `schedule`.
    pub schedule: Option<ScheduleSpec>,
}

/// A playbook's schedule.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ScheduleSpec {
    /// A cron pattern: five fields (minute hour day-of-month month day-of-week), or six with
    /// seconds first.
    pub cron: String,
    /// The IANA time zone the pattern is read in (default `UTC`).
    #[serde(default = "utc")]
    pub timezone: String,
    /// What a run missed while the process was down becomes at the next start.
    #[serde(default)]
    pub missed: Missed,
    /// The mode of scheduled runs (default: the playbook's), capped by the global mode.
    pub mode: Option<Mode>,
}

fn utc() -> String {
    "UTC".to_owned()
}

/// What becomes of runs missed while the process was down.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Missed {
    /// Recorded as missed; the next run is the next one due.
    #[default]
    Skip,
    /// One run at start, however many were missed.
    RunOnce,
}

impl ScheduleSpec {
    /// The pattern and time zone, parsed.
    pub fn parsed(&self) -> Result<(croner::Cron, chrono_tz::Tz), String> {
        let cron: croner::Cron = self
            .cron
            .parse()
            .map_err(|e| format!("invalid cron pattern {:?}: {e}", self.cron))?;
        let tz: chrono_tz::Tz = self.timezone.parse().map_err(|_| {
            format!(
                "unknown time zone {:?} (an IANA name such as Europe/Berlin)",
                self.timezone
            )
        })?;
        Ok((cron, tz))
    }
}

/// The loaded playbooks.
#[derive(Debug, Clone, Default)]
pub struct Playbooks {
    /// By name.
    pub by_name: BTreeMap<String, PlaybookSpec>,
}

impl Playbooks {
    /// Reads `path`; `must_exist` makes a missing file an error (it was named on the command
    /// line), otherwise a missing file means no playbooks. Errors are `FILE:LINE:COL: message`.
    pub fn load(path: &Path, must_exist: bool) -> Result<Playbooks, Vec<String>> {
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && !must_exist => {
                return Ok(Playbooks::default());
            }
            Err(e) => return Err(vec![format!("{}: {e}", path.display())]),
        };
        Self::parse(&text).map_err(|errs| {
            errs.into_iter()
                .map(|e| format!("{}:{e}", path.display()))
                .collect()
        })
    }

    /// Parses and checks the text of a playbooks file.
    pub fn parse(text: &str) -> Result<Playbooks, Vec<String>> {
        let (spec, loc) = yaml::from_str::<FileSpec>(text)
            .map_err(|d| d.iter().map(ToString::to_string).collect::<Vec<_>>())?;
        let mut errors = Vec::new();
        for (name, p) in &spec.playbooks {
            let at =
                |f: &str| -> Vec<Seg> { vec!["playbooks".into(), name.as_str().into(), f.into()] };
            let plain = !name.is_empty()
                && name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
            if !plain {
                errors.push(
                    loc.error_at(
                        &["playbooks".into(), name.as_str().into()],
                        format!("playbook name {name:?} must be letters, digits, '_' or '-'"),
                    )
                    .to_string(),
                );
            }
            for (i, inc) in p.include.iter().enumerate() {
                let mut path = at("include");
                path.push(i.into());
                if !spec.playbooks.contains_key(inc) {
                    errors.push(
                        loc.error_at(&path, format!("no playbook named {inc:?}"))
                            .to_string(),
                    );
                }
            }
            if p.steps.is_empty() && p.include.is_empty() {
                errors.push(
                    loc.error_at(&at("steps"), "a playbook needs steps or includes")
                        .to_string(),
                );
            }
            if let Some(s) = &p.schedule
                && let Err(e) = s.parsed()
            {
                errors.push(loc.error_at(&at("schedule"), e).to_string());
            }
            if let Some(v) = &p.value
                && let Err(e) = promql_parser::parser::parse(v)
            {
                errors.push(
                    loc.error_at(&at("value"), format!("invalid PromQL: {e}"))
                        .to_string(),
                );
            }
        }
        let books = Playbooks {
            by_name: spec.playbooks,
        };
        for name in books.by_name.keys() {
            if let Err(e) = books.expand(name) {
                errors.push(e);
            }
        }
        if errors.is_empty() {
            Ok(books)
        } else {
            Err(errors)
        }
    }

    /// The playbooks `name` runs, includes first, in order, each once; an include cycle is an
    /// error.
    pub fn expand(&self, name: &str) -> Result<Vec<(String, PlaybookSpec)>, String> {
        fn walk(
            books: &Playbooks,
            name: &str,
            stack: &mut Vec<String>,
            out: &mut Vec<(String, PlaybookSpec)>,
        ) -> Result<(), String> {
            if stack.iter().any(|s| s == name) {
                return Err(format!(
                    "playbook include cycle: {} → {name}",
                    stack.join(" → ")
                ));
            }
            let p = books
                .by_name
                .get(name)
                .ok_or_else(|| format!("no playbook named {name:?}"))?;
            stack.push(name.to_owned());
            for inc in &p.include {
                walk(books, inc, stack, out)?;
            }
            stack.pop();
            if !p.steps.is_empty() && !out.iter().any(|(n, _)| n == name) {
                out.push((name.to_owned(), p.clone()));
            }
            Ok(())
        }
        let mut out = Vec::new();
        walk(self, name, &mut Vec::new(), &mut out)?;
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_shipped_file_loads_and_expands() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        let books = Playbooks::load(&root.join("playbooks.yml"), true).unwrap();
        let names: Vec<String> = books
            .expand("run_full_optimization")
            .unwrap()
            .into_iter()
            .map(|(n, _)| n)
            .collect();
        assert_eq!(
            names,
            [
                "optimize_database",
                "implement_caching",
                "optimize_real_time"
            ]
        );
        // The nightly optimisation is shipped rehearsing, never acting, until enabled.
        let s = books.by_name["optimize_database"].schedule.clone().unwrap();
        assert_eq!(s.cron, "0 3 * * *");
        assert_eq!(s.mode, Some(Mode::DryRun));
        assert!(s.parsed().is_ok());
    }

    #[test]
    fn errors_are_located_and_cycles_refused() {
        let errs = Playbooks::parse(
            "playbooks:\n  a:\n    include: [b]\n  b:\n    include: [a]\n  c:\n    include: [nope]\n  d: {}\n",
        )
        .unwrap_err();
        assert!(
            errs.iter()
                .any(|e| e.starts_with("7:15: no playbook named \"nope\"")),
            "{errs:?}"
        );
        assert!(errs.iter().any(|e| e.contains("include cycle")), "{errs:?}");
        assert!(
            errs.iter().any(|e| e.contains("needs steps or includes")),
            "{errs:?}"
        );
        let errs = Playbooks::parse("playbooks:\n  a:\n    steps:\n      - webhok: {url: x}\n")
            .unwrap_err();
        assert!(errs[0].starts_with("4:9:"), "{errs:?}");
        assert!(
            Playbooks::load(Path::new("/nonexistent/playbooks.yml"), false)
                .unwrap()
                .by_name
                .is_empty()
        );
        assert!(Playbooks::load(Path::new("/nonexistent/playbooks.yml"), true).is_err());
    }
}
