//! The node's storage: a fixed number of shards, each a byte-weighted
//! `quick_cache` with TTLs and per-key versions. No gRPC in here.
//!
//! # Memory
//!
//! Every entry is weighed as `key bytes + value bytes + ENTRY_OVERHEAD`
//! (plus `EXPIRY_OVERHEAD` when it has a TTL, for its slot in the expiry
//! index). Each shard holds at most `capacity / shards` of that weight, and
//! quick_cache evicts (CLOCK-Pro-like, scan resistant) to stay within it, so
//! the accounted total never exceeds the configured capacity. The overhead
//! constants were measured (see `BENCHMARKS.md`), so the accounted bytes
//! track the real heap use of the entries.
//!
//! Values are copied into an allocation of their own on write. A value
//! decoded from a request is a slice of the request's buffer; keeping that
//! slice would keep the whole buffer (for a `SetMany`, every other entry's
//! bytes too) alive, invisibly to the accounting.
//!
//! # Expiry
//!
//! quick_cache has no TTLs. An entry carries its deadline; a read treats an
//! expired entry as absent. Each shard also keeps an exact index of
//! deadlines (`(deadline, version) → key`), kept in step on overwrite,
//! delete and eviction, so [`Store::reclaim_expired`] (run by a background
//! task) frees expired entries in deadline order without scanning the
//! cache, and the index never holds more than the live entries with TTLs.
//!
//! # Versions and atomicity
//!
//! A shard's writes happen under its write lock, so a conditional write
//! (`if_absent`, `if_version`) checks and writes atomically. Versions come
//! from a per-shard hybrid clock: `max(previous + 1, wall clock in µs)`.
//! Every write of a key therefore gets a larger version than the key ever had
//! (the key always lives in the same shard), and versions keep growing across
//! a node restart, so a client holding a version from before the restart
//! cannot have its compare-and-set match a different value by accident.
//!
//! Reads take the shard's read lock only, so they run in parallel.

use std::{
    collections::BTreeMap,
    hash::BuildHasher,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering::Relaxed},
    },
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use bytes::Bytes;
use compact_str::CompactString;
use parking_lot::RwLock;
use quick_cache::{DefaultHashBuilder, Lifecycle, OptionsBuilder, Weighter, unsync};

use crate::changes::{ChangeKind, ChangeLog};

/// Bytes accounted to every entry beyond its key and value: the cache's
/// slot and bookkeeping (with the key inline when it is short), the
/// `Entry` itself, and the value allocation's header and rounding.
/// Measured at 96–98 bytes (`examples/memory_overhead.rs`); the rest is
/// slack for the hash table and slot array growing by doubling.
pub const ENTRY_OVERHEAD: u64 = 112;

/// Extra bytes accounted to an entry with a TTL: its node in the expiry
/// index (measured: 80 bytes).
pub const EXPIRY_OVERHEAD: u64 = 80;

/// Keys longer than this are stored in an allocation of their own rather
/// than inline.
const INLINE_KEY_MAX: usize = 24;

/// Extra bytes for a key too long to be inline: its allocation's header and
/// rounding.
const KEY_ALLOCATION_OVERHEAD: u64 = 32;

/// The share of a shard's capacity quick_cache keeps for its "hot"
/// entries, set explicitly because it is also the heaviest entry it admits:
/// an entry heavier than this share is refused (dropped at once).
const HOT_ALLOCATION: f64 = 0.97;

/// The heaviest entry a shard of `shard_capacity` bytes admits.
pub fn max_entry_weight(shard_capacity: u64) -> u64 {
    ((shard_capacity as f64 * HOT_ALLOCATION) as u64).clamp(shard_capacity.min(1), shard_capacity)
}

/// The most shards a store may have.
pub const MAX_SHARDS: usize = 4096;

/// Reclamation removes at most this many expired entries per lock hold, so
/// a burst of expiries never blocks a shard's readers for long.
const RECLAIM_BATCH: usize = 256;

/// A store's shape.
#[derive(Debug, Clone, Copy)]
pub struct StoreConfig {
    /// The most bytes the store accounts to entries, over all shards.
    pub capacity: u64,
    /// How many shards, each with its own lock and `capacity / shards`
    /// bytes.
    pub shards: usize,
}

