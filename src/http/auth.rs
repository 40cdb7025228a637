//! Access control for the admin API: bearer tokens with two roles, `read` and `operate`.
//!
//! Tokens come from `AUTOTUNER_READ_TOKEN` / `AUTOTUNER_OPERATE_TOKEN` and from a YAML file
//! (`--web.tokens-file`) that is re-read when it changes, so a token is rotated or revoked by
//! editing the file. Each file entry has a name (the actor in the audit log), a role, the token
//! (or its SHA-256) and an optional expiry. Tokens are compared as SHA-256 digests in constant
//! time and never logged. Failed attempts are counted and, past ten a minute from one address,
//! answered 429 until the minute is over.
//!
//! With no token configured at all, reading is open (as Prometheus's own API is) and every
//! mutation is refused with 403 and an explanation.
//!
//! Uses `yaml` and `audit::rfc3339` only.

use std::collections::HashMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, PoisonError};
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

#[derive(Debug, Default)]
struct FileState {
    modified: Option<SystemTime>,
    checked: Option<Instant>,
    entries: Vec<Entry>,
    error: Option<String>,
}

/// Failed attempts from one address in the current minute.
#[derive(Debug)]
struct Failures {
    since: Instant,
    count: u32,
}

/// Failed attempts per address: past ten in a minute, that address waits the minute out. Shared
/// by the bearer tokens here and basic auth (`webconfig`).
#[derive(Debug, Default)]
pub struct Limiter {
    failures: Mutex<HashMap<Option<IpAddr>, Failures>>,
}

impl Limiter {
    /// Whether `from` has used up its attempts for this minute.
    pub fn limited(&self, from: Option<IpAddr>) -> bool {
        let f = self.failures.lock().unwrap_or_else(PoisonError::into_inner);
        f.get(&from).is_some_and(|v| {
            v.since.elapsed() < Duration::from_secs(60) && v.count >= MAX_FAILURES_PER_MINUTE
        })
    }

    /// Counts one failed attempt from `from`.
    pub fn fail(&self, from: Option<IpAddr>) {
        let mut f = self.failures.lock().unwrap_or_else(PoisonError::into_inner);
        // Forget addresses whose minute is over, so the map stays small.
        f.retain(|_, v| v.since.elapsed() < Duration::from_secs(60));
        let e = f.entry(from).or_insert(Failures {
            since: Instant::now(),
            count: 0,
        });
        e.count += 1;
    }
}

/// Failed attempts tolerated per address per minute before answering 429.
const MAX_FAILURES_PER_MINUTE: u32 = 10;

/// The token store.
#[derive(Debug)]
pub struct Auth {
    env: Vec<Entry>,
    file: Option<PathBuf>,
    state: Mutex<FileState>,
    failures: Limiter,
    failed: prometheus::IntCounterVec,
}

fn digest(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
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
            (None, Some(h)) => {
                let bytes: Vec<u8> = (0..h.len())
                    .step_by(2)
                    .filter_map(|j| h.get(j..j + 2).and_then(|b| u8::from_str_radix(b, 16).ok()))
                    .collect();
                <[u8; 32]>::try_from(bytes.as_slice()).map_err(|_| {
                    loc.error_at(&at("sha256"), "sha256 must be 64 hexadecimal digits")
                        .to_string()
                })?
            }
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
        let auth = Auth {
            env,
            file: file.map(Path::to_path_buf),
            state: Mutex::new(FileState::default()),
            failures: Limiter::default(),
            failed,
        };
        if let Some(path) = &auth.file {
            let text =
                std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
            let entries = parse_file(&text).map_err(|e| format!("{}:{e}", path.display()))?;
            let mut st = auth.state.lock().unwrap_or_else(PoisonError::into_inner);
            st.entries = entries;
            st.modified = std::fs::metadata(path).and_then(|m| m.modified()).ok();
            st.checked = Some(Instant::now());
        }
        Ok(auth)
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

    /// The file's entries, re-read when its modification time changed (checked at most once a
    /// second). A broken edit keeps the previous entries and is logged once.
    fn entries(&self) -> Vec<Entry> {
        let Some(path) = &self.file else {
            return Vec::new();
        };
        let mut st = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        if st
            .checked
            .is_none_or(|t| t.elapsed() >= Duration::from_secs(1))
        {
            st.checked = Some(Instant::now());
            let modified = std::fs::metadata(path).and_then(|m| m.modified()).ok();
            if modified != st.modified {
                st.modified = modified;
                match std::fs::read_to_string(path)
                    .map_err(|e| e.to_string())
                    .and_then(|t| parse_file(&t))
                {
                    Ok(entries) => {
                        tracing::info!(file = %path.display(), tokens = entries.len(), "tokens file reloaded");
                        st.entries = entries;
                        st.error = None;
                    }
                    Err(err) => {
                        if st.error.as_deref() != Some(err.as_str()) {
                            tracing::error!(file = %path.display(), error = %err, "tokens file unreadable; keeping the previous tokens");
                        }
                        st.error = Some(err);
                    }
                }
            }
        }
        st.entries.clone()
    }

    fn refuse(&self, from: Option<IpAddr>, reason: &str, status: u16, message: String) -> Refusal {
        self.failed.with_label_values(&[reason]).inc();
        // Only guesses count towards the limit: a request without a token guessed nothing.
        if matches!(reason, "invalid" | "expired") {
            self.failures.fail(from);
        }
        Refusal { status, message }
    }

    /// Checks a request's token (`token`: the bearer token, if any) against the role `need`.
    pub fn check(
        &self,
        token: Option<&str>,
        from: Option<IpAddr>,
        need: Role,
    ) -> Result<Caller, Refusal> {
        if self.failures.limited(from) {
            self.failed.with_label_values(&["rate_limited"]).inc();
            return Err(Refusal {
                status: 429,
                message: "too many failed attempts from this address; wait a minute".into(),
            });
        }
        let entries = self.entries();
        if !self.configured() {
            return match need {
                Role::Read => Ok(Caller {
                    name: "anonymous".into(),
                    role: Role::Read,
                }),
                Role::Operate => Err(self.refuse(from, "forbidden", 403, "no operate token is configured: changes through the API are disabled (set AUTOTUNER_OPERATE_TOKEN or give --web.tokens-file)".into())),
            };
        }
        let Some(token) = token.filter(|t| !t.is_empty()) else {
            return Err(self.refuse(
                from,
                "missing",
                401,
                "a bearer token is required (Authorization: Bearer TOKEN)".into(),
            ));
        };
        let d = digest(token);
        // Every entry is compared, whatever matched before, so the time taken does not tell
        // which entry (or how much of a digest) matched.
        let mut found: Option<Entry> = None;
        for e in self.env.iter().chain(&entries) {
            if bool::from(e.digest.ct_eq(&d)) && found.is_none() {
                found = Some(e.clone());
            }
        }
        let Some(entry) = found else {
            return Err(self.refuse(from, "invalid", 401, "the token is not valid".into()));
        };
        if entry.expires.is_some_and(|t| t <= SystemTime::now()) {
            return Err(self.refuse(
                from,
                "expired",
                401,
                format!("the token {:?} has expired", entry.name),
            ));
        }
        if entry.role < need {
            let message = if self.has_operate(&entries) {
                format!("the token {:?} may only read", entry.name)
            } else {
                "no operate token is configured: changes through the API are disabled".into()
            };
            return Err(self.refuse(from, "forbidden", 403, message));
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
}
