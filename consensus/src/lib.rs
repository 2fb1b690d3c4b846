//! Chorus cluster consensus: one Raft group (openraft 0.9) among the Chorus
//! nodes holds the cluster's metadata and the DDL log, persisted on disk
//! and replicated over authenticated TCP, or TLS (tls.rs).
//!
//! DML never goes through here: only schema changes and membership do, so
//! a node cut off from the majority keeps serving reads and writes.

// openraft's error types are large by design and are its trait signatures.
#![allow(clippy::result_large_err)]

pub mod network;
pub mod store;
mod tls;
pub mod types;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use openraft::error::{ClientWriteError, InitializeError, RaftError};
use openraft::{BasicNode, Raft, RaftMetrics, SnapshotPolicy};
use tokio::io::BufStream;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Mutex};
use tokio::time::Instant;

pub use network::ProposeFailure;
use network::{Conn, Credentials, Network, Peer, Reply, Rpc, HANDSHAKE_TIMEOUT};
pub use store::Shared;
use tls::Io;
pub use tls::RaftTls;
use types::TypeConfig;
pub use types::{
    ClusterState, DdlEntry, DdlLease, DdlProposal, Driver, LeaseHolder, NodeInfo, NodeState,
    Request, Response, Routing,
};

type Nid = u64;

/// How a node takes part in the cluster.
#[derive(Debug, Clone)]
pub struct ConsensusConfig {
    pub id: Nid,
    /// Where this node's Raft RPC listens.
    pub listen: SocketAddr,
    /// The shared cluster secret every node must know.
    pub secret: String,
    /// Other secrets accepted from other nodes, never used to prove this
    /// one: while the cluster secret is rotated (see docs/security.md).
    pub also_accepted: Vec<String>,
    /// TLS for Raft RPC (every node of the cluster must use it, or none).
    pub tls: Option<RaftTls>,
    /// Where the log and snapshots are kept.
    pub dir: PathBuf,
    /// The voters a new cluster starts with (id → Raft address); every
    /// node of a new cluster lists the same ones. A node not listed waits
    /// to be added (`chorus cluster add-node`).
    pub members: BTreeMap<Nid, String>,
    pub heartbeat: Duration,
    pub election_timeout: (Duration, Duration),
    /// A snapshot is taken after this many log entries.
    pub snapshot_every: u64,
    /// Log entries kept after a snapshot (older ones are purged; a node
    /// further behind catches up from the snapshot).
    pub keep_logs: u64,
}

/// Why a node could not start its consensus part.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot open the raft data in {dir}: {source}")]
    Storage {
        dir: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot listen for raft on {address}: {source}")]
    Bind {
        address: SocketAddr,
        source: std::io::Error,
    },
    #[error("raft: {0}")]
    Raft(String),
}

/// Why a proposal or a membership change did not complete.
#[derive(Debug, thiserror::Error)]
pub enum ProposeError {
    #[error("no Raft majority confirmed it within {0:?}")]
    Timeout(Duration),
    #[error("{0}")]
    Failed(String),
}

/// A running consensus member.
pub struct Consensus {
    id: Nid,
    raft: Raft<TypeConfig>,
    shared: Arc<Shared>,
    committed: watch::Receiver<u64>,
    credentials: Arc<Credentials>,
    /// Connections used to forward proposals to the leader.
    forwarders: Mutex<HashMap<Nid, Peer>>,
    auth_failures: AtomicU64,
    contacts: network::Contacts,
    /// Set on shutdown: the RPC listener and its connections stop.
    stopped: watch::Sender<bool>,
}

