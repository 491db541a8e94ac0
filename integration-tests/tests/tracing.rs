//! One request, one trace, across both services — read back from a real
//! Jaeger v2.

// Test code: a failed expectation should panic with its message.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashSet;

use integration_tests::{
    TestCluster,
    jaeger::{Jaeger, Trace},
    tools::grpcurl,
};
use ringcache_proto::v1::{GetManyRequest, GetRequest, LocateRequest, SetRequest};
use tonic::metadata::MetadataValue;

/// Environment that makes every process export to `jaeger` quickly.
fn otel_env(jaeger: &Jaeger) -> Vec<(&'static str, String)> {
    vec![
        ("OTEL_EXPORTER_OTLP_ENDPOINT", jaeger.otlp_grpc.clone()),
        // Export every 100 ms instead of every 5 s, so the test is quick.
        ("OTEL_BSP_SCHEDULE_DELAY", "100".to_owned()),
    ]
}

async fn cluster(jaeger: &Jaeger, nodes: usize, args: &[&str]) -> TestCluster {
    let env = otel_env(jaeger);
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    TestCluster::start_with_env(nodes, &[], args, &env).await
}

/// A request carrying a `traceparent` of our own.
fn traced<T>(message: T, trace_id: &str, parent: &str) -> tonic::Request<T> {
    let mut r = tonic::Request::new(message);
    let value: MetadataValue<_> = format!("00-{trace_id}-{parent}-01").parse().unwrap();
    r.metadata_mut().insert("traceparent", value);
    r
}

/// Checks the chain caller → orchestrator SERVER → orchestrator CLIENT(s) →
/// cache-node SERVER(s) for one call of `method`, and the semantic
/// convention attributes on the way. Returns the node SERVER spans.
fn assert_chain<'t>(
    trace: &'t Trace,
    caller_span: &str,
    method: &str,
) -> Vec<&'t integration_tests::jaeger::Span> {
    let services: HashSet<&str> = trace.spans.iter().map(|s| s.service.as_str()).collect();
    assert_eq!(
        services,
        HashSet::from(["orchestrator", "cache-node"]),
        "{trace:#?}"
    );

    let servers = trace.spans("orchestrator", "server");
    assert_eq!(servers.len(), 1, "{trace:#?}");
    let root = servers[0];
    assert_eq!(
        root.parent.as_deref(),
        Some(caller_span),
        "continues the caller's trace"
    );
    assert_eq!(root.name, format!("ringcache.v1.Cache/{method}"));
    assert_eq!(root.tag("rpc.system").as_deref(), Some("grpc"));
    assert_eq!(
        root.tag("rpc.service").as_deref(),
        Some("ringcache.v1.Cache")
    );
    assert_eq!(root.tag("rpc.method").as_deref(), Some(method));
    assert!(
        root.process_tags.contains_key("service.instance.id"),
        "{:?}",
        root.process_tags
    );

    let clients = trace.spans("orchestrator", "client");
    assert!(!clients.is_empty());
    for c in &clients {
        assert_eq!(
            c.parent.as_deref(),
            Some(root.id.as_str()),
            "client spans hang off the server span"
        );
        assert_eq!(c.tag("rpc.system").as_deref(), Some("grpc"));
        assert_eq!(c.tag("server.address").as_deref(), Some("127.0.0.1"));
        assert!(
            c.tag("server.port")
                .is_some_and(|p| p.parse::<u16>().is_ok_and(|p| p > 0))
        );
        assert!(c.tag("ringcache.node").is_some());
    }
    let client_ids: HashSet<&str> = clients.iter().map(|c| c.id.as_str()).collect();
    let node_servers = trace.spans("cache-node", "server");
    assert_eq!(
        node_servers.len(),
        clients.len(),
        "one node span per node call"
    );
    for n in &node_servers {
        assert!(
            client_ids.contains(n.parent.as_deref().unwrap_or_default()),
            "node span's parent is a client span"
        );
        assert_eq!(n.tag("rpc.grpc.status_code").as_deref(), Some("0"));
    }
    node_servers
}

