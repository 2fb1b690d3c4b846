//! One client session: startup (TLS, protocol negotiation, cancel
//! requests), authentication, the login to the home backend, then the relay
//! that moves protocol messages between client and backend as raw bytes.
//!
//! The relay frames the byte stream (type byte + length) and decodes only
//! the messages it acts on: Query, Parse, Bind, Execute, Close, Sync and
//! Terminate from the client, ReadyForQuery and ErrorResponse from the
//! backend. Everything else (DataRow, CopyData, …) streams through without
//! being buffered whole.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU32, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::{Buf, BytesMut};
use chorus_router::{ddl_route, first_keyword, split_statements, DdlRoute, StatementClass};
use rand::RngCore;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::watch;

use crate::auth::{self, AuthError, ScramServer};
use crate::backend::{self, BackendConnection, BackendError, LoginParams};
use crate::cluster::ddl_lease::{self, LeaseRefusal};
use crate::config::{AuthMethod, CommitScope, TimeoutAction};
use crate::ddl::{self, DdlJob, JobStep};
use crate::frontend::{is_inspected, query_stamps, FrontendEvent, FrontendState};
use crate::metrics::{ErrorKind, GaugeGuard};
use crate::node::Node;
use crate::protocol::{self, read_message, ProtocolError, Severity, StartupPacket};
use crate::scope::{self, DdlScopeChange, ScopeChange};
use crate::stamp::{self, DdlStage, DdlStamp, StampKind, Swallower, Verdict};

/// Bytes read from a socket at a time.
const READ_CHUNK: usize = 16 * 1024;

/// A client connection, before or after TLS.
enum ClientStream {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::server::TlsStream<TcpStream>>),
    /// Moved out (into a TLS handshake that failed); every operation fails.
    Closed,
}

fn closed() -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::NotConnected, "connection closed")
}

impl AsyncRead for ClientStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            ClientStream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            ClientStream::Tls(s) => Pin::new(s).poll_read(cx, buf),
            ClientStream::Closed => Poll::Ready(Err(closed())),
        }
    }
}

impl AsyncWrite for ClientStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            ClientStream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            ClientStream::Tls(s) => Pin::new(s).poll_write(cx, buf),
            ClientStream::Closed => Poll::Ready(Err(closed())),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            ClientStream::Plain(s) => Pin::new(s).poll_flush(cx),
            ClientStream::Tls(s) => Pin::new(s).poll_flush(cx),
            ClientStream::Closed => Poll::Ready(Err(closed())),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            ClientStream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            ClientStream::Tls(s) => Pin::new(s).poll_shutdown(cx),
            ClientStream::Closed => Poll::Ready(Err(closed())),
        }
    }
}

/// A failure during startup, with what the client should be told.
#[derive(Debug)]
enum StartupFailure {
    /// The client went away; nothing to say.
    Gone,
    /// Send this FATAL error and close.
    Fatal {
        kind: ErrorKind,
        code: &'static str,
        message: String,
    },
    /// Forward the backend's own ErrorResponse (raw) and close.
    Backend(BytesMut),
}

impl From<ProtocolError> for StartupFailure {
    fn from(e: ProtocolError) -> Self {
        if e.is_disconnect() {
            StartupFailure::Gone
        } else {
            let code = match e {
                ProtocolError::UnsupportedVersion { .. } => "0A000",
                _ => "08P01",
            };
            StartupFailure::Fatal {
                kind: ErrorKind::Protocol,
                code,
                message: e.to_string(),
            }
        }
    }
}

impl From<AuthError> for StartupFailure {
    fn from(e: AuthError) -> Self {
        StartupFailure::Fatal {
            kind: ErrorKind::Auth,
            code: e.sqlstate(),
            message: e.to_string(),
        }
    }
}

impl From<std::io::Error> for StartupFailure {
    fn from(e: std::io::Error) -> Self {
        ProtocolError::Io(e).into()
    }
}

/// Serve one client connection to its end.
pub async fn serve(node: Arc<Node>, stream: TcpStream, peer: SocketAddr) {
    let _open = GaugeGuard::new(&node.metrics.client_connections);
    let _ = stream.set_nodelay(true);
    let mut client = ClientStream::Plain(stream);
    let started = tokio::time::timeout(
        node.config.auth_timeout(),
        startup(&node, &mut client, peer),
    )
    .await;
    let established = match started {
        Ok(Ok(Some(established))) => established,
        Ok(Ok(None)) => return,
        Ok(Err(failure)) => {
            report_startup_failure(&node, &mut client, failure).await;
            return;
        }
        Err(_) => {
            report_startup_failure(
                &node,
                &mut client,
                StartupFailure::Fatal {
                    kind: ErrorKind::Protocol,
                    code: "08006",
                    message: "canceling authentication due to timeout".into(),
                },
            )
            .await;
            return;
        }
    };
    let Established {
        backend,
        mut session,
    } = established;
    session.backend_open = node
        .metrics
        .backend(&session.backend_name)
        .map(|(conns, _)| GaugeGuard::new(conns));
    match client {
        ClientStream::Plain(stream) => {
            let (read, write) = stream.into_split();
            relay(&node, read, write, backend.stream, &mut session).await;
        }
        ClientStream::Tls(stream) => {
            let (read, write) = tokio::io::split(*stream);
            relay(&node, read, write, backend.stream, &mut session).await;
        }
        ClientStream::Closed => {}
    }
}

async fn report_startup_failure(node: &Node, client: &mut ClientStream, failure: StartupFailure) {
    let mut out = BytesMut::new();
    match failure {
        StartupFailure::Gone => return,
        StartupFailure::Fatal {
            kind,
            code,
            message,
        } => {
            node.metrics.error(kind);
            tracing::debug!(code, %message, "startup failed");
            protocol::error_response(&mut out, Severity::Fatal, code, &message, None);
        }
        StartupFailure::Backend(raw) => {
            node.metrics.error(ErrorKind::BackendConnect);
            out = raw;
        }
    }
    let _ = client.write_all(&out).await;
    let _ = client.shutdown().await;
}

struct Established {
    backend: BackendConnection,
    session: Session,
}

/// Startup packet(s), authentication and backend login. `Ok(None)` when the
/// connection was only a probe or a cancel request.
async fn startup(
    node: &Arc<Node>,
    client: &mut ClientStream,
    peer: SocketAddr,
) -> Result<Option<Established>, StartupFailure> {
    let (minor, params) = loop {
        let Some(packet) = protocol::read_startup(client).await? else {
            return Ok(None);
        };
        match packet {
            StartupPacket::SslRequest => {
                let tls = match (&node.tls, &*client) {
                    (Some(acceptor), ClientStream::Plain(_)) => acceptor.clone(),
                    (None, ClientStream::Plain(_)) => {
                        client.write_all(b"N").await?;
                        continue;
                    }
                    (_, ClientStream::Tls(_) | ClientStream::Closed) => {
                        return Err(ProtocolError::StartupLayout("SSLRequest inside TLS").into())
                    }
                };
                client.write_all(b"S").await?;
                // Swap the plain stream out for the TLS one.
                let ClientStream::Plain(tcp) = std::mem::replace(client, ClientStream::Closed)
                else {
                    return Err(ProtocolError::StartupLayout("TLS state").into());
                };
                match tls.accept(tcp).await {
                    Ok(stream) => *client = ClientStream::Tls(Box::new(stream)),
                    Err(e) => {
                        node.metrics.error(ErrorKind::Tls);
                        tracing::debug!(error = %e, "TLS handshake failed");
                        return Ok(None);
                    }
                }
            }
            StartupPacket::GssEncRequest => client.write_all(b"N").await?,
            StartupPacket::Cancel {
                pid,
                secret,
                forwarded,
            } => {
                if !node.cancel_keys.cancel(pid, secret).await && !forwarded {
                    forward_cancel(node, pid, secret).await;
                }
                return Ok(None);
            }
            StartupPacket::Startup { minor, params } => break (minor, params),
        }
    };

    let user = params
        .iter()
        .find(|(k, _)| k == "user")
        .map(|(_, v)| v.clone())
        .filter(|u| !u.is_empty())
        .ok_or_else(|| StartupFailure::Fatal {
            kind: ErrorKind::Protocol,
            code: "28000",
            message: "no PostgreSQL user name specified in startup packet".into(),
        })?;
    let database = params
        .iter()
        .find(|(k, _)| k == "database")
        .map(|(_, v)| v.clone())
        .filter(|d| !d.is_empty())
        .unwrap_or_else(|| user.clone());

    let mut out = BytesMut::with_capacity(512);
    // Protocol options (`_pq_.*`) are not forwarded; a client asking for a
    // newer minor version or for options learns what this server speaks.
    let unrecognized: Vec<&str> = params
        .iter()
        .filter(|(k, _)| k.starts_with("_pq_."))
        .map(|(k, _)| k.as_str())
        .collect();
    if minor > 0 || !unrecognized.is_empty() {
        protocol::negotiate_protocol_version(&mut out, &unrecognized);
    }
    // In the replicated database the backend session knows from its first
    // statement that it serves a client of this node (`chorus.origin`, as
    // every stamp sets it), so that DDL a function runs there before any
    // stamp is replicated or refused, never kept on one backend. Clients do
    // not set Chorus's own settings this way.
    let replicated = node
        .config
        .replication
        .as_ref()
        .is_some_and(|r| r.database == database);
    let forwarded: Vec<(String, String)> = params
        .iter()
        .filter(|(k, _)| !(k.starts_with("_pq_.") || (replicated && k.starts_with("chorus."))))
        .cloned()
        .chain(replicated.then(|| ("chorus.origin".to_owned(), node.config.node.id.to_string())))
        .collect();

    authenticate(node, client, peer, &user, &database, &mut out).await?;

    // Only the replicated database (and those configured local) can be
    // used: writes anywhere else would reach one backend only.
    if let Some(replication) = &node.config.replication {
        if database != replication.database && !replication.local_databases.contains(&database) {
            return Err(StartupFailure::Fatal {
                kind: ErrorKind::Auth,
                code: "0A000",
                message: format!(
                    "database \"{database}\" is not replicated by this Chorus cluster: connect to \"{}\", or list it in replication.local_databases to use each backend's copy on its own",
                    replication.database
                ),
            });
        }
    }

    // With replication, a session's writes must be captured: wait until the
    // chorus schema is on the home backend (a node that has just started
    // installs it), as PostgreSQL makes clients wait while it starts up.
    if !node
        .wait_schema_ready(node.config.backend_connect_timeout())
        .await
    {
        return Err(StartupFailure::Fatal {
            kind: ErrorKind::BackendConnect,
            code: "57P03",
            message: "the Chorus node is still installing its schema on its home backend".into(),
        });
    }

    // The home backend, or (with replication) another one when it is down:
    // every backend has the same data.
    let password = node.config.user(&user).and_then(|u| u.password.as_deref());
    let mut failure = None;
    let mut connected = None;
    for candidate in node.session_backends() {
        let address = candidate.address();
        let login = LoginParams {
            address: &address,
            user: &user,
            password,
            database: &database,
            params: &forwarded,
        };
        match backend::connect(&login, node.config.backend_connect_timeout()).await {
            Ok(backend) => {
                node.set_backend_down(&candidate.name, false);
                connected = Some((candidate, address, backend));
                break;
            }
            // PostgreSQL itself refused (bad database, …): the same
            // everywhere, so it goes to the client as it is.
            Err(BackendError::Refused { raw, .. }) => {
                node.set_backend_down(&candidate.name, false);
                return Err(StartupFailure::Backend(raw));
            }
            Err(e) => {
                node.set_backend_down(&candidate.name, true);
                tracing::warn!(backend = %candidate.name, error = %e, "backend login failed");
                failure.get_or_insert((candidate.name.clone(), e));
            }
        }
    }
    let Some((home, address, backend)) = connected else {
        let message = match failure {
            Some((name, e)) => format!("could not connect to backend \"{name}\": {e}"),
            None => "no backend to connect to".to_owned(),
        };
        return Err(StartupFailure::Fatal {
            kind: ErrorKind::BackendConnect,
            code: "08006",
            message,
        });
    };

    let cancel_key = node
        .cancel_keys
        .register(&address, backend.pid, backend.secret);
    protocol::authentication(&mut out, 0, &[]);
    out.extend_from_slice(&backend.startup_messages);
    protocol::backend_key_data(&mut out, cancel_key.pid, cancel_key.secret);
    protocol::ready_for_query(&mut out, b'I');
    client.write_all(&out).await?;
    Ok(Some(Established {
        backend,
        session: Session {
            user,
            database,
            params: forwarded,
            backend_name: home.name.clone(),
            cancel_key,
            backend_open: None,
        },
    }))
}

