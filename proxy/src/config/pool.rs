//! The `[pool]` section: how client sessions share server connections.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// When a client's server connection goes back to the pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum PoolMode {
    /// A client keeps one server connection for its whole session.
    #[default]
    Session,
    /// A client holds a server connection for one transaction; between
    /// transactions the connection serves other clients (see
    /// session/pooled.rs for what follows a session from one to the next).
    Transaction,
}

/// Where a pooled session's read-only transactions run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ReadRouting {
    /// On the session's home backend, as its writes.
    #[default]
    Home,
    /// On any healthy backend that has the session's own last write.
    Any,
}

/// How client sessions share server connections.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct PoolConfig {
    /// The default mode. Default "session".
    #[serde(default)]
    pub mode: PoolMode,
    /// The mode of the sessions of a database, by its name.
    #[serde(default)]
    pub databases: BTreeMap<String, PoolMode>,
    /// The mode of the sessions of a user, by its name (over the
    /// database's).
    #[serde(default)]
    pub users: BTreeMap<String, PoolMode>,
    /// In transaction mode: server connections per backend, database and
    /// user. Default 20.
    #[serde(default = "default_size")]
    pub size: usize,
    /// In transaction mode: how long a client waits for a server
    /// connection before its statement fails (SQLSTATE 53300). Default
    /// 120 s.
    #[serde(default = "default_wait")]
    pub query_wait_timeout_ms: u64,
    /// In transaction mode: server connections idle longer than this are
    /// closed. Default 600 s.
    #[serde(default = "default_idle")]
    pub server_idle_timeout_ms: u64,
    /// In transaction mode, with replication: where read-only transactions
    /// run ("home", default, or "any"); a session changes it with `SET
    /// chorus.read_routing`.
    #[serde(default)]
    pub read_routing: ReadRouting,
}

fn default_size() -> usize {
    20
}
fn default_wait() -> u64 {
    120_000
}
fn default_idle() -> u64 {
    600_000
}

impl Default for PoolConfig {
    fn default() -> Self {
        PoolConfig {
            mode: PoolMode::Session,
            databases: BTreeMap::new(),
            users: BTreeMap::new(),
            size: default_size(),
            query_wait_timeout_ms: default_wait(),
            server_idle_timeout_ms: default_idle(),
            read_routing: ReadRouting::Home,
        }
    }
}

impl PoolConfig {
    /// The mode of a session of `user` in `database`: the user's, else the
    /// database's, else the default.
    pub fn mode_for(&self, user: &str, database: &str) -> PoolMode {
        self.users
            .get(user)
            .or_else(|| self.databases.get(database))
            .copied()
            .unwrap_or(self.mode)
    }

    /// Check what serde cannot.
    pub fn validate(&self) -> Result<(), String> {
        if self.size == 0 {
            return Err("pool.size must be at least 1".into());
        }
        if self.query_wait_timeout_ms == 0 {
            return Err("pool.query_wait_timeout_ms must be above 0".into());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_users_mode_wins_over_its_databases() {
        let pool: PoolConfig = toml::from_str(
            "mode = \"session\"\n[databases]\nshop = \"transaction\"\n[users]\nadmin = \"session\"\n",
        )
        .unwrap();
        assert_eq!(pool.mode_for("app", "shop"), PoolMode::Transaction);
        assert_eq!(pool.mode_for("admin", "shop"), PoolMode::Session);
        assert_eq!(pool.mode_for("app", "other"), PoolMode::Session);
        assert_eq!(pool.size, 20);
        assert!(PoolConfig {
            size: 0,
            ..PoolConfig::default()
        }
        .validate()
        .is_err());
    }
}
