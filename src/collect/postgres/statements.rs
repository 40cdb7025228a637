//! `pg_stat_statements`: the calls-weighted mean latency over the window, how many statements
//! are slow over the window, and the top statements by total time with postgres_exporter's
//! counter names. Our own statements (marked with `/* autotuner */`) are left out.
//!
//! The window is kept as a few whole snapshots of the view (one every quarter window), not a
//! reading per collection: a busy server has thousands of statements, and the figures only
//! need a baseline about one window old. Each figure therefore covers from the newest snapshot
//! at least a window old up to now: the window, plus at most a quarter of it and one interval
//! (and less than the window only in the first window after start).

use std::collections::{HashMap, HashSet, VecDeque};
use std::time::{Duration, Instant};

use super::{MARK, Run, labels_with};
use crate::settings::PostgresConfig;

/// A statement: database, user and normalized query.
pub type Key = (i64, i64, i64);

/// Cumulative calls and seconds of one statement.
#[derive(Debug, Clone, Copy, Default)]
pub struct Totals {
    /// Times executed.
    pub calls: f64,
    /// Seconds spent executing.
    pub seconds: f64,
}

/// What the collector remembers between runs.
pub struct State {
    window: Duration,
    snapshots: VecDeque<(Instant, HashMap<Key, Totals>)>,
    /// Statements seen so far, to notice new ones.
    known: HashSet<Key>,
    /// Our own statements.
    ours: HashSet<Key>,
}

impl State {
    /// Empty, for a window of `window`.
    pub fn new(window: Duration) -> Self {
        State {
            window,
            snapshots: VecDeque::new(),
            known: HashSet::new(),
            ours: HashSet::new(),
        }
    }

    /// Records the current totals and returns, over the window, the calls-weighted mean latency
    /// (if there were calls) and the number of statements whose mean exceeded `slow`; `None`
    /// until there is a baseline.
    pub fn advance(
        &mut self,
        now: Instant,
        current: HashMap<Key, Totals>,
        slow: Duration,
    ) -> Option<(Option<f64>, usize)> {
        // The baseline is the newest snapshot at least a window old (or the oldest there is,
        // early on): drop the ones before it.
        while self
            .snapshots
            .get(1)
            .is_some_and(|(t, _)| now.duration_since(*t) >= self.window)
        {
            self.snapshots.pop_front();
        }
        let figures = self.snapshots.front().map(|(_, base)| {
            let (mut calls, mut seconds, mut slow_count) = (0.0, 0.0, 0);
            for (key, now) in &current {
                let before = base.get(key).copied().unwrap_or_default();
                // Fewer calls than before: the statement was evicted and came back, or the
                // statistics were reset. Count it from zero.
                let before = if now.calls < before.calls {
                    Totals::default()
                } else {
                    before
                };
                let dc = now.calls - before.calls;
                let ds = now.seconds - before.seconds;
                if dc <= 0.0 {
                    continue;
                }
                calls += dc;
                seconds += ds;
                if ds / dc > slow.as_secs_f64() {
                    slow_count += 1;
                }
            }
            ((calls > 0.0).then(|| seconds / calls), slow_count)
        });
        let due = self
            .snapshots
            .back()
            .is_none_or(|(t, _)| now.duration_since(*t) >= self.window / 4);
        if due {
            self.snapshots.push_back((now, current));
        }
        figures
    }
}

