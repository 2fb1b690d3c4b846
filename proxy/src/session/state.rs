//! What the two directions of a relay share: the session's transaction
//! state, answers due, the cluster DDL lease, stamps.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU32, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use rand::RngCore;

use super::stamp::{DdlStage, DdlStamp, StampKind, Swallower};
use crate::backend::LoginParams;
use crate::cluster::ddl::lease as ddl_lease;
use crate::cluster::ddl::lease::LeaseRefusal;
use crate::cluster::ddl::DdlJob;
use crate::lane::Lane;
use crate::metrics::GaugeGuard;
use crate::node::Node;
use crate::scope::{DdlScopeChange, ReadRoutingChange, ScopeChange};
use crate::wire::frontend::FrontendState;
use crate::wire::protocol;
use crate::wire::protocol::ProtocolError;

use super::carried::MOVED_SETTINGS;
use super::pump::PumpSide;
pub(super) use crate::backend::pool::PreparedStatements;

/// How a relay ended.
#[derive(Debug)]
pub(super) enum RelayEnd {
    /// The client sent Terminate or closed its connection.
    ClientDone,
    /// The client broke the protocol.
    ClientProtocol(ProtocolError),
    /// The backend connection ended or failed.
    BackendGone { after_fatal: bool },
    /// The node is shutting down and this session was idle.
    Shutdown,
    /// The health checks found the backend down (it may still hold the
    /// connection open, frozen).
    BackendDown,
    /// The backend is drained for maintenance and the session is idle
    /// between transactions: it moves if nothing of it stays behind (see
    /// `relay::drain_move`).
    BackendDrained,
    /// (Transaction pooling) the transaction ended and both directions
    /// wait for bytes: the connection may go back to the pool.
    Idle,
    /// The backend ended the session with a FATAL of a server going down
    /// (57P01 shutdown or terminate, 57P02 crash, 57P03 not accepting),
    /// held back from the client.
    BackendClosing { code: String, raw: BytesMut },
}

/// Something sent to the backend whose answers are still due, in order.
#[derive(Debug)]
pub(super) enum Pending {
    /// A client's Query, Sync or FunctionCall (sent at this time), answered
    /// by a ReadyForQuery; `wrote` when a stamp went before it (it may
    /// have written); `scope`: commit scope settings it makes, taken when
    /// its ReadyForQuery comes without an error before it (PostgreSQL
    /// drops a failed SET too).
    Ready {
        sent: Instant,
        wrote: bool,
        scope: Vec<ScopeChange>,
    },
    /// A clock stamp of the relay's own, whose answers are swallowed.
    Stamp(Swallower),
    /// A stamp sent in the middle of an extended-protocol batch (see
    /// `client::client_to_backend`) follows the client's messages that get
    /// `until` final answers (see `stamp::ends_an_answer`) in the batch:
    /// its own answers come after those. An error first means the backend
    /// skips the stamp with the rest of the batch.
    Ahead { until: u32 },
    /// A replicated DDL query, being validated (see cluster/ddl/).
    Ddl(DdlJob),
    /// A question of the relay's own (see `client::probe`): its answers
    /// are swallowed, and the first value of its first row goes to `done`.
    Probe {
        value: Option<String>,
        done: Option<tokio::sync::oneshot::Sender<Option<String>>>,
    },
}

