//! Startup: TLS, protocol negotiation, cancel requests, authentication
//! and the login to a backend.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::BytesMut;
use rand::RngCore;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;

use crate::auth::{AuthError, ScramServer};
use crate::backend::{BackendConnection, BackendError, LoginParams};
use crate::config::{AuthMethod, PoolMode};
use crate::metrics::ErrorKind;
use crate::node::Node;
use crate::wire::protocol;
use crate::wire::protocol::{read_message, ProtocolError, Severity, StartupPacket};
use crate::{auth, backend};

use super::carried::Pooled;
use super::pooled::{self, Refusal};
use super::state::{RelayState, Session};

/// A client connection, before or after TLS.
pub(super) enum ClientStream {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::server::TlsStream<TcpStream>>),
    /// Moved out (into a TLS handshake that failed); every operation fails.
    Closed,
}

pub(super) fn closed() -> std::io::Error {
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
pub(super) enum StartupFailure {
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

pub(super) async fn report_startup_failure(
    node: &Node,
    client: &mut ClientStream,
    failure: StartupFailure,
) {
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

pub(super) struct Established {
    pub(super) backend: BackendConnection,
    pub(super) session: Session,
}

/// What a startup that went through leads to.
pub(super) enum Started {
    /// A client session, logged in to its backend.
    Session(Box<Established>),
    /// An admin console session (see ops/console.rs), authenticated; what
    /// is still to be sent before its greeting.
    Console(BytesMut),
}

/// Startup packet(s), authentication and backend login. `Ok(None)` when the
/// connection was only a probe or a cancel request.
pub(super) async fn startup(
    node: &Arc<Node>,
    client: &mut ClientStream,
    peer: SocketAddr,
) -> Result<Option<Started>, StartupFailure> {
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
    // A database created through Chorus a moment ago may not have joined
    // replication on this node yet: wait for it, as for the schema below.
    let mut lane = node.lane(&database);
    if lane.is_none() && crate::cluster::databases::created_through_chorus(node, &database) {
        let deadline = std::time::Instant::now() + node.live().config.backend_connect_timeout();
        while lane.is_none() && std::time::Instant::now() < deadline {
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            lane = node.lane(&database);
        }
    }
    let replicated = lane.is_some();
    let forwarded: Vec<(String, String)> = params
        .iter()
        .filter(|(k, _)| !(k.starts_with("_pq_.") || (replicated && k.starts_with("chorus."))))
        .cloned()
        .chain(
            replicated
                .then(|| login_settings(node))
                .into_iter()
                .flatten(),
        )
        .collect();

    authenticate(node, client, peer, &user, &database, &mut out).await?;

    // Chorus's own settings given in `options`: refused at login when a
    // value is not one they take, as PostgreSQL refuses its own.
    if replicated {
        if let Some((statement, _)) = crate::scope::login_settings(&params)
            .into_iter()
            .find(|(_, valid)| !valid)
        {
            let name = statement
                .split_whitespace()
                .nth(1)
                .unwrap_or("chorus")
                .to_owned();
            return Err(StartupFailure::Fatal {
                kind: ErrorKind::Protocol,
                code: "22023",
                message: format!("invalid value for parameter \"{name}\" in options"),
            });
        }
    }

    // The admin console: served by the node itself, to the roles named.
    if database == node.config.node.admin_database {
        if !node.live().config.node.admin_users.contains(&user) {
            return Err(StartupFailure::Fatal {
                kind: ErrorKind::Auth,
                code: "28000",
                message: format!(
                    "role \"{user}\" may not use the admin console: node.admin_users does not name it"
                ),
            });
        }
        return Ok(Some(Started::Console(out)));
    }

    // Only the replicated databases (and those configured local) can be
    // used: writes anywhere else would reach one backend only.
    if let Some(replication) = &node.config.replication {
        if !replicated && !replication.local_databases.contains(&database) {
            let replicated: Vec<String> = replication
                .replicated_databases()
                .map(|d| format!("\"{d}\""))
                .collect();
            return Err(StartupFailure::Fatal {
                kind: ErrorKind::Auth,
                code: "0A000",
                message: format!(
                    "database \"{database}\" is not replicated by this Chorus cluster: connect to {}, or list it in replication.databases to replicate it, or in replication.local_databases to use each backend's copy on its own",
                    replicated.join(", ")
                ),
            });
        }
    }

    // With replication, a session's writes must be captured: wait until the
    // chorus schema is on the home backend in its database (a node that
    // has just started installs it), as PostgreSQL makes clients wait while
    // it starts up.
    let ready = match &lane {
        Some(lane) => {
            lane.wait_schema_ready(node.live().config.backend_connect_timeout())
                .await
        }
        None => {
            node.wait_schema_ready(node.live().config.backend_connect_timeout())
                .await
        }
    };
    if !ready {
        return Err(StartupFailure::Fatal {
            kind: ErrorKind::BackendConnect,
            code: "57P03",
            message: "the Chorus node is still installing its schema on its home backend".into(),
        });
    }

    // Transaction pooling: a connection of the pool, set up for this
    // session (see pooled.rs).
    if node.config.pool.mode_for(&user, &database) == PoolMode::Transaction {
        return start_pooled(node, client, user, database, forwarded, peer, out).await;
    }

    // The home backend, or (with replication) another one when it is down:
    // every backend has the same data.
    let login_password = node.live().password(&user);
    let password = login_password.as_deref();
    let mut failure = None;
    let mut connected = None;
    let mut unready = None;
    let backends = node.session_backends();
    for candidate in backends.iter() {
        // Another node's home takes writes once its changes can reach
        // every peer (see `wait_streams_ready`).
        if let Some(lane) = lane
            .as_ref()
            .filter(|_| candidate.name != node.config.home_backend().name)
        {
            let limit = node.live().config.backend_connect_timeout();
            if !crate::cluster::replication::wait_streams_ready(node, lane, candidate, limit).await
            {
                unready.get_or_insert(candidate.name.clone());
                continue;
            }
        }
        let address = candidate.address();
        let login = LoginParams {
            address: &address,
            tls: candidate.tls.as_ref(),
            user: &user,
            password,
            database: &database,
            params: &forwarded,
        };
        match backend::connect(&login, node.live().config.backend_connect_timeout()).await {
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
        if let (None, Some(name)) = (&failure, unready) {
            return Err(StartupFailure::Fatal {
                kind: ErrorKind::BackendConnect,
                code: "57P03",
                message: format!(
                    "backend \"{name}\" does not stream its changes to every other backend yet"
                ),
            });
        }
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
    cancel_key.describe(crate::backend::cancel::ClientInfo {
        user: user.clone(),
        database: database.clone(),
        address: peer,
        since: std::time::Instant::now(),
    });
    protocol::authentication(&mut out, &protocol::Authentication::Ok);
    out.extend_from_slice(&backend.startup_messages);
    protocol::backend_key_data(&mut out, cancel_key.pid, cancel_key.secret);
    protocol::ready_for_query(&mut out, protocol::TransactionStatus::Idle);
    client.write_all(&out).await?;
    Ok(Some(Started::Session(Box::new(Established {
        backend,
        session: Session {
            user,
            database,
            params: forwarded,
            backend_name: home.name.clone(),
            cancel_key,
            backend_open: None,
            password: login_password,
            pooled: None,
        },
    }))))
}

/// The end of a pooled session's startup: a connection of the pool (waited
/// for as a statement waits), the settings it reports with the client's
/// own, and the client's key.
async fn start_pooled(
    node: &Arc<Node>,
    client: &mut ClientStream,
    user: String,
    database: String,
    forwarded: Vec<(String, String)>,
    peer: SocketAddr,
    mut out: BytesMut,
) -> Result<Option<Started>, StartupFailure> {
    let pooled = Pooled::new(&forwarded);
    let mut session = Session {
        password: node.live().password(&user),
        user,
        database,
        params: forwarded,
        backend_name: node.config.home_backend().name.clone(),
        cancel_key: node.cancel_keys.register("", 0, 0),
        backend_open: None,
        pooled: Some(pooled),
    };
    let state = RelayState::new(Some(node), &session.database, true);
    let stream = match pooled::check_out(node, &state, &mut session, false).await {
        Ok(stream) => stream,
        Err(Refusal::Fatal(raw)) => return Err(StartupFailure::Backend(raw)),
        Err(Refusal::Error { code, message, .. }) => {
            return Err(StartupFailure::Fatal {
                kind: ErrorKind::BackendConnect,
                code,
                message,
            })
        }
    };
    session
        .cancel_key
        .describe(crate::backend::cancel::ClientInfo {
            user: session.user.clone(),
            database: session.database.clone(),
            address: peer,
            since: std::time::Instant::now(),
        });
    let startup_messages = session
        .pooled
        .as_ref()
        .map(pooled::startup_parameters)
        .unwrap_or_default();
    protocol::authentication(&mut out, &protocol::Authentication::Ok);
    out.extend_from_slice(&startup_messages);
    protocol::backend_key_data(&mut out, session.cancel_key.pid, session.cancel_key.secret);
    protocol::ready_for_query(&mut out, protocol::TransactionStatus::Idle);
    client.write_all(&out).await?;
    let (pid, secret) = session.cancel_key.backend_key().unwrap_or((0, 0));
    Ok(Some(Started::Session(Box::new(Established {
        backend: BackendConnection {
            stream,
            pid,
            secret,
            startup_messages,
        },
        session,
    }))))
}

/// Run the authentication exchange chosen by the rules. Messages queued in
/// `out` (NegotiateProtocolVersion) are sent first.
pub(super) async fn authenticate(
    node: &Node,
    client: &mut ClientStream,
    peer: SocketAddr,
    user: &str,
    database: &str,
    out: &mut BytesMut,
) -> Result<(), StartupFailure> {
    let live = node.live();
    let method = auth::method_for(&live.config, user, database, peer.ip())?;
    let password = live.config.user(user).and_then(|u| u.password.as_deref());
    let mut buf = BytesMut::with_capacity(256);
    let max = 64 * 1024;
    match method {
        AuthMethod::Trust => Ok(()),
        AuthMethod::Reject => Err(AuthError::Rejected(user.to_owned()).into()),
        AuthMethod::Md5 => {
            let mut salt = [0u8; 4];
            rand::rng().fill_bytes(&mut salt);
            protocol::authentication(out, &protocol::Authentication::MD5Password(salt.to_vec()));
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
            protocol::authentication_sasl_data(out, server.server_first(), false);
            client.write_all(out).await?;
            out.clear();
            let client_final = read_password_message(client, &mut buf, max).await?;
            let server_final = server
                .finish(&client_final)
                .map_err(|_| AuthError::PasswordFailed(user.to_owned()))?;
            protocol::authentication_sasl_data(out, &server_final, true);
            Ok(())
        }
    }
}

pub(super) async fn read_password_message(
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
pub(super) async fn forward_cancel(node: &Node, pid: i32, secret: i32) {
    let Some(consensus) = node.consensus() else {
        return;
    };
    let me = u64::from(node.config.node.id);
    let others: Vec<String> = consensus.state().read(|s| {
        s.nodes
            .iter()
            .filter(|(id, n)| **id != me && n.state != chorus_consensus::NodeState::Parted)
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

/// What a backend session of the replicated database is logged in with:
/// the node it serves (`chorus.origin`), how long it waits for the node's
/// answer to a question for the DDL lease, and the settings of the global
/// sequences DDL makes there (which a lease's stamp sets too: DDL that a
/// function runs under a lease asked for mid-statement has no stamp).
fn login_settings(node: &Node) -> [(String, String); 4] {
    let cluster = node.config.cluster.as_ref();
    let kind = cluster.map_or("snowflake", |c| c.sequence_kind.as_str());
    let block = cluster.map_or(crate::config::DEFAULT_GALLOC_RANGE, |c| c.galloc_range_size);
    [
        ("chorus.origin".to_owned(), node.config.node.id.to_string()),
        ("chorus.lease_wait_ms".to_owned(), lease_wait_ms(node)),
        ("chorus.sequence_default_kind".to_owned(), kind.to_owned()),
        ("chorus.sequence_block".to_owned(), block.to_string()),
    ]
}

/// How long a backend session waits for the node's answer when it asks for
/// the cluster DDL lease mid-statement (see `chorus.ask_lease`): longer
/// than the node can take to answer (the lock timeout, then the DDL
/// timeout for each of the lease's proposal and the backend's catching up).
fn lease_wait_ms(node: &Node) -> String {
    let answer_within =
        node.config.ddl_lock_timeout() + 2 * node.config.ddl_timeout() + Duration::from_secs(5);
    answer_within.as_millis().to_string()
}
