//! The copy itself: a slot on the source that exports its snapshot, the
//! database dumped at that snapshot and restored into a database of its
//! own on the target, which then takes the copied database's place.
//!
//! `pg_dump` and `pg_restore` do the copying: they know every kind of
//! object PostgreSQL has, which no copy of our own would keep up with.
//! The exported snapshot needs a replication connection, which
//! tokio-postgres does not open, hence the few messages written here.

use std::process::Stdio;
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::AsyncWriteExt;
use tokio_postgres::Client;

use crate::backend::BackendStream;
use crate::config::{BackendConfig, ReplicationConfig};
use crate::wire::protocol::{self, read_message};

use super::RejoinError;

/// A slot made with an exported snapshot: the snapshot lives as long as
/// this connection does nothing else, so it is kept until the dump is
/// done.
pub(super) struct ExportedSlot {
    _connection: BackendStream,
    /// Where the slot's changes start: every transaction that committed
    /// before it is in the snapshot, none after.
    pub consistent_point: String,
    pub snapshot: String,
}

/// Create `slot` (pgoutput) on `backend` in `config.database`, exporting
/// its snapshot.
pub(super) async fn create_exported_slot(
    backend: &BackendConfig,
    config: &ReplicationConfig,
    slot: &str,
) -> Result<ExportedSlot, RejoinError> {
    let connection = crate::cluster::replication::walstream::replication_login(
        backend,
        config,
        Duration::from_secs(10),
    )
    .await
    .map_err(|e| RejoinError::Failed(format!("replication login to {}: {e}", backend.name)))?;
    let mut stream = connection.stream;
    let mut out = BytesMut::new();
    protocol::query(
        &mut out,
        &format!(
            "CREATE_REPLICATION_SLOT \"{}\" LOGICAL pgoutput (SNAPSHOT 'export')",
            slot.replace('"', "\"\"")
        ),
    );
    stream
        .write_all(&out)
        .await
        .map_err(|e| RejoinError::Failed(format!("writing to {}: {e}", backend.name)))?;
    let mut buf = BytesMut::new();
    let mut row: Option<Vec<String>> = None;
    loop {
        let tag = read_message(&mut stream, &mut buf, 1 << 20)
            .await
            .map_err(|e| RejoinError::Failed(format!("reading from {}: {e}", backend.name)))?;
        match tag {
            b'D' => row = Some(data_row(&buf)),
            b'E' => {
                let fields = protocol::parse_error_fields(&buf);
                return Err(RejoinError::Failed(format!(
                    "CREATE_REPLICATION_SLOT on {}: {}",
                    backend.name, fields.message
                )));
            }
            b'Z' => break,
            _ => {}
        }
    }
    // slot_name, consistent_point, snapshot_name, output_plugin
    match row.as_deref() {
        Some([_, point, snapshot, ..]) if !snapshot.is_empty() => Ok(ExportedSlot {
            _connection: stream,
            consistent_point: point.clone(),
            snapshot: snapshot.clone(),
        }),
        _ => Err(RejoinError::Failed(format!(
            "CREATE_REPLICATION_SLOT on {} exported no snapshot",
            backend.name
        ))),
    }
}

/// The text columns of a DataRow body (NULL as empty).
fn data_row(body: &[u8]) -> Vec<String> {
    let mut columns = Vec::new();
    let mut at = 2;
    let count = body
        .get(..2)
        .map_or(0, |b| i16::from_be_bytes([b[0], b[1]]));
    for _ in 0..count {
        let Some(len) = body.get(at..at + 4) else {
            break;
        };
        let len = i32::from_be_bytes([len[0], len[1], len[2], len[3]]);
        at += 4;
        if len < 0 {
            columns.push(String::new());
            continue;
        }
        let end = at + usize::try_from(len).unwrap_or(0);
        columns.push(String::from_utf8_lossy(body.get(at..end).unwrap_or_default()).into_owned());
        at = end;
    }
    columns
}

