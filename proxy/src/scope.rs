//! Commit scopes: a session's `chorus.commit_scope` setting, and the
//! replication progress a commit waits on.
//!
//! Each peer stream publishes the origin WAL position up to which the peer
//! has everything (the end of the last transaction it applied, or the
//! server's sent position when it has applied all it received). A commit
//! waits until enough peers are past the home backend's WAL flush position
//! read just after the commit returned.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use chorus_router::split_statements;
use tokio::sync::{mpsc, oneshot, watch, Notify};

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

/// Find commit scope changes in a query string. Only
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

/// A SET/RESET of one setting, with its raw (lower-cased) value.
enum SetStatement<'a> {
    Session(&'a str),
    Local(&'a str),
    Reset,
}

/// Parse a statement that sets or resets the setting `name` (or resets
/// everything).
fn parse_set<'a>(statement: &'a str, name: &str) -> Option<SetStatement<'a>> {
    let words: Vec<&str> = statement
        .split(|c: char| c.is_whitespace() || c == '=')
        .filter(|w| !w.is_empty())
        .collect();
    let is_name = |w: &str| w.trim_matches('"') == name;
    match words.as_slice() {
        ["reset", "all"] | ["discard", "all"] => Some(SetStatement::Reset),
        ["reset", setting] if is_name(setting) => Some(SetStatement::Reset),
        ["set", rest @ ..] => {
            let (local, rest) = match rest {
                ["local", rest @ ..] => (true, rest),
                ["session", rest @ ..] => (false, rest),
                _ => (false, rest),
            };
            let (setting, value) = match rest {
                [setting, "to", value] | [setting, value] => (*setting, *value),
                _ => return None,
            };
            if !is_name(setting) {
                return None;
            }
            let value = value.trim_matches(|c| c == '\'' || c == '"');
            Some(match (value, local) {
                ("default", _) => SetStatement::Reset,
                (value, true) => SetStatement::Local(value),
                (value, false) => SetStatement::Session(value),
            })
        }
        _ => None,
    }
}

fn parse_statement(statement: &str) -> Option<ScopeChange> {
    Some(match parse_set(statement, "chorus.commit_scope")? {
        SetStatement::Reset => ScopeChange::Reset,
        SetStatement::Local(value) => {
            CommitScope::parse(value).map_or(ScopeChange::Invalid, ScopeChange::Local)
        }
        SetStatement::Session(value) => {
            CommitScope::parse(value).map_or(ScopeChange::Invalid, ScopeChange::Session)
        }
    })
}

/// A change of the session's `chorus.ddl_scope`: whether its DDL runs on
/// this node's backend only (`local`) or through the cluster (`cluster`,
/// the default).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DdlScopeChange {
    /// `SET [SESSION] chorus.ddl_scope = …` (true: local).
    Session(bool),
    /// `SET LOCAL chorus.ddl_scope = …`, until the transaction ends.
    Local(bool),
    Reset,
    Invalid,
}

/// Find `chorus.ddl_scope` changes in a query string.
pub fn ddl_scope_changes(sql: &str) -> Vec<DdlScopeChange> {
    let lower = sql.to_ascii_lowercase();
    if !lower.contains("ddl_scope") && !lower.contains("all") {
        return Vec::new();
    }
    let local = |value: &str| match value {
        "local" => Some(true),
        "cluster" => Some(false),
        _ => None,
    };
    split_statements(&lower)
        .filter_map(|statement| {
            Some(match parse_set(statement, "chorus.ddl_scope")? {
                SetStatement::Reset => DdlScopeChange::Reset,
                SetStatement::Local(v) => {
                    local(v).map_or(DdlScopeChange::Invalid, DdlScopeChange::Local)
                }
                SetStatement::Session(v) => {
                    local(v).map_or(DdlScopeChange::Invalid, DdlScopeChange::Session)
                }
            })
        })
        .collect()
}

/// A change of the session's `chorus.read_routing` (transaction pooling:
/// where its read-only transactions run).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReadRoutingChange {
    /// `SET [SESSION] chorus.read_routing = …` (true: any).
    Session(bool),
    /// Back to the node's `pool.read_routing`.
    Reset,
    Invalid,
}

