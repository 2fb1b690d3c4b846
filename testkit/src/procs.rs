//! A cluster of Chorus node processes for tests: `n` backends (three
//! unless said), one node for each in one Raft group, each node's Raft port behind a fault-injecting
//! relay (see relay.rs); nodes can be killed and restarted.
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use chorus_proxy::localpg::{free_port, LocalPostgres};
use tokio_postgres::Client;

use crate as common;
use crate::link::Link;
use crate::relay::Relay;

pub struct Cluster {
    pub dir: tempfile::TempDir,
    pub backends: Vec<LocalPostgres>,
    /// Where each node's Raft RPC listens; the members' addresses are the
    /// relays in front of them.
    pub raft_ports: Vec<u16>,
    pub relays: Vec<Relay>,
    pub ports: Vec<u16>,
    pub metrics_ports: Vec<u16>,
    pub nodes: Vec<Option<Child>>,
    /// Extra `[cluster]` settings.
    pub extra: String,
    /// Extra `[node]` settings.
    pub node_extra: String,
    /// Extra `[node]` settings of each node.
    pub per_node: Vec<String>,
    /// Extra `[replication]` settings.
    pub replication: String,
    /// `links[i][b]`: the relay node `i + 1` reaches backend `b + 1`
    /// through (empty: nodes connect to backends directly).
    pub links: Vec<Vec<Link>>,
    /// Backends (by number) left out of the nodes' configurations written
    /// from now on (a backend taken out of the cluster, or one not yet in).
    pub omitted: Vec<usize>,
    /// The nodes the configurations name as the cluster's first members.
    pub members: Vec<usize>,
}

/// How to build a cluster.
#[derive(Default)]
pub struct Options {
    /// Extra `[node]` settings for every node, and for each one.
    pub node_extra: String,
    pub per_node: Vec<String>,
    /// Extra `[replication]` and `[cluster]` settings.
    pub replication: String,
    pub extra: String,
    /// A fault-injecting relay on every node-to-backend link.
    pub links: bool,
    /// SQL run on each backend (by position) before any node starts.
    pub prepare: Vec<String>,
    /// The nodes started with the cluster (empty: all three).
    pub start: Vec<usize>,
    /// Settings (`-c name=value`) of every backend.
    pub backend_settings: Vec<(String, String)>,
    /// Backends, and nodes (0: three).
    pub nodes: usize,
    /// Backends (by position) no node's configuration names at first
    /// (see `Cluster::omitted`).
    pub omit: Vec<usize>,
    /// The nodes the configurations name as the cluster's first members
    /// (empty: all); another waits to be added (`chorus cluster add-node`).
    pub members: Vec<usize>,
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for node in self.nodes.iter_mut().flatten() {
            let _ = node.kill();
            let _ = node.wait();
        }
        // A failing test shows what the nodes logged last.
        // With CHORUS_TEST_LOGS=DIR, the whole logs are kept there too.
        if std::thread::panicking() {
            let keep = std::env::var_os("CHORUS_TEST_LOGS").map(std::path::PathBuf::from);
            for i in 1..=self.nodes.len() {
                let path = self.dir.path().join(format!("node{i}.log"));
                if let Some(dir) = &keep {
                    let _ = std::fs::create_dir_all(dir);
                    let _ = std::fs::copy(&path, dir.join(format!("node{i}.log")));
                }
                let log = std::fs::read_to_string(&path).unwrap_or_default();
                let tail: Vec<&str> = log.lines().rev().take(30).collect();
                eprintln!("--- node {i} log (errors, then the last lines) ---");
                for line in log
                    .lines()
                    .filter(|l| l.starts_with("Error") || l.contains("panicked"))
                {
                    eprintln!("{line}");
                }
                for line in tail.iter().rev() {
                    eprintln!("{line}");
                }
            }
        }
    }
}

/// The server's message of an error.
pub fn message(e: &tokio_postgres::Error) -> String {
    e.as_db_error()
        .map(|d| d.message().to_owned())
        .unwrap_or_else(|| e.to_string())
}

/// A 3-node cluster; `extra`: more `[cluster]` settings.
pub async fn cluster(extra: &str) -> Cluster {
    cluster_with("", extra).await
}

/// A 3-node cluster with extra `[node]` and `[cluster]` settings.
pub async fn cluster_with(node_extra: &str, extra: &str) -> Cluster {
    cluster_opts(Options {
        node_extra: node_extra.to_owned(),
        extra: extra.to_owned(),
        ..Options::default()
    })
    .await
}

