//! Client to backend: the policy on what a client sends (stamps, the
//! cluster DDL lease, DDL staging and refusals, SET of Chorus's settings).

use std::sync::atomic::Ordering;

use bytes::BytesMut;
use chorus_router::{ddl_route, first_keyword, split_statements, DdlRoute, StatementClass};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};

use super::stamp::StampKind;
use crate::cluster::ddl;
use crate::cluster::ddl::lease as ddl_lease;
use crate::cluster::ddl::DdlJob;
use crate::node::Node;
use crate::scope;
use crate::scope::{DdlScopeChange, ReadRoutingChange, ScopeChange};
use crate::wire::frontend::{is_inspected, query_stamps, FrontendEvent, FrontendState};
use crate::wire::protocol;

use super::stamp;

use super::pump::{pump, Flow, PumpError};
use super::refusals::{
    explained, log_statement_refused, refusal_query, refused_call, refused_parse, EXPLAINED_DDL,
    LARGE_OBJECTS,
};
use super::state::{ClientSide, Pending, RelayEnd, RelayState};

/// Client to backend: count statements, note when answers are due.
pub(super) async fn client_to_backend<R, W>(
    node: &Node,
    state: &RelayState,
    serving: &str,
    side: &mut ClientSide,
    reader: &mut R,
    writer: &mut W,
) -> RelayEnd
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let metrics = &node.metrics;
    let replicating = node.config.replication.is_some();
    let ClientSide {
        pump: pump_side,
        frontend,
        terminated,
        batch_start,
        stamped,
        scope_pending,
        batch_answers,
        judged_ahead,
        discard_until_sync,
        refeed,
        probe_question,
        probe_answer,
        log_run,
    } = side;
    let serving_closed = node.closed_flag(serving);
    // The message starting the next transaction was held because the
    // backend is drained (see `drain`): the relay moves the session first.
    let mut drain_now = false;
    let result = loop {
        let held = pump(
        reader,
        writer,
        pump_side,
        node.config.node.max_message_bytes,
        state.pooled.then_some(&state.client_reading),
        is_inspected,
        |tag, body, rest| {
            // The rest of a batch whose start went to a backend that failed
            // (the client has its error): dropped up to its Sync.
            if *discard_until_sync {
                if matches!(tag, b'P' | b'B' | b'D' | b'E' | b'C' | b'H') {
                    return Ok(Flow::Replace(BytesMut::new()));
                }
                *discard_until_sync = false;
            }
            // A transaction about to start on a drained backend: held, so
            // that the session leaves it first (nothing sent or owed).
            if replicating
                && (tag == b'Q'
                    || (*batch_start && matches!(tag, b'P' | b'B' | b'D' | b'E' | b'C' | b'H')))
                && serving_closed.as_ref().is_some_and(|f| f.is_closed())
                && !state.drain_blocked.load(Ordering::Relaxed)
                && state.idle()
            {
                drain_now = true;
                return Ok(Flow::Await);
            }
            if replicating || state.pooled {
                state.remember_prepared(tag, body);
            }
            if state.pooled && matches!(tag, b'Q' | b'P') {
                note_session_state(state, tag, body);
            }
            // A transaction lost with its backend is never reported
            // committed: a COMMIT the client sends before it heard of the
            // loss becomes a statement the aborted block refuses (25P02).
            if state.lost_transaction.load(Ordering::Relaxed) {
                let statement = match tag {
                    b'Q' => protocol::read_cstr(body).map_or("", |(sql, _)| sql),
                    b'P' => protocol::read_cstr(body)
                        .and_then(|(_, rest)| protocol::read_cstr(rest))
                        .map_or("", |(sql, _)| sql),
                    _ => "",
                };
                if ends_transaction(statement) {
                    let mut out = BytesMut::new();
                    if tag == b'Q' {
                        protocol::query(&mut out, "SELECT 1");
                        state.push_ready(*stamped, Vec::new());
                        *stamped = false;
                        scope_pending.clear();
                        *batch_start = true;
                    } else {
                        let name = protocol::read_cstr(body).map_or("", |(name, _)| name);
                        protocol::write_message(&mut out, b'P', |m| {
                            protocol::put_cstr(m, name);
                            protocol::put_cstr(m, "SELECT 1");
                            m.extend_from_slice(&0i16.to_be_bytes());
                        });
                        *batch_answers += 1;
                        *batch_start = false;
                    }
                    return Ok(Flow::Replace(out));
                }
            }
            if replicating && tag == b'F' {
                // The fast-path FunctionCall: what libpq's large-object
                // functions (lo_import, lo_write, …) send.
                *batch_start = true;
                state.push_ready(*stamped, std::mem::take(scope_pending));
                *stamped = false;
                return Ok(Flow::Replace(refusal_query(
                    "0A000",
                    LARGE_OBJECTS.message,
                    LARGE_OBJECTS.hint,
                )));
            }
            // The rest of a batch that runs a statement of the DDL log's
            // kind as its whole work: its Execute is dropped, and its Sync
            // brings the validation after it (see `DdlJob::after_batch`).
            if let Some(sql) = log_run.as_deref() {
                if let FrontendEvent::Execute(class) = frontend.on_message(tag, body)? {
                    metrics.statements(class, 1);
                }
                return Ok(match tag {
                    b'E' => Flow::Replace(BytesMut::new()),
                    b'S' => {
                        let mut out = BytesMut::with_capacity(sql.len() + 200);
                        protocol::write_message(&mut out, b'S', |_| {});
                        out.extend_from_slice(&ddl::validation_query(sql));
                        *log_run = None;
                        *batch_start = true;
                        *batch_answers = 0;
                        *judged_ahead = 0;
                        Flow::Replace(out)
                    }
                    _ => Flow::Continue,
                });
            }
            let mut stamp = None;
            let mut stage = None;
            // A DDL-log statement inside a transaction block: it travels in
            // the transaction's change stream instead (the stamp records it,
            // see chorus.capture_log_statement).
            let mut log_in_stream = false;
            let mut mid_batch = false;
            match tag {
                b'P' | b'B' | b'D' | b'E' | b'C' | b'H' if *batch_start => {
                    // A batch that runs one statement of the DDL log's kind
                    // outside a transaction block, as its whole work (what
                    // JDBC, Npgsql or tokio-postgres send for it in
                    // autocommit): it goes to the backend without its
                    // Execute, then the statement goes the way of one sent
                    // as a simple query (validated here, proposed, applied
                    // everywhere), and the job answers for the Execute.
                    if replicating && !state.ddl_is_local() && state.idle() {
                        if let Some(sql) = frontend.batch_log_run(tag, body, rest) {
                            let route = match log_run_route(state, &sql, probe_answer) {
                                Ok(route) => route,
                                Err(question) => {
                                    *probe_question = Some(question);
                                    return Ok(Flow::Await);
                                }
                            };
                            *batch_start = false;
                            *judged_ahead = FrontendState::batch_buffered(tag, rest);
                            if route == LogRun::ThroughLog {
                                if let Ok(mut pending) = state.pending.lock() {
                                    state.ddl_jobs.fetch_add(1, Ordering::SeqCst);
                                    pending.push_back(Pending::Ddl(DdlJob::after_batch(&sql)));
                                }
                                *log_run = Some(sql);
                            }
                            if let FrontendEvent::Execute(class) = frontend.on_message(tag, body)? {
                                metrics.statements(class, 1);
                            }
                            // (The batch's Execute comes first when it runs
                            // a portal bound earlier.)
                            return Ok(if log_run.is_some() && tag == b'E' {
                                Flow::Replace(BytesMut::new())
                            } else {
                                Flow::Continue
                            });
                        }
                    }
                    // A batch with replicated DDL takes the cluster DDL
                    // lease first (see cluster::ddl::lease); the stamp at
                    // its start then carries the lease's number.
                    if replicating
                        && !state.ddl_is_local()
                        && state.needs_lease()
                        && frontend.batch_has(tag, body, rest, |c| c == StatementClass::Ddl)
                    {
                        return Ok(Flow::Await);
                    }
                    *batch_start = false;
                    *judged_ahead = FrontendState::batch_buffered(tag, rest);
                    if replicating
                        && (frontend.batch_stamps(tag, body, rest) || state.ddl_settings_stale())
                    {
                        stamp = Some(StampKind::Extended);
                    }
                    // A statement of the DDL log's kind (a role, a grant on
                    // a database, …) run inside a transaction block: the
                    // stamp at the batch's start records it in the
                    // transaction's change stream, as for a simple query.
                    // Outside a block (prepared inside one) it would stay
                    // on this backend: the batch fails instead.
                    let logged = if replicating && !state.ddl_is_local() {
                        frontend.batch_log_statements(tag, body, rest)
                    } else {
                        Vec::new()
                    };
                    if let [statement] = logged.as_slice() {
                        if state.tx_status.load(Ordering::Relaxed) == b'T' {
                            stage = Some((statement.as_bytes().to_vec(), vec![(0, statement.len())]));
                            log_in_stream = true;
                        }
                    }
                    if !logged.is_empty() && !log_in_stream {
                        let out = log_statement_refused(state, tag, body, None);
                        frontend.on_message(tag, body)?;
                        return Ok(Flow::Replace(out));
                    }
                }
                // A write later in a batch whose messages so far did not
                // stamp it (they came in an earlier read, or only read):
                // stamped now, just before its Execute, so that it carries
                // the node's clock and its commit waits for its scope. DDL
                // there takes the cluster DDL lease first, and a statement
                // of the DDL log's kind is staged or refused, as at a
                // batch's start.
                b'E' if replicating && *judged_ahead == 0 => {
                    let cluster_ddl = !state.ddl_is_local();
                    if cluster_ddl
                        && state.needs_lease()
                        && frontend.batch_has(tag, body, &[], |c| c == StatementClass::Ddl)
                    {
                        return Ok(Flow::Await);
                    }
                    let logged = if cluster_ddl {
                        frontend.batch_log_statements(tag, body, &[])
                    } else {
                        Vec::new()
                    };
                    if let [statement] = logged.as_slice() {
                        if state.tx_status.load(Ordering::Relaxed) == b'T' {
                            stage =
                                Some((statement.as_bytes().to_vec(), vec![(0, statement.len())]));
                            log_in_stream = true;
                        }
                    }
                    if !logged.is_empty() && !log_in_stream {
                        let out = log_statement_refused(state, tag, body, Some(*batch_answers));
                        frontend.on_message(tag, body)?;
                        return Ok(Flow::Replace(out));
                    }
                    if (!*stamped || state.lease_unstamped() || log_in_stream)
                        && frontend.batch_stamps(tag, body, &[])
                    {
                        stamp = Some(StampKind::Extended);
                        mid_batch = true;
                    }
                }
                b'Q' | b'S' | b'F' => *batch_start = true,
                _ => {}
            }
            match frontend.on_message(tag, body)? {
                FrontendEvent::Query(summary) => {
                    // (A query held for the DDL lease comes here twice.)
                    if !std::mem::take(refeed) {
                        for class in StatementClass::ALL {
                            let n = summary.counts[class.index()];
                            if n > 0 {
                                metrics.statements(class, u64::from(n));
                            }
                        }
                    }
                    // The text is looked at only where a rule needs it (it is
                    // not decoded for every query).
                    let sql = || {
                        protocol::read_sql(body)
                            .map_or(std::borrow::Cow::Borrowed(""), |(sql, _)| sql)
                    };
                    if replicating
                        && summary.counts[StatementClass::Transaction.index()] > 0
                        && chorus_router::rolls_back_to_savepoint(&sql())
                    {
                        state.stamp_undone();
                    }
                    if replicating && summary.counts[StatementClass::Session.index()] > 0 {
                        let ddl_scope = scope::ddl_scope_changes(&sql());
                        let routing = scope::read_routing_changes(&sql());
                        let refusal = if ddl_scope.contains(&DdlScopeChange::Invalid) {
                            Err(refusal_query(
                                "22023",
                                "invalid value for parameter \"chorus.ddl_scope\"",
                                "Available values: cluster, local.",
                            ))
                        } else if routing.contains(&ReadRoutingChange::Invalid) {
                            Err(refusal_query(
                                "22023",
                                "invalid value for parameter \"chorus.read_routing\"",
                                "Available values: home, any.",
                            ))
                        } else {
                            scope_changes_in(&sql())
                        };
                        match refusal {
                            Ok(changes) => {
                                scope_pending.extend(changes);
                                state.apply_ddl_scope(&ddl_scope);
                                state.apply_read_routing(&routing);
                            }
                            Err(refusal) => {
                                state.push_ready(*stamped, Vec::new());
                                *stamped = false;
                                scope_pending.clear();
                                return Ok(Flow::Replace(refusal));
                            }
                        }
                    }
                    if replicating && summary.counts[StatementClass::Write.index()] > 0 {
                        if let Some(refused) = refused_call(&sql()) {
                            state.push_ready(*stamped, Vec::new());
                            *stamped = false;
                            scope_pending.clear();
                            return Ok(Flow::Replace(refusal_query(
                                "0A000",
                                refused.message,
                                refused.hint,
                            )));
                        }
                    }
                    let ddl = summary.counts[StatementClass::Ddl.index()];
                    // An index built or dropped CONCURRENTLY on a
                    // temporary table exists in this session only (and
                    // PostgreSQL builds it plainly): it stays on this
                    // backend. The backend is asked first (see `probe`).
                    let mut temporary = false;
                    if replicating
                        && ddl > 0
                        && !state.ddl_is_local()
                        && state.tx_status.load(Ordering::Relaxed) == b'I'
                    {
                        let text = sql();
                        let mut statements = split_statements(&text);
                        if let (Some(target), None) = (
                            statements.next().and_then(chorus_router::concurrent_index_target),
                            statements.next(),
                        ) {
                            match probe_answer.take() {
                                Some(persistence) => temporary = persistence.as_deref() == Some("t"),
                                None => {
                                    *probe_question = Some(persistence_question(target));
                                    return Ok(Flow::Await);
                                }
                            }
                        }
                    }
                    if replicating && ddl > 0 && !state.ddl_is_local() && !temporary {
                        let text = sql();
                        let statements: Vec<&str> = split_statements(&text).collect();
                        // (A DO block is DDL for the lease only: the
                        // backend takes the text of each statement it runs
                        // from the block itself.)
                        let ddl_statements: Vec<&str> = statements
                            .iter()
                            .copied()
                            .filter(|st| {
                                chorus_router::classify(st) == StatementClass::Ddl
                                    && !first_keyword(st)
                                        .is_some_and(|(w, _)| w.eq_ignore_ascii_case("DO"))
                            })
                            .collect();
                        // (In a local database only cluster-wide objects
                        // go through the log; its own CONCURRENTLY
                        // statements stay on its backend, as its other
                        // DDL does.)
                        let by_log = ddl_statements.iter().any(|st| {
                            ddl_route(st) == DdlRoute::Log
                                && (state.replicated_database || chorus_router::cluster_wide(st))
                        });
                        let in_block = state.tx_status.load(Ordering::Relaxed) == b'T';
                        let refusal = if by_log && summary.statements() > ddl {
                            Some((
                                "a query string that mixes this DDL with other statements cannot be replicated",
                                "Roles, databases, tablespaces and CONCURRENTLY statements replicate through the cluster's DDL log: send each as its own query.",
                            ))
                        } else if by_log && in_block && ddl::alter_sequence(&text) {
                            Some((ddl::ALTER_SEQUENCE.message, ddl::ALTER_SEQUENCE.hint))
                        } else if ddl_statements.iter().any(|st| explained(st)) {
                            Some((EXPLAINED_DDL.message, EXPLAINED_DDL.hint))
                        } else {
                            None
                        };
                        if let Some((message, hint)) = refusal {
                            state.push_ready(*stamped, Vec::new());
                            *stamped = false;
                            scope_pending.clear();
                            return Ok(Flow::Replace(refusal_query("0A000", message, hint)));
                        }
                        log_in_stream = by_log && in_block;
                        if (!by_log || log_in_stream)
                            && state.tx_status.load(Ordering::Relaxed) != b'E'
                        {
                            // In its transaction's change stream, under the
                            // cluster DDL lease (see cluster::ddl::lease).
                            if state.needs_lease() {
                                return Ok(Flow::Await);
                            }
                            let refused = state.lease_refusal.lock().ok().and_then(|mut r| r.take());
                            if let Some(refusal) = refused {
                                state.push_ready(*stamped, Vec::new());
                                *stamped = false;
                                scope_pending.clear();
                                return Ok(Flow::Replace(refusal_query(
                                    refusal.code,
                                    &refusal.message,
                                    "Another transaction with DDL is open in the cluster, or this node cannot reach a Raft majority; retry.",
                                )));
                            }
                            let base = text.as_ptr() as usize;
                            let ranges = ddl_statements
                                .iter()
                                .map(|st| (st.as_ptr() as usize - base, st.len()))
                                .collect();
                            // The client's own bytes: the backend compares
                            // them with the query it runs.
                            let raw = protocol::cstr_bytes(body).unwrap_or_default();
                            stage = Some((raw.to_vec(), ranges));
                        }
                        // In a failed transaction the backend refuses it
                        // (25P02) as it is; otherwise it is validated here
                        // and replicated through the DDL log (see cluster/ddl/).
                        if by_log
                            && !log_in_stream
                            && state.tx_status.load(Ordering::Relaxed) != b'E'
                        {
                            if *stamped {
                                state.push_ready(true, Vec::new());
                                *stamped = false;
                            }
                            if let Ok(mut pending) = state.pending.lock() {
                                state.ddl_jobs.fetch_add(1, Ordering::SeqCst);
                                pending.push_back(Pending::Ddl(DdlJob::new(&sql())));
                            }
                            scope_pending.clear();
                            return Ok(Flow::Replace(ddl::validation_query(&sql())));
                        }
                    }
                    if replicating
                        && !temporary
                        && (query_stamps(&summary) || state.ddl_settings_stale())
                    {
                        stamp = Some(StampKind::Query);
                    }
                }
                FrontendEvent::Execute(class) => metrics.statements(class, 1),
                FrontendEvent::Parsed(StatementClass::Transaction)
                    if replicating
                        && chorus_router::rolls_back_to_savepoint(
                            protocol::read_cstr(body)
                                .and_then(|(_, rest)| protocol::read_cstr(rest))
                                .map_or("", |(sql, _)| sql),
                        ) =>
                {
                    state.stamp_undone();
                }
                FrontendEvent::Parsed(StatementClass::Session) if replicating => {
                    // An invalid value only fails in the simple protocol;
                    // here the setting is just not taken.
                    let sql = protocol::read_cstr(body)
                        .and_then(|(_, rest)| protocol::read_cstr(rest))
                        .map_or("", |(sql, _)| sql);
                    if let Ok(changes) = scope_changes_in(sql) {
                        scope_pending.extend(changes);
                    }
                    state.apply_ddl_scope(&scope::ddl_scope_changes(sql));
                    state.apply_read_routing(&scope::read_routing_changes(sql));
                }
                FrontendEvent::Parsed(StatementClass::Write) if replicating => {
                    let sql = protocol::read_cstr(body)
                        .and_then(|(_, rest)| protocol::read_cstr(rest))
                        .map_or("", |(sql, _)| sql);
                    // (Not refused: on to the stamp below, as any write.)
                    if let Some(refused) = refused_call(sql) {
                        *batch_answers += u32::from(replicating);
                        *judged_ahead = judged_ahead.saturating_sub(1);
                        return Ok(Flow::Replace(refused_parse(
                            state,
                            body,
                            refused.message,
                            refused.hint,
                        )));
                    }
                }
                FrontendEvent::Parsed(StatementClass::Ddl)
                    if replicating
                        && !state.ddl_is_local()
                        && explained(
                            protocol::read_cstr(body)
                                .and_then(|(_, rest)| protocol::read_cstr(rest))
                                .map_or("", |(sql, _)| sql),
                        ) =>
                {
                    *batch_answers += u32::from(replicating);
                        *judged_ahead = judged_ahead.saturating_sub(1);
                        return Ok(Flow::Replace(refused_parse(
                        state,
                        body,
                        EXPLAINED_DDL.message,
                        EXPLAINED_DDL.hint,
                    )));
                }
                FrontendEvent::Terminate => {
                    *terminated = true;
                    return Ok(Flow::Stop);
                }
                FrontendEvent::AwaitsReady
                | FrontendEvent::Parsed(_)
                | FrontendEvent::Extended
                | FrontendEvent::Nothing => {}
            }
            let ddl_stamp = match stamp {
                Some(_) => state.ddl_stamp(node, stage).map(|mut d| {
                    d.record_staged = log_in_stream;
                    d
                }),
                None => None,
            };
            let flow = match stamp {
                // Inside a transaction block that already has its stamp:
                // the capture trigger keeps the transaction's first stamp
                // anyway, so another would only cost a statement (unless
                // it carries DDL settings).
                Some(_)
                    if state.tx_status.load(Ordering::Relaxed) == b'T'
                        && state.txn_stamped.load(Ordering::Relaxed)
                        && ddl_stamp.is_none() =>
                {
                    *stamped = true;
                    Flow::Continue
                }
                Some(kind) => {
                    // Mid-batch, the stamp's answers come after those still
                    // due to the batch's earlier messages.
                    let after = mid_batch.then_some(*batch_answers);
                    state.push_stamp(kind, after);
                    *stamped = true;
                    state.txn_stamped.store(true, Ordering::Relaxed);
                    let mut out = BytesMut::with_capacity(160 + body.len());
                    if let Some(ddl) = &ddl_stamp {
                        state.ddl_stamp_sent(ddl);
                    }
                    stamp::write_stamp(&mut out, kind, node.clock.now(), ddl_stamp.as_ref());
                    protocol::write_message(&mut out, tag, |m| m.extend_from_slice(body));
                    Flow::Replace(out)
                }
                None => Flow::Continue,
            };
            if replicating && stamp::gets_an_answer(tag) {
                *batch_answers += 1;
            }
            *judged_ahead = judged_ahead.saturating_sub(1);
            if matches!(tag, b'Q' | b'S' | b'F') {
                *batch_answers = 0;
                state.push_ready(*stamped, std::mem::take(scope_pending));
                *stamped = false;
            }
            Ok(flow)
        },
    )
    .await;
        match held {
            // Held to leave a drained backend: it goes, as it came, to the
            // backend the session is on next.
            Ok(Some(message)) if drain_now => {
                put_back(pump_side, &message);
                return RelayEnd::BackendDrained;
            }
            // A message held for a question to the backend: ask it, then
            // look at the message again. (Held messages go back in the
            // buffer before the wait: if the relay ends meanwhile, its
            // backend gone, the message goes on with the session to the
            // next one instead of being lost, and the client unanswered.)
            Ok(Some(message)) if probe_question.is_some() => {
                let question = probe_question.take().unwrap_or_default();
                put_back(pump_side, &message);
                *refeed = message.first() == Some(&b'Q');
                *probe_answer = Some(probe(state, writer, &question).await);
            }
            // A message held to take the cluster DDL lease first: take it
            // (or note why not), then look at the message again.
            Ok(Some(message)) => {
                put_back(pump_side, &message);
                *refeed = message.first() == Some(&b'Q');
                let taken = match &state.lane {
                    Some(lane) => ddl_lease::take(node, lane, state.lease_token, serving).await,
                    None => Err(ddl_lease::LeaseRefusal {
                        code: "55000",
                        message: "this node has no cluster to replicate DDL through".into(),
                    }),
                };
                match taken {
                    Ok(seq) => state.lease_taken(node, seq),
                    Err(refusal) => {
                        node.metrics.ddl_failed();
                        if let Ok(mut r) = state.lease_refusal.lock() {
                            *r = Some(refusal);
                        }
                    }
                }
            }
            Ok(None) => break Ok(()),
            Err(e) => break Err(e),
        }
    };
    match result {
        Ok(()) => RelayEnd::ClientDone,
        Err(PumpError::Eof) => RelayEnd::ClientDone,
        Err(PumpError::Protocol(e)) if e.is_disconnect() => RelayEnd::ClientDone,
        Err(PumpError::Protocol(e)) => RelayEnd::ClientProtocol(e),
        // The backend side failed while we wrote to it.
        Err(PumpError::WriteFailed) if *terminated => RelayEnd::ClientDone,
        Err(PumpError::WriteFailed) => RelayEnd::BackendGone { after_fatal: false },
    }
}

