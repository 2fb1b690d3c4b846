//! A replicating cluster end to end: three backends, three Chorus nodes
//! with replication on, clients writing through different nodes.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chorus_proxy::config::Config;
use chorus_proxy::localpg::{LocalPgOptions, LocalPostgres};
use chorus_proxy::server::{self, Node};
use tokio::sync::watch;
use tokio_postgres::Client;

struct Cluster {
    _dir: tempfile::TempDir,
    backends: Vec<LocalPostgres>,
    nodes: Vec<SocketAddr>,
    stop: watch::Sender<bool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    node_handles: Vec<Arc<Node>>,
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.stop.send_replace(true);
        for task in &self.tasks {
            task.abort();
        }
    }
}

async fn cluster(n: usize) -> Cluster {
    let dir = tempfile::tempdir().unwrap();
    let mut backends = Vec::new();
    for i in 1..=n {
        backends.push(
            tokio::task::block_in_place(|| {
                LocalPostgres::create(
                    &common::pg_binaries(),
                    &dir.path().join(format!("pg{i}")),
                    LocalPgOptions::default(),
                )
            })
            .unwrap(),
        );
    }
    let mut backend_toml = String::new();
    for (i, pg) in backends.iter().enumerate() {
        backend_toml.push_str(&format!(
            "[[backends]]\nname = \"pg{}\"\nport = {}\n",
            i + 1,
            pg.port()
        ));
    }
    let (stop, _) = watch::channel(false);
    let mut nodes = Vec::new();
    let mut tasks = Vec::new();
    let mut node_handles = Vec::new();
    for i in 1..=n {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        nodes.push(listener.local_addr().unwrap());
        let config = Config::from_toml(&format!(
            "[node]\nid = {i}\nhome_backend = \"pg{i}\"\nworker_threads = 1\nshutdown_timeout_ms = 2000\n\
             {backend_toml}\
             [[users]]\nname = \"postgres\"\n\
             [[auth]]\nmethod = \"trust\"\n\
             [replication]\npoll_interval_ms = 20\n"
        ))
        .unwrap();
        let node = Node::new(config).unwrap();
        node_handles.push(node.clone());
        let mut stopped = stop.subscribe();
        tasks.push(tokio::spawn(async move {
            server::run_node_with(listener, node, async move {
                let _ = stopped.wait_for(|s| *s).await;
            })
            .await
            .unwrap();
        }));
    }
    Cluster {
        _dir: dir,
        backends,
        nodes,
        stop,
        tasks,
        node_handles,
    }
}

impl Cluster {
    async fn via(&self, node: usize) -> Client {
        common::connect(&format!(
            "host=127.0.0.1 port={} user=postgres dbname=postgres",
            self.nodes[node - 1].port()
        ))
        .await
        .unwrap()
    }

    async fn direct(&self, backend: usize) -> Client {
        common::connect(&self.backends[backend - 1].conninfo("postgres"))
            .await
            .unwrap()
    }

