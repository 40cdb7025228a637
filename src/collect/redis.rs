//! The Redis collector: `redis_up`, the PING round trip, the INFO fields operators know from
//! redis_exporter (same names and meanings), the slow log length, and the ready-to-compare
//! gauges the rules use: `redis_cache_hit_ratio` over a window and `redis_memory_usage_ratio`.
//!
//! Owns the `redis_*` metric names (README "Metrics" is the reference) and the INFO field table.
//! Uses `sample`, `targets::RedisHandle` and the `Collector` trait.
//!
//! One collector runs per target. A dead, hung or misconfigured Redis is not a collector
//! failure: the run succeeds and says `redis_up 0`, with the reason in
//! `autotuner_target_error{kind="redis",target,reason}`. Every command shares one deadline,
//! shorter than the scheduler's timeout, so that answer is always published.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use crate::sample::{Families, MetricKind};
use crate::targets::{FailureReason, RedisHandle, TargetFailure};

use super::window::{CounterWindow, share};
use super::{CollectError, Collector};

/// One INFO field and the metric it becomes.
struct InfoMetric {
    field: &'static str,
    metric: &'static str,
    kind: MetricKind,
    help: &'static str,
}

const fn gauge(field: &'static str, metric: &'static str, help: &'static str) -> InfoMetric {
    InfoMetric {
        field,
        metric,
        kind: MetricKind::Gauge,
        help,
    }
}

const fn counter(field: &'static str, metric: &'static str, help: &'static str) -> InfoMetric {
    InfoMetric {
        field,
        metric,
        kind: MetricKind::Counter,
        help,
    }
}

/// INFO field → metric, with redis_exporter's names so existing dashboards keep working.
const INFO_METRICS: &[InfoMetric] = &[
    gauge(
        "uptime_in_seconds",
        "redis_uptime_in_seconds",
        "Seconds since the Redis server started.",
    ),
    gauge(
        "connected_clients",
        "redis_connected_clients",
        "Client connections (excluding replicas).",
    ),
    gauge(
        "blocked_clients",
        "redis_blocked_clients",
        "Clients blocked in a blocking call (BLPOP, WAIT, ...).",
    ),
    gauge("maxclients", "redis_max_clients", "The maxclients setting."),
    gauge(
        "used_memory",
        "redis_memory_used_bytes",
        "Memory allocated by Redis (used_memory).",
    ),
    gauge(
        "used_memory_rss",
        "redis_memory_used_rss_bytes",
        "Resident memory of the Redis process as the OS sees it.",
    ),
    gauge(
        "used_memory_peak",
        "redis_memory_used_peak_bytes",
        "Peak of used_memory.",
    ),
    gauge(
        "maxmemory",
        "redis_memory_max_bytes",
        "The maxmemory setting; 0 means no limit.",
    ),
    gauge(
        "mem_fragmentation_ratio",
        "redis_mem_fragmentation_ratio",
        "used_memory_rss / used_memory.",
    ),
    counter(
        "total_connections_received",
        "redis_connections_received_total",
        "Connections accepted.",
    ),
    counter(
        "rejected_connections",
        "redis_rejected_connections_total",
        "Connections rejected because of maxclients.",
    ),
    counter(
        "total_commands_processed",
        "redis_commands_processed_total",
        "Commands processed.",
    ),
    counter(
        "keyspace_hits",
        "redis_keyspace_hits_total",
        "Successful key lookups.",
    ),
    counter(
        "keyspace_misses",
        "redis_keyspace_misses_total",
        "Failed key lookups.",
    ),
    counter(
        "evicted_keys",
        "redis_evicted_keys_total",
        "Keys evicted because of maxmemory.",
    ),
    counter(
        "expired_keys",
        "redis_expired_keys_total",
        "Keys expired by their TTL.",
    ),
    counter(
        "used_cpu_sys",
        "redis_cpu_sys_seconds_total",
        "System CPU consumed by the Redis server.",
    ),
    counter(
        "used_cpu_user",
        "redis_cpu_user_seconds_total",
        "User CPU consumed by the Redis server.",
    ),
];

/// The parsed text of an INFO reply.
#[derive(Debug, Default)]
pub struct Info<'a> {
    fields: HashMap<&'a str, &'a str>,
    /// `(db, keys, expires)` from the Keyspace section.
    keyspace: Vec<(&'a str, f64, f64)>,
}

