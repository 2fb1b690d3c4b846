//! One server connection: connect to a PostgreSQL backend and log in on a
//! client's behalf, answering whatever authentication the backend asks for
//! (trust, cleartext, md5 or SCRAM-SHA-256), in the clear or over TLS
//! (`tls.rs`). The node's own control connections are in `control.rs`;
//! the cancel keys it hands its clients, and where their cancels go, in
//! `cancel.rs`; the connections transaction pooling shares, in `pool.rs`.

use std::time::Duration;

use bytes::{BufMut, BytesMut};
use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256};
use postgres_protocol::message::frontend;
use thiserror::Error;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use crate::wire::protocol::{self, read_message, ProtocolError};

pub mod cancel;
mod control;
pub mod pool;
mod tls;

pub use crate::config::{BackendTls, SslMode};
pub use control::{
    connect_backend, connect_backend_with_notices, ControlError, ControlPool, Notice,
};
pub use tls::{BackendRead, BackendStream, BackendWrite};

/// A control-plane query's error as an operator should read it: the
/// server's message, SQLSTATE and detail, where tokio-postgres's own text
/// says only "db error".
pub fn error_text(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => {
            let mut text = format!("{} ({})", db.message(), db.code().code());
            if let Some(detail) = db.detail() {
                text.push_str(": ");
                text.push_str(detail);
            }
            text
        }
        None => e.to_string(),
    }
}

/// Largest message accepted from a backend during login.
const MAX_LOGIN_MESSAGE: usize = 1 << 20;

/// Why a backend connection could not be made.
#[derive(Debug, Error)]
pub enum BackendError {
    #[error("could not connect to backend {address}: {source}")]
    Connect {
        address: String,
        source: std::io::Error,
    },
    #[error("timed out connecting to backend {0}")]
    Timeout(String),
    /// The backend refused the login; the ErrorResponse (whole message,
    /// header included) is forwarded to the client as it is.
    #[error("backend refused the login: {message}")]
    Refused { message: String, raw: BytesMut },
    #[error("backend {address} asks for a password and none is configured for user \"{user}\"")]
    NoPassword { address: String, user: String },
    #[error("backend asked for an unsupported authentication method (code {0})")]
    UnsupportedAuth(i32),
    #[error("SCRAM exchange with the backend failed: {0}")]
    Scram(std::io::Error),
    #[error("backend protocol error: {0}")]
    Protocol(#[from] ProtocolError),
}

/// A logged-in backend connection, ready for queries.
pub struct BackendConnection {
    pub stream: BackendStream,
    /// The backend's own cancel key.
    pub pid: i32,
    pub secret: i32,
    /// ParameterStatus and NoticeResponse messages received during login,
    /// raw, in order: forwarded to the client as they are.
    pub startup_messages: BytesMut,
}

/// What the proxy logs in with.
pub struct LoginParams<'a> {
    pub address: &'a str,
    /// TLS to the backend, when its `sslmode` is not `disable`.
    pub tls: Option<&'a BackendTls>,
    pub user: &'a str,
    pub password: Option<&'a str>,
    pub database: &'a str,
    /// Other startup parameters from the client (application_name,
    /// client_encoding, DateStyle, options, …).
    pub params: &'a [(String, String)],
}

/// Connect and log in, within `timeout`.
pub async fn connect(
    login: &LoginParams<'_>,
    timeout: Duration,
) -> Result<BackendConnection, BackendError> {
    tokio::time::timeout(timeout, connect_inner(login))
        .await
        .map_err(|_| BackendError::Timeout(login.address.to_owned()))?
}

