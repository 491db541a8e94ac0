//! Bearer-token authentication with roles.
//!
//! Tokens come from a file (`--auth-tokens`, typically a mounted Secret),
//! one `<role> <token>` pair per line, `#` starting a comment; roles are
//! `read`, `write` and `admin`, each allowing what the one before does
//! plus more. The file is re-read when it changes ([`crate::reload`]), so
//! a token is added or revoked without a restart; a change that does not
//! parse is logged and the previous tokens stay.
//!
//! [`AuthLayer`] checks the `authorization: Bearer <token>` metadata of
//! every call against the role its method needs ([`Policy`]): missing or
//! unknown token → `UNAUTHENTICATED`, a role too weak → `PERMISSION_DENIED`.
//! Tokens are compared in constant time, and never logged or echoed.
//! Health checks and reflection need no token: probes must answer, and the
//! schema is not a secret.

use std::{
    path::{Path, PathBuf},
    sync::Arc,
    task::{Context, Poll},
};

use futures::future::{Either, Ready, ready};
use subtle::ConstantTimeEq;
use tower::{Layer, Service};

use crate::{limits::is_probe, reload::Reloading};

/// What a token may do; each role includes the ones before it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Role {
    /// Reads: `Get`, `GetMany`, `Exists`.
    Read,
    /// Reads and writes: every `ringcache.v1.Cache` method.
    Write,
    /// Everything, including `ringcache.v1.Cluster` and the node services.
    Admin,
}

impl Role {
    fn name(self) -> &'static str {
        match self {
            Role::Read => "read",
            Role::Write => "write",
            Role::Admin => "admin",
        }
    }
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// The path of `ringcache.v1.Cache/Pipeline`.
pub const PIPELINE_PATH: &str = "/ringcache.v1.Cache/Pipeline";

/// The role of an authenticated caller, in the request extensions of every
/// call [`AuthLayer`] admitted with a token: a handler that runs several
/// operations in one call (`Pipeline`) checks each against it. Absent when
/// authentication is off.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Caller {
    /// The role of the caller's token.
    pub role: Role,
}

impl Caller {
    /// The refusal for this caller calling `path` (as its own call would
    /// be refused), if any.
    pub fn refusal(&self, path: &str) -> Option<tonic::Status> {
        let need = ringcache_policy(path)?;
        (self.role < need).then(|| {
            tonic::Status::permission_denied(format!(
                "a {} token may not call {path}: it needs the {need} role",
                self.role
            ))
        })
    }
}

/// The role a gRPC method (`/package.Service/Method`) needs; `None`: no
/// token at all (probes). Unknown methods need `admin`.
pub type Policy = fn(&str) -> Option<Role>;

/// The policy of the `ringcache.v1.Cache` API (both binaries) and of the
/// operator APIs (`Cluster`, and on nodes `Node` and `Internal`): reads
/// and what direct clients follow need `read`, other cache calls `write`,
/// everything else `admin`.
pub fn ringcache_policy(path: &str) -> Option<Role> {
    if is_probe(path) {
        return None;
    }
    Some(match path {
        "/ringcache.v1.Cache/Get"
        | "/ringcache.v1.Cache/GetMany"
        | "/ringcache.v1.Cache/Exists" => Role::Read,
        // Opened with any data token; each op is checked against the role
        // of its unary call (see `crate::pipeline`).
        PIPELINE_PATH => Role::Read,
        // What a client that routes itself follows (direct mode): the
        // topology, and the nodes' change feeds and debt records, which
        // name keys but carry no values.
        "/ringcache.v1.Cluster/WatchTopology"
        | "/ringcache.v1.Internal/Changes"
        | "/ringcache.v1.Internal/Debts" => Role::Read,
        p if p.starts_with("/ringcache.v1.Cache/") => Role::Write,
        _ => Role::Admin,
    })
}

