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
//! Running nodes stream each slot over a replication connection
//! ([`run_replicator`]); [`ReplicationStream::step`] does one batch through
//! the SQL functions instead (peek, apply, advance), for tests and tools.

use std::sync::Arc;
use std::time::Duration;

use tokio_postgres::Client;

use crate::backend::connect_backend;
use crate::backoff::Backoff;
use crate::capture::{self, CaptureError};
use crate::config::{BackendConfig, ReplicationConfig};
use crate::node::Node;
pub use crate::walstream::{
    format_lsn, parse_lsn, DecodedTransaction, PgOutputDecoder, ReplicationError, WalEvent,
    WalStream,
};

/// The Unix time now, in seconds.
fn unix_now() -> f64 {
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
    /// The result of every applied change but a plain `applied`:
    /// `duplicate`, or `<kind>:<resolution>` (a conflict, or a change
    /// skipped).
    pub results: Vec<String>,
    /// Age of the oldest origin commit this step found unapplied, in
    /// seconds (0 when there was none).
    pub lag_seconds: f64,
    /// Per applied transaction: seconds from its origin commit to its apply.
    pub delays: Vec<f64>,
}

impl StepReport {
    /// Take the results of applied changes into account.
    fn note(&mut self, results: Vec<String>) {
        self.changes += results.len();
        self.results
            .extend(results.into_iter().filter(|r| r != "applied"));
    }

    /// Conflicts resolved in this step, as `kind:resolution`.
    pub fn conflicts(&self) -> impl Iterator<Item = &str> {
        self.results
            .iter()
            .map(String::as_str)
            .filter(|r| r.contains(':'))
    }
}

/// Changes from one origin backend to one peer backend.
#[derive(Debug, Clone)]
pub struct ReplicationStream {
    pub origin_node: u16,
    pub peer_node: u16,
    pub slot: String,
    /// Decoded rows fetched per step (whole transactions are always taken).
    pub batch_rows: i32,
    /// The epoch of the driver applying it (see `Request::SetDriver`).
    pub epoch: i64,
}

