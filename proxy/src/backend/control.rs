//! Control connections: the node's own connections to backends (as the
//! replication user) for replication, DDL, upkeep and health, through
//! tokio-postgres, over TLS when the backend's `sslmode` asks for it.

use std::time::Duration;

use tokio_postgres::Client;

use super::SslMode;
use crate::config::{BackendConfig, ReplicationConfig};

/// Control connections to backends (as the replication user), made on
/// first use and remade once closed.
#[derive(Debug, Default)]
pub struct BackendClients {
    clients: std::collections::HashMap<String, Client>,
}

impl BackendClients {
    /// The connection to `backend`, connecting within `limit` if need be.
    pub async fn get(
        &mut self,
        backend: &BackendConfig,
        config: &ReplicationConfig,
        limit: Duration,
    ) -> Option<&Client> {
        if self
            .clients
            .get(&backend.name)
            .is_none_or(Client::is_closed)
        {
            let client = tokio::time::timeout(limit, connect_backend(backend, config))
                .await
                .ok()?
                .ok()?;
            self.clients.insert(backend.name.clone(), client);
        }
        self.clients.get(&backend.name)
    }

    /// Drop the connection to a backend (it failed).
    pub fn forget(&mut self, name: &str) {
        self.clients.remove(name);
    }
}

pub async fn connect_backend(
    backend: &BackendConfig,
    config: &ReplicationConfig,
) -> Result<Client, tokio_postgres::Error> {
    let (client, _) = connect_with(backend, config, false).await?;
    Ok(client)
}

/// A notice a control connection received.
pub type Notice = tokio_postgres::error::DbError;

/// Connect, in the clear or over TLS as the backend's `sslmode` says; the
/// connection is driven by a task of its own, which delivers its notices
/// when `notices` is asked for.
async fn connect_with(
    backend: &BackendConfig,
    config: &ReplicationConfig,
    notices: bool,
) -> Result<(Client, tokio::sync::mpsc::Receiver<Notice>), tokio_postgres::Error> {
    let mut pg = backend_config(backend, config);
    match &backend.tls {
        None => drive(pg.connect(tokio_postgres::NoTls).await?, notices),
        Some(tls) => {
            pg.ssl_mode(if tls.mode == SslMode::Prefer {
                tokio_postgres::config::SslMode::Prefer
            } else {
                tokio_postgres::config::SslMode::Require
            });
            let connector = tokio_postgres_rustls::MakeRustlsConnect::new((*tls.config).clone());
            drive(pg.connect(connector).await?, notices)
        }
    }
}

/// Spawn the task that drives a connection (and hands its notices on,
/// when asked: those nobody takes beyond the channel's room are dropped).
fn drive<S, T>(
    (client, mut connection): (Client, tokio_postgres::Connection<S, T>),
    notices: bool,
) -> Result<(Client, tokio::sync::mpsc::Receiver<Notice>), tokio_postgres::Error>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    tokio::spawn(async move {
        if !notices {
            let _ = connection.await;
            return;
        }
        while let Some(Ok(message)) = std::future::poll_fn(|cx| connection.poll_message(cx)).await {
            if let tokio_postgres::AsyncMessage::Notice(notice) = message {
                let _ = tx.try_send(notice);
            }
        }
    });
    Ok((client, rx))
}

fn backend_config(backend: &BackendConfig, config: &ReplicationConfig) -> tokio_postgres::Config {
    let mut pg = tokio_postgres::Config::new();
    pg.host(&backend.host)
        .port(backend.port)
        .user(&config.user)
        .dbname(&config.database)
        .application_name("chorus replication")
        .connect_timeout(Duration::from_secs(5))
        // A peer that vanished from the network (no reset) is noticed and
        // its stream reconnects; a large batch may still take long.
        .keepalives(true)
        .keepalives_idle(Duration::from_secs(10))
        .keepalives_interval(Duration::from_secs(2))
        .keepalives_retries(3);
    if let Some(password) = &config.password {
        pg.password(password);
    }
    pg
}

/// [`connect_backend`], with the notices the backend sends on the
/// connection (NOTICE, WARNING, …) delivered in order, ahead of the
/// answer of the statement that raised them. Notices nobody takes beyond
/// the channel's room are dropped.
pub async fn connect_backend_with_notices(
    backend: &BackendConfig,
    config: &ReplicationConfig,
) -> Result<(Client, tokio::sync::mpsc::Receiver<Notice>), tokio_postgres::Error> {
    connect_with(backend, config, true).await
}
