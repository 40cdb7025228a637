//! Settings: the command line (flags with `AUTOTUNER_*` environment fallbacks) and the YAML
//! configuration file, validated once into the runtime `Settings` that nothing else can build.
//!
//! Owns the flag names, the file's schema and its defaults, and every validation rule. Uses
//! `yaml` for located decoding; nothing else of ours.
//!
//! Two stages, as the rest of the crate expects: `*Spec` types mirror what the operator wrote
//! (serde, `deny_unknown_fields`, human durations), and `validate` turns them into runtime types
//! (compiled regexes, checked bounds), reporting every problem with its file, line and column.

use std::fmt;
use std::net::{SocketAddr, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};
use serde::Deserialize;

use crate::yaml::Diagnostic;

pub mod config;
pub mod remote;
pub mod secret;

pub use config::{
    Config, DEFAULT_FS_TYPES_EXCLUDE, DEFAULT_MOUNT_POINTS_EXCLUDE, HostConfig, HttpMethod,
    HttpTarget, POSTGRES_SCHEMES, PgBouncerConfig, PostgresConfig, ProbeConfig, REDIS_SCHEMES,
    RedisConfig, Target, Timing,
};
pub use remote::{HttpAuth, ScrapeConfig, ScrapeTarget, SourceConfig};
use secret::SecretUrl;

/// The default listen port. The 9100–9999 block of Prometheus's default port allocations is
/// taken (node_exporter 9100, redis_exporter 9121, postgres_exporter 9187, ...); new exporters
/// are told to pick outside it, so ours is 10150.
pub const DEFAULT_PORT: u16 = 10150;

/// The command line.
#[derive(Debug, Parser)]
#[command(
    name = "autotuner",
    version,
    about = "Measures host, PostgreSQL, PgBouncer and Redis, publishes it for Prometheus, and corrects what goes wrong by YAML rules.",
    long_about = None
)]
pub struct Cli {
    /// A one-off command instead of running the exporter.
    #[command(subcommand)]
    pub command: Option<Command>,

    /// Flags of the running exporter.
    #[command(flatten)]
    pub run: RunFlags,
}

/// One-off commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Validate files without running anything; exit 0 when all are valid, 1 otherwise.
    Check {
        /// What to check.
        #[command(subcommand)]
        what: CheckCommand,
    },
    /// Run unit tests; exit 0 when all pass, 1 otherwise.
    Test {
        /// What to test.
        #[command(subcommand)]
        what: TestCommand,
    },
}

/// What `test` runs.
#[derive(Debug, Subcommand)]
pub enum TestCommand {
    /// Run rule unit tests in promtool's test-file format (plus `action_test`).
    Rules {
        /// The test files.
        #[arg(required = true)]
        files: Vec<PathBuf>,
    },
}

/// What `check` validates.
#[derive(Debug, Subcommand)]
pub enum CheckCommand {
    /// Validate configuration files, reporting every error with file, line and column.
    Config {
        /// The files to check.
        #[arg(required = true)]
        files: Vec<PathBuf>,
    },
    /// Validate rule files as one set (names unique across them), like `promtool check rules`.
    Rules {
        /// The configuration the rules will run with: knob actions are checked against the
        /// knobs it declares.
        #[arg(long = "config.file", env = "AUTOTUNER_CONFIG_FILE")]
        config: Option<PathBuf>,
        /// The files to check.
        #[arg(required = true)]
        files: Vec<PathBuf>,
    },
}

