use std::collections::HashMap;

use super::*;

fn ring(n: usize) -> Ring {
    Ring::new((0..n).map(|i| NodeId::from(format!("cache-{i}:50061"))))
}

/// 1M pseudo-random keys from a fixed seed (splitmix64), so the figures
/// are the same on every run.
fn keys(n: usize) -> Vec<String> {
    let mut state: u64 = 0x5eed;
    (0..n)
        .map(|_| {
            state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
            format!("user:{:016x}", fmix64(state))
        })
        .collect()
}

#[test]
fn balance_over_ten_nodes() {
    let r = ring(10);
    let keys = keys(1_000_000);
    let mut counts = vec![0usize; 10];
    for k in &keys {
        counts[r.primary(k).unwrap()] += 1;
    }
    let mean = keys.len() as f64 / 10.0;
    let max = *counts.iter().max().unwrap() as f64 / mean;
    let min = *counts.iter().min().unwrap() as f64 / mean;
    println!("fullest node {max:.4}× mean, emptiest {min:.4}×");
    assert!(
        max <= 1.05,
        "fullest node holds {max:.4}× the mean: {counts:?}"
    );
    assert!(
        min >= 0.95,
        "emptiest node holds {min:.4}× the mean: {counts:?}"
    );
}

#[test]
fn adding_a_node_moves_only_its_share_and_only_to_it() {
    let before = ring(10);
    let after = ring(11);
    let new = after.index_of("cache-10:50061").unwrap();
    let keys = keys(1_000_000);
    let mut moved = 0;
    for k in &keys {
        let old_owner = &before.ids()[before.primary(k).unwrap()];
        let new_owner = after.primary(k).unwrap();
        if &after.ids()[new_owner] != old_owner {
            moved += 1;
            assert_eq!(new_owner, new, "{k} moved between old nodes");
        }
    }
    let fraction = moved as f64 / keys.len() as f64;
    println!(
        "adding an 11th node moved {fraction:.4} of keys (ideal {:.4})",
        1.0 / 11.0
    );
    assert!(fraction <= 1.15 / 11.0, "moved {fraction}");
    assert!(fraction >= 0.85 / 11.0, "moved {fraction}");
}

#[test]
fn removing_a_node_moves_only_its_keys() {
    let before = ring(10);
    let after = Ring::new(
        before
            .ids()
            .iter()
            .filter(|id| &***id != "cache-3:50061")
            .cloned(),
    );
    for k in keys(200_000) {
        let old_owner = &before.ids()[before.primary(&k).unwrap()];
        let new_owner = &after.ids()[after.primary(&k).unwrap()];
        if &**old_owner != "cache-3:50061" {
            assert_eq!(old_owner, new_owner, "{k} moved though its owner stayed");
        } else {
            // It goes to its own second choice.
            let second = before.preference(&k)[1];
            assert_eq!(&before.ids()[second], new_owner);
        }
    }
}

#[test]
fn owners_are_distinct_and_deterministic() {
    let a = ring(5);
    // Built in a different order: same ring.
    let b = Ring::new(
        (0..5)
            .rev()
            .map(|i| NodeId::from(format!("cache-{i}:50061"))),
    );
    for k in keys(10_000) {
        let owners = a.owners(&k, 3);
        assert_eq!(owners.len(), 3);
        assert!(owners[0] != owners[1] && owners[1] != owners[2] && owners[0] != owners[2]);
        assert_eq!(owners, b.owners(&k, 3));
        assert_eq!(
            &owners[..],
            &a.preference(&k)[..3],
            "owners are the head of the preference"
        );
        assert_eq!(&a.owners(&k, 5)[..], &a.preference(&k)[..]);
        assert_eq!(owners[0], a.primary(&k).unwrap());
        assert_eq!(a.preference(&k).len(), 5);
    }
    // Asking for more owners than nodes gives every node once.
    assert_eq!(a.owners("k", 9).len(), 5);
}

#[test]
fn fixed_placement_is_stable_across_versions() {
    // If this changes, every deployed cluster would reshuffle its keys on
    // upgrade: the hash and mixing are part of the wire contract.
    let r = ring(3);
    let placed: HashMap<&str, &str> = [
        "alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta", "iota", "kappa",
    ]
    .into_iter()
    .map(|k| (k, &*r.ids()[r.primary(k).unwrap()]))
    .collect();
    let expected: HashMap<&str, &str> = [
        ("alpha", "cache-2:50061"),
        ("beta", "cache-1:50061"),
        ("gamma", "cache-2:50061"),
        ("delta", "cache-1:50061"),
        ("epsilon", "cache-2:50061"),
        ("zeta", "cache-2:50061"),
        ("eta", "cache-1:50061"),
        ("theta", "cache-2:50061"),
        ("iota", "cache-0:50061"),
        ("kappa", "cache-1:50061"),
    ]
    .into_iter()
    .collect();
    assert_eq!(placed, expected);
    assert_eq!(
        key_hash(""),
        0x2d06_8005_38d3_94c2,
        "xxh3 of the empty string"
    );
}

#[test]
fn empty_and_single_node_rings() {
    let empty = Ring::new([]);
    assert!(empty.is_empty());
    assert_eq!(empty.primary("k"), None);
    assert!(empty.owners("k", 2).is_empty());
    let one = ring(1);
    assert_eq!(one.owners("k", 2).as_slice(), &[0]);
}

#[test]
fn epochs_depend_on_the_identities_only() {
    let ring = |ids: &[&str]| Ring::new(ids.iter().map(|&i| NodeId::from(i)));
    assert_eq!(
        ring(&["a", "b", "c"]).epoch(),
        ring(&["c", "a", "b"]).epoch()
    );
    assert_ne!(ring(&["a", "b", "c"]).epoch(), ring(&["a", "b"]).epoch());
    assert_ne!(ring(&["ab"]).epoch(), ring(&["a", "b"]).epoch());
    // Pinned: the digest is part of what orchestrators of different
    // versions compare.
    assert_eq!(
        format!("{:016x}", ring(&["cache-0", "cache-1"]).epoch()).len(),
        16
    );
}

#[test]
fn shares_are_measured_and_match_where_keys_land() {
    // Two nodes whose identities happen to differ only slightly, and a
    // larger ring: the measured shares add up to 1 and agree with where
    // real keys land, to within sampling error.
    for n in [2, 3, 7] {
        let r = ring(n);
        let shares = r.shares(1 << 16);
        assert_eq!(shares.len(), n);
        assert!((shares.iter().sum::<f64>() - 1.0).abs() < 1e-9);
        let mut landed = vec![0usize; n];
        let ks = keys(200_000);
        for k in &ks {
            landed[r.primary(k).unwrap()] += 1;
        }
        for (i, &share) in shares.iter().enumerate() {
            let real = landed[i] as f64 / ks.len() as f64;
            assert!(
                (share - real).abs() < 0.01,
                "node {i} of {n}: {share} vs {real}"
            );
        }
        // Not a constant: the figures differ from node to node.
        assert!(shares.iter().any(|&s| s != shares[0]), "{shares:?}");
    }
    assert!(Ring::default().shares(1024).is_empty());
}
