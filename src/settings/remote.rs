//! What the configuration says about other HTTP servers whose metrics rules read: the
//! application endpoints scraped like Prometheus scrapes them (`targets.scrape`, defaults under
//! `collectors.scrape`) and the PromQL servers rule groups may be evaluated by (`sources`).
//!
//! Owns those parts of the schema, their defaults and checks, and `HttpAuth`, the client side
//! of an HTTP connection both share (headers, basic auth, bearer token file, TLS roots). Uses
//! the parent's `HumanDuration`, `SecretUrl` and the configuration's `Checker`; nothing else.
//! Secrets (passwords, tokens) are read from files at each request, never kept in the
//! settings, so they can be rotated and never reach a log through a `Debug` of the settings.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use regex::Regex;
use serde::Deserialize;

use super::HumanDuration;
use super::config::Checker;
use super::secret::SecretUrl;
use crate::yaml::Seg;

/// The client side of a connection to another HTTP server. Its `Debug` shows header names,
/// never their values (an API key travels in a header).
#[derive(Clone, Default, PartialEq)]
pub struct HttpAuth {
    /// Extra request headers (`X-Scope-OrgID` for Mimir, ...). Never logged.
    pub headers: Vec<(String, String)>,
    /// Basic auth: the user name and the file holding the password.
    pub basic_auth: Option<(String, PathBuf)>,
    /// A file holding a bearer token, sent as `Authorization: Bearer …`.
    pub bearer_token_file: Option<PathBuf>,
    /// A PEM file of the CA that signed the server's certificate, besides the system's.
    pub tls_ca_file: Option<PathBuf>,
    /// Accept any certificate (test rigs only).
    pub insecure_skip_verify: bool,
}

impl std::fmt::Debug for HttpAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpAuth")
            .field(
                "headers",
                &self
                    .headers
                    .iter()
                    .map(|(k, _)| format!("{k}: ****"))
                    .collect::<Vec<_>>(),
            )
            .field("basic_auth", &self.basic_auth)
            .field("bearer_token_file", &self.bearer_token_file)
            .field("tls_ca_file", &self.tls_ca_file)
            .field("insecure_skip_verify", &self.insecure_skip_verify)
            .finish()
    }
}

/// Which metric names a scrape keeps.
#[derive(Debug, Clone)]
pub struct MetricRelabel {
    /// When given, only names it matches are kept (anchored, as Prometheus's relabel regexes).
    pub keep: Option<Regex>,
    /// Names it matches are dropped (after `keep`).
    pub drop: Option<Regex>,
}

/// One application endpoint scraped into the history.
#[derive(Debug, Clone)]
pub struct ScrapeTarget {
    /// The `target` label its series carry.
    pub name: String,
    /// Where its metrics are (credentials in it are redacted everywhere but the request).
    pub url: SecretUrl,
    /// Time between two scrapes.
    pub interval: Duration,
    /// Longest one scrape may take, body included.
    pub timeout: Duration,
    /// More samples than this fail the whole scrape (0: no limit).
    pub sample_limit: usize,
    /// A series with more labels than this fails the whole scrape (0: no limit).
    pub label_limit: usize,
    /// A body longer than this (after decompression) fails the scrape.
    pub body_size_limit: usize,
    /// Whether timestamps in the payload are kept (else the scrape's time is used).
    pub honor_timestamps: bool,
    /// Which metric names are kept.
    pub relabel: MetricRelabel,
    /// Headers, auth and TLS.
    pub auth: HttpAuth,
}

/// The scraper's settings.
#[derive(Debug, Clone)]
pub struct ScrapeConfig {
    /// Whether scraped series are also served on our own `/metrics`.
    pub republish: bool,
    /// The endpoints.
    pub targets: Vec<ScrapeTarget>,
}

