//! The admin console: a database of the node itself (`node.admin_database`,
//! by default `chorus`), as PgBouncer's `pgbouncer` database is. A role
//! named in `node.admin_users` logs in to it with psql or any client, after
//! the usual authentication rules, and reads the cluster's state as
//! ordinary result sets (every value text):
//!
//! - `SHOW VERSION`
//! - `SHOW NODES`: each Raft member, its address, its role as this node
//!   sees it, how long ago this node last heard from it, its home backend,
//!   state and duties, and its home's copy;
//! - `SHOW RAFT`: this node's term, leader, and committed and applied
//!   index;
//! - `SHOW BACKENDS`: each backend, whose home it is, whether this node
//!   sees it down, and how far it has applied the DDL log;
//! - `SHOW DATABASES`: the replicated databases;
//! - `SHOW DDL`: the tail of the DDL log;
//! - `SHOW CONFIG`: this node's settings as it runs with them, secrets
//!   and passwords left out;
//! - `SHOW CLIENTS`: this node's client sessions: the pid each client
//!   knows, its role, database and address, its backend and backend pid,
//!   how long it has been connected, and, for one on the home backend, its
//!   state there (`pg_stat_activity.state`);
//! - `SHOW REPLICATION`: the home backend's slots, one per peer and
//!   replicated database: lag and retained WAL in bytes, state, and the
//!   walsender's flush lag;
//! - `SHOW SEQUENCES`: the global sequences, as the home backend has them;
//! - `SHOW CONFLICTS`: the conflicts resolved on the home backend, counted
//!   by kind and resolution;
//! - `SHOW COMMANDS`: these.
//!
//! And commands that change the cluster, through Raft (see `commands`):
//!
//! - `DRAIN <backend>`: no new session goes to the backend, and sessions
//!   on it move to another between their transactions (see
//!   `session::drain`), while replication keeps it current, so that
//!   `VACUUM FULL` or `REINDEX` can run there;
//! - `RESUME <backend>`: it takes sessions again;
//! - `SWITCHOVER <backend>`: under write-leader routing, it becomes the
//!   write leader, and sessions on the old one move to it likewise;
//! - `RELOAD`: this node reads its configuration file again, as on
//!   SIGHUP: the authentication rules, users and passwords, admin roles,
//!   client and backend timeouts and the log level change at once (see
//!   `node::Live`); a WARNING names each other setting that changed, which
//!   waits for a restart;
//! - `REJOIN <backend> FROM <source>`: copy the backend's replicated
//!   databases again from the source while the cluster takes writes (see
//!   `cluster::rejoin`), each step a NOTICE as it happens;
//! - `ADD BACKEND <backend>`: the cluster expects a new backend; no node
//!   sends it a session or a stream until it is copied, so that the nodes
//!   can be restarted with it in their configuration first;
//! - `JOIN <backend> FROM <source>`: copy the new backend, as `REJOIN`
//!   does;
//! - `DROP BACKEND <backend>`: forget one announced that has not joined.
//!
//! Anything else gets `42601` with the list of commands. Only the simple
//! query protocol is served (psql's); the extended one gets `0A000`.

