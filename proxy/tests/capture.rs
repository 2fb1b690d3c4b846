//! Change capture on a real backend: the chorus schema, the capture
//! trigger's change records read back through logical decoding, the row
//! version rule, the backend-clock fallback for direct writes, the apply
//! guard, and adoption rules.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use chorus_proxy::cluster::capture::{self, ChangeRecord, Operation};
use chorus_proxy::localpg::LocalPostgres;
use chorus_router::hlc;
use chorus_testkit as testkit;
use serde_json::Value;
use tokio_postgres::Client;

fn json(raw: &Option<Box<serde_json::value::RawValue>>) -> Value {
    serde_json::from_str(raw.as_ref().expect("present").get()).unwrap()
}

struct Backend {
    _dir: tempfile::TempDir,
    pg: LocalPostgres,
    client: Client,
}

/// A throwaway PostgreSQL in `dir`.
fn local_pg(dir: &tempfile::TempDir) -> LocalPostgres {
    testkit::backends(dir.path(), 1).remove(0)
}

async fn backend(node_id: u16) -> Backend {
    let dir = tempfile::tempdir().unwrap();
    let pg = local_pg(&dir);
    let client = testkit::connect(&pg.conninfo("postgres")).await.unwrap();
    capture::install(&client, node_id).await.unwrap();
    client
        .batch_execute(
            "SELECT pg_create_logical_replication_slot('test_slot', 'test_decoding');
             CREATE TABLE users (id bigint PRIMARY KEY, name text, tags text[], balance numeric);",
        )
        .await
        .unwrap();
    capture::adopt(&client, "users", false).await.unwrap();
    Backend {
        _dir: dir,
        pg,
        client,
    }
}

/// The change record in one line of `test_decoding` output, if the line is
/// a Chorus message (`message: transactional: 1 prefix: chorus:<seq>, sz:
/// <n> content:<record>`).
fn change_in_line(line: &str) -> Option<ChangeRecord> {
    let rest = line.strip_prefix("message: transactional: 1 prefix: ")?;
    let (prefix, rest) = rest.split_once(", sz: ")?;
    capture::ddl_index(prefix)?;
    let payload = rest.split_once(" content:")?.1;
    Some(serde_json::from_str(payload).unwrap())
}

