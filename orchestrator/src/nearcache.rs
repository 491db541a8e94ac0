//! Hot-key relief: a small near cache in the orchestrator that answers
//! reads of hot keys for a short time (`--hot-key-ttl`, 250 ms by
//! default), so one key's reads stop landing on one node. Only keys the
//! sketch ([`crate::hotkeys`]) found hot in its last window are cached,
//! within `--hot-key-cache-bytes`.
//!
//! The cache itself is the `ringcache-nearcache` crate, which the clients'
//! near caches use too. Writes through this orchestrator void a key when
//! they are answered; writes through other orchestrators reach it through
//! the nodes' change feeds (this impl of [`crate::feeds::ChangeSink`]).

pub use ringcache_nearcache::*;

/// The nodes' change feeds void answers of keys that changed anywhere.
impl crate::feeds::ChangeSink for NearCache {
    fn changed(&self, key: &str) {
        self.invalidate(key);
    }

    fn all_changed(&self) {
        self.invalidate_all();
    }
}
