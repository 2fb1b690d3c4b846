//! Stamping write transactions with the node's hybrid logical clock.
//!
//! Before a client's write reaches the backend, the relay sends the backend
//! a small statement of its own that sets `chorus.hlc` and `chorus.origin`
//! for the session; the capture trigger reads them (and pins the first
//! value it sees for the rest of the transaction, see capture.sql). The
//! statement is pipelined with the client's messages in the same write, so
//! it costs no round trip, and its responses are swallowed on the way back.
//!
//! Two shapes, chosen so that the backend's answers can always be told
//! apart from the client's:
//!
//! - Before a simple Query: another simple Query. Its answer always ends
//!   with its own ReadyForQuery, whatever happens (even in an aborted
//!   transaction, where it fails like the client's query will).
//! - At the start of an extended-protocol batch (the first message after a
//!   Sync): Parse/Bind/Execute/Close/Close of a named statement and portal,
//!   without a Sync, so it joins the client's batch. A simple Query there
//!   would drop the client's unnamed prepared statement. Its six answers
//!   (ParseComplete, BindComplete, DataRow, CommandComplete and two
//!   CloseComplete) are counted; if it fails (an aborted transaction), the backend skips
//!   the rest of the batch up to the client's Sync, which is exactly what
//!   the client's first message would have caused, so that one error is
//!   passed on to the client.
//! - In the middle of a batch, just before the Execute of a write that the
//!   batch's messages read so far did not announce (it came in a later
//!   read): the same messages. Its answers follow the final answers of the
//!   batch's earlier messages, which the backend side counts (see
//!   [`ends_an_answer`]); an error before it means the backend skipped it.
//!
//! The setting is session-level, not transaction-local: a simple Query
//! before the client's runs in its own transaction, and a pipeline may hold
//! several transactions in one batch.

use bytes::BytesMut;
use chorus_router::hlc::Hlc;

use crate::wire::protocol;

/// Name of the statement and portal of an extended-protocol stamp.
const NAME: &str = "chorus_stamp";

/// Responses to an extended stamp: ParseComplete, BindComplete, DataRow,
/// CommandComplete, CloseComplete, CloseComplete.
const EXTENDED_RESPONSES: u8 = 6;

/// Which kind of stamp is waiting for its answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StampKind {
    /// Answered up to and including a ReadyForQuery.
    Query,
    /// Answered by `EXTENDED_RESPONSES` messages, or cut short by an error.
    Extended,
}

/// A simple query's bytes and the (offset, length) of each of its DDL
/// statements in them.
pub type DdlStage = (Vec<u8>, Vec<(usize, usize)>);

/// What a stamp tells the backend about DDL (see ddl.sql,
/// `chorus.capture_ddl`): the number of the cluster DDL lease the
/// transaction holds, where the DDL statements of a simple query are, and
/// the node's defaults for the sequences DDL makes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DdlStamp {
    /// The lease number; `None` clears one left from an earlier
    /// transaction.
    pub seq: Option<u64>,
    /// Why the lease could not be taken (SQLSTATE, message): the backend
    /// refuses the transaction's DDL with it.
    pub refusal: Option<(&'static str, String)>,
    /// For a simple query: its bytes and the byte ranges of its DDL
    /// statements (for an extended-protocol batch that runs a statement of
    /// the DDL log's kind: that statement).
    pub stage: Option<DdlStage>,
    pub sequence_kind: String,
    pub galloc_block: i64,
    /// The node's sequence id (the low bits of its snowflake values).
    pub sequence_id: Option<u16>,
    /// The staged statement is one PostgreSQL fires no event trigger for
    /// (a role, a grant on a database, …), sent inside a transaction
    /// block: the stamp records it in the transaction's change stream
    /// itself (`chorus.capture_log_statement`). A failure
    /// of the statement aborts the (sub)transaction, and the record with
    /// it.
    pub record_staged: bool,
}

impl DdlStamp {
    fn sql(&self, out: &mut String) {
        use std::fmt::Write;
        let seq = self.seq.map(|s| s.to_string()).unwrap_or_default();
        let refusal = self
            .refusal
            .as_ref()
            .map(|(code, message)| format!("{code}:{}", message.replace('\'', "''")))
            .unwrap_or_default();
        let stage = match &self.stage {
            Some((query, ranges)) => {
                let mut hex = String::with_capacity(query.len() * 2);
                for b in query {
                    let _ = write!(hex, "{b:02x}");
                }
                let ranges: Vec<String> =
                    ranges.iter().map(|(a, n)| format!("[{a},{n}]")).collect();
                format!("{{\"q\":\"{hex}\",\"ddl\":[{}]}}", ranges.join(","))
            }
            None => String::new(),
        };
        let kind: String = self
            .sequence_kind
            .chars()
            .filter(char::is_ascii_alphanumeric)
            .collect();
        let _ = write!(
            out,
            ", set_config('chorus.ddl_seq', '{seq}', false), set_config('chorus.ddl_refusal', '{refusal}', false), \
             set_config('chorus.ddl_stage', '{stage}', false), set_config('chorus.ddl_stage_pos', '0', false), \
             set_config('chorus.sequence_default_kind', '{kind}', false), set_config('chorus.sequence_block', '{}', false), \
             set_config('chorus.sequence_id', '{}', false)",
            self.galloc_block,
            self.sequence_id.map(|i| i.to_string()).unwrap_or_default()
        );
    }
}

