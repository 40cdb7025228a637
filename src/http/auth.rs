//! Access control for the admin API: bearer tokens with two roles, `read` and `operate`.
//!
//! Tokens come from `AUTOTUNER_READ_TOKEN` / `AUTOTUNER_OPERATE_TOKEN` and from a YAML file
//! (`--web.tokens-file`) that is re-read when it changes, so a token is rotated or revoked by
//! editing the file. Each file entry has a name (the actor in the audit log), a role, the token
//! (or its SHA-256) and an optional expiry. Tokens are compared as SHA-256 digests in constant
//! time and never logged.
//!
//! The file is checked at most once a second, on a blocking thread: a request only reads the
//! tokens in force and, when a second has passed, starts the check without waiting for it. A
//! file that is gone or cannot be read means no token from it is accepted (fail closed); a file
//! that reads but does not parse keeps the previous tokens (an editor mid-save), logged once.
//!
//! Attempts are counted before they are verified (`Limiter`): ten unverified or failed attempts
//! from one address in a minute, and that address is answered 429 until the minute is over,
//! however many it sends at once. A successful attempt gives its count back.
//!
//! With no token configured at all, reading is open (as Prometheus's own API is) and every
//! mutation is refused with 403 and an explanation.
//!
//! Uses `yaml` only.

use std::collections::HashMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant, SystemTime};

use serde::Deserialize;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// What a caller may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// Read status, rules, audit, knobs, recommendations.
    Read,
    /// Everything read may, and change things: knobs, modes, breakers, playbooks, reload.
    Operate,
}

/// Who called.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    /// The token's name (`anonymous` when reading is open).
    pub name: String,
    /// Its role.
    pub role: Role,
}

