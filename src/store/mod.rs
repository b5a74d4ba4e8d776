//! The storage seam: the [`Store`] trait every backend implements, and the [`Batch`]
//! of changes that is its one way to write.

use std::collections::HashMap;
use std::time::Duration;

use crate::codec::Format;
use crate::error::{Error, Result};

#[cfg(any(
    feature = "sqlite",
    feature = "postgres",
    feature = "mysql",
    feature = "odbc"
))]
pub(crate) mod changes;
pub(crate) mod dialect;
#[cfg(feature = "odbc")]
pub(crate) mod odbc;
#[cfg(any(
    feature = "sqlite",
    feature = "postgres",
    feature = "mysql",
    feature = "odbc"
))]
mod support;
#[cfg(any(feature = "postgres", feature = "mysql", feature = "odbc"))]
pub(crate) use support::cannot_reconnect;
#[cfg(any(feature = "mysql", feature = "odbc"))]
pub(crate) use support::chunks;
#[cfg(any(
    feature = "sqlite",
    feature = "postgres",
    feature = "mysql",
    feature = "odbc"
))]
pub(crate) use support::{db_error, opened};
#[cfg(feature = "mysql")]
pub(crate) mod mysql;
#[cfg(feature = "postgres")]
pub(crate) mod postgres;
#[cfg(feature = "sqlite")]
pub(crate) mod sqlite;

pub use dialect::Dialect;

/// The table a store serves: its name and the format of each column.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct TableSpec {
    /// The table's name, unquoted; stores quote it for their dialect.
    pub name: String,
    /// The format of the `key` column.
    pub key_format: Format,
    /// The format of the `value` column.
    pub value_format: Format,
    /// A slice of the table: only the rows whose stored key starts with these bytes
    /// (see [`Builder::prefix`](crate::Builder::prefix)); `None` for the whole table.
    /// Stores read, count, clear and watch only those rows.
    pub key_prefix: Option<Vec<u8>>,
}

impl TableSpec {
    /// A table of the given name whose columns hold the given formats.
    pub fn new(name: impl Into<String>, key_format: Format, value_format: Format) -> Self {
        TableSpec {
            name: name.into(),
            key_format,
            value_format,
            key_prefix: None,
        }
    }

    /// The slice of the table whose stored keys start with `prefix` (an empty prefix is
    /// the whole table).
    #[must_use]
    pub fn with_key_prefix(mut self, prefix: impl Into<Vec<u8>>) -> Self {
        let prefix = prefix.into();
        self.key_prefix = (!prefix.is_empty()).then_some(prefix);
        self
    }

    /// Whether a stored key belongs to the table, or to its slice.
    pub fn holds_key(&self, key: &[u8]) -> bool {
        self.key_prefix
            .as_ref()
            .is_none_or(|prefix| key.starts_with(prefix))
    }

    /// The slice's bounds in byte order: every key that starts with the prefix is at
    /// least the first and below the second (`None`: no key above the prefix's), and
    /// only those. For a text column the second is valid UTF-8 too.
    pub(crate) fn key_range(&self) -> Option<(&[u8], Option<Vec<u8>>)> {
        let prefix = self.key_prefix.as_deref()?;
        let end = match (self.key_format, std::str::from_utf8(prefix)) {
            (Format::Text, Ok(text)) => {
                // The next character after the last that has one, so that the bound is
                // text: UTF-8 orders as code points do.
                let mut chars: Vec<char> = text.chars().collect();
                loop {
                    let Some(last) = chars.pop() else { break None };
                    let next = match last as u32 + 1 {
                        0xD800 => Some('\u{E000}'),
                        n => char::from_u32(n),
                    };
                    if let Some(next) = next {
                        chars.push(next);
                        break Some(chars.into_iter().collect::<String>().into_bytes());
                    }
                }
            }
            _ => {
                let mut bytes = prefix.to_vec();
                loop {
                    match bytes.pop() {
                        None => break None,
                        Some(0xFF) => {}
                        Some(b) => {
                            bytes.push(b + 1);
                            break Some(bytes);
                        }
                    }
                }
            }
        };
        Some((prefix, end))
    }
}

