//! The one error type of the crate.

use std::fmt;

/// A boxed error from a backend driver or a codec, kept as the `source` of an [`Error`].
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// `Result<T, write_thru_hash::Error>`.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What a failed call was doing, for the error message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Action {
    /// Creating or checking the table.
    Open,
    /// Reading the table's rows into memory.
    Load,
    /// Writing one change or one batch of changes.
    Write,
    /// Replacing the whole table's content (`src`).
    Replace,
    /// Connecting to the database.
    Connect,
    /// Watching the table for changes (`Builder::watch`).
    Watch,
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Action::Open => "creating or checking",
            Action::Load => "loading",
            Action::Write => "writing to",
            Action::Replace => "replacing the content of",
            Action::Connect => "connecting for",
            Action::Watch => "watching for changes to",
        })
    }
}

/// Everything that can go wrong in `write-thru-hash`.
///
/// Every variant's message says what was being done, on which table, and what to do
/// about it. Backend errors are kept as the [`source`](std::error::Error::source), so
/// enabling a backend feature never changes this enum.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The database refused or failed a statement. Memory is unchanged.
    #[error(
        "{} on {backend} failed{}{}",
        doing(*.action, .table),
        server_says(.source),
        hint(.source)
    )]
    Database {
        /// What was being done.
        action: Action,
        /// The table's name.
        table: String,
        /// The backend's name (`SQLite`, `PostgreSQL`, ...).
        backend: &'static str,
        /// The driver's error.
        source: BoxError,
    },

    /// The connection failed while a change was being committed, so whether the
    /// database holds the change is unknown; memory is as before the call. A map opened
    /// from a URL settles it by itself on its next call: it reconnects, reads that
    /// write's keys back and takes them as the table holds them, then goes on. A map
    /// opened on a connection it was given cannot reconnect: it refuses writes
    /// ([`Error::Poisoned`]) until [`reload`](crate::DbHashMap::reload) succeeds.
    #[error(
        "the outcome of a write to table {table:?} on {backend} is unknown (the connection \
         failed during the commit); a map opened from a URL settles it on its next call by \
         reading the write's keys back, a map opened on a given connection refuses writes \
         until `reload()` re-reads the table"
    )]
    OutcomeUnknown {
        /// The table's name.
        table: String,
        /// The backend's name.
        backend: &'static str,
        /// The driver's error.
        source: BoxError,
    },

    /// An earlier write's outcome is unknown (see [`Error::OutcomeUnknown`]) and the
    /// map cannot settle it by itself, since it was opened on a connection it was given
    /// (it cannot make a new one); call [`reload`](crate::DbHashMap::reload) before
    /// writing again. Maps opened from a URL settle such writes themselves.
    #[error(
        "table {table:?} refuses writes: an earlier write's outcome is unknown, and the map \
         was opened on a connection it was given, which it cannot reopen to settle it; \
         call `reload()` (with the connection working again) to re-read the table, then \
         write again"
    )]
    Poisoned {
        /// The table's name.
        table: String,
    },

    /// A key or value could not be encoded. Nothing was written.
    #[error("encoding a {what} for table {table:?} failed: {source}")]
    Encode {
        /// `"key"` or `"value"`.
        what: &'static str,
        /// The table's name.
        table: String,
        /// The codec's error.
        source: BoxError,
    },

    /// A row of the table could not be decoded with the map's codecs.
    #[error(
        "row {row} of table {table:?} does not decode as a {what}: {source}; \
         open the table with the codecs that wrote it, or fix or delete that row"
    )]
    Decode {
        /// `"key"` or `"value"`.
        what: &'static str,
        /// The table's name.
        table: String,
        /// The row's key as stored (text, or hex for bytes), shortened.
        row: String,
        /// The codec's error.
        source: BoxError,
    },

    /// Two rows of the table decode to equal keys, so the table cannot be one map.
    #[error(
        "rows {first} and {second} of table {table:?} decode to equal keys; \
         the key codec is not the one that wrote the table, or is not canonical: \
         delete one of the rows or open the table with the codec that wrote it"
    )]
    DuplicateKey {
        /// The table's name.
        table: String,
        /// The first row's key as stored.
        first: String,
        /// The second row's key as stored.
        second: String,
    },

    /// The key codec encoded equal keys to different bytes, so one key could become
    /// two rows. Nothing was written.
    #[error(
        "the key codec of table {table:?} is not canonical: key {row} encodes to \
         {other} as well; use a codec whose encoding of equal keys is always the same bytes"
    )]
    NonCanonicalKey {
        /// The table's name.
        table: String,
        /// One encoding of the key.
        row: String,
        /// Another encoding of an equal key.
        other: String,
    },

    /// A key's encoding is longer than the backend can index. Nothing was written.
    #[error(
        "a key of {len} bytes is too long for table {table:?} on {backend}, which can \
         index at most {max} bytes; use shorter keys or a more compact key codec"
    )]
    KeyTooLong {
        /// The table's name.
        table: String,
        /// The backend's name.
        backend: &'static str,
        /// The encoded key's length in bytes.
        len: usize,
        /// The backend's limit in bytes.
        max: usize,
    },

    /// A value's encoding is longer than the backend takes in one statement (MySQL's
    /// `max_allowed_packet`). Nothing was written.
    #[error(
        "a value of {len} bytes is too long for table {table:?} on {backend}, which takes at \
         most {max} bytes in one statement; raise the server's max_allowed_packet or store \
         smaller values"
    )]
    ValueTooLong {
        /// The table's name.
        table: String,
        /// The backend's name.
        backend: &'static str,
        /// The encoded value's length in bytes.
        len: usize,
        /// The backend's limit in bytes.
        max: usize,
    },

    /// A slice ([`Builder::prefix`](crate::Builder::prefix)) that cannot be read as one
    /// range of the table's keys: the codec's encodings of the slice's keys do not share
    /// a beginning, the store cannot read a slice, or the key column does not sort in
    /// byte order. Nothing was written.
    #[error("table {table:?} cannot be opened as a slice: {reason}")]
    Slice {
        /// The table's name.
        table: String,
        /// Why, and what to do.
        reason: String,
    },

    /// A write of a key outside the map's slice. Nothing was written.
    #[error(
        "key {key} is outside the slice of table {table:?} that this map holds (the keys \
         that start with {prefix:?}), so nothing was written; write it through a map of its \
         own slice, or of the whole table"
    )]
    OutsideSlice {
        /// The table's name.
        table: String,
        /// The slice's prefix.
        prefix: String,
        /// The key, as stored (shortened).
        key: String,
    },

    /// The table name cannot be held by the backend. Nothing was written.
    #[error("table name {name:?} cannot be used on {backend}: {reason}; choose another name")]
    InvalidTableName {
        /// The refused name.
        name: String,
        /// The backend's name.
        backend: &'static str,
        /// Why it is refused.
        reason: String,
    },

    /// The existing table does not have the layout this map needs.
    #[error("table {table:?} on {backend} cannot be used: {reason}")]
    Schema {
        /// The table's name.
        table: String,
        /// The backend's name.
        backend: &'static str,
        /// What is wrong and what to do.
        reason: String,
    },

    /// The connection handed to the map is in a state the map cannot work in (inside
    /// a transaction the caller began, say). Nothing was written.
    #[error("the {backend} connection cannot be used as it is: {reason}")]
    ConnectionState {
        /// The backend's name.
        backend: &'static str,
        /// What is wrong and what to do.
        reason: String,
    },

    /// Connecting to the database failed. The driver's error is the source.
    #[error(
        "connecting to {url} ({backend}) failed{}; {}",
        server_says(.source),
        if *.backend == "SQLite" {
            "check the path, that its directory exists, and its permissions"
        } else {
            "check that the server is running and that the URL's host, port, database, \
             user and password are right"
        }
    )]
    Connect {
        /// The URL, path or connection string, with any password replaced by `***`.
        url: String,
        /// The backend's name.
        backend: &'static str,
        /// The driver's error.
        source: BoxError,
    },

    /// `refresh` on a map opened without [`coherent`](crate::Builder::coherent), or a
    /// store that keeps no change log.
    #[error("table {table:?} cannot refresh: {reason}")]
    NotCoherent {
        /// The table's name.
        table: String,
        /// Why, and what to do.
        reason: String,
    },

    /// A database URL could not be used.
    #[error("database URL {url:?} cannot be used: {reason}")]
    Url {
        /// The URL, with any password replaced by `***`.
        url: String,
        /// What is wrong and what to do.
        reason: String,
    },

    /// A write-behind batch failed. Its changes are kept and retried; they are in the
    /// map's memory already.
    #[error(
        "a background write of {pending} changes to table {table:?} failed{}",
        if *.abandoned { "; the map was closed, so they were not written" }
        else { "; the changes are kept and retried: `flush()` waits for them" }
    )]
    Background {
        /// The table's name.
        table: String,
        /// Changes waiting to be written when it failed.
        pending: usize,
        /// Whether the changes were given up (by `close`) rather than kept for a retry.
        abandoned: bool,
        /// What failed.
        source: BoxError,
    },

    /// A [`SharedDbHashMap`](crate::SharedDbHashMap) method was called where it would
    /// wait for itself forever: from inside a closure the same map is running (`upsert`,
    /// `update`, `retain`, `transaction`, ...), or while this thread holds the map's
    /// `read()` guard. Nothing was done.
    #[error(
        "table {table:?}: `{call}` was called on the shared map from inside one of its own \
         calls (a closure it runs, or while this thread holds its `read()` guard), where it \
         would wait for itself; nothing was done: make the call after that one returns (in \
         a transaction, through the transaction), or drop the guard first"
    )]
    Reentrant {
        /// The table's name.
        table: String,
        /// The method called.
        call: &'static str,
    },

    /// A read-modify-write of a [`SharedDbHashMap`](crate::SharedDbHashMap) (`upsert`,
    /// `update`, `get_or_insert_with`, `upsert_many`) was computed, in its group, on the
    /// value a change queued before it would write, and the database refused that change
    /// (its own call got the reason). Nothing of this call was written and memory is
    /// unchanged; calling again computes it on what the map holds then.
    #[error(
        "table {table:?}: `{call}` was computed on the value a change queued before it would \
         write, and the database refused that change (its call got the reason); nothing was \
         written: call again"
    )]
    Superseded {
        /// The table's name.
        table: String,
        /// The method called.
        call: &'static str,
    },

    /// Write-behind: the table refused a change (a constraint, a value the column cannot
    /// take). The other changes of its batch were written; this one is kept apart and
    /// not tried again, so it holds nothing back. Memory keeps the refused value until a
    /// later write of the same key replaces it (or `reload()`).
    #[error(
        "write-behind: table {table:?} refused the change of key {key}; the other changes \
         were written, this one is kept apart and not retried: write or remove the key \
         again to replace it (memory holds the refused value until then)"
    )]
    Rejected {
        /// The table's name.
        table: String,
        /// The key, as stored (shortened).
        key: String,
        /// The database's refusal.
        source: BoxError,
    },

    /// The store cannot do what was asked (a [`Store`](crate::Store) method it does
    /// not implement).
    #[error("the {backend} store does not support {what}")]
    Unsupported {
        /// The backend's name.
        backend: &'static str,
        /// What was asked.
        what: &'static str,
    },

    /// A transaction's closure gave up on purpose with [`Error::abort`]; the reason it
    /// gave is the source.
    #[error("the transaction was aborted by its closure")]
    Aborted(#[source] BoxError),
}

