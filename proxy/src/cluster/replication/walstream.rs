//! Reading Chorus's change messages from a backend: the `pgoutput` message
//! decoder, and a logical replication connection (the streaming
//! replication protocol) that keeps one decoder running on the server.
//!
//! Why streaming and not `pg_logical_slot_peek_changes`: every call of the
//! SQL functions starts decoding afresh from the slot's restart point,
//! which trails the confirmed position by up to a checkpoint's worth of
//! WAL, and advancing the slot decodes once more. Under steady writes that
//! re-reading, not the apply, bounded replication throughput. A walsender
//! decodes each record once and sends transactions as they commit.
//!
//! Why by hand: tokio-postgres has no replication-protocol support; the
//! few messages needed (START_REPLICATION, CopyBoth, XLogData, keepalive,
//! standby status update) are framed here on top of the login code the
//! proxy already has for its backend connections.
//!
//! `pgoutput` (built into PostgreSQL) is asked for logical messages only
//! (`messages 'true'`, publication `chorus` with no tables), so row changes
//! of every table are decoded but never formatted or sent; Chorus's own
//! transactional messages carry the changes.

use std::io::Write;
use std::os::unix::fs::FileExt;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::{BufMut, BytesMut};
use thiserror::Error;
use tokio::io::{AsyncWriteExt, BufReader};

use crate::backend::{self, BackendRead, BackendWrite, LoginParams};
use crate::cluster::capture;
use crate::cluster::capture::CaptureError;
use crate::config::{BackendConfig, ReplicationConfig};
use crate::wire::protocol::{self, read_message};

