//! PostgreSQL through the `postgres` crate (feature `postgres`).

use postgres::fallible_iterator::FallibleIterator;
use postgres::types::{FromSql, ToSql, Type};
use postgres::{Client, NoTls, Row, Statement, Transaction};
use std::time::{Duration, Instant};

use crate::codec::Format;
use crate::error::{redact, show_bytes, Action, BoxError, Error, Result};
use crate::store::changes::{coherence_methods, not_enabled, Coherence};
use crate::store::dialect::{pg_table_and_partitions, Marks};
use crate::store::support::{
    all_rows_written, deletes_kept, not_opened, open_table, redial, Catalog, Field, IDLE_CHECK,
};
use crate::store::{
    cannot_reconnect, db_error, opened, Batch, ChangeSignal, ChangeSink, Dialect, IntoStore,
    PutSource, RowSink, Store, TableSpec,
};

const D: Dialect = Dialect::Postgres;

/// How long connecting (or checking a connection) may take when the URL does not say
/// (`connect_timeout`).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// How long data sent may go unacknowledged before the connection is given up, when
/// the URL does not say (`tcp_user_timeout`).
const TCP_USER_TIMEOUT: Duration = Duration::from_secs(30);

/// A [`Store`] on a `postgres::Client`; what `DbHashMap::open(client)` builds.
///
/// A batch is one transaction of at most three statements whatever its size: the
/// keys and values are bound as two arrays and spread with `unnest`.
pub struct PostgresStore {
    client: Client,
    /// Known when opened from a URL: then a lost connection is made again.
    url: Option<String>,
    table: Option<TableSpec>,
    stmts: Option<Statements>,
    /// Set by `enable_changes` (coherence).
    coherence: Option<Coherence>,
    /// `open` made the table (it was absent).
    made_table: bool,
    /// When the connection last answered: one unused for long is checked before a write.
    last_used: Instant,
    /// The table has triggers or rules of its own (not coherence's): a single write then
    /// runs in a transaction, so that a write its checks refuse takes back what those
    /// did too. Without them a single write is one statement, committed on its own.
    guarded: bool,
    /// The connection goes through a pooler (pgbouncer in transaction mode, say): the
    /// next transaction may run on another server connection, so no session state is
    /// trusted; statements are sent whole instead of prepared, and watching polls.
    pooled: bool,
}

struct Statements {
    upsert: Sql,
    upsert_many: Sql,
    /// `upsert_many` that writes nothing when the table has triggers or rules of its
    /// own: run on its own (committed as it ends), it is then all or nothing even when
    /// one was added since the open.
    upsert_alone: Sql,
    delete: Sql,
    delete_many: Sql,
    delete_all: Sql,
    count: Sql,
    /// How many of the keys bound as an array the table holds.
    count_keys: Sql,
    select_value: Sql,
}

/// A statement the store runs often: prepared once on a connection of its own; sent
/// whole each time (an unnamed statement: parse, bind and execute in one round trip)
/// behind a pooler, where a statement prepared in one transaction may be missing in
/// the next, or another client's of the same name may be there.
enum Sql {
    Prepared(Statement),
    Sent {
        sql: String,
        /// The parameters' types: `UNKNOWN` lets the server infer one from the column,
        /// as preparing does; arrays must be named to be encoded.
        types: Vec<Type>,
    },
}

