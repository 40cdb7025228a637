//! Reload, all or nothing: compile every rule file aside; on any error keep the running set and
//! report the errors; on success swap the new set in at once, keeping the state of rules whose
//! definition did not change.
//!
//! Uses `compile` and the engine's loaded set; called by the watcher, SIGHUP and
//! `POST /-/reload` alike.

use std::sync::Arc;
use std::time::Duration;

use rustc_hash::{FxHashMap as HashMap, FxHashSet as HashSet};

use super::{Engine, ReloadStatus, Runtime, fingerprint};
use crate::rules::compile::{self, Problem, Rule};

impl Engine {
    /// Reloads the rules directory, all or nothing. Returns the number of rules loaded, or the
    /// errors (the running rules are kept).
    pub fn reload(&self) -> Result<usize, Vec<String>> {
        let now = crate::collect::now_ms();
        let files = match compile::rule_files(&self.dir) {
            Ok(f) => f,
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(err) => {
                let errors = vec![format!(
                    "{}: reading the rules directory: {err}",
                    self.dir.display()
                )];
                return Err(self.failed(errors, Vec::new(), now));
            }
        };
        let mut loaded = compile::load_files(&files);
        let text = |p: &[Problem]| p.iter().map(ToString::to_string).collect::<Vec<_>>();
        if !loaded.errors.is_empty() {
            return Err(self.failed(text(&loaded.errors), text(&loaded.warnings), now));
        }
        // A knob action on an undeclared knob could only fail, every time its rule fires: the
        // rule is left out (the others load), with one warning per reload at the action.
        let mut skipped = Vec::new();
        if let Some(declared) = &self.knobs {
            for p in compile::undeclared_knobs(&loaded.rules, declared) {
                skipped.push(format!("{p}; the rule is skipped"));
            }
            loaded
                .rules
                .retain(|r| r.knobs.iter().all(|(k, _, _)| declared.contains(k)));
        }
        if let Some(declared) = &self.sources {
            for p in compile::undeclared_sources(&loaded.rules, declared) {
                skipped.push(format!("{p}; the rule is skipped"));
            }
            loaded
                .rules
                .retain(|r| r.remote.as_ref().is_none_or(|s| declared.contains(s)));
        }
        let mut inner = self.lock();
        let old: HashMap<String, String> = inner
            .rules
            .iter()
            .map(|r| (r.name.clone(), fingerprint(r)))
            .collect();
        let mut runtime = std::mem::take(&mut inner.runtime);
        let mut next = HashMap::default();
        for r in &loaded.rules {
            let keep = old.get(&r.name).is_some_and(|f| *f == fingerprint(r));
            let rt = if keep {
                runtime.remove(&r.name).unwrap_or_default()
            } else {
                Runtime::default()
            };
            next.insert(r.name.clone(), rt);
        }
        // The set changed: the next tick writes the state file afresh (gone rules drop out).
        if let Some(rt) = next.values_mut().next() {
            rt.dirty = true;
        }
        // Series of rules that are gone must not linger on /metrics.
        for gone in runtime.keys() {
            for s in ["pending", "firing"] {
                let _ = self.metrics.state.remove_label_values(&[gone, s]);
            }
            let _ = self.metrics.duration.remove_label_values(&[gone]);
        }
        // A range or offset reaching past the history is computed on whatever is left of it.
        let retention = self.registry.retention();
        let mut warnings = text(&loaded.warnings);
        warnings.extend(skipped);
        // A remote rule reads the source's history, not ours.
        for r in loaded.rules.iter().filter(|r| r.remote.is_none()) {
            let reach = r.expr.lookback_needed().max(
                r.clear
                    .as_ref()
                    .map_or(Duration::ZERO, |c| c.lookback_needed()),
            );
            if reach > retention {
                warnings.push(format!(
                    "{}:{}: rule {:?} reads {}s back, more than the history keeps ({}s, history.retention)",
                    r.source.display(),
                    r.line,
                    r.name,
                    reach.as_secs(),
                    retention.as_secs()
                ));
            }
        }
        let count = loaded.rules.len();
        let hash = set_hash(&loaded.rules);
        (inner.shared, inner.sharing) = sharing(&loaded.rules);
        inner.rules = Arc::new(loaded.rules);
        inner.runtime = next;
        inner.reload = ReloadStatus {
            success: true,
            at_ms: now,
            errors: Vec::new(),
            warnings: warnings.clone(),
            hash,
        };
        self.publish(&inner);
        drop(inner);
        for w in &warnings {
            tracing::warn!(warning = %w, "rule warning");
        }
        self.names_checked
            .store(false, std::sync::atomic::Ordering::Relaxed);
        self.metrics.loaded.set(count as f64);
        self.metrics.reload_ok.set(1.0);
        self.metrics.reload_ts.set(now as f64 / 1000.0);
        tracing::info!(rules = count, dir = %self.dir.display(), "rules loaded");
        Ok(count)
    }

    pub(super) fn failed(
        &self,
        errors: Vec<String>,
        warnings: Vec<String>,
        now: i64,
    ) -> Vec<String> {
        for e in &errors {
            tracing::error!(error = %e, "rule reload failed; keeping the running rules");
        }
        let mut inner = self.lock();
        inner.reload = ReloadStatus {
            success: false,
            at_ms: now,
            errors: errors.clone(),
            warnings,
            hash: inner.reload.hash.clone(),
        };
        self.publish(&inner);
        drop(inner);
        self.metrics.reload_ok.set(0.0);
        self.metrics.reload_ts.set(now as f64 / 1000.0);
        errors
    }
}

/// What the rules have in common (see `Loaded::shared`).
pub(super) fn sharing(rules: &[Rule]) -> (Arc<HashSet<String>>, HashSet<String>) {
    let mut count: HashMap<String, usize> = HashMap::default();
    let keys: Vec<Vec<String>> = rules
        .iter()
        .map(|r| {
            let mut k = r.expr.memo_keys();
            if let Some(c) = &r.clear {
                k.extend(c.memo_keys());
            }
            k
        })
        .collect();
    for k in keys.iter().flatten() {
        *count.entry(k.clone()).or_default() += 1;
    }
    let shared: HashSet<String> = count
        .into_iter()
        .filter_map(|(k, n)| (n > 1).then_some(k))
        .collect();
    let sharing = rules
        .iter()
        .zip(&keys)
        .filter(|(_, k)| k.iter().any(|k| shared.contains(k)))
        .map(|(r, _)| r.name.clone())
        .collect();
    (Arc::new(shared), sharing)
}

pub(super) fn set_hash(rules: &[Rule]) -> String {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    for r in rules {
        r.name.hash(&mut h);
        fingerprint(r).hash(&mut h);
        format!("{:?}", r.actions).hash(&mut h);
    }
    format!("{:016x}", h.finish())
}
