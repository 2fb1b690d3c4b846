//! Reconciliation between backends, for when one is lost for good.
//!
//! Each backend's changes reach the others only through its own streams.
//! Under commit scope `majority` a write is acknowledged once its origin
//! and one peer have it; if the origin is then lost, a survivor that had
//! not received it yet never will from there. Reconciliation copies such
//! rows between the survivors: for every replicated table, each row whose
//! version (with its origin, the last-writer-wins order) is newer on one
//! backend than on another is written there, deletes as their tombstones.
//! Rows are applied as a stream applies them (`chorus.apply_change`), so
//! running it while writes go on, or twice, is harmless.
//!
//! The Raft leader's node runs it among the backends that are up once a
//! backend has been down for `replication.reconcile_after_ms`; `chorus
//! reconcile` runs it on demand. Insert-only tables (no primary key, no
//! row versions) are not reconciled.

use std::collections::HashMap;

use serde::Serialize;
use serde_json::value::RawValue;
use tokio_postgres::Client;

use crate::cluster::replication::ReplicationError;

/// Changes written in one transaction.
const BATCH: usize = 500;

/// What a reconciliation did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Report {
    /// Tables compared.
    pub tables: usize,
    /// Rows (or deletes) written to a backend that lacked them.
    pub rows: usize,
}

/// Make every backend in `backends` (name, connection) hold the newest
/// version of every row of every replicated table that any of them has.
pub async fn reconcile(backends: &[(String, Client)]) -> Result<Report, ReplicationError> {
    reconcile_tables(backends, None).await
}

/// The same for the replicated tables named in `only` (as
/// `chorus.replicated_table` names them), or for all.
pub async fn reconcile_tables(
    backends: &[(String, Client)],
    only: Option<&[String]>,
) -> Result<Report, ReplicationError> {
    let mut report = Report::default();
    let Some((_, first)) = backends.first() else {
        return Ok(report);
    };
    let only: Option<Vec<String>> = only.map(<[String]>::to_vec);
    let tables: Vec<(String, Vec<String>)> = first
        .query(
            "SELECT tbl, pk_columns FROM chorus.replicated_table \
              WHERE NOT keyless AND ($1::text[] IS NULL OR tbl = ANY($1)) ORDER BY tbl",
            &[&only],
        )
        .await?
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    for (table, columns) in &tables {
        report.tables += 1;
        for (from_name, from) in backends {
            for (to_name, to) in backends {
                if from_name == to_name {
                    continue;
                }
                let copied = copy_newer(from, to, table, columns).await?;
                if copied > 0 {
                    tracing::info!(%table, from = %from_name, to = %to_name, rows = copied, "reconciled");
                }
                report.rows += copied;
            }
        }
    }
    Ok(report)
}

/// One change as `chorus.apply_change` takes it. The key and the row image
/// are the JSON text PostgreSQL wrote, passed on unparsed: read into
/// `serde_json::Value`, a `numeric` of more digits than an `f64` holds
/// would lose them.
#[derive(Debug, Clone, Serialize)]
struct Change<'a> {
    table: &'a str,
    op: &'static str,
    key: Box<RawValue>,
    row: Option<Box<RawValue>>,
    version: i64,
    prev: Option<i64>,
    origin: i32,
}

/// JSON text PostgreSQL wrote (`jsonb` output), checked to be JSON.
fn raw_json(text: String, table: &str, what: &str) -> Result<Box<RawValue>, ReplicationError> {
    RawValue::from_string(text).map_err(|e| {
        ReplicationError::Decoding(format!(
            "reconciling {table}: a row's {what} is not JSON: {e}"
        ))
    })
}

/// Write to `to` the rows of `table` whose version on `from` wins over
/// the one `to` has (or that `to` lacks). The rows that failed (a foreign
/// key whose parent comes later) are tried again after the others.
async fn copy_newer(
    from: &Client,
    to: &Client,
    table: &str,
    columns: &[String],
) -> Result<usize, ReplicationError> {
    let theirs: HashMap<String, (i64, i32)> = to
        .query(
            "SELECT pk::text, version, origin FROM chorus.row_version WHERE tbl = $1",
            &[&table],
        )
        .await?
        .iter()
        .map(|r| (r.get(0), (r.get(1), r.get(2))))
        .collect();
    // Versions and rows from one snapshot.
    from.batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
        .await?;
    let rows = from
        .query(
            "SELECT pk::text, version, origin, deleted, \
                    CASE WHEN deleted THEN NULL ELSE chorus.read_row(tbl, $2, pk)::text END \
             FROM chorus.row_version WHERE tbl = $1",
            &[&table, &columns],
        )
        .await;
    from.batch_execute("COMMIT").await?;
    let mut changes = Vec::new();
    for row in rows? {
        let key: String = row.get(0);
        let version: i64 = row.get(1);
        let origin: i32 = row.get(2);
        let deleted: bool = row.get(3);
        let image: Option<String> = row.get(4);
        let current = theirs.get(&key).copied();
        if current.is_some_and(|c| c >= (version, origin)) {
            continue;
        }
        let image = match (deleted, image) {
            (true, _) => None,
            (false, Some(text)) => Some(raw_json(text, table, "image")?),
            // A version without its row: written by a transaction this
            // snapshot cannot see the row of; the next run gets it.
            (false, None) => continue,
        };
        let op = match (deleted, current) {
            (true, _) => "DELETE",
            (false, None) => "INSERT",
            (false, Some(_)) => "UPDATE",
        };
        changes.push(Change {
            table,
            op,
            key: raw_json(key, table, "key")?,
            row: image,
            version,
            prev: current.map(|c| c.0),
            origin,
        });
    }
    let mut written = 0;
    let mut pending = changes;
    for _pass in 0..3 {
        let mut failed = Vec::new();
        for batch in pending.chunks(BATCH) {
            match apply(to, batch).await {
                Ok(()) => written += batch.len(),
                // One at a time, to find the ones that cannot go yet.
                Err(_) => {
                    for change in batch {
                        match apply(to, std::slice::from_ref(change)).await {
                            Ok(()) => written += 1,
                            Err(_) => failed.push(change.clone()),
                        }
                    }
                }
            }
        }
        if failed.is_empty() {
            return Ok(written);
        }
        pending = failed;
    }
    // What is still refused is refused on every try: report it through
    // the error of one more attempt.
    apply(to, &pending[..1]).await?;
    Ok(written)
}

/// Apply changes on a backend as a stream does, in one transaction.
async fn apply(to: &Client, changes: &[Change<'_>]) -> Result<(), ReplicationError> {
    let batch = serde_json::to_string(changes)
        .map_err(|e| ReplicationError::Decoding(format!("writing a reconcile batch: {e}")))?;
    to.batch_execute("BEGIN").await?;
    let result = async {
        to.execute("SELECT set_config('chorus.applying', 'on', true)", &[])
            .await?;
        to.execute(
            "SELECT count(chorus.apply_change(c)) FROM jsonb_array_elements($1::text::jsonb) AS c",
            &[&batch],
        )
        .await
    }
    .await;
    match result {
        Ok(_) => Ok(to.batch_execute("COMMIT").await?),
        Err(e) => {
            let _ = to.batch_execute("ROLLBACK").await;
            Err(e.into())
        }
    }
}
