//! Typed configuration of one Chorus node, read from TOML.
//!
//! Every option has a documented default; `chorus.example.toml` at the
//! repository root shows and explains each one. Unknown keys are errors, so
//! a typo never silently falls back to a default.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};
use thiserror::Error;

mod backend_tls;
pub use backend_tls::{BackendTls, SslMode};
mod pool;
pub use pool::{PoolConfig, PoolMode, ReadRouting};
mod cluster;
pub use cluster::{
    ClusterConfig, CommitScope, MemberConfig, ReplicationConfig, SequenceKind, TimeoutAction,
    DEFAULT_GALLOC_RANGE,
};

/// Why a configuration could not be used.
#[derive(Debug, Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("invalid configuration in {path}: {source}")]
    Parse {
        path: PathBuf,
        source: Box<toml::de::Error>,
    },
    #[error("invalid configuration: {0}")]
    Invalid(String),
}

/// Fill `value` from `file` (its content without the final line break) or
/// from the environment variable `env`; at most one source may be given.
fn resolve_secret(
    what: &str,
    value: &mut Option<String>,
    file: Option<&Path>,
    env: Option<&str>,
    base: Option<&Path>,
) -> Result<(), ConfigError> {
    let given =
        usize::from(value.is_some()) + usize::from(file.is_some()) + usize::from(env.is_some());
    if given > 1 {
        return Err(ConfigError::Invalid(format!(
            "{what}: give it inline, as a file (_file) or as an environment variable (_env), not several"
        )));
    }
    if let Some(file) = file {
        let path = match base {
            Some(base) if file.is_relative() => base.join(file),
            _ => file.to_owned(),
        };
        let text = std::fs::read_to_string(&path).map_err(|e| {
            ConfigError::Invalid(format!("{what}: cannot read {}: {e}", path.display()))
        })?;
        let text = text.strip_suffix('\n').unwrap_or(&text);
        let text = text.strip_suffix('\r').unwrap_or(text);
        *value = Some(text.to_owned());
    }
    if let Some(env) = env {
        *value = Some(std::env::var(env).map_err(|_| {
            ConfigError::Invalid(format!("{what}: the environment variable {env} is not set"))
        })?);
    }
    Ok(())
}

/// The whole configuration file.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub node: NodeConfig,
    /// TLS for client connections; without it SSLRequest is answered 'N'.
    #[serde(default)]
    pub tls: Option<TlsConfig>,
    /// The PostgreSQL servers of the cluster.
    pub backends: Vec<BackendConfig>,
    /// Users the proxy authenticates, with the passwords it also uses to
    /// log in to the backends on their behalf.
    #[serde(default)]
    pub users: Vec<UserConfig>,
    /// Authentication rules, first match wins. Default: SCRAM-SHA-256 for
    /// everyone from everywhere.
    #[serde(default = "default_auth")]
    pub auth: Vec<AuthRule>,
    /// Replication between the backends; without it the node is a plain
    /// proxy to its home backend.
    #[serde(default)]
    pub replication: Option<ReplicationConfig>,
    /// The Raft group of the Chorus nodes (cluster metadata, DDL order);
    /// required with replication.
    #[serde(default)]
    pub cluster: Option<ClusterConfig>,
    /// How client sessions share server connections (session or
    /// transaction pooling).
    #[serde(default)]
    pub pool: PoolConfig,
}

