//! Which way a DDL statement replicates. Most DDL fires PostgreSQL's event
//! triggers and travels inside its own transaction's change stream; the
//! rest (cluster-wide objects, statements that cannot run in a transaction
//! block) goes through the cluster's DDL log on its own.

use crate::lexer::first_keyword;

/// How a DDL statement is replicated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DdlRoute {
    /// In its transaction's change stream, at its place among the
    /// transaction's changes (the backend's event trigger emits it).
    Stream,
    /// Through the DDL log, outside any transaction block: roles,
    /// databases, tablespaces, event triggers, `… CONCURRENTLY`,
    /// `ALTER SYSTEM`, role membership and privileges on cluster-wide
    /// objects. PostgreSQL fires no event trigger for these, or runs them
    /// only outside a transaction block.
    Log,
}

/// The first `N` words of a statement, upper-cased (fewer when it has
/// fewer).
fn words<const N: usize>(statement: &str) -> Vec<String> {
    let mut out = Vec::with_capacity(N);
    let mut rest = statement;
    while out.len() < N {
        match first_keyword(rest) {
            Some((word, after)) if !word.is_empty() => {
                out.push(word.to_ascii_uppercase());
                rest = after;
            }
            _ => break,
        }
    }
    out
}

/// Objects PostgreSQL keeps cluster-wide (no event trigger fires for them).
fn global_object(word: &str) -> bool {
    matches!(word, "ROLE" | "USER" | "GROUP" | "DATABASE" | "TABLESPACE")
}

/// Whether an `ALTER SEQUENCE` changes only what is around the sequence's
/// values (name, owner, schema, logging, OWNED BY), not how it hands them
/// out. Errs on the side of no: any word of a value option makes it one.
fn sequence_metadata_only(statement: &str) -> bool {
    let mut rest = statement;
    let mut metadata = false;
    while let Some((found, after)) = first_keyword(rest) {
        if found.is_empty() {
            rest = after.get(1..).unwrap_or("");
            continue;
        }
        match found.to_ascii_uppercase().as_str() {
            "RESTART" | "START" | "INCREMENT" | "MINVALUE" | "MAXVALUE" | "CYCLE" | "CACHE"
            | "AS" => return false,
            "OWNED" | "OWNER" | "RENAME" | "SCHEMA" | "LOGGED" | "UNLOGGED" => metadata = true,
            _ => {}
        }
        rest = after;
    }
    metadata
}

/// Whether an `ALTER TABLE` detaches a partition `CONCURRENTLY`, which
/// PostgreSQL runs as two transactions of its own, outside any block.
fn detaches_concurrently(statement: &str) -> bool {
    let mut rest = statement.trim_end().trim_end_matches(';');
    let mut detach = false;
    let mut last = "";
    while let Some((found, after)) = first_keyword(rest) {
        if found.is_empty() {
            // Not a word (a quoted name, punctuation): a quoted
            // "concurrently" is a name, not the option.
            last = "";
            rest = after.get(1..).unwrap_or("");
            continue;
        }
        detach |= found.eq_ignore_ascii_case("DETACH");
        last = found;
        rest = after;
    }
    detach && last.eq_ignore_ascii_case("CONCURRENTLY")
}

