//! Change capture on the backends: installs the `chorus` schema and its
//! capture trigger (`capture.sql`), adopts tables, and decodes the change
//! records the trigger emits as logical messages.
//!
//! A change record is the JSON payload of a transactional
//! `pg_logical_emit_message(true, 'chorus', …)`: table, operation, primary
//! key, the full new row image, the row's new version (a packed HLC) and
//! the origin node. Logical decoding delivers them only for committed
//! transactions, in commit order.

use serde::Deserialize;
use serde_json::value::RawValue;
use thiserror::Error;
use tokio_postgres::Client;

/// The schema installed on every backend, in order: its tables and the
/// capture of rows, row images, global sequences, DDL that code runs, DDL
/// replication.
pub const SCHEMA_SQL: &str = concat!(
    include_str!("../sql/capture.sql"),
    "\n",
    include_str!("../sql/images.sql"),
    "\n",
    include_str!("../sql/sequences.sql"),
    "\n",
    include_str!("../sql/ddl_code.sql"),
    "\n",
    include_str!("../sql/ddl.sql")
);
/// The functions that apply changes from other nodes: rows, then
/// statements (DDL, TRUNCATE).
pub const APPLY_SQL: &str = concat!(
    include_str!("../sql/apply.sql"),
    "\n",
    include_str!("../sql/apply_statements.sql")
);
/// Pruning tombstones (see `tombstones.sql`).
pub const TOMBSTONES_SQL: &str = include_str!("../sql/tombstones.sql");
/// What application roles may use of the schema (see `docs/security.md`).
pub const PRIVILEGES_SQL: &str = include_str!("../sql/privileges.sql");

/// The version of the `chorus` schema this build installs, recorded in
/// `chorus.schema_version`. Version 1 is a schema installed before
/// versions were recorded.
pub const SCHEMA_VERSION: i32 = 5;

/// The numbered migrations: `(n, sql)` takes a schema of version `n - 1`
/// to version `n`, before the definitions (which are idempotent: they
/// create what is missing and replace every function) run. A new install
/// needs none of them.
const MIGRATIONS: &[(i32, &str)] = &[
    (2, include_str!("../sql/migrations/0002_versioned.sql")),
    (3, include_str!("../sql/migrations/0003_tombstones.sql")),
    (4, include_str!("../sql/migrations/0004_lease_question.sql")),
    (
        5,
        include_str!("../sql/migrations/0005_capture_by_statement.sql"),
    ),
];

/// The prefix of Chorus's logical messages.
pub const MESSAGE_PREFIX: &str = "chorus";

/// The prefix of a backend's horizon message (see `chorus.emit_horizon`):
/// its content is two versions, the horizon and what the backend has of
/// every origin, as decimal numbers separated by a space.
pub const HORIZON_PREFIX: &str = "chorus-horizon";

/// The two versions of a horizon message's content.
pub fn parse_horizon(content: &[u8]) -> Option<(i64, i64)> {
    let text = std::str::from_utf8(content).ok()?;
    let (horizon, complete) = text.split_once(' ')?;
    Some((horizon.parse().ok()?, complete.parse().ok()?))
}

/// Why installing or adopting failed.
#[derive(Debug, Error)]
pub enum CaptureError {
    #[error("{}", crate::backend::error_text(.0))]
    Sql(#[from] tokio_postgres::Error),
    #[error(
        "role {0:?} is not a superuser on this backend: Chorus's role (replication.user) needs \
         superuser to install its event triggers, publication and privileges and to apply \
         changes to every table (see docs/security.md)"
    )]
    NotSuperuser(String),
    #[error(
        "the backend's chorus schema is version {found}, newer than this Chorus installs \
         ({SCHEMA_VERSION}): a newer Chorus upgraded it; run that release (or a later one) here too"
    )]
    NewerSchema { found: i32 },
}

