//! Helpers every SQL backend shares: opening a table (look it up, create it only when
//! absent, check what was found), error helpers and batch chunking.

use crate::codec::Format;
use crate::error::{Action, BoxError, Error, Result};
use crate::store::dialect::Marks;
use crate::store::{Dialect, TableSpec};

/// A SQLite column's type affinity, from its declared type by SQLite's own rules
/// (<https://sqlite.org/datatype3.html#determination_of_column_affinity>).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Affinity {
    Integer,
    Text,
    Blob,
    Real,
    Numeric,
}

impl Affinity {
    pub(crate) fn of(declared: &str) -> Affinity {
        let t = declared.to_ascii_uppercase();
        if t.contains("INT") {
            Affinity::Integer
        } else if ["CHAR", "CLOB", "TEXT"].iter().any(|s| t.contains(s)) {
            Affinity::Text
        } else if t.contains("BLOB") || t.trim().is_empty() {
            Affinity::Blob
        } else if ["REAL", "FLOA", "DOUB"].iter().any(|s| t.contains(s)) {
            Affinity::Real
        } else {
            Affinity::Numeric
        }
    }
}

/// One row of [`Dialect::layout_query`]: name, primary key (`"1"`), type, collation.
pub(crate) type Column = (String, String, String, String);

/// One row of [`Dialect::unique_indexes_query`]: name, primary (`"1"`), the indexed
/// columns joined by commas, and how the key is compared (collation or prefix length).
pub(crate) type UniqueIndex = (String, String, String, String);

/// The few catalog statements opening a table needs, over any backend's connection.
pub(crate) trait Catalog {
    /// Runs a query whose columns are text or bytes (numbers cast to text), with
    /// `param` bound to its one placeholder when given; NULL reads as `None`.
    fn rows(&mut self, sql: &str, param: Option<&str>) -> Result<Vec<Vec<Field>>, BoxError>;

    /// Runs a statement that returns no rows, with `param` bound to its one
    /// placeholder when given.
    fn exec_with(&mut self, sql: &str, param: Option<&str>) -> Result<(), BoxError>;

    /// Runs a statement that returns no rows.
    fn exec(&mut self, sql: &str) -> Result<(), BoxError> {
        self.exec_with(sql, None)
    }

    /// [`rows`](Self::rows) read as text; NULL reads as an empty string.
    fn texts(&mut self, sql: &str, param: Option<&str>) -> Result<Vec<Vec<String>>, BoxError> {
        Ok(as_texts(self.rows(sql, param)?))
    }
}

/// Rows of fields read as text; NULL reads as an empty string.
pub(crate) fn as_texts(rows: Vec<Vec<Field>>) -> Vec<Vec<String>> {
    rows.into_iter()
        .map(|row| {
            row.into_iter()
                .map(|f| f.map_or_else(String::new, |b| String::from_utf8_lossy(&b).into_owned()))
                .collect()
        })
        .collect()
}

/// One field of a [`Catalog::rows`] row: its bytes, or `None` for NULL.
pub(crate) type Field = Option<Vec<u8>>;

