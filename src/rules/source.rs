//! Remote PromQL sources: rule groups with `source: NAME` are evaluated by that server's
//! `/api/v1/query` (Prometheus, Thanos Query, Mimir, VictoriaMetrics all answer it) at the
//! group's evaluation time, and the answer goes back to the engine's state machine.
//!
//! Owns the HTTP query, the decoding of its JSON answer and the `autotuner_source_*` metrics.
//! Uses `settings::SourceConfig`, `targets` (client, credentials), `expr::Value` and the
//! engine's `due_remote`/`apply_remote`.
//!
//! Each query is its own task with its own deadline: a source that is down or slow delays only
//! its own rules, never another group, a scrape or the local rules. An answer is used only
//! when it is whole: an error, a timeout, a result that is not an instant vector or a scalar,
//! or warnings (Thanos and VictoriaMetrics report partial data that way; partial responses are
//! also refused in the request) make the evaluation unknown, and nothing acts on it.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use std::panic::AssertUnwindSafe;

use futures_util::FutureExt as _;
use prometheus::{GaugeVec, IntCounterVec, Opts};

use super::engine::{Engine, RemoteDue};
use super::expr::{Sample, Value};
use crate::registry::Registry;
use crate::sample::Labels;
use crate::settings::SourceConfig;

/// A source's client and settings.
pub struct Source {
    config: SourceConfig,
    client: reqwest::Client,
    endpoint: String,
}

/// The `autotuner_source_*` metrics.
#[derive(Clone)]
pub struct SourceMetrics {
    queries: IntCounterVec,
    failures: IntCounterVec,
    duration: GaugeVec,
}

impl SourceMetrics {
    /// Registers them with `registry`'s own metrics.
    pub fn new(registry: &Registry) -> Result<Self, prometheus::Error> {
        let m = SourceMetrics {
            queries: IntCounterVec::new(
                Opts::new(
                    "autotuner_source_queries_total",
                    "Queries sent to the PromQL source.",
                ),
                &["source"],
            )?,
            failures: IntCounterVec::new(
                Opts::new(
                    "autotuner_source_query_failures_total",
                    "Queries to the PromQL source that gave no usable answer (error, timeout, warnings), by reason.",
                ),
                &["source", "reason"],
            )?,
            duration: GaugeVec::new(
                Opts::new(
                    "autotuner_source_query_duration_seconds",
                    "How long the rule's last evaluation by the PromQL source took (its queries together).",
                ),
                &["source", "rule"],
            )?,
        };
        registry.register(Box::new(m.queries.clone()))?;
        registry.register(Box::new(m.failures.clone()))?;
        registry.register(Box::new(m.duration.clone()))?;
        Ok(m)
    }
}

/// Why a query gave nothing usable: a bounded reason for the metric, a message for the rule's
/// health (free of secrets).
#[derive(Debug)]
struct QueryError {
    reason: &'static str,
    message: String,
}

impl Source {
    /// A client for `config`.
    pub fn new(config: SourceConfig) -> Result<Self, String> {
        let client = crate::targets::http_client(&config.auth, config.timeout)
            .map_err(|e| format!("source {}: {e}", config.name))?;
        let endpoint = format!("{}/api/v1/query", config.url.expose().trim_end_matches('/'));
        Ok(Source {
            config,
            client,
            endpoint,
        })
    }

    /// Evaluates `expr` at `at_ms` (less the source's `query_offset`).
    async fn query(&self, expr: &str, at_ms: i64) -> Result<Value, QueryError> {
        let c = &self.config;
        let offset = i64::try_from(c.query_offset.as_millis()).unwrap_or(0);
        let time = (at_ms - offset) as f64 / 1000.0;
        let form = [
            ("query", expr.to_owned()),
            ("time", format!("{time:.3}")),
            ("timeout", format!("{}ms", c.timeout.as_millis())),
            // Thanos answers a failed store as a warning on a 200 unless told not to;
            // VictoriaMetrics' cluster likewise. Prometheus ignores both.
            ("partial_response", "false".to_owned()),
            ("deny_partial_response", "1".to_owned()),
        ];
        let request = self.client.post(&self.endpoint).form(&form);
        let request =
            crate::targets::authorize(request, &c.auth).map_err(|message| QueryError {
                reason: "credentials",
                message,
            })?;
        let scrub = |err: &reqwest::Error| c.url.scrub(&crate::targets::error_chain(err));
        let send = async {
            let response = request.send().await.map_err(|e| QueryError {
                reason: if e.is_timeout() { "timeout" } else { "connect" },
                message: scrub(&e),
            })?;
            let status = response.status();
            // At most 16 MiB of answer: a condition returning more is a mistake to report,
            // not a reason to hold that much.
            let body = read_limited(response, 16 << 20)
                .await
                .map_err(|message| QueryError {
                    reason: "error",
                    message,
                })?;
            decode(status, &body)
        };
        match tokio::time::timeout(c.timeout, send).await {
            Ok(r) => r,
            Err(_) => Err(QueryError {
                reason: "timeout",
                message: format!("no answer within {:.1}s", c.timeout.as_secs_f64()),
            }),
        }
    }
}

