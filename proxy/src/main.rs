//! The `chorus` binary: run a node from a config file, or a local demo cluster.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use chorus_proxy::config::Config;
use chorus_proxy::demo::{self, DemoOptions};
use chorus_proxy::server::{self, Node};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "chorus",
    version,
    about = "Active-active PostgreSQL through a wire-protocol proxy"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run one Chorus node.
    Run {
        /// Configuration file (see chorus.example.toml).
        #[arg(long, short)]
        config: PathBuf,
        /// Override node.listen.
        #[arg(long)]
        listen: Option<SocketAddr>,
        /// Override node.metrics_listen.
        #[arg(long)]
        metrics_listen: Option<SocketAddr>,
        /// Override node.id.
        #[arg(long)]
        node_id: Option<u16>,
        /// Override node.home_backend.
        #[arg(long)]
        home_backend: Option<String>,
    },
    /// Adopt existing tables for replication on every backend of the
    /// cluster (they must exist with the same rows everywhere). A table
    /// without a primary key is refused unless --keyless.
    Adopt {
        /// Configuration file of any node of the cluster.
        #[arg(long, short)]
        config: PathBuf,
        /// Adopt tables without a primary key: peers find the rows an
        /// update or delete changed by their content.
        #[arg(long)]
        keyless: bool,
        /// Tables, optionally schema-qualified.
        #[arg(required = true)]
        tables: Vec<String>,
    },
    /// Read a plain PostgreSQL database before adopting it and list what
    /// behaves differently once several nodes write to it, each with what
    /// Chorus does about it. Reads the catalog only.
    Assess {
        /// Connection string of the database (libpq key=value or URL).
        #[arg(long)]
        dsn: String,
        /// Print JSON instead of the readable report.
        #[arg(long)]
        json: bool,
    },
    /// Make existing local sequences (of adopted tables, say) global on
    /// every backend: values already handed out stay below every later one.
    ConvertSequences {
        /// Configuration file of any node of the cluster.
        #[arg(long, short)]
        config: PathBuf,
        /// Kind for bigint sequences ("snowflake" or "galloc"); others
        /// become galloc. Default: the config's cluster.sequence_kind.
        #[arg(long)]
        kind: Option<String>,
        /// Sequences, optionally schema-qualified.
        #[arg(required = true)]
        sequences: Vec<String>,
    },
    /// Copy between the backends that answer every row one has newer
    /// than another (last writer wins): after a backend is lost for good,
    /// its changes that reached only some survivors reach all of them.
    /// Nodes do it themselves after replication.reconcile_after_ms.
    Reconcile {
        /// Configuration file of any node of the cluster.
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Compare the rows of every replicated table (or of --table) on every
    /// backend; exits with 1 when some differ. Reads each table in one
    /// snapshot per backend and blocks no writer.
    Check {
        /// Configuration file of any node of the cluster.
        #[arg(long, short)]
        config: PathBuf,
        /// Only this table (repeatable).
        #[arg(long = "table")]
        tables: Vec<String>,
        /// Reconcile the tables that differ (the newest version wins, as in
        /// the apply), then compare them again.
        #[arg(long)]
        repair: bool,
        /// How long differing rows are read again before they count (a row
        /// still on its way is not a difference).
        #[arg(long, default_value_t = 5000)]
        settle_ms: u64,
        /// Print JSON instead of the readable report.
        #[arg(long)]
        json: bool,
        /// Also write the result as Prometheus metrics to this file (for
        /// node_exporter's textfile collector).
        #[arg(long)]
        metrics_file: Option<PathBuf>,
        /// The replicated database to compare (default: the configuration's
        /// `replication.database`).
        #[arg(long)]
        database: Option<String>,
    },
    /// Copy a new backend (announced with the admin console's ADD BACKEND)
    /// from a peer while the cluster takes writes: the console's JOIN, sent
    /// to the node the configuration describes, with its progress.
    Join(CopyArgs),
    /// Copy a backend of the cluster again from a peer (the console's
    /// REJOIN), with its progress.
    Rejoin(CopyArgs),
    /// Change the cluster's Raft membership, through any running node.
    Cluster {
        #[command(subcommand)]
        change: ClusterChange,
    },
    /// Start a throwaway local cluster: N PostgreSQL backends (made with this
    /// machine's initdb) and N Chorus nodes; stop with Ctrl-C.
    Demo {
        /// Number of nodes and backends.
        #[arg(long, default_value_t = 3)]
        nodes: u16,
        /// Port of node 1; node i listens on port + i - 1, its metrics on
        /// port + 100 + i - 1.
        #[arg(long, default_value_t = 6432)]
        port: u16,
        /// Directory for the backends' data (default: a new temporary directory).
        #[arg(long)]
        dir: Option<PathBuf>,
        /// Keep the data directory after stopping.
        #[arg(long)]
        keep: bool,
        /// Run the nodes as plain proxies, without replication.
        #[arg(long)]
        proxy_only: bool,
        /// The database that replicates (made on every backend when it is
        /// not "postgres").
        #[arg(long, default_value = "postgres")]
        database: String,
        /// "session" (a client keeps its server connection) or
        /// "transaction" (server connections are shared between
        /// transactions).
        #[arg(long, default_value = "session", value_parser = parse_pool_mode)]
        pool_mode: chorus_proxy::config::PoolMode,
    },
}

