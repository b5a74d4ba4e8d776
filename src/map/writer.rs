//! The write path both maps share: encoding keys and values with their checks, the one
//! way into the store (`persist`), and the plans of each write: the batch it sends and
//! what it will change in memory once that batch is committed.
//!
//! A plan reads the map's memory but never changes it; `DbHashMap` applies it to its
//! own `HashMap`, `SharedDbHashMap` to the one behind its lock.

use std::borrow::Borrow;
use std::collections::hash_map::{self, HashMap};
use std::collections::HashSet;
use std::hash::{BuildHasher, Hash};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use crate::codec::Codec;
use crate::error::{show_bytes, Action, Error, Result};
use crate::store::{Batch, BatchBuilder, Puts, Store, TableSpec};
use crate::write_behind::{Behind, WriteBehind};

/// How many times a write that conflicted with another writer is tried again.
const CONFLICT_RETRIES: u32 = 8;

/// How many times a write that found its connection gone (nothing done) is tried again
/// on a new one, by a store that can reconnect.
const RECONNECT_RETRIES: u32 = 3;

/// Changes written between two looks at whether the change log needs compacting.
const COMPACT_EVERY: u64 = 1024;

/// The pause before try `tries` (from 1) of a conflicting write: about 1 ms, doubling,
/// with a jitter so that two writers that conflicted do not meet again.
fn conflict_pause(tries: u32) -> std::time::Duration {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    let base = 500u64 << tries.min(10);
    std::time::Duration::from_micros(base + u64::from(nanos) % base)
}

/// A coherent map's state: the table version it has seen, how many versions of changes
/// the log keeps, and writes since the log was last looked at for compaction.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Coherent {
    pub(crate) seen: u64,
    pub(crate) keep: u64,
    writes: u64,
}

/// A key another writer changed, as a refresh found it: its encoding, the key, and its
/// value now (`None`: deleted).
pub(crate) struct Changed<K, V> {
    pub(crate) bytes: Vec<u8>,
    pub(crate) key: K,
    pub(crate) value: Option<V>,
}

/// What a refresh read: the changed keys and the version reached, or that the map fell
/// behind the change log's compaction and must reload.
pub(crate) enum Refreshed<K, V> {
    Changes(Vec<Changed<K, V>>, u64),
    FellBehind,
}

/// What a write whose outcome is unknown touched: the keys to read back, or the whole
/// table (a clear, a streamed batch).
#[derive(Debug, Clone)]
pub(crate) enum Unsettled {
    Keys(Vec<Vec<u8>>),
    All,
}

impl Unsettled {
    fn of(batch: &Batch) -> Unsettled {
        if batch.clear {
            return Unsettled::All;
        }
        let keys = batch
            .deletes
            .iter()
            .cloned()
            .chain(batch.puts.iter().map(|(k, _)| k.clone()))
            .collect();
        Unsettled::Keys(keys)
    }

    fn and(self, other: Unsettled) -> Unsettled {
        match (self, other) {
            (Unsettled::Keys(mut a), Unsettled::Keys(b)) => {
                a.extend(b);
                Unsettled::Keys(a)
            }
            _ => Unsettled::All,
        }
    }
}

/// The table's side of the keys a write with an unknown outcome touched, read back:
/// each key with its value now (`None`: absent), or the whole table.
pub(crate) enum Settlement<K, V> {
    Keys(Vec<(K, Option<V>)>),
    All(Vec<(K, V)>),
}

impl<K: Eq + Hash, V> Settlement<K, V> {
    /// Puts memory equal to the table for what was read back.
    pub(crate) fn apply<S: BuildHasher>(self, map: &mut HashMap<K, V, S>) -> usize {
        match self {
            Settlement::Keys(keys) => {
                let n = keys.len();
                for (k, v) in keys {
                    match v {
                        Some(v) => {
                            map.insert(k, v);
                        }
                        None => {
                            map.remove(&k);
                        }
                    }
                }
                n
            }
            Settlement::All(rows) => {
                let n = rows.len();
                map.clear();
                map.extend(rows);
                n
            }
        }
    }
}

/// What encodes a map's keys and values: fixed once the map is open, so a shared map's
/// writers use it without taking the store; and the map's counters.
pub(crate) struct Encoder<K, V> {
    pub(crate) backend: &'static str,
    max_key_len: Option<usize>,
    max_value_len: Option<usize>,
    pub(crate) keys: Box<dyn Codec<K>>,
    pub(crate) values: Box<dyn Codec<V>>,
    pub(crate) table: TableSpec,
    /// A slice's prefix, as the user gave it (the table's spec has it as stored).
    pub(crate) prefix: Option<String>,
    /// A write's outcome is unknown and not settled yet: a shared map's
    /// read-modify-writes then take the path that settles it before they read.
    pub(crate) in_doubt: std::sync::atomic::AtomicBool,
    /// Writes tried again after a conflict with another writer, so far.
    pub(crate) conflicts_retried: AtomicU64,
    /// Database transactions tried, so far.
    pub(crate) commits: AtomicU64,
}