/// Put a held message back at the front of what the client sent, to be
/// looked at again.
fn put_back(side: &mut super::pump::PumpSide, message: &[u8]) {
    let mut buf = BytesMut::with_capacity(message.len() + side.buf.len());
    buf.extend_from_slice(message);
    buf.extend_from_slice(&side.buf);
    side.buf = buf;
    side.rescan = true;
}

/// Where a batch that runs a statement of the DDL log's kind as its whole
/// work goes.
#[derive(Clone, Copy, PartialEq, Eq)]
enum LogRun {
    /// Through the DDL log, as a simple query's would.
    ThroughLog,
    /// To this backend only, as it is: an index built concurrently on a
    /// temporary table, or a local database's own CONCURRENTLY statement.
    Here,
}

/// Where the statement `sql` goes (see [`LogRun`]); `Err`: the question to
/// ask the backend first (whether an index's table is temporary, see
/// `probe`), after which the batch is judged again.
fn log_run_route(
    state: &RelayState,
    sql: &str,
    probe_answer: &mut Option<Option<String>>,
) -> Result<LogRun, String> {
    if !state.replicated_database && !chorus_router::cluster_wide(sql) {
        return Ok(LogRun::Here);
    }
    let Some(target) = chorus_router::concurrent_index_target(sql) else {
        return Ok(LogRun::ThroughLog);
    };
    match probe_answer.take() {
        Some(persistence) if persistence.as_deref() == Some("t") => Ok(LogRun::Here),
        Some(_) => Ok(LogRun::ThroughLog),
        None => Err(persistence_question(target)),
    }
}

