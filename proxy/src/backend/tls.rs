//! TLS to backends, as libpq's `sslmode` does it: `disable`, `prefer`
//! (TLS when the server offers it), `require` (TLS, the certificate not
//! checked unless `sslrootcert` is given, then as `verify-ca`),
//! `verify-ca` (the chain checked against `sslrootcert`) and `verify-full`
//! (the chain and the host name). Sessions and replication streams log in
//! over [`BackendStream`]; control connections use tokio-postgres with
//! the same rustls configuration (see `control.rs`).
//!
//! rustls has the verifiers for `verify-full` only; `require` and
//! `verify-ca` need the two small ones below, which is why they are
//! written here.

use std::io;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme,
};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;

/// How a backend connection uses TLS (libpq's `sslmode`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum SslMode {
    #[default]
    Disable,
    Prefer,
    Require,
    VerifyCa,
    VerifyFull,
}

/// A backend's TLS settings, made ready when the configuration is read.
#[derive(Debug, Clone)]
pub struct BackendTls {
    pub mode: SslMode,
    pub config: Arc<ClientConfig>,
    pub server_name: ServerName<'static>,
}

impl BackendTls {
    /// The settings for `mode` (`None` for `disable`), with the CA
    /// certificates of `root_cert` (PEM).
    pub fn new(
        mode: SslMode,
        root_cert: Option<&Path>,
        host: &str,
    ) -> Result<Option<BackendTls>, String> {
        if mode == SslMode::Disable {
            return Ok(None);
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let roots = root_cert.map(load_roots).transpose()?;
        let verifier: Arc<dyn ServerCertVerifier> = match (mode, roots) {
            (SslMode::VerifyCa | SslMode::VerifyFull, None) => {
                return Err("sslmode verify-ca and verify-full need sslrootcert".into())
            }
            (SslMode::Prefer | SslMode::Require, None) => Arc::new(AnyCertificate {
                provider: provider.clone(),
            }),
            (SslMode::VerifyFull, Some(roots)) => webpki(roots, &provider)?,
            // As libpq: `require` with a root certificate checks the chain.
            (_, Some(roots)) => Arc::new(ChainOnly {
                inner: webpki(roots, &provider)?,
            }),
            (SslMode::Disable, None) => unreachable!("returned above"),
        };
        let config = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?
            .dangerous()
            .with_custom_certificate_verifier(verifier)
            .with_no_client_auth();
        let server_name = ServerName::try_from(host.to_owned())
            .map_err(|e| format!("host {host:?} is not a valid TLS server name: {e}"))?;
        Ok(Some(BackendTls {
            mode,
            config: Arc::new(config),
            server_name,
        }))
    }
}

fn load_roots(path: &Path) -> Result<RootCertStore, String> {
    use rustls::pki_types::pem::PemObject;
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(path)
        .and_then(|iter| iter.collect())
        .map_err(|e| format!("sslrootcert {}: {e}", path.display()))?;
    let mut roots = RootCertStore::empty();
    let (added, _) = roots.add_parsable_certificates(certs);
    if added == 0 {
        return Err(format!(
            "sslrootcert {}: no certificate found",
            path.display()
        ));
    }
    Ok(roots)
}

fn webpki(
    roots: RootCertStore,
    provider: &Arc<CryptoProvider>,
) -> Result<Arc<dyn ServerCertVerifier>, String> {
    let verifier = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .build()
        .map_err(|e| e.to_string())?;
    Ok(verifier)
}

/// `require` without a root certificate: encryption only. The handshake's
/// signatures are still checked, so the session is with the holder of the
/// certificate's key, whoever that is.
#[derive(Debug)]
struct AnyCertificate {
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// `verify-ca`: the chain must lead to a trusted root; the name in the
/// certificate is not compared with the host.
#[derive(Debug)]
struct ChainOnly {
    inner: Arc<dyn ServerCertVerifier>,
}

impl ServerCertVerifier for ChainOnly {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match self.inner.verify_server_cert(
            end_entity,
            intermediates,
            server_name,
            ocsp_response,
            now,
        ) {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// Ask the server for TLS on a new connection (SSLRequest) and make the
/// handshake; a server that declines is used in the clear under `prefer`
/// only.
pub(super) async fn negotiate(mut tcp: TcpStream, tls: &BackendTls) -> io::Result<BackendStream> {
    // SSLRequest: length 8, code 80877103.
    tcp.write_all(&[0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f]).await?;
    let mut answer = [0u8; 1];
    tcp.read_exact(&mut answer).await?;
    match answer[0] {
        b'S' => {
            let connector = tokio_rustls::TlsConnector::from(tls.config.clone());
            let stream = connector.connect(tls.server_name.clone(), tcp).await?;
            Ok(BackendStream::Tls(Box::new(stream)))
        }
        b'N' if tls.mode == SslMode::Prefer => Ok(BackendStream::Plain(tcp)),
        b'N' => Err(io::Error::new(
            io::ErrorKind::ConnectionRefused,
            "the server does not support SSL, but the backend's sslmode asks for it",
        )),
        other => Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("unexpected answer to SSLRequest: {other:#04x}"),
        )),
    }
}

/// A connection to a backend, in the clear or over TLS.
pub enum BackendStream {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

/// The reading half of a [`BackendStream`].
pub enum BackendRead {
    Plain(OwnedReadHalf),
    Tls(tokio::io::ReadHalf<tokio_rustls::client::TlsStream<TcpStream>>),
}

/// The writing half of a [`BackendStream`].
pub enum BackendWrite {
    Plain(OwnedWriteHalf),
    Tls(tokio::io::WriteHalf<tokio_rustls::client::TlsStream<TcpStream>>),
}

impl BackendStream {
    /// Split into halves that two tasks can use. A plain stream splits
    /// without a lock; a TLS one shares its session behind tokio's.
    pub fn into_split(self) -> (BackendRead, BackendWrite) {
        match self {
            BackendStream::Plain(s) => {
                let (r, w) = s.into_split();
                (BackendRead::Plain(r), BackendWrite::Plain(w))
            }
            BackendStream::Tls(s) => {
                let (r, w) = tokio::io::split(*s);
                (BackendRead::Tls(r), BackendWrite::Tls(w))
            }
        }
    }

