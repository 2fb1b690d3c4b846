//! What the relay refuses in place of a client's statement, and how: a
//! statement (or a prepared one) that makes the backend raise the error,
//! so that the client gets an ordinary ErrorResponse where its statement's
//! answer would be, and the session goes on as PostgreSQL's would.

use bytes::BytesMut;
use chorus_router::first_keyword;

use crate::wire::protocol;

use super::stamp::{self, StampKind};
use super::state::RelayState;

/// A Query message that makes the backend raise an error, so the client
/// gets a normal ErrorResponse and ReadyForQuery from it.
pub(super) fn refusal_query(code: &str, message: &str, hint: &str) -> BytesMut {
    let sql = refusal_sql(code, message, hint);
    let mut out = BytesMut::with_capacity(sql.len() + 6);
    protocol::query(&mut out, &sql);
    out
}

/// A function Chorus refuses to let a statement call, with why and what
/// to do instead.
pub(super) struct RefusedCall {
    pub(super) names: &'static [&'static str],
    pub(super) message: &'static str,
    pub(super) hint: &'static str,
}

pub(super) const SETVAL: RefusedCall = RefusedCall {
    names: &["setval"],
    message: "setval() is not supported through Chorus: the cluster's sequences are set up per backend",
    hint: "Sequences made through Chorus hand out values that never collide across backends; setval() on one backend could make it repeat another's.",
};

/// Large objects live in pg_largeobject, which no trigger sees: written
/// through one node they would exist on one backend only.
pub(super) const LARGE_OBJECTS: RefusedCall = RefusedCall {
    names: chorus_router::LARGE_OBJECT_WRITERS,
    message: "large objects are not replicated by Chorus",
    hint: "Store the data in a bytea column of a table, which replicates like any other.",
};

pub(super) const REFUSED_CALLS: [&RefusedCall; 2] = [&SETVAL, &LARGE_OBJECTS];

/// `EXPLAIN ANALYZE CREATE TABLE … AS` (or `SELECT … INTO`, `CREATE
/// MATERIALIZED VIEW`) makes its table without firing PostgreSQL's event
/// triggers: it would exist on one backend only.
pub(super) const EXPLAINED_DDL: RefusedCall = RefusedCall {
    names: &[],
    message: "EXPLAIN ANALYZE of a statement that makes a table cannot be replicated",
    hint: "Run the statement itself, and EXPLAIN ANALYZE its query alone.",
};

/// Why a statement of the DDL log's kind is refused over the extended
/// protocol (see `EXTENDED_LOG_HINT`).
const EXTENDED_LOG_REFUSAL: &str = "this DDL cannot be replicated in an extended-protocol batch that runs other statements outside a transaction block";

/// What to do instead of a statement of the DDL log's kind that cannot go
/// through the extended protocol where it was sent.
const EXTENDED_LOG_HINT: &str = "Roles, databases, tablespaces and CONCURRENTLY statements replicate through the cluster's DDL log: send it in a batch of its own (Parse, Bind, Execute, Sync) or as a simple query, or inside BEGIN ... COMMIT, or SET chorus.ddl_scope = 'local' to run it on this node's backend only.";

/// Whether a DDL statement is one run under EXPLAIN ANALYZE.
pub(super) fn explained(sql: &str) -> bool {
    first_keyword(sql).is_some_and(|(w, _)| w.eq_ignore_ascii_case("EXPLAIN"))
}

/// The refusal for a statement that calls one of [`REFUSED_CALLS`]
/// (a name followed by `(`, case-insensitive; text in quotes is not told
/// apart, so a literal mentioning one is refused too).
pub(super) fn refused_call(sql: &str) -> Option<&'static RefusedCall> {
    let bytes = sql.as_bytes();
    REFUSED_CALLS.into_iter().find(|refused| {
        refused.names.iter().any(|name| {
            let name = name.as_bytes();
            bytes.windows(name.len()).enumerate().any(|(i, w)| {
                w.eq_ignore_ascii_case(name)
                    && (i == 0 || !is_word_byte(bytes[i - 1]))
                    && bytes[i + name.len()..]
                        .iter()
                        .find(|b| !b.is_ascii_whitespace())
                        .is_some_and(|b| *b == b'(')
            })
        })
    })
}

pub(super) fn is_word_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'_'
}

/// The client's Parse (`body`) of a statement Chorus refuses, made a Parse
/// of the same name that fails with `0A000` when run: the error comes in
/// the statement's place in the batch.
pub(super) fn refused_parse(
    state: &RelayState,
    body: &[u8],
    message: &str,
    hint: &str,
) -> BytesMut {
    let name = protocol::read_cstr(body).map_or("", |(name, _)| name);
    let mut out = BytesMut::new();
    protocol::write_message(&mut out, b'P', |m| {
        protocol::put_cstr(m, name);
        protocol::put_cstr(m, &refusal_sql("0A000", message, hint));
        m.extend_from_slice(&0i16.to_be_bytes());
    });
    state.remember_prepared(b'P', &out[5..]);
    out
}

/// A statement that raises this error when run.
pub(super) fn refusal_sql(code: &str, message: &str, hint: &str) -> String {
    format!(
        "DO $chorus$ BEGIN RAISE EXCEPTION USING ERRCODE = '{code}', MESSAGE = '{}', HINT = '{}'; END $chorus$",
        message.replace('\'', "''"),
        hint.replace('\'', "''")
    )
}

/// A statement of the DDL log's kind that cannot run where the client's
/// Execute (or the batch starting with this message) would run it: a
/// failing stamp goes first (its answers come `after` the batch's earlier
/// ones when it is sent mid-batch), then the client's message, which the
/// backend skips with the rest of the batch.
pub(super) fn log_statement_refused(
    state: &RelayState,
    tag: u8,
    body: &[u8],
    after: Option<u32>,
) -> BytesMut {
    state.push_stamp(StampKind::Extended, after);
    let mut out = BytesMut::new();
    stamp::write_failing(
        &mut out,
        &refusal_sql("0A000", EXTENDED_LOG_REFUSAL, EXTENDED_LOG_HINT),
    );
    protocol::write_message(&mut out, tag, |m| m.extend_from_slice(body));
    out
}
