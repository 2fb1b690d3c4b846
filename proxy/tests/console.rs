//! The admin console (`psql -d chorus` on any node): the cluster's state as
//! result sets, for the roles the configuration names.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use chorus_testkit as testkit;
use chorus_testkit::procs;
use tokio_postgres::{Client, SimpleQueryMessage};

/// The rows of a console command, each value as text.
async fn show(client: &Client, command: &str) -> Vec<Vec<String>> {
    client
        .simple_query(command)
        .await
        .unwrap()
        .into_iter()
        .filter_map(|m| match m {
            SimpleQueryMessage::Row(row) => Some(
                (0..row.len())
                    .map(|i| row.get(i).unwrap_or("").to_owned())
                    .collect(),
            ),
            _ => None,
        })
        .collect()
}

/// Ask `command` until `done` holds of its rows (bounded); the last rows.
async fn show_until(
    client: &Client,
    command: &str,
    done: impl Fn(&[Vec<String>]) -> bool,
) -> Vec<Vec<String>> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let rows = show(client, command).await;
        if done(&rows) {
            return rows;
        }
        assert!(Instant::now() < deadline, "{command}: {rows:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_console_shows_the_cluster_to_the_roles_it_names() {
    let mut c = procs::cluster_opts(procs::Options {
        node_extra: "admin_users = [\"postgres\"]".into(),
        ..procs::Options::default()
    })
    .await;
    let console = |i: usize, user: &'static str| {
        let port = c.ports[i - 1];
        async move {
            testkit::connect(&format!(
                "host=127.0.0.1 port={port} user={user} dbname=chorus"
            ))
            .await
        }
    };
    let one = console(1, "postgres").await.unwrap();

    // Three members, one of them the leader, node 1 this one.
    let nodes = show_until(&one, "SHOW NODES", |rows| {
        rows.len() == 3 && rows.iter().filter(|r| r[2] == "leader").count() == 1
    })
    .await;
    let ids: Vec<&str> = nodes.iter().map(|r| r[0].as_str()).collect();
    assert_eq!(ids, ["1", "2", "3"]);
    let this: Vec<&str> = nodes.iter().map(|r| r[3].as_str()).collect();
    assert_eq!(this, ["true", "false", "false"]);
    // Where each listens, its home backend, its state, what it drives, and
    // that no copy runs.
    let nodes = show_until(&one, "SHOW NODES", |rows| {
        rows.iter().all(|r| r[7] == "active" && !r[8].is_empty())
    })
    .await;
    for (i, row) in nodes.iter().enumerate() {
        assert_eq!(row[5], format!("127.0.0.1:{}", c.ports[i]), "{row:?}");
        assert_eq!(row[6], format!("pg{}", i + 1), "{row:?}");
        assert_eq!(row[8], format!("pg{}", i + 1), "{row:?}");
        assert_eq!(row[9], "false", "{row:?}");
    }
    let raft = show(&one, "show raft;").await;
    assert_eq!(raft.len(), 1);
    assert_eq!(raft[0][0], "1");
    assert!(
        ["leader", "follower"].contains(&raft[0][1].as_str()),
        "{raft:?}"
    );

    // DDL through node 2 shows in node 1's log tail, and in every
    // backend's DDL index.
    c.via(2)
        .await
        .batch_execute("CREATE TABLE console_t (id int PRIMARY KEY)")
        .await
        .unwrap();
    let ddl = show_until(&one, "SHOW DDL", |rows| {
        rows.iter().any(|r| r[4].contains("console_t"))
    })
    .await;
    let entry = ddl.iter().find(|r| r[4].contains("console_t")).unwrap();
    assert_eq!(entry[1], "2", "{entry:?}");
    let seq = entry[0].clone();
    show_until(&one, "SHOW BACKENDS", |rows| {
        rows.len() == 3 && rows.iter().all(|r| r[7] == seq && r[3] == "false")
    })
    .await;
    let backends = show(&one, "SHOW BACKENDS").await;
    let homes: Vec<(&str, &str)> = backends
        .iter()
        .map(|r| (r[0].as_str(), r[2].as_str()))
        .collect();
    assert_eq!(homes, [("pg1", "true"), ("pg2", "false"), ("pg3", "false")]);
    let databases = show(&one, "SHOW DATABASES").await;
    assert_eq!(databases.len(), 1);
    assert_eq!(databases[0][..3], ["postgres", "true", "configuration"]);

    // Every stream: per origin backend, one slot per peer, all active.
    let streams = show_until(&one, "SHOW REPLICATION", |rows| {
        rows.len() == 6 && rows.iter().all(|r| r[4] == "t")
    })
    .await;
    for origin in ["pg1", "pg2", "pg3"] {
        let mut peers: Vec<&str> = streams
            .iter()
            .filter(|r| r[0] == origin)
            .map(|r| r[1].as_str())
            .collect();
        peers.sort_unstable();
        let mut others: Vec<&str> = ["pg1", "pg2", "pg3"]
            .into_iter()
            .filter(|b| *b != origin)
            .collect();
        others.sort_unstable();
        assert_eq!(peers, others, "{streams:?}");
    }
    // A peer that stops applying an origin's changes shows as that
    // stream's lag: backend 2 is held from applying node 1's (its row of
    // chorus.applied locked) while rows are written through node 1.
    let writer = c.via(1).await;
    writer
        .batch_execute("CREATE TABLE console_lag (id int PRIMARY KEY, v text)")
        .await
        .unwrap();
    // Backend 2's row for origin 1 is made by its first apply: one write
    // through node 1, seen there, makes sure the lock below holds a row.
    writer
        .batch_execute("INSERT INTO console_lag VALUES (0, 'first')")
        .await
        .unwrap();
    c.wait_for(2, "SELECT count(*)::text FROM console_lag", |n| n == "1")
        .await;
    let hold = c.hold_applies(2, 1).await;
    writer
        .batch_execute(
            "INSERT INTO console_lag SELECT g, repeat('x', 100) FROM generate_series(1, 5000) g",
        )
        .await
        .unwrap();
    // (lag bytes, lag seconds, retained bytes) of the stream pg1 -> peer.
    let stream = |rows: &[Vec<String>], peer: &str| -> (i64, String, i64) {
        let row = rows
            .iter()
            .find(|r| r[0] == "pg1" && r[1] == peer)
            .unwrap_or_else(|| panic!("no stream pg1 -> {peer}: {rows:?}"));
        (
            row[6].parse().unwrap_or(-1),
            row[7].clone(),
            row[8].parse().unwrap_or(-1),
        )
    };
    // Held: the stream to backend 2 keeps the insert's WAL (its slot's
    // confirmed position may have followed the walsender into the
    // transaction before its commit was read, as PostgreSQL's own
    // subscribers' does, but decoding restarts before it) and is not
    // "0 seconds behind"; the stream to backend 3 has caught up.
    show_until(&one, "SHOW REPLICATION", |rows| {
        let (_, seconds, retained) = stream(rows, "pg2");
        retained > 500_000 && seconds != "0.000" && stream(rows, "pg3").0 < 50_000
    })
    .await;
    hold.batch_execute("ROLLBACK").await.unwrap();
    c.wait_for(2, "SELECT count(*)::text FROM console_lag", |n| n == "5001")
        .await;
    show_until(&one, "SHOW REPLICATION", |rows| {
        let (bytes, seconds, _) = stream(rows, "pg2");
        bytes < 50_000 && seconds.parse::<f64>().is_ok()
    })
    .await;

    // Its global sequences, its conflicts by kind.
    c.via(1)
        .await
        .batch_execute("CREATE TABLE console_s (id serial PRIMARY KEY)")
        .await
        .unwrap();
    let sequences = show(&one, "SHOW SEQUENCES").await;
    assert!(
        sequences.iter().any(|r| r[0] == "public.console_s_id_seq"),
        "{sequences:?}"
    );
    let conflicts = one.simple_query("SHOW CONFLICTS").await.unwrap();
    let columns: Vec<String> = conflicts
        .iter()
        .find_map(|m| match m {
            SimpleQueryMessage::RowDescription(columns) => {
                Some(columns.iter().map(|c| c.name().to_owned()).collect())
            }
            _ => None,
        })
        .unwrap();
    assert_eq!(columns, ["kind", "resolution", "conflicts", "latest"]);

    // Its settings, without secrets.
    let settings = show(&one, "SHOW CONFIG").await;
    let setting = |name: &str| {
        settings
            .iter()
            .find(|r| r[0] == name)
            .map(|r| r[1].clone())
            .unwrap_or_else(|| panic!("no {name} in {settings:?}"))
    };
    assert_eq!(setting("node.id"), "1");
    assert_eq!(setting("node.admin_users"), "postgres");
    assert_eq!(setting("node.home_backend"), "pg1");
    assert!(setting("backends.pg2").ends_with("sslmode=disable"));
    assert!(settings
        .iter()
        .all(|r| !r[0].contains("secret") && !r[0].contains("password")));

    // A client session of node 1, idle in a transaction, as the console
    // shows it.
    let session = c.via(1).await;
    session.batch_execute("BEGIN; SELECT 1").await.unwrap();
    let pid: i32 = session
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0);
    let clients = show_until(&one, "SHOW CLIENTS", |rows| {
        rows.iter()
            .any(|r| r[0] == pid.to_string() && r[7] == "idle in transaction")
    })
    .await;
    let row = clients.iter().find(|r| r[0] == pid.to_string()).unwrap();
    assert_eq!(row[1..3], ["postgres", "postgres"], "{row:?}");
    assert_eq!(row[4], "pg1", "{row:?}");
    session.batch_execute("COMMIT").await.unwrap();
    drop(session);

    // A backend that stops shows as down.
    c.backends[2].stop();
    show_until(&one, "SHOW BACKENDS", |rows| {
        rows.iter().any(|r| r[0] == "pg3" && r[3] == "true")
    })
    .await;
    c.backends[2].start().unwrap();

    // psql reads it as any result set.
    let out = testkit::run_pg_program(
        "psql",
        &[
            "-X",
            "-At",
            "-h",
            "127.0.0.1",
            "-p",
            &c.ports[1].to_string(),
            "-U",
            "postgres",
            "-d",
            "chorus",
            "-c",
            "SHOW VERSION",
        ],
        &[],
        Duration::from_secs(30),
    );
    assert!(
        testkit::stdout(&out).starts_with("Chorus "),
        "{}{}",
        testkit::stdout(&out),
        testkit::stderr(&out)
    );

    // An unknown command: 42601, with the list of commands.
    let unknown = one.simple_query("PAUSE pg1").await.unwrap_err();
    assert_eq!(testkit::sqlstate(&unknown).as_deref(), Some("42601"));
    let hint = unknown
        .as_db_error()
        .and_then(|e| e.hint())
        .unwrap_or_default()
        .to_owned();
    assert!(hint.contains("SHOW NODES"), "{hint}");
    // The extended protocol: 0A000, and the session goes on.
    let extended = one.query("SHOW NODES", &[]).await.unwrap_err();
    assert_eq!(testkit::sqlstate(&extended).as_deref(), Some("0A000"));
    assert_eq!(show(&one, "SHOW VERSION").await.len(), 1);

    // A role the configuration does not name is refused at login.
    c.via(1)
        .await
        .batch_execute("CREATE ROLE watcher LOGIN")
        .await
        .unwrap();
    let refused = console(3, "watcher").await.err().unwrap();
    assert_eq!(testkit::sqlstate(&refused).as_deref(), Some("28000"));
}

