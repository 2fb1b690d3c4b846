//! A Chorus node: the client listener, its shared state, and graceful
//! shutdown. `run` takes an already-bound listener so tests can bind
//! `127.0.0.1:0`.

use chorus_router::hlc::HybridClock;

use crate::scope::ReplicationProgress;
use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use bytes::BytesMut;
use thiserror::Error;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;
use tokio_rustls::TlsAcceptor;

use crate::auth::ScramVerifier;
use crate::cancel::CancelRegistry;
use crate::config::{Config, TlsConfig};
use crate::metrics::{self, ErrorKind, Metrics};
use crate::protocol::{self, Severity};
use crate::session;

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

/// State shared by every session of one node.
pub struct Node {
    pub config: Config,
    pub metrics: Arc<Metrics>,
    pub cancel_keys: Arc<CancelRegistry>,
    pub tls: Option<TlsAcceptor>,
    /// SCRAM verifiers derived from configured passwords at start-up.
    verifiers: HashMap<String, ScramVerifier>,
    /// A verifier for unknown users, so that their login runs the whole
    /// exchange and fails like a wrong password (no user enumeration).
    mock_verifier: ScramVerifier,
    /// This node's hybrid logical clock, stamped on every write transaction.
    pub clock: HybridClock,
    /// How far the replicator has brought this node's changes to the
    /// peers (commit scopes wait on it); none without replication.
    pub progress: Option<Arc<ReplicationProgress>>,
    /// This node's Raft member (set when the node starts, with `[cluster]`).
    consensus: std::sync::OnceLock<Arc<chorus_consensus::Consensus>>,
    /// How far the DDL log is applied on the home backend.
    pub ddl: crate::ddl::DdlProgress,
    /// Per backend (in config order): whether it was last seen down.
    backend_down: Vec<AtomicBool>,
    /// Bumped whenever a backend is seen going down: sessions on it move.
    backend_went_down: watch::Sender<u64>,
    /// Whether this node drives its home backend's streams now (see
    /// duties.rs); when another node does, commit scopes are judged from
    /// the backend's slots instead of this node's stream positions.
    pub drives_home: AtomicBool,
    /// Set once shutdown begins.
    pub draining: Arc<AtomicBool>,
    shutdown_tx: watch::Sender<bool>,
    /// Whether the chorus schema is installed on the home backend (always
    /// true without replication).
    schema_ready: watch::Sender<bool>,
}

impl Node {
    /// Build a node from its configuration (loads TLS material, derives
    /// SCRAM verifiers, registers metrics).
    pub fn new(config: Config) -> Result<Arc<Node>, StartError> {
        let tls = config.tls.as_ref().map(load_tls).transpose()?;
        let backends: Vec<String> = config.backends.iter().map(|b| b.name.clone()).collect();
        let verifiers = config
            .users
            .iter()
            .filter_map(|u| {
                let password = u.password.as_deref()?;
                Some((u.name.clone(), ScramVerifier::from_password(password)?))
            })
            .collect();
        let mut random = [0u8; 16];
        rand::RngCore::fill_bytes(&mut rand::rng(), &mut random);
        let mock_verifier =
            ScramVerifier::from_password(&format!("{random:?}")).ok_or(StartError::Scram)?;
        let (shutdown_tx, _) = watch::channel(false);
        let replication_off = config.replication.is_none();
        let clock = HybridClock::new(config.node.id, config.node.max_clock_skew_ms);
        clock.set_offset_ms(config.node.clock_offset_ms);
        let backend_down = config
            .backends
            .iter()
            .map(|_| AtomicBool::new(false))
            .collect();
        let home = config.home_backend().name.clone();
        let peers: Vec<String> = backends.iter().filter(|b| **b != home).cloned().collect();
        let progress = config
            .replication
            .is_some()
            .then(|| Arc::new(ReplicationProgress::new(&peers, backends.len())));
        Ok(Arc::new(Node {
            clock,
            progress,
            metrics: Arc::new(Metrics::new(&backends)),
            config,
            cancel_keys: Arc::new(CancelRegistry::default()),
            tls,
            verifiers,
            mock_verifier,
            drives_home: AtomicBool::new(true),
            draining: Arc::new(AtomicBool::new(false)),
            consensus: std::sync::OnceLock::new(),
            backend_down,
            backend_went_down: watch::channel(0).0,
            ddl: crate::ddl::DdlProgress::default(),
            shutdown_tx,
            schema_ready: watch::channel(replication_off).0,
        }))
    }

