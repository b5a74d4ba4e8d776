//! SQLite through rusqlite (feature `sqlite`).

use std::path::Path;
use std::time::Duration;

use rusqlite::types::{ToSqlOutput, ValueRef};
use rusqlite::{Connection, TransactionBehavior};

use crate::codec::Format;
use crate::error::{show_bytes, Action, BoxError, Error, Result};
use crate::store::changes::{coherence_methods, not_enabled, Coherence};
use crate::store::dialect::Marks;
use crate::store::support::{
    all_rows_written, deletes_kept, not_opened, open_table, wrong_key_kind, Catalog, Field,
};
use crate::store::{
    db_error, opened, Batch, ChangeSignal, ChangeSink, Dialect, IntoStore, PutSource, RowSink,
    Store, TableSpec,
};

const D: Dialect = Dialect::Sqlite;

/// A [`Store`] on a `rusqlite::Connection`; what `DbHashMap::open(conn)` builds.
#[derive(Debug)]
pub struct SqliteStore {
    conn: Connection,
    table: Option<TableSpec>,
    sql: Sql,
    /// Set by `enable_changes` (coherence).
    coherence: Option<Coherence>,
    /// `open` made the table (it was absent).
    made_table: bool,
}

/// Rows per multi-row upsert: one statement for many rows saves SQLite's per-statement
/// work (measured here: 64 rows a statement 0.91x of one upsert per row, 256 rows
/// 0.70x, 1,000 rows 0.69x); 2 × 256 parameters stay far below its limit of 32,766.
const CHUNK: usize = 256;

#[derive(Debug, Default)]
struct Sql {
    upsert: String,
    upsert_chunk: String,
    delete: String,
    delete_all: String,
    select: String,
    count: String,
    select_value: String,
}

impl SqliteStore {
    /// Wraps a connection, keeping every pragma the user set on it.
    pub fn new(conn: Connection) -> Self {
        SqliteStore {
            conn,
            table: None,
            sql: Sql::default(),
            coherence: None,
            made_table: false,
        }
    }

    /// Opens a database file (or `:memory:`) with this crate's defaults: WAL journal,
    /// `synchronous = FULL` (a commit survives a power loss), a 5 s busy timeout.
    pub(crate) fn open_path(path: &Path) -> Result<Self> {
        let fail = |e: rusqlite::Error| Error::Connect {
            url: format!("the SQLite file {}", path.display()),
            backend: D.name(),
            source: e.into(),
        };
        let conn = Connection::open(path).map_err(fail)?;
        conn.busy_timeout(std::time::Duration::from_secs(5))
            .map_err(fail)?;
        if path != Path::new(":memory:") {
            // Switching to WAL needs the file to itself: another connection opening it
            // at the same moment may hold it, and the switch then fails at once.
            let mut tries = 0;
            while let Err(e) = conn.pragma_update(None, "journal_mode", "WAL") {
                let busy = matches!(
                    e.sqlite_error_code(),
                    Some(rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked)
                );
                if !busy || tries == 200 {
                    return Err(fail(e));
                }
                tries += 1;
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
        }
        conn.pragma_update(None, "synchronous", "FULL")
            .map_err(fail)?;
        Ok(SqliteStore::new(conn))
    }

    fn bind(format: Format, bytes: &[u8]) -> Result<ToSqlOutput<'_>, std::str::Utf8Error> {
        Ok(match format {
            Format::Text => {
                ToSqlOutput::Borrowed(ValueRef::Text(std::str::from_utf8(bytes)?.as_bytes()))
            }
            Format::Binary => ToSqlOutput::Borrowed(ValueRef::Blob(bytes)),
        })
    }

