//! A fourth backend and node join a running three-node cluster while the
//! cluster takes writes: the backend announced on the admin console (`ADD
//! BACKEND`), taken into each node's configuration with `RELOAD` (no node
//! restarts: the clients' sessions stay all along), its node started and
//! added to Raft, then the backend copied from a peer (`JOIN <backend>
//! FROM <source>`) under `pgbench -N` through the three nodes, an ordinary
//! role's inserts, and a large transaction that commits during the copy.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chorus_testkit as testkit;
use chorus_testkit::procs;

/// What one writer did: inserts acknowledged (their ids kept in the
/// shared set), inserts that failed (their outcome unknown), and the
/// sessions it needed.
#[derive(Debug, Default)]
struct Written {
    acked: u64,
    failed: u64,
    sessions: u64,
}

/// Insert through the node at `port` (into `database`) until `stop`,
/// connecting again, after a pause, whenever the session ends. Each
/// acknowledged id goes to `acked`.
async fn write_until(
    port: u16,
    database: &'static str,
    node: i32,
    acked: Arc<Mutex<BTreeSet<i64>>>,
    stop: Arc<AtomicBool>,
) -> Written {
    // (Into the second database as its owner, an ordinary role.)
    let (user, sql) = if database == "shop" {
        ("app", "INSERT INTO orders (via) VALUES ($1) RETURNING id")
    } else {
        (
            "postgres",
            "INSERT INTO acked (via) VALUES ($1) RETURNING id",
        )
    };
    let conninfo = format!("host=127.0.0.1 port={port} user={user} dbname={database}");
    let mut written = Written::default();
    while !stop.load(Ordering::Relaxed) {
        let Ok(client) = testkit::connect(&conninfo).await else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        written.sessions += 1;
        while !stop.load(Ordering::Relaxed) {
            match client.query_one(sql, &[&node]).await {
                Ok(row) => {
                    acked.lock().unwrap().insert(row.get(0));
                    written.acked += 1;
                }
                Err(_) => {
                    written.failed += 1;
                    break;
                }
            }
        }
        // (Whatever ended the session, the next try waits a little: a loop
        // of instant failures would hold the runtime.)
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    written
}

/// Run a console command that goes through Raft, again while the
/// cluster answers that no majority confirmed it in time (as its hint
/// says to; a loaded machine), for at most 60 s.
async fn cluster_command(console: &tokio_postgres::Client, sql: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        match console.simple_query(sql).await {
            Ok(_) => return,
            Err(e)
                if procs::message(&e).contains("no Raft majority") && Instant::now() < deadline =>
            {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => panic!("{sql}: {}", procs::message(&e)),
        }
    }
}

/// Rows in the large transaction that races the copy.
const BIG_ROWS: i32 = 100_000;

/// The `copying` column of backend 4 in a `SHOW BACKENDS` answer.
fn copy_step(rows: &[tokio_postgres::SimpleQueryMessage]) -> Option<String> {
    rows.iter().find_map(|m| match m {
        tokio_postgres::SimpleQueryMessage::Row(row) if row.get("name") == Some("pg4") => {
            row.get("copying").map(str::to_owned)
        }
        _ => None,
    })
}

/// Wait (bounded) until `count` is at least `n`.
async fn wait_count(what: &str, count: impl Fn() -> usize, n: usize) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while count() < n {
        assert!(
            Instant::now() < deadline,
            "{what}: {} of {n} after 60 s",
            count()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The ids `sql` gives in `database` on backend `b`, read directly.
async fn ids_on(c: &procs::Cluster, b: usize, database: &str, sql: &str) -> BTreeSet<i64> {
    c.direct_db(b, database)
        .await
        .query(sql, &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
}

/// The same value of `sql` in `database` on all four backends (bounded
/// wait); the value.
async fn everywhere(c: &procs::Cluster, database: &str, sql: &str) -> String {
    c.agree(database, sql, None).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_backend_and_node_join_under_writes_with_every_acknowledged_write() {
    // Four backends, three of them in the cluster; backend 4 is a fresh
    // `initdb`, and node 4 is not a member yet.
    let mut c = procs::cluster_opts(procs::Options {
        nodes: 4,
        start: vec![1, 2, 3],
        omit: vec![4],
        members: vec![1, 2, 3],
        node_extra: "admin_users = [\"postgres\"]".into(),
        replication: "replicate_created_databases = true".into(),
        ..procs::Options::default()
    })
    .await;

    // An application role with a password, owning a second replicated
    // database that only it (and superusers) may connect to, made through
    // Chorus; pgbench's tables and two global sequences in the first.
    c.exec(
        1,
        "CREATE ROLE app LOGIN PASSWORD 'app-secret' CONNECTION LIMIT 50; \
         CREATE ROLE readers NOLOGIN; GRANT readers TO app; \
         ALTER ROLE app SET statement_timeout = '5min'",
    )
    .await;
    c.exec(1, "CREATE DATABASE shop OWNER app").await;
    c.exec(
        1,
        "REVOKE CONNECT, TEMPORARY ON DATABASE shop FROM PUBLIC; \
         GRANT CONNECT ON DATABASE shop TO app",
    )
    .await;
    c.via_db(2, "shop")
        .await
        .batch_execute(
            "BEGIN; CREATE TABLE orders (id bigserial PRIMARY KEY, via int NOT NULL); \
             ALTER TABLE orders OWNER TO app; \
             INSERT INTO orders (via) SELECT 0 FROM generate_series(1, 1000); COMMIT",
        )
        .await
        .unwrap();
    let init = testkit::pgbench(c.ports[0], &["-i", "-s", "1", "-q"]);
    assert!(init.status.success(), "{}", testkit::stderr(&init));
    c.exec(
        1,
        "CREATE TABLE acked (id bigserial PRIMARY KEY, via int NOT NULL); \
         CREATE TABLE small (id serial PRIMARY KEY, via int); \
         CREATE TABLE big (id int PRIMARY KEY, v int NOT NULL)",
    )
    .await;
    for b in 1..=3 {
        c.wait_for(b, "SELECT count(*)::text FROM pgbench_accounts", |v| {
            v == "100000"
        })
        .await;
        c.wait_for(b, "SELECT to_regclass('small')::text", |v| v == "small")
            .await;
    }

    // Writes through every node, all along.
    let acked: Arc<Mutex<BTreeSet<i64>>> = Arc::default();
    let orders: Arc<Mutex<BTreeSet<i64>>> = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let mut writers = Vec::new();
    for node in 1..=3 {
        writers.push(tokio::spawn(write_until(
            c.ports[node - 1],
            "postgres",
            node as i32,
            acked.clone(),
            stop.clone(),
        )));
    }
    writers.push(tokio::spawn(write_until(
        c.ports[2],
        "shop",
        3,
        orders.clone(),
        stop.clone(),
    )));
    wait_count("acknowledged inserts", || acked.lock().unwrap().len(), 200).await;

    // 1. The cluster expects backend 4.
    let console = c.via_db(1, "chorus").await;
    let refused = console.simple_query("ADD BACKEND pg1").await.unwrap_err();
    assert_eq!(testkit::sqlstate(&refused).as_deref(), Some("42710"));
    // (A name announced by mistake is forgotten again.)
    for sql in ["ADD BACKEND pg9", "DROP BACKEND pg9"] {
        cluster_command(&console, sql).await;
    }
    for (sql, code) in [("DROP BACKEND pg9", "42704"), ("DROP BACKEND pg1", "55000")] {
        let refused = console.simple_query(sql).await.unwrap_err();
        assert_eq!(testkit::sqlstate(&refused).as_deref(), Some(code), "{sql}");
    }
    // (A backend the cluster has not announced is refused by RELOAD.)
    c.omitted.clear();
    c.write_config(1, "cluster-secret");
    let refused = console.simple_query("RELOAD").await.unwrap_err();
    assert_eq!(testkit::sqlstate(&refused).as_deref(), Some("F0000"));
    assert!(
        procs::message(&refused).contains("ADD BACKEND pg4"),
        "{}",
        procs::message(&refused)
    );
    cluster_command(&console, "ADD BACKEND pg4").await;
    drop(console);

    // 2. Each node takes backend 4 into its configuration with RELOAD,
    // without a restart; node 4 starts (its home: backend 4) and is added
    // to Raft. Until the copy, no session goes to backend 4.
    let knows_four = |rows: &[tokio_postgres::SimpleQueryMessage]| {
        rows.iter().any(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(row) => row.get(0) == Some("pg4"),
            _ => false,
        })
    };
    for i in 1..=3 {
        c.write_config(i, "cluster-secret");
        let console = c.via_db(i, "chorus").await;
        assert!(!knows_four(
            &console.simple_query("SHOW BACKENDS").await.unwrap()
        ));
        console.simple_query("RELOAD").await.unwrap();
        assert!(
            knows_four(&console.simple_query("SHOW BACKENDS").await.unwrap()),
            "node {i} knows backend 4 after RELOAD"
        );
        // (It takes no session there until copied.)
        assert_eq!(
            c.metric(i, "chorus_backend_copying{backend=\"pg4\"}").await,
            Some(1.0),
            "node {i}"
        );
        // (Known to a node, the name can no longer be dropped.)
        let refused = console.simple_query("DROP BACKEND pg4").await.unwrap_err();
        assert_eq!(testkit::sqlstate(&refused).as_deref(), Some("55000"));
    }
    c.start_node(4);
    let relay4 = format!("127.0.0.1:{}", c.relays[3].port);
    let added = c.chorus(1, &["cluster", "add-node", "--id", "4", "--raft", &relay4]);
    assert!(added.contains("voter"), "{added}");
    // Node 1 shows node 4 (from the Raft log, not its configuration), its
    // home backend waiting for its copy.
    let console1 = c.via_db(1, "chorus").await;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let shown = console1.simple_query("SHOW NODES").await.unwrap();
        let four = shown.iter().find_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(row) if row.get("id") == Some("4") => Some((
                row.get("home_backend").map(str::to_owned),
                row.get("copying").map(str::to_owned),
            )),
            _ => None,
        });
        if four == Some((Some("pg4".into()), Some("true".into()))) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "node 4 in node 1's SHOW NODES: {four:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    drop(console1);
    let four_port: i32 = c
        .direct(4)
        .await
        .query_one("SELECT inet_server_port()", &[])
        .await
        .unwrap()
        .get(0);
    let through_four = c.via(4).await;
    let served_by: i32 = through_four
        .query_one("SELECT inet_server_port()", &[])
        .await
        .unwrap()
        .get(0);
    assert_ne!(
        served_by, four_port,
        "a session went to the backend not yet copied"
    );
    drop(through_four);
    let before = acked.lock().unwrap().len();
    wait_count(
        "inserts after the reloads",
        || acked.lock().unwrap().len(),
        before + 100,
    )
    .await;

    // 3. The copy, from backend 1, while the writes go on.
    let console = c.via_db(2, "chorus").await;
    // A first JOIN fails half-way (the new backend is down once the slots
    // into it are made again): it stays out, and a second one completes.
    c.backends[3].stop();
    let deadline = Instant::now() + Duration::from_secs(60);
    let failed = loop {
        match console.simple_query("JOIN pg4 FROM pg1").await {
            Ok(_) => panic!("JOIN completed with its target down"),
            // Node 4 registers its home backend shortly after it is added.
            Err(e)
                if testkit::sqlstate(&e).as_deref() == Some("55000")
                    && procs::message(&e).contains("must have joined")
                    && Instant::now() < deadline =>
            {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => break e,
        }
    };
    assert_eq!(
        testkit::sqlstate(&failed).as_deref(),
        Some("58000"),
        "{}",
        procs::message(&failed)
    );
    c.backends[3].start().unwrap();
    // pgbench through the three nodes all through the copy.
    let loads: Vec<_> = c.ports[..3]
        .iter()
        .map(|&port| {
            std::thread::spawn(move || {
                testkit::pgbench(port, &["-n", "-N", "-c", "2", "-j", "1", "-T", "30"])
            })
        })
        .collect();
    // A large transaction through node 3, open when the copy begins and
    // committed while it runs (the copy's slot on backend 3 waits for it).
    let big = c.via(3).await;
    big.batch_execute(&format!(
        "BEGIN; INSERT INTO big SELECT g, g FROM generate_series(1, {BIG_ROWS}) g"
    ))
    .await
    .unwrap();
    // (The second through the command line, as an operator would.)
    let started = Instant::now();
    let mut joining = tokio::process::Command::new(testkit::chorus_bin())
        .args(["join", "--backend", "pg4", "--from", "pg1", "--config"])
        .arg(c.dir.path().join("node2.toml"))
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let console2 = c.via_db(2, "chorus").await;
    let deadline = Instant::now() + Duration::from_secs(60);
    let step = loop {
        let shown = console2.simple_query("SHOW BACKENDS").await.unwrap();
        // (`true` until node 2 names a step of its own.)
        if let Some(step) = copy_step(&shown).filter(|s| s != "true") {
            break step;
        }
        // (A join that ended before its copy began says why.)
        if joining.try_wait().unwrap().is_some() {
            let ended = joining.wait_with_output().await.unwrap();
            panic!(
                "chorus join ended ({}) before the copy began: {}{}",
                ended.status,
                String::from_utf8_lossy(&ended.stdout),
                String::from_utf8_lossy(&ended.stderr)
            );
        }
        assert!(Instant::now() < deadline, "the copy did not begin in 60 s");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    eprintln!("committing {BIG_ROWS} rows during the copy's step: {step}");
    big.batch_execute("COMMIT").await.unwrap();
    drop(big);
    let joined = joining.wait_with_output().await.unwrap();
    let took = started.elapsed();
    let told = String::from_utf8_lossy(&joined.stdout).into_owned();
    assert!(
        joined.status.success(),
        "chorus join: {told}{}",
        String::from_utf8_lossy(&joined.stderr)
    );
    eprintln!("JOIN took {:.1} s", took.as_secs_f64());
    assert_eq!(
        c.metric(2, "chorus_backend_copy_progress{backend=\"pg4\"}")
            .await,
        Some(1.0),
        "node 2, which copied, says the copy is whole"
    );
    assert!(
        told.lines()
            .any(|n| n.contains("roles made:") && n.contains(" app") && n.contains(" readers")),
        "{told}"
    );
    assert!(
        told.lines().any(|n| n.contains("2 database(s) copied")),
        "{told}"
    );

    // Writes go on through node 4 too, on its own backend now.
    writers.push(tokio::spawn(write_until(
        c.ports[3],
        "postgres",
        4,
        acked.clone(),
        stop.clone(),
    )));
    // (Node 4 follows the copy's end once it has applied it.)
    let c4 = &c;
    testkit::eventually(
        "node 4's new sessions on backend 4",
        Duration::from_secs(30),
        Duration::from_millis(50),
        || async move {
            let served_by: i32 = c4
                .via(4)
                .await
                .query_one("SELECT inet_server_port()", &[])
                .await
                .unwrap()
                .get(0);
            served_by == four_port
        },
    )
    .await;
    let before = acked.lock().unwrap().len();
    wait_count(
        "inserts after the copy",
        || acked.lock().unwrap().len(),
        before + 300,
    )
    .await;
    stop.store(true, Ordering::Relaxed);
    // No client waited or was disturbed: each writer kept its one session
    // from before ADD BACKEND to the end, and no insert failed.
    for writer in writers {
        let written = writer.await.unwrap();
        assert!(written.acked > 0, "a writer wrote nothing: {written:?}");
        assert_eq!(
            (written.failed, written.sessions),
            (0, 1),
            "a writer's session was disturbed: {written:?}"
        );
    }
    for load in loads {
        let out = load.join().unwrap();
        let report = testkit::stdout(&out);
        assert!(out.status.success(), "{report}{}", testkit::stderr(&out));
        assert!(
            report.contains("number of failed transactions: 0 "),
            "{report}"
        );
    }

    // Every backend identical; every acknowledged insert there once, and
    // nothing else.
    let acked = acked.lock().unwrap().clone();
    let orders = orders.lock().unwrap().clone();
    everywhere(
        &c,
        "postgres",
        "SELECT md5(string_agg(id::text, ',' ORDER BY id)) FROM acked",
    )
    .await;
    let stored = ids_on(&c, 4, "postgres", "SELECT id FROM acked").await;
    assert!(
        stored.is_superset(&acked),
        "lost: {:?}",
        acked.difference(&stored).take(10).collect::<Vec<_>>()
    );
    assert_eq!(
        stored.len(),
        acked.len(),
        "rows on backend 4 that no insert acknowledged"
    );
    let stored_orders = ids_on(&c, 4, "shop", "SELECT id FROM orders WHERE via <> 0").await;
    assert!(
        stored_orders.is_superset(&orders),
        "orders lost on backend 4"
    );
    for sql in [
        "SELECT md5(string_agg(a::text, ',' ORDER BY aid)) FROM pgbench_accounts a",
        "SELECT md5(string_agg(b::text, ',' ORDER BY bid)) FROM pgbench_branches b",
        "SELECT md5(string_agg(t::text, ',' ORDER BY tid)) FROM pgbench_tellers t",
        "SELECT count(*)::text FROM pgbench_history",
        "SELECT count(*)::text FROM pgbench_accounts",
    ] {
        everywhere(&c, "postgres", sql).await;
    }
    everywhere(
        &c,
        "shop",
        "SELECT md5(string_agg(o::text, ',' ORDER BY id)) FROM orders o",
    )
    .await;
    assert_eq!(
        everywhere(&c, "postgres", "SELECT count(*)::text FROM big").await,
        BIG_ROWS.to_string()
    );

    // Backend 4 has the roles, with their password, settings and
    // membership, and the database's grants.
    let role = "SELECT rolconnlimit || ' ' || array_to_string(rolconfig, ',') || ' ' || \
                pg_has_role('app', 'readers', 'MEMBER') FROM pg_roles WHERE rolname = 'app'";
    assert_eq!(
        everywhere(&c, "postgres", role).await,
        "50 statement_timeout=5min true"
    );
    let password = "SELECT rolpassword FROM pg_authid WHERE rolname = 'app'";
    let hash = |b: usize| {
        let c = &c;
        async move {
            c.direct(b)
                .await
                .query_one(password, &[])
                .await
                .unwrap()
                .get::<_, Option<String>>(0)
        }
    };
    assert!(hash(4).await.is_some());
    assert_eq!(
        hash(4).await,
        hash(1).await,
        "backend 4 has the password of its source"
    );
    let access = "SELECT has_database_privilege('app', 'shop', 'CONNECT')::text || ' ' || \
                  has_database_privilege('readers', 'shop', 'CONNECT')::text || ' ' || \
                  (SELECT pg_get_userbyid(datdba) FROM pg_database WHERE datname = 'shop')";
    assert_eq!(everywhere(&c, "postgres", access).await, "true false app");

    // Backend 4 hands out values of its own: its node's sequence id in its
    // snowflake ids, a galloc range no other backend has; and it streams
    // to every peer and every peer to it.
    let four = c.direct(4).await;
    let sequence_id: i32 = four
        .query_one("SELECT sequence_id FROM chorus.local", &[])
        .await
        .unwrap()
        .get(0);
    let own: i64 = four
        .query_one("SELECT nextval('acked_id_seq') & 1023", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(own, i64::from(sequence_id));
    let mut ids = BTreeSet::new();
    let mut ranges = BTreeSet::new();
    for b in 1..=4 {
        let client = c.direct(b).await;
        ids.insert(
            client
                .query_one("SELECT sequence_id FROM chorus.local", &[])
                .await
                .unwrap()
                .get::<_, i32>(0),
        );
        // (Each backend's galloc range, once it has handed out a value.)
        client
            .batch_execute("SELECT nextval('small_id_seq')")
            .await
            .unwrap();
        ranges.insert(
            client
                .query_one(
                    "SELECT range_lo FROM chorus.global_sequence WHERE seq = 'public.small_id_seq'",
                    &[],
                )
                .await
                .unwrap()
                .get::<_, Option<i64>>(0),
        );
    }
    assert_eq!(ids.len(), 4, "sequence ids {ids:?}");
    assert_eq!(ranges.len(), 4, "galloc ranges {ranges:?}");
    let slots = "SELECT string_agg(slot_name, ',' ORDER BY slot_name) FROM pg_replication_slots \
                 WHERE database = 'postgres'";
    let mut expected = Vec::new();
    for b in 1..=4 {
        let names: Vec<String> = (1..=4)
            .filter(|&p| p != b)
            .map(|p| format!("chorus_{b}_to_pg{p}"))
            .collect();
        expected.push(names.join(","));
    }
    for b in 1..=4 {
        c.wait_for(b, slots, |v| v == expected[b - 1]).await;
    }
}
