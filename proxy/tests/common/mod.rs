//! Test harness: a real PostgreSQL made with `initdb` in a temp dir, and a
//! Chorus node in front of it, both stopped when the harness is dropped
//! (also when the test fails).
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::Arc;
use std::time::Duration;

use chorus_proxy::config::Config;
use chorus_proxy::localpg::{LocalPgOptions, LocalPostgres, PgBinaries};
use chorus_proxy::server::{self, Node};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// The backend superuser and its password (backends use SCRAM over TCP).
pub const PG_USER: &str = "postgres";
pub const PG_PASSWORD: &str = "chorus-pw";

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

pub fn pg_binaries() -> PgBinaries {
    PgBinaries::find().expect("PostgreSQL server programs are needed for the tests")
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

/// Wait until `check` holds, asking every `every`, for at most `within`;
/// fails the test, naming `what`, when it never does. The one shape of a
/// bounded wait on a condition: tests never sleep a fixed time instead.
pub async fn eventually<F, Fut>(what: &str, within: Duration, every: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + within;
    while !check().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what}: not within {within:?}"
        );
        tokio::time::sleep(every).await;
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

/// `n` throwaway backends `pg1`..`pgN` under `dir`, with default options.
pub fn backends(dir: &Path, n: usize) -> Vec<LocalPostgres> {
    backends_with(dir, n, &[])
}

/// [`backends`], each with these settings.
pub fn backends_with(dir: &Path, n: usize, settings: &[(String, String)]) -> Vec<LocalPostgres> {
    (1..=n)
        .map(|i| {
            tokio::task::block_in_place(|| {
                LocalPostgres::create(
                    &pg_binaries(),
                    &dir.join(format!("pg{i}")),
                    LocalPgOptions {
                        settings: settings.to_vec(),
                        ..LocalPgOptions::default()
                    },
                )
            })
            .unwrap()
        })
        .collect()
}

/// Free ports for the Raft RPC of `n` nodes.
pub fn raft_ports(n: usize) -> Vec<u16> {
    (0..n)
        .map(|_| chorus_proxy::localpg::free_port().unwrap())
        .collect()
}

/// The `[cluster]` section of node `id` (from 1) of a cluster whose nodes'
/// Raft RPC listens on `ports`, with its log under `dir`. Short election
/// timeouts: tests stop leaders.
pub fn cluster_toml(dir: &Path, id: usize, ports: &[u16], secret: &str) -> String {
    let mut toml = format!(
        "[cluster]
raft_listen = \"127.0.0.1:{}\"
secret = \"{secret}\"
data_dir = \"{}\"
         heartbeat_ms = 50
election_timeout_min_ms = 300
election_timeout_max_ms = 600
",
        ports[id - 1],
        dir.join(format!("raft{id}")).display()
    );
    for (i, port) in ports.iter().enumerate() {
        toml.push_str(&format!(
            "[[cluster.members]]
id = {}
raft = \"127.0.0.1:{port}\"
",
            i + 1
        ));
    }
    toml
}

/// Run pgbench with `args` against the postgres database through
/// 127.0.0.1:`port` as user postgres (trusted), within two minutes.
pub fn pgbench(port: u16, args: &[&str]) -> Output {
    pgbench_as(port, "postgres", args)
}

/// pgbench against `port`, database postgres, as `user`.
pub fn pgbench_as(port: u16, user: &str, args: &[&str]) -> Output {
    let port = port.to_string();
    let mut all = vec!["-h", "127.0.0.1", "-p", port.as_str(), "-U", user];
    all.extend_from_slice(args);
    all.push("postgres");
    run_pg_program("pgbench", &all, &[], Duration::from_secs(120))
}

/// Connect with tokio-postgres, driving the connection in a task.
pub async fn connect(conninfo: &str) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
    let (client, connection) = tokio_postgres::connect(conninfo, tokio_postgres::NoTls).await?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(client)
}

/// Connect with tokio-postgres, keeping the text of every notice the
/// session hears.
#[allow(dead_code)]
pub async fn connect_hearing_notices(
    conninfo: &str,
) -> (
    tokio_postgres::Client,
    std::sync::Arc<std::sync::Mutex<Vec<String>>>,
) {
    let (client, mut connection) = tokio_postgres::connect(conninfo, tokio_postgres::NoTls)
        .await
        .unwrap();
    let heard = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let notices = heard.clone();
    tokio::spawn(async move {
        while let Some(Ok(message)) = std::future::poll_fn(|cx| connection.poll_message(cx)).await {
            if let tokio_postgres::AsyncMessage::Notice(notice) = message {
                notices.lock().unwrap().push(notice.message().to_owned());
            }
        }
    });
    (client, heard)
}

/// The SQLSTATE of a tokio-postgres error, if the server sent one.
pub fn sqlstate(error: &tokio_postgres::Error) -> Option<String> {
    error.code().map(|c| c.code().to_owned())
}

/// A minimal HTTP GET over a raw socket.
pub async fn http_get(addr: SocketAddr, path: &str) -> (String, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream
        .write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut response = String::new();
    tokio::time::timeout(
        Duration::from_secs(10),
        stream.read_to_string(&mut response),
    )
    .await
    .unwrap()
    .unwrap();
    let (head, body) = response.split_once("\r\n\r\n").unwrap_or((&response, ""));
    (
        head.lines().next().unwrap_or_default().to_owned(),
        body.to_owned(),
    )
}

