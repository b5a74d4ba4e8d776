//! `DbHashMap`: reads served from memory through `Deref`, writes sent to the store first.

#[cfg(feature = "tokio")]
mod asynchronous;
mod events;
mod lanes;
mod shared;
mod transaction;
mod watch;
mod writer;

use std::borrow::Borrow;
use std::collections::hash_map::{self, RandomState};
use std::collections::HashMap;
use std::fmt;
use std::hash::{BuildHasher, Hash};
use std::ops::{Deref, Index};

use crate::builder::{Builder, Source};
use crate::codec::Codec;
use crate::error::Result;
use crate::store::{Batch, IntoStore, Store, TableSpec};
use crate::write_behind::WriteBehind;

pub use events::{Event, Next, Subscription};
pub(crate) use lanes::LaneSource;
pub use shared::{ReadGuard, SharedDbHashMap};

/// The fewest pairs `insert_many` streams to a store that can take them as they come.
const STREAM_FROM: usize = 50_000;
pub use transaction::Transaction;
pub(crate) use watch::{start as start_watch, WatchConfig};
use writer::{apply_changes, Refreshed, Writer};

/// A `HashMap` held in memory whose every change is written through to a database
/// table first.
///
/// Reads are `HashMap`'s own, through [`Deref`]: `get`, `contains_key`, `len`, `iter`
/// and the rest never touch the database. Every method that changes the map runs its
/// statement first and changes memory only when the statement succeeded; when it
/// fails, the error is returned and memory is exactly as before.
///
/// **One writer per table.** The map trusts that nothing else writes its table: two
/// maps on one table, or a map and another program, silently diverge. Keep one map
/// per table, call [`reload`](Self::reload) after others wrote, or open every map
/// with [`Builder::coherent`] and [`refresh`](Self::refresh) them.
///
/// **Threads.** Writes take `&mut self`; for one map that many threads or tasks read
/// and write, open it with [`Builder::open_shared`] (a [`SharedDbHashMap`]).
///
/// **`HashMap` habits.** `Deref` gives read access only: `entry` and `get_mut` do not
/// compile here (use [`upsert`](Self::upsert), [`get_or_insert_with`](Self::get_or_insert_with)
/// or [`update`](Self::update)), and neither does `clone` (use
/// [`to_hash_map`](Self::to_hash_map), a copy that is never persisted).
///
/// ```
/// use write_thru_hash::DbHashMap;
///
/// let dir = tempfile::tempdir()?;
/// let url = format!("sqlite:{}", dir.path().join("db.sqlite").display());
/// let mut h: DbHashMap<String, i64> = DbHashMap::open_url(&url)?;
/// h.insert("a".into(), 1)?;          // persisted first, then applied in memory
/// h.insert("b".into(), 2)?;
/// h.remove("b")?;
/// assert_eq!(h.get("a"), Some(&1));  // memory only, no I/O, no Result
/// assert_eq!(format!("{h:?}"), r#"{"a": 1}"#);
/// drop(h);
///
/// let again: DbHashMap<String, i64> = DbHashMap::open_url(&url)?;
/// assert_eq!(again.get("a"), Some(&1));
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub struct DbHashMap<K, V, S = RandomState> {
    map: HashMap<K, V, S>,
    w: Writer<K, V>,
}

impl<K, V> DbHashMap<K, V, RandomState> {
    /// Opens the table `hashtable` on `conn` with the [`Json`](crate::Json) codec,
    /// creating it if absent and loading its rows if present.
    ///
    /// `conn` is a connection taken by value: a `rusqlite::Connection` (feature
    /// `sqlite`), a `postgres::Client` (feature `postgres`), a `mysql::Conn`
    /// (feature `mysql`), an `odbc_api::Connection<'static>` (feature `odbc`), or any
    /// [`Store`].
    ///
    /// ```
    /// # use write_thru_hash::DbHashMap;
    /// let conn = rusqlite::Connection::open_in_memory()?;
    /// let h: DbHashMap<String, i64> = DbHashMap::open(conn)?;
    /// assert!(h.is_empty());
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn open(conn: impl IntoStore) -> Result<Self>
    where
        K: Eq + Hash + serde::Serialize + serde::de::DeserializeOwned,
        V: serde::Serialize + serde::de::DeserializeOwned,
    {
        Self::builder(conn).open()
    }

