//! One replicated database on this node: a lane. Each database that
//! replicates (`replication.database`, and `replication.databases`) has
//! its own chorus schema on every backend, its own streams (slots are
//! per database in PostgreSQL), its own application of the DDL log and
//! its own progress, which its sessions' commit scopes wait on. Roles,
//! databases and tablespaces are cluster-wide: their DDL is applied in
//! the main lane, `replication.database`.
//!
//! The node holds its lanes (node.rs); the cluster's parts (cluster/) work
//! on them. A lane keeps what they share: the database's replication
//! configuration, its control connections, how far its streams and its
//! DDL log have come, and the names of its slots.

pub mod ddl_progress;

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use crate::backend::ControlPool;
use crate::config::{BackendConfig, Config, ReplicationConfig};
use crate::scope::ReplicationProgress;
use ddl_progress::DdlProgress;

/// A replicated database's state on this node.
pub struct Lane {
    /// The replication settings, `database` being this lane's.
    pub config: ReplicationConfig,
    /// Whether this is `replication.database`, where cluster-wide DDL is
    /// applied.
    pub main: bool,
    /// How far this lane's streams have brought the home backend's
    /// changes to the peers (commit scopes wait on it).
    pub progress: Arc<ReplicationProgress>,
    /// How far the DDL log is applied in this database on the home
    /// backend.
    pub ddl: DdlProgress,
    /// Pooled control connections to every backend, in this database.
    pub control: Arc<ControlPool>,
    /// The DDL log entry that created this database (0: the configuration
    /// names it), and the names it has had, each from the entry that gave
    /// it (see [`Created`]).
    since: u64,
    names: Vec<(u64, String)>,
    /// Whether the chorus schema is installed in this database on the
    /// home backend.
    schema_ready: watch::Sender<bool>,
    /// Other backends seen with the slots of their streams to every other
    /// backend, in this database (see
    /// `replication::wait_streams_ready`): they stay.
    streams_ready: std::sync::Mutex<std::collections::HashSet<String>>,
}

impl std::fmt::Debug for Lane {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lane")
            .field("database", &self.config.database)
            .field("main", &self.main)
            .finish_non_exhaustive()
    }
}

impl Lane {
    /// The lanes of a node's configuration, the main one first (none
    /// without replication).
    pub fn all(config: &Config) -> Vec<Arc<Lane>> {
        let Some(replication) = &config.replication else {
            return Vec::new();
        };
        let peers = peers(config, &config.backends);
        replication
            .replicated_databases()
            .map(|database| Lane::new(replication, &peers, &Created::configured(database)))
            .collect()
    }

    /// The lane of a database that joins replication while the node runs
    /// (one created through Chorus), `backends` those the node knows now;
    /// none without replication.
    pub fn joining(
        config: &Config,
        backends: &[BackendConfig],
        created: &Created,
    ) -> Option<Arc<Lane>> {
        let replication = config.replication.as_ref()?;
        Some(Lane::new(replication, &peers(config, backends), created))
    }

    fn new(replication: &ReplicationConfig, peers: &[String], created: &Created) -> Arc<Lane> {
        let database = created.name();
        let config = replication.for_database(database);
        let control = Arc::new(ControlPool::new(
            config.clone(),
            replication.control_pool_size,
        ));
        Arc::new(Lane {
            since: created.since,
            names: created.names.clone(),
            main: database == replication.database,
            progress: Arc::new(ReplicationProgress::new(peers)),
            ddl: DdlProgress::new(control.clone()),
            control,
            config,
            schema_ready: watch::channel(false).0,
            streams_ready: Default::default(),
        })
    }

    /// The database.
    pub fn database(&self) -> &str {
        &self.config.database
    }

    /// Whether a DDL log entry `seq` of `database` is this database's
    /// (not that of an earlier database of the name, since dropped, nor of
    /// another that had its name before a rename).
    pub fn owns(&self, database: &str, seq: u64) -> bool {
        let named = self
            .names
            .iter()
            .rev()
            .find(|(from, _)| *from < seq)
            .or(self.names.first())
            .is_some_and(|(_, name)| name == database);
        seq > self.since && named
    }

    /// What the log told of this database when the lane began.
    pub fn created(&self) -> Created {
        Created {
            since: self.since,
            names: self.names.clone(),
        }
    }

    /// Whether `backend` was seen with every slot of its streams.
    pub fn streams_seen(&self, backend: &str) -> bool {
        self.streams_ready
            .lock()
            .map(|r| r.contains(backend))
            .unwrap_or(false)
    }

    /// `backend` has every slot of its streams (they are never dropped
    /// while it is in the cluster).
    pub fn streams_found(&self, backend: &str) {
        if let Ok(mut ready) = self.streams_ready.lock() {
            ready.insert(backend.to_owned());
        }
    }

    /// The chorus schema is installed in this database on the home
    /// backend.
    pub fn schema_installed(&self) {
        self.schema_ready.send_replace(true);
    }

    /// Wait (at most `limit`) until the chorus schema is installed here on
    /// the home backend; whether it is.
    pub async fn wait_schema_ready(&self, limit: Duration) -> bool {
        let mut ready = self.schema_ready.subscribe();
        let waited = tokio::time::timeout(limit, ready.wait_for(|r| *r)).await;
        matches!(waited, Ok(Ok(_)))
    }