fn set_sql(hlc: Hlc, ddl: Option<&DdlStamp>, kind: StampKind) -> String {
    let mut sql = format!(
        "SELECT set_config('chorus.hlc', '{}', false), set_config('chorus.origin', '{}', false)",
        hlc.timestamp, hlc.node
    );
    if let Some(ddl) = ddl {
        ddl.sql(&mut sql);
        if ddl.record_staged {
            // (In the same SELECT for an extended stamp, one statement,
            // after the settings it reads: its items run in order.)
            sql.push_str(match kind {
                StampKind::Query => "; SELECT chorus.capture_log_statement()",
                StampKind::Extended => ", chorus.capture_log_statement()",
            });
        }
    }
    sql
}

fn put_message(out: &mut BytesMut, tag: u8, parts: &[&[u8]]) {
    protocol::write_message(out, tag, |body| {
        for part in parts {
            body.extend_from_slice(part);
        }
    });
}

/// Append the stamp of `kind` for `hlc` to `out`.
pub fn write_stamp(out: &mut BytesMut, kind: StampKind, hlc: Hlc, ddl: Option<&DdlStamp>) {
    let sql = set_sql(hlc, ddl, kind);
    match kind {
        StampKind::Query => protocol::query(out, &sql),
        StampKind::Extended => write_extended(out, &sql),
    }
}

/// An extended-protocol stamp running `sql`, which fails: put at the
/// start of a batch that must not run, it makes the backend skip the batch
/// up to its Sync, and its error reaches the client (see [`Swallower`]),
/// as the batch's first message's would. It uses the unnamed statement and
/// portal (a failed Execute would leave a named one behind, its Close
/// skipped): the client's, which the failed batch does not get to use.
pub fn write_failing(out: &mut BytesMut, sql: &str) {
    put_message(out, b'P', &[b"\0", sql.as_bytes(), b"\0", &[0, 0]]);
    put_message(out, b'B', &[b"\0\0", &[0, 0, 0, 0, 0, 0]]);
    put_message(out, b'E', &[b"\0", &[0, 0, 0, 0]]);
}

fn write_extended(out: &mut BytesMut, sql: &str) {
    let name = NAME.as_bytes();
    // Parse: name, query, no parameter types.
    put_message(out, b'P', &[name, b"\0", sql.as_bytes(), b"\0", &[0, 0]]);
    // Bind: portal, statement, no formats, no parameters, no result formats.
    put_message(out, b'B', &[name, b"\0", name, b"\0", &[0, 0, 0, 0, 0, 0]]);
    // Execute: portal, no row limit.
    put_message(out, b'E', &[name, b"\0", &[0, 0, 0, 0]]);
    put_message(out, b'C', &[b"P", name, b"\0"]);
    put_message(out, b'C', &[b"S", name, b"\0"]);
}

/// Whether a backend message is the final answer to one client message of
/// the extended protocol: ParseComplete, BindComplete, CloseComplete;
/// RowDescription or NoData (a Describe; a statement's ParameterDescription
/// comes before); CommandComplete, EmptyQueryResponse or PortalSuspended
/// (an Execute, after its rows or its COPY). Errors are not counted: after
/// one, the backend skips the rest of the batch.
#[inline]
pub fn ends_an_answer(tag: u8) -> bool {
    matches!(tag, b'1' | b'2' | b'3' | b'T' | b'n' | b'C' | b'I' | b's')
}

/// Whether a client message gets one final answer (see [`ends_an_answer`]).
#[inline]
pub fn gets_an_answer(tag: u8) -> bool {
    matches!(tag, b'P' | b'B' | b'C' | b'D' | b'E')
}

/// What to do with a backend message while a stamp's answers are due.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Drop it; the stamp still expects more.
    Swallow,
    /// Drop it; it was the stamp's last answer.
    SwallowLast,
    /// Pass it to the client; the stamp still expects more.
    Pass,
    /// Pass it to the client; the stamp expects nothing more.
    PassLast,
    /// Not the stamp's: the backend skipped the stamp (an error earlier in
    /// its batch, passed on already), and this is the batch's end.
    Skipped,
}

