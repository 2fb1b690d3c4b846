//! Leaving a backend drained for maintenance (the admin console's `DRAIN`):
//! a session moves to another backend between two of its transactions,
//! taking its settings and its prepared statements along, so that the
//! client cannot tell. Only a session that leaves nothing behind moves: no
//! temporary table, open cursor, SQL-level prepared statement, LISTEN,
//! advisory lock or changed role. One that has any stays where it is, and
//! asks again after its next transaction; `SHOW CLIENTS` shows where each
//! session is. Sessions of a database that does not replicate (configured
//! local) stay too: its contents differ from backend to backend.
//!
//! The session is asked on its own connection, at a point where nothing of
//! the client's is in flight there (see `relay`): the relay sends the
//! question and reads its answer itself.

use bytes::BytesMut;
use tokio::io::AsyncWriteExt;

use crate::backend::BackendStream;
use crate::node::Node;
use crate::wire::protocol::{self, read_message};

use super::elsewhere::{login_elsewhere, moved_params, retarget, set_up};
use super::pump::PumpSide;
use super::state::{RelayState, Session, MOVE_LIMIT};

/// How a session fared at leaving its drained backend.
pub(super) enum Left {
    /// It goes on with another backend.
    Moved(BackendStream),
    /// It stays on this one for now.
    Stayed(BackendStream),
    /// Its backend connection failed meanwhile.
    Broken,
}

/// Whether the session may leave (first value, `t` or `f`), and the
/// settings it changed, as one statement that makes them again (second).
/// Chorus's own settings are left out, except the two a client sets.
const QUESTION: &str = "SELECT (NOT EXISTS (SELECT FROM pg_catalog.pg_prepared_statements WHERE from_sql) \
       AND NOT EXISTS (SELECT FROM pg_catalog.pg_cursors) \
       AND NOT EXISTS (SELECT FROM pg_catalog.pg_listening_channels()) \
       AND NOT EXISTS (SELECT FROM pg_catalog.pg_locks \
                        WHERE pid = pg_catalog.pg_backend_pid() AND locktype = 'advisory') \
       AND NOT EXISTS (SELECT FROM pg_catalog.pg_class WHERE relnamespace = pg_catalog.pg_my_temp_schema()) \
       AND session_user = current_user)::text, \
  (SELECT 'SELECT ' || pg_catalog.string_agg(pg_catalog.format('pg_catalog.set_config(%L, %L, false)', name, setting), ', ') \
     FROM pg_catalog.pg_settings \
    WHERE source = 'session' \
      AND (name NOT LIKE 'chorus.%' OR name IN ('chorus.commit_scope', 'chorus.ddl_scope')))";

/// Leave the drained backend behind `stream` if the session may: at a
/// transaction boundary (`at_boundary`) and with nothing of its own there.
/// Messages the backend sent meanwhile (a notice) go to `from_backend` for
/// the client if the session stays.
pub(super) async fn leave(
    node: &Node,
    state: &RelayState,
    session: &mut Session,
    mut stream: BackendStream,
    at_boundary: bool,
    from_backend: &mut PumpSide,
) -> Left {
    // (A database that does not replicate has other contents on every
    // backend: its sessions stay.)
    let elsewhere = node
        .session_backends()
        .iter()
        .any(|b| b.name != session.backend_name);
    if !at_boundary || !state.replicated_database || !elsewhere {
        return Left::Stayed(stream);
    }
    let Some(answer) = ask(&mut stream, from_backend).await else {
        return Left::Broken;
    };
    let settings = match answer {
        Some((movable, settings)) if movable => settings,
        _ => {
            tracing::debug!(backend = %session.backend_name, "a session stays on its drained backend: it has state there");
            return Left::Stayed(stream);
        }
    };
    let params = moved_params(state, session);
    let Some((name, address, mut connection)) =
        login_elsewhere(node, state, session, &params).await
    else {
        tracing::warn!(backend = %session.backend_name, "a session found no other backend to leave its drained one for");
        return Left::Stayed(stream);
    };
    // Its settings and named statements, on the new connection.
    if set_up(&mut connection.stream, state, settings.as_deref()).await != Some(true) {
        tracing::warn!(backend = %name, "a session leaving a drained backend could not be set up on another");
        let _ = connection.stream.write_all(&[b'X', 0, 0, 0, 4]).await;
        return Left::Stayed(stream);
    }
    let _ = stream.write_all(&[b'X', 0, 0, 0, 4]).await;
    tracing::debug!(from = %session.backend_name, to = %name, "a session left its drained backend");
    Left::Moved(retarget(node, state, session, name, &address, connection))
}

/// Ask the session's backend `QUESTION`: `None` when the connection
/// failed or did not answer in time, `Some(None)` when the question
/// failed, else whether the session may move and its settings' statement.
pub(super) async fn ask(
    stream: &mut BackendStream,
    from_backend: &mut PumpSide,
) -> Option<Option<(bool, Option<String>)>> {
    let mut out = BytesMut::new();
    protocol::query(&mut out, QUESTION);
    let answer = async {
        stream.write_all(&out).await.ok()?;
        let mut values = None;
        let mut failed = false;
        let mut buf = BytesMut::new();
        loop {
            let tag = read_message(stream, &mut buf, 1 << 20).await.ok()?;
            match tag {
                b'D' => values = Some(protocol::data_row_texts(&buf)),
                b'E' => failed = true,
                b'Z' => break,
                b'T' | b'C' => {}
                // A notice or notification meanwhile: the client's.
                _ => protocol::write_message(&mut from_backend.buf, tag, |m| {
                    m.extend_from_slice(&buf)
                }),
            }
            buf.clear();
        }
        Some(match (failed, values) {
            (false, Some(values)) => {
                let movable = values.first().cloned().flatten().as_deref() == Some("true");
                Some((movable, values.get(1).cloned().flatten()))
            }
            _ => None,
        })
    };
    tokio::time::timeout(MOVE_LIMIT, answer)
        .await
        .ok()
        .flatten()
}