/// Run a libpq client program (psql, pgbench) from the PostgreSQL bin dir,
/// killed if it runs longer than `limit`.
pub fn run_pg_program(
    program: &str,
    args: &[&str],
    env: &[(&str, String)],
    limit: Duration,
) -> Output {
    let path = program_path(program);
    let mut cmd = Command::new(&path);
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .env("PGAPPNAME", "chorus-test");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    wait_with_limit(child, limit)
}

/// Wait for a child, killing it after `limit`. Its output is read while
/// it runs (a child that fills a pipe would otherwise never finish).
pub fn wait_with_limit(mut child: std::process::Child, limit: Duration) -> Output {
    use std::io::Read;
    fn drain<R: Read + Send + 'static>(pipe: Option<R>) -> std::thread::JoinHandle<Vec<u8>> {
        std::thread::spawn(move || {
            let mut bytes = Vec::new();
            if let Some(mut pipe) = pipe {
                let _ = pipe.read_to_end(&mut bytes);
            }
            bytes
        })
    }
    let stdout = drain(child.stdout.take());
    let stderr = drain(child.stderr.take());
    let deadline = std::time::Instant::now() + limit;
    let (status, killed) = loop {
        match child.try_wait().unwrap() {
            Some(status) => break (status, false),
            None if std::time::Instant::now() >= deadline => {
                let _ = child.kill();
                break (child.wait().unwrap(), true);
            }
            None => std::thread::sleep(Duration::from_millis(20)),
        }
    };
    let output = Output {
        status,
        stdout: stdout.join().unwrap(),
        stderr: stderr.join().unwrap(),
    };
    assert!(
        !killed,
        "program ran longer than {limit:?}\nstdout: {}\nstderr: {}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    output
}

/// psql and pgbench: next to initdb, or on PATH.
pub fn program_path(program: &str) -> PathBuf {
    let beside = pg_binaries().program(program);
    if beside.is_file() {
        beside
    } else {
        PathBuf::from(program)
    }
}

/// Write a self-signed certificate for 127.0.0.1/localhost.
pub fn write_certificate(dir: &Path) -> (PathBuf, PathBuf) {
    let certified =
        rcgen::generate_simple_self_signed(vec!["localhost".to_owned(), "127.0.0.1".to_owned()])
            .unwrap();
    let cert = dir.join("server.crt");
    let key = dir.join("server.key");
    std::fs::write(&cert, certified.cert.pem()).unwrap();
    std::fs::write(&key, certified.key_pair.serialize_pem()).unwrap();
    (cert, key)
}

/// A certificate authority for tests: its certificate, written to
/// `dir/ca.crt`, and the server certificates it signs.
pub struct TestCa {
    pub path: PathBuf,
    cert: rcgen::Certificate,
    key: rcgen::KeyPair,
}

impl TestCa {
    pub fn new(dir: &Path, name: &str) -> TestCa {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        let path = dir.join(format!("{name}.crt"));
        std::fs::write(&path, cert.pem()).unwrap();
        TestCa { path, cert, key }
    }

    /// A server certificate for `names` (host names or addresses), and its
    /// key, as PEM.
    pub fn issue(&self, names: &[&str]) -> chorus_proxy::localpg::LocalTls {
        let names: Vec<String> = names.iter().map(|n| (*n).to_owned()).collect();
        let params = rcgen::CertificateParams::new(names).unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.cert, &self.key).unwrap();
        chorus_proxy::localpg::LocalTls {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            required: false,
        }
    }
}

/// `pg_dump --schema-only` of `database` on the server at `port`, with
/// `extra` options, minus its random per-run lines.
pub fn schema_dump(port: u16, database: &str, extra: &[&str]) -> String {
    let port = port.to_string();
    let mut args = vec![
        "--schema-only",
        "-h",
        "127.0.0.1",
        "-p",
        &port,
        "-U",
        "postgres",
    ];
    args.extend_from_slice(extra);
    args.push(database);
    let out = run_pg_program("pg_dump", &args, &[], Duration::from_secs(60));
    assert!(out.status.success(), "{}", stderr(&out));
    stdout(&out)
        .lines()
        .filter(|l| !l.starts_with("\\restrict") && !l.starts_with("\\unrestrict"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// The chorus schema of version `version` (1 or 2, the fixtures of earlier
/// versions), as its installer put it on a backend of node `node_id`,
/// followed by `then` in the same transaction.
#[allow(dead_code)]
pub fn earlier_schema_sql(version: i32, node_id: usize, then: &str) -> String {
    let schema = match version {
        1 => include_str!("../fixtures/schema_v1.sql"),
        2 => include_str!("../fixtures/schema_v2.sql"),
        3 => include_str!("../fixtures/schema_v3.sql"),
        4 => include_str!("../fixtures/schema_v4.sql"),
        _ => panic!("no fixture of schema version {version}"),
    };
    format!(
        "BEGIN; SET LOCAL chorus.ddl_scope = 'local';\n{schema}\n\
         INSERT INTO chorus.local (node_id) VALUES ({node_id});\n{then}\nCOMMIT;"
    )
}

/// The previous version's schema (see [`earlier_schema_sql`]).
#[allow(dead_code)]
pub fn previous_schema_sql(node_id: usize, then: &str) -> String {
    earlier_schema_sql(
        chorus_proxy::cluster::capture::SCHEMA_VERSION - 1,
        node_id,
        then,
    )
}

pub fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

pub fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}
