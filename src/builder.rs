//! `Builder`: the table, codecs, hasher and initial content of a map.

use std::collections::hash_map::RandomState;
use std::collections::HashMap;
use std::hash::{BuildHasher, Hash};

use crate::codec::{Codec, Json};
use crate::error::{Error, Result};
use crate::map::{DbHashMap, LaneSource, SharedDbHashMap, WatchConfig};
use crate::store::{Store, TableSpec};
use crate::write_behind::WriteBehind;

/// How many versions of changes a coherent table's log keeps by default.
const DEFAULT_CHANGE_WINDOW: u64 = 100_000;

/// How many connections a shared map on a server writes on by default.
const DEFAULT_CONNECTIONS: usize = 1;

/// The table name the Racket original uses, and this crate's default.
pub const DEFAULT_TABLE: &str = "hashtable";

/// Options for opening a [`DbHashMap`]: made by [`DbHashMap::builder`] or
/// [`DbHashMap::builder_url`], finished by [`open`](Builder::open).
///
/// `KC` and `VC` are the key and value codecs, [`Json`] unless set.
///
/// ```
/// use std::collections::HashMap;
/// use write_thru_hash::{DbHashMap, Text};
///
/// let conn = rusqlite::Connection::open_in_memory()?;
/// let h: DbHashMap<String, String> = DbHashMap::builder(conn)
///     .table("hopefully it is quoted properly")
///     .codec(Text)
///     .src(HashMap::from([("a".to_string(), "b".to_string())]))
///     .open()?;
/// assert_eq!(h["a"], "b");
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[must_use = "a builder does nothing until `open` is called"]
pub struct Builder<K, V, S = RandomState, KC = Json, VC = Json> {
    store: Source,
    write_behind: Option<WriteBehind>,
    /// Coherence, with how many versions of changes the log keeps.
    coherent: Option<u64>,
    /// Refreshing by itself in the background (a shared map).
    watch: Option<WatchConfig>,
    /// A shared map on a server: how many connections its writes may use.
    connections: usize,
    table: String,
    /// A slice: the keys that start with it.
    prefix: Option<String>,
    src: Option<Vec<(K, V)>>,
    keys: KC,
    values: VC,
    hasher: S,
}

impl<K, V, S, KC, VC> std::fmt::Debug for Builder<K, V, S, KC, VC> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let store = match &self.store {
            Source::Store(store) => format!("a {} connection", store.backend()),
            Source::Url(url) => crate::error::redact(url),
        };
        f.debug_struct("Builder")
            .field("store", &store)
            .field("table", &self.table)
            .field("prefix", &self.prefix)
            .field("key_codec", &std::any::type_name::<KC>())
            .field("value_codec", &std::any::type_name::<VC>())
            .field(
                "src",
                &self
                    .src
                    .as_ref()
                    .map(|src| format!("{} entries", src.len())),
            )
            .field("write_behind", &self.write_behind)
            .field("coherent", &self.coherent)
            .field("watch", &self.watch)
            .finish_non_exhaustive()
    }
}

/// Where the store comes from: a connection given, or a URL to connect to in `open`.
pub(crate) enum Source {
    Store(Box<dyn Store>),
    Url(String),
}

impl<K, V> Builder<K, V> {
    pub(crate) fn new(store: Source) -> Self {
        Builder {
            store,
            write_behind: None,
            coherent: None,
            watch: None,
            connections: DEFAULT_CONNECTIONS,
            table: DEFAULT_TABLE.to_string(),
            prefix: None,
            src: None,
            keys: Json,
            values: Json,
            hasher: RandomState::new(),
        }
    }
}

impl<K, V, S, KC, VC> Builder<K, V, S, KC, VC> {
    /// The table's name (default `hashtable`). Any name the backend can hold works:
    /// it is always quoted. A name it cannot hold is refused by `open`.
    pub fn table(mut self, name: impl Into<String>) -> Self {
        self.table = name.into();
        self
    }