/// Returns whether pg_stat_statements is installed in the target's database.
pub(super) async fn collect(
    run: &mut Run<'_>,
    state: &mut State,
    config: &PostgresConfig,
) -> Result<bool, tokio_postgres::Error> {
    let labels = run.labels;
    let installed = run
        .query(
            &format!(
                "{MARK} SELECT count(*) FROM pg_extension WHERE extname = 'pg_stat_statements'"
            ),
            &[],
        )
        .await?
        .first()
        .is_some_and(|r| r.get::<_, i64>(0) > 0);
    run.out.gauge(
        "pg_stat_statements_available",
        "1 when the pg_stat_statements extension is installed in the target database.",
        &labels,
        if installed { 1.0 } else { 0.0 },
    );
    if !installed {
        return Ok(false);
    }
    let rows = run
        .query(
            &format!(
                "{MARK} SELECT s.dbid::int8, s.userid::int8, s.queryid, COALESCE(d.datname::text, ''), \
                 COALESCE(r.rolname::text, ''), sum(s.calls)::float8, (sum(s.total_exec_time) / 1000)::float8, \
                 sum(s.rows)::float8 \
                 FROM pg_stat_statements(false) s \
                 LEFT JOIN pg_database d ON d.oid = s.dbid LEFT JOIN pg_roles r ON r.oid = s.userid \
                 WHERE s.queryid IS NOT NULL GROUP BY 1, 2, 3, 4, 5"
            ),
            &[],
        )
        .await?;
    let now = Instant::now();
    let keys: Vec<Key> = rows
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    if keys.iter().any(|k| !state.known.contains(k)) {
        // Marked as known first: if reading the texts fails (times out on a server with
        // thousands of statements), the next run does not try again at once.
        state.known = keys.iter().copied().collect();
        // New statements appeared: find out which are ours. Reading the query texts is the
        // expensive part of the view, so it happens only then.
        let ours = run
            .query(
                &format!(
                    "{MARK} SELECT DISTINCT dbid::int8, userid::int8, queryid FROM pg_stat_statements(true) \
                     WHERE queryid IS NOT NULL AND query LIKE '/* autotuner */%'"
                ),
                &[],
            )
            .await?;
        state.ours = ours
            .iter()
            .map(|r| (r.get(0), r.get(1), r.get(2)))
            .collect();
        state.known = keys.iter().copied().collect();
    }
    let mut current = HashMap::with_capacity(rows.len());
    let mut top: Vec<&tokio_postgres::Row> = Vec::with_capacity(rows.len());
    for (row, key) in rows.iter().zip(&keys) {
        if state.ours.contains(key) {
            continue;
        }
        current.insert(
            *key,
            Totals {
                calls: row.get(5),
                seconds: row.get(6),
            },
        );
        top.push(row);
    }
    run.out.gauge(
        "pg_slow_query_threshold_seconds",
        "A statement whose mean latency over the window exceeds this counts as slow.",
        &labels,
        config.slow_query_threshold.as_secs_f64(),
    );
    if let Some((mean, slow)) = state.advance(now, current, config.slow_query_threshold) {
        if let Some(mean) = mean {
            run.out.gauge(
                "pg_query_mean_latency_seconds",
                "Mean execution time of the statements run over the window, weighted by calls; absent when none ran.",
                &labels,
                mean,
            );
        }
        run.out.gauge(
            "pg_slow_queries",
            "Statements whose mean execution time over the window exceeds the slow query threshold.",
            &labels,
            slow as f64,
        );
    }

    top.sort_by(|a, b| b.get::<_, f64>(6).total_cmp(&a.get::<_, f64>(6)));
    top.truncate(config.statements_limit);
    let mut texts: HashMap<Key, String> = HashMap::new();
    if config.include_query_text && !top.is_empty() {
        let ids: Vec<i64> = top.iter().map(|r| r.get(2)).collect();
        let length = i32::try_from(config.query_text_length).unwrap_or(i32::MAX);
        for r in run
            .query(
                &format!(
                    "{MARK} SELECT DISTINCT ON (dbid, userid, queryid) dbid::int8, userid::int8, queryid, left(query, $1) \
                     FROM pg_stat_statements(true) WHERE queryid = ANY($2)"
                ),
                &[&length, &ids],
            )
            .await?
        {
            let text: String = r.get(3);
            if let Some(text) = publishable(&text) {
                texts.insert((r.get(0), r.get(1), r.get(2)), text);
            }
        }
    }
    for row in top {
        let queryid = row.get::<_, i64>(2).to_string();
        let key: Key = (row.get(0), row.get(1), row.get(2));
        let l = labels_with(
            run.labels,
            &[
                ("datname", row.get(3)),
                ("user", row.get(4)),
                ("queryid", &queryid),
            ],
        );
        run.out.counter(
            "pg_stat_statements_calls_total",
            "Times the statement was executed.",
            &l,
            row.get(5),
        );
        run.out.counter(
            "pg_stat_statements_seconds_total",
            "Time spent executing the statement.",
            &l,
            row.get(6),
        );
        run.out.counter(
            "pg_stat_statements_rows_total",
            "Rows retrieved or affected by the statement.",
            &l,
            row.get(7),
        );
        if let Some(text) = texts.get(&key) {
            let mut l = l.clone();
            l.push(("query", text));
            run.out.gauge(
                "pg_stat_statements_query_info",
                "Constant 1, labelled with the statement's normalized text (truncated).",
                &l,
                1.0,
            );
        }
    }
    Ok(true)
}