    /// Put halves made by [`BackendStream::into_split`] together again;
    /// `None` for halves of different streams.
    pub fn unsplit(read: BackendRead, write: BackendWrite) -> Option<BackendStream> {
        match (read, write) {
            (BackendRead::Plain(r), BackendWrite::Plain(w)) => {
                r.reunite(w).ok().map(BackendStream::Plain)
            }
            (BackendRead::Tls(r), BackendWrite::Tls(w)) => {
                if r.is_pair_of(&w) {
                    Some(BackendStream::Tls(Box::new(r.unsplit(w))))
                } else {
                    None
                }
            }
            _ => None,
        }
    }

    /// Whether the connection is encrypted.
    pub fn is_tls(&self) -> bool {
        matches!(self, BackendStream::Tls(_))
    }
}

/// Forward the I/O traits of an enum to whichever stream it holds.
macro_rules! either {
    ($self:ident, $s:ident => $e:expr) => {
        match $self.get_mut() {
            Self::Plain($s) => $e,
            Self::Tls($s) => $e,
        }
    };
}

impl AsyncRead for BackendStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        either!(self, s => Pin::new(s).poll_read(cx, buf))
    }
}

impl AsyncRead for BackendRead {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        either!(self, s => Pin::new(s).poll_read(cx, buf))
    }
}

macro_rules! async_write {
    ($t:ty) => {
        impl AsyncWrite for $t {
            fn poll_write(
                self: Pin<&mut Self>,
                cx: &mut Context<'_>,
                buf: &[u8],
            ) -> Poll<io::Result<usize>> {
                either!(self, s => Pin::new(s).poll_write(cx, buf))
            }

            fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
                either!(self, s => Pin::new(s).poll_flush(cx))
            }

            fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
                either!(self, s => Pin::new(s).poll_shutdown(cx))
            }

            fn poll_write_vectored(
                self: Pin<&mut Self>,
                cx: &mut Context<'_>,
                bufs: &[io::IoSlice<'_>],
            ) -> Poll<io::Result<usize>> {
                either!(self, s => Pin::new(s).poll_write_vectored(cx, bufs))
            }

            fn is_write_vectored(&self) -> bool {
                match self {
                    Self::Plain(s) => s.is_write_vectored(),
                    Self::Tls(s) => s.is_write_vectored(),
                }
            }
        }
    };
}

async_write!(BackendStream);
async_write!(BackendWrite);