/// Why a step failed. The stream retries from its last position.
#[derive(Debug, Error)]
pub enum ReplicationError {
    #[error("{}", crate::backend::error_text(.0))]
    Sql(#[from] tokio_postgres::Error),
    #[error("installing the chorus schema: {0}")]
    Install(#[from] CaptureError),
    #[error("unexpected logical decoding output: {0:.120}")]
    Decoding(String),
    #[error("invalid LSN {0:?}")]
    Lsn(String),
    /// A node with a newer epoch drives these streams now.
    #[error("fenced: {0}")]
    Fenced(String),
    /// The backends the streams go to changed (a copy began or ended):
    /// the driver starts again with the new set.
    #[error("the streams' backends changed: {0}")]
    Restart(String),
}

/// The SQLSTATE chorus.apply_transactions refuses a stale driver with.
const FENCED: &str = "CH001";

impl ReplicationError {
    /// A refusal of a stale driver becomes `Fenced`.
    pub(crate) fn fenced_or(e: tokio_postgres::Error) -> ReplicationError {
        match e.as_db_error() {
            Some(db) if db.code().code() == FENCED => {
                ReplicationError::Fenced(db.message().to_owned())
            }
            _ => ReplicationError::Sql(e),
        }
    }
}

/// A (text) log sequence number as a comparable integer.
pub fn parse_lsn(text: &str) -> Result<u64, ReplicationError> {
    let (high, low) = text
        .split_once('/')
        .ok_or_else(|| ReplicationError::Lsn(text.to_owned()))?;
    let high = u64::from_str_radix(high, 16).map_err(|_| ReplicationError::Lsn(text.to_owned()))?;
    let low = u64::from_str_radix(low, 16).map_err(|_| ReplicationError::Lsn(text.to_owned()))?;
    Ok((high << 32) | low)
}

/// A log sequence number in PostgreSQL's text form.
pub fn format_lsn(lsn: u64) -> String {
    format!("{:X}/{:X}", lsn >> 32, lsn & 0xFFFF_FFFF)
}

/// An origin transaction: its commit position and its Chorus change payloads.
#[derive(Debug, Default, Clone)]
pub struct DecodedTransaction {
    /// End of the transaction's commit record (what `chorus.applied`
    /// stores, as text: see [`format_lsn`]).
    pub end_lsn: u64,
    /// Origin commit time, Unix seconds (when the decoder reported it).
    pub commit_time: Option<f64>,
    pub changes: Changes,
    /// The DDL index its changes were made at: a peer applies them only
    /// once it has applied that much of the DDL log.
    pub ddl: u64,
    /// It carries DDL: applied at once, without gathering more (its
    /// origin's session waits for the peers to have it).
    pub has_ddl: bool,
    /// The highest row version among its changes (0 without any).
    pub max_version: i64,
    /// The origin's horizon and what it has of every origin (see
    /// `chorus.emit_horizon`), when the transaction sent them.
    pub horizon: Option<(i64, i64)>,
}

/// Change records a transaction keeps in memory; the rest go to a file.
pub const SPILL_AFTER: usize = 10_000;

/// Bytes of change records a transaction keeps in memory (a few rows with
/// large values reach it long before [`SPILL_AFTER`] records).
pub const SPILL_AFTER_BYTES: usize = 32 << 20;

/// The change records of one transaction, in order: the first
/// [`SPILL_AFTER`] (and at most [`SPILL_AFTER_BYTES`]) in memory, the rest
/// in an anonymous temporary file (gone when the last copy is dropped), so
/// that a node's memory stays bounded whatever the size of the
/// transactions it streams.
#[derive(Debug, Default, Clone)]
pub struct Changes {
    memory: Vec<String>,
    /// The bytes of `memory`'s records.
    memory_bytes: usize,
    spilled: Option<Arc<Spilled>>,
}

/// Records written to a file: each as its length (u32, big-endian) and
/// its bytes.
#[derive(Debug)]
struct Spilled {
    file: std::fs::File,
    count: usize,
}

impl Changes {
    pub fn len(&self) -> usize {
        self.memory.len() + self.spilled.as_ref().map_or(0, |s| s.count)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The bytes of the records kept in memory.
    pub fn memory_bytes(&self) -> usize {
        self.memory_bytes
    }

    /// The records, when all of them are in memory.
    pub fn in_memory(&self) -> Option<&[String]> {
        self.spilled.is_none().then_some(self.memory.as_slice())
    }

    /// Read the records in order.
    pub fn reader(&self) -> ChangesReader<'_> {
        ChangesReader {
            changes: self,
            next: 0,
            offset: 0,
        }
    }
}

/// Reads a transaction's records in order (see [`Changes::reader`]).
pub struct ChangesReader<'a> {
    changes: &'a Changes,
    /// Records read so far.
    next: usize,
    /// Where the next spilled record starts in the file.
    offset: u64,
}

impl ChangesReader<'_> {
    /// Append the next record to `out`; false when there is none left.
    pub fn read_into(&mut self, out: &mut String) -> std::io::Result<bool> {
        if let Some(change) = self.changes.memory.get(self.next) {
            out.push_str(change);
            self.next += 1;
            return Ok(true);
        }
        let Some(spilled) = &self.changes.spilled else {
            return Ok(false);
        };
        if self.next >= self.changes.memory.len() + spilled.count {
            return Ok(false);
        }
        let mut len = [0u8; 4];
        spilled.file.read_exact_at(&mut len, self.offset)?;
        let mut bytes = vec![0u8; u32::from_be_bytes(len) as usize];
        spilled.file.read_exact_at(&mut bytes, self.offset + 4)?;
        let text = std::str::from_utf8(&bytes)
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))?;
        out.push_str(text);
        self.offset += 4 + bytes.len() as u64;
        self.next += 1;
        Ok(true)
    }
}

/// Microseconds between the Unix epoch and PostgreSQL's (2000-01-01).
const PG_EPOCH_OFFSET_US: i64 = 946_684_800_000_000;

/// The `pgoutput` options Chorus decodes with (also spelled out in the
/// replication tests' `step`).
pub const PGOUTPUT_OPTIONS: &str =
    "\"proto_version\" '1', \"publication_names\" 'chorus', \"messages\" 'true'";

/// Largest replication message accepted (a transaction's message can hold
/// a large row image).
const MAX_MESSAGE: usize = 1 << 30;

/// The walsender connection's read buffers.
const READ_BUFFER: usize = 64 * 1024;

/// A message larger than this leaves the read buffer with its allocation.
const LARGE_MESSAGE: usize = 1 << 20;