/// Why a request is refused: the status and the message for its JSON body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// 401, 403 or 429.
    pub status: u16,
    /// Why.
    pub message: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileSpec {
    tokens: Vec<EntrySpec>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct EntrySpec {
    name: String,
    role: Role,
    token: Option<String>,
    sha256: Option<String>,
    expires: Option<String>,
}

#[derive(Debug, Clone)]
struct Entry {
    name: String,
    role: Role,
    digest: [u8; 32],
    expires: Option<SystemTime>,
}

/// What the refresher knows of the file on disk; only the refresher (one at a time) holds it.
#[derive(Debug, Default)]
struct Disk {
    modified: Option<SystemTime>,
    /// The last problem logged, so a lasting one is logged once.
    error: Option<String>,
}

/// The tokens file: the entries in force, swapped whole by the refresher.
#[derive(Debug)]
struct TokenFile {
    path: PathBuf,
    /// The entries in force. Requests hold this lock only to clone the `Arc`.
    entries: Mutex<Arc<Vec<Entry>>>,
    /// When the file was last checked. Held only to compare and set the time.
    checked: Mutex<Instant>,
    /// Whether a check is running, so a burst of requests starts one.
    refreshing: AtomicBool,
    disk: Mutex<Disk>,
}

/// How often the tokens file is checked for changes.
const CHECK_EVERY: Duration = Duration::from_secs(1);

impl TokenFile {
    fn current(&self) -> Arc<Vec<Entry>> {
        self.entries
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    fn set(&self, entries: Vec<Entry>) {
        *self.entries.lock().unwrap_or_else(PoisonError::into_inner) = Arc::new(entries);
    }

    /// Whether a check is due; claims it when it is.
    fn claim_check(&self) -> bool {
        {
            let mut checked = self.checked.lock().unwrap_or_else(PoisonError::into_inner);
            if checked.elapsed() < CHECK_EVERY {
                return false;
            }
            *checked = Instant::now();
        }
        !self.refreshing.swap(true, Ordering::AcqRel)
    }

    /// Starts a check when one is due: on a blocking thread when a runtime is there (the
    /// request goes on with the tokens in force), inline otherwise.
    fn maybe_refresh(self: &Arc<Self>) {
        if !self.claim_check() {
            return;
        }
        let me = self.clone();
        let run = move || {
            me.refresh();
            me.refreshing.store(false, Ordering::Release);
        };
        match tokio::runtime::Handle::try_current() {
            Ok(h) => {
                h.spawn_blocking(run);
            }
            Err(_) => run(),
        }
    }

    /// Re-reads the file when its modification time changed. Gone or unreadable: no token from
    /// it is accepted. Unparsable: the previous tokens stay.
    fn refresh(&self) {
        let path = &self.path;
        let mut disk = self.disk.lock().unwrap_or_else(PoisonError::into_inner);
        let text = match std::fs::metadata(path).and_then(|m| m.modified()) {
            Ok(m) if Some(m) == disk.modified => return,
            Ok(m) => {
                disk.modified = Some(m);
                std::fs::read_to_string(path)
            }
            Err(e) => Err(e),
        };
        let text = match text {
            Ok(t) => t,
            Err(err) => {
                // Editing in place or saving by rename can race with the check; the next check
                // a second later notices the file is back (its time differs from `None`).
                disk.modified = None;
                let err = format!("{err}");
                if disk.error.as_deref() != Some(err.as_str()) {
                    tracing::error!(file = %path.display(), error = %err, "tokens file missing or unreadable: no token from it is accepted until it is back");
                }
                disk.error = Some(err);
                self.set(Vec::new());
                return;
            }
        };
        match parse_file(&text) {
            Ok(entries) => {
                tracing::info!(file = %path.display(), tokens = entries.len(), "tokens file reloaded");
                self.set(entries);
                disk.error = None;
            }
            Err(err) => {
                let err = format!("{}:{err}", path.display());
                if disk.error.as_deref() != Some(err.as_str()) {
                    tracing::error!(file = %path.display(), error = %err, "tokens file unreadable; keeping the previous tokens");
                }
                disk.error = Some(err);
            }
        }
    }
}

/// Attempts from one address in the current minute.
#[derive(Debug)]
struct Failures {
    since: Instant,
    count: u32,
}

/// Attempts per address, counted before they are verified: past ten unverified or failed ones
/// in a minute, that address waits the minute out. Shared by the bearer tokens here and basic
/// auth (`webconfig`). At most `MAX_ADDRESSES` addresses are tracked; past that, the one whose
/// minute started first is forgotten.
#[derive(Debug, Default)]
pub struct Limiter {
    failures: Mutex<HashMap<Option<IpAddr>, Failures>>,
}

/// One counted attempt. Dropped, it stays counted (a failure); `succeeded` gives it back.
#[must_use = "an attempt counts as failed unless `succeeded` is called"]
#[derive(Debug)]
pub struct Attempt<'a> {
    limiter: &'a Limiter,
    from: Option<IpAddr>,
    since: Instant,
}

impl Attempt<'_> {
    /// The attempt was verified: it no longer counts.
    pub fn succeeded(self) {
        let mut f = self
            .limiter
            .failures
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(v) = f.get_mut(&self.from)
            && v.since == self.since
        {
            v.count = v.count.saturating_sub(1);
            if v.count == 0 {
                f.remove(&self.from);
            }
        }
    }
}

/// Attempts tolerated per address per minute before answering 429.
const MAX_FAILURES_PER_MINUTE: u32 = 10;
/// How long an address's count lasts.
const WINDOW: Duration = Duration::from_secs(60);
/// Addresses tracked at once (about 100 KiB): the bound on what a flood of source addresses
/// can make the limiter hold.
pub const MAX_ADDRESSES: usize = 4096;

impl Limiter {
    /// Whether `from` has used up its attempts for this minute.
    pub fn limited(&self, from: Option<IpAddr>) -> bool {
        let f = self.failures.lock().unwrap_or_else(PoisonError::into_inner);
        f.get(&from)
            .is_some_and(|v| v.since.elapsed() < WINDOW && v.count >= MAX_FAILURES_PER_MINUTE)
    }

