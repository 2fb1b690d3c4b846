//! One replication stream: the changes captured on an origin backend,
//! applied on one peer backend, exactly once and in origin commit order.
//!
//! Changes are read through a logical replication slot per (origin, peer)
//! pair with the `pgoutput` plugin that ships with PostgreSQL, asked for
//! Chorus's transactional messages only (see walstream.rs). A batch of
//! whole transactions is applied on the peer in one transaction that also
//! records the origin position applied up to (`chorus.applied`); only then
//! is the slot told it may move past them. A crash between the two
//! re-delivers the batch, and the recorded position makes the peer skip
//! it: never applied twice, never skipped.
//!
//! Running nodes stream each slot over a replication connection (the
//! driver of an origin runs one stream per peer, see `driver.rs`; the home
//! backend's own upkeep is `upkeep.rs`, the connection and the decoder
//! `walstream.rs`); the replication tests step a stream one batch at a
//! time through the SQL functions instead (peek, apply, advance).

use std::sync::LazyLock;

use tokio_postgres::Client;

mod driver;
pub mod outcome;
mod upkeep;
pub mod walstream;

use outcome::{outcomes_of, Outcome};

pub(crate) use driver::drive;
pub use upkeep::{run_home_upkeep, wait_streams_ready};
pub use walstream::{
    format_lsn, parse_lsn, DecodedTransaction, PgOutputDecoder, ReplicationError, WalEvent,
    WalStream,
};

/// Changes per statement when a batch is applied in parts (one whole
/// transaction larger than this, or spilled to a file, see
/// `ReplicationStream::apply_in_parts`), and the size of a part at most
/// (PostgreSQL's jsonb holds at most 256 MB).
const APPLY_PART_CHANGES: usize = 50_000;
const APPLY_PART_BYTES: usize = 64 << 20;

/// The Unix time now, in seconds.
pub(super) fn unix_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// The highest row version of these transactions (0 without any).
fn max_version<'a>(transactions: impl IntoIterator<Item = &'a DecodedTransaction>) -> i64 {
    transactions
        .into_iter()
        .map(|t| t.max_version)
        .max()
        .unwrap_or(0)
}

/// What one step did.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct StepReport {
    /// Origin transactions with changes, applied on the peer.
    pub transactions: usize,
    /// Origin transactions skipped because the peer already had them.
    pub duplicates: usize,
    /// Changes applied (or found applied already).
    pub changes: usize,
    /// What became of the applied changes, but those written cleanly:
    /// duplicates, TRUNCATEs, conflicts and skipped changes.
    pub outcomes: Vec<Outcome>,
    /// Age of the oldest origin commit this step found unapplied, in
    /// seconds (0 when there was none).
    pub lag_seconds: f64,
    /// Per applied transaction: seconds from its origin commit to its apply.
    pub delays: Vec<f64>,
    /// Bytes of the largest statement parameter sent to the peer.
    pub largest_sent: usize,
}

impl StepReport {
    /// Take an apply's outcome rows (see [`outcome`]) into account.
    fn note(&mut self, rows: &[tokio_postgres::Row]) -> Result<(), ReplicationError> {
        for row in rows {
            // (A row without an outcome: an apply of nothing.)
            let Some(resolution) = row.get::<_, Option<&str>>(1) else {
                continue;
            };
            let outcome = Outcome::from_row(row.get(0), resolution, row.get(2))?;
            self.changes += outcome.changes;
            if outcome.resolution != outcome::Resolution::Applied {
                self.outcomes.push(outcome);
            }
        }
        Ok(())
    }

    /// Conflicts resolved (and changes skipped) in this step.
    pub fn conflicts(&self) -> impl Iterator<Item = &Outcome> {
        self.outcomes.iter().filter(|o| o.is_conflict())
    }
}

/// One part of a transaction applied in parts ($1: its changes), read
/// back as outcome rows.
static APPLY_PART: LazyLock<String> = LazyLock::new(|| {
    format!(
        "SELECT o.kind, o.resolution, o.changes FROM {} o",
        outcomes_of("chorus.apply_changes($1::text::jsonb)")
    )
});

/// A batch of whole transactions (see `chorus.apply_transactions`): one
/// row per outcome, or one without any, each with the count of
/// transactions skipped (a batch found applied already has no outcome).
static APPLY_TRANSACTIONS: LazyLock<String> = LazyLock::new(|| {
    format!(
        "SELECT o.kind, o.resolution, o.changes, a.skipped \
           FROM chorus.apply_transactions($1, $2::text::jsonb, $3, $4::text::pg_lsn, $5) a \
           LEFT JOIN LATERAL {} o ON true",
        outcomes_of("a.results")
    )
});

