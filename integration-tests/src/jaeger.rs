//! A real Jaeger v2 (all-in-one, in-memory storage), built from its Go
//! module by `scripts/install-tools.sh jaeger`, on free ports of 127.0.0.1,
//! and a reader for its HTTP query API.

use std::{
    net::TcpListener,
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::Duration,
};

use serde_json::Value;

use crate::{eventually, tools::tool};

/// A running Jaeger, killed when dropped.
#[derive(Debug)]
pub struct Jaeger {
    child: Child,
    /// OTLP over gRPC: `http://127.0.0.1:port`.
    pub otlp_grpc: String,
    /// OTLP over HTTP: `http://127.0.0.1:port`.
    pub otlp_http: String,
    /// The query API: `127.0.0.1:port`.
    pub query: String,
    _dir: TempDir,
}

/// A directory removed when dropped.
#[derive(Debug)]
struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A port that was free a moment ago. (Jaeger takes ports from its config
/// file, so it cannot be handed an open socket.)
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

impl Jaeger {
    /// Starts Jaeger and waits until its query API answers.
    ///
    /// The ports are picked free a moment before Jaeger binds them, so
    /// another process can take one in between: a Jaeger that exits is
    /// started again on fresh ports (three tries). Under load (tests run
    /// in parallel on two cores) startup can take a while: each try waits
    /// up to 60 s.
    pub async fn start() -> Self {
        let mut failures = Vec::new();
        for _ in 0..3 {
            match Self::try_start().await {
                Ok(jaeger) => return jaeger,
                Err(why) => failures.push(why),
            }
        }
        panic!("jaeger did not start: {failures:#?}");
    }

    async fn try_start() -> Result<Self, String> {
        let binary = tool("jaeger");
        let (grpc, http, query, query_grpc) = (free_port(), free_port(), free_port(), free_port());
        let dir =
            std::env::temp_dir().join(format!("ringcache-jaeger-{}-{grpc}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let config = dir.join("config.yaml");
        std::fs::write(
            &config,
            format!(
                r#"service:
  extensions: [jaeger_storage, jaeger_query]
  pipelines:
    traces:
      receivers: [otlp]
      processors: [batch]
      exporters: [jaeger_storage_exporter]
  telemetry:
    metrics:
      level: none
    logs:
      level: warn
extensions:
  jaeger_query:
    storage:
      traces: memstore
    http:
      endpoint: 127.0.0.1:{query}
    grpc:
      endpoint: 127.0.0.1:{query_grpc}
  jaeger_storage:
    backends:
      memstore:
        memory:
          max_traces: 10000
receivers:
  otlp:
    protocols:
      grpc:
        endpoint: 127.0.0.1:{grpc}
      http:
        endpoint: 127.0.0.1:{http}
processors:
  batch:
    timeout: 100ms
exporters:
  jaeger_storage_exporter:
    trace_storage: memstore
"#
            ),
        )
        .expect("write jaeger config");
        let log = dir.join("jaeger.log");
        let child = Command::new(binary)
            .arg("--config")
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).map_or_else(|_| Stdio::null(), Stdio::from))
            .spawn()
            .expect("start jaeger");
        let mut jaeger = Jaeger {
            child,
            otlp_grpc: format!("http://127.0.0.1:{grpc}"),
            otlp_http: format!("http://127.0.0.1:{http}"),
            query: format!("127.0.0.1:{query}"),
            _dir: TempDir(dir),
        };
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        loop {
            if http_get(&jaeger.query, "/api/services").await.is_ok() {
                return Ok(jaeger);
            }
            let exited = jaeger.child.try_wait().ok().flatten();
            if exited.is_some() || std::time::Instant::now() >= deadline {
                let _ = jaeger.child.kill();
                let logs = std::fs::read_to_string(&log).unwrap_or_default();
                return Err(format!(
                    "{} (exit: {exited:?}); its log:\n{logs}",
                    if exited.is_some() {
                        "exited"
                    } else {
                        "no answer within 60 s"
                    }
                ));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// `GET path` on the query API, as JSON.
    pub async fn api(&self, path: &str) -> Result<Value, String> {
        http_get(&self.query, path).await
    }

    /// The trace `trace_id` (32 hex digits), once it has at least
    /// `min_spans` spans.
    pub async fn trace(&self, trace_id: &str, min_spans: usize) -> Trace {
        let path = format!("/api/traces/{trace_id}");
        eventually(Duration::from_secs(30), || {
            let path = path.clone();
            async move {
                let v = self.api(&path).await?;
                let trace = v["data"]
                    .as_array()
                    .and_then(|d| d.first())
                    .cloned()
                    .ok_or_else(|| format!("no trace yet: {v}"))?;
                let trace = Trace::from_json(&trace);
                if trace.spans.len() >= min_spans {
                    Ok(trace)
                } else {
                    Err(format!("{} of {min_spans} spans so far", trace.spans.len()))
                }
            }
        })
        .await
    }
}

impl Drop for Jaeger {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One span of a trace, as Jaeger reports it.
#[derive(Debug, Clone)]
pub struct Span {
    /// The span id.
    pub id: String,
    /// The parent span id (`CHILD_OF` reference), if any.
    pub parent: Option<String>,
    /// `service.name` of the process that reported it.
    pub service: String,
    /// The span name.
    pub name: String,
    /// Its attributes (Jaeger "tags"), including `span.kind` and `error`.
    pub tags: serde_json::Map<String, Value>,
    /// The reporting process' resource attributes.
    pub process_tags: serde_json::Map<String, Value>,
}

impl Span {
    /// An attribute as a string (numbers and booleans are rendered).
    pub fn tag(&self, key: &str) -> Option<String> {
        self.tags.get(key).map(|v| match v {
            Value::String(s) => s.clone(),
            other => other.to_string(),
        })
    }
}

/// A trace, as Jaeger reports it.
#[derive(Debug, Clone)]
pub struct Trace {
    /// Every span.
    pub spans: Vec<Span>,
}

fn tag_map(tags: &Value) -> serde_json::Map<String, Value> {
    tags.as_array()
        .into_iter()
        .flatten()
        .filter_map(|t| Some((t["key"].as_str()?.to_owned(), t["value"].clone())))
        .collect()
}

impl Trace {
    fn from_json(v: &Value) -> Self {
        let processes = &v["processes"];
        let spans = v["spans"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|s| {
                let process = &processes[s["processID"].as_str().unwrap_or_default()];
                Span {
                    id: s["spanID"].as_str().unwrap_or_default().to_owned(),
                    parent: s["references"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .find(|r| r["refType"] == "CHILD_OF")
                        .and_then(|r| r["spanID"].as_str())
                        .map(str::to_owned),
                    service: process["serviceName"]
                        .as_str()
                        .unwrap_or_default()
                        .to_owned(),
                    name: s["operationName"].as_str().unwrap_or_default().to_owned(),
                    tags: tag_map(&s["tags"]),
                    process_tags: tag_map(&process["tags"]),
                }
            })
            .collect();
        Trace { spans }
    }

    /// The spans of `service` with `kind` (`server`, `client`).
    pub fn spans(&self, service: &str, kind: &str) -> Vec<&Span> {
        self.spans
            .iter()
            .filter(|s| s.service == service && s.tag("span.kind").as_deref() == Some(kind))
            .collect()
    }

    /// The span with id `id`.
    pub fn span(&self, id: &str) -> Option<&Span> {
        self.spans.iter().find(|s| s.id == id)
    }
}

/// A minimal HTTP/1.1 GET returning JSON (no client library needed).
async fn http_get(addr: &str, path: &str) -> Result<Value, String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| e.to_string())?;
    stream
        .write_all(
            format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await
        .map_err(|e| e.to_string())?;
    let mut response = Vec::new();
    stream
        .read_to_end(&mut response)
        .await
        .map_err(|e| e.to_string())?;
    let response = String::from_utf8_lossy(&response);
    let (head, body) = response
        .split_once("\r\n\r\n")
        .ok_or("malformed response")?;
    if !head.starts_with("HTTP/1.1 200") {
        return Err(format!("{path}: {head}"));
    }
    let body = if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        dechunk(body)
    } else {
        body.to_owned()
    };
    serde_json::from_str(&body).map_err(|e| format!("{path}: {e}: {body}"))
}

/// Decodes a chunked HTTP body.
fn dechunk(mut body: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = body.split_once("\r\n") {
        let Ok(n) = usize::from_str_radix(size.trim(), 16) else {
            break;
        };
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        body = rest[n..].trim_start_matches("\r\n");
    }
    out
}
