//! The configuration file: its schema as written (`*Spec`, serde with `deny_unknown_fields`),
//! its defaults, and the validation that turns it into the runtime `Config`.
//!
//! Uses `yaml` for located decoding, `HumanDuration` and `SecretUrl` from this module's parent;
//! nothing else of ours. Every check reports its problem at the line of the offending value.

use std::collections::HashSet;
use std::time::Duration;

use regex::Regex;
use serde::Deserialize;

use super::HumanDuration;
use super::secret::SecretUrl;
use crate::yaml::{self, Diagnostic, Locator, Seg};

/// node_exporter's default mount point exclusion: kernel, runtime and container-internal mounts.
pub const DEFAULT_MOUNT_POINTS_EXCLUDE: &str =
    "^/(dev|proc|run/credentials/.+|sys|var/lib/docker/.+|var/lib/containers/storage/.+)($|/)";

/// node_exporter's default filesystem type exclusion: pseudo, virtual and read-only image
/// filesystems whose "usage" means nothing to an operator.
pub const DEFAULT_FS_TYPES_EXCLUDE: &str = "^(autofs|binfmt_misc|bpf|cgroup2?|configfs|debugfs|devpts|devtmpfs|fusectl|hugetlbfs|iso9660|mqueue|nsfs|overlay|proc|procfs|pstore|rpc_pipefs|securityfs|selinuxfs|squashfs|erofs|sysfs|tracefs)$";

/// What the configuration file says, validated.
#[derive(Debug, Clone)]
pub struct Config {
    /// The host collector, unless disabled.
    pub host: Option<HostConfig>,
    /// The Redis collector and its targets (none: not collected).
    pub redis: RedisConfig,
    /// The HTTP probes and their targets (none: not probed).
    pub http_probe: ProbeConfig,
    /// The PostgreSQL collector and its targets (none: not collected).
    pub postgres: PostgresConfig,
    /// The PgBouncer collector and its targets (none: not collected).
    pub pgbouncer: PgBouncerConfig,
    /// How long the in-memory history keeps each series.
    pub history_retention: Duration,
    /// The actions stage: its global mode, limits, breaker and audit log.
    pub actions: ActionsConfig,
    /// The knobs actions may move.
    pub knobs: Vec<KnobDecl>,
    /// Application endpoints scraped into the history.
    pub scrape: super::remote::ScrapeConfig,
    /// PromQL servers rule groups may be evaluated by.
    pub sources: Vec<super::remote::SourceConfig>,
}

/// Which mode rules act in, at most.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum GlobalMode {
    /// No rule requests anything.
    Observe,
    /// Rules rehearse at most.
    DryRun,
    /// Rules act in their own mode.
    Enforce,
}

/// A token bucket: `count` actions per `per`.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimit {
    /// Actions…
    pub count: u32,
    /// …per this long.
    pub per: HumanDuration,
}

/// The actions stage's settings.
#[derive(Debug, Clone, PartialEq)]
pub struct ActionsConfig {
    /// The highest mode any rule acts in (the kill switch): `observe`, `dry_run` or `enforce`.
    pub mode: GlobalMode,
    /// Longest one action may run.
    pub timeout: Duration,
    /// For all actions together.
    pub global_limit: Option<RateLimit>,
    /// For each target.
    pub target_limit: Option<RateLimit>,
    /// Per action kind.
    pub kind_limits: std::collections::BTreeMap<String, RateLimit>,
    /// The breaker opens after this many acting requests…
    pub breaker_max_actions: u32,
    /// …within this window without the condition clearing.
    pub breaker_window: Duration,
    /// Programs `exec` may run (absolute paths).
    pub exec_allow: Vec<String>,
    /// Rotate the audit log at this size.
    pub audit_max_bytes: u64,
    /// Rotated audit files kept.
    pub audit_keep: usize,
    /// How often an `alertmanager` action resends a firing alert.
    pub alert_resend: Duration,
}