/// Why a store cannot be built.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    /// The shard count is outside `1..=MAX_SHARDS`.
    #[error("--shards must be between 1 and {MAX_SHARDS}, got {0}")]
    Shards(usize),
    /// A shard's share of the capacity is too small to be useful.
    #[error(
        "--capacity {capacity} over {shards} shards leaves {per_shard} bytes per shard; at least {min} bytes per shard are needed"
    )]
    TooSmall {
        /// The configured capacity.
        capacity: u64,
        /// The configured shard count.
        shards: usize,
        /// What each shard would get.
        per_shard: u64,
        /// The minimum per shard.
        min: u64,
    },
}

/// Why a write was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum StoreError {
    /// The entry weighs more than one shard admits.
    #[error(
        "entry of {weight} bytes (key + value + per-entry overhead) exceeds the {max_weight} bytes one entry may take (97% of a shard: --capacity / --shards)"
    )]
    EntryTooLarge {
        /// The entry's accounted weight.
        weight: u64,
        /// The heaviest entry a shard admits.
        max_weight: u64,
    },
    /// An increment found a value that is not a decimal 64-bit integer.
    #[error("the value of {key:?} is not a decimal 64-bit integer, so it cannot be incremented")]
    NotAnInteger {
        /// The key.
        key: String,
    },
    /// The store is frozen: the node handed its entries over and stops.
    #[error("the node is stopping: its entries were handed over and it takes no more writes")]
    Frozen,
    /// An increment would leave the 64-bit range.
    #[error("incrementing {key:?} ({value}) by {delta} would overflow a 64-bit integer")]
    Overflow {
        /// The key.
        key: String,
        /// Its current value.
        value: i64,
        /// The delta asked for.
        delta: i64,
    },
}

/// What [`Store::increment`] left in the key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Incremented {
    /// The new value.
    pub value: i64,
    /// The key's new version.
    pub version: u64,
    /// Time left to live; `None` = no expiry.
    pub ttl: Option<Duration>,
}

pub use ringcache_common::validate::WriteCondition as Condition;

/// A live value read from the store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Found {
    /// The stored bytes (a cheap reference-counted handle).
    pub value: Bytes,
    /// The key's version.
    pub version: u64,
    /// Time left to live; `None` if the entry does not expire.
    pub ttl: Option<Duration>,
}

/// The outcome of a write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SetOutcome {
    /// Whether the value was written.
    pub stored: bool,
    /// The new version if stored, else the current one (0 if absent).
    pub version: u64,
}

/// The counters of one shard, or of the whole store.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ShardStats {
    /// Entries held, including expired ones not yet reclaimed.
    pub items: u64,
    /// Accounted bytes held.
    pub bytes_used: u64,
    /// Accounted bytes the shard may hold.
    pub capacity_bytes: u64,
    /// Reads that found a live value.
    pub hits: u64,
    /// Reads that found nothing live.
    pub misses: u64,
    /// Entries removed to make room.
    pub evictions: u64,
    /// Entries removed because their TTL ran out.
    pub expirations: u64,
    /// Live entries replaced by a newer write of their key.
    pub overwrites: u64,
    /// Live entries removed by a delete.
    pub deletes: u64,
}

impl ShardStats {
    fn add(&mut self, other: &ShardStats) {
        self.items += other.items;
        self.bytes_used += other.bytes_used;
        self.capacity_bytes += other.capacity_bytes;
        self.hits += other.hits;
        self.misses += other.misses;
        self.evictions += other.evictions;
        self.expirations += other.expirations;
        self.overwrites += other.overwrites;
        self.deletes += other.deletes;
    }
}

/// What [`Store::delete_if`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeleteOutcome {
    /// A live value was removed.
    pub deleted: bool,
    /// When not removed: the key's current version (0 if absent).
    pub version: u64,
}

/// One page of [`Store::scan`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScanPage {
    /// Live keys.
    pub keys: Vec<String>,
    /// The cursor (shard, position) of the next page; `None` when done.
    pub next: Option<(usize, u64)>,
}

/// The time source for deadlines: milliseconds since the store started.
///
/// Tests use [`Clock::manual`] to move time by hand instead of sleeping.
#[derive(Debug, Clone)]
pub enum Clock {
    /// The monotonic system clock.
    System(Instant),
    /// A clock that moves only when told to.
    Manual(Arc<AtomicU64>),
}

impl Clock {
    /// The monotonic system clock, starting now.
    pub fn system() -> Self {
        Clock::System(Instant::now())
    }

    /// A manual clock at 0 ms, and the handle that moves it.
    pub fn manual() -> (Self, Arc<AtomicU64>) {
        let t = Arc::new(AtomicU64::new(0));
        (Clock::Manual(t.clone()), t)
    }