/// Everything of a map but its entries.
pub(crate) struct Writer<K, V> {
    pub(crate) enc: Arc<Encoder<K, V>>,
    // Shared with the write-behind thread (and a watcher) when there is one; otherwise
    // only writers lock it, so the lock is not contended.
    pub(crate) store: Arc<Mutex<Box<dyn Store>>>,
    pub(crate) behind: Option<Behind>,
    /// A write's outcome is unknown and the store cannot reconnect to settle it: writes
    /// are refused until `reload`.
    pub(crate) poisoned: bool,
    /// A write's outcome is unknown and the store can reconnect: the next call settles
    /// it by reading back what that write touched.
    pub(crate) unsettled: Option<Unsettled>,
    /// Coherence: the version of the table this map has seen, and its settings.
    pub(crate) coherent: Option<Coherent>,
}

impl<K, V> std::ops::Deref for Writer<K, V> {
    type Target = Encoder<K, V>;

    fn deref(&self) -> &Encoder<K, V> {
        &self.enc
    }
}

pub(crate) fn lock(store: &Mutex<Box<dyn Store>>) -> MutexGuard<'_, Box<dyn Store>> {
    // A panic in a store method leaves the store as it was; go on with it.
    store
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl<K, V> Writer<K, V> {
    pub(crate) fn new(
        store: Box<dyn Store>,
        keys: Box<dyn Codec<K>>,
        values: Box<dyn Codec<V>>,
        table: TableSpec,
        prefix: Option<String>,
    ) -> Self {
        Writer {
            enc: Arc::new(Encoder {
                prefix,
                in_doubt: std::sync::atomic::AtomicBool::new(false),
                backend: store.backend(),
                max_key_len: store.max_key_len(),
                max_value_len: store.max_value_len(),
                keys,
                values,
                table,
                conflicts_retried: AtomicU64::new(0),
                commits: AtomicU64::new(0),
            }),
            store: Arc::new(Mutex::new(store)),
            behind: None,
            poisoned: false,
            unsettled: None,
            coherent: None,
        }
    }

    /// Another writer of a map on a connection of its own (a shared map's lane): the
    /// map's encoder and counters, coherent like the map (it compacts the log in turn),
    /// nothing unsettled.
    pub(crate) fn lane(
        enc: &Arc<Encoder<K, V>>,
        coherent: Option<Coherent>,
        store: Box<dyn Store>,
    ) -> Self {
        Writer {
            enc: Arc::clone(enc),
            store: Arc::new(Mutex::new(store)),
            behind: None,
            poisoned: false,
            unsettled: None,
            coherent: coherent.map(|c| Coherent { writes: 0, ..c }),
        }
    }

    pub(crate) fn store(&self) -> MutexGuard<'_, Box<dyn Store>> {
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

    pub(crate) fn flush(&self) -> Result<()> {
        self.behind.as_ref().map_or(Ok(()), Behind::flush)
    }

    pub(crate) fn close(&mut self) -> Result<()> {
        self.behind.as_mut().map_or(Ok(()), Behind::close)
    }

    pub(crate) fn pending(&self) -> usize {
        self.behind.as_ref().map_or(0, Behind::pending)
    }

    fn count_commit(&self) {
        self.enc.commits.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn check_writable(&self) -> Result<()> {
        if self.poisoned {
            Err(Error::Poisoned {
                table: self.table.name.clone(),
            })
        } else {
            Ok(())
        }
    }

    /// The one way into the store: applies `batch` atomically, and marks the map
    /// poisoned when the outcome is unknown.
    pub(crate) fn persist(&mut self, batch: Batch) -> Result<()> {
        self.check_writable()?;
        if let Some(behind) = &self.behind {
            let changes = batch.len();
            behind.enqueue(batch)?;
            self.after_write(changes);
            return Ok(());
        }
        self.commit(std::slice::from_ref(&batch))
    }

    /// Applies the batches in order, as one transaction (see [`Store::apply_seq`]); for
    /// a store that [`applies_seq`](Store::applies_seq), and without write-behind.
    pub(crate) fn persist_seq(&mut self, batches: &[Batch]) -> Result<()> {
        self.check_writable()?;
        debug_assert!(self.behind.is_none(), "write-behind writes its own batches");
        self.commit(batches)
    }

    /// Commits `batches` (one, or a sequence), reconnecting and writing again when the
    /// connection was gone before the write did anything.
    fn commit(&mut self, batches: &[Batch]) -> Result<()> {
        let started = std::time::Instant::now();
        let changes: usize = batches.iter().map(Batch::len).sum();
        let mut result = self.apply_with_conflicts(batches);
        // The connection was gone before the write did anything (closed while idle, the
        // session ended by the server): a store that can reconnect does, and the same
        // batch goes again. Nothing is in doubt, so nothing is written twice.
        let mut reconnects = 0;
        // Whether an attempt's statements reached the server before its session ended.
        // The server may have ended it after committing (seen on PostgreSQL: "terminating
        // connection due to unexpected postmaster exit" after an autocommitted write it
        // had done, when a failover killed the primary), so such a write is done again
        // (the batch sets and deletes: done twice, it leaves what it left once); and if
        // it cannot be, its outcome is unknown, not "nothing done".
        let mut in_doubt = false;
        while reconnects < RECONNECT_RETRIES
            && result.as_ref().is_err_and(Error::is_disconnect)
            && self.store().can_reconnect()
        {
            reconnects += 1;
            in_doubt |= matches!(result, Err(Error::Database { .. }));
            tracing::info!(table = %self.table.name, error = %result.as_ref().unwrap_err(),
                "the connection was lost before the write; reconnecting and writing again");
            crate::metrics::reconnected(&self.table.name);
            if reconnects > 1 {
                std::thread::sleep(conflict_pause(reconnects));
            }
            // A store waits for its server while reconnecting: when that failed, the
            // server stayed away for as long as one connection may take.
            if let Err(e) = self.store().reconnect() {
                result = Err(e);
                break;
            }
            result = self.apply_with_conflicts(batches);
        }
        if in_doubt {
            if let Err(e) = result {
                result = Err(match e {
                    e @ Error::OutcomeUnknown { .. } => e,
                    e => Error::OutcomeUnknown {
                        table: self.table.name.clone(),
                        backend: self.store().backend(),
                        source: e.into(),
                    },
                });
            }
        }
        if let Err(Error::OutcomeUnknown { .. }) = &result {
            let touched = batches
                .iter()
                .map(Unsettled::of)
                .reduce(Unsettled::and)
                .unwrap_or(Unsettled::Keys(Vec::new()));
            self.outcome_unknown(touched);
        }
        crate::metrics::wrote(&self.table.name, changes, started.elapsed(), result.is_ok());
        if result.is_ok() {
            self.after_write(changes);
        }
        result
    }

    /// Applies `batch`; a transaction the server rolled back for a conflict with another
    /// writer (a deadlock, a serialization or certification failure) is tried again a
    /// few times, after a short, growing, jittered pause.
    fn apply_with_conflicts(&mut self, batches: &[Batch]) -> Result<()> {
        let apply = |store: &mut Box<dyn Store>| match batches {
            [batch] => store.apply(batch),
            _ => store.apply_seq(batches),
        };
        self.count_commit();
        let mut result = apply(&mut self.store());
        let mut tries = 0;
        while tries < CONFLICT_RETRIES && result.as_ref().is_err_and(Error::is_conflict) {
            tries += 1;
            std::thread::sleep(conflict_pause(tries));
            self.enc.conflicts_retried.fetch_add(1, Ordering::Relaxed);
            crate::metrics::conflict_retried(&self.table.name);
            self.count_commit();
            tracing::debug!(table = %self.table.name, tries, "write conflicted with another; retrying");
            result = apply(&mut self.store());
        }
        result
    }

    /// A write's outcome is unknown: a store that can reconnect settles it on the next
    /// call; one that cannot refuses writes until `reload`.
    pub(crate) fn outcome_unknown(&mut self, touched: Unsettled) {
        crate::metrics::outcome_unknown(&self.table.name);
        if self.store().can_reconnect() {
            tracing::warn!(table = %self.table.name,
                "write outcome unknown; the next call reads its keys back to settle it");
            self.unsettled = Some(match self.unsettled.take() {
                Some(earlier) => earlier.and(touched),
                None => touched,
            });
            self.enc.in_doubt.store(true, Ordering::SeqCst);
        } else {
            self.poisoned = true;
            tracing::error!(table = %self.table.name,
                "write outcome unknown on a connection the map was given; it refuses writes until reload()");
        }
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

    /// Coherence: installs the change log (if absent) and reads the version, before the
    /// load that follows.
    pub(crate) fn start_coherence(&mut self, keep: u64) -> Result<()> {
        let mut store = lock(&self.store);
        // Installing is idempotent: a step that a concurrent open on another Galera
        // node rolled back (1213) is tried again, as a conflicting write is.
        let mut enabled = store.enable_changes();
        let mut tries = 0;
        while tries < CONFLICT_RETRIES && enabled.as_ref().is_err_and(Error::is_conflict) {
            tries += 1;
            std::thread::sleep(conflict_pause(tries));
            enabled = store.enable_changes();
        }
        enabled.map_err(|e| match e {
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
            keep,
            writes: 0,
        });
        Ok(())
    }

    /// A map just read from the table is taken, at `version` for a coherent map:
    /// nothing is in doubt any more.
    pub(crate) fn took_fresh(&mut self, version: Option<u64>) {
        self.poisoned = false;
        self.unsettled = None;
        self.enc.in_doubt.store(false, Ordering::SeqCst);
        if let (Some(c), Some(v)) = (&mut self.coherent, version) {
            c.seen = v;
        }
    }
}

impl<K, V> Writer<K, V>
where
    K: Eq + Hash,
{
    /// Replaces the table's content with `src`, as the batch of opening with `src`.
    pub(crate) fn replace_all(&mut self, src: &[(K, V)]) -> Result<()> {
        let batch = Batch {
            clear: true,
            ..self.encode_pairs::<std::collections::hash_map::RandomState>(None, src)?
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
        })
    }

    /// `insert_many` on a store that streams: the pairs go to the store in chunks, from
    /// a thread of their own, while this one encodes the next chunk and puts the pairs
    /// in `map`. Nothing can see `map` meanwhile (the caller holds it mutably); if the
    /// store does not commit, or encoding fails, or a codec panics, the map is put back
    /// as it was before the call returns or unwinds.
    pub(crate) fn stream_insert<S: BuildHasher>(
        &mut self,
        map: &mut HashMap<K, V, S>,
        pairs: Vec<(K, V)>,
    ) -> Result<()> {
        let enc = Arc::clone(&self.enc);
        let store = Arc::clone(&self.store);
        let mut guard = lock(&store);
        let store: &mut dyn Store = &mut **guard;
        // Room for every pair: no key moves while the pairs go in, so a key's address
        // names it for the undo.
        map.reserve(pairs.len());
        let n = pairs.len();
        // What each pair changed: the key's address, and the value it replaced.
        let mut undo: Vec<(*const K, Option<V>)> = Vec::with_capacity(n);
        let (to_store, chunks) = std::sync::mpsc::sync_channel::<Option<Result<Puts>>>(2);
        let (spent, recycled) = std::sync::mpsc::channel::<Puts>();
        let (fed, written) = std::thread::scope(|s| {
            let writer = s.spawn(move || {
                store.apply_puts(&mut |back| {
                    // Its rows are dropped on the feeding side, which has time to spare.
                    if let Some(back) = back {
                        let _ = spent.send(back);
                    }
                    // The feeding side gone without a word: it panicked. Roll back.
                    chunks.recv().unwrap_or_else(|_| {
                        Some(Err(Error::Aborted(
                            "the caller of insert_many panicked".into(),
                        )))
                    })
                })
            });
            let feed = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                let mut chunk: Puts = Vec::with_capacity(STREAM_CHUNK);
                for (k, v) in pairs {
                    let kb = enc.encode_written_key(&k)?;
                    let vb = enc.encode_value(&v)?;
                    // Checked here, so that the store binds text without checking it.
                    enc.check_text(&kb, &vb)?;
                    match map.entry(k) {
                        hash_map::Entry::Occupied(mut held) => {
                            enc.same_bytes(&enc.encode_key(held.key())?, &kb)?;
                            let address: *const K = held.key();
                            undo.push((address, Some(held.insert(v))));
                        }
                        hash_map::Entry::Vacant(slot) => {
                            let placed = slot.insert_entry(v);
                            let address: *const K = placed.key();
                            undo.push((address, None));
                        }
                    }
                    chunk.push((kb, vb));
                    if chunk.len() == STREAM_CHUNK {
                        let mut next = recycled.try_recv().unwrap_or_default();
                        next.clear();
                        let full = std::mem::replace(&mut chunk, next);
                        // The store failed: its error is the call's.
                        if to_store.send(Some(Ok(full))).is_err() {
                            return Ok(());
                        }
                    }
                }
                if !chunk.is_empty() {
                    let _ = to_store.send(Some(Ok(chunk)));
                }
                Ok(())
            }));
            let end = match &feed {
                Ok(Ok(())) => None,
                _ => Some(Err(Error::Aborted("insert_many gave up".into()))),
            };
            let _ = to_store.send(end);
            drop(to_store);
            let written = writer
                .join()
                .unwrap_or_else(|p| std::panic::resume_unwind(p));
            (feed, written)
        });
        drop(guard);
        let result = match fed {
            Ok(Ok(())) => written,
            // The encoding error, not the store's word that it rolled back.
            Ok(Err(e)) => Err(e),
            Err(panic) => {
                undo_inserts(map, undo);
                std::panic::resume_unwind(panic);
            }
        };
        self.count_commit();
        match &result {
            Ok(()) => self.after_write(n),
            Err(e) => {
                if let Error::OutcomeUnknown { .. } = e {
                    self.outcome_unknown(Unsettled::All);
                }
                undo_inserts(map, undo);
            }
        }
        result
    }

    /// Fills `map` from the table.
    pub(crate) fn load_into<S: BuildHasher>(&mut self, map: &mut HashMap<K, V, S>) -> Result<()> {
        let mut store = lock(&self.store);
        load(&mut **store, &self.table, &*self.keys, &*self.values, map)
    }

    /// The whole table read into a new map (reconnecting first when the store knows
    /// how), and for a coherent map the version it was read at.
    pub(crate) fn load_fresh<S: BuildHasher>(
        &mut self,
        hasher: S,
    ) -> Result<(HashMap<K, V, S>, Option<u64>)> {
        let mut store = lock(&self.store);
        store.reconnect()?;
        // Coherence: the version first, so that a change made during the load is
        // applied again by the next refresh rather than missed.
        let version = match &self.coherent {
            Some(_) => Some(store.version()?),
            None => None,
        };
        let mut map = HashMap::with_hasher(hasher);
        load(
            &mut **store,
            &self.table,
            &*self.keys,
            &*self.values,
            &mut map,
        )?;
        Ok((map, version))
    }

    /// Coherence: reads every change others committed since the version this map has
    /// seen, keeping those that differ from what `map` holds. Changes nothing.
    ///
    /// A row that does not decode fails the refresh, unless `skipped` is given: then it
    /// is left out (its key keeps what memory holds) and said there, as the stored key
    /// and the reason, and the refresh goes on.
    pub(crate) fn read_changes<S: BuildHasher>(
        &mut self,
        map: &HashMap<K, V, S>,
        mut skipped: Option<&mut Vec<(String, String)>>,
    ) -> Result<Refreshed<K, V>> {
        let Some(coherent) = self.coherent else {
            return Err(self.not_coherent());
        };
        // Changes still queued would be overwritten by the table's older rows.
        self.flush()?;
        let mut changed = Vec::new();
        let mut store = lock(&self.store);
        store.reconnect()?;
        let (keys, values, table) = (&*self.keys, &*self.values, &self.table);
        let mut current = Vec::new();
        let mut again = Vec::new();
        let reached = store.changes(coherent.seen, &mut |kb, vb| {
            let decoded = match (decode_key(keys, table, kb), vb) {
                (Ok(key), Some(vb)) => {
                    values
                        .decode(vb)
                        .map(|v| (key, Some(v)))
                        .map_err(|e| Error::Decode {
                            what: "value",
                            table: table.name.clone(),
                            row: show_bytes(kb),
                            source: e,
                        })
                }
                (Ok(key), None) => Ok((key, None)),
                // A row that came and went: a key that does not decode was never in
                // memory, and is not in the table now.
                (Err(_), None) => return Ok(()),
                (Err(e), Some(_)) => Err(e),
            };
            let (key, value) = match (decoded, skipped.as_deref_mut()) {
                (Ok(decoded), _) => decoded,
                (Err(e), Some(skipped)) => {
                    skipped.push((show_bytes(kb), e.to_string()));
                    return Ok(());
                }
                (Err(e), None) => return Err(e),
            };
            // Changed in memory: the value differs from what the map holds, as the codec
            // writes them (" 7" and "7" are one JSON value).
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
                changed.push(Changed {
                    bytes: kb.to_vec(),
                    key,
                    value,
                });
            }
            Ok(())
        })?;
        Ok(match reached {
            Some(reached) => Refreshed::Changes(changed, reached),
            None => {
                tracing::info!(table = %self.table.name, seen = coherent.seen,
                    "the map fell behind the change log's compaction; reloading in full");
                Refreshed::FellBehind
            }
        })
    }

    /// Coherence: the changes a refresh read are in memory, at version `reached`; every
    /// key changed since the last look is as the table holds it, the one whose write
    /// had an unknown outcome included.
    pub(crate) fn refreshed_to(&mut self, reached: u64) {
        if let Some(c) = &mut self.coherent {
            c.seen = reached;
        }
        self.poisoned = false;
        self.unsettled = None;
        self.enc.in_doubt.store(false, Ordering::SeqCst);
    }

    /// Reads back what a write with an unknown outcome touched, reconnecting first:
    /// `None` when nothing is in doubt. Changes nothing; on error the write stays
    /// unsettled and the next call tries again.
    pub(crate) fn read_unsettled(&mut self) -> Result<Option<Settlement<K, V>>> {
        let mut tries = 0;
        loop {
            match self.read_unsettled_once() {
                Err(e) if e.is_disconnect() && tries < RECONNECT_RETRIES => {
                    tries += 1;
                    crate::metrics::reconnected(&self.table.name);
                }
                other => return other,
            }
        }
    }

    fn read_unsettled_once(&mut self) -> Result<Option<Settlement<K, V>>> {
        let Some(unsettled) = self.unsettled.clone() else {
            return Ok(None);
        };
        let mut store = lock(&self.store);
        store.reconnect()?;
        let (keys, values, table) = (&*self.enc.keys, &*self.enc.values, &self.enc.table);
        if let Unsettled::Keys(touched) = &unsettled {
            let mut read = Vec::with_capacity(touched.len());
            let mut whole = false;
            for kb in touched {
                let vb = match store.get(kb) {
                    Ok(vb) => vb,
                    Err(Error::Unsupported { .. }) => {
                        whole = true;
                        break;
                    }
                    Err(e) => return Err(e),
                };
                let key = decode_key(keys, table, kb)?;
                let value = match vb {
                    Some(vb) => Some(values.decode(&vb).map_err(|e| Error::Decode {
                        what: "value",
                        table: table.name.clone(),
                        row: show_bytes(kb),
                        source: e,
                    })?),
                    None => None,
                };
                read.push((key, value));
            }
            if !whole {
                return Ok(Some(Settlement::Keys(read)));
            }
        }
        let mut fresh: HashMap<K, V> = HashMap::new();
        load(&mut **store, table, keys, values, &mut fresh)?;
        Ok(Some(Settlement::All(fresh.into_iter().collect())))
    }

    /// A settlement read by [`read_unsettled`](Self::read_unsettled) is in memory:
    /// nothing is in doubt any more.
    pub(crate) fn settled(&mut self, keys: usize) {
        self.unsettled = None;
        self.enc.in_doubt.store(false, Ordering::SeqCst);
        crate::metrics::settled(&self.table.name);
        tracing::info!(table = %self.table.name, keys,
            "an unknown write outcome is settled: memory took what the table holds");
    }

    /// Settles a write with an unknown outcome, if there is one, then says whether the
    /// map takes writes: the start of every write of a `DbHashMap`.
    pub(crate) fn ready<S: BuildHasher>(&mut self, map: &mut HashMap<K, V, S>) -> Result<()> {
        if let Some(settlement) = self.read_unsettled()? {
            let n = settlement.apply(map);
            self.settled(n);
        }
        self.check_writable()
    }
}