#[tokio::test]
async fn a_call_through_the_orchestrator_is_one_trace_across_both_services() {
    let jaeger = Jaeger::start().await;
    let cluster = cluster(&jaeger, 3, &[]).await;
    let mut cache = cluster.orchestrator.cache().await;

    // A Set, then a Get that hits.
    let set_trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    cache
        .set(traced(
            SetRequest {
                key: "traced".into(),
                value: b"hello".to_vec().into(),
                ..Default::default()
            },
            set_trace,
            "00f067aa0ba902b7",
        ))
        .await
        .unwrap();
    let get_trace = "4bf92f3577b34da6a3ce929d0e0e4737";
    let got = cache
        .get(traced(
            GetRequest {
                key: "traced".into(),
            },
            get_trace,
            "00f067aa0ba902b8",
        ))
        .await
        .unwrap()
        .into_inner();
    assert!(got.found);

    let trace = jaeger.trace(set_trace, 3).await;
    let node = assert_chain(&trace, "00f067aa0ba902b7", "Set");
    let services = jaeger.api("/api/services").await.unwrap();
    let services: HashSet<&str> = services["data"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|s| s.as_str())
        .collect();
    assert_eq!(services, HashSet::from(["orchestrator", "cache-node"]));
    assert_eq!(node[0].tag("ringcache.value_bytes").as_deref(), Some("5"));

    let trace = jaeger.trace(get_trace, 3).await;
    let node = assert_chain(&trace, "00f067aa0ba902b8", "Get");
    assert_eq!(
        node[0].tag("ringcache.hit").as_deref(),
        Some("true"),
        "{:?}",
        node[0].tags
    );
    assert!(node[0].tag("ringcache.shard").is_some());
    assert_eq!(node[0].tag("ringcache.value_bytes").as_deref(), Some("5"));
    // Never the key or the value.
    for span in &trace.spans {
        for v in span.tags.values() {
            assert!(
                !v.to_string().contains("traced") && !v.to_string().contains("hello"),
                "{span:?}"
            );
        }
    }

    // A GetMany that crosses nodes: one CLIENT span and one node span per
    // node that owns some of the keys.
    let keys: Vec<String> = (0..30).map(|i| format!("many-{i}")).collect();
    let mut api = cluster.orchestrator.cluster().await;
    let mut owners = HashSet::new();
    for k in &keys {
        let l = api
            .locate(LocateRequest { key: k.clone() })
            .await
            .unwrap()
            .into_inner();
        owners.insert(l.owners[0].address.clone());
    }
    assert!(owners.len() > 1, "the keys span several nodes");
    let many_trace = "4bf92f3577b34da6a3ce929d0e0e4738";
    cache
        .get_many(traced(
            GetManyRequest { keys },
            many_trace,
            "00f067aa0ba902b9",
        ))
        .await
        .unwrap();
    let trace = jaeger.trace(many_trace, 1 + 2 * owners.len()).await;
    let node_spans = assert_chain(&trace, "00f067aa0ba902b9", "GetMany");
    assert_eq!(node_spans.len(), owners.len());
    let called: HashSet<String> = trace
        .spans("orchestrator", "client")
        .iter()
        .map(|c| {
            format!(
                "{}:{}",
                c.tag("server.address").unwrap(),
                c.tag("server.port").unwrap()
            )
        })
        .collect();
    assert_eq!(called, owners, "one client span per owning node");
    let total_keys: i64 = node_spans
        .iter()
        .map(|s| s.tag("ringcache.keys").unwrap().parse::<i64>().unwrap())
        .sum();
    assert_eq!(total_keys, 30);
}

#[tokio::test]
async fn grpcurl_joins_the_callers_trace() {
    let jaeger = Jaeger::start().await;
    let cluster = cluster(&jaeger, 2, &[]).await;
    let trace_id = "5bf92f3577b34da6a3ce929d0e0e4736";
    let out = grpcurl(
        &[
            "-plaintext",
            "-H",
            &format!("traceparent: 00-{trace_id}-10f067aa0ba902b7-01"),
            "-d",
            r#"{"key":"from-grpcurl","value":"aGk="}"#,
            &cluster.orchestrator.addr(),
            "ringcache.v1.Cache/Set",
        ],
        None,
    );
    assert!(out.success, "{}", out.stderr);
    let trace = jaeger.trace(trace_id, 3).await;
    assert_chain(&trace, "10f067aa0ba902b7", "Set");
}