impl Error {
    /// The error a [`transaction`](crate::DbHashMap::transaction) closure returns to
    /// give up on purpose; everything it staged is dropped. The reason (a message or
    /// the caller's own error) is kept as the [`source`](std::error::Error::source), so
    /// the caller can get its own error back by downcasting.
    ///
    /// ```
    /// # use write_thru_hash::{DbHashMap, Error};
    /// # let mut h: DbHashMap<String, i64> = DbHashMap::open_url("sqlite::memory:")?;
    /// let r = h.transaction(|tx| {
    ///     tx.insert("a".into(), 1)?;
    ///     Err::<(), _>(Error::abort("changed my mind"))
    /// });
    /// assert!(matches!(r, Err(Error::Aborted(_))));
    /// assert!(h.is_empty());
    ///
    /// #[derive(Debug)]
    /// struct Overdrawn(i64);
    /// impl std::fmt::Display for Overdrawn {
    ///     fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
    ///         write!(f, "overdrawn by {}", self.0)
    ///     }
    /// }
    /// impl std::error::Error for Overdrawn {}
    ///
    /// let err = h.transaction(|tx| {
    ///     let balance = tx.get("a").copied().unwrap_or(0) - 10;
    ///     if balance < 0 {
    ///         return Err(Error::abort(Overdrawn(-balance)));
    ///     }
    ///     tx.insert("a".into(), balance)
    /// }).unwrap_err();
    /// let mine = std::error::Error::source(&err).and_then(|s| s.downcast_ref::<Overdrawn>());
    /// assert_eq!(mine.map(|o| o.0), Some(10));
    /// # Ok::<(), Error>(())
    /// ```
    pub fn abort(reason: impl Into<BoxError>) -> Self {
        Error::Aborted(reason.into())
    }