/// Every row change captured since the last call, in commit order.
async fn changes(client: &Client) -> Vec<ChangeRecord> {
    let rows = client
        .query(
            "SELECT data FROM pg_logical_slot_get_changes('test_slot', NULL, NULL)",
            &[],
        )
        .await
        .unwrap();
    rows.iter()
        .filter_map(|r| change_in_line(r.get::<_, &str>(0)))
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn writes_are_captured_with_keys_row_images_and_versions() {
    let b = backend(4).await;
    b.client
        .batch_execute(
            "INSERT INTO users VALUES (2574, 'An', '{a,b}', 10.50);
             UPDATE users SET name = 'Wim' WHERE id = 2574;
             DELETE FROM users WHERE id = 2574;",
        )
        .await
        .unwrap();
    let captured = changes(&b.client).await;
    let ops: Vec<Operation> = captured.iter().map(|c| c.op).collect();
    assert_eq!(
        ops,
        vec![Operation::Insert, Operation::Update, Operation::Delete]
    );
    for change in &captured {
        assert_eq!(change.table, "public.users");
        assert_eq!(json(&change.key), serde_json::json!({"id": 2574}));
        assert_eq!(
            change.origin, 4,
            "direct writes carry the backend's node id"
        );
    }
    let first = json(&captured[0].row);
    assert_eq!(first["name"], "An");
    assert_eq!(first["tags"], serde_json::json!(["a", "b"]));
    let raw = captured[0].row.as_ref().unwrap().get();
    assert!(
        raw.contains(r#""balance": 10.50"#),
        "numeric kept exactly: {raw}"
    );
    assert_eq!(json(&captured[1].row)["name"], "Wim");
    assert!(captured[2].row.is_none());
    // Versions only grow for a row.
    assert!(captured[0].version < captured[1].version);
    assert!(captured[1].version < captured[2].version);

    // A direct write's version comes from the backend clock.
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    let ms = hlc::unix_millis(captured[0].version as u64);
    assert!((now_ms - ms).abs() < 10_000, "{ms} vs {now_ms}");

    // The tombstone stays.
    let row = b
        .client
        .query_one(
            "SELECT deleted, version FROM chorus.row_version WHERE tbl = 'public.users'",
            &[],
        )
        .await
        .unwrap();
    assert!(row.get::<_, bool>(0));
    assert_eq!(row.get::<_, i64>(1), captured[2].version);
}

#[tokio::test(flavor = "multi_thread")]
async fn version_is_max_of_transaction_hlc_and_previous_plus_one() {
    let b = backend(1).await;
    let high = hlc::from_unix_millis(3_000_000_000_000) as i64;
    let low = hlc::from_unix_millis(1_750_000_000_000) as i64;
    b.client
        .batch_execute(&format!(
            "BEGIN; SELECT set_config('chorus.hlc', '{high}', true), set_config('chorus.origin', '2', true);
             INSERT INTO users (id, name) VALUES (1, 'first'); COMMIT;"
        ))
        .await
        .unwrap();
    // An older clock overwrites it: the write still wins, one past the old version.
    b.client
        .batch_execute(&format!(
            "BEGIN; SELECT set_config('chorus.hlc', '{low}', true), set_config('chorus.origin', '3', true);
             UPDATE users SET name = 'second' WHERE id = 1; COMMIT;"
        ))
        .await
        .unwrap();
    let captured = changes(&b.client).await;
    assert_eq!(captured.len(), 2);
    assert_eq!((captured[0].version, captured[0].origin), (high, 2));
    assert_eq!((captured[1].version, captured[1].origin), (high + 1, 3));
}

#[tokio::test(flavor = "multi_thread")]
async fn rolled_back_and_applied_writes_are_not_captured() {
    let b = backend(1).await;
    b.client
        .batch_execute("BEGIN; INSERT INTO users (id) VALUES (1); ROLLBACK;")
        .await
        .unwrap();
    b.client
        .batch_execute(
            "BEGIN; SET LOCAL chorus.applying = on; INSERT INTO users (id) VALUES (2); COMMIT;",
        )
        .await
        .unwrap();
    assert!(changes(&b.client).await.is_empty());
    let versions: i64 = b
        .client
        .query_one("SELECT count(*) FROM chorus.row_version", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(versions, 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_key_change_is_a_delete_and_an_insert() {
    let b = backend(1).await;
    b.client
        .batch_execute("INSERT INTO users (id, name) VALUES (1, 'x'); UPDATE users SET id = 2;")
        .await
        .unwrap();
    let captured = changes(&b.client).await;
    let summary: Vec<(Operation, serde_json::Value)> =
        captured.iter().map(|c| (c.op, json(&c.key))).collect();
    assert_eq!(
        summary,
        vec![
            (Operation::Insert, serde_json::json!({"id": 1})),
            (Operation::Delete, serde_json::json!({"id": 1})),
            (Operation::Insert, serde_json::json!({"id": 2})),
        ]
    );
}

/// The capture triggers of a table: name, row or statement, events.
async fn capture_triggers(client: &Client, table: &str) -> Vec<String> {
    client
        .query(
            "SELECT tgname || ' ' || CASE WHEN tgtype & 1 = 1 THEN 'row' ELSE 'statement' END \
                    || concat(CASE WHEN tgtype & 4 <> 0 THEN ' insert' END, \
                              CASE WHEN tgtype & 16 <> 0 THEN ' update' END, \
                              CASE WHEN tgtype & 8 <> 0 THEN ' delete' END) \
               FROM pg_trigger WHERE tgrelid = $1::text::regclass AND tgname LIKE 'chorus_capture%' \
              ORDER BY tgname",
            &[&table],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
}

/// The changes of one statement, by key: (operation, key (null without
/// one), row, prev).
type KeyedChange = (Operation, Value, Option<Value>, Option<i64>);

async fn statement_changes(client: &Client, sql: &str) -> (Vec<KeyedChange>, Vec<i64>) {
    client.batch_execute(sql).await.unwrap();
    let captured = changes(client).await;
    let versions = captured.iter().map(|c| c.version).collect();
    let mut by_key: Vec<KeyedChange> = captured
        .iter()
        .map(|c| {
            (
                c.op,
                c.key
                    .as_ref()
                    .map_or(Value::Null, |k| serde_json::from_str(k.get()).unwrap()),
                c.row
                    .as_ref()
                    .map(|r| serde_json::from_str(r.get()).unwrap()),
                c.prev,
            )
        })
        .collect();
    by_key.sort_by_key(|(_, key, _, _)| key["id"].as_i64());
    (by_key, versions)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_plain_tables_statements_are_captured_as_sets_of_changes_by_key() {
    use serde_json::json;
    let b = backend(1).await;
    b.client
        .batch_execute("CREATE TABLE plain (id int PRIMARY KEY, v text)")
        .await
        .unwrap();
    capture::adopt(&b.client, "plain", false).await.unwrap();
    assert_eq!(
        capture_triggers(&b.client, "plain").await,
        [
            "chorus_capture_deletes statement delete",
            "chorus_capture_inserts statement insert",
            "chorus_capture_updates statement update",
        ]
    );
    // Columns to_jsonb cannot carry exactly, as users' text[], keep the
    // row trigger.
    assert_eq!(
        capture_triggers(&b.client, "users").await,
        ["chorus_capture row insert update delete"]
    );

    let (inserted, first) = statement_changes(
        &b.client,
        "INSERT INTO plain SELECT g, 'v' || g FROM generate_series(1, 3) g",
    )
    .await;
    assert_eq!(
        inserted,
        [1, 2, 3]
            .map(|id| (
                Operation::Insert,
                json!({ "id": id }),
                Some(json!({"id": id, "v": format!("v{id}")})),
                None
            ))
            .to_vec()
    );
    // One transaction, one stamp: the same version for every key.
    assert!(first.iter().all(|v| *v == first[0]), "{first:?}");

    // A key change, as chorus.capture records it (key 1 is gone, key 4 is
    // new), among updates in place; each overwrote the version its key
    // had.
    let (moved, second) = statement_changes(
        &b.client,
        "UPDATE plain SET id = CASE id WHEN 1 THEN 4 ELSE id END, v = v || '!'",
    )
    .await;
    assert_eq!(
        moved,
        vec![
            (Operation::Delete, json!({"id": 1}), None, Some(first[0])),
            (
                Operation::Update,
                json!({"id": 2}),
                Some(json!({"id": 2, "v": "v2!"})),
                Some(first[0])
            ),
            (
                Operation::Update,
                json!({"id": 3}),
                Some(json!({"id": 3, "v": "v3!"})),
                Some(first[0])
            ),
            (
                Operation::Insert,
                json!({"id": 4}),
                Some(json!({"id": 4, "v": "v1!"})),
                None
            ),
        ]
    );
    assert!(second.iter().all(|v| *v > first[0]), "{second:?}");

    let (deleted, _) = statement_changes(&b.client, "DELETE FROM plain WHERE id >= 3").await;
    assert_eq!(
        deleted,
        vec![
            (Operation::Delete, json!({"id": 3}), None, Some(second[0])),
            (Operation::Delete, json!({"id": 4}), None, Some(second[0])),
        ]
    );
    // A key brought back over its tombstone overwrote it.
    let (back, _) = statement_changes(&b.client, "INSERT INTO plain VALUES (4, 'back')").await;
    assert_eq!(back.len(), 1);
    assert!(back[0].3.is_some_and(|prev| prev > second[0]), "{back:?}");
    // A statement of no row records nothing, and takes no transaction id.
    let (none, _) = statement_changes(
        &b.client,
        "BEGIN; UPDATE plain SET v = 'x' WHERE false; DELETE FROM plain WHERE false; \
         INSERT INTO plain SELECT 9, 'x' WHERE false; \
         DO $$ BEGIN IF pg_current_xact_id_if_assigned() IS NOT NULL THEN \
             RAISE EXCEPTION 'a transaction id was taken'; END IF; END $$; COMMIT",
    )
    .await;
    assert_eq!(none, vec![]);

    // A unique index besides the key: an UPDATE is captured row by row
    // again (a peer that applies the rows one by one must meet them in
    // the order the origin's unique checks passed in).
    b.client
        .batch_execute("CREATE UNIQUE INDEX plain_v ON plain (v)")
        .await
        .unwrap();
    assert_eq!(
        capture_triggers(&b.client, "plain").await,
        [
            "chorus_capture row update",
            "chorus_capture_deletes statement delete",
            "chorus_capture_inserts statement insert",
        ]
    );
    let (by_row, _) = statement_changes(&b.client, "UPDATE plain SET v = v || '!'").await;
    assert_eq!(
        by_row
            .iter()
            .map(|c| (c.0, c.2.clone()))
            .collect::<Vec<_>>(),
        [
            (Operation::Update, Some(json!({"id": 2, "v": "v2!!"}))),
            (Operation::Update, Some(json!({"id": 4, "v": "back!"}))),
        ]
    );

    // Inheritance: a statement on a parent fires no statement trigger of
    // its children, and the parent's transition tables would hold their
    // rows; parent and child are captured by row, each row once, under
    // its own table.
    b.client
        .batch_execute(
            "CREATE TABLE parent_t (id int PRIMARY KEY, v text); \
             INSERT INTO parent_t VALUES (1, 'p')",
        )
        .await
        .unwrap();
    capture::adopt(&b.client, "parent_t", false).await.unwrap();
    assert_eq!(
        capture_triggers(&b.client, "parent_t").await,
        [
            "chorus_capture_deletes statement delete",
            "chorus_capture_inserts statement insert",
            "chorus_capture_updates statement update",
        ]
    );
    b.client
        .batch_execute(
            "CREATE TABLE child_t (extra int) INHERITS (parent_t); \
             ALTER TABLE child_t ADD PRIMARY KEY (id)",
        )
        .await
        .unwrap();
    capture::adopt(&b.client, "child_t", false).await.unwrap();
    for table in ["parent_t", "child_t"] {
        assert_eq!(
            capture_triggers(&b.client, table).await,
            ["chorus_capture row insert update delete"],
            "{table}"
        );
    }
    b.client
        .batch_execute("INSERT INTO child_t VALUES (2, 'c', 7)")
        .await
        .unwrap();
    changes(&b.client).await;
    b.client
        .batch_execute("UPDATE parent_t SET v = v || '!'")
        .await
        .unwrap();
    let mut tables: Vec<(String, Value)> = changes(&b.client)
        .await
        .iter()
        .map(|c| (c.table.clone(), json(&c.key)))
        .collect();
    tables.sort_by_key(|(t, _)| t.clone());
    assert_eq!(
        tables,
        [
            ("public.child_t".to_owned(), json!({"id": 2})),
            ("public.parent_t".to_owned(), json!({"id": 1})),
        ]
    );

    // Columns named like the statement capture's own names, keyed and
    // keyless: every image is the row's.
    b.client
        .batch_execute(
            "CREATE TABLE odd (r int PRIMARY KEY, t text, img text, key text, mark int, rel text); \
             CREATE TABLE odd_keyless (r int, t text, img text, mark int)",
        )
        .await
        .unwrap();
    capture::adopt(&b.client, "odd", false).await.unwrap();
    capture::adopt(&b.client, "odd_keyless", true)
        .await
        .unwrap();
    for (table, key) in [("odd", json!({"r": 1})), ("odd_keyless", Value::Null)] {
        let (inserted, _) = statement_changes(
            &b.client,
            &format!("INSERT INTO {table} (r, t, img, mark) VALUES (1, 't', 'img', 7)"),
        )
        .await;
        let row = serde_json::from_value::<serde_json::Map<String, Value>>(
            inserted[0].2.clone().unwrap(),
        )
        .unwrap();
        assert_eq!(
            (row["r"].clone(), row["t"].clone(), row["mark"].clone()),
            (json!(1), json!("t"), json!(7)),
            "{table}"
        );
        assert_eq!(inserted[0].1, key, "{table}");
        let (deleted, _) = statement_changes(&b.client, &format!("DELETE FROM {table}")).await;
        assert_eq!(deleted[0].0, Operation::Delete, "{table}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn tables_without_a_primary_key_are_adopted_keyless_or_not_at_all() {
    let b = backend(1).await;
    b.client
        .batch_execute("CREATE TABLE events (at timestamptz, what text)")
        .await
        .unwrap();
    let err = capture::adopt(&b.client, "events", false)
        .await
        .unwrap_err();
    let capture::CaptureError::Sql(sql) = &err else {
        panic!("{err}");
    };
    let db = sql.as_db_error().unwrap();
    assert_eq!(db.code().code(), "55000");
    assert!(
        db.message().contains("has no primary key"),
        "{}",
        db.message()
    );
    assert!(db.hint().unwrap().contains("keyless => true"));

    capture::adopt(&b.client, "events", true).await.unwrap();
    b.client
        .batch_execute("INSERT INTO events VALUES (now(), 'started')")
        .await
        .unwrap();
    let captured = changes(&b.client).await;
    assert_eq!(captured.len(), 1);
    assert!(captured[0].key.is_none());
    assert_eq!(json(&captured[0].row)["what"], "started");
    // An update carries the old row, by which peers find the row.
    b.client
        .batch_execute("UPDATE events SET what = 'x'")
        .await
        .unwrap();
    let captured = changes(&b.client).await;
    assert_eq!(captured.len(), 1);
    assert_eq!(captured[0].op, Operation::Update);
    assert!(captured[0].key.is_none());
    assert_eq!(json(&captured[0].row)["what"], "x");
    assert_eq!(json(&captured[0].old)["what"], "started");
}

/// Objects of Chorus's on a backend that `chorus_owner` does not own.
async fn not_owned(client: &Client) -> Vec<String> {
    client
        .query(
            "WITH o AS (SELECT oid FROM pg_roles WHERE rolname = 'chorus_owner') \
             SELECT 'schema' FROM pg_namespace WHERE nspname = 'chorus' AND nspowner <> (SELECT oid FROM o) \
             UNION ALL SELECT c.oid::regclass::text FROM pg_class c \
                 WHERE c.relnamespace = 'chorus'::regnamespace AND c.relowner <> (SELECT oid FROM o) \
                   AND c.relkind NOT IN ('i', 'I', 'c', 't') \
             UNION ALL SELECT p.oid::regprocedure::text FROM pg_proc p \
                 WHERE p.pronamespace = 'chorus'::regnamespace AND p.proowner <> (SELECT oid FROM o) \
             UNION ALL SELECT evtname FROM pg_event_trigger \
                 WHERE evtname LIKE 'chorus%' AND evtowner <> (SELECT oid FROM o) \
             UNION ALL SELECT pubname FROM pg_publication \
                 WHERE pubname = 'chorus' AND pubowner <> (SELECT oid FROM o)",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn chorus_objects_belong_to_a_role_nobody_logs_in_as() {
    let b = backend(1).await;
    assert_eq!(not_owned(&b.client).await, Vec::<String>::new());
    let (login, superuser): (bool, bool) = {
        let row = b
            .client
            .query_one(
                "SELECT rolcanlogin, rolsuper FROM pg_roles WHERE rolname = 'chorus_owner'",
                &[],
            )
            .await
            .unwrap();
        (row.get(0), row.get(1))
    };
    assert!(!login && superuser);
    let definers: i64 = b
        .client
        .query_one(
            "SELECT count(*) FROM pg_proc WHERE pronamespace = 'chorus'::regnamespace AND prosecdef",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(definers >= 3, "{definers} SECURITY DEFINER functions");
    // Installed again by another superuser: still chorus_owner's, and
    // capture still works.
    b.client
        .batch_execute("CREATE ROLE other_admin LOGIN SUPERUSER")
        .await
        .unwrap();
    let other = testkit::connect(&format!(
        "host=127.0.0.1 port={} user=other_admin dbname=postgres",
        b.pg.port()
    ))
    .await
    .unwrap();
    capture::install(&other, 1).await.unwrap();
    other
        .batch_execute("CREATE TABLE after_reinstall (id int PRIMARY KEY); SELECT chorus.adopt('after_reinstall'::regclass, false)")
        .await
        .unwrap();
    assert_eq!(not_owned(&b.client).await, Vec::<String>::new());
    let before = changes(&b.client).await.len();
    other
        .batch_execute("INSERT INTO after_reinstall VALUES (1); INSERT INTO users (id) VALUES (7)")
        .await
        .unwrap();
    assert_eq!(
        changes(&b.client).await.len(),
        2,
        "changes before: {before}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn install_is_idempotent_and_safe_concurrently() {
    let b = backend(1).await;
    let second = testkit::connect(&b.pg.conninfo("postgres")).await.unwrap();
    let (one, two) = tokio::join!(capture::install(&b.client, 5), capture::install(&second, 5));
    one.unwrap();
    two.unwrap();
    let node: i32 = b
        .client
        .query_one("SELECT node_id FROM chorus.local", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(node, 5);
    // Adopted tables keep capturing after a reinstall.
    b.client
        .batch_execute("INSERT INTO users (id) VALUES (9)")
        .await
        .unwrap();
    assert_eq!(changes(&b.client).await.len(), 1);
}

/// The chorus schema as pg_dump shows it.
fn chorus_schema(pg: &LocalPostgres, database: &str) -> String {
    testkit::schema_dump(pg.port(), database, &["--schema=chorus"])
}

#[tokio::test(flavor = "multi_thread")]
async fn a_schema_of_an_earlier_version_is_upgraded_in_place_and_a_newer_one_refused() {
    // From each earlier version (1: before versions were recorded; 2: the
    // previous one), on a backend of its own.
    for earlier in 1..capture::SCHEMA_VERSION {
        let dir = tempfile::tempdir().unwrap();
        let pg = local_pg(&dir);
        let client = testkit::connect(&pg.conninfo("postgres")).await.unwrap();
        client
            .batch_execute(&testkit::earlier_schema_sql(earlier, 1, ""))
            .await
            .unwrap();
        client
            .batch_execute(
                "CREATE TABLE items (id int PRIMARY KEY, v text, j json);
                 SELECT chorus.adopt('items'::regclass, false);
                 INSERT INTO items VALUES (1, 'before', NULL);
                 CREATE TABLE parts (id int PRIMARY KEY) PARTITION BY RANGE (id);
                 CREATE TABLE parts_a PARTITION OF parts FOR VALUES FROM (0) TO (10);
                 CREATE TABLE parts_b PARTITION OF parts FOR VALUES FROM (10) TO (20);
                 SELECT chorus.adopt('parts'::regclass, false);
                 INSERT INTO parts VALUES (1), (2), (11);",
            )
            .await
            .unwrap();
        client
            .batch_execute(
                "SELECT pg_create_logical_replication_slot('test_slot', 'test_decoding')",
            )
            .await
            .unwrap();
        capture::install(&client, 1).await.unwrap();
        let version: i32 = client
            .query_one("SELECT version FROM chorus.schema_version", &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(version, capture::SCHEMA_VERSION, "from {earlier}");
        // The table stays adopted, its rows and versions kept, and it
        // captures.
        client
            .batch_execute(r#"UPDATE items SET v = 'after', j = '{"b":1,  "a":2}' WHERE id = 1"#)
            .await
            .unwrap();
        let captured = changes(&client).await;
        assert_eq!(captured.len(), 1, "from {earlier}: {captured:?}");
        assert_eq!(json(&captured[0].row)["v"], "after");
        // Its capture trigger was made again for the json value's exact
        // text (see chorus.with_json_texts).
        assert_eq!(
            json(&captured[0].row)[""]["j"],
            r#"{"b":1,  "a":2}"#,
            "from {earlier}: {captured:?}"
        );
        assert!(captured[0].prev.is_some(), "{captured:?}");
        // A partition adopted before its own TRUNCATE replicated: that
        // TRUNCATE records a delete of each of its rows now.
        client.batch_execute("TRUNCATE parts_a").await.unwrap();
        let captured = changes(&client).await;
        let ops: Vec<Operation> = captured.iter().map(|c| c.op).collect();
        assert_eq!(
            ops,
            [Operation::Delete, Operation::Delete],
            "from {earlier}: {captured:?}"
        );
        // The upgraded schema is the one a new install makes.
        client.batch_execute("CREATE DATABASE fresh").await.unwrap();
        let fresh = testkit::connect(&pg.conninfo("fresh")).await.unwrap();
        capture::install(&fresh, 1).await.unwrap();
        assert_eq!(
            chorus_schema(&pg, "postgres"),
            chorus_schema(&pg, "fresh"),
            "from {earlier}"
        );
        if earlier > 1 {
            continue;
        }
        // A schema newer than this build is left alone, with a clear error.
        client
            .batch_execute("UPDATE chorus.schema_version SET version = 99")
            .await
            .unwrap();
        let err = capture::install(&client, 1).await.unwrap_err().to_string();
        assert!(err.contains("version 99, newer than this Chorus"), "{err}");
        let version: i32 = client
            .query_one("SELECT version FROM chorus.schema_version", &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(version, 99);
        // The session is usable afterwards (the install's transaction
        // ended).
        client.batch_execute("SELECT 1").await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn install_as_a_role_that_is_not_a_superuser_says_what_is_missing() {
    let b = backend(1).await;
    b.client
        .batch_execute("CREATE ROLE weak LOGIN CREATEDB CREATEROLE REPLICATION")
        .await
        .unwrap();
    let conninfo =
        b.pg.conninfo("postgres")
            .replace("user=postgres", "user=weak");
    let weak = testkit::connect(&conninfo).await.unwrap();
    let err = capture::install(&weak, 2).await.unwrap_err().to_string();
    assert!(
        err.contains("role \"weak\" is not a superuser") && err.contains("replication.user"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn uuidv7_values_are_unique_time_ordered_and_well_formed() {
    let b = backend(1).await;
    let before_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    // Many in one session, far more than one per clock tick.
    let ids: Vec<String> = b
        .client
        .query_one(
            "SELECT array_agg(u::text ORDER BY g) \
             FROM (SELECT g, chorus.uuidv7() AS u FROM generate_series(1, 20000) g) s",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    // Then one from another session.
    let other = testkit::connect(&b.pg.conninfo("postgres")).await.unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    let later: String = other
        .query_one("SELECT chorus.uuidv7()::text", &[])
        .await
        .unwrap()
        .get(0);
    let after_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    assert_eq!(ids.len(), 20000);
    for pair in ids.windows(2) {
        // Canonical text of UUIDs sorts like their bytes.
        assert!(pair[0] < pair[1], "{} then {}", pair[0], pair[1]);
    }
    assert!(
        ids.last().unwrap() < &later,
        "{} then {later}",
        ids.last().unwrap()
    );
    for id in ids.iter().step_by(997).chain([&later]) {
        let hex: String = id.chars().filter(|c| *c != '-').collect();
        assert_eq!(&hex[12..13], "7", "version of {id}");
        assert!("89ab".contains(&hex[16..17]), "variant of {id}");
        let ms = i64::from_str_radix(&hex[..12], 16).unwrap();
        assert!(
            (before_ms - 1000..=after_ms + 1000).contains(&ms),
            "{id}: {ms} not in {before_ms}..{after_ms}"
        );
    }
}

/// One text value of `sql`.
async fn text(client: &Client, sql: &str) -> String {
    client.query_one(sql, &[]).await.unwrap().get(0)
}

#[tokio::test(flavor = "multi_thread")]
async fn pruning_reads_the_tombstones_not_every_live_version() {
    // chorus.row_version holds a version for every live row; pruning runs
    // on every backend every minute and must not read them all each time
    // (a backend of a million rows spent 80 ms alone, 0.6 s under load, on
    // each round). The tombstones have their own index, built after the
    // install, and built again when a failed build left it invalid.
    let b = backend(1).await;
    let c = &b.client;
    let valid = "SELECT coalesce((SELECT indisvalid FROM pg_index \
                  WHERE indexrelid = to_regclass('chorus.row_version_tombstone')), false)::text";
    assert_eq!(text(c, valid).await, "false");
    assert!(capture::build_tombstone_index(c).await.unwrap());
    assert_eq!(text(c, valid).await, "true");
    assert!(!capture::build_tombstone_index(c).await.unwrap());
    c.batch_execute(
        "UPDATE pg_index SET indisvalid = false \
          WHERE indexrelid = 'chorus.row_version_tombstone'::regclass",
    )
    .await
    .unwrap();
    assert!(capture::build_tombstone_index(c).await.unwrap());
    assert_eq!(text(c, valid).await, "true");
    c.batch_execute(
        "INSERT INTO users (id) SELECT generate_series(1, 50000); \
         DELETE FROM users WHERE id <= 5; ANALYZE chorus.row_version",
    )
    .await
    .unwrap();
    let far = hlc::from_unix_millis(3_000_000_000_000) as i64;
    c.execute("SELECT chorus.note_horizon(7, $1, $1)", &[&far])
        .await
        .unwrap();
    c.batch_execute("SELECT chorus.set_stamp_age(0)")
        .await
        .unwrap();
    // (The counters of the transaction so far: the pruning's statements.)
    let row = c
        .query_one(
            "WITH pruned AS (SELECT chorus.prune_tombstones('{7}', 100) AS n) \
             SELECT (SELECT n FROM pruned), s.seq_scan, s.idx_scan \
               FROM pruned, pg_stat_xact_user_tables s WHERE s.relid = 'chorus.row_version'::regclass",
            &[],
        )
        .await
        .unwrap();
    let (pruned, seq_scans, index_scans): (i64, i64, i64) = (row.get(0), row.get(1), row.get(2));
    assert_eq!(pruned, 5);
    assert_eq!(seq_scans, 0, "pruning read every version");
    assert!(index_scans > 0);
    assert_eq!(
        text(
            c,
            "SELECT count(*)::text FROM chorus.row_version WHERE NOT deleted"
        )
        .await,
        "49995"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn stale_stamps_are_freshened_and_tombstones_go_only_below_every_horizon() {
    let b = backend(1).await;
    let c = &b.client;
    let now_ms = || {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as i64
    };
    // A stamp left from long ago is made no older than the stamp age.
    c.batch_execute("SELECT chorus.set_stamp_age(60000)")
        .await
        .unwrap();
    let ancient = hlc::from_unix_millis(1_750_000_000_000) as i64;
    c.batch_execute(&format!(
        "SET chorus.hlc = '{ancient}'; \
         INSERT INTO users (id) SELECT generate_series(1, 10); RESET chorus.hlc"
    ))
    .await
    .unwrap();
    let captured = changes(c).await;
    assert_eq!(captured.len(), 10);
    let ms = hlc::unix_millis(captured[0].version as u64);
    assert!(
        (now_ms() - 61_000..=now_ms() - 59_000).contains(&ms),
        "a stamp 60 s older than the clock, not {ms}"
    );
    c.batch_execute("DELETE FROM users WHERE id <= 5")
        .await
        .unwrap();
    let tombstones = "SELECT count(*)::text FROM chorus.row_version WHERE deleted AND pk <> '{}'";
    assert_eq!(text(c, tombstones).await, "5");

    // A transaction that has written and is still open holds the horizon
    // at its start, less the stamp age: after a decrease, the age it may
    // have pinned its stamp with.
    let other = testkit::connect(&b.pg.conninfo("postgres")).await.unwrap();
    other
        .batch_execute("BEGIN; INSERT INTO users VALUES (100)")
        .await
        .unwrap();
    c.batch_execute("SELECT chorus.set_stamp_age(0)")
        .await
        .unwrap();
    let held = "SELECT (chorus.horizon() <= ((floor(extract(epoch FROM min(xact_start)) * 1000)::bigint \
                - 1704067200000 - 60000) << 22))::text FROM pg_stat_activity WHERE backend_xid IS NOT NULL";
    assert_eq!(text(c, held).await, "true");
    assert_eq!(
        text(c, "SELECT chorus.prune_tombstones('{}', 100)::text").await,
        "0"
    );
    other.batch_execute("COMMIT").await.unwrap();

    // Another backend's horizon must be known, and so must what it has
    // of every origin ("complete"), before anything goes.
    assert_eq!(
        text(c, "SELECT chorus.prune_tombstones('{7}', 100)::text").await,
        "0"
    );
    let far = hlc::from_unix_millis(3_000_000_000_000) as i64;
    let old = hlc::from_unix_millis(1_710_000_000_000) as i64;
    c.execute("SELECT chorus.note_horizon(7, $1, $2)", &[&far, &old])
        .await
        .unwrap();
    assert_eq!(
        text(c, "SELECT chorus.prune_tombstones('{7}', 100)::text").await,
        "0"
    );
    c.execute("SELECT chorus.note_horizon(7, $1, $1)", &[&far])
        .await
        .unwrap();
    // (At most `max_rows` a time.)
    assert_eq!(
        text(c, "SELECT chorus.prune_tombstones('{7}', 3)::text").await,
        "3"
    );
    assert_eq!(
        text(c, "SELECT chorus.prune_tombstones('{7}', 100)::text").await,
        "2"
    );
    assert_eq!(text(c, tombstones).await, "0");
    // Live rows keep their versions.
    assert_eq!(
        text(
            c,
            "SELECT count(*)::text FROM chorus.row_version WHERE NOT deleted"
        )
        .await,
        "6"
    );

    // A row older than what was pruned, offered for a key with no version
    // here (as reconciliation would), is not written; a newer one is.
    let offer = |version: i64| {
        format!(
            "SELECT chorus.apply_change('{{\"table\": \"public.users\", \"op\": \"INSERT\", \"key\": {{\"id\": 3}}, \
             \"row\": {{\"id\": 3, \"name\": \"back\"}}, \"version\": {version}, \"origin\": 2}}')"
        )
    };
    c.batch_execute("SET chorus.applying = on").await.unwrap();
    assert_eq!(text(c, &offer(ancient)).await, "pruned:skipped");
    assert_eq!(
        text(c, "SELECT count(*)::text FROM users WHERE id = 3").await,
        "0"
    );
    assert_eq!(text(c, &offer(far)).await, "applied");
    c.batch_execute("RESET chorus.applying").await.unwrap();

    // A horizon sent is a promise: with a larger stamp age afterwards, a
    // stale stamp is still made newer than it.
    let sent: i64 = c
        .query_one("SELECT chorus.emit_horizon('{}')", &[])
        .await
        .unwrap()
        .get(0);
    c.batch_execute(&format!(
        "SELECT chorus.set_stamp_age(3600000); SET chorus.hlc = '{ancient}'; \
         INSERT INTO users (id) VALUES (200); RESET chorus.hlc"
    ))
    .await
    .unwrap();
    let version: i64 = c
        .query_one(
            "SELECT version FROM chorus.row_version WHERE pk = '{\"id\": 200}'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(version >= sent, "{version} < {sent}");
}

/// A change's operation, its `prev`, whether the row is held, its version
/// and whether it is deleted there, and the conflict kind expected.
type Case = (
    &'static str,
    Option<i64>,
    bool,
    Option<i64>,
    Option<bool>,
    Option<&'static str>,
);

/// Every conflict kind, from the one function that classifies them: the
/// change's operation and `prev` against what the backend holds.
#[tokio::test(flavor = "multi_thread")]
async fn conflicts_are_classified_by_one_function() {
    let b = backend(1).await;
    let cases: &[Case] = &[
        ("INSERT", None, false, None, None, None),
        ("UPDATE", Some(5), false, None, None, Some("update_missing")),
        ("DELETE", Some(5), false, None, None, Some("delete_missing")),
        ("UPDATE", Some(5), true, Some(5), Some(false), None),
        ("DELETE", Some(5), true, Some(5), Some(false), None),
        (
            "INSERT",
            None,
            true,
            Some(5),
            Some(true),
            Some("insert_delete"),
        ),
        (
            "UPDATE",
            Some(4),
            true,
            Some(5),
            Some(true),
            Some("update_delete"),
        ),
        (
            "DELETE",
            Some(4),
            true,
            Some(5),
            Some(true),
            Some("delete_delete"),
        ),
        (
            "INSERT",
            None,
            true,
            Some(5),
            Some(false),
            Some("insert_insert"),
        ),
        (
            "UPDATE",
            Some(4),
            true,
            Some(5),
            Some(false),
            Some("update_update"),
        ),
        (
            "DELETE",
            Some(4),
            true,
            Some(5),
            Some(false),
            Some("update_delete"),
        ),
    ];
    for (op, prev, have, version, deleted, kind) in cases {
        let got: Option<String> = b
            .client
            .query_one(
                "SELECT chorus.conflict_kind($1, $2, $3, $4, $5)",
                &[op, prev, have, version, deleted],
            )
            .await
            .unwrap()
            .get(0);
        assert_eq!(
            got.as_deref(),
            *kind,
            "{op} prev {prev:?} over {version:?} deleted {deleted:?}"
        );
    }
    // Last writer wins by (version, origin); a row not held is written.
    for (ver, org, have, cur, cur_org, wins) in [
        (7i64, 1i32, true, Some(6i64), Some(2i32), true),
        (7, 1, true, Some(7), Some(2), false),
        (7, 3, true, Some(7), Some(2), true),
        (7, 1, true, Some(8), Some(1), false),
        (1, 1, false, None, None, true),
    ] {
        let got: bool = b
            .client
            .query_one(
                "SELECT chorus.remote_wins($1, $2, $3, $4, $5)",
                &[&ver, &org, &have, &cur, &cur_org],
            )
            .await
            .unwrap()
            .get(0);
        assert_eq!(got, wins, "({ver}, {org}) over {cur:?}/{cur_org:?}");
    }
}

/// The apply of a table with a unique index besides its key goes
/// set-based when no row image's value of that index meets another key's
/// row or image, and one by one otherwise, where unique conflicts are
/// resolved (and logged) as they come.
#[tokio::test(flavor = "multi_thread")]
async fn a_batch_with_a_unique_index_goes_set_based_unless_its_values_meet_another_key() {
    let b = backend(1).await;
    b.client
        .batch_execute(
            "CREATE TABLE members (id bigint PRIMARY KEY, email text UNIQUE, note text);
             CREATE TABLE lowered (id bigint PRIMARY KEY, email text);
             CREATE UNIQUE INDEX lowered_email ON lowered (lower(email));
             CREATE TABLE cards (id bigint PRIMARY KEY, member bigint REFERENCES members ON DELETE CASCADE);
             CREATE FUNCTION noop() RETURNS trigger LANGUAGE plpgsql AS 'BEGIN RETURN NEW; END';
             CREATE TRIGGER noop BEFORE INSERT ON cards FOR EACH ROW EXECUTE FUNCTION noop();
             CREATE TABLE audited (id bigint PRIMARY KEY);
             CREATE TRIGGER noop BEFORE INSERT ON audited FOR EACH ROW EXECUTE FUNCTION noop();
             ALTER TABLE audited ENABLE ALWAYS TRIGGER noop;
             INSERT INTO members VALUES (1, 'a@x', 'old'), (2, 'b@x', 'old'), (3, NULL, 'old');",
        )
        .await
        .unwrap();
    for table in ["members", "lowered", "cards", "audited"] {
        capture::adopt(&b.client, table, false).await.unwrap();
    }
    let batchable = |t: &'static str| {
        let client = &b.client;
        async move {
            client
                .query_one("SELECT chorus.batchable($1)", &[&t])
                .await
                .unwrap()
                .get::<_, bool>(0)
        }
    };
    assert!(batchable("public.members").await);
    // An expression's values cannot be told from the images' columns.
    assert!(!batchable("public.lowered").await);
    // Foreign keys and ordinary triggers do not fire in the apply; a
    // trigger enabled ALWAYS does.
    assert!(batchable("public.cards").await);
    assert!(!batchable("public.audited").await);

    // Versions newer than those the rows here got.
    const V: i64 = 1 << 62;
    let change = |op: &str, id: i64, email: Option<&str>, version: i64| {
        serde_json::json!({
            "table": "public.members", "op": op, "key": {"id": id},
            "row": if op == "DELETE" { Value::Null } else {
                serde_json::json!({"id": id, "email": email, "note": "new"}) },
            "version": V + version, "prev": null, "origin": 2,
        })
    };
    let overlap = |changes: Vec<Value>| {
        let client = &b.client;
        async move {
            client
                .query_one(
                    "SELECT chorus.unique_overlap('public.members', '{id}', $1::text::jsonb)",
                    &[&Value::Array(changes).to_string()],
                )
                .await
                .unwrap()
                .get::<_, bool>(0)
        }
    };
    // New keys with new values, a row keeping its own value, NULLs: apart.
    assert!(
        !overlap(vec![
            change("INSERT", 10, Some("c@x"), 100),
            change("INSERT", 11, Some("d@x"), 101),
            change("UPDATE", 1, Some("a@x"), 102),
            change("UPDATE", 1, Some("a2@x"), 103),
            change("INSERT", 12, None, 104),
            change("UPDATE", 3, None, 105),
        ])
        .await
    );
    // A value another key's row holds here, even one this batch moves.
    assert!(overlap(vec![change("INSERT", 10, Some("b@x"), 100)]).await);
    assert!(
        overlap(vec![
            change("UPDATE", 2, Some("b2@x"), 100),
            change("UPDATE", 1, Some("b@x"), 101),
        ])
        .await
    );
    // Two keys' images with one value, at any point of the batch.
    assert!(
        overlap(vec![
            change("INSERT", 10, Some("c@x"), 100),
            change("UPDATE", 10, Some("e@x"), 101),
            change("INSERT", 11, Some("c@x"), 102),
        ])
        .await
    );

    let apply = |changes: Vec<Value>| {
        let client = &b.client;
        async move {
            client
                .batch_execute("BEGIN; SELECT chorus.apply_begin(2, 0)")
                .await
                .unwrap();
            let results: Vec<String> = client
                .query_one(
                    "SELECT chorus.apply_changes($1::text::jsonb)",
                    &[&Value::Array(changes).to_string()],
                )
                .await
                .unwrap()
                .get(0);
            client.batch_execute("COMMIT").await.unwrap();
            results
        }
    };
    let rows = || async {
        text(
            &b.client,
            "SELECT string_agg(id || ':' || coalesce(email, '-'), ',' ORDER BY id) FROM members",
        )
        .await
    };
    // Set-based: every change applied, versions recorded.
    let results = apply(vec![
        change("INSERT", 10, Some("c@x"), 100),
        change("INSERT", 11, Some("d@x"), 101),
        change("UPDATE", 10, Some("c2@x"), 102),
        change("DELETE", 11, None, 103),
    ])
    .await;
    assert_eq!(results, ["applied"; 4]);
    assert_eq!(rows().await, "1:a@x,2:b@x,3:-,10:c2@x");
    assert_eq!(
        text(
            &b.client,
            "SELECT string_agg(pk::text || (version - (1::bigint << 62)) || deleted, ',' ORDER BY pk::text) \
             FROM chorus.row_version WHERE tbl = 'public.members' AND (pk ->> 'id')::int >= 10"
        )
        .await,
        "{\"id\": 10}102false,{\"id\": 11}103true"
    );
    // One by one: the newer image takes the value from the row holding it,
    // and the conflict is logged.
    let results = apply(vec![
        change("INSERT", 12, Some("e@x"), 110),
        change("INSERT", 13, Some("a@x"), 111),
    ])
    .await;
    assert_eq!(results, ["applied", "unique:remote_wins"]);
    assert_eq!(rows().await, "2:b@x,3:-,10:c2@x,12:e@x,13:a@x");
    assert_eq!(
        text(
            &b.client,
            "SELECT string_agg(kind || ':' || resolution || ':' || pk::text, ',') \
             FROM chorus.conflict WHERE tbl = 'public.members'"
        )
        .await,
        "unique:remote_wins:{\"id\": 13}"
    );
    // A referencing row before the row it references, in one batch: both
    // applied (no check fires in the apply; the origin made them valid).
    let results = apply(vec![
        serde_json::json!({
            "table": "public.cards", "op": "INSERT", "key": {"id": 1},
            "row": {"id": 1, "member": 20}, "version": V + 120, "prev": null, "origin": 2,
        }),
        change("INSERT", 20, Some("f@x"), 121),
    ])
    .await;
    assert_eq!(results, ["applied"; 2]);
    assert_eq!(
        text(
            &b.client,
            "SELECT string_agg(id || ':' || member, ',') FROM cards"
        )
        .await,
        "1:20"
    );
}