/// Runs a [`Sql`] on a client or in a transaction.
trait Run {
    /// The rows the statement returned and, for a write, how many rows it changed.
    fn run(
        &mut self,
        s: &Sql,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<(Vec<Row>, u64), postgres::Error>;

    /// How many rows the statement changed.
    fn changed(&mut self, s: &Sql, params: &[&(dyn ToSql + Sync)]) -> Result<u64, postgres::Error> {
        Ok(self.run(s, params)?.1)
    }

    /// The rows of a statement sent whole (one round trip, nothing left on the
    /// server), its parameters' types inferred by the server.
    fn typed(
        &mut self,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Vec<Row>, postgres::Error>;

    /// The one row the statement returned, if any.
    fn row(
        &mut self,
        s: &Sql,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Option<Row>, postgres::Error> {
        Ok(self.run(s, params)?.0.into_iter().next())
    }
}

macro_rules! impl_run {
    ($t:ty) => {
        impl Run for $t {
            fn run(
                &mut self,
                s: &Sql,
                params: &[&(dyn ToSql + Sync)],
            ) -> Result<(Vec<Row>, u64), postgres::Error> {
                let mut it = match s {
                    Sql::Prepared(stmt) => self.query_raw(stmt, params.iter().copied())?,
                    Sql::Sent { sql, types } => {
                        let typed = params.iter().copied().zip(types.iter().cloned());
                        self.query_typed_raw(sql, typed)?
                    }
                };
                let rows: Vec<Row> = it.by_ref().collect()?;
                let changed = it.rows_affected().unwrap_or(rows.len() as u64);
                Ok((rows, changed))
            }

            fn typed(
                &mut self,
                sql: &str,
                params: &[&(dyn ToSql + Sync)],
            ) -> Result<Vec<Row>, postgres::Error> {
                let typed = params.iter().map(|p| (*p, Type::UNKNOWN));
                self.query_typed_raw(sql, typed)?.collect()
            }
        }
    };
}
impl_run!(Client);
impl_run!(Transaction<'_>);

/// Whether the client reaches the server through a pooler (pgbouncer, a cloud's
/// proxy), which may run each transaction on another server connection: the server
/// listens on another port than the one connected to. (A plain TCP proxy or a port
/// mapping looks the same, and is treated alike: correct, a little slower.)
fn through_pooler(c: &mut Client, config: &postgres::Config) -> Result<bool, postgres::Error> {
    let mut port = None;
    for m in c.simple_query("SELECT current_setting('port')")? {
        if let postgres::SimpleQueryMessage::Row(r) = m {
            port = r.get(0).and_then(|p| p.parse::<u16>().ok());
        }
    }
    let ports = config.get_ports();
    Ok(match port {
        Some(port) if ports.is_empty() => port != 5432,
        Some(port) => !ports.contains(&port),
        None => false,
    })
}

/// Whether a failed connection may succeed soon: the server was unreachable, starting,
/// shutting down, out of connections, or read-only; not a refused login or a missing
/// database.
fn passing(e: &Error) -> bool {
    let Error::Connect { source, .. } = e else {
        return false;
    };
    match source
        .downcast_ref::<postgres::Error>()
        .and_then(postgres::Error::code)
    {
        None => true,
        Some(code) => ["08", "53", "57"].contains(&&code.code()[..2]),
    }
}

/// Whether the server forgot a prepared statement, or holds another of its name: the
/// connection goes through a pooler that the open did not recognize.
fn statement_lost(e: &postgres::Error) -> bool {
    use postgres::error::SqlState;
    e.code() == Some(&SqlState::INVALID_SQL_STATEMENT_NAME)
        || e.code() == Some(&SqlState::DUPLICATE_PSTATEMENT)
}

fn statement_lost_in(e: &Error) -> bool {
    matches!(e, Error::Database { source, .. }
        if source.downcast_ref::<postgres::Error>().is_some_and(statement_lost))
}

impl std::fmt::Debug for PostgresStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PostgresStore")
            .field("url", &self.url.as_deref().map(redact))
            .field("table", &self.table)
            .finish_non_exhaustive()
    }
}

/// The rows of `COPY … TO STDOUT (FORMAT binary)` with two columns: a header, then
/// per row a field count and each field's length (-1: NULL) and bytes, then -1.
struct CopyRows<R> {
    input: std::io::BufReader<R>,
    key: Vec<u8>,
    value: Vec<u8>,
}

/// The signature that opens PostgreSQL's binary COPY format.
const COPY_SIGNATURE: &[u8; 11] = b"PGCOPY\n\xff\r\n\0";

impl<R: std::io::Read> CopyRows<R> {
    fn new(input: R) -> Result<Self, BoxError> {
        let mut input = std::io::BufReader::with_capacity(1 << 16, input);
        let mut header = [0u8; 19];
        std::io::Read::read_exact(&mut input, &mut header)?;
        if &header[..11] != COPY_SIGNATURE {
            return Err("COPY did not start with the binary format's signature".into());
        }
        let extension = u32::from_be_bytes([header[15], header[16], header[17], header[18]]);
        std::io::copy(
            &mut std::io::Read::take(&mut input, u64::from(extension)),
            &mut std::io::sink(),
        )?;
        Ok(CopyRows {
            input,
            key: Vec::new(),
            value: Vec::new(),
        })
    }

    /// The next row's key and value (`None`: NULL), or `None` at the end.
    #[allow(clippy::type_complexity)]
    fn next(&mut self) -> Result<Option<(Option<&[u8]>, Option<&[u8]>)>, BoxError> {
        let mut count = [0u8; 2];
        std::io::Read::read_exact(&mut self.input, &mut count)?;
        match i16::from_be_bytes(count) {
            -1 => return Ok(None),
            2 => {}
            n => return Err(format!("COPY gave a row of {n} fields, not 2").into()),
        }
        let key = Self::field(&mut self.input, &mut self.key)?;
        let value = Self::field(&mut self.input, &mut self.value)?;
        Ok(Some((
            key.then_some(self.key.as_slice()),
            value.then_some(self.value.as_slice()),
        )))
    }

    /// Reads one field into `into`; false if it is NULL.
    fn field(input: &mut std::io::BufReader<R>, into: &mut Vec<u8>) -> Result<bool, BoxError> {
        let mut len = [0u8; 4];
        std::io::Read::read_exact(input, &mut len)?;
        let len = i32::from_be_bytes(len);
        if len < 0 {
            return Ok(false);
        }
        into.clear();
        into.resize(len as usize, 0);
        std::io::Read::read_exact(input, into)?;
        Ok(true)
    }
}

/// A column's raw bytes: the binary form of `text` is its UTF-8, of `bytea` its bytes.
struct Raw<'a>(&'a [u8]);

impl<'a> FromSql<'a> for Raw<'a> {
    fn from_sql(_: &Type, raw: &'a [u8]) -> Result<Self, BoxError> {
        Ok(Raw(raw))
    }
    fn accepts(ty: &Type) -> bool {
        [
            Type::TEXT,
            Type::VARCHAR,
            Type::BPCHAR,
            Type::NAME,
            Type::BYTEA,
            Type::UNKNOWN,
        ]
        .contains(ty)
    }
}

impl PostgresStore {
    /// Wraps a client. A client that loses its connection cannot be revived: open the
    /// map again with a new client (a map opened from a URL reconnects by itself).
    pub fn new(client: Client) -> Self {
        PostgresStore {
            client,
            url: None,
            table: None,
            stmts: None,
            coherence: None,
            made_table: false,
            last_used: Instant::now(),
            guarded: true,
            pooled: false,
        }
    }

    pub(crate) fn connect(url: &str) -> Result<Self> {
        let (client, pooled) = Self::dial(url)?;
        Ok(PostgresStore {
            client,
            pooled,
            url: Some(url.to_string()),
            table: None,
            stmts: None,
            coherence: None,
            made_table: false,
            last_used: Instant::now(),
            guarded: true,
        })
    }

    /// Connects again after the connection was lost, waiting for the server as long as
    /// one connection may take (the URL's `connect_timeout`, else 10 s): a cluster that
    /// fails over has no primary for a while, its standbys refuse a
    /// `target_session_attrs=read-write` session.
    fn redial(url: &str) -> Result<(Client, bool)> {
        let window = url
            .parse::<postgres::Config>()
            .ok()
            .and_then(|c| c.get_connect_timeout().copied())
            .unwrap_or(CONNECT_TIMEOUT);
        redial(window, || Self::dial(url), passing)
    }

