//! TLS, mutual TLS and bearer tokens, with certificates generated here
//! (rcgen) and driven by the real grpcurl, against the real binaries.

// Test code: a failed expectation should panic with its message.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use integration_tests::{
    NodeProcess, OrchestratorProcess, Process, binary, eventually,
    tools::{GrpcurlOutput, grpcurl},
    workspace_root,
};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
};
use ringcache_proto::v1::{GetRequest, SetRequest, cache_client::CacheClient};
use tonic::transport::{Certificate, Channel, ClientTlsConfig};

/// A directory of PEM files, removed when dropped.
struct Pki {
    dir: PathBuf,
}

impl Drop for Pki {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A CA that signs certificates into a [`Pki`] directory.
struct Ca {
    issuer: Issuer<'static, KeyPair>,
    pem: String,
}

impl Ca {
    fn new(name: &str) -> Self {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        let key = KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        Ca {
            pem: cert.pem(),
            issuer: Issuer::new(params, key),
        }
    }

    /// A certificate for `names`, as (cert PEM, key PEM).
    fn sign(&self, names: &[&str], client: bool, expired: bool) -> (String, String) {
        let mut params =
            CertificateParams::new(names.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>())
                .unwrap();
        params.distinguished_name.push(
            DnType::CommonName,
            names.first().copied().unwrap_or("client"),
        );
        params.extended_key_usages = vec![if client {
            ExtendedKeyUsagePurpose::ClientAuth
        } else {
            ExtendedKeyUsagePurpose::ServerAuth
        }];
        if expired {
            params.not_before = rcgen::date_time_ymd(2020, 1, 1);
            params.not_after = rcgen::date_time_ymd(2021, 1, 1);
        }
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        (cert.pem(), key.serialize_pem())
    }
}

impl Pki {
    fn new() -> Self {
        Pki {
            dir: integration_tests::fresh_temp_dir("pki"),
        }
    }

    fn write(&self, name: &str, contents: &str) -> String {
        let path = self.dir.join(name);
        // Replace atomically, as a Secret volume update does.
        let tmp = self.dir.join(format!(".{name}.tmp"));
        std::fs::write(&tmp, contents).unwrap();
        std::fs::rename(&tmp, &path).unwrap();
        path.to_str().unwrap().to_owned()
    }

