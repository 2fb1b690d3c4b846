//! pgbench through Chorus: initialization, the built-in select-only and
//! simple-update scripts in every query mode, and a pipelined script.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use chorus_testkit as testkit;
use testkit::{run_pg_program, stderr, stdout, Options, TestNode};

const LIMIT: Duration = Duration::from_secs(120);

fn pgbench(node: &TestNode, args: &[&str]) -> std::process::Output {
    let port = node.addr.port().to_string();
    let mut all = vec![
        "-h",
        "127.0.0.1",
        "-p",
        port.as_str(),
        "-U",
        testkit::PG_USER,
    ];
    all.extend_from_slice(args);
    all.push("postgres");
    run_pg_program("pgbench", &all, &node.libpq_env(), LIMIT)
}

/// Assert a pgbench run finished every transaction without failures.
fn assert_clean_run(out: &std::process::Output, transactions: u32) {
    let text = stdout(out);
    assert!(out.status.success(), "{text}\n{}", stderr(out));
    assert!(
        text.contains(&format!(
            "number of transactions actually processed: {transactions}/{transactions}"
        )),
        "{text}"
    );
    if text.contains("number of failed transactions") {
        assert!(text.contains("number of failed transactions: 0 "), "{text}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn builtin_scripts_in_every_query_mode() {
    let node = testkit::start(Options::default()).await;
    let init = pgbench(&node, &["-i", "-s", "1", "-q"]);
    assert!(init.status.success(), "{}", stderr(&init));
    assert!(stderr(&init).contains("done in"), "{}", stderr(&init));

    for mode in ["simple", "extended", "prepared"] {
        for script in ["-S", "-N"] {
            let out = pgbench(
                &node,
                &[script, "-M", mode, "-c", "4", "-j", "2", "-t", "200"],
            );
            assert_clean_run(&out, 800);
        }
    }

    // The writes really happened on the backend. pgbench truncates
    // pgbench_history before each run (its default vacuum step, which also
    // went through the proxy), so the last -N run's rows remain.
    let direct = node.direct().await;
    let history: i64 = direct
        .query_one("SELECT count(*) FROM pgbench_history", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(history, 800);
}

#[tokio::test(flavor = "multi_thread")]
async fn pipelined_script() {
    let node = testkit::start(Options::default()).await;
    let init = pgbench(&node, &["-i", "-s", "1", "-q"]);
    assert!(init.status.success(), "{}", stderr(&init));
    let script = node.dir.path().join("pipeline.sql");
    std::fs::write(
        &script,
        "\\set aid random(1, 100000)\n\
         \\set delta random(-5000, 5000)\n\
         \\startpipeline\n\
         BEGIN;\n\
         UPDATE pgbench_accounts SET abalance = abalance + :delta WHERE aid = :aid;\n\
         SELECT abalance FROM pgbench_accounts WHERE aid = :aid;\n\
         INSERT INTO pgbench_history (tid, bid, aid, delta, mtime) VALUES (1, 1, :aid, :delta, CURRENT_TIMESTAMP);\n\
         END;\n\
         \\endpipeline\n",
    )
    .unwrap();
    let file = script.to_str().unwrap();
    for mode in ["extended", "prepared"] {
        let out = pgbench(
            &node,
            &["-f", file, "-M", mode, "-c", "4", "-j", "2", "-t", "100"],
        );
        assert_clean_run(&out, 400);
    }
}