/// The route of one DDL statement (see [`DdlRoute`]).
pub fn ddl_route(statement: &str) -> DdlRoute {
    let w = words::<5>(statement);
    let word = |i: usize| w.get(i).map_or("", String::as_str);
    let log = match word(0) {
        "CREATE" | "ALTER" | "DROP" => {
            // CREATE [UNIQUE] INDEX CONCURRENTLY, DROP INDEX CONCURRENTLY
            let index_concurrently = (word(1) == "INDEX" && word(2) == "CONCURRENTLY")
                || (word(1) == "UNIQUE" && word(2) == "INDEX" && word(3) == "CONCURRENTLY");
            // CREATE USER MAPPING is an ordinary (per-database) object.
            let global = global_object(word(1)) && !(word(1) == "USER" && word(2) == "MAPPING");
            global
                || index_concurrently
                || (word(0) == "ALTER" && word(1) == "TABLE" && detaches_concurrently(statement))
                || (word(1) == "EVENT" && word(2) == "TRIGGER")
                || (word(0) == "ALTER" && word(1) == "SYSTEM")
                || word(1) == "SUBSCRIPTION"
                // Refused on that path: global sequences are set up per
                // backend, and one ALTER of their values on every backend
                // would undo that. (Renaming one, its owner, schema,
                // logging or OWNED BY are ordinary DDL.)
                || (word(0) == "ALTER" && word(1) == "SEQUENCE" && !sequence_metadata_only(statement))
        }
        "GRANT" | "REVOKE" => {
            // Role membership (no ON), or privileges on a cluster-wide
            // object.
            let mut rest = statement;
            let mut on_global = None;
            while let Some((found, after)) = first_keyword(rest) {
                if found.is_empty() {
                    rest = after.get(1..).unwrap_or("");
                    continue;
                }
                if found.eq_ignore_ascii_case("ON") {
                    on_global = Some(
                        words::<1>(after)
                            .first()
                            .is_some_and(|o| global_object(o) || o == "PARAMETER"),
                    );
                    break;
                }
                rest = after;
            }
            on_global.unwrap_or(true)
        }
        "COMMENT" | "SECURITY" => {
            // COMMENT ON DATABASE x, SECURITY LABEL [FOR p] ON ROLE x
            let mut rest = statement;
            let mut global = false;
            while let Some((found, after)) = first_keyword(rest) {
                if found.eq_ignore_ascii_case("ON") {
                    global = words::<1>(after).first().is_some_and(|o| global_object(o));
                    break;
                }
                if found.is_empty() {
                    break;
                }
                rest = after;
            }
            global
        }
        "REASSIGN" => true,
        _ => false,
    };
    if log {
        DdlRoute::Log
    } else {
        DdlRoute::Stream
    }
}

/// Whether a statement of the DDL log acts on cluster-wide objects (roles,
/// databases, tablespaces, `ALTER SYSTEM`, privileges on those): applied
/// once per backend, in the main replicated database. The others of the
/// log (`… CONCURRENTLY`, event triggers, subscriptions, `REASSIGN
/// OWNED`) act on the database they were sent in.
pub fn cluster_wide(statement: &str) -> bool {
    if ddl_route(statement) != DdlRoute::Log {
        return false;
    }
    let w = words::<4>(statement);
    let word = |i: usize| w.get(i).map_or("", String::as_str);
    let per_database = match word(0) {
        "CREATE" | "ALTER" | "DROP" => {
            (word(1) == "INDEX" && word(2) == "CONCURRENTLY")
                || (word(1) == "UNIQUE" && word(2) == "INDEX")
                || (word(1) == "EVENT" && word(2) == "TRIGGER")
                || word(1) == "SUBSCRIPTION"
                || word(1) == "TABLE"
                || word(1) == "SEQUENCE"
        }
        "REASSIGN" => true,
        _ => false,
    };
    !per_database
}

