//! HTTPS for the API (`smolfleet serve --tls-cert FILE --tls-key FILE`): rustls (the
//! aws-lc-rs provider reqwest already uses) over the same router as plain HTTP.
//!
//! Handshakes run off the accept loop, each bounded by [`HANDSHAKE_TIMEOUT`], so a client that
//! connects and says nothing holds up no one. Connections stay open between requests as long
//! as the client keeps them (no idle timeout: the published client keeps idle connections up
//! to 30 s, CLOUD-CLIENTS.md §1).

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::rustls::{self, ServerConfig};
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;

use crate::error::FleetError;
use crate::server::Fleet;

/// How long a client may take to finish its TLS handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Handshaken connections waiting for the server to take them.
const BACKLOG: usize = 64;

fn tls_error(file: &Path, what: &str, detail: impl std::fmt::Display) -> FleetError {
    FleetError::Tls {
        file: file.to_path_buf(),
        message: format!("{what}: {detail}"),
    }
}

/// The server config of a PEM certificate chain (leaf first) and its PEM private key
/// (PKCS#8, PKCS#1 or SEC1). A missing, unreadable or wrong file is an error naming it.
pub fn server_config(cert: &Path, key: &Path) -> Result<Arc<ServerConfig>, FleetError> {
    let pem = |file: &Path| {
        std::fs::read(file).map_err(|e| tls_error(file, "cannot read the PEM file", e))
    };
    let cert_pem = pem(cert)?;
    let chain = CertificateDer::pem_slice_iter(&cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| tls_error(cert, "not a PEM certificate chain", e))?;
    if chain.is_empty() {
        return Err(tls_error(
            cert,
            "no certificate in it",
            "expected -----BEGIN CERTIFICATE-----",
        ));
    }
    let key_pem = pem(key)?;
    let private = PrivateKeyDer::from_pem_slice(&key_pem)
        .map_err(|e| tls_error(key, "not a PEM private key", e))?;
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| tls_error(cert, "no TLS protocol version available", e))?
        .with_no_client_auth()
        .with_single_cert(chain, private)
        .map_err(|e| {
            tls_error(
                key,
                &format!("does not go with the certificate of {}", cert.display()),
                e,
            )
        })?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// A listener handing out connections whose TLS handshake completed.
pub struct TlsListener {
    addr: SocketAddr,
    ready: tokio::sync::mpsc::Receiver<(TlsStream<TcpStream>, SocketAddr)>,
    accept: tokio::task::JoinHandle<()>,
}

impl Drop for TlsListener {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

impl TlsListener {
    /// Serves TLS with `config` on `listener`.
    pub fn new(listener: TcpListener, config: Arc<ServerConfig>) -> Result<Self, FleetError> {
        let addr = listener.local_addr().map_err(|source| FleetError::Io {
            context: "read the listener's address".into(),
            source,
        })?;
        let acceptor = TlsAcceptor::from(config);
        let (tx, ready) = tokio::sync::mpsc::channel(BACKLOG);
        let accept = tokio::spawn(async move {
            loop {
                let (tcp, peer) = match listener.accept().await {
                    Ok(c) => c,
                    Err(e) => {
                        // out of file descriptors and the like: wait, then go on
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                };
                if let Err(e) = tcp.set_nodelay(true) {
                    tracing::warn!(error = %e, "cannot set TCP_NODELAY");
                }
                let (acceptor, tx) = (acceptor.clone(), tx.clone());
                tokio::spawn(async move {
                    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                        Ok(Ok(tls)) => {
                            if tx.send((tls, peer)).await.is_err() {
                                tracing::debug!(%peer, "server gone; connection dropped");
                            }
                        }
                        Ok(Err(e)) => tracing::debug!(%peer, error = %e, "TLS handshake failed"),
                        Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
                    }
                });
            }
        });
        Ok(TlsListener {
            addr,
            ready,
            accept,
        })
    }
}

impl axum::serve::Listener for TlsListener {
    type Io = TlsStream<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.ready.recv().await {
            Some(c) => c,
            // the accept loop only ends when this listener is dropped
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        Ok(self.addr)
    }
}

impl Fleet {
    /// [`Fleet::serve`] over HTTPS with `config` ([`server_config`]).
    pub async fn serve_tls(
        self,
        listener: TcpListener,
        config: Arc<ServerConfig>,
        shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    ) -> Result<(), FleetError> {
        let listener = TlsListener::new(listener, config)?;
        let addr = listener.addr;
        tracing::info!(%addr, home = %self.home().display(), "smolfleet serving over TLS");
        crate::server::deny_node_networks();
        self.set_listen_port(addr.port());
        let _sweeper = crate::sweeper::start(self.clone());
        axum::serve(listener, self.router())
            .with_graceful_shutdown(shutdown)
            .await
            .map_err(|source| FleetError::Io {
                context: format!("serve on {addr}"),
                source,
            })
    }
}
