//! One backend and one Chorus node in front of it, run in the test's own
//! process.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use chorus_proxy::config::Config;
use chorus_proxy::localpg::{LocalPgOptions, LocalPostgres};
use chorus_proxy::server::{self, Node};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use crate::{connect, http_get, pg_binaries, write_certificate, PG_PASSWORD, PG_USER};

/// How to build a test node.
pub struct Options {
    /// Extra TOML appended to the generated config (users, auth, tls).
    pub extra_toml: String,
    /// Extra `[node]` keys.
    pub node_toml: String,
    /// Whether to start with `[[users]]` for the superuser.
    pub default_user: bool,
    /// Whether to generate a certificate and enable TLS.
    pub tls: bool,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            extra_toml: String::new(),
            node_toml: String::new(),
            default_user: true,
            tls: false,
        }
    }
}

/// A backend and a Chorus node in front of it.
pub struct TestNode {
    pub pg: LocalPostgres,
    pub addr: SocketAddr,
    pub metrics_addr: SocketAddr,
    pub node: Arc<Node>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
    pub dir: tempfile::TempDir,
}

/// Start a backend and a node. Needs a multi-thread runtime.
pub async fn start(options: Options) -> TestNode {
    let dir = tempfile::Builder::new()
        .prefix("chorus-test-")
        .tempdir()
        .unwrap();
    let pg_dir = dir.path().join("pg");
    let pg = tokio::task::block_in_place(|| {
        LocalPostgres::create(
            &pg_binaries(),
            &pg_dir,
            LocalPgOptions {
                password: Some(PG_PASSWORD.to_owned()),
                ..LocalPgOptions::default()
            },
        )
    })
    .expect("starting PostgreSQL");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let metrics_port = chorus_proxy::localpg::free_port().unwrap();
    let metrics_addr: SocketAddr = format!("127.0.0.1:{metrics_port}").parse().unwrap();
    let mut node_toml = options.node_toml.clone();
    if !node_toml.contains("shutdown_timeout_ms") {
        node_toml.push_str("\nshutdown_timeout_ms = 5000");
    }
    let mut toml = format!(
        "[node]\nid = 1\nlisten = \"{addr}\"\nmetrics_listen = \"{metrics_addr}\"\n{}\n\
         [[backends]]\nname = \"pg1\"\nport = {}\n",
        node_toml,
        pg.port()
    );
    if options.tls {
        let (cert, key) = write_certificate(dir.path());
        toml.push_str(&format!(
            "[tls]\ncert = \"{}\"\nkey = \"{}\"\n",
            cert.display(),
            key.display()
        ));
    }
    if options.default_user {
        toml.push_str(&format!(
            "[[users]]\nname = \"{PG_USER}\"\npassword = \"{PG_PASSWORD}\"\n"
        ));
    }
    toml.push_str(&options.extra_toml);
    let config = Config::from_toml(&toml).unwrap_or_else(|e| panic!("{e}\n{toml}"));
    let node = Node::new(config).unwrap();
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn({
        let node = node.clone();
        async move {
            server::run_node_with(listener, node, async {
                let _ = stopped.await;
            })
            .await
            .unwrap();
        }
    });
    wait_for_port(metrics_addr).await;
    TestNode {
        pg,
        addr,
        metrics_addr,
        node,
        stop: Some(stop),
        task: Some(task),
        dir,
    }
}

async fn wait_for_port(addr: SocketAddr) {
    for _ in 0..200 {
        if tokio::net::TcpStream::connect(addr).await.is_ok() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("{addr} never started listening");
}

impl TestNode {
    /// A tokio-postgres connection string to the proxy.
    pub fn conninfo(&self, user: &str, password: Option<&str>) -> String {
        let mut s = format!(
            "host=127.0.0.1 port={} user={user} dbname=postgres connect_timeout=10",
            self.addr.port()
        );
        if let Some(password) = password {
            s.push_str(&format!(" password={password}"));
        }
        s
    }

    /// A libpq URL to the proxy, for psql and pgbench.
    pub fn url(&self) -> String {
        format!(
            "postgres://{PG_USER}@127.0.0.1:{}/postgres",
            self.addr.port()
        )
    }

    /// Connect through the proxy as the superuser.
    pub async fn client(&self) -> tokio_postgres::Client {
        connect(&self.conninfo(PG_USER, Some(PG_PASSWORD)))
            .await
            .expect("connecting through the proxy")
    }

    /// Connect straight to the backend, bypassing the proxy.
    pub async fn direct(&self) -> tokio_postgres::Client {
        connect(&self.pg.conninfo("postgres"))
            .await
            .expect("connecting to the backend")
    }

    /// Begin shutdown and wait (bounded) for the node to finish.
    pub async fn shutdown(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            tokio::time::timeout(Duration::from_secs(20), task)
                .await
                .expect("node did not shut down in time")
                .unwrap();
        }
    }

    /// Begin shutdown without waiting.
    pub fn begin_shutdown(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }

    /// Wait for a node whose shutdown has begun.
    pub async fn wait_stopped(&mut self, within: Duration) {
        if let Some(task) = self.task.take() {
            tokio::time::timeout(within, task)
                .await
                .expect("node did not stop in time")
                .unwrap();
        }
    }

    /// GET a path from the metrics endpoint; (status line, body).
    pub async fn http_get(&self, path: &str) -> (String, String) {
        http_get(self.metrics_addr, path).await
    }

    /// Environment for libpq programs connecting through the proxy.
    pub fn libpq_env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("PGPASSWORD", PG_PASSWORD.to_owned()),
            ("PGCONNECT_TIMEOUT", "10".to_owned()),
        ]
    }
}

impl Drop for TestNode {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}