/// Changes from one origin backend to one peer backend.
#[derive(Debug, Clone)]
pub struct ReplicationStream {
    pub origin_node: u16,
    pub peer_node: u16,
    pub slot: String,
    /// The epoch of the driver applying it (see `Request::SetDriver`).
    pub epoch: i64,
}

impl ReplicationStream {
    pub fn new(origin_node: u16, peer_node: u16) -> ReplicationStream {
        ReplicationStream {
            origin_node,
            peer_node,
            slot: format!("chorus_{origin_node}_to_{peer_node}"),
            epoch: 0,
        }
    }

    /// Create the stream's slot on the origin if it does not exist yet.
    /// Changes committed after this point are delivered.
    pub async fn ensure_slot(&self, origin: &Client) -> Result<(), ReplicationError> {
        origin
            .execute(
                "SELECT pg_create_logical_replication_slot($1, 'pgoutput') \
                 WHERE NOT EXISTS (SELECT 1 FROM pg_replication_slots WHERE slot_name = $1)",
                &[&self.slot],
            )
            .await?;
        let plugin: Option<String> = origin
            .query_opt(
                "SELECT plugin::text FROM pg_replication_slots WHERE slot_name = $1",
                &[&self.slot],
            )
            .await?
            .and_then(|r| r.get(0));
        if plugin.as_deref() != Some("pgoutput") {
            return Err(ReplicationError::Decoding(format!(
                "slot {} uses the plugin {plugin:?}, not pgoutput; drop it to let Chorus recreate it",
                self.slot
            )));
        }
        Ok(())
    }

    /// Apply transactions (in origin commit order) too large for one
    /// statement (PostgreSQL's jsonb holds at most 256 MB): in one
    /// transaction on the peer, `chorus.apply_begin`, the changes in parts
    /// of [`APPLY_PART_CHANGES`], `chorus.apply_end`.
    async fn apply_in_parts(
        &self,
        peer: &mut Client,
        transactions: &[DecodedTransaction],
    ) -> Result<StepReport, ReplicationError> {
        let mut report = StepReport::default();
        let Some(last) = transactions.last() else {
            return Ok(report);
        };
        let tx = peer.transaction().await?;
        let done: String = tx
            .query_one(
                "SELECT chorus.apply_begin($1, $2)::text",
                &[&i32::from(self.origin_node), &self.epoch],
            )
            .await
            .map_err(ReplicationError::fenced_or)?
            .get(0);
        let done = parse_lsn(&done)?;
        let todo: Vec<&DecodedTransaction> = transactions
            .iter()
            .filter(|t| t.end_lsn > done && !t.changes.is_empty())
            .collect();
        report.duplicates = transactions
            .iter()
            .filter(|t| t.end_lsn <= done && !t.changes.is_empty())
            .count();
        if todo.is_empty() {
            tx.commit().await?;
            return Ok(report);
        }
        // Parts of at most APPLY_PART_CHANGES records or APPLY_PART_BYTES,
        // read in order from each transaction (spilled records from their
        // file), so only one part is in memory at a time.
        let mut json = String::new();
        for txn in &todo {
            let mut reader = txn.changes.reader();
            loop {
                json.clear();
                json.push('[');
                let mut count = 0;
                while count < APPLY_PART_CHANGES && json.len() < APPLY_PART_BYTES {
                    if count > 0 {
                        json.push(',');
                    }
                    if !reader.read_into(&mut json).map_err(|e| {
                        ReplicationError::Decoding(format!("reading a spilled transaction: {e}"))
                    })? {
                        if count > 0 {
                            json.pop();
                        }
                        break;
                    }
                    count += 1;
                }
                if count == 0 {
                    break;
                }
                json.push(']');
                report.largest_sent = report.largest_sent.max(json.len());
                let rows = tx.query(APPLY_PART.as_str(), &[&json]).await?;
                report.note(&rows)?;
            }
        }
        let newest_version = max_version(todo.iter().copied());
        tx.execute(
            "SELECT chorus.apply_end($1, $2::text::pg_lsn, $3)",
            &[
                &i32::from(self.origin_node),
                &format_lsn(last.end_lsn),
                &newest_version,
            ],
        )
        .await?;
        tx.commit().await?;
        let commit_times: Vec<f64> = todo.iter().filter_map(|t| t.commit_time).collect();
        let now = unix_now();
        if let Some(oldest) = commit_times.first() {
            report.lag_seconds = (now - oldest).max(0.0);
        }
        report.delays = commit_times.iter().map(|t| (now - t).max(0.0)).collect();
        report.transactions = todo.len();
        Ok(report)
    }

