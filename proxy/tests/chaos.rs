//! The chaos suite, after Jepsen: three backends and three node processes,
//! a fault-injecting relay on every link (each node to each backend, and
//! every Raft link), node clocks offset by up to ±5 s, and workloads
//! through random nodes while two faults strike at once: SIGKILL or SIGSTOP
//! of a backend or a node, a backend lost for good, a node with its backend
//! cut off from the rest, or a node-to-backend link or a node's Raft links
//! blackholed, reset, delayed or throttled. After the faults
//! everything is healed and each backend is read directly to check the
//! invariants of DESIGN.md:
//!
//! - set: every acknowledged insert is present, no failed insert is, no
//!   duplicates;
//! - LWW register: every key ends at the write with the highest version
//!   (never below an acknowledged one), and no deleted row comes back;
//! - sequences: no duplicate ids, every acknowledged id present;
//! - DDL: the same history and schema on every backend, every acknowledged
//!   table present;
//! - convergence: the same ordered hash of every table, and of the row
//!   versions, on every backend within 30 s of the heal.
//!
//! Sessions use commit scope `majority`. Everything is seeded: the faults,
//! their targets and times, the clock offsets and the workloads' choices
//! come from the seed (the interleaving of processes cannot). The seeds CI
//! runs are `CI_SEEDS`; `CHORUS_CHAOS_SEEDS=1-300` (or `5,9,12`) runs the
//! soak (`scripts/chaos-soak.sh`).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, HashMap, HashSet};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chorus_testkit as testkit;
use chorus_testkit::{link, procs};
use link::Fault;
use procs::{cluster_opts, Cluster, Options};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// The role the workload connects as (not a superuser).
const APP_ROLE: &str = "chaos_app";

/// Seeds CI runs: every workload, and between them every kind of fault
/// (a test checks that they do).
const CI_SEEDS: &[u64] = &[6, 9, 10, 12, 14, 17, 18];
/// How long the workloads run; every fault starts and ends within it.
const RUN: Duration = Duration::from_secs(8);
/// Longest a single operation may take (a commit waits for its scope up
/// to 3 s); past it the outcome is unknown.
const OP_LIMIT: Duration = Duration::from_secs(6);
/// Every backend must be identical within this long of the heal.
const CONVERGE: Duration = Duration::from_secs(30);

#[derive(Debug, Clone, Copy)]
enum Kind {
    KillBackend(usize),
    /// SIGKILL and its data directory removed: lost for good (at most one
    /// per seed, a minority). The survivors must hold every acknowledged
    /// write.
    LoseBackend(usize),
    PauseBackend(usize),
    KillNode(usize),
    PauseNode(usize),
    /// Node `i` and its home backend cut off from the other nodes and
    /// backends (Raft links and node-to-backend links).
    Partition(usize),
    /// One node's link to one backend.
    Link(usize, usize, Fault),
    /// Every Raft connection to one node.
    RaftLink(usize, Fault),
}

#[derive(Debug, Clone, Copy)]
struct Planned {
    kind: Kind,
    start: Duration,
    length: Duration,
}

fn plan(seed: u64) -> (Vec<Planned>, [i64; 3]) {
    let mut rng = StdRng::seed_from_u64(seed);
    let offsets = [
        rng.random_range(-5000..=5000),
        rng.random_range(-5000..=5000),
        rng.random_range(-5000..=5000),
    ];
    let mut lost = false;
    let faults = (0..2)
        .map(|_| {
            let target = rng.random_range(1..=3);
            let link_fault = |rng: &mut StdRng| match rng.random_range(0..4) {
                0 => Fault::Blackhole,
                1 => Fault::Reset,
                2 => Fault::Delay(Duration::from_millis(rng.random_range(20..200))),
                _ => Fault::Throttle(rng.random_range(20_000..200_000)),
            };
            let kind = match rng.random_range(0..8) {
                0 => Kind::KillBackend(target),
                1 => Kind::PauseBackend(target),
                2 => Kind::KillNode(target),
                3 => Kind::PauseNode(target),
                4 => Kind::Partition(target),
                5 if !lost => {
                    lost = true;
                    Kind::LoseBackend(target)
                }
                5 => Kind::KillBackend(target),
                6 => Kind::Link(target, rng.random_range(1..=3), link_fault(&mut rng)),
                _ => Kind::RaftLink(target, link_fault(&mut rng)),
            };
            let start = Duration::from_millis(rng.random_range(500..3500));
            let length = Duration::from_millis(rng.random_range(1000..3500));
            Planned {
                kind,
                start,
                length,
            }
        })
        .collect();
    (faults, offsets)
}

