//! Transaction pooling (`pool.mode = "transaction"`): a session holds a
//! server connection for one transaction, gives it back to the node's pool
//! (backend/pool.rs) when the transaction ends, and takes one again when
//! its client sends the next statement.
//!
//! What a client made in its session goes with it from one connection to
//! the next, so that it cannot tell:
//! - the settings the server reports (`client_encoding`, `DateStyle`,
//!   `TimeZone`, `application_name`, …) and those made with `SET`, as they
//!   were when the session last gave a connection back;
//! - its named prepared statements, of the extended protocol: each
//!   connection remembers the ones it has (by name and text), and gets the
//!   session's that it lacks before the session's first message;
//! - its SQL-level prepared statements (`PREPARE`), likewise, by name and
//!   the statement that made them (found in the query string the server
//!   keeps for each, after a transaction that may have made or dropped
//!   some);
//! - the commit scope and DDL scope (relay state).
//!
//! A session with state that cannot move keeps its connection (it is
//! pinned) until that state is gone: temporary tables, cursors WITH HOLD,
//! LISTEN, session advisory locks, a changed role. The relay asks the server (the drain question, see
//! drain.rs) after a transaction whose statements may have made such
//! state (`chorus_router::may_keep_session_state`), and after every
//! transaction of a pinned session.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::watch;

use crate::backend::pool::{PoolKey, PreparedStatements, Server, ServerState};
use crate::backend::{self, BackendError, BackendStream};
use crate::metrics::GaugeGuard;
use crate::node::Node;
use crate::wire::protocol::{self, read_message, Severity};

use super::carried::{Lease, Pooled, MOVED_SETTINGS};
use super::client::quote_literal;
use super::drain;
use super::pump::{read_more, PumpSide};
use super::reads::{read_backends, read_only_request};
use super::state::{ClientSide, RelayEnd, RelayState, Session, MOVE_LIMIT};

/// Why a session got no server connection.
pub(super) enum Refusal {
    /// As an ERROR to the statement; the session goes on.
    Error {
        code: &'static str,
        message: String,
        hint: Option<&'static str>,
    },
    /// The backend refused the login (the ErrorResponse, whole): the
    /// session ends with it.
    Fatal(BytesMut),
}