/// Tracks the answers of one stamp.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Swallower {
    kind: StampKind,
    seen: u8,
}

impl Swallower {
    pub fn new(kind: StampKind) -> Swallower {
        Swallower { kind, seen: 0 }
    }

    /// Judge the next backend message. Asynchronous messages (notices,
    /// notifications, parameter status) belong to the client whenever they
    /// arrive.
    pub fn judge(&mut self, tag: u8) -> Verdict {
        if matches!(tag, b'N' | b'A' | b'S') {
            return Verdict::Pass;
        }
        match self.kind {
            StampKind::Query if tag == b'Z' => Verdict::SwallowLast,
            StampKind::Query => Verdict::Swallow,
            StampKind::Extended if tag == b'E' => Verdict::PassLast,
            StampKind::Extended if tag == b'Z' => Verdict::Skipped,
            StampKind::Extended => {
                self.seen += 1;
                if self.seen >= EXTENDED_RESPONSES {
                    Verdict::SwallowLast
                } else {
                    Verdict::Swallow
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tags(bytes: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        let mut rest = bytes;
        while !rest.is_empty() {
            let len = u32::from_be_bytes([rest[1], rest[2], rest[3], rest[4]]) as usize;
            out.push(rest[0]);
            rest = &rest[1 + len..];
        }
        out
    }

    #[test]
    fn stamps_are_well_framed_messages() {
        let hlc = Hlc {
            timestamp: 42,
            node: 3,
        };
        let mut q = BytesMut::new();
        write_stamp(&mut q, StampKind::Query, hlc, None);
        assert_eq!(tags(&q), b"Q");
        assert!(std::str::from_utf8(&q[5..])
            .unwrap()
            .contains("'chorus.hlc', '42'"));
        let mut e = BytesMut::new();
        write_stamp(&mut e, StampKind::Extended, hlc, None);
        assert_eq!(tags(&e), b"PBECC");
    }

    #[test]
    fn each_extended_message_gets_exactly_one_final_answer() {
        // Parse, Bind, Describe (statement), Describe (portal), Execute of a
        // SELECT, Execute with a row limit, Execute of an empty query,
        // Execute of a COPY TO STDOUT, Close, then Sync.
        let sent = b"PBDDEEEEC";
        let answers = b"12tTT" as &[u8];
        let answers = [answers, b"DDC", b"Ds", b"I", b"HddcC", b"3", b"Z"].concat();
        assert_eq!(
            sent.iter().filter(|t| gets_an_answer(**t)).count(),
            answers.iter().filter(|t| ends_an_answer(**t)).count()
        );
        // A stamp's answers: one final answer per message, and its row.
        let mut stamp = BytesMut::new();
        let hlc = Hlc {
            timestamp: 1,
            node: 1,
        };
        write_stamp(&mut stamp, StampKind::Extended, hlc, None);
        let final_answers = tags(&stamp).iter().filter(|t| gets_an_answer(**t)).count();
        assert_eq!(final_answers + 1, usize::from(EXTENDED_RESPONSES));
    }

    #[test]
    fn query_stamp_swallows_through_its_ready_for_query() {
        let mut s = Swallower::new(StampKind::Query);
        assert_eq!(s.judge(b'T'), Verdict::Swallow);
        assert_eq!(s.judge(b'D'), Verdict::Swallow);
        assert_eq!(s.judge(b'A'), Verdict::Pass);
        assert_eq!(s.judge(b'C'), Verdict::Swallow);
        assert_eq!(s.judge(b'Z'), Verdict::SwallowLast);
        let mut failed = Swallower::new(StampKind::Query);
        assert_eq!(failed.judge(b'E'), Verdict::Swallow);
        assert_eq!(failed.judge(b'Z'), Verdict::SwallowLast);
    }

    #[test]
    fn extended_stamp_counts_its_answers_and_passes_an_error_on() {
        let mut s = Swallower::new(StampKind::Extended);
        for tag in *b"12DC3" {
            assert_eq!(s.judge(tag), Verdict::Swallow);
        }
        assert_eq!(s.judge(b'N'), Verdict::Pass);
        assert_eq!(s.judge(b'3'), Verdict::SwallowLast);
        let mut failed = Swallower::new(StampKind::Extended);
        assert_eq!(failed.judge(b'E'), Verdict::PassLast);
        let mut skipped = Swallower::new(StampKind::Extended);
        assert_eq!(skipped.judge(b'Z'), Verdict::Skipped);
    }
}