fn signal(pid: u32, sig: &str) {
    let _ = Command::new("kill").args([sig, &pid.to_string()]).status();
}

/// Set `fault` on every link between node `i` with its backend and the
/// other nodes and backends.
fn partition_links(c: &Cluster, i: usize, fault: Fault) {
    for n in 1..=3 {
        for b in 1..=3 {
            if (n == i) != (b == i) {
                c.links[n - 1][b - 1].set(fault);
            }
        }
    }
}

fn begin(c: &mut Cluster, kind: Kind) {
    match kind {
        Kind::KillBackend(b) => c.backends[b - 1].kill(),
        Kind::LoseBackend(b) => {
            c.backends[b - 1].kill();
            std::fs::remove_dir_all(c.backends[b - 1].dir().join("data")).unwrap();
        }
        Kind::PauseBackend(b) => c.backends[b - 1].pause(),
        Kind::KillNode(i) => c.kill_node(i),
        Kind::PauseNode(i) => {
            if let Some(child) = &c.nodes[i - 1] {
                signal(child.id(), "-STOP");
            }
        }
        Kind::Partition(i) => {
            for (j, relay) in c.relays.iter().enumerate() {
                let callers = if j + 1 == i { [0] } else { [i as u64] };
                relay.block(&callers);
            }
            partition_links(c, i, Fault::Blackhole);
        }
        Kind::Link(i, b, fault) => c.links[i - 1][b - 1].set(fault),
        Kind::RaftLink(i, fault) => c.relays[i - 1].set(fault),
    }
}

fn end(c: &mut Cluster, kind: Kind) {
    match kind {
        // (Unless it was lost meanwhile.)
        Kind::KillBackend(b) => {
            if c.backends[b - 1].dir().join("data").exists() {
                c.backends[b - 1].start().unwrap();
            }
        }
        Kind::LoseBackend(_) => {}
        Kind::PauseBackend(b) => c.backends[b - 1].resume(),
        Kind::KillNode(i) => c.start_node(i),
        Kind::PauseNode(i) => {
            if let Some(child) = &c.nodes[i - 1] {
                signal(child.id(), "-CONT");
            }
        }
        Kind::Partition(i) => {
            for relay in &c.relays {
                relay.heal();
            }
            partition_links(c, i, Fault::Pass);
        }
        Kind::Link(i, b, _) => c.links[i - 1][b - 1].set(Fault::Pass),
        Kind::RaftLink(i, _) => c.relays[i - 1].set(Fault::Pass),
    }
}

/// Undo every fault, whatever is still in force (a lost backend stays
/// lost).
fn heal_all(c: &mut Cluster, lost: Option<usize>) {
    for b in 0..3 {
        if lost == Some(b + 1) {
            continue;
        }
        c.backends[b].resume();
        c.backends[b].start().unwrap();
    }
    for i in 1..=3 {
        match &c.nodes[i - 1] {
            Some(child) => signal(child.id(), "-CONT"),
            None => c.start_node(i),
        }
    }
    for relay in &c.relays {
        relay.heal();
        relay.set(Fault::Pass);
    }
    for row in &c.links {
        for link in row {
            link.set(Fault::Pass);
        }
    }
}

/// What a client knows of an operation's fate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    Ok,
    /// Certainly not committed: never sent, or refused with an ERROR.
    Failed,
    /// Maybe committed: the connection broke, the statement was in flight
    /// when its backend failed (08006), the node gave up waiting for the
    /// commit scope (40003: committed locally), or it took too long.
    Unknown,
}

