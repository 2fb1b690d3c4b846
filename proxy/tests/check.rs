//! `chorus check` on a running three-node cluster: backends that agree,
//! rows changed on one backend around Chorus (found, per key, with each
//! backend's version), writes still on their way (not reported), and
//! `--repair`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use chorus_testkit as testkit;
use chorus_testkit::procs;

use std::process::{Command, Output};

use procs::{cluster, Cluster};

/// `chorus check` with node 1's configuration and `args`.
fn check(c: &Cluster, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_chorus"))
        .arg("check")
        .arg("--config")
        .arg(c.dir.path().join("node1.toml"))
        .args(args)
        .output()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_finds_rows_that_differ_per_key_and_repair_mends_what_versions_can_order() {
    let c = cluster("").await;
    c.exec(1, "CREATE TABLE items (id int PRIMARY KEY, v text)")
        .await;
    c.exec(1, "CREATE TABLE notes (body text)").await;
    c.exec(
        2,
        "INSERT INTO items SELECT g, 'v' || g FROM generate_series(1, 5000) g; \
         INSERT INTO notes SELECT 'note ' || g FROM generate_series(1, 50) g",
    )
    .await;
    for b in 1..=3 {
        c.wait_for(b, "SELECT count(*)::text FROM items", |v| v == "5000")
            .await;
        c.wait_for(b, "SELECT count(*)::text FROM notes", |v| v == "50")
            .await;
    }
    let out = check(&c, &[]);
    let report = testkit::stdout(&out);
    assert!(out.status.success(), "{report}{}", testkit::stderr(&out));
    assert!(report.starts_with("2 tables, 5050 rows"), "{report}");
    assert!(
        report.contains("the backends hold the same rows"),
        "{report}"
    );

    // Writes through node 3 while it runs are on their way to the others,
    // not differences.
    let writer = c.via(3).await;
    let writes = tokio::spawn(async move {
        for i in 0..200 {
            writer
                .batch_execute(&format!(
                    "UPDATE items SET v = 'moving {i}' WHERE id = {}",
                    i % 50 + 1
                ))
                .await
                .unwrap();
        }
    });
    let out = check(&c, &["--table", "items"]);
    writes.await.unwrap();
    assert!(
        out.status.success(),
        "{}{}",
        testkit::stdout(&out),
        testkit::stderr(&out)
    );

    c.converge(
        "SELECT md5(string_agg(v, ',' ORDER BY id)) FROM items",
        3,
        &[1, 2],
    )
    .await;

    // Around Chorus: on backend 2 a row changed and one deleted without
    // capture (their versions stay as they were); on backend 3 a row and
    // its version gone, as if an apply had been lost.
    c.direct(2)
        .await
        .batch_execute(
            "SET session_replication_role = replica; \
             UPDATE items SET v = 'changed here' WHERE id = 10; \
             DELETE FROM items WHERE id = 20; \
             INSERT INTO notes VALUES ('only here')",
        )
        .await
        .unwrap();
    c.direct(3)
        .await
        .batch_execute(
            "SET session_replication_role = replica; \
             DELETE FROM items WHERE id = 30; \
             DELETE FROM chorus.row_version WHERE tbl = 'public.items' AND pk = '{\"id\": 30}'",
        )
        .await
        .unwrap();
    let metrics = c.dir.path().join("check.prom");
    let out = check(
        &c,
        &[
            "--settle-ms",
            "500",
            "--metrics-file",
            metrics.to_str().unwrap(),
        ],
    );
    let report = testkit::stdout(&out);
    assert_eq!(
        out.status.code(),
        Some(1),
        "{report}{}",
        testkit::stderr(&out)
    );
    assert!(report.contains("4 keys differ:"), "{report}");
    for key in [
        "public.items {\"id\": 10}\n",
        "public.items {\"id\": 20}\n",
        "public.items {\"id\": 30}\n",
        "public.notes (\"only here\")\n",
    ] {
        assert!(report.contains(key), "{key} in {report}");
    }
    assert!(report.contains("  pg3: no row, no version\n"), "{report}");
    let prom = std::fs::read_to_string(&metrics).unwrap();
    assert!(
        prom.contains("chorus_check_differences{table=\"public.items\"} 3\n"),
        "{prom}"
    );

    // --repair copies what last-writer-wins can order (the row backend 3
    // lost); rows changed under an unchanged version stay reported.
    let out = check(&c, &["--settle-ms", "500", "--repair", "--json"]);
    assert_eq!(out.status.code(), Some(1), "{}", testkit::stderr(&out));
    let json: serde_json::Value = serde_json::from_str(&testkit::stdout(&out)).unwrap();
    assert!(json["repaired_rows"].as_u64().unwrap() >= 1, "{json}");
    let keys: Vec<&str> = json["differences"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["key"].as_str().unwrap())
        .collect();
    assert_eq!(
        keys,
        ["{\"id\": 10}", "{\"id\": 20}", "(\"only here\")"],
        "{json}"
    );
    let row30 = "SELECT v FROM items WHERE id = 30";
    let want: String = c
        .direct(1)
        .await
        .query_one(row30, &[])
        .await
        .unwrap()
        .get(0);
    let back: String = c
        .direct(3)
        .await
        .query_one(row30, &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(back, want);
}