/// State shared by the two directions of a relay.
pub(super) struct RelayState {
    pub(super) pending: Mutex<VecDeque<Pending>>,
    /// Stamps in `pending`: while there are any, the backend side looks at
    /// every message, not only ReadyForQuery and errors.
    pub(super) stamps: AtomicU32,
    /// Transaction status from the last ReadyForQuery.
    pub(super) tx_status: AtomicU8,
    /// Whether a stamp went out since the last idle ReadyForQuery.
    pub(super) txn_stamped: AtomicBool,
    /// The session's `chorus.commit_scope` (see scope::encode; 0: the
    /// node's default), and one set with SET LOCAL for the current
    /// transaction.
    pub(super) scope_session: AtomicU8,
    pub(super) scope_local: AtomicU8,
    /// DDL jobs in `pending` (the backend side then looks at everything).
    pub(super) ddl_jobs: AtomicU32,
    /// Probes in `pending` (likewise).
    pub(super) probes: AtomicU32,
    /// `chorus.ddl_scope`: the session's (1: local) and the current
    /// transaction's (0: none, 1: local, 2: cluster).
    pub(super) ddl_scope_session: AtomicU8,
    pub(super) ddl_scope_local: AtomicU8,
    /// Named prepared statements, as sent (see `remember_prepared`);
    /// shared with the pooled connection that has the same (pooled.rs).
    pub(super) prepared: Mutex<Arc<PreparedStatements>>,
    /// Settings the backend reported changed (ParameterStatus) that a
    /// moved session takes along.
    pub(super) reported: Mutex<Vec<(String, String)>>,
    /// The session moved while idle in a transaction block: the client has
    /// not heard yet that its transaction is gone, so a COMMIT must fail
    /// (see `move_session`). Cleared by the next error or idle status.
    pub(super) lost_transaction: AtomicBool,
    /// The session could not leave its drained backend at the last idle
    /// point (state of its own there, a batch under way): it tries again
    /// at its next ReadyForQuery, which clears this.
    pub(super) drain_blocked: AtomicBool,
    /// The cluster DDL lease of the current transaction (see
    /// cluster::ddl::lease): its number, 0 when none.
    pub(super) ddl_lease: AtomicU64,
    /// This session's part of the lease holder's name.
    pub(super) lease_token: u64,
    /// The lease's number went to the backend with a stamp.
    pub(super) lease_stamped: AtomicBool,
    /// The backend session holds DDL settings of a stamp (a lease number or
    /// a refusal) that the next stamp clears.
    pub(super) ddl_settings_sent: AtomicBool,
    /// Why the lease could not be taken, for the stamp to pass on.
    pub(super) lease_refusal: Mutex<Option<LeaseRefusal>>,
    /// The transaction ended: give the lease back before its ReadyForQuery
    /// reaches the client.
    pub(super) lease_release_due: AtomicBool,
    /// Renews the lease while its transaction is open.
    pub(super) lease_keeper: Mutex<Option<tokio::task::JoinHandle<()>>>,
    /// The pid in the client's BackendKeyData, and the pid of the backend
    /// connection serving it now: a notification of the session's own
    /// backend carries the client's (see backend/cancel.rs).
    pub(super) client_pid: AtomicI32,
    pub(super) backend_pid: AtomicI32,
    /// The lane (see cluster/lane.rs) of the session's database when it
    /// replicates; for a session in a local database the main one, which
    /// takes the cluster DDL lease and cluster-wide DDL. None without
    /// replication.
    pub(super) lane: Option<Arc<Lane>>,
    /// Whether the session's database replicates.
    pub(super) replicated_database: bool,
    /// Transaction pooling (see pooled.rs): the session gives its server
    /// connection back between transactions.
    pub(super) pooled: bool,
    /// (Pooled) the backend side forwarded an idle ReadyForQuery.
    pub(super) idle_signal: tokio::sync::Notify,
    /// (Pooled) each direction waits for bytes, with none buffered: a
    /// relay stopped now leaves nothing half-done.
    pub(super) client_reading: AtomicBool,
    pub(super) backend_reading: AtomicBool,
    /// (Pooled) the client sent a statement that may leave session state
    /// (see `chorus_router::may_keep_session_state`) since the connection
    /// was last given back.
    pub(super) session_touched: AtomicBool,
    /// (Pooled) the backend sent an error since the connection was taken:
    /// a Parse may have failed (see `pooled::give_back`).
    pub(super) error_seen: AtomicBool,
    /// (Pooled) `chorus.read_routing`: 0 the node's, 1 home, 2 any.
    pub(super) read_routing: AtomicU8,
    /// (Pooled) where the session's last write transaction committed, and
    /// (once asked, see pooled.rs) a WAL position of that backend at or
    /// after its commit: its reads go where that is.
    pub(super) last_write: Mutex<Option<(String, Option<u64>)>>,
}

