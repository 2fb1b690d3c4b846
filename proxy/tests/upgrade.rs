//! Upgrading Chorus: backends that hold the previous version's chorus
//! schema are upgraded in place by the nodes, one node at a time, while
//! clients write through the others.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use chorus_testkit as testkit;
use chorus_testkit::procs;

use std::time::Duration;

use chorus_proxy::cluster::capture::SCHEMA_VERSION;

/// Backend `i` as the previous version left it: its schema, and a table
/// adopted with the same rows as on the other backends.
fn previous_version(i: usize) -> String {
    testkit::previous_schema_sql(
        i,
        "CREATE TABLE kv (id int PRIMARY KEY, v text, via int NOT NULL);\n\
         INSERT INTO kv SELECT g, 'seed', 0 FROM generate_series(1, 100) g;\n\
         SELECT chorus.adopt('kv'::regclass, false);",
    )
}

/// Write through node `node` until `stop`: new rows from `first` on, and
/// updates of the seed rows; the new rows' ids that were acknowledged.
/// A session that fails (its node restarts) is replaced.
async fn write_until(
    port: u16,
    node: i32,
    first: i32,
    stop: tokio::sync::watch::Receiver<bool>,
) -> Vec<i32> {
    let conninfo = format!("host=127.0.0.1 port={port} user=postgres dbname=postgres");
    let mut acknowledged = Vec::new();
    let mut id = first;
    let mut client = None;
    while !*stop.borrow() {
        if client.is_none() {
            client = testkit::connect(&conninfo).await.ok();
            if client.is_none() {
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        }
        let session = client.as_ref().expect("connected");
        let written = session
            .batch_execute(&format!(
                "BEGIN; INSERT INTO kv VALUES ({id}, 'new', {node}); \
                 UPDATE kv SET v = 'by {node}', via = {node} WHERE id = {}; COMMIT",
                id % 100 + 1
            ))
            .await;
        match written {
            Ok(()) => acknowledged.push(id),
            Err(_) if session.is_closed() => client = None,
            Err(_) => {}
        }
        id += 1;
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    acknowledged
}

async fn schema_version(c: &procs::Cluster, b: usize) -> Option<i32> {
    let client = c.direct(b).await;
    let versioned: bool = client
        .query_one(
            "SELECT to_regclass('chorus.schema_version') IS NOT NULL",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    if !versioned {
        return None;
    }
    client
        .query_one("SELECT max(version) FROM chorus.schema_version", &[])
        .await
        .unwrap()
        .get(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolling_upgrade_from_the_previous_schema_version_under_load_loses_nothing() {
    // Nodes 1 and 2 run the new release; node 3 is down, as during its
    // upgrade, and its backend keeps the previous schema.
    let mut c = procs::cluster_opts(procs::Options {
        prepare: (1..=3).map(previous_version).collect(),
        start: vec![1, 2],
        ..procs::Options::default()
    })
    .await;
    // (A node upgrades its backend as it starts, its capture triggers
    // made again: waited for, not assumed done.)
    for b in 1..=2 {
        c.wait_for(
            b,
            "SELECT max(version)::text FROM chorus.schema_version",
            |v| v == SCHEMA_VERSION.to_string(),
        )
        .await;
    }
    assert_eq!(schema_version(&c, 3).await, Some(SCHEMA_VERSION - 1));
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let writers: Vec<_> = [(1usize, 1_000), (2, 1_000_000)]
        .into_iter()
        .map(|(node, first)| {
            tokio::spawn(write_until(
                c.ports[node - 1],
                node as i32,
                first,
                stopped.clone(),
            ))
        })
        .collect();
    // Backend 3, still on the previous schema, gets their changes.
    c.wait_for(
        3,
        "SELECT (count(*) > 20)::text FROM kv WHERE via > 0",
        |v| v == "true",
    )
    .await;
    // Node 3 comes back on the new release and upgrades its backend
    // under load; then node 1 restarts, as the next step of a rolling
    // upgrade would.
    c.start_node(3);
    c.wait_for(
        3,
        "SELECT max(version)::text FROM chorus.schema_version",
        |v| v == SCHEMA_VERSION.to_string(),
    )
    .await;
    assert_eq!(schema_version(&c, 3).await, Some(SCHEMA_VERSION));
    let three = c.via(3).await;
    for id in 5_000_000..5_000_020 {
        three
            .batch_execute(&format!("INSERT INTO kv VALUES ({id}, 'new', 3)"))
            .await
            .unwrap();
    }
    c.stop_node(1);
    c.start_node(1);
    let one = c.via(1).await;
    for id in 6_000_000..6_000_020 {
        one.batch_execute(&format!("INSERT INTO kv VALUES ({id}, 'new', 1)"))
            .await
            .unwrap();
    }
    stop.send(true).unwrap();
    let mut acknowledged = Vec::new();
    for writer in writers {
        acknowledged.extend(writer.await.unwrap());
    }
    acknowledged.extend(5_000_000..5_000_020);
    acknowledged.extend(6_000_000..6_000_020);
    assert!(acknowledged.len() > 60, "{}", acknowledged.len());
    // Every acknowledged row is on every backend, and the backends agree.
    let expected = acknowledged.len().to_string();
    let ids = acknowledged
        .iter()
        .map(i32::to_string)
        .collect::<Vec<_>>()
        .join(",");
    for b in 1..=3 {
        c.wait_for(
            b,
            &format!("SELECT count(*)::text FROM kv WHERE id IN ({ids})"),
            |v| v == expected,
        )
        .await;
    }
    c.converge(
        "SELECT md5(string_agg(k::text, ',' ORDER BY id)) FROM kv k",
        1,
        &[2, 3],
    )
    .await;
    assert_eq!(c.schema(1), c.schema(3));
}
