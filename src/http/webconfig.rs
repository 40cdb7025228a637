//! `--web.config.file`: TLS and basic auth for every route, `/metrics` included, in the
//! format of the Prometheus exporter-toolkit, so one file serves node_exporter and autotuner.
//!
//! ```yaml
//! tls_server_config:
//!   cert_file: server.crt            # PEM chain; or `cert:` with the PEM inline
//!   key_file: server.key             # PEM key;   or `key:` inline
//!   client_auth_type: RequireAndVerifyClientCert   # or VerifyClientCertIfGiven, NoClientCert
//!   client_ca_file: clients-ca.crt
//!   min_version: TLS12               # TLS12 (default) or TLS13; max_version likewise
//!   cipher_suites: [TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256]   # TLS 1.2 only, as in Go
//!   curve_preferences: [X25519, CurveP256]
//!   prefer_server_cipher_suites: true
//! http_server_config:
//!   headers: {Strict-Transport-Security: max-age=31536000}
//! basic_auth_users:
//!   prometheus: $2y$10$...           # bcrypt hash (htpasswd -nBC 10 "" | tr -d ':\n')
//! ```
//!
//! Relative paths are read from the file's own directory. The file, and the certificate, key and
//! CA files it names, are checked for changes at most once a second as connections arrive, on a
//! blocking thread (a connection or request only takes the settings in force, and never waits
//! for the files): a renewed certificate or a new user takes effect without a restart, and a
//! broken edit keeps the previous settings (logged once). Whether TLS is on is fixed at start.
//!
//! What rustls cannot do safely is refused with a reason rather than silently weakened:
//! TLS 1.0/1.1, client certificates that are requested but not verified
//! (`RequestClientCert`, `RequireAnyClientCert`), and `client_allowed_sans`.
//!
//! Basic auth: a bcrypt check costs tens of milliseconds, so it runs off the async workers and a
//! successful check is remembered (by a SHA-256 of user, password and hash; never the password)
//! so Prometheus's scrapes pay it once. Unknown users are checked against a dummy hash so the
//! answer's timing does not tell which users exist. Failures count in
//! `autotuner_http_basic_auth_failures_total`. Attempts are counted before their bcrypt runs
//! (`auth::Limiter`): past ten unverified or failed ones a minute from one address, it is
//! answered 429, so a burst of wrong passwords costs at most ten bcrypts. With basic auth on, the admin API's bearer token goes in `X-Autotuner-Token`.
//!
//! Uses `yaml` and `auth::Limiter`; rustls with the aws-lc-rs provider.

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant, SystemTime};

