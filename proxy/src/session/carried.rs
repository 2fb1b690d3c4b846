//! What a session carries from one backend connection to the next: the
//! settings it takes along when it moves (failover, drain), and under
//! transaction pooling what follows it from one pooled connection to the
//! next (see pooled.rs).

use std::sync::Arc;

use tokio::sync::OwnedSemaphorePermit;

use crate::backend::pool::{KeyPool, ServerState, SqlPrepared};

/// Settings reported by ParameterStatus that a session moved to another
/// backend gets again (as startup parameters).
pub(super) const MOVED_SETTINGS: &[&str] = &[
    "application_name",
    "client_encoding",
    "DateStyle",
    "IntervalStyle",
    "TimeZone",
    "search_path",
    "standard_conforming_strings",
];

/// What follows a pooled session from one server connection to the next.
pub(super) struct Pooled {
    /// The startup parameters the pool's connections log in with: the
    /// session's, less the settings it takes along (`desired`).
    pub(super) key_params: Vec<(String, String)>,
    /// The pool of each backend the session used.
    pub(super) pools: Vec<(String, Arc<KeyPool>)>,
    /// The reported settings as the client knows them.
    pub(super) desired: Vec<(String, String)>,
    /// The statement that makes the session's own settings (from the last
    /// question), none when it has none.
    pub(super) settings: Option<String>,
    /// Its SQL-level prepared statements (from the last question).
    pub(super) sql_prepared: Arc<SqlPrepared>,
    /// The session keeps its connection between transactions.
    pub(super) pinned: bool,
    /// The connection in use.
    pub(super) lease: Option<Lease>,
    /// Read-only transactions routed (their backends take turns).
    pub(super) reads: usize,
    /// `desired` has every reported setting (those the client did not set
    /// are the login's, see `pooled::check_out`).
    pub(super) complete: bool,
}

/// A server connection in a session's hands.
pub(super) struct Lease {
    pub(super) pool: Arc<KeyPool>,
    /// Held while the session uses the connection (the pool's count).
    pub(super) _permit: OwnedSemaphorePermit,
    /// What the connection has (the session's, while it holds it).
    pub(super) server: ServerState,
}

impl Pooled {
    /// A session with these startup parameters (as sent to backends).
    pub(super) fn new(params: &[(String, String)]) -> Pooled {
        let taken = |name: &str| MOVED_SETTINGS.iter().any(|m| m.eq_ignore_ascii_case(name));
        Pooled {
            key_params: params.iter().filter(|(n, _)| !taken(n)).cloned().collect(),
            pools: Vec::new(),
            desired: params.iter().filter(|(n, _)| taken(n)).cloned().collect(),
            settings: None,
            sql_prepared: Arc::default(),
            pinned: false,
            lease: None,
            reads: rand::random::<u32>() as usize,
            complete: false,
        }
    }

    /// The DDL settings the connection in hand holds (see
    /// `RelayState::ddl_settings_sent`).
    pub(super) fn ddl_settings_sent(&self) -> bool {
        self.lease
            .as_ref()
            .is_some_and(|l| l.server.ddl_settings_sent)
    }
}
