//! The admin console's commands that change something: `DRAIN`, `RESUME`
//! and `SWITCHOVER` go through Raft, so every node follows them (see
//! `Node::set_routing`), and answer once this node has applied them;
//! `RELOAD` reads this node's configuration file again; `REJOIN` copies a
//! backend again (see `cluster::rejoin`), telling each step as it goes,
//! and `JOIN` copies a new one, announced by `ADD BACKEND`, the same way.

use std::time::Duration;

use chorus_consensus::Request;

use crate::config::Routing;
use crate::lane::ddl_progress::PgError;
use crate::node::{Node, ReloadError};

/// How long a command waits for Raft.
const LIMIT: Duration = Duration::from_secs(5);

fn error(code: &str, message: String, hint: Option<&str>) -> PgError {
    PgError {
        code: code.into(),
        message,
        detail: None,
        hint: hint.map(str::to_owned),
    }
}

/// The backend a command names (quotes around it allowed), one this node
/// knows.
fn backend(node: &Node, named: &str) -> Result<String, PgError> {
    let name = named.trim_matches(|c| c == '"' || c == '\'');
    let backends = node.backends();
    backends
        .iter()
        .find(|b| b.name == name)
        .map(|b| b.name.clone())
        .ok_or_else(|| {
            let known: Vec<&str> = backends.iter().map(|b| b.name.as_str()).collect();
            error(
                "42704",
                format!("backend \"{name}\" does not exist"),
                Some(&format!("The backends are: {}.", known.join(", "))),
            )
        })
}

/// This node's Raft state, for a command that changes the cluster.
fn cluster_of(node: &Node) -> Result<&std::sync::Arc<chorus_consensus::Consensus>, PgError> {
    node.consensus()
        .ok_or_else(|| error("55000", "this node is not part of a cluster".into(), None))
}

/// Propose `request`, then wait until this node has applied it (`done`).
async fn run(
    node: &Node,
    request: Request,
    done: impl Fn(&chorus_consensus::ClusterState) -> bool,
) -> Result<(), PgError> {
    let consensus = cluster_of(node)?;
    consensus.propose(request, LIMIT).await.map_err(|e| {
        error(
            "55000",
            format!("the cluster did not take the command: {e}"),
            Some("A majority of the nodes must be reachable; retry."),
        )
    })?;
    let applied = async {
        let mut routing = consensus.state().routing();
        while !consensus.state().read(&done) {
            if routing.changed().await.is_err() {
                return;
            }
        }
    };
    let _ = tokio::time::timeout(LIMIT, applied).await;
    Ok(())
}

/// `DRAIN backend`: no new session goes to it, and the sessions on it move
/// off between transactions; replication keeps it current.
pub(super) async fn drain(node: &Node, named: &str) -> Result<(), PgError> {
    let name = &backend(node, named)?;
    let consensus = cluster_of(node)?;
    let (drained, leader) = consensus
        .state()
        .read(|s| (s.drained.clone(), s.write_leader.clone()));
    if node.config.node.routing == Routing::Leader && leader.as_deref() == Some(name) {
        return Err(error(
            "55000",
            format!("backend \"{name}\" is the write leader"),
            Some("Move the write leader first: SWITCHOVER <another backend>."),
        ));
    }
    let others = node
        .backends()
        .iter()
        .any(|b| b.name != *name && !drained.contains(&b.name));
    if !others {
        return Err(error(
            "55000",
            format!("backend \"{name}\" is the last one that takes sessions"),
            Some("RESUME another backend first."),
        ));
    }
    let owned = name.to_owned();
    run(
        node,
        Request::SetDrained {
            backend: owned.clone(),
            drained: true,
        },
        move |s| s.drained.contains(&owned),
    )
    .await
}

/// `RESUME backend`: it takes sessions again.
pub(super) async fn resume(node: &Node, named: &str) -> Result<(), PgError> {
    let name = backend(node, named)?;
    let owned = name.clone();
    run(
        node,
        Request::SetDrained {
            backend: name,
            drained: false,
        },
        move |s| !s.drained.contains(&owned),
    )
    .await
}