/// Opens `t` through `conn`: refuses a name the backend cannot hold, looks the table
/// up, creates it only when it is absent (so a user who may only read and write an
/// existing table, or a read-only session, can open it), and checks what it found.
/// Says whether it made the table (it was absent), so that a later refusal of the
/// same open (coherence that cannot be installed) can take it away again.
pub(crate) fn open_table(
    conn: &mut dyn Catalog,
    t: &TableSpec,
    d: Dialect,
    marks: Marks,
    backend: &'static str,
) -> Result<bool> {
    d.check_table_name(&t.name)?;
    let fail = |e| db_error(Action::Open, t, backend, e);
    if hidden_by_temporary(conn, t, d, marks) {
        return Err(Error::Schema {
            table: t.name.clone(),
            backend,
            reason: "a temporary table of the same name hides it on this connection, so the \
                     map's writes would go there and a fresh open would not see them; drop the \
                     temporary table or hand over another connection"
                .into(),
        });
    }
    let param = d.layout_param(t);
    let mut cols = columns(
        conn.texts(&d.layout_query(marks), Some(&param))
            .map_err(fail)?,
    );
    let made = cols.is_empty();
    if cols.is_empty() {
        // Another connection may make the table at the same moment (PostgreSQL then
        // fails one of two `CREATE TABLE IF NOT EXISTS`): what counts is that it exists.
        let created = conn.exec(&d.create_table(t));
        cols = columns(
            conn.texts(&d.layout_query(marks), Some(&param))
                .map_err(fail)?,
        );
        if cols.is_empty() {
            created.map_err(fail)?;
        }
    }
    if let Some(sql) = d.relation_kind_query(marks) {
        let kind = conn.texts(&sql, Some(&param)).map_err(fail)?;
        check_relation(t, backend, kind.into_iter().next().unwrap_or_default())?;
    }
    if let Some(sql) = d.engine_query(marks) {
        let engine = conn.texts(&sql, Some(&t.name)).map_err(fail)?;
        check_engine(
            t,
            backend,
            engine.into_iter().next().and_then(|r| r.into_iter().next()),
        )?;
    }
    let indexes: Vec<UniqueIndex> = conn
        .texts(&d.unique_indexes_query(marks), Some(&param))
        .map_err(fail)?
        .into_iter()
        .map(quad)
        .collect();
    // SQLite STRICT tables store values as declared, and refuse what does not fit.
    let strict = d == Dialect::Sqlite
        && conn
            .texts(
                &format!(
                    "SELECT CAST(strict AS TEXT) FROM pragma_table_list WHERE name = {} \
                     AND schema = 'main'",
                    d.mark(marks, 1)
                ),
                Some(&param),
            )
            .ok()
            .and_then(|rows| rows.into_iter().next())
            .and_then(|row| row.into_iter().next())
            .is_some_and(|s| s.trim() == "1");
    check_layout(t, d, backend, &cols, &indexes, strict)?;
    check_slice(conn, t, d, marks, &cols).map_err(|e| match e {
        Ok(reason) => Error::Slice {
            table: t.name.clone(),
            reason,
        },
        Err(e) => fail(e),
    })?;
    let unwritable = conn
        .texts(&d.unwritable_columns_query(marks), Some(&param))
        .map_err(fail)?;
    check_writable_columns(t, d, backend, unwritable)?;
    Ok(made)
}

/// Checks that a slice is one range of the key column's index, in byte order (the
/// range's bounds are bytes): `Err(Ok(reason))` refuses it. SQLite's statements compare
/// `BINARY` and MySQL's key column is binary; a PostgreSQL text key must sort as bytes
/// do (`C`), or the keys that start with one prefix are spread over its index.
fn check_slice(
    conn: &mut dyn Catalog,
    t: &TableSpec,
    d: Dialect,
    marks: Marks,
    cols: &[Column],
) -> std::result::Result<(), std::result::Result<String, BoxError>> {
    let Some(prefix) = &t.key_prefix else {
        return Ok(());
    };
    if d != Dialect::Postgres || t.key_format != Format::Text {
        return Ok(());
    }
    if prefix.contains(&0) {
        return Err(Ok(
            "its prefix holds the NUL character, which PostgreSQL text cannot \
                       hold, so no key could start with it"
                .into(),
        ));
    }
    let Some((name, ..)) = cols.iter().find(|(n, ..)| n == "key") else {
        return Ok(());
    };
    // By what the collation is, not by its name (an ICU collation may be called
    // `posix`): its provider and locale, the database's for the default one.
    let sql = format!(
        "SELECT CASE WHEN c.collprovider = 'd' \
         THEN coalesce(to_jsonb(d) ->> 'datlocprovider', 'c') ELSE c.collprovider::text END, \
         CASE WHEN c.collprovider = 'd' THEN d.datcollate::text \
         ELSE coalesce(c.collcollate::text, '') END, \
         CASE WHEN c.collprovider = 'd' THEN 'the database''s default, ' || d.datcollate::text \
         ELSE c.collname::text END \
         FROM pg_attribute a JOIN pg_collation c ON c.oid = a.attcollation, pg_database d \
         WHERE a.attrelid = to_regclass(CAST({} AS text)) AND a.attname = 'key' \
         AND d.datname = current_database()",
        d.mark(marks, 1)
    );
    let rows = conn.texts(&sql, Some(&d.layout_param(t))).map_err(Err)?;
    let Some([provider, locale, collation]) = rows
        .into_iter()
        .next()
        .and_then(|row| <[String; 3]>::try_from(row).ok())
    else {
        return Ok(());
    };
    // Byte order: libc's "C" and "POSIX" (`ucs_basic` is "C" too), and glibc's
    // C.UTF-8 (code points, which UTF-8 keeps).
    let bytewise = provider == "c"
        && ["c", "posix", "c.utf-8", "c.utf8"].contains(&locale.to_ascii_lowercase().as_str());
    if bytewise {
        return Ok(());
    }
    Err(Ok(format!(
        "its key column {name:?} sorts by the collation {collation:?}, a language's order, \
         in which the keys that start with one prefix are not one range of its index; a \
         slice reads a range in byte order: give the column the \"C\" collation (ALTER TABLE \
         … ALTER COLUMN key TYPE text COLLATE \"C\", as the tables this crate makes have)"
    )))
}

