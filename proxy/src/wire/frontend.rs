//! The client messages the relay acts on, decoded from their raw bodies:
//! Query, Parse, Bind, Execute, Close, Sync, FunctionCall and Terminate.
//! Pure and synchronous, so it is unit-tested and fuzzed on its own.

use chorus_router::{
    classify, classify_query, ddl_route, first_keyword, DdlRoute, QuerySummary, StatementClass,
};
use rustc_hash::FxHashMap;

use crate::wire::protocol::{read_cstr, ProtocolError};

/// Message types [`FrontendState::on_message`] needs to see whole; every
/// other client message is forwarded without being looked at.
#[inline]
pub fn is_inspected(tag: u8) -> bool {
    matches!(
        tag,
        b'Q' | b'P' | b'B' | b'D' | b'E' | b'C' | b'H' | b'S' | b'F' | b'X'
    )
}

/// Whether a statement of this class may change data or schema, so that
/// its transaction is stamped with the node's clock.
#[inline]
pub fn stamps(class: StatementClass) -> bool {
    matches!(
        class,
        StatementClass::Write | StatementClass::Ddl | StatementClass::Unknown
    )
}

/// Whether a simple query string holds a statement that [`stamps`].
pub fn query_stamps(summary: &QuerySummary) -> bool {
    [
        StatementClass::Write,
        StatementClass::Ddl,
        StatementClass::Unknown,
    ]
    .iter()
    .any(|c| summary.counts[c.index()] > 0)
}

/// What a client message means to the relay.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FrontendEvent {
    /// A simple-protocol query: its statements, by class. A ReadyForQuery
    /// will answer it.
    Query(QuerySummary),
    /// Execute of a portal whose statement has this class.
    Execute(StatementClass),
    /// Parse of a statement of this class.
    Parsed(StatementClass),
    /// Sync or FunctionCall: a ReadyForQuery will answer it.
    AwaitsReady,
    /// Another extended-protocol message (Parse, Bind, Describe, Close,
    /// Flush) that needs no action.
    Extended,
    /// The client is leaving.
    Terminate,
    /// Nothing to act on.
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
    /// The text of prepared statements (by name, "" the unnamed one) and
    /// portals that replicate through the DDL log (roles, grants on
    /// databases, …): few, and needed whole when they run.
    log_statements: FxHashMap<String, String>,
    log_portals: FxHashMap<String, String>,
}

/// What [`FrontendState::batch_log_statements`] finds in a batch.
#[derive(Default)]
struct LogScan {
    /// The statements of the DDL log's kind it executes.
    run: Vec<String>,
    /// Its Execute messages.
    executes: u32,
    /// Whether its last message before the Sync (or the end of what is
    /// buffered) is an Execute.
    execute_last: bool,
    /// Whether its Sync is buffered.
    synced: bool,
}

