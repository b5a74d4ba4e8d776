//! MySQL and MariaDB through the `mysql` crate (feature `mysql`).

use mysql::prelude::Queryable;
use mysql::{Conn, Opts, TxOpts, Value};

use crate::error::{redact, show_bytes, Action, Error, Result};
use crate::store::dialect::Marks;
use crate::store::{
    cannot_reconnect, check_engine, check_layout, chunks, db_error, opened, Batch, Column, Dialect,
    IntoStore, RowSink, Store, TableSpec,
};

const D: Dialect = Dialect::Mysql;

/// Rows per multi-row statement.
const CHUNK_ROWS: usize = 256;

/// A [`Store`] on a `mysql::Conn` (MySQL 5.7+, MariaDB 10.3+); what
/// `DbHashMap::open(conn)` builds.
///
/// Keys live in a `VARBINARY(3072)` column, so they compare byte for byte (the text
/// collations fold case and ignore trailing spaces); values in `LONGTEXT` (utf8mb4)
/// or `LONGBLOB`. A batch is one InnoDB transaction of multi-row statements.
pub struct MysqlStore {
    conn: Conn,
    /// The single-row statements, prepared once per connection.
    single: Option<(mysql::Statement, mysql::Statement)>,
    url: Option<String>,
    table: Option<TableSpec>,
    /// Set when the connection failed without a server answer: it is not used again.
    broken: bool,
    /// From the server's `max_allowed_packet`, read at `open`.
    max_value: Option<usize>,
}

impl std::fmt::Debug for MysqlStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MysqlStore")
            .field("url", &self.url.as_deref().map(redact))
            .field("table", &self.table)
            .finish_non_exhaustive()
    }
}

impl MysqlStore {
    /// Wraps a connection, keeping the session settings the user made.
    pub fn new(conn: Conn) -> Self {
        MysqlStore {
            conn,
            single: None,
            url: None,
            table: None,
            broken: false,
            max_value: None,
        }
    }

    pub(crate) fn connect(url: &str) -> Result<Self> {
        Ok(MysqlStore {
            conn: Self::dial(url)?,
            single: None,
            url: Some(url.to_string()),
            table: None,
            broken: false,
            max_value: None,
        })
    }

    fn dial(url: &str) -> Result<Conn> {
        let fail = |e: mysql::Error| Error::Database {
            action: Action::Connect,
            table: String::new(),
            backend: D.name(),
            source: format!("connecting to {}: {e}", redact(url)).into(),
        };
        let url = url
            .strip_prefix("mariadb://")
            .map_or_else(|| url.to_string(), |rest| format!("mysql://{rest}"));
        let opts = Opts::from_url(&url).map_err(|e| fail(e.into()))?;
        Conn::new(opts).map_err(fail)
    }

    fn check_layout(&mut self, t: &TableSpec) -> Result<()> {
        let fail = |e| db_error(Action::Open, t, D.name(), e);
        if let Some(sql) = D.engine_query(Marks::Native) {
            let engine: Option<String> = self.conn.exec_first(sql, (&t.name,)).map_err(fail)?;
            check_engine(t, D.name(), engine)?;
        }
        let cols: Vec<Column> = self
            .conn
            .exec(D.layout_query(Marks::Native), (D.layout_param(t),))
            .map_err(fail)?;
        check_layout(t, D, D.name(), &cols)
    }

    /// Before a call: a connection that broke is made again when the store knows the
    /// URL. Whatever the break left in doubt has already been reported.
    fn ensure_connected(&mut self) -> Result<()> {
        if self.broken {
            self.reconnect()?;
        }
        Ok(())
    }

    fn write(&mut self, t: &TableSpec, batch: &Batch) -> Result<()> {
        let result = self.write_on(t, batch);
        if let Err(Error::OutcomeUnknown { .. }) | Err(Error::Database { .. }) = &result {
            self.broken |= self.conn.ping().is_err();
        }
        result
    }

