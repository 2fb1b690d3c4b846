//! The admin console: a database of the node itself (`node.admin_database`,
//! by default `chorus`), as PgBouncer's `pgbouncer` database is. A role
//! named in `node.admin_users` logs in to it with psql or any client, after
//! the usual authentication rules, and reads the cluster's state as
//! ordinary result sets (every value text):
//!
//! - `SHOW VERSION`
//! - `SHOW NODES`: each Raft member, its address, its role as this node
//!   sees it, and how long ago this node last heard from it;
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
//! Anything else gets `42601` with the list of commands. Only the simple
//! query protocol is served (psql's); the extended one gets `0A000`.

use std::time::Duration;

use bytes::{BufMut, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::backend::connect_backend;
use crate::cluster::ddl::progress::PgError;
use crate::node::Node;
use crate::protocol;

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
];

/// `SHOW REPLICATION`: each of Chorus's slots on the home backend (one
/// per peer and replicated database), with its walsender's lag.
const REPLICATION_SQL: &str = "SELECT s.slot_name, s.database, s.active, \
        pg_wal_lsn_diff(pg_current_wal_lsn(), s.confirmed_flush_lsn)::bigint AS lag_bytes, \
        pg_wal_lsn_diff(pg_current_wal_lsn(), s.restart_lsn)::bigint AS retained_bytes, \
        s.wal_status, extract(epoch FROM r.flush_lag) AS flush_lag_seconds \
   FROM pg_catalog.pg_replication_slots s \
   LEFT JOIN pg_catalog.pg_stat_replication r ON r.pid = s.active_pid \
  WHERE s.slot_name LIKE 'chorus\\_%' ORDER BY s.slot_name";

/// `SHOW SEQUENCES`.
const SEQUENCES_SQL: &str = "SELECT * FROM chorus.sequence_status() ORDER BY 1";

/// `SHOW CONFLICTS`: counts by kind and resolution, and the latest.
const CONFLICTS_SQL: &str = "SELECT kind, resolution, count(*) AS conflicts, \
        max(resolved_at) AS latest FROM chorus.conflict GROUP BY 1, 2 ORDER BY 1, 2";

/// How many of the DDL log's last entries `SHOW DDL` lists.
const DDL_TAIL: usize = 20;

