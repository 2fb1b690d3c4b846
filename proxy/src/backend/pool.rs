//! Server connections shared by the sessions of transaction pooling (see
//! session/pooled.rs): per backend, database, user and startup settings,
//! a stack of idle logged-in connections and a limit on how many are open.
//!
//! A connection remembers what the sessions before left on it that the
//! next one must see as its own (reported settings, named prepared
//! statements, session settings), so that handing it over costs nothing
//! when they agree, which is the common case: the clients of one
//! application send the same statements under the same names.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use rustc_hash::FxHashMap;
use tokio::io::AsyncReadExt;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::BackendStream;

/// Which server connections a session may take.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PoolKey {
    pub backend: String,
    pub user: String,
    pub database: String,
    /// Startup parameters other than the settings a session takes along
    /// (see `session::carried::MOVED_SETTINGS`), as the connections log in.
    pub params: Vec<(String, String)>,
}

/// Named prepared statements, by name: the Parse message that made each.
pub type PreparedStatements = FxHashMap<String, BytesMut>;

/// SQL-level prepared statements (`PREPARE`), by name: the statement that
/// made each, in order of name.
pub type SqlPrepared = Vec<(String, String)>;

/// What a server connection has that a session may need to change.
#[derive(Debug, Clone, Default)]
pub struct ServerState {
    /// Every setting the server reported (ParameterStatus), latest value.
    pub reported: Vec<(String, String)>,
    /// Named prepared statements (shared with the session that made them
    /// when it gave the connection back).
    pub prepared: Arc<PreparedStatements>,
    /// SQL-level prepared statements (the session's that made them, when
    /// it gave the connection back).
    pub sql_prepared: Arc<SqlPrepared>,
    /// The statement that makes the session-level settings in force (see
    /// `session::pooled`), none when there are none.
    pub settings: Option<String>,
    /// The connection holds DDL settings of a stamp that the next stamp
    /// must clear (see `RelayState::ddl_settings_sent`).
    pub ddl_settings_sent: bool,
}

/// An idle server connection.
pub struct Server {
    pub stream: BackendStream,
    pub pid: i32,
    pub secret: i32,
    pub state: ServerState,
    idle_since: Instant,
}

impl Server {
    pub fn new(stream: BackendStream, pid: i32, secret: i32, state: ServerState) -> Server {
        Server {
            stream,
            pid,
            secret,
            state,
            idle_since: Instant::now(),
        }
    }
}

/// The connections of one key.
pub struct KeyPool {
    idle: Mutex<Vec<Server>>,
    /// One permit per connection that may be in use.
    permits: Arc<Semaphore>,
    /// The settings a new connection reports at login (before any session
    /// changed them): what a session that did not set one gets.
    defaults: Mutex<Vec<(String, String)>>,
}

/// Why no connection could be had.
#[derive(Debug, PartialEq, Eq)]
pub enum WaitError {
    /// Every connection stayed in use for the whole wait.
    TimedOut,
}

impl KeyPool {
    /// Wait up to `limit` for a connection to be free: the permit to use
    /// one, and an idle connection if there is a live one (else the caller
    /// opens one).
    pub async fn take(
        self: &Arc<Self>,
        limit: Duration,
        idle_timeout: Duration,
    ) -> Result<(OwnedSemaphorePermit, Option<Server>), WaitError> {
        let permit = tokio::time::timeout(limit, self.permits.clone().acquire_owned())
            .await
            .map_err(|_| WaitError::TimedOut)?
            .map_err(|_| WaitError::TimedOut)?;
        loop {
            let next = self.idle.lock().ok().and_then(|mut idle| idle.pop());
            let Some(mut server) = next else {
                return Ok((permit, None));
            };
            if server.idle_since.elapsed() < idle_timeout && alive(&mut server.stream) {
                return Ok((permit, Some(server)));
            }
        }
    }

    /// Give a connection back (the caller then drops its permit). Beyond
    /// `size` idle ones (a session moved in brings its own), it is closed.
    pub fn give_back(&self, mut server: Server, size: usize) {
        server.idle_since = Instant::now();
        if let Ok(mut idle) = self.idle.lock() {
            if idle.len() < size {
                idle.push(server);
            }
        }
    }