/// Find `chorus.read_routing` changes in a query string (`SET LOCAL`
/// changes nothing: a transaction's backend is chosen before it starts).
pub fn read_routing_changes(sql: &str) -> Vec<ReadRoutingChange> {
    let lower = sql.to_ascii_lowercase();
    if !lower.contains("read_routing") && !lower.contains("all") {
        return Vec::new();
    }
    split_statements(&lower)
        .filter_map(|statement| {
            Some(match parse_set(statement, "chorus.read_routing")? {
                SetStatement::Reset => ReadRoutingChange::Reset,
                SetStatement::Local(_) => return None,
                SetStatement::Session("any") => ReadRoutingChange::Session(true),
                SetStatement::Session("home") => ReadRoutingChange::Session(false),
                SetStatement::Session(_) => ReadRoutingChange::Invalid,
            })
        })
        .collect()
}

/// The settings of Chorus's that a client may give at login, in the
/// `options` startup parameter (`options='-c chorus.read_routing=any'`,
/// as libpq's PGOPTIONS sends it), as it may SET them.
const LOGIN_SETTINGS: &[&str] = &[
    "chorus.commit_scope",
    "chorus.ddl_scope",
    "chorus.read_routing",
];

/// Chorus's own settings in the `options` startup parameter, in order:
/// each as the `SET` statement that makes it (lower case, as the parsers
/// above read statements), and whether its value is one the setting
/// takes. PostgreSQL's `-c name=value` and `--name=value` forms are read;
/// a backslash keeps the character after it.
pub fn login_settings(params: &[(String, String)]) -> Vec<(String, bool)> {
    let Some((_, options)) = params.iter().find(|(name, _)| name == "options") else {
        return Vec::new();
    };
    let mut words = Vec::new();
    let mut word = String::new();
    let mut chars = options.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => word.extend(chars.next()),
            c if c.is_whitespace() => words.push(std::mem::take(&mut word)),
            c => word.push(c),
        }
    }
    words.push(word);
    let mut words = words.into_iter().filter(|w| !w.is_empty());
    let mut settings = Vec::new();
    while let Some(word) = words.next() {
        let setting = match word.strip_prefix("-c") {
            Some("") => words.next(),
            Some(rest) => Some(rest.to_owned()),
            None => word.strip_prefix("--").map(str::to_owned),
        };
        let Some((name, value)) = setting.as_deref().and_then(|s| s.split_once('=')) else {
            continue;
        };
        let name = name.to_ascii_lowercase().replace('-', "_");
        if !LOGIN_SETTINGS.contains(&name.as_str()) {
            continue;
        }
        let value = value.to_ascii_lowercase();
        let plain =
            !value.is_empty() && value.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
        let statement = format!("set {name} = '{}'", if plain { &value } else { "?" });
        let valid = match name.as_str() {
            "chorus.commit_scope" => !scope_changes(&statement).contains(&ScopeChange::Invalid),
            "chorus.ddl_scope" => !ddl_scope_changes(&statement).contains(&DdlScopeChange::Invalid),
            _ => !read_routing_changes(&statement).contains(&ReadRoutingChange::Invalid),
        };
        settings.push((statement, valid));
    }
    settings
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
    /// Origin WAL position up to which everything is on the peer.
    position: AtomicU64,
    /// Wakes the stream when a session commits a write.
    wake: Notify,
}

impl PeerProgress {
    fn new(peer: &str) -> Arc<PeerProgress> {
        Arc::new(PeerProgress {
            peer: peer.to_owned(),
            position: AtomicU64::new(0),
            wake: Notify::new(),
        })
    }
}

/// A request for the home backend's current WAL flush position.
pub type FlushRequest = oneshot::Sender<u64>;

/// How far this node's replication streams (one per peer backend, each
/// running on its own) have brought its home backend's changes.
pub struct ReplicationProgress {
    /// One per peer; a peer joins when a backend is added while the node
    /// runs (see `add_peer`).
    peers: std::sync::RwLock<Arc<Vec<Arc<PeerProgress>>>>,
    /// Bumped whenever a position moves, for waiters.
    changed: watch::Sender<u64>,
    flush_requests: mpsc::UnboundedSender<FlushRequest>,
    /// Served by the replicator while it runs.
    pub flush_requests_rx: tokio::sync::Mutex<mpsc::UnboundedReceiver<FlushRequest>>,
}

