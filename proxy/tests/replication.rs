//! Replication streams between real backends: captured changes fanned out
//! to every peer, last-writer-wins by version, conflicts logged, tombstones,
//! columns matched by name, and exactly-once apply across re-delivery.
//! (Writes are stamped by hand with `chorus.hlc` here, as the proxy will.)
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use chorus_proxy::cluster::capture;
use chorus_proxy::cluster::replication::outcome::{Kind, Resolution};
use chorus_proxy::cluster::replication::walstream::{format_lsn, PgOutputDecoder};
use chorus_proxy::cluster::replication::{ReplicationError, ReplicationStream, StepReport};
use chorus_proxy::localpg::LocalPostgres;
use chorus_router::hlc;
use chorus_testkit as testkit;
use tokio_postgres::Client;

/// Decoded rows fetched per step (whole transactions are always taken).
const BATCH_ROWS: i32 = 2_000;

/// Move one batch of a stream from origin to peer through the SQL decoding
/// functions (the nodes use a walsender stream; this steps it by hand).
async fn step(
    stream: &ReplicationStream,
    origin: &Client,
    peer: &mut Client,
) -> Result<StepReport, ReplicationError> {
    // The same pgoutput options as walstream::PGOUTPUT_OPTIONS.
    let rows = origin
        .query(
            "SELECT data FROM pg_logical_slot_peek_binary_changes($1, NULL, $2, \
             'proto_version', '1', 'publication_names', 'chorus', 'messages', 'true')",
            &[&stream.slot, &BATCH_ROWS],
        )
        .await?;
    let mut decoder = PgOutputDecoder::default();
    let mut transactions = Vec::new();
    for row in &rows {
        if let Some(txn) = decoder.feed(row.get::<_, &[u8]>(0))? {
            transactions.push(txn);
        }
    }
    let Some(last) = transactions.last() else {
        return Ok(StepReport::default());
    };
    let last_lsn = format_lsn(last.end_lsn);
    let report = stream.apply(peer, &transactions).await?;
    origin
        .execute(
            "SELECT pg_replication_slot_advance($1, $2::text::pg_lsn)",
            &[&stream.slot, &last_lsn],
        )
        .await?;
    Ok(report)
}

/// Backends with the chorus schema and a stream from each to each, moved
/// by hand ([`step`]): the replication path without nodes.
struct Streams {
    _dir: tempfile::TempDir,
    servers: Vec<LocalPostgres>,
    clients: Vec<Client>,
    /// Apply-side connections, one per backend.
    appliers: Vec<Client>,
    streams: Vec<ReplicationStream>,
}

const USERS: &str = "CREATE TABLE users (id bigint PRIMARY KEY, name text NOT NULL)";

async fn streams(n: u16, ddl: &[&str]) -> Streams {
    let dir = tempfile::tempdir().unwrap();
    let mut servers = Vec::new();
    let mut clients = Vec::new();
    let mut appliers = Vec::new();
    for (pg, i) in testkit::backends(dir.path(), usize::from(n))
        .into_iter()
        .zip(1..)
    {
        let client = testkit::connect(&pg.conninfo("postgres")).await.unwrap();
        capture::install(&client, i).await.unwrap();
        if !ddl.is_empty() {
            // Schema made before replication starts, so kept local here.
            client
                .batch_execute(&format!(
                    "SET chorus.ddl_scope = 'local'; {}; RESET chorus.ddl_scope",
                    ddl[(i as usize - 1) % ddl.len()]
                ))
                .await
                .unwrap();
            capture::adopt(&client, "users", false).await.unwrap();
        }
        appliers.push(testkit::connect(&pg.conninfo("postgres")).await.unwrap());
        clients.push(client);
        servers.push(pg);
    }
    let mut streams = Vec::new();
    for origin in 1..=n {
        for peer in 1..=n {
            if origin != peer {
                let stream = ReplicationStream::new(origin, peer);
                stream
                    .ensure_slot(&clients[origin as usize - 1])
                    .await
                    .unwrap();
                streams.push(stream);
            }
        }
    }
    Streams {
        _dir: dir,
        servers,
        clients,
        appliers,
        streams,
    }
}

impl Streams {
    fn client(&self, node: u16) -> &Client {
        &self.clients[node as usize - 1]
    }

