//! Backend to client: the policy on what a backend answers (stamps'
//! answers swallowed, DDL jobs, commit scope waits, lease release).

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::sync::watch;

use super::stamp::Verdict;
use crate::cluster::ddl;
use crate::cluster::ddl::lease as ddl_lease;
use crate::cluster::ddl::{DdlJob, JobStep};
use crate::config::{CommitScope, TimeoutAction};
use crate::lane::Lane;
use crate::metrics::ErrorKind;
use crate::node::Node;
use crate::scope;
use crate::wire::protocol;
use crate::wire::protocol::Severity;

use super::stamp;

use super::client::apply_scope_changes;
use super::pump::{forward, read_more, Flow, PumpError, PumpSide};
use super::state::{Pending, RelayEnd, RelayState};

/// Backend to client: track transaction state and latency, count errors,
/// and end idle sessions when the node shuts down.
pub(super) async fn backend_to_client<R, W>(
    node: &Node,
    state: &RelayState,
    serving: &str,
    side: &mut PumpSide,
    reader: &mut R,
    writer: &mut W,
    shutdown: &mut watch::Receiver<bool>,
) -> RelayEnd
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let metrics = &node.metrics;
    let mut last_was_fatal = false;
    let idle = || {
        state.tx_status.load(Ordering::Relaxed) == b'I'
            && state.pending.lock().map(|p| p.is_empty()).unwrap_or(true)
    };
    let draining = || node.draining.load(Ordering::SeqCst);
    let mut stop_for_shutdown = false;
    // Whether the transaction in progress (up to the next idle
    // ReadyForQuery) may have written.
    let mut txn_wrote = false;
    // Whether an error came since the last ReadyForQuery.
    let mut failed_since_ready = false;
    let default_scope = node
        .config
        .replication
        .as_ref()
        .map_or(CommitScope::Local, |r| r.commit_scope);
    // Commits wait for their scope on the streams of their own database;
    // a local database's commits do not replicate.
    let session_lane = state.lane.as_ref().filter(|_| state.replicated_database);
    let session_progress = session_lane.map(|lane| &lane.progress);
    let scope_wait = Mutex::new(None::<CommitScope>);
    let replicating = node.config.replication.is_some();
    // A FATAL of a server going down, not yet passed on (SQLSTATE, message).
    let held_fatal = Mutex::new(None::<(String, BytesMut)>);
    let ended =
        |end: PumpError, after_fatal: bool| match held_fatal.lock().ok().and_then(|mut h| h.take())
        {
            Some((code, raw)) => RelayEnd::BackendClosing { code, raw },
            None => backend_end(end, after_fatal),
        };
    let scope_limit = Duration::from_millis(
        node.config
            .replication
            .as_ref()
            .map_or(0, |r| r.commit_scope_timeout_ms),
    );
    // A control connection to the serving backend when it is not the
    // home one (see `wait_on_slots`).
    let mut away: Option<tokio_postgres::Client> = None;
    let ddl_ready = Mutex::new(None::<DdlJob>);
    // Whether the rows coming are EXPLAIN's text output (see
    // `describes_plan`): they are looked at for Chorus's capture trigger.
    let plan_rows = AtomicBool::new(false);
    // The backend session asked for the cluster DDL lease (the question's
    // number; 0: none), see `lease_question`.
    let asked = AtomicU32::new(0);
    // Final answers to the client's messages since the last ReadyForQuery
    // (see `Pending::Ahead`).
    let mut batch_answered: u32 = 0;
    let inspect = |tag: u8| {
        matches!(tag, b'Z' | b'E' | b'S' | b'A' | b'T' | b'N')
            || (replicating && stamp::ends_an_answer(tag))
            || (plan_rows.load(Ordering::Relaxed) && matches!(tag, b'D' | b'C'))
            || state.stamps.load(Ordering::SeqCst) > 0
            || state.ddl_jobs.load(Ordering::SeqCst) > 0
            || state.probes.load(Ordering::SeqCst) > 0
    };
    let mut on_message = |tag: u8, body: &[u8], _rest: &[u8]| {
        if tag == b'E' && state.pooled {
            state.error_seen.store(true, Ordering::Relaxed);
        }
        if tag == b'N' && replicating {
            if let Some(question) = lease_question(body) {
                asked.store(question, Ordering::Relaxed);
                return Ok(Flow::Await);
            }
        }
        if state.probes.load(Ordering::SeqCst) > 0 && feed_probe(state, tag, body) {
            return Ok(Flow::Replace(BytesMut::new()));
        }
        if state.stamps.load(Ordering::SeqCst) > 0 {
            if let Some(verdict) = judge_for_stamp(state, tag, batch_answered) {
                if tag == b'E' {
                    // A stamp's error passed on: the client's batch failed.
                    failed_since_ready = true;
                    metrics.error(ErrorKind::BackendError);
                }
                return Ok(match verdict {
                    Verdict::Swallow | Verdict::SwallowLast => Flow::Replace(BytesMut::new()),
                    Verdict::Pass | Verdict::PassLast | Verdict::Skipped => Flow::Continue,
                });
            }
        }
        if state.ddl_jobs.load(Ordering::SeqCst) > 0 {
            if let Some(flow) = feed_ddl_job(state, tag, body, &ddl_ready) {
                return Ok(flow);
            }
        }
        if replicating && stamp::ends_an_answer(tag) {
            batch_answered += 1;
        }
        match tag {
            b'Z' => {
                last_was_fatal = false;
                // (A session that could not leave a drained backend
                // tries again at its next transaction, see drain.rs.)
                state.drain_blocked.store(false, Ordering::Relaxed);
                let status = body.first().copied().unwrap_or(b'I');
                state.tx_status.store(status, Ordering::Relaxed);
                if status == b'I' {
                    state.ddl_scope_local.store(0, Ordering::Relaxed);
                    state.lost_transaction.store(false, Ordering::Relaxed);
                    // The transaction held the cluster DDL lease: it is
                    // given back before the client hears of the end.
                    if state.ddl_lease.load(Ordering::SeqCst) != 0 {
                        state.lease_release_due.store(true, Ordering::SeqCst);
                    }
                }
                let started = state.pending.lock().ok().and_then(|mut p| p.pop_front());
                batch_answered = 0;
                if let Some(Pending::Ready { sent, wrote, scope }) = started {
                    metrics.query_duration.record(sent.elapsed().as_secs_f64());
                    txn_wrote |= wrote;
                    if !std::mem::take(&mut failed_since_ready) {
                        apply_scope_changes(state, &scope);
                    }
                }
                // A transaction ended; with replication, it may have to wait
                // for its commit scope, and it wakes the replication streams.
                if let (b'I', Some(progress)) = (status, session_progress) {
                    state.txn_stamped.store(false, Ordering::Relaxed);
                    let local = scope::decode(state.scope_local.swap(0, Ordering::SeqCst));
                    if std::mem::take(&mut txn_wrote) {
                        if state.pooled {
                            if let Ok(mut last) = state.last_write.lock() {
                                *last = Some((serving.to_owned(), None));
                            }
                        }
                        let scope = local
                            .or_else(|| scope::decode(state.scope_session.load(Ordering::SeqCst)))
                            .unwrap_or(default_scope);
                        if scope == CommitScope::Local {
                            progress.wake();
                        } else {
                            // Hold this ReadyForQuery until the scope is
                            // reached (see the relay loop below).
                            if let Ok(mut wait) = scope_wait.lock() {
                                *wait = Some(scope);
                            }
                            return Ok(Flow::Await);
                        }
                    }
                }
                if state.lease_release_due.load(Ordering::SeqCst) {
                    return Ok(Flow::Await);
                }
                if draining() && idle() {
                    stop_for_shutdown = true;
                    return Ok(Flow::Stop);
                }
            }
            b'T' => plan_rows.store(describes_plan(body), Ordering::Relaxed),
            b'D' if plan_rows.load(Ordering::Relaxed) && capture_trigger_line(body) => {
                return Ok(Flow::Replace(BytesMut::new()));
            }
            b'C' => plan_rows.store(false, Ordering::Relaxed),
            b'E' => {
                plan_rows.store(false, Ordering::Relaxed);
                failed_since_ready = true;
                state.lost_transaction.store(false, Ordering::Relaxed);
                metrics.error(ErrorKind::BackendError);
                let fields = protocol::parse_error_fields(body);
                last_was_fatal = fields.severity == "FATAL" || fields.severity == "PANIC";
                // The server going down (shutdown, crash restart): held, so
                // that the session can move instead (see relay).
                if last_was_fatal
                    && replicating
                    && matches!(fields.code, "57P01" | "57P02" | "57P03")
                {
                    let mut raw = BytesMut::with_capacity(body.len() + 5);
                    protocol::write_message(&mut raw, b'E', |m| m.extend_from_slice(body));
                    if let Ok(mut held) = held_fatal.lock() {
                        *held = Some((fields.code.to_owned(), raw));
                    }
                    last_was_fatal = false;
                    return Ok(Flow::Replace(BytesMut::new()));
                }
            }
            b'S' => state.report(body),
            b'A' => {
                if let Some(message) = notification_for_client(state, body) {
                    return Ok(Flow::Replace(message));
                }
            }
            _ => {}
        }
        Ok(Flow::Continue)
    };
    let max = usize::MAX >> 1;
    // One wait for the start of shutdown for the whole session (registering
    // a fresh waiter before every read would take a lock each time).
    let shutdown_started = shutdown.wait_for(|started| *started);
    tokio::pin!(shutdown_started);
    let mut shutdown_seen = draining();
    loop {
        if shutdown_seen && idle() && side.buf.is_empty() {
            return shutdown_session(writer).await;
        }

        if state.pooled {
            state
                .backend_reading
                .store(side.buf.is_empty(), Ordering::SeqCst);
        }
        if shutdown_seen {
            let read = read_more(reader, &mut side.buf).await;
            if state.pooled {
                state.backend_reading.store(false, Ordering::SeqCst);
            }
            if let Err(end) = read {
                return ended(end, last_was_fatal);
            }
        } else {
            // Wait for backend bytes or the start of shutdown, whichever
            // comes first; an idle session is then closed at once.
            tokio::select! {
                _ = &mut shutdown_started => {
                    if state.pooled {
                state.backend_reading.store(false, Ordering::SeqCst);
            }
                    shutdown_seen = true;
                    continue;
                }
                readable = read_more(reader, &mut side.buf) => {
                    if state.pooled {
                state.backend_reading.store(false, Ordering::SeqCst);
            }
                    if let Err(end) = readable {
                        return ended(end, last_was_fatal);
                    }
                }
            }
        }
        // A commit held for its scope: wait, then send its ReadyForQuery
        // (after an error or warning if the scope was not reached) and go on
        // with what is buffered behind it.
        side.busy = true;
        let flow = loop {
            let flow = forward(
                &mut side.framer,
                &mut side.buf,
                writer,
                max,
                &inspect,
                &mut on_message,
            )
            .await;
            let Ok(Flow::Held(ready)) = &flow else {
                break flow;
            };
            let question = asked.swap(0, Ordering::Relaxed);
            if question != 0 {
                // The question is the node's, not the client's: answered,
                // and not passed on. The backend waits for the answer.
                let held = state.ddl_lease.load(Ordering::SeqCst);
                let taken = match &state.lane {
                    Some(lane) => {
                        ddl_lease::answer(node, lane, state.lease_token, serving, question, held)
                            .await
                    }
                    None => None,
                };
                if let Some(seq) = taken {
                    state.lease_taken(node, seq);
                }
                continue;
            }
            let mut out = BytesMut::new();
            let job = ddl_ready.lock().ok().and_then(|mut j| j.take());
            if let Some(job) = job {
                // A replicated DDL query: its answer replaces the held
                // ReadyForQuery (of the validation's ROLLBACK).
                let sent = job.sent();
                let scope = scope::decode(state.scope_session.load(Ordering::SeqCst))
                    .unwrap_or(default_scope);
                match &state.lane {
                    Some(lane) => ddl::finish(node, lane, job, scope, &mut out).await,
                    None => protocol::ready_for_query(&mut out, protocol::TransactionStatus::Idle),
                }
                metrics.query_duration.record(sent.elapsed().as_secs_f64());
                state.tx_status.store(b'I', Ordering::Relaxed);
            } else {
                if state.lease_release_due.swap(false, Ordering::SeqCst) {
                    let seq = state.lease_dropped();
                    if let Some(lane) = &state.lane {
                        if ddl_lease::give_back(node, lane, state.lease_token, seq, None, serving)
                            .await
                        {
                            ddl_lease::wait_for_peers(node, lane, seq).await;
                        }
                    }
                }
                let wait = scope_wait.lock().ok().and_then(|mut w| w.take());
                if let (Some(scope), Some(lane)) = (wait, session_lane) {
                    if serving == node.config.home_backend().name
                        && node.drives_home.load(Ordering::Relaxed)
                    {
                        let (reached, ok) = lane.progress.wait(scope, scope_limit).await;
                        scope_outcome(node, scope, reached, ok, &mut out);
                    } else {
                        let (reached, ok) =
                            wait_on_slots(node, lane, serving, &mut away, scope, scope_limit).await;
                        scope_outcome(node, scope, reached, ok, &mut out);
                    }
                }
                out.extend_from_slice(ready);
            }
            if writer.write_all(&out).await.is_err() {
                return RelayEnd::ClientDone;
            }
        };
        side.busy = false;
        // (Transaction pooling: the relay may give the connection back.)
        if state.pooled && side.buf.is_empty() && idle() {
            state.idle_signal.notify_one();
        }
        match flow {
            // forward() turns a replacement into Continue once written.
            Ok(Flow::Continue | Flow::Replace(_) | Flow::Await | Flow::Held(_)) => {}
            Ok(Flow::Stop) => {
                if stop_for_shutdown {
                    return shutdown_session(writer).await;
                }
                return RelayEnd::ClientDone;
            }
            Err(PumpError::WriteFailed) | Err(PumpError::Eof) => return RelayEnd::ClientDone,
            Err(PumpError::Protocol(e)) => {
                tracing::warn!(error = %e, "backend protocol error");
                return RelayEnd::BackendGone {
                    after_fatal: last_was_fatal,
                };
            }
        }
    }
}