    /// A slice of the table: the map holds exactly the keys that start with `prefix`,
    /// for string keys with the [`Json`] or [`Text`](crate::Text) codec. Opening,
    /// [`reload`](DbHashMap::reload), [`refresh`](DbHashMap::refresh) and
    /// [`watch`](Self::watch) read only the slice, by a range of the key's index, so
    /// their cost grows with the slice, not the table; `len`, iteration, `clear`,
    /// `retain` and [`src`](Self::src) concern the slice only. A write of a key outside
    /// it is refused with [`Error::OutsideSlice`], nothing written (a `remove` of such a
    /// key finds nothing, as for any key the map does not hold). A codec whose
    /// encodings of the slice's keys do not share a beginning (Postcard writes a
    /// string's length first), a store that cannot read a slice, or a PostgreSQL key
    /// column that does not sort in byte order (collation `C`) is refused at open with
    /// [`Error::Slice`]. See the README, "Slices".
    ///
    /// ```
    /// use write_thru_hash::{DbHashMap, Error};
    /// let dir = tempfile::tempdir()?;
    /// let url = format!("sqlite:{}", dir.path().join("db.sqlite").display());
    /// let mut all: DbHashMap<String, i64> = DbHashMap::builder_url(&url).open()?;
    /// all.insert_many([("t1/a".into(), 1), ("t1/b".into(), 2), ("t2/a".into(), 3)])?;
    ///
    /// let mut t1: DbHashMap<String, i64> = DbHashMap::builder_url(&url).prefix("t1/").open()?;
    /// assert_eq!(t1.len(), 2);
    /// assert!(matches!(t1.insert("t2/b".into(), 4), Err(Error::OutsideSlice { .. })));
    /// t1.clear()?; // the slice's rows only
    /// let all: DbHashMap<String, i64> = DbHashMap::builder_url(&url).open()?;
    /// assert_eq!(all.len(), 1);
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn prefix(mut self, prefix: impl Into<String>) -> Self {
        self.prefix = Some(prefix.into());
        self
    }

    /// Replaces the table's content with `src` when opening, in one transaction: on
    /// failure the table keeps its old content.
    pub fn src(mut self, src: impl IntoIterator<Item = (K, V)>) -> Self {
        self.src = Some(src.into_iter().collect());
        self
    }

    /// Write-behind mode: a change reaches memory and returns at once, and a background
    /// thread writes coalesced batches (see [`WriteBehind`]). Opening, loading and
    /// `src` are still done before `open` returns.
    pub fn write_behind(mut self, config: WriteBehind) -> Self {
        self.write_behind = Some(config);
        self
    }

    /// Coherence: many maps on one table see each other's changes with
    /// [`refresh`](DbHashMap::refresh). The table gets a change log beside it, kept by
    /// triggers, so every writer is seen, plain SQL included; an existing table is
    /// upgraded in place, its rows kept, and still opens (and is written correctly)
    /// without `coherent()`. See the README, "Many maps, one table".
    pub fn coherent(mut self) -> Self {
        self.coherent.get_or_insert(DEFAULT_CHANGE_WINDOW);
        self
    }

    /// Coherence: how many versions of changes the log keeps (default 100,000; at
    /// least 1). Older changes are compacted away, so the log does not grow without
    /// bound; a map that has seen less than that reloads in full on its next refresh.
    /// Implies [`coherent`](Self::coherent).
    pub fn change_window(mut self, versions: u64) -> Self {
        self.coherent = Some(versions.max(1));
        self
    }

