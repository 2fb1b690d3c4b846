//! A real driver (tokio-postgres) through Chorus: prepared statements with
//! binary parameters, COPY both ways, LISTEN/NOTIFY and query cancel.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use bytes::Bytes;
use chorus_testkit as testkit;
use futures_util::{SinkExt, StreamExt, TryStreamExt};
use tokio_postgres::types::Type;
use tokio_postgres::{AsyncMessage, NoTls};

use testkit::Options;

#[tokio::test(flavor = "multi_thread")]
async fn prepared_statements_with_binary_parameters() {
    let node = testkit::start(Options::default()).await;
    let client = node.client().await;
    client
        .batch_execute(
            "CREATE TABLE samples (id int8 PRIMARY KEY, ratio float8, payload bytea, \
             label text, ok bool, small int2, tags text[])",
        )
        .await
        .unwrap();
    let insert = client
        .prepare_typed(
            "INSERT INTO samples VALUES ($1, $2, $3, $4, $5, $6, $7)",
            &[
                Type::INT8,
                Type::FLOAT8,
                Type::BYTEA,
                Type::TEXT,
                Type::BOOL,
                Type::INT2,
                Type::TEXT_ARRAY,
            ],
        )
        .await
        .unwrap();
    for i in 0..50i64 {
        let payload: Vec<u8> = (0..=255u8).cycle().skip(i as usize).take(300).collect();
        let tags = vec![format!("t{i}"), "ü-ñ".to_owned()];
        client
            .execute(
                &insert,
                &[
                    &i,
                    &(i as f64 / 3.0),
                    &payload,
                    &format!("row {i}"),
                    &(i % 2 == 0),
                    &(i as i16),
                    &tags,
                ],
            )
            .await
            .unwrap();
    }
    let select = client
        .prepare("SELECT ratio, payload, label, ok, small, tags FROM samples WHERE id = $1")
        .await
        .unwrap();
    for i in [0i64, 7, 49] {
        let row = client.query_one(&select, &[&i]).await.unwrap();
        assert_eq!(row.get::<_, f64>(0), i as f64 / 3.0);
        let payload: Vec<u8> = (0..=255u8).cycle().skip(i as usize).take(300).collect();
        assert_eq!(row.get::<_, Vec<u8>>(1), payload);
        assert_eq!(row.get::<_, String>(2), format!("row {i}"));
        assert_eq!(row.get::<_, bool>(3), i % 2 == 0);
        assert_eq!(row.get::<_, i16>(4), i as i16);
        assert_eq!(
            row.get::<_, Vec<String>>(5),
            vec![format!("t{i}"), "ü-ñ".to_owned()]
        );
    }
    // An error inside the extended protocol leaves the session usable.
    let err = client.query_one(&select, &[&1000i64]).await.unwrap_err();
    assert!(err.to_string().contains("number of rows"), "{err}");
    let bad = client
        .prepare("SELECT * FROM missing_table")
        .await
        .unwrap_err();
    assert_eq!(testkit::sqlstate(&bad).as_deref(), Some("42P01"));
    let count: i64 = client
        .query_one("SELECT count(*) FROM samples", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(count, 50);
}

#[tokio::test(flavor = "multi_thread")]
async fn copy_from_stdin_and_to_stdout() {
    let node = testkit::start(Options::default()).await;
    let client = node.client().await;
    client
        .batch_execute("CREATE TABLE events (id int PRIMARY KEY, body text)")
        .await
        .unwrap();
    let sink = client
        .copy_in("COPY events FROM STDIN WITH (FORMAT text)")
        .await
        .unwrap();
    futures_util::pin_mut!(sink);
    let mut expected = String::new();
    for chunk in 0..20 {
        let mut data = String::new();
        for i in chunk * 1000..(chunk + 1) * 1000 {
            data.push_str(&format!("{i}\tevent number {i} {}\n", "x".repeat(40)));
        }
        expected.push_str(&data);
        sink.send(Bytes::from(data)).await.unwrap();
    }
    let copied = sink.finish().await.unwrap();
    assert_eq!(copied, 20_000);

    let stream = client
        .copy_out("COPY (SELECT * FROM events ORDER BY id) TO STDOUT")
        .await
        .unwrap();
    let chunks: Vec<Bytes> = stream.try_collect().await.unwrap();
    let out: Vec<u8> = chunks.concat();
    assert_eq!(String::from_utf8(out).unwrap(), expected);

    // A failed COPY (bad data) reports the backend's error and the session goes on.
    let sink = client.copy_in("COPY events FROM STDIN").await.unwrap();
    futures_util::pin_mut!(sink);
    sink.send(Bytes::from_static(b"not-a-number\tx\n"))
        .await
        .unwrap();
    let err = sink.finish().await.unwrap_err();
    assert_eq!(testkit::sqlstate(&err).as_deref(), Some("22P02"));
    let n: i64 = client
        .query_one("SELECT count(*) FROM events", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 20_000);
}

#[tokio::test(flavor = "multi_thread")]
async fn listen_notify_is_delivered() {
    let node = testkit::start(Options::default()).await;
    let (listener, mut connection) = tokio_postgres::connect(
        &node.conninfo(testkit::PG_USER, Some(testkit::PG_PASSWORD)),
        NoTls,
    )
    .await
    .unwrap();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut messages = futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
        while let Some(Ok(message)) = messages.next().await {
            if let AsyncMessage::Notification(n) = message {
                let _ = tx.send((
                    n.channel().to_owned(),
                    n.payload().to_owned(),
                    n.process_id(),
                ));
            }
        }
    });
    listener.batch_execute("LISTEN bike_events").await.unwrap();

    let sender = node.client().await;
    sender
        .batch_execute("NOTIFY bike_events, 'first'")
        .await
        .unwrap();
    sender
        .execute("SELECT pg_notify('bike_events', $1)", &[&"second"])
        .await
        .unwrap();
    // The listener's own notification, whose pid is the one its session
    // reports, as on PostgreSQL.
    listener
        .batch_execute("NOTIFY bike_events, 'own'")
        .await
        .unwrap();
    let own_pid: i32 = listener
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0);
    let sender_pid: i32 = sender
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0);
    for (expected, pid) in [
        ("first", sender_pid),
        ("second", sender_pid),
        ("own", own_pid),
    ] {
        let (channel, payload, from) = tokio::time::timeout(Duration::from_secs(10), rx.recv())
            .await
            .expect("notification not delivered in time")
            .unwrap();
        assert_eq!(channel, "bike_events");
        assert_eq!(payload, expected);
        assert_eq!(from, pid, "{expected}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn cancel_reaches_the_right_backend() {
    let node = testkit::start(Options::default()).await;
    let client = node.client().await;
    let bystander = node.client().await;
    let token = client.cancel_token();
    let sleeper = tokio::spawn(async move {
        let started = Instant::now();
        let result = client.batch_execute("SELECT pg_sleep(10)").await;
        (result, started.elapsed())
    });
    // Cancel once the query runs on the backend.
    let direct = node.direct().await;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let running: i64 = direct
            .query_one(
                "SELECT count(*) FROM pg_stat_activity \
                 WHERE query = 'SELECT pg_sleep(10)' AND state = 'active'",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        if running == 1 {
            break;
        }
        assert!(Instant::now() < deadline, "the query never ran");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let cancelled_at = Instant::now();
    token.cancel_query(NoTls).await.unwrap();
    let (result, _) = tokio::time::timeout(Duration::from_secs(5), sleeper)
        .await
        .expect("cancelled query did not return")
        .unwrap();
    let latency = cancelled_at.elapsed();
    let err = result.unwrap_err();
    assert_eq!(testkit::sqlstate(&err).as_deref(), Some("57014"), "{err}");
    assert!(
        latency < Duration::from_millis(500),
        "cancel took {latency:?}"
    );
    // The other session was not touched.
    let one: i32 = bystander.query_one("SELECT 1", &[]).await.unwrap().get(0);
    assert_eq!(one, 1);
}
