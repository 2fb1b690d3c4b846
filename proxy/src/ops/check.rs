//! `chorus check`: do the backends hold the same rows?
//!
//! Every replicated table is read on every backend in one query (one
//! snapshot, no lock a writer waits for), its rows put in buckets by a hash
//! of their key, and each bucket summed: its row count and the sum of a
//! hash of each row's text. Buckets that differ are read again key by key,
//! and the keys that differ are read again for a while (`settle`): a row
//! still on its way is not a difference. What is left is reported per key
//! with each backend's version (LiveCompare and pg_comparator compare the
//! same way, in chunks by hash).
//!
//! `--repair` then reconciles those tables (reconcile.rs: the newest
//! version wins, as in the apply) and checks their keys again. Rows that
//! differ under the same version (written on one backend around Chorus)
//! cannot be told apart by last-writer-wins and stay reported.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio_postgres::Client;

use crate::cluster::replication::ReplicationError;

/// How to check.
#[derive(Debug, Clone)]
pub struct CheckOptions {
    /// Only these tables (qualified as in `chorus.replicated_table`,
    /// `schema.table`); empty: every replicated table.
    pub tables: Vec<String>,
    /// Rows per bucket, about.
    pub bucket_rows: i64,
    /// How long differing keys are read again before they count.
    pub settle: Duration,
}

impl Default for CheckOptions {
    fn default() -> Self {
        CheckOptions {
            tables: Vec::new(),
            bucket_rows: 10_000,
            settle: Duration::from_secs(5),
        }
    }
}

/// One backend's side of a differing key.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Side {
    pub backend: String,
    /// The row's version, origin and whether it is a tombstone, from
    /// `chorus.row_version` (`None`: no version).
    pub version: Option<(i64, i32, bool)>,
    /// Whether the row is there.
    pub present: bool,
}

/// A key whose rows differ between backends.
#[derive(Debug, Clone, Serialize)]
pub struct Difference {
    pub table: String,
    /// The key as JSON (`chorus.row_version`'s form); for a table without
    /// a primary key, the row's text (the row is on some backends only, or
    /// more often).
    pub key: String,
    pub sides: Vec<Side>,
}

/// What a check found.
#[derive(Debug, Clone, Default, Serialize)]
pub struct CheckReport {
    pub tables: usize,
    /// Rows read on the first backend.
    pub rows: u64,
    pub buckets: u64,
    pub differing_buckets: u64,
    pub seconds: f64,
    pub differences: Vec<Difference>,
    /// Rows `--repair` wrote (0 without it).
    pub repaired_rows: usize,
}

impl CheckReport {
    /// Rows read per second on the first backend.
    pub fn rows_per_second(&self) -> f64 {
        if self.seconds > 0.0 {
            self.rows as f64 / self.seconds
        } else {
            0.0
        }
    }

    /// Prometheus text exposition of the result (for node_exporter's
    /// textfile collector, say).
    pub fn metrics(&self) -> String {
        let mut per_table: BTreeMap<&str, usize> = BTreeMap::new();
        for d in &self.differences {
            *per_table.entry(d.table.as_str()).or_default() += 1;
        }
        let mut out = String::from(
            "# HELP chorus_check_differences Keys whose rows differ between backends, by table.\n\
             # TYPE chorus_check_differences gauge\n",
        );
        for (table, n) in &per_table {
            out.push_str(&format!(
                "chorus_check_differences{{table=\"{}\"}} {n}\n",
                table.replace('\\', "\\\\").replace('"', "\\\"")
            ));
        }
        out.push_str(&format!(
            "# HELP chorus_check_differences_total Keys that differ, all tables.\n\
             # TYPE chorus_check_differences_total gauge\n\
             chorus_check_differences_total {}\n\
             # HELP chorus_check_rows Rows read on the first backend.\n\
             # TYPE chorus_check_rows gauge\n\
             chorus_check_rows {}\n\
             # HELP chorus_check_duration_seconds How long the check took.\n\
             # TYPE chorus_check_duration_seconds gauge\n\
             chorus_check_duration_seconds {}\n",
            self.differences.len(),
            self.rows,
            self.seconds
        ));
        out
    }
}

/// A replicated table as the check reads it.
struct Table {
    name: String,
    /// Key columns, empty for a table without a primary key.
    key: Vec<String>,
}