    /// For [`open_shared`](Self::open_shared): the map refreshes itself in the
    /// background when others change the table, and tells
    /// [`subscribe`](SharedDbHashMap::subscribe) receivers which keys changed. Implies
    /// [`coherent`](Self::coherent).
    ///
    /// How it learns of changes: PostgreSQL sends a notification (`LISTEN`/`NOTIFY`,
    /// on a connection of its own, when the map was opened from a URL); SQLite is
    /// polled with `PRAGMA data_version` on a connection of its own (a file opened by
    /// URL, path or connection); otherwise, and on a PostgreSQL hot standby (which
    /// cannot `LISTEN`), the table's version is polled every
    /// [`watch_every`](Self::watch_every) (5 ms unless set). Even with a signal the
    /// version is looked at every 250 ms. A lost connection is retried with a growing
    /// pause, logged with `tracing` and told to subscribers ([`Event`](crate::Event)); a
    /// row that does not decode is left out (its key keeps its value) and told too. The watcher stops when the last handle is
    /// dropped.
    ///
    /// ```
    /// # use write_thru_hash::{DbHashMap, Event, SharedDbHashMap};
    /// let dir = tempfile::tempdir()?;
    /// let url = format!("sqlite:{}", dir.path().join("db.sqlite").display());
    /// let seen: SharedDbHashMap<String, i64> = DbHashMap::builder_url(&url).watch().open_shared()?;
    /// let changes = seen.subscribe();
    /// let mut writer: DbHashMap<String, i64> = DbHashMap::builder_url(&url).coherent().open()?;
    /// writer.insert("x".into(), 1)?;
    /// let event = changes.recv_timeout(std::time::Duration::from_secs(5));
    /// assert_eq!(event, Some(Event::Changed(vec!["x".to_string()])));
    /// assert_eq!(seen.get("x"), Some(1));
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn watch(mut self) -> Self {
        self.watch.get_or_insert_with(WatchConfig::default);
        self.coherent()
    }

    /// For [`watch`](Self::watch) (which it implies): how often SQLite's
    /// `data_version`, or the table's version where nothing signals changes, is polled;
    /// at least 1 ms (a shorter time is taken as 1 ms).
    pub fn watch_every(mut self, every: std::time::Duration) -> Self {
        let every = every.max(WatchConfig::MIN_EVERY);
        self.watch = Some(WatchConfig { every });
        self.coherent()
    }

    /// For [`open_shared`](Self::open_shared) from a PostgreSQL or MySQL URL: how many
    /// connections the map's writes may use at once (default 1). Groups of changes on
    /// different keys then commit at once, each on its own connection, while the calls
    /// on one key, and the changes one thread queues, keep their order (a change waits
    /// for a group that holds its key or its thread's change, and nothing passes a
    /// `clear`); the extra connections are opened as they are first
    /// needed. A map on a connection given, on SQLite (one writer at a time) or with
    /// write-behind uses one. Whether more is faster depends on the server's cores and
    /// how far away it is: measure (see the README's W6 rows).
    ///
    /// ```no_run
    /// # use write_thru_hash::{DbHashMap, SharedDbHashMap};
    /// let h: SharedDbHashMap<String, u64> = DbHashMap::builder_url("postgres://app:secret@db/app")
    ///     .connections(4)
    ///     .open_shared()?;
    /// # Ok::<(), write_thru_hash::Error>(())
    /// ```
    pub fn connections(mut self, n: usize) -> Self {
        self.connections = n.max(1);
        self
    }

    /// One codec for keys and values.
    pub fn codec<C: Clone>(self, codec: C) -> Builder<K, V, S, C, C> {
        Builder {
            store: self.store,
            write_behind: self.write_behind,
            coherent: self.coherent,
            watch: self.watch,
            connections: self.connections,
            table: self.table,
            prefix: self.prefix,
            src: self.src,
            keys: codec.clone(),
            values: codec,
            hasher: self.hasher,
        }
    }

    /// The key codec. It must be canonical: equal keys, equal bytes.
    pub fn key_codec<C>(self, codec: C) -> Builder<K, V, S, C, VC> {
        Builder {
            store: self.store,
            write_behind: self.write_behind,
            coherent: self.coherent,
            watch: self.watch,
            connections: self.connections,
            table: self.table,
            prefix: self.prefix,
            src: self.src,
            keys: codec,
            values: self.values,
            hasher: self.hasher,
        }
    }