use bytes::{BufMut, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::lane::ddl_progress::PgError;
use crate::node::Node;
use crate::wire::protocol;

mod commands;
mod show;

/// The commands, as `SHOW COMMANDS` lists them and an unknown command's
/// hint names them.
const COMMANDS: &[(&str, &str)] = &[
    ("SHOW VERSION", "the node's version"),
    ("SHOW NODES", "the cluster's members as this node sees them"),
    ("SHOW RAFT", "this node's Raft state"),
    ("SHOW BACKENDS", "the backends, their health and DDL index"),
    ("SHOW DATABASES", "the replicated databases"),
    ("SHOW DDL", "the last entries of the DDL log"),
    ("SHOW CLIENTS", "the client sessions of this node"),
    (
        "SHOW POOLS",
        "transaction pooling: server connections in use and idle, per pool",
    ),
    ("SHOW CONFIG", "this node's settings (no secrets)"),
    (
        "SHOW REPLICATION",
        "the home backend's slots: lag, retained WAL, state",
    ),
    ("SHOW SEQUENCES", "the global sequences on the home backend"),
    (
        "SHOW CONFLICTS",
        "conflicts resolved on the home backend, by kind",
    ),
    ("SHOW COMMANDS", "this list"),
    (
        "DRAIN <backend>",
        "no new session goes there; sessions move off between transactions",
    ),
    ("RESUME <backend>", "a drained backend takes sessions again"),
    (
        "SWITCHOVER <backend>",
        "make it the write leader (write-leader routing)",
    ),
    (
        "RELOAD",
        "read the authentication rules, users, timeouts and log level again",
    ),
    (
        "REJOIN <backend> FROM <source>",
        "copy the backend again from the source while the cluster takes writes",
    ),
    (
        "ADD BACKEND <backend>",
        "expect a new backend: no session or stream goes to it until JOIN copies it",
    ),
    (
        "JOIN <backend> FROM <source>",
        "copy a new backend from the source while the cluster takes writes",
    ),
    (
        "DROP BACKEND <backend>",
        "forget a backend announced by ADD BACKEND that has not joined",
    ),
];

/// Serve a logged-in admin session until the client ends it. The caller
/// has sent nothing after authentication yet; `out` holds what is to go
/// first (AuthenticationOk and the rest of the greeting are added here).
pub async fn serve<S>(node: &Node, client: &mut S, mut out: BytesMut) -> std::io::Result<()>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    protocol::authentication(&mut out, &protocol::Authentication::Ok);
    for (name, value) in [
        ("server_version", "15.0 (Chorus admin console)"),
        ("server_encoding", "UTF8"),
        ("client_encoding", "UTF8"),
        ("DateStyle", "ISO, MDY"),
        ("integer_datetimes", "on"),
        ("standard_conforming_strings", "on"),
    ] {
        protocol::parameter_status(&mut out, name, value);
    }
    protocol::backend_key_data(&mut out, 0, 0);
    protocol::ready_for_query(&mut out, protocol::TransactionStatus::Idle);
    client.write_all(&out).await?;
    let max = node.config.node.max_message_bytes;
    let mut skip_to_sync = false;
    loop {
        let mut header = [0u8; 5];
        if client.read_exact(&mut header).await.is_err() {
            return Ok(());
        }
        let tag = header[0];
        let length = u32::from_be_bytes([header[1], header[2], header[3], header[4]]) as usize;
        if !(4..=max).contains(&length) {
            return Ok(());
        }
        let mut body = vec![0u8; length - 4];
        client.read_exact(&mut body).await?;
        let mut out = BytesMut::new();
        match tag {
            b'X' => return Ok(()),
            b'Q' => {
                let sql = protocol::read_cstr(&body).map_or("", |(sql, _)| sql);
                if let Some((tag, target, source)) = commands::rejoin_named(sql) {
                    commands::rejoin(node, client, tag, &target, &source, &mut out).await?;
                } else {
                    answer(node, sql, &mut out).await;
                }
                protocol::ready_for_query(&mut out, protocol::TransactionStatus::Idle);
            }
            b'S' => {
                skip_to_sync = false;
                protocol::ready_for_query(&mut out, protocol::TransactionStatus::Idle);
            }
            _ if skip_to_sync => {}
            _ => {
                skip_to_sync = true;
                PgError {
                    code: "0A000".into(),
                    message: "the admin console speaks the simple query protocol only".into(),
                    detail: None,
                    hint: Some("Use psql, or a client's simple query mode.".into()),
                }
                .write(&mut out);
            }
        }
        client.write_all(&out).await?;
    }
}

