//! DDL replication. Most DDL travels in its transaction's change stream
//! under the cluster DDL lease (`lease.rs`); the rest goes through the
//! Raft DDL log: the session side of that route is here, its application
//! on every backend in `apply.rs`, and how far it has come in each
//! database in lane/ddl_progress.rs.
//!
//! The DDL log route: roles, databases, tablespaces, `… CONCURRENTLY` and
//! the other statements PostgreSQL fires no event trigger for or runs only
//! outside a transaction block (`chorus_router::DdlRoute::Log`). Such a
//! statement sent through a node is validated on its origin backend (run
//! in a transaction that is rolled back, so the client gets PostgreSQL's
//! own error and nothing is proposed), proposed to the cluster's Raft log
//! with the session's `search_path`, role and database, and, once
//! committed, applied by every node to its home backend in log order,
//! exactly once (`apply.rs`). The client's command completes when its
//! origin backend has applied it (and, briefly or under commit scope
//! `all`, the others; see [`finish`]).
//!
//! DML does not wait here: each captured change carries the DDL index of
//! its origin (see sql/ddl.sql), and a peer stream applies it only once its
//! backend has applied that much of the DDL log (cluster::replication).

use std::time::{Duration, Instant};

use bytes::{BufMut, BytesMut};
use chorus_consensus::{DdlProposal, ProposeError, Request, Response};

use crate::config::CommitScope;
use crate::lane::Lane;
use crate::node::Node;
use crate::wire::protocol;

mod apply;
pub mod lease;

use crate::lane::ddl_progress::PgError;
pub use apply::{run_applier, run_foreign_applier};

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
    /// Sent over the extended protocol: the answers to the client's own
    /// batch (its Parse, Bind and Describe, up to the Sync that replaced
    /// its Execute) come first, and pass.
    batch_ahead: bool,
    /// The client's batch failed before the statement (an error in its
    /// Parse or Bind, which the client has): nothing is proposed.
    batch_failed: bool,
}

/// What the session does with a backend message while a job is under way.
pub enum JobStep {
    /// Keep it from the client (it is part of the job's answer or the
    /// wrapper's).
    Swallow,
    /// Pass it on: an answer to the client's own batch before the job's.
    Pass,
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
            batch_ahead: false,
            batch_failed: false,
        }
    }

    /// A job for the statement an extended-protocol batch runs as its
    /// whole work (`FrontendState::batch_log_run`): the batch goes to the
    /// backend without its Execute, and its Sync is followed by the
    /// [`validation_query`].
    pub fn after_batch(sql: &str) -> DdlJob {
        DdlJob {
            batch_ahead: true,
            ..DdlJob::new(sql)
        }
    }

    /// When the client's query was received.
    pub fn sent(&self) -> Instant {
        self.sent
    }

    pub fn feed(&mut self, tag: u8, body: &[u8]) -> JobStep {
        if self.batch_ahead {
            return match tag {
                b'Z' => {
                    self.batch_ahead = false;
                    JobStep::Swallow
                }
                b'E' => {
                    self.batch_failed = true;
                    JobStep::Pass
                }
                _ => JobStep::Pass,
            };
        }
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
                    let mut fields = protocol::data_row_texts(body).into_iter();
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
    protocol::ready_for_query(out, protocol::TransactionStatus::Idle);
}

/// `lane`: the session's database (the main one for a session in a local
/// database, whose statements here are all cluster-wide).
async fn answer(node: &Node, lane: &Lane, job: DdlJob, scope: CommitScope, out: &mut BytesMut) {
    if job.batch_failed {
        return;
    }
    // (Before the validation's own verdict: a rename runs in the
    // validation, where Chorus's own sessions in the database refuse it.)
    if let Some(refused) = crate::cluster::databases::refusal(node, &job.sql, &job.role).await {
        PgError {
            code: refused.code.to_owned(),
            message: refused.message,
            detail: refused.detail,
            hint: refused.hint.map(str::to_owned),
        }
        .write(out);
        return;
    }
    let transactional = match job.failed.as_deref() {
        None => true,
        // Cannot run inside a transaction block: not validated; applied on
        // its own (CREATE INDEX CONCURRENTLY, CREATE DATABASE, …).
        Some("25001") => false,
        // A rename of a replicated database, refused in the validation by
        // Chorus's own sessions in it only (see cluster::databases).
        // (Applied on its own, as a drop is.)
        Some("55006") if crate::cluster::databases::renames_lane(node, &job.sql) => false,
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
    // cluster::ddl::lease), which every applier keeps (`DdlEntry::after`).
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
    // DDL and its commit (see cluster::ddl::lease).
    let session = rand::RngCore::next_u64(&mut rand::rng());
    let home = node.config.home_backend().name.clone();
    let lease = match crate::cluster::ddl::lease::take(node, lane, session, &home).await {
        Ok(lease) => lease,
        Err(refusal) => {
            node.metrics.ddl_failed();
            error(out, refusal.code, &refusal.message, None);
            return;
        }
    };
    let proposed = consensus.propose(Request::Ddl(proposal), timeout).await;
    let _ =
        crate::cluster::ddl::lease::give_back(node, lane, session, lease, Some(false), &home).await;
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
    let (have, total) = applied_everywhere(node, applier, seq, limit, strict).await;
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

/// Wait until every backend this node knows has applied DDL log entry
/// `seq` in `lane`, until `limit` (see `DdlProgress::wait_all`); how many
/// have, of how many.
pub(crate) async fn applied_everywhere(
    node: &Node,
    lane: &Lane,
    seq: u64,
    limit: Duration,
    strict: bool,
) -> (usize, usize) {
    let home = &node.config.home_backend().name;
    lane.ddl
        .wait_all(&node.backends(), home, seq, limit, strict)
        .await
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
        assert_eq!(
            protocol::data_row_texts(&body),
            vec![Some("bob".into()), None]
        );
    }
}