/// A declared knob.
#[derive(Debug, Clone, PartialEq)]
pub struct KnobDecl {
    /// Its name.
    pub name: String,
    /// Its first value.
    pub initial: f64,
    /// Lowest.
    pub min: f64,
    /// Highest.
    pub max: f64,
    /// Whole numbers only.
    pub integer: bool,
    /// Redis key mirroring the value.
    pub redis_key: Option<String>,
    /// Redis target of the mirror.
    pub redis_target: Option<String>,
    /// URL the new value is POSTed to.
    pub webhook: Option<String>,
}

/// When a collector runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timing {
    /// Time between the starts of two runs.
    pub interval: Duration,
    /// Longest one run may take.
    pub timeout: Duration,
}

/// The host collector's settings.
#[derive(Debug, Clone)]
pub struct HostConfig {
    /// When it runs.
    pub timing: Timing,
    /// Filesystems whose mount point matches are left out.
    pub mount_points_exclude: Regex,
    /// Filesystems whose type matches are left out.
    pub fs_types_exclude: Regex,
    /// Network interfaces whose name matches are left out.
    pub network_devices_exclude: Option<Regex>,
}

/// The Redis collector's settings.
#[derive(Debug, Clone)]
pub struct RedisConfig {
    /// When it runs (each target separately).
    pub timing: Timing,
    /// The window over which `redis_cache_hit_ratio` is computed.
    pub hit_ratio_window: Duration,
    /// The servers to measure.
    pub targets: Vec<Target>,
}

/// One monitored service given by URL: a Redis server, a PostgreSQL database, a PgBouncer
/// admin console.
#[derive(Debug, Clone)]
pub struct Target {
    /// The `target` label.
    pub name: String,
    /// `redis://…`, `rediss://…`, `unix:///…` or `postgres://user:password@host:port/db?…`.
    pub url: SecretUrl,
    /// The CA that signed a `rediss://` server's certificate, when not in the system store.
    pub tls_ca_file: Option<std::path::PathBuf>,
}

/// The PostgreSQL collector's settings.
#[derive(Debug, Clone)]
pub struct PostgresConfig {
    /// When it runs (each target separately).
    pub timing: Timing,
    /// A statement whose mean latency over the window exceeds this is slow.
    pub slow_query_threshold: Duration,
    /// The window of the latency and cache-hit figures.
    pub window: Duration,
    /// How many statements (by total time) get their own series.
    pub statements_limit: usize,
    /// Whether those series carry the (normalized, truncated) query text.
    pub include_query_text: bool,
    /// Characters of query text kept.
    pub query_text_length: usize,
    /// The servers to measure.
    pub targets: Vec<Target>,
}

/// The PgBouncer collector's settings.
#[derive(Debug, Clone)]
pub struct PgBouncerConfig {
    /// When it runs (each target separately).
    pub timing: Timing,
    /// The admin consoles to read.
    pub targets: Vec<Target>,
}

/// The HTTP probe collector's settings.
#[derive(Debug, Clone)]
pub struct ProbeConfig {
    /// When it runs (all targets concurrently).
    pub timing: Timing,
    /// The window over which `probe_http_error_ratio` is computed.
    pub error_ratio_window: Duration,
    /// The endpoints to probe.
    pub targets: Vec<HttpTarget>,
}

/// One application endpoint.
#[derive(Debug, Clone)]
pub struct HttpTarget {
    /// The `target` label.
    pub name: String,
    /// The URL requested (credentials in it are redacted everywhere but the request).
    pub url: SecretUrl,
    /// `GET` or `HEAD`.
    pub method: HttpMethod,
    /// Status codes that count as success; empty means any 2xx.
    pub expected_status: Vec<u16>,
    /// Longest the request (to the end of the body) may take.
    pub timeout: Duration,
    /// Whether redirects are followed (at most 10) or the redirect itself is the answer.
    pub follow_redirects: bool,
    /// Whether an invalid TLS certificate is accepted. Off by default; only for test rigs.
    pub insecure_skip_verify: bool,
}

/// The request methods a probe may use: neither changes anything on the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum HttpMethod {
    /// `GET`: the whole response, body included, is timed.
    #[serde(rename = "GET")]
    Get,
    /// `HEAD`: only the headers.
    #[serde(rename = "HEAD")]
    Head,
}

