//! Administrative commands that act on every backend of the cluster.

use thiserror::Error;

use crate::capture::{self, CaptureError};
use crate::config::Config;
use crate::replication::{connect_backend, ReplicationError};

#[derive(Debug, Error)]
pub enum AdminError {
    #[error("the configuration has no [replication] section")]
    NoReplication,
    #[error("backend {backend}: {source}")]
    Backend {
        backend: String,
        source: ReplicationError,
    },
    #[error("backend {backend}: {message}{}", hint.as_ref().map(|h| format!("\nHINT: {h}")).unwrap_or_default())]
    Refused {
        backend: String,
        code: String,
        message: String,
        hint: Option<String>,
    },
}

impl AdminError {
    fn from_sql(backend: &str, e: tokio_postgres::Error) -> AdminError {
        match e.as_db_error() {
            Some(db) if db.code().code() == "3F000" => AdminError::Refused {
                backend: backend.to_owned(),
                code: db.code().code().to_owned(),
                message: "the chorus schema is not installed".to_owned(),
                hint: Some(
                    "Start the Chorus node whose home backend this is; it installs the schema."
                        .to_owned(),
                ),
            },
            Some(db) => AdminError::Refused {
                backend: backend.to_owned(),
                code: db.code().code().to_owned(),
                message: db.message().to_owned(),
                hint: db.hint().map(str::to_owned),
            },
            None => AdminError::Backend {
                backend: backend.to_owned(),
                source: e.into(),
            },
        }
    }
}

/// Connect to every backend of the cluster.
async fn connect_all(config: &Config) -> Result<Vec<(&str, tokio_postgres::Client)>, AdminError> {
    let replication = config
        .replication
        .as_ref()
        .ok_or(AdminError::NoReplication)?;
    let mut clients = Vec::new();
    for backend in &config.backends {
        let client = connect_backend(backend, replication)
            .await
            .map_err(|source| AdminError::Backend {
                backend: backend.name.clone(),
                source,
            })?;
        clients.push((backend.name.as_str(), client));
    }
    Ok(clients)
}

/// Make existing (local) sequences global on every backend, all or none:
/// `kind` for bigint ones (others become galloc), with galloc ranges of
/// `block` values. Values already handed out stay below every later one.
/// Each backend's node must have its sequence id (it records it once it has
/// joined the cluster). Returns the qualified sequence names.
pub async fn convert_sequences(
    config: &Config,
    sequences: &[String],
    kind: &str,
    block: i64,
) -> Result<Vec<String>, AdminError> {
    let clients = connect_all(config).await?;
    let mut names = Vec::new();
    for (backend, client) in &clients {
        client
            .batch_execute("BEGIN")
            .await
            .map_err(|e| AdminError::from_sql(backend, e))?;
        for sequence in sequences {
            let name: String = client
                .query_one(
                    "SELECT chorus.convert_sequence($1::text::regclass, $2, $3)",
                    &[sequence, &kind, &block],
                )
                .await
                .map_err(|e| AdminError::from_sql(backend, e))?
                .get(0);
            if names.len() < sequences.len() {
                names.push(name);
            }
        }
    }
    for (backend, client) in &clients {
        client
            .batch_execute("COMMIT")
            .await
            .map_err(|e| AdminError::from_sql(backend, e))?;
    }
    Ok(names)
}

/// Adopt existing tables for replication on every backend: record their
/// keys and install the capture trigger. The tables must already exist,
/// with the same rows, on every backend. All backends or none: each adopts
/// in an open transaction, and they commit only once every one succeeded.
/// A table without a primary key is refused (SQLSTATE 55000) unless
/// `insert_only`. Returns the qualified table names.
pub async fn adopt(
    config: &Config,
    tables: &[String],
    insert_only: bool,
) -> Result<Vec<String>, AdminError> {
    let clients = connect_all(config).await?;
    let mut names = Vec::new();
    for (backend, client) in &clients {
        client
            .batch_execute("BEGIN")
            .await
            .map_err(|e| AdminError::from_sql(backend, e))?;
        for table in tables {
            let name = capture::adopt(client, table, insert_only)
                .await
                .map_err(|CaptureError::Sql(e)| AdminError::from_sql(backend, e))?;
            if names.len() < tables.len() {
                names.push(name);
            }
        }
    }
    // Every backend adopted: make it so. (A failure above drops the
    // connections, which rolls every open transaction back.)
    for (backend, client) in &clients {
        client
            .batch_execute("COMMIT")
            .await
            .map_err(|e| AdminError::from_sql(backend, e))?;
    }
    Ok(names)
}
