//! Global sequences end to end: serial, bigserial, identity and CREATE
//! SEQUENCE made through Chorus become snowflake or galloc sequences that
//! never hand out the same value on two backends.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashSet;
use std::time::{Duration, Instant};

use chorus_testkit as testkit;
use chorus_testkit::procs;
use procs::{cluster, Cluster};
use tokio_postgres::Client;

/// Insert `n` rows into `table` through node `node`, reconnecting after
/// errors (a node restart); the ids of the inserts that were acknowledged,
/// and how many attempts failed (their rows may or may not exist).
async fn insert_rows(port: u16, node: usize, table: String, n: usize) -> (Vec<i64>, usize) {
    let conninfo = format!("host=127.0.0.1 port={port} user=postgres dbname=postgres");
    let mut ids = Vec::new();
    let mut failed = 0;
    let mut client: Option<Client> = None;
    let deadline = Instant::now() + Duration::from_secs(120);
    while ids.len() < n {
        assert!(
            Instant::now() < deadline,
            "inserts through node {node} stalled"
        );
        if client.as_ref().is_none_or(Client::is_closed) {
            client = testkit::connect(&conninfo).await.ok();
            if client.is_none() {
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        }
        let sql = format!("INSERT INTO {table} (node) VALUES ({node}) RETURNING id::int8");
        match client.as_ref().unwrap().query_one(&sql, &[]).await {
            Ok(row) => ids.push(row.get(0)),
            Err(_) => {
                failed += 1;
                client = None;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
    (ids, failed)
}

/// Rows of `table` on backend `b`, and an ordered hash of them.
async fn table_state(c: &Cluster, b: usize, table: &str) -> (i64, String) {
    let row = c
        .direct(b)
        .await
        .query_one(
            &format!(
                "SELECT count(*), coalesce(md5(string_agg(t::text, ',' ORDER BY id)), '') FROM {table} t"
            ),
            &[],
        )
        .await
        .unwrap();
    (row.get(0), row.get(1))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serial_bigserial_and_identity_through_every_node_never_collide_even_across_a_restart() {
    let mut c = cluster("").await;
    c.exec(1, "CREATE TABLE big (id bigserial PRIMARY KEY, node int)")
        .await;
    c.exec(2, "CREATE TABLE small (id serial PRIMARY KEY, node int)")
        .await;
    c.via(3)
        .await
        .batch_execute(
            "CREATE TABLE ident (id int GENERATED ALWAYS AS IDENTITY PRIMARY KEY, node int)",
        )
        .await
        .unwrap();
    c.wait_ddl(3).await;
    let kinds: Vec<(String, String)> = c
        .direct(1)
        .await
        .query(
            "SELECT seq, kind FROM chorus.global_sequence ORDER BY seq",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(
        kinds,
        vec![
            ("public.big_id_seq".to_owned(), "snowflake".to_owned()),
            ("public.ident_id_seq".to_owned(), "galloc".to_owned()),
            ("public.small_id_seq".to_owned(), "galloc".to_owned()),
        ]
    );
    // Two clients per node and table, 60 inserts each; node 2 restarts
    // in the middle.
    let mut tasks = Vec::new();
    for table in ["big", "small", "ident"] {
        for node in 1..=3 {
            for _ in 0..2 {
                tasks.push(tokio::spawn(insert_rows(
                    c.ports[node - 1],
                    node,
                    table.to_owned(),
                    60,
                )));
            }
        }
    }
    // In the middle: once a sixth of the rows of each table are in.
    for table in ["big", "small", "ident"] {
        c.wait_for(
            2,
            &format!("SELECT (count(*) >= 60)::text FROM {table}"),
            |v| v == "true",
        )
        .await;
    }
    c.kill_node(2);
    tokio::time::sleep(Duration::from_millis(500)).await;
    c.start_node(2);
    let mut acknowledged: Vec<Vec<i64>> = Vec::new();
    let mut failed = Vec::new();
    for task in tasks {
        let (ids, failures) = task.await.unwrap();
        acknowledged.push(ids);
        failed.push(failures);
    }
    for (t, table) in ["big", "small", "ident"].iter().enumerate() {
        let ids: Vec<i64> = acknowledged[t * 6..(t + 1) * 6].concat();
        let unknown: usize = failed[t * 6..(t + 1) * 6].iter().sum();
        let unique: HashSet<i64> = ids.iter().copied().collect();
        assert_eq!(unique.len(), ids.len(), "{table}: duplicate ids handed out");
        assert_eq!(ids.len(), 360);
        // The same rows on every backend: every acknowledged one, plus at
        // most the attempts whose answer was lost in the restart.
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let states = [
                table_state(&c, 1, table).await,
                table_state(&c, 2, table).await,
                table_state(&c, 3, table).await,
            ];
            if states[0].0 >= 360 && states.iter().all(|s| s == &states[0]) {
                assert!(states[0].0 as usize <= 360 + unknown, "{table}: {states:?}");
                break;
            }
            assert!(Instant::now() < deadline, "{table}: {states:?}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let present: HashSet<i64> = c
            .direct(2)
            .await
            .query(&format!("SELECT id::int8 FROM {table}"), &[])
            .await
            .unwrap()
            .iter()
            .map(|r| r.get(0))
            .collect();
        assert!(
            unique.is_subset(&present),
            "{table}: an acknowledged row is missing"
        );
    }
    for b in 1..=3 {
        let conflicts = c.conflicts(b).await;
        assert_eq!(conflicts, 0, "backend {b} logged conflicts");
    }
    // Snowflake layout: the low 10 bits name the backend that made the id,
    // the time bits are close to now.
    let big = c
        .direct(1)
        .await
        .query("SELECT id, node FROM big", &[])
        .await
        .unwrap();
    let mut owner: std::collections::HashMap<i32, i64> = std::collections::HashMap::new();
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    for row in big {
        let (id, node): (i64, i32) = (row.get(0), row.get(1));
        let low = id & 1023;
        assert_eq!(*owner.entry(node).or_insert(low), low, "node {node}");
        let ms = (id >> 22) + 1_704_067_200_000;
        assert!(
            (now_ms - ms).abs() < 120_000,
            "time bits {ms} vs now {now_ms}"
        );
    }
    let lows: HashSet<i64> = owner.values().copied().collect();
    assert_eq!(lows.len(), 3, "{owner:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snowflake_burst_stays_unique_and_increasing_and_a_restart_never_repeats() {
    let mut c = cluster("").await;
    let one = c.via(1).await;
    one.batch_execute("CREATE SEQUENCE burst").await.unwrap();
    let ids: Vec<i64> = one
        .query_one(
            "SELECT array_agg(nextval('burst') ORDER BY g) FROM generate_series(1, 50000) g",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(ids.windows(2).all(|w| w[0] < w[1]), "not increasing");
    let low = ids[0] & 1023;
    assert!(ids.iter().all(|id| id & 1023 == low));
    // 50 000 values are more than 4096 milliseconds' worth of counter:
    // the time bits moved on by at least 12 ms over the burst.
    assert!((ids[ids.len() - 1] >> 22) - (ids[0] >> 22) >= 12);
    let max = ids[ids.len() - 1];
    // The node restarts, then its backend crashes and restarts: the
    // sequence goes on above everything it handed out.
    c.kill_node(1);
    c.start_node(1);
    let after: i64 = c.int_via(1, "SELECT nextval('burst')").await;
    assert!(after > max);
    c.kill_node(1);
    c.backends[0].kill();
    c.backends[0].start().unwrap();
    c.start_node(1);
    let again: i64 = c.int_via(1, "SELECT nextval('burst')").await;
    assert!(again > after);
    // currval works as on PostgreSQL.
    let client = c.via(2).await;
    let next: i64 = client
        .query_one("SELECT nextval('burst')", &[])
        .await
        .unwrap()
        .get(0);
    let current: i64 = client
        .query_one("SELECT currval('burst')", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(next, current);
    assert_ne!(next & 1023, low, "node 2's values carry its own id");
    // Node-wide ALTER SEQUENCE and setval() are refused with a reason.
    let e = client
        .batch_execute("ALTER SEQUENCE burst RESTART WITH 1")
        .await
        .unwrap_err();
    assert_eq!(testkit::sqlstate(&e).as_deref(), Some("0A000"), "{e:?}");
    let e = client
        .batch_execute("SELECT setval('burst', 5)")
        .await
        .unwrap_err();
    assert_eq!(testkit::sqlstate(&e).as_deref(), Some("0A000"), "{e:?}");
    let e = client
        .query_one("SELECT SetVal ('burst', 5)", &[])
        .await
        .unwrap_err();
    assert_eq!(testkit::sqlstate(&e).as_deref(), Some("0A000"), "{e:?}");
    // So are an identity column's sequence options; its kind, or its
    // column's type, change. (Through node 1, whose range holds 100.)
    let one = c.via(1).await;
    one.batch_execute("CREATE TABLE idents (a int GENERATED ALWAYS AS IDENTITY, b text)")
        .await
        .unwrap();
    for sql in [
        "ALTER TABLE idents ALTER COLUMN a SET GENERATED BY DEFAULT SET INCREMENT BY 2 SET START WITH 100 RESTART",
        "ALTER TABLE idents ALTER COLUMN a RESTART WITH 100",
        // Global values go upwards: a descending sequence is refused.
        "CREATE SEQUENCE downwards AS integer INCREMENT -1",
    ] {
        let e = one.batch_execute(sql).await.unwrap_err();
        assert_eq!(testkit::sqlstate(&e).as_deref(), Some("0A000"), "{sql}: {e:?}");
    }
    one.batch_execute(
        "ALTER TABLE idents ALTER COLUMN a SET GENERATED BY DEFAULT; \
             ALTER TABLE idents ALTER COLUMN a TYPE bigint",
    )
    .await
    .unwrap();
    // A backend clock that steps back: the sequence is an hour ahead of the
    // clock (set directly on the backend), and stays ahead, increasing.
    let ahead: i64 = c
        .direct(1)
        .await
        .query_one(
            "SELECT setval('burst', chorus.snowflake_now($1) + (3600000::bigint << 22))",
            &[&(low as i32)],
        )
        .await
        .unwrap()
        .get(0);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let later: i64 = c.int_via(1, "SELECT nextval('burst')").await;
    assert_eq!(later, ahead + 1024);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn galloc_ranges_refill_ahead_and_a_cut_off_node_serves_until_its_range_is_used_up() {
    let c =
        cluster("galloc_range_size = 200\ngalloc_refill_percent = 50\ngalloc_switch_percent = 20")
            .await;
    c.exec(1, "CREATE SEQUENCE g AS integer").await;
    c.wait_ddl(1).await;
    // A sequence that a function called alone makes (under a lease it asks
    // for mid-statement, without a stamp) gets the configured range too.
    c.exec(
        2,
        "CREATE FUNCTION make_g2() RETURNS void LANGUAGE plpgsql AS $f$ BEGIN \
           CREATE SEQUENCE g2 AS integer; END $f$",
    )
    .await;
    c.exec(2, "SELECT make_g2()").await;
    c.wait_ddl(3).await;
    let width = "SELECT string_agg((max_value - min_value + 1)::text, ',' ORDER BY sequencename) \
                 FROM pg_sequences WHERE sequencename IN ('g', 'g2')";
    for b in 1..=3 {
        c.wait_for(b, width, |v| v == "200,200").await;
    }
    // START is kept: the backend of sequence id 1 hands out from it, the
    // others from their blocks above it.
    c.exec(1, "CREATE SEQUENCE started AS integer START 1000")
        .await;
    c.wait_ddl(4).await;
    for node in 1..=3 {
        let id: i32 = c
            .direct(node)
            .await
            .query_one("SELECT sequence_id FROM chorus.local", &[])
            .await
            .unwrap()
            .get(0);
        let first: i64 = c
            .via(node)
            .await
            .query_one("SELECT nextval('started')", &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(first, 1000 + 200 * i64::from(id - 1), "through node {node}");
    }
    // Steady use through nodes 1 and 2: ranges are fetched ahead and
    // switched to before they run out.
    let mut tasks = Vec::new();
    for node in 1..=2 {
        let client = c.via(node).await;
        tasks.push(tokio::spawn(async move {
            let mut values = Vec::new();
            for _ in 0..400 {
                let v: i64 = client
                    .query_one("SELECT nextval('g')", &[])
                    .await
                    .unwrap()
                    .get(0);
                values.push(v);
                tokio::time::sleep(Duration::from_millis(6)).await;
            }
            values
        }));
    }
    let mut seen = HashSet::new();
    for task in tasks {
        for v in task.await.unwrap() {
            assert!(seen.insert(v), "value {v} handed out twice");
        }
    }
    assert_eq!(seen.len(), 800);
    // Each node used more than one range (200 values each).
    let ranges: HashSet<i64> = seen.iter().map(|v| (v - 1) / 200).collect();
    assert!(ranges.len() >= 4, "{ranges:?}");
    // Cut node 1 off from the Raft group: it serves what it holds (the
    // rest of its range and the one fetched ahead), then fails clearly.
    c.relays[0].block(&[0]);
    c.relays[1].block(&[1]);
    c.relays[2].block(&[1]);
    let one = c.via(1).await;
    let mut served = 0;
    let error = loop {
        match one.query_one("SELECT nextval('g')", &[]).await {
            Ok(row) => {
                let v: i64 = row.get(0);
                assert!(seen.insert(v), "value {v} handed out twice");
                served += 1;
                assert!(served <= 400, "served more than it held");
            }
            Err(e) => break e,
        }
    };
    assert_eq!(
        testkit::sqlstate(&error).as_deref(),
        Some("2200H"),
        "{error:?}"
    );
    assert!(served >= 1);
    // Meanwhile node 2 goes on, with values of its own. (If the cut made
    // the majority elect a new leader, its next range may come a moment
    // later than its current one runs out: it waits for it, boundedly.)
    let two = c.via(2).await;
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let mut got = 0;
    while got < 150 {
        match two.query_one("SELECT nextval('g')", &[]).await {
            Ok(row) => {
                let v: i64 = row.get(0);
                assert!(seen.insert(v), "value {v} handed out twice");
                got += 1;
                tokio::time::sleep(Duration::from_millis(4)).await;
            }
            Err(e)
                if testkit::sqlstate(&e).as_deref() == Some("2200H")
                    && std::time::Instant::now() < deadline =>
            {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => panic!("node 2 stopped serving after {got} values: {e:?}"),
        }
    }
    // Healed, node 1 gets a new range and serves again.
    for relay in &c.relays {
        relay.heal();
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(row) = one.query_one("SELECT nextval('g')", &[]).await {
            let v: i64 = row.get(0);
            assert!(seen.insert(v), "value {v} handed out twice");
            break;
        }
        assert!(Instant::now() < deadline, "node 1 never got a new range");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The metrics show the values left and the values handed out.
    let left = c
        .metric(2, "chorus_galloc_values_left{sequence=\"public.g\"}")
        .await;
    assert!(left.is_some());
    let handed = c
        .metric(2, "chorus_sequence_values_total{kind=\"galloc\"}")
        .await
        .unwrap();
    assert!(handed >= 100.0, "{handed}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn existing_local_sequences_are_converted_by_the_admin_command() {
    let c = cluster("").await;
    // A table made before Chorus, the same on every backend, with rows
    // numbered by its local sequence.
    for b in 1..=3 {
        c.direct(b)
            .await
            .batch_execute(
                "SET chorus.ddl_scope = 'local'; \
                 CREATE TABLE legacy (id serial PRIMARY KEY, v text); \
                 INSERT INTO legacy (v) SELECT 'old' FROM generate_series(1, 50)",
            )
            .await
            .unwrap();
    }
    // (Each node records its sequence id once it has joined.)
    for b in 1..=3 {
        c.wait_for(
            b,
            "SELECT (sequence_id IS NOT NULL)::text FROM chorus.local",
            |v| v == "true",
        )
        .await;
    }
    c.chorus(1, &["adopt", "legacy"]);
    let converted = c.chorus(1, &["convert-sequences", "legacy_id_seq"]);
    assert!(converted.contains("public.legacy_id_seq"), "{converted}");
    // Inserts through two nodes: new ids above the old ones, no two alike.
    let mut ids = HashSet::new();
    for node in [1, 2] {
        let client = c.via(node).await;
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut inserted = 0;
        while inserted < 20 {
            match client
                .query_one("INSERT INTO legacy (v) VALUES ('new') RETURNING id", &[])
                .await
            {
                Ok(row) => {
                    let id: i32 = row.get(0);
                    assert!(id > 50, "{id}");
                    assert!(ids.insert(id), "{id} twice");
                    inserted += 1;
                }
                // Until the node has fetched the sequence's first range.
                Err(e) => {
                    assert_eq!(testkit::sqlstate(&e).as_deref(), Some("2200H"), "{e:?}");
                    assert!(Instant::now() < deadline, "no range for node {node}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }
    for b in 1..=3 {
        c.wait_for(b, "SELECT count(*)::text FROM legacy", |v| v == "90")
            .await;
    }
}