/// Flags of the running exporter, in the Prometheus exporter conventions.
#[derive(Debug, Args)]
pub struct RunFlags {
    /// Addresses to listen on: `:PORT` (all interfaces), `HOST:PORT` or `[IPv6]:PORT`; repeat the
    /// flag or separate with commas for several.
    #[arg(
        long = "web.listen-address",
        env = "AUTOTUNER_WEB_LISTEN_ADDRESS",
        default_value = ":10150",
        value_delimiter = ',',
        value_name = "ADDRESS"
    )]
    pub listen_addresses: Vec<String>,

    /// Path under which to expose metrics.
    #[arg(
        long = "web.telemetry-path",
        env = "AUTOTUNER_WEB_TELEMETRY_PATH",
        default_value = "/metrics",
        value_name = "PATH"
    )]
    pub telemetry_path: String,

    /// YAML configuration file; without one, the defaults apply (host collector on).
    #[arg(
        long = "config.file",
        env = "AUTOTUNER_CONFIG_FILE",
        value_name = "FILE"
    )]
    pub config_file: Option<PathBuf>,

    /// Directory of rule files (`*.yml`, `*.yaml`), watched and reloaded on change.
    #[arg(
        long = "rules.dir",
        env = "AUTOTUNER_RULES_DIR",
        default_value = "./rules",
        value_name = "DIR"
    )]
    pub rules_dir: PathBuf,

    /// Directory for state that survives restarts (rule state, the gate, knobs, the audit log).
    #[arg(
        long = "data.dir",
        env = "AUTOTUNER_DATA_DIR",
        default_value = "./data",
        value_name = "DIR"
    )]
    pub data_dir: PathBuf,

    /// YAML file of playbooks (named lists of actions the admin API runs on demand). Without
    /// the flag, `./playbooks.yml` is read when it exists.
    #[arg(
        long = "playbooks.file",
        env = "AUTOTUNER_PLAYBOOKS_FILE",
        value_name = "FILE"
    )]
    pub playbooks_file: Option<PathBuf>,

    /// YAML file of the admin API's bearer tokens (re-read when it changes). Tokens can also
    /// come from `AUTOTUNER_READ_TOKEN` and `AUTOTUNER_OPERATE_TOKEN`.
    #[arg(
        long = "web.tokens-file",
        env = "AUTOTUNER_WEB_TOKENS_FILE",
        value_name = "FILE"
    )]
    pub tokens_file: Option<PathBuf>,

    /// YAML file of TLS and basic-auth settings for every route, in the Prometheus
    /// exporter-toolkit format (re-read when it or the certificates change).
    #[arg(
        long = "web.config.file",
        env = "AUTOTUNER_WEB_CONFIG_FILE",
        value_name = "FILE"
    )]
    pub web_config_file: Option<PathBuf>,

    /// Only log messages with the given severity or above. `RUST_LOG`, when set, overrides it
    /// with a full tracing filter.
    #[arg(
        long = "log.level",
        env = "AUTOTUNER_LOG_LEVEL",
        default_value = "info",
        value_name = "LEVEL"
    )]
    pub log_level: LogLevel,

    /// Output format of log messages (to standard error).
    #[arg(
        long = "log.format",
        env = "AUTOTUNER_LOG_FORMAT",
        default_value = "logfmt",
        value_name = "FORMAT"
    )]
    pub log_format: LogFormat,
}

/// Log severities, as Prometheus exporters name them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogLevel {
    /// Everything, including per-collection detail.
    Debug,
    /// Start, stop, and state changes.
    Info,
    /// Something failed but we carry on.
    Warn,
    /// Something failed that needs an operator.
    Error,
}

impl LogLevel {
    /// The tracing filter directive for this level.
    pub fn as_filter(self) -> &'static str {
        match self {
            LogLevel::Debug => "debug",
            LogLevel::Info => "info",
            LogLevel::Warn => "warn",
            LogLevel::Error => "error",
        }
    }
}

/// Log line formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// `key=value` pairs, one event a line.
    Logfmt,
    /// One JSON object a line.
    Json,
}