impl Consensus {
    /// Open the stored state, start Raft and its RPC listener, and form the
    /// cluster if this is a new one.
    pub async fn start(config: ConsensusConfig) -> Result<Arc<Consensus>, StartError> {
        let storage = |source| StartError::Storage {
            dir: config.dir.clone(),
            source,
        };
        let log = store::LogStore::open(&config.dir).map_err(storage)?;
        let machine = store::StateMachine::open(&config.dir).map_err(storage)?;
        let shared = machine.shared();
        let committed = log.committed();
        let raft_config = openraft::Config {
            cluster_name: "chorus".into(),
            heartbeat_interval: config.heartbeat.as_millis() as u64,
            election_timeout_min: config.election_timeout.0.as_millis() as u64,
            election_timeout_max: config.election_timeout.1.as_millis() as u64,
            snapshot_policy: SnapshotPolicy::LogsSinceLast(config.snapshot_every.max(1)),
            max_in_snapshot_log_to_keep: config.keep_logs,
            purge_batch_size: 1,
            ..Default::default()
        }
        .validate()
        .map_err(|e| StartError::Raft(e.to_string()))?;
        let listener =
            TcpListener::bind(config.listen)
                .await
                .map_err(|source| StartError::Bind {
                    address: config.listen,
                    source,
                })?;
        let contacts = network::Contacts::default();
        let credentials = Arc::new(Credentials {
            secret: config.secret.clone(),
            also_accepted: config.also_accepted.clone(),
            tls: config.tls.clone(),
        });
        let network = Network {
            credentials: credentials.clone(),
            me: config.id,
            contacts: contacts.clone(),
        };
        let raft = Raft::new(config.id, Arc::new(raft_config), network, log, machine)
            .await
            .map_err(|e| StartError::Raft(e.to_string()))?;
        let consensus = Arc::new(Consensus {
            id: config.id,
            raft,
            shared,
            committed,
            credentials,
            forwarders: Mutex::new(HashMap::new()),
            auth_failures: AtomicU64::new(0),
            contacts,
            stopped: watch::channel(false).0,
        });
        tokio::spawn(serve(listener, Arc::downgrade(&consensus)));
        let initialized = consensus
            .raft
            .is_initialized()
            .await
            .map_err(|e| StartError::Raft(e.to_string()))?;
        if !initialized && config.members.contains_key(&config.id) {
            let members: BTreeMap<Nid, BasicNode> = config
                .members
                .iter()
                .map(|(id, addr)| (*id, BasicNode::new(addr)))
                .collect();
            match consensus.raft.initialize(members).await {
                Ok(()) | Err(RaftError::APIError(InitializeError::NotAllowed(_))) => {}
                Err(e) => return Err(StartError::Raft(e.to_string())),
            }
        }
        Ok(consensus)
    }

    pub fn id(&self) -> Nid {
        self.id
    }

    /// When `node` last answered one of this member's Raft RPCs (a leader
    /// sends every follower a heartbeat each `heartbeat` interval).
    pub fn last_contact(&self, node: Nid) -> Option<std::time::Instant> {
        self.contacts.lock().ok()?.get(&node).copied()
    }

    /// The applied cluster state.
    pub fn state(&self) -> &Arc<Shared> {
        &self.shared
    }

    /// openraft's metrics (term, leader, applied index, …).
    pub fn metrics(&self) -> watch::Receiver<RaftMetrics<Nid, BasicNode>> {
        self.raft.metrics()
    }

