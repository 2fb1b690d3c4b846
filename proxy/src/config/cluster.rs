//! The cluster's part of a node's configuration: its Raft membership
//! (`[cluster]`) and replication (`[replication]`), with commit scopes.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// This node's membership in the cluster's Raft group.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterConfig {
    /// Where this node's Raft RPC listens.
    pub raft_listen: SocketAddr,
    /// The secret every node of the cluster shares; Raft connections from
    /// anyone without it are refused. Or from a file (`secret_file`) or an
    /// environment variable (`secret_env`): exactly one of the three.
    #[serde(default)]
    pub secret: String,
    #[serde(default)]
    pub secret_file: Option<PathBuf>,
    #[serde(default)]
    pub secret_env: Option<String>,
    /// Another secret this node accepts from other nodes, but never proves
    /// itself with: for rotating the secret without a pause (see
    /// docs/security.md). Also from `accept_secret_file` or
    /// `accept_secret_env`.
    #[serde(default)]
    pub accept_secret: Option<String>,
    #[serde(default)]
    pub accept_secret_file: Option<PathBuf>,
    #[serde(default)]
    pub accept_secret_env: Option<String>,
    /// TLS for Raft RPC: this node's certificate and key, and the CA
    /// certificates every node's certificate leads to (PEM files; all
    /// three or none, and every node of the cluster alike). Each node
    /// checks that the other's certificate comes from that CA, and a
    /// connecting node that it names the host of the address it dialled.
    #[serde(default)]
    pub tls_cert: Option<PathBuf>,
    #[serde(default)]
    pub tls_key: Option<PathBuf>,
    #[serde(default)]
    pub tls_ca: Option<PathBuf>,
    /// The TLS material loaded from those files.
    #[serde(skip)]
    pub tls: Option<chorus_consensus::RaftTls>,
    /// Where the Raft log and snapshots are kept.
    pub data_dir: PathBuf,
    /// The voters a new cluster starts with, the same list on every node.
    /// A node not in it waits to be added with `chorus cluster add-node`.
    #[serde(default)]
    pub members: Vec<MemberConfig>,
    /// Default 100 ms.
    #[serde(default = "default_heartbeat")]
    pub heartbeat_ms: u64,
    /// A follower that hears no leader for a random time between these
    /// starts an election. Default 1000 and 2000 ms.
    #[serde(default = "default_election_min")]
    pub election_timeout_min_ms: u64,
    #[serde(default = "default_election_max")]
    pub election_timeout_max_ms: u64,
    /// A snapshot is taken every this many log entries. Default 1000.
    #[serde(default = "default_snapshot_every")]
    pub snapshot_every: u64,
    /// Log entries kept behind a snapshot. Default 1000.
    #[serde(default = "default_snapshot_every")]
    pub keep_logs: u64,
    /// How long a DDL statement may wait for a Raft majority and for its
    /// application before the client gets an error. Default 10 s.
    #[serde(default = "default_ddl_timeout")]
    pub ddl_timeout_ms: u64,
    /// How long a transaction's DDL waits for another transaction with
    /// DDL (which holds the cluster's DDL lease until it ends) before it
    /// fails with 55P03, as a lock wait under `lock_timeout` would. On one
    /// PostgreSQL, DDL on unrelated objects would not wait at all; a
    /// migration's long transaction should not fail every other DDL after
    /// a few seconds. Default 60 s.
    #[serde(default = "default_ddl_lock_timeout")]
    pub ddl_lock_timeout_ms: u64,
    /// A transaction with DDL holds the cluster's DDL lease from its first
    /// DDL statement to its end. If its node dies meanwhile, the lease
    /// passes to another holder after this long. Default 60 s.
    #[serde(default = "default_ddl_lease")]
    pub ddl_lease_ms: u64,
    /// A node that has not answered the Raft leader for this long loses
    /// its replication duties to a live node until it is back. Default 3 s.
    #[serde(default = "default_node_lease")]
    pub node_lease_ms: u64,
    /// What bigint sequences made by DDL through this node become:
    /// "snowflake" (default) or "galloc" (a session's `SET
    /// chorus.sequence_kind` overrides it). Int and smallint ones are galloc.
    #[serde(default)]
    pub sequence_kind: SequenceKind,
    /// Values in a galloc range (capped at 1/128 of the type's range).
    /// Default 1 000 000.
    #[serde(default = "default_galloc_range")]
    pub galloc_range_size: i64,
    /// The next range is fetched when less than this percentage of the
    /// current one is left. Default 50.
    #[serde(default = "default_galloc_refill")]
    pub galloc_refill_percent: u8,
    /// The sequence moves to the fetched range when less than this
    /// percentage is left (the rest is not used). Default 10.
    #[serde(default = "default_galloc_switch")]
    pub galloc_switch_percent: u8,
}

