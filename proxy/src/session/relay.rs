//! The relay loop, and moving a session to another backend when its own
//! fails.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};

use crate::backend;
use crate::backend::BackendStream;
use crate::cluster::ddl::lease as ddl_lease;
use crate::metrics::ErrorKind;
use crate::node::Node;
use crate::wire::protocol;
use crate::wire::protocol::Severity;

use super::answers::backend_to_client;
use super::client::client_to_backend;
use super::drain;
use super::elsewhere::{login_elsewhere, moved_params, retarget, set_up};
use super::pooled;
use super::pump::PumpSide;
use super::state::{ClientSide, Pending, RelayEnd, RelayState, Session};

/// Move messages both ways until either side ends. With replication, a
/// session whose backend fails (or is found down by the health checks)
/// moves to another backend between messages, see `move_session`.
pub(super) async fn relay<CR, CW>(
    node: &Arc<Node>,
    mut client_read: CR,
    mut client_write: CW,
    backend: BackendStream,
    session: &mut Session,
) where
    CR: AsyncRead + Unpin,
    CW: AsyncWrite + Unpin,
{
    let pooled = session.pooled.is_some();
    let state = RelayState::new(Some(node), &session.database, pooled);
    state
        .client_pid
        .store(session.cancel_key.pid, Ordering::Relaxed);
    if let Some(pid) = session.cancel_key.backend_pid() {
        state.backend_pid.store(pid, Ordering::Relaxed);
    }
    // Chorus's own settings the client gave at login (`options`, checked
    // then), as if it had SET them first.
    if state.replicated_database {
        for (statement, _) in crate::scope::login_settings(&session.params) {
            if let Ok(changes) = super::client::scope_changes_in(&statement) {
                super::client::apply_scope_changes(&state, &changes);
            }
            state.apply_ddl_scope(&crate::scope::ddl_scope_changes(&statement));
            state.apply_read_routing(&crate::scope::read_routing_changes(&statement));
        }
    }
    let mut client = ClientSide::new();
    let mut shutdown = node.shutdown_signal();
    let mut went_down = node.backend_went_down();
    let mut drains = node.backend_closed_changed();
    let mut backend = backend;
    let replicating = node.config.replication.is_some();
    // (Kept across a stay on a drained backend; new for a new backend.)
    let mut from_backend = PumpSide::default();
    // (Pooled) whether to look for a point to give the connection back
    // before the next idle ReadyForQuery: at the session's start.
    let mut idle_now = pooled;
    if let Some(p) = &session.pooled {
        state
            .ddl_settings_sent
            .store(p.ddl_settings_sent(), Ordering::SeqCst);
    }
    let (end, mut backend_write) = loop {
        let (mut backend_read, mut backend_write) = backend.into_split();
        let end = {
            let serving = session.backend_name.clone();
            // (On the heap, for as long as the session has this backend
            // connection: the two directions' state is most of a session's
            // memory, and a pooled session between transactions has none.)
            let mut to_backend = Box::pin(client_to_backend(
                node,
                &state,
                &serving,
                &mut client,
                &mut client_read,
                &mut backend_write,
            ));
            let mut to_client = Box::pin(backend_to_client(
                node,
                &state,
                &serving,
                &mut from_backend,
                &mut backend_read,
                &mut client_write,
                &mut shutdown,
            ));
            let name = session.backend_name.clone();
            let marked_down = async {
                loop {
                    if went_down.changed().await.is_err() {
                        std::future::pending::<()>().await;
                    }
                    if node.is_backend_down(&name) {
                        return;
                    }
                }
            };
            // Drained while idle: the session leaves now rather than at its
            // next transaction (see `drain::leave`). (Busy sessions are
            // stopped at their next transaction's start by the client
            // side, or after their ReadyForQuery by the backend side.)
            let drained_idle = async {
                loop {
                    if drains.changed().await.is_err() {
                        std::future::pending::<()>().await;
                    }
                    if node.is_backend_closed(&name) && state.idle() {
                        return;
                    }
                }
            };
            // (Pooled) both directions wait for bytes with nothing
            // buffered, and nothing is due: the transaction is over, and
            // the connection can go back (see pooled.rs).
            let look_now = std::mem::take(&mut idle_now);
            let release_point = async {
                if !look_now {
                    state.idle_signal.notified().await;
                }
                loop {
                    if state.client_reading.load(Ordering::SeqCst)
                        && state.backend_reading.load(Ordering::SeqCst)
                        && state.idle()
                    {
                        return;
                    }
                    state.idle_signal.notified().await;
                }
            };
            // (Biased: the release point is looked at after both
            // directions went as far as they could.)
            tokio::select! {
                biased;
                end = &mut to_backend => match end {
                    // Writing to the backend failed: the other direction
                    // sees the end too, after what it still forwards.
                    RelayEnd::BackendGone { .. } => {
                        tokio::time::timeout(Duration::from_secs(1), &mut to_client)
                            .await
                            .unwrap_or(RelayEnd::BackendGone { after_fatal: false })
                    }
                    other => other,
                },
                end = &mut to_client => end,
                () = marked_down, if replicating => RelayEnd::BackendDown,
                () = drained_idle, if replicating => RelayEnd::BackendDrained,
                () = release_point, if pooled => RelayEnd::Idle,
            }
        };
        if matches!(end, RelayEnd::Idle) {
            let Some(stream) = BackendStream::unsplit(backend_read, backend_write) else {
                break (RelayEnd::BackendGone { after_fatal: false }, None);
            };
            let between = client.batch_start
                && client.pump.clean()
                && client.pump.buf.is_empty()
                && !client.discard_until_sync
                && from_backend.clean()
                && from_backend.buf.is_empty()
                && state.idle();
            if !between {
                backend = stream;
                continue;
            }
            match Box::pin(pooled::give_back(
                node,
                &state,
                session,
                stream,
                &mut from_backend,
            ))
            .await
            {
                pooled::Released::Kept(stream) => {
                    backend = stream;
                    continue;
                }
                pooled::Released::Given | pooled::Released::Broken => {}
            }
            match Box::pin(pooled::park(
                node,
                &state,
                session,
                &mut client,
                &mut from_backend,
                &mut client_read,
                &mut client_write,
                &mut shutdown,
            ))
            .await
            {
                // (The backend side stopped clean and empty: its buffer
                // serves the next connection as it is.)
                pooled::Parked::Resume(stream) => {
                    backend = stream;
                    continue;
                }
                pooled::Parked::End(end) => break (end, None),
            }
        }
        if matches!(end, RelayEnd::BackendDrained) {
            // Both directions stopped between messages (a write cut
            // halfway would leave neither backend usable): stay or move.
            if client.pump.clean() && from_backend.clean() {
                let Some(stream) = BackendStream::unsplit(backend_read, backend_write) else {
                    break (RelayEnd::BackendGone { after_fatal: false }, None);
                };
                let at_boundary = client.batch_start && state.idle();
                match Box::pin(drain::leave(
                    node,
                    &state,
                    session,
                    stream,
                    at_boundary,
                    &mut from_backend,
                ))
                .await
                {
                    drain::Left::Moved(next) => {
                        from_backend = PumpSide::default();
                        backend = next;
                    }
                    drain::Left::Stayed(same) => {
                        state.drain_blocked.store(true, Ordering::Relaxed);
                        backend = same;
                    }
                    drain::Left::Broken => {
                        break (RelayEnd::BackendGone { after_fatal: false }, None);
                    }
                }
                continue;
            }
            break (
                RelayEnd::BackendGone { after_fatal: false },
                Some(backend_write),
            );
        }
        let mut movable = replicating
            && matches!(
                end,
                RelayEnd::BackendGone { after_fatal: false }
                    | RelayEnd::BackendDown
                    | RelayEnd::BackendClosing { .. }
            )
            && client.pump.clean()
            && from_backend.clean();
        // 57P01 is also what pg_terminate_backend() sends: if the server
        // still takes logins, that session was meant to end.
        if movable {
            if let RelayEnd::BackendClosing { code, .. } = &end {
                movable = code != "57P01" || !Box::pin(backend_accepts(node, session)).await;
            }
        }
        tracing::debug!(
            backend = %session.backend_name,
            ?end,
            movable,
            client_clean = client.pump.clean(),
            backend_clean = from_backend.clean(),
            "relay ended"
        );
        if movable {
            drop(backend_read);
            drop(backend_write);
            if let Some(next) = Box::pin(move_session(
                node,
                &state,
                session,
                &mut client,
                &mut client_write,
            ))
            .await
            {
                from_backend = PumpSide::default();
                backend = next;
                continue;
            }
            break (RelayEnd::BackendGone { after_fatal: false }, None);
        }
        break (end, Some(backend_write));
    };
    // A transaction that held the cluster DDL lease ends with the session.
    let lease = state.lease_dropped();
    if let (true, Some(lane)) = (lease != 0, state.lane.clone()) {
        let (node, token, backend) = (
            node.clone(),
            state.lease_token,
            session.backend_name.clone(),
        );
        tokio::spawn(async move {
            let _ = ddl_lease::give_back(&node, &lane, token, lease, None, &backend).await;
        });
    }
    let mut out = BytesMut::new();
    match end {
        RelayEnd::ClientDone | RelayEnd::Shutdown | RelayEnd::Idle => {}
        RelayEnd::ClientProtocol(e) => {
            node.metrics.error(ErrorKind::Protocol);
            tracing::debug!(error = %e, "client protocol violation");
            protocol::error_response(&mut out, Severity::Fatal, "08P01", &e.to_string(), None);
        }
        RelayEnd::BackendGone { after_fatal } => {
            if !after_fatal {
                node.metrics.error(ErrorKind::BackendLost);
                protocol::error_response(
                    &mut out,
                    Severity::Fatal,
                    "08006",
                    "connection to the backend was lost",
                    Some("The PostgreSQL server closed the connection unexpectedly."),
                );
            }
        }
        RelayEnd::BackendClosing { raw, .. } => out = raw,
        RelayEnd::BackendDown | RelayEnd::BackendDrained => {
            node.metrics.error(ErrorKind::BackendLost);
            protocol::error_response(
                &mut out,
                Severity::Fatal,
                "08006",
                "the backend stopped answering health checks",
                None,
            );
        }
    }
    if !out.is_empty() {
        let _ = client_write.write_all(&out).await;
    }
    let _ = client_write.shutdown().await;
    // Say goodbye to the backend so it does not log an unexpected EOF.
    if let Some(backend_write) = backend_write.as_mut() {
        let _ = backend_write.write_all(&[b'X', 0, 0, 0, 4]).await;
    }
}

