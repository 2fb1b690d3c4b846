//! The `[cluster]` TOML the harness writes for its nodes.

use std::path::Path;

/// Free ports for the Raft RPC of `n` nodes.
pub fn raft_ports(n: usize) -> Vec<u16> {
    (0..n)
        .map(|_| chorus_proxy::localpg::free_port().unwrap())
        .collect()
}

/// The `[cluster]` section of node `id` (from 1) of a cluster whose nodes'
/// Raft RPC listens on `ports`, with its log under `dir`. Short election
/// timeouts: tests stop leaders. Heartbeats at the default 100 ms, as an
/// AppendEntries call must answer within one heartbeat, and a loaded CI
/// machine can take longer than 50 ms.
pub fn cluster_toml(dir: &Path, id: usize, ports: &[u16], secret: &str) -> String {
    let members: Vec<(usize, u16)> = ports.iter().enumerate().map(|(m, &p)| (m + 1, p)).collect();
    cluster_toml_via(
        dir,
        id,
        ports[id - 1],
        &members,
        secret,
        "election_timeout_min_ms = 300\nelection_timeout_max_ms = 600\n",
    )
}

/// The `[cluster]` section of node `id`, whose Raft RPC listens on
/// `listen`, naming `members` (each id and the port it is reached at: a
/// relay in front of it, or its own listen port), with `extra` settings.
pub fn cluster_toml_via(
    dir: &Path,
    id: usize,
    listen: u16,
    members: &[(usize, u16)],
    secret: &str,
    extra: &str,
) -> String {
    let mut toml = format!(
        "[cluster]\nraft_listen = \"127.0.0.1:{listen}\"\nsecret = \"{secret}\"\n\
         data_dir = \"{}\"\nheartbeat_ms = 100\n{extra}\n",
        dir.join(format!("raft{id}")).display()
    );
    for (id, port) in members {
        toml.push_str(&format!(
            "[[cluster.members]]\nid = {id}\nraft = \"127.0.0.1:{port}\"\n"
        ));
    }
    toml
}
