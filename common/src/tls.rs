//! TLS for the gRPC port, with rustls (ring; no OpenSSL): PEM files named by
//! flags, reloaded when they change on disk.
//!
//! cert-manager (and any Secret mounted in a pod) replaces certificate
//! files in place. [`ReloadingServerConfig`] re-reads the files every
//! [`RELOAD_INTERVAL`] and, when their bytes changed and they still make a
//! valid configuration, serves the new one to every connection accepted
//! from then on. Connections already open keep the session they
//! negotiated; nothing restarts. A change that does not load (a key that
//! does not match its certificate, a half-written file) is logged and the
//! previous configuration stays in use.
//!
//! Handshakes run in their own tasks, each bounded by
//! [`HANDSHAKE_TIMEOUT`], so a client that connects and stalls does not
//! hold up the accept loop.

use std::{
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use arc_swap::ArcSwap;
use rustls::{
    RootCertStore, ServerConfig,
    pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject},
    server::WebPkiClientVerifier,
};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::{TlsAcceptor, server::TlsStream};

/// How often the certificate files are checked for changes.
pub const RELOAD_INTERVAL: Duration = Duration::from_secs(2);

/// Longest a TLS handshake may take.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Connections that finished their handshake and wait for the server to
/// take them.
const ACCEPTED_QUEUE: usize = 128;

/// Why a TLS configuration could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file could not be read or holds no usable PEM.
    #[error("{flag} {path}: {message}")]
    File {
        /// The flag that named the file.
        flag: &'static str,
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        message: String,
    },
    /// The files do not make a configuration (e.g. the key does not match
    /// the certificate).
    #[error("{0}")]
    Config(String),
}

/// The PEM files of a TLS server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerFiles {
    /// The certificate chain (`--tls-cert`), leaf first.
    pub cert: PathBuf,
    /// Its private key (`--tls-key`): PKCS#8, PKCS#1 or SEC1.
    pub key: PathBuf,
    /// CA certificates client certificates must chain to
    /// (`--tls-client-ca`); `None`: clients need no certificate.
    pub client_ca: Option<PathBuf>,
}

fn file_error(flag: &'static str, path: &Path, message: impl ToString) -> TlsError {
    TlsError::File {
        flag,
        path: path.to_owned(),
        message: message.to_string(),
    }
}

/// The certificates in a PEM file, refusing a file with none.
pub fn load_certs(
    flag: &'static str,
    path: &Path,
) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| file_error(flag, path, e))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| file_error(flag, path, e))?;
    if certs.is_empty() {
        return Err(file_error(flag, path, "no CERTIFICATE in the file"));
    }
    Ok(certs)
}

/// The private key in a PEM file.
pub fn load_key(flag: &'static str, path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| file_error(flag, path, e))
}

/// A root store of the certificates in a PEM file.
pub fn load_roots(flag: &'static str, path: &Path) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    for cert in load_certs(flag, path)? {
        roots
            .add(cert)
            .map_err(|e| file_error(flag, path, format!("not a usable CA certificate: {e}")))?;
    }
    Ok(roots)
}

/// The crypto provider every configuration uses (ring).
pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

impl ServerFiles {
    /// Loads the files into a server configuration offering HTTP/2 (ALPN
    /// `h2`, which gRPC clients require).
    pub fn load(&self) -> Result<ServerConfig, TlsError> {
        let certs = load_certs("--tls-cert", &self.cert)?;
        let key = load_key("--tls-key", &self.key)?;
        let builder = ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsError::Config(e.to_string()))?;
        let builder = match &self.client_ca {
            Some(ca) => {
                let roots = load_roots("--tls-client-ca", ca)?;
                let verifier =
                    WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
                        .build()
                        .map_err(|e| TlsError::Config(format!("--tls-client-ca: {e}")))?;
                builder.with_client_cert_verifier(verifier)
            }
            None => builder.with_no_client_auth(),
        };
        let mut config = builder.with_single_cert(certs, key).map_err(|e| {
            TlsError::Config(format!(
                "--tls-cert {} and --tls-key {}: {e}",
                self.cert.display(),
                self.key.display()
            ))
        })?;
        config.alpn_protocols = vec![b"h2".to_vec()];
        Ok(config)
    }

    /// The files' bytes, to tell whether they changed.
    fn contents(&self) -> Vec<Option<Vec<u8>>> {
        std::iter::once(&self.cert)
            .chain(std::iter::once(&self.key))
            .chain(self.client_ca.iter())
            .map(|p| std::fs::read(p).ok())
            .collect()
    }
}

