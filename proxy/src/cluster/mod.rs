//! The parts of a node that make the backends one cluster. (Being moved
//! here from the flat `proxy/src` as they are rewritten.)

pub mod databases;
pub mod ddl;
pub mod lane;
pub mod replication;
