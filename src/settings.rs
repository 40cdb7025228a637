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
use regex::Regex;
use serde::Deserialize;

use crate::yaml::{self, Diagnostic, Locator, Seg};

/// The default listen port. The 9100–9999 block of Prometheus's default port allocations is
/// taken (node_exporter 9100, redis_exporter 9121, postgres_exporter 9187, ...); new exporters
/// are told to pick outside it, so ours is 10150.
pub const DEFAULT_PORT: u16 = 10150;

/// node_exporter's default mount point exclusion: kernel, runtime and container-internal mounts.
pub const DEFAULT_MOUNT_POINTS_EXCLUDE: &str =
    "^/(dev|proc|run/credentials/.+|sys|var/lib/docker/.+|var/lib/containers/storage/.+)($|/)";

/// node_exporter's default filesystem type exclusion: pseudo, virtual and read-only image
/// filesystems whose "usage" means nothing to an operator.
pub const DEFAULT_FS_TYPES_EXCLUDE: &str = "^(autofs|binfmt_misc|bpf|cgroup2?|configfs|debugfs|devpts|devtmpfs|fusectl|hugetlbfs|iso9660|mqueue|nsfs|overlay|proc|procfs|pstore|rpc_pipefs|securityfs|selinuxfs|squashfs|erofs|sysfs|tracefs)$";

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
        let config = match &flags.config_file {
            Some(file) => Config::load(file)?,
            // No file means the defaults, which go through the same validation.
            None => Config::parse("").map_err(|diagnostics| SettingsError::Invalid {
                path: PathBuf::from("<defaults>"),
                diagnostics,
            })?,
        };
        Ok(Settings {
            listen,
            telemetry_path: path.clone(),
            config,
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

/// What the configuration file says, validated.
#[derive(Debug, Clone)]
pub struct Config {
    /// The host collector, unless disabled.
    pub host: Option<HostConfig>,
    /// How long the in-memory history keeps each series.
    pub history_retention: Duration,
}

/// The host collector's settings.
#[derive(Debug, Clone)]
pub struct HostConfig {
    /// Time between collections.
    pub interval: Duration,
    /// Longest a collection may take.
    pub timeout: Duration,
    /// Filesystems whose mount point matches are left out.
    pub mount_points_exclude: Regex,
    /// Filesystems whose type matches are left out.
    pub fs_types_exclude: Regex,
    /// Network interfaces whose name matches are left out.
    pub network_devices_exclude: Option<Regex>,
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

    /// Decodes and validates configuration text; every problem is reported.
    pub fn parse(text: &str) -> Result<Self, Vec<Diagnostic>> {
        let (spec, locator) = yaml::from_str::<ConfigSpec>(text)?;
        spec.validate(&locator)
    }
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

/// The configuration file, as written.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct ConfigSpec {
    collectors: CollectorsSpec,
    history: HistorySpec,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct CollectorsSpec {
    host: HostSpec,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct HostSpec {
    enabled: bool,
    interval: HumanDuration,
    timeout: Option<HumanDuration>,
    filesystem: FilesystemSpec,
    network: NetworkSpec,
}

impl Default for HostSpec {
    fn default() -> Self {
        HostSpec {
            enabled: true,
            // Five seconds: fine enough for a rule's `for: 30s` to see six samples, cheap
            // enough (a few /proc reads) to be invisible on the host.
            interval: HumanDuration(Duration::from_secs(5)),
            timeout: None,
            filesystem: FilesystemSpec::default(),
            network: NetworkSpec::default(),
        }
    }
}

impl HostSpec {
    /// Four fifths of the interval: a collection that overruns it is cut off before the next
    /// one is due, so they never pile up.
    fn default_timeout(&self) -> Duration {
        self.interval.0.mul_f64(0.8)
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct FilesystemSpec {
    mount_points_exclude: String,
    fs_types_exclude: String,
}

impl Default for FilesystemSpec {
    fn default() -> Self {
        FilesystemSpec {
            mount_points_exclude: DEFAULT_MOUNT_POINTS_EXCLUDE.to_owned(),
            fs_types_exclude: DEFAULT_FS_TYPES_EXCLUDE.to_owned(),
        }
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct NetworkSpec {
    devices_exclude: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct HistorySpec {
    retention: HumanDuration,
}

impl Default for HistorySpec {
    fn default() -> Self {
        // Ten minutes: the longest window the shipped rules read (`rate(...[5m])` with a
        // `for: 5m` on top) with room to spare, at a few kilobytes per series.
        HistorySpec {
            retention: HumanDuration(Duration::from_secs(600)),
        }
    }
}

/// Shortest collection interval: CPU usage is a difference of two readings, and the kernel's
/// counters move in 10 ms ticks, so much finer intervals only measure noise.
const MIN_INTERVAL: Duration = Duration::from_secs(1);

/// Longest history: a day at a 5 s interval is 17,280 points a series; beyond that, use
/// Prometheus.
const MAX_RETENTION: Duration = Duration::from_secs(24 * 3600);

impl ConfigSpec {
    fn validate(self, loc: &Locator) -> Result<Config, Vec<Diagnostic>> {
        let mut errors = Vec::new();
        let host_path =
            |field: &str| -> Vec<Seg> { vec!["collectors".into(), "host".into(), field.into()] };
        let h = &self.collectors.host;
        if h.interval.0 < MIN_INTERVAL {
            errors.push(loc.error_at(
                &host_path("interval"),
                format!("interval must be at least {}s", MIN_INTERVAL.as_secs()),
            ));
        }
        let timeout = h.timeout.map_or_else(|| h.default_timeout(), |t| t.0);
        if timeout > h.interval.0 {
            errors.push(loc.error_at(
                &host_path("timeout"),
                "timeout must not be longer than the interval",
            ));
        }
        let mut regex = |path: Vec<Seg>, pattern: &str| -> Option<Regex> {
            match Regex::new(pattern) {
                Ok(r) => Some(r),
                Err(err) => {
                    errors.push(loc.error_at(&path, format!("invalid regular expression: {err}")));
                    None
                }
            }
        };
        let fs = |f: &str| {
            vec![
                "collectors".into(),
                "host".into(),
                "filesystem".into(),
                Seg::Key(f.into()),
            ]
        };
        let mount_points_exclude = regex(
            fs("mount_points_exclude"),
            &h.filesystem.mount_points_exclude,
        );
        let fs_types_exclude = regex(fs("fs_types_exclude"), &h.filesystem.fs_types_exclude);
        let network_devices_exclude = match &h.network.devices_exclude {
            Some(p) => regex(
                vec![
                    "collectors".into(),
                    "host".into(),
                    "network".into(),
                    "devices_exclude".into(),
                ],
                p,
            )
            .map(Some),
            None => Some(None),
        };
        let retention = self.history.retention.0;
        if retention > MAX_RETENTION {
            errors.push(loc.error_at(
                &["history".into(), "retention".into()],
                "retention must be at most 24h",
            ));
        }
        if h.enabled && retention < h.interval.0 {
            errors.push(loc.error_at(
                &["history".into(), "retention".into()],
                "retention must be at least one host collection interval",
            ));
        }
        match (
            mount_points_exclude,
            fs_types_exclude,
            network_devices_exclude,
        ) {
            (Some(mount_points_exclude), Some(fs_types_exclude), Some(network_devices_exclude))
                if errors.is_empty() =>
            {
                Ok(Config {
                    host: h.enabled.then(|| HostConfig {
                        interval: h.interval.0,
                        timeout,
                        mount_points_exclude,
                        fs_types_exclude,
                        network_devices_exclude,
                    }),
                    history_retention: retention,
                })
            }
            _ => Err(errors),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn errors(text: &str) -> Vec<String> {
        match Config::parse(text) {
            Ok(c) => panic!("expected errors, got {c:?}"),
            Err(d) => d.iter().map(ToString::to_string).collect(),
        }
    }

    #[test]
    fn the_default_patterns_compile() {
        Regex::new(DEFAULT_MOUNT_POINTS_EXCLUDE).unwrap();
        Regex::new(DEFAULT_FS_TYPES_EXCLUDE).unwrap();
        let c = Config::parse("").unwrap();
        let h = c.host.unwrap();
        assert!(h.mount_points_exclude.is_match("/proc/sys"));
        assert!(h.mount_points_exclude.is_match("/dev"));
        assert!(!h.mount_points_exclude.is_match("/"));
        assert!(!h.mount_points_exclude.is_match("/devices"));
        assert!(h.fs_types_exclude.is_match("cgroup2"));
        assert!(!h.fs_types_exclude.is_match("ext4"));
        assert_eq!(h.interval, Duration::from_secs(5));
        assert_eq!(h.timeout, Duration::from_secs(4));
        assert_eq!(c.history_retention, Duration::from_secs(600));
    }

    #[test]
    fn a_full_file_is_read() {
        let c = Config::parse(
            "collectors:\n  host:\n    interval: 10s\n    timeout: 2s\n    network:\n      devices_exclude: '^lo$'\nhistory:\n  retention: 1h\n",
        )
        .unwrap();
        let h = c.host.unwrap();
        assert_eq!(h.interval, Duration::from_secs(10));
        assert_eq!(h.timeout, Duration::from_secs(2));
        assert!(h.network_devices_exclude.unwrap().is_match("lo"));
        assert_eq!(c.history_retention, Duration::from_secs(3600));
    }

    #[test]
    fn the_host_collector_can_be_disabled() {
        let c = Config::parse("collectors:\n  host:\n    enabled: false\n").unwrap();
        assert!(c.host.is_none());
    }

    #[test]
    fn every_error_is_reported_with_its_line() {
        let errs = errors(
            "collectors:\n  host:\n    interval: soon\n    colour: blue\n    filesystem:\n      fs_types_exclude: '('\nhistory:\n  retention: 1h\n  retention: 2h\n",
        );
        assert_eq!(errs.len(), 3, "{errs:?}");
        assert!(
            errs[0].starts_with("3:15: invalid duration \"soon\""),
            "{errs:?}"
        );
        assert!(
            errs[1].starts_with("4:5: unknown field `colour`"),
            "{errs:?}"
        );
        assert!(
            errs[2].starts_with("9:3: duplicate key `retention`"),
            "{errs:?}"
        );
    }

    #[test]
    fn semantic_errors_point_at_their_value() {
        let errs = errors(
            "collectors:\n  host:\n    interval: 5s\n    timeout: 6s\n    filesystem:\n      fs_types_exclude: '('\nhistory:\n  retention: 2d\n",
        );
        assert_eq!(errs.len(), 3, "{errs:?}");
        assert!(
            errs[0].starts_with("4:14: timeout must not be longer"),
            "{errs:?}"
        );
        assert!(
            errs[1].starts_with("6:25: invalid regular expression"),
            "{errs:?}"
        );
        assert!(
            errs[2].starts_with("8:14: retention must be at most 24h"),
            "{errs:?}"
        );
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
