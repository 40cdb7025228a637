//! ① Collection: the `Collector` trait and the scheduler that runs each collector on its own
//! interval, under a timeout, publishing what it measured to the registry.
//!
//! Owns when and how collectors run, and the `autotuner_collector_*` bookkeeping. Uses `sample`,
//! `registry` and `shutdown`; collectors never see rules, actions or HTTP.
//!
//! A failing or hanging collector affects nobody else: each runs in its own task, every run is
//! cut off at its timeout, and its failure is a metric (`autotuner_collector_up 0`) and one log
//! line when it starts failing, not one per interval.

pub mod exposition;
pub mod host;
pub mod http_probe;
pub mod pgbouncer;
pub mod postgres;
pub mod redis;
pub mod scrape;
pub mod window;

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use futures_util::FutureExt as _;
use tokio::task::JoinHandle;
use tokio::time::MissedTickBehavior;

use crate::registry::{Attempt, Registry};
use crate::sample::Families;
use crate::settings::Timing;
use crate::shutdown::Shutdown;
use crate::targets::{FAILURE_REASONS, FailureReason};

/// Why a collection produced nothing. The message must be free of secrets: it reaches logs, the
/// landing page and the status API.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct CollectError(pub String);

/// A source of samples.
pub trait Collector: Send + 'static {
    /// Short, stable name: the `collector` label and the landing page use it.
    fn name(&self) -> &str;

    /// Measures once. Must be cancel-safe: the scheduler drops the future at the timeout.
    fn collect(&mut self) -> impl Future<Output = Result<Families, CollectError>> + Send;
}

/// Publishes `autotuner_target_error{kind,target,reason}`: 1 for the reason the last collection
/// from the target failed, 0 for every other reason (all of them, so a rule or alert sees the
/// series go back to 0 rather than disappear).
pub fn target_error(out: &mut Families, kind: &str, target: &str, failed: Option<FailureReason>) {
    for reason in FAILURE_REASONS {
        out.gauge(
            "autotuner_target_error",
            "1 when the last collection from the target failed for this reason, else 0.",
            &[
                ("kind", kind),
                ("target", target),
                ("reason", reason.as_str()),
            ],
            if failed == Some(reason) { 1.0 } else { 0.0 },
        );
    }
}

/// The text of a panic payload, when it has one.
fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "no message".to_owned())
}

