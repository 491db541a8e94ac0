//! TLS for the gRPC port, with rustls (ring; no OpenSSL): PEM files named by
//! flags, reloaded when they change on disk.
//!
//! cert-manager (and any Secret mounted in a pod) replaces certificate
//! files in place. [`ReloadingServerConfig`] (and, for the orchestrator's
//! calls to nodes, [`ReloadingClientConfig`]) follows its files as
//! [`crate::reload`] describes: every connection made after a change uses
//! the new certificate; connections already open keep the session they
//! negotiated; nothing restarts.
//!
//! Handshakes run in their own tasks, each bounded by
//! [`HANDSHAKE_TIMEOUT`], so a client that connects and stalls does not
//! hold up the accept loop.

use std::{
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use rustls::{
    ClientConfig, RootCertStore, ServerConfig,
    pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject},
    server::WebPkiClientVerifier,
};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::{TlsAcceptor, TlsConnector, server::TlsStream};

use crate::reload::Reloading;

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

    /// The files, for watching.
    fn paths(&self) -> Vec<PathBuf> {
        [Some(&self.cert), Some(&self.key), self.client_ca.as_ref()]
            .into_iter()
            .flatten()
            .cloned()
            .collect()
    }

    /// A configuration that follows the files.
    pub fn reloading(self) -> Result<Arc<ReloadingServerConfig>, TlsError> {
        let paths = self.paths();
        Reloading::new("TLS certificate", paths, move || self.load())
    }
}

/// A server configuration that follows its files.
pub type ReloadingServerConfig = Reloading<ServerConfig, TlsError>;

/// An acceptor with the configuration in use now.
pub fn acceptor(config: &ReloadingServerConfig) -> TlsAcceptor {
    TlsAcceptor::from(config.current())
}

/// The PEM files of the orchestrator's TLS client to nodes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientFiles {
    /// CA certificates node certificates must chain to (`--node-tls-ca`).
    pub ca: PathBuf,
    /// The orchestrator's own certificate chain (`--node-tls-cert`), for
    /// nodes that require client certificates; with `key`.
    pub cert: Option<PathBuf>,
    /// Its private key (`--node-tls-key`).
    pub key: Option<PathBuf>,
}

impl ClientFiles {
    /// Loads the files into a client configuration asking for HTTP/2.
    pub fn load(&self) -> Result<ClientConfig, TlsError> {
        let roots = load_roots("--node-tls-ca", &self.ca)?;
        let builder = ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsError::Config(e.to_string()))?
            .with_root_certificates(roots);
        let mut config = match (&self.cert, &self.key) {
            (Some(cert), Some(key)) => builder
                .with_client_auth_cert(
                    load_certs("--node-tls-cert", cert)?,
                    load_key("--node-tls-key", key)?,
                )
                .map_err(|e| {
                    TlsError::Config(format!(
                        "--node-tls-cert {} and --node-tls-key {}: {e}",
                        cert.display(),
                        key.display()
                    ))
                })?,
            _ => builder.with_no_client_auth(),
        };
        config.alpn_protocols = vec![b"h2".to_vec()];
        Ok(config)
    }

    /// A configuration that follows the files.
    pub fn reloading(self) -> Result<Arc<ReloadingClientConfig>, TlsError> {
        let paths = [Some(&self.ca), self.cert.as_ref(), self.key.as_ref()]
            .into_iter()
            .flatten()
            .cloned()
            .collect();
        Reloading::new("node TLS client certificate", paths, move || self.load())
    }
}

/// A client configuration that follows its files.
pub type ReloadingClientConfig = Reloading<ClientConfig, TlsError>;

/// A connector with the configuration in use now.
pub fn connector(config: &ReloadingClientConfig) -> TlsConnector {
    TlsConnector::from(config.current())
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
            let acceptor = acceptor(&config);
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
