//! What transaction pooling needs to know of a statement: whether it may
//! leave something in its session that outlives its transaction.

use crate::lexer::{first_keyword, mentions_any};

/// Function names and words that make session state from inside an
/// ordinary statement: advisory locks held past the transaction, settings
/// made with `set_config(…, false)`, temporary tables (`SELECT … INTO
/// TEMP`, `CREATE TEMP TABLE`).
const STATEFUL_WORDS: &[&str] = &[
    "PG_ADVISORY_LOCK",
    "PG_ADVISORY_LOCK_SHARED",
    "PG_TRY_ADVISORY_LOCK",
    "PG_TRY_ADVISORY_LOCK_SHARED",
    "SET_CONFIG",
    "TEMP",
    "TEMPORARY",
];

/// Whether a statement may leave state in its session beyond its
/// transaction: settings (`SET`, `RESET`, `set_config`), prepared
/// statements (`PREPARE`, `DEALLOCATE`), cursors (`DECLARE … WITH HOLD`),
/// temporary objects, `LISTEN`, advisory locks, a changed role, `DISCARD`,
/// `LOAD`. Transaction pooling then asks the server what the session holds
/// before it hands the connection to another client; a false yes costs
/// that one question, so this errs on the side of yes. (A function may
/// make such state unseen: see docs/compatibility.md.)
pub fn may_keep_session_state(statement: &str) -> bool {
    let Some((word, rest)) = first_keyword(statement) else {
        return false;
    };
    let keyword = |w: &str| word.eq_ignore_ascii_case(w);
    if keyword("SET") {
        // SET LOCAL and SET TRANSACTION end with their transaction.
        return !matches!(first_keyword(rest), Some((next, _))
            if next.eq_ignore_ascii_case("LOCAL")
                || next.eq_ignore_ascii_case("TRANSACTION")
                || next.eq_ignore_ascii_case("CONSTRAINTS"));
    }
    [
        "RESET",
        "DISCARD",
        "LISTEN",
        "UNLISTEN",
        "DECLARE",
        "PREPARE",
        "DEALLOCATE",
        "LOAD",
    ]
    .iter()
    .any(|w| keyword(w))
        || mentions_any(statement, STATEFUL_WORDS)
}

#[cfg(test)]
mod tests {
    use super::may_keep_session_state as keeps;

    #[test]
    fn statements_that_leave_session_state_are_seen() {
        for sql in [
            "SET work_mem = '64MB'",
            "set search_path to app",
            "SET SESSION statement_timeout = 5",
            "SET ROLE reader",
            "RESET ALL",
            "DISCARD ALL",
            "LISTEN jobs",
            "DECLARE c CURSOR WITH HOLD FOR SELECT 1",
            "PREPARE q AS SELECT 1",
            "DEALLOCATE q",
            "CREATE TEMP TABLE t (a int)",
            "create temporary table t (a int)",
            "SELECT 1 INTO TEMP t",
            "SELECT pg_advisory_lock(1)",
            "SELECT pg_catalog.set_config('work_mem', '1MB', false)",
            "/* c */ (SELECT pg_try_advisory_lock(7))",
        ] {
            assert!(keeps(sql), "{sql}");
        }
    }

    #[test]
    fn ordinary_statements_are_not() {
        for sql in [
            "SELECT 1",
            "UPDATE t SET v = 1",
            "INSERT INTO t VALUES (1)",
            "SET LOCAL work_mem = '64MB'",
            "SET TRANSACTION ISOLATION LEVEL SERIALIZABLE",
            "SET CONSTRAINTS ALL DEFERRED",
            "BEGIN",
            "COMMIT",
            "CREATE TABLE t (a int)",
            "SELECT pg_advisory_xact_lock(1)",
            "",
        ] {
            assert!(!keeps(sql), "{sql}");
        }
    }
}