    /// The SCRAM verifier for a user (a mock one for unknown users).
    pub fn verifier(&self, user: &str) -> ScramVerifier {
        self.verifiers
            .get(user)
            .unwrap_or(&self.mock_verifier)
            .clone()
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

    /// The backends a new session tries, in order: the home backend unless
    /// it is down, then (with replication, where every backend has the
    /// same data) the others that are up, then those down (they may be
    /// back). Without replication only the home backend.
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
            self.config
                .backends
                .iter()
                .position(|o| o.name == b.name)
                .is_some_and(|i| self.backend_down[i].load(Ordering::SeqCst))
        };
        let mut order = Vec::with_capacity(self.config.backends.len());
        if !down(home) {
            order.push(home);
        }
        order.extend(
            self.config
                .backends
                .iter()
                .filter(|b| b.name != home.name && !down(b)),
        );
        if down(home) {
            order.push(home);
        }
        order.extend(
            self.config
                .backends
                .iter()
                .filter(|b| b.name != home.name && down(b)),
        );
        order
    }

    /// This node's Raft member, once started.
    pub fn consensus(&self) -> Option<&Arc<chorus_consensus::Consensus>> {
        self.consensus.get()
    }

    /// The replicator installed the chorus schema on the home backend.
    pub fn schema_installed(&self) {
        self.schema_ready.send_replace(true);
    }

    /// Wait (at most `limit`) until the chorus schema is on the home
    /// backend; whether it is.
    pub async fn wait_schema_ready(&self, limit: std::time::Duration) -> bool {
        let mut ready = self.schema_ready.subscribe();
        let waited = tokio::time::timeout(limit, ready.wait_for(|r| *r)).await;
        matches!(waited, Ok(Ok(_)))
    }

    /// A receiver that fires when shutdown begins.
    pub fn shutdown_signal(&self) -> watch::Receiver<bool> {
        self.shutdown_tx.subscribe()
    }

    fn begin_drain(&self) {
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

/// Session workers: one single-threaded tokio runtime per thread. Each
/// accepted connection is handed to one worker, where its session and its
/// backend connection live for their whole life. Compared with one
/// work-stealing runtime this saves the cross-thread wake-ups on every
/// message (measured: about 10% less CPU per pgbench transaction).
struct Workers {
    senders: Vec<mpsc::UnboundedSender<Job>>,
    next: usize,
    stop: watch::Sender<bool>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

/// An accepted connection on its way to a worker, with its connection slot.
type Job = (std::net::TcpStream, SocketAddr, OwnedSemaphorePermit);

impl Workers {
    fn start(node: &Arc<Node>, count: usize) -> std::io::Result<Workers> {
        let (stop, _) = watch::channel(false);
        let mut senders = Vec::with_capacity(count);
        let mut threads = Vec::with_capacity(count);
        for i in 0..count {
            let (tx, rx) = mpsc::unbounded_channel();
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            let node = node.clone();
            let stop = stop.subscribe();
            let thread = std::thread::Builder::new()
                .name(format!("chorus-worker-{i}"))
                .spawn(move || runtime.block_on(worker_loop(node, rx, stop)))?;
            senders.push(tx);
            threads.push(thread);
        }
        Ok(Workers {
            senders,
            next: 0,
            stop,
            threads,
        })
    }

    /// Hand a connection to the next worker, round robin.
    fn dispatch(&mut self, job: Job) {
        let worker = self.next % self.senders.len();
        self.next = self.next.wrapping_add(1);
        if self.senders[worker].send(job).is_err() {
            tracing::error!(worker, "session worker is gone; connection dropped");
        }
    }

    /// Stop every worker (cancelling sessions still running) and wait for
    /// the threads.
    async fn stop(self) {
        self.stop.send_replace(true);
        drop(self.senders);
        let threads = self.threads;
        let _ = tokio::task::spawn_blocking(move || {
            for thread in threads {
                let _ = thread.join();
            }
        })
        .await;
    }
}

async fn worker_loop(
    node: Arc<Node>,
    mut jobs: mpsc::UnboundedReceiver<Job>,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        tokio::select! {
            Some((stream, peer, permit)) = jobs.recv() => {
                let node = node.clone();
                tokio::spawn(async move {
                    match TcpStream::from_std(stream) {
                        Ok(stream) => session::serve(node, stream, peer).await,
                        Err(e) => tracing::warn!(error = %e, "cannot register connection"),
                    }
                    drop(permit);
                });
            }
            _ = stop.wait_for(|stopped| *stopped) => break,
        }
    }
    // Returning drops this worker's runtime, which cancels its sessions.
}

/// Serve clients from `listener` until `shutdown` completes, then stop
/// accepting, close idle sessions, and give sessions inside a transaction up
/// to `node.shutdown_timeout_ms` to finish before closing them.
pub async fn run(listener: TcpListener, node: Arc<Node>, shutdown: impl Future<Output = ()>) {
    let max = node.config.node.max_client_connections;
    let slots = Arc::new(Semaphore::new(max));
    let mut workers = match Workers::start(&node, node.config.worker_threads()) {
        Ok(workers) => workers,
        Err(e) => {
            tracing::error!(error = %e, "cannot start session workers");
            return;
        }
    };
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            accepted = listener.accept() => {
                let (stream, peer) = match accepted {
                    Ok(pair) => pair,
                    Err(e) => {
                        // EMFILE and friends: back off briefly instead of spinning.
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                        continue;
                    }
                };
                node.metrics.client_connections_total.increment(1);
                match slots.clone().try_acquire_owned() {
                    Ok(permit) => match stream.into_std() {
                        Ok(stream) => workers.dispatch((stream, peer, permit)),
                        Err(e) => tracing::warn!(error = %e, "cannot hand over connection"),
                    },
                    Err(_) => {
                        tokio::spawn(refuse_too_many(node.clone(), stream));
                    }
                }
            }
        }
    }
    drop(listener);
    let open = max - slots.available_permits();
    tracing::info!(sessions = open, "shutting down: no new connections");
    node.begin_drain();
    // Every session holds a slot; all slots back means all sessions ended.
    let all = u32::try_from(max).unwrap_or(u32::MAX);
    let drained =
        tokio::time::timeout(node.config.shutdown_timeout(), slots.acquire_many(all)).await;
    if drained.is_err() {
        tracing::warn!(
            sessions = max - slots.available_permits(),
            "shutdown timeout reached: closing remaining sessions"
        );
    }
    workers.stop().await;
}

