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
use crate::config::{Config, TlsConfig};
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
/// timeouts, and the log level. Everything else is read at start only.
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

/// Why `RELOAD` kept the settings it had.
#[derive(Debug, Error)]
pub enum ReloadError {
    #[error("this node was not started from a configuration file")]
    NoFile,
    #[error("{0}")]
    Invalid(String),
}

/// State shared by every session of one node.
pub struct Node {
    /// The configuration the node started with (see `Live` for what
    /// `RELOAD` changes).
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
    /// Per backend (in config order): whether it was last seen down.
    backend_down: Vec<AtomicBool>,
    /// Bumped whenever a backend is seen going down: sessions on it move.
    backend_went_down: watch::Sender<u64>,
    /// Per backend (in config order): whether it takes no session now
    /// (see `set_routing`): sessions on it move off.
    backend_closed: Vec<AtomicBool>,
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
        let flags = || {
            config
                .backends
                .iter()
                .map(|_| AtomicBool::new(false))
                .collect()
        };
        let backend_down = flags();
        let backend_closed = flags();
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
            backend_down,
            backend_went_down: watch::channel(0).0,
            backend_closed,
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
    /// (see `Live`); the settings that changed in the file but are read at
    /// start only, which keep their values until a restart. A file that
    /// does not load, validate or set its log level changes nothing.
    pub fn reload(&self) -> Result<Vec<String>, ReloadError> {
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
        (reloader.set_log_level)(config.node.log_level.as_deref())
            .map_err(|e| ReloadError::Invalid(format!("node.log_level: {e}")))?;
        let at_restart = self.config.differs_at_restart(&config);
        match self.live.write() {
            Ok(mut live) => *live = Arc::new(Live::new(config)),
            Err(poisoned) => *poisoned.into_inner() = Arc::new(Live::new(config)),
        }
        tracing::info!(?at_restart, "configuration reloaded");
        Ok(at_restart)
    }

    /// Mark a backend up or down (health checks and failed logins).
    pub fn set_backend_down(&self, name: &str, down: bool) {
        if let Some(i) = self.config.backends.iter().position(|b| b.name == name) {
            let was = self.backend_down[i].swap(down, Ordering::SeqCst);
            if was != down {
                if down {
                    self.backend_went_down.send_modify(|n| *n += 1);
                    tracing::warn!(backend = name, "backend down");
                } else {
                    tracing::info!(backend = name, "backend up");
                }
            }
            if let Some((_, up)) = self.metrics.backend(name) {
                up.set(if down { 0.0 } else { 1.0 });
            }
        }
    }

    /// Whether a backend was last seen down.
    pub fn is_backend_down(&self, name: &str) -> bool {
        self.config
            .backends
            .iter()
            .position(|b| b.name == name)
            .is_some_and(|i| self.backend_down[i].load(Ordering::SeqCst))
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
        for (backend, flag) in self.config.backends.iter().zip(&self.backend_closed) {
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

    /// The position of a backend in the configuration.
    pub fn backend_index(&self, name: &str) -> Option<usize> {
        self.config.backends.iter().position(|b| b.name == name)
    }

    /// Whether the backend at `index` (see `backend_index`) takes no
    /// session now (see `set_routing`).
    pub fn is_closed_at(&self, index: usize) -> bool {
        self.backend_closed
            .get(index)
            .is_some_and(|d| d.load(Ordering::SeqCst))
    }

    /// Whether a backend takes no session now (see `set_routing`).
    pub fn is_backend_closed(&self, name: &str) -> bool {
        self.backend_index(name)
            .is_some_and(|i| self.is_closed_at(i))
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
    pub fn session_backends(&self) -> Vec<&crate::config::BackendConfig> {
        let home = self.config.home_backend();
        if self.config.replication.is_none() {
            return vec![home];
        }
        if self.config.node.routing == crate::config::Routing::Leader {
            // Only the write leader: writing anywhere else could conflict.
            // None yet (or it is down and not yet replaced): no backend,
            // and the client gets a connection error to retry.
            let leader = self
                .consensus()
                .and_then(|c| c.state().read(|s| s.write_leader.clone()));
            return self
                .config
                .backends
                .iter()
                .filter(|b| Some(&b.name) == leader.as_ref())
                .collect();
        }
        let down = |b: &crate::config::BackendConfig| {
            self.backend_index(&b.name)
                .is_some_and(|i| self.backend_down[i].load(Ordering::SeqCst))
        };
        let drained = |b: &crate::config::BackendConfig| self.is_backend_closed(&b.name);
        let others = || {
            self.config
                .backends
                .iter()
                .filter(|b| b.name != home.name && !drained(b))
        };
        let home_usable = !drained(home);
        let mut order = Vec::with_capacity(self.config.backends.len());
        if home_usable && !down(home) {
            order.push(home);
        }
        order.extend(others().filter(|b| !down(b)));
        if home_usable && down(home) {
            order.push(home);
        }
        order.extend(others().filter(|b| down(b)));
        order
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
        let Some(lane) = Lane::joining(&self.config, created) else {
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