    /// Counts one attempt from `from` before it is verified; `None` when the address has used
    /// up its attempts for this minute (attempts still being verified included).
    pub fn attempt(&self, from: Option<IpAddr>) -> Option<Attempt<'_>> {
        let mut f = self.failures.lock().unwrap_or_else(PoisonError::into_inner);
        if !f.contains_key(&from) && f.len() >= MAX_ADDRESSES {
            f.retain(|_, v| v.since.elapsed() < WINDOW);
            if f.len() >= MAX_ADDRESSES
                && let Some(oldest) = f.iter().min_by_key(|(_, v)| v.since).map(|(k, _)| *k)
            {
                f.remove(&oldest);
            }
        }
        let e = f.entry(from).or_insert(Failures {
            since: Instant::now(),
            count: 0,
        });
        if e.since.elapsed() >= WINDOW {
            *e = Failures {
                since: Instant::now(),
                count: 0,
            };
        }
        if e.count >= MAX_FAILURES_PER_MINUTE {
            return None;
        }
        e.count += 1;
        Some(Attempt {
            limiter: self,
            from,
            since: e.since,
        })
    }

    /// How many addresses are tracked.
    pub fn tracked(&self) -> usize {
        self.failures
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }
}

/// The token store.
#[derive(Debug)]
pub struct Auth {
    env: Vec<Entry>,
    file: Option<Arc<TokenFile>>,
    failures: Limiter,
    failed: prometheus::IntCounterVec,
}