/// Why a token file was refused.
#[derive(Debug, thiserror::Error)]
#[error("--auth-tokens {path}: {message}")]
pub struct TokenFileError {
    path: PathBuf,
    message: String,
}

/// A set of tokens and their roles.
#[derive(Default)]
pub struct Tokens(Vec<(Role, Box<[u8]>)>);

impl std::fmt::Debug for Tokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the tokens themselves.
        write!(f, "Tokens({} entries)", self.0.len())
    }
}

impl Tokens {
    /// Parses a token file's text (see the module documentation). Line
    /// numbers, never tokens, appear in errors.
    pub fn parse(text: &str) -> Result<Self, String> {
        let mut tokens = Vec::new();
        for (n, line) in text.lines().enumerate() {
            let line = line.split('#').next().unwrap_or_default().trim();
            if line.is_empty() {
                continue;
            }
            let mut words = line.split_whitespace();
            let (Some(role), Some(token), None) = (words.next(), words.next(), words.next()) else {
                return Err(format!(
                    "line {}: expected `<role> <token>` (two words)",
                    n + 1
                ));
            };
            let role = match role {
                "read" => Role::Read,
                "write" => Role::Write,
                "admin" => Role::Admin,
                other => {
                    return Err(format!(
                        "line {}: unknown role {other:?} (read, write or admin)",
                        n + 1
                    ));
                }
            };
            if token.len() < 16 {
                return Err(format!(
                    "line {}: a token must be at least 16 characters",
                    n + 1
                ));
            }
            tokens.push((role, token.as_bytes().into()));
        }
        if tokens.is_empty() {
            return Err("no tokens (every call would be refused)".to_owned());
        }
        Ok(Tokens(tokens))
    }

    /// The role of `presented`, comparing it with every known token in
    /// constant time.
    pub fn role_of(&self, presented: &[u8]) -> Option<Role> {
        let mut found = None;
        for (role, token) in &self.0 {
            if bool::from(token.as_ref().ct_eq(presented)) {
                found = found.max(Some(*role));
            }
        }
        found
    }
}

fn read_tokens(path: &Path) -> Result<Tokens, TokenFileError> {
    let error = |message: String| TokenFileError {
        path: path.to_owned(),
        message,
    };
    let bytes = std::fs::read(path).map_err(|e| error(e.to_string()))?;
    let text = std::str::from_utf8(&bytes).map_err(|_| error("not UTF-8 text".to_owned()))?;
    Tokens::parse(text).map_err(error)
}

/// Tokens that follow their file; see the module documentation.
pub type ReloadingTokens = Reloading<Tokens, TokenFileError>;

/// Loads the token file at `path`, to follow it; fails if it does not
/// parse (a server must not start open when it was asked to
/// authenticate).
pub fn load_tokens(path: PathBuf) -> Result<Arc<ReloadingTokens>, TokenFileError> {
    let files = vec![path.clone()];
    Reloading::new("auth tokens", files, move || read_tokens(&path))
}

/// The layer checking tokens; see the module documentation.
#[derive(Debug, Clone)]
pub struct AuthLayer {
    tokens: Arc<ReloadingTokens>,
    policy: Policy,
}

impl AuthLayer {
    /// Checks calls against `tokens` with `policy`.
    pub fn new(tokens: Arc<ReloadingTokens>, policy: Policy) -> Self {
        Self { tokens, policy }
    }
}

impl<S> Layer<S> for AuthLayer {
    type Service = Auth<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Auth {
            inner,
            tokens: self.tokens.clone(),
            policy: self.policy,
        }
    }
}

/// The service made by [`AuthLayer`].
#[derive(Debug, Clone)]
pub struct Auth<S> {
    inner: S,
    tokens: Arc<ReloadingTokens>,
    policy: Policy,
}

/// The token of an `authorization: Bearer <token>` header.
fn bearer(headers: &http::HeaderMap) -> Option<&[u8]> {
    let value = headers.get(http::header::AUTHORIZATION)?.as_bytes();
    let (scheme, token) = value.split_at_checked(7)?;
    scheme
        .eq_ignore_ascii_case(b"bearer ")
        .then(|| token.trim_ascii())
        .filter(|t| !t.is_empty())
}

