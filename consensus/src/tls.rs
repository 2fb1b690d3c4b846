//! TLS for Raft RPC. Every node presents its certificate, and each side
//! checks the other's against the cluster's CA: a connecting node checks
//! that the certificate names the host it dialled, and the accepting node
//! asks for a client certificate from the same CA. The cluster secret's
//! handshake still runs inside, so a certificate alone does not make a
//! member.

use std::path::Path;
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio_rustls::{TlsAcceptor, TlsConnector};

/// A Raft RPC connection's transport: TCP, or TLS over it.
pub(crate) trait Io: AsyncRead + AsyncWrite + Unpin + Send + Sync {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send + Sync> Io for T {}

/// A node's TLS material for Raft RPC.
#[derive(Clone)]
pub struct RaftTls {
    acceptor: TlsAcceptor,
    connector: TlsConnector,
}

impl std::fmt::Debug for RaftTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RaftTls")
    }
}

impl RaftTls {
    /// From PEM files: this node's certificate (chain) and key, and the
    /// CA certificates every node's certificate leads to.
    pub fn from_pem_files(cert: &Path, key: &Path, ca: &Path) -> Result<RaftTls, String> {
        let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
            .and_then(|iter| iter.collect())
            .map_err(|e| format!("{}: {e}", cert.display()))?;
        if chain.is_empty() {
            return Err(format!("{}: no certificate found", cert.display()));
        }
        let key =
            PrivateKeyDer::from_pem_file(key).map_err(|e| format!("{}: {e}", key.display()))?;
        let cas: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(ca)
            .and_then(|iter| iter.collect())
            .map_err(|e| format!("{}: {e}", ca.display()))?;
        let mut roots = RootCertStore::empty();
        let (added, _) = roots.add_parsable_certificates(cas);
        if added == 0 {
            return Err(format!("{}: no CA certificate found", ca.display()));
        }
        let roots = Arc::new(roots);
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let clients = WebPkiClientVerifier::builder_with_provider(roots.clone(), provider.clone())
            .build()
            .map_err(|e| e.to_string())?;
        let server = ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?
            .with_client_cert_verifier(clients)
            .with_single_cert(chain.clone(), key.clone_key())
            .map_err(|e| e.to_string())?;
        let client = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?
            .with_root_certificates(roots)
            .with_client_auth_cert(chain, key)
            .map_err(|e| e.to_string())?;
        Ok(RaftTls {
            acceptor: TlsAcceptor::from(Arc::new(server)),
            connector: TlsConnector::from(Arc::new(client)),
        })
    }

    /// The accepting side's handshake.
    pub(crate) async fn accept(&self, tcp: TcpStream) -> std::io::Result<Box<dyn Io>> {
        Ok(Box::new(self.acceptor.accept(tcp).await?))
    }

    /// The connecting side's handshake with the node at `addr`
    /// (`host:port`), whose certificate must name `host`.
    pub(crate) async fn connect(&self, addr: &str, tcp: TcpStream) -> std::io::Result<Box<dyn Io>> {
        let host = addr
            .rsplit_once(':')
            .map_or(addr, |(host, _)| host)
            .trim_start_matches('[')
            .trim_end_matches(']');
        let name = ServerName::try_from(host.to_owned()).map_err(|e| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("{host:?} is not a TLS server name: {e}"),
            )
        })?;
        Ok(Box::new(self.connector.connect(name, tcp).await?))
    }
}