/// Serve a logged-in admin session until the client ends it. The caller
/// has sent nothing after authentication yet; `out` holds what is to go
/// first (AuthenticationOk and the rest of the greeting are added here).
pub async fn serve<S>(node: &Node, client: &mut S, mut out: BytesMut) -> std::io::Result<()>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    protocol::authentication(&mut out, 0, &[]);
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
    protocol::ready_for_query(&mut out, b'I');
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
                answer(node, sql, &mut out).await;
                protocol::ready_for_query(&mut out, b'I');
            }
            b'S' => {
                skip_to_sync = false;
                protocol::ready_for_query(&mut out, b'I');
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
    let words: Vec<String> = sql
        .trim()
        .trim_end_matches(';')
        .split_whitespace()
        .map(str::to_ascii_uppercase)
        .collect();
    let words: Vec<&str> = words.iter().map(String::as_str).collect();
    let rows = match words.as_slice() {
        [] => {
            protocol::write_message(out, b'I', |_| {});
            return;
        }
        ["SHOW", "VERSION"] => table(
            &["version"],
            vec![vec![format!("Chorus {}", env!("CARGO_PKG_VERSION"))]],
        ),
        ["SHOW", "NODES"] => nodes(node),
        ["SHOW", "RAFT"] => raft(node),
        ["SHOW", "BACKENDS"] => backends(node).await,
        ["SHOW", "DATABASES"] => databases(node),
        ["SHOW", "DDL"] => ddl(node).await,
        ["SHOW", "CLIENTS"] => clients(node).await,
        ["SHOW", "CONFIG"] => config(node),
        ["SHOW", "REPLICATION"] => match home(node, REPLICATION_SQL).await {
            Ok(rows) => rows,
            Err(e) => return e.write(out),
        },
        ["SHOW", "SEQUENCES"] => match home(node, SEQUENCES_SQL).await {
            Ok(rows) => rows,
            Err(e) => return e.write(out),
        },
        ["SHOW", "CONFLICTS"] => match home(node, CONFLICTS_SQL).await {
            Ok(rows) => rows,
            Err(e) => return e.write(out),
        },
        ["SHOW", "COMMANDS"] => table(
            &["command", "shows"],
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

/// A setting's enum value as the configuration spells it
/// (`VerifyFull` → `verify-full`).
fn spelled(value: impl std::fmt::Debug) -> String {
    let mut out = String::new();
    for (i, c) in format!("{value:?}").chars().enumerate() {
        if c.is_ascii_uppercase() && i > 0 {
            out.push('-');
        }
        out.push(c.to_ascii_lowercase());
    }
    out
}

/// `SHOW CONFIG`: the settings that shape what the node does; secrets,
/// passwords and key files are left out.
fn config(node: &Node) -> Table {
    let c = &node.config;
    let list = |items: &[String]| items.join(",");
    let mut rows: Vec<(String, String)> = vec![
        ("node.id".into(), c.node.id.to_string()),
        ("node.listen".into(), c.node.listen.to_string()),
        (
            "node.metrics_listen".into(),
            c.node
                .metrics_listen
                .map_or(String::new(), |a| a.to_string()),
        ),
        ("node.home_backend".into(), c.home_backend().name.clone()),
        ("node.routing".into(), spelled(c.node.routing)),
        (
            "node.max_client_connections".into(),
            c.node.max_client_connections.to_string(),
        ),
        (
            "node.auth_timeout_ms".into(),
            c.node.auth_timeout_ms.to_string(),
        ),
        (
            "node.backend_connect_timeout_ms".into(),
            c.node.backend_connect_timeout_ms.to_string(),
        ),
        (
            "node.health_check_interval_ms".into(),
            c.node.health_check_interval_ms.to_string(),
        ),
        (
            "node.health_check_timeout_ms".into(),
            c.node.health_check_timeout_ms.to_string(),
        ),
        ("node.admin_database".into(), c.node.admin_database.clone()),
        ("node.admin_users".into(), list(&c.node.admin_users)),
        ("tls".into(), c.tls.is_some().to_string()),
    ];
    for b in &c.backends {
        rows.push((
            format!("backends.{}", b.name),
            format!("{} sslmode={}", b.address(), spelled(b.sslmode)),
        ));
    }
    if let Some(r) = &c.replication {
        rows.extend([
            ("replication.user".into(), r.user.clone()),
            ("replication.database".into(), r.database.clone()),
            ("replication.databases".into(), list(&r.databases)),
            (
                "replication.local_databases".into(),
                list(&r.local_databases),
            ),
            (
                "replication.replicate_created_databases".into(),
                r.replicate_created_databases.to_string(),
            ),
            ("replication.commit_scope".into(), spelled(r.commit_scope)),
            (
                "replication.commit_scope_timeout_ms".into(),
                r.commit_scope_timeout_ms.to_string(),
            ),
            (
                "replication.poll_interval_ms".into(),
                r.poll_interval_ms.to_string(),
            ),
        ]);
    }
    if let Some(k) = &c.cluster {
        let members: Vec<String> = k
            .members
            .iter()
            .map(|m| format!("{}={}", m.id, m.raft))
            .collect();
        rows.extend([
            ("cluster.raft_listen".into(), k.raft_listen.to_string()),
            ("cluster.members".into(), list(&members)),
            ("cluster.tls".into(), k.tls.is_some().to_string()),
            (
                "cluster.ddl_timeout_ms".into(),
                k.ddl_timeout_ms.to_string(),
            ),
            (
                "cluster.ddl_lock_timeout_ms".into(),
                k.ddl_lock_timeout_ms.to_string(),
            ),
            ("cluster.sequence_kind".into(), spelled(k.sequence_kind)),
            (
                "cluster.galloc_range_size".into(),
                k.galloc_range_size.to_string(),
            ),
        ]);
    }
    table(
        &["setting", "value"],
        rows.into_iter().map(|(k, v)| vec![k, v]).collect(),
    )
}

/// `SHOW CLIENTS`.
async fn clients(node: &Node) -> Table {
    let clients = node.cancel_keys.clients();
    let home = node.config.home_backend();
    let home_address = home.address();
    // The state of the sessions on the home backend, from the backend.
    let pids: Vec<i32> = clients
        .iter()
        .filter(|c| c.backend_address == home_address)
        .map(|c| c.backend_pid)
        .collect();
    let states: Vec<(i32, String)> = if pids.is_empty() {
        Vec::new()
    } else {
        home_rows(
            node,
            "SELECT pid, coalesce(state, '') FROM pg_catalog.pg_stat_activity WHERE pid = ANY($1)",
            &[&pids],
        )
        .await
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect()
    };
    let rows = clients
        .iter()
        .map(|c| {
            let backend = node
                .config
                .backends
                .iter()
                .find(|b| b.address() == c.backend_address)
                .map_or(c.backend_address.clone(), |b| b.name.clone());
            let state = states
                .iter()
                .find(|(pid, _)| *pid == c.backend_pid && c.backend_address == home_address)
                .map_or(String::new(), |(_, s)| s.clone());
            vec![
                c.pid.to_string(),
                c.client.user.clone(),
                c.client.database.clone(),
                c.client.address.to_string(),
                backend,
                c.backend_pid.to_string(),
                c.client.since.elapsed().as_secs().to_string(),
                state,
            ]
        })
        .collect();
    table(
        &[
            "pid",
            "user",
            "database",
            "client_address",
            "backend",
            "backend_pid",
            "connected_s",
            "state",
        ],
        rows,
    )
}

/// The rows of `sql` on the home backend, in the main database; none when
/// it does not answer within 2 s (what they would add is left out).
async fn home_rows(
    node: &Node,
    sql: &str,
    params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
) -> Vec<tokio_postgres::Row> {
    let Some(main) = node.main_lane() else {
        return Vec::new();
    };
    let asked = async {
        let client = connect_backend(node.config.home_backend(), &main.config).await?;
        client.query(sql, params).await
    };
    match tokio::time::timeout(Duration::from_secs(2), asked).await {
        Ok(Ok(rows)) => rows,
        _ => Vec::new(),
    }
}

/// A query's result on the home backend, in the main database, as text.
async fn home(node: &Node, sql: &str) -> Result<Table, PgError> {
    let unreachable = |e: &dyn std::fmt::Display| PgError {
        code: "08006".into(),
        message: format!("the home backend did not answer: {e}"),
        detail: None,
        hint: None,
    };
    let Some(main) = node.main_lane() else {
        return Err(PgError {
            code: "55000".into(),
            message: "this node does not replicate".into(),
            detail: None,
            hint: None,
        });
    };
    let asked = async {
        let client = connect_backend(node.config.home_backend(), &main.config).await?;
        client.simple_query(sql).await
    };
    let messages = match tokio::time::timeout(Duration::from_secs(5), asked).await {
        Ok(Ok(messages)) => messages,
        Ok(Err(e)) => return Err(unreachable(&e)),
        Err(_) => return Err(unreachable(&"no answer within 5 s")),
    };
    let mut result = Table {
        columns: Vec::new(),
        rows: Vec::new(),
    };
    for message in messages {
        match message {
            tokio_postgres::SimpleQueryMessage::RowDescription(columns) => {
                result.columns = columns.iter().map(|c| c.name().to_owned()).collect();
            }
            tokio_postgres::SimpleQueryMessage::Row(row) => result.rows.push(
                (0..row.len())
                    .map(|i| row.get(i).unwrap_or("").to_owned())
                    .collect(),
            ),
            _ => {}
        }
    }
    Ok(result)
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

fn nodes(node: &Node) -> Table {
    let mut rows = Vec::new();
    let me = node.config.node.id;
    let consensus = node.consensus();
    let metrics = consensus.map(|c| c.metrics().borrow().clone());
    let leader = metrics.as_ref().and_then(|m| m.current_leader);
    if let Some(cluster) = &node.config.cluster {
        for member in &cluster.members {
            let id = u64::from(member.id);
            let role = if leader == Some(id) {
                "leader"
            } else if member.id == me {
                consensus.map_or("unknown", |c| c.role())
            } else {
                "follower"
            };
            let heard = if member.id == me {
                "0".to_owned()
            } else {
                consensus
                    .and_then(|c| c.last_contact(id))
                    .map_or(String::new(), |at| at.elapsed().as_millis().to_string())
            };
            rows.push(vec![
                member.id.to_string(),
                member.raft.clone(),
                role.to_owned(),
                (member.id == me).to_string(),
                heard,
            ]);
        }
    } else {
        rows.push(vec![
            me.to_string(),
            String::new(),
            "standalone".to_owned(),
            "true".to_owned(),
            "0".to_owned(),
        ]);
    }
    table(
        &["id", "raft_address", "role", "this_node", "heard_ms_ago"],
        rows,
    )
}

fn raft(node: &Node) -> Table {
    let Some(consensus) = node.consensus() else {
        return table(
            &["id", "state"],
            vec![vec![node.config.node.id.to_string(), "no cluster".into()]],
        );
    };
    let m = consensus.metrics().borrow().clone();
    table(
        &[
            "id",
            "state",
            "term",
            "leader",
            "committed_index",
            "applied_index",
            "ddl_entries",
        ],
        vec![vec![
            m.id.to_string(),
            consensus.role().to_owned(),
            m.current_term.to_string(),
            m.current_leader.map_or(String::new(), |l| l.to_string()),
            consensus.committed_index().to_string(),
            m.last_applied.map_or(0, |l| l.index).to_string(),
            consensus.state().ddl_seq().borrow().to_string(),
        ]],
    )
}

async fn backends(node: &Node) -> Table {
    let main = node.main_lane();
    let mut rows = Vec::new();
    for backend in &node.config.backends {
        let index = match &main {
            Some(lane) => {
                tokio::time::timeout(Duration::from_secs(2), lane.ddl.backend_index(backend))
                    .await
                    .ok()
                    .flatten()
                    .map_or(String::new(), |i| i.to_string())
            }
            None => String::new(),
        };
        rows.push(vec![
            backend.name.clone(),
            backend.address(),
            (backend.name == node.config.home_backend().name).to_string(),
            node.is_backend_down(&backend.name).to_string(),
            index,
        ]);
    }
    table(&["name", "address", "home", "down", "ddl_index"], rows)
}

fn databases(node: &Node) -> Table {
    let rows = node
        .lanes()
        .iter()
        .map(|lane| {
            let created = lane.created();
            vec![
                lane.database().to_owned(),
                lane.main.to_string(),
                if created.since == 0 {
                    "configuration".to_owned()
                } else {
                    format!("DDL {}", created.since)
                },
                lane.ddl.applied().to_string(),
            ]
        })
        .collect();
    table(
        &["database", "main", "replicated_by", "ddl_applied_here"],
        rows,
    )
}

/// The log's last entries. A statement that traveled in its
/// transaction's change stream is not in the log (the entry orders it): it
/// is read from the home backend's `chorus.ddl_history` in the main
/// database (another database's shows as its marker there).
async fn ddl(node: &Node) -> Table {
    let mut rows: Vec<Vec<String>> = node.consensus().map_or(Vec::new(), |consensus| {
        consensus.state().read(|s| {
            let skip = s.ddl.len().saturating_sub(DDL_TAIL);
            s.ddl[skip..]
                .iter()
                .map(|e| {
                    vec![
                        e.seq.to_string(),
                        e.proposal.origin.to_string(),
                        e.proposal.database.clone().unwrap_or_default(),
                        if e.proposal.in_stream {
                            "stream".to_owned()
                        } else {
                            "log".to_owned()
                        },
                        e.proposal.sql.clone(),
                    ]
                })
                .collect()
        })
    });
    let wanted: Vec<i64> = rows
        .iter()
        .filter(|r| r[4].is_empty())
        .filter_map(|r| r[0].parse().ok())
        .collect();
    if !wanted.is_empty() {
        let found = home_rows(
            node,
            "SELECT seq, command FROM chorus.ddl_history WHERE seq = ANY($1)",
            &[&wanted],
        )
        .await;
        for row in found {
            let seq: i64 = row.get(0);
            let command: String = row.get(1);
            if let Some(r) = rows.iter_mut().find(|r| r[0] == seq.to_string()) {
                r[4] = command;
            }
        }
    }
    table(&["seq", "origin", "database", "route", "statement"], rows)
}