impl Config {
    /// Decodes and validates configuration text; every problem is reported.
    pub fn parse(text: &str) -> Result<Self, Vec<Diagnostic>> {
        let (spec, locator) = yaml::from_str::<ConfigSpec>(text)?;
        spec.validate(&locator)
    }
}

/// The configuration file, as written.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct ConfigSpec {
    collectors: CollectorsSpec,
    targets: TargetsSpec,
    history: HistorySpec,
    actions: ActionsSpec,
    knobs: std::collections::BTreeMap<String, KnobSpec>,
    sources: std::collections::BTreeMap<String, super::remote::SourceSpec>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct ActionsSpec {
    mode: GlobalMode,
    timeout: HumanDuration,
    rate_limits: RateLimitsSpec,
    breaker: BreakerSpec,
    exec_allow: Vec<String>,
    audit: AuditSpec,
    alert_resend: HumanDuration,
}

impl Default for ActionsSpec {
    fn default() -> Self {
        ActionsSpec {
            // The ceiling, not the default: each rule's own mode (dry_run unless it says
            // otherwise) applies under it. Lowering it disarms every rule at once.
            mode: GlobalMode::Enforce,
            timeout: HumanDuration(Duration::from_secs(30)),
            rate_limits: RateLimitsSpec::default(),
            breaker: BreakerSpec::default(),
            exec_allow: Vec::new(),
            audit: AuditSpec::default(),
            // Prometheus's own resend delay.
            alert_resend: HumanDuration(Duration::from_secs(60)),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RateLimitsSpec {
    global: Option<RateLimit>,
    per_target: Option<RateLimit>,
    per_kind: std::collections::BTreeMap<String, RateLimit>,
}

impl Default for RateLimitsSpec {
    fn default() -> Self {
        let minute = HumanDuration(Duration::from_secs(60));
        RateLimitsSpec {
            // Far more than a healthy rule set needs, far fewer than a storm would take.
            global: Some(RateLimit {
                count: 10,
                per: minute,
            }),
            per_target: Some(RateLimit {
                count: 5,
                per: minute,
            }),
            per_kind: std::collections::BTreeMap::new(),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct BreakerSpec {
    max_actions: u32,
    window: HumanDuration,
}

impl Default for BreakerSpec {
    fn default() -> Self {
        BreakerSpec {
            max_actions: 5,
            window: HumanDuration(Duration::from_secs(3600)),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct AuditSpec {
    max_bytes: u64,
    keep: usize,
}

impl Default for AuditSpec {
    fn default() -> Self {
        AuditSpec {
            max_bytes: 16 << 20,
            keep: 5,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct KnobSpec {
    initial: f64,
    min: f64,
    max: f64,
    #[serde(default = "yes")]
    integer: bool,
    #[serde(default)]
    mirror: KnobMirrorSpec,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct KnobMirrorSpec {
    redis_key: Option<String>,
    redis_target: Option<String>,
    webhook: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct CollectorsSpec {
    host: HostSpec,
    redis: RedisSpec,
    http_probe: ProbeSpec,
    postgres: PostgresSpec,
    pgbouncer: PgBouncerSpec,
    scrape: super::remote::ScrapeSpec,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct TargetsSpec {
    redis: Vec<UrlTargetSpec>,
    http: Vec<HttpTargetSpec>,
    postgres: Vec<UrlTargetSpec>,
    pgbouncer: Vec<UrlTargetSpec>,
    scrape: Vec<super::remote::ScrapeTargetSpec>,
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
struct RedisSpec {
    interval: HumanDuration,
    timeout: Option<HumanDuration>,
    hit_ratio_window: HumanDuration,
}

impl Default for RedisSpec {
    fn default() -> Self {
        RedisSpec {
            interval: HumanDuration(Duration::from_secs(5)),
            timeout: None,
            // One minute: long enough that a handful of requests does not swing the ratio,
            // short enough that a cache going cold shows within a rule's `for`.
            hit_ratio_window: HumanDuration(Duration::from_secs(60)),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct ProbeSpec {
    interval: HumanDuration,
    timeout: Option<HumanDuration>,
    error_ratio_window: HumanDuration,
}

impl Default for ProbeSpec {
    fn default() -> Self {
        ProbeSpec {
            // Fifteen seconds, as Prometheus's default scrape interval: each probe is a real
            // request to the application, so not more often than users already look.
            interval: HumanDuration(Duration::from_secs(15)),
            timeout: None,
            // Five minutes, the window of the usual "error rate above 5 %" alert.
            error_ratio_window: HumanDuration(Duration::from_secs(300)),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct PostgresSpec {
    interval: HumanDuration,
    timeout: Option<HumanDuration>,
    slow_query_threshold: HumanDuration,
    window: HumanDuration,
    statements_limit: usize,
    include_query_text: bool,
    query_text_length: usize,
}

impl Default for PostgresSpec {
    fn default() -> Self {
        PostgresSpec {
            interval: HumanDuration(Duration::from_secs(5)),
            timeout: None,
            // The documented trigger: slow queries above 100 ms.
            slow_query_threshold: HumanDuration(Duration::from_millis(100)),
            window: HumanDuration(Duration::from_secs(60)),
            // postgres_exporter's default is 100; twenty already names every statement that
            // matters on a typical service and keeps the series count small.
            statements_limit: 20,
            include_query_text: false,
            query_text_length: 120,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct PgBouncerSpec {
    interval: HumanDuration,
    timeout: Option<HumanDuration>,
}

impl Default for PgBouncerSpec {
    fn default() -> Self {
        PgBouncerSpec {
            interval: HumanDuration(Duration::from_secs(5)),
            timeout: None,
        }
    }
}

/// A named target given by URL (Redis, PostgreSQL, PgBouncer).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct UrlTargetSpec {
    name: String,
    url: String,
    /// PEM file of the CA that signed the server's certificate (Redis over TLS only); without
    /// it the system's trust store is used.
    #[serde(default)]
    tls_ca_file: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct HttpTargetSpec {
    name: String,
    url: String,
    #[serde(default = "default_method")]
    method: HttpMethod,
    #[serde(default)]
    expected_status: Vec<u16>,
    timeout: Option<HumanDuration>,
    #[serde(default = "yes")]
    follow_redirects: bool,
    #[serde(default)]
    insecure_skip_verify: bool,
}

fn default_method() -> HttpMethod {
    HttpMethod::Get
}

fn yes() -> bool {
    true
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

/// Default per-request probe timeout: well under the 15 s interval, well over the 2 s an API
/// answer may take before the documented alert fires, so a slow answer is measured, not cut.
const DEFAULT_PROBE_TIMEOUT: Duration = Duration::from_secs(10);

/// Collects validation errors at their locations.
pub(super) struct Checker<'a> {
    loc: &'a Locator,
    errors: Vec<Diagnostic>,
}

impl Checker<'_> {
    pub(super) fn error(&mut self, path: &[Seg], message: impl Into<String>) {
        self.errors.push(self.loc.error_at(path, message));
    }

    pub(super) fn regex(&mut self, path: &[Seg], pattern: &str) -> Option<Regex> {
        match Regex::new(pattern) {
            Ok(r) => Some(r),
            Err(err) => {
                self.error(path, format!("invalid regular expression: {err}"));
                None
            }
        }
    }

    /// Interval and timeout of one collector; the timeout defaults to four fifths of the
    /// interval, so an overrunning run is cut off before the next one is due.
    pub(super) fn timing(
        &mut self,
        collector: &str,
        interval: HumanDuration,
        timeout: Option<HumanDuration>,
    ) -> Timing {
        let path =
            |field: &str| -> Vec<Seg> { vec!["collectors".into(), collector.into(), field.into()] };
        if interval.0 < MIN_INTERVAL {
            self.error(
                &path("interval"),
                format!("interval must be at least {}s", MIN_INTERVAL.as_secs()),
            );
        }
        let timeout = timeout.map_or_else(|| interval.0.mul_f64(0.8), |t| t.0);
        if timeout < Duration::from_millis(100) {
            self.error(&path("timeout"), "timeout must be at least 100ms");
        }
        if timeout > interval.0 {
            self.error(
                &path("timeout"),
                "timeout must not be longer than the interval",
            );
        }
        Timing {
            interval: interval.0,
            timeout,
        }
    }

    /// Target names become label values and identify targets in logs: short and plain, and
    /// unique within their kind.
    pub(super) fn target_name(&mut self, path: &[Seg], name: &str, seen: &mut HashSet<String>) {
        let plain = !name.is_empty()
            && name.len() <= 64
            && name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'));
        if !plain {
            self.error(
                path,
                format!("target name {name:?} must be 1 to 64 letters, digits, '_', '-' or '.'"),
            );
        } else if !seen.insert(name.to_owned()) {
            self.error(path, format!("target name {name:?} is used twice"));
        }
    }

    pub(super) fn url(&mut self, path: &[Seg], text: &str, schemes: &[&str]) -> Option<SecretUrl> {
        match SecretUrl::parse(text) {
            Ok(url) if schemes.contains(&url.scheme()) => Some(url),
            Ok(url) => {
                self.error(
                    path,
                    format!(
                        "URL scheme {:?} is not one of {}",
                        url.scheme(),
                        schemes.join(", ")
                    ),
                );
                None
            }
            Err(err) => {
                self.error(path, err);
                None
            }
        }
    }
}

impl Checker<'_> {
    /// The targets under `targets.KIND`, with URLs of one of `schemes`.
    fn url_targets(
        &mut self,
        kind: &str,
        specs: &[UrlTargetSpec],
        schemes: &[&str],
    ) -> Vec<Target> {
        let mut seen = HashSet::new();
        let mut out = Vec::new();
        for (i, t) in specs.iter().enumerate() {
            let path =
                |f: &str| -> Vec<Seg> { vec!["targets".into(), kind.into(), i.into(), f.into()] };
            self.target_name(&path("name"), &t.name, &mut seen);
            let Some(url) = self.url(&path("url"), &t.url, schemes) else {
                continue;
            };
            if t.tls_ca_file.is_some() && url.scheme() != "rediss" {
                self.error(
                    &path("tls_ca_file"),
                    "tls_ca_file applies to rediss:// (Redis over TLS) URLs only",
                );
            }
            out.push(Target {
                name: t.name.clone(),
                url,
                tls_ca_file: t.tls_ca_file.as_ref().map(std::path::PathBuf::from),
            });
        }
        out
    }
}

/// URL schemes of PostgreSQL connection strings.
pub const POSTGRES_SCHEMES: &[&str] = &["postgres", "postgresql"];

/// URL schemes the Redis client speaks.
pub const REDIS_SCHEMES: &[&str] = &["redis", "rediss", "unix", "redis+unix"];

impl ConfigSpec {
    fn validate(self, loc: &Locator) -> Result<Config, Vec<Diagnostic>> {
        let mut c = Checker {
            loc,
            errors: Vec::new(),
        };

        let h = &self.collectors.host;
        let host_timing = c.timing("host", h.interval, h.timeout);
        let fs = |f: &str| -> Vec<Seg> {
            vec![
                "collectors".into(),
                "host".into(),
                "filesystem".into(),
                f.into(),
            ]
        };
        let mount_points_exclude = c.regex(
            &fs("mount_points_exclude"),
            &h.filesystem.mount_points_exclude,
        );
        let fs_types_exclude = c.regex(&fs("fs_types_exclude"), &h.filesystem.fs_types_exclude);
        let network_devices_exclude = h.network.devices_exclude.as_ref().map(|p| {
            c.regex(
                &[
                    "collectors".into(),
                    "host".into(),
                    "network".into(),
                    "devices_exclude".into(),
                ],
                p,
            )
        });

        let r = &self.collectors.redis;
        let redis_timing = c.timing("redis", r.interval, r.timeout);
        if r.hit_ratio_window.0 < r.interval.0 * 2 {
            c.error(
                &[
                    "collectors".into(),
                    "redis".into(),
                    "hit_ratio_window".into(),
                ],
                "hit_ratio_window must span at least two collection intervals",
            );
        }
        let redis_targets = c.url_targets("redis", &self.targets.redis, REDIS_SCHEMES);

        let pg = &self.collectors.postgres;
        let pg_timing = c.timing("postgres", pg.interval, pg.timeout);
        if pg.statements_limit > 1000 {
            c.error(
                &[
                    "collectors".into(),
                    "postgres".into(),
                    "statements_limit".into(),
                ],
                "statements_limit must be at most 1000 (each statement is three series)",
            );
        }
        if pg.window.0 < pg.interval.0 * 2 {
            c.error(
                &["collectors".into(), "postgres".into(), "window".into()],
                "window must span at least two collection intervals",
            );
        }
        let pg_targets = c.url_targets("postgres", &self.targets.postgres, POSTGRES_SCHEMES);
        let bouncer = &self.collectors.pgbouncer;
        let bouncer_timing = c.timing("pgbouncer", bouncer.interval, bouncer.timeout);
        let bouncer_targets = c.url_targets("pgbouncer", &self.targets.pgbouncer, POSTGRES_SCHEMES);

        let p = &self.collectors.http_probe;
        let probe_timing = c.timing("http_probe", p.interval, p.timeout);
        let mut seen = HashSet::new();
        let mut http_targets = Vec::new();
        for (i, t) in self.targets.http.iter().enumerate() {
            let path =
                |f: &str| -> Vec<Seg> { vec!["targets".into(), "http".into(), i.into(), f.into()] };
            c.target_name(&path("name"), &t.name, &mut seen);
            // Nine tenths of the collector's timeout at most: a hung endpoint must time out on
            // its own, recorded as that probe's failure, before the scheduler cuts the whole
            // run (and every other probe's figures) off.
            let most = probe_timing.timeout.mul_f64(0.9);
            let timeout = t.timeout.map_or(DEFAULT_PROBE_TIMEOUT.min(most), |d| d.0);
            if timeout > most {
                c.error(
                    &path("timeout"),
                    format!(
                        "a probe's timeout must not exceed 9/10 of the http_probe collector's timeout ({:.2}s)",
                        most.as_secs_f64()
                    ),
                );
            }
            for (j, code) in t.expected_status.iter().enumerate() {
                if !(100..=599).contains(code) {
                    let mut at = path("expected_status");
                    at.push(j.into());
                    c.error(&at, format!("{code} is not an HTTP status code"));
                }
            }
            if let Some(url) = c.url(&path("url"), &t.url, &["http", "https"]) {
                http_targets.push(HttpTarget {
                    name: t.name.clone(),
                    url,
                    method: t.method,
                    expected_status: t.expected_status.clone(),
                    timeout,
                    follow_redirects: t.follow_redirects,
                    insecure_skip_verify: t.insecure_skip_verify,
                });
            }
        }

        let scrape = c.scrape(&self.collectors.scrape, &self.targets.scrape);
        let sources = c.sources(&self.sources);

        let retention = self.history.retention.0;
        let retention_path: Vec<Seg> = vec!["history".into(), "retention".into()];
        if retention > MAX_RETENTION {
            c.error(&retention_path, "retention must be at most 24h");
        }
        let mut longest = Duration::ZERO;
        if h.enabled {
            longest = longest.max(host_timing.interval);
        }
        if !redis_targets.is_empty() {
            longest = longest.max(redis_timing.interval);
        }
        if !http_targets.is_empty() {
            longest = longest.max(probe_timing.interval);
        }
        if !pg_targets.is_empty() {
            longest = longest.max(pg_timing.interval).max(pg.window.0);
        }
        if !bouncer_targets.is_empty() {
            longest = longest.max(bouncer_timing.interval);
        }
        for t in &scrape.targets {
            longest = longest.max(t.interval);
        }
        if retention < longest {
            c.error(
                &retention_path,
                "retention must be at least the longest collection interval and PostgreSQL window",
            );
        }

        let (actions, knobs) = self.validate_actions(&mut c, &redis_targets);

        match (
            mount_points_exclude,
            fs_types_exclude,
            network_devices_exclude,
        ) {
            (Some(mount_points_exclude), Some(fs_types_exclude), None | Some(Some(_)))
                if c.errors.is_empty() =>
            {
                let network_devices_exclude = h
                    .network
                    .devices_exclude
                    .as_ref()
                    .and_then(|p| Regex::new(p).ok());
                Ok(Config {
                    host: h.enabled.then(|| HostConfig {
                        timing: host_timing,
                        mount_points_exclude,
                        fs_types_exclude,
                        network_devices_exclude,
                    }),
                    redis: RedisConfig {
                        timing: redis_timing,
                        hit_ratio_window: r.hit_ratio_window.0,
                        targets: redis_targets,
                    },
                    http_probe: ProbeConfig {
                        timing: probe_timing,
                        error_ratio_window: p.error_ratio_window.0,
                        targets: http_targets,
                    },
                    postgres: PostgresConfig {
                        timing: pg_timing,
                        slow_query_threshold: pg.slow_query_threshold.0,
                        window: pg.window.0,
                        statements_limit: pg.statements_limit,
                        include_query_text: pg.include_query_text,
                        query_text_length: pg.query_text_length,
                        targets: pg_targets,
                    },
                    pgbouncer: PgBouncerConfig {
                        timing: bouncer_timing,
                        targets: bouncer_targets,
                    },
                    history_retention: retention,
                    actions,
                    knobs,
                    scrape,
                    sources,
                })
            }
            _ => {
                let mut errors = c.errors;
                errors.sort_by_key(|d| (d.line, d.column));
                Err(errors)
            }
        }
    }
}

impl ConfigSpec {
    fn validate_actions(
        &self,
        c: &mut Checker<'_>,
        redis_targets: &[Target],
    ) -> (ActionsConfig, Vec<KnobDecl>) {
        let a = &self.actions;
        let at = |f: &[&str]| -> Vec<Seg> {
            let mut p: Vec<Seg> = vec!["actions".into()];
            p.extend(f.iter().map(|s| Seg::from(*s)));
            p
        };
        if a.timeout.0 < Duration::from_millis(100) {
            c.error(&at(&["timeout"]), "timeout must be at least 100ms");
        }
        let mut limit = |path: Vec<Seg>, l: &RateLimit| {
            if l.count == 0 || l.per.0.is_zero() {
                c.error(
                    &path,
                    "a rate limit needs a count and a period above zero (leave it out for no limit)",
                );
            }
        };
        if let Some(l) = &a.rate_limits.global {
            limit(at(&["rate_limits", "global"]), l);
        }
        if let Some(l) = &a.rate_limits.per_target {
            limit(at(&["rate_limits", "per_target"]), l);
        }
        for (k, l) in &a.rate_limits.per_kind {
            limit(at(&["rate_limits", "per_kind", k]), l);
        }
        for (i, p) in a.exec_allow.iter().enumerate() {
            if !p.starts_with('/') {
                let mut path = at(&["exec_allow"]);
                path.push(i.into());
                c.error(
                    &path,
                    format!("{p:?}: exec_allow takes absolute program paths (no $PATH lookup)"),
                );
            }
        }
        if a.audit.max_bytes < 4096 {
            c.error(
                &at(&["audit", "max_bytes"]),
                "max_bytes must be at least 4096",
            );
        }
        let mut knobs = Vec::new();
        for (name, k) in &self.knobs {
            let path =
                |f: &str| -> Vec<Seg> { vec!["knobs".into(), name.as_str().into(), f.into()] };
            let finite = k.min.is_finite() && k.max.is_finite() && k.initial.is_finite();
            if !finite || k.min > k.max {
                c.error(
                    &path("min"),
                    format!("knob {name:?}: min must not exceed max"),
                );
            } else if !(k.min..=k.max).contains(&k.initial) {
                c.error(
                    &path("initial"),
                    format!("knob {name:?}: initial must lie between min and max"),
                );
            }
            if let Some(t) = &k.mirror.redis_target
                && !redis_targets.iter().any(|r| &r.name == t)
            {
                c.error(
                    &path("mirror"),
                    format!("knob {name:?}: no Redis target named {t:?}"),
                );
            }
            if let Some(u) = &k.mirror.webhook {
                c.url(&path("mirror"), u, &["http", "https"]);
            }
            knobs.push(KnobDecl {
                name: name.clone(),
                initial: k.initial,
                min: k.min,
                max: k.max,
                integer: k.integer,
                redis_key: k.mirror.redis_key.clone(),
                redis_target: k.mirror.redis_target.clone(),
                webhook: k.mirror.webhook.clone(),
            });
        }
        (
            ActionsConfig {
                mode: a.mode,
                timeout: a.timeout.0,
                global_limit: a.rate_limits.global,
                target_limit: a.rate_limits.per_target,
                kind_limits: a.rate_limits.per_kind.clone(),
                breaker_max_actions: a.breaker.max_actions,
                breaker_window: a.breaker.window.0,
                exec_allow: a.exec_allow.clone(),
                audit_max_bytes: a.audit.max_bytes,
                audit_keep: a.audit.keep.max(1),
                alert_resend: a.alert_resend.0,
            },
            knobs,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn actions_and_knobs_are_read_and_checked() {
        let c = Config::parse(
            "actions:\n  mode: dry_run\n  rate_limits:\n    per_kind:\n      redis_evict: {count: 3, per: 1h}\n  exec_allow: [/usr/bin/sync]\nknobs:\n  batch_size: {initial: 500, min: 50, max: 5000, mirror: {redis_key: 'app:batch_size'}}\n",
        )
        .unwrap();
        assert_eq!(c.actions.mode, GlobalMode::DryRun);
        assert_eq!(c.actions.kind_limits["redis_evict"].count, 3);
        assert_eq!(c.knobs[0].name, "batch_size");
        assert!(c.knobs[0].integer);
        assert_eq!(c.knobs[0].redis_key.as_deref(), Some("app:batch_size"));
        let errs = errors(
            "actions:\n  exec_allow: [sync]\nknobs:\n  b: {initial: 9, min: 1, max: 5}\n  c: {initial: 1, min: 1, max: 5, mirror: {redis_target: nope}}\n",
        );
        assert_eq!(errs.len(), 3, "{errs:?}");
        assert!(errs[0].starts_with("2:16:"), "{errs:?}");
        assert!(errs[1].contains("initial must lie between"), "{errs:?}");
        assert!(errs[2].contains("no Redis target named"), "{errs:?}");
    }

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
        assert_eq!(h.timing.interval, Duration::from_secs(5));
        assert_eq!(h.timing.timeout, Duration::from_secs(4));
        assert_eq!(c.history_retention, Duration::from_secs(600));
    }

    #[test]
    fn a_full_file_is_read() {
        let c = Config::parse(
            "collectors:\n  host:\n    interval: 10s\n    timeout: 2s\n    network:\n      devices_exclude: '^lo$'\nhistory:\n  retention: 1h\n",
        )
        .unwrap();
        let h = c.host.unwrap();
        assert_eq!(h.timing.interval, Duration::from_secs(10));
        assert_eq!(h.timing.timeout, Duration::from_secs(2));
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
    fn redis_and_http_targets_are_read_and_checked() {
        let c = Config::parse(
            "targets:\n  redis:\n    - name: cache\n      url: redis://app:s3cret@127.0.0.1:6380/0\n  http:\n    - name: api\n      url: http://127.0.0.1:8000/health\n      expected_status: [200, 204]\n      timeout: 3s\n",
        )
        .unwrap();
        assert_eq!(c.redis.targets.len(), 1);
        assert_eq!(
            c.redis.targets[0].url.redacted(),
            "redis://app:****@127.0.0.1:6380/0"
        );
        assert!(!format!("{:?}", c.redis).contains("s3cret"));
        let api = &c.http_probe.targets[0];
        assert_eq!(api.expected_status, vec![200, 204]);
        assert_eq!(api.timeout, Duration::from_secs(3));
        assert!(api.follow_redirects);

        let errs = errors(
            "targets:\n  redis:\n    - name: a b\n      url: http://x\n    - name: c\n      url: 'redis://['\n  http:\n    - name: api\n      url: http://x/\n      expected_status: [999]\n      timeout: 1h\n    - name: api\n      url: ftp://x/\n",
        );
        let joined = errs.join("\n");
        for want in [
            "3:13: target name \"a b\"",
            "4:12: URL scheme \"http\"",
            "6:12: invalid URL",
            "10:25: 999 is not an HTTP status code",
            "11:16: a probe's timeout must not exceed",
            "12:13: target name \"api\" is used twice",
            "13:12: URL scheme \"ftp\"",
        ] {
            assert!(joined.contains(want), "missing {want:?} in:\n{joined}");
        }
    }
}