/// What the client-to-backend direction keeps across backend connections.
pub(super) struct ClientSide {
    pub(super) pump: PumpSide,
    pub(super) frontend: FrontendState,
    /// The client sent Terminate.
    pub(super) terminated: bool,
    /// Whether the next extended-protocol message starts a batch.
    pub(super) batch_start: bool,
    /// Whether a stamp went to the backend since the last message that a
    /// ReadyForQuery answers.
    pub(super) stamped: bool,
    /// Commit scope settings sent since then.
    pub(super) scope_pending: Vec<ScopeChange>,
    /// Final answers due to the messages of the batch under way (see
    /// `stamp::gets_an_answer`), for a stamp in its middle.
    pub(super) batch_answers: u32,
    /// Messages of the batch under way still to come that its start was
    /// judged on (they were buffered then); those after them came in a
    /// later read, and are judged one by one.
    pub(super) judged_ahead: u32,
    /// Drop extended-protocol messages up to the next Sync (see
    /// `move_session`).
    pub(super) discard_until_sync: bool,
    /// The next message was held for the DDL lease and is seen again: its
    /// statements are counted already.
    pub(super) refeed: bool,
    /// A question for the backend before the held message goes on (see
    /// `client::probe`), and its answer when the message is seen again.
    pub(super) probe_question: Option<String>,
    pub(super) probe_answer: Option<Option<String>>,
    /// The batch under way runs this statement of the DDL log's kind as
    /// its whole work: its Execute is dropped, and the validation follows
    /// its Sync (see `DdlJob::after_batch`).
    pub(super) log_run: Option<String>,
}

impl ClientSide {
    pub(super) fn new() -> ClientSide {
        ClientSide {
            pump: PumpSide::default(),
            frontend: FrontendState::default(),
            terminated: false,
            batch_start: true,
            stamped: false,
            scope_pending: Vec::new(),
            batch_answers: 0,
            judged_ahead: 0,
            discard_until_sync: false,
            refeed: false,
            probe_question: None,
            probe_answer: None,
            log_run: None,
        }
    }
}

impl RelayState {
    /// The relay state of a session in `database`.
    pub(super) fn new(node: Option<&Node>, database: &str, pooled: bool) -> RelayState {
        let own = node.and_then(|n| n.lane(database));
        RelayState {
            pooled,
            idle_signal: tokio::sync::Notify::new(),
            client_reading: AtomicBool::new(false),
            backend_reading: AtomicBool::new(false),
            session_touched: AtomicBool::new(false),
            error_seen: AtomicBool::new(false),
            read_routing: AtomicU8::new(0),
            last_write: Mutex::new(None),
            replicated_database: own.is_some(),
            lane: own.or_else(|| node.and_then(|n| n.main_lane())),
            pending: Mutex::new(VecDeque::new()),
            stamps: AtomicU32::new(0),
            tx_status: AtomicU8::new(b'I'),
            txn_stamped: AtomicBool::new(false),
            scope_session: AtomicU8::new(0),
            scope_local: AtomicU8::new(0),
            ddl_jobs: AtomicU32::new(0),
            probes: AtomicU32::new(0),
            ddl_scope_session: AtomicU8::new(0),
            ddl_scope_local: AtomicU8::new(0),
            prepared: Mutex::new(Arc::default()),
            reported: Mutex::new(Vec::new()),
            lost_transaction: AtomicBool::new(false),
            drain_blocked: AtomicBool::new(false),
            ddl_lease: AtomicU64::new(0),
            lease_token: rand::rng().next_u64(),
            lease_stamped: AtomicBool::new(false),
            ddl_settings_sent: AtomicBool::new(false),
            lease_refusal: Mutex::new(None),
            lease_release_due: AtomicBool::new(false),
            lease_keeper: Mutex::new(None),
            client_pid: AtomicI32::new(0),
            backend_pid: AtomicI32::new(0),
        }
    }

    /// The lease is held now (number `seq`).
    pub(super) fn lease_taken(&self, node: &Node, seq: u64) {
        self.ddl_lease.store(seq, Ordering::SeqCst);
        self.lease_stamped.store(false, Ordering::SeqCst);
        if let Ok(mut keeper) = self.lease_keeper.lock() {
            *keeper = self
                .lane
                .as_ref()
                .and_then(|lane| ddl_lease::keep(node, lane, self.lease_token));
        }
    }

    /// The lease is let go of (given back or about to be): its number,
    /// 0 when none was held.
    pub(super) fn lease_dropped(&self) -> u64 {
        if let Some(keeper) = self.lease_keeper.lock().ok().and_then(|mut k| k.take()) {
            keeper.abort();
        }
        self.lease_stamped.store(false, Ordering::SeqCst);
        self.ddl_lease.swap(0, Ordering::SeqCst)
    }

    /// Whether a transaction's DDL must take the cluster DDL lease first
    /// (no lease yet, no refusal to pass on, not in a failed block).
    pub(super) fn needs_lease(&self) -> bool {
        self.ddl_lease.load(Ordering::SeqCst) == 0
            && self.tx_status.load(Ordering::Relaxed) != b'E'
            && self.lease_refusal.lock().is_ok_and(|r| r.is_none())
    }