/// Run the authentication exchange chosen by the rules. Messages queued in
/// `out` (NegotiateProtocolVersion) are sent first.
async fn authenticate(
    node: &Node,
    client: &mut ClientStream,
    peer: SocketAddr,
    user: &str,
    database: &str,
    out: &mut BytesMut,
) -> Result<(), StartupFailure> {
    let method = auth::method_for(&node.config, user, database, peer.ip())?;
    let password = node.config.user(user).and_then(|u| u.password.as_deref());
    let mut buf = BytesMut::with_capacity(256);
    let max = 64 * 1024;
    match method {
        AuthMethod::Trust => Ok(()),
        AuthMethod::Reject => Err(AuthError::Rejected(user.to_owned()).into()),
        AuthMethod::Md5 => {
            let mut salt = [0u8; 4];
            rand::rng().fill_bytes(&mut salt);
            protocol::authentication(out, 5, &salt);
            client.write_all(out).await?;
            out.clear();
            let response = read_password_message(client, &mut buf, max).await?;
            let response = protocol::read_cstr(&response)?.0;
            match password {
                Some(password) if auth::verify_md5(user, password, salt, response) => Ok(()),
                _ => Err(AuthError::PasswordFailed(user.to_owned()).into()),
            }
        }
        AuthMethod::ScramSha256 => {
            protocol::authentication_sasl(out);
            client.write_all(out).await?;
            out.clear();
            let initial = read_password_message(client, &mut buf, max).await?;
            let (mechanism, rest) = protocol::read_cstr(&initial)?;
            if mechanism != "SCRAM-SHA-256" || rest.len() < 4 {
                return Err(AuthError::Scram("unsupported SASL mechanism").into());
            }
            let data = &rest[4..];
            let verifier = if password.is_some() {
                node.verifier(user)
            } else {
                node.verifier("")
            };
            let server = ScramServer::start(verifier, data)?;
            protocol::authentication(out, 11, server.server_first().as_bytes());
            client.write_all(out).await?;
            out.clear();
            let client_final = read_password_message(client, &mut buf, max).await?;
            let server_final = server
                .finish(&client_final)
                .map_err(|_| AuthError::PasswordFailed(user.to_owned()))?;
            protocol::authentication(out, 12, server_final.as_bytes());
            Ok(())
        }
    }
}

async fn read_password_message(
    client: &mut ClientStream,
    buf: &mut BytesMut,
    max: usize,
) -> Result<BytesMut, StartupFailure> {
    match read_message(client, buf, max).await? {
        b'p' => Ok(buf.split()),
        other => Err(ProtocolError::Unexpected(other as char).into()),
    }
}

/// Pass a CancelRequest that is not for one of this node's sessions to
/// every other node of the cluster (as the Raft state lists them): the
/// session may be on any of them. Each gets at most a second.
async fn forward_cancel(node: &Node, pid: i32, secret: i32) {
    let Some(consensus) = node.consensus() else {
        return;
    };
    let me = u64::from(node.config.node.id);
    let others: Vec<String> = consensus.state().read(|s| {
        s.nodes
            .iter()
            .filter(|(id, _)| **id != me)
            .map(|(_, n)| n.listen.clone())
            .collect()
    });
    let mut packet = BytesMut::with_capacity(16);
    protocol::forwarded_cancel(&mut packet, pid, secret);
    let packet = packet.freeze();
    let mut sends = tokio::task::JoinSet::new();
    for address in others {
        let packet = packet.clone();
        sends.spawn(async move {
            let send = crate::backend::send_packet(&address, &packet);
            if let Ok(Err(e)) = tokio::time::timeout(Duration::from_secs(1), send).await {
                tracing::debug!(node = %address, error = %e, "passing on a cancel request failed");
            }
        });
    }
    while sends.join_next().await.is_some() {}
}

/// How a relay ended.
#[derive(Debug)]
enum RelayEnd {
    /// The client sent Terminate or closed its connection.
    ClientDone,
    /// The client broke the protocol.
    ClientProtocol(ProtocolError),
    /// The backend connection ended or failed.
    BackendGone { after_fatal: bool },
    /// The node is shutting down and this session was idle.
    Shutdown,
    /// The health checks found the backend down (it may still hold the
    /// connection open, frozen).
    BackendDown,
    /// The backend ended the session with a FATAL of a server going down
    /// (57P01 shutdown or terminate, 57P02 crash, 57P03 not accepting),
    /// held back from the client.
    BackendClosing { code: String, raw: BytesMut },
}

/// Something sent to the backend whose answers are still due, in order.
#[derive(Debug)]
enum Pending {
    /// A client's Query, Sync or FunctionCall (sent at this time), answered
    /// by a ReadyForQuery; `wrote` when a stamp went before it (it may
    /// have written); `scope`: commit scope settings it makes, taken when
    /// its ReadyForQuery comes without an error before it (PostgreSQL
    /// drops a failed SET too).
    Ready {
        sent: Instant,
        wrote: bool,
        scope: Vec<ScopeChange>,
    },
    /// A clock stamp of the relay's own, whose answers are swallowed.
    Stamp(Swallower),
    /// A replicated DDL query, being validated (see ddl.rs).
    Ddl(DdlJob),
}

/// State shared by the two directions of a relay.
struct RelayState {
    pending: Mutex<VecDeque<Pending>>,
    /// Stamps in `pending`: while there are any, the backend side looks at
    /// every message, not only ReadyForQuery and errors.
    stamps: AtomicU32,
    /// Transaction status from the last ReadyForQuery.
    tx_status: AtomicU8,
    /// Whether a stamp went out since the last idle ReadyForQuery.
    txn_stamped: AtomicBool,
    /// The session's `chorus.commit_scope` (see scope::encode; 0: the
    /// node's default), and one set with SET LOCAL for the current
    /// transaction.
    scope_session: AtomicU8,
    scope_local: AtomicU8,
    /// DDL jobs in `pending` (the backend side then looks at everything).
    ddl_jobs: AtomicU32,
    /// `chorus.ddl_scope`: the session's (1: local) and the current
    /// transaction's (0: none, 1: local, 2: cluster).
    ddl_scope_session: AtomicU8,
    ddl_scope_local: AtomicU8,
    /// Named prepared statements, as sent (see `remember_prepared`).
    prepared: Mutex<rustc_hash::FxHashMap<String, BytesMut>>,
    /// Settings the backend reported changed (ParameterStatus) that a
    /// moved session takes along.
    reported: Mutex<Vec<(String, String)>>,
    /// The session moved while idle in a transaction block: the client has
    /// not heard yet that its transaction is gone, so a COMMIT must fail
    /// (see `move_session`). Cleared by the next error or idle status.
    lost_transaction: AtomicBool,
    /// The cluster DDL lease of the current transaction (see
    /// cluster::ddl_lease): its number, 0 when none.
    ddl_lease: AtomicU64,
    /// This session's part of the lease holder's name.
    lease_token: u64,
    /// The lease's number went to the backend with a stamp.
    lease_stamped: AtomicBool,
    /// The backend session holds DDL settings of a stamp (a lease number or
    /// a refusal) that the next stamp clears.
    ddl_settings_sent: AtomicBool,
    /// Why the lease could not be taken, for the stamp to pass on.
    lease_refusal: Mutex<Option<LeaseRefusal>>,
    /// The transaction ended: give the lease back before its ReadyForQuery
    /// reaches the client.
    lease_release_due: AtomicBool,
    /// Renews the lease while its transaction is open.
    lease_keeper: Mutex<Option<tokio::task::JoinHandle<()>>>,
    /// The pid in the client's BackendKeyData, and the pid of the backend
    /// connection serving it now: a notification of the session's own
    /// backend carries the client's (see cancel.rs).
    client_pid: AtomicI32,
    backend_pid: AtomicI32,
}

/// What the client-to-backend direction keeps across backend connections.
struct ClientSide {
    pump: PumpSide,
    frontend: FrontendState,
    /// The client sent Terminate.
    terminated: bool,
    /// Whether the next extended-protocol message starts a batch.
    batch_start: bool,
    /// Whether a stamp went to the backend since the last message that a
    /// ReadyForQuery answers.
    stamped: bool,
    /// Commit scope settings sent since then.
    scope_pending: Vec<ScopeChange>,
    /// Drop extended-protocol messages up to the next Sync (see
    /// `move_session`).
    discard_until_sync: bool,
    /// The next message was held for the DDL lease and is seen again: its
    /// statements are counted already.
    refeed: bool,
}

impl ClientSide {
    fn new() -> ClientSide {
        ClientSide {
            pump: PumpSide::default(),
            frontend: FrontendState::default(),
            terminated: false,
            batch_start: true,
            stamped: false,
            scope_pending: Vec::new(),
            discard_until_sync: false,
            refeed: false,
        }
    }
}

/// Settings reported by ParameterStatus that a session moved to another
/// backend gets again (as startup parameters).
const MOVED_SETTINGS: &[&str] = &[
    "application_name",
    "client_encoding",
    "DateStyle",
    "IntervalStyle",
    "TimeZone",
    "search_path",
    "standard_conforming_strings",
];

impl RelayState {
    fn new() -> RelayState {
        RelayState {
            pending: Mutex::new(VecDeque::new()),
            stamps: AtomicU32::new(0),
            tx_status: AtomicU8::new(b'I'),
            txn_stamped: AtomicBool::new(false),
            scope_session: AtomicU8::new(0),
            scope_local: AtomicU8::new(0),
            ddl_jobs: AtomicU32::new(0),
            ddl_scope_session: AtomicU8::new(0),
            ddl_scope_local: AtomicU8::new(0),
            prepared: Mutex::new(rustc_hash::FxHashMap::default()),
            reported: Mutex::new(Vec::new()),
            lost_transaction: AtomicBool::new(false),
            ddl_lease: AtomicU64::new(0),
            lease_token: rand::rng().next_u64(),
            lease_stamped: AtomicBool::new(false),
            ddl_settings_sent: AtomicBool::new(false),
            lease_refusal: Mutex::new(None),
            lease_release_due: AtomicBool::new(false),
            lease_keeper: Mutex::new(None),
            client_pid: AtomicI32::new(0),
            backend_pid: AtomicI32::new(0),
        }
    }

    /// The lease is held now (number `seq`).
    fn lease_taken(&self, node: &Node, seq: u64) {
        self.ddl_lease.store(seq, Ordering::SeqCst);
        self.lease_stamped.store(false, Ordering::SeqCst);
        if let Ok(mut keeper) = self.lease_keeper.lock() {
            *keeper = ddl_lease::keep(node, self.lease_token);
        }
    }

