//! The HTTP probe collector: requests each configured application endpoint and publishes how
//! long it took, its status, whether it counted as a success, and the share of failed probes
//! over a window, so the documented alerts (response time above 2 s, error rate above 5 %) have
//! real figures.
//!
//! Owns the `probe_http_*` metric names. Uses `sample`, `settings::HttpTarget` and the
//! `Collector` trait; requests go out through reqwest with explicit timeouts, redirect and TLS
//! policies. Every probe runs concurrently, each bounded by its own timeout.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use crate::sample::Families;
use crate::settings::{HttpMethod, HttpTarget};

use super::{CollectError, Collector};

/// Largest body read per probe: enough to include any health page, small enough that a probe
/// pointed at a download costs nothing.
const MAX_BODY_BYTES: usize = 1 << 20;

/// Probes every configured endpoint.
pub struct HttpProbeCollector {
    probes: Vec<Probe>,
    window: Duration,
}

struct Probe {
    target: HttpTarget,
    client: reqwest::Client,
    /// `(when, succeeded)` within the window, oldest first.
    results: VecDeque<(Instant, bool)>,
    failing: bool,
}

/// What one request came to.
struct Outcome {
    duration: Duration,
    status: Option<u16>,
    success: bool,
    error: Option<String>,
}

impl HttpProbeCollector {
    /// Builds one client per target, with that target's timeout, redirect and TLS policy.
    pub fn new(targets: &[HttpTarget], window: Duration) -> Result<Self, CollectError> {
        let mut probes = Vec::with_capacity(targets.len());
        for target in targets {
            let redirect = if target.follow_redirects {
                reqwest::redirect::Policy::limited(10)
            } else {
                reqwest::redirect::Policy::none()
            };
            let client = reqwest::Client::builder()
                .timeout(target.timeout)
                .connect_timeout(target.timeout.min(Duration::from_secs(5)))
                .redirect(redirect)
                .tls_danger_accept_invalid_certs(target.insecure_skip_verify)
                .user_agent(concat!("autotuner/", env!("CARGO_PKG_VERSION")))
                // One connection per probe, as a new user would make; pooling would hide
                // connection setup time from the measurement.
                .pool_max_idle_per_host(0)
                .build()
                .map_err(|err| {
                    CollectError(format!(
                        "preparing the HTTP client for {}: {err}",
                        target.name
                    ))
                })?;
            probes.push(Probe {
                target: target.clone(),
                client,
                results: VecDeque::new(),
                failing: false,
            });
        }
        Ok(HttpProbeCollector { probes, window })
    }
}

async fn probe(client: reqwest::Client, target: HttpTarget) -> Outcome {
    let started = Instant::now();
    let method = match target.method {
        HttpMethod::Get => reqwest::Method::GET,
        HttpMethod::Head => reqwest::Method::HEAD,
    };
    let scrub = |err: reqwest::Error| {
        // reqwest names the URL in its errors; ours may hold credentials.
        target.url.scrub(&crate::targets::error_chain(&err))
    };
    let result = async {
        let mut response = client.request(method, target.url.expose()).send().await?;
        let status = response.status().as_u16();
        let mut read = 0usize;
        while read < MAX_BODY_BYTES {
            match response.chunk().await? {
                Some(chunk) => read += chunk.len(),
                None => break,
            }
        }
        Ok::<u16, reqwest::Error>(status)
    }
    .await;
    let duration = started.elapsed();
    match result {
        Ok(status) => {
            let success = if target.expected_status.is_empty() {
                (200..300).contains(&status)
            } else {
                target.expected_status.contains(&status)
            };
            Outcome {
                duration,
                status: Some(status),
                success,
                error: (!success).then(|| format!("unexpected status {status}")),
            }
        }
        Err(err) => Outcome {
            duration,
            status: None,
            success: false,
            error: Some(scrub(err)),
        },
    }
}

impl Collector for HttpProbeCollector {
    fn name(&self) -> &str {
        "http_probe"
    }

    async fn collect(&mut self) -> Result<Families, CollectError> {
        let mut set = tokio::task::JoinSet::new();
        for (i, p) in self.probes.iter().enumerate() {
            let (client, target) = (p.client.clone(), p.target.clone());
            set.spawn(async move { (i, probe(client, target).await) });
        }
        let mut outcomes: Vec<Option<Outcome>> = (0..self.probes.len()).map(|_| None).collect();
        while let Some(joined) = set.join_next().await {
            match joined {
                Ok((i, outcome)) => outcomes[i] = Some(outcome),
                Err(err) => return Err(CollectError(format!("probe task failed: {err}"))),
            }
        }
        let now = Instant::now();
        let mut out = Families::new();
        for (p, outcome) in self.probes.iter_mut().zip(outcomes) {
            let Some(o) = outcome else { continue };
            let labels = [("target", p.target.name.as_str())];
            match (&o.error, p.failing) {
                (Some(err), false) => {
                    tracing::warn!(target_name = %p.target.name, url = %p.target.url, error = %err, "HTTP probe failing")
                }
                (None, true) => {
                    tracing::info!(target_name = %p.target.name, "HTTP probe succeeding again")
                }
                _ => {}
            }
            p.failing = o.error.is_some();
            p.results.push_back((now, o.success));
            while p
                .results
                .front()
                .is_some_and(|&(t, _)| now.duration_since(t) > self.window)
            {
                p.results.pop_front();
            }
            let failed = p.results.iter().filter(|(_, ok)| !ok).count();
            out.gauge(
                "probe_http_success",
                "1 when the endpoint answered with an expected status within the timeout.",
                &labels,
                if o.success { 1.0 } else { 0.0 },
            );
            out.gauge(
                "probe_http_duration_seconds",
                "Time from sending the request to the end of the response body (or to the failure).",
                &labels,
                o.duration.as_secs_f64(),
            );
            out.gauge(
                "probe_http_status_code",
                "Status code of the response; 0 when there was none (refused, timed out).",
                &labels,
                f64::from(o.status.unwrap_or(0)),
            );
            out.gauge(
                "probe_http_error_ratio",
                "Share of failed probes of this endpoint over the configured window.",
                &labels,
                failed as f64 / p.results.len() as f64,
            );
        }
        Ok(out)
    }
}
