//! `watch: true`: restart when the config file, or a certificate or key it
//! names, changes.
//!
//! The parent directories are watched, not the files: an atomic rename, a
//! certbot `live/` symlink update or a Kubernetes `..data` symlink swap
//! replaces the file, and a watch on the old inode would never fire again.
//! Events are debounced (a certificate and its key are often written a moment
//! apart), and a restart is asked for only when the content of the watched
//! files differs from what this generation loaded.
//!
//! Only events that can change content count: a create, a write, a rename,
//! a removal or an attribute change, of a watched name (or of a name a
//! watched symlink passes through, as Kubernetes' `..data`). Opening and
//! reading do not: inotify reports them too, and the watcher's own
//! fingerprinting, validation and the new process loading the files would
//! otherwise trigger the watcher again, forever. Files written next to the
//! config (a log, a pid file) are other names. Content whose restart failed
//! is not tried again: the next change is.

use std::collections::BTreeSet;
use std::ffi::OsString;
use std::hash::{Hash, Hasher};
use std::path::PathBuf;
use std::time::Duration;

use notify::RecursiveMode;
use notify_debouncer_full::{new_debouncer, DebounceEventResult, Debouncer, RecommendedCache};
use tokio::sync::mpsc;
use tracing::{debug, info, warn};

/// How long events must stop before they are acted on.
const DEBOUNCE: Duration = Duration::from_millis(300);

pub(crate) struct Watch {
    _debouncer: Debouncer<notify::RecommendedWatcher, RecommendedCache>,
    events: mpsc::UnboundedReceiver<()>,
    files: Vec<PathBuf>,
    /// The content this generation loaded.
    loaded: u64,
    /// The content a restart was last asked for: not asked for again.
    tried: Option<u64>,
}

/// The names in the watched directories whose change can change what the
/// watched files hold: the files' own names, and the names their symlinks
/// go through within those directories (`tls.crt -> ..data/tls.crt`).
fn relevant_names(files: &[PathBuf]) -> BTreeSet<OsString> {
    let mut names = BTreeSet::new();
    for f in files {
        if let Some(n) = f.file_name() {
            names.insert(n.to_owned());
        }
        let mut link = f.clone();
        for _ in 0..8 {
            let Ok(target) = std::fs::read_link(&link) else {
                break;
            };
            if let Some(first) = target.components().next() {
                if target.is_relative() {
                    names.insert(first.as_os_str().to_owned());
                }
            }
            link = link.parent().map(|d| d.join(&target)).unwrap_or(target);
        }
    }
    names
}

/// Can this event change a watched file's content?
fn matters(event: &notify::Event, names: &BTreeSet<OsString>) -> bool {
    use notify::event::{AccessKind, EventKind};
    let kind_counts = match event.kind {
        // Opening and reading, and closing after a read, change nothing;
        // closing after a write does.
        EventKind::Access(AccessKind::Close(notify::event::AccessMode::Write)) => true,
        EventKind::Access(_) => false,
        // A rescan after an overflow: look at the content.
        EventKind::Any | EventKind::Other => true,
        EventKind::Create(_) | EventKind::Modify(_) | EventKind::Remove(_) => true,
    };
    kind_counts
        && event.paths.iter().any(|p| {
            p.file_name()
                .is_some_and(|n| names.contains(n) || n.to_string_lossy().starts_with(".."))
        })
}

/// A hash of the files' contents (a missing file hashes as missing).
pub(crate) fn fingerprint(files: &[PathBuf]) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    for f in files {
        f.hash(&mut h);
        match std::fs::read(f) {
            Ok(bytes) => bytes.hash(&mut h),
            Err(e) => e.kind().to_string().hash(&mut h),
        }
    }
    h.finish()
}

/// Why files cannot be watched.
#[derive(Debug, thiserror::Error)]
pub(crate) enum WatchError {
    #[error("watch: {0}")]
    Start(#[source] notify::Error),
    #[error("watch {}: {source}", dir.display())]
    Dir {
        dir: PathBuf,
        #[source]
        source: notify::Error,
    },
}

impl Watch {
    /// Watches the directories of `files`; `loaded` is the fingerprint of
    /// what this generation runs with.
    pub(crate) fn start(files: Vec<PathBuf>, loaded: u64) -> Result<Watch, WatchError> {
        let (tx, events) = mpsc::unbounded_channel();
        let names = relevant_names(&files);
        // The debouncer's thread logs too: with this process's pid and generation.
        let span = tracing::Span::current();
        let mut debouncer = new_debouncer(DEBOUNCE, None, move |res: DebounceEventResult| {
            let _enter = span.enter();
            match res {
                Ok(events) => {
                    if events.iter().any(|e| matters(e, &names)) {
                        let _ = tx.send(());
                    }
                }
                Err(errors) => {
                    for e in errors {
                        warn!("watch: {e}");
                    }
                }
            }
        })
        .map_err(WatchError::Start)?;
        let dirs: BTreeSet<PathBuf> = files
            .iter()
            .filter_map(|f| f.parent().map(|d| d.to_path_buf()))
            .collect();
        for d in &dirs {
            debouncer
                .watch(d, RecursiveMode::NonRecursive)
                .map_err(|source| WatchError::Dir {
                    dir: d.clone(),
                    source,
                })?;
        }
        info!(
            dirs = dirs.len(),
            files = files.len(),
            "watching the config, certificates and keys"
        );
        Ok(Watch {
            _debouncer: debouncer,
            events,
            files,
            loaded,
            tried: None,
        })
    }

    /// Resolves when the watched files' content differs from what this
    /// generation loaded, and from what a restart was last asked for.
    pub(crate) async fn changed(&mut self) {
        loop {
            if self.events.recv().await.is_none() {
                // The watcher thread is gone: never resolve.
                std::future::pending::<()>().await;
            }
            while self.events.try_recv().is_ok() {}
            let now = fingerprint(&self.files);
            if now == self.loaded {
                info!("watched files changed but their content did not: no restart");
                debug!(files = ?self.files, "unchanged");
            } else if Some(now) == self.tried {
                debug!("watched files unchanged since the restart that failed: no restart");
            } else {
                self.tried = Some(now);
                return;
            }
        }
    }
}