/// Refuses a table on which every write of the map would fail: a column besides
/// `key` and `value` that must be given a value (NOT NULL, no default), or a `key` or
/// `value` column the database computes.
fn check_writable_columns(
    t: &TableSpec,
    d: Dialect,
    backend: &'static str,
    unwritable: Vec<Vec<String>>,
) -> Result<()> {
    for row in unwritable {
        let (name, what) = (
            row.first().cloned().unwrap_or_default(),
            row.get(1).cloned().unwrap_or_default(),
        );
        let ours = match d {
            Dialect::Postgres => name == "key" || name == "value",
            _ => name.eq_ignore_ascii_case("key") || name.eq_ignore_ascii_case("value"),
        };
        let reason = match (what.as_str(), ours) {
            ("generated", _) => format!(
                "its column {name:?} is generated (computed by the database), so the map \
                 cannot write it and every write would fail; make it a plain column, or \
                 give the map another table"
            ),
            ("required", false) => format!(
                "its column {name:?} is NOT NULL without a default, and the map writes only \
                 `key` and `value`, so every insert would fail; give {name:?} a DEFAULT or \
                 allow NULL in it"
            ),
            _ => continue,
        };
        return Err(Error::Schema {
            table: t.name.clone(),
            backend,
            reason,
        });
    }
    Ok(())
}

/// PostgreSQL: refuses a relation whose rows a crash loses (UNLOGGED) or that the
/// map cannot read and write consistently (inheritance children, which `COPY` of the
/// parent leaves out while `DELETE` and `count(*)` take them in). Partitioned tables are
/// fine: they are read through a query.
fn check_relation(t: &TableSpec, backend: &'static str, kind: Vec<String>) -> Result<()> {
    let refuse = |reason: String| {
        Err(Error::Schema {
            table: t.name.clone(),
            backend,
            reason,
        })
    };
    let field = |i: usize| kind.get(i).map(String::as_str).unwrap_or("");
    if field(0) == "u" {
        return refuse(
            "it is UNLOGGED: a crash of the server empties it, so writes the map acknowledged \
             would be lost; make it durable (ALTER TABLE … SET LOGGED) or use another table"
                .into(),
        );
    }
    if field(3) == "true" {
        return refuse(
            "its primary key is DEFERRABLE, which INSERT … ON CONFLICT cannot use, so every \
             write would fail; make it NOT DEFERRABLE (ALTER TABLE … ALTER CONSTRAINT … NOT \
             DEFERRABLE)"
                .into(),
        );
    }
    let children: u64 = field(2).trim().parse().unwrap_or(0);
    if children > 0 {
        return refuse(format!(
            "{children} table(s) inherit from it: their rows are part of it for DELETE and \
             count(*) but not for the map's reads, so `remove` or `clear` would delete rows \
             the map never showed; use a table without inheritance children (declarative \
             partitioning works)"
        ));
    }
    Ok(())
}