/// A 3-node cluster built as `options` say.
pub async fn cluster_opts(options: Options) -> Cluster {
    let n = if options.nodes == 0 { 3 } else { options.nodes };
    let dir = tempfile::tempdir().unwrap();
    let backends = common::backends_with(dir.path(), n, &options.backend_settings);
    for (pg, sql) in backends.iter().zip(&options.prepare) {
        let client = common::connect(&pg.conninfo("postgres")).await.unwrap();
        client.batch_execute(sql).await.unwrap();
    }
    let start: Vec<usize> = if options.start.is_empty() {
        (1..=n).collect()
    } else {
        options.start.clone()
    };
    let raft_ports = common::raft_ports(n);
    let mut relays = Vec::new();
    for port in &raft_ports {
        relays.push(Relay::start(*port).await);
    }
    let mut links = Vec::new();
    if options.links {
        for _ in 0..n {
            let mut row = Vec::new();
            for pg in &backends {
                row.push(Link::start(pg.port()).await);
            }
            links.push(row);
        }
    }
    let mut c = Cluster {
        dir,
        backends,
        raft_ports,
        relays,
        ports: (0..n).map(|_| free_port().unwrap()).collect(),
        metrics_ports: (0..n).map(|_| free_port().unwrap()).collect(),
        nodes: (0..n).map(|_| None).collect(),
        extra: options.extra,
        node_extra: options.node_extra,
        per_node: options.per_node,
        replication: options.replication,
        links,
        omitted: options.omit,
        members: if options.members.is_empty() {
            (1..=n).collect()
        } else {
            options.members
        },
    };
    for &i in &start {
        c.start_node(i);
    }
    // A node that could not bind one of its ports (another process took it
    // between our choosing it and the node binding it) exits at once; its
    // log says so, and it is started again.
    for _ in 0..5 {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let mut restarted = false;
        for i in 1..=n {
            let exited = c.nodes[i - 1]
                .as_mut()
                .is_some_and(|child| child.try_wait().ok().flatten().is_some());
            if exited {
                let log = std::fs::read_to_string(c.dir.path().join(format!("node{i}.log")))
                    .unwrap_or_default();
                let last: Vec<&str> = log.lines().rev().take(3).collect();
                eprintln!("node {i} exited at start ({last:?}); starting it again");
                c.start_node(i);
                restarted = true;
            }
        }
        if !restarted {
            break;
        }
    }
    for &i in &start {
        c.wait_for(i, "SELECT count(*)::text FROM chorus.local", |v| v == "1")
            .await;
    }
    c
}

impl Cluster {
    pub fn config(&self, i: usize, secret: &str) -> String {
        let relays: Vec<u16> = self.relays.iter().map(|r| r.port).collect();
        let members: Vec<(usize, u16)> = self.members.iter().map(|&m| (m, relays[m - 1])).collect();
        let mut toml = format!(
            "[node]\nid = {i}\nlisten = \"127.0.0.1:{}\"\nmetrics_listen = \"127.0.0.1:{}\"\n\
             home_backend = \"pg{i}\"\nworker_threads = 1\n{}\n{}\n\
             [[users]]\nname = \"postgres\"\n[[auth]]\nmethod = \"trust\"\n\
             [replication]\npoll_interval_ms = 20\n{}\n{}",
            self.ports[i - 1],
            self.metrics_ports[i - 1],
            self.node_extra,
            self.per_node.get(i - 1).map_or("", String::as_str),
            self.replication,
            crate::config::cluster_toml_via(
                self.dir.path(),
                i,
                self.raft_ports[i - 1],
                &members,
                secret,
                &format!(
                    "election_timeout_min_ms = 400\nelection_timeout_max_ms = 800\n\
                     ddl_timeout_ms = 3000\n{}",
                    self.extra
                ),
            ),
        );
        for (b, pg) in self.backends.iter().enumerate() {
            if self.omitted.contains(&(b + 1)) {
                continue;
            }
            let port = match self.links.get(i - 1) {
                Some(row) => row[b].port,
                None => pg.port(),
            };
            toml.push_str(&format!(
                "[[backends]]\nname = \"pg{}\"\nport = {}\n",
                b + 1,
                port
            ));
        }
        toml
    }

    /// Write node `i`'s configuration file as the cluster is now (what its
    /// next start, or its `RELOAD`, reads); its path.
    pub fn write_config(&self, i: usize, secret: &str) -> std::path::PathBuf {
        let config = self.dir.path().join(format!("node{i}.toml"));
        std::fs::write(&config, self.config(i, secret)).unwrap();
        config
    }

