//! Commit scopes: a session's `chorus.commit_scope` setting, and the
//! replication progress a commit waits on.
//!
//! The wait needs no log positions from the client's transaction: the
//! replicator counts rounds (one pass over every peer stream), and records
//! per peer the last round whose step read the origin's changes to their
//! end and applied them. A round that starts after a commit has returned
//! reads past that commit, so once a peer's completed round is newer than
//! the round counter seen at commit time, the peer has the transaction.

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

/// How far this node's replicator has brought its home backend's changes
/// to each peer, in rounds.
pub struct ReplicationProgress {
    /// Rounds started so far.
    round: AtomicU64,
    /// Per peer backend: the newest round whose step read to the end of the
    /// origin's changes and applied them.
    done: Vec<(String, AtomicU64)>,
    /// Bumped after every step, for waiters.
    changed: watch::Sender<u64>,
    /// Wakes the replicator when a session commits a write.
    wake: Notify,
    /// Backends in the cluster, the home backend included.
    backends: usize,
}

impl ReplicationProgress {
    pub fn new(peers: &[String], backends: usize) -> ReplicationProgress {
        ReplicationProgress {
            round: AtomicU64::new(0),
            done: peers
                .iter()
                .map(|p| (p.clone(), AtomicU64::new(0)))
                .collect(),
            changed: watch::channel(0).0,
            wake: Notify::new(),
            backends,
        }
    }

    /// The replicator starts a round; returns its number.
    pub fn start_round(&self) -> u64 {
        self.round.fetch_add(1, Ordering::SeqCst) + 1
    }

    /// The replicator brought `peer` up to date in `round`.
    pub fn peer_done(&self, peer: &str, round: u64) {
        if let Some((_, done)) = self.done.iter().find(|(p, _)| p == peer) {
            done.fetch_max(round, Ordering::SeqCst);
        }
        self.changed.send_modify(|v| *v += 1);
    }

    /// Wake the replicator (a write committed).
    pub fn wake(&self) {
        self.wake.notify_one();
    }

    /// For the replicator: sleep until woken or `idle` passes.
    pub async fn idle(&self, idle: Duration) {
        let _ = tokio::time::timeout(idle, self.wake.notified()).await;
    }

    /// A ticket for a transaction that has just committed.
    pub fn ticket(&self) -> u64 {
        self.round.load(Ordering::SeqCst)
    }

    /// Backends known to have the transaction of `ticket`, the home
    /// backend included.
    pub fn reached(&self, ticket: u64) -> usize {
        1 + self
            .done
            .iter()
            .filter(|(_, done)| done.load(Ordering::SeqCst) > ticket)
            .count()
    }

    /// Wait until `scope` is satisfied for `ticket`, at most `limit`.
    /// Returns how many backends had it then, and whether that was enough.
    pub async fn wait(&self, ticket: u64, scope: CommitScope, limit: Duration) -> (usize, bool) {
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
    async fn a_commit_waits_for_rounds_started_after_it() {
        let progress = ReplicationProgress::new(&["b".into(), "c".into()], 3);
        let before = progress.start_round();
        let ticket = progress.ticket();
        // A round that started before the commit does not count.
        progress.peer_done("b", before);
        assert_eq!(progress.reached(ticket), 1);
        let round = progress.start_round();
        progress.peer_done("b", round);
        assert_eq!(progress.reached(ticket), 2);
        let (reached, ok) = progress
            .wait(ticket, CommitScope::Majority, Duration::from_millis(10))
            .await;
        assert_eq!((reached, ok), (2, true));
        let (reached, ok) = progress
            .wait(ticket, CommitScope::All, Duration::from_millis(50))
            .await;
        assert_eq!((reached, ok), (2, false));
    }
}