/// The text of a statement as it may be published, or `None`. Only ordinary queries qualify:
/// `pg_stat_statements` keeps utility statements such as `ALTER ROLE … PASSWORD '…'` with their
/// literals, and a label is no place for a password. Anything that still mentions one is
/// withheld too.
pub fn publishable(text: &str) -> Option<String> {
    let text = text.split_whitespace().collect::<Vec<_>>().join(" ");
    let head = text
        .trim_start_matches(|c: char| c == '(' || c.is_whitespace())
        .split(|c: char| !c.is_ascii_alphabetic())
        .next()
        .unwrap_or("")
        .to_ascii_uppercase();
    let ordinary = [
        "SELECT", "INSERT", "UPDATE", "DELETE", "WITH", "MERGE", "VALUES", "TABLE",
    ];
    let lower = text.to_ascii_lowercase();
    (ordinary.contains(&head.as_str()) && !lower.contains("password")).then_some(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn totals(v: &[(i64, f64, f64)]) -> HashMap<Key, Totals> {
        v.iter()
            .map(|&(q, calls, seconds)| ((1, 1, q), Totals { calls, seconds }))
            .collect()
    }

    #[test]
    fn only_ordinary_query_text_is_published() {
        assert_eq!(
            publishable("SELECT  *\n FROM t WHERE id = $1").as_deref(),
            Some("SELECT * FROM t WHERE id = $1")
        );
        assert_eq!(publishable("(select 1)").as_deref(), Some("(select 1)"));
        assert_eq!(publishable("CREATE ROLE monitor LOGIN PASSWORD 'x'"), None);
        assert_eq!(publishable("ALTER USER a WITH PASSWORD 'x'"), None);
        assert_eq!(
            publishable("SELECT set_config('x', 'password=abc', false)"),
            None
        );
    }

    #[test]
    fn window_mean_and_slow_count() {
        let t0 = Instant::now();
        let s = Duration::from_secs;
        let slow = Duration::from_millis(100);
        let mut st = State::new(s(20));
        assert!(
            st.advance(t0, totals(&[(1, 10.0, 0.01)]), slow).is_none(),
            "no baseline yet"
        );
        // Statement 1: 90 more fast calls; statement 2 (new): 3 calls of 0.15 s.
        let (mean, n) = st
            .advance(t0 + s(5), totals(&[(1, 100.0, 0.1), (2, 3.0, 0.45)]), slow)
            .unwrap();
        assert_eq!(n, 1);
        assert!((mean.unwrap() - (0.09 + 0.45) / 93.0).abs() < 1e-12);
        // Nothing ran since: from the t0 baseline the same, and once the window has passed
        // the quiet period alone, no mean and no slow statement.
        let (_, n) = st
            .advance(t0 + s(10), totals(&[(1, 100.0, 0.1), (2, 3.0, 0.45)]), slow)
            .unwrap();
        assert_eq!(n, 1);
        let (mean, n) = st
            .advance(t0 + s(31), totals(&[(1, 100.0, 0.1), (2, 3.0, 0.45)]), slow)
            .unwrap();
        assert_eq!((mean, n), (None, 0));
        // A reset: counted from zero, not negative.
        let (mean, n) = st
            .advance(t0 + s(36), totals(&[(1, 2.0, 0.5)]), slow)
            .unwrap();
        assert_eq!(n, 1);
        assert!((mean.unwrap() - 0.25).abs() < 1e-12);
    }
}
