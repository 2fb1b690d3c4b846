//! `REJOIN <backend> FROM <source>` on the admin console: a backend that
//! lost its place (a slot to it dropped, rows changed around Chorus) is
//! copied again while every node takes writes.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chorus_testkit as testkit;
use chorus_testkit::procs;

/// The same value of `sql` on every backend (bounded wait); the value.
async fn same_everywhere(c: &procs::Cluster, sql: &str) -> String {
    c.converge(sql, 1, &[2, 3]).await;
    c.direct(1)
        .await
        .query_one(sql, &[])
        .await
        .unwrap()
        .get::<_, Option<String>>(0)
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_copied_again_under_writes_ends_identical_with_every_acknowledged_write() {
    let c = procs::cluster_opts(procs::Options {
        node_extra: "admin_users = [\"postgres\"]".into(),
        replication: "replicate_created_databases = true".into(),
        ..procs::Options::default()
    })
    .await;
    // A second replicated database, made through Chorus, with rows.
    c.exec(1, "CREATE DATABASE shop").await;
    let shop = c.via_db(2, "shop").await;
    shop.batch_execute(
        "BEGIN; CREATE TABLE orders (id bigserial PRIMARY KEY, item text); \
         INSERT INTO orders (item) SELECT 'before ' || g FROM generate_series(1, 1000) g; COMMIT",
    )
    .await
    .unwrap();
    c.agree("shop", "SELECT count(*)::text FROM orders", Some("1000"))
        .await;
    let init = testkit::pgbench(c.ports[0], &["-i", "-s", "1", "-q"]);
    assert!(init.status.success(), "{}", testkit::stderr(&init));
    // A snowflake (bigint) and a galloc (int) global sequence.
    c.exec(
        1,
        "CREATE TABLE acked (id bigserial PRIMARY KEY, via int NOT NULL); \
         CREATE TABLE small (id serial PRIMARY KEY, via int NOT NULL)",
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

    // Backend 3 loses its place: rows changed there around Chorus, and
    // the slot that streams backend 1 to it gone (as when a slot is
    // invalidated: its driver makes it again, later).
    let three = c.direct(3).await;
    three
        .batch_execute(
            "SET session_replication_role = replica; \
             DELETE FROM pgbench_accounts WHERE aid <= 500; \
             UPDATE pgbench_branches SET bbalance = bbalance + 1",
        )
        .await
        .unwrap();
    drop(three);
    c.direct_db(3, "shop")
        .await
        .batch_execute(
            "SET session_replication_role = replica; DELETE FROM orders WHERE id % 2 = 0",
        )
        .await
        .unwrap();
    let one = c.direct(1).await;
    one.batch_execute(
        "SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots \
          WHERE slot_name = 'chorus_1_to_pg3' AND active_pid IS NOT NULL",
    )
    .await
    .unwrap();
    testkit::eventually(
        "the slot from backend 1 to backend 3 is dropped",
        Duration::from_secs(30),
        Duration::from_millis(20),
        || async {
            one.batch_execute(
                "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots \
                  WHERE slot_name = 'chorus_1_to_pg3' AND NOT active",
            )
            .await
            .is_ok()
                && one
                    .query_one(
                        "SELECT count(*) FROM pg_replication_slots WHERE slot_name = 'chorus_1_to_pg3'",
                        &[],
                    )
                    .await
                    .unwrap()
                    .get::<_, i64>(0)
                    == 0
        },
    )
    .await;

    drop(one);

    // Writes through every node all along: pgbench, and inserts whose
    // acknowledged ids are kept.
    let loads: Vec<_> = c
        .ports
        .iter()
        .map(|&port| {
            std::thread::spawn(move || {
                testkit::pgbench(port, &["-n", "-N", "-c", "2", "-j", "1", "-T", "25"])
            })
        })
        .collect();
    let acked: Arc<Mutex<BTreeSet<i64>>> = Arc::default();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut writers = Vec::new();
    for node in 1..=3 {
        let client = c.via(node).await;
        let (acked, stop) = (acked.clone(), stop.clone());
        writers.push(tokio::spawn(async move {
            let mut failed = Vec::new();
            let mut n = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                match client
                    .query_one(
                        "WITH a AS (INSERT INTO acked (via) VALUES ($1) RETURNING id), \
                              s AS (INSERT INTO small (via) VALUES ($1)) SELECT id FROM a",
                        &[&(node as i32)],
                    )
                    .await
                {
                    Ok(row) => {
                        acked.lock().unwrap().insert(row.get(0));
                        n += 1;
                    }
                    // (Stops at the first: a loop of instant errors would
                    // never yield, and hold the runtime when the test fails.)
                    Err(e) => {
                        failed.push(e.to_string());
                        break;
                    }
                }
            }
            (failed, n, false)
        }));
    }
    {
        let stop = stop.clone();
        writers.push(tokio::spawn(async move {
            let mut failed = Vec::new();
            let mut n = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                match shop
                    .execute("INSERT INTO orders (item) VALUES ('during')", &[])
                    .await
                {
                    Ok(_) => n += 1,
                    Err(e) => {
                        failed.push(e.to_string());
                        break;
                    }
                }
            }
            (failed, n, true)
        }));
    }
    // Some writes before the copy.
    let deadline = Instant::now() + Duration::from_secs(30);
    while acked.lock().unwrap().len() < 200 {
        assert!(Instant::now() < deadline, "the writers make no progress");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let (console, notices) = testkit::connect_hearing_notices(&format!(
        "host=127.0.0.1 port={} user=postgres dbname=chorus",
        c.ports[1]
    ))
    .await;
    let refused = console
        .simple_query("REJOIN pg3 FROM pg3")
        .await
        .unwrap_err();
    assert_eq!(testkit::sqlstate(&refused).as_deref(), Some("22023"));
    let refused = console
        .simple_query("REJOIN nosuch FROM pg1")
        .await
        .unwrap_err();
    assert_eq!(testkit::sqlstate(&refused).as_deref(), Some("42704"));
    console
        .simple_query("REJOIN pg3 FROM pg1")
        .await
        .unwrap_or_else(|e| panic!("REJOIN: {}", procs::message(&e)));
    let told: Vec<String> = notices.lock().unwrap().clone();
    assert!(
        told.iter().any(|n| n.contains("copying from pg1")),
        "{told:?}"
    );
    assert!(
        told.iter().any(|n| n.contains("2 database(s) copied")),
        "{told:?}"
    );

    // Writes go on after the copy, through node 3 on its home backend too.
    let before = acked.lock().unwrap().len();
    let deadline = Instant::now() + Duration::from_secs(30);
    while acked.lock().unwrap().len() < before + 300 {
        assert!(Instant::now() < deadline, "the writers make no progress");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut shop_orders = 1000;
    for writer in writers {
        let (failed, n, in_shop) = writer.await.unwrap();
        if in_shop {
            shop_orders += n;
        }
        assert!(failed.is_empty(), "writes failed: {failed:?}");
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
    let on_three: i32 = c
        .direct(3)
        .await
        .query_one("SELECT inet_server_port()", &[])
        .await
        .unwrap()
        .get(0);
    let through_three = c.via(3).await;
    assert_eq!(
        through_three
            .query_one("SELECT inet_server_port()", &[])
            .await
            .unwrap()
            .get::<_, i32>(0),
        on_three,
        "node 3's sessions are on their home backend again"
    );
    // What is written on the copy replicates (its capture triggers, which
    // pg_dump leaves out, are back).
    let id: i64 = through_three
        .query_one("INSERT INTO acked (via) VALUES (3) RETURNING id", &[])
        .await
        .unwrap()
        .get(0);
    acked.lock().unwrap().insert(id);

    // Every backend identical, every acknowledged write there once, no
    // global id handed out twice.
    let acked = acked.lock().unwrap().clone();
    let count = same_everywhere(&c, "SELECT count(*)::text FROM acked").await;
    assert_eq!(count, acked.len().to_string());
    same_everywhere(
        &c,
        "SELECT md5(string_agg(id::text, ',' ORDER BY id)) FROM acked",
    )
    .await;
    let stored: BTreeSet<i64> = c
        .direct(1)
        .await
        .query("SELECT id FROM acked", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(stored, acked, "every acknowledged insert, and nothing else");
    same_everywhere(
        &c,
        "SELECT count(*)::text || '/' || count(DISTINCT id)::text FROM small",
    )
    .await;
    let small = same_everywhere(
        &c,
        "SELECT (count(*) = count(DISTINCT id))::text FROM small",
    )
    .await;
    assert_eq!(small, "true");
    for sql in [
        "SELECT md5(string_agg(a::text, ',' ORDER BY aid)) FROM pgbench_accounts a",
        "SELECT md5(string_agg(b::text, ',' ORDER BY bid)) FROM pgbench_branches b",
        "SELECT md5(string_agg(t::text, ',' ORDER BY tid)) FROM pgbench_tellers t",
        "SELECT count(*)::text FROM pgbench_history",
    ] {
        same_everywhere(&c, sql).await;
    }
    let orders = shop_orders.to_string();
    c.agree("shop", "SELECT count(*)::text FROM orders", Some(&orders))
        .await;
    c.agree(
        "shop",
        "SELECT md5(string_agg(o::text, ',' ORDER BY id)) FROM orders o",
        None,
    )
    .await;
    let accounts = same_everywhere(&c, "SELECT count(*)::text FROM pgbench_accounts").await;
    assert_eq!(
        accounts, "100000",
        "the rows deleted around Chorus are back"
    );
    // Backend 3 hands out values of its own: its snowflake ids carry its
    // sequence id, its galloc range is not another backend's.
    let three = c.direct(3).await;
    let sequence_id: i32 = three
        .query_one("SELECT sequence_id FROM chorus.local", &[])
        .await
        .unwrap()
        .get(0);
    let own: i64 = three
        .query_one("SELECT nextval('acked_id_seq') & 1023", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(own, i64::from(sequence_id));
    let mut ranges = Vec::new();
    for b in 1..=3 {
        let range: Option<i64> = c
            .direct(b)
            .await
            .query_one(
                "SELECT range_lo FROM chorus.global_sequence WHERE seq = 'public.small_id_seq'",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        ranges.push(range);
    }
    assert_ne!(ranges[2], ranges[0], "backend 3's galloc range is its own");
    assert_ne!(ranges[2], ranges[1], "backend 3's galloc range is its own");
}