    /// Wait (bounded) until `sql` gives the same single text value on
    /// every backend; returns it.
    async fn converged(&self, sql: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(90);
        let mut last = Vec::new();
        while Instant::now() < deadline {
            last.clear();
            for b in 1..=self.backends.len() {
                let client = self.direct(b).await;
                let value: Option<String> = match client.query_one(sql, &[]).await {
                    Ok(row) => row.get(0),
                    Err(_) => None,
                };
                last.push(value.unwrap_or_default());
            }
            if !last[0].is_empty() && last.iter().all(|v| v == &last[0]) {
                return last[0].clone();
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("backends did not converge on {sql}: {last:?}");
    }
}

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
    let mut logged = 0;
    for b in 1..=3 {
        let n: i64 = c
            .direct(b)
            .await
            .query_one(
                "SELECT count(*) FROM chorus.conflict WHERE kind = 'insert_insert'",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        logged += n;
    }
    assert!(logged >= 2, "conflicts logged: {logged}");
    let metrics: f64 = c
        .node_handles
        .iter()
        .map(|node| {
            node.metrics
                .render()
                .lines()
                .find(|l| l.starts_with("chorus_conflicts_total{kind=\"insert_insert\"}"))
                .and_then(|l| l.rsplit(' ').next())
                .and_then(|v| v.parse::<f64>().ok())
                .unwrap_or(0.0)
        })
        .sum();
    assert!(metrics >= 2.0, "conflicts counted: {metrics}");
}

#[tokio::test(flavor = "multi_thread")]
async fn pgbench_through_all_three_nodes_leaves_identical_backends() {
    let c = cluster(3).await;
    let pgbench = |node: usize, args: &[&str]| {
        let port = c.nodes[node - 1].port().to_string();
        let mut all = vec!["-h", "127.0.0.1", "-p", port.as_str(), "-U", "postgres"];
        all.extend_from_slice(args);
        all.push("postgres");
        common::run_pg_program("pgbench", &all, &[], Duration::from_secs(120))
    };
    let init = pgbench(1, &["-i", "-s", "1", "-q"]);
    assert!(init.status.success(), "{}", common::stderr(&init));
    let table_hash = "SELECT md5(string_agg(a::text, ',' ORDER BY aid)) FROM pgbench_accounts a";
    c.converged(table_hash).await;
    // The primary keys pgbench adds after loading reach every backend (in
    // stream order, after the rows), and the tables are adopted with them.
    let adopted = c
        .converged(
            "SELECT string_agg(tbl || ':' || insert_only, ',' ORDER BY tbl) \
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
            let port = c.nodes[node - 1].port().to_string();
            std::thread::spawn(move || {
                common::run_pg_program(
                    "pgbench",
                    &[
                        "-h",
                        "127.0.0.1",
                        "-p",
                        &port,
                        "-U",
                        "postgres",
                        "-n",
                        "-N",
                        "-c",
                        "4",
                        "-t",
                        "100",
                        "postgres",
                    ],
                    &[],
                    Duration::from_secs(120),
                )
            })
        })
        .collect();
    for run in runs {
        let out = run.join().unwrap();
        let text = common::stdout(&out);
        assert!(out.status.success(), "{text}\n{}", common::stderr(&out));
        assert!(text.contains("number of failed transactions: 0 "), "{text}");
    }
    c.converged(table_hash).await;
    c.converged("SELECT md5(string_agg(t::text, ',' ORDER BY tid)) FROM pgbench_tellers t")
        .await;
    c.converged("SELECT md5(string_agg(b::text, ',' ORDER BY bid)) FROM pgbench_branches b")
        .await;
    let history = c
        .converged("SELECT count(*)::text FROM pgbench_history")
        .await;
    assert_eq!(history, "1200");
}

#[tokio::test(flavor = "multi_thread")]
async fn random_concurrent_writes_through_three_nodes_converge() {
    use rand::{Rng, SeedableRng};
    let seed: u64 = std::env::var("CHORUS_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(20261126);
    let c = cluster(3).await;
    c.via(1)
        .await
        .batch_execute(
            "CREATE TABLE kv (k int PRIMARY KEY, v text NOT NULL, n int NOT NULL DEFAULT 0)",
        )
        .await
        .unwrap();
    c.converged("SELECT string_agg(tbl, ',') FROM chorus.replicated_table WHERE tbl = 'public.kv'")
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
}

#[tokio::test(flavor = "multi_thread")]
async fn a_query_string_mixing_ddl_with_other_statements_is_refused() {
    let c = cluster(2).await;
    let client = c.via(1).await;
    let err = client
        .batch_execute("CREATE TABLE t (id int); INSERT INTO t VALUES (1)")
        .await
        .unwrap_err();
    let db = err.as_db_error().unwrap();
    assert_eq!(db.code().code(), "0A000");
    assert!(db.message().contains("mixes DDL"), "{}", db.message());
    assert!(db.hint().unwrap().contains("own query"));
    // Nothing ran, and the session goes on; DDL alone (and with SET) works.
    let exists: bool = client
        .query_one("SELECT to_regclass('t') IS NOT NULL", &[])
        .await
        .unwrap()
        .get(0);
    assert!(!exists);
    client
        .batch_execute(
            "SET search_path = public; CREATE TABLE t (id int PRIMARY KEY); CREATE INDEX ON t (id)",
        )
        .await
        .unwrap();
    client
        .batch_execute("INSERT INTO t VALUES (1)")
        .await
        .unwrap();
    c.converged("SELECT count(*)::text FROM t").await;
}