/// `SWITCHOVER backend`: under write-leader routing, make it the write
/// leader; sessions on the old one move to it between transactions.
pub(super) async fn switchover(node: &Node, named: &str) -> Result<(), PgError> {
    let name = backend(node, named)?;
    if node.config.node.routing != Routing::Leader {
        return Err(error(
            "55000",
            "this cluster has no write leader: every backend takes writes".into(),
            Some("SWITCHOVER applies under write-leader routing (node.routing = \"leader\")."),
        ));
    }
    if node.is_backend_down(&name) {
        return Err(error("55000", format!("backend \"{name}\" is down"), None));
    }
    let consensus = cluster_of(node)?;
    let (drained, current) = consensus
        .state()
        .read(|s| (s.drained.contains(&name), s.write_leader.clone()));
    if drained {
        return Err(error(
            "55000",
            format!("backend \"{name}\" is drained"),
            Some("RESUME it first."),
        ));
    }
    let owned = name.clone();
    run(
        node,
        Request::SetWriteLeader {
            backend: name,
            expected: current,
        },
        move |s| s.write_leader.as_deref() == Some(owned.as_str()),
    )
    .await?;
    // The leader may have moved again meanwhile (it was found down).
    let now = consensus.state().read(|s| s.write_leader.clone());
    if now.as_deref() != Some(named.trim_matches(|c| c == '"' || c == '\'')) {
        return Err(error(
            "40001",
            format!(
                "the write leader moved meanwhile, to {}",
                now.as_deref().unwrap_or("none")
            ),
            Some("Look at SHOW BACKENDS, and retry."),
        ));
    }
    Ok(())
}

/// How long `RELOAD` waits for an `ADD BACKEND` made through another node
/// to reach this one.
const ANNOUNCEMENT_WAIT: Duration = Duration::from_secs(5);

/// `RELOAD`: this node reads its configuration file again and takes the
/// settings it can without a restart (see `node::Live`), and the backends
/// announced by `ADD BACKEND` that the file adds; which settings changed
/// in the file but wait for a restart.
pub(super) async fn reload(node: &Node) -> Result<crate::node::Reloaded, PgError> {
    // A backend announced through another node a moment ago reaches this
    // node's copy of the cluster state within a heartbeat or so: it is
    // waited for, briefly, before the file is refused for it.
    let deadline = tokio::time::Instant::now() + ANNOUNCEMENT_WAIT;
    let mut reloaded = node.reload();
    while matches!(reloaded, Err(ReloadError::NotAnnounced(_)))
        && tokio::time::Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(50)).await;
        reloaded = node.reload();
    }
    reloaded.map_err(|e| match e {
        ReloadError::NoFile => error("55000", e.to_string(), None),
        ReloadError::Invalid(why) | ReloadError::NotAnnounced(why) => error(
            "F0000",
            format!("the configuration was not reloaded: {why}"),
            Some("The node keeps the settings it had. Mend the file and RELOAD again."),
        ),
    })
}

/// `ADD BACKEND name`: the cluster expects a new backend by that name.
/// Until `JOIN name FROM source` has copied it, no node sends it a session
/// or a stream, or applies the DDL log to it, whether or not its
/// configuration names it yet (it is `copying`, see `Node::set_routing`):
/// each node can then take it into its configuration with `RELOAD` (no
/// restart, no client disturbed), and the new node be started, before the
/// copy.
pub(super) async fn add_backend(node: &Node, named: &str) -> Result<(), PgError> {
    let name = named.trim_matches(|c| c == '"' || c == '\'');
    let valid = !name.is_empty()
        && name.len() <= 63
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
    if !valid {
        return Err(error(
            "42602",
            format!("invalid backend name \"{name}\""),
            Some("A backend's name is the one in the [[backends]] configuration: letters, digits, '_' and '-'."),
        ));
    }
    let consensus = cluster_of(node)?;
    let (expected, member) = consensus
        .state()
        .read(|s| (s.copying.contains(name), s.owner_of(name).is_some()));
    if expected {
        return Ok(());
    }
    if member || node.backend_index(name).is_some() {
        return Err(error(
            "42710",
            format!("backend \"{name}\" is already in the cluster"),
            Some("To copy it again from a peer: REJOIN <backend> FROM <source>."),
        ));
    }
    let owned = name.to_owned();
    run(
        node,
        Request::SetCopying {
            backend: owned.clone(),
            copying: true,
        },
        move |s| s.copying.contains(&owned),
    )
    .await
}

