//! The cluster's DDL lease: how DDL that travels in its own transaction's
//! change stream is put in one cluster-wide order.
//!
//! Before the first DDL statement of a transaction reaches its backend, the
//! session takes the lease through Raft (`Request::DdlLease`); the lease
//! numbers the transaction's DDL in the same sequence as the DDL log, and
//! names the last committed DDL. The session then waits until its backend
//! has applied that one, so the DDL runs on the schema every backend will
//! have had before it. Another transaction's DDL, through any node, waits
//! for the lease (up to `ddl_timeout_ms`, then `55P03`), as it would wait
//! for a lock. At the end of the transaction the lease is given back, with
//! whether the DDL committed (read from the backend's `chorus.ddl_history`,
//! written in the same transaction).
//!
//! The backend puts the DDL in the transaction's change stream (see
//! `chorus.capture_ddl`), so peers apply it at its place among the
//! transaction's changes, only if it commits, and a backend that is down
//! gets it when it returns: DDL does not wait for every peer.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use chorus_consensus::{LeaseHolder, ProposeError, Request, Response};

use crate::lane::Lane;
use crate::metrics::GaugeGuard;
use crate::node::Node;

/// Why a transaction's DDL cannot run: a SQLSTATE and a message, which the
/// backend raises in place of the DDL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseRefusal {
    pub code: &'static str,
    pub message: String,
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

fn holder(node: &Node, session: u64) -> LeaseHolder {
    LeaseHolder {
        node: u64::from(node.config.node.id),
        session,
    }
}

