//! Throwaway backends and what tests run against them: sessions, libpq
//! programs (psql, pgbench, pg_dump), schema dumps and the chorus schema
//! of earlier versions.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use chorus_proxy::localpg::{LocalPgOptions, LocalPostgres, PgBinaries};

pub fn pg_binaries() -> PgBinaries {
    PgBinaries::find().expect("PostgreSQL server programs are needed for the tests")
}

/// `n` throwaway backends `pg1`..`pgN` under `dir`, with default options.
pub fn backends(dir: &Path, n: usize) -> Vec<LocalPostgres> {
    backends_with(dir, n, &[])
}

/// [`backends`], each with these settings.
pub fn backends_with(dir: &Path, n: usize, settings: &[(String, String)]) -> Vec<LocalPostgres> {
    (1..=n)
        .map(|i| {
            tokio::task::block_in_place(|| {
                LocalPostgres::create(
                    &pg_binaries(),
                    &dir.join(format!("pg{i}")),
                    LocalPgOptions {
                        settings: settings.to_vec(),
                        ..LocalPgOptions::default()
                    },
                )
            })
            .unwrap()
        })
        .collect()
}

/// Run pgbench with `args` against the postgres database through
/// 127.0.0.1:`port` as user postgres (trusted), within two minutes.
pub fn pgbench(port: u16, args: &[&str]) -> Output {
    pgbench_as(port, "postgres", args)
}

/// pgbench against `port`, database postgres, as `user`.
pub fn pgbench_as(port: u16, user: &str, args: &[&str]) -> Output {
    let port = port.to_string();
    let mut all = vec!["-h", "127.0.0.1", "-p", port.as_str(), "-U", user];
    all.extend_from_slice(args);
    all.push("postgres");
    run_pg_program("pgbench", &all, &[], Duration::from_secs(120))
}

/// Connect with tokio-postgres, driving the connection in a task.
pub async fn connect(conninfo: &str) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
    let (client, connection) = tokio_postgres::connect(conninfo, tokio_postgres::NoTls).await?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(client)
}

/// Connect with tokio-postgres, keeping the text of every notice the
/// session hears.
pub async fn connect_hearing_notices(
    conninfo: &str,
) -> (
    tokio_postgres::Client,
    std::sync::Arc<std::sync::Mutex<Vec<String>>>,
) {
    let (client, mut connection) = tokio_postgres::connect(conninfo, tokio_postgres::NoTls)
        .await
        .unwrap();
    let heard = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let notices = heard.clone();
    tokio::spawn(async move {
        while let Some(Ok(message)) = std::future::poll_fn(|cx| connection.poll_message(cx)).await {
            if let tokio_postgres::AsyncMessage::Notice(notice) = message {
                notices.lock().unwrap().push(notice.message().to_owned());
            }
        }
    });
    (client, heard)
}

/// The SQLSTATE of a tokio-postgres error, if the server sent one.
pub fn sqlstate(error: &tokio_postgres::Error) -> Option<String> {
    error.code().map(|c| c.code().to_owned())
}

/// Run a libpq client program (psql, pgbench) from the PostgreSQL bin dir,
/// killed if it runs longer than `limit`.
pub fn run_pg_program(
    program: &str,
    args: &[&str],
    env: &[(&str, String)],
    limit: Duration,
) -> Output {
    let path = program_path(program);
    let mut cmd = Command::new(&path);
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .env("PGAPPNAME", "chorus-test");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    wait_with_limit(child, limit)
}

/// Wait for a child, killing it after `limit`. Its output is read while
/// it runs (a child that fills a pipe would otherwise never finish).
pub fn wait_with_limit(mut child: std::process::Child, limit: Duration) -> Output {
    use std::io::Read;
    fn drain<R: Read + Send + 'static>(pipe: Option<R>) -> std::thread::JoinHandle<Vec<u8>> {
        std::thread::spawn(move || {
            let mut bytes = Vec::new();
            if let Some(mut pipe) = pipe {
                let _ = pipe.read_to_end(&mut bytes);
            }
            bytes
        })
    }
    let stdout = drain(child.stdout.take());
    let stderr = drain(child.stderr.take());
    let deadline = std::time::Instant::now() + limit;
    let (status, killed) = loop {
        match child.try_wait().unwrap() {
            Some(status) => break (status, false),
            None if std::time::Instant::now() >= deadline => {
                let _ = child.kill();
                break (child.wait().unwrap(), true);
            }
            None => std::thread::sleep(Duration::from_millis(20)),
        }
    };
    let output = Output {
        status,
        stdout: stdout.join().unwrap(),
        stderr: stderr.join().unwrap(),
    };
    assert!(
        !killed,
        "program ran longer than {limit:?}\nstdout: {}\nstderr: {}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    output
}

/// psql and pgbench: next to initdb, or on PATH.
pub fn program_path(program: &str) -> PathBuf {
    let beside = pg_binaries().program(program);
    if beside.is_file() {
        beside
    } else {
        PathBuf::from(program)
    }
}

/// `pg_dump --schema-only` of `database` on the server at `port`, with
/// `extra` options, minus its random per-run lines.
pub fn schema_dump(port: u16, database: &str, extra: &[&str]) -> String {
    let port = port.to_string();
    let mut args = vec![
        "--schema-only",
        "-h",
        "127.0.0.1",
        "-p",
        &port,
        "-U",
        "postgres",
    ];
    args.extend_from_slice(extra);
    args.push(database);
    let out = run_pg_program("pg_dump", &args, &[], Duration::from_secs(60));
    assert!(out.status.success(), "{}", stderr(&out));
    stdout(&out)
        .lines()
        .filter(|l| !l.starts_with("\\restrict") && !l.starts_with("\\unrestrict"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// The chorus schema of version `version` (1 or 2, the fixtures of earlier
/// versions), as its installer put it on a backend of node `node_id`,
/// followed by `then` in the same transaction.
pub fn earlier_schema_sql(version: i32, node_id: usize, then: &str) -> String {
    let schema = match version {
        1 => include_str!("../fixtures/schema_v1.sql"),
        2 => include_str!("../fixtures/schema_v2.sql"),
        3 => include_str!("../fixtures/schema_v3.sql"),
        4 => include_str!("../fixtures/schema_v4.sql"),
        _ => panic!("no fixture of schema version {version}"),
    };
    format!(
        "BEGIN; SET LOCAL chorus.ddl_scope = 'local';\n{schema}\n\
         INSERT INTO chorus.local (node_id) VALUES ({node_id});\n{then}\nCOMMIT;"
    )
}

/// The previous version's schema (see [`earlier_schema_sql`]).
pub fn previous_schema_sql(node_id: usize, then: &str) -> String {
    earlier_schema_sql(
        chorus_proxy::cluster::capture::SCHEMA_VERSION - 1,
        node_id,
        then,
    )
}

pub fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

pub fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}