/// Install (or upgrade in place) the `chorus` schema on a backend and record
/// which node it belongs to. Safe to run concurrently and repeatedly.
pub async fn install(client: &Client, node_id: u16) -> Result<(), CaptureError> {
    let row = client
        .query_one(
            "SELECT current_user::text, current_setting('is_superuser') = 'on'",
            &[],
        )
        .await?;
    if !row.get::<_, bool>(1) {
        return Err(CaptureError::NotSuperuser(row.get(0)));
    }
    client
        .batch_execute(
            "BEGIN;\n\
             SELECT pg_advisory_xact_lock(hashtext('chorus.install'));\n\
             SET LOCAL chorus.ddl_scope = 'local';",
        )
        .await?;
    let upgraded = async {
        let tables = client
            .query_one(
                "SELECT to_regclass('chorus.schema_version') IS NOT NULL, \
                        to_regclass('chorus.local') IS NOT NULL",
                &[],
            )
            .await?;
        let found: i32 = if tables.get(0) {
            client
                .query_one("SELECT max(version) FROM chorus.schema_version", &[])
                .await?
                .get::<_, Option<i32>>(0)
                .unwrap_or(1)
        } else if tables.get(1) {
            1
        } else {
            0
        };
        if found > SCHEMA_VERSION {
            return Err(CaptureError::NewerSchema { found });
        }
        let mut sql = String::new();
        if found > 0 {
            for (_, migration) in MIGRATIONS.iter().filter(|(n, _)| *n > found) {
                sql.push_str(migration);
                sql.push('\n');
            }
        }
        client
            .batch_execute(&format!(
                "{sql}{SCHEMA_SQL}\n{APPLY_SQL}\n{TOMBSTONES_SQL}\n{PRIVILEGES_SQL}\n\
                 INSERT INTO chorus.schema_version (version) VALUES ({SCHEMA_VERSION})\n\
                     ON CONFLICT (singleton) DO UPDATE SET version = excluded.version, installed_at = now()\n\
                     WHERE chorus.schema_version.version <> excluded.version;\n\
                 INSERT INTO chorus.local (node_id) VALUES ({node_id})\n\
                     ON CONFLICT (singleton) DO UPDATE SET node_id = excluded.node_id;\n\
                 COMMIT;"
            ))
            .await?;
        if found != SCHEMA_VERSION {
            tracing::info!(from = found, to = SCHEMA_VERSION, "chorus schema installed");
        }
        Ok(())
    }
    .await;
    if upgraded.is_err() {
        let _ = client.batch_execute("ROLLBACK").await;
        return upgraded;
    }
    give_tables_to_owner(client).await
}

/// Build the tombstones' partial index on `chorus.row_version` if the
/// backend lacks it (or holds one a failed build left invalid, which is
/// dropped first). Returns whether it built one.
///
/// A pruning round (`chorus.prune_tombstones`, every backend, every
/// minute) looks for tombstones; without the index it reads every live
/// row's version too (80 ms idle, 0.6 s under load, on a backend of a
/// million rows). The index is on `tbl`, which never changes, so an
/// update of a live row's version stays a HOT update.
///
/// Not part of [`install`]: `CREATE INDEX` inside the install's transaction
/// holds a lock on `chorus.row_version` that writers need, while it waits
/// for their tables (a deadlock under load, in a rolling upgrade). Built
/// `CONCURRENTLY` instead, on its own connection, after the install:
/// writes go on meanwhile, and pruning reads every version until it is
/// ready.
pub async fn build_tombstone_index(client: &Client) -> Result<bool, CaptureError> {
    let valid: Option<bool> = client
        .query_opt(
            "SELECT i.indisvalid FROM pg_index i \
              WHERE i.indexrelid = to_regclass('chorus.row_version_tombstone')",
            &[],
        )
        .await?
        .map(|row| row.get(0));
    if valid == Some(true) {
        return Ok(false);
    }
    // (One statement per call: CONCURRENTLY refuses a transaction block,
    // and several statements in one query are one.)
    client
        .batch_execute("SET chorus.ddl_scope = 'local'")
        .await?;
    if valid == Some(false) {
        client
            .batch_execute("DROP INDEX CONCURRENTLY IF EXISTS chorus.row_version_tombstone")
            .await?;
    }
    client
        .batch_execute(
            "CREATE INDEX CONCURRENTLY IF NOT EXISTS row_version_tombstone \
             ON chorus.row_version (tbl) WHERE deleted",
        )
        .await?;
    Ok(true)
}

