//! What the Raft log carries and what its state machine holds.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Cursor;

use serde::{Deserialize, Serialize};

openraft::declare_raft_types!(
    /// The Chorus cluster's Raft type configuration.
    pub TypeConfig:
        D = Request,
        R = Response,
        NodeId = u64,
        Node = openraft::BasicNode,
        Entry = openraft::Entry<TypeConfig>,
        SnapshotData = Cursor<Vec<u8>>,
);

/// A command proposed to the cluster.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Request {
    /// Run a DDL statement on every backend, in log order.
    Ddl(DdlProposal),
    /// Record (or update) what the cluster knows of a node; a node seen for
    /// the first time gets its sequence id.
    RegisterNode { id: u64, info: NodeInfo },
    /// Make `backend` the write leader (write-leader routing), if the
    /// current one is still `expected` (so two nodes that saw the same
    /// failure do not move it twice).
    SetWriteLeader {
        backend: String,
        expected: Option<String>,
    },
    /// Allocate the next range of `size` values of a galloc sequence to a
    /// node; a sequence's first allocation starts at `floor`.
    AllocateRange {
        sequence: String,
        node: u64,
        size: i64,
        floor: i64,
    },
    /// Hand the replication duties of `backend` (streaming its changes to
    /// the other backends, applying the DDL log to it) to `node`, if
    /// `expected` still has them. Each hand-over gets a new epoch, which
    /// fences the previous driver.
    SetDriver {
        backend: String,
        node: u64,
        expected: u64,
    },
    /// Take the cluster's DDL lease for one transaction of `holder`: DDL
    /// runs under it in one cluster-wide order. Granted when no other
    /// holder has an unexpired lease (`now_ms`, the proposer's clock, is
    /// compared with the lease's expiry), and then numbered with the next
    /// DDL sequence number. A holder that asks again keeps its number.
    DdlLease {
        holder: LeaseHolder,
        now_ms: u64,
        ttl_ms: u64,
        /// The database the holder's DDL runs in (`None` from a node that
        /// did not say: the replicated database of old).
        #[serde(default)]
        database: Option<String>,
    },
    /// Drain a backend for maintenance (`drained`), or take it back: no
    /// new session goes to a drained backend, and every node moves its
    /// sessions off it at their next transaction boundary. Replication to
    /// and from it goes on.
    SetDrained { backend: String, drained: bool },
    /// Mark a backend as being copied again from a peer (`copying`), or
    /// done: while it is, no session goes to it, its changes are not
    /// streamed, no stream applies to it and no node applies the DDL log
    /// to it (the copy brings its place in each; see the proxy's
    /// cluster/rejoin.rs).
    SetCopying { backend: String, copying: bool },
    /// Give the lease back; `committed` says whether its DDL committed
    /// (then later DDL is ordered after it).
    DdlRelease {
        holder: LeaseHolder,
        seq: u64,
        committed: bool,
    },
}

/// Who holds the DDL lease: a node and one of its sessions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseHolder {
    pub node: u64,
    pub session: u64,
}

/// The cluster's DDL lease.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct DdlLease {
    pub holder: LeaseHolder,
    /// The DDL sequence number of the holder's transaction.
    pub seq: u64,
    /// Proposer clock, milliseconds since the Unix epoch.
    pub expires_ms: u64,
}

/// A replicated DDL statement, as validated on its origin.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DdlProposal {
    /// Unique per proposal: a proposal retried after a lost answer (for
    /// example when the leader died) is recognised and not logged twice.
    pub id: String,
    /// The client's query string (one or more DDL statements).
    pub sql: String,
    /// The origin session's `search_path`.
    pub search_path: String,
    /// The origin session's `current_user`, which the DDL runs as.
    pub role: String,
    /// The node the client sent it to.
    pub origin: u64,
    /// False for statements that cannot run inside a transaction block
    /// (`CREATE INDEX CONCURRENTLY`, …): they are applied on their own.
    pub transactional: bool,
    /// The kind new bigint sequences of this DDL become (`snowflake` or
    /// `galloc`); int and smallint ones are always galloc.
    #[serde(default)]
    pub sequence_kind: Option<String>,
    /// The galloc range size for new sequences (the same on every backend
    /// for a given sequence, so their ranges can be told apart).
    #[serde(default)]
    pub galloc_block: Option<i64>,
    /// A number taken by a DDL lease: that DDL travels in its
    /// transaction's own change stream, not through this log (appliers
    /// skip the entry; see `Request::DdlLease`).
    #[serde(default)]
    pub in_stream: bool,
    /// The origin session's settings the statement depends on, as a JSON
    /// object (see `chorus.ddl_settings` in the proxy's sql/ddl.sql);
    /// `None` from a node that did not send them.
    #[serde(default)]
    pub settings: Option<String>,
    /// The database the DDL is applied in; `None` for cluster-wide objects
    /// (roles, databases, tablespaces), which are applied in
    /// `replication.database`, as every entry was before databases were
    /// named.
    #[serde(default)]
    pub database: Option<String>,
}

