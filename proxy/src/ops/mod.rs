//! What an operator runs against the cluster's backends from the command
//! line: administrative commands that act on every backend (`admin`), the
//! assessment of a database before adoption (`assess`), and the comparison
//! of the backends' rows (`check`); and what an operator reads from a node
//! over the wire, the admin console (`console`), with the copy of a backend
//! sent to it from the command line (`copy`).

pub mod admin;
pub mod assess;
pub mod check;
pub mod console;
pub mod copy;
