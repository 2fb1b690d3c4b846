//! Read routing in transaction pooling (`read_routing = any`): which
//! requests are reads a session may run elsewhere, and on which backends,
//! so that a session never reads older data than it wrote (a backend
//! qualifies once its stream has applied the home backend up to a position
//! read after the session's last write).

use std::sync::atomic::Ordering;

use crate::node::Node;
use crate::wire::protocol;

use super::carried::Pooled;
use super::state::{ClientSide, RelayState, MOVE_LIMIT};

/// Where a read-only transaction may run under `read_routing = any`: the
/// healthy backends that have the session's last write, in an order that
/// turns from one transaction to the next. `None`: where the session's
/// transactions go anyway (routing `home`, or nothing known to have its
/// last write but where it was made).
pub(super) async fn read_backends<'a>(
    node: &'a Node,
    state: &RelayState,
    lane: &crate::lane::Lane,
    pooled: &mut Pooled,
    candidates: &[&'a crate::config::BackendConfig],
) -> Option<Vec<&'a crate::config::BackendConfig>> {
    let any = node.config.pool.read_routing == crate::config::ReadRouting::Any;
    // (This node's stream positions tell what the peers have of its home
    // backend only while it drives the home's streams.)
    if !state.reads_anywhere(any) || !node.drives_home.load(Ordering::Relaxed) {
        return None;
    }
    let home = &node.config.home_backend().name;
    let up: Vec<&crate::config::BackendConfig> = candidates
        .iter()
        .copied()
        .filter(|b| !node.is_backend_down(&b.name))
        .collect();
    let last = state.last_write.lock().ok().and_then(|l| l.clone());
    let lsn = match last {
        None => None,
        // Made elsewhere (the home was down): only there for certain.
        Some((backend, _)) if backend != *home => {
            return Some(up.into_iter().filter(|b| b.name == backend).collect())
                .filter(|only: &Vec<_>| !only.is_empty());
        }
        Some((_, Some(lsn))) => Some(lsn),
        Some((backend, None)) => {
            // A position of the home at or after the write's commit, asked
            // once per write.
            let lsn = lane.progress.flush_position(MOVE_LIMIT).await?;
            if let Ok(mut last) = state.last_write.lock() {
                *last = Some((backend, Some(lsn)));
            }
            Some(lsn)
        }
    };
    let mut ready: Vec<_> = up
        .into_iter()
        .filter(|b| b.name == *home || lsn.is_none_or(|lsn| lane.progress.applied(&b.name, lsn)))
        .collect();
    if ready.is_empty() {
        return None;
    }
    pooled.reads = pooled.reads.wrapping_add(1);
    let turn = pooled.reads % ready.len();
    ready.rotate_left(turn);
    Some(ready)
}

/// Whether the client's next request, buffered whole, is a read-only
/// transaction of its own: a Query whose statements all read, or an
/// extended-protocol batch up to its Sync whose statements all read.
/// (Anything else, `BEGIN` included, runs where writes do.)
pub(super) fn read_only_request(client: &ClientSide, max: usize) -> bool {
    use chorus_router::StatementClass;
    let buf = &client.pump.buf[..];
    let Ok(Some((tag, total))) = protocol::frame_header(buf, max) else {
        return false;
    };
    let (Some(body), Some(rest)) = (buf.get(5..total), buf.get(total..)) else {
        return false;
    };
    match tag {
        b'Q' => {
            let Ok((sql, _)) = protocol::read_sql(body) else {
                return false;
            };
            let summary = chorus_router::classify_query(&sql);
            summary.strongest == Some(StatementClass::Read)
                && summary.counts[StatementClass::Transaction.index()] == 0
        }
        b'P' | b'B' | b'D' | b'E' | b'C' => {
            batch_complete(rest, max)
                && !client
                    .frontend
                    .batch_has(tag, body, rest, |c| c != StatementClass::Read)
        }
        _ => false,
    }
}

/// Whether `rest` holds whole messages up to a Sync.
fn batch_complete(mut rest: &[u8], max: usize) -> bool {
    loop {
        let Ok(Some((tag, total))) = protocol::frame_header(rest, max) else {
            return false;
        };
        if rest.len() < total {
            return false;
        }
        if tag == b'S' {
            return true;
        }
        rest = &rest[total..];
    }
}