/// A server that answers Prometheus's `/api/v1/query`.
#[derive(Debug, Clone)]
pub struct SourceConfig {
    /// Its name, as rule groups refer to it (`source: NAME`).
    pub name: String,
    /// The API's base (`http://prometheus:9090`, `https://mimir/prometheus`); `/api/v1/query`
    /// is appended.
    pub url: SecretUrl,
    /// Longest one query may take; also sent as the query's own `timeout`.
    pub timeout: Duration,
    /// Evaluate this much before the group's evaluation time, for servers whose newest data
    /// arrives late (remote write, VictoriaMetrics' latency offset).
    pub query_offset: Duration,
    /// Headers, auth and TLS.
    pub auth: HttpAuth,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(super) struct ScrapeSpec {
    interval: HumanDuration,
    timeout: Option<HumanDuration>,
    republish: bool,
}

impl Default for ScrapeSpec {
    fn default() -> Self {
        ScrapeSpec {
            // Prometheus's default scrape interval: the application is scraped no more often
            // than Prometheus already does.
            interval: HumanDuration(Duration::from_secs(15)),
            timeout: None,
            // Prometheus scrapes the application itself; serving its series again would
            // store them twice there.
            republish: false,
        }
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct BasicAuthSpec {
    username: String,
    password_file: String,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RelabelSpec {
    keep: Option<String>,
    drop: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct ScrapeTargetSpec {
    name: String,
    url: String,
    interval: Option<HumanDuration>,
    timeout: Option<HumanDuration>,
    #[serde(default = "default_sample_limit")]
    sample_limit: usize,
    #[serde(default)]
    label_limit: usize,
    #[serde(default = "default_body_size_limit")]
    body_size_limit: usize,
    #[serde(default = "yes")]
    honor_timestamps: bool,
    #[serde(default)]
    metric_relabel: RelabelSpec,
    #[serde(default)]
    headers: BTreeMap<String, String>,
    basic_auth: Option<BasicAuthSpec>,
    bearer_token_file: Option<String>,
    tls_ca_file: Option<String>,
    #[serde(default)]
    insecure_skip_verify: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct SourceSpec {
    url: String,
    timeout: Option<HumanDuration>,
    query_offset: Option<HumanDuration>,
    #[serde(default)]
    headers: BTreeMap<String, String>,
    basic_auth: Option<BasicAuthSpec>,
    bearer_token_file: Option<String>,
    tls_ca_file: Option<String>,
    #[serde(default)]
    insecure_skip_verify: bool,
}

fn yes() -> bool {
    true
}

/// Fifty thousand: node_exporter on a large host publishes a few thousand series, an
/// application a few hundred; a payload past this is a cardinality accident, refused whole as
/// Prometheus refuses it rather than stored in part.
fn default_sample_limit() -> usize {
    50_000
}

/// 32 MiB decompressed: ten times the largest real payload we measured (node_exporter with
/// every collector on a large host), and a bound on what a broken endpoint can make us hold.
fn default_body_size_limit() -> usize {
    32 << 20
}

/// Longest a scrape may take by default: Prometheus's default scrape timeout.
const DEFAULT_SCRAPE_TIMEOUT: Duration = Duration::from_secs(10);

/// Longest a remote query may take by default: well under the shortest group interval we
/// expect for remote rules (15 s), so one slow answer never overlaps the next evaluation.
const DEFAULT_QUERY_TIMEOUT: Duration = Duration::from_secs(10);

/// Header names we set ourselves: a configured one would fight ours.
const RESERVED_HEADERS: &[&str] = &[
    "authorization",
    "accept",
    "accept-encoding",
    "content-type",
    "content-length",
    "host",
    "user-agent",
];

/// The client-side fields a scrape target and a source share, as written.
struct AuthFields<'a> {
    headers: &'a BTreeMap<String, String>,
    basic_auth: Option<&'a BasicAuthSpec>,
    bearer_token_file: Option<&'a String>,
    tls_ca_file: Option<&'a String>,
    insecure_skip_verify: bool,
}

impl Checker<'_> {
    fn auth(
        &mut self,
        at: &dyn Fn(&str) -> Vec<Seg>,
        url: &SecretUrl,
        f: AuthFields<'_>,
    ) -> HttpAuth {
        let AuthFields {
            headers,
            basic_auth,
            bearer_token_file,
            tls_ca_file,
            insecure_skip_verify,
        } = f;
        for (name, value) in headers {
            let mut path = at("headers");
            path.push(name.as_str().into());
            if reqwest::header::HeaderName::from_bytes(name.as_bytes()).is_err() {
                self.error(&path, format!("{name:?} is not a valid header name"));
            } else if RESERVED_HEADERS.contains(&name.to_ascii_lowercase().as_str()) {
                self.error(
                    &path,
                    format!(
                        "{name} is set by the autotuner itself; use basic_auth or bearer_token_file for credentials"
                    ),
                );
            } else if reqwest::header::HeaderValue::from_str(value).is_err() {
                self.error(&path, "the header value has characters HTTP does not allow");
            }
        }
        if basic_auth.is_some() && bearer_token_file.is_some() {
            self.error(
                &at("bearer_token_file"),
                "basic_auth and bearer_token_file are exclusive",
            );
        }
        if url.password().is_some() && (basic_auth.is_some() || bearer_token_file.is_some()) {
            self.error(
                &at("url"),
                "the URL carries credentials and so does basic_auth or bearer_token_file",
            );
        }
        if tls_ca_file.is_some() && url.scheme() != "https" {
            self.error(
                &at("tls_ca_file"),
                "tls_ca_file applies to https:// URLs only",
            );
        }
        HttpAuth {
            headers: headers
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            basic_auth: basic_auth.map(|b| (b.username.clone(), PathBuf::from(&b.password_file))),
            bearer_token_file: bearer_token_file.map(PathBuf::from),
            tls_ca_file: tls_ca_file.map(PathBuf::from),
            insecure_skip_verify,
        }
    }

    /// A relabel regex, anchored at both ends as Prometheus anchors its own.
    fn anchored(&mut self, path: &[Seg], pattern: Option<&String>) -> Option<Regex> {
        pattern.and_then(|p| self.regex(path, &format!("^(?:{p})$")))
    }

    /// `collectors.scrape` and `targets.scrape`.
    pub(super) fn scrape(
        &mut self,
        spec: &ScrapeSpec,
        targets: &[ScrapeTargetSpec],
    ) -> ScrapeConfig {
        let defaults = self.timing("scrape", spec.interval, spec.timeout);
        let mut seen = std::collections::HashSet::new();
        let mut out = Vec::new();
        for (i, t) in targets.iter().enumerate() {
            let at = |f: &str| -> Vec<Seg> {
                vec!["targets".into(), "scrape".into(), i.into(), f.into()]
            };
            self.target_name(&at("name"), &t.name, &mut seen);
            let interval = t.interval.map_or(defaults.interval, |d| d.0);
            if interval < Duration::from_secs(1) {
                self.error(&at("interval"), "interval must be at least 1s");
            }
            let timeout = match (t.timeout, spec.timeout) {
                (Some(d), _) | (None, Some(d)) => d.0,
                // Prometheus's default, within four fifths of the target's interval.
                (None, None) => DEFAULT_SCRAPE_TIMEOUT.min(interval.mul_f64(0.8)),
            };
            // Nine tenths at most: the rest is for publishing the failure before the next
            // scrape is due.
            if timeout > interval.mul_f64(0.9) {
                self.error(
                    &at(if t.timeout.is_some() {
                        "timeout"
                    } else {
                        "interval"
                    }),
                    format!(
                        "the scrape timeout ({:.1}s) must be at most 9/10 of the interval ({:.1}s)",
                        timeout.as_secs_f64(),
                        interval.as_secs_f64()
                    ),
                );
            }
            if timeout < Duration::from_millis(100) {
                self.error(&at("timeout"), "timeout must be at least 100ms");
            }
            if t.body_size_limit < 1024 {
                self.error(
                    &at("body_size_limit"),
                    "body_size_limit must be at least 1024 bytes",
                );
            }
            let mut relabel_at = at("metric_relabel");
            relabel_at.push("keep".into());
            let keep = self.anchored(&relabel_at, t.metric_relabel.keep.as_ref());
            relabel_at.pop();
            relabel_at.push("drop".into());
            let drop = self.anchored(&relabel_at, t.metric_relabel.drop.as_ref());
            let Some(url) = self.url(&at("url"), &t.url, &["http", "https"]) else {
                continue;
            };
            let auth = self.auth(
                &at,
                &url,
                AuthFields {
                    headers: &t.headers,
                    basic_auth: t.basic_auth.as_ref(),
                    bearer_token_file: t.bearer_token_file.as_ref(),
                    tls_ca_file: t.tls_ca_file.as_ref(),
                    insecure_skip_verify: t.insecure_skip_verify,
                },
            );
            out.push(ScrapeTarget {
                name: t.name.clone(),
                url,
                interval,
                timeout,
                sample_limit: t.sample_limit,
                label_limit: t.label_limit,
                body_size_limit: t.body_size_limit,
                honor_timestamps: t.honor_timestamps,
                relabel: MetricRelabel { keep, drop },
                auth,
            });
        }
        ScrapeConfig {
            republish: spec.republish,
            targets: out,
        }
    }

    /// `sources`.
    pub(super) fn sources(&mut self, specs: &BTreeMap<String, SourceSpec>) -> Vec<SourceConfig> {
        let mut out = Vec::new();
        let mut seen = std::collections::HashSet::new();
        for (name, s) in specs {
            let at =
                |f: &str| -> Vec<Seg> { vec!["sources".into(), name.as_str().into(), f.into()] };
            self.target_name(&["sources".into(), name.as_str().into()], name, &mut seen);
            let timeout = s.timeout.map_or(DEFAULT_QUERY_TIMEOUT, |d| d.0);
            if timeout < Duration::from_millis(100) || timeout > Duration::from_secs(120) {
                self.error(&at("timeout"), "timeout must be between 100ms and 2m");
            }
            let query_offset = s.query_offset.map_or(Duration::ZERO, |d| d.0);
            if query_offset > Duration::from_secs(3600) {
                self.error(&at("query_offset"), "query_offset must be at most 1h");
            }
            let Some(url) = self.url(&at("url"), &s.url, &["http", "https"]) else {
                continue;
            };
            if url.expose().contains('?') || url.expose().contains('#') {
                self.error(
                    &at("url"),
                    "the source's URL is the API's base (/api/v1/query is appended): no query string or fragment",
                );
            }
            let auth = self.auth(
                &at,
                &url,
                AuthFields {
                    headers: &s.headers,
                    basic_auth: s.basic_auth.as_ref(),
                    bearer_token_file: s.bearer_token_file.as_ref(),
                    tls_ca_file: s.tls_ca_file.as_ref(),
                    insecure_skip_verify: s.insecure_skip_verify,
                },
            );
            out.push(SourceConfig {
                name: name.clone(),
                url,
                timeout,
                query_offset,
                auth,
            });
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::super::Config;
    use std::time::Duration;

    fn errors(text: &str) -> String {
        Config::parse(text)
            .unwrap_err()
            .iter()
            .map(|d| d.to_string())
            .collect::<Vec<_>>()
            .join("\n")
    }

    #[test]
    fn scrape_targets_and_sources_are_read_with_their_defaults() {
        let c = Config::parse(
            "collectors:\n  scrape:\n    interval: 30s\ntargets:\n  scrape:\n    - name: app\n      url: http://127.0.0.1:8000/metrics\n    - name: api\n      url: https://api.internal/metrics\n      interval: 5s\n      metric_relabel: { keep: 'http_.*', drop: 'http_debug_.*' }\n      bearer_token_file: /etc/autotuner/token\n      headers: { X-Scope-OrgID: team-a }\nsources:\n  fleet:\n    url: http://user:s3cret@prometheus:9090/\n    query_offset: 30s\n",
        )
        .unwrap();
        let app = &c.scrape.targets[0];
        assert_eq!(app.interval, Duration::from_secs(30));
        assert_eq!(app.timeout, Duration::from_secs(10));
        assert_eq!(app.sample_limit, 50_000);
        assert!(app.honor_timestamps);
        assert!(!c.scrape.republish);
        let api = &c.scrape.targets[1];
        assert_eq!(api.interval, Duration::from_secs(5));
        assert_eq!(api.timeout, Duration::from_secs(4));
        let keep = api.relabel.keep.as_ref().unwrap();
        assert!(keep.is_match("http_requests_total"));
        // Anchored, as Prometheus's relabel regexes are.
        assert!(!keep.is_match("app_http_requests_total"));
        assert!(api.relabel.drop.as_ref().unwrap().is_match("http_debug_x"));
        assert_eq!(
            api.auth.headers,
            vec![("X-Scope-OrgID".to_owned(), "team-a".to_owned())]
        );
        let fleet = &c.sources[0];
        assert_eq!(fleet.query_offset, Duration::from_secs(30));
        assert_eq!(fleet.timeout, Duration::from_secs(10));
        assert!(!format!("{:?}", c.sources).contains("s3cret"));
        // Header values may be keys: never in a Debug of the settings.
        assert!(!format!("{:?}", c.scrape).contains("team-a"));
        assert!(format!("{:?}", c.scrape).contains("X-Scope-OrgID: ****"));
    }

    #[test]
    fn every_mistake_is_reported_at_its_place() {
        let e = errors(
            "targets:\n  scrape:\n    - name: app\n      url: ftp://x/\n    - name: app\n      url: http://x/\n      interval: 10s\n      timeout: 20s\n      metric_relabel: { keep: '(' }\n      headers: { Authorization: 'Bearer x', 'bad name': y }\n      basic_auth: { username: u, password_file: /p }\n      bearer_token_file: /t\n      tls_ca_file: /ca.pem\n      body_size_limit: 10\nsources:\n  fleet:\n    url: http://x:9090\n    timeout: 5m\n",
        );
        for want in [
            "4:12: URL scheme \"ftp\"",
            "5:13: target name \"app\" is used twice",
            "8:16: the scrape timeout (20.0s) must be at most 9/10 of the interval (10.0s)",
            "9:31: invalid regular expression",
            "10:33: Authorization is set by the autotuner itself",
            "10:57: \"bad name\" is not a valid header name",
            "12:26: basic_auth and bearer_token_file are exclusive",
            "13:20: tls_ca_file applies to https:// URLs only",
            "14:24: body_size_limit must be at least 1024 bytes",
            "18:14: timeout must be between 100ms and 2m",
        ] {
            assert!(e.contains(want), "missing {want:?} in:\n{e}");
        }
        assert!(
            errors(
                "targets:\n  scrape:\n    - name: a\n      url: http://x/\n      sample_limits: 3\n"
            )
            .contains("unknown field `sample_limits`")
        );
    }
}