/// A DDL statement in the cluster's DDL log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DdlEntry {
    /// Position in the DDL log, from 1, without gaps.
    pub seq: u64,
    pub proposal: DdlProposal,
    /// The last committed DDL before this one: a backend applies this
    /// entry only once it has that one.
    #[serde(default)]
    pub after: u64,
}

/// A node's life-cycle state in the cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NodeState {
    Joining,
    Active,
    Draining,
    Down,
    Parted,
}

impl NodeState {
    /// Its name, as in the serialised state.
    pub fn as_str(self) -> &'static str {
        match self {
            NodeState::Joining => "joining",
            NodeState::Active => "active",
            NodeState::Draining => "draining",
            NodeState::Down => "down",
            NodeState::Parted => "parted",
        }
    }
}

/// What the cluster knows of one Chorus node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeInfo {
    /// Where its Raft RPC listens.
    pub raft_addr: String,
    /// Where its clients connect.
    pub listen: String,
    /// The backend it is responsible for.
    pub home_backend: String,
    pub state: NodeState,
}

/// The answer to a committed [`Request`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Response {
    /// The DDL's place in the DDL log; `duplicate` when the same proposal
    /// was already logged (its first place is returned).
    Ddl { seq: u64, duplicate: bool },
    /// A galloc range, both ends included.
    Range { lo: i64, hi: i64 },
    /// The DDL lease is granted: the holder's DDL is number `seq`, and
    /// runs once its backend has applied DDL `after` (the last committed
    /// one). `unknown`: an expired lease whose outcome was never reported
    /// (its holder died); it may have committed.
    Lease {
        seq: u64,
        after: u64,
        unknown: Option<u64>,
    },
    /// Another holder has the DDL lease.
    LeaseBusy { node: u64 },
    /// Done, nothing to report.
    Done,
}

/// The replicated cluster state: what every node agrees on. Later parts of
/// Chorus (sequence allocations, the write leader, replication duties) add
/// their fields here.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterState {
    pub nodes: BTreeMap<u64, NodeInfo>,
    /// Each node's sequence id (1..=1023): the low 10 bits of its snowflake
    /// ids and its initial galloc block. Given once, never reused.
    #[serde(default)]
    pub sequence_ids: BTreeMap<u64, u16>,
    /// Per galloc sequence, the first value not yet allocated.
    #[serde(default)]
    pub galloc_next: BTreeMap<String, i64>,
    /// The backend every write goes to under write-leader routing.
    #[serde(default)]
    pub write_leader: Option<String>,
    /// The DDL log, in order (`ddl[i].seq == i + 1`).
    pub ddl: Vec<DdlEntry>,
    /// Backends whose duties were handed over (see `driver_of`).
    #[serde(default)]
    pub drivers: BTreeMap<String, Driver>,
    /// The last epoch handed out.
    #[serde(default)]
    pub driver_epoch: u64,
    /// The DDL lease, while a transaction with DDL is open somewhere.
    #[serde(default)]
    pub ddl_lease: Option<DdlLease>,
    /// The last DDL known committed (log entries, and leases released as
    /// committed).
    #[serde(default)]
    pub ddl_last: u64,
    /// The backends drained for maintenance (see `Request::SetDrained`).
    #[serde(default)]
    pub drained: BTreeSet<String>,
    /// The backends being copied again (see `Request::SetCopying`).
    #[serde(default)]
    pub copying: BTreeSet<String>,
}

/// Where sessions may go: what of the cluster state every node's sessions
/// follow (see `Shared::routing`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Routing {
    /// The backends drained for maintenance.
    pub drained: BTreeSet<String>,
    /// The backends being copied again: no session, no stream.
    pub copying: BTreeSet<String>,
    /// The write leader (write-leader routing).
    pub write_leader: Option<String>,
}

