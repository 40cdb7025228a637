//! ④ Audit: the append-only record of every decision the actions stage makes, taken or
//! skipped, as JSON Lines in the data directory (`audit.jsonl`).
//!
//! Owns the file: appending (each line written in one `write` and fsynced before the call
//! returns, so an intent is durable before its action runs), rotation by size
//! (`audit.jsonl.1` … `.N`), repair of a torn last line left by a crash, and reading records
//! back. Uses nothing of ours (records carry their own plain types), so every stage can
//! depend on it.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{BufRead as _, BufReader, Read as _, Seek as _, SeekFrom, Write as _};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, PoisonError};

use serde::{Deserialize, Serialize};

/// The log's file name in the data directory.
pub const FILE_NAME: &str = "audit.jsonl";

/// One audit record. Optional fields are left out of the line when empty.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Record {
    /// When, RFC 3339 (UTC, milliseconds).
    pub time: String,
    /// When, milliseconds since the Unix epoch (for filtering).
    pub ts_ms: i64,
    /// `intent` (written before an action runs), `result` (after it), `decision` (a request
    /// that was not executed: skipped, or rehearsed in dry_run), `verification`, `resolved`,
    /// or `api` (a change made through the admin API).
    pub phase: String,
    /// What was decided: `applied`, `would_apply`, `failed`, `timeout`, `skipped_*`; for a
    /// verification `effective`, `ineffective` or `worsened`.
    pub decision: String,
    /// Who: `engine`, or the admin API's caller.
    pub actor: String,
    /// The rule.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rule: Option<String>,
    /// A hash of the rule's definition when it decided.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rule_version: Option<String>,
    /// The rule instance's labels.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// `firing`, `repeat` or `resolved`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub event: Option<String>,
    /// The condition's value that triggered it (absent when it had none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<f64>,
    /// The effective mode.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<String>,
    /// The action kind.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub action: Option<String>,
    /// What it acts on (a target, a knob, a URL's host).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
    /// The action's parameters, as configured (secrets never appear in actions).
    #[serde(default, skip_serializing_if = "serde_json::Value::is_null")]
    pub params: serde_json::Value,
    /// The gate's steps, in order, each `step:outcome`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub gate: Vec<String>,
    /// The key that keeps one firing episode's action from running twice.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idempotency_key: Option<String>,
    /// State before (a knob's value, a key count).
    #[serde(default, skip_serializing_if = "serde_json::Value::is_null")]
    pub before: serde_json::Value,
    /// State after.
    #[serde(default, skip_serializing_if = "serde_json::Value::is_null")]
    pub after: serde_json::Value,
    /// What the action reported.
    #[serde(default, skip_serializing_if = "serde_json::Value::is_null")]
    pub result: serde_json::Value,
    /// Why it failed or was skipped.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// How long it ran.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub duration_ms: Option<f64>,
}

/// What went wrong writing the log.
#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    /// The file could not be opened, written, synced or rotated.
    #[error("audit log {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// A record could not be encoded (a bug; never expected).
    #[error("encoding an audit record: {0}")]
    Encode(#[from] serde_json::Error),
}

/// The audit log.
#[derive(Debug)]
pub struct Audit {
    dir: PathBuf,
    max_bytes: u64,
    keep: usize,
    file: Mutex<Option<File>>,
}

/// What opening the log found.
#[derive(Debug, Default)]
pub struct Opened {
    /// Bytes of a torn last line that were cut off.
    pub repaired_bytes: u64,
    /// The idempotency keys of the intents in the current file, with their times: an action
    /// whose intent is on record is never run again, even if it never finished.
    pub intents: Vec<(String, i64)>,
}

impl Audit {
    /// Opens (creating) the log in `dir`, repairing a torn last line. An error here is
    /// reported; the log then retries opening on every write, and actions stay stopped until
    /// one succeeds.
    pub fn open(dir: &Path, max_bytes: u64, keep: usize) -> (Audit, Result<Opened, AuditError>) {
        let audit = Audit {
            dir: dir.to_owned(),
            max_bytes: max_bytes.max(4096),
            keep: keep.max(1),
            file: Mutex::new(None),
        };
        let opened = audit.repair_and_scan().and_then(|o| {
            let f = audit.open_file()?;
            *audit.file.lock().unwrap_or_else(PoisonError::into_inner) = Some(f);
            Ok(o)
        });
        (audit, opened)
    }

    /// The current file.
    pub fn path(&self) -> PathBuf {
        self.dir.join(FILE_NAME)
    }

    fn io(&self, source: std::io::Error) -> AuditError {
        AuditError::Io {
            path: self.path(),
            source,
        }
    }

