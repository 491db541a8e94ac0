//! Routing decisions against fake nodes: each node's call stack is a
//! `tower::service_fn` that records the ops it is sent and answers them
//! from a map, or fails the way a test tells it to. No network.

use std::{
    collections::HashMap,
    sync::atomic::{AtomicU64, Ordering},
    time::Duration,
};

use bytes::Bytes;
use clap::Parser;
use parking_lot::Mutex;
use ringcache_proto::v1::{
    DeleteResponse, GetResponse, IncrementResponse, SetResponse, TouchResponse,
};
use tower::util::BoxCloneSyncService;

use super::*;
use crate::hotkeys::HotKeys;
use crate::{
    client::{NodeCall, NodeReply},
    config::Config,
    metrics::ClusterMetrics,
    nodes::Member,
};

/// A node that keeps its data in a map.
#[derive(Debug, Default)]
struct FakeNode {
    data: Mutex<HashMap<String, (Bytes, u64)>>,
    /// The ops of every call it got, in order.
    calls: Mutex<Vec<Vec<Op>>>,
    /// When set, every call fails with this (after being recorded).
    fail: Mutex<Option<CallError>>,
    /// When set, calls are recorded and never answered (a frozen node).
    hang: std::sync::atomic::AtomicBool,
    last_version: AtomicU64,
    /// Debts recorded on it (`Owe` ops): key and owners.
    owed: Mutex<Vec<(String, Vec<String>)>>,
}

impl FakeNode {
    fn run(&self, op: &Op) -> op_result::Result {
        let mut data = self.data.lock();
        match op.op.as_ref() {
            Some(op::Op::Get(g)) => op_result::Result::Get(match data.get(&g.key) {
                Some((value, version)) => GetResponse {
                    found: true,
                    value: value.clone(),
                    version: *version,
                    ttl: None,
                },
                None => GetResponse::default(),
            }),
            Some(op::Op::Set(s)) => {
                let current = data.get(&s.key).map_or(0, |(_, v)| *v);
                let allowed = match s.condition {
                    None | Some(set_request::Condition::IfAbsent(false)) => true,
                    Some(set_request::Condition::IfAbsent(true)) => current == 0,
                    Some(set_request::Condition::IfVersion(v)) => current == v,
                    Some(set_request::Condition::IfPresent(p)) => !p || current != 0,
                };
                if !allowed {
                    return op_result::Result::Set(SetResponse {
                        stored: false,
                        version: current,
                        missed: Vec::new(),
                    });
                }
                let version = self.last_version.fetch_add(1, Ordering::Relaxed) + 1;
                data.insert(s.key.clone(), (s.value.clone(), version));
                op_result::Result::Set(SetResponse {
                    stored: true,
                    version,
                    missed: Vec::new(),
                })
            }
            Some(op::Op::Copy(c)) => {
                let current = data.get(&c.key).map_or(0, |(_, v)| *v);
                let stored = c.version > current;
                if stored {
                    data.insert(c.key.clone(), (c.value.clone(), c.version));
                }
                op_result::Result::Copy(SetResponse {
                    stored,
                    version: c.version.max(current),
                    missed: Vec::new(),
                })
            }
            Some(op::Op::Increment(i)) => {
                let base = data.get(&i.key).map_or(i.initial, |(v, _)| {
                    std::str::from_utf8(v).unwrap().parse::<i64>().unwrap()
                });
                let value = base + i.delta;
                let version = self.last_version.fetch_add(1, Ordering::Relaxed) + 1;
                data.insert(i.key.clone(), (Bytes::from(value.to_string()), version));
                op_result::Result::Increment(IncrementResponse {
                    value,
                    version,
                    ttl: None,
                    missed: Vec::new(),
                })
            }
            Some(op::Op::Touch(t)) => match data.get(&t.key).cloned() {
                Some((value, _)) => {
                    let version = self.last_version.fetch_add(1, Ordering::Relaxed) + 1;
                    data.insert(t.key.clone(), (value.clone(), version));
                    op_result::Result::Touch(TouchResponse {
                        found: true,
                        version,
                        ttl: t.ttl,
                        value,
                        missed: Vec::new(),
                    })
                }
                None => op_result::Result::Touch(TouchResponse::default()),
            },
            Some(op::Op::Delete(d)) => {
                let current = data.get(&d.key).map_or(0, |(_, v)| *v);
                if d.if_version != 0 && d.if_version != current {
                    return op_result::Result::Delete(DeleteResponse {
                        deleted: false,
                        version: current,
                        missed: Vec::new(),
                    });
                }
                op_result::Result::Delete(DeleteResponse {
                    deleted: data.remove(&d.key).is_some(),
                    version: 0,
                    missed: Vec::new(),
                })
            }
            Some(op::Op::Owe(o)) => {
                self.owed.lock().push((o.key.clone(), o.owners.clone()));
                op_result::Result::Owe(ringcache_proto::v1::OweResponse { sequence: 1 })
            }
            None => op_result::Result::Error(KeyError::default()),
        }
    }

