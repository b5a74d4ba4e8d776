//! All SQL text of the crate: identifier quoting, placeholders, column types, the
//! upsert statement and the limits of each dialect. The backends only execute it.

use crate::codec::Format;
use crate::error::{Error, Result};
use crate::store::TableSpec;

/// A SQL dialect: what differs between databases in the statements this crate runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Dialect {
    /// SQLite 3.24 or later.
    Sqlite,
    /// PostgreSQL 9.5 or later.
    Postgres,
    /// MySQL 5.7 or later, MariaDB 10.3 or later.
    Mysql,
}

/// How bind parameters are written: the dialect's own way, or `?` as ODBC wants it
/// whatever the database behind the driver.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(not(feature = "odbc"), allow(dead_code))]
pub(crate) enum Marks {
    Native,
    Question,
}

/// PostgreSQL's identifier limit (NAMEDATALEN - 1); longer names are silently
/// truncated by the server, so two long names could become one table.
const PG_MAX_IDENT_BYTES: usize = 63;
/// MySQL's and MariaDB's identifier limit, in characters.
const MYSQL_MAX_IDENT_CHARS: usize = 64;
/// The longest table file name MySQL can make: 255 bytes less the `.frm` or `.ibd`.
const MYSQL_MAX_FILE_NAME: usize = 251;
/// The longest key PostgreSQL's btree can index uncompressed: 2704 bytes per index
/// tuple less the 8-byte tuple header and the 4-byte varlena header.
const PG_MAX_KEY_BYTES: usize = 2692;
/// InnoDB's largest index prefix, and the width of the `VARBINARY` key column.
const MYSQL_MAX_KEY_BYTES: usize = 3072;

/// PostgreSQL: the relations a statement on the table `oid` (an SQL expression) may
/// run row triggers on: the table, and every partition below it.
#[cfg_attr(not(any(feature = "postgres", feature = "odbc")), allow(dead_code))]
pub(crate) fn pg_table_and_partitions(oid: &str) -> String {
    format!("(SELECT {oid} UNION SELECT relid FROM pg_partition_tree({oid}))")
}