    /// Connects; and tells whether the connection goes through a pooler.
    fn dial(url: &str) -> Result<(Client, bool)> {
        let fail = |e: postgres::Error| Error::Connect {
            url: redact(url),
            backend: D.name(),
            source: e.into(),
        };
        let unreadable = || Error::Url {
            url: redact(url),
            reason: "the driver cannot read a host from it; in a URL, characters such as \
                     / ? # @ : ; { } = and spaces in the user name or password must be \
                     percent-encoded (%2F for /, %3F for ?, %40 for @, %3A for :, %3B for ;)"
                .into(),
        };
        // An `@` after a `/`, `?` or `#` of the authority: a password with those
        // characters, not encoded, which the driver reads as something else entirely.
        let rest = url.split_once("://").map_or("", |(_, rest)| rest);
        if let Some(at) = rest.find('@') {
            // What follows looks like host:port/database, not a query's value.
            if rest[..at].contains(['/', '?', '#']) && rest[at..].contains('/') {
                return Err(unreadable());
            }
        }
        let mut config: postgres::Config = url.parse().map_err(|_| unreadable())?;
        if config.get_hosts().is_empty() && url.contains("://") {
            return Err(unreadable());
        }
        // A server that does not answer (a paused network, a dead host) fails the
        // connection in bounded time rather than after the kernel gives up (minutes),
        // and an idle connection that died is noticed by the keepalives.
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(CONNECT_TIMEOUT);
        }
        // A paused or broken network: data sent and not acknowledged for this long ends
        // the connection (the call fails, and the map heals as for any lost connection)
        // instead of waiting for the kernel's retransmissions (about 15 minutes). A slow
        // answer to a statement that arrived is not cut.
        if config.get_tcp_user_timeout().is_none() {
            config.tcp_user_timeout(TCP_USER_TIMEOUT);
        }
        config.keepalives(true);
        let mut client = config.connect(NoTls).map_err(fail)?;
        let pooled = through_pooler(&mut client, &config).map_err(fail)?;
        Ok((client, pooled))
    }

    fn prepare(&mut self, t: &TableSpec) -> Result<()> {
        let result = self.prepare_as(t, self.pooled);
        match result {
            // Another client's statement of the same name on this server connection.
            Err(e) if !self.pooled && statement_lost_in(&e) => {
                self.pooled_now(t);
                self.prepare_as(t, true)
            }
            other => other,
        }
    }

    fn prepare_as(&mut self, t: &TableSpec, pooled: bool) -> Result<()> {
        let c = &mut self.client;
        let fail = |e| db_error(Action::Open, t, D.name(), e);
        let array = |f: Format| match f {
            Format::Text => Type::TEXT_ARRAY,
            Format::Binary => Type::BYTEA_ARRAY,
        };
        let (keys, values) = (array(t.key_format), array(t.value_format));
        let mut sql = |sql: String, types: &[Type]| -> Result<Sql> {
            if pooled {
                Ok(Sql::Sent {
                    sql,
                    types: types.to_vec(),
                })
            } else {
                c.prepare_typed(&sql, types)
                    .map(Sql::Prepared)
                    .map_err(fail)
            }
        };
        let one = [Type::UNKNOWN];
        self.stmts = Some(Statements {
            upsert: sql(D.upsert(t, 1), &[Type::UNKNOWN, Type::UNKNOWN])?,
            upsert_many: sql(D.upsert_arrays(t), &[keys.clone(), values.clone()])?,
            upsert_alone: sql(upsert_alone(t), &[keys.clone(), values])?,
            delete: sql(D.delete_keys(t, 1), &one)?,
            delete_many: sql(D.delete_array(t), std::slice::from_ref(&keys))?,
            delete_all: sql(D.delete_all(t), &[])?,
            count: sql(D.count_rows(t), &[])?,
            count_keys: sql(D.count_keys_array(t), &[keys])?,
            select_value: sql(D.select_value(t, Marks::Native), &one)?,
        });
        Ok(())
    }

    /// A statement went missing (or another's name was taken) on a connection that
    /// looked direct: from now on it is treated as pooled.
    fn pooled_now(&mut self, t: &TableSpec) {
        tracing::info!(table = %t.name,
            "PostgreSQL: a prepared statement was lost between transactions, as behind a \
             pooler in transaction mode; statements are sent whole from now on");
        self.pooled = true;
    }

    /// Before a write: a connection known to be closed, or found closed by one round
    /// trip after it was unused for a while, is made again when the store knows the
    /// URL; nothing was sent on it, so nothing is in doubt.
    fn ensure_connected(&mut self) -> Result<()> {
        if self.url.is_some()
            && (self.client.is_closed()
                || (self.last_used.elapsed() >= IDLE_CHECK
                    && self.client.is_valid(CONNECT_TIMEOUT).is_err()))
        {
            self.reconnect()?;
        }
        self.last_used = Instant::now();
        Ok(())
    }

    /// Refuses a client inside a transaction block that its caller began: outside one,
    /// every statement is a transaction of its own, which starts with the statement.
    /// The simple query protocol makes both timestamps the statement's own.
    fn check_not_in_transaction(&mut self) -> Result<()> {
        let sql = "SELECT CASE WHEN transaction_timestamp() = statement_timestamp() \
                   THEN 'idle' ELSE 'in transaction' END";
        // The driver sends and reads UTF-8: a session set to another encoding
        // (`SET client_encoding`) would store other characters than those written.
        let encoding = "SET client_encoding TO 'UTF8'";
        let fail = |e: postgres::Error| Error::Database {
            action: Action::Open,
            table: String::new(),
            backend: D.name(),
            source: e.into(),
        };
        let state = match self.client.simple_query(sql) {
            Ok(state) => state,
            // in_failed_sql_transaction: the caller's transaction failed and waits for
            // its ROLLBACK.
            Err(e) if e.code() == Some(&postgres::error::SqlState::IN_FAILED_SQL_TRANSACTION) => {
                return Err(Error::ConnectionState {
                    backend: D.name(),
                    reason: "it is inside a failed transaction block that the caller began; \
                             roll it back before handing the client to the map"
                        .into(),
                })
            }
            Err(e) => return Err(fail(e)),
        };
        let in_tx = state.iter().any(|m| match m {
            postgres::SimpleQueryMessage::Row(r) => r.get(0) == Some("in transaction"),
            _ => false,
        });
        if !in_tx {
            self.client.batch_execute(encoding).map_err(fail)?;
        }
        if in_tx {
            return Err(Error::ConnectionState {
                backend: D.name(),
                reason: "it is inside a transaction block that the caller began (BEGIN); \
                         commit or roll it back before handing the client to the map"
                    .into(),
            });
        }
        Ok(())
    }

    fn write(&mut self, t: &TableSpec, batch: &Batch) -> Result<()> {
        let Some(s) = &self.stmts else {
            return Err(not_opened(D.name()));
        };
        let single = batch.len() == 1 && !batch.clear && !self.guarded;
        let binds = |format, bytes| Bind::new(t, format, bytes);
        let classify = |e, committing| write_error(t, e, committing);
        if single {
            if let Some((k, v)) = batch.puts.first() {
                let (k, v) = (binds(t.key_format, k)?, binds(t.value_format, v)?);
                let written = self
                    .client
                    .changed(&s.upsert, &[&k, &v])
                    .map_err(|e| classify(e, true))?;
                // A statement on its own: what it did not write is not there either.
                all_rows_written(written, 1)
                    .map_err(|e| db_error(Action::Write, t, D.name(), e))?;
            } else if let Some(k) = batch.deletes.first() {
                let k = binds(t.key_format, k)?;
                let deleted = self
                    .client
                    .changed(&s.delete, &[&k])
                    .map_err(|e| classify(e, true))?;
                // None deleted: the key was gone already (another writer), or a rule or
                // trigger kept it.
                if deleted == 0
                    && may_keep_deletes(&mut self.client, t).map_err(|e| classify(e, false))?
                    && self
                        .client
                        .row(&s.select_value, &[&k])
                        .map_err(|e| classify(e, false))?
                        .is_some()
                {
                    return Err(db_error(
                        Action::Write,
                        t,
                        D.name(),
                        deletes_kept(1, Some(1)),
                    ));
                }
            }
            return Ok(());
        }
        if !batch.clear && batch.deletes.is_empty() && !self.guarded {
            // Puts only, on a table without triggers or rules of its own: one statement,
            // which is a transaction of its own. One round trip where BEGIN and COMMIT
            // took two more: a shared map's group commit of a few inserts was mostly
            // those (W6: 1.68x the raw driver's time, 0.89x after).
            let (keys, values) = put_binds(t, &batch.puts)?;
            // A lost answer is a lost connection, not an unknown outcome: the map
            // reconnects and runs it again, which leaves what running it once would
            // have left (it sets keys), and only when that fails is the outcome
            // unknown (see `Writer::commit`).
            let written = self
                .client
                .changed(&s.upsert_alone, &[&keys, &values])
                .map_err(|e| classify(e, false))?;
            if written == batch.puts.len() as u64 {
                return Ok(());
            }
            if written > 0 {
                // All or nothing by its condition: a part written cannot be taken back.
                return Err(Error::OutcomeUnknown {
                    table: t.name.clone(),
                    backend: D.name(),
                    source: format!(
                        "{written} of {} rows written by one statement",
                        batch.puts.len()
                    )
                    .into(),
                });
            }
            // Nothing written: a trigger or rule came since the open. Checked in a
            // transaction from now on.
            self.guarded = true;
            return self.write(t, batch);
        }
        let mut tx = self.client.transaction().map_err(|e| classify(e, false))?;
        write_checked(&mut tx, s, t, batch)?;
        // Dropping `tx` on any error above rolls the transaction back.
        tx.commit().map_err(|e| classify(e, true))
    }

    /// `apply_seq`: the batches in order, each checked as `write` checks a batch it
    /// cannot send as one statement, in one transaction.
    fn write_seq(&mut self, t: &TableSpec, batches: &[Batch]) -> Result<()> {
        let Some(s) = &self.stmts else {
            return Err(not_opened(D.name()));
        };
        let mut tx = self
            .client
            .transaction()
            .map_err(|e| write_error(t, e, false))?;
        for batch in batches {
            write_checked(&mut tx, s, t, batch)?;
        }
        tx.commit().map_err(|e| write_error(t, e, true))
    }

    /// Runs `write` on the opened table; a statement the server did not know (it never
    /// ran: a pooler in transaction mode) makes the store send its statements whole
    /// from then on, and `write` goes again.
    fn with_statements(
        &mut self,
        write: impl Fn(&mut Self, &TableSpec) -> Result<()>,
    ) -> Result<()> {
        self.ensure_connected()?;
        let t = opened(&self.table, D.name())?.clone();
        match write(self, &t) {
            Err(e) if !self.pooled && statement_lost_in(&e) => {
                self.pooled_now(&t);
                self.prepare(&t)?;
                write(self, &t)
            }
            other => other,
        }
    }
}

