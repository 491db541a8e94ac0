//! The Go example service (`examples/go-http-service`, built with the `go`
//! command) in front of a real cluster, exporting to the real Jaeger: one
//! HTTP request is one trace across three services, and its
//! delete-on-update path never serves an old value.

// Test code: a failed expectation should panic with its message.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{
    net::TcpListener,
    path::PathBuf,
    process::{Child, Command, Stdio},
    sync::OnceLock,
    time::Duration,
};

use integration_tests::{TestCluster, eventually, jaeger::Jaeger, tools::go_build};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Builds the example once per test process.
fn example_binary() -> PathBuf {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    BUILT
        .get_or_init(|| go_build("examples/go-http-service", ".", "go-http-service"))
        .clone()
}

/// The example service, killed when dropped.
struct Service {
    child: Child,
    addr: String,
}

impl Drop for Service {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Service {
    async fn start(orchestrator: &str, jaeger: &Jaeger) -> Self {
        Self::start_with_delay(orchestrator, jaeger, "20ms").await
    }

    /// With each database query taking `delay`.
    async fn start_with_delay(orchestrator: &str, jaeger: &Jaeger, delay: &str) -> Self {
        Self::start_with(orchestrator, jaeger, &["-source-delay", delay]).await
    }

    /// With `args` added.
    async fn start_with(orchestrator: &str, jaeger: &Jaeger, args: &[&str]) -> Self {
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let addr = format!("127.0.0.1:{port}");
        let child = Command::new(example_binary())
            .args(["-listen", &addr, "-ringcache", orchestrator])
            .args(args)
            .env("OTEL_EXPORTER_OTLP_ENDPOINT", &jaeger.otlp_grpc)
            .env("OTEL_BSP_SCHEDULE_DELAY", "100")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start the example");
        let service = Service { child, addr };
        eventually(Duration::from_secs(30), || async {
            match http(&service.addr, "GET", "/healthz", &[], "").await {
                Ok((200, _, _)) => Ok(()),
                other => Err(format!("{other:?}")),
            }
        })
        .await;
        service
    }
}

/// One HTTP/1.1 request: (status, headers, body).
async fn http(
    addr: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> Result<(u16, Vec<(String, String)>, String), String> {
    let mut stream = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| e.to_string())?;
    let mut request = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        request.push_str(&format!("{k}: {v}\r\n"));
    }
    request.push_str("\r\n");
    request.push_str(body);
    stream
        .write_all(request.as_bytes())
        .await
        .map_err(|e| e.to_string())?;
    let mut response = String::new();
    stream
        .read_to_string(&mut response)
        .await
        .map_err(|e| e.to_string())?;
    let (head, body) = response
        .split_once("\r\n\r\n")
        .ok_or_else(|| format!("no header end: {response}"))?;
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("no status: {head}"))?;
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    Ok((status, headers, body.to_owned()))
}

fn header<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
}

async fn cluster(jaeger: &Jaeger) -> TestCluster {
    let env = [
        ("OTEL_EXPORTER_OTLP_ENDPOINT", jaeger.otlp_grpc.as_str()),
        ("OTEL_BSP_SCHEDULE_DELAY", "100"),
    ];
    TestCluster::start_with_env(3, &[], &[], &env).await
}

/// The span id of the caller [`traced_hit`] makes its requests as.
const CALLER: &str = "10f067aa0ba902b7";

/// Creates product p1, a teapot, through the service (it writes it through
/// to the cache).
async fn create_teapot(service: &Service) {
    let (status, _, body) = http(
        &service.addr,
        "POST",
        "/products",
        &[],
        r#"{"id":"p1","name":"teapot","price":12.5}"#,
    )
    .await
    .unwrap();
    assert_eq!(status, 201, "{body}");
}

/// `GET /products/p1` in the trace `trace_id` (as [`CALLER`]'s child),
/// which must be a cache hit; answers the body.
async fn traced_hit(service: &Service, trace_id: &str) -> String {
    let traceparent = format!("00-{trace_id}-{CALLER}-01");
    let (status, headers, body) = http(
        &service.addr,
        "GET",
        "/products/p1",
        &[("traceparent", &traceparent)],
        "",
    )
    .await
    .unwrap();
    assert_eq!(status, 200, "{body}");
    assert_eq!(header(&headers, "x-cache"), Some("hit"));
    body
}