/// A NotificationResponse sent by the session's own backend, with the pid
/// the client knows instead of the backend's (`None`: it goes as it is).
pub(super) fn notification_for_client(state: &RelayState, body: &[u8]) -> Option<BytesMut> {
    let pid = i32::from_be_bytes(body.get(..4)?.try_into().ok()?);
    let client_pid = state.client_pid.load(Ordering::Relaxed);
    if pid != state.backend_pid.load(Ordering::Relaxed) || pid == client_pid {
        return None;
    }
    let mut message = BytesMut::with_capacity(body.len() + 5);
    protocol::write_message(&mut message, b'A', |m| {
        m.extend_from_slice(&client_pid.to_be_bytes());
        m.extend_from_slice(&body[4..]);
    });
    Some(message)
}

/// The number of a backend session's question for the cluster DDL lease,
/// from its NoticeResponse (`chorus:lease <n>`, see `chorus.ask_lease`).
pub(super) fn lease_question(body: &[u8]) -> Option<u32> {
    let fields = protocol::parse_error_fields(body);
    if fields.code != "00000" {
        return None;
    }
    let question: u32 = fields.message.strip_prefix("chorus:lease ")?.parse().ok()?;
    (question > 0 && question < 1 << 31).then_some(question)
}

/// Whether a RowDescription describes EXPLAIN's output: one column,
/// named `QUERY PLAN`.
pub(super) fn describes_plan(body: &[u8]) -> bool {
    body.get(..2) == Some(&1i16.to_be_bytes()[..])
        && protocol::cstr_bytes(&body[2..]) == Some(&b"QUERY PLAN"[..])
}

