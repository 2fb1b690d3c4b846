//! Databases created through Chorus join replication, when
//! `replication.replicate_created_databases` says so. Every node follows
//! the DDL log: once its home backend has applied a `CREATE DATABASE` (in
//! the main database) and the database is there, it becomes a lane (see
//! lane.rs): its chorus schema is installed, its streams, DDL applier and
//! sequence upkeep start, and sessions may use it. A database listed in
//! `replication.local_databases` stays local. Since the log holds every
//! entry, a node that starts later finds the same databases.
//!
//! `DROP DATABASE` of such a database takes it out of replication on each
//! backend as the backend applies it (cluster::ddl::apply), and a rename
//! too, after which it comes back under its new name with the slots it had
//! (see `Lane::slot_name`). The origin first refuses what PostgreSQL or
//! replication could not carry through everywhere: see [`refusal`].

use std::sync::Arc;
use std::time::Duration;

use chorus_consensus::{Consensus, DdlEntry};

use crate::lane::{Created, Lane};
use crate::node::Node;

/// The database a statement of the log creates, if it is a `CREATE
/// DATABASE` that replication takes up (not one of the local databases).
fn taken_up(node: &Node, statement: &str) -> Option<String> {
    let replication = node
        .config
        .replication
        .as_ref()
        .filter(|r| r.replicate_created_databases)?;
    chorus_router::created_database(statement).filter(|d| !replication.local_databases.contains(d))
}

/// Why a statement of the DDL log that drops or renames a database may not
/// go to the cluster (SQLSTATE, message, detail, hint).
pub struct Refused {
    pub code: &'static str,
    pub message: String,
    pub detail: Option<String>,
    pub hint: Option<&'static str>,
}

/// The origin's checks before a `CREATE DATABASE`, `DROP DATABASE` or
/// `ALTER DATABASE … RENAME` goes to the cluster, as `role` (the session's
/// `current_user`):
/// - PostgreSQL's own privilege checks, and for a creation that the name is
///   free: these statements cannot run in the validation's transaction
///   block (see cluster::ddl), and a drop or rename that every backend
///   refuses would still have ended the database's replication (its
///   lane and slots) first, everywhere;
/// - a database the configuration replicates is neither dropped nor
///   renamed (its nodes would look for it under its name at their next
///   start);
/// - a database that sessions use on the origin backend is not dropped or
///   renamed, as PostgreSQL refuses it (after waiting up to 5 s, as
///   PostgreSQL does). The other backends end their sessions in it when
///   they apply the statement, as `DROP DATABASE … WITH (FORCE)` would: at
///   the origin it has happened.
pub async fn refusal(node: &Node, sql: &str, role: &str) -> Option<Refused> {
    let replication = node.config.replication.as_ref()?;
    let configured = |d: &str| replication.names(d);
    for statement in chorus_router::split_statements(sql) {
        let renamed = chorus_router::renamed_database(statement).map(|(from, _)| from);
        let dropped = chorus_router::dropped_database(statement);
        let act = match (&renamed, &dropped) {
            (Some(database), _) => Some((Act::Rename, database)),
            (None, Some(database)) => Some((Act::Drop, database)),
            (None, None) => None,
        };
        let created = chorus_router::created_database(statement);
        if let Some((act, database)) = act.or(created.as_ref().map(|d| (Act::Create, d))) {
            if let Some(refused) = privilege_refusal(node, role, act, database).await {
                return Some(refused);
            }
        }
        if let Some(database) = &renamed {
            if configured(database) {
                return Some(Refused {
                    code: "0A000",
                    message: format!(
                        "database \"{database}\" is replicated by the configuration of the cluster's nodes and cannot be renamed"
                    ),
                    detail: None,
                    hint: Some("Create a database under the new name and move the data into it (pg_dump and psql), or list the new name in replication.databases and rename it with the nodes stopped."),
                });
            }
        }
        let Some(database) = renamed.or(dropped) else {
            continue;
        };
        if configured(&database) {
            return Some(Refused {
                code: "55006",
                message: format!(
                    "database \"{database}\" is replicated by the configuration of the cluster's nodes"
                ),
                detail: None,
                hint: Some("Remove it from replication.databases on every node and restart them, then drop it."),
            });
        }
        let sessions = sessions_in(node, &database).await;
        if sessions > 0 {
            return Some(Refused {
                code: "55006",
                message: format!("database \"{database}\" is being accessed by other users"),
                detail: Some(if sessions == 1 {
                    "There is 1 other session using the database.".to_owned()
                } else {
                    format!("There are {sessions} other sessions using the database.")
                }),
                hint: None,
            });
        }
    }
    None
}