fn parse_pool_mode(text: &str) -> Result<chorus_proxy::config::PoolMode, String> {
    match text {
        "session" => Ok(chorus_proxy::config::PoolMode::Session),
        "transaction" => Ok(chorus_proxy::config::PoolMode::Transaction),
        other => Err(format!("\"{other}\": expected session or transaction")),
    }
}

/// The arguments of `chorus join` and `chorus rejoin`.
#[derive(clap::Args)]
struct CopyArgs {
    /// Configuration file of the node to ask (its `node.listen`).
    #[arg(long, short)]
    config: PathBuf,
    /// The backend to copy.
    #[arg(long)]
    backend: String,
    /// The backend to copy it from.
    #[arg(long)]
    from: String,
    /// The admin role (default: the first of `node.admin_users`; its
    /// password from `[[users]]`, else `PGPASSWORD`).
    #[arg(long)]
    user: Option<String>,
}

#[derive(Subcommand)]
enum ClusterChange {
    /// Add a node (started with the same cluster secret, not in the initial
    /// members) as a voter.
    AddNode {
        /// Configuration file of a node of the cluster (its
        /// `cluster.raft_listen` is asked, with its `cluster.secret`).
        #[arg(long, short)]
        config: PathBuf,
        /// The new node's id.
        #[arg(long)]
        id: u16,
        /// The new node's `cluster.raft_listen` address.
        #[arg(long)]
        raft: String,
    },
    /// Remove a node from the voters.
    RemoveNode {
        #[arg(long, short)]
        config: PathBuf,
        #[arg(long)]
        id: u16,
        /// The backend leaving with the node (already taken out of every
        /// node's `[[backends]]`): the replication slots streaming to it are
        /// dropped on every backend, so that they keep no WAL for it.
        #[arg(long)]
        backend: Option<String>,
    },
}

/// `chorus join` and `chorus rejoin`: the console's `word` for the
/// backend `args` name, through the node its configuration describes.
fn copy_backend(
    runtime: &tokio::runtime::Runtime,
    word: &str,
    args: &CopyArgs,
) -> anyhow::Result<()> {
    let config = Config::load(&args.config)?;
    let quote = |name: &str| format!("\"{}\"", name.replace('"', ""));
    let command = format!("{word} {} FROM {}", quote(&args.backend), quote(&args.from));
    runtime.block_on(chorus_proxy::ops::copy::run(
        &config,
        args.user.as_deref(),
        &command,
    ))?;
    Ok(())
}

/// The log filter a process starts with: `RUST_LOG`, else info.
fn start_filter() -> tracing_subscriber::EnvFilter {
    tracing_subscriber::EnvFilter::try_from_default_env()
        // openraft narrates every election at info level.
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,openraft=warn"))
}