/// Whether the session's backend still takes logins (within a second).
pub(super) async fn backend_accepts(node: &Node, session: &Session) -> bool {
    let Some(backend) = node.backend(&session.backend_name) else {
        return false;
    };
    let address = backend.address();
    let login = session.login(&address, backend.tls.as_ref(), &session.params);
    match backend::connect(&login, Duration::from_secs(1)).await {
        Ok(mut probe) => {
            let _ = probe.stream.write_all(&[b'X', 0, 0, 0, 4]).await;
            true
        }
        // The server answers, and refuses this login for a reason of its
        // own (its database was just dropped or renamed, which is what
        // ended the session): it is up. Only a server going down (class
        // 57) does not count.
        Err(backend::BackendError::Refused { raw, .. }) => raw
            .get(5..)
            .map(protocol::parse_error_fields)
            .is_some_and(|fields| !fields.code.starts_with("57")),
        Err(_) => false,
    }
}

/// A statement that leaves a new backend connection in a failed
/// transaction block, as the client's was when its backend failed: the
/// backend then answers the client's next statements as PostgreSQL does in
/// an aborted transaction (25P02, and COMMIT rolls back).
pub(super) const LOST_TRANSACTION_SQL: &str = "BEGIN; DO $$BEGIN RAISE EXCEPTION \
    'chorus: the transaction was lost with its backend' USING ERRCODE = '40001'; END$$";

