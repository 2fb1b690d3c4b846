//! `chorus demo`, run as a user would: the printed lines, psql through each
//! node and to each backend, metrics, clean stop on SIGINT.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use chorus_testkit as testkit;
use testkit::{run_pg_program, stderr, stdout};

fn chorus() -> Command {
    Command::new(env!("CARGO_BIN_EXE_chorus"))
}

/// Four consecutive free ports and their +100 partners for metrics.
fn free_base_port() -> u16 {
    for _ in 0..50 {
        let base = chorus_proxy::localpg::free_port().unwrap();
        if base > 60000 {
            continue;
        }
        let all_free = (0..2).all(|i| {
            std::net::TcpListener::bind(("127.0.0.1", base + i)).is_ok()
                && std::net::TcpListener::bind(("127.0.0.1", base + 100 + i)).is_ok()
        });
        if all_free {
            return base;
        }
    }
    panic!("no free port range");
}

#[tokio::test(flavor = "multi_thread")]
async fn demo_prints_connection_lines_and_serves_psql() {
    let base = free_base_port();
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("cluster");
    let mut child = chorus()
        .args(["demo", "--nodes", "2", "--port", &base.to_string(), "--dir"])
        .arg(&data)
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(dir.path().join("demo.log")).unwrap())
        .spawn()
        .unwrap();
    let stdout_pipe = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout_pipe).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let deadline = Instant::now() + Duration::from_secs(90);
    let mut lines = Vec::new();
    loop {
        let remaining = deadline.saturating_duration_since(Instant::now());
        let line = rx.recv_timeout(remaining).unwrap_or_else(|_| {
            let log = std::fs::read_to_string(dir.path().join("demo.log")).unwrap_or_default();
            panic!("demo never printed ready; got {lines:?}\n{log}")
        });
        if line == "ready" {
            break;
        }
        lines.push(line);
    }
    let value = |prefix: &str| -> String {
        lines
            .iter()
            .find_map(|l| l.strip_prefix(prefix))
            .unwrap_or_else(|| panic!("no {prefix:?} line in {lines:?}"))
            .to_owned()
    };
    for i in 1..=2u16 {
        let node = value(&format!("node {i}: "));
        assert_eq!(
            node,
            format!("postgres://postgres@127.0.0.1:{}/postgres", base + i - 1)
        );
        let out = run_pg_program(
            "psql",
            &[&node, "-X", "-At", "-c", "SELECT 'via node'"],
            &[],
            Duration::from_secs(30),
        );
        assert_eq!(stdout(&out).trim(), "via node", "{}", stderr(&out));

        let backend = value(&format!("backend {i}: "));
        assert!(
            backend.starts_with("postgres://postgres@127.0.0.1:"),
            "{backend}"
        );
        let out = run_pg_program(
            "psql",
            &[&backend, "-X", "-At", "-c", "SHOW wal_level"],
            &[],
            Duration::from_secs(30),
        );
        assert_eq!(stdout(&out).trim(), "logical", "{}", stderr(&out));

        let metrics = value(&format!("metrics {i}: "));
        assert_eq!(
            metrics,
            format!("http://127.0.0.1:{}/metrics", base + 100 + i - 1)
        );
        let addr = format!("127.0.0.1:{}", base + 100 + i - 1).parse().unwrap();
        let (status, body) = testkit::http_get(addr, "/metrics").await;
        assert!(status.contains("200"), "{status}");
        assert!(body.contains("chorus_statements_total"), "{body}");
    }
    assert!(data.join("pg1").is_dir());
    // A database created through the demo replicates (the demo turns
    // replicate_created_databases on).
    let psql = |url: &str, sql: &str| {
        let out = run_pg_program(
            "psql",
            &[url, "-X", "-At", "-v", "ON_ERROR_STOP=1", "-c", sql],
            &[],
            Duration::from_secs(30),
        );
        (stdout(&out).trim().to_owned(), stderr(&out))
    };
    let in_db = |url: String| format!("{}/shop", url.strip_suffix("/postgres").unwrap());
    let (_, err) = psql(&value("node 1: "), "CREATE DATABASE shop");
    assert!(err.is_empty(), "{err}");
    let (_, err) = psql(
        &in_db(value("node 2: ")),
        "CREATE TABLE t (id int PRIMARY KEY); INSERT INTO t VALUES (7)",
    );
    assert!(err.is_empty(), "{err}");
    let backend1 = in_db(value("backend 1: "));
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (seen, err) = psql(&backend1, "SELECT string_agg(id::text, ',') FROM t");
        if seen == "7" {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "backend 1 never had shop's row: {seen:?} {err}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }

    // Each node's configuration, for the commands that read one; the
    // demo's role is an admin of the console.
    let config = value("config 1: ");
    assert_eq!(
        std::path::Path::new(&config),
        data.join("node1.toml"),
        "{lines:?}"
    );
    let check = chorus()
        .args(["check", "--config", &config])
        .output()
        .unwrap();
    assert!(
        check.status.success(),
        "{}{}",
        String::from_utf8_lossy(&check.stdout),
        String::from_utf8_lossy(&check.stderr)
    );
    let console = format!(
        "{}/chorus",
        value("node 2: ").strip_suffix("/postgres").unwrap()
    );
    let (version, err) = psql(&console, "SHOW VERSION");
    assert!(version.starts_with("Chorus "), "{version}{err}");
    // RELOAD reads the file the demo wrote.
    let (_, err) = psql(&console, "RELOAD");
    assert!(err.is_empty(), "{err}");

    Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    let status = tokio::task::block_in_place(|| {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                return status;
            }
            assert!(Instant::now() < deadline, "demo did not stop after SIGINT");
            std::thread::sleep(Duration::from_millis(50));
        }
    });
    assert!(status.success(), "{status:?}");
    assert!(!data.exists(), "demo left its data directory behind");
}

#[test]
fn demo_without_initdb_says_how_to_install_postgresql() {
    let out = chorus()
        .args(["demo", "--nodes", "1"])
        .env("PG_BINDIR", "/nonexistent/postgresql/bin")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("apt-get install postgresql"), "{err}");
}

#[test]
fn demo_in_an_existing_directory_removes_only_what_it_made() {
    let base = free_base_port();
    let dir = tempfile::tempdir().unwrap();
    let precious = dir.path().join("precious.txt");
    std::fs::write(&precious, "not the demo's").unwrap();
    let mut child = chorus()
        .args(["demo", "--nodes", "1", "--port", &base.to_string(), "--dir"])
        .arg(dir.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        assert!(Instant::now() < deadline, "demo never printed ready");
        match lines.next() {
            Some(Ok(line)) if line == "ready" => break,
            Some(Ok(_)) => {}
            other => panic!("demo output ended early: {other:?}"),
        }
    }
    assert!(dir.path().join("pg1").is_dir());
    Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    let output = testkit::wait_with_limit(child, Duration::from_secs(30));
    assert!(output.status.success());
    assert!(!dir.path().join("pg1").exists());
    assert_eq!(
        std::fs::read_to_string(&precious).unwrap(),
        "not the demo's"
    );
}
