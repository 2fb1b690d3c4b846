//! What an operator runs against the cluster's backends from the command
//! line: administrative commands that act on every backend (`admin`), and
//! the assessment of a database before adoption (`assess`).

pub mod admin;
pub mod assess;
