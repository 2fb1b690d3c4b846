//! A replicating cluster run in the test's own process: `n` backends and
//! one node for each, in one Raft group, with replication on. Tests reach
//! each node's [`Node`] (its metrics, its configuration) directly; for
//! nodes that are killed and restarted, see [`crate::procs`].

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chorus_proxy::config::Config;
use chorus_proxy::localpg::LocalPostgres;
use chorus_proxy::server::{self, Node};
use tokio::sync::watch;
use tokio_postgres::Client;

pub struct Cluster {
    pub dir: tempfile::TempDir,
    pub backends: Vec<LocalPostgres>,
    pub nodes: Vec<SocketAddr>,
    stop: watch::Sender<bool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    pub node_handles: Vec<Arc<Node>>,
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.stop.send_replace(true);
        for task in &self.tasks {
            task.abort();
        }
    }
}

pub async fn cluster(n: usize) -> Cluster {
    cluster_with(n, |_| String::new(), "").await
}

/// A cluster of `n`, with extra `[node]` settings per node id and extra
/// `[replication]` settings for all.
pub async fn cluster_with(
    n: usize,
    node_extra: impl Fn(usize) -> String,
    replication_extra: &str,
) -> Cluster {
    // Replication's debug log, shown with the output of a failing test.
    crate::log_to_test_output("chorus_proxy=debug");
    let dir = tempfile::tempdir().unwrap();
    let backends = crate::backends(dir.path(), n);
    cluster_on(dir, backends, node_extra, replication_extra).await
}

/// Chorus nodes, one per backend, on backends already running in `dir`.
pub async fn cluster_on(
    dir: tempfile::TempDir,
    backends: Vec<chorus_proxy::localpg::LocalPostgres>,
    node_extra: impl Fn(usize) -> String,
    replication_extra: &str,
) -> Cluster {
    cluster_on_backends(
        dir,
        backends,
        "",
        &|_| String::new(),
        node_extra,
        replication_extra,
    )
    .await
}