    /// The lease is let go of (given back or about to be): its number,
    /// 0 when none was held.
    fn lease_dropped(&self) -> u64 {
        if let Some(keeper) = self.lease_keeper.lock().ok().and_then(|mut k| k.take()) {
            keeper.abort();
        }
        self.lease_stamped.store(false, Ordering::SeqCst);
        self.ddl_lease.swap(0, Ordering::SeqCst)
    }

    /// Whether a transaction's DDL must take the cluster DDL lease first
    /// (no lease yet, no refusal to pass on, not in a failed block).
    fn needs_lease(&self) -> bool {
        self.ddl_lease.load(Ordering::SeqCst) == 0
            && self.tx_status.load(Ordering::Relaxed) != b'E'
            && self.lease_refusal.lock().is_ok_and(|r| r.is_none())
    }

    /// What a stamp must tell the backend about DDL now, if anything:
    /// `stage` for a simple query with DDL.
    fn ddl_stamp(&self, node: &Node, stage: Option<DdlStage>) -> Option<DdlStamp> {
        let lease = self.ddl_lease.load(Ordering::SeqCst);
        let refusal = self.lease_refusal.lock().ok().and_then(|mut r| r.take());
        let fresh_lease = lease != 0 && !self.lease_stamped.load(Ordering::SeqCst);
        let stale = lease == 0 && self.ddl_settings_sent.load(Ordering::SeqCst);
        if stage.is_none() && refusal.is_none() && !fresh_lease && !stale {
            return None;
        }
        let cluster = node.config.cluster.as_ref();
        Some(DdlStamp {
            seq: (lease != 0).then_some(lease),
            refusal: refusal.map(|r| (r.code, r.message)),
            stage,
            sequence_kind: cluster
                .map_or("snowflake", |c| c.sequence_kind.as_str())
                .to_owned(),
            galloc_block: cluster.map_or(1_000_000, |c| c.galloc_range_size),
            sequence_id: node.consensus().and_then(|c| {
                let me = u64::from(node.config.node.id);
                c.state().read(|s| s.sequence_ids.get(&me).copied())
            }),
            record_staged: false,
        })
    }

    /// The backend session still holds the number of a lease given back
    /// (or a refusal): the next statement, whatever it is, gets a stamp
    /// that clears it, so that DDL a function runs there cannot pass for
    /// one under the lease.
    fn ddl_settings_stale(&self) -> bool {
        self.ddl_lease.load(Ordering::SeqCst) == 0 && self.ddl_settings_sent.load(Ordering::SeqCst)
    }

    /// Note that a stamp with these DDL settings went out.
    fn ddl_stamp_sent(&self, ddl: &DdlStamp) {
        if ddl.seq.is_some() {
            self.lease_stamped.store(true, Ordering::SeqCst);
        }
        self.ddl_settings_sent
            .store(ddl.seq.is_some() || ddl.refusal.is_some(), Ordering::SeqCst);
    }

    /// Note a ParameterStatus of the backend's.
    fn report(&self, body: &[u8]) {
        let Ok((name, rest)) = protocol::read_cstr(body) else {
            return;
        };
        if !MOVED_SETTINGS.contains(&name) {
            return;
        }
        let Ok((value, _)) = protocol::read_cstr(rest) else {
            return;
        };
        if let Ok(mut reported) = self.reported.lock() {
            reported.retain(|(n, _)| n != name);
            reported.push((name.to_owned(), value.to_owned()));
        }
    }

    /// Whether DDL now runs on this node's backend only.
    fn ddl_is_local(&self) -> bool {
        match self.ddl_scope_local.load(Ordering::Relaxed) {
            1 => true,
            2 => false,
            _ => self.ddl_scope_session.load(Ordering::Relaxed) == 1,
        }
    }

    fn apply_ddl_scope(&self, changes: &[DdlScopeChange]) {
        for change in changes {
            match *change {
                DdlScopeChange::Session(local) => self
                    .ddl_scope_session
                    .store(u8::from(local), Ordering::Relaxed),
                DdlScopeChange::Local(local) => self
                    .ddl_scope_local
                    .store(if local { 1 } else { 2 }, Ordering::Relaxed),
                DdlScopeChange::Reset => {
                    self.ddl_scope_session.store(0, Ordering::Relaxed);
                    self.ddl_scope_local.store(0, Ordering::Relaxed);
                }
                DdlScopeChange::Invalid => {}
            }
        }
    }
}

/// What a session keeps to move to another backend when its own fails.
struct Session {
    user: String,
    database: String,
    /// The client's startup parameters, as sent to the backend.
    params: Vec<(String, String)>,
    backend_name: String,
    cancel_key: crate::cancel::CancelKey,
    /// Counts the session in its backend's connections.
    backend_open: Option<GaugeGuard>,
}

impl Session {
    /// The login this session makes to a backend at `address`, with these
    /// startup parameters.
    fn login<'a>(
        &'a self,
        node: &'a Node,
        address: &'a str,
        params: &'a [(String, String)],
    ) -> LoginParams<'a> {
        LoginParams {
            address,
            user: &self.user,
            password: node
                .config
                .user(&self.user)
                .and_then(|u| u.password.as_deref()),
            database: &self.database,
            params,
        }
    }
}

/// How long a session whose backend failed tries to get another one.
const MOVE_LIMIT: Duration = Duration::from_secs(5);

/// Move messages both ways until either side ends. With replication, a
/// session whose backend fails (or is found down by the health checks)
/// moves to another backend between messages, see `move_session`.
async fn relay<CR, CW>(
    node: &Arc<Node>,
    mut client_read: CR,
    mut client_write: CW,
    backend: TcpStream,
    session: &mut Session,
) where
    CR: AsyncRead + Unpin,
    CW: AsyncWrite + Unpin,
{
    let state = RelayState::new();
    state
        .client_pid
        .store(session.cancel_key.pid, Ordering::Relaxed);
    if let Some(pid) = session.cancel_key.backend_pid() {
        state.backend_pid.store(pid, Ordering::Relaxed);
    }
    let mut client = ClientSide::new();
    let mut shutdown = node.shutdown_signal();
    let mut went_down = node.backend_went_down();
    let mut backend = backend;
    let replicating = node.config.replication.is_some();
    let (end, mut backend_write) = loop {
        let (mut backend_read, mut backend_write) = backend.into_split();
        let mut from_backend = PumpSide::default();
        let end = {
            let serving = session.backend_name.clone();
            let to_backend = client_to_backend(
                node,
                &state,
                &serving,
                &mut client,
                &mut client_read,
                &mut backend_write,
            );
            let to_client = backend_to_client(
                node,
                &state,
                &serving,
                &mut from_backend,
                &mut backend_read,
                &mut client_write,
                &mut shutdown,
            );
            tokio::pin!(to_backend, to_client);
            let name = session.backend_name.clone();
            let marked_down = async {
                loop {
                    if went_down.changed().await.is_err() {
                        std::future::pending::<()>().await;
                    }
                    if node.is_backend_down(&name) {
                        return;
                    }
                }
            };
            tokio::select! {
                end = &mut to_backend => match end {
                    // Writing to the backend failed: the other direction
                    // sees the end too, after what it still forwards.
                    RelayEnd::BackendGone { .. } => {
                        tokio::time::timeout(Duration::from_secs(1), &mut to_client)
                            .await
                            .unwrap_or(RelayEnd::BackendGone { after_fatal: false })
                    }
                    other => other,
                },
                end = &mut to_client => end,
                () = marked_down, if replicating => RelayEnd::BackendDown,
            }
        };
        let mut movable = replicating
            && matches!(
                end,
                RelayEnd::BackendGone { after_fatal: false }
                    | RelayEnd::BackendDown
                    | RelayEnd::BackendClosing { .. }
            )
            && client.pump.clean()
            && from_backend.clean();
        // 57P01 is also what pg_terminate_backend() sends: if the server
        // still takes logins, that session was meant to end.
        if movable {
            if let RelayEnd::BackendClosing { code, .. } = &end {
                movable = code != "57P01" || !backend_accepts(node, session).await;
            }
        }
        tracing::debug!(
            backend = %session.backend_name,
            ?end,
            movable,
            client_clean = client.pump.clean(),
            backend_clean = from_backend.clean(),
            "relay ended"
        );
        if movable {
            drop(backend_read);
            drop(backend_write);
            if let Some(next) =
                move_session(node, &state, session, &mut client, &mut client_write).await
            {
                backend = next;
                continue;
            }
            break (RelayEnd::BackendGone { after_fatal: false }, None);
        }
        break (end, Some(backend_write));
    };
    // A transaction that held the cluster DDL lease ends with the session.
    let lease = state.lease_dropped();
    if lease != 0 {
        let (node, token, backend) = (
            node.clone(),
            state.lease_token,
            session.backend_name.clone(),
        );
        tokio::spawn(async move {
            let _ = ddl_lease::give_back(&node, token, lease, None, &backend).await;
        });
    }
    let mut out = BytesMut::new();
    match end {
        RelayEnd::ClientDone | RelayEnd::Shutdown => {}
        RelayEnd::ClientProtocol(e) => {
            node.metrics.error(ErrorKind::Protocol);
            tracing::debug!(error = %e, "client protocol violation");
            protocol::error_response(&mut out, Severity::Fatal, "08P01", &e.to_string(), None);
        }
        RelayEnd::BackendGone { after_fatal } => {
            if !after_fatal {
                node.metrics.error(ErrorKind::BackendLost);
                protocol::error_response(
                    &mut out,
                    Severity::Fatal,
                    "08006",
                    "connection to the backend was lost",
                    Some("The PostgreSQL server closed the connection unexpectedly."),
                );
            }
        }
        RelayEnd::BackendClosing { raw, .. } => out = raw,
        RelayEnd::BackendDown => {
            node.metrics.error(ErrorKind::BackendLost);
            protocol::error_response(
                &mut out,
                Severity::Fatal,
                "08006",
                "the backend stopped answering health checks",
                None,
            );
        }
    }
    if !out.is_empty() {
        let _ = client_write.write_all(&out).await;
    }
    let _ = client_write.shutdown().await;
    // Say goodbye to the backend so it does not log an unexpected EOF.
    if let Some(backend_write) = backend_write.as_mut() {
        let _ = backend_write.write_all(&[b'X', 0, 0, 0, 4]).await;
    }
}

/// Whether the session's backend still takes logins (within a second).
async fn backend_accepts(node: &Node, session: &Session) -> bool {
    let Some(backend) = node
        .config
        .backends
        .iter()
        .find(|b| b.name == session.backend_name)
    else {
        return false;
    };
    let address = backend.address();
    let login = session.login(node, &address, &session.params);
    match backend::connect(&login, Duration::from_secs(1)).await {
        Ok(mut probe) => {
            let _ = probe.stream.write_all(&[b'X', 0, 0, 0, 4]).await;
            true
        }
        Err(_) => false,
    }
}

/// A statement that leaves a new backend connection in a failed
/// transaction block, as the client's was when its backend failed: the
/// backend then answers the client's next statements as PostgreSQL does in
/// an aborted transaction (25P02, and COMMIT rolls back).
const LOST_TRANSACTION_SQL: &str = "BEGIN; DO $$BEGIN RAISE EXCEPTION \
    'chorus: the transaction was lost with its backend' USING ERRCODE = '40001'; END$$";

