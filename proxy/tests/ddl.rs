//! The DDL path end to end: three backends, three Chorus node processes in
//! one Raft group (each node's Raft port behind a fault-injecting relay),
//! DDL through any node ordered by Raft and applied on every backend.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Command;
use std::time::{Duration, Instant};

use chorus_testkit as testkit;
use chorus_testkit::procs;
use procs::{cluster, message, Cluster};
use tokio_postgres::{Client, SimpleQueryMessage};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ddl_through_every_node_at_once_gives_every_backend_the_same_history_and_schema() {
    let c = cluster("").await;
    let mut tasks = Vec::new();
    for i in 1..=3 {
        let client = c.via(i).await;
        tasks.push(tokio::spawn(async move {
            for n in 0..4 {
                client
                    .batch_execute(&format!("CREATE TABLE t_{i}_{n} (id int PRIMARY KEY)"))
                    .await
                    .unwrap();
                client
                    .batch_execute(&format!("ALTER TABLE t_{i}_{n} ADD COLUMN v text"))
                    .await
                    .unwrap();
            }
            client
                .batch_execute(&format!("CREATE INDEX ON t_{i}_0 (v)"))
                .await
                .unwrap();
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    c.wait_ddl(27).await;
    let first = c.history(1).await;
    assert_eq!(first.len(), 27);
    assert!(
        first.iter().all(|(_, _, error)| error.is_none()),
        "{first:?}"
    );
    for b in 2..=3 {
        assert_eq!(
            c.history(b).await,
            first,
            "backend {b}'s DDL history differs"
        );
    }
    let schema = c.schema(1);
    assert!(schema.contains("CREATE TABLE public.t_3_3"));
    for b in 2..=3 {
        assert_eq!(c.schema(b), schema, "backend {b}'s schema differs");
    }
    // The tables replicate their rows, like any table made through Chorus.
    c.exec(2, "INSERT INTO t_1_1 VALUES (1, 'one')").await;
    for b in 1..=3 {
        c.wait_for(b, "SELECT v FROM t_1_1 WHERE id = 1", |v| v == "one")
            .await;
    }
    // The metrics show the DDL index and the Raft state.
    assert_eq!(
        c.metric(1, "chorus_ddl_index{backend=\"pg1\"}").await,
        Some(27.0)
    );
    assert!(c.metric(2, "chorus_raft_term").await.unwrap() >= 1.0);
    assert!(c.metric(3, "chorus_raft_commit_index").await.unwrap() >= 27.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_column_added_through_one_node_is_usable_at_once_through_another() {
    let c = cluster("").await;
    let one = c.via(1).await;
    let two = c.via(2).await;
    one.batch_execute("CREATE TABLE bikes (id int PRIMARY KEY, model text)")
        .await
        .unwrap();
    one.batch_execute("ALTER TABLE bikes ADD COLUMN status TEXT")
        .await
        .unwrap();
    two.batch_execute("INSERT INTO bikes (id, model, status) VALUES (1, 'roadster', 'ready')")
        .await
        .unwrap();
    for b in 1..=3 {
        c.wait_for(b, "SELECT status FROM bikes WHERE id = 1", |v| v == "ready")
            .await;
    }
    // Under commit scope `all`, DDL returns once every backend has it.
    let three = c.via(3).await;
    three
        .batch_execute("SET chorus.commit_scope = 'all'")
        .await
        .unwrap();
    three
        .batch_execute("CREATE TABLE scoped (id int PRIMARY KEY)")
        .await
        .unwrap();
    for b in 1..=3 {
        let there: bool = c
            .direct(b)
            .await
            .query_one("SELECT to_regclass('scoped') IS NOT NULL", &[])
            .await
            .unwrap()
            .get(0);
        assert!(
            there,
            "backend {b} lacks the table when the command returned"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changes_for_a_table_dropped_meanwhile_are_skipped_and_the_stream_goes_on() {
    let mut c = cluster("").await;
    let one = c.via(1).await;
    one.batch_execute("CREATE TABLE gone (id int PRIMARY KEY)")
        .await
        .unwrap();
    one.batch_execute("CREATE TABLE kept (id int PRIMARY KEY)")
        .await
        .unwrap();
    c.wait_ddl(2).await;
    // Rows written on backend 1 while its node is down wait in its slots;
    // meanwhile the table is dropped through node 2.
    c.kill_node(1);
    c.direct(1)
        .await
        .batch_execute("INSERT INTO gone VALUES (1), (2)")
        .await
        .unwrap();
    c.exec(2, "DROP TABLE gone").await;
    c.start_node(1);
    c.exec(1, "INSERT INTO kept VALUES (7)").await;
    for b in 2..=3 {
        c.wait_for(b, "SELECT count(*)::text FROM kept", |v| v == "1")
            .await;
        c.wait_for(
            b,
            "SELECT count(*)::text FROM chorus.conflict WHERE kind = 'missing_table'",
            |v| v == "2",
        )
        .await;
    }
    c.wait_for(1, "SELECT (to_regclass('gone') IS NULL)::text", |v| {
        v == "true"
    })
    .await;
}

/// Changes that wait for DDL a peer has not applied yet: the stream holds
/// one batch of them in the node's memory and reads no further (the rest
/// waits in the origin's WAL), and all of them arrive once the DDL does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changes_waiting_for_ddl_hold_one_batch_in_memory_and_all_arrive() {
    let c = cluster("").await;
    c.exec(1, "CREATE TABLE waits (id int PRIMARY KEY, v text)")
        .await;
    c.wait_ddl(1).await;
    // Backend 2 cannot record DDL log entries: its node's applier waits.
    let holder = c.direct(2).await;
    holder
        .batch_execute("BEGIN; LOCK TABLE chorus.ddl_history IN EXCLUSIVE MODE")
        .await
        .unwrap();
    c.exec(1, "CREATE ROLE waits_role").await;
    // Written after that DDL: on backend 2 these wait for it.
    let one = c.via(1).await;
    for t in 0..200 {
        one.batch_execute(&format!(
            "INSERT INTO waits SELECT g, 'x' FROM generate_series({}, {}) g",
            t * 100 + 1,
            (t + 1) * 100
        ))
        .await
        .unwrap();
    }
    c.wait_for(3, "SELECT count(*)::text FROM waits", |v| v == "20000")
        .await;
    let held = "chorus_replication_held_changes{peer=\"pg2\"}";
    c.wait_metric(1, held, |v| v >= 1000.0).await;
    // The stream says it waits every 5 s: after the second time, a stream
    // that went on reading would hold more transactions (of 100 changes).
    let log = c.dir.path().join("node1.log");
    testkit::eventually(
        "node 1 saying twice that changes wait for DDL",
        Duration::from_secs(60),
        Duration::from_millis(100),
        || async {
            std::fs::read_to_string(&log)
                .unwrap_or_default()
                .matches("changes wait for DDL the peer does not have yet")
                .count()
                >= 2
        },
    )
    .await;
    let holding = c.metric(1, held).await.unwrap();
    assert!(
        (1000.0..=1100.0).contains(&holding),
        "the stream to backend 2 holds {holding} changes"
    );
    holder.batch_execute("ROLLBACK").await.unwrap();
    c.wait_for(2, "SELECT count(*)::text FROM waits", |v| v == "20000")
        .await;
    c.wait_metric(1, held, |v| v == 0.0).await;
    c.converge(
        "SELECT count(*)::text FROM pg_roles WHERE rolname = 'waits_role'",
        1,
        &[2, 3],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn membership_commands_remove_a_node_and_add_it_back() {
    let mut c = cluster("").await;
    c.kill_node(3);
    let removed = c.chorus(1, &["cluster", "remove-node", "--id", "3"]);
    assert!(removed.contains("removed"), "{removed}");
    // Two voters left: DDL still commits (both are needed now).
    c.exec(1, "CREATE TABLE while_two (id int PRIMARY KEY)")
        .await;
    c.start_node(3);
    let relay3 = format!("127.0.0.1:{}", c.relays[2].port);
    let added = c.chorus(1, &["cluster", "add-node", "--id", "3", "--raft", &relay3]);
    assert!(added.contains("voter"), "{added}");
    c.exec(2, "CREATE TABLE with_three (id int PRIMARY KEY)")
        .await;
    c.wait_ddl(2).await;
    assert_eq!(c.history(3).await, c.history(1).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn removing_a_node_with_its_backend_drops_the_slots_that_stream_to_it() {
    let mut c = cluster("").await;
    let slots_to_3 = "SELECT count(*)::text FROM pg_replication_slots WHERE slot_name ~ '_to_pg3$'";
    for b in 1..=2 {
        c.wait_for(b, slots_to_3, |v| v == "1").await;
    }
    // Node 3 and backend 3 leave: the other nodes run without it.
    c.kill_node(3);
    c.backends[2].kill();
    c.omitted = vec![3];
    for i in 1..=2 {
        c.stop_node(i);
        c.start_node(i);
    }
    c.leader(1).await;
    let out = c.chorus(
        1,
        &["cluster", "remove-node", "--id", "3", "--backend", "pg3"],
    );
    assert!(out.contains("removed"), "{out}");
    assert!(out.contains("dropped slot pg1: chorus_1_to_pg3"), "{out}");
    assert!(out.contains("dropped slot pg2: chorus_2_to_pg3"), "{out}");
    for b in 1..=2 {
        let left: String = c
            .direct(b)
            .await
            .query_one(slots_to_3, &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(left, "0", "backend {b}");
    }
    // The two that stay replicate to each other as before.
    c.exec(1, "CREATE TABLE after_part (id int PRIMARY KEY)")
        .await;
    c.exec(2, "INSERT INTO after_part VALUES (1)").await;
    c.wait_for(1, "SELECT count(*)::text FROM after_part", |v| v == "1")
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ddl_that_fails_gets_postgresql_s_error_and_is_never_proposed() {
    let c = cluster("").await;
    let client = c.via(1).await;
    client
        .batch_execute("CREATE TABLE bikes (id int PRIMARY KEY)")
        .await
        .unwrap();
    let e = client
        .batch_execute("CREATE TABLE bikes (id int PRIMARY KEY)")
        .await
        .unwrap_err();
    assert_eq!(testkit::sqlstate(&e).as_deref(), Some("42P07"), "{e}");
    assert!(message(&e).contains("already exists"), "{e:?}");
    let e = client
        .batch_execute("ALTER TABLE nowhere ADD COLUMN x int")
        .await
        .unwrap_err();
    assert_eq!(testkit::sqlstate(&e).as_deref(), Some("42P01"), "{e}");
    // DDL in a transaction that rolls back replicates nothing; DDL sent
    // with the extended protocol replicates like any other.
    client.batch_execute("BEGIN").await.unwrap();
    client
        .batch_execute("INSERT INTO bikes VALUES (1)")
        .await
        .unwrap();
    client
        .batch_execute("CREATE TABLE inside (id int)")
        .await
        .unwrap();
    client.batch_execute("ROLLBACK").await.unwrap();
    client
        .execute("CREATE TABLE extended (id int)", &[])
        .await
        .unwrap();
    client
        .batch_execute("CREATE TABLE after (id int PRIMARY KEY)")
        .await
        .unwrap();
    c.wait_ddl(3).await;
    for b in 1..=3 {
        let history = c.history(b).await;
        let commands: Vec<&str> = history.iter().map(|(_, c, _)| c.as_str()).collect();
        assert_eq!(
            commands,
            vec![
                "CREATE TABLE bikes (id int PRIMARY KEY)",
                "CREATE TABLE extended (id int)",
                "CREATE TABLE after (id int PRIMARY KEY)"
            ],
            "backend {b}"
        );
        assert!(history.iter().all(|(_, _, e)| e.is_none()), "{history:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_leader_takes_over_when_the_leader_is_killed_during_a_stream_of_ddl() {
    let mut c = cluster("").await;
    let leader = c.leader(1).await;
    let writer = (1..=3).find(|i| *i != leader).unwrap();
    let client = c.via(writer).await;
    let mut acknowledged = Vec::new();
    let mut failed = Vec::new();
    for n in 0..30 {
        if n == 8 {
            c.kill_node(leader);
        }
        let sql = format!("CREATE TABLE s_{n} (id int PRIMARY KEY)");
        match client.batch_execute(&sql).await {
            Ok(()) => acknowledged.push(sql),
            Err(e) => {
                // Only while there is no leader, with a clear error.
                assert_eq!(testkit::sqlstate(&e).as_deref(), Some("40003"), "{e:?}");
                failed.push(sql);
            }
        }
    }
    assert!(
        acknowledged.len() >= 20,
        "acknowledged {}",
        acknowledged.len()
    );
    c.start_node(leader);
    let total = acknowledged.len();
    c.wait_ddl(total).await;
    let first = c.history(1).await;
    for b in 2..=3 {
        assert_eq!(c.history(b).await, first, "backend {b}");
    }
    let commands: Vec<&String> = first.iter().map(|(_, c, _)| c).collect();
    for sql in &acknowledged {
        assert_eq!(
            commands.iter().filter(|c| **c == sql).count(),
            1,
            "{sql} is not applied exactly once"
        );
    }
    // A failed one was either never logged or logged once.
    for sql in &failed {
        assert!(commands.iter().filter(|c| **c == sql).count() <= 1);
    }
    assert!(
        first.iter().all(|(_, _, error)| error.is_none()),
        "{first:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_cut_off_from_the_majority_refuses_ddl_in_bounded_time_and_keeps_serving_dml() {
    let c = cluster("").await;
    c.exec(1, "CREATE TABLE notes (id int PRIMARY KEY, body text)")
        .await;
    c.wait_ddl(1).await;
    // Cut node 3's Raft links both ways; its backend links stay.
    c.relays[2].block(&[0]);
    c.relays[0].block(&[3]);
    c.relays[1].block(&[3]);
    let three = c.via(3).await;
    let started = Instant::now();
    let e = three
        .batch_execute("CREATE TABLE island (id int)")
        .await
        .unwrap_err();
    assert_eq!(testkit::sqlstate(&e).as_deref(), Some("40003"), "{e:?}");
    assert!(message(&e).contains("majority"), "{e:?}");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );
    // DML through the cut-off node works, and DDL through the majority.
    three
        .batch_execute("INSERT INTO notes VALUES (3, 'from the island')")
        .await
        .unwrap();
    let one = c.via(1).await;
    one.batch_execute("ALTER TABLE notes ADD COLUMN tag text")
        .await
        .unwrap();
    one.batch_execute("INSERT INTO notes VALUES (1, 'from the majority', 'x')")
        .await
        .unwrap();
    c.wait_for(1, "SELECT body FROM notes WHERE id = 3", |v| {
        v == "from the island"
    })
    .await;
    // Heal: node 3's backend gets the DDL, then the row that needs it.
    for relay in &c.relays {
        relay.heal();
    }
    c.wait_ddl(2).await;
    c.wait_for(3, "SELECT tag FROM notes WHERE id = 1", |v| v == "x")
        .await;
    for b in 1..=3 {
        c.wait_for(b, "SELECT count(*)::text FROM notes", |v| v == "2")
            .await;
    }
    let history = c.history(3).await;
    assert!(history.iter().all(|(_, sql, _)| !sql.contains("island")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_node_catches_up_from_its_log_or_a_snapshot() {
    // Small snapshots and no log kept behind them: a node that was down
    // for a while catches up from a snapshot.
    let mut c = cluster("snapshot_every = 3\nkeep_logs = 0").await;
    let one = c.via(1).await;
    one.batch_execute("CREATE TABLE a (id int PRIMARY KEY)")
        .await
        .unwrap();
    c.wait_ddl(1).await;
    c.kill_node(3);
    for n in 0..8 {
        one.batch_execute(&format!("ALTER TABLE a ADD COLUMN c{n} int"))
            .await
            .unwrap();
    }
    one.batch_execute("INSERT INTO a (id, c7) VALUES (1, 7)")
        .await
        .unwrap();
    c.start_node(3);
    c.wait_ddl(9).await;
    c.wait_for(3, "SELECT c7::text FROM a WHERE id = 1", |v| v == "7")
        .await;
    let history = c.history(1).await;
    assert_eq!(c.history(3).await, history);
    assert_eq!(c.schema(3), c.schema(1));
    // Restarted once more, from its own files this time.
    c.kill_node(3);
    c.start_node(3);
    one.batch_execute("ALTER TABLE a ADD COLUMN last int")
        .await
        .unwrap();
    c.wait_ddl(10).await;
    assert_eq!(c.history(3).await, c.history(1).await);
}

/// The indexes of table `docs` on backend `b`.
async fn indexes(c: &Cluster, b: usize) -> Vec<String> {
    c.direct(b)
        .await
        .query(
            "SELECT indexname FROM pg_indexes WHERE tablename = 'docs' ORDER BY 1",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get::<_, String>(0))
        .collect()
}

/// The relfilenode of a relation on backend `b` (changes when rewritten).
async fn relfilenode(c: &Cluster, b: usize, rel: &str) -> u32 {
    c.direct(b)
        .await
        .query_one(
            "SELECT relfilenode::oid FROM pg_class WHERE oid = $1::text::regclass",
            &[&rel],
        )
        .await
        .unwrap()
        .get(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_local_ddl_and_maintenance_stay_on_their_backend() {
    let c = cluster("").await;
    let one = c.via(1).await;
    let two = c.via(2).await;
    one.batch_execute("CREATE EXTENSION IF NOT EXISTS pg_trgm")
        .await
        .unwrap();
    one.batch_execute("CREATE TABLE docs (id int PRIMARY KEY, body text)")
        .await
        .unwrap();
    c.wait_ddl(2).await;
    one.batch_execute(
        "SET chorus.ddl_scope = 'local'; \
         CREATE INDEX docs_trgm ON docs USING gin (body gin_trgm_ops)",
    )
    .await
    .unwrap();
    two.batch_execute("SET chorus.ddl_scope = 'local'")
        .await
        .unwrap();
    two.batch_execute("CREATE INDEX docs_btree ON docs (body)")
        .await
        .unwrap();
    // Replicated DDL after them: when backend 3 has it, it would have had
    // the local ones too if they had replicated.
    c.exec(3, "CREATE TABLE marker (id int PRIMARY KEY)").await;
    c.wait_ddl(3).await;
    assert_eq!(indexes(&c, 1).await, vec!["docs_pkey", "docs_trgm"]);
    assert_eq!(indexes(&c, 2).await, vec!["docs_btree", "docs_pkey"]);
    assert_eq!(indexes(&c, 3).await, vec!["docs_pkey"]);
    // VACUUM FULL and REINDEX rewrite only node 1's backend.
    let before: Vec<u32> = [
        relfilenode(&c, 1, "docs").await,
        relfilenode(&c, 2, "docs").await,
        relfilenode(&c, 1, "docs_pkey").await,
        relfilenode(&c, 2, "docs_pkey").await,
    ]
    .to_vec();
    let fresh = c.via(1).await;
    fresh.batch_execute("VACUUM FULL docs").await.unwrap();
    fresh
        .batch_execute("REINDEX INDEX docs_pkey")
        .await
        .unwrap();
    // Replicated DDL after them, through the same session: when backend 2
    // has it, it would have had them too if they had replicated.
    fresh
        .batch_execute("CREATE TABLE after_maintenance (id int PRIMARY KEY)")
        .await
        .unwrap();
    c.wait_ddl(4).await;
    let after: Vec<u32> = [
        relfilenode(&c, 1, "docs").await,
        relfilenode(&c, 2, "docs").await,
        relfilenode(&c, 1, "docs_pkey").await,
        relfilenode(&c, 2, "docs_pkey").await,
    ]
    .to_vec();
    assert_ne!(after[0], before[0], "VACUUM FULL ran on backend 1");
    assert_eq!(after[1], before[1], "VACUUM FULL did not run on backend 2");
    assert_ne!(after[2], before[2], "REINDEX ran on backend 1");
    assert_eq!(after[3], before[3], "REINDEX did not run on backend 2");
    let history = c.history(1).await;
    assert_eq!(history.len(), 4, "{history:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_with_the_wrong_cluster_secret_cannot_join() {
    let mut c = cluster("").await;
    // Node 3 comes back with the wrong secret.
    c.kill_node(3);
    c.start_node_with_secret(3, "not-the-secret");
    // DDL of the cluster's log (a role): in-stream DDL reaches backend 3
    // by the change streams of the other nodes, whatever node 3's Raft.
    c.exec(1, "CREATE ROLE after_intruder").await;
    c.wait_for(1, "SELECT count(*)::text FROM chorus.ddl_history", |v| {
        v == "1"
    })
    .await;
    c.wait_for(2, "SELECT count(*)::text FROM chorus.ddl_history", |v| {
        v == "1"
    })
    .await;
    // The positive marker: connections between node 3 and the others
    // refused after the DDL was committed (each side counts what it
    // refused). Only then is node 3's empty history telling.
    let refused = || async {
        let mut total = 0.0;
        for i in [1, 3] {
            total += c
                .metric(i, "chorus_raft_auth_failures_total")
                .await
                .unwrap_or(0.0);
        }
        total
    };
    let before = refused().await;
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while refused().await <= before {
        assert!(
            std::time::Instant::now() < deadline,
            "no connection between node 3 and the others was refused"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(c.history(3).await.is_empty(), "node 3 got the DDL log");
    // The membership command with the wrong secret is refused too.
    let config = c.dir.path().join("node3.toml");
    let out = Command::new(env!("CARGO_BIN_EXE_chorus"))
        .args(["cluster", "add-node", "--id", "9", "--raft", "127.0.0.1:1"])
        .arg("--config")
        .arg(&config)
        .output()
        .unwrap();
    assert!(!out.status.success());
    // (node 3's config names node 3's own port; aim it at node 1 instead)
    let wrong = std::fs::read_to_string(&config).unwrap().replace(
        &format!("raft_listen = \"127.0.0.1:{}\"", c.raft_ports[2]),
        &format!("raft_listen = \"127.0.0.1:{}\"", c.raft_ports[0]),
    );
    let aimed = c.dir.path().join("wrong.toml");
    std::fs::write(&aimed, wrong).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_chorus"))
        .args(["cluster", "add-node", "--id", "9", "--raft", "127.0.0.1:1"])
        .arg("--config")
        .arg(&aimed)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("secret"), "{stderr}");
    // With the right secret node 3 rejoins and catches up.
    c.kill_node(3);
    c.start_node(3);
    c.wait_ddl(1).await;
}

/// A table's rows on backend `b`, as one text in key order.
async fn rows(c: &Cluster, b: usize, table: &str) -> String {
    c.direct(b)
        .await
        .query_one(
            &format!(
                "SELECT coalesce(string_agg(t::text, ';' ORDER BY t::text), '') FROM {table} t"
            ),
            &[],
        )
        .await
        .unwrap()
        .get(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrations_in_transactions_over_the_extended_protocol_replicate_with_their_dml() {
    let c = cluster("").await;
    c.exec(
        1,
        "CREATE TABLE schema_migrations (version int PRIMARY KEY)",
    )
    .await;
    c.exec(
        1,
        "CREATE TABLE events (id bigserial PRIMARY KEY, node int, note text)",
    )
    .await;
    c.wait_ddl(2).await;
    // DML through nodes 2 and 3 all along.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut writers = Vec::new();
    for i in 2..=3 {
        let client = c.via(i).await;
        let stop = stop.clone();
        writers.push(tokio::spawn(async move {
            let mut n = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                client
                    .execute(
                        "INSERT INTO events (node, note) VALUES ($1, 'dml')",
                        &[&(i as i32)],
                    )
                    .await
                    .unwrap();
                n += 1;
            }
            n
        }));
    }
    // Each migration as a migration tool sends it: one transaction, DDL
    // and DML together, every statement over the extended protocol
    // (tokio-postgres prepares each one).
    let mut client = c.via(1).await;
    let migrations: [&[&str]; 4] = [
        &[
            "CREATE TABLE authors (id int PRIMARY KEY, name text NOT NULL)",
            "CREATE INDEX authors_name ON authors (name)",
            "INSERT INTO authors VALUES (1, 'An'), (2, 'Wim')",
        ],
        &[
            "ALTER TABLE authors ADD COLUMN email text",
            "UPDATE authors SET email = lower(name) || '@example.org'",
            "ALTER TABLE events ADD COLUMN author int REFERENCES authors (id)",
        ],
        // Rolled back: nothing of it may reach any backend.
        &[
            "CREATE TABLE doomed (id int PRIMARY KEY)",
            "INSERT INTO doomed VALUES (1)",
            "ALTER TABLE authors DROP COLUMN email",
        ],
        &[
            "CREATE TABLE books (id int PRIMARY KEY, author int REFERENCES authors, title text)",
            "INSERT INTO books VALUES (1, 1, 'Chorus')",
            "COMMENT ON TABLE books IS 'what authors wrote'",
        ],
    ];
    for (version, statements) in migrations.iter().enumerate() {
        let tx = client.transaction().await.unwrap();
        for sql in *statements {
            tx.execute(*sql, &[]).await.unwrap();
        }
        tx.execute(
            "INSERT INTO schema_migrations VALUES ($1)",
            &[&(version as i32)],
        )
        .await
        .unwrap();
        if version == 2 {
            tx.rollback().await.unwrap();
        } else {
            tx.commit().await.unwrap();
        }
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut written = 0;
    for w in writers {
        written += w.await.unwrap();
    }
    assert!(written > 0);
    c.exec(
        2,
        "INSERT INTO events (node, note, author) VALUES (2, 'after', 2)",
    )
    .await;
    // Every backend: the same schema, the same rows.
    for table in ["schema_migrations", "authors", "books", "events"] {
        c.converge(
            &format!("SELECT count(*)::text || md5(coalesce(string_agg(t::text, ';' ORDER BY t::text), '')) FROM {table} t"),
            1,
            &[2, 3],
        )
        .await;
    }
    let schema = c.schema(1);
    assert!(schema.contains("email text"), "{schema}");
    assert!(!schema.contains("doomed"), "{schema}");
    assert!(schema.contains("what authors wrote"));
    for b in 2..=3 {
        assert_eq!(c.schema(b), schema, "backend {b}'s schema differs");
        assert_eq!(rows(&c, b, "schema_migrations").await, "(0);(1);(3)");
        assert_eq!(
            rows(&c, b, "authors").await,
            "(1,An,an@example.org);(2,Wim,wim@example.org)"
        );
    }
    assert_eq!(c.history(3).await, c.history(1).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_table_as_and_select_into_give_identical_rows_everywhere() {
    let c = cluster("").await;
    let client = c.via(2).await;
    client
        .batch_execute(
            "CREATE TABLE dice AS SELECT g AS id, random() AS roll FROM generate_series(1, 500) g",
        )
        .await
        .unwrap();
    client
        .batch_execute("BEGIN; SELECT g AS id, random() AS roll INTO more_dice FROM generate_series(1, 50) g; COMMIT")
        .await
        .unwrap();
    for table in ["dice", "more_dice"] {
        c.converge(
            &format!(
                "SELECT count(*)::text || md5(string_agg(t::text, ';' ORDER BY id)) FROM {table} t"
            ),
            2,
            &[1, 3],
        )
        .await;
    }
    let n: i64 = c
        .direct(3)
        .await
        .query_one("SELECT count(*) FROM dice", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 500);
    // The made table's access method and storage parameters come along.
    c.via(2)
        .await
        .batch_execute(
            "CREATE ACCESS METHOD heap_copy TYPE TABLE HANDLER heap_tableam_handler; \
             CREATE TABLE stored USING heap_copy WITH (fillfactor = 70) AS SELECT 1 AS one",
        )
        .await
        .unwrap();
    for b in 1..=3 {
        c.wait_for(
            b,
            "SELECT (SELECT amname FROM pg_am WHERE oid = c.relam) || ':' || array_to_string(c.reloptions, ',') \
                    || ':' || (SELECT count(*) FROM stored) \
               FROM pg_class c WHERE c.relname = 'stored'",
            |v| v == "heap_copy:fillfactor=70:1",
        )
        .await;
    }
    // A column of a type whose values PostgreSQL cannot read back (a
    // catalog's pg_node_tree) replicates while it holds only NULLs; with
    // values it is refused, before anything is left on one backend.
    client
        .batch_execute(
            "CREATE TABLE catalog_rows AS SELECT relname, relpartbound FROM pg_class \
               WHERE relname IN ('dice', 'more_dice', 'stored')",
        )
        .await
        .unwrap();
    c.converge(
        "SELECT string_agg(relname || ':' || (relpartbound IS NULL), ',' ORDER BY relname) FROM catalog_rows",
        2,
        &[1, 3],
    )
    .await;
    client
        .batch_execute(
            "CREATE TABLE parted (a int) PARTITION BY RANGE (a); \
             CREATE TABLE parted_1 PARTITION OF parted FOR VALUES FROM (1) TO (10)",
        )
        .await
        .unwrap();
    let e = client
        .batch_execute(
            "CREATE TABLE bounds AS SELECT relname, relpartbound FROM pg_class WHERE relname = 'parted_1'",
        )
        .await
        .unwrap_err();
    assert_eq!(testkit::sqlstate(&e).as_deref(), Some("0A000"), "{e}");
    for b in 1..=3 {
        c.wait_for(b, "SELECT count(*)::text FROM parted_1", |v| v == "0")
            .await;
        let made: bool = c
            .direct(b)
            .await
            .query_one("SELECT to_regclass('bounds') IS NOT NULL", &[])
            .await
            .unwrap()
            .get(0);
        assert!(!made, "backend {b}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ddl_succeeds_with_a_backend_down_and_reaches_it_when_it_returns() {
    let mut c = cluster("").await;
    c.exec(1, "CREATE TABLE before (id int PRIMARY KEY)").await;
    c.wait_ddl(1).await;
    c.backends[2].stop();
    let client = c.via(1).await;
    let started = Instant::now();
    client
        .batch_execute("BEGIN; CREATE TABLE while_down (id int PRIMARY KEY); INSERT INTO while_down VALUES (1); COMMIT")
        .await
        .unwrap();
    client
        .batch_execute("ALTER TABLE before ADD COLUMN v text")
        .await
        .unwrap();
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "DDL waited for the down backend: {:?}",
        started.elapsed()
    );
    // Through another node, while backend 3 is still down.
    c.exec(2, "INSERT INTO before VALUES (1, 'x')").await;
    c.backends[2].start().unwrap();
    c.wait_for(3, "SELECT string_agg(v, ',') FROM before", |v| v == "x")
        .await;
    c.wait_for(3, "SELECT count(*)::text FROM while_down", |v| v == "1")
        .await;
    assert_eq!(c.schema(3), c.schema(1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_conflicting_ddl_through_two_nodes_ends_with_one_outcome() {
    let c = cluster("").await;
    c.exec(1, "CREATE TABLE shared (id int PRIMARY KEY)").await;
    c.wait_ddl(1).await;
    let first = c.via(1).await;
    let second = c.via(2).await;
    first
        .batch_execute("BEGIN; ALTER TABLE shared ADD COLUMN c int")
        .await
        .unwrap();
    // Node 2's DDL waits for the lease node 1's open transaction holds.
    let waiting = tokio::spawn(async move {
        second
            .batch_execute("ALTER TABLE shared ADD COLUMN c text")
            .await
    });
    c.wait_metric(2, "chorus_ddl_lease_waiting", |v| v == 1.0)
        .await;
    assert!(!waiting.is_finished(), "node 2's DDL did not wait");
    first.batch_execute("COMMIT").await.unwrap();
    let result = waiting.await.unwrap();
    // It then runs after node 1's, as PostgreSQL would after a lock wait.
    let e = result.unwrap_err();
    assert_eq!(testkit::sqlstate(&e).as_deref(), Some("42701"), "{e}");
    c.wait_metric(2, "chorus_ddl_lease_waiting", |v| v == 0.0)
        .await;
    for b in 1..=3 {
        c.wait_for(
            b,
            "SELECT format_type(atttypid, atttypmod) FROM pg_attribute WHERE attrelid = 'shared'::regclass AND attname = 'c'",
            |t| t == "integer",
        )
        .await;
    }
    let schema = c.schema(1);
    for b in 2..=3 {
        assert_eq!(c.schema(b), schema, "backend {b}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ddl_waits_for_another_transactions_lease_up_to_the_lock_timeout() {
    // The wait for another transaction's DDL lease is a lock wait, bounded
    // by ddl_lock_timeout_ms (here 4 s), not by the 3 s the cluster has to
    // answer (ddl_timeout_ms).
    let c = cluster("ddl_lock_timeout_ms = 4000").await;
    c.exec(1, "CREATE TABLE held (id int PRIMARY KEY)").await;
    c.exec(
        1,
        "CREATE FUNCTION make_waited() RETURNS void LANGUAGE plpgsql AS $f$ BEGIN \
           CREATE TABLE IF NOT EXISTS waited_too (id int PRIMARY KEY); END $f$",
    )
    .await;
    c.wait_ddl(2).await;
    let first = c.via(1).await;
    // A function's DDL asks for the lease mid-statement, and waits as long.
    let statement = "CREATE TABLE IF NOT EXISTS waited (id int PRIMARY KEY)";
    for (hold, outcome, waiter) in [
        (3500u64, None, statement),
        (6000, Some("55P03"), statement),
        (6000, Some("55P03"), "SELECT make_waited()"),
    ] {
        first
            .batch_execute("BEGIN; ALTER TABLE held ADD COLUMN IF NOT EXISTS a int")
            .await
            .unwrap();
        let second = c.via(2).await;
        let waiting = tokio::spawn(async move {
            let started = Instant::now();
            let result = second.batch_execute(waiter).await;
            (result, started.elapsed())
        });
        tokio::time::sleep(Duration::from_millis(hold)).await;
        first.batch_execute("COMMIT").await.unwrap();
        let (result, waited) = waiting.await.unwrap();
        match outcome {
            None => {
                result.unwrap();
                assert!(waited >= Duration::from_millis(3500), "{waited:?}");
            }
            Some(code) => {
                let e = result.unwrap_err();
                assert_eq!(testkit::sqlstate(&e).as_deref(), Some(code), "{e}");
                assert!(waited >= Duration::from_millis(4000), "{waited:?}");
                assert!(waited < Duration::from_millis(6000), "{waited:?}");
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ddl_from_a_do_block_or_function_replicates_or_is_refused_never_left_on_one_backend() {
    let c = cluster("").await;
    let one = c.via(1).await;
    // What migration tools generate for an enum: the second run's
    // duplicate_object is caught, and replicates nothing.
    let enum_block = "DO $$ BEGIN CREATE TYPE mood AS ENUM ('sad', 'ok'); \
                      EXCEPTION WHEN duplicate_object THEN null; END $$";
    one.batch_execute(enum_block).await.unwrap();
    one.batch_execute(enum_block).await.unwrap();
    // Dynamic SQL and rows in one block, over the extended protocol too.
    one.execute(
        "DO $$ BEGIN EXECUTE 'CREATE TABLE dyn (id int PRIMARY KEY, m mood)'; \
         INSERT INTO dyn VALUES (1, 'ok'); END $$",
        &[],
    )
    .await
    .unwrap();
    // A function's DDL replicates: from a DO block, in a transaction that
    // already sent DDL, and called alone (below).
    one.batch_execute(
        "CREATE FUNCTION make_it(n text) RETURNS void LANGUAGE plpgsql AS $f$ BEGIN \
           EXECUTE format('CREATE TABLE %I (id int PRIMARY KEY)', n); \
           EXECUTE format('INSERT INTO %I VALUES (7)', n); END $f$",
    )
    .await
    .unwrap();
    // Called alone, the function's session asks its node for the lease
    // mid-statement (chorus.ask_lease): over the extended protocol, in a
    // REPEATABLE READ block whose client hears only warnings, and by CALL.
    // The question is the node's: the client hears no notice of it.
    let (asking, heard) = testkit::connect_hearing_notices(&format!(
        "host=127.0.0.1 port={} user=postgres dbname=postgres",
        c.ports[0]
    ))
    .await;
    asking.query("SELECT make_it('alone')", &[]).await.unwrap();
    asking
        .batch_execute(
            "BEGIN ISOLATION LEVEL REPEATABLE READ; SET LOCAL client_min_messages = warning; \
             SELECT count(*) FROM pg_class; SELECT make_it('in_rr'); SELECT make_it('in_rr_too'); COMMIT",
        )
        .await
        .unwrap();
    asking
        .batch_execute(
            "CREATE PROCEDURE make_called(n text) LANGUAGE plpgsql AS $p$ BEGIN \
               EXECUTE format('CREATE TABLE %I (id int PRIMARY KEY)', n); END $p$; \
             CALL make_called('called')",
        )
        .await
        .unwrap();
    asking
        .batch_execute("DO $$ BEGIN RAISE NOTICE 'the client''s own'; END $$")
        .await
        .unwrap();
    assert_eq!(*heard.lock().unwrap(), ["the client's own"]);
    one.batch_execute("DO $$ BEGIN PERFORM make_it('via_do'); END $$")
        .await
        .unwrap();
    one.batch_execute("BEGIN; CREATE TABLE first_ddl (id int); SELECT make_it('in_txn'); COMMIT")
        .await
        .unwrap();
    // Rolled back, it replicates nothing.
    one.batch_execute("BEGIN; DO $$ BEGIN PERFORM make_it('rolled_back'); END $$; ROLLBACK")
        .await
        .unwrap();
    // Rows computed once, by the origin.
    one.batch_execute(
        "DO $$ BEGIN CREATE TABLE drawn AS SELECT g, random() AS r FROM generate_series(1, 50) g; END $$",
    )
    .await
    .unwrap();
    // What the origin cannot tell the peers exactly is refused: several
    // statements in one EXECUTE, an SQL-language function's statement.
    let e = one
        .batch_execute("DO $$ BEGIN EXECUTE 'CREATE TABLE two_a (id int); CREATE TABLE two_b (id int)'; END $$")
        .await
        .unwrap_err();
    assert_eq!(testkit::sqlstate(&e).as_deref(), Some("0A000"), "{e}");
    one.batch_execute("CREATE FUNCTION sql_made() RETURNS void LANGUAGE sql AS $f$ CREATE TABLE from_sql (id int) $f$")
        .await
        .unwrap();
    let e = one
        .batch_execute("DO $$ BEGIN PERFORM sql_made(); END $$")
        .await
        .unwrap_err();
    assert_eq!(testkit::sqlstate(&e).as_deref(), Some("0A000"), "{e}");
    // EXPLAIN ANALYZE makes its table without any event trigger: refused.
    let e = one
        .batch_execute("EXPLAIN ANALYZE CREATE TABLE explained AS SELECT 1 AS x")
        .await
        .unwrap_err();
    assert_eq!(testkit::sqlstate(&e).as_deref(), Some("0A000"), "{e}");
    // A SECURITY DEFINER function's DDL runs as its owner everywhere.
    one.batch_execute(
        "CREATE ROLE app LOGIN; GRANT CREATE ON SCHEMA public TO app; \
         CREATE FUNCTION owner_makes() RETURNS void LANGUAGE plpgsql SECURITY DEFINER AS $f$ \
           BEGIN CREATE TABLE made_by_owner (id int PRIMARY KEY); END $f$",
    )
    .await
    .unwrap();
    c.wait_for(2, "SELECT (to_regrole('app') IS NOT NULL)::text", |v| {
        v == "true"
    })
    .await;
    let app = testkit::connect(&format!(
        "host=127.0.0.1 port={} user=app dbname=postgres",
        c.ports[1]
    ))
    .await
    .unwrap();
    app.batch_execute("DO $$ BEGIN PERFORM owner_makes(); CREATE TABLE app_made (id int); END $$")
        .await
        .unwrap();
    // Every backend ends with the same tables, owners, rows and comment.
    let state = "SELECT string_agg(c.relname || ':' || pg_get_userbyid(c.relowner), ',' ORDER BY c.relname) \
                 || ' ' || (SELECT string_agg(id::text, ',' ORDER BY id) FROM dyn) \
                 || ' ' || (SELECT count(*) FROM via_do) || (SELECT count(*) FROM in_txn) \
                 || ' ' || (SELECT md5(string_agg(g || ':' || r, ',' ORDER BY g)) FROM drawn) \
                 || ' ' || (SELECT string_agg(enumlabel, ',' ORDER BY enumsortorder) FROM pg_enum) \
                 FROM pg_class c WHERE c.relnamespace = 'public'::regnamespace AND c.relkind = 'r'";
    let on_origin: String = c
        .direct(1)
        .await
        .query_one(state, &[])
        .await
        .unwrap()
        .get(0);
    assert!(
        on_origin.starts_with(
            "alone:postgres,app_made:app,called:postgres,drawn:postgres,dyn:postgres,\
             first_ddl:postgres,in_rr:postgres,in_rr_too:postgres,in_txn:postgres,\
             made_by_owner:postgres,via_do:postgres 1 11 "
        ) && on_origin.ends_with(" sad,ok"),
        "{on_origin}"
    );
    c.converge(state, 1, &[2, 3]).await;
    assert_eq!(c.schema(2), c.schema(1));
    assert_eq!(c.schema(3), c.schema(1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_users_event_triggers_see_the_users_ddl_and_not_chorus_own() {
    let c = cluster("").await;
    let one = c.via(1).await;
    one.batch_execute(
        "CREATE TABLE seen (n bigserial PRIMARY KEY, tag text); \
         CREATE FUNCTION note_tag() RETURNS event_trigger LANGUAGE plpgsql AS \
           $$ BEGIN INSERT INTO seen (tag) VALUES (tg_tag); END $$",
    )
    .await
    .unwrap();
    one.batch_execute("CREATE EVENT TRIGGER noting ON ddl_command_end EXECUTE FUNCTION note_tag()")
        .await
        .unwrap();
    // Chorus adopts the table (its triggers), makes its sequence global
    // and re-adopts it after the ALTER: none of that is the user's DDL.
    one.batch_execute(
        "CREATE TABLE t (id bigserial PRIMARY KEY, v text); ALTER TABLE t ADD COLUMN w int",
    )
    .await
    .unwrap();
    let tags = "SELECT string_agg(tag, ',' ORDER BY n) FROM seen";
    let on_origin: String = c.direct(1).await.query_one(tags, &[]).await.unwrap().get(0);
    assert_eq!(on_origin, "CREATE TABLE,ALTER TABLE");
    c.converge(tags, 1, &[2, 3]).await;
}

/// The lines of an EXPLAIN, sent with the simple or the extended protocol.
async fn plan_lines(client: &Client, sql: &str, simple: bool) -> Vec<String> {
    if simple {
        client
            .simple_query(sql)
            .await
            .unwrap()
            .into_iter()
            .filter_map(|m| match m {
                SimpleQueryMessage::Row(row) => row.get(0).map(str::to_owned),
                _ => None,
            })
            .collect()
    } else {
        let rows = client.query(sql, &[]).await.unwrap();
        rows.iter().map(|r| r.get::<_, String>(0)).collect()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partitioned_tables_replicate_their_rows_and_partition_changes() {
    let c = cluster("").await;
    let one = c.via(1).await;
    one.batch_execute(
        "BEGIN;
         CREATE TABLE readings (id int, day date, v int, PRIMARY KEY (id, day)) PARTITION BY RANGE (day);
         CREATE TABLE readings_jan PARTITION OF readings FOR VALUES FROM ('2026-01-01') TO ('2026-02-01');
         CREATE TABLE readings_feb PARTITION OF readings FOR VALUES FROM ('2026-02-01') TO ('2026-03-01');
         INSERT INTO readings VALUES (1, '2026-01-05', 10), (2, '2026-01-06', 20), (3, '2026-02-07', 30);
         COMMIT",
    )
    .await
    .unwrap();
    // Writes through other nodes, a row moved between partitions, a
    // partition attached and one detached.
    // Backend 3 applies nothing from node 2 until the DETACH of the
    // partition that node 2 moves a row out of has reached it, so there the
    // DETACH comes first, while on backend 2 the move does: the move's
    // delete must still find the row, now in the detached table, and a
    // row inserted into that partition must land there too. (The
    // applies of an origin take its row of chorus.applied first.)
    let held = c.direct(3).await;
    held.batch_execute(
        "BEGIN; INSERT INTO chorus.applied (origin, lsn) VALUES (2, '0/0') \
         ON CONFLICT (origin) DO UPDATE SET lsn = chorus.applied.lsn",
    )
    .await
    .unwrap();
    let two = c.via(2).await;
    two.batch_execute(
        "UPDATE readings SET day = '2026-02-05' WHERE id = 1; \
         INSERT INTO readings VALUES (7, '2026-01-20', 70)",
    )
    .await
    .unwrap();
    let three = c.via(3).await;
    three
        .batch_execute(
            "CREATE TABLE readings_mar (id int, day date, v int, PRIMARY KEY (id, day));
             ALTER TABLE readings ATTACH PARTITION readings_mar FOR VALUES FROM ('2026-03-01') TO ('2026-04-01');
             INSERT INTO readings VALUES (4, '2026-03-01', 40)",
        )
        .await
        .unwrap();
    one.batch_execute("ALTER TABLE readings DETACH PARTITION readings_jan")
        .await
        .unwrap();
    c.wait_for(
        3,
        "SELECT relispartition::text FROM pg_class WHERE relname = 'readings_jan'",
        |v| v == "false",
    )
    .await;
    assert_eq!(
        rows(&c, 3, "readings_jan").await,
        "(1,2026-01-05,10);(2,2026-01-06,20)",
        "backend 3 detached the partition before it had node 2's move"
    );
    held.batch_execute("COMMIT").await.unwrap();
    // The detached table replicates as a table of its own.
    two.batch_execute("INSERT INTO readings_jan VALUES (9, '2026-01-09', 90)")
        .await
        .unwrap();
    two.batch_execute("DELETE FROM readings WHERE id = 3")
        .await
        .unwrap();
    for table in ["readings", "readings_jan", "readings_feb", "readings_mar"] {
        c.converge(
            &format!(
                "SELECT coalesce(string_agg(t::text, ';' ORDER BY t::text), '') FROM {table} t"
            ),
            2,
            &[1, 3],
        )
        .await;
    }
    for b in 1..=3 {
        assert_eq!(
            rows(&c, b, "readings").await,
            "(1,2026-02-05,10);(4,2026-03-01,40)",
            "backend {b}"
        );
        assert_eq!(
            rows(&c, b, "readings_jan").await,
            "(2,2026-01-06,20);(7,2026-01-20,70);(9,2026-01-09,90)",
            "backend {b}"
        );
    }
    // DETACH … CONCURRENTLY runs as two transactions of its own, outside
    // any block (where PostgreSQL's error is the answer), on every backend.
    one.batch_execute(
        "CREATE TABLE readings_apr PARTITION OF readings FOR VALUES FROM ('2026-04-01') TO ('2026-05-01'); \
         INSERT INTO readings VALUES (5, '2026-04-02', 50)",
    )
    .await
    .unwrap();
    one.batch_execute("BEGIN").await.unwrap();
    let in_block = one
        .batch_execute("ALTER TABLE readings DETACH PARTITION readings_apr CONCURRENTLY")
        .await
        .unwrap_err();
    assert_eq!(
        testkit::sqlstate(&in_block).as_deref(),
        Some("25001"),
        "{in_block:?}"
    );
    one.batch_execute("ROLLBACK").await.unwrap();
    one.batch_execute("ALTER TABLE readings DETACH PARTITION readings_apr CONCURRENTLY")
        .await
        .unwrap();
    for b in 1..=3 {
        c.wait_for(
            b,
            "SELECT (SELECT relispartition::text FROM pg_class WHERE relname = 'readings_apr') \
                    || ':' || (SELECT count(*) FROM readings)",
            |v| v == "false:2",
        )
        .await;
    }
    c.converge(
        "SELECT string_agg(t::text, ';') FROM readings_apr t",
        1,
        &[2, 3],
    )
    .await;
    // EXPLAIN ANALYZE of a write through a node reads as PostgreSQL's own:
    // the capture trigger's line (which the backend itself shows) is left
    // out, over the simple and the extended protocol.
    let explain = "EXPLAIN (ANALYZE, COSTS OFF, TIMING OFF, SUMMARY OFF) \
                   UPDATE readings SET v = v + 1 WHERE id IN (1, 4)";
    let direct = c.direct(1).await;
    direct.batch_execute("BEGIN").await.unwrap();
    let backend_plan = plan_lines(&direct, explain, true).await;
    direct.batch_execute("ROLLBACK").await.unwrap();
    let trigger_lines = |plan: &[String]| {
        plan.iter()
            .filter(|l| l.starts_with("Trigger chorus_capture on readings_"))
            .count()
    };
    assert_eq!(trigger_lines(&backend_plan), 2, "{backend_plan:?}");
    let expected: Vec<String> = backend_plan
        .iter()
        .filter(|l| !l.starts_with("Trigger chorus_capture"))
        .cloned()
        .collect();
    for simple in [true, false] {
        one.batch_execute("BEGIN").await.unwrap();
        let plan = plan_lines(&one, explain, simple).await;
        one.batch_execute("ROLLBACK").await.unwrap();
        assert_eq!(plan, expected, "simple protocol: {simple}");
    }
    let schema = c.schema(1);
    for b in 2..=3 {
        assert_eq!(c.schema(b), schema, "backend {b}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_temporary_tables_leaves_the_peers_permanent_ones_alone() {
    // A temporary table exists on its session's backend only. Dropping it
    // must not drop, on the peers, the permanent table its name shadows;
    // a DROP of a temporary and a permanent table drops the permanent one
    // everywhere.
    let c = cluster("").await;
    let one = c.via(1).await;
    one.batch_execute(
        "CREATE TABLE shadowed (a int PRIMARY KEY); CREATE TABLE plain (a int PRIMARY KEY); \
         INSERT INTO shadowed VALUES (1)",
    )
    .await
    .unwrap();
    one.batch_execute("CREATE TEMP TABLE shadowed (b text); DROP TABLE shadowed")
        .await
        .unwrap();
    one.batch_execute("CREATE TEMP TABLE scratch (a int); DROP TABLE scratch, plain CASCADE")
        .await
        .unwrap();
    // The marker: replicated DDL after both drops.
    one.batch_execute("CREATE TABLE after_drops (a int PRIMARY KEY)")
        .await
        .unwrap();
    for b in 1..=3 {
        let seen = c
            .wait_for(
                b,
                "SELECT (to_regclass('public.after_drops') IS NOT NULL)::text || ':' \
                        || (to_regclass('public.shadowed') IS NOT NULL) || ':' \
                        || (to_regclass('public.plain') IS NOT NULL)",
                |v| v.starts_with("true"),
            )
            .await;
        assert_eq!(seen, "true:true:false", "backend {b}");
        assert_eq!(rows(&c, b, "shadowed").await, "(1)", "backend {b}");
    }
    let errors: Vec<_> = c
        .history(2)
        .await
        .into_iter()
        .filter(|(_, _, error)| error.is_some())
        .collect();
    assert!(errors.is_empty(), "{errors:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn indexes_built_concurrently_on_temporary_tables_stay_on_their_backend() {
    // CREATE and DROP INDEX CONCURRENTLY go through the DDL log, where a
    // session's temporary table does not exist: on a temporary table they
    // run on the session's backend (PostgreSQL builds such an index
    // plainly), on a permanent one of the same name they replicate.
    let c = cluster("").await;
    let one = c.via(1).await;
    one.batch_execute("CREATE TABLE shadow (f1 int PRIMARY KEY)")
        .await
        .unwrap();
    one.batch_execute(
        "CREATE TEMP TABLE concur_temp (f1 int, f2 text) ON COMMIT DELETE ROWS; \
         CREATE TEMP TABLE shadow (f1 int)",
    )
    .await
    .unwrap();
    for sql in [
        "CREATE INDEX CONCURRENTLY concur_temp_ind ON concur_temp(f1)",
        "CREATE UNIQUE INDEX CONCURRENTLY temp_shadow_ind ON shadow (f1)",
    ] {
        one.batch_execute(sql).await.unwrap();
    }
    let here = "SELECT string_agg(indexname, ',' ORDER BY indexname) FROM pg_indexes \
                WHERE indexname IN ('concur_temp_ind', 'temp_shadow_ind')";
    let mine: Option<String> = one.query_one(here, &[]).await.unwrap().get(0);
    assert_eq!(mine.as_deref(), Some("concur_temp_ind,temp_shadow_ind"));
    one.batch_execute("DROP INDEX CONCURRENTLY concur_temp_ind")
        .await
        .unwrap();
    // The permanent table of the shadowed name, named with its schema:
    // through the log, on every backend (the marker).
    one.batch_execute("CREATE INDEX CONCURRENTLY perm_shadow_ind ON public.shadow (f1)")
        .await
        .unwrap();
    for b in 1..=3 {
        let seen = c
            .wait_for(
                b,
                "SELECT coalesce(string_agg(indexname, ',' ORDER BY indexname), '') FROM pg_indexes \
                  WHERE schemaname = 'public' AND tablename IN ('shadow', 'concur_temp') \
                    AND indexname LIKE '%_ind'",
                |v| v.contains("perm_shadow_ind"),
            )
            .await;
        assert_eq!(seen, "perm_shadow_ind", "backend {b}");
    }
    let errors: Vec<_> = c
        .history(2)
        .await
        .into_iter()
        .filter(|(_, _, error)| error.is_some())
        .collect();
    assert!(errors.is_empty(), "{errors:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_latin1_session_runs_and_replicates_ddl_and_dml_with_accents() {
    let c = cluster("").await;
    // Two statements in one simple query and one on its own, in LATIN1
    // bytes ('é' = 0xE9, 'è' = 0xE8): psql sends a file's lines as they are.
    let file = c.dir.path().join("latin1.sql");
    let mut script = Vec::new();
    script.extend_from_slice(b"CREATE TABLE caf\xe9 (id int PRIMARY KEY, name text); INSERT INTO caf\xe9 VALUES (1, 'cr\xe8me');\n");
    script.extend_from_slice(b"BEGIN;\nALTER TABLE caf\xe9 ADD COLUMN note text DEFAULT 'd\xe9j\xe0';\nINSERT INTO caf\xe9 (id, name) VALUES (2, '\xe9t\xe9');\nCOMMIT;\n");
    std::fs::write(&file, &script).unwrap();
    let port = c.ports[0].to_string();
    let out = testkit::run_pg_program(
        "psql",
        &[
            "-X",
            "-v",
            "ON_ERROR_STOP=1",
            "-h",
            "127.0.0.1",
            "-p",
            &port,
            "-U",
            "postgres",
            "-d",
            "postgres",
            "-f",
            file.to_str().unwrap(),
        ],
        &[("PGCLIENTENCODING", "LATIN1".to_owned())],
        Duration::from_secs(60),
    );
    assert!(out.status.success(), "{}", testkit::stderr(&out));
    for b in 1..=3 {
        c.wait_for(
            b,
            "SELECT string_agg(id || name || note, ',' ORDER BY id) FROM \"café\"",
            |v| v == "1crèmedéjà,2étédéjà",
        )
        .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alter_table_with_volatile_defaults_or_using_gives_identical_rows_everywhere() {
    let c = cluster("").await;
    let one = c.via(1).await;
    one.batch_execute(
        "CREATE TABLE tickets (id int PRIMARY KEY, n int);
         INSERT INTO tickets SELECT g, g FROM generate_series(1, 300) g",
    )
    .await
    .unwrap();
    let two = c.via(2).await;
    two.batch_execute("ALTER TABLE tickets ADD COLUMN lucky float DEFAULT random()")
        .await
        .unwrap();
    two.batch_execute(
        "BEGIN; ALTER TABLE tickets ALTER COLUMN n TYPE text USING n::text || '-' || floor(random() * 1000)::text; \
         ALTER TABLE tickets ADD COLUMN made timestamptz DEFAULT clock_timestamp(); COMMIT",
    )
    .await
    .unwrap();
    // A table without a primary key gets its rows replaced by the
    // origin's; a partitioned one has no way to: refused.
    two.batch_execute(
        "CREATE TABLE loose (n int); INSERT INTO loose SELECT generate_series(1, 20); \
         ALTER TABLE loose ADD COLUMN r float DEFAULT random()",
    )
    .await
    .unwrap();
    c.converge(
        "SELECT count(*)::text || md5(string_agg(t::text, ';' ORDER BY n)) FROM loose t",
        2,
        &[1, 3],
    )
    .await;
    two.batch_execute(
        "CREATE TABLE loose_parted (n int) PARTITION BY RANGE (n); \
         CREATE TABLE loose_parted_1 PARTITION OF loose_parted FOR VALUES FROM (0) TO (10); \
         INSERT INTO loose_parted VALUES (1)",
    )
    .await
    .unwrap();
    let e = two
        .batch_execute("ALTER TABLE loose_parted ADD COLUMN r float DEFAULT random()")
        .await
        .unwrap_err();
    assert_eq!(testkit::sqlstate(&e).as_deref(), Some("0A000"), "{e}");
    c.converge(
        "SELECT count(*)::text || md5(string_agg(t::text, ';' ORDER BY id)) FROM tickets t",
        2,
        &[1, 3],
    )
    .await;
    let distinct: i64 = c
        .direct(3)
        .await
        .query_one("SELECT count(DISTINCT lucky) FROM tickets", &[])
        .await
        .unwrap()
        .get(0);
    assert!(distinct > 250, "{distinct}");
    // A rewrite of a table others inherit from sends each table's own rows
    // (the parent's scan would include the children's); TRUNCATE ONLY of
    // the parent leaves the children's rows everywhere.
    two.batch_execute(
        "CREATE TABLE family (f1 int, f2 int); \
         CREATE TABLE family_child (extra int) INHERITS (family); \
         INSERT INTO family VALUES (1, 1); \
         INSERT INTO family_child VALUES (2, 2, 2); \
         ALTER TABLE family ALTER COLUMN f2 TYPE bigint USING f2::bigint * 10; \
         CREATE TABLE kin (id int PRIMARY KEY, v int); \
         CREATE TABLE kin_child () INHERITS (kin); \
         INSERT INTO kin VALUES (1, 1); \
         INSERT INTO kin_child VALUES (2, 2); \
         TRUNCATE ONLY kin",
    )
    .await
    .unwrap();
    for b in 1..=3 {
        c.wait_for(
            b,
            "SELECT (SELECT string_agg(f1 || ':' || f2, ',' ORDER BY f1) FROM ONLY family) || '/' \
                    || (SELECT string_agg(f1 || ':' || f2, ',') FROM family_child) || '/' \
                    || (SELECT count(*) FROM ONLY kin) || ':' || (SELECT count(*) FROM kin_child)",
            |v| v == "1:10/2:20/0:1",
        )
        .await;
    }
    assert_eq!(c.schema(1), c.schema(3));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn materialized_views_replicate_unless_their_query_is_volatile() {
    let c = cluster("").await;
    let one = c.via(1).await;
    one.batch_execute(
        "CREATE TABLE sales (id int PRIMARY KEY, amount int);
         INSERT INTO sales SELECT g, g * 10 FROM generate_series(1, 20) g;
         CREATE MATERIALIZED VIEW totals AS SELECT sum(amount) AS total, count(*) AS n FROM sales",
    )
    .await
    .unwrap();
    c.via(2)
        .await
        .batch_execute("INSERT INTO sales VALUES (21, 5); REFRESH MATERIALIZED VIEW totals")
        .await
        .unwrap();
    for b in 1..=3 {
        c.wait_for(b, "SELECT total || '/' || n FROM totals", |v| {
            v == "2105/21"
        })
        .await;
    }
    let e = one
        .batch_execute("CREATE MATERIALIZED VIEW dice_view AS SELECT random() AS r")
        .await
        .unwrap_err();
    assert_eq!(testkit::sqlstate(&e).as_deref(), Some("0A000"), "{e}");
    assert!(message(&e).contains("volatile"), "{e:?}");
    for b in 1..=3 {
        c.wait_for(b, "SELECT (to_regclass('dice_view') IS NULL)::text", |v| {
            v == "true"
        })
        .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ddl_that_a_statement_or_function_runs_on_temporary_objects_stays_on_its_backend() {
    let c = cluster("").await;
    let one = c.via(1).await;
    // REFRESH … CONCURRENTLY makes, alters and drops work tables of its
    // own (DDL that the refresh runs): it works, and the view's rows are
    // the same everywhere.
    one.batch_execute(
        "CREATE TABLE stock (id int PRIMARY KEY, qty int);
         INSERT INTO stock SELECT g, g FROM generate_series(1, 10) g;
         CREATE MATERIALIZED VIEW stock_view AS SELECT id, qty * 2 AS double FROM stock;
         CREATE UNIQUE INDEX ON stock_view (id)",
    )
    .await
    .unwrap();
    c.via(2)
        .await
        .batch_execute("UPDATE stock SET qty = 100 WHERE id = 3; DELETE FROM stock WHERE id = 4")
        .await
        .unwrap();
    // (Each backend computes the view from its own rows: every backend
    // has node 2's changes before the refresh.)
    for b in 1..=3 {
        c.wait_for(b, "SELECT sum(qty)::text FROM stock", |v| v == "148")
            .await;
    }
    one.batch_execute("REFRESH MATERIALIZED VIEW CONCURRENTLY stock_view")
        .await
        .unwrap();
    let view = "SELECT string_agg(id || ':' || double, ',' ORDER BY id) FROM stock_view";
    for b in 1..=3 {
        c.wait_for(b, view, |v| {
            v == "1:2,2:4,3:200,5:10,6:12,7:14,8:16,9:18,10:20"
        })
        .await;
    }
    // A function's temporary table, and a DROP … IF EXISTS that finds
    // nothing, stay on the backend that ran them (they change nothing
    // elsewhere).
    one.batch_execute(
        "CREATE FUNCTION scratch_sum() RETURNS bigint LANGUAGE plpgsql AS $$
         DECLARE total bigint;
         BEGIN
             DROP TABLE IF EXISTS scratch;
             CREATE TEMP TABLE scratch (v int);
             INSERT INTO scratch SELECT qty FROM stock;
             SELECT sum(v) INTO total FROM scratch;
             DROP TABLE scratch;
             RETURN total;
         END $$",
    )
    .await
    .unwrap();
    for _ in 0..2 {
        let total: i64 = one
            .query_one("SELECT scratch_sum()", &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(total, 148);
    }
    for b in 1..=3 {
        c.wait_for(
            b,
            "SELECT (to_regprocedure('scratch_sum()') IS NOT NULL)::text",
            |v| v == "true",
        )
        .await;
    }
    assert_eq!(c.schema(1), c.schema(2));
    assert_eq!(c.schema(1), c.schema(3));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_that_is_not_replicated_is_refused_unless_configured_local() {
    let c = procs::cluster_opts(procs::Options {
        replication: "local_databases = [\"template1\"]".into(),
        ..procs::Options::default()
    })
    .await;
    // Every backend has these databases; only "postgres" replicates.
    for b in 1..=3 {
        c.direct(b)
            .await
            .batch_execute("CREATE DATABASE elsewhere")
            .await
            .unwrap();
    }
    let url = |db: &str| {
        format!(
            "host=127.0.0.1 port={} user=postgres dbname={db}",
            c.ports[0]
        )
    };
    let e = testkit::connect(&url("elsewhere")).await.unwrap_err();
    assert_eq!(testkit::sqlstate(&e).as_deref(), Some("0A000"), "{e}");
    assert!(message(&e).contains("not replicated"), "{e:?}");
    // A database configured local is served, from this node's backend.
    let local = testkit::connect(&url("template1")).await.unwrap();
    let one: i32 = local.query_one("SELECT 1", &[]).await.unwrap().get(0);
    assert_eq!(one, 1);
    c.via(1).await.batch_execute("SELECT 1").await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transaction_longer_than_the_lease_keeps_it_until_it_ends() {
    let c = cluster("ddl_lease_ms = 600").await;
    c.exec(1, "CREATE TABLE slow (id int PRIMARY KEY)").await;
    let first = c.via(1).await;
    let second = c.via(2).await;
    first
        .batch_execute("BEGIN; ALTER TABLE slow ADD COLUMN a int")
        .await
        .unwrap();
    let waiting = tokio::spawn(async move {
        second
            .batch_execute("ALTER TABLE slow ADD COLUMN b int")
            .await
            .map(|()| Instant::now())
    });
    // Three lease lengths: the open transaction renews its lease.
    tokio::time::sleep(Duration::from_millis(1800)).await;
    assert!(
        !waiting.is_finished(),
        "the lease passed on while its transaction was open"
    );
    let committed = Instant::now();
    first.batch_execute("COMMIT").await.unwrap();
    let done = waiting.await.unwrap().unwrap();
    assert!(done >= committed);
    for b in 1..=3 {
        c.wait_for(
            b,
            "SELECT string_agg(attname, ',' ORDER BY attnum) FROM pg_attribute WHERE attrelid = 'slow'::regclass AND attnum > 0",
            |v| v == "id,a,b",
        )
        .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_extension_replicates_with_the_objects_its_script_makes() {
    let c = cluster("").await;
    let one = c.via(1).await;
    // psycopg 3 style: the extended protocol.
    one.execute("CREATE EXTENSION IF NOT EXISTS hstore", &[])
        .await
        .unwrap();
    one.batch_execute(
        "CREATE TABLE props (id int PRIMARY KEY, p hstore);
         INSERT INTO props VALUES (1, 'a=>1, b=>2')",
    )
    .await
    .unwrap();
    for b in 1..=3 {
        c.wait_for(b, "SELECT (p -> 'b') FROM props WHERE id = 1", |v| v == "2")
            .await;
    }
    one.batch_execute("DROP EXTENSION hstore CASCADE")
        .await
        .unwrap();
    for b in 1..=3 {
        c.wait_for(
            b,
            "SELECT (NOT EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'hstore'))::text",
            |v| v == "true",
        )
        .await;
    }
    assert_eq!(c.schema(2), c.schema(1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn arrays_keep_their_bounds_on_every_backend_however_their_rows_travel() {
    let c = cluster("").await;
    let one = c.via(1).await;
    one.batch_execute(
        "CREATE TABLE arr (id int PRIMARY KEY, a int[], b text[][], k int);
         INSERT INTO arr VALUES (1, '[0:1]={1,2}', '{{x,y},{z,w}}', 1), (2, '{3,4}', NULL, 2),
                                (3, '[-2:-2]={5}', '[2:2][3:3]={{q}}', 3);
         UPDATE arr SET a[5] = 9 WHERE id = 2;
         INSERT INTO arr SELECT g, '{7}', NULL, g FROM generate_series(10, 12) g;
         UPDATE arr SET a = '[4:4]={NULL}' WHERE id = 10;
         CREATE TABLE keyless_arr AS SELECT id, a, b FROM arr;
         ALTER TABLE arr ADD COLUMN r float8 DEFAULT random();",
    )
    .await
    .unwrap();
    let rows = "SELECT string_agg(id || ':' || coalesce(a::text, '-') || ':' || coalesce(b::text, '-'), ' ' ORDER BY id) \
                || ' / ' || (SELECT string_agg(id || ':' || coalesce(a::text, '-') || ':' || coalesce(b::text, '-'), ' ' ORDER BY id) FROM keyless_arr) \
                || ' / ' || (SELECT string_agg(r::text, ',' ORDER BY id) FROM arr) FROM arr";
    let on_origin: String = c.direct(1).await.query_one(rows, &[]).await.unwrap().get(0);
    assert!(
        on_origin.starts_with("1:[0:1]={1,2}:{{x,y},{z,w}} 2:{3,4,NULL,NULL,9}:- 3:[-2:-2]={5}:[2:2][3:3]={{q}} 10:[4:4]={NULL}:- "),
        "{on_origin}"
    );
    c.converge(rows, 1, &[2, 3]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_values_and_json_nulls_reach_every_backend_exactly() {
    // json keeps its text as written (white space, key order, duplicate
    // keys); a JSON null is not SQL NULL, in json and jsonb alike, in
    // arrays too; whichever way rows travel: changes through any node,
    // keyless matches, CREATE TABLE AS, a rewrite.
    let c = cluster("").await;
    let one = c.via(1).await;
    one.batch_execute(
        r#"CREATE DOMAIN jdom AS json;
           CREATE TABLE js (id int PRIMARY KEY, j json, b jsonb, d jdom, ja json[], ba jsonb[]);
           INSERT INTO js VALUES
             (1, '{"b": 1,   "a" :2, "a": 3}', '{"x": null}', '[1,  2]', ARRAY['{"k" : 1}', NULL, 'null']::json[], ARRAY['null', NULL]::jsonb[]),
             (2, 'null', 'null', 'null', NULL, NULL),
             (3, NULL, NULL, NULL, '{}', '{}'),
             (4, '"text"', '"text"', ' 7 ', NULL, NULL);
           CREATE TABLE jk (j json, b jsonb);
           INSERT INTO jk VALUES ('{"z":1,"a":2}', 'null'), ('{"z":1, "a":2}', NULL), (NULL, 'null');"#,
    )
    .await
    .unwrap();
    // Through the other nodes: a change of white space only, a JSON null
    // for SQL NULL and back, and keyless rows told apart by their text.
    let two = c.via(2).await;
    two.batch_execute(
        r#"UPDATE js SET j = '{"b":1,"a":2,"a":3}' WHERE id = 1;
           UPDATE js SET b = 'null', j = NULL WHERE id = 3;
           UPDATE js SET b = NULL WHERE id = 2;
           UPDATE jk SET b = '{"n": 1}' WHERE j::text = '{"z":1, "a":2}';
           DELETE FROM jk WHERE j IS NULL AND b = 'null';"#,
    )
    .await
    .unwrap();
    // (CREATE TABLE AS copies what backend 3 holds: node 2's changes first.)
    c.wait_for(
        3,
        "SELECT (SELECT count(*) FROM jk) || ' ' || (SELECT j::text FROM js WHERE id = 1)",
        |v| v == r#"2 {"b":1,"a":2,"a":3}"#,
    )
    .await;
    let three = c.via(3).await;
    three
        .batch_execute(
            "CREATE TABLE js_copy AS SELECT * FROM js; \
             ALTER TABLE js ADD COLUMN r float8 DEFAULT random()",
        )
        .await
        .unwrap();
    let show = |table: &str| {
        format!(
            "SELECT string_agg(id || ':' || coalesce(j::text, '-') || ':' || coalesce(b::text, '-') \
                    || ':' || coalesce(d::text, '-') || ':' || coalesce(ja::text, '-') \
                    || ':' || coalesce(ba::text, '-'), ' | ' ORDER BY id) FROM {table}"
        )
    };
    let state = format!(
        "SELECT ({}) || ' / ' || ({}) || ' / ' || \
                (SELECT string_agg(coalesce(j::text, '-') || ':' || coalesce(b::text, '-'), ' | ' ORDER BY j::text COLLATE \"C\", b::text) FROM jk) \
                || ' / ' || (SELECT string_agg(r::text, ',' ORDER BY id) FROM js)",
        show("js"),
        show("js_copy")
    );
    c.wait_for(3, "SELECT count(*)::text FROM js_copy", |v| v == "4")
        .await;
    let on_origin: String = c
        .direct(3)
        .await
        .query_one(&state, &[])
        .await
        .unwrap()
        .get(0);
    let rows = r#"1:{"b":1,"a":2,"a":3}:{"x": null}:[1,  2]:{"{\"k\" : 1}",NULL,"null"}:{"null",NULL} | 2:null:-:null:-:- | 3:-:null:-:{}:{} | 4:"text":"text": 7 :-:-"#;
    assert!(
        on_origin.starts_with(&format!("{rows} / {rows} / ")),
        "{on_origin}"
    );
    assert!(
        on_origin.contains(r#" / {"z":1, "a":2}:{"n": 1} | {"z":1,"a":2}:null / "#),
        "{on_origin}"
    );
    c.converge(&state, 3, &[1, 2]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscriptions_go_through_the_ddl_log_to_every_backend() {
    let c = cluster("").await;
    let one = c.via(1).await;
    // A statement of this route that fails answers as PostgreSQL does,
    // with the error's position in the client's text.
    let bad = "CREATE SUBSCRIPTION regress_sub PUBLICATION p";
    let through = one.batch_execute(bad).await.unwrap_err();
    let direct = c.direct(1).await.batch_execute(bad).await.unwrap_err();
    let (through, direct) = (
        through.as_db_error().unwrap(),
        direct.as_db_error().unwrap(),
    );
    assert_eq!(through.message(), direct.message());
    assert!(direct.position().is_some());
    assert_eq!(through.position(), direct.position());
    for sql in [
        "CREATE SUBSCRIPTION regress_sub CONNECTION 'dbname=regress_nowhere' PUBLICATION p \
         WITH (connect = false)",
        "ALTER SUBSCRIPTION regress_sub SET (slot_name = NONE)",
    ] {
        one.batch_execute(sql).await.unwrap();
    }
    // In a transaction block too (ALTER and DROP SUBSCRIPTION fire event
    // triggers there, which find them recorded already).
    one.batch_execute("BEGIN").await.unwrap();
    one.batch_execute("ALTER SUBSCRIPTION regress_sub SET (synchronous_commit = 'on')")
        .await
        .unwrap();
    one.batch_execute("COMMIT").await.unwrap();
    for b in 1..=3 {
        c.wait_for(
            b,
            "SELECT count(*)::text FROM pg_subscription WHERE subname = 'regress_sub' \
             AND subslotname IS NULL AND subsynccommit = 'on'",
            |v| v == "1",
        )
        .await;
    }
    one.batch_execute("BEGIN").await.unwrap();
    one.batch_execute("DROP SUBSCRIPTION regress_sub")
        .await
        .unwrap();
    one.batch_execute("COMMIT").await.unwrap();
    for b in 1..=3 {
        c.wait_for(
            b,
            "SELECT count(*)::text FROM pg_subscription WHERE subname = 'regress_sub'",
            |v| v == "0",
        )
        .await;
    }
}