/// The text of a statement if it replicates through the DDL log.
/// (Every Parse comes here: its first word settles most of them before
/// any classification.)
fn log_text(sql: &str) -> Option<String> {
    let (word, _) = first_keyword(sql)?;
    let may_be = [
        "CREATE", "ALTER", "DROP", "GRANT", "REVOKE", "COMMENT", "SECURITY", "REASSIGN",
    ]
    .iter()
    .any(|w| word.eq_ignore_ascii_case(w));
    (may_be && classify(sql) == StatementClass::Ddl && ddl_route(sql) == DdlRoute::Log)
        .then(|| sql.to_owned())
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

    /// Whether an extended-protocol batch that starts with this message
    /// (not yet decoded) writes: looks at it and at the complete messages
    /// after it in `rest`, up to the batch's Sync. A batch longer than what
    /// has arrived is judged by what has.
    pub fn batch_stamps(&self, tag: u8, body: &[u8], rest: &[u8]) -> bool {
        self.batch_has(tag, body, rest, stamps)
    }

    /// How many inspected messages of the batch starting with this one (up
    /// to its Sync) are buffered now: those the batch's start is judged on.
    pub fn batch_buffered(tag: u8, rest: &[u8]) -> u32 {
        let mut count = 1;
        if matches!(tag, b'S' | b'Q' | b'F' | b'X') {
            return count;
        }
        let mut rest = rest;
        while let Some((tag, _)) = next_message(&mut rest) {
            if is_inspected(tag) {
                count += 1;
            }
            if matches!(tag, b'S' | b'Q' | b'F' | b'X') {
                break;
            }
        }
        count
    }

    /// Whether the batch starting with this message (up to its Sync, among
    /// the messages already buffered) runs a statement of a class `wanted`
    /// accepts.
    pub fn batch_has(
        &self,
        tag: u8,
        body: &[u8],
        rest: &[u8],
        wanted: impl Fn(StatementClass) -> bool,
    ) -> bool {
        let stamps = &wanted;
        let mut parsed_unnamed = None;
        // Portals this batch binds: their Bind was judged, and what an
        // earlier batch bound under the same name does not matter.
        let mut bound: Vec<&str> = Vec::new();
        let mut message = Some((tag, body));
        let mut rest = rest;
        while let Some((tag, body)) = message {
            let writes = match tag {
                b'P' => parse_message(body).is_ok_and(|(name, sql)| {
                    let class = classify(&sql);
                    if name.is_empty() {
                        parsed_unnamed = Some(class);
                    }
                    stamps(class)
                }),
                b'B' => two_cstrs(body, "Bind").is_ok_and(|(portal, statement)| {
                    bound.push(portal);
                    let class = if statement.is_empty() && parsed_unnamed.is_some() {
                        parsed_unnamed
                    } else {
                        self.statement(statement)
                    };
                    class.is_some_and(stamps)
                }),
                b'E' => read_cstr(body).is_ok_and(|(portal, _)| {
                    !bound.contains(&portal) && self.portal(portal).is_some_and(stamps)
                }),
                b'S' | b'Q' | b'F' | b'X' => return false,
                _ => false,
            };
            if writes {
                return true;
            }
            message = next_message(&mut rest);
        }
        false
    }

    /// The statements of the DDL log's kind that the extended-protocol
    /// batch starting with this message executes (looking as
    /// [`FrontendState::batch_has`] does), by their text.
    pub fn batch_log_statements(&self, tag: u8, body: &[u8], rest: &[u8]) -> Vec<String> {
        self.scan_log(tag, body, rest).run
    }

    /// The statement of the DDL log's kind that the extended-protocol batch
    /// starting with this message runs as its whole work: the batch is
    /// buffered up to its Sync, its one Execute (the last message before
    /// the Sync) runs that statement, and its other messages only parse,
    /// bind, describe or close. Chorus can then run it as it runs one sent
    /// as a simple query (see `session::client`).
    pub fn batch_log_run(&self, tag: u8, body: &[u8], rest: &[u8]) -> Option<String> {
        let scan = self.scan_log(tag, body, rest);
        let mut run = scan.run;
        (scan.synced && scan.executes == 1 && scan.execute_last && run.len() == 1)
            .then(|| run.pop())
            .flatten()
    }

    fn scan_log(&self, tag: u8, body: &[u8], rest: &[u8]) -> LogScan {
        let mut parsed: Vec<(&str, Option<String>)> = Vec::new();
        let mut bound: Vec<(&str, Option<String>)> = Vec::new();
        let mut scan = LogScan::default();
        let mut message = Some((tag, body));
        let mut rest = rest;
        while let Some((tag, body)) = message {
            match tag {
                b'P' => {
                    if let Ok((name, sql)) = parse_message(body) {
                        parsed.push((name, log_text(&sql)));
                    }
                }
                b'B' => {
                    if let Ok((portal, statement)) = two_cstrs(body, "Bind") {
                        let text = match parsed.iter().rev().find(|(n, _)| *n == statement) {
                            Some((_, text)) => text.clone(),
                            None => self.log_statements.get(statement).cloned(),
                        };
                        bound.push((portal, text));
                    }
                }
                b'E' => {
                    scan.executes += 1;
                    if let Ok((portal, _)) = read_cstr(body) {
                        let text = match bound.iter().rev().find(|(p, _)| *p == portal) {
                            Some((_, text)) => text.clone(),
                            None => self.log_portals.get(portal).cloned(),
                        };
                        scan.run.extend(text);
                    }
                }
                b'S' => {
                    scan.synced = true;
                    break;
                }
                b'Q' | b'F' | b'X' => break,
                _ => {}
            }
            scan.execute_last = tag == b'E';
            message = next_message(&mut rest);
        }
        scan
    }

    /// Decode one inspected message body (after the 5-byte header).
    pub fn on_message(&mut self, tag: u8, body: &[u8]) -> Result<FrontendEvent, ProtocolError> {
        Ok(match tag {
            b'Q' => {
                let (sql, _) = crate::wire::protocol::read_sql(body)
                    .map_err(|_| ProtocolError::Malformed("Query"))?;
                FrontendEvent::Query(classify_query(&sql))
            }
            b'P' => {
                let (name, sql) = parse_message(body)?;
                let class = classify(&sql);
                if name.is_empty() {
                    self.unnamed_statement = Some(class);
                } else {
                    self.statements.insert(name.to_owned(), class);
                }
                match log_text(&sql) {
                    Some(text) => {
                        self.log_statements.insert(name.to_owned(), text);
                    }
                    None => {
                        self.log_statements.remove(name);
                    }
                }
                FrontendEvent::Parsed(class)
            }
            b'B' => {
                let (portal, statement) = two_cstrs(body, "Bind")?;
                let class = self.statement(statement);
                if portal.is_empty() {
                    self.unnamed_portal = class;
                } else if let Some(class) = class {
                    self.portals.insert(portal.to_owned(), class);
                }
                match self.log_statements.get(statement) {
                    Some(text) => {
                        self.log_portals.insert(portal.to_owned(), text.clone());
                    }
                    None => {
                        self.log_portals.remove(portal);
                    }
                }
                FrontendEvent::Extended
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
                match kind {
                    b'S' => self.log_statements.remove(name),
                    _ => self.log_portals.remove(name),
                };
                FrontendEvent::Extended
            }
            b'D' | b'H' => FrontendEvent::Extended,
            b'S' | b'F' => FrontendEvent::AwaitsReady,
            b'X' => FrontendEvent::Terminate,
            _ => FrontendEvent::Nothing,
        })
    }
}