/// Take a server connection for the session: from the pool of its home
/// backend (another one while the home is down or drained), waiting up to
/// `pool.query_wait_timeout_ms` for one to be free, or a new one. The
/// connection is set up as the session left its last one.
pub(super) async fn check_out(
    node: &Node,
    state: &RelayState,
    session: &mut Session,
    read_only: bool,
) -> Result<BackendStream, Refusal> {
    let wait = Duration::from_millis(node.config.pool.query_wait_timeout_ms);
    let idle_limit = Duration::from_millis(node.config.pool.server_idle_timeout_ms);
    let deadline = Instant::now() + wait;
    let lane = state.lane.as_deref().filter(|_| state.replicated_database);
    let home = node.config.home_backend().name.clone();
    let mut failure = None;
    let backends = node.session_backends();
    let mut candidates: Vec<_> = backends.iter().collect();
    if read_only {
        if let (Some(lane), Some(pooled)) = (lane, session.pooled.as_mut()) {
            if let Some(order) = read_backends(node, state, lane, pooled, &candidates).await {
                candidates = order;
            }
        }
    }
    for candidate in candidates {
        // Another node's home takes writes once its changes reach every
        // peer (see `wait_streams_ready`).
        if let Some(lane) = lane.filter(|_| candidate.name != home) {
            let limit = Duration::from_secs(1);
            if !crate::cluster::replication::wait_streams_ready(node, lane, candidate, limit).await
            {
                continue;
            }
        }
        let Some(pooled) = session.pooled.as_mut() else {
            break;
        };
        let pool = match pooled.pools.iter().find(|(b, _)| *b == candidate.name) {
            Some((_, pool)) => pool.clone(),
            None => {
                let pool = node.pool.key(&PoolKey {
                    backend: candidate.name.clone(),
                    user: session.user.clone(),
                    database: session.database.clone(),
                    params: pooled.key_params.clone(),
                });
                pooled.pools.push((candidate.name.clone(), pool.clone()));
                pool
            }
        };
        let left = deadline.saturating_duration_since(Instant::now());
        let Ok((permit, idle)) = pool.take(left, idle_limit).await else {
            node.metrics.error(crate::metrics::ErrorKind::Capacity);
            return Err(Refusal::Error {
                code: "53300",
                message: format!(
                    "no server connection to backend \"{}\" was free within pool.query_wait_timeout_ms ({} ms)",
                    candidate.name,
                    wait.as_millis()
                ),
                hint: Some("Raise pool.size, or keep transactions shorter."),
            });
        };
        let address = candidate.address();
        let mut server = match idle {
            Some(server) => server,
            None => {
                let login = backend::LoginParams {
                    address: &address,
                    tls: candidate.tls.as_ref(),
                    user: &session.user,
                    password: session.password.as_deref(),
                    database: &session.database,
                    params: &pooled.key_params,
                };
                match backend::connect(&login, node.live().config.backend_connect_timeout()).await {
                    Ok(connection) => {
                        node.set_backend_down(&candidate.name, false);
                        let reported = reported_in(&connection.startup_messages);
                        pool.note_defaults(&reported);
                        Server::new(
                            connection.stream,
                            connection.pid,
                            connection.secret,
                            ServerState {
                                reported,
                                ..ServerState::default()
                            },
                        )
                    }
                    Err(BackendError::Refused { raw, .. }) => return Err(Refusal::Fatal(raw)),
                    Err(e) => {
                        node.set_backend_down(&candidate.name, true);
                        tracing::warn!(backend = %candidate.name, error = %e, "backend login failed");
                        failure.get_or_insert(format!(
                            "could not connect to backend \"{}\": {e}",
                            candidate.name
                        ));
                        continue;
                    }
                }
            }
        };
        // A setting the session never set is the login's, not what the
        // connection's last session left.
        if !pooled.complete {
            for (name, value) in pool.defaults() {
                let taken = MOVED_SETTINGS.iter().any(|m| m.eq_ignore_ascii_case(&name));
                if taken && value_of(&pooled.desired, &name).is_none() {
                    pooled.desired.push((name, value));
                }
            }
            pooled.complete = true;
        }
        if set_up(&mut server, state, pooled).await.is_none() {
            tracing::warn!(backend = %candidate.name, "a pooled server connection could not be set up");
            failure.get_or_insert(format!(
                "could not set up a connection to backend \"{}\"",
                candidate.name
            ));
            continue;
        }
        state
            .ddl_settings_sent
            .store(server.state.ddl_settings_sent, Ordering::SeqCst);
        state.backend_pid.store(server.pid, Ordering::Relaxed);
        session
            .cancel_key
            .retarget(&address, server.pid, server.secret);
        session.backend_open = node
            .metrics
            .backend_connections(&candidate.name)
            .map(|conns| GaugeGuard::new(&conns));
        session.backend_name = candidate.name.clone();
        pooled.lease = Some(Lease {
            pool,
            _permit: permit,
            server: server.state,
        });
        return Ok(server.stream);
    }
    Err(Refusal::Error {
        code: "08006",
        message: failure.unwrap_or_else(|| "no backend to connect to".to_owned()),
        hint: None,
    })
}

/// The ParameterStatus messages of a login, as (name, value).
fn reported_in(startup_messages: &[u8]) -> Vec<(String, String)> {
    let mut reported = Vec::new();
    let mut rest = startup_messages;
    while rest.len() >= 5 {
        let length = u32::from_be_bytes([rest[1], rest[2], rest[3], rest[4]]) as usize;
        let Some(body) = rest.get(5..1 + length) else {
            break;
        };
        if rest[0] == b'S' {
            if let Some(pair) = parameter(body) {
                reported.push(pair);
            }
        }
        rest = &rest[1 + length..];
    }
    reported
}

/// A ParameterStatus body as (name, value).
fn parameter(body: &[u8]) -> Option<(String, String)> {
    let (name, rest) = protocol::read_cstr(body).ok()?;
    let (value, _) = protocol::read_cstr(rest).ok()?;
    Some((name.to_owned(), value.to_owned()))
}

fn set_value(list: &mut Vec<(String, String)>, name: &str, value: &str) {
    match list.iter_mut().find(|(n, _)| n.eq_ignore_ascii_case(name)) {
        Some(entry) if entry.1 != value => entry.1 = value.to_owned(),
        Some(_) => {}
        None => list.push((name.to_owned(), value.to_owned())),
    }
}