impl Dialect {
    /// The backend's name for messages.
    pub fn name(self) -> &'static str {
        match self {
            Dialect::Sqlite => "SQLite",
            Dialect::Postgres => "PostgreSQL",
            Dialect::Mysql => "MySQL/MariaDB",
        }
    }

    /// `name` quoted as an identifier, with the quote character doubled inside.
    ///
    /// ```
    /// use write_thru_hash::Dialect;
    /// assert_eq!(Dialect::Sqlite.quote("a\"b"), r#""a""b""#);
    /// assert_eq!(Dialect::Mysql.quote("key"), "`key`");
    /// ```
    pub fn quote(self, name: &str) -> String {
        let q = match self {
            Dialect::Sqlite | Dialect::Postgres => '"',
            Dialect::Mysql => '`',
        };
        let mut out = String::with_capacity(name.len() + 2);
        out.push(q);
        for c in name.chars() {
            if c == q {
                out.push(q);
            }
            out.push(c);
        }
        out.push(q);
        out
    }

    /// The `n`th (1-based) bind parameter.
    pub fn placeholder(self, n: usize) -> String {
        match self {
            Dialect::Sqlite => format!("?{n}"),
            Dialect::Postgres => format!("${n}"),
            Dialect::Mysql => "?".to_string(),
        }
    }

    /// The longest encoded key, in bytes, that the dialect's key column can index.
    pub fn max_key_len(self) -> Option<usize> {
        match self {
            Dialect::Sqlite => None,
            Dialect::Postgres => Some(PG_MAX_KEY_BYTES),
            Dialect::Mysql => Some(MYSQL_MAX_KEY_BYTES),
        }
    }

    pub(crate) fn mark(self, marks: Marks, n: usize) -> String {
        match marks {
            Marks::Native => self.placeholder(n),
            Marks::Question => "?".to_string(),
        }
    }

    /// MySQL only: the table's storage engine, from its name as the one parameter.
    #[cfg_attr(not(any(feature = "mysql", feature = "odbc")), allow(dead_code))]
    pub(crate) fn engine_query(self, marks: Marks) -> Option<String> {
        (self == Dialect::Mysql).then(|| {
            format!(
                "SELECT engine FROM information_schema.tables \
                 WHERE table_schema = database() AND table_name = {}",
                self.mark(marks, 1)
            )
        })
    }

    /// MySQL only: the query of the server's `max_allowed_packet`.
    #[cfg_attr(not(any(feature = "mysql", feature = "odbc")), allow(dead_code))]
    pub(crate) fn packet_query(self) -> Option<&'static str> {
        (self == Dialect::Mysql).then_some("SELECT CAST(@@max_allowed_packet AS CHAR)")
    }

    /// MySQL only: the session's autocommit and whether a transaction is open, as two
    /// texts (`1` or `0`). MariaDB has `@@in_transaction`; MySQL does not (error 1193).
    #[cfg_attr(not(any(feature = "mysql", feature = "odbc")), allow(dead_code))]
    pub(crate) fn session_state_query(self) -> &'static str {
        "SELECT CAST(@@autocommit AS CHAR), CAST(@@in_transaction AS CHAR)"
    }

    /// Statements that make a session one where every write is committed and stored as
    /// written, whatever the user's settings or the server's defaults: MySQL gets a mode
    /// of its own (strict, so a value that does not fit is an error rather than cut;
    /// and not EMPTY_STRING_IS_NULL, ORACLE, ...) and a COMMIT that ends a transaction
    /// rather than chaining a new one that the next write would stay inside.
    #[cfg_attr(not(any(feature = "mysql", feature = "odbc")), allow(dead_code))]
    pub(crate) fn session_setup(self) -> &'static [&'static str] {
        match self {
            Dialect::Mysql => &[
                "SET SESSION sql_mode = 'STRICT_ALL_TABLES,NO_ENGINE_SUBSTITUTION'",
                "SET SESSION completion_type = 'NO_CHAIN'",
            ],
            _ => &[],
        }
    }

    /// Statements that make the session's reads see every commit made before them on
    /// any node of a cluster: on a Galera node a read waits until the node has applied
    /// them (about 0.2 ms), so a refresh or load right after another node's commit
    /// finds it. Other MariaDB servers take it and change nothing; a server that does
    /// not know the setting (Oracle's MySQL: error 1193) goes without.
    #[cfg_attr(not(any(feature = "mysql", feature = "odbc")), allow(dead_code))]
    pub(crate) fn session_causal_reads(self) -> &'static [&'static str] {
        match self {
            Dialect::Mysql => &["SET SESSION wsrep_sync_wait = @@SESSION.wsrep_sync_wait | 1"],
            _ => &[],
        }
    }

    /// The bytes of keys and values one multi-row statement may carry in a packet of
    /// `packet` bytes, leaving room for the statement's text and the parameters'
    /// length prefixes.
    #[cfg_attr(not(any(feature = "mysql", feature = "odbc")), allow(dead_code))]
    pub(crate) fn chunk_bytes(self, packet: usize) -> usize {
        packet.saturating_sub(64 << 10).clamp(1, 4 << 20)
    }

    /// The longest value one statement can carry in a packet of `packet` bytes: the
    /// packet less the longest key and room for the statement's text.
    #[cfg_attr(not(any(feature = "mysql", feature = "odbc")), allow(dead_code))]
    pub(crate) fn max_value_len(self, packet: usize) -> usize {
        packet.saturating_sub(MYSQL_MAX_KEY_BYTES + 1024)
    }

    /// Refuses a table name the backend cannot hold exactly as given.
    pub fn check_table_name(self, name: &str) -> Result<()> {
        let refuse = |reason: &str| {
            Err(Error::InvalidTableName {
                name: name.to_string(),
                backend: self.name(),
                reason: reason.to_string(),
            })
        };
        if name.is_empty() {
            return refuse("the name is empty");
        }
        if name.contains('\0') {
            return refuse("the name contains a NUL character");
        }
        match self {
            Dialect::Sqlite => {
                if name
                    .as_bytes()
                    .get(..7)
                    .is_some_and(|p| p.eq_ignore_ascii_case(b"sqlite_"))
                {
                    return refuse("names starting with \"sqlite_\" are reserved by SQLite");
                }
            }
            Dialect::Postgres => {
                if name.len() > PG_MAX_IDENT_BYTES {
                    return refuse(&format!(
                        "it is {} bytes long and PostgreSQL keeps at most {PG_MAX_IDENT_BYTES} \
                         (it would silently truncate it)",
                        name.len()
                    ));
                }
            }
            Dialect::Mysql => {
                let chars = name.chars().count();
                if chars > MYSQL_MAX_IDENT_CHARS {
                    return refuse(&format!(
                        "it is {chars} characters long and MySQL allows at most \
                         {MYSQL_MAX_IDENT_CHARS}"
                    ));
                }
                if name.ends_with(' ') {
                    return refuse("MySQL does not allow names that end with a space");
                }
                let file = mysql_file_name_len(name);
                if file > MYSQL_MAX_FILE_NAME {
                    return refuse(&format!(
                        "MySQL keeps a table in files named after it, and this name takes \
                         {file} bytes there (a character other than a-z, A-Z, 0-9 and _ takes \
                         3 to 5), more than the {MYSQL_MAX_FILE_NAME} a file name can hold"
                    ));
                }
                if name.chars().any(|c| c as u32 > 0xFFFF) {
                    return refuse(
                        "MySQL allows only characters of the Basic Multilingual Plane \
                         (no emoji) in names",
                    );
                }
            }
        }
        Ok(())
    }

    fn column_type(self, format: Format, key: bool) -> &'static str {
        match (self, format, key) {
            (Dialect::Sqlite, Format::Text, _) => "TEXT",
            (Dialect::Sqlite, Format::Binary, _) => "BLOB",
            // "C" compares bytes, whatever the database's default collation.
            (Dialect::Postgres, Format::Text, true) => "TEXT COLLATE \"C\"",
            (Dialect::Postgres, Format::Text, false) => "TEXT",
            (Dialect::Postgres, Format::Binary, _) => "BYTEA",
            // A binary key column compares bytes exactly: the text collations fold case
            // and pad spaces, which would merge distinct keys.
            (Dialect::Mysql, _, true) => "VARBINARY(3072)",
            (Dialect::Mysql, Format::Text, false) => "LONGTEXT CHARACTER SET utf8mb4",
            (Dialect::Mysql, Format::Binary, false) => "LONGBLOB",
        }
    }

    /// `CREATE TABLE IF NOT EXISTS` for the table.
    pub fn create_table(self, t: &TableSpec) -> String {
        let engine = if self == Dialect::Mysql {
            " ENGINE=InnoDB"
        } else {
            ""
        };
        format!(
            "CREATE TABLE IF NOT EXISTS {} ({} {} NOT NULL, {} {} NOT NULL, PRIMARY KEY ({})){engine}",
            self.quote(&t.name),
            self.quote("key"),
            self.column_type(t.key_format, true),
            self.quote("value"),
            self.column_type(t.value_format, false),
            self.quote("key"),
        )
    }

    /// How many rows the table (or its slice) holds, as text (for drivers that read
    /// every column as bytes).
    #[cfg_attr(not(feature = "odbc"), allow(dead_code))]
    pub(crate) fn count_rows_text(self, t: &TableSpec) -> String {
        let text = if self == Dialect::Mysql {
            "CHAR"
        } else {
            "VARCHAR(20)"
        };
        format!(
            "SELECT CAST(count(*) AS {text}) FROM {}{}",
            self.quote(&t.name),
            self.in_slice(t)
        )
    }

    /// How many rows the table (or its slice) holds.
    pub(crate) fn count_rows(self, t: &TableSpec) -> String {
        format!(
            "SELECT count(*) FROM {}{}",
            self.quote(&t.name),
            self.in_slice(t)
        )
    }

    /// `SELECT key, value` of every row (of the slice, for a slice).
    pub fn select_all(self, t: &TableSpec) -> String {
        let columns = format!("{}, {}", self.quote("key"), self.quote("value"));
        format!(
            "SELECT {columns} FROM {}{}{}",
            self.quote(&t.name),
            self.in_slice(t),
            self.blobs_in_slice(t, &columns)
        )
    }

    /// SQLite only: `SELECT key, value` and the key's storage class (`text`, `blob`,
    /// ...), for a driver that does not say which kind it read.
    #[cfg_attr(not(feature = "odbc"), allow(dead_code))]
    pub(crate) fn select_all_with_key_kind(self, t: &TableSpec) -> Option<String> {
        (self == Dialect::Sqlite).then(|| {
            let columns = format!(
                "{k}, {}, typeof({k})",
                self.quote("value"),
                k = self.quote("key")
            );
            format!(
                "SELECT {columns} FROM {}{}{}",
                self.quote(&t.name),
                self.in_slice(t),
                self.blobs_in_slice(t, &columns)
            )
        })
    }

    /// `SELECT value` of the row whose key is bound to the one placeholder.
    #[cfg_attr(
        not(any(feature = "sqlite", feature = "postgres", feature = "mysql")),
        allow(dead_code)
    )]
    pub(crate) fn select_value(self, t: &TableSpec, marks: Marks) -> String {
        format!(
            "SELECT {} FROM {} WHERE {} = {}",
            self.quote("value"),
            self.quote(&t.name),
            self.exact_key(),
            self.mark(marks, 1)
        )
    }

    /// `SELECT key, value` in the key column's order, from the key bound to the first
    /// placeholder when `from`, at most as many rows as the next placeholder says when
    /// `limit`; of the slice only, for a slice.
    #[cfg_attr(
        not(any(feature = "sqlite", feature = "postgres", feature = "mysql")),
        allow(dead_code)
    )]
    pub(crate) fn scan(self, t: &TableSpec, from: bool, limit: bool, marks: Marks) -> String {
        let key = self.exact_key();
        let mut sql = format!(
            "SELECT {}, {} FROM {}",
            self.quote("key"),
            self.quote("value"),
            self.quote(&t.name)
        );
        let mut conditions: Vec<String> = self.slice_condition(t, &key).into_iter().collect();
        let mut n = 0;
        if from {
            n += 1;
            conditions.push(format!("{key} >= {}", self.mark(marks, n)));
        }
        if !conditions.is_empty() {
            sql.push_str(&format!(" WHERE {}", conditions.join(" AND ")));
        }
        sql.push_str(&format!(" ORDER BY {key}"));
        if limit {
            n += 1;
            sql.push_str(&format!(" LIMIT {}", self.mark(marks, n)));
        }
        sql
    }

    /// Deletes every row (of the slice, for a slice).
    pub fn delete_all(self, t: &TableSpec) -> String {
        format!("DELETE FROM {}{}", self.quote(&t.name), self.in_slice(t))
    }

    /// The table's key column compared byte for byte. SQLite compares with the
    /// column's collation, which a user's table may set to NOCASE even when its primary
    /// key index is BINARY: say which one counts (the index serves `BINARY`). The
    /// others' key columns compare bytes as opened (checked at open).
    fn exact_key(self) -> String {
        match self {
            Dialect::Sqlite => format!("{} COLLATE BINARY", self.quote("key")),
            _ => self.quote("key"),
        }
    }

    /// ` WHERE` and the slice's condition on the table's key, or nothing for a whole
    /// table.
    fn in_slice(self, t: &TableSpec) -> String {
        self.slice_condition(t, &self.exact_key())
            .map_or_else(String::new, |c| format!(" WHERE {c}"))
    }

    /// The slice's condition on `key`, an expression that compares in byte order: a
    /// range (`key >= start AND key < end`), which the key's index serves, with the
    /// bounds written as literals (they stay the map's whole life, and `COPY` takes no
    /// parameters). `None` for a whole table.
    pub(crate) fn slice_condition(self, t: &TableSpec, key: &str) -> Option<String> {
        self.slice_range(t, key, t.key_format)
    }

    /// The slice's range on `key`, its bounds written as `format` literals.
    fn slice_range(self, t: &TableSpec, key: &str, format: Format) -> Option<String> {
        let (start, end) = t.key_range()?;
        let mut range = format!("{key} >= {}", self.key_literal(format, start));
        if let Some(end) = &end {
            range.push_str(&format!(" AND {key} < {}", self.key_literal(format, end)));
        }
        Some(range)
    }

    /// SQLite keeps a blob in a TEXT column and sorts blobs after all text, so a key
    /// stored as a blob whose bytes start with the prefix is outside the slice's text
    /// range: a slice's load reads those too (`UNION ALL` `columns` of them), to refuse
    /// them as a whole open does rather than skip them. A second search of the index:
    /// an `OR` of the two ranges makes SQLite 3.54 scan the table.
    fn blobs_in_slice(self, t: &TableSpec, columns: &str) -> String {
        if self != Dialect::Sqlite || t.key_format != Format::Text {
            return String::new();
        }
        self.slice_range(t, &self.exact_key(), Format::Binary)
            .map_or_else(String::new, |range| {
                format!(
                    " UNION ALL SELECT {columns} FROM {} WHERE {range}",
                    self.quote(&t.name)
                )
            })
    }

    /// A literal of a stored key: text in the connection's encoding (UTF-8), bytes in hex.
    fn key_literal(self, format: Format, bytes: &[u8]) -> String {
        let hex: String = bytes.iter().map(|b| format!("{b:02X}")).collect();
        let text = std::str::from_utf8(bytes)
            .ok()
            .filter(|_| format == Format::Text && !bytes.contains(&0));
        match (self, text) {
            // An escape string: the same whatever `standard_conforming_strings` says.
            (Dialect::Postgres, Some(text)) => {
                format!("E'{}'", text.replace('\\', "\\\\").replace('\'', "''"))
            }
            (Dialect::Postgres, None) => format!("decode('{hex}', 'hex')"),
            (Dialect::Sqlite, Some(text)) => format!("'{}'", text.replace('\'', "''")),
            // A NUL ends an SQL string: the bytes, read as text.
            (Dialect::Sqlite, None) if format == Format::Text => format!("CAST(X'{hex}' AS TEXT)"),
            // MySQL's key column is binary (VARBINARY): bytes compare as bytes.
            (Dialect::Sqlite | Dialect::Mysql, _) => format!("X'{hex}'"),
        }
    }

    /// Deletes the rows whose keys are bound to `rows` placeholders.
    pub fn delete_keys(self, t: &TableSpec, rows: usize) -> String {
        self.delete_keys_marked(t, rows, Marks::Native)
    }

    pub(crate) fn delete_keys_marked(self, t: &TableSpec, rows: usize, marks: Marks) -> String {
        let list: Vec<String> = (1..=rows).map(|i| self.mark(marks, i)).collect();
        let key = self.exact_key();
        if rows == 1 {
            format!(
                "DELETE FROM {} WHERE {key} = {}",
                self.quote(&t.name),
                list[0]
            )
        } else {
            format!(
                "DELETE FROM {} WHERE {key} IN ({})",
                self.quote(&t.name),
                list.join(", ")
            )
        }
    }

    /// Inserts `rows` rows of (key, value) placeholders, replacing the value of any
    /// key already present, with the dialect's own upsert.
    pub fn upsert(self, t: &TableSpec, rows: usize) -> String {
        self.upsert_marked(t, rows, Marks::Native)
    }

    pub(crate) fn upsert_marked(self, t: &TableSpec, rows: usize, marks: Marks) -> String {
        let (key, value) = (self.quote("key"), self.quote("value"));
        let tuples: Vec<String> = (0..rows)
            .map(|r| {
                format!(
                    "({}, {})",
                    self.mark(marks, 2 * r + 1),
                    self.mark(marks, 2 * r + 2)
                )
            })
            .collect();
        let head = format!(
            "INSERT INTO {} ({key}, {value}) VALUES {}",
            self.quote(&t.name),
            tuples.join(", ")
        );
        match self {
            Dialect::Sqlite | Dialect::Postgres => {
                format!("{head} ON CONFLICT ({key}) DO UPDATE SET {value} = excluded.{value}")
            }
            Dialect::Mysql => format!("{head} ON DUPLICATE KEY UPDATE {value} = VALUES({value})"),
        }
    }

    /// PostgreSQL only: an upsert of any number of rows bound as two arrays, so a
    /// batch is one prepared statement and one round trip.
    pub fn upsert_arrays(self, t: &TableSpec) -> String {
        let array = |f: Format| {
            if f == Format::Text {
                "text[]"
            } else {
                "bytea[]"
            }
        };
        let (key, value) = (self.quote("key"), self.quote("value"));
        format!(
            "INSERT INTO {} ({key}, {value}) SELECT * FROM unnest($1::{}, $2::{}) \
             ON CONFLICT ({key}) DO UPDATE SET {value} = excluded.{value}",
            self.quote(&t.name),
            array(t.key_format),
            array(t.value_format),
        )
    }

    /// PostgreSQL only: deletes the keys bound as one array.
    pub fn delete_array(self, t: &TableSpec) -> String {
        format!("DELETE {}", self.keys_in_array(t))
    }

    /// PostgreSQL: how many of the keys bound as one array the table holds.
    #[cfg_attr(not(feature = "postgres"), allow(dead_code))]
    pub(crate) fn count_keys_array(self, t: &TableSpec) -> String {
        format!("SELECT count(*) {}", self.keys_in_array(t))
    }

    fn keys_in_array(self, t: &TableSpec) -> String {
        let array = if t.key_format == Format::Text {
            "text[]"
        } else {
            "bytea[]"
        };
        format!(
            "FROM {} WHERE {} = ANY($1::{array})",
            self.quote(&t.name),
            self.quote("key")
        )
    }
}