/// One row to load: the key's and the value's stored bytes.
pub type RowSink<'a> = dyn FnMut(&[u8], &[u8]) -> Result<()> + 'a;

/// One key another writer changed: its stored bytes, and the value's, or `None` when
/// the table no longer holds the key.
pub type ChangeSink<'a> = dyn FnMut(&[u8], Option<&[u8]>) -> Result<()> + 'a;

/// A set of changes that a store applies atomically: first `clear` (delete every
/// row) if set, then `deletes`, then `puts` (upserts). Keys are distinct across
/// `deletes` and `puts`, so the order within each list does not matter.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Batch {
    /// Delete every row first.
    pub clear: bool,
    /// Encoded keys to delete.
    pub deletes: Vec<Vec<u8>>,
    /// Encoded keys and values to insert or replace.
    pub puts: Vec<(Vec<u8>, Vec<u8>)>,
}

impl Batch {
    /// Whether the batch changes nothing.
    pub fn is_empty(&self) -> bool {
        !self.clear && self.deletes.is_empty() && self.puts.is_empty()
    }

    /// Number of row operations (a clear counts as one).
    pub fn len(&self) -> usize {
        usize::from(self.clear) + self.deletes.len() + self.puts.len()
    }
}

/// Builds a [`Batch`] from changes in call order, keeping the last change per key.
#[derive(Debug, Default)]
pub(crate) struct BatchBuilder {
    clear: bool,
    /// Key bytes -> the last change (`Some(value)` put, `None` delete), in first-seen order.
    index: HashMap<Vec<u8>, usize>,
    ops: Vec<(Vec<u8>, Option<Vec<u8>>)>,
}

impl BatchBuilder {
    /// Changes held, one per key (a clear counts as one).
    pub(crate) fn len(&self) -> usize {
        usize::from(self.clear) + self.ops.len()
    }

    /// Whether a change to `key` is held.
    pub(crate) fn contains(&self, key: &[u8]) -> bool {
        self.index.contains_key(key)
    }

    pub(crate) fn clear(&mut self) {
        self.clear = true;
        self.index.clear();
        self.ops.clear();
    }

    pub(crate) fn put(&mut self, key: Vec<u8>, value: Vec<u8>) {
        self.set(key, Some(value));
    }

    pub(crate) fn delete(&mut self, key: Vec<u8>) {
        self.set(key, None);
    }

    /// Adds the changes of `batch`, after those held.
    pub(crate) fn add(&mut self, batch: Batch) {
        if batch.clear {
            self.clear();
        }
        for key in batch.deletes {
            self.delete(key);
        }
        for (key, value) in batch.puts {
            self.put(key, value);
        }
    }

    fn set(&mut self, key: Vec<u8>, change: Option<Vec<u8>>) {
        match self.index.get(&key) {
            Some(&i) => self.ops[i].1 = change,
            None => {
                self.index.insert(key.clone(), self.ops.len());
                self.ops.push((key, change));
            }
        }
    }

    pub(crate) fn finish(self) -> Batch {
        let mut batch = Batch {
            clear: self.clear,
            ..Batch::default()
        };
        for (key, change) in self.ops {
            match change {
                Some(value) => batch.puts.push((key, value)),
                // After a clear the row is gone already.
                None if self.clear => {}
                None => batch.deletes.push(key),
            }
        }
        batch
    }
}

/// A table in a database that a [`DbHashMap`](crate::DbHashMap) writes through to.
///
/// The map calls [`open`](Store::open) once, then [`load`](Store::load), then
/// [`apply`](Store::apply) for every change; [`load`](Store::load) again on
/// [`reload`](crate::DbHashMap::reload). Implement it to put a map on another store.
/// The crate's own stores ([`SqliteStore`](crate::SqliteStore), `PostgresStore`,
/// `MysqlStore`, `OdbcStore`) implement it, and the driver connections
/// (`rusqlite::Connection`, `postgres::Client`, `mysql::Conn`,
/// `odbc_api::Connection<'static>`) implement [`IntoStore`], which wraps them in those.
pub trait Store: Send {
    /// The backend's name for messages (`"SQLite"`).
    fn backend(&self) -> &'static str;