/// Whether a temporary table of the table's name exists on this connection (it would
/// take the statements). MySQL lists no temporary table in its catalog, but says
/// `CREATE TEMPORARY TABLE` when asked to show one.
fn hidden_by_temporary(conn: &mut dyn Catalog, t: &TableSpec, d: Dialect, marks: Marks) -> bool {
    match d.temporary_query(marks) {
        Some(sql) => conn
            .texts(&sql, Some(&d.layout_param(t)))
            .ok()
            .and_then(|rows| rows.into_iter().next())
            .and_then(|row| row.into_iter().next())
            .is_some_and(|n| n.trim() != "0"),
        None => conn
            .texts(&format!("SHOW CREATE TABLE {}", d.quote(&t.name)), None)
            .ok()
            .and_then(|rows| rows.into_iter().next())
            .and_then(|row| row.into_iter().nth(1))
            .is_some_and(|ddl| ddl.trim_start().starts_with("CREATE TEMPORARY")),
    }
}

fn quad(mut r: Vec<String>) -> (String, String, String, String) {
    r.resize(4, String::new());
    let d = r.pop().unwrap_or_default();
    let c = r.pop().unwrap_or_default();
    let b = r.pop().unwrap_or_default();
    (r.pop().unwrap_or_default(), b, c, d)
}

fn columns(rows: Vec<Vec<String>>) -> Vec<Column> {
    rows.into_iter().map(quad).collect()
}

/// Checks an existing table against what the map needs: `key` and `value` columns,
/// `key` alone and whole the primary key and the only unique index, a key column that
/// compares bytes exactly, and column types that give back exactly what was written.
pub(crate) fn check_layout(
    t: &TableSpec,
    d: Dialect,
    backend: &'static str,
    cols: &[Column],
    indexes: &[UniqueIndex],
    strict: bool,
) -> Result<()> {
    let refuse = |reason: String| {
        Err(Error::Schema {
            table: t.name.clone(),
            backend,
            reason,
        })
    };
    // SQLite and MySQL never distinguish column names by case; PostgreSQL does, and
    // the statements name `key` and `value` quoted, in lower case.
    let is = |name: &str, wanted: &str| match d {
        Dialect::Postgres => name == wanted,
        _ => name.eq_ignore_ascii_case(wanted),
    };
    let find = |wanted: &str| cols.iter().find(|(n, ..)| is(n, wanted));
    let (Some(key), Some(value)) = (find("key"), find("value")) else {
        let found: Vec<&str> = cols.iter().map(|(n, ..)| n.as_str()).collect();
        return refuse(format!(
            "it has columns {found:?}, not `key` and `value` (in lower case); \
             choose another table name"
        ));
    };
    let pk: Vec<&str> = cols
        .iter()
        .filter(|(_, pk, ..)| pk == "1")
        .map(|(n, ..)| n.as_str())
        .collect();
    if pk.len() != 1 || !is(pk[0], "key") {
        return refuse(format!(
            "its primary key is {pk:?}, not (`key`), so a key could be stored twice; \
             add PRIMARY KEY (key) or choose another table name"
        ));
    }
    for (name, primary, columns, compared) in indexes {
        let exact = compared.is_empty() || compared.eq_ignore_ascii_case("binary");
        let primary = primary == "1";
        // Another unique index on exactly the whole key, compared exactly, is only a
        // second copy of the primary key: it cannot match another row.
        if !is(columns, "key") && !primary {
            return refuse(format!(
                "it has another unique index, {name:?} on ({columns}), which an upsert could \
                 hit instead of the primary key, so a write could change another row; \
                 drop that index (a plain index is fine) or choose another table name"
            ));
        }
        if !is(columns, "key") {
            return refuse(format!(
                "its primary key covers ({columns}), not exactly (`key`); \
                 make PRIMARY KEY (key) or choose another table name"
            ));
        }
        if !exact {
            let what = if primary {
                "its primary key".to_string()
            } else {
                format!("its unique index {name:?}")
            };
            let why = if compared.bytes().all(|b| b.is_ascii_digit()) {
                format!(
                    "covers only the first {compared} characters of `key`, so keys that \
                     share them collide"
                )
            } else if d == Dialect::Postgres {
                format!("compares keys with the nondeterministic collation {compared}")
            } else {
                format!("compares keys with the collation {compared}, not byte for byte")
            };
            let remedy = if primary {
                "make the whole `key` column the primary key, compared exactly"
            } else {
                "drop that index (the primary key already keeps keys unique)"
            };
            return refuse(format!(
                "{what} {why}; {remedy} (see the README, \"Tables and connections users \
                 bring\")"
            ));
        }
    }
    check_column(t, d, backend, key, t.key_format, true, strict)?;
    check_column(t, d, backend, value, t.value_format, false, strict)
}