    /// The name of the slot that streams `owner`'s backend to `peer` in
    /// this database: the main lane's names are those of old, another
    /// lane's end in a tag of its database (slot names are cluster-wide
    /// in PostgreSQL, and a database's name may not fit in one).
    pub fn slot_name(&self, owner: u16, peer: &str) -> String {
        let base = slot_name(owner, peer);
        // (The name it was created with: a rename keeps its slots.)
        let first = self.names.first().map_or(self.database(), |(_, n)| n);
        if self.main {
            base
        } else {
            format!("{base}_in_{}", database_tag(first))
        }
    }
}

/// What the DDL log tells of a replicated database: the entry that created
/// it (0 for one the configuration names), and each name it has had, from
/// the entry that gave it (the first from `since`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Created {
    pub since: u64,
    pub names: Vec<(u64, String)>,
}

impl Created {
    /// A database the configuration names.
    pub fn configured(database: &str) -> Created {
        Created {
            since: 0,
            names: vec![(0, database.to_owned())],
        }
    }

    /// Its name now.
    pub fn name(&self) -> &str {
        self.names.last().map_or("", |(_, n)| n.as_str())
    }
}

/// The backends other than the home one, which a lane's streams reach.
fn peers(config: &Config, backends: &[BackendConfig]) -> Vec<String> {
    let home = &config.home_backend().name;
    backends
        .iter()
        .filter(|b| b.name != *home)
        .map(|b| b.name.clone())
        .collect()
}

/// A short, stable tag of a database name: FNV-1a, 32 bits, in hex (the
/// same in every release and on every node, unlike std's hasher).
pub fn database_tag(database: &str) -> String {
    let mut hash: u32 = 0x811c_9dc5;
    for byte in database.bytes() {
        hash ^= u32::from(byte);
        hash = hash.wrapping_mul(0x0100_0193);
    }
    format!("{hash:08x}")
}

/// A slot-name-safe form of a backend name.
fn slot_label(name: &str) -> String {
    name.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '_'
            }
        })
        .collect()
}

/// The name of the slot that streams `owner`'s backend to `peer`.
pub(crate) fn slot_name(owner: u16, peer: &str) -> String {
    format!("chorus_{owner}_to_{}", slot_label(peer))
}

/// A regular expression for the names of the slots that stream to `peer`
/// (from any owner, in any database: see `Lane::slot_name`), or, without
/// a peer, of every Chorus slot.
pub(crate) fn slot_pattern(peer: Option<&str>) -> String {
    match peer {
        Some(peer) => format!(
            "^chorus_[0-9]+_to_{}(_in_[0-9a-f]{{8}})?$",
            slot_label(peer)
        ),
        None => "^chorus_[0-9]+_to_".to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slot_patterns_match_every_databases_slots_to_a_peer_and_no_other() {
        let to_pg2 = regex::Regex::new(&slot_pattern(Some("pg2"))).unwrap();
        assert!(to_pg2.is_match("chorus_1_to_pg2"));
        assert!(to_pg2.is_match("chorus_13_to_pg2_in_0a1b2c3d"));
        assert!(!to_pg2.is_match("chorus_1_to_pg22"));
        assert!(!to_pg2.is_match("chorus_1_to_pg2_in_x"));
        let any = regex::Regex::new(&slot_pattern(None)).unwrap();
        assert!(any.is_match("chorus_2_to_pg1_in_0a1b2c3d"));
    }

    #[test]
    fn a_renamed_database_keeps_its_entries_and_slots() {
        let config: Config = toml::from_str(
            "[node]\nid = 1\nlisten = \"127.0.0.1:1\"\nhome_backend = \"a\"\n\
             [[backends]]\nname = \"a\"\nhost = \"127.0.0.1\"\nport = 1\n\
             [[backends]]\nname = \"b\"\nhost = \"127.0.0.1\"\nport = 2\n\
             [replication]\ndatabase = \"postgres\"\n",
        )
        .unwrap();
        let created = Created {
            since: 5,
            names: vec![(5, "shop".into()), (9, "store".into())],
        };
        let lane = Lane::joining(&config, &config.backends, &created).unwrap();
        assert_eq!(lane.database(), "store");
        // An earlier "shop", dropped before entry 5; this one's entries as
        // "shop" up to the rename (entry 9), then as "store".
        assert!(!lane.owns("shop", 3));
        assert!(lane.owns("shop", 7));
        assert!(!lane.owns("store", 7));
        assert!(lane.owns("store", 12));
        assert!(!lane.owns("shop", 12));
        let before = Lane::joining(
            &config,
            &config.backends,
            &Created {
                since: 5,
                names: vec![(5, "shop".into())],
            },
        )
        .unwrap();
        assert_eq!(lane.slot_name(1, "b"), before.slot_name(1, "b"));
    }

    #[test]
    fn database_tags_are_stable_and_differ() {
        // FNV-1a's published value for "a".
        assert_eq!(database_tag("a"), "e40c292c");
        assert_ne!(database_tag("app"), database_tag("apq"));
        assert_eq!(database_tag("app").len(), 8);
    }
}
