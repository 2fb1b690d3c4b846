//! The one test harness of Chorus: throwaway PostgreSQL servers made with
//! the machine's `initdb`, Chorus nodes in front of them (in this process
//! or as `chorus` processes), fault-injecting relays on their links, and
//! the bounded waits tests use instead of sleeping. Everything started is
//! stopped when its handle is dropped, also when the test fails.
//!
//! - one backend and one in-process node: [`node`] ([`start`]);
//! - a replicating cluster of in-process nodes: [`inproc`];
//! - a cluster of node processes that can be killed, stopped and
//!   restarted, with a fault relay on every Raft link: [`procs`];
//! - the fault relays: [`relay`] (Raft links), [`link`] (backend links);
//! - backends, sessions, libpq programs, schema dumps: [`postgres`];
//! - certificates: [`tls`].
// A harness fails the test that called it by panicking.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

pub mod config;
pub mod inproc;
pub mod link;
pub mod node;
pub mod postgres;
pub mod procs;
pub mod relay;
pub mod tls;

pub use config::{cluster_toml, raft_ports};
pub use node::{start, Options, TestNode};
pub use postgres::*;
pub use tls::{write_certificate, TestCa};

/// The backend superuser and its password (backends use SCRAM over TCP).
pub const PG_USER: &str = "postgres";
pub const PG_PASSWORD: &str = "chorus-pw";

/// The `chorus` program the tests run: `$CHORUS_BIN`, or the one cargo
/// built next to the running test program (`target/<profile>/chorus`,
/// the test being `target/<profile>/deps/<test>-<hash>`).
pub fn chorus_bin() -> PathBuf {
    if let Some(path) = std::env::var_os("CHORUS_BIN") {
        return PathBuf::from(path);
    }
    let test = std::env::current_exe().expect("the test program's path");
    let profile = test
        .parent()
        .and_then(|deps| deps.parent())
        .expect("tests run from target/<profile>/deps");
    let bin = profile.join(format!("chorus{}", std::env::consts::EXE_SUFFIX));
    assert!(
        bin.is_file(),
        "{} is not built (run the tests with cargo test, or set CHORUS_BIN)",
        bin.display()
    );
    bin
}

/// Send this process's log (`filter` unless `RUST_LOG` says otherwise) to
/// the test's captured output, shown when the test fails. Once per
/// process; later calls keep the first filter.
pub fn log_to_test_output(filter: &str) {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(filter)),
        )
        .with_test_writer()
        .try_init();
}

/// Wait until `check` holds, asking every `every`, for at most `within`;
/// fails the test, naming `what`, when it never does. The one shape of a
/// bounded wait on a condition: tests never sleep a fixed time instead.
pub async fn eventually<F, Fut>(what: &str, within: Duration, every: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + within;
    while !check().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what}: not within {within:?}"
        );
        tokio::time::sleep(every).await;
    }
}

/// A minimal HTTP GET over a raw socket.
pub async fn http_get(addr: SocketAddr, path: &str) -> (String, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream
        .write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut response = String::new();
    tokio::time::timeout(
        Duration::from_secs(10),
        stream.read_to_string(&mut response),
    )
    .await
    .unwrap()
    .unwrap();
    let (head, body) = response.split_once("\r\n\r\n").unwrap_or((&response, ""));
    (
        head.lines().next().unwrap_or_default().to_owned(),
        body.to_owned(),
    )
}
