//! Raft RPC between Chorus nodes: length-prefixed JSON frames over TCP
//! (or TLS, see tls.rs), after a mutual challenge-response on the cluster
//! secret (HMAC-SHA256),
//! so that a process without the secret can neither join nor impersonate
//! a node. openraft leaves the transport to the application; this one is
//! small because the traffic is small (heartbeats, DDL, membership).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use hmac::{Hmac, Mac};
use openraft::error::Unreachable;
use openraft::error::{InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use openraft::BasicNode;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use sha2::Sha256;
use tokio::io::{AsyncReadExt, AsyncWriteExt, BufStream};
use tokio::net::TcpStream;

use crate::tls::{Io, RaftTls};

use crate::types::{Request, Response, TypeConfig};

type Nid = u64;

/// Largest frame accepted (a snapshot chunk is far smaller).
const MAX_FRAME: usize = 64 << 20;

/// Time allowed for connecting and the handshake.
pub(crate) const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

/// A request from one node (or the admin command) to another.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) enum Rpc {
    Append(AppendEntriesRequest<TypeConfig>),
    Vote(VoteRequest<Nid>),
    Snapshot(InstallSnapshotRequest<TypeConfig>),
    /// Propose a command (sent to the leader).
    Propose(Request),
    /// Membership changes (sent to any node; forwarded to the leader).
    AddNode {
        id: Nid,
        addr: String,
    },
    RemoveNode {
        id: Nid,
    },
}

/// Why a proposal was not committed by the node asked.
#[derive(Debug, Clone, Serialize, Deserialize, thiserror::Error)]
pub enum ProposeFailure {
    #[error("node is not the leader")]
    NotLeader(Option<Nid>),
    #[error("{0}")]
    Failed(String),
}

#[derive(Debug, Serialize, Deserialize)]
pub(crate) enum Reply {
    Append(Result<AppendEntriesResponse<Nid>, RaftError<Nid>>),
    Vote(Result<VoteResponse<Nid>, RaftError<Nid>>),
    Snapshot(Result<InstallSnapshotResponse<Nid>, RaftError<Nid, InstallSnapshotError>>),
    Proposed(Result<Response, ProposeFailure>),
    Admin(Result<String, ProposeFailure>),
}

#[derive(Serialize, Deserialize)]
struct Hello {
    node: Nid,
    nonce: String,
}

#[derive(Serialize, Deserialize)]
struct Challenge {
    nonce: String,
    proof: String,
}

#[derive(Serialize, Deserialize)]
struct Proof {
    proof: String,
}

#[derive(Serialize, Deserialize)]
enum Verdict {
    Welcome,
    Refused(String),
}

/// Why a call failed.
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    #[error("cannot reach {addr}: {source}")]
    Unreachable {
        addr: String,
        source: std::io::Error,
    },
    #[error("{addr} refused us: {reason}")]
    Refused { addr: String, reason: String },
    /// No answer in time. `connected`: the handshake had completed, so
    /// the peer is up and only slow (a loaded machine, a slow disk).
    #[error("{addr} did not answer within {0:?}", .timeout)]
    Timeout {
        addr: String,
        timeout: Duration,
        connected: bool,
    },
    #[error("connection to {addr} failed: {source}")]
    Io {
        addr: String,
        source: std::io::Error,
    },
}

/// A buffered Raft RPC connection.
pub(crate) type Conn = BufStream<Box<dyn Io>>;

/// What a node proves itself with: the cluster secret, and its TLS
/// material when Raft RPC runs over TLS.
#[derive(Debug)]
pub(crate) struct Credentials {
    /// The secret this node proves itself with.
    pub(crate) secret: String,
    /// Other secrets it accepts from the other side (while the cluster
    /// secret is rotated), never proves itself with.
    pub(crate) also_accepted: Vec<String>,
    pub(crate) tls: Option<RaftTls>,
}

impl Credentials {
    /// Whether `proof` proves one of the accepted secrets.
    fn accepts(&self, parts: &[&[u8]], proof: &str) -> bool {
        std::iter::once(&self.secret)
            .chain(&self.also_accepted)
            .any(|secret| verify(secret, parts, proof))
    }
}

fn invalid(what: &str) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, what.to_owned())
}

pub(crate) async fn write_frame<T: Serialize>(stream: &mut Conn, value: &T) -> std::io::Result<()> {
    let body = serde_json::to_vec(value)?;
    stream.write_all(&(body.len() as u32).to_be_bytes()).await?;
    stream.write_all(&body).await?;
    stream.flush().await
}