/// Roles belong to the backend, not to a database: a new backend has
/// none but its bootstrap superuser, and one restored from an old backup
/// lacks those made since. Make on the target each role the source had at
/// `snapshot` (a shared catalog is read at the snapshot too, so a role
/// made later comes through the DDL log instead) that the target lacks,
/// with its attributes, password, settings and memberships. (A role the
/// target has already is left as it is.) Returns the roles made.
pub(super) async fn copy_roles(
    source: &Client,
    admin: &Client,
    snapshot: &str,
) -> Result<Vec<String>, RejoinError> {
    let have: std::collections::HashSet<String> = admin
        .query("SELECT rolname::text FROM pg_roles", &[])
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    source
        .batch_execute(&format!(
            "BEGIN ISOLATION LEVEL REPEATABLE READ; SET TRANSACTION SNAPSHOT {}",
            quote_literal(snapshot)
        ))
        .await?;
    let read = async {
        let roles = source
            .query(
                "SELECT rolname::text, rolsuper, rolinherit, rolcreaterole, rolcreatedb, \
                        rolcanlogin, rolreplication, rolbypassrls, rolconnlimit, rolpassword, \
                        rolvaliduntil::text \
                   FROM pg_authid WHERE rolname !~ '^pg_' ORDER BY oid",
                &[],
            )
            .await?;
        let members = source
            .query(
                "SELECT r.rolname::text, m.rolname::text, a.admin_option \
                   FROM pg_auth_members a JOIN pg_authid r ON r.oid = a.roleid \
                   JOIN pg_authid m ON m.oid = a.member",
                &[],
            )
            .await?;
        let settings = source
            .query(
                "SELECT pg_get_userbyid(setrole)::text, c FROM pg_db_role_setting, \
                        unnest(setconfig) c WHERE setdatabase = 0 AND setrole <> 0",
                &[],
            )
            .await?;
        Ok::<_, tokio_postgres::Error>((roles, members, settings))
    };
    let read = read.await;
    source.batch_execute("COMMIT").await?;
    let (roles, members, settings) = read?;
    let mut made = Vec::new();
    for role in &roles {
        let name: String = role.get(0);
        if have.contains(&name) {
            continue;
        }
        let flag = |i: usize, yes: &str, no: &str| {
            if role.get::<_, bool>(i) {
                format!(" {yes}")
            } else {
                format!(" {no}")
            }
        };
        let mut sql = format!("CREATE ROLE {} WITH", quote_ident(&name));
        sql += &flag(1, "SUPERUSER", "NOSUPERUSER");
        sql += &flag(2, "INHERIT", "NOINHERIT");
        sql += &flag(3, "CREATEROLE", "NOCREATEROLE");
        sql += &flag(4, "CREATEDB", "NOCREATEDB");
        sql += &flag(5, "LOGIN", "NOLOGIN");
        sql += &flag(6, "REPLICATION", "NOREPLICATION");
        sql += &flag(7, "BYPASSRLS", "NOBYPASSRLS");
        sql += &format!(" CONNECTION LIMIT {}", role.get::<_, i32>(8));
        if let Some(password) = role.get::<_, Option<String>>(9) {
            sql += &format!(" PASSWORD {}", quote_literal(&password));
        }
        if let Some(until) = role.get::<_, Option<String>>(10) {
            sql += &format!(" VALID UNTIL {}", quote_literal(&until));
        }
        admin.batch_execute(&sql).await?;
        made.push(name);
    }
    let new = |name: &String| made.contains(name);
    for member in &members {
        let (role, of, admin_option): (String, String, bool) =
            (member.get(0), member.get(1), member.get(2));
        if !new(&role) && !new(&of) {
            continue;
        }
        admin
            .batch_execute(&format!(
                "GRANT {} TO {}{}",
                quote_ident(&role),
                quote_ident(&of),
                if admin_option {
                    " WITH ADMIN OPTION"
                } else {
                    ""
                }
            ))
            .await?;
    }
    for setting in &settings {
        let (role, text): (String, String) = (setting.get(0), setting.get(1));
        let Some((name, value)) = text.split_once('=').filter(|_| new(&role)) else {
            continue;
        };
        admin
            .batch_execute(&format!(
                "ALTER ROLE {} SET {} = {}",
                quote_ident(&role),
                quote_ident(name),
                quote_literal(value)
            ))
            .await?;
    }
    Ok(made)
}

/// The name the copy is restored under before it takes the database's
/// place.
pub(super) fn staging_name(database: &str) -> String {
    // (A database name has at most 63 bytes: a long one is shortened by
    // its tag, which stays unique per name.)
    let tag = crate::lane::database_tag(database);
    format!("chorus_copy_{tag}")
}