    fn open_file(&self) -> Result<File, AuditError> {
        OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.path())
            .map_err(|e| self.io(e))
    }

    /// Cuts a torn last line (a crash between the start of a write and its newline) and reads
    /// the intents on record.
    fn repair_and_scan(&self) -> Result<Opened, AuditError> {
        let path = self.path();
        let mut f = match OpenOptions::new().read(true).write(true).open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Opened::default()),
            Err(e) => return Err(self.io(e)),
        };
        let len = f.metadata().map_err(|e| self.io(e))?.len();
        let mut opened = Opened::default();
        if len > 0 {
            // Find the last newline by reading backwards in blocks: the file may be large.
            let mut end = len;
            let mut keep_to = 0;
            let mut block = vec![0u8; 64 * 1024];
            'search: while end > 0 {
                let start = end.saturating_sub(block.len() as u64);
                let n = usize::try_from(end - start).unwrap_or(block.len());
                f.seek(SeekFrom::Start(start)).map_err(|e| self.io(e))?;
                f.read_exact(&mut block[..n]).map_err(|e| self.io(e))?;
                if let Some(i) = block[..n].iter().rposition(|b| *b == b'\n') {
                    keep_to = start + i as u64 + 1;
                    break 'search;
                }
                end = start;
            }
            if keep_to < len {
                f.set_len(keep_to).map_err(|e| self.io(e))?;
                f.sync_all().map_err(|e| self.io(e))?;
                opened.repaired_bytes = len - keep_to;
            }
        }
        f.seek(SeekFrom::Start(0)).map_err(|e| self.io(e))?;
        for line in BufReader::new(f).lines() {
            let line = line.map_err(|e| self.io(e))?;
            if let Ok(r) = serde_json::from_str::<Record>(&line)
                && r.phase == "intent"
                && let Some(key) = r.idempotency_key
            {
                opened.intents.push((key, r.ts_ms));
            }
        }
        Ok(opened)
    }

    /// Appends one record and syncs it to disk before returning.
    pub fn append(&self, record: &Record) -> Result<(), AuditError> {
        let mut line = serde_json::to_vec(record)?;
        line.push(b'\n');
        let mut guard = self.file.lock().unwrap_or_else(PoisonError::into_inner);
        if guard.is_none() {
            *guard = Some(self.open_file()?);
        }
        let Some(file) = guard.as_mut() else {
            return Err(self.io(std::io::Error::other("not open")));
        };
        let written = file
            .write_all(&line)
            .and_then(|()| file.sync_data())
            .and_then(|()| file.metadata());
        match written {
            Ok(meta) => {
                if meta.len() >= self.max_bytes {
                    // The record is safe; a failed rotation only means a larger file, and is
                    // reported on the next write if it persists.
                    *guard = None;
                    self.rotate()?;
                    *guard = Some(self.open_file()?);
                }
                Ok(())
            }
            Err(e) => {
                // A partial line may be on disk (a full disk): cut back to the last complete
                // line now rather than leave it for the next start, and reopen next time.
                *guard = None;
                drop(guard);
                let _ = self.repair_and_scan();
                Err(self.io(e))
            }
        }
    }

    /// `audit.jsonl` → `.1` → `.2` …, dropping the oldest beyond `keep`.
    fn rotate(&self) -> Result<(), AuditError> {
        let name = |i: usize| self.dir.join(format!("{FILE_NAME}.{i}"));
        let _ = std::fs::remove_file(name(self.keep));
        for i in (1..self.keep).rev() {
            if name(i).exists() {
                std::fs::rename(name(i), name(i + 1)).map_err(|e| self.io(e))?;
            }
        }
        std::fs::rename(self.path(), name(1)).map_err(|e| self.io(e))
    }

    /// Records newest first, from the current file and then the rotated ones, that `keep`
    /// accepts, at most `limit` of them after skipping `offset`.
    pub fn query(
        &self,
        keep: impl Fn(&Record) -> bool,
        offset: usize,
        limit: usize,
    ) -> Result<Vec<Record>, AuditError> {
        let mut files = vec![self.path()];
        files.extend((1..=self.keep).map(|i| self.dir.join(format!("{FILE_NAME}.{i}"))));
        let mut out = Vec::new();
        let mut skipped = 0;
        for path in files {
            let text = match std::fs::read_to_string(&path) {
                Ok(t) => t,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(AuditError::Io { path, source: e }),
            };
            for line in text.lines().rev() {
                let Ok(r) = serde_json::from_str::<Record>(line) else {
                    continue;
                };
                if !keep(&r) {
                    continue;
                }
                if skipped < offset {
                    skipped += 1;
                    continue;
                }
                out.push(r);
                if out.len() >= limit {
                    return Ok(out);
                }
            }
        }
        Ok(out)
    }
}