pub(crate) async fn read_frame<T: DeserializeOwned>(stream: &mut Conn) -> std::io::Result<T> {
    let len = stream.read_u32().await? as usize;
    if len > MAX_FRAME {
        return Err(invalid("frame too large"));
    }
    let mut body = vec![0; len];
    stream.read_exact(&mut body).await?;
    Ok(serde_json::from_slice(&body)?)
}

fn nonce() -> String {
    let mut bytes = [0u8; 32];
    rand::RngCore::fill_bytes(&mut rand::rng(), &mut bytes);
    hex(&bytes)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(text: &str) -> Option<Vec<u8>> {
    if text.len() % 2 != 0 {
        return None;
    }
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(text.get(i..i + 2)?, 16).ok())
        .collect()
}

fn mac(secret: &str, parts: &[&[u8]]) -> Hmac<Sha256> {
    // HMAC accepts keys of any length, so this cannot fail.
    let mut mac = match Hmac::<Sha256>::new_from_slice(secret.as_bytes()) {
        Ok(mac) => mac,
        Err(_) => unreachable!("HMAC takes keys of any length"),
    };
    for part in parts {
        mac.update(&(part.len() as u32).to_be_bytes());
        mac.update(part);
    }
    mac
}

fn prove(secret: &str, parts: &[&[u8]]) -> String {
    hex(&mac(secret, parts).finalize().into_bytes())
}

/// Constant-time check of a proof.
fn verify(secret: &str, parts: &[&[u8]], proof: &str) -> bool {
    unhex(proof).is_some_and(|bytes| mac(secret, parts).verify_slice(&bytes).is_ok())
}

/// Why a handshake failed.
enum HandshakeError {
    /// The other side does not share our secret.
    Refused(String),
    Io(std::io::Error),
}

impl From<std::io::Error> for HandshakeError {
    fn from(e: std::io::Error) -> Self {
        HandshakeError::Io(e)
    }
}

/// The client side of the handshake. `node` is the caller's node id (0 for
/// the admin command).
async fn handshake_client(
    stream: &mut Conn,
    credentials: &Credentials,
    node: Nid,
) -> Result<(), HandshakeError> {
    let secret = credentials.secret.as_str();
    let mine = nonce();
    write_frame(
        stream,
        &Hello {
            node,
            nonce: mine.clone(),
        },
    )
    .await?;
    let challenge: Challenge = read_frame(stream).await?;
    // Our proof goes first whatever the server proved, so that a server
    // refusing a wrong secret can tell (and count) it.
    let proof = prove(
        secret,
        &[
            b"client",
            challenge.nonce.as_bytes(),
            mine.as_bytes(),
            &node.to_be_bytes(),
        ],
    );
    write_frame(stream, &Proof { proof }).await?;
    let verdict: Verdict = read_frame(stream).await?;
    if let Verdict::Refused(reason) = verdict {
        return Err(HandshakeError::Refused(reason));
    }
    if !credentials.accepts(
        &[b"server", mine.as_bytes(), challenge.nonce.as_bytes()],
        &challenge.proof,
    ) {
        return Err(HandshakeError::Refused(
            "authentication failed: the node does not know the cluster secret".into(),
        ));
    }
    Ok(())
}

/// The server side of the handshake; returns the caller's node id.
pub(crate) async fn handshake_server(
    stream: &mut Conn,
    credentials: &Credentials,
) -> Result<Nid, String> {
    let secret = credentials.secret.as_str();
    let hello: Hello = read_frame(stream).await.map_err(|e| e.to_string())?;
    let mine = nonce();
    let proof = prove(
        secret,
        &[b"server", hello.nonce.as_bytes(), mine.as_bytes()],
    );
    write_frame(
        stream,
        &Challenge {
            nonce: mine.clone(),
            proof,
        },
    )
    .await
    .map_err(|e| e.to_string())?;
    let answer: Proof = read_frame(stream).await.map_err(|e| e.to_string())?;
    if credentials.accepts(
        &[
            b"client",
            mine.as_bytes(),
            hello.nonce.as_bytes(),
            &hello.node.to_be_bytes(),
        ],
        &answer.proof,
    ) {
        write_frame(stream, &Verdict::Welcome)
            .await
            .map_err(|e| e.to_string())?;
        Ok(hello.node)
    } else {
        let _ = write_frame(
            stream,
            &Verdict::Refused("authentication failed: wrong cluster secret".into()),
        )
        .await;
        Err(format!(
            "node {} failed authentication (wrong cluster secret)",
            hello.node
        ))
    }
}