/// The next complete message in `rest` (tag and body), advancing past it.
fn next_message<'a>(rest: &mut &'a [u8]) -> Option<(u8, &'a [u8])> {
    let header = rest.get(..5)?;
    let len = u32::from_be_bytes([header[1], header[2], header[3], header[4]]) as usize;
    let total = len.checked_add(1).filter(|&t| t >= 5)?;
    let message = rest.get(..total)?;
    *rest = &rest[total..];
    Some((message[0], &message[5..]))
}

/// Split two NUL-terminated strings off a message body.
fn two_cstrs<'a>(body: &'a [u8], what: &'static str) -> Result<(&'a str, &'a str), ProtocolError> {
    let (first, rest) = read_cstr(body).map_err(|_| ProtocolError::Malformed(what))?;
    let (second, _) = read_cstr(rest).map_err(|_| ProtocolError::Malformed(what))?;
    Ok((first, second))
}

/// A Parse's statement name and SQL text (in any client encoding, see
/// `protocol::read_sql`).
fn parse_message(body: &[u8]) -> Result<(&str, std::borrow::Cow<'_, str>), ProtocolError> {
    let (name, rest) = read_cstr(body).map_err(|_| ProtocolError::Malformed("Parse"))?;
    let (sql, _) =
        crate::wire::protocol::read_sql(rest).map_err(|_| ProtocolError::Malformed("Parse"))?;
    Ok((name, sql))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_batch_start_counts_what_is_buffered_up_to_its_sync() {
        let bind = message(b'B', b"\0\0\0\0\0\0\0\0");
        let execute = message(b'E', b"\0\0\0\0\0");
        let sync = message(b'S', b"");
        // Bind (the batch's first message), Execute, Sync, and the next
        // batch's Bind: three.
        let rest = [execute.clone(), sync, bind.clone()].concat();
        assert_eq!(FrontendState::batch_buffered(b'B', &rest), 3);
        // The Execute and half of the Sync buffered: the rest comes later.
        let rest = [execute, vec![b'S', 0, 0]].concat();
        assert_eq!(FrontendState::batch_buffered(b'B', &rest), 2);
        // A Sync alone is its own batch.
        assert_eq!(FrontendState::batch_buffered(b'S', &bind), 1);
    }

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

    fn message(tag: u8, body: &[u8]) -> Vec<u8> {
        let mut m = vec![tag];
        m.extend_from_slice(&(body.len() as u32 + 4).to_be_bytes());
        m.extend_from_slice(body);
        m
    }

    #[test]
    fn a_batch_writes_if_any_statement_before_its_sync_does() {
        let mut state = FrontendState::default();
        state
            .on_message(b'P', b"ins\0INSERT INTO t VALUES ($1)\0\0\0")
            .unwrap();
        state.on_message(b'P', b"sel\0SELECT 1\0\0\0").unwrap();
        let bind = |stmt: &str| format!("\0{stmt}\0\0\0\0\0\0\0").into_bytes();
        let execute = b"\0\0\0\0\0".to_vec();
        // Bind of a prepared write.
        assert!(state.batch_stamps(b'B', &bind("ins"), &message(b'E', &execute)));
        // A read, then a write later in the same batch.
        let mut rest = message(b'E', &execute);
        rest.extend(message(b'P', b"\0UPDATE t SET v = 1\0\0\0"));
        rest.extend(message(b'B', &bind("")));
        assert!(state.batch_stamps(b'B', &bind("sel"), &rest));
        // Reads only; a write after the Sync belongs to the next batch.
        let mut rest = message(b'E', &execute);
        rest.extend(message(b'S', b""));
        rest.extend(message(b'B', &bind("ins")));
        assert!(!state.batch_stamps(b'B', &bind("sel"), &rest));
        // A truncated next message is not looked into.
        let partial = &message(b'B', &bind("ins"))[..6];
        assert!(!state.batch_stamps(b'B', &bind("sel"), partial));
    }

    #[test]
    fn a_portal_bound_in_the_batch_is_judged_by_its_bind_not_an_earlier_one() {
        let mut state = FrontendState::default();
        state
            .on_message(b'P', b"mk\0CREATE TABLE t (id int)\0\0\0")
            .unwrap();
        state.on_message(b'P', b"sel\0SELECT 1\0\0\0").unwrap();
        // An earlier batch bound the unnamed portal to the DDL.
        state.on_message(b'B', b"\0mk\0\0\0\0\0\0\0").unwrap();
        let ddl = |c: StatementClass| c == StatementClass::Ddl;
        let execute = message(b'E', b"\0\0\0\0\0");
        // This one binds it to the read, then executes it.
        assert!(!state.batch_has(b'B', b"\0sel\0\0\0\0\0\0\0", &execute, ddl));
        // An Execute alone runs what was bound before.
        assert!(state.batch_has(b'E', b"\0\0\0\0\0", &[], ddl));
    }

    #[test]
    fn a_batch_names_the_ddl_log_statements_it_runs() {
        let mut state = FrontendState::default();
        state
            .on_message(b'P', b"role\0CREATE ROLE r\0\0\0")
            .unwrap();
        let execute = message(b'E', b"\0\0\0\0\0");
        // A statement prepared earlier, bound and run now.
        assert_eq!(
            state.batch_log_statements(b'B', b"\0role\0\0\0\0\0\0\0", &execute),
            vec!["CREATE ROLE r".to_owned()]
        );
        // Parsed, bound and run in the batch; a table's DDL is not of the kind.
        let mut rest = message(b'B', b"\0\0\0\0\0\0\0\0");
        rest.extend(message(b'E', b"\0\0\0\0\0"));
        assert_eq!(
            state.batch_log_statements(b'P', b"\0GRANT r TO postgres\0\0\0", &rest),
            vec!["GRANT r TO postgres".to_owned()]
        );
        assert!(state
            .batch_log_statements(b'P', b"\0CREATE TABLE t (id int)\0\0\0", &rest)
            .is_empty());
        // Only parsed: nothing runs.
        assert!(state
            .batch_log_statements(b'P', b"\0CREATE ROLE s\0\0\0", &message(b'S', b""))
            .is_empty());
    }

    #[test]
    fn a_batch_that_only_runs_one_ddl_log_statement_is_told_apart() {
        let mut state = FrontendState::default();
        state
            .on_message(b'P', b"role\0CREATE ROLE r\0\0\0")
            .unwrap();
        let bind = message(b'B', b"\0\0\0\0\0\0\0\0");
        let describe = message(b'D', b"P\0");
        let execute = message(b'E', b"\0\0\0\0\0");
        let sync = message(b'S', b"");
        let parse = b"\0CREATE DATABASE d\0\0\0";
        // Parse, Bind, Describe, Execute, Sync (JDBC, Npgsql).
        let rest = [
            bind.clone(),
            describe.clone(),
            execute.clone(),
            sync.clone(),
        ]
        .concat();
        assert_eq!(
            state.batch_log_run(b'P', parse, &rest),
            Some("CREATE DATABASE d".to_owned())
        );
        // A statement prepared in an earlier batch, bound and run now.
        let rest = [execute.clone(), sync.clone()].concat();
        assert_eq!(
            state.batch_log_run(b'B', b"\0role\0\0\0\0\0\0\0", &rest),
            Some("CREATE ROLE r".to_owned())
        );
        // Its Sync not here yet; something after the Execute; two
        // Executes; a table's DDL: not of the kind.
        let unsynced = [bind.clone(), execute.clone()].concat();
        assert_eq!(state.batch_log_run(b'P', parse, &unsynced), None);
        let after = [bind.clone(), execute.clone(), describe, sync.clone()].concat();
        assert_eq!(state.batch_log_run(b'P', parse, &after), None);
        let twice = [bind.clone(), execute.clone(), execute.clone(), sync.clone()].concat();
        assert_eq!(state.batch_log_run(b'P', parse, &twice), None);
        let table = [bind, execute, sync].concat();
        assert_eq!(
            state.batch_log_run(b'P', b"\0CREATE TABLE t (id int)\0\0\0", &table),
            None
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
        ] {
            assert!(state.on_message(tag, body).is_err(), "{:?}", tag as char);
        }
    }

    #[test]
    fn sql_in_a_client_encoding_other_than_utf8_is_classified() {
        // LATIN1 bytes (0xE9 is an e with an acute accent): not UTF-8.
        let mut state = FrontendState::default();
        match state.on_message(b'Q', b"INSERT INTO caf\xe9 VALUES ('\xe9t\xe9')\0") {
            Ok(FrontendEvent::Query(summary)) => {
                assert_eq!(summary.strongest, Some(StatementClass::Write));
            }
            other => panic!("{other:?}"),
        }
        let parsed = state.on_message(b'P', b"\0CREATE TABLE caf\xe9 (id int)\0\0\0");
        assert!(
            matches!(parsed, Ok(FrontendEvent::Parsed(StatementClass::Ddl))),
            "{parsed:?}"
        );
    }
}