/// Give the chorus schema's tables to `chorus_owner` (see privileges.sql),
/// one per transaction: a table's change of owner locks it, and taking
/// those locks together under load deadlocks with capture. A table whose
/// lock does not come within the timeout fails the install, which is
/// retried.
async fn give_tables_to_owner(client: &Client) -> Result<(), CaptureError> {
    let tables: Vec<String> = client
        .query("SELECT t::text FROM chorus.tables_to_own() t", &[])
        .await?
        .iter()
        .map(|row| row.get(0))
        .collect();
    for table in tables {
        let moved = client
            .batch_execute(&format!(
                "BEGIN;\n\
                 SET LOCAL chorus.ddl_scope = 'local';\n\
                 SET LOCAL lock_timeout = '2s';\n\
                 ALTER TABLE {table} OWNER TO chorus_owner;\n\
                 COMMIT;"
            ))
            .await;
        if let Err(e) = moved {
            let _ = client.batch_execute("ROLLBACK").await;
            return Err(e.into());
        }
    }
    Ok(())
}

/// Adopts a table (`$1`, keyless flag `$2`); returns its qualified
/// name. A table without a primary key is refused (SQLSTATE 55000, with a
/// hint) unless adopted keyless.
pub const ADOPT_SQL: &str = "SELECT chorus.adopt($1::text::regclass, $2)";

/// Adopt an existing table for replication; returns its qualified name
/// (see [`ADOPT_SQL`]).
pub async fn adopt(client: &Client, table: &str, keyless: bool) -> Result<String, CaptureError> {
    let row = client.query_one(ADOPT_SQL, &[&table, &keyless]).await?;
    Ok(row.get(0))
}

/// A row operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Operation {
    Insert,
    Update,
    Delete,
}

/// One captured change. The key and row image stay raw JSON text exactly as
/// PostgreSQL wrote them: parsing them into `serde_json::Value` would turn a
/// `numeric` such as `10.50` into a float and lose digits.
#[derive(Debug, Clone, Deserialize)]
pub struct ChangeRecord {
    /// Quoted, schema-qualified table name.
    pub table: String,
    pub op: Operation,
    /// Primary key as a JSON object; `None` for keyless tables.
    pub key: Option<Box<RawValue>>,
    /// The full new row image; `None` for a delete.
    pub row: Option<Box<RawValue>>,
    /// The full old row image of an update or delete of a keyless table
    /// (by which peers find the row); `None` otherwise.
    #[serde(default)]
    pub old: Option<Box<RawValue>>,
    /// The row's new version: a packed HLC (see `chorus_router::hlc`).
    pub version: i64,
    /// The version this write overwrote on its origin (`None`: no earlier
    /// version there).
    #[serde(default)]
    pub prev: Option<i64>,
    /// The node the write came through (or the backend's own node id).
    pub origin: i32,
}

/// Why a change message is not one of Chorus's records: the label of
/// `chorus_replication_rejected_total`.
pub type Rejection = &'static str;