/// Checks that a column holds the codec's output and gives it back unchanged, and for
/// the key that it compares bytes exactly.
fn check_column(
    t: &TableSpec,
    d: Dialect,
    backend: &'static str,
    (name, _, ty, collation): &Column,
    format: Format,
    is_key: bool,
    strict: bool,
) -> Result<()> {
    let ty = ty.to_ascii_lowercase();
    let what = if is_key { "key" } else { "value" };
    let kind = match format {
        Format::Text => "text",
        Format::Binary => "binary",
    };
    let problem: Option<String> =
        match d {
            // A STRICT table keeps a value only in a column of its own type (or ANY, which
            // keeps anything as given): text in TEXT, bytes in BLOB.
            Dialect::Sqlite if strict => {
                match (format, ty.as_str()) {
                    (_, "any") | (Format::Text, "text") | (Format::Binary, "blob") => None,
                    _ => {
                        Some(format!(
                "has type {ty} in a STRICT table, which refuses the {kind} codec's output \
                 there; declare it {} (or ANY), or use a {} codec",
                if format == Format::Text { "TEXT" } else { "BLOB" },
                if format == Format::Text { "binary" } else { "text" },
            ))
                    }
                }
            }
            Dialect::Sqlite => match Affinity::of(&ty) {
                Affinity::Text | Affinity::Blob => None,
                other => Some(format!(
                    "has type {ty:?}, of {other:?} affinity: SQLite turns text that looks like a \
                 number into a number (\"007\" comes back as 7); declare it TEXT or BLOB"
                )),
            },
            Dialect::Postgres => match (format, ty.as_str()) {
                (_, ty) if ty == "character" || ty.starts_with("character(") => Some(
                    "is char(n), which pads with spaces (\"a\" and \"a \" are one key, values \
                 come back padded); use text or varchar"
                        .into(),
                ),
                (_, ty) if ty.starts_with("character varying(") => Some(format!(
                    "is {ty}, whose length limit PostgreSQL enforces by silently cutting trailing \
                 spaces (\"abc \" would be stored as \"abc\"); use text or varchar without a \
                 length"
                )),
                (Format::Text, "text" | "character varying") | (Format::Binary, "bytea") => {
                    if is_key && collation.ends_with("(nondeterministic)") {
                        Some(format!(
                            "uses the nondeterministic collation {:?}, under which distinct keys \
                         are equal; use COLLATE \"C\"",
                            collation.trim_end_matches(" (nondeterministic)")
                        ))
                    } else {
                        None
                    }
                }
                (_, "json" | "jsonb") => Some(format!(
                    "is {ty}, which gives JSON back rewritten ({}), not as the codec wrote \
                     it, so no codec reads back what it wrote; make it text (ALTER TABLE … \
                     ALTER COLUMN … TYPE text) and keep the Json codec",
                    if ty == "jsonb" {
                        "members reordered, duplicates and spaces dropped"
                    } else {
                        "checked, and served as text only through a cast"
                    }
                )),
                (_, "text" | "character varying") => Some(format!(
                    "has type {ty}, which does not hold the {kind} codec's output; open it \
                     with a text codec (Json, Text)"
                )),
                (_, "bytea") => Some(format!(
                    "has type {ty}, which does not hold the {kind} codec's output; open it \
                     with a binary codec (Bytes, Postcard)"
                )),
                _ => Some(format!(
                    "has type {ty}, which holds neither text nor bytes as written; make it \
                     text (for the Json and Text codecs) or bytea (for binary codecs)"
                )),
            },
            Dialect::Mysql => mysql_column_problem(&ty, collation, format, is_key),
        };
    match problem {
        None => Ok(()),
        Some(reason) => Err(Error::Schema {
            table: t.name.clone(),
            backend,
            reason: format!("its {what} column {name:?} {reason}"),
        }),
    }
}