/// A server configuration that follows its files; see the module
/// documentation.
#[derive(Debug)]
pub struct ReloadingServerConfig {
    files: ServerFiles,
    current: ArcSwap<ServerConfig>,
    loaded: parking_lot::Mutex<Vec<Option<Vec<u8>>>>,
}

impl ReloadingServerConfig {
    /// Loads `files`; fails if they do not make a configuration (a server
    /// must not start without the TLS it was asked for).
    pub fn load(files: ServerFiles) -> Result<Arc<Self>, TlsError> {
        let contents = files.contents();
        let config = files.load()?;
        Ok(Arc::new(Self {
            files,
            current: ArcSwap::from_pointee(config),
            loaded: parking_lot::Mutex::new(contents),
        }))
    }

    /// Re-reads the files if their bytes changed; true if a new
    /// configuration is now served.
    pub fn reload_if_changed(&self) -> bool {
        let contents = self.files.contents();
        let mut loaded = self.loaded.lock();
        if *loaded == contents {
            return false;
        }
        match self.files.load() {
            Ok(config) => {
                self.current.store(Arc::new(config));
                *loaded = contents;
                tracing::info!(cert = %self.files.cert.display(), "TLS certificate reloaded");
                true
            }
            Err(e) => {
                // Keep serving the previous configuration; try again at
                // the next change (a file may be half-written).
                *loaded = contents;
                tracing::warn!(error = %e, "TLS files changed but do not load; keeping the previous certificate");
                false
            }
        }
    }

    /// Checks the files every `every` until dropped (run it in a task).
    pub async fn watch(self: Arc<Self>, every: Duration) {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            self.reload_if_changed();
        }
    }

    /// An acceptor with the current configuration.
    pub fn acceptor(&self) -> TlsAcceptor {
        TlsAcceptor::from(self.current.load_full())
    }
}

/// Accepts TCP connections on `listener` and hands over those that
/// complete a TLS handshake (with the configuration current when they
/// connected), as a stream for `serve_with_incoming`. Failed handshakes
/// are logged at debug level and counted in `failures`. Ends when the
/// returned stream is dropped.
pub fn incoming(
    listener: TcpListener,
    config: Arc<ReloadingServerConfig>,
    failures: Option<prometheus::IntCounter>,
) -> tokio_stream::wrappers::ReceiverStream<std::io::Result<TlsStream<TcpStream>>> {
    let (tx, rx) = tokio::sync::mpsc::channel(ACCEPTED_QUEUE);
    tokio::spawn(async move {
        loop {
            let (tcp, peer) = tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        // Out of file descriptors and the like: back off
                        // instead of spinning.
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
                () = tx.closed() => return,
            };
            let _ = tcp.set_nodelay(true);
            let acceptor = config.acceptor();
            let (tx, failures) = (tx.clone(), failures.clone());
            tokio::spawn(async move {
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                    Ok(Ok(tls)) => {
                        let _ = tx.send(Ok(tls)).await;
                    }
                    Ok(Err(e)) => {
                        failures.inspect(|f| f.inc());
                        tracing::debug!(%peer, error = %e, "TLS handshake failed");
                    }
                    Err(_) => {
                        failures.inspect(|f| f.inc());
                        tracing::debug!(%peer, "TLS handshake timed out");
                    }
                }
            });
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}
