//! `DbHashMap`: reads served from memory through `Deref`, writes sent to the store first.

use std::borrow::Borrow;
use std::collections::hash_map::{self, RandomState};
use std::collections::{HashMap, HashSet};
use std::fmt;
use std::hash::{BuildHasher, Hash};
use std::ops::{Deref, Index};
use std::sync::{Arc, Mutex, MutexGuard};

use crate::builder::{Builder, Source};
use crate::codec::Codec;
use crate::error::{show_bytes, Action, Error, Result};
use crate::store::{Batch, BatchBuilder, IntoStore, Store, TableSpec};
use crate::write_behind::{Behind, WriteBehind};

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
/// per table, or call [`reload`](Self::reload) after others wrote.
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
    // Shared with the write-behind thread when there is one; otherwise only writers
    // (`&mut self`) lock it, so the lock is never contended.
    store: Arc<Mutex<Box<dyn Store>>>,
    behind: Option<Behind>,
    backend: &'static str,
    max_key_len: Option<usize>,
    max_value_len: Option<usize>,
    keys: Box<dyn Codec<K>>,
    values: Box<dyn Codec<V>>,
    table: TableSpec,
    poisoned: bool,
    /// Coherence: the version of the table this map has seen, and its settings.
    coherent: Option<Coherent>,
    /// Writes tried again after a conflict with another writer, so far.
    conflicts_retried: u64,
}

/// A coherent map's state: the table version it has seen, how many versions of changes
/// the log keeps, and writes since the log was last looked at for compaction.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Coherent {
    pub(crate) seen: u64,
    pub(crate) keep: u64,
    writes: u64,
}

/// How many times a write that conflicted with another writer is tried again.
const CONFLICT_RETRIES: u32 = 8;

/// The pause before try `tries` (from 1) of a conflicting write: about 1 ms, doubling,
/// with a jitter so that two writers that conflicted do not meet again.
fn conflict_pause(tries: u32) -> std::time::Duration {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    let base = 500u64 << tries.min(10);
    std::time::Duration::from_micros(base + u64::from(nanos) % base)
}

/// Changes written between two looks at whether the change log needs compacting.
const COMPACT_EVERY: u64 = 1024;

impl Coherent {
    pub(crate) fn new(keep: u64) -> Self {
        Coherent {
            seen: 0,
            keep,
            writes: 0,
        }
    }
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
    ) -> Self {
        DbHashMap {
            map,
            backend: store.backend(),
            max_key_len: store.max_key_len(),
            max_value_len: store.max_value_len(),
            store: Arc::new(Mutex::new(store)),
            behind: None,
            keys,
            values,
            table,
            poisoned: false,
            coherent: None,
            conflicts_retried: 0,
        }
    }

    /// How many writes were tried again after the server rolled them back for a
    /// conflict with another writer (a deadlock, a serialization failure, a Galera
    /// certification conflict). Each is retried up to 8 times before its error is
    /// returned.
    pub fn conflicts_retried(&self) -> u64 {
        self.conflicts_retried
    }

    /// The name of the table the map writes to.
    pub fn table_name(&self) -> &str {
        &self.table.name
    }

    /// The backend's name (`"SQLite"`, `"PostgreSQL"`, `"MySQL/MariaDB"`, ...).
    pub fn backend(&self) -> &'static str {
        self.backend
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

    fn store(&self) -> MutexGuard<'_, Box<dyn Store>> {
        lock(&self.store)
    }

    /// Switches to write-behind: from now on a background thread writes the changes.
    pub(crate) fn start_write_behind(&mut self, config: WriteBehind) -> Result<()> {
        self.behind = Some(Behind::start(
            config,
            self.table.name.clone(),
            Arc::clone(&self.store),
        )?);
        Ok(())
    }

    /// Write-behind: waits until every change made so far is in the table, and returns
    /// the failure of a background batch if one failed (it is kept and retried).
    /// Write-through: returns at once, every change is in the table already.
    pub fn flush(&self) -> Result<()> {
        self.behind.as_ref().map_or(Ok(()), Behind::flush)
    }

    /// Flushes and stops the write-behind thread, reporting what could not be written.
    /// Dropping the map does the same and logs a failure with `tracing`.
    pub fn close(mut self) -> Result<()> {
        self.behind.as_mut().map_or(Ok(()), Behind::close)
    }

    /// Write-behind: the changes not yet in the table (one per key). Write-through: 0.
    pub fn pending_writes(&self) -> usize {
        self.behind.as_ref().map_or(0, Behind::pending)
    }
}

