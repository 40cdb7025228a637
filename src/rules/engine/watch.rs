//! The rules directory watcher: turns file changes into reload requests for the engine's run
//! loop.
//!
//! Uses `compile::is_rule_file`; knows nothing else of the engine.

use std::path::Path;
use std::time::Duration;

use tokio::sync::mpsc;

use crate::rules::compile;

/// Watches `dir` for changes to rule files (editors save by rename, so the directory is
/// watched, not the files) and sends a reload request 250 ms after the last change. Returns
/// the watcher, which must be kept alive.
pub fn watch(
    dir: &Path,
    reloads: mpsc::Sender<()>,
) -> Result<
    notify_debouncer_full::Debouncer<
        notify::RecommendedWatcher,
        notify_debouncer_full::RecommendedCache,
    >,
    notify::Error,
> {
    // An editor's save is a burst of events a few milliseconds long (write a temporary file,
    // rename it over the old one); 100 ms covers it and keeps a saved rule active within about
    // 150 ms (the debouncer looks every quarter of the timeout).
    let mut debouncer = notify_debouncer_full::new_debouncer(
        Duration::from_millis(100),
        None,
        move |result: notify_debouncer_full::DebounceEventResult| {
            let relevant = match &result {
                Ok(events) => events
                    .iter()
                    .any(|e| e.paths.iter().any(|p| compile::is_rule_file(p))),
                Err(_) => true,
            };
            if relevant {
                // A reload already queued covers this change too.
                let _ = reloads.try_send(());
            }
        },
    )?;
    debouncer.watch(dir, notify::RecursiveMode::NonRecursive)?;
    Ok(debouncer)
}
