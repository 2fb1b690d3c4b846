//! Driving an origin backend's streams: one per peer, each applying the
//! origin's changes on that peer, and the pruning of the origin's
//! tombstones.

use std::sync::Arc;
use std::time::Duration;

use tokio_postgres::Client;

use crate::backend::connect_backend;
use crate::backoff::Backoff;
use crate::config::{BackendConfig, ReplicationConfig};
use crate::lane::Lane;
use crate::node::Node;

use super::{
    format_lsn, unix_now, DecodedTransaction, PgOutputDecoder, ReplicationError, ReplicationStream,
    WalEvent, WalStream,
};

/// The longest an idle stream waits before asking its walsender how far it
/// has sent (so that its position moves past WAL with nothing to apply).
const IDLE_POLL_MAX: Duration = Duration::from_secs(1);

/// Drive the streams of `origin` (the home backend of node `owner`) in
/// one database (`lane`) to every other backend, as the driver of
/// `epoch`, until one fails. A driver that finds a newer epoch recorded on
/// the origin, or is refused by a peer, gets `Fenced` and must stop.
pub(crate) async fn drive(
    node: &Arc<Node>,
    lane: &Arc<Lane>,
    origin_backend: &BackendConfig,
    owner: u16,
    epoch: u64,
) -> Result<(), ReplicationError> {
    let config = &lane.config;
    let home = origin_backend.name == node.config.home_backend().name;
    if home {
        // The home upkeep installs the schema first.
        while !lane.wait_schema_ready(Duration::from_secs(1)).await {}
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
    // (This database's slots only: each database's streams have a driver
    // of their own.)
    let prefix = format!("chorus\\_{owner}\\_to\\_%");
    let ended = origin
        .execute(
            "SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots \
             WHERE slot_name LIKE $1 AND database = current_database() AND active_pid IS NOT NULL",
            &[&prefix],
        )
        .await?;
    if ended > 0 {
        tracing::info!(backend = %origin_backend.name, walsenders = ended, "ended the streams of a previous driver");
    }
    // One task per peer, each with its own connections, so that a slow or
    // frozen peer holds up only its own stream.
    let mut streams = tokio::task::JoinSet::new();
    // (Before the backends are read: one added after starts all again.)
    let mut added = node.backends_changed();
    // (Not to a backend being copied again: the copy makes its slots, and
    // the driver starts again when the copy ends, see rejoin.rs.)
    let copying = node
        .consensus()
        .map(|c| c.state().read(|s| s.copying.clone()))
        .unwrap_or_default();
    for backend in node
        .backends()
        .iter()
        .filter(|b| b.name != origin_backend.name && !copying.contains(&b.name))
    {
        let stream = ReplicationStream {
            slot: lane.slot_name(owner, &backend.name),
            epoch,
            ..ReplicationStream::new(owner, 0)
        };
        stream.ensure_slot(&origin).await?;
        streams.spawn(run_stream(
            node.clone(),
            lane.clone(),
            origin_backend.clone(),
            backend.clone(),
            stream,
            home,
        ));
    }
    let peers = streams.len();
    if let Some(consensus) = node.consensus().cloned() {
        streams.spawn(async move {
            let mut routing = consensus.state().routing();
            loop {
                if routing.borrow_and_update().copying != copying {
                    return Err(ReplicationError::Restart(
                        "a backend's copy began or ended".into(),
                    ));
                }
                tokio::select! {
                    changed = routing.changed() => {
                        if changed.is_err() {
                            std::future::pending::<()>().await;
                        }
                    }
                    Ok(()) = added.changed() => {
                        return Err(ReplicationError::Restart(
                            "a backend joined this node's list".into(),
                        ));
                    }
                }
            }
        });
    }
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
        database = lane.database(),
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
    let backends = node.backends();
    let others = backends.iter().filter(|b| b.name != origin);
    let Some(consensus) = node.consensus() else {
        // Without a cluster only a lone backend knows its peers: none.
        return (backends.len() == 1).then(Vec::new);
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

/// How often a stream tells the walsender it is alive (its confirmed
/// position, unchanged: one small message) while an apply runs. One large
/// origin transaction can take minutes to apply, and an apply can wait on
/// a lock; without a word for `wal_sender_timeout` (60 s by default, as
/// low as a few seconds on some servers) the walsender ends the stream,
/// which then decodes and sends that transaction again from the start.
const FEEDBACK_EVERY: Duration = Duration::from_secs(1);

/// Changes taken into one apply transaction at most (whole transactions
/// are always taken); keeps the apply, and the row locks it holds, short.
/// Also what a stream holds while its transactions wait for DDL.
const MAX_BATCH_CHANGES: usize = 1_000;

/// Bytes of `pgoutput` messages a stream's reader reads ahead of the
/// apply at most (one larger message alone).
const READ_AHEAD_BYTES: usize = 16 << 20;

/// A peer connection that carried a statement larger than this is closed
/// after its apply (the next apply connects again): tokio-postgres keeps
/// the capacity of the largest message a connection sent in its buffers
/// for the connection's life, so a few large values would otherwise keep
/// tens of megabytes per stream for good.
const PEER_BUFFERS_KEPT: usize = 4 << 20;

/// Bytes of change records (held in memory) taken into one apply at most,
/// likewise: a few transactions with large values stop the gathering, so
/// that what a stream holds stays bounded.
const MAX_BATCH_BYTES: usize = 32 << 20;

/// Stream an origin backend's changes to one peer until the origin
/// connection fails (the caller then starts over) or the peer refuses this
/// driver as stale (`Fenced`). A failing peer only pauses this stream: it
/// reconnects and applies the same batch again. `home`: the origin is this
/// node's home backend (its commit scopes and metrics follow the stream).
async fn run_stream(
    node: Arc<Node>,
    lane: Arc<Lane>,
    origin: BackendConfig,
    backend: BackendConfig,
    stream: ReplicationStream,
    home: bool,
) -> Result<(), ReplicationError> {
    let config = lane.config.clone();
    let wal = WalStream::start(&origin, &config, &stream.slot, Duration::from_secs(5)).await?;
    let (mut reader, mut writer) = wal.split();
    // The reader runs on its own (reading a message is not cancel-safe);
    // the bounded channel makes it wait while a batch is applied, and so
    // does its budget of bytes read ahead (a message can hold a large row
    // image): each message holds its size of it until it is taken off the
    // channel.
    let (events_tx, mut events) = tokio::sync::mpsc::channel(4096);
    let read_ahead = Arc::new(tokio::sync::Semaphore::new(READ_AHEAD_BYTES));
    let reading = tokio::spawn(async move {
        loop {
            let event = reader.next().await;
            let failed = event.is_err();
            let size = match &event {
                Ok(WalEvent::Data(data)) => data.len().clamp(1, READ_AHEAD_BYTES),
                _ => 0,
            };
            let Ok(budget) = read_ahead
                .clone()
                .acquire_many_owned(u32::try_from(size).unwrap_or(u32::MAX))
                .await
            else {
                break;
            };
            if events_tx.send((event, budget)).await.is_err() || failed {
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
    let progress = Some(lane.progress.clone()).filter(|_| home);
    // (Per peer: the main database's streams.)
    let metrics = node
        .metrics
        .peer(&backend.name)
        .filter(|_| home && lane.main);
    let metrics = metrics.as_deref();
    let mut peer: Option<Client> = None;
    let mut decoder = PgOutputDecoder::default();
    let mut pending: Vec<DecodedTransaction> = Vec::new();
    // The peer's DDL index, as last read.
    let mut peer_ddl = 0u64;
    let mut pending_changes = 0usize;
    let mut pending_bytes = 0usize;
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
    // When the walsender last heard from this stream while it waited.
    let mut last_feedback = std::time::Instant::now();
    loop {
        // Transactions that wait (for DDL) hold a batch's worth at most:
        // past that, the stream reads nothing more until they are applied,
        // and the walsender waits (the reader's channel and budget are
        // bounded), however long the wait and however much is written.
        let (first, woken) = match &progress {
            _ if batch_full(pending_changes, pending_bytes) => (None, false),
            Some(p) => tokio::select! {
                event = events.recv() => (Some(event.map(|(event, _budget)| event)), false),
                woken = p.idle(&backend.name, idle_wait.wait()) => (None, woken),
            },
            None => tokio::select! {
                event = events.recv() => (Some(event.map(|(event, _budget)| event)), false),
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
                            pending_bytes += txn.changes.memory_bytes();
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
            if batch_full(pending_changes, pending_bytes) {
                break;
            }
            match events.try_recv() {
                Ok((event, _budget)) => next = Some(Some(event)),
                // Nothing more yet: with changes pending, gather for a
                // moment longer, so that under load one apply transaction
                // carries many origin transactions (its fixed cost is most
                // of the work for small ones).
                Err(_) if !pending.is_empty() && !pending.iter().any(|t| t.has_ddl) => {
                    let gathered_since =
                        *gather_start.get_or_insert_with(tokio::time::Instant::now);
                    match tokio::time::timeout_at(gathered_since + GATHER, events.recv()).await {
                        Ok(event) => next = Some(event.map(|(event, _budget)| event)),
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
                    .query_one(crate::lane::ddl_progress::INDEX_SQL, &[])
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
            let applied = {
                let apply = stream.apply(client, &pending[..ready]);
                tokio::pin!(apply);
                let mut feedback = tokio::time::interval_at(
                    tokio::time::Instant::now() + FEEDBACK_EVERY,
                    FEEDBACK_EVERY,
                );
                loop {
                    tokio::select! {
                        applied = &mut apply => break applied,
                        _ = feedback.tick() => {
                            writer.confirm(confirmed, false).await?;
                            // (The lag grows while the apply runs, or waits.)
                            if let Some(m) = metrics {
                                m.lag_seconds.set(oldest_pending_age(&pending));
                            }
                        }
                    }
                }
            };
            match applied {
                Ok(report) => {
                    failures = 0;
                    if report.largest_sent > PEER_BUFFERS_KEPT {
                        peer = None;
                    }
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
                    held_changes = pending_changes,
                    waiting_s = waiting.elapsed().as_secs(),
                    "changes wait for DDL the peer does not have yet"
                );
            }
            if let Some(m) = metrics {
                m.lag_seconds.set(oldest_pending_age(&pending));
                m.held_changes.set(pending_changes as f64);
            }
            // A stream that reads nothing more still answers the
            // walsender, which would otherwise end it after
            // `wal_sender_timeout`.
            if last_feedback.elapsed() >= FEEDBACK_EVERY {
                writer.confirm(confirmed, false).await?;
                last_feedback = std::time::Instant::now();
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
        pending_bytes = pending.iter().map(|t| t.changes.memory_bytes()).sum();
        confirmed = confirmed.max(last_end);
        if let Some(p) = &progress {
            p.advance(&backend.name, confirmed);
        }
        writer.confirm(confirmed, true).await?;
        if let Some(m) = metrics {
            m.applied.increment(report.changes as u64);
            m.lag_seconds.set(report.lag_seconds);
            m.held_changes.set(pending_changes as f64);
            for delay in &report.delays {
                m.delay.record(*delay);
            }
        }
        applied_in_window += report.changes as u64;
        for conflict in report.conflicts() {
            if let Some(kind) = conflict.kind {
                node.metrics.conflict(kind.as_str(), conflict.changes);
            }
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

/// Whether a stream holds a batch's worth: it takes no more into the next
/// apply, and reads no further while its transactions wait.
fn batch_full(changes: usize, bytes: usize) -> bool {
    changes >= MAX_BATCH_CHANGES || bytes >= MAX_BATCH_BYTES
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