/// [`cluster_on`], with `backend_extra` settings in every `[[backends]]`
/// and `cluster_extra` ones (per node id) in `[cluster]`.
pub async fn cluster_on_backends(
    dir: tempfile::TempDir,
    backends: Vec<chorus_proxy::localpg::LocalPostgres>,
    backend_extra: &str,
    cluster_extra: &dyn Fn(usize) -> String,
    node_extra: impl Fn(usize) -> String,
    replication_extra: &str,
) -> Cluster {
    let n = backends.len();
    let mut backend_toml = String::new();
    for (i, pg) in backends.iter().enumerate() {
        backend_toml.push_str(&format!(
            "[[backends]]\nname = \"pg{}\"\nport = {}\n{backend_extra}\n",
            i + 1,
            pg.port()
        ));
    }
    let (stop, _) = watch::channel(false);
    let mut nodes = Vec::new();
    let mut tasks = Vec::new();
    let mut node_handles = Vec::new();
    let raft_ports = crate::raft_ports(n);
    for i in 1..=n {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        nodes.push(listener.local_addr().unwrap());
        let config = Config::from_toml(&format!(
            "[node]\nid = {i}\nhome_backend = \"pg{i}\"\nworker_threads = 1\nshutdown_timeout_ms = 2000\n\
             {}\n\
             {backend_toml}\
             [[users]]\nname = \"postgres\"\n\
             [[auth]]\nmethod = \"trust\"\n\
             [replication]\npoll_interval_ms = 20\n{replication_extra}\n{}",
            node_extra(i),
            crate::cluster_toml(dir.path(), i, &raft_ports, "test-secret")
                .replacen("[cluster]\n", &format!("[cluster]\n{}\n", cluster_extra(i)), 1)
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
        dir,
        backends,
        nodes,
        stop,
        tasks,
        node_handles,
    }
}

impl Cluster {
    /// Conflicts of `kind` in the conflict logs of all backends.
    pub async fn conflicts_logged(&self, kind: &str) -> i64 {
        let mut logged = 0;
        for b in 1..=self.backends.len() {
            let n: i64 = self
                .direct(b)
                .await
                .query_one(
                    "SELECT count(*) FROM chorus.conflict WHERE kind = $1",
                    &[&kind],
                )
                .await
                .unwrap()
                .get(0);
            logged += n;
        }
        logged
    }

    /// Conflicts of `kind` counted in the metrics of all nodes.
    pub fn conflicts_counted(&self, kind: &str) -> f64 {
        let prefix = format!("chorus_conflicts_total{{kind=\"{kind}\"}} ");
        self.node_handles
            .iter()
            .filter_map(|node| {
                node.metrics
                    .render()
                    .lines()
                    .find_map(|l| l.strip_prefix(&prefix).and_then(|v| v.parse::<f64>().ok()))
            })
            .sum()
    }

    pub async fn via(&self, node: usize) -> Client {
        crate::connect(&format!(
            "host=127.0.0.1 port={} user=postgres dbname=postgres",
            self.nodes[node - 1].port()
        ))
        .await
        .unwrap()
    }

    /// A session on a backend, over its Unix socket (which takes logins
    /// without TLS even where TCP does not).
    pub async fn direct(&self, backend: usize) -> Client {
        crate::connect(&self.backends[backend - 1].socket_conninfo("postgres"))
            .await
            .unwrap()
    }

    /// Create a table through node `node` and wait until every backend
    /// replicates it.
    pub async fn create_table(&self, node: usize, ddl: &str, table: &str) {
        self.via(node).await.batch_execute(ddl).await.unwrap();
        self.expect_everywhere(
            &format!("SELECT count(*)::text FROM chorus.replicated_table WHERE tbl = '{table}'"),
            "1",
        )
        .await;
    }

    /// What `sql` gives (a single text value, empty on error) on each
    /// backend.
    pub async fn values_everywhere(&self, sql: &str) -> Vec<String> {
        let mut values = Vec::new();
        for b in 1..=self.backends.len() {
            let client = self.direct(b).await;
            let value: Option<String> = match client.query_one(sql, &[]).await {
                Ok(row) => row.get(0),
                Err(_) => None,
            };
            values.push(value.unwrap_or_default());
        }
        values
    }

    /// Wait (bounded) until `sql` gives `expected` on every backend.
    pub async fn expect_everywhere(&self, sql: &str, expected: &str) {
        let deadline = Instant::now() + Duration::from_secs(90);
        let mut last = Vec::new();
        while Instant::now() < deadline {
            last = self.values_everywhere(sql).await;
            if last.iter().all(|v| v == expected) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("backends never all gave {expected:?} for {sql}: {last:?}");
    }

    /// Wait (bounded) until `sql` gives `expected` on backend `b`.
    pub async fn expect_one(&self, b: usize, sql: &str, expected: &str) {
        let deadline = Instant::now() + Duration::from_secs(90);
        let mut last = None;
        while Instant::now() < deadline {
            let value = self
                .direct(b)
                .await
                .query_one(sql, &[])
                .await
                .map(|r| r.get::<_, Option<String>>(0));
            if matches!(&value, Ok(Some(v)) if v == expected) {
                return;
            }
            last = Some(value);
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("backend {b} never gave {expected:?} for {sql}: {last:?}");
    }

    /// Wait (bounded) until `sql` gives the same single text value on
    /// every backend; returns it. Use only where agreement means the final
    /// state (a count can agree by chance on the way).
    pub async fn converged(&self, sql: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(90);
        let mut last = Vec::new();
        while Instant::now() < deadline {
            last = self.values_everywhere(sql).await;
            if !last[0].is_empty() && last.iter().all(|v| v == &last[0]) {
                return last[0].clone();
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("backends did not converge on {sql}: {last:?}");
    }
}