/// The catalog queries that opening a table runs; unused in a build without backends.
#[cfg_attr(
    not(any(
        feature = "sqlite",
        feature = "postgres",
        feature = "mysql",
        feature = "odbc"
    )),
    allow(dead_code)
)]
impl Dialect {
    /// Drops one of coherence's triggers on `t`, if it is there.
    pub(crate) fn drop_trigger(self, t: &TableSpec, trigger: &str) -> String {
        match self {
            Dialect::Postgres => format!(
                "DROP TRIGGER IF EXISTS {} ON {}",
                self.quote(trigger),
                self.quote(&t.name)
            ),
            _ => format!("DROP TRIGGER IF EXISTS {}", self.quote(trigger)),
        }
    }

    /// A query of one text parameter (see [`layout_param`](Self::layout_param)) that
    /// lists the table's columns as four texts: name, `1` if part of the primary key
    /// else `0`, type, and collation (empty if none). No rows: no such table.
    pub(crate) fn layout_query(self, marks: Marks) -> String {
        match self {
            Dialect::Sqlite => format!(
                // `xinfo`: generated columns too, which `table_info` leaves out.
                "SELECT name, CASE WHEN pk > 0 THEN '1' ELSE '0' END, type, '' \
                 FROM pragma_table_xinfo({})",
                self.mark(marks, 1)
            ),
            // `collisdeterministic` exists from PostgreSQL 12; read through jsonb so
            // that older servers (where every collation is deterministic) answer too.
            Dialect::Postgres => format!(
                "SELECT a.attname::text, \
                 CASE WHEN a.attnum = ANY(i.indkey) THEN '1' ELSE '0' END, \
                 format_type(a.atttypid, a.atttypmod), coalesce(c.collname::text || \
                 CASE WHEN (to_jsonb(c) ->> 'collisdeterministic') = 'false' \
                 THEN ' (nondeterministic)' ELSE '' END, '') \
                 FROM pg_attribute a \
                 LEFT JOIN pg_index i ON i.indrelid = a.attrelid AND i.indisprimary \
                 LEFT JOIN pg_collation c ON c.oid = a.attcollation \
                 WHERE a.attrelid = to_regclass(CAST({} AS text)) \
                 AND a.attnum > 0 AND NOT a.attisdropped",
                self.mark(marks, 1)
            ),
            Dialect::Mysql => format!(
                "SELECT column_name, IF(column_key = 'PRI', '1', '0'), data_type, \
                 coalesce(collation_name, '') FROM information_schema.columns \
                 WHERE table_schema = database() AND table_name = {}",
                self.mark(marks, 1)
            ),
        }
    }

