//! The slow path of classification: a full `sqlparser` parse, for
//! statements whose first keyword does not settle what they do.

use std::ops::ControlFlow;

use sqlparser::ast::{Expr, Query, SetExpr, Statement, Visit, Visitor};
use sqlparser::dialect::PostgreSqlDialect;
use sqlparser::parser::Parser;

use crate::StatementClass;

/// Functions that write large objects when called from a query.
pub const LARGE_OBJECT_WRITERS: &[&str] = &[
    "lo_creat",
    "lo_create",
    "lo_import",
    "lo_unlink",
    "lo_put",
    "lo_from_bytea",
    "lo_truncate",
    "lo_truncate64",
    "lowrite",
];

/// Functions that change data or sequences when called from a query.
fn writing_function(name: &str) -> bool {
    ["nextval", "setval"]
        .iter()
        .chain(LARGE_OBJECT_WRITERS)
        .any(|f| name.eq_ignore_ascii_case(f))
}

/// Parse one statement and classify it from its syntax tree.
///
/// A statement that does not parse is `Unknown`; the proxy forwards it
/// untouched and lets PostgreSQL judge it.
pub(crate) fn classify_parsed(statement: &str) -> StatementClass {
    let Ok(statements) = Parser::parse_sql(&PostgreSqlDialect {}, statement) else {
        return StatementClass::Unknown;
    };
    statements
        .iter()
        .map(classify_statement)
        .max()
        .unwrap_or(StatementClass::Session)
}

fn classify_statement(statement: &Statement) -> StatementClass {
    match statement {
        Statement::Query(_) => {
            let mut finder = EffectFinder::default();
            let _ = statement.visit(&mut finder);
            finder.class()
        }
        Statement::Explain {
            analyze,
            statement,
            options,
            ..
        } => {
            // Only EXPLAIN ANALYZE runs the statement, spelled either
            // `EXPLAIN ANALYZE …` or `EXPLAIN (ANALYZE [true|on|1], …) …`.
            let analyze_option = options.iter().flatten().any(|option| {
                option.name.value.eq_ignore_ascii_case("analyze")
                    && option.arg.as_ref().is_none_or(|arg| {
                        let arg = arg.to_string();
                        !["false", "off", "0"]
                            .iter()
                            .any(|no| arg.trim_matches('\'').eq_ignore_ascii_case(no))
                    })
            });
            if *analyze || analyze_option {
                classify_statement(statement).max(StatementClass::Read)
            } else {
                StatementClass::Read
            }
        }
        Statement::Insert(_)
        | Statement::Update(_)
        | Statement::Delete(_)
        | Statement::Merge(_)
        | Statement::Truncate(_)
        | Statement::Lock(_)
        | Statement::Call(_) => StatementClass::Write,
        Statement::Copy { to, .. } => {
            if *to {
                StatementClass::Read
            } else {
                StatementClass::Write
            }
        }
        // Anything else that reaches the slow path got here for a reason the
        // keyword table could not settle; be conservative.
        _ => StatementClass::Unknown,
    }
}

/// Walks a query's tree looking for anything that makes it more than a read.
#[derive(Default)]
struct EffectFinder {
    writes: bool,
    creates_table: bool,
}

impl EffectFinder {
    fn class(&self) -> StatementClass {
        if self.creates_table {
            StatementClass::Ddl
        } else if self.writes {
            StatementClass::Write
        } else {
            StatementClass::Read
        }
    }
}

impl Visitor for EffectFinder {
    type Break = ();

    fn pre_visit_statement(&mut self, statement: &Statement) -> ControlFlow<()> {
        // Data-modifying statements nested in a query: writable CTEs.
        if matches!(
            statement,
            Statement::Insert(_)
                | Statement::Update(_)
                | Statement::Delete(_)
                | Statement::Merge(_)
        ) {
            self.writes = true;
        }
        ControlFlow::Continue(())
    }

    fn pre_visit_query(&mut self, query: &Query) -> ControlFlow<()> {
        if !query.locks.is_empty() {
            // SELECT … FOR UPDATE / FOR SHARE takes row locks: it must run
            // where writes run.
            self.writes = true;
        }
        if let SetExpr::Select(select) = query.body.as_ref() {
            if select.into.is_some() {
                self.creates_table = true;
            }
        }
        ControlFlow::Continue(())
    }

    fn pre_visit_expr(&mut self, expr: &Expr) -> ControlFlow<()> {
        if let Expr::Function(function) = expr {
            let name = function.name.to_string();
            let base = name.rsplit('.').next().unwrap_or(&name).trim_matches('"');
            if writing_function(base) {
                self.writes = true;
            }
        }
        ControlFlow::Continue(())
    }
}