    fn answer(&self, call: NodeCall) -> Result<NodeReply, CallError> {
        self.calls.lock().push(call.ops.clone());
        if let Some(e) = self.fail.lock().clone() {
            return Err(e);
        }
        Ok(call
            .ops
            .iter()
            .map(|op| OpResult {
                result: Some(self.run(op)),
            })
            .collect())
    }

    fn keys_called(&self) -> Vec<Vec<String>> {
        self.calls
            .lock()
            .iter()
            .map(|ops| {
                ops.iter()
                    .map(|op| match op.op.as_ref() {
                        Some(op::Op::Get(r)) => format!("get {}", r.key),
                        Some(op::Op::Set(r)) => format!("set {}", r.key),
                        Some(op::Op::Copy(r)) => format!("copy {}@{}", r.key, r.version),
                        Some(op::Op::Delete(r)) => format!("delete {}", r.key),
                        Some(op::Op::Increment(r)) => format!("increment {}", r.key),
                        Some(op::Op::Touch(r)) => format!("touch {}", r.key),
                        Some(op::Op::Owe(r)) => format!("owe {} by {}", r.key, r.owners.join("+")),
                        None => "none".to_owned(),
                    })
                    .collect()
            })
            .collect()
    }
}

/// A router over `n` fake nodes writing `replicas` copies.
struct Fixture {
    router: Router,
    cluster: Arc<Cluster>,
    nodes: HashMap<String, Arc<FakeNode>>,
}

impl Fixture {
    fn new(n: usize, replicas: usize) -> Self {
        let r = replicas.to_string();
        let config =
            Config::try_parse_from(["orchestrator", "--nodes", "unused:1", "--replicas", &r])
                .unwrap();
        let registry = prometheus::Registry::new();
        let cluster = Arc::new(Cluster::new(
            config.call_settings(),
            Arc::new(ClusterMetrics::new(&registry).unwrap()),
        ));
        let router = Router::new(cluster.clone(), RequestLimits::default(), replicas, 4 << 20);
        let mut f = Self {
            router,
            cluster,
            nodes: HashMap::new(),
        };
        f.set_nodes(n);
        f
    }

    /// Makes the membership `n0`…`n{n-1}`, with fake nodes for new ones.
    fn set_nodes(&mut self, n: usize) {
        for i in 0..n {
            self.nodes.entry(format!("n{i}")).or_default();
        }
        let members = (0..n)
            .map(|i| Member {
                id: format!("n{i}").as_str().into(),
                address: format!("127.0.0.1:{}", 1 + i),
            })
            .collect();
        let nodes = &self.nodes;
        self.cluster.set_members_with(members, |member, _, _, _| {
            let node = nodes[&*member.id].clone();
            BoxCloneSyncService::new(tower::service_fn(move |call: NodeCall| {
                let node = node.clone();
                async move {
                    if node.hang.load(Ordering::Relaxed) {
                        node.calls.lock().push(call.ops.clone());
                        std::future::pending::<()>().await;
                    }
                    node.answer(call)
                }
            }))
        });
    }

    /// The cluster's node for a fake one.
    fn node_of(&self, fake: &Arc<FakeNode>) -> Arc<Node> {
        let id = self
            .nodes
            .iter()
            .find(|(_, n)| Arc::ptr_eq(n, fake))
            .map(|(id, _)| id.clone())
            .unwrap();
        self.cluster
            .topology()
            .nodes
            .iter()
            .find(|n| *n.id == *id)
            .cloned()
            .unwrap()
    }

    /// The fake nodes in `key`'s preference order.
    fn owners(&self, key: &str) -> Vec<Arc<FakeNode>> {
        let topo = self.cluster.topology();
        topo.ring
            .preference(key)
            .iter()
            .map(|&i| self.nodes[&*topo.nodes[i].id].clone())
            .collect()
    }

    async fn get(&self, key: &str) -> Result<GetResponse, Status> {
        self.router
            .get(Request::new(GetRequest { key: key.into() }))
            .await
            .map(Response::into_inner)
    }

    async fn set(&self, req: SetRequest) -> Result<SetResponse, Status> {
        self.router
            .set(Request::new(req))
            .await
            .map(Response::into_inner)
    }
}

fn set_req(key: &str, value: &str) -> SetRequest {
    SetRequest {
        key: key.into(),
        value: Bytes::copy_from_slice(value.as_bytes()),
        ..Default::default()
    }
}