    /// Whether trying the same call again may succeed: the database was busy or a lock
    /// timed out, a deadlock or serialization failure rolled the transaction back, or
    /// the connection was lost with a known outcome (a map opened from a URL reconnects
    /// on its next call). Not for an unknown outcome, which needs
    /// [`reload`](crate::DbHashMap::reload) first.
    pub fn is_retryable(&self) -> bool {
        match self {
            Error::Database { source, .. } => retryable(source.as_ref()),
            Error::Background { abandoned, .. } => !abandoned,
            Error::Superseded { .. } => true,
            // The server may be back by then: a URL map reconnects on its next call.
            Error::Connect { backend, .. } => *backend != "SQLite",
            _ => false,
        }
    }

    /// Whether this error is a lost connection or an unknown commit outcome, after
    /// which the map needs a working connection and a [`reload`](crate::DbHashMap::reload).
    pub fn is_outcome_unknown(&self) -> bool {
        matches!(self, Error::OutcomeUnknown { .. } | Error::Poisoned { .. })
    }
}

impl Error {
    /// Whether the connection was lost before the statement that failed did anything:
    /// the server ended the session (it was idle, shut down or terminated), or the
    /// driver found the connection closed. A store that can reconnect then runs the
    /// same batch again on a new connection; an unknown outcome is not one of these.
    pub(crate) fn is_disconnect(&self) -> bool {
        match self {
            Error::Database { source, .. } => disconnected(source.as_ref()),
            // Making the connection again failed: nothing was sent.
            Error::Connect { backend, .. } => *backend != "SQLite",
            _ => false,
        }
    }