/// Milliseconds since the Unix epoch, now.
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// Runs `collector` on `schedule` until shutdown. The first run starts at once, so the process
/// is ready as soon as every collector has reported once.
pub fn spawn<C: Collector>(
    mut collector: C,
    schedule: Timing,
    registry: Arc<Registry>,
    mut shutdown: Shutdown,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        let name = collector.name().to_owned();
        let name = name.as_str();
        let mut ticker = tokio::time::interval(schedule.interval);
        // After a stall, run once and resume the rhythm; a burst of catch-up runs would only
        // measure the same moment several times.
        ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let mut failing = false;
        loop {
            tokio::select! {
                _ = shutdown.wait() => break,
                _ = ticker.tick() => {}
            }
            let started = Instant::now();
            // A panic inside a collector (a client library's, since ours cannot) must not end
            // the task: it is recorded as a failed run and the next run happens as usual.
            let run = AssertUnwindSafe(collector.collect()).catch_unwind();
            let result = tokio::select! {
                _ = shutdown.wait() => break,
                r = tokio::time::timeout(schedule.timeout, run) => r,
            };
            let duration = started.elapsed();
            let finished_ms = now_ms();
            let error = match result {
                Ok(Ok(Ok(families))) => {
                    registry.publish(name, families.into_vec(), finished_ms);
                    None
                }
                Ok(Ok(Err(err))) => Some(err.to_string()),
                Ok(Err(panic)) => Some(format!("collector panicked: {}", panic_message(&*panic))),
                Err(_) => Some(format!(
                    "timed out after {:.1}s",
                    schedule.timeout.as_secs_f64()
                )),
            };
            match (&error, failing) {
                (Some(err), false) => {
                    tracing::warn!(collector = name, error = %err, "collector failing");
                    // What it published before is no longer true: withdraw it, so the series go
                    // stale instead of repeating an old value as if it were current.
                    registry.publish(name, Vec::new(), finished_ms);
                }
                (Some(err), true) => {
                    tracing::debug!(collector = name, error = %err, "collector still failing");
                }
                (None, true) => tracing::info!(collector = name, "collector recovered"),
                (None, false) => {
                    tracing::debug!(
                        collector = name,
                        seconds = duration.as_secs_f64(),
                        "collected"
                    );
                }
            }
            failing = error.is_some();
            registry.record_attempt(
                name,
                &Attempt {
                    duration,
                    finished_ms,
                    error,
                },
            );
        }
        tracing::debug!(collector = name, "collector stopped");
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    /// Fails on odd runs, hangs on every third, succeeds otherwise: one collector exercising
    /// every path of the scheduler.
    struct Flaky {
        runs: Arc<AtomicUsize>,
    }

    impl Collector for Flaky {
        fn name(&self) -> &str {
            "flaky"
        }
        async fn collect(&mut self) -> Result<Families, CollectError> {
            let n = self.runs.fetch_add(1, Ordering::SeqCst);
            match n {
                1 => Err(CollectError("boom".into())),
                4 => panic!("a client library bug"),
                2 => {
                    tokio::time::sleep(Duration::from_secs(3600)).await;
                    Ok(Families::new())
                }
                _ => {
                    let mut f = Families::new();
                    f.gauge("flaky_value", "help", &[], n as f64);
                    Ok(f)
                }
            }
        }
    }

    /// A `Flaky` collector whose run counter starts at `first`, scheduled every 5 s with a 4 s
    /// timeout on a fresh registry.
    struct Rig {
        registry: Arc<Registry>,
        runs: Arc<AtomicUsize>,
        trigger: crate::shutdown::Trigger,
        handle: JoinHandle<()>,
    }

    fn rig(first: usize) -> Rig {
        let registry = Arc::new(Registry::new(Duration::from_secs(600)).unwrap());
        registry.expect_collectors(&["flaky"]);
        let runs = Arc::new(AtomicUsize::new(first));
        let (trigger, shutdown) = crate::shutdown::channel();
        let handle = spawn(
            Flaky { runs: runs.clone() },
            Timing {
                interval: Duration::from_secs(5),
                timeout: Duration::from_secs(4),
            },
            registry.clone(),
            shutdown,
        );
        Rig {
            registry,
            runs,
            trigger,
            handle,
        }
    }

    impl Rig {
        async fn stop(self) {
            self.trigger.trigger();
            self.handle.await.unwrap();
        }
    }

    #[tokio::test(start_paused = true)]
    async fn failures_and_timeouts_are_recorded_and_do_not_stop_the_schedule() {
        let r = rig(0);
        // Run 0 (ok), 1 (error), 2 (timeout), 3 (ok).
        tokio::time::sleep(Duration::from_millis(15_100)).await;
        assert_eq!(r.runs.load(Ordering::SeqCst), 4);
        let status = r.registry.collectors().pop().unwrap();
        assert!(status.up);
        assert_eq!(status.attempts, 4);
        assert_eq!(status.failures, 2);
        let text = r.registry.render();
        assert!(text.contains("flaky_value 3"), "{text}");
        assert!(text.contains("autotuner_collector_failures_total{collector=\"flaky\"} 2"));
        r.stop().await;
    }

    #[tokio::test(start_paused = true)]
    async fn a_panicking_run_is_a_failure_and_the_next_run_still_happens() {
        let r = rig(4);
        tokio::time::sleep(Duration::from_millis(5_100)).await;
        assert_eq!(
            r.runs.load(Ordering::SeqCst),
            6,
            "the task survived the panic"
        );
        let status = r.registry.collectors().pop().unwrap();
        assert_eq!(status.failures, 1);
        assert!(status.up, "run 5 succeeded");
        r.stop().await;
    }

    #[tokio::test(start_paused = true)]
    async fn a_failure_withdraws_the_previous_snapshot() {
        let r = rig(0);
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(r.registry.render().contains("flaky_value 0"));
        tokio::time::sleep(Duration::from_secs(5)).await;
        assert!(!r.registry.render().contains("flaky_value"));
        r.stop().await;
    }
}