#[tokio::test]
async fn a_read_moves_on_when_the_node_is_at_fault_and_not_when_the_caller_gave_up() {
    let f = Fixture::new(3, 1);
    let owners = f.owners("k");
    owners[1]
        .data
        .lock()
        .insert("k".into(), (Bytes::from_static(b"from-second"), 9));

    *owners[0].fail.lock() = Some(CallError::NodeTimeout(Duration::from_secs(1)));
    let got = f.get("k").await.unwrap();
    assert_eq!(&got.value[..], b"from-second");
    assert_eq!(owners[1].calls.lock().len(), 1);

    // The caller's own deadline: no point trying elsewhere.
    *owners[0].fail.lock() = Some(CallError::CallerDeadline);
    let status = f.get("k").await.unwrap_err();
    assert_eq!(status.code(), Code::DeadlineExceeded);
    assert_eq!(owners[1].calls.lock().len(), 1, "not retried");

    // Shed by this orchestrator: not the node's fault either.
    *owners[0].fail.lock() = Some(CallError::Shed("full".into()));
    let status = f.get("k").await.unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted);
    assert_eq!(owners[1].calls.lock().len(), 1, "not retried");
}

#[tokio::test]
async fn a_conditional_write_moves_on_only_when_it_never_left() {
    let f = Fixture::new(3, 1);
    let owners = f.owners("k");
    let mut req = set_req("k", "v");
    req.condition = Some(set_request::Condition::IfAbsent(true));

    // Lost mid-call: the first node may have applied it. Not retried.
    *owners[0].fail.lock() = Some(CallError::Lost("connection reset".into()));
    let status = f.set(req.clone()).await.unwrap_err();
    assert_eq!(status.code(), Code::Unavailable);
    assert!(status.message().contains("lost"), "{}", status.message());
    assert!(owners[1].calls.lock().is_empty());

    // Timed out: same.
    *owners[0].fail.lock() = Some(CallError::NodeTimeout(Duration::from_secs(1)));
    let status = f.set(req.clone()).await.unwrap_err();
    assert_eq!(status.code(), Code::DeadlineExceeded);
    assert!(owners[1].calls.lock().is_empty());

    // Never sent: safe to apply on the next node, which also records
    // that the owner missed it (a debt that outlives this orchestrator).
    *owners[0].fail.lock() = Some(CallError::NotSent("connection refused".into()));
    let stored = f.set(req).await.unwrap();
    assert!(stored.stored);
    let owner = f.node_of(&owners[0]).id.to_string();
    assert_eq!(
        owners[1].keys_called(),
        [vec!["set k".to_owned()], vec![format!("owe k by {owner}")]]
    );
}

#[tokio::test]
async fn an_unconditional_write_moves_on_after_any_node_fault() {
    let f = Fixture::new(3, 1);
    let owners = f.owners("k");
    *owners[0].fail.lock() = Some(CallError::Lost("connection reset".into()));
    assert!(f.set(set_req("k", "v")).await.unwrap().stored);
    assert_eq!(owners[1].keys_called()[0], ["set k"]);
    // The owner may hold the old value: recorded on the node that took it.
    let owner = f.node_of(&owners[0]).id.to_string();
    assert_eq!(*owners[1].owed.lock(), [("k".to_owned(), vec![owner])]);
}

#[tokio::test]
async fn replicas_get_copies_with_the_primarys_version() {
    let f = Fixture::new(3, 2);
    let owners = f.owners("k");
    // Make the primary's versions distinct from anything the replica has.
    owners[0].last_version.store(1000, Ordering::Relaxed);
    let written = f.set(set_req("k", "v")).await.unwrap();
    assert_eq!(written.version, 1001);
    assert_eq!(owners[0].keys_called(), [["set k"]]);
    assert_eq!(owners[1].keys_called(), [["copy k@1001"]]);
    assert!(owners[2].calls.lock().is_empty(), "only --replicas owners");
    assert_eq!(
        owners[1].data.lock().get("k").map(|(_, v)| *v),
        Some(1001),
        "the replica holds the primary's version"
    );

    // A replica that fails does not fail the write.
    *owners[1].fail.lock() = Some(CallError::NodeTimeout(Duration::from_secs(1)));
    assert!(f.set(set_req("k", "w")).await.unwrap().stored);
}

#[tokio::test]
async fn a_get_many_is_one_call_per_node_and_answers_in_request_order() {
    let f = Fixture::new(3, 1);
    let keys: Vec<String> = (0..30).map(|i| format!("key-{i}")).collect();
    for k in &keys {
        f.owners(k)[0]
            .data
            .lock()
            .insert(k.clone(), (Bytes::from(k.clone()), 1));
    }
    let got = f
        .router
        .get_many(Request::new(GetManyRequest { keys: keys.clone() }))
        .await
        .unwrap()
        .into_inner();
    for (k, r) in keys.iter().zip(&got.results) {
        assert!(r.found && r.value == k.as_bytes(), "{k}: {r:?}");
    }
    for node in f.nodes.values() {
        let calls = node.keys_called();
        assert_eq!(calls.len(), 1, "one call per node: {calls:?}");
        // The node's keys, in the caller's order.
        let expected: Vec<String> = keys
            .iter()
            .filter(|k| Arc::ptr_eq(&f.owners(k)[0], node))
            .map(|k| format!("get {k}"))
            .collect();
        assert_eq!(calls[0], expected);
    }
}

