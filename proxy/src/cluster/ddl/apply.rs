//! Applying the DDL log: every node applies the committed log to its home
//! backend (and to the backends whose duties it was handed) in each
//! replicated database, in log order, exactly once: the backend records
//! each entry in `chorus.ddl_history` in the same transaction as the DDL.
//! An entry of another database is recorded as a marker, so that every
//! database's DDL index counts the whole log.

use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use chorus_consensus::{Consensus, DdlEntry};
use tokio_postgres::Client;

use crate::cluster::replication::ReplicationError;
use crate::config::BackendConfig;
use crate::lane::ddl_progress::{Outcome, PgError, INDEX_SQL};
use crate::lane::Lane;
use crate::node::Node;
use crate::wire::protocol;

/// Apply the committed DDL log to the home backend, in order, in every
/// replicated database (those that join later too), for as long as the
/// node runs.
pub async fn run_applier(node: Arc<Node>, consensus: Arc<Consensus>) {
    let home = node.config.home_backend().clone();
    let me = u64::from(node.config.node.id);
    let each = node.clone();
    each.each_lane(|lane| {
        run_foreign_applier(node.clone(), consensus.clone(), lane, home.clone(), me)
    })
    .await;
}

/// Apply the committed DDL log in one database (`lane`) to `backend`, the
/// home backend of node `owner` (this node's own, or one whose duties were
/// handed to this node); until aborted. (The owner's own applier may run
/// too: appliers of one backend take turns and apply each entry once, see
/// `apply_entry`.)
pub async fn run_foreign_applier(
    node: Arc<Node>,
    consensus: Arc<Consensus>,
    lane: Arc<Lane>,
    backend: BackendConfig,
    owner: u64,
) {
    loop {
        if let Err(e) = apply_log(&node, &consensus, &lane, &backend, owner).await {
            tracing::warn!(backend = %backend.name, database = lane.database(), error = %e, "DDL apply failed; retrying");
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// What an entry of the DDL log is to one database's applier.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum EntryRole {
    /// A statement of this database (or, in the main one, a cluster-wide
    /// one): applied here.
    Apply,
    /// DDL of this database that travels in its transaction's change
    /// stream: the stream records it.
    Streamed,
    /// Another database's DDL: a marker is recorded here, in its place,
    /// so that this database's DDL index counts every entry (later entries
    /// name the last committed one, of whichever database, as the one they
    /// come after).
    Marker,
    /// A cluster-wide statement, seen from a database other than the main
    /// one: its marker waits until the main database has applied it, so
    /// that this database's later DDL finds the role (or tablespace) it
    /// made.
    GlobalMarker,
}

fn entry_role(lane: &Lane, entry: &DdlEntry) -> EntryRole {
    // (Entries before the database was created belong to an earlier
    // database of its name.)
    let mine = match &entry.proposal.database {
        Some(database) => lane.owns(database, entry.seq),
        None => lane.main,
    };
    match (mine, entry.proposal.in_stream) {
        (true, true) => EntryRole::Streamed,
        (true, false) => EntryRole::Apply,
        (false, false) if entry.proposal.database.is_none() => EntryRole::GlobalMarker,
        (false, _) => EntryRole::Marker,
    }
}

/// The DDL index of a database on a backend (see `INDEX_SQL`).
async fn index_of(client: &Client) -> Result<u64, tokio_postgres::Error> {
    let index = client.query_one(INDEX_SQL, &[]).await?.get::<_, i64>(0);
    Ok(u64::try_from(index).unwrap_or(0))
}

/// Wait until `client`'s database has the DDL up to `after`.
async fn wait_index(
    client: &Client,
    after: u64,
    backend: &str,
    database: &str,
    seq: u64,
) -> Result<(), tokio_postgres::Error> {
    let mut waited = 0u32;
    while index_of(client).await? < after {
        waited += 1;
        if waited % 1000 == 0 {
            tracing::warn!(
                backend,
                database,
                seq,
                after,
                "DDL waits for earlier DDL to reach this backend"
            );
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Ok(())
}

async fn apply_log(
    node: &Node,
    consensus: &Consensus,
    lane: &Lane,
    backend: &BackendConfig,
    owner: u64,
) -> Result<(), ReplicationError> {
    let config = &lane.config;
    let home = owner == u64::from(node.config.node.id);
    // A backend being copied gets the log's effects with its copy, and
    // the copy's DDL index says where to go on from (see cluster::rejoin).
    while node.is_copying(&backend.name) {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    if home {
        // The chorus schema (with chorus.ddl_history) comes first.
        while !lane.wait_schema_ready(Duration::from_secs(1)).await {}
    }
    // On the home backend, the notices of the entries that came through
    // this node go to their sessions.
    let (client, mut notices) = if home {
        let (client, notices) =
            crate::backend::connect_backend_with_notices(backend, config).await?;
        (client, Some(notices))
    } else {
        (
            crate::backend::connect_backend(backend, config).await?,
            None,
        )
    };
    // The other databases of this backend, connected when needed: the main
    // lane waits for them before a cluster-wide statement, another lane for
    // the main one after it. (Looked at again before each entry: a database
    // may join.)
    let mut others: Vec<(Arc<Lane>, Option<Client>)> = Vec::new();
    let mut applied = index_of(&client).await?;
    if home {
        lane.ddl.set_applied(applied);
    }
    if lane.main {
        node.metrics.ddl_applied(&backend.name, applied);
    }
    let mut committed = consensus.state().ddl_seq();
    loop {
        let entries: Vec<DdlEntry> = consensus.state().read(|s| {
            s.ddl
                .get(usize::try_from(applied).unwrap_or(usize::MAX)..)
                .map(<[DdlEntry]>::to_vec)
                .unwrap_or_default()
        });
        if node.is_copying(&backend.name) {
            return Ok(());
        }
        if entries.is_empty() {
            let _ = tokio::time::timeout(Duration::from_secs(1), committed.changed()).await;
            continue;
        }
        // The owner's sequence id comes with its registration in the
        // cluster state, shortly after it started.
        let sequence_id = loop {
            if let Some(id) = consensus
                .state()
                .read(|s| s.sequence_ids.get(&owner).copied())
            {
                break id;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        for entry in entries {
            for other in node.lanes() {
                if other.database() != lane.database()
                    && !others.iter().any(|(l, _)| l.database() == other.database())
                {
                    others.push((other, None));
                }
            }
            let role = entry_role(lane, &entry);
            // Its DDL travels in its transaction's change stream (see
            // cluster::ddl::lease). Anything else waits until this backend
            // has the committed DDL before it (which may have come through
            // a change stream).
            if role != EntryRole::Streamed {
                wait_index(
                    &client,
                    entry.after,
                    &backend.name,
                    lane.database(),
                    entry.seq,
                )
                .await?;
            }
            match role {
                EntryRole::Streamed => {}
                EntryRole::Apply => {
                    if lane.main && entry.proposal.database.is_none() {
                        // A cluster-wide statement also waits for every
                        // other database's DDL before it (a role is dropped
                        // only after the REVOKE that came first).
                        // (A database this backend lacks, or whose
                        // schema is not installed here yet, has no DDL to
                        // wait for.)
                        for (other, slot) in &mut others {
                            let c = match other_client(slot, backend, other).await {
                                Ok(c) => c,
                                Err(ReplicationError::Sql(e)) if missing(&e) => continue,
                                Err(e) => return Err(e),
                            };
                            let installed: bool = c
                                .query_one(
                                    "SELECT to_regclass('chorus.ddl_history') IS NOT NULL",
                                    &[],
                                )
                                .await?
                                .get(0);
                            if installed {
                                wait_index(
                                    c,
                                    entry.after,
                                    &backend.name,
                                    other.database(),
                                    entry.seq,
                                )
                                .await?;
                            }
                        }
                    }
                    // A database dropped or renamed through Chorus leaves
                    // replication first: its lane here ends, and so does
                    // this applier's connection to it (a renamed one
                    // comes back under its new name, see
                    // cluster::databases). Lanes change under the turn.
                    let released = released_database(node, lane, &entry);
                    let _turn = match &released {
                        Some(release) => {
                            let turn = node.lanes_turn.lock().await;
                            node.remove_lane(&release.database);
                            others.retain(|(l, _)| l.database() != release.database);
                            Some(turn)
                        }
                        None => None,
                    };
                    let here = Applying {
                        lane,
                        client: &client,
                        backend,
                        owner,
                        sequence_id,
                        released: released.as_ref(),
                    };
                    here.apply(&entry, notices.as_mut()).await?;
                }
                EntryRole::GlobalMarker => {
                    if let Some((main, slot)) = others.iter_mut().find(|(l, _)| l.main) {
                        let c = other_client(slot, backend, main).await?;
                        wait_for_entry(c, &entry, &backend.name, lane.database()).await?;
                    }
                    record_marker(&client, &entry).await?;
                }
                EntryRole::Marker => record_marker(&client, &entry).await?,
            }
            applied = entry.seq;
            if home {
                lane.ddl.set_applied(applied);
            }
            if lane.main {
                node.metrics.ddl_applied(&backend.name, applied);
            }
        }
    }
}

/// A database that a cluster-wide entry drops or renames.
#[derive(Debug, Clone)]
struct Release {
    database: String,
    /// Dropped (its slots go too), not renamed (they stay, see
    /// `Lane::slot_name`).
    dropped: bool,
    /// On a backend other than the origin's (see `release_database`).
    everyone: bool,
}

/// The database a cluster-wide entry drops or renames, when the main lane
/// applies it (not one that the configuration replicates: the origin
/// refuses those, see cluster::databases).
fn released_database(node: &Node, lane: &Lane, entry: &DdlEntry) -> Option<Release> {
    if !lane.main || entry.proposal.database.is_some() || entry.proposal.in_stream {
        return None;
    }
    let (database, dropped) =
        chorus_router::split_statements(&entry.proposal.sql).find_map(|st| {
            chorus_router::dropped_database(st)
                .map(|d| (d, true))
                .or_else(|| chorus_router::renamed_database(st).map(|(from, _)| (from, false)))
        })?;
    let configured = node
        .config
        .replication
        .as_ref()
        .is_some_and(|r| r.names(&database));
    (!configured).then_some(Release {
        database,
        dropped,
        everyone: false,
    })
}

/// Before a `DROP DATABASE` or a rename, which PostgreSQL refuses while
/// another session is in the database (a drop, while a replication slot
/// is): end Chorus's own connections to it on this backend, and for a drop
/// its slots in it. With `everyone`, end the other sessions in it too (on
/// a backend other than the origin's: the statement has run at the
/// origin, which refused it while a session was there, see
/// cluster::databases). Bounded: the statement then fails as PostgreSQL
/// would, and says why.
async fn release_database(client: &Client, release: &Release) -> Result<(), tokio_postgres::Error> {
    let Release {
        database,
        dropped,
        everyone,
    } = release;
    for _ in 0..100 {
        client
            .execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
                  WHERE datname = $1 AND pid <> pg_backend_pid() \
                    AND ($2 OR (application_name = 'chorus replication' AND usename = current_user))",
                &[&database, &everyone],
            )
            .await?;
        if !dropped {
            return Ok(());
        }
        // (A slot that is still active, its walsender not gone yet, is
        // dropped next time round; so is one taken up again meanwhile,
        // which fails this drop.)
        let dropped = client
            .execute(
                "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots \
                  WHERE database = $1 AND slot_name LIKE 'chorus\\_%' AND NOT active",
                &[&database],
            )
            .await;
        if let Err(e) = dropped {
            if e.code() != Some(&tokio_postgres::error::SqlState::OBJECT_IN_USE) {
                return Err(e);
            }
        }
        let left: i64 = client
            .query_one(
                "SELECT count(*) FROM pg_replication_slots \
                  WHERE database = $1 AND slot_name LIKE 'chorus\\_%'",
                &[&database],
            )
            .await?
            .get(0);
        if left == 0 {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(())
}

/// Whether a connection failed because its database does not exist.
fn missing(e: &tokio_postgres::Error) -> bool {
    e.code() == Some(&tokio_postgres::error::SqlState::INVALID_CATALOG_NAME)
}

/// The connection to another database of `backend`, made on first use.
async fn other_client<'a>(
    slot: &'a mut Option<Client>,
    backend: &BackendConfig,
    lane: &Lane,
) -> Result<&'a Client, ReplicationError> {
    if slot.as_ref().is_none_or(Client::is_closed) {
        *slot = Some(crate::backend::connect_backend(backend, &lane.config).await?);
    }
    match slot.as_ref() {
        Some(client) => Ok(client),
        None => Err(ReplicationError::Decoding("no connection".into())),
    }
}

/// Wait until `client`'s database has recorded `entry`.
async fn wait_for_entry(
    client: &Client,
    entry: &DdlEntry,
    backend: &str,
    database: &str,
) -> Result<(), tokio_postgres::Error> {
    let seq = i64::try_from(entry.seq).unwrap_or(i64::MAX);
    let mut waited = 0u32;
    loop {
        let has: bool = client
            .query_one(
                "SELECT EXISTS (SELECT 1 FROM chorus.ddl_history WHERE seq = $1)",
                &[&seq],
            )
            .await?
            .get(0);
        if has {
            return Ok(());
        }
        waited += 1;
        if waited % 1000 == 0 {
            tracing::warn!(
                backend,
                database,
                seq = entry.seq,
                "DDL waits for a cluster-wide statement to be applied in the main database"
            );
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Record another database's entry in this database's history (see
/// `EntryRole::Marker`).
async fn record_marker(client: &Client, entry: &DdlEntry) -> Result<(), tokio_postgres::Error> {
    let seq = i64::try_from(entry.seq).unwrap_or(i64::MAX);
    let origin = i32::try_from(entry.proposal.origin).unwrap_or(0);
    let command = match entry.proposal.database.as_deref() {
        None => "-- cluster-wide DDL, applied in the main database".to_owned(),
        Some(database) => format!("-- DDL of database {}", quote_ident(database)),
    };
    client
        .execute(
            "INSERT INTO chorus.ddl_history (seq, origin, search_path, role, command) \
             VALUES ($1, $2, '', '', $3) ON CONFLICT (seq) DO NOTHING",
            &[&seq, &origin, &command],
        )
        .await?;
    Ok(())
}

/// Where an applier applies this database's entries.
struct Applying<'a> {
    lane: &'a Lane,
    client: &'a Client,
    backend: &'a BackendConfig,
    owner: u64,
    sequence_id: u16,
    /// The database the entry drops or renames, which leaves replication
    /// (see `release_database`).
    released: Option<&'a Release>,
}

impl Applying<'_> {
    /// Apply an entry of this database here, and hand its outcome to the
    /// session that sent it through this node.
    async fn apply(
        &self,
        entry: &DdlEntry,
        notices: Option<&mut tokio::sync::mpsc::Receiver<crate::backend::Notice>>,
    ) -> Result<(), ReplicationError> {
        let mut notices = notices;
        if let Some(notices) = notices.as_mut() {
            while notices.try_recv().is_ok() {}
        }
        let release = self.released.map(|r| Release {
            everyone: entry.proposal.origin != self.owner,
            ..r.clone()
        });
        let failure = apply_entry(self.client, entry, self.sequence_id, release.as_ref()).await?;
        if let Some(e) = &failure {
            tracing::warn!(backend = %self.backend.name, database = self.lane.database(), seq = entry.seq, code = %e.code, error = %e.message, "replicated DDL failed here");
        }
        if let Some(notices) = notices.filter(|_| entry.proposal.origin == self.owner) {
            let mut outcome = Outcome {
                failure,
                notices: BytesMut::new(),
            };
            while let Ok(notice) = notices.try_recv() {
                protocol::relay_notice(&mut outcome.notices, &notice);
            }
            self.lane.ddl.record(entry.seq, outcome);
        }
        Ok(())
    }
}

/// Run a statement of the log outside a transaction block; one that drops
/// a replicated database after releasing it (see `release_database`),
/// again while only Chorus's own reconnecting sessions stand in its way.
/// (Run as `role`, set already; the release as this session's own.)
async fn run_releasing(
    client: &Client,
    sql: &str,
    role: &str,
    release: Option<&Release>,
) -> Result<(), tokio_postgres::Error> {
    let Some(release) = release else {
        return client.batch_execute(sql).await;
    };
    let database = release.database.as_str();
    let mut tries = 0;
    let started = std::time::Instant::now();
    loop {
        client.batch_execute("RESET ROLE").await?;
        release_database(client, release).await?;
        tracing::info!(
            database,
            tries,
            ms = started.elapsed().as_millis() as u64,
            "a dropped or renamed database leaves replication here"
        );
        client
            .batch_execute(&format!("SET ROLE {}", quote_ident(role)))
            .await?;
        match client.batch_execute(sql).await {
            Err(e)
                if tries < 5
                    && e.code() == Some(&tokio_postgres::error::SqlState::OBJECT_IN_USE) =>
            {
                tries += 1;
            }
            ran => return ran,
        }
    }
}

/// Quote an identifier as PostgreSQL's quote_ident does.
fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// Apply one DDL log entry; `Some(error)` when the statement failed here
/// (recorded too: the log moves on). Only connection-level failures are
/// `Err` (the entry is then retried).
async fn apply_entry(
    client: &Client,
    entry: &DdlEntry,
    sequence_id: u16,
    release: Option<&Release>,
) -> Result<Option<PgError>, tokio_postgres::Error> {
    let p = &entry.proposal;
    let seq = i64::try_from(entry.seq).unwrap_or(i64::MAX);
    let record = "INSERT INTO chorus.ddl_history (seq, origin, search_path, role, command, error) \
                  VALUES ($1, $2, $3, $4, $5, $6)";
    let origin = i32::try_from(p.origin).unwrap_or(0);
    let db_error = |e: tokio_postgres::Error| match e.as_db_error() {
        Some(db) => Ok(PgError::from_db(db)),
        None => Err(e),
    };
    client.batch_execute("BEGIN").await?;
    // One applier per backend at a time (a stale node that still runs one
    // waits here), and an entry already applied is not applied again.
    client
        .execute(
            "SELECT pg_advisory_xact_lock(hashtext('chorus.ddl_apply'))",
            &[],
        )
        .await?;
    let known = client
        .query_opt(
            "SELECT error FROM chorus.ddl_history WHERE seq = $1",
            &[&seq],
        )
        .await?;
    if let Some(row) = known {
        client.batch_execute("COMMIT").await?;
        return Ok(row.get::<_, Option<String>>(0).map(|message| PgError {
            code: "XX000".into(),
            message,
            detail: None,
            hint: None,
        }));
    }
    // Sequences this DDL makes become global (see sql/sequences.sql), with this
    // backend's sequence id.
    let kind = p.sequence_kind.as_deref().unwrap_or("snowflake");
    let block = p
        .galloc_block
        .unwrap_or(crate::config::DEFAULT_GALLOC_RANGE)
        .to_string();
    let sequence_id = sequence_id.to_string();
    let settings = p.settings.as_deref().unwrap_or("{}");
    let outcome = if p.transactional {
        client
            .execute(
                "SELECT set_config('search_path', $1, true), set_config('chorus.sequence_node', $2, true), \
                 set_config('chorus.sequence_kind', $3, true), set_config('chorus.sequence_block', $4, true)",
                &[&p.search_path, &sequence_id, &kind, &block],
            )
            .await?;
        // Under the origin session's settings (see chorus.ddl_settings),
        // for this transaction (one this backend cannot take, a
        // default_tablespace it lacks, fails like the statement), and as
        // the role, without a way back to this superuser session (see
        // chorus.run_as).
        let ran = match client
            .execute("SELECT chorus.use_settings($1::text::jsonb)", &[&settings])
            .await
        {
            Ok(_) => {
                client
                    .execute("SELECT chorus.run_as($1, $2)", &[&p.role, &p.sql])
                    .await
            }
            Err(e) => Err(e),
        };
        match ran {
            Ok(_) => None,
            Err(e) => {
                let failure = db_error(e)?;
                client
                    .batch_execute(
                        "ROLLBACK; BEGIN; SELECT pg_advisory_xact_lock(hashtext('chorus.ddl_apply'))",
                    )
                    .await?;
                Some(failure)
            }
        }
    } else {
        // Cannot run in a transaction block: run on its own, then record.
        // A crash in between applies it again at restart (where it then
        // usually fails as already done, and that is recorded).
        client.batch_execute("COMMIT").await?;
        client
            .execute(
                "SELECT set_config('search_path', $1, false)",
                &[&p.search_path],
            )
            .await?;
        // The origin session's settings, for this session until set back.
        let ran = match client
            .query_one(
                "SELECT chorus.use_settings($1::text::jsonb, false)::text",
                &[&settings],
            )
            .await
        {
            Ok(row) => {
                let before: String = row.get(0);
                let ran = match client
                    .batch_execute(&format!("SET ROLE {}", quote_ident(&p.role)))
                    .await
                {
                    Ok(()) => run_releasing(client, &p.sql, &p.role, release).await,
                    Err(e) => Err(e),
                };
                client
                    .batch_execute("RESET ROLE; RESET search_path")
                    .await?;
                client
                    .execute(
                        "SELECT chorus.use_settings($1::text::jsonb, false)",
                        &[&before],
                    )
                    .await?;
                ran
            }
            Err(e) => {
                client.batch_execute("RESET search_path").await?;
                Err(e)
            }
        };
        client.batch_execute("BEGIN").await?;
        match ran {
            Ok(()) => None,
            Err(e) => Some(db_error(e)?),
        }
    };
    client
        .execute(
            record,
            &[
                &seq,
                &origin,
                &p.search_path,
                &p.role,
                &p.sql,
                &outcome.as_ref().map(|e| e.message.clone()),
            ],
        )
        .await?;
    client.batch_execute("COMMIT").await?;
    Ok(outcome)
}
