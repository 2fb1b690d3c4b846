//! Giving a session another backend (see `relay::move_session` and
//! `drain`): the login it makes there, and what follows it.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use tokio::io::AsyncWriteExt;

use crate::backend::{self, BackendStream};
use crate::metrics::GaugeGuard;
use crate::node::Node;
use crate::wire::protocol::{self, read_message};

use super::state::{RelayState, Session, MOVE_LIMIT};

/// The startup parameters a moving session logs in with: the client's,
/// with the settings the old backend reported changed (ParameterStatus).
pub(super) fn moved_params(state: &RelayState, session: &Session) -> Vec<(String, String)> {
    let mut params = session.params.clone();
    if let Ok(reported) = state.reported.lock() {
        for (name, value) in reported.iter() {
            params.retain(|(n, _)| !n.eq_ignore_ascii_case(name));
            params.push((name.clone(), value.clone()));
        }
    }
    params
}

/// Log in as the session did to another backend that takes sessions
/// (`Node::session_backends`), trying them in turn for up to
/// `MOVE_LIMIT`: its name, address and connection.
pub(super) async fn login_elsewhere(
    node: &Node,
    state: &RelayState,
    session: &Session,
    params: &[(String, String)],
) -> Option<(String, String, backend::BackendConnection)> {
    // (Another node's home only once its changes reach every peer, as at
    // startup: see `wait_streams_ready`.)
    let lane = state.lane.as_deref().filter(|_| state.replicated_database);
    let home = &node.config.home_backend().name;
    let deadline = Instant::now() + MOVE_LIMIT;
    loop {
        let candidates: Vec<_> = node
            .session_backends()
            .iter()
            .filter(|b| b.name != session.backend_name)
            .cloned()
            .collect();
        for candidate in candidates {
            let left = deadline.saturating_duration_since(Instant::now());
            if let Some(lane) = lane.filter(|_| candidate.name != *home) {
                let limit = left.min(Duration::from_secs(1));
                if !crate::cluster::replication::wait_streams_ready(node, lane, &candidate, limit)
                    .await
                {
                    continue;
                }
            }
            let address = candidate.address();
            let login = session.login(&address, candidate.tls.as_ref(), params);
            match backend::connect(
                &login,
                left.min(node.live().config.backend_connect_timeout()),
            )
            .await
            {
                Ok(connection) => return Some((candidate.name, address, connection)),
                Err(e) => {
                    tracing::debug!(backend = %candidate.name, error = %e, "moving a session: login failed");
                }
            }
        }
        if Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The session is served by `connection` to backend `name` from now on:
/// its cancel key, backend pid and connection count follow.
pub(super) fn retarget(
    node: &Node,
    state: &RelayState,
    session: &mut Session,
    name: String,
    address: &str,
    connection: backend::BackendConnection,
) -> BackendStream {
    session
        .cancel_key
        .retarget(address, connection.pid, connection.secret);
    state.backend_pid.store(connection.pid, Ordering::Relaxed);
    session.backend_open = node
        .metrics
        .backend_connections(&name)
        .map(|conns| GaugeGuard::new(&conns));
    node.metrics.sessions_moved();
    session.backend_name = name;
    connection.stream
}

/// Set a moved session up on its new connection: `first` (a query of the
/// relay's own), then its named statements prepared again. `None` when the
/// connection failed or did not answer within `MOVE_LIMIT`, else whether
/// no answer was an error.
pub(super) async fn set_up(
    stream: &mut BackendStream,
    state: &RelayState,
    first: Option<&str>,
) -> Option<bool> {
    let mut setup = BytesMut::new();
    let mut readies = 0;
    if let Some(sql) = first {
        protocol::query(&mut setup, sql);
        readies += 1;
    }
    let prepared: Vec<BytesMut> = state
        .prepared
        .lock()
        .map(|p| p.values().cloned().collect())
        .unwrap_or_default();
    if !prepared.is_empty() {
        for parse in &prepared {
            setup.extend_from_slice(parse);
        }
        protocol::write_message(&mut setup, b'S', |_| {});
        readies += 1;
    }
    if readies == 0 {
        return Some(true);
    }
    let run = async {
        stream.write_all(&setup).await.ok()?;
        let mut buf = BytesMut::new();
        let (mut seen, mut failed) = (0, false);
        while seen < readies {
            match read_message(stream, &mut buf, 1 << 30).await.ok()? {
                b'Z' => seen += 1,
                b'E' => failed = true,
                _ => {}
            }
        }
        Some(!failed)
    };
    tokio::time::timeout(MOVE_LIMIT, run).await.ok().flatten()
}