#[tokio::test]
async fn a_batch_key_whose_nodes_all_fail_carries_the_error_and_the_rest_answer() {
    let f = Fixture::new(2, 1);
    let keys: Vec<String> = (0..20).map(|i| format!("key-{i}")).collect();
    let broken = f.owners(&keys[0])[0].clone();
    *broken.fail.lock() = Some(CallError::Refused(Status::internal("disk on fire")));
    let got = f
        .router
        .get_many(Request::new(GetManyRequest { keys: keys.clone() }))
        .await
        .unwrap()
        .into_inner();
    for (k, r) in keys.iter().zip(&got.results) {
        if Arc::ptr_eq(&f.owners(k)[0], &broken) {
            // Retried on the other node, which answers (a miss).
            assert!(r.error.is_none() && !r.found, "{k}: {r:?}");
        } else {
            assert!(r.error.is_none(), "{k}: {r:?}");
        }
    }
    // Now both fail: every key carries an error naming its last node.
    for node in f.nodes.values() {
        *node.fail.lock() = Some(CallError::NotSent("connection refused".into()));
    }
    let got = f
        .router
        .get_many(Request::new(GetManyRequest { keys }))
        .await
        .unwrap()
        .into_inner();
    for r in &got.results {
        let e = r.error.as_ref().unwrap();
        assert_eq!(e.code, Code::Unavailable as i32);
        assert!(e.message.starts_with("node n"), "{}", e.message);
    }
}

#[tokio::test]
async fn a_delete_goes_to_every_owner() {
    let f = Fixture::new(3, 2);
    let owners = f.owners("k");
    for o in &owners[..2] {
        o.data
            .lock()
            .insert("k".into(), (Bytes::from_static(b"v"), 1));
    }
    let deleted = f
        .router
        .delete(Request::new(DeleteRequest {
            key: "k".into(),
            ..Default::default()
        }))
        .await
        .unwrap()
        .into_inner();
    assert!(deleted.deleted);
    assert!(deleted.missed.is_empty(), "every owner got it");
    for o in &owners[..2] {
        assert_eq!(o.keys_called(), [["delete k"]]);
        assert!(o.data.lock().is_empty());
    }
    assert!(owners[2].calls.lock().is_empty());
}

#[tokio::test]
async fn an_owner_a_delete_missed_is_not_read_from_until_invalidated() {
    let f = Fixture::new(2, 1);
    let owners = f.owners("k");
    owners[0]
        .data
        .lock()
        .insert("k".into(), (Bytes::from_static(b"old"), 1));
    // The delete cannot reach the owner (it restarts, not ejected yet): it
    // goes to the next node, which records the owner's debt, and the
    // client is told which owner missed it.
    *owners[0].fail.lock() = Some(CallError::NotSent("connection refused".into()));
    let answer = f
        .router
        .delete(Request::new(DeleteRequest {
            key: "k".into(),
            ..Default::default()
        }))
        .await
        .unwrap()
        .into_inner();
    let topo = f.cluster.topology();
    let owner_id = topo.nodes[topo.ring.owners("k", 1)[0]].id.to_string();
    assert_eq!(answer.missed, [owner_id]);
    assert!(
        owners[1]
            .keys_called()
            .iter()
            .any(|c| c.iter().any(|op| op == "delete k")),
        "the next node took the delete: {:?}",
        owners[1].keys_called()
    );
    // The owner answers again, still holding the old value: reads of "k"
    // go elsewhere (a miss), never to the stale copy.
    *owners[0].fail.lock() = None;
    let got = f.get("k").await.unwrap();
    assert!(!got.found, "served a deleted key: {got:?}");
    assert!(owners[0].keys_called().iter().all(|c| c != &["get k"]));
    // Other keys of the same node are still read from it.
    let other = (0..100)
        .map(|i| format!("other-{i}"))
        .find(|k| Arc::ptr_eq(&f.owners(k)[0], &owners[0]))
        .unwrap();
    f.get(&other).await.unwrap();
    assert!(
        owners[0]
            .keys_called()
            .iter()
            .any(|c| c == &[format!("get {other}")])
    );
    // Until the health checker's replay deletes it there.
    let node = topo.nodes.iter().find(|n| n.pending.contains("k")).unwrap();
    assert_eq!(node.pending.len(), 1);
}