use axum::extract::{ConnectInfo, Request, State};
use axum::http::{HeaderName, HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use serde::Deserialize;
use sha2::{Digest, Sha256};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;

use super::auth::Limiter;
use crate::shutdown::Shutdown;

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct Spec {
    tls_server_config: Option<TlsSpec>,
    http_server_config: Option<HttpSpec>,
    basic_auth_users: Option<BTreeMap<String, String>>,
}

#[derive(Debug, Deserialize, Default, Clone)]
#[serde(deny_unknown_fields)]
struct TlsSpec {
    cert_file: Option<PathBuf>,
    key_file: Option<PathBuf>,
    cert: Option<String>,
    key: Option<String>,
    client_auth_type: Option<String>,
    client_ca_file: Option<PathBuf>,
    client_allowed_sans: Option<Vec<String>>,
    min_version: Option<String>,
    max_version: Option<String>,
    cipher_suites: Option<Vec<String>>,
    curve_preferences: Option<Vec<String>>,
    prefer_server_cipher_suites: Option<bool>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct HttpSpec {
    /// Accepted for compatibility; autotuner serves HTTP/1.1, which is all Prometheus needs.
    #[allow(dead_code)]
    http2: Option<bool>,
    headers: Option<BTreeMap<String, String>>,
}

/// The response headers the exporter-toolkit lets a web config set.
const ALLOWED_HEADERS: [(&str, HeaderName); 5] = [
    (
        "Strict-Transport-Security",
        header::STRICT_TRANSPORT_SECURITY,
    ),
    ("X-Content-Type-Options", header::X_CONTENT_TYPE_OPTIONS),
    ("X-Frame-Options", header::X_FRAME_OPTIONS),
    ("X-XSS-Protection", header::X_XSS_PROTECTION),
    ("Content-Security-Policy", header::CONTENT_SECURITY_POLICY),
];

/// What one reading of the file gives.
struct Loaded {
    tls: Option<Arc<rustls::ServerConfig>>,
    users: Arc<BTreeMap<String, String>>,
    headers: Arc<Vec<(HeaderName, HeaderValue)>>,
    /// The files read, with their modification times, to notice edits.
    files: Vec<(PathBuf, Option<SystemTime>)>,
}

fn modified(path: &Path) -> Option<SystemTime> {
    std::fs::metadata(path).and_then(|m| m.modified()).ok()
}

/// Reads and validates the file at `path`; every error names the file and, where it can, the
/// line.
fn load(path: &Path) -> Result<Loaded, String> {
    let file = path.display();
    let text = std::fs::read_to_string(path).map_err(|e| format!("{file}: {e}"))?;
    let (spec, loc) = crate::yaml::from_str::<Spec>(&text).map_err(|d| {
        d.iter()
            .map(|d| format!("{file}:{d}"))
            .collect::<Vec<_>>()
            .join("; ")
    })?;
    let dir = path.parent().unwrap_or(Path::new("."));
    let mut files = vec![(path.to_path_buf(), modified(path))];
    let at = |p: &[&str], message: String| -> String {
        let segs: Vec<crate::yaml::Seg> = p.iter().map(|s| (*s).into()).collect();
        format!("{file}:{}", loc.error_at(&segs, message))
    };
    let tls = match &spec.tls_server_config {
        None => None,
        Some(t) => Some(Arc::new(tls_config(t, dir, &mut files).map_err(
            |(field, message)| at(&["tls_server_config", field], message),
        )?)),
    };
    let mut users = BTreeMap::new();
    for (user, hash) in spec.basic_auth_users.unwrap_or_default() {
        if let Err(e) = hash.parse::<bcrypt::HashParts>() {
            return Err(at(
                &["basic_auth_users", user.as_str()],
                format!("the password of {user:?} must be a bcrypt hash ({e})"),
            ));
        }
        if user.contains(':') {
            return Err(at(
                &["basic_auth_users", user.as_str()],
                format!("user name {user:?} must not contain ':'"),
            ));
        }
        users.insert(user, hash);
    }
    let mut headers = Vec::new();
    for (name, value) in spec
        .http_server_config
        .and_then(|h| h.headers)
        .unwrap_or_default()
    {
        let Some((_, allowed)) = ALLOWED_HEADERS
            .iter()
            .find(|(a, _)| a.eq_ignore_ascii_case(&name))
        else {
            return Err(at(
                &["http_server_config", "headers", name.as_str()],
                format!(
                    "header {name:?} cannot be set here (allowed: {})",
                    ALLOWED_HEADERS.map(|(a, _)| a).join(", ")
                ),
            ));
        };
        let value = HeaderValue::from_str(&value).map_err(|_| {
            at(
                &["http_server_config", "headers", name.as_str()],
                format!("{value:?} is not a valid header value"),
            )
        })?;
        headers.push((allowed.clone(), value));
    }
    Ok(Loaded {
        tls,
        users: Arc::new(users),
        headers: Arc::new(headers),
        files,
    })
}

type FieldError = (&'static str, String);

fn version(name: &str, field: &'static str) -> Result<u8, FieldError> {
    match name {
        "TLS12" => Ok(12),
        "TLS13" => Ok(13),
        "TLS10" | "TLS11" => Err((
            field,
            format!("{name} is not offered: TLS 1.0 and 1.1 are broken; use TLS12 or TLS13"),
        )),
        _ => Err((
            field,
            format!("unknown TLS version {name:?} (TLS12 or TLS13)"),
        )),
    }
}

/// The rustls server configuration of `t`; paths relative to `dir`; read files are added to
/// `files`.
fn tls_config(
    t: &TlsSpec,
    dir: &Path,
    files: &mut Vec<(PathBuf, Option<SystemTime>)>,
) -> Result<rustls::ServerConfig, FieldError> {
    let mut read = |field: &'static str, p: &Path| -> Result<Vec<u8>, FieldError> {
        let p = dir.join(p);
        let bytes = std::fs::read(&p).map_err(|e| (field, format!("{}: {e}", p.display())))?;
        files.push((p.clone(), modified(&p)));
        Ok(bytes)
    };
    let cert_pem = match (&t.cert_file, &t.cert) {
        (Some(f), None) => read("cert_file", f)?,
        (None, Some(inline)) => inline.as_bytes().to_vec(),
        (None, None) => return Err(("cert_file", "cert_file (or cert) is required".into())),
        (Some(_), Some(_)) => return Err(("cert", "give cert_file or cert, not both".into())),
    };
    let key_pem = match (&t.key_file, &t.key) {
        (Some(f), None) => read("key_file", f)?,
        (None, Some(inline)) => inline.as_bytes().to_vec(),
        (None, None) => return Err(("key_file", "key_file (or key) is required".into())),
        (Some(_), Some(_)) => return Err(("key", "give key_file or key, not both".into())),
    };
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&cert_pem)
        .collect::<Result<_, _>>()
        .map_err(|e| ("cert_file", format!("not a PEM certificate chain: {e}")))?;
    if certs.is_empty() {
        return Err(("cert_file", "no certificate found in the PEM".into()));
    }
    let key = PrivateKeyDer::from_pem_slice(&key_pem)
        .map_err(|e| ("key_file", format!("no PEM private key found: {e}")))?;
    if t.client_allowed_sans.is_some() {
        return Err((
            "client_allowed_sans",
            "client_allowed_sans is not supported; use a client CA that only signs the allowed clients".into(),
        ));
    }

    let mut provider = rustls::crypto::aws_lc_rs::default_provider();
    if let Some(names) = &t.cipher_suites {
        // As in Go, the list governs TLS 1.2 only; TLS 1.3's suites are all sound.
        let mut keep = Vec::new();
        for name in names {
            // Go also accepts the CHACHA20 names without their `_SHA256`.
            let want = if name.ends_with("CHACHA20_POLY1305") {
                format!("{name}_SHA256")
            } else {
                name.clone()
            };
            let found = provider.cipher_suites.iter().find(|s| {
                s.version() == &rustls::version::TLS12 && format!("{:?}", s.suite()) == want
            });
            match found {
                Some(s) => keep.push(*s),
                None => {
                    let offered: Vec<String> = provider
                        .cipher_suites
                        .iter()
                        .filter(|s| s.version() == &rustls::version::TLS12)
                        .map(|s| format!("{:?}", s.suite()))
                        .collect();
                    return Err((
                        "cipher_suites",
                        format!(
                            "cipher suite {name:?} is not offered (TLS 1.2 suites: {})",
                            offered.join(", ")
                        ),
                    ));
                }
            }
        }
        provider
            .cipher_suites
            .retain(|s| s.version() != &rustls::version::TLS12 || keep.contains(s));
    }
    if let Some(names) = &t.curve_preferences {
        let mut groups = Vec::new();
        for name in names {
            let want = match name.as_str() {
                "CurveP256" => "secp256r1",
                "CurveP384" => "secp384r1",
                "X25519" => "X25519",
                "X25519MLKEM768" => "X25519MLKEM768",
                other => {
                    return Err((
                        "curve_preferences",
                        format!(
                            "curve {other:?} is not offered (X25519, CurveP256, CurveP384, X25519MLKEM768)"
                        ),
                    ));
                }
            };
            if let Some(g) = provider
                .kx_groups
                .iter()
                .find(|g| format!("{:?}", g.name()) == want)
            {
                groups.push(*g);
            }
        }
        provider.kx_groups = groups;
    }
    let provider = Arc::new(provider);

    let min = version(t.min_version.as_deref().unwrap_or("TLS12"), "min_version")?;
    let max = version(t.max_version.as_deref().unwrap_or("TLS13"), "max_version")?;
    if min > max {
        return Err(("max_version", "max_version is below min_version".into()));
    }
    let versions: Vec<&'static rustls::SupportedProtocolVersion> =
        [(12, &rustls::version::TLS12), (13, &rustls::version::TLS13)]
            .into_iter()
            .filter(|(v, _)| (min..=max).contains(v))
            .map(|(_, p)| p)
            .collect();

    // A CA file alone means "verify every client", as in the exporter-toolkit.
    let auth_type = match (&t.client_auth_type, &t.client_ca_file) {
        (Some(a), _) => a.as_str(),
        (None, Some(_)) => "RequireAndVerifyClientCert",
        (None, None) => "NoClientCert",
    };
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&versions)
        .map_err(|e| ("min_version", format!("{e}")))?;
    let builder = match auth_type {
        "NoClientCert" => {
            if t.client_ca_file.is_some() {
                return Err((
                    "client_ca_file",
                    "client_ca_file is set but client_auth_type is NoClientCert".into(),
                ));
            }
            builder.with_no_client_auth()
        }
        "VerifyClientCertIfGiven" | "RequireAndVerifyClientCert" => {
            let Some(ca) = &t.client_ca_file else {
                return Err((
                    "client_auth_type",
                    format!("{auth_type} needs client_ca_file"),
                ));
            };
            let pem = read("client_ca_file", ca)?;
            let mut roots = rustls::RootCertStore::empty();
            for c in CertificateDer::pem_slice_iter(&pem) {
                let c = c.map_err(|e| ("client_ca_file", format!("not a PEM certificate: {e}")))?;
                roots
                    .add(c)
                    .map_err(|e| ("client_ca_file", format!("unusable CA certificate: {e}")))?;
            }
            if roots.is_empty() {
                return Err(("client_ca_file", "no certificate found in the PEM".into()));
            }
            let mut v = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider);
            if auth_type == "VerifyClientCertIfGiven" {
                v = v.allow_unauthenticated();
            }
            let verifier = v.build().map_err(|e| ("client_ca_file", format!("{e}")))?;
            builder.with_client_cert_verifier(verifier)
        }
        "RequestClientCert" | "RequireAnyClientCert" => {
            return Err((
                "client_auth_type",
                format!(
                    "{auth_type} accepts certificates nobody verified; use VerifyClientCertIfGiven or RequireAndVerifyClientCert with client_ca_file"
                ),
            ));
        }
        other => {
            return Err((
                "client_auth_type",
                format!(
                    "unknown client_auth_type {other:?} (NoClientCert, VerifyClientCertIfGiven, RequireAndVerifyClientCert)"
                ),
            ));
        }
    };
    let mut config = builder.with_single_cert(certs, key).map_err(|e| {
        (
            "key_file",
            format!("the key does not fit the certificate: {e}"),
        )
    })?;
    config.ignore_client_order = t.prefer_server_cipher_suites.unwrap_or(true);
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(config)
}