/// Whether a DataRow of EXPLAIN ANALYZE's text output is the line of
/// Chorus's capture triggers (`Trigger chorus_capture: calls=…`, `…
/// chorus_capture on <partition>: …`, or by statement `Trigger
/// chorus_capture_inserts: …`, `_updates`, `_deletes`). They are left out,
/// as the triggers are left out of psql's `\d`: the plan reads as
/// PostgreSQL's own (its times still include the capture's). Other formats
/// (JSON, YAML, XML) keep them.
pub(super) fn capture_trigger_line(body: &[u8]) -> bool {
    const LINE: &[u8] = b"Trigger chorus_capture";
    if body.get(..2) != Some(&1i16.to_be_bytes()[..]) {
        return false;
    }
    let Some(text) = body.get(6..) else {
        return false;
    };
    text.strip_prefix(LINE)
        .map(|rest| {
            [&b"_inserts"[..], b"_updates", b"_deletes"]
                .iter()
                .find_map(|suffix| rest.strip_prefix(*suffix))
                .unwrap_or(rest)
        })
        .is_some_and(|rest| matches!(rest.first(), Some(b':' | b' ')))
}

pub(super) fn backend_end(end: PumpError, after_fatal: bool) -> RelayEnd {
    match end {
        PumpError::Eof | PumpError::Protocol(_) | PumpError::WriteFailed => {
            RelayEnd::BackendGone { after_fatal }
        }
    }
}

