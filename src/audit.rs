//! ④ Audit: the append-only record of every decision the actions stage makes, taken or
//! skipped, as JSON Lines in the data directory (`audit.jsonl`).
//!
//! Owns the file: appending (each line written in one `write` and fsynced before the call
//! returns, so an intent is durable before its action runs), rotation by size
//! (`audit.jsonl.1` … `.N`), repair of a torn last line (at start, and after a failed write,
//! under the writer's lock), the intents on record across every kept file, the newest
//! decisions in memory (for the landing page), and bounded reads newest first. Uses nothing of
//! ours (records carry their own plain types), so every stage can depend on it.

use std::collections::{BTreeMap, VecDeque};
use std::fs::{File, OpenOptions};
use std::io::{BufRead as _, BufReader, Read as _, Seek as _, SeekFrom, Write as _};
use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{LazyLock, Mutex, MutexGuard, PoisonError};

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
    /// A read's cursor names a file that rotated out of what is kept.
    #[error("the cursor's file is no longer kept (rotated out); start again from the newest")]
    Expired,
}

/// How many of the newest decisions are kept in memory for the landing page.
pub const RECENT: usize = 50;

/// Rotations that failed after their record was durable (the file then grows past
/// `max_bytes` until one succeeds). Process-wide, like the file system it counts.
static ROTATION_ERRORS: LazyLock<Option<prometheus::IntCounter>> = LazyLock::new(|| {
    prometheus::IntCounter::new(
        "autotuner_audit_rotation_errors_total",
        "Rotations of the audit log that failed; the records were written, the file grows until a rotation succeeds.",
    )
    .ok()
});

/// The counter of failed rotations, to register once in the process's registry.
pub fn rotation_error_counter() -> Option<Box<dyn prometheus::core::Collector>> {
    ROTATION_ERRORS
        .as_ref()
        .map(|c| Box::new(c.clone()) as Box<dyn prometheus::core::Collector>)
}

/// Where a read stopped: older records lie before `offset` in the file `ino`. A file keeps its
/// inode when it is rotated (a rename), so a cursor stays valid until its file is dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cursor {
    /// The file's inode.
    pub ino: u64,
    /// The byte offset in it.
    pub offset: u64,
}

impl Cursor {
    /// The cursor as text for an API answer.
    pub fn encode(&self) -> String {
        format!("{:x}-{:x}", self.ino, self.offset)
    }

    /// A cursor from [`Cursor::encode`]'s text.
    pub fn parse(text: &str) -> Option<Cursor> {
        let (ino, offset) = text.split_once('-')?;
        Some(Cursor {
            ino: u64::from_str_radix(ino, 16).ok()?,
            offset: u64::from_str_radix(offset, 16).ok()?,
        })
    }
}

/// What one bounded read found.
#[derive(Debug, Default)]
pub struct Page {
    /// Matching records, newest first.
    pub records: Vec<Record>,
    /// Where to go on for older records; `None` once the oldest kept file was read to its start.
    pub next: Option<Cursor>,
    /// The byte bound ended the read before `limit` records were found.
    pub truncated: bool,
    /// Bytes of the log read.
    pub scanned_bytes: u64,
    /// Matching records skipped for `offset` (fewer than it when the read stopped first).
    pub skipped: usize,
}

/// The audit log.
#[derive(Debug)]
pub struct Audit {
    dir: PathBuf,
    max_bytes: u64,
    keep: usize,
    file: Mutex<Option<File>>,
    /// The newest records other than intents, oldest first, at most [`RECENT`].
    recent: Mutex<VecDeque<Record>>,
    /// Whether the last rotation failed (logged once per failure run, counted every time).
    rotation_failing: AtomicBool,
}