/// The question whether `target` is a temporary table (its
/// `relpersistence`).
fn persistence_question(target: &str) -> String {
    format!(
        "SELECT c.relpersistence::text FROM pg_catalog.pg_class c \
          WHERE c.oid = pg_catalog.to_regclass({})",
        quote_literal(target)
    )
}

/// Ask the backend a question of the relay's own, in a query between the
/// client's (its answers never reach the client, see `Pending::Probe`):
/// the first value of its first row; none when it has none, failed, or
/// took longer than a few seconds (the message then goes on as if the
/// answer were no).
async fn probe<W: AsyncWrite + Unpin>(
    state: &RelayState,
    writer: &mut W,
    question: &str,
) -> Option<String> {
    let (done, answer) = tokio::sync::oneshot::channel();
    if let Ok(mut pending) = state.pending.lock() {
        pending.push_back(Pending::Probe {
            value: None,
            done: Some(done),
        });
        state.probes.fetch_add(1, Ordering::SeqCst);
    }
    let mut out = BytesMut::new();
    protocol::query(&mut out, question);
    if writer.write_all(&out).await.is_err() || writer.flush().await.is_err() {
        return None;
    }
    tokio::time::timeout(std::time::Duration::from_secs(5), answer)
        .await
        .ok()
        .and_then(Result::ok)
        .flatten()
}