    /// Whether the database refused the change itself (a constraint, a value the column
    /// cannot take), so that writing it again would fail again, whatever else is in its
    /// batch: SQLSTATE classes 22 and 23, SQLite's constraint errors (not a trigger's
    /// `RAISE`), MySQL's codes for them.
    pub(crate) fn is_rejection(&self) -> bool {
        let Error::Database { source, .. } = self else {
            return false;
        };
        let source = source.as_ref();
        if source.is::<Dropped>() {
            return true;
        }
        #[cfg(feature = "sqlite")]
        if let Some(e) = source.downcast_ref::<rusqlite::Error>() {
            // A trigger's RAISE is a policy that may be lifted: retried, not kept apart.
            const SQLITE_CONSTRAINT_TRIGGER: std::os::raw::c_int = 1811;
            return match e.sqlite_error() {
                Some(f) => {
                    matches!(
                        f.code,
                        rusqlite::ErrorCode::ConstraintViolation | rusqlite::ErrorCode::TooBig
                    ) && f.extended_code != SQLITE_CONSTRAINT_TRIGGER
                }
                None => false,
            };
        }
        #[cfg(feature = "postgres")]
        if let Some(code) = source
            .downcast_ref::<postgres::Error>()
            .and_then(postgres::Error::code)
        {
            return code.code().starts_with("23") || code.code().starts_with("22");
        }
        #[cfg(feature = "mysql")]
        if let Some(mysql::Error::MySqlError(e)) = source.downcast_ref::<mysql::Error>() {
            return e.state.starts_with("23")
                || e.state.starts_with("22")
                || [1048, 1062, 1366, 1406, 1451, 1452, 3819, 4025].contains(&e.code);
        }
        #[cfg(feature = "odbc")]
        if let Some(odbc_api::Error::Diagnostics { record, .. }) =
            source.downcast_ref::<odbc_api::Error>()
        {
            let state = record.state.as_str();
            return state.starts_with("23") || state.starts_with("22");
        }
        let _ = source;
        false
    }

