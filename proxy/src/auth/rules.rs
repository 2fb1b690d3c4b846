//! pg_hba-like rules: the first rule that matches the user, database and
//! client address picks the authentication method.

use std::net::IpAddr;

use crate::config::{AuthRule, Config};

/// Pick the rule for a connection: the first rule that matches wins.
pub fn find_rule<'a>(
    config: &'a Config,
    user: &str,
    database: &str,
    address: IpAddr,
) -> Option<&'a AuthRule> {
    config.auth.iter().find(|rule| {
        matches_name(&rule.user, user)
            && matches_name(&rule.database, database)
            && rule
                .address
                .as_ref()
                .is_none_or(|net| net.contains(&normalize(address)))
    })
}

fn matches_name(pattern: &str, name: &str) -> bool {
    pattern == "all" || pattern.split(',').any(|p| p.trim() == name)
}

/// IPv4-mapped IPv6 addresses compare as IPv4.
fn normalize(address: IpAddr) -> IpAddr {
    match address {
        IpAddr::V6(v6) => v6
            .to_ipv4_mapped()
            .map(IpAddr::V4)
            .unwrap_or(IpAddr::V6(v6)),
        v4 => v4,
    }
}