/// Everything the running exporter needs, validated.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Where to listen, resolved.
    pub listen: Vec<SocketAddr>,
    /// The metrics path, starting with `/`.
    pub telemetry_path: String,
    /// What the configuration file (or its absence) says.
    pub config: Config,
    /// The rules directory.
    pub rules_dir: PathBuf,
    /// The data directory.
    pub data_dir: PathBuf,
    /// The playbooks file, and whether it was named (a named file must exist).
    pub playbooks_file: (PathBuf, bool),
    /// The admin API's tokens file.
    pub tokens_file: Option<PathBuf>,
    /// The TLS and basic-auth file.
    pub web_config_file: Option<PathBuf>,
}

impl Settings {
    /// Validates the flags and loads the configuration file they name.
    pub fn from_flags(flags: &RunFlags) -> Result<Self, SettingsError> {
        let mut listen = Vec::new();
        for text in &flags.listen_addresses {
            listen.extend(parse_listen_address(text)?);
        }
        if listen.is_empty() {
            return Err(SettingsError::Flag {
                flag: "web.listen-address",
                message: "at least one address is needed".into(),
            });
        }
        let path = &flags.telemetry_path;
        if !path.starts_with('/') || path == "/" || path.starts_with("/-/") || path.contains(' ') {
            return Err(SettingsError::Flag {
                flag: "web.telemetry-path",
                message: format!(
                    "{path:?} must be an absolute path other than `/` and outside `/-/`"
                ),
            });
        }
        let mut config = match &flags.config_file {
            Some(file) => Config::load(file)?,
            // No file means the defaults, which go through the same validation.
            None => Config::parse("").map_err(|diagnostics| SettingsError::Invalid {
                path: PathBuf::from("<defaults>"),
                diagnostics,
            })?,
        };
        apply_env_targets(&mut config, |name| std::env::var(name).ok())?;
        Ok(Settings {
            listen,
            telemetry_path: path.clone(),
            config,
            rules_dir: flags.rules_dir.clone(),
            data_dir: flags.data_dir.clone(),
            playbooks_file: match &flags.playbooks_file {
                Some(f) => (f.clone(), true),
                None => (PathBuf::from("./playbooks.yml"), false),
            },
            tokens_file: flags.tokens_file.clone(),
            web_config_file: flags.web_config_file.clone(),
        })
    }
}

/// `:PORT`, `HOST:PORT`, `[V6]:PORT` → socket addresses (a host name may resolve to several).
pub fn parse_listen_address(text: &str) -> Result<Vec<SocketAddr>, SettingsError> {
    let bad = |message: String| SettingsError::Flag {
        flag: "web.listen-address",
        message,
    };
    let text = text.trim();
    let full = match text.strip_prefix(':') {
        // Go's `:PORT` means every interface; IPv4's wildcard works on hosts without IPv6 too.
        Some(port) => format!("0.0.0.0:{port}"),
        None => text.to_owned(),
    };
    let addrs: Vec<SocketAddr> = full
        .to_socket_addrs()
        .map_err(|err| bad(format!("{text:?} is not HOST:PORT: {err}")))?
        .collect();
    if addrs.is_empty() {
        return Err(bad(format!("{text:?} resolves to no address")));
    }
    Ok(addrs)
}

impl Config {
    /// Reads, decodes and validates a configuration file.
    pub fn load(path: &Path) -> Result<Self, SettingsError> {
        let text = read_text(path)?;
        Self::parse(&text).map_err(|diagnostics| SettingsError::Invalid {
            path: path.to_owned(),
            diagnostics,
        })
    }
}

/// The name of a target given by an environment variable rather than the file.
pub const ENV_TARGET_NAME: &str = "default";