    fn now_ms(&self) -> u64 {
        match self {
            Clock::System(start) => u64::try_from(start.elapsed().as_millis()).unwrap_or(u64::MAX),
            Clock::Manual(t) => t.load(Relaxed),
        }
    }
}

/// A stored key. Keys of up to 24 bytes live inline, in the cache's own
/// slot: no separate allocation, and no extra cache miss to compare them.
type Key = CompactString;

/// One stored value.
#[derive(Debug, Clone)]
struct Entry {
    /// The bytes, with their reference count in the same allocation: a
    /// read bumps the count on the cache line where the value starts, which
    /// the response encoder reads next anyway. (A `Bytes` would keep its
    /// count in a separate header allocated on first share: one more cache
    /// miss per read and 32 more bytes per entry.)
    value: Arc<[u8]>,
    version: u64,
    /// Deadline in clock milliseconds; 0 = never expires.
    expires_at: u64,
}

impl Entry {
    #[inline]
    fn is_live(&self, now: impl FnOnce() -> u64) -> bool {
        self.expires_at == 0 || now() < self.expires_at
    }
}

fn weigh(key_len: usize, value_len: usize, expires: bool) -> u64 {
    let key_len = key_len as u64;
    // A long key has its own allocation, and the expiry index holds a
    // second copy of it.
    let long_key = key_len > INLINE_KEY_MAX as u64;
    let key_heap = if long_key { KEY_ALLOCATION_OVERHEAD } else { 0 };
    let expiry = if !expires {
        0
    } else if long_key {
        EXPIRY_OVERHEAD + key_len + KEY_ALLOCATION_OVERHEAD
    } else {
        EXPIRY_OVERHEAD
    };
    key_len + key_heap + value_len as u64 + ENTRY_OVERHEAD + expiry
}

#[derive(Debug, Clone, Copy)]
struct EntryWeighter;

impl Weighter<Key, Entry> for EntryWeighter {
    #[inline]
    fn weight(&self, key: &Key, val: &Entry) -> u64 {
        weigh(key.len(), val.value.len(), val.expires_at != 0)
    }
}

/// Collects what quick_cache evicts during one write, so the expiry index
/// and counters can be updated under the same lock, and the values freed
/// after it is released.
#[derive(Debug, Clone, Copy)]
struct EvictionLog;

impl Lifecycle<Key, Entry> for EvictionLog {
    type RequestState = Vec<(Key, Entry)>;

    #[inline]
    fn on_evict(&self, state: &mut Self::RequestState, key: Key, val: Entry) {
        state.push((key, val));
    }
}

type ShardCache = unsync::Cache<Key, Entry, EntryWeighter, DefaultHashBuilder, EvictionLog>;

/// What a shard's lock protects.
#[derive(Debug)]
struct ShardInner {
    cache: ShardCache,
    /// `(deadline, version) → key` for every entry with a TTL. Versions are
    /// unique within a shard, so the pair is a unique key.
    expiry: BTreeMap<(u64, u64), Key>,
    /// The last version handed out by this shard.
    last_version: u64,
}

impl ShardInner {
    fn next_version(&mut self) -> u64 {
        let wall = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX));
        // Copies carry at most MAX_VERSION (checked on the way in), so this
        // never reaches u64::MAX; saturating keeps it from wrapping anyway.
        self.last_version = wall.max(self.last_version.saturating_add(1));
        self.last_version
    }

    fn unindex(&mut self, entry: &Entry) {
        if entry.expires_at != 0 {
            self.expiry.remove(&(entry.expires_at, entry.version));
        }
    }
}

/// One write, as [`Store::write_locked`] applies it.
struct Write<'a> {
    /// The key, borrowed (for comparisons).
    key: &'a str,
    /// The key as stored (allocated before the lock was taken).
    owned_key: Key,
    value: Arc<[u8]>,
    /// Time to live in milliseconds; `None` = no expiry.
    ttl_ms: Option<u64>,
    condition: Condition,
    /// The clock, read under the lock.
    now: u64,
    /// What the change is published as.
    kind: ChangeKind,
}

/// A TTL in whole milliseconds, at least 1 (callers validate that TTLs are
/// positive); `None` = no expiry.
fn ttl_millis(ttl: Option<Duration>) -> Option<u64> {
    ttl.map(|t| u64::try_from(t.as_millis()).unwrap_or(u64::MAX).max(1))
}