/// Assembles transactions from `pgoutput` messages.
#[derive(Debug, Default)]
pub struct PgOutputDecoder {
    open: Option<DecodedTransaction>,
    /// The open transaction's records past [`SPILL_AFTER`], and how many.
    spill: Option<(std::io::BufWriter<std::fs::File>, usize)>,
    rejected: Vec<Rejected>,
}

/// A change message skipped because it is not one of Chorus's records.
#[derive(Debug, Clone, PartialEq)]
pub struct Rejected {
    /// Where it is in the origin's WAL.
    pub lsn: u64,
    /// The label of `chorus_replication_rejected_total`.
    pub reason: capture::Rejection,
    pub prefix: String,
    pub bytes: usize,
    /// Its operation and table, when it names them (see
    /// [`capture::record_subject`]).
    pub subject: String,
}

fn be_u64(data: &[u8], at: usize) -> Result<u64, ReplicationError> {
    data.get(at..at + 8)
        .and_then(|b| b.try_into().ok())
        .map(u64::from_be_bytes)
        .ok_or_else(|| ReplicationError::Decoding("truncated pgoutput message".into()))
}

impl PgOutputDecoder {
    /// The messages skipped since the last call.
    pub fn take_rejected(&mut self) -> Vec<Rejected> {
        std::mem::take(&mut self.rejected)
    }

    /// Whether a transaction has begun and not yet committed.
    pub fn in_transaction(&self) -> bool {
        self.open.is_some()
    }

    /// Feed one `pgoutput` message; a transaction when this was its commit.
    /// Messages other than Begin, Message and Commit (relations, types,
    /// origins: none are expected with an empty publication) are ignored.
    pub fn feed(&mut self, data: &[u8]) -> Result<Option<DecodedTransaction>, ReplicationError> {
        let Some(&tag) = data.first() else {
            return Ok(None);
        };
        match tag {
            b'B' => {
                self.open = Some(DecodedTransaction::default());
                self.spill = None;
                Ok(None)
            }
            b'M' => {
                // flags(1) lsn(8) prefix\0 length(4) content
                let rest = data
                    .get(10..)
                    .ok_or_else(|| ReplicationError::Decoding("truncated message".into()))?;
                let (prefix, rest) = protocol::read_cstr(rest)
                    .map_err(|_| ReplicationError::Decoding("message prefix".into()))?;
                let transactional = data.get(1) == Some(&1);
                if prefix == capture::HORIZON_PREFIX {
                    let raw = rest.get(4..).unwrap_or_default();
                    match capture::parse_horizon(raw).filter(|_| transactional) {
                        Some(horizon) => {
                            let txn = self.open.as_mut().ok_or_else(|| {
                                ReplicationError::Decoding(
                                    "transactional message outside a transaction".into(),
                                )
                            })?;
                            txn.horizon = Some(horizon);
                        }
                        // (Skipped like any message that is not a record:
                        // pruning then waits for the next horizon.)
                        None => self.rejected.push(Rejected {
                            lsn: be_u64(data, 2)?,
                            reason: "not_a_record",
                            prefix: prefix.to_owned(),
                            bytes: raw.len(),
                            subject: String::new(),
                        }),
                    }
                    return Ok(None);
                }
                let Some(ddl) = capture::ddl_index(prefix) else {
                    return Ok(None);
                };
                let raw = rest
                    .get(4..)
                    .ok_or_else(|| ReplicationError::Decoding("message content".into()))?;
                let lsn = be_u64(data, 2)?;
                // Only capture writes these messages (see privileges.sql),
                // but one that is not its record would fail every apply
                // and hold up every change after it: skipped, logged and
                // counted by the stream (`take_rejected`).
                let checked = match std::str::from_utf8(raw) {
                    Err(_) => Err("not_utf8"),
                    Ok(_) if !transactional => Err("not_transactional"),
                    Ok(content) => capture::check_record(content).map(|v| (content, v)),
                };
                let (content, version) = match checked {
                    Ok(found) => found,
                    Err(reason) => {
                        let subject = std::str::from_utf8(raw)
                            .map(capture::record_subject)
                            .unwrap_or_default();
                        self.rejected.push(Rejected {
                            subject,
                            lsn,
                            reason,
                            prefix: prefix.to_owned(),
                            bytes: raw.len(),
                        });
                        return Ok(None);
                    }
                };
                let txn = self.open.as_mut().ok_or_else(|| {
                    ReplicationError::Decoding("transactional message outside a transaction".into())
                })?;
                txn.ddl = txn.ddl.max(ddl);
                // A DDL record (see chorus.capture_ddl): jsonb prints its
                // shortest keys first, "ddl" before "seq".
                txn.has_ddl |= content.starts_with("{\"ddl\":");
                if let Some(v) = version {
                    txn.max_version = txn.max_version.max(v);
                }
                // (Once a record went to the file, every later one does:
                // they are read back memory first.)
                if self.spill.is_none()
                    && txn.changes.memory.len() < SPILL_AFTER
                    && txn.changes.memory_bytes + content.len() <= SPILL_AFTER_BYTES
                {
                    txn.changes.memory_bytes += content.len();
                    txn.changes.memory.push(content.to_owned());
                } else {
                    let spill_error = |e: std::io::Error| {
                        ReplicationError::Decoding(format!(
                            "spilling a large transaction to a file: {e}"
                        ))
                    };
                    if self.spill.is_none() {
                        let file = tempfile::tempfile().map_err(spill_error)?;
                        self.spill = Some((std::io::BufWriter::with_capacity(1 << 20, file), 0));
                    }
                    if let Some((writer, count)) = self.spill.as_mut() {
                        let len = u32::try_from(content.len()).map_err(|_| {
                            ReplicationError::Decoding("change record over 4 GiB".into())
                        })?;
                        writer.write_all(&len.to_be_bytes()).map_err(spill_error)?;
                        writer.write_all(content.as_bytes()).map_err(spill_error)?;
                        *count += 1;
                    }
                }
                Ok(None)
            }
            b'C' => {
                // flags(1) commit_lsn(8) end_lsn(8) commit_time(8)
                let end = be_u64(data, 10)?;
                let time = be_u64(data, 18)? as i64;
                let mut txn = self
                    .open
                    .take()
                    .ok_or_else(|| ReplicationError::Decoding("commit without begin".into()))?;
                txn.end_lsn = end;
                txn.commit_time = Some((time + PG_EPOCH_OFFSET_US) as f64 / 1e6);
                if let Some((writer, count)) = self.spill.take() {
                    let file = writer.into_inner().map_err(|e| {
                        ReplicationError::Decoding(format!(
                            "spilling a large transaction to a file: {}",
                            e.error()
                        ))
                    })?;
                    txn.changes.spilled = Some(Arc::new(Spilled { file, count }));
                }
                Ok(Some(txn))
            }
            _ => Ok(None),
        }
    }
}