fn judge(e: &tokio_postgres::Error) -> Outcome {
    match e.as_db_error() {
        // Not reached its commit scope (committed locally), or in flight
        // when its backend failed (the session moved on).
        Some(db) if db.code().code() == "40003" || db.code().code().starts_with("08") => {
            Outcome::Unknown
        }
        Some(db) if db.severity() == "ERROR" => Outcome::Failed,
        _ => Outcome::Unknown,
    }
}

#[derive(Default)]
struct History {
    set: Vec<(String, Outcome)>,
    /// (key, value written or None for a delete, version, outcome).
    reg: Vec<(i32, Option<String>, i64, Outcome)>,
    seq: Vec<i64>,
    ddl: Vec<(String, Outcome)>,
    errors: BTreeMap<String, usize>,
}

impl History {
    fn note_error(&mut self, e: &tokio_postgres::Error) {
        let what = match e.as_db_error() {
            Some(db) => db.code().code().to_owned(),
            None if e.is_closed() => "closed".to_owned(),
            None => "io".to_owned(),
        };
        *self.errors.entry(what).or_default() += 1;
    }
}

/// What the workload clients share.
struct Workload {
    /// The nodes' client ports.
    ports: Vec<u16>,
    seed: u64,
    stop: AtomicBool,
    history: Mutex<History>,
}

impl Workload {
    fn running(&self) -> bool {
        !self.stop.load(Ordering::Relaxed)
    }

    /// Client `w`'s choices: from the seed.
    fn rng(&self, w: usize) -> StdRng {
        StdRng::seed_from_u64(self.seed * 100 + w as u64)
    }

    fn record(&self, f: impl FnOnce(&mut History)) {
        f(&mut self.history.lock().unwrap());
    }

    /// A session through a random node, or None when none answered in time.
    async fn connect(&self, rng: &mut StdRng) -> Option<tokio_postgres::Client> {
        let port = self.ports[rng.random_range(0..self.ports.len())];
        let conninfo =
            format!("host=127.0.0.1 port={port} user={APP_ROLE} dbname=postgres connect_timeout=2");
        tokio::time::timeout(Duration::from_secs(2), testkit::connect(&conninfo))
            .await
            .ok()?
            .ok()
    }

    /// Run one operation within `OP_LIMIT`: its result, if it had one, and
    /// what the client knows of its fate (errors are counted).
    async fn outcome<T>(
        &self,
        op: impl std::future::Future<Output = Result<T, tokio_postgres::Error>>,
    ) -> (Option<T>, Outcome) {
        match tokio::time::timeout(OP_LIMIT, op).await {
            Ok(Ok(value)) => (Some(value), Outcome::Ok),
            Ok(Err(e)) => {
                self.record(|h| h.note_error(&e));
                (None, judge(&e))
            }
            Err(_) => (None, Outcome::Unknown),
        }
    }
}

