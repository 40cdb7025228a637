//! Small state files in the data directory (`gate.json`, `knobs.json`, `modes.json`, the rule
//! state): how they are written and read so that none is lost, torn or silently replaced.
//!
//! - **Durable replacement**: bytes go to a temporary file with a name of its own (process id
//!   and a counter, so two writers never share one), which is fsynced, renamed over the file,
//!   and the directory is fsynced, so the rename itself survives a power loss.
//! - **One writer per file, newest wins**: callers take a stamp ([`StateFile::stamp`]) while
//!   they hold whatever lock guards the state they snapshot; writes of one file are serialized,
//!   and a snapshot older than the one already on disk is dropped rather than written over it.
//! - **Off the async workers**: [`StateFile::write`] runs the file system calls on the blocking
//!   pool.
//! - **Absent is not unreadable**: [`StateFile::load`] answers `Ok(None)` only when the file
//!   does not exist; a file that cannot be read or parsed is an error, counted in
//!   `autotuner_state_file_errors_total{file,op}`, for the caller to refuse to run on or to
//!   report; it is never replaced behind the operator's back.
//!
//! Part of the shared base: uses nothing of ours.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, LazyLock, Mutex, PoisonError};

use prometheus::{IntCounterVec, Opts};

/// Failures of state-file I/O, each naming the file.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// The file exists but could not be read, or a write failed.
    #[error("{op} {path}: {source}")]
    Io {
        /// `read` or `write`.
        op: &'static str,
        /// The state file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The file was read but does not hold what it should.
    #[error("{path} is unreadable ({reason}); it is kept as it is for inspection")]
    Corrupt {
        /// The state file.
        path: PathBuf,
        /// Why it was refused.
        reason: String,
    },
}

static ERRORS: LazyLock<Option<IntCounterVec>> = LazyLock::new(|| {
    IntCounterVec::new(
        Opts::new(
            "autotuner_state_file_errors_total",
            "State files in the data directory that could not be read, parsed or written.",
        ),
        &["file", "op"],
    )
    .ok()
});

/// The counter of state-file errors, to register once in the process's registry.
pub fn error_counter() -> Option<Box<dyn prometheus::core::Collector>> {
    ERRORS
        .as_ref()
        .map(|c| Box::new(c.clone()) as Box<dyn prometheus::core::Collector>)
}

fn count(path: &Path, op: &str) {
    if let Some(c) = ERRORS.as_ref() {
        let file = path
            .file_name()
            .map(|f| f.to_string_lossy().into_owned())
            .unwrap_or_default();
        c.with_label_values(&[file.as_str(), op]).inc();
    }
}

/// Distinguishes the temporary files of concurrent writes in one process.
static TMP_SEQ: AtomicU64 = AtomicU64::new(0);

struct Shared {
    /// Serializes writes of this file and remembers the newest stamp written.
    written: Mutex<u64>,
    /// The last stamp handed out.
    stamps: AtomicU64,
}

/// One state file. Cheap to clone; clones share the writer.
#[derive(Clone)]
pub struct StateFile {
    path: PathBuf,
    shared: Arc<Shared>,
}

impl std::fmt::Debug for StateFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StateFile")
            .field("path", &self.path)
            .finish()
    }
}

impl StateFile {
    /// The state file at `path`.
    pub fn new(path: PathBuf) -> StateFile {
        StateFile {
            path,
            shared: Arc::new(Shared {
                written: Mutex::new(0),
                stamps: AtomicU64::new(0),
            }),
        }
    }

    /// Where it lives.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// A stamp for a snapshot about to be written: take it under the lock that guards the
    /// state, so stamps follow the order of the snapshots.
    pub fn stamp(&self) -> u64 {
        self.shared.stamps.fetch_add(1, Ordering::SeqCst) + 1
    }