/// Check that a change message's content is a record capture writes: a
/// row change (table, op, key, row, old, version, prev, origin, with the
/// row images an operation needs), a TRUNCATE (truncate, version, origin) or a
/// DDL record (ddl, seq, origin, role, search_path). Returns the version
/// of a row change or TRUNCATE (`None` for DDL). Only
/// the fields are read; the images stay unparsed (see [`ChangeRecord`]).
/// A message that is neither would fail every apply and hold up its
/// stream: the stream skips it instead.
pub fn check_record(content: &str) -> Result<Option<i64>, Rejection> {
    use std::borrow::Cow;
    #[derive(Deserialize)]
    struct Fields<'a> {
        #[serde(borrow, default)]
        table: Option<Cow<'a, str>>,
        #[serde(default)]
        op: Option<Operation>,
        #[serde(borrow, default)]
        key: Option<&'a RawValue>,
        #[serde(borrow, default)]
        row: Option<&'a RawValue>,
        #[serde(borrow, default)]
        old: Option<&'a RawValue>,
        #[serde(default)]
        version: Option<i64>,
        #[serde(default)]
        origin: Option<i32>,
        #[serde(borrow, default)]
        ddl: Option<Cow<'a, str>>,
        #[serde(default)]
        seq: Option<i64>,
        #[serde(borrow, default)]
        role: Option<Cow<'a, str>>,
        #[serde(borrow, default)]
        search_path: Option<Cow<'a, str>>,
        #[serde(borrow, default)]
        truncate: Option<Cow<'a, str>>,
    }
    let fields: Fields = serde_json::from_str(content).map_err(|_| "not_json")?;
    let object = |v: Option<&RawValue>| v.is_some_and(|v| v.get().starts_with('{'));
    if fields.truncate.is_some() {
        return match (fields.version, fields.origin, &fields.ddl, fields.op) {
            (Some(version), Some(_), None, None) => Ok(Some(version)),
            _ => Err("not_a_record"),
        };
    }
    let record = match (&fields.ddl, fields.op) {
        (Some(_), None) => {
            fields.seq.is_some()
                && fields.origin.is_some()
                && fields.role.is_some()
                && fields.search_path.is_some()
        }
        (None, Some(op)) => {
            fields.table.is_some()
                && fields.version.is_some()
                && fields.origin.is_some()
                && (op == Operation::Delete || object(fields.row))
                && (fields.key.is_none() || object(fields.key))
                // An update or delete names its row by key, or (a table
                // without a primary key) by its old image.
                && (op == Operation::Insert || fields.key.is_some() || object(fields.old))
        }
        _ => false,
    };
    if !record {
        return Err("not_a_record");
    }
    Ok(fields.version.filter(|_| fields.ddl.is_none()))
}

/// What a rejected message is about, for the log: its `op` and `table`
/// (or `truncate`, `ddl`) fields when it has them, never its row image.
pub fn record_subject(content: &str) -> String {
    #[derive(Deserialize)]
    struct Subject {
        #[serde(default)]
        op: Option<String>,
        #[serde(default)]
        table: Option<String>,
        #[serde(default)]
        truncate: Option<String>,
        #[serde(default)]
        ddl: Option<serde::de::IgnoredAny>,
    }
    match serde_json::from_str::<Subject>(content) {
        Ok(s) => [
            s.op,
            s.table,
            s.truncate.map(|t| format!("TRUNCATE {t}")),
            s.ddl.map(|_| "DDL".to_owned()),
        ]
        .into_iter()
        .flatten()
        .collect::<Vec<_>>()
        .join(" "),
        Err(_) => String::new(),
    }
}