/// A write's error: a statement the server answered has a known outcome. Without an
/// answer (the connection broke), a commit, or a statement that commits on its own
/// (`committing`), may or may not have happened.
fn write_error(t: &TableSpec, e: postgres::Error, committing: bool) -> Error {
    if committing && e.as_db_error().is_none() {
        Error::OutcomeUnknown {
            table: t.name.clone(),
            backend: D.name(),
            source: e.into(),
        }
    } else {
        db_error(Action::Write, t, D.name(), e)
    }
}

/// One batch in a transaction, each part checked: a clear or delete that the table
/// kept rows of (a rule, a trigger) and puts it did not all write are errors. The
/// caller commits, or drops the transaction on an error, which rolls it back.
fn write_checked(
    tx: &mut postgres::Transaction<'_>,
    s: &Statements,
    t: &TableSpec,
    batch: &Batch,
) -> Result<()> {
    let fail = |e| write_error(t, e, false);
    if batch.clear {
        tx.changed(&s.delete_all, &[]).map_err(fail)?;
    }
    if batch.clear && may_keep_deletes(tx, t).map_err(fail)? {
        let left: i64 = tx.row(&s.count, &[]).map_err(fail)?.map_or(0, |r| r.get(0));
        if left > 0 {
            return Err(db_error(
                Action::Write,
                t,
                D.name(),
                deletes_kept(left as usize, None),
            ));
        }
    }
    if !batch.deletes.is_empty() {
        let keys = batch
            .deletes
            .iter()
            .map(|k| Bind::new(t, t.key_format, k))
            .collect::<Result<Vec<_>>>()?;
        let deleted = tx.changed(&s.delete_many, &[&keys]).map_err(fail)?;
        if deleted < keys.len() as u64 && may_keep_deletes(tx, t).map_err(fail)? {
            let kept: i64 = tx
                .row(&s.count_keys, &[&keys])
                .map_err(fail)?
                .map_or(0, |r| r.get(0));
            if kept > 0 {
                let kept = deletes_kept(kept as usize, Some(keys.len()));
                return Err(db_error(Action::Write, t, D.name(), kept));
            }
        }
    }
    if !batch.puts.is_empty() {
        let (keys, values) = put_binds(t, &batch.puts)?;
        let written = tx
            .changed(&s.upsert_many, &[&keys, &values])
            .map_err(fail)?;
        all_rows_written(written, batch.puts.len())
            .map_err(|e| db_error(Action::Write, t, D.name(), e))?;
    }
    Ok(())
}