/// The settings in force for one connection or request.
#[derive(Clone)]
struct Snapshot {
    tls: Option<Arc<rustls::ServerConfig>>,
    users: Arc<BTreeMap<String, String>>,
    headers: Arc<Vec<(HeaderName, HeaderValue)>>,
}

impl Snapshot {
    fn of(l: &Loaded) -> Snapshot {
        Snapshot {
            tls: l.tls.clone(),
            users: l.users.clone(),
            headers: l.headers.clone(),
        }
    }
}

/// What the refresher knows of the files on disk; only the refresher (one at a time) holds it.
struct Disk {
    /// The files read, with their modification times, to notice edits.
    files: Vec<(PathBuf, Option<SystemTime>)>,
    /// The last problem logged, so a lasting one is logged once.
    error: Option<String>,
}

/// The file and the settings in force, shared with the refresher's blocking thread.
struct Shared {
    path: PathBuf,
    tls_at_start: bool,
    /// The settings in force. Requests and connections hold this lock only to clone the `Arc`s.
    snapshot: Mutex<Snapshot>,
    /// When the files were last checked. Held only to compare and set the time.
    checked: Mutex<Instant>,
    /// Whether a check is running, so a burst of connections starts one.
    refreshing: AtomicBool,
    disk: Mutex<Disk>,
}