impl<K, V> Encoder<K, V> {
    pub(crate) fn not_coherent(&self) -> Error {
        Error::NotCoherent {
            table: self.table.name.clone(),
            reason: "the map was opened without `coherent()`; open it with \
                     `DbHashMap::builder(…).coherent()` to see other writers' changes"
                .into(),
        }
    }

    pub(crate) fn encode_key(&self, key: &K) -> Result<Vec<u8>> {
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
                    backend: self.backend,
                    len: out.len(),
                    max,
                });
            }
        }
        Ok(out)
    }

    pub(crate) fn encode_value(&self, value: &V) -> Result<Vec<u8>> {
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

    /// A copy of a value the map holds, read back from its encoding: what a transaction
    /// gives back without `V: Clone`.
    pub(crate) fn copy_value(&self, key: &K, value: &V) -> Result<V> {
        let mut bytes = Vec::new();
        let copy = self
            .values
            .encode(value, &mut bytes)
            .and_then(|()| self.values.decode(&bytes));
        copy.map_err(|source| Error::Decode {
            what: "value",
            table: self.table.name.clone(),
            row: self
                .encode_key(key)
                .map_or_else(|_| "(a key)".into(), |k| show_bytes(&k)),
            source,
        })
    }

    /// A copy of a key the map holds, with its encoding. Every held key reads back as
    /// itself: loaded keys came from their bytes, written keys were checked to.
    pub(crate) fn copy_key(&self, key: &K) -> Result<(K, Vec<u8>)> {
        let bytes = self.encode_key(key)?;
        let copy = self.keys.decode(&bytes).map_err(|source| Error::Decode {
            what: "key",
            table: self.table.name.clone(),
            row: show_bytes(&bytes),
            source,
        })?;
        Ok((copy, bytes))
    }

    /// Refuses a key or value for a text column that is not UTF-8 (a codec's bug).
    pub(crate) fn check_text(&self, key: &[u8], value: &[u8]) -> Result<()> {
        let check = |what, format, bytes: &[u8]| match (format, std::str::from_utf8(bytes)) {
            (crate::codec::Format::Text, Err(e)) => Err(Error::Encode {
                what,
                table: self.table.name.clone(),
                source: format!("the codec wrote bytes that are not UTF-8 for a text column: {e}")
                    .into(),
            }),
            _ => Ok(()),
        };
        check("key", self.table.key_format, key)?;
        check("value", self.table.value_format, value)
    }

    /// Refuses two encodings of equal keys that differ.
    pub(crate) fn same_bytes(&self, first: &[u8], second: &[u8]) -> Result<()> {
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
}

impl<K, V> Encoder<K, V>
where
    K: Eq + Hash,
{
    /// Encodes a key about to be written, and checks that its bytes read back as that
    /// key: a codec that writes two unequal keys alike (`None` and `Some(())` are both
    /// JSON `null`) would make them one row while memory holds two.
    pub(crate) fn encode_written_key(&self, key: &K) -> Result<Vec<u8>> {
        let bytes = self.encode_key(key)?;
        if !self.table.holds_key(&bytes) {
            return Err(Error::OutsideSlice {
                table: self.table.name.clone(),
                prefix: self.prefix.clone().unwrap_or_default(),
                key: show_bytes(&bytes),
            });
        }
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
    pub(crate) fn encode_new_key<S: BuildHasher>(
        &self,
        map: &HashMap<K, V, S>,
        key: &K,
    ) -> Result<Vec<u8>> {
        let bytes = self.encode_written_key(key)?;
        if let Some((held, _)) = map.get_key_value(key) {
            self.same_bytes(&self.encode_key(held)?, &bytes)?;
        }
        Ok(bytes)
    }

    /// Encodes `pairs` as upserts, the last pair of each key winning. Equal keys must
    /// encode to the same bytes, within `pairs` and (when `held` is given) against the
    /// keys the map holds: otherwise memory would keep one key while the table got
    /// another.
    pub(crate) fn encode_pairs<S: BuildHasher>(
        &self,
        held: Option<&HashMap<K, V, S>>,
        pairs: &[(K, V)],
    ) -> Result<Batch> {
        let mut index: HashMap<&K, usize> = HashMap::with_capacity(pairs.len());
        let mut puts: Vec<(Vec<u8>, Vec<u8>)> = Vec::with_capacity(pairs.len());
        for (k, v) in pairs {
            let key = match held {
                Some(map) => self.encode_new_key(map, k)?,
                None => self.encode_written_key(k)?,
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
        Ok(Batch {
            puts,
            ..Batch::default()
        })
    }

    /// The batch of `insert(key, value)`.
    pub(crate) fn plan_insert<S: BuildHasher>(
        &self,
        map: &HashMap<K, V, S>,
        key: &K,
        value: &V,
    ) -> Result<Batch> {
        let k = self.encode_new_key(map, key)?;
        let v = self.encode_value(value)?;
        Ok(put(k, v))
    }

    /// The batch of `remove(key)`, with the held key; `None` if the key is absent.
    pub(crate) fn plan_remove<'m, Q, S>(
        &self,
        map: &'m HashMap<K, V, S>,
        key: &Q,
    ) -> Result<Option<(Batch, &'m K)>>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
        S: BuildHasher,
    {
        let Some((held, _)) = map.get_key_value(key) else {
            return Ok(None);
        };
        let batch = Batch {
            deletes: vec![self.encode_key(held)?],
            ..Batch::default()
        };
        Ok(Some((batch, held)))
    }

    /// The batch of `retain(f)` and the keys it removes, by address: nothing changes the
    /// map between the plan and its application, so the addresses name the keys
    /// without calling `f` a second time.
    pub(crate) fn plan_retain<S: BuildHasher>(
        &self,
        map: &HashMap<K, V, S>,
        mut f: impl FnMut(&K, &V) -> bool,
    ) -> Result<(Batch, HashSet<*const K>)> {
        let mut doomed: HashSet<*const K> = HashSet::new();
        let mut batch = Batch::default();
        for (k, v) in map {
            if !f(k, v) {
                batch.deletes.push(self.encode_key(k)?);
                doomed.insert(k);
            }
        }
        Ok((batch, doomed))
    }

    /// The batch of `remove_many(keys)` and the keys it removes (each once).
    pub(crate) fn plan_remove_many<'q, Q, S>(
        &self,
        map: &HashMap<K, V, S>,
        keys: impl IntoIterator<Item = &'q Q>,
    ) -> Result<(Batch, Vec<&'q Q>)>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized + 'q,
        S: BuildHasher,
    {
        let mut held: Vec<&'q Q> = Vec::new();
        let mut batch = BatchBuilder::default();
        for q in keys {
            if let Some((k, _)) = map.get_key_value(q) {
                // A key given twice is deleted once.
                let bytes = self.encode_key(k)?;
                if !batch.contains(&bytes) {
                    batch.delete(bytes);
                    held.push(q);
                }
            }
        }
        Ok((batch.finish(), held))
    }

    /// The batch of `upsert(key, f)` and the value it stores.
    pub(crate) fn plan_upsert<S: BuildHasher>(
        &self,
        map: &HashMap<K, V, S>,
        key: &K,
        f: impl FnOnce(Option<&V>) -> V,
    ) -> Result<(Batch, V)> {
        let k = self.encode_new_key(map, key)?;
        let value = f(map.get(key));
        let v = self.encode_value(&value)?;
        Ok((put(k, v), value))
    }

    /// The batch of `upsert_many(pairs, f)` and the entries it stores.
    pub(crate) fn plan_upsert_many<S: BuildHasher>(
        &self,
        map: &HashMap<K, V, S>,
        pairs: impl IntoIterator<Item = (K, V)>,
        mut f: impl FnMut(Option<&V>, V) -> V,
    ) -> Result<(Batch, Vec<(K, V)>)> {
        // Key -> (the value so far, the bytes of the key as it first came).
        let mut folded: HashMap<K, (V, Vec<u8>)> = HashMap::new();
        for (key, new) in pairs {
            let bytes = self.encode_new_key(map, &key)?;
            match folded.get_mut(&key) {
                Some((value, seen)) => {
                    self.same_bytes(seen, &bytes)?;
                    let next = f(Some(&*value), new);
                    *value = next;
                }
                None => {
                    let value = f(map.get(&key), new);
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
        Ok((batch, entries))
    }

    /// The batch of `update(key, f)` and the new value; `None` if the key is absent.
    pub(crate) fn plan_update<Q, S>(
        &self,
        map: &HashMap<K, V, S>,
        key: &Q,
        f: impl FnOnce(&mut V),
    ) -> Result<Option<(Batch, V)>>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
        V: Clone,
        S: BuildHasher,
    {
        let Some((held, value)) = map.get_key_value(key) else {
            return Ok(None);
        };
        let mut value = value.clone();
        f(&mut value);
        let k = self.encode_key(held)?;
        let v = self.encode_value(&value)?;
        Ok(Some((put(k, v), value)))
    }

    /// The encodings of the keys whose entries differ between `map` and `fresh`.
    pub(crate) fn differences<S: BuildHasher>(
        &self,
        map: &HashMap<K, V, S>,
        fresh: &HashMap<K, V, S>,
    ) -> Vec<Vec<u8>> {
        let bytes = |v: &V| {
            let mut out = Vec::new();
            self.values.encode(v, &mut out).map(|()| out).ok()
        };
        let changed = fresh
            .iter()
            .filter(|(k, v)| map.get(*k).is_none_or(|held| bytes(held) != bytes(v)))
            .map(|(k, _)| k);
        let gone = map.keys().filter(|k| !fresh.contains_key(*k));
        changed
            .chain(gone)
            .map(|k| self.encode_key(k).unwrap_or_default())
            .collect()
    }
}

/// Rows a chunk of a streamed `insert_many`: as many as the SQLite store writes in one
/// statement.
const STREAM_CHUNK: usize = 256;

/// Puts back what a streamed `insert_many` changed in `map`: each key to the value it
/// had before the call, or away if it had none. `undo` lists, in call order, each
/// pair's key (by address: the map was not resized meanwhile) and the value it
/// replaced; the first entry of a key says how it was.
fn undo_inserts<K, V, S>(map: &mut HashMap<K, V, S>, undo: Vec<(*const K, Option<V>)>) {
    let mut before: HashMap<*const K, Option<V>> = HashMap::with_capacity(undo.len());
    for (address, old) in undo.into_iter().rev() {
        before.insert(address, old);
    }
    map.retain(|k, v| match before.remove(&(k as *const K)) {
        Some(Some(old)) => {
            *v = old;
            true
        }
        Some(None) => false,
        None => true,
    });
}

/// Applies the changes a refresh read to memory.
pub(crate) fn apply_changes<K, V, S>(map: &mut HashMap<K, V, S>, changed: Vec<Changed<K, V>>)
where
    K: Eq + Hash,
    S: BuildHasher,
{
    for Changed { key, value, .. } in changed {
        match value {
            Some(value) => {
                map.insert(key, value);
            }
            None => {
                map.remove(&key);
            }
        }
    }
}

/// A batch of one upsert.
fn put(key: Vec<u8>, value: Vec<u8>) -> Batch {
    Batch {
        puts: vec![(key, value)],
        ..Batch::default()
    }
}

/// Rows read from the store, handed from the reading thread to the decoding one: the
/// bytes of every key and value one after the other, and where each ends.
#[derive(Default)]
struct Rows {
    data: Vec<u8>,
    ends: Vec<(usize, usize)>,
}

impl Rows {
    /// Rows, or bytes, in one hand-over: enough to make the hand-over cheap, little
    /// enough to keep the memory in flight small.
    const ROWS: usize = 4096;
    const BYTES: usize = 1 << 20;

    fn push(&mut self, key: &[u8], value: &[u8]) {
        self.data.extend_from_slice(key);
        let k = self.data.len();
        self.data.extend_from_slice(value);
        self.ends.push((k, self.data.len()));
    }

    fn full(&self) -> bool {
        self.ends.len() >= Self::ROWS || self.data.len() >= Self::BYTES
    }

    fn iter(&self) -> impl Iterator<Item = (&[u8], &[u8])> {
        let mut start = 0;
        self.ends.iter().map(move |&(k, v)| {
            let row = (&self.data[start..k], &self.data[k..v]);
            start = v;
            row
        })
    }
}

/// Reads every row of the table into `map`, checking that each decodes, that the
/// key codec gives each key back the bytes it was stored as, and that no two rows hold
/// equal keys.
///
/// Two threads share the work: one steps through the rows and copies their bytes, the
/// other (this one, which holds the map) decodes them and fills the map, a few
/// thousand rows behind.
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
    if let Some(rows) = store.rows_hint() {
        map.reserve(rows);
    }
    let (full, filled) = std::sync::mpsc::sync_channel::<Rows>(2);
    let (spent, empties) = std::sync::mpsc::channel::<Rows>();
    std::thread::scope(|s| {
        let reader = s.spawn(move || {
            let mut rows = Rows::default();
            let result = store.load(&mut |kb: &[u8], vb: &[u8]| {
                // The check that the key's bytes are the codec's own is done here, to
                // share the work: the decoding side only decodes.
                decode_key(keys, table, kb)?;
                rows.push(kb, vb);
                if rows.full() {
                    let next = empties.try_recv().unwrap_or_default();
                    let done = std::mem::replace(&mut rows, next);
                    // The decoding side stopped: it has an error of its own to report.
                    full.send(done)
                        .map_err(|_| Error::Aborted("the load stopped".into()))?;
                }
                Ok(())
            });
            if result.is_ok() && !rows.ends.is_empty() {
                let _ = full.send(rows);
            }
            result
        });
        let decoded = (|| {
            for mut rows in filled.iter() {
                for (kb, vb) in rows.iter() {
                    insert_row(keys, values, table, map, kb, vb)?;
                }
                rows.data.clear();
                rows.ends.clear();
                let _ = spent.send(rows);
            }
            Ok(())
        })();
        // On an error here, dropping the receiver stops the reading thread.
        drop(filled);
        let read = reader
            .join()
            .unwrap_or_else(|p| std::panic::resume_unwind(p));
        decoded.and(read)
    })
}

/// Decodes one row into `map`.
fn insert_row<K, V, S>(
    keys: &dyn Codec<K>,
    values: &dyn Codec<V>,
    table: &TableSpec,
    map: &mut HashMap<K, V, S>,
    kb: &[u8],
    vb: &[u8],
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
    // The reading side checked the key's bytes.
    let k = keys.decode(kb).map_err(|e| decode_err("key", kb, e))?;
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
}

/// Decodes a stored key, checking that the codec gives it back the bytes it was stored
/// as: otherwise the map's writes would not reach that row.
pub(crate) fn decode_key<K>(keys: &dyn Codec<K>, table: &TableSpec, kb: &[u8]) -> Result<K> {
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