    /// The error of a group commit, for each caller of the group but the first: the
    /// same words, and the same answer to [`is_retryable`](Self::is_retryable).
    pub(crate) fn for_group(&self) -> Error {
        let source = std::error::Error::source(self);
        // Copied from a copy: the words say it once.
        let message = match source.and_then(|s| s.downcast_ref::<GroupFailure>()) {
            Some(copied) => copied.message.clone(),
            None => format!(
                "{} (met by the commit of the group this change was part of)",
                source.map_or_else(String::new, |s| s.to_string())
            ),
        };
        let shared = GroupFailure {
            message,
            retryable: self.is_retryable(),
        };
        match self {
            Error::Superseded { table, call } => Error::Superseded {
                table: table.clone(),
                call,
            },
            Error::OutcomeUnknown { table, backend, .. } => Error::OutcomeUnknown {
                table: table.clone(),
                backend,
                source: Box::new(shared),
            },
            Error::Database {
                action,
                table,
                backend,
                ..
            } => Error::Database {
                action: *action,
                table: table.clone(),
                backend,
                source: Box::new(shared),
            },
            Error::Connect { url, backend, .. } => Error::Connect {
                url: url.clone(),
                backend,
                source: Box::new(shared),
            },
            Error::Poisoned { table } => Error::Poisoned {
                table: table.clone(),
            },
            other => Error::Aborted(Box::new(GroupFailure {
                message: other.to_string(),
                retryable: false,
            })),
        }
    }

    /// Whether the server rolled the whole transaction back because it conflicted with
    /// another (a deadlock, a serialization failure, Galera's certification conflict):
    /// then trying it again is safe and likely to succeed.
    pub(crate) fn is_conflict(&self) -> bool {
        let Error::Database { source, .. } = self else {
            return false;
        };
        let source = source.as_ref();
        #[cfg(feature = "postgres")]
        if let Some(code) = source
            .downcast_ref::<postgres::Error>()
            .and_then(postgres::Error::code)
        {
            return ["40001", "40P01"].contains(&code.code());
        }
        #[cfg(feature = "mysql")]
        if let Some(mysql::Error::MySqlError(e)) = source.downcast_ref::<mysql::Error>() {
            return e.code == 1213;
        }
        #[cfg(feature = "odbc")]
        if let Some(odbc_api::Error::Diagnostics { record, .. }) =
            source.downcast_ref::<odbc_api::Error>()
        {
            return ["40001", "40P01"].contains(&record.state.as_str())
                || record.native_error == 1213;
        }
        let _ = source;
        false
    }
}

/// A change the table dropped (a rule or trigger kept a row from being written or
/// deleted): the change itself is refused, as a constraint would refuse it.
#[derive(Debug)]
pub(crate) struct Dropped(pub(crate) String);