    /// Run every stream until a whole round moves nothing; the conflict
    /// results seen on the way.
    async fn sync(&mut self) -> Vec<(u16, Kind, Resolution)> {
        let mut conflicts = Vec::new();
        for _ in 0..20 {
            let mut moved = 0;
            for stream in &self.streams {
                let origin = &self.clients[stream.origin_node as usize - 1];
                let peer = &mut self.appliers[stream.peer_node as usize - 1];
                let report =
                    tokio::time::timeout(Duration::from_secs(30), step(stream, origin, peer))
                        .await
                        .expect("replication step hung")
                        .unwrap();
                moved += report.transactions;
                conflicts.extend(
                    report
                        .conflicts()
                        .filter_map(|c| Some((stream.peer_node, c.kind?, c.resolution))),
                );
            }
            if moved == 0 {
                return conflicts;
            }
        }
        panic!("replication did not settle");
    }

    /// Run one stream once; its conflict results.
    async fn step(&mut self, origin: u16, peer: u16) -> Vec<(Kind, Resolution)> {
        let stream = self
            .streams
            .iter()
            .find(|s| s.origin_node == origin && s.peer_node == peer)
            .unwrap();
        let report = step(
            stream,
            &self.clients[origin as usize - 1],
            &mut self.appliers[peer as usize - 1],
        )
        .await
        .unwrap();
        report
            .conflicts()
            .filter_map(|c| Some((c.kind?, c.resolution)))
            .collect()
    }

    /// The (kind, resolution) rows of a backend's conflict log.
    async fn conflict_log(&self, node: u16) -> Vec<(String, String)> {
        self.client(node)
            .query(
                "SELECT kind, resolution FROM chorus.conflict ORDER BY id",
                &[],
            )
            .await
            .unwrap()
            .iter()
            .map(|r| (r.get(0), r.get(1)))
            .collect()
    }

    /// An ordered hash of the users table on each backend.
    async fn hashes(&self) -> Vec<String> {
        let mut out = Vec::new();
        for client in &self.clients {
            let row = client
                .query_one(
                    "SELECT coalesce(md5(string_agg(u::text, ',' ORDER BY id)), 'empty') FROM users u",
                    &[],
                )
                .await
                .unwrap();
            out.push(row.get(0));
        }
        out
    }
}

/// Run SQL in one transaction stamped as the proxy stamps writes.
/// An HLC value of this moment: a stamp much older than its backend's
/// clock would be made newer (see `chorus.fresh_stamp`).
fn recent() -> u64 {
    let ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis();
    hlc::from_unix_millis(i64::try_from(ms).unwrap())
}

