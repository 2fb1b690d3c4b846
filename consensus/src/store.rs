//! Durable Raft storage: the log (with the vote and the committed position)
//! in one append-only file of checksummed records, and the state machine's
//! snapshot in a file replaced atomically.
//!
//! Written here rather than taken from an embedded database because what
//! Raft needs is small and specific: the log of a Chorus cluster is its DDL
//! and membership changes (a few entries per schema change), every write
//! must be durable before it is acknowledged, and a torn final record after
//! a crash must be recognised and dropped. A record is
//! `[length u32 LE][crc32 u32 LE][JSON]`; loading stops at the first record
//! that is incomplete or fails its checksum and cuts the file there.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{Cursor, Write};
use std::ops::RangeBounds;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};

use openraft::storage::{LogFlushed, LogState, RaftLogStorage, RaftStateMachine, Snapshot};
use openraft::{
    Entry, EntryPayload, LogId, RaftLogReader, RaftSnapshotBuilder, SnapshotMeta, StorageError,
    StorageIOError, StoredMembership, Vote,
};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::types::{ClusterState, Response, Routing, TypeConfig};

type Nid = u64;
type StoreResult<T> = Result<T, StorageError<Nid>>;

fn io_error(e: &(impl std::error::Error + 'static)) -> StorageError<Nid> {
    StorageIOError::write(e).into()
}

/// One record of the log file.
#[derive(Serialize, Deserialize)]
enum Record {
    Entry(Entry<TypeConfig>),
    /// Entries from this index on are gone.
    Truncate(u64),
    /// Entries up to this log id (inclusive) are gone.
    Purge(LogId<Nid>),
    Vote(Vote<Nid>),
    Committed(Option<LogId<Nid>>),
}

fn encode(record: &Record, out: &mut Vec<u8>) -> Result<(), serde_json::Error> {
    let body = serde_json::to_vec(record)?;
    out.extend_from_slice(&(body.len() as u32).to_le_bytes());
    out.extend_from_slice(&crc32fast::hash(&body).to_le_bytes());
    out.extend_from_slice(&body);
    Ok(())
}

/// Decode records from the start of `data`; returns them and the length of
/// the valid prefix.
fn decode_all(data: &[u8]) -> (Vec<Record>, usize) {
    let mut records = Vec::new();
    let mut at = 0;
    while data.len() - at >= 8 {
        let len = u32::from_le_bytes([data[at], data[at + 1], data[at + 2], data[at + 3]]) as usize;
        let crc = u32::from_le_bytes([data[at + 4], data[at + 5], data[at + 6], data[at + 7]]);
        let Some(body) = data.get(at + 8..at + 8 + len) else {
            break;
        };
        if crc32fast::hash(body) != crc {
            break;
        }
        let Ok(record) = serde_json::from_slice(body) else {
            break;
        };
        records.push(record);
        at += 8 + len;
    }
    (records, at)
}

/// Write `bytes` to `path` so that a crash leaves either the old or the new
/// file: a temporary file, fsynced, renamed over, then the directory fsynced.
fn replace_file(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    let mut file = File::create(&tmp)?;
    file.write_all(bytes)?;
    file.sync_all()?;
    std::fs::rename(&tmp, path)?;
    sync_dir(path)
}

fn sync_dir(path: &Path) -> std::io::Result<()> {
    if let Some(dir) = path.parent() {
        File::open(dir)?.sync_all()?;
    }
    Ok(())
}

struct LogInner {
    path: PathBuf,
    file: File,
    entries: BTreeMap<u64, Entry<TypeConfig>>,
    last_purged: Option<LogId<Nid>>,
    vote: Option<Vote<Nid>>,
    committed: Option<LogId<Nid>>,
    /// Records written since the file was last rewritten.
    records: usize,
}

impl LogInner {
    fn write(&mut self, records: &[Record]) -> std::io::Result<()> {
        let mut bytes = Vec::new();
        for record in records {
            encode(record, &mut bytes)?;
        }
        self.file.write_all(&bytes)?;
        self.file.sync_data()?;
        self.records += records.len();
        // Purged and truncated entries leave dead records behind; rewrite
        // the file once they dominate.
        if self.records > 1_000 && self.records > 4 * self.entries.len() {
            self.compact()?;
        }
        Ok(())
    }

    fn compact(&mut self) -> std::io::Result<()> {
        let mut bytes = Vec::new();
        let mut count = 0;
        let mut put = |record: Record, bytes: &mut Vec<u8>| -> std::io::Result<()> {
            count += 1;
            Ok(encode(&record, bytes)?)
        };
        if let Some(vote) = self.vote {
            put(Record::Vote(vote), &mut bytes)?;
        }
        put(Record::Committed(self.committed), &mut bytes)?;
        if let Some(purged) = self.last_purged {
            put(Record::Purge(purged), &mut bytes)?;
        }
        for entry in self.entries.values() {
            put(Record::Entry(entry.clone()), &mut bytes)?;
        }
        replace_file(&self.path, &bytes)?;
        self.file = OpenOptions::new().append(true).open(&self.path)?;
        self.records = count;
        Ok(())
    }
}

/// The Raft log, vote and committed position, kept on disk.
#[derive(Clone)]
pub struct LogStore {
    inner: Arc<Mutex<LogInner>>,
    /// The committed log index, for metrics.
    committed_tx: Arc<watch::Sender<u64>>,
}

impl LogStore {
    /// Open (or create) the log in `dir`.
    pub fn open(dir: &Path) -> std::io::Result<LogStore> {
        std::fs::create_dir_all(dir)?;
        let path = dir.join("raft-log");
        let data = match std::fs::read(&path) {
            Ok(data) => data,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(e) => return Err(e),
        };
        let (records, valid) = decode_all(&data);
        let mut entries = BTreeMap::new();
        let mut last_purged = None;
        let mut vote = None;
        let mut committed = None;
        let count = records.len();
        for record in records {
            match record {
                Record::Entry(entry) => {
                    entries.insert(entry.log_id.index, entry);
                }
                Record::Truncate(from) => {
                    entries.split_off(&from);
                }
                Record::Purge(upto) => {
                    entries = entries.split_off(&(upto.index + 1));
                    last_purged = Some(upto);
                }
                Record::Vote(v) => vote = Some(v),
                Record::Committed(c) => committed = c,
            }
        }
        let file = OpenOptions::new().create(true).append(true).open(&path)?;
        if valid < data.len() {
            tracing::warn!(
                path = %path.display(),
                dropped = data.len() - valid,
                "raft log ends with an incomplete record (crash while writing); dropped"
            );
            file.set_len(valid as u64)?;
            file.sync_all()?;
        }
        sync_dir(&path)?;
        let committed_index = committed.map(|c: LogId<Nid>| c.index).unwrap_or(0);
        Ok(LogStore {
            inner: Arc::new(Mutex::new(LogInner {
                path,
                file,
                entries,
                last_purged,
                vote,
                committed,
                records: count,
            })),
            committed_tx: Arc::new(watch::channel(committed_index).0),
        })
    }

    fn lock(&self) -> StoreResult<std::sync::MutexGuard<'_, LogInner>> {
        self.inner
            .lock()
            .map_err(|_| StorageIOError::<Nid>::write_logs(&PoisonedError).into())
    }

    /// The committed log index as it changes.
    pub fn committed(&self) -> watch::Receiver<u64> {
        self.committed_tx.subscribe()
    }
}

