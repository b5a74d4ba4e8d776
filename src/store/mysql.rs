//! MySQL and MariaDB through the `mysql` crate (feature `mysql`).

use std::time::{Duration, Instant};

use mysql::prelude::Queryable;
use mysql::{Conn, Opts, TxOpts, Value};

use crate::error::{redact, show_bytes, Action, BoxError, Error, Result};
use crate::store::changes::{coherence_methods, not_enabled, Coherence};
use crate::store::dialect::Marks;
use crate::store::support::{open_table, redial, Catalog, Field, IDLE_CHECK};
use crate::store::{
    cannot_reconnect, chunks, db_error, opened, Batch, ChangeSink, Dialect, IntoStore, PutSource,
    RowSink, Store, TableSpec,
};

const D: Dialect = Dialect::Mysql;

/// How long a lost connection is tried again before a call fails: a server restarting,
/// a Galera node rejoining.
const RECONNECT_WINDOW: std::time::Duration = std::time::Duration::from_secs(10);

/// Whether a failed connection may succeed soon: the server was unreachable, shutting
/// down, out of connections or not ready (a Galera node not synced); not a refused
/// login or a missing database.
fn passing(e: &Error) -> bool {
    let Error::Connect { source, .. } = e else {
        return false;
    };
    match source.downcast_ref::<mysql::Error>() {
        Some(mysql::Error::MySqlError(e)) => [1040, 1047, 1053, 1081].contains(&e.code),
        Some(mysql::Error::UrlError(_)) => false,
        _ => true,
    }
}

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
    /// The most bytes of keys and values one multi-row statement carries.
    chunk_bytes: usize,
    last_used: Instant,
    /// Set by `enable_changes` (coherence).
    coherence: Option<Coherence>,
    /// `open` made the table (it was absent).
    made_table: bool,
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
            chunk_bytes: crate::store::support::CHUNK_BYTES,
            last_used: Instant::now(),
            coherence: None,
            made_table: false,
        }
    }

    pub(crate) fn connect(url: &str) -> Result<Self> {
        let mut store = Self::new(Self::dial(url)?);
        store.url = Some(url.to_string());
        Ok(store)
    }

    /// Makes the session one where every acknowledged write is committed and stored as
    /// written, whatever the user's or the server's settings: autocommit on (a server
    /// may default to off) and strict mode (no silent truncation). A session inside a
    /// transaction that someone else began is refused: turning autocommit on would
    /// commit it.
    fn prepare_session(conn: &mut Conn, table: &str) -> Result<()> {
        let fail = |e: mysql::Error| db_error_named(Action::Open, table, e);
        let state: Option<(String, String)> = match conn.query_first(D.session_state_query()) {
            Ok(state) => state,
            // MySQL (not MariaDB) has no @@in_transaction: read autocommit alone.
            Err(mysql::Error::MySqlError(e)) if e.code == 1193 => conn
                .query_first::<String, _>("SELECT CAST(@@autocommit AS CHAR)")
                .map_err(fail)?
                .map(|a| (a, "0".into())),
            Err(e) => return Err(fail(e)),
        };
        let (autocommit, in_transaction) = state.unwrap_or_default();
        if in_transaction.trim() == "1" {
            return Err(Error::ConnectionState {
                backend: D.name(),
                reason: "it is inside a transaction that the caller began (START TRANSACTION, \
                         or a statement run with autocommit off); commit or roll it back \
                         before handing the connection to the map"
                    .into(),
            });
        }
        if autocommit.trim() != "1" {
            conn.query_drop("SET autocommit = 1").map_err(fail)?;
        }
        // The driver sends and reads UTF-8: a session set to another character set
        // (`SET NAMES latin1`) would store other characters than those written.
        conn.query_drop("SET NAMES utf8mb4").map_err(fail)?;
        for sql in D.session_setup() {
            conn.query_drop(sql).map_err(fail)?;
        }
        for sql in D.session_causal_reads() {
            match conn.query_drop(sql) {
                Err(mysql::Error::MySqlError(e)) if e.code == 1193 => {}
                other => other.map_err(fail)?,
            }
        }
        Ok(())
    }

    fn dial(url: &str) -> Result<Conn> {
        let fail = |e: mysql::Error| Error::Connect {
            url: redact(url),
            backend: D.name(),
            source: e.into(),
        };
        let url = url
            .strip_prefix("mariadb://")
            .map_or_else(|| url.to_string(), |rest| format!("mysql://{rest}"));
        // The driver's own message quotes parts of the URL, which may be the password.
        let opts = Opts::from_url(&url).map_err(|_| Error::Url {
            url: redact(&url),
            reason: "the mysql driver does not accept it: check its syntax, and percent-encode \
                     characters such as `?`, `/`, `#` and `@` in the user name and password"
                .into(),
        })?;
        Conn::new(opts).map_err(fail)
    }

    /// Before a call: a connection that broke is made again when the store knows the
    /// URL. Whatever the break left in doubt has already been reported.
    fn ensure_connected(&mut self) -> Result<()> {
        if !self.broken && self.last_used.elapsed() >= IDLE_CHECK {
            self.broken = self.conn.ping().is_err();
        }
        if self.broken {
            self.reconnect()?;
        }
        self.last_used = Instant::now();
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
        let max_bytes = self.chunk_bytes;
        let one_statement = !batch.clear
            && batch.deletes.is_empty()
            && chunks(&batch.puts, CHUNK_ROWS, max_bytes, |(k, v)| {
                k.len() + v.len()
            })
            .nth(1)
            .is_none();
        if one_statement {
            // Puts that fit one statement: InnoDB undoes a statement whole, so it is all
            // or nothing on its own, in one round trip where BEGIN and COMMIT took two
            // more. A lost answer is a lost connection: the map runs it again, which
            // leaves what running it once would have. (A coherent table's triggers are
            // part of the statement: its log rows come and go with it.)
            let mut params = Vec::with_capacity(batch.puts.len() * 2);
            for (k, v) in &batch.puts {
                params.push(Value::from(k.as_slice()));
                params.push(Value::from(v.as_slice()));
            }
            return self
                .conn
                .exec_drop(D.upsert(t, batch.puts.len()), params)
                .map_err(|e| classify(e, false));
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
        for keys in chunks(&batch.deletes, CHUNK_ROWS, max_bytes, |k| k.len()) {
            let params: Vec<Value> = keys.iter().map(|k| Value::from(k.as_slice())).collect();
            tx.exec_drop(D.delete_keys(t, keys.len()), params)
                .map_err(|e| classify(e, false))?;
        }
        upsert_chunked(&mut tx, t, &batch.puts, max_bytes).map_err(|e| classify(e, false))?;
        tx.commit().map_err(|e| classify(e, true))
    }

    /// `put_rows`: one transaction, cleared first with `replace`, each chunk written
    /// as it comes in multi-row upserts.
    fn write_rows(&mut self, t: &TableSpec, replace: bool, next: &mut PutSource<'_>) -> Result<()> {
        let fail = |e: mysql::Error| db_error(Action::Write, t, D.name(), e);
        let max_bytes = self.chunk_bytes;
        let mut tx = self
            .conn
            .start_transaction(TxOpts::default())
            .map_err(fail)?;
        if replace {
            tx.query_drop(D.delete_all(t)).map_err(fail)?;
        }
        let mut back = None;
        while let Some(chunk) = next(back.take()) {
            // Dropping `tx` on an error rolls everything back.
            let chunk = chunk?;
            upsert_chunked(&mut tx, t, &chunk, max_bytes).map_err(fail)?;
            back = Some(chunk);
        }
        tx.commit().map_err(|e| Error::OutcomeUnknown {
            table: t.name.clone(),
            backend: D.name(),
            source: e.into(),
        })
    }
}