pub(super) async fn shutdown_session<W: AsyncWrite + Unpin>(writer: &mut W) -> RelayEnd {
    let mut out = BytesMut::new();
    protocol::error_response(
        &mut out,
        Severity::Fatal,
        "57P01",
        "terminating connection due to administrator command",
        Some("The Chorus node is shutting down."),
    );
    let _ = writer.write_all(&out).await;
    RelayEnd::Shutdown
}

/// The commit scope wait of a session served by a backend whose streams
/// this node does not drive (another backend it moved to, or its home
/// while handed to another node): that backend's own slots, confirmed by
/// the streams its driver runs once a peer has applied, tell how many
/// backends have the transaction. `away` keeps the control connection.
pub(super) async fn wait_on_slots(
    node: &Node,
    lane: &Lane,
    serving: &str,
    away: &mut Option<tokio_postgres::Client>,
    scope: CommitScope,
    limit: Duration,
) -> (usize, bool) {
    let needed = scope.required(node.backends().len());
    if needed <= 1 {
        return (1, true);
    }
    let config = &lane.config;
    let Some(backend) = node.backend(serving) else {
        return (1, false);
    };
    let deadline = tokio::time::Instant::now() + limit;
    if away.as_ref().is_none_or(tokio_postgres::Client::is_closed) {
        let connected =
            tokio::time::timeout_at(deadline, crate::backend::connect_backend(&backend, config))
                .await;
        *away = connected.ok().and_then(Result::ok);
    }
    let Some(client) = away.as_ref() else {
        return (1, false);
    };
    let Ok(Ok(row)) = tokio::time::timeout_at(
        deadline,
        client.query_one("SELECT pg_current_wal_flush_lsn()::text", &[]),
    )
    .await
    else {
        return (1, false);
    };
    let lsn: String = row.get(0);
    let mut reached = 1;
    loop {
        let count = tokio::time::timeout_at(
            deadline,
            client.query_one(
                "SELECT count(*) FROM pg_replication_slots \
                 WHERE slot_name LIKE 'chorus\\_%\\_to\\_%' AND database = current_database() \
                   AND confirmed_flush_lsn >= $1::text::pg_lsn",
                &[&lsn],
            ),
        )
        .await;
        if let Ok(Ok(row)) = count {
            reached = 1 + usize::try_from(row.get::<_, i64>(0)).unwrap_or(0);
            if reached >= needed {
                return (reached, true);
            }
        }
        if tokio::time::Instant::now() >= deadline {
            return (reached, false);
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// What a commit whose scope was not reached in time reports, in `out`.
pub(super) fn scope_outcome(
    node: &Node,
    scope: CommitScope,
    reached: usize,
    ok: bool,
    out: &mut BytesMut,
) {
    let Some(config) = &node.config.replication else {
        return;
    };
    if ok {
        return;
    }
    let scope_name = match scope {
        CommitScope::Local => "local",
        CommitScope::Majority => "majority",
        CommitScope::All => "all",
    };
    let message = format!(
        "commit scope \"{scope_name}\" not reached within {} ms: {reached} of {} backends have the transaction",
        config.commit_scope_timeout_ms,
        node.backends().len()
    );
    match config.commit_scope_timeout_action {
        TimeoutAction::Error => protocol::error_response(
            out,
            Severity::Error,
            "40003",
            &message,
            Some("The transaction has committed on this node's backend and reaches the others when they are available."),
        ),
        TimeoutAction::Warning => protocol::warning_notice(out, "01000", &message),
    }
}

/// If the oldest answer due belongs to a DDL job, feed it this backend
/// message: swallowed, or (its last answer) held while the job finishes.
pub(super) fn feed_ddl_job(
    state: &RelayState,
    tag: u8,
    body: &[u8],
    ready: &Mutex<Option<DdlJob>>,
) -> Option<Flow> {
    let mut pending = state.pending.lock().ok()?;
    let Some(Pending::Ddl(job)) = pending.front_mut() else {
        return None;
    };
    match job.feed(tag, body) {
        JobStep::Swallow => Some(Flow::Replace(BytesMut::new())),
        JobStep::Pass => Some(Flow::Continue),
        JobStep::Done => {
            let Some(Pending::Ddl(job)) = pending.pop_front() else {
                return None;
            };
            state.ddl_jobs.fetch_sub(1, Ordering::SeqCst);
            if let Ok(mut ready) = ready.lock() {
                *ready = Some(job);
            }
            Some(Flow::Await)
        }
    }
}

/// If the oldest answer due belongs to a probe, take this backend message
/// for it (it is swallowed; see `client::probe`).
fn feed_probe(state: &RelayState, tag: u8, body: &[u8]) -> bool {
    let Ok(mut pending) = state.pending.lock() else {
        return false;
    };
    let Some(Pending::Probe { value, done }) = pending.front_mut() else {
        return false;
    };
    match tag {
        b'D' if value.is_none() => {
            *value = protocol::data_row_texts(body).into_iter().next().flatten();
        }
        b'Z' => {
            if let Some(done) = done.take() {
                let _ = done.send(value.take());
            }
            pending.pop_front();
            state.probes.fetch_sub(1, Ordering::SeqCst);
        }
        _ => {}
    }
    true
}

/// If the oldest answer due belongs to a stamp, what to do with this
/// backend message (and retire the stamp after its last answer).
pub(super) fn judge_for_stamp(state: &RelayState, tag: u8, batch_answered: u32) -> Option<Verdict> {
    let mut pending = state.pending.lock().ok()?;
    if let Some(Pending::Ahead { until }) = pending.front() {
        if batch_answered < *until {
            // An answer to a client message sent before the stamp; an
            // error, or the batch's end after an error that came before
            // the stamp was sent.
            if matches!(tag, b'E' | b'Z') {
                // The backend skips the rest of the batch, the stamp too.
                pending.pop_front();
                if matches!(pending.front(), Some(Pending::Stamp(_))) {
                    pending.pop_front();
                    state.stamps.fetch_sub(1, Ordering::SeqCst);
                }
            }
            return None;
        }
        pending.pop_front();
    }
    let Some(Pending::Stamp(swallower)) = pending.front_mut() else {
        return None;
    };
    let verdict = swallower.judge(tag);
    if matches!(
        verdict,
        Verdict::SwallowLast | Verdict::PassLast | Verdict::Skipped
    ) {
        pending.pop_front();
        state.stamps.fetch_sub(1, Ordering::SeqCst);
    }
    // (A skipped stamp's message is the client's, looked at as any.)
    (verdict != Verdict::Skipped).then_some(verdict)
}