/// Give a session whose backend failed another backend, between messages:
/// log in as the session did (with the settings the old backend reported),
/// prepare its named statements again, and answer what the client is owed:
/// each statement in flight gets ERROR 08006 (its outcome is unknown: it
/// may have committed on the failed backend), then ReadyForQuery. An open
/// transaction is lost: the new connection is put in a failed transaction
/// block, so that the client's next statements fail (25P02) until it rolls
/// back, exactly as in an aborted transaction. `None` when no backend took
/// the session within `MOVE_LIMIT`.
async fn move_session<W: AsyncWrite + Unpin>(
    node: &Node,
    state: &RelayState,
    session: &mut Session,
    client: &mut ClientSide,
    client_write: &mut W,
) -> Option<TcpStream> {
    let from = session.backend_name.clone();
    node.set_backend_down(&from, true);
    let in_block = matches!(state.tx_status.load(Ordering::Relaxed), b'T' | b'E');
    let mut params = session.params.clone();
    if let Ok(reported) = state.reported.lock() {
        for (name, value) in reported.iter() {
            params.retain(|(n, _)| !n.eq_ignore_ascii_case(name));
            params.push((name.clone(), value.clone()));
        }
    }
    let deadline = Instant::now() + MOVE_LIMIT;
    let (name, address, mut connection) = 'found: loop {
        let candidates: Vec<_> = node
            .session_backends()
            .into_iter()
            .filter(|b| b.name != from)
            .cloned()
            .collect();
        for candidate in candidates {
            let address = candidate.address();
            let login = session.login(node, &address, &params);
            let left = deadline.saturating_duration_since(Instant::now());
            match backend::connect(&login, left.min(node.config.backend_connect_timeout())).await {
                Ok(connection) => break 'found (candidate.name, address, connection),
                Err(e) => {
                    tracing::debug!(backend = %candidate.name, error = %e, "moving a session: login failed");
                }
            }
        }
        if Instant::now() >= deadline {
            tracing::warn!(from = %from, "a session whose backend failed found no other backend");
            return None;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    // The session's transaction state and named statements, on the new
    // connection; the answers are read and dropped.
    let mut setup = BytesMut::new();
    let mut readies = 0;
    if in_block {
        protocol::query(&mut setup, LOST_TRANSACTION_SQL);
        readies += 1;
    }
    let prepared: Vec<BytesMut> = state
        .prepared
        .lock()
        .map(|p| p.values().cloned().collect())
        .unwrap_or_default();
    if !prepared.is_empty() {
        for parse in &prepared {
            setup.extend_from_slice(parse);
        }
        protocol::write_message(&mut setup, b'S', |_| {});
        readies += 1;
    }
    if readies > 0 {
        let ready = async {
            connection.stream.write_all(&setup).await.ok()?;
            let mut buf = BytesMut::new();
            let mut seen = 0;
            while seen < readies {
                let tag = read_message(&mut connection.stream, &mut buf, 1 << 30)
                    .await
                    .ok()?;
                if tag == b'Z' {
                    seen += 1;
                }
                buf.clear();
            }
            Some(())
        };
        if tokio::time::timeout(MOVE_LIMIT, ready)
            .await
            .ok()
            .flatten()
            .is_none()
        {
            tracing::warn!(backend = %name, "a moved session could not be set up");
            return None;
        }
    }
    // What the client is owed.
    let status = if in_block { b'E' } else { b'I' };
    let owed = state
        .pending
        .lock()
        .map(|mut p| {
            p.drain(..)
                .filter(|p| !matches!(p, Pending::Stamp(_)))
                .count()
        })
        .unwrap_or(0);
    let message = format!(
        "the connection to backend \"{from}\" was lost; the outcome of the statement in progress is unknown"
    );
    let detail = format!(
        "The session goes on with backend \"{name}\"{}.",
        if in_block {
            "; its transaction was rolled back"
        } else {
            ""
        }
    );
    let mut out = BytesMut::new();
    for _ in 0..owed {
        protocol::error_response(&mut out, Severity::Error, "08006", &message, Some(&detail));
        protocol::ready_for_query(&mut out, status);
    }
    // A batch under way (messages since its last Sync went to the failed
    // backend): its error now, the rest of it dropped, its Sync answered by
    // the new backend.
    if !client.batch_start {
        protocol::error_response(&mut out, Severity::Error, "08006", &message, Some(&detail));
        client.discard_until_sync = true;
    }
    if !out.is_empty() && client_write.write_all(&out).await.is_err() {
        return None;
    }
    state.stamps.store(0, Ordering::SeqCst);
    state.ddl_jobs.store(0, Ordering::SeqCst);
    state.txn_stamped.store(false, Ordering::Relaxed);
    // The transaction that held the cluster DDL lease is lost with its
    // backend.
    let lease = state.lease_dropped();
    if lease != 0 {
        let _ = ddl_lease::give_back(node, state.lease_token, lease, None, &from).await;
    }
    state.lease_release_due.store(false, Ordering::SeqCst);
    state.ddl_settings_sent.store(false, Ordering::SeqCst);
    state.scope_local.store(0, Ordering::SeqCst);
    state.ddl_scope_local.store(0, Ordering::Relaxed);
    state.tx_status.store(status, Ordering::Relaxed);
    state.lost_transaction.store(
        in_block && owed == 0 && client.batch_start,
        Ordering::Relaxed,
    );
    client.stamped = false;
    client.scope_pending.clear();
    session
        .cancel_key
        .retarget(&address, connection.pid, connection.secret);
    state.backend_pid.store(connection.pid, Ordering::Relaxed);
    session.backend_open = node
        .metrics
        .backend(&name)
        .map(|(conns, _)| GaugeGuard::new(conns));
    node.metrics.sessions_moved();
    tracing::info!(from = %from, to = %name, owed, in_block, "session moved to another backend");
    session.backend_name = name;
    Some(connection.stream)
}

/// Client to backend: count statements, note when answers are due.
async fn client_to_backend<R, W>(
    node: &Node,
    state: &RelayState,
    serving: &str,
    side: &mut ClientSide,
    reader: &mut R,
    writer: &mut W,
) -> RelayEnd
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let metrics = &node.metrics;
    let replicating = node.config.replication.is_some();
    let ClientSide {
        pump: pump_side,
        frontend,
        terminated,
        batch_start,
        stamped,
        scope_pending,
        discard_until_sync,
        refeed,
    } = side;
    let result = loop {
        let held = pump(
        reader,
        writer,
        pump_side,
        node.config.node.max_message_bytes,
        is_inspected,
        |tag, body, rest| {
            // The rest of a batch whose start went to a backend that failed
            // (the client has its error): dropped up to its Sync.
            if *discard_until_sync {
                if matches!(tag, b'P' | b'B' | b'D' | b'E' | b'C' | b'H') {
                    return Ok(Flow::Replace(BytesMut::new()));
                }
                *discard_until_sync = false;
            }
            if replicating {
                remember_prepared(state, tag, body);
            }
            // A transaction lost with its backend is never reported
            // committed: a COMMIT the client sends before it heard of the
            // loss becomes a statement the aborted block refuses (25P02).
            if state.lost_transaction.load(Ordering::Relaxed) {
                let statement = match tag {
                    b'Q' => protocol::read_cstr(body).map_or("", |(sql, _)| sql),
                    b'P' => protocol::read_cstr(body)
                        .and_then(|(_, rest)| protocol::read_cstr(rest))
                        .map_or("", |(sql, _)| sql),
                    _ => "",
                };
                if ends_transaction(statement) {
                    let mut out = BytesMut::new();
                    if tag == b'Q' {
                        protocol::query(&mut out, "SELECT 1");
                        push_pending(state, *stamped, Vec::new());
                        *stamped = false;
                        scope_pending.clear();
                        *batch_start = true;
                    } else {
                        let name = protocol::read_cstr(body).map_or("", |(name, _)| name);
                        protocol::write_message(&mut out, b'P', |m| {
                            protocol::put_cstr(m, name);
                            protocol::put_cstr(m, "SELECT 1");
                            m.extend_from_slice(&0i16.to_be_bytes());
                        });
                        *batch_start = false;
                    }
                    return Ok(Flow::Replace(out));
                }
            }
            if replicating && tag == b'F' {
                // The fast-path FunctionCall: what libpq's large-object
                // functions (lo_import, lo_write, …) send.
                *batch_start = true;
                push_pending(state, *stamped, std::mem::take(scope_pending));
                *stamped = false;
                return Ok(Flow::Replace(refusal_query(
                    "0A000",
                    LARGE_OBJECTS.message,
                    LARGE_OBJECTS.hint,
                )));
            }
            let mut stamp = None;
            let mut stage = None;
            // A DDL-log statement inside a transaction block: it travels in
            // the transaction's change stream instead (the stamp records it,
            // see chorus.capture_log_statement).
            let mut log_in_stream = false;
            match tag {
                b'P' | b'B' | b'D' | b'E' | b'C' | b'H' if *batch_start => {
                    // A batch with replicated DDL takes the cluster DDL
                    // lease first (see cluster::ddl_lease); the stamp at
                    // its start then carries the lease's number.
                    if replicating
                        && !state.ddl_is_local()
                        && state.needs_lease()
                        && frontend.batch_has(tag, body, rest, |c| c == StatementClass::Ddl)
                    {
                        return Ok(Flow::Await);
                    }
                    *batch_start = false;
                    if replicating
                        && (frontend.batch_stamps(tag, body, rest) || state.ddl_settings_stale())
                    {
                        stamp = Some(StampKind::Extended);
                    }
                    // A statement of the DDL log's kind (a role, a grant on
                    // a database, …) run inside a transaction block: the
                    // stamp at the batch's start records it in the
                    // transaction's change stream, as for a simple query.
                    // Outside a block (prepared inside one) it would stay
                    // on this backend: the batch fails instead.
                    let logged = if replicating && !state.ddl_is_local() {
                        frontend.batch_log_statements(tag, body, rest)
                    } else {
                        Vec::new()
                    };
                    if let [statement] = logged.as_slice() {
                        if state.tx_status.load(Ordering::Relaxed) == b'T' {
                            stage = Some((statement.as_bytes().to_vec(), vec![(0, statement.len())]));
                            log_in_stream = true;
                        }
                    }
                    if !logged.is_empty() && !log_in_stream {
                        push_stamp(state, StampKind::Extended);
                        let mut out = BytesMut::new();
                        stamp::write_failing(
                            &mut out,
                            &refusal_sql(
                                "0A000",
                                "this DDL cannot be replicated through the extended query protocol outside a transaction block, or with another of its kind in one batch",
                                EXTENDED_LOG_HINT,
                            ),
                        );
                        protocol::write_message(&mut out, tag, |m| m.extend_from_slice(body));
                        frontend.on_message(tag, body)?;
                        return Ok(Flow::Replace(out));
                    }
                }
                b'Q' | b'S' | b'F' => *batch_start = true,
                _ => {}
            }
            match frontend.on_message(tag, body)? {
                FrontendEvent::Query(summary) => {
                    // (A query held for the DDL lease comes here twice.)
                    if !std::mem::take(refeed) {
                        for class in StatementClass::ALL {
                            let n = summary.counts[class.index()];
                            if n > 0 {
                                metrics.statements(class, u64::from(n));
                            }
                        }
                    }
                    // The text is looked at only where a rule needs it (it is
                    // not decoded for every query).
                    let sql = || {
                        protocol::read_sql(body)
                            .map_or(std::borrow::Cow::Borrowed(""), |(sql, _)| sql)
                    };
                    if replicating && summary.counts[StatementClass::Session.index()] > 0 {
                        let ddl_scope = scope::ddl_scope_changes(&sql());
                        let refusal = if ddl_scope.contains(&DdlScopeChange::Invalid) {
                            Err(refusal_query(
                                "22023",
                                "invalid value for parameter \"chorus.ddl_scope\"",
                                "Available values: cluster, local.",
                            ))
                        } else {
                            scope_changes_in(&sql())
                        };
                        match refusal {
                            Ok(changes) => {
                                scope_pending.extend(changes);
                                state.apply_ddl_scope(&ddl_scope);
                            }
                            Err(refusal) => {
                                push_pending(state, *stamped, Vec::new());
                                *stamped = false;
                                scope_pending.clear();
                                return Ok(Flow::Replace(refusal));
                            }
                        }
                    }
                    if replicating && summary.counts[StatementClass::Write.index()] > 0 {
                        if let Some(refused) = refused_call(&sql()) {
                            push_pending(state, *stamped, Vec::new());
                            *stamped = false;
                            scope_pending.clear();
                            return Ok(Flow::Replace(refusal_query(
                                "0A000",
                                refused.message,
                                refused.hint,
                            )));
                        }
                    }
                    let ddl = summary.counts[StatementClass::Ddl.index()];
                    if replicating && ddl > 0 && !state.ddl_is_local() {
                        let text = sql();
                        let statements: Vec<&str> = split_statements(&text).collect();
                        // (A DO block is DDL for the lease only: the
                        // backend takes the text of each statement it runs
                        // from the block itself.)
                        let ddl_statements: Vec<&str> = statements
                            .iter()
                            .copied()
                            .filter(|st| {
                                chorus_router::classify(st) == StatementClass::Ddl
                                    && !first_keyword(st)
                                        .is_some_and(|(w, _)| w.eq_ignore_ascii_case("DO"))
                            })
                            .collect();
                        let by_log = ddl_statements
                            .iter()
                            .any(|st| ddl_route(st) == DdlRoute::Log);
                        let in_block = state.tx_status.load(Ordering::Relaxed) == b'T';
                        let refusal = if by_log && summary.statements() > ddl {
                            Some((
                                "a query string that mixes this DDL with other statements cannot be replicated",
                                "Roles, databases, tablespaces and CONCURRENTLY statements replicate through the cluster's DDL log: send each as its own query.",
                            ))
                        } else if by_log && in_block && ddl::alter_sequence(&text) {
                            Some((ddl::ALTER_SEQUENCE.message, ddl::ALTER_SEQUENCE.hint))
                        } else if ddl_statements.iter().any(|st| explained(st)) {
                            Some((EXPLAINED_DDL.message, EXPLAINED_DDL.hint))
                        } else {
                            None
                        };
                        if let Some((message, hint)) = refusal {
                            push_pending(state, *stamped, Vec::new());
                            *stamped = false;
                            scope_pending.clear();
                            return Ok(Flow::Replace(refusal_query("0A000", message, hint)));
                        }
                        log_in_stream = by_log && in_block;
                        if (!by_log || log_in_stream)
                            && state.tx_status.load(Ordering::Relaxed) != b'E'
                        {
                            // In its transaction's change stream, under the
                            // cluster DDL lease (see cluster::ddl_lease).
                            if state.needs_lease() {
                                return Ok(Flow::Await);
                            }
                            let refused = state.lease_refusal.lock().ok().and_then(|mut r| r.take());
                            if let Some(refusal) = refused {
                                push_pending(state, *stamped, Vec::new());
                                *stamped = false;
                                scope_pending.clear();
                                return Ok(Flow::Replace(refusal_query(
                                    refusal.code,
                                    &refusal.message,
                                    "Another transaction with DDL is open in the cluster, or this node cannot reach a Raft majority; retry.",
                                )));
                            }
                            let base = text.as_ptr() as usize;
                            let ranges = ddl_statements
                                .iter()
                                .map(|st| (st.as_ptr() as usize - base, st.len()))
                                .collect();
                            // The client's own bytes: the backend compares
                            // them with the query it runs.
                            let raw = protocol::cstr_bytes(body).unwrap_or_default();
                            stage = Some((raw.to_vec(), ranges));
                        }
                        // In a failed transaction the backend refuses it
                        // (25P02) as it is; otherwise it is validated here
                        // and replicated through the DDL log (see ddl.rs).
                        if by_log
                            && !log_in_stream
                            && state.tx_status.load(Ordering::Relaxed) != b'E'
                        {
                            if *stamped {
                                push_pending(state, true, Vec::new());
                                *stamped = false;
                            }
                            if let Ok(mut pending) = state.pending.lock() {
                                state.ddl_jobs.fetch_add(1, Ordering::SeqCst);
                                pending.push_back(Pending::Ddl(DdlJob::new(&sql())));
                            }
                            scope_pending.clear();
                            return Ok(Flow::Replace(ddl::validation_query(&sql())));
                        }
                    }
                    if replicating && (query_stamps(&summary) || state.ddl_settings_stale()) {
                        stamp = Some(StampKind::Query);
                    }
                }
                FrontendEvent::Execute(class) => metrics.statements(class, 1),
                FrontendEvent::Parsed(StatementClass::Session) if replicating => {
                    // An invalid value only fails in the simple protocol;
                    // here the setting is just not taken.
                    let sql = protocol::read_cstr(body)
                        .and_then(|(_, rest)| protocol::read_cstr(rest))
                        .map_or("", |(sql, _)| sql);
                    if let Ok(changes) = scope_changes_in(sql) {
                        scope_pending.extend(changes);
                    }
                    state.apply_ddl_scope(&scope::ddl_scope_changes(sql));
                }
                FrontendEvent::Parsed(StatementClass::Write) if replicating => {
                    let sql = protocol::read_cstr(body)
                        .and_then(|(_, rest)| protocol::read_cstr(rest))
                        .map_or("", |(sql, _)| sql);
                    // (Not refused: on to the stamp below, as any write.)
                    if let Some(refused) = refused_call(sql) {
                        let name = protocol::read_cstr(body).map_or("", |(name, _)| name);
                        let mut out = BytesMut::new();
                        protocol::write_message(&mut out, b'P', |m| {
                            protocol::put_cstr(m, name);
                            protocol::put_cstr(
                                m,
                                &refusal_sql("0A000", refused.message, refused.hint),
                            );
                            m.extend_from_slice(&0i16.to_be_bytes());
                        });
                        remember_prepared(state, b'P', &out[5..]);
                        return Ok(Flow::Replace(out));
                    }
                }
                FrontendEvent::Parsed(StatementClass::Ddl)
                    if replicating
                        && !state.ddl_is_local()
                        && explained(
                            protocol::read_cstr(body)
                                .and_then(|(_, rest)| protocol::read_cstr(rest))
                                .map_or("", |(sql, _)| sql),
                        ) =>
                {
                    let name = protocol::read_cstr(body).map_or("", |(name, _)| name);
                    let mut out = BytesMut::new();
                    protocol::write_message(&mut out, b'P', |m| {
                        protocol::put_cstr(m, name);
                        protocol::put_cstr(
                            m,
                            &refusal_sql("0A000", EXPLAINED_DDL.message, EXPLAINED_DDL.hint),
                        );
                        m.extend_from_slice(&0i16.to_be_bytes());
                    });
                    remember_prepared(state, b'P', &out[5..]);
                    return Ok(Flow::Replace(out));
                }
                FrontendEvent::Parsed(StatementClass::Ddl)
                    if replicating
                        && !state.ddl_is_local()
                        && state.tx_status.load(Ordering::Relaxed) != b'T'
                        && ddl_route(
                            protocol::read_cstr(body)
                                .and_then(|(_, rest)| protocol::read_cstr(rest))
                                .map_or("", |(sql, _)| sql),
                        ) == DdlRoute::Log =>
                {
                    // Outside a transaction block, DDL through the DDL log
                    // goes through the simple protocol only: the statement
                    // is prepared as one that fails when run, so the error
                    // comes in its place in the batch.
                    let name = protocol::read_cstr(body).map_or("", |(name, _)| name);
                    let mut out = BytesMut::new();
                    protocol::write_message(&mut out, b'P', |m| {
                        protocol::put_cstr(m, name);
                        protocol::put_cstr(m, &refusal_sql(
                            "0A000",
                            "this DDL cannot be replicated through the extended query protocol outside a transaction block",
                            EXTENDED_LOG_HINT,
                        ));
                        m.extend_from_slice(&0i16.to_be_bytes());
                    });
                    remember_prepared(state, b'P', &out[5..]);
                    return Ok(Flow::Replace(out));
                }
                FrontendEvent::Terminate => {
                    *terminated = true;
                    return Ok(Flow::Stop);
                }
                FrontendEvent::AwaitsReady
                | FrontendEvent::Parsed(_)
                | FrontendEvent::Extended
                | FrontendEvent::Nothing => {}
            }
            let ddl_stamp = match stamp {
                Some(_) => state.ddl_stamp(node, stage).map(|mut d| {
                    d.record_staged = log_in_stream;
                    d
                }),
                None => None,
            };
            let flow = match stamp {
                // Inside a transaction block that already has its stamp:
                // the capture trigger keeps the transaction's first stamp
                // anyway, so another would only cost a statement (unless
                // it carries DDL settings).
                Some(_)
                    if state.tx_status.load(Ordering::Relaxed) == b'T'
                        && state.txn_stamped.load(Ordering::Relaxed)
                        && ddl_stamp.is_none() =>
                {
                    *stamped = true;
                    Flow::Continue
                }
                Some(kind) => {
                    push_stamp(state, kind);
                    *stamped = true;
                    state.txn_stamped.store(true, Ordering::Relaxed);
                    let mut out = BytesMut::with_capacity(160 + body.len());
                    if let Some(ddl) = &ddl_stamp {
                        state.ddl_stamp_sent(ddl);
                    }
                    stamp::write_stamp(&mut out, kind, node.clock.now(), ddl_stamp.as_ref());
                    protocol::write_message(&mut out, tag, |m| m.extend_from_slice(body));
                    Flow::Replace(out)
                }
                None => Flow::Continue,
            };
            if matches!(tag, b'Q' | b'S' | b'F') {
                push_pending(state, *stamped, std::mem::take(scope_pending));
                *stamped = false;
            }
            Ok(flow)
        },
    )
    .await;
        match held {
            // A message held to take the cluster DDL lease first: take it
            // (or note why not), then look at the message again.
            Ok(Some(message)) => {
                match ddl_lease::take(node, state.lease_token, serving).await {
                    Ok(seq) => state.lease_taken(node, seq),
                    Err(refusal) => {
                        node.metrics.ddl_failed();
                        if let Ok(mut r) = state.lease_refusal.lock() {
                            *r = Some(refusal);
                        }
                    }
                }
                let mut buf = BytesMut::with_capacity(message.len() + pump_side.buf.len());
                buf.extend_from_slice(&message);
                buf.extend_from_slice(&pump_side.buf);
                pump_side.buf = buf;
                pump_side.rescan = true;
                *refeed = message.first() == Some(&b'Q');
            }
            Ok(None) => break Ok(()),
            Err(e) => break Err(e),
        }
    };
    match result {
        Ok(()) => RelayEnd::ClientDone,
        Err(PumpError::Eof) => RelayEnd::ClientDone,
        Err(PumpError::Protocol(e)) if e.is_disconnect() => RelayEnd::ClientDone,
        Err(PumpError::Protocol(e)) => RelayEnd::ClientProtocol(e),
        // The backend side failed while we wrote to it.
        Err(PumpError::WriteFailed) if *terminated => RelayEnd::ClientDone,
        Err(PumpError::WriteFailed) => RelayEnd::BackendGone { after_fatal: false },
    }
}

