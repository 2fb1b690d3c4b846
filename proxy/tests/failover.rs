//! Backend failure: a node whose home backend dies serves new sessions
//! from another backend; the dead backend catches up when it returns and
//! the node's sessions go home again.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use chorus_testkit as testkit;
use chorus_testkit::{link, procs};

use std::time::{Duration, Instant};

use procs::{cluster, cluster_with};

/// The port of the backend serving a session.
async fn served_by(session: &tokio_postgres::Client) -> i32 {
    session
        .query_one("SELECT inet_server_port()", &[])
        .await
        .unwrap()
        .get(0)
}

/// A session spoken to in the protocol itself, to see what a driver sees:
/// the pid of its BackendKeyData, and the pid of each notification.
struct RawSession {
    stream: tokio::net::TcpStream,
    buf: bytes::BytesMut,
    /// The pid and secret the session got in BackendKeyData.
    pid: i32,
    secret: i32,
}

/// What one query brought: its rows' first values, the pids of the
/// notifications that came with it, or its SQLSTATE.
type RawAnswer = Result<(Vec<String>, Vec<i32>), String>;

impl RawSession {
    async fn connect(port: u16) -> RawSession {
        use tokio::io::AsyncWriteExt;
        let stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .unwrap();
        let mut session = RawSession {
            stream,
            buf: bytes::BytesMut::new(),
            pid: 0,
            secret: 0,
        };
        let mut startup = bytes::BytesMut::new();
        postgres_protocol::message::frontend::startup_message(
            [("user", "postgres"), ("database", "postgres")],
            &mut startup,
        )
        .unwrap();
        session.stream.write_all(&startup).await.unwrap();
        session.read_until_ready().await.unwrap();
        assert_ne!(session.pid, 0, "no BackendKeyData");
        session
    }

    async fn query(&mut self, sql: &str) -> RawAnswer {
        self.send(sql).await;
        self.read_until_ready().await
    }

    async fn send(&mut self, sql: &str) {
        use tokio::io::AsyncWriteExt;
        let mut out = bytes::BytesMut::new();
        postgres_protocol::message::frontend::query(sql, &mut out).unwrap();
        self.stream.write_all(&out).await.unwrap();
    }