/// An empty cache for one shard of `shard_capacity` bytes.
fn new_shard_cache(shard_capacity: u64) -> ShardCache {
    // Unwrap-free: these options are valid by construction (a positive
    // capacity and allocations in 0..=1), but map any error to the default
    // shape rather than panicking.
    let options = OptionsBuilder::new()
        .weight_capacity(shard_capacity)
        .hot_allocation(HOT_ALLOCATION)
        // Only sizes the ghost list (recently evicted keys); small entries
        // are the common case in a cache.
        .estimated_items_capacity((shard_capacity / 256).max(16) as usize)
        .build();
    match options {
        Ok(options) => ShardCache::with_options(
            options,
            EntryWeighter,
            DefaultHashBuilder::default(),
            EvictionLog,
        ),
        Err(_) => ShardCache::with(
            (shard_capacity / 256).max(16) as usize,
            shard_capacity,
            EntryWeighter,
            DefaultHashBuilder::default(),
            EvictionLog,
        ),
    }
}

/// One shard. Aligned to its own cache lines so that the lock and counters
/// of neighbouring shards do not share them (false sharing between cores).
#[derive(Debug)]
#[repr(align(128))]
struct Shard {
    inner: RwLock<ShardInner>,
    hits: AtomicU64,
    misses: AtomicU64,
    evictions: AtomicU64,
    expirations: AtomicU64,
    overwrites: AtomicU64,
    deletes: AtomicU64,
}

/// The sharded store. Cheap to share: wrap it in an `Arc`.
#[derive(Debug)]
pub struct Store {
    shards: Box<[Shard]>,
    /// Picks a key's shard. Seeded differently from quick_cache's own hasher
    /// so the keys of one shard still spread over its hash table.
    shard_hasher: foldhash::fast::FixedState,
    shard_capacity: u64,
    clock: Clock,
    /// Where every change is published ([`crate::changes`]); `None`: off.
    changes: Option<Arc<ChangeLog>>,
    /// Set once by [`Store::freeze`]: every write is refused from then on.
    frozen: std::sync::atomic::AtomicBool,
}

impl Store {
    /// Builds an empty store on the system clock.
    pub fn new(config: StoreConfig) -> Result<Self, ConfigError> {
        Self::with_clock(config, Clock::system())
    }

    /// Builds an empty store on `clock`.
    pub fn with_clock(config: StoreConfig, clock: Clock) -> Result<Self, ConfigError> {
        let StoreConfig { capacity, shards } = config;
        if shards == 0 || shards > MAX_SHARDS {
            return Err(ConfigError::Shards(shards));
        }
        let shard_capacity = capacity / shards as u64;
        let min = 16 * (ENTRY_OVERHEAD + EXPIRY_OVERHEAD);
        if shard_capacity < min {
            return Err(ConfigError::TooSmall {
                capacity,
                shards,
                per_shard: shard_capacity,
                min,
            });
        }
        let shards = (0..shards)
            .map(|_| {
                let cache = new_shard_cache(shard_capacity);
                Shard {
                    inner: RwLock::new(ShardInner {
                        cache,
                        expiry: BTreeMap::new(),
                        last_version: 0,
                    }),
                    hits: AtomicU64::new(0),
                    misses: AtomicU64::new(0),
                    evictions: AtomicU64::new(0),
                    expirations: AtomicU64::new(0),
                    overwrites: AtomicU64::new(0),
                    deletes: AtomicU64::new(0),
                }
            })
            .collect();
        Ok(Self {
            shards,
            shard_hasher: foldhash::fast::FixedState::with_seed(0x7269_6e67_6361_6368),
            shard_capacity,
            clock,
            changes: None,
            frozen: std::sync::atomic::AtomicBool::new(false),
        })
    }

    /// Refuses every write from now on ([`StoreError::Frozen`]), and
    /// returns once no write is running: a write checks under its shard's
    /// lock, and this takes every shard's lock after setting the flag, so
    /// a write that passed the check has finished by then. What a reader
    /// sees afterwards is final (a stopping node hands it over).
    pub fn freeze(&self) {
        self.frozen.store(true, std::sync::atomic::Ordering::SeqCst);
        for shard in &*self.shards {
            drop(shard.inner.write());
        }
    }

    /// Whether writes are refused, checked under a shard's lock (which
    /// orders it after [`Store::freeze`]'s barrier).
    fn is_frozen(&self) -> bool {
        self.frozen.load(Relaxed)
    }

    /// Publishes every change to `log`: each write, delete, increment,
    /// touch, copy and flush is appended under the key's shard lock, so
    /// the log has each key's changes in the order they were applied.
    pub fn with_change_log(mut self, log: Arc<ChangeLog>) -> Self {
        self.changes = Some(log);
        self
    }

