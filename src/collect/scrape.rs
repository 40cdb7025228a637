//! The scrape collector: reads an application's own `/metrics` (Prometheus text or OpenMetrics,
//! negotiated as Prometheus negotiates it, gzip accepted) into the history the rules read,
//! each series with a `target` label, and publishes how the scrape went.
//!
//! Owns the `autotuner_scrape_*` metric names and what a scrape means: Prometheus's. A failed
//! scrape (connection, status other than 200, unknown content type, parse error, a body,
//! sample or label limit exceeded) stores nothing and marks every series of the previous
//! scrape stale, so rules stop seeing them at once instead of for five minutes; a series that
//! disappears is marked stale the same way. Timestamps in the payload are honoured unless the
//! target says otherwise, and such series are exempt from staleness, as in Prometheus. A label
//! with an empty value is no label; a scraped `target` label becomes `exported_target`.
//!
//! Uses `exposition` (the parser), `registry` (`publish_scraped`), `settings::ScrapeTarget`
//! and `targets` (HTTP client, credentials). One collector runs per target.

use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::FutureExt as _;

use crate::registry::{Registry, Scraped};
use crate::sample::{Families, Family, Labels, MetricKind, Sample};
use crate::settings::ScrapeTarget;
use crate::targets::{FailureReason, error_chain};

use super::exposition::{self, Format, Kind};
use super::{CollectError, Collector};

/// Scrapes one target.
pub struct ScrapeCollector {
    name: String,
    target: ScrapeTarget,
    client: reqwest::Client,
    registry: Arc<Registry>,
    republish: bool,
    /// Where the scraped series are kept apart from our own metrics about the scrape.
    series_key: String,
    last_failure: Option<FailureReason>,
    limit_hits: u64,
}

/// Why a scrape failed: a bounded reason for the metric and a message for the log (free of
/// secrets), and whether a limit was what failed it.
struct Failure {
    reason: FailureReason,
    message: String,
    limit: bool,
}

impl Failure {
    fn error(message: String) -> Failure {
        Failure {
            reason: FailureReason::Error,
            message,
            limit: false,
        }
    }

    fn limit(message: String) -> Failure {
        Failure {
            reason: FailureReason::Error,
            message,
            limit: true,
        }
    }
}

/// What a successful scrape brought.
struct Scrape {
    points: Vec<Scraped>,
    /// Samples in the payload, before the metric name filter.
    scraped: usize,
    families: std::collections::HashMap<String, (Kind, String)>,
    kinds: Vec<Kind>,
}

impl ScrapeCollector {
    /// A collector for `target`, storing into `registry`; `republish` also serves the scraped
    /// series on our `/metrics`.
    pub fn new(
        target: ScrapeTarget,
        registry: Arc<Registry>,
        republish: bool,
    ) -> Result<Self, CollectError> {
        let client = crate::targets::http_client(&target.auth, target.timeout)
            .map_err(|err| CollectError(format!("scrape target {}: {err}", target.name)))?;
        Ok(ScrapeCollector {
            name: format!("scrape/{}", target.name),
            series_key: format!("scrape/{}/series", target.name),
            target,
            client,
            registry,
            republish,
            last_failure: None,
            limit_hits: 0,
        })
    }

