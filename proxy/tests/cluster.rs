//! A replicating cluster end to end: three backends, three Chorus nodes
//! with replication on, clients writing through different nodes.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use chorus_proxy::config::Config;
use chorus_proxy::server::{self, Node};
use chorus_testkit as testkit;
use chorus_testkit::inproc::{cluster, cluster_on, cluster_on_backends, cluster_with};
use tokio::sync::watch;
use tokio_postgres::Client;

#[tokio::test(flavor = "multi_thread")]
async fn writes_through_any_node_converge_and_conflicts_are_logged() {
    let c = cluster(3).await;
    let n1 = c.via(1).await;
    n1.batch_execute("CREATE TABLE users (id int PRIMARY KEY, name text)")
        .await
        .unwrap();
    c.converged("SELECT count(*)::text FROM pg_tables WHERE tablename = 'users'")
        .await;
    let n2 = c.via(2).await;
    // The talk's example: the same key through two nodes at the same moment.
    let (a, b) = tokio::join!(
        n1.batch_execute("INSERT INTO users VALUES (2574, 'An')"),
        n2.batch_execute("INSERT INTO users VALUES (2574, 'Wim')"),
    );
    a.unwrap();
    b.unwrap();
    let winner = c.converged("SELECT name FROM users WHERE id = 2574").await;
    assert!(winner == "An" || winner == "Wim", "{winner}");
    // Each backend that saw the losing write logged it.
    let logged = c.conflicts_logged("insert_insert").await;
    assert!(logged >= 2, "conflicts logged: {logged}");
    let counted = c.conflicts_counted("insert_insert");
    assert!(counted >= 2.0, "conflicts counted: {counted}");
}

#[tokio::test(flavor = "multi_thread")]
async fn pgbench_through_all_three_nodes_leaves_identical_backends() {
    let c = cluster(3).await;
    let pgbench = |node: usize, args: &[&str]| testkit::pgbench(c.nodes[node - 1].port(), args);
    let init = pgbench(1, &["-i", "-s", "1", "-q"]);
    assert!(init.status.success(), "{}", testkit::stderr(&init));
    let table_hash = "SELECT md5(string_agg(a::text, ',' ORDER BY aid)) FROM pgbench_accounts a";
    c.converged(table_hash).await;
    // The primary keys pgbench adds after loading reach every backend (in
    // stream order, after the rows), and the tables are adopted with them.
    let adopted = c
        .converged(
            "SELECT string_agg(tbl || ':' || keyless, ',' ORDER BY tbl) \
             FROM chorus.replicated_table WHERE tbl LIKE 'public.pgbench%'",
        )
        .await;
    assert_eq!(
        adopted,
        "public.pgbench_accounts:false,public.pgbench_branches:false,\
         public.pgbench_history:true,public.pgbench_tellers:false"
    );

    // -N on all three nodes at once.
    let runs: Vec<_> = (1..=3)
        .map(|node| {
            let port = c.nodes[node - 1].port();
            std::thread::spawn(move || {
                testkit::pgbench(port, &["-n", "-N", "-c", "4", "-t", "100"])
            })
        })
        .collect();
    for run in runs {
        let out = run.join().unwrap();
        let text = testkit::stdout(&out);
        assert!(out.status.success(), "{text}\n{}", testkit::stderr(&out));
        assert!(text.contains("number of failed transactions: 0 "), "{text}");
    }
    c.converged(table_hash).await;
    c.converged("SELECT md5(string_agg(t::text, ',' ORDER BY tid)) FROM pgbench_tellers t")
        .await;
    c.converged("SELECT md5(string_agg(b::text, ',' ORDER BY bid)) FROM pgbench_branches b")
        .await;
    c.expect_everywhere("SELECT count(*)::text FROM pgbench_history", "1200")
        .await;
    // Each transaction's delay from origin commit to apply was measured.
    let rendered = c.node_handles[0].metrics.render();
    let delays = rendered
        .lines()
        .find(|l| l.starts_with("chorus_replication_delay_seconds_count{peer=\"pg2\"}"))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse::<f64>().ok())
        .unwrap_or(0.0);
    assert!(delays >= 400.0, "delays measured: {delays}\n{rendered}");
    assert!(rendered.contains("chorus_replication_lag_seconds{peer=\"pg2\"}"));
}