impl ReplicationProgress {
    pub fn new(peers: &[String]) -> ReplicationProgress {
        let (flush_requests, rx) = mpsc::unbounded_channel();
        ReplicationProgress {
            peers: std::sync::RwLock::new(Arc::new(
                peers.iter().map(|p| PeerProgress::new(p)).collect(),
            )),
            changed: watch::channel(0).0,
            flush_requests,
            flush_requests_rx: tokio::sync::Mutex::new(rx),
        }
    }

    fn peers(&self) -> Arc<Vec<Arc<PeerProgress>>> {
        match self.peers.read() {
            Ok(peers) => peers.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    fn peer(&self, peer: &str) -> Option<Arc<PeerProgress>> {
        self.peers().iter().find(|p| p.peer == peer).cloned()
    }

    /// A backend joins the cluster: its stream's progress starts at
    /// nothing (once; a peer already there is kept).
    pub fn add_peer(&self, peer: &str) {
        let mut peers = match self.peers.write() {
            Ok(peers) => peers,
            Err(poisoned) => poisoned.into_inner(),
        };
        if peers.iter().all(|p| p.peer != peer) {
            let mut more = peers.as_ref().clone();
            more.push(PeerProgress::new(peer));
            *peers = Arc::new(more);
        }
    }

    /// The stream to `peer` has everything up to origin position `lsn`.
    pub fn advance(&self, peer: &str, lsn: u64) {
        if let Some(p) = self.peer(peer) {
            if p.position.fetch_max(lsn, Ordering::SeqCst) < lsn {
                self.changed.send_modify(|v| *v += 1);
            }
        }
    }

    /// Wake every stream (a write committed, or a commit waits).
    pub fn wake(&self) {
        for p in self.peers().iter() {
            p.wake.notify_one();
        }
    }

    /// For the stream to `peer`: sleep until woken (true) or `idle`
    /// passes (false).
    pub async fn idle(&self, peer: &str, idle: Duration) -> bool {
        match self.peer(peer) {
            Some(p) => tokio::time::timeout(idle, p.wake.notified()).await.is_ok(),
            None => {
                tokio::time::sleep(idle).await;
                false
            }
        }
    }

    /// Backends known to have everything up to origin position `lsn`, the
    /// home backend included.
    pub fn reached(&self, lsn: u64) -> usize {
        1 + self
            .peers()
            .iter()
            .filter(|p| p.position.load(Ordering::SeqCst) >= lsn)
            .count()
    }

    /// Wait until `scope` is satisfied for a transaction that has just
    /// committed on the home backend, at most `limit`. Its position is
    /// bounded by the home backend's WAL flush position now (a commit
    /// returns once flushed). Returns how many backends had it then, and
    /// whether that was enough.
    pub async fn wait(&self, scope: CommitScope, limit: Duration) -> (usize, bool) {
        let needed = scope.required(self.backends());
        if needed <= 1 {
            return (1, true);
        }
        let deadline = tokio::time::Instant::now() + limit;
        let (reply, position) = oneshot::channel();
        if self.flush_requests.send(reply).is_err() {
            return (1, false);
        }
        let lsn = match tokio::time::timeout_at(deadline, position).await {
            Ok(Ok(lsn)) => lsn,
            // The replicator is not running (home backend down) or slow.
            _ => return (1, false),
        };
        let mut changes = self.changed.subscribe();
        self.wake();
        loop {
            let reached = self.reached(lsn);
            if reached >= needed {
                return (reached, true);
            }
            match tokio::time::timeout_at(deadline, changes.changed()).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) | Err(_) => return (self.reached(lsn), false),
            }
        }
    }

    /// Backends in the cluster, the home backend included.
    pub fn backends(&self) -> usize {
        self.peers().len() + 1
    }

    /// The home backend's WAL flush position now (a transaction that has
    /// committed there is at or before it), within `limit`.
    pub async fn flush_position(&self, limit: Duration) -> Option<u64> {
        let (reply, position) = oneshot::channel();
        self.flush_requests.send(reply).ok()?;
        tokio::time::timeout(limit, position).await.ok()?.ok()
    }