    pub fn start_node_with_secret(&mut self, i: usize, secret: &str) {
        let config = self.write_config(i, secret);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join(format!("node{i}.log")))
            .unwrap();
        let child = Command::new(crate::chorus_bin())
            .arg("run")
            .arg("--config")
            .arg(&config)
            .env("RUST_LOG", "info,chorus_proxy=debug")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        self.nodes[i - 1] = Some(child);
    }

    pub fn start_node(&mut self, i: usize) {
        self.start_node_with_secret(i, "cluster-secret");
    }

    /// Run the `chorus` binary with `args` and node `i`'s config; its
    /// stdout (it must succeed).
    pub fn chorus(&self, i: usize, args: &[&str]) -> String {
        let out = Command::new(crate::chorus_bin())
            .args(args)
            .arg("--config")
            .arg(self.dir.path().join(format!("node{i}.toml")))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Stop node `i` as an operator would (SIGTERM: open transactions get
    /// to finish), waiting until it has exited.
    pub fn stop_node(&mut self, i: usize) {
        if let Some(mut child) = self.nodes[i - 1].take() {
            let _ = Command::new("kill")
                .args(["-TERM", &child.id().to_string()])
                .status();
            let deadline = Instant::now() + Duration::from_secs(30);
            while child.try_wait().unwrap().is_none() {
                assert!(Instant::now() < deadline, "node {i} did not stop");
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }

    pub fn kill_node(&mut self, i: usize) {
        if let Some(mut child) = self.nodes[i - 1].take() {
            child.kill().unwrap();
            child.wait().unwrap();
        }
    }

    /// A client session through node `i` (waits for the node to listen).
    pub async fn via(&self, i: usize) -> Client {
        self.via_db(i, "postgres").await
    }

    /// A session through node `i` on `database`.
    pub async fn via_db(&self, i: usize, database: &str) -> Client {
        let conninfo = format!(
            "host=127.0.0.1 port={} user=postgres dbname={database}",
            self.ports[i - 1]
        );
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            match common::connect(&conninfo).await {
                Ok(client) => return client,
                Err(e) => {
                    assert!(Instant::now() < deadline, "node {i} unreachable: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }

    /// Run `sql` through node `i` (a new session); it must succeed.
    pub async fn exec(&self, i: usize, sql: &str) {
        self.via(i).await.batch_execute(sql).await.unwrap();
    }

    /// A bigint from `sql` run through node `i` (a new session).
    pub async fn int_via(&self, i: usize, sql: &str) -> i64 {
        self.via(i).await.query_one(sql, &[]).await.unwrap().get(0)
    }

    /// Conflicts logged on backend `b`.
    pub async fn conflicts(&self, b: usize) -> i64 {
        self.direct(b)
            .await
            .query_one("SELECT count(*) FROM chorus.conflict", &[])
            .await
            .unwrap()
            .get(0)
    }

    /// The backend (from 1) listening on `port`.
    pub fn backend_on(&self, port: i32) -> usize {
        1 + self
            .backends
            .iter()
            .position(|b| i32::from(b.port()) == port)
            .unwrap()
    }

    /// A session on backend `b`, if it answers.
    pub async fn direct_try(&self, b: usize) -> Option<Client> {
        common::connect(&self.backends[b - 1].conninfo("postgres"))
            .await
            .ok()
    }

    /// A session on backend `b`, on `database`.
    pub async fn direct_db(&self, b: usize, database: &str) -> Client {
        common::connect(&self.backends[b - 1].conninfo(database))
            .await
            .unwrap()
    }

    pub async fn direct(&self, b: usize) -> Client {
        common::connect(&self.backends[b - 1].conninfo("postgres"))
            .await
            .unwrap()
    }

    /// Wait until `sql` gives a value on backend `b` that satisfies `done`.
    pub async fn wait_for(&self, b: usize, sql: &str, done: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut last = String::new();
        while Instant::now() < deadline {
            if let Ok(client) = common::connect(&self.backends[b - 1].conninfo("postgres")).await {
                if let Ok(row) = client.query_one(sql, &[]).await {
                    last = row.get::<_, Option<String>>(0).unwrap_or_default();
                    if done(&last) {
                        return last;
                    }
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("backend {b}: {sql} still gives {last:?}");
    }

    /// Wait until `sql` gives the same on `from` and on each of `others`
    /// (read again each round: `from` may still be receiving changes too).
    pub async fn converge(&self, sql: &str, from: usize, others: &[usize]) {
        let deadline = Instant::now() + Duration::from_secs(60);
        let read = |b: usize| async move {
            let client = common::connect(&self.backends[b - 1].conninfo("postgres"))
                .await
                .ok()?;
            let row = client.query_one(sql, &[]).await.ok()?;
            Some(row.get::<_, Option<String>>(0).unwrap_or_default())
        };
        loop {
            let expected = read(from).await;
            let mut values = Vec::new();
            for &b in others {
                values.push((b, read(b).await));
            }
            if expected.is_some() && values.iter().all(|(_, v)| *v == expected) {
                return;
            }
            if Instant::now() >= deadline {
                panic!("{sql}: backend {from} gives {expected:?}, the others {values:?}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Wait (bounded) until `sql` gives the same value in `database` on
    /// every backend (each read again every round): `expected`, or with
    /// `None` any value but the empty one (an error or NULL reads as
    /// empty). Returns the value.
    pub async fn agree(&self, database: &str, sql: &str, expected: Option<&str>) -> String {
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut last = Vec::new();
        while Instant::now() < deadline {
            last.clear();
            for b in 1..=self.backends.len() {
                let value = match common::connect(&self.backends[b - 1].conninfo(database)).await {
                    Ok(client) => match client.query_one(sql, &[]).await {
                        Ok(row) => row.get::<_, Option<String>>(0).unwrap_or_default(),
                        Err(_) => String::new(),
                    },
                    Err(_) => String::new(),
                };
                last.push(value);
            }
            let first = last[0].as_str();
            let wanted = expected.is_none_or(|e| e == first) && !first.is_empty();
            if wanted && last.iter().all(|v| v == first) {
                return first.to_owned();
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("{database}: backends never agreed on {expected:?} for {sql}: {last:?}");
    }

    /// Hold backend `b` from applying `origin`'s changes: a session there
    /// locks its row of `chorus.applied` (made by the first apply from that
    /// origin: have one happen first) in an open transaction. Send
    /// `ROLLBACK` on the session returned to let the applies go on.
    pub async fn hold_applies(&self, b: usize, origin: u16) -> Client {
        let holder = self.direct(b).await;
        let locked = holder
            .simple_query(&format!(
                "BEGIN; SELECT origin FROM chorus.applied WHERE origin = {origin} FOR UPDATE"
            ))
            .await
            .unwrap()
            .into_iter()
            .filter(|m| matches!(m, tokio_postgres::SimpleQueryMessage::Row(_)))
            .count();
        assert_eq!(locked, 1, "backend {b} has no row for origin {origin}");
        holder
    }

    /// Wait until every backend has applied `n` DDL log entries.
    pub async fn wait_ddl(&self, n: usize) {
        for b in 1..=self.backends.len() {
            self.wait_for(b, "SELECT count(*)::text FROM chorus.ddl_history", |v| {
                v.parse::<usize>().unwrap_or(0) >= n
            })
            .await;
        }
    }

    /// A backend's DDL history: (seq, command, error) in order.
    pub async fn history(&self, b: usize) -> Vec<(i64, String, Option<String>)> {
        self.direct(b)
            .await
            .query(
                "SELECT seq, command, error FROM chorus.ddl_history ORDER BY seq",
                &[],
            )
            .await
            .unwrap()
            .iter()
            .map(|r| (r.get(0), r.get(1), r.get(2)))
            .collect()
    }

    /// The backend's schema as pg_dump prints it (minus its random
    /// per-run lines).
    pub fn schema(&self, b: usize) -> String {
        common::schema_dump(self.backends[b - 1].port(), "postgres", &["--no-owner"])
    }

    /// A metric of node `i` (None when absent or the node is down).
    pub async fn metric(&self, i: usize, name: &str) -> Option<f64> {
        let addr = format!("127.0.0.1:{}", self.metrics_ports[i - 1])
            .parse()
            .ok()?;
        let stream =
            tokio::time::timeout(Duration::from_secs(2), tokio::net::TcpStream::connect(addr))
                .await
                .ok()?
                .ok()?;
        drop(stream);
        let (_, body) = common::http_get(addr, "/metrics").await;
        body.lines().find_map(|l| {
            l.strip_prefix(name)
                .and_then(|v| v.strip_prefix(' '))
                .and_then(|v| v.trim().parse().ok())
        })
    }

    /// Wait (up to 30 s) until node `i`'s metric `name` satisfies `done`.
    pub async fn wait_metric(&self, i: usize, name: &str, done: impl Fn(f64) -> bool) {
        common::eventually(
            &format!("node {i}'s {name}"),
            Duration::from_secs(30),
            Duration::from_millis(20),
            || async { self.metric(i, name).await.is_some_and(&done) },
        )
        .await;
    }

    /// The Raft leader, as node `i` sees it (waits for one).
    pub async fn leader(&self, i: usize) -> usize {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(l) = self.metric(i, "chorus_raft_leader").await {
                if l > 0.0 {
                    return l as usize;
                }
            }
            assert!(Instant::now() < deadline, "no leader seen by node {i}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}