    async fn read_until_ready(&mut self) -> RawAnswer {
        use tokio::io::AsyncReadExt;
        let (mut values, mut notified, mut error) = (Vec::new(), Vec::new(), None);
        loop {
            let whole = self.buf.len() >= 5 && {
                let len = u32::from_be_bytes(self.buf[1..5].try_into().unwrap()) as usize;
                self.buf.len() > len
            };
            if !whole {
                let n = tokio::time::timeout(
                    Duration::from_secs(30),
                    self.stream.read_buf(&mut self.buf),
                )
                .await
                .expect("no answer in 30 s")
                .unwrap();
                assert!(n > 0, "the node closed the session");
                continue;
            }
            let len = u32::from_be_bytes(self.buf[1..5].try_into().unwrap()) as usize;
            let message = self.buf.split_to(1 + len);
            let (tag, body) = (message[0], &message[5..]);
            let int = |at: usize| i32::from_be_bytes(body[at..at + 4].try_into().unwrap());
            match tag {
                b'K' => (self.pid, self.secret) = (int(0), int(4)),
                b'A' => notified.push(int(0)),
                // The first value of a row (columns count, then length).
                b'D' => {
                    let n = int(2) as usize;
                    values.push(String::from_utf8_lossy(&body[6..6 + n]).into_owned());
                }
                b'E' => {
                    let mut at = 0;
                    while body[at] != 0 {
                        let end = at + 1 + body[at + 1..].iter().position(|&b| b == 0).unwrap();
                        if body[at] == b'C' {
                            error = Some(String::from_utf8_lossy(&body[at + 1..end]).into_owned());
                        }
                        at = end + 1;
                    }
                }
                b'Z' => {
                    return match error {
                        Some(code) => Err(code),
                        None => Ok((values, notified)),
                    };
                }
                _ => {}
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sessions_pid_is_its_backends_and_its_notifications_carry_it_after_a_move() {
    let mut c = cluster("").await;
    let mut session = RawSession::connect(c.ports[0]).await;
    // The pid the driver got is its backend's: pg_backend_pid() and
    // pg_terminate_backend() agree with it, as on PostgreSQL.
    let (values, _) = session.query("SELECT pg_backend_pid()").await.unwrap();
    assert_eq!(values, [session.pid.to_string()]);
    session.query("LISTEN moved").await.unwrap();
    let (_, notified) = session.query("NOTIFY moved, 'before'").await.unwrap();
    assert_eq!(notified, [session.pid]);
    // The session moves to another backend, whose pid differs: its own
    // notifications still carry the pid the driver knows.
    c.backends[0].kill();
    let mut errors = 0;
    let (values, _) = loop {
        match session.query("SELECT pg_backend_pid()").await {
            Ok(answer) => break answer,
            Err(code) => {
                assert_eq!(code, "08006");
                errors += 1;
                assert!(errors <= 1, "more than one statement failed");
            }
        }
    };
    assert_ne!(values, [session.pid.to_string()]);
    session.query("LISTEN moved").await.unwrap();
    let (_, notified) = session.query("NOTIFY moved, 'after'").await.unwrap();
    assert_eq!(notified, [session.pid]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancel_sent_to_another_node_reaches_the_session() {
    let c = cluster("").await;
    let mut session = RawSession::connect(c.ports[0]).await;
    let mut bystander = RawSession::connect(c.ports[1]).await;
    session.send("SELECT pg_sleep(30)").await;
    // The statement is running on backend 1 once pg_stat_activity says so.
    let deadline = Instant::now() + Duration::from_secs(10);
    while c
        .direct(1)
        .await
        .query_one(
            "SELECT count(*) FROM pg_stat_activity WHERE query = 'SELECT pg_sleep(30)' AND state = 'active'",
            &[],
        )
        .await
        .unwrap()
        .get::<_, i64>(0)
        == 0
    {
        assert!(Instant::now() < deadline, "the statement never started");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // A driver with several hosts sends its cancel to node 3 (as libpq
    // may): node 3 passes it on, and node 1 cancels the statement. (Node 3
    // learns the other nodes' addresses from the Raft state, where each
    // registers itself once a leader is elected: until then a cancel is
    // not passed on, so it is sent again each second.)
    let mut cancel = bytes::BytesMut::new();
    chorus_proxy::wire::protocol::cancel_request(&mut cancel, session.pid, session.secret);
    let deadline = Instant::now() + Duration::from_secs(20);
    let answer = loop {
        {
            use tokio::io::AsyncWriteExt;
            let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", c.ports[2]))
                .await
                .unwrap();
            stream.write_all(&cancel).await.unwrap();
        }
        if let Ok(answer) =
            tokio::time::timeout(Duration::from_secs(1), session.read_until_ready()).await
        {
            break answer;
        }
        assert!(
            Instant::now() < deadline,
            "the cancel never reached the session"
        );
    };
    assert_eq!(answer, Err("57014".to_owned()));
    // A wrong secret cancels nothing anywhere.
    bystander.send("SELECT pg_sleep(1)").await;
    let mut wrong = bytes::BytesMut::new();
    chorus_proxy::wire::protocol::cancel_request(&mut wrong, bystander.pid, bystander.secret ^ 1);
    {
        use tokio::io::AsyncWriteExt;
        let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", c.ports[0]))
            .await
            .unwrap();
        stream.write_all(&wrong).await.unwrap();
    }
    assert!(bystander.read_until_ready().await.is_ok());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_terminated_by_an_administrator_ends_and_does_not_move() {
    let c = cluster("").await;
    let victim = testkit::connect(&format!(
        "host=127.0.0.1 port={} user=postgres dbname=postgres application_name=victim",
        c.ports[0]
    ))
    .await
    .unwrap();
    victim.batch_execute("SELECT 1").await.unwrap();
    let ended: i64 = c
        .direct(1)
        .await
        .query_one(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE application_name = 'victim'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(ended, 1);
    let e = victim.batch_execute("SELECT 1").await.unwrap_err();
    assert!(
        e.is_closed() || testkit::sqlstate(&e).as_deref() == Some("57P01"),
        "{e:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ddl_held_for_the_lease_when_its_backend_dies_runs_on_the_next_one() {
    let mut c = cluster("").await;
    c.exec(1, "CREATE TABLE held (id int PRIMARY KEY)").await;
    c.wait_ddl(1).await;
    // A transaction through node 2 holds the cluster's DDL lease; through
    // node 1 a session's DDL waits for it, held by the node, not yet sent
    // to its backend.
    let holder = c.via(2).await;
    holder
        .batch_execute("BEGIN; ALTER TABLE held ADD COLUMN a int")
        .await
        .unwrap();
    let waiter = c.via(1).await;
    let waiting = tokio::spawn(async move {
        let result = waiter
            .batch_execute("ALTER TABLE held ADD COLUMN b int")
            .await;
        (waiter, result)
    });
    c.wait_metric(1, "chorus_ddl_lease_waiting", |v| v >= 1.0)
        .await;
    // Its backend dies meanwhile: the session moves, and its DDL with it.
    c.backends[0].kill();
    c.wait_metric(1, "chorus_backend_up{backend=\"pg1\"}", |v| v == 0.0)
        .await;
    holder.batch_execute("COMMIT").await.unwrap();
    let (waiter, result) = tokio::time::timeout(Duration::from_secs(60), waiting)
        .await
        .expect("the held DDL was answered")
        .unwrap();
    result.unwrap();
    for b in 2..=3 {
        c.wait_for(
            b,
            "SELECT string_agg(attname, ',' ORDER BY attnum) FROM pg_attribute \
              WHERE attrelid = 'held'::regclass AND attnum > 0",
            |v| v == "id,a,b",
        )
        .await;
    }
    // The session goes on.
    waiter
        .batch_execute("INSERT INTO held VALUES (1, 1, 1)")
        .await
        .unwrap();
    c.wait_for(3, "SELECT count(*)::text FROM held", |v| v == "1")
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transaction_open_when_its_backend_dies_fails_and_the_session_goes_on() {
    let mut c = cluster("").await;
    c.exec(1, "CREATE TABLE t (id int PRIMARY KEY, v text)")
        .await;
    c.wait_ddl(1).await;
    let s = c.via(1).await;
    s.batch_execute("BEGIN; INSERT INTO t VALUES (1, 'lost')")
        .await
        .unwrap();
    c.backends[0].kill();
    // The transaction is gone with its backend: its next statement fails
    // (whether it was sent before the session moved or after), and so do
    // the ones after it, until the client rolls back, as in any aborted
    // transaction.
    let e = s
        .batch_execute("INSERT INTO t VALUES (2, 'x')")
        .await
        .unwrap_err();
    let code = testkit::sqlstate(&e);
    assert!(matches!(code.as_deref(), Some("08006" | "25P02")), "{e:?}");
    let e = s.batch_execute("SELECT 1").await.unwrap_err();
    assert_eq!(testkit::sqlstate(&e).as_deref(), Some("25P02"), "{e:?}");
    // COMMIT of an aborted transaction rolls it back.
    s.batch_execute("COMMIT").await.unwrap();
    let n: i64 = s
        .query_one("SELECT count(*) FROM t", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 0, "nothing of the lost transaction is anywhere");
    // The session goes on.
    s.batch_execute("BEGIN; INSERT INTO t VALUES (3, 'after'); COMMIT")
        .await
        .unwrap();
    c.wait_for(2, "SELECT count(*)::text FROM t", |v| v == "1")
        .await;
    c.wait_for(3, "SELECT count(*)::text FROM t", |v| v == "1")
        .await;
    // Again, and this time the client's next word is COMMIT: it must not
    // be told the transaction committed.
    let on = c.backend_on(served_by(&s).await);
    s.batch_execute("BEGIN; INSERT INTO t VALUES (4, 'lost too')")
        .await
        .unwrap();
    c.backends[on - 1].kill();
    // Whether or not the node has seen the backend die by now, the COMMIT
    // must fail: lost (08006) or refused in an aborted transaction (25P02).
    let e = s.batch_execute("COMMIT").await.unwrap_err();
    assert!(
        matches!(testkit::sqlstate(&e).as_deref(), Some("08006" | "25P02")),
        "{e:?}"
    );
    s.batch_execute("ROLLBACK").await.unwrap();
    let n: i64 = s
        .query_one("SELECT count(*) FROM t WHERE id = 4", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_move_off_a_dead_home_backend_and_come_back_when_it_returns() {
    let mut c = cluster("").await;
    c.exec(1, "CREATE TABLE f (id int PRIMARY KEY, v text)")
        .await;
    c.wait_ddl(1).await;
    let home_port = i32::from(c.backends[0].port());
    let mut failover_ms = Vec::new();
    for round in 0..3 {
        let before = c.via(1).await;
        assert_eq!(
            served_by(&before).await,
            home_port,
            "round {round}: not on the home backend"
        );
        before
            .batch_execute(&format!("INSERT INTO f VALUES ({}, 'before')", round * 10))
            .await
            .unwrap();
        // A prepared statement and a setting, to be found again after the
        // move.
        let insert = before
            .prepare("INSERT INTO f VALUES ($1, $2) RETURNING inet_server_port()")
            .await
            .unwrap();
        before
            .batch_execute("SET TimeZone = 'Asia/Tokyo'")
            .await
            .unwrap();
        // The home backend dies.
        let killed = Instant::now();
        c.backends[0].kill();
        // The same session goes on with another backend: a statement in
        // flight when the backend died fails with 08006 (its outcome is
        // unknown), the next one runs elsewhere.
        let id = round * 10 + 1;
        let mut errors = 0;
        let port: i32 = loop {
            match before.query_one(&insert, &[&id, &"during"]).await {
                Ok(row) => break row.get(0),
                Err(e) => {
                    assert_eq!(testkit::sqlstate(&e).as_deref(), Some("08006"), "{e:?}");
                    errors += 1;
                    assert!(errors <= 1, "more than the statement in flight failed");
                }
            }
        };
        assert_ne!(port, home_port);
        failover_ms.push(killed.elapsed().as_millis());
        let zone: String = before.query_one("SHOW TimeZone", &[]).await.unwrap().get(0);
        assert_eq!(zone, "Asia/Tokyo");
        // Commit scopes hold on the backend the session moved to: majority
        // is two of the three backends, the one it is on and another.
        before
            .batch_execute(&format!(
                "SET chorus.commit_scope = 'majority'; INSERT INTO f VALUES ({}, 'majority'); \
                 RESET chorus.commit_scope",
                round * 10 + 2
            ))
            .await
            .unwrap();
        // New sessions through node 1 work too, on another backend.
        assert_ne!(served_by(&c.via(1).await).await, home_port);
        c.wait_for(3, &format!("SELECT v FROM f WHERE id = {id}"), |v| {
            v == "during"
        })
        .await;
        // The backend returns: it catches up, and node 1 serves from it again.
        tokio::task::block_in_place(|| c.backends[0].start().unwrap());
        c.wait_for(1, &format!("SELECT v FROM f WHERE id = {id}"), |v| {
            v == "during"
        })
        .await;
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if served_by(&c.via(1).await).await == home_port {
                break;
            }
            assert!(Instant::now() < deadline, "node 1 never went home");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    eprintln!(
        "failover times (backend killed to the first statement of the moved session): {failover_ms:?} ms"
    );
    assert!(failover_ms.iter().all(|ms| *ms < 5_000), "{failover_ms:?}");
    // Every backend has every row.
    for b in 1..=3 {
        c.wait_for(b, "SELECT count(*)::text FROM f", |v| v == "9")
            .await;
    }
}

/// Insert rows with ids from `first` through node `port` until `stop`;
/// the ids acknowledged and the errors seen.
async fn insert_until(
    port: u16,
    first: i32,
    stop: tokio::sync::watch::Receiver<bool>,
) -> (Vec<i32>, Vec<String>) {
    let client = testkit::connect(&format!(
        "host=127.0.0.1 port={port} user=postgres dbname=postgres"
    ))
    .await
    .unwrap();
    let mut ids = Vec::new();
    let mut errors = Vec::new();
    let mut id = first;
    while !*stop.borrow() {
        match client
            .execute("INSERT INTO r VALUES ($1, 'x')", &[&id])
            .await
        {
            Ok(_) => ids.push(id),
            Err(e) => errors.push(format!("{e:?}")),
        }
        id += 1;
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    (ids, errors)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolling_restart_of_every_node_and_backend_is_invisible_to_the_other_nodes_clients() {
    let mut c = cluster("").await;
    c.exec(1, "CREATE TABLE r (id int PRIMARY KEY, v text)")
        .await;
    c.exec(1, "CREATE TABLE rp (id bigint PRIMARY KEY, client int)")
        .await;
    c.wait_ddl(2).await;
    let script = c.dir.path().join("rolling.sql");
    std::fs::write(
        &script,
        "\\set id random(1, 1000000000000)\n\
         INSERT INTO rp VALUES (:id, :client_id) ON CONFLICT (id) DO UPDATE SET client = excluded.client;\n\
         SELECT count(*) FROM rp WHERE id = :id;\n",
    )
    .unwrap();
    let mut acknowledged = Vec::new();
    for k in 1..=3usize {
        // Clients of the two other nodes write the whole time node k and
        // then backend k restart: our own clients, and pgbench.
        let (stop, stopped) = tokio::sync::watch::channel(false);
        let mut clients = Vec::new();
        let mut benches = Vec::new();
        for other in (1..=3).filter(|o| *o != k) {
            let first = (k * 10 + other) as i32 * 100_000;
            clients.push(tokio::spawn(insert_until(
                c.ports[other - 1],
                first,
                stopped.clone(),
            )));
            let port = c.ports[other - 1];
            let script = script.display().to_string();
            benches.push(tokio::task::spawn_blocking(move || {
                testkit::pgbench(port, &["-n", "-c", "2", "-T", "6", "-f", &script])
            }));
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        c.stop_node(k);
        c.start_node(k);
        // A session of node k itself, idle on backend k while it restarts:
        // it moves to another backend instead of ending.
        let own = c.via(k).await;
        own.batch_execute("SELECT 1").await.unwrap();
        tokio::task::block_in_place(|| {
            c.backends[k - 1].stop();
            c.backends[k - 1].start().unwrap();
        });
        own.batch_execute(&format!("INSERT INTO rp VALUES (-{k}, 0)"))
            .await
            .unwrap();
        // Node k serves from its home backend again.
        let home = i32::from(c.backends[k - 1].port());
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let port: Option<i32> = match c
                .via(k)
                .await
                .query_one("SELECT inet_server_port()", &[])
                .await
            {
                Ok(row) => row.get(0),
                Err(_) => None,
            };
            if port == Some(home) {
                break;
            }
            assert!(Instant::now() < deadline, "node {k} never went home");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        for bench in benches {
            let out = bench.await.unwrap();
            let text = testkit::stdout(&out);
            assert!(
                out.status.success(),
                "phase {k}: pgbench through another node failed:\n{text}\n{}",
                testkit::stderr(&out)
            );
            if text.contains("number of failed transactions") {
                assert!(text.contains("number of failed transactions: 0 "), "{text}");
            }
            assert!(!text.contains("aborted"), "phase {k}: {text}");
            let processed = text
                .lines()
                .find_map(|l| l.strip_prefix("number of transactions actually processed: "))
                .and_then(|n| n.split(|c: char| !c.is_ascii_digit()).next())
                .and_then(|n| n.parse::<u64>().ok())
                .unwrap_or(0);
            eprintln!(
                "phase {k}: pgbench through another node: {processed} transactions, no error"
            );
            assert!(processed > 0, "{text}");
        }
        stop.send_replace(true);
        for client in clients {
            let (ids, errors) = client.await.unwrap();
            assert!(
                errors.is_empty(),
                "phase {k}: clients of other nodes saw {errors:?}"
            );
            assert!(!ids.is_empty());
            acknowledged.extend(ids);
        }
    }
    // Nothing lost: every acknowledged row on every backend.
    let expected = acknowledged.len().to_string();
    for b in 1..=3 {
        c.wait_for(b, "SELECT count(*)::text FROM r", |v| v == expected)
            .await;
        let present: std::collections::HashSet<i32> = c
            .direct(b)
            .await
            .query("SELECT id FROM r", &[])
            .await
            .unwrap()
            .iter()
            .map(|r| r.get(0))
            .collect();
        assert!(
            acknowledged.iter().all(|id| present.contains(id)),
            "backend {b}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_home_backend_is_found_by_the_health_checks_and_avoided() {
    let c = cluster("").await;
    c.exec(1, "CREATE TABLE z (id int PRIMARY KEY)").await;
    c.wait_ddl(1).await;
    let home_port = i32::from(c.backends[0].port());
    // Two sessions on the home backend: one idle, one about to send.
    let idle = c.via(1).await;
    let busy = c.via(1).await;
    // SIGSTOP: connections are accepted by the kernel and then hang.
    let frozen = Instant::now();
    c.backends[0].pause();
    // The statement in flight fails with 08006 once the health checks
    // find the backend down; the session goes on elsewhere.
    let in_flight = tokio::spawn(async move {
        let result = busy
            .query_one(
                "INSERT INTO z VALUES (-1) RETURNING inet_server_port()",
                &[],
            )
            .await;
        (busy, result.map(|r| r.get::<_, i32>(0)))
    });
    // New sessions keep arriving (one every 200 ms); the first to commit
    // tells how long the node took to stop sending sessions there.
    let (done_tx, mut done) = tokio::sync::mpsc::channel::<(u128, i32)>(64);
    let port = c.ports[0];
    let spawner = tokio::spawn(async move {
        for attempt in 0..100i32 {
            let done_tx = done_tx.clone();
            tokio::spawn(async move {
                let conninfo = format!("host=127.0.0.1 port={port} user=postgres dbname=postgres");
                if let Ok(client) = testkit::connect(&conninfo).await {
                    let sql =
                        format!("INSERT INTO z VALUES ({attempt}) RETURNING inet_server_port()");
                    if let Ok(row) = client.query_one(&sql, &[]).await {
                        let _ = done_tx
                            .send((frozen.elapsed().as_millis(), row.get(0)))
                            .await;
                    }
                }
            });
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    });
    let (first_ms, served_by) = tokio::time::timeout(Duration::from_secs(20), done.recv())
        .await
        .expect("no session committed while the home backend was frozen")
        .unwrap();
    spawner.abort();
    eprintln!("frozen home backend: first transaction through node 1 after {first_ms} ms");
    assert_ne!(served_by, home_port);
    assert!(first_ms < 5_000, "{first_ms} ms");
    let (busy, result) = tokio::time::timeout(Duration::from_secs(10), in_flight)
        .await
        .expect("the statement in flight on the frozen backend never ended")
        .unwrap();
    let e = result.unwrap_err();
    assert_eq!(testkit::sqlstate(&e).as_deref(), Some("08006"), "{e:?}");
    for session in [&idle, &busy] {
        let port: i32 = tokio::time::timeout(
            Duration::from_secs(10),
            session.query_one("SELECT inet_server_port()", &[]),
        )
        .await
        .expect("a session on the frozen backend did not move")
        .unwrap()
        .get(0);
        assert_ne!(port, home_port);
    }
    c.backends[0].resume();
    let deadline = Instant::now() + Duration::from_secs(30);
    while c.int_via(1, "SELECT inet_server_port()::int8").await != i64::from(home_port) {
        assert!(Instant::now() < deadline, "node 1 never went home");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn write_leader_routing_sends_every_write_to_one_backend_and_moves_when_it_dies() {
    let mut c = cluster_with("routing = \"leader\"", "").await;
    c.exec(1, "CREATE TABLE w (id int PRIMARY KEY, v text)")
        .await;
    c.wait_ddl(1).await;
    // The same keys written through all three nodes at once.
    let round = |c: &procs::Cluster, tag: &'static str| {
        let ports = c.ports.clone();
        async move {
            let mut tasks = Vec::new();
            for (n, port) in ports.into_iter().enumerate() {
                tasks.push(tokio::spawn(async move {
                    let client = testkit::connect(&format!(
                        "host=127.0.0.1 port={port} user=postgres dbname=postgres"
                    ))
                    .await?;
                    let mut served_by = Vec::new();
                    for id in 0..20 {
                        let row = client
                            .query_one(
                                "INSERT INTO w VALUES ($1, $2) ON CONFLICT (id) DO UPDATE SET v = excluded.v \
                                 RETURNING inet_server_port()",
                                &[&id, &format!("{tag} via node {}", n + 1)],
                            )
                            .await?;
                        served_by.push(row.get::<_, i32>(0));
                    }
                    Ok::<_, tokio_postgres::Error>(served_by)
                }));
            }
            let mut ports = std::collections::HashSet::new();
            for task in tasks {
                ports.extend(task.await.unwrap()?);
            }
            Ok::<_, tokio_postgres::Error>(ports)
        }
    };
    let served = round(&c, "first").await.unwrap();
    assert_eq!(
        served.len(),
        1,
        "writes went to several backends: {served:?}"
    );
    let leader_port = *served.iter().next().unwrap();
    let leader = c.backend_on(leader_port) - 1;
    // Replicated everywhere, without a conflict: one backend took every
    // write.
    for b in 1..=3 {
        c.wait_for(
            b,
            "SELECT count(*)::text FROM w WHERE v LIKE 'first%'",
            |v| v == "20",
        )
        .await;
        let conflicts = c.conflicts(b).await;
        assert_eq!(conflicts, 0, "backend {b} logged conflicts");
    }
    // The leader backend dies; the write leader moves to another backend,
    // and all nodes follow it.
    let killed = Instant::now();
    c.backends[leader].kill();
    let moved = loop {
        match round(&c, "second").await {
            Ok(ports) if ports.len() == 1 && !ports.contains(&leader_port) => break ports,
            _ => {
                assert!(
                    killed.elapsed() < Duration::from_secs(30),
                    "the write leader never moved"
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    };
    eprintln!("write leader moved in {} ms", killed.elapsed().as_millis());
    // Every write went through one backend at a time: still no conflict,
    // and the survivors agree.
    let survivors: Vec<usize> = (1..=3).filter(|b| *b != leader + 1).collect();
    for b in &survivors {
        c.wait_for(
            *b,
            "SELECT count(*)::text FROM w WHERE v LIKE 'second%'",
            |v| v == "20",
        )
        .await;
        let conflicts = c.conflicts(*b).await;
        assert_eq!(conflicts, 0, "backend {b} logged conflicts");
    }
    // The other survivor converges on the new leader's rows.
    let new_port = *moved.iter().next().unwrap();
    let new_leader = c.backend_on(new_port);
    let other = *survivors.iter().find(|b| **b != new_leader).unwrap();
    c.converge(
        "SELECT md5(string_agg(w::text, ',' ORDER BY id)) FROM w",
        new_leader,
        &[other],
    )
    .await;
}

/// Send a signal to a node process.
fn signal_node(c: &procs::Cluster, i: usize, sig: &str) {
    let pid = c.nodes[i - 1].as_ref().unwrap().id();
    std::process::Command::new("kill")
        .args([sig, &pid.to_string()])
        .status()
        .unwrap();
}

/// Which of `nodes` say they drive backend `b`'s replication.
async fn drivers_of(c: &procs::Cluster, b: usize, nodes: &[usize]) -> Vec<usize> {
    let mut drivers = Vec::new();
    for &i in nodes {
        let name = format!("chorus_replication_driving{{backend=\"pg{b}\"}}");
        if c.metric(i, &name).await == Some(1.0) {
            drivers.push(i);
        }
    }
    drivers
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_nodes_replication_duties_go_to_a_live_node_and_come_back() {
    let c = cluster("node_lease_ms = 1000").await;
    c.exec(1, "CREATE TABLE h (id int PRIMARY KEY, v text)")
        .await;
    c.wait_ddl(1).await;
    assert_eq!(drivers_of(&c, 1, &[1, 2, 3]).await, vec![1]);
    // Node 1 freezes: its connections to the backends stay open, it
    // answers nothing (the hard case for fencing).
    signal_node(&c, 1, "-STOP");
    let frozen = Instant::now();
    // As if node 1 had frozen before its upkeep recorded its backend's
    // sequence id (it does so shortly after it starts): the new driver
    // records it, or no DDL could be applied to backend 1.
    c.direct(1)
        .await
        .batch_execute("UPDATE chorus.local SET sequence_id = NULL")
        .await
        .unwrap();
    // Changes made on backend 1 meanwhile (directly: node 1 serves no
    // one) wait in its slots until another node takes the duties over.
    c.direct(1)
        .await
        .batch_execute("INSERT INTO h SELECT g, 'while node 1 froze' FROM generate_series(1, 50) g")
        .await
        .unwrap();
    for b in 2..=3 {
        c.wait_for(b, "SELECT count(*)::text FROM h", |v| v == "50")
            .await;
    }
    eprintln!(
        "backend 1's changes flowed again {} ms after node 1 froze (lease 1000 ms)",
        frozen.elapsed().as_millis()
    );
    // (Node 1's metrics endpoint is frozen too.)
    let drivers = drivers_of(&c, 1, &[2, 3]).await;
    assert!(drivers.len() == 1, "backend 1 driven by {drivers:?}");
    // The new driver applies the DDL log to backend 1 too, so changes
    // that need the new column reach it.
    c.exec(2, "ALTER TABLE h ADD COLUMN w int").await;
    c.wait_for(1, "SELECT count(*)::text FROM chorus.ddl_history", |v| {
        v == "2"
    })
    .await;
    c.exec(2, "INSERT INTO h VALUES (100, 'via node 2', 7)")
        .await;
    c.wait_for(1, "SELECT coalesce(max(w), 0)::text FROM h", |v| v == "7")
        .await;
    // Node 1 thaws: it finds its streams taken over (fenced), and gets
    // them back with a newer epoch once the leader hears from it.
    signal_node(&c, 1, "-CONT");
    let deadline = Instant::now() + Duration::from_secs(30);
    while drivers_of(&c, 1, &[1, 2, 3]).await != vec![1] {
        assert!(
            Instant::now() < deadline,
            "node 1 never got its duties back"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Handed over (epoch 1) and back (epoch 2): node 1 recorded its new
    // epoch on its backend when it took the streams again.
    c.wait_for(1, "SELECT driver_epoch::text FROM chorus.local", |v| {
        v.parse::<i64>().unwrap_or(0) >= 2
    })
    .await;
    c.exec(1, "INSERT INTO h VALUES (200, 'node 1 is back', 1)")
        .await;
    c.exec(1, "UPDATE h SET v = 'updated via node 1' WHERE id <= 10")
        .await;
    c.converge(
        "SELECT md5(string_agg(h::text, ',' ORDER BY id)) FROM h",
        1,
        &[2, 3],
    )
    .await;
    assert_eq!(c.conflicts(1).await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commit_scope_majority_loses_no_acknowledged_write_when_a_backend_is_lost_for_good() {
    let mut c = procs::cluster_opts(procs::Options {
        node_extra: "health_check_interval_ms = 200\nhealth_check_timeout_ms = 500\n".into(),
        replication: "reconcile_after_ms = 1500\n".into(),
        links: true,
        ..procs::Options::default()
    })
    .await;
    c.exec(1, "CREATE TABLE m (id int PRIMARY KEY, v text)")
        .await;
    c.wait_ddl(1).await;
    c.exec(
        2,
        "INSERT INTO m SELECT g, 'before' FROM generate_series(1, 10) g",
    )
    .await;
    for b in 1..=3 {
        c.wait_for(b, "SELECT count(*)::text FROM m", |v| v == "10")
            .await;
    }
    // Backend 1's changes reach backend 2 but not backend 3 (node 1, which
    // streams them, cannot reach backend 3).
    c.links[0][2].set(link::Fault::Blackhole);
    // Writes through node 1 under commit scope majority are acknowledged
    // once backends 1 and 2 have them.
    let s = c.via(1).await;
    s.batch_execute("SET chorus.commit_scope = 'majority'")
        .await
        .unwrap();
    for id in 100..150 {
        s.execute("INSERT INTO m VALUES ($1, 'acknowledged')", &[&id])
            .await
            .unwrap();
    }
    s.batch_execute("UPDATE m SET v = 'updated' WHERE id <= 5")
        .await
        .unwrap();
    s.batch_execute("DELETE FROM m WHERE id BETWEEN 6 AND 8")
        .await
        .unwrap();
    let on_3: i64 = c
        .direct(3)
        .await
        .query_one("SELECT count(*) FROM m WHERE id >= 100", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(on_3, 0, "backend 3 got backend 1's changes after all");
    // Backend 1 and its node are lost for good.
    drop(s);
    c.kill_node(1);
    c.backends[0].kill();
    std::fs::remove_dir_all(c.backends[0].dir().join("data")).unwrap();
    // The survivors reconcile: every acknowledged write is on both, and
    // they agree.
    c.converge(
        "SELECT md5(string_agg(m::text, ',' ORDER BY id)) FROM m",
        2,
        &[3],
    )
    .await;
    let survivor = c.direct(3).await;
    let count = |sql: &'static str| {
        let survivor = &survivor;
        async move { survivor.query_one(sql, &[]).await.unwrap().get::<_, i64>(0) }
    };
    assert_eq!(count("SELECT count(*) FROM m WHERE id >= 100").await, 50);
    assert_eq!(count("SELECT count(*) FROM m WHERE v = 'updated'").await, 5);
    assert_eq!(
        count("SELECT count(*) FROM m WHERE id BETWEEN 6 AND 8").await,
        0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_cut_off_from_raft_keeps_its_commit_scopes_while_another_node_drives_its_backend() {
    let c = procs::cluster_opts(procs::Options {
        replication: "commit_scope_timeout_ms = 3000\n".into(),
        extra: "node_lease_ms = 1000\n".into(),
        ..procs::Options::default()
    })
    .await;
    c.exec(1, "CREATE TABLE k (id int PRIMARY KEY)").await;
    c.wait_ddl(1).await;
    // Node 1 loses Raft (its backend links stay): its backend's streams
    // are handed to another node, which fences node 1's.
    c.relays[0].block(&[0]);
    c.relays[1].block(&[1]);
    c.relays[2].block(&[1]);
    c.wait_for(1, "SELECT driver_epoch::text FROM chorus.local", |v| {
        v.parse::<i64>().unwrap_or(0) >= 1
    })
    .await;
    // Commits through node 1 under scope majority still see their peers
    // (from its backend's slots, which the new driver confirms).
    let s = c.via(1).await;
    s.batch_execute("SET chorus.commit_scope = 'majority'")
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut id = 0;
    loop {
        id += 1;
        match s.execute("INSERT INTO k VALUES ($1)", &[&id]).await {
            Ok(_) => break,
            // Until node 1 finds its streams taken over (fenced).
            Err(e) => {
                assert_eq!(testkit::sqlstate(&e).as_deref(), Some("40003"), "{e:?}");
                assert!(Instant::now() < deadline, "scope never reached: {e:?}");
            }
        }
    }
    for _ in 0..5 {
        id += 1;
        s.execute("INSERT INTO k VALUES ($1)", &[&id])
            .await
            .unwrap();
    }
    for relay in &c.relays {
        relay.heal();
    }
    c.converge("SELECT count(*)::text FROM k", 1, &[2, 3]).await;
}

/// The value of `chorus_slot_retained_bytes` for slot of node 1's backend
/// to `peer`, from node 1's metrics.
async fn retained_for(c: &procs::Cluster, peer: &str) -> Option<f64> {
    let addr = format!("127.0.0.1:{}", c.metrics_ports[0]).parse().unwrap();
    let (_, body) = testkit::http_get(addr, "/metrics").await;
    body.lines()
        .filter(|l| l.starts_with("chorus_slot_retained_bytes{"))
        .filter(|l| l.contains("origin=\"pg1\"") && l.contains(&format!("peer=\"{peer}\"")))
        .find_map(|l| l.rsplit(' ').next()?.parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slot_keeping_wal_for_a_dead_peer_shows_in_the_metrics_and_the_log() {
    let mut c = procs::cluster_opts(procs::Options {
        replication: "slot_retained_warn_bytes = 1000000".into(),
        ..procs::Options::default()
    })
    .await;
    c.exec(1, "CREATE TABLE w (id int PRIMARY KEY, pad text)")
        .await;
    c.wait_ddl(1).await;
    // Backend 2 is down while about 5 MB of rows go through node 1: the
    // slot streaming them to it keeps that WAL.
    c.backends[1].kill();
    c.via(1)
        .await
        .batch_execute("INSERT INTO w SELECT g, repeat('x', 1000) FROM generate_series(1, 5000) g")
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if retained_for(&c, "pg2")
            .await
            .is_some_and(|b| b > 1_000_000.0)
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "retained WAL for pg2 never showed"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let log = c.dir.path().join("node1.log");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        if text.lines().any(|l| {
            l.contains("keeps more WAL than replication.slot_retained_warn_bytes")
                && l.contains("pg2")
        }) {
            break;
        }
        assert!(Instant::now() < deadline, "no warning logged");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Back, it catches up and the slot lets the WAL go.
    tokio::task::block_in_place(|| c.backends[1].start().unwrap());
    c.wait_for(2, "SELECT count(*)::text FROM w", |v| v == "5000")
        .await;
    let backend_one = c.direct(1).await;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if retained_for(&c, "pg2")
            .await
            .is_some_and(|b| b < 1_000_000.0)
        {
            break;
        }
        assert!(Instant::now() < deadline, "the slot to pg2 kept its WAL");
        // (A checkpoint logs the running transactions, from which a
        // logical slot's restart position moves on.)
        backend_one.batch_execute("CHECKPOINT").await.unwrap();
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_never_writes_on_another_nodes_backend_before_its_streams_exist() {
    // Node 2 cannot make its backend's slots while a transaction is open
    // there (creating a logical slot waits for it). Node 1's home backend
    // is down, so its sessions go elsewhere: not to backend 2, whose
    // changes could never reach the peers then, but to backend 3. (A long
    // node lease: node 2's duties stay its own while it is not yet
    // started, instead of passing to a node whose slots on backend 2 would
    // carry its changes.)
    let mut c = procs::cluster_opts(procs::Options {
        node_extra: "backend_connect_timeout_ms = 1000".into(),
        extra: "node_lease_ms = 60000".into(),
        start: vec![1, 3],
        ..procs::Options::default()
    })
    .await;
    let blocker = c.direct(2).await;
    blocker
        .batch_execute("BEGIN; SELECT txid_current()")
        .await
        .unwrap();
    c.start_node(2);
    c.wait_for(2, "SELECT count(*)::text FROM chorus.local", |v| v == "1")
        .await;
    c.backends[0].kill();
    let ports: Vec<i32> = c.backends.iter().map(|b| i32::from(b.port())).collect();
    let mut served = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while served.len() < 3 {
        assert!(
            Instant::now() < deadline,
            "node 1 served nothing: {served:?}"
        );
        let Ok(client) = testkit::connect(&format!(
            "host=127.0.0.1 port={} user=postgres dbname=postgres",
            c.ports[0]
        ))
        .await
        else {
            continue;
        };
        let port: i32 = client
            .query_one("SELECT inet_server_port()", &[])
            .await
            .unwrap()
            .get(0);
        served.push(port);
    }
    assert!(
        served.iter().all(|p| *p == ports[2]),
        "sessions served by {served:?}; backend 2 is {}",
        ports[1]
    );
    let slots: i64 = blocker
        .query_one(
            "SELECT count(*) FROM pg_replication_slots WHERE slot_name LIKE 'chorus\\_2\\_to\\_%'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(
        slots < 2,
        "the test needs backend 2 without a slot of its streams"
    );

    // Once the slots exist, backend 2 takes sessions, and what they write
    // reaches backend 3.
    blocker.batch_execute("COMMIT").await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    let client = loop {
        assert!(Instant::now() < deadline, "backend 2 never took a session");
        if let Ok(client) = testkit::connect(&format!(
            "host=127.0.0.1 port={} user=postgres dbname=postgres",
            c.ports[0]
        ))
        .await
        {
            let port: i32 = client
                .query_one("SELECT inet_server_port()", &[])
                .await
                .unwrap()
                .get(0);
            if port == ports[1] {
                break client;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    client
        .batch_execute(
            "CREATE TABLE late_streams (id int PRIMARY KEY); INSERT INTO late_streams VALUES (1)",
        )
        .await
        .unwrap();
    c.wait_for(3, "SELECT count(*)::text FROM late_streams", |v| v == "1")
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_apply_held_longer_than_wal_sender_timeout_keeps_its_stream() {
    // Walsenders that end a stream after 3 s without a word from its node.
    let c = procs::cluster_opts(procs::Options {
        backend_settings: vec![("wal_sender_timeout".into(), "3s".into())],
        ..procs::Options::default()
    })
    .await;
    let writer = c.via(1).await;
    writer
        .batch_execute("CREATE TABLE held (id int PRIMARY KEY)")
        .await
        .unwrap();
    writer
        .batch_execute("INSERT INTO held VALUES (0)")
        .await
        .unwrap();
    c.wait_for(2, "SELECT count(*)::text FROM held", |n| n == "1")
        .await;
    let walsender = || async {
        c.direct(1)
            .await
            .query_one(
                "SELECT active_pid::text FROM pg_replication_slots WHERE slot_name = 'chorus_1_to_pg2'",
                &[],
            )
            .await
            .unwrap()
            .get::<_, Option<String>>(0)
    };
    let before = walsender().await.expect("the stream to backend 2 runs");
    // Backend 2's apply of the next write waits on a lock for three times
    // the timeout (seen from its own start, on backend 2).
    let hold = c.hold_applies(2, 1).await;
    writer
        .batch_execute("INSERT INTO held VALUES (1)")
        .await
        .unwrap();
    c.wait_for(
        2,
        "SELECT (count(*) > 0)::text FROM pg_stat_activity \
          WHERE wait_event_type = 'Lock' AND application_name = 'chorus replication' \
            AND now() - query_start > interval '9 s'",
        |held| held == "true",
    )
    .await;
    // The walsender that was sending to it all along is still the one,
    // and the stream's lag has grown meanwhile.
    assert_eq!(walsender().await.as_deref(), Some(before.as_str()));
    let lag = c
        .metric(1, "chorus_replication_lag_seconds{peer=\"pg2\"}")
        .await
        .unwrap_or(0.0);
    assert!(lag >= 5.0, "lag {lag} s while an apply has waited 9 s");
    hold.batch_execute("ROLLBACK").await.unwrap();
    c.wait_for(2, "SELECT count(*)::text FROM held", |n| n == "2")
        .await;
    assert_eq!(walsender().await.as_deref(), Some(before.as_str()));
}
