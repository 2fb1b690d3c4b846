//! The `SHOW` commands of the admin console: what they read, and from
//! where.

use std::time::Duration;

use crate::lane::ddl_progress::PgError;
use crate::node::Node;

use super::{table, Table};

/// What `SHOW REPLICATION` asks each backend: Chorus's slots on it (one
/// per stream from it to a peer, per replicated database), with its
/// walsender's lag.
///
/// The lag in bytes counts from the slot's confirmed position. As with
/// PostgreSQL's own subscriptions, that position follows the walsender's
/// keepalives while nothing is waiting to be applied, so it may have
/// passed the start of a transaction that was still being written; the
/// retained WAL counts from where decoding would restart, which never
/// passes a transaction not yet applied.
///
/// The lag in seconds is the walsender's `replay_lag`: from the WAL's
/// flush on the origin to the node's report that the peer applied it.
/// PostgreSQL forgets it once a stream has reported its sent position
/// twice; it is then 0 if the slot has confirmed all the WAL there is, and
/// unknown (empty) otherwise: a stream held up in front of a transaction
/// it was sent whole is not "0 seconds behind".
const REPLICATION_SQL: &str = "SELECT s.slot_name::text, s.database::text, s.active, \
        s.wal_status, \
        pg_wal_lsn_diff(pg_current_wal_lsn(), s.confirmed_flush_lsn)::bigint AS lag_bytes, \
        CASE WHEN r.replay_lag IS NOT NULL THEN extract(epoch FROM r.replay_lag)::float8 \
             WHEN s.active AND s.confirmed_flush_lsn >= pg_current_wal_lsn() THEN 0 END AS lag_seconds, \
        pg_wal_lsn_diff(pg_current_wal_lsn(), s.restart_lsn)::bigint AS retained_bytes \
   FROM pg_catalog.pg_replication_slots s \
   LEFT JOIN pg_catalog.pg_stat_replication r ON r.pid = s.active_pid \
  WHERE s.slot_name LIKE 'chorus\\_%\\_to\\_%' ORDER BY s.slot_name";

/// The peer a stream's slot (`chorus_<node>_to_<peer>`) feeds.
fn slot_peer(slot: &str) -> &str {
    slot.split_once("_to_").map_or("", |(_, peer)| peer)
}

/// `SHOW REPLICATION`: every stream of the cluster, per origin backend
/// (each backend is asked, all at once, within 2 s) and peer. A backend
/// that does not answer has one row, in state `unreachable`.
pub(super) async fn replication(node: &Node) -> Result<Table, PgError> {
    let Some(main) = node.main_lane() else {
        return Err(PgError {
            code: "55000".into(),
            message: "this node does not replicate".into(),
            detail: None,
            hint: None,
        });
    };
    let control = &main.control;
    let backends = node.backends();
    let asks = backends.iter().map(|backend| async move {
        let asked = control
            .query(backend, Duration::from_secs(2), REPLICATION_SQL, &[])
            .await;
        (backend, asked)
    });
    let mut rows = Vec::new();
    for (backend, answer) in futures_util::future::join_all(asks).await {
        let Ok(slots) = answer else {
            let mut row = vec![String::new(); 9];
            row[0].clone_from(&backend.name);
            row[5] = "unreachable".into();
            rows.push(row);
            continue;
        };
        for slot in slots {
            let name: String = slot.get(0);
            let number = |i: usize| {
                slot.get::<_, Option<i64>>(i)
                    .map_or(String::new(), |v| v.to_string())
            };
            rows.push(vec![
                backend.name.clone(),
                slot_peer(&name).to_owned(),
                slot.get::<_, Option<String>>(1).unwrap_or_default(),
                name.clone(),
                if slot.get::<_, bool>(2) { "t" } else { "f" }.to_owned(),
                slot.get::<_, Option<String>>(3).unwrap_or_default(),
                number(4),
                slot.get::<_, Option<f64>>(5)
                    .map_or(String::new(), |v| format!("{v:.3}")),
                number(6),
            ]);
        }
    }
    Ok(table(
        &[
            "origin",
            "peer",
            "database",
            "slot_name",
            "active",
            "state",
            "lag_bytes",
            "lag_seconds",
            "retained_bytes",
        ],
        rows,
    ))
}

