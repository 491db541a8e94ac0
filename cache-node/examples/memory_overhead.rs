//! Measures the real heap cost of a stored entry beyond its key and value,
//! to check the store's `ENTRY_OVERHEAD` / `EXPIRY_OVERHEAD` accounting.
//!
//! ```sh
//! cargo run --release -p cache-node --example memory_overhead
//! ```
//!
//! Each case runs in its own process. It fills a store with 1M entries (12-byte keys, 100-byte values), with
//! and without TTLs, reads every entry once (the first read of a value
//! shares its buffer, which allocates a small header), and compares the
//! growth of the process' resident memory with the bytes the store
//! accounts.

use std::time::Duration;

use cache_node::store::{Condition, Store, StoreConfig};

fn rss() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

fn measure(ttl: Option<Duration>) -> anyhow::Result<()> {
    let n: usize = std::env::var("ITEMS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000_000);
    let key_len: usize = std::env::var("KEY_LEN")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(12);
    let store = Store::new(StoreConfig {
        capacity: 8 << 30,
        shards: 16,
    })?;
    let value = [42u8; 100];
    let before = rss();
    for i in 0..n {
        store.set(&format!("{i:0key_len$}"), &value, ttl, Condition::Always)?;
    }
    for i in 0..n {
        store.get(&format!("{i:0key_len$}"));
    }
    let grown = rss().saturating_sub(before);
    let stats = store.total_stats();
    let payload = (n * (key_len + 100)) as u64;
    println!(
        "ttl={:<5} items={} accounted={} MiB rss growth={} MiB real overhead/entry={} B accounted overhead/entry={} B",
        ttl.is_some(),
        stats.items,
        stats.bytes_used >> 20,
        grown >> 20,
        grown.saturating_sub(payload) / n as u64,
        (Store::entry_weight(key_len, 100, ttl.is_some()) - (key_len + 100) as u64),
    );
    Ok(())
}

fn main() -> anyhow::Result<()> {
    // Each case runs in a fresh process: freed memory stays resident in the
    // allocator and would hide the second case's growth.
    match std::env::args().nth(1).as_deref() {
        Some("plain") => measure(None),
        Some("ttl") => measure(Some(Duration::from_secs(3600))),
        _ => {
            let me = std::env::current_exe()?;
            for case in ["plain", "ttl"] {
                let status = std::process::Command::new(&me).arg(case).status()?;
                anyhow::ensure!(status.success(), "{case} run failed: {status}");
            }
            Ok(())
        }
    }
}