fn digest(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

/// The 32 bytes of a SHA-256 written as 64 hexadecimal digits, or `None`.
fn parse_hex_digest(h: &str) -> Option<[u8; 32]> {
    if h.len() != 64 || !h.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, b) in out.iter_mut().enumerate() {
        *b = u8::from_str_radix(h.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

fn parse_file(text: &str) -> Result<Vec<Entry>, String> {
    let (spec, loc) = crate::yaml::from_str::<FileSpec>(text).map_err(|d| {
        d.iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join("; ")
    })?;
    let mut out = Vec::new();
    for (i, e) in spec.tokens.into_iter().enumerate() {
        let at = |f: &str| -> Vec<crate::yaml::Seg> { vec!["tokens".into(), i.into(), f.into()] };
        let digest = match (&e.token, &e.sha256) {
            (Some(t), None) if t.len() >= 16 => digest(t),
            (Some(_), None) => {
                return Err(loc
                    .error_at(&at("token"), "a token must be at least 16 characters")
                    .to_string());
            }
            (None, Some(h)) => parse_hex_digest(h).ok_or_else(|| {
                loc.error_at(
                    &at("sha256"),
                    format!(
                        "sha256 must be exactly 64 hexadecimal digits (this one has {} characters{})",
                        h.chars().count(),
                        if h.chars().all(|c| c.is_ascii_hexdigit()) {
                            ""
                        } else {
                            ", not all hexadecimal"
                        }
                    ),
                )
                .to_string()
            })?,
            _ => {
                return Err(loc
                    .error_at(&at("name"), "give exactly one of token, sha256")
                    .to_string());
            }
        };
        let expires = match &e.expires {
            None => None,
            Some(t) => Some(humantime::parse_rfc3339_weak(t).map_err(|err| {
                loc.error_at(
                    &at("expires"),
                    format!("expires: {err} (RFC 3339, e.g. 2027-01-31T00:00:00Z)"),
                )
                .to_string()
            })?),
        };
        out.push(Entry {
            name: e.name,
            role: e.role,
            digest,
            expires,
        });
    }
    Ok(out)
}

impl Auth {
    /// A store with the environment's tokens and, when given, the file's. A file that cannot be
    /// read or parsed at start is an error (the process does not start half-protected).
    pub fn new(
        read_token: Option<String>,
        operate_token: Option<String>,
        file: Option<&Path>,
    ) -> Result<Auth, String> {
        let mut env = Vec::new();
        for (token, role, name) in [
            (read_token, Role::Read, "env-read"),
            (operate_token, Role::Operate, "env-operate"),
        ] {
            if let Some(t) = token.filter(|t| !t.is_empty()) {
                if t.len() < 16 {
                    return Err(format!("the {name} token must be at least 16 characters"));
                }
                env.push(Entry {
                    name: name.to_owned(),
                    role,
                    digest: digest(&t),
                    expires: None,
                });
            }
        }
        let failed = prometheus::IntCounterVec::new(
            prometheus::Opts::new(
                "autotuner_http_auth_failures_total",
                "Admin API requests refused for a missing, wrong or expired token, or a role too low.",
            ),
            &["reason"],
        )
        .map_err(|e| e.to_string())?;
        for reason in ["missing", "invalid", "expired", "forbidden", "rate_limited"] {
            failed.with_label_values(&[reason]);
        }
        let file = match file {
            None => None,
            Some(path) => {
                let modified = std::fs::metadata(path)
                    .and_then(|m| m.modified())
                    .map_err(|e| format!("{}: {e}", path.display()))?;
                let text = std::fs::read_to_string(path)
                    .map_err(|e| format!("{}: {e}", path.display()))?;
                let entries = parse_file(&text).map_err(|e| format!("{}:{e}", path.display()))?;
                Some(Arc::new(TokenFile {
                    path: path.to_path_buf(),
                    entries: Mutex::new(Arc::new(entries)),
                    checked: Mutex::new(Instant::now()),
                    refreshing: AtomicBool::new(false),
                    disk: Mutex::new(Disk {
                        modified: Some(modified),
                        error: None,
                    }),
                }))
            }
        };
        Ok(Auth {
            env,
            file,
            failures: Limiter::default(),
            failed,
        })
    }

    /// The failure counter, for the registry.
    pub fn metric(&self) -> prometheus::IntCounterVec {
        self.failed.clone()
    }

    /// Whether any token is configured.
    pub fn configured(&self) -> bool {
        !self.env.is_empty() || self.file.is_some()
    }

    /// Whether a token with the operate role exists.
    fn has_operate(&self, entries: &[Entry]) -> bool {
        self.env
            .iter()
            .chain(entries)
            .any(|e| e.role == Role::Operate)
    }

    /// The file's entries in force when the request came; starts a check of the file when one
    /// is due, which the request does not wait for.
    fn entries(&self) -> Arc<Vec<Entry>> {
        let Some(file) = &self.file else {
            return Arc::new(Vec::new());
        };
        let current = file.current();
        file.maybe_refresh();
        current
    }

    fn refuse(&self, reason: &str, status: u16, message: String) -> Refusal {
        self.failed.with_label_values(&[reason]).inc();
        Refusal { status, message }
    }

    fn rate_limited(&self) -> Refusal {
        self.refuse(
            "rate_limited",
            429,
            "too many failed attempts from this address; wait a minute".into(),
        )
    }

    /// Checks a request's token (`token`: the bearer token, if any) against the role `need`.
    pub fn check(
        &self,
        token: Option<&str>,
        from: Option<IpAddr>,
        need: Role,
    ) -> Result<Caller, Refusal> {
        if self.failures.limited(from) {
            return Err(self.rate_limited());
        }
        let entries = self.entries();
        if !self.configured() {
            return match need {
                Role::Read => Ok(Caller {
                    name: "anonymous".into(),
                    role: Role::Read,
                }),
                Role::Operate => Err(self.refuse("forbidden", 403, "no operate token is configured: changes through the API are disabled (set AUTOTUNER_OPERATE_TOKEN or give --web.tokens-file)".into())),
            };
        }
        // A request without a token guessed nothing: it is not counted.
        let Some(token) = token.filter(|t| !t.is_empty()) else {
            return Err(self.refuse(
                "missing",
                401,
                "a bearer token is required (Authorization: Bearer TOKEN)".into(),
            ));
        };
        let Some(attempt) = self.failures.attempt(from) else {
            return Err(self.rate_limited());
        };
        let d = digest(token);
        // Every entry is compared, whatever matched before, so the time taken does not tell
        // which entry (or how much of a digest) matched.
        let mut found: Option<Entry> = None;
        for e in self.env.iter().chain(entries.iter()) {
            if bool::from(e.digest.ct_eq(&d)) && found.is_none() {
                found = Some(e.clone());
            }
        }
        // An invalid or expired token keeps its count (`attempt` dropped).
        let Some(entry) = found else {
            return Err(self.refuse("invalid", 401, "the token is not valid".into()));
        };
        if entry.expires.is_some_and(|t| t <= SystemTime::now()) {
            return Err(self.refuse(
                "expired",
                401,
                format!("the token {:?} has expired", entry.name),
            ));
        }
        attempt.succeeded();
        if entry.role < need {
            let message = if self.has_operate(&entries) {
                format!("the token {:?} may only read", entry.name)
            } else {
                "no operate token is configured: changes through the API are disabled".into()
            };
            return Err(self.refuse("forbidden", 403, message));
        }
        Ok(Caller {
            name: entry.name,
            role: entry.role,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const R: &str = "read-token-0123456789";
    const O: &str = "operate-token-0123456789";

    #[test]
    fn open_reading_and_closed_writing_without_tokens() {
        let a = Auth::new(None, None, None).unwrap();
        assert_eq!(a.check(None, None, Role::Read).unwrap().name, "anonymous");
        let r = a.check(Some(O), None, Role::Operate).unwrap_err();
        assert_eq!(r.status, 403);
        assert!(r.message.contains("no operate token"));
    }

    #[test]
    fn roles_are_enforced() {
        let a = Auth::new(Some(R.into()), Some(O.into()), None).unwrap();
        assert_eq!(a.check(None, None, Role::Read).unwrap_err().status, 401);
        assert_eq!(
            a.check(Some("wrong-token-xxxxxxxx"), None, Role::Read)
                .unwrap_err()
                .status,
            401
        );
        assert_eq!(a.check(Some(R), None, Role::Read).unwrap().role, Role::Read);
        let r = a.check(Some(R), None, Role::Operate).unwrap_err();
        assert_eq!(r.status, 403);
        assert!(r.message.contains("may only read"), "{r:?}");
        assert_eq!(
            a.check(Some(O), None, Role::Operate).unwrap().name,
            "env-operate"
        );
        assert!(Auth::new(Some("short".into()), None, None).is_err());
    }

    #[test]
    fn failed_attempts_are_limited_per_address() {
        let a = Auth::new(None, Some(O.into()), None).unwrap();
        let ip: Option<IpAddr> = Some("10.0.0.1".parse().unwrap());
        for _ in 0..MAX_FAILURES_PER_MINUTE {
            assert_eq!(
                a.check(Some("nope-nope-nope-nope"), ip, Role::Read)
                    .unwrap_err()
                    .status,
                401
            );
        }
        // Even the right token waits out the minute from that address; others are unaffected.
        assert_eq!(a.check(Some(O), ip, Role::Read).unwrap_err().status, 429);
        assert!(
            a.check(Some(O), Some("10.0.0.2".parse().unwrap()), Role::Read)
                .is_ok()
        );
    }

    #[test]
    fn the_file_is_parsed_with_hashes_and_expiry() {
        let hash: String = digest(O).iter().map(|b| format!("{b:02x}")).collect();
        let entries = parse_file(&format!(
            "tokens:\n  - {{name: alice, role: operate, sha256: {hash}}}\n  - {{name: bob, role: read, token: {R}, expires: 2000-01-01T00:00:00Z}}\n"
        ))
        .unwrap();
        assert_eq!(entries[0].digest, digest(O));
        assert!(entries[1].expires.unwrap() < SystemTime::now());
        let err = parse_file("tokens:\n  - {name: x, role: read, token: short}\n").unwrap_err();
        assert!(err.starts_with("2:"), "{err}");
        assert!(
            parse_file("tokens:\n  - {name: x, role: admin, token: 0123456789abcdefg}\n").is_err()
        );
    }
    #[test]
    fn a_sha256_must_be_exactly_64_hexadecimal_digits() {
        let hash: String = digest(O).iter().map(|b| format!("{b:02x}")).collect();
        let ok = parse_file(&format!(
            "tokens:\n  - {{name: a, role: read, sha256: {}}}\n",
            hash.to_uppercase()
        ))
        .unwrap();
        assert_eq!(ok[0].digest, digest(O));
        // A pair `u8::from_str_radix` takes though it is no hex pair (`+f`), a bad pair past
        // the 64th digit, a non-ASCII character, and one digit short.
        for bad in [
            format!("+f{}", &hash[2..]),
            format!("{hash}zz"),
            format!("{}é{}", &hash[..30], &hash[32..]),
            hash[1..].to_owned(),
        ] {
            let err = parse_file(&format!(
                "tokens:\n  - {{name: ok, role: read, token: {R}}}\n  - {{name: x, role: read, sha256: '{bad}'}}\n"
            ))
            .unwrap_err();
            assert!(err.starts_with("3:"), "{bad}: {err}");
            assert!(
                err.contains("exactly 64 hexadecimal digits"),
                "{bad}: {err}"
            );
        }
    }

    #[test]
    fn attempts_are_counted_before_they_are_verified() {
        let l = Limiter::default();
        let ip: Option<IpAddr> = Some("10.0.0.3".parse().unwrap());
        // Ten attempts still being verified use up the minute: an eleventh is not started.
        let held: Vec<Attempt<'_>> = (0..MAX_FAILURES_PER_MINUTE)
            .map(|_| l.attempt(ip).unwrap())
            .collect();
        assert!(l.attempt(ip).is_none());
        assert!(l.limited(ip));
        // A verified attempt gives its count back.
        let mut held = held.into_iter();
        held.next().unwrap().succeeded();
        assert!(!l.limited(ip));
        assert!(l.attempt(ip).is_some());
        assert!(l.attempt(ip).is_none());
    }

    #[test]
    fn the_limiter_tracks_a_bounded_number_of_addresses() {
        let l = Limiter::default();
        let first: Option<IpAddr> = Some("10.1.0.0".parse().unwrap());
        for _ in 0..MAX_FAILURES_PER_MINUTE {
            let _ = l.attempt(first);
        }
        for i in 0..(MAX_ADDRESSES as u32 + 64) {
            let ip = IpAddr::V4(std::net::Ipv4Addr::from(0x0b00_0000 + i));
            let _ = l.attempt(Some(ip));
            assert!(l.tracked() <= MAX_ADDRESSES);
        }
        assert_eq!(l.tracked(), MAX_ADDRESSES);
        // The oldest went first.
        assert!(!l.limited(first));
    }

    #[test]
    fn a_deleted_tokens_file_revokes_its_tokens() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("tokens.yml");
        std::fs::write(
            &p,
            format!("tokens:\n  - {{name: r, role: read, token: {R}}}\n"),
        )
        .unwrap();
        let a = Auth::new(None, Some(O.into()), Some(&p)).unwrap();
        assert!(a.check(Some(R), None, Role::Read).is_ok());
        std::fs::remove_file(&p).unwrap();
        std::thread::sleep(CHECK_EVERY + Duration::from_millis(100));
        // Without a runtime the check runs inline, after the first request after the second.
        assert!(a.check(Some(R), None, Role::Read).is_ok());
        let r = a.check(Some(R), None, Role::Read).unwrap_err();
        assert_eq!(r.status, 401);
        // The environment's tokens are unaffected.
        assert!(a.check(Some(O), None, Role::Operate).is_ok());
        // Back, it counts again.
        std::fs::write(
            &p,
            format!("tokens:\n  - {{name: r, role: read, token: {R}}}\n"),
        )
        .unwrap();
        std::thread::sleep(CHECK_EVERY + Duration::from_millis(100));
        let _ = a.check(Some(R), None, Role::Read);
        assert!(a.check(Some(R), None, Role::Read).is_ok());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 1)]
    async fn a_request_never_waits_for_the_tokens_file() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("tokens.yml");
        std::fs::write(
            &p,
            format!("tokens:\n  - {{name: r, role: read, token: {R}}}\n"),
        )
        .unwrap();
        let a = Auth::new(None, None, Some(&p)).unwrap();
        tokio::time::sleep(CHECK_EVERY + Duration::from_millis(100)).await;
        std::fs::remove_file(&p).unwrap();
        // The request that finds the check due is answered with the tokens in force; the file
        // is read on a blocking thread, and a later request sees the outcome.
        assert!(a.check(Some(R), None, Role::Read).is_ok());
        let deadline = Instant::now() + Duration::from_secs(10);
        while a.check(Some(R), None, Role::Read).is_ok() {
            assert!(Instant::now() < deadline, "the deletion was never noticed");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}
