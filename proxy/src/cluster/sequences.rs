//! Upkeep of the home backend's global sequences (what snowflake and
//! galloc sequences are: `chorus.make_global` in the backend SQL): snowflake sequences that fell
//! behind the clock move forward, galloc sequences get their next range
//! from the Raft log ahead of need and switch to it, and the values handed
//! out are counted.
//!
//! A galloc sequence keeps serving its current range when the Raft log is
//! unreachable; when that range is used up, nextval fails with
//! PostgreSQL's own error (SQLSTATE 2200H, "reached maximum value").

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use chorus_consensus::{Consensus, Request, Response};

use crate::backoff::Backoff;
use crate::cluster::replication::ReplicationError;
use crate::lane::Lane;
use crate::node::Node;

/// A snowflake sequence's increment: its values' low 10 bits are the node's
/// sequence id (the backend SQL says `INCREMENT BY 1024`; a test checks it).
pub const SNOWFLAKE_STEP: i64 = 1 << 10;

/// A snowflake sequence that moved by this much or more was moved forward
/// to the clock (a second's worth of timestamps), not by values handed
/// out (the backend SQL says `1000::bigint << 22`; a test checks it).
pub const SNOWFLAKE_CLOCK_JUMP: i64 = 1000 << chorus_router::hlc::LOGICAL_BITS;

/// How often the sequences are looked at: every TICK while values are
/// handed out or ranges change, doubling while nothing happens, up to
/// TICK_MAX (a galloc range is refilled well before it runs out, see
/// `galloc_refill_percent`).
const TICK: Duration = Duration::from_millis(100);
const TICK_MAX: Duration = Duration::from_secs(1);

/// Run the upkeep, in every replicated database (those that join later
/// too), for as long as the node runs.
pub async fn run(node: Arc<Node>, consensus: Arc<Consensus>) {
    let each = node.clone();
    each.each_lane(|lane| {
        let (node, consensus) = (node.clone(), consensus.clone());
        async move {
            loop {
                if let Err(e) = upkeep(&node, &consensus, &lane).await {
                    tracing::warn!(database = lane.database(), error = %e, "sequence upkeep failed; retrying");
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    })
    .await;
}

async fn upkeep(node: &Node, consensus: &Consensus, lane: &Lane) -> Result<(), ReplicationError> {
    let Some(cluster) = &node.config.cluster else {
        return Ok(());
    };
    while !lane.wait_schema_ready(Duration::from_secs(1)).await {}
    let client = crate::backend::connect_backend(node.config.home_backend(), &lane.config).await?;
    let me = u64::from(node.config.node.id);
    let mut recorded = None;
    let mut last_values: HashMap<String, i64> = HashMap::new();
    let mut wait = Backoff::new(TICK, TICK_MAX);
    loop {
        tokio::time::sleep(wait.wait()).await;
        wait.idle();
        let Some(sequence_id) = consensus.state().read(|s| s.sequence_ids.get(&me).copied()) else {
            continue;
        };
        let sequence_id = i32::from(sequence_id);
        if recorded != Some(sequence_id) {
            // For `chorus sequences convert`, which works backend by backend.
            client
                .execute("UPDATE chorus.local SET sequence_id = $1", &[&sequence_id])
                .await?;
            recorded = Some(sequence_id);
        }
        client
            .execute("SELECT chorus.snowflake_catch_up($1)", &[&sequence_id])
            .await?;
        let rows = client
            .query(
                "SELECT seq, kind, last_value, block, floor, left_in_range, has_next \
                 FROM chorus.sequence_status()",
                &[],
            )
            .await?;
        for row in rows {
            let seq: String = row.get(0);
            let kind: String = row.get(1);
            let last: i64 = row.get(2);
            let snowflake = kind == "snowflake";
            if let Some(before) = last_values.insert(seq.clone(), last) {
                let delta = last - before;
                // (A snowflake sequence moved forward to the clock is not
                // values handed out.)
                if delta > 0 && !(snowflake && delta >= SNOWFLAKE_CLOCK_JUMP) {
                    let n = if snowflake {
                        delta / SNOWFLAKE_STEP
                    } else {
                        delta
                    };
                    node.metrics.sequence_values(snowflake, n as u64);
                    wait.active();
                }
            }
            if snowflake {
                continue;
            }
            let block: i64 = row.get::<_, Option<i64>>(3).unwrap_or(1).max(1);
            let floor: i64 = row.get::<_, Option<i64>>(4).unwrap_or(1);
            let left: i64 = row.get(5);
            let mut has_next: bool = row.get(6);
            node.metrics.galloc_left(&seq, left);
            let below =
                |percent: u8| left.saturating_mul(100) < block.saturating_mul(i64::from(percent));
            if !has_next && below(cluster.galloc_refill_percent) {
                // (A sequence of another database than the main one has
                // its ranges under a name of its own.)
                let sequence = if lane.main {
                    seq.clone()
                } else {
                    format!("{}:{seq}", lane.database())
                };
                let request = Request::AllocateRange {
                    sequence,
                    node: me,
                    size: block,
                    floor,
                };
                match consensus.propose(request, Duration::from_secs(2)).await {
                    Ok(Response::Range { lo, hi }) => {
                        client
                            .execute(
                                "UPDATE chorus.global_sequence SET next_lo = $2, next_hi = $3 WHERE seq = $1",
                                &[&seq, &lo, &hi],
                            )
                            .await?;
                        tracing::info!(sequence = %seq, lo, hi, "galloc range fetched");
                        has_next = true;
                        wait.active();
                    }
                    Ok(_) => {}
                    // No majority: the current range goes on serving.
                    Err(e) => {
                        tracing::debug!(sequence = %seq, error = %e, "no galloc range yet")
                    }
                }
            }
            if has_next && below(cluster.galloc_switch_percent) {
                client
                    .execute("SELECT chorus.galloc_switch($1)", &[&seq])
                    .await?;
            }
        }
    }
}