    /// [`bind`](Self::bind) for text already known to be UTF-8.
    fn bind_checked(format: Format, bytes: &[u8]) -> ToSqlOutput<'_> {
        ToSqlOutput::Borrowed(match format {
            Format::Text => ValueRef::Text(bytes),
            Format::Binary => ValueRef::Blob(bytes),
        })
    }

    fn write(&mut self, batches: &[Batch]) -> std::result::Result<(), crate::error::BoxError> {
        let t = opened(&self.table, D.name())?;
        let (kf, vf) = (t.key_format, t.value_format);
        // Every write is one transaction, a single one included, taken IMMEDIATE so it
        // never fails half-way on a lock upgrade: a write that the checks after its
        // statements refuse (a trigger dropped the row) is rolled back with whatever its
        // triggers did meanwhile.
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        for batch in batches {
            Self::run(&tx, &self.sql, batch, kf, vf)?;
        }
        // On error `tx` drops and rolls back.
        tx.commit()?;
        Ok(())
    }

    fn run(
        conn: &Connection,
        sql: &Sql,
        batch: &Batch,
        kf: Format,
        vf: Format,
    ) -> std::result::Result<(), crate::error::BoxError> {
        // The transaction is IMMEDIATE: no other writer comes between the DELETE and the
        // look-ups, so what is still there was kept by a rule or trigger.
        if batch.clear {
            conn.prepare_cached(&sql.delete_all)?.execute([])?;
            let left: i64 = conn
                .prepare_cached(&sql.count)?
                .query_row([], |r| r.get(0))?;
            if left > 0 {
                return Err(deletes_kept(left as usize, None));
            }
        }
        if !batch.deletes.is_empty() {
            let mut stmt = conn.prepare_cached(&sql.delete)?;
            let mut kept = 0;
            for key in &batch.deletes {
                let key = Self::bind(kf, key)?;
                // None deleted: the key was not there (another writer's delete, or a
                // write-behind insert that never reached the table), or a trigger kept it.
                if stmt.execute([&key])? == 0
                    && conn.prepare_cached(&sql.select_value)?.exists([&key])?
                {
                    kept += 1;
                }
            }
            if kept > 0 {
                return Err(deletes_kept(kept, Some(batch.deletes.len())));
            }
        }
        let written = Self::upsert_rows(conn, sql, &batch.puts, kf, vf, false)?;
        all_rows_written(written as u64, batch.puts.len())
    }

    /// Upserts `puts`, `CHUNK` rows a statement, and says how many rows SQLite wrote.
    /// Text is checked to be UTF-8 unless `checked` (the caller did).
    fn upsert_rows(
        conn: &Connection,
        sql: &Sql,
        puts: &[(Vec<u8>, Vec<u8>)],
        kf: Format,
        vf: Format,
        checked: bool,
    ) -> std::result::Result<usize, crate::error::BoxError> {
        let bind = |format, bytes| {
            if checked {
                Ok(Self::bind_checked(format, bytes))
            } else {
                Self::bind(format, bytes)
            }
        };
        let chunks = puts.chunks_exact(CHUNK);
        let rest = chunks.remainder();
        let mut written = 0;
        if puts.len() >= CHUNK {
            let mut stmt = conn.prepare_cached(&sql.upsert_chunk)?;
            let mut params = Vec::with_capacity(2 * CHUNK);
            for chunk in chunks {
                params.clear();
                for (key, value) in chunk {
                    params.push(bind(kf, key)?);
                    params.push(bind(vf, value)?);
                }
                written += stmt.execute(rusqlite::params_from_iter(params.iter()))?;
            }
        }
        if !rest.is_empty() {
            let mut stmt = conn.prepare_cached(&sql.upsert)?;
            for (key, value) in rest {
                written += stmt.execute([bind(kf, key)?, bind(vf, value)?])?;
            }
        }
        Ok(written)
    }

    /// Writes the chunks `next` hands over in one IMMEDIATE transaction. An error of
    /// `next` is given back as it is (`Ok(Err(_))`); the store's own as the outer one.
    fn write_puts(
        &mut self,
        clear: bool,
        next: &mut PutSource<'_>,
    ) -> std::result::Result<Result<()>, crate::error::BoxError> {
        let t = opened(&self.table, D.name())?;
        let (kf, vf) = (t.key_format, t.value_format);
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        if clear {
            tx.prepare_cached(&self.sql.delete_all)?.execute([])?;
        }
        let (mut written, mut total) = (0, 0);
        let mut back = None;
        while let Some(chunk) = next(back.take()) {
            let chunk = match chunk {
                Ok(chunk) => chunk,
                // Dropping `tx` rolls back.
                Err(e) => return Ok(Err(e)),
            };
            written += Self::upsert_rows(&tx, &self.sql, &chunk, kf, vf, true)?;
            total += chunk.len();
            back = Some(chunk);
        }
        all_rows_written(written as u64, total)?;
        tx.commit()?;
        Ok(Ok(()))
    }
}

