//! Control connections: the node's own connections to backends (as the
//! replication user) for replication, DDL, upkeep and health, through
//! tokio-postgres, over TLS when the backend's `sslmode` asks for it.
//!
//! Short questions (health checks, how far a backend has applied DDL, the
//! admin console's SHOW commands, whether a database or its slots exist)
//! take a connection from the lane's [`ControlPool`] (deadpool-postgres),
//! a few per backend, and give it back. Long work keeps connections of its
//! own ([`connect_backend`]): a replication stream and its peer, the DDL
//! apply, sequence upkeep, reconciliation; each would hold a pooled
//! connection for its whole life anyway.

use std::collections::HashMap;
use std::time::Duration;

use deadpool_postgres::{Manager, ManagerConfig, Object, Pool, RecyclingMethod};
use tokio_postgres::Client;

use super::SslMode;
use crate::config::{BackendConfig, ReplicationConfig};

/// Control connections to every backend, in one database: at most `size`
/// per backend, made on first use, kept while they work.
pub struct ControlPool {
    config: ReplicationConfig,
    size: usize,
    pools: std::sync::Mutex<HashMap<String, Pool>>,
}

impl std::fmt::Debug for ControlPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ControlPool")
            .field("database", &self.config.database)
            .field("size", &self.size)
            .finish()
    }
}

impl ControlPool {
    /// Connections as `config` makes them (its user, its database).
    pub fn new(config: ReplicationConfig, size: usize) -> ControlPool {
        ControlPool {
            config,
            size: size.max(1),
            pools: std::sync::Mutex::new(HashMap::new()),
        }
    }

    /// A connection to `backend`, within `limit` (waiting for one to be
    /// free, or making one); `None` when there is none by then. It goes
    /// back to the pool when dropped; [`discard`] one that failed.
    async fn get(&self, backend: &BackendConfig, limit: Duration) -> Option<Object> {
        let pool = {
            let mut pools = self.pools.lock().ok()?;
            match pools.get(&backend.name) {
                Some(pool) => pool.clone(),
                None => {
                    let pool = self.make(backend)?;
                    pools.insert(backend.name.clone(), pool.clone());
                    pool
                }
            }
        };
        tokio::time::timeout(limit, pool.get()).await.ok()?.ok()
    }

    /// The pool of one backend. (A closed connection is dropped when it
    /// is next taken: `RecyclingMethod::Fast` checks just that.)
    fn make(&self, backend: &BackendConfig) -> Option<Pool> {
        let mut pg = backend_config(backend, &self.config);
        let fast = ManagerConfig {
            recycling_method: RecyclingMethod::Fast,
        };
        let manager = match &backend.tls {
            None => Manager::from_config(pg, tokio_postgres::NoTls, fast),
            Some(tls) => {
                pg.ssl_mode(if tls.mode == SslMode::Prefer {
                    tokio_postgres::config::SslMode::Prefer
                } else {
                    tokio_postgres::config::SslMode::Require
                });
                let connector =
                    tokio_postgres_rustls::MakeRustlsConnect::new((*tls.config).clone());
                Manager::from_config(pg, connector, fast)
            }
        };
        Pool::builder(manager)
            .max_size(self.size)
            .runtime(deadpool_postgres::Runtime::Tokio1)
            .build()
            .ok()
    }
}

/// Why a pooled question got no answer.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("no connection to the backend within {0:?}")]
    Unreachable(Duration),
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    #[error(transparent)]
    Sql(#[from] tokio_postgres::Error),
}

impl ControlPool {
    /// Ask `backend` one query within `limit` in all; a connection that
    /// failed or did not answer is discarded.
    pub async fn query(
        &self,
        backend: &BackendConfig,
        limit: Duration,
        sql: &str,
        params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
    ) -> Result<Vec<tokio_postgres::Row>, ControlError> {
        let deadline = tokio::time::Instant::now() + limit;
        let client = self
            .get(backend, limit)
            .await
            .ok_or(ControlError::Unreachable(limit))?;
        let answer = tokio::time::timeout_at(deadline, client.query(sql, params)).await;
        Self::settle(client, answer, limit)
    }

    /// [`ControlPool::query`] with the simple protocol (text results, any
    /// number of statements).
    pub async fn simple_query(
        &self,
        backend: &BackendConfig,
        limit: Duration,
        sql: &str,
    ) -> Result<Vec<tokio_postgres::SimpleQueryMessage>, ControlError> {
        let deadline = tokio::time::Instant::now() + limit;
        let client = self
            .get(backend, limit)
            .await
            .ok_or(ControlError::Unreachable(limit))?;
        let answer = tokio::time::timeout_at(deadline, client.simple_query(sql)).await;
        Self::settle(client, answer, limit)
    }

    /// An answer, and the connection back to the pool; or the error, and
    /// the connection dropped when it is at fault (an error the server
    /// sent leaves it fit for the next question).
    fn settle<T>(
        client: Object,
        answer: Result<Result<T, tokio_postgres::Error>, tokio::time::error::Elapsed>,
        limit: Duration,
    ) -> Result<T, ControlError> {
        match answer {
            Ok(Ok(answer)) => Ok(answer),
            Ok(Err(e)) => {
                if e.as_db_error().is_none() {
                    discard(client);
                }
                Err(ControlError::Sql(e))
            }
            Err(_) => {
                discard(client);
                Err(ControlError::Timeout(limit))
            }
        }
    }
}

/// Drop a pooled connection that failed or did not answer in time, rather
/// than give it back: the next question gets a new one.
fn discard(connection: Object) {
    drop(Object::take(connection));
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