/// A connection to one node, made on first use and remade after a failure.
pub(crate) struct Peer {
    addr: String,
    credentials: Arc<Credentials>,
    me: Nid,
    conn: Option<Conn>,
}

impl Peer {
    pub(crate) fn new(addr: String, credentials: Arc<Credentials>, me: Nid) -> Peer {
        Peer {
            addr,
            credentials,
            me,
            conn: None,
        }
    }

    /// Send one request and wait for its answer, within `timeout`.
    pub(crate) async fn call(&mut self, rpc: &Rpc, timeout: Duration) -> Result<Reply, CallError> {
        let result = tokio::time::timeout(timeout, self.call_inner(rpc)).await;
        match result {
            Ok(Ok(reply)) => Ok(reply),
            Ok(Err(e)) => {
                self.conn = None;
                Err(e)
            }
            Err(_) => {
                let connected = self.conn.take().is_some();
                Err(CallError::Timeout {
                    addr: self.addr.clone(),
                    timeout,
                    connected,
                })
            }
        }
    }

    async fn call_inner(&mut self, rpc: &Rpc) -> Result<Reply, CallError> {
        if self.conn.is_none() {
            let stream =
                TcpStream::connect(&self.addr)
                    .await
                    .map_err(|source| CallError::Unreachable {
                        addr: self.addr.clone(),
                        source,
                    })?;
            let _ = stream.set_nodelay(true);
            // (A connection closed before the handshake ends counts as no
            // connection: something listens there that is not a member
            // yet, or not any more, such as a proxy whose target is down.)
            let stream: Box<dyn Io> = match &self.credentials.tls {
                Some(tls) => tls.connect(&self.addr, stream).await.map_err(|source| {
                    CallError::Unreachable {
                        addr: self.addr.clone(),
                        source,
                    }
                })?,
                None => Box::new(stream),
            };
            let mut stream = BufStream::new(stream);
            handshake_client(&mut stream, &self.credentials, self.me)
                .await
                .map_err(|e| match e {
                    HandshakeError::Refused(reason) => CallError::Refused {
                        addr: self.addr.clone(),
                        reason,
                    },
                    HandshakeError::Io(source) => CallError::Unreachable {
                        addr: self.addr.clone(),
                        source,
                    },
                })?;
            self.conn = Some(stream);
        }
        let Some(stream) = self.conn.as_mut() else {
            return Err(CallError::Io {
                addr: self.addr.clone(),
                source: invalid("no connection"),
            });
        };
        let io = |source| CallError::Io {
            addr: self.addr.clone(),
            source,
        };
        write_frame(stream, rpc).await.map_err(io)?;
        read_frame(stream).await.map_err(io)
    }
}

/// Makes the connections openraft replicates over.
pub(crate) struct Network {
    pub(crate) credentials: Arc<Credentials>,
    pub(crate) me: Nid,
    pub(crate) contacts: Contacts,
}

/// When each peer last answered an RPC of this member's (as leader: its
/// heartbeats), which tells the leader which nodes are alive.
pub(crate) type Contacts = Arc<std::sync::Mutex<HashMap<Nid, std::time::Instant>>>;

impl RaftNetworkFactory<TypeConfig> for Network {
    type Network = PeerClient;

    async fn new_client(&mut self, target: Nid, node: &BasicNode) -> PeerClient {
        PeerClient {
            target,
            peer: Peer::new(node.addr.clone(), self.credentials.clone(), self.me),
            contacts: self.contacts.clone(),
        }
    }
}

/// openraft's view of one peer.
pub(crate) struct PeerClient {
    target: Nid,
    peer: Peer,
    contacts: Contacts,
}

impl PeerClient {
    async fn send<E: std::error::Error>(
        &mut self,
        rpc: Rpc,
        option: &RPCOption,
    ) -> Result<Reply, RPCError<Nid, BasicNode, E>> {
        match self.peer.call(&rpc, option.hard_ttl()).await {
            Ok(reply) => {
                if let Ok(mut contacts) = self.contacts.lock() {
                    contacts.insert(self.target, std::time::Instant::now());
                }
                Ok(reply)
            }
            // openraft backs off from an unreachable peer before it tries
            // again; after any other error it retries at once, which
            // against a peer that accepts and closes every connection (or
            // refuses our secret) is a busy loop. A peer that finished the
            // handshake and then answered late is up but slow: backing off
            // (500 ms) would starve it of heartbeats and call an election,
            // so the next heartbeat retries it on a new connection. A
            // paused peer fails that new connection's handshake, which
            // backs off.
            Err(
                e @ (CallError::Unreachable { .. }
                | CallError::Timeout {
                    connected: false, ..
                }
                | CallError::Refused { .. }),
            ) => Err(RPCError::Unreachable(Unreachable::new(&e))),
            Err(e) => Err(RPCError::Network(NetworkError::new(&e))),
        }
    }

