//! ODBC through odbc-api and unixODBC (feature `odbc`). The dialect comes from the
//! DBMS name the driver reports; the limits come from that dialect, not from the
//! driver (MariaDB's driver reports 256 for a table name, the server allows 64).

use odbc_api::parameter::InputParameter;
use odbc_api::{Connection, ConnectionOptions, Cursor, IntoParameter};

use crate::codec::Format;
use crate::error::{redact, show_bytes, Action, BoxError, Error, Result};
use crate::store::dialect::Marks;
use crate::store::{
    cannot_reconnect, check_engine, check_layout, chunks, db_error, opened, Batch, Column, Dialect,
    IntoStore, RowSink, Store, TableSpec,
};

/// Rows per multi-row statement: 2 × 64 parameters suit every driver tested.
const CHUNK: usize = 64;

/// A [`Store`] on an ODBC connection; what `DbHashMap::open(conn)` builds for an
/// `odbc_api::Connection<'static>` (from [`odbc_api::environment`]).
pub struct OdbcStore {
    conn: Connection<'static>,
    /// Known when opened from a URL: then a lost connection is made again.
    url: Option<String>,
    dialect: Dialect,
    /// The DBMS name the driver reported, and whether this crate knows its dialect.
    dbms: String,
    known: bool,
    table: Option<TableSpec>,
    broken: bool,
    max_value: Option<usize>,
}

impl std::fmt::Debug for OdbcStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OdbcStore")
            .field("url", &self.url.as_deref().map(redact))
            .field("dbms", &self.dbms)
            .field("table", &self.table)
            .finish_non_exhaustive()
    }
}

fn connect_error(source: impl Into<BoxError>) -> Error {
    Error::Database {
        action: Action::Connect,
        table: String::new(),
        backend: "ODBC",
        source: source.into(),
    }
}

impl OdbcStore {
    /// Wraps a connection; asks the driver which DBMS is behind it. An unknown DBMS
    /// gets the standard `ON CONFLICT` upsert and `"` quoting.
    pub fn new(conn: Connection<'static>) -> Result<Self> {
        let dbms = conn
            .database_management_system_name()
            .map_err(connect_error)?;
        let lower = dbms.to_ascii_lowercase();
        let (dialect, known) = if lower.contains("postgres") {
            (Dialect::Postgres, true)
        } else if lower.contains("mariadb") || lower.contains("mysql") {
            (Dialect::Mysql, true)
        } else if lower.contains("sqlite") {
            (Dialect::Sqlite, true)
        } else {
            (Dialect::Sqlite, false)
        };
        Ok(OdbcStore {
            conn,
            url: None,
            dialect,
            dbms,
            known,
            table: None,
            broken: false,
            max_value: None,
        })
    }

    pub(crate) fn connect(connection_string: &str) -> Result<Self> {
        let conn = Self::dial(connection_string)?;
        let mut store = Self::new(conn)?;
        store.url = Some(connection_string.to_string());
        Ok(store)
    }