    fn path(&self, name: &str) -> String {
        self.dir.join(name).to_str().unwrap().to_owned()
    }
}

/// The `probe` address a server logged in its "serving" line.
fn probe_addr(process: &Process) -> String {
    process
        .logs()
        .iter()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find_map(|v| v.get("probe")?.as_str().map(str::to_owned))
        .expect("a probe address in the serving line")
}

/// A cache node serving TLS with `server` (cert, key) written into `pki`,
/// requiring client certificates from `client_ca` if given.
fn tls_node(pki: &Pki, server: &(String, String), client_ca: Option<&str>) -> Process {
    let cert = pki.write("node.pem", &server.0);
    let key = pki.write("node-key.pem", &server.1);
    let mut args = vec![
        "--tls-cert".to_owned(),
        cert,
        "--tls-key".to_owned(),
        key,
        "--probe-listen".to_owned(),
        "127.0.0.1:0".to_owned(),
    ];
    if let Some(ca) = client_ca {
        args.extend(["--tls-client-ca".to_owned(), pki.write("client-ca.pem", ca)]);
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    Process::start(&binary("cache-node"), &args, &[])
}

/// A node with a certificate for `names` from a new cluster CA, requiring
/// client certificates from it; with the PKI directory, the CA and the
/// CA's PEM file.
fn mutual_tls_node(names: &[&str]) -> (Pki, Ca, String, Process) {
    let pki = Pki::new();
    let ca = Ca::new("cluster CA");
    let ca_pem = pki.write("ca.pem", &ca.pem);
    let node = tls_node(&pki, &ca.sign(names, false, false), Some(&ca.pem));
    (pki, ca, ca_pem, node)
}

fn ok(out: &GrpcurlOutput) {
    assert!(out.success, "grpcurl failed: {}{}", out.stdout, out.stderr);
}

fn refused(out: &GrpcurlOutput, why: &str) {
    assert!(
        !out.success,
        "grpcurl succeeded but should fail ({why}): {}",
        out.stdout
    );
}

fn set_args<'a>(tls: &[&'a str], addr: &'a str) -> Vec<&'a str> {
    let mut args = tls.to_vec();
    args.extend([
        "-d",
        r#"{"key":"secret","value":"c2VjcmV0"}"#,
        addr,
        "ringcache.v1.Cache/Set",
    ]);
    args
}

#[tokio::test]
async fn tls_port_serves_clients_that_trust_its_ca_and_refuses_the_rest() {
    let pki = Pki::new();
    let ca = Ca::new("ringcache test CA");
    let ca_pem = pki.write("ca.pem", &ca.pem);
    let other_ca = pki.write("other-ca.pem", &Ca::new("someone else").pem);
    let node = tls_node(
        &pki,
        &ca.sign(&["localhost", "127.0.0.1"], false, false),
        None,
    );
    let addr = node.grpc.to_string();

    // A client that trusts the CA: Set then Get.
    ok(&grpcurl(&set_args(&["-cacert", &ca_pem], &addr), None));
    let got = grpcurl(
        &[
            "-cacert",
            &ca_pem,
            "-d",
            r#"{"key":"secret"}"#,
            &addr,
            "ringcache.v1.Cache/Get",
        ],
        None,
    );
    ok(&got);
    assert!(got.stdout.contains("c2VjcmV0"), "{}", got.stdout);

    // Plaintext to the TLS port, a CA it does not trust, no CA at all.
    refused(
        &grpcurl(&set_args(&["-plaintext"], &addr), None),
        "plaintext client",
    );
    let wrong = grpcurl(&set_args(&["-cacert", &other_ca], &addr), None);
    refused(&wrong, "wrong CA");
    assert!(
        wrong.stderr.contains("certificate") || wrong.stderr.contains("authority"),
        "{}",
        wrong.stderr
    );

    // The probe port answers health in plaintext, and nothing else.
    let probe = probe_addr(&node);
    let health = grpcurl(
        &[
            "-plaintext",
            "-d",
            r#"{"service":"ringcache.v1.Cache"}"#,
            &probe,
            "grpc.health.v1.Health/Check",
        ],
        None,
    );
    ok(&health);
    assert!(health.stdout.contains("SERVING"), "{}", health.stdout);
    let protos = workspace_root().join("proto");
    let not_there = grpcurl(
        &[
            "-plaintext",
            "-import-path",
            protos.to_str().unwrap(),
            "-proto",
            "ringcache/v1/cache.proto",
            "-d",
            r#"{"key":"secret"}"#,
            &probe,
            "ringcache.v1.Cache/Get",
        ],
        None,
    );
    refused(&not_there, "the probe port serves health only");
    assert!(
        not_there.stderr.contains("Unimplemented"),
        "{}",
        not_there.stderr
    );

    // Failed handshakes are counted.
    let page = node.scrape().await;
    let failures =
        integration_tests::metric_value(&page, "ringcache_tls_handshake_failures_total", &[])
            .unwrap_or(0.0);
    assert!(failures >= 2.0, "{failures}");
}

#[tokio::test]
async fn an_expired_certificate_is_refused_at_the_handshake() {
    let pki = Pki::new();
    let ca = Ca::new("ringcache test CA");
    let ca_pem = pki.write("ca.pem", &ca.pem);
    let node = tls_node(
        &pki,
        &ca.sign(&["localhost", "127.0.0.1"], false, true),
        None,
    );
    let out = grpcurl(
        &set_args(&["-cacert", &ca_pem], &node.grpc.to_string()),
        None,
    );
    refused(&out, "expired server certificate");
    assert!(out.stderr.contains("expired"), "{}", out.stderr);
}

#[tokio::test]
async fn mutual_tls_refuses_clients_without_a_certificate_from_the_cluster_ca() {
    let (pki, ca, ca_pem, node) = mutual_tls_node(&["localhost", "127.0.0.1"]);
    let addr = node.grpc.to_string();
    let (cert, key) = ca.sign(&["orchestrator"], true, false);
    let (cert, key) = (
        pki.write("client.pem", &cert),
        pki.write("client-key.pem", &key),
    );
    let stranger = Ca::new("stranger CA").sign(&["stranger"], true, false);
    let (s_cert, s_key) = (
        pki.write("stranger.pem", &stranger.0),
        pki.write("stranger-key.pem", &stranger.1),
    );

    ok(&grpcurl(
        &set_args(&["-cacert", &ca_pem, "-cert", &cert, "-key", &key], &addr),
        None,
    ));
    refused(
        &grpcurl(&set_args(&["-cacert", &ca_pem], &addr), None),
        "no client certificate",
    );
    refused(
        &grpcurl(
            &set_args(
                &["-cacert", &ca_pem, "-cert", &s_cert, "-key", &s_key],
                &addr,
            ),
            None,
        ),
        "a client certificate from another CA",
    );
}

async fn tls_client(addr: &str, ca_pem: &str) -> CacheClient<Channel> {
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(ca_pem))
        .domain_name("localhost");
    let channel = Channel::from_shared(format!("https://{addr}"))
        .unwrap()
        .tls_config(tls)
        .unwrap()
        .connect()
        .await
        .unwrap();
    CacheClient::new(channel)
}

