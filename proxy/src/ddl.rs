//! The DDL log route: roles, databases, tablespaces, `… CONCURRENTLY` and
//! the other statements PostgreSQL fires no event trigger for or runs only
//! outside a transaction block (`chorus_router::DdlRoute::Log`; all other
//! DDL travels in its transaction's change stream, see
//! `cluster::ddl_lease`). Such a statement sent through a node is
//! validated on its origin backend (run in a transaction that is rolled back, so the client
//! gets PostgreSQL's own error and nothing is proposed), proposed to the
//! cluster's Raft log with the session's `search_path` and role, and, once
//! committed, applied by every node to its home backend in log order,
//! exactly once: the backend records each entry in `chorus.ddl_history` in
//! the same transaction as the DDL. The client's command completes when its
//! origin backend has applied it (and, briefly or under commit scope
//! `all`, the others; see [`finish`]).
//!
//! DML does not wait here: each captured change carries the DDL index of
//! its origin (see sql/ddl.sql), and a peer stream applies it only once its
//! backend has applied that much of the DDL log (cluster::replication).

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{BufMut, BytesMut};
use chorus_consensus::{Consensus, DdlEntry, DdlProposal, ProposeError, Request, Response};
use tokio_postgres::Client;

use crate::cluster::ddl_progress::{Outcome, PgError, INDEX_SQL};
use crate::cluster::lane::Lane;
use crate::cluster::replication::ReplicationError;
use crate::config::{BackendConfig, CommitScope};
use crate::node::Node;
use crate::protocol;

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
    let mine = match &entry.proposal.database {
        Some(database) => database == lane.database(),
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
            // cluster::ddl_lease). Anything else waits until this backend
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
                        for (other, slot) in &mut others {
                            let c = other_client(slot, backend, other).await?;
                            wait_index(c, entry.after, &backend.name, other.database(), entry.seq)
                                .await?;
                        }
                    }
                    let here = Applying {
                        lane,
                        client: &client,
                        backend,
                        owner,
                        sequence_id,
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
        let failure = apply_entry(self.client, entry, self.sequence_id).await?;
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
    let block = p.galloc_block.unwrap_or(1_000_000).to_string();
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
                    Ok(()) => client.batch_execute(&p.sql).await,
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

/// A DDL query under way in a session: the validation's answers are read
/// here (see [`validation_query`]), the rest happens in [`finish`].
#[derive(Debug)]
pub struct DdlJob {
    sql: String,
    sent: Instant,
    /// Answers of the wrapper statements still to come (BEGIN's and SET
    /// LOCAL's CommandComplete, the SELECT's RowDescription, DataRow and
    /// CommandComplete).
    wrapper_left: u8,
    role: String,
    search_path: String,
    /// The session's `chorus.sequence_kind` (empty: the node's default).
    sequence_kind: String,
    /// The session's settings the DDL depends on (`chorus.ddl_settings()`,
    /// JSON).
    settings: Option<String>,
    /// The DDL's own answers (notices, CommandComplete, or its error).
    output: BytesMut,
    failed: Option<String>,
    /// ReadyForQuery messages seen (the validation's, then ROLLBACK's).
    ready_seen: u8,
}

/// What the session does with a backend message while a job is under way.
pub enum JobStep {
    /// Keep it from the client (it is part of the job's answer or the
    /// wrapper's).
    Swallow,
    /// The job's last answer: finish it.
    Done,
}

impl DdlJob {
    pub fn new(sql: &str) -> DdlJob {
        DdlJob {
            sql: sql.to_owned(),
            sent: Instant::now(),
            wrapper_left: 5,
            role: String::new(),
            search_path: String::new(),
            sequence_kind: String::new(),
            settings: None,
            output: BytesMut::new(),
            failed: None,
            ready_seen: 0,
        }
    }

    /// When the client's query was received.
    pub fn sent(&self) -> Instant {
        self.sent
    }

    pub fn feed(&mut self, tag: u8, body: &[u8]) -> JobStep {
        if self.ready_seen == 1 {
            // The answers to our ROLLBACK.
            return if tag == b'Z' {
                JobStep::Done
            } else {
                JobStep::Swallow
            };
        }
        match tag {
            b'Z' => self.ready_seen = 1,
            b'E' => {
                self.failed = Some(protocol::parse_error_fields(body).code.to_owned());
                // A position in the client's statement, not in the
                // validation query around it.
                let length = self.sql.chars().count() + 1;
                let body = protocol::shift_error_position(body, VALIDATION_PREFIX.len(), length);
                protocol::write_message(&mut self.output, tag, |m| m.extend_from_slice(&body));
            }
            b'C' | b'T' | b'D' if self.wrapper_left > 0 => {
                self.wrapper_left -= 1;
                if tag == b'D' {
                    let mut fields = data_row_texts(body).into_iter();
                    self.role = fields.next().flatten().unwrap_or_default();
                    self.search_path = fields.next().flatten().unwrap_or_default();
                    self.sequence_kind = fields.next().flatten().unwrap_or_default();
                    self.settings = fields.next().flatten();
                }
            }
            _ => protocol::write_message(&mut self.output, tag, |m| m.extend_from_slice(body)),
        }
        JobStep::Swallow
    }
}

/// The text values of a DataRow.
fn data_row_texts(body: &[u8]) -> Vec<Option<String>> {
    let mut values = Vec::new();
    let Some(count) = body.get(..2).map(|b| u16::from_be_bytes([b[0], b[1]])) else {
        return values;
    };
    let mut at = 2;
    for _ in 0..count {
        let Some(len) = body
            .get(at..at + 4)
            .map(|b| i32::from_be_bytes([b[0], b[1], b[2], b[3]]))
        else {
            break;
        };
        at += 4;
        if len < 0 {
            values.push(None);
            continue;
        }
        let len = len as usize;
        let Some(value) = body.get(at..at + len) else {
            break;
        };
        values.push(Some(String::from_utf8_lossy(value).into_owned()));
        at += len;
    }
    values
}

/// What goes to the backend instead of a DDL query: the statement inside a
/// transaction that the second query rolls back (after an error the first
/// query leaves the block aborted; after success the second only warns,
/// which is swallowed), with the session's role and search_path read in it.
/// Capture stays quiet in it (`chorus.ddl_scope = 'local'`, which any role
/// may set, unlike `chorus.applying`): a statement of this route that fires
/// event triggers (ALTER SUBSCRIPTION, ALTER SEQUENCE) is not taken for DDL
/// run out of Chorus's sight.
pub fn validation_query(sql: &str) -> BytesMut {
    let mut out = BytesMut::with_capacity(sql.len() + 128);
    // The newline ends a trailing `--` comment of the client's text.
    protocol::query(&mut out, &format!("{VALIDATION_PREFIX}{sql}\n"));
    protocol::query(&mut out, "ROLLBACK");
    out
}

/// What goes before the client's statement in [`validation_query`] (ASCII:
/// as many characters as bytes, for error positions).
const VALIDATION_PREFIX: &str = "BEGIN; SET LOCAL chorus.ddl_scope = 'local'; SELECT current_user, \
    current_setting('search_path'), current_setting('chorus.sequence_kind', true), chorus.ddl_settings();\n";

/// A refusal: its message and hint (SQLSTATE 0A000).
pub struct Refusal {
    pub message: &'static str,
    pub hint: &'static str,
}

/// Global sequences are set up per backend; the same ALTER on every
/// backend would undo that.
pub const ALTER_SEQUENCE: Refusal = Refusal {
    message: "ALTER SEQUENCE cannot be replicated: the cluster's sequences are set up per backend",
    hint: "Create a new sequence with the options you need, or SET chorus.ddl_scope = 'local' to alter this node's copy only.",
};

/// Whether `sql` is an ALTER SEQUENCE (refused: [`ALTER_SEQUENCE`]).
pub fn alter_sequence(sql: &str) -> bool {
    starts_with_words(sql, &["alter", "sequence"])
}

/// Whether `sql` begins with these (lower-case) words.
fn starts_with_words(sql: &str, words: &[&str]) -> bool {
    let mut found = sql.split_whitespace();
    words
        .iter()
        .all(|w| found.next().is_some_and(|f| f.eq_ignore_ascii_case(w)))
}

/// The CommandComplete tag of a statement that ran outside the validation
/// (one that cannot run in a transaction block).
fn command_tag(sql: &str) -> String {
    let words: Vec<String> = sql
        .split_whitespace()
        .take(3)
        .map(|w| w.trim_end_matches(';').to_ascii_uppercase())
        .collect();
    match words.as_slice() {
        [first, second, third, ..] if second == "UNIQUE" && third == "INDEX" => {
            format!("{first} INDEX")
        }
        [first, second, ..] => format!("{first} {second}"),
        [first] => first.clone(),
        [] => String::new(),
    }
}

/// Finish a validated DDL query: propose it, wait for its application, and
/// put the client's answer (ending with ReadyForQuery) in `out`.
pub async fn finish(node: &Node, lane: &Lane, job: DdlJob, scope: CommitScope, out: &mut BytesMut) {
    answer(node, lane, job, scope, out).await;
    protocol::ready_for_query(out, b'I');
}

/// `lane`: the session's database (the main one for a session in a local
/// database, whose statements here are all cluster-wide).
async fn answer(node: &Node, lane: &Lane, job: DdlJob, scope: CommitScope, out: &mut BytesMut) {
    let transactional = match job.failed.as_deref() {
        None => true,
        // Cannot run inside a transaction block: not validated; applied on
        // its own (CREATE INDEX CONCURRENTLY, CREATE DATABASE, …).
        Some("25001") => false,
        Some(_) => {
            // PostgreSQL's own error: nothing is proposed.
            out.extend_from_slice(&job.output);
            return;
        }
    };
    let Some(consensus) = node.consensus() else {
        error(
            out,
            "55000",
            "this node has no cluster to replicate DDL through",
            None,
        );
        return;
    };
    let Some(cluster) = node.config.cluster.as_ref() else {
        return;
    };
    let sequence_kind = match job.sequence_kind.to_ascii_lowercase().as_str() {
        "" => cluster.sequence_kind.as_str(),
        "snowflake" => "snowflake",
        "galloc" => "galloc",
        _ => {
            error(
                out,
                "22023",
                &format!(
                    "invalid value for parameter \"chorus.sequence_kind\": \"{}\"",
                    job.sequence_kind
                ),
                Some("Available values: snowflake, galloc."),
            );
            return;
        }
    };
    if alter_sequence(&job.sql) {
        error(
            out,
            "0A000",
            ALTER_SEQUENCE.message,
            Some(ALTER_SEQUENCE.hint),
        );
        return;
    }
    // Cluster-wide objects are applied in the main database; the rest of
    // the log's statements in the session's.
    let cluster_wide = chorus_router::cluster_wide(&job.sql);
    let main = node.main_lane();
    let applier: &Lane = match &main {
        Some(main) if cluster_wide => main,
        _ => lane,
    };
    let timeout = node.config.ddl_timeout();
    let deadline = Instant::now() + timeout;
    // No wait for the peers to have this node's earlier changes: these
    // statements act on cluster-wide objects or build an index
    // concurrently, and their order among other DDL is the lease's (see
    // cluster::ddl_lease), which every applier keeps (`DdlEntry::after`).
    let mut id = [0u8; 16];
    rand::RngCore::fill_bytes(&mut rand::rng(), &mut id);
    let proposal = DdlProposal {
        id: id.iter().map(|b| format!("{b:02x}")).collect(),
        sql: job.sql.clone(),
        search_path: job.search_path.clone(),
        role: job.role.clone(),
        origin: u64::from(node.config.node.id),
        transactional,
        sequence_kind: Some(sequence_kind.to_owned()),
        galloc_block: Some(cluster.galloc_range_size),
        in_stream: false,
        settings: job.settings.clone(),
        database: (!cluster_wide).then(|| lane.database().to_owned()),
    };
    let started = Instant::now();
    // The lease keeps this DDL from running between another transaction's
    // DDL and its commit (see cluster::ddl_lease).
    let session = rand::RngCore::next_u64(&mut rand::rng());
    let home = node.config.home_backend().name.clone();
    let lease = match crate::cluster::ddl_lease::take(node, lane, session, &home).await {
        Ok(lease) => lease,
        Err(refusal) => {
            node.metrics.ddl_failed();
            error(out, refusal.code, &refusal.message, None);
            return;
        }
    };
    let proposed = consensus.propose(Request::Ddl(proposal), timeout).await;
    let _ =
        crate::cluster::ddl_lease::give_back(node, lane, session, lease, Some(false), &home).await;
    let seq = match proposed {
        Ok(Response::Ddl { seq, .. }) => seq,
        Ok(_) => {
            error(out, "XX000", "unexpected answer from the cluster", None);
            return;
        }
        Err(ProposeError::Timeout(_)) => {
            node.metrics.ddl_failed();
            error(
                out,
                "40003",
                &format!(
                    "DDL not confirmed by a majority of the cluster within {} ms",
                    timeout.as_millis()
                ),
                Some("This node cannot reach a Raft majority. DML keeps working; retry the DDL when the cluster is whole (if the proposal reached the leader it may still be applied)."),
            );
            return;
        }
        Err(ProposeError::Failed(reason)) => {
            node.metrics.ddl_failed();
            error(
                out,
                "XX000",
                &format!("DDL could not be proposed: {reason}"),
                None,
            );
            return;
        }
    };
    let left = deadline.saturating_duration_since(Instant::now());
    if !applier.ddl.wait_applied(seq, left).await {
        error(
            out,
            "40003",
            &format!(
                "DDL {seq} is committed but was not applied on this node's backend within {} ms",
                timeout.as_millis()
            ),
            Some("It will be applied; see chorus.ddl_history."),
        );
        return;
    }
    node.metrics.ddl_latency(started.elapsed());
    let applied_after = started.elapsed();
    let outcome = applier.ddl.take(seq);
    if !transactional {
        // (A validated statement's notices came with its validation.)
        out.extend_from_slice(&outcome.notices);
    }
    if let Some(failure) = outcome.failure {
        failure.write(out);
        return;
    }
    // Under commit scope `all`, every backend must have it; otherwise the
    // others get a short while, so that the schema is usable through any
    // node as soon as the command returns in a healthy cluster.
    let (limit, strict) = match scope {
        CommitScope::All => (deadline.saturating_duration_since(Instant::now()), true),
        _ => (PEER_WAIT, false),
    };
    let (have, total) = applier.ddl.wait_all(&node.config, seq, limit, strict).await;
    tracing::debug!(
        seq,
        applied_ms = applied_after.as_millis() as u64,
        everywhere_ms = started.elapsed().as_millis() as u64,
        "DDL done"
    );
    if strict && have < total {
        error(
            out,
            "40003",
            &format!("commit scope \"all\" not reached: {have} of {total} backends applied DDL {seq}"),
            Some("It is committed and applied on this node's backend; the others apply it when available."),
        );
        return;
    }
    if transactional {
        out.extend_from_slice(&job.output);
    } else {
        let tag = command_tag(&job.sql);
        protocol::write_message(out, b'C', |m| {
            m.extend_from_slice(tag.as_bytes());
            m.put_u8(0);
        });
    }
}

/// How long a DDL command waits for the other backends by default.
const PEER_WAIT: Duration = Duration::from_millis(1000);

fn error(out: &mut BytesMut, code: &str, message: &str, hint: Option<&str>) {
    PgError {
        code: code.to_owned(),
        message: message.to_owned(),
        detail: None,
        hint: hint.map(str::to_owned),
    }
    .write(out);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tags_of_statements_run_outside_a_transaction() {
        assert_eq!(
            command_tag("create index concurrently i on t (a)"),
            "CREATE INDEX"
        );
        assert_eq!(
            command_tag("CREATE UNIQUE INDEX CONCURRENTLY i ON t (a)"),
            "CREATE INDEX"
        );
        assert_eq!(command_tag("drop index concurrently i;"), "DROP INDEX");
        assert_eq!(command_tag("CREATE DATABASE x"), "CREATE DATABASE");
    }

    #[test]
    fn data_rows_decode_to_texts() {
        let mut body = Vec::new();
        body.extend_from_slice(&2u16.to_be_bytes());
        body.extend_from_slice(&3i32.to_be_bytes());
        body.extend_from_slice(b"bob");
        body.extend_from_slice(&(-1i32).to_be_bytes());
        assert_eq!(data_row_texts(&body), vec![Some("bob".into()), None]);
    }
}