/// What a statement does to a database, for [`privilege_refusal`].
#[derive(Clone, Copy, PartialEq, Eq)]
enum Act {
    Create,
    Drop,
    Rename,
}

/// PostgreSQL's refusal of `act` on `database` by `role`, read on the home
/// backend, with its SQLSTATE and message: no CREATEDB (creating,
/// renaming), not the owner (dropping, renaming), the name taken
/// (creating). `None` when it would pass these checks or they cannot be
/// read (the statement then meets them on every backend).
async fn privilege_refusal(node: &Node, role: &str, act: Act, database: &str) -> Option<Refused> {
    let main = node.main_lane()?;
    let rows = main
        .control
        .query(
            node.config.home_backend(),
            Duration::from_secs(5),
            "SELECT r.rolsuper OR r.rolcreatedb, d.datname IS NOT NULL, \
                    coalesce(pg_catalog.pg_has_role(r.oid, d.datdba, 'USAGE'), false) \
               FROM pg_catalog.pg_roles r \
               LEFT JOIN pg_catalog.pg_database d ON d.datname = $2 \
              WHERE r.rolname = $1",
            &[&role, &database],
        )
        .await
        .ok()?;
    let row = rows.first()?;
    let (createdb, exists, owner): (bool, bool, bool) = (row.get(0), row.get(1), row.get(2));
    let refused = |code: &'static str, message: String| Refused {
        code,
        message,
        detail: None,
        hint: None,
    };
    if act == Act::Create {
        if !createdb {
            return Some(refused(
                "42501",
                "permission denied to create database".into(),
            ));
        }
        if exists {
            return Some(refused(
                "42P04",
                format!("database \"{database}\" already exists"),
            ));
        }
        return None;
    }
    // (A database that does not exist: PostgreSQL says so everywhere, and
    // nothing replicated is touched.)
    if exists && !owner {
        return Some(refused(
            "42501",
            format!("must be owner of database {database}"),
        ));
    }
    if act == Act::Rename && exists && !createdb {
        return Some(refused(
            "42501",
            "permission denied to rename database".into(),
        ));
    }
    None
}

/// Whether `sql` renames a database created through Chorus that
/// replicates here: its validation on the origin backend fails (`55006`)
/// on Chorus's own sessions in it, which the backends end when they apply
/// it (see cluster::ddl::apply), after `refusal` found no other.
pub fn renames_lane(node: &Node, sql: &str) -> bool {
    chorus_router::split_statements(sql)
        .filter_map(chorus_router::renamed_database)
        .any(|(from, _)| node.lane(&from).is_some_and(|l| l.created().since > 0))
}