    /// A query of one text parameter (as for [`layout_query`](Self::layout_query)) that
    /// counts what could keep a row from being deleted: rules on DELETE and row triggers
    /// BEFORE DELETE (not coherence's, which run after; PostgreSQL: on the table or any
    /// of its partitions, whose row triggers fire for the rows routed there). `None` for
    /// MySQL, whose triggers cannot keep a row.
    #[cfg_attr(not(any(feature = "postgres", feature = "odbc")), allow(dead_code))]
    pub(crate) fn delete_keepers_query(self, marks: Marks) -> Option<String> {
        let p = self.mark(marks, 1);
        match self {
            Dialect::Sqlite => Some(format!(
                "SELECT CAST(count(*) AS TEXT) FROM sqlite_master WHERE type = 'trigger' \
                 AND tbl_name = {p} COLLATE NOCASE AND upper(sql) LIKE '%BEFORE%DELETE%'"
            )),
            Dialect::Postgres => Some(format!(
                "WITH r AS (SELECT to_regclass(CAST({p} AS text)) AS oid) SELECT \
                 ((SELECT count(*) FROM pg_rewrite, r WHERE ev_class = r.oid AND ev_type = '4') \
                 + (SELECT count(*) FROM pg_trigger, r WHERE tgrelid IN {} \
                    AND NOT tgisinternal AND tgtype & 11 = 11))::text",
                pg_table_and_partitions("r.oid")
            )),
            Dialect::Mysql => None,
        }
    }

