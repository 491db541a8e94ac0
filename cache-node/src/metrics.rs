//! Storage metrics for Prometheus, read from the store at scrape time so
//! the request path pays nothing for them.

use std::sync::Arc;

use prometheus::{
    IntCounter, IntGauge,
    core::{Collector, Desc},
    proto::MetricFamily,
};

use crate::store::Store;

/// Exposes the store's counters as `ringcache_store_*` metrics.
#[derive(Debug)]
pub struct StoreCollector {
    store: Arc<Store>,
    items: IntGauge,
    bytes: IntGauge,
    capacity: IntGauge,
    hits: IntCounter,
    misses: IntCounter,
    evictions: IntCounter,
    expirations: IntCounter,
    overwrites: IntCounter,
    deletes: IntCounter,
}

impl StoreCollector {
    /// A collector over `store`.
    pub fn new(store: Arc<Store>) -> Result<Self, prometheus::Error> {
        Ok(Self {
            store,
            items: IntGauge::new(
                "ringcache_store_items",
                "Entries held (expired ones not yet reclaimed included).",
            )?,
            bytes: IntGauge::new(
                "ringcache_store_bytes",
                "Bytes accounted to entries: key + value + per-entry overhead.",
            )?,
            capacity: IntGauge::new(
                "ringcache_store_capacity_bytes",
                "The most bytes the store may hold (--capacity).",
            )?,
            hits: IntCounter::new(
                "ringcache_store_hits_total",
                "Reads that found a live value.",
            )?,
            misses: IntCounter::new(
                "ringcache_store_misses_total",
                "Reads that found nothing live.",
            )?,
            evictions: IntCounter::new(
                "ringcache_store_evictions_total",
                "Live entries evicted to make room for new writes (capacity pressure; overwrites, deletes and expiries are counted apart).",
            )?,
            expirations: IntCounter::new(
                "ringcache_store_expirations_total",
                "Entries removed because their TTL ran out.",
            )?,
            overwrites: IntCounter::new(
                "ringcache_store_overwrites_total",
                "Live entries replaced by a newer write of the same key.",
            )?,
            deletes: IntCounter::new(
                "ringcache_store_deletes_total",
                "Live entries removed by a delete.",
            )?,
        })
    }
}

/// Moves a counter up to `value` (counters only go up; the store's do too).
fn catch_up(counter: &IntCounter, value: u64) {
    let current = counter.get();
    if value > current {
        counter.inc_by(value - current);
    }
}

fn gauge(g: &IntGauge, value: u64) {
    g.set(i64::try_from(value).unwrap_or(i64::MAX));
}

impl Collector for StoreCollector {
    fn desc(&self) -> Vec<&Desc> {
        [
            self.items.desc(),
            self.bytes.desc(),
            self.capacity.desc(),
            self.hits.desc(),
            self.misses.desc(),
            self.evictions.desc(),
            self.expirations.desc(),
            self.overwrites.desc(),
            self.deletes.desc(),
        ]
        .into_iter()
        .flatten()
        .collect()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let s = self.store.total_stats();
        gauge(&self.items, s.items);
        gauge(&self.bytes, s.bytes_used);
        gauge(&self.capacity, s.capacity_bytes);
        catch_up(&self.hits, s.hits);
        catch_up(&self.misses, s.misses);
        catch_up(&self.evictions, s.evictions);
        catch_up(&self.expirations, s.expirations);
        catch_up(&self.overwrites, s.overwrites);
        catch_up(&self.deletes, s.deletes);
        [
            self.items.collect(),
            self.bytes.collect(),
            self.capacity.collect(),
            self.hits.collect(),
            self.misses.collect(),
            self.evictions.collect(),
            self.expirations.collect(),
            self.overwrites.collect(),
            self.deletes.collect(),
        ]
        .into_iter()
        .flatten()
        .collect()
    }
}

#[cfg(test)]
mod tests {
    use prometheus::{Encoder, Registry, TextEncoder};

    use super::*;
    use crate::store::{Condition, StoreConfig};

    #[test]
    fn scrape_reads_the_store() {
        let store = Arc::new(
            Store::new(StoreConfig {
                capacity: 1 << 20,
                shards: 2,
            })
            .unwrap(),
        );
        let registry = Registry::new();
        registry
            .register(Box::new(StoreCollector::new(store.clone()).unwrap()))
            .unwrap();
        store.set("a", b"1", None, Condition::Always).unwrap();
        store.get("a");
        store.get("a");
        store.get("nope");
        let mut out = Vec::new();
        TextEncoder::new()
            .encode(&registry.gather(), &mut out)
            .unwrap();
        let text = String::from_utf8(out).unwrap();
        assert!(text.contains("ringcache_store_items 1\n"), "{text}");
        assert!(text.contains("ringcache_store_hits_total 2\n"));
        assert!(text.contains("ringcache_store_misses_total 1\n"));
        assert!(text.contains("ringcache_store_capacity_bytes 1048576\n"));
        // A second scrape does not double-count.
        store.get("a");
        let mut out = Vec::new();
        TextEncoder::new()
            .encode(&registry.gather(), &mut out)
            .unwrap();
        assert!(
            String::from_utf8(out)
                .unwrap()
                .contains("ringcache_store_hits_total 3\n")
        );
    }
}