/// The kind of a global sequence.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum SequenceKind {
    #[default]
    Snowflake,
    Galloc,
}

impl SequenceKind {
    pub fn as_str(self) -> &'static str {
        match self {
            SequenceKind::Snowflake => "snowflake",
            SequenceKind::Galloc => "galloc",
        }
    }
}

fn default_ddl_lease() -> u64 {
    60_000
}
/// Values in a galloc range unless `galloc_range_size` says otherwise
/// (the backend SQL's fallback for `chorus.sequence_block` is the same; a
/// test checks it).
pub const DEFAULT_GALLOC_RANGE: i64 = 1_000_000;

fn default_galloc_range() -> i64 {
    DEFAULT_GALLOC_RANGE
}
fn default_galloc_refill() -> u8 {
    50
}
fn default_galloc_switch() -> u8 {
    10
}

/// One initial voter.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct MemberConfig {
    pub id: u16,
    /// Its `raft_listen` address.
    pub raft: String,
}

fn default_heartbeat() -> u64 {
    100
}
fn default_election_min() -> u64 {
    1000
}
fn default_election_max() -> u64 {
    2000
}
fn default_snapshot_every() -> u64 {
    1000
}
fn default_ddl_timeout() -> u64 {
    10_000
}
fn default_ddl_lock_timeout() -> u64 {
    60_000
}

fn default_node_lease() -> u64 {
    3_000
}

impl ClusterConfig {
    /// The consensus settings of node `id`.
    pub fn consensus(&self, id: u16) -> chorus_consensus::ConsensusConfig {
        chorus_consensus::ConsensusConfig {
            id: u64::from(id),
            listen: self.raft_listen,
            secret: self.secret.clone(),
            also_accepted: self.accept_secret.iter().cloned().collect(),
            tls: self.tls.clone(),
            dir: self.data_dir.clone(),
            members: self
                .members
                .iter()
                .map(|m| (u64::from(m.id), m.raft.clone()))
                .collect(),
            heartbeat: Duration::from_millis(self.heartbeat_ms),
            election_timeout: (
                Duration::from_millis(self.election_timeout_min_ms),
                Duration::from_millis(self.election_timeout_max_ms),
            ),
            snapshot_every: self.snapshot_every,
            keep_logs: self.keep_logs,
        }
    }
}

/// How this node replicates its home backend's changes to the others.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ReplicationConfig {
    /// Role Chorus uses on every backend to install its schema, read
    /// changes and apply them (needs superuser for the event trigger and
    /// replication slots). Default "postgres".
    #[serde(default = "default_replication_user")]
    pub user: String,
    /// Its password, if the backends ask for one; or from a file
    /// (`password_file`) or an environment variable (`password_env`).
    #[serde(default)]
    pub password: Option<String>,
    #[serde(default)]
    pub password_file: Option<PathBuf>,
    #[serde(default)]
    pub password_env: Option<String>,
    /// The database that replicates. Default "postgres".
    #[serde(default = "default_replication_database")]
    pub database: String,
    /// Other databases sessions may use, each backend's copy on its own
    /// (not replicated). A session to any other database is refused, so
    /// that nothing is written to one backend only. Default none.
    #[serde(default)]
    pub local_databases: Vec<String>,
    /// Further databases replicated as `database` is, each on its own:
    /// its changes and DDL apply in the same database on every backend.
    /// Each must exist on every backend. Default none.
    #[serde(default)]
    pub databases: Vec<String>,
    /// Whether a database created through Chorus (`CREATE DATABASE`)
    /// replicates from then on, unless `local_databases` lists it, under
    /// its name of the moment, until it is dropped (see
    /// cluster::databases). Default false: each takes slots and
    /// walsenders on every backend.
    #[serde(default)]
    pub replicate_created_databases: bool,
    /// How often an idle stream asks its walsender how far it has sent
    /// (changes arrive without asking), doubling while nothing happens up
    /// to a second. Default 100 ms.
    #[serde(default = "default_poll_interval")]
    pub poll_interval_ms: u64,
    /// Commit scope of sessions that do not `SET chorus.commit_scope`.
    /// Default "local".
    #[serde(default)]
    pub commit_scope: CommitScope,
    /// How long a commit waits for its scope. Default 10 s.
    #[serde(default = "default_commit_scope_timeout")]
    pub commit_scope_timeout_ms: u64,
    /// What the client gets when that time runs out (the transaction has
    /// committed on its home backend either way). Default "error".
    #[serde(default)]
    pub commit_scope_timeout_action: TimeoutAction,
    /// Once a backend has been down this long, the Raft leader's node
    /// reconciles the backends that are up (see cluster/reconcile.rs), so that a
    /// change of the lost backend's that only some of them got reaches the
    /// others. 0: never. Default 30 s.
    #[serde(default = "default_reconcile_after")]
    pub reconcile_after_ms: u64,
    /// A slot of the home backend that keeps more WAL than this for a peer
    /// (a peer down or far behind) is logged at WARN, again every minute
    /// while it does. 0: never. Default 1 GiB.
    #[serde(default = "default_slot_retained_warn")]
    pub slot_retained_warn_bytes: u64,
    /// How often a node prunes the tombstones of the backends it drives,
    /// and sends their horizons to the other backends (see tombstones.sql).
    /// 0: never (tombstones are then kept for good). Default 60 s.
    #[serde(default = "default_prune_interval")]
    pub prune_interval_ms: u64,
    /// How much older than its backend's clock a transaction's stamp may
    /// be: a tombstone is kept at least this long. A write stamped longer
    /// ago (a session's stamp left from an earlier write) gets a newer
    /// version. Default 300 s.
    #[serde(default = "default_tombstone_min_age")]
    pub tombstone_min_age_ms: u64,
    /// Control connections a node keeps to each backend, per replicated
    /// database, for its short questions (health checks, DDL progress, the
    /// admin console; see backend/control.rs). Default 4.
    #[serde(default = "default_control_pool_size")]
    pub control_pool_size: usize,
}

