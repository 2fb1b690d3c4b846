//! Copying a backend again from a peer while the cluster takes writes
//! (the admin console's `REJOIN <backend> FROM <source>`): for a backend
//! whose slot on a peer was invalidated, one restored from an old backup,
//! or one that differs for any other reason.
//!
//! The copy is exact because every stream into the target starts where
//! the copy ends, origin by origin:
//!
//! 1. The target takes no session (it is drained), and what was written
//!    on it reaches every peer (its slots confirm its current position).
//! 2. `SetCopying` in the Raft log: no node streams to or from it, or
//!    applies the DDL log to it, until the copy is done.
//! 3. On every other origin but the source, the slot to the target is made
//!    again, at a position `S`; the copy waits until the source has
//!    applied that origin's changes up to `S` (the origin's slot to the
//!    source confirms `S`). The copy then holds at least everything before
//!    `S`, and `chorus.applied` in it tells exactly how far: the stream
//!    from `S` skips what the copy holds already (see
//!    `chorus.apply_transactions`), so nothing is lost or applied twice.
//! 4. The source's slot to the target is made with an exported snapshot,
//!    and the database is dumped at that snapshot: the slot's changes are
//!    exactly those the dump does not hold. The roles the source had then
//!    and the target lacks are made first (a new backend has none).
//! 5. The dump is restored into a staging database on the target (one
//!    transaction, triggers off), which is given the target's identity
//!    (node and sequence id; its global sequences move to values of the
//!    target's own: snowflake ids with its id, galloc ranges newly
//!    allocated through the Raft log) and its capture triggers (internal,
//!    so not dumped), then takes the database's place.
//!    The target's own slots are made before it takes any write, and the
//!    peers forget how far they had applied its old changes.
//! 6. A check that no slot into the target moved while the copy ran (a
//!    node that had not yet seen step 2), then `SetCopying` off, and the
//!    target takes sessions again.
//!
//! A copy that fails leaves the backend out (`copying`): run it again.
//! Every replicated database is copied, one after another.
//!
//! A new backend joins the same way (`JOIN`): announced first (`ADD
//! BACKEND`: `copying` before any node names it), so that the nodes can
//! take it into their configuration (`RELOAD`, see `Node::reload`) and its
//! node be started, it has
//! no session to wait for and nothing of its own to send, and its
//! databases are made by the copy.

mod copy;

use std::time::Duration;

use chorus_consensus::{Consensus, Request, Response};
use thiserror::Error;
use tokio_postgres::Client;

use crate::backend::connect_backend;
use crate::config::{BackendConfig, ReplicationConfig};
use crate::lane::Lane;
use crate::node::Node;

/// How long the copy waits for client sessions to leave the target before
/// it ends them.
const SESSIONS_LEAVE: Duration = Duration::from_secs(30);
/// How long it waits for the target's changes to reach its peers, and for
/// the source to apply the other origins' changes up to the new slots.
const CATCH_UP: Duration = Duration::from_secs(300);
/// How long a Raft proposal may take.
const PROPOSE: Duration = Duration::from_secs(10);