async fn connect_inner(login: &LoginParams<'_>) -> Result<BackendConnection, BackendError> {
    let connect_error = |source| BackendError::Connect {
        address: login.address.to_owned(),
        source,
    };
    let tcp = TcpStream::connect(login.address)
        .await
        .map_err(connect_error)?;
    tcp.set_nodelay(true).map_err(connect_error)?;
    let mut stream = match login.tls {
        Some(tls) => tls::negotiate(tcp, tls).await.map_err(connect_error)?,
        None => BackendStream::Plain(tcp),
    };

    let mut out = BytesMut::with_capacity(256);
    let params = [("user", login.user), ("database", login.database)]
        .into_iter()
        .chain(
            login
                .params
                .iter()
                .filter(|(k, _)| k != "user" && k != "database")
                .map(|(k, v)| (k.as_str(), v.as_str())),
        );
    frontend::startup_message(params, &mut out).map_err(ProtocolError::Io)?;
    stream.write_all(&out).await.map_err(ProtocolError::Io)?;

    let mut buf = BytesMut::with_capacity(512);
    let mut scram: Option<ScramSha256> = None;
    let mut startup_messages = BytesMut::new();
    let mut key = (0, 0);
    loop {
        let tag = read_message(&mut stream, &mut buf, MAX_LOGIN_MESSAGE).await?;
        match tag {
            b'R' => {
                if buf.len() < 4 {
                    return Err(ProtocolError::Malformed("authentication").into());
                }
                let code = i32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]);
                let payload = &buf[4..];
                out.clear();
                match code {
                    0 => continue,
                    3 => {
                        let password = password(login)?;
                        frontend::password_message(password.as_bytes(), &mut out)
                            .map_err(ProtocolError::Io)?;
                    }
                    5 => {
                        let password = password(login)?;
                        let salt: [u8; 4] = payload
                            .get(..4)
                            .and_then(|s| s.try_into().ok())
                            .ok_or(ProtocolError::Malformed("md5 salt"))?;
                        let hash = postgres_protocol::authentication::md5_hash(
                            login.user.as_bytes(),
                            password.as_bytes(),
                            salt,
                        );
                        frontend::password_message(hash.as_bytes(), &mut out)
                            .map_err(ProtocolError::Io)?;
                    }
                    10 => {
                        let password = password(login)?;
                        let offers_scram =
                            payload.split(|&b| b == 0).any(|m| m == b"SCRAM-SHA-256");
                        if !offers_scram {
                            return Err(BackendError::UnsupportedAuth(code));
                        }
                        let client =
                            ScramSha256::new(password.as_bytes(), ChannelBinding::unsupported());
                        frontend::sasl_initial_response(
                            "SCRAM-SHA-256",
                            client.message(),
                            &mut out,
                        )
                        .map_err(ProtocolError::Io)?;
                        scram = Some(client);
                    }
                    11 => {
                        let client = scram
                            .as_mut()
                            .ok_or(ProtocolError::Malformed("SASL continue"))?;
                        client.update(payload).map_err(BackendError::Scram)?;
                        frontend::sasl_response(client.message(), &mut out)
                            .map_err(ProtocolError::Io)?;
                    }
                    12 => {
                        let client = scram
                            .as_mut()
                            .ok_or(ProtocolError::Malformed("SASL final"))?;
                        client.finish(payload).map_err(BackendError::Scram)?;
                        continue;
                    }
                    other => return Err(BackendError::UnsupportedAuth(other)),
                }
                stream.write_all(&out).await.map_err(ProtocolError::Io)?;
            }
            b'S' | b'N' => {
                startup_messages.put_u8(tag);
                startup_messages.put_u32(buf.len() as u32 + 4);
                startup_messages.extend_from_slice(&buf);
            }
            b'K' => {
                if buf.len() < 8 {
                    return Err(ProtocolError::Malformed("BackendKeyData").into());
                }
                key = (
                    i32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]),
                    i32::from_be_bytes([buf[4], buf[5], buf[6], buf[7]]),
                );
            }
            b'Z' => {
                return Ok(BackendConnection {
                    stream,
                    pid: key.0,
                    secret: key.1,
                    startup_messages,
                });
            }
            b'E' => {
                let message = protocol::parse_error_fields(&buf).message.to_owned();
                let mut raw = BytesMut::with_capacity(buf.len() + 5);
                raw.put_u8(b'E');
                raw.put_u32(buf.len() as u32 + 4);
                raw.extend_from_slice(&buf);
                return Err(BackendError::Refused { message, raw });
            }
            other => return Err(ProtocolError::Unexpected(other as char).into()),
        }
    }
}

fn password<'a>(login: &LoginParams<'a>) -> Result<&'a str, BackendError> {
    login.password.ok_or_else(|| BackendError::NoPassword {
        address: login.address.to_owned(),
        user: login.user.to_owned(),
    })
}

/// Send a CancelRequest for a backend key to a backend.
pub async fn send_cancel(address: &str, pid: i32, secret: i32) -> std::io::Result<()> {
    let mut out = BytesMut::with_capacity(16);
    protocol::cancel_request(&mut out, pid, secret);
    send_packet(address, &out).await
}

/// Send one packet on a new connection to `address`, and close it (a
/// CancelRequest: nothing is answered).
pub async fn send_packet(address: &str, packet: &[u8]) -> std::io::Result<()> {
    let mut stream = TcpStream::connect(address).await?;
    stream.write_all(packet).await?;
    stream.shutdown().await
}