    /// Fetches and parses one payload, within the target's timeout.
    async fn scrape(&self) -> Result<Scrape, Failure> {
        let t = &self.target;
        let scrub = |err: &reqwest::Error| t.url.scrub(&error_chain(err));
        let request = self
            .client
            .get(t.url.expose())
            .header(reqwest::header::ACCEPT, exposition::ACCEPT)
            .header(
                "X-Prometheus-Scrape-Timeout-Seconds",
                format!("{}", t.timeout.as_secs_f64()),
            );
        let request = crate::targets::authorize(request, &t.auth).map_err(Failure::error)?;
        let mut response = request.send().await.map_err(|err| Failure {
            reason: if err.is_timeout() {
                FailureReason::Timeout
            } else {
                FailureReason::Connect
            },
            message: scrub(&err),
            limit: false,
        })?;
        let status = response.status();
        if status != reqwest::StatusCode::OK {
            let auth = matches!(status.as_u16(), 401 | 403);
            return Err(Failure {
                reason: if auth {
                    FailureReason::Auth
                } else {
                    FailureReason::Error
                },
                message: format!("server returned HTTP status {status}"),
                limit: false,
            });
        }
        let content_type = response
            .headers()
            .get(reqwest::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let format = Format::from_content_type(content_type.as_deref()).map_err(Failure::error)?;
        // Read in chunks, counting decompressed bytes: a body past the limit is refused before
        // it is all in memory.
        let mut body = Vec::new();
        while let Some(chunk) = response.chunk().await.map_err(|err| Failure {
            reason: if err.is_timeout() {
                FailureReason::Timeout
            } else {
                FailureReason::Error
            },
            message: scrub(&err),
            limit: false,
        })? {
            if body.len() + chunk.len() > t.body_size_limit {
                return Err(Failure::limit(format!(
                    "body larger than body_size_limit ({} bytes)",
                    t.body_size_limit
                )));
            }
            body.extend_from_slice(&chunk);
        }
        // Parsing and converting are CPU work on up to `body_size_limit` bytes: off the async
        // workers, which serve /metrics and the API.
        let target = self.target.clone();
        tokio::task::spawn_blocking(move || ingest_body(&target, &body, format))
            .await
            .map_err(|err| Failure::error(format!("parsing the payload failed: {err}")))?
    }
}

/// A payload read into history points: checked against the limits, parsed, filtered and
/// labelled. The CPU side of a scrape, on the blocking pool.
fn ingest_body(target: &ScrapeTarget, body: &[u8], format: Format) -> Result<Scrape, Failure> {
    let text = std::str::from_utf8(body)
        .map_err(|err| Failure::error(format!("the body is not UTF-8: {err}")))?;
    // Without a name filter every sample line is a sample that counts against the limit: a
    // payload past it is refused before it is parsed into memory.
    if target.sample_limit > 0
        && target.relabel.keep.is_none()
        && target.relabel.drop.is_none()
        && sample_lines(text) > target.sample_limit
    {
        return Err(Failure::limit(format!(
            "more than sample_limit {} samples",
            target.sample_limit
        )));
    }
    let parsed = exposition::parse(text, format)
        .map_err(|err| Failure::error(format!("parsing the {format:?} payload: {err}")))?;
    convert(target, parsed)
}

/// What a scrape of `body` stores, without the request: for the benchmarks of ingestion.
pub fn ingest(target: &ScrapeTarget, body: &[u8], format: Format) -> Result<Vec<Scraped>, String> {
    ingest_body(target, body, format)
        .map(|s| s.points)
        .map_err(|f| f.message)
}

/// Lines that are neither empty nor comments: an upper bound of the samples a payload holds.
fn sample_lines(text: &str) -> usize {
    text.lines()
        .filter(|l| {
            let l = l.trim_start();
            !l.is_empty() && !l.starts_with('#')
        })
        .count()
}

/// A label name free in `taken`: `name`, else `exported_name`, `exported_exported_name`, …
/// (Prometheus's `honor_labels: false`).
fn exported(name: &str, taken: &dyn Fn(&str) -> bool) -> String {
    let mut n = format!("exported_{name}");
    while taken(&n) {
        n.insert_str(0, "exported_");
    }
    n
}

/// The payload as history points: filtered by name, labelled with the target, checked against
/// the limits, duplicates dropped (the first kept, as Prometheus keeps it).
fn convert(t: &ScrapeTarget, parsed: exposition::Exposition) -> Result<Scrape, Failure> {
    let scraped = parsed.samples.len();
    let mut points = Vec::with_capacity(scraped);
    let mut kinds = Vec::with_capacity(scraped);
    let mut seen = std::collections::HashSet::with_capacity(scraped);
    for s in parsed.samples {
        if t.relabel
            .keep
            .as_ref()
            .is_some_and(|r| !r.is_match(&s.name))
            || t.relabel.drop.as_ref().is_some_and(|r| r.is_match(&s.name))
        {
            continue;
        }
        let mut pairs: Vec<(String, String)> = Vec::with_capacity(s.labels.len() + 1);
        let clash = s.labels.iter().any(|(k, v)| k == "target" && !v.is_empty());
        let renamed = clash.then(|| {
            exported("target", &|n| {
                s.labels.iter().any(|(k, v)| k == n && !v.is_empty())
            })
        });
        for (k, v) in s.labels {
            if v.is_empty() {
                continue;
            }
            // Ours wins, theirs is kept under a free name (Prometheus's honor_labels:
            // false).
            let k = match &renamed {
                Some(r) if k == "target" => r.clone(),
                _ => k,
            };
            pairs.push((k, v));
        }
        pairs.push(("target".to_owned(), t.name.clone()));
        // The name counts as a label, as in Prometheus.
        if t.label_limit > 0 && pairs.len() + 1 > t.label_limit {
            return Err(Failure::limit(format!(
                "{} has {} labels, more than label_limit {}",
                s.name,
                pairs.len() + 1,
                t.label_limit
            )));
        }
        let labels = Labels::new(pairs);
        if !seen.insert((s.name.clone(), labels.clone())) {
            continue;
        }
        if t.sample_limit > 0 && points.len() >= t.sample_limit {
            return Err(Failure::limit(format!(
                "more than sample_limit {} samples",
                t.sample_limit
            )));
        }
        kinds.push(s.kind);
        points.push(Scraped {
            name: s.name,
            labels,
            t_ms: s.timestamp_ms.filter(|_| t.honor_timestamps),
            value: s.value,
        });
    }
    Ok(Scrape {
        points,
        scraped,
        families: parsed.families,
        kinds,
    })
}

/// A name the text format 0.0.4 can carry unquoted (our `/metrics` speaks only that).
fn legacy_name(name: &str, colons: bool) -> bool {
    let mut chars = name.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || (colons && c == ':'))
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || (colons && c == ':'))
}