/// Hands one row of `SELECT key, value` to `sink`, refusing a key of the other kind:
/// SQLite holds text 'a' and the blob X'61' as two distinct values, so a key stored as
/// the other kind would never be matched by the map's writes.
fn take_row(t: &TableSpec, row: &rusqlite::Row<'_>, sink: &mut RowSink<'_>) -> Result<()> {
    let fail = |e| db_error(Action::Load, t, D.name(), e);
    let key_ref = row.get_ref(0).map_err(fail)?;
    let kind_matches = matches!(
        (key_ref, t.key_format),
        (ValueRef::Text(_), Format::Text) | (ValueRef::Blob(_), Format::Binary)
    );
    match (bytes_of(key_ref), bytes_of(row.get_ref(1).map_err(fail)?)) {
        (Some(k), Some(_)) if !kind_matches => Err(wrong_key_kind(t, k)),
        (Some(k), Some(v)) => sink(k, v),
        (k, _) => Err(Error::Decode {
            what: if k.is_none() { "key" } else { "value" },
            table: t.name.clone(),
            row: k.map_or_else(|| "with a non-text key".into(), show_bytes),
            source: "the column holds a number or NULL, not text or bytes".into(),
        }),
    }
}

impl Catalog for Connection {
    fn rows(&mut self, sql: &str, param: Option<&str>) -> Result<Vec<Vec<Field>>, BoxError> {
        let mut stmt = self.prepare_cached(sql)?;
        let n = stmt.column_count();
        let mut rows = stmt.query(rusqlite::params_from_iter(param))?;
        let mut out = Vec::new();
        while let Some(row) = rows.next()? {
            let mut fields = Vec::with_capacity(n);
            for i in 0..n {
                fields.push(match row.get_ref(i)? {
                    ValueRef::Null => None,
                    ValueRef::Integer(i) => Some(i.to_string().into_bytes()),
                    ValueRef::Real(f) => Some(f.to_string().into_bytes()),
                    ValueRef::Text(b) | ValueRef::Blob(b) => Some(b.to_vec()),
                });
            }
            out.push(fields);
        }
        Ok(out)
    }

    fn exec_with(&mut self, sql: &str, param: Option<&str>) -> Result<(), BoxError> {
        match param {
            None => self.execute_batch(sql)?,
            Some(p) => {
                self.prepare_cached(sql)?.execute([p])?;
            }
        }
        Ok(())
    }
}