impl<'a> Info<'a> {
    /// Parses `field:value` lines; sections, comments and blank lines are skipped.
    pub fn parse(text: &'a str) -> Info<'a> {
        let mut info = Info::default();
        for line in text.lines() {
            let line = line.trim_end_matches('\r');
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let Some((field, value)) = line.split_once(':') else {
                continue;
            };
            // `db0:keys=1,expires=0,avg_ttl=0`
            if field.starts_with("db") && field[2..].chars().all(|c| c.is_ascii_digit()) {
                let mut keys = None;
                let mut expires = 0.0;
                for part in value.split(',') {
                    match part.split_once('=') {
                        Some(("keys", v)) => keys = v.parse().ok(),
                        Some(("expires", v)) => expires = v.parse().unwrap_or(0.0),
                        _ => {}
                    }
                }
                if let Some(keys) = keys {
                    info.keyspace.push((field, keys, expires));
                }
                continue;
            }
            info.fields.insert(field, value);
        }
        info
    }

    /// A numeric field.
    pub fn number(&self, field: &str) -> Option<f64> {
        self.fields.get(field).and_then(|v| v.parse::<f64>().ok())
    }

    /// A text field.
    pub fn text(&self, field: &str) -> Option<&'a str> {
        self.fields.get(field).copied()
    }
}

/// Measures one Redis server.
pub struct RedisCollector {
    name: String,
    handle: RedisHandle,
    /// Deadline for the whole run, under the scheduler's timeout.
    deadline: Duration,
    /// Keyspace hits and misses within the hit-ratio window.
    lookups: CounterWindow,
    /// The last failure, to log changes once rather than every run.
    last_failure: Option<FailureReason>,
}

impl RedisCollector {
    /// A collector for `handle`; `timeout` is the scheduler's timeout for one run.
    pub fn new(handle: RedisHandle, timeout: Duration, window: Duration) -> Self {
        RedisCollector {
            name: format!("redis/{}", handle.name),
            deadline: run_deadline(timeout),
            handle,
            lookups: CounterWindow::new(window),
            last_failure: None,
        }
    }

    async fn measure(
        &mut self,
        out: &mut Families,
        labels: &[(&str, &str)],
    ) -> Result<(), redis::RedisError> {
        let mut conn = self.handle.connection();
        let started = Instant::now();
        redis::cmd("PING").query_async::<String>(&mut conn).await?;
        let ping = started.elapsed();
        let text: String = redis::cmd("INFO").query_async(&mut conn).await?;
        // An ACL user may be denied SLOWLOG; the rest is still worth publishing.
        let slowlog: Option<f64> = redis::cmd("SLOWLOG")
            .arg("LEN")
            .query_async::<i64>(&mut conn)
            .await
            .ok()
            .map(|n| n as f64);
        let now = Instant::now();
        let info = Info::parse(&text);

        out.gauge("redis_up", UP_HELP, labels, 1.0);
        out.gauge(
            "redis_probe_latency_seconds",
            "Round trip of a PING.",
            labels,
            ping.as_secs_f64(),
        );
        let mut info_labels = labels.to_vec();
        let version = info.text("redis_version").unwrap_or("unknown");
        let mode = info.text("redis_mode").unwrap_or("unknown");
        let role = info.text("role").unwrap_or("unknown");
        info_labels.extend([
            ("redis_version", version),
            ("redis_mode", mode),
            ("role", role),
        ]);
        out.gauge(
            "redis_instance_info",
            "Constant 1, labelled with the server's version, mode and role.",
            &info_labels,
            1.0,
        );
        for m in INFO_METRICS {
            if let Some(v) = info.number(m.field) {
                match m.kind {
                    MetricKind::Gauge => out.gauge(m.metric, m.help, labels, v),
                    MetricKind::Counter => out.counter(m.metric, m.help, labels, v),
                }
            }
        }
        for (db, keys, expires) in &info.keyspace {
            let mut l = labels.to_vec();
            l.push(("db", db));
            out.gauge("redis_db_keys", "Keys in the database.", &l, *keys);
            out.gauge(
                "redis_db_keys_expiring",
                "Keys with a TTL in the database.",
                &l,
                *expires,
            );
        }
        if let Some(n) = slowlog {
            out.gauge(
                "redis_slowlog_length",
                "Entries in the slow log.",
                labels,
                n,
            );
        }
        if let (Some(used), Some(max)) = (info.number("used_memory"), info.number("maxmemory"))
            && max > 0.0
        {
            out.gauge(
                "redis_memory_usage_ratio",
                "used_memory / maxmemory; absent when maxmemory is not set.",
                labels,
                used / max,
            );
        }
        if let (Some(hits), Some(misses)) =
            (info.number("keyspace_hits"), info.number("keyspace_misses"))
            && let Some(ratio) = self
                .lookups
                .push(now, vec![hits, misses])
                .and_then(|d| share(d[0], d[1]))
        {
            out.gauge(
                "redis_cache_hit_ratio",
                "Hits / (hits + misses) over the configured window; absent when the window saw no lookups.",
                labels,
                ratio,
            );
        }
        Ok(())
    }
}

