//! Administrative commands that act on every backend of the cluster.

use thiserror::Error;

use crate::backend::connect_backend;
use crate::cluster::capture;
use crate::cluster::replication::ReplicationError;
use crate::config::Config;

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
                source: source.into(),
            })?;
        clients.push((backend.name.as_str(), client));
    }
    Ok(clients)
}

/// Drop the replication slots of a backend that left the cluster (its node
/// removed, and the backend taken out of every node's configuration): on
/// every other configured backend, the slots streaming to it; on it, if it
/// is still configured and answers, its own. A slot still in use (a node
/// still streams to the backend) is refused, not taken away. Returns the
/// slots dropped, as `backend: slot`, and the backends not reached.
pub async fn drop_slots_of(
    config: &Config,
    leaving: &str,
) -> Result<(Vec<String>, Vec<String>), AdminError> {
    let replication = config
        .replication
        .as_ref()
        .ok_or(AdminError::NoReplication)?;
    let mut dropped = Vec::new();
    let mut missing = Vec::new();
    for backend in &config.backends {
        let client = match connect_backend(backend, replication).await {
            Ok(client) => client,
            Err(_) => {
                missing.push(backend.name.clone());
                continue;
            }
        };
        // On the leaving backend, its own streams' slots: every chorus
        // slot there. Elsewhere, the slots streaming to it.
        let pattern = crate::lane::slot_pattern((backend.name != leaving).then_some(leaving));
        let rows = client
            .query(
                "SELECT slot_name::text, active FROM pg_replication_slots \
                 WHERE slot_type = 'logical' AND slot_name ~ $1 ORDER BY 1",
                &[&pattern],
            )
            .await
            .map_err(|e| AdminError::from_sql(&backend.name, e))?;
        for row in rows {
            let (slot, mut active): (String, bool) = (row.get(0), row.get(1));
            // A walsender whose node just stopped takes a moment to go.
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
            while active && std::time::Instant::now() < deadline {
                tokio::time::sleep(std::time::Duration::from_millis(200)).await;
                active = client
                    .query_opt(
                        "SELECT active FROM pg_replication_slots WHERE slot_name = $1",
                        &[&slot],
                    )
                    .await
                    .map_err(|e| AdminError::from_sql(&backend.name, e))?
                    .is_some_and(|r| r.get(0));
            }
            if active {
                return Err(AdminError::Refused {
                    backend: backend.name.clone(),
                    code: "55006".into(),
                    message: format!(
                        "replication slot {slot} is in use: a node still streams to {leaving}"
                    ),
                    hint: Some(format!(
                        "Take {leaving} out of every node's [[backends]] and restart them first."
                    )),
                });
            }
            client
                .execute(
                    "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots \
                     WHERE slot_name = $1",
                    &[&slot],
                )
                .await
                .map_err(|e| AdminError::from_sql(&backend.name, e))?;
            dropped.push(format!("{}: {slot}", backend.name));
        }
    }
    Ok((dropped, missing))
}

/// Reconcile the backends that answer (see cluster/reconcile.rs): at least two
/// must. Returns the report and the backends that did not answer.
pub async fn reconcile(
    config: &Config,
) -> Result<(crate::cluster::reconcile::Report, Vec<String>), AdminError> {
    let replication = config
        .replication
        .as_ref()
        .ok_or(AdminError::NoReplication)?;
    let mut clients = Vec::new();
    let mut missing = Vec::new();
    let mut last_error = None;
    for backend in &config.backends {
        match connect_backend(backend, replication).await {
            Ok(client) => clients.push((backend.name.clone(), client)),
            Err(source) => {
                missing.push(backend.name.clone());
                last_error = Some(AdminError::Backend {
                    backend: backend.name.clone(),
                    source: source.into(),
                });
            }
        }
    }
    if clients.len() < 2 {
        return Err(last_error.unwrap_or(AdminError::NoReplication));
    }
    let report = crate::cluster::reconcile::reconcile(&clients)
        .await
        .map_err(|source| AdminError::Backend {
            backend: "reconcile".into(),
            source,
        })?;
    Ok((report, missing))
}

/// Make existing (local) sequences global on every backend (see
/// `on_every_backend` for how far "every" goes):
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
    on_every_backend(
        config,
        sequences,
        "SELECT chorus.convert_sequence($1::text::regclass, $2, $3)",
        &[&kind, &block],
    )
    .await
}

/// Run `sql` (a function of each item, then `extra`, returning a name) for
/// every item on every backend: each backend in an open transaction, and
/// the transactions committed one after another once every one succeeded.
/// A failure before the commits drops the connections, which rolls every
/// open transaction back: none of the backends changed. A backend lost
/// during the commits (there is no two-phase commit here: backends need
/// not allow prepared transactions) leaves the backends committed before
/// it changed and the others not; the error names it, and running the
/// command again finishes the work (both callers' functions may run again
/// on what they did). Returns the names the first backend gave.
async fn on_every_backend(
    config: &Config,
    items: &[String],
    sql: &str,
    extra: &[&(dyn tokio_postgres::types::ToSql + Sync)],
) -> Result<Vec<String>, AdminError> {
    let clients = connect_all(config).await?;
    let mut names = Vec::new();
    for (backend, client) in &clients {
        client
            .batch_execute("BEGIN")
            .await
            .map_err(|e| AdminError::from_sql(backend, e))?;
        for item in items {
            let mut params: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> = vec![item];
            params.extend_from_slice(extra);
            let name: String = client
                .query_one(sql, &params)
                .await
                .map_err(|e| AdminError::from_sql(backend, e))?
                .get(0);
            if names.len() < items.len() {
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
/// with the same rows, on every backend (see `on_every_backend` for how
/// far "every" goes). A table without a primary key is refused
/// (SQLSTATE 55000) unless `keyless`. Returns the qualified table
/// names.
pub async fn adopt(
    config: &Config,
    tables: &[String],
    keyless: bool,
) -> Result<Vec<String>, AdminError> {
    on_every_backend(config, tables, capture::ADOPT_SQL, &[&keyless]).await
}

/// Compare the rows of the replicated tables (or of `tables`, named as in
/// SQL) on every backend, all of which must answer (see check.rs).
pub async fn check(
    config: &Config,
    tables: &[String],
    mut options: super::check::CheckOptions,
    repair: bool,
) -> Result<super::check::CheckReport, AdminError> {
    let clients: Vec<(String, tokio_postgres::Client)> = connect_all(config)
        .await?
        .into_iter()
        .map(|(name, client)| (name.to_owned(), client))
        .collect();
    let Some((first_name, first)) = clients.first() else {
        return Err(AdminError::NoReplication);
    };
    for table in tables {
        let name: String = first
            .query_one(
                "SELECT format('%I.%I', n.nspname, c.relname) FROM pg_class c \
                   JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.oid = $1::text::regclass",
                &[table],
            )
            .await
            .map_err(|e| AdminError::from_sql(first_name, e))?
            .get(0);
        options.tables.push(name);
    }
    super::check::check(&clients, &options, repair)
        .await
        .map_err(|source| AdminError::Backend {
            backend: "check".into(),
            source,
        })
}