/// What the walsender sent.
#[derive(Debug)]
pub enum WalEvent {
    /// One `pgoutput` message.
    Data(BytesMut),
    /// The server has sent everything up to `wal_end`.
    Keepalive { wal_end: u64, reply_requested: bool },
}

/// A logical replication connection streaming one slot.
pub struct WalStream {
    reader: BufReader<BackendRead>,
    writer: BackendWrite,
    buf: BytesMut,
}

/// The receiving half of a [`WalStream`].
pub struct WalReader {
    reader: BufReader<BackendRead>,
    buf: BytesMut,
}

/// The sending half of a [`WalStream`]: position reports.
pub struct WalWriter {
    writer: BackendWrite,
}

/// Log in to `config.database` on `backend` as the replication user with
/// `replication=database` (a walsender that speaks SQL and the replication
/// commands).
pub(crate) async fn replication_login(
    backend: &BackendConfig,
    config: &ReplicationConfig,
    timeout: Duration,
) -> Result<backend::BackendConnection, backend::BackendError> {
    let address = backend.address();
    let params = [
        ("replication".to_owned(), "database".to_owned()),
        (
            "application_name".to_owned(),
            "chorus replication".to_owned(),
        ),
    ];
    backend::connect(
        &LoginParams {
            address: &address,
            tls: backend.tls.as_ref(),
            user: &config.user,
            password: config.password.as_deref(),
            database: &config.database,
            params: &params,
        },
        timeout,
    )
    .await
}