    /// Whether `peer` has everything of the home backend up to `lsn`.
    pub fn applied(&self, peer: &str, lsn: u64) -> bool {
        self.peer(peer)
            .is_some_and(|p| p.position.load(Ordering::SeqCst) >= lsn)
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn chorus_settings_given_at_login_are_read_from_options() {
        let params = |options: &str| vec![("options".to_owned(), options.to_owned())];
        let settings = super::login_settings(&params(
            "-c chorus.read_routing=any --chorus.commit-scope=ALL -c work_mem=4MB \
             -cchorus.ddl_scope=local -c chorus.origin=7 -c chorus.read_routing=far\\ away",
        ));
        assert_eq!(
            settings,
            [
                ("set chorus.read_routing = 'any'".to_owned(), true),
                ("set chorus.commit_scope = 'all'".to_owned(), true),
                ("set chorus.ddl_scope = 'local'".to_owned(), true),
                ("set chorus.read_routing = '?'".to_owned(), false),
            ]
        );
        assert!(
            super::login_settings(&params("-c chorus.commit_scope=sometimes"))
                .iter()
                .all(|(_, valid)| !valid)
        );
        assert!(super::login_settings(&[]).is_empty());
    }

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
    fn read_routing_settings_are_recognized() {
        use ReadRoutingChange as R;
        let cases: &[(&str, &[ReadRoutingChange])] = &[
            ("SET chorus.read_routing = 'any'", &[R::Session(true)]),
            ("set chorus.read_routing to home", &[R::Session(false)]),
            ("SET LOCAL chorus.read_routing = 'any'", &[]),
            ("RESET chorus.read_routing", &[R::Reset]),
            ("DISCARD ALL", &[R::Reset]),
            ("SET chorus.read_routing = 'everywhere'", &[R::Invalid]),
            ("SELECT 1", &[]),
        ];
        for (sql, expected) in cases {
            assert_eq!(&read_routing_changes(sql), expected, "{sql}");
        }
    }

    #[test]
    fn ddl_scope_settings_are_recognized() {
        use DdlScopeChange as D;
        let cases: &[(&str, &[DdlScopeChange])] = &[
            ("SET chorus.ddl_scope = 'local'", &[D::Session(true)]),
            ("set local chorus.ddl_scope to cluster", &[D::Local(false)]),
            ("RESET chorus.ddl_scope", &[D::Reset]),
            ("RESET ALL", &[D::Reset]),
            ("SET chorus.ddl_scope = 'nowhere'", &[D::Invalid]),
            ("SET chorus.commit_scope = 'local'", &[]),
        ];
        for (sql, expected) in cases {
            assert_eq!(&ddl_scope_changes(sql), expected, "{sql}");
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
    async fn a_commit_waits_for_enough_peers_past_its_position() {
        let progress = std::sync::Arc::new(ReplicationProgress::new(&["b".into(), "c".into()]));
        // Stand in for the replicator: the flush position is 100.
        let server = progress.clone();
        tokio::spawn(async move {
            let mut rx = server.flush_requests_rx.lock().await;
            while let Some(reply) = rx.recv().await {
                let _ = reply.send(100);
            }
        });
        progress.advance("b", 99);
        assert_eq!(progress.reached(100), 1);
        let mover = progress.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(20)).await;
            mover.advance("b", 150);
        });
        let (reached, ok) = progress
            .wait(CommitScope::Majority, Duration::from_secs(5))
            .await;
        assert_eq!((reached, ok), (2, true));
        let (reached, ok) = progress
            .wait(CommitScope::All, Duration::from_millis(50))
            .await;
        assert_eq!((reached, ok), (2, false));
        assert_eq!(
            progress.wait(CommitScope::Local, Duration::ZERO).await,
            (1, true)
        );
    }

    #[test]
    fn a_peer_added_later_counts_once_its_stream_reaches_a_position() {
        let progress = ReplicationProgress::new(&["b".into()]);
        progress.advance("b", 100);
        progress.advance("d", 100);
        assert_eq!((progress.backends(), progress.reached(100)), (2, 2));
        progress.add_peer("d");
        progress.add_peer("d");
        assert_eq!((progress.backends(), progress.reached(100)), (3, 2));
        assert!(!progress.applied("d", 100));
        progress.advance("d", 120);
        assert_eq!(progress.reached(100), 3);
        assert!(progress.applied("d", 100));
    }
}