/// The answer to one query string (without its ReadyForQuery).
async fn answer(node: &Node, sql: &str, out: &mut BytesMut) {
    let given: Vec<&str> = sql
        .trim()
        .trim_end_matches(';')
        .split_whitespace()
        .collect();
    let words: Vec<String> = given.iter().map(|w| w.to_ascii_uppercase()).collect();
    let words: Vec<&str> = words.iter().map(String::as_str).collect();
    // A command that changes the cluster: its tag, once done.
    let done = match (words.as_slice(), given.get(1)) {
        (["DRAIN", _], Some(backend)) => Some(("DRAIN", commands::drain(node, backend).await)),
        (["RESUME", _], Some(backend)) => Some(("RESUME", commands::resume(node, backend).await)),
        (["SWITCHOVER", _], Some(backend)) => {
            Some(("SWITCHOVER", commands::switchover(node, backend).await))
        }
        (["ADD", "BACKEND", _], _) => {
            Some(("ADD BACKEND", commands::add_backend(node, given[2]).await))
        }
        (["DROP", "BACKEND", _], _) => {
            Some(("DROP BACKEND", commands::drop_backend(node, given[2]).await))
        }
        _ => None,
    };
    if words == ["RELOAD"] {
        match commands::reload(node).await {
            Ok(reloaded) => {
                for backend in reloaded.added {
                    protocol::notice(out, &format!("backend {backend} added to this node's list"));
                }
                for setting in reloaded.at_restart {
                    protocol::warning_notice(
                        out,
                        "55P02",
                        &format!("{setting} changed in the configuration file: it takes effect at the node's restart"),
                    );
                }
                protocol::write_message(out, b'C', |m| protocol::put_cstr(m, "RELOAD"));
            }
            Err(e) => e.write(out),
        }
        return;
    }
    if let Some((tag, outcome)) = done {
        match outcome {
            Ok(()) => protocol::write_message(out, b'C', |m| protocol::put_cstr(m, tag)),
            Err(e) => e.write(out),
        }
        return;
    }
    let rows = match words.as_slice() {
        [] => {
            protocol::write_message(out, b'I', |_| {});
            return;
        }
        ["SHOW", "VERSION"] => table(
            &["version"],
            vec![vec![format!("Chorus {}", env!("CARGO_PKG_VERSION"))]],
        ),
        ["SHOW", "NODES"] => show::nodes(node),
        ["SHOW", "RAFT"] => show::raft(node),
        ["SHOW", "BACKENDS"] => show::backends(node).await,
        ["SHOW", "DATABASES"] => show::databases(node),
        ["SHOW", "DDL"] => show::ddl(node).await,
        ["SHOW", "CLIENTS"] => show::clients(node).await,
        ["SHOW", "POOLS"] => show::pools(node),
        ["SHOW", "CONFIG"] => show::config(node),
        ["SHOW", "REPLICATION"] => match show::replication(node).await {
            Ok(rows) => rows,
            Err(e) => return e.write(out),
        },
        ["SHOW", "SEQUENCES"] => match show::home(node, show::SEQUENCES_SQL).await {
            Ok(rows) => rows,
            Err(e) => return e.write(out),
        },
        ["SHOW", "CONFLICTS"] => match show::home(node, show::CONFLICTS_SQL).await {
            Ok(rows) => rows,
            Err(e) => return e.write(out),
        },
        ["SHOW", "COMMANDS"] => table(
            &["command", "does"],
            COMMANDS
                .iter()
                .map(|(c, what)| vec![(*c).to_owned(), (*what).to_owned()])
                .collect(),
        ),
        _ => {
            let list: Vec<&str> = COMMANDS.iter().map(|(c, _)| *c).collect();
            PgError {
                code: "42601".into(),
                message: format!("unrecognized admin console command: {}", sql.trim()),
                detail: None,
                hint: Some(format!("The commands are: {}.", list.join(", "))),
            }
            .write(out);
            return;
        }
    };
    rows.write(out);
}

/// A result set of text values.
struct Table {
    columns: Vec<String>,
    rows: Vec<Vec<String>>,
}

fn table(columns: &[&str], rows: Vec<Vec<String>>) -> Table {
    Table {
        columns: columns.iter().map(|c| (*c).to_owned()).collect(),
        rows,
    }
}

impl Table {
    /// RowDescription, a DataRow per row, CommandComplete.
    fn write(&self, out: &mut BytesMut) {
        protocol::write_message(out, b'T', |m| {
            m.put_i16(self.columns.len() as i16);
            for column in &self.columns {
                protocol::put_cstr(m, column);
                m.put_i32(0); // table oid
                m.put_i16(0); // column number
                m.put_i32(25); // text
                m.put_i16(-1); // variable length
                m.put_i32(-1); // no modifier
                m.put_i16(0); // text format
            }
        });
        for row in &self.rows {
            protocol::write_message(out, b'D', |m| {
                m.put_i16(row.len() as i16);
                for value in row {
                    m.put_i32(value.len() as i32);
                    m.extend_from_slice(value.as_bytes());
                }
            });
        }
        protocol::write_message(out, b'C', |m| {
            protocol::put_cstr(m, &format!("SHOW {}", self.rows.len()));
        });
    }
}
