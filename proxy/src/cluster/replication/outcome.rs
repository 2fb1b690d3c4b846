//! What became of the changes an apply wrote, as typed values.
//!
//! Inside the apply SQL each change's result is a short text
//! (`applied`, `duplicate`, `truncated`, or `<kind>:<resolution>`);
//! the apply's query turns a batch's into rows of (kind, resolution,
//! changes), one row per pair (`outcomes_of`), and they are read here
//! once.
//! A change applied cleanly has no kind.

use std::fmt;

use super::ReplicationError;

/// What a change met on the peer: a conflict (the first seven, and
/// `Unique`, see `chorus.conflict_kind` and `chorus.write_row_resolving`),
/// or why it was skipped. The names are `chorus.conflict.kind`'s.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    InsertInsert,
    UpdateUpdate,
    UpdateDelete,
    DeleteDelete,
    UpdateMissing,
    DeleteMissing,
    InsertDelete,
    /// A secondary unique index held another row with the same value.
    Unique,
    /// The table is gone here (dropped by DDL ordered after the change).
    MissingTable,
    /// Made before a TRUNCATE of its table that this backend has had.
    Truncated,
    /// Older than every change applied here, and its key's tombstone is
    /// pruned (offered by reconciliation only).
    Pruned,
    /// The row does not fit this backend's schema of the table.
    SchemaMismatch,
    /// A replicated DDL statement failed here.
    DdlFailed,
}

impl Kind {
    /// Every kind, in the order of `chorus_conflicts_total`'s labels.
    pub const ALL: [Kind; 13] = [
        Kind::InsertInsert,
        Kind::UpdateUpdate,
        Kind::UpdateDelete,
        Kind::DeleteDelete,
        Kind::UpdateMissing,
        Kind::DeleteMissing,
        Kind::InsertDelete,
        Kind::Unique,
        Kind::MissingTable,
        Kind::Truncated,
        Kind::Pruned,
        Kind::SchemaMismatch,
        Kind::DdlFailed,
    ];

    /// The name the SQL and `chorus.conflict.kind` use.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::InsertInsert => "insert_insert",
            Kind::UpdateUpdate => "update_update",
            Kind::UpdateDelete => "update_delete",
            Kind::DeleteDelete => "delete_delete",
            Kind::UpdateMissing => "update_missing",
            Kind::DeleteMissing => "delete_missing",
            Kind::InsertDelete => "insert_delete",
            Kind::Unique => "unique",
            Kind::MissingTable => "missing_table",
            Kind::Truncated => "truncated",
            Kind::Pruned => "pruned",
            Kind::SchemaMismatch => "schema_mismatch",
            Kind::DdlFailed => "ddl_failed",
        }
    }

    fn parse(name: &str) -> Option<Kind> {
        Kind::ALL.into_iter().find(|k| k.as_str() == name)
    }
}

/// What became of a change.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Resolution {
    /// Written cleanly.
    Applied,
    /// Found applied already (the same version from the same origin).
    Duplicate,
    /// A TRUNCATE, run.
    Truncated,
    /// A conflict this change won: written.
    RemoteWins,
    /// A conflict the row held here won: not written.
    LocalWins,
    /// Not written (see its kind).
    Skipped,
}

impl Resolution {
    pub fn as_str(self) -> &'static str {
        match self {
            Resolution::Applied => "applied",
            Resolution::Duplicate => "duplicate",
            Resolution::Truncated => "truncated",
            Resolution::RemoteWins => "remote_wins",
            Resolution::LocalWins => "local_wins",
            Resolution::Skipped => "skipped",
        }
    }

    fn parse(name: &str) -> Option<Resolution> {
        [
            Resolution::Applied,
            Resolution::Duplicate,
            Resolution::Truncated,
            Resolution::RemoteWins,
            Resolution::LocalWins,
            Resolution::Skipped,
        ]
        .into_iter()
        .find(|r| r.as_str() == name)
    }
}

/// How many changes of an apply met `kind` and ended as `resolution`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Outcome {
    /// `None` for a change applied cleanly, a duplicate, a TRUNCATE.
    pub kind: Option<Kind>,
    pub resolution: Resolution,
    pub changes: usize,
}