impl Table {
    /// SQL for the key of row `t`, as text: the `chorus.row_version` form
    /// (a jsonb object), or the row's text without a key.
    fn key_sql(&self) -> String {
        if self.key.is_empty() {
            return "t::text".to_owned();
        }
        let pairs: Vec<String> = self
            .key
            .iter()
            .map(|c| format!("{}, t.{}", literal(c), ident(c)))
            .collect();
        format!("jsonb_build_object({})::text", pairs.join(", "))
    }

    /// SQL for the bucket of row `t`, of `buckets`.
    fn bucket_sql(&self, buckets: i64) -> String {
        format!(
            "((hashtextextended({}, 0) % {buckets}) + {buckets}) % {buckets}",
            self.key_sql()
        )
    }
}

fn ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

fn literal(text: &str) -> String {
    format!("'{}'", text.replace('\'', "''"))
}

/// Per bucket: row count and the sum of the rows' hashes (as text).
type Sums = BTreeMap<i64, (i64, String)>;

async fn bucket_sums(
    client: &Client,
    table: &Table,
    buckets: i64,
) -> Result<Sums, tokio_postgres::Error> {
    let sql = format!(
        "SELECT {} AS b, count(*), sum(hashtextextended(t::text, 1))::text FROM {} t GROUP BY 1",
        table.bucket_sql(buckets),
        table.name
    );
    Ok(client
        .query(&sql, &[])
        .await?
        .iter()
        .map(|r| (r.get(0), (r.get(1), r.get(2))))
        .collect())
}

/// Per key in `buckets`: how many rows have it and a hash of each, as text.
async fn bucket_rows(
    client: &Client,
    table: &Table,
    buckets: i64,
    which: &[i64],
) -> Result<BTreeMap<String, String>, tokio_postgres::Error> {
    let sql = format!(
        "SELECT k, count(*)::text || ':' || string_agg(h::text, ',' ORDER BY h) FROM \
           (SELECT {} AS k, hashtextextended(t::text, 1) AS h FROM {} t WHERE {} = ANY($1)) r GROUP BY k",
        table.key_sql(),
        table.name,
        table.bucket_sql(buckets)
    );
    Ok(client
        .query(&sql, &[&which])
        .await?
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect())
}

/// The same for the given keys only: found through the table's primary
/// key (the keys as a typed record each), or, without one, by a scan.
async fn key_rows(
    client: &Client,
    table: &Table,
    keys: &[String],
) -> Result<BTreeMap<String, String>, tokio_postgres::Error> {
    let sql = if table.key.is_empty() {
        format!(
            "SELECT k, count(*)::text || ':' || string_agg(h::text, ',' ORDER BY h) FROM \
               (SELECT t::text AS k, hashtextextended(t::text, 1) AS h FROM {} t \
                 WHERE t::text = ANY($1)) r GROUP BY k",
            table.name
        )
    } else {
        let on: Vec<String> = table
            .key
            .iter()
            .map(|c| format!("t.{0} = k.{0}", ident(c)))
            .collect();
        format!(
            "SELECT k, count(*)::text || ':' || string_agg(h::text, ',' ORDER BY h) FROM \
               (SELECT {key} AS k, hashtextextended(t::text, 1) AS h \
                  FROM jsonb_populate_recordset(NULL::{name}, ('[' || array_to_string($1::text[], ',') || ']')::jsonb) k \
                  JOIN {name} t ON {on}) r GROUP BY k",
            key = table.key_sql(),
            name = table.name,
            on = on.join(" AND ")
        )
    };
    Ok(client
        .query(&sql, &[&keys])
        .await?
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect())
}

/// Keys on which the backends' rows differ.
fn differing(per_backend: &[BTreeMap<String, String>]) -> Vec<String> {
    let all: BTreeSet<&String> = per_backend.iter().flat_map(|m| m.keys()).collect();
    all.into_iter()
        .filter(|k| {
            let first = per_backend[0].get(*k);
            per_backend.iter().any(|m| m.get(*k) != first)
        })
        .cloned()
        .collect()
}

