//! ODBC through odbc-api and unixODBC (feature `odbc`). The dialect comes from the
//! DBMS name the driver reports; the limits come from that dialect, not from the
//! driver (MariaDB's driver reports 256 for a table name, the server allows 64).

use odbc_api::handles::{
    slice_to_cow_utf8, AsStatementRef, DiagnosticStream, SqlResult, SqlText, Statement,
};
use odbc_api::parameter::InputParameter;
use odbc_api::{Connection, ConnectionOptions, Cursor, IntoParameter, ResultSetMetadata};

use crate::codec::Format;
use crate::error::{redact, show_bytes, Action, BoxError, Error, Result};
use crate::store::changes::{not_enabled, Coherence};
use crate::store::dialect::Marks;
use crate::store::support::{
    all_rows_written, deletes_kept, open_table, wrong_key_kind, Catalog, Field, CHUNK_BYTES,
};
use crate::store::{
    cannot_reconnect, chunks, db_error, opened, Batch, ChangeSink, Dialect, IntoStore, RowSink,
    Store, TableSpec,
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
    /// The most bytes of keys and values one multi-row statement carries.
    chunk_bytes: usize,
    /// Set by `enable_changes` (coherence).
    coherence: Option<Coherence>,
    /// `open` made the table (it was absent).
    made_table: bool,
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
            chunk_bytes: CHUNK_BYTES,
            coherence: None,
            made_table: false,
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
            .map_err(|e| Error::Connect {
                url: format!("odbc:{}", redact(connection_string)),
                backend: "ODBC",
                source: e.into(),
            })
    }

    fn name(&self) -> &'static str {
        match (self.known, self.dialect) {
            (false, _) => "ODBC",
            (true, Dialect::Postgres) => "PostgreSQL (ODBC)",
            (true, Dialect::Mysql) => "MySQL/MariaDB (ODBC)",
            (true, _) => "SQLite (ODBC)",
        }
    }

    /// Runs a statement (rows are not read) and reads every diagnostic record the
    /// driver left: a driver may answer a statement the server rejected with "success
    /// with information" (MariaDB's, for a value outside an ENUM), and `odbc-api`'s
    /// `execute` only logs those records.
    fn exec(
        &self,
        sql: &str,
        params: &[Box<dyn InputParameter + '_>],
    ) -> std::result::Result<u64, StatementError> {
        let mut prealloc = self.conn.preallocate()?;
        let mut stmt = prealloc.as_stmt_ref();
        for (i, p) in params.iter().enumerate() {
            let n = u16::try_from(i + 1).map_err(|_| StatementError::Rejected {
                diagnostics: "too many parameters".into(),
            })?;
            // SAFETY: the parameters outlive the statement's execution; they are unbound
            // below before they can go away.
            unsafe { stmt.bind_input_parameter(n, p.as_ref()) }.into_result(&stmt)?;
        }
        // SAFETY: the bound parameters are alive (see above).
        let result: SqlResult<()> = unsafe { stmt.exec_direct(&SqlText::new(sql)) };
        // Read before any other call on the statement, which would clear them.
        let mut warnings = Vec::new();
        let mut records = DiagnosticStream::new(&stmt);
        while let Some(r) = records.next() {
            // Class 00 is success; 01004 (string data truncated) concerns output buffers.
            let state = r.state.as_str();
            if !state.starts_with("00") && state != "01004" {
                warnings.push(format!(
                    "SQLSTATE {state}, native error {}: {}",
                    r.native_error,
                    slice_to_cow_utf8(&r.message)
                ));
            }
        }
        // A DELETE that matched no rows answers SQL_NO_DATA.
        let result = result.on_no_data(|| ()).into_result_without_logging(&stmt);
        let rows = match &result {
            Ok(()) => stmt.row_count().into_result(&stmt).unwrap_or(0),
            Err(_) => 0,
        };
        let _ = stmt.reset_parameters();
        result?;
        if warnings.is_empty() {
            Ok(u64::try_from(rows).unwrap_or(0))
        } else {
            Err(StatementError::Rejected {
                diagnostics: warnings.join("; "),
            })
        }
    }

    /// Runs a query of at most one text parameter; every column is read as bytes.
    fn rows_of(
        &self,
        sql: &str,
        param: Option<&str>,
    ) -> std::result::Result<Vec<Vec<Field>>, odbc_api::Error> {
        let mut out = Vec::new();
        let cursor = match param {
            Some(p) => self.conn.execute(sql, &p.into_parameter(), None)?,
            None => self.conn.execute(sql, (), None)?,
        };
        if let Some(mut cursor) = cursor {
            let columns = u16::try_from(cursor.num_result_cols()?).unwrap_or(0);
            while let Some(mut row) = cursor.next_row()? {
                let mut fields = Vec::with_capacity(usize::from(columns));
                for c in 1..=columns {
                    let mut buf = Vec::new();
                    let present = row.get_binary(c, &mut buf)?;
                    fields.push(present.then_some(buf));
                }
                out.push(fields);
            }
        }
        Ok(out)
    }

    /// Refuses a connection inside a transaction its caller began, where the dialect
    /// can tell (MariaDB's `@@in_transaction`), and makes the session store values as
    /// written (MySQL's strict mode).
    fn prepare_session(&mut self, t: &TableSpec) -> Result<()> {
        let fail = |s: &Self, e: BoxError| db_error(Action::Open, t, s.name(), e);
        if self.known && self.dialect == Dialect::Mysql {
            let state = Catalog::texts(self, self.dialect.session_state_query(), None)
                .map_err(|e| fail(self, e))?;
            if state.first().and_then(|r| r.get(1)).map(|s| s.trim()) == Some("1") {
                return Err(Error::ConnectionState {
                    backend: self.name(),
                    reason: "it is inside a transaction that the caller began; commit or roll \
                             it back before handing the connection to the map"
                        .into(),
                });
            }
        }
        for sql in self.dialect.session_setup().iter().filter(|_| self.known) {
            self.conn
                .execute(sql, (), None)
                .map_err(|e| fail(self, e.into()))?;
        }
        for sql in self
            .dialect
            .session_causal_reads()
            .iter()
            .filter(|_| self.known)
        {
            // A server that does not know the setting goes without it.
            if let Err(e) = self.conn.execute(sql, (), None) {
                tracing::debug!(error = %e, "causal reads not set on this server");
            }
        }
        Ok(())
    }

    /// The stored value of one key, in the connection's state (inside a write's
    /// transaction too).
    fn value_of(&self, t: &TableSpec, key: &[u8]) -> Result<Option<Vec<u8>>> {
        let fail = |e| db_error(Action::Load, t, self.name(), e);
        let sql = self.dialect.select_value(t, Marks::Question);
        let cursor = match t.key_format {
            Format::Text => {
                self.conn
                    .execute(&sql, &odbc_api::parameter::VarCharSlice::new(key), None)
            }
            Format::Binary => self.conn.execute(&sql, &key.into_parameter(), None),
        }
        .map_err(fail)?;
        let Some(mut cursor) = cursor else {
            return Ok(None);
        };
        let Some(mut row) = cursor.next_row().map_err(fail)? else {
            return Ok(None);
        };
        let mut value = Vec::new();
        let present = match t.value_format {
            Format::Text => row.get_text(1, &mut value),
            Format::Binary => row.get_binary(1, &mut value),
        }
        .map_err(fail)?;
        if !present {
            return Err(Error::Decode {
                what: "value",
                table: t.name.clone(),
                row: show_bytes(key),
                source: "the column holds NULL".into(),
            });
        }
        Ok(Some(value))
    }

    /// Whether a rule or trigger of the table could keep a row a DELETE names (see the
    /// PostgreSQL store's `may_keep_deletes`); a DBMS this crate does not know: no.
    fn may_keep_deletes(&self, t: &TableSpec) -> Result<bool> {
        let Some(sql) = self
            .dialect
            .delete_keepers_query(Marks::Question)
            .filter(|_| self.known)
        else {
            return Ok(false);
        };
        let rows = self
            .rows_of(&sql, Some(&self.dialect.layout_param(t)))
            .map_err(|e| db_error(Action::Write, t, self.name(), e))?;
        Ok(rows
            .first()
            .and_then(|r| r.first())
            .and_then(|c| c.as_deref())
            .is_none_or(|n| n.trim_ascii() != b"0"))
    }

    /// `count(*)`, in the connection's state.
    fn count_rows(&self, t: &TableSpec) -> Result<u64> {
        let rows = self
            .rows_of(&self.dialect.count_rows_text(t), None)
            .map_err(|e| db_error(Action::Load, t, self.name(), e))?;
        rows.first()
            .and_then(|r| r.first())
            .and_then(|c| c.as_deref())
            .and_then(|c| std::str::from_utf8(c).ok())
            .and_then(|c| c.trim().parse().ok())
            .ok_or_else(|| Error::Decode {
                what: "count",
                table: t.name.clone(),
                row: String::new(),
                source: "count(*) gave no number".into(),
            })
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
    fn classify(
        &self,
        t: &TableSpec,
        e: impl Into<StatementError>,
        sql: &str,
        committing: bool,
    ) -> Error {
        let e = e.into();
        // Drivers do not always notice a broken connection (MariaDB's said "alive" after
        // a reset): SQLSTATE class 08, a connection exception, counts as broken too.
        let connection_exception = matches!(
            &e,
            StatementError::Odbc(odbc_api::Error::Diagnostics { record, .. })
                if record.state.0.starts_with(b"08")
        );
        let dead = connection_exception || self.conn.is_dead().unwrap_or(true);
        if committing && dead {
            return Error::OutcomeUnknown {
                table: t.name.clone(),
                backend: self.name(),
                source: e.into_source(),
            };
        }
        if !self.known {
            return self.unknown_dbms_refused(Action::Write, t, sql, e);
        }
        db_error(Action::Write, t, self.name(), e.into_source())
    }

    /// A statement an unknown DBMS rejected: the error names the DBMS and the statement.
    fn unknown_dbms_refused(
        &self,
        action: Action,
        t: &TableSpec,
        sql: &str,
        e: impl std::fmt::Display,
    ) -> Error {
        db_error(
            action,
            t,
            self.name(),
            format!(
                "the data source's DBMS {:?} is not one this crate knows (PostgreSQL, \
                 MariaDB/MySQL, SQLite) and it rejected the statement `{sql}`: {e}",
                self.dbms
            ),
        )
    }

    /// Refuses text that holds a NUL character: psqlODBC cuts text there on the way in
    /// and the SQLite driver on the way out, so the table would hold something else.
    fn check_text(&self, t: &TableSpec, batch: &Batch) -> Result<()> {
        let nul = |format: Format, bytes: &[u8]| format == Format::Text && bytes.contains(&0);
        let bad_key = batch
            .deletes
            .iter()
            .chain(batch.puts.iter().map(|(k, _)| k))
            .find(|k| nul(t.key_format, k));
        let bad_value = batch.puts.iter().find(|(_, v)| nul(t.value_format, v));
        let (what, row) = match (bad_key, bad_value) {
            (Some(k), _) => ("key", k),
            (None, Some((k, _))) => ("value", k),
            (None, None) => return Ok(()),
        };
        Err(Error::Encode {
            what,
            table: t.name.clone(),
            source: format!(
                "the {what} of row {} holds a NUL character, which ODBC drivers cut text at; \
                 nothing was written: use a binary codec for such data",
                show_bytes(row)
            )
            .into(),
        })
    }

    fn run(&self, t: &TableSpec, batch: &Batch) -> Result<()> {
        let d = self.dialect;
        let exec = |sql: &str, params: &[Box<dyn InputParameter + '_>]| {
            self.exec(sql, params)
                .map_err(|e| self.classify(t, e, sql, false))
        };
        let mut written = 0;
        let kept =
            |kept: usize, asked| db_error(Action::Write, t, self.name(), deletes_kept(kept, asked));
        if batch.clear {
            exec(&d.delete_all(t), &[])?;
        }
        if batch.clear && self.may_keep_deletes(t)? {
            let left = self.count_rows(t)?;
            if left > 0 {
                return Err(kept(left as usize, None));
            }
        }
        // Bounded in bytes too: MariaDB refuses a statement over its max_allowed_packet.
        let mut deleted = 0;
        for keys in chunks(&batch.deletes, CHUNK, self.chunk_bytes, |k| k.len()) {
            let params: Vec<_> = keys.iter().map(|k| Self::param(t.key_format, k)).collect();
            deleted += exec(
                &d.delete_keys_marked(t, keys.len(), Marks::Question),
                &params,
            )?;
        }
        // Fewer deleted than asked: keys gone already (another writer), or kept by a
        // rule or trigger. MySQL's triggers cannot keep a row, and its count is exact.
        if deleted < batch.deletes.len() as u64 && self.may_keep_deletes(t)? {
            let mut still = 0;
            for key in &batch.deletes {
                if self.value_of(t, key)?.is_some() {
                    still += 1;
                }
            }
            if still > 0 {
                return Err(kept(still, Some(batch.deletes.len())));
            }
        }
        for rows in chunks(&batch.puts, CHUNK, self.chunk_bytes, |(k, v)| {
            k.len() + v.len()
        }) {
            let mut params = Vec::with_capacity(2 * rows.len());
            for (k, v) in rows {
                params.push(Self::param(t.key_format, k));
                params.push(Self::param(t.value_format, v));
            }
            written += exec(&d.upsert_marked(t, rows.len(), Marks::Question), &params)?;
        }
        // MySQL counts an updated row twice, and one set to its own value not at all:
        // its count says nothing of dropped rows (nor can its triggers drop any).
        if d != Dialect::Mysql && self.known {
            all_rows_written(written, batch.puts.len())
                .map_err(|e| db_error(Action::Write, t, self.name(), e))?;
        }
        Ok(())
    }

    /// Every write, a single one included, is a transaction of its own, committed
    /// explicitly: the statements' diagnostics are read before the commit, so what the
    /// server rejected is rolled back rather than committed half.
    fn write(&mut self, t: &TableSpec, batch: &Batch) -> Result<()> {
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
        // The connection's autocommit is restored, failed or not; but once the commit
        // succeeded, the change is in the table and the call succeeded with it.
        if let Err(e) = self.conn.set_autocommit(true) {
            tracing::warn!(table = %t.name, error = %e, "ODBC: restoring autocommit failed");
            self.broken = true;
        }
        result
    }
}

/// Why a statement failed: the driver's error, or diagnostics that say the server
/// rejected what the driver reported as a success.
#[derive(Debug)]
enum StatementError {
    Odbc(odbc_api::Error),
    Rejected { diagnostics: String },
}

impl From<odbc_api::Error> for StatementError {
    fn from(e: odbc_api::Error) -> Self {
        StatementError::Odbc(e)
    }
}

impl StatementError {
    /// The driver's own error as it is (downcastable), or the rejection.
    fn into_source(self) -> BoxError {
        match self {
            StatementError::Odbc(e) => Box::new(e),
            rejected => Box::new(rejected),
        }
    }
}

impl std::fmt::Display for StatementError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StatementError::Odbc(e) => e.fmt(f),
            StatementError::Rejected { diagnostics } => write!(
                f,
                "the driver reported success with diagnostics that say the statement was \
                 not carried out as given: {diagnostics}"
            ),
        }
    }
}