    /// This member's Raft role now: "leader", "follower", "candidate",
    /// "learner" or "shutdown".
    pub fn role(&self) -> &'static str {
        match self.raft.metrics().borrow().state {
            openraft::ServerState::Leader => "leader",
            openraft::ServerState::Follower => "follower",
            openraft::ServerState::Candidate => "candidate",
            openraft::ServerState::Learner => "learner",
            openraft::ServerState::Shutdown => "shutdown",
        }
    }

    /// The cluster's members as this member's Raft log has them, by id:
    /// each one's Raft address and whether it votes (a node being added is
    /// a learner until it has caught up).
    pub fn members(&self) -> Vec<(Nid, String, bool)> {
        let metrics = self.raft.metrics();
        let m = metrics.borrow();
        let membership = m.membership_config.membership();
        let voters: BTreeSet<Nid> = membership.voter_ids().collect();
        membership
            .nodes()
            .map(|(id, node)| (*id, node.addr.clone(), voters.contains(id)))
            .collect()
    }

    /// The committed log index as this node knows it.
    pub fn committed_index(&self) -> u64 {
        *self.committed.borrow()
    }

    /// Connections refused: a wrong cluster secret, or a failed TLS handshake.
    pub fn auth_failures(&self) -> u64 {
        self.auth_failures.load(Ordering::Relaxed)
    }

    /// Stop Raft (the RPC listener stops with the last handle).
    pub async fn shutdown(&self) {
        self.stopped.send_replace(true);
        let _ = self.raft.shutdown().await;
    }

    /// Commit a command through the leader, wherever it is, within
    /// `timeout`. A retried proposal that was committed the first time is
    /// recognised by the state machine (see [`ClusterState::apply`]).
    pub async fn propose(
        &self,
        request: Request,
        timeout: Duration,
    ) -> Result<Response, ProposeError> {
        let reply = self
            .on_leader(Rpc::Propose(request), timeout, |me, rpc| async move {
                match rpc {
                    Rpc::Propose(request) => Reply::Proposed(me.propose_here(request).await),
                    _ => Reply::Proposed(Err(ProposeFailure::Failed("unexpected request".into()))),
                }
            })
            .await?;
        match reply {
            Reply::Proposed(Ok(response)) => Ok(response),
            Reply::Proposed(Err(e)) => Err(ProposeError::Failed(e.to_string())),
            _ => Err(ProposeError::Failed("unexpected reply".into())),
        }
    }

    /// Add a node (as a learner, then a voter) within `timeout`.
    pub async fn add_node(
        &self,
        id: Nid,
        addr: String,
        timeout: Duration,
    ) -> Result<String, ProposeError> {
        self.admin(Rpc::AddNode { id, addr }, timeout).await
    }

    /// Remove a node from the voters and learners within `timeout`.
    pub async fn remove_node(&self, id: Nid, timeout: Duration) -> Result<String, ProposeError> {
        self.admin(Rpc::RemoveNode { id }, timeout).await
    }

    async fn admin(&self, rpc: Rpc, timeout: Duration) -> Result<String, ProposeError> {
        let reply = self
            .on_leader(rpc, timeout, |me, rpc| async move {
                Reply::Admin(me.admin_here(rpc).await)
            })
            .await?;
        match reply {
            Reply::Admin(Ok(text)) => Ok(text),
            Reply::Admin(Err(e)) => Err(ProposeError::Failed(e.to_string())),
            _ => Err(ProposeError::Failed("unexpected reply".into())),
        }
    }

    /// Run `rpc` on the leader: here when this node leads, else forwarded.
    /// Retries while there is no leader or the leader changes, until
    /// `timeout`.
    async fn on_leader<'a, F, Fut>(
        &'a self,
        rpc: Rpc,
        timeout: Duration,
        here: F,
    ) -> Result<Reply, ProposeError>
    where
        F: Fn(&'a Consensus, Rpc) -> Fut,
        Fut: std::future::Future<Output = Reply>,
    {
        let deadline = Instant::now() + timeout;
        let rpc_json = serde_json::to_vec(&rpc).map_err(|e| ProposeError::Failed(e.to_string()))?;
        loop {
            let now = Instant::now();
            if now >= deadline {
                return Err(ProposeError::Timeout(timeout));
            }
            let leader = {
                let metrics = self.raft.metrics();
                let m = metrics.borrow();
                m.current_leader.and_then(|l| {
                    m.membership_config
                        .membership()
                        .get_node(&l)
                        .map(|n| (l, n.addr.clone()))
                })
            };
            let copy = || -> Result<Rpc, ProposeError> {
                serde_json::from_slice(&rpc_json).map_err(|e| ProposeError::Failed(e.to_string()))
            };
            let reply = match leader {
                Some((id, _)) if id == self.id => {
                    match tokio::time::timeout_at(deadline, here(self, copy()?)).await {
                        Ok(reply) => reply,
                        Err(_) => return Err(ProposeError::Timeout(timeout)),
                    }
                }
                Some((id, addr)) => {
                    let mut forwarders = self.forwarders.lock().await;
                    let peer = forwarders
                        .entry(id)
                        .or_insert_with(|| Peer::new(addr, self.credentials.clone(), self.id));
                    match peer.call(&copy()?, deadline - now).await {
                        Ok(reply) => reply,
                        // (A refusal too: a node with the wrong secret is
                        // not the leader for long.)
                        Err(e) => {
                            tracing::debug!(leader = id, error = %e, "forwarding to the leader failed");
                            forwarders.remove(&id);
                            drop(forwarders);
                            tokio::time::sleep(Duration::from_millis(50)).await;
                            continue;
                        }
                    }
                }
                None => {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                }
            };
            match &reply {
                Reply::Proposed(Err(ProposeFailure::NotLeader(_)))
                | Reply::Admin(Err(ProposeFailure::NotLeader(_))) => {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                }
                _ => return Ok(reply),
            }
        }
    }

    async fn propose_here(&self, request: Request) -> Result<Response, ProposeFailure> {
        match self.raft.client_write(request).await {
            Ok(written) => Ok(written.data),
            Err(RaftError::APIError(ClientWriteError::ForwardToLeader(f))) => {
                Err(ProposeFailure::NotLeader(f.leader_id))
            }
            // Stopped: another node will lead.
            Err(RaftError::Fatal(_)) => Err(ProposeFailure::NotLeader(None)),
            Err(e) => Err(ProposeFailure::Failed(e.to_string())),
        }
    }

    async fn admin_here(&self, rpc: Rpc) -> Result<String, ProposeFailure> {
        let not_leader = |e: &dyn std::fmt::Display| -> ProposeFailure {
            let text = e.to_string();
            if text.contains("forward") || text.contains("leader") {
                ProposeFailure::NotLeader(None)
            } else {
                ProposeFailure::Failed(text)
            }
        };
        let voters = || -> BTreeSet<Nid> {
            self.raft
                .metrics()
                .borrow()
                .membership_config
                .membership()
                .voter_ids()
                .collect()
        };
        match rpc {
            Rpc::AddNode { id, addr } => {
                self.raft
                    .add_learner(id, BasicNode::new(&addr), true)
                    .await
                    .map_err(|e| not_leader(&e))?;
                let mut members = voters();
                members.insert(id);
                self.raft
                    .change_membership(members, false)
                    .await
                    .map_err(|e| not_leader(&e))?;
                Ok(format!("node {id} ({addr}) is a voter"))
            }
            Rpc::RemoveNode { id } => {
                let mut members = voters();
                members.remove(&id);
                if members.is_empty() {
                    return Err(ProposeFailure::Failed(
                        "cannot remove the last voter".into(),
                    ));
                }
                self.raft
                    .change_membership(members, false)
                    .await
                    .map_err(|e| not_leader(&e))?;
                // Its home backend is no longer the cluster's: no node is
                // its owner or is handed its duties (its sequence id is
                // kept, never given again).
                let info = self.shared.read(|s| s.nodes.get(&id).cloned());
                if let Some(info) = info.filter(|i| i.state != NodeState::Parted) {
                    let parted = NodeInfo {
                        state: NodeState::Parted,
                        ..info
                    };
                    self.propose_here(Request::RegisterNode { id, info: parted })
                        .await?;
                }
                Ok(format!("node {id} removed"))
            }
            _ => Err(ProposeFailure::Failed("unexpected request".into())),
        }
    }
}