async fn refuse_too_many(node: Arc<Node>, mut stream: TcpStream) {
    node.metrics.error(ErrorKind::Capacity);
    let mut out = BytesMut::new();
    protocol::error_response(
        &mut out,
        Severity::Fatal,
        "53300",
        "sorry, too many clients already",
        None,
    );
    let _ = tokio::time::timeout(std::time::Duration::from_secs(1), async {
        // Read the startup packet first so the client sees the error
        // rather than a reset.
        let _ = protocol::read_startup(&mut stream).await;
        let _ = stream.write_all(&out).await;
    })
    .await;
}

/// Bind a node's listeners and run it, with its metrics endpoint, until
/// `shutdown` completes. Returns once every session has ended.
pub async fn run_node(
    node: Arc<Node>,
    shutdown: impl Future<Output = ()>,
) -> Result<(), StartError> {
    let address = node.config.node.listen;
    let listener = TcpListener::bind(address)
        .await
        .map_err(|source| StartError::Bind {
            what: "client listener",
            address,
            source,
        })?;
    run_node_with(listener, node, shutdown).await
}

/// As [`run_node`], with an already-bound client listener.
pub async fn run_node_with(
    listener: TcpListener,
    node: Arc<Node>,
    shutdown: impl Future<Output = ()>,
) -> Result<(), StartError> {
    let mut background = JoinSet::new();
    if let Some(address) = node.config.node.metrics_listen {
        let http = TcpListener::bind(address)
            .await
            .map_err(|source| StartError::Bind {
                what: "metrics listener",
                address,
                source,
            })?;
        background.spawn(metrics::serve_http(
            http,
            node.metrics.clone(),
            node.draining.clone(),
        ));
    }
    background.spawn(metrics::run_upkeep(node.metrics.clone()));
    if let Some(cluster) = &node.config.cluster {
        let consensus =
            chorus_consensus::Consensus::start(cluster.consensus(node.config.node.id)).await?;
        let _ = node.consensus.set(consensus.clone());
        background.spawn(crate::ddl::run_applier(node.clone(), consensus.clone()));
        background.spawn(crate::sequences::run(node.clone(), consensus.clone()));
        background.spawn(crate::duties::reassign(node.clone(), consensus.clone()));
        background.spawn(crate::duties::reconcile_when_lost(
            node.clone(),
            consensus.clone(),
        ));
        background.spawn(raft_upkeep(node.clone(), consensus));
    }
    background.spawn(crate::replication::run_home_upkeep(node.clone()));
    background.spawn(crate::duties::run(node.clone()));
    background.spawn(health_checks(node.clone()));
    tracing::info!(
        node = node.config.node.id,
        listen = %listener.local_addr().map(|a| a.to_string()).unwrap_or_default(),
        home = %node.config.home_backend().name,
        "chorus node ready"
    );
    run(listener, node.clone(), shutdown).await;
    background.abort_all();
    if let Some(consensus) = node.consensus() {
        consensus.shutdown().await;
    }
    Ok(())
}

