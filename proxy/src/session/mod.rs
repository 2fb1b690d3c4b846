//! One client session: startup (TLS, protocol negotiation, cancel
//! requests), authentication, the login to the home backend, then the relay
//! that moves protocol messages between client and backend as raw bytes.
//!
//! The relay frames the byte stream (type byte + length) and decodes only
//! the messages it acts on: Query, Parse, Bind, Execute, Close, Sync and
//! Terminate from the client, ReadyForQuery and ErrorResponse from the
//! backend. Everything else (DataRow, CopyData, …) streams through without
//! being buffered whole.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU32, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::{Buf, BytesMut};
use chorus_router::{ddl_route, first_keyword, split_statements, DdlRoute, StatementClass};
use rand::RngCore;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::watch;

use crate::auth::{self, AuthError, ScramServer};
use crate::backend::{self, BackendConnection, BackendError, LoginParams};
use crate::cluster::ddl_lease::{self, LeaseRefusal};
use crate::config::{AuthMethod, CommitScope, TimeoutAction};
use crate::ddl::{self, DdlJob, JobStep};
use crate::frontend::{is_inspected, query_stamps, FrontendEvent, FrontendState};
use crate::metrics::{ErrorKind, GaugeGuard};
use crate::node::Node;
use crate::protocol::{self, read_message, ProtocolError, Severity, StartupPacket};
use crate::scope::{self, DdlScopeChange, ScopeChange};
use crate::stamp::{self, DdlStage, DdlStamp, StampKind, Swallower, Verdict};

mod answers;
mod client;
mod pump;
mod relay;
mod startup;
mod state;
#[cfg(test)]
mod tests;

use answers::*;
use client::*;
use pump::*;
use relay::*;
use startup::*;
use state::*;

/// Bytes read from a socket at a time.
const READ_CHUNK: usize = 16 * 1024;

/// A client connection, before or after TLS.
enum ClientStream {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::server::TlsStream<TcpStream>>),
    /// Moved out (into a TLS handshake that failed); every operation fails.
    Closed,
}

fn closed() -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::NotConnected, "connection closed")
}

impl AsyncRead for ClientStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            ClientStream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            ClientStream::Tls(s) => Pin::new(s).poll_read(cx, buf),
            ClientStream::Closed => Poll::Ready(Err(closed())),
        }
    }
}

impl AsyncWrite for ClientStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            ClientStream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            ClientStream::Tls(s) => Pin::new(s).poll_write(cx, buf),
            ClientStream::Closed => Poll::Ready(Err(closed())),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            ClientStream::Plain(s) => Pin::new(s).poll_flush(cx),
            ClientStream::Tls(s) => Pin::new(s).poll_flush(cx),
            ClientStream::Closed => Poll::Ready(Err(closed())),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            ClientStream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            ClientStream::Tls(s) => Pin::new(s).poll_shutdown(cx),
            ClientStream::Closed => Poll::Ready(Err(closed())),
        }
    }
}

/// A failure during startup, with what the client should be told.
#[derive(Debug)]
enum StartupFailure {
    /// The client went away; nothing to say.
    Gone,
    /// Send this FATAL error and close.
    Fatal {
        kind: ErrorKind,
        code: &'static str,
        message: String,
    },
    /// Forward the backend's own ErrorResponse (raw) and close.
    Backend(BytesMut),
}

impl From<ProtocolError> for StartupFailure {
    fn from(e: ProtocolError) -> Self {
        if e.is_disconnect() {
            StartupFailure::Gone
        } else {
            let code = match e {
                ProtocolError::UnsupportedVersion { .. } => "0A000",
                _ => "08P01",
            };

            StartupFailure::Fatal {
                kind: ErrorKind::Protocol,
                code,
                message: e.to_string(),
            }
        }
    }
}

impl From<AuthError> for StartupFailure {
    fn from(e: AuthError) -> Self {
        StartupFailure::Fatal {
            kind: ErrorKind::Auth,
            code: e.sqlstate(),
            message: e.to_string(),
        }
    }
}

impl From<std::io::Error> for StartupFailure {
    fn from(e: std::io::Error) -> Self {
        ProtocolError::Io(e).into()
    }
}

/// Serve one client connection to its end.
pub async fn serve(node: Arc<Node>, stream: TcpStream, peer: SocketAddr) {
    let _open = GaugeGuard::new(&node.metrics.client_connections);
    let _ = stream.set_nodelay(true);
    let mut client = ClientStream::Plain(stream);
    let started = tokio::time::timeout(
        node.config.auth_timeout(),
        startup(&node, &mut client, peer),
    )
    .await;
    let established = match started {
        Ok(Ok(Some(established))) => established,
        Ok(Ok(None)) => return,
        Ok(Err(failure)) => {
            report_startup_failure(&node, &mut client, failure).await;
            return;
        }
        Err(_) => {
            report_startup_failure(
                &node,
                &mut client,
                StartupFailure::Fatal {
                    kind: ErrorKind::Protocol,
                    code: "08006",
                    message: "canceling authentication due to timeout".into(),
                },
            )
            .await;
            return;
        }
    };
    let Established {
        backend,
        mut session,
    } = established;
    session.backend_open = node
        .metrics
        .backend(&session.backend_name)
        .map(|(conns, _)| GaugeGuard::new(conns));
    match client {
        ClientStream::Plain(stream) => {
            let (read, write) = stream.into_split();
            relay(&node, read, write, backend.stream, &mut session).await;
        }
        ClientStream::Tls(stream) => {
            let (read, write) = tokio::io::split(*stream);
            relay(&node, read, write, backend.stream, &mut session).await;
        }
        ClientStream::Closed => {}
    }
}

async fn report_startup_failure(node: &Node, client: &mut ClientStream, failure: StartupFailure) {
    let mut out = BytesMut::new();
    match failure {
        StartupFailure::Gone => return,
        StartupFailure::Fatal {
            kind,
            code,
            message,
        } => {
            node.metrics.error(kind);
            tracing::debug!(code, %message, "startup failed");
            protocol::error_response(&mut out, Severity::Fatal, code, &message, None);
        }
        StartupFailure::Backend(raw) => {
            node.metrics.error(ErrorKind::BackendConnect);
            out = raw;
        }
    }
    let _ = client.write_all(&out).await;
    let _ = client.shutdown().await;
}