/// Upserts `puts` in multi-row statements of at most `CHUNK_ROWS` rows and `max_bytes`.
fn upsert_chunked(
    tx: &mut mysql::Transaction<'_>,
    t: &TableSpec,
    puts: &[(Vec<u8>, Vec<u8>)],
    max_bytes: usize,
) -> std::result::Result<(), mysql::Error> {
    for rows in chunks(puts, CHUNK_ROWS, max_bytes, |(k, v)| k.len() + v.len()) {
        let mut params = Vec::with_capacity(rows.len() * 2);
        for (k, v) in rows {
            params.push(Value::from(k.as_slice()));
            params.push(Value::from(v.as_slice()));
        }
        tx.exec_drop(D.upsert(t, rows.len()), params)?;
    }
    Ok(())
}

impl Store for MysqlStore {
    fn backend(&self) -> &'static str {
        D.name()
    }

    fn reads_slices(&self) -> bool {
        true
    }

    fn open(&mut self, t: &TableSpec) -> Result<()> {
        D.check_table_name(&t.name)?;
        Self::prepare_session(&mut self.conn, &t.name)?;
        // DDL commits implicitly in MySQL: the table is made outside any transaction.
        // On Galera two nodes creating one table at once may conflict (1213): the
        // loser looks again, and finds the table made.
        let mut tries = 0;
        self.made_table = loop {
            match open_table(&mut self.conn, t, D, Marks::Native, D.name()) {
                Ok(made) => break made,
                Err(e) if tries < 5 && e.is_conflict() => {
                    tries += 1;
                    std::thread::sleep(Duration::from_millis(20 << tries));
                }
                Err(e) => return Err(e),
            }
        };
        if let Some(sql) = D.packet_query() {
            let packet: Option<String> = self
                .conn
                .query_first(sql)
                .map_err(|e| db_error(Action::Open, t, D.name(), e))?;
            if let Some(packet) = packet.and_then(|p| p.parse().ok()) {
                self.max_value = Some(D.max_value_len(packet));
                self.chunk_bytes = D.chunk_bytes(packet);
            }
        }
        self.table = Some(t.clone());
        self.last_used = Instant::now();
        Ok(())
    }

    fn load(&mut self, sink: &mut RowSink<'_>) -> Result<()> {
        // In key order: InnoDB keeps rows in primary key order, so it costs no sort.
        self.scan(None, None, sink)
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

    fn can_reconnect(&self) -> bool {
        self.url.is_some()
    }

    fn count(&mut self) -> Result<u64> {
        self.ensure_connected()?;
        let t = opened(&self.table, D.name())?;
        let n: Option<u64> = self
            .conn
            .query_first(D.count_rows(t))
            .map_err(|e| db_error(Action::Load, t, D.name(), e))?;
        Ok(n.unwrap_or(0))
    }

    fn scan(
        &mut self,
        from: Option<&[u8]>,
        limit: Option<u64>,
        sink: &mut RowSink<'_>,
    ) -> Result<()> {
        self.ensure_connected()?;
        let t = opened(&self.table, D.name())?;
        let fail = |e| db_error(Action::Load, t, D.name(), e);
        let sql = D.scan(t, from.is_some(), limit.is_some(), Marks::Native);
        let mut params = Vec::new();
        if let Some(from) = from {
            params.push(Value::from(from));
        }
        if let Some(limit) = limit {
            params.push(Value::from(limit));
        }
        let params = if params.is_empty() {
            mysql::Params::Empty
        } else {
            mysql::Params::Positional(params)
        };
        let mut result = self.conn.exec_iter(sql, params).map_err(fail)?;
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

    fn put_rows(
        &mut self,
        replace: bool,
        _distinct_keys: bool,
        next: &mut PutSource<'_>,
    ) -> Result<()> {
        self.ensure_connected()?;
        let t = opened(&self.table, D.name())?.clone();
        self.write_rows(&t, replace, next)
    }

    fn get(&mut self, key: &[u8]) -> Result<Option<Vec<u8>>> {
        self.ensure_connected()?;
        let t = opened(&self.table, D.name())?;
        let value: Option<Value> = self
            .conn
            .exec_first(D.select_value(t, Marks::Native), (key,))
            .map_err(|e| db_error(Action::Load, t, D.name(), e))?;
        match value {
            None => Ok(None),
            Some(Value::Bytes(v)) => Ok(Some(v)),
            Some(other) => Err(Error::Decode {
                what: "value",
                table: t.name.clone(),
                row: show_bytes(key),
                source: format!("the column holds {other:?}, not text or bytes").into(),
            }),
        }
    }

    fn reconnect(&mut self) -> Result<()> {
        if !self.broken && self.conn.ping().is_ok() {
            return Ok(());
        }
        let Some(url) = &self.url else {
            return Err(cannot_reconnect(&self.table, D.name()));
        };
        let mut conn = redial(RECONNECT_WINDOW, || Self::dial(url), passing)?;
        let table = self.table.as_ref().map_or("", |t| t.name.as_str());
        Self::prepare_session(&mut conn, table)?;
        self.conn = conn;
        self.single = None;
        self.broken = false;
        self.last_used = Instant::now();
        Ok(())
    }

    fn rows_hint(&mut self) -> Option<usize> {
        // A slice's count would read its range once more: a map of a slice grows as it
        // fills instead.
        if self.table.as_ref().is_some_and(|t| t.key_prefix.is_some()) {
            return None;
        }
        let t = self.table.as_ref()?;
        let sql = D.count_rows(t);
        let n: Option<u64> = self.conn.query_first(sql).ok()?;
        n.and_then(|n| usize::try_from(n).ok())
    }

    coherence_methods!(conn, D);
}

fn db_error_named(action: Action, table: &str, e: mysql::Error) -> Error {
    Error::Database {
        action,
        table: table.to_string(),
        backend: D.name(),
        source: e.into(),
    }
}

impl Catalog for Conn {
    fn rows(&mut self, sql: &str, param: Option<&str>) -> Result<Vec<Vec<Field>>, BoxError> {
        let rows: Vec<mysql::Row> = match param {
            Some(p) => Queryable::exec(self, sql, (p,))?,
            None => Queryable::query(self, sql)?,
        };
        Ok(rows
            .into_iter()
            .map(|row| {
                row.unwrap()
                    .into_iter()
                    .map(|v| match v {
                        Value::NULL => None,
                        Value::Bytes(b) => Some(b),
                        Value::Int(i) => Some(i.to_string().into_bytes()),
                        Value::UInt(u) => Some(u.to_string().into_bytes()),
                        other => Some(format!("{other:?}").into_bytes()),
                    })
                    .collect()
            })
            .collect())
    }

    fn exec_with(&mut self, sql: &str, param: Option<&str>) -> Result<(), BoxError> {
        match param {
            None => self.query_drop(sql)?,
            Some(p) => self.exec_drop(sql, (p,))?,
        }
        Ok(())
    }
}

impl IntoStore for Conn {
    fn into_store(self) -> Box<dyn Store> {
        Box::new(MysqlStore::new(self))
    }
}
