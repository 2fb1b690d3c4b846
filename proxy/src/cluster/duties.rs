//! Who drives each backend's replication. A backend's changes are streamed
//! to the others, and the DDL log applied to it, by the node whose home it
//! is, while that node is alive. When a node stops answering the Raft
//! leader for `cluster.node_lease_ms`, the leader hands its backend's
//! duties to a live node (`Request::SetDriver`, each hand-over with a new
//! epoch) and hands them back once it answers again.
//!
//! A stale driver (a node frozen, or cut off from Raft, that still holds
//! connections) can never apply concurrently with the new one: the new
//! driver records its epoch on the origin backend and ends the old
//! walsenders there, and every apply transaction on a peer locks the
//! origin's row in `chorus.applied` and refuses an epoch older than the
//! last one it saw (`chorus.apply_transactions`). A fenced node stops
//! driving that backend until the Raft state gives it a newer epoch.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chorus_consensus::{Consensus, Request};

use crate::cluster::replication::{self, ReplicationError};
use crate::config::BackendConfig;
use crate::lane::Lane;
use crate::node::Node;

/// How often the assignment is looked at.
const TICK: Duration = Duration::from_millis(100);

/// A backend this node drives: its owner node and the epoch.
#[derive(Debug, Clone)]
struct Duty {
    backend: BackendConfig,
    owner: u16,
    epoch: u64,
}

/// Run the duties this node is assigned, for as long as it runs.
pub async fn run(node: Arc<Node>) {
    if node.config.replication.is_none() {
        return;
    }
    let me = u64::from(node.config.node.id);
    let (fenced_tx, mut fenced_rx) = tokio::sync::mpsc::unbounded_channel::<(String, u64)>();
    let mut running: HashMap<String, (u64, Vec<tokio::task::JoinHandle<()>>)> = HashMap::new();
    // Duties this node was fenced from, by epoch: not taken up again
    // until the assignment changes.
    let mut fenced: HashMap<String, u64> = HashMap::new();
    let mut tick = tokio::time::interval(TICK);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            Some((backend, epoch)) = fenced_rx.recv() => {
                fenced.insert(backend, epoch);
            }
        }
        let wanted = assigned(&node, me);
        running.retain(|name, (epoch, tasks)| {
            let keep = wanted
                .iter()
                .any(|d| d.backend.name == *name && d.epoch == *epoch)
                && fenced.get(name) != Some(epoch);
            if !keep {
                for task in tasks.drain(..) {
                    task.abort();
                }
                node.metrics.driving(name, false);
                tracing::info!(backend = %name, epoch, "no longer driving this backend's replication");
            }
            keep
        });
        for duty in wanted {
            let name = duty.backend.name.clone();
            if running.contains_key(&name) || fenced.get(&name) == Some(&duty.epoch) {
                continue;
            }
            let mut tasks = Vec::new();
            // Each replicated database's streams, on their own (those of a
            // database that joins later too).
            {
                let node = node.clone();
                let fenced_tx = fenced_tx.clone();
                let duty = duty.clone();
                tasks.push(tokio::spawn(async move {
                    let each = node.clone();
                    each.each_lane(|lane| {
                        drive_lane(node.clone(), lane, duty.clone(), fenced_tx.clone())
                    })
                    .await;
                }));
            }
            // Another node's backend: its DDL log too (the home backend's
            // applier always runs, see server.rs).
            if u64::from(duty.owner) != me {
                if let Some(consensus) = node.consensus().cloned() {
                    let node = node.clone();
                    let backend = duty.backend.clone();
                    let owner = u64::from(duty.owner);
                    tasks.push(tokio::spawn(async move {
                        let each = node.clone();
                        each.each_lane(|lane| {
                            crate::cluster::ddl::run_foreign_applier(
                                node.clone(),
                                consensus.clone(),
                                lane,
                                backend.clone(),
                                owner,
                            )
                        })
                        .await;
                    }));
                }
            }
            node.metrics.driving(&name, true);
            tracing::info!(backend = %name, epoch = duty.epoch, "driving this backend's replication");
            running.insert(name, (duty.epoch, tasks));
        }
        node.drives_home.store(
            running.contains_key(&node.config.home_backend().name),
            std::sync::atomic::Ordering::Relaxed,
        );
    }
}