/// Whether a statement ends a transaction by committing it (in an aborted
/// transaction PostgreSQL answers these with ROLLBACK, no error).
fn ends_transaction(sql: &str) -> bool {
    let words: Vec<String> = sql
        .split(|c: char| c.is_whitespace() || c == ';')
        .filter(|w| !w.is_empty())
        .take(2)
        .map(str::to_ascii_lowercase)
        .collect();
    match words.first().map(String::as_str) {
        Some("commit" | "end") => true,
        Some("prepare") => words.get(1).is_some_and(|w| w == "transaction"),
        _ => false,
    }
}

/// Keep the named statements a client prepares (as sent to the backend),
/// so that a session moved to another backend has them there too.
fn remember_prepared(state: &RelayState, tag: u8, body: &[u8]) {
    let name = |body: &[u8]| {
        protocol::read_cstr(body)
            .map_or("", |(name, _)| name)
            .to_owned()
    };
    match tag {
        b'P' => {
            let name = name(body);
            if !name.is_empty() {
                let mut message = BytesMut::with_capacity(body.len() + 5);
                protocol::write_message(&mut message, b'P', |m| m.extend_from_slice(body));
                if let Ok(mut prepared) = state.prepared.lock() {
                    prepared.insert(name, message);
                }
            }
        }
        b'C' if body.first() == Some(&b'S') => {
            if let Ok(mut prepared) = state.prepared.lock() {
                prepared.remove(&name(&body[1..]));
            }
        }
        _ => {}
    }
}