/// The port of the backend serving a session.
async fn server_port(client: &Client) -> i32 {
    client
        .query_one("SELECT inet_server_port()", &[])
        .await
        .unwrap()
        .get(0)
}

/// The SHOW BACKENDS row of a backend.
fn backend_row<'a>(rows: &'a [Vec<String>], name: &str) -> &'a [String] {
    rows.iter().find(|r| r[0] == name).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drained_backend_loses_its_sessions_between_transactions_and_takes_vacuum_full() {
    let c = procs::cluster_opts(procs::Options {
        node_extra: "admin_users = [\"postgres\"]".into(),
        ..procs::Options::default()
    })
    .await;
    let console = |i: usize| {
        let port = c.ports[i - 1];
        async move {
            testkit::connect(&format!(
                "host=127.0.0.1 port={port} user=postgres dbname=chorus"
            ))
            .await
            .unwrap()
        }
    };
    let (one, two) = (console(1).await, console(2).await);
    let init = testkit::pgbench(c.ports[0], &["-i", "-s", "1", "-q"]);
    assert!(init.status.success(), "{}", testkit::stderr(&init));
    for b in 1..=3 {
        c.wait_for(b, "SELECT count(*)::text FROM pgbench_accounts", |v| {
            v == "100000"
        })
        .await;
    }
    let home_port = i32::from(c.backends[0].port());

    // Sessions through node 1, on its home backend: one with a setting
    // and prepared statements (of the protocol and of SQL), one with a
    // temporary table.
    let moving = c.via(1).await;
    moving
        .batch_execute("SET work_mem = '7MB'; PREPARE port_of AS SELECT inet_server_port()")
        .await
        .unwrap();
    let statement = moving
        .prepare("SELECT $1::int + 1, current_setting('work_mem'), inet_server_port()")
        .await
        .unwrap();
    let staying = c.via(1).await;
    staying
        .batch_execute("CREATE TEMP TABLE scratch (a int); INSERT INTO scratch VALUES (1)")
        .await
        .unwrap();
    assert_eq!(server_port(&moving).await, home_port);
    assert_eq!(server_port(&staying).await, home_port);

    // pgbench writes through node 1 all along.
    let port = c.ports[0];
    let load = std::thread::spawn(move || {
        testkit::pgbench(port, &["-n", "-N", "-c", "4", "-j", "2", "-T", "15"])
    });
    show_until(&one, "SHOW BACKENDS", |rows| {
        backend_row(rows, "pg1")[6].parse::<usize>().unwrap_or(0) >= 6
    })
    .await;

    one.simple_query("DRAIN pg1").await.unwrap();
    // Every node follows (Raft); node 1's sessions leave, but for the one
    // with a temporary table.
    show_until(&two, "SHOW BACKENDS", |rows| {
        backend_row(rows, "pg1")[4] == "true"
    })
    .await;
    let row = client_row(&moving, &statement).await;
    assert_eq!(row.0, 42);
    assert_eq!(row.1, "7MB", "the setting moved with the session");
    assert_ne!(row.2, home_port, "the session left the drained backend");
    let sql_prepared: i32 = moving
        .query_one("EXECUTE port_of", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(sql_prepared, row.2, "the SQL-level statement moved too");
    let rows = show_until(&one, "SHOW BACKENDS", |rows| {
        backend_row(rows, "pg1")[6] == "1"
    })
    .await;
    assert_eq!(backend_row(&rows, "pg1")[4], "true", "{rows:?}");
    let kept: i32 = staying
        .query_one("SELECT a FROM scratch", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(kept, 1);
    assert_eq!(server_port(&staying).await, home_port);
    // A new session through node 1 goes elsewhere.
    assert_ne!(server_port(&c.via(1).await).await, home_port);

    // Maintenance on the drained backend, while the load goes on
    // elsewhere and replication keeps it current.
    let direct = c.direct(1).await;
    direct
        .batch_execute("SET lock_timeout = '30s'")
        .await
        .unwrap();
    direct
        .batch_execute("VACUUM FULL pgbench_accounts")
        .await
        .unwrap();

    // What cannot be drained, or switched over.
    let refusal = |e: tokio_postgres::Error| testkit::sqlstate(&e).unwrap_or_default();
    assert_eq!(
        refusal(one.simple_query("DRAIN nosuch").await.unwrap_err()),
        "42704"
    );
    one.simple_query("DRAIN pg2").await.unwrap();
    let last = one.simple_query("DRAIN pg3").await.unwrap_err();
    assert_eq!(refusal(last), "55000");
    assert_eq!(
        refusal(one.simple_query("SWITCHOVER pg2").await.unwrap_err()),
        "55000"
    );
    one.simple_query("RESUME pg2").await.unwrap();
    one.simple_query("RESUME pg1").await.unwrap();
    let rows = show(&one, "SHOW BACKENDS").await;
    assert!(rows.iter().all(|r| r[4] == "false"), "{rows:?}");
    assert_eq!(server_port(&c.via(1).await).await, home_port);

    // The load lost no transaction, and the backends agree.
    let out = load.join().unwrap();
    let report = testkit::stdout(&out);
    assert!(out.status.success(), "{report}{}", testkit::stderr(&out));
    assert!(
        report.contains("number of failed transactions: 0 "),
        "{report}"
    );
    c.converge(
        "SELECT md5(string_agg(a::text, ',' ORDER BY aid)) FROM pgbench_accounts a",
        1,
        &[2, 3],
    )
    .await;
}

/// Run the prepared statement of the drain test.
async fn client_row(client: &Client, statement: &tokio_postgres::Statement) -> (i32, String, i32) {
    let row = client.query_one(statement, &[&41i32]).await.unwrap();
    (row.get(0), row.get(1), row.get(2))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn switchover_moves_the_write_leader_and_its_sessions_between_transactions() {
    let c = procs::cluster_opts(procs::Options {
        node_extra: "admin_users = [\"postgres\"]\nrouting = \"leader\"".into(),
        ..procs::Options::default()
    })
    .await;
    let console = testkit::connect(&format!(
        "host=127.0.0.1 port={} user=postgres dbname=chorus",
        c.ports[0]
    ))
    .await
    .unwrap();
    let rows = show_until(&console, "SHOW BACKENDS", |rows| {
        rows.iter().filter(|r| r[5] == "true").count() == 1
    })
    .await;
    let leader = rows.iter().find(|r| r[5] == "true").unwrap()[0].clone();
    let target = rows.iter().find(|r| r[5] == "false").unwrap()[0].clone();
    let port_of = |name: &str| {
        let b: usize = name.trim_start_matches("pg").parse().unwrap();
        i32::from(c.backends[b - 1].port())
    };
    let session = c.via(2).await;
    assert_eq!(server_port(&session).await, port_of(&leader));

    console
        .simple_query(&format!("SWITCHOVER {target}"))
        .await
        .unwrap();
    let rows = show(&console, "SHOW BACKENDS").await;
    assert_eq!(backend_row(&rows, &target)[5], "true", "{rows:?}");
    // The open session's next transaction runs on the new write leader, as
    // a new session's does, through any node.
    let deadline = Instant::now() + Duration::from_secs(30);
    while server_port(&session).await != port_of(&target) {
        assert!(Instant::now() < deadline, "the session stayed on {leader}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(server_port(&c.via(3).await).await, port_of(&target));

    let refused = |e: tokio_postgres::Error| testkit::sqlstate(&e).unwrap_or_default();
    assert_eq!(
        refused(
            console
                .simple_query(&format!("DRAIN {target}"))
                .await
                .unwrap_err()
        ),
        "55000",
        "the write leader cannot be drained"
    );
    assert_eq!(
        refused(console.simple_query("SWITCHOVER nosuch").await.unwrap_err()),
        "42704"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_takes_new_authentication_rules_timeouts_and_log_level_and_names_what_waits() {
    let c = procs::cluster_opts(procs::Options {
        node_extra: "admin_users = [\"postgres\"]".into(),
        ..procs::Options::default()
    })
    .await;
    c.via(1)
        .await
        .batch_execute("CREATE ROLE late LOGIN")
        .await
        .unwrap();
    let as_late = |i: usize| {
        let port = c.ports[i - 1];
        async move {
            testkit::connect(&format!(
                "host=127.0.0.1 port={port} user=late dbname=postgres"
            ))
            .await
        }
    };
    as_late(1).await.unwrap();
    // (The role reaches backend 2 through replication.)
    c.wait_for(
        2,
        "SELECT count(*)::text FROM pg_roles WHERE rolname = 'late'",
        |v| v == "1",
    )
    .await;
    let log = c.dir.path().join("node1.log");
    let log_text = || std::fs::read_to_string(&log).unwrap_or_default();
    assert!(log_text().contains("relay ended"), "debug lines are logged");

    // The file changes: a rule refusing `late`, a timeout, the log level,
    // and a setting read at start only.
    let path = c.dir.path().join("node1.toml");
    let original = std::fs::read_to_string(&path).unwrap();
    let edited = original
        .replace(
            "[[auth]]\nmethod = \"trust\"\n",
            "[[auth]]\nuser = \"late\"\nmethod = \"reject\"\n[[auth]]\nmethod = \"trust\"\n",
        )
        .replace(
            "[node]\n",
            "[node]\nauth_timeout_ms = 7000\nlog_level = \"warn\"\nmax_client_connections = 77\n",
        );
    assert_ne!(edited, original);
    std::fs::write(&path, &edited).unwrap();
    let (console, heard) = testkit::connect_hearing_notices(&format!(
        "host=127.0.0.1 port={} user=postgres dbname=chorus",
        c.ports[0]
    ))
    .await;
    let logged_before = log_text().len();
    console.simple_query("RELOAD").await.unwrap();
    let notices = heard.lock().unwrap().clone();
    assert!(
        notices
            .iter()
            .any(|n| n.starts_with("node.max_client_connections changed")),
        "{notices:?}"
    );
    assert_eq!(notices.len(), 1, "{notices:?}");
    let settings = show(&console, "SHOW CONFIG").await;
    let setting = |name: &str| {
        settings
            .iter()
            .find(|r| r[0] == name)
            .map(|r| r[1].clone())
            .unwrap()
    };
    assert_eq!(setting("node.auth_timeout_ms"), "7000");
    assert_eq!(setting("node.log_level"), "warn");
    assert_eq!(setting("node.max_client_connections"), "1000");
    // The new rule holds on node 1 at once; node 2 read nothing.
    let refused = as_late(1).await.err().unwrap();
    assert_eq!(testkit::sqlstate(&refused).as_deref(), Some("28000"));
    as_late(2).await.unwrap();

    // A session through node 1 would log debug lines; then a file that
    // does not load, and SIGHUP: an error logged (and nothing changed).
    drop(c.via(1).await);
    show_until(&console, "SHOW CLIENTS", <[Vec<String>]>::is_empty).await;
    std::fs::write(&path, "[node\n").unwrap();
    let pid = c.nodes[0].as_ref().unwrap().id().to_string();
    assert!(std::process::Command::new("kill")
        .args(["-HUP", &pid])
        .status()
        .unwrap()
        .success());
    let deadline = Instant::now() + Duration::from_secs(30);
    while !log_text()[logged_before..].contains("configuration not reloaded") {
        assert!(Instant::now() < deadline, "SIGHUP logged nothing");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        !log_text()[logged_before..].contains("relay ended"),
        "debug lines after log_level = \"warn\""
    );
    let broken = console.simple_query("RELOAD").await.unwrap_err();
    assert_eq!(testkit::sqlstate(&broken).as_deref(), Some("F0000"));
    assert!(as_late(1).await.is_err(), "the rules stayed");
    std::fs::write(&path, &original).unwrap();
    console.simple_query("RELOAD").await.unwrap();
    as_late(1).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_grafana_dashboard_queries_only_metrics_a_node_exports() {
    let dashboard: serde_json::Value =
        serde_json::from_str(include_str!("../../docs/grafana-dashboard.json")).unwrap();
    let mut names = std::collections::BTreeSet::new();
    for panel in dashboard["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().unwrap() {
            let expr = target["expr"].as_str().unwrap();
            let mut rest = expr;
            while let Some(at) = rest.find("chorus_") {
                let name: String = rest[at..]
                    .chars()
                    .take_while(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '_')
                    .collect();
                rest = &rest[at + name.len()..];
                names.insert(name);
            }
        }
    }
    assert!(names.len() >= 25, "{names:?}");

    // A node that has served a write, DDL and its replication.
    let c = procs::cluster("").await;
    c.via(1)
        .await
        .batch_execute("CREATE TABLE watched (id int PRIMARY KEY); INSERT INTO watched VALUES (1)")
        .await
        .unwrap();
    c.wait_for(2, "SELECT count(*)::text FROM watched", |v| v == "1")
        .await;
    let address = format!("127.0.0.1:{}", c.metrics_ports[0]).parse().unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (_, body) = testkit::http_get(address, "/metrics").await;
        let exported = |name: &str| {
            body.lines()
                .any(|l| l.starts_with(name) && l[name.len()..].starts_with([' ', '{']))
        };
        let missing: Vec<&String> = names.iter().filter(|n| !exported(n)).collect();
        if missing.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the dashboard queries metrics node 1 does not export: {missing:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