/// Make the empty staging database on the target (`admin`: a connection
/// to another of its databases), with the source database's owner,
/// encoding, locale, grants, connection limit and settings.
pub(super) async fn create_staging(
    source: &Client,
    admin: &Client,
    database: &str,
) -> Result<(), RejoinError> {
    let staging = staging_name(database);
    let row = source
        .query_one(
            "SELECT pg_get_userbyid(datdba), pg_encoding_to_char(encoding), datcollate, datctype, \
                    datconnlimit, datacl IS NOT NULL \
               FROM pg_database WHERE datname = current_database()",
            &[],
        )
        .await?;
    let (owner, encoding, collate, ctype): (String, String, String, String) =
        (row.get(0), row.get(1), row.get(2), row.get(3));
    let (limit, explicit): (i32, bool) = (row.get(4), row.get(5));
    admin
        .batch_execute(&format!(
            "DROP DATABASE IF EXISTS {} WITH (FORCE)",
            quote_ident(&staging)
        ))
        .await?;
    admin
        .batch_execute(&format!(
            "CREATE DATABASE {} OWNER {} TEMPLATE template0 ENCODING {} LC_COLLATE {} LC_CTYPE {}",
            quote_ident(&staging),
            quote_ident(&owner),
            quote_literal(&encoding),
            quote_literal(&collate),
            quote_literal(&ctype),
        ))
        .await?;
    // Who may connect and make schemas or temporary tables (the grants
    // of the source's database; none given: PostgreSQL's defaults), and
    // how many may connect.
    let grants = source
        .query(
            "SELECT a.privilege_type, \
                    CASE WHEN a.grantee = 0 THEN NULL ELSE pg_get_userbyid(a.grantee)::text END, \
                    a.is_grantable \
               FROM pg_database d, aclexplode(d.datacl) a WHERE d.datname = current_database()",
            &[],
        )
        .await?;
    if explicit {
        admin
            .batch_execute(&format!(
                "REVOKE ALL ON DATABASE {0} FROM PUBLIC; REVOKE ALL ON DATABASE {0} FROM {1}",
                quote_ident(&staging),
                quote_ident(&owner)
            ))
            .await?;
        for grant in grants {
            let (privilege, grantee, grantable): (String, Option<String>, bool) =
                (grant.get(0), grant.get(1), grant.get(2));
            admin
                .batch_execute(&format!(
                    "GRANT {privilege} ON DATABASE {} TO {}{}",
                    quote_ident(&staging),
                    grantee.as_deref().map_or("PUBLIC".into(), quote_ident),
                    if grantable { " WITH GRANT OPTION" } else { "" }
                ))
                .await?;
        }
    }
    if limit >= 0 {
        admin
            .batch_execute(&format!(
                "ALTER DATABASE {} CONNECTION LIMIT {limit}",
                quote_ident(&staging)
            ))
            .await?;
    }
    // The database's own settings (ALTER DATABASE … SET), for every role
    // and per role.
    let settings = source
        .query(
            "SELECT CASE WHEN s.setrole = 0 THEN NULL ELSE pg_get_userbyid(s.setrole) END, c \
               FROM pg_db_role_setting s, unnest(s.setconfig) c \
              WHERE s.setdatabase = (SELECT oid FROM pg_database WHERE datname = current_database())",
            &[],
        )
        .await?;
    for setting in settings {
        let role: Option<String> = setting.get(0);
        let text: String = setting.get(1);
        let Some((name, value)) = text.split_once('=') else {
            continue;
        };
        let target = match role {
            Some(role) => format!(
                "ALTER ROLE {} IN DATABASE {}",
                quote_ident(&role),
                quote_ident(&staging)
            ),
            None => format!("ALTER DATABASE {}", quote_ident(&staging)),
        };
        admin
            .batch_execute(&format!(
                "{target} SET {} = {}",
                quote_ident(name),
                quote_literal(value)
            ))
            .await?;
    }
    Ok(())
}

/// The staging database takes the place of `database` on the target.
pub(super) async fn swap_in(admin: &Client, database: &str) -> Result<(), RejoinError> {
    // (Its logical slots would keep the old database from being dropped.)
    admin
        .execute(
            "SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots \
              WHERE database = $1 AND active_pid IS NOT NULL",
            &[&database],
        )
        .await?;
    admin
        .execute(
            "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots \
              WHERE database = $1 AND slot_name LIKE 'chorus\\_%'",
            &[&database],
        )
        .await?;
    // (Two statements: DROP DATABASE runs outside a transaction block.)
    admin
        .batch_execute(&format!(
            "DROP DATABASE IF EXISTS {} WITH (FORCE)",
            quote_ident(database)
        ))
        .await?;
    admin
        .batch_execute(&format!(
            "ALTER DATABASE {} RENAME TO {}",
            quote_ident(&staging_name(database)),
            quote_ident(database)
        ))
        .await?;
    Ok(())
}

