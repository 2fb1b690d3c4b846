//! Every metric a Chorus node exports, and the HTTP endpoint serving them.
//!
//! Each node owns its own Prometheus recorder (no global one), so several
//! nodes can share a process, as `chorus demo` and the tests do. Handles are
//! registered once at start-up; the hot path only bumps atomics.
//!
//! | name | type | labels | meaning |
//! |---|---|---|---|
//! | `chorus_client_connections` | gauge | | client sessions open now |
//! | `chorus_client_connections_total` | counter | | client connections accepted |
//! | `chorus_statements_total` | counter | `class` | statements received, by router class |
//! | `chorus_errors_total` | counter | `kind` | errors, by [`ErrorKind`] |
//! | `chorus_query_duration_seconds` | histogram | | time from a client's Query or Sync to the ReadyForQuery that answers it |
//! | `chorus_backend_connections` | gauge | `backend` | server connections open now |
//! | `chorus_backend_up` | gauge | `backend` | 1 when the last login to the backend worked, 0 when it failed |
//! | `chorus_backend_drained` | gauge | `backend` | 1 while the backend is drained (the admin console's DRAIN) |
//! | `chorus_backend_copying` | gauge | `backend` | 1 while the backend is being copied (the admin console's REJOIN or JOIN) |
//! | `chorus_backend_copy_progress` | gauge | `backend` | on the node running the copy, how much of the current database is copied, 0 to 1 (estimated from the sizes on disk) |
//! | `chorus_changes_applied_total` | counter | `peer` | row changes and DDL from this node's home backend applied on a peer |
//! | `chorus_conflicts_total` | counter | `kind` | conflicts resolved while applying this node's changes on peers, by kind |
//! | `chorus_changes_applied_per_second` | gauge | `peer` | changes applied on the peer over the last second or so |
//! | `chorus_replication_lag_bytes` | gauge | `peer` | WAL on the home backend not yet applied on the peer |
//! | `chorus_slot_retained_bytes` | gauge | `origin`, `peer` | WAL the home backend (`origin`) keeps for the slot of its stream to the peer |
//! | `chorus_slot_invalidated` | gauge | `origin`, `peer` | 1 when PostgreSQL invalidated that slot (`max_slot_wal_keep_size`): the peer misses the origin's changes until it is copied again |
//! | `chorus_replication_lag_seconds` | gauge | `peer` | age of the oldest origin commit not yet applied on the peer (0 when caught up) |
//! | `chorus_replication_held_changes` | gauge | `peer` | changes of this node's stream to the peer read and held in memory, not yet applied (bounded: a stream that waits reads no further) |
//! | `chorus_replication_delay_seconds` | histogram | `peer` | per transaction, origin commit to its apply on the peer |
//! | `chorus_replication_rejected_total` | counter | `origin`, `reason` | change messages skipped because they are not Chorus's records (`not_utf8`, `not_json`, `not_a_record`) |
//! | `chorus_tombstones_pruned_total` | counter | `backend` | tombstones pruned on a backend this node drives (see tombstones.sql) |
//! | `chorus_hlc_skew_milliseconds` | gauge | | how far the last remote clock observed was ahead of ours (negative: behind) |
//! | `chorus_hlc_skew_refused_total` | counter | | remote clocks ahead by more than `max_clock_skew_ms`, logged and not followed |
//! | `chorus_ddl_index` | gauge | `backend` | DDL log entries applied on the backend (this node's home backend) |
//! | `chorus_ddl_duration_seconds` | histogram | | DDL through this node: proposal to applied on its home backend |
//! | `chorus_ddl_failed_total` | counter | | DDL that could not be committed (no majority, timeout) |
//! | `chorus_ddl_lease_waiting` | gauge | | sessions through this node whose DDL waits for the cluster DDL lease another open transaction holds (a lock wait) |
//! | `chorus_raft_term` | gauge | | this node's current Raft term |
//! | `chorus_raft_leader` | gauge | | id of the Raft leader this node knows (0: none) |
//! | `chorus_raft_commit_index` | gauge | | committed Raft log index known to this node |
//! | `chorus_raft_applied_index` | gauge | | Raft log index applied to this node's state machine |
//! | `chorus_raft_auth_failures_total` | gauge | | Raft connections refused: a wrong cluster secret, or a failed TLS handshake |
//! | `chorus_sequence_values_total` | counter | `kind` | values handed out by the home backend's global sequences |
//! | `chorus_galloc_values_left` | gauge | `sequence` | values left in a galloc sequence's current range |

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use chorus_router::StatementClass;
use metrics::{Counter, Gauge, Histogram, Key, Label, Level, Metadata, Recorder};
use metrics_exporter_prometheus::{
    Matcher, PrometheusBuilder, PrometheusHandle, PrometheusRecorder,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Kinds of error, a label of `chorus_errors_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// Malformed, truncated or oversized client message (08P01).
    Protocol,
    /// Failed client authentication (28P01, 28000).
    Auth,
    /// TLS handshake failure.
    Tls,
    /// Could not connect or log in to a backend.
    BackendConnect,
    /// A backend connection broke in the middle of a session.
    BackendLost,
    /// An ErrorResponse sent by a backend (SQL errors).
    BackendError,
    /// Too many client connections waiting, or no pooled server
    /// connection free in time.
    Capacity,
}

impl ErrorKind {
    const ALL: [ErrorKind; 7] = [
        ErrorKind::Protocol,
        ErrorKind::Auth,
        ErrorKind::Tls,
        ErrorKind::BackendConnect,
        ErrorKind::BackendLost,
        ErrorKind::BackendError,
        ErrorKind::Capacity,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::Protocol => "protocol",
            ErrorKind::Auth => "auth",
            ErrorKind::Tls => "tls",
            ErrorKind::BackendConnect => "backend_connect",
            ErrorKind::BackendLost => "backend_lost",
            ErrorKind::BackendError => "backend_error",
            ErrorKind::Capacity => "capacity",
        }
    }
}

/// Registered metric handles of one node.
pub struct Metrics {
    handle: PrometheusHandle,
    /// Kept for metrics whose labels are known only at run time.
    recorder: PrometheusRecorder,
    sequence_values: [Counter; 2],
    pub client_connections: Gauge,
    pub client_connections_total: Counter,
    statements: [Counter; 7],
    errors: [Counter; 7],
    pub query_duration: Histogram,
    /// Per backend, in the node's order; more join when a backend is
    /// added while the node runs (see `add_backend`).
    backends: std::sync::RwLock<Vec<Arc<BackendMetrics>>>,
    conflicts: Vec<(&'static str, Counter)>,
    pub hlc_skew_ms: Gauge,
    pub hlc_skew_refused: Counter,
    ddl_duration: Histogram,
    ddl_failed: Counter,
    /// Sessions waiting for the DDL lease (see `cluster::ddl::lease`).
    pub ddl_lease_waiting: Gauge,
    pub raft_term: Gauge,
    pub raft_leader: Gauge,
    pub raft_commit_index: Gauge,
    pub raft_applied_index: Gauge,
    pub raft_auth_failures: Gauge,
}

/// The metrics of one backend (labelled `backend`).
struct BackendMetrics {
    name: String,
    connections: Gauge,
    up: Gauge,
    drained: Gauge,
    copying: Gauge,
    copy_progress: Gauge,
    ddl_index: Gauge,
    /// Towards it, from the home backend (labelled `peer`).
    replication: Arc<PeerMetrics>,
}

impl BackendMetrics {
    fn new(recorder: &PrometheusRecorder, name: &str, home: &str) -> BackendMetrics {
        let counter = |metric: &'static str, labels: Vec<Label>| {
            recorder.register_counter(&Key::from_parts(metric, labels), &METADATA)
        };
        let gauge = |metric: &'static str, labels: Vec<Label>| {
            recorder.register_gauge(&Key::from_parts(metric, labels), &METADATA)
        };
        let backend = || vec![Label::new("backend", name.to_owned())];
        let peer = || vec![Label::new("peer", name.to_owned())];
        let slot = || {
            vec![
                Label::new("origin", home.to_owned()),
                Label::new("peer", name.to_owned()),
            ]
        };
        // Made when its first event comes, exported at 0 from the start
        // (a dashboard's queries find it).
        counter("chorus_tombstones_pruned_total", backend()).increment(0);
        BackendMetrics {
            name: name.to_owned(),
            connections: gauge("chorus_backend_connections", backend()),
            up: gauge("chorus_backend_up", backend()),
            drained: gauge("chorus_backend_drained", backend()),
            copying: gauge("chorus_backend_copying", backend()),
            copy_progress: gauge("chorus_backend_copy_progress", backend()),
            ddl_index: gauge("chorus_ddl_index", backend()),
            replication: Arc::new(PeerMetrics {
                peer: name.to_owned(),
                applied: counter("chorus_changes_applied_total", peer()),
                applied_per_second: gauge("chorus_changes_applied_per_second", peer()),
                lag_bytes: gauge("chorus_replication_lag_bytes", peer()),
                lag_seconds: gauge("chorus_replication_lag_seconds", peer()),
                held_changes: gauge("chorus_replication_held_changes", peer()),
                slot_retained_bytes: gauge("chorus_slot_retained_bytes", slot()),
                slot_invalidated: gauge("chorus_slot_invalidated", slot()),
                delay: recorder.register_histogram(
                    &Key::from_parts("chorus_replication_delay_seconds", peer()),
                    &METADATA,
                ),
            }),
        }
    }
}

/// Replication metrics towards one peer backend.
pub struct PeerMetrics {
    pub peer: String,
    pub applied: Counter,
    pub applied_per_second: Gauge,
    pub lag_bytes: Gauge,
    pub lag_seconds: Gauge,
    pub held_changes: Gauge,
    pub delay: Histogram,
    pub slot_retained_bytes: Gauge,
    pub slot_invalidated: Gauge,
}

/// Conflict kinds the apply reports and `chorus_conflicts_total` counts
/// (each one of `cluster::replication::outcome::Kind`, checked there).
pub const CONFLICT_KINDS: [&str; 9] = [
    "insert_insert",
    "update_update",
    "update_delete",
    "delete_delete",
    "update_missing",
    "delete_missing",
    "insert_delete",
    "unique",
    "missing_table",
];

const METADATA: Metadata<'static> = Metadata::new("chorus", Level::INFO, Some(module_path!()));

/// Latency buckets, in seconds: 50 µs to 10 s.
const DURATION_BUCKETS: &[f64] = &[
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
    2.5, 5.0, 10.0,
];

impl Metrics {
    /// Register every metric, for a node with these backends.
    /// The metrics of a node whose backends are `backends`, `home` its own.
    pub fn new(backends: &[String], home: &str) -> Metrics {
        let recorder = PrometheusBuilder::new()
            .set_buckets_for_metric(
                Matcher::Full("chorus_query_duration_seconds".into()),
                DURATION_BUCKETS,
            )
            .and_then(|b| {
                b.set_buckets_for_metric(
                    Matcher::Full("chorus_replication_delay_seconds".into()),
                    DURATION_BUCKETS,
                )
            })
            .and_then(|b| {
                b.set_buckets_for_metric(
                    Matcher::Full("chorus_ddl_duration_seconds".into()),
                    DURATION_BUCKETS,
                )
            })
            .map(PrometheusBuilder::build_recorder)
            // The bucket list is a non-empty constant, so this cannot fail;
            // fall back to summaries rather than refuse to start.
            .unwrap_or_else(|_| PrometheusBuilder::new().build_recorder());
        let counter = |name: &'static str, labels: Vec<Label>| {
            recorder.register_counter(&Key::from_parts(name, labels), &METADATA)
        };
        let gauge = |name: &'static str, labels: Vec<Label>| {
            recorder.register_gauge(&Key::from_parts(name, labels), &METADATA)
        };
        let statements = StatementClass::ALL.map(|class| {
            counter(
                "chorus_statements_total",
                vec![Label::new("class", class.as_str())],
            )
        });
        let errors = ErrorKind::ALL.map(|kind| {
            counter(
                "chorus_errors_total",
                vec![Label::new("kind", kind.as_str())],
            )
        });
        let conflicts = CONFLICT_KINDS
            .iter()
            .map(|kind| {
                (
                    *kind,
                    counter("chorus_conflicts_total", vec![Label::new("kind", *kind)]),
                )
            })
            .collect();
        // Counters made when their first event comes, exported at 0 from
        // the start (a dashboard's queries find them).
        for name in [
            "chorus_sessions_moved_total",
            "chorus_reconciled_rows_total",
            "chorus_replication_fenced_total",
        ] {
            recorder
                .register_counter(&Key::from_static_name(name), &METADATA)
                .increment(0);
        }
        let backends = backends
            .iter()
            .map(|name| Arc::new(BackendMetrics::new(&recorder, name, home)))
            .collect();
        Metrics {
            backends: std::sync::RwLock::new(backends),
            ddl_duration: recorder.register_histogram(
                &Key::from_static_name("chorus_ddl_duration_seconds"),
                &METADATA,
            ),
            ddl_failed: counter("chorus_ddl_failed_total", vec![]),
            ddl_lease_waiting: gauge("chorus_ddl_lease_waiting", vec![]),
            raft_term: gauge("chorus_raft_term", vec![]),
            raft_leader: gauge("chorus_raft_leader", vec![]),
            raft_commit_index: gauge("chorus_raft_commit_index", vec![]),
            raft_applied_index: gauge("chorus_raft_applied_index", vec![]),
            raft_auth_failures: gauge("chorus_raft_auth_failures_total", vec![]),
            conflicts,
            hlc_skew_ms: gauge("chorus_hlc_skew_milliseconds", vec![]),
            hlc_skew_refused: counter("chorus_hlc_skew_refused_total", vec![]),
            client_connections: gauge("chorus_client_connections", vec![]),
            client_connections_total: counter("chorus_client_connections_total", vec![]),
            statements,
            errors,
            query_duration: recorder.register_histogram(
                &Key::from_static_name("chorus_query_duration_seconds"),
                &METADATA,
            ),
            handle: recorder.handle(),
            sequence_values: ["snowflake", "galloc"].map(|kind| {
                counter(
                    "chorus_sequence_values_total",
                    vec![Label::new("kind", kind)],
                )
            }),
            recorder,
        }
    }

    /// Count statements of a class.
    #[inline]
    pub fn statements(&self, class: StatementClass, n: u64) {
        self.statements[class.index()].increment(n);
    }

    /// Count an error.
    #[inline]
    pub fn error(&self, kind: ErrorKind) {
        self.errors[kind as usize].increment(1);
    }

    fn of(&self, backend: &str) -> Option<Arc<BackendMetrics>> {
        let backends = match self.backends.read() {
            Ok(backends) => backends,
            Err(poisoned) => poisoned.into_inner(),
        };
        backends.iter().find(|m| m.name == backend).cloned()
    }

    /// Register the metrics of a backend added while the node runs (once).
    pub fn add_backend(&self, name: &str, home: &str) {
        let mut backends = match self.backends.write() {
            Ok(backends) => backends,
            Err(poisoned) => poisoned.into_inner(),
        };
        if backends.iter().all(|m| m.name != name) {
            backends.push(Arc::new(BackendMetrics::new(&self.recorder, name, home)));
        }
    }

    /// The gauge of a backend's open server connections.
    pub fn backend_connections(&self, name: &str) -> Option<Gauge> {
        self.of(name).map(|m| m.connections.clone())
    }

    /// Whether the last login to a backend worked.
    pub fn backend_up(&self, name: &str, up: bool) {
        if let Some(m) = self.of(name) {
            m.up.set(if up { 1.0 } else { 0.0 });
        }
    }

    /// Whether a backend is drained for maintenance (see the admin
    /// console's DRAIN).
    pub fn backend_drained(&self, name: &str, drained: bool) {
        if let Some(m) = self.of(name) {
            m.drained.set(if drained { 1.0 } else { 0.0 });
        }
    }

    /// Whether a backend is being copied again (see cluster/rejoin).
    pub fn backend_copying(&self, name: &str, copying: bool) {
        if let Some(m) = self.of(name) {
            m.copying.set(if copying { 1.0 } else { 0.0 });
        }
    }

    /// How much of a database the copy of a backend has done (0 to 1).
    pub fn backend_copy_progress(&self, name: &str, share: f64) {
        if let Some(m) = self.of(name) {
            m.copy_progress.set(share);
        }
    }

    /// Replication metrics towards a peer backend.
    pub fn peer(&self, peer: &str) -> Option<Arc<PeerMetrics>> {
        self.of(peer).map(|m| m.replication.clone())
    }

    /// Count `changes` resolved conflicts of a kind (`insert_insert`, …;
    /// changes skipped for other reasons are not counted here).
    pub fn conflict(&self, kind: &str, changes: usize) {
        if let Some((_, counter)) = self.conflicts.iter().find(|(k, _)| *k == kind) {
            counter.increment(changes as u64);
        }
    }

    /// A backend's DDL index.
    pub fn ddl_applied(&self, backend: &str, seq: u64) {
        if let Some(m) = self.of(backend) {
            m.ddl_index.set(seq as f64);
        }
    }

    /// A DDL statement's time from proposal to application.
    pub fn ddl_latency(&self, took: Duration) {
        self.ddl_duration.record(took.as_secs_f64());
    }

    /// Count a DDL statement that could not be committed.
    pub fn ddl_failed(&self) {
        self.ddl_failed.increment(1);
    }

    /// Count a change message from `origin` that is not one of Chorus's
    /// records (skipped: see `capture::check_record`).
    pub fn rejected(&self, origin: &str, reason: &'static str) {
        self.recorder
            .register_counter(
                &Key::from_parts(
                    "chorus_replication_rejected_total",
                    vec![
                        Label::new("origin", origin.to_owned()),
                        Label::new("reason", reason),
                    ],
                ),
                &METADATA,
            )
            .increment(1);
    }

    /// Count tombstones pruned on `backend`.
    pub fn tombstones_pruned(&self, backend: &str, rows: u64) {
        self.recorder
            .register_counter(
                &Key::from_parts(
                    "chorus_tombstones_pruned_total",
                    vec![Label::new("backend", backend.to_owned())],
                ),
                &METADATA,
            )
            .increment(rows);
    }

    /// Values a global sequence of the home backend has left in its
    /// current galloc range.
    pub fn galloc_left(&self, sequence: &str, left: i64) {
        self.recorder
            .register_gauge(
                &Key::from_parts(
                    "chorus_galloc_values_left",
                    vec![Label::new("sequence", sequence.to_owned())],
                ),
                &METADATA,
            )
            .set(left as f64);
    }

    /// Whether this node drives the replication of `backend` (its home's,
    /// or another's handed over while that node is down).
    pub fn driving(&self, backend: &str, on: bool) {
        self.recorder
            .register_gauge(
                &Key::from_parts(
                    "chorus_replication_driving",
                    vec![Label::new("backend", backend.to_owned())],
                ),
                &METADATA,
            )
            .set(if on { 1.0 } else { 0.0 });
    }

    /// Count rows copied by a reconciliation.
    pub fn reconciled(&self, rows: usize) {
        self.recorder
            .register_counter(&Key::from_name("chorus_reconciled_rows_total"), &METADATA)
            .increment(rows as u64);
    }

    /// Count a session moved to another backend (its own failed, or it was
    /// drained).
    pub fn sessions_moved(&self) {
        self.recorder
            .register_counter(&Key::from_name("chorus_sessions_moved_total"), &METADATA)
            .increment(1);
    }

    /// Count a replication duty this node lost to a newer driver.
    pub fn fenced(&self) {
        self.recorder
            .register_counter(
                &Key::from_name("chorus_replication_fenced_total"),
                &METADATA,
            )
            .increment(1);
    }

    /// Count values handed out by global sequences of a kind.
    pub fn sequence_values(&self, snowflake: bool, n: u64) {
        self.sequence_values[usize::from(!snowflake)].increment(n);
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        self.handle.render()
    }

    /// Drain histogram samples into their buckets; call periodically.
    pub fn run_upkeep(&self) {
        self.handle.run_upkeep();
    }
}

/// An RAII guard that keeps a gauge raised while it lives.
pub struct GaugeGuard(Gauge);

impl GaugeGuard {
    pub fn new(gauge: &Gauge) -> GaugeGuard {
        gauge.increment(1.0);
        GaugeGuard(gauge.clone())
    }
}

impl Drop for GaugeGuard {
    fn drop(&mut self) {
        self.0.decrement(1.0);
    }
}

/// Serve `GET /metrics` and `GET /health` until the task is dropped.
///
/// Two fixed endpoints do not justify an HTTP framework; this reads one
/// request line per connection and answers with `Connection: close`.
pub async fn serve_http(listener: TcpListener, metrics: Arc<Metrics>, draining: Arc<AtomicBool>) {
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(_) => {
                // Out of file descriptors or similar: back off, do not spin.
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let metrics = metrics.clone();
        let draining = draining.clone();
        tokio::spawn(async move {
            let _ = tokio::time::timeout(
                Duration::from_secs(10),
                answer_http(stream, &metrics, &draining),
            )
            .await;
        });
    }
}

/// Drain histogram samples every few seconds, until the task is dropped.
pub async fn run_upkeep(metrics: Arc<Metrics>) {
    let mut tick = tokio::time::interval(Duration::from_secs(5));
    loop {
        tick.tick().await;
        metrics.run_upkeep();
    }
}

async fn answer_http(
    mut stream: TcpStream,
    metrics: &Metrics,
    draining: &AtomicBool,
) -> std::io::Result<()> {
    let mut request = Vec::with_capacity(512);
    let mut chunk = [0u8; 512];
    while !request.windows(4).any(|w| w == b"\r\n\r\n") && request.len() < 8192 {
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            break;
        }
        request.extend_from_slice(&chunk[..n]);
    }
    let line = request.split(|&b| b == b'\r').next().unwrap_or_default();
    let mut parts = line.split(|&b| b == b' ');
    let method = parts.next().unwrap_or_default();
    let path = parts.next().unwrap_or_default();
    let (status, content_type, body) = match (method, path) {
        (b"GET", b"/metrics") => ("200 OK", "text/plain; version=0.0.4", metrics.render()),
        (b"GET", b"/health") if draining.load(Ordering::Relaxed) => (
            "503 Service Unavailable",
            "text/plain",
            "draining\n".to_owned(),
        ),
        (b"GET", b"/health") => ("200 OK", "text/plain", "ok\n".to_owned()),
        (b"GET", _) => ("404 Not Found", "text/plain", "not found\n".to_owned()),
        _ => (
            "405 Method Not Allowed",
            "text/plain",
            "only GET\n".to_owned(),
        ),
    };
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(body.as_bytes()).await?;
    stream.shutdown().await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_registered_metrics_with_labels() {
        let metrics = Metrics::new(&["pg1".to_owned()], "pg1");
        metrics.statements(StatementClass::Write, 3);
        metrics.error(ErrorKind::Auth);
        metrics.query_duration.record(0.002);
        if let Some(conns) = metrics.backend_connections("pg1") {
            conns.increment(1.0);
        }
        metrics.backend_up("pg1", true);
        // (A backend added while the node runs gets its metrics too.)
        assert!(metrics.peer("pg2").is_none());
        metrics.add_backend("pg2", "pg1");
        metrics.add_backend("pg2", "pg1");
        metrics.backend_copying("pg2", true);
        metrics.run_upkeep();
        let text = metrics.render();
        assert!(
            text.contains("chorus_statements_total{class=\"write\"} 3"),
            "{text}"
        );
        assert!(
            text.contains("chorus_errors_total{kind=\"auth\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("chorus_backend_connections{backend=\"pg1\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("chorus_backend_up{backend=\"pg1\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("chorus_backend_copying{backend=\"pg2\"} 1"),
            "{text}"
        );
        assert_eq!(
            text.matches("chorus_replication_lag_bytes{peer=\"pg2\"}")
                .count(),
            1,
            "{text}"
        );
        assert!(
            text.contains("chorus_query_duration_seconds_bucket"),
            "{text}"
        );
    }
}