/// `DROP BACKEND name`: forget a backend announced by `ADD BACKEND` that
/// has not joined (no node has it as its home yet), as when the name was
/// mistyped or the join is given up. A member of the cluster leaves with
/// `chorus cluster remove-node` instead.
pub(super) async fn drop_backend(node: &Node, named: &str) -> Result<(), PgError> {
    let name = named.trim_matches(|c| c == '"' || c == '\'');
    let consensus = cluster_of(node)?;
    let (expected, member) = consensus
        .state()
        .read(|s| (s.copying.contains(name), s.owner_of(name).is_some()));
    if member {
        return Err(error(
            "55000",
            format!("backend \"{name}\" is the home of a node of the cluster"),
            Some(
                "A backend leaves with its node: chorus cluster remove-node --id N --backend NAME.",
            ),
        ));
    }
    if !expected {
        return Err(error(
            "42704",
            format!("backend \"{name}\" was not announced"),
            Some("DROP BACKEND forgets a name given to ADD BACKEND."),
        ));
    }
    if node.backend_index(name).is_some() {
        // (Once no longer announced, the nodes that know it would stream
        // to it as to any member.)
        return Err(error(
            "55000",
            format!("backend \"{name}\" is in this node's [[backends]]"),
            Some("Take it out of every node's configuration and restart those nodes first."),
        ));
    }
    let owned = name.to_owned();
    run(
        node,
        Request::SetCopying {
            backend: owned.clone(),
            copying: false,
        },
        move |s| !s.copying.contains(&owned),
    )
    .await
}

/// The command tag and backends of `REJOIN <backend> FROM <source>`, or of
/// `JOIN <backend> FROM <source>` (quotes allowed), when `sql` is one.
pub(super) fn rejoin_named(sql: &str) -> Option<(&'static str, String, String)> {
    let words: Vec<&str> = sql
        .trim()
        .trim_end_matches(';')
        .split_whitespace()
        .collect();
    let unquote = |w: &str| w.trim_matches(|c| c == '"' || c == '\'').to_owned();
    match words.as_slice() {
        [command, target, from, source] if from.eq_ignore_ascii_case("FROM") => {
            let tag = ["REJOIN", "JOIN"]
                .into_iter()
                .find(|tag| command.eq_ignore_ascii_case(tag))?;
            Some((tag, unquote(target), unquote(source)))
        }
        _ => None,
    }
}

/// `REJOIN <backend> FROM <source>` (or `JOIN`, `tag`): each step goes to
/// the client as a NOTICE when it happens; then the tag or the error. (If
/// the client leaves, the copy stops where it is, and the backend stays
/// out until a copy completes.)
pub(super) async fn rejoin<S>(
    node: &Node,
    client: &mut S,
    tag: &str,
    target: &str,
    source: &str,
    out: &mut bytes::BytesMut,
) -> std::io::Result<()>
where
    S: tokio::io::AsyncWrite + Unpin,
{
    use tokio::io::AsyncWriteExt;
    let (tx, mut steps) = tokio::sync::mpsc::unbounded_channel::<String>();
    let progress = |step: String| {
        tracing::info!(%step, "rejoin");
        node.set_copy_step(Some((target.to_owned(), step.clone())));
        let _ = tx.send(step);
    };
    let copy = crate::cluster::rejoin::rejoin(node, target, source, &progress);
    tokio::pin!(copy);
    let outcome = loop {
        tokio::select! {
            outcome = &mut copy => break outcome,
            Some(step) = steps.recv() => {
                let mut notice = bytes::BytesMut::new();
                crate::wire::protocol::notice(&mut notice, &step);
                client.write_all(&notice).await?;
            }
        }
    };
    node.set_copy_step(None);
    while let Ok(step) = steps.try_recv() {
        crate::wire::protocol::notice(out, &step);
    }
    match outcome {
        Ok(done) => {
            crate::wire::protocol::notice(
                out,
                &format!(
                    "{} database(s) copied, {} role(s) made, {} global sequence(s) moved to {target}'s own values, {} session(s) ended",
                    done.databases, done.roles, done.sequences, done.sessions_ended
                ),
            );
            crate::wire::protocol::write_message(out, b'C', |m| {
                crate::wire::protocol::put_cstr(m, tag)
            });
        }
        Err(crate::cluster::rejoin::RejoinError::Refused(code, message, hint)) => {
            error(code, message, hint.as_deref()).write(out)
        }
        Err(e) => error(
            "58000",
            format!("the copy of {target} failed: {e}"),
            Some("The backend stays out of the cluster (no session, no replication) until a copy completes: fix the cause and run it again."),
        )
        .write(out),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::rejoin_named;

    #[test]
    fn rejoin_and_join_name_their_backends() {
        assert_eq!(
            rejoin_named("REJOIN pg3 FROM pg1;"),
            Some(("REJOIN", "pg3".to_owned(), "pg1".to_owned()))
        );
        assert_eq!(
            rejoin_named("  join \"pg4\" from 'pg2' "),
            Some(("JOIN", "pg4".to_owned(), "pg2".to_owned()))
        );
        assert_eq!(rejoin_named("JOIN pg4"), None);
        assert_eq!(rejoin_named("ADD BACKEND pg4"), None);
        assert_eq!(rejoin_named("REJOIN pg4 TO pg1"), None);
    }
}