/// What opening the log found.
#[derive(Debug, Default)]
pub struct Opened {
    /// Bytes of a torn last line that were cut off.
    pub repaired_bytes: u64,
    /// The idempotency keys of the intents in every kept file (rotated ones included), oldest
    /// first, with their times: an action whose intent is on record is never run again, even
    /// if it never finished.
    pub intents: Vec<(String, i64)>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Bytes read per step when reading backwards.
const BLOCK: usize = 64 * 1024;

/// The bytes an intent's line contains (records are written by `serde_json::to_vec`, without
/// spaces): lines without them are not parsed when looking for intents.
const INTENT_MARK: &[u8] = br#""phase":"intent""#;

#[cfg(test)]
type RepairHook = Box<dyn Fn(&Audit)>;

#[cfg(test)]
thread_local! {
    /// Called at the start of a repair (tests check what it holds then).
    static REPAIR_HOOK: std::cell::RefCell<Option<RepairHook>> =
        const { std::cell::RefCell::new(None) };
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
            recent: Mutex::new(VecDeque::with_capacity(RECENT)),
            rotation_failing: AtomicBool::new(false),
        };
        let opened = {
            let mut slot = lock(&audit.file);
            audit.repair(&mut slot).and_then(|repaired_bytes| {
                let intents = audit.scan_intents()?;
                *slot = Some(audit.open_file()?);
                Ok(Opened {
                    repaired_bytes,
                    intents,
                })
            })
        };
        // The landing page's decisions survive a restart: the newest ones, from the end of the
        // log, read once here and never again.
        if opened.is_ok()
            && let Ok(page) = audit.query(|r| r.phase != "intent", None, 0, RECENT, 1 << 20)
        {
            lock(&audit.recent).extend(page.records.into_iter().rev());
        }
        (audit, opened)
    }

    /// The current file.
    pub fn path(&self) -> PathBuf {
        self.dir.join(FILE_NAME)
    }

    /// The `i`-th rotated file (`0` is the current one).
    fn nth(&self, i: usize) -> PathBuf {
        if i == 0 {
            self.path()
        } else {
            self.dir.join(format!("{FILE_NAME}.{i}"))
        }
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

    /// Cuts a torn last line (a crash or a failed write between the start of a line and its
    /// newline). Takes the writer's slot, so it runs only under the writer's lock: a repair
    /// racing an append could cut a line that append just wrote.
    fn repair(&self, _writer: &mut MutexGuard<'_, Option<File>>) -> Result<u64, AuditError> {
        #[cfg(test)]
        REPAIR_HOOK.with(|h| {
            if let Some(h) = h.borrow().as_ref() {
                h(self);
            }
        });
        let path = self.path();
        let mut f = match OpenOptions::new().read(true).write(true).open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
            Err(e) => return Err(self.io(e)),
        };
        let len = f.metadata().map_err(|e| self.io(e))?.len();
        if len == 0 {
            return Ok(0);
        }
        // Find the last newline by reading backwards in blocks: the file may be large.
        let mut end = len;
        let mut keep_to = 0;
        let mut block = vec![0u8; BLOCK];
        while end > 0 {
            let start = end.saturating_sub(BLOCK as u64);
            let n = usize::try_from(end - start).unwrap_or(BLOCK);
            f.seek(SeekFrom::Start(start)).map_err(|e| self.io(e))?;
            f.read_exact(&mut block[..n]).map_err(|e| self.io(e))?;
            if let Some(i) = block[..n].iter().rposition(|b| *b == b'\n') {
                keep_to = start + i as u64 + 1;
                break;
            }
            end = start;
        }
        if keep_to < len {
            f.set_len(keep_to).map_err(|e| self.io(e))?;
            f.sync_all().map_err(|e| self.io(e))?;
        }
        Ok(len - keep_to)
    }

    /// The intents on record in every kept file, oldest first: the intent that makes the file
    /// rotate is in `audit.jsonl.1` from then on, and must still be found after a restart.
    fn scan_intents(&self) -> Result<Vec<(String, i64)>, AuditError> {
        let mut intents = Vec::new();
        for i in (0..=self.keep).rev() {
            let path = self.nth(i);
            let f = match File::open(&path) {
                Ok(f) => f,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(source) => return Err(AuditError::Io { path, source }),
            };
            for line in BufReader::new(f).split(b'\n') {
                let line = line.map_err(|source| AuditError::Io {
                    path: path.clone(),
                    source,
                })?;
                if !line.windows(INTENT_MARK.len()).any(|w| w == INTENT_MARK) {
                    continue;
                }
                if let Ok(r) = serde_json::from_slice::<Record>(&line)
                    && r.phase == "intent"
                    && let Some(key) = r.idempotency_key
                {
                    intents.push((key, r.ts_ms));
                }
            }
        }
        Ok(intents)
    }

    /// Appends one record and syncs it to disk before returning. Once the record is durable
    /// the append has succeeded: a rotation that fails after it is logged and counted, and the
    /// file grows until a later rotation succeeds.
    pub fn append(&self, record: &Record) -> Result<(), AuditError> {
        let mut line = serde_json::to_vec(record)?;
        line.push(b'\n');
        let mut guard = lock(&self.file);
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
                if record.phase != "intent" {
                    let mut recent = lock(&self.recent);
                    if recent.len() >= RECENT {
                        recent.pop_front();
                    }
                    recent.push_back(record.clone());
                }
                if meta.len() >= self.max_bytes {
                    self.rotate_locked(&mut guard);
                }
                Ok(())
            }
            Err(e) => {
                // A partial line may be on disk (a full disk): cut back to the last complete
                // line now, still holding the lock, rather than leave it for the next start;
                // reopen next time.
                *guard = None;
                if let Err(err) = self.repair(&mut guard) {
                    tracing::warn!(error = %err, "cutting a torn audit line after a failed write");
                }
                Err(self.io(e))
            }
        }
    }

    /// Rotates under the writer's lock and reopens the current file. Never fails the append
    /// that caused it: that record is already durable.
    fn rotate_locked(&self, slot: &mut MutexGuard<'_, Option<File>>) {
        **slot = None;
        let rotated = self.rotate();
        // A failed reopen is reported by the next append, which retries it.
        **slot = self.open_file().ok();
        match rotated {
            Ok(()) => {
                if self.rotation_failing.swap(false, Ordering::SeqCst) {
                    tracing::info!(path = %self.path().display(), "audit log rotates again");
                }
            }
            Err(err) => {
                if let Some(c) = ROTATION_ERRORS.as_ref() {
                    c.inc();
                }
                if !self.rotation_failing.swap(true, Ordering::SeqCst) {
                    tracing::warn!(error = %err, "audit log rotation failed; records are still written, the file grows until a rotation succeeds");
                }
            }
        }
    }

    /// `audit.jsonl` → `.1` → `.2` …, dropping the oldest beyond `keep`.
    fn rotate(&self) -> Result<(), AuditError> {
        let _ = std::fs::remove_file(self.nth(self.keep));
        for i in (1..self.keep).rev() {
            if self.nth(i).exists() {
                std::fs::rename(self.nth(i), self.nth(i + 1)).map_err(|e| self.io(e))?;
            }
        }
        std::fs::rename(self.path(), self.nth(1)).map_err(|e| self.io(e))
    }

    /// The newest records other than intents (what was decided), newest first, from memory.
    pub fn recent(&self, n: usize) -> Vec<Record> {
        lock(&self.recent).iter().rev().take(n).cloned().collect()
    }

    /// Records newest first that `keep` accepts, from the current file and then the rotated
    /// ones, starting at `from` (or the end of the log), at most `limit` of them after skipping
    /// `offset`. Reads backwards in blocks and stops once `max_bytes` were read (after at least
    /// one whole line), so one call costs a bounded amount whatever the log's size; the page
    /// says where to go on.
    pub fn query(
        &self,
        keep: impl Fn(&Record) -> bool,
        from: Option<Cursor>,
        offset: usize,
        limit: usize,
        max_bytes: u64,
    ) -> Result<Page, AuditError> {
        // Every kept file is opened first: a rotation while reading renames them, and the
        // open handles keep reading the same bytes.
        let mut files = Vec::new();
        for i in 0..=self.keep {
            let path = self.nth(i);
            match File::open(&path).and_then(|f| f.metadata().map(|m| (f, m))) {
                Ok((f, m)) => files.push((f, m.ino(), m.len(), path)),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(source) => return Err(AuditError::Io { path, source }),
            }
        }
        let mut first = 0;
        let mut first_end = None;
        if let Some(c) = from {
            let Some(i) = files.iter().position(|f| f.1 == c.ino) else {
                return Err(AuditError::Expired);
            };
            first = i;
            first_end = Some(c.offset.min(files[i].2));
        }
        let mut page = Page::default();
        let mut block = vec![0u8; BLOCK];
        for (i, (mut f, ino, len, path)) in files.into_iter().enumerate().skip(first) {
            let io = |source| AuditError::Io {
                path: path.clone(),
                source,
            };
            // Bytes before `pos` are unread; `tail` holds the bytes from `pos` up to the
            // oldest line already taken, which may be the end of a line starting before `pos`.
            let mut pos = if i == first {
                first_end.unwrap_or(len)
            } else {
                len
            };
            let mut tail: Vec<u8> = Vec::new();
            let mut progressed = false;
            loop {
                if pos == 0 {
                    break;
                }
                if page.scanned_bytes >= max_bytes && progressed {
                    page.truncated = true;
                    page.next = Some(Cursor {
                        ino,
                        offset: pos + tail.len() as u64,
                    });
                    return Ok(page);
                }
                let mut lines: Vec<(u64, Vec<u8>)> = Vec::new();
                {
                    let start = pos.saturating_sub(BLOCK as u64);
                    let n = usize::try_from(pos - start).unwrap_or(BLOCK);
                    f.seek(SeekFrom::Start(start)).map_err(io)?;
                    f.read_exact(&mut block[..n]).map_err(io)?;
                    page.scanned_bytes += n as u64;
                    let mut buf = block[..n].to_vec();
                    buf.append(&mut tail);
                    // Everything after the first newline is whole lines; before it, the end
                    // of a line that starts in an older block (unless this is the start).
                    let cut = if start == 0 {
                        0
                    } else {
                        match buf.iter().position(|b| *b == b'\n') {
                            Some(p) => p + 1,
                            None => buf.len(),
                        }
                    };
                    let whole = buf.split_off(cut);
                    tail = buf;
                    pos = start;
                    let mut at = pos + tail.len() as u64;
                    for l in whole.split(|b| *b == b'\n') {
                        let next = at + l.len() as u64 + 1;
                        lines.push((at, l.to_vec()));
                        at = next;
                    }
                }
                for (at, l) in lines.into_iter().rev() {
                    // Only a whole line taken is progress: a cursor must never point where
                    // the read began, or a line longer than the bound would never be passed.
                    if l.is_empty() {
                        continue;
                    }
                    progressed = true;
                    let Ok(r) = serde_json::from_slice::<Record>(&l) else {
                        continue;
                    };
                    if !keep(&r) {
                        continue;
                    }
                    if page.skipped < offset {
                        page.skipped += 1;
                        continue;
                    }
                    page.records.push(r);
                    if page.records.len() >= limit {
                        page.next = Some(Cursor { ino, offset: at });
                        return Ok(page);
                    }
                }
            }
        }
        Ok(page)
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
        let newest = audit.query(|_| true, None, 0, 2, u64::MAX).unwrap().records;
        assert_eq!(newest.len(), 2);
        assert_eq!(newest[0].ts_ms, 1002);
        assert_eq!(
            audit
                .query(|r| r.phase == "result", None, 0, 10, u64::MAX)
                .unwrap()
                .records
                .len(),
            1
        );
        assert_eq!(
            audit
                .query(|_| true, None, 2, 10, u64::MAX)
                .unwrap()
                .records[0]
                .ts_ms,
            1000
        );
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
        let all = audit
            .query(|_| true, None, 0, 1000, u64::MAX)
            .unwrap()
            .records;
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

    #[test]
    fn an_intent_whose_write_rotated_the_file_is_found_after_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let (audit, _) = Audit::open(dir.path(), 4096, 3);
        let rotated = dir.path().join("audit.jsonl.1");
        let mut last = None;
        for i in 0..1000 {
            let key = format!("k{i}");
            audit.append(&record("intent", &key, i)).unwrap();
            if rotated.exists() {
                last = Some(key);
                break;
            }
        }
        let last = last.expect("the file never rotated");
        // The intent that made it rotate is now in `.1`; the current file has none.
        assert_eq!(
            std::fs::metadata(dir.path().join(FILE_NAME)).unwrap().len(),
            0
        );
        drop(audit);
        let (_audit, opened) = Audit::open(dir.path(), 4096, 3);
        let intents = opened.unwrap().intents;
        assert!(
            intents.iter().any(|(k, _)| *k == last),
            "{last} forgotten: {intents:?}"
        );
        assert_eq!(intents.first().map(|(k, _)| k.as_str()), Some("k0"));
    }

    #[test]
    fn a_failed_rotation_after_a_durable_write_does_not_fail_the_append() {
        let dir = tempfile::tempdir().unwrap();
        // A non-empty directory where the rotated file must go: the rename fails.
        let blocker = dir.path().join("audit.jsonl.1");
        std::fs::create_dir(&blocker).unwrap();
        std::fs::write(blocker.join("x"), b"x").unwrap();
        let counted = || {
            ROTATION_ERRORS
                .as_ref()
                .map_or(0, prometheus::IntCounter::get)
        };
        let before = counted();
        let (audit, _) = Audit::open(dir.path(), 4096, 1);
        for i in 0..100 {
            audit
                .append(&record("intent", &format!("k{i}"), i))
                .unwrap_or_else(|e| panic!("append {i}: {e}"));
        }
        let text = std::fs::read_to_string(dir.path().join(FILE_NAME)).unwrap();
        assert_eq!(text.lines().count(), 100, "every record is in the file");
        assert!(counted() > before, "failed rotations are counted");
        // Once the way is free, the next append rotates.
        std::fs::remove_dir_all(&blocker).unwrap();
        audit.append(&record("intent", "after", 100)).unwrap();
        assert!(blocker.is_file());
        assert_eq!(
            std::fs::read_to_string(&blocker).unwrap().lines().count(),
            101
        );
    }

    #[test]
    fn a_torn_line_after_a_failed_write_is_cut_under_the_writers_lock() {
        let dir = tempfile::tempdir().unwrap();
        let (audit, _) = Audit::open(dir.path(), 1 << 20, 3);
        audit.append(&record("intent", "k1", 1)).unwrap();
        let path = dir.path().join(FILE_NAME);
        let whole = std::fs::read(&path).unwrap();
        // A write that failed half-way (a full disk) left the start of a line, and the
        // writer's handle now fails: a read-only handle to the same real file.
        let mut torn = whole.clone();
        torn.extend_from_slice(b"{\"time\":\"2026-");
        std::fs::write(&path, &torn).unwrap();
        *audit.file.lock().unwrap() = Some(File::open(&path).unwrap());
        let held = std::rc::Rc::new(std::cell::Cell::new(None));
        let h = held.clone();
        REPAIR_HOOK.with(|hook| {
            *hook.borrow_mut() = Some(Box::new(move |a: &Audit| {
                h.set(Some(a.file.try_lock().is_err()));
            }));
        });
        let err = audit.append(&record("intent", "k2", 2));
        REPAIR_HOOK.with(|hook| *hook.borrow_mut() = None);
        assert!(err.is_err());
        assert_eq!(held.get(), Some(true), "the repair ran without the lock");
        assert_eq!(std::fs::read(&path).unwrap(), whole, "the torn line is cut");
        audit.append(&record("intent", "k3", 3)).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        for line in text.lines() {
            serde_json::from_str::<Record>(line).unwrap();
        }
        assert_eq!(text.lines().count(), 2);
    }

    /// `n` records, about 400 bytes each, every `rare`-th one of rule `Rare`.
    fn fill(audit: &Audit, n: i64, rare: i64) {
        for i in 0..n {
            let mut r = record("result", &format!("k{i}"), i);
            r.rule = Some(if i % rare == 0 { "Rare" } else { "Busy" }.into());
            r.error = Some("x".repeat(300));
            audit.append(&r).unwrap();
        }
    }

    #[test]
    fn reads_are_bounded_newest_first_and_resume_at_their_cursor() {
        let dir = tempfile::tempdir().unwrap();
        let (audit, _) = Audit::open(dir.path(), 256 * 1024, 12);
        fill(&audit, 6000, 700);
        assert!(dir.path().join("audit.jsonl.5").exists());
        let total: u64 = (0..=12)
            .filter_map(|i| std::fs::metadata(audit.nth(i)).ok())
            .map(|m| m.len())
            .sum();
        // Rare records across all files, in pages of at most 200 KiB read.
        let bound = 200 * 1024;
        let (mut found, mut from, mut pages) = (Vec::new(), None, 0);
        loop {
            let page = audit
                .query(|r| r.rule.as_deref() == Some("Rare"), from, 0, 1000, bound)
                .unwrap();
            assert!(
                page.scanned_bytes <= bound + BLOCK as u64,
                "read {} bytes",
                page.scanned_bytes
            );
            pages += 1;
            found.extend(page.records.iter().map(|r| r.ts_ms));
            match page.next {
                Some(c) => {
                    assert!(page.truncated);
                    from = Some(c);
                }
                None => break,
            }
        }
        assert!(
            pages as u64 >= total / (bound + BLOCK as u64),
            "{pages} pages"
        );
        let expected: Vec<i64> = (0..6000).rev().filter(|i| i % 700 == 0).collect();
        assert_eq!(found, expected);
        // Paging by record limit gives every record once, newest first.
        let (mut all, mut from) = (Vec::new(), None);
        loop {
            let page = audit.query(|_| true, from, 0, 997, u64::MAX).unwrap();
            assert!(!page.truncated);
            all.extend(page.records.iter().map(|r| r.ts_ms));
            match page.next {
                Some(c) => from = Some(c),
                None => break,
            }
        }
        let oldest_kept = *all.last().unwrap();
        assert_eq!(all, (oldest_kept..6000).rev().collect::<Vec<_>>());
        // A cursor survives a rotation (the file keeps its inode).
        let page = audit.query(|_| true, None, 0, 10, u64::MAX).unwrap();
        let c = page.next.unwrap();
        fill(&audit, 1000, 1000);
        let page = audit.query(|_| true, Some(c), 0, 1, u64::MAX).unwrap();
        assert_eq!(page.records[0].ts_ms, 5989);
        let gone = Cursor {
            ino: u64::MAX,
            offset: 0,
        };
        assert!(matches!(
            audit.query(|_| true, Some(gone), 0, 1, u64::MAX),
            Err(AuditError::Expired)
        ));
    }

    #[test]
    fn the_newest_decisions_are_kept_in_memory_and_seeded_at_open() {
        let dir = tempfile::tempdir().unwrap();
        let (audit, _) = Audit::open(dir.path(), 1 << 20, 3);
        for i in 0..100 {
            audit
                .append(&record(
                    if i % 2 == 0 { "intent" } else { "result" },
                    "k",
                    i,
                ))
                .unwrap();
        }
        // Answered from memory: the file is gone.
        std::fs::rename(dir.path().join(FILE_NAME), dir.path().join("moved")).unwrap();
        let recent = audit.recent(20);
        let want: Vec<i64> = (0..100).rev().filter(|i| i % 2 == 1).take(20).collect();
        assert_eq!(recent.iter().map(|r| r.ts_ms).collect::<Vec<_>>(), want);
        assert_eq!(audit.recent(1000).len(), RECENT);
        drop(audit);
        std::fs::rename(dir.path().join("moved"), dir.path().join(FILE_NAME)).unwrap();
        let (audit, _) = Audit::open(dir.path(), 1 << 20, 3);
        assert_eq!(
            audit.recent(20).iter().map(|r| r.ts_ms).collect::<Vec<_>>(),
            want
        );
    }

    #[test]
    fn a_line_longer_than_the_bound_is_read_whole_and_passed() {
        let dir = tempfile::tempdir().unwrap();
        let (audit, _) = Audit::open(dir.path(), 1 << 24, 3);
        for i in 0..3 {
            let mut r = record("result", "k", i);
            r.error = Some("y".repeat(300_000));
            audit.append(&r).unwrap();
        }
        let (mut seen, mut from) = (Vec::new(), None);
        for _ in 0..10 {
            let page = audit.query(|_| true, from, 0, 100, 1024).unwrap();
            seen.extend(page.records.iter().map(|r| r.ts_ms));
            match page.next {
                Some(c) => from = Some(c),
                None => break,
            }
        }
        assert_eq!(seen, vec![2, 1, 0]);
    }
}
