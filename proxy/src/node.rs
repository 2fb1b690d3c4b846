//! A node's shared state: its configuration, metrics, clock, cancel keys,
//! what it knows of its backends' health, its replicated databases (lanes:
//! the progress of replication and of the DDL log in each), and shutdown. Every part of the node holds it; it
//! depends on none of them.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use chorus_router::hlc::HybridClock;
use thiserror::Error;
use tokio::sync::watch;
use tokio_rustls::TlsAcceptor;

use crate::auth::ScramVerifier;
use crate::backend::cancel::CancelRegistry;
use crate::config::{BackendConfig, Config, TlsConfig};
use crate::lane::{Created, Lane};
use crate::metrics::Metrics;

/// Why a node could not start.
#[derive(Debug, Error)]
pub enum StartError {
    #[error("cannot load TLS certificate or key: {0}")]
    Tls(String),
    #[error("cannot derive a SCRAM verifier")]
    Scram,
    #[error("cannot bind {what} to {address}: {source}")]
    Bind {
        what: &'static str,
        address: std::net::SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot start the cluster's Raft member: {0}")]
    Consensus(#[from] chorus_consensus::StartError),
}

/// What the admin console's `RELOAD` (or SIGHUP) reads again from the
/// configuration file without a restart: the authentication rules, the
/// users and their passwords, the admin roles, the client and backend
/// timeouts, and the log level. (Backends added to `[[backends]]` are taken
/// too, see `Node::reload`.) Everything else is read at start only.
pub struct Live {
    /// The configuration as last read; only the parts above are taken
    /// from it.
    pub config: Config,
    /// SCRAM verifiers derived from the users' passwords.
    verifiers: HashMap<String, ScramVerifier>,
}

impl Live {
    fn new(config: Config) -> Live {
        let verifiers = config
            .users
            .iter()
            .filter_map(|u| {
                let password = u.password.as_deref()?;
                Some((u.name.clone(), ScramVerifier::from_password(password)?))
            })
            .collect();
        Live { config, verifiers }
    }

    /// A user's password, for logins to the backends on its behalf.
    pub fn password(&self, user: &str) -> Option<String> {
        self.config.user(user).and_then(|u| u.password.clone())
    }
}

/// Sets the log filter (`node.log_level`, or the start-up one for `None`);
/// the error when the filter does not parse.
pub type LogLevelSetter = Box<dyn Fn(Option<&str>) -> Result<(), String> + Send + Sync>;

/// Where `RELOAD` reads the configuration, and how it sets the log level
/// (see main.rs).
pub struct Reloader {
    pub path: std::path::PathBuf,
    pub set_log_level: LogLevelSetter,
}

/// What `RELOAD` did.
#[derive(Debug, Default)]
pub struct Reloaded {
    /// Settings that changed in the file but are read at start only.
    pub at_restart: Vec<String>,
    /// Backends the node took into its list (see `Node::reload`).
    pub added: Vec<String>,
}

/// Why `RELOAD` kept the settings it had.
#[derive(Debug, Error)]
pub enum ReloadError {
    #[error("this node was not started from a configuration file")]
    NoFile,
    #[error("{0}")]
    Invalid(String),
    /// A backend the file adds is not announced in this node's copy of
    /// the cluster state (yet: an `ADD BACKEND` through another node may
    /// be on its way here).
    #[error("{0}")]
    NotAnnounced(String),
}

/// The backends a node knows, in order: those of its configuration at
/// start, then those `RELOAD` added (see `Node::reload`). A backend never
/// leaves the list while the node runs, so a position in it stays valid.
struct Backends {
    list: Arc<Vec<BackendConfig>>,
    /// Per backend: whether it was last seen down.
    down: Vec<Arc<AtomicBool>>,
    /// Per backend: whether it takes no session now (see `set_routing`):
    /// sessions on it move off.
    closed: Vec<Arc<AtomicBool>>,
}

impl Backends {
    fn new(list: Vec<BackendConfig>) -> Backends {
        let flags = || {
            list.iter()
                .map(|_| Arc::new(AtomicBool::new(false)))
                .collect()
        };
        Backends {
            down: flags(),
            closed: flags(),
            list: Arc::new(list),
        }
    }

    /// The same list with `added` at its end (the flags of those already
    /// there are shared, so no change to them is lost). The added ones
    /// take no session until the cluster's routing is applied to them.
    fn with(&self, added: &[BackendConfig]) -> Backends {
        let fresh = |set: bool| added.iter().map(move |_| Arc::new(AtomicBool::new(set)));
        Backends {
            list: Arc::new(self.list.iter().chain(added).cloned().collect()),
            down: self.down.iter().cloned().chain(fresh(false)).collect(),
            closed: self.closed.iter().cloned().chain(fresh(true)).collect(),
        }
    }

    fn index(&self, name: &str) -> Option<usize> {
        self.list.iter().position(|b| b.name == name)
    }
}

/// Whether one backend takes no session now (see `Node::closed_flag`).
pub struct ClosedFlag(Arc<AtomicBool>);

impl ClosedFlag {
    pub fn is_closed(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }
}

/// The backends a new session tries, in order (see
/// `Node::session_backends`).
pub struct SessionBackends {
    list: Arc<Vec<BackendConfig>>,
    order: Vec<usize>,
}

impl SessionBackends {
    pub fn iter(&self) -> impl Iterator<Item = &BackendConfig> {
        self.order.iter().filter_map(|i| self.list.get(*i))
    }
}

/// State shared by every session of one node.
pub struct Node {
    /// The configuration the node started with (see `Live` for what
    /// `RELOAD` changes). Its `backends` are those it started with;
    /// `Node::backends` has those it knows now.
    pub config: Config,
    pub metrics: Arc<Metrics>,
    pub cancel_keys: Arc<CancelRegistry>,
    /// The server connections of transaction pooling (see
    /// backend/pool.rs).
    pub pool: crate::backend::pool::ServerPool,
    pub tls: Option<TlsAcceptor>,
    /// The reloadable settings (see `Live`).
    live: std::sync::RwLock<Arc<Live>>,
    reloader: std::sync::OnceLock<Reloader>,
    /// A verifier for unknown users, so that their login runs the whole
    /// exchange and fails like a wrong password (no user enumeration).
    mock_verifier: ScramVerifier,
    /// This node's hybrid logical clock, stamped on every write transaction.
    pub clock: HybridClock,
    /// The replicated databases (see lane.rs), the main one first; none
    /// without replication. Databases created through Chorus join them,
    /// and leave when dropped or renamed (cluster::databases).
    lanes: std::sync::RwLock<Vec<Arc<Lane>>>,
    /// Bumped whenever a lane joins or leaves.
    lanes_changed: watch::Sender<u64>,
    /// Held while lanes come or go with the DDL log (see
    /// cluster::databases): a drop or rename applied, or the log followed.
    pub(crate) lanes_turn: tokio::sync::Mutex<()>,
    /// This node's Raft member (set when the node starts, with `[cluster]`).
    consensus: std::sync::OnceLock<Arc<chorus_consensus::Consensus>>,
    /// The backends the node knows now (see `Node::backends`).
    backends: std::sync::RwLock<Arc<Backends>>,
    /// Bumped whenever a backend joins the node's list.
    backends_changed: watch::Sender<u64>,
    /// Bumped whenever a backend is seen going down: sessions on it move.
    backend_went_down: watch::Sender<u64>,
    /// Bumped whenever a backend closes or opens: idle sessions move.
    backend_closed_changed: watch::Sender<u64>,
    /// Whether this node drives its home backend's streams now (see
    /// duties.rs); when another node does, commit scopes are judged from
    /// the backend's slots instead of this node's stream positions.
    pub drives_home: AtomicBool,
    /// The backend this node is copying again (`REJOIN`) and the copy's
    /// last step, for `SHOW BACKENDS`.
    copy_step: std::sync::Mutex<Option<(String, String)>>,
    /// Set once shutdown begins.
    pub draining: Arc<AtomicBool>,
    shutdown_tx: watch::Sender<bool>,
}

impl Node {
    /// Build a node from its configuration (loads TLS material, derives
    /// SCRAM verifiers, registers metrics).
    pub fn new(config: Config) -> Result<Arc<Node>, StartError> {
        let tls = config.tls.as_ref().map(load_tls).transpose()?;
        let backends: Vec<String> = config.backends.iter().map(|b| b.name.clone()).collect();
        let live = std::sync::RwLock::new(Arc::new(Live::new(config.clone())));
        let mut random = [0u8; 16];
        rand::RngCore::fill_bytes(&mut rand::rng(), &mut random);
        let mock_verifier =
            ScramVerifier::from_password(&format!("{random:?}")).ok_or(StartError::Scram)?;
        let (shutdown_tx, _) = watch::channel(false);
        let clock = HybridClock::new(config.node.id, config.node.max_clock_skew_ms);
        clock.set_offset_ms(config.node.clock_offset_ms);
        let known = Backends::new(config.backends.clone());
        let pool = crate::backend::pool::ServerPool::new(config.pool.size);
        Ok(Arc::new(Node {
            clock,
            lanes: std::sync::RwLock::new(Lane::all(&config)),
            lanes_changed: watch::channel(0).0,
            lanes_turn: tokio::sync::Mutex::new(()),
            metrics: Arc::new(Metrics::new(&backends, &config.home_backend().name)),
            config,
            cancel_keys: Arc::new(CancelRegistry::default()),
            pool,
            tls,
            live,
            reloader: std::sync::OnceLock::new(),
            mock_verifier,
            drives_home: AtomicBool::new(true),
            copy_step: std::sync::Mutex::new(None),
            draining: Arc::new(AtomicBool::new(false)),
            consensus: std::sync::OnceLock::new(),
            backends: std::sync::RwLock::new(Arc::new(known)),
            backends_changed: watch::channel(0).0,
            backend_went_down: watch::channel(0).0,
            backend_closed_changed: watch::channel(0).0,
            shutdown_tx,
        }))
    }

    /// The SCRAM verifier for a user (a mock one for unknown users).
    pub fn verifier(&self, user: &str) -> ScramVerifier {
        self.live()
            .verifiers
            .get(user)
            .unwrap_or(&self.mock_verifier)
            .clone()
    }

    /// The reloadable settings as they are now.
    pub fn live(&self) -> Arc<Live> {
        match self.live.read() {
            Ok(live) => live.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// Say where `RELOAD` reads the configuration (set once, at start).
    pub fn set_reloader(&self, reloader: Reloader) {
        let _ = self.reloader.set(reloader);
    }

    /// Read the configuration file again and take its reloadable settings
    /// (see `Live`), and the backends it adds to the end of `[[backends]]`
    /// once the cluster has announced them (see `added_backends`); the
    /// settings that changed in the file but are read at start only keep
    /// their values until a restart. A file that does not load, validate
    /// or set its log level, or that adds a backend not announced, changes
    /// nothing.
    pub fn reload(&self) -> Result<Reloaded, ReloadError> {
        let reloader = self.reloader.get().ok_or(ReloadError::NoFile)?;
        let mut config = crate::config::Config::load(&reloader.path)
            .map_err(|e| ReloadError::Invalid(e.to_string()))?;
        // (Command-line overrides of the start stay.)
        config.node.listen = self.config.node.listen;
        config.node.metrics_listen = self.config.node.metrics_listen;
        config.node.id = self.config.node.id;
        config.node.home_backend = self.config.node.home_backend.clone();
        config
            .validate()
            .map_err(|e| ReloadError::Invalid(e.to_string()))?;
        let added = self.added_backends(&config)?;
        (reloader.set_log_level)(config.node.log_level.as_deref())
            .map_err(|e| ReloadError::Invalid(format!("node.log_level: {e}")))?;
        // (Backends the node knows, or takes now, are not a difference
        // left for a restart.)
        let mut compared = config.clone();
        if added.is_some() {
            compared.backends = self.config.backends.clone();
        }
        let added = added.unwrap_or_default();
        let at_restart = self.config.differs_at_restart(&compared);
        match self.live.write() {
            Ok(mut live) => *live = Arc::new(Live::new(config)),
            Err(poisoned) => *poisoned.into_inner() = Arc::new(Live::new(config)),
        }
        self.add_backends(&added);
        let added: Vec<String> = added.into_iter().map(|b| b.name).collect();
        tracing::info!(?at_restart, ?added, "configuration reloaded");
        Ok(Reloaded { at_restart, added })
    }

    /// The backends `config` adds to those this node knows (maybe none),
    /// when that is all it changes in `[[backends]]`: the known ones as
    /// they are, in the same order, the new ones after them, each
    /// announced in the cluster (being copied: `ADD BACKEND`, before its
    /// `JOIN`; or a node's home). `None` when `[[backends]]` changes
    /// otherwise, or the node is not part of a cluster: that waits for a
    /// restart. A new backend that is not announced is refused: streams
    /// to it would start before it holds the data.
    fn added_backends(&self, config: &Config) -> Result<Option<Vec<BackendConfig>>, ReloadError> {
        let known = self.backends();
        let same = |a: &BackendConfig, b: &BackendConfig| {
            serde_json::to_value(a).ok() == serde_json::to_value(b).ok()
        };
        let extends = config.backends.len() >= known.len()
            && config
                .backends
                .iter()
                .zip(known.iter())
                .all(|(a, b)| same(a, b));
        if !extends {
            return Ok(None);
        }
        let added = config.backends[known.len()..].to_vec();
        let Some(consensus) = self.consensus() else {
            return Ok(added.is_empty().then(Vec::new));
        };
        for backend in &added {
            let announced = consensus
                .state()
                .read(|s| s.copying.contains(&backend.name) || s.owner_of(&backend.name).is_some());
            if !announced {
                return Err(ReloadError::NotAnnounced(format!(
                    "backend \"{}\" is new to the cluster: announce it with ADD BACKEND {} on the admin console first, then RELOAD",
                    backend.name, backend.name
                )));
            }
        }
        Ok(Some(added))
    }

    /// Take more backends into the node's list (see `reload`): their
    /// metrics, their place in every lane's replication progress, and a
    /// change of `backends_changed`, on which the streams start again.
    fn add_backends(&self, added: &[BackendConfig]) {
        let added: Vec<BackendConfig> = {
            let mut known = match self.backends.write() {
                Ok(known) => known,
                Err(poisoned) => poisoned.into_inner(),
            };
            // (Two reloads at once add a backend once.)
            let added: Vec<BackendConfig> = added
                .iter()
                .filter(|b| known.index(&b.name).is_none())
                .cloned()
                .collect();
            *known = Arc::new(known.with(&added));
            added
        };
        if added.is_empty() {
            return;
        }
        let home = &self.config.home_backend().name;
        for backend in &added {
            self.metrics.add_backend(&backend.name, home);
            for lane in self.lanes() {
                lane.progress.add_peer(&backend.name);
            }
            tracing::info!(backend = %backend.name, "backend added to this node's list");
        }
        // (Whether they take sessions: a backend being copied takes none.)
        if let Some(consensus) = self.consensus() {
            let routing = consensus.state().routing().borrow().clone();
            self.set_routing(&routing);
        }
        self.backends_changed.send_modify(|n| *n += 1);
    }

    fn known(&self) -> Arc<Backends> {
        match self.backends.read() {
            Ok(known) => known.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// The backends this node knows now, in order: those it started with,
    /// then those `RELOAD` added.
    pub fn backends(&self) -> Arc<Vec<BackendConfig>> {
        self.known().list.clone()
    }

    /// A backend this node knows, by name.
    pub fn backend(&self, name: &str) -> Option<BackendConfig> {
        self.backends().iter().find(|b| b.name == name).cloned()
    }

    /// Changes whenever a backend joins the node's list.
    pub fn backends_changed(&self) -> watch::Receiver<u64> {
        self.backends_changed.subscribe()
    }

    /// Mark a backend up or down (health checks and failed logins).
    pub fn set_backend_down(&self, name: &str, down: bool) {
        let known = self.known();
        if let Some(i) = known.index(name) {
            let was = known.down[i].swap(down, Ordering::SeqCst);
            if was != down {
                if down {
                    self.backend_went_down.send_modify(|n| *n += 1);
                    tracing::warn!(backend = name, "backend down");
                } else {
                    tracing::info!(backend = name, "backend up");
                }
            }
            self.metrics.backend_up(name, !down);
        }
    }

    /// Whether a backend was last seen down.
    pub fn is_backend_down(&self, name: &str) -> bool {
        let known = self.known();
        known
            .index(name)
            .is_some_and(|i| known.down[i].load(Ordering::SeqCst))
    }

    /// Changes whenever a backend is seen going down.
    pub fn backend_went_down(&self) -> watch::Receiver<u64> {
        self.backend_went_down.subscribe()
    }

    /// Follow where the cluster's sessions may go (see
    /// `chorus_consensus::Routing`): a backend drained for maintenance or
    /// being copied again takes no session, nor, under write-leader
    /// routing, one that is not the write leader (once there is one).
    pub(crate) fn set_routing(&self, routing: &chorus_consensus::Routing) {
        let by_leader = self.config.node.routing == crate::config::Routing::Leader;
        let mut changed = false;
        let known = self.known();
        for (backend, flag) in known.list.iter().zip(&known.closed) {
            let drained = routing.drained.contains(&backend.name);
            let copying = routing.copying.contains(&backend.name);
            let not_leader = by_leader
                && routing
                    .write_leader
                    .as_ref()
                    .is_some_and(|leader| *leader != backend.name);
            let closed = drained || copying || not_leader;
            self.metrics.backend_drained(&backend.name, drained);
            self.metrics.backend_copying(&backend.name, copying);
            if flag.swap(closed, Ordering::SeqCst) != closed {
                changed = true;
                if copying {
                    tracing::info!(backend = %backend.name, "backend being copied again: sessions move off it");
                } else if drained {
                    tracing::info!(backend = %backend.name, "backend drained: sessions move off it");
                } else if closed {
                    tracing::info!(backend = %backend.name, "no longer the write leader: sessions move off it");
                } else {
                    tracing::info!(backend = %backend.name, "backend takes sessions again");
                }
            }
        }
        if changed {
            self.backend_closed_changed.send_modify(|n| *n += 1);
        }
    }

    /// The backend this node is copying again, and the copy's last step.
    pub fn copy_step(&self) -> Option<(String, String)> {
        self.copy_step.lock().ok().and_then(|s| s.clone())
    }

    /// Record the copy's last step (`None` once it has ended).
    pub fn set_copy_step(&self, step: Option<(String, String)>) {
        if let Ok(mut current) = self.copy_step.lock() {
            *current = step;
        }
    }

    /// Whether `backend` is being copied again from a peer (see
    /// cluster/rejoin.rs): nothing replicates to or from it meanwhile.
    pub fn is_copying(&self, backend: &str) -> bool {
        self.consensus()
            .is_some_and(|c| c.state().read(|s| s.copying.contains(backend)))
    }

    /// The position of a backend in the node's list (see `backends`; it
    /// stays valid while the node runs).
    pub fn backend_index(&self, name: &str) -> Option<usize> {
        self.known().index(name)
    }

    /// Whether a backend takes no session now, to be asked again and
    /// again without a lookup (a session asks before each statement).
    pub fn closed_flag(&self, name: &str) -> Option<ClosedFlag> {
        let known = self.known();
        known
            .index(name)
            .map(|i| ClosedFlag(known.closed[i].clone()))
    }

    /// Whether a backend takes no session now (see `set_routing`).
    pub fn is_backend_closed(&self, name: &str) -> bool {
        self.closed_flag(name).is_some_and(|f| f.is_closed())
    }

    /// Changes whenever a backend closes to sessions or opens again.
    pub fn backend_closed_changed(&self) -> watch::Receiver<u64> {
        self.backend_closed_changed.subscribe()
    }

    /// The backends a new session tries, in order: the home backend unless
    /// it is down, then (with replication, where every backend has the
    /// same data) the others that are up, then those down (they may be
    /// back). Without replication only the home backend. A backend closed
    /// to sessions (drained, see `set_routing`) takes none.
    pub fn session_backends(&self) -> SessionBackends {
        let known = self.known();
        let list = &known.list;
        let home = known.index(&self.config.home_backend().name).unwrap_or(0);
        let order = if self.config.replication.is_none() {
            vec![home]
        } else if self.config.node.routing == crate::config::Routing::Leader {
            // Only the write leader: writing anywhere else could conflict.
            // None yet (or it is down and not yet replaced): no backend,
            // and the client gets a connection error to retry.
            let leader = self
                .consensus()
                .and_then(|c| c.state().read(|s| s.write_leader.clone()));
            (0..list.len())
                .filter(|i| Some(&list[*i].name) == leader.as_ref())
                .collect()
        } else {
            let down = |i: usize| known.down[i].load(Ordering::SeqCst);
            let closed = |i: usize| known.closed[i].load(Ordering::SeqCst);
            let others = || (0..list.len()).filter(|i| *i != home && !closed(*i));
            let home_usable = !closed(home);
            let mut order = Vec::with_capacity(list.len());
            if home_usable && !down(home) {
                order.push(home);
            }
            order.extend(others().filter(|i| !down(*i)));
            if home_usable && down(home) {
                order.push(home);
            }
            order.extend(others().filter(|i| down(*i)));
            order
        };
        SessionBackends {
            list: list.clone(),
            order,
        }
    }

    /// This node's Raft member, once started.
    pub fn consensus(&self) -> Option<&Arc<chorus_consensus::Consensus>> {
        self.consensus.get()
    }

    /// The node's Raft member, once it has started (set once).
    pub(crate) fn set_consensus(&self, consensus: Arc<chorus_consensus::Consensus>) {
        let _ = self.consensus.set(consensus);
    }

    /// The replicated databases, the main one first (none without
    /// replication).
    pub fn lanes(&self) -> Vec<Arc<Lane>> {
        self.lanes.read().map(|l| l.clone()).unwrap_or_default()
    }

    /// The lane of a replicated database.
    pub fn lane(&self, database: &str) -> Option<Arc<Lane>> {
        self.lanes
            .read()
            .ok()?
            .iter()
            .find(|l| l.database() == database)
            .cloned()
    }

    /// The lane of `replication.database`, where cluster-wide DDL is
    /// applied.
    pub fn main_lane(&self) -> Option<Arc<Lane>> {
        self.lanes.read().ok()?.first().cloned()
    }

    /// A database joins replication (see `lane::follow`); whether it is
    /// new.
    pub(crate) fn add_lane(&self, created: &Created) -> bool {
        let database = created.name();
        let Ok(mut lanes) = self.lanes.write() else {
            return false;
        };
        if lanes.iter().any(|l| l.database() == database) {
            return false;
        }
        let Some(lane) = Lane::joining(&self.config, &self.backends(), created) else {
            return false;
        };
        lanes.push(lane);
        drop(lanes);
        self.lanes_changed.send_modify(|n| *n += 1);
        true
    }

    /// Take a database that was created through Chorus out of
    /// replication, before it is dropped: what `each_lane` runs for it
    /// ends. Whether it was a lane.
    pub(crate) fn remove_lane(&self, database: &str) -> bool {
        let Ok(mut lanes) = self.lanes.write() else {
            return false;
        };
        let before = lanes.len();
        lanes.retain(|l| l.main || l.database() != database);
        let removed = lanes.len() != before;
        drop(lanes);
        if removed {
            self.lanes_changed.send_modify(|n| *n += 1);
        }
        removed
    }

    /// Run `start` for every lane, and for each that joins later, until
    /// the returned future is dropped, which ends them all. What runs for
    /// a lane that is removed ends then.
    pub async fn each_lane<F, Fut>(&self, start: F)
    where
        F: Fn(Arc<Lane>) -> Fut,
        Fut: std::future::Future<Output = ()> + Send + 'static,
    {
        let mut changed = self.lanes_changed.subscribe();
        let mut started: std::collections::HashMap<String, tokio::task::AbortHandle> =
            std::collections::HashMap::new();
        let mut tasks = tokio::task::JoinSet::new();
        loop {
            let lanes = self.lanes();
            started.retain(|database, task| {
                let kept = lanes.iter().any(|l| l.database() == database);
                if !kept {
                    task.abort();
                }
                kept
            });
            for lane in lanes {
                if !started.contains_key(lane.database()) {
                    let database = lane.database().to_owned();
                    started.insert(database, tasks.spawn(start(lane)));
                }
            }
            // (Finished and aborted tasks are let go of.)
            while tasks.try_join_next().is_some() {}
            if changed.changed().await.is_err() {
                // (The node is gone.)
                while tasks.join_next().await.is_some() {}
                return;
            }
        }
    }

    /// Wait (at most `limit`) until the chorus schema is on the home
    /// backend in the main database; whether it is (always, without
    /// replication).
    pub async fn wait_schema_ready(&self, limit: std::time::Duration) -> bool {
        match self.main_lane() {
            Some(lane) => lane.wait_schema_ready(limit).await,
            None => true,
        }
    }

    /// A receiver that fires when shutdown begins.
    pub fn shutdown_signal(&self) -> watch::Receiver<bool> {
        self.shutdown_tx.subscribe()
    }

    /// Begin shutdown: sessions finish at their next idle point.
    pub(crate) fn begin_drain(&self) {
        self.draining.store(true, Ordering::SeqCst);
        self.shutdown_tx.send_replace(true);
    }
}

fn load_tls(tls: &TlsConfig) -> Result<TlsAcceptor, StartError> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};

    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&tls.cert)
        .and_then(|iter| iter.collect())
        .map_err(|e| StartError::Tls(format!("{}: {e}", tls.cert.display())))?;
    if certs.is_empty() {
        return Err(StartError::Tls(format!(
            "{}: no certificate found",
            tls.cert.display()
        )));
    }
    let key = PrivateKeyDer::from_pem_file(&tls.key)
        .map_err(|e| StartError::Tls(format!("{}: {e}", tls.key.display())))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let server = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| StartError::Tls(e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| StartError::Tls(e.to_string()))?;
    Ok(TlsAcceptor::from(Arc::new(server)))
}