/// What a `CREATE [UNIQUE] INDEX CONCURRENTLY` builds on (its table) or a
/// `DROP INDEX CONCURRENTLY` drops (its index), as written (a possibly
/// qualified, possibly quoted name, fit for `to_regclass`): the session
/// asks its backend whether that is a temporary relation, whose index
/// statements stay on its backend (see docs/compatibility.md).
pub fn concurrent_index_target(statement: &str) -> Option<&str> {
    let w = words::<4>(statement);
    let word = |i: usize| w.get(i).map_or("", String::as_str);
    let rest = if word(0) == "CREATE"
        && ((word(1) == "INDEX" && word(2) == "CONCURRENTLY")
            || (word(1) == "UNIQUE" && word(2) == "INDEX" && word(3) == "CONCURRENTLY"))
    {
        // The table follows the first ON (an index may be named "on" only
        // quoted), and maybe ONLY.
        let mut rest = crate::lexer::after_top_level_word(statement, "ON")?;
        if let Some((only, after)) = first_keyword(rest) {
            if only.eq_ignore_ascii_case("ONLY") {
                rest = after;
            }
        }
        rest
    } else if word(0) == "DROP" && word(1) == "INDEX" && word(2) == "CONCURRENTLY" {
        let mut rest = first_keyword(first_keyword(first_keyword(statement)?.1)?.1)?.1;
        if word(3) == "IF" {
            rest = first_keyword(first_keyword(rest)?.1)?.1;
        }
        rest
    } else {
        return None;
    };
    let rest = rest.trim_start();
    let mut end = 0;
    loop {
        let part = &rest[end..];
        let length = if let Some(quoted) = part.strip_prefix('"') {
            let tail = skip_identifier(part);
            if tail.len() == part.len() || quoted.is_empty() {
                return None;
            }
            part.len() - tail.len()
        } else {
            part.len() - skip_identifier(part).len()
        };
        if length == 0 {
            return None;
        }
        end += length;
        if rest[end..].starts_with('.') {
            end += 1;
        } else {
            break;
        }
    }
    Some(&rest[..end])
}

/// The database a `CREATE DATABASE` statement makes (its name as
/// PostgreSQL folds it), if `statement` is one.
pub fn created_database(statement: &str) -> Option<String> {
    let w = words::<2>(statement);
    if w.len() < 2 || w[0] != "CREATE" || w[1] != "DATABASE" {
        return None;
    }
    // The text after the two keywords.
    let (_, rest) = first_keyword(statement)?;
    let (_, rest) = first_keyword(rest)?;
    identifier(rest.trim_start())
}

/// The database a `DROP DATABASE [IF EXISTS]` statement drops (its name
/// as PostgreSQL folds it), if `statement` is one.
pub fn dropped_database(statement: &str) -> Option<String> {
    let w = words::<4>(statement);
    if w.len() < 2 || w[0] != "DROP" || w[1] != "DATABASE" {
        return None;
    }
    let (_, rest) = first_keyword(statement)?;
    let (_, mut rest) = first_keyword(rest)?;
    if w.get(2).is_some_and(|x| x == "IF") && w.get(3).is_some_and(|x| x == "EXISTS") {
        rest = first_keyword(first_keyword(rest)?.1)?.1;
    }
    identifier(rest.trim_start())
}

/// The database an `ALTER DATABASE … RENAME TO …` renames, if
/// `statement` is one.
pub fn renamed_database(statement: &str) -> Option<(String, String)> {
    let w = words::<2>(statement);
    if w.len() < 2 || w[0] != "ALTER" || w[1] != "DATABASE" {
        return None;
    }
    // (The name may be quoted: the word after it is read past it.)
    let (_, rest) = first_keyword(statement)?;
    let (_, rest) = first_keyword(rest)?;
    let name = identifier(rest.trim_start())?;
    let after = skip_identifier(rest.trim_start());
    let (rename, after) = first_keyword(after)?;
    let (to, after) = first_keyword(after)?;
    if !rename.eq_ignore_ascii_case("RENAME") || !to.eq_ignore_ascii_case("TO") {
        return None;
    }
    Some((name, identifier(after.trim_start())?))
}

/// `text` after the identifier at its start.
fn skip_identifier(text: &str) -> &str {
    if let Some(quoted) = text.strip_prefix('"') {
        let bytes = quoted.as_bytes();
        let mut i = 0;
        while i < bytes.len() {
            if bytes[i] == b'"' {
                if bytes.get(i + 1) == Some(&b'"') {
                    i += 2;
                    continue;
                }
                return &quoted[i + 1..];
            }
            i += 1;
        }
        return "";
    }
    let end = text
        .char_indices()
        .find(|(_, c)| !(c.is_alphanumeric() || *c == '_' || *c == '$'))
        .map_or(text.len(), |(i, _)| i);
    &text[end..]
}

