//! Pure SQL statement classification for the Chorus proxy.
//!
//! SQL text in, a decision out: no IO, no async. The proxy asks this crate
//! what kind of statement a client sent (read, write, DDL, node-local
//! maintenance, transaction control, session state) so it can route,
//! replicate and count it. Classification is cheap on the common path (a
//! keyword check) and falls back to a full `sqlparser` parse only for
//! statements whose first keyword does not settle the question (`WITH`,
//! `EXPLAIN ANALYZE`, a `SELECT` that may call `nextval()` or lock rows, …).
//! A statement that does not parse is reported as [`StatementClass::Unknown`]
//! and is still forwarded untouched by the proxy.
//!
//! The [`hlc`] module holds the hybrid logical clock that orders writes.

pub mod ddl;
pub mod hlc;
mod lexer;
mod parsed;
mod pooling;

pub use ddl::{
    cluster_wide, concurrent_index_target, created_database, ddl_route, dropped_database,
    renamed_database, DdlRoute,
};
pub use lexer::{first_keyword, split_statements, Statements};
pub use parsed::LARGE_OBJECT_WRITERS;
pub use pooling::{may_keep_session_state, preparing_statement};

/// What a single SQL statement does, as far as Chorus is concerned.
///
/// The variants are ordered by how much they matter to the cluster: when a
/// query string holds several statements, the strongest one decides the
/// class of the whole string (see [`classify_query`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum StatementClass {
    /// `BEGIN`, `COMMIT`, `ROLLBACK`, `SAVEPOINT`, `PREPARE TRANSACTION`, …
    Transaction,
    /// Session state that never touches data: `SET`, `RESET`, `DISCARD`,
    /// `LISTEN`, `NOTIFY`, `DEALLOCATE`, …
    Session,
    /// Reads data and changes nothing: `SELECT`, `SHOW`, `COPY … TO`,
    /// plain `EXPLAIN`, cursor movement.
    Read,
    /// Could not be decided (it did not parse, or depends on a prepared
    /// statement, as `EXECUTE` does). Routing treats it like a write.
    Unknown,
    /// Node-local maintenance that is never replicated: `VACUUM`, `ANALYZE`,
    /// `REINDEX`, `CLUSTER`, `CHECKPOINT`.
    Maintenance,
    /// Changes rows: `INSERT`, `UPDATE`, `DELETE`, `MERGE`, `TRUNCATE`,
    /// `COPY … FROM`, writable CTEs, `SELECT nextval()`, `SELECT … FOR
    /// UPDATE`, `EXPLAIN ANALYZE <write>`, `CALL`, and `DO` blocks that
    /// cannot run DDL.
    Write,
    /// Changes the schema or privileges: `CREATE`, `ALTER`, `DROP`,
    /// `COMMENT`, `GRANT`, `REVOKE`, `SELECT … INTO`, `DO` blocks whose
    /// code may run DDL, …
    Ddl,
}

impl StatementClass {
    /// Every class, weakest first.
    pub const ALL: [StatementClass; 7] = [
        StatementClass::Transaction,
        StatementClass::Session,
        StatementClass::Read,
        StatementClass::Unknown,
        StatementClass::Maintenance,
        StatementClass::Write,
        StatementClass::Ddl,
    ];

    /// A short lower-case name, used as a metric label.
    pub const fn as_str(self) -> &'static str {
        match self {
            StatementClass::Transaction => "transaction",
            StatementClass::Session => "session",
            StatementClass::Read => "read",
            StatementClass::Unknown => "unknown",
            StatementClass::Maintenance => "maintenance",
            StatementClass::Write => "write",
            StatementClass::Ddl => "ddl",
        }
    }

    /// Position of the class in [`StatementClass::ALL`].
    pub const fn index(self) -> usize {
        self as usize
    }
}

/// The classification of a whole query string (one simple-protocol `Query`
/// message may carry several statements).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QuerySummary {
    /// The strongest class among the statements; `None` for an empty query.
    pub strongest: Option<StatementClass>,
    /// How many statements of each class, indexed by [`StatementClass::index`].
    pub counts: [u32; 7],
}

impl QuerySummary {
    /// Total number of statements.
    pub fn statements(&self) -> u32 {
        self.counts.iter().sum()
    }
}

/// Classify every statement of a query string.
pub fn classify_query(sql: &str) -> QuerySummary {
    let mut summary = QuerySummary {
        strongest: None,
        counts: [0; 7],
    };
    for statement in split_statements(sql) {
        let class = classify(statement);
        summary.counts[class.index()] += 1;
        summary.strongest = Some(summary.strongest.map_or(class, |s| s.max(class)));
    }
    summary
}

/// The words by which the code of a `DO` block names DDL: such a block
/// takes the cluster DDL lease before it starts, so that what it reads of
/// the schema (`IF NOT EXISTS (…) THEN CREATE …`) already has the cluster's
/// earlier DDL. DDL that it runs otherwise (a function it calls, a string
/// it builds for `EXECUTE`) asks for the lease when it runs (see
/// `chorus.ask_lease` on the backend).
const DDL_IN_CODE: &[&str] = &[
    "CREATE", "ALTER", "DROP", "COMMENT", "GRANT", "REVOKE", "SECURITY", "IMPORT", "REFRESH",
    "REASSIGN",
];

