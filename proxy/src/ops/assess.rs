//! `chorus assess`: read a plain PostgreSQL database before it is adopted
//! and list what will behave differently once several nodes write to it,
//! each with what Chorus does about it (docs/compatibility.md is the
//! reference for every line).
//!
//! Only the catalog is read, in one read-only transaction; nothing is
//! written.

use serde::Serialize;
use tokio_postgres::Client;

/// One kind of hazard: how it is found, and what Chorus does about it.
struct Check {
    hazard: &'static str,
    /// Returns (object, detail) rows. System schemas and Chorus's own are
    /// left out by every query.
    sql: &'static str,
    chorus: &'static str,
}

/// Schemas that are never the application's.
const NOT_APPLICATION: &str = "('pg_catalog', 'information_schema', 'pg_toast', 'chorus')";

const CHECKS: &[Check] = &[
    Check {
        hazard: "table without a primary key",
        sql: "SELECT format('%I.%I', n.nspname, c.relname), \
                     CASE c.relkind WHEN 'p' THEN 'partitioned' ELSE 'table' END \
                FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
               WHERE c.relkind IN ('r', 'p') AND NOT c.relispartition AND c.relpersistence = 'p' \
                 AND n.nspname NOT IN NOT_APPLICATION \
                 AND NOT EXISTS (SELECT 1 FROM pg_constraint k WHERE k.conrelid = c.oid AND k.contype = 'p') \
               ORDER BY 1",
        chorus: "chorus adopt refuses it unless --keyless (tables created through Chorus are \
                 adopted keyless): an update or delete then finds the row by its content, and \
                 a row changed through two nodes at once is skipped on a peer and logged \
                 (update_missing, delete_missing), so the backends can differ in it. \
                 Add a primary key.",
    },
    Check {
        hazard: "local sequence",
        sql: "SELECT format('%I.%I', n.nspname, c.relname), \
                     coalesce('owned by ' || (SELECT format('%s.%I', d.refobjid::regclass, a.attname) \
                        FROM pg_depend d JOIN pg_attribute a ON a.attrelid = d.refobjid AND a.attnum = d.refobjsubid \
                       WHERE d.objid = c.oid AND d.classid = 'pg_class'::regclass AND d.deptype IN ('a', 'i') LIMIT 1), '') \
                FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
               WHERE c.relkind = 'S' AND n.nspname NOT IN NOT_APPLICATION ORDER BY 1",
        chorus: "each backend would hand out the same values: make it global with \
                 chorus convert-sequences (snowflake or galloc) when adopting. Sequences \
                 created through Chorus are global from the start; setval() and ALTER \
                 SEQUENCE of values are refused (0A000).",
    },
    Check {
        hazard: "unique key besides the primary key",
        sql: "SELECT format('%s', i.indrelid::regclass), format('%s', i.indexrelid::regclass) \
                FROM pg_index i JOIN pg_class c ON c.oid = i.indrelid \
                JOIN pg_namespace n ON n.oid = c.relnamespace \
               WHERE i.indisunique AND NOT i.indisprimary AND n.nspname NOT IN NOT_APPLICATION \
               ORDER BY 1, 2",
        chorus: "two nodes can take the same value at once: the newer row (last writer wins) \
                 is kept on every backend, the other deleted and logged (kind unique).",
    },
    Check {
        hazard: "trigger",
        sql: "SELECT format('%s', t.tgrelid::regclass), \
                     format('%I (%s, %s)', t.tgname, t.tgfoid::regproc, \
                            CASE t.tgenabled WHEN 'O' THEN 'fires on the origin only' \
                                             WHEN 'A' THEN 'ENABLE ALWAYS: fires on every backend' \
                                             WHEN 'R' THEN 'ENABLE REPLICA: fires when applying' \
                                             ELSE 'disabled' END) \
                FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid \
                JOIN pg_namespace n ON n.oid = c.relnamespace \
               WHERE NOT t.tgisinternal AND n.nspname NOT IN NOT_APPLICATION ORDER BY 1, 2",
        chorus: "fires where the write is made; its own writes replicate as changes. It does not \
                 fire again when the change is applied on peers (as in PostgreSQL's logical \
                 replication), unless it is ENABLE ALWAYS or ENABLE REPLICA. A trigger with \
                 effects outside the database (NOTIFY, dblink, files) has them on the origin \
                 only.",
    },
    Check {
        hazard: "unlogged table",
        sql: "SELECT format('%I.%I', n.nspname, c.relname), '' \
                FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
               WHERE c.relkind IN ('r', 'p') AND c.relpersistence = 'u' \
                 AND n.nspname NOT IN NOT_APPLICATION ORDER BY 1",
        chorus: "its definition replicates, its rows do not: each backend's rows are its own \
                 (PostgreSQL empties it after a crash).",
    },
    Check {
        hazard: "large objects",
        sql: "SELECT 'pg_largeobject', count(*) || ' large objects' FROM pg_largeobject_metadata \
              HAVING count(*) > 0",
        chorus: "existing ones can be read; writing one through Chorus is refused (0A000) \
                 because nothing captures them. Store the data in a bytea column.",
    },
    Check {
        hazard: "exclusion constraint",
        sql: "SELECT format('%s', k.conrelid::regclass), k.conname::text \
                FROM pg_constraint k JOIN pg_namespace n ON n.oid = k.connamespace \
               WHERE k.contype = 'x' AND n.nspname NOT IN NOT_APPLICATION ORDER BY 1, 2",
        chorus: "checked on each backend on its own: rows written through two nodes at once \
                 that exclude each other make the apply on a peer fail, and that stream stops \
                 (logged at WARN, chorus_replication_lag_seconds grows) until one of the rows \
                 is removed. Write such rows through one node (node.routing = \"leader\").",
    },
    Check {
        hazard: "deferrable constraint",
        sql: "SELECT format('%s', k.conrelid::regclass), \
                     k.conname || CASE k.contype WHEN 'u' THEN ' (unique)' WHEN 'f' THEN ' (foreign key)' \
                                                 WHEN 'p' THEN ' (primary key)' ELSE '' END \
                FROM pg_constraint k JOIN pg_namespace n ON n.oid = k.connamespace \
               WHERE k.condeferrable AND n.nspname NOT IN NOT_APPLICATION ORDER BY 1, 2",
        chorus: "peers check it at the end of each applied batch, as the origin did at its \
                 commit; a collision with another node's row is then resolved row by row.",
    },
    Check {
        hazard: "volatile default",
        sql: "SELECT format('%s', d.adrelid::regclass), \
                     format('%I DEFAULT %s', a.attname, pg_get_expr(d.adbin, d.adrelid)) \
                FROM pg_attrdef d JOIN pg_attribute a ON a.attrelid = d.adrelid AND a.attnum = d.adnum \
                JOIN pg_class c ON c.oid = d.adrelid JOIN pg_namespace n ON n.oid = c.relnamespace \
               WHERE n.nspname NOT IN NOT_APPLICATION AND NOT a.attisdropped \
                 AND pg_get_expr(d.adbin, d.adrelid) !~ '^nextval\\(' \
                 AND EXISTS (SELECT 1 FROM regexp_matches(d.adbin::text, ':funcid (\\d+)', 'g') m \
                             JOIN pg_proc p ON p.oid = m[1]::oid WHERE p.provolatile = 'v') \
               ORDER BY 1, 2",
        chorus: "evaluated once, on the backend the insert is made on; the value travels with \
                 the row, so every backend has the same. ALTER TABLE ... ADD COLUMN with such \
                 a default fills existing rows on the origin and replicates them.",
    },
    Check {
        hazard: "foreign key",
        sql: "SELECT format('%s', k.conrelid::regclass), \
                     format('%s references %s', k.conname, k.confrelid::regclass) \
                FROM pg_constraint k JOIN pg_namespace n ON n.oid = k.connamespace \
               WHERE k.contype = 'f' AND n.nspname NOT IN NOT_APPLICATION ORDER BY 1, 2",
        chorus: "checked where the write is made, not again when applied (as in PostgreSQL's \
                 logical replication): a parent deleted through one node while a child is \
                 inserted through another leaves the child without its parent, on every \
                 backend alike.",
    },
    Check {
        hazard: "function that writes",
        sql: "SELECT format('%s', p.oid::regprocedure), \
                     CASE WHEN p.prosrc ~* '\\m(create|alter|drop)\\M\\s+(table|index|view|schema|sequence|type|function)' \
                          THEN 'runs DDL' ELSE 'writes rows' END \
                FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace \
                JOIN pg_language l ON l.oid = p.prolang \
               WHERE n.nspname NOT IN NOT_APPLICATION AND l.lanname IN ('sql', 'plpgsql') \
                 AND p.provolatile = 'v' AND p.prokind IN ('f', 'p') \
                 AND p.prosrc ~* '\\m(insert\\s+into|update\\s+\\S+\\s+set|delete\\s+from|merge\\s+into|create|alter|drop)\\M' \
               ORDER BY 1",
        chorus: "rows it writes are captured and replicate, also when it is called from a \
                 SELECT; such a write carries the session's last stamp (no older than \
                 replication.tombstone_min_age_ms), not a fresh one. DDL it runs with EXECUTE \
                 is refused (0A000), except on temporary objects: send DDL statements \
                 themselves.",
    },
    Check {
        hazard: "extension",
        sql: "SELECT e.extname::text, 'version ' || e.extversion FROM pg_extension e \
               WHERE e.extname <> 'plpgsql' ORDER BY 1",
        chorus: "CREATE, ALTER and DROP EXTENSION replicate as statements: every backend runs \
                 the extension's own script, so it must be installed on every backend's \
                 machine. Adopting an existing database needs it on every backend first.",
    },
    Check {
        hazard: "database",
        sql: "SELECT d.datname::text, \
                     CASE WHEN d.datname = current_database() THEN 'assessed' ELSE 'another database' END \
                     || coalesce(', settings: ' || (SELECT string_agg(array_to_string(s.setconfig, ', '), '; ') \
                                                      FROM pg_db_role_setting s WHERE s.setdatabase = d.oid), '') \
                FROM pg_database d WHERE NOT d.datistemplate ORDER BY d.datname <> current_database(), 1",
        chorus: "one database replicates, replication.database; a session to another is refused \
                 (0A000) unless it is listed in replication.local_databases, where each backend's \
                 copy is its own. Settings made with ALTER DATABASE or ALTER ROLE ... SET \
                 before adoption are this server's only: make them on every backend.",
    },
];