/// Rows written to `COPY … FROM STDIN (FORMAT binary)`: the header, then per row a field
/// count and each field's length and bytes (with `numbered`, first a row number, so that
/// the last of a repeated key can be told), then -1.
struct CopyIn<W: std::io::Write> {
    out: std::io::BufWriter<W>,
    numbered: bool,
    rows: i64,
}

impl<'a> CopyIn<postgres::CopyInWriter<'a>> {
    fn new(writer: postgres::CopyInWriter<'a>, numbered: bool) -> Result<Self, BoxError> {
        let mut out = std::io::BufWriter::with_capacity(1 << 16, writer);
        std::io::Write::write_all(&mut out, COPY_SIGNATURE)?;
        std::io::Write::write_all(&mut out, &[0u8; 8])?;
        Ok(CopyIn {
            out,
            numbered,
            rows: 0,
        })
    }

    /// Writes every chunk `next` hands over; how many rows it wrote.
    fn feed(&mut self, next: &mut PutSource<'_>) -> Result<usize> {
        let mut back = None;
        while let Some(chunk) = next(back.take()) {
            let chunk = chunk?;
            for (k, v) in &chunk {
                self.row(k, v).map_err(|e| Error::Database {
                    action: Action::Write,
                    table: String::new(),
                    backend: D.name(),
                    source: e.into(),
                })?;
            }
            back = Some(chunk);
        }
        Ok(self.rows as usize)
    }

    fn row(&mut self, key: &[u8], value: &[u8]) -> std::io::Result<()> {
        use std::io::Write;
        let fields: i16 = if self.numbered { 3 } else { 2 };
        self.out.write_all(&fields.to_be_bytes())?;
        if self.numbered {
            self.out.write_all(&8i32.to_be_bytes())?;
            self.out.write_all(&self.rows.to_be_bytes())?;
        }
        for field in [key, value] {
            let len = i32::try_from(field.len())
                .map_err(|_| std::io::Error::other("a field longer than 2 GiB"))?;
            self.out.write_all(&len.to_be_bytes())?;
            self.out.write_all(field)?;
        }
        self.rows += 1;
        Ok(())
    }

    /// Ends the COPY; how many rows the server took.
    fn finish(self) -> Result<u64, BoxError> {
        let mut out = self.out;
        std::io::Write::write_all(&mut out, &(-1i16).to_be_bytes())?;
        let writer = out.into_inner().map_err(|e| e.into_error())?;
        Ok(writer.finish()?)
    }
}

/// Whether the table has triggers (coherence's aside) or rules, whose side effects a
/// refused single write must take back.
fn has_triggers_or_rules(c: &mut Client, t: &TableSpec) -> Result<bool, postgres::Error> {
    Ok(
        c.typed(&format!("SELECT {}", own_triggers_or_rules(t)), &[])?
            .first()
            .is_some_and(|r| r.get(0)),
    )
}

/// An SQL condition: the table has a trigger (coherence's aside; on it or on any of its
/// partitions, whose row triggers fire for the rows routed there) or a rule.
fn own_triggers_or_rules(t: &TableSpec) -> String {
    let name = D.layout_param(t).replace('\'', "''");
    let prefix = format!("{}__wth_", t.name).replace('\'', "''");
    format!(
        "(EXISTS (SELECT 1 FROM pg_trigger WHERE tgrelid IN {} AND NOT tgisinternal \
         AND left(tgname, {}) <> '{prefix}') \
         OR EXISTS (SELECT 1 FROM pg_rewrite WHERE ev_class = to_regclass('{name}') \
         AND rulename <> '_RETURN'))",
        pg_table_and_partitions(&format!("to_regclass('{name}')")),
        t.name.chars().count() + 6
    )
}

/// `upsert_arrays`, writing nothing when the table has a trigger or a rule of its own
/// (`own_triggers_or_rules`), which could drop some of the rows.
fn upsert_alone(t: &TableSpec) -> String {
    let upsert = D.upsert_arrays(t);
    // The last one: the table's name comes before it, and may hold any text.
    let (insert, conflict) = upsert
        .rsplit_once(" ON CONFLICT")
        .expect("an upsert has ON CONFLICT");
    format!(
        "{insert} WHERE NOT {} ON CONFLICT{conflict}",
        own_triggers_or_rules(t)
    )
}