/// The `chorus.commit_scope` changes in a statement's text, or a refusal
/// to send instead when a value is invalid.
fn scope_changes_in(sql: &str) -> Result<Vec<ScopeChange>, BytesMut> {
    let changes = scope::scope_changes(sql);
    if changes.contains(&ScopeChange::Invalid) {
        return Err(refusal_query(
            "22023",
            "invalid value for parameter \"chorus.commit_scope\"",
            "Available values: local, majority, all.",
        ));
    }
    Ok(changes)
}

/// Make commit scope changes the session's.
fn apply_scope_changes(state: &RelayState, changes: &[ScopeChange]) {
    for change in changes {
        match *change {
            ScopeChange::Session(s) => state
                .scope_session
                .store(scope::encode(Some(s)), Ordering::SeqCst),
            ScopeChange::Local(s) => state
                .scope_local
                .store(scope::encode(Some(s)), Ordering::SeqCst),
            ScopeChange::Reset => {
                state.scope_session.store(0, Ordering::SeqCst);
                state.scope_local.store(0, Ordering::SeqCst);
            }
            ScopeChange::Invalid => {}
        }
    }
}

/// A Query message that makes the backend raise an error, so the client
/// gets a normal ErrorResponse and ReadyForQuery from it.
fn refusal_query(code: &str, message: &str, hint: &str) -> BytesMut {
    let sql = refusal_sql(code, message, hint);
    let mut out = BytesMut::with_capacity(sql.len() + 6);
    protocol::query(&mut out, &sql);
    out
}

/// A function Chorus refuses to let a statement call, with why and what
/// to do instead.
struct RefusedCall {
    names: &'static [&'static str],
    message: &'static str,
    hint: &'static str,
}

const SETVAL: RefusedCall = RefusedCall {
    names: &["setval"],
    message: "setval() is not supported through Chorus: the cluster's sequences are set up per backend",
    hint: "Sequences made through Chorus hand out values that never collide across backends; setval() on one backend could make it repeat another's.",
};

/// Large objects live in pg_largeobject, which no trigger sees: written
/// through one node they would exist on one backend only.
const LARGE_OBJECTS: RefusedCall = RefusedCall {
    names: chorus_router::LARGE_OBJECT_WRITERS,
    message: "large objects are not replicated by Chorus",
    hint: "Store the data in a bytea column of a table, which replicates like any other.",
};

const REFUSED_CALLS: [&RefusedCall; 2] = [&SETVAL, &LARGE_OBJECTS];

/// `EXPLAIN ANALYZE CREATE TABLE … AS` (or `SELECT … INTO`, `CREATE
/// MATERIALIZED VIEW`) makes its table without firing PostgreSQL's event
/// triggers: it would exist on one backend only.
const EXPLAINED_DDL: RefusedCall = RefusedCall {
    names: &[],
    message: "EXPLAIN ANALYZE of a statement that makes a table cannot be replicated",
    hint: "Run the statement itself, and EXPLAIN ANALYZE its query alone.",
};

/// What to do instead of a statement of the DDL log's kind that cannot go
/// through the extended protocol where it was sent.
const EXTENDED_LOG_HINT: &str = "Roles, databases, tablespaces and CONCURRENTLY statements replicate through the cluster's DDL log: send it as a simple query, or inside BEGIN ... COMMIT, or SET chorus.ddl_scope = 'local' to run it on this node's backend only.";

/// Whether a DDL statement is one run under EXPLAIN ANALYZE.
fn explained(sql: &str) -> bool {
    first_keyword(sql).is_some_and(|(w, _)| w.eq_ignore_ascii_case("EXPLAIN"))
}

/// The refusal for a statement that calls one of [`REFUSED_CALLS`]
/// (a name followed by `(`, case-insensitive; text in quotes is not told
/// apart, so a literal mentioning one is refused too).
fn refused_call(sql: &str) -> Option<&'static RefusedCall> {
    let bytes = sql.as_bytes();
    REFUSED_CALLS.into_iter().find(|refused| {
        refused.names.iter().any(|name| {
            let name = name.as_bytes();
            bytes.windows(name.len()).enumerate().any(|(i, w)| {
                w.eq_ignore_ascii_case(name)
                    && (i == 0 || !is_word_byte(bytes[i - 1]))
                    && bytes[i + name.len()..]
                        .iter()
                        .find(|b| !b.is_ascii_whitespace())
                        .is_some_and(|b| *b == b'(')
            })
        })
    })
}

fn is_word_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'_'
}

/// A statement that raises this error when run.
fn refusal_sql(code: &str, message: &str, hint: &str) -> String {
    format!(
        "DO $chorus$ BEGIN RAISE EXCEPTION USING ERRCODE = '{code}', MESSAGE = '{}', HINT = '{}'; END $chorus$",
        message.replace('\'', "''"),
        hint.replace('\'', "''")
    )
}

fn push_pending(state: &RelayState, wrote: bool, scope: Vec<ScopeChange>) {
    if let Ok(mut pending) = state.pending.lock() {
        pending.push_back(Pending::Ready {
            sent: Instant::now(),
            wrote,
            scope,
        });
    }
}

fn push_stamp(state: &RelayState, kind: StampKind) {
    if let Ok(mut pending) = state.pending.lock() {
        state.stamps.fetch_add(1, Ordering::SeqCst);
        pending.push_back(Pending::Stamp(Swallower::new(kind)));
    }
}