/// The identifier at the start of `text`: a quoted one as written, an
/// unquoted one in lower case (ASCII, as PostgreSQL folds it).
pub(crate) fn identifier(text: &str) -> Option<String> {
    if let Some(quoted) = text.strip_prefix('"') {
        let mut name = String::new();
        let mut chars = quoted.chars().peekable();
        while let Some(c) = chars.next() {
            if c == '"' {
                if chars.peek() == Some(&'"') {
                    chars.next();
                    name.push('"');
                } else {
                    return (!name.is_empty()).then_some(name);
                }
            } else {
                name.push(c);
            }
        }
        return None;
    }
    let name: String = text
        .chars()
        .take_while(|c| c.is_alphanumeric() || *c == '_' || *c == '$')
        .map(|c| c.to_ascii_lowercase())
        .collect();
    (!name.is_empty()).then_some(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_database_a_create_database_makes() {
        assert_eq!(
            created_database("CREATE DATABASE shop").as_deref(),
            Some("shop")
        );
        assert_eq!(
            created_database("create database Shop_2 TEMPLATE template0;").as_deref(),
            Some("shop_2")
        );
        assert_eq!(
            created_database("CREATE DATABASE \"My \"\"DB\"\" x\" OWNER app").as_deref(),
            Some("My \"DB\" x")
        );
        assert_eq!(created_database("CREATE TABLE database (id int)"), None);
        assert_eq!(created_database("DROP DATABASE shop"), None);
        assert_eq!(created_database("CREATE DATABASE"), None);
    }

    #[test]
    fn the_relation_of_a_concurrent_index_statement() {
        for (sql, target) in [
            ("CREATE INDEX CONCURRENTLY i ON t (a)", Some("t")),
            (
                "create unique index concurrently on ONLY s.\"T x\" using btree (a)",
                Some("s.\"T x\""),
            ),
            (
                "CREATE INDEX CONCURRENTLY IF NOT EXISTS i ON public.t(a)",
                Some("public.t"),
            ),
            ("DROP INDEX CONCURRENTLY i", Some("i")),
            ("DROP INDEX CONCURRENTLY IF EXISTS s.i CASCADE", Some("s.i")),
            ("CREATE INDEX i ON t (a)", None),
            ("DROP INDEX i", None),
            ("DROP TABLE t", None),
        ] {
            assert_eq!(concurrent_index_target(sql), target, "{sql}");
        }
    }

    #[test]
    fn the_database_a_drop_or_rename_names() {
        assert_eq!(
            dropped_database("DROP DATABASE shop").as_deref(),
            Some("shop")
        );
        assert_eq!(
            dropped_database("drop database if exists Shop WITH (FORCE);").as_deref(),
            Some("shop")
        );
        assert_eq!(
            dropped_database("DROP DATABASE \"If\"").as_deref(),
            Some("If")
        );
        assert_eq!(dropped_database("DROP DATABASE if").as_deref(), Some("if"));
        assert_eq!(dropped_database("DROP TABLE shop"), None);
        assert_eq!(dropped_database("CREATE DATABASE shop"), None);
        let pair = |a: &str, b: &str| Some((a.to_owned(), b.to_owned()));
        assert_eq!(
            renamed_database("ALTER DATABASE Shop RENAME TO Store;"),
            pair("shop", "store")
        );
        assert_eq!(renamed_database("ALTER DATABASE shop OWNER TO app"), None);
        assert_eq!(
            renamed_database("ALTER DATABASE shop SET work_mem = 1"),
            None
        );
        assert_eq!(
            renamed_database("ALTER DATABASE \"a \"\"b\"\"\" RENAME TO \"C d\""),
            pair("a \"b\"", "C d")
        );
        assert_eq!(
            renamed_database("ALTER DATABASE \"rename\" OWNER TO x"),
            None
        );
    }

    #[test]
    fn log_statements_on_cluster_wide_objects_are_told_from_the_others() {
        for sql in [
            "CREATE ROLE app LOGIN",
            "ALTER USER app PASSWORD 'x'",
            "DROP DATABASE d",
            "CREATE TABLESPACE t LOCATION '/x'",
            "ALTER SYSTEM SET work_mem = '8MB'",
            "GRANT admin TO app",
            "GRANT CONNECT ON DATABASE d TO app",
            "COMMENT ON ROLE app IS 'x'",
        ] {
            assert!(cluster_wide(sql), "{sql}");
        }
        for sql in [
            "CREATE INDEX CONCURRENTLY i ON t (a)",
            "CREATE UNIQUE INDEX CONCURRENTLY i ON t (a)",
            "DROP INDEX CONCURRENTLY i",
            "ALTER TABLE p DETACH PARTITION c CONCURRENTLY",
            "CREATE EVENT TRIGGER e ON ddl_command_end EXECUTE FUNCTION f()",
            "DROP SUBSCRIPTION s",
            "REASSIGN OWNED BY a TO b",
            // Not the log's at all.
            "CREATE TABLE t (id int)",
        ] {
            assert!(!cluster_wide(sql), "{sql}");
        }
    }

    #[test]
    fn ordinary_ddl_travels_in_its_transaction() {
        for sql in [
            "CREATE TABLE t (id int primary key)",
            "alter table t add column c text",
            "DROP TABLE t",
            "CREATE INDEX i ON t (a)",
            "CREATE UNIQUE INDEX i ON t (a)",
            "GRANT SELECT ON t TO app",
            "REVOKE ALL ON ALL TABLES IN SCHEMA public FROM app",
            "GRANT USAGE ON SCHEMA s TO app",
            "COMMENT ON TABLE t IS 'x'",
            "CREATE USER MAPPING FOR app SERVER s",
            "CREATE SCHEMA s",
            "ALTER TABLE p DETACH PARTITION c",
            "ALTER TABLE p DETACH PARTITION c FINALIZE",
            "ALTER TABLE p DETACH PARTITION \"concurrently\"",
            "ALTER TYPE mood ADD VALUE 'meh'",
            "/* c */ CREATE VIEW v AS SELECT 1",
            "ALTER SEQUENCE s OWNED BY t.id",
            "ALTER SEQUENCE IF EXISTS app.s RENAME TO s2",
            "alter sequence s set unlogged",
            "ALTER SEQUENCE s OWNER TO app",
        ] {
            assert_eq!(ddl_route(sql), DdlRoute::Stream, "{sql}");
        }
    }

    #[test]
    fn cluster_wide_and_non_transactional_ddl_goes_through_the_log() {
        for sql in [
            "CREATE ROLE app LOGIN",
            "create user app",
            "ALTER ROLE app SET work_mem = '8MB'",
            "DROP ROLE app",
            "CREATE DATABASE d",
            "DROP DATABASE d",
            "CREATE TABLESPACE ts LOCATION '/x'",
            "CREATE INDEX CONCURRENTLY i ON t (a)",
            "ALTER TABLE p DETACH PARTITION c CONCURRENTLY",
            "alter table if exists only p detach partition s.c concurrently;",
            "CREATE UNIQUE INDEX CONCURRENTLY i ON t (a)",
            "DROP INDEX CONCURRENTLY i",
            "CREATE EVENT TRIGGER e ON ddl_command_start EXECUTE FUNCTION f()",
            "ALTER SYSTEM SET work_mem = '8MB'",
            "GRANT admin TO app",
            "REVOKE admin FROM app",
            "GRANT CONNECT ON DATABASE d TO app",
            "COMMENT ON ROLE app IS 'x'",
            "REASSIGN OWNED BY a TO b",
            "ALTER SEQUENCE s RESTART",
            "ALTER SEQUENCE s INCREMENT 5 OWNED BY t.id",
        ] {
            assert_eq!(ddl_route(sql), DdlRoute::Log, "{sql}");
        }
    }
}