/// Whether a rule or trigger of the table could keep a row a DELETE names. Asked only
/// when a DELETE removed fewer rows than it named: without such a rule or trigger the
/// others were gone already (another writer deleted them), and looking them up could
/// find a row a third writer put back since.
fn may_keep_deletes(c: &mut impl Run, t: &TableSpec) -> Result<bool, postgres::Error> {
    let Some(sql) = D.delete_keepers_query(Marks::Native) else {
        return Ok(false);
    };
    let n: Option<String> = c
        .typed(&sql, &[&D.layout_param(t)])?
        .first()
        .and_then(|r| r.get(0));
    Ok(n.is_none_or(|n| n.trim() != "0"))
}

/// The keys and the values of `puts`, each bound as its column's type.
fn put_binds<'a>(
    t: &TableSpec,
    puts: &'a [(Vec<u8>, Vec<u8>)],
) -> Result<(Vec<Bind<'a>>, Vec<Bind<'a>>)> {
    let mut keys = Vec::with_capacity(puts.len());
    let mut values = Vec::with_capacity(puts.len());
    for (k, v) in puts {
        keys.push(Bind::new(t, t.key_format, k)?);
        values.push(Bind::new(t, t.value_format, v)?);
    }
    Ok((keys, values))
}

/// A key or value bound as the column's type: `text` takes `&str`, `bytea` `&[u8]`.
#[derive(Debug)]
enum Bind<'a> {
    Text(&'a str),
    Bytes(&'a [u8]),
}

impl<'a> Bind<'a> {
    fn new(t: &TableSpec, format: Format, bytes: &'a [u8]) -> Result<Self> {
        match format {
            Format::Binary => Ok(Bind::Bytes(bytes)),
            Format::Text => std::str::from_utf8(bytes)
                .map(Bind::Text)
                .map_err(|e| db_error(Action::Write, t, D.name(), e)),
        }
    }
}

impl ToSql for Bind<'_> {
    fn to_sql(
        &self,
        ty: &Type,
        out: &mut postgres::types::private::BytesMut,
    ) -> Result<postgres::types::IsNull, BoxError> {
        match self {
            Bind::Text(s) => s.to_sql(ty, out),
            Bind::Bytes(b) => b.to_sql(ty, out),
        }
    }
    fn accepts(ty: &Type) -> bool {
        <&str as ToSql>::accepts(ty) || <&[u8] as ToSql>::accepts(ty)
    }
    postgres::types::to_sql_checked!();
}

