//! What transaction pooling needs to know of a statement: whether it may
//! leave something in its session that outlives its transaction.

use crate::ddl::identifier;
use crate::lexer::{first_keyword, mentions_any, split_statements};

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

/// The statement of `query` that prepared the SQL-level statement `name`
/// (`PREPARE name … AS …`), as the server names it (an unquoted name
/// folded to lower case). PostgreSQL keeps the whole query string a
/// statement was prepared from (`pg_prepared_statements.statement`);
/// transaction pooling and DRAIN make the statement again elsewhere from
/// this part of it. `None` when no statement of `query` prepares `name`
/// in a form read here (a Unicode-escaped name, say).
pub fn preparing_statement<'a>(query: &'a str, name: &str) -> Option<&'a str> {
    split_statements(query).find(|statement| {
        let Some((word, rest)) = first_keyword(statement) else {
            return false;
        };
        word.eq_ignore_ascii_case("PREPARE") && prepared_name(rest).as_deref() == Some(name)
    })
}

/// The name a `PREPARE` statement gives (`rest` follows the keyword, with
/// white space and comments before the name), as the server keeps it.
fn prepared_name(rest: &str) -> Option<String> {
    let mut after = rest;
    loop {
        after = after.trim_start();
        if let Some(comment) = after.strip_prefix("--") {
            after = comment.split_once('\n').map_or("", |(_, next)| next);
        } else if let Some(comment) = after.strip_prefix("/*") {
            after = comment.split_once("*/").map_or("", |(_, next)| next);
        } else {
            return identifier(after);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::may_keep_session_state as keeps;
    use super::preparing_statement;

    #[test]
    fn the_statement_that_prepared_a_name_is_found_in_its_query() {
        let query = "SELECT 1; PREPARE A(int) AS SELECT $1 + 1;\
                     PREPARE /* c */ \"Odd \"\"name\"\"\" AS SELECT 'x;y' -- end\n; SELECT 2";
        assert_eq!(
            preparing_statement(query, "a"),
            Some(" PREPARE A(int) AS SELECT $1 + 1")
        );
        assert_eq!(
            preparing_statement(query, "Odd \"name\""),
            Some("PREPARE /* c */ \"Odd \"\"name\"\"\" AS SELECT 'x;y' -- end\n")
        );
        // A name is folded unless quoted; others are not found.
        assert_eq!(preparing_statement(query, "A"), None);
        assert_eq!(preparing_statement(query, "b"), None);
        assert_eq!(preparing_statement("PREPARE TRANSACTION 'x'", "x"), None);
        assert_eq!(preparing_statement("EXECUTE a", "a"), None);
    }

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