impl WalStream {
    /// Log in with `replication=database` and start streaming `slot` from
    /// its confirmed position.
    pub async fn start(
        backend: &BackendConfig,
        config: &ReplicationConfig,
        slot: &str,
        timeout: Duration,
    ) -> Result<WalStream, ReplicationError> {
        let connection = replication_login(backend, config, timeout)
            .await
            .map_err(|e| ReplicationError::Decoding(format!("walsender login: {e}")))?;
        let (read, writer) = connection.stream.into_split();
        let mut stream = WalStream {
            reader: BufReader::with_capacity(READ_BUFFER, read),
            writer,
            buf: BytesMut::with_capacity(READ_BUFFER),
        };
        let sql = format!(
            "START_REPLICATION SLOT \"{}\" LOGICAL 0/0 ({PGOUTPUT_OPTIONS})",
            slot.replace('"', "\"\"")
        );
        let mut out = BytesMut::new();
        protocol::query(&mut out, &sql);
        stream.write(&out).await?;
        loop {
            let tag = read_message(&mut stream.reader, &mut stream.buf, MAX_MESSAGE)
                .await
                .map_err(|e| ReplicationError::Decoding(e.to_string()))?;
            match tag {
                b'W' => return Ok(stream),
                b'E' => {
                    let fields = protocol::parse_error_fields(&stream.buf);
                    return Err(ReplicationError::Decoding(format!(
                        "START_REPLICATION: {}",
                        fields.message
                    )));
                }
                // Notices, parameter status: nothing to do.
                _ => {}
            }
        }
    }

    async fn write(&mut self, bytes: &[u8]) -> Result<(), ReplicationError> {
        self.writer
            .write_all(bytes)
            .await
            .map_err(|e| ReplicationError::Decoding(format!("walsender write: {e}")))
    }

    /// Split into a reader and a writer that can be used from two tasks.
    pub fn split(self) -> (WalReader, WalWriter) {
        (
            WalReader {
                reader: self.reader,
                buf: self.buf,
            },
            WalWriter {
                writer: self.writer,
            },
        )
    }
}

impl WalReader {
    /// The next message from the walsender.
    pub async fn next(&mut self) -> Result<WalEvent, ReplicationError> {
        loop {
            let tag = read_message(&mut self.reader, &mut self.buf, MAX_MESSAGE)
                .await
                .map_err(|e| ReplicationError::Decoding(format!("walsender: {e}")))?;
            match tag {
                b'd' => match self.buf.first() {
                    // XLogData: walStart(8) walEnd(8) sendTime(8) data
                    Some(b'w') if self.buf.len() >= 25 => {
                        let data = self.buf.split_off(25);
                        // The message shares its allocation with the read
                        // buffer, which would keep it (however large) for
                        // the stream's life: a large one takes it along.
                        if data.len() > LARGE_MESSAGE {
                            self.buf = BytesMut::with_capacity(READ_BUFFER);
                        }
                        return Ok(WalEvent::Data(data));
                    }
                    // Keepalive: walEnd(8) sendTime(8) replyRequested(1)
                    Some(b'k') if self.buf.len() >= 18 => {
                        return Ok(WalEvent::Keepalive {
                            wal_end: be_u64(&self.buf, 1)?,
                            reply_requested: self.buf[17] == 1,
                        });
                    }
                    _ => {
                        return Err(ReplicationError::Decoding(
                            "unexpected replication message".into(),
                        ))
                    }
                },
                b'E' => {
                    let fields = protocol::parse_error_fields(&self.buf);
                    return Err(ReplicationError::Decoding(format!(
                        "walsender: {}",
                        fields.message
                    )));
                }
                b'c' => {
                    return Err(ReplicationError::Decoding(
                        "walsender ended the stream".into(),
                    ))
                }
                _ => {}
            }
        }
    }
}