/// Take the DDL lease for a transaction of `session` served by `backend`
/// in `lane`'s database, and wait until that backend has the cluster's
/// earlier DDL there. Returns the transaction's DDL number.
pub async fn take(
    node: &Node,
    lane: &Lane,
    session: u64,
    backend: &str,
) -> Result<u64, LeaseRefusal> {
    let (Some(consensus), Some(cluster)) = (node.consensus(), node.config.cluster.as_ref()) else {
        return Err(LeaseRefusal {
            code: "55000",
            message: "this node has no cluster to replicate DDL through".into(),
        });
    };
    let timeout = node.config.ddl_timeout();
    let deadline = Instant::now() + timeout;
    let lock_timeout = node.config.ddl_lock_timeout();
    let lock_deadline = Instant::now() + lock_timeout;
    let me = holder(node, session);
    // Sequences the DDL makes need the node's sequence id, which comes
    // with its registration in the cluster state shortly after it starts.
    while consensus
        .state()
        .read(|s| !s.sequence_ids.contains_key(&me.node))
    {
        if Instant::now() >= deadline {
            return Err(LeaseRefusal {
                code: "55000",
                message: "this node has no sequence id from the cluster yet".into(),
            });
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Counted in `chorus_ddl_lease_waiting` while another transaction
    // holds the lease.
    let mut waiting: Option<GaugeGuard> = None;
    let (seq, after) = loop {
        // Each attempt may wait for a majority up to the DDL timeout; the
        // attempts, while another transaction holds the lease, go on up to
        // the lock timeout.
        let request = Request::DdlLease {
            holder: me,
            now_ms: unix_ms(),
            ttl_ms: cluster.ddl_lease_ms,
            database: Some(lane.database().to_owned()),
        };
        let busy_with = match consensus.propose(request, timeout).await {
            Ok(Response::Lease {
                seq,
                after,
                unknown,
            }) => {
                if let Some(unknown) = unknown {
                    tracing::warn!(seq = unknown, "a DDL lease expired without being given back; its DDL may or may not have committed");
                }
                break (seq, after);
            }
            Ok(Response::LeaseBusy { node: other }) => other,
            Ok(_) => {
                return Err(LeaseRefusal {
                    code: "XX000",
                    message: "unexpected answer from the cluster".into(),
                })
            }
            Err(ProposeError::Timeout(_)) => {
                return Err(LeaseRefusal {
                    code: "40003",
                    message: format!(
                        "DDL not confirmed by a majority of the cluster within {} ms",
                        timeout.as_millis()
                    ),
                })
            }
            Err(ProposeError::Failed(reason)) => {
                return Err(LeaseRefusal {
                    code: "XX000",
                    message: format!("the cluster DDL lease could not be taken: {reason}"),
                })
            }
        };
        if Instant::now() >= lock_deadline {
            return Err(LeaseRefusal {
                code: "55P03",
                message: format!(
                    "could not obtain the cluster DDL lock within {} ms: a transaction with DDL is open through node {}",
                    lock_timeout.as_millis(),
                    busy_with
                ),
            });
        }
        waiting.get_or_insert_with(|| GaugeGuard::new(&node.metrics.ddl_lease_waiting));
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    drop(waiting);
    // The backend gets up to the lock timeout (and at least the DDL
    // timeout from here) to have the earlier DDL. It may just have
    // committed; it comes with its transaction's rows, which a large
    // transaction takes a while to apply: as on one PostgreSQL, where the
    // DDL would wait for that transaction's locks, it waits for them.
    let deadline = lock_deadline.max(Instant::now() + timeout);
    // The DDL must run on the schema the earlier DDL made.
    let config = node.backend(backend);
    if after > 0 {
        loop {
            let index = match &config {
                Some(b) => lane.ddl.backend_index(b).await,
                None => None,
            };
            if index.is_some_and(|i| i >= after) {
                break;
            }
            if Instant::now() >= deadline {
                let _ = give_back(node, lane, session, seq, Some(false), backend).await;
                return Err(LeaseRefusal {
                    code: "55P03",
                    message: format!(
                        "could not obtain the cluster DDL lock within {} ms: backend \"{backend}\" has not applied the cluster's earlier DDL {after} yet",
                        lock_timeout.max(timeout).as_millis()
                    ),
                });
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    Ok(seq)
}

/// Renew the lease of `session` every third of `ddl_lease_ms` while its
/// transaction stays open (a migration can run for longer than the
/// lease); the caller aborts the task when it gives the lease back.
pub fn keep(node: &Node, lane: &Lane, session: u64) -> Option<tokio::task::JoinHandle<()>> {
    let consensus = node.consensus()?.clone();
    let cluster = node.config.cluster.as_ref()?;
    let ttl_ms = cluster.ddl_lease_ms;
    let holder = holder(node, session);
    let database = lane.database().to_owned();
    Some(tokio::spawn(async move {
        let every = Duration::from_millis((ttl_ms / 3).max(1));
        loop {
            tokio::time::sleep(every).await;
            let request = Request::DdlLease {
                holder,
                now_ms: unix_ms(),
                ttl_ms,
                database: Some(database.clone()),
            };
            match consensus.propose(request, every).await {
                Ok(Response::Lease { .. }) => {}
                other => tracing::warn!(answer = ?other, "renewing the DDL lease failed"),
            }
        }
    }))
}

/// Give the lease back at the end of its transaction. `committed`: `None`
/// when not known (the backend is asked). Returns whether it committed.
pub async fn give_back(
    node: &Node,
    lane: &Lane,
    session: u64,
    seq: u64,
    committed: Option<bool>,
    backend: &str,
) -> bool {
    let Some(consensus) = node.consensus() else {
        return false;
    };
    let timeout = node.config.ddl_timeout();
    let committed = match committed {
        Some(c) => c,
        None => match node.backend(backend) {
            Some(b) => lane.ddl.has_seq(&b, seq).await.unwrap_or(false),
            None => false,
        },
    };
    let request = Request::DdlRelease {
        holder: holder(node, session),
        seq,
        committed,
    };
    if let Err(e) = consensus.propose(request, timeout).await {
        // The lease then expires after `ddl_lease_ms`.
        tracing::warn!(seq, error = ?e, "giving back the DDL lease failed");
    }
    committed
}

/// Answer question `question` of a backend session (serving this node's
/// session `session` on `backend`) that asked for the lease in the middle
/// of a statement, for DDL a function runs (see `chorus.ask_lease`): `held`, the
/// number of the lease its transaction holds already (0: none), or a lease
/// taken now. Returns the lease taken now, if any, which the session gives
/// back at the end of its transaction.
pub async fn answer(
    node: &Node,
    lane: &Lane,
    session: u64,
    backend: &str,
    question: u32,
    held: u64,
) -> Option<u64> {
    let (answer, taken) = if held != 0 {
        (Ok(held), None)
    } else {
        match take(node, lane, session, backend).await {
            Ok(seq) => (Ok(seq), Some(seq)),
            Err(refusal) => (Err(refusal), None),
        }
    };
    let written = match node.backend(backend) {
        Some(b) => {
            lane.ddl
                .set_lease_grant(&b, grant_value(question, &answer))
                .await
        }
        None => false,
    };
    if !written {
        // The session gives up waiting after `chorus.lease_wait_ms`.
        tracing::warn!(
            backend,
            question,
            "could not answer a backend session's question for the DDL lease"
        );
    }
    taken
}

/// The value of `chorus.lease_grant` that answers `question`: its number
/// in the high 32 bits; in the low ones the lease's number, or bit 31 and
/// the kind of refusal (see `chorus.ask_lease`).
pub fn grant_value(question: u32, answer: &Result<u64, LeaseRefusal>) -> i64 {
    const REFUSED: i64 = 1 << 31;
    let low = match answer {
        Ok(seq) if *seq < 1 << 31 => i64::try_from(*seq).unwrap_or(REFUSED | 4),
        Ok(_) => REFUSED | 4,
        Err(refusal) => {
            REFUSED
                | match refusal.code {
                    "55P03" => 1,
                    "40003" => 2,
                    "55000" => 3,
                    _ => 4,
                }
        }
    };
    (i64::from(question) << 32) | low
}

/// How long the end of a transaction with DDL waits for the other
/// backends to have it, so that the new schema is usable through any node
/// once the client hears of the commit (as in a single PostgreSQL). A
/// backend that is down or far behind is not waited for (it gets the DDL
/// from the change stream when it can); under commit scope `all` the
/// commit waits for every backend anyway.
pub const PEER_WAIT: Duration = Duration::from_millis(1000);

/// After a committed transaction with DDL `seq`: wait for the other
/// backends (see [`PEER_WAIT`]).
pub async fn wait_for_peers(node: &Node, lane: &Lane, seq: u64) {
    let _ = super::applied_everywhere(node, lane, seq, PEER_WAIT, false).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refused(code: &'static str) -> Result<u64, LeaseRefusal> {
        Err(LeaseRefusal {
            code,
            message: String::new(),
        })
    }

    #[test]
    fn an_answer_carries_its_question_and_the_lease_or_why_not() {
        assert_eq!(grant_value(7, &Ok(12)), (7 << 32) | 12);
        assert_eq!(grant_value(7, &refused("55P03")), (7 << 32) | (1 << 31) | 1);
        assert_eq!(grant_value(7, &refused("40003")), (7 << 32) | (1 << 31) | 2);
        assert_eq!(grant_value(7, &refused("55000")), (7 << 32) | (1 << 31) | 3);
        assert_eq!(grant_value(7, &refused("XX000")), (7 << 32) | (1 << 31) | 4);
        // A lease number the answer cannot carry is a refusal, never cut.
        assert_eq!(grant_value(7, &Ok(1 << 31)), (7 << 32) | (1 << 31) | 4);
        let last = (1u32 << 31) - 1;
        assert!(grant_value(last, &Ok(1)) > 0);
    }
}
