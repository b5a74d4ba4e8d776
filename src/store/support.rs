//! Helpers every SQL backend shares.

use crate::error::{Action, BoxError, Error, Result};
use crate::store::TableSpec;

/// A driver error during `action` on `table`.
pub(crate) fn db_error(
    action: Action,
    table: &TableSpec,
    backend: &'static str,
    source: impl Into<BoxError>,
) -> Error {
    Error::Database {
        action,
        table: table.name.clone(),
        backend,
        source: source.into(),
    }
}

/// The table a store was opened on, or an error for a store used before `open`.
pub(crate) fn opened<'a>(
    table: &'a Option<TableSpec>,
    backend: &'static str,
) -> Result<&'a TableSpec> {
    table.as_ref().ok_or_else(|| not_opened(backend))
}

pub(crate) fn not_opened(backend: &'static str) -> Error {
    Error::Schema {
        table: String::new(),
        backend,
        reason: "the store was used before `open`".into(),
    }
}

/// Checks that an existing table has `key` and `value` columns and that `key` alone
/// is its primary key, from `(column, is primary key)` pairs.
pub(crate) fn check_columns<'a>(
    t: &TableSpec,
    backend: &'static str,
    cols: impl Iterator<Item = (&'a str, bool)> + Clone,
) -> Result<()> {
    let has = |name: &str| cols.clone().any(|(n, _)| n.eq_ignore_ascii_case(name));
    let pk: Vec<&str> = cols.clone().filter(|(_, pk)| *pk).map(|(n, _)| n).collect();
    let refuse = |reason: String| {
        Err(Error::Schema {
            table: t.name.clone(),
            backend,
            reason,
        })
    };
    if !has("key") || !has("value") {
        let found: Vec<&str> = cols.map(|(n, _)| n).collect();
        return refuse(format!(
            "it has columns {found:?}, not `key` and `value`; choose another table name"
        ));
    }
    if pk.len() != 1 || !pk[0].eq_ignore_ascii_case("key") {
        return refuse(format!(
            "its primary key is {pk:?}, not (`key`), so a key could be stored twice; \
             add PRIMARY KEY (key) or choose another table name"
        ));
    }
    Ok(())
}