/// Read the keys again until they agree or `settle` is over; the keys that
/// still differ.
async fn settle(
    backends: &[(String, Client)],
    table: &Table,
    mut keys: Vec<String>,
    settle: Duration,
) -> Result<Vec<String>, tokio_postgres::Error> {
    let deadline = Instant::now() + settle;
    while !keys.is_empty() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(250)).await;
        let mut per_backend = Vec::new();
        for (_, client) in backends {
            per_backend.push(key_rows(client, table, &keys).await?);
        }
        let still: BTreeSet<String> = differing(&per_backend).into_iter().collect();
        keys.retain(|k| still.contains(k));
    }
    Ok(keys)
}

/// Each backend's side of `keys`.
async fn sides(
    backends: &[(String, Client)],
    table: &Table,
    keys: &[String],
) -> Result<Vec<Difference>, tokio_postgres::Error> {
    let mut per_backend = Vec::new();
    for (name, client) in backends {
        let present = key_rows(client, table, keys).await?;
        let versions: BTreeMap<String, (i64, i32, bool)> = if table.key.is_empty() {
            BTreeMap::new()
        } else {
            client
                .query(
                    "SELECT pk::text, version, origin, deleted FROM chorus.row_version \
                      WHERE tbl = $1 AND pk = ANY($2::text[]::jsonb[])",
                    &[&table.name, &keys],
                )
                .await?
                .iter()
                .map(|r| (r.get(0), (r.get(1), r.get(2), r.get(3))))
                .collect()
        };
        per_backend.push((name.clone(), present, versions));
    }
    Ok(keys
        .iter()
        .map(|key| Difference {
            table: table.name.clone(),
            key: key.clone(),
            sides: per_backend
                .iter()
                .map(|(backend, present, versions)| Side {
                    backend: backend.clone(),
                    version: versions.get(key).copied(),
                    present: present.contains_key(key),
                })
                .collect(),
        })
        .collect())
}

/// The differing keys of one table (after settling).
async fn check_table(
    backends: &[(String, Client)],
    table: &Table,
    options: &CheckOptions,
    report: &mut CheckReport,
) -> Result<Vec<String>, tokio_postgres::Error> {
    let first = &backends[0].1;
    // The planner's row estimate, or a count where it has none yet (a
    // table never analyzed).
    let mut estimate: f64 = first
        .query_one(
            "SELECT c.reltuples::float8 FROM pg_class c WHERE c.oid = $1::text::regclass",
            &[&table.name],
        )
        .await?
        .get(0);
    if estimate <= 0.0 {
        let sql = format!("SELECT count(*)::float8 FROM {}", table.name);
        estimate = first.query_one(&sql, &[]).await?.get(0);
    }
    let buckets = ((estimate / options.bucket_rows.max(1) as f64).ceil() as i64).max(1);
    // Every backend at once (each reads its own table).
    let sums: Vec<Sums> = futures_util::future::try_join_all(
        backends
            .iter()
            .map(|(_, client)| bucket_sums(client, table, buckets)),
    )
    .await?;
    report.rows += sums[0].values().map(|(n, _)| *n as u64).sum::<u64>();
    report.buckets += buckets as u64;
    let all: BTreeSet<i64> = sums.iter().flat_map(|s| s.keys().copied()).collect();
    let which: Vec<i64> = all
        .into_iter()
        .filter(|b| sums.iter().any(|s| s.get(b) != sums[0].get(b)))
        .collect();
    if which.is_empty() {
        return Ok(Vec::new());
    }
    report.differing_buckets += which.len() as u64;
    let mut per_backend = Vec::new();
    for (_, client) in backends {
        per_backend.push(bucket_rows(client, table, buckets, &which).await?);
    }
    settle(backends, table, differing(&per_backend), options.settle).await
}

