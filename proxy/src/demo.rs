//! `chorus demo`: a throwaway local cluster of N PostgreSQL backends and N
//! Chorus nodes in one process, for trying Chorus with psql.

use anyhow::Context;
use std::path::PathBuf;
use tokio::sync::watch;

use crate::config::{
    AuthMethod, AuthRule, BackendConfig, ClusterConfig, Config, MemberConfig, NodeConfig,
    ReplicationConfig, UserConfig,
};
use crate::localpg::{LocalPgOptions, LocalPostgres, PgBinaries};
use crate::server::{self, Node};

/// What `chorus demo` was asked for.
#[derive(Debug, Clone)]
pub struct DemoOptions {
    pub nodes: u16,
    pub port: u16,
    pub dir: Option<PathBuf>,
    pub keep: bool,
    /// Plain proxies, no replication (used to measure proxy overhead).
    pub proxy_only: bool,
    /// The database that replicates (made on every backend when it is not
    /// "postgres").
    pub database: String,
    /// How client sessions share server connections.
    pub pool_mode: crate::config::PoolMode,
}

/// The user the demo prints in its connection strings.
pub const DEMO_USER: &str = "postgres";

/// Run the demo until SIGINT or SIGTERM.
pub async fn run(options: DemoOptions) -> anyhow::Result<()> {
    anyhow::ensure!(
        (1..=32).contains(&options.nodes),
        "--nodes must be between 1 and 32"
    );
    let bins = PgBinaries::find()?;
    let created_base = options.dir.as_ref().is_some_and(|d| !d.exists());
    let (base, _temp) = match &options.dir {
        Some(dir) => (dir.clone(), None),
        None => {
            let temp = tempfile::Builder::new()
                .prefix("chorus-demo-")
                .tempdir()
                .context("creating a temporary directory")?;
            (temp.path().to_owned(), Some(temp))
        }
    };
    eprintln!(
        "chorus demo: creating {} PostgreSQL backends with {} in {}",
        options.nodes,
        bins.program("initdb").display(),
        base.display()
    );

    let mut backends = Vec::new();
    for i in 1..=options.nodes {
        let dir = base.join(format!("pg{i}"));
        // Blocking is fine here: nothing else runs on the runtime yet.
        let pg = LocalPostgres::create(&bins, &dir, LocalPgOptions::default())
            .with_context(|| format!("starting backend {i}"))?;
        if options.database != "postgres" {
            create_database(&pg, &options.database)
                .await
                .with_context(|| {
                    format!("creating database {} on backend {i}", options.database)
                })?;
        }
        backends.push(pg);
    }
    let backend_configs: Vec<BackendConfig> = backends
        .iter()
        .enumerate()
        .map(|(i, pg)| BackendConfig {
            name: format!("pg{}", i + 1),
            host: "127.0.0.1".to_owned(),
            port: pg.port(),
            sslmode: crate::backend::SslMode::Disable,
            sslrootcert: None,
            tls: None,
        })
        .collect();

    // The nodes' Raft group: free ports (nobody connects to them but the
    // nodes), a fresh secret, logs beside the backends.
    let mut raft_ports = Vec::new();
    for _ in 0..options.nodes {
        raft_ports.push(crate::localpg::free_port().context("finding a port for Raft")?);
    }
    let raft_port = |i: u16| raft_ports[usize::from(i) - 1];
    let members: Vec<MemberConfig> = (1..=options.nodes)
        .map(|i| MemberConfig {
            id: i,
            raft: format!("127.0.0.1:{}", raft_port(i)),
        })
        .collect();
    let mut secret = [0u8; 16];
    rand::RngCore::fill_bytes(&mut rand::rng(), &mut secret);
    let secret: String = secret.iter().map(|b| format!("{b:02x}")).collect();

    let (stop_tx, stop_rx) = watch::channel(false);
    let mut nodes = Vec::new();
    let mut metrics_ports = Vec::new();
    let mut config_paths = Vec::new();
    for i in 1..=options.nodes {
        let port = options.port + i - 1;
        let metrics_port = options.port + 100 + i - 1;
        let config = Config {
            node: NodeConfig {
                id: i,
                listen: ([127, 0, 0, 1], port).into(),
                metrics_listen: Some(([127, 0, 0, 1], metrics_port).into()),
                home_backend: Some(format!("pg{i}")),
                shutdown_timeout_ms: 5_000,
                admin_users: vec![DEMO_USER.to_owned()],
                ..NodeConfig::default()
            },
            tls: None,
            pool: crate::config::PoolConfig {
                mode: options.pool_mode,
                ..crate::config::PoolConfig::default()
            },
            backends: backend_configs.clone(),
            users: vec![UserConfig {
                name: DEMO_USER.to_owned(),
                password: None,
                password_file: None,
                password_env: None,
            }],
            replication: (!options.proxy_only).then(|| ReplicationConfig {
                user: DEMO_USER.to_owned(),
                password: None,
                password_file: None,
                password_env: None,
                database: options.database.clone(),
                poll_interval_ms: 50,
                // (Its backends have slots and walsenders to spare.)
                replicate_created_databases: true,
                ..ReplicationConfig::default()
            }),
            cluster: (!options.proxy_only).then(|| ClusterConfig {
                raft_listen: ([127, 0, 0, 1], raft_port(i)).into(),
                secret: secret.clone(),
                secret_file: None,
                secret_env: None,
                accept_secret: None,
                accept_secret_file: None,
                accept_secret_env: None,
                tls_cert: None,
                tls_key: None,
                tls_ca: None,
                tls: None,
                data_dir: base.join(format!("raft{i}")),
                members: members.clone(),
                heartbeat_ms: 100,
                election_timeout_min_ms: 1000,
                election_timeout_max_ms: 2000,
                snapshot_every: 1000,
                keep_logs: 1000,
                ddl_timeout_ms: 10_000,
                ddl_lock_timeout_ms: 60_000,
                ddl_lease_ms: 60_000,
                node_lease_ms: 3_000,
                sequence_kind: Default::default(),
                galloc_range_size: crate::config::DEFAULT_GALLOC_RANGE,
                galloc_refill_percent: 50,
                galloc_switch_percent: 10,
            }),
            auth: vec![AuthRule {
                user: "all".to_owned(),
                database: "all".to_owned(),
                address: Some("127.0.0.0/8".parse().context("loopback network")?),
                method: AuthMethod::Trust,
            }],
        };
        config.validate()?;
        let path = base.join(format!("node{i}.toml"));
        write_config(&config, &path)?;
        let node = Node::new(config)?;
        // RELOAD reads the file written here. The demo's nodes share one
        // process and its log: RUST_LOG sets the level for all of them.
        node.set_reloader(crate::node::Reloader {
            path: path.clone(),
            set_log_level: Box::new(|level| match level {
                None => Ok(()),
                Some(_) => Err("the demo's nodes share one log: set RUST_LOG instead".into()),
            }),
        });
        config_paths.push(path);
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
            .await
            .with_context(|| format!("binding node {i} to port {port}"))?;
        let mut stop = stop_rx.clone();
        let handle = tokio::spawn(server::run_node_with(listener, node, async move {
            let _ = stop.wait_for(|s| *s).await;
        }));
        nodes.push(handle);
        metrics_ports.push(metrics_port);
    }
    // Give the metrics listeners a moment to bind before announcing them.
    tokio::time::sleep(std::time::Duration::from_millis(50)).await;

    for i in 1..=options.nodes {
        println!(
            "node {i}: postgres://{DEMO_USER}@127.0.0.1:{}/{}",
            options.port + i - 1,
            options.database
        );
    }
    for (i, pg) in backends.iter().enumerate() {
        println!("backend {}: {}", i + 1, pg.url(&options.database));
    }
    for (i, port) in metrics_ports.iter().enumerate() {
        println!("metrics {}: http://127.0.0.1:{port}/metrics", i + 1);
    }
    for (i, path) in config_paths.iter().enumerate() {
        println!("config {}: {}", i + 1, path.display());
    }
    let signals = StopSignals::install()?;
    println!("ready");
    eprintln!(
        "chorus demo: connect with e.g. `psql postgres://{DEMO_USER}@127.0.0.1:{}/{}`; \
         writes made through any node (or directly on any backend) and DDL made through any node replicate to every backend. \
         Stop with Ctrl-C.",
        options.port,
        options.database
    );

    signals.wait().await;
    eprintln!("chorus demo: stopping");
    stop_tx.send_replace(true);
    for handle in nodes {
        if let Ok(Err(e)) = handle.await {
            eprintln!("chorus demo: node error: {e}");
        }
    }
    // Every node has stopped; stopping the backends may block briefly.
    drop(backends);
    if options.keep {
        eprintln!("chorus demo: kept {}", base.display());
        if let Some(temp) = _temp {
            let _ = temp.keep();
        }
    } else if options.dir.is_some() {
        // Remove only what the demo made: its backends' directories, and the
        // base directory if the demo created it.
        for i in 1..=options.nodes {
            let dir = base.join(format!("pg{i}"));
            std::fs::remove_dir_all(&dir).with_context(|| format!("removing {}", dir.display()))?;
            let raft = base.join(format!("raft{i}"));
            if raft.exists() {
                std::fs::remove_dir_all(&raft)
                    .with_context(|| format!("removing {}", raft.display()))?;
            }
            let _ = std::fs::remove_file(base.join(format!("node{i}.toml")));
        }
        if created_base {
            let _ = std::fs::remove_dir(&base);
        }
    }
    Ok(())
}