/// How often the files are checked for changes.
const CHECK_EVERY: Duration = Duration::from_secs(1);

impl Shared {
    fn current(&self) -> Snapshot {
        self.snapshot
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Starts a check of the files when one is due: on a blocking thread when a runtime is
    /// there (the caller goes on with the settings in force), inline otherwise.
    fn maybe_refresh(self: &Arc<Self>) {
        {
            let mut checked = self.checked.lock().unwrap_or_else(PoisonError::into_inner);
            if checked.elapsed() < CHECK_EVERY {
                return;
            }
            *checked = Instant::now();
        }
        if self.refreshing.swap(true, Ordering::AcqRel) {
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

    /// Re-reads the file when it or a file it names changed; a broken edit keeps the settings
    /// in force (logged once).
    fn refresh(&self) {
        let mut disk = self.disk.lock().unwrap_or_else(PoisonError::into_inner);
        if !disk.files.iter().any(|(p, m)| modified(p) != *m) {
            return;
        }
        tracing::debug!(file = %self.path.display(), "web configuration changed; re-reading it");
        match load(&self.path) {
            Ok(l) if l.tls.is_some() != self.tls_at_start => {
                let err =
                    "turning TLS on or off needs a restart; keeping the previous web configuration"
                        .to_owned();
                if disk.error.as_deref() != Some(err.as_str()) {
                    tracing::error!(file = %self.path.display(), "{err}");
                }
                disk.error = Some(err);
                // Remember these times: the same content is not re-read every second.
                disk.files = l.files;
            }
            Ok(l) => {
                tracing::info!(file = %self.path.display(), tls = l.tls.is_some(), users = l.users.len(), "web configuration reloaded");
                *self.snapshot.lock().unwrap_or_else(PoisonError::into_inner) = Snapshot::of(&l);
                disk.files = l.files;
                disk.error = None;
            }
            Err(err) => {
                if disk.error.as_deref() != Some(err.as_str()) {
                    tracing::error!(file = %self.path.display(), error = %err, "web configuration unusable; keeping the previous one");
                }
                disk.error = Some(err);
                // Read again at the next edit, not every second.
                for (p, m) in &mut disk.files {
                    *m = modified(p);
                }
            }
        }
    }
}

/// The web configuration, re-read when its files change.
pub struct WebConfig {
    shared: Arc<Shared>,
    /// Successful basic-auth checks: SHA-256 of (user, password, hash).
    verified: Mutex<HashMap<[u8; 32], Instant>>,
    limiter: Limiter,
    failed: prometheus::IntCounterVec,
    handshakes: prometheus::IntCounterVec,
}

/// How many successful checks are remembered; past it the memory starts over.
const VERIFIED_CACHE: usize = 1024;
/// How long a remembered check stands (a changed hash invalidates it at once anyway).
const VERIFIED_FOR: Duration = Duration::from_secs(3600);
/// How long a client may take to finish the TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Handshakes in progress at once; more connections wait in the kernel's backlog.
const MAX_HANDSHAKES: usize = 256;
/// A valid bcrypt hash of a random password, checked for unknown users.
const DUMMY_HASH: &str = "$2b$10$b4jZkSBoEyDmhQy9RESK3.8bxXXOF8iAHh6FTuQKvzpiRqyy5DF8.";

/// The key a successful check is remembered by: a SHA-256 of user, password and hash.
fn verified_key(user: &str, password: &str, hash: Option<&str>) -> [u8; 32] {
    let mut h = Sha256::new();
    for part in [user, password, hash.unwrap_or("")] {
        h.update((part.len() as u64).to_le_bytes());
        h.update(part.as_bytes());
    }
    h.finalize().into()
}

impl WebConfig {
    /// Reads the file; an error here stops the start (the process never serves half-protected).
    pub fn load(path: &Path) -> Result<WebConfig, String> {
        let loaded = load(path)?;
        let failed = prometheus::IntCounterVec::new(
            prometheus::Opts::new(
                "autotuner_http_basic_auth_failures_total",
                "Requests refused by basic auth (--web.config.file), by reason.",
            ),
            &["reason"],
        )
        .map_err(|e| e.to_string())?;
        for reason in ["missing", "invalid", "rate_limited"] {
            failed.with_label_values(&[reason]);
        }
        let handshakes = prometheus::IntCounterVec::new(
            prometheus::Opts::new(
                "autotuner_http_tls_handshake_failures_total",
                "TLS handshakes that failed or timed out, by reason.",
            ),
            &["reason"],
        )
        .map_err(|e| e.to_string())?;
        for reason in ["error", "timeout"] {
            handshakes.with_label_values(&[reason]);
        }
        Ok(WebConfig {
            shared: Arc::new(Shared {
                path: path.to_path_buf(),
                tls_at_start: loaded.tls.is_some(),
                snapshot: Mutex::new(Snapshot::of(&loaded)),
                checked: Mutex::new(Instant::now()),
                refreshing: AtomicBool::new(false),
                disk: Mutex::new(Disk {
                    files: loaded.files,
                    error: None,
                }),
            }),
            verified: Mutex::new(HashMap::new()),
            limiter: Limiter::default(),
            failed,
            handshakes,
        })
    }

    /// The counters, for the registry.
    pub fn metrics(&self) -> Vec<prometheus::IntCounterVec> {
        vec![self.failed.clone(), self.handshakes.clone()]
    }

    /// Whether connections are TLS.
    pub fn tls(&self) -> bool {
        self.shared.tls_at_start
    }

    /// The settings in force; starts a check of the files when one is due (at most once a
    /// second, never on the caller's thread when a runtime is there).
    fn current(&self) -> Snapshot {
        let current = self.shared.current();
        self.shared.maybe_refresh();
        current
    }

    /// Whether `user`/`password` passed a check recently (no bcrypt).
    fn remembered(&self, users: &BTreeMap<String, String>, user: &str, password: &str) -> bool {
        let Some(hash) = users.get(user) else {
            return false;
        };
        let key = verified_key(user, password, Some(hash));
        let v = self.verified.lock().unwrap_or_else(PoisonError::into_inner);
        v.get(&key).is_some_and(|t| t.elapsed() < VERIFIED_FOR)
    }

    /// Checks `user`/`password` against `users` (bcrypt, off the async workers).
    async fn verify(&self, users: &BTreeMap<String, String>, user: &str, password: &str) -> bool {
        let hash = users.get(user).cloned();
        let key = verified_key(user, password, hash.as_deref());
        let password = password.to_owned();
        let known = hash.is_some();
        let hash = hash.unwrap_or_else(|| DUMMY_HASH.to_owned());
        let ok = tokio::task::spawn_blocking(move || bcrypt::verify(password, &hash))
            .await
            .ok()
            .and_then(Result::ok)
            .unwrap_or(false)
            && known;
        if ok {
            let mut v = self.verified.lock().unwrap_or_else(PoisonError::into_inner);
            if v.len() >= VERIFIED_CACHE {
                v.clear();
            }
            v.insert(key, Instant::now());
        }
        ok
    }
}

fn basic_credentials(req: &Request) -> Option<(String, String)> {
    let value = req.headers().get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, encoded) = value.split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(encoded.trim())
        .ok()?;
    let text = String::from_utf8(decoded).ok()?;
    let (user, password) = text.split_once(':')?;
    Some((user.to_owned(), password.to_owned()))
}

fn unauthorized(status: StatusCode, message: &str, path: &str) -> Response {
    let mut resp = if path.starts_with("/api/") {
        super::admin::error(status, message)
    } else {
        (status, format!("{message}\n")).into_response()
    };
    if status == StatusCode::UNAUTHORIZED {
        resp.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            HeaderValue::from_static("Basic realm=\"autotuner\""),
        );
    }
    resp
}

/// The middleware: basic auth when users are configured, and the configured headers on every
/// answer. An attempt is counted before its bcrypt runs, so a burst of wrong passwords from one
/// address costs at most ten bcrypts a minute; a remembered success costs none and is not
/// counted.
pub async fn middleware(State(web): State<Arc<WebConfig>>, req: Request, next: Next) -> Response {
    let Snapshot { users, headers, .. } = web.current();
    let mut resp = if users.is_empty() {
        next.run(req).await
    } else {
        let from: Option<IpAddr> = req
            .extensions()
            .get::<ConnectInfo<SocketAddr>>()
            .map(|c| c.0.ip());
        let path = req.uri().path().to_owned();
        let limited = || {
            web.failed.with_label_values(&["rate_limited"]).inc();
            unauthorized(
                StatusCode::TOO_MANY_REQUESTS,
                "too many failed attempts from this address; wait a minute",
                &path,
            )
        };
        if web.limiter.limited(from) {
            limited()
        } else {
            match basic_credentials(&req) {
                None => {
                    web.failed.with_label_values(&["missing"]).inc();
                    unauthorized(StatusCode::UNAUTHORIZED, "Unauthorized", &path)
                }
                Some((user, password)) if web.remembered(&users, &user, &password) => {
                    next.run(req).await
                }
                Some((user, password)) => match web.limiter.attempt(from) {
                    None => limited(),
                    Some(attempt) => {
                        if web.verify(&users, &user, &password).await {
                            attempt.succeeded();
                            next.run(req).await
                        } else {
                            // The attempt stays counted.
                            web.failed.with_label_values(&["invalid"]).inc();
                            unauthorized(StatusCode::UNAUTHORIZED, "Unauthorized", &path)
                        }
                    }
                },
            }
        }
    };
    for (name, value) in headers.iter() {
        resp.headers_mut().insert(name.clone(), value.clone());
    }
    resp
}

/// A listener that hands axum connections whose TLS handshake finished; the handshakes run
/// in their own tasks (with a timeout), so one slow client never holds up the others.
pub struct TlsListener {
    rx: tokio::sync::mpsc::Receiver<(TlsStream<tokio::net::TcpStream>, SocketAddr)>,
    local: SocketAddr,
}

impl TlsListener {
    /// Accepts on `listener` until `shutdown`, with the certificates `web` holds at each
    /// connection.
    pub fn new(
        listener: TcpListener,
        web: Arc<WebConfig>,
        mut shutdown: Shutdown,
    ) -> std::io::Result<TlsListener> {
        let local = listener.local_addr()?;
        let (tx, rx) = tokio::sync::mpsc::channel(64);
        let slots = Arc::new(tokio::sync::Semaphore::new(MAX_HANDSHAKES));
        tokio::spawn(async move {
            loop {
                let accepted = tokio::select! {
                    a = listener.accept() => a,
                    () = shutdown.wait() => return,
                };
                let (tcp, peer) = match accepted {
                    Ok(a) => a,
                    Err(err) => {
                        // Out of file descriptors and the like: wait instead of spinning.
                        tracing::warn!(error = %err, "accepting a connection failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                };
                let Ok(permit) = slots.clone().acquire_owned().await else {
                    return;
                };
                let Some(config) = web.current().tls else {
                    return;
                };
                let tx = tx.clone();
                let web = web.clone();
                tokio::spawn(async move {
                    let _permit = permit;
                    let _ = tcp.set_nodelay(true);
                    match tokio::time::timeout(
                        HANDSHAKE_TIMEOUT,
                        TlsAcceptor::from(config).accept(tcp),
                    )
                    .await
                    {
                        Ok(Ok(stream)) => {
                            let _ = tx.send((stream, peer)).await;
                        }
                        Ok(Err(err)) => {
                            web.handshakes.with_label_values(&["error"]).inc();
                            tracing::debug!(peer = %peer, error = %err, "TLS handshake failed");
                        }
                        Err(_) => {
                            web.handshakes.with_label_values(&["timeout"]).inc();
                            tracing::debug!(peer = %peer, "TLS handshake timed out");
                        }
                    }
                });
            }
        });
        Ok(TlsListener { rx, local })
    }
}

impl axum::serve::Listener for TlsListener {
    type Io = TlsStream<tokio::net::TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.rx.recv().await {
            Some(c) => c,
            // The acceptor stopped (shutdown): nothing more will come; the server's graceful
            // shutdown ends the serving loop.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        Ok(self.local)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, text).unwrap();
        p
    }

    #[test]
    fn errors_name_the_line_and_the_reason() {
        let d = tempfile::tempdir().unwrap();
        let cases = [
            (
                "tls_server_config:\n  cert_file: nope.crt\n  key_file: nope.key\n",
                "nope.crt",
            ),
            ("basic_auth_users:\n  alice: plain\n", "bcrypt"),
            ("tls_server_confg: {}\n", "unknown field"),
            (
                "http_server_config:\n  headers:\n    Set-Cookie: x\n",
                "cannot be set",
            ),
        ];
        for (text, want) in cases {
            let p = write(d.path(), "web.yml", text);
            let err = load(&p).err().unwrap();
            assert!(err.contains(want), "{text:?}: {err}");
            assert!(err.starts_with(&format!("{}:", p.display())), "{err}");
        }
        let p = write(d.path(), "web.yml", "basic_auth_users:\n  a: x\n  b: y\n");
        let err = load(&p).err().unwrap();
        assert!(err.contains(":2:"), "{err}");
    }

    #[test]
    fn the_dummy_hash_costs_what_a_real_one_does() {
        // An unparsable dummy would fail fast and let timing tell unknown users apart.
        let parts: bcrypt::HashParts = DUMMY_HASH.parse().unwrap();
        assert_eq!(parts.get_cost(), 10);
        assert!(!bcrypt::verify("", DUMMY_HASH).unwrap());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 1)]
    async fn a_request_never_waits_for_the_files() {
        let d = tempfile::tempdir().unwrap();
        let hash = bcrypt::hash("x", 4).unwrap();
        let p = write(
            d.path(),
            "web.yml",
            &format!("basic_auth_users:\n  old: '{hash}'\n"),
        );
        let w = WebConfig::load(&p).unwrap();
        tokio::time::sleep(CHECK_EVERY + Duration::from_millis(100)).await;
        write(
            d.path(),
            "web.yml",
            &format!("basic_auth_users:\n  new: '{hash}'\n"),
        );
        // The request that finds the check due gets the settings in force; the files are read
        // on a blocking thread, and a later request gets the new ones.
        assert!(w.current().users.contains_key("old"));
        let deadline = Instant::now() + Duration::from_secs(10);
        while !w.current().users.contains_key("new") {
            assert!(Instant::now() < deadline, "the edit was never read");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    #[test]
    fn an_empty_file_means_no_tls_and_no_users() {
        let d = tempfile::tempdir().unwrap();
        let p = write(d.path(), "web.yml", "# nothing\n");
        let l = load(&p).unwrap();
        assert!(l.tls.is_none() && l.users.is_empty() && l.headers.is_empty());
    }
}