/// Adds the targets given by the environment, the way twelve-factor deployments hand them out:
/// `AUTOTUNER_REDIS_URL` (or `REDIS_URL`) becomes the Redis target named `default`,
/// `AUTOTUNER_POSTGRES_URL` (or `DATABASE_URL`) the PostgreSQL one, `AUTOTUNER_PGBOUNCER_URL`
/// the PgBouncer one. The `AUTOTUNER_` variable wins over the generic one.
pub fn apply_env_targets(
    config: &mut Config,
    env: impl Fn(&str) -> Option<String>,
) -> Result<(), SettingsError> {
    let pick = |names: &[&'static str]| -> Option<(&'static str, String)> {
        names
            .iter()
            .find_map(|n| env(n).filter(|v| !v.trim().is_empty()).map(|v| (*n, v)))
    };
    let add = |names: &[&'static str], schemes: &[&str], what: &str, targets: &mut Vec<Target>| {
        let Some((var, value)) = pick(names) else {
            return Ok(());
        };
        let url = SecretUrl::parse(value.trim())
            .map_err(|message| SettingsError::Env { var, message })?;
        if !schemes.contains(&url.scheme()) {
            return Err(SettingsError::Env {
                var,
                message: format!(
                    "URL scheme {:?} is not one of {}",
                    url.scheme(),
                    schemes.join(", ")
                ),
            });
        }
        if targets.iter().any(|t| t.name == ENV_TARGET_NAME) {
            return Err(SettingsError::Env {
                var,
                message: format!(
                    "the configuration file already has a {what} target named {ENV_TARGET_NAME:?}"
                ),
            });
        }
        targets.push(Target {
            name: ENV_TARGET_NAME.to_owned(),
            url,
            tls_ca_file: None,
        });
        Ok(())
    };
    add(
        &["AUTOTUNER_REDIS_URL", "REDIS_URL"],
        REDIS_SCHEMES,
        "Redis",
        &mut config.redis.targets,
    )?;
    add(
        &["AUTOTUNER_POSTGRES_URL", "DATABASE_URL"],
        POSTGRES_SCHEMES,
        "PostgreSQL",
        &mut config.postgres.targets,
    )?;
    add(
        &["AUTOTUNER_PGBOUNCER_URL"],
        POSTGRES_SCHEMES,
        "PgBouncer",
        &mut config.pgbouncer.targets,
    )?;
    Ok(())
}

/// Largest configuration file we read: far beyond any real one, small enough that a wrong path
/// (a log file, a device) fails fast instead of filling memory.
const MAX_CONFIG_BYTES: u64 = 4 << 20;

fn read_text(path: &Path) -> Result<String, SettingsError> {
    let io = |source| SettingsError::Read {
        path: path.to_owned(),
        source,
    };
    let meta = std::fs::metadata(path).map_err(io)?;
    if meta.len() > MAX_CONFIG_BYTES {
        return Err(SettingsError::Invalid {
            path: path.to_owned(),
            diagnostics: vec![Diagnostic {
                line: 1,
                column: 1,
                message: format!(
                    "file is {} bytes, more than the {MAX_CONFIG_BYTES} a configuration may have",
                    meta.len()
                ),
            }],
        });
    }
    std::fs::read_to_string(path).map_err(io)
}

/// Why the settings could not be built.
#[derive(Debug, thiserror::Error)]
pub enum SettingsError {
    /// A flag's value is unusable.
    #[error("--{flag}: {message}")]
    Flag {
        /// The flag, without dashes.
        flag: &'static str,
        /// What is wrong.
        message: String,
    },
    /// An environment variable's value is unusable (the message never repeats the value).
    #[error("${var}: {message}")]
    Env {
        /// The variable.
        var: &'static str,
        /// What is wrong.
        message: String,
    },
    /// The configuration file could not be read.
    #[error("reading {}: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The configuration file has errors.
    #[error("{}", Located { path, diagnostics })]
    Invalid {
        /// The file.
        path: PathBuf,
        /// Every problem found.
        diagnostics: Vec<Diagnostic>,
    },
}

/// Formats diagnostics one a line as `FILE:LINE:COL: message`, the shape editors jump to.
pub struct Located<'a> {
    /// The file the diagnostics are about.
    pub path: &'a Path,
    /// The diagnostics.
    pub diagnostics: &'a [Diagnostic],
}