#[tokio::test]
async fn a_failing_call_is_marked_as_an_error() {
    let jaeger = Jaeger::start().await;
    let mut cluster = cluster(&jaeger, 2, &["--eject-after", "1000000"]).await;
    cluster.kill_node(0);
    cluster.kill_node(1);
    let mut cache = cluster.orchestrator.cache().await;
    let trace_id = "6bf92f3577b34da6a3ce929d0e0e4736";
    let status = cache
        .get(traced(
            GetRequest { key: "k".into() },
            trace_id,
            "20f067aa0ba902b7",
        ))
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unavailable);
    // The server span and a client span per node tried (the owner, then the
    // fallback), all errors.
    let trace = jaeger.trace(trace_id, 3).await;
    let server = trace.spans("orchestrator", "server");
    assert_eq!(server.len(), 1);
    assert_eq!(
        server[0].tag("error").as_deref(),
        Some("true"),
        "{:?}",
        server[0].tags
    );
    assert_eq!(server[0].tag("rpc.grpc.status_code").as_deref(), Some("14"));
    let clients = trace.spans("orchestrator", "client");
    assert_eq!(
        clients.len(),
        2,
        "the first owner and the fallback each have a span"
    );
    for c in clients {
        assert_eq!(c.tag("error").as_deref(), Some("true"), "{:?}", c.tags);
        assert_eq!(c.tag("rpc.grpc.status_code").as_deref(), Some("14"));
    }
}

#[tokio::test]
async fn http_protobuf_export_and_an_endpoint_without_a_scheme_work_too() {
    let jaeger = Jaeger::start().await;
    let endpoint = jaeger.otlp_http.trim_start_matches("http://").to_owned();
    let env = [
        ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str()),
        ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf"),
        ("OTEL_BSP_SCHEDULE_DELAY", "100"),
        ("OTEL_RESOURCE_ATTRIBUTES", "service.instance.id=replica-7"),
    ];
    let cluster = TestCluster::start_with_env(1, &[], &[], &env).await;
    let mut cache = cluster.orchestrator.cache().await;
    let trace_id = "7bf92f3577b34da6a3ce929d0e0e4736";
    cache
        .get(traced(
            GetRequest { key: "k".into() },
            trace_id,
            "30f067aa0ba902b7",
        ))
        .await
        .unwrap();
    let trace = jaeger.trace(trace_id, 3).await;
    assert_chain(&trace, "30f067aa0ba902b7", "Get");
    for span in &trace.spans {
        assert_eq!(
            span.process_tags
                .get("service.instance.id")
                .and_then(|v| v.as_str()),
            Some("replica-7"),
            "OTEL_RESOURCE_ATTRIBUTES wins over the default"
        );
    }
}

#[tokio::test]
async fn a_collector_that_is_down_costs_no_request_anything() {
    // Nothing listens on this port: every export fails.
    let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let endpoint = format!("http://{}", dead.local_addr().unwrap());
    drop(dead);
    let env = [
        ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str()),
        ("OTEL_BSP_SCHEDULE_DELAY", "50"),
    ];
    let cluster = TestCluster::start_with_env(2, &[], &[], &env).await;
    let mut cache = cluster.orchestrator.cache().await;
    for i in 0..300 {
        let key = format!("k{i}");
        cache
            .set(SetRequest {
                key: key.clone(),
                value: b"v".to_vec().into(),
                ..Default::default()
            })
            .await
            .expect("calls succeed while the collector is down");
        assert!(
            cache
                .get(GetRequest { key })
                .await
                .unwrap()
                .into_inner()
                .found
        );
    }
    // Both processes are still serving, and shut down cleanly (flushing
    // gives up on the dead collector instead of hanging).
    let mut cluster = cluster;
    let status = cluster
        .orchestrator
        .process
        .terminate(std::time::Duration::from_secs(20));
    assert!(status.success(), "{status}");
    let node = cluster.nodes[0].as_mut().unwrap();
    let status = node.process.terminate(std::time::Duration::from_secs(20));
    assert!(status.success(), "{status}");
}