async fn read_limited(mut response: reqwest::Response, limit: usize) -> Result<Vec<u8>, String> {
    let mut body = Vec::new();
    while let Some(chunk) = response
        .chunk()
        .await
        .map_err(|e| format!("reading the answer: {}", crate::targets::error_chain(&e)))?
    {
        if body.len() + chunk.len() > limit {
            return Err(format!("the answer is larger than {limit} bytes"));
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

#[derive(serde::Deserialize)]
struct Answer {
    status: String,
    #[serde(default)]
    data: Option<Data>,
    #[serde(default, rename = "errorType")]
    error_type: Option<String>,
    #[serde(default)]
    error: Option<String>,
    #[serde(default)]
    warnings: Vec<String>,
    /// VictoriaMetrics' cluster marks a partial answer this way.
    #[serde(default, rename = "isPartial")]
    is_partial: bool,
}

#[derive(serde::Deserialize)]
#[serde(tag = "resultType", content = "result", rename_all = "lowercase")]
enum Data {
    Vector(Vec<VectorSample>),
    Scalar((f64, String)),
    Matrix(serde::de::IgnoredAny),
    String(serde::de::IgnoredAny),
}

#[derive(serde::Deserialize)]
struct VectorSample {
    metric: HashMap<String, String>,
    value: (f64, String),
}

/// A sample value as the API writes it: a string, for `NaN` and `±Inf` (Go's spelling).
fn number(text: &str) -> Result<f64, String> {
    match text {
        "NaN" => Ok(f64::NAN),
        "+Inf" | "Inf" => Ok(f64::INFINITY),
        "-Inf" => Ok(f64::NEG_INFINITY),
        t => t
            .parse()
            .map_err(|_| format!("the answer holds a value that is not a number: {t:.40}")),
    }
}

/// Decodes an answer of `/api/v1/query` into a condition's value.
fn decode(status: reqwest::StatusCode, body: &[u8]) -> Result<Value, QueryError> {
    let err = |reason: &'static str, message: String| QueryError { reason, message };
    let answer: Answer = match serde_json::from_slice(body) {
        Ok(a) => a,
        Err(e) if !status.is_success() => {
            // A proxy's error page, not the API's JSON.
            return Err(err(
                "error",
                format!("HTTP status {status} (not an API answer: {e})"),
            ));
        }
        Err(e) => {
            return Err(err(
                "error",
                format!("the answer is not the API's JSON: {e}"),
            ));
        }
    };
    if answer.status != "success" {
        return Err(err(
            "error",
            format!(
                "the source answered {} ({}): {}",
                status,
                answer.error_type.as_deref().unwrap_or("error"),
                answer.error.as_deref().unwrap_or("no message")
            ),
        ));
    }
    if !answer.warnings.is_empty() {
        return Err(err(
            "warnings",
            format!(
                "the answer came with warnings (partial data is not acted on): {}",
                answer.warnings.join("; ")
            ),
        ));
    }
    if answer.is_partial {
        return Err(err(
            "warnings",
            "the answer is partial (isPartial); partial data is not acted on".to_owned(),
        ));
    }
    match answer.data {
        Some(Data::Vector(samples)) => {
            let mut out = Vec::with_capacity(samples.len());
            for s in samples {
                out.push(Sample {
                    labels: Labels::new(s.metric),
                    value: number(&s.value.1).map_err(|m| err("error", m))?,
                });
            }
            Ok(Value::Vector(out))
        }
        Some(Data::Scalar((_, v))) => Ok(Value::Scalar(number(&v).map_err(|m| err("error", m))?)),
        Some(Data::Matrix(_)) | Some(Data::String(_)) => Err(err(
            "error",
            "the condition evaluates to a range vector or a string".to_owned(),
        )),
        None => Err(err("error", "the answer has no data".to_owned())),
    }
}

/// Evaluates one due rule by its source and hands the answer to the engine.
async fn evaluate(
    engine: Arc<Engine>,
    source: Arc<Source>,
    metrics: SourceMetrics,
    due: RemoteDue,
) {
    let started = Instant::now();
    let name = source.config.name.as_str();
    let ask = async |expr: &str| {
        metrics.queries.with_label_values(&[name]).inc();
        let r = source.query(expr, due.at_ms).await;
        if let Err(e) = &r {
            metrics.failures.with_label_values(&[name, e.reason]).inc();
        }
        r
    };
    let both = async {
        let v = ask(&due.expr).await?;
        match &due.clear {
            Some(c) => ask(c).await.map(|c| (v, Some(c))),
            None => Ok((v, None)),
        }
    };
    // A panic in a client library must still give the engine an answer: the rule waits for
    // one before it is evaluated again.
    let answer = match AssertUnwindSafe(both).catch_unwind().await {
        Ok(a) => a,
        Err(_) => Err(QueryError {
            reason: "error",
            message: "the query panicked".to_owned(),
        }),
    };
    let took = started.elapsed();
    metrics
        .duration
        .with_label_values(&[name, &due.rule])
        .set(took.as_secs_f64());
    let answer = answer.map_err(|e| format!("source {name}: {}", e.message));
    tokio::task::spawn_blocking(move || engine.apply_remote(&due, answer, took))
        .await
        .ok();
}

/// Hands out due remote rules every second until shutdown, each query its own task.
pub async fn run(
    engine: Arc<Engine>,
    sources: Vec<Source>,
    metrics: SourceMetrics,
    mut shutdown: crate::shutdown::Shutdown,
) {
    // Without a source there is nothing to hand out: no wake-up every second for nothing.
    if sources.is_empty() {
        return;
    }
    let sources: HashMap<String, Arc<Source>> = sources
        .into_iter()
        .map(|s| (s.config.name.clone(), Arc::new(s)))
        .collect();
    let mut ticker = tokio::time::interval(Duration::from_secs(1));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut running = tokio::task::JoinSet::new();
    loop {
        tokio::select! {
            _ = shutdown.wait() => break,
            _ = ticker.tick() => {}
        }
        while running.try_join_next().is_some() {}
        let e = engine.clone();
        let now = crate::collect::now_ms();
        let Ok(due) = tokio::task::spawn_blocking(move || e.due_remote(now)).await else {
            continue;
        };
        for d in due {
            // Undeclared sources were refused at load; a rule naming one never gets here.
            let Some(source) = sources.get(&d.source) else {
                continue;
            };
            running.spawn(evaluate(engine.clone(), source.clone(), metrics.clone(), d));
        }
    }
    running.abort_all();
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(body: &str) -> Result<Value, QueryError> {
        decode(reqwest::StatusCode::OK, body.as_bytes())
    }

    #[test]
    fn vectors_scalars_and_special_values_decode() {
        let v = ok(
            r#"{"status":"success","data":{"resultType":"vector","result":[
            {"metric":{"__name__":"up","job":"a"},"value":[1700000000.5,"1"]},
            {"metric":{"job":"b"},"value":[1700000000.5,"NaN"]},
            {"metric":{"job":"c"},"value":[1700000000.5,"-Inf"]}]}}"#,
        )
        .unwrap();
        let Value::Vector(s) = v else { panic!("{v:?}") };
        assert_eq!(s.len(), 3);
        assert_eq!(s[0].labels.get("job"), Some("a"));
        assert_eq!(s[0].labels.get("__name__"), Some("up"));
        assert_eq!(s[0].value, 1.0);
        assert!(s[1].value.is_nan());
        assert_eq!(s[2].value, f64::NEG_INFINITY);
        assert_eq!(
            ok(r#"{"status":"success","data":{"resultType":"scalar","result":[1,"+Inf"]}}"#)
                .unwrap(),
            Value::Scalar(f64::INFINITY)
        );
    }

    #[test]
    fn errors_warnings_partial_answers_and_ranges_are_not_used() {
        let e = decode(
            reqwest::StatusCode::UNPROCESSABLE_ENTITY,
            br#"{"status":"error","errorType":"execution","error":"many-to-many matching not allowed"}"#,
        )
        .unwrap_err();
        assert_eq!(e.reason, "error");
        assert!(e.message.contains("execution"), "{}", e.message);
        assert!(e.message.contains("many-to-many"), "{}", e.message);
        let e = ok(r#"{"status":"success","data":{"resultType":"vector","result":[]},"warnings":["store x unavailable"]}"#).unwrap_err();
        assert_eq!(e.reason, "warnings");
        assert!(e.message.contains("store x unavailable"));
        let e = ok(
            r#"{"status":"success","isPartial":true,"data":{"resultType":"vector","result":[]}}"#,
        )
        .unwrap_err();
        assert_eq!(e.reason, "warnings");
        let e =
            ok(r#"{"status":"success","data":{"resultType":"matrix","result":[]}}"#).unwrap_err();
        assert!(e.message.contains("range vector"));
        let e = decode(
            reqwest::StatusCode::BAD_GATEWAY,
            b"<html>bad gateway</html>",
        )
        .unwrap_err();
        assert!(e.message.contains("502"), "{}", e.message);
        let e = ok(r#"{"status":"success","data":{"resultType":"vector","result":[{"metric":{},"value":[1,"x"]}]}}"#).unwrap_err();
        assert!(e.message.contains("not a number"));
    }
}
