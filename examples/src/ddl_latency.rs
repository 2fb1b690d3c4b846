//! Latency of replicated DDL through a running cluster: CREATE TABLE and
//! ALTER TABLE ... ADD COLUMN, one at a time, through the given nodes in
//! turn. Each statement returns once its origin backend applied it (and
//! the other healthy backends, see docs/architecture.md). Prints the
//! median and p99 per statement kind, in milliseconds.
//!
//! `cargo run --release -p chorus-examples --bin ddl_latency -- N URL...`
//! (default: 200 of each through the demo's three nodes); benches/ddl.sh
//! starts a demo cluster and runs it.

use std::time::{Duration, Instant};

use tokio_postgres::{Client, NoTls};

async fn connect(url: &str) -> Result<Client, tokio_postgres::Error> {
    let (client, connection) = tokio_postgres::connect(url, NoTls).await?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(client)
}

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * (sorted.len() - 1) as f64).round() as usize;
    sorted[rank.min(sorted.len() - 1)].as_secs_f64() * 1000.0
}

fn report(kind: &str, mut times: Vec<Duration>) {
    times.sort();
    println!(
        "{kind}: n={} median={:.2} ms p99={:.2} ms max={:.2} ms",
        times.len(),
        percentile(&times, 50.0),
        percentile(&times, 99.0),
        percentile(&times, 100.0)
    );
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let n: usize = args.next().map(|a| a.parse()).transpose()?.unwrap_or(200);
    let mut urls: Vec<String> = args.collect();
    if urls.is_empty() {
        urls = (6432..6435)
            .map(|port| format!("postgres://postgres@127.0.0.1:{port}/postgres"))
            .collect();
    }
    let mut nodes = Vec::new();
    for url in &urls {
        nodes.push(connect(url).await?);
    }
    let run = std::process::id();
    let mut create = Vec::with_capacity(n);
    let mut alter = Vec::with_capacity(n);
    for i in 0..n {
        let node = &nodes[i % nodes.len()];
        let table = format!("ddl_bench_{run}_{i}");
        let started = Instant::now();
        node.batch_execute(&format!("CREATE TABLE {table} (id int PRIMARY KEY)"))
            .await?;
        create.push(started.elapsed());
        let started = Instant::now();
        node.batch_execute(&format!("ALTER TABLE {table} ADD COLUMN note text"))
            .await?;
        alter.push(started.elapsed());
    }
    report("CREATE TABLE", create);
    report("ALTER TABLE ADD COLUMN", alter);
    Ok(())
}
