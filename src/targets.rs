//! Targets: connection handles to the monitored services, shared by the collectors and (later)
//! the actions, so both use one bounded set of connections per service.
//!
//! Owns how we connect: timeouts, retries, and turning a client library's error into a short
//! reason and a message free of secrets. Uses `settings` (the validated target configuration).

use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};

use crate::settings::RedisTarget;
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
    /// Anything else: a protocol error, an unexpected reply.
    Error,
}

impl FailureReason {
    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            FailureReason::Connect => "connect",
            FailureReason::Auth => "auth",
            FailureReason::Timeout => "timeout",
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
    pub fn new(target: &RedisTarget, deadline: Duration) -> Result<Self, TargetFailure> {
        let failure = |err: redis::RedisError| TargetFailure {
            reason: FailureReason::Error,
            message: target
                .url
                .scrub(&format!("preparing the Redis client: {err}")),
        };
        let client = redis::Client::open(target.url.expose()).map_err(failure)?;
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
