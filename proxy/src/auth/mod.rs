//! Client authentication by the proxy: pg_hba-like rules pick a method per
//! user, database and client address; SCRAM-SHA-256 (RFC 5802/7677, as
//! PostgreSQL speaks it), md5 and trust are supported.
//!
//! `rules.rs` picks the method, `scram.rs` and `md5.rs` check the password.

use std::net::IpAddr;

use thiserror::Error;

use crate::config::{AuthMethod, Config};

mod md5;
mod rules;
mod scram;

pub use md5::verify_md5;
pub use rules::find_rule;
pub use scram::{ScramServer, ScramVerifier};

/// Why a login failed. Each variant maps to the SQLSTATE PostgreSQL uses.
#[derive(Debug, Error)]
pub enum AuthError {
    #[error("password authentication failed for user \"{0}\"")]
    PasswordFailed(String),
    #[error("no authentication rule allows host \"{address}\", user \"{user}\", database \"{database}\"")]
    NoRule {
        address: IpAddr,
        user: String,
        database: String,
    },
    #[error("authentication rejected for user \"{0}\" by rule")]
    Rejected(String),
    #[error("malformed SCRAM message: {0}")]
    Scram(&'static str),
    #[error("invalid stored password for user \"{0}\"")]
    BadVerifier(String),
}

impl AuthError {
    /// The SQLSTATE reported to the client.
    pub fn sqlstate(&self) -> &'static str {
        match self {
            AuthError::PasswordFailed(_) | AuthError::Scram(_) | AuthError::BadVerifier(_) => {
                "28P01"
            }
            AuthError::NoRule { .. } | AuthError::Rejected(_) => "28000",
        }
    }
}

/// Decide which method applies; errors when no rule matches or the rule rejects.
pub fn method_for(
    config: &Config,
    user: &str,
    database: &str,
    address: IpAddr,
) -> Result<AuthMethod, AuthError> {
    let rule = find_rule(config, user, database, address).ok_or_else(|| AuthError::NoRule {
        address,
        user: user.to_owned(),
        database: database.to_owned(),
    })?;
    if rule.method == AuthMethod::Reject {
        return Err(AuthError::Rejected(user.to_owned()));
    }
    Ok(rule.method)
}

/// Whether two byte strings are equal, in time that does not depend on
/// where they differ.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}