impl ReplicationStream {
    pub fn new(origin_node: u16, peer_node: u16) -> ReplicationStream {
        ReplicationStream {
            origin_node,
            peer_node,
            slot: format!("chorus_{origin_node}_to_{peer_node}"),
            // Whole transactions are always taken; smaller batches keep the
            // apply transaction, and the row locks it holds, short.
            batch_rows: 2_000,
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
                let results: Vec<String> = tx
                    .query_one("SELECT chorus.apply_changes($1::text::jsonb)", &[&json])
                    .await?
                    .get(0);
                report.note(results);
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

    /// Move one batch from origin to peer.
    pub async fn step(
        &self,
        origin: &Client,
        peer: &mut Client,
    ) -> Result<StepReport, ReplicationError> {
        // The same pgoutput options as walstream::PGOUTPUT_OPTIONS.
        let rows = origin
            .query(
                "SELECT data FROM pg_logical_slot_peek_binary_changes($1, NULL, $2, \
                 'proto_version', '1', 'publication_names', 'chorus', 'messages', 'true')",
                &[&self.slot, &self.batch_rows],
            )
            .await?;
        let mut decoder = PgOutputDecoder::default();
        let mut transactions = Vec::new();
        for row in &rows {
            if let Some(txn) = decoder.feed(row.get::<_, &[u8]>(0))? {
                transactions.push(txn);
            }
        }
        let Some(last) = transactions.last() else {
            return Ok(StepReport::default());
        };
        let last_lsn = format_lsn(last.end_lsn);
        let report = self.apply(peer, &transactions).await?;
        origin
            .execute(
                "SELECT pg_replication_slot_advance($1, $2::text::pg_lsn)",
                &[&self.slot, &last_lsn],
            )
            .await?;
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
        let spilled = transactions.iter().any(|t| t.changes.in_memory().is_none());
        if total > APPLY_PART_CHANGES || spilled {
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
        let newest_version = max_version(transactions);
        // One statement, so one round trip and its own transaction: the
        // peer skips what it already has, applies the rest and records the
        // position (see chorus.apply_transactions).
        let row = peer
            .query_one(
                "SELECT results, skipped FROM chorus.apply_transactions($1, $2::text::jsonb, $3, $4::text::pg_lsn, $5)",
                &[&i32::from(self.origin_node), &batch, &newest_version, &last_lsn, &self.epoch],
            )
            .await
            .map_err(ReplicationError::fenced_or)?;
        let skipped = usize::try_from(row.get::<_, i32>(1)).unwrap_or(0);
        report.duplicates = skipped;
        report.transactions = sent.saturating_sub(skipped);
        if report.transactions > 0 {
            let done = unix_now();
            report.delays = commit_times.iter().map(|t| (done - t).max(0.0)).collect();
            report.note(row.get(0));
        }
        Ok(report)
    }
}

/// How often the node's clock takes note of the versions other nodes'
/// changes brought to its home backend: every OBSERVE_INTERVAL while they
/// change, doubling while they do not, up to OBSERVE_INTERVAL_MAX.
const OBSERVE_INTERVAL: Duration = Duration::from_millis(100);
const OBSERVE_INTERVAL_MAX: Duration = Duration::from_secs(1);

/// The longest an idle stream waits before asking its walsender how far it
/// has sent (so that its position moves past WAL with nothing to apply).
const IDLE_POLL_MAX: Duration = Duration::from_secs(1);

/// Update this node's clock with the newest version applied on its home
/// backend from each other origin (recorded by their streams in
/// `chorus.applied`), so that its next writes order after them. A clock too
/// far ahead is logged and counted, and not followed.
/// Returns the newest version seen, to tell whether anything changed.
async fn observe_remote_versions(node: &Node, home: &Client) -> Result<i64, ReplicationError> {
    let rows = home
        .query(
            "SELECT origin, max_version FROM chorus.applied WHERE origin <> $1 AND max_version > 0",
            &[&i32::from(node.config.node.id)],
        )
        .await?;
    let mut newest = 0;
    for row in rows {
        let origin: i32 = row.get(0);
        let version: i64 = row.get(1);
        newest = newest.max(version);
        match node.clock.observe(version as u64) {
            Ok(ahead_ms) => node.metrics.hlc_skew_ms.set(ahead_ms as f64),
            Err(refused) => {
                node.metrics.hlc_skew_ms.set(refused.ahead_ms as f64);
                node.metrics.hlc_skew_refused.increment(1);
                tracing::warn!(origin, error = %refused, "clock of another node not followed");
            }
        }
    }
    Ok(newest)
}

/// The home backend's upkeep for as long as the node runs: the chorus
/// schema, flush positions for commit scopes, lag metrics, the clock's view
/// of other origins. (Its streams are driven by duties.rs, like those of
/// any backend handed to this node.)
pub async fn run_home_upkeep(node: Arc<Node>) {
    let Some(config) = node.config.replication.clone() else {
        return;
    };
    loop {
        match home_upkeep(&node, &config).await {
            // Sessions wait for the schema: this needs an operator.
            Err(e @ ReplicationError::Install(CaptureError::NewerSchema { .. })) => {
                tracing::error!(error = %e, "home backend not served; retrying");
            }
            Err(e) => tracing::warn!(error = %e, "home backend upkeep interrupted; retrying"),
            Ok(()) => {}
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// A slot-name-safe form of a backend name.
fn slot_label(name: &str) -> String {
    name.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '_'
            }
        })
        .collect()
}

/// The name of the slot that streams `owner`'s backend to `peer`.
pub(crate) fn slot_name(owner: u16, peer: &str) -> String {
    format!("chorus_{owner}_to_{}", slot_label(peer))
}

/// A regular expression for the names of the slots that stream to `peer`
/// (from any owner), or, without a peer, of every Chorus slot.
pub(crate) fn slot_pattern(peer: Option<&str>) -> String {
    match peer {
        Some(peer) => format!("^chorus_[0-9]+_to_{}$", slot_label(peer)),
        None => "^chorus_[0-9]+_to_".to_owned(),
    }
}

async fn home_upkeep(node: &Arc<Node>, config: &ReplicationConfig) -> Result<(), ReplicationError> {
    let home = node.config.home_backend();
    let origin = connect_backend(home, config).await?;
    capture::install(&origin, node.config.node.id).await?;
    let slots: Vec<(String, String)> = node
        .config
        .backends
        .iter()
        .filter(|b| b.name != home.name)
        .map(|b| (b.name.clone(), slot_name(node.config.node.id, &b.name)))
        .collect();
    // Sessions are admitted once the schema is ready; a change committed
    // before its stream's slot exists would never reach that peer, so the
    // slots come first.
    for (_, slot) in &slots {
        let stream = ReplicationStream {
            slot: slot.clone(),
            ..ReplicationStream::new(node.config.node.id, 0)
        };
        stream.ensure_slot(&origin).await?;
    }
    node.schema_installed();
    // Commits waiting for a scope ask for the home backend's flush position.
    let mut flush_requests = match &node.progress {
        Some(progress) => Some(progress.flush_requests_rx.lock().await),
        None => None,
    };
    let mut lag_check = tokio::time::interval(Duration::from_secs(1));
    let mut observe_every = Backoff::new(OBSERVE_INTERVAL, OBSERVE_INTERVAL_MAX);
    let observe = tokio::time::sleep(observe_every.wait());
    tokio::pin!(observe);
    let mut observed = 0i64;
    let mut slot_watch = SlotWatch::default();
    let slot_names: Vec<String> = slots.iter().map(|(_, slot)| slot.clone()).collect();
    loop {
        tokio::select! {
            Some(reply) = async {
                match flush_requests.as_mut() {
                    Some(rx) => rx.recv().await,
                    None => std::future::pending().await,
                }
            } => {
                let lsn: String = origin
                    .query_one("SELECT pg_current_wal_flush_lsn()::text", &[])
                    .await?
                    .get(0);
                let _ = reply.send(parse_lsn(&lsn)?);
            }
            _ = lag_check.tick() => {
                let rows = origin
                    .query(
                        "SELECT slot_name::text, \
                                pg_wal_lsn_diff(pg_current_wal_lsn(), confirmed_flush_lsn)::float8, \
                                pg_wal_lsn_diff(pg_current_wal_lsn(), restart_lsn)::float8, \
                                wal_status = 'lost' \
                           FROM pg_replication_slots WHERE slot_name = ANY($1)",
                        &[&slot_names],
                    )
                    .await?;
                for row in rows {
                    let slot: String = row.get(0);
                    let Some((peer, _)) = slots.iter().find(|(_, s)| *s == slot) else {
                        continue;
                    };
                    let state = SlotState {
                        lag: row.get::<_, Option<f64>>(1).unwrap_or(0.0),
                        retained: row.get::<_, Option<f64>>(2).unwrap_or(0.0),
                        lost: row.get::<_, Option<bool>>(3).unwrap_or(false),
                    };
                    if let Some(m) = node.metrics.peer(peer) {
                        m.lag_bytes.set(state.lag);
                        m.slot_retained_bytes.set(state.retained);
                        m.slot_invalidated.set(if state.lost { 1.0 } else { 0.0 });
                    }
                    slot_watch.observe(&home.name, peer, &slot, &state, config.slot_retained_warn_bytes);
                }
            }
            () = &mut observe => {
                let newest = observe_remote_versions(node, &origin).await?;
                if newest == observed {
                    observe_every.idle();
                } else {
                    observe_every.active();
                }
                observed = newest;
                observe.as_mut().reset(tokio::time::Instant::now() + observe_every.wait());
            }
        }
    }
}

/// What the home backend's slot for one peer holds (bytes of WAL).
struct SlotState {
    /// Not yet confirmed by the peer's stream.
    lag: f64,
    /// Kept for the slot (from its restart position).
    retained: f64,
    /// Invalidated by PostgreSQL (`max_slot_wal_keep_size`).
    lost: bool,
}

/// What has been said in the log about the home backend's slots, so that
/// a slot holding too much WAL is logged once a minute, and an
/// invalidated one once.
#[derive(Default)]
struct SlotWatch {
    warned: std::collections::HashMap<String, std::time::Instant>,
    lost: std::collections::HashSet<String>,
}

impl SlotWatch {
    fn observe(&mut self, origin: &str, peer: &str, slot: &str, state: &SlotState, limit: u64) {
        if state.lost {
            if self.lost.insert(slot.to_owned()) {
                tracing::error!(
                    origin,
                    peer,
                    slot,
                    "PostgreSQL invalidated this replication slot (max_slot_wal_keep_size): \
                     the peer misses the origin's changes from here on; copy the peer \
                     again (docs/reliability.md, \"Slots\")"
                );
            }
            return;
        }
        self.lost.remove(slot);
        let over = limit > 0 && state.retained > limit as f64;
        if !over {
            self.warned.remove(slot);
            return;
        }
        let due = self
            .warned
            .get(slot)
            .is_none_or(|at| at.elapsed() >= Duration::from_secs(60));
        if due {
            self.warned
                .insert(slot.to_owned(), std::time::Instant::now());
            tracing::warn!(
                origin,
                peer,
                slot,
                retained_bytes = state.retained as u64,
                limit_bytes = limit,
                "a replication slot keeps more WAL than replication.slot_retained_warn_bytes: \
                 the peer is down or far behind"
            );
        }
    }
}

/// Drive the streams of `origin` (the home backend of node `owner`) to
/// every other backend, as the driver of `epoch`, until one fails. A
/// driver that finds a newer epoch recorded on the origin, or is refused
/// by a peer, gets `Fenced` and must stop.
pub(crate) async fn drive(
    node: &Arc<Node>,
    config: &ReplicationConfig,
    origin_backend: &BackendConfig,
    owner: u16,
    epoch: u64,
) -> Result<(), ReplicationError> {
    let home = origin_backend.name == node.config.home_backend().name;
    if home {
        // The home upkeep installs the schema first.
        while !node.wait_schema_ready(Duration::from_secs(1)).await {}
    }
    let epoch = i64::try_from(epoch).unwrap_or(i64::MAX);
    let origin = connect_backend(origin_backend, config).await?;
    // Take the streams over on the origin: refused when a newer driver
    // has them; otherwise the walsenders of an older one (a node that
    // stopped answering but still holds its connections) are ended.
    let taken = origin
        .query_opt(
            "UPDATE chorus.local SET driver_epoch = $1 WHERE driver_epoch <= $1 RETURNING 1",
            &[&epoch],
        )
        .await?;
    if taken.is_none() {
        return Err(ReplicationError::Fenced(format!(
            "backend {} is driven with an epoch newer than {epoch}",
            origin_backend.name
        )));
    }
    // The backend's sequence id (its owner's, from the Raft state), which
    // the apply of DDL into it needs: recorded by its driver too, so that a
    // backend whose own node stopped before recording it (see
    // sequences.rs) does not hold every stream into it up.
    let sequence_id = node.consensus().and_then(|c| {
        c.state()
            .read(|s| s.sequence_ids.get(&u64::from(owner)).copied())
    });
    if let Some(id) = sequence_id {
        origin
            .execute(
                "UPDATE chorus.local SET sequence_id = $1 WHERE sequence_id IS DISTINCT FROM $1",
                &[&i32::from(id)],
            )
            .await?;
    }
    let prefix = format!("chorus\\_{owner}\\_to\\_%");
    let ended = origin
        .execute(
            "SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots \
             WHERE slot_name LIKE $1 AND active_pid IS NOT NULL",
            &[&prefix],
        )
        .await?;
    if ended > 0 {
        tracing::info!(backend = %origin_backend.name, walsenders = ended, "ended the streams of a previous driver");
    }
    // One task per peer, each with its own connections, so that a slow or
    // frozen peer holds up only its own stream.
    let mut streams = tokio::task::JoinSet::new();
    for backend in node
        .config
        .backends
        .iter()
        .filter(|b| b.name != origin_backend.name)
    {
        let stream = ReplicationStream {
            slot: slot_name(owner, &backend.name),
            epoch,
            ..ReplicationStream::new(owner, 0)
        };
        stream.ensure_slot(&origin).await?;
        streams.spawn(run_stream(
            node.clone(),
            config.clone(),
            origin_backend.clone(),
            backend.clone(),
            stream,
            home,
        ));
    }
    let peers = streams.len();
    if config.prune_interval_ms > 0 {
        streams.spawn(run_pruning(
            node.clone(),
            config.clone(),
            origin_backend.clone(),
        ));
    }
    tracing::info!(
        node = node.config.node.id,
        origin = %origin_backend.name,
        epoch,
        peers,
        "replication running"
    );
    match streams.join_next().await {
        // (A cluster with no other backend runs no stream.)
        None => std::future::pending().await,
        Some(Ok(Err(e))) => Err(e),
        Some(_) => Err(ReplicationError::Decoding(
            "replication stream ended".into(),
        )),
    }
}

/// Tombstones deleted in one statement at most (see
/// `chorus.prune_tombstones`), and statements in one round.
const PRUNE_BATCH: i32 = 10_000;
const PRUNE_BATCHES: usize = 100;

/// The origin ids of every backend of the cluster but `origin` (their
/// owners' node ids), from the Raft state: `None` while some backend has
/// no known owner (it then holds pruning back).
fn other_origins(node: &Node, origin: &str) -> Option<Vec<i32>> {
    let others = node.config.backends.iter().filter(|b| b.name != origin);
    let Some(consensus) = node.consensus() else {
        // Without a cluster only a lone backend knows its peers: none.
        return (node.config.backends.len() == 1).then(Vec::new);
    };
    consensus.state().read(|s| {
        others
            .map(|b| i32::try_from(s.owner_of(&b.name)?).ok())
            .collect()
    })
}

/// For as long as this node drives `origin`: every `prune_interval_ms`, send its horizon through its
/// streams and prune the tombstones every backend is done with (see
/// tombstones.sql). Runs next to the streams and ends with them.
async fn run_pruning(
    node: Arc<Node>,
    config: ReplicationConfig,
    origin: BackendConfig,
) -> Result<(), ReplicationError> {
    let mut tick = tokio::time::interval(Duration::from_millis(config.prune_interval_ms));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut client: Option<Client> = None;
    loop {
        tick.tick().await;
        if client.as_ref().is_none_or(Client::is_closed) {
            match connect_backend(&origin, &config).await {
                Ok(c) => client = Some(c),
                Err(e) => {
                    tracing::debug!(backend = %origin.name, error = %e, "pruning: backend unreachable");
                    continue;
                }
            }
        }
        let Some(c) = client.as_ref() else { continue };
        let Some(origins) = other_origins(&node, &origin.name) else {
            continue;
        };
        match prune_round(c, &config, &origins).await {
            Ok(0) => {}
            Ok(rows) => {
                tracing::debug!(backend = %origin.name, rows, "tombstones pruned");
                node.metrics.tombstones_pruned(&origin.name, rows);
            }
            Err(e) => {
                tracing::debug!(backend = %origin.name, error = %e, "pruning failed; trying again later");
                client = None;
            }
        }
    }
}

/// One round of [`run_pruning`]: returns the tombstones pruned.
async fn prune_round(
    client: &Client,
    config: &ReplicationConfig,
    origins: &[i32],
) -> Result<u64, tokio_postgres::Error> {
    let age = i64::try_from(config.tombstone_min_age_ms).unwrap_or(i64::MAX);
    client
        .execute("SELECT chorus.set_stamp_age($1)", &[&age])
        .await?;
    client
        .execute("SELECT chorus.emit_horizon($1)", &[&origins])
        .await?;
    let mut pruned = 0u64;
    for _ in 0..PRUNE_BATCHES {
        let rows: i64 = client
            .query_one(
                "SELECT chorus.prune_tombstones($1, $2)",
                &[&origins, &PRUNE_BATCH],
            )
            .await?
            .get(0);
        pruned += u64::try_from(rows).unwrap_or(0);
        if rows < i64::from(PRUNE_BATCH) {
            break;
        }
    }
    Ok(pruned)
}

/// How long a stream waits for more transactions once it has some to
/// apply: bounds the extra replication delay, and lets one apply carry many
/// small transactions under load.
const GATHER: Duration = Duration::from_millis(10);

/// How often a stream whose next transactions wait for DDL looks again.
const DDL_WAIT_POLL: Duration = Duration::from_millis(20);

/// Changes taken into one apply transaction at most (whole transactions
/// are always taken); keeps the apply, and the row locks it holds, short.
const MAX_BATCH_CHANGES: usize = 1_000;

/// Changes per statement when a batch is applied in parts (one whole
/// transaction larger than this, or spilled to a file, see
/// `ReplicationStream::apply_in_parts`), and the size of a part at most
/// (PostgreSQL's jsonb holds at most 256 MB).
const APPLY_PART_CHANGES: usize = 50_000;
const APPLY_PART_BYTES: usize = 64 << 20;

/// Stream an origin backend's changes to one peer until the origin
/// connection fails (the caller then starts over) or the peer refuses this
/// driver as stale (`Fenced`). A failing peer only pauses this stream: it
/// reconnects and applies the same batch again. `home`: the origin is this
/// node's home backend (its commit scopes and metrics follow the stream).
async fn run_stream(
    node: Arc<Node>,
    config: ReplicationConfig,
    origin: BackendConfig,
    backend: BackendConfig,
    stream: ReplicationStream,
    home: bool,
) -> Result<(), ReplicationError> {
    let wal = WalStream::start(&origin, &config, &stream.slot, Duration::from_secs(5)).await?;
    let (mut reader, mut writer) = wal.split();
    // The reader runs on its own (reading a message is not cancel-safe);
    // the bounded channel makes it wait while a batch is applied.
    let (events_tx, mut events) = tokio::sync::mpsc::channel(4096);
    let reading = tokio::spawn(async move {
        loop {
            let event = reader.next().await;
            let failed = event.is_err();
            if events_tx.send(event).await.is_err() || failed {
                break;
            }
        }
    });
    let _stop_reading = AbortOnDrop(reading);
    let poll = Duration::from_millis(config.poll_interval_ms.max(1));
    // How long an idle stream waits before asking the walsender how far
    // it has sent: `poll`, doubling while nothing happens, up to
    // IDLE_POLL_MAX (a commit on the home backend wakes it at once).
    let mut idle_wait = Backoff::new(poll, IDLE_POLL_MAX);
    let progress = node.progress.clone().filter(|_| home);
    let metrics = node.metrics.peer(&backend.name).filter(|_| home);
    let mut peer: Option<Client> = None;
    let mut decoder = PgOutputDecoder::default();
    let mut pending: Vec<DecodedTransaction> = Vec::new();
    // The peer's DDL index, as last read.
    let mut peer_ddl = 0u64;
    let mut pending_changes = 0usize;
    // Origin position up to which the peer has everything received.
    let mut confirmed = 0u64;
    let mut window_start = std::time::Instant::now();
    let mut applied_in_window = 0u64;
    let mut gather_start: Option<tokio::time::Instant> = None;
    // Applies that failed in a row.
    let mut failures = 0u32;
    // Since when the pending changes wait for DDL, and the last warning.
    let mut ddl_wait_since: Option<std::time::Instant> = None;
    let mut last_stuck_warning: Option<std::time::Instant> = None;
    loop {
        let (first, woken) = match &progress {
            Some(p) => tokio::select! {
                event = events.recv() => (Some(event), false),
                woken = p.idle(&backend.name, idle_wait.wait()) => (None, woken),
            },
            None => tokio::select! {
                event = events.recv() => (Some(event), false),
                _ = tokio::time::sleep(idle_wait.wait()) => (None, false),
            },
        };
        if first.is_none() && pending.is_empty() {
            // (The walsender's answer is a keepalive, not activity.)
            if woken {
                idle_wait.active();
            } else {
                idle_wait.idle();
            }
            // Idle (or woken by a commit): ask how far the server has sent,
            // so the position can move past WAL with nothing to apply.
            writer.confirm(confirmed, true).await?;
            continue;
        }
        // (Idle with transactions pending: they wait for DDL; try again.)
        let mut next = first;
        while let Some(event) = next.take() {
            match event
                .ok_or_else(|| ReplicationError::Decoding("walsender reader ended".into()))??
            {
                WalEvent::Data(data) => {
                    idle_wait.active();
                    let txn = decoder.feed(&data)?;
                    for r in decoder.take_rejected() {
                        tracing::error!(
                            origin = %origin.name,
                            peer = %backend.name,
                            lsn = %format_lsn(r.lsn),
                            prefix = %r.prefix,
                            bytes = r.bytes,
                            subject = %r.subject,
                            reason = r.reason,
                            "a change message is not one of Chorus's records; skipped"
                        );
                        node.metrics.rejected(&origin.name, r.reason);
                    }
                    if let Some(txn) = txn {
                        if txn.changes.is_empty() && txn.horizon.is_none() && pending.is_empty() {
                            confirmed = confirmed.max(txn.end_lsn);
                        } else {
                            pending_changes += txn.changes.len();
                            pending.push(txn);
                        }
                    }
                }
                WalEvent::Keepalive {
                    wal_end,
                    reply_requested,
                } => {
                    if pending.is_empty() && !decoder.in_transaction() {
                        confirmed = confirmed.max(wal_end);
                        if let Some(p) = &progress {
                            p.advance(&backend.name, confirmed);
                        }
                    }
                    if reply_requested {
                        writer.confirm(confirmed, false).await?;
                    }
                }
            }
            if pending_changes >= MAX_BATCH_CHANGES {
                break;
            }
            match events.try_recv() {
                Ok(event) => next = Some(Some(event)),
                // Nothing more yet: with changes pending, gather for a
                // moment longer, so that under load one apply transaction
                // carries many origin transactions (its fixed cost is most
                // of the work for small ones).
                Err(_) if !pending.is_empty() && !pending.iter().any(|t| t.has_ddl) => {
                    let gathered_since =
                        *gather_start.get_or_insert_with(tokio::time::Instant::now);
                    match tokio::time::timeout_at(gathered_since + GATHER, events.recv()).await {
                        Ok(event) => next = Some(event),
                        Err(_) => break,
                    }
                }
                Err(_) => break,
            }
        }
        gather_start = None;
        if pending.is_empty() {
            continue;
        }
        // Transactions made after DDL the peer has not applied yet wait
        // for it (the peer's node applies the DDL log); the ones before
        // them go now.
        let needed = pending.iter().map(|t| t.ddl).max().unwrap_or(0);
        let mut ready = pending.len();
        let report = loop {
            if peer.as_ref().is_none_or(Client::is_closed) {
                match connect_backend(&backend, &config).await {
                    Ok(c) => peer = Some(c),
                    Err(e) => {
                        tracing::debug!(peer = %backend.name, error = %e, "peer unreachable");
                        tokio::time::sleep(poll.max(Duration::from_millis(500))).await;
                        continue;
                    }
                }
            }
            let Some(client) = peer.as_mut() else {
                continue;
            };
            if needed > peer_ddl {
                match client
                    .query_one(crate::cluster::ddl_progress::INDEX_SQL, &[])
                    .await
                {
                    Ok(row) => peer_ddl = u64::try_from(row.get::<_, i64>(0)).unwrap_or(0),
                    Err(e) => {
                        tracing::debug!(peer = %backend.name, error = %e, "reading the peer's DDL index failed");
                        peer = None;
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                }
                ready = pending.iter().take_while(|t| t.ddl <= peer_ddl).count();
                if ready == 0 {
                    break None;
                }
            }
            match stream.apply(client, &pending[..ready]).await {
                Ok(report) => {
                    failures = 0;
                    break Some(report);
                }
                Err(e @ ReplicationError::Fenced(_)) => return Err(e),
                Err(e) => {
                    let detail = match &e {
                        ReplicationError::Sql(sql) => sql
                            .as_db_error()
                            .map(|d| format!("{}: {}", d.code().code(), d.message())),
                        _ => None,
                    };
                    failures += 1;
                    if let Some(m) = metrics {
                        m.lag_seconds.set(oldest_pending_age(&pending));
                    }
                    // A stream that keeps failing must not stall silently.
                    if failures >= 3 {
                        tracing::warn!(peer = %backend.name, failures, error = %e, detail = detail.unwrap_or_default(), "apply keeps failing; retrying");
                    } else {
                        tracing::debug!(peer = %backend.name, error = %e, detail = detail.unwrap_or_default(), "apply failed; retrying");
                    }
                    peer = None;
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        };
        let Some(report) = report else {
            // Waiting for DDL the peer's node applies from the log: normal
            // for a moment, but never silent for long.
            let waiting = *ddl_wait_since.get_or_insert_with(std::time::Instant::now);
            if waiting.elapsed() >= STUCK_WARNING
                && last_stuck_warning.is_none_or(|w| w.elapsed() >= STUCK_WARNING)
            {
                last_stuck_warning = Some(std::time::Instant::now());
                tracing::warn!(
                    peer = %backend.name,
                    needed_ddl = needed,
                    peer_ddl,
                    waiting_s = waiting.elapsed().as_secs(),
                    "changes wait for DDL the peer does not have yet"
                );
            }
            if let Some(m) = metrics {
                m.lag_seconds.set(oldest_pending_age(&pending));
            }
            tokio::time::sleep(DDL_WAIT_POLL).await;
            continue;
        };
        ddl_wait_since = None;
        // A horizon of the origin's arrives after every change of its
        // that is older: now applied, so the peer may note it (see
        // tombstones.sql). Failing that, the next one will do.
        if let (Some((horizon, complete)), Some(client)) = (
            pending[..ready].iter().filter_map(|t| t.horizon).max(),
            peer.as_ref(),
        ) {
            if let Err(e) = client
                .execute(
                    "SELECT chorus.note_horizon($1, $2, $3)",
                    &[&i32::from(stream.origin_node), &horizon, &complete],
                )
                .await
            {
                tracing::debug!(peer = %backend.name, error = %e, "noting the origin's horizon failed");
            }
        }
        let last_end = pending[ready - 1].end_lsn;
        pending.drain(..ready);
        pending_changes = pending.iter().map(|t| t.changes.len()).sum();
        confirmed = confirmed.max(last_end);
        if let Some(p) = &progress {
            p.advance(&backend.name, confirmed);
        }
        writer.confirm(confirmed, true).await?;
        if let Some(m) = metrics {
            m.applied.increment(report.changes as u64);
            m.lag_seconds.set(report.lag_seconds);
            for delay in &report.delays {
                m.delay.record(*delay);
            }
        }
        applied_in_window += report.changes as u64;
        for conflict in report.conflicts() {
            let kind = conflict.split(':').next().unwrap_or(conflict);
            node.metrics.conflict(kind);
        }
        if window_start.elapsed() >= Duration::from_secs(1) {
            if let Some(m) = metrics {
                m.applied_per_second
                    .set(applied_in_window as f64 / window_start.elapsed().as_secs_f64());
                if events.is_empty() {
                    m.lag_seconds.set(0.0);
                }
            }
            window_start = std::time::Instant::now();
            applied_in_window = 0;
        }
    }
}

/// How long a stream waits for DDL before it says so (and again as often).
const STUCK_WARNING: Duration = Duration::from_secs(5);

/// Seconds since the oldest of these transactions committed on its origin.
fn oldest_pending_age(pending: &[DecodedTransaction]) -> f64 {
    pending
        .iter()
        .filter_map(|t| t.commit_time)
        .next()
        .map_or(0.0, |t| (unix_now() - t).max(0.0))
}

/// Aborts a task when dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
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