fn lock(store: &Mutex<Box<dyn Store>>) -> MutexGuard<'_, Box<dyn Store>> {
    // A panic in a store method leaves the store as it was; go on with it.
    store
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl<K, V, S> DbHashMap<K, V, S>
where
    K: Eq + Hash,
    S: BuildHasher,
{
    fn check_writable(&self) -> Result<()> {
        if self.poisoned {
            Err(Error::Poisoned {
                table: self.table.name.clone(),
            })
        } else {
            Ok(())
        }
    }

    fn encode_key(&self, key: &K) -> Result<Vec<u8>> {
        let mut out = Vec::new();
        self.keys
            .encode_key(key, &mut out)
            .map_err(|source| Error::Encode {
                what: "key",
                table: self.table.name.clone(),
                source,
            })?;
        if let Some(max) = self.max_key_len {
            if out.len() > max {
                return Err(Error::KeyTooLong {
                    table: self.table.name.clone(),
                    backend: self.backend(),
                    len: out.len(),
                    max,
                });
            }
        }
        Ok(out)
    }

    fn encode_value(&self, value: &V) -> Result<Vec<u8>> {
        let mut out = Vec::new();
        self.values
            .encode(value, &mut out)
            .map_err(|source| Error::Encode {
                what: "value",
                table: self.table.name.clone(),
                source,
            })?;
        if let Some(max) = self.max_value_len.filter(|max| out.len() > *max) {
            return Err(Error::ValueTooLong {
                table: self.table.name.clone(),
                backend: self.backend,
                len: out.len(),
                max,
            });
        }
        Ok(out)
    }

    /// Encodes a key about to be written, and checks that its bytes read back as that
    /// key: a codec that writes two unequal keys alike (`None` and `Some(())` are both
    /// JSON `null`) would make them one row while memory holds two.
    fn encode_written_key(&self, key: &K) -> Result<Vec<u8>> {
        let bytes = self.encode_key(key)?;
        if self.keys.keys_distinct() {
            return Ok(bytes);
        }
        let refuse = |why: String| Error::Encode {
            what: "key",
            table: self.table.name.clone(),
            source: why.into(),
        };
        match self.keys.decode(&bytes) {
            Ok(back) if back == *key => Ok(bytes),
            Ok(_) => Err(refuse(format!(
                "the key codec writes this key as {}, which reads back as another key, so two \
                 keys would share one row; use a codec (or a key type) that tells them apart",
                show_bytes(&bytes)
            ))),
            Err(e) => Err(refuse(format!(
                "the key codec writes this key as {}, which does not read back: {e}",
                show_bytes(&bytes)
            ))),
        }
    }

    /// Encodes `key` and, when an equal key is already held, checks that the codec
    /// gives it the same bytes: otherwise one key would become two rows.
    fn encode_new_key(&self, key: &K) -> Result<Vec<u8>> {
        let bytes = self.encode_written_key(key)?;
        if let Some((held, _)) = self.map.get_key_value(key) {
            self.same_bytes(&self.encode_key(held)?, &bytes)?;
        }
        Ok(bytes)
    }

    /// Encodes `pairs` as upserts, the last pair of each key winning. Equal keys must
    /// encode to the same bytes, within `pairs` and (when `held`) against the keys the
    /// map holds: otherwise memory would keep one key while the table got another.
    fn encode_pairs(&self, pairs: &[(K, V)], held: bool) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
        let mut index: HashMap<&K, usize> = HashMap::with_capacity(pairs.len());
        let mut puts: Vec<(Vec<u8>, Vec<u8>)> = Vec::with_capacity(pairs.len());
        for (k, v) in pairs {
            let key = if held {
                self.encode_new_key(k)?
            } else {
                self.encode_written_key(k)?
            };
            let value = self.encode_value(v)?;
            match index.entry(k) {
                hash_map::Entry::Occupied(seen) => {
                    let slot = &mut puts[*seen.get()];
                    self.same_bytes(&slot.0, &key)?;
                    slot.1 = value;
                }
                hash_map::Entry::Vacant(slot) => {
                    slot.insert(puts.len());
                    puts.push((key, value));
                }
            }
        }
        Ok(puts)
    }

    /// Refuses two encodings of equal keys that differ.
    fn same_bytes(&self, first: &[u8], second: &[u8]) -> Result<()> {
        if first == second {
            Ok(())
        } else {
            Err(Error::NonCanonicalKey {
                table: self.table.name.clone(),
                row: show_bytes(first),
                other: show_bytes(second),
            })
        }
    }

    /// The one way into the store: applies `batch` atomically, and marks the map
    /// poisoned when the outcome is unknown.
    fn persist(&mut self, batch: Batch) -> Result<()> {
        self.check_writable()?;
        if let Some(behind) = &self.behind {
            let changes = batch.len();
            behind.enqueue(batch)?;
            self.after_write(changes);
            return Ok(());
        }
        let mut result = self.store().apply(&batch);
        // A transaction the server rolled back for a conflict with another writer (a
        // deadlock, a serialization or certification failure) is tried again a few
        // times, after a short, growing, jittered pause.
        let mut tries = 0;
        while tries < CONFLICT_RETRIES && result.as_ref().is_err_and(Error::is_conflict) {
            tries += 1;
            std::thread::sleep(conflict_pause(tries));
            self.conflicts_retried += 1;
            tracing::debug!(table = %self.table.name, tries, "write conflicted with another; retrying");
            result = self.store().apply(&batch);
        }
        if let Err(Error::OutcomeUnknown { .. }) = &result {
            self.poisoned = true;
            tracing::error!(table = %self.table.name, "write outcome unknown; map refuses writes until reload()");
        }
        if result.is_ok() {
            self.after_write(batch.len());
        }
        result
    }

    /// Coherence: now and then a writer looks at the change log's length and compacts
    /// it, so that the log stays bounded even when no map refreshes. A failure here
    /// does not fail the write, which is committed: it is logged.
    fn after_write(&mut self, changes: usize) {
        let Some(c) = &mut self.coherent else {
            return;
        };
        c.writes += changes as u64;
        if c.writes < COMPACT_EVERY {
            return;
        }
        c.writes = 0;
        let keep = c.keep;
        if let Err(e) = lock(&self.store).compact(keep) {
            tracing::warn!(table = %self.table.name, error = %e, "change log compaction failed");
        }
    }

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
        self.check_writable()?;
        let k = self.encode_new_key(&key)?;
        let v = self.encode_value(&value)?;
        self.persist(Batch {
            puts: vec![(k, v)],
            ..Batch::default()
        })?;
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
        self.check_writable()?;
        let Some((held, _)) = self.map.get_key_value(key) else {
            return Ok(None);
        };
        let k = self.encode_key(held)?;
        self.persist(Batch {
            deletes: vec![k],
            ..Batch::default()
        })?;
        Ok(self.map.remove_entry(key))
    }

    /// Removes every entry.
    ///
    /// **Storage:** one `DELETE` of every row of the table, committed on its own.
    pub fn clear(&mut self) -> Result<()> {
        self.persist(Batch {
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
    pub fn retain(&mut self, mut f: impl FnMut(&K, &V) -> bool) -> Result<usize> {
        self.check_writable()?;
        let mut doomed: HashSet<*const K> = HashSet::new();
        let mut batch = Batch::default();
        for (k, v) in &self.map {
            if !f(k, v) {
                batch.deletes.push(self.encode_key(k)?);
                doomed.insert(k);
            }
        }
        if doomed.is_empty() {
            return Ok(0);
        }
        self.persist(batch)?;
        // The keys have not moved since they were chosen: nothing changed the map, so
        // their addresses identify them without calling `f` a second time.
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
        self.check_writable()?;
        let mut held: Vec<&'q Q> = Vec::new();
        let mut batch = BatchBuilder::default();
        for q in keys {
            if let Some((k, _)) = self.map.get_key_value(q) {
                // A key given twice is deleted once.
                let bytes = self.encode_key(k)?;
                if !batch.contains(&bytes) {
                    batch.delete(bytes);
                    held.push(q);
                }
            }
        }
        if held.is_empty() {
            return Ok(0);
        }
        self.persist(batch.finish())?;
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
        self.check_writable()?;
        let k = self.encode_new_key(&key)?;
        let value = f(self.map.get(&key));
        let v = self.encode_value(&value)?;
        self.persist(Batch {
            puts: vec![(k, v)],
            ..Batch::default()
        })?;
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
        mut f: impl FnMut(Option<&V>, V) -> V,
    ) -> Result<()> {
        self.check_writable()?;
        // Key -> (the value so far, the bytes of the key as it first came).
        let mut folded: HashMap<K, (V, Vec<u8>)> = HashMap::new();
        for (key, new) in pairs {
            let bytes = self.encode_new_key(&key)?;
            match folded.get_mut(&key) {
                Some((value, seen)) => {
                    self.same_bytes(seen, &bytes)?;
                    let next = f(Some(&*value), new);
                    *value = next;
                }
                None => {
                    let value = f(self.map.get(&key), new);
                    folded.insert(key, (value, bytes));
                }
            }
        }
        let mut batch = Batch::default();
        batch.puts.reserve(folded.len());
        let mut entries = Vec::with_capacity(folded.len());
        for (key, (value, bytes)) in folded {
            batch.puts.push((bytes, self.encode_value(&value)?));
            entries.push((key, value));
        }
        self.persist(batch)?;
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
        self.check_writable()?;
        let Some((held, value)) = self.map.get_key_value(key) else {
            return Ok(false);
        };
        let mut value = value.clone();
        f(&mut value);
        let k = self.encode_key(held)?;
        let v = self.encode_value(&value)?;
        self.persist(Batch {
            puts: vec![(k, v)],
            ..Batch::default()
        })?;
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
        self.check_writable()?;
        let pairs: Vec<(K, V)> = pairs.into_iter().collect();
        let batch = Batch {
            puts: self.encode_pairs(&pairs, true)?,
            ..Batch::default()
        };
        self.persist(batch)?;
        self.map.reserve(pairs.len());
        self.map.extend(pairs);
        Ok(())
    }

    /// Runs `f` with a [`Transaction`] that stages inserts and removes, then commits
    /// them as one database transaction: all or nothing, in the database and in memory
    /// alike. An `Err` from `f` (such as [`Error::abort`]) or a panic in `f` leaves
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
        self.check_writable()?;
        // A panic in `f` drops `tx`, which puts back what it took out of memory.
        let mut tx = Transaction::new(self);
        let result = f(&mut tx)?;
        tx.commit()?;
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
        self.flush()?;
        let (map, version) = self.load_fresh()?;
        self.take_fresh(map, version);
        Ok(())
    }

    /// Takes a map just read from the table as its content, at `version` for a coherent
    /// map: nothing is in doubt any more.
    fn take_fresh(&mut self, map: HashMap<K, V, S>, version: Option<u64>) {
        self.map = map;
        self.poisoned = false;
        if let (Some(c), Some(v)) = (&mut self.coherent, version) {
            c.seen = v;
        }
    }

    /// The whole table read into a new map (reconnecting first when the store knows
    /// how), and for a coherent map the version it was read at.
    fn load_fresh(&mut self) -> Result<(HashMap<K, V, S>, Option<u64>)>
    where
        S: Clone,
    {
        let mut store = lock(&self.store);
        store.reconnect()?;
        // Coherence: the version first, so that a change made during the load is
        // applied again by the next refresh rather than missed.
        let version = match &self.coherent {
            Some(_) => Some(store.version()?),
            None => None,
        };
        let mut map = HashMap::with_hasher(self.map.hasher().clone());
        load(
            &mut **store,
            &self.table,
            &*self.keys,
            &*self.values,
            &mut map,
        )?;
        Ok((map, version))
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
        let Some(coherent) = self.coherent else {
            return Err(Error::NotCoherent {
                table: self.table.name.clone(),
                reason: "the map was opened without `coherent()`; open it with \
                         `DbHashMap::builder(…).coherent()` to see other writers' changes"
                    .into(),
            });
        };
        // Changes still queued would be overwritten by the table's older rows.
        self.flush()?;
        let mut changed: Vec<(K, Option<V>)> = Vec::new();
        let mut count = 0;
        let reached = {
            let mut store = lock(&self.store);
            store.reconnect()?;
            let (map, keys, values, table) = (&self.map, &*self.keys, &*self.values, &self.table);
            let mut current = Vec::new();
            let mut again = Vec::new();
            store.changes(coherent.seen, &mut |kb, vb| {
                let key = match (decode_key(keys, table, kb), vb) {
                    (Ok(key), _) => key,
                    // A row that came and went: a key that does not decode was never in
                    // memory, and is not in the table now.
                    (Err(_), None) => return Ok(()),
                    (Err(e), Some(_)) => return Err(e),
                };
                let value = match vb {
                    Some(vb) => Some(values.decode(vb).map_err(|e| Error::Decode {
                        what: "value",
                        table: table.name.clone(),
                        row: show_bytes(kb),
                        source: e,
                    })?),
                    None => None,
                };
                // Changed in memory: the value differs from what the map holds, as the
                // codec writes them (" 7" and "7" are one JSON value).
                let differs = match (map.get(&key), &value) {
                    (None, None) => false,
                    (Some(held), Some(value)) => {
                        current.clear();
                        again.clear();
                        let both = values
                            .encode(held, &mut current)
                            .and_then(|()| values.encode(value, &mut again));
                        both.map_or(true, |()| current != again)
                    }
                    _ => true,
                };
                if differs {
                    count += 1;
                    changed.push((key, value));
                }
                Ok(())
            })?
        };
        let Some(reached) = reached else {
            tracing::info!(table = %self.table.name, seen = coherent.seen,
                "the map fell behind the change log's compaction; reloading in full");
            let (fresh, version) = self.load_fresh()?;
            let count = self.differences(&fresh);
            self.take_fresh(fresh, version);
            return Ok(count);
        };
        for (key, value) in changed {
            match value {
                Some(value) => {
                    self.map.insert(key, value);
                }
                None => {
                    self.map.remove(&key);
                }
            }
        }
        if let Some(c) = &mut self.coherent {
            c.seen = reached;
        }
        // Every key changed since the last look is as the table holds it, the one whose
        // write had an unknown outcome included.
        self.poisoned = false;
        Ok(count)
    }

    /// How many keys differ between the map and `other`, by their encodings.
    fn differences(&self, other: &HashMap<K, V, S>) -> usize {
        let bytes = |v: &V| {
            let mut out = Vec::new();
            self.values.encode(v, &mut out).map(|()| out).ok()
        };
        let changed = other
            .iter()
            .filter(|(k, v)| self.map.get(*k).is_none_or(|held| bytes(held) != bytes(v)))
            .count();
        changed + self.map.keys().filter(|k| !other.contains_key(*k)).count()
    }

    /// Coherence: installs the change log (if absent) and reads the version, before the
    /// load that follows.
    pub(crate) fn start_coherence(&mut self, keep: u64) -> Result<()> {
        let mut store = lock(&self.store);
        store.enable_changes().map_err(|e| match e {
            Error::NotCoherent { reason, .. } => Error::NotCoherent {
                table: self.table.name.clone(),
                reason,
            },
            other => other,
        })?;
        let seen = store.version()?;
        drop(store);
        self.coherent = Some(Coherent {
            seen,
            ..Coherent::new(keep)
        });
        Ok(())
    }

    /// Fills the (empty) map from the table: the second half of opening.
    pub(crate) fn load_empty(&mut self) -> Result<()> {
        let mut store = lock(&self.store);
        load(
            &mut **store,
            &self.table,
            &*self.keys,
            &*self.values,
            &mut self.map,
        )
    }

    /// Replaces the table's content with `src` in one transaction, then the map's.
    pub(crate) fn replace_all(&mut self, src: Vec<(K, V)>) -> Result<()> {
        let batch = Batch {
            clear: true,
            puts: self.encode_pairs(&src, false)?,
            ..Batch::default()
        };
        self.persist(batch).map_err(|e| match e {
            Error::Database {
                table,
                backend,
                source,
                ..
            } => Error::Database {
                action: Action::Replace,
                table,
                backend,
                source,
            },
            other => other,
        })?;
        self.map.clear();
        self.map.extend(src);
        Ok(())
    }
}

/// Reads every row of the table into `map`, checking that each decodes, that the
/// key codec gives each key back the bytes it was stored as, and that no two rows hold
/// equal keys.
fn load<K, V, S>(
    store: &mut dyn Store,
    table: &TableSpec,
    keys: &dyn Codec<K>,
    values: &dyn Codec<V>,
    map: &mut HashMap<K, V, S>,
) -> Result<()>
where
    K: Eq + Hash,
    S: BuildHasher,
{
    let decode_err = |what, row: &[u8], source| Error::Decode {
        what,
        table: table.name.clone(),
        row: show_bytes(row),
        source,
    };
    store.load(&mut |kb: &[u8], vb: &[u8]| {
        let k = decode_key(keys, table, kb)?;
        let v = values.decode(vb).map_err(|e| decode_err("value", kb, e))?;
        match map.entry(k) {
            hash_map::Entry::Occupied(held) => {
                let mut first = Vec::new();
                keys.encode_key(held.key(), &mut first)
                    .map_err(|e| decode_err("key", kb, e))?;
                Err(Error::DuplicateKey {
                    table: table.name.clone(),
                    first: show_bytes(&first),
                    second: show_bytes(kb),
                })
            }
            hash_map::Entry::Vacant(slot) => {
                slot.insert(v);
                Ok(())
            }
        }
    })
}

/// Decodes a stored key, checking that the codec gives it back the bytes it was stored
/// as: otherwise the map's writes would not reach that row.
fn decode_key<K>(keys: &dyn Codec<K>, table: &TableSpec, kb: &[u8]) -> Result<K> {
    let decode_err = |source| Error::Decode {
        what: "key",
        table: table.name.clone(),
        row: show_bytes(kb),
        source,
    };
    let k = keys.decode(kb).map_err(decode_err)?;
    let mut reencoded = Vec::with_capacity(kb.len());
    keys.encode_key(&k, &mut reencoded).map_err(decode_err)?;
    if reencoded != kb {
        return Err(Error::NonCanonicalKey {
            table: table.name.clone(),
            row: show_bytes(kb),
            other: show_bytes(&reencoded),
        });
    }
    Ok(k)
}

/// An insert staged by a [`Transaction`]: the value and the encodings of key and value.
struct Put<V> {
    value: V,
    key: Vec<u8>,
    bytes: Vec<u8>,
}

/// The changes staged by [`DbHashMap::transaction`]: its reads (`get`, `len`, `iter`)
/// see them; nothing reaches the database until the closure returns `Ok`, and then all
/// of it does, in one database transaction, or none of it.
///
/// While it runs, the transaction holds the map exclusively and keeps the entries it
/// replaced or removed aside; if it does not commit (an `Err`, a panic, a failed
/// commit) they are put back, so the map is as it was.
pub struct Transaction<'m, K, V, S = RandomState> {
    map: &'m mut DbHashMap<K, V, S>,
    /// Staged inserts. Their keys are never in the map's memory as well: an entry the
    /// map held is moved to `taken` first.
    puts: HashMap<K, Put<V>>,
    /// The entries moved out of the map's memory: removed, replaced or cleared. The
    /// ones not staged again are deleted by the commit.
    taken: HashMap<K, V>,
    cleared: bool,
    committed: bool,
    /// Puts an entry back into the map's memory: `Drop` cannot ask for the bounds
    /// `HashMap::insert` needs, so `new`, which has them, supplies this.
    restore: fn(&mut HashMap<K, V, S>, K, V),
}