/// The node that drives a backend's replication, and since which hand-over.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Driver {
    pub node: u64,
    pub epoch: u64,
}

impl ClusterState {
    /// Apply one command.
    pub fn apply(&mut self, request: &Request) -> Response {
        match request {
            Request::Ddl(proposal) => {
                // Retried proposals arrive close to the first one: look back
                // from the end.
                if let Some(known) = self.ddl.iter().rev().find(|e| e.proposal.id == proposal.id) {
                    return Response::Ddl {
                        seq: known.seq,
                        duplicate: true,
                    };
                }
                let seq = self.ddl.len() as u64 + 1;
                self.ddl.push(DdlEntry {
                    seq,
                    proposal: proposal.clone(),
                    after: self.ddl_last,
                });
                self.ddl_last = seq;
                Response::Ddl {
                    seq,
                    duplicate: false,
                }
            }
            Request::RegisterNode { id, info } => {
                self.nodes.insert(*id, info.clone());
                if !self.sequence_ids.contains_key(id) {
                    // The node's own id when no node ever had it (so node 1
                    // hands out the first galloc range, 1, 2, 3, …, as one
                    // PostgreSQL would), else the next never used.
                    let own = u16::try_from(*id)
                        .ok()
                        .filter(|own| (1..=1023).contains(own))
                        .filter(|own| !self.sequence_ids.values().any(|used| used == own));
                    let next = own
                        .unwrap_or_else(|| self.sequence_ids.values().max().map_or(1, |m| m + 1));
                    // Ids run out after 1023 nodes ever; later nodes get none
                    // and cannot hand out global sequence values.
                    if next <= 1023 {
                        self.sequence_ids.insert(*id, next);
                    }
                }
                Response::Done
            }
            Request::SetWriteLeader { backend, expected } => {
                if self.write_leader == *expected {
                    self.write_leader = Some(backend.clone());
                }
                Response::Done
            }
            Request::AllocateRange {
                sequence,
                size,
                floor,
                ..
            } => {
                let next = self.galloc_next.entry(sequence.clone()).or_insert(*floor);
                let lo = (*next).max(*floor);
                let hi = lo.saturating_add(size.saturating_sub(1).max(0));
                *next = hi.saturating_add(1);
                Response::Range { lo, hi }
            }
            Request::SetDriver {
                backend,
                node,
                expected,
            } => {
                if self.driver_of(backend).map(|d| d.node) == Some(*expected) {
                    self.driver_epoch += 1;
                    self.drivers.insert(
                        backend.clone(),
                        Driver {
                            node: *node,
                            epoch: self.driver_epoch,
                        },
                    );
                }
                Response::Done
            }
            Request::DdlLease {
                holder,
                now_ms,
                ttl_ms,
                database,
            } => self.lease(*holder, *now_ms, *ttl_ms, database.clone()),
            Request::SetDrained { backend, drained } => {
                if *drained {
                    self.drained.insert(backend.clone());
                } else {
                    self.drained.remove(backend);
                }
                Response::Done
            }
            Request::SetCopying { backend, copying } => {
                if *copying {
                    self.copying.insert(backend.clone());
                } else {
                    self.copying.remove(backend);
                }
                Response::Done
            }
            Request::DdlRelease {
                holder,
                seq,
                committed,
            } => {
                if *committed {
                    self.ddl_last = self.ddl_last.max(*seq);
                }
                if self
                    .ddl_lease
                    .is_some_and(|l| l.holder == *holder && l.seq == *seq)
                {
                    self.ddl_lease = None;
                }
                Response::Done
            }
        }
    }

