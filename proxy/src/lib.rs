//! Chorus: a PostgreSQL wire-protocol proxy that turns several stock
//! PostgreSQL servers into one active-active database.
//!
//! Today a node is a transparent proxy to its home backend: clients
//! authenticate to the proxy, which logs in to the backend on their behalf
//! and relays the protocol as raw bytes, classifying statements on the way.

pub mod admin;
pub mod auth;
pub mod backend;
pub mod cancel;
pub mod capture;
pub mod cluster;
pub mod config;
pub mod ddl;
pub mod demo;
pub mod duties;
pub mod frontend;
pub mod localpg;
pub mod metrics;
pub mod protocol;
pub mod reconcile;
pub mod replication;
pub mod scope;
pub mod sequences;
pub mod server;
pub mod session;
pub mod stamp;
pub mod walstream;