/// With replication, check every backend regularly: a login as the
/// replication user and `SELECT 1`, within the timeout. Sessions avoid
/// backends seen down (see [`Node::session_backends`]).
async fn health_checks(node: Arc<Node>) {
    let Some(config) = node.config.replication.clone() else {
        return;
    };
    let interval =
        std::time::Duration::from_millis(node.config.node.health_check_interval_ms.max(10));
    let limit = std::time::Duration::from_millis(node.config.node.health_check_timeout_ms.max(10));
    let mut clients = crate::replication::BackendClients::default();
    let mut tick = tokio::time::interval(interval);
    loop {
        tick.tick().await;
        for backend in &node.config.backends {
            let check = async {
                let client = clients.get(backend, &config, limit).await?;
                client.simple_query("SELECT 1").await.ok()
            };
            let up = tokio::time::timeout(limit, check)
                .await
                .ok()
                .flatten()
                .is_some();
            if !up {
                clients.forget(&backend.name);
            }
            node.set_backend_down(&backend.name, !up);
        }
        if node.config.node.routing == crate::config::Routing::Leader {
            elect_write_leader(&node).await;
        }
    }
}

/// Under write-leader routing, the Raft leader's node keeps a write leader
/// that is up: its own home backend if that is up, else the first one up.
async fn elect_write_leader(node: &Node) {
    let Some(consensus) = node.consensus() else {
        return;
    };
    let me = u64::from(node.config.node.id);
    if consensus.metrics().borrow().current_leader != Some(me) {
        return;
    }
    let current = consensus.state().read(|s| s.write_leader.clone());
    let is_up = |name: &str| {
        node.config
            .backends
            .iter()
            .position(|b| b.name == name)
            .is_some_and(|i| !node.backend_down[i].load(Ordering::SeqCst))
    };
    if current.as_deref().is_some_and(is_up) {
        return;
    }
    let home = node.config.home_backend();
    let Some(choice) = std::iter::once(home)
        .chain(node.config.backends.iter())
        .find(|b| is_up(&b.name))
    else {
        return;
    };
    let request = chorus_consensus::Request::SetWriteLeader {
        backend: choice.name.clone(),
        expected: current.clone(),
    };
    match consensus
        .propose(request, std::time::Duration::from_secs(2))
        .await
    {
        Ok(_) => tracing::info!(from = ?current, to = %choice.name, "write leader moved"),
        Err(e) => tracing::warn!(error = %e, "could not move the write leader"),
    }
}

/// Keep the Raft metrics current, and make sure the cluster state knows
/// this node (its addresses and home backend).
async fn raft_upkeep(node: Arc<Node>, consensus: Arc<chorus_consensus::Consensus>) {
    use chorus_consensus::{NodeInfo, NodeState, Request};
    let me = u64::from(node.config.node.id);
    let info = NodeInfo {
        raft_addr: node
            .config
            .cluster
            .as_ref()
            .map(|c| c.raft_listen.to_string())
            .unwrap_or_default(),
        listen: node.config.node.listen.to_string(),
        home_backend: node.config.home_backend().name.clone(),
        state: NodeState::Active,
    };
    let mut metrics = consensus.metrics();
    let mut registered = false;
    let mut retry = tokio::time::interval(std::time::Duration::from_secs(1));
    loop {
        {
            let m = metrics.borrow_and_update();
            node.metrics.raft_term.set(m.current_term as f64);
            node.metrics
                .raft_leader
                .set(m.current_leader.unwrap_or(0) as f64);
            node.metrics
                .raft_applied_index
                .set(m.last_applied.map_or(0, |l| l.index) as f64);
        }
        node.metrics
            .raft_commit_index
            .set(consensus.committed_index() as f64);
        node.metrics
            .raft_auth_failures
            .set(consensus.auth_failures() as f64);
        if !registered {
            let known = consensus.state().read(|s| s.nodes.get(&me) == Some(&info));
            registered = known
                || consensus
                    .propose(
                        Request::RegisterNode {
                            id: me,
                            info: info.clone(),
                        },
                        std::time::Duration::from_secs(2),
                    )
                    .await
                    .is_ok();
        }
        tokio::select! {
            _ = metrics.changed() => {}
            _ = retry.tick() => {}
        }
    }
}
