use super::*;
use StatementClass::*;

fn class(sql: &str) -> StatementClass {
    classify(sql)
}

#[test]
fn pgbench_builtin_scripts() {
    // The statements of pgbench's tpcb-like, simple-update and select-only
    // scripts, as sent in simple mode (values substituted) and in extended
    // mode (parameters).
    let cases = [
        ("BEGIN;", Transaction),
        (
            "UPDATE pgbench_accounts SET abalance = abalance + -4211 WHERE aid = 48;",
            Write,
        ),
        ("SELECT abalance FROM pgbench_accounts WHERE aid = 48;", Read),
        ("SELECT abalance FROM pgbench_accounts WHERE aid = $1", Read),
        (
            "UPDATE pgbench_tellers SET tbalance = tbalance + $1 WHERE tid = $2;",
            Write,
        ),
        (
            "UPDATE pgbench_branches SET bbalance = bbalance + $1 WHERE bid = $2;",
            Write,
        ),
        (
            "INSERT INTO pgbench_history (tid, bid, aid, delta, mtime) VALUES ($1, $2, $3, $4, CURRENT_TIMESTAMP);",
            Write,
        ),
        ("END;", Transaction),
    ];
    for (sql, expected) in cases {
        assert_eq!(class(sql), expected, "{sql}");
    }
}

#[test]
fn pgbench_initialization() {
    let cases = [
        (
            "drop table if exists pgbench_accounts, pgbench_branches, pgbench_history, pgbench_tellers",
            Ddl,
        ),
        (
            "create table pgbench_history(tid int,bid int,aid    int,delta int,mtime timestamp,filler char(22))",
            Ddl,
        ),
        (
            "truncate table pgbench_accounts, pgbench_branches, pgbench_history, pgbench_tellers",
            Write,
        ),
        ("copy pgbench_accounts from stdin with (freeze on)", Write),
        ("alter table pgbench_branches add primary key (bid)", Ddl),
        ("vacuum analyze pgbench_branches", Maintenance),
        (
            "insert into pgbench_branches(bid,bbalance) values(1,0)",
            Write,
        ),
        (
            "select o.n, p.partstrat, pg_catalog.count(i.inhparent) from pg_catalog.pg_class as c join pg_catalog.pg_namespace as n on (n.oid = c.relnamespace) cross join lateral (select pg_catalog.array_position(pg_catalog.current_schemas(true), n.nspname)) as o(n) left join pg_catalog.pg_partitioned_table as p on (p.partrelid = c.oid) left join pg_catalog.pg_inherits as i on (c.oid = i.inhparent) where c.relname = 'pgbench_accounts' and o.n is not null group by 1, 2 order by 1 asc limit 1",
            Read,
        ),
    ];
    for (sql, expected) in cases {
        assert_eq!(class(sql), expected, "{sql}");
    }
}

#[test]
fn psql_catalog_queries_are_reads() {
    // Captured with `psql -E` (PostgreSQL 15) for \l, \dt, \d tbl, \df, \du,
    // \dn, \di and \dv.
    let corpus = include_str!("../tests/corpus/psql_catalog.sql");
    let summary = classify_query(corpus);
    assert!(summary.statements() >= 15, "{summary:?}");
    assert_eq!(summary.statements(), summary.counts[Read.index()]);
    assert_eq!(summary.strongest, Some(Read));
}

#[test]
fn common_ddl() {
    let cases = [
        "CREATE TABLE users (id bigint PRIMARY KEY, name text NOT NULL)",
        "create index concurrently on users using gin (name gin_trgm_ops)",
        "ALTER TABLE bikes ADD COLUMN status TEXT",
        "DROP TABLE IF EXISTS bikes CASCADE",
        "CREATE SEQUENCE s START 10",
        "CREATE VIEW v AS SELECT 1",
        "CREATE OR REPLACE FUNCTION f() RETURNS int LANGUAGE sql AS $$ SELECT 1; $$",
        "CREATE TYPE mood AS ENUM ('sad', 'ok')",
        "CREATE SCHEMA app",
        "COMMENT ON TABLE users IS 'people; and their names'",
        "GRANT SELECT ON users TO reporting",
        "REVOKE ALL ON users FROM PUBLIC",
        "CREATE EXTENSION IF NOT EXISTS pg_trgm",
        "REFRESH MATERIALIZED VIEW mv",
        "SELECT * INTO new_users FROM users",
    ];
    for sql in cases {
        assert_eq!(class(sql), Ddl, "{sql}");
    }
}

