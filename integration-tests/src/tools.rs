//! The real command-line tools users drive ringcache with, installed on
//! first use by `scripts/install-tools.sh` (idempotent, cached between
//! runs).

use std::{
    io::Write,
    path::PathBuf,
    process::{Command, Output, Stdio},
    sync::OnceLock,
};

use crate::workspace_root;

/// Installs (if needed) and locates `tool` through
/// `scripts/install-tools.sh`. Panics with the script's output if it
/// cannot: a test that needs grpcurl must fail, not skip, without it.
pub fn tool(tool: &str) -> PathBuf {
    static DIR: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    // One install run per test process covers every tool.
    let dir = DIR.get_or_init(|| {
        let script = workspace_root().join("scripts/install-tools.sh");
        let out = Command::new("bash")
            .arg(&script)
            .output()
            .map_err(|e| format!("cannot run {}: {e}", script.display()))?;
        if !out.status.success() {
            return Err(format!(
                "{} failed: {}\n{}",
                script.display(),
                out.status,
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        let stdout = String::from_utf8_lossy(&out.stdout);
        stdout
            .lines()
            .last()
            .map(|l| PathBuf::from(l.trim()))
            .ok_or_else(|| "install-tools.sh printed no directory".to_owned())
    });
    match dir {
        Ok(dir) => dir.join(tool),
        Err(e) => panic!("{e}"),
    }
}

/// The result of one grpcurl run.
#[derive(Debug)]
pub struct GrpcurlOutput {
    /// Whether grpcurl exited 0.
    pub success: bool,
    /// What it printed on stdout.
    pub stdout: String,
    /// What it printed on stderr (errors, with `Code:` and `Message:`).
    pub stderr: String,
}

impl GrpcurlOutput {
    /// stdout parsed as JSON; panics with both streams if it is not.
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.stdout).unwrap_or_else(|e| {
            panic!(
                "grpcurl output is not JSON ({e}):\nstdout: {}\nstderr: {}",
                self.stdout, self.stderr
            )
        })
    }
}

/// Runs real grpcurl with `args`; with `stdin`, passes it as the request
/// body (use `-d @`).
pub fn grpcurl(args: &[&str], stdin: Option<&str>) -> GrpcurlOutput {
    let mut cmd = Command::new(tool("grpcurl"));
    cmd.args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("grpcurl starts");
    if let Some(input) = stdin {
        let mut pipe = child.stdin.take().expect("stdin is piped");
        pipe.write_all(input.as_bytes())
            .expect("write grpcurl stdin");
    }
    let Output {
        status,
        stdout,
        stderr,
    } = child.wait_with_output().expect("grpcurl runs");
    GrpcurlOutput {
        success: status.success(),
        stdout: String::from_utf8_lossy(&stdout).into_owned(),
        stderr: String::from_utf8_lossy(&stderr).into_owned(),
    }
}

/// Builds the Go package `package` of the module in `module` (a path
/// below the workspace root) with the `go` command, into
/// `target/go/<name>`, and returns the binary's path. Panics if `go` is
/// missing or the build fails.
pub fn go_build(module: &str, package: &str, name: &str) -> PathBuf {
    let root = workspace_root();
    let out = root.join("target/go").join(name);
    let status = Command::new("go")
        .args(["build", "-o"])
        .arg(&out)
        .arg(package)
        .current_dir(root.join(module))
        .env("GOFLAGS", "-buildvcs=false")
        .status()
        .unwrap_or_else(|e| panic!("cannot run go: {e}"));
    assert!(
        status.success(),
        "go build of {module}/{package} failed: {status}"
    );
    out
}