#[tokio::test]
async fn unsampled_requests_record_nothing_anywhere_and_pass_their_decision_on() {
    let jaeger = Jaeger::start().await;
    let endpoint = jaeger.otlp_grpc.clone();
    // New traces are never sampled; callers' decisions are followed.
    let env = [
        ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str()),
        ("OTEL_BSP_SCHEDULE_DELAY", "100"),
        ("OTEL_TRACES_SAMPLER", "parentbased_traceidratio"),
        ("OTEL_TRACES_SAMPLER_ARG", "0"),
    ];
    let cluster = TestCluster::start_with_env(2, &[], &[], &env).await;
    let mut cache = cluster.orchestrator.cache().await;
    // Not sampled by the caller (flags 00), and no caller at all.
    let unsampled = "8bf92f3577b34da6a3ce929d0e0e4736";
    let mut r = tonic::Request::new(GetRequest { key: "k".into() });
    r.metadata_mut().insert(
        "traceparent",
        format!("00-{unsampled}-40f067aa0ba902b7-00")
            .parse()
            .unwrap(),
    );
    cache.get(r).await.unwrap();
    for i in 0..20 {
        cache
            .get(GetRequest {
                key: format!("root-{i}"),
            })
            .await
            .unwrap();
    }
    // Sampled by the caller: recorded end to end, node span included.
    let sampled = "9bf92f3577b34da6a3ce929d0e0e4736";
    cache
        .get(traced(
            GetRequest { key: "k".into() },
            sampled,
            "50f067aa0ba902b7",
        ))
        .await
        .unwrap();
    let trace = jaeger.trace(sampled, 3).await;
    assert_chain(&trace, "50f067aa0ba902b7", "Get");
    // Exported after the unsampled calls, so had those been recorded they
    // would be in Jaeger by now: they are not, in either service.
    assert!(
        jaeger
            .api(&format!("/api/traces/{unsampled}"))
            .await
            .is_err()
    );
    let traces = jaeger
        .api("/api/traces?service=cache-node&limit=100")
        .await
        .unwrap();
    let count = traces["data"].as_array().map_or(0, Vec::len);
    assert_eq!(
        count, 1,
        "only the sampled call reached the node's traces: {traces}"
    );
}

/// A call that runs out of time is still counted and traced, as
/// DEADLINE_EXCEEDED: its node is frozen (SIGSTOP), so the orchestrator's
/// call to it never answers and the client's deadline passes.
#[tokio::test]
async fn a_call_that_runs_out_of_time_is_counted_and_traced_as_deadline_exceeded() {
    let jaeger = Jaeger::start().await;
    let cluster = cluster(&jaeger, 1, &["--node-timeout", "5s"]).await;
    let mut cache = cluster.orchestrator.cache().await;
    let node = cluster.nodes[0].as_ref().unwrap();
    node.process.signal("STOP");
    let trace_id = "4bf92f3577b34da6a3ce929d0e0e4740";
    let mut request = traced(
        GetRequest {
            key: "frozen".into(),
        },
        trace_id,
        "00f067aa0ba902c0",
    );
    request.set_timeout(std::time::Duration::from_millis(300));
    let status = cache.get(request).await.unwrap_err();
    node.process.signal("CONT");
    // The client's own timer may fire a moment before the answer arrives.
    assert!(
        matches!(
            status.code(),
            tonic::Code::DeadlineExceeded | tonic::Code::Cancelled
        ),
        "{status:?}"
    );

    let trace = jaeger.trace(trace_id, 2).await;
    let server = trace.spans("orchestrator", "server");
    assert_eq!(server.len(), 1, "{trace:#?}");
    assert_eq!(
        server[0].tag("rpc.grpc.status_code").as_deref(),
        Some("4"),
        "{:?}",
        server[0].tags
    );
    assert_eq!(server[0].tag("error").as_deref(), Some("true"));
    let client = trace.spans("orchestrator", "client");
    assert_eq!(client.len(), 1, "{trace:#?}");
    assert_eq!(client[0].tag("rpc.grpc.status_code").as_deref(), Some("4"));

    let page = cluster.orchestrator.process.scrape().await;
    let counted = integration_tests::metric_value(
        &page,
        "grpc_server_handled_total",
        &["grpc_method=\"Get\"", "grpc_code=\"DeadlineExceeded\""],
    );
    assert_eq!(counted, Some(1.0), "{page}");
    // Not the node's fault: it stays healthy in the orchestrator's eyes.
    let failures = integration_tests::metric_value(
        &page,
        "ringcache_node_ejections_total",
        &[&format!("node=\"{}\"", cluster.node_addrs[0])],
    );
    assert_eq!(failures.unwrap_or(0.0), 0.0);
}

