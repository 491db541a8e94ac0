//! The real `cache-node` binary, through a tonic client.

// Test code: a failed expectation should panic with its message.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use integration_tests::{NodeProcess, eventually, health, metric_value};
use ringcache_proto::v1::{
    DeleteRequest, GetManyRequest, GetRequest, SetManyRequest, SetRequest, StatsRequest,
    set_request::Condition,
};
use tonic_health::pb::health_check_response::ServingStatus;

fn set(key: &str, value: &[u8]) -> SetRequest {
    SetRequest {
        key: key.into(),
        value: value.to_vec().into(),
        ..Default::default()
    }
}

#[tokio::test]
async fn set_get_delete_with_versions_and_ttl() {
    let node = NodeProcess::start(&[]).await;
    let mut c = node.cache().await;

    let miss = c
        .get(GetRequest { key: "a".into() })
        .await
        .unwrap()
        .into_inner();
    assert!(!miss.found);

    let v1 = c.set(set("a", b"one")).await.unwrap().into_inner();
    assert!(v1.stored && v1.version > 0);
    let got = c
        .get(GetRequest { key: "a".into() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (got.found, &got.value[..], got.version),
        (true, &b"one"[..], v1.version)
    );

    // Compare-and-set: the right version wins once, a stale one loses.
    let mut cas = set("a", b"two");
    cas.condition = Some(Condition::IfVersion(v1.version));
    let v2 = c.set(cas.clone()).await.unwrap().into_inner();
    assert!(v2.stored && v2.version > v1.version);
    let stale = c.set(cas).await.unwrap().into_inner();
    assert!(!stale.stored);
    assert_eq!(stale.version, v2.version);

    // TTL: reported, then gone.
    let mut short = set("ttl", b"x");
    short.ttl = Some(prost_types::Duration {
        seconds: 0,
        nanos: 300_000_000,
    });
    c.set(short).await.unwrap();
    let live = c
        .get(GetRequest { key: "ttl".into() })
        .await
        .unwrap()
        .into_inner();
    let ttl = live.ttl.expect("ttl reported");
    assert!(ttl.seconds == 0 && ttl.nanos > 0 && ttl.nanos <= 300_000_000);
    eventually(Duration::from_secs(5), || {
        let mut c = c.clone();
        async move {
            let r = c
                .get(GetRequest { key: "ttl".into() })
                .await
                .map_err(|e| e.to_string())?;
            if r.into_inner().found {
                Err("still there".to_owned())
            } else {
                Ok(())
            }
        }
    })
    .await;

    let del = c
        .delete(DeleteRequest {
            key: "a".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(del.deleted);
    let del = c
        .delete(DeleteRequest {
            key: "a".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!del.deleted);
}

#[tokio::test]
async fn batches_keep_request_order_and_limits_name_the_flag() {
    let node = NodeProcess::start(&["--max-batch", "100", "--max-key-bytes", "64"]).await;
    let mut c = node.cache().await;
    let entries = (0..100)
        .map(|i| set(&format!("k{i}"), format!("v{i}").as_bytes()))
        .collect();
    let out = c
        .set_many(SetManyRequest { entries })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(out.results.len(), 100);
    assert!(out.results.iter().all(|r| r.stored));

    let keys: Vec<String> = (0..100).rev().map(|i| format!("k{}", i * 2)).collect();
    let got = c
        .get_many(GetManyRequest { keys: keys.clone() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got.results.len(), keys.len());
    for (k, r) in keys.iter().zip(&got.results) {
        let i: usize = k[1..].parse().unwrap();
        assert_eq!(r.found, i < 100, "{k}");
        if r.found {
            assert_eq!(r.value, format!("v{i}").as_bytes());
        }
    }

    let too_many: Vec<String> = (0..101).map(|i| format!("k{i}")).collect();
    let err = c
        .get_many(GetManyRequest { keys: too_many })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(err.message().contains("--max-batch"), "{}", err.message());

    let err = c
        .get(GetRequest {
            key: "x".repeat(65),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert_eq!(
        err.message(),
        "key: key is 65 bytes, over the 64-byte limit (--max-key-bytes)"
    );

    // The node keeps serving after refusals.
    assert!(
        c.get(GetRequest { key: "k1".into() })
            .await
            .unwrap()
            .into_inner()
            .found
    );
}

#[tokio::test]
async fn memory_stays_within_capacity_under_a_far_larger_write_load() {
    let capacity: u64 = 32 << 20;
    let node = NodeProcess::start(&["--capacity", "32MiB", "--shards", "8"]).await;
    let mut c = node.cache().await;
    let baseline = node.process.rss_bytes();
    // Write 10× the capacity: 320 MiB in 4 KiB values, 100 per batch.
    let value = vec![0xABu8; 4096];
    for batch in 0..800 {
        let entries = (0..100)
            .map(|i| set(&format!("key-{batch}-{i}"), &value))
            .collect();
        c.set_many(SetManyRequest { entries }).await.unwrap();
    }
    let stats = node
        .node()
        .await
        .stats(StatsRequest {})
        .await
        .unwrap()
        .into_inner();
    let total = stats.total.unwrap();
    assert!(total.bytes_used <= capacity, "{total:?}");
    assert!(
        total.bytes_used > capacity * 9 / 10,
        "the cache fills up: {total:?}"
    );
    assert!(total.evictions > 70_000, "{total:?}");
    for shard in &stats.shards {
        assert!(shard.bytes_used <= shard.capacity_bytes, "{shard:?}");
    }
    // The process' real memory tracks the accounting: capacity plus the
    // allocator's and runtime's share, not the 320 MiB that was written.
    let rss = node.process.rss_bytes();
    assert!(
        rss < baseline + capacity * 2,
        "rss {} MiB (baseline {} MiB) for a {} MiB capacity",
        rss >> 20,
        baseline >> 20,
        capacity >> 20
    );
    let page = node.process.scrape().await;
    assert_eq!(
        metric_value(&page, "ringcache_store_capacity_bytes", &[]),
        Some(capacity as f64)
    );
    assert!(metric_value(&page, "ringcache_store_evictions_total", &[]).unwrap() > 70_000.0);
}

#[tokio::test]
async fn metrics_count_what_was_done() {
    let node = NodeProcess::start(&[]).await;
    let mut c = node.cache().await;
    for i in 0..7 {
        c.set(set(&format!("m{i}"), b"v")).await.unwrap();
    }
    for i in 0..10 {
        c.get(GetRequest {
            key: format!("m{i}"),
        })
        .await
        .unwrap();
    }
    c.get(GetRequest { key: String::new() }).await.unwrap_err();
    let page = node.process.scrape().await;
    let handled = |method: &str, code: &str| {
        metric_value(
            &page,
            "grpc_server_handled_total",
            &[
                &format!("grpc_method=\"{method}\""),
                &format!("grpc_code=\"{code}\""),
                "grpc_service=\"ringcache.v1.Cache\"",
            ],
        )
    };
    assert_eq!(handled("Set", "OK"), Some(7.0));
    assert_eq!(handled("Get", "OK"), Some(10.0));
    assert_eq!(handled("Get", "InvalidArgument"), Some(1.0));
    assert_eq!(
        metric_value(
            &page,
            "grpc_server_handling_seconds_count",
            &["grpc_method=\"Get\"", "grpc_code=\"OK\""]
        ),
        Some(10.0)
    );
    assert_eq!(metric_value(&page, "ringcache_store_items", &[]), Some(7.0));
    assert_eq!(
        metric_value(&page, "ringcache_store_hits_total", &[]),
        Some(7.0)
    );
    assert_eq!(
        metric_value(&page, "ringcache_store_misses_total", &[]),
        Some(3.0)
    );
    assert!(metric_value(&page, "process_resident_memory_bytes", &[]).unwrap() > 0.0);
}

#[tokio::test]
async fn configuration_comes_from_the_environment_too() {
    let node = NodeProcess::start_with_env(
        &[],
        &[("RINGCACHE_SHARDS", "4"), ("RINGCACHE_CAPACITY", "64MiB")],
    )
    .await;
    let stats = node
        .node()
        .await
        .stats(StatsRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(stats.shards.len(), 4);
    assert_eq!(stats.total.unwrap().capacity_bytes, 64 << 20);
}

#[tokio::test]
async fn inconsistent_configuration_is_refused_at_startup() {
    let out = std::process::Command::new(integration_tests::binary("cache-node"))
        .args([
            "--capacity",
            "8MiB",
            "--shards",
            "16",
            "--listen",
            "127.0.0.1:0",
            "--metrics-listen",
            "127.0.0.1:0",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("does not fit in a shard"), "{stderr}");
}

#[tokio::test]
async fn sigterm_drains_then_exits_cleanly() {
    // A drain delay long enough for a loaded machine to see it.
    let mut node = NodeProcess::start(&["--drain-delay", "3s"]).await;
    let url = node.process.grpc_url();
    let mut c = node.cache().await;
    c.set(set("k", b"v")).await.unwrap();
    node.process.signal_term();
    // During the drain delay, readiness is NOT_SERVING but calls still work.
    eventually(Duration::from_secs(5), || {
        let url = url.clone();
        async move {
            match health(&url, "ringcache.v1.Cache").await {
                Ok(ServingStatus::NotServing) => Ok(()),
                other => Err(format!("{other:?}")),
            }
        }
    })
    .await;
    assert!(
        c.get(GetRequest { key: "k".into() })
            .await
            .unwrap()
            .into_inner()
            .found
    );
    let status = node
        .process
        .wait_exit(Duration::from_secs(15))
        .expect("exits after draining");
    assert!(status.success(), "{status}");
    let logs = node.process.logs().join("\n");
    assert!(logs.contains("cache-node stopped"), "{logs}");
}

/// At `--max-in-flight`, calls are refused, but health checks are still
/// answered: a kubelet must not restart the busiest node (emptying its
/// cache) because it was busy.
#[tokio::test]
async fn health_answers_serving_while_calls_are_shed() {
    let node = NodeProcess::start(&["--max-in-flight", "1"]).await;
    // Take the only slot: a Get whose request body never finishes arriving
    // keeps its handler waiting, and its slot taken.
    let tcp = tokio::net::TcpStream::connect(node.process.grpc)
        .await
        .unwrap();
    let (sender, connection) = h2::client::handshake(tcp).await.unwrap();
    tokio::spawn(connection);
    let url = node.process.grpc_url();
    let hold_slot = |sender: h2::client::SendRequest<bytes::Bytes>| {
        let url = url.clone();
        async move {
            let mut sender = sender.ready().await.unwrap();
            let request = http::Request::builder()
                .method("POST")
                .uri(format!("{url}/ringcache.v1.Cache/Get"))
                .header("content-type", "application/grpc")
                .header("te", "trailers")
                .body(())
                .unwrap();
            let (response, mut body) = sender.send_request(request, false).unwrap();
            // Half a gRPC frame: the message never completes.
            body.send_data(bytes::Bytes::from_static(&[0, 0, 0, 0, 9, 10]), false)
                .unwrap();
            (response, body)
        }
    };
    let mut held = hold_slot(sender.clone()).await;

    let mut cache = node.cache().await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let shed = loop {
        match cache.get(GetRequest { key: "a".into() }).await {
            Err(s) if s.code() == tonic::Code::ResourceExhausted => break s,
            other => assert!(
                tokio::time::Instant::now() < deadline,
                "not shed within 10s: {other:?}"
            ),
        }
        // The held request may have reached the server while our Get had
        // the slot, and been refused itself: its answer has come. Hold the
        // slot again with a new one.
        if tokio::time::timeout(Duration::ZERO, &mut held.0)
            .await
            .is_ok()
        {
            held = hold_slot(sender.clone()).await;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(
        shed.message().contains("--max-in-flight"),
        "{}",
        shed.message()
    );
    // Clients tell "shed, retry" from "too large" by the ErrorInfo.
    assert_eq!(
        tonic_types::StatusExt::get_details_error_info(&shed)
            .map(|i| i.reason)
            .as_deref(),
        Some(ringcache_proto::exhausted::OVERLOADED),
        "{shed:?}"
    );
    for service in ["", "ringcache.v1.Cache"] {
        assert_eq!(
            health(&node.process.grpc_url(), service).await.unwrap(),
            ServingStatus::Serving,
            "health of {service:?} while shedding"
        );
    }
    // Reflection too (grpcurl must keep working on a busy node).
    let listed = integration_tests::tools::grpcurl(&["-plaintext", &node.addr(), "list"], None);
    assert!(listed.stdout.contains("ringcache.v1.Cache"), "{listed:?}");
    // Still shedding, so the checks above were made at the limit.
    let again = cache.get(GetRequest { key: "a".into() }).await.unwrap_err();
    assert_eq!(again.code(), tonic::Code::ResourceExhausted);
    drop(held);
}

/// Memory held by calls is bounded too: with a request holding most of
/// `--max-in-flight-bytes` (a large body still arriving), a call that would
/// take the count past it is refused with a status naming the flag; probes
/// still answer; once the large call is gone, calls run again.
#[tokio::test]
async fn calls_beyond_the_in_flight_byte_budget_are_refused_and_probes_still_answer() {
    let node = NodeProcess::start(&[
        "--max-value-bytes",
        "512KiB",
        "--max-message-bytes",
        "1MiB",
        "--max-in-flight-bytes",
        "1MiB",
        "--request-timeout",
        "60s",
    ])
    .await;
    let tcp = tokio::net::TcpStream::connect(node.process.grpc)
        .await
        .unwrap();
    let (sender, connection) = h2::client::Builder::new()
        .initial_window_size(4 << 20)
        .initial_connection_window_size(4 << 20)
        .handshake::<_, bytes::Bytes>(tcp)
        .await
        .unwrap();
    tokio::spawn(connection);
    let mut sender = sender.ready().await.unwrap();
    let request = http::Request::builder()
        .method("POST")
        .uri(format!(
            "{}/ringcache.v1.Cache/SetMany",
            node.process.grpc_url()
        ))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(())
        .unwrap();
    let (_response, mut body) = sender.send_request(request, false).unwrap();
    // A frame announcing 1 MiB, of which 900 KB arrive, and never the rest.
    let mut frame = vec![0u8, 0, 0x10, 0, 0];
    frame.extend(std::iter::repeat_n(0u8, 900_000));
    body.reserve_capacity(frame.len());
    body.send_data(bytes::Bytes::from(frame), false).unwrap();
    // Wait until the node counts it (its budget gauge): otherwise the
    // Sets below could be counted first and make the *large* call the one
    // refused. (Flow control cannot tell: the frame fits in the node's
    // initial window, so it is sent before the node reads any of it.)
    eventually(Duration::from_secs(30), || async {
        let page = node.process.scrape().await;
        match metric_value(&page, "ringcache_in_flight_bytes", &[]) {
            Some(held) if held >= 900_000.0 => Ok(()),
            other => Err(format!("the node holds {other:?} bytes of the large call")),
        }
    })
    .await;

    let mut cache = node.cache().await;
    let big = SetRequest {
        key: "big".into(),
        value: vec![7u8; 300_000].into(),
        ..Default::default()
    };
    // (Generous waits: on a loaded machine the large body may take a while
    // to arrive, and it must stay counted meanwhile: --request-timeout
    // 60s below.)
    let refused = eventually(Duration::from_secs(30), || {
        let mut cache = cache.clone();
        let big = big.clone();
        async move {
            match cache.set(big).await {
                Err(s) if s.code() == tonic::Code::ResourceExhausted => Ok(s),
                other => Err(format!("not refused yet: {other:?}")),
            }
        }
    })
    .await;
    assert!(
        refused.message().contains("--max-in-flight-bytes"),
        "{}",
        refused.message()
    );
    assert_eq!(
        tonic_types::StatusExt::get_details_error_info(&refused)
            .map(|i| i.reason)
            .as_deref(),
        Some(ringcache_proto::exhausted::OVERLOADED),
        "{refused:?}"
    );
    assert_eq!(
        health(&node.process.grpc_url(), "ringcache.v1.Cache")
            .await
            .unwrap(),
        ServingStatus::Serving,
        "probes are not counted"
    );
    // The node lost nothing and recovers once the large call is gone.
    drop(body);
    drop(_response);
    eventually(Duration::from_secs(30), || {
        let mut cache = cache.clone();
        let big = big.clone();
        async move { cache.set(big).await.map_err(|s| s.to_string()) }
    })
    .await;
    let got = cache
        .get(GetRequest { key: "big".into() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got.value.len(), 300_000);
}

/// Capacity alerts read evictions: overwriting or deleting a key on a
/// nearly empty node is not one, in `Node/Stats` or in `/metrics`.
#[tokio::test]
async fn overwrites_and_deletes_are_not_counted_as_evictions() {
    let node = NodeProcess::start(&[]).await;
    let mut c = node.cache().await;
    for v in [b"one", b"two", b"333"] {
        c.set(set("k", v)).await.unwrap();
    }
    c.delete(DeleteRequest {
        key: "k".into(),
        ..Default::default()
    })
    .await
    .unwrap();
    let total = node
        .node()
        .await
        .stats(StatsRequest {})
        .await
        .unwrap()
        .into_inner()
        .total
        .unwrap();
    assert_eq!(
        (total.evictions, total.overwrites, total.deletes),
        (0, 2, 1),
        "{total:?}"
    );
    let page = node.process.scrape().await;
    for (name, want) in [
        ("ringcache_store_evictions_total", 0.0),
        ("ringcache_store_overwrites_total", 2.0),
        ("ringcache_store_deletes_total", 1.0),
    ] {
        assert_eq!(metric_value(&page, name, &[]), Some(want), "{name}");
    }
}

/// A configuration error at start-up is one line on stderr naming the
/// flag, and exit status 1 — not a stack trace, even with
/// `RUST_BACKTRACE=1` (as many shells and CI systems set it).
#[test]
fn a_configuration_error_is_one_clear_line() {
    for (bin, args, says) in [
        ("orchestrator", &["--nodes", ""][..], "--nodes"),
        (
            "orchestrator",
            &["--nodes", "a:1", "--replicas", "0"][..],
            "--replicas",
        ),
        ("cache-node", &["--capacity", "10"][..], "--capacity"),
        (
            "cache-node",
            &[
                "--tls-cert",
                "/nonexistent/cert.pem",
                "--tls-key",
                "/nonexistent/key.pem",
                "--listen",
                "127.0.0.1:0",
                "--metrics-listen",
                "127.0.0.1:0",
            ][..],
            "--tls-cert",
        ),
    ] {
        let out = std::process::Command::new(integration_tests::binary(bin))
            .args(args)
            .env("RUST_BACKTRACE", "1")
            .env("NO_COLOR", "1")
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(1), "{bin} {args:?}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
        let last = lines.last().copied().unwrap_or_default();
        assert!(
            last.starts_with(&format!("{bin}: error: ")) && last.contains(says),
            "{bin} {args:?}: {stderr}"
        );
        assert!(
            !stderr.contains("backtrace") && !stderr.contains("panicked"),
            "{bin} {args:?}: {stderr}"
        );
        // At most the structured log line of the failure besides it.
        assert!(lines.len() <= 2, "{bin} {args:?}: {stderr}");
    }
}