    /// The value codec.
    pub fn value_codec<C>(self, codec: C) -> Builder<K, V, S, KC, C> {
        Builder {
            store: self.store,
            write_behind: self.write_behind,
            coherent: self.coherent,
            watch: self.watch,
            connections: self.connections,
            table: self.table,
            prefix: self.prefix,
            src: self.src,
            keys: self.keys,
            values: codec,
            hasher: self.hasher,
        }
    }

    /// The hasher of the in-memory `HashMap`.
    pub fn hasher<S2>(self, hasher: S2) -> Builder<K, V, S2, KC, VC> {
        Builder {
            store: self.store,
            write_behind: self.write_behind,
            coherent: self.coherent,
            watch: self.watch,
            connections: self.connections,
            table: self.table,
            prefix: self.prefix,
            src: self.src,
            keys: self.keys,
            values: self.values,
            hasher,
        }
    }

    /// Connects (for a URL), creates the table if absent, then loads its rows, or
    /// replaces them with `src` if given.
    pub fn open(self) -> Result<DbHashMap<K, V, S>>
    where
        K: Eq + Hash,
        S: BuildHasher,
        KC: Codec<K> + 'static,
        VC: Codec<V> + 'static,
    {
        if self.watch.is_some() {
            return Err(Error::NotCoherent {
                table: self.table,
                reason: "`watch()` refreshes a map in the background, which needs a shared \
                         map: open it with `open_shared()`, or call `refresh()` on this one"
                    .into(),
            });
        }
        let mut table = TableSpec::new(self.table, self.keys.format(), self.values.format());
        if let Some(prefix) = &self.prefix {
            let Some(stored) = self.keys.string_prefix(prefix) else {
                return Err(Error::Slice {
                    table: table.name,
                    reason: format!(
                        "the key codec ({}) cannot say how the keys that start with {prefix:?} \
                         begin once stored, so they are not one range of the table; use the \
                         Json or Text codec for the keys",
                        std::any::type_name::<KC>()
                    ),
                });
            };
            table = table.with_key_prefix(stored);
        }
        let mut store = match self.store {
            Source::Store(store) => store,
            Source::Url(url) => crate::url::connect(&url)?,
        };
        if self.prefix.is_some() && !store.reads_slices() {
            return Err(Error::Slice {
                table: table.name,
                reason: format!(
                    "the {} store cannot read a slice of a table (it reads and clears \
                     whole tables only)",
                    store.backend()
                ),
            });
        }
        store.open(&table)?;
        let map = HashMap::with_hasher(self.hasher);
        let mut h = DbHashMap::from_parts(
            map,
            store,
            Box::new(self.keys),
            Box::new(self.values),
            table,
            self.prefix,
        );
        if let Some(keep) = self.coherent {
            h.start_coherence(keep)?;
        }
        match self.src {
            None => h.load_empty()?,
            Some(src) => h.replace_all(src)?,
        }
        if let Some(config) = self.write_behind {
            h.start_write_behind(config)?;
        }
        Ok(h)
    }

    /// Opens the map as [`open`](Self::open) does, as a [`SharedDbHashMap`] that
    /// threads and tasks share, with a watcher thread if [`watch`](Self::watch) was
    /// asked for.
    pub fn open_shared(mut self) -> Result<SharedDbHashMap<K, V, S>>
    where
        K: Eq + Hash + Send + Sync + 'static,
        V: Send + Sync + 'static,
        S: BuildHasher + Clone + Send + Sync + 'static,
        KC: Codec<K> + 'static,
        VC: Codec<V> + 'static,
    {
        let watch = self.watch.take();
        let lanes = match &self.store {
            Source::Url(url)
                if matches!(
                    crate::url::parse(url),
                    Ok(crate::url::Target::Postgres(_) | crate::url::Target::Mysql(_))
                ) =>
            {
                Some(LaneSource {
                    url: url.clone(),
                    coherent: None,
                    extra: self.connections - 1,
                })
            }
            _ => None,
        };
        let shared = SharedDbHashMap::from_map(self.open()?, lanes);
        if let Some(config) = watch {
            crate::map::start_watch(&shared, config)?;
        }
        Ok(shared)
    }
}