    /// A query of one text parameter (as for [`layout_query`](Self::layout_query)) that
    /// lists the columns a map's writes would fail on: `required` (NOT NULL, no default,
    /// not filled by the database) or `generated` (computed: nothing may be written to
    /// it), as (name, what).
    pub(crate) fn unwritable_columns_query(self, marks: Marks) -> String {
        let p = self.mark(marks, 1);
        match self {
            Dialect::Sqlite => format!(
                "SELECT name, CASE WHEN hidden IN (2, 3) THEN 'generated' ELSE 'required' END \
                 FROM pragma_table_xinfo({p}) \
                 WHERE hidden IN (2, 3) OR (\"notnull\" = 1 AND dflt_value IS NULL AND pk = 0)"
            ),
            Dialect::Postgres => format!(
                "SELECT a.attname::text, \
                 CASE WHEN a.attgenerated <> '' THEN 'generated' ELSE 'required' END \
                 FROM pg_attribute a WHERE a.attrelid = to_regclass(CAST({p} AS text)) \
                 AND a.attnum > 0 AND NOT a.attisdropped AND (a.attgenerated <> '' OR \
                 (a.attnotnull AND NOT a.atthasdef AND a.attidentity = ''))"
            ),
            Dialect::Mysql => format!(
                "SELECT column_name, IF(extra LIKE '%GENERATED%', 'generated', 'required') \
                 FROM information_schema.columns \
                 WHERE table_schema = database() AND table_name = {p} AND \
                 (extra LIKE '%GENERATED%' OR (is_nullable = 'NO' AND column_default IS NULL \
                  AND extra NOT LIKE '%auto_increment%'))"
            ),
        }
    }