impl<K, V, S> fmt::Debug for Transaction<'_, K, V, S>
where
    K: fmt::Debug + Eq + Hash,
    V: fmt::Debug,
{
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let puts: Vec<(&K, &V)> = self.puts.iter().map(|(k, p)| (k, &p.value)).collect();
        let removed: Vec<&K> = self
            .taken
            .keys()
            .filter(|k| !self.puts.contains_key(*k))
            .collect();
        f.debug_struct("Transaction")
            .field("table", &self.map.table.name)
            .field("cleared", &self.cleared)
            .field("inserts", &puts)
            .field("removes", &removed)
            .finish()
    }
}

impl<'m, K, V, S> Transaction<'m, K, V, S>
where
    K: Eq + Hash,
    S: BuildHasher,
{
    fn new(map: &'m mut DbHashMap<K, V, S>) -> Self {
        Transaction {
            map,
            puts: HashMap::new(),
            taken: HashMap::new(),
            cleared: false,
            committed: false,
            restore: |map, key, value| {
                map.insert(key, value);
            },
        }
    }

    /// The value of `key` as the transaction sees it, staged changes included.
    pub fn get<Q>(&self, key: &Q) -> Option<&V>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        match self.puts.get(key) {
            Some(put) => Some(&put.value),
            None => self.map.map.get(key),
        }
    }

    /// Whether the transaction sees `key`.
    pub fn contains_key<Q>(&self, key: &Q) -> bool
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        self.get(key).is_some()
    }

    /// The number of entries the transaction sees.
    pub fn len(&self) -> usize {
        self.map.map.len() + self.puts.len()
    }

    /// Whether the transaction sees no entry.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The entries the transaction sees, in no particular order.
    pub fn iter(&self) -> impl Iterator<Item = (&K, &V)> + '_ {
        self.map
            .map
            .iter()
            .chain(self.puts.iter().map(|(k, put)| (k, &put.value)))
    }

    /// Stages an insert and returns the value the key had, as the map's
    /// [`insert`](DbHashMap::insert) does. Fails now if the key or value does not
    /// encode, or if the key is equal to one held or staged that encodes differently.
    ///
    /// A value the map held is given back as the value codec reads it back from its
    /// encoding (the map keeps its own until the commit); a value staged earlier in
    /// the transaction is given back as it is.
    pub fn insert(&mut self, key: K, value: V) -> Result<Option<V>> {
        let (k, v) = self.encode_put(&key, &value)?;
        let previous = match self.puts.remove(&key) {
            Some(put) => Some(put.value),
            None => self.take(&key)?,
        };
        self.puts.insert(
            key,
            Put {
                value,
                key: k,
                bytes: v,
            },
        );
        Ok(previous)
    }

    /// Stages the value `f` makes of the key's current value (`None` if the transaction
    /// does not see the key), and returns the value now staged.
    pub fn upsert(&mut self, key: K, f: impl FnOnce(Option<&V>) -> V) -> Result<&V> {
        let value = f(self.get(&key));
        let (k, v) = self.encode_put(&key, &value)?;
        if !self.puts.contains_key(&key) {
            if let Some((held, value)) = self.map.map.remove_entry(&key) {
                self.taken.insert(held, value);
            }
        }
        let put = Put {
            value,
            key: k,
            bytes: v,
        };
        Ok(match self.puts.entry(key) {
            hash_map::Entry::Occupied(mut staged) => {
                staged.insert(put);
                &staged.into_mut().value
            }
            hash_map::Entry::Vacant(slot) => &slot.insert(put).value,
        })
    }

    /// Stages the removal of `key` and returns the value it had, as the map's
    /// [`remove`](DbHashMap::remove) does (see [`insert`](Self::insert) for how a held
    /// value is given back). A key the transaction does not see is ignored.
    pub fn remove<Q>(&mut self, key: &Q) -> Result<Option<V>>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        match self.puts.remove(key) {
            Some(put) => Ok(Some(put.value)),
            None => self.take(key),
        }
    }

    /// Stages the removal of every entry.
    pub fn clear(&mut self) {
        self.cleared = true;
        self.puts.clear();
        self.taken.extend(self.map.map.drain());
    }

    /// Moves the entry of `key` out of the map's memory, if it holds one, and returns a
    /// copy of its value read back through the codec: the original stays with the
    /// transaction, to be put back if it does not commit.
    fn take<Q>(&mut self, key: &Q) -> Result<Option<V>>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        let Some((held, value)) = self.map.map.get_key_value(key) else {
            return Ok(None);
        };
        let mut bytes = Vec::new();
        let copy = self
            .map
            .values
            .encode(value, &mut bytes)
            .and_then(|()| self.map.values.decode(&bytes));
        let copy = copy.map_err(|source| Error::Decode {
            what: "value",
            table: self.map.table.name.clone(),
            row: self
                .map
                .encode_key(held)
                .map_or_else(|_| "(a key)".into(), |k| show_bytes(&k)),
            source,
        })?;
        if let Some((held, value)) = self.map.map.remove_entry(key) {
            self.taken.insert(held, value);
        }
        Ok(Some(copy))
    }

    /// Encodes a staged insert, refusing a key equal to one held or staged whose bytes
    /// differ: memory keeps one key object, the table must get the same bytes.
    fn encode_put(&self, key: &K, value: &V) -> Result<(Vec<u8>, Vec<u8>)> {
        let m = &*self.map;
        let k = m.encode_written_key(key)?;
        let held = m
            .map
            .get_key_value(key)
            .or_else(|| self.taken.get_key_value(key))
            .map(|(held, _)| held);
        if let Some(held) = held {
            m.same_bytes(&m.encode_key(held)?, &k)?;
        }
        if let Some(put) = self.puts.get(key) {
            m.same_bytes(&put.key, &k)?;
        }
        Ok((k, m.encode_value(value)?))
    }

    /// Writes what was staged as one database transaction, then applies it to memory.
    fn commit(mut self) -> Result<()> {
        let mut batch = Batch {
            clear: self.cleared,
            ..Batch::default()
        };
        if !self.cleared {
            for key in self.taken.keys().filter(|k| !self.puts.contains_key(*k)) {
                batch.deletes.push(self.map.encode_key(key)?);
            }
        }
        let mut entries = Vec::with_capacity(self.puts.len());
        for (key, put) in self.puts.drain() {
            batch.puts.push((put.key, put.bytes));
            entries.push((key, put.value));
        }
        // On failure, `Drop` puts the taken entries back.
        self.map.persist(batch)?;
        self.committed = true;
        self.taken.clear();
        self.map.map.extend(entries);
        Ok(())
    }
}

impl<K, V, S> Drop for Transaction<'_, K, V, S> {
    fn drop(&mut self) {
        if !self.committed {
            // Not committed: memory gets back what the transaction took out of it. The
            // keys were the map's own, so they go back where they were.
            for (key, value) in std::mem::take(&mut self.taken) {
                (self.restore)(&mut self.map.map, key, value);
            }
        }
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
