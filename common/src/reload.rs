//! Configuration loaded from files and reloaded when they change: TLS
//! certificates ([`crate::tls`]) and token files ([`crate::auth`]).
//!
//! Kubernetes updates a mounted Secret by swapping a symlink, and
//! cert-manager rotates certificates in place, so a change is detected by
//! comparing the files' bytes, re-read every few seconds: no inotify, no
//! missed swaps. A change that does not load (a half-written file, a key
//! that does not match its certificate) is logged and the previous value
//! stays in use until the files change again.

use std::{path::PathBuf, sync::Arc, time::Duration};

use arc_swap::ArcSwap;

/// How often watched files are checked for changes.
pub const RELOAD_INTERVAL: Duration = Duration::from_secs(2);

type Loader<T, E> = Box<dyn Fn() -> Result<T, E> + Send + Sync>;

/// A value built from files by a loader, rebuilt when their bytes change.
pub struct Reloading<T, E> {
    /// What the value is, for logs ("TLS certificate", "auth tokens").
    what: &'static str,
    files: Vec<PathBuf>,
    load: Loader<T, E>,
    current: ArcSwap<T>,
    loaded: parking_lot::Mutex<Vec<Option<Vec<u8>>>>,
}

impl<T, E> std::fmt::Debug for Reloading<T, E> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reloading")
            .field("what", &self.what)
            .field("files", &self.files)
            .finish_non_exhaustive()
    }
}

fn contents(files: &[PathBuf]) -> Vec<Option<Vec<u8>>> {
    files.iter().map(|p| std::fs::read(p).ok()).collect()
}

impl<T: Send + Sync + 'static, E: std::fmt::Display> Reloading<T, E> {
    /// Loads the value now; fails if it does not load (a server must not
    /// start without the security it was asked for).
    pub fn new(
        what: &'static str,
        files: Vec<PathBuf>,
        load: impl Fn() -> Result<T, E> + Send + Sync + 'static,
    ) -> Result<Arc<Self>, E> {
        let loaded = contents(&files);
        let value = load()?;
        Ok(Arc::new(Self {
            what,
            files,
            load: Box::new(load),
            current: ArcSwap::from_pointee(value),
            loaded: parking_lot::Mutex::new(loaded),
        }))
    }

    /// The value in use.
    pub fn current(&self) -> Arc<T> {
        self.current.load_full()
    }

    /// Borrows the value in use (cheaper than [`Reloading::current`]).
    pub fn with<R>(&self, f: impl FnOnce(&T) -> R) -> R {
        f(&self.current.load())
    }

    /// Rebuilds the value if the files' bytes changed; true if a new value
    /// is now in use.
    pub fn reload_if_changed(&self) -> bool {
        let now = contents(&self.files);
        let mut loaded = self.loaded.lock();
        if *loaded == now {
            return false;
        }
        *loaded = now;
        match (self.load)() {
            Ok(value) => {
                self.current.store(Arc::new(value));
                tracing::info!(files = ?self.files, "{} reloaded", self.what);
                true
            }
            Err(e) => {
                tracing::warn!(error = %e, "{} files changed but do not load; keeping the previous one", self.what);
                false
            }
        }
    }

    /// Checks the files every `every` until the task is dropped.
    pub async fn watch(self: Arc<Self>, every: Duration) {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            self.reload_if_changed();
        }
    }
}
