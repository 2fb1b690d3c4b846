//! Chorus: a PostgreSQL wire-protocol proxy that turns several stock
//! PostgreSQL servers into one active-active database.
//!
//! Clients authenticate to a node, which logs in to a backend on their
//! behalf and relays the protocol as raw bytes, classifying statements and
//! stamping writes on the way; capture on each backend and the node's
//! replication streams carry every change to the other backends, and the
//! nodes order DDL through Raft. docs/architecture.md is the map.

pub mod auth;
pub mod backend;
pub mod backoff;
pub mod cluster;
pub mod config;
pub mod demo;
pub mod lane;
pub mod localpg;
pub mod metrics;
pub mod node;
pub mod ops;
pub mod scope;
pub mod server;
pub mod session;
pub mod wire;