#[tokio::test]
async fn an_http_request_is_one_trace_across_three_services() {
    let jaeger = Jaeger::start().await;
    let cluster = cluster(&jaeger).await;
    let service = Service::start(&cluster.orchestrator.addr(), &jaeger).await;

    create_teapot(&service).await;

    // A read that hits (the POST wrote through), in a trace of our own.
    let trace_id = "5bf92f3577b34da6a3ce929d0e0e4736";
    let body = traced_hit(&service, trace_id).await;
    let product: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(product["name"], "teapot");

    // HTTP SERVER → gRPC CLIENT (Go) → orchestrator SERVER → CLIENT →
    // cache-node SERVER: five spans, three services.
    let trace = jaeger.trace(trace_id, 5).await;
    let http_servers = trace.spans("go-http-service", "server");
    assert_eq!(http_servers.len(), 1, "{trace:#?}");
    let http_span = http_servers[0];
    assert_eq!(http_span.parent.as_deref(), Some(CALLER), "{trace:#?}");
    assert_eq!(http_span.name, "GET /products/{id}");
    let go_clients = trace.spans("go-http-service", "client");
    assert_eq!(go_clients.len(), 1, "one cache call for a hit: {trace:#?}");
    let go_client = go_clients[0];
    assert_eq!(go_client.parent.as_deref(), Some(http_span.id.as_str()));
    assert_eq!(go_client.name, "ringcache.v1.Cache/Get");
    // otelgrpc follows the newer RPC conventions (rpc.system.name).
    assert_eq!(
        go_client.tag("rpc.system.name").as_deref(),
        Some("grpc"),
        "{go_client:#?}"
    );

    let orchestrator = trace.spans("orchestrator", "server");
    assert_eq!(orchestrator.len(), 1, "{trace:#?}");
    assert_eq!(
        orchestrator[0].parent.as_deref(),
        Some(go_client.id.as_str()),
        "the orchestrator continues the Go client's span"
    );
    assert_eq!(orchestrator[0].name, "ringcache.v1.Cache/Get");
    let node_calls = trace.spans("orchestrator", "client");
    assert_eq!(node_calls.len(), 1, "{trace:#?}");
    assert_eq!(
        node_calls[0].parent.as_deref(),
        Some(orchestrator[0].id.as_str())
    );
    let node = trace.spans("cache-node", "server");
    assert_eq!(node.len(), 1, "{trace:#?}");
    assert_eq!(node[0].parent.as_deref(), Some(node_calls[0].id.as_str()));
    assert_eq!(node[0].tag("ringcache.hit").as_deref(), Some("true"));
}