fn value_of<'a>(list: &'a [(String, String)], name: &str) -> Option<&'a str> {
    list.iter()
        .find(|(n, _)| n.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_str())
}

/// What each ReadyForQuery of a set-up answers.
enum Step {
    /// Settings: an error fails the set-up.
    Settings,
    /// The reported settings made again: likewise, and its row holds
    /// their values as the server keeps them.
    Tracked,
    /// Statements closed.
    Closes,
    /// A named statement prepared: an error leaves it out (the client's
    /// own Parse of it failed too, or it would not be remembered).
    Parse(String),
    /// Another session's SQL-level statement dropped (an error: it was
    /// not there).
    Deallocate,
    /// An SQL-level statement made again: an error leaves it out (its
    /// table may be gone; the client's EXECUTE then fails, as a re-plan
    /// would have).
    Prepare(String),
}

/// Make `server` hold what the session holds: its settings, then its
/// named statements (closing those of other sessions under other texts).
/// Nothing is sent when they agree. `None` when the connection failed, or
/// its settings could not be made.
async fn set_up(server: &mut Server, state: &RelayState, pooled: &mut Pooled) -> Option<()> {
    let mut out = BytesMut::new();
    let mut steps = Vec::new();
    let have = &mut server.state;
    let reset = have.settings != pooled.settings;
    if reset {
        protocol::query(&mut out, "RESET ALL");
        steps.push(Step::Settings);
        if let Some(sql) = &pooled.settings {
            protocol::query(&mut out, sql);
            steps.push(Step::Settings);
        }
    }
    // (set_config answers with each value as the server keeps it, which
    // the server does not report again when it did not change.)
    let changed: Vec<&(String, String)> = pooled
        .desired
        .iter()
        .filter(|(name, value)| reset || value_of(&have.reported, name) != Some(value.as_str()))
        .collect();
    let changes: Vec<String> = changed
        .iter()
        .map(|(name, value)| {
            format!(
                "pg_catalog.set_config({}, {}, false)",
                quote_literal(name),
                quote_literal(value)
            )
        })
        .collect();
    let set_names: Vec<String> = changed.iter().map(|(name, _)| name.clone()).collect();
    if !changes.is_empty() {
        protocol::query(&mut out, &format!("SELECT {}", changes.join(", ")));
        steps.push(Step::Tracked);
        for (name, value) in &pooled.desired {
            set_value(&mut have.reported, name, value);
        }
    }
    let wanted: Arc<PreparedStatements> =
        state.prepared.lock().map(|p| p.clone()).unwrap_or_default();
    if !Arc::ptr_eq(&have.prepared, &wanted) {
        let stale: Vec<&String> = have
            .prepared
            .iter()
            .filter(|(name, parse)| wanted.get(*name) != Some(parse))
            .map(|(name, _)| name)
            .collect();
        if !stale.is_empty() {
            for name in &stale {
                protocol::write_message(&mut out, b'C', |m| {
                    m.extend_from_slice(b"S");
                    protocol::put_cstr(m, name);
                });
            }
            protocol::write_message(&mut out, b'S', |_| {});
            steps.push(Step::Closes);
        }
        for (name, parse) in wanted.iter() {
            if have.prepared.get(name) != Some(parse) {
                out.extend_from_slice(parse);
                protocol::write_message(&mut out, b'S', |_| {});
                steps.push(Step::Parse(name.clone()));
            }
        }
    }
    let wanted_sql = pooled.sql_prepared.clone();
    if !Arc::ptr_eq(&have.sql_prepared, &wanted_sql) {
        for (name, statement) in have.sql_prepared.iter() {
            if !wanted_sql.iter().any(|(n, s)| n == name && s == statement) {
                protocol::query(
                    &mut out,
                    &format!("DEALLOCATE \"{}\"", name.replace('"', "\"\"")),
                );
                steps.push(Step::Deallocate);
            }
        }
        for (name, statement) in wanted_sql.iter() {
            if !have
                .sql_prepared
                .iter()
                .any(|(n, s)| n == name && s == statement)
            {
                protocol::query(&mut out, statement);
                steps.push(Step::Prepare(name.clone()));
            }
        }
    }
    have.settings = pooled.settings.clone();
    if steps.is_empty() {
        have.prepared = wanted;
        have.sql_prepared = wanted_sql;
        return Some(());
    }
    let stream = &mut server.stream;
    let mut unprepared = Vec::new();
    let mut sql_unprepared = Vec::new();
    let run = async {
        stream.write_all(&out).await.ok()?;
        let mut buf = BytesMut::new();
        let mut failed = false;
        let mut steps = steps.into_iter().peekable();
        loop {
            match read_message(stream, &mut buf, 1 << 30).await.ok()? {
                b'E' => failed = true,
                b'S' => {
                    if let Some((name, value)) = parameter(&buf) {
                        set_value(&mut have.reported, &name, &value);
                    }
                }
                b'D' if matches!(steps.peek(), Some(Step::Tracked)) => {
                    for (name, value) in set_names.iter().zip(protocol::data_row_texts(&buf)) {
                        if let Some(value) = value {
                            set_value(&mut have.reported, name, &value);
                        }
                    }
                }
                b'Z' => {
                    match (steps.next()?, std::mem::take(&mut failed)) {
                        (Step::Settings | Step::Tracked | Step::Closes, true) => return None,
                        (Step::Parse(name), true) => unprepared.push(name),
                        (Step::Prepare(name), true) => sql_unprepared.push(name),
                        _ => {}
                    }
                    if steps.peek().is_none() {
                        return Some(());
                    }
                }
                _ => {}
            }
        }
    };
    tokio::time::timeout(MOVE_LIMIT, run).await.ok().flatten()?;
    have.prepared = if unprepared.is_empty() {
        wanted
    } else {
        let mut prepared = (*wanted).clone();
        for name in &unprepared {
            prepared.remove(name);
        }
        Arc::new(prepared)
    };
    have.sql_prepared = if sql_unprepared.is_empty() {
        wanted_sql
    } else {
        let mut made = (*wanted_sql).clone();
        made.retain(|(name, _)| !sql_unprepared.contains(name));
        Arc::new(made)
    };
    // The client knows the values as the server reports them.
    for (name, value) in pooled.desired.iter_mut() {
        if let Some(reported) = value_of(&server.state.reported, name) {
            *value = reported.to_owned();
        }
    }
    Some(())
}