#[tokio::test]
async fn a_certificate_replaced_on_disk_is_served_to_new_connections_and_old_ones_keep_working() {
    let pki = Pki::new();
    let first = Ca::new("first CA");
    let second = Ca::new("second CA");
    let first_pem = pki.write("first-ca.pem", &first.pem);
    let second_pem = pki.write("second-ca.pem", &second.pem);
    let node = tls_node(
        &pki,
        &first.sign(&["localhost", "127.0.0.1"], false, false),
        None,
    );
    let addr = node.grpc.to_string();

    let mut old = tls_client(&addr, &first.pem).await;
    old.set(SetRequest {
        key: "k".into(),
        value: b"v".to_vec().into(),
        ..Default::default()
    })
    .await
    .unwrap();
    refused(
        &grpcurl(&set_args(&["-cacert", &second_pem], &addr), None),
        "not rotated yet",
    );

    // Rotate: a certificate from another CA, written in place.
    let (cert, key) = second.sign(&["localhost", "127.0.0.1"], false, false);
    pki.write("node-key.pem", &key);
    pki.write("node.pem", &cert);
    eventually(Duration::from_secs(15), || async {
        let out = grpcurl(&set_args(&["-cacert", &second_pem], &addr), None);
        if out.success { Ok(()) } else { Err(out.stderr) }
    })
    .await;
    refused(
        &grpcurl(&set_args(&["-cacert", &first_pem], &addr), None),
        "new connections get the new certificate",
    );
    // The connection opened before the rotation still works.
    let got = old.get(GetRequest { key: "k".into() }).await.unwrap();
    assert_eq!(got.into_inner().value.as_ref(), b"v");
    assert!(
        node.logs()
            .iter()
            .any(|l| l.contains("TLS certificate reloaded")),
        "the reload is logged"
    );
}

const READ: &str = "reader-token-0123456789";
const WRITE: &str = "writer-token-0123456789";
const ADMIN: &str = "admin-token-0123456789ab";

fn with_token<'a>(token: &'a str, header: &'a mut String, args: &[&'a str]) -> Vec<&'a str> {
    *header = format!("authorization: Bearer {token}");
    let mut v = vec!["-plaintext", "-H", header.as_str()];
    v.extend_from_slice(args);
    v
}

fn code_of(out: &GrpcurlOutput) -> &str {
    out.stderr
        .lines()
        .find_map(|l| l.trim().strip_prefix("Code: "))
        .unwrap_or("OK")
}