#[tokio::test(flavor = "multi_thread")]
async fn an_application_role_writes_and_runs_ddl_through_every_node() {
    // An ordinary role: LOGIN, CREATE on schema public, nothing else.
    let c = cluster(3).await;
    let admin = c.via(1).await;
    admin
        .batch_execute("CREATE ROLE app LOGIN; GRANT CREATE ON SCHEMA public TO app")
        .await
        .unwrap();
    c.expect_everywhere(
        "SELECT has_schema_privilege('app', 'public', 'CREATE')::text",
        "true",
    )
    .await;
    let init = testkit::pgbench_as(c.nodes[0].port(), "app", &["-i", "-s", "1", "-q"]);
    assert!(init.status.success(), "{}", testkit::stderr(&init));
    let table_hash = "SELECT md5(string_agg(a::text, ',' ORDER BY aid)) FROM pgbench_accounts a";
    c.converged(table_hash).await;
    // Its tables are its own on every backend, and replicate.
    let owners = c
        .converged(
            "SELECT string_agg(DISTINCT tableowner, ',') FROM pg_tables \
             WHERE tablename LIKE 'pgbench%'",
        )
        .await;
    assert_eq!(owners, "app");
    let runs: Vec<_> = (1..=3)
        .map(|node| {
            let port = c.nodes[node - 1].port();
            std::thread::spawn(move || {
                testkit::pgbench_as(port, "app", &["-n", "-N", "-c", "2", "-t", "100"])
            })
        })
        .collect();
    for run in runs {
        let out = run.join().unwrap();
        let text = testkit::stdout(&out);
        assert!(out.status.success(), "{text}\n{}", testkit::stderr(&out));
        assert!(text.contains("number of failed transactions: 0 "), "{text}");
    }
    c.converged(table_hash).await;
    c.converged("SELECT md5(string_agg(t::text, ',' ORDER BY tid)) FROM pgbench_tellers t")
        .await;
    c.expect_everywhere("SELECT count(*)::text FROM pgbench_history", "600")
        .await;

    let as_app = |port: u16| async move {
        testkit::connect(&format!(
            "host=127.0.0.1 port={port} user=app dbname=postgres"
        ))
        .await
    };
    let app = as_app(c.nodes[1].port()).await.unwrap();
    // A missing grant is PostgreSQL's own 42501, through Chorus as directly.
    admin
        .batch_execute("CREATE TABLE secret (id int PRIMARY KEY)")
        .await
        .unwrap();
    c.expect_everywhere(
        "SELECT count(*)::text FROM pg_tables WHERE tablename = 'secret'",
        "1",
    )
    .await;
    let denied = app
        .batch_execute("INSERT INTO secret VALUES (1)")
        .await
        .unwrap_err();
    assert_eq!(
        testkit::sqlstate(&denied).as_deref(),
        Some("42501"),
        "{denied:?}"
    );
    let direct_app = as_app(c.backends[1].port()).await.unwrap();
    let denied = direct_app
        .batch_execute("INSERT INTO secret VALUES (1)")
        .await
        .unwrap_err();
    assert_eq!(
        testkit::sqlstate(&denied).as_deref(),
        Some("42501"),
        "{denied:?}"
    );
    // Chorus's own tables and functions are not the role's, through a node
    // or directly on a backend.
    for (sql, what) in [
        (
            "INSERT INTO chorus.row_version VALUES ('public.secret', '{\"id\": 1}', 1, 1, false)",
            "chorus.row_version",
        ),
        ("SELECT * FROM chorus.conflict", "chorus.conflict"),
        ("SELECT chorus.apply_changes('[]')", "chorus.apply_changes"),
        ("SELECT chorus.adopt('pgbench_history')", "chorus.adopt"),
        (
            "SELECT pg_logical_emit_message(true, 'chorus:0', '{}')",
            "pg_logical_emit_message",
        ),
    ] {
        for client in [&app, &direct_app] {
            let denied = client.batch_execute(sql).await.unwrap_err();
            assert_eq!(
                testkit::sqlstate(&denied).as_deref(),
                Some("42501"),
                "{what}: {denied:?}"
            );
        }
    }
    // Nor can the role quiet capture: a write made directly on backend 2
    // with the apply's setting replicates like any other.
    direct_app
        .batch_execute(
            "SET chorus.applying = 'on'; \
             INSERT INTO pgbench_history (tid, bid, aid, delta, mtime) VALUES (1, 1, 1, 7, now())",
        )
        .await
        .unwrap();
    c.expect_everywhere("SELECT count(*)::text FROM pgbench_history", "601")
        .await;
    // Nor by disabling the triggers of a table it owns: Chorus's are
    // internal (and so not in psql's \d either).
    direct_app
        .batch_execute("ALTER TABLE pgbench_history DISABLE TRIGGER USER")
        .await
        .unwrap();
    let system = direct_app
        .batch_execute("ALTER TABLE pgbench_history DISABLE TRIGGER chorus_capture")
        .await
        .unwrap_err();
    assert_eq!(
        testkit::sqlstate(&system).as_deref(),
        Some("42501"),
        "{system:?}"
    );
    direct_app
        .batch_execute(
            "INSERT INTO pgbench_history (tid, bid, aid, delta, mtime) VALUES (1, 1, 1, 8, now())",
        )
        .await
        .unwrap();
    c.expect_everywhere("SELECT count(*)::text FROM pgbench_history", "602")
        .await;
    c.expect_everywhere(
        "SELECT count(*)::text FROM pg_trigger \
          WHERE tgrelid = 'pgbench_history'::regclass AND NOT tgisinternal",
        "0",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn replicated_ddl_cannot_gain_privileges_on_the_peers() {
    // A role's function that a DDL statement calls tries to leave the role
    // on whichever backend runs it. On the origin it runs in the role's own
    // session; on a peer the statement is replayed by Chorus's superuser
    // session, which must not be reachable from it.
    let c = cluster(2).await;
    let admin = c.via(1).await;
    admin
        .batch_execute("CREATE ROLE esc LOGIN; GRANT CREATE ON SCHEMA public TO esc")
        .await
        .unwrap();
    c.expect_everywhere(
        "SELECT count(*)::text FROM pg_roles WHERE rolname = 'esc'",
        "1",
    )
    .await;
    let app = testkit::connect(&format!(
        "host=127.0.0.1 port={} user=esc dbname=postgres",
        c.nodes[0].port()
    ))
    .await
    .unwrap();
    app.batch_execute(
        "CREATE FUNCTION reset_and_try() RETURNS int LANGUAGE plpgsql AS $$ \
         BEGIN \
             RESET ROLE; \
             IF (SELECT rolsuper FROM pg_roles WHERE rolname = current_user) THEN \
                 CREATE TABLE public.stolen (); \
             END IF; \
             RETURN 1; \
         END $$; \
         CREATE FUNCTION become_postgres() RETURNS int LANGUAGE plpgsql AS $$ \
         BEGIN SET ROLE postgres; RETURN 1; END $$; \
         CREATE TABLE esc_t (id int PRIMARY KEY); \
         INSERT INTO esc_t VALUES (1)",
    )
    .await
    .unwrap();
    // A volatile default is evaluated for the existing row by every
    // backend's rewrite. On the origin RESET ROLE gives the role back to
    // itself; on the peer it is refused, so the statement fails there and
    // says so.
    app.batch_execute("ALTER TABLE esc_t ADD COLUMN v int DEFAULT reset_and_try()")
        .await
        .unwrap();
    let peer = c.direct(2).await;
    let deadline = Instant::now() + Duration::from_secs(60);
    let error = loop {
        let error: Option<String> = peer
            .query_opt(
                "SELECT coalesce(error, 'applied') FROM chorus.ddl_history \
                 WHERE command LIKE 'ALTER TABLE esc_t ADD COLUMN v %'",
                &[],
            )
            .await
            .unwrap()
            .map(|r| r.get(0));
        if let Some(error) = error {
            break error;
        }
        assert!(Instant::now() < deadline, "the peer never applied the DDL");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(error.starts_with("42501"), "{error}");
    c.expect_everywhere(
        "SELECT (to_regclass('public.stolen') IS NULL)::text",
        "true",
    )
    .await;
    // SET ROLE to a role it is not a member of fails on the origin, as in
    // PostgreSQL, so nothing is replicated; a later statement shows where
    // the stream is.
    let denied = app
        .batch_execute("ALTER TABLE esc_t ADD COLUMN w int DEFAULT become_postgres()")
        .await
        .unwrap_err();
    assert_eq!(
        testkit::sqlstate(&denied).as_deref(),
        Some("42501"),
        "{denied:?}"
    );
    app.batch_execute("CREATE TABLE esc_after (id int PRIMARY KEY)")
        .await
        .unwrap();
    c.expect_everywhere(
        "SELECT (to_regclass('public.esc_after') IS NOT NULL)::text",
        "true",
    )
    .await;
    c.expect_everywhere(
        "SELECT count(*)::text FROM information_schema.columns \
         WHERE table_name = 'esc_t' AND column_name = 'w'",
        "0",
    )
    .await;
}

/// Backends that refuse TCP logins without TLS: with `sslmode =
/// "verify-full"`, sessions, replication streams, DDL and control
/// connections all run over TLS, and the cluster replicates as usual,
/// its nodes' Raft RPC over TLS too.
#[tokio::test(flavor = "multi_thread")]
async fn backends_that_take_only_tls_logins_replicate_over_tls() {
    use chorus_proxy::localpg::{LocalPgOptions, LocalPostgres};

    testkit::log_to_test_output("chorus_proxy=info");
    let dir = tempfile::tempdir().unwrap();
    let ca = testkit::TestCa::new(dir.path(), "ca");
    let backends: Vec<LocalPostgres> = (1..=3)
        .map(|i| {
            tokio::task::block_in_place(|| {
                LocalPostgres::create(
                    &testkit::pg_binaries(),
                    &dir.path().join(format!("pg{i}")),
                    LocalPgOptions {
                        tls: Some(chorus_proxy::localpg::LocalTls {
                            required: true,
                            ..ca.issue(&["127.0.0.1"])
                        }),
                        ..LocalPgOptions::default()
                    },
                )
            })
            .unwrap()
        })
        .collect();
    // A login in the clear is refused: nothing below could work without TLS.
    let clear = testkit::connect(&backends[0].conninfo("postgres")).await;
    assert_eq!(
        clear.err().and_then(|e| testkit::sqlstate(&e)).as_deref(),
        Some("28000")
    );
    let backend_extra = format!(
        "sslmode = \"verify-full\"\nsslrootcert = \"{}\"",
        ca.path.display()
    );
    // Each node's Raft certificate, from the same CA.
    for i in 1..=3 {
        let issued = ca.issue(&["127.0.0.1"]);
        std::fs::write(dir.path().join(format!("node{i}.crt")), issued.cert_pem).unwrap();
        std::fs::write(dir.path().join(format!("node{i}.key")), issued.key_pem).unwrap();
    }
    let base = dir.path().to_owned();
    let ca_path = ca.path.clone();
    let raft_tls = move |i: usize| {
        format!(
            "tls_cert = \"{0}/node{i}.crt\"\ntls_key = \"{0}/node{i}.key\"\ntls_ca = \"{1}\"",
            base.display(),
            ca_path.display()
        )
    };
    let c = cluster_on_backends(
        dir,
        backends,
        &backend_extra,
        &raft_tls,
        |_| String::new(),
        "",
    )
    .await;

    // DDL through node 1, writes through every node, over both protocols.
    c.create_table(
        1,
        "CREATE TABLE sealed (id int PRIMARY KEY, v text)",
        "public.sealed",
    )
    .await;
    let one = c.via(1).await;
    for node in 1..=3 {
        let client = c.via(node).await;
        client
            .execute(
                "INSERT INTO sealed VALUES ($1, $2)",
                &[&i32::try_from(node).unwrap(), &format!("via {node}")],
            )
            .await
            .unwrap();
        client
            .batch_execute(&format!(
                "INSERT INTO sealed VALUES ({}, 'simple')",
                node + 10
            ))
            .await
            .unwrap();
    }
    let ssl: bool = one
        .query_one(
            "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(ssl, "a session's backend connection is not encrypted");
    let expected = "1:via 1,2:via 2,3:via 3,11:simple,12:simple,13:simple";
    c.expect_everywhere(
        "SELECT string_agg(id || ':' || v, ',' ORDER BY id) FROM sealed",
        expected,
    )
    .await;
    // Raft RPC takes TLS only: the admin command with the secret but
    // without the certificate is refused, with it heard.
    let cluster = c.node_handles[0].config.cluster.clone().unwrap();
    let raft = cluster.raft_listen.to_string();
    let remove = |tls| {
        chorus_consensus::admin_request(
            &raft,
            "test-secret",
            tls,
            None,
            Some(9),
            Duration::from_secs(10),
        )
    };
    assert!(remove(None).await.is_err());
    assert_eq!(
        remove(cluster.tls.as_ref()).await.as_deref(),
        Ok("node 9 removed")
    );
    // Every backend serves its two peers' streams (walsenders) and control
    // connections, all over TLS; no TCP connection is in the clear.
    for b in 1..=3 {
        let row = c
            .direct(b)
            .await
            .query_one(
                "SELECT count(*) FILTER (WHERE a.backend_type = 'walsender' AND s.ssl), \
                        count(*) FILTER (WHERE a.backend_type = 'client backend' \
                                           AND a.application_name = 'chorus replication' AND s.ssl), \
                        count(*) FILTER (WHERE NOT s.ssl) \
                 FROM pg_stat_activity a JOIN pg_stat_ssl s USING (pid) \
                 WHERE a.client_addr IS NOT NULL",
                &[],
            )
            .await
            .unwrap();
        let (walsenders, control, clear): (i64, i64, i64) = (row.get(0), row.get(1), row.get(2));
        assert!(
            walsenders >= 2,
            "backend {b}: {walsenders} walsenders over TLS"
        );
        assert!(
            control >= 1,
            "backend {b}: {control} control connections over TLS"
        );
        assert_eq!(clear, 0, "backend {b}: connections in the clear");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_message_that_is_not_a_chorus_record_is_skipped_logged_and_counted() {
    // Only a superuser can still emit messages; one that is not capture's
    // record (here malformed, and non-transactional) must not hold up the
    // changes after it.
    let c = cluster(2).await;
    c.create_table(1, "CREATE TABLE t (id int PRIMARY KEY)", "public.t")
        .await;
    c.direct(1)
        .await
        .batch_execute(
            "BEGIN; \
             SELECT pg_logical_emit_message(true, 'chorus:0', '{}'); \
             SELECT pg_logical_emit_message(false, 'chorus', 'x'); \
             INSERT INTO t VALUES (1); \
             COMMIT",
        )
        .await
        .unwrap();
    c.via(1)
        .await
        .batch_execute("INSERT INTO t VALUES (2)")
        .await
        .unwrap();
    c.expect_everywhere("SELECT string_agg(id::text, ',' ORDER BY id) FROM t", "1,2")
        .await;
    let rendered = c.node_handles[0].metrics.render();
    for reason in ["not_a_record", "not_transactional"] {
        let line =
            format!("chorus_replication_rejected_total{{origin=\"pg1\",reason=\"{reason}\"}} 1");
        assert!(rendered.contains(&line), "{line} in\n{rendered}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn truncate_replicates_alone_with_cascade_and_racing_inserts() {
    let c = cluster(3).await;
    c.create_table(
        1,
        "CREATE TABLE tr (id int PRIMARY KEY, v text)",
        "public.tr",
    )
    .await;
    c.create_table(
        1,
        "CREATE TABLE parent (id int PRIMARY KEY)",
        "public.parent",
    )
    .await;
    c.create_table(
        1,
        "CREATE TABLE child (id int PRIMARY KEY, p int REFERENCES parent)",
        "public.child",
    )
    .await;
    // One table.
    c.via(2)
        .await
        .batch_execute("INSERT INTO tr SELECT g, 'x' FROM generate_series(1, 100) g")
        .await
        .unwrap();
    c.expect_everywhere("SELECT count(*)::text FROM tr", "100")
        .await;
    c.via(1).await.batch_execute("TRUNCATE tr").await.unwrap();
    c.expect_everywhere("SELECT count(*)::text FROM tr", "0")
        .await;
    // Several, with CASCADE, and rows written after it in its transaction.
    c.via(3)
        .await
        .batch_execute(
            "INSERT INTO parent SELECT generate_series(1, 10); \
             INSERT INTO child SELECT g, g FROM generate_series(1, 10) g",
        )
        .await
        .unwrap();
    c.expect_everywhere("SELECT count(*)::text FROM child", "10")
        .await;
    c.via(1)
        .await
        .batch_execute("BEGIN; TRUNCATE parent CASCADE; INSERT INTO parent VALUES (42); COMMIT")
        .await
        .unwrap();
    c.expect_everywhere(
        "SELECT (SELECT string_agg(id::text, ',') FROM parent) || '/' || (SELECT count(*) FROM child)",
        "42/0",
    )
    .await;
    // Inserts through nodes 2 and 3 race TRUNCATEs through node 1: a row
    // survives exactly where its version is newer than the last TRUNCATE's,
    // which is the same on every backend.
    let mut writers = Vec::new();
    for (node, parity) in [(2usize, 0i32), (3, 1)] {
        let client = c.via(node).await;
        writers.push(tokio::spawn(async move {
            for i in 0..300 {
                client
                    .execute("INSERT INTO tr VALUES ($1, 'race')", &[&(i * 2 + parity)])
                    .await
                    .unwrap();
            }
        }));
    }
    let truncating = c.via(1).await;
    for _ in 0..5 {
        truncating.batch_execute("TRUNCATE tr").await.unwrap();
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
    for w in writers {
        w.await.unwrap();
    }
    // Every node's stream has delivered everything once its marker row is
    // everywhere.
    for node in 1..=3 {
        c.via(node)
            .await
            .execute(
                "INSERT INTO tr VALUES ($1, 'marker')",
                &[&(10_000 + node as i32)],
            )
            .await
            .unwrap();
    }
    c.expect_everywhere("SELECT count(*)::text FROM tr WHERE v = 'marker'", "3")
        .await;
    let hash = "SELECT md5(string_agg(id::text, ',' ORDER BY id)) FROM tr";
    let values = c.values_everywhere(hash).await;
    if !values.iter().all(|v| v == &values[0]) {
        for b in 1..=3 {
            let rows = c.direct(b).await.query("SELECT t.id, v.version, v.origin, (SELECT m.version FROM chorus.row_version m WHERE m.tbl = 'public.tr' AND m.pk = '{}') FROM tr t LEFT JOIN chorus.row_version v ON v.tbl = 'public.tr' AND v.pk = jsonb_build_object('id', t.id) ORDER BY t.id", &[]).await.unwrap();
            let text: Vec<String> = rows
                .iter()
                .map(|r| {
                    format!(
                        "{}:{:?}:{:?}:{:?}",
                        r.get::<_, i32>(0),
                        r.get::<_, Option<i64>>(1),
                        r.get::<_, Option<i32>>(2),
                        r.get::<_, Option<i64>>(3)
                    )
                })
                .collect();
            eprintln!("backend {b}: {}", text.join(" "));
        }
    }
    assert!(values.iter().all(|v| v == &values[0]), "{values:?}");
    // RESTART IDENTITY restarts the origin's copy of a global sequence;
    // values stay unique across nodes.
    c.create_table(
        1,
        "CREATE TABLE seqd (id bigserial PRIMARY KEY, v int)",
        "public.seqd",
    )
    .await;
    for node in [1, 2] {
        c.via(node)
            .await
            .batch_execute("INSERT INTO seqd (v) SELECT generate_series(1, 3)")
            .await
            .unwrap();
    }
    c.expect_everywhere("SELECT count(*)::text FROM seqd", "6")
        .await;
    c.via(1)
        .await
        .batch_execute("TRUNCATE seqd RESTART IDENTITY")
        .await
        .unwrap();
    for node in [1, 2] {
        c.via(node)
            .await
            .batch_execute("INSERT INTO seqd (v) SELECT generate_series(1, 3)")
            .await
            .unwrap();
    }
    c.expect_everywhere("SELECT count(DISTINCT id)::text FROM seqd", "6")
        .await;
    // A partitioned table's TRUNCATE replicates as one of the whole tree
    // (rows written after it in its transaction stay); one of a single
    // partition as a delete of its rows, the other partitions untouched.
    c.create_table(
        1,
        "CREATE TABLE parted (id int PRIMARY KEY) PARTITION BY RANGE (id); \
         CREATE TABLE parted_1 PARTITION OF parted FOR VALUES FROM (0) TO (100); \
         CREATE TABLE parted_2 PARTITION OF parted FOR VALUES FROM (100) TO (200)",
        "public.parted",
    )
    .await;
    c.create_table(
        1,
        "CREATE TABLE parted_keyless (id int, v text) PARTITION BY LIST (v); \
         CREATE TABLE parted_keyless_a PARTITION OF parted_keyless FOR VALUES IN ('a'); \
         CREATE TABLE parted_keyless_b PARTITION OF parted_keyless FOR VALUES IN ('b')",
        "public.parted_keyless",
    )
    .await;
    c.via(2)
        .await
        .batch_execute(
            "INSERT INTO parted VALUES (1), (2), (150); \
             INSERT INTO parted_keyless VALUES (1, 'a'), (2, 'b')",
        )
        .await
        .unwrap();
    c.expect_everywhere("SELECT count(*)::text FROM parted", "3")
        .await;
    c.expect_everywhere("SELECT count(*)::text FROM parted_keyless", "2")
        .await;
    c.via(1)
        .await
        .batch_execute(
            "BEGIN; TRUNCATE parted, parted_keyless; INSERT INTO parted VALUES (160); COMMIT",
        )
        .await
        .unwrap();
    c.expect_everywhere(
        "SELECT (SELECT string_agg(id::text, ',') FROM parted) || '/' || \
                (SELECT count(*) FROM parted_keyless)",
        "160/0",
    )
    .await;
    let two = c.via(2).await;
    two.batch_execute(
        "INSERT INTO parted SELECT generate_series(101, 120); INSERT INTO parted VALUES (5)",
    )
    .await
    .unwrap();
    c.expect_everywhere("SELECT count(*)::text FROM parted", "22")
        .await;
    let one = c.via(1).await;
    one.batch_execute("TRUNCATE parted_2").await.unwrap();
    c.expect_everywhere("SELECT string_agg(id::text, ',') FROM parted", "5")
        .await;
    // In a transaction, with a row written after it; then a partition
    // named before its root in one statement, and the partition alone
    // again later in the same transaction (the root's statement is over).
    one.batch_execute(
        "BEGIN; INSERT INTO parted SELECT generate_series(130, 140); TRUNCATE parted_2; \
         INSERT INTO parted VALUES (170); COMMIT",
    )
    .await
    .unwrap();
    c.expect_everywhere(
        "SELECT string_agg(id::text, ',' ORDER BY id) FROM parted",
        "5,170",
    )
    .await;
    one.batch_execute(
        "BEGIN; TRUNCATE parted_2, parted; INSERT INTO parted VALUES (6), (171), (172); \
         TRUNCATE parted_2; INSERT INTO parted VALUES (173); COMMIT",
    )
    .await
    .unwrap();
    c.expect_everywhere(
        "SELECT string_agg(id::text, ',' ORDER BY id) FROM parted",
        "6,173",
    )
    .await;
    // Inserts through nodes 2 and 3 race TRUNCATEs of the partition
    // through node 1: the backends end identical.
    let mut writers = Vec::new();
    for (node, parity) in [(2usize, 0i32), (3, 1)] {
        let client = c.via(node).await;
        writers.push(tokio::spawn(async move {
            for i in 0..40 {
                client
                    .execute(
                        "INSERT INTO parted VALUES ($1), ($2)",
                        &[&(100 + i * 2 + parity), &(10 + i * 2 + parity)],
                    )
                    .await
                    .unwrap();
            }
        }));
    }
    for _ in 0..5 {
        one.batch_execute("TRUNCATE parted_2").await.unwrap();
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for w in writers {
        w.await.unwrap();
    }
    for node in 1..=3 {
        c.via(node)
            .await
            .execute("INSERT INTO parted VALUES ($1)", &[&(190 + node as i32)])
            .await
            .unwrap();
    }
    c.expect_everywhere(
        "SELECT count(*)::text FROM parted WHERE id BETWEEN 191 AND 193",
        "3",
    )
    .await;
    let hash = "SELECT md5(string_agg(id::text, ',' ORDER BY id)) FROM parted";
    let values = c.values_everywhere(hash).await;
    assert!(values.iter().all(|v| v == &values[0]), "{values:?}");
    c.expect_everywhere(
        "SELECT count(*)::text FROM parted_1 WHERE id BETWEEN 10 AND 89",
        "80",
    )
    .await;
    // A partition of a table without a primary key: refused, with a hint.
    let refused = one
        .batch_execute("TRUNCATE parted_keyless_a")
        .await
        .unwrap_err();
    assert_eq!(
        testkit::sqlstate(&refused).as_deref(),
        Some("0A000"),
        "{refused:?}"
    );
    // Back to one row for what follows. Under the root's TRUNCATE the
    // partitions' triggers stay quiet: no tombstone of a row of theirs.
    one.batch_execute("BEGIN; TRUNCATE parted").await.unwrap();
    let tombstones: i64 = one
        .query_one(
            "SELECT count(*) FROM chorus.row_version WHERE tbl = 'public.parted' AND pk <> '{}'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(tombstones, 0);
    one.batch_execute("INSERT INTO parted VALUES (160); COMMIT")
        .await
        .unwrap();
    c.expect_everywhere("SELECT string_agg(id::text, ',') FROM parted", "160")
        .await;
    // A partitioned table made on its own, then attached inside the tree:
    // the root's TRUNCATE still covers it.
    c.via(1)
        .await
        .batch_execute(
            "CREATE TABLE parted_3 (id int NOT NULL) PARTITION BY RANGE (id); \
             CREATE TABLE parted_3a PARTITION OF parted_3 FOR VALUES FROM (200) TO (300); \
             ALTER TABLE parted_3 ADD PRIMARY KEY (id); \
             ALTER TABLE parted ATTACH PARTITION parted_3 FOR VALUES FROM (200) TO (300); \
             INSERT INTO parted VALUES (250)",
        )
        .await
        .unwrap();
    c.expect_everywhere("SELECT count(*)::text FROM parted", "2")
        .await;
    c.via(2)
        .await
        .batch_execute("TRUNCATE parted")
        .await
        .unwrap();
    c.expect_everywhere("SELECT count(*)::text FROM parted", "0")
        .await;
    // Once detached, a former partition is a table of its own.
    let one = c.via(1).await;
    one.batch_execute(
        "ALTER TABLE parted DETACH PARTITION parted_1; INSERT INTO parted_1 VALUES (1), (2)",
    )
    .await
    .unwrap();
    c.expect_everywhere("SELECT count(*)::text FROM parted_1", "2")
        .await;
    one.batch_execute("TRUNCATE parted_1").await.unwrap();
    c.expect_everywhere("SELECT count(*)::text FROM parted_1", "0")
        .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn tables_the_regression_suite_makes_replicate_or_are_refused() {
    // The apply's upsert names the new row excluded.*: a table of that name
    // must not make it ambiguous (found by PostgreSQL's regression suite,
    // where it held up a stream for good).
    let c = cluster(2).await;
    c.create_table(
        1,
        "CREATE TABLE excluded (key int PRIMARY KEY, data text)",
        "public.excluded",
    )
    .await;
    let client = c.via(1).await;
    client
        .batch_execute(
            "INSERT INTO excluded VALUES (1, 'one'); \
             UPDATE excluded SET data = 'uno' WHERE key = 1; \
             INSERT INTO excluded AS e VALUES (1, 'ein') ON CONFLICT (key) DO UPDATE SET data = excluded.data",
        )
        .await
        .unwrap();
    c.expect_everywhere("SELECT data FROM excluded WHERE key = 1", "ein")
        .await;
    // A CREATE TABLE AS whose rows no backend could read back (an internal
    // type without an input function, also found by the suite) is refused
    // rather than left to hold up the stream.
    let refused = client
        .batch_execute("CREATE TABLE defaults AS SELECT adbin FROM pg_attrdef")
        .await
        .unwrap_err();
    assert_eq!(
        testkit::sqlstate(&refused).as_deref(),
        Some("0A000"),
        "{refused:?}"
    );
    client
        .batch_execute("CREATE TABLE defaults AS SELECT adbin::text FROM pg_attrdef")
        .await
        .unwrap();
    c.expect_everywhere("SELECT (to_regclass('defaults') IS NOT NULL)::text", "true")
        .await;
    // A key with INCLUDE columns (of a type without ordering, box) is keyed
    // by its key columns only; a unique index with INCLUDE columns likewise.
    client
        .batch_execute(
            "CREATE TABLE covered (c1 int, c2 int, c3 int, c4 box, PRIMARY KEY (c1, c2) INCLUDE (c3, c4)); \
             CREATE TABLE covered_u (c1 int PRIMARY KEY, c2 int, c4 box, UNIQUE (c2) INCLUDE (c4)); \
             INSERT INTO covered SELECT g, g, g, box(point(g, g), point(0, 0)) FROM generate_series(1, 5) g; \
             INSERT INTO covered_u SELECT g, g, box(point(g, g), point(0, 0)) FROM generate_series(1, 5) g; \
             UPDATE covered SET c4 = box(point(9, 9), point(0, 0)) WHERE c1 = 2; \
             UPDATE covered_u SET c2 = c2 + 10 WHERE c1 = 3; \
             DELETE FROM covered WHERE c1 = 4",
        )
        .await
        .unwrap();
    c.expect_everywhere(
        "SELECT string_agg(c1 || ':' || c4::text, ',' ORDER BY c1) FROM covered",
        "1:(1,1),(0,0),2:(9,9),(0,0),3:(3,3),(0,0),5:(5,5),(0,0)",
    )
    .await;
    c.expect_everywhere(
        "SELECT string_agg(c1 || ':' || c2, ',' ORDER BY c1) FROM covered_u",
        "1:1,2:2,3:13,4:4,5:5",
    )
    .await;
    c.expect_everywhere(
        "SELECT array_to_string(pk_columns, ',') FROM chorus.replicated_table WHERE tbl = 'public.covered'",
        "c1,c2",
    )
    .await;
    // A DEFERRABLE unique column shifted in one statement (which collides
    // with itself row by row): every backend ends with every row.
    client
        .batch_execute(
            "CREATE TABLE shifted (id int PRIMARY KEY, u int UNIQUE DEFERRABLE); \
             CREATE TABLE shifted_keyless (u int UNIQUE DEFERRABLE, t text); \
             INSERT INTO shifted SELECT g, g FROM generate_series(1, 20) g; \
             INSERT INTO shifted_keyless SELECT g, 'x' FROM generate_series(1, 20) g; \
             UPDATE shifted SET u = u + 1; \
             UPDATE shifted_keyless SET u = u + 1",
        )
        .await
        .unwrap();
    for table in ["shifted", "shifted_keyless"] {
        c.expect_everywhere(
            &format!("SELECT count(*) || ':' || min(u) || ':' || max(u) FROM {table}"),
            "20:2:21",
        )
        .await;
    }
    // A table's own trigger does not fire again on the peers (its effects
    // replicate as changes of their own), as in PostgreSQL's logical
    // replication: one audit row everywhere, not one per backend that
    // applied the insert; a trigger that refuses writes other than its
    // own does not hold up the stream.
    client
        .batch_execute(
            "CREATE TABLE audited (id int PRIMARY KEY, v text); \
             CREATE TABLE audit_log (id bigserial PRIMARY KEY, what text); \
             CREATE FUNCTION audit() RETURNS trigger LANGUAGE plpgsql AS \
               $$ BEGIN INSERT INTO audit_log (what) VALUES (TG_OP || ' ' || NEW.id); RETURN NEW; END $$; \
             CREATE TRIGGER audited_log AFTER INSERT OR UPDATE ON audited \
               FOR EACH ROW EXECUTE FUNCTION audit(); \
             CREATE FUNCTION guard() RETURNS trigger LANGUAGE plpgsql AS \
               $$ BEGIN IF NEW.v = 'forced' THEN RETURN NEW; END IF; \
                  RAISE EXCEPTION 'only forced values'; END $$; \
             CREATE TRIGGER audited_guard BEFORE UPDATE ON audited \
               FOR EACH ROW EXECUTE FUNCTION guard(); \
             INSERT INTO audited VALUES (1, 'one'); \
             UPDATE audited SET v = 'forced' WHERE id = 1",
        )
        .await
        .unwrap();
    c.expect_everywhere(
        "SELECT string_agg(what, ',' ORDER BY what) || '/' || (SELECT v FROM audited) FROM audit_log",
        "INSERT 1,UPDATE 1/forced",
    )
    .await;
    // A table with a column named like the apply's and capture's row alias
    // (t): its rows, copied by CREATE TABLE AS, are rows, not that column.
    client
        .batch_execute(
            "CREATE TABLE named_t AS SELECT 'x' || g AS t FROM generate_series(1, 3) g; \
             UPDATE named_t SET t = t || '!' WHERE t = 'x2'",
        )
        .await
        .unwrap();
    c.expect_everywhere(
        "SELECT string_agg(t, ',' ORDER BY t) FROM named_t",
        "x1,x2!,x3",
    )
    .await;
    // An index expression whose function writes (ANALYZE of a catalog, as
    // the suite's vacuum test does): the peers' apply of its rows must
    // leave WAL that logical decoding reads, or the streams from the peers
    // stop for good. The marker: a write through node 2 reaches backend 1
    // afterwards.
    client
        .batch_execute(
            "CREATE FUNCTION do_analyze() RETURNS void VOLATILE LANGUAGE sql AS 'ANALYZE pg_am'; \
             CREATE FUNCTION analyzes(c int) RETURNS int IMMUTABLE LANGUAGE sql AS \
               'SELECT $1 FROM public.do_analyze()'; \
             CREATE TABLE analyzing (i int PRIMARY KEY, v text); \
             CREATE INDEX ON analyzing (analyzes(i)); \
             INSERT INTO analyzing VALUES (1, 'a'), (2, 'b'); \
             UPDATE analyzing SET v = 'c' WHERE i = 2",
        )
        .await
        .unwrap();
    c.expect_everywhere(
        "SELECT string_agg(i || v, ',' ORDER BY i) FROM analyzing",
        "1a,2c",
    )
    .await;
    c.via(2)
        .await
        .batch_execute("INSERT INTO analyzing VALUES (3, 'from node 2')")
        .await
        .unwrap();
    c.expect_everywhere(
        "SELECT string_agg(i || v, ',' ORDER BY i) FROM analyzing",
        "1a,2c,3from node 2",
    )
    .await;
    // A row of a table without a key whose old value a domain's check,
    // added NOT VALID since, refuses: its update still finds it on the
    // peers, and the constraint validates everywhere.
    client
        .batch_execute(
            "CREATE DOMAIN things AS int; \
             CREATE TABLE thethings (stuff things); \
             INSERT INTO thethings VALUES (55); \
             ALTER DOMAIN things ADD CONSTRAINT meow CHECK (VALUE < 11) NOT VALID; \
             UPDATE thethings SET stuff = 10; \
             ALTER DOMAIN things VALIDATE CONSTRAINT meow",
        )
        .await
        .unwrap();
    c.expect_everywhere(
        "SELECT string_agg(stuff::text, ',') || ':' \
                || (SELECT convalidated FROM pg_constraint WHERE conname = 'meow') FROM thethings",
        "10:true",
    )
    .await;
    // A function with an SQL-standard body (its ; inside BEGIN ATOMIC …
    // END do not end the statement), and one whose body names a temporary
    // table of the session (the peers have no such table).
    client
        .batch_execute(
            "CREATE FUNCTION atomic_next(x int) RETURNS int LANGUAGE sql BEGIN ATOMIC \
               SELECT CASE WHEN x > 0 THEN x + 1 ELSE 0 END; END; \
             CREATE TEMP TABLE scratch (data text); \
             CREATE FUNCTION into_scratch(text) RETURNS void LANGUAGE sql AS \
               $$ INSERT INTO scratch VALUES ($1) $$",
        )
        .await
        .unwrap();
    c.expect_everywhere(
        "SELECT atomic_next(1) || ':' || (to_regprocedure('into_scratch(text)') IS NOT NULL)",
        "2:true",
    )
    .await;
    // A foreign table as a partition (its rows are on its foreign server:
    // no capture on it); the other partitions replicate as ever.
    client
        .batch_execute(
            "CREATE FOREIGN DATA WRAPPER nowhere; \
             CREATE SERVER far FOREIGN DATA WRAPPER nowhere; \
             CREATE TABLE spread (id int, v text) PARTITION BY RANGE (id); \
             CREATE TABLE spread_near PARTITION OF spread FOR VALUES FROM (0) TO (100); \
             CREATE FOREIGN TABLE spread_far PARTITION OF spread FOR VALUES FROM (100) TO (200) SERVER far; \
             INSERT INTO spread VALUES (1, 'near')",
        )
        .await
        .unwrap();
    c.expect_everywhere(
        "SELECT (SELECT string_agg(id || v, ',') FROM spread_near) || ':' \
                || (SELECT relkind::text FROM pg_class WHERE relname = 'spread_far')",
        "1near:f",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn two_column_keys_replicate_in_batches_and_one_by_one() {
    // The apply matches keys column by column: set-based for a plain
    // table, change by change for one with another unique index.
    let c = cluster(2).await;
    c.create_table(
        1,
        "CREATE TABLE pair (a int, b text, v int, PRIMARY KEY (a, b))",
        "public.pair",
    )
    .await;
    c.create_table(
        1,
        "CREATE TABLE pair_u (a int, b text, v int UNIQUE, PRIMARY KEY (a, b))",
        "public.pair_u",
    )
    .await;
    let client = c.via(1).await;
    for table in ["pair", "pair_u"] {
        client
            .batch_execute(&format!(
                "INSERT INTO {table} SELECT g % 5, 'k' || g, g FROM generate_series(1, 50) g; \
                 UPDATE {table} SET v = v + 1000 WHERE a = 1; \
                 DELETE FROM {table} WHERE a = 2"
            ))
            .await
            .unwrap();
    }
    for table in ["pair", "pair_u"] {
        c.converged(&format!("SELECT count(*) || ':' || sum(v) FROM {table}"))
            .await;
        c.expect_everywhere(&format!("SELECT count(*)::text FROM {table}"), "40")
            .await;
        c.expect_everywhere(&format!("SELECT sum(v)::text FROM {table}"), "11030")
            .await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn tables_without_a_primary_key_replicate_updates_and_deletes_by_content() {
    // Peers find the row an UPDATE or DELETE changed by its old content,
    // compared in text form: types without = (point, json), NULLs, and
    // duplicates (one of two equal rows goes) included.
    let c = cluster(3).await;
    c.create_table(
        1,
        "CREATE TABLE loose (f float8, p point, j json, t text, \
                             id int GENERATED ALWAYS AS IDENTITY)",
        "public.loose",
    )
    .await;
    c.create_table(
        1,
        "CREATE TABLE parts (k int, v text) PARTITION BY RANGE (k); \
         CREATE TABLE parts_low PARTITION OF parts FOR VALUES FROM (0) TO (10); \
         CREATE TABLE parts_high PARTITION OF parts FOR VALUES FROM (10) TO (20)",
        "public.parts",
    )
    .await;
    c.via(1)
        .await
        .batch_execute(
            "INSERT INTO loose (f, p, j, t) VALUES \
               (1.5, '(1,2)', '{\"a\": 1}', 'dup'), (1.5, '(1,2)', '{\"a\": 1}', 'dup'), \
               (0.1, '(3,4)', '[1, 2]', 'one'), (NULL, NULL, NULL, NULL), \
               (2.25, '(5,6)', 'true', 'gone'); \
             INSERT INTO parts SELECT g, 'v' || g FROM generate_series(0, 19) g",
        )
        .await
        .unwrap();
    let table =
        "SELECT string_agg(format('%s|%s|%s|%s', f, p, j, t), ';' ORDER BY t, f) FROM loose";
    c.converged(table).await;
    // Through other nodes, in one transaction with the insert it follows.
    c.via(2)
        .await
        .batch_execute(
            "BEGIN; \
             DELETE FROM loose WHERE ctid = (SELECT ctid FROM loose WHERE t = 'dup' LIMIT 1); \
             UPDATE loose SET f = f * -1, p = point(0, 0), j = '{\"b\": 2}' WHERE t = 'one'; \
             UPDATE loose SET t = 'was null' WHERE t IS NULL; \
             COMMIT",
        )
        .await
        .unwrap();
    c.via(3)
        .await
        .batch_execute(
            "UPDATE parts SET k = k + 10 WHERE k < 3; \
             DELETE FROM parts WHERE k BETWEEN 15 AND 17; \
             UPDATE parts SET v = 'moved ' || v WHERE k >= 10",
        )
        .await
        .unwrap();
    c.expect_everywhere(
        table,
        "1.5|(1,2)|{\"a\": 1}|dup;2.25|(5,6)|true|gone;-0.1|(0,0)|{\"b\": 2}|one;|||was null",
    )
    .await;
    let parts = "SELECT string_agg(tableoid::regclass || ':' || k || v, ',' ORDER BY k) FROM parts";
    let moved = c.converged(parts).await;
    assert!(moved.starts_with("parts_low:3v3,"), "{moved}");
    assert!(moved.contains("parts_high:10moved v0,"), "{moved}");
    assert!(!moved.contains(":15"), "{moved}");
    c.expect_everywhere("SELECT count(*)::text FROM parts", "17")
        .await;

    // A table of no columns (PostgreSQL's regression suite makes some).
    c.via(3)
        .await
        .batch_execute(
            "CREATE TABLE nothing (); INSERT INTO nothing DEFAULT VALUES; \
             INSERT INTO nothing SELECT FROM generate_series(1, 3); \
             DELETE FROM nothing WHERE ctid = (SELECT ctid FROM nothing LIMIT 1)",
        )
        .await
        .unwrap();
    c.expect_everywhere("SELECT count(*)::text FROM nothing", "3")
        .await;
    // An ALTER TABLE that computes values: every backend gets the origin's.
    c.via(2)
        .await
        .batch_execute("ALTER TABLE loose ADD COLUMN r float8 DEFAULT random()")
        .await
        .unwrap();
    let random = c
        .converged("SELECT string_agg(t || '=' || r, ',' ORDER BY t, r) FROM loose")
        .await;
    assert_eq!(random.matches('=').count(), 4, "{random}");
    // A row already different on one backend (changed there with capture
    // quiet): the update finds no row there, is skipped and logged, and the
    // stream goes on.
    c.direct(3)
        .await
        .batch_execute("SET chorus.applying = on; UPDATE loose SET t = 'local' WHERE t = 'gone'")
        .await
        .unwrap();
    c.via(1)
        .await
        .batch_execute(
            "UPDATE loose SET f = 0 WHERE t = 'gone'; INSERT INTO loose (t) VALUES ('after')",
        )
        .await
        .unwrap();
    c.expect_everywhere("SELECT count(*)::text FROM loose WHERE t = 'after'", "1")
        .await;
    let logged: i64 = c
        .direct(3)
        .await
        .query_one(
            "SELECT count(*) FROM chorus.conflict WHERE tbl = 'public.loose' \
               AND kind = 'update_missing' AND resolution = 'skipped'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(logged, 1);
    assert_eq!(c.conflicts_logged("update_missing").await, 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn ddl_runs_under_the_sessions_settings_on_every_backend() {
    // Settings that change what a DDL statement means travel with it: an
    // in-place tablespace (a superuser-only setting) through the DDL log,
    // then a table put in it by default_tablespace, a function whose body
    // is not checked, and a default whose literal reads by DateStyle,
    // through the change stream.
    let c = cluster(3).await;
    let client = c.via(1).await;
    client
        .batch_execute("SET allow_in_place_tablespaces = on")
        .await
        .unwrap();
    client
        .batch_execute("CREATE TABLESPACE chorus_ts LOCATION ''")
        .await
        .unwrap();
    client
        .batch_execute(
            "SET default_tablespace = chorus_ts; SET check_function_bodies = off; \
             SET DateStyle = 'SQL, DMY'; \
             BEGIN; \
             CREATE TABLE placed (id int PRIMARY KEY, d date DEFAULT '02/03/2020'); \
             CREATE FUNCTION later() RETURNS bigint LANGUAGE sql AS 'SELECT count(*) FROM not_yet'; \
             INSERT INTO placed (id) VALUES (1); \
             COMMIT",
        )
        .await
        .unwrap();
    c.expect_everywhere(
        "SELECT t.spcname || ' ' || pg_get_expr(d.adbin, d.adrelid) \
           FROM pg_class r JOIN pg_tablespace t ON t.oid = r.reltablespace \
           JOIN pg_attrdef d ON d.adrelid = r.oid \
          WHERE r.relname = 'placed'",
        "chorus_ts '2020-03-02'::date",
    )
    .await;
    c.expect_everywhere(
        "SELECT count(*)::text FROM pg_proc WHERE proname = 'later'",
        "1",
    )
    .await;
    c.expect_everywhere("SELECT d::text FROM placed WHERE id = 1", "2020-03-02")
        .await;
    // No backend failed to apply a DDL.
    for b in 1..=3 {
        let row = c
            .direct(b)
            .await
            .query_one(
                "SELECT count(*) FROM chorus.conflict WHERE kind = 'ddl_failed'",
                &[],
            )
            .await
            .unwrap();
        assert_eq!(row.get::<_, i64>(0), 0, "backend {b}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn roles_and_grants_replicate_inside_transaction_blocks() {
    // Statements PostgreSQL fires no event trigger for, sent one by one
    // inside BEGIN ... COMMIT (as psql and migration tools send them),
    // travel in the transaction's change stream: they land with it, and
    // not at all when it rolls back or their savepoint does.
    let c = cluster(3).await;
    let client = c.via(1).await;
    for sql in [
        "BEGIN",
        "CREATE ROLE in_block_owner NOLOGIN",
        "CREATE TABLE in_block (id int PRIMARY KEY)",
        "ALTER TABLE in_block OWNER TO in_block_owner",
        "GRANT in_block_owner TO postgres",
        "INSERT INTO in_block VALUES (1)",
        "SAVEPOINT s",
    ] {
        client.batch_execute(sql).await.unwrap();
    }
    let exists = client
        .batch_execute("CREATE ROLE in_block_owner")
        .await
        .unwrap_err();
    assert_eq!(testkit::sqlstate(&exists).as_deref(), Some("42710"));
    for sql in [
        "ROLLBACK TO SAVEPOINT s",
        "CREATE ROLE in_block_second",
        "COMMIT",
    ] {
        client.batch_execute(sql).await.unwrap();
    }
    for sql in ["BEGIN", "CREATE ROLE never_committed", "ROLLBACK"] {
        client.batch_execute(sql).await.unwrap();
    }
    // ALTER SEQUENCE stays refused, in a block too.
    client.batch_execute("BEGIN").await.unwrap();
    let refused = client
        .batch_execute("ALTER SEQUENCE no_such_sequence RESTART")
        .await
        .unwrap_err();
    assert_eq!(testkit::sqlstate(&refused).as_deref(), Some("0A000"));
    client.batch_execute("ROLLBACK").await.unwrap();
    c.expect_everywhere(
        "SELECT string_agg(rolname, ',' ORDER BY rolname) FROM pg_roles \
          WHERE rolname IN ('in_block_owner', 'in_block_second', 'never_committed')",
        "in_block_owner,in_block_second",
    )
    .await;
    c.expect_everywhere(
        "SELECT r.rolname || ':' || (SELECT count(*) FROM in_block) || ':' || \
                pg_has_role('postgres', 'in_block_owner', 'MEMBER') \
           FROM pg_class t JOIN pg_roles r ON r.oid = t.relowner WHERE t.relname = 'in_block'",
        "in_block_owner:1:true",
    )
    .await;
    // A password is hashed on every backend as the session asked
    // (password_encryption travels with the statement).
    for sql in [
        "SET password_encryption = 'md5'",
        "CREATE ROLE hashed_md5 PASSWORD 'secret'",
    ] {
        client.batch_execute(sql).await.unwrap();
    }
    c.expect_everywhere(
        "SELECT left(rolpassword, 3) FROM pg_authid WHERE rolname = 'hashed_md5'",
        "md5",
    )
    .await;
    assert_eq!(c.conflicts_logged("ddl_failed").await, 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn ddl_and_writes_after_a_rollback_to_savepoint_replicate() {
    // The rollback undoes the settings the transaction's first stamp made
    // inside the savepoint (its origin, its DDL lease's number): what comes
    // after is stamped again, over either protocol.
    let c = cluster(3).await;
    let client = c.via(1).await;
    for sql in [
        "BEGIN",
        "SAVEPOINT s",
        "CREATE TABLE sp_gone (id int)",
        "ROLLBACK TO SAVEPOINT s",
    ] {
        client.batch_execute(sql).await.unwrap();
    }
    client
        .execute("CREATE TABLE sp_kept (id int PRIMARY KEY)", &[])
        .await
        .unwrap();
    for sql in [
        "SAVEPOINT t",
        "INSERT INTO sp_kept VALUES (1)",
        "ROLLBACK TO t",
    ] {
        client.batch_execute(sql).await.unwrap();
    }
    client
        .execute("ALTER TABLE sp_kept ADD COLUMN v text", &[])
        .await
        .unwrap();
    client
        .execute("INSERT INTO sp_kept VALUES (2, 'two')", &[])
        .await
        .unwrap();
    client.batch_execute("COMMIT").await.unwrap();
    c.expect_everywhere(
        "SELECT coalesce(to_regclass('sp_gone')::text, '-') || ' ' || \
                (SELECT string_agg(id || ':' || v, ',') FROM sp_kept)",
        "- 2:two",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn roles_and_grants_over_the_extended_protocol_replicate_in_and_out_of_transaction_blocks() {
    // psycopg 3 in its default mode: every statement over the extended
    // protocol, inside a transaction it opened.
    let c = cluster(3).await;
    let client = c.via(1).await;
    client.batch_execute("BEGIN").await.unwrap();
    client
        .execute("CREATE ROLE ext_owner NOLOGIN", &[])
        .await
        .unwrap();
    client
        .execute("CREATE TABLE ext_owned (id int PRIMARY KEY)", &[])
        .await
        .unwrap();
    client
        .execute("ALTER TABLE ext_owned OWNER TO ext_owner", &[])
        .await
        .unwrap();
    // Prepared first, run later in the block.
    let grant = client.prepare("GRANT ext_owner TO postgres").await.unwrap();
    client.execute(&grant, &[]).await.unwrap();
    client.batch_execute("SAVEPOINT s").await.unwrap();
    client
        .execute("CREATE ROLE ext_rolled_back", &[])
        .await
        .unwrap();
    client
        .batch_execute("ROLLBACK TO SAVEPOINT s; COMMIT")
        .await
        .unwrap();
    // Prepared inside a block, run outside one: through the DDL log, as
    // in autocommit from the start.
    client.batch_execute("BEGIN").await.unwrap();
    let later = client.prepare("CREATE ROLE ext_outside").await.unwrap();
    client.batch_execute("COMMIT").await.unwrap();
    client.execute(&later, &[]).await.unwrap();
    client
        .execute("CREATE ROLE ext_autocommit", &[])
        .await
        .unwrap();
    c.expect_everywhere(
        "SELECT string_agg(rolname, ',' ORDER BY rolname) FROM pg_roles WHERE rolname LIKE 'ext\\_%'",
        "ext_autocommit,ext_outside,ext_owner",
    )
    .await;
    c.expect_everywhere(
        "SELECT r.rolname || ':' || pg_has_role('postgres', 'ext_owner', 'MEMBER') \
           FROM pg_class t JOIN pg_roles r ON r.oid = t.relowner WHERE t.relname = 'ext_owned'",
        "ext_owner:true",
    )
    .await;
    assert_eq!(c.conflicts_logged("ddl_failed").await, 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn roles_databases_and_concurrent_indexes_sent_in_autocommit_over_the_extended_protocol_replicate(
) {
    // What JDBC and Npgsql send for a statement in autocommit: Parse,
    // Bind, Describe, Execute and Sync in one batch. A statement of the
    // DDL log's kind then goes as it does in a simple query: validated on
    // the origin, proposed, applied on every backend.
    let c = cluster(3).await;
    let mut raw = raw_session(c.nodes[0].port()).await;
    let sync = || message(b'S', b"");
    let batch = |sql: &str| {
        vec![
            extended_parse(sql),
            bind_unnamed(),
            message(b'D', b"P\0"),
            execute_unnamed(),
            sync(),
        ]
    };
    raw.send(&batch("CREATE ROLE auto_role NOLOGIN")).await;
    assert_eq!(raw.read_until(b'Z').await, b"12nCZ".to_vec());
    // One that cannot run in a transaction block.
    raw.send(&batch("CREATE DATABASE auto_db")).await;
    assert_eq!(raw.read_until(b'Z').await, b"12nCZ".to_vec());
    c.expect_everywhere(
        "SELECT count(*)::text FROM pg_database WHERE datname = 'auto_db'",
        "1",
    )
    .await;
    // PostgreSQL's own error in the Execute's place, and nothing proposed.
    raw.send(&batch("CREATE ROLE auto_role")).await;
    assert_eq!(raw.read_until(b'E').await, b"12nE".to_vec());
    assert_eq!(raw.read_until(b'Z').await, b"Z".to_vec());
    // A Bind the statement refuses (a parameter it has no place for): its
    // error, and the statement never runs.
    let bind_one = message(b'B', &[0, 0, 0, 0, 0, 1, 0, 0, 0, 1, b'x', 0, 0]);
    raw.send(&[
        extended_parse("CREATE ROLE auto_never"),
        bind_one,
        execute_unnamed(),
        sync(),
    ])
    .await;
    assert_eq!(raw.read_until(b'E').await, b"1E".to_vec());
    assert_eq!(raw.read_until(b'Z').await, b"Z".to_vec());
    // The session goes on, and the next one replicates.
    raw.send(&batch("DROP DATABASE auto_db")).await;
    assert_eq!(raw.read_until(b'Z').await, b"12nCZ".to_vec());
    raw.send(&batch("SELECT 1")).await;
    assert_eq!(raw.read_until(b'Z').await, b"12TDCZ".to_vec());
    c.expect_everywhere(
        "SELECT count(*)::text FROM pg_database WHERE datname = 'auto_db'",
        "0",
    )
    .await;
    // tokio-postgres: prepared (Parse, Describe, Sync), then run (Bind,
    // Execute, Sync), as named statements, through another node.
    let client = c.via(2).await;
    client
        .execute("CREATE TABLE auto_t (id int PRIMARY KEY, v text)", &[])
        .await
        .unwrap();
    client
        .execute("CREATE INDEX CONCURRENTLY auto_t_v ON auto_t (v)", &[])
        .await
        .unwrap();
    let grant = client.prepare("GRANT auto_role TO postgres").await.unwrap();
    client.execute(&grant, &[]).await.unwrap();
    // An index built concurrently on a temporary table stays here.
    client
        .batch_execute("CREATE TEMP TABLE auto_tmp (v text)")
        .await
        .unwrap();
    client
        .execute("CREATE INDEX CONCURRENTLY auto_tmp_v ON auto_tmp (v)", &[])
        .await
        .unwrap();
    c.expect_everywhere(
        "SELECT string_agg(relname, ',' ORDER BY relname) FROM pg_class \
          WHERE relname LIKE 'auto\\_%' AND relpersistence = 'p'",
        "auto_t,auto_t_pkey,auto_t_v",
    )
    .await;
    c.expect_everywhere(
        "SELECT string_agg(rolname, ',' ORDER BY rolname) FROM pg_roles \
          WHERE rolname LIKE 'auto\\_%' AND pg_has_role('postgres', oid, 'MEMBER')",
        "auto_role",
    )
    .await;
    // The refused statements were never proposed.
    c.expect_everywhere(
        "SELECT string_agg(command, ',' ORDER BY seq) FROM chorus.ddl_history \
          WHERE command LIKE '%auto\\_role%' OR command LIKE '%auto\\_never%'",
        "CREATE ROLE auto_role NOLOGIN,GRANT auto_role TO postgres",
    )
    .await;
    assert_eq!(c.conflicts_logged("ddl_failed").await, 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn large_objects_are_refused_through_a_replicating_node() {
    // pg_largeobject is seen by no trigger: written through a node, a large
    // object would exist on one backend only.
    let c = cluster(2).await;
    let client = c.via(1).await;
    for sql in [
        "SELECT lo_from_bytea(0, 'data')",
        "SELECT lo_create(0)",
        "select LO_IMPORT ('/etc/hostname')",
    ] {
        let simple = client.batch_execute(sql).await.unwrap_err();
        assert_eq!(
            testkit::sqlstate(&simple).as_deref(),
            Some("0A000"),
            "{sql}: {simple:?}"
        );
        let extended = client.query(sql, &[]).await.unwrap_err();
        assert_eq!(
            testkit::sqlstate(&extended).as_deref(),
            Some("0A000"),
            "{sql}: {extended:?}"
        );
        assert!(
            extended
                .as_db_error()
                .unwrap()
                .hint()
                .unwrap_or("")
                .contains("bytea"),
            "{extended:?}"
        );
    }
    // psql's \lo_import speaks the fast-path FunctionCall message.
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("blob");
    std::fs::write(&file, b"blob").unwrap();
    let out = testkit::run_pg_program(
        "psql",
        &[
            &format!(
                "postgresql://postgres@127.0.0.1:{}/postgres",
                c.nodes[0].port()
            ),
            "-X",
            "-c",
            &format!("\\lo_import '{}'", file.display()),
        ],
        &[],
        Duration::from_secs(60),
    );
    assert!(!out.status.success());
    assert!(
        testkit::stderr(&out).contains("large objects are not replicated"),
        "{}",
        testkit::stderr(&out)
    );
    // The session goes on, and nothing was written anywhere.
    client.batch_execute("SELECT 1").await.unwrap();
    c.expect_everywhere("SELECT count(*)::text FROM pg_largeobject_metadata", "0")
        .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn random_concurrent_writes_through_three_nodes_converge() {
    use rand::{Rng, SeedableRng};
    let seed: u64 = std::env::var("CHORUS_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(20261126);
    let c = cluster(3).await;
    c.create_table(
        1,
        "CREATE TABLE kv (k int PRIMARY KEY, v text NOT NULL, n int NOT NULL DEFAULT 0)",
        "public.kv",
    )
    .await;
    // Three clients per node, each a seeded stream of inserts, updates and
    // deletes over a small key space, so they collide often.
    let mut workers = Vec::new();
    for node in 1..=3usize {
        for worker in 0..3u64 {
            let client = c.via(node).await;
            let mut rng = rand::rngs::StdRng::seed_from_u64(seed ^ (node as u64 * 31 + worker));
            workers.push(tokio::spawn(async move {
                for _ in 0..150 {
                    let k: i32 = rng.random_range(0..60);
                    let sql = match rng.random_range(0..10) {
                        0..=3 => format!(
                            "INSERT INTO kv VALUES ({k}, 'n{node}w{worker}', 1) \
                             ON CONFLICT (k) DO UPDATE SET v = excluded.v, n = kv.n + 1"
                        ),
                        4..=7 => format!("UPDATE kv SET v = 'u{node}', n = n + 1 WHERE k = {k}"),
                        _ => format!("DELETE FROM kv WHERE k = {k}"),
                    };
                    // A deadlock with the apply of a remote change is
                    // retryable (40P01), as in PostgreSQL itself; anything
                    // else fails the test.
                    let mut attempts = 0;
                    loop {
                        match client.batch_execute(&sql).await {
                            Ok(()) => break,
                            Err(e)
                                if e.code().map(|c| c.code()) == Some("40P01") && attempts < 5 =>
                            {
                                attempts += 1;
                            }
                            Err(e) => panic!("{sql}: {e:?}"),
                        }
                    }
                }
            }));
        }
    }
    for w in workers {
        w.await.unwrap();
    }
    let hash = c
        .converged("SELECT coalesce(md5(string_agg(t::text, ',' ORDER BY k)), 'empty') FROM kv t")
        .await;
    assert_ne!(hash, "", "seed {seed}");
    // The versions agree too, tombstones included.
    c.converged(
        "SELECT md5(string_agg(pk::text || version || origin || deleted, ',' ORDER BY pk::text)) \
         FROM chorus.row_version WHERE tbl = 'public.kv'",
    )
    .await;
    // Every conflict logged on a backend was counted, by kind, by the node
    // whose changes caused it.
    let mut logged = std::collections::BTreeMap::<String, f64>::new();
    for b in 1..=3 {
        for row in c
            .direct(b)
            .await
            .query(
                "SELECT kind, count(*)::float8 FROM chorus.conflict GROUP BY kind",
                &[],
            )
            .await
            .unwrap()
        {
            *logged.entry(row.get(0)).or_default() += row.get::<_, f64>(1);
        }
    }
    let mut counted = std::collections::BTreeMap::<String, f64>::new();
    for node in &c.node_handles {
        for line in node.metrics.render().lines() {
            if let Some(rest) = line.strip_prefix("chorus_conflicts_total{kind=\"") {
                let (kind, value) = rest.split_once("\"} ").unwrap();
                let value: f64 = value.parse().unwrap();
                if value > 0.0 {
                    *counted.entry(kind.to_owned()).or_default() += value;
                }
            }
        }
    }
    assert!(!logged.is_empty(), "seed {seed}: no conflict at all");
    assert_eq!(logged, counted, "seed {seed}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_query_string_mixing_ddl_with_other_statements_replicates_as_one_transaction() {
    let c = cluster(2).await;
    let client = c.via(1).await;
    // DDL, DML and SET in one string: one implicit transaction, the DDL
    // at its place among the rows on every backend.
    client
        .batch_execute(
            "SET search_path = public; CREATE TABLE t (id int PRIMARY KEY); \
             INSERT INTO t VALUES (1); ALTER TABLE t ADD COLUMN v text DEFAULT 'x'; \
             INSERT INTO t VALUES (2, 'y'); CREATE INDEX ON t (v)",
        )
        .await
        .unwrap();
    c.converged("SELECT string_agg(id || v, ',' ORDER BY id) FROM t")
        .await;
    let on_peer: String = c
        .direct(2)
        .await
        .query_one("SELECT string_agg(id || v, ',' ORDER BY id) FROM t", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(on_peer, "1x,2y");
    // A string that fails part way replicates nothing.
    let err = client
        .batch_execute("CREATE TABLE u (id int PRIMARY KEY); INSERT INTO nowhere VALUES (1)")
        .await
        .unwrap_err();
    assert_eq!(testkit::sqlstate(&err).as_deref(), Some("42P01"));
    // DDL mixed with a DO block that runs DDL of its own: each statement
    // replicates.
    client
        .batch_execute(
            "CREATE TABLE w (id int PRIMARY KEY); \
             DO $$ BEGIN EXECUTE 'CREATE TABLE w2 (id int PRIMARY KEY)'; INSERT INTO w2 VALUES (5); END $$",
        )
        .await
        .unwrap();
    client
        .batch_execute("INSERT INTO t VALUES (3, 'z')")
        .await
        .unwrap();
    c.converged("SELECT string_agg(id || v, ',' ORDER BY id) FROM t")
        .await;
    c.converged("SELECT to_regclass('w')::text || (SELECT string_agg(id::text, ',') FROM w2)")
        .await;
    for b in 1..=2 {
        let absent: bool = c
            .direct(b)
            .await
            .query_one("SELECT to_regclass('u') IS NULL", &[])
            .await
            .unwrap()
            .get(0);
        assert!(absent, "backend {b}");
    }
}

/// The physical time (Unix ms) of every version of `table`'s rows on a backend.
/// A client session over a raw socket, to send protocol messages in reads
/// of its own choosing.
struct RawSession {
    stream: tokio::net::TcpStream,
    buf: Vec<u8>,
}

impl RawSession {
    async fn send(&mut self, messages: &[Vec<u8>]) {
        use tokio::io::AsyncWriteExt;
        self.stream.write_all(&messages.concat()).await.unwrap();
    }

    /// The tags of the messages received up to and including the first
    /// with tag `last` (within 10 s); an error fails the test unless it
    /// is the one awaited.
    async fn read_until(&mut self, last: u8) -> Vec<u8> {
        use tokio::io::AsyncReadExt;
        let mut tags = Vec::new();
        loop {
            while self.buf.len() >= 5 {
                let len = u32::from_be_bytes(self.buf[1..5].try_into().unwrap()) as usize;
                if self.buf.len() < 1 + len {
                    break;
                }
                let tag = self.buf[0];
                let message: Vec<u8> = self.buf.drain(..1 + len).collect();
                assert!(
                    tag != b'E' || last == b'E',
                    "error: {}",
                    String::from_utf8_lossy(&message)
                );
                tags.push(tag);
                if tag == last {
                    return tags;
                }
            }
            let mut chunk = [0u8; 4096];
            let n = tokio::time::timeout(Duration::from_secs(10), self.stream.read(&mut chunk))
                .await
                .expect("an answer within 10 s")
                .unwrap();
            assert!(n > 0, "the node closed the session");
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }
}

/// Start a batch with a read, flushed and answered (the node has passed it
/// on before the rest of the batch comes).
async fn read_first(raw: &mut RawSession) {
    raw.send(&[
        extended_parse("SELECT 1"),
        bind_unnamed(),
        execute_unnamed(),
        vec![b'H', 0, 0, 0, 4],
    ])
    .await;
    assert_eq!(raw.read_until(b'C').await, b"12DC".to_vec());
}

/// A session as `postgres` (trusted) through the node at `port`, logged in.
async fn raw_session(port: u16) -> RawSession {
    let mut body = 196_608u32.to_be_bytes().to_vec();
    for part in ["user", "postgres", "database", "postgres"] {
        body.extend_from_slice(part.as_bytes());
        body.push(0);
    }
    body.push(0);
    let mut startup = ((body.len() + 4) as u32).to_be_bytes().to_vec();
    startup.extend(body);
    let stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    let mut session = RawSession {
        stream,
        buf: Vec::new(),
    };
    session.send(&[startup]).await;
    session.read_until(b'Z').await;
    session
}

fn message(tag: u8, body: &[u8]) -> Vec<u8> {
    let mut out = vec![tag];
    out.extend_from_slice(&((body.len() + 4) as u32).to_be_bytes());
    out.extend_from_slice(body);
    out
}

/// Parse of the unnamed statement, no parameter types.
fn extended_parse(sql: &str) -> Vec<u8> {
    let mut body = vec![0];
    body.extend_from_slice(sql.as_bytes());
    body.extend_from_slice(&[0, 0, 0]);
    message(b'P', &body)
}

/// Bind of the unnamed portal to the unnamed statement, no parameters.
fn bind_unnamed() -> Vec<u8> {
    message(b'B', &[0, 0, 0, 0, 0, 0, 0, 0])
}

/// Execute of the unnamed portal, every row.
fn execute_unnamed() -> Vec<u8> {
    message(b'E', &[0, 0, 0, 0, 0])
}

async fn version_times(client: &Client, table: &str) -> Vec<i64> {
    client
        .query(
            "SELECT version FROM chorus.row_version WHERE tbl = $1 ORDER BY version",
            &[&table],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| chorus_router::hlc::unix_millis(r.get::<_, i64>(0) as u64))
        .collect()
}

fn unix_ms_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

#[tokio::test(flavor = "multi_thread")]
async fn a_session_is_admitted_only_once_its_backends_streams_exist() {
    // A change committed before the slot of its stream exists would never
    // reach that peer. Creating a logical slot waits for the transactions
    // running on the backend, so one held open on backend 1 keeps node 1's
    // slots from being made: node 1 must refuse sessions meanwhile, as a
    // PostgreSQL that is starting up does.
    let dir = tempfile::tempdir().unwrap();
    let backends = testkit::backends(dir.path(), 2);
    let blocker = testkit::connect(&backends[0].conninfo("postgres"))
        .await
        .unwrap();
    blocker
        .batch_execute("BEGIN; SELECT txid_current()")
        .await
        .unwrap();
    let c = cluster_on(
        dir,
        backends,
        |_| "backend_connect_timeout_ms = 1000".to_string(),
        "",
    )
    .await;
    let refused = testkit::connect(&format!(
        "host=127.0.0.1 port={} user=postgres dbname=postgres",
        c.nodes[0].port()
    ))
    .await
    .unwrap_err();
    assert_eq!(
        testkit::sqlstate(&refused).as_deref(),
        Some("57P03"),
        "{refused:?}"
    );
    blocker.batch_execute("COMMIT").await.unwrap();
    // Once the slot exists, sessions are admitted and the first write
    // reaches the peer.
    let deadline = Instant::now() + Duration::from_secs(30);
    let client = loop {
        match testkit::connect(&format!(
            "host=127.0.0.1 port={} user=postgres dbname=postgres",
            c.nodes[0].port()
        ))
        .await
        {
            Ok(client) => break client,
            Err(e)
                if Instant::now() < deadline
                    && testkit::sqlstate(&e).as_deref() == Some("57P03") => {}
            Err(e) => panic!("node 1 never admitted a session: {e:?}"),
        }
    };
    let slots: Vec<String> = c
        .direct(1)
        .await
        .query(
            "SELECT slot_name::text FROM pg_replication_slots ORDER BY 1",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(slots, ["chorus_1_to_pg2"]);
    client
        .batch_execute("CREATE TABLE first (id int PRIMARY KEY); INSERT INTO first VALUES (1)")
        .await
        .unwrap();
    c.expect_everywhere("SELECT count(*)::text FROM first", "1")
        .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn writes_carry_the_node_clock_in_every_protocol_mode() {
    // Node 1's clock runs a minute behind: a version stamped by the proxy is
    // unmistakable next to one the backend would make from its own clock.
    const OFFSET_MS: i64 = -60_000;
    let c = cluster_with(
        2,
        |i| {
            if i == 1 {
                format!("clock_offset_ms = {OFFSET_MS}\nmax_clock_skew_ms = 120000")
            } else {
                String::new()
            }
        },
        "",
    )
    .await;
    let started = unix_ms_now();
    let client = c.via(1).await;
    client
        .batch_execute("CREATE TABLE stamped (id int PRIMARY KEY, note text)")
        .await
        .unwrap();
    // Simple protocol, one statement and several.
    client
        .batch_execute("INSERT INTO stamped VALUES (1, 'simple')")
        .await
        .unwrap();
    client
        .batch_execute(
            "INSERT INTO stamped VALUES (2, 'a'); UPDATE stamped SET note = 'b' WHERE id = 2",
        )
        .await
        .unwrap();
    // Extended protocol with a prepared statement, then pipelined.
    let insert = client
        .prepare("INSERT INTO stamped VALUES ($1, $2)")
        .await
        .unwrap();
    client
        .execute(&insert, &[&3i32, &"extended"])
        .await
        .unwrap();
    let (a, b, d) = tokio::join!(
        client.execute(&insert, &[&4i32, &"pipelined"]),
        client.query_one("SELECT count(*) FROM stamped", &[]),
        client.execute(&insert, &[&5i32, &"pipelined"]),
    );
    a.unwrap();
    b.unwrap();
    d.unwrap();
    // A pipeline whose write arrives after its batch began with a read the
    // node has already passed on (one batch: no Sync between them).
    let mut raw = raw_session(c.nodes[0].port()).await;
    raw.send(&[
        extended_parse("SELECT 1"),
        bind_unnamed(),
        execute_unnamed(),
        vec![b'H', 0, 0, 0, 4],
    ])
    .await;
    raw.read_until(b'C').await;
    raw.send(&[
        extended_parse("INSERT INTO stamped VALUES (10, 'later read')"),
        bind_unnamed(),
        execute_unnamed(),
        vec![b'S', 0, 0, 0, 4],
    ])
    .await;
    let answers = raw.read_until(b'Z').await;
    assert_eq!(answers, b"12CZ".to_vec(), "answers after the first read");
    // The same after an error in the batch's first read: the backend skips
    // the write (and its stamp) up to the Sync.
    raw.send(&[
        extended_parse("SELECT 1 / (SELECT 0)"),
        bind_unnamed(),
        execute_unnamed(),
        vec![b'H', 0, 0, 0, 4],
    ])
    .await;
    assert_eq!(raw.read_until(b'E').await, b"12E".to_vec());
    raw.send(&[
        extended_parse("INSERT INTO stamped VALUES (11, 'skipped')"),
        bind_unnamed(),
        execute_unnamed(),
        vec![b'S', 0, 0, 0, 4],
    ])
    .await;
    assert_eq!(raw.read_until(b'Z').await, b"Z".to_vec());
    let skipped: i64 = client
        .query_one("SELECT count(*) FROM stamped WHERE id = 11", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(skipped, 0);
    // And the session goes on: a batch with a read, then a Describe and a
    // write in the next read.
    raw.send(&[
        extended_parse("SELECT 2"),
        bind_unnamed(),
        execute_unnamed(),
        vec![b'H', 0, 0, 0, 4],
    ])
    .await;
    assert_eq!(raw.read_until(b'C').await, b"12DC".to_vec());
    raw.send(&[
        extended_parse("INSERT INTO stamped VALUES (12, 'described') RETURNING id"),
        bind_unnamed(),
        message(b'D', b"P\0"),
        execute_unnamed(),
        vec![b'S', 0, 0, 0, 4],
    ])
    .await;
    assert_eq!(raw.read_until(b'Z').await, b"12TDCZ".to_vec());
    // A transaction block gets one stamp for all its rows.
    client
        .batch_execute(
            "BEGIN; INSERT INTO stamped VALUES (6, 'txn'); INSERT INTO stamped VALUES (7, 'txn'); COMMIT",
        )
        .await
        .unwrap();
    // An aborted transaction fails as it would without Chorus, and the
    // session goes on, in both protocols.
    client.batch_execute("BEGIN").await.unwrap();
    let dup = client
        .batch_execute("INSERT INTO stamped VALUES (1, 'dup')")
        .await
        .unwrap_err();
    assert_eq!(testkit::sqlstate(&dup).as_deref(), Some("23505"));
    let aborted = client
        .batch_execute("INSERT INTO stamped VALUES (8, 'no')")
        .await
        .unwrap_err();
    assert_eq!(testkit::sqlstate(&aborted).as_deref(), Some("25P02"));
    let aborted = client.execute(&insert, &[&8i32, &"no"]).await.unwrap_err();
    assert_eq!(testkit::sqlstate(&aborted).as_deref(), Some("25P02"));
    client.batch_execute("ROLLBACK").await.unwrap();
    // Error positions are the client's own.
    let bad = "INSERT INTO stamped VALUES (9, no_such_column)";
    let via_proxy = client.batch_execute(bad).await.unwrap_err();
    let direct = c.direct(1).await.batch_execute(bad).await.unwrap_err();
    assert_eq!(
        format!("{:?}", via_proxy.as_db_error().unwrap().position()),
        format!("{:?}", direct.as_db_error().unwrap().position())
    );
    // pgbench in prepared mode and in a pipeline.
    let dir = tempfile::tempdir().unwrap();
    let script = dir.path().join("insert.sql");
    std::fs::write(
        &script,
        "\\set id random(1000, 100000000)\n\
         \\startpipeline\n\
         INSERT INTO stamped VALUES (:id, 'pgbench') ON CONFLICT (id) DO NOTHING;\n\
         \\endpipeline\n\
         INSERT INTO stamped VALUES (:id + 1, 'pgbench') ON CONFLICT (id) DO NOTHING;\n",
    )
    .unwrap();
    let out = testkit::pgbench(
        c.nodes[0].port(),
        &[
            "-n",
            "-M",
            "prepared",
            "-t",
            "20",
            "-f",
            script.to_str().unwrap(),
        ],
    );
    assert!(out.status.success(), "{}", testkit::stderr(&out));
    let finished = unix_ms_now();

    let rows: i64 = client
        .query_one("SELECT count(*) FROM stamped", &[])
        .await
        .unwrap()
        .get(0);
    let times = version_times(&c.direct(1).await, "public.stamped").await;
    assert_eq!(
        times.len() as i64,
        rows,
        "every row has a version: {times:?}"
    );
    for t in &times {
        assert!(
            (started + OFFSET_MS - 1000..=finished + OFFSET_MS + 1000).contains(t),
            "version at {t} is not from the node's clock ({} .. {})",
            started + OFFSET_MS,
            finished + OFFSET_MS
        );
    }
    // Both rows of the transaction block carry the same version.
    let txn: Vec<i64> = c
        .direct(1)
        .await
        .query(
            "SELECT version FROM chorus.row_version WHERE tbl = 'public.stamped' \
             AND pk IN ('{\"id\": 6}', '{\"id\": 7}')",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(txn.len(), 2);
    assert_eq!(txn[0], txn[1]);
    // And the other backend got the same rows with the same versions.
    c.converged(
        "SELECT md5(string_agg(pk::text || version, ',' ORDER BY pk::text)) \
         FROM chorus.row_version WHERE tbl = 'public.stamped'",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn ddl_and_roles_later_in_an_extended_batch_replicate_or_are_refused() {
    // A pipeline that began with a read the node passed on already, then
    // sends DDL before its Sync: the DDL takes the cluster's lease there
    // and replicates, as at a batch's start.
    let c = cluster(3).await;
    let mut raw = raw_session(c.nodes[0].port()).await;
    read_first(&mut raw).await;
    raw.send(&[
        extended_parse("CREATE TABLE later_ddl (id int PRIMARY KEY)"),
        bind_unnamed(),
        execute_unnamed(),
        vec![b'S', 0, 0, 0, 4],
    ])
    .await;
    assert_eq!(raw.read_until(b'Z').await, b"12CZ".to_vec());
    c.expect_everywhere(
        "SELECT count(*)::text FROM pg_class WHERE relname = 'later_ddl'",
        "1",
    )
    .await;
    // A role (PostgreSQL fires no event trigger for it) outside a
    // transaction block: refused, as at a batch's start, never made on one
    // backend only.
    read_first(&mut raw).await;
    raw.send(&[
        extended_parse("CREATE ROLE later_role NOLOGIN"),
        bind_unnamed(),
        execute_unnamed(),
        vec![b'S', 0, 0, 0, 4],
    ])
    .await;
    assert_eq!(raw.read_until(b'E').await, b"12E".to_vec());
    assert_eq!(raw.read_until(b'Z').await, b"Z".to_vec());
    // Inside a block it travels in the transaction's change stream.
    read_first(&mut raw).await;
    raw.send(&[
        extended_parse("BEGIN"),
        bind_unnamed(),
        execute_unnamed(),
        vec![b'S', 0, 0, 0, 4],
    ])
    .await;
    assert_eq!(raw.read_until(b'Z').await, b"12CZ".to_vec());
    read_first(&mut raw).await;
    raw.send(&[
        extended_parse("CREATE ROLE later_role_in_block NOLOGIN"),
        bind_unnamed(),
        execute_unnamed(),
        extended_parse("COMMIT"),
        bind_unnamed(),
        execute_unnamed(),
        vec![b'S', 0, 0, 0, 4],
    ])
    .await;
    assert_eq!(raw.read_until(b'Z').await, b"12C12CZ".to_vec());
    c.expect_everywhere(
        "SELECT string_agg(rolname, ',' ORDER BY rolname) FROM pg_roles WHERE rolname LIKE 'later\\_role%'",
        "later_role_in_block",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_write_through_a_node_whose_clock_is_behind_still_wins() {
    // Node 2's clock is 5 s behind; the limit for following another clock
    // is 1 s, so node 2 refuses to jump to node 1's time.
    let c = cluster_with(
        3,
        |i| {
            if i == 2 {
                "clock_offset_ms = -5000\nmax_clock_skew_ms = 1000".to_owned()
            } else {
                String::new()
            }
        },
        "",
    )
    .await;
    let n1 = c.via(1).await;
    let n2 = c.via(2).await;
    c.create_table(
        1,
        "CREATE TABLE reg (k int PRIMARY KEY, v text)",
        "public.reg",
    )
    .await;
    n1.batch_execute("INSERT INTO reg VALUES (1, 'one')")
        .await
        .unwrap();
    c.converged("SELECT v FROM reg WHERE k = 1").await;
    // Node 2 overwrites the row it has seen: its write happened later, so it
    // wins everywhere although its clock says otherwise.
    n2.batch_execute("UPDATE reg SET v = 'two' WHERE k = 1")
        .await
        .unwrap();
    c.expect_everywhere("SELECT v FROM reg WHERE k = 1", "two")
        .await;
    let version = c
        .converged(
            "SELECT version || '@' || origin FROM chorus.row_version \
             WHERE tbl = 'public.reg' AND pk = '{\"k\": 1}'",
        )
        .await;
    assert!(version.ends_with("@2"), "{version}");
    // Node 2 saw node 1's clock 5 s ahead, counted it, and did not follow:
    // a new row through node 2 is still stamped about 5 s in the past.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let rendered = c.node_handles[1].metrics.render();
        let refused = rendered
            .lines()
            .find(|l| l.starts_with("chorus_hlc_skew_refused_total"))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0);
        if refused >= 1.0 {
            break;
        }
        assert!(Instant::now() < deadline, "skew never counted:\n{rendered}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let before = unix_ms_now();
    n2.batch_execute("INSERT INTO reg VALUES (2, 'late clock')")
        .await
        .unwrap();
    let times = version_times(&c.direct(2).await, "public.reg").await;
    let newest_own = *times
        .iter()
        .min_by_key(|t| (*t - (before - 5000)).abs())
        .unwrap();
    assert!(
        (before - 6000..before - 4000).contains(&newest_own),
        "row 2 stamped at {newest_own}, expected about {}",
        before - 5000
    );
}

async fn has(client: &Client, id: i32) -> bool {
    client
        .query_opt("SELECT 1 FROM scoped WHERE id = $1", &[&id])
        .await
        .unwrap()
        .is_some()
}

#[tokio::test(flavor = "multi_thread")]
async fn commit_scopes_wait_for_the_backends_they_promise() {
    let mut c = cluster_with(3, |_| String::new(), "commit_scope_timeout_ms = 1500").await;
    let n1 = c.via(1).await;
    c.create_table(
        1,
        "CREATE TABLE scoped (id int PRIMARY KEY)",
        "public.scoped",
    )
    .await;
    let b2 = c.direct(2).await;
    let b3 = c.direct(3).await;
    let bad = n1
        .batch_execute("SET chorus.commit_scope = 'most'")
        .await
        .unwrap_err();
    assert_eq!(testkit::sqlstate(&bad).as_deref(), Some("22023"));

    // `all`: once the commit returns, every backend has the row, in both
    // protocols and in a transaction block.
    n1.batch_execute("SET chorus.commit_scope = 'all'")
        .await
        .unwrap();
    for id in 1..=10 {
        if id % 2 == 0 {
            n1.execute("INSERT INTO scoped VALUES ($1)", &[&id])
                .await
                .unwrap();
        } else {
            n1.batch_execute(&format!("BEGIN; INSERT INTO scoped VALUES ({id}); COMMIT"))
                .await
                .unwrap();
        }
        assert!(
            has(&b2, id).await && has(&b3, id).await,
            "row {id} missing after commit"
        );
    }

    // A backend that is frozen holds an `all` commit until it answers
    // again, while `majority` needs only two of three backends.
    c.backends[2].pause();
    // A setting PostgreSQL refuses (ALL is a reserved word) is not taken:
    // the session stays local, and a write returns at once.
    n1.batch_execute("RESET chorus.commit_scope").await.unwrap();
    let refused = n1
        .batch_execute("SET chorus.commit_scope = all")
        .await
        .unwrap_err();
    assert_eq!(testkit::sqlstate(&refused).as_deref(), Some("42601"));
    let started = Instant::now();
    n1.batch_execute("INSERT INTO scoped VALUES (99)")
        .await
        .unwrap();
    assert!(
        started.elapsed() < Duration::from_millis(1000),
        "{:?}",
        started.elapsed()
    );
    n1.batch_execute("SET chorus.commit_scope = majority")
        .await
        .unwrap();
    let started = Instant::now();
    n1.batch_execute("INSERT INTO scoped VALUES (100)")
        .await
        .unwrap();
    assert!(
        started.elapsed() < Duration::from_millis(1000),
        "{:?}",
        started.elapsed()
    );
    assert!(has(&b2, 100).await);
    n1.batch_execute("SET chorus.commit_scope = 'all'")
        .await
        .unwrap();
    let resume = {
        let started = Instant::now();
        let insert = n1.batch_execute("INSERT INTO scoped VALUES (101)");
        tokio::pin!(insert);
        // Not acknowledged while backend 3 is frozen...
        assert!(
            tokio::time::timeout(Duration::from_millis(600), &mut insert)
                .await
                .is_err()
        );
        c.backends[2].resume();
        // ...and acknowledged once it has the row.
        insert.await.unwrap();
        started.elapsed()
    };
    assert!(resume >= Duration::from_millis(600));
    assert!(has(&b3, 101).await);

    // With backend 3 gone, `all` times out with the configured error; the
    // row is committed on node 1's backend and reaches the others later.
    c.backends[2].kill();
    let started = Instant::now();
    let err = n1
        .batch_execute("INSERT INTO scoped VALUES (102)")
        .await
        .unwrap_err();
    let elapsed = started.elapsed();
    let db = err.as_db_error().expect("a server error");
    assert_eq!(db.code().code(), "40003", "{db:?}");
    assert!(
        db.message().contains("commit scope \"all\" not reached"),
        "{}",
        db.message()
    );
    assert!(
        (Duration::from_millis(1400)..Duration::from_secs(10)).contains(&elapsed),
        "{elapsed:?}"
    );
    testkit::eventually(
        "the row behind the failed scope reaching backend 2",
        Duration::from_secs(30),
        Duration::from_millis(50),
        || has(&b2, 102),
    )
    .await;
    // `majority` still works, and `local` (the default again) too.
    n1.batch_execute("SET chorus.commit_scope = majority; INSERT INTO scoped VALUES (103)")
        .await
        .unwrap();
    n1.batch_execute("RESET chorus.commit_scope; INSERT INTO scoped VALUES (104)")
        .await
        .unwrap();
    let count: i64 = n1
        .query_one("SELECT count(*) FROM scoped", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(count, 16);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_conflict_on_a_secondary_unique_key_is_resolved_and_apply_goes_on() {
    let c = cluster(3).await;
    let n1 = c.via(1).await;
    let n2 = c.via(2).await;
    c.create_table(
        1,
        "CREATE TABLE accounts (id int PRIMARY KEY, email text UNIQUE, note text)",
        "public.accounts",
    )
    .await;
    // Two different rows claim the same email through two nodes at once,
    // and an update moves a third row onto an email taken elsewhere. Both
    // transactions write before either commits, so neither node sees the
    // other's row in time to refuse its own.
    n1.batch_execute("INSERT INTO accounts VALUES (10, 'c@example.com', 'first')")
        .await
        .unwrap();
    c.converged("SELECT count(*)::text FROM accounts").await;
    n1.batch_execute(
        "BEGIN; INSERT INTO accounts VALUES (1, 'a@example.com', 'n1'); \
         INSERT INTO accounts VALUES (3, 'd@example.com', 'n1')",
    )
    .await
    .unwrap();
    n2.batch_execute(
        "BEGIN; INSERT INTO accounts VALUES (2, 'a@example.com', 'n2'); \
         UPDATE accounts SET email = 'd@example.com' WHERE id = 10",
    )
    .await
    .unwrap();
    let (a, b) = tokio::join!(n1.batch_execute("COMMIT"), n2.batch_execute("COMMIT"));
    a.unwrap();
    b.unwrap();
    let rows = c
        .converged("SELECT string_agg(id || ':' || email, ',' ORDER BY id) FROM accounts")
        .await;
    // One row per email survives, the same everywhere.
    assert_eq!(rows.matches("a@example.com").count(), 1, "{rows}");
    assert_eq!(rows.matches("d@example.com").count(), 1, "{rows}");
    c.converged(
        "SELECT md5(string_agg(pk::text || version || deleted, ',' ORDER BY pk::text)) \
         FROM chorus.row_version WHERE tbl = 'public.accounts'",
    )
    .await;
    // The losers are in the conflict logs and counted.
    let logged = c.conflicts_logged("unique").await;
    assert!(logged >= 2, "unique conflicts logged: {logged}");
    let counted = c.conflicts_counted("unique");
    assert!(counted >= 2.0, "unique conflicts counted: {counted}");
    // Replication did not stall: later writes from both nodes arrive.
    n2.batch_execute("INSERT INTO accounts VALUES (20, 'e@example.com', 'later')")
        .await
        .unwrap();
    n1.batch_execute("INSERT INTO accounts VALUES (21, 'f@example.com', 'later')")
        .await
        .unwrap();
    c.expect_everywhere(
        "SELECT count(*)::text FROM accounts WHERE note = 'later'",
        "2",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn the_adopt_command_makes_existing_tables_replicate() {
    let c = cluster(3).await;
    // Tables that existed before Chorus: made on each backend alone, with
    // the same rows.
    for b in 1..=3 {
        c.direct(b)
            .await
            .batch_execute(
                "SET chorus.ddl_scope = 'local'; \
                 CREATE TABLE legacy (id int PRIMARY KEY, v text); \
                 CREATE TABLE keyless (v text); \
                 INSERT INTO legacy VALUES (1, 'old'), (2, 'old')",
            )
            .await
            .unwrap();
    }
    // `chorus adopt` needs the schema, which each node installs on its
    // home backend as it starts.
    c.expect_everywhere("SELECT count(*)::text FROM chorus.local", "1")
        .await;
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("chorus.toml");
    let mut toml = format!(
        "[node]\nid = 1\n[replication]\n{}",
        testkit::cluster_toml(dir.path(), 1, &testkit::raft_ports(1), "s")
    );
    for (i, pg) in c.backends.iter().enumerate() {
        toml.push_str(&format!(
            "[[backends]]\nname = \"pg{}\"\nport = {}\n",
            i + 1,
            pg.port()
        ));
    }
    std::fs::write(&config, toml).unwrap();
    let adopt = |args: &[&str]| {
        let child = std::process::Command::new(env!("CARGO_BIN_EXE_chorus"))
            .arg("adopt")
            .arg("--config")
            .arg(&config)
            .args(args)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        testkit::wait_with_limit(child, Duration::from_secs(30))
    };
    // A table without a primary key is refused, with what to do instead,
    // and nothing is adopted anywhere.
    let refused = adopt(&["legacy", "keyless"]);
    assert!(!refused.status.success());
    let err = testkit::stderr(&refused);
    assert!(err.contains("has no primary key"), "{err}");
    assert!(err.contains("keyless"), "{err}");
    let adopted = c
        .converged("SELECT count(*)::text FROM chorus.replicated_table WHERE tbl = 'public.legacy'")
        .await;
    assert_eq!(adopted, "0", "nothing is adopted after a refusal");

    let ok = adopt(&["legacy"]);
    assert!(ok.status.success(), "{}", testkit::stderr(&ok));
    assert!(testkit::stdout(&ok).contains("adopted public.legacy on 3 backends"));
    let ok = adopt(&["--keyless", "keyless"]);
    assert!(ok.status.success(), "{}", testkit::stderr(&ok));

    // Now writes through any node replicate, updates of old rows included.
    c.via(2)
        .await
        .batch_execute(
            "UPDATE legacy SET v = 'new' WHERE id = 1; INSERT INTO legacy VALUES (3, 'new')",
        )
        .await
        .unwrap();
    c.via(3)
        .await
        .batch_execute("INSERT INTO keyless VALUES ('x')")
        .await
        .unwrap();
    c.expect_everywhere(
        "SELECT string_agg(id || v, ',' ORDER BY id) FROM legacy",
        "1new,2old,3new",
    )
    .await;
    c.expect_everywhere("SELECT string_agg(v, ',') FROM keyless", "x")
        .await;
    c.via(1)
        .await
        .batch_execute("UPDATE keyless SET v = 'y'")
        .await
        .unwrap();
    c.expect_everywhere("SELECT string_agg(v, ',') FROM keyless", "y")
        .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn sessions_wait_for_the_chorus_schema_and_are_told_why_when_it_never_comes() {
    // A replicating node whose home backend is not there: it cannot install
    // its schema, so sessions would write without capture. They are refused
    // like connections to a PostgreSQL that is starting up.
    let closed = chorus_proxy::localpg::free_port().unwrap();
    let raft_dir = tempfile::tempdir().unwrap();
    let config = Config::from_toml(&format!(
        "[node]\nid = 1\nworker_threads = 1\nbackend_connect_timeout_ms = 500\n\
         [[backends]]\nname = \"pg1\"\nport = {closed}\n\
         [[users]]\nname = \"postgres\"\n[[auth]]\nmethod = \"trust\"\n[replication]\n{}",
        testkit::cluster_toml(raft_dir.path(), 1, &testkit::raft_ports(1), "s")
    ))
    .unwrap();
    let node = Node::new(config).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let (stop, mut stopped) = watch::channel(false);
    let task = tokio::spawn(server::run_node_with(listener, node, async move {
        let _ = stopped.wait_for(|s| *s).await;
    }));
    let started = Instant::now();
    let err = testkit::connect(&format!(
        "host=127.0.0.1 port={port} user=postgres dbname=postgres"
    ))
    .await
    .unwrap_err();
    assert_eq!(testkit::sqlstate(&err).as_deref(), Some("57P03"), "{err:?}");
    assert!(started.elapsed() < Duration::from_secs(5));
    stop.send_replace(true);
    let _ = tokio::time::timeout(Duration::from_secs(10), task).await;
}

/// Tombstones (the versions of deleted rows) on a backend.
const TOMBSTONES: &str =
    "SELECT count(*)::text FROM chorus.row_version WHERE deleted AND pk <> '{}'";

#[tokio::test(flavor = "multi_thread")]
async fn tombstones_are_pruned_once_every_backend_is_past_them_and_an_open_writer_holds_them() {
    let c = cluster_with(
        3,
        |_| String::new(),
        "prune_interval_ms = 200\ntombstone_min_age_ms = 500",
    )
    .await;
    c.create_table(
        1,
        "CREATE TABLE tomb (id int PRIMARY KEY, v text)",
        "public.tomb",
    )
    .await;
    c.via(1)
        .await
        .batch_execute("INSERT INTO tomb SELECT g, 'x' FROM generate_series(1, 3000) g")
        .await
        .unwrap();
    c.expect_everywhere("SELECT count(*)::text FROM tomb", "3000")
        .await;
    // Deletes through two nodes: once every backend has applied past
    // them, their tombstones go everywhere.
    c.via(1)
        .await
        .batch_execute("DELETE FROM tomb WHERE id <= 1000")
        .await
        .unwrap();
    c.via(2)
        .await
        .batch_execute("DELETE FROM tomb WHERE id > 1000 AND id <= 2000")
        .await
        .unwrap();
    c.expect_everywhere("SELECT count(*)::text FROM tomb", "1000")
        .await;
    c.expect_everywhere(TOMBSTONES, "0").await;
    let pruned = c
        .node_handles
        .iter()
        .filter_map(|node| {
            node.metrics.render().lines().find_map(|l| {
                l.strip_prefix("chorus_tombstones_pruned_total{backend=\"pg1\"} ")
                    .and_then(|v| v.parse::<f64>().ok())
            })
        })
        .sum::<f64>();
    assert!(
        pruned >= 2000.0,
        "pg1's pruned tombstones counted: {pruned}"
    );

    // A transaction on backend 2 that has written and stays open holds back
    // every tombstone younger than it, on every backend.
    let open = c.via(2).await;
    open.batch_execute("BEGIN; INSERT INTO tomb VALUES (5000, 'open')")
        .await
        .unwrap();
    c.via(3)
        .await
        .batch_execute("DELETE FROM tomb WHERE id > 2000 AND id <= 2500")
        .await
        .unwrap();
    c.expect_everywhere(TOMBSTONES, "500").await;
    // The marker: every backend has noted horizons past these tombstones
    // from the two other origins (so only backend 2's holds them), and has
    // run a pruning round since.
    let past_them = "SELECT (count(*) = 2)::text FROM chorus.applied a \
                     WHERE a.origin IN (1, 3) AND a.horizon > \
                     (SELECT max(version) FROM chorus.row_version WHERE deleted AND pk <> '{}')";
    for b in [1, 3] {
        // (A backend notes no horizon of its own: one other origin there.)
        let own = format!(
            "SELECT ((SELECT count(*) FROM chorus.applied a WHERE a.origin IN (1, 3) AND a.origin <> {b} \
               AND a.horizon > (SELECT max(version) FROM chorus.row_version WHERE deleted AND pk <> '{{}}')) = 1 \
               AND chorus.horizon() > (SELECT max(version) FROM chorus.row_version WHERE deleted AND pk <> '{{}}'))::text"
        );
        c.expect_one(b, &own, "true").await;
    }
    c.expect_one(2, past_them, "true").await;
    let since: String = c
        .direct(1)
        .await
        .query_one("SELECT clock_timestamp()::text", &[])
        .await
        .unwrap()
        .get(0);
    c.expect_everywhere(
        &format!("SELECT (pruned_at > '{since}')::text FROM chorus.local"),
        "true",
    )
    .await;
    assert_eq!(c.values_everywhere(TOMBSTONES).await, ["500", "500", "500"]);

    // Once it ends, they go too, and the backends agree on every row.
    open.batch_execute("COMMIT").await.unwrap();
    c.expect_everywhere(TOMBSTONES, "0").await;
    // Rows written again after their tombstones went replicate as new ones.
    c.via(3)
        .await
        .batch_execute("INSERT INTO tomb SELECT g, 'again' FROM generate_series(1, 10) g")
        .await
        .unwrap();
    c.expect_everywhere("SELECT count(*)::text FROM tomb WHERE v = 'again'", "10")
        .await;
    c.via(1)
        .await
        .batch_execute("UPDATE tomb SET v = 'later' WHERE id <= 5")
        .await
        .unwrap();
    c.expect_everywhere("SELECT count(*)::text FROM tomb WHERE v = 'later'", "5")
        .await;
    c.converged(
        "SELECT md5(string_agg(id || ':' || v, ',' ORDER BY id)) || ' ' || count(*) FROM tomb",
    )
    .await;
    c.converged(
        "SELECT md5(string_agg(format('%s %s %s %s', pk, version, origin, deleted), ',' ORDER BY pk::text)) \
         FROM chorus.row_version WHERE tbl = 'public.tomb'",
    )
    .await;
}