    /// A query of one text parameter (as for [`layout_query`](Self::layout_query)) that
    /// counts the temporary tables of that name on this connection; `None` for MySQL,
    /// whose catalog lists none.
    pub(crate) fn temporary_query(self, marks: Marks) -> Option<String> {
        let p = self.mark(marks, 1);
        match self {
            // Table names compare ignoring ASCII case in SQLite.
            Dialect::Sqlite => Some(format!(
                "SELECT CAST(count(*) AS TEXT) FROM temp.sqlite_master \
                 WHERE type = 'table' AND name = {p} COLLATE NOCASE"
            )),
            Dialect::Postgres => Some(format!(
                "SELECT count(*)::text FROM pg_class \
                 WHERE oid = to_regclass(CAST({p} AS text)) AND relpersistence = 't'"
            )),
            Dialect::Mysql => None,
        }
    }

    /// A query of one text parameter (as for [`layout_query`](Self::layout_query))
    /// that lists the table's unique indexes, the primary key included, as four texts:
    /// name, `1` for the primary key, the indexed columns joined by commas
    /// (`(expression)` for an expression), and how the key is compared where it is
    /// not byte for byte (SQLite: the collations, `BINARY` being exact; PostgreSQL: a
    /// nondeterministic collation; MySQL: a prefix length), else empty.
    pub(crate) fn unique_indexes_query(self, marks: Marks) -> String {
        let p = self.mark(marks, 1);
        match self {
            Dialect::Sqlite => format!(
                "SELECT il.name, CASE WHEN il.origin = 'pk' THEN '1' ELSE '0' END, \
                 group_concat(coalesce(ix.name, '(expression)'), ','), \
                 group_concat(coalesce(ix.coll, ''), ',') \
                 FROM pragma_index_list({p}) AS il JOIN pragma_index_xinfo(il.name) AS ix \
                 WHERE il.\"unique\" AND ix.key GROUP BY il.name"
            ),
            // The index's collations by their oids: a join read all of pg_collation
            // (811 rows with ICU), converting each to JSON, 4.4 of a map's 12 ms open.
            Dialect::Postgres => format!(
                "SELECT ic.relname::text, CASE WHEN i.indisprimary THEN '1' ELSE '0' END, \
                 (SELECT string_agg(coalesce(a.attname::text, '(expression)'), ',' \
                 ORDER BY k.n) FROM unnest(i.indkey::int2[]) WITH ORDINALITY AS k(num, n) \
                 LEFT JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.num \
                 AND k.num > 0), \
                 coalesce((SELECT string_agg(c.collname::text, ',') FROM pg_collation c \
                 WHERE c.oid = ANY (i.indcollation::oid[]) \
                 AND (to_jsonb(c) ->> 'collisdeterministic') = 'false'), '') \
                 FROM pg_index i JOIN pg_class ic ON ic.oid = i.indexrelid \
                 WHERE i.indrelid = to_regclass(CAST({p} AS text)) AND i.indisunique"
            ),
            Dialect::Mysql => format!(
                "SELECT index_name, IF(index_name = 'PRIMARY', '1', '0'), \
                 group_concat(coalesce(column_name, '(expression)') ORDER BY seq_in_index), \
                 coalesce(CAST(max(sub_part) AS CHAR), '') \
                 FROM information_schema.statistics WHERE table_schema = database() \
                 AND table_name = {p} AND non_unique = 0 GROUP BY index_name"
            ),
        }
    }

