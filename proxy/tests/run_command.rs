//! `chorus run --config FILE` as an operator runs it: the real binary, a
//! config file, command-line overrides, a clean exit on SIGTERM, and a clear
//! error for a bad config.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use chorus_proxy::localpg::{free_port, LocalPgOptions, LocalPostgres};
use chorus_testkit as testkit;

#[tokio::test(flavor = "multi_thread")]
async fn run_serves_from_a_config_file_and_stops_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let pg = tokio::task::block_in_place(|| {
        LocalPostgres::create(
            &testkit::pg_binaries(),
            &dir.path().join("pg"),
            LocalPgOptions {
                password: Some(testkit::PG_PASSWORD.to_owned()),
                ..LocalPgOptions::default()
            },
        )
    })
    .unwrap();
    let config = dir.path().join("chorus.toml");
    // The file's listen address is overridden on the command line.
    std::fs::write(
        &config,
        format!(
            "[node]\nid = 7\nlisten = \"127.0.0.1:1\"\nworker_threads = 1\n\
             [[backends]]\nname = \"main\"\nport = {}\n\
             [[users]]\nname = \"{}\"\npassword = \"{}\"\n",
            pg.port(),
            testkit::PG_USER,
            testkit::PG_PASSWORD
        ),
    )
    .unwrap();
    let port = free_port().unwrap();
    let metrics_port = free_port().unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_chorus"))
        .arg("run")
        .arg("--config")
        .arg(&config)
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .args(["--metrics-listen", &format!("127.0.0.1:{metrics_port}")])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();

    let conninfo = format!(
        "host=127.0.0.1 port={port} user={} password={} dbname=postgres",
        testkit::PG_USER,
        testkit::PG_PASSWORD
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    let client = loop {
        match testkit::connect(&conninfo).await {
            Ok(client) => break client,
            Err(e) => {
                assert!(Instant::now() < deadline, "node never accepted: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    };
    let row = client.query_one("SELECT 6 * 7", &[]).await.unwrap();
    assert_eq!(row.get::<_, i32>(0), 42);
    let (status, _) = testkit::http_get(
        format!("127.0.0.1:{metrics_port}").parse().unwrap(),
        "/health",
    )
    .await;
    assert!(status.contains("200"), "{status}");
    drop(client);

    Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    let output =
        tokio::task::block_in_place(|| testkit::wait_with_limit(child, Duration::from_secs(20)));
    assert!(output.status.success(), "{:?}", output.status);
}

#[test]
fn run_with_a_bad_config_says_what_is_wrong() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("bad.toml");
    std::fs::write(
        &config,
        "[node]\nlisten_port = 5\n[[backends]]\nname = \"a\"\n",
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_chorus"))
        .arg("run")
        .arg("--config")
        .arg(&config)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("unknown field `listen_port`"), "{err}");

    let out = Command::new(env!("CARGO_BIN_EXE_chorus"))
        .args(["run", "--config", "/nonexistent/chorus.toml"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("cannot read /nonexistent/chorus.toml"),
        "{err}"
    );
}