/// One object a check found.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Finding {
    pub object: String,
    pub detail: String,
}

/// A check and what it found.
#[derive(Debug, Clone, Serialize)]
pub struct Assessed {
    pub hazard: &'static str,
    pub chorus: &'static str,
    pub found: Vec<Finding>,
}

/// The assessment of one database.
#[derive(Debug, Clone, Serialize)]
pub struct Assessment {
    pub database: String,
    pub server_version: String,
    pub checks: Vec<Assessed>,
}

/// Run every check on the database `client` is connected to.
pub async fn assess(client: &Client) -> Result<Assessment, tokio_postgres::Error> {
    client
        .batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
        .await?;
    let head = client
        .query_one(
            "SELECT current_database()::text, current_setting('server_version')",
            &[],
        )
        .await?;
    let mut checks = Vec::new();
    for check in CHECKS {
        let sql = check.sql.replace("NOT_APPLICATION", NOT_APPLICATION);
        let found = client
            .query(&sql, &[])
            .await?
            .iter()
            .map(|r| Finding {
                object: r.get::<_, Option<String>>(0).unwrap_or_default(),
                detail: r.get::<_, Option<String>>(1).unwrap_or_default(),
            })
            .collect();
        checks.push(Assessed {
            hazard: check.hazard,
            chorus: check.chorus,
            found,
        });
    }
    client.batch_execute("COMMIT").await?;
    Ok(Assessment {
        database: head.get(0),
        server_version: head.get(1),
        checks,
    })
}