    /// The transaction holds the cluster DDL lease, and no stamp has told
    /// the backend its number yet.
    pub(super) fn lease_unstamped(&self) -> bool {
        self.ddl_lease.load(Ordering::SeqCst) != 0 && !self.lease_stamped.load(Ordering::SeqCst)
    }

    /// What a stamp must tell the backend about DDL now, if anything:
    /// `stage` for a simple query with DDL.
    pub(super) fn ddl_stamp(&self, node: &Node, stage: Option<DdlStage>) -> Option<DdlStamp> {
        let lease = self.ddl_lease.load(Ordering::SeqCst);
        let refusal = self.lease_refusal.lock().ok().and_then(|mut r| r.take());
        let fresh_lease = lease != 0 && !self.lease_stamped.load(Ordering::SeqCst);
        let stale = lease == 0 && self.ddl_settings_sent.load(Ordering::SeqCst);
        if stage.is_none() && refusal.is_none() && !fresh_lease && !stale {
            return None;
        }
        let cluster = node.config.cluster.as_ref();
        Some(DdlStamp {
            seq: (lease != 0).then_some(lease),
            refusal: refusal.map(|r| (r.code, r.message)),
            stage,
            sequence_kind: cluster
                .map_or("snowflake", |c| c.sequence_kind.as_str())
                .to_owned(),
            galloc_block: cluster
                .map_or(crate::config::DEFAULT_GALLOC_RANGE, |c| c.galloc_range_size),
            sequence_id: node.consensus().and_then(|c| {
                let me = u64::from(node.config.node.id);
                c.state().read(|s| s.sequence_ids.get(&me).copied())
            }),
            record_staged: false,
        })
    }

    /// A rollback to a savepoint undoes the settings a stamp made after the
    /// savepoint (even session-level ones): the transaction's next write
    /// or DDL gets a stamp again, with the lease's number if it holds one.
    pub(super) fn stamp_undone(&self) {
        self.txn_stamped.store(false, Ordering::Relaxed);
        self.lease_stamped.store(false, Ordering::SeqCst);
    }

    /// The backend session still holds the number of a lease given back
    /// (or a refusal): the next statement, whatever it is, gets a stamp
    /// that clears it, so that DDL a function runs there cannot pass for
    /// one under the lease.
    pub(super) fn ddl_settings_stale(&self) -> bool {
        self.ddl_lease.load(Ordering::SeqCst) == 0 && self.ddl_settings_sent.load(Ordering::SeqCst)
    }

    /// Note that a stamp with these DDL settings went out.
    pub(super) fn ddl_stamp_sent(&self, ddl: &DdlStamp) {
        if ddl.seq.is_some() {
            self.lease_stamped.store(true, Ordering::SeqCst);
        }
        self.ddl_settings_sent
            .store(ddl.seq.is_some() || ddl.refusal.is_some(), Ordering::SeqCst);
    }

    /// Note a ParameterStatus of the backend's.
    pub(super) fn report(&self, body: &[u8]) {
        let Ok((name, rest)) = protocol::read_cstr(body) else {
            return;
        };
        if !MOVED_SETTINGS.contains(&name) {
            return;
        }
        let Ok((value, _)) = protocol::read_cstr(rest) else {
            return;
        };
        if let Ok(mut reported) = self.reported.lock() {
            reported.retain(|(n, _)| n != name);
            reported.push((name.to_owned(), value.to_owned()));
        }
    }

    /// Whether DDL now runs on this node's backend only.
    pub(super) fn ddl_is_local(&self) -> bool {
        match self.ddl_scope_local.load(Ordering::Relaxed) {
            1 => true,
            2 => false,
            _ => self.ddl_scope_session.load(Ordering::Relaxed) == 1,
        }
    }

    pub(super) fn apply_read_routing(&self, changes: &[ReadRoutingChange]) {
        for change in changes {
            let value = match change {
                ReadRoutingChange::Session(any) => 1 + u8::from(*any),
                ReadRoutingChange::Reset => 0,
                ReadRoutingChange::Invalid => continue,
            };
            self.read_routing.store(value, Ordering::Relaxed);
        }
    }

    /// Whether the session's read-only transactions may run on any
    /// backend that has its last write (`default`: the node's setting).
    pub(super) fn reads_anywhere(&self, default: bool) -> bool {
        match self.read_routing.load(Ordering::Relaxed) {
            1 => false,
            2 => true,
            _ => default,
        }
    }

