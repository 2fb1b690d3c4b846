//! Transaction pooling (`pool.mode = "transaction"`): clients share a few
//! server connections between their transactions, and each keeps what it
//! made in its session: prepared statements, settings, and (on a pinned
//! connection) temporary tables and LISTEN.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use chorus_testkit as testkit;
use chorus_testkit::procs;
use testkit::{Options, TestNode};
use tokio_postgres::{AsyncMessage, Client};

/// A proxy node in transaction mode with `size` server connections.
async fn pooled_node(size: usize, extra: &str) -> TestNode {
    testkit::start(Options {
        extra_toml: format!("[pool]\nmode = \"transaction\"\nsize = {size}\n{extra}\n"),
        ..Options::default()
    })
    .await
}

/// Client backends on the node's backend, but the one asking.
async fn server_connections(node: &TestNode) -> i64 {
    let direct = testkit::connect(&node.pg.conninfo("postgres"))
        .await
        .unwrap();
    direct
        .query_one(
            "SELECT count(*) FROM pg_stat_activity \
             WHERE backend_type = 'client backend' AND pid <> pg_backend_pid()",
            &[],
        )
        .await
        .unwrap()
        .get(0)
}

async fn value(client: &Client, sql: &str) -> String {
    client
        .query_one(sql, &[])
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
        .get(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_clients_share_two_server_connections_and_keep_their_prepared_statements() {
    let node = pooled_node(2, "").await;
    let setup = testkit::connect(&node.conninfo(testkit::PG_USER, Some(testkit::PG_PASSWORD)))
        .await
        .unwrap();
    setup
        .batch_execute("CREATE TABLE pooled_t (client int, n int, PRIMARY KEY (client, n))")
        .await
        .unwrap();
    let mut tasks = Vec::new();
    for i in 0..8i32 {
        let conninfo = node.conninfo(testkit::PG_USER, Some(testkit::PG_PASSWORD));
        tasks.push(tokio::spawn(async move {
            let mut client = testkit::connect(&conninfo).await.unwrap();
            // Named statements of this session, prepared once.
            let add = client
                .prepare(&format!("SELECT $1::int + {i}"))
                .await
                .unwrap();
            let insert = client
                .prepare("INSERT INTO pooled_t VALUES ($1, $2)")
                .await
                .unwrap();
            let mut pids = BTreeSet::new();
            for n in 0..30i32 {
                let row = client.query_one(&add, &[&n]).await.unwrap();
                assert_eq!(row.get::<_, i32>(0), n + i);
                let tx = client.transaction().await.unwrap();
                tx.execute(&insert, &[&i, &n]).await.unwrap();
                let pid: i32 = tx
                    .query_one("SELECT pg_backend_pid()", &[])
                    .await
                    .unwrap()
                    .get(0);
                pids.insert(pid);
                tx.commit().await.unwrap();
            }
            pids
        }));
    }
    let mut pids = BTreeSet::new();
    for task in tasks {
        pids.extend(task.await.unwrap());
    }
    // Eight clients, at most two server connections between them.
    assert!(pids.len() <= 2, "{pids:?}");
    assert!(server_connections(&node).await <= 2);
    let count: i64 = setup
        .query_one("SELECT count(*) FROM pooled_t", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(count, 8 * 30);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sessions_settings_follow_it_and_stay_out_of_other_sessions() {
    // One server connection: the two sessions take turns on it.
    let node = pooled_node(1, "").await;
    let a = testkit::connect(&node.conninfo(testkit::PG_USER, Some(testkit::PG_PASSWORD)))
        .await
        .unwrap();
    let b = testkit::connect(&node.conninfo(testkit::PG_USER, Some(testkit::PG_PASSWORD)))
        .await
        .unwrap();
    let default_work_mem = value(&b, "SHOW work_mem").await;
    a.batch_execute("SET work_mem = '7MB'; SET application_name = 'session-a'")
        .await
        .unwrap();
    a.batch_execute("SET TimeZone = 'Asia/Tokyo'")
        .await
        .unwrap();
    for _ in 0..3 {
        assert_eq!(value(&b, "SHOW work_mem").await, default_work_mem);
        assert_eq!(
            value(&b, "SELECT current_setting('application_name')").await,
            ""
        );
        assert_ne!(value(&b, "SHOW TimeZone").await, "Asia/Tokyo");
        assert_eq!(value(&a, "SHOW work_mem").await, "7MB");
        assert_eq!(
            value(&a, "SELECT current_setting('application_name')").await,
            "session-a"
        );
        assert_eq!(value(&a, "SHOW TimeZone").await, "Asia/Tokyo");
    }
    // SET LOCAL ends with its transaction; RESET goes back to the default.
    a.batch_execute("BEGIN; SET LOCAL work_mem = '9MB'; COMMIT")
        .await
        .unwrap();
    assert_eq!(value(&a, "SHOW work_mem").await, "7MB");
    a.batch_execute("RESET work_mem").await.unwrap();
    assert_eq!(value(&b, "SHOW work_mem").await, default_work_mem);
    assert_eq!(value(&a, "SHOW work_mem").await, default_work_mem);
    // A setting made at login follows its session too, and a session that
    // made none has the login's value, not what the last one left.
    let named = testkit::connect(&format!(
        "{} application_name=alpha",
        node.conninfo(testkit::PG_USER, Some(testkit::PG_PASSWORD))
    ))
    .await
    .unwrap();
    let plain = testkit::connect(&node.conninfo(testkit::PG_USER, Some(testkit::PG_PASSWORD)))
        .await
        .unwrap();
    for _ in 0..3 {
        assert_eq!(value(&named, "SHOW application_name").await, "alpha");
        assert_eq!(value(&plain, "SHOW application_name").await, "");
    }
    assert_eq!(server_connections(&node).await, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn state_that_cannot_move_keeps_the_connection_until_it_is_gone() {
    let node = pooled_node(2, "").await;
    let a = testkit::connect(&node.conninfo(testkit::PG_USER, Some(testkit::PG_PASSWORD)))
        .await
        .unwrap();
    let other = testkit::connect(&node.conninfo(testkit::PG_USER, Some(testkit::PG_PASSWORD)))
        .await
        .unwrap();
    // A temporary table: the session keeps its connection, and finds it in
    // its next transactions.
    a.batch_execute("CREATE TEMP TABLE scratch (v int); INSERT INTO scratch VALUES (1)")
        .await
        .unwrap();
    let pinned = value(&a, "SELECT pg_backend_pid()::text").await;
    for _ in 0..3 {
        // Another session's transactions go to the other connection.
        assert_ne!(value(&other, "SELECT pg_backend_pid()::text").await, pinned);
        assert_eq!(value(&a, "SELECT v::text FROM scratch").await, "1");
    }
    assert_eq!(value(&a, "SELECT pg_backend_pid()::text").await, pinned);
    // Once the state is gone, the connection serves others again.
    a.batch_execute("DISCARD TEMP").await.unwrap();
    // (The session gives its connection back after its next transaction.)
    a.batch_execute("SELECT 1").await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let mut seen = BTreeSet::new();
        for _ in 0..5 {
            seen.insert(value(&other, "SELECT pg_backend_pid()::text").await);
        }
        if seen.contains(&pinned) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{pinned} never served another session"
        );
        a.batch_execute("SELECT 1").await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sql_prepared_statements_follow_their_session_from_connection_to_connection() {
    // Two server connections for three sessions: a session that kept its
    // connection for its statements would leave the other two one, and
    // they would take turns on it; here every session meets both.
    let node = pooled_node(2, "").await;
    let conninfo = node.conninfo(testkit::PG_USER, Some(testkit::PG_PASSWORD));
    let a = testkit::connect(&conninfo).await.unwrap();
    let b = testkit::connect(&conninfo).await.unwrap();
    let c = testkit::connect(&conninfo).await.unwrap();
    // Made alone, in a query string with others, under a quoted name, and
    // with a setting the statement depends on (its search_path).
    a.batch_execute(
        "CREATE SCHEMA prep_s; CREATE TABLE prep_s.t (v int); INSERT INTO prep_s.t VALUES (5)",
    )
    .await
    .unwrap();
    a.batch_execute("PREPARE twice (int) AS SELECT $1 * 2")
        .await
        .unwrap();
    a.batch_execute(
        "SET search_path = prep_s, public; SELECT 1; \
         PREPARE \"Odd Name\" AS SELECT v, 'a;b' FROM t -- the table of prep_s\n; SELECT 2",
    )
    .await
    .unwrap();
    // The other sessions have none of them, nor the schema on their path.
    b.batch_execute("PREPARE twice (int) AS SELECT $1 * 3")
        .await
        .unwrap();
    // (Which connection a session gets is up to the race between them:
    // at least 20 rounds, and as many as it takes, up to 400, until both
    // sessions have met both connections.)
    let mut a_pids = BTreeSet::new();
    let mut b_pids = BTreeSet::new();
    let mut round = 0;
    while round < 20 || (round < 400 && (a_pids.len() < 2 || b_pids.len() < 2)) {
        let (x, y, z) = tokio::join!(
            async {
                let x = a.query_one("EXECUTE twice(21)", &[]).await;
                (x, value(&a, "SELECT pg_backend_pid()::text").await)
            },
            async {
                let y = b.query_one("EXECUTE twice(21)", &[]).await;
                (y, value(&b, "SELECT pg_backend_pid()::text").await)
            },
            c.simple_query("EXECUTE twice(21)"),
        );
        assert_eq!(x.0.unwrap().get::<_, i32>(0), 42, "round {round}");
        assert_eq!(y.0.unwrap().get::<_, i32>(0), 63, "round {round}");
        a_pids.insert(x.1);
        b_pids.insert(y.1);
        let missing = z.unwrap_err();
        assert_eq!(
            testkit::sqlstate(&missing).as_deref(),
            Some("26000"),
            "{missing}"
        );
        let odd = a.query_one("EXECUTE \"Odd Name\"", &[]).await.unwrap();
        assert_eq!(odd.get::<_, i32>(0), 5);
        round += 1;
    }
    assert_eq!(a_pids.len(), 2, "{a_pids:?} in {round} rounds");
    assert_eq!(b_pids.len(), 2, "{b_pids:?} in {round} rounds");
    assert_eq!(server_connections(&node).await, 2);
    // DEALLOCATE drops it for good, wherever the session goes next.
    a.batch_execute("DEALLOCATE twice").await.unwrap();
    for _ in 0..4 {
        let gone = a.simple_query("EXECUTE twice(1)").await.unwrap_err();
        assert_eq!(testkit::sqlstate(&gone).as_deref(), Some("26000"), "{gone}");
        let (odd, other) = tokio::join!(
            a.query_one("EXECUTE \"Odd Name\"", &[]),
            b.query_one("EXECUTE twice(1)", &[]),
        );
        assert_eq!(odd.unwrap().get::<_, i32>(0), 5);
        assert_eq!(other.unwrap().get::<_, i32>(0), 3);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_listening_session_keeps_its_connection_and_gets_its_notifications() {
    let node = pooled_node(2, "").await;
    let (listener, mut connection) = tokio_postgres::connect(
        &node.conninfo(testkit::PG_USER, Some(testkit::PG_PASSWORD)),
        tokio_postgres::NoTls,
    )
    .await
    .unwrap();
    let (notes, mut received) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Some(Ok(message)) = std::future::poll_fn(|cx| connection.poll_message(cx)).await {
            if let AsyncMessage::Notification(n) = message {
                let _ = notes.send((n.channel().to_owned(), n.payload().to_owned()));
            }
        }
    });
    listener.batch_execute("LISTEN jobs").await.unwrap();
    let sender = testkit::connect(&node.conninfo(testkit::PG_USER, Some(testkit::PG_PASSWORD)))
        .await
        .unwrap();
    sender.batch_execute("NOTIFY jobs, 'one'").await.unwrap();
    let note = tokio::time::timeout(Duration::from_secs(10), received.recv())
        .await
        .expect("a notification within 10 s")
        .unwrap();
    assert_eq!(note, ("jobs".to_owned(), "one".to_owned()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_waits_for_a_free_connection_up_to_query_wait_timeout() {
    let node = pooled_node(1, "query_wait_timeout_ms = 300").await;
    let mut holder = testkit::connect(&node.conninfo(testkit::PG_USER, Some(testkit::PG_PASSWORD)))
        .await
        .unwrap();
    let waiter = testkit::connect(&node.conninfo(testkit::PG_USER, Some(testkit::PG_PASSWORD)))
        .await
        .unwrap();
    let open = holder.transaction().await.unwrap();
    open.batch_execute("SELECT 1").await.unwrap();
    let started = Instant::now();
    let refused = waiter.simple_query("SELECT 1").await.unwrap_err();
    assert_eq!(testkit::sqlstate(&refused).as_deref(), Some("53300"));
    assert!(started.elapsed() >= Duration::from_millis(300));
    let db = refused.as_db_error().unwrap();
    assert!(
        db.message().contains("query_wait_timeout"),
        "{}",
        db.message()
    );
    // The extended protocol: the same error, and the session goes on.
    let refused = waiter.query("SELECT $1::int", &[&1i32]).await.unwrap_err();
    assert_eq!(testkit::sqlstate(&refused).as_deref(), Some("53300"));
    open.commit().await.unwrap();
    // Once the connection is free, the waiter gets it.
    assert_eq!(value(&waiter, "SELECT 'served'").await, "served");
}

/// A 3-node cluster whose nodes pool by transaction, on backends that take
/// 100 connections.
async fn pooled_cluster() -> procs::Cluster {
    procs::cluster_opts(procs::Options {
        node_extra: "max_client_connections = 2000\n[pool]\nmode = \"transaction\"\nsize = 20\n"
            .into(),
        backend_settings: vec![("max_connections".into(), "100".into())],
        ..procs::Options::default()
    })
    .await
}

/// pgbench through node `i`: it ran every transaction, none failed.
fn pgbench_clean(c: &procs::Cluster, i: usize, args: &[&str], transactions: u32) {
    let out = testkit::pgbench(c.ports[i - 1], args);
    let text = testkit::stdout(&out);
    assert!(out.status.success(), "{text}\n{}", testkit::stderr(&out));
    assert!(
        text.contains(&format!(
            "number of transactions actually processed: {transactions}/{transactions}"
        )),
        "{text}"
    );
    assert!(text.contains("number of failed transactions: 0 "), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_clients_share_a_hundred_server_connections_and_replication_holds() {
    let mut c = pooled_cluster().await;
    // DDL, COPY and maintenance in transaction mode.
    let init = testkit::pgbench(c.ports[0], &["-i", "-s", "1", "-q"]);
    assert!(init.status.success(), "{}", testkit::stderr(&init));
    let accounts = "SELECT md5(string_agg(a::text, ',' ORDER BY aid)) FROM pgbench_accounts a";
    c.converge(accounts, 1, &[2, 3]).await;

    // A thousand clients on one node, whose backend takes a hundred.
    pgbench_clean(
        &c,
        1,
        &[
            "-n", "-S", "-M", "prepared", "-c", "1000", "-j", "2", "-t", "5",
        ],
        5000,
    );
    // Write transactions from many clients at once. (Not `-M prepared`
    // with more clients than connections: pgbench 15 prepares a statement
    // synchronously the first time a client runs it, in the middle of its
    // transaction, and waits for that client alone while the others hold
    // every connection, as it would through any transaction pooler.)
    pgbench_clean(
        &c,
        1,
        &[
            "-n", "-N", "-M", "extended", "-c", "200", "-j", "2", "-t", "5",
        ],
        1000,
    );
    // With as many clients as connections, prepared.
    pgbench_clean(
        &c,
        1,
        &[
            "-n", "-N", "-M", "prepared", "-c", "20", "-j", "2", "-t", "10",
        ],
        200,
    );
    c.converge(accounts, 1, &[2, 3]).await;
    c.converge("SELECT count(*)::text FROM pgbench_history", 1, &[2, 3])
        .await;
    let history = c
        .wait_for(1, "SELECT count(*)::text FROM pgbench_history", |_| true)
        .await;
    assert_eq!(history, "1200");

    // DDL with DML in one transaction, and a commit scope set in the
    // session, through pooled connections: under scope `all` a commit is
    // on every backend when it is acknowledged.
    let client = c.via(1).await;
    client
        .batch_execute(
            "BEGIN; CREATE TABLE pooled_ddl (id int PRIMARY KEY, v text); \
             INSERT INTO pooled_ddl VALUES (1, 'one'); COMMIT",
        )
        .await
        .unwrap();
    client
        .batch_execute("SET chorus.commit_scope = 'all'")
        .await
        .unwrap();
    for id in 2..=6 {
        client
            .execute("INSERT INTO pooled_ddl VALUES ($1, 'more')", &[&id])
            .await
            .unwrap();
        for b in 1..=3 {
            let found: i64 = c
                .direct(b)
                .await
                .query_one("SELECT count(*) FROM pooled_ddl WHERE id = $1", &[&id])
                .await
                .unwrap()
                .get(0);
            assert_eq!(found, 1, "row {id} not on backend {b} when acknowledged");
        }
    }

    // A named statement whose Parse was skipped (an error earlier in its
    // batch) does not exist, and the client may prepare it again, on
    // whichever connection it gets next.
    let mut raw = raw_session(c.ports[0]).await;
    raw.send(&[
        parse("", "SELECT 1/0"),
        message(b'B', &[0, 0, 0, 0, 0, 0, 0, 0]),
        message(b'E', &[0, 0, 0, 0, 0]),
        parse("again", "SELECT 2"),
        message(b'S', &[]),
    ])
    .await;
    assert_eq!(raw.read_until(b'Z').await, b"1EZ".to_vec());
    // Another session holds the connection that session just gave back.
    let mut holder = c.via(1).await;
    let held = holder.transaction().await.unwrap();
    held.batch_execute("SELECT 1").await.unwrap();
    raw.send(&[parse("again", "SELECT 2"), message(b'S', &[])])
        .await;
    assert_eq!(raw.read_until(b'Z').await, b"1Z".to_vec());
    held.commit().await.unwrap();

    // The home backend stops: pooled sessions go on with another one.
    client
        .batch_execute("RESET chorus.commit_scope")
        .await
        .unwrap();
    c.backends[0].stop();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match client
            .query_one("SELECT count(*) FROM pooled_ddl", &[])
            .await
        {
            Ok(row) => {
                assert_eq!(row.get::<_, i64>(0), 6);
                break;
            }
            Err(e) => assert!(Instant::now() < deadline, "never served again: {e}"),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    client
        .execute("INSERT INTO pooled_ddl VALUES (7, 'after')", &[])
        .await
        .unwrap();
    c.converge("SELECT count(*)::text FROM pooled_ddl", 2, &[3])
        .await;
}

/// A client session over a raw socket, as `postgres` (trusted).
struct RawSession {
    stream: tokio::net::TcpStream,
    buf: Vec<u8>,
}

impl RawSession {
    async fn send(&mut self, messages: &[Vec<u8>]) {
        use tokio::io::AsyncWriteExt;
        self.stream.write_all(&messages.concat()).await.unwrap();
    }

    /// The tags of the messages received up to the first `last` (10 s);
    /// the callers compare them whole, errors included.
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
                self.buf.drain(..1 + len);
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

/// Parse of a statement, no parameter types.
fn parse(name: &str, sql: &str) -> Vec<u8> {
    let mut body = name.as_bytes().to_vec();
    body.push(0);
    body.extend_from_slice(sql.as_bytes());
    body.extend_from_slice(&[0, 0, 0]);
    message(b'P', &body)
}

fn unix_ms_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

/// The backend port serving a statement, and its one value.
async fn served(client: &Client, sql: &str, id: i32) -> (i64, i32) {
    let row = client
        .query_one(sql, &[&id])
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"));
    (row.get(0), row.get(1))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_spread_over_backends_and_a_session_always_reads_its_own_writes() {
    // The nodes' clocks run a minute behind: a version the proxy stamps is
    // unmistakable next to one a backend would make from its own clock.
    const OFFSET_MS: i64 = -60_000;
    let c = procs::cluster_opts(procs::Options {
        node_extra: format!(
            "clock_offset_ms = {OFFSET_MS}\nmax_clock_skew_ms = 120000\n\
             [pool]\nmode = \"transaction\"\nread_routing = \"any\"\n"
        ),
        ..procs::Options::default()
    })
    .await;
    let started = unix_ms_now();
    let port = |b: usize| i32::from(c.backends[b - 1].port());
    let client = c.via(1).await;
    client
        .batch_execute("CREATE TABLE ryw (id int PRIMARY KEY, v int)")
        .await
        .unwrap();
    client
        .execute("INSERT INTO ryw VALUES (0, 0)", &[])
        .await
        .unwrap();
    for b in 2..=3 {
        c.wait_for(b, "SELECT count(*)::text FROM ryw", |n| n == "1")
            .await;
    }
    // Read-only transactions take turns on the three backends.
    let check = "SELECT count(*), inet_server_port() FROM ryw WHERE id = $1";
    let mut ports = BTreeSet::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while ports.len() < 3 {
        assert!(Instant::now() < deadline, "reads went to {ports:?} only");
        ports.insert(served(&client, check, 0).await.1);
    }

    // Backend 2 stops applying node 1's changes (its row of
    // chorus.applied locked): each write is read back at once by the same
    // session, never from backend 2, which does not have it.
    let hold = c.hold_applies(2, 1).await;
    let mut reads_from = BTreeSet::new();
    for id in 1..=20 {
        client
            .execute("INSERT INTO ryw VALUES ($1, $1)", &[&id])
            .await
            .unwrap();
        let (found, from) = served(&client, check, id).await;
        assert_eq!(found, 1, "write {id} not read back (read on port {from})");
        reads_from.insert(from);
        // Between writes, reads of older rows still spread.
        let (found, from) = served(&client, check, 0).await;
        assert_eq!(found, 1);
        reads_from.insert(from);
    }
    assert!(!reads_from.contains(&port(2)), "{reads_from:?}");
    // Every write through the pooled sessions carries the node's clock.
    let finished = unix_ms_now();
    let versions: Vec<i64> = c
        .direct(1)
        .await
        .query(
            "SELECT version FROM chorus.row_version WHERE tbl = 'public.ryw'",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| chorus_router::hlc::unix_millis(r.get::<_, i64>(0) as u64))
        .collect();
    assert_eq!(versions.len(), 21, "{versions:?}");
    for t in &versions {
        assert!(
            (started + OFFSET_MS - 1000..=finished + OFFSET_MS + 1000).contains(t),
            "version at {t} is not from the node's clock"
        );
    }
    // (Backend 2 really lacked the writes all along.)
    let behind: i64 = c
        .direct(2)
        .await
        .query_one("SELECT count(*) FROM ryw WHERE id > 0", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(behind, 0);
    hold.batch_execute("ROLLBACK").await.unwrap();
    // Once backend 2 has them, the session's reads go there again.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (found, from) = served(&client, check, 20).await;
        assert_eq!(found, 1);
        if from == port(2) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "reads never went back to backend 2"
        );
    }
    // A session that asks for home routing reads where it writes.
    client
        .batch_execute("SET chorus.read_routing = 'home'")
        .await
        .unwrap();
    for _ in 0..10 {
        assert_eq!(served(&client, check, 0).await.1, port(1));
    }
    let invalid = client
        .batch_execute("SET chorus.read_routing = 'everywhere'")
        .await
        .unwrap_err();
    assert_eq!(testkit::sqlstate(&invalid).as_deref(), Some("22023"));
    // So does one that asks for it at login (`options`, as PGOPTIONS
    // sends it); a value the setting does not take is refused there.
    let login = |options: &str| {
        format!(
            "host=127.0.0.1 port={} user=postgres dbname=postgres options='{options}'",
            c.ports[0]
        )
    };
    let homebound = testkit::connect(&login("-c chorus.read_routing=home"))
        .await
        .unwrap();
    for _ in 0..10 {
        assert_eq!(served(&homebound, check, 0).await.1, port(1));
    }
    let refused = testkit::connect(&login("-c chorus.read_routing=everywhere"))
        .await
        .err()
        .unwrap();
    assert_eq!(
        testkit::sqlstate(&refused).as_deref(),
        Some("22023"),
        "{refused}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_nodes_control_connections_are_a_bounded_pool() {
    use chorus_proxy::backend::{ControlError, ControlPool};
    use chorus_proxy::config::{BackendConfig, ReplicationConfig};
    let node = testkit::start(Options::default()).await;
    let backend: BackendConfig =
        toml::from_str(&format!("name = \"pg1\"\nport = {}", node.pg.port())).unwrap();
    let config = ReplicationConfig {
        user: testkit::PG_USER.to_owned(),
        password: Some(testkit::PG_PASSWORD.to_owned()),
        database: "postgres".to_owned(),
        ..ReplicationConfig::default()
    };
    let pool = ControlPool::new(config, 2);
    let limit = Duration::from_secs(10);
    let pid = |rows: Vec<tokio_postgres::Row>| -> i32 { rows[0].get(0) };
    // Sixteen questions at once share two connections.
    let asks = (0..16).map(|_| {
        pool.query(
            &backend,
            limit,
            "SELECT pg_backend_pid() FROM pg_sleep(0.1)",
            &[],
        )
    });
    let pids: BTreeSet<i32> = futures_util::future::join_all(asks)
        .await
        .into_iter()
        .map(|answer| pid(answer.unwrap()))
        .collect();
    assert_eq!(pids.len(), 2, "{pids:?}");
    // An error of the server's leaves the connection in the pool.
    let failed = pool
        .query(&backend, limit, "SELECT 1 / 0", &[])
        .await
        .unwrap_err();
    match &failed {
        ControlError::Sql(e) => assert_eq!(testkit::sqlstate(e).as_deref(), Some("22012")),
        other => panic!("{other}"),
    }
    let after = pid(pool
        .query(&backend, limit, "SELECT pg_backend_pid()", &[])
        .await
        .unwrap());
    assert!(pids.contains(&after), "{after} is not one of {pids:?}");
    // Connections that end (the backend restarted, say) are made anew.
    let direct = testkit::connect(&node.pg.conninfo("postgres"))
        .await
        .unwrap();
    let ended: Vec<i32> = pids.iter().copied().collect();
    direct
        .execute(
            "SELECT pg_terminate_backend(pid) FROM unnest($1::int[]) pid",
            &[&ended],
        )
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Ok(rows) = pool
            .query(&backend, limit, "SELECT pg_backend_pid()", &[])
            .await
        {
            if !pids.contains(&pid(rows)) {
                break;
            }
        }
        assert!(
            Instant::now() < deadline,
            "no new connection after the old ended"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // A question not answered in time is an error, and its connection is
    // not used again.
    let slow = pool
        .query(
            &backend,
            Duration::from_millis(200),
            "SELECT pg_sleep(30)",
            &[],
        )
        .await
        .unwrap_err();
    assert!(matches!(slow, ControlError::Timeout(_)), "{slow}");
    let seen: BTreeSet<i32> = futures_util::future::join_all((0..8).map(|_| {
        pool.query(
            &backend,
            limit,
            "SELECT pg_backend_pid() FROM pg_sleep(0.1)",
            &[],
        )
    }))
    .await
    .into_iter()
    .map(|answer| pid(answer.unwrap()))
    .collect();
    assert!(seen.len() <= 2, "{seen:?}");
    let slow_pid: i32 = direct
        .query_one(
            "SELECT pid FROM pg_stat_activity WHERE query = 'SELECT pg_sleep(30)'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(
        !seen.contains(&slow_pid),
        "{slow_pid} served again: {seen:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_application_role_works_in_a_second_database_through_transaction_pooling() {
    // (Three apply parts of 50 000 changes. The DDL after it waits for every
    // backend to have applied them, up to ddl_lock_timeout_ms.)
    const ROWS: i64 = 100_000;
    let c = procs::cluster_opts(procs::Options {
        replication: "replicate_created_databases = true".into(),
        node_extra: "[pool]\nmode = \"transaction\"\nsize = 4\n".into(),
        ..procs::Options::default()
    })
    .await;
    // An ordinary role (LOGIN, CREATE on the schema of a database made
    // through Chorus), and nothing else.
    let admin = c.via(1).await;
    admin
        .batch_execute("CREATE ROLE shopkeeper LOGIN")
        .await
        .unwrap();
    admin.batch_execute("CREATE DATABASE shop").await.unwrap();
    c.via_db(1, "shop")
        .await
        .batch_execute("GRANT CREATE ON SCHEMA public TO shopkeeper")
        .await
        .unwrap();
    c.agree(
        "shop",
        "SELECT has_schema_privilege('shopkeeper', 'public', 'CREATE')::text",
        Some("true"),
    )
    .await;
    let as_app = |node: usize| {
        let port = c.ports[node - 1];
        async move {
            testkit::connect(&format!(
                "host=127.0.0.1 port={port} user=shopkeeper dbname=shop"
            ))
            .await
            .unwrap()
        }
    };
    let mut two = as_app(2).await;
    let three = as_app(3).await;
    // A migration over the extended protocol: DDL with DML in one
    // transaction, a partitioned table among them.
    let migration = two.transaction().await.unwrap();
    for sql in [
        "CREATE TABLE item (id bigint PRIMARY KEY, name text NOT NULL, price numeric(10, 2))",
        "CREATE TABLE sale (id bigint, day date, qty int, PRIMARY KEY (id, day)) PARTITION BY RANGE (day)",
        "CREATE TABLE sale_2026 PARTITION OF sale FOR VALUES FROM ('2026-01-01') TO ('2027-01-01')",
        "CREATE TABLE sale_2027 PARTITION OF sale FOR VALUES FROM ('2027-01-01') TO ('2028-01-01')",
    ] {
        migration.execute(sql, &[]).await.unwrap();
    }
    let add = migration
        .prepare("INSERT INTO item VALUES ($1, $2, $3::text::numeric)")
        .await
        .unwrap();
    for id in 1..=50i64 {
        migration
            .execute(&add, &[&id, &format!("item {id}"), &format!("{id}.25")])
            .await
            .unwrap();
    }
    migration
        .execute(
            "INSERT INTO sale SELECT g, DATE '2026-06-30' + (g % 400), g % 7 FROM generate_series(1, 2000) g",
            &[],
        )
        .await
        .unwrap();
    migration.commit().await.unwrap();
    // Many rows in one transaction through another node, then a table made
    // from a query, TRUNCATE with rows after it in the same transaction.
    three
        .batch_execute(&format!(
            "BEGIN; CREATE TABLE line (id bigint PRIMARY KEY, item bigint, qty int); \
             INSERT INTO line SELECT g, 1 + g % 50, g % 9 FROM generate_series(1, {ROWS}) g; \
             UPDATE line SET qty = qty + 1 WHERE id % 3 = 0; \
             DELETE FROM line WHERE id % 10 = 0; COMMIT"
        ))
        .await
        .unwrap();
    two.batch_execute(
        "CREATE TABLE item_total AS SELECT item, sum(qty) AS qty FROM line GROUP BY item; \
         BEGIN; TRUNCATE sale; INSERT INTO sale VALUES (1, '2027-02-01', 3); COMMIT",
    )
    .await
    .unwrap();
    // Every backend holds the same rows, and they are what was written.
    let expected_lines = ROWS - ROWS / 10;
    for (sql, expected) in [
        (
            "SELECT count(*)::text || ':' || sum(qty)::text FROM line".to_owned(),
            None,
        ),
        (
            "SELECT count(*)::text FROM line".to_owned(),
            Some(expected_lines.to_string()),
        ),
        (
            "SELECT md5(string_agg(i::text, ',' ORDER BY id)) FROM item i".to_owned(),
            None,
        ),
        (
            "SELECT string_agg(s::text, ',' ORDER BY id) FROM sale s".to_owned(),
            Some("(1,2027-02-01,3)".to_owned()),
        ),
        (
            "SELECT md5(string_agg(t::text, ',' ORDER BY item)) FROM item_total t".to_owned(),
            None,
        ),
        (
            "SELECT string_agg(tableowner, ',' ORDER BY tablename) FROM pg_tables \
             WHERE schemaname = 'public'"
                .to_owned(),
            Some(["shopkeeper"; 6].join(",")),
        ),
    ] {
        c.agree("shop", &sql, expected.as_deref()).await;
    }
    // The totals made from the query match the rows.
    let total: i64 = three
        .query_one(
            "SELECT ((SELECT sum(qty) FROM item_total) - (SELECT sum(qty) FROM line))::bigint",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(total, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_index_statements_run_through_transaction_pooling() {
    let c = procs::cluster_opts(procs::Options {
        node_extra: "[pool]\nmode = \"transaction\"\nsize = 4\n".into(),
        ..procs::Options::default()
    })
    .await;
    let client = c.via(1).await;
    client
        .batch_execute("CREATE TABLE pooled_ix (id int PRIMARY KEY, q int)")
        .await
        .unwrap();
    // The node asks the backend about each statement's table first (is it
    // temporary?), after the session gave its connection back between
    // transactions: simple, then extended protocol.
    let limit = Duration::from_secs(60);
    tokio::time::timeout(
        limit,
        client.batch_execute("CREATE INDEX CONCURRENTLY pooled_ix_q ON pooled_ix (q)"),
    )
    .await
    .expect("answered")
    .unwrap();
    tokio::time::timeout(
        limit,
        client.execute(
            "CREATE INDEX CONCURRENTLY pooled_ix_qi ON pooled_ix (q, id)",
            &[],
        ),
    )
    .await
    .expect("answered")
    .unwrap();
    for b in 1..=3 {
        c.wait_for(
            b,
            "SELECT string_agg(indexname, ',' ORDER BY indexname) FROM pg_indexes \
              WHERE tablename = 'pooled_ix'",
            |v| v == "pooled_ix_pkey,pooled_ix_q,pooled_ix_qi",
        )
        .await;
    }
}