fn main() -> anyhow::Result<()> {
    use tracing_subscriber::prelude::*;
    // (Reloadable: a node's `node.log_level`, again at RELOAD.)
    let (filter, log_filter) = tracing_subscriber::reload::Layer::new(start_filter());
    tracing_subscriber::registry()
        .with(filter)
        .with(tracing_subscriber::fmt::layer().with_writer(std::io::stderr))
        .init();
    let cli = Cli::parse();
    // The main runtime accepts connections and serves metrics; sessions run
    // on the node's own worker threads (see server::run).
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    match cli.command {
        Command::Run {
            config: path,
            listen,
            metrics_listen,
            node_id,
            home_backend,
        } => {
            let mut config = Config::load(&path)?;
            if let Some(listen) = listen {
                config.node.listen = listen;
            }
            if metrics_listen.is_some() {
                config.node.metrics_listen = metrics_listen;
            }
            if let Some(id) = node_id {
                config.node.id = id;
            }
            if home_backend.is_some() {
                config.node.home_backend = home_backend;
            }
            config.validate()?;
            let set_log_level = move |level: Option<&str>| -> Result<(), String> {
                let filter = match level {
                    Some(level) => {
                        tracing_subscriber::EnvFilter::try_new(level).map_err(|e| e.to_string())?
                    }
                    None => start_filter(),
                };
                log_filter.reload(filter).map_err(|e| e.to_string())
            };
            set_log_level(config.node.log_level.as_deref())
                .map_err(|e| anyhow::anyhow!("node.log_level: {e}"))?;
            runtime.block_on(async {
                let signals = demo::StopSignals::install()?;
                let node = Node::new(config)?;
                node.set_reloader(chorus_proxy::node::Reloader {
                    path,
                    set_log_level: Box::new(set_log_level),
                });
                // SIGHUP reloads, as RELOAD on the admin console does.
                let mut hangups =
                    tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
                        .context("installing SIGHUP handler")?;
                let reloading = node.clone();
                tokio::spawn(async move {
                    while hangups.recv().await.is_some() {
                        if let Err(e) = reloading.reload() {
                            tracing::error!(error = %e, "configuration not reloaded");
                        }
                    }
                });
                server::run_node(node, signals.wait()).await?;
                anyhow::Ok(())
            })
        }
        Command::Join(args) => copy_backend(&runtime, "JOIN", &args),
        Command::Rejoin(args) => copy_backend(&runtime, "REJOIN", &args),
        Command::Adopt {
            config,
            keyless,
            tables,
        } => {
            let config = Config::load(&config)?;
            let adopted =
                runtime.block_on(chorus_proxy::ops::admin::adopt(&config, &tables, keyless))?;
            for name in adopted {
                println!("adopted {name} on {} backends", config.backends.len());
            }
            Ok(())
        }
        Command::ConvertSequences {
            config,
            kind,
            sequences,
        } => {
            let config = Config::load(&config)?;
            let cluster = config
                .cluster
                .as_ref()
                .context("the configuration has no [cluster] section")?;
            let kind = kind.unwrap_or_else(|| cluster.sequence_kind.as_str().to_owned());
            anyhow::ensure!(
                kind == "snowflake" || kind == "galloc",
                "--kind must be snowflake or galloc"
            );
            let converted = runtime.block_on(chorus_proxy::ops::admin::convert_sequences(
                &config,
                &sequences,
                &kind,
                cluster.galloc_range_size,
            ))?;
            for name in converted {
                println!("converted {name} on {} backends", config.backends.len());
            }
            Ok(())
        }
        Command::Assess { dsn, json } => {
            let assessment = runtime.block_on(async {
                let (client, connection) = tokio_postgres::connect(&dsn, tokio_postgres::NoTls)
                    .await
                    .with_context(|| "connecting to --dsn".to_owned())?;
                tokio::spawn(connection);
                anyhow::Ok(chorus_proxy::ops::assess::assess(&client).await?)
            })?;
            if json {
                println!("{}", serde_json::to_string_pretty(&assessment)?);
            } else {
                print!("{}", assessment.render());
            }
            Ok(())
        }
        Command::Check {
            config,
            tables,
            repair,
            settle_ms,
            json,
            metrics_file,
            database,
        } => {
            let mut config = Config::load(&config)?;
            if let (Some(database), Some(replication)) = (database, config.replication.as_mut()) {
                replication.database = database;
            }
            let options = chorus_proxy::ops::check::CheckOptions {
                settle: std::time::Duration::from_millis(settle_ms),
                ..Default::default()
            };
            let report = runtime.block_on(chorus_proxy::ops::admin::check(
                &config, &tables, options, repair,
            ))?;
            if let Some(path) = metrics_file {
                std::fs::write(&path, report.metrics())
                    .with_context(|| format!("writing {}", path.display()))?;
            }
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                print!("{}", report.render());
            }
            if !report.differences.is_empty() {
                std::process::exit(1);
            }
            Ok(())
        }
        Command::Reconcile { config } => {
            let config = Config::load(&config)?;
            let (report, missing) =
                runtime.block_on(chorus_proxy::ops::admin::reconcile(&config))?;
            if !missing.is_empty() {
                println!("not reached: {}", missing.join(", "));
            }
            println!(
                "reconciled {} tables on {} backends: {} rows copied",
                report.tables,
                config.backends.len() - missing.len(),
                report.rows
            );
            Ok(())
        }
        Command::Cluster { change } => {
            let (config, add, remove, leaving) = match change {
                ClusterChange::AddNode { config, id, raft } => {
                    (config, Some((u64::from(id), raft)), None, None)
                }
                ClusterChange::RemoveNode {
                    config,
                    id,
                    backend,
                } => (config, None, Some(u64::from(id)), backend),
            };
            let config = Config::load(&config)?;
            let cluster = config
                .cluster
                .as_ref()
                .context("the configuration has no [cluster] section")?;
            let answer = runtime.block_on(chorus_consensus::admin_request(
                &cluster.raft_listen.to_string(),
                &cluster.secret,
                cluster.tls.as_ref(),
                add,
                remove,
                std::time::Duration::from_secs(60),
            ));
            match answer {
                Ok(text) => println!("{text}"),
                Err(e) => anyhow::bail!("membership change failed: {e}"),
            }
            if let Some(leaving) = leaving {
                let (dropped, missing) =
                    runtime.block_on(chorus_proxy::ops::admin::drop_slots_of(&config, &leaving))?;
                for slot in &dropped {
                    println!("dropped slot {slot}");
                }
                if dropped.is_empty() {
                    println!("no slot of {leaving} found");
                }
                if !missing.is_empty() {
                    println!("not reached: {}", missing.join(", "));
                }
            }
            Ok(())
        }
        Command::Demo {
            nodes,
            port,
            dir,
            keep,
            proxy_only,
            database,
            pool_mode,
        } => runtime.block_on(demo::run(DemoOptions {
            nodes,
            port,
            dir,
            keep,
            proxy_only,
            database,
            pool_mode,
        })),
    }
}