fn default_control_pool_size() -> usize {
    4
}

fn default_prune_interval() -> u64 {
    60_000
}

fn default_tombstone_min_age() -> u64 {
    300_000
}

fn default_reconcile_after() -> u64 {
    30_000
}

fn default_slot_retained_warn() -> u64 {
    1 << 30
}

impl ReplicationConfig {
    /// Every replicated database: `database` first, then `databases`.
    pub fn replicated_databases(&self) -> impl Iterator<Item = &str> {
        std::iter::once(self.database.as_str()).chain(
            self.databases
                .iter()
                .map(String::as_str)
                .filter(|d| *d != self.database),
        )
    }

    /// Whether the configuration names `database` as replicated (the main
    /// database or one of `databases`).
    pub fn names(&self, database: &str) -> bool {
        self.replicated_databases().any(|d| d == database)
    }

    /// These settings for replicating `database`.
    pub fn for_database(&self, database: &str) -> ReplicationConfig {
        ReplicationConfig {
            database: database.to_owned(),
            ..self.clone()
        }
    }
}

impl Default for ReplicationConfig {
    /// The values an empty `[replication]` section gets.
    fn default() -> Self {
        ReplicationConfig {
            user: default_replication_user(),
            password: None,
            password_file: None,
            password_env: None,
            database: default_replication_database(),
            local_databases: Vec::new(),
            databases: Vec::new(),
            replicate_created_databases: false,
            poll_interval_ms: default_poll_interval(),
            commit_scope: CommitScope::default(),
            commit_scope_timeout_ms: default_commit_scope_timeout(),
            commit_scope_timeout_action: TimeoutAction::default(),
            reconcile_after_ms: default_reconcile_after(),
            slot_retained_warn_bytes: default_slot_retained_warn(),
            prune_interval_ms: default_prune_interval(),
            tombstone_min_age_ms: default_tombstone_min_age(),
            control_pool_size: default_control_pool_size(),
        }
    }
}

/// How many backends must have applied a transaction before its commit is
/// acknowledged.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum CommitScope {
    /// The home backend only.
    #[default]
    Local,
    /// More than half of all backends, the home backend included.
    Majority,
    /// Every backend.
    All,
}

impl CommitScope {
    pub fn parse(text: &str) -> Option<CommitScope> {
        match text.to_ascii_lowercase().as_str() {
            "local" => Some(CommitScope::Local),
            "majority" => Some(CommitScope::Majority),
            "all" => Some(CommitScope::All),
            _ => None,
        }
    }

    /// Backends (of `total`) that must have the transaction.
    pub fn required(self, total: usize) -> usize {
        match self {
            CommitScope::Local => 1,
            CommitScope::Majority => total / 2 + 1,
            CommitScope::All => total,
        }
    }
}

/// What a commit whose scope timed out reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum TimeoutAction {
    /// An ERROR with SQLSTATE 40003 (statement completion unknown).
    #[default]
    Error,
    /// A WARNING; the commit is acknowledged.
    Warning,
}

fn default_commit_scope_timeout() -> u64 {
    10_000
}

fn default_replication_user() -> String {
    "postgres".to_owned()
}
fn default_replication_database() -> String {
    "postgres".to_owned()
}
fn default_poll_interval() -> u64 {
    100
}