    /// Checks the table name, looks the table up, and creates it only if it is absent
    /// (so that opening an existing table needs no right to create one); an existing
    /// table is checked to keep keys apart and give values back as written (see the
    /// README, "Tables and connections users bring"). A connection in a state the map
    /// cannot work in (inside a transaction its caller began) is refused with
    /// [`Error::ConnectionState`](crate::Error::ConnectionState). Nothing may be
    /// written when the name or the table is refused.
    fn open(&mut self, table: &TableSpec) -> Result<()>;

    /// Calls `sink` with every row of the table.
    fn load(&mut self, sink: &mut RowSink<'_>) -> Result<()>;

    /// Applies the batch atomically: all of it or, when it returns an error, none of
    /// it. When the outcome cannot be known (the connection was lost during the
    /// commit) it returns [`Error::OutcomeUnknown`](crate::Error::OutcomeUnknown).
    fn apply(&mut self, batch: &Batch) -> Result<()>;

    /// Applies the batches in order, as one transaction: all of them or, when it returns
    /// an error, none. Each batch's statements run after the previous one's, so the
    /// database sees (and may refuse) every value a key takes, where one merged batch
    /// would keep only the last. A shared map's group commit uses it for the runs of a
    /// group that write one key twice. The default says the store cannot
    /// ([`Error::Unsupported`](crate::Error::Unsupported)); the map then commits each
    /// batch in a transaction of its own.
    fn apply_seq(&mut self, batches: &[Batch]) -> Result<()> {
        let _ = batches;
        Err(Error::Unsupported {
            backend: self.backend(),
            what: "applying several batches in one transaction",
        })
    }

    /// Whether [`apply_seq`](Store::apply_seq) is implemented (the crate's SQLite and
    /// PostgreSQL stores).
    fn applies_seq(&self) -> bool {
        false
    }

    /// The longest encoded key the backend can hold, in bytes, if it has a limit.
    fn max_key_len(&self) -> Option<usize> {
        None
    }

    /// The longest encoded value the backend takes in one statement, if it has a limit.
    /// Read after [`open`](Store::open).
    fn max_value_len(&self) -> Option<usize> {
        None
    }

    /// Restores a lost connection, when the store knows how (stores opened from a
    /// URL do). Called by [`reload`](crate::DbHashMap::reload) before it loads, and
    /// before a map settles a write whose outcome was unknown.
    fn reconnect(&mut self) -> Result<()> {
        Ok(())
    }

    /// Whether the store can make a new connection by itself (it was opened from a URL).
    /// A map on such a store settles a write whose outcome was unknown on its next call,
    /// by reading that write's keys back; a map on a store that cannot (a connection it
    /// was given) refuses writes until [`reload`](crate::DbHashMap::reload). The
    /// default says no.
    fn can_reconnect(&self) -> bool {
        false
    }

    /// The stored value of one key (its encoding), or `None` when the table does not
    /// hold it: one indexed read, no load. The default says the store cannot
    /// ([`Error::Unsupported`](crate::Error::Unsupported)); a map then settles an
    /// unknown outcome by reloading the whole table instead.
    fn get(&mut self, key: &[u8]) -> Result<Option<Vec<u8>>> {
        let _ = key;
        Err(Error::Unsupported {
            backend: self.backend(),
            what: "reading one key",
        })
    }

    /// Exactly how many rows the table holds (`count(*)`), without loading them. The
    /// default counts the rows [`load`](Store::load) gives.
    fn count(&mut self) -> Result<u64> {
        let mut n = 0u64;
        self.load(&mut |_, _| {
            n += 1;
            Ok(())
        })?;
        Ok(n)
    }

    /// Calls `sink` with the rows whose keys are at least `from` (all of them if `None`),
    /// in the key column's order (bytes, for the crate's tables on SQLite, MySQL and a
    /// PostgreSQL database whose collation is `C`), at most `limit` of them, streaming:
    /// what it holds does not grow with the table. An error from `sink` stops the scan
    /// and is returned. The default says the store cannot
    /// ([`Error::Unsupported`](crate::Error::Unsupported)).
    fn scan(
        &mut self,
        from: Option<&[u8]>,
        limit: Option<u64>,
        sink: &mut RowSink<'_>,
    ) -> Result<()> {
        let _ = (from, limit, sink);
        Err(Error::Unsupported {
            backend: self.backend(),
            what: "scanning the table in key order",
        })
    }

    /// Writes the rows `next` hands over, chunk by chunk, as one transaction: all of them
    /// or (on an error, from the store or from `next`) none. With `replace`, every row
    /// the table held before is deleted first, in the same transaction. With
    /// `distinct_keys` the caller promises that no key repeats (the rows of another
    /// table), which lets a store load them as fast as it can (PostgreSQL: `COPY`
    /// straight into an emptied table); otherwise a key may repeat, the last one
    /// winning. Keys and values of text columns are valid UTF-8. The crate's stores
    /// stream (memory does not grow with the rows); the default gathers every chunk
    /// and [`apply`](Store::apply)s one batch.
    fn put_rows(
        &mut self,
        replace: bool,
        distinct_keys: bool,
        next: &mut PutSource<'_>,
    ) -> Result<()> {
        let _ = distinct_keys;
        let mut batch = BatchBuilder::default();
        if replace {
            batch.clear();
        }
        while let Some(chunk) = next(None) {
            for (key, value) in chunk? {
                batch.put(key, value);
            }
        }
        self.apply(&batch.finish())
    }

    /// Coherence: keeps, from now on, what others need to learn which keys changed
    /// (the crate's stores: a change log kept by triggers), installing it on the
    /// opened table if absent. Called after [`open`](Store::open). A store that cannot
    /// returns an error, which is the default.
    fn enable_changes(&mut self) -> Result<()> {
        Err(Error::NotCoherent {
            table: String::new(),
            reason: format!("the {} store keeps no change log", self.backend()),
        })
    }

    /// Coherence: the version the table is at now. Read before a load, so that the
    /// changes after it are not missed.
    fn version(&mut self) -> Result<u64> {
        Err(Error::NotCoherent {
            table: String::new(),
            reason: format!("the {} store keeps no change log", self.backend()),
        })
    }

    /// Coherence: calls `sink` with every key changed since version `since`, as the
    /// table holds it now, all read in one snapshot; returns the version reached, or
    /// `None` when the changes since `since` were compacted away (the map then reloads
    /// in full).
    fn changes(&mut self, since: u64, sink: &mut ChangeSink<'_>) -> Result<Option<u64>> {
        let _ = (since, sink);
        self.version().map(Some)
    }

    /// Coherence: forgets the changes of the versions up to `upto`, if the log is
    /// longer than `keep` versions.
    fn compact(&mut self, keep: u64) -> Result<()> {
        let _ = keep;
        Ok(())
    }

    /// About how many rows [`load`](Store::load) will give, when the store can tell
    /// cheaply: the map makes room for them first instead of growing as it fills. The
    /// default says nothing.
    fn rows_hint(&mut self) -> Option<usize> {
        None
    }

    /// Whether [`apply_puts`](Store::apply_puts) writes each chunk as it comes, so that
    /// the caller's work on the next chunk overlaps the store's on this one (the
    /// crate's SQLite store does). `insert_many` then streams its pairs.
    fn streams_puts(&self) -> bool {
        false
    }

    /// Upserts, as one transaction, the rows `next` hands over chunk by chunk: all of
    /// them, or (on an error, from the store or from `next`) none. Keys may repeat,
    /// the last one winning. Keys and values of text columns are valid UTF-8 (the
    /// caller checked). It is [`put_rows`](Store::put_rows) without replacing, which is
    /// the one to implement.
    fn apply_puts(&mut self, next: &mut PutSource<'_>) -> Result<()> {
        self.put_rows(false, false, next)
    }

    /// Coherence, for [`Builder::watch`](crate::Builder::watch): a way to wait for a
    /// sign that the table changed, on a connection of its own; `None` (the default)
    /// when the store has none, and then the watcher polls [`version`](Store::version)
    /// every `every`. The crate's SQLite store polls `PRAGMA data_version` every
    /// `every`; its PostgreSQL store listens for the notification its triggers send.
    fn change_signal(&mut self, every: Duration) -> Result<Option<Box<dyn ChangeSignal>>> {
        let _ = every;
        Ok(None)
    }

    /// Whether the store honours [`TableSpec::key_prefix`]: reads, counts, clears and
    /// reports changes of the slice's rows only (the crate's stores do). A map on a
    /// slice is refused on a store that says no, the default.
    fn reads_slices(&self) -> bool {
        false
    }
}

/// Rows to upsert, as (key, value) encodings.
pub type Puts = Vec<(Vec<u8>, Vec<u8>)>;

/// Where [`Store::apply_puts`] gets its rows: called with the chunk just written (handed
/// back, or `None`), it returns the next chunk, `None` at the end (commit), or an error
/// (give up: roll back).
pub type PutSource<'a> = dyn FnMut(Option<Puts>) -> Option<Result<Puts>> + 'a;

/// A sign that a table may have changed, for [`Builder::watch`](crate::Builder::watch):
/// made by [`Store::change_signal`], used by the watcher thread only.
pub trait ChangeSignal: Send {
    /// Waits up to `timeout` for a sign of a change; `Ok(true)` when one came.
    fn wait(&mut self, timeout: Duration) -> Result<bool>;
}

impl Store for Box<dyn Store> {
    fn backend(&self) -> &'static str {
        (**self).backend()
    }
    fn open(&mut self, table: &TableSpec) -> Result<()> {
        (**self).open(table)
    }
    fn load(&mut self, sink: &mut RowSink<'_>) -> Result<()> {
        (**self).load(sink)
    }
    fn apply(&mut self, batch: &Batch) -> Result<()> {
        (**self).apply(batch)
    }
    fn apply_seq(&mut self, batches: &[Batch]) -> Result<()> {
        (**self).apply_seq(batches)
    }
    fn applies_seq(&self) -> bool {
        (**self).applies_seq()
    }
    fn max_key_len(&self) -> Option<usize> {
        (**self).max_key_len()
    }
    fn max_value_len(&self) -> Option<usize> {
        (**self).max_value_len()
    }
    fn reconnect(&mut self) -> Result<()> {
        (**self).reconnect()
    }
    fn can_reconnect(&self) -> bool {
        (**self).can_reconnect()
    }
    fn get(&mut self, key: &[u8]) -> Result<Option<Vec<u8>>> {
        (**self).get(key)
    }
    fn count(&mut self) -> Result<u64> {
        (**self).count()
    }
    fn scan(
        &mut self,
        from: Option<&[u8]>,
        limit: Option<u64>,
        sink: &mut RowSink<'_>,
    ) -> Result<()> {
        (**self).scan(from, limit, sink)
    }
    fn put_rows(
        &mut self,
        replace: bool,
        distinct_keys: bool,
        next: &mut PutSource<'_>,
    ) -> Result<()> {
        (**self).put_rows(replace, distinct_keys, next)
    }
    fn enable_changes(&mut self) -> Result<()> {
        (**self).enable_changes()
    }
    fn version(&mut self) -> Result<u64> {
        (**self).version()
    }
    fn changes(&mut self, since: u64, sink: &mut ChangeSink<'_>) -> Result<Option<u64>> {
        (**self).changes(since, sink)
    }
    fn compact(&mut self, keep: u64) -> Result<()> {
        (**self).compact(keep)
    }
    fn change_signal(&mut self, every: Duration) -> Result<Option<Box<dyn ChangeSignal>>> {
        (**self).change_signal(every)
    }
    fn streams_puts(&self) -> bool {
        (**self).streams_puts()
    }
    fn rows_hint(&mut self) -> Option<usize> {
        (**self).rows_hint()
    }
    fn apply_puts(&mut self, next: &mut PutSource<'_>) -> Result<()> {
        (**self).apply_puts(next)
    }
    fn reads_slices(&self) -> bool {
        (**self).reads_slices()
    }
}

