//! Shutdown: one token every long-running task holds, and the OS signals that trip it.
//!
//! Owns the meaning of signals: SIGTERM and SIGINT stop the process; SIGHUP asks for a reload
//! (delivered to whoever subscribes with `Signals::reloads`). Uses tokio only.
//!
//! Every task takes a `Shutdown` clone and `select!`s on `wait()`; the one `Trigger` trips them
//! all. The token is a `watch` channel, so a task that starts after the trip still sees it.

use tokio::sync::{broadcast, watch};

/// Tripped once, seen by every clone.
#[derive(Debug, Clone)]
pub struct Shutdown {
    rx: watch::Receiver<bool>,
}

impl Shutdown {
    /// Whether shutdown has been asked for.
    pub fn is_shutdown(&self) -> bool {
        *self.rx.borrow()
    }

    /// Resolves when shutdown is asked for (at once if it already was).
    pub async fn wait(&mut self) {
        // An error means every trigger was dropped: nobody can ask any more, so treat it as
        // "stop", the only safe reading.
        let _ = self.rx.wait_for(|stop| *stop).await;
    }
}

/// The one handle that trips the shutdown.
#[derive(Debug)]
pub struct Trigger {
    tx: watch::Sender<bool>,
}

impl Trigger {
    /// Asks every task to stop. Idempotent.
    pub fn trigger(&self) {
        self.tx.send_replace(true);
    }
}

/// A new shutdown token and its trigger.
pub fn channel() -> (Trigger, Shutdown) {
    let (tx, rx) = watch::channel(false);
    (Trigger { tx }, Shutdown { rx })
}

/// Why the process was asked to stop, for the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopReason {
    /// SIGTERM (service manager, `kill`).
    Terminate,
    /// SIGINT (Ctrl-C).
    Interrupt,
}

/// The process's signal handlers, installed once.
pub struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
    hup: tokio::signal::unix::Signal,
    reload_tx: broadcast::Sender<()>,
}

impl Signals {
    /// Installs handlers for SIGTERM, SIGINT and SIGHUP. SIGHUP's default action would kill the
    /// process, so it is caught even before anything subscribes to reloads.
    pub fn install() -> std::io::Result<Self> {
        use tokio::signal::unix::{SignalKind, signal};
        let (reload_tx, _) = broadcast::channel(4);
        Ok(Signals {
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
            hup: signal(SignalKind::hangup())?,
            reload_tx,
        })
    }

    /// A receiver of SIGHUP reload requests.
    pub fn reloads(&self) -> broadcast::Receiver<()> {
        self.reload_tx.subscribe()
    }

    /// Waits for the next stop signal, passing SIGHUPs on to reload subscribers meanwhile.
    pub async fn next_stop(&mut self) -> StopReason {
        loop {
            tokio::select! {
                _ = self.term.recv() => return StopReason::Terminate,
                _ = self.int.recv() => return StopReason::Interrupt,
                _ = self.hup.recv() => {
                    if self.reload_tx.send(()).is_err() {
                        tracing::info!("received SIGHUP; nothing is reloadable in this configuration");
                    } else {
                        tracing::info!("received SIGHUP; reloading");
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn every_clone_sees_the_trigger_even_late_ones() {
        let (trigger, shutdown) = channel();
        let mut early = shutdown.clone();
        assert!(!early.is_shutdown());
        trigger.trigger();
        early.wait().await;
        let mut late = shutdown.clone();
        late.wait().await;
        assert!(late.is_shutdown());
    }
}