#[tokio::test]
async fn a_write_that_missed_an_owner_keeps_it_from_serving_the_old_value() {
    let f = Fixture::new(3, 1);
    let owners = f.owners("k");
    owners[0]
        .data
        .lock()
        .insert("k".into(), (Bytes::from_static(b"old"), 1));
    *owners[0].fail.lock() = Some(CallError::NodeTimeout(Duration::from_secs(1)));
    let written = f.set(set_req("k", "new")).await.unwrap();
    assert!(written.stored);
    // The writer is told which owner missed it (a client that reads
    // directly keeps off it for this key).
    let topo = f.cluster.topology();
    let primary = &topo.nodes[topo.ring.owners("k", 1)[0]].id;
    assert_eq!(written.missed, [primary.to_string()]);
    *owners[0].fail.lock() = None;
    let got = f.get("k").await.unwrap();
    assert_eq!(
        &got.value[..],
        b"new",
        "the stand-in's value, not the owner's old one"
    );
}

#[tokio::test]
async fn a_write_that_lands_on_a_stand_in_lives_at_most_the_failover_ttl() {
    let f = Fixture::new(3, 1);
    let owners = f.owners("k");
    let last_ttl = |node: &FakeNode| {
        node.calls
            .lock()
            .iter()
            .rev()
            .find_map(|ops| match &ops[0].op {
                Some(op::Op::Set(s)) => Some(s.ttl.map(|t| t.seconds)),
                _ => None,
            })
            .flatten()
    };
    // To the owner: as the client wrote it.
    f.set(set_req("k", "v")).await.unwrap();
    assert_eq!(last_ttl(&owners[0]), None);
    // The owner is away: the next node holds it for --failover-ttl at most.
    *owners[0].fail.lock() = Some(CallError::NotSent("connection refused".into()));
    f.set(set_req("k", "v")).await.unwrap();
    assert_eq!(last_ttl(&owners[1]), Some(60));
    // A shorter TTL of the write's own wins.
    let mut short = set_req("k", "v");
    short.ttl = Some(prost_types::Duration {
        seconds: 5,
        nanos: 0,
    });
    f.set(short).await.unwrap();
    assert_eq!(last_ttl(&owners[1]), Some(5));
}

