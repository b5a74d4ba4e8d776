//! Helpers every SQL backend shares.

use crate::codec::Format;
use crate::error::{Action, BoxError, Error, Result};
use crate::store::{Dialect, TableSpec};

/// One row of [`Dialect::layout_query`]: name, primary key (`"1"`), type, collation.
pub(crate) type Column = (String, String, String, String);

/// Checks an existing table's columns, as the layout query lists them, against what
/// the map needs: `key` and `value`, `key` alone the primary key, column types that
/// hold the codecs' output, and (MySQL) a key column that compares bytes exactly.
pub(crate) fn check_layout(
    t: &TableSpec,
    d: Dialect,
    backend: &'static str,
    cols: &[Column],
) -> Result<()> {
    check_columns(
        t,
        backend,
        cols.iter().map(|(n, pk, ..)| (n.as_str(), pk == "1")),
    )?;
    let refuse = |reason: String| {
        Err(Error::Schema {
            table: t.name.clone(),
            backend,
            reason,
        })
    };
    for (name, _, ty, collation) in cols {
        let (format, is_key) = match name.to_ascii_lowercase().as_str() {
            "key" => (t.key_format, true),
            "value" => (t.value_format, false),
            _ => continue,
        };
        let ty = ty.to_ascii_lowercase();
        match d {
            Dialect::Postgres => {
                let fits = match format {
                    Format::Text => {
                        ["text", "character varying", "character"].contains(&ty.as_str())
                    }
                    Format::Binary => ty == "bytea",
                };
                if !fits {
                    let kind = if format == Format::Text {
                        "text"
                    } else {
                        "binary"
                    };
                    return refuse(format!(
                        "its column {name:?} has type {ty}, which does not hold the {kind} \
                         codec's output; open it with a codec of the column's kind"
                    ));
                }
            }
            Dialect::Mysql if is_key => {
                let exact = ty == "varbinary"
                    || collation.ends_with("_nopad_bin")
                    || collation.ends_with("_0900_bin");
                if !exact {
                    return refuse(format!(
                        "its key column is {ty} with collation {collation:?}, which compares keys \
                         ignoring case or trailing spaces, so distinct keys could collide; \
                         use a VARBINARY key column"
                    ));
                }
            }
            _ => {}
        }
    }
    Ok(())
}

/// MySQL: refuses a table whose engine ignores transactions.
#[cfg(any(feature = "mysql", feature = "odbc"))]
pub(crate) fn check_engine(
    t: &TableSpec,
    backend: &'static str,
    engine: Option<String>,
) -> Result<()> {
    match engine {
        Some(engine) if !engine.eq_ignore_ascii_case("InnoDB") => Err(Error::Schema {
            table: t.name.clone(),
            backend,
            reason: format!(
                "it uses the {engine} engine, which ignores transactions; \
                 convert it with ALTER TABLE … ENGINE=InnoDB"
            ),
        }),
        _ => Ok(()),
    }
}

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
fn check_columns<'a>(
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

/// The error of a store that lost a connection it was given and cannot make anew.
#[cfg(any(feature = "postgres", feature = "mysql", feature = "odbc"))]
pub(crate) fn cannot_reconnect(table: &Option<TableSpec>, backend: &'static str) -> Error {
    Error::Database {
        action: Action::Connect,
        table: table.as_ref().map(|t| t.name.clone()).unwrap_or_default(),
        backend,
        source: "the connection is lost, and the map was given a connection rather than a URL, \
                 so it cannot make a new one; open the map again with a new connection"
            .into(),
    }
}

/// Bytes per multi-row statement: well under MariaDB's default 16 MiB
/// `max_allowed_packet`, whatever the number of rows.
#[cfg(any(feature = "mysql", feature = "odbc"))]
const CHUNK_BYTES: usize = 4 << 20;

/// Splits `items` into runs of at most `rows` items and about `CHUNK_BYTES` (a single
/// item larger than that is a run of its own).
#[cfg(any(feature = "mysql", feature = "odbc"))]
pub(crate) fn chunks<T>(
    items: &[T],
    rows: usize,
    size: impl Fn(&T) -> usize,
) -> impl Iterator<Item = &[T]> {
    let mut rest = items;
    std::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        let (mut bytes, mut n) = (0, 0);
        while n < rest.len() && n < rows && (n == 0 || bytes + size(&rest[n]) <= CHUNK_BYTES) {
            bytes += size(&rest[n]);
            n += 1;
        }
        let (head, tail) = rest.split_at(n);
        rest = tail;
        Some(head)
    })
}

#[cfg(all(test, any(feature = "mysql", feature = "odbc")))]
mod tests {
    use super::*;

    #[test]
    fn chunks_bound_rows_and_bytes() {
        let rows: Vec<usize> = vec![1; 600];
        let sizes: Vec<usize> = chunks(&rows, 256, |r| *r).map(<[usize]>::len).collect();
        assert_eq!(sizes, [256, 256, 88]);
        let big = vec![3 << 20; 3];
        let sizes: Vec<usize> = chunks(&big, 256, |r| *r).map(<[usize]>::len).collect();
        assert_eq!(sizes, [1, 1, 1]);
    }
}