impl Outcome {
    /// One row of `outcomes_of`: kind, resolution, changes. A name
    /// the SQL does not use here is an error (the SQL and this file
    /// disagree).
    pub fn from_row(
        kind: Option<&str>,
        resolution: &str,
        changes: i32,
    ) -> Result<Outcome, ReplicationError> {
        let unknown =
            || ReplicationError::Decoding(format!("unknown apply outcome {kind:?}:{resolution}"));
        Ok(Outcome {
            kind: match kind {
                None => None,
                Some(name) => Some(Kind::parse(name).ok_or_else(unknown)?),
            },
            resolution: Resolution::parse(resolution).ok_or_else(unknown)?,
            changes: usize::try_from(changes).unwrap_or(0),
        })
    }

    /// Whether these changes met a conflict or were skipped.
    pub fn is_conflict(&self) -> bool {
        self.kind.is_some()
    }
}

/// `kind:resolution`, or the resolution alone.
impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.kind {
            Some(kind) => write!(f, "{}:{}", kind.as_str(), self.resolution.as_str()),
            None => f.write_str(self.resolution.as_str()),
        }
    }
}

/// An apply's results (`results`, a SQL expression of its `text[]`) as
/// rows of (kind, resolution, changes), one per pair: a subquery to use
/// as a table. It is written out here rather than kept as a function of
/// the chorus schema so that a node asks it of a backend whose schema is
/// a release older just as well (a rolling upgrade applies to those).
pub(super) fn outcomes_of(results: &str) -> String {
    format!(
        "(SELECT nullif(split_part(r, ':', 1), r) AS kind, \
                 coalesce(nullif(split_part(r, ':', 2), ''), r) AS resolution, \
                 count(*)::integer AS changes \
            FROM unnest({results}) AS r GROUP BY r)"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every kind and resolution the apply SQL writes is one of ours, and
    /// every kind of ours is one the SQL writes.
    #[test]
    fn the_apply_sql_and_the_kinds_agree() {
        let sql = [
            include_str!("../../sql/apply.sql"),
            include_str!("../../sql/apply_statements.sql"),
        ]
        .concat();
        // 'kind:resolution' literals, and 'kind' literals the SQL joins
        // with ':resolution' or writes to chorus.conflict's kind.
        for kind in Kind::ALL {
            assert!(
                sql.contains(&format!("'{}", kind.as_str())),
                "{} is not in the apply SQL",
                kind.as_str()
            );
        }
        let mut rest = sql.as_str();
        while let Some(at) = [":skipped'", ":local_wins'", ":remote_wins'"]
            .iter()
            .filter_map(|p| rest.find(p))
            .min()
        {
            let start = rest[..at].rfind('\'').map_or(0, |s| s + 1);
            let name = &rest[start..at];
            if !name.is_empty() {
                assert!(Kind::parse(name).is_some(), "{name} is not a Kind");
            }
            rest = &rest[at + 1..];
        }
        for resolution in [
            "applied",
            "duplicate",
            "truncated",
            "remote_wins",
            "local_wins",
            "skipped",
        ] {
            assert!(Resolution::parse(resolution).is_some());
        }
    }

    #[test]
    fn every_counted_conflict_kind_is_a_kind() {
        for name in crate::metrics::CONFLICT_KINDS {
            assert!(Kind::parse(name).is_some(), "{name}");
        }
    }

    #[test]
    fn rows_become_outcomes_and_unknown_names_are_errors() {
        let o = Outcome::from_row(Some("insert_insert"), "remote_wins", 3).unwrap();
        assert_eq!(o.kind, Some(Kind::InsertInsert));
        assert_eq!(o.resolution, Resolution::RemoteWins);
        assert_eq!(o.changes, 3);
        assert_eq!(o.to_string(), "insert_insert:remote_wins");
        let clean = Outcome::from_row(None, "applied", 10).unwrap();
        assert!(!clean.is_conflict());
        assert_eq!(clean.to_string(), "applied");
        assert!(Outcome::from_row(Some("sideways"), "remote_wins", 1).is_err());
        assert!(Outcome::from_row(None, "maybe", 1).is_err());
    }
}