fn mysql_column_problem(ty: &str, collation: &str, format: Format, is_key: bool) -> Option<String> {
    let text = matches!(
        ty,
        "varchar" | "tinytext" | "text" | "mediumtext" | "longtext"
    );
    let bytes = matches!(
        ty,
        "varbinary" | "tinyblob" | "blob" | "mediumblob" | "longblob"
    );
    if is_key {
        // Not even VARCHAR with a byte-exact collation: past its length, MySQL cuts
        // trailing spaces with a mere note, in strict mode too ("abc " becomes "abc").
        return (ty != "varbinary").then(|| {
            format!(
                "is {ty} with collation {collation:?}: text key columns compare ignoring case \
                 or trailing spaces, pad, or cut trailing spaces past their length, so distinct \
                 keys could collide; use a VARBINARY key column"
            )
        });
    }
    if text && ty != "longtext" {
        return Some(format!(
            "is {ty}, whose length MySQL enforces by silently cutting trailing spaces (in \
             strict mode too), so a value may not come back as written; use LONGTEXT (or a \
             binary type)"
        ));
    }
    if ty == "char" || ty == "binary" {
        return Some(format!(
            "is {ty}(n), which pads or strips trailing spaces, so values do not come back as \
             written; use LONGTEXT or LONGBLOB"
        ));
    }
    // A character set that cannot hold a character is an error in strict mode, which
    // the map's sessions use, not a silent change: other character sets are fine.
    match format {
        Format::Text if text || bytes => None,
        Format::Binary if bytes => None,
        _ => Some(format!(
            "has type {ty}, which does not hold the codec's output; use LONGTEXT \
             CHARACTER SET utf8mb4 for text codecs or LONGBLOB for binary ones"
        )),
    }
}