/// The names of the protocol-level prepared statements the server behind
/// `stream` has (asked between transactions); `None` when the connection
/// failed or did not answer in time. Notices meanwhile go to the client.
async fn statement_names(
    stream: &mut BackendStream,
    from_backend: &mut PumpSide,
) -> Option<std::collections::HashSet<String>> {
    let mut out = BytesMut::new();
    protocol::query(
        &mut out,
        "SELECT name FROM pg_catalog.pg_prepared_statements WHERE NOT from_sql",
    );
    let answer = async {
        stream.write_all(&out).await.ok()?;
        let mut names = std::collections::HashSet::new();
        let mut failed = false;
        let mut buf = BytesMut::new();
        loop {
            match read_message(stream, &mut buf, 1 << 30).await.ok()? {
                b'D' => {
                    if let Some(Some(name)) = protocol::data_row_texts(&buf).into_iter().next() {
                        names.insert(name);
                    }
                }
                b'E' => failed = true,
                b'Z' => break,
                b'T' | b'C' => {}
                tag => protocol::write_message(&mut from_backend.buf, tag, |m| {
                    m.extend_from_slice(&buf)
                }),
            }
            buf.clear();
        }
        (!failed).then_some(names)
    };
    tokio::time::timeout(MOVE_LIMIT, answer)
        .await
        .ok()
        .flatten()
}

/// What became of a session's connection at the end of a transaction.
pub(super) enum Released {
    /// Back in the pool.
    Given,
    /// Still the session's (it is pinned).
    Kept(BackendStream),
    /// It failed meanwhile.
    Broken,
}