async fn set_worker(load: Arc<Workload>, w: usize) {
    let mut rng = load.rng(w);
    let mut n = 0;
    while load.running() {
        n += 1;
        let id = format!("s{w}-{n}");
        let Some(client) = load.connect(&mut rng).await else {
            load.record(|h| h.set.push((id, Outcome::Failed)));
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let sql = "INSERT INTO chaos_set (id) VALUES ($1)";
        let (_, outcome) = load.outcome(client.execute(sql, &[&id])).await;
        load.record(|h| h.set.push((id, outcome)));
    }
}

async fn reg_worker(load: Arc<Workload>, w: usize) {
    let mut rng = load.rng(w);
    let mut n = 0;
    while load.running() {
        n += 1;
        let key: i32 = rng.random_range(0..8);
        let value = (rng.random_range(0..10) < 7).then(|| format!("r{w}-{n}"));
        let Some(mut client) = load.connect(&mut rng).await else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        // Before COMMIT goes out nothing can have committed; the version
        // is known for every write that may have.
        let prepare = async {
            let txn = client.transaction().await?;
            let rows = match &value {
                Some(v) => {
                    txn.execute(
                        "INSERT INTO chaos_reg (k, v) VALUES ($1, $2) \
                         ON CONFLICT (k) DO UPDATE SET v = excluded.v",
                        &[&key, v],
                    )
                    .await?
                }
                None => {
                    txn.execute("DELETE FROM chaos_reg WHERE k = $1", &[&key])
                        .await?
                }
            };
            if rows == 0 {
                return Ok(None);
            }
            let version: i64 = txn
                .query_one(
                    "SELECT version FROM chorus.row_version \
                     WHERE tbl = 'public.chaos_reg' AND pk = jsonb_build_object('k', $1::int)",
                    &[&key],
                )
                .await?
                .get(0);
            Ok::<_, tokio_postgres::Error>(Some((txn, version)))
        };
        let Some(Some((txn, version))) = load.outcome(prepare).await.0 else {
            continue;
        };
        let (_, outcome) = load.outcome(txn.commit()).await;
        load.record(|h| h.reg.push((key, value, version, outcome)));
    }
}

async fn seq_worker(load: Arc<Workload>, w: usize) {
    let mut rng = load.rng(w);
    while load.running() {
        let Some(client) = load.connect(&mut rng).await else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let sql = "INSERT INTO chaos_seq (w) VALUES ('x') RETURNING id";
        if let (Some(row), _) = load.outcome(client.query_one(sql, &[])).await {
            load.record(|h| h.seq.push(row.get(0)));
        }
    }
}

async fn ddl_worker(load: Arc<Workload>, w: usize) {
    let mut rng = load.rng(w);
    let mut n = 0;
    while load.running() {
        tokio::time::sleep(Duration::from_millis(700)).await;
        n += 1;
        let table = format!("chaos_ddl_{n}");
        let Some(client) = load.connect(&mut rng).await else {
            continue;
        };
        let sql = format!("CREATE TABLE {table} (id int PRIMARY KEY, v text)");
        let (_, outcome) = load.outcome(client.batch_execute(&sql)).await;
        load.record(|h| h.ddl.push((table, outcome)));
    }
}

/// A backend's state, as compared between backends: each table's ordered
/// hash, the row versions, the DDL history.
async fn fingerprint(c: &Cluster, b: usize) -> Option<Vec<(String, String)>> {
    let client = tokio::time::timeout(Duration::from_secs(2), c.direct_try(b))
        .await
        .ok()??;
    let tables: Vec<String> = client
        .query(
            "SELECT tablename::text FROM pg_tables WHERE schemaname = 'public' ORDER BY 1",
            &[],
        )
        .await
        .ok()?
        .iter()
        .map(|r| r.get(0))
        .collect();
    let mut out = Vec::new();
    for table in tables {
        let sql = format!(
            "SELECT md5(coalesce(string_agg(t::text, '|' ORDER BY t::text), '')) FROM public.{table} t"
        );
        out.push((table, client.query_one(&sql, &[]).await.ok()?.get(0)));
    }
    for (name, sql) in [
        (
            "chorus.row_version",
            "SELECT md5(coalesce(string_agg(format('%s %s %s %s %s', tbl, pk, version, origin, deleted), '|' \
             ORDER BY tbl, pk::text), '')) FROM chorus.row_version",
        ),
        (
            "chorus.ddl_history",
            "SELECT md5(coalesce(string_agg(format('%s %s %s', seq, command, error), '|' ORDER BY seq), '')) \
             FROM chorus.ddl_history",
        ),
    ] {
        out.push((name.to_owned(), client.query_one(sql, &[]).await.ok()?.get(0)));
    }
    Some(out)
}

/// One seed: plan, faults under load, heal, invariants. Panics on a
/// violated invariant; returns a summary line.
async fn run_seed(seed: u64) -> String {
    let (faults, offsets) = plan(seed);
    let started = Instant::now();
    let mut c = cluster_opts(Options {
        node_extra: "health_check_interval_ms = 200\nhealth_check_timeout_ms = 500\n".into(),
        per_node: offsets
            .iter()
            .map(|o| format!("clock_offset_ms = {o}\n"))
            .collect(),
        // A lost backend's changes that reached only one survivor are
        // copied to the other a second after it is seen down.
        replication: "commit_scope = \"majority\"\ncommit_scope_timeout_ms = 3000\n\
                      reconcile_after_ms = 1000\n"
            .into(),
        // Duties of a node that stops answering move after a second.
        extra: "node_lease_ms = 1000\n".into(),
        links: true,
        ..Options::default()
    })
    .await;
    // The workload runs as an ordinary application role, as applications
    // do: LOGIN, CREATE on schema public, and its tables' privileges.
    c.exec(1, &format!("CREATE ROLE {APP_ROLE} LOGIN")).await;
    c.exec(1, &format!("GRANT CREATE ON SCHEMA public TO {APP_ROLE}"))
        .await;
    c.exec(1, "CREATE TABLE chaos_set (id text PRIMARY KEY)")
        .await;
    c.exec(1, "CREATE TABLE chaos_reg (k int PRIMARY KEY, v text)")
        .await;
    c.exec(
        1,
        "CREATE TABLE chaos_seq (id bigserial PRIMARY KEY, w text)",
    )
    .await;
    c.exec(
        1,
        &format!(
            "GRANT ALL ON ALL TABLES IN SCHEMA public TO {APP_ROLE}; \
             GRANT ALL ON ALL SEQUENCES IN SCHEMA public TO {APP_ROLE}"
        ),
    )
    .await;
    // Role, schema grant, three tables, table and sequence grants.
    c.wait_ddl(6).await;
    // The register's check reads the version its write got (a test's
    // look inside; applications have no access to chorus.*).
    for b in 1..=3 {
        c.direct(b)
            .await
            .batch_execute(&format!("GRANT SELECT ON chorus.row_version TO {APP_ROLE}"))
            .await
            .unwrap();
    }

    let load = Arc::new(Workload {
        ports: c.ports.clone(),
        seed,
        stop: AtomicBool::new(false),
        history: Mutex::new(History::default()),
    });
    let mut workers = tokio::task::JoinSet::new();
    for w in 0..2 {
        workers.spawn(set_worker(load.clone(), w));
        workers.spawn(reg_worker(load.clone(), 10 + w));
    }
    workers.spawn(seq_worker(load.clone(), 20));
    workers.spawn(ddl_worker(load.clone(), 30));

    // The faults, in time order.
    let t0 = Instant::now();
    let mut events: Vec<(Duration, bool, Kind)> = Vec::new();
    for f in &faults {
        events.push((f.start, true, f.kind));
        events.push((f.start + f.length, false, f.kind));
    }
    events.sort_by_key(|e| e.0);
    for (at, starting, kind) in events {
        tokio::time::sleep_until((t0 + at).into()).await;
        tokio::task::block_in_place(|| {
            if starting {
                begin(&mut c, kind);
            } else {
                end(&mut c, kind);
            }
        });
    }
    tokio::time::sleep_until((t0 + RUN).into()).await;
    load.stop.store(true, Ordering::Relaxed);
    let lost = faults.iter().find_map(|f| match f.kind {
        Kind::LoseBackend(b) => Some(b),
        _ => None,
    });
    let survivors: Vec<usize> = (1..=3).filter(|b| Some(*b) != lost).collect();
    tokio::task::block_in_place(|| heal_all(&mut c, lost));
    let healed = Instant::now();
    // Workers end within one operation's limit (plus a connect).
    let deadline = tokio::time::Instant::now() + OP_LIMIT + Duration::from_secs(5);
    while tokio::time::timeout_at(deadline, workers.join_next())
        .await
        .expect("a workload did not stop")
        .is_some()
    {}

    // Convergence.
    let converged_in = loop {
        let mut prints = Vec::new();
        for &b in &survivors {
            prints.push(fingerprint(&c, b).await);
        }
        if prints.iter().all(Option::is_some) && prints.windows(2).all(|w| w[0] == w[1]) {
            break healed.elapsed();
        }
        if healed.elapsed() > CONVERGE {
            for (b, p) in survivors.iter().zip(&prints) {
                eprintln!("backend {b}: {p:?}");
            }
            panic!(
                "seed {seed}: backends differ {:?} after the heal ({faults:?})",
                CONVERGE
            );
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    };

    let h = std::mem::take(&mut *load.history.lock().unwrap());
    for &b in &survivors {
        check(&c, b, &h, seed).await;
    }
    // The same schema everywhere.
    let schema = c.schema(survivors[0]);
    for &b in &survivors[1..] {
        assert_eq!(
            schema,
            c.schema(b),
            "seed {seed}: schema of backend {b} differs"
        );
    }
    let count = |v: &[(String, Outcome)], o: Outcome| v.iter().filter(|x| x.1 == o).count();
    let reg_ok = h.reg.iter().filter(|r| r.3 == Outcome::Ok).count();
    format!(
        "seed {seed}: faults {:?}; clocks {offsets:?} ms; set {} ok/{} unknown/{} failed; \
         register {reg_ok} ok of {}; sequence {} ids; ddl {} ok of {}; errors {:?}; \
         converged {:.1} s after heal; {:.0} s in all",
        faults
            .iter()
            .map(|f| format!(
                "{:?}@{:.1}s+{:.1}s",
                f.kind,
                f.start.as_secs_f64(),
                f.length.as_secs_f64()
            ))
            .collect::<Vec<_>>(),
        count(&h.set, Outcome::Ok),
        count(&h.set, Outcome::Unknown),
        count(&h.set, Outcome::Failed),
        h.reg.len(),
        h.seq.len(),
        count(&h.ddl, Outcome::Ok),
        h.ddl.len(),
        h.errors,
        converged_in.as_secs_f64(),
        started.elapsed().as_secs_f64(),
    )
}

async fn check(c: &Cluster, b: usize, h: &History, seed: u64) {
    let client = c.direct(b).await;
    // Set.
    let ids: Vec<String> = client
        .query("SELECT id FROM chaos_set", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    let present: HashSet<&String> = ids.iter().collect();
    assert_eq!(
        present.len(),
        ids.len(),
        "seed {seed}: duplicate set rows on backend {b}"
    );
    for (id, outcome) in &h.set {
        match outcome {
            Outcome::Ok => assert!(
                present.contains(id),
                "seed {seed}: acknowledged insert {id} missing on backend {b}"
            ),
            Outcome::Failed => assert!(
                !present.contains(id),
                "seed {seed}: failed insert {id} present on backend {b}"
            ),
            Outcome::Unknown => {}
        }
    }
    // Register: the final state of each key is the write with the
    // highest version, which is at least every acknowledged one.
    let rows: HashMap<i32, String> = client
        .query("SELECT k, v FROM chaos_reg", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    let versions: HashMap<i32, (i64, bool)> = client
        .query(
            "SELECT (pk->>'k')::int, version, deleted FROM chorus.row_version WHERE tbl = 'public.chaos_reg'",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), (r.get(1), r.get(2))))
        .collect();
    for key in 0..8 {
        let writes: Vec<_> = h.reg.iter().filter(|w| w.0 == key).collect();
        let Some(acked_max) = writes
            .iter()
            .filter(|w| w.3 == Outcome::Ok)
            .map(|w| w.2)
            .max()
        else {
            continue;
        };
        let (version, deleted) = versions[&key];
        assert!(
            version >= acked_max,
            "seed {seed}: key {key} on backend {b} is at version {version}, below acknowledged {acked_max}"
        );
        let winner = writes
            .iter()
            .filter(|w| w.2 == version && w.3 != Outcome::Failed)
            .find(|w| w.1.as_deref() == rows.get(&key).map(String::as_str))
            .unwrap_or_else(|| {
                panic!(
                    "seed {seed}: key {key} on backend {b} holds {:?} at version {version}, which no \
                     acknowledged or pending write made",
                    rows.get(&key)
                )
            });
        assert_eq!(
            winner.1.is_none(),
            deleted,
            "seed {seed}: key {key} tombstone on backend {b}"
        );
    }
    // Sequences.
    let ids: HashSet<i64> = client
        .query("SELECT id FROM chaos_seq", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    let acked: HashSet<i64> = h.seq.iter().copied().collect();
    assert_eq!(
        acked.len(),
        h.seq.len(),
        "seed {seed}: a sequence value was handed out twice"
    );
    for id in &acked {
        assert!(
            ids.contains(id),
            "seed {seed}: acknowledged id {id} missing on backend {b}"
        );
    }
    // DDL.
    for (table, outcome) in &h.ddl {
        if *outcome == Outcome::Ok {
            let found: i64 = client
                .query_one(
                    "SELECT count(*) FROM pg_tables WHERE tablename = $1",
                    &[table],
                )
                .await
                .unwrap()
                .get(0);
            assert_eq!(
                found, 1,
                "seed {seed}: acknowledged {table} missing on backend {b}"
            );
        }
    }
}

fn seeds_from_env() -> Vec<u64> {
    let spec = std::env::var("CHORUS_CHAOS_SEEDS").unwrap_or_else(|_| "1-100".into());
    let mut seeds = Vec::new();
    for part in spec.split(',') {
        match part.split_once('-') {
            Some((a, b)) => {
                seeds.extend(a.trim().parse::<u64>().unwrap()..=b.trim().parse().unwrap())
            }
            None => seeds.push(part.trim().parse().unwrap()),
        }
    }
    seeds
}

/// The name of a fault's kind, without its target; for a link, its fault
/// too.
fn kind_names(kind: Kind) -> Vec<String> {
    let name = |text: String| text.split('(').next().unwrap_or_default().to_owned();
    match kind {
        Kind::Link(_, _, fault) | Kind::RaftLink(_, fault) => {
            vec![name(format!("{kind:?}")), name(format!("{fault:?}"))]
        }
        _ => vec![name(format!("{kind:?}"))],
    }
}

#[test]
fn the_ci_seeds_cover_every_kind_of_fault() {
    let covered: HashSet<String> = CI_SEEDS
        .iter()
        .flat_map(|&seed| plan(seed).0)
        .flat_map(|f| kind_names(f.kind))
        .collect();
    for kind in [
        "KillBackend",
        "LoseBackend",
        "PauseBackend",
        "KillNode",
        "PauseNode",
        "Partition",
        "Link",
        "RaftLink",
        "Blackhole",
        "Reset",
        "Delay",
        "Throttle",
    ] {
        assert!(covered.contains(kind), "no CI seed has {kind}: {covered:?}");
    }
}

/// The soak's default seeds (1-300) put every pair of kinds of fault
/// together (the same kind twice included) at least once.
#[test]
fn the_soak_seeds_cover_every_pair_of_kinds() {
    let kind = |f: &Planned| kind_names(f.kind).remove(0);
    let pairs: HashSet<(String, String)> = (1..=300)
        .map(|seed| {
            let faults = plan(seed).0;
            let (a, b) = (kind(&faults[0]), kind(&faults[1]));
            if a <= b {
                (a, b)
            } else {
                (b, a)
            }
        })
        .collect();
    let kinds = [
        "KillBackend",
        "LoseBackend",
        "PauseBackend",
        "KillNode",
        "PauseNode",
        "Partition",
        "Link",
        "RaftLink",
    ];
    for a in kinds {
        for b in kinds {
            // At most one backend is lost per seed.
            if a <= b && !(a == "LoseBackend" && b == "LoseBackend") {
                assert!(
                    pairs.contains(&(a.to_owned(), b.to_owned())),
                    "no soak seed has {a} with {b}"
                );
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_fixed_seeds() {
    for &seed in CI_SEEDS {
        let line = run_seed(seed).await;
        println!("{line}");
    }
}

/// The soak: many seeds, each reported; failures are collected and the
/// run goes on. `CHORUS_CHAOS_SEEDS=1-300 cargo test --release -p
/// chorus-proxy --test chaos -- --ignored --nocapture soak`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "long: run by scripts/chaos-soak.sh"]
async fn soak() {
    let mut failed = Vec::new();
    let seeds = seeds_from_env();
    for &seed in &seeds {
        match tokio::spawn(run_seed(seed)).await {
            Ok(line) => println!("PASS {line}"),
            Err(e) => {
                println!("FAIL seed {seed}: {e}");
                failed.push(seed);
            }
        }
    }
    println!("{} seeds, {} failed: {failed:?}", seeds.len(), failed.len());
    assert!(failed.is_empty(), "failed seeds: {failed:?}");
}