    fn write_on(&mut self, t: &TableSpec, batch: &Batch) -> Result<()> {
        let classify = |e: mysql::Error, committing: bool| -> Error {
            // A server error is an answer: the outcome is known. A broken connection
            // during a commit (or a statement that commits on its own) leaves it unknown.
            if committing && !matches!(e, mysql::Error::MySqlError(_)) {
                Error::OutcomeUnknown {
                    table: t.name.clone(),
                    backend: D.name(),
                    source: e.into(),
                }
            } else {
                db_error(Action::Write, t, D.name(), e)
            }
        };
        if batch.len() == 1 && !batch.clear {
            let (upsert, delete) = match self.single.take() {
                Some(prepared) => prepared,
                None => (
                    self.conn
                        .prep(D.upsert(t, 1))
                        .map_err(|e| classify(e, false))?,
                    self.conn
                        .prep(D.delete_keys(t, 1))
                        .map_err(|e| classify(e, false))?,
                ),
            };
            let result = if let Some((k, v)) = batch.puts.first() {
                self.conn.exec_drop(&upsert, (k.as_slice(), v.as_slice()))
            } else {
                self.conn.exec_drop(&delete, (batch.deletes[0].as_slice(),))
            };
            self.single = Some((upsert, delete));
            return result.map_err(|e| classify(e, true));
        }
        let mut tx = self
            .conn
            .start_transaction(TxOpts::default())
            .map_err(|e| classify(e, false))?;
        // MySQL undoes only the failing statement: on any error the whole transaction
        // is rolled back explicitly (dropping `tx` does it).
        if batch.clear {
            tx.query_drop(D.delete_all(t))
                .map_err(|e| classify(e, false))?;
        }
        for keys in chunks(&batch.deletes, CHUNK_ROWS, |k| k.len()) {
            let params: Vec<Value> = keys.iter().map(|k| Value::from(k.as_slice())).collect();
            tx.exec_drop(D.delete_keys(t, keys.len()), params)
                .map_err(|e| classify(e, false))?;
        }
        for rows in chunks(&batch.puts, CHUNK_ROWS, |(k, v)| k.len() + v.len()) {
            let mut params = Vec::with_capacity(rows.len() * 2);
            for (k, v) in rows {
                params.push(Value::from(k.as_slice()));
                params.push(Value::from(v.as_slice()));
            }
            tx.exec_drop(D.upsert(t, rows.len()), params)
                .map_err(|e| classify(e, false))?;
        }
        tx.commit().map_err(|e| classify(e, true))
    }
}

impl Store for MysqlStore {
    fn backend(&self) -> &'static str {
        D.name()
    }

    fn open(&mut self, t: &TableSpec) -> Result<()> {
        D.check_table_name(&t.name)?;
        // DDL commits implicitly in MySQL: the table is made outside any transaction.
        self.conn
            .query_drop(D.create_table(t))
            .map_err(|e| db_error(Action::Open, t, D.name(), e))?;
        self.check_layout(t)?;
        if let Some(sql) = D.packet_query() {
            let packet: Option<String> = self
                .conn
                .query_first(sql)
                .map_err(|e| db_error(Action::Open, t, D.name(), e))?;
            self.max_value = packet
                .and_then(|p| p.parse().ok())
                .map(|p| D.max_value_len(p));
        }
        self.table = Some(t.clone());
        Ok(())
    }

    fn load(&mut self, sink: &mut RowSink<'_>) -> Result<()> {
        self.ensure_connected()?;
        let t = opened(&self.table, D.name())?;
        let fail = |e| db_error(Action::Load, t, D.name(), e);
        let mut result = self.conn.query_iter(D.select_all(t)).map_err(fail)?;
        for row in result.by_ref() {
            let row = row.map_err(fail)?;
            match (row.as_ref(0), row.as_ref(1)) {
                (Some(Value::Bytes(k)), Some(Value::Bytes(v))) => sink(k, v)?,
                (k, _) => {
                    return Err(Error::Decode {
                        what: "value",
                        table: t.name.clone(),
                        row: match k {
                            Some(Value::Bytes(k)) => show_bytes(k),
                            other => format!("{other:?}"),
                        },
                        source: "the column holds NULL or a number, not text or bytes".into(),
                    })
                }
            }
        }
        Ok(())
    }

    fn apply(&mut self, batch: &Batch) -> Result<()> {
        if batch.is_empty() {
            return Ok(());
        }
        self.ensure_connected()?;
        let t = opened(&self.table, D.name())?.clone();
        self.write(&t, batch)
    }

    fn max_key_len(&self) -> Option<usize> {
        D.max_key_len()
    }

    fn max_value_len(&self) -> Option<usize> {
        self.max_value
    }

    fn reconnect(&mut self) -> Result<()> {
        if !self.broken && self.conn.ping().is_ok() {
            return Ok(());
        }
        let Some(url) = &self.url else {
            return Err(cannot_reconnect(&self.table, D.name()));
        };
        self.conn = Self::dial(url)?;
        self.single = None;
        self.broken = false;
        Ok(())
    }
}

impl IntoStore for Conn {
    fn into_store(self) -> Box<dyn Store> {
        Box::new(MysqlStore::new(self))
    }
}