/// Drive one backend's streams in one database until fenced.
async fn drive_lane(
    node: Arc<Node>,
    lane: Arc<Lane>,
    duty: Duty,
    fenced_tx: tokio::sync::mpsc::UnboundedSender<(String, u64)>,
) {
    loop {
        match replication::drive(&node, &lane, &duty.backend, duty.owner, duty.epoch).await {
            Err(ReplicationError::Fenced(why)) => {
                node.metrics.fenced();
                tracing::warn!(backend = %duty.backend.name, database = lane.database(), epoch = duty.epoch, %why, "fenced: another node drives this backend now");
                let _ = fenced_tx.send((duty.backend.name.clone(), duty.epoch));
                return;
            }
            Err(ReplicationError::Restart(why)) => {
                tracing::info!(backend = %duty.backend.name, database = lane.database(), %why, "replication starts again");
                continue;
            }
            Err(e) => {
                tracing::warn!(backend = %duty.backend.name, database = lane.database(), error = %e, "replication interrupted; retrying")
            }
            Ok(()) => {}
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// The backends this node drives now: without a cluster, its home; with
/// one, those the Raft state assigns it (its home until it is handed
/// over).
fn assigned(node: &Node, me: u64) -> Vec<Duty> {
    let home = node.config.home_backend();
    let Some(consensus) = node.consensus() else {
        return vec![Duty {
            backend: home.clone(),
            owner: node.config.node.id,
            epoch: 0,
        }];
    };
    consensus.state().read(|s| {
        node.backends()
            .iter()
            // (A backend being copied again is not driven: the copy
            // makes its slots.)
            .filter(|b| !s.copying.contains(&b.name))
            .filter_map(|b| {
                let is_home = b.name == home.name;
                let (driver, epoch) = match s.driver_of(&b.name) {
                    Some(d) => (d.node, d.epoch),
                    // Not registered yet: a node drives its own home.
                    None if is_home => (me, 0),
                    None => return None,
                };
                let owner = if is_home {
                    Some(me)
                } else {
                    s.owner_of(&b.name)
                };
                (driver == me).then_some(())?;
                Some(Duty {
                    backend: b.clone(),
                    owner: u16::try_from(owner?).ok()?,
                    epoch,
                })
            })
            .collect()
    })
}

/// On the Raft leader's node: hand the duties of a node that has not
/// answered for the lease to a live node (its own), and back to their
/// owner once it answers again.
pub async fn reassign(node: Arc<Node>, consensus: Arc<Consensus>) {
    let Some(cluster) = node.config.cluster.as_ref() else {
        return;
    };
    let lease = Duration::from_millis(cluster.node_lease_ms.max(1));
    let me = u64::from(node.config.node.id);
    let mut leader_since: Option<Instant> = None;
    let mut tick =
        tokio::time::interval((lease / 4).clamp(Duration::from_millis(20), Duration::from_secs(1)));
    loop {
        tick.tick().await;
        if consensus.metrics().borrow().current_leader != Some(me) {
            leader_since = None;
            continue;
        }
        let since = *leader_since.get_or_insert_with(Instant::now);
        // A node is alive if it answered within the lease (counting from
        // when this node became leader: it has not asked before).
        let alive = |n: u64| {
            n == me
                || consensus
                    .last_contact(n)
                    .map_or(since, |t| t.max(since))
                    .elapsed()
                    < lease
        };
        let moves: Vec<(String, u64, u64)> = consensus.state().read(|s| {
            s.nodes
                .iter()
                // (A removed node's backend is no longer the cluster's.)
                .filter(|(_, info)| info.state != chorus_consensus::NodeState::Parted)
                .filter_map(|(owner, info)| {
                    let current = s.driver_of(&info.home_backend)?.node;
                    let target = if alive(*owner) {
                        *owner
                    } else if alive(current) {
                        current
                    } else {
                        me
                    };
                    (target != current).then(|| (info.home_backend.clone(), target, current))
                })
                .collect()
        });
        for (backend, target, current) in moves {
            let request = Request::SetDriver {
                backend: backend.clone(),
                node: target,
                expected: current,
            };
            match consensus.propose(request, Duration::from_secs(2)).await {
                Ok(_) => {
                    tracing::info!(%backend, from = current, to = target, "replication duties handed over")
                }
                Err(e) => {
                    tracing::warn!(%backend, error = %e, "could not hand replication duties over")
                }
            }
        }
    }
}

/// On the Raft leader's node: once a backend has been down for
/// `replication.reconcile_after_ms`, reconcile the backends that are up
/// (see reconcile.rs), once per outage.
pub async fn reconcile_when_lost(node: Arc<Node>, consensus: Arc<Consensus>) {
    let Some(config) = node.config.replication.clone() else {
        return;
    };
    if config.reconcile_after_ms == 0 {
        return;
    }
    let after = Duration::from_millis(config.reconcile_after_ms);
    let me = u64::from(node.config.node.id);
    let mut down_since: HashMap<String, Instant> = HashMap::new();
    let mut done: std::collections::HashSet<String> = std::collections::HashSet::new();
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    loop {
        tick.tick().await;
        for backend in node.backends().iter() {
            if node.is_backend_down(&backend.name) {
                down_since
                    .entry(backend.name.clone())
                    .or_insert_with(Instant::now);
            } else {
                down_since.remove(&backend.name);
                done.remove(&backend.name);
            }
        }
        if consensus.metrics().borrow().current_leader != Some(me) {
            continue;
        }
        let Some(lost) = down_since
            .iter()
            .find(|(name, since)| since.elapsed() >= after && !done.contains(*name))
            .map(|(name, _)| name.clone())
        else {
            continue;
        };
        // Every replicated database, each on its own.
        let mut reconciled = true;
        for lane in node.lanes() {
            let mut clients = Vec::new();
            for backend in node
                .backends()
                .iter()
                // (A backend being copied holds no data of its own yet.)
                .filter(|b| !node.is_backend_down(&b.name) && !node.is_copying(&b.name))
            {
                if let Ok(client) = crate::backend::connect_backend(backend, &lane.config).await {
                    clients.push((backend.name.clone(), client));
                }
            }
            if clients.len() < 2 {
                reconciled = false;
                continue;
            }
            match crate::cluster::reconcile::reconcile(&clients).await {
                Ok(report) => {
                    tracing::info!(lost = %lost, database = lane.database(), tables = report.tables, rows = report.rows, "backends reconciled");
                    node.metrics.reconciled(report.rows);
                }
                Err(e) => {
                    reconciled = false;
                    tracing::warn!(lost = %lost, database = lane.database(), error = %e, "reconciliation failed; retrying");
                }
            }
        }
        if reconciled {
            done.insert(lost);
        }
    }
}