/// The environment of a `pg_dump` or `pg_restore` run against `backend`
/// as the replication user.
fn client_env(
    command: &mut tokio::process::Command,
    backend: &BackendConfig,
    config: &ReplicationConfig,
) {
    command
        .env("PGHOST", &backend.host)
        .env("PGPORT", backend.port.to_string())
        .env("PGUSER", &config.user)
        .env("PGAPPNAME", "chorus replication")
        .env(
            "PGSSLMODE",
            if backend.tls.is_some() {
                "require"
            } else {
                "disable"
            },
        );
    match &config.password {
        Some(password) => command.env("PGPASSWORD", password),
        None => command.env_remove("PGPASSWORD"),
    };
}

/// Where `pg_dump` and `pg_restore` are: next to the server programs
/// (`$PG_BINDIR`, Debian's directories), else on `PATH`.
fn program(name: &str) -> std::path::PathBuf {
    crate::localpg::PgBinaries::find()
        .map(|b| b.program(name))
        .ok()
        .filter(|p| p.is_file())
        .unwrap_or_else(|| name.into())
}

/// Dump `database` from `source` at `snapshot` and restore it, in one
/// transaction with the capture triggers and event triggers off
/// (`session_replication_role = replica`), into the staging database on
/// `target`.
pub(super) async fn dump_and_restore(
    source: &BackendConfig,
    target: &BackendConfig,
    config: &ReplicationConfig,
    snapshot: &str,
) -> Result<(), RejoinError> {
    let mut dump = tokio::process::Command::new(program("pg_dump"));
    client_env(&mut dump, source, config);
    dump.arg("--format=custom")
        .arg(format!("--snapshot={snapshot}"))
        .arg("--dbname")
        .arg(&config.database)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let mut dump = dump
        .spawn()
        .map_err(|e| RejoinError::Failed(format!("starting pg_dump: {e}")))?;
    let dumped: Stdio = dump
        .stdout
        .take()
        .and_then(|out| out.try_into().ok())
        .ok_or_else(|| RejoinError::Failed("pg_dump gave no output".into()))?;
    let mut restore = tokio::process::Command::new(program("pg_restore"));
    client_env(&mut restore, target, config);
    restore
        .env("PGOPTIONS", "-c session_replication_role=replica")
        .arg("--single-transaction")
        .arg("--exit-on-error")
        .arg("--dbname")
        .arg(staging_name(&config.database))
        .stdin(dumped)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let restore = restore
        .spawn()
        .map_err(|e| RejoinError::Failed(format!("starting pg_restore: {e}")))?;
    let (dumped, restored) = tokio::join!(dump.wait_with_output(), restore.wait_with_output());
    let dumped = dumped.map_err(|e| RejoinError::Failed(format!("pg_dump: {e}")))?;
    let restored = restored.map_err(|e| RejoinError::Failed(format!("pg_restore: {e}")))?;
    if !dumped.status.success() {
        return Err(RejoinError::Failed(format!(
            "pg_dump of {} on {} failed: {}",
            config.database,
            source.name,
            String::from_utf8_lossy(&dumped.stderr).trim()
        )));
    }
    if !restored.status.success() {
        return Err(RejoinError::Failed(format!(
            "pg_restore into {} failed: {}",
            target.name,
            String::from_utf8_lossy(&restored.stderr).trim()
        )));
    }
    Ok(())
}

pub(super) fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

fn quote_literal(text: &str) -> String {
    format!("'{}'", text.replace('\'', "''"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_data_row_gives_its_columns() {
        let mut body = vec![0, 3];
        for value in [Some("slot"), None, Some("0/16B3748")] {
            match value {
                Some(v) => {
                    body.extend_from_slice(&(v.len() as i32).to_be_bytes());
                    body.extend_from_slice(v.as_bytes());
                }
                None => body.extend_from_slice(&(-1i32).to_be_bytes()),
            }
        }
        assert_eq!(data_row(&body), vec!["slot", "", "0/16B3748"]);
    }

    #[test]
    fn staging_names_fit_and_differ() {
        let long = "d".repeat(63);
        assert!(staging_name(&long).len() <= 63);
        assert_ne!(staging_name("a"), staging_name("b"));
    }
}