    /// A [`Builder`] to choose the table, codecs, hasher and initial content.
    pub fn builder(conn: impl IntoStore) -> Builder<K, V> {
        Builder::new(Source::Store(conn.into_store()))
    }

    /// Opens the table `hashtable` in the database at `url`, with the
    /// [`Json`](crate::Json) codec: `sqlite:PATH`, `sqlite::memory:`,
    /// `postgres://…`, `mysql://…`, `odbc:CONNECTION-STRING`. A scheme whose
    /// feature is off is an error that names the feature. See [`Builder`] for the rest.
    pub fn open_url(url: &str) -> Result<Self>
    where
        K: Eq + Hash + serde::Serialize + serde::de::DeserializeOwned,
        V: serde::Serialize + serde::de::DeserializeOwned,
    {
        Self::builder_url(url).open()
    }

    /// A [`Builder`] on the database at `url`; the connection is made by
    /// [`Builder::open`], which reports a bad URL.
    pub fn builder_url(url: &str) -> Builder<K, V> {
        Builder::new(Source::Url(url.to_string()))
    }

    /// Opens the table `hashtable` in the SQLite file at `path` (any path, UTF-8 or
    /// not), with the durable defaults of `open_url("sqlite:…")`: WAL journal,
    /// `synchronous = FULL`, a 5 s busy timeout. Feature `sqlite`.
    ///
    /// ```
    /// # use write_thru_hash::DbHashMap;
    /// let dir = tempfile::tempdir()?;
    /// let mut h: DbHashMap<String, i64> = DbHashMap::open_path(dir.path().join("db.sqlite"))?;
    /// h.insert("a".into(), 1)?;
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    #[cfg(feature = "sqlite")]
    pub fn open_path(path: impl AsRef<std::path::Path>) -> Result<Self>
    where
        K: Eq + Hash + serde::Serialize + serde::de::DeserializeOwned,
        V: serde::Serialize + serde::de::DeserializeOwned,
    {
        Self::builder_path(path)?.open()
    }

    /// A [`Builder`] on the SQLite file at `path`, opened with the defaults of
    /// [`open_path`](Self::open_path). Feature `sqlite`.
    #[cfg(feature = "sqlite")]
    pub fn builder_path(path: impl AsRef<std::path::Path>) -> Result<Builder<K, V>> {
        let store = crate::store::sqlite::SqliteStore::open_path(path.as_ref())?;
        Ok(Builder::new(Source::Store(Box::new(store))))
    }
}

impl<K, V, S> DbHashMap<K, V, S> {
    pub(crate) fn from_parts(
        map: HashMap<K, V, S>,
        store: Box<dyn Store>,
        keys: Box<dyn Codec<K>>,
        values: Box<dyn Codec<V>>,
        table: TableSpec,
        prefix: Option<String>,
    ) -> Self {
        DbHashMap {
            map,
            w: Writer::new(store, keys, values, table, prefix),
        }
    }

    /// The map's entries and its write path, apart: what a shared map is made of.
    pub(crate) fn into_parts(self) -> (HashMap<K, V, S>, Writer<K, V>) {
        (self.map, self.w)
    }

    /// How many writes were tried again after the server rolled them back for a
    /// conflict with another writer (a deadlock, a serialization failure, a Galera
    /// certification conflict). Each is retried up to 8 times before its error is
    /// returned.
    pub fn conflicts_retried(&self) -> u64 {
        self.w
            .conflicts_retried
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The name of the table the map writes to.
    pub fn table_name(&self) -> &str {
        &self.w.table.name
    }

    /// The backend's name (`"SQLite"`, `"PostgreSQL"`, `"MySQL/MariaDB"`, ...).
    pub fn backend(&self) -> &'static str {
        self.w.backend
    }

    /// Gives up the table and returns the map's content.
    pub fn into_inner(self) -> HashMap<K, V, S> {
        self.map
    }