/// `ringcache_node_ring_epochs`: how many different ring epochs
/// orchestrators called this node with in the last
/// [`crate::service::EPOCH_WINDOW`]. Above 1 for longer than a membership
/// change takes, orchestrators disagree about who is on the ring.
#[derive(Debug)]
pub struct EpochsCollector {
    epochs: Arc<crate::epochs::Epochs>,
    gauge: IntGauge,
}

impl EpochsCollector {
    /// A collector over `epochs`.
    pub fn new(epochs: Arc<crate::epochs::Epochs>) -> Result<Self, prometheus::Error> {
        Ok(Self {
            epochs,
            gauge: IntGauge::new(
                "ringcache_node_ring_epochs",
                "Different ring epochs orchestrators called this node with in the last 30 s; above 1 for long, they disagree about the membership.",
            )?,
        })
    }
}

impl Collector for EpochsCollector {
    fn desc(&self) -> Vec<&Desc> {
        self.gauge.desc()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let window = self.epochs.window();
        let n = self
            .epochs
            .distinct_within(window, std::time::Instant::now());
        self.gauge.set(i64::try_from(n).unwrap_or(i64::MAX));
        self.gauge.collect()
    }
}

/// Exposes the change log (`ringcache_changes_*`), read at scrape time.
#[derive(Debug)]
pub struct ChangesCollector {
    log: Arc<crate::changes::ChangeLog>,
    entries: IntGauge,
    bytes: IntGauge,
    capacity: IntGauge,
    head: IntGauge,
    followers: IntGauge,
    lag: IntGauge,
    gaps: IntCounter,
}

impl ChangesCollector {
    /// A collector over `log`.
    pub fn new(log: Arc<crate::changes::ChangeLog>) -> Result<Self, prometheus::Error> {
        Ok(Self {
            log,
            entries: IntGauge::new(
                "ringcache_changes_log_entries",
                "Changes held in the change log (Internal/Changes).",
            )?,
            bytes: IntGauge::new(
                "ringcache_changes_log_bytes",
                "Bytes accounted to the changes held in the change log.",
            )?,
            capacity: IntGauge::new(
                "ringcache_changes_log_capacity_bytes",
                "The most bytes the change log holds (--change-log-bytes).",
            )?,
            head: IntGauge::new(
                "ringcache_changes_head",
                "The last sequence number given to a change in this incarnation.",
            )?,
            followers: IntGauge::new(
                "ringcache_changes_followers",
                "Change feeds open (one per orchestrator, normally).",
            )?,
            lag: IntGauge::new(
                "ringcache_changes_follower_lag",
                "Changes the furthest-behind feed has yet to send.",
            )?,
            gaps: IntCounter::new(
                "ringcache_changes_gaps_total",
                "Feeds told that the position they asked for was gone (the log dropped it, or it was from another incarnation).",
            )?,
        })
    }
}

impl ChangesCollector {
    fn gauges(&self) -> [&IntGauge; 6] {
        [
            &self.entries,
            &self.bytes,
            &self.capacity,
            &self.head,
            &self.followers,
            &self.lag,
        ]
    }
}

impl Collector for ChangesCollector {
    fn desc(&self) -> Vec<&Desc> {
        self.gauges()
            .into_iter()
            .flat_map(|g| g.desc())
            .chain(self.gaps.desc())
            .collect()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let int = |n: u64| i64::try_from(n).unwrap_or(i64::MAX);
        let (entries, bytes) = self.log.len_and_bytes();
        self.entries.set(int(entries as u64));
        self.bytes.set(int(bytes as u64));
        self.capacity.set(int(self.log.max_bytes() as u64));
        self.head.set(int(self.log.head()));
        self.followers.set(int(self.log.readers() as u64));
        self.lag.set(int(self.log.max_lag()));
        catch_up(&self.gaps, self.log.gaps());
        self.gauges()
            .into_iter()
            .flat_map(|g| g.collect())
            .chain(self.gaps.collect())
            .collect()
    }
}

/// Exposes the debt records (`ringcache_debts_*`), read at scrape time.
#[derive(Debug)]
pub struct DebtsCollector {
    debts: Arc<crate::debts::Debts>,
    owners: IntGauge,
    keys: IntGauge,
    bytes: IntGauge,
}

impl DebtsCollector {
    /// A collector over `debts`.
    pub fn new(debts: Arc<crate::debts::Debts>) -> Result<Self, prometheus::Error> {
        Ok(Self {
            debts,
            owners: IntGauge::new(
                "ringcache_debts_owners",
                "Nodes this node holds records of missed changes for (they are brought up to date before they serve again).",
            )?,
            keys: IntGauge::new(
                "ringcache_debts_keys",
                "Keys recorded here that other nodes missed a write or delete of.",
            )?,
            bytes: IntGauge::new(
                "ringcache_debts_bytes",
                "Bytes accounted to those records (at most --debt-bytes).",
            )?,
        })
    }
}

impl Collector for DebtsCollector {
    fn desc(&self) -> Vec<&Desc> {
        [&self.owners, &self.keys, &self.bytes]
            .into_iter()
            .flat_map(|g| g.desc())
            .collect()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let (owners, keys, bytes) = self.debts.totals();
        gauge(&self.owners, owners as u64);
        gauge(&self.keys, keys as u64);
        gauge(&self.bytes, bytes as u64);
        [&self.owners, &self.keys, &self.bytes]
            .into_iter()
            .flat_map(|g| g.collect())
            .collect()
    }
}