/// Give a session whose backend failed another backend, between messages:
/// log in as the session did (with the settings the old backend reported),
/// prepare its named statements again, and answer what the client is owed:
/// each statement in flight gets ERROR 08006 (its outcome is unknown: it
/// may have committed on the failed backend), then ReadyForQuery. An open
/// transaction is lost: the new connection is put in a failed transaction
/// block, so that the client's next statements fail (25P02) until it rolls
/// back, exactly as in an aborted transaction. `None` when no backend took
/// the session within `MOVE_LIMIT`.
pub(super) async fn move_session<W: AsyncWrite + Unpin>(
    node: &Node,
    state: &RelayState,
    session: &mut Session,
    client: &mut ClientSide,
    client_write: &mut W,
) -> Option<BackendStream> {
    let from = session.backend_name.clone();
    node.set_backend_down(&from, true);
    let in_block = matches!(state.tx_status.load(Ordering::Relaxed), b'T' | b'E');
    let params = moved_params(state, session);
    let Some((name, address, mut connection)) =
        login_elsewhere(node, state, session, &params).await
    else {
        tracing::warn!(from = %from, "a session whose backend failed found no other backend");
        return None;
    };
    // The session's transaction state and named statements, on the new
    // connection (the lost transaction's error is expected).
    let first = in_block.then_some(LOST_TRANSACTION_SQL);
    if set_up(&mut connection.stream, state, first).await.is_none() {
        tracing::warn!(backend = %name, "a moved session could not be set up");
        return None;
    }
    // What the client is owed. (A probe's question was the relay's own; a
    // DDL job pushed at the start of a batch whose Sync has not gone yet,
    // `ClientSide::log_run`, is answered with the rest of that batch.)
    let status = if in_block { b'E' } else { b'I' };
    let unsent_job = usize::from(client.log_run.take().is_some());
    let owed = state
        .pending
        .lock()
        .map(|mut p| {
            p.drain(..)
                .filter(|p| {
                    !matches!(
                        p,
                        Pending::Stamp(_) | Pending::Ahead { .. } | Pending::Probe { .. }
                    )
                })
                .count()
        })
        .unwrap_or(0)
        .saturating_sub(unsent_job);
    let message = format!(
        "the connection to backend \"{from}\" was lost; the outcome of the statement in progress is unknown"
    );
    let detail = format!(
        "The session goes on with backend \"{name}\"{}.",
        if in_block {
            "; its transaction was rolled back"
        } else {
            ""
        }
    );
    let mut out = BytesMut::new();
    for _ in 0..owed {
        protocol::error_response(&mut out, Severity::Error, "08006", &message, Some(&detail));
        protocol::ready_for_query(&mut out, protocol::transaction_status(status));
    }
    // A batch under way (messages since its last Sync went to the failed
    // backend): its error now, the rest of it dropped, its Sync answered by
    // the new backend.
    if !client.batch_start {
        protocol::error_response(&mut out, Severity::Error, "08006", &message, Some(&detail));
        client.discard_until_sync = true;
    }
    if !out.is_empty() && client_write.write_all(&out).await.is_err() {
        return None;
    }
    state.stamps.store(0, Ordering::SeqCst);
    state.ddl_jobs.store(0, Ordering::SeqCst);
    state.probes.store(0, Ordering::SeqCst);
    state.txn_stamped.store(false, Ordering::Relaxed);
    // The transaction that held the cluster DDL lease is lost with its
    // backend.
    let lease = state.lease_dropped();
    if let (true, Some(lane)) = (lease != 0, &state.lane) {
        let _ = ddl_lease::give_back(node, lane, state.lease_token, lease, None, &from).await;
    }
    state.lease_release_due.store(false, Ordering::SeqCst);
    state.ddl_settings_sent.store(false, Ordering::SeqCst);
    state.scope_local.store(0, Ordering::SeqCst);
    state.ddl_scope_local.store(0, Ordering::Relaxed);
    state.tx_status.store(status, Ordering::Relaxed);
    state.lost_transaction.store(
        in_block && owed == 0 && client.batch_start,
        Ordering::Relaxed,
    );
    client.stamped = false;
    client.scope_pending.clear();
    tracing::info!(from = %from, to = %name, owed, in_block, "session moved to another backend");
    Some(retarget(node, state, session, name, &address, connection))
}