/// Backend to client: track transaction state and latency, count errors,
/// and end idle sessions when the node shuts down.
async fn backend_to_client<R, W>(
    node: &Node,
    state: &RelayState,
    serving: &str,
    side: &mut PumpSide,
    reader: &mut R,
    writer: &mut W,
    shutdown: &mut watch::Receiver<bool>,
) -> RelayEnd
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let metrics = &node.metrics;
    let mut last_was_fatal = false;
    let idle = || {
        state.tx_status.load(Ordering::Relaxed) == b'I'
            && state.pending.lock().map(|p| p.is_empty()).unwrap_or(true)
    };
    let draining = || node.draining.load(Ordering::SeqCst);
    let mut stop_for_shutdown = false;
    // Whether the transaction in progress (up to the next idle
    // ReadyForQuery) may have written.
    let mut txn_wrote = false;
    // Whether an error came since the last ReadyForQuery.
    let mut failed_since_ready = false;
    let default_scope = node
        .config
        .replication
        .as_ref()
        .map_or(CommitScope::Local, |r| r.commit_scope);
    let scope_wait = Mutex::new(None::<CommitScope>);
    let replicating = node.config.replication.is_some();
    // A FATAL of a server going down, not yet passed on (SQLSTATE, message).
    let held_fatal = Mutex::new(None::<(String, BytesMut)>);
    let ended =
        |end: PumpError, after_fatal: bool| match held_fatal.lock().ok().and_then(|mut h| h.take())
        {
            Some((code, raw)) => RelayEnd::BackendClosing { code, raw },
            None => backend_end(end, after_fatal),
        };
    let scope_limit = Duration::from_millis(
        node.config
            .replication
            .as_ref()
            .map_or(0, |r| r.commit_scope_timeout_ms),
    );
    // A control connection to the serving backend when it is not the
    // home one (see `wait_on_slots`).
    let mut away: Option<tokio_postgres::Client> = None;
    let ddl_ready = Mutex::new(None::<DdlJob>);
    let inspect = |tag: u8| {
        matches!(tag, b'Z' | b'E' | b'S' | b'A')
            || state.stamps.load(Ordering::SeqCst) > 0
            || state.ddl_jobs.load(Ordering::SeqCst) > 0
    };
    let mut on_message = |tag: u8, body: &[u8], _rest: &[u8]| {
        if state.stamps.load(Ordering::SeqCst) > 0 {
            if let Some(verdict) = judge_for_stamp(state, tag) {
                if tag == b'E' {
                    // A stamp's error passed on: the client's batch failed.
                    failed_since_ready = true;
                    metrics.error(ErrorKind::BackendError);
                }
                return Ok(match verdict {
                    Verdict::Swallow | Verdict::SwallowLast => Flow::Replace(BytesMut::new()),
                    Verdict::Pass | Verdict::PassLast => Flow::Continue,
                });
            }
        }
        if state.ddl_jobs.load(Ordering::SeqCst) > 0 {
            if let Some(flow) = feed_ddl_job(state, tag, body, &ddl_ready) {
                return Ok(flow);
            }
        }
        match tag {
            b'Z' => {
                last_was_fatal = false;
                let status = body.first().copied().unwrap_or(b'I');
                state.tx_status.store(status, Ordering::Relaxed);
                if status == b'I' {
                    state.ddl_scope_local.store(0, Ordering::Relaxed);
                    state.lost_transaction.store(false, Ordering::Relaxed);
                    // The transaction held the cluster DDL lease: it is
                    // given back before the client hears of the end.
                    if state.ddl_lease.load(Ordering::SeqCst) != 0 {
                        state.lease_release_due.store(true, Ordering::SeqCst);
                    }
                }
                let started = state.pending.lock().ok().and_then(|mut p| p.pop_front());
                if let Some(Pending::Ready { sent, wrote, scope }) = started {
                    metrics.query_duration.record(sent.elapsed().as_secs_f64());
                    txn_wrote |= wrote;
                    if !std::mem::take(&mut failed_since_ready) {
                        apply_scope_changes(state, &scope);
                    }
                }
                // A transaction ended; with replication, it may have to wait
                // for its commit scope, and it wakes the replication streams.
                if let (b'I', Some(progress)) = (status, &node.progress) {
                    state.txn_stamped.store(false, Ordering::Relaxed);
                    let local = scope::decode(state.scope_local.swap(0, Ordering::SeqCst));
                    if std::mem::take(&mut txn_wrote) {
                        let scope = local
                            .or_else(|| scope::decode(state.scope_session.load(Ordering::SeqCst)))
                            .unwrap_or(default_scope);
                        if scope == CommitScope::Local {
                            progress.wake();
                        } else {
                            // Hold this ReadyForQuery until the scope is
                            // reached (see the relay loop below).
                            if let Ok(mut wait) = scope_wait.lock() {
                                *wait = Some(scope);
                            }
                            return Ok(Flow::Await);
                        }
                    }
                }
                if state.lease_release_due.load(Ordering::SeqCst) {
                    return Ok(Flow::Await);
                }
                if draining() && idle() {
                    stop_for_shutdown = true;
                    return Ok(Flow::Stop);
                }
            }
            b'E' => {
                failed_since_ready = true;
                state.lost_transaction.store(false, Ordering::Relaxed);
                metrics.error(ErrorKind::BackendError);
                let fields = protocol::parse_error_fields(body);
                last_was_fatal = fields.severity == "FATAL" || fields.severity == "PANIC";
                // The server going down (shutdown, crash restart): held, so
                // that the session can move instead (see relay).
                if last_was_fatal
                    && replicating
                    && matches!(fields.code, "57P01" | "57P02" | "57P03")
                {
                    let mut raw = BytesMut::with_capacity(body.len() + 5);
                    protocol::write_message(&mut raw, b'E', |m| m.extend_from_slice(body));
                    if let Ok(mut held) = held_fatal.lock() {
                        *held = Some((fields.code.to_owned(), raw));
                    }
                    last_was_fatal = false;
                    return Ok(Flow::Replace(BytesMut::new()));
                }
            }
            b'S' => state.report(body),
            b'A' => {
                if let Some(message) = notification_for_client(state, body) {
                    return Ok(Flow::Replace(message));
                }
            }
            _ => {}
        }
        Ok(Flow::Continue)
    };
    let max = usize::MAX >> 1;
    // One wait for the start of shutdown for the whole session (registering
    // a fresh waiter before every read would take a lock each time).
    let shutdown_started = shutdown.wait_for(|started| *started);
    tokio::pin!(shutdown_started);
    let mut shutdown_seen = draining();
    loop {
        if shutdown_seen && idle() && side.buf.is_empty() {
            return shutdown_session(writer).await;
        }
        if shutdown_seen {
            if let Err(end) = read_more(reader, &mut side.buf).await {
                return ended(end, last_was_fatal);
            }
        } else {
            // Wait for backend bytes or the start of shutdown, whichever
            // comes first; an idle session is then closed at once.
            tokio::select! {
                _ = &mut shutdown_started => {
                    shutdown_seen = true;
                    continue;
                }
                readable = read_more(reader, &mut side.buf) => {
                    if let Err(end) = readable {
                        return ended(end, last_was_fatal);
                    }
                }
            }
        }
        // A commit held for its scope: wait, then send its ReadyForQuery
        // (after an error or warning if the scope was not reached) and go on
        // with what is buffered behind it.
        side.busy = true;
        let flow = loop {
            let flow = forward(
                &mut side.framer,
                &mut side.buf,
                writer,
                max,
                &inspect,
                &mut on_message,
            )
            .await;
            let Ok(Flow::Held(ready)) = &flow else {
                break flow;
            };
            let mut out = BytesMut::new();
            let job = ddl_ready.lock().ok().and_then(|mut j| j.take());
            if let Some(job) = job {
                // A replicated DDL query: its answer replaces the held
                // ReadyForQuery (of the validation's ROLLBACK).
                let sent = job.sent();
                let scope = scope::decode(state.scope_session.load(Ordering::SeqCst))
                    .unwrap_or(default_scope);
                ddl::finish(node, job, scope, &mut out).await;
                metrics.query_duration.record(sent.elapsed().as_secs_f64());
                state.tx_status.store(b'I', Ordering::Relaxed);
            } else {
                if state.lease_release_due.swap(false, Ordering::SeqCst) {
                    let seq = state.lease_dropped();
                    if ddl_lease::give_back(node, state.lease_token, seq, None, serving).await {
                        ddl_lease::wait_for_peers(node, seq).await;
                    }
                }
                let wait = scope_wait.lock().ok().and_then(|mut w| w.take());
                if let (Some(scope), Some(progress)) = (wait, &node.progress) {
                    if serving == node.config.home_backend().name
                        && node.drives_home.load(Ordering::Relaxed)
                    {
                        let (reached, ok) = progress.wait(scope, scope_limit).await;
                        scope_outcome(node, scope, reached, ok, &mut out);
                    } else {
                        let (reached, ok) =
                            wait_on_slots(node, serving, &mut away, scope, scope_limit).await;
                        scope_outcome(node, scope, reached, ok, &mut out);
                    }
                }
                out.extend_from_slice(ready);
            }
            if writer.write_all(&out).await.is_err() {
                return RelayEnd::ClientDone;
            }
        };
        side.busy = false;
        match flow {
            // forward() turns a replacement into Continue once written.
            Ok(Flow::Continue | Flow::Replace(_) | Flow::Await | Flow::Held(_)) => {}
            Ok(Flow::Stop) => {
                if stop_for_shutdown {
                    return shutdown_session(writer).await;
                }
                return RelayEnd::ClientDone;
            }
            Err(PumpError::WriteFailed) | Err(PumpError::Eof) => return RelayEnd::ClientDone,
            Err(PumpError::Protocol(e)) => {
                tracing::warn!(error = %e, "backend protocol error");
                return RelayEnd::BackendGone {
                    after_fatal: last_was_fatal,
                };
            }
        }
    }
}

/// A NotificationResponse sent by the session's own backend, with the pid
/// the client knows instead of the backend's (`None`: it goes as it is).
fn notification_for_client(state: &RelayState, body: &[u8]) -> Option<BytesMut> {
    let pid = i32::from_be_bytes(body.get(..4)?.try_into().ok()?);
    let client_pid = state.client_pid.load(Ordering::Relaxed);
    if pid != state.backend_pid.load(Ordering::Relaxed) || pid == client_pid {
        return None;
    }
    let mut message = BytesMut::with_capacity(body.len() + 5);
    protocol::write_message(&mut message, b'A', |m| {
        m.extend_from_slice(&client_pid.to_be_bytes());
        m.extend_from_slice(&body[4..]);
    });
    Some(message)
}

fn backend_end(end: PumpError, after_fatal: bool) -> RelayEnd {
    match end {
        PumpError::Eof | PumpError::Protocol(_) | PumpError::WriteFailed => {
            RelayEnd::BackendGone { after_fatal }
        }
    }
}

async fn shutdown_session<W: AsyncWrite + Unpin>(writer: &mut W) -> RelayEnd {
    let mut out = BytesMut::new();
    protocol::error_response(
        &mut out,
        Severity::Fatal,
        "57P01",
        "terminating connection due to administrator command",
        Some("The Chorus node is shutting down."),
    );
    let _ = writer.write_all(&out).await;
    RelayEnd::Shutdown
}

