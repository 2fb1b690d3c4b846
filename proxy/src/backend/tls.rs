//! TLS to backends: the SSLRequest and handshake on a new connection, and
//! the stream sessions and replication streams log in over
//! ([`BackendStream`]); control connections use tokio-postgres with the
//! same rustls configuration (see `control.rs`). What `sslmode` asks for
//! is in config/backend_tls.rs.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;

use crate::config::{BackendTls, SslMode};

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