impl<S> Auth<S> {
    /// The refusal for a call to `path` carrying `headers`, if any, or the
    /// caller's role (`None`: a call that needs no token).
    fn check(
        &self,
        path: &str,
        headers: &http::HeaderMap,
    ) -> Result<Option<Caller>, tonic::Status> {
        let Some(need) = (self.policy)(path) else {
            return Ok(None);
        };
        let Some(token) = bearer(headers) else {
            return Err(tonic::Status::unauthenticated(
                "missing credentials: send `authorization: Bearer <token>` metadata",
            ));
        };
        match self.tokens.with(|t| t.role_of(token)) {
            None => Err(tonic::Status::unauthenticated("unknown bearer token")),
            Some(role) if role < need => Err(tonic::Status::permission_denied(format!(
                "a {role} token may not call {path}: it needs the {need} role"
            ))),
            Some(role) => Ok(Some(Caller { role })),
        }
    }
}

impl<S, B, RB> Service<http::Request<B>> for Auth<S>
where
    S: Service<http::Request<B>, Response = http::Response<RB>>,
    RB: Default,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Either<S::Future, Ready<Result<S::Response, S::Error>>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: http::Request<B>) -> Self::Future {
        match self.check(req.uri().path(), req.headers()) {
            Ok(caller) => {
                if let Some(caller) = caller {
                    req.extensions_mut().insert(caller);
                }
                Either::Left(self.inner.call(req))
            }
            Err(status) => Either::Right(ready(Ok(status.into_http()))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const READER: &str = "r-0123456789abcdef";
    const WRITER: &str = "w-0123456789abcdef";
    const ADMIN: &str = "a-0123456789abcdef";

    fn tokens_file(text: &str) -> (PathBuf, Arc<ReloadingTokens>) {
        let path = std::env::temp_dir().join(format!(
            "ringcache-tokens-{}-{}",
            std::process::id(),
            text.len()
        ));
        std::fs::write(&path, text).unwrap_or_else(|e| panic!("{e}"));
        let tokens = load_tokens(path.clone()).unwrap_or_else(|e| panic!("{e}"));
        (path, tokens)
    }

    fn auth(tokens: Arc<ReloadingTokens>) -> Auth<()> {
        Auth {
            inner: (),
            tokens,
            policy: ringcache_policy,
        }
    }

    fn headers(value: &str) -> http::HeaderMap {
        let mut h = http::HeaderMap::new();
        h.insert(
            http::header::AUTHORIZATION,
            http::HeaderValue::from_str(value).unwrap_or_else(|e| panic!("{e}")),
        );
        h
    }

    #[test]
    fn roles_allow_what_they_should_and_refuse_the_rest_with_the_right_code() {
        let (path, tokens) = tokens_file(&format!(
            "# comment\nread {READER}\nwrite {WRITER}   # trailing comment\n\nadmin {ADMIN}\n"
        ));
        let a = auth(tokens);
        let code = |path: &str, token: Option<&str>| {
            let h = token.map_or_else(http::HeaderMap::new, |t| headers(&format!("Bearer {t}")));
            a.check(path, &h).err().map(|s| s.code())
        };
        use tonic::Code::{PermissionDenied, Unauthenticated};
        let get = "/ringcache.v1.Cache/Get";
        let set = "/ringcache.v1.Cache/Set";
        let cluster = "/ringcache.v1.Cluster/ListNodes";
        assert_eq!(code(get, None), Some(Unauthenticated));
        assert_eq!(
            code(get, Some("nope-nope-nope-nope")),
            Some(Unauthenticated)
        );
        assert_eq!(code(get, Some(READER)), None);
        assert_eq!(code(set, Some(READER)), Some(PermissionDenied));
        assert_eq!(code(set, Some(WRITER)), None);
        assert_eq!(code(cluster, Some(WRITER)), Some(PermissionDenied));
        assert_eq!(code(cluster, Some(ADMIN)), None);
        assert_eq!(
            code("/ringcache.v1.Internal/Apply", Some(WRITER)),
            Some(PermissionDenied)
        );
        assert_eq!(
            code("/grpc.health.v1.Health/Check", None),
            None,
            "probes need nothing"
        );
        assert_eq!(
            code(
                "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
                None
            ),
            None
        );
        assert_eq!(
            code("/unknown.Service/M", Some(WRITER)),
            Some(PermissionDenied)
        );
        // The scheme is case-insensitive; a token never shows in a message.
        assert_eq!(
            a.check(get, &headers(&format!("bearer {READER}"))).ok(),
            Some(Some(Caller { role: Role::Read }))
        );
        let refused = a.check(set, &headers(&format!("Bearer {READER}")));
        assert!(!refused.is_err_and(|s| s.message().contains(READER)));
        // A pipeline opens with a read token; its ops are checked one by one.
        assert_eq!(code(PIPELINE_PATH, Some(READER)), None);
        let reader = Caller { role: Role::Read };
        assert!(reader.refusal(get).is_none());
        assert_eq!(
            reader.refusal(set).map(|s| s.code()),
            Some(PermissionDenied)
        );
        assert!(Caller { role: Role::Write }.refusal(set).is_none());
        // What a direct client follows needs a read token; the rest of the
        // internal API stays the orchestrators'.
        for followed in [
            "/ringcache.v1.Cluster/WatchTopology",
            "/ringcache.v1.Internal/Changes",
            "/ringcache.v1.Internal/Debts",
        ] {
            assert_eq!(code(followed, Some(READER)), None, "{followed}");
            assert_eq!(code(followed, None), Some(Unauthenticated), "{followed}");
        }
        for internal in [
            "/ringcache.v1.Internal/Settle",
            "/ringcache.v1.Internal/Flush",
        ] {
            assert_eq!(code(internal, Some(WRITER)), Some(PermissionDenied));
        }
        let _ = std::fs::remove_file(path);
    }

    #[test]
    fn bad_files_are_refused_with_the_line_and_without_the_token() {
        for (text, expected) in [
            ("reader r-0123456789abcdef\n", "unknown role"),
            ("read\n", "two words"),
            ("read short\n", "at least 16"),
            ("# nothing\n", "no tokens"),
            ("read a-0123456789abcdef extra\n", "two words"),
        ] {
            let e = Tokens::parse(text).err().unwrap_or_default();
            assert!(e.contains(expected), "{text:?}: {e}");
            assert!(!e.contains("0123456789abcdef"), "{e}");
        }
    }

    #[test]
    fn a_changed_file_is_reloaded_and_a_broken_one_keeps_the_old_tokens() {
        let (path, tokens) = tokens_file(&format!("read {READER}\n# reload test\n"));
        assert_eq!(
            tokens.with(|t| t.role_of(READER.as_bytes())),
            Some(Role::Read)
        );
        assert!(!tokens.reload_if_changed(), "unchanged");
        std::fs::write(&path, format!("admin {ADMIN}\n")).unwrap_or_else(|e| panic!("{e}"));
        assert!(tokens.reload_if_changed());
        assert_eq!(
            tokens.with(|t| t.role_of(READER.as_bytes())),
            None,
            "revoked"
        );
        assert_eq!(
            tokens.with(|t| t.role_of(ADMIN.as_bytes())),
            Some(Role::Admin)
        );
        std::fs::write(&path, "garbage\n").unwrap_or_else(|e| panic!("{e}"));
        assert!(!tokens.reload_if_changed());
        assert_eq!(
            tokens.with(|t| t.role_of(ADMIN.as_bytes())),
            Some(Role::Admin),
            "kept"
        );
        let _ = std::fs::remove_file(path);
    }
}