/// With a near cache (direct mode), a read is one trace from the HTTP
/// request straight to the owner node — the Go client's span continued by
/// the node's, no orchestrator — or answered in the Go service's memory
/// with no span below the Go client's.
#[tokio::test]
async fn in_direct_mode_a_read_is_one_trace_from_the_go_service_to_the_owner_node() {
    let jaeger = Jaeger::start().await;
    let cluster = cluster(&jaeger).await;
    let service = Service::start_with(
        &cluster.orchestrator.addr(),
        &jaeger,
        &["-source-delay", "20ms", "-near-cache-bytes", "1048576"],
    )
    .await;
    create_teapot(&service).await;

    // Until the client follows every node's feed its reads go through the
    // orchestrator; read, each in a trace of its own, until one read went
    // to the owner node and one was answered from the near cache.
    let (mut direct, mut near) = (None, None);
    for i in 0..200u32 {
        let trace_id = format!("5bf92f3577b34da6a3ce929d{i:08x}");
        traced_hit(&service, &trace_id).await;
        let trace = jaeger.trace(&trace_id, 2).await;
        let go_clients = trace.spans("go-http-service", "client");
        assert_eq!(go_clients.len(), 1, "one cache call for a hit: {trace:#?}");
        match go_clients[0].tag("ringcache.route").as_deref() {
            Some("direct") if direct.is_none() => direct = Some(trace_id),
            Some("near-cache") if near.is_none() => near = Some(trace_id),
            Some("direct" | "near-cache" | "orchestrator") => {}
            other => panic!("ringcache.route {other:?}: {trace:#?}"),
        }
        if direct.is_some() && near.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let direct = direct.expect("a read went straight to the owner node");
    let near = near.expect("a read was answered from the near cache");

    // HTTP SERVER → Go CLIENT → cache-node SERVER.
    let trace = jaeger.trace(&direct, 3).await;
    let http_span = trace.spans("go-http-service", "server")[0];
    let go_client = trace.spans("go-http-service", "client")[0];
    assert_eq!(go_client.parent.as_deref(), Some(http_span.id.as_str()));
    assert_eq!(go_client.name, "ringcache.v1.Cache/Get");
    let node = trace.spans("cache-node", "server");
    assert_eq!(node.len(), 1, "{trace:#?}");
    assert_eq!(
        node[0].parent.as_deref(),
        Some(go_client.id.as_str()),
        "the node continues the Go client's span"
    );
    assert_eq!(node[0].tag("ringcache.hit").as_deref(), Some("true"));
    assert!(
        trace.spans.iter().all(|s| s.service != "orchestrator"),
        "a direct read does not pass the orchestrator: {trace:#?}"
    );

    // A near-cache hit: nothing below the Go client's span, even once every
    // exporter has flushed (a later traced call's spans are in Jaeger).
    let (status, _, _) = http(
        &service.addr,
        "PUT",
        "/products/p1",
        &[(
            "traceparent",
            "00-5bf92f3577b34da6a3ce929dffffffff-10f067aa0ba902b7-01",
        )],
        r#"{"name":"teapot","price":9.9}"#,
    )
    .await
    .unwrap();
    assert_eq!(status, 200);
    jaeger.trace("5bf92f3577b34da6a3ce929dffffffff", 5).await;
    let trace = jaeger.trace(&near, 2).await;
    assert_eq!(trace.spans.len(), 2, "{trace:#?}");
}

/// Updates delete the cached copy: after each PUT is answered, a GET
/// answers the new revision, never an older one — also while other
/// clients keep reading (and refilling) the product.
#[tokio::test]
async fn delete_on_update_never_serves_the_old_value() {
    let jaeger = Jaeger::start().await;
    let cluster = cluster(&jaeger).await;
    let service = Service::start(&cluster.orchestrator.addr(), &jaeger).await;
    let addr = service.addr.clone();
    let (status, _, _) = http(
        &addr,
        "POST",
        "/products",
        &[],
        r#"{"id":"p2","name":"v0","price":1}"#,
    )
    .await
    .unwrap();
    assert_eq!(status, 201);

    // Readers that keep the product in the cache (misses refill it).
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let readers: Vec<_> = (0..4)
        .map(|_| {
            let (addr, stop) = (addr.clone(), stop.clone());
            tokio::spawn(async move {
                let mut reads = 0u32;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let (status, _, _) = http(&addr, "GET", "/products/p2", &[], "").await.unwrap();
                    assert_eq!(status, 200);
                    reads += 1;
                }
                reads
            })
        })
        .collect();

    let mut misses = 0;
    for i in 1..=30u64 {
        let body = format!(r#"{{"name":"v{i}","price":{i}}}"#);
        let (status, _, answer) = http(&addr, "PUT", "/products/p2", &[], &body)
            .await
            .unwrap();
        assert_eq!(status, 200, "{answer}");
        let updated: Value = serde_json::from_str(&answer).unwrap();
        let revision = updated["revision"].as_u64().unwrap();
        for _ in 0..3 {
            let (status, headers, body) =
                http(&addr, "GET", "/products/p2", &[], "").await.unwrap();
            assert_eq!(status, 200);
            let p: Value = serde_json::from_str(&body).unwrap();
            assert!(
                p["revision"].as_u64().unwrap() >= revision,
                "update {i} (revision {revision}) answered, then served {body} ({:?})",
                header(&headers, "x-cache")
            );
            assert_eq!(p["name"], format!("v{i}"));
            if header(&headers, "x-cache") == Some("miss") {
                misses += 1;
            }
        }
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut reads = 0;
    for r in readers {
        reads += r.await.unwrap();
    }
    assert!(reads > 30, "the readers ran: {reads}");
    assert!(misses > 0, "updates emptied the cache at least once");
}

/// SIGTERM while requests are in flight (each database query takes
/// 800 ms): the example finishes them — with its cache client still open —
/// before it exits, so a deploy answers every request it accepted.
#[tokio::test]
async fn sigterm_lets_the_requests_in_flight_finish() {
    let jaeger = Jaeger::start().await;
    let cluster = cluster(&jaeger).await;
    let mut service =
        Service::start_with_delay(&cluster.orchestrator.addr(), &jaeger, "800ms").await;
    let addr = service.addr.clone();
    let (status, _, body) = http(
        &addr,
        "POST",
        "/products",
        &[],
        r#"{"id":"p3","name":"v0","price":1}"#,
    )
    .await
    .unwrap();
    assert_eq!(status, 201, "{body}");
    let update = tokio::spawn({
        let addr = addr.clone();
        async move {
            http(
                &addr,
                "PUT",
                "/products/p3",
                &[],
                r#"{"name":"v1","price":2}"#,
            )
            .await
        }
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    let pid = service.child.id().to_string();
    let term = Command::new("kill").args(["-TERM", &pid]).status().unwrap();
    assert!(term.success());
    let (status, _, body) = update.await.unwrap().unwrap();
    assert_eq!(status, 200, "the update in flight at SIGTERM: {body}");
    // Then it exits by itself.
    let mut exited = None;
    for _ in 0..200 {
        if let Ok(Some(s)) = service.child.try_wait() {
            exited = Some(s);
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(exited.is_some_and(|s| s.success()), "{exited:?}");
}