/// MySQL: refuses a table whose engine ignores transactions.
fn check_engine(t: &TableSpec, backend: &'static str, engine: Option<String>) -> Result<()> {
    match engine {
        Some(engine) if engine.trim().is_empty() => Err(Error::Schema {
            table: t.name.clone(),
            backend,
            reason: "it is a view, not a table; open the table the view shows".into(),
        }),
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

/// SQLite: a key stored as the other kind than the key codec writes (text 'a' and the
/// blob X'61' are two values there), which the map's writes would never match.
#[cfg(any(feature = "sqlite", feature = "odbc"))]
pub(crate) fn wrong_key_kind(t: &TableSpec, row: &[u8]) -> Error {
    let (stored, codec) = match t.key_format {
        Format::Text => ("bytes (a BLOB)", "text"),
        Format::Binary => ("text", "binary"),
    };
    Error::Decode {
        what: "key",
        table: t.name.clone(),
        row: crate::error::show_bytes(row),
        source: format!(
            "the key is stored as {stored} but the key codec is {codec}, so the map's writes \
             would never match it; open the table with a codec of the kind that wrote it"
        )
        .into(),
    }
}

/// Checks that the statements wrote every row they were given: a trigger or rule of the
/// table may drop one silently (SQLite's `RAISE(IGNORE)`, PostgreSQL's `DO INSTEAD
/// NOTHING`, a `BEFORE` trigger returning NULL), and then the table would not hold what
/// memory does.
#[cfg(any(feature = "sqlite", feature = "postgres", feature = "odbc"))]
/// A connection unused for this long is checked (one round trip) before the next
/// write: a firewall, a proxy or the server may have closed it (an idle timeout, a
/// KILL, a restart), and a write sent on it would have an unknown outcome, where a
/// failed check leaves nothing in doubt and a URL store reconnects. Writes closer
/// together than this pay nothing.
#[cfg(any(feature = "postgres", feature = "mysql"))]
pub(crate) const IDLE_CHECK: std::time::Duration = std::time::Duration::from_millis(100);

/// Connects again after a connection was lost, trying for up to `window`, with a pause
/// that grows from 50 ms to 1 s: a server that restarts, or a cluster that fails over,
/// is waited for, so that a call fails only when the server stays away. An error that
/// `passing` does not call passing (a refused login, a missing database) fails at once.
#[cfg(any(feature = "postgres", feature = "mysql"))]
pub(crate) fn redial<C>(
    window: std::time::Duration,
    mut dial: impl FnMut() -> Result<C>,
    passing: impl Fn(&Error) -> bool,
) -> Result<C> {
    let started = std::time::Instant::now();
    let mut pause = std::time::Duration::from_millis(50);
    loop {
        match dial() {
            Err(e) if passing(&e) && started.elapsed() + pause < window => {
                tracing::debug!(error = %e, "no server to reconnect to yet; trying again");
                std::thread::sleep(pause);
                pause = (pause * 2).min(std::time::Duration::from_secs(1));
            }
            other => return other,
        }
    }
}

pub(crate) fn all_rows_written(written: u64, given: usize) -> Result<(), BoxError> {
    if written >= given as u64 {
        return Ok(());
    }
    Err(Box::new(crate::error::Dropped(format!(
        "the table took {written} of the {given} rows written: a trigger or rule of the table \
         dropped the others; nothing of this write was kept"
    ))))
}

/// Deletes a rule or trigger of the table dropped: `kept` of the `asked` rows (or, for
/// a clear, rows) are still there after the DELETE. The map would drop keys the table
/// keeps, so the write is refused (and rolled back where it is a transaction).
pub(crate) fn deletes_kept(kept: usize, asked: Option<usize>) -> BoxError {
    let what = match asked {
        Some(asked) => format!("{kept} of the {asked} rows to delete are"),
        None => format!("{kept} rows are"),
    };
    Box::new(crate::error::Dropped(format!(
        "{what} still in the table after the DELETE: a rule or trigger of the table dropped \
         the deletion (a soft-delete rule, a BEFORE DELETE trigger that returns NULL, \
         RAISE(IGNORE)); the map would drop keys the table keeps, so nothing of this write \
         was kept; give the map a table whose DELETE deletes"
    )))
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

/// Bytes per multi-row statement at most: well under MariaDB's default 16 MiB
/// `max_allowed_packet`, whatever the number of rows; less on a server whose packet is
/// smaller (see [`Dialect::chunk_bytes`]).
#[cfg(any(feature = "mysql", feature = "odbc"))]
pub(crate) const CHUNK_BYTES: usize = 4 << 20;

/// Splits `items` into runs of at most `rows` items and about `max_bytes` (a single
/// item larger than that is a run of its own).
#[cfg(any(feature = "mysql", feature = "odbc"))]
pub(crate) fn chunks<T>(
    items: &[T],
    rows: usize,
    max_bytes: usize,
    size: impl Fn(&T) -> usize,
) -> impl Iterator<Item = &[T]> {
    let mut rest = items;
    std::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        let (mut bytes, mut n) = (0, 0);
        while n < rest.len() && n < rows && (n == 0 || bytes + size(&rest[n]) <= max_bytes) {
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
        let sizes: Vec<usize> = chunks(&rows, 256, CHUNK_BYTES, |r| *r)
            .map(<[usize]>::len)
            .collect();
        assert_eq!(sizes, [256, 256, 88]);
        let big = vec![3 << 20; 3];
        let sizes: Vec<usize> = chunks(&big, 256, CHUNK_BYTES, |r| *r)
            .map(<[usize]>::len)
            .collect();
        assert_eq!(sizes, [1, 1, 1]);
        let mid = vec![20_000; 100];
        let sizes: Vec<usize> = chunks(&mid, 256, 100_000, |r| *r)
            .map(<[usize]>::len)
            .collect();
        assert_eq!(sizes, [5; 20]);
    }
}
