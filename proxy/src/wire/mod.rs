//! The PostgreSQL wire protocol as the proxy handles it: framing, the
//! messages it decodes or builds itself, and errors (`protocol`), and what
//! it tracks of a client's messages (`frontend`: statements and portals,
//! statement classes, what a batch will run).

pub mod frontend;
pub mod protocol;