#[tokio::test]
async fn a_miss_on_a_restarted_owner_is_answered_by_the_other_and_copied_back() {
    let f = Fixture::new(3, 2);
    let owners = f.owners("k");
    let written = f.set(set_req("k", "v")).await.unwrap();
    // The first owner restarts: empty, and warming.
    owners[0].data.lock().clear();
    f.cluster.start_warming(&f.node_of(&owners[0]));

    let got = f.get("k").await.unwrap();
    assert!(got.found, "answered by the second owner");
    assert_eq!(&got.value[..], b"v");
    assert_eq!(got.version, written.version);
    // Copied back in the background, with its version.
    for _ in 0..100 {
        if owners[0].data.lock().contains_key("k") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(
        owners[0].data.lock().get("k").map(|(_, v)| *v),
        Some(written.version)
    );
    // A key nobody has is a plain miss.
    assert!(!f.get("absent").await.unwrap().found);
}

#[tokio::test]
async fn no_read_through_when_nothing_is_warming() {
    let f = Fixture::new(3, 2);
    let owners = f.owners("k");
    f.set(set_req("k", "v")).await.unwrap();
    owners[0].data.lock().clear();
    assert!(!f.get("k").await.unwrap().found);
    assert!(owners[1].keys_called().iter().all(|c| c[0] != "get k"));
}

#[tokio::test]
async fn a_copy_that_raced_a_delete_is_deleted_again() {
    let f = Fixture::new(3, 1);
    let target = f.owners("k")[0].clone();
    let node = f.node_of(&target);
    let copying = f.cluster.mutations.copying();
    // A delete runs while the copy is between its read and its write.
    drop(f.cluster.mutations.begin("k"));
    let entries = vec![
        (
            "k".to_owned(),
            GetResponse {
                found: true,
                value: Bytes::from_static(b"old"),
                version: 5,
                ttl: None,
            },
        ),
        (
            "other".to_owned(),
            GetResponse {
                found: true,
                value: Bytes::from_static(b"fine"),
                version: 6,
                ttl: None,
            },
        ),
    ];
    let stored = handoff::copy_to(
        &f.cluster,
        &node,
        entries,
        &copying,
        handoff::CopySince::Unconditional,
    )
    .await
    .unwrap();
    assert_eq!(stored, 2);
    let data = target.data.lock();
    assert!(!data.contains_key("k"), "the raced copy was deleted again");
    assert!(data.contains_key("other"));
}

#[tokio::test]
async fn keys_that_moved_are_read_from_their_previous_owner_which_gets_every_delete() {
    let mut f = Fixture::new(3, 1);
    // Keys that move to the fourth node.
    let keys: Vec<String> = (0..200).map(|i| format!("key{i}")).collect();
    for k in &keys {
        f.set(set_req(k, "v")).await.unwrap();
    }
    let before: HashMap<String, Arc<FakeNode>> = keys
        .iter()
        .map(|k| (k.clone(), f.owners(k)[0].clone()))
        .collect();
    f.set_nodes(4);
    let moved: Vec<&String> = keys
        .iter()
        .filter(|k| !Arc::ptr_eq(&f.owners(k)[0], &before[*k]))
        .collect();
    assert!(moved.len() > 20, "{} moved", moved.len());
    for k in &moved {
        let got = f.get(k).await.unwrap();
        assert!(got.found, "{k} read through to its previous owner");
    }
    // A delete of a moved key reaches its previous owner too, so a later
    // miss cannot read the old value back from there.
    let k = moved[0].as_str();
    f.router
        .delete(Request::new(DeleteRequest {
            key: k.into(),
            ..Default::default()
        }))
        .await
        .unwrap();
    assert!(!before[k].data.lock().contains_key(k));
    f.owners(k)[0].data.lock().remove(k);
    assert!(!f.get(k).await.unwrap().found, "{k} stays deleted");
}

#[tokio::test]
async fn a_stand_in_copy_gets_deletes_and_is_retired_once_the_owner_is_back() {
    let f = Fixture::new(3, 1);
    let order = f.owners("k");
    let (owner, stand_in) = (order[0].clone(), order[1].clone());
    // The owner is unreachable: the write lands on the next node.
    *owner.fail.lock() = Some(CallError::NotSent("connection refused".into()));
    assert!(f.set(set_req("k", "during")).await.unwrap().stored);
    let s = f.node_of(&stand_in);
    assert!(s.stand_ins.contains("k"));
    // A delete while the owner is still away reaches the stand-in.
    f.set(set_req("k", "again")).await.unwrap();
    f.router
        .delete(Request::new(DeleteRequest {
            key: "k".into(),
            ..Default::default()
        }))
        .await
        .unwrap();
    assert!(!stand_in.data.lock().contains_key("k"));
    f.set(set_req("k", "last during")).await.unwrap();

    // The owner is back: the stand-in's copy is no longer written, so it
    // is recorded for invalidation there (and skipped meanwhile).
    *owner.fail.lock() = None;
    f.cluster.retire_stand_ins();
    assert!(!s.stand_ins.contains("k"));
    assert!(s.pending.contains("k"), "to be deleted on the stand-in");
    assert!(!s.usable_for("k"));
}

#[tokio::test]
async fn a_conditional_delete_is_decided_by_the_primary_and_then_reaches_every_copy() {
    let f = Fixture::new(3, 2);
    let owners = f.owners("k");
    let written = f.set(set_req("k", "v")).await.unwrap();
    let delete = |if_version| {
        f.router.delete(Request::new(DeleteRequest {
            key: "k".into(),
            if_version,
        }))
    };
    let stale = delete(written.version + 1).await.unwrap().into_inner();
    assert!(!stale.deleted);
    assert_eq!(
        stale.version, written.version,
        "the current version comes back"
    );
    assert!(
        owners[1].data.lock().contains_key("k"),
        "the replica keeps it"
    );

    let done = delete(written.version).await.unwrap().into_inner();
    assert!(done.deleted);
    assert!(!owners[0].data.lock().contains_key("k"));
    assert!(
        !owners[1].data.lock().contains_key("k"),
        "the replica follows"
    );

    // Lost mid-call: it may have been applied; not tried elsewhere.
    f.set(set_req("k", "again")).await.unwrap();
    *owners[0].fail.lock() = Some(CallError::Lost("reset".into()));
    let calls_before = owners[1].calls.lock().len();
    assert!(delete(1).await.is_err());
    assert_eq!(owners[1].calls.lock().len(), calls_before, "not retried");
}

#[tokio::test]
async fn set_if_present_writes_only_over_a_live_value() {
    let f = Fixture::new(3, 2);
    let mut req = set_req("k", "v");
    req.condition = Some(set_request::Condition::IfPresent(true));
    let absent = f.set(req.clone()).await.unwrap();
    assert!(!absent.stored);
    f.set(set_req("k", "first")).await.unwrap();
    let replaced = f.set(req).await.unwrap();
    assert!(replaced.stored);
    for node in f.owners("k").iter().take(2) {
        assert_eq!(&node.data.lock()["k"].0[..], b"v", "on every owner");
    }
}

#[tokio::test]
async fn delete_many_reaches_every_owner_and_answers_in_order() {
    let f = Fixture::new(3, 2);
    for k in ["a", "b"] {
        f.set(set_req(k, "v")).await.unwrap();
    }
    let r = f
        .router
        .delete_many(Request::new(DeleteManyRequest {
            keys: vec!["a".into(), "nobody".into(), "b".into()],
        }))
        .await
        .unwrap()
        .into_inner();
    let deleted: Vec<bool> = r.results.iter().map(|r| r.deleted).collect();
    assert_eq!(deleted, [true, false, true]);
    for node in f.nodes.values() {
        assert!(node.data.lock().is_empty());
    }
}

#[tokio::test]
async fn an_increment_runs_once_on_the_primary_and_its_result_is_copied() {
    let f = Fixture::new(3, 2);
    let owners = f.owners("n");
    owners[0].last_version.store(500, Ordering::Relaxed);
    let inc = |delta| {
        f.router.increment(Request::new(IncrementRequest {
            key: "n".into(),
            delta,
            initial: 10,
            ttl: None,
        }))
    };
    assert_eq!(inc(5).await.unwrap().into_inner().value, 15);
    let r = inc(-3).await.unwrap().into_inner();
    assert_eq!(r.value, 12);
    for o in owners.iter().take(2) {
        let (value, version) = o.data.lock()["n"].clone();
        assert_eq!(
            (&value[..], version),
            (&b"12"[..], r.version),
            "same value and version"
        );
    }
    assert_eq!(
        owners[1]
            .keys_called()
            .iter()
            .flatten()
            .filter(|c| c.starts_with("copy"))
            .count(),
        2,
        "the replica got copies, never the increment itself"
    );

    // Lost mid-call: it may have counted; never tried again elsewhere.
    *owners[0].fail.lock() = Some(CallError::Lost("reset".into()));
    let calls = owners[1].calls.lock().len();
    assert!(inc(1).await.is_err());
    assert_eq!(owners[1].calls.lock().len(), calls);
    // Never sent: the next node counts it (once).
    *owners[0].fail.lock() = Some(CallError::NotSent("refused".into()));
    assert_eq!(inc(1).await.unwrap().into_inner().value, 13);
}

#[tokio::test]
async fn a_touch_runs_on_the_primary_and_its_new_version_reaches_the_replica() {
    let f = Fixture::new(3, 2);
    let owners = f.owners("k");
    owners[0].last_version.store(900, Ordering::Relaxed);
    f.set(set_req("k", "v")).await.unwrap();
    let touched = f
        .router
        .touch(Request::new(TouchRequest {
            key: "k".into(),
            ttl: Some(prost_types::Duration {
                seconds: 30,
                nanos: 0,
            }),
            return_value: false,
        }))
        .await
        .unwrap()
        .into_inner();
    assert!(touched.found);
    assert!(touched.value.is_empty(), "no value unless asked for");
    assert_eq!(
        owners[1].data.lock()["k"].1,
        touched.version,
        "replica follows"
    );
    let missing = f
        .router
        .touch(Request::new(TouchRequest {
            key: "nobody".into(),
            ttl: None,
            return_value: true,
        }))
        .await
        .unwrap()
        .into_inner();
    assert!(!missing.found);
}

#[tokio::test]
async fn hot_keys_lists_the_busiest_key_with_its_owners() {
    let f = Fixture::new(3, 2);
    // A long window, ended by hand: the test does not depend on timing.
    let hot = Arc::new(HotKeys::new(Duration::from_secs(3600), 100.0, None));
    let router = f.router.clone().with_hot_keys(hot.clone());
    router
        .set(Request::new(set_req("celebrity", "v")))
        .await
        .unwrap();
    for i in 0..2_000u32 {
        let key = if i % 4 == 0 {
            format!("other:{i}")
        } else {
            "celebrity".to_owned()
        };
        router.get(Request::new(GetRequest { key })).await.unwrap();
    }
    hot.roll(true);
    let hot = router
        .hot_keys(Request::new(HotKeysRequest { limit: 3 }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(hot.keys[0].key, "celebrity", "{hot:?}");
    assert!(
        hot.keys[0].hot && hot.keys[0].reads_per_second > 100.0,
        "{hot:?}"
    );
    let topo = f.cluster.topology();
    let owners: Vec<String> = topo
        .ring
        .owners("celebrity", 2)
        .iter()
        .map(|&i| topo.nodes[i].id.to_string())
        .collect();
    assert_eq!(hot.keys[0].owners, owners);
    assert!(hot.keys.len() <= 3);
}

/// Hedging on a fixed 10 ms delay, a budget of every read.
fn hedged(router: Router) -> Router {
    use crate::hedge::{DelayPolicy, Hedging};
    let hedging = Hedging::new(
        DelayPolicy::Fixed(Duration::from_millis(10)),
        100,
        Duration::from_secs(1),
        None,
    )
    .unwrap();
    router.with_hedging(Arc::new(hedging))
}

#[tokio::test(start_paused = true)]
async fn a_read_whose_owner_hangs_is_answered_by_the_next_owner_after_the_hedge_delay() {
    let mut f = Fixture::new(3, 2);
    f.router = hedged(f.router.clone());
    f.set(set_req("k", "v")).await.unwrap();
    let keys: Vec<String> = (0..30).map(|i| format!("b{i}")).collect();
    for k in &keys {
        f.set(set_req(k, k)).await.unwrap();
    }
    let owners = f.owners("k");
    owners[0].hang.store(true, Ordering::Relaxed);
    let started = tokio::time::Instant::now();
    let got = f.get("k").await.unwrap();
    assert!(got.found && got.value == "v", "{got:?}");
    assert_eq!(
        started.elapsed(),
        Duration::from_millis(10),
        "the hedge delay"
    );
    assert_eq!(owners[1].keys_called().last().unwrap(), &["get k"]);

    // A batch: keys whose first owner hangs are hedged, the others are not.
    let got = f
        .router
        .get_many(Request::new(GetManyRequest { keys: keys.clone() }))
        .await
        .unwrap()
        .into_inner();
    for (k, r) in keys.iter().zip(&got.results) {
        assert!(
            r.error.is_none() && r.found && r.value == k.as_bytes(),
            "{k}: {r:?}"
        );
    }
}

#[tokio::test(start_paused = true)]
async fn without_hedging_a_hung_owner_holds_the_read() {
    let f = Fixture::new(3, 2);
    f.set(set_req("k", "v")).await.unwrap();
    f.owners("k")[0].hang.store(true, Ordering::Relaxed);
    let waited = tokio::time::timeout(Duration::from_secs(5), f.get("k")).await;
    assert!(waited.is_err(), "answered without hedging: {waited:?}");
}

#[tokio::test(start_paused = true)]
async fn writes_are_never_hedged() {
    let mut f = Fixture::new(3, 2);
    f.router = hedged(f.router.clone());
    let owners = f.owners("k");
    owners[0].hang.store(true, Ordering::Relaxed);
    let waited = tokio::time::timeout(Duration::from_secs(5), f.set(set_req("k", "v"))).await;
    assert!(waited.is_err(), "the write went elsewhere: {waited:?}");
    for other in &owners[1..] {
        assert!(other.keys_called().is_empty(), "{:?}", other.keys_called());
    }
}

/// A node coming back is fenced: for a while, reads and the primary of
/// read-modify-write ops (a touch answers the primary's value) prefer the
/// key's other owner, while writes still reach it. Another orchestrator
/// may have deleted the key around it a moment ago.
#[tokio::test]
async fn a_fenced_owner_answers_no_read_while_another_owner_can() {
    let f = Fixture::new(3, 2);
    let owners = f.owners("k");
    // The first owner holds a value the second no longer has (deleted
    // around it by another orchestrator).
    owners[0]
        .data
        .lock()
        .insert("k".into(), (Bytes::from_static(b"stale"), 5));
    let first = f.node_of(&owners[0]);
    first.fence_reads(Duration::from_secs(60));
    assert!(first.read_fenced());

    let got = f.get("k").await.unwrap();
    assert!(!got.found, "read from the other owner: {got:?}");
    assert!(
        owners[0].calls.lock().is_empty(),
        "no read reached the fenced owner"
    );
    let touched = f
        .router
        .touch(Request::new(TouchRequest {
            key: "k".into(),
            ..Default::default()
        }))
        .await
        .unwrap()
        .into_inner();
    assert!(!touched.found, "touched on the other owner: {touched:?}");
    assert!(owners[0].calls.lock().is_empty());

    // Writes still reach both owners (the fenced one gets the copy).
    f.set(set_req("k", "new")).await.unwrap();
    assert_eq!(&owners[1].data.lock()["k"].0[..], b"new");
    assert_eq!(owners[0].keys_called(), [vec!["copy k@1".to_owned()]]);

    // A shorter fence does not end a longer one.
    first.fence_reads(Duration::ZERO);
    assert!(first.read_fenced());
}

#[tokio::test]
async fn a_fenced_owner_answers_reads_again_when_the_fence_is_over() {
    let f = Fixture::new(3, 2);
    let owners = f.owners("k");
    owners[0]
        .data
        .lock()
        .insert("k".into(), (Bytes::from_static(b"v"), 5));
    let first = f.node_of(&owners[0]);
    first.fence_reads(Duration::from_millis(30));
    assert!(!f.get("k").await.unwrap().found);
    tokio::time::sleep(Duration::from_millis(60)).await;
    assert!(!first.read_fenced());
    assert_eq!(&f.get("k").await.unwrap().value[..], b"v");
}