    fn dial(connection_string: &str) -> Result<Connection<'static>> {
        let env = odbc_api::environment().map_err(connect_error)?;
        env.connect_with_connection_string(connection_string, ConnectionOptions::default())
            .map_err(|e| connect_error(format!("connecting to {}: {e}", redact(connection_string))))
    }

    fn name(&self) -> &'static str {
        match (self.known, self.dialect) {
            (false, _) => "ODBC",
            (true, Dialect::Postgres) => "PostgreSQL (ODBC)",
            (true, Dialect::Mysql) => "MySQL/MariaDB (ODBC)",
            (true, _) => "SQLite (ODBC)",
        }
    }

    /// Runs a statement; rows are not read.
    fn exec(
        &self,
        sql: &str,
        params: &[Box<dyn InputParameter + '_>],
    ) -> std::result::Result<(), odbc_api::Error> {
        self.conn.execute(sql, params, None).map(drop)
    }

    /// Runs a query of one text parameter whose columns are all text.
    fn texts(
        &self,
        sql: &str,
        param: &str,
        columns: u16,
    ) -> std::result::Result<Vec<Vec<String>>, odbc_api::Error> {
        let mut out = Vec::new();
        if let Some(mut cursor) = self.conn.execute(sql, &param.into_parameter(), None)? {
            let mut buf = Vec::new();
            while let Some(mut row) = cursor.next_row()? {
                let mut fields = Vec::with_capacity(usize::from(columns));
                for c in 1..=columns {
                    row.get_text(c, &mut buf)?;
                    fields.push(String::from_utf8_lossy(&buf).into_owned());
                }
                out.push(fields);
            }
        }
        Ok(out)
    }

    fn check_layout(&self, t: &TableSpec) -> Result<()> {
        if !self.known {
            return Ok(());
        }
        let d = self.dialect;
        let fail = |e| db_error(Action::Open, t, self.name(), e);
        if let Some(sql) = d.engine_query(Marks::Question) {
            let engine = self
                .texts(&sql, &t.name, 1)
                .map_err(fail)?
                .pop()
                .map(|mut r| r.remove(0));
            check_engine(t, self.name(), engine)?;
        }
        let rows = self
            .texts(&d.layout_query(Marks::Question), &d.layout_param(t), 4)
            .map_err(fail)?;
        let cols: Vec<Column> = rows
            .into_iter()
            .map(|mut r| {
                let collation = r.pop().unwrap_or_default();
                let ty = r.pop().unwrap_or_default();
                let pk = r.pop().unwrap_or_default();
                (r.pop().unwrap_or_default(), pk, ty, collation)
            })
            .collect();
        check_layout(t, d, self.name(), &cols)
    }

    fn param(format: Format, bytes: &[u8]) -> Box<dyn InputParameter + '_> {
        match format {
            // Text codecs give UTF-8; the narrow ODBC functions take it as it is.
            Format::Text => Box::new(odbc_api::parameter::VarCharSlice::new(bytes)),
            Format::Binary => Box::new(bytes.into_parameter()),
        }
    }

    /// What went wrong, said so that an unknown DBMS's refusal names it and the
    /// statement; a dead connection during a commit is an unknown outcome.
    fn classify(&self, t: &TableSpec, e: odbc_api::Error, sql: &str, committing: bool) -> Error {
        // Drivers do not always notice a broken connection (MariaDB's said "alive" after
        // a reset): SQLSTATE class 08, a connection exception, counts as broken too.
        let connection_exception = matches!(
            &e,
            odbc_api::Error::Diagnostics { record, .. } if record.state.0.starts_with(b"08")
        );
        let dead = connection_exception || self.conn.is_dead().unwrap_or(true);
        if committing && dead {
            return Error::OutcomeUnknown {
                table: t.name.clone(),
                backend: self.name(),
                source: e.into(),
            };
        }
        if !self.known {
            return db_error(
                Action::Write,
                t,
                self.name(),
                format!(
                    "the data source's DBMS {:?} is not one this crate knows (PostgreSQL, \
                     MariaDB/MySQL, SQLite) and it rejected the statement `{sql}`: {e}",
                    self.dbms
                ),
            );
        }
        db_error(Action::Write, t, self.name(), e)
    }

    fn run(&self, t: &TableSpec, batch: &Batch) -> Result<()> {
        let d = self.dialect;
        let exec = |sql: &str, params: &[Box<dyn InputParameter + '_>]| {
            self.exec(sql, params)
                .map_err(|e| self.classify(t, e, sql, false))
        };
        if batch.clear {
            exec(&d.delete_all(t), &[])?;
        }
        // Bounded in bytes too: MariaDB refuses a statement over its max_allowed_packet.
        for keys in chunks(&batch.deletes, CHUNK, |k| k.len()) {
            let params: Vec<_> = keys.iter().map(|k| Self::param(t.key_format, k)).collect();
            exec(
                &d.delete_keys_marked(t, keys.len(), Marks::Question),
                &params,
            )?;
        }
        for rows in chunks(&batch.puts, CHUNK, |(k, v)| k.len() + v.len()) {
            let mut params = Vec::with_capacity(2 * rows.len());
            for (k, v) in rows {
                params.push(Self::param(t.key_format, k));
                params.push(Self::param(t.value_format, v));
            }
            exec(&d.upsert_marked(t, rows.len(), Marks::Question), &params)?;
        }
        Ok(())
    }

    fn write(&mut self, t: &TableSpec, batch: &Batch) -> Result<()> {
        if batch.len() == 1 && !batch.clear {
            // One statement, committed on its own by autocommit.
            let d = self.dialect;
            let (sql, params) = match batch.puts.first() {
                Some((k, v)) => (
                    d.upsert_marked(t, 1, Marks::Question),
                    vec![Self::param(t.key_format, k), Self::param(t.value_format, v)],
                ),
                None => (
                    d.delete_keys_marked(t, 1, Marks::Question),
                    vec![Self::param(t.key_format, &batch.deletes[0])],
                ),
            };
            return self
                .exec(&sql, &params)
                .map_err(|e| self.classify(t, e, &sql, true));
        }
        let fail = |s: &Self, e| s.classify(t, e, "BEGIN", false);
        self.conn.set_autocommit(false).map_err(|e| fail(self, e))?;
        let result = self.run(t, batch).and_then(|()| {
            self.conn
                .commit()
                .map_err(|e| self.classify(t, e, "COMMIT", true))
        });
        if result.is_err() {
            // Some drivers (psqlODBC, MariaDB) undo only the failing statement: undo all.
            let _ = self.conn.rollback();
        }
        // The connection's autocommit is restored, failed or not.
        let restored = self.conn.set_autocommit(true).map_err(|e| fail(self, e));
        result.and(restored)
    }
}

