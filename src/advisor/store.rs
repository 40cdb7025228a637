//! The latest advice of every target, merged by advice id across runs (first seen, last seen,
//! times seen), for `GET /api/v1/recommendations` and for `/metrics`
//! (`autotuner_index_advice_saving_ratio{target,table,columns}`).
//!
//! Shared behind an `Arc`: the actions stage writes after each run, the HTTP handlers read.
//! Uses `sample` (families) and `registry` (publishing them).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Mutex, MutexGuard, PoisonError};

use serde::Serialize;

use super::{Advice, Report, Verdict};
use crate::registry::Registry;
use crate::sample::{Families, Family};

/// The name the advice is published under in the registry (its "collector").
pub const REGISTRY_NAME: &str = "index_advice";

/// Most recommendations kept: the least recently seen go first beyond it, so a database with
/// endless distinct statements cannot grow the store (or the series) without bound.
const DEFAULT_LIMIT: usize = 500;

/// Where a recommendation stands.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum Status {
    /// Advised, not acted on.
    Open,
    /// The index was built by us.
    Created {
        /// Its name.
        index: String,
        /// When, in milliseconds since the Unix epoch.
        at_ms: i64,
    },
}

/// One piece of advice of one target, as kept across runs.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Recommendation {
    /// The PostgreSQL target.
    pub target: String,
    /// Its database.
    pub database: String,
    /// The latest advice of this id.
    #[serde(flatten)]
    pub advice: Advice,
    /// When first advised, in milliseconds since the Unix epoch.
    pub first_seen_ms: i64,
    /// When last advised.
    pub last_seen_ms: i64,
    /// How many runs advised it.
    pub times_seen: u64,
    /// Open or acted on.
    #[serde(flatten)]
    pub status: Status,
}

/// The store.
#[derive(Debug)]
pub struct Recommendations {
    inner: Mutex<BTreeMap<(String, String), Recommendation>>,
    limit: usize,
}

impl Default for Recommendations {
    fn default() -> Self {
        Recommendations::new()
    }
}

impl Recommendations {
    /// An empty store.
    pub fn new() -> Self {
        Recommendations::with_limit(DEFAULT_LIMIT)
    }

    /// An empty store keeping at most `limit` recommendations.
    pub fn with_limit(limit: usize) -> Self {
        Recommendations {
            inner: Mutex::new(BTreeMap::new()),
            limit: limit.max(1),
        }
    }

    fn lock(&self) -> MutexGuard<'_, BTreeMap<(String, String), Recommendation>> {
        // A panic elsewhere while holding the lock cannot leave a half-written entry (each
        // update is a single insert), so the data stays usable.
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Merges a run's report for `target`: new advice is added, repeated advice updated and
    /// counted. Advice of this target whose statements were all examined in this run without
    /// advising it again is removed: the situation changed (an index appeared, the plan moved).
    pub fn merge(&self, target: &str, report: &Report, now_ms: i64) {
        let mut map = self.lock();
        for advice in &report.advice {
            let key = (target.to_owned(), advice.id.clone());
            match map.get_mut(&key) {
                Some(r) => {
                    r.advice = advice.clone();
                    r.database = report.database.clone();
                    r.last_seen_ms = now_ms;
                    r.times_seen += 1;
                }
                None => {
                    map.insert(
                        key,
                        Recommendation {
                            target: target.to_owned(),
                            database: report.database.clone(),
                            advice: advice.clone(),
                            first_seen_ms: now_ms,
                            last_seen_ms: now_ms,
                            times_seen: 1,
                            status: Status::Open,
                        },
                    );
                }
            }
        }
        let advised: BTreeSet<&str> = report.advice.iter().map(|a| a.id.as_str()).collect();
        let examined: BTreeSet<i64> = report
            .examined
            .iter()
            .filter(|e| {
                !matches!(
                    e.verdict,
                    Verdict::Unexplainable | Verdict::NotPlanned { .. }
                )
            })
            .map(|e| e.queryid)
            .collect();
        map.retain(|(t, id), r| {
            t != target
                || r.database != report.database
                || advised.contains(id.as_str())
                || !matches!(r.status, Status::Open)
                || !r
                    .advice
                    .statements
                    .iter()
                    .all(|s| examined.contains(&s.queryid))
        });
        while map.len() > self.limit {
            let Some(oldest) = map
                .iter()
                .min_by_key(|(_, r)| r.last_seen_ms)
                .map(|(k, _)| k.clone())
            else {
                break;
            };
            map.remove(&oldest);
        }
    }

    /// Records that the index of advice `id` was built.
    pub fn mark_created(&self, target: &str, id: &str, index: &str, now_ms: i64) {
        if let Some(r) = self.lock().get_mut(&(target.to_owned(), id.to_owned())) {
            r.status = Status::Created {
                index: index.to_owned(),
                at_ms: now_ms,
            };
        }
    }

    /// Every recommendation, by target then saving (largest first).
    pub fn list(&self) -> Vec<Recommendation> {
        let mut v: Vec<Recommendation> = self.lock().values().cloned().collect();
        v.sort_by(|a, b| {
            a.target.cmp(&b.target).then(
                b.advice
                    .saving_ratio
                    .unwrap_or(0.0)
                    .total_cmp(&a.advice.saving_ratio.unwrap_or(0.0)),
            )
        });
        v
    }

