//! Targets: connection handles to the monitored services, shared by the collectors and (later)
//! the actions, so both use one bounded set of connections per service.
//!
//! Owns how we connect: timeouts, retries, and turning a client library's error into a short
//! reason and a message free of secrets. Uses `settings` (the validated target configuration).

use std::time::Duration;

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use tokio_postgres::error::SqlState;

use crate::settings::Target;
use crate::settings::secret::SecretUrl;

/// Why a target could not be reached, as a bounded label value (`reason`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureReason {
    /// TCP connect refused or failed, host unreachable, DNS failed.
    Connect,
    /// The server refused our credentials.
    Auth,
    /// No answer within the deadline.
    Timeout,
    /// The database named in the URL does not exist.
    MissingDatabase,
    /// Anything else: a protocol error, an unexpected reply.
    Error,
}

/// Every reason, for publishing each as 0 or 1.
pub const FAILURE_REASONS: [FailureReason; 5] = [
    FailureReason::Connect,
    FailureReason::Auth,
    FailureReason::Timeout,
    FailureReason::MissingDatabase,
    FailureReason::Error,
];

impl FailureReason {
    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            FailureReason::Connect => "connect",
            FailureReason::Auth => "auth",
            FailureReason::Timeout => "timeout",
            FailureReason::MissingDatabase => "missing_database",
            FailureReason::Error => "error",
        }
    }
}

/// A target failure: the reason and a message already scrubbed of the password.
#[derive(Debug, Clone)]
pub struct TargetFailure {
    /// Bounded classification.
    pub reason: FailureReason,
    /// Human-readable, secret-free.
    pub message: String,
}

/// One Redis server: a lazily connecting, self-healing connection.
#[derive(Clone)]
pub struct RedisHandle {
    /// The target's name (the `target` label).
    pub name: String,
    url: SecretUrl,
    manager: ConnectionManager,
}

impl RedisHandle {
    /// Prepares the connection without connecting: the exporter starts, and reports
    /// `redis_up 0`, while Redis is down. `deadline` bounds one command; the connection manager
    /// reconnects at most once per command, so a dead server costs one short timeout per
    /// collection instead of redis-rs's default ten-second retry walk.
    pub fn new(target: &Target, deadline: Duration) -> Result<Self, TargetFailure> {
        let failure = |err: redis::RedisError| TargetFailure {
            reason: FailureReason::Error,
            message: target
                .url
                .scrub(&format!("preparing the Redis client: {err}")),
        };
        let client = match &target.tls_ca_file {
            None => redis::Client::open(target.url.expose()).map_err(failure)?,
            Some(path) => {
                let pem = std::fs::read(path).map_err(|err| TargetFailure {
                    reason: FailureReason::Error,
                    message: format!("reading tls_ca_file {}: {err}", path.display()),
                })?;
                redis::Client::build_with_tls(
                    target.url.expose(),
                    redis::TlsCertificates {
                        client_tls: None,
                        root_cert: Some(pem),
                    },
                )
                .map_err(failure)?
            }
        };
        let config = ConnectionManagerConfig::new()
            .set_number_of_retries(1)
            .set_min_delay(Duration::from_millis(50))
            .set_max_delay(Duration::from_millis(200))
            .set_connection_timeout(Some(deadline))
            .set_response_timeout(Some(deadline));
        let manager = ConnectionManager::new_lazy_with_config(client, config).map_err(failure)?;
        Ok(RedisHandle {
            name: target.name.clone(),
            url: target.url.clone(),
            manager,
        })
    }

    /// A connection to send commands on (a cheap clone of the shared one).
    pub fn connection(&self) -> ConnectionManager {
        self.manager.clone()
    }

    /// The URL, password redacted.
    pub fn url(&self) -> &SecretUrl {
        &self.url
    }

    /// Classifies a redis-rs error and scrubs the password from its text.
    pub fn failure(&self, err: &redis::RedisError) -> TargetFailure {
        let auth = matches!(err.kind(), redis::ErrorKind::AuthenticationFailed)
            || matches!(err.code(), Some("WRONGPASS" | "NOAUTH" | "NOPERM"));
        let reason = if auth {
            FailureReason::Auth
        } else if err.is_timeout() {
            FailureReason::Timeout
        } else if err.is_connection_refusal() || err.is_io_error() {
            FailureReason::Connect
        } else {
            FailureReason::Error
        };
        TargetFailure {
            reason,
            message: self.url.scrub(&err.to_string()),
        }
    }
}

