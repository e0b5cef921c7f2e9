//! `watch: true`: restart when the config file, or a certificate or key it
//! names, changes.
//!
//! The parent directories are watched, not the files: an atomic rename, a
//! certbot `live/` symlink update or a Kubernetes `..data` symlink swap
//! replaces the file, and a watch on the old inode would never fire again.
//! Events are debounced (a certificate and its key are often written a moment
//! apart), and a restart is asked for only when the content of the watched
//! files differs from what this generation loaded.

use std::collections::BTreeSet;
use std::hash::{Hash, Hasher};
use std::path::PathBuf;
use std::time::Duration;

use notify::RecursiveMode;
use notify_debouncer_full::{new_debouncer, DebounceEventResult, Debouncer, RecommendedCache};
use tokio::sync::mpsc;
use tracing::{debug, info, warn};

/// How long events must stop before they are acted on.
const DEBOUNCE: Duration = Duration::from_millis(300);

pub struct Watch {
    _debouncer: Debouncer<notify::RecommendedWatcher, RecommendedCache>,
    events: mpsc::UnboundedReceiver<()>,
    files: Vec<PathBuf>,
    /// The content this generation loaded.
    loaded: u64,
}

/// A hash of the files' contents (a missing file hashes as missing).
pub fn fingerprint(files: &[PathBuf]) -> u64 {
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

impl Watch {
    /// Watches the directories of `files`; `loaded` is the fingerprint of
    /// what this generation runs with.
    pub fn start(files: Vec<PathBuf>, loaded: u64) -> Result<Watch, String> {
        let (tx, events) = mpsc::unbounded_channel();
        let mut debouncer =
            new_debouncer(DEBOUNCE, None, move |res: DebounceEventResult| match res {
                Ok(events) if !events.is_empty() => {
                    let _ = tx.send(());
                }
                Ok(_) => {}
                Err(errors) => {
                    for e in errors {
                        warn!("watch: {e}");
                    }
                }
            })
            .map_err(|e| format!("watch: {e}"))?;
        let dirs: BTreeSet<PathBuf> = files
            .iter()
            .filter_map(|f| f.parent().map(|d| d.to_path_buf()))
            .collect();
        for d in &dirs {
            debouncer
                .watch(d, RecursiveMode::NonRecursive)
                .map_err(|e| format!("watch {}: {e}", d.display()))?;
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
        })
    }

    /// Resolves when the watched files' content differs from what this
    /// generation loaded.
    pub async fn changed(&mut self) {
        loop {
            if self.events.recv().await.is_none() {
                // The watcher thread is gone: never resolve.
                std::future::pending::<()>().await;
            }
            while self.events.try_recv().is_ok() {}
            if fingerprint(&self.files) != self.loaded {
                return;
            }
            info!("watched files changed but their content did not: no restart");
            debug!(files = ?self.files, "unchanged");
        }
    }
}
