//! Several replicated databases: each has its own chorus schema, streams
//! and DDL on every backend; DDL and writes apply in the database where
//! they were sent; cluster-wide objects (roles) once per backend; a
//! database created through Chorus replicates until it is dropped.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use chorus_testkit as testkit;
use chorus_testkit::procs;

/// Wait until `sql` gives `expected` in `database` on every backend.
async fn everywhere(c: &procs::Cluster, database: &str, sql: &str, expected: &str) {
    c.agree(database, sql, Some(expected)).await;
}

/// Wait until `sql` gives the same value, not empty, in `database` on
/// every backend.
async fn converged(c: &procs::Cluster, database: &str, sql: &str) {
    c.agree(database, sql, None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ddl_and_writes_apply_in_the_database_where_they_were_sent() {
    let c = procs::cluster_opts(procs::Options {
        replication: "databases = [\"app\"]".into(),
        prepare: vec!["CREATE DATABASE app".into(); 3],
        ..procs::Options::default()
    })
    .await;
    // The same table name in both databases, with different columns, DDL
    // and rows in a transaction over the extended protocol.
    let app1 = c.via_db(1, "app").await;
    app1.batch_execute("BEGIN").await.unwrap();
    app1.execute("CREATE TABLE t (id int PRIMARY KEY, v text)", &[])
        .await
        .unwrap();
    app1.execute("INSERT INTO t VALUES ($1, $2)", &[&1i32, &"app via 1"])
        .await
        .unwrap();
    app1.batch_execute("COMMIT").await.unwrap();
    let main2 = c.via_db(2, "postgres").await;
    main2
        .batch_execute("CREATE TABLE t (id int PRIMARY KEY, w int); INSERT INTO t VALUES (7, 70)")
        .await
        .unwrap();
    // (DDL waits for the other backends only a moment: under load this
    // test waits for the tables itself.)
    for database in ["app", "postgres"] {
        everywhere(
            &c,
            database,
            "SELECT count(*)::text FROM chorus.replicated_table WHERE tbl = 'public.t'",
            "1",
        )
        .await;
    }
    // Writes to app through the other nodes; an index built concurrently
    // (the DDL log's route) in app; a role (cluster-wide) created from a
    // session on app, and a grant to it in app.
    let app3 = c.via_db(3, "app").await;
    app3.execute("INSERT INTO t VALUES ($1, $2)", &[&3i32, &"app via 3"])
        .await
        .unwrap();
    let app2 = c.via_db(2, "app").await;
    app2.batch_execute("INSERT INTO t VALUES (2, 'app via 2')")
        .await
        .unwrap();
    app2.batch_execute("CREATE INDEX CONCURRENTLY t_v ON t (v)")
        .await
        .unwrap();
    app2.batch_execute("CREATE ROLE app_reader").await.unwrap();
    app3.batch_execute("GRANT SELECT ON t TO app_reader")
        .await
        .unwrap();

    everywhere(
        &c,
        "app",
        "SELECT string_agg(id || ':' || v, ',' ORDER BY id) FROM t",
        "1:app via 1,2:app via 2,3:app via 3",
    )
    .await;
    everywhere(
        &c,
        "postgres",
        "SELECT string_agg(id || ':' || w, ',' ORDER BY id) FROM t",
        "7:70",
    )
    .await;
    let index = "SELECT count(*)::text FROM pg_indexes WHERE indexname = 't_v'";
    everywhere(&c, "app", index, "1").await;
    everywhere(&c, "postgres", index, "0").await;
    everywhere(
        &c,
        "app",
        "SELECT has_table_privilege('app_reader', 't', 'SELECT')::text",
        "true",
    )
    .await;
    // A role is dropped after the REVOKE that another database's DDL sent
    // first, on every backend (its DROP waits for that database), and a
    // commit under scope `all` in app waits for app's own streams.
    app3.batch_execute("REVOKE SELECT ON t FROM app_reader")
        .await
        .unwrap();
    c.via_db(1, "postgres")
        .await
        .batch_execute("DROP ROLE app_reader")
        .await
        .unwrap();
    app1.batch_execute("SET chorus.commit_scope = 'all'; INSERT INTO t VALUES (4, 'all')")
        .await
        .unwrap();
    for b in 1..=3 {
        let app = c.direct_db(b, "app").await;
        let row = app.query_one("SELECT v FROM t WHERE id = 4", &[]).await;
        assert_eq!(row.unwrap().get::<_, String>(0), "all", "backend {b}");
    }
    everywhere(
        &c,
        "postgres",
        "SELECT count(*)::text FROM pg_roles WHERE rolname = 'app_reader'",
        "0",
    )
    .await;
    for database in ["app", "postgres"] {
        everywhere(
            &c,
            database,
            "SELECT count(*)::text FROM chorus.ddl_history WHERE error IS NOT NULL",
            "0",
        )
        .await;
    }
    // Each database's DDL history, on every backend alike, holds every
    // entry of the log: its own, and markers for the others'.
    for database in ["app", "postgres"] {
        let history =
            "SELECT string_agg(seq || ':' || (command LIKE '-- %')::text, ',' ORDER BY seq) \
                       FROM chorus.ddl_history";
        converged(&c, database, history).await;
    }
    // Both databases' schemas are identical on every backend.
    for database in ["app", "postgres"] {
        let port = |b: usize| c.backends[b - 1].port();
        let dump = testkit::schema_dump(port(1), database, &[]);
        for b in 2..=3 {
            assert_eq!(
                testkit::schema_dump(port(b), database, &[]),
                dump,
                "{database} on backend {b}"
            );
        }
    }

    // `chorus check` compares app's tables when asked for app: its t has
    // four rows (postgres's one), the same everywhere.
    let report: serde_json::Value =
        serde_json::from_str(&c.chorus(1, &["check", "--database", "app", "--json"])).unwrap();
    assert_eq!(report["rows"], 4, "{report}");
    assert_eq!(report["differing_buckets"], 0, "{report}");

    // A database that is neither replicated nor local is refused, and
    // the message names both settings.
    for b in 1..=3 {
        c.direct(b)
            .await
            .batch_execute("CREATE DATABASE elsewhere")
            .await
            .unwrap();
    }
    let refused = testkit::connect(&format!(
        "host=127.0.0.1 port={} user=postgres dbname=elsewhere",
        c.ports[0]
    ))
    .await
    .err()
    .unwrap();
    assert_eq!(testkit::sqlstate(&refused).as_deref(), Some("0A000"));
    let text = procs::message(&refused);
    assert!(text.contains("replication.databases"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_created_through_chorus_replicates_on_every_node_renamed_or_not_until_dropped() {
    let mut c = procs::cluster_opts(procs::Options {
        replication: "replicate_created_databases = true".into(),
        ..procs::Options::default()
    })
    .await;
    c.via(1)
        .await
        .batch_execute("CREATE DATABASE shop")
        .await
        .unwrap();
    // At once, through another node: DDL and rows in a transaction.
    let shop2 = c.via_db(2, "shop").await;
    shop2
        .batch_execute(
            "BEGIN; CREATE TABLE orders (id int PRIMARY KEY, item text); \
             INSERT INTO orders VALUES (1, 'via 2'); COMMIT",
        )
        .await
        .unwrap();
    everywhere(
        &c,
        "shop",
        "SELECT count(*)::text FROM chorus.replicated_table WHERE tbl = 'public.orders'",
        "1",
    )
    .await;
    c.via_db(3, "shop")
        .await
        .execute("INSERT INTO orders VALUES ($1, $2)", &[&3i32, &"via 3"])
        .await
        .unwrap();
    everywhere(
        &c,
        "shop",
        "SELECT string_agg(id || ':' || item, ',' ORDER BY id) FROM orders",
        "1:via 2,3:via 3",
    )
    .await;
    // A node that starts again finds the database in the log and serves
    // it; what it writes there replicates.
    c.stop_node(3);
    c.start_node(3);
    let shop3 = c.via_db(3, "shop").await;
    shop3
        .batch_execute("ALTER TABLE orders ADD COLUMN qty int DEFAULT 1; INSERT INTO orders VALUES (4, 'after restart', 5)")
        .await
        .unwrap();
    everywhere(
        &c,
        "shop",
        "SELECT string_agg(id || ':' || item || ':' || qty, ',' ORDER BY id) FROM orders",
        "1:via 2:1,3:via 3:1,4:after restart:5",
    )
    .await;
    // Its schema is the same on every backend.
    let port = |b: usize| c.backends[b - 1].port();
    let dump = testkit::schema_dump(port(1), "shop", &[]);
    for b in 2..=3 {
        assert_eq!(
            testkit::schema_dump(port(b), "shop", &[]),
            dump,
            "shop on backend {b}"
        );
    }
    drop(shop3);

    // One the configuration replicates is neither renamed nor dropped,
    // each with its SQLSTATE and a hint.
    let in_shop = c.via_db(1, "shop").await;
    for (sql, code) in [
        ("ALTER DATABASE postgres RENAME TO elsewhere", "0A000"),
        ("DROP DATABASE postgres", "55006"),
    ] {
        let refused = in_shop.batch_execute(sql).await.unwrap_err();
        assert_eq!(testkit::sqlstate(&refused).as_deref(), Some(code), "{sql}");
        assert!(
            procs::message(&refused).contains("configuration"),
            "{}",
            procs::message(&refused)
        );
    }
    drop(in_shop);
    // Through node 2, whose backend has a session in shop (shop2), a
    // rename is refused as PostgreSQL refuses it; through node 1 it goes,
    // the session on backend 2 ends with it, and the database replicates
    // under its new name, with the same slots.
    let lane_slots =
        "SELECT count(*)::text FROM pg_replication_slots WHERE slot_name LIKE '%\\_in\\_%'";
    everywhere(&c, "postgres", lane_slots, "2").await;
    let busy = c
        .via(2)
        .await
        .batch_execute("ALTER DATABASE shop RENAME TO store")
        .await
        .unwrap_err();
    assert_eq!(testkit::sqlstate(&busy).as_deref(), Some("55006"));
    let main1 = c.via(1).await;
    main1
        .batch_execute("ALTER DATABASE shop RENAME TO store")
        .await
        .unwrap();
    everywhere(
        &c,
        "postgres",
        "SELECT string_agg(datname, ',' ORDER BY datname) FROM pg_database \
          WHERE datname IN ('shop', 'store')",
        "store",
    )
    .await;
    assert!(shop2.batch_execute("SELECT 1").await.is_err());
    let store2 = c.via_db(2, "store").await;
    store2
        .batch_execute("INSERT INTO orders VALUES (5, 'renamed', 2)")
        .await
        .unwrap();
    c.via_db(3, "store")
        .await
        .batch_execute(
            "ALTER TABLE orders ADD COLUMN note text; UPDATE orders SET note = 'n' WHERE id = 1",
        )
        .await
        .unwrap();
    everywhere(
        &c,
        "store",
        "SELECT string_agg(id || ':' || qty || ':' || coalesce(note, '-'), ',' ORDER BY id) FROM orders",
        "1:1:n,3:1:-,4:5:-,5:2:-",
    )
    .await;
    everywhere(&c, "postgres", lane_slots, "2").await;
    // An ordinary role (LOGIN, CREATE on the schema) runs a migration-like
    // transaction in it over the extended protocol, through node 3.
    main1
        .batch_execute("CREATE ROLE shopper LOGIN")
        .await
        .unwrap();
    c.via_db(1, "store")
        .await
        .batch_execute("GRANT CREATE ON SCHEMA public TO shopper")
        .await
        .unwrap();
    everywhere(
        &c,
        "store",
        "SELECT has_schema_privilege('shopper', 'public', 'CREATE')::text",
        "true",
    )
    .await;
    let shopper = testkit::connect(&format!(
        "host=127.0.0.1 port={} user=shopper dbname=store",
        c.ports[2]
    ))
    .await
    .unwrap();
    shopper.batch_execute("BEGIN").await.unwrap();
    shopper
        .execute("CREATE TABLE basket (id int PRIMARY KEY, n int)", &[])
        .await
        .unwrap();
    shopper
        .execute("INSERT INTO basket VALUES ($1, $2)", &[&1i32, &2i32])
        .await
        .unwrap();
    shopper.batch_execute("COMMIT").await.unwrap();
    everywhere(
        &c,
        "store",
        "SELECT (SELECT tableowner FROM pg_tables WHERE tablename = 'basket') || ':' \
                || (SELECT string_agg(id || '=' || n, ',') FROM basket)",
        "shopper:1=2",
    )
    .await;
    drop(shopper);
    // It may not create, drop or rename databases (here from another
    // database, where nothing else refuses it first), and its attempts
    // touch nothing: the database still replicates, with its slots.
    let history = "SELECT count(*)::text FROM chorus.ddl_history";
    let before = c.direct(1).await.query_one(history, &[]).await.unwrap();
    let before: String = before.get(0);
    let shopper = testkit::connect(&format!(
        "host=127.0.0.1 port={} user=shopper dbname=postgres",
        c.ports[2]
    ))
    .await
    .unwrap();
    for (sql, code, message) in [
        (
            "DROP DATABASE store",
            "42501",
            "must be owner of database store",
        ),
        (
            "ALTER DATABASE store RENAME TO gone",
            "42501",
            "must be owner of database store",
        ),
        (
            "CREATE DATABASE other",
            "42501",
            "permission denied to create database",
        ),
    ] {
        let refused = shopper.batch_execute(sql).await.unwrap_err();
        assert_eq!(testkit::sqlstate(&refused).as_deref(), Some(code), "{sql}");
        assert_eq!(procs::message(&refused), message, "{sql}");
    }
    drop(shopper);
    let taken = main1
        .batch_execute("CREATE DATABASE store")
        .await
        .unwrap_err();
    assert_eq!(testkit::sqlstate(&taken).as_deref(), Some("42P04"));
    store2
        .execute("INSERT INTO basket VALUES ($1, $2)", &[&2i32, &3i32])
        .await
        .unwrap();
    everywhere(
        &c,
        "store",
        "SELECT string_agg(id || '=' || n, ',' ORDER BY id) FROM basket",
        "1=2,2=3",
    )
    .await;
    everywhere(&c, "postgres", lane_slots, "2").await;
    everywhere(&c, "postgres", history, &before).await;

    // A drop is refused as PostgreSQL refuses it through node 2, where
    // store2 is in it; through node 1 it goes, and store2 ends with it.
    let busy = c
        .via(2)
        .await
        .batch_execute("DROP DATABASE store")
        .await
        .unwrap_err();
    assert_eq!(testkit::sqlstate(&busy).as_deref(), Some("55006"));
    assert!(
        procs::message(&busy).contains("being accessed by other users"),
        "{}",
        procs::message(&busy)
    );
    main1.batch_execute("DROP DATABASE store").await.unwrap();
    everywhere(
        &c,
        "postgres",
        "SELECT count(*)::text FROM pg_database WHERE datname = 'store'",
        "0",
    )
    .await;
    everywhere(&c, "postgres", lane_slots, "0").await;
    assert!(store2.batch_execute("SELECT 1").await.is_err());
    everywhere(
        &c,
        "postgres",
        "SELECT count(*)::text FROM chorus.ddl_history WHERE error IS NOT NULL",
        "0",
    )
    .await;

    // Created again, it replicates again.
    c.via(3)
        .await
        .batch_execute("CREATE DATABASE shop")
        .await
        .unwrap();
    c.via_db(1, "shop")
        .await
        .batch_execute("CREATE TABLE again (id int PRIMARY KEY); INSERT INTO again VALUES (1)")
        .await
        .unwrap();
    everywhere(
        &c,
        "shop",
        "SELECT count(*)::text FROM chorus.replicated_table WHERE tbl = 'public.again'",
        "1",
    )
    .await;
    c.via_db(2, "shop")
        .await
        .batch_execute("INSERT INTO again VALUES (2)")
        .await
        .unwrap();
    everywhere(
        &c,
        "shop",
        "SELECT string_agg(id::text, ',' ORDER BY id) FROM again",
        "1,2",
    )
    .await;
}