impl Store for SqliteStore {
    fn backend(&self) -> &'static str {
        D.name()
    }

    fn reads_slices(&self) -> bool {
        true
    }

    fn applies_seq(&self) -> bool {
        true
    }

    fn open(&mut self, t: &TableSpec) -> Result<()> {
        if !self.conn.is_autocommit() {
            // Its commit or rollback belongs to the caller; the map's would end it.
            return Err(Error::ConnectionState {
                backend: D.name(),
                reason: "it is inside a transaction that the caller began; commit or roll \
                         it back before handing the connection to the map"
                    .into(),
            });
        }
        self.made_table = open_table(&mut self.conn, t, D, Marks::Native, D.name())?;
        self.sql = Sql {
            upsert: D.upsert(t, 1),
            upsert_chunk: D.upsert(t, CHUNK),
            delete: D.delete_keys(t, 1),
            delete_all: D.delete_all(t),
            select: D.select_all(t),
            count: D.count_rows(t),
            select_value: D.select_value(t, Marks::Native),
        };
        self.table = Some(t.clone());
        Ok(())
    }

    fn get(&mut self, key: &[u8]) -> Result<Option<Vec<u8>>> {
        let t = opened(&self.table, D.name())?;
        let fail = |e: rusqlite::Error| db_error(Action::Load, t, D.name(), e);
        let k =
            Self::bind(t.key_format, key).map_err(|e| db_error(Action::Load, t, D.name(), e))?;
        let mut stmt = self
            .conn
            .prepare_cached(&D.select_value(t, Marks::Native))
            .map_err(fail)?;
        let mut rows = stmt.query([k]).map_err(fail)?;
        let Some(row) = rows.next().map_err(fail)? else {
            return Ok(None);
        };
        match bytes_of(row.get_ref(0).map_err(fail)?) {
            Some(v) => Ok(Some(v.to_vec())),
            None => Err(Error::Decode {
                what: "value",
                table: t.name.clone(),
                row: show_bytes(key),
                source: "the column holds a number or NULL, not text or bytes".into(),
            }),
        }
    }

    fn count(&mut self) -> Result<u64> {
        let t = opened(&self.table, D.name())?;
        let n: i64 = self
            .conn
            .query_row(&D.count_rows(t), [], |r| r.get(0))
            .map_err(|e| db_error(Action::Load, t, D.name(), e))?;
        Ok(n.max(0) as u64)
    }

    fn scan(
        &mut self,
        from: Option<&[u8]>,
        limit: Option<u64>,
        sink: &mut RowSink<'_>,
    ) -> Result<()> {
        let t = opened(&self.table, D.name())?;
        let fail = |e: rusqlite::Error| db_error(Action::Load, t, D.name(), e);
        let sql = D.scan(t, from.is_some(), limit.is_some(), Marks::Native);
        let mut stmt = self.conn.prepare_cached(&sql).map_err(fail)?;
        let mut params: Vec<ToSqlOutput<'_>> = Vec::new();
        if let Some(from) = from {
            params.push(
                Self::bind(t.key_format, from)
                    .map_err(|e| db_error(Action::Load, t, D.name(), e))?,
            );
        }
        if let Some(limit) = limit {
            params.push(ToSqlOutput::Owned(rusqlite::types::Value::Integer(
                i64::try_from(limit).unwrap_or(i64::MAX),
            )));
        }
        let mut rows = stmt
            .query(rusqlite::params_from_iter(params))
            .map_err(fail)?;
        while let Some(row) = rows.next().map_err(fail)? {
            take_row(t, row, sink)?;
        }
        Ok(())
    }

    fn load(&mut self, sink: &mut RowSink<'_>) -> Result<()> {
        let t = opened(&self.table, D.name())?;
        let fail = |e| db_error(Action::Load, t, D.name(), e);
        let mut stmt = self.conn.prepare_cached(&self.sql.select).map_err(fail)?;
        let mut rows = stmt.query([]).map_err(fail)?;
        while let Some(row) = rows.next().map_err(fail)? {
            take_row(t, row, sink)?;
        }
        Ok(())
    }

    fn apply(&mut self, batch: &Batch) -> Result<()> {
        if batch.is_empty() {
            return Ok(());
        }
        self.apply_seq(std::slice::from_ref(batch))
    }

    fn apply_seq(&mut self, batches: &[Batch]) -> Result<()> {
        opened(&self.table, D.name())?;
        let result = self.write(batches);
        if result.is_err() && !self.conn.is_autocommit() {
            // Whatever failed, leave no transaction open for the next call to join.
            let _ = self.conn.execute_batch("ROLLBACK");
        }
        // A read-only connection says so as a read-only file does: tell which it is.
        let query_only = matches!(
            result.as_ref().err().and_then(|e| e.downcast_ref::<rusqlite::Error>()),
            Some(e) if e.sqlite_error_code() == Some(rusqlite::ErrorCode::ReadOnly)
        ) && self
            .conn
            .pragma_query_value(None, "query_only", |r| r.get::<_, i64>(0))
            .is_ok_and(|on| on == 1);
        // The table is only looked up for the message, not copied on every write.
        result.map_err(|e| match &self.table {
            Some(t) if query_only => db_error(
                Action::Write,
                t,
                D.name(),
                "the connection has PRAGMA query_only = ON, so it takes no writes (the file \
                 itself may be writable); set PRAGMA query_only = OFF, or hand the map another \
                 connection",
            ),
            Some(t) => db_error(Action::Write, t, D.name(), e),
            None => not_opened(D.name()),
        })
    }

    coherence_methods!(conn, D);

    fn streams_puts(&self) -> bool {
        true
    }

    fn rows_hint(&mut self) -> Option<usize> {
        let t = self.table.as_ref()?;
        let sql = D.count_rows(t);
        let n: i64 = self.conn.query_row(&sql, [], |r| r.get(0)).ok()?;
        usize::try_from(n).ok()
    }

    fn put_rows(
        &mut self,
        replace: bool,
        _distinct_keys: bool,
        next: &mut PutSource<'_>,
    ) -> Result<()> {
        let result = self.write_puts(replace, next);
        if !matches!(result, Ok(Ok(()))) && !self.conn.is_autocommit() {
            let _ = self.conn.execute_batch("ROLLBACK");
        }
        match result {
            Ok(given_up) => given_up,
            Err(e) => Err(match &self.table {
                Some(t) => db_error(Action::Write, t, D.name(), e),
                None => not_opened(D.name()),
            }),
        }
    }

    fn change_signal(&mut self, every: Duration) -> Result<Option<Box<dyn ChangeSignal>>> {
        // A connection of its own: `data_version` moves for other connections' commits.
        let path = match self.conn.path() {
            Some(path) if !path.is_empty() => path.to_string(),
            // In memory: nobody but this connection writes it.
            _ => return Ok(None),
        };
        let t = opened(&self.table, D.name())?.clone();
        let fail = |e| db_error(Action::Watch, &t, D.name(), e);
        let conn = Connection::open_with_flags(
            &path,
            rusqlite::OpenFlags::SQLITE_OPEN_READ_WRITE | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .map_err(fail)?;
        let mut signal = DataVersion {
            conn,
            last: 0,
            every,
            table: t,
        };
        signal.last = signal.read()?;
        Ok(Some(Box::new(signal)))
    }
}

/// SQLite's change signal: `PRAGMA data_version` on a connection of its own, which
/// moves whenever another connection commits (about 2 µs a look).
struct DataVersion {
    conn: Connection,
    last: i64,
    every: Duration,
    table: TableSpec,
}

impl DataVersion {
    fn read(&self) -> Result<i64> {
        self.conn
            .query_row("PRAGMA data_version", [], |row| row.get(0))
            .map_err(|e| db_error(Action::Watch, &self.table, D.name(), e))
    }
}

impl ChangeSignal for DataVersion {
    fn wait(&mut self, timeout: Duration) -> Result<bool> {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            let now = self.read()?;
            if now != self.last {
                self.last = now;
                return Ok(true);
            }
            if std::time::Instant::now() >= deadline {
                return Ok(false);
            }
            std::thread::sleep(self.every);
        }
    }
}

fn bytes_of(v: ValueRef<'_>) -> Option<&[u8]> {
    match v {
        ValueRef::Text(b) | ValueRef::Blob(b) => Some(b),
        _ => None,
    }
}

impl IntoStore for Connection {
    fn into_store(self) -> Box<dyn Store> {
        Box::new(SqliteStore::new(self))
    }
}