/// The commit scope wait of a session served by a backend whose streams
/// this node does not drive (another backend it moved to, or its home
/// while handed to another node): that backend's own slots, confirmed by
/// the streams its driver runs once a peer has applied, tell how many
/// backends have the transaction. `away` keeps the control connection.
async fn wait_on_slots(
    node: &Node,
    serving: &str,
    away: &mut Option<tokio_postgres::Client>,
    scope: CommitScope,
    limit: Duration,
) -> (usize, bool) {
    let needed = scope.required(node.config.backends.len());
    if needed <= 1 {
        return (1, true);
    }
    let (Some(config), Some(backend)) = (
        node.config.replication.as_ref(),
        node.config.backends.iter().find(|b| b.name == serving),
    ) else {
        return (1, false);
    };
    let deadline = tokio::time::Instant::now() + limit;
    if away.as_ref().is_none_or(tokio_postgres::Client::is_closed) {
        let connected =
            tokio::time::timeout_at(deadline, crate::backend::connect_backend(backend, config))
                .await;
        *away = connected.ok().and_then(Result::ok);
    }
    let Some(client) = away.as_ref() else {
        return (1, false);
    };
    let Ok(Ok(row)) = tokio::time::timeout_at(
        deadline,
        client.query_one("SELECT pg_current_wal_flush_lsn()::text", &[]),
    )
    .await
    else {
        return (1, false);
    };
    let lsn: String = row.get(0);
    let mut reached = 1;
    loop {
        let count = tokio::time::timeout_at(
            deadline,
            client.query_one(
                "SELECT count(*) FROM pg_replication_slots \
                 WHERE slot_name LIKE 'chorus\\_%\\_to\\_%' AND confirmed_flush_lsn >= $1::text::pg_lsn",
                &[&lsn],
            ),
        )
        .await;
        if let Ok(Ok(row)) = count {
            reached = 1 + usize::try_from(row.get::<_, i64>(0)).unwrap_or(0);
            if reached >= needed {
                return (reached, true);
            }
        }
        if tokio::time::Instant::now() >= deadline {
            return (reached, false);
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// What a commit whose scope was not reached in time reports, in `out`.
fn scope_outcome(node: &Node, scope: CommitScope, reached: usize, ok: bool, out: &mut BytesMut) {
    let Some(config) = &node.config.replication else {
        return;
    };
    if ok {
        return;
    }
    let scope_name = match scope {
        CommitScope::Local => "local",
        CommitScope::Majority => "majority",
        CommitScope::All => "all",
    };
    let message = format!(
        "commit scope \"{scope_name}\" not reached within {} ms: {reached} of {} backends have the transaction",
        config.commit_scope_timeout_ms,
        node.config.backends.len()
    );
    match config.commit_scope_timeout_action {
        TimeoutAction::Error => protocol::error_response(
            out,
            Severity::Error,
            "40003",
            &message,
            Some("The transaction has committed on this node's backend and reaches the others when they are available."),
        ),
        TimeoutAction::Warning => protocol::warning_notice(out, "01000", &message),
    }
}

/// If the oldest answer due belongs to a DDL job, feed it this backend
/// message: swallowed, or (its last answer) held while the job finishes.
fn feed_ddl_job(
    state: &RelayState,
    tag: u8,
    body: &[u8],
    ready: &Mutex<Option<DdlJob>>,
) -> Option<Flow> {
    let mut pending = state.pending.lock().ok()?;
    let Some(Pending::Ddl(job)) = pending.front_mut() else {
        return None;
    };
    match job.feed(tag, body) {
        JobStep::Swallow => Some(Flow::Replace(BytesMut::new())),
        JobStep::Done => {
            let Some(Pending::Ddl(job)) = pending.pop_front() else {
                return None;
            };
            state.ddl_jobs.fetch_sub(1, Ordering::SeqCst);
            if let Ok(mut ready) = ready.lock() {
                *ready = Some(job);
            }
            Some(Flow::Await)
        }
    }
}

/// If the oldest answer due belongs to a stamp, what to do with this
/// backend message (and retire the stamp after its last answer).
fn judge_for_stamp(state: &RelayState, tag: u8) -> Option<Verdict> {
    let mut pending = state.pending.lock().ok()?;
    let Some(Pending::Stamp(swallower)) = pending.front_mut() else {
        return None;
    };
    let verdict = swallower.judge(tag);
    if matches!(verdict, Verdict::SwallowLast | Verdict::PassLast) {
        pending.pop_front();
        state.stamps.fetch_sub(1, Ordering::SeqCst);
    }
    Some(verdict)
}

/// Whether a pump goes on after a message.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Flow {
    Continue,
    /// Forward what has been framed so far, then stop.
    Stop,
    /// Forward these bytes (whole messages) instead of the message.
    Replace(BytesMut),
    /// (From `on_message`) forward what came before this message and hold
    /// the message: `forward` returns it as [`Flow::Held`].
    Await,
    /// (From `forward`) the held message; the rest stays buffered.
    Held(BytesMut),
}

#[derive(Debug)]
enum PumpError {
    Eof,
    /// Writing failed. From `forward`, every message `on_message` saw (but
    /// one it held) is then consumed from the buffer: they count as sent
    /// to a failed peer.
    WriteFailed,
    Protocol(ProtocolError),
}

/// Tracks message boundaries in a byte stream without buffering messages
/// that nobody inspects.
#[derive(Default)]
struct Framer {
    /// Bytes of the current pass-through message not yet seen.
    passthrough: usize,
}

/// Read more bytes into `buf`; `Err(Eof)` at end of stream.
async fn read_more<R: AsyncRead + Unpin>(
    reader: &mut R,
    buf: &mut BytesMut,
) -> Result<(), PumpError> {
    if buf.capacity() - buf.len() < READ_CHUNK / 4 {
        buf.reserve(READ_CHUNK);
    }
    match reader.read_buf(buf).await {
        Ok(0) => Err(PumpError::Eof),
        Ok(_) => Ok(()),
        Err(e) => Err(PumpError::Protocol(ProtocolError::Io(e))),
    }
}

/// Frame what is buffered, let `on_message` see the inspected messages,
/// write every complete byte to `writer`, and keep the partial rest.
async fn forward<W, I, M>(
    framer: &mut Framer,
    buf: &mut BytesMut,
    writer: &mut W,
    max: usize,
    inspect: &I,
    on_message: &mut M,
) -> Result<Flow, PumpError>
where
    W: AsyncWrite + Unpin,
    I: Fn(u8) -> bool,
    M: FnMut(u8, &[u8], &[u8]) -> Result<Flow, ProtocolError>,
{
    let mut pos = 0;
    // Start of the bytes not yet written (after a replaced message).
    let mut start = 0;
    let mut flow = Flow::Continue;
    while pos < buf.len() {
        if framer.passthrough > 0 {
            let n = framer.passthrough.min(buf.len() - pos);
            framer.passthrough -= n;
            pos += n;
            continue;
        }
        let Some((tag, total)) =
            protocol::frame_header(&buf[pos..], max).map_err(PumpError::Protocol)?
        else {
            break;
        };
        if inspect(tag) {
            if buf.len() - pos < total {
                // Make room for the whole message before the next read.
                buf.reserve(total - (buf.len() - pos));
                break;
            }
            flow = on_message(tag, &buf[pos + 5..pos + total], &buf[pos + total..])
                .map_err(PumpError::Protocol)?;
            if let Flow::Replace(replacement) = &flow {
                // Rare (a refused statement): write what came before, then
                // the replacement, and skip the original.
                let written = async {
                    writer.write_all(&buf[start..pos]).await?;
                    writer.write_all(replacement).await
                }
                .await;
                if written.is_err() {
                    buf.advance(pos + total);
                    return Err(PumpError::WriteFailed);
                }
                start = pos + total;
                flow = Flow::Continue;
            }
            if flow == Flow::Await {
                let held = BytesMut::from(&buf[pos..pos + total]);
                if writer.write_all(&buf[start..pos]).await.is_err() {
                    // The held message stays, to be looked at again.
                    buf.advance(pos);
                    return Err(PumpError::WriteFailed);
                }
                buf.advance(pos + total);
                return Ok(Flow::Held(held));
            }
            pos += total;
            if flow == Flow::Stop {
                break;
            }
        } else {
            framer.passthrough = total;
        }
    }
    if pos > start && writer.write_all(&buf[start..pos]).await.is_err() {
        buf.advance(pos);
        return Err(PumpError::WriteFailed);
    }
    if pos > 0 {
        buf.advance(pos);
    }
    Ok(flow)
}

/// One direction's framing state, kept across backend connections: what is
/// buffered, and whether the direction stopped at a message boundary.
#[derive(Default)]
struct PumpSide {
    buf: BytesMut,
    framer: Framer,
    /// Set while framed bytes are being forwarded: a direction dropped
    /// then may have written part of a message.
    busy: bool,
    /// Look at what is buffered before reading more (a held message was
    /// put back).
    rescan: bool,
}

impl PumpSide {
    /// Whether nothing is half-forwarded: the peer on the other side has
    /// received whole messages only.
    fn clean(&self) -> bool {
        !self.busy && self.framer.passthrough == 0
    }
}

/// Read from `reader`, forward to `writer`, until EOF, an error, or
/// `on_message` says stop (`None`) or holds a message (`Some`: the caller
/// puts it back in `side.buf` and sets `side.rescan` to go on).
async fn pump<R, W, I, M>(
    reader: &mut R,
    writer: &mut W,
    side: &mut PumpSide,
    max: usize,
    inspect: I,
    mut on_message: M,
) -> Result<Option<BytesMut>, PumpError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
    I: Fn(u8) -> bool,
    M: FnMut(u8, &[u8], &[u8]) -> Result<Flow, ProtocolError>,
{
    loop {
        if !std::mem::take(&mut side.rescan) {
            read_more(reader, &mut side.buf).await?;
        }
        side.busy = true;
        let flow = match forward(
            &mut side.framer,
            &mut side.buf,
            writer,
            max,
            &inspect,
            &mut on_message,
        )
        .await
        {
            Ok(flow) => flow,
            // The direction stopped at a message boundary, unless a
            // pass-through message is cut (`clean` sees that); what is
            // still buffered goes to the next backend, if there is one.
            Err(PumpError::WriteFailed) => {
                side.busy = false;
                side.rescan = true;
                return Err(PumpError::WriteFailed);
            }
            Err(e) => return Err(e),
        };
        side.busy = false;
        match flow {
            Flow::Stop => return Ok(None),
            Flow::Held(message) => return Ok(Some(message)),
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(tag: u8, body: &[u8]) -> Vec<u8> {
        let mut m = vec![tag];
        m.extend_from_slice(&(body.len() as u32 + 4).to_be_bytes());
        m.extend_from_slice(body);
        m
    }

    #[tokio::test]
    async fn forwards_split_and_large_messages_unchanged() {
        // A big pass-through message split across reads, then an inspected one.
        let mut input = message(b'd', &vec![7u8; 100_000]);
        input.extend(message(b'Q', b"SELECT 1\0"));
        input.extend(message(b'X', b""));
        let (mut client, proxy_side) = tokio::io::duplex(1024);
        let writer_task = tokio::spawn({
            let input = input.clone();
            async move {
                client.write_all(&input).await.unwrap();
                client
            }
        });
        let mut reader = proxy_side;
        let mut out = Vec::new();
        let mut seen = Vec::new();
        pump(
            &mut reader,
            &mut out,
            &mut PumpSide::default(),
            1 << 20,
            |t| t == b'Q' || t == b'X',
            |tag, body, _| {
                seen.push((tag, body.to_vec()));
                Ok(if tag == b'X' {
                    Flow::Stop
                } else {
                    Flow::Continue
                })
            },
        )
        .await
        .unwrap();
        let _client = writer_task.await.unwrap();
        assert_eq!(out, input);
        assert_eq!(seen[0], (b'Q', b"SELECT 1\0".to_vec()));
        assert_eq!(seen[1].0, b'X');
    }

    /// Pump `input` to the end, inspecting every message; what came out.
    async fn pump_all(input: &[u8]) -> (Result<Option<BytesMut>, PumpError>, Vec<u8>) {
        let mut reader = input;
        let mut out = Vec::new();
        let result = pump(
            &mut reader,
            &mut out,
            &mut PumpSide::default(),
            1 << 20,
            |_| true,
            |_, _, _| Ok(Flow::Continue),
        )
        .await;
        (result, out)
    }

    #[test]
    fn notifications_of_the_sessions_own_backend_carry_the_clients_pid() {
        let state = RelayState::new();
        state.client_pid.store(77, Ordering::Relaxed);
        state.backend_pid.store(4242, Ordering::Relaxed);
        let body = |pid: i32| {
            let mut b = pid.to_be_bytes().to_vec();
            b.extend_from_slice(b"chan\0payload\0");
            b
        };
        let rewritten = notification_for_client(&state, &body(4242)).unwrap();
        assert_eq!(&rewritten[..], &message(b'A', &body(77))[..]);
        // Another session's notification keeps its sender's pid; so does
        // one where the client already knows the backend's pid.
        assert!(notification_for_client(&state, &body(999)).is_none());
        state.client_pid.store(4242, Ordering::Relaxed);
        assert!(notification_for_client(&state, &body(4242)).is_none());
    }

    /// A peer that is gone: every write fails.
    struct Gone;

    impl AsyncWrite for Gone {
        fn poll_write(
            self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
            _: &[u8],
        ) -> std::task::Poll<std::io::Result<usize>> {
            std::task::Poll::Ready(Err(std::io::ErrorKind::BrokenPipe.into()))
        }
        fn poll_flush(
            self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<std::io::Result<()>> {
            std::task::Poll::Ready(Ok(()))
        }
        fn poll_shutdown(
            self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<std::io::Result<()>> {
            std::task::Poll::Ready(Ok(()))
        }
    }

    #[tokio::test]
    async fn a_failed_write_leaves_the_direction_at_a_message_boundary() {
        // Whole inspected messages, then the start of another: the whole
        // ones count as sent, the partial one waits for the next backend.
        let mut input = message(b'B', b"bind");
        input.extend(message(b'S', b""));
        let partial = message(b'Q', b"SELECT 1\0");
        input.extend(&partial[..7]);
        let mut side = PumpSide::default();
        let mut seen = Vec::new();
        let result = pump(
            &mut &input[..],
            &mut Gone,
            &mut side,
            1 << 20,
            |_| true,
            |tag, _, _| {
                seen.push(tag);
                Ok(Flow::Continue)
            },
        )
        .await;
        assert!(matches!(result, Err(PumpError::WriteFailed)), "{result:?}");
        assert_eq!(seen, [b'B', b'S']);
        assert!(side.clean());
        assert_eq!(&side.buf[..], &partial[..7]);
        // A pass-through message cut by the failure: not clean.
        let mut side = PumpSide::default();
        let big = message(b'd', &[7u8; 100]);
        let result = pump(
            &mut &big[..50],
            &mut Gone,
            &mut side,
            1 << 20,
            |_| false,
            |_, _, _| Ok(Flow::Continue),
        )
        .await;
        assert!(matches!(result, Err(PumpError::WriteFailed)), "{result:?}");
        assert!(!side.clean());
    }

    #[tokio::test]
    async fn oversized_and_short_lengths_are_protocol_errors() {
        for bad in [vec![b'Q', 0x7f, 0, 0, 0], vec![b'Q', 0, 0, 0, 2]] {
            let (result, out) = pump_all(&bad).await;
            assert!(matches!(result, Err(PumpError::Protocol(_))), "{result:?}");
            assert!(out.is_empty());
        }
    }

    #[test]
    fn statements_that_would_commit_are_recognized() {
        for sql in [
            "COMMIT",
            "commit;",
            "  End  ",
            "COMMIT AND CHAIN",
            "end transaction",
            "PREPARE TRANSACTION 'x'",
        ] {
            assert!(ends_transaction(sql), "{sql}");
        }
        for sql in [
            "ROLLBACK",
            "ABORT",
            "SELECT 1",
            "PREPARE p AS SELECT 1",
            "committee",
            "",
        ] {
            assert!(!ends_transaction(sql), "{sql}");
        }
    }

    #[tokio::test]
    async fn truncated_stream_ends_without_forwarding_the_partial_message() {
        let mut input = message(b'Q', b"SELECT 1\0");
        input.extend_from_slice(&message(b'Q', b"SELECT 2\0")[..6]);
        let (result, out) = pump_all(&input).await;
        assert!(matches!(result, Err(PumpError::Eof)));
        assert_eq!(out, message(b'Q', b"SELECT 1\0"));
    }
}