    /// A copy of the map's content as a plain `HashMap`, never persisted: changes to it
    /// stay in the copy. (`h.clone()` is refused at compile time to make this
    /// explicit.)
    ///
    /// ```
    /// # use write_thru_hash::DbHashMap;
    /// # let mut h: DbHashMap<String, i64> = DbHashMap::open_url("sqlite::memory:")?;
    /// h.insert("a".into(), 1)?;
    /// let mut copy = h.to_hash_map();
    /// copy.insert("b".into(), 2); // the copy only; the table is untouched
    /// assert_eq!(h.len(), 1);
    /// # Ok::<(), write_thru_hash::Error>(())
    /// ```
    ///
    /// What a `HashMap` user may reach for first does not compile, with a message that
    /// points here and to [`upsert`](Self::upsert):
    ///
    /// ```compile_fail
    /// # use write_thru_hash::DbHashMap;
    /// # let h: DbHashMap<String, i64> = DbHashMap::open_url("sqlite::memory:").unwrap();
    /// let copy = h.clone(); // refused: use `to_hash_map()`
    /// ```
    ///
    /// ```compile_fail
    /// # use write_thru_hash::DbHashMap;
    /// # let mut h: DbHashMap<String, i64> = DbHashMap::open_url("sqlite::memory:").unwrap();
    /// *h.entry("a".into()).or_insert(0) += 1; // refused: use `upsert`
    /// ```
    ///
    /// ```compile_fail
    /// # use write_thru_hash::DbHashMap;
    /// # let mut h: DbHashMap<String, i64> = DbHashMap::open_url("sqlite::memory:").unwrap();
    /// if let Some(v) = h.get_mut("a") { *v += 1; } // refused: use `upsert` or `update`
    /// ```
    pub fn to_hash_map(&self) -> HashMap<K, V, S>
    where
        K: Clone,
        V: Clone,
        S: Clone,
    {
        self.map.clone()
    }

    /// Not available: through `Deref`, `h.clone()` would give a plain `HashMap` whose
    /// changes are never persisted. Use [`to_hash_map`](Self::to_hash_map) for a copy of
    /// the content, or open the table again for a second map.
    #[doc(hidden)]
    // Shadowing `Clone::clone` is the point: the call must not reach `HashMap`'s.
    #[allow(clippy::should_implement_trait)]
    pub fn clone(&self) -> Self
    where
        K: crate::blocked::UseToHashMap,
    {
        unreachable!("`UseToHashMap` has no implementations")
    }

    /// Not available: a `HashMap` entry would change memory without the table. Use
    /// [`upsert`](Self::upsert), [`get_or_insert_with`](Self::get_or_insert_with) or
    /// [`insert`](Self::insert).
    #[doc(hidden)]
    pub fn entry(&mut self, _key: K) -> hash_map::Entry<'_, K, V>
    where
        K: crate::blocked::UseUpsert,
    {
        unreachable!("`UseUpsert` has no implementations")
    }

    /// Not available: a `&mut V` would change memory without the table. Use
    /// [`upsert`](Self::upsert) or [`update`](Self::update).
    #[doc(hidden)]
    pub fn get_mut<Q: ?Sized>(&mut self, _key: &Q) -> Option<&mut V>
    where
        K: crate::blocked::UseUpsert,
    {
        unreachable!("`UseUpsert` has no implementations")
    }

    /// Switches to write-behind: from now on a background thread writes the changes.
    pub(crate) fn start_write_behind(&mut self, config: WriteBehind) -> Result<()> {
        self.w.start_write_behind(config)
    }

    /// Write-behind: waits until every change made so far is in the table, and returns
    /// the failure of a background batch if one failed (it is kept and retried).
    /// Write-through: returns at once, every change is in the table already.
    pub fn flush(&self) -> Result<()> {
        self.w.flush()
    }

    /// Flushes and stops the write-behind thread, reporting what could not be written.
    /// Dropping the map does the same and logs a failure with `tracing`.
    pub fn close(mut self) -> Result<()> {
        self.w.close()
    }

    /// Write-behind: the changes not yet in the table (one per key). Write-through: 0.
    pub fn pending_writes(&self) -> usize {
        self.w.pending()
    }
}