impl ScrapeCollector {
    /// The scraped series as families for our `/metrics`: counters' `_total` series stay
    /// counters, everything else is served as a gauge (the encoder has no untyped kind).
    /// Series whose name or label names the 0.0.4 format cannot write (UTF-8 names) are left
    /// out: written as they are, they would make the whole exposition unparsable.
    fn families(scrape: &Scrape) -> Vec<Family> {
        let mut out: Vec<Family> = Vec::new();
        let mut index: std::collections::HashMap<&str, usize> = Default::default();
        for (p, kind) in scrape.points.iter().zip(&scrape.kinds) {
            if !legacy_name(&p.name, true) || !p.labels.iter().all(|(k, _)| legacy_name(k, false)) {
                continue;
            }
            let i = *index.entry(p.name.as_str()).or_insert_with(|| {
                let family = family_name(&p.name, &scrape.families);
                let help = scrape
                    .families
                    .get(family)
                    .map(|(_, h)| h.clone())
                    .unwrap_or_default();
                let counter = *kind == Kind::Counter && p.name.ends_with("_total");
                out.push(Family {
                    name: p.name.clone(),
                    help,
                    kind: if counter {
                        MetricKind::Counter
                    } else {
                        MetricKind::Gauge
                    },
                    samples: Vec::new(),
                });
                out.len() - 1
            });
            if let Some(f) = out.get_mut(i) {
                f.samples.push(Sample {
                    labels: p.labels.clone(),
                    value: p.value,
                });
            }
        }
        out
    }
}

/// The declared family a series belongs to (its name without a type's suffix), for its help.
fn family_name<'a>(
    name: &'a str,
    families: &std::collections::HashMap<String, (Kind, String)>,
) -> &'a str {
    if families.contains_key(name) {
        return name;
    }
    for suffix in [
        "_bucket", "_sum", "_count", "_total", "_created", "_info", "_gcount", "_gsum",
    ] {
        if let Some(base) = name.strip_suffix(suffix)
            && families.contains_key(base)
        {
            return base;
        }
    }
    name
}

impl Collector for ScrapeCollector {
    fn name(&self) -> &str {
        &self.name
    }

