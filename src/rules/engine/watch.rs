//! The rules directory watcher: turns file changes into reload requests for the engine's run
//! loop.
//!
//! Uses `compile::is_rule_file`; knows nothing else of the engine.

use std::path::Path;
use std::time::Duration;

use tokio::sync::mpsc;

use crate::rules::compile;

/// Whether an event changes what a rule file says: created, written, removed or renamed (or its
/// permissions changed, which can make it readable). Opening, reading and closing a file are
/// not changes: the engine's own reads during a reload produce those, and reacting to them
/// reloaded a broken file about nine times a second, forever. Nor is an access-time update.
fn is_change(kind: &notify::EventKind) -> bool {
    use notify::EventKind;
    use notify::event::{MetadataKind, ModifyKind};
    match kind {
        EventKind::Create(_) | EventKind::Remove(_) => true,
        EventKind::Modify(ModifyKind::Metadata(MetadataKind::AccessTime)) => false,
        EventKind::Modify(_) => true,
        EventKind::Access(_) | EventKind::Any | EventKind::Other => false,
    }
}

/// Watches `dir` for changes to rule files (editors save by rename, so the directory is
/// watched, not the files) and sends a reload request about 100 ms after the last change. Returns
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
                Ok(events) => events.iter().any(|e| {
                    is_change(&e.kind) && e.paths.iter().any(|p| compile::is_rule_file(p))
                }),
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

#[cfg(test)]
mod tests {
    use super::*;
    use notify::EventKind;
    use notify::event::{
        AccessKind, AccessMode, CreateKind, DataChange, MetadataKind, ModifyKind, RemoveKind,
        RenameMode,
    };

    #[test]
    fn changes_count_and_reads_do_not() {
        for (kind, change) in [
            (EventKind::Create(CreateKind::File), true),
            (EventKind::Modify(ModifyKind::Data(DataChange::Any)), true),
            (EventKind::Modify(ModifyKind::Name(RenameMode::To)), true),
            (EventKind::Modify(ModifyKind::Name(RenameMode::From)), true),
            (EventKind::Remove(RemoveKind::File), true),
            (
                EventKind::Modify(ModifyKind::Metadata(MetadataKind::Permissions)),
                true,
            ),
            (
                EventKind::Modify(ModifyKind::Metadata(MetadataKind::AccessTime)),
                false,
            ),
            (EventKind::Access(AccessKind::Open(AccessMode::Read)), false),
            (
                EventKind::Access(AccessKind::Close(AccessMode::Read)),
                false,
            ),
            (EventKind::Access(AccessKind::Read), false),
        ] {
            assert_eq!(is_change(&kind), change, "{kind:?}");
        }
    }
}