/// RFC 3339 with milliseconds, UTC, for a time in milliseconds since the epoch.
pub fn rfc3339(ts_ms: i64) -> String {
    let t = std::time::UNIX_EPOCH
        + std::time::Duration::from_millis(u64::try_from(ts_ms).unwrap_or_default());
    humantime::format_rfc3339_millis(t).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(phase: &str, key: &str, ts_ms: i64) -> Record {
        Record {
            time: rfc3339(ts_ms),
            ts_ms,
            phase: phase.into(),
            decision: "applied".into(),
            actor: "engine".into(),
            idempotency_key: Some(key.into()),
            ..Record::default()
        }
    }

    #[test]
    fn appends_lines_that_parse_and_finds_intents_on_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let (audit, opened) = Audit::open(dir.path(), 1 << 20, 3);
        assert!(opened.unwrap().intents.is_empty());
        audit.append(&record("intent", "k1", 1000)).unwrap();
        audit.append(&record("result", "k1", 1001)).unwrap();
        audit.append(&record("intent", "k2", 1002)).unwrap();
        drop(audit);
        let (audit, opened) = Audit::open(dir.path(), 1 << 20, 3);
        let opened = opened.unwrap();
        assert_eq!(opened.repaired_bytes, 0);
        assert_eq!(
            opened.intents,
            vec![("k1".to_owned(), 1000), ("k2".to_owned(), 1002)]
        );
        let newest = audit.query(|_| true, 0, 2).unwrap();
        assert_eq!(newest.len(), 2);
        assert_eq!(newest[0].ts_ms, 1002);
        assert_eq!(
            audit.query(|r| r.phase == "result", 0, 10).unwrap().len(),
            1
        );
        assert_eq!(audit.query(|_| true, 2, 10).unwrap()[0].ts_ms, 1000);
    }

    #[test]
    fn a_torn_last_line_is_cut_at_open() {
        let dir = tempfile::tempdir().unwrap();
        let (audit, _) = Audit::open(dir.path(), 1 << 20, 3);
        audit.append(&record("intent", "k1", 1000)).unwrap();
        drop(audit);
        let path = dir.path().join(FILE_NAME);
        let whole = std::fs::read(&path).unwrap();
        let mut torn = whole.clone();
        torn.extend_from_slice(b"{\"time\":\"2026-");
        std::fs::write(&path, &torn).unwrap();
        let (audit, opened) = Audit::open(dir.path(), 1 << 20, 3);
        assert_eq!(opened.unwrap().repaired_bytes, 14);
        assert_eq!(std::fs::read(&path).unwrap(), whole);
        audit.append(&record("intent", "k2", 1001)).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        for line in text.lines() {
            serde_json::from_str::<Record>(line).unwrap();
        }
        assert_eq!(text.lines().count(), 2);
    }

    #[test]
    fn a_file_without_any_newline_is_emptied() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(FILE_NAME), b"{\"half").unwrap();
        let (_audit, opened) = Audit::open(dir.path(), 1 << 20, 3);
        assert_eq!(opened.unwrap().repaired_bytes, 6);
        assert_eq!(std::fs::read(dir.path().join(FILE_NAME)).unwrap().len(), 0);
    }

    #[test]
    fn rotates_by_size_and_keeps_at_most_keep_files() {
        let dir = tempfile::tempdir().unwrap();
        let (audit, _) = Audit::open(dir.path(), 4096, 2);
        for i in 0..200 {
            audit
                .append(&record("intent", &format!("k{i}"), i))
                .unwrap();
        }
        assert!(dir.path().join("audit.jsonl.1").exists());
        assert!(dir.path().join("audit.jsonl.2").exists());
        assert!(!dir.path().join("audit.jsonl.3").exists());
        for name in ["audit.jsonl", "audit.jsonl.1", "audit.jsonl.2"] {
            let len = std::fs::metadata(dir.path().join(name)).unwrap().len();
            assert!(len < 4096 + 512, "{name} is {len} bytes");
        }
        // Newest first across files, none lost within what is kept.
        let all = audit.query(|_| true, 0, 1000).unwrap();
        assert_eq!(all[0].ts_ms, 199);
        assert!(all.windows(2).all(|w| w[0].ts_ms == w[1].ts_ms + 1));
    }

    #[test]
    fn an_unwritable_directory_is_an_error_not_a_panic() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("no/such/dir");
        let (audit, opened) = Audit::open(&missing, 1 << 20, 3);
        assert!(opened.is_err());
        let err = audit.append(&record("intent", "k", 1)).unwrap_err();
        assert!(err.to_string().contains("audit.jsonl"), "{err}");
        // Once the directory exists, writing resumes.
        std::fs::create_dir_all(&missing).unwrap();
        audit.append(&record("intent", "k", 1)).unwrap();
    }
}