impl fmt::Display for Dropped {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Dropped {}

/// The failure of a group commit as another caller of the group sees it.
#[derive(Debug)]
struct GroupFailure {
    message: String,
    retryable: bool,
}

impl fmt::Display for GroupFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for GroupFailure {}

/// Whether a driver's error says the session was gone before the statement ran.
fn disconnected(source: &(dyn std::error::Error + Send + Sync + 'static)) -> bool {
    #[cfg(feature = "postgres")]
    if let Some(e) = source.downcast_ref::<postgres::Error>() {
        return match e.code() {
            // admin_shutdown (terminated), idle_session_timeout,
            // idle_in_transaction_session_timeout, and connection exceptions.
            Some(code) => {
                ["57P01", "57P02", "57P05", "25P03"].contains(&code.code())
                    || code.code().starts_with("08")
            }
            None => e.is_closed() || e.as_db_error().is_none(),
        };
    }
    #[cfg(feature = "mysql")]
    if let Some(e) = source.downcast_ref::<mysql::Error>() {
        return match e {
            // server gone away, lost connection, connection killed, idle timeout
            mysql::Error::MySqlError(e) => [2006, 2013, 1927, 4031].contains(&e.code),
            mysql::Error::IoError(_) | mysql::Error::DriverError(_) => true,
            _ => false,
        };
    }
    #[cfg(feature = "odbc")]
    if let Some(odbc_api::Error::Diagnostics { record, .. }) =
        source.downcast_ref::<odbc_api::Error>()
    {
        // MariaDB's driver reports a lost connection as HY000 with the server's codes.
        return record.state.as_str().starts_with("08")
            || [2006, 2013, 1927, 4031].contains(&record.native_error);
    }
    let _ = source;
    false
}

/// Whether a driver's error is one that trying again may get past.
fn retryable(source: &(dyn std::error::Error + Send + Sync + 'static)) -> bool {
    if let Some(group) = source.downcast_ref::<GroupFailure>() {
        return group.retryable;
    }
    #[cfg(feature = "sqlite")]
    if let Some(e) = source.downcast_ref::<rusqlite::Error>() {
        return matches!(
            e.sqlite_error_code(),
            Some(rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked)
        );
    }
    #[cfg(feature = "postgres")]
    if let Some(e) = source.downcast_ref::<postgres::Error>() {
        return match e.code() {
            // serialization_failure, deadlock_detected, lock_not_available,
            // query_canceled (a statement or lock timeout), admin_shutdown (the server
            // ended the connection between calls: a URL map reconnects)
            Some(code) => ["40001", "40P01", "55P03", "57014", "57P01"].contains(&code.code()),
            // No answer: the connection is gone, and nothing was in doubt.
            None => e.is_closed() || e.as_db_error().is_none(),
        };
    }
    #[cfg(feature = "mysql")]
    if let Some(e) = source.downcast_ref::<mysql::Error>() {
        return match e {
            // lock wait timeout, deadlock (Galera's certification conflict too)
            mysql::Error::MySqlError(e) => [1205, 1213].contains(&e.code),
            mysql::Error::IoError(_) | mysql::Error::DriverError(_) => true,
            _ => false,
        };
    }
    #[cfg(feature = "odbc")]
    if let Some(odbc_api::Error::Diagnostics { record, .. }) =
        source.downcast_ref::<odbc_api::Error>()
    {
        let state = record.state.as_str();
        return ["40001", "40P01", "HYT00", "HYT01"].contains(&state)
            || state.starts_with("08")
            || [1205, 1213].contains(&record.native_error);
    }
    let _ = source;
    false
}

/// "writing to table \"t\"", or just "connecting" when no table is known yet.
fn doing(action: Action, table: &str) -> String {
    match (action, table.is_empty()) {
        (Action::Connect, true) => "connecting".to_string(),
        (action, _) => format!("{action} table {table:?}"),
    }
}

/// The server's own report, for drivers that keep it a level down, under a message of
/// their own that says nothing (the `postgres` crate's "db error"); empty otherwise,
/// since the source is shown by whoever prints the chain.
fn server_says(source: &BoxError) -> String {
    #[cfg(feature = "postgres")]
    if let Some(db) = source
        .downcast_ref::<postgres::Error>()
        .and_then(postgres::Error::as_db_error)
    {
        let mut out = format!(
            ": the server said {:?} (SQLSTATE {}",
            db.message(),
            db.code().code()
        );
        if let Some(detail) = db.detail() {
            out.push_str(&format!("; detail: {detail}"));
        }
        if let Some(hint) = db.hint() {
            out.push_str(&format!("; hint: {hint}"));
        }
        out.push(')');
        return out;
    }
    #[cfg(feature = "postgres")]
    if let Some(e) = source.downcast_ref::<postgres::Error>() {
        // What `target_session_attrs=read-write` meets on a cluster without a primary.
        let chain = std::iter::successors(std::error::Error::source(e), |e| e.source())
            .map(|e| e.to_string())
            .collect::<Vec<_>>()
            .join(": ");
        if chain.contains("does not allow writes") {
            return ": no server of the URL takes writes now (target_session_attrs=read-write): \
                    the cluster has no primary, as while it fails over; a map opened from a \
                    URL tries again on its next call"
                .into();
        }
    }
    #[cfg(feature = "mysql")]
    if let Some(mysql::Error::MySqlError(e)) = source.downcast_ref::<mysql::Error>() {
        return format!(
            ": the server said {:?} (error {}, SQLSTATE {})",
            e.message, e.code, e.state
        );
    }
    #[cfg(feature = "odbc")]
    if let Some(odbc_api::Error::Diagnostics { record, .. }) =
        source.downcast_ref::<odbc_api::Error>()
    {
        return format!(
            ": the server said {:?} (SQLSTATE {}, native error {})",
            odbc_api::handles::slice_to_cow_utf8(&record.message).trim_end(),
            record.state.as_str(),
            record.native_error
        );
    }
    let _ = source;
    String::new()
}

/// A remedy appended to some driver messages that are otherwise cryptic.
fn hint(source: &BoxError) -> &'static str {
    // The whole chain: some drivers keep the server's words a level down.
    let mut text = source.to_string();
    let mut next = source.source();
    while let Some(cause) = next {
        text.push(' ');
        text.push_str(&cause.to_string());
        next = cause.source();
    }
    let text = text.to_ascii_lowercase();
    if text.contains("query_only") {
        "; the connection has PRAGMA query_only = ON (the file may well be writable): set \
         it OFF, or hand the map another connection"
    } else if text.contains("read-only transaction")
        || text.contains("read only transaction")
        || text.contains("read_only")
    {
        "; the server takes no writes in this session (a hot standby, or a session set \
         read-only): write through the primary server, or hand the map a session that \
         writes (SET SESSION TRANSACTION READ WRITE)"
    } else if text.contains("readonly") || text.contains("read-only") || text.contains("read only")
    {
        "; the database is read-only: open it writable or check the file's permissions"
    } else if text.contains("locked") || text.contains("busy") {
        "; another connection holds a lock: retry later or raise the busy timeout"
    } else if text.contains("disk") && text.contains("full") {
        "; the disk is full: free space and retry"
    } else {
        ""
    }
}

/// Shows stored key bytes in an error message: text as a quoted string, anything
/// else as hex, shortened either way so a huge key does not flood the message.
pub(crate) fn show_bytes(bytes: &[u8]) -> String {
    const MAX: usize = 64;
    match std::str::from_utf8(bytes) {
        Ok(s) => {
            let short: String = s.chars().take(MAX).collect();
            if short.len() < s.len() {
                format!("{short:?}... ({} bytes)", s.len())
            } else {
                format!("{short:?}")
            }
        }
        Err(_) => {
            let hex: String = bytes
                .iter()
                .take(MAX / 2)
                .map(|b| format!("{b:02x}"))
                .collect();
            if bytes.len() > MAX / 2 {
                format!("0x{hex}... ({} bytes)", bytes.len())
            } else {
                format!("0x{hex}")
            }
        }
    }
}

/// Replaces the password in a URL or ODBC connection string with `***`, so no error
/// or log line ever shows it.
///
/// Drivers read a URL's credentials up to an `@`, wherever it is (a password may hold
/// `/`, `?` or `@`), so everything between the user's `:` and the last `@` is hidden;
/// and `password=` in the query. Then the text is read as an ODBC connection string,
/// whose `PWD` and `PASSWORD` values are hidden (a value may hold `://`).
pub(crate) fn redact(url: &str) -> String {
    // Text that holds `://` may be a URL or an ODBC string that holds one
    // (`Server=https://h;PWD=…`): hide what either reading would call a password.
    let Some((scheme, rest)) = url.split_once("://") else {
        return redact_odbc(url);
    };
    // The query's passwords first: one may hold an `@`, which must not be taken for
    // the end of the credentials below.
    let rest = match rest.split_once('?') {
        Some((before, query)) => format!("{before}{}", redact_query(&format!("?{query}"))),
        None => rest.to_string(),
    };
    let rest = rest.as_str();
    let (userinfo, after) = match rest.rfind('@') {
        Some(at) => (Some(&rest[..at]), &rest[at + 1..]),
        None => (None, rest),
    };
    let authority = match userinfo {
        None => String::new(),
        Some(info) => {
            let user = info.split_once(':').map_or(info, |(user, _)| user);
            // A user name cannot hold these; if it seems to, the `@` was not the end of
            // the credentials and anything before it may be a password.
            if user.contains(['/', '?', '#', '&', '=']) {
                "***@".to_string()
            } else if user.len() < info.len() {
                format!("{user}:***@")
            } else {
                format!("{user}@")
            }
        }
    };
    redact_odbc(&format!("{scheme}://{authority}{after}"))
}

/// Splits an ODBC connection string at the `;` that end attributes (not those inside
/// a `{…}` value, where `}}` stands for `}`), and hides password values.
fn redact_odbc(cs: &str) -> String {
    let mut parts = Vec::new();
    let (mut start, mut braced, mut chars) = (0, false, cs.char_indices().peekable());
    while let Some((i, c)) = chars.next() {
        match c {
            // A braced value may follow spaces after the `=`.
            '{' if !braced && cs[start..i].trim_end().ends_with('=') => braced = true,
            '}' if braced => {
                if chars.peek().map(|&(_, n)| n) == Some('}') {
                    chars.next();
                } else {
                    braced = false;
                }
            }
            ';' if !braced => {
                parts.push(&cs[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    parts.push(&cs[start..]);
    parts
        .into_iter()
        .map(|part| match part.split_once('=') {
            Some((k, _))
                if k.trim().eq_ignore_ascii_case("pwd")
                    || k.trim().eq_ignore_ascii_case("password") =>
            {
                format!("{k}=***")
            }
            _ => part.to_string(),
        })
        .collect::<Vec<_>>()
        .join(";")
}

fn redact_query(tail: &str) -> String {
    let Some((path, query)) = tail.split_once('?') else {
        return tail.to_string();
    };
    let query: Vec<String> = query
        .split('&')
        .map(|kv| match kv.split_once('=') {
            // Drivers percent-decode the key (`pass%77ord` is `password`).
            Some((k, _))
                if {
                    let key = percent_decoded(k).to_ascii_lowercase();
                    key.contains("pass") || key.contains("pwd")
                } =>
            {
                format!("{k}=***")
            }
            _ => kv.to_string(),
        })
        .collect();
    format!("{path}?{}", query.join("&"))
}

/// `text` with its `%XX` escapes decoded (bytes that do not form UTF-8 shown lossily).
fn percent_decoded(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        match (
            bytes[i],
            bytes.get(i + 1).copied().and_then(hex),
            bytes.get(i + 2).copied().and_then(hex),
        ) {
            (b'%', Some(h), Some(l)) => {
                out.push((h * 16 + l) as u8);
                i += 3;
            }
            (b, ..) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redacts_passwords() {
        assert_eq!(
            redact("postgres://u:secret@h:5432/db"),
            "postgres://u:***@h:5432/db"
        );
        assert_eq!(
            redact("mysql://u:p%40ss@h/db?x=1"),
            "mysql://u:***@h/db?x=1"
        );
        assert_eq!(
            redact("postgres://h/db?password=s&user=u"),
            "postgres://h/db?password=***&user=u"
        );
        assert_eq!(redact("postgres://u@h/db"), "postgres://u@h/db");
        assert_eq!(
            redact("Driver={x};Server=h;Uid=u;PWD=secret;"),
            "Driver={x};Server=h;Uid=u;PWD=***;"
        );
        assert_eq!(redact("sqlite:/tmp/a.db"), "sqlite:/tmp/a.db");
        assert_eq!(redact("DSN=x;PWD={a;b}}c};UID=u"), "DSN=x;PWD=***;UID=u");
        assert_eq!(
            redact("Driver={My; Driver};Password=p"),
            "Driver={My; Driver};Password=***"
        );
    }

    #[test]
    fn passwords_with_url_delimiters_are_hidden() {
        for (url, secret) in [
            ("postgres://app:hunter/2@127.0.0.1:1/db", "hunter"),
            ("postgres://app:hun?ter@127.0.0.1:1/db", "ter"),
            ("mysql://app:p@ss/w?rd#x@h:3306/db", "ss/w"),
            ("mysql://app:a%2Fb@h/db", "a%2Fb"),
            ("postgresql://app:x#y@h/db?sslmode=disable", "x#y"),
            ("postgres://h/db?user=u&password=top/secret", "top"),
        ] {
            let shown = redact(url);
            assert!(!shown.contains(secret), "{url} -> {shown}");
            assert!(shown.contains("***"), "{url} -> {shown}");
        }
        assert_eq!(
            redact("postgres://app:hunter/2@127.0.0.1:1/db"),
            "postgres://app:***@127.0.0.1:1/db"
        );
        // ODBC strings whose values hold `://` are still ODBC strings.
        for (cs, secret) in [
            ("Server=https://h;PWD=s3cret;UID=u", "s3cret"),
            ("Driver={x};PWD= {a;b};UID=u", "b}"),
            ("Driver={x};PWD= {a;b};UID=u", "a;"),
            ("DSN=x; pwd =plain;", "plain"),
        ] {
            let shown = redact(cs);
            assert!(!shown.contains(secret), "{cs} -> {shown}");
        }
    }

    #[test]
    fn shows_bytes_shortly() {
        assert_eq!(show_bytes(b"abc"), "\"abc\"");
        assert_eq!(show_bytes(&[0xff, 0x00]), "0xff00");
        assert!(show_bytes(&[b'a'; 100]).ends_with("(100 bytes)"));
    }
}