    fn lease(
        &mut self,
        holder: LeaseHolder,
        now_ms: u64,
        ttl_ms: u64,
        database: Option<String>,
    ) -> Response {
        let expires_ms = now_ms.saturating_add(ttl_ms);
        let mut unknown = None;
        match &mut self.ddl_lease {
            Some(lease) if lease.holder == holder => {
                lease.expires_ms = lease.expires_ms.max(expires_ms);
                return Response::Lease {
                    seq: lease.seq,
                    after: self.ddl_last,
                    unknown: None,
                };
            }
            Some(lease) if lease.expires_ms > now_ms => {
                return Response::LeaseBusy {
                    node: lease.holder.node,
                };
            }
            Some(lease) => unknown = Some(lease.seq),
            None => {}
        }
        let seq = self.ddl.len() as u64 + 1;
        self.ddl.push(DdlEntry {
            seq,
            proposal: DdlProposal {
                id: format!("lease-{}-{}-{seq}", holder.node, holder.session),
                sql: String::new(),
                search_path: String::new(),
                role: String::new(),
                origin: holder.node,
                transactional: true,
                sequence_kind: None,
                galloc_block: None,
                in_stream: true,
                settings: None,
                database,
            },
            after: self.ddl_last,
        });
        self.ddl_lease = Some(DdlLease {
            holder,
            seq,
            expires_ms,
        });
        Response::Lease {
            seq,
            after: self.ddl_last,
            unknown,
        }
    }

    /// The node whose home `backend` is.
    /// (A node removed from the cluster is no backend's owner.)
    pub fn owner_of(&self, backend: &str) -> Option<u64> {
        self.nodes
            .iter()
            .find(|(_, info)| info.home_backend == backend && info.state != NodeState::Parted)
            .map(|(id, _)| *id)
    }

    /// Who drives `backend`: the node it was handed to, else the node
    /// whose home it is (epoch 0).
    pub fn driver_of(&self, backend: &str) -> Option<Driver> {
        self.drivers
            .get(backend)
            .copied()
            .or_else(|| self.owner_of(backend).map(|node| Driver { node, epoch: 0 }))
    }

    pub fn ddl_seq(&self) -> u64 {
        self.ddl.len() as u64
    }