    async fn collect(&mut self) -> Result<Families, CollectError> {
        let started = Instant::now();
        // Within the scheduler's deadline (`schedule_timeout`), so the failure is published.
        let timeout = self.target.timeout.min(self.target.interval.mul_f64(0.9));
        // A panic in a client library is a failed scrape like any other: caught here, so the
        // series of the last scrape are ended rather than left to look current.
        let scrape = AssertUnwindSafe(self.scrape()).catch_unwind();
        let result = match tokio::time::timeout(timeout, scrape).await {
            Ok(Ok(r)) => r,
            Ok(Err(_)) => Err(Failure::error("the scrape panicked".to_owned())),
            Err(_) => Err(Failure {
                reason: FailureReason::Timeout,
                message: format!("no answer within {:.1}s", timeout.as_secs_f64()),
                limit: false,
            }),
        };
        let at_ms = super::now_ms();
        let duration = started.elapsed();
        let name = self.target.name.clone();
        let labels = [("target", name.as_str())];
        let mut out = Families::new();
        let failure = match result {
            Ok(scrape) => {
                let serve = self.republish.then(|| Self::families(&scrape));
                self.registry
                    .publish_scraped(&self.series_key, &scrape.points, at_ms, serve);
                out.gauge(
                    "autotuner_scrape_samples_scraped",
                    "Samples in the target's last payload.",
                    &labels,
                    scrape.scraped as f64,
                );
                out.gauge(
                    "autotuner_scrape_samples_post_metric_relabeling",
                    "Samples of the target's last payload kept after the metric name filter.",
                    &labels,
                    scrape.points.len() as f64,
                );
                if let Some(was) = self.last_failure.take() {
                    tracing::info!(target_name = %name, url = %self.target.url.redacted(), after = was.as_str(), "scrape target reachable again");
                }
                None
            }
            Err(f) => {
                // Nothing of a failed scrape is stored, and what the last one stored ends
                // here (Prometheus appends a failed scrape as an empty one).
                self.registry.publish_scraped(
                    &self.series_key,
                    &[],
                    at_ms,
                    self.republish.then(Vec::new),
                );
                if f.limit {
                    self.limit_hits += 1;
                }
                if self.last_failure != Some(f.reason) {
                    tracing::warn!(target_name = %name, url = %self.target.url.redacted(), reason = f.reason.as_str(), error = %f.message, "scrape failed");
                }
                self.last_failure = Some(f.reason);
                Some(f.reason)
            }
        };
        out.gauge(
            "autotuner_scrape_up",
            "1 when the target's last scrape succeeded, 0 when it failed (Prometheus's `up`).",
            &labels,
            if failure.is_none() { 1.0 } else { 0.0 },
        );
        out.gauge(
            "autotuner_scrape_duration_seconds",
            "How long the target's last scrape took.",
            &labels,
            duration.as_secs_f64(),
        );
        out.counter(
            "autotuner_scrape_limit_hits_total",
            "Scrapes of the target refused whole because a body, sample or label limit was exceeded.",
            &labels,
            self.limit_hits as f64,
        );
        super::target_error(&mut out, "scrape", &name, failure);
        Ok(out)
    }
}

/// The deadline the scheduler gives a scrape: the target's own timeout plus room to publish
/// the failure, so `autotuner_scrape_up 0` always goes out.
pub fn schedule_timeout(target: &ScrapeTarget) -> Duration {
    (target.timeout + Duration::from_secs(1)).min(target.interval)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target() -> ScrapeTarget {
        let c = crate::settings::Config::parse(
            "targets:\n  scrape:\n    - name: app\n      url: http://127.0.0.1:1/metrics\n      sample_limit: 3\n",
        )
        .unwrap();
        c.scrape.targets[0].clone()
    }

    #[test]
    fn a_clashing_target_label_is_kept_under_a_free_name() {
        let parsed = exposition::parse(
            "foo{exported_target=\"a\",target=\"b\"} 1\nfoo{exported_target=\"c\",target=\"b\"} 2\n",
            Format::Text,
        )
        .unwrap();
        let s = convert(&target(), parsed).map_err(|f| f.message).unwrap();
        assert_eq!(s.points.len(), 2, "no series merged");
        let l = &s.points[0].labels;
        assert_eq!(l.get("target"), Some("app"));
        assert_eq!(l.get("exported_target"), Some("a"));
        assert_eq!(l.get("exported_exported_target"), Some("b"));
    }

    #[test]
    fn limits_refuse_the_whole_scrape_and_before_parsing_when_they_can() {
        let t = target();
        assert_eq!(sample_lines("# HELP x y\n\nx 1\n  x{a=\"1\"} 2\n"), 2);
        let parsed = exposition::parse("a 1\nb 2\nc 3\nd 4\n", Format::Text).unwrap();
        let f = convert(&t, parsed).err().unwrap();
        assert!(
            f.limit && f.message.contains("sample_limit 3"),
            "{}",
            f.message
        );
    }

    #[test]
    fn republished_series_are_only_those_the_text_format_can_carry() {
        let parsed = exposition::parse(
            "{\"http.requests\",\"route.name\"=\"/x\"} 3\nok_total{route=\"/x\"} 4\n",
            Format::Text,
        )
        .unwrap();
        let mut t = target();
        t.sample_limit = 0;
        let s = convert(&t, parsed).map_err(|f| f.message).unwrap();
        let families = ScrapeCollector::families(&s);
        assert_eq!(families.len(), 1);
        assert_eq!(families[0].name, "ok_total");
    }
}