impl fmt::Display for Located<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, d) in self.diagnostics.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            write!(f, "{}:{d}", self.path.display())?;
        }
        Ok(())
    }
}

/// A duration written the Prometheus way: `500ms`, `30s`, `5m`, `1h30m`, `7d`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HumanDuration(pub Duration);

impl serde::Serialize for HumanDuration {
    /// As milliseconds with a unit (`1500ms`), which `parse` reads back.
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&format!("{}ms", self.0.as_millis()))
    }
}

impl HumanDuration {
    /// Parses a Prometheus-style duration.
    pub fn parse(text: &str) -> Result<Self, String> {
        // promql-parser also accepts a bare number of seconds, through a conversion that panics
        // on negative or non-finite input; refuse those first.
        if let Ok(seconds) = text.parse::<f64>()
            && (!seconds.is_finite() || seconds <= 0.0 || seconds > 1e12)
        {
            return Err(format!(
                "invalid duration {text:?}: expected a positive duration such as 30s, 5m or 1h30m"
            ));
        }
        promql_parser::util::parse_duration(text)
            .map(HumanDuration)
            .map_err(|err| {
                // The parser's "not a valid duration string: X" only repeats the input; its
                // other messages (overflow, zero) say something.
                let detail = if err.starts_with("not a valid duration string") {
                    String::new()
                } else {
                    format!(" ({err})")
                };
                format!("invalid duration {text:?}{detail}: expected a duration such as 30s, 5m or 1h30m")
            })
    }
}

impl<'de> Deserialize<'de> for HumanDuration {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = HumanDuration;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a duration such as 30s, 5m or 1h30m")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<HumanDuration, E> {
                HumanDuration::parse(v).map_err(E::custom)
            }
        }
        deserializer.deserialize_str(V)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redis_url_from_the_environment_becomes_the_default_target() {
        let mut c = Config::parse("").unwrap();
        let env = |n: &str| match n {
            "REDIS_URL" => Some("redis://:pw@127.0.0.1:1/".to_owned()),
            "AUTOTUNER_REDIS_URL" => Some("redis://127.0.0.1:2/".to_owned()),
            _ => None,
        };
        apply_env_targets(&mut c, env).unwrap();
        assert_eq!(c.redis.targets.len(), 1);
        assert_eq!(c.redis.targets[0].name, "default");
        assert_eq!(c.redis.targets[0].url.redacted(), "redis://127.0.0.1:2/");
        let err = apply_env_targets(&mut c, env).unwrap_err().to_string();
        assert!(err.contains("already has a Redis target"), "{err}");
        let mut c = Config::parse("").unwrap();
        let err = apply_env_targets(&mut c, |n| {
            (n == "REDIS_URL").then(|| "http://:pw@x/".to_owned())
        })
        .unwrap_err()
        .to_string();
        assert!(err.starts_with("$REDIS_URL: URL scheme"), "{err}");
        assert!(!err.contains("pw"), "{err}");
    }

    #[test]
    fn durations_are_prometheus_durations() {
        assert_eq!(
            HumanDuration::parse("1h30m").unwrap().0,
            Duration::from_secs(5400)
        );
        assert_eq!(
            HumanDuration::parse("250ms").unwrap().0,
            Duration::from_millis(250)
        );
        for bad in ["", "0", "-1", "NaN", "inf", "5 minutes", "1e300", "5M"] {
            assert!(HumanDuration::parse(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn listen_addresses_follow_the_exporter_convention() {
        assert_eq!(
            parse_listen_address(":9999").unwrap(),
            vec!["0.0.0.0:9999".parse::<SocketAddr>().unwrap()]
        );
        assert_eq!(
            parse_listen_address("[::1]:0").unwrap(),
            vec!["[::1]:0".parse::<SocketAddr>().unwrap()]
        );
        assert!(parse_listen_address("nonsense").is_err());
    }
}