    /// The change log, if changes are published.
    pub fn change_log(&self) -> Option<&Arc<ChangeLog>> {
        self.changes.as_ref()
    }

    /// The number of shards.
    pub fn shard_count(&self) -> usize {
        self.shards.len()
    }

    /// The capacity of one shard.
    pub fn shard_capacity(&self) -> u64 {
        self.shard_capacity
    }

    /// The heaviest entry the store admits.
    pub fn max_entry_weight(&self) -> u64 {
        max_entry_weight(self.shard_capacity)
    }

    /// The weight a store would account to an entry of this size.
    pub fn entry_weight(key_len: usize, value_len: usize, has_ttl: bool) -> u64 {
        weigh(key_len, value_len, has_ttl)
    }

    /// The index of the shard that holds `key`.
    pub fn shard_of(&self, key: &str) -> usize {
        (self.shard_hasher.hash_one(key) % self.shards.len() as u64) as usize
    }

    fn shard(&self, key: &str) -> &Shard {
        &self.shards[self.shard_of(key)]
    }

    /// Reads `key`; `None` if absent or expired.
    pub fn get(&self, key: &str) -> Option<Found> {
        let found = self.lookup(key);
        let shard = self.shard(key);
        let counter = if found.is_some() {
            &shard.hits
        } else {
            &shard.misses
        };
        counter.fetch_add(1, Relaxed);
        found
    }

    /// Reads `key` without counting a hit or a miss: the read half of an
    /// increment or a touch, which are writes.
    fn lookup(&self, key: &str) -> Option<Found> {
        let shard = self.shard(key);
        {
            let inner = shard.inner.read();
            match inner.cache.get(key) {
                Some(entry) => {
                    let mut now = 0;
                    if entry.is_live(|| {
                        now = self.clock.now_ms();
                        now
                    }) {
                        Some(Found {
                            value: Bytes::from_owner(entry.value.clone()),
                            version: entry.version,
                            ttl: (entry.expires_at != 0)
                                .then(|| Duration::from_millis(entry.expires_at - now)),
                        })
                    } else {
                        None
                    }
                }
                None => None,
            }
        }
    }

    /// Writes `value` under `key` if `condition` holds. A `ttl` of `None`
    /// means no expiry; a zero `ttl` is treated as one millisecond (callers
    /// validate that TTLs are positive).
    pub fn set(
        &self,
        key: &str,
        value: &[u8],
        ttl: Option<Duration>,
        condition: Condition,
    ) -> Result<SetOutcome, StoreError> {
        let weight = weigh(key.len(), value.len(), ttl.is_some());
        let max_weight = max_entry_weight(self.shard_capacity);
        if weight > max_weight {
            return Err(StoreError::EntryTooLarge { weight, max_weight });
        }
        // Allocate before taking the lock, to keep the critical section short.
        let owned_key = Key::from(key);
        let value: Arc<[u8]> = Arc::from(value);
        let ttl_ms = ttl_millis(ttl);

        let shard = self.shard(key);
        // Declared before the guard, so it is dropped after it.
        let mut evicted = Vec::new();
        let outcome = {
            let mut inner = shard.inner.write();
            let now = self.clock.now_ms();
            self.write_locked(
                shard,
                &mut inner,
                Write {
                    key,
                    owned_key,
                    value,
                    ttl_ms,
                    condition,
                    now,
                    kind: match condition {
                        Condition::Replica(_) | Condition::ReplicaUnchanged { .. } => {
                            ChangeKind::Copy
                        }
                        _ => ChangeKind::Set,
                    },
                },
                &mut evicted,
            )
        };
        // Evicted values are freed here, outside the lock.
        drop(evicted);
        outcome
    }