impl WalWriter {
    /// Report everything up to `lsn` as applied (the slot may move past
    /// it); with `reply`, ask for a keepalive saying how far the server
    /// has sent.
    pub async fn confirm(&mut self, lsn: u64, reply: bool) -> Result<(), ReplicationError> {
        let now_us = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_micros() as i64)
            - PG_EPOCH_OFFSET_US;
        // Standby status update inside a CopyData message.
        let mut out = BytesMut::with_capacity(40);
        protocol::write_message(&mut out, b'd', |body| {
            body.put_u8(b'r');
            body.put_u64(lsn); // written
            body.put_u64(lsn); // flushed
            body.put_u64(lsn); // applied
            body.put_i64(now_us);
            body.put_u8(u8::from(reply));
        });
        self.writer
            .write_all(&out)
            .await
            .map_err(|e| ReplicationError::Decoding(format!("walsender write: {e}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(prefix: &str, content: &str) -> Vec<u8> {
        let mut m = vec![b'M', 1];
        m.extend_from_slice(&7u64.to_be_bytes());
        m.extend_from_slice(prefix.as_bytes());
        m.push(0);
        m.extend_from_slice(&(content.len() as u32).to_be_bytes());
        m.extend_from_slice(content.as_bytes());
        m
    }

    const ROW: &str = r#"{"key": {"id": 1}, "op": "INSERT", "row": {"id": 1}, "prev": null, "table": "public.t", "origin": 1, "version": 9}"#;
    const DDL: &str = r#"{"ddl": "CREATE TABLE t ()", "seq": 5, "role": "app", "origin": 1, "search_path": "public"}"#;

    fn begin() -> Vec<u8> {
        let mut begin = vec![b'B'];
        begin.extend_from_slice(&[0; 20]);
        begin
    }

    fn commit() -> Vec<u8> {
        let mut commit = vec![b'C', 0];
        commit.extend_from_slice(&0x10u64.to_be_bytes());
        commit.extend_from_slice(&0x1_0000_0020u64.to_be_bytes());
        commit.extend_from_slice(&1_000_000i64.to_be_bytes());
        commit
    }

    #[test]
    fn begin_messages_commit_make_a_transaction() {
        let mut d = PgOutputDecoder::default();
        assert!(d.feed(&begin()).unwrap().is_none());
        assert!(d.feed(&message("chorus", ROW)).unwrap().is_none());
        assert!(d.feed(&message("other", "x")).unwrap().is_none());
        let txn = d.feed(&commit()).unwrap().unwrap();
        assert_eq!(txn.changes.in_memory(), Some(&[ROW.to_owned()][..]));
        assert_eq!(txn.max_version, 9);
        assert!(!txn.has_ddl);
        // One with a DDL record is marked (what PostgreSQL's jsonb prints
        // for chorus.handle_ddl's object starts with its "ddl" key).
        d.feed(&begin()).unwrap();
        d.feed(&message("chorus:4", DDL)).unwrap();
        let ddl = d.feed(&commit()).unwrap().unwrap();
        assert!(ddl.has_ddl);
        assert_eq!(ddl.ddl, 4);
        assert_eq!(ddl.max_version, 0);
        assert_eq!(txn.end_lsn, 0x1_0000_0020);
        assert_eq!(format_lsn(txn.end_lsn), "1/20");
        assert_eq!(txn.commit_time, Some(946_684_801.0));
        // A TRUNCATE record carries the version rows older than it lose.
        d.feed(&begin()).unwrap();
        d.feed(&message(
            "chorus:4",
            r#"{"origin": 2, "version": 77, "truncate": "public.t"}"#,
        ))
        .unwrap();
        assert_eq!(d.feed(&commit()).unwrap().unwrap().max_version, 77);
        // A horizon travels with its transaction, as no change.
        d.feed(&begin()).unwrap();
        d.feed(&message("chorus-horizon", "1200 1100")).unwrap();
        let horizon = d.feed(&commit()).unwrap().unwrap();
        assert_eq!(horizon.horizon, Some((1200, 1100)));
        assert!(horizon.changes.is_empty());
        assert!(d.take_rejected().is_empty());
        // A commit without a begin, or a truncated one, is an error.
        assert!(d.feed(&commit()).is_err());
        assert!(d.feed(&[b'C', 0, 1]).is_err());
    }

    #[test]
    fn a_large_transaction_spills_past_the_limit_and_reads_back_in_order() {
        let mut d = PgOutputDecoder::default();
        d.feed(&begin()).unwrap();
        let rows: Vec<String> = (0..SPILL_AFTER + 5)
            .map(|i| ROW.replace("\"id\": 1}", &format!("\"id\": {i}}}")))
            .collect();
        for row in &rows {
            d.feed(&message("chorus", row)).unwrap();
        }
        let txn = d.feed(&commit()).unwrap().unwrap();
        assert_eq!(txn.changes.len(), SPILL_AFTER + 5);
        assert!(txn.changes.in_memory().is_none(), "spilled");
        // Read back in order, twice (each apply attempt reads it again),
        // also from a copy.
        for changes in [&txn.changes, &txn.clone().changes] {
            assert_reads_back(changes, &rows);
        }
        // The next transaction starts in memory again.
        d.feed(&begin()).unwrap();
        d.feed(&message("chorus", ROW)).unwrap();
        let small = d.feed(&commit()).unwrap().unwrap();
        assert_eq!(small.changes.in_memory(), Some(&[ROW.to_owned()][..]));
    }

    #[test]
    fn a_few_large_records_spill_past_the_byte_limit_in_order() {
        let mut d = PgOutputDecoder::default();
        d.feed(&begin()).unwrap();
        // Records of a quarter of the limit: the fifth goes to the file,
        // and so does the small one after it, to keep the order.
        let large = ROW.replace(
            "\"id\": 1}",
            &format!(
                "\"id\": 1, \"v\": \"{}\"}}",
                "x".repeat(SPILL_AFTER_BYTES / 4 - ROW.len())
            ),
        );
        let rows: Vec<String> = (0..5)
            .map(|_| large.clone())
            .chain([ROW.to_owned()])
            .collect();
        for row in &rows {
            d.feed(&message("chorus", row)).unwrap();
        }
        let txn = d.feed(&commit()).unwrap().unwrap();
        assert_eq!(txn.changes.len(), 6);
        assert!(txn.changes.in_memory().is_none(), "spilled");
        assert!(txn.changes.memory_bytes() <= SPILL_AFTER_BYTES);
        assert_reads_back(&txn.changes, &rows);
    }

    /// `changes` read back give `rows`, in order, and nothing more.
    fn assert_reads_back(changes: &Changes, rows: &[String]) {
        let mut reader = changes.reader();
        let mut out = String::new();
        for row in rows {
            out.clear();
            assert!(reader.read_into(&mut out).unwrap());
            assert_eq!(&out, row);
        }
        assert!(!reader.read_into(&mut out).unwrap());
    }

    #[test]
    fn messages_that_are_not_chorus_records_are_skipped_and_reported() {
        let mut d = PgOutputDecoder::default();
        d.feed(&begin()).unwrap();
        let mut not_utf8 = message("chorus:1", "x");
        let last = not_utf8.len() - 1;
        not_utf8[last] = 0xff;
        let mut not_transactional = message("chorus", ROW);
        not_transactional[1] = 0;
        for forged in [
            not_utf8,
            not_transactional,
            message("chorus:0", "{}"),
            message("chorus", "not json"),
            message(
                "chorus",
                r#"{"op": "INSERT", "table": "public.t", "origin": 1, "version": 2}"#,
            ),
            message(
                "chorus",
                r#"{"op": "DELETE", "table": "public.t", "origin": 1, "version": 2}"#,
            ),
            message("chorus-horizon", "12"),
            message("chorus-horizon", "x 1"),
        ] {
            assert!(d.feed(&forged).unwrap().is_none());
        }
        d.feed(&message("chorus:1", ROW)).unwrap();
        let kept = d.feed(&commit()).unwrap().unwrap();
        assert_eq!(kept.changes.in_memory(), Some(&[ROW.to_owned()][..]));
        assert_eq!(kept.horizon, None);
        let reasons: Vec<&str> = d.take_rejected().iter().map(|r| r.reason).collect();
        assert_eq!(
            reasons,
            [
                "not_utf8",
                "not_transactional",
                "not_a_record",
                "not_json",
                "not_a_record",
                "not_a_record",
                "not_a_record",
                "not_a_record"
            ]
        );
        assert!(d.take_rejected().is_empty());
    }
}