impl Store for OdbcStore {
    fn backend(&self) -> &'static str {
        self.name()
    }

    fn open(&mut self, t: &TableSpec) -> Result<()> {
        self.dialect.check_table_name(&t.name)?;
        self.ensure_connected()?;
        let sql = self.dialect.create_table(t);
        self.exec(&sql, &[]).map_err(|e| {
            let mut err = self.classify(t, e, &sql, false);
            if let Error::Database { action, .. } = &mut err {
                *action = Action::Open;
            }
            err
        })?;
        self.check_layout(t)?;
        if let Some(sql) = self.dialect.packet_query().filter(|_| self.known) {
            let fail = |e| db_error(Action::Open, t, self.name(), e);
            let rows = self.texts(sql, "", 1).map_err(fail)?;
            let packet = rows.first().and_then(|r| r[0].trim().parse().ok());
            self.max_value = packet.map(|p| self.dialect.max_value_len(p));
        }
        self.table = Some(t.clone());
        Ok(())
    }

    fn load(&mut self, sink: &mut RowSink<'_>) -> Result<()> {
        self.ensure_connected()?;
        let t = opened(&self.table, self.name())?;
        let fail = |e| db_error(Action::Load, t, self.name(), e);
        let Some(mut cursor) = self
            .conn
            .execute(&self.dialect.select_all(t), (), None)
            .map_err(fail)?
        else {
            return Ok(());
        };
        let (mut key, mut value) = (Vec::new(), Vec::new());
        let get = |row: &mut odbc_api::CursorRow<'_>, col, format, buf: &mut Vec<u8>| match format {
            Format::Text => row.get_text(col, buf),
            Format::Binary => row.get_binary(col, buf),
        };
        while let Some(mut row) = cursor.next_row().map_err(fail)? {
            let k = get(&mut row, 1, t.key_format, &mut key).map_err(fail)?;
            let v = get(&mut row, 2, t.value_format, &mut value).map_err(fail)?;
            if !k || !v {
                return Err(Error::Decode {
                    what: if k { "value" } else { "key" },
                    table: t.name.clone(),
                    row: if k {
                        show_bytes(&key)
                    } else {
                        "with a NULL key".into()
                    },
                    source: "the column holds NULL".into(),
                });
            }
            sink(&key, &value)?;
        }
        Ok(())
    }

    fn apply(&mut self, batch: &Batch) -> Result<()> {
        if batch.is_empty() {
            return Ok(());
        }
        self.ensure_connected()?;
        let t = opened(&self.table, self.name())?.clone();
        let result = self.write(&t, batch);
        if let Err(e) = &result {
            self.broken |= e.is_outcome_unknown() || self.conn.is_dead().unwrap_or(true);
        }
        result
    }

    fn max_key_len(&self) -> Option<usize> {
        // From the dialect: drivers report wrong limits.
        self.dialect.max_key_len()
    }

    fn max_value_len(&self) -> Option<usize> {
        self.max_value
    }

    fn reconnect(&mut self) -> Result<()> {
        if !self.broken && !self.conn.is_dead().unwrap_or(true) {
            return Ok(());
        }
        let Some(url) = &self.url else {
            return Err(cannot_reconnect(&self.table, self.name()));
        };
        self.conn = Self::dial(url)?;
        self.broken = false;
        Ok(())
    }
}

impl OdbcStore {
    fn ensure_connected(&mut self) -> Result<()> {
        if self.broken {
            self.reconnect()?;
        }
        Ok(())
    }
}

impl IntoStore for Connection<'static> {
    fn into_store(self) -> Box<dyn Store> {
        match OdbcStore::new(self) {
            Ok(store) => Box::new(store),
            Err(e) => Box::new(Failed(Some(e))),
        }
    }
}

/// A connection whose driver would not say which DBMS it serves: `open` reports why.
struct Failed(Option<Error>);

impl Store for Failed {
    fn backend(&self) -> &'static str {
        "ODBC"
    }
    fn open(&mut self, _: &TableSpec) -> Result<()> {
        Err(self
            .0
            .take()
            .unwrap_or_else(|| connect_error("the ODBC connection could not be used")))
    }
    fn load(&mut self, _: &mut RowSink<'_>) -> Result<()> {
        self.open(&TableSpec {
            name: String::new(),
            key_format: Format::Text,
            value_format: Format::Text,
        })
    }
    fn apply(&mut self, _: &Batch) -> Result<()> {
        self.load(&mut |_, _| Ok(()))
    }
}