/// The DDL index a message prefix carries (`chorus:<seq>`; plain `chorus`
/// is 0), or `None` when it is not a Chorus message.
pub fn ddl_index(prefix: &str) -> Option<u64> {
    match prefix.strip_prefix(MESSAGE_PREFIX)? {
        "" => Some(0),
        rest => rest.strip_prefix(':')?.parse().ok(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_a_change_record_keeping_numbers_as_written() {
        let payload = r#"{"key": {"id": 2574}, "op": "INSERT", "row": {"id": 2574, "name": "An, Wim", "balance": 10.50}, "table": "public.users", "origin": 1, "version": 123456}"#;
        let change: ChangeRecord = serde_json::from_str(payload).unwrap();
        assert_eq!(change.table, "public.users");
        assert_eq!(change.op, Operation::Insert);
        assert_eq!(change.key.unwrap().get(), r#"{"id": 2574}"#);
        assert_eq!(
            change.row.unwrap().get(),
            r#"{"id": 2574, "name": "An, Wim", "balance": 10.50}"#
        );
        assert_eq!(change.version, 123456);
        assert_eq!(change.origin, 1);
    }

    #[test]
    fn a_keyless_update_or_delete_is_a_record_only_with_its_old_row() {
        let update = r#"{"op": "UPDATE", "key": null, "row": {"a": 2}, "old": {"a": 1}, "table": "public.t", "origin": 1, "version": 7}"#;
        let delete = r#"{"op": "DELETE", "key": null, "row": null, "old": {"a": 1}, "table": "public.t", "origin": 1, "version": 7}"#;
        assert_eq!(check_record(update), Ok(Some(7)));
        assert_eq!(check_record(delete), Ok(Some(7)));
        let no_old = r#"{"op": "DELETE", "key": null, "row": null, "table": "public.t", "origin": 1, "version": 7}"#;
        assert_eq!(check_record(no_old), Err("not_a_record"));
        let old_not_a_row = r#"{"op": "UPDATE", "key": null, "row": {"a": 2}, "old": 1, "table": "public.t", "origin": 1, "version": 7}"#;
        assert_eq!(check_record(old_not_a_row), Err("not_a_record"));
    }

    #[test]
    fn a_rejected_message_is_described_without_its_rows() {
        let update = r#"{"op": "UPDATE", "row": {"secret": 2}, "table": "public.t"}"#;
        assert_eq!(record_subject(update), "UPDATE public.t");
        assert_eq!(
            record_subject(r#"{"truncate": "public.t", "version": 1}"#),
            "TRUNCATE public.t"
        );
        assert_eq!(record_subject(r#"{"ddl": "DROP TABLE t"}"#), "DDL");
        assert_eq!(record_subject("not json"), "");
    }

    /// The number written right after `at` in `text`.
    fn number_after(text: &str, at: usize) -> Option<i64> {
        let digits: String = text[at..]
            .chars()
            .take_while(char::is_ascii_digit)
            .collect();
        digits.parse().ok()
    }

    #[test]
    fn the_backend_sql_uses_the_constants_the_proxy_uses() {
        use crate::cluster::sequences::{SNOWFLAKE_CLOCK_JUMP, SNOWFLAKE_STEP};
        use crate::config::DEFAULT_GALLOC_RANGE;
        use chorus_router::hlc::{HLC_EPOCH_UNIX_MS, LOGICAL_BITS};
        let sql = [SCHEMA_SQL, APPLY_SQL, TOMBSTONES_SQL, PRIVILEGES_SQL].concat();
        let bits = i64::from(LOGICAL_BITS);
        // A clock reading in SQL: milliseconds since the HLC's epoch,
        // shifted past its logical bits.
        let mut readings = 0;
        for (at, found) in sql.match_indices("::bigint - ") {
            let start = at + found.len();
            let Some(epoch) = number_after(&sql, start).filter(|n| *n > 1_000_000_000) else {
                continue;
            };
            assert_eq!(epoch, HLC_EPOCH_UNIX_MS, "{}", &sql[at..at + 60]);
            let shift = start + sql[start..].find("<< ").expect("a shift") + 3;
            assert_eq!(
                number_after(&sql, shift),
                Some(bits),
                "{}",
                &sql[at..shift + 3]
            );
            readings += 1;
        }
        assert!(readings >= 3, "{readings} clock readings found");
        // Milliseconds turned into an HLC difference.
        let mut spans = 0;
        for pattern in ["_ms << ", "1000::bigint << "] {
            for (at, found) in sql.match_indices(pattern) {
                assert_eq!(number_after(&sql, at + found.len()), Some(bits));
                spans += 1;
            }
        }
        assert!(spans >= 2, "{spans} spans found");
        assert!(sql.contains("(1000::bigint << "));
        assert_eq!(SNOWFLAKE_CLOCK_JUMP, 1000 << bits);
        // A snowflake sequence's increment (a galloc one counts by 1).
        let increments: Vec<i64> = sql
            .match_indices("INCREMENT BY ")
            .filter_map(|(at, found)| number_after(&sql, at + found.len()))
            .collect();
        assert!(increments.contains(&SNOWFLAKE_STEP), "{increments:?}");
        assert!(
            increments.iter().all(|i| [1, SNOWFLAKE_STEP].contains(i)),
            "{increments:?}"
        );
        // The galloc range size a backend falls back to.
        let mut fallbacks = 0;
        for line in sql.lines().filter(|l| l.contains("sequence_block")) {
            for (at, _) in line.match_indices(", '") {
                if let Some(n) = number_after(line, at + 3) {
                    assert_eq!(n, DEFAULT_GALLOC_RANGE, "{line}");
                    fallbacks += 1;
                }
            }
        }
        assert!(fallbacks >= 3, "{fallbacks} fallbacks found");
    }

    #[test]
    fn message_prefixes_carry_the_ddl_index() {
        assert_eq!(ddl_index("chorus"), Some(0));
        assert_eq!(ddl_index("chorus:42"), Some(42));
        assert_eq!(ddl_index("chorus:x"), None);
        assert_eq!(ddl_index("chorusx"), None);
        assert_eq!(ddl_index("other"), None);
    }
}