#[test]
fn explain_analyze_of_a_table_making_statement_is_ddl() {
    for sql in [
        "EXPLAIN ANALYZE CREATE TABLE t AS SELECT 1",
        "explain (analyze, costs off) select 1 as x into t",
        "EXPLAIN ANALYZE CREATE MATERIALIZED VIEW mv AS SELECT 1",
    ] {
        assert_eq!(class(sql), Ddl, "{sql}");
    }
    assert_eq!(class("EXPLAIN CREATE TABLE t AS SELECT 1"), Read);
}

#[test]
fn do_blocks_that_may_run_ddl_are_ddl() {
    let ddl = [
        "DO $$ BEGIN CREATE TYPE mood AS ENUM ('sad', 'ok'); EXCEPTION WHEN duplicate_object THEN null; END $$",
        "do $x$begin execute 'create table t (id int)'; end$x$",
        "DO $$ BEGIN IF NOT EXISTS (SELECT 1 FROM pg_class WHERE relname = 'i') THEN create index i ON t (v); END IF; END $$",
    ];
    for sql in ddl {
        assert_eq!(class(sql), Ddl, "{sql}");
        assert_eq!(ddl_route(sql), DdlRoute::Stream, "{sql}");
    }
    let rows_only = [
        "DO $$ BEGIN UPDATE t SET v = v + 1; INSERT INTO log VALUES (now()); END $$",
        "DO $$ DECLARE n int; BEGIN SELECT count(*) INTO n FROM t; RAISE NOTICE '%', n; END $$",
        // (A word that only contains one is not one.)
        "DO $$ BEGIN INSERT INTO created_rows (dropped) VALUES (true); END $$",
        // DDL that a called function or a built string runs asks for the
        // lease when it runs.
        "DO LANGUAGE plpgsql 'BEGIN PERFORM make_tables(); END'",
        "DO $$BEGIN CALL migrate();END$$",
        "DO $$ BEGIN EXECUTE format('%s', cmd); END $$",
    ];
    for sql in rows_only {
        assert_eq!(class(sql), Write, "{sql}");
    }
}

#[test]
fn statements_that_look_like_reads_but_write() {
    let cases = [
        "WITH moved AS (DELETE FROM a WHERE x < 10 RETURNING *) INSERT INTO b SELECT * FROM moved",
        "WITH u AS (UPDATE t SET v = 1 RETURNING id) SELECT count(*) FROM u",
        "SELECT nextval('users_id_seq')",
        "select pg_catalog.setval('s', 42, true)",
        "SELECT * FROM jobs WHERE state = 'new' LIMIT 1 FOR UPDATE SKIP LOCKED",
        "SELECT * FROM jobs FOR NO KEY UPDATE",
        "EXPLAIN ANALYZE UPDATE t SET v = 2",
        "EXPLAIN (ANALYZE, BUFFERS) DELETE FROM t",
        "DO $$ BEGIN INSERT INTO t VALUES (1); END $$",
        "CALL refresh_totals()",
        "SELECT lo_create(0)",
        "COPY t FROM STDIN",
        "MERGE INTO t USING s ON t.id = s.id WHEN MATCHED THEN UPDATE SET v = s.v",
        "LOCK TABLE t IN EXCLUSIVE MODE",
    ];
    for sql in cases {
        assert_eq!(class(sql), Write, "{sql}");
    }
}