    /// The file's bytes: `Ok(None)` when it does not exist, an error when it cannot be read.
    pub fn read(&self) -> Result<Option<Vec<u8>>, StateError> {
        match std::fs::read(&self.path) {
            Ok(b) => Ok(Some(b)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(source) => {
                count(&self.path, "read");
                Err(StateError::Io {
                    op: "read",
                    path: self.path.clone(),
                    source,
                })
            }
        }
    }

    /// The file parsed as JSON: `Ok(None)` when it does not exist; an error (counted) when it
    /// cannot be read or parsed.
    pub fn load<T: serde::de::DeserializeOwned>(&self) -> Result<Option<T>, StateError> {
        let Some(bytes) = self.read()? else {
            return Ok(None);
        };
        serde_json::from_slice(&bytes).map(Some).map_err(|e| {
            count(&self.path, "parse");
            StateError::Corrupt {
                path: self.path.clone(),
                reason: e.to_string(),
            }
        })
    }

    /// Writes `bytes` stamped `stamp` durably, on the calling thread. A snapshot older than the
    /// newest already written is dropped (`Ok(false)`).
    pub fn write_blocking(&self, stamp: u64, bytes: &[u8]) -> Result<bool, StateError> {
        let mut written = self
            .shared
            .written
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if stamp <= *written {
            return Ok(false);
        }
        replace(&self.path, bytes).map_err(|source| {
            count(&self.path, "write");
            StateError::Io {
                op: "write",
                path: self.path.clone(),
                source,
            }
        })?;
        *written = stamp;
        Ok(true)
    }

    /// [`StateFile::write_blocking`] on the blocking pool.
    pub async fn write(&self, stamp: u64, bytes: Vec<u8>) -> Result<bool, StateError> {
        let me = self.clone();
        match tokio::task::spawn_blocking(move || me.write_blocking(stamp, &bytes)).await {
            Ok(r) => r,
            Err(join) => {
                count(&self.path, "write");
                Err(StateError::Io {
                    op: "write",
                    path: self.path.clone(),
                    source: std::io::Error::other(join.to_string()),
                })
            }
        }
    }
}

/// Temporary file (unique name, fsynced), rename over `path`, fsync of the directory.
fn replace(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let name = path
        .file_name()
        .map(|f| f.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(
        ".{name}.{}.{}.tmp",
        std::process::id(),
        TMP_SEQ.fetch_add(1, Ordering::Relaxed)
    ));
    let result = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        drop(f);
        std::fs::rename(&tmp, path)?;
        std::fs::File::open(&dir)?.sync_all()
    })();
    if result.is_err() {
        // Best effort: a failed write leaves no temporary file behind.
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;

    #[test]
    fn absent_is_none_and_garbage_is_an_error_that_keeps_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let f = StateFile::new(dir.path().join("gate.json"));
        assert!(f.load::<serde_json::Value>().unwrap().is_none());
        std::fs::write(f.path(), b"{not json").unwrap();
        let err = f.load::<serde_json::Value>().unwrap_err();
        assert!(matches!(err, StateError::Corrupt { .. }), "{err}");
        assert_eq!(std::fs::read(f.path()).unwrap(), b"{not json");
    }

    #[test]
    fn an_older_snapshot_never_overwrites_a_newer_one() {
        let dir = tempfile::tempdir().unwrap();
        let f = StateFile::new(dir.path().join("knobs.json"));
        let old = f.stamp();
        let new = f.stamp();
        assert!(f.write_blocking(new, b"\"new\"").unwrap());
        assert!(!f.write_blocking(old, b"\"old\"").unwrap());
        assert_eq!(
            f.load::<String>().unwrap().as_deref(),
            Some("new"),
            "the newer snapshot stays"
        );
        // No temporary file is left behind.
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names, vec!["knobs.json".to_string()]);
    }

    #[test]
    fn concurrent_writers_use_their_own_temporary_files_and_the_newest_wins() {
        let dir = tempfile::tempdir().unwrap();
        let f = StateFile::new(dir.path().join("modes.json"));
        let stamps: Vec<u64> = (0..16).map(|_| f.stamp()).collect();
        let handles: Vec<_> = stamps
            .iter()
            .rev()
            .map(|&s| {
                let f = f.clone();
                std::thread::spawn(move || f.write_blocking(s, s.to_string().as_bytes()).unwrap())
            })
            .collect();
        for h in handles {
            h.join().unwrap();
        }
        assert_eq!(f.load::<u64>().unwrap(), Some(16));
    }

    #[test]
    fn a_write_into_a_missing_directory_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let f = StateFile::new(dir.path().join("gone").join("gate.json"));
        let s = f.stamp();
        assert!(matches!(
            f.write_blocking(s, b"{}"),
            Err(StateError::Io { op: "write", .. })
        ));
    }
}
