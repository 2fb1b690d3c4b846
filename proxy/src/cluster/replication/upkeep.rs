//! The home backend's upkeep: the chorus schema, its slots' positions and
//! retained WAL, lag metrics, and the clock's view of other origins.

use std::sync::Arc;
use std::time::Duration;

use tokio_postgres::Client;

use crate::backend::connect_backend;
use crate::backoff::Backoff;
use crate::cluster::capture::{self, CaptureError};
use crate::config::{BackendConfig, ReplicationConfig};
use crate::lane::Lane;
use crate::node::Node;

use super::{parse_lsn, ReplicationError, ReplicationStream};

/// How often the node's clock takes note of the versions other nodes'
/// changes brought to its home backend: every OBSERVE_INTERVAL while they
/// change, doubling while they do not, up to OBSERVE_INTERVAL_MAX.
const OBSERVE_INTERVAL: Duration = Duration::from_millis(100);
const OBSERVE_INTERVAL_MAX: Duration = Duration::from_secs(1);

/// Wait (at most `limit`) until `backend`, another node's home, has the
/// slots of its streams to every other backend in `lane`'s database: a
/// session may then write there. Its own node makes them before it admits
/// sessions (see `home_upkeep`), but a session through this node can reach
/// it first (write-leader routing, a home backend down at start), and a
/// change committed before a slot exists would never reach that peer.
/// Whether they are there.
pub async fn wait_streams_ready(
    node: &Node,
    lane: &Lane,
    backend: &crate::config::BackendConfig,
    limit: Duration,
) -> bool {
    if lane.streams_seen(&backend.name) {
        return true;
    }
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        let owner = node
            .consensus()
            .and_then(|c| c.state().read(|s| s.owner_of(&backend.name)))
            .and_then(|id| u16::try_from(id).ok());
        if let Some(owner) = owner {
            let slots: Vec<String> = node
                .backends()
                .iter()
                // (A backend being copied gets its slots from the copy.)
                .filter(|b| b.name != backend.name && !node.is_copying(&b.name))
                .map(|b| lane.slot_name(owner, &b.name))
                .collect();
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let found = lane
                .control
                .query(
                    backend,
                    left,
                    "SELECT count(*) FROM pg_catalog.pg_replication_slots \
                      WHERE slot_name = ANY($1) AND database = current_database()",
                    &[&slots],
                )
                .await
                .ok()
                .and_then(|rows| rows.first().map(|row| row.get::<_, i64>(0)));
            if let Some(n) = found {
                if usize::try_from(n).is_ok_and(|n| n == slots.len()) {
                    lane.streams_found(&backend.name);
                    return true;
                }
            }
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

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

/// The home backend's upkeep in every replicated database (those that join
/// later too), for as long as the node runs.
pub async fn run_home_upkeep(node: Arc<Node>) {
    let each = node.clone();
    each.each_lane(|lane| run_lane_upkeep(node.clone(), lane))
        .await;
}

/// The home backend's upkeep in one database (a lane): the chorus schema,
/// flush positions for commit scopes, lag metrics, the clock's view of
/// other origins. (Its streams are driven by duties.rs, like those of any
/// backend handed to this node.)
async fn run_lane_upkeep(node: Arc<Node>, lane: Arc<Lane>) {
    loop {
        match home_upkeep(&node, &lane).await {
            // Sessions wait for the schema: this needs an operator.
            Err(e @ ReplicationError::Install(CaptureError::NewerSchema { .. })) => {
                tracing::error!(database = lane.database(), error = %e, "home backend not served; retrying");
            }
            Err(e) => {
                tracing::warn!(database = lane.database(), error = %e, "home backend upkeep interrupted; retrying")
            }
            Ok(()) => {}
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

async fn home_upkeep(node: &Arc<Node>, lane: &Lane) -> Result<(), ReplicationError> {
    let config = &lane.config;
    let home = node.config.home_backend();
    let origin = connect_backend(home, config).await?;
    capture::install(&origin, node.config.node.id).await?;
    // (Each peer's slot, of the backends the node knows now.)
    let slots_now = || -> Vec<(String, String)> {
        node.backends()
            .iter()
            .filter(|b| b.name != home.name)
            .map(|b| (b.name.clone(), lane.slot_name(node.config.node.id, &b.name)))
            .collect()
    };
    let slots = slots_now();
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
    lane.schema_installed();
    tokio::spawn(build_tombstone_index(
        home.clone(),
        config.clone(),
        lane.database().to_owned(),
    ));
    // Commits waiting for a scope ask for the home backend's flush position.
    let mut flush_requests = Some(lane.progress.flush_requests_rx.lock().await);
    let mut lag_check = tokio::time::interval(Duration::from_secs(1));
    let mut observe_every = Backoff::new(OBSERVE_INTERVAL, OBSERVE_INTERVAL_MAX);
    let observe = tokio::time::sleep(observe_every.wait());
    tokio::pin!(observe);
    let mut observed = 0i64;
    let mut slot_watch = SlotWatch::default();
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
                let slots = slots_now();
                let slot_names: Vec<String> = slots.iter().map(|(_, slot)| slot.clone()).collect();
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
                    // (Per peer: the main database's slots. Every
                    // database's slots are watched below.)
                    if let Some(m) = node.metrics.peer(peer).filter(|_| lane.main) {
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

/// The tombstones' index on the home backend (see
/// [`capture::build_tombstone_index`]), on a connection of its own: the
/// build waits for transactions open on the backend, and the upkeep goes on
/// meanwhile. Best effort: a failure is logged, and the next start of the
/// upkeep tries again.
async fn build_tombstone_index(home: BackendConfig, config: ReplicationConfig, database: String) {
    let built = async {
        let client = connect_backend(&home, &config).await?;
        Ok::<_, ReplicationError>(capture::build_tombstone_index(&client).await?)
    }
    .await;
    match built {
        Ok(true) => tracing::info!(database, "tombstone index built"),
        Ok(false) => {}
        Err(e) => {
            tracing::warn!(database, error = %e, "tombstone index not built; pruning reads every version until it is")
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