const UP_HELP: &str = "Whether the last collection reached the Redis server (1) or not (0).";

/// The deadline of one run inside the scheduler's `timeout`: nine tenths, so that a hung server
/// still leaves time to publish `redis_up 0` before the scheduler gives up on the run.
pub fn run_deadline(timeout: Duration) -> Duration {
    timeout.mul_f64(0.9)
}

impl Collector for RedisCollector {
    fn name(&self) -> &str {
        &self.name
    }

    async fn collect(&mut self) -> Result<Families, CollectError> {
        let mut out = Families::new();
        let target = self.handle.name.clone();
        let labels = [("target", target.as_str())];
        let deadline = self.deadline;
        let mut measured = Families::new();
        let result = tokio::time::timeout(deadline, self.measure(&mut measured, &labels)).await;
        let failure = match result {
            Ok(Ok(())) => None,
            Ok(Err(err)) => Some(self.handle.failure(&err)),
            Err(_) => Some(TargetFailure {
                reason: FailureReason::Timeout,
                message: format!("no answer within {:.1}s", deadline.as_secs_f64()),
            }),
        };
        match &failure {
            None => {
                if let Some(was) = self.last_failure.take() {
                    tracing::info!(target_name = %target, url = %self.handle.url(), after = was.as_str(), "Redis reachable again");
                }
                out = measured;
            }
            Some(f) => {
                if self.last_failure != Some(f.reason) {
                    tracing::warn!(target_name = %target, url = %self.handle.url(), reason = f.reason.as_str(), error = %f.message, "Redis unreachable");
                }
                self.last_failure = Some(f.reason);
                out.gauge("redis_up", UP_HELP, &labels, 0.0);
            }
        }
        for reason in [
            FailureReason::Connect,
            FailureReason::Auth,
            FailureReason::Timeout,
            FailureReason::Error,
        ] {
            out.gauge(
                "autotuner_target_error",
                "1 when the last collection from the target failed for this reason.",
                &[
                    ("kind", "redis"),
                    ("target", &target),
                    ("reason", reason.as_str()),
                ],
                if failure.as_ref().is_some_and(|f| f.reason == reason) {
                    1.0
                } else {
                    0.0
                },
            );
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Real `INFO` output of Redis 7.0.15 (trimmed to a few fields of each section).
    const INFO_7_0: &str = "# Server\r\nredis_version:7.0.15\r\nredis_mode:standalone\r\nuptime_in_seconds:5117\r\n\r\n# Clients\r\nconnected_clients:3\r\nmaxclients:10000\r\nblocked_clients:1\r\n\r\n# Memory\r\nused_memory:1156944\r\nused_memory_rss:7340032\r\nused_memory_peak:1352112\r\nmaxmemory:104857600\r\nmem_fragmentation_ratio:6.52\r\n\r\n# Stats\r\ntotal_connections_received:15\r\ntotal_commands_processed:421\r\nrejected_connections:0\r\nexpired_keys:2\r\nevicted_keys:0\r\nkeyspace_hits:100\r\nkeyspace_misses:300\r\n\r\n# Replication\r\nrole:master\r\n\r\n# CPU\r\nused_cpu_sys:1.234567\r\nused_cpu_user:2.5\r\n\r\n# Keyspace\r\ndb0:keys=12,expires=3,avg_ttl=1000\r\ndb3:keys=1,expires=0,avg_ttl=0\r\n";

    #[test]
    fn info_fields_map_to_the_table() {
        let info = Info::parse(INFO_7_0);
        assert_eq!(info.number("keyspace_hits"), Some(100.0));
        assert_eq!(info.number("mem_fragmentation_ratio"), Some(6.52));
        assert_eq!(info.text("role"), Some("master"));
        assert_eq!(info.keyspace, vec![("db0", 12.0, 3.0), ("db3", 1.0, 0.0)]);
        let mapped = INFO_METRICS
            .iter()
            .filter(|m| info.number(m.field).is_some())
            .count();
        assert_eq!(
            mapped,
            INFO_METRICS.len(),
            "every table field is in real INFO output"
        );
        for m in INFO_METRICS {
            assert_eq!(
                m.kind == MetricKind::Counter,
                m.metric.ends_with("_total"),
                "{}",
                m.metric
            );
        }
    }
}
