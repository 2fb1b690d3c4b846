//! Exactly-once delivery when the fan-out dies in the middle of a batch:
//! the node process SIGKILLed and restarted, or the peer backend
//! SIGKILLed and restarted. An insert-only table without a key makes any
//! change applied twice visible as a duplicate row, and any change lost as
//! a missing one.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use chorus_proxy::cluster::replication::parse_lsn;
use chorus_testkit as testkit;
use chorus_testkit::procs::{self, Cluster};

/// Transactions written on the origin, and rows per transaction.
const TRANSACTIONS: i64 = 150;
const ROWS: i64 = 100;

/// Whether backend 2 has applied more from origin 1 than origin 1's slot
/// knows: the window in which a crash makes the slot deliver again what
/// the peer already has.
async fn applied_ahead_of_slot(pair: &Cluster) -> bool {
    let confirmed: Option<String> = pair
        .direct(1)
        .await
        .query_opt(
            "SELECT confirmed_flush_lsn::text FROM pg_replication_slots \
             WHERE slot_name = 'chorus_1_to_pg2'",
            &[],
        )
        .await
        .unwrap()
        .and_then(|r| r.get(0));
    let applied: Option<String> = pair
        .direct(2)
        .await
        .query_opt("SELECT lsn::text FROM chorus.applied WHERE origin = 1", &[])
        .await
        .unwrap()
        .map(|r| r.get(0));
    match (confirmed, applied) {
        (Some(c), Some(a)) => parse_lsn(&a).unwrap() > parse_lsn(&c).unwrap(),
        _ => false,
    }
}

/// Two backends and two nodes.
async fn pair() -> Cluster {
    let pair = procs::cluster_opts(procs::Options {
        nodes: 2,
        ..procs::Options::default()
    })
    .await;
    // The table, made the same on both backends directly (DDL made on a
    // backend, not through Chorus, does not replicate; each backend's
    // event trigger adopts the table).
    // The trigger (a no-op) makes the apply go change by change, so a
    // batch takes long enough for a kill to land in its middle.
    for b in 1..=2 {
        pair.direct(b)
            .await
            .batch_execute(
                "CREATE TABLE events (txn int, n int); \
                 CREATE FUNCTION events_noop() RETURNS trigger LANGUAGE plpgsql \
                 AS $$ BEGIN RETURN NEW; END $$; \
                 CREATE TRIGGER events_noop BEFORE INSERT ON events \
                 FOR EACH ROW EXECUTE FUNCTION events_noop()",
            )
            .await
            .unwrap();
    }
    pair
}

/// Commit the workload on backend 1, directly (captured all the same).
async fn write_workload(pair: &Cluster) {
    let origin = pair.direct(1).await;
    for t in 0..TRANSACTIONS {
        origin
            .batch_execute(&format!(
                "INSERT INTO events SELECT {t}, g FROM generate_series(1, {ROWS}) g"
            ))
            .await
            .unwrap();
    }
}

/// Every row exactly once on backend 2.
async fn assert_exactly_once(pair: &Cluster) {
    let expected = format!("{} {}", TRANSACTIONS * ROWS, TRANSACTIONS * ROWS);
    let seen = pair
        .wait_for(
            2,
            "SELECT count(*) || ' ' || count(DISTINCT (txn, n)) FROM events",
            |v| v == expected,
        )
        .await;
    assert_eq!(seen, expected);
    // And it stays so: nothing is applied again later. A marker written
    // after the workload arrives after anything the stream would send
    // again (it applies in commit order).
    pair.direct(1)
        .await
        .batch_execute("INSERT INTO events VALUES (-1, -1)")
        .await
        .unwrap();
    pair.wait_for(2, "SELECT count(*)::text FROM events WHERE txn = -1", |v| {
        v == "1"
    })
    .await;
    let again: String = pair
        .direct(2)
        .await
        .query_one("SELECT count(*)::text FROM events WHERE txn >= 0", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(again, (TRANSACTIONS * ROWS).to_string());
}

#[tokio::test(flavor = "multi_thread")]
async fn the_node_killed_mid_batch_neither_loses_nor_repeats_a_change() {
    let mut pair = pair().await;
    // Node 1 stops, the workload piles up in its slot, then node 1 comes
    // back and is killed again and again while it applies.
    pair.kill_node(1);
    write_workload(&pair).await;
    let mut redelivered = 0;
    let mut seen = 0i64;
    for _ in 0..6 {
        pair.start_node(1);
        // As soon as a batch has landed, the next one is being applied:
        // kill the node then.
        let now = pair
            .wait_for(2, "SELECT count(*)::text FROM events", |v| {
                v.parse::<i64>().unwrap_or(0) > seen
            })
            .await;
        seen = now.parse().unwrap();
        if seen >= TRANSACTIONS * ROWS {
            break;
        }
        // Kill it while an apply runs on the peer (seen there), or, if
        // none comes within a second, as it is.
        let watcher = pair.direct(2).await;
        let applying = || async {
            watcher
                .query_one(
                    "SELECT count(*) > 0 FROM pg_stat_activity WHERE state = 'active' \
                     AND query LIKE '%chorus.apply\\_%' AND pid <> pg_backend_pid()",
                    &[],
                )
                .await
                .unwrap()
                .get::<_, bool>(0)
        };
        let deadline = Instant::now() + Duration::from_secs(1);
        while Instant::now() < deadline && !applying().await {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        pair.kill_node(1);
        // An apply under way when the node died still commits on the peer
        // (the statement and its Sync were already sent), but its position
        // never reached the slot: the restarted node gets it again. Once
        // no apply runs there, it has ended one way or the other.
        testkit::eventually(
            "the apply under way on backend 2 ending",
            Duration::from_secs(30),
            Duration::from_millis(10),
            || async { !applying().await },
        )
        .await;
        if applied_ahead_of_slot(&pair).await {
            redelivered += 1;
        }
    }
    if pair.nodes[0].is_none() {
        pair.start_node(1);
    }
    assert_exactly_once(&pair).await;
    eprintln!("kills after which the slot would deliver again what was applied: {redelivered}");
    assert!(redelivered >= 1, "no kill landed in the middle of an apply");
    // Running normally, the slot catches up with what the peer applied.
    let deadline = Instant::now() + Duration::from_secs(30);
    while applied_ahead_of_slot(&pair).await {
        assert!(Instant::now() < deadline, "the slot never caught up");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn the_peer_backend_killed_mid_batch_neither_loses_nor_repeats_a_change() {
    let mut pair = pair().await;
    pair.kill_node(1);
    write_workload(&pair).await;
    pair.start_node(1);
    for round in 0..3 {
        let target = (round + 1) * TRANSACTIONS * ROWS / 5;
        pair.wait_for(2, "SELECT count(*)::text FROM events", |v| {
            v.parse::<i64>().unwrap_or(0) >= target
        })
        .await;
        // A crash of the peer: whatever apply was open there is gone.
        pair.backends[1].kill();
        tokio::task::block_in_place(|| pair.backends[1].start()).unwrap();
    }
    assert_exactly_once(&pair).await;
}