/// Settings of this node.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct NodeConfig {
    /// Node id, unique in the cluster (1..=1023). Default 1.
    #[serde(default = "default_node_id")]
    pub id: u16,
    /// Where clients connect. Default 127.0.0.1:6432.
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
    /// Where `/metrics` and `/health` are served; none when absent.
    #[serde(default)]
    pub metrics_listen: Option<SocketAddr>,
    /// Name of this node's home backend. Default: the first backend.
    #[serde(default)]
    pub home_backend: Option<String>,
    /// Client connections served at once; further clients are refused with
    /// SQLSTATE 53300. Default 1000.
    #[serde(default = "default_max_clients")]
    pub max_client_connections: usize,
    /// Largest message accepted from a client, in bytes. Default 64 MiB.
    #[serde(default = "default_max_message")]
    pub max_message_bytes: usize,
    /// Time a client has to finish startup and authentication. Default 60 s.
    #[serde(default = "default_auth_timeout")]
    pub auth_timeout_ms: u64,
    /// Time to connect and log in to a backend. Default 5 s.
    #[serde(default = "default_connect_timeout")]
    pub backend_connect_timeout_ms: u64,
    /// On SIGTERM/SIGINT, time given to open transactions to finish before
    /// their connections are closed. Default 30 s.
    #[serde(default = "default_shutdown_timeout")]
    pub shutdown_timeout_ms: u64,
    /// Threads serving client sessions (each a single-threaded event loop).
    /// Default: the number of CPUs.
    #[serde(default)]
    pub worker_threads: Option<usize>,
    /// A remote clock more than this far ahead of ours is logged and
    /// counted, and never moves our clock. Default 1000 ms.
    #[serde(default = "default_max_clock_skew")]
    pub max_clock_skew_ms: i64,
    /// Shift this node's clock by this much (tests simulate skewed clocks
    /// with it). Default 0.
    #[serde(default)]
    pub clock_offset_ms: i64,
    /// "local" (default): sessions use the home backend (another one while
    /// it is down). "leader": every session uses the cluster's write
    /// leader, one backend elected through Raft, so writes never conflict;
    /// it moves when that backend goes down.
    #[serde(default)]
    pub routing: Routing,
    /// With replication: how often every backend is checked (a login and
    /// `SELECT 1`). Default 1000 ms.
    #[serde(default = "default_health_interval")]
    pub health_check_interval_ms: u64,
    /// How long a check may take before the backend counts as down.
    /// Default 1000 ms.
    #[serde(default = "default_health_timeout")]
    pub health_check_timeout_ms: u64,
    /// Roles that may log in to the admin console (see ops/console.rs),
    /// after the usual authentication rules. Default: none.
    #[serde(default)]
    pub admin_users: Vec<String>,
    /// The admin console's database name. Default "chorus".
    #[serde(default = "default_admin_database")]
    pub admin_database: String,
    /// What is logged, as a `RUST_LOG` filter (`info`,
    /// `info,chorus_proxy=debug`, …). Default: the `RUST_LOG` environment
    /// variable, else `info,openraft=warn`. Taken again by `RELOAD`.
    #[serde(default)]
    pub log_level: Option<String>,
}

fn default_admin_database() -> String {
    "chorus".to_owned()
}

/// How a node picks the backend of a session.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Routing {
    #[default]
    Local,
    Leader,
}

fn default_health_interval() -> u64 {
    1000
}
fn default_health_timeout() -> u64 {
    1000
}

fn default_max_clock_skew() -> i64 {
    1000
}

/// A PostgreSQL server.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct BackendConfig {
    /// Unique name, used in metrics and by `home_backend`.
    pub name: String,
    /// Host name or address. Default 127.0.0.1.
    #[serde(default = "default_host")]
    pub host: String,
    /// Port. Default 5432.
    #[serde(default = "default_pg_port")]
    pub port: u16,
    /// TLS to this backend, as libpq's `sslmode`: `disable` (default),
    /// `prefer`, `require`, `verify-ca` or `verify-full`.
    #[serde(default)]
    pub sslmode: SslMode,
    /// The CA certificates (PEM) the backend's certificate must lead to;
    /// needed by `verify-ca` and `verify-full`. A relative path is taken
    /// from the configuration file's directory.
    #[serde(default)]
    pub sslrootcert: Option<PathBuf>,
    /// The TLS settings made from `sslmode` and `sslrootcert` when the
    /// configuration is read.
    #[serde(skip)]
    pub tls: Option<BackendTls>,
}

impl BackendConfig {
    /// `host:port`, for connecting.
    pub fn address(&self) -> String {
        format!("{}:{}", self.host, self.port)
    }
}

/// A user known to the proxy.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct UserConfig {
    pub name: String,
    /// Plaintext password: checked for md5 and SCRAM logins to the proxy and
    /// used for the proxy's own login to the backends as this user. Or from
    /// a file (`password_file`) or an environment variable (`password_env`).
    #[serde(default)]
    pub password: Option<String>,
    #[serde(default)]
    pub password_file: Option<PathBuf>,
    #[serde(default)]
    pub password_env: Option<String>,
}