#[derive(Debug, thiserror::Error)]
#[error("storage lock poisoned by a panic")]
struct PoisonedError;

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + std::fmt::Debug + Send>(
        &mut self,
        range: RB,
    ) -> StoreResult<Vec<Entry<TypeConfig>>> {
        let inner = self.lock()?;
        Ok(inner.entries.range(range).map(|(_, e)| e.clone()).collect())
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = LogStore;

    async fn get_log_state(&mut self) -> StoreResult<LogState<TypeConfig>> {
        let inner = self.lock()?;
        let last = inner
            .entries
            .values()
            .next_back()
            .map(|e| e.log_id)
            .or(inner.last_purged);
        Ok(LogState {
            last_purged_log_id: inner.last_purged,
            last_log_id: last,
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<Nid>) -> StoreResult<()> {
        let mut inner = self.lock()?;
        inner
            .write(&[Record::Vote(*vote)])
            .map_err(|e| io_error(&e))?;
        inner.vote = Some(*vote);
        Ok(())
    }

    async fn read_vote(&mut self) -> StoreResult<Option<Vote<Nid>>> {
        Ok(self.lock()?.vote)
    }

    async fn save_committed(&mut self, committed: Option<LogId<Nid>>) -> StoreResult<()> {
        let mut inner = self.lock()?;
        inner
            .write(&[Record::Committed(committed)])
            .map_err(|e| io_error(&e))?;
        inner.committed = committed;
        self.committed_tx
            .send_replace(committed.map(|c| c.index).unwrap_or(0));
        Ok(())
    }

    async fn read_committed(&mut self) -> StoreResult<Option<LogId<Nid>>> {
        Ok(self.lock()?.committed)
    }

    async fn append<I>(&mut self, entries: I, callback: LogFlushed<TypeConfig>) -> StoreResult<()>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + Send,
        I::IntoIter: Send,
    {
        let entries: Vec<_> = entries.into_iter().collect();
        let records: Vec<Record> = entries.iter().cloned().map(Record::Entry).collect();
        let result = {
            let mut inner = self.lock()?;
            let result = inner.write(&records);
            if result.is_ok() {
                for entry in entries {
                    inner.entries.insert(entry.log_id.index, entry);
                }
            }
            result
        };
        let failed = result.as_ref().err().map(io_error);
        callback.log_io_completed(result);
        match failed {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    async fn truncate(&mut self, log_id: LogId<Nid>) -> StoreResult<()> {
        let mut inner = self.lock()?;
        inner
            .write(&[Record::Truncate(log_id.index)])
            .map_err(|e| io_error(&e))?;
        inner.entries.split_off(&log_id.index);
        Ok(())
    }

    async fn purge(&mut self, log_id: LogId<Nid>) -> StoreResult<()> {
        let mut inner = self.lock()?;
        inner
            .write(&[Record::Purge(log_id)])
            .map_err(|e| io_error(&e))?;
        let kept = inner.entries.split_off(&(log_id.index + 1));
        inner.entries = kept;
        inner.last_purged = Some(log_id);
        Ok(())
    }
}

/// The state machine's contents, as snapshots store them.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct Applied {
    last_applied: Option<LogId<Nid>>,
    membership: StoredMembership<Nid, openraft::BasicNode>,
    state: ClusterState,
}

#[derive(Serialize, Deserialize)]
struct StoredSnapshot {
    meta: SnapshotMeta<Nid, openraft::BasicNode>,
    data: Vec<u8>,
}

/// The applied cluster state, shared with the rest of the node.
pub struct Shared {
    applied: RwLock<Applied>,
    /// The last DDL sequence number applied to the state machine.
    ddl_seq: watch::Sender<u64>,
    /// Where sessions may go, as the state machine has it.
    routing: watch::Sender<Routing>,
    /// The latest snapshot (built here or received), as stored on disk.
    current: Mutex<Option<StoredSnapshot>>,
}

impl Shared {
    /// Read the current cluster state.
    pub fn read<T>(&self, f: impl FnOnce(&ClusterState) -> T) -> T {
        match self.applied.read() {
            Ok(guard) => f(&guard.state),
            Err(poisoned) => f(&poisoned.into_inner().state),
        }
    }

    /// Watch the last DDL sequence number applied to the state machine.
    pub fn ddl_seq(&self) -> watch::Receiver<u64> {
        self.ddl_seq.subscribe()
    }

    /// Watch where sessions may go: the drained backends and the write
    /// leader.
    pub fn routing(&self) -> watch::Receiver<Routing> {
        self.routing.subscribe()
    }

    fn replace(&self, applied: Applied) {
        let seq = applied.state.ddl_seq();
        let routing = applied.state.routing();
        match self.applied.write() {
            Ok(mut guard) => *guard = applied,
            Err(poisoned) => *poisoned.into_inner() = applied,
        }
        self.ddl_seq.send_replace(seq);
        self.routing.send_if_modified(|known| {
            let changed = *known != routing;
            *known = routing;
            changed
        });
    }

    fn set_current(&self, snapshot: StoredSnapshot) {
        match self.current.lock() {
            Ok(mut guard) => *guard = Some(snapshot),
            Err(poisoned) => *poisoned.into_inner() = Some(snapshot),
        }
    }

    fn current(&self) -> Option<Snapshot<TypeConfig>> {
        let guard = match self.current.lock() {
            Ok(guard) => guard,
            Err(poisoned) => poisoned.into_inner(),
        };
        guard.as_ref().map(|s| Snapshot {
            meta: s.meta.clone(),
            snapshot: Box::new(Cursor::new(s.data.clone())),
        })
    }

    fn snapshot(&self) -> Applied {
        match self.applied.read() {
            Ok(guard) => guard.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }
}

/// The Raft state machine: the cluster state in memory, its snapshot on disk.
pub struct StateMachine {
    shared: Arc<Shared>,
    snapshot_path: PathBuf,
}

impl StateMachine {
    /// Open the state machine in `dir`, starting from its last snapshot.
    pub fn open(dir: &Path) -> std::io::Result<StateMachine> {
        std::fs::create_dir_all(dir)?;
        let snapshot_path = dir.join("raft-snapshot");
        let current: Option<StoredSnapshot> = match std::fs::read(&snapshot_path) {
            Ok(bytes) => Some(serde_json::from_slice(&bytes)?),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(e),
        };
        let applied: Applied = match &current {
            Some(s) => serde_json::from_slice(&s.data)?,
            None => Applied::default(),
        };
        let seq = applied.state.ddl_seq();
        let routing = applied.state.routing();
        Ok(StateMachine {
            shared: Arc::new(Shared {
                applied: RwLock::new(applied),
                ddl_seq: watch::channel(seq).0,
                routing: watch::channel(routing).0,
                current: Mutex::new(current),
            }),
            snapshot_path,
        })
    }

    pub fn shared(&self) -> Arc<Shared> {
        self.shared.clone()
    }

    fn store(&mut self, snapshot: StoredSnapshot) -> std::io::Result<()> {
        replace_file(&self.snapshot_path, &serde_json::to_vec(&snapshot)?)?;
        self.shared.set_current(snapshot);
        Ok(())
    }
}

/// Builds a snapshot of the state machine as it is now.
pub struct SnapshotBuilder {
    shared: Arc<Shared>,
    snapshot_path: PathBuf,
}

impl RaftSnapshotBuilder<TypeConfig> for SnapshotBuilder {
    async fn build_snapshot(&mut self) -> StoreResult<Snapshot<TypeConfig>> {
        let applied = self.shared.snapshot();
        let data = serde_json::to_vec(&applied).map_err(|e| io_error(&e))?;
        let meta = SnapshotMeta {
            last_log_id: applied.last_applied,
            last_membership: applied.membership.clone(),
            snapshot_id: format!(
                "{}-{}",
                applied.last_applied.map(|l| l.leader_id.term).unwrap_or(0),
                applied.last_applied.map(|l| l.index).unwrap_or(0)
            ),
        };
        let stored = StoredSnapshot {
            meta: meta.clone(),
            data: data.clone(),
        };
        replace_file(
            &self.snapshot_path,
            &serde_json::to_vec(&stored).map_err(|e| io_error(&e))?,
        )
        .map_err(|e| io_error(&e))?;
        self.shared.set_current(stored);
        Ok(Snapshot {
            meta,
            snapshot: Box::new(Cursor::new(data)),
        })
    }
}

impl RaftStateMachine<TypeConfig> for StateMachine {
    type SnapshotBuilder = SnapshotBuilder;

    async fn applied_state(
        &mut self,
    ) -> StoreResult<(
        Option<LogId<Nid>>,
        StoredMembership<Nid, openraft::BasicNode>,
    )> {
        let applied = self.shared.snapshot();
        Ok((applied.last_applied, applied.membership))
    }

    async fn apply<I>(&mut self, entries: I) -> StoreResult<Vec<Response>>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + Send,
        I::IntoIter: Send,
    {
        let mut applied = self.shared.snapshot();
        let mut responses = Vec::new();
        for entry in entries {
            applied.last_applied = Some(entry.log_id);
            match &entry.payload {
                EntryPayload::Blank => responses.push(Response::Done),
                EntryPayload::Normal(request) => responses.push(applied.state.apply(request)),
                EntryPayload::Membership(membership) => {
                    applied.membership =
                        StoredMembership::new(Some(entry.log_id), membership.clone());
                    responses.push(Response::Done);
                }
            }
        }
        self.shared.replace(applied);
        Ok(responses)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        SnapshotBuilder {
            shared: self.shared.clone(),
            snapshot_path: self.snapshot_path.clone(),
        }
    }

    async fn begin_receiving_snapshot(&mut self) -> StoreResult<Box<Cursor<Vec<u8>>>> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta<Nid, openraft::BasicNode>,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> StoreResult<()> {
        let data = snapshot.into_inner();
        let applied: Applied = serde_json::from_slice(&data).map_err(|e| io_error(&e))?;
        self.store(StoredSnapshot {
            meta: meta.clone(),
            data,
        })
        .map_err(|e| io_error(&e))?;
        self.shared.replace(applied);
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> StoreResult<Option<Snapshot<TypeConfig>>> {
        Ok(self.shared.current())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use openraft::{CommittedLeaderId, EntryPayload};

    fn entry(index: u64) -> Entry<TypeConfig> {
        Entry {
            log_id: LogId::new(CommittedLeaderId::new(1, 1), index),
            payload: EntryPayload::Blank,
        }
    }

    #[tokio::test]
    async fn the_log_survives_a_reopen_and_a_torn_last_record_is_dropped() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = LogStore::open(dir.path()).unwrap();
            let mut inner = store.inner.lock().unwrap();
            let records: Vec<Record> = (1..=5).map(|i| Record::Entry(entry(i))).collect();
            inner.write(&records).unwrap();
            inner.write(&[Record::Truncate(4)]).unwrap();
            inner.write(&[Record::Purge(entry(1).log_id)]).unwrap();
            inner.write(&[Record::Vote(Vote::new(3, 2))]).unwrap();
        }
        // A crash in the middle of the next record.
        let path = dir.path().join("raft-log");
        let mut bytes = Vec::new();
        encode(&Record::Entry(entry(9)), &mut bytes).unwrap();
        let mut file = OpenOptions::new().append(true).open(&path).unwrap();
        file.write_all(&bytes[..bytes.len() - 3]).unwrap();
        drop(file);
        let mut store = LogStore::open(dir.path()).unwrap();
        let indexes: Vec<u64> = store
            .try_get_log_entries(0..100)
            .await
            .unwrap()
            .iter()
            .map(|e| e.log_id.index)
            .collect();
        assert_eq!(indexes, vec![2, 3]);
        assert_eq!(store.read_vote().await.unwrap(), Some(Vote::new(3, 2)));
        let state = store.get_log_state().await.unwrap();
        assert_eq!(state.last_purged_log_id.map(|l| l.index), Some(1));
        assert_eq!(state.last_log_id.map(|l| l.index), Some(3));
        // The torn bytes were cut, so a later append is readable.
        store
            .lock()
            .unwrap()
            .write(&[Record::Entry(entry(4))])
            .unwrap();
        drop(store);
        let mut store = LogStore::open(dir.path()).unwrap();
        assert_eq!(store.try_get_log_entries(4..5).await.unwrap().len(), 1);
    }
}