/// Write a node's configuration where `chorus check --config`, `chorus
/// reconcile --config` and the other commands can read it (readable by
/// its owner only: it holds the cluster's secret).
fn write_config(config: &Config, path: &std::path::Path) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let text = toml::to_string(config).context("writing a node's configuration as TOML")?;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    file.write_all(text.as_bytes())
        .with_context(|| format!("writing {}", path.display()))
}

/// SIGINT and SIGTERM, caught from the moment this is made (make it
/// before announcing readiness: a signal that arrives earlier would
/// otherwise kill the process).
pub struct StopSignals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
}

impl StopSignals {
    pub fn install() -> anyhow::Result<StopSignals> {
        use tokio::signal::unix::{signal, SignalKind};
        Ok(StopSignals {
            term: signal(SignalKind::terminate()).context("installing SIGTERM handler")?,
            int: signal(SignalKind::interrupt()).context("installing SIGINT handler")?,
        })
    }

    /// Wait for either signal.
    pub async fn wait(mut self) {
        tokio::select! {
            _ = self.term.recv() => {}
            _ = self.int.recv() => {}
        }
    }
}

/// Make `database` on a fresh backend.
async fn create_database(pg: &LocalPostgres, database: &str) -> anyhow::Result<()> {
    let (client, connection) =
        tokio_postgres::connect(&pg.conninfo("postgres"), tokio_postgres::NoTls).await?;
    tokio::spawn(connection);
    client
        .batch_execute(&format!(
            "CREATE DATABASE \"{}\"",
            database.replace('"', "\"\"")
        ))
        .await?;
    Ok(())
}