    /// The write half of [`Store::set`] and [`Store::update`], under the
    /// shard's write lock (`inner`). What the write evicts is left in
    /// `evicted`, for the caller to free after releasing the lock.
    fn write_locked(
        &self,
        shard: &Shard,
        inner: &mut ShardInner,
        write: Write<'_>,
        evicted: &mut Vec<(Key, Entry)>,
    ) -> Result<SetOutcome, StoreError> {
        if self.is_frozen() {
            return Err(StoreError::Frozen);
        }
        let Write {
            key,
            owned_key,
            value,
            ttl_ms,
            condition,
            now,
            kind,
        } = write;
        let current = inner
            .cache
            .peek(key)
            .map(|e| (e.version, e.expires_at, e.is_live(|| now)));
        let live_version = match current {
            Some((version, _, true)) => version,
            _ => 0,
        };
        let allowed = match condition {
            Condition::Always => true,
            Condition::IfAbsent => live_version == 0,
            Condition::IfVersion(expected) => live_version == expected,
            Condition::IfPresent => live_version != 0,
            Condition::Replica(version) => live_version < version,
            Condition::ReplicaUnchanged {
                version,
                incarnation,
                after,
            } => {
                // Checked under the shard lock, as every change of the key
                // is logged: no change can slip in between.
                live_version < version
                    && self
                        .changes
                        .as_ref()
                        .is_some_and(|log| !log.changed_after(key, incarnation, after))
            }
        };
        if !allowed {
            return Ok(SetOutcome {
                stored: false,
                version: live_version,
            });
        }
        if let Some((version, expires_at, live)) = current {
            if expires_at != 0 {
                inner.expiry.remove(&(expires_at, version));
            }
            if live {
                shard.overwrites.fetch_add(1, Relaxed);
            } else {
                // Overwriting a dead entry retires it: count it as expired.
                shard.expirations.fetch_add(1, Relaxed);
            }
        }
        let version = match condition {
            Condition::Replica(version) | Condition::ReplicaUnchanged { version, .. } => {
                // Later local writes must still get larger versions.
                inner.last_version = inner.last_version.max(version);
                version
            }
            _ => inner.next_version(),
        };
        let expires_at = ttl_ms.map_or(0, |ms| now.saturating_add(ms));
        if expires_at != 0 {
            inner
                .expiry
                .insert((expires_at, version), owned_key.clone());
        }
        let entry = Entry {
            value,
            version,
            expires_at,
        };
        inner.cache.insert_with_lifecycle(owned_key, entry, evicted);
        // Never claim a write the cache refused: quick_cache drops an
        // entry it will not admit at once, through the same eviction
        // hook (unreachable with the weight check above, unless the
        // cache's admission rule changes).
        if let Some(i) = evicted
            .iter()
            .position(|(k, e)| k.as_str() == key && e.version == version)
        {
            let (_, refused) = evicted.swap_remove(i);
            inner.unindex(&refused);
            for (_, gone) in evicted.iter() {
                inner.unindex(gone);
            }
            return Err(StoreError::EntryTooLarge {
                weight: weigh(key.len(), refused.value.len(), refused.expires_at != 0),
                max_weight: max_entry_weight(self.shard_capacity),
            });
        }
        let mut evictions = 0;
        let mut expirations = 0;
        let replaced = current.map(|(version, _, _)| version);
        for (gone_key, gone) in evicted.iter() {
            inner.unindex(gone);
            if gone_key.as_str() == key && Some(gone.version) == replaced {
                // The value this write replaced (quick_cache hands it
                // to the eviction hook): counted above as an overwrite
                // or an expiry, not as an eviction.
                continue;
            }
            if gone.is_live(|| now) {
                evictions += 1;
            } else {
                expirations += 1;
            }
        }
        if evictions > 0 {
            shard.evictions.fetch_add(evictions, Relaxed);
        }
        if expirations > 0 {
            shard.expirations.fetch_add(expirations, Relaxed);
        }
        if let Some(log) = &self.changes {
            // Inline for keys up to 24 bytes: no allocation. A conditional
            // copy (warm handoff, parking, restore) fills in what the node
            // lacks: published, but not a change later fills must yield to
            // (their versions order them).
            let fill = matches!(condition, Condition::ReplicaUnchanged { .. });
            log.append_with(kind, Key::from(key), version, !fill);
        }
        Ok(SetOutcome {
            stored: true,
            version,
        })
    }

    /// Adds `delta` to the decimal integer stored under `key` (created as
    /// `initial + delta`, with `ttl`, if absent) and returns the result.
    /// The value is stored as decimal text, so `get` reads it; an existing
    /// key keeps its TTL. Atomic per key ([`Store::update`]).
    pub fn increment(
        &self,
        key: &str,
        delta: i64,
        initial: i64,
        ttl: Option<Duration>,
    ) -> Result<Incremented, StoreError> {
        let updated = self.update(key, ChangeKind::Increment, |current| {
            let (base, ttl) = match current {
                Some(found) => {
                    let value = std::str::from_utf8(&found.value)
                        .ok()
                        .and_then(|t| t.parse::<i64>().ok())
                        .ok_or_else(|| StoreError::NotAnInteger {
                            key: key.to_owned(),
                        })?;
                    (value, found.ttl)
                }
                None => (initial, ttl),
            };
            let value = base
                .checked_add(delta)
                .ok_or_else(|| StoreError::Overflow {
                    key: key.to_owned(),
                    value: base,
                    delta,
                })?;
            Ok(Some((Bytes::from(value.to_string()), ttl, (value, ttl))))
        })?;
        // The closure always writes: `None` cannot come back.
        let ((value, ttl), version) = updated.unwrap_or_default();
        Ok(Incremented {
            value,
            version,
            ttl,
        })
    }

