//! Faults and lifecycle: a backend killed with SIGKILL and brought back,
//! graceful shutdown, connection limits, and the metrics/health endpoint.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use chorus_testkit as testkit;
use testkit::Options;

#[tokio::test(flavor = "multi_thread")]
async fn backend_killed_then_back() {
    let mut node = testkit::start(Options::default()).await;
    let client = node.client().await;
    client
        .batch_execute("CREATE TABLE kept (id int PRIMARY KEY)")
        .await
        .unwrap();
    client
        .batch_execute("INSERT INTO kept VALUES (1)")
        .await
        .unwrap();

    tokio::task::block_in_place(|| node.pg.kill());

    // The session on the dead backend gets an error, promptly.
    let err = tokio::time::timeout(Duration::from_secs(10), client.query_one("SELECT 1", &[]))
        .await
        .expect("query on a dead backend hung")
        .unwrap_err();
    let code = testkit::sqlstate(&err);
    assert!(
        code.as_deref()
            .is_none_or(|c| c.starts_with("08") || c == "57P01"),
        "unexpected error {err:?}"
    );

    // New sessions are refused with a clear connection error while it is down.
    let started = Instant::now();
    let refused = testkit::connect(&node.conninfo(testkit::PG_USER, Some(testkit::PG_PASSWORD)))
        .await
        .unwrap_err();
    assert_eq!(
        testkit::sqlstate(&refused).as_deref(),
        Some("08006"),
        "{refused}"
    );
    let message = refused.as_db_error().map(|e| e.message().to_owned());
    assert!(
        message
            .as_deref()
            .is_some_and(|m| m.contains("could not connect to backend")),
        "{refused:?}"
    );
    assert!(started.elapsed() < Duration::from_secs(5));

    // The proxy itself is alive.
    let (status, body) = node.http_get("/health").await;
    assert!(status.contains("200"), "{status}");
    assert_eq!(body, "ok\n");
    let metrics = node.http_get("/metrics").await.1;
    assert!(
        metrics.contains("chorus_backend_up{backend=\"pg1\"} 0"),
        "{metrics}"
    );

    // Once the backend is back, new sessions work and the data is there.
    tokio::task::block_in_place(|| node.pg.start()).unwrap();
    let client = node.client().await;
    let n: i64 = client
        .query_one("SELECT count(*) FROM kept", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 1);
    let metrics = node.http_get("/metrics").await.1;
    assert!(
        metrics.contains("chorus_backend_up{backend=\"pg1\"} 1"),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn graceful_shutdown_lets_open_transactions_finish() {
    let mut node = testkit::start(Options::default()).await;
    let idle = node.client().await;
    let busy = node.client().await;
    busy.batch_execute("CREATE TABLE t (id int)").await.unwrap();
    busy.batch_execute("BEGIN; INSERT INTO t VALUES (1)")
        .await
        .unwrap();

    node.begin_shutdown();
    // The idle session is closed with 57P01.
    let err = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match idle.query_one("SELECT 1", &[]).await {
                Ok(_) => tokio::time::sleep(Duration::from_millis(20)).await,
                Err(e) => return e,
            }
        }
    })
    .await
    .expect("idle session was not closed");
    assert!(
        testkit::sqlstate(&err)
            .as_deref()
            .is_none_or(|c| c == "57P01"),
        "{err:?}"
    );
    // New connections are no longer accepted.
    testkit::eventually(
        "the listener closing",
        Duration::from_secs(10),
        Duration::from_millis(20),
        || async { tokio::net::TcpStream::connect(node.addr).await.is_err() },
    )
    .await;
    let (status, _) = node.http_get("/health").await;
    assert!(status.contains("503"), "{status}");

    // The open transaction can finish and commit.
    busy.batch_execute("INSERT INTO t VALUES (2)")
        .await
        .unwrap();
    busy.batch_execute("COMMIT").await.unwrap();
    node.wait_stopped(Duration::from_secs(10)).await;

    let direct = node.direct().await;
    let n: i64 = direct
        .query_one("SELECT count(*) FROM t", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 2, "the committed transaction is on the backend");
}

