//! psql through Chorus: meta-commands, \copy both ways, error positions and
//! \watch, against a real PostgreSQL.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::Duration;

use chorus_testkit as testkit;
use testkit::{run_pg_program, stderr, stdout, Options};

const LIMIT: Duration = Duration::from_secs(60);

fn psql(node: &testkit::TestNode, args: &[&str]) -> std::process::Output {
    let url = node.url();
    let mut all = vec![url.as_str(), "-X", "-v", "ON_ERROR_STOP=1"];
    all.extend_from_slice(args);
    run_pg_program("psql", &all, &node.libpq_env(), LIMIT)
}

#[tokio::test(flavor = "multi_thread")]
async fn meta_commands_list_databases_tables_and_columns() {
    let node = testkit::start(Options::default()).await;
    let created = psql(
        &node,
        &[
            "-c",
            "CREATE TABLE bikes (id bigint PRIMARY KEY, name text NOT NULL, status text)",
        ],
    );
    assert!(created.status.success(), "{}", stderr(&created));

    let list = psql(&node, &["-c", "\\l"]);
    assert!(list.status.success(), "{}", stderr(&list));
    assert!(stdout(&list).contains("template1"), "{}", stdout(&list));
    assert!(stdout(&list).contains("postgres"), "{}", stdout(&list));

    let tables = psql(&node, &["-c", "\\dt"]);
    assert!(stdout(&tables).contains("bikes"), "{}", stdout(&tables));

    let describe = psql(&node, &["-c", "\\d bikes"]);
    let text = stdout(&describe);
    assert!(text.contains("Table \"public.bikes\""), "{text}");
    assert!(text.contains("name   | text"), "{text}");
    assert!(
        text.contains("\"bikes_pkey\" PRIMARY KEY, btree (id)"),
        "{text}"
    );

    for command in ["\\df", "\\du", "\\dn"] {
        let out = psql(&node, &["-c", command]);
        assert!(out.status.success(), "{command}: {}", stderr(&out));
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn copy_in_and_out_with_backslash_copy() {
    let node = testkit::start(Options::default()).await;
    let input = node.dir.path().join("in.csv");
    let output = node.dir.path().join("out.csv");
    let mut rows = String::new();
    for i in 0..5000 {
        rows.push_str(&format!("{i},\"name, {i}\",{}\n", i % 7 == 0));
    }
    std::fs::write(&input, &rows).unwrap();

    let script = format!(
        "CREATE TABLE people (id int PRIMARY KEY, name text, flag boolean);\n\
         \\copy people FROM '{}' WITH (FORMAT csv)\n\
         \\copy (SELECT * FROM people ORDER BY id) TO '{}' WITH (FORMAT csv)\n\
         SELECT count(*), sum(id) FROM people;\n",
        input.display(),
        output.display()
    );
    let mut child = Command::new(testkit::program_path("psql"))
        .args([
            node.url().as_str(),
            "-X",
            "-At",
            "-v",
            "ON_ERROR_STOP=1",
            "-f",
            "-",
        ])
        .envs(node.libpq_env())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(script.as_bytes())
        .unwrap();
    let result = testkit::wait_with_limit(child, LIMIT);
    assert!(result.status.success(), "{}", stderr(&result));
    let text = stdout(&result);
    assert!(text.contains("COPY 5000"), "{text}");
    assert!(text.contains("5000|12497500"), "{text}");
    let copied = std::fs::read_to_string(&output).unwrap();
    let expected = rows.replace(",true\n", ",t\n").replace(",false\n", ",f\n");
    assert_eq!(copied, expected);
}

#[tokio::test(flavor = "multi_thread")]
async fn errors_keep_their_position_and_caret() {
    let node = testkit::start(Options::default()).await;
    let out = psql(&node, &["-c", "SELECT id FROM no_such_table"]);
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(
        err.contains("ERROR:  relation \"no_such_table\" does not exist"),
        "{err}"
    );
    let lines: Vec<&str> = err.lines().collect();
    let at = lines
        .iter()
        .position(|l| l.starts_with("LINE 1: SELECT id FROM no_such_table"))
        .unwrap_or_else(|| panic!("no LINE in {err}"));
    // The caret sits under the first character of the table name.
    let caret = lines[at + 1].find('^').unwrap();
    assert_eq!(&lines[at][caret..caret + 13], "no_such_table", "{err}");

    // SQLSTATE and detail arrive unchanged too.
    let verbose = psql(&node, &["-v", "VERBOSITY=verbose", "-c", "SELECT 1/0"]);
    assert!(
        stderr(&verbose).contains("ERROR:  22012: division by zero"),
        "{}",
        stderr(&verbose)
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn watch_repeats_the_query() {
    let node = testkit::start(Options::default()).await;
    let mut child = Command::new(testkit::program_path("psql"))
        .args([node.url().as_str(), "-X"])
        .envs(node.libpq_env())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    stdin
        .write_all(b"SELECT 40 + 2 AS answer \\watch 0.1\n")
        .unwrap();
    // Keep stdin open so psql keeps watching, until it has answered three
    // times; then stop it.
    let (lines, seen) = std::sync::mpsc::channel::<String>();
    let mut out = std::io::BufReader::new(child.stdout.take().unwrap());
    let reader = std::thread::spawn(move || {
        let mut line = String::new();
        while std::io::BufRead::read_line(&mut out, &mut line).unwrap_or(0) > 0 {
            if lines.send(std::mem::take(&mut line)).is_err() {
                break;
            }
        }
    });
    // (Blocking waits, off the runtime's workers: the node runs on them.)
    let mut text = tokio::task::block_in_place(|| {
        let mut text = String::new();
        let deadline = std::time::Instant::now() + LIMIT;
        while text.matches("     42").count() < 3 {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match seen.recv_timeout(left) {
                Ok(line) => text.push_str(&line),
                Err(e) => panic!("psql stopped watching ({e}):\n{text}"),
            }
        }
        text
    });
    let _ = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status();
    drop(stdin);
    let out = tokio::task::block_in_place(|| {
        let out = testkit::wait_with_limit(child, Duration::from_secs(20));
        reader.join().unwrap();
        out
    });
    assert!(out.status.code().is_some(), "psql did not end on SIGINT");
    text.extend(seen.try_iter());
    let iterations = text.matches(" answer ").count();
    assert!(iterations >= 3, "only {iterations} iterations:\n{text}");
    assert!(text.matches("     42").count() >= 3, "{text}");
}

#[tokio::test(flavor = "multi_thread")]
async fn large_objects_use_the_function_call_fast_path() {
    // psql's \lo_import and \lo_export go through libpq's lo_* functions,
    // which speak the FunctionCall ('F') message.
    let node = testkit::start(Options::default()).await;
    let input = node.dir.path().join("blob.bin");
    let output = node.dir.path().join("blob.out");
    let blob: Vec<u8> = (0..200_000u32).map(|i| (i * 7 % 251) as u8).collect();
    std::fs::write(&input, &blob).unwrap();
    let imported = psql(
        &node,
        &["-At", "-c", &format!("\\lo_import '{}'", input.display())],
    );
    assert!(imported.status.success(), "{}", stderr(&imported));
    let oid: u32 = stdout(&imported)
        .trim()
        .strip_prefix("lo_import ")
        .unwrap_or_else(|| panic!("{}", stdout(&imported)))
        .parse()
        .unwrap();
    let exported = psql(
        &node,
        &["-c", &format!("\\lo_export {oid} '{}'", output.display())],
    );
    assert!(exported.status.success(), "{}", stderr(&exported));
    assert_eq!(std::fs::read(&output).unwrap(), blob);
}

#[tokio::test(flavor = "multi_thread")]
async fn notices_reach_the_client() {
    let node = testkit::start(Options::default()).await;
    let out = psql(
        &node,
        &[
            "-c",
            "DO $$ BEGIN RAISE NOTICE 'bike % is ready', 42; END $$",
        ],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("NOTICE:  bike 42 is ready"),
        "{}",
        stderr(&out)
    );
    // Those of statements replicated through the cluster's DDL log too:
    // one validated on the backend first, and one that cannot run in a
    // transaction block (its notice comes from the log's apply).
    for (statement, notice) in [
        (
            "DROP ROLE IF EXISTS nobody_here",
            "NOTICE:  role \"nobody_here\" does not exist, skipping",
        ),
        (
            "DROP DATABASE IF EXISTS nothing_here",
            "NOTICE:  database \"nothing_here\" does not exist, skipping",
        ),
    ] {
        let out = psql(&node, &["-c", statement]);
        assert!(out.status.success(), "{}", stderr(&out));
        assert!(
            stderr(&out).contains(notice),
            "{statement}: {}",
            stderr(&out)
        );
    }
}
