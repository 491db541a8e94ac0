//! Which nodes own a key: rendezvous (highest-random-weight) hashing.
//!
//! Every node gets a score for every key — a 64-bit mix of the key's hash
//! and the node's seed (a hash of its identity) — and a key's owners are the
//! nodes with the highest scores, in descending order. That gives:
//!
//! - **Balance**: each node's share is a sum of independent draws, so with
//!   1M keys over 10 nodes the fullest node holds about 1.01× the mean — no
//!   virtual nodes to tune (a ring with 160 virtual nodes per node is off by
//!   about ±8%).
//! - **Minimal movement**: adding a node moves to it exactly the keys it now
//!   wins (1/N of them, on average), and nothing else; removing a node moves
//!   only its keys, each to its own next-highest node.
//! - **Replicas for free**: the R owners are the top R scores, always
//!   distinct nodes, and the next owner of a key whose first owner is down is
//!   simply the next score.
//! - **Determinism**: scores depend only on the key and the node identities
//!   (xxh3, a fixed, specified hash), so every orchestrator with the same
//!   membership routes every key identically, across processes and
//!   versions.
//!
//! The cost is one multiply-xorshift per node per lookup: O(N), which is
//! tens of nanoseconds for the tens of nodes a cache cluster has (see
//! `orchestrator/benches/ring.rs`).
//!
//! The orchestrator and the clients that route themselves (direct mode)
//! use this one crate; the Go client's port is checked against the vectors
//! in `clients/go/testdata/placement_vectors.json`, which a test here
//! generates and compares (`UPDATE_PLACEMENT_VECTORS=1` rewrites them).

use std::sync::Arc;

use smallvec::SmallVec;
use xxhash_rust::xxh3::xxh3_64;

/// The version of the placement algorithm: rendezvous over `xxh3_64` of
/// the key and of each identity, mixed by `fmix64`, ties to the lower
/// identity. `Cluster/WatchTopology` reports it, and a client that
/// routes itself must refuse to (and go through the orchestrator) when it
/// does not know the version: a different algorithm would send reads to
/// nodes that do not hold the keys.
pub const PLACEMENT_VERSION: u32 = 1;

/// A node's identity on the ring.
pub type NodeId = Arc<str>;

/// Node indices in preference order. Inline for up to 16 nodes.
pub type Preference = SmallVec<[usize; 16]>;

/// The ring: node identities and their seeds, sorted by identity so the
/// index of a node does not depend on the order it was added in.
#[derive(Debug, Clone, Default)]
pub struct Ring {
    ids: Vec<NodeId>,
    seeds: Vec<u64>,
}

/// The 64-bit finalizer of MurmurHash3: a bijection with full avalanche,
/// so scores of different nodes for one key are independent.
#[inline]
fn fmix64(mut k: u64) -> u64 {
    k ^= k >> 33;
    k = k.wrapping_mul(0xff51_afd7_ed55_8ccd);
    k ^= k >> 33;
    k = k.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    k ^= k >> 33;
    k
}

/// The hash of a key, computed once per lookup.
#[inline]
pub fn key_hash(key: &str) -> u64 {
    xxh3_64(key.as_bytes())
}

impl Ring {
    /// A ring of the given nodes (duplicates are dropped).
    pub fn new(ids: impl IntoIterator<Item = NodeId>) -> Self {
        let mut ids: Vec<NodeId> = ids.into_iter().collect();
        ids.sort();
        ids.dedup();
        let seeds = ids.iter().map(|id| xxh3_64(id.as_bytes())).collect();
        Self { ids, seeds }
    }

    /// The number of nodes.
    pub fn len(&self) -> usize {
        self.ids.len()
    }

    /// Whether the ring has no nodes.
    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }

    /// The nodes' identities, in index order.
    pub fn ids(&self) -> &[NodeId] {
        &self.ids
    }

    /// The ring's epoch: a digest of its node identities (sorted), so two
    /// rings with the same identities — which place every key alike —
    /// have the same epoch, and any other pair almost surely differs.
    pub fn epoch(&self) -> u64 {
        let mut hasher = xxhash_rust::xxh3::Xxh3::new();
        for id in &self.ids {
            hasher.update(id.as_bytes());
            // A separator no identity contains, so ["ab"] ≠ ["a", "b"].
            hasher.update(&[0]);
        }
        hasher.digest()
    }

    /// The index of node `id`, if it is on the ring.
    pub fn index_of(&self, id: &str) -> Option<usize> {
        self.ids.binary_search_by(|probe| (**probe).cmp(id)).ok()
    }

    #[inline]
    fn score(&self, node: usize, hash: u64) -> u64 {
        fmix64(hash ^ self.seeds[node])
    }

    /// Every node, most preferred owner of `key` first.
    pub fn preference(&self, key: &str) -> Preference {
        let hash = key_hash(key);
        let mut scored: SmallVec<[(u64, usize); 16]> = (0..self.ids.len())
            .map(|i| (self.score(i, hash), i))
            .collect();
        // Highest score first; equal scores (astronomically rare) by index.
        scored.sort_unstable_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
        scored.into_iter().map(|(_, i)| i).collect()
    }

    /// The first owner of `key`: the node with the highest score. `None`
    /// on an empty ring.
    pub fn primary(&self, key: &str) -> Option<usize> {
        self.primary_of_hash(key_hash(key))
    }

    /// Each node's share of the key space as first owner, measured on
    /// `samples` key hashes spread evenly over it (a deterministic
    /// sequence, so every orchestrator reports the same figures). With
    /// 65 536 samples a share is within about ±0.5% of its true value.
    pub fn shares(&self, samples: u32) -> Vec<f64> {
        let mut won = vec![0u64; self.ids.len()];
        for i in 0..samples {
            // fmix64 is a bijection: distinct, well-spread hashes.
            if let Some(n) = self.primary_of_hash(fmix64(u64::from(i) ^ 0x7368_6172_6573)) {
                won[n] += 1;
            }
        }
        won.into_iter()
            .map(|w| w as f64 / f64::from(samples.max(1)))
            .collect()
    }

    fn primary_of_hash(&self, hash: u64) -> Option<usize> {
        (0..self.ids.len()).max_by(|&a, &b| {
            self.score(a, hash)
                .cmp(&self.score(b, hash))
                // Prefer the lower index on a tie, as `preference` does.
                .then(b.cmp(&a))
        })
    }

    /// The `n` most preferred nodes for `key` (fewer if the ring is
    /// smaller), most preferred first: always distinct nodes, and the same
    /// as the first `n` of [`Ring::preference`]. Costs O(nodes × n) with no
    /// sort, so routing, which needs only the first few nodes, stays cheap
    /// on large rings.
    pub fn owners(&self, key: &str, n: usize) -> Preference {
        let n = n.min(self.ids.len());
        if n == 0 {
            return Preference::new();
        }
        let hash = key_hash(key);
        // The best `n` so far, best first; insertion keeps it sorted.
        let mut best: SmallVec<[(u64, usize); 16]> = SmallVec::with_capacity(n);
        for i in 0..self.ids.len() {
            let score = self.score(i, hash);
            // Ties go to the lower index, which comes first in this loop.
            let at = best
                .iter()
                .position(|&(s, _)| score > s)
                .unwrap_or(best.len());
            if at < n {
                if best.len() == n {
                    best.pop();
                }
                best.insert(at, (score, i));
            }
        }
        best.into_iter().map(|(_, i)| i).collect()
    }
}

#[cfg(test)]
mod tests;
