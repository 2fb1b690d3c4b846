//! Three consensus members in one process, on 127.0.0.1.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use chorus_consensus::{Consensus, ConsensusConfig, DdlProposal, Request, Response};

fn free_addr() -> SocketAddr {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap()
}

fn config(id: u64, dir: &Path, members: &BTreeMap<u64, String>, secret: &str) -> ConsensusConfig {
    ConsensusConfig {
        id,
        listen: members[&id].parse().unwrap(),
        secret: secret.into(),
        dir: dir.join(format!("n{id}")),
        members: members.clone(),
        heartbeat: Duration::from_millis(50),
        election_timeout: (Duration::from_millis(300), Duration::from_millis(600)),
        snapshot_every: 4,
        keep_logs: 0,
        also_accepted: Vec::new(),
        tls: None,
    }
}

fn ddl(id: &str, origin: u64) -> Request {
    Request::Ddl(DdlProposal {
        id: id.into(),
        sql: format!("CREATE TABLE {id} ()"),
        search_path: "public".into(),
        role: "postgres".into(),
        origin,
        transactional: true,
        sequence_kind: None,
        galloc_block: None,
        in_stream: false,
        settings: None,
        database: None,
    })
}

async fn wait_for(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while !check() {
        assert!(tokio::time::Instant::now() < deadline, "timed out: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn log_of(node: &Consensus) -> Vec<String> {
    node.state()
        .read(|s| s.ddl.iter().map(|e| e.proposal.id.clone()).collect())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proposals_from_every_node_commit_in_one_order_and_survive_a_leader_loss() {
    let dir = tempfile::tempdir().unwrap();
    let members: BTreeMap<u64, String> = (1..=3).map(|i| (i, free_addr().to_string())).collect();
    let mut nodes = Vec::new();
    for id in 1..=3 {
        nodes.push(Some(
            Consensus::start(config(id, dir.path(), &members, "s3cret"))
                .await
                .unwrap(),
        ));
    }
    let timeout = Duration::from_secs(10);
    // Concurrent proposals through every node.
    let mut tasks = Vec::new();
    for (i, node) in nodes.iter().enumerate() {
        let node: Arc<Consensus> = node.clone().unwrap();
        tasks.push(tokio::spawn(async move {
            for n in 0..5 {
                node.propose(ddl(&format!("t_{}_{n}", i + 1), i as u64 + 1), timeout)
                    .await
                    .unwrap();
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    let all = |nodes: &Vec<Option<Arc<Consensus>>>| -> Vec<Vec<String>> {
        nodes.iter().flatten().map(|n| log_of(n)).collect()
    };
    wait_for("every node has 15 entries", || {
        all(&nodes).iter().all(|l| l.len() == 15)
    })
    .await;
    let logs = all(&nodes);
    assert!(logs.iter().all(|l| l == &logs[0]), "{logs:?}");

    // A retried proposal is not logged twice.
    let again = nodes[0]
        .as_ref()
        .unwrap()
        .propose(ddl("t_1_0", 1), timeout)
        .await
        .unwrap();
    assert!(matches!(
        again,
        Response::Ddl {
            duplicate: true,
            ..
        }
    ));

    // Stop the leader; the others elect a new one and go on.
    let leader = nodes[0]
        .as_ref()
        .unwrap()
        .metrics()
        .borrow()
        .current_leader
        .unwrap();
    let old = nodes[leader as usize - 1].take().unwrap();
    old.shutdown().await;
    drop(old);
    let survivor = nodes.iter().flatten().next().unwrap().clone();
    survivor.propose(ddl("after", 9), timeout).await.unwrap();
    wait_for("both survivors have the new entry", || {
        all(&nodes).iter().all(|l| l.len() == 16)
    })
    .await;

    // The stopped node restarts from its files and catches up (the log was
    // purged behind snapshots, so this takes a snapshot).
    let restarted = Consensus::start(config(leader, dir.path(), &members, "s3cret"))
        .await
        .unwrap();
    wait_for("the restarted node caught up", || {
        log_of(&restarted).len() == 16
    })
    .await;
    assert_eq!(log_of(&restarted), log_of(&survivor));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_with_the_wrong_secret_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let mut members: BTreeMap<u64, String> = BTreeMap::new();
    members.insert(1, free_addr().to_string());
    let one = Consensus::start(config(1, dir.path(), &members, "right"))
        .await
        .unwrap();
    one.propose(ddl("a", 1), Duration::from_secs(10))
        .await
        .unwrap();
    // An intruder that is not a member, with the wrong secret.
    let intruder_addr = free_addr().to_string();
    let mut intruder_members = BTreeMap::new();
    intruder_members.insert(2, intruder_addr.clone());
    let mut intruder_config = config(2, dir.path(), &intruder_members, "wrong");
    intruder_config.members = BTreeMap::new();
    let intruder = Consensus::start(intruder_config).await.unwrap();
    // Adding it with the wrong secret is refused at the door.
    let refused = chorus_consensus::admin_request(
        &members[&1],
        "wrong",
        None,
        Some((2, intruder_addr.clone())),
        None,
        Duration::from_secs(5),
    )
    .await
    .unwrap_err();
    assert!(refused.contains("secret"), "{refused}");
    assert!(one.auth_failures() >= 1);
    // Even added by someone who knows the secret, it cannot be reached
    // (it refuses the leader), so it never receives the log.
    let added = one.add_node(2, intruder_addr, Duration::from_secs(2)).await;
    assert!(added.is_err());
    assert!(log_of(&intruder).is_empty());
    assert!(intruder.auth_failures() >= 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_whose_address_accepts_and_closes_is_retried_with_backoff() {
    // Member 3's address answers (a proxy whose target is down, another
    // program on a reused port) but closes every connection at once.
    let dir = tempfile::tempdir().unwrap();
    let closer = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let mut members: BTreeMap<u64, String> =
        (1..=2).map(|i| (i, free_addr().to_string())).collect();
    members.insert(3, closer.local_addr().unwrap().to_string());
    let accepted = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = accepted.clone();
    std::thread::spawn(move || {
        for stream in closer.incoming() {
            counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            drop(stream);
        }
    });
    let mut nodes = Vec::new();
    for id in 1..=2 {
        nodes.push(
            Consensus::start(config(id, dir.path(), &members, "s3cret"))
                .await
                .unwrap(),
        );
    }
    // Two of three: a leader, and the log commits.
    nodes[0]
        .propose(ddl("with_two", 1), Duration::from_secs(20))
        .await
        .unwrap();
    wait_for("the leader tries member 3", || {
        accepted.load(std::sync::atomic::Ordering::SeqCst) > 0
    })
    .await;
    // Over two seconds of heartbeats (every 50 ms), the leader tries the
    // member a few times, not thousands.
    let before = accepted.load(std::sync::atomic::Ordering::SeqCst);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let tries = accepted.load(std::sync::atomic::Ordering::SeqCst) - before;
    assert!(tries < 100, "{tries} connections to member 3 in 2 s");
    // And the two go on committing.
    nodes[1]
        .propose(ddl("still_two", 2), Duration::from_secs(10))
        .await
        .unwrap();
}

/// A certificate authority: its certificate in `dir/<name>.crt`, and a
/// function writing certificates it signs (for 127.0.0.1) with their keys.
struct Authority {
    path: std::path::PathBuf,
    cert: rcgen::Certificate,
    key: rcgen::KeyPair,
}

impl Authority {
    fn new(dir: &Path, name: &str) -> Authority {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        let path = dir.join(format!("{name}.crt"));
        std::fs::write(&path, cert.pem()).unwrap();
        Authority { path, cert, key }
    }

    /// TLS material for a node named `node`, signed by this authority.
    fn tls_for(&self, dir: &Path, node: &str) -> chorus_consensus::RaftTls {
        let params = rcgen::CertificateParams::new(vec!["127.0.0.1".to_owned()]).unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.cert, &self.key).unwrap();
        let (cert_path, key_path) = (
            dir.join(format!("{node}.crt")),
            dir.join(format!("{node}.key")),
        );
        std::fs::write(&cert_path, cert.pem()).unwrap();
        std::fs::write(&key_path, key.serialize_pem()).unwrap();
        chorus_consensus::RaftTls::from_pem_files(&cert_path, &key_path, &self.path).unwrap()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn members_talk_over_tls_and_refuse_whoever_the_cluster_ca_did_not_sign() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Authority::new(dir.path(), "ca");
    let mut members: BTreeMap<u64, String> = BTreeMap::new();
    for id in 1..=3 {
        members.insert(id, free_addr().to_string());
    }
    let mut nodes = Vec::new();
    for id in 1..=3 {
        let mut c = config(id, dir.path(), &members, "s3cret");
        c.tls = Some(ca.tls_for(dir.path(), &format!("n{id}")));
        nodes.push(Consensus::start(c).await.unwrap());
    }
    // Proposals through every member commit, in one order everywhere.
    for (i, node) in nodes.iter().enumerate() {
        node.propose(ddl(&format!("t{i}"), i as u64 + 1), Duration::from_secs(20))
            .await
            .unwrap();
    }
    wait_for("every member has the three entries", || {
        nodes.iter().all(|n| log_of(n).len() == 3)
    })
    .await;
    assert_eq!(log_of(&nodes[0]), log_of(&nodes[2]));

    // Knowing the secret is not enough without TLS, nor with a certificate
    // from another authority.
    let other = Authority::new(dir.path(), "other-ca");
    let foreign = other.tls_for(dir.path(), "intruder");
    let own = ca.tls_for(dir.path(), "admin");
    for (tls, what) in [(None, "in the clear"), (Some(&foreign), "another CA")] {
        let refused = chorus_consensus::admin_request(
            &members[&1],
            "s3cret",
            tls,
            None,
            Some(9),
            Duration::from_secs(5),
        )
        .await;
        let refused = refused.unwrap_err();
        if tls.is_some() {
            assert!(refused.contains("certificate"), "{what}: {refused}");
        }
    }
    // (The member counts a refusal once its side of the handshake ends.)
    wait_for("both refusals counted", || nodes[0].auth_failures() >= 2).await;
    // With the cluster's CA and the secret, the admin command is heard
    // (removing a node that is not a member is answered, not refused).
    let answered = chorus_consensus::admin_request(
        &members[&1],
        "s3cret",
        Some(&own),
        None,
        Some(9),
        Duration::from_secs(10),
    )
    .await;
    assert_eq!(answered.as_deref(), Ok("node 9 removed"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_secret_rotates_while_members_accept_the_old_and_the_new_one() {
    let dir = tempfile::tempdir().unwrap();
    let mut members: BTreeMap<u64, String> = BTreeMap::new();
    for id in 1..=3 {
        members.insert(id, free_addr().to_string());
    }
    // Mid-rotation: node 2 proves itself with the new secret already,
    // nodes 1 and 3 still with the old; each accepts the other one.
    let mut nodes = Vec::new();
    for id in 1..=3 {
        let (proves, accepts) = if id == 2 {
            ("new", "old")
        } else {
            ("old", "new")
        };
        let mut c = config(id, dir.path(), &members, proves);
        c.also_accepted = vec![accepts.to_owned()];
        nodes.push(Consensus::start(c).await.unwrap());
    }
    for (i, node) in nodes.iter().enumerate() {
        node.propose(ddl(&format!("r{i}"), i as u64 + 1), Duration::from_secs(20))
            .await
            .unwrap();
    }
    wait_for("every member has the three entries", || {
        nodes.iter().all(|n| log_of(n).len() == 3)
    })
    .await;
    assert_eq!(log_of(&nodes[0]), log_of(&nodes[1]));
    assert!(nodes.iter().all(|n| n.auth_failures() == 0));
    // A third secret is still refused.
    let refused = chorus_consensus::admin_request(
        &members[&1],
        "other",
        None,
        None,
        Some(9),
        Duration::from_secs(5),
    )
    .await
    .unwrap_err();
    assert!(refused.contains("secret"), "{refused}");
}
