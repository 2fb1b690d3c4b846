//! A Chorus node running: the client listener, the background work
//! (health checks, replication duties, the DDL log, Raft upkeep), and
//! graceful shutdown. `run` takes an already-bound listener so tests can
//! bind `127.0.0.1:0`. The node's shared state is `node::Node`.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::BytesMut;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;

use crate::metrics::{self, ErrorKind};
use crate::session;
use crate::wire::protocol::{self, Severity};

pub use crate::node::{Node, StartError};

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
    let drained = tokio::time::timeout(
        node.live().config.shutdown_timeout(),
        slots.acquire_many(all),
    )
    .await;
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
        node.set_consensus(consensus.clone());
        background.spawn(crate::cluster::ddl::run_applier(
            node.clone(),
            consensus.clone(),
        ));
        background.spawn(crate::cluster::sequences::run(
            node.clone(),
            consensus.clone(),
        ));
        background.spawn(crate::cluster::databases::follow(
            node.clone(),
            consensus.clone(),
        ));
        background.spawn(crate::cluster::duties::reassign(
            node.clone(),
            consensus.clone(),
        ));
        background.spawn(crate::cluster::duties::reconcile_when_lost(
            node.clone(),
            consensus.clone(),
        ));
        background.spawn(follow_routing(node.clone(), consensus.clone()));
        background.spawn(raft_upkeep(node.clone(), consensus));
    }
    background.spawn(crate::cluster::replication::run_home_upkeep(node.clone()));
    background.spawn(crate::cluster::duties::run(node.clone()));
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

/// With replication, check every backend regularly: `SELECT 1` as the
/// replication user, on a control connection of the main database's pool
/// (a new login when the last one closed), within the timeout. Sessions
/// avoid backends seen down (see [`Node::session_backends`]).
async fn health_checks(node: Arc<Node>) {
    let Some(control) = node.main_lane().map(|lane| lane.control.clone()) else {
        return;
    };
    let interval =
        std::time::Duration::from_millis(node.config.node.health_check_interval_ms.max(10));
    let limit = std::time::Duration::from_millis(node.config.node.health_check_timeout_ms.max(10));
    let mut tick = tokio::time::interval(interval);
    loop {
        tick.tick().await;
        for backend in node.backends().iter() {
            // (A connection that failed or hangs is not asked again.)
            let up = control
                .simple_query(backend, limit, "SELECT 1")
                .await
                .is_ok();
            node.set_backend_down(&backend.name, !up);
        }
        if node.config.node.routing == crate::config::Routing::Leader {
            elect_write_leader(&node).await;
        }
    }
}

/// Keep where this node's sessions may go the cluster state's (drained
/// backends, the write leader; see `Node::set_routing`).
async fn follow_routing(node: Arc<Node>, consensus: Arc<chorus_consensus::Consensus>) {
    let mut routing = consensus.state().routing();
    loop {
        let now = routing.borrow_and_update().clone();
        node.set_routing(&now);
        if routing.changed().await.is_err() {
            return;
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
        node.backends().iter().any(|b| b.name == name)
            && !node.is_backend_down(name)
            && !node.is_copying(name)
    };
    if current.as_deref().is_some_and(is_up) {
        return;
    }
    let home = node.config.home_backend();
    let backends = node.backends();
    let Some(choice) = std::iter::once(home)
        .chain(backends.iter())
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