/// How many sessions other than Chorus's own are in `database` on the home
/// backend, once they have had up to 5 s to end (0 when it cannot tell:
/// the drop then meets PostgreSQL's own check there).
async fn sessions_in(node: &Node, database: &str) -> i64 {
    let Some(main) = node.main_lane() else {
        return 0;
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let counted = main
            .control
            .query(
                node.config.home_backend(),
                Duration::from_secs(5),
                "SELECT count(*) FROM pg_catalog.pg_stat_activity \
                  WHERE datname = $1 AND pid <> pg_backend_pid() \
                    AND NOT (application_name IS NOT DISTINCT FROM 'chorus replication' \
                             AND usename = current_user)",
                &[&database],
            )
            .await;
        let Some(row) = counted.ok().and_then(|rows| rows.into_iter().next()) else {
            return 0;
        };
        let sessions: i64 = row.get(0);
        if sessions == 0 || tokio::time::Instant::now() >= deadline {
            return sessions;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The databases created through Chorus that the log's entries (in order)
/// leave replicated, each as the log tells it: the entry that created it
/// and the names it has had since (see `Created`).
fn created_databases(node: &Node, entries: &[DdlEntry]) -> Vec<Created> {
    let mut alive = Vec::new();
    follow_entries(node, &mut alive, entries);
    alive
}

/// Bring `alive` (see `created_databases`) past `entries`.
fn follow_entries(node: &Node, alive: &mut Vec<Created>, entries: &[DdlEntry]) {
    for entry in entries {
        if entry.proposal.in_stream || entry.proposal.database.is_some() {
            continue;
        }
        for statement in chorus_router::split_statements(&entry.proposal.sql) {
            if let Some(database) = chorus_router::dropped_database(statement) {
                alive.retain(|c| c.name() != database);
            } else if let Some((from, to)) = chorus_router::renamed_database(statement) {
                if let Some(c) = alive.iter_mut().find(|c| c.name() == from) {
                    c.names.push((entry.seq, to));
                }
            } else if let Some(database) = taken_up(node, statement) {
                if !alive.iter().any(|c| c.name() == database) {
                    alive.push(Created {
                        since: entry.seq,
                        names: vec![(entry.seq, database)],
                    });
                }
            }
        }
    }
}

/// Whether the DDL log has a database of that name created through
/// Chorus, not dropped since (a session to it waits for its lane).
pub fn created_through_chorus(node: &Node, database: &str) -> bool {
    let Some(consensus) = node.consensus() else {
        return false;
    };
    consensus.state().read(|s| {
        created_databases(node, &s.ddl)
            .iter()
            .any(|c| c.name() == database)
    })
}

/// Follow the DDL log for as long as the node runs: each database that it
/// leaves created through Chorus is a lane once the home backend has it,
/// under its name now; a lane of one that was renamed or dropped ends.
/// (The applier ends a lane before it applies its drop or rename; see
/// cluster::ddl::apply. Both hold the node's `lanes_turn`.)
pub async fn follow(node: Arc<Node>, consensus: Arc<Consensus>) {
    let Some(main) = node.main_lane() else {
        return;
    };
    let mut committed = consensus.state().ddl_seq();
    // What the log's first `seen` entries leave, the last of them, and the
    // last entry the lanes were made to agree with.
    let mut alive: Vec<Created> = Vec::new();
    let mut seen = 0usize;
    let mut read = 0u64;
    let mut settled = 0u64;
    loop {
        let last = consensus
            .state()
            .read(|s| s.ddl.last().map_or(0, |e| e.seq));
        if last != settled && main.ddl.wait_applied(last, Duration::from_secs(1)).await {
            let turn = node.lanes_turn.lock().await;
            // (Under the turn, and once the home backend has applied all
            // that was read: its databases are as the log says.)
            let entries: Vec<DdlEntry> = consensus.state().read(|s| {
                s.ddl
                    .get(seen..)
                    .map(<[DdlEntry]>::to_vec)
                    .unwrap_or_default()
            });
            follow_entries(&node, &mut alive, &entries);
            seen += entries.len();
            read = entries.last().map_or(read, |e| e.seq);
            if main.ddl.applied() >= read && reconcile(&node, &main, &alive).await {
                settled = read;
            }
            drop(turn);
            continue;
        }
        if last == settled {
            let _ = tokio::time::timeout(Duration::from_secs(1), committed.changed()).await;
        }
    }
}

/// Make the lanes of databases created through Chorus those of `wanted`
/// (the ones the home backend has); whether it could tell which it has.
async fn reconcile(node: &Node, main: &Lane, wanted: &[Created]) -> bool {
    for lane in node.lanes() {
        if lane.created().since > 0 && !wanted.contains(&lane.created()) {
            node.remove_lane(lane.database());
        }
    }
    let missing: Vec<&Created> = wanted
        .iter()
        .filter(|c| node.lane(c.name()).is_none())
        .collect();
    if missing.is_empty() {
        return true;
    }
    let names: Vec<&str> = missing.iter().map(|c| c.name()).collect();
    let asked = main
        .control
        .query(
            node.config.home_backend(),
            Duration::from_secs(10),
            "SELECT datname::text FROM pg_catalog.pg_database WHERE datname = ANY($1)",
            &[&names],
        )
        .await;
    let present: Vec<String> = match asked {
        Ok(rows) => rows.iter().map(|r| r.get(0)).collect(),
        Err(e) => {
            tracing::warn!(error = %e, "cannot tell which databases created through Chorus the home backend has; retrying");
            tokio::time::sleep(Duration::from_secs(1)).await;
            return false;
        }
    };
    for created in missing {
        if present.iter().any(|p| p == created.name()) && node.add_lane(created) {
            tracing::info!(
                database = created.name(),
                seq = created.since,
                "a database created through Chorus replicates"
            );
        }
    }
    true
}