/// Give the session's connection back at the end of a transaction, unless
/// the session has state there (it asks the server when its statements
/// may have made some, or when it was pinned).
pub(super) async fn give_back(
    node: &Node,
    state: &RelayState,
    session: &mut Session,
    mut stream: BackendStream,
    from_backend: &mut PumpSide,
) -> Released {
    let Some(pooled) = session.pooled.as_mut() else {
        return Released::Kept(stream);
    };
    if state.session_touched.swap(false, Ordering::Relaxed) || pooled.pinned {
        match drain::ask(&mut stream, from_backend).await {
            None => {
                pooled.lease = None;
                return Released::Broken;
            }
            Some(Some(held)) if held.movable => {
                pooled.settings = held.settings;
                // (What the connection has: without the question, what
                // `set_up` made there.)
                if let Some(lease) = pooled.lease.as_mut() {
                    lease.server.sql_prepared = held.sql_prepared.clone();
                }
                pooled.sql_prepared = held.sql_prepared;
                pooled.pinned = false;
            }
            Some(_) => {
                pooled.pinned = true;
                return Released::Kept(stream);
            }
        }
    }
    // Named statements prepared in this transaction: only those the server
    // has follow the session (a Parse that failed made none, and its
    // client may send it again, which must not meet one made by `set_up`
    // on the next connection). Without an error, every Parse went through.
    let current = state.prepared.lock().map(|p| p.clone()).unwrap_or_default();
    let unchanged = pooled
        .lease
        .as_ref()
        .is_some_and(|l| Arc::ptr_eq(&l.server.prepared, &current));
    if state.error_seen.swap(false, Ordering::Relaxed) && !unchanged && !current.is_empty() {
        let Some(names) = statement_names(&mut stream, from_backend).await else {
            pooled.lease = None;
            return Released::Broken;
        };
        if current.keys().any(|name| !names.contains(name)) {
            let mut made = (*current).clone();
            made.retain(|name, _| names.contains(name));
            if let Ok(mut prepared) = state.prepared.lock() {
                *prepared = Arc::new(made);
            }
        }
    }
    if let Ok(reported) = state.reported.lock() {
        for (name, value) in reported.iter() {
            set_value(&mut pooled.desired, name, value);
        }
    }
    let Some(mut lease) = pooled.lease.take() else {
        return Released::Kept(stream);
    };
    // (A session moved to another backend mid-transaction holds a
    // connection of that backend's pool now.)
    let pool = match pooled
        .pools
        .iter()
        .find(|(b, _)| *b == session.backend_name)
    {
        Some((_, pool)) => pool.clone(),
        None => lease.pool.clone(),
    };
    let Some((pid, secret)) = session.cancel_key.backend_key() else {
        return Released::Broken;
    };
    for (name, value) in &pooled.desired {
        set_value(&mut lease.server.reported, name, value);
    }
    lease.server.prepared = state.prepared.lock().map(|p| p.clone()).unwrap_or_default();
    lease.server.settings = pooled.settings.clone();
    lease.server.ddl_settings_sent = state.ddl_settings_sent.load(Ordering::SeqCst);
    pool.give_back(
        Server::new(stream, pid, secret, lease.server),
        node.pool.size(),
    );
    session.cancel_key.detach();
    session.backend_open = None;
    Released::Given
}

/// How a session between transactions goes on.
pub(super) enum Parked {
    /// With this connection, its client's next message buffered.
    Resume(BackendStream),
    /// The session ends.
    End(RelayEnd),
}

/// How long a parked session keeps its read buffers.
const TRIM_AFTER: Duration = Duration::from_secs(1);
/// The buffer a parked session waits with after that.
const IDLE_BUFFER: usize = 512;

/// Wait, without a server connection, for the client's next message (or
/// the node's shutdown), then take a connection for it. A message that
/// gets none is answered with the error.
#[allow(clippy::too_many_arguments)]
pub(super) async fn park<R, W>(
    node: &Node,
    state: &RelayState,
    session: &mut Session,
    client: &mut ClientSide,
    from_backend: &mut PumpSide,
    client_read: &mut R,
    client_write: &mut W,
    shutdown: &mut watch::Receiver<bool>,
) -> Parked
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    // A client that comes back at once keeps its buffers; one idle for
    // longer gives them back, and waits with a small one, so that many
    // idle clients cost little memory.
    let mut trimmed = false;
    loop {
        while client.pump.buf.is_empty() {
            let read = async {
                if trimmed {
                    client.pump.buf.reserve(IDLE_BUFFER);
                    client_read
                        .read_buf(&mut client.pump.buf)
                        .await
                        .map_or(true, |n| n == 0)
                } else {
                    read_more(client_read, &mut client.pump.buf).await.is_err()
                }
            };
            tokio::select! {
                ended = read => {
                    if ended {
                        return Parked::End(RelayEnd::ClientDone);
                    }
                }
                () = tokio::time::sleep(TRIM_AFTER), if !trimmed => {
                    client.pump.buf = BytesMut::new();
                    if from_backend.buf.is_empty() {
                        from_backend.buf = BytesMut::new();
                    }
                    trimmed = true;
                }
                () = async {
                    let _ = shutdown.wait_for(|started| *started).await;
                } => {
                    return Parked::End(super::answers::shutdown_session(client_write).await);
                }
            }
        }
        client.pump.rescan = true;
        // Terminate: nothing to take a connection for.
        if client.pump.buf.first() == Some(&b'X') {
            client.terminated = true;
            return Parked::End(RelayEnd::ClientDone);
        }
        let read_only = read_only_request(client, node.config.node.max_message_bytes);
        match Box::pin(check_out(node, state, session, read_only)).await {
            Ok(stream) => return Parked::Resume(stream),
            Err(Refusal::Fatal(raw)) => {
                return Parked::End(RelayEnd::BackendClosing {
                    code: String::new(),
                    raw,
                })
            }
            Err(Refusal::Error {
                code,
                message,
                hint,
            }) => {
                let mut error = BytesMut::new();
                protocol::error_response(&mut error, Severity::Error, code, &message, hint);
                let max = node.config.node.max_message_bytes;
                if let Err(end) = answer_alone(client, client_read, client_write, &error, max).await
                {
                    return Parked::End(end);
                }
            }
        }
    }
}

