//! Commit scopes: a session's `chorus.commit_scope` setting, and the
//! replication progress a commit waits on.
//!
//! The wait needs no log positions from the client's transaction: each
//! peer stream counts the steps it starts, and records the last step that
//! read the origin's changes to their end and applied them. A step that
//! starts after a commit has returned reads past that commit, so once a
//! peer's last complete step is newer than its step count seen at commit
//! time, the peer has the transaction.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::sync::{watch, Notify};

use crate::config::CommitScope;

/// A change of the session's commit scope found in a statement.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScopeChange {
    /// `SET [SESSION] chorus.commit_scope = …`
    Session(CommitScope),
    /// `SET LOCAL chorus.commit_scope = …`: until the transaction ends.
    Local(CommitScope),
    /// `RESET chorus.commit_scope`, `RESET ALL`, `DISCARD ALL`,
    /// `SET chorus.commit_scope TO DEFAULT`: back to the node's default.
    Reset,
    /// A value that is not a commit scope.
    Invalid,
}

/// Find commit scope changes in a query string (statements separated by
/// semicolons; quoted text is not looked into for separators). Only
/// statements that mention `commit_scope`, or are `RESET ALL` / `DISCARD
/// ALL`, are examined, so ordinary statements cost one substring search.
pub fn scope_changes(sql: &str) -> Vec<ScopeChange> {
    let lower = sql.to_ascii_lowercase();
    if !lower.contains("commit_scope") && !lower.contains("all") {
        return Vec::new();
    }
    split_statements(&lower)
        .filter_map(parse_statement)
        .collect()
}