    /// The open, verified advice as `autotuner_index_advice_saving_ratio{target,table,columns}`
    /// (unverified advice has no measured saving, so no sample).
    pub fn families(&self) -> Vec<Family> {
        let mut f = Families::new();
        for r in self.lock().values() {
            if !matches!(r.status, Status::Open) {
                continue;
            }
            let Some(ratio) = r.advice.saving_ratio else {
                continue;
            };
            let table = r.advice.index.table_name();
            let columns = r.advice.index.columns.join(",");
            f.gauge(
                "autotuner_index_advice_saving_ratio",
                "Share of the plan cost of the statements it helps that an advised index saves, proven with a hypothetical index.",
                &[
                    ("target", r.target.as_str()),
                    ("table", table.as_str()),
                    ("columns", columns.as_str()),
                ],
                ratio,
            );
        }
        f.into_vec()
    }

    /// Publishes `families()` in the registry (as `index_advice`), replacing the previous.
    pub fn publish(&self, registry: &Registry, now_ms: i64) {
        registry.publish(REGISTRY_NAME, self.families(), now_ms);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::advisor::{Examined, HelpedStatement, IndexTarget};

    fn report(advice: &[(&str, f64, i64)], examined: &[i64]) -> Report {
        Report {
            database: "db".into(),
            server_version_num: 150000,
            hypopg: true,
            windowed: false,
            advice: advice
                .iter()
                .map(|(col, saving, q)| {
                    let index = IndexTarget {
                        schema: "public".into(),
                        table: "t".into(),
                        columns: vec![(*col).to_owned()],
                    };
                    Advice {
                        id: index.id(),
                        definition: index.definition(),
                        index,
                        before_cost: 100.0,
                        after_cost: Some(100.0 * (1.0 - saving)),
                        saving_ratio: Some(*saving),
                        estimated_size_bytes: Some(8192),
                        statements: vec![HelpedStatement {
                            queryid: *q,
                            query: "SELECT".into(),
                            calls: 1.0,
                            mean_seconds: 1.0,
                            before_cost: 100.0,
                            after_cost: Some(1.0),
                        }],
                        verified: true,
                    }
                })
                .collect(),
            examined: examined
                .iter()
                .map(|q| Examined {
                    queryid: *q,
                    query: String::new(),
                    calls: 1.0,
                    mean_seconds: 1.0,
                    plan_cost: Some(100.0),
                    verdict: Verdict::NoCandidate,
                    trials: Vec::new(),
                })
                .collect(),
            unexplainable: Vec::new(),
        }
    }

    #[test]
    fn repeats_merge_and_vanished_advice_goes() {
        let s = Recommendations::new();
        s.merge(
            "main",
            &report(&[("a", 0.9, 1), ("b", 0.6, 2)], &[1, 2]),
            1000,
        );
        s.merge("main", &report(&[("a", 0.95, 1)], &[1, 3]), 2000);
        let l = s.list();
        // "b" stays: its statement was not examined this time (not slow in this window).
        assert_eq!(l.len(), 2);
        let a = &l[0];
        assert_eq!(a.advice.index.columns, vec!["a"]);
        assert_eq!(
            (a.first_seen_ms, a.last_seen_ms, a.times_seen),
            (1000, 2000, 2)
        );
        assert_eq!(a.advice.saving_ratio, Some(0.95));
        // Statement 2 examined again without advice: "b" is gone.
        s.merge("main", &report(&[("a", 0.95, 1)], &[1, 2]), 3000);
        assert_eq!(s.list().len(), 1);
        // Another target's advice is its own.
        s.merge("other", &report(&[("a", 0.5, 1)], &[1]), 3000);
        assert_eq!(s.list().len(), 2);
    }

    #[test]
    fn families_show_open_verified_advice() {
        let s = Recommendations::new();
        s.merge(
            "main",
            &report(&[("a", 0.9, 1), ("b", 0.6, 2)], &[1, 2]),
            1000,
        );
        let id = s.list()[1].advice.id.clone();
        s.mark_created("main", &id, "t_b_autotuner_idx", 2000);
        let f = s.families();
        assert_eq!(f.len(), 1);
        assert_eq!(f[0].name, "autotuner_index_advice_saving_ratio");
        assert_eq!(f[0].samples.len(), 1);
        let l = &f[0].samples[0].labels;
        assert_eq!(l.get("table"), Some("public.t"));
        assert_eq!(l.get("columns"), Some("a"));
        assert_eq!(l.get("target"), Some("main"));
        assert_eq!(f[0].samples[0].value, 0.9);
    }

    #[test]
    fn the_store_is_bounded() {
        let s = Recommendations::with_limit(2);
        s.merge("main", &report(&[("a", 0.9, 1)], &[1]), 1);
        s.merge("main", &report(&[("b", 0.9, 2)], &[2]), 2);
        s.merge("main", &report(&[("c", 0.9, 3)], &[3]), 3);
        let cols: Vec<String> = s
            .list()
            .iter()
            .map(|r| r.advice.index.columns.join(","))
            .collect();
        assert_eq!(cols.len(), 2);
        assert!(!cols.contains(&"a".to_owned()));
    }
}