    /// Note the settings a new connection reported at login (the first
    /// one's are kept).
    pub fn note_defaults(&self, reported: &[(String, String)]) {
        if let Ok(mut defaults) = self.defaults.lock() {
            if defaults.is_empty() {
                defaults.extend_from_slice(reported);
            }
        }
    }

    /// The settings a new connection reports at login, once one has.
    pub fn defaults(&self) -> Vec<(String, String)> {
        self.defaults.lock().map(|d| d.clone()).unwrap_or_default()
    }

    /// Connections idle now.
    pub fn idle_count(&self) -> usize {
        self.idle.lock().map(|i| i.len()).unwrap_or(0)
    }

    /// Connections in use now.
    pub fn in_use(&self, size: usize) -> usize {
        size.saturating_sub(self.permits.available_permits())
    }
}

/// Whether an idle connection is still open: the server has sent nothing
/// (an idle server only writes when it ends the connection, a FATAL
/// before EOF).
fn alive(stream: &mut BackendStream) -> bool {
    let mut byte = [0u8; 1];
    let read = stream.read(&mut byte);
    // (Polled once: a pending read means nothing has come.)
    matches!(futures_poll_once(read), std::task::Poll::Pending)
}

/// Poll a future once, with a waker that does nothing.
fn futures_poll_once<F: std::future::Future>(future: F) -> std::task::Poll<F::Output> {
    let mut future = std::pin::pin!(future);
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    future.as_mut().poll(&mut cx)
}

/// Every key's connections of a node.
pub struct ServerPool {
    keys: Mutex<FxHashMap<PoolKey, Arc<KeyPool>>>,
    size: usize,
}

impl ServerPool {
    /// A pool of up to `size` connections per key.
    pub fn new(size: usize) -> ServerPool {
        ServerPool {
            keys: Mutex::new(FxHashMap::default()),
            size,
        }
    }

    pub fn size(&self) -> usize {
        self.size
    }

    /// The connections of `key`.
    pub fn key(&self, key: &PoolKey) -> Arc<KeyPool> {
        let mut keys = match self.keys.lock() {
            Ok(keys) => keys,
            Err(poisoned) => poisoned.into_inner(),
        };
        if let Some(pool) = keys.get(key) {
            return pool.clone();
        }
        let pool = Arc::new(KeyPool {
            idle: Mutex::new(Vec::new()),
            permits: Arc::new(Semaphore::new(self.size)),
            defaults: Mutex::new(Vec::new()),
        });
        keys.insert(key.clone(), pool.clone());
        pool
    }

    /// Per key: its backend, database, user, connections in use and idle.
    pub fn counts(&self) -> Vec<(PoolKey, usize, usize)> {
        let keys = match self.keys.lock() {
            Ok(keys) => keys,
            Err(poisoned) => poisoned.into_inner(),
        };
        let mut counts: Vec<_> = keys
            .iter()
            .map(|(k, p)| (k.clone(), p.in_use(self.size), p.idle_count()))
            .collect();
        counts.sort_by(|a, b| {
            (&a.0.backend, &a.0.database, &a.0.user).cmp(&(&b.0.backend, &b.0.database, &b.0.user))
        });
        counts
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> PoolKey {
        PoolKey {
            backend: "pg1".into(),
            user: "app".into(),
            database: "shop".into(),
            params: Vec::new(),
        }
    }

    #[tokio::test]
    async fn a_key_lends_up_to_its_size_and_makes_the_next_wait() {
        let pool = ServerPool::new(2);
        let shop = pool.key(&key());
        let wait = Duration::from_millis(50);
        let idle = Duration::from_secs(60);
        let (first, none) = shop.take(wait, idle).await.unwrap();
        assert!(none.is_none());
        let (_second, _) = shop.take(wait, idle).await.unwrap();
        assert_eq!(shop.in_use(2), 2);
        assert_eq!(shop.take(wait, idle).await.err(), Some(WaitError::TimedOut));
        drop(first);
        assert!(shop.take(wait, idle).await.is_ok());
        // The same key is the same pool; another is another.
        assert!(Arc::ptr_eq(&shop, &pool.key(&key())));
        let other = PoolKey {
            user: "other".into(),
            ..key()
        };
        assert!(!Arc::ptr_eq(&shop, &pool.key(&other)));
    }
}