async fn stamped(client: &Client, hlc_value: u64, origin: u16, sql: &str) {
    client
        .batch_execute(&format!(
            "BEGIN; SELECT set_config('chorus.hlc', '{hlc_value}', true), \
             set_config('chorus.origin', '{origin}', true); {sql}; COMMIT;"
        ))
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn direct_writes_reach_every_backend() {
    let mut c = streams(3, &[USERS]).await;
    c.client(1)
        .batch_execute(
            "INSERT INTO users SELECT g, 'user ' || g FROM generate_series(1, 200) g;
             UPDATE users SET name = name || ' (edited)' WHERE id % 10 = 0;
             DELETE FROM users WHERE id % 7 = 0;",
        )
        .await
        .unwrap();
    c.client(3)
        .batch_execute(
            "INSERT INTO users SELECT g, 'from three' FROM generate_series(1001, 1050) g",
        )
        .await
        .unwrap();
    let conflicts = c.sync().await;
    assert!(conflicts.is_empty(), "{conflicts:?}");
    let hashes = c.hashes().await;
    assert!(hashes.iter().all(|h| h == &hashes[0]), "{hashes:?}");
    let n: i64 = c
        .client(2)
        .query_one("SELECT count(*) FROM users", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 200 - 28 + 50);
    // Applied changes were not captured again: node 2 emitted nothing.
    let applied_elsewhere: i64 = c
        .client(1)
        .query_one("SELECT count(*) FROM chorus.applied", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(applied_elsewhere, 1, "node 1 applied only node 3's changes");
}

#[tokio::test(flavor = "multi_thread")]
async fn the_talks_insert_insert_conflict_converges_to_the_higher_hlc() {
    let mut c = streams(3, &[USERS]).await;
    let now = recent();
    // "An" through node 1 and "Wim" through node 2, at the same moment;
    // Wim's HLC is one tick higher.
    stamped(c.client(1), now, 1, "INSERT INTO users VALUES (2574, 'An')").await;
    stamped(
        c.client(2),
        now + 1,
        2,
        "INSERT INTO users VALUES (2574, 'Wim')",
    )
    .await;
    let conflicts = c.sync().await;
    for node in 1..=3u16 {
        let name: String = c
            .client(node)
            .query_one("SELECT name FROM users WHERE id = 2574", &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(name, "Wim", "node {node}");
    }
    assert!(
        conflicts.contains(&(1, Kind::InsertInsert, Resolution::RemoteWins)),
        "{conflicts:?}"
    );
    assert!(
        conflicts.contains(&(2, Kind::InsertInsert, Resolution::LocalWins)),
        "{conflicts:?}"
    );
    // Node 1's conflict log shows the loser it replaced.
    let row = c
        .client(1)
        .query_one(
            "SELECT kind, resolution, local_row ->> 'name', remote_row ->> 'name' FROM chorus.conflict",
            &[],
        )
        .await
        .unwrap();
    let logged: (String, String, String, String) = (row.get(0), row.get(1), row.get(2), row.get(3));
    assert_eq!(
        logged,
        (
            "insert_insert".into(),
            "remote_wins".into(),
            "An".into(),
            "Wim".into()
        )
    );
    let hashes = c.hashes().await;
    assert!(hashes.iter().all(|h| h == &hashes[0]), "{hashes:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_delete_with_the_higher_version_leaves_a_tombstone_no_late_update_revives() {
    let mut c = streams(3, &[USERS]).await;
    let t = recent();
    stamped(c.client(1), t, 1, "INSERT INTO users VALUES (1, 'bike')").await;
    c.sync().await;
    // Concurrently: node 2 deletes (later HLC), node 3 updates (earlier HLC).
    stamped(c.client(2), t + 20, 2, "DELETE FROM users WHERE id = 1").await;
    stamped(
        c.client(3),
        t + 10,
        3,
        "UPDATE users SET name = 'late' WHERE id = 1",
    )
    .await;
    let conflicts = c.sync().await;
    for node in 1..=3u16 {
        let n: i64 = c
            .client(node)
            .query_one("SELECT count(*) FROM users", &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(
            n, 0,
            "node {node} still has the row; conflicts {conflicts:?}"
        );
    }
    assert!(
        conflicts
            .iter()
            .any(|(_, kind, _)| *kind == Kind::UpdateDelete),
        "{conflicts:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn columns_are_matched_by_name() {
    // Node 2's table has an extra column with a default; node 1's does not.
    let mut c = streams(
        2,
        &[
            USERS,
            "CREATE TABLE users (id bigint PRIMARY KEY, name text NOT NULL, status text DEFAULT 'new')",
        ],
    )
    .await;
    c.client(1)
        .batch_execute("INSERT INTO users VALUES (1, 'from one')")
        .await
        .unwrap();
    c.client(2)
        .batch_execute("INSERT INTO users VALUES (2, 'from two', 'active')")
        .await
        .unwrap();
    assert!(c.sync().await.is_empty());
    let status: String = c
        .client(2)
        .query_one("SELECT status FROM users WHERE id = 1", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(status, "new", "missing column takes its default");
    let name: String = c
        .client(1)
        .query_one("SELECT name FROM users WHERE id = 2", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(name, "from two", "extra column ignored");
}

/// A numeric of 1000 digits and `NaN`, through a stream's apply and
/// through reconciliation: every digit arrives.
#[tokio::test(flavor = "multi_thread")]
async fn numerics_keep_every_digit_through_apply_and_reconcile() {
    let mut c = streams(
        2,
        &[
            "CREATE TABLE users (id bigint PRIMARY KEY, name text NOT NULL); \
           CREATE TABLE measures (id int PRIMARY KEY, v numeric(1000, 500), f float8); \
           SELECT chorus.adopt('measures', false)",
        ],
    )
    .await;
    let digits = format!("{}.{}", "9".repeat(500), "1234567890".repeat(50));
    let tiny = format!("-0.{}1", "0".repeat(499));
    c.client(1)
        .execute(
            "INSERT INTO measures VALUES (1, $1::text::numeric, 'NaN'), (2, 'NaN', 'Infinity'), \
                                         (3, $2::text::numeric, 1e-300)",
            &[&digits, &tiny],
        )
        .await
        .unwrap();
    assert!(c.sync().await.is_empty());
    let rows = |rows: Vec<tokio_postgres::Row>| -> Vec<(i32, String, String)> {
        rows.iter()
            .map(|r| (r.get(0), r.get(1), r.get(2)))
            .collect()
    };
    let expected = vec![
        (1, digits.clone(), "NaN".to_owned()),
        (2, "NaN".to_owned(), "Infinity".to_owned()),
        (3, tiny.clone(), "1e-300".to_owned()),
    ];
    let sql = "SELECT id, v::text, f::text FROM measures ORDER BY id";
    for node in [1, 2] {
        assert_eq!(
            rows(c.client(node).query(sql, &[]).await.unwrap()),
            expected,
            "backend {node} after apply"
        );
    }

    // Written on backend 1 only (no stream runs): reconciliation copies it.
    let more = format!("{}.{}", "1234567890".repeat(50), "9".repeat(500));
    c.client(1)
        .execute(
            "UPDATE measures SET v = $1::text::numeric WHERE id = 1",
            &[&more],
        )
        .await
        .unwrap();
    c.client(1)
        .batch_execute("UPDATE measures SET v = 'NaN', f = '-Infinity' WHERE id = 3")
        .await
        .unwrap();
    let mut backends = Vec::new();
    for (i, pg) in c.servers.iter().enumerate() {
        backends.push((
            format!("b{}", i + 1),
            testkit::connect(&pg.conninfo("postgres")).await.unwrap(),
        ));
    }
    let report = chorus_proxy::cluster::reconcile::reconcile(&backends)
        .await
        .unwrap();
    assert_eq!(report.rows, 2, "{report:?}");
    let expected = vec![
        (1, more.clone(), "NaN".to_owned()),
        (2, "NaN".to_owned(), "Infinity".to_owned()),
        (3, "NaN".to_owned(), "-Infinity".to_owned()),
    ];
    for node in [1, 2] {
        assert_eq!(
            rows(c.client(node).query(sql, &[]).await.unwrap()),
            expected,
            "backend {node} after reconcile"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn rows_written_against_another_schema_never_stall_the_stream_and_are_logged() {
    // Backend 1 still has the old schema (a column `nick`, `age` as text);
    // on backend 2 `nick` was dropped and `age` became an integer.
    let mut c = streams(
        2,
        &[
            "CREATE TABLE users (id bigint PRIMARY KEY, name text NOT NULL, nick text, age text)",
            "CREATE TABLE users (id bigint PRIMARY KEY, name text NOT NULL, age int)",
        ],
    )
    .await;
    for sql in [
        "INSERT INTO users VALUES (1, 'An', 'annie', '42')",
        "INSERT INTO users VALUES (2, 'Wim', NULL, 'old')",
        "INSERT INTO users VALUES (3, 'Jo', NULL, '7')",
    ] {
        c.client(1).batch_execute(sql).await.unwrap();
    }
    let conflicts = c.sync().await;
    assert_eq!(
        conflicts,
        vec![(2, Kind::SchemaMismatch, Resolution::Skipped)],
        "{conflicts:?}"
    );
    let rows: Vec<(i64, String, Option<i32>)> = c
        .client(2)
        .query("SELECT id, name, age FROM users ORDER BY id", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    assert_eq!(
        rows,
        vec![
            (1, "An".to_owned(), Some(42)),
            (3, "Jo".to_owned(), Some(7))
        ]
    );
    // Neither the dropped column's value nor the row that did not fit is
    // lost silently: both are in the conflict log, with the row image.
    let logged: Vec<(String, String, String)> = c
        .client(2)
        .query(
            "SELECT kind, detail, remote_row ->> 'id' FROM chorus.conflict ORDER BY id",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    assert_eq!(logged.len(), 2, "{logged:?}");
    assert_eq!(
        logged[0],
        ("unknown_column".into(), "nick".into(), "1".into())
    );
    assert_eq!(logged[1].0, "schema_mismatch");
    assert!(
        logged[1]
            .1
            .contains("invalid input syntax for type integer"),
        "{logged:?}"
    );
    assert_eq!(logged[1].2, "2");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_transaction_too_large_for_one_statement_is_applied_in_parts() {
    // 120 000 changes in one transaction: more than one part of 50 000
    // holds, so it goes in three (a load like pgbench -i's, into a table
    // without a key yet). benches/ddl.sh loads 1 000 000 rows, over the
    // 256 MB that one statement's jsonb can hold.
    let mut c = streams(2, &[USERS]).await;
    for i in 1..=2 {
        c.client(i)
            .batch_execute("SET chorus.ddl_scope = 'local'; CREATE TABLE loaded (id bigint, note text); RESET chorus.ddl_scope")
            .await
            .unwrap();
        capture::adopt(c.client(i), "loaded", true).await.unwrap();
    }
    c.client(1)
        .batch_execute(
            "INSERT INTO loaded SELECT g, repeat('x', 100) || g FROM generate_series(1, 120000) g",
        )
        .await
        .unwrap();
    assert!(c.sync().await.is_empty());
    let summary = "SELECT count(*)::text || ':' || sum(length(note))::text FROM loaded";
    let one: String = c.client(1).query_one(summary, &[]).await.unwrap().get(0);
    let two: String = c.client(2).query_one(summary, &[]).await.unwrap().get(0);
    assert!(one.starts_with("120000:"), "{one}");
    assert_eq!(two, one);
    // The same with a primary key, then an update of every row, each in
    // one transaction: a lock per key (PostgreSQL's lock table holds some
    // thousands) is not taken.
    for i in 1..=2 {
        c.client(i)
            .batch_execute("SET chorus.ddl_scope = 'local'; CREATE TABLE keyed (id bigint PRIMARY KEY, note text); RESET chorus.ddl_scope")
            .await
            .unwrap();
        capture::adopt(c.client(i), "keyed", false).await.unwrap();
    }
    for sql in [
        "INSERT INTO keyed SELECT g, 'n' || g FROM generate_series(1, 120000) g",
        "UPDATE keyed SET note = note || '!'",
    ] {
        c.client(1).batch_execute(sql).await.unwrap();
    }
    assert!(c.sync().await.is_empty());
    let summary = "SELECT count(*)::text || ':' || sum(length(note))::text || ':' \
                   || count(*) FILTER (WHERE note LIKE '%!') FROM keyed";
    let one: String = c.client(1).query_one(summary, &[]).await.unwrap().get(0);
    let two: String = c.client(2).query_one(summary, &[]).await.unwrap().get(0);
    assert!(
        one.starts_with("120000:") && one.ends_with(":120000"),
        "{one}"
    );
    assert_eq!(two, one);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_large_transaction_into_a_table_emptied_and_vacuumed_is_applied_in_seconds() {
    // A table emptied and vacuumed on the peer: PostgreSQL then believes it
    // holds no rows (reltuples 0 over its pages) until it is analyzed
    // again, whatever it holds since. A large origin transaction is
    // applied in parts within one transaction, and the second part's
    // statements would join its 50 000 images with the first part's
    // 50 000 rows by scanning the images again for every row: minutes
    // (the sync gives each step 30 s). The apply analyzes such a table
    // first (chorus.refresh_estimate).
    let mut c = streams(2, &[USERS]).await;
    for i in 1..=2 {
        c.client(i)
            .batch_execute(
                "SET chorus.ddl_scope = 'local'; \
                 CREATE TABLE refilled (id bigint PRIMARY KEY, note text) WITH (vacuum_truncate = false); \
                 RESET chorus.ddl_scope",
            )
            .await
            .unwrap();
        capture::adopt(c.client(i), "refilled", false)
            .await
            .unwrap();
    }
    for sql in [
        "INSERT INTO refilled SELECT g, 'first' FROM generate_series(1, 20000) g",
        "DELETE FROM refilled",
    ] {
        c.client(1).batch_execute(sql).await.unwrap();
        assert!(c.sync().await.is_empty());
    }
    c.client(2).batch_execute("VACUUM refilled").await.unwrap();
    let believed: (f32, i32) = {
        let row = c
            .client(2)
            .query_one(
                "SELECT reltuples, relpages FROM pg_class WHERE oid = 'refilled'::regclass",
                &[],
            )
            .await
            .unwrap();
        (row.get(0), row.get(1))
    };
    assert!(
        believed.0 == 0.0 && believed.1 > 0,
        "the peer should believe the table empty over its pages: {believed:?}"
    );
    c.client(1)
        .batch_execute(
            "INSERT INTO refilled SELECT g, 'again ' || g FROM generate_series(1, 120000) g",
        )
        .await
        .unwrap();
    assert!(c.sync().await.is_empty());
    let summary = "SELECT count(*)::text || ':' || sum(length(note))::text FROM refilled";
    let one: String = c.client(1).query_one(summary, &[]).await.unwrap().get(0);
    let two: String = c.client(2).query_one(summary, &[]).await.unwrap().get(0);
    assert!(one.starts_with("120000:"), "{one}");
    assert_eq!(two, one);
}

#[tokio::test(flavor = "multi_thread")]
async fn redelivered_changes_are_applied_exactly_once() {
    let mut c = streams(2, &[USERS]).await;
    // A copy of the 1 -> 2 slot stands for a stream that applied a batch but
    // crashed before advancing its slot: it will deliver the batch again.
    c.client(1)
        .batch_execute("SELECT pg_copy_logical_replication_slot('chorus_1_to_2', 'replay')")
        .await
        .unwrap();
    c.client(1)
        .batch_execute("INSERT INTO users SELECT g, 'x' FROM generate_series(1, 50) g")
        .await
        .unwrap();
    c.client(1)
        .batch_execute("UPDATE users SET name = 'y' WHERE id <= 10")
        .await
        .unwrap();
    c.sync().await;
    let before = c.hashes().await;
    assert_eq!(before[0], before[1]);

    let replay = ReplicationStream {
        slot: "replay".to_owned(),
        ..ReplicationStream::new(1, 2)
    };
    let report = step(&replay, &c.clients[0], &mut c.appliers[1])
        .await
        .unwrap();
    assert_eq!(report.transactions, 0, "{report:?}");
    assert_eq!(report.duplicates, 2, "{report:?}");
    assert_eq!(c.hashes().await, before);
    let conflicts: i64 = c
        .client(2)
        .query_one("SELECT count(*) FROM chorus.conflict", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(conflicts, 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn tables_made_by_ddl_on_each_backend_are_adopted_and_changes_carry_the_ddl_index() {
    let mut c = streams(3, &[]).await;
    // What the DDL log applier does on every backend (proxy/src/ddl.rs):
    // run the statement and record it in chorus.ddl_history.
    let apply_ddl = |seq: i64, sql: &'static str| {
        format!(
            "BEGIN; {sql}; INSERT INTO chorus.ddl_history (seq, origin, search_path, role, command) \
             VALUES ({seq}, 1, 'public', 'postgres', {}); COMMIT",
            quote(sql)
        )
    };
    // As pgbench -i does: a table without a key, loaded, then given a key.
    for node in 1..=3u16 {
        c.client(node)
            .batch_execute(&apply_ddl(
                1,
                "CREATE TABLE accounts (aid int NOT NULL, abalance int, filler text)",
            ))
            .await
            .unwrap();
    }
    c.client(1)
        .batch_execute("INSERT INTO accounts SELECT g, 0, 'x' FROM generate_series(1, 100) g")
        .await
        .unwrap();
    assert!(c.sync().await.is_empty());
    for node in 1..=3u16 {
        for (seq, sql) in [
            (2, "ALTER TABLE accounts ADD PRIMARY KEY (aid)"),
            (
                3,
                "ALTER TABLE accounts ADD COLUMN status text DEFAULT 'open'",
            ),
        ] {
            c.client(node)
                .batch_execute(&apply_ddl(seq, sql))
                .await
                .unwrap();
        }
    }
    // A change made now carries DDL index 3 in its message prefix.
    c.client(2)
        .batch_execute("SELECT pg_create_logical_replication_slot('peek', 'test_decoding')")
        .await
        .unwrap();
    // Updates through another node replicate, without conflicts.
    c.client(2)
        .batch_execute(
            "UPDATE accounts SET abalance = abalance + 5, status = 'busy' WHERE aid <= 10",
        )
        .await
        .unwrap();
    let prefixes: Vec<String> = c
        .client(2)
        .query(
            "SELECT substring(data from 'prefix: ([^,]*),') FROM pg_logical_slot_get_changes('peek', NULL, NULL) \
             WHERE data LIKE 'message:%'",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(prefixes.len(), 10);
    assert!(prefixes.iter().all(|p| p == "chorus:3"), "{prefixes:?}");
    c.client(2)
        .batch_execute("SELECT pg_drop_replication_slot('peek')")
        .await
        .unwrap();
    let conflicts = c.sync().await;
    assert!(conflicts.is_empty(), "{conflicts:?}");
    let mut hashes = Vec::new();
    for node in 1..=3u16 {
        let row = c
            .client(node)
            .query_one(
                "SELECT md5(string_agg(a::text, ',' ORDER BY aid)), sum(abalance)::int8 FROM accounts a",
                &[],
            )
            .await
            .unwrap();
        assert_eq!(row.get::<_, i64>(1), 50, "node {node}");
        hashes.push(row.get::<_, String>(0));
        let adopted: bool = c
            .client(node)
            .query_one(
                "SELECT NOT keyless FROM chorus.replicated_table WHERE tbl = 'public.accounts'",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        assert!(adopted, "node {node} has accounts adopted with its key");
    }
    assert!(hashes.iter().all(|h| h == &hashes[0]), "{hashes:?}");

    // A table made under ddl_scope 'local' is not adopted.
    c.client(3)
        .batch_execute("SET chorus.ddl_scope = 'local'; CREATE TABLE scratch (id int PRIMARY KEY); RESET chorus.ddl_scope")
        .await
        .unwrap();
    let adopted: i64 = c
        .client(3)
        .query_one(
            "SELECT count(*) FROM chorus.replicated_table WHERE tbl = 'public.scratch'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(adopted, 0);
}

/// A SQL string literal.
fn quote(text: &str) -> String {
    format!("'{}'", text.replace('\'', "''"))
}

#[tokio::test(flavor = "multi_thread")]
async fn update_update_and_delete_delete_conflicts_are_logged_and_converge() {
    let mut c = streams(2, &[USERS]).await;
    let t = recent();
    stamped(
        c.client(1),
        t,
        1,
        "INSERT INTO users VALUES (1, 'a'), (2, 'b')",
    )
    .await;
    c.sync().await;
    // Concurrent updates of row 1; node 2's is later.
    stamped(
        c.client(1),
        t + 10,
        1,
        "UPDATE users SET name = 'one' WHERE id = 1",
    )
    .await;
    stamped(
        c.client(2),
        t + 20,
        2,
        "UPDATE users SET name = 'two' WHERE id = 1",
    )
    .await;
    // Concurrent deletes of row 2.
    stamped(c.client(1), t + 30, 1, "DELETE FROM users WHERE id = 2").await;
    stamped(c.client(2), t + 40, 2, "DELETE FROM users WHERE id = 2").await;
    c.sync().await;
    let hashes = c.hashes().await;
    assert_eq!(hashes[0], hashes[1]);
    let name: String = c
        .client(1)
        .query_one("SELECT name FROM users WHERE id = 1", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(name, "two");
    let on_one = c.conflict_log(1).await;
    let on_two = c.conflict_log(2).await;
    assert!(
        on_one.contains(&("update_update".into(), "remote_wins".into())),
        "{on_one:?}"
    );
    assert!(
        on_two.contains(&("update_update".into(), "local_wins".into())),
        "{on_two:?}"
    );
    assert!(
        on_one.iter().any(|(k, _)| k == "delete_delete"),
        "{on_one:?}"
    );
    assert!(
        on_two.iter().any(|(k, _)| k == "delete_delete"),
        "{on_two:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn an_update_that_overtakes_its_insert_recreates_the_row() {
    let mut c = streams(3, &[USERS]).await;
    let t = recent();
    stamped(c.client(1), t, 1, "INSERT INTO users VALUES (7, 'new')").await;
    c.step(1, 2).await;
    stamped(
        c.client(2),
        t + 10,
        2,
        "UPDATE users SET name = 'edited' WHERE id = 7",
    )
    .await;
    // Node 3 hears of the update (from node 2) before the insert (from node 1).
    let first = c.step(2, 3).await;
    assert_eq!(first, vec![(Kind::UpdateMissing, Resolution::RemoteWins)]);
    let second = c.step(1, 3).await;
    assert_eq!(second, vec![(Kind::InsertInsert, Resolution::LocalWins)]);
    c.sync().await;
    let hashes = c.hashes().await;
    assert!(hashes.iter().all(|h| h == &hashes[0]), "{hashes:?}");
    let name: String = c
        .client(3)
        .query_one("SELECT name FROM users WHERE id = 7", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(name, "edited");
}

#[tokio::test(flavor = "multi_thread")]
async fn an_apply_waits_for_an_uncommitted_local_write_of_the_same_key() {
    let mut c = streams(2, &[USERS]).await;
    let t = recent();
    // A lower version for key 5 arrives from node 1...
    stamped(
        c.client(1),
        t,
        1,
        "INSERT INTO users VALUES (5, 'remote, older')",
    )
    .await;
    // ...while node 2 is inserting key 5 with a higher version, uncommitted.
    let local = testkit::connect(&c.servers[1].conninfo("postgres"))
        .await
        .unwrap();
    local
        .batch_execute(&format!(
            "BEGIN; SELECT set_config('chorus.hlc', '{}', true); \
             INSERT INTO users VALUES (5, 'local, newer')",
            t + 100
        ))
        .await
        .unwrap();
    let stream = c
        .streams
        .iter()
        .find(|s| s.origin_node == 1 && s.peer_node == 2)
        .unwrap()
        .clone();
    let origin = testkit::connect(&c.servers[0].conninfo("postgres"))
        .await
        .unwrap();
    let mut peer = testkit::connect(&c.servers[1].conninfo("postgres"))
        .await
        .unwrap();
    let apply = tokio::spawn(async move { step(&stream, &origin, &mut peer).await });
    // Commit once the apply waits for the local transaction's lock (or, if
    // it went another way, has finished).
    let watcher = testkit::connect(&c.servers[1].conninfo("postgres"))
        .await
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let waiting: i64 = watcher
            .query_one(
                "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        if waiting > 0 || apply.is_finished() {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the apply neither waited nor ended"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    local.batch_execute("COMMIT").await.unwrap();
    // The apply either waited for the commit or lost a deadlock and is
    // retried by the next step; either way the newer local row stays.
    let _ = tokio::time::timeout(Duration::from_secs(30), apply)
        .await
        .unwrap();
    c.sync().await;
    for node in 1..=2u16 {
        let name: String = c
            .client(node)
            .query_one("SELECT name FROM users WHERE id = 5", &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(name, "local, newer", "node {node}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_driver_older_than_the_last_one_a_peer_saw_is_refused() {
    let mut c = streams(2, &[USERS]).await;
    // A stale driver's view of the origin: a copy of the slot.
    c.client(1)
        .batch_execute("SELECT pg_copy_logical_replication_slot('chorus_1_to_2', 'stale')")
        .await
        .unwrap();
    c.client(1)
        .batch_execute("INSERT INTO users SELECT g, 'x' FROM generate_series(1, 20) g")
        .await
        .unwrap();
    // The driver of epoch 2 applies.
    let current = ReplicationStream {
        epoch: 2,
        ..ReplicationStream::new(1, 2)
    };
    let report = step(&current, &c.clients[0], &mut c.appliers[1])
        .await
        .unwrap();
    assert_eq!(report.transactions, 1, "{report:?}");
    c.client(1)
        .batch_execute("UPDATE users SET name = 'y' WHERE id <= 5")
        .await
        .unwrap();
    // The driver of epoch 1 (a node that froze and came back) is refused,
    // with changes the peer has and with ones it has not.
    let stale = ReplicationStream {
        slot: "stale".to_owned(),
        epoch: 1,
        ..ReplicationStream::new(1, 2)
    };
    let refused = step(&stale, &c.clients[0], &mut c.appliers[1]).await;
    assert!(
        matches!(refused, Err(ReplicationError::Fenced(_))),
        "{refused:?}"
    );
    let updated: i64 = c
        .client(2)
        .query_one("SELECT count(*) FROM users WHERE name = 'y'", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(updated, 0, "the stale driver applied");
    // The current driver goes on.
    step(&current, &c.clients[0], &mut c.appliers[1])
        .await
        .unwrap();
    let hashes = c.hashes().await;
    assert_eq!(hashes[0], hashes[1]);
}