    pub(super) fn apply_ddl_scope(&self, changes: &[DdlScopeChange]) {
        for change in changes {
            match *change {
                DdlScopeChange::Session(local) => self
                    .ddl_scope_session
                    .store(u8::from(local), Ordering::Relaxed),
                DdlScopeChange::Local(local) => self
                    .ddl_scope_local
                    .store(if local { 1 } else { 2 }, Ordering::Relaxed),
                DdlScopeChange::Reset => {
                    self.ddl_scope_session.store(0, Ordering::Relaxed);
                    self.ddl_scope_local.store(0, Ordering::Relaxed);
                }
                DdlScopeChange::Invalid => {}
            }
        }
    }
}

/// What a session keeps to move to another backend when its own fails.
pub(super) struct Session {
    pub(super) user: String,
    pub(super) database: String,
    /// The client's startup parameters, as sent to the backend.
    pub(super) params: Vec<(String, String)>,
    pub(super) backend_name: String,
    pub(super) cancel_key: crate::backend::cancel::CancelKey,
    /// Counts the session in its backend's connections.
    pub(super) backend_open: Option<GaugeGuard>,
    /// The password the session's logins to backends use (the user's, as
    /// configured when the session started).
    pub(super) password: Option<String>,
    /// Under transaction pooling: what follows the session from one server
    /// connection to the next.
    pub(super) pooled: Option<super::carried::Pooled>,
}

impl RelayState {
    /// Keep the named statements a client prepares (as sent to the
    /// backend), so that a session moved to another backend has them there
    /// too.
    pub(super) fn remember_prepared(&self, tag: u8, body: &[u8]) {
        let name = |body: &[u8]| {
            protocol::read_cstr(body)
                .map_or("", |(name, _)| name)
                .to_owned()
        };
        match tag {
            b'P' => {
                let name = name(body);
                if !name.is_empty() {
                    let mut message = BytesMut::with_capacity(body.len() + 5);
                    protocol::write_message(&mut message, b'P', |m| m.extend_from_slice(body));
                    if let Ok(mut prepared) = self.prepared.lock() {
                        Arc::make_mut(&mut prepared).insert(name, message);
                    }
                }
            }
            b'C' if body.first() == Some(&b'S') => {
                if let Ok(mut prepared) = self.prepared.lock() {
                    let name = name(&body[1..]);
                    if prepared.contains_key(&name) {
                        Arc::make_mut(&mut prepared).remove(&name);
                    }
                }
            }
            _ => {}
        }
    }

    /// A client's Query, Sync or FunctionCall went to the backend: its
    /// ReadyForQuery is due (`wrote`: a stamp went before it; `scope`: the
    /// commit scope settings it makes).
    pub(super) fn push_ready(&self, wrote: bool, scope: Vec<ScopeChange>) {
        if let Ok(mut pending) = self.pending.lock() {
            pending.push_back(Pending::Ready {
                sent: Instant::now(),
                wrote,
                scope,
            });
        }
    }

    /// A stamp's answers are due next; `after`: for a stamp in the middle
    /// of a batch, once the batch's earlier messages got that many final
    /// answers.
    pub(super) fn push_stamp(&self, kind: StampKind, after: Option<u32>) {
        if let Ok(mut pending) = self.pending.lock() {
            // (Counted first: the backend side then looks at every
            // message, and finds the queue whole.)
            self.stamps.fetch_add(1, Ordering::SeqCst);
            if let Some(until) = after {
                pending.push_back(Pending::Ahead { until });
            }
            pending.push_back(Pending::Stamp(Swallower::new(kind)));
        }
    }

    /// Whether nothing is in flight on the session's backend: the last
    /// ReadyForQuery said idle, and no answer is due.
    pub(super) fn idle(&self) -> bool {
        self.tx_status.load(Ordering::Relaxed) == b'I'
            && self.pending.lock().map(|p| p.is_empty()).unwrap_or(false)
    }
}

impl Session {
    /// The login this session makes to a backend at `address`, with these
    /// startup parameters.
    pub(super) fn login<'a>(
        &'a self,
        address: &'a str,
        tls: Option<&'a crate::backend::BackendTls>,
        params: &'a [(String, String)],
    ) -> LoginParams<'a> {
        LoginParams {
            address,
            tls,
            user: &self.user,
            password: self.password.as_deref(),
            database: &self.database,
            params,
        }
    }
}

/// How long a session whose backend failed tries to get another one.
pub(super) const MOVE_LIMIT: Duration = Duration::from_secs(5);