fn split_statements(sql: &str) -> impl Iterator<Item = &str> {
    let mut parts = Vec::new();
    let mut start = 0;
    let mut quote: Option<char> = None;
    for (i, c) in sql.char_indices() {
        match (quote, c) {
            (Some(q), c) if c == q => quote = None,
            (Some(_), _) => {}
            (None, '\'' | '"') => quote = Some(c),
            (None, ';') => {
                parts.push(&sql[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    parts.push(&sql[start..]);
    parts.into_iter()
}

fn parse_statement(statement: &str) -> Option<ScopeChange> {
    let words: Vec<&str> = statement
        .split(|c: char| c.is_whitespace() || c == '=')
        .filter(|w| !w.is_empty())
        .collect();
    match words.as_slice() {
        ["reset", "all"] | ["discard", "all"] => Some(ScopeChange::Reset),
        ["reset", name] if is_scope(name) => Some(ScopeChange::Reset),
        ["set", rest @ ..] => {
            let (local, rest) = match rest {
                ["local", rest @ ..] => (true, rest),
                ["session", rest @ ..] => (false, rest),
                _ => (false, rest),
            };
            let (name, value) = match rest {
                [name, "to", value] | [name, value] => (*name, *value),
                _ => return None,
            };
            if !is_scope(name) {
                return None;
            }
            let value = value.trim_matches(|c| c == '\'' || c == '"');
            if value == "default" {
                return Some(ScopeChange::Reset);
            }
            Some(match CommitScope::parse(value) {
                Some(scope) if local => ScopeChange::Local(scope),
                Some(scope) => ScopeChange::Session(scope),
                None => ScopeChange::Invalid,
            })
        }
        _ => None,
    }
}

fn is_scope(name: &str) -> bool {
    name.trim_matches('"') == "chorus.commit_scope"
}

/// Encoding of an optional scope in an atomic byte.
pub fn encode(scope: Option<CommitScope>) -> u8 {
    match scope {
        None => 0,
        Some(CommitScope::Local) => 1,
        Some(CommitScope::Majority) => 2,
        Some(CommitScope::All) => 3,
    }
}

pub fn decode(byte: u8) -> Option<CommitScope> {
    match byte {
        1 => Some(CommitScope::Local),
        2 => Some(CommitScope::Majority),
        3 => Some(CommitScope::All),
        _ => None,
    }
}

/// One peer stream's progress.
struct PeerProgress {
    peer: String,
    /// Steps started so far.
    started: AtomicU64,
    /// The newest step (by start number) that read the origin's changes to
    /// their end and applied them.
    done: AtomicU64,
    /// Wakes the stream when a session commits a write.
    wake: Notify,
}

/// How far this node's replication streams (one per peer backend, each
/// running on its own) have brought its home backend's changes.
pub struct ReplicationProgress {
    peers: Vec<PeerProgress>,
    /// Bumped after every step, for waiters.
    changed: watch::Sender<u64>,
    /// Backends in the cluster, the home backend included.
    backends: usize,
}

/// What a commit waits on: each peer's started-step count at commit time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ticket(Vec<u64>);

impl ReplicationProgress {
    pub fn new(peers: &[String], backends: usize) -> ReplicationProgress {
        ReplicationProgress {
            peers: peers
                .iter()
                .map(|p| PeerProgress {
                    peer: p.clone(),
                    started: AtomicU64::new(0),
                    done: AtomicU64::new(0),
                    wake: Notify::new(),
                })
                .collect(),
            changed: watch::channel(0).0,
            backends,
        }
    }

    fn peer(&self, peer: &str) -> Option<&PeerProgress> {
        self.peers.iter().find(|p| p.peer == peer)
    }

    /// The stream to `peer` starts a step; returns its number.
    pub fn start_step(&self, peer: &str) -> u64 {
        self.peer(peer)
            .map_or(0, |p| p.started.fetch_add(1, Ordering::SeqCst) + 1)
    }

    /// The stream to `peer` read to the end and applied in step `step`.
    pub fn peer_done(&self, peer: &str, step: u64) {
        if let Some(p) = self.peer(peer) {
            p.done.fetch_max(step, Ordering::SeqCst);
        }
        self.changed.send_modify(|v| *v += 1);
    }

    /// Wake every stream (a write committed).
    pub fn wake(&self) {
        for p in &self.peers {
            p.wake.notify_one();
        }
    }

    /// For the stream to `peer`: sleep until woken or `idle` passes.
    pub async fn idle(&self, peer: &str, idle: Duration) {
        match self.peer(peer) {
            Some(p) => {
                let _ = tokio::time::timeout(idle, p.wake.notified()).await;
            }
            None => tokio::time::sleep(idle).await,
        }
    }

    /// A ticket for a transaction that has just committed.
    pub fn ticket(&self) -> Ticket {
        Ticket(
            self.peers
                .iter()
                .map(|p| p.started.load(Ordering::SeqCst))
                .collect(),
        )
    }

    /// Backends known to have the transaction of `ticket`, the home
    /// backend included: a step that started after the commit returned
    /// read past it.
    pub fn reached(&self, ticket: &Ticket) -> usize {
        1 + self
            .peers
            .iter()
            .zip(&ticket.0)
            .filter(|(p, at_commit)| p.done.load(Ordering::SeqCst) > **at_commit)
            .count()
    }

    /// Wait until `scope` is satisfied for `ticket`, at most `limit`.
    /// Returns how many backends had it then, and whether that was enough.
    pub async fn wait(
        &self,
        ticket: &Ticket,
        scope: CommitScope,
        limit: Duration,
    ) -> (usize, bool) {
        let needed = scope.required(self.backends);
        let mut changes = self.changed.subscribe();
        let deadline = tokio::time::Instant::now() + limit;
        self.wake();
        loop {
            let reached = self.reached(ticket);
            if reached >= needed {
                return (reached, true);
            }
            match tokio::time::timeout_at(deadline, changes.changed()).await {
                Ok(Ok(())) => {}
                // The replicator is gone or time is up.
                Ok(Err(_)) | Err(_) => return (self.reached(ticket), false),
            }
        }
    }

    pub fn backends(&self) -> usize {
        self.backends
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn set_and_reset_forms_are_recognized() {
        use CommitScope::*;
        use ScopeChange as C;
        let cases: &[(&str, &[ScopeChange])] = &[
            ("SET chorus.commit_scope = 'all'", &[C::Session(All)]),
            (
                "set chorus.commit_scope to majority",
                &[C::Session(Majority)],
            ),
            (
                "SET SESSION chorus.commit_scope='local'",
                &[C::Session(Local)],
            ),
            ("SET LOCAL chorus.commit_scope = all", &[C::Local(All)]),
            ("RESET chorus.commit_scope", &[C::Reset]),
            ("SET chorus.commit_scope TO DEFAULT", &[C::Reset]),
            ("RESET ALL", &[C::Reset]),
            ("discard all", &[C::Reset]),
            ("SET chorus.commit_scope = 'most'", &[C::Invalid]),
            (
                "BEGIN; SET LOCAL chorus.commit_scope = 'majority'; INSERT INTO t VALUES ('a;b')",
                &[C::Local(Majority)],
            ),
            ("SELECT 'chorus.commit_scope'", &[]),
            ("SET search_path = public", &[]),
            ("SELECT * FROM t WHERE x = ALL (ARRAY[1])", &[]),
        ];
        for (sql, expected) in cases {
            assert_eq!(&scope_changes(sql), expected, "{sql}");
        }
    }

    #[test]
    fn required_backends() {
        assert_eq!(CommitScope::Majority.required(3), 2);
        assert_eq!(CommitScope::Majority.required(4), 3);
        assert_eq!(CommitScope::All.required(3), 3);
        assert_eq!(CommitScope::Local.required(3), 1);
    }

    #[tokio::test]
    async fn a_commit_waits_for_steps_started_after_it() {
        let progress = ReplicationProgress::new(&["b".into(), "c".into()], 3);
        let before = progress.start_step("b");
        let ticket = progress.ticket();
        // A step that started before the commit does not count.
        progress.peer_done("b", before);
        assert_eq!(progress.reached(&ticket), 1);
        let step = progress.start_step("b");
        progress.peer_done("b", step);
        assert_eq!(progress.reached(&ticket), 2);
        let (reached, ok) = progress
            .wait(&ticket, CommitScope::Majority, Duration::from_millis(10))
            .await;
        assert_eq!((reached, ok), (2, true));
        let (reached, ok) = progress
            .wait(&ticket, CommitScope::All, Duration::from_millis(50))
            .await;
        assert_eq!((reached, ok), (2, false));
    }
}
