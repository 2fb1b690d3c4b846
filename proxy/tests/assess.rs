//! `chorus assess` against a real PostgreSQL database holding one of each
//! hazard: each is found, nothing of the system's is, and the command
//! prints the readable report and the JSON.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use chorus_testkit as testkit;

use chorus_proxy::localpg::{LocalPgOptions, LocalPostgres};
use chorus_proxy::ops::assess;

const HAZARDS: &str = "
    CREATE TABLE keyless (a int);
    CREATE TABLE keyed (id serial PRIMARY KEY, email text UNIQUE,
                        made timestamptz DEFAULT clock_timestamp(), u uuid DEFAULT gen_random_uuid(),
                        fixed int DEFAULT 7, day date DEFAULT now());
    CREATE TABLE child (id int PRIMARY KEY, k int REFERENCES keyed DEFERRABLE);
    CREATE UNLOGGED TABLE scratch (id int PRIMARY KEY);
    CREATE TABLE booking (id int PRIMARY KEY, r int4range, EXCLUDE USING gist (r WITH &&));
    CREATE FUNCTION audit() RETURNS trigger LANGUAGE plpgsql AS
        $$BEGIN INSERT INTO child VALUES (NEW.id, NEW.id); RETURN NULL; END$$;
    CREATE TRIGGER t_audit AFTER INSERT ON keyed FOR EACH ROW EXECUTE FUNCTION audit();
    CREATE FUNCTION make_table() RETURNS void LANGUAGE plpgsql AS
        $$BEGIN EXECUTE 'CREATE TABLE made_here ()'; END$$;
    CREATE FUNCTION reads_only(i int) RETURNS int LANGUAGE sql STABLE AS 'SELECT i + 1';
    SELECT lo_from_bytea(0, 'abc');
    ALTER DATABASE postgres SET work_mem = '8MB';
";

fn found(a: &assess::Assessment, hazard: &str) -> Vec<(String, String)> {
    a.checks
        .iter()
        .find(|c| c.hazard == hazard)
        .unwrap_or_else(|| panic!("no check {hazard}"))
        .found
        .iter()
        .map(|f| (f.object.clone(), f.detail.clone()))
        .collect()
}

fn pair(object: &str, detail: &str) -> (String, String) {
    (object.to_owned(), detail.to_owned())
}

#[tokio::test(flavor = "multi_thread")]
async fn every_hazard_of_a_database_is_found_with_what_chorus_does() {
    let dir = tempfile::tempdir().unwrap();
    let pg = tokio::task::block_in_place(|| {
        LocalPostgres::create(
            &testkit::pg_binaries(),
            &dir.path().join("pg"),
            LocalPgOptions::default(),
        )
    })
    .unwrap();
    let client = testkit::connect(&pg.conninfo("postgres")).await.unwrap();
    client.batch_execute(HAZARDS).await.unwrap();
    client.batch_execute("CREATE DATABASE other").await.unwrap();

    let a = assess::assess(&client).await.unwrap();
    assert_eq!(a.database, "postgres");
    assert_eq!(
        found(&a, "table without a primary key"),
        [pair("public.keyless", "table")]
    );
    assert_eq!(
        found(&a, "local sequence"),
        [pair("public.keyed_id_seq", "owned by keyed.id")]
    );
    assert_eq!(
        found(&a, "unique key besides the primary key"),
        [pair("keyed", "keyed_email_key")]
    );
    assert_eq!(
        found(&a, "trigger"),
        [pair("keyed", "t_audit (audit, fires on the origin only)")]
    );
    assert_eq!(found(&a, "unlogged table"), [pair("public.scratch", "")]);
    assert_eq!(
        found(&a, "large objects"),
        [pair("pg_largeobject", "1 large objects")]
    );
    assert_eq!(
        found(&a, "exclusion constraint"),
        [pair("booking", "booking_r_excl")]
    );
    assert_eq!(
        found(&a, "deferrable constraint"),
        [pair("child", "child_k_fkey (foreign key)")]
    );
    assert_eq!(
        found(&a, "volatile default"),
        [
            pair("keyed", "made DEFAULT clock_timestamp()"),
            pair("keyed", "u DEFAULT gen_random_uuid()")
        ]
    );
    assert_eq!(
        found(&a, "foreign key"),
        [pair("child", "child_k_fkey references keyed")]
    );
    assert_eq!(
        found(&a, "function that writes"),
        [
            pair("audit()", "writes rows"),
            pair("make_table()", "runs DDL")
        ]
    );
    assert_eq!(found(&a, "extension"), []);
    assert_eq!(
        found(&a, "database"),
        [
            pair("postgres", "assessed, settings: work_mem=8MB"),
            pair("other", "another database")
        ]
    );
    assert_eq!(a.hazards(), 13);
    // Only the catalog was read: nothing changed, and no transaction is
    // left open.
    let tables: i64 = client
        .query_one(
            "SELECT count(*) FROM pg_tables WHERE schemaname = 'public'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(tables, 5);

    // The command: the readable report, and JSON.
    let chorus = env!("CARGO_BIN_EXE_chorus");
    let dsn = pg.conninfo("postgres");
    let out = std::process::Command::new(chorus)
        .args(["assess", "--dsn", &dsn])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", testkit::stderr(&out));
    let report = testkit::stdout(&out);
    assert!(
        report.starts_with("database postgres (PostgreSQL "),
        "{report}"
    );
    assert!(report.contains("13 objects to look at"), "{report}");
    assert!(
        report.contains("table without a primary key (1)\n  public.keyless  table\n  chorus: "),
        "{report}"
    );
    assert!(report.contains("extension (0)\n  none\n"), "{report}");
    let out = std::process::Command::new(chorus)
        .args(["assess", "--dsn", &dsn, "--json"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", testkit::stderr(&out));
    let json: serde_json::Value = serde_json::from_str(&testkit::stdout(&out)).unwrap();
    assert_eq!(json["database"], "postgres");
    assert_eq!(json["checks"][0]["hazard"], "table without a primary key");
    assert_eq!(json["checks"][0]["found"][0]["object"], "public.keyless");
    // A database that cannot be reached is an error, not an empty report.
    let out = std::process::Command::new(chorus)
        .args(["assess", "--dsn", "host=127.0.0.1 port=1 user=x dbname=x"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        testkit::stderr(&out).contains("connecting to --dsn"),
        "{}",
        testkit::stderr(&out)
    );
}