impl std::error::Error for StatementError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            StatementError::Odbc(e) => e.source(),
            StatementError::Rejected { .. } => None,
        }
    }
}

impl Catalog for OdbcStore {
    fn rows(&mut self, sql: &str, param: Option<&str>) -> Result<Vec<Vec<Field>>, BoxError> {
        Ok(self.rows_of(sql, param)?)
    }

    fn exec_with(&mut self, sql: &str, param: Option<&str>) -> Result<(), BoxError> {
        // DDL: notes such as "table already exists" are no rejection here.
        match param {
            None => self.conn.execute(sql, (), None).map(drop)?,
            Some(p) => self
                .conn
                .execute(sql, &p.into_parameter(), None)
                .map(drop)?,
        }
        Ok(())
    }
}

impl Store for OdbcStore {
    fn backend(&self) -> &'static str {
        self.name()
    }

    /// An unknown DBMS's SQL is guessed: a slice there is refused.
    fn reads_slices(&self) -> bool {
        self.known
    }

    fn open(&mut self, t: &TableSpec) -> Result<()> {
        self.dialect.check_table_name(&t.name)?;
        self.ensure_connected()?;
        self.prepare_session(t)?;
        let (d, name) = (self.dialect, self.name());
        if self.known {
            self.made_table = open_table(self, t, d, Marks::Question, name)?;
        } else {
            // Its catalog cannot be read the way this crate knows: the table is made if
            // absent, and a table that exists is taken as it is.
            tracing::warn!(
                table = %t.name, dbms = %self.dbms,
                "ODBC: unknown DBMS; the table's layout (key type, collation, unique \
                 indexes) is not checked"
            );
            let sql = d.create_table(t);
            Catalog::exec(self, &sql)
                .map_err(|e| self.unknown_dbms_refused(Action::Open, t, &sql, e))?;
        }
        if let Some(sql) = self.dialect.packet_query().filter(|_| self.known) {
            let name = self.name();
            let rows =
                Catalog::texts(self, sql, None).map_err(|e| db_error(Action::Open, t, name, e))?;
            let packet = rows.first().and_then(|r| r[0].trim().parse().ok());
            if let Some(packet) = packet {
                self.max_value = Some(self.dialect.max_value_len(packet));
                self.chunk_bytes = self.dialect.chunk_bytes(packet);
            }
        }
        self.table = Some(t.clone());
        Ok(())
    }

    fn load(&mut self, sink: &mut RowSink<'_>) -> Result<()> {
        self.ensure_connected()?;
        let t = opened(&self.table, self.name())?;
        let fail = |e| db_error(Action::Load, t, self.name(), e);
        // SQLite: also the key's storage class, which the driver does not tell.
        let typed = self
            .dialect
            .select_all_with_key_kind(t)
            .filter(|_| self.known);
        let sql = typed.clone().unwrap_or_else(|| self.dialect.select_all(t));
        let Some(mut cursor) = self.conn.execute(&sql, (), None).map_err(fail)? else {
            return Ok(());
        };
        let expected_kind = match t.key_format {
            Format::Text => &b"text"[..],
            Format::Binary => &b"blob"[..],
        };
        let (mut key, mut value, mut kind) = (Vec::new(), Vec::new(), Vec::new());
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
            if typed.is_some() {
                row.get_text(3, &mut kind).map_err(fail)?;
                if kind != expected_kind {
                    return Err(wrong_key_kind(t, &key));
                }
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
        self.check_text(&t, batch)?;
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

    fn can_reconnect(&self) -> bool {
        self.url.is_some()
    }

    fn get(&mut self, key: &[u8]) -> Result<Option<Vec<u8>>> {
        self.ensure_connected()?;
        let t = opened(&self.table, self.name())?;
        self.value_of(t, key)
    }

    fn count(&mut self) -> Result<u64> {
        self.ensure_connected()?;
        let t = opened(&self.table, self.name())?;
        self.count_rows(t)
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

    fn enable_changes(&mut self) -> Result<()> {
        let t = opened(&self.table, self.name())?.clone();
        let (d, name) = (self.dialect, self.name());
        if !self.known {
            return Err(Error::NotCoherent {
                table: t.name,
                reason: format!("the ODBC data source's DBMS {:?} is not one this crate can keep a change log on", self.dbms),
            });
        }
        let made = self.made_table;
        self.coherence = Some(Coherence::enable(self, &t, d, Marks::Question, name, made)?);
        Ok(())
    }

    fn version(&mut self) -> Result<u64> {
        let c = self
            .coherence
            .take()
            .ok_or_else(|| not_enabled(&self.table))?;
        let result = c.version(self);
        self.coherence = Some(c);
        result
    }

    fn changes(&mut self, since: u64, sink: &mut ChangeSink<'_>) -> Result<Option<u64>> {
        let c = self
            .coherence
            .take()
            .ok_or_else(|| not_enabled(&self.table))?;
        let result = c.changes(self, since, sink);
        self.coherence = Some(c);
        result
    }

    fn compact(&mut self, keep: u64) -> Result<()> {
        let c = self
            .coherence
            .take()
            .ok_or_else(|| not_enabled(&self.table))?;
        let result = c.compact(self, keep);
        self.coherence = Some(c);
        result
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
        self.open(&TableSpec::new(String::new(), Format::Text, Format::Text))
    }
    fn apply(&mut self, _: &Batch) -> Result<()> {
        self.load(&mut |_, _| Ok(()))
    }
}