impl Store for PostgresStore {
    fn backend(&self) -> &'static str {
        D.name()
    }

    fn reads_slices(&self) -> bool {
        true
    }

    fn open(&mut self, t: &TableSpec) -> Result<()> {
        D.check_table_name(&t.name)?;
        self.ensure_connected()?;
        self.check_not_in_transaction()?;
        self.made_table = open_table(&mut self.client, t, D, Marks::Native, D.name())?;
        self.guarded = has_triggers_or_rules(&mut self.client, t)
            .map_err(|e| db_error(Action::Open, t, D.name(), e))?;
        self.prepare(t)?;
        self.table = Some(t.clone());
        Ok(())
    }

    fn load(&mut self, sink: &mut RowSink<'_>) -> Result<()> {
        self.ensure_connected()?;
        let t = opened(&self.table, D.name())?;
        let fail = |e: BoxError| db_error(Action::Load, t, D.name(), e);
        // COPY in binary: the rows as their bytes (text as UTF-8, bytea as is), with
        // less framing per row than a query's result.
        // A query, not the table: a partitioned table's rows are in its partitions,
        // which `COPY table TO` does not read; and a slice's rows are a range.
        let sql = format!("COPY ({}) TO STDOUT (FORMAT binary)", D.select_all(t));
        // In a transaction: the COPY's statement is prepared and closed on one server
        // connection even behind a pooler.
        let mut tx = self.client.transaction().map_err(|e| fail(e.into()))?;
        let copy = tx.copy_out(&sql).map_err(|e| fail(e.into()))?;
        let mut rows = CopyRows::new(copy).map_err(fail)?;
        while let Some((key, value)) = rows.next().map_err(fail)? {
            match (key, value) {
                (Some(k), Some(v)) => sink(k, v)?,
                (k, _) => {
                    return Err(Error::Decode {
                        what: if k.is_none() { "key" } else { "value" },
                        table: t.name.clone(),
                        row: k.map_or_else(|| "with a NULL key".into(), show_bytes),
                        source: "the column holds NULL".into(),
                    })
                }
            }
        }
        drop(rows);
        tx.commit().map_err(|e| fail(e.into()))
    }

    fn apply(&mut self, batch: &Batch) -> Result<()> {
        if batch.is_empty() {
            return Ok(());
        }
        self.with_statements(|store, t| store.write(t, batch))
    }

    fn apply_seq(&mut self, batches: &[Batch]) -> Result<()> {
        self.with_statements(|store, t| store.write_seq(t, batches))
    }

    fn applies_seq(&self) -> bool {
        true
    }

    fn max_key_len(&self) -> Option<usize> {
        D.max_key_len()
    }

    fn rows_hint(&mut self) -> Option<usize> {
        // A slice's count would read its rows once more (on PostgreSQL, each on a heap
        // page of its own where the slice's rows were written over time): a map of a
        // slice grows as it fills instead.
        if self.table.as_ref().is_some_and(|t| t.key_prefix.is_some()) {
            return None;
        }
        let s = self.stmts.as_ref()?;
        let n: i64 = self.client.row(&s.count, &[]).ok()??.get(0);
        usize::try_from(n).ok()
    }

    fn can_reconnect(&self) -> bool {
        self.url.is_some()
    }

    fn get(&mut self, key: &[u8]) -> Result<Option<Vec<u8>>> {
        self.ensure_connected()?;
        let t = opened(&self.table, D.name())?;
        let fail = |e| db_error(Action::Load, t, D.name(), e);
        let k = Bind::new(t, t.key_format, key)?;
        let s = self.stmts.as_ref().ok_or_else(|| not_opened(D.name()))?;
        let Some(row) = self.client.row(&s.select_value, &[&k]).map_err(fail)? else {
            return Ok(None);
        };
        let value: Option<Raw<'_>> = row.try_get(0).map_err(fail)?;
        match value {
            Some(v) => Ok(Some(v.0.to_vec())),
            None => Err(Error::Decode {
                what: "value",
                table: t.name.clone(),
                row: show_bytes(key),
                source: "the column holds NULL".into(),
            }),
        }
    }

    fn count(&mut self) -> Result<u64> {
        self.ensure_connected()?;
        let t = opened(&self.table, D.name())?;
        let s = self.stmts.as_ref().ok_or_else(|| not_opened(D.name()))?;
        let n: i64 = self
            .client
            .row(&s.count, &[])
            .map_err(|e| db_error(Action::Load, t, D.name(), e))?
            .map_or(0, |r| r.get(0));
        Ok(n.max(0) as u64)
    }

    fn scan(
        &mut self,
        from: Option<&[u8]>,
        limit: Option<u64>,
        sink: &mut RowSink<'_>,
    ) -> Result<()> {
        self.ensure_connected()?;
        let t = opened(&self.table, D.name())?;
        let fail = |e: BoxError| db_error(Action::Load, t, D.name(), e);
        let null = |k: Option<&[u8]>| Error::Decode {
            what: if k.is_none() { "key" } else { "value" },
            table: t.name.clone(),
            row: k.map_or_else(|| "with a NULL key".into(), show_bytes),
            source: "the column holds NULL".into(),
        };
        if from.is_none() && limit.is_none() {
            // The whole table: COPY in binary, as `load` reads it, in key order.
            let sql = format!(
                "COPY ({}) TO STDOUT (FORMAT binary)",
                D.scan(t, false, false, Marks::Native)
            );
            let mut tx = self.client.transaction().map_err(|e| fail(e.into()))?;
            let copy = tx.copy_out(&sql).map_err(|e| fail(e.into()))?;
            let mut rows = CopyRows::new(copy).map_err(fail)?;
            while let Some((key, value)) = rows.next().map_err(fail)? {
                match (key, value) {
                    (Some(k), Some(v)) => sink(k, v)?,
                    (k, _) => return Err(null(k)),
                }
            }
            drop(rows);
            return tx.commit().map_err(|e| fail(e.into()));
        }
        let sql = D.scan(t, from.is_some(), limit.is_some(), Marks::Native);
        let from = from.map(|k| Bind::new(t, t.key_format, k)).transpose()?;
        let limit = limit.map(|n| i64::try_from(n).unwrap_or(i64::MAX));
        // Sent whole, with the types named: nothing prepared is left on the server.
        let mut params: Vec<(&(dyn ToSql + Sync), Type)> = Vec::new();
        if let Some(from) = &from {
            params.push((from, Type::UNKNOWN));
        }
        if let Some(limit) = &limit {
            params.push((limit, Type::INT8));
        }
        let mut rows = self
            .client
            .query_typed_raw(&sql, params)
            .map_err(|e| fail(e.into()))?;
        while let Some(row) = rows.next().map_err(|e| fail(e.into()))? {
            let k: Option<Raw<'_>> = row.try_get(0).map_err(|e| fail(e.into()))?;
            let v: Option<Raw<'_>> = row.try_get(1).map_err(|e| fail(e.into()))?;
            match (k, v) {
                (Some(k), Some(v)) => sink(k.0, v.0)?,
                (k, _) => return Err(null(k.map(|k| k.0))),
            }
        }
        Ok(())
    }

    fn put_rows(
        &mut self,
        replace: bool,
        distinct_keys: bool,
        next: &mut PutSource<'_>,
    ) -> Result<()> {
        self.ensure_connected()?;
        let t = opened(&self.table, D.name())?.clone();
        let fail = |e: BoxError| db_error(Action::Write, &t, D.name(), e);
        let mut tx = self.client.transaction().map_err(|e| fail(e.into()))?;
        let mut truncated = false;
        if replace && t.key_prefix.is_none() {
            // TRUNCATE empties a big table at once where DELETE writes every row dead
            // (measured: a copy of 1,000,000 rows over as many took 3.4-3.9 s with DELETE,
            // 1.2 s into an empty table). It is transactional, and coherence's TRUNCATE
            // trigger sees it; where it is refused (a foreign key points here, no TRUNCATE
            // right), DELETE it is.
            truncated = {
                let mut savepoint = tx.transaction().map_err(|e| fail(e.into()))?;
                let sql = format!("TRUNCATE {}", D.quote(&t.name));
                match savepoint.batch_execute(&sql) {
                    Ok(()) => savepoint.commit().is_ok(),
                    Err(_) => false,
                }
            };
        }
        if replace && !truncated {
            tx.batch_execute(&D.delete_all(&t))
                .map_err(|e| fail(e.into()))?;
        }
        let (table, key, value) = (D.quote(&t.name), D.quote("key"), D.quote("value"));
        if replace && distinct_keys {
            // Rows of another table into an emptied one: COPY straight in; into a table
            // this transaction truncated, frozen (no later pass to mark the rows seen).
            let freeze = if truncated { ", FREEZE" } else { "" };
            let sql = format!("COPY {table} ({key}, {value}) FROM STDIN (FORMAT binary{freeze})");
            let mut copy =
                CopyIn::new(tx.copy_in(&sql).map_err(|e| fail(e.into()))?, false).map_err(fail)?;
            let total = copy.feed(next)?;
            let written = copy.finish().map_err(fail)?;
            all_rows_written(written, total).map_err(fail)?;
        } else {
            // Keys may repeat, and rows may be there: COPY into a temporary table, then
            // one upsert of the last row of each key.
            let kind = |f| match f {
                Format::Text => "text",
                Format::Binary => "bytea",
            };
            tx.batch_execute(&format!(
                "CREATE TEMPORARY TABLE wth_rows (n bigint, k {}, v {}) ON COMMIT DROP",
                kind(t.key_format),
                kind(t.value_format)
            ))
            .map_err(|e| fail(e.into()))?;
            let mut copy = CopyIn::new(
                tx.copy_in("COPY wth_rows (n, k, v) FROM STDIN (FORMAT binary)")
                    .map_err(|e| fail(e.into()))?,
                true,
            )
            .map_err(fail)?;
            copy.feed(next)?;
            copy.finish().map_err(fail)?;
            let keys: i64 = tx
                .typed("SELECT count(DISTINCT k) FROM wth_rows", &[])
                .map_err(|e| fail(e.into()))?
                .first()
                .map_or(0, |r| r.get(0));
            let (_, written) = tx
                .run(
                    &Sql::Sent {
                        sql: format!(
                            "INSERT INTO {table} ({key}, {value}) \
                         SELECT DISTINCT ON (k) k, v FROM wth_rows ORDER BY k, n DESC \
                         ON CONFLICT ({key}) DO UPDATE SET {value} = EXCLUDED.{value}"
                        ),
                        types: Vec::new(),
                    },
                    &[],
                )
                .map_err(|e| fail(e.into()))?;
            all_rows_written(written, keys.max(0) as usize).map_err(fail)?;
        }
        // Dropping `tx` on any error above rolls back.
        tx.commit().map_err(|e| Error::OutcomeUnknown {
            table: t.name.clone(),
            backend: D.name(),
            source: e.into(),
        })
    }

    fn reconnect(&mut self) -> Result<()> {
        let Some(url) = &self.url else {
            return if self.client.is_closed() {
                Err(cannot_reconnect(&self.table, D.name()))
            } else {
                Ok(())
            };
        };
        if !self.client.is_closed()
            && self
                .client
                .is_valid(std::time::Duration::from_secs(5))
                .is_ok()
        {
            return Ok(());
        }
        let (client, pooled) = Self::redial(url)?;
        self.client = client;
        // Once seen, a pooler is assumed on: the server behind it may be another now.
        self.pooled |= pooled;
        self.last_used = Instant::now();
        if let Some(t) = self.table.clone() {
            self.prepare(&t)?;
        }
        Ok(())
    }

    coherence_methods!(client, D);

    fn change_signal(&mut self, _every: Duration) -> Result<Option<Box<dyn ChangeSignal>>> {
        // Listening needs a connection of its own, made from the URL.
        let Some(url) = self.url.clone() else {
            return Ok(None);
        };
        let t = opened(&self.table, D.name())?.clone();
        if self.pooled {
            // A pooler hands the listening session's server connection to others
            // between transactions: notifications would reach nobody.
            tracing::info!(table = %t.name, "watch: the connection goes through a pooler, \
                which cannot keep a LISTEN; polling the version instead");
            return Ok(None);
        }
        let mut client = Self::dial(&url)?.0;
        let fail = |e| db_error(Action::Watch, &t, D.name(), e);
        // The channel the triggers notify: the table's name hashed into a short,
        // plain identifier.
        let channel: String = client
            .typed("SELECT 'wth_' || md5($1::text)", &[&t.name])
            .map_err(fail)?
            .first()
            .map(|r| r.get(0))
            .unwrap_or_default();
        if let Err(e) = client.batch_execute(&format!("LISTEN \"{channel}\"")) {
            // A hot standby cannot listen (and gets no notifications): poll there.
            tracing::info!(table = %t.name, error = %e, "watch: LISTEN refused; polling the version instead");
            return Ok(None);
        }
        Ok(Some(Box::new(Listener { client, table: t })))
    }
}