    /// The parameter of [`layout_query`](Self::layout_query): PostgreSQL resolves a
    /// quoted name, the others take the name as it is.
    /// PostgreSQL: what kind of relation the table is: its persistence (`p`, `u`
    /// unlogged, `t` temporary), its kind (`r`, `p` partitioned), how many tables
    /// inherit from it (partitions excepted), and whether its primary key is
    /// DEFERRABLE, as text; bound to `layout_param`.
    pub(crate) fn relation_kind_query(self, marks: Marks) -> Option<String> {
        let p = self.mark(marks, 1);
        (self == Dialect::Postgres).then(|| {
            format!(
                "SELECT c.relpersistence::text, c.relkind::text, \
                 (SELECT count(*) FROM pg_inherits i JOIN pg_class k ON k.oid = i.inhrelid \
                  WHERE i.inhparent = c.oid AND NOT k.relispartition)::text, \
                 coalesce((SELECT bool_or(condeferrable)::text FROM pg_constraint \
                  WHERE conrelid = c.oid AND contype IN ('p', 'u')), 'false') \
                 FROM pg_class c WHERE c.oid = to_regclass(CAST({p} AS text))"
            )
        })
    }

    pub(crate) fn layout_param(self, t: &TableSpec) -> String {
        match self {
            Dialect::Postgres => self.quote(&t.name),
            _ => t.name.clone(),
        }
    }
}