/// A read that hot-key relief answers is one orchestrator SERVER span,
/// marked `ringcache.relieved_keys`, with no node call under it.
#[tokio::test]
async fn a_relieved_read_is_marked_on_its_span_and_calls_no_node() {
    let jaeger = Jaeger::start().await;
    let cluster = cluster(
        &jaeger,
        3,
        &[
            "--hot-key-window",
            "200ms",
            "--hot-key-threshold",
            "50",
            "--hot-key-ttl",
            "60s",
        ],
    )
    .await;
    let mut cache = cluster.orchestrator.cache().await;
    cache
        .set(SetRequest {
            key: "celebrity".into(),
            value: b"v".to_vec().into(),
            ..Default::default()
        })
        .await
        .unwrap();
    let api = cluster.orchestrator.cluster().await;
    integration_tests::eventually(std::time::Duration::from_secs(20), || {
        let (mut cache, mut api) = (cache.clone(), api.clone());
        async move {
            for _ in 0..100 {
                let key = "celebrity".into();
                cache.get(GetRequest { key }).await.unwrap();
            }
            let hot = api
                .hot_keys(ringcache_proto::v1::HotKeysRequest { limit: 1 })
                .await
                .unwrap()
                .into_inner();
            match hot.keys.first() {
                Some(k) if k.relieved => Ok(()),
                _ => Err(hot),
            }
        }
    })
    .await;
    // This read fills the near cache if the last ones did not.
    cache
        .get(GetRequest {
            key: "celebrity".into(),
        })
        .await
        .unwrap();
    let relieved_trace = "4bf92f3577b34da6a3ce929d0e0e4739";
    let got = cache
        .get(traced(
            GetRequest {
                key: "celebrity".into(),
            },
            relieved_trace,
            "00f067aa0ba902ba",
        ))
        .await
        .unwrap()
        .into_inner();
    assert!(got.found);
    jaeger.trace(relieved_trace, 1).await;
    // A later traced call that does reach a node (a write): once its node
    // span is in Jaeger, any node span of the relieved read, exported
    // before it by the same processes, would be too.
    let marker_trace = "4bf92f3577b34da6a3ce929d0e0e473a";
    cache
        .set(traced(
            SetRequest {
                key: "marker".into(),
                value: b"m".to_vec().into(),
                ..Default::default()
            },
            marker_trace,
            "00f067aa0ba902bb",
        ))
        .await
        .unwrap();
    let marker = jaeger.trace(marker_trace, 3).await;
    assert_eq!(marker.spans("cache-node", "server").len(), 1, "{marker:#?}");
    let trace = jaeger.trace(relieved_trace, 1).await;
    let servers = trace.spans("orchestrator", "server");
    assert_eq!(servers.len(), 1, "{trace:#?}");
    assert_eq!(
        servers[0].tag("ringcache.relieved_keys").as_deref(),
        Some("1"),
        "{trace:#?}"
    );
    assert!(
        trace.spans("orchestrator", "client").is_empty(),
        "{trace:#?}"
    );
    assert!(trace.spans("cache-node", "server").is_empty(), "{trace:#?}");
}

/// A pipelined op carrying its own `traceparent` is one trace, as its
/// unary call would be: orchestrator SERVER span for the op → CLIENT →
/// node SERVER. The stream itself starts no trace.
#[tokio::test]
async fn a_pipelined_op_is_one_trace_across_both_services() {
    use ringcache_proto::v1::{PipelineRequest, pipeline_request::Op};
    let jaeger = Jaeger::start().await;
    let cluster = cluster(&jaeger, 2, &[]).await;
    let mut cache = cluster.orchestrator.cache().await;
    let (tx, rx) = tokio::sync::mpsc::channel(8);
    let mut answers = cache
        .pipeline(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    let trace_id = "4bf92f3577b34da6a3ce929d0e0e4750";
    let op = |id: u64, op: Op, parent: &str| PipelineRequest {
        id,
        op: Some(op),
        traceparent: format!("00-{trace_id}-{parent}-01"),
        ..Default::default()
    };
    tx.send(op(
        1,
        Op::Set(SetRequest {
            key: "piped".into(),
            value: b"v".to_vec().into(),
            ..Default::default()
        }),
        "00f067aa0ba902c1",
    ))
    .await
    .unwrap();
    assert_eq!(answers.message().await.unwrap().unwrap().id, 1);
    let get_trace = "4bf92f3577b34da6a3ce929d0e0e4751";
    tx.send(PipelineRequest {
        id: 2,
        op: Some(Op::Get(GetRequest {
            key: "piped".into(),
        })),
        traceparent: format!("00-{get_trace}-00f067aa0ba902c2-01"),
        ..Default::default()
    })
    .await
    .unwrap();
    assert_eq!(answers.message().await.unwrap().unwrap().id, 2);

    let trace = jaeger.trace(trace_id, 3).await;
    assert_chain(&trace, "00f067aa0ba902c1", "Set");
    let trace = jaeger.trace(get_trace, 3).await;
    let node = assert_chain(&trace, "00f067aa0ba902c2", "Get");
    assert_eq!(node[0].tag("ringcache.hit").as_deref(), Some("true"));
}