/// Answer the client's next request with `error` without a server: a
/// Query or FunctionCall gets it and ReadyForQuery; an extended-protocol
/// batch gets it once, and ReadyForQuery at its Sync (its other messages
/// are dropped, as after an error).
async fn answer_alone<R, W>(
    client: &mut ClientSide,
    client_read: &mut R,
    client_write: &mut W,
    error: &[u8],
    max: usize,
) -> Result<(), RelayEnd>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let buf = &mut client.pump.buf;
    let mut errored = false;
    loop {
        let framed = protocol::frame_header(buf, max).map_err(RelayEnd::ClientProtocol)?;
        let Some((tag, total)) = framed.filter(|(_, total)| buf.len() >= *total) else {
            if read_more(client_read, buf).await.is_err() {
                return Err(RelayEnd::ClientDone);
            }
            continue;
        };
        buf.advance(total);
        let mut out = BytesMut::new();
        let done = match tag {
            b'X' => return Err(RelayEnd::ClientDone),
            b'Q' | b'F' | b'S' => {
                if !errored {
                    out.extend_from_slice(error);
                }
                protocol::ready_for_query(&mut out, protocol::TransactionStatus::Idle);
                true
            }
            b'H' => false,
            _ => {
                if !std::mem::replace(&mut errored, true) {
                    out.extend_from_slice(error);
                }
                false
            }
        };
        if !out.is_empty() && client_write.write_all(&out).await.is_err() {
            return Err(RelayEnd::ClientDone);
        }
        if done {
            client.pump.rescan = !buf.is_empty();
            return Ok(());
        }
    }
}

/// The ParameterStatus messages a pooled session's client gets at
/// startup: the connection's, with the session's settings.
pub(super) fn startup_parameters(pooled: &Pooled) -> BytesMut {
    let mut out = BytesMut::new();
    let Some(lease) = &pooled.lease else {
        return out;
    };
    for (name, value) in &lease.server.reported {
        let value = value_of(&pooled.desired, name).unwrap_or(value);
        protocol::parameter_status(&mut out, name, value);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_login_reports_its_settings_and_the_session_keeps_its_own() {
        let mut login = BytesMut::new();
        protocol::parameter_status(&mut login, "TimeZone", "UTC");
        protocol::write_message(&mut login, b'N', |m| m.extend_from_slice(b"notice\0"));
        protocol::parameter_status(&mut login, "server_version", "15.18");
        let reported = reported_in(&login);
        assert_eq!(
            reported,
            [
                ("TimeZone".to_owned(), "UTC".to_owned()),
                ("server_version".to_owned(), "15.18".to_owned())
            ]
        );
        let pooled = Pooled::new(&[
            ("timezone".to_owned(), "Europe/Paris".to_owned()),
            ("options".to_owned(), "-c work_mem=8MB".to_owned()),
        ]);
        // The pool's connections log in without the settings a session
        // takes along; those follow the session.
        assert_eq!(
            pooled.key_params,
            [("options".to_owned(), "-c work_mem=8MB".to_owned())]
        );
        assert_eq!(value_of(&pooled.desired, "TimeZone"), Some("Europe/Paris"));
    }
}