#[test]
fn reads() {
    let cases = [
        "SELECT 1",
        "select * from t where note = 'for update'",
        "SELECT 'nextval(''s'')' AS text_not_a_call",
        "SELECT $$ INSERT INTO t VALUES (1) $$",
        "(SELECT 1) UNION (SELECT 2)",
        "VALUES (1), (2)",
        "TABLE users",
        "WITH x AS (SELECT 1) SELECT * FROM x",
        "EXPLAIN SELECT * FROM t",
        "EXPLAIN UPDATE t SET v = 1",
        "EXPLAIN ANALYZE SELECT 1",
        "EXPLAIN (ANALYZE false) DELETE FROM t",
        "SHOW server_version",
        "COPY t TO STDOUT",
        "COPY (SELECT * FROM t WHERE a IN (SELECT b FROM u)) TO STDOUT WITH (FORMAT csv)",
        "FETCH 10 FROM c",
        "DECLARE c CURSOR WITH HOLD FOR SELECT * FROM t",
        "SELECT information, format('%s', x) FROM fortune",
        "/* leading comment */ -- and another\n SELECT 1",
    ];
    for sql in cases {
        assert_eq!(class(sql), Read, "{sql}");
    }
}

#[test]
fn maintenance_transaction_and_session() {
    let cases = [
        ("VACUUM FULL users", Maintenance),
        ("ANALYZE users", Maintenance),
        ("REINDEX TABLE users", Maintenance),
        ("CLUSTER users USING users_pkey", Maintenance),
        ("CHECKPOINT", Maintenance),
        ("BEGIN ISOLATION LEVEL SERIALIZABLE", Transaction),
        ("START TRANSACTION", Transaction),
        ("COMMIT", Transaction),
        ("ROLLBACK TO SAVEPOINT a", Transaction),
        ("SAVEPOINT a", Transaction),
        ("RELEASE a", Transaction),
        ("PREPARE TRANSACTION 'gid'", Transaction),
        ("COMMIT PREPARED 'gid'", Transaction),
        ("SET search_path = app, public", Session),
        ("SET LOCAL statement_timeout = 0", Session),
        ("RESET ALL", Session),
        ("DISCARD ALL", Session),
        ("LISTEN events", Session),
        ("NOTIFY events, 'hello'", Session),
        ("DEALLOCATE ALL", Session),
        ("", Session),
        ("  -- only a comment\n", Session),
    ];
    for (sql, expected) in cases {
        assert_eq!(class(sql), expected, "{sql:?}");
    }
}

#[test]
fn prepare_classifies_its_inner_statement() {
    assert_eq!(
        class("PREPARE q(int) AS SELECT * FROM t WHERE id = $1"),
        Read
    );
    assert_eq!(class("PREPARE w AS INSERT INTO t VALUES ($1)"), Write);
    assert_eq!(class("EXECUTE w(1)"), Unknown);
}

#[test]
fn unparseable_is_unknown_not_rejected() {
    assert_eq!(class("SELECT FROM WHERE INTO ((("), Unknown);
    assert_eq!(class("FROBNICATE the database"), Unknown);
    assert_eq!(class("WITH broken AS ("), Unknown);
    assert_eq!(class("42"), Unknown);
}

#[test]
fn splitting_respects_quotes_comments_and_dollar_quotes() {
    let sql = "SELECT ';' AS a; INSERT INTO t VALUES ($x$;$x$); \
               /* ; */ -- ;\n UPDATE \"semi;colon\" SET v = E'\\';' ; ;  ";
    let parts: Vec<&str> = split_statements(sql).collect();
    assert_eq!(parts.len(), 3, "{parts:?}");
    assert_eq!(parts[0], "SELECT ';' AS a");
    assert!(parts[1].trim_start().starts_with("INSERT"));
    assert!(parts[2].contains("UPDATE \"semi;colon\""));
    let summary = classify_query(sql);
    assert_eq!(summary.counts[Read.index()], 1);
    assert_eq!(summary.counts[Write.index()], 2);
    assert_eq!(summary.strongest, Some(Write));
}