#[tokio::test]
async fn tokens_and_roles_answer_the_right_status() {
    let node = NodeProcess::start(&[]).await;
    let pki = Pki::new();
    let tokens = pki.write(
        "tokens",
        &format!("# roles\nread {READ}\nwrite {WRITE}\nadmin {ADMIN}\n"),
    );
    let orchestrator =
        OrchestratorProcess::start(&["--nodes", &node.addr(), "--auth-tokens", &tokens]).await;
    let addr = orchestrator.addr();
    let get = [
        "-d",
        r#"{"key":"k"}"#,
        addr.as_str(),
        "ringcache.v1.Cache/Get",
    ];
    let set = [
        "-d",
        r#"{"key":"k","value":"dg=="}"#,
        addr.as_str(),
        "ringcache.v1.Cache/Set",
    ];
    let list = [addr.as_str(), "ringcache.v1.Cluster/ListNodes"];
    let call = |token: Option<&str>, args: &[&str]| {
        let mut header = String::new();
        let out = match token {
            Some(t) => grpcurl(&with_token(t, &mut header, args), None),
            None => {
                let mut v = vec!["-plaintext"];
                v.extend_from_slice(args);
                grpcurl(&v, None)
            }
        };
        code_of(&out).to_owned()
    };
    assert_eq!(call(None, &get), "Unauthenticated");
    assert_eq!(
        call(Some("not-a-token-at-all-xyz"), &get),
        "Unauthenticated"
    );
    assert_eq!(call(Some(READ), &get), "OK");
    assert_eq!(call(Some(READ), &set), "PermissionDenied");
    assert_eq!(call(Some(WRITE), &set), "OK");
    assert_eq!(call(Some(WRITE), &list), "PermissionDenied");
    assert_eq!(call(Some(ADMIN), &list), "OK");
    // Probes need no token.
    let health = grpcurl(&["-plaintext", &addr, "grpc.health.v1.Health/Check"], None);
    ok(&health);

    // A token added to the file works without a restart; one removed stops.
    let new = "added-later-0123456789";
    pki.write("tokens", &format!("admin {ADMIN}\nwrite {new}\n"));
    eventually(Duration::from_secs(15), || async {
        match call(Some(new), &set).as_str() {
            "OK" => Ok(()),
            other => Err(other.to_owned()),
        }
    })
    .await;
    assert_eq!(call(Some(WRITE), &set), "Unauthenticated", "revoked");
    // No log line carries a token.
    for line in orchestrator.process.logs() {
        assert!(
            !line.contains("token-0123456789") && !line.contains(new),
            "{line}"
        );
    }
}

#[test]
fn a_server_refuses_to_start_with_unusable_tls_files() {
    let pki = Pki::new();
    let ca = Ca::new("ca");
    let (cert, _) = ca.sign(&["localhost"], false, false);
    let (_, other_key) = ca.sign(&["localhost"], false, false);
    let cert = pki.write("cert.pem", &cert);
    let key = pki.write("key.pem", &other_key);
    let out = std::process::Command::new(binary("cache-node"))
        .args(["--listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0"])
        .args(["--tls-cert", &cert, "--tls-key", &key])
        .output()
        .unwrap();
    assert!(
        !out.status.success(),
        "a key that does not match its certificate"
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("--tls-cert"), "{stderr}");
    let missing = pki.path("missing.pem");
    let out = std::process::Command::new(binary("cache-node"))
        .args(["--listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0"])
        .args(["--tls-cert", &missing, "--tls-key", &key])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("missing.pem"),
        "names the file"
    );
    let _ = Path::new(&missing);
}

/// A node that requires client certificates from the cluster CA, and an
/// orchestrator that presents one (and checks the node's): a working
/// cluster. The same orchestrator without its certificate, or checking the
/// wrong name, reaches no node.
#[tokio::test]
async fn an_orchestrator_with_mutual_tls_routes_to_nodes_that_require_it() {
    let (pki, ca, ca_pem, node) = mutual_tls_node(&["cache-node.internal", "127.0.0.1"]);
    let (cert, key) = ca.sign(&["orchestrator"], true, false);
    let (cert, key) = (
        pki.write("orch.pem", &cert),
        pki.write("orch-key.pem", &key),
    );
    let nodes = node.grpc.to_string();

    let orchestrator = OrchestratorProcess::start(&[
        "--nodes",
        &nodes,
        "--node-tls-ca",
        &ca_pem,
        "--node-tls-cert",
        &cert,
        "--node-tls-key",
        &key,
        "--node-tls-server-name",
        "cache-node.internal",
    ])
    .await;
    let mut cache = orchestrator.cache().await;
    cache
        .set(SetRequest {
            key: "k".into(),
            value: b"over mTLS".to_vec().into(),
            ..Default::default()
        })
        .await
        .unwrap();
    let got = cache.get(GetRequest { key: "k".into() }).await.unwrap();
    assert_eq!(got.into_inner().value.as_ref(), b"over mTLS");

    // Without a client certificate, and checking a name the node's
    // certificate does not carry: never ready, calls fail.
    for extra in [
        vec!["--node-tls-ca", ca_pem.as_str()],
        vec![
            "--node-tls-ca",
            ca_pem.as_str(),
            "--node-tls-cert",
            cert.as_str(),
            "--node-tls-key",
            key.as_str(),
            "--node-tls-server-name",
            "someone-else.internal",
        ],
    ] {
        let mut args = vec!["--nodes", nodes.as_str(), "--health-interval", "200ms"];
        args.extend(extra.iter().copied());
        let process = Process::start(&binary("orchestrator"), &args, &[]);
        // Wait until health checks have failed twice: the node was tried,
        // and refused, over the secure channel.
        let api = ringcache_proto::v1::cluster_client::ClusterClient::new(process.channel().await);
        integration_tests::wait_for_nodes(&api, Duration::from_secs(10), |nodes| {
            nodes.iter().all(|n| n.consecutive_failures >= 2)
        })
        .await;
        let status = integration_tests::health(&process.grpc_url(), "ringcache.v1.Cache").await;
        assert!(
            matches!(
                status,
                Ok(tonic_health::pb::health_check_response::ServingStatus::NotServing)
            ),
            "{extra:?}: {status:?}"
        );
        let mut cache = CacheClient::new(process.channel().await);
        let err = cache
            .get(GetRequest { key: "k".into() })
            .await
            .expect_err("no node is reachable");
        assert_eq!(err.code(), tonic::Code::Unavailable, "{err:?}");
    }
}