    fn remote<T, E: std::error::Error>(
        &self,
        result: Result<T, RaftError<Nid, E>>,
    ) -> Result<T, RPCError<Nid, BasicNode, RaftError<Nid, E>>> {
        result.map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e)))
    }
}

fn unexpected<E: std::error::Error>() -> RPCError<Nid, BasicNode, E> {
    RPCError::Network(NetworkError::new(&invalid("unexpected reply")))
}

impl RaftNetwork<TypeConfig> for PeerClient {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<Nid>, RPCError<Nid, BasicNode, RaftError<Nid>>> {
        match self.send(Rpc::Append(rpc), &option).await? {
            Reply::Append(result) => self.remote(result),
            _ => Err(unexpected()),
        }
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<
        InstallSnapshotResponse<Nid>,
        RPCError<Nid, BasicNode, RaftError<Nid, InstallSnapshotError>>,
    > {
        match self.send(Rpc::Snapshot(rpc), &option).await? {
            Reply::Snapshot(result) => self.remote(result),
            _ => Err(unexpected()),
        }
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<Nid>,
        option: RPCOption,
    ) -> Result<VoteResponse<Nid>, RPCError<Nid, BasicNode, RaftError<Nid>>> {
        match self.send(Rpc::Vote(rpc), &option).await? {
            Reply::Vote(result) => self.remote(result),
            _ => Err(unexpected()),
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn credentials() -> Credentials {
        Credentials {
            secret: "s3cret".into(),
            also_accepted: Vec::new(),
            tls: None,
        }
    }

    fn client_of(addr: String) -> PeerClient {
        PeerClient {
            target: 2,
            peer: Peer::new(addr, Arc::new(credentials()), 1),
            contacts: Contacts::default(),
        }
    }

    fn vote() -> Rpc {
        Rpc::Vote(VoteRequest::new(openraft::Vote::new(1, 1), None))
    }

    #[tokio::test]
    async fn a_late_answer_after_the_handshake_is_retried_at_once_a_silent_peer_backed_off() {
        let option = RPCOption::new(Duration::from_millis(100));
        // A member that completes the handshake, reads the call, and
        // answers only after the caller's time is up: up, but slow.
        let slow = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = slow.local_addr().unwrap().to_string();
        let server = tokio::spawn(async move {
            let (stream, _) = slow.accept().await.unwrap();
            let stream: Box<dyn Io> = Box::new(stream);
            let mut stream = BufStream::new(stream);
            handshake_server(&mut stream, &credentials()).await.unwrap();
            let _call: Rpc = read_frame(&mut stream).await.unwrap();
            // Held until the caller gives up and closes.
            let _ = read_frame::<Rpc>(&mut stream).await;
        });
        let mut client = client_of(addr);
        let late = client.send::<std::io::Error>(vote(), &option).await;
        assert!(matches!(late, Err(RPCError::Network(_))), "{late:?}");
        tokio::time::timeout(Duration::from_secs(10), server)
            .await
            .unwrap()
            .unwrap();

        // A member whose kernel accepts the connection but which never
        // answers the handshake (a paused process): openraft backs off.
        let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut client = client_of(silent.local_addr().unwrap().to_string());
        let unanswered = client.send::<std::io::Error>(vote(), &option).await;
        assert!(
            matches!(unanswered, Err(RPCError::Unreachable(_))),
            "{unanswered:?}"
        );
        drop(silent);
    }

    #[test]
    fn a_proof_checks_only_with_the_same_secret_and_parts() {
        let proof = prove("s3cret", &[b"client", b"n1", b"n2"]);
        assert!(verify("s3cret", &[b"client", b"n1", b"n2"], &proof));
        assert!(!verify("other", &[b"client", b"n1", b"n2"], &proof));
        assert!(!verify("s3cret", &[b"client", b"n1", b"n3"], &proof));
        // Length-prefixed parts: moving a byte between parts changes the proof.
        assert!(!verify("s3cret", &[b"client", b"n", b"1n2"], &proof));
        assert!(!verify("s3cret", &[b"client", b"n1", b"n2"], "zz"));
    }
}