/// A connection that can become a [`Store`]: `rusqlite::Connection`,
/// `postgres::Client`, `mysql::Conn`, or any `Store` itself.
pub trait IntoStore {
    /// Wraps the connection.
    fn into_store(self) -> Box<dyn Store>;
}

impl<T: Store + 'static> IntoStore for T {
    fn into_store(self) -> Box<dyn Store> {
        Box::new(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn range(format: Format, prefix: &[u8]) -> Option<(Vec<u8>, Option<Vec<u8>>)> {
        TableSpec::new("t", format, format)
            .with_key_prefix(prefix)
            .key_range()
            .map(|(start, end)| (start.to_vec(), end))
    }

    #[test]
    fn a_slice_is_the_range_up_to_the_next_prefix() {
        let text = |p: &str| range(Format::Text, p.as_bytes()).map(|(_, end)| end);
        assert_eq!(text(""), None, "an empty prefix is the whole table");
        assert_eq!(text("t42/"), Some(Some(b"t420".to_vec())));
        // The bound stays UTF-8: after U+00FF (C3 BF) comes U+0100 (C4 80), not C3 C0.
        assert_eq!(text("a\u{ff}"), Some(Some("a\u{100}".as_bytes().to_vec())));
        assert_eq!(
            text("a\u{d7ff}"),
            Some(Some("a\u{e000}".as_bytes().to_vec()))
        );
        assert_eq!(text("a\u{10ffff}"), Some(Some(b"b".to_vec())));
        assert_eq!(text("\u{10ffff}"), Some(None), "no text above: open-ended");
        let bytes = |p: &[u8]| range(Format::Binary, p).map(|(_, end)| end);
        assert_eq!(bytes(&[1, 0xFF]), Some(Some(vec![2])));
        assert_eq!(bytes(&[0xFF, 0xFF]), Some(None));
        let t = TableSpec::new("t", Format::Text, Format::Text).with_key_prefix("ab");
        assert!(t.holds_key(b"abc") && t.holds_key(b"ab") && !t.holds_key(b"a"));
    }

    #[test]
    fn builder_keeps_last_change_per_key() {
        let mut b = BatchBuilder::default();
        b.put(b"a".to_vec(), b"1".to_vec());
        b.delete(b"b".to_vec());
        b.put(b"a".to_vec(), b"2".to_vec());
        b.put(b"c".to_vec(), b"3".to_vec());
        b.delete(b"c".to_vec());
        let batch = b.finish();
        assert_eq!(batch.puts, vec![(b"a".to_vec(), b"2".to_vec())]);
        assert_eq!(batch.deletes, vec![b"b".to_vec(), b"c".to_vec()]);
        assert!(!batch.clear);
    }

    #[test]
    fn clear_forgets_what_came_before() {
        let mut b = BatchBuilder::default();
        b.put(b"a".to_vec(), b"1".to_vec());
        b.clear();
        b.delete(b"x".to_vec());
        b.put(b"z".to_vec(), b"9".to_vec());
        let batch = b.finish();
        assert!(batch.clear);
        assert!(batch.deletes.is_empty());
        assert_eq!(batch.puts, vec![(b"z".to_vec(), b"9".to_vec())]);
        assert_eq!(batch.len(), 2);
    }
}
