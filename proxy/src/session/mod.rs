//! One client session: startup (TLS, protocol negotiation, cancel
//! requests), authentication, the login to the home backend, then the relay
//! that moves protocol messages between client and backend as raw bytes.
//!
//! The relay frames the byte stream (type byte + length) and decodes only
//! the messages it acts on: Query, Parse, Bind, Execute, Close, Sync and
//! Terminate from the client, ReadyForQuery and ErrorResponse from the
//! backend. Everything else (DataRow, CopyData, …) streams through without
//! being buffered whole.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpStream;

use crate::metrics::{ErrorKind, GaugeGuard};
use crate::node::Node;

mod answers;
mod carried;
mod client;
mod drain;
mod elsewhere;
mod pooled;
mod pump;
mod reads;
mod refusals;
mod relay;
mod stamp;
mod startup;
mod state;
#[cfg(test)]
mod tests;

use relay::relay;
use startup::{
    report_startup_failure, startup, ClientStream, Established, Started, StartupFailure,
};

/// Serve one client connection to its end.
pub async fn serve(node: Arc<Node>, stream: TcpStream, peer: SocketAddr) {
    let _open = GaugeGuard::new(&node.metrics.client_connections);
    let _ = stream.set_nodelay(true);
    let mut client = ClientStream::Plain(stream);
    let started = tokio::time::timeout(
        node.live().config.auth_timeout(),
        Box::pin(startup(&node, &mut client, peer)),
    )
    .await;
    let established = match started {
        Ok(Ok(Some(Started::Session(established)))) => *established,
        // (Past the authentication timeout: a console session lasts.)
        Ok(Ok(Some(Started::Console(greeting)))) => {
            let _ = Box::pin(crate::ops::console::serve(&node, &mut client, greeting)).await;
            return;
        }
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
        .backend_connections(&session.backend_name)
        .map(|conns| GaugeGuard::new(&conns));
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