    /// Where sessions may go now.
    pub fn routing(&self) -> Routing {
        Routing {
            drained: self.drained.clone(),
            copying: self.copying.clone(),
            write_leader: self.write_leader.clone(),
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn a_parted_node_owns_no_backend() {
        let mut state = ClusterState::default();
        let info = NodeInfo {
            raft_addr: String::new(),
            listen: String::new(),
            home_backend: "pg4".into(),
            state: NodeState::Active,
        };
        state.apply(&Request::RegisterNode {
            id: 4,
            info: info.clone(),
        });
        assert_eq!(state.owner_of("pg4"), Some(4));
        assert_eq!(state.driver_of("pg4").map(|d| d.node), Some(4));
        let sequence_id = state.sequence_ids.get(&4).copied();
        state.apply(&Request::RegisterNode {
            id: 4,
            info: NodeInfo {
                state: NodeState::Parted,
                ..info
            },
        });
        assert_eq!(state.owner_of("pg4"), None);
        assert_eq!(state.driver_of("pg4"), None);
        // (Its sequence id stays taken.)
        assert_eq!(state.sequence_ids.get(&4).copied(), sequence_id);
    }

    #[test]
    fn node_states_are_named_as_serialised() {
        use NodeState::*;
        for state in [Joining, Active, Draining, Down, Parted] {
            assert_eq!(
                serde_json::to_string(&state).unwrap(),
                format!("\"{}\"", state.as_str())
            );
        }
    }

    fn proposal(id: &str) -> DdlProposal {
        DdlProposal {
            id: id.into(),
            sql: "CREATE TABLE t ()".into(),
            search_path: "public".into(),
            role: "postgres".into(),
            origin: 1,
            transactional: true,
            sequence_kind: None,
            galloc_block: None,
            in_stream: false,
            settings: None,
            database: None,
        }
    }

    #[test]
    fn the_ddl_lease_excludes_other_holders_until_released_or_expired() {
        let mut state = ClusterState::default();
        let a = LeaseHolder {
            node: 1,
            session: 7,
        };
        let b = LeaseHolder {
            node: 2,
            session: 9,
        };
        let lease = |state: &mut ClusterState, holder, now_ms| {
            state.apply(&Request::DdlLease {
                holder,
                now_ms,
                ttl_ms: 1000,
                database: None,
            })
        };
        state.apply(&Request::Ddl(proposal("x")));
        assert_eq!(
            lease(&mut state, a, 0),
            Response::Lease {
                seq: 2,
                after: 1,
                unknown: None
            }
        );
        // Asking again keeps the number; another holder waits.
        assert_eq!(
            lease(&mut state, a, 10),
            Response::Lease {
                seq: 2,
                after: 1,
                unknown: None
            }
        );
        assert_eq!(lease(&mut state, b, 500), Response::LeaseBusy { node: 1 });
        // A rolled-back transaction's number is skipped by what follows.
        state.apply(&Request::DdlRelease {
            holder: a,
            seq: 2,
            committed: false,
        });
        assert_eq!(
            lease(&mut state, b, 600),
            Response::Lease {
                seq: 3,
                after: 1,
                unknown: None
            }
        );
        state.apply(&Request::DdlRelease {
            holder: b,
            seq: 3,
            committed: true,
        });
        assert_eq!(state.ddl_last, 3);
        // A log entry is ordered after the committed lease.
        state.apply(&Request::Ddl(proposal("y")));
        assert_eq!(state.ddl[3].after, 3);
        assert!(state.ddl[2].proposal.in_stream);
        // An expired lease is taken over, its outcome unknown.
        assert!(matches!(
            lease(&mut state, a, 700),
            Response::Lease { seq: 5, .. }
        ));
        assert_eq!(
            lease(&mut state, b, 5000),
            Response::Lease {
                seq: 6,
                after: 4,
                unknown: Some(5)
            }
        );
    }

    #[test]
    fn ddl_is_numbered_in_order_and_a_retried_proposal_is_logged_once() {
        let mut state = ClusterState::default();
        let first = state.apply(&Request::Ddl(proposal("a")));
        let second = state.apply(&Request::Ddl(proposal("b")));
        let again = state.apply(&Request::Ddl(proposal("a")));
        assert_eq!(
            first,
            Response::Ddl {
                seq: 1,
                duplicate: false
            }
        );
        assert_eq!(
            second,
            Response::Ddl {
                seq: 2,
                duplicate: false
            }
        );
        assert_eq!(
            again,
            Response::Ddl {
                seq: 1,
                duplicate: true
            }
        );
        assert_eq!(state.ddl_seq(), 2);
    }

    #[test]
    fn duties_move_only_from_the_expected_driver_and_every_move_has_a_new_epoch() {
        let mut state = ClusterState::default();
        state.apply(&Request::RegisterNode {
            id: 1,
            info: NodeInfo {
                raft_addr: String::new(),
                listen: String::new(),
                home_backend: "pg1".into(),
                state: NodeState::Active,
            },
        });
        assert_eq!(state.driver_of("pg1"), Some(Driver { node: 1, epoch: 0 }));
        assert_eq!(state.driver_of("pg9"), None);
        let set = |state: &mut ClusterState, node, expected| {
            state.apply(&Request::SetDriver {
                backend: "pg1".into(),
                node,
                expected,
            })
        };
        // A proposal made on a stale view changes nothing.
        set(&mut state, 2, 3);
        assert_eq!(state.driver_of("pg1"), Some(Driver { node: 1, epoch: 0 }));
        set(&mut state, 2, 1);
        assert_eq!(state.driver_of("pg1"), Some(Driver { node: 2, epoch: 1 }));
        set(&mut state, 1, 2);
        assert_eq!(state.driver_of("pg1"), Some(Driver { node: 1, epoch: 2 }));
    }

    #[test]
    fn sequence_ids_are_never_reused_and_ranges_never_overlap() {
        let mut state = ClusterState::default();
        let info = NodeInfo {
            raft_addr: String::new(),
            listen: String::new(),
            home_backend: "pg".into(),
            state: NodeState::Active,
        };
        for id in [5, 9, 5, 2000, 3] {
            state.apply(&Request::RegisterNode {
                id,
                info: info.clone(),
            });
        }
        // A node's own id when free, else the next never used.
        assert_eq!(state.sequence_ids.get(&5), Some(&5));
        assert_eq!(state.sequence_ids.get(&9), Some(&9));
        assert_eq!(state.sequence_ids.get(&2000), Some(&10));
        assert_eq!(state.sequence_ids.get(&3), Some(&3));
        state.sequence_ids.insert(7, 11);
        state.apply(&Request::RegisterNode {
            id: 11,
            info: info.clone(),
        });
        assert_eq!(state.sequence_ids.get(&11), Some(&12));
        let range = |state: &mut ClusterState, node| {
            state.apply(&Request::AllocateRange {
                sequence: "public.t_id_seq".into(),
                node,
                size: 100,
                floor: 1001,
            })
        };
        assert_eq!(range(&mut state, 5), Response::Range { lo: 1001, hi: 1100 });
        assert_eq!(range(&mut state, 9), Response::Range { lo: 1101, hi: 1200 });
    }
}