/// TLS certificate and key (PEM files).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// One authentication rule, in the spirit of a pg_hba.conf line.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AuthRule {
    /// User name, a comma-separated list, or "all". Default "all".
    #[serde(default = "default_all")]
    pub user: String,
    /// Database name, a comma-separated list, or "all". Default "all".
    #[serde(default = "default_all")]
    pub database: String,
    /// Client network (CIDR); any address when absent.
    #[serde(default)]
    pub address: Option<IpNet>,
    pub method: AuthMethod,
}

/// How a client proves who it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
pub enum AuthMethod {
    #[serde(rename = "scram-sha-256")]
    ScramSha256,
    #[serde(rename = "md5")]
    Md5,
    #[serde(rename = "trust")]
    Trust,
    #[serde(rename = "reject")]
    Reject,
}

impl Default for NodeConfig {
    /// The values an empty `[node]` section gets.
    fn default() -> Self {
        NodeConfig {
            id: default_node_id(),
            listen: default_listen(),
            metrics_listen: None,
            home_backend: None,
            max_client_connections: default_max_clients(),
            max_message_bytes: default_max_message(),
            auth_timeout_ms: default_auth_timeout(),
            backend_connect_timeout_ms: default_connect_timeout(),
            shutdown_timeout_ms: default_shutdown_timeout(),
            worker_threads: None,
            max_clock_skew_ms: default_max_clock_skew(),
            clock_offset_ms: 0,
            routing: Routing::Local,
            health_check_interval_ms: default_health_interval(),
            health_check_timeout_ms: default_health_timeout(),
            admin_users: Vec::new(),
            admin_database: default_admin_database(),
            log_level: None,
        }
    }
}

fn default_node_id() -> u16 {
    1
}
fn default_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 6432))
}
fn default_max_clients() -> usize {
    1000
}
fn default_max_message() -> usize {
    64 << 20
}
fn default_auth_timeout() -> u64 {
    60_000
}
fn default_connect_timeout() -> u64 {
    5_000
}
fn default_shutdown_timeout() -> u64 {
    30_000
}
fn default_host() -> String {
    "127.0.0.1".to_owned()
}
fn default_pg_port() -> u16 {
    5432
}
fn default_all() -> String {
    "all".to_owned()
}
fn default_auth() -> Vec<AuthRule> {
    vec![AuthRule {
        user: default_all(),
        database: default_all(),
        address: None,
        method: AuthMethod::ScramSha256,
    }]
}