/// Send a membership change to any node of the cluster (which forwards it
/// to the leader); the admin command's client.
pub async fn admin_request(
    addr: &str,
    secret: &str,
    tls: Option<&RaftTls>,
    add: Option<(Nid, String)>,
    remove: Option<Nid>,
    timeout: Duration,
) -> Result<String, String> {
    let rpc = match (add, remove) {
        (Some((id, addr)), None) => Rpc::AddNode { id, addr },
        (None, Some(id)) => Rpc::RemoveNode { id },
        _ => return Err("give exactly one change".into()),
    };
    let credentials = Arc::new(Credentials {
        secret: secret.to_owned(),
        also_accepted: Vec::new(),
        tls: tls.cloned(),
    });
    let mut peer = Peer::new(addr.to_owned(), credentials, 0);
    match peer.call(&rpc, timeout).await {
        Ok(Reply::Admin(Ok(text))) => Ok(text),
        Ok(Reply::Admin(Err(e))) => Err(e.to_string()),
        Ok(_) => Err("unexpected reply".into()),
        Err(e) => Err(e.to_string()),
    }
}

/// Accept Raft RPC connections until the consensus stops.
async fn serve(listener: TcpListener, consensus: std::sync::Weak<Consensus>) {
    let Some(mut stopped) = consensus.upgrade().map(|c| c.stopped.subscribe()) else {
        return;
    };
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = stopped.wait_for(|s| *s) => return,
        };
        let Ok((stream, peer)) = accepted else {
            continue;
        };
        let Some(me) = consensus.upgrade() else {
            return;
        };
        let mut stopped = stopped.clone();
        tokio::spawn(async move {
            tokio::select! {
                result = serve_connection(&me, stream) => {
                    if let Err(e) = result {
                        tracing::debug!(%peer, error = %e, "raft connection ended");
                    }
                }
                _ = stopped.wait_for(|s| *s) => {}
            }
        });
    }
}

async fn serve_connection(me: &Consensus, stream: TcpStream) -> std::io::Result<()> {
    let _ = stream.set_nodelay(true);
    let peer = stream.peer_addr()?;
    let handshake = tokio::time::timeout(HANDSHAKE_TIMEOUT, async {
        let stream: Box<dyn Io> = match &me.credentials.tls {
            Some(tls) => match tls.accept(stream).await {
                Ok(stream) => stream,
                Err(e) => return Err(format!("TLS handshake failed: {e}")),
            },
            None => Box::new(stream),
        };
        let mut stream: Conn = BufStream::new(stream);
        network::handshake_server(&mut stream, &me.credentials)
            .await
            .map(|_node| stream)
    })
    .await;
    let mut stream = match handshake {
        Ok(Ok(stream)) => stream,
        Ok(Err(reason)) => {
            me.auth_failures.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(%peer, %reason, "raft connection refused");
            return Ok(());
        }
        Err(_) => return Ok(()),
    };
    loop {
        let rpc: Rpc = network::read_frame(&mut stream).await?;
        let reply = match rpc {
            Rpc::Append(req) => Reply::Append(me.raft.append_entries(req).await),
            Rpc::Vote(req) => Reply::Vote(me.raft.vote(req).await),
            Rpc::Snapshot(req) => Reply::Snapshot(me.raft.install_snapshot(req).await),
            Rpc::Propose(request) => Reply::Proposed(me.propose_here(request).await),
            rpc @ (Rpc::AddNode { .. } | Rpc::RemoveNode { .. }) => {
                // Forwarded to the leader if need be, like a local request.
                let timeout = Duration::from_secs(30);
                let result = me.admin(rpc, timeout).await;
                Reply::Admin(result.map_err(|e| ProposeFailure::Failed(e.to_string())))
            }
        };
        network::write_frame(&mut stream, &reply).await?;
    }
}
