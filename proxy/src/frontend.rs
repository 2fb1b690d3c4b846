//! The client messages the relay acts on, decoded from their raw bodies:
//! Query, Parse, Bind, Execute, Close, Sync, FunctionCall and Terminate.
//! Pure and synchronous, so it is unit-tested and fuzzed on its own.

use chorus_router::{classify, classify_query, QuerySummary, StatementClass};
use rustc_hash::FxHashMap;

use crate::protocol::{read_cstr, ProtocolError};

/// Message types [`FrontendState::on_message`] needs to see whole; every
/// other client message is forwarded without being looked at.
#[inline]
pub fn is_inspected(tag: u8) -> bool {
    matches!(tag, b'Q' | b'P' | b'B' | b'E' | b'C' | b'S' | b'F' | b'X')
}

/// What a client message means to the relay.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FrontendEvent {
    /// A simple-protocol query: its statements, by class. A ReadyForQuery
    /// will answer it.
    Query(QuerySummary),
    /// Execute of a portal whose statement has this class.
    Execute(StatementClass),
    /// Sync or FunctionCall: a ReadyForQuery will answer it.
    AwaitsReady,
    /// The client is leaving.
    Terminate,
    /// Nothing to act on (Parse, Bind, Close bookkeeping).
    Nothing,
}

/// Per-session decoding state: the class of each prepared statement and
/// portal, so that Execute can be counted. Looked up on every Bind and
/// Execute, hence the cheap (not DoS-resistant) hasher: the keys come from
/// this session's own client and only affect this session.
#[derive(Debug, Default)]
pub struct FrontendState {
    unnamed_statement: Option<StatementClass>,
    statements: FxHashMap<String, StatementClass>,
    unnamed_portal: Option<StatementClass>,
    portals: FxHashMap<String, StatementClass>,
}

impl FrontendState {
    fn statement(&self, name: &str) -> Option<StatementClass> {
        if name.is_empty() {
            self.unnamed_statement
        } else {
            self.statements.get(name).copied()
        }
    }

    fn portal(&self, name: &str) -> Option<StatementClass> {
        if name.is_empty() {
            self.unnamed_portal
        } else {
            self.portals.get(name).copied()
        }
    }

    /// Decode one inspected message body (after the 5-byte header).
    pub fn on_message(&mut self, tag: u8, body: &[u8]) -> Result<FrontendEvent, ProtocolError> {
        Ok(match tag {
            b'Q' => {
                let (sql, _) = read_cstr(body).map_err(|_| ProtocolError::Malformed("Query"))?;
                FrontendEvent::Query(classify_query(sql))
            }
            b'P' => {
                let (name, sql) = two_cstrs(body, "Parse")?;
                let class = classify(sql);
                if name.is_empty() {
                    self.unnamed_statement = Some(class);
                } else {
                    self.statements.insert(name.to_owned(), class);
                }
                FrontendEvent::Nothing
            }
            b'B' => {
                let (portal, statement) = two_cstrs(body, "Bind")?;
                let class = self.statement(statement);
                if portal.is_empty() {
                    self.unnamed_portal = class;
                } else if let Some(class) = class {
                    self.portals.insert(portal.to_owned(), class);
                }
                FrontendEvent::Nothing
            }
            b'E' => {
                let (portal, _) =
                    read_cstr(body).map_err(|_| ProtocolError::Malformed("Execute"))?;
                FrontendEvent::Execute(self.portal(portal).unwrap_or(StatementClass::Unknown))
            }
            b'C' => {
                let (&kind, rest) = body
                    .split_first()
                    .ok_or(ProtocolError::Malformed("Close"))?;
                let (name, _) = read_cstr(rest).map_err(|_| ProtocolError::Malformed("Close"))?;
                match kind {
                    b'S' if name.is_empty() => self.unnamed_statement = None,
                    b'S' => {
                        self.statements.remove(name);
                    }
                    b'P' if name.is_empty() => self.unnamed_portal = None,
                    b'P' => {
                        self.portals.remove(name);
                    }
                    _ => return Err(ProtocolError::Malformed("Close")),
                }
                FrontendEvent::Nothing
            }
            b'S' | b'F' => FrontendEvent::AwaitsReady,
            b'X' => FrontendEvent::Terminate,
            _ => FrontendEvent::Nothing,
        })
    }
}

/// Split two NUL-terminated strings off a message body.
fn two_cstrs<'a>(body: &'a [u8], what: &'static str) -> Result<(&'a str, &'a str), ProtocolError> {
    let (first, rest) = read_cstr(body).map_err(|_| ProtocolError::Malformed(what))?;
    let (second, _) = read_cstr(rest).map_err(|_| ProtocolError::Malformed(what))?;
    Ok((first, second))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn execute_is_counted_by_the_class_of_its_statement() {
        let mut state = FrontendState::default();
        state
            .on_message(b'P', b"s1\0UPDATE t SET v = $1\0\0\0")
            .unwrap();
        state.on_message(b'P', b"\0SELECT 1\0\0\0").unwrap();
        state.on_message(b'B', b"\0s1\0\0\0\0\0\0\0").unwrap();
        assert_eq!(
            state.on_message(b'E', b"\0\0\0\0\0").unwrap(),
            FrontendEvent::Execute(StatementClass::Write)
        );
        state.on_message(b'B', b"cur\0\0\0\0\0\0\0\0").unwrap();
        assert_eq!(
            state.on_message(b'E', b"cur\0\0\0\0\0").unwrap(),
            FrontendEvent::Execute(StatementClass::Read)
        );
        state.on_message(b'C', b"Ss1\0").unwrap();
        state.on_message(b'B', b"\0s1\0\0\0\0\0\0\0").unwrap();
        assert_eq!(
            state.on_message(b'E', b"\0\0\0\0\0").unwrap(),
            FrontendEvent::Execute(StatementClass::Unknown)
        );
    }

    #[test]
    fn query_sync_and_terminate() {
        let mut state = FrontendState::default();
        let FrontendEvent::Query(summary) = state.on_message(b'Q', b"BEGIN; SELECT 1\0").unwrap()
        else {
            panic!("not a query");
        };
        assert_eq!(summary.statements(), 2);
        assert_eq!(
            state.on_message(b'S', b"").unwrap(),
            FrontendEvent::AwaitsReady
        );
        assert_eq!(
            state.on_message(b'X', b"").unwrap(),
            FrontendEvent::Terminate
        );
    }

    #[test]
    fn malformed_bodies_are_errors_not_panics() {
        let mut state = FrontendState::default();
        for (tag, body) in [
            (b'Q', &b"no terminator"[..]),
            (b'P', b"name-only\0"),
            (b'B', b""),
            (b'E', b"\xff"),
            (b'C', b""),
            (b'C', b"Zname\0"),
            (b'Q', b"\xff\xfe\0"),
        ] {
            assert!(state.on_message(tag, body).is_err(), "{:?}", tag as char);
        }
    }
}
