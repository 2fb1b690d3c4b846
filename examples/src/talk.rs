//! The conflict from the talk that motivated Chorus, against a running
//! cluster: the same key inserted through two nodes at the same moment.
//! Both inserts commit; afterwards every node shows the same row (the one
//! with the higher hybrid logical clock), and the loser is in the conflict
//! log of the backends where it lost.
//!
//! Start a cluster with `cargo run --release -p chorus-proxy -- demo`, then
//! `cargo run -p chorus-examples --bin talk` (or pass the nodes' connection
//! strings as arguments; default: the demo's nodes 1 and 2).

use std::time::{Duration, Instant};

use tokio_postgres::{Client, NoTls};

async fn connect(url: &str) -> Result<Client, tokio_postgres::Error> {
    let (client, connection) = tokio_postgres::connect(url, NoTls).await?;
    let url = url.to_owned();
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            eprintln!("connection to {url} ended: {e}");
        }
    });
    Ok(client)
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let url1 = args
        .next()
        .unwrap_or_else(|| "postgres://postgres@127.0.0.1:6432/postgres".into());
    let url2 = args
        .next()
        .unwrap_or_else(|| "postgres://postgres@127.0.0.1:6433/postgres".into());
    let n1 = connect(&url1).await?;
    let n2 = connect(&url2).await?;

    n1.batch_execute("CREATE TABLE IF NOT EXISTS users (id int PRIMARY KEY, name text)")
        .await?;
    n1.batch_execute("DELETE FROM users WHERE id = 2574")
        .await?;
    // Wait until the table (and the delete) reached node 2's backend.
    let deadline = Instant::now() + Duration::from_secs(30);
    while n2
        .query_opt("SELECT 1 FROM pg_tables WHERE tablename = 'users'", &[])
        .await?
        .is_none()
    {
        if Instant::now() > deadline {
            return Err("the table never reached node 2".into());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;

    println!("node 1: INSERT INTO users VALUES (2574, 'An')");
    println!("node 2: INSERT INTO users VALUES (2574, 'Wim')   -- at the same moment");
    let (a, b) = tokio::join!(
        n1.execute("INSERT INTO users VALUES (2574, 'An')", &[]),
        n2.execute("INSERT INTO users VALUES (2574, 'Wim')", &[]),
    );
    println!(
        "node 1: {}",
        a.map_or_else(|e| e.to_string(), |n| format!("INSERT 0 {n}"))
    );
    println!(
        "node 2: {}",
        b.map_or_else(|e| e.to_string(), |n| format!("INSERT 0 {n}"))
    );

    // Both backends end with the same row.
    let deadline = Instant::now() + Duration::from_secs(30);
    let winner = loop {
        let on1: Option<String> = n1
            .query_opt("SELECT name FROM users WHERE id = 2574", &[])
            .await?
            .map(|r| r.get(0));
        let on2: Option<String> = n2
            .query_opt("SELECT name FROM users WHERE id = 2574", &[])
            .await?
            .map(|r| r.get(0));
        if on1.is_some() && on1 == on2 {
            break on1.unwrap_or_default();
        }
        if Instant::now() > deadline {
            return Err(format!("nodes still differ: {on1:?} vs {on2:?}").into());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    println!("every node now reads: (2574, '{winner}')");
    for (name, node) in [("node 1", &n1), ("node 2", &n2)] {
        for row in node
            .query(
                "SELECT kind, resolution, local_row ->> 'name', remote_row ->> 'name' \
                 FROM chorus.conflict WHERE tbl = 'public.users' AND pk = '{\"id\": 2574}' \
                 ORDER BY id DESC LIMIT 1",
                &[],
            )
            .await?
        {
            let (kind, resolution, local, remote): (
                String,
                String,
                Option<String>,
                Option<String>,
            ) = (row.get(0), row.get(1), row.get(2), row.get(3));
            println!(
                "{name}'s backend logged {kind}: local {local:?} vs remote {remote:?} -> {resolution}"
            );
        }
    }
    Ok(())
}