#[tokio::test(flavor = "multi_thread")]
async fn shutdown_timeout_closes_stuck_transactions() {
    let mut node = testkit::start(Options {
        node_toml: "shutdown_timeout_ms = 500".to_owned(),
        ..Options::default()
    })
    .await;
    let stuck = node.client().await;
    stuck.batch_execute("BEGIN").await.unwrap();
    let started = Instant::now();
    node.shutdown().await;
    assert!(started.elapsed() < Duration::from_secs(5));
    assert!(stuck.query_one("SELECT 1", &[]).await.is_err());
}

#[tokio::test(flavor = "multi_thread")]
async fn connection_limit_answers_53300() {
    let node = testkit::start(Options {
        node_toml: "max_client_connections = 2".to_owned(),
        ..Options::default()
    })
    .await;
    let _a = node.client().await;
    let _b = node.client().await;
    let err = testkit::connect(&node.conninfo(testkit::PG_USER, Some(testkit::PG_PASSWORD)))
        .await
        .unwrap_err();
    assert_eq!(testkit::sqlstate(&err).as_deref(), Some("53300"), "{err}");
    drop(_a);
    // The slot frees up once a session ends.
    let mut connected = false;
    for _ in 0..50 {
        if testkit::connect(&node.conninfo(testkit::PG_USER, Some(testkit::PG_PASSWORD)))
            .await
            .is_ok()
        {
            connected = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(connected);
}

#[tokio::test(flavor = "multi_thread")]
async fn metrics_count_statements_latency_and_connections() {
    let node = testkit::start(Options::default()).await;
    let client = node.client().await;
    client
        .batch_execute(
            "CREATE TABLE m (id int); INSERT INTO m VALUES (1); SELECT * FROM m; \
             BEGIN; UPDATE m SET id = 2; COMMIT; SET work_mem = '8MB'",
        )
        .await
        .unwrap();
    client.batch_execute("VACUUM m").await.unwrap();
    let stmt = client
        .prepare("SELECT id FROM m WHERE id = $1")
        .await
        .unwrap();
    for _ in 0..3 {
        client.query(&stmt, &[&2i32]).await.unwrap();
    }
    let _ = client.batch_execute("SELECT * FROM missing").await;

    // The relay records the last statement's error once it has passed on
    // its answer: the metrics are read once it has.
    let number = |text: &str, needle: &str| -> Option<f64> {
        text.lines()
            .find(|l| l.starts_with(needle))?
            .rsplit(' ')
            .next()?
            .parse()
            .ok()
    };
    let read = std::cell::RefCell::new(String::new());
    testkit::eventually(
        "the failing statement counted",
        Duration::from_secs(10),
        Duration::from_millis(20),
        || async {
            node.node.metrics.run_upkeep();
            let (status, body) = node.http_get("/metrics").await;
            assert!(status.contains("200"), "{status}");
            let counted = number(&body, "chorus_errors_total{kind=\"backend_error\"}") == Some(1.0);
            *read.borrow_mut() = body;
            counted
        },
    )
    .await;
    let text = read.into_inner();
    let value = |needle: &str| -> f64 {
        number(&text, needle).unwrap_or_else(|| panic!("{needle} missing in\n{text}"))
    };
    assert_eq!(value("chorus_statements_total{class=\"ddl\"}"), 1.0);
    assert_eq!(value("chorus_statements_total{class=\"write\"}"), 2.0);
    assert_eq!(value("chorus_statements_total{class=\"maintenance\"}"), 1.0);
    assert_eq!(value("chorus_statements_total{class=\"transaction\"}"), 2.0);
    assert_eq!(value("chorus_statements_total{class=\"session\"}"), 1.0);
    // SELECT * FROM m, three prepared executions, the failing SELECT.
    assert!(value("chorus_statements_total{class=\"read\"}") >= 5.0);
    assert_eq!(value("chorus_errors_total{kind=\"backend_error\"}"), 1.0);
    assert_eq!(value("chorus_client_connections"), 1.0);
    assert_eq!(value("chorus_backend_connections{backend=\"pg1\"}"), 1.0);
    assert!(value("chorus_query_duration_seconds_count") >= 5.0);

    let (status, _) = node.http_get("/nothing-here").await;
    assert!(status.contains("404"), "{status}");
}