/// Classify one statement (text without a separating `;`).
///
/// Empty text (only white space and comments) is `Session`: it changes
/// nothing and PostgreSQL answers it with `EmptyQueryResponse`.
pub fn classify(statement: &str) -> StatementClass {
    let Some((keyword, rest)) = first_keyword(statement) else {
        return StatementClass::Session;
    };
    let mut upper = [0u8; 16];
    let Some(keyword) = ascii_upper(keyword, &mut upper) else {
        return parsed::classify_parsed(statement);
    };
    match keyword {
        b"SELECT" | b"VALUES" | b"TABLE" => {
            match lexer::write_hint(rest) {
                lexer::WriteHint::None => StatementClass::Read,
                hint => match parsed::classify_parsed(statement) {
                    // sqlparser does not know every locking clause (FOR NO KEY
                    // UPDATE); the lexical evidence of a write stands.
                    StatementClass::Unknown if hint == lexer::WriteHint::Writes => {
                        StatementClass::Write
                    }
                    class => class,
                },
            }
        }
        b"WITH" => parsed::classify_parsed(statement),
        b"INSERT" | b"UPDATE" | b"DELETE" | b"MERGE" | b"TRUNCATE" | b"LOCK" | b"CALL" => {
            StatementClass::Write
        }
        // A DO block whose code may run DDL (it names a DDL command, runs
        // dynamic SQL or calls a function or procedure, which may) is DDL:
        // it takes the cluster DDL lease, and the backend replicates each
        // statement it runs. Other DO blocks only change rows.
        b"DO" if lexer::mentions_any(rest, DDL_IN_CODE) => StatementClass::Ddl,
        b"DO" => StatementClass::Write,
        b"COPY" => lexer::copy_direction(rest),
        b"CREATE" | b"ALTER" | b"DROP" | b"COMMENT" | b"GRANT" | b"REVOKE" | b"SECURITY"
        | b"IMPORT" | b"REFRESH" | b"REASSIGN" => StatementClass::Ddl,
        b"VACUUM" | b"ANALYZE" | b"ANALYSE" | b"REINDEX" | b"CLUSTER" | b"CHECKPOINT" => {
            StatementClass::Maintenance
        }
        b"BEGIN" | b"START" | b"COMMIT" | b"END" | b"ROLLBACK" | b"ABORT" | b"SAVEPOINT"
        | b"RELEASE" => StatementClass::Transaction,
        b"PREPARE" => match first_keyword(rest) {
            // PREPARE TRANSACTION 'gid' is two-phase commit.
            Some((word, _)) if word.eq_ignore_ascii_case("TRANSACTION") => {
                StatementClass::Transaction
            }
            // PREPARE name [ (types) ] AS statement: the inner statement decides.
            _ => match lexer::after_keyword_as(rest) {
                Some(inner) => classify(inner),
                None => StatementClass::Unknown,
            },
        },
        b"SET" | b"RESET" | b"DISCARD" | b"DEALLOCATE" | b"LISTEN" | b"UNLISTEN" | b"NOTIFY"
        | b"LOAD" => StatementClass::Session,
        b"SHOW" | b"FETCH" | b"MOVE" | b"CLOSE" => StatementClass::Read,
        b"DECLARE" => match lexer::after_keyword_for(rest) {
            Some(inner) => classify(inner).max(StatementClass::Read),
            None => StatementClass::Unknown,
        },
        b"EXPLAIN" => {
            if lexer::contains_word(rest, "ANALYZE") || lexer::contains_word(rest, "ANALYSE") {
                if lexer::explains_create(rest) {
                    return StatementClass::Ddl;
                }
                parsed::classify_parsed(statement)
            } else {
                StatementClass::Read
            }
        }
        _ => StatementClass::Unknown,
    }
}

/// Whether a query string rolls back to a savepoint (`ROLLBACK [WORK |
/// TRANSACTION] TO [SAVEPOINT] name`): that undoes the session settings
/// made since the savepoint as well.
pub fn rolls_back_to_savepoint(sql: &str) -> bool {
    split_statements(sql).any(|statement| {
        let mut rest = statement;
        let mut words = std::iter::from_fn(|| {
            let (word, after) = first_keyword(rest)?;
            rest = after;
            (!word.is_empty()).then_some(word)
        });
        words
            .next()
            .is_some_and(|w| w.eq_ignore_ascii_case("ROLLBACK"))
            && match words.next() {
                Some(w) if w.eq_ignore_ascii_case("TO") => true,
                Some(w)
                    if w.eq_ignore_ascii_case("WORK") || w.eq_ignore_ascii_case("TRANSACTION") =>
                {
                    words.next().is_some_and(|w| w.eq_ignore_ascii_case("TO"))
                }
                _ => false,
            }
    })
}

/// Upper-case a short ASCII keyword into `buf`; `None` when it does not fit.
fn ascii_upper<'a>(word: &str, buf: &'a mut [u8; 16]) -> Option<&'a [u8]> {
    let bytes = word.as_bytes();
    if bytes.len() > buf.len() {
        return None;
    }
    for (dst, src) in buf.iter_mut().zip(bytes) {
        *dst = src.to_ascii_uppercase();
    }
    Some(&buf[..bytes.len()])
}

#[cfg(test)]
mod tests;