    /// Sets `key`'s time to live (`None`: no expiry) if it holds a live
    /// value, giving it a new version; returns it as it now is. Atomic per
    /// key ([`Store::update`]).
    pub fn touch(&self, key: &str, ttl: Option<Duration>) -> Result<Option<Found>, StoreError> {
        let updated = self.update(key, ChangeKind::Touch, |current| {
            Ok(current.map(|found| (found.value.clone(), ttl, found.value.clone())))
        })?;
        Ok(updated.map(|(value, version)| Found {
            value,
            version,
            ttl,
        }))
    }

    /// A read-modify-write of one key, atomic per key: `change` sees its
    /// live entry (if any) and returns the value and TTL to store with
    /// what to answer, or `None` to leave the key as it is. The read, the
    /// change and the write happen under the shard's write lock, so
    /// concurrent updates of one key are applied one after the other and
    /// none is ever refused (Redis's INCR does the same). `change` runs
    /// under the lock: keep it short. Answers `change`'s answer with the
    /// new version.
    fn update<T>(
        &self,
        key: &str,
        kind: ChangeKind,
        change: impl FnOnce(Option<&Found>) -> Result<Option<(Bytes, Option<Duration>, T)>, StoreError>,
    ) -> Result<Option<(T, u64)>, StoreError> {
        let shard = self.shard(key);
        let max_weight = max_entry_weight(self.shard_capacity);
        // Declared before the guard, so it is dropped after it: evicted
        // values are freed outside the lock.
        let mut evicted = Vec::new();
        let mut inner = shard.inner.write();
        let now = self.clock.now_ms();
        let current = inner
            .cache
            .get(key)
            .filter(|entry| entry.is_live(|| now))
            .map(|entry| Found {
                value: Bytes::from_owner(entry.value.clone()),
                version: entry.version,
                ttl: (entry.expires_at != 0)
                    .then(|| Duration::from_millis(entry.expires_at.saturating_sub(now))),
            });
        let Some((value, ttl, answer)) = change(current.as_ref())? else {
            return Ok(None);
        };
        let weight = weigh(key.len(), value.len(), ttl.is_some());
        if weight > max_weight {
            return Err(StoreError::EntryTooLarge { weight, max_weight });
        }
        let out = self.write_locked(
            shard,
            &mut inner,
            Write {
                key,
                owned_key: Key::from(key),
                value: Arc::from(&value[..]),
                ttl_ms: ttl_millis(ttl),
                condition: Condition::Always,
                now,
                kind,
            },
            &mut evicted,
        )?;
        Ok(Some((answer, out.version)))
    }

    /// Removes `key`. Returns whether a live value was removed.
    pub fn delete(&self, key: &str) -> Result<bool, StoreError> {
        self.delete_if(key, None).map(|d| d.deleted)
    }

    /// Removes `key` if `version` is `None` or equals its current version
    /// (checked and removed under the shard's lock). When it is not
    /// removed, says the current version (0 if absent).
    pub fn delete_if(&self, key: &str, version: Option<u64>) -> Result<DeleteOutcome, StoreError> {
        let shard = self.shard(key);
        let removed = {
            let mut inner = shard.inner.write();
            if self.is_frozen() {
                return Err(StoreError::Frozen);
            }
            if let Some(expected) = version {
                let now = self.clock.now_ms();
                let current = inner
                    .cache
                    .peek(key)
                    .filter(|e| e.is_live(|| now))
                    .map_or(0, |e| e.version);
                if current != expected {
                    return Ok(DeleteOutcome {
                        deleted: false,
                        version: current,
                    });
                }
            }
            let removed = inner.cache.remove(key);
            if let Some((_, entry)) = &removed {
                inner.unindex(entry);
            }
            // Published even when nothing was there: whoever keeps an
            // answer for the key must forget it either way.
            if let Some(log) = &self.changes {
                log.append(ChangeKind::Delete, Key::from(key), 0);
            }
            removed
        };
        let deleted = match removed {
            Some((_, entry)) => {
                let live = entry.is_live(|| self.clock.now_ms());
                if live {
                    shard.deletes.fetch_add(1, Relaxed);
                } else {
                    shard.expirations.fetch_add(1, Relaxed);
                }
                live
            }
            None => false,
        };
        Ok(DeleteOutcome {
            deleted,
            version: 0,
        })
    }

