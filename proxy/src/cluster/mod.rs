//! The parts of a node that make the backends one cluster: the backend
//! SQL's capture of changes (`capture`), the streams that carry them to
//! every other backend (`replication`), the DDL log ordered through Raft
//! (`ddl`), the databases created and dropped through it (`databases`;
//! each replicated database's state on the node is a lane, lane/), which
//! node drives which backend's streams (`duties`), global
//! sequences (`sequences`), the last-writer-wins repair of differing
//! rows (`reconcile`) and the copy of a backend again from a peer while
//! the cluster takes writes (`rejoin`).

pub mod capture;
pub mod databases;
pub mod ddl;
pub mod duties;
pub mod reconcile;
pub mod rejoin;
pub mod replication;
pub mod sequences;