/// (Transaction pooling) note a statement that may leave session state,
/// and forget the named statements `DISCARD ALL` or `DEALLOCATE ALL`
/// drops.
fn note_session_state(state: &RelayState, tag: u8, body: &[u8]) {
    let text = match tag {
        b'Q' => protocol::read_cstr(body).map_or("", |(sql, _)| sql),
        _ => protocol::read_cstr(body)
            .and_then(|(_, rest)| protocol::read_cstr(rest))
            .map_or("", |(sql, _)| sql),
    };
    for statement in split_statements(text) {
        if !chorus_router::may_keep_session_state(statement) {
            continue;
        }
        state.session_touched.store(true, Ordering::Relaxed);
        let words: Vec<&str> = statement.split_whitespace().take(2).collect();
        if let [first, second] = words.as_slice() {
            let all = second.trim_end_matches(';').eq_ignore_ascii_case("all");
            if all
                && (first.eq_ignore_ascii_case("discard")
                    || first.eq_ignore_ascii_case("deallocate"))
            {
                if let Ok(mut prepared) = state.prepared.lock() {
                    *prepared = Default::default();
                }
            }
        }
    }
}

/// A string literal of `text`, read alike whatever the session's
/// standard_conforming_strings.
pub(super) fn quote_literal(text: &str) -> String {
    format!("E'{}'", text.replace('\\', "\\\\").replace('\'', "''"))
}