/// Why a copy was refused or failed.
#[derive(Debug, Error)]
pub enum RejoinError {
    /// Refused before anything changed (SQLSTATE, message, hint).
    #[error("{1}")]
    Refused(&'static str, String, Option<String>),
    #[error("{0}")]
    Failed(String),
    #[error("{}", crate::backend::error_text(.0))]
    Sql(#[from] tokio_postgres::Error),
}

/// What a copy did.
#[derive(Debug, Default)]
pub struct Rejoined {
    pub databases: usize,
    /// Roles the target lacked.
    pub roles: usize,
    pub sequences: usize,
    pub sessions_ended: u64,
}

/// The facts about the two backends a copy needs.
struct Pair<'a> {
    target: &'a BackendConfig,
    source: &'a BackendConfig,
    target_owner: u16,
    source_owner: u16,
    sequence_id: u16,
}

fn refused(code: &'static str, message: String, hint: Option<&str>) -> RejoinError {
    RejoinError::Refused(code, message, hint.map(str::to_owned))
}

/// Copy `target` again from `source`, every replicated database, while the
/// cluster takes writes; `progress` hears each step.
pub async fn rejoin(
    node: &Node,
    target: &str,
    source: &str,
    progress: &(dyn Fn(String) + Send + Sync),
) -> Result<Rejoined, RejoinError> {
    let consensus = node
        .consensus()
        .cloned()
        .ok_or_else(|| refused("55000", "this node is not part of a cluster".into(), None))?;
    let find = |name: &str| {
        node.backend(name)
            .ok_or_else(|| refused("42704", format!("backend \"{name}\" does not exist"), None))
    };
    let (target_backend, source_backend) = (find(target)?, find(source)?);
    if target == source {
        return Err(refused(
            "22023",
            "a backend cannot be copied from itself".into(),
            Some("Name a healthy peer after FROM."),
        ));
    }
    let (target_owner, source_owner, sequence_id, source_copying, drained, again) =
        consensus.state().read(|s| {
            let owner = |b: &str| s.owner_of(b).and_then(|id| u16::try_from(id).ok());
            (
                owner(target),
                owner(source),
                owner(target).and_then(|id| s.sequence_ids.get(&u64::from(id)).copied()),
                s.copying.contains(source),
                s.drained.contains(target),
                s.copying.contains(target),
            )
        });
    let (Some(target_owner), Some(source_owner), Some(sequence_id)) =
        (target_owner, source_owner, sequence_id)
    else {
        return Err(refused(
            "55000",
            "both backends' nodes must have joined the cluster".into(),
            Some("Start the node whose home the backend is, then retry."),
        ));
    };
    if source_copying || node.is_backend_down(source) {
        return Err(refused(
            "55000",
            format!("backend \"{source}\" cannot be copied from now"),
            Some("Copy from a backend that is up and not being copied itself."),
        ));
    }
    let lanes = node.lanes();
    if lanes.is_empty() {
        return Err(refused(
            "55000",
            "this node replicates no database".into(),
            None,
        ));
    }
    let pair = Pair {
        target: &target_backend,
        source: &source_backend,
        target_owner,
        source_owner,
        sequence_id,
    };
    let mut done = Rejoined::default();

    // 1. No session on the target; its changes reach every peer. (A
    // backend already being copied takes no session and sends nothing: a
    // new one announced by ADD BACKEND, or one whose copy failed after
    // this step, which starts again at step 3.)
    let drains = !again && !drained;
    if drains {
        propose(
            &consensus,
            Request::SetDrained {
                backend: target.to_owned(),
                drained: true,
            },
        )
        .await?;
    }
    for lane in lanes.iter().filter(|_| !again) {
        progress(format!(
            "{target}: drained; waiting for its sessions in {} to leave",
            lane.database()
        ));
        if let Ok(client) = connect_backend(pair.target, &lane.config).await {
            done.sessions_ended += sessions_leave(&client).await?;
            progress(format!(
                "{target}: waiting for its changes in {} to reach every peer",
                lane.database()
            ));
            if let Err(e) = changes_sent(&client, target_owner).await {
                if drains {
                    let _ = propose(
                        &consensus,
                        Request::SetDrained {
                            backend: target.to_owned(),
                            drained: false,
                        },
                    )
                    .await;
                }
                return Err(e);
            }
        }
    }

    // 2. Nothing replicates to or from it from now on.
    propose(
        &consensus,
        Request::SetCopying {
            backend: target.to_owned(),
            copying: true,
        },
    )
    .await?;
    progress(format!("{target}: replication to and from it stopped"));

    // 3-5, database by database.
    for lane in &lanes {
        copy_database(node, &consensus, lane, &pair, progress, &mut done).await?;
        done.databases += 1;
    }

    // 6. Back in.
    propose(
        &consensus,
        Request::SetCopying {
            backend: target.to_owned(),
            copying: false,
        },
    )
    .await?;
    if drains {
        propose(
            &consensus,
            Request::SetDrained {
                backend: target.to_owned(),
                drained: false,
            },
        )
        .await?;
    }
    progress(if drained {
        format!(
            "{target}: copied from {source}; it replicates again, and stays drained as it was when REJOIN began (RESUME {target})"
        )
    } else {
        format!("{target}: copied from {source}; it takes sessions and replicates again")
    });
    Ok(done)
}

async fn propose(consensus: &Consensus, request: Request) -> Result<(), RejoinError> {
    consensus
        .propose(request, PROPOSE)
        .await
        .map(|_| ())
        .map_err(|e| RejoinError::Failed(format!("the cluster did not take the step: {e}")))
}

/// Wait until no client session is left on the target (those through
/// nodes move off a drained backend between transactions); after
/// `SESSIONS_LEAVE`, end the rest (a session with state there, or a
/// direct one). Returns how many were ended.
async fn sessions_leave(target: &Client) -> Result<u64, RejoinError> {
    const CLIENTS: &str = "FROM pg_stat_activity WHERE backend_type = 'client backend' \
        AND datname = current_database() AND pid <> pg_backend_pid() \
        AND application_name IS DISTINCT FROM 'chorus replication'";
    let deadline = tokio::time::Instant::now() + SESSIONS_LEAVE;
    loop {
        let left: i64 = target
            .query_one(&format!("SELECT count(*) {CLIENTS}"), &[])
            .await?
            .get(0);
        if left == 0 {
            return Ok(0);
        }
        if tokio::time::Instant::now() >= deadline {
            let ended = target
                .execute(&format!("SELECT pg_terminate_backend(pid) {CLIENTS}"), &[])
                .await?;
            return Ok(ended);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Wait until the target's slots in this database (to every peer) have
/// confirmed its position now: every change written on it is on every
/// peer. A slot that was lost is not waited for.
///
/// The position is read once: the peers' changes applied on the target go
/// on moving its WAL while the cluster takes writes, so its current
/// position is a mark no slot need ever meet.
async fn changes_sent(target: &Client, owner: u16) -> Result<(), RejoinError> {
    let prefix = format!("chorus\\_{owner}\\_to\\_%");
    let written: String = target
        .query_one("SELECT pg_current_wal_lsn()::text", &[])
        .await?
        .get(0);
    let deadline = tokio::time::Instant::now() + CATCH_UP;
    loop {
        let behind: i64 = target
            .query_one(
                "SELECT count(*) FROM pg_replication_slots \
                  WHERE slot_name LIKE $1 AND database = current_database() \
                    AND wal_status IS DISTINCT FROM 'lost' \
                    AND confirmed_flush_lsn < $2::text::pg_lsn",
                &[&prefix, &written],
            )
            .await?
            .get(0);
        if behind == 0 {
            return Ok(());
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(refused(
                "55000",
                format!(
                    "{behind} of the target's streams did not catch up within {} s",
                    CATCH_UP.as_secs()
                ),
                Some("A peer is down or far behind: bring it up, then retry. Nothing was changed."),
            ));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A slot into the target made again on one origin.
struct NewSlot<'a> {
    origin: &'a BackendConfig,
    slot: String,
    lsn: String,
}

/// Steps 3 to 5 in one replicated database.
async fn copy_database(
    node: &Node,
    consensus: &Consensus,
    lane: &Lane,
    pair: &Pair<'_>,
    progress: &(dyn Fn(String) + Send + Sync),
    done: &mut Rejoined,
) -> Result<(), RejoinError> {
    let config = &lane.config;
    let database = lane.database();
    let target = &pair.target.name;
    let owner_of = |name: &str| {
        consensus
            .state()
            .read(|s| s.owner_of(name))
            .and_then(|id| u16::try_from(id).ok())
            .ok_or_else(|| RejoinError::Failed(format!("backend {name} has no node yet")))
    };
    // 3. The slots into the target, made again.
    let mut slots = Vec::new();
    let mut source_client = None;
    let backends = node.backends();
    for origin in backends.iter().filter(|b| b.name != *target) {
        let client = connect_backend(origin, config).await.map_err(|e| {
            RejoinError::Failed(format!(
                "backend {} must be reachable for the copy: {e}",
                origin.name
            ))
        })?;
        let owner = owner_of(&origin.name)?;
        let slot = lane.slot_name(owner, target);
        drop_slot(&client, &slot).await?;
        if origin.name == pair.source.name {
            source_client = Some(client);
            continue;
        }
        let lsn: String = client
            .query_one(
                "SELECT lsn::text FROM pg_create_logical_replication_slot($1, 'pgoutput')",
                &[&slot],
            )
            .await?
            .get(0);
        // The source has applied this origin's changes up to there once
        // the origin's slot to the source confirms it.
        let to_source = lane.slot_name(owner, &pair.source.name);
        progress(format!(
            "{target}/{database}: waiting for {} to apply {} up to {lsn}",
            pair.source.name, origin.name
        ));
        wait_confirmed(&client, &to_source, &lsn).await?;
        slots.push(NewSlot { origin, slot, lsn });
    }
    let source_client =
        source_client.ok_or_else(|| RejoinError::Failed("the source was not reached".into()))?;

    // 4. The source's slot, with its snapshot, and the dump at it.
    let source_slot = lane.slot_name(pair.source_owner, target);
    let exported = copy::create_exported_slot(pair.source, config, &source_slot).await?;
    // (Connected to another database than the one it replaces.)
    let admin_config = ReplicationConfig {
        database: if database == "postgres" {
            "template1"
        } else {
            "postgres"
        }
        .into(),
        ..config.clone()
    };
    let admin = connect_backend(pair.target, &admin_config).await?;
    let roles = copy::copy_roles(&source_client, &admin, &exported.snapshot).await?;
    if !roles.is_empty() {
        progress(format!("{target}: roles made: {}", roles.join(", ")));
    }
    done.roles += roles.len();
    copy::create_staging(&source_client, &admin, database).await?;
    progress(format!(
        "{target}/{database}: copying from {} at {}",
        pair.source.name, exported.consistent_point
    ));
    let restore = copy::dump_and_restore(pair.source, pair.target, config, &exported.snapshot);
    with_progress(
        node,
        &source_client,
        &admin,
        target,
        database,
        restore,
        progress,
    )
    .await?;
    let consistent_point = exported.consistent_point.clone();
    drop(exported);
    slots.push(NewSlot {
        origin: pair.source,
        slot: source_slot,
        lsn: consistent_point.clone(),
    });

    // 5. The target's identity, then the swap.
    let staged_config = ReplicationConfig {
        database: copy::staging_name(database),
        ..config.clone()
    };
    let mut staged = connect_backend(pair.target, &staged_config).await?;
    done.sequences += take_identity(&mut staged, consensus, lane, pair, &consistent_point).await?;
    drop(staged);
    copy::swap_in(&admin, database).await?;
    let copied = connect_backend(pair.target, config).await?;
    let backends = node.backends();
    for peer in backends.iter().filter(|b| b.name != *target) {
        let slot = lane.slot_name(pair.target_owner, &peer.name);
        // (Its node's upkeep may make it at the same moment: either will do,
        // nothing is written on the target before it takes sessions.)
        if let Err(e) = copied
            .execute(
                "SELECT pg_create_logical_replication_slot($1, 'pgoutput') \
                  WHERE NOT EXISTS (SELECT 1 FROM pg_replication_slots WHERE slot_name = $1)",
                &[&slot],
            )
            .await
        {
            if e.code() != Some(&tokio_postgres::error::SqlState::DUPLICATE_OBJECT) {
                return Err(e.into());
            }
        }
        let client = connect_backend(peer, config).await?;
        client
            .execute(
                "UPDATE chorus.applied SET lsn = '0/0' WHERE origin = $1",
                &[&i32::from(pair.target_owner)],
            )
            .await?;
    }

    // 6. No slot into the target moved meanwhile.
    for new in &slots {
        let client = connect_backend(new.origin, config).await?;
        let moved: bool = client
            .query_opt(
                "SELECT confirmed_flush_lsn <> $2::text::pg_lsn FROM pg_replication_slots WHERE slot_name = $1",
                &[&new.slot, &new.lsn],
            )
            .await?
            .is_none_or(|row| row.get(0));
        if moved {
            return Err(RejoinError::Failed(format!(
                "slot {} on {} moved while {target} was copied (a node had not yet seen the copy begin); REJOIN again",
                new.slot, new.origin.name
            )));
        }
    }
    progress(format!("{target}/{database}: copied"));
    Ok(())
}

/// Run `restore`, telling how far it is every few seconds: the staging
/// database's size on disk against the source database's (an estimate: the
/// source may hold dead rows, and indexes are built at the end, so it
/// stops at 99% until the restore ends), as a NOTICE every tenth and in
/// `chorus_backend_copy_progress`.
async fn with_progress(
    node: &Node,
    source: &Client,
    admin: &Client,
    target: &str,
    database: &str,
    restore: impl std::future::Future<Output = Result<(), RejoinError>>,
    progress: &(dyn Fn(String) + Send + Sync),
) -> Result<(), RejoinError> {
    const EVERY: Duration = Duration::from_secs(2);
    let whole: i64 = source
        .query_one("SELECT pg_database_size(current_database())", &[])
        .await?
        .get(0);
    let staging = copy::staging_name(database);
    node.metrics.backend_copy_progress(target, 0.0);
    tokio::pin!(restore);
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + EVERY, EVERY);
    let mut told = 0;
    loop {
        tokio::select! {
            restored = &mut restore => {
                restored?;
                node.metrics.backend_copy_progress(target, 1.0);
                return Ok(());
            }
            _ = tick.tick() => {
                let Ok(row) = admin
                    .query_one("SELECT pg_database_size($1::text)", &[&staging])
                    .await
                else {
                    continue;
                };
                let bytes: i64 = row.get(0);
                let share = (bytes as f64 / whole.max(1) as f64).min(0.99);
                node.metrics.backend_copy_progress(target, share);
                // (Between 0 and 99.)
                let percent = (share * 100.0) as u32;
                if percent >= told + 10 {
                    told = percent - percent % 10;
                    progress(format!(
                        "{target}/{database}: about {percent}% copied ({} of {} MB)",
                        bytes >> 20,
                        whole >> 20
                    ));
                }
            }
        }
    }
}

/// Drop `slot` if it exists, ending its walsender first (a driver that had
/// not yet seen the copy begin may still stream it).
async fn drop_slot(client: &Client, slot: &str) -> Result<(), RejoinError> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        client
            .execute(
                "SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots \
                  WHERE slot_name = $1 AND active_pid IS NOT NULL",
                &[&slot],
            )
            .await?;
        let dropped = client
            .execute(
                "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots \
                  WHERE slot_name = $1 AND NOT active",
                &[&slot],
            )
            .await;
        let left: i64 = client
            .query_one(
                "SELECT count(*) FROM pg_replication_slots WHERE slot_name = $1",
                &[&slot],
            )
            .await?
            .get(0);
        if left == 0 {
            return Ok(());
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(RejoinError::Failed(format!(
                "slot {slot} could not be dropped: {}",
                dropped
                    .err()
                    .map_or("still in use".into(), |e| e.to_string())
            )));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Wait until `slot` on this origin has confirmed `lsn`.
async fn wait_confirmed(origin: &Client, slot: &str, lsn: &str) -> Result<(), RejoinError> {
    let deadline = tokio::time::Instant::now() + CATCH_UP;
    loop {
        let reached: Option<bool> = origin
            .query_opt(
                "SELECT confirmed_flush_lsn >= $2::text::pg_lsn FROM pg_replication_slots WHERE slot_name = $1",
                &[&slot, &lsn],
            )
            .await?
            .map(|row| row.get(0));
        if reached == Some(true) {
            return Ok(());
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(RejoinError::Failed(format!(
                "slot {slot} did not reach {lsn} within {} s; REJOIN again once replication runs",
                CATCH_UP.as_secs()
            )));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Give the staged copy the target's identity: its node and sequence id,
/// where the source's own changes start, capture triggers, and global
/// sequences of its own.
/// Returns how many sequences moved.
async fn take_identity(
    staged: &mut Client,
    consensus: &Consensus,
    lane: &Lane,
    pair: &Pair<'_>,
    consistent_point: &str,
) -> Result<usize, RejoinError> {
    let tx = staged.transaction().await?;
    tx.batch_execute("SET LOCAL session_replication_role = replica")
        .await?;
    let (owner, sequence_id) = (i32::from(pair.target_owner), i32::from(pair.sequence_id));
    tx.execute(
        "UPDATE chorus.local SET node_id = $1, sequence_id = $2, driver_epoch = 0, horizon_sent = 0",
        &[&owner, &sequence_id],
    )
    .await?;
    tx.execute("DELETE FROM chorus.applied WHERE origin = $1", &[&owner])
        .await?;
    tx.execute(
        "INSERT INTO chorus.applied (origin, lsn) VALUES ($1, $2::text::pg_lsn) \
         ON CONFLICT (origin) DO UPDATE SET lsn = excluded.lsn",
        &[&i32::from(pair.source_owner), &consistent_point],
    )
    .await?;
    // Chorus's capture triggers are internal, as a foreign key's are, so
    // pg_dump leaves them out: every replicated table is adopted again
    // (its rows' versions came with the copy).
    tx.batch_execute("SET LOCAL chorus.versions_copied = 'on'")
        .await?;
    tx.execute(
        "SELECT chorus.adopt(to_regclass(tbl), keyless) FROM chorus.replicated_table \
          WHERE to_regclass(tbl) IS NOT NULL",
        &[],
    )
    .await?;
    let sequences = tx
        .query(
            "SELECT seq, kind, coalesce(block, 1) FROM chorus.global_sequence \
              WHERE to_regclass(seq) IS NOT NULL",
            &[],
        )
        .await?;
    for row in &sequences {
        let (seq, kind, block): (String, String, i64) = (row.get(0), row.get(1), row.get(2));
        if kind == "snowflake" {
            tx.execute(
                "SELECT chorus.make_global($1::text::regclass, 'snowflake', $2, 1)",
                &[&seq, &sequence_id],
            )
            .await?;
            continue;
        }
        // galloc: closed, then a range of the target's own.
        tx.execute(
            "SELECT chorus.make_global($1::text::regclass, 'galloc', 0, $2)",
            &[&seq, &block],
        )
        .await?;
        let floor: i64 = tx
            .query_one(
                "SELECT floor FROM chorus.global_sequence WHERE seq = $1",
                &[&seq],
            )
            .await?
            .get(0);
        let sequence = if lane.main {
            seq.clone()
        } else {
            format!("{}:{seq}", lane.database())
        };
        let range = consensus
            .propose(
                Request::AllocateRange {
                    sequence,
                    node: u64::from(pair.target_owner),
                    size: block,
                    floor,
                },
                PROPOSE,
            )
            .await
            .map_err(|e| RejoinError::Failed(format!("no galloc range for {seq}: {e}")))?;
        let Response::Range { lo, hi } = range else {
            return Err(RejoinError::Failed(format!("no galloc range for {seq}")));
        };
        tx.execute(
            "UPDATE chorus.global_sequence SET next_lo = $2, next_hi = $3 WHERE seq = $1",
            &[&seq, &lo, &hi],
        )
        .await?;
        tx.execute("SELECT chorus.galloc_switch($1)", &[&seq])
            .await?;
    }
    tx.commit().await?;
    Ok(sequences.len())
}