/// TLS on every hop — client to orchestrator, orchestrator to node with
/// client certificates — and one call is still one trace across both
/// services in Jaeger.
#[tokio::test]
async fn traces_stay_whole_with_tls_on_every_hop() {
    let jaeger = integration_tests::jaeger::Jaeger::start().await;
    let env = [
        ("OTEL_EXPORTER_OTLP_ENDPOINT", jaeger.otlp_grpc.as_str()),
        ("OTEL_BSP_SCHEDULE_DELAY", "100"),
    ];
    let pki = Pki::new();
    let ca = Ca::new("cluster CA");
    let ca_pem = pki.write("ca.pem", &ca.pem);
    let (node_cert, node_key) = ca.sign(&["localhost", "127.0.0.1"], false, false);
    let (node_cert, node_key) = (
        pki.write("node.pem", &node_cert),
        pki.write("node-key.pem", &node_key),
    );
    let node = Process::start(
        &binary("cache-node"),
        &[
            "--tls-cert",
            &node_cert,
            "--tls-key",
            &node_key,
            "--tls-client-ca",
            &ca_pem,
        ],
        &env,
    );
    let (cert, key) = ca.sign(&["orchestrator"], true, false);
    let (cert, key) = (
        pki.write("orch.pem", &cert),
        pki.write("orch-key.pem", &key),
    );
    let nodes = node.grpc.to_string();
    let orchestrator = Process::start(
        &binary("orchestrator"),
        &[
            "--nodes",
            &nodes,
            "--node-tls-ca",
            &ca_pem,
            "--node-tls-cert",
            &cert,
            "--node-tls-key",
            &key,
            "--tls-cert",
            &node_cert,
            "--tls-key",
            &node_key,
            "--probe-listen",
            "127.0.0.1:0",
        ],
        &env,
    );
    let probe = format!("http://{}", probe_addr(&orchestrator));
    eventually(Duration::from_secs(20), || async {
        match integration_tests::health(&probe, "ringcache.v1.Cache").await {
            Ok(tonic_health::pb::health_check_response::ServingStatus::Serving) => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
    let mut cache = tls_client(&orchestrator.grpc.to_string(), &ca.pem).await;
    let trace_id = "6bf92f3577b34da6a3ce929d0e0e4736";
    let mut request = tonic::Request::new(SetRequest {
        key: "traced".into(),
        value: b"v".to_vec().into(),
        ..Default::default()
    });
    request.metadata_mut().insert(
        "traceparent",
        format!("00-{trace_id}-20f067aa0ba902b7-01")
            .parse()
            .unwrap(),
    );
    cache.set(request).await.unwrap();
    let trace = jaeger.trace(trace_id, 3).await;
    let server = trace.spans("orchestrator", "server");
    assert_eq!(server.len(), 1, "{trace:#?}");
    assert_eq!(server[0].parent.as_deref(), Some("20f067aa0ba902b7"));
    let client = trace.spans("orchestrator", "client");
    assert_eq!(client.len(), 1, "{trace:#?}");
    assert_eq!(client[0].parent.as_deref(), Some(server[0].id.as_str()));
    let node_span = trace.spans("cache-node", "server");
    assert_eq!(node_span.len(), 1, "{trace:#?}");
    assert_eq!(node_span[0].parent.as_deref(), Some(client[0].id.as_str()));
}

/// Direct mode with security on every hop: the Rust client reaches the
/// orchestrator over TLS with a token, and the nodes — which require client
/// certificates from the cluster CA — over mutual TLS with its own
/// certificate. A client without one is refused by the nodes and reads
/// through the orchestrator instead, correctly; one without a token is
/// refused by the orchestrator.
#[tokio::test]
async fn direct_reads_reach_the_nodes_over_mutual_tls_and_the_orchestrator_with_a_token() {
    let pki = Pki::new();
    let ca = Ca::new("cluster CA");
    let ca_pem = pki.write("ca.pem", &ca.pem);
    let node_names = ["localhost", "127.0.0.1"];
    // Each node its own directory: a node reloads its files when they
    // change.
    let nodes: Vec<(Pki, Process)> = (0..2)
        .map(|_| {
            let dir = Pki::new();
            let node = tls_node(&dir, &ca.sign(&node_names, false, false), Some(&ca.pem));
            (dir, node)
        })
        .collect();
    let list = nodes
        .iter()
        .map(|(_, n)| n.grpc.to_string())
        .collect::<Vec<_>>()
        .join(",");
    let (orch_client_cert, orch_client_key) = ca.sign(&["orchestrator"], true, false);
    let (orch_cert, orch_key) = ca.sign(&node_names, false, false);
    let tokens = pki.write("tokens", &format!("read {READ}\nwrite {WRITE}\n"));
    let orchestrator = Process::start(
        &binary("orchestrator"),
        &[
            "--nodes",
            &list,
            "--replicas",
            "2",
            "--node-tls-ca",
            &ca_pem,
            "--node-tls-cert",
            &pki.write("orch-client.pem", &orch_client_cert),
            "--node-tls-key",
            &pki.write("orch-client-key.pem", &orch_client_key),
            "--tls-cert",
            &pki.write("orch.pem", &orch_cert),
            "--tls-key",
            &pki.write("orch-key.pem", &orch_key),
            "--auth-tokens",
            &tokens,
            "--health-interval",
            "100ms",
        ],
        &[],
    );
    let url = format!("https://{}", orchestrator.grpc);
    let (app_cert, app_key) = ca.sign(&["app"], true, false);
    let client = |identity: bool, token: Option<&str>| {
        let mut b = ringcache_client::Client::builder(url.clone())
            .tls_ca(&ca.pem)
            .direct(true)
            .timeout(Duration::from_secs(3));
        if identity {
            b = b.tls_identity(&app_cert, &app_key);
        }
        if let Some(t) = token {
            b = b.token(t);
        }
        b.connect()
    };

    let app = client(true, Some(WRITE)).await.unwrap();
    app.set("k", "over mTLS, directly").await.unwrap();
    eventually(Duration::from_secs(20), || async {
        let got = app.get("k").await.map_err(|e| e.to_string())?;
        assert_eq!(
            got.map(|e| e.value),
            Some(bytes::Bytes::from_static(b"over mTLS, directly"))
        );
        let stats = app.direct_stats();
        if stats.direct > 0 {
            Ok(())
        } else {
            Err(format!("no read went directly yet: {stats:?}"))
        }
    })
    .await;

    // No client certificate: the nodes refuse the handshake, so every read
    // goes through the orchestrator — and is answered.
    let anonymous = client(false, Some(READ)).await.unwrap();
    for _ in 0..20 {
        let got = anonymous.get("k").await.unwrap().map(|e| e.value);
        assert_eq!(got, Some(bytes::Bytes::from_static(b"over mTLS, directly")));
    }
    assert_eq!(
        anonymous.direct_stats().direct,
        0,
        "{:?}",
        anonymous.direct_stats()
    );

    // No token: the orchestrator refuses the client's calls.
    let tokenless = client(true, None).await.unwrap();
    let err = tokenless.get("k").await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unauthenticated, "{err}");
    drop(nodes);
}
