//! Cancel keys: the proxy hands each client its own BackendKeyData and maps
//! it to the backend connection serving that client, so a CancelRequest
//! (which arrives on a new connection) reaches the right backend.
//!
//! The pid a client gets is its backend's, unless another session of the
//! node holds that number already (backends on other hosts): then
//! `pg_backend_pid()`, `pg_terminate_backend(pid)` and notifications
//! agree with what the client knows, as on PostgreSQL. The secret is the
//! proxy's own.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use rand::Rng;

/// Where a cancel for one client session goes.
#[derive(Debug, Clone)]
struct CancelTarget {
    secret: i32,
    backend_address: String,
    backend_pid: i32,
    backend_secret: i32,
    /// Who the session is (see `CancelKey::describe`).
    client: Option<ClientInfo>,
}

/// Who a client session is, for the admin console's `SHOW CLIENTS`.
#[derive(Debug, Clone)]
pub struct ClientInfo {
    pub user: String,
    pub database: String,
    pub address: std::net::SocketAddr,
    pub since: std::time::Instant,
}

/// A live client session as the registry knows it.
#[derive(Debug, Clone)]
pub struct LiveClient {
    /// The pid the client knows.
    pub pid: i32,
    pub client: ClientInfo,
    pub backend_address: String,
    pub backend_pid: i32,
}

/// All live cancel keys of a node.
#[derive(Debug, Default)]
pub struct CancelRegistry {
    keys: Mutex<HashMap<i32, CancelTarget>>,
}

/// A registered key; unregistered when dropped.
pub struct CancelKey {
    registry: Arc<CancelRegistry>,
    pub pid: i32,
    pub secret: i32,
}

impl Drop for CancelKey {
    fn drop(&mut self) {
        if let Ok(mut keys) = self.registry.keys.lock() {
            keys.remove(&self.pid);
        }
    }
}

impl CancelKey {
    /// The pid of the backend connection this key's cancels go to.
    pub fn backend_pid(&self) -> Option<i32> {
        let keys = self.registry.keys.lock().ok()?;
        keys.get(&self.pid).map(|t| t.backend_pid)
    }

    /// Note who the session is.
    pub fn describe(&self, client: ClientInfo) {
        if let Ok(mut keys) = self.registry.keys.lock() {
            if let Some(target) = keys.get_mut(&self.pid) {
                target.client = Some(client);
            }
        }
    }

    /// The key (pid and secret) of the backend connection this key's
    /// cancels go to now; none while the session has no server connection.
    pub fn backend_key(&self) -> Option<(i32, i32)> {
        let keys = self.registry.keys.lock().ok()?;
        keys.get(&self.pid)
            .filter(|t| t.backend_pid != 0)
            .map(|t| (t.backend_pid, t.backend_secret))
    }

    /// The session gave its server connection back (transaction pooling):
    /// its cancels go nowhere until it takes one again, since the
    /// connection may serve another session meanwhile.
    pub fn detach(&self) {
        if let Ok(mut keys) = self.registry.keys.lock() {
            if let Some(target) = keys.get_mut(&self.pid) {
                target.backend_pid = 0;
                target.backend_secret = 0;
            }
        }
    }

    /// Send this key's cancels to another backend connection (the session
    /// moved); the client keeps its key.
    pub fn retarget(&self, backend_address: &str, backend_pid: i32, backend_secret: i32) {
        if let Ok(mut keys) = self.registry.keys.lock() {
            if let Some(target) = keys.get_mut(&self.pid) {
                if target.backend_address != backend_address {
                    target.backend_address.clear();
                    target.backend_address.push_str(backend_address);
                }
                target.backend_pid = backend_pid;
                target.backend_secret = backend_secret;
            }
        }
    }
}

impl CancelRegistry {
    /// Register a session's backend key and make up the key its client sees.
    pub fn register(
        self: &Arc<Self>,
        backend_address: &str,
        backend_pid: i32,
        backend_secret: i32,
    ) -> CancelKey {
        let mut rng = rand::rng();
        let secret: i32 = rng.random();
        let target = CancelTarget {
            secret,
            backend_address: backend_address.to_owned(),
            backend_pid,
            backend_secret,
            client: None,
        };
        let pid = match self.keys.lock() {
            Ok(mut keys) => {
                // (No backend yet, as a pooled session's key is made:
                // another number.)
                let mut pid = if backend_pid > 0 {
                    backend_pid
                } else {
                    rng.random_range(1..i32::MAX)
                };
                loop {
                    if let std::collections::hash_map::Entry::Vacant(slot) = keys.entry(pid) {
                        slot.insert(target);
                        break pid;
                    }
                    pid = rng.random_range(1..i32::MAX);
                }
            }
            // A poisoned lock only means another session panicked while
            // holding it; cancel is best-effort, so the key simply won't work.
            Err(_) => rng.random_range(1..i32::MAX),
        };
        CancelKey {
            registry: self.clone(),
            pid,
            secret,
        }
    }

    /// Forward a CancelRequest for a proxy key to its backend. Unknown keys
    /// and wrong secrets are ignored, as PostgreSQL does. Whether the key
    /// is one of this node's sessions' (a cancel that could not be sent is
    /// logged).
    pub async fn cancel(&self, pid: i32, secret: i32) -> bool {
        let target = match self.keys.lock() {
            Ok(keys) => keys.get(&pid).filter(|t| t.secret == secret).cloned(),
            Err(_) => None,
        };
        let Some(target) = target else {
            return false;
        };
        // (A session between transactions: there is nothing to cancel.)
        if target.backend_pid == 0 {
            return true;
        }
        if let Err(e) = super::send_cancel(
            &target.backend_address,
            target.backend_pid,
            target.backend_secret,
        )
        .await
        {
            tracing::warn!(backend = %target.backend_address, error = %e, "cancel request failed");
        }
        true
    }

    /// The described sessions, by the pid their clients know.
    pub fn clients(&self) -> Vec<LiveClient> {
        let Ok(keys) = self.keys.lock() else {
            return Vec::new();
        };
        let mut clients: Vec<LiveClient> = keys
            .iter()
            .filter_map(|(pid, t)| {
                Some(LiveClient {
                    pid: *pid,
                    client: t.client.clone()?,
                    backend_address: t.backend_address.clone(),
                    backend_pid: t.backend_pid,
                })
            })
            .collect();
        clients.sort_by_key(|c| c.pid);
        clients
    }

    /// Number of live keys.
    pub fn len(&self) -> usize {
        self.keys.lock().map(|k| k.len()).unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_unique_and_removed_on_drop() {
        let registry = Arc::new(CancelRegistry::default());
        let a = registry.register("127.0.0.1:1", 10, 20);
        let b = registry.register("127.0.0.1:1", 11, 21);
        // Clients see their backends' pids where they are free...
        assert_eq!((a.pid, b.pid), (10, 11));
        // ... and another number where one is taken (another host's
        // backend with the same pid).
        let c = registry.register("127.0.0.2:1", 10, 22);
        assert!(c.pid > 0 && c.pid != 10 && c.pid != 11, "{}", c.pid);
        assert_eq!(registry.len(), 3);
        drop(a);
        assert_eq!(registry.len(), 2);
        drop((b, c));
        assert!(registry.is_empty());
    }

    #[tokio::test]
    async fn wrong_secret_is_ignored() {
        let registry = Arc::new(CancelRegistry::default());
        let key = registry.register("127.0.0.1:1", 10, 20);
        assert!(!registry.cancel(key.pid, key.secret.wrapping_add(1)).await);
        assert!(!registry.cancel(key.pid.wrapping_add(1), key.secret).await);
    }
}