/// The `application_name` of our own PostgreSQL sessions: the collectors leave sessions with
/// this name out of what they report, and operators can see at a glance which are ours.
pub const PG_APPLICATION_NAME: &str = "autotuner";

/// One PostgreSQL database: a small pool of connections with server-side timeouts.
#[derive(Clone)]
pub struct PgHandle {
    /// The target's name (the `target` label).
    pub name: String,
    url: SecretUrl,
    pool: Pool,
    /// How long to wait for a connection from the pool or a new one.
    deadline: Duration,
    /// The pool's connection settings, for a connection of its own (an index build) and
    /// cancel requests.
    config: tokio_postgres::Config,
    tls: tokio_postgres_rustls::MakeRustlsConnect,
}

impl PgHandle {
    /// Prepares the pool without connecting. Every connection gets `statement_timeout` and
    /// `lock_timeout` from the server itself, so a query we stop waiting for cannot keep
    /// running or queue behind a lock; `deadline` bounds connecting and waiting for the pool.
    pub fn new(
        target: &Target,
        statement_timeout: Duration,
        deadline: Duration,
        pool_size: usize,
    ) -> Result<Self, TargetFailure> {
        let fail = |message: String| TargetFailure {
            reason: FailureReason::Error,
            message: target.url.scrub(&message),
        };
        let crate::pgtls::PgConnect {
            mut config, tls, ..
        } = crate::pgtls::connect_config(&target.url).map_err(fail)?;
        // For a connection of its own (`connect_own`): the URL's settings, ours without the
        // pool's statement timeout.
        let mut plain = config.clone();
        plain
            .application_name(PG_APPLICATION_NAME)
            .connect_timeout(deadline)
            .keepalives_idle(Duration::from_secs(30));
        let ms = statement_timeout.as_millis().max(1);
        let ours = format!("-c statement_timeout={ms} -c lock_timeout={ms}");
        let options = match config.get_options() {
            Some(given) if !given.is_empty() => format!("{given} {ours}"),
            _ => ours,
        };
        config
            .application_name(PG_APPLICATION_NAME)
            .options(options)
            .connect_timeout(deadline)
            // A server that vanishes without closing the connection is noticed within a
            // minute, not after the kernel's two hours.
            .keepalives_idle(Duration::from_secs(30))
            .tcp_user_timeout(Duration::from_secs(30));
        let manager = Manager::from_config(
            config,
            tls.clone(),
            ManagerConfig {
                // A closed connection (server restarted) is replaced on checkout; anything
                // subtler fails the next query, which the collector reports and retries.
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(manager)
            .max_size(pool_size)
            .wait_timeout(Some(deadline))
            .create_timeout(Some(deadline))
            .recycle_timeout(Some(deadline))
            .runtime(Runtime::Tokio1)
            .build()
            .map_err(|err| fail(format!("building the connection pool: {err}")))?;
        Ok(PgHandle {
            name: target.name.clone(),
            url: target.url.clone(),
            pool,
            deadline,
            config: plain,
            tls,
        })
    }

    /// A connection from the pool.
    pub async fn client(&self) -> Result<deadpool_postgres::Object, TargetFailure> {
        use deadpool_postgres::PoolError;
        match self.pool.get().await {
            Ok(client) => Ok(client),
            Err(PoolError::Backend(err)) => Err(self.failure(&err)),
            Err(PoolError::Timeout(_)) => Err(TargetFailure {
                reason: FailureReason::Timeout,
                message: format!("no connection within {:.1}s", self.deadline.as_secs_f64()),
            }),
            Err(err) => Err(TargetFailure {
                reason: FailureReason::Error,
                message: self.url.scrub(&err.to_string()),
            }),
        }
    }

    /// The URL, password redacted.
    pub fn url(&self) -> &SecretUrl {
        &self.url
    }

    /// A connection of its own, outside the pool, with the pool's settings (TLS included)
    /// but without the pool's statement timeout (a long index build is given its own).
    pub async fn connect_own(&self) -> Result<tokio_postgres::Client, TargetFailure> {
        let (client, conn) = self
            .config
            .connect(self.tls.clone())
            .await
            .map_err(|e| self.failure(&e))?;
        tokio::spawn(conn);
        Ok(client)
    }

    /// The TLS connector, for cancel requests.
    pub fn tls(&self) -> tokio_postgres_rustls::MakeRustlsConnect {
        self.tls.clone()
    }

    /// Classifies a tokio-postgres error and scrubs the password from its text.
    pub fn failure(&self, err: &tokio_postgres::Error) -> TargetFailure {
        pg_failure(&self.url, err)
    }
}

/// Classifies a tokio-postgres error (from PostgreSQL or PgBouncer) and scrubs the password of
/// `url` from its text.
pub fn pg_failure(url: &SecretUrl, err: &tokio_postgres::Error) -> TargetFailure {
    {
        let reason = match err.code() {
            Some(c)
                if *c == SqlState::INVALID_PASSWORD
                    || *c == SqlState::INVALID_AUTHORIZATION_SPECIFICATION =>
            {
                FailureReason::Auth
            }
            Some(c) if *c == SqlState::INVALID_CATALOG_NAME => FailureReason::MissingDatabase,
            Some(c) if *c == SqlState::QUERY_CANCELED || *c == SqlState::LOCK_NOT_AVAILABLE => {
                FailureReason::Timeout
            }
            Some(_) => FailureReason::Error,
            None if err.is_closed() => FailureReason::Connect,
            None => {
                // Connection-level failures carry no SQLSTATE; tell a timeout from the rest
                // by the cause's text, the only place tokio-postgres says it.
                let text = error_chain(err);
                if text.contains("timed out") || text.contains("timeout") {
                    FailureReason::Timeout
                } else {
                    FailureReason::Connect
                }
            }
        };
        TargetFailure {
            reason,
            message: url.scrub(&error_chain(err)),
        }
    }
}

/// An error and its causes on one line.
pub fn error_chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(s) = source {
        let next = s.to_string();
        if !text.contains(&next) {
            text.push_str(": ");
            text.push_str(&next);
        }
        source = s.source();
    }
    text
}

/// A client for another HTTP server (a scrape target, a PromQL source): its TLS roots and
/// certificate policy, and an overall timeout a little above the caller's own deadline so that
/// the caller's deadline, with its clearer message, is the one that fires.
pub fn http_client(
    auth: &crate::settings::HttpAuth,
    timeout: Duration,
) -> Result<reqwest::Client, String> {
    let mut builder = reqwest::Client::builder()
        .timeout(timeout + Duration::from_millis(500))
        .connect_timeout(timeout.min(Duration::from_secs(5)))
        .redirect(reqwest::redirect::Policy::limited(10))
        .tls_danger_accept_invalid_certs(auth.insecure_skip_verify)
        .user_agent(concat!("autotuner/", env!("CARGO_PKG_VERSION")));
    if let Some(path) = &auth.tls_ca_file {
        let pem = std::fs::read(path)
            .map_err(|err| format!("reading tls_ca_file {}: {err}", path.display()))?;
        let certs = reqwest::Certificate::from_pem_bundle(&pem)
            .map_err(|err| format!("tls_ca_file {}: {}", path.display(), error_chain(&err)))?;
        // The CA given is the one to trust, as Prometheus's `ca_file` means.
        builder = builder.tls_certs_only(certs);
    }
    builder
        .build()
        .map_err(|err| format!("preparing the HTTP client: {}", error_chain(&err)))
}

/// Adds the configured headers and credentials to a request. Secrets are read from their
/// files now, so a rotated token is used at the next request; the error names the file,
/// never its content.
pub fn authorize(
    mut request: reqwest::RequestBuilder,
    auth: &crate::settings::HttpAuth,
) -> Result<reqwest::RequestBuilder, String> {
    let read = |path: &std::path::Path| {
        std::fs::read_to_string(path)
            .map(|s| s.trim().to_owned())
            .map_err(|err| format!("reading {}: {err}", path.display()))
    };
    for (name, value) in &auth.headers {
        request = request.header(name, value);
    }
    if let Some((user, file)) = &auth.basic_auth {
        request = request.basic_auth(user, Some(read(file)?));
    }
    if let Some(file) = &auth.bearer_token_file {
        request = request.bearer_auth(read(file)?);
    }
    Ok(request)
}