/// `SHOW SEQUENCES`.
pub(super) const SEQUENCES_SQL: &str = "SELECT * FROM chorus.sequence_status() ORDER BY 1";

/// `SHOW CONFLICTS`: counts by kind and resolution, and the latest.
pub(super) const CONFLICTS_SQL: &str = "SELECT kind, resolution, count(*) AS conflicts, \
        max(resolved_at) AS latest FROM chorus.conflict GROUP BY 1, 2 ORDER BY 1, 2";

/// How many of the DDL log's last entries `SHOW DDL` lists.
const DDL_TAIL: usize = 20;

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
pub(super) fn config(node: &Node) -> Table {
    let c = &node.config;
    // (What RELOAD changes, as it is now.)
    let live = node.live();
    let l = &live.config;
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
            l.node.auth_timeout_ms.to_string(),
        ),
        (
            "node.backend_connect_timeout_ms".into(),
            l.node.backend_connect_timeout_ms.to_string(),
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
        ("node.admin_users".into(), list(&l.node.admin_users)),
        (
            "node.shutdown_timeout_ms".into(),
            l.node.shutdown_timeout_ms.to_string(),
        ),
        (
            "node.log_level".into(),
            l.node.log_level.clone().unwrap_or_default(),
        ),
        (
            "users".into(),
            list(&l.users.iter().map(|u| u.name.clone()).collect::<Vec<_>>()),
        ),
        (
            "auth".into(),
            l.auth
                .iter()
                .map(|r| {
                    let from = r.address.map_or("all".to_owned(), |a| a.to_string());
                    format!("{} {} {from} {}", r.user, r.database, spelled(r.method))
                })
                .collect::<Vec<_>>()
                .join("; "),
        ),
        ("tls".into(), c.tls.is_some().to_string()),
    ];
    for b in node.backends().iter() {
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
pub(super) async fn clients(node: &Node) -> Table {
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
                .backends()
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
    main.control
        .query(
            node.config.home_backend(),
            Duration::from_secs(2),
            sql,
            params,
        )
        .await
        .unwrap_or_default()
}

/// A query's result on the home backend, in the main database, as text.
pub(super) async fn home(node: &Node, sql: &str) -> Result<Table, PgError> {
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
    let messages = main
        .control
        .simple_query(node.config.home_backend(), Duration::from_secs(5), sql)
        .await
        .map_err(|e| unreachable(&e))?;
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

/// `SHOW NODES`: each member of the cluster (see `NODE_COLUMNS`).
pub(super) fn nodes(node: &Node) -> Table {
    let mut rows = Vec::new();
    let me = node.config.node.id;
    let Some(consensus) = node.consensus() else {
        rows.push(vec![
            me.to_string(),
            String::new(),
            "standalone".to_owned(),
            "true".to_owned(),
            "0".to_owned(),
            node.config.node.listen.to_string(),
            node.config.home_backend().name.clone(),
            String::new(),
            node.config.home_backend().name.clone(),
            "false".to_owned(),
        ]);
        return table(NODE_COLUMNS, rows);
    };
    let leader = consensus.metrics().borrow().current_leader;
    let step = node.copy_step();
    // (The members as the Raft log has them: a node added while this one
    // runs is there, its configuration's list is not read again.)
    for (id, raft_address, voter) in consensus.members() {
        let this = id == u64::from(me);
        let role = if leader == Some(id) {
            "leader"
        } else if this {
            consensus.role()
        } else if voter {
            "follower"
        } else {
            "learner"
        };
        let heard = if this {
            "0".to_owned()
        } else {
            consensus
                .last_contact(id)
                .map_or(String::new(), |at| at.elapsed().as_millis().to_string())
        };
        let (listen, home, state, drives, copying) = consensus.state().read(|s| {
            let info = s.nodes.get(&id);
            let home = info.map_or(String::new(), |i| i.home_backend.clone());
            let drives: Vec<&str> = s
                .nodes
                .values()
                .filter(|i| i.state != chorus_consensus::NodeState::Parted)
                .map(|i| i.home_backend.as_str())
                .filter(|b| s.driver_of(b).is_some_and(|d| d.node == id))
                .collect();
            (
                info.map_or(String::new(), |i| i.listen.clone()),
                home.clone(),
                info.map_or(String::new(), |i| i.state.as_str().to_owned()),
                drives.join(","),
                s.copying.contains(&home),
            )
        });
        // (Its home backend's copy: on the node running it, the last step.)
        let copying = match &step {
            Some((copied, step)) if *copied == home && !home.is_empty() => step.clone(),
            _ => copying.to_string(),
        };
        rows.push(vec![
            id.to_string(),
            raft_address,
            role.to_owned(),
            this.to_string(),
            heard,
            listen,
            home,
            state,
            drives,
            copying,
        ]);
    }
    table(NODE_COLUMNS, rows)
}

/// `SHOW NODES`'s columns.
const NODE_COLUMNS: &[&str] = &[
    "id",
    "raft_address",
    "role",
    "this_node",
    "heard_ms_ago",
    "listen",
    "home_backend",
    "state",
    "drives",
    "copying",
];

pub(super) fn raft(node: &Node) -> Table {
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

/// `SHOW BACKENDS`: each backend, whose home it is, whether this node
/// sees it down, whether it is drained (see `commands::drain`) or the
/// write leader, how many of this node's sessions it serves, how far it
/// has applied the DDL log, and whether it is being copied again
/// (`REJOIN`: on the node running the copy, its last step).
pub(super) async fn backends(node: &Node) -> Table {
    let main = node.main_lane();
    let (drained, leader, copying) =
        node.consensus()
            .map_or((Default::default(), None, Default::default()), |c| {
                c.state()
                    .read(|s| (s.drained.clone(), s.write_leader.clone(), s.copying.clone()))
            });
    let step = node.copy_step();
    let clients = node.cancel_keys.clients();
    let mut rows = Vec::new();
    for backend in node.backends().iter() {
        let address = backend.address();
        let sessions = clients
            .iter()
            .filter(|c| c.backend_address == address)
            .count();
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
            address,
            (backend.name == node.config.home_backend().name).to_string(),
            node.is_backend_down(&backend.name).to_string(),
            drained.contains(&backend.name).to_string(),
            (leader.as_ref() == Some(&backend.name)).to_string(),
            sessions.to_string(),
            index,
            match &step {
                Some((copied, step)) if *copied == backend.name => step.clone(),
                _ => copying.contains(&backend.name).to_string(),
            },
        ]);
    }
    table(
        &[
            "name",
            "address",
            "home",
            "down",
            "drained",
            "write_leader",
            "sessions",
            "ddl_index",
            "copying",
        ],
        rows,
    )
}

pub(super) fn databases(node: &Node) -> Table {
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

/// The pools of transaction pooling (backend/pool.rs): per backend,
/// database and user, the server connections in use and idle.
pub(super) fn pools(node: &Node) -> Table {
    let size = node.pool.size();
    let rows = node
        .pool
        .counts()
        .into_iter()
        .map(|(key, in_use, idle)| {
            vec![
                key.backend,
                key.database,
                key.user,
                in_use.to_string(),
                idle.to_string(),
                size.to_string(),
            ]
        })
        .collect();
    table(
        &["backend", "database", "user", "in_use", "idle", "size"],
        rows,
    )
}

/// The log's last entries. A statement that traveled in its
/// transaction's change stream is not in the log (the entry orders it): it
/// is read from the home backend's `chorus.ddl_history` in the main
/// database (another database's shows as its marker there).
pub(super) async fn ddl(node: &Node) -> Table {
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