/// Compare every replicated table (or `options.tables`) across `backends`
/// (name, connection; two at least); with `repair`, reconcile the tables
/// that differ and compare them again.
pub async fn check(
    backends: &[(String, Client)],
    options: &CheckOptions,
    repair: bool,
) -> Result<CheckReport, ReplicationError> {
    let started = Instant::now();
    let mut report = CheckReport::default();
    let Some((_, first)) = backends.first() else {
        return Ok(report);
    };
    let tables: Vec<Table> = first
        .query(
            "SELECT tbl, pk_columns FROM chorus.replicated_table \
              WHERE cardinality($1::text[]) = 0 OR tbl = ANY($1) ORDER BY tbl",
            &[&options.tables],
        )
        .await?
        .iter()
        .map(|r| Table {
            name: r.get(0),
            key: r.get(1),
        })
        .collect();
    let mut found: Vec<(&Table, Vec<String>)> = Vec::new();
    for table in &tables {
        report.tables += 1;
        let keys = check_table(backends, table, options, &mut report).await?;
        if !keys.is_empty() {
            found.push((table, keys));
        }
    }
    if repair && !found.is_empty() {
        let names: Vec<String> = found.iter().map(|(t, _)| t.name.clone()).collect();
        report.repaired_rows = crate::cluster::reconcile::reconcile_tables(backends, Some(&names))
            .await?
            .rows;
        let mut still = Vec::new();
        for (table, keys) in found {
            let mut per_backend = Vec::new();
            for (_, client) in backends {
                per_backend.push(key_rows(client, table, &keys).await?);
            }
            let left = settle(backends, table, differing(&per_backend), options.settle).await?;
            if !left.is_empty() {
                still.push((table, left));
            }
        }
        found = still;
    }
    for (table, keys) in found {
        report
            .differences
            .extend(sides(backends, table, &keys).await?);
    }
    report.seconds = started.elapsed().as_secs_f64();
    Ok(report)
}

impl CheckReport {
    /// A readable report.
    pub fn render(&self) -> String {
        let mut out = format!(
            "{} tables, {} rows ({} buckets, {} differing) in {:.1} s ({:.0} rows/s)\n",
            self.tables,
            self.rows,
            self.buckets,
            self.differing_buckets,
            self.seconds,
            self.rows_per_second()
        );
        if self.repaired_rows > 0 {
            out.push_str(&format!("repair wrote {} rows\n", self.repaired_rows));
        }
        if self.differences.is_empty() {
            out.push_str("the backends hold the same rows\n");
            return out;
        }
        out.push_str(&format!("{} keys differ:\n", self.differences.len()));
        for d in &self.differences {
            out.push_str(&format!("{} {}\n", d.table, d.key));
            for side in &d.sides {
                let version = match side.version {
                    Some((v, o, true)) => format!("deleted at version {v} (origin {o})"),
                    Some((v, o, false)) => format!("version {v} (origin {o})"),
                    None => "no version".to_owned(),
                };
                out.push_str(&format!(
                    "  {}: {}, {}\n",
                    side.backend,
                    if side.present {
                        "row present"
                    } else {
                        "no row"
                    },
                    version
                ));
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn keys_differ_when_missing_somewhere_or_hashed_differently() {
        let a = map(&[("1", "1:7"), ("2", "1:8"), ("3", "1:9")]);
        let b = map(&[("1", "1:7"), ("2", "1:5")]);
        let c = map(&[("1", "1:7"), ("2", "1:8"), ("3", "1:9"), ("4", "1:1")]);
        assert_eq!(differing(&[a, b, c]), ["2", "3", "4"]);
    }

    #[test]
    fn key_and_bucket_sql_quote_their_names() {
        let t = Table {
            name: "public.t".into(),
            key: vec!["id".into(), "it's \"x\"".into()],
        };
        assert_eq!(
            t.key_sql(),
            "jsonb_build_object('id', t.\"id\", 'it''s \"x\"', t.\"it's \"\"x\"\"\")::text"
        );
        let keyless = Table {
            name: "public.k".into(),
            key: Vec::new(),
        };
        assert_eq!(
            keyless.bucket_sql(4),
            "((hashtextextended(t::text, 0) % 4) + 4) % 4"
        );
    }

    #[test]
    fn metrics_count_differences_per_table() {
        let report = CheckReport {
            rows: 10,
            seconds: 0.5,
            differences: vec![
                Difference {
                    table: "public.a".into(),
                    key: "{}".into(),
                    sides: Vec::new(),
                },
                Difference {
                    table: "public.a".into(),
                    key: "{}".into(),
                    sides: Vec::new(),
                },
            ],
            ..CheckReport::default()
        };
        let text = report.metrics();
        assert!(
            text.contains("chorus_check_differences{table=\"public.a\"} 2\n"),
            "{text}"
        );
        assert!(
            text.contains("chorus_check_differences_total 2\n"),
            "{text}"
        );
        assert!(text.contains("chorus_check_rows 10\n"), "{text}");
    }
}
