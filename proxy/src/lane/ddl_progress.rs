//! How far the DDL log is applied: on the home backend (a watch the
//! sessions wait on), on every backend (read from it), and what became of
//! each DDL statement that came through this node (see cluster/ddl).

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use bytes::{BufMut, BytesMut};
use tokio::sync::watch;

use crate::backend::ControlPool;
use crate::config::BackendConfig;
use crate::wire::protocol;

/// A PostgreSQL error, as the applying backend reported it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PgError {
    pub code: String,
    pub message: String,
    pub detail: Option<String>,
    pub hint: Option<String>,
}

impl PgError {
    pub(crate) fn from_db(e: &tokio_postgres::error::DbError) -> PgError {
        PgError {
            code: e.code().code().to_owned(),
            message: e.message().to_owned(),
            detail: e.detail().map(str::to_owned),
            hint: e.hint().map(str::to_owned),
        }
    }

    pub(crate) fn write(&self, out: &mut BytesMut) {
        protocol::write_message(out, b'E', |body| {
            let mut put = |field: u8, value: &str| {
                body.put_u8(field);
                body.extend_from_slice(value.as_bytes());
                body.put_u8(0);
            };
            put(b'S', "ERROR");
            put(b'V', "ERROR");
            put(b'C', &self.code);
            put(b'M', &self.message);
            if let Some(detail) = &self.detail {
                put(b'D', detail);
            }
            if let Some(hint) = &self.hint {
                put(b'H', hint);
            }
            body.put_u8(0);
        });
    }
}

/// How far the DDL log has been applied in one database (a lane, see
/// lane.rs) on this node's home backend, and what became of the DDL that
/// came through this node.
#[derive(Debug)]
pub struct DdlProgress {
    applied: watch::Sender<u64>,
    outcomes: Mutex<HashMap<u64, Outcome>>,
    /// The lane's control connections, to see how far each backend has
    /// applied.
    control: Arc<ControlPool>,
}

/// What became of a DDL statement on its origin's home backend.
#[derive(Debug, Default)]
pub(crate) struct Outcome {
    /// Its error, when it failed there.
    pub(crate) failure: Option<PgError>,
    /// The notices it raised there (NoticeResponse messages), for the
    /// client: `DROP … IF EXISTS` of what is not there, and the like.
    pub(crate) notices: BytesMut,
}

/// Outcomes kept for sessions that have not collected them (a session
/// that timed out never does).
const MAX_OUTCOMES: usize = 10_000;

impl DdlProgress {
    pub(crate) fn new(control: Arc<ControlPool>) -> DdlProgress {
        DdlProgress {
            applied: watch::channel(0).0,
            outcomes: Mutex::new(HashMap::new()),
            control,
        }
    }

    pub(crate) fn set_applied(&self, seq: u64) {
        self.applied.send_replace(seq);
    }

    pub(crate) fn record(&self, seq: u64, outcome: Outcome) {
        if let Ok(mut outcomes) = self.outcomes.lock() {
            if outcomes.len() >= MAX_OUTCOMES {
                outcomes.clear();
            }
            outcomes.insert(seq, outcome);
        }
    }

    pub(crate) fn take(&self, seq: u64) -> Outcome {
        self.outcomes
            .lock()
            .ok()
            .and_then(|mut o| o.remove(&seq))
            .unwrap_or_default()
    }

    /// Wait until the home backend applied `seq`; false on timeout.
    /// How far the home backend has applied the log in this database.
    pub(crate) fn applied(&self) -> u64 {
        *self.applied.borrow()
    }

    pub(crate) async fn wait_applied(&self, seq: u64, limit: Duration) -> bool {
        let mut rx = self.applied.subscribe();
        tokio::time::timeout(limit, rx.wait_for(|a| *a >= seq))
            .await
            .is_ok_and(|r| r.is_ok())
    }

    /// Whether a backend has DDL `seq` (`None` when unreachable).
    pub(crate) async fn has_seq(&self, backend: &BackendConfig, seq: u64) -> Option<bool> {
        let seq = i64::try_from(seq).ok()?;
        let rows = self
            .control
            .query(
                backend,
                Duration::from_secs(2),
                "SELECT EXISTS (SELECT 1 FROM chorus.ddl_history WHERE seq = $1)",
                &[&seq],
            )
            .await
            .ok()?;
        Some(rows.first()?.get(0))
    }

    /// The DDL index of a backend, read from it (`None` when unreachable).
    pub(crate) async fn backend_index(&self, backend: &BackendConfig) -> Option<u64> {
        let rows = self
            .control
            .query(backend, Duration::from_secs(2), INDEX_SQL, &[])
            .await
            .ok()?;
        u64::try_from(rows.first()?.get::<_, i64>(0)).ok()
    }

    /// Write a backend's `chorus.lease_grant` (the answer to a session that
    /// asked for the cluster DDL lease, see `ddl_lease::answer`); whether
    /// it was written.
    pub(crate) async fn set_lease_grant(&self, backend: &BackendConfig, value: i64) -> bool {
        self.control
            .query(
                backend,
                Duration::from_secs(10),
                "SELECT pg_catalog.setval('chorus.lease_grant', $1)",
                &[&value],
            )
            .await
            .is_ok()
    }

    /// Wait until every backend applied `seq`, until `limit`; returns how
    /// many have. Unless `strict`, a backend that is unreachable or had not
    /// even applied the entry before `seq` when first asked (its node is
    /// down or far behind) is not waited for.
    pub(crate) async fn wait_all(
        &self,
        backends: &[BackendConfig],
        home: &str,
        seq: u64,
        limit: Duration,
        strict: bool,
    ) -> (usize, usize) {
        let deadline = Instant::now() + limit;
        let mut done: Vec<bool> = backends.iter().map(|b| b.name == home).collect();
        let mut first = true;
        loop {
            for (i, backend) in backends.iter().enumerate() {
                if !done[i] {
                    let index = self.backend_index(backend).await;
                    done[i] = index.is_some_and(|applied| applied >= seq)
                        || (first && !strict && index.is_none_or(|a| a + 1 < seq));
                }
            }
            first = false;
            let have = done.iter().filter(|d| **d).count();
            if have == backends.len() || Instant::now() >= deadline {
                return (have, backends.len());
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}

pub(crate) const INDEX_SQL: &str = "SELECT coalesce(max(seq), 0) FROM chorus.ddl_history";