impl<K, V, S> DbHashMap<K, V, S>
where
    K: Eq + Hash,
    S: BuildHasher,
{
    /// Inserts a key-value pair, returning the value the key had.
    ///
    /// **Storage:** one upsert, committed on its own.
    ///
    /// ```
    /// # use write_thru_hash::DbHashMap;
    /// # let mut h: DbHashMap<String, i64> = DbHashMap::open_url("sqlite::memory:")?;
    /// assert_eq!(h.insert("a".into(), 1)?, None);
    /// assert_eq!(h.insert("a".into(), 2)?, Some(1));
    /// assert_eq!(h["a"], 2);
    /// # Ok::<(), write_thru_hash::Error>(())
    /// ```
    pub fn insert(&mut self, key: K, value: V) -> Result<Option<V>> {
        self.w.ready(&mut self.map)?;
        let batch = self.w.plan_insert(&self.map, &key, &value)?;
        self.w.persist(batch)?;
        Ok(self.map.insert(key, value))
    }

    /// Removes a key, returning its value. A key the map does not hold returns
    /// `Ok(None)` without any I/O.
    ///
    /// **Storage:** one delete, committed on its own.
    ///
    /// ```
    /// # use write_thru_hash::DbHashMap;
    /// # let mut h: DbHashMap<String, i64> = DbHashMap::open_url("sqlite::memory:")?;
    /// h.insert("a".into(), 1)?;
    /// assert_eq!(h.remove("a")?, Some(1));
    /// assert_eq!(h.remove("a")?, None);
    /// # Ok::<(), write_thru_hash::Error>(())
    /// ```
    pub fn remove<Q>(&mut self, key: &Q) -> Result<Option<V>>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        Ok(self.remove_entry(key)?.map(|(_, v)| v))
    }

    /// Removes a key, returning the stored key and its value.
    ///
    /// **Storage:** one delete, committed on its own; none if the key is absent.
    pub fn remove_entry<Q>(&mut self, key: &Q) -> Result<Option<(K, V)>>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        self.w.ready(&mut self.map)?;
        let Some((batch, _)) = self.w.plan_remove(&self.map, key)? else {
            return Ok(None);
        };
        self.w.persist(batch)?;
        Ok(self.map.remove_entry(key))
    }

    /// Removes every entry.
    ///
    /// **Storage:** one `DELETE` of every row of the table, committed on its own.
    pub fn clear(&mut self) -> Result<()> {
        self.w.ready(&mut self.map)?;
        self.w.persist(Batch {
            clear: true,
            ..Batch::default()
        })?;
        self.map.clear();
        Ok(())
    }

    /// Keeps only the entries for which `f` returns `true`, and says how many it removed.
    ///
    /// **Storage:** the deletes in one transaction; none if every entry is kept.
    ///
    /// ```
    /// # use write_thru_hash::DbHashMap;
    /// # let mut h: DbHashMap<i32, i32> = DbHashMap::open_url("sqlite::memory:")?;
    /// h.insert_many((0..10).map(|i| (i, i * i)))?;
    /// assert_eq!(h.retain(|k, _| k % 2 == 0)?, 5);
    /// assert_eq!(h.len(), 5);
    /// # Ok::<(), write_thru_hash::Error>(())
    /// ```
    pub fn retain(&mut self, f: impl FnMut(&K, &V) -> bool) -> Result<usize> {
        self.w.ready(&mut self.map)?;
        let (batch, doomed) = self.w.plan_retain(&self.map, f)?;
        if doomed.is_empty() {
            return Ok(0);
        }
        self.w.persist(batch)?;
        self.map.retain(|k, _| !doomed.contains(&(k as *const K)));
        Ok(doomed.len())
    }

    /// Removes every key given that the map holds, as one transaction, and says how many
    /// it removed. Keys are borrowed, as [`remove`](Self::remove) takes them.
    ///
    /// **Storage:** the deletes in one transaction; none if no key is held.
    ///
    /// ```
    /// # use write_thru_hash::DbHashMap;
    /// # let mut h: DbHashMap<String, i64> = DbHashMap::open_url("sqlite::memory:")?;
    /// h.insert_many([("a".to_string(), 1), ("b".into(), 2), ("c".into(), 3)])?;
    /// assert_eq!(h.remove_many(["a", "b", "zzz"])?, 2);
    /// assert_eq!(h.len(), 1);
    /// # Ok::<(), write_thru_hash::Error>(())
    /// ```
    pub fn remove_many<'q, Q>(&mut self, keys: impl IntoIterator<Item = &'q Q>) -> Result<usize>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized + 'q,
    {
        self.w.ready(&mut self.map)?;
        let (batch, held) = self.w.plan_remove_many(&self.map, keys)?;
        if held.is_empty() {
            return Ok(0);
        }
        self.w.persist(batch)?;
        for q in &held {
            self.map.remove(*q);
        }
        Ok(held.len())
    }

    /// Sets the value of `key` to what `f` makes of its current value (`None` if the
    /// key is absent), and returns the value now held: read-modify-write without
    /// `V: Clone`. `f` runs first; memory changes only once the table did.
    ///
    /// **Storage:** one upsert, committed on its own.
    ///
    /// ```
    /// # use write_thru_hash::DbHashMap;
    /// # let mut h: DbHashMap<String, u64> = DbHashMap::open_url("sqlite::memory:")?;
    /// for word in "the cat and the hat".split(' ') {
    ///     h.upsert(word.to_string(), |count| count.copied().unwrap_or(0) + 1)?;
    /// }
    /// assert_eq!(h["the"], 2);
    /// assert_eq!(*h.upsert("cat".into(), |c| c.map_or(1, |c| c * 10))?, 10);
    /// # Ok::<(), write_thru_hash::Error>(())
    /// ```
    pub fn upsert(&mut self, key: K, f: impl FnOnce(Option<&V>) -> V) -> Result<&V> {
        self.w.ready(&mut self.map)?;
        let (batch, value) = self.w.plan_upsert(&self.map, &key, f)?;
        self.w.persist(batch)?;
        Ok(match self.map.entry(key) {
            hash_map::Entry::Occupied(mut held) => {
                held.insert(value);
                held.into_mut()
            }
            hash_map::Entry::Vacant(slot) => slot.insert(value),
        })
    }

    /// The value of `key`; if the key is absent, first inserts the value `f` makes.
    /// A key the map holds costs no I/O and does not call `f`.
    ///
    /// **Storage:** one upsert if the key is absent, else none.
    ///
    /// ```
    /// # use write_thru_hash::DbHashMap;
    /// # let mut h: DbHashMap<String, Vec<String>> = DbHashMap::open_url("sqlite::memory:")?;
    /// let session = h.get_or_insert_with("s1".into(), || vec!["created".into()])?;
    /// assert_eq!(session.len(), 1);
    /// let again = h.get_or_insert_with("s1".into(), || unreachable!())?;
    /// assert_eq!(again[0], "created");
    /// # Ok::<(), write_thru_hash::Error>(())
    /// ```
    pub fn get_or_insert_with(&mut self, key: K, f: impl FnOnce() -> V) -> Result<&V> {
        if self.map.contains_key(&key) {
            return Ok(&self.map[&key]);
        }
        self.upsert(key, |_| f())
    }

    /// Folds every pair into the map as one transaction: the value stored for a key is
    /// `f(current, new)`, where `current` is the value the key has (from the map, or from
    /// an earlier pair of the same call) and `new` the pair's value. The batched
    /// counterpart of [`upsert`](Self::upsert), for counters and accumulators.
    ///
    /// **Storage:** one transaction of upserts, one per distinct key.
    ///
    /// ```
    /// # use write_thru_hash::DbHashMap;
    /// # let mut counts: DbHashMap<String, u64> = DbHashMap::open_url("sqlite::memory:")?;
    /// let text = "a rose is a rose is a rose";
    /// counts.upsert_many(text.split(' ').map(|w| (w.to_string(), 1)), |old, n| {
    ///     old.copied().unwrap_or(0) + n
    /// })?;
    /// assert_eq!((counts["rose"], counts["a"], counts["is"]), (3, 3, 2));
    /// # Ok::<(), write_thru_hash::Error>(())
    /// ```
    pub fn upsert_many(
        &mut self,
        pairs: impl IntoIterator<Item = (K, V)>,
        f: impl FnMut(Option<&V>, V) -> V,
    ) -> Result<()> {
        self.w.ready(&mut self.map)?;
        let (batch, entries) = self.w.plan_upsert_many(&self.map, pairs, f)?;
        self.w.persist(batch)?;
        self.map.extend(entries);
        Ok(())
    }

    /// Changes the value of `key` with `f`, returning whether the key was present.
    /// `f` works on a copy, which replaces the value once it is stored.
    ///
    /// **Storage:** one upsert, committed on its own; none if the key is absent.
    ///
    /// ```
    /// # use write_thru_hash::DbHashMap;
    /// # let mut h: DbHashMap<String, Vec<i32>> = DbHashMap::open_url("sqlite::memory:")?;
    /// h.insert("a".into(), vec![1])?;
    /// assert!(h.update("a", |v| v.push(2))?);
    /// assert!(!h.update("b", |v| v.push(2))?);
    /// assert_eq!(h["a"], [1, 2]);
    /// # Ok::<(), write_thru_hash::Error>(())
    /// ```
    pub fn update<Q>(&mut self, key: &Q, f: impl FnOnce(&mut V)) -> Result<bool>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
        V: Clone,
    {
        self.w.ready(&mut self.map)?;
        let Some((batch, value)) = self.w.plan_update(&self.map, key, f)? else {
            return Ok(false);
        };
        self.w.persist(batch)?;
        if let Some(slot) = self.map.get_mut(key) {
            *slot = value;
        }
        Ok(true)
    }

    /// Inserts every pair, as one transaction: all of them or none. A key given
    /// twice keeps its last value.
    ///
    /// **Storage:** one transaction of upserts.
    pub fn insert_many(&mut self, pairs: impl IntoIterator<Item = (K, V)>) -> Result<()> {
        self.w.ready(&mut self.map)?;
        let pairs: Vec<(K, V)> = pairs.into_iter().collect();
        // Big enough for the overlap to pay for a thread and the hand-overs (measured on
        // SQLite: at 20,000 pairs streaming was 5-20 % slower, at 200,000 25-35 % faster).
        if pairs.len() >= STREAM_FROM && self.w.behind.is_none() && self.w.store().streams_puts() {
            return self.w.stream_insert(&mut self.map, pairs);
        }
        let batch = self.w.encode_pairs(Some(&self.map), &pairs)?;
        self.w.persist(batch)?;
        self.map.reserve(pairs.len());
        self.map.extend(pairs);
        Ok(())
    }

    /// Runs `f` with a [`Transaction`] that stages inserts and removes, then commits
    /// them as one database transaction: all or nothing, in the database and in memory
    /// alike. An `Err` from `f` (such as [`Error::abort`](crate::Error::abort)) or a panic in `f` leaves
    /// both as they were.
    ///
    /// **Storage:** nothing while `f` runs; one transaction when it returns `Ok`.
    ///
    /// ```
    /// # use write_thru_hash::DbHashMap;
    /// # let mut h: DbHashMap<String, i64> = DbHashMap::open_url("sqlite::memory:")?;
    /// h.insert("alice".into(), 10)?;
    /// h.transaction(|tx| {
    ///     let a = *tx.get("alice").unwrap_or(&0);
    ///     tx.insert("alice".into(), a - 3)?;
    ///     tx.insert("bob".into(), 3)?;
    ///     Ok(())
    /// })?;
    /// assert_eq!((h["alice"], h["bob"]), (7, 3));
    /// # Ok::<(), write_thru_hash::Error>(())
    /// ```
    pub fn transaction<R>(
        &mut self,
        f: impl FnOnce(&mut Transaction<'_, K, V, S>) -> Result<R>,
    ) -> Result<R> {
        self.w.ready(&mut self.map)?;
        let mut tx = Transaction::new(&self.map, &self.w);
        let result = f(&mut tx)?;
        let (batch, staged) = tx.finish();
        self.w.persist(batch)?;
        staged.apply(&mut self.map);
        Ok(result)
    }

    /// Re-reads the whole table into memory: after a write whose outcome is unknown
    /// (the map refuses writes until then), or after the table was changed behind the
    /// map's back. Reconnects first when the store knows how. On error the map keeps
    /// its content.
    pub fn reload(&mut self) -> Result<()>
    where
        S: Clone,
    {
        self.w.flush()?;
        let (map, version) = self.w.load_fresh(self.map.hasher().clone())?;
        self.map = map;
        self.w.took_fresh(version);
        Ok(())
    }

    /// Coherence: applies, as one step, every change that others committed to the
    /// table since this map's open or last refresh, and returns how many keys changed in
    /// memory. It reads the changes, not the table: its cost grows with the number of
    /// changes. Others are every writer: maps in this process or another, and plain SQL.
    /// The last committed write to a key wins.
    ///
    /// A map that fell behind the change log's compaction reloads in full (and logs
    /// that it did). On error, memory is as it was. A write whose outcome was unknown
    /// is settled too: the map takes the key as the table holds it, and writes again.
    ///
    /// **Storage:** one query (a write-behind map flushes first).
    ///
    /// ```
    /// # use write_thru_hash::DbHashMap;
    /// let dir = tempfile::tempdir()?;
    /// let url = format!("sqlite:{}", dir.path().join("db.sqlite").display());
    /// let mut a: DbHashMap<String, i64> = DbHashMap::builder_url(&url).coherent().open()?;
    /// let mut b: DbHashMap<String, i64> = DbHashMap::builder_url(&url).coherent().open()?;
    /// a.insert("x".into(), 1)?;
    /// assert_eq!(b.get("x"), None);  // b has not looked yet
    /// assert_eq!(b.refresh()?, 1);   // one key changed in b's memory
    /// assert_eq!(b["x"], 1);
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn refresh(&mut self) -> Result<usize>
    where
        S: Clone,
    {
        match self.w.read_changes(&self.map, None)? {
            Refreshed::Changes(changed, reached) => {
                let count = changed.len();
                apply_changes(&mut self.map, changed);
                self.w.refreshed_to(reached);
                Ok(count)
            }
            Refreshed::FellBehind => {
                let (fresh, version) = self.w.load_fresh(self.map.hasher().clone())?;
                let count = self.w.differences(&self.map, &fresh).len();
                self.map = fresh;
                self.w.took_fresh(version);
                Ok(count)
            }
        }
    }

    /// Coherence: installs the change log (if absent) and reads the version, before the
    /// load that follows.
    pub(crate) fn start_coherence(&mut self, keep: u64) -> Result<()> {
        self.w.start_coherence(keep)
    }

    /// Fills the (empty) map from the table: the second half of opening.
    pub(crate) fn load_empty(&mut self) -> Result<()> {
        self.w.load_into(&mut self.map)
    }

    /// Replaces the table's content with `src` in one transaction, then the map's.
    pub(crate) fn replace_all(&mut self, src: Vec<(K, V)>) -> Result<()> {
        self.w.replace_all(&src)?;
        self.map.clear();
        self.map.extend(src);
        Ok(())
    }
}