impl Config {
    /// Read and validate a configuration file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        let mut config: Config = toml::from_str(&text).map_err(|source| ConfigError::Parse {
            path: path.to_owned(),
            source: Box::new(source),
        })?;
        config.resolve_secrets(path.parent())?;
        config.resolve_tls(path.parent())?;
        config.validate()?;
        Ok(config)
    }

    /// Parse from a string (tests and generated configs).
    pub fn from_toml(text: &str) -> Result<Config, ConfigError> {
        let mut config: Config = toml::from_str(text).map_err(|source| ConfigError::Parse {
            path: PathBuf::from("<string>"),
            source: Box::new(source),
        })?;
        config.resolve_secrets(None)?;
        config.resolve_tls(None)?;
        config.validate()?;
        Ok(config)
    }

    /// Read the passwords and the cluster secret given as `*_file` (a
    /// relative path is taken from `base`, the configuration file's
    /// directory) or `*_env`. The error names the setting, never the value.
    fn resolve_secrets(&mut self, base: Option<&Path>) -> Result<(), ConfigError> {
        if let Some(cluster) = &mut self.cluster {
            let mut secret = Some(std::mem::take(&mut cluster.secret)).filter(|s| !s.is_empty());
            resolve_secret(
                "cluster.secret",
                &mut secret,
                cluster.secret_file.as_deref(),
                cluster.secret_env.as_deref(),
                base,
            )?;
            cluster.secret = secret.unwrap_or_default();
            resolve_secret(
                "cluster.accept_secret",
                &mut cluster.accept_secret,
                cluster.accept_secret_file.as_deref(),
                cluster.accept_secret_env.as_deref(),
                base,
            )?;
        }
        if let Some(replication) = &mut self.replication {
            resolve_secret(
                "replication.password",
                &mut replication.password,
                replication.password_file.as_deref(),
                replication.password_env.as_deref(),
                base,
            )?;
        }
        for user in &mut self.users {
            resolve_secret(
                &format!("users.{}.password", user.name),
                &mut user.password,
                user.password_file.as_deref(),
                user.password_env.as_deref(),
                base,
            )?;
        }
        Ok(())
    }

    /// Make each backend's TLS settings from its `sslmode` and
    /// `sslrootcert`, and load Raft RPC's TLS material (a relative path is
    /// taken from `base`).
    pub fn resolve_tls(&mut self, base: Option<&Path>) -> Result<(), ConfigError> {
        let within = |file: &PathBuf| match base {
            Some(base) if file.is_relative() => base.join(file),
            _ => file.clone(),
        };
        if let Some(cluster) = &mut self.cluster {
            match (&cluster.tls_cert, &cluster.tls_key, &cluster.tls_ca) {
                (None, None, None) => {}
                (Some(cert), Some(key), Some(ca)) => {
                    let tls = chorus_consensus::RaftTls::from_pem_files(
                        &within(cert),
                        &within(key),
                        &within(ca),
                    )
                    .map_err(|e| ConfigError::Invalid(format!("cluster TLS: {e}")))?;
                    cluster.tls = Some(tls);
                }
                _ => {
                    return Err(ConfigError::Invalid(
                        "cluster: give tls_cert, tls_key and tls_ca together, or none".into(),
                    ))
                }
            }
        }
        for backend in &mut self.backends {
            let root = backend.sslrootcert.as_ref().map(within);
            backend.tls = BackendTls::new(backend.sslmode, root.as_deref(), &backend.host)
                .map_err(|e| ConfigError::Invalid(format!("backend {}: {e}", backend.name)))?;
        }
        Ok(())
    }

    /// Check what serde cannot.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.pool.validate().map_err(ConfigError::Invalid)?;
        if self.backends.is_empty() {
            return Err(ConfigError::Invalid(
                "at least one [[backends]] entry is required".into(),
            ));
        }
        if !(1..=1023).contains(&self.node.id) {
            return Err(ConfigError::Invalid(format!(
                "node.id must be between 1 and 1023, not {}",
                self.node.id
            )));
        }
        for (i, b) in self.backends.iter().enumerate() {
            if self.backends[..i].iter().any(|o| o.name == b.name) {
                return Err(ConfigError::Invalid(format!(
                    "backend name {:?} is used twice",
                    b.name
                )));
            }
        }
        if let Some(home) = &self.node.home_backend {
            if !self.backends.iter().any(|b| &b.name == home) {
                return Err(ConfigError::Invalid(format!(
                    "node.home_backend {home:?} is not a configured backend"
                )));
            }
        }
        if self.node.max_client_connections == 0 {
            return Err(ConfigError::Invalid(
                "node.max_client_connections must be at least 1".into(),
            ));
        }
        if self.node.worker_threads == Some(0) {
            return Err(ConfigError::Invalid(
                "node.worker_threads must be at least 1".into(),
            ));
        }
        if self.node.max_message_bytes < 1024 {
            return Err(ConfigError::Invalid(
                "node.max_message_bytes must be at least 1024".into(),
            ));
        }
        if let Some(replication) = &self.replication {
            let all: Vec<&str> = replication.replicated_databases().collect();
            for (i, database) in all.iter().enumerate() {
                if all[..i].contains(database) {
                    return Err(ConfigError::Invalid(format!(
                        "replication.databases names {database:?} twice"
                    )));
                }
                if replication.local_databases.iter().any(|l| l == database) {
                    return Err(ConfigError::Invalid(format!(
                        "database {database:?} is both replicated and in replication.local_databases"
                    )));
                }
            }
        }
        if self.replication.is_some() && self.cluster.is_none() {
            return Err(ConfigError::Invalid(
                "replication needs a [cluster] section: the nodes' Raft group orders DDL".into(),
            ));
        }
        if let Some(cluster) = &self.cluster {
            if cluster.galloc_range_size < 1
                || cluster.galloc_switch_percent >= cluster.galloc_refill_percent
                || cluster.galloc_refill_percent > 100
            {
                return Err(ConfigError::Invalid(
                    "cluster: need galloc_range_size >= 1 and galloc_switch_percent < galloc_refill_percent <= 100".into(),
                ));
            }
            if cluster.secret.is_empty() {
                return Err(ConfigError::Invalid(
                    "cluster.secret must not be empty".into(),
                ));
            }
            if cluster.election_timeout_min_ms <= cluster.heartbeat_ms
                || cluster.election_timeout_max_ms <= cluster.election_timeout_min_ms
            {
                return Err(ConfigError::Invalid(
                    "cluster: need heartbeat_ms < election_timeout_min_ms < election_timeout_max_ms"
                        .into(),
                ));
            }
        }
        Ok(())
    }

    /// The backend this node serves its sessions from.
    pub fn home_backend(&self) -> &BackendConfig {
        self.node
            .home_backend
            .as_ref()
            .and_then(|name| self.backends.iter().find(|b| &b.name == name))
            .unwrap_or(&self.backends[0])
    }

    /// Look up a user.
    /// The settings `other` changes that a node reads at start only
    /// (see `node::Live` for those `RELOAD` takes), as `section.name`.
    pub fn differs_at_restart(&self, other: &Config) -> Vec<String> {
        const RELOADED: &[&str] = &[
            "node.auth_timeout_ms",
            "node.backend_connect_timeout_ms",
            "node.shutdown_timeout_ms",
            "node.admin_users",
            "node.log_level",
        ];
        let fields = |c: &Config| match serde_json::to_value(c) {
            Ok(serde_json::Value::Object(sections)) => sections,
            _ => serde_json::Map::new(),
        };
        let (before, after) = (fields(self), fields(other));
        let mut changed = Vec::new();
        for (section, was) in &before {
            if section == "users" || section == "auth" {
                continue;
            }
            let now = after.get(section).unwrap_or(&serde_json::Value::Null);
            match (was, now) {
                (serde_json::Value::Object(was), serde_json::Value::Object(now)) => {
                    let mut names: Vec<&String> = was.keys().chain(now.keys()).collect();
                    names.sort();
                    names.dedup();
                    for name in names {
                        let full = format!("{section}.{name}");
                        if was.get(name) != now.get(name) && !RELOADED.contains(&full.as_str()) {
                            changed.push(full);
                        }
                    }
                }
                _ if was != now => changed.push(section.clone()),
                _ => {}
            }
        }
        changed
    }

    pub fn user(&self, name: &str) -> Option<&UserConfig> {
        self.users.iter().find(|u| u.name == name)
    }

    pub fn auth_timeout(&self) -> Duration {
        Duration::from_millis(self.node.auth_timeout_ms)
    }

    pub fn backend_connect_timeout(&self) -> Duration {
        Duration::from_millis(self.node.backend_connect_timeout_ms)
    }

    /// How long DDL may wait for the cluster (`cluster.ddl_timeout_ms`;
    /// 10 s without a cluster).
    pub fn ddl_timeout(&self) -> Duration {
        Duration::from_millis(self.cluster.as_ref().map_or(10_000, |c| c.ddl_timeout_ms))
    }

    /// How long DDL waits for another transaction's DDL lease
    /// (`cluster.ddl_lock_timeout_ms`).
    pub fn ddl_lock_timeout(&self) -> Duration {
        Duration::from_millis(
            self.cluster
                .as_ref()
                .map_or(60_000, |c| c.ddl_lock_timeout_ms),
        )
    }

    /// Number of session worker threads.
    pub fn worker_threads(&self) -> usize {
        self.node
            .worker_threads
            .filter(|&n| n > 0)
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(2, |n| n.get()))
    }

    pub fn shutdown_timeout(&self) -> Duration {
        Duration::from_millis(self.node.shutdown_timeout_ms)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_example_config_is_valid() {
        let text = include_str!("../../../chorus.example.toml");
        let config = Config::from_toml(text).unwrap();
        assert_eq!(config.home_backend().name, "pg1");
        assert!(config.tls.is_none());
    }

    #[test]
    fn a_config_written_out_reads_back_the_same_and_reports_what_waits_for_a_restart() {
        let text = include_str!("../../../chorus.example.toml");
        let config = Config::from_toml(text).unwrap();
        let written = toml::to_string(&config).unwrap();
        let again = Config::from_toml(&written).unwrap();
        assert_eq!(toml::to_string(&again).unwrap(), written);
        assert!(config.differs_at_restart(&again).is_empty());
        let mut changed = again.clone();
        changed.node.auth_timeout_ms += 1;
        changed.node.log_level = Some("debug".into());
        changed.auth.clear();
        assert!(config.differs_at_restart(&changed).is_empty());
        changed.node.max_client_connections += 1;
        changed.backends.pop();
        assert_eq!(
            config.differs_at_restart(&changed),
            ["backends", "node.max_client_connections"]
        );
    }

    #[test]
    fn minimal_config_gets_defaults() {
        let config = Config::from_toml("[node]\n[[backends]]\nname = \"a\"\n").unwrap();
        assert_eq!(config.node.id, 1);
        assert_eq!(config.node.listen.port(), 6432);
        assert_eq!(config.home_backend().port, 5432);
        assert_eq!(config.auth.len(), 1);
        assert_eq!(config.auth[0].method, AuthMethod::ScramSha256);
    }

    #[test]
    fn secrets_come_inline_from_a_file_or_from_the_environment() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("secret"), "from-file\n").unwrap();
        std::fs::write(dir.path().join("pw"), "user-pw\r\n").unwrap();
        // A variable no other test sets.
        std::env::set_var("CHORUS_TEST_REPLICATION_PASSWORD", "from-env");
        let path = dir.path().join("chorus.toml");
        std::fs::write(
            &path,
            format!(
                "[node]\n[[backends]]\nname = \"a\"\n\
                 [[users]]\nname = \"app\"\npassword_file = \"pw\"\n\
                 [replication]\npassword_env = \"CHORUS_TEST_REPLICATION_PASSWORD\"\n\
                 [cluster]\nraft_listen = \"127.0.0.1:1\"\nsecret_file = \"secret\"\ndata_dir = \"{}\"\n",
                dir.path().display()
            ),
        )
        .unwrap();
        let config = Config::load(&path).unwrap();
        assert_eq!(config.cluster.unwrap().secret, "from-file");
        assert_eq!(
            config.replication.unwrap().password.as_deref(),
            Some("from-env")
        );
        assert_eq!(config.users[0].password.as_deref(), Some("user-pw"));
        // Two sources, a missing file, an unset variable: errors that name
        // the setting.
        let base = "[node]\n[[backends]]\nname = \"a\"\n[[users]]\nname = \"app\"\n";
        let two = Config::from_toml(&format!(
            "{base}password = \"x\"\npassword_env = \"HOME\"\n"
        ))
        .unwrap_err()
        .to_string();
        assert!(two.contains("users.app.password"), "{two}");
        let unset = Config::from_toml(&format!("{base}password_env = \"CHORUS_TEST_NEVER_SET\"\n"))
            .unwrap_err()
            .to_string();
        assert!(
            unset.contains("CHORUS_TEST_NEVER_SET is not set"),
            "{unset}"
        );
        let missing = Config::from_toml(&format!("{base}password_file = \"/nonexistent/pw\"\n"))
            .unwrap_err()
            .to_string();
        assert!(missing.contains("cannot read /nonexistent/pw"), "{missing}");
    }

    #[test]
    fn node_default_matches_an_empty_node_section() {
        let parsed = Config::from_toml("[node]\n[[backends]]\nname = \"a\"\n").unwrap();
        let default = NodeConfig::default();
        assert_eq!(format!("{:?}", parsed.node), format!("{default:?}"));
    }

    #[test]
    fn unknown_keys_and_bad_values_are_errors() {
        assert!(
            Config::from_toml("[node]\nlisten_port = 1\n[[backends]]\nname = \"a\"\n").is_err()
        );
        assert!(Config::from_toml("[node]\nid = 0\n[[backends]]\nname = \"a\"\n").is_err());
        assert!(Config::from_toml("[node]\nbackends = []\n").is_err());
        assert!(
            Config::from_toml("[node]\nhome_backend = \"b\"\n[[backends]]\nname = \"a\"\n")
                .is_err()
        );
        assert!(Config::from_toml(
            "[node]\n[[backends]]\nname = \"a\"\n[[auth]]\nmethod = \"password\"\n"
        )
        .is_err());
    }
}
