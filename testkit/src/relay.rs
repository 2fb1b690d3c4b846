//! A fault-injecting TCP relay in front of one node's Raft port. It reads
//! the first frame of each connection (the handshake's Hello, which names
//! the calling node) so that links can be cut per caller: cutting node 3
//! off means its own relay refuses everyone and the other relays refuse
//! node 3, while connections to backends are untouched. Every connection
//! through it also takes the relay's link fault (blackhole, reset, delay,
//! throttle: see link.rs).

#![allow(dead_code, clippy::unwrap_used)]

use std::collections::HashSet;
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

use super::link::{pump, reset, Fault};

pub struct Relay {
    pub port: u16,
    /// Callers refused (`0` stands for every caller).
    blocked: Arc<Mutex<HashSet<u64>>>,
    /// Bumped on every cut, so that open connections of a newly blocked
    /// caller close.
    generation: watch::Sender<u64>,
    fault: watch::Sender<Fault>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Relay {
    /// Relay a free port to `target` (a 127.0.0.1 port).
    pub async fn start(target: u16) -> Relay {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let blocked: Arc<Mutex<HashSet<u64>>> = Arc::default();
        let generation = watch::channel(0u64).0;
        let fault = watch::channel(Fault::Pass).0;
        let task = {
            let blocked = blocked.clone();
            let generation = generation.clone();
            let fault = fault.clone();
            tokio::spawn(async move {
                loop {
                    let Ok((client, _)) = listener.accept().await else {
                        continue;
                    };
                    let blocked = blocked.clone();
                    let mut changed = generation.subscribe();
                    let fault = fault.subscribe();
                    tokio::spawn(async move {
                        let _ = relay(client, target, &blocked, &mut changed, fault).await;
                    });
                }
            })
        };
        Relay {
            port,
            blocked,
            generation,
            fault,
            task,
        }
    }

    /// Refuse these callers (0: all), closing their open connections.
    pub fn block(&self, callers: &[u64]) {
        self.blocked.lock().unwrap().extend(callers);
        self.generation.send_modify(|g| *g += 1);
    }

    pub fn heal(&self) {
        self.blocked.lock().unwrap().clear();
        self.generation.send_modify(|g| *g += 1);
    }

    /// Put a fault on every connection through this relay (Pass: none).
    pub fn set(&self, fault: Fault) {
        self.fault.send_replace(fault);
    }
}

fn is_blocked(blocked: &Mutex<HashSet<u64>>, caller: u64) -> bool {
    let blocked = blocked.lock().unwrap();
    blocked.contains(&0) || blocked.contains(&caller)
}

async fn relay(
    mut client: TcpStream,
    target: u16,
    blocked: &Mutex<HashSet<u64>>,
    changed: &mut watch::Receiver<u64>,
    fault: watch::Receiver<Fault>,
) -> std::io::Result<()> {
    // The Hello frame: length (u32, big-endian) and JSON {"node": id, …}.
    let len = client.read_u32().await? as usize;
    if len > 1 << 20 {
        return Ok(());
    }
    let mut hello = vec![0; len];
    client.read_exact(&mut hello).await?;
    let caller = serde_json::from_slice::<serde_json::Value>(&hello)
        .ok()
        .and_then(|v| v.get("node").and_then(serde_json::Value::as_u64))
        .unwrap_or(u64::MAX);
    if is_blocked(blocked, caller) {
        return Ok(());
    }
    if *fault.borrow() == Fault::Reset {
        return reset(client);
    }
    let mut server = TcpStream::connect(("127.0.0.1", target)).await?;
    server.write_u32(len as u32).await?;
    server.write_all(&hello).await?;
    let (cr, cw) = client.into_split();
    let (sr, sw) = server.into_split();
    let pipe = async {
        tokio::select! {
            _ = pump(cr, sw, fault.clone()) => {}
            _ = pump(sr, cw, fault) => {}
        }
    };
    let cut = async {
        loop {
            if changed.changed().await.is_err() || is_blocked(blocked, caller) {
                return;
            }
        }
    };
    tokio::select! {
        _ = pipe => {}
        _ = cut => {}
    }
    Ok(())
}