    /// Lists up to `limit` live keys from a cursor: `shard`, and
    /// `position` live-or-expired entries into it (in the cache's slot
    /// order). Returns them with the cursor of the next page, `None` when
    /// every shard has been listed. Not a snapshot: entries written or
    /// removed between pages may be listed or not, once or twice.
    pub fn scan(&self, shard: usize, position: u64, limit: usize) -> ScanPage {
        let mut page = ScanPage {
            keys: Vec::new(),
            next: None,
        };
        let (mut shard, mut position) = (shard, position);
        let now = self.clock.now_ms();
        while shard < self.shards.len() && page.keys.len() < limit {
            let inner = self.shards[shard].inner.read();
            let skip = usize::try_from(position).unwrap_or(usize::MAX);
            let mut seen = 0u64;
            for (key, entry) in inner.cache.iter().skip(skip) {
                if page.keys.len() >= limit {
                    break;
                }
                seen += 1;
                if entry.is_live(|| now) {
                    page.keys.push(key.to_string());
                }
            }
            let finished = skip.saturating_add(usize::try_from(seen).unwrap_or(usize::MAX))
                >= inner.cache.len();
            drop(inner);
            if finished {
                shard += 1;
                position = 0;
            } else {
                position = position.saturating_add(seen);
            }
        }
        if shard < self.shards.len() {
            page.next = Some((shard, position));
        }
        page
    }

    /// Removes every entry. Returns how many were removed.
    pub fn clear(&self) -> u64 {
        let mut removed = 0;
        for shard in &*self.shards {
            let old = {
                let mut inner = shard.inner.write();
                removed += inner.cache.len() as u64;
                inner.expiry.clear();
                std::mem::replace(&mut inner.cache, new_shard_cache(self.shard_capacity))
            };
            // Values are freed here, outside the lock.
            drop(old);
        }
        if let Some(log) = &self.changes {
            log.append(ChangeKind::Flush, Key::default(), 0);
        }
        removed
    }

    /// Frees every entry whose deadline has passed, in batches so readers
    /// are never blocked for long. Returns how many were freed.
    pub fn reclaim_expired(&self) -> u64 {
        let mut total = 0;
        for shard in &*self.shards {
            loop {
                let mut freed = Vec::new();
                {
                    let mut inner = shard.inner.write();
                    let now = self.clock.now_ms();
                    while freed.len() < RECLAIM_BATCH {
                        let Some(entry) = inner.expiry.first_entry() else {
                            break;
                        };
                        if entry.key().0 > now {
                            break;
                        }
                        let ((_, version), key) = entry.remove_entry();
                        if let Some(removed) =
                            inner.cache.remove_if(&*key, |e| e.version == version)
                        {
                            freed.push(removed);
                        }
                    }
                }
                let n = freed.len();
                shard.expirations.fetch_add(n as u64, Relaxed);
                total += n as u64;
                // Values are freed here, outside the lock.
                drop(freed);
                if n < RECLAIM_BATCH {
                    break;
                }
            }
        }
        total
    }

    /// The counters of every shard, in shard order.
    pub fn shard_stats(&self) -> Vec<ShardStats> {
        self.shards
            .iter()
            .map(|shard| {
                let (items, bytes_used, capacity_bytes) = {
                    let inner = shard.inner.read();
                    (
                        inner.cache.len() as u64,
                        inner.cache.weight(),
                        inner.cache.capacity(),
                    )
                };
                ShardStats {
                    items,
                    bytes_used,
                    capacity_bytes,
                    hits: shard.hits.load(Relaxed),
                    misses: shard.misses.load(Relaxed),
                    evictions: shard.evictions.load(Relaxed),
                    expirations: shard.expirations.load(Relaxed),
                    overwrites: shard.overwrites.load(Relaxed),
                    deletes: shard.deletes.load(Relaxed),
                }
            })
            .collect()
    }

    /// The counters summed over all shards.
    pub fn total_stats(&self) -> ShardStats {
        Self::sum(&self.shard_stats())
    }

    /// Sums per-shard counters.
    pub fn sum(shards: &[ShardStats]) -> ShardStats {
        let mut total = ShardStats::default();
        for s in shards {
            total.add(s);
        }
        total
    }

    /// Entries with a TTL currently indexed (live or not yet reclaimed).
    pub fn indexed_expiries(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.inner.read().expiry.len())
            .sum()
    }
}

#[cfg(test)]
mod tests;

#[cfg(test)]
mod model;