/// Whether a statement ends a transaction by committing it (in an aborted
/// transaction PostgreSQL answers these with ROLLBACK, no error).
pub(super) fn ends_transaction(sql: &str) -> bool {
    let words: Vec<String> = sql
        .split(|c: char| c.is_whitespace() || c == ';')
        .filter(|w| !w.is_empty())
        .take(2)
        .map(str::to_ascii_lowercase)
        .collect();
    match words.first().map(String::as_str) {
        Some("commit" | "end") => true,
        Some("prepare") => words.get(1).is_some_and(|w| w == "transaction"),
        _ => false,
    }
}

/// The `chorus.commit_scope` changes in a statement's text, or a refusal
/// to send instead when a value is invalid.
pub(super) fn scope_changes_in(sql: &str) -> Result<Vec<ScopeChange>, BytesMut> {
    let changes = scope::scope_changes(sql);
    if changes.contains(&ScopeChange::Invalid) {
        return Err(refusal_query(
            "22023",
            "invalid value for parameter \"chorus.commit_scope\"",
            "Available values: local, majority, all.",
        ));
    }
    Ok(changes)
}

/// Make commit scope changes the session's.
pub(super) fn apply_scope_changes(state: &RelayState, changes: &[ScopeChange]) {
    for change in changes {
        match *change {
            ScopeChange::Session(s) => state
                .scope_session
                .store(scope::encode(Some(s)), Ordering::SeqCst),
            ScopeChange::Local(s) => state
                .scope_local
                .store(scope::encode(Some(s)), Ordering::SeqCst),
            ScopeChange::Reset => {
                state.scope_session.store(0, Ordering::SeqCst);
                state.scope_local.store(0, Ordering::SeqCst);
            }
            ScopeChange::Invalid => {}
        }
    }
}
