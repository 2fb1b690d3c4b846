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
//! backend as the backend applies it (cluster::ddl::apply). The origin
//! first refuses what PostgreSQL or replication could not carry through
//! everywhere: see [`refusal`].

use std::sync::Arc;
use std::time::Duration;

use chorus_consensus::{Consensus, DdlEntry};

use crate::backend::connect_backend;
use crate::node::Node;

/// The database a log entry creates, if it is a `CREATE DATABASE` that
/// replication takes up (not one of the local databases).
fn created(node: &Node, entry: &DdlEntry) -> Option<String> {
    let replication = node
        .config
        .replication
        .as_ref()
        .filter(|r| r.replicate_created_databases)?;
    if entry.proposal.in_stream || entry.proposal.database.is_some() {
        return None;
    }
    chorus_router::split_statements(&entry.proposal.sql)
        .find_map(chorus_router::created_database)
        .filter(|d| !replication.local_databases.contains(d))
}

/// Why a statement of the DDL log that drops or renames a database may not
/// go to the cluster (SQLSTATE, message, detail, hint).
pub struct Refused {
    pub code: &'static str,
    pub message: String,
    pub detail: Option<String>,
    pub hint: Option<&'static str>,
}

/// The origin's checks before a `DROP DATABASE` or `ALTER DATABASE …
/// RENAME` goes to the cluster:
/// - a database the configuration replicates is not dropped (its nodes
///   would replicate it again at their next start);
/// - a replicated database is not renamed (its slots, streams and sessions
///   are per database name, and changes on their way to or from it would
///   be lost);
/// - a database that sessions use on the origin backend is not dropped,
///   as PostgreSQL refuses it (after waiting up to 5 s, as PostgreSQL
///   does). The other backends end their sessions in it when they apply
///   the drop, as `WITH (FORCE)` would: the database is gone at the
///   origin.
pub async fn refusal(node: &Node, sql: &str) -> Option<Refused> {
    let replication = node.config.replication.as_ref()?;
    let configured = |d: &str| replication.replicated_databases().any(|r| r == d);
    for statement in chorus_router::split_statements(sql) {
        if let Some(database) = chorus_router::renamed_database(statement) {
            if configured(&database) || node.lane(&database).is_some() {
                return Some(Refused {
                    code: "0A000",
                    message: format!("replicated database \"{database}\" cannot be renamed"),
                    detail: None,
                    hint: Some("Create a database under the new name and move the data into it (pg_dump and psql), or set replication.replicate_created_databases = false for databases that must be renamed."),
                });
            }
        }
        let Some(database) = chorus_router::dropped_database(statement) else {
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

/// How many sessions other than Chorus's own are in `database` on the home
/// backend, once they have had up to 5 s to end (0 when it cannot tell:
/// the drop then meets PostgreSQL's own check there).
async fn sessions_in(node: &Node, database: &str) -> i64 {
    let Some(main) = node.main_lane() else {
        return 0;
    };
    let Ok(client) = connect_backend(node.config.home_backend(), &main.config).await else {
        return 0;
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let counted = client
            .query_one(
                "SELECT count(*) FROM pg_catalog.pg_stat_activity \
                  WHERE datname = $1 AND pid <> pg_backend_pid() \
                    AND NOT (application_name IS NOT DISTINCT FROM 'chorus replication' \
                             AND usename = current_user)",
                &[&database],
            )
            .await;
        let Ok(row) = counted else {
            return 0;
        };
        let sessions: i64 = row.get(0);
        if sessions == 0 || tokio::time::Instant::now() >= deadline {
            return sessions;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The database a log entry drops, if it is a `DROP DATABASE`.
fn dropped(entry: &DdlEntry) -> Option<String> {
    if entry.proposal.in_stream || entry.proposal.database.is_some() {
        return None;
    }
    chorus_router::split_statements(&entry.proposal.sql).find_map(chorus_router::dropped_database)
}

/// Whether the DDL log drops `database` after entry `seq`.
fn dropped_after(consensus: &Consensus, database: &str, seq: u64) -> bool {
    consensus.state().read(|s| {
        s.ddl
            .iter()
            .any(|e| e.seq > seq && dropped(e).as_deref() == Some(database))
    })
}

/// Whether the DDL log has a `CREATE DATABASE` of `database` that
/// replication takes up, and no drop of it since (a session to it waits
/// for its lane).
pub fn created_through_chorus(node: &Node, database: &str) -> bool {
    let Some(consensus) = node.consensus() else {
        return false;
    };
    // (Its last CREATE DATABASE, unless a DROP DATABASE came after it.)
    consensus.state().read(|s| {
        s.ddl.iter().fold(false, |exists, e| {
            if created(node, e).as_deref() == Some(database) {
                true
            } else if dropped(e).as_deref() == Some(database) {
                false
            } else {
                exists
            }
        })
    })
}

/// Follow the DDL log for as long as the node runs, making a lane of each
/// database created through Chorus.
pub async fn follow(node: Arc<Node>, consensus: Arc<Consensus>) {
    let Some(main) = node.main_lane() else {
        return;
    };
    let home = node.config.home_backend().clone();
    let mut seen = 0usize;
    let mut committed = consensus.state().ddl_seq();
    loop {
        let entries: Vec<DdlEntry> = consensus.state().read(|s| {
            s.ddl
                .get(seen..)
                .map(<[DdlEntry]>::to_vec)
                .unwrap_or_default()
        });
        for entry in &entries {
            let Some(database) = created(&node, entry) else {
                continue;
            };
            // (A database of that name dropped later in the log is not
            // this one.)
            if dropped_after(&consensus, &database, entry.seq) {
                continue;
            }
            // Once the home backend has applied it (and with it any drop
            // of an earlier database of that name): did it make the
            // database?
            while !main
                .ddl
                .wait_applied(entry.seq, Duration::from_secs(60))
                .await
            {}
            if node.lane(&database).is_some() {
                continue;
            }
            let exists = loop {
                let asked = async {
                    let client = connect_backend(&home, &main.config).await?;
                    let row = client
                        .query_one(
                            "SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_database WHERE datname = $1)",
                            &[&database],
                        )
                        .await?;
                    Ok::<bool, tokio_postgres::Error>(row.get(0))
                };
                match asked.await {
                    Ok(exists) => break exists,
                    Err(e) => {
                        tracing::warn!(database, error = %e, "cannot tell whether a database created through Chorus exists; retrying");
                        tokio::time::sleep(Duration::from_secs(1)).await;
                    }
                }
            };
            if exists && node.add_lane(&database, entry.seq) {
                tracing::info!(
                    database,
                    seq = entry.seq,
                    "a database created through Chorus replicates"
                );
            }
        }
        seen += entries.len();
        if entries.is_empty() {
            let _ = tokio::time::timeout(Duration::from_secs(1), committed.changed()).await;
        }
    }
}