impl Assessment {
    /// The number of objects found by every check together.
    pub fn hazards(&self) -> usize {
        self.checks
            .iter()
            .filter(|c| c.hazard != "database")
            .map(|c| c.found.len())
            .sum()
    }

    /// A readable report: per check, what it found and what Chorus does.
    pub fn render(&self) -> String {
        let mut out = format!(
            "database {} (PostgreSQL {}): {} objects to look at\n",
            self.database,
            self.server_version,
            self.hazards()
        );
        for check in &self.checks {
            out.push_str(&format!("\n{} ({})\n", check.hazard, check.found.len()));
            if check.found.is_empty() {
                out.push_str("  none\n");
                continue;
            }
            let width = check
                .found
                .iter()
                .map(|f| f.object.chars().count())
                .max()
                .unwrap_or(0);
            for f in &check.found {
                if f.detail.is_empty() {
                    out.push_str(&format!("  {}\n", f.object));
                } else {
                    out.push_str(&format!("  {:width$}  {}\n", f.object, f.detail));
                }
            }
            out.push_str(&wrap(check.chorus, "  chorus: ", 78));
        }
        out
    }
}

/// `text` (its runs of white space taken as one space) wrapped at `width`,
/// the first line after `first`, the others indented as far.
fn wrap(text: &str, first: &str, width: usize) -> String {
    let indent = " ".repeat(first.chars().count());
    let mut out = String::new();
    let mut line = first.to_owned();
    let mut empty = true;
    for word in text.split_whitespace() {
        if !empty && line.chars().count() + 1 + word.chars().count() > width {
            out.push_str(line.trim_end());
            out.push('\n');
            line = indent.clone();
            empty = true;
        }
        if !empty {
            line.push(' ');
        }
        line.push_str(word);
        empty = false;
    }
    out.push_str(line.trim_end());
    out.push('\n');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wrapping_keeps_words_whole_and_indents_what_follows() {
        let text = "one two  three\n  four five";
        assert_eq!(wrap(text, "- ", 12), "- one two\n  three four\n  five\n");
        assert_eq!(wrap("", "x: ", 10), "x:\n");
    }
}