    /// Apply transactions (in origin commit order) on the peer in one
    /// transaction, skipping those it already has.
    pub async fn apply(
        &self,
        peer: &mut Client,
        transactions: &[DecodedTransaction],
    ) -> Result<StepReport, ReplicationError> {
        let Some(last) = transactions.last() else {
            return Ok(StepReport::default());
        };
        let last_lsn = format_lsn(last.end_lsn);
        // Transactions without Chorus messages (the apply of other nodes'
        // changes, writes to tables that are not replicated) have nothing to
        // apply; the slot simply moves past them.
        let mut report = StepReport::default();
        let total: usize = transactions.iter().map(|t| t.changes.len()).sum();
        let bytes: usize = transactions.iter().map(|t| t.changes.memory_bytes()).sum();
        let spilled = transactions.iter().any(|t| t.changes.in_memory().is_none());
        if total > APPLY_PART_CHANGES || bytes > APPLY_PART_BYTES || spilled {
            return self.apply_in_parts(peer, transactions).await;
        }
        let mut commit_times = Vec::new();
        let mut sent = 0usize;
        let mut batch = String::from("[");
        for txn in transactions.iter().filter(|t| !t.changes.is_empty()) {
            if sent > 0 {
                batch.push(',');
            }
            batch.push_str("{\"end\":\"");
            batch.push_str(&format_lsn(txn.end_lsn));
            batch.push_str("\",\"changes\":[");
            for (i, change) in txn
                .changes
                .in_memory()
                .unwrap_or_default()
                .iter()
                .enumerate()
            {
                if i > 0 {
                    batch.push(',');
                }
                batch.push_str(change);
            }
            batch.push_str("]}");
            sent += 1;
            commit_times.extend(txn.commit_time);
        }
        batch.push(']');
        if sent == 0 {
            return Ok(report);
        }
        if let Some(oldest) = commit_times.first() {
            report.lag_seconds = (unix_now() - oldest).max(0.0);
        }
        report.largest_sent = batch.len();
        let newest_version = max_version(transactions);
        // One statement, so one round trip and its own transaction: the
        // peer skips what it already has, applies the rest and records the
        // position (see chorus.apply_transactions).
        let rows = peer
            .query(
                APPLY_TRANSACTIONS.as_str(),
                &[
                    &i32::from(self.origin_node),
                    &batch,
                    &newest_version,
                    &last_lsn,
                    &self.epoch,
                ],
            )
            .await
            .map_err(ReplicationError::fenced_or)?;
        let skipped = rows
            .first()
            .and_then(|r| usize::try_from(r.get::<_, i32>(3)).ok())
            .unwrap_or(0);
        report.duplicates = skipped;
        report.transactions = sent.saturating_sub(skipped);
        if report.transactions > 0 {
            let done = unix_now();
            report.delays = commit_times.iter().map(|t| (done - t).max(0.0)).collect();
            report.note(&rows)?;
        }
        Ok(report)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_newest_version_of_a_batch() {
        let txn = |max_version| DecodedTransaction {
            max_version,
            ..DecodedTransaction::default()
        };
        assert_eq!(max_version(&[txn(7), txn(0), txn(12)]), 12);
        assert_eq!(max_version(&[]), 0);
    }

    #[test]
    fn lsns_compare_numerically() {
        assert!(parse_lsn("0/16B3748").unwrap() < parse_lsn("1/0").unwrap());
        assert!(parse_lsn("0/A").unwrap() < parse_lsn("0/10").unwrap());
        assert!(parse_lsn("nonsense").is_err());
    }

    #[test]
    fn lsns_print_as_postgresql_does() {
        assert_eq!(format_lsn(0x1_6B37_4800), "1/6B374800");
        assert_eq!(format_lsn(0xA), "0/A");
        assert_eq!(
            parse_lsn(&format_lsn(0x2_0000_00FF)).unwrap(),
            0x2_0000_00FF
        );
    }
}
