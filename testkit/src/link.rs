//! A fault-injecting TCP relay for one link (a node's connections to one
//! backend): every connection through it can be blackholed (nothing gets
//! through until the fault ends, as with a dead route: TCP holds the bytes),
//! reset (open connections get an RST, new ones are closed at once),
//! delayed, or throttled. The chaos tests put one in front of every
//! backend for every node.

#![allow(dead_code, clippy::unwrap_used)]

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// What a link does to the bytes crossing it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    Pass,
    Blackhole,
    Reset,
    /// Each chunk waits this long before it is passed on.
    Delay(Duration),
    /// At most this many bytes per second each way.
    Throttle(u64),
}

pub struct Link {
    pub port: u16,
    fault: watch::Sender<Fault>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Link {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Link {
    /// Relay a free port to `target` (a 127.0.0.1 port).
    pub async fn start(target: u16) -> Link {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let fault = watch::channel(Fault::Pass).0;
        let task = {
            let fault = fault.clone();
            tokio::spawn(async move {
                loop {
                    let Ok((client, _)) = listener.accept().await else {
                        continue;
                    };
                    let fault = fault.subscribe();
                    tokio::spawn(async move {
                        let _ = serve(client, target, fault).await;
                    });
                }
            })
        };
        Link { port, fault, task }
    }

    pub fn set(&self, fault: Fault) {
        self.fault.send_replace(fault);
    }
}

async fn serve(
    client: TcpStream,
    target: u16,
    mut fault: watch::Receiver<Fault>,
) -> std::io::Result<()> {
    // A new connection waits out a blackhole (as a SYN would be retried)
    // and is closed under a reset.
    loop {
        let now = *fault.borrow_and_update();
        match now {
            Fault::Reset => return reset(client),
            Fault::Blackhole => {
                if fault.changed().await.is_err() {
                    return Ok(());
                }
            }
            _ => break,
        }
    }
    let server = TcpStream::connect(("127.0.0.1", target)).await?;
    let _ = server.set_nodelay(true);
    let _ = client.set_nodelay(true);
    let (cr, cw) = client.into_split();
    let (sr, sw) = server.into_split();
    let up = pump(cr, sw, fault.clone());
    let down = pump(sr, cw, fault);
    let (up, down) = tokio::join!(up, down);
    // Under a reset both ends get an RST, not a FIN.
    if let (Some((cr, sw)), Some((sr, cw))) = (up, down) {
        if let Ok(client) = cr.reunite(cw) {
            let _ = reset(client);
        }
        if let Ok(server) = sr.reunite(sw) {
            let _ = reset(server);
        }
    }
    Ok(())
}

// Deprecated because a lingering close can block the thread; a zero
// linger never does (the kernel sends an RST and frees the socket at once).
#[allow(deprecated)]
pub fn reset(stream: TcpStream) -> std::io::Result<()> {
    stream.set_linger(Some(Duration::ZERO))?;
    drop(stream);
    Ok(())
}

/// Copy one direction under `fault`. Returns the halves to reset when the
/// link was reset (the other halves are with the other direction's pump).
pub async fn pump(
    mut from: OwnedReadHalf,
    mut to: OwnedWriteHalf,
    mut fault: watch::Receiver<Fault>,
) -> Option<(OwnedReadHalf, OwnedWriteHalf)> {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = tokio::select! {
            read = from.read(&mut buf) => match read {
                Ok(0) | Err(_) => {
                    let _ = to.shutdown().await;
                    return None;
                }
                Ok(n) => n,
            },
            changed = fault.changed() => {
                if changed.is_err() || *fault.borrow() == Fault::Reset {
                    return Some((from, to));
                }
                continue;
            }
        };
        // Hold the chunk as long as the fault says.
        loop {
            let now = *fault.borrow_and_update();
            match now {
                Fault::Pass => break,
                Fault::Reset => return Some((from, to)),
                Fault::Blackhole => {
                    if fault.changed().await.is_err() {
                        return None;
                    }
                }
                Fault::Delay(d) => {
                    tokio::time::sleep(d).await;
                    break;
                }
                Fault::Throttle(rate) => {
                    let wait = Duration::from_secs_f64(n as f64 / rate.max(1) as f64);
                    tokio::time::sleep(wait).await;
                    break;
                }
            }
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return None;
        }
    }
}