/// The length of the file name MySQL and MariaDB make of a table name: letters, digits
/// and `_` stay as they are; letters of some alphabets become `@` and two characters;
/// anything else `@` and four hex digits.
fn mysql_file_name_len(name: &str) -> usize {
    name.chars()
        .map(|c| {
            let u = c as u32;
            let short_escape = [
                (0x00C0, 0x05FF),
                (0x1E00, 0x1FFF),
                (0x2160, 0x217F),
                (0x24B0, 0x24EF),
                (0xFF20, 0xFF5F),
            ];
            if c.is_ascii_alphanumeric() || c == '_' {
                1
            } else if c.is_alphabetic() && short_escape.iter().any(|&(a, b)| (a..=b).contains(&u)) {
                3
            } else {
                5
            }
        })
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(name: &str, k: Format, v: Format) -> TableSpec {
        TableSpec::new(name, k, v)
    }

    #[test]
    fn golden_slices() {
        let t = spec("h", Format::Text, Format::Text).with_key_prefix("it's \\ü");
        assert_eq!(
            Dialect::Sqlite.select_all(&t),
            r#"SELECT "key", "value" FROM "h" WHERE "key" COLLATE BINARY >= 'it''s \ü' AND "key" COLLATE BINARY < 'it''s \ý' UNION ALL SELECT "key", "value" FROM "h" WHERE "key" COLLATE BINARY >= X'69742773205CC3BC' AND "key" COLLATE BINARY < X'69742773205CC3BD'"#
        );
        assert_eq!(
            Dialect::Postgres.delete_all(&t),
            r#"DELETE FROM "h" WHERE "key" >= E'it''s \\ü' AND "key" < E'it''s \\ý'"#
        );
        assert_eq!(
            Dialect::Mysql.count_rows(&t),
            "SELECT count(*) FROM `h` WHERE `key` >= X'69742773205CC3BC' AND `key` < X'69742773205CC3BD'"
        );
        let nul = spec("h", Format::Text, Format::Text).with_key_prefix("a\0");
        assert_eq!(
            Dialect::Sqlite.scan(&nul, true, true, Marks::Native),
            concat!(
                r#"SELECT "key", "value" FROM "h" WHERE "key" COLLATE BINARY >= CAST(X'6100' AS TEXT) AND "key" COLLATE BINARY < 'a"#,
                "\u{1}",
                r#"' AND "key" COLLATE BINARY >= ?1 ORDER BY "key" COLLATE BINARY LIMIT ?2"#
            )
        );
        let whole = spec("h", Format::Text, Format::Text).with_key_prefix("");
        assert_eq!(Dialect::Postgres.delete_all(&whole), r#"DELETE FROM "h""#);
    }

    #[test]
    fn quoting_doubles_the_quote_character() {
        assert_eq!(
            Dialect::Sqlite.quote("hopefully it is quoted properly"),
            "\"hopefully it is quoted properly\""
        );
        assert_eq!(Dialect::Postgres.quote("a\"\"b"), "\"a\"\"\"\"b\"");
        assert_eq!(Dialect::Mysql.quote("a`b\"c"), "`a``b\"c`");
    }

    #[test]
    fn golden_create_table() {
        let t = spec("hashtable", Format::Text, Format::Text);
        assert_eq!(
            Dialect::Sqlite.create_table(&t),
            r#"CREATE TABLE IF NOT EXISTS "hashtable" ("key" TEXT NOT NULL, "value" TEXT NOT NULL, PRIMARY KEY ("key"))"#
        );
        assert_eq!(
            Dialect::Postgres.create_table(&spec("t", Format::Binary, Format::Binary)),
            r#"CREATE TABLE IF NOT EXISTS "t" ("key" BYTEA NOT NULL, "value" BYTEA NOT NULL, PRIMARY KEY ("key"))"#
        );
        assert_eq!(
            Dialect::Postgres.create_table(&t),
            r#"CREATE TABLE IF NOT EXISTS "hashtable" ("key" TEXT COLLATE "C" NOT NULL, "value" TEXT NOT NULL, PRIMARY KEY ("key"))"#
        );
        assert_eq!(
            Dialect::Mysql.create_table(&t),
            "CREATE TABLE IF NOT EXISTS `hashtable` (`key` VARBINARY(3072) NOT NULL, `value` LONGTEXT CHARACTER SET utf8mb4 NOT NULL, PRIMARY KEY (`key`)) ENGINE=InnoDB"
        );
    }

    #[test]
    fn golden_upserts() {
        let t = spec("h", Format::Text, Format::Text);
        assert_eq!(
            Dialect::Sqlite.upsert(&t, 1),
            r#"INSERT INTO "h" ("key", "value") VALUES (?1, ?2) ON CONFLICT ("key") DO UPDATE SET "value" = excluded."value""#
        );
        assert_eq!(
            Dialect::Postgres.upsert(&t, 2),
            r#"INSERT INTO "h" ("key", "value") VALUES ($1, $2), ($3, $4) ON CONFLICT ("key") DO UPDATE SET "value" = excluded."value""#
        );
        assert_eq!(
            Dialect::Mysql.upsert(&t, 2),
            "INSERT INTO `h` (`key`, `value`) VALUES (?, ?), (?, ?) ON DUPLICATE KEY UPDATE `value` = VALUES(`value`)"
        );
        assert_eq!(
            Dialect::Postgres.upsert_arrays(&t),
            r#"INSERT INTO "h" ("key", "value") SELECT * FROM unnest($1::text[], $2::text[]) ON CONFLICT ("key") DO UPDATE SET "value" = excluded."value""#
        );
    }

    #[test]
    fn odbc_marks_are_question_marks() {
        let t = spec("h", Format::Text, Format::Text);
        assert_eq!(
            Dialect::Postgres.upsert_marked(&t, 2, Marks::Question),
            r#"INSERT INTO "h" ("key", "value") VALUES (?, ?), (?, ?) ON CONFLICT ("key") DO UPDATE SET "value" = excluded."value""#
        );
        assert_eq!(
            Dialect::Sqlite.delete_keys_marked(&t, 2, Marks::Question),
            r#"DELETE FROM "h" WHERE "key" COLLATE BINARY IN (?, ?)"#
        );
        for d in [Dialect::Sqlite, Dialect::Postgres, Dialect::Mysql] {
            let q = d.layout_query(Marks::Question);
            assert_eq!(q.matches('?').count(), 1, "{q}");
        }
        assert!(Dialect::Postgres
            .layout_query(Marks::Native)
            .contains("CAST($1 AS text)"));
        assert_eq!(
            Dialect::Postgres.layout_param(&spec("a b", Format::Text, Format::Text)),
            "\"a b\""
        );
        assert!(Dialect::Sqlite.engine_query(Marks::Native).is_none());
    }

    #[test]
    fn golden_deletes() {
        let t = spec("h", Format::Binary, Format::Text);
        assert_eq!(
            Dialect::Sqlite.delete_keys(&t, 1),
            r#"DELETE FROM "h" WHERE "key" COLLATE BINARY = ?1"#
        );
        assert_eq!(
            Dialect::Mysql.delete_keys(&t, 3),
            "DELETE FROM `h` WHERE `key` IN (?, ?, ?)"
        );
        assert_eq!(
            Dialect::Postgres.delete_array(&t),
            r#"DELETE FROM "h" WHERE "key" = ANY($1::bytea[])"#
        );
        assert_eq!(Dialect::Sqlite.delete_all(&t), r#"DELETE FROM "h""#);
        assert_eq!(
            Dialect::Postgres.select_all(&t),
            r#"SELECT "key", "value" FROM "h""#
        );
    }

    #[test]
    fn table_names_the_backend_cannot_hold_are_refused() {
        for d in [Dialect::Sqlite, Dialect::Postgres, Dialect::Mysql] {
            assert!(d.check_table_name("").is_err());
            assert!(d.check_table_name("a\0b").is_err());
            assert!(d
                .check_table_name("hopefully it is quoted properly")
                .is_ok());
            assert!(d.check_table_name("x\"; DROP TABLE y; --`").is_ok());
        }
        assert!(Dialect::Postgres.check_table_name(&"é".repeat(32)).is_err()); // 64 bytes
        assert!(Dialect::Postgres.check_table_name(&"a".repeat(63)).is_ok());
        assert!(Dialect::Mysql.check_table_name(&"é".repeat(64)).is_ok()); // 192 bytes as a file
        assert!(Dialect::Mysql.check_table_name(&"日".repeat(50)).is_ok()); // 250
        assert!(Dialect::Mysql.check_table_name(&"日".repeat(51)).is_err()); // 255
        assert!(Dialect::Mysql.check_table_name(&"-".repeat(64)).is_err());
        assert!(Dialect::Mysql.check_table_name(&"a".repeat(65)).is_err());
        assert!(Dialect::Mysql.check_table_name("trailing ").is_err());
        assert!(Dialect::Mysql.check_table_name("emoji 🦀").is_err());
        assert!(Dialect::Sqlite.check_table_name("emoji 🦀").is_ok());
        assert!(Dialect::Sqlite.check_table_name("SQLite_master2").is_err());
    }
}