/// PostgreSQL's change signal: `LISTEN` on a connection of its own, for the
/// notification the table's triggers send when a writing transaction commits.
struct Listener {
    client: Client,
    table: TableSpec,
}

impl ChangeSignal for Listener {
    fn wait(&mut self, timeout: Duration) -> Result<bool> {
        let mut notes = self.client.notifications();
        let first = notes.timeout_iter(timeout).next();
        let came = first.map_err(|e| db_error(Action::Watch, &self.table, D.name(), e))?;
        if came.is_some() {
            // Those that came meanwhile are the same news.
            while let Ok(Some(_)) = notes.iter().next() {}
        }
        Ok(came.is_some())
    }
}

impl Catalog for Client {
    fn rows(&mut self, sql: &str, param: Option<&str>) -> Result<Vec<Vec<Field>>, BoxError> {
        // Sent whole: one round trip, and nothing prepared left behind a pooler.
        let rows = match param {
            Some(p) => self.typed(sql, &[&p]),
            None => self.typed(sql, &[]),
        }?;
        rows.iter()
            .map(|r| {
                (0..r.len())
                    .map(|i| {
                        Ok(r.try_get::<_, Option<Raw<'_>>>(i)?
                            .map(|raw| raw.0.to_vec()))
                    })
                    .collect::<Result<Vec<_>, BoxError>>()
            })
            .collect()
    }

    fn exec_with(&mut self, sql: &str, param: Option<&str>) -> Result<(), BoxError> {
        match param {
            None => self.batch_execute(sql)?,
            Some(p) => {
                self.typed(sql, &[&p])?;
            }
        }
        Ok(())
    }
}

impl IntoStore for Client {
    fn into_store(self) -> Box<dyn Store> {
        Box::new(PostgresStore::new(self))
    }
}
