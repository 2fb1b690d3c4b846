//! Databases created through Chorus join replication, when
//! `replication.replicate_created_databases` says so. Every node follows
//! the DDL log: once its home backend has applied a `CREATE DATABASE` (in
//! the main database) and the database is there, it becomes a lane (see
//! lane.rs): its chorus schema is installed, its streams, DDL applier and
//! sequence upkeep start, and sessions may use it. A database listed in
//! `replication.local_databases` stays local. Since the log holds every
//! entry, a node that starts later finds the same databases.

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

/// Whether the DDL log has a `CREATE DATABASE` of `database` that
/// replication takes up (a session to it waits for its lane).
pub fn created_through_chorus(node: &Node, database: &str) -> bool {
    let Some(consensus) = node.consensus() else {
        return false;
    };
    consensus.state().read(|s| {
        s.ddl
            .iter()
            .any(|e| created(node, e).as_deref() == Some(database))
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
            if node.lane(&database).is_some() {
                continue;
            }
            // Once the home backend has applied it: did it make the
            // database?
            while !main
                .ddl
                .wait_applied(entry.seq, Duration::from_secs(60))
                .await
            {}
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
            if exists && node.add_lane(&database) {
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