impl<K, V, S> Deref for DbHashMap<K, V, S> {
    type Target = HashMap<K, V, S>;

    fn deref(&self) -> &HashMap<K, V, S> {
        &self.map
    }
}

impl<K: fmt::Debug, V: fmt::Debug, S> fmt::Debug for DbHashMap<K, V, S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map().entries(self.map.iter()).finish()
    }
}

impl<K, V, S> PartialEq for DbHashMap<K, V, S>
where
    K: Eq + Hash,
    V: PartialEq,
    S: BuildHasher,
{
    fn eq(&self, other: &Self) -> bool {
        self.map == other.map
    }
}

impl<K, V, S> Eq for DbHashMap<K, V, S>
where
    K: Eq + Hash,
    V: Eq,
    S: BuildHasher,
{
}

impl<K, V, S> PartialEq<HashMap<K, V, S>> for DbHashMap<K, V, S>
where
    K: Eq + Hash,
    V: PartialEq,
    S: BuildHasher,
{
    fn eq(&self, other: &HashMap<K, V, S>) -> bool {
        &self.map == other
    }
}

impl<K, V, S> PartialEq<DbHashMap<K, V, S>> for HashMap<K, V, S>
where
    K: Eq + Hash,
    V: PartialEq,
    S: BuildHasher,
{
    fn eq(&self, other: &DbHashMap<K, V, S>) -> bool {
        self == &other.map
    }
}

impl<K, Q, V, S> Index<&Q> for DbHashMap<K, V, S>
where
    K: Eq + Hash + Borrow<Q>,
    Q: Eq + Hash + ?Sized,
    S: BuildHasher,
{
    type Output = V;

    /// The value of `key`; panics if it is absent, as `HashMap`'s index does.
    fn index(&self, key: &Q) -> &V {
        &self.map[key]
    }
}

impl<'a, K, V, S> IntoIterator for &'a DbHashMap<K, V, S> {
    type Item = (&'a K, &'a V);
    type IntoIter = hash_map::Iter<'a, K, V>;

    fn into_iter(self) -> Self::IntoIter {
        self.map.iter()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ensure_send_sync<T: Send + Sync>() {}

    #[test]
    fn maps_move_to_and_are_read_from_other_threads() {
        ensure_send_sync::<DbHashMap<String, i64>>();
        ensure_send_sync::<DbHashMap<Vec<u8>, Vec<u8>, std::collections::hash_map::RandomState>>();
    }
}
