//! Leaving a backend drained for maintenance (the admin console's `DRAIN`):
//! a session moves to another backend between two of its transactions,
//! taking its settings and its prepared statements along, so that the
//! client cannot tell; SQL-level prepared statements (`PREPARE`) go along
//! too, made again from their text. Only a session that leaves nothing
//! behind moves: no temporary table, open cursor, LISTEN, advisory lock or
//! changed role. One that has any stays where it is, and asks again after
//! its next transaction; `SHOW CLIENTS` shows where each session is.
//! Sessions of a database that does not replicate (configured local) stay
//! too: its contents differ from backend to backend.
//!
//! The session is asked on its own connection, at a point where nothing of
//! the client's is in flight there (see `relay`): the relay sends the
//! question and reads its answer itself.

use std::sync::Arc;

use bytes::BytesMut;
use tokio::io::AsyncWriteExt;

use crate::backend::pool::SqlPrepared;
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

/// Whether the session may leave (first value, `t` or `f`); the settings
/// it changed, as one statement that makes them again (second), Chorus's
/// own left out except the two a client sets; its SQL-level prepared
/// statements, as a JSON array of [name, the query string that made it]
/// (third).
const QUESTION: &str = "SELECT (NOT EXISTS (SELECT FROM pg_catalog.pg_cursors) \
       AND NOT EXISTS (SELECT FROM pg_catalog.pg_listening_channels()) \
       AND NOT EXISTS (SELECT FROM pg_catalog.pg_locks \
                        WHERE pid = pg_catalog.pg_backend_pid() AND locktype = 'advisory') \
       AND NOT EXISTS (SELECT FROM pg_catalog.pg_class WHERE relnamespace = pg_catalog.pg_my_temp_schema()) \
       AND session_user = current_user)::text, \
  (SELECT 'SELECT ' || pg_catalog.string_agg(pg_catalog.format('pg_catalog.set_config(%L, %L, false)', name, setting), ', ') \
     FROM pg_catalog.pg_settings \
    WHERE source = 'session' \
      AND (name NOT LIKE 'chorus.%' OR name IN ('chorus.commit_scope', 'chorus.ddl_scope'))), \
  (SELECT pg_catalog.json_agg(pg_catalog.json_build_array(name, statement) ORDER BY name) \
     FROM pg_catalog.pg_prepared_statements WHERE from_sql)::text";

/// What a session holds on its backend connection, as `ask` found it.
pub(super) struct Held {
    /// Nothing there ties it to this connection.
    pub(super) movable: bool,
    /// The statement that makes its settings again, none when it has none.
    pub(super) settings: Option<String>,
    /// Its SQL-level prepared statements.
    pub(super) sql_prepared: Arc<SqlPrepared>,
}

impl Held {
    /// Read the answer to `QUESTION`. A prepared statement whose own
    /// statement is not found in the query string it came from (see
    /// `chorus_router::preparing_statement`) cannot be made again: the
    /// session is then not movable.
    fn read(values: &[Option<String>]) -> Held {
        let mut movable = values.first().cloned().flatten().as_deref() == Some("true");
        // (A list that cannot be read keeps the session where it is.)
        let listed: Vec<(String, String)> = match values.get(2).cloned().flatten() {
            None => Vec::new(),
            Some(json) => serde_json::from_str(&json).unwrap_or_else(|_| {
                movable = false;
                Vec::new()
            }),
        };
        let mut sql_prepared = Vec::with_capacity(listed.len());
        for (name, query) in listed {
            match chorus_router::preparing_statement(&query, &name) {
                Some(statement) => sql_prepared.push((name, statement.trim().to_owned())),
                None => movable = false,
            }
        }
        Held {
            movable,
            settings: values.get(1).cloned().flatten(),
            sql_prepared: Arc::new(sql_prepared),
        }
    }

    /// One query that makes the settings and the prepared statements again
    /// (statements are joined by a line break first: one may end in a
    /// `--` comment), none when there is nothing to make.
    fn remake(&self) -> Option<String> {
        let statements: Vec<&str> = self
            .settings
            .iter()
            .map(String::as_str)
            .chain(self.sql_prepared.iter().map(|(_, sql)| sql.as_str()))
            .collect();
        (!statements.is_empty()).then(|| statements.join("\n;\n"))
    }
}

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
    let remake = match answer {
        Some(held) if held.movable => held.remake(),
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
    if set_up(&mut connection.stream, state, remake.as_deref()).await != Some(true) {
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
/// failed, else what the session holds there.
pub(super) async fn ask(
    stream: &mut BackendStream,
    from_backend: &mut PumpSide,
) -> Option<Option<Held>> {
    let mut out = BytesMut::new();
    protocol::query(&mut out, QUESTION);
    let answer = async {
        stream.write_all(&out).await.ok()?;
        let mut values = None;
        let mut failed = false;
        let mut buf = BytesMut::new();
        loop {
            let tag = read_message(stream, &mut buf, 1 << 30).await.ok()?;
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
            (false, Some(values)) => Some(Held::read(&values)),
            _ => None,
        })
    };
    tokio::time::timeout(MOVE_LIMIT, answer)
        .await
        .ok()
        .flatten()
}