#[test]
fn multi_statement_strongest_wins() {
    let summary = classify_query("BEGIN; SELECT 1; CREATE TABLE t (id int); COMMIT");
    assert_eq!(summary.strongest, Some(Ddl));
    assert_eq!(summary.statements(), 4);
    assert_eq!(summary.counts[Transaction.index()], 2);
    assert_eq!(classify_query("").strongest, None);
    assert_eq!(classify_query(" ; ; ").statements(), 0);
}

#[test]
fn dollar_parameters_are_not_dollar_quotes() {
    let parts: Vec<&str> = split_statements("SELECT $1; SELECT $2").collect();
    assert_eq!(parts, vec!["SELECT $1", " SELECT $2"]);
}

#[test]
fn unterminated_literals_do_not_panic() {
    for sql in [
        "SELECT 'abc",
        "SELECT $tag$ never closed",
        "SELECT /* open",
        "SELECT E'\\",
        "SELECT \"x",
        "(((",
        "$",
        "$$",
        "E'",
    ] {
        let _ = classify_query(sql);
    }
}

#[test]
fn non_ascii_text_is_handled() {
    assert_eq!(class("SELECT 'grüße', naïve FROM café"), Read);
    assert_eq!(class("INSERT INTO straße VALUES ('ö')"), Write);
    let parts: Vec<&str> = split_statements("SELECT 'é;'; SELECT ü").collect();
    assert_eq!(parts.len(), 2);
}

#[test]
fn pseudo_random_input_never_panics() {
    // A tiny xorshift generator keeps this deterministic without a dependency.
    let alphabet: &[u8] = b"SELECT INTO FROM ( ) ; ' \" $ $a$ -- /* */ E\\ \n nextval for update";
    let mut state: u64 = 0x9E37_79B9_7F4A_7C15;
    for _ in 0..2000 {
        let mut text = Vec::new();
        for _ in 0..(state % 64) {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            text.push(alphabet[(state % alphabet.len() as u64) as usize]);
        }
        let sql = String::from_utf8_lossy(&text);
        let summary = classify_query(&sql);
        assert!(summary.statements() <= 64);
    }
}

#[test]
fn a_routine_body_in_begin_atomic_is_one_statement() {
    let sql = "CREATE FUNCTION f(x int) RETURNS int LANGUAGE sql BEGIN ATOMIC \
                 SELECT CASE WHEN x > 0 THEN 1 ELSE 0 END; SELECT x + 1; \
               END; \
               create or replace procedure p() begin atomic insert into t values (1); end; \
               CREATE FUNCTION g() RETURNS int LANGUAGE sql AS 'SELECT 1'; BEGIN; SELECT 2; END";
    let parts: Vec<&str> = split_statements(sql).collect();
    assert_eq!(parts.len(), 6, "{parts:?}");
    assert!(parts[0].trim_end().ends_with("END"), "{parts:?}");
    assert!(
        parts[1].contains("insert into t values (1); end"),
        "{parts:?}"
    );
    assert_eq!(parts[3].trim(), "BEGIN");
    assert_eq!(parts[4].trim(), "SELECT 2");
    // BEGIN inside parentheses (a column named begin) opens nothing.
    let parts: Vec<&str> = split_statements(
        "CREATE FUNCTION h() RETURNS TABLE (begin int) LANGUAGE sql AS 'SELECT 1'; SELECT 3",
    )
    .collect();
    assert_eq!(parts.len(), 2, "{parts:?}");
}

#[test]
fn rollbacks_to_a_savepoint_are_recognized() {
    for sql in [
        "ROLLBACK TO SAVEPOINT s",
        "rollback to s",
        "ROLLBACK WORK TO SAVEPOINT \"S\"",
        "SELECT 1; ROLLBACK TRANSACTION TO s",
    ] {
        assert!(rolls_back_to_savepoint(sql), "{sql}");
    }
    for sql in [
        "ROLLBACK",
        "ROLLBACK PREPARED 'to'",
        "RELEASE SAVEPOINT s",
        "SELECT 'ROLLBACK TO s'",
    ] {
        assert!(!rolls_back_to_savepoint(sql), "{sql}");
    }
}
