//! `SharedDbHashMap`: one map that threads and tasks share. Readers take a read lock on
//! the entries for as long as a `HashMap` read lasts; writers plan their change under
//! that read lock, commit it without holding anything readers use, then apply it in
//! one short step under the write lock. Writes that arrive while a commit is in flight
//! queue up and are committed together by the next writer to get the store (group
//! commit).

use std::borrow::Borrow;
use std::cell::RefCell;
use std::collections::hash_map::RandomState;
use std::collections::{HashMap, HashSet};
use std::fmt;
use std::hash::{BuildHasher, Hash};
use std::ops::Deref;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use parking_lot::{RwLock, RwLockReadGuard, RwLockWriteGuard};

use super::events::{Event, Subscribers, Subscription};
use super::lanes::{LaneSource, Lanes};
use super::transaction::Transaction;
use super::writer::{apply_changes, Encoder, Refreshed, Writer};
use super::DbHashMap;
use crate::error::{Error, Result};
use crate::store::{Batch, BatchBuilder};
use crate::write_behind::Probe;

/// A [`DbHashMap`] that threads and async tasks share: a cheap [`Clone`] handle, `Send`
/// and `Sync` when `K`, `V` and `S` are. Made by
/// [`Builder::open_shared`](crate::Builder::open_shared).
///
/// **Reads never wait for the database.** [`read`](Self::read) gives a guard that
/// derefs to the `HashMap`, a consistent view while it is held; [`get`](Self::get),
/// [`contains_key`](Self::contains_key), [`len`](Self::len) are shortcuts. A write
/// commits first, holding nothing readers use, then applies its change in memory in
/// one short step: a reader sees all of a batch or transaction, or none of it.
///
/// **Writes take `&self`** and keep `DbHashMap`'s write-through rule: each call
/// returns once its change is committed, and memory changes only if it was. Calls
/// made by one thread take effect in the order it made them.
///
/// **Group commit.** `insert`, `remove`, `remove_entry`, `clear`, `insert_many`, and the
/// read-modify-writes `upsert`, `update`, `get_or_insert_with` and `upsert_many`, from
/// many threads, that arrive while a commit is in flight are committed together, as
/// one transaction, by the next of them to reach the database; a change the database
/// rejects fails its own call only (the group is then tried one change at a time). A
/// read-modify-write is computed when it is queued, on what its key will hold once the
/// changes queued before it are committed, so no other write of the map comes between
/// its read and its commit; its closure runs while other writers wait to queue (keep
/// it short), and if a change it was computed on is refused, it fails too, with
/// [`Error::Superseded`], nothing written. `retain`, `remove_many` and `transaction`
/// commit with the store to themselves.
///
/// ```
/// use write_thru_hash::{DbHashMap, SharedDbHashMap};
///
/// let dir = tempfile::tempdir()?;
/// let url = format!("sqlite:{}", dir.path().join("db.sqlite").display());
/// let h: SharedDbHashMap<u32, u64> = DbHashMap::builder_url(&url).open_shared()?;
/// std::thread::scope(|s| {
///     for t in 0..4 {
///         let h = h.clone();
///         s.spawn(move || {
///             for i in 0..25 {
///                 h.insert(t * 100 + i, u64::from(i)).unwrap();
///             }
///         });
///     }
/// });
/// assert_eq!(h.len(), 100);
/// assert_eq!(h.get(&301), Some(1));
/// assert_eq!(h.read().values().sum::<u64>(), 4 * (0..25).sum::<u64>());
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub struct SharedDbHashMap<K, V, S = RandomState> {
    inner: Arc<Inner<K, V, S>>,
}

/// What every handle of a shared map points to.
pub(crate) struct Inner<K, V, S> {
    map: RwLock<HashMap<K, V, S>>,
    enc: Arc<Encoder<K, V>>,
    /// Write-behind's flush and count, which need no writer.
    behind: Option<Probe>,
    /// The write path. Whoever holds it, or a lane, changes `map` (lanes only for keys
    /// no other group is committing).
    writer: Mutex<Writer<K, V>>,
    /// A map on a server: more connections, for groups on other keys meanwhile.
    lanes: Option<Lanes<K, V>>,
    /// Group commit: changes waiting for the next writer to reach the store.
    queue: Mutex<Queue<K, V>>,
    /// Taken to read by read-modify-writes while they are computed and queued, and to
    /// write by the calls that commit with the store to themselves: those change memory
    /// while nothing queued says so.
    gate: RwLock<()>,
    table: String,
    backend: &'static str,
    /// Write calls made.
    calls: AtomicU64,
    /// Who hears of each refresh's changes and of what the watcher meets.
    pub(crate) subscribers: Subscribers<K>,
}

/// Changes waiting to be committed, and whether a caller is committing a group now
/// (the leader: the others wait for it rather than for the store).
struct Queue<K, V> {
    pending: Vec<Request<K, V>>,
    /// Callers leading a group now, or told to: at most one per connection.
    leaders: usize,
    max_leaders: usize,
    /// The keys of the groups being committed (with lanes): a change of one waits for
    /// that group, so that the calls on one key keep their order.
    inflight: HashSet<Vec<u8>>,
    /// And the threads whose changes they hold: a thread's next change waits for them,
    /// so that the changes one thread (one task's `…_async` calls) queued keep their
    /// order across keys.
    inflight_threads: HashSet<std::thread::ThreadId>,
    /// A group being committed holds a clear: no other group goes meanwhile.
    clearing: bool,
    /// For read-modify-writes computed as they queue: per stored key, what it will hold
    /// once the changes queued or being committed are (memory, for keys not here).
    planned: HashMap<Vec<u8>, Planned<V>>,
    /// A clear queued or being committed (its number): keys not in `planned` will be
    /// absent.
    cleared: Option<u64>,
    /// A batch too big to list in `planned`, queued or being committed (its number):
    /// read-modify-writes take the exclusive path until it is done.
    opaque: Option<u64>,
    /// The number of the last request queued.
    last: u64,
    /// Requests the database refused, while requests computed on them may be queued.
    refused: HashSet<u64>,
    /// Callers seen around the last group commit: those it committed, and those that
    /// queued while it ran.
    callers: usize,
    /// How long the last group commit took.
    last_commit: Duration,
}

/// A change waiting in the group commit queue: its batch, what it changes in memory,
/// and where its caller waits for the outcome.
struct Request<K, V> {
    /// Its number, in queue order.
    seq: u64,
    /// The call that made it, for messages.
    call: &'static str,
    /// The requests whose values it was computed on: refused with them.
    depends: Vec<u64>,
    batch: Batch,
    change: Change<K, V>,
    done: Waiter<K, V>,
    /// Its caller was told to lead and has not begun yet.
    told: bool,
    /// The thread that queued it (a task's `…_async` calls: the runtime's thread that
    /// polled them first).
    thread: std::thread::ThreadId,
}

impl<K, V> Request<K, V> {
    /// The stored keys it writes.
    fn keys(&self) -> impl Iterator<Item = &Vec<u8>> + Clone {
        self.batch
            .deletes
            .iter()
            .chain(self.batch.puts.iter().map(|(k, _)| k))
    }

    /// Whether it was computed on a request the database refused: it is refused too,
    /// untried.
    fn computed_on(&self, refused: &HashSet<u64>) -> bool {
        self.depends.iter().any(|d| refused.contains(d))
    }
}

/// What a group being committed holds (with lanes): the keys and threads it alone
/// may have in flight, and whether it clears.
#[derive(Default)]
struct Committing {
    keys: Vec<Vec<u8>>,
    threads: Vec<std::thread::ThreadId>,
    clears: bool,
}

/// What a key will hold once the changes queued before now are committed.
struct Planned<V> {
    /// The request that writes it last.
    seq: u64,
    /// `Some(value)`, or `None` for absent; unknown when that request keeps its value
    /// to itself (a plain insert: `V` need not be `Clone`).
    value: Option<Option<V>>,
}

/// More puts than this in one batch are not listed in `planned`: the batch is opaque.
const PLANNED_KEYS: usize = 64;

/// Where a read-modify-write being queued finds the value it reads.
enum Lookup<'a, V> {
    /// In the plan of the request numbered so (absent: `None`).
    Planned(u64, Option<&'a V>),
    /// In memory: nothing queued touches the key.
    Memory,
    /// Not known before a change queued earlier is committed.
    Unknown,
}

/// What a read-modify-write being queued reads: the map's entries, and what the
/// changes queued before it will write; and which of those it read.
pub(crate) struct Reads<'a, K, V, S> {
    map: &'a HashMap<K, V, S>,
    queue: &'a Queue<K, V>,
    depends: Vec<u64>,
    unknown: bool,
}

impl<'a, K, V, S> Reads<'a, K, V, S>
where
    K: Eq + Hash,
    S: BuildHasher,
{
    /// What the key (`key`, stored as `bytes`) will hold once the changes queued before
    /// are committed. When that is not known yet, `None`, and `unknown` says so.
    fn current<Q>(&mut self, bytes: &[u8], key: &Q) -> Option<&'a V>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        match self.queue.lookup(bytes) {
            Lookup::Planned(seq, value) => {
                self.depends.push(seq);
                value
            }
            Lookup::Memory => self.map.get(key),
            Lookup::Unknown => {
                self.unknown = true;
                None
            }
        }
    }
}

/// A read-modify-write, computed: what to queue, and what the call returns.
enum Computed<K, V, R> {
    /// Write `batch`, then change memory with `change`; `known`, the values of the
    /// batch's puts, in order, when they can be copied for the calls queued after.
    Write {
        batch: Batch,
        change: Change<K, V>,
        known: Option<Vec<V>>,
        result: R,
    },
    /// The value read is not known before a change queued earlier is committed: the
    /// call takes the exclusive path instead (its closure was not run).
    Unknown,
}

impl<K, V> Queue<K, V> {
    /// Queues a change made by `call`, computed on the requests `depends`; `known`, the
    /// values its puts write (in order), for the read-modify-writes queued after it.
    /// Says whether the caller is to lead.
    fn push(
        &mut self,
        call: &'static str,
        batch: Batch,
        change: Change<K, V>,
        done: Waiter<K, V>,
        depends: Vec<u64>,
        known: Option<Vec<V>>,
    ) -> bool {
        self.last += 1;
        let seq = self.last;
        if batch.clear {
            self.planned.clear();
            self.cleared = Some(seq);
        }
        for key in &batch.deletes {
            let value = Some(None);
            self.planned.insert(key.clone(), Planned { seq, value });
        }
        match known {
            Some(values) => {
                for ((key, _), v) in batch.puts.iter().zip(values) {
                    let value = Some(Some(v));
                    self.planned.insert(key.clone(), Planned { seq, value });
                }
            }
            None if batch.puts.len() > PLANNED_KEYS => self.opaque = Some(seq),
            None => {
                for (key, _) in &batch.puts {
                    self.planned
                        .insert(key.clone(), Planned { seq, value: None });
                }
            }
        }
        self.pending.push(Request {
            seq,
            call,
            depends,
            batch,
            change,
            done,
            told: false,
            thread: std::thread::current().id(),
        });
        let leads = self.leaders < self.max_leaders;
        if leads {
            self.leaders += 1;
        }
        leads
    }

    /// The queued changes a new group may take now, by index, in queue order: all of
    /// them with one connection; with lanes, those that touch no key of a group being
    /// committed nor of a change passed over before them, and come from no thread with
    /// a change there; and a clear only when no other group is being committed
    /// (nothing passes a clear).
    fn eligible(&self) -> Vec<usize> {
        if self.max_leaders == 1 {
            return (0..self.pending.len()).collect();
        }
        if self.clearing {
            return Vec::new();
        }
        let mut passed: HashSet<&[u8]> = HashSet::new();
        let mut passed_threads = HashSet::new();
        let mut taken = Vec::new();
        for (i, r) in self.pending.iter().enumerate() {
            if r.batch.clear {
                if !self.inflight.is_empty() || !passed.is_empty() || !passed_threads.is_empty() {
                    break;
                }
                taken.push(i);
                continue;
            }
            let keys = r.keys();
            let waits = self.inflight_threads.contains(&r.thread)
                || passed_threads.contains(&r.thread)
                || keys
                    .clone()
                    .any(|k| self.inflight.contains(k) || passed.contains(k.as_slice()));
            if waits {
                passed.extend(keys.map(Vec::as_slice));
                passed_threads.insert(r.thread);
                continue;
            }
            taken.push(i);
        }
        taken
    }

    /// Takes the changes `eligible` gives out of the queue, as a group being committed.
    fn take_group(&mut self) -> (Vec<Request<K, V>>, Committing) {
        let picked = self.eligible();
        if picked.len() == self.pending.len() {
            let group = std::mem::take(&mut self.pending);
            return self.committing(group);
        }
        let mut group = Vec::with_capacity(picked.len());
        let mut left = Vec::with_capacity(self.pending.len() - picked.len());
        let mut next = picked.iter().peekable();
        for (i, r) in std::mem::take(&mut self.pending).into_iter().enumerate() {
            if next.peek() == Some(&&i) {
                next.next();
                group.push(r);
            } else {
                left.push(r);
            }
        }
        self.pending = left;
        self.committing(group)
    }

    /// Notes what a group taken holds (with lanes).
    fn committing(&mut self, group: Vec<Request<K, V>>) -> (Vec<Request<K, V>>, Committing) {
        let mut held = Committing::default();
        if self.max_leaders == 1 {
            return (group, held);
        }
        held.clears = group.iter().any(|r| r.batch.clear);
        self.clearing |= held.clears;
        for r in &group {
            if self.inflight_threads.insert(r.thread) {
                held.threads.push(r.thread);
            }
            for k in r.keys() {
                if self.inflight.insert(k.clone()) {
                    held.keys.push(k.clone());
                }
            }
        }
        (group, held)
    }

    /// A group taken is over: what it held is free.
    fn committed(&mut self, held: &Committing) {
        for key in &held.keys {
            self.inflight.remove(key);
        }
        for thread in &held.threads {
            self.inflight_threads.remove(thread);
        }
        if held.clears {
            self.clearing = false;
        }
        self.forget_refused();
    }

    /// What `key` will hold once what is queued is committed.
    fn lookup(&self, key: &[u8]) -> Lookup<'_, V> {
        if self.opaque.is_some() {
            return Lookup::Unknown;
        }
        match self.planned.get(key) {
            Some(Planned {
                seq,
                value: Some(value),
            }) => Lookup::Planned(*seq, value.as_ref()),
            Some(Planned { value: None, .. }) => Lookup::Unknown,
            None => match self.cleared {
                Some(seq) => Lookup::Planned(seq, None),
                None => Lookup::Memory,
            },
        }
    }

    /// The requests `done` are over (those in `refused` refused), and memory holds
    /// what the committed ones wrote: their plans give way to it.
    fn finished(&mut self, done: &HashSet<u64>, refused: impl IntoIterator<Item = u64>) {
        if done.is_empty() {
            return;
        }
        self.planned.retain(|_, p| !done.contains(&p.seq));
        if self.cleared.is_some_and(|seq| done.contains(&seq)) {
            self.cleared = None;
        }
        if self.opaque.is_some_and(|seq| done.contains(&seq)) {
            self.opaque = None;
        }
        self.refused.extend(refused);
        self.forget_refused();
    }

    /// Once nothing is queued or being committed, nothing can depend on the refused
    /// changes any more. (With lanes, a change computed on a refused one may have been
    /// taken by another group that has not looked yet: found when a third group's end
    /// forgot the refusal, and an upsert computed on a refused value was committed.)
    fn forget_refused(&mut self) {
        if self.pending.is_empty() && self.inflight.is_empty() {
            self.refused.clear();
        }
    }
}

/// Where a queued change's caller waits: a blocked thread, or (feature `tokio`) a task
/// awaiting a oneshot channel, woken by the committing thread; such a task does not
/// hold a thread while it waits.
enum Waiter<K, V> {
    Thread(mpsc::SyncSender<Word<K, V>>),
    #[cfg(feature = "tokio")]
    Task {
        outcome: tokio::sync::oneshot::Sender<Result<Done<K, V>>>,
        /// Starts a leader, on a thread of its own, when the lead comes to this change
        /// (numbered so).
        lead: Box<dyn Fn(u64) + Send>,
    },
}

impl<K, V> Waiter<K, V> {
    /// Hands the caller its outcome; a caller gone (a dropped future) is no matter.
    fn outcome(self, outcome: Result<Done<K, V>>) {
        match self {
            Waiter::Thread(to) => {
                let _ = to.send(Word::Outcome(outcome));
            }
            #[cfg(feature = "tokio")]
            Waiter::Task { outcome: to, .. } => {
                let _ = to.send(outcome);
            }
        }
    }

    /// Tells the caller of change `seq` to lead the next group; false if it cannot (it
    /// is gone).
    fn lead(&mut self, seq: u64) -> bool {
        match self {
            Waiter::Thread(to) => to.try_send(Word::Lead(seq)).is_ok(),
            #[cfg(feature = "tokio")]
            Waiter::Task { lead, .. } => {
                lead(seq);
                true
            }
        }
    }
}

/// What a waiting caller hears: its outcome, or that it leads the next group (told as
/// the caller of the change numbered so).
enum Word<K, V> {
    Outcome(Result<Done<K, V>>),
    Lead(u64),
}

/// The memory side of a queued change, applied once its batch is committed.
enum Change<K, V> {
    Insert(K, V),
    InsertMany(Vec<(K, V)>),
    Remove(K),
    Clear,
}

/// What a queued change gives back to its caller.
enum Done<K, V> {
    Value(Option<V>),
    Entry(Option<(K, V)>),
    Nothing,
}

impl<K, V> Change<K, V>
where
    K: Eq + Hash,
{
    fn apply<S: BuildHasher>(self, map: &mut HashMap<K, V, S>) -> Done<K, V> {
        match self {
            Change::Insert(k, v) => Done::Value(map.insert(k, v)),
            Change::InsertMany(pairs) => {
                map.reserve(pairs.len());
                map.extend(pairs);
                Done::Nothing
            }
            Change::Remove(k) => Done::Entry(map.remove_entry(&k)),
            Change::Clear => {
                map.clear();
                Done::Nothing
            }
        }
    }
}

/// A read lock on a shared map's entries: a consistent view while it is held. Writers
/// wait for it only to apply a change already committed; hold it briefly. While a
/// thread holds it, that thread's writes to the same map return
/// [`Error::Reentrant`] (they would wait for the guard).
pub struct ReadGuard<'a, K, V, S = RandomState> {
    guard: RwLockReadGuard<'a, HashMap<K, V, S>>,
    _inside: Inside,
}

thread_local! {
    /// The shared maps (by address) this thread is inside of: holding the writer, or
    /// a read guard. A write there would wait for this thread.
    static INSIDE: RefCell<Vec<usize>> = const { RefCell::new(Vec::new()) };
}

/// This thread is inside the map at this address until the token is dropped.
struct Inside(usize);

impl Inside {
    fn enter(map: usize) -> Self {
        INSIDE.with(|inside| inside.borrow_mut().push(map));
        Inside(map)
    }

    fn is_inside(map: usize) -> bool {
        INSIDE.with(|inside| inside.borrow().contains(&map))
    }
}

impl Drop for Inside {
    fn drop(&mut self) {
        INSIDE.with(|inside| {
            let mut inside = inside.borrow_mut();
            if let Some(at) = inside.iter().rposition(|m| *m == self.0) {
                inside.remove(at);
            }
        });
    }
}

/// The map's writer, held: the thread is inside the map meanwhile.
struct Held<'a, K, V> {
    guard: MutexGuard<'a, Writer<K, V>>,
    _inside: Inside,
}

impl<K, V> Deref for Held<'_, K, V> {
    type Target = Writer<K, V>;

    fn deref(&self) -> &Writer<K, V> {
        &self.guard
    }
}

impl<K, V> std::ops::DerefMut for Held<'_, K, V> {
    fn deref_mut(&mut self) -> &mut Writer<K, V> {
        &mut self.guard
    }
}

impl<K, V, S> Deref for ReadGuard<'_, K, V, S> {
    type Target = HashMap<K, V, S>;

    fn deref(&self) -> &HashMap<K, V, S> {
        &self.guard
    }
}

impl<K: fmt::Debug, V: fmt::Debug, S> fmt::Debug for ReadGuard<'_, K, V, S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map().entries(self.guard.iter()).finish()
    }
}

impl<K, V, S> Clone for SharedDbHashMap<K, V, S> {
    /// Another handle to the same map.
    fn clone(&self) -> Self {
        SharedDbHashMap {
            inner: Arc::clone(&self.inner),
        }
    }
}

impl<K: fmt::Debug, V: fmt::Debug, S> fmt::Debug for SharedDbHashMap<K, V, S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map().entries(self.inner.read().iter()).finish()
    }
}

fn unpoisoned<G>(result: std::sync::LockResult<G>) -> G {
    // Whoever panicked left the writer, the queue or the subscribers whole: the
    // writer's state changes only after a store call returns, the others by one `Vec`
    // call. Go on with them.
    result.unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl<K, V, S> Inner<K, V, S> {
    fn address(&self) -> usize {
        self as *const Self as usize
    }

    /// A read lock. A thread that holds one already (or the writer) takes another even
    /// while a writer waits for the lock: waiting there would wait for itself.
    fn read(&self) -> RwLockReadGuard<'_, HashMap<K, V, S>> {
        if Inside::is_inside(self.address()) {
            self.map.read_recursive()
        } else {
            self.map.read()
        }
    }

    fn write(&self) -> RwLockWriteGuard<'_, HashMap<K, V, S>> {
        self.map.write()
    }

    /// Refuses `call` on a thread that is inside this map: it would wait for itself.
    pub(super) fn enter(&self, call: &'static str) -> Result<()> {
        if Inside::is_inside(self.address()) {
            return Err(Error::Reentrant {
                table: self.table.clone(),
                call,
            });
        }
        Ok(())
    }

    /// The writer, for `call`; refused on a thread inside this map.
    fn writer(&self, call: &'static str) -> Result<Held<'_, K, V>> {
        self.enter(call)?;
        Ok(self.writer_unchecked())
    }

    fn writer_unchecked(&self) -> Held<'_, K, V> {
        let guard = unpoisoned(self.writer.lock());
        Held {
            guard,
            _inside: Inside::enter(self.address()),
        }
    }

    pub(crate) fn writer_store(&self) -> Arc<Mutex<Box<dyn crate::store::Store>>> {
        Arc::clone(&self.writer_unchecked().store)
    }
}

impl<K, V, S> Inner<K, V, S>
where
    K: Eq + Hash,
    S: BuildHasher,
{
    /// Commits a group of queued changes as one transaction, applies those committed
    /// to memory in call order, and hands each caller its outcome. When the database
    /// refuses the group, each change is tried alone, so that only the changes it
    /// refuses fail. When every change failed on a lock or busy timeout, that error is
    /// returned too: the changes queued meanwhile would wait for the same lock.
    fn commit_group(&self, w: &mut Writer<K, V>, mut group: Vec<Request<K, V>>) -> Option<Error> {
        if group.is_empty() {
            return None;
        }
        self.calls.fetch_add(group.len() as u64, Ordering::Relaxed);
        crate::metrics::group(&self.table, group.len());
        let mut results = Vec::with_capacity(group.len());
        if let Err(e) = self.settle(w) {
            // Nothing of the group was tried: each caller hears why.
            results.extend((0..group.len()).map(|_| Err(e.for_group())));
        } else {
            let mut refused = self.queue().refused.clone();
            let parts = parts(&group);
            let together = self.commit_together(w, &group, &parts, &refused);
            let one_by_one = if together.is_none() {
                parts
            } else {
                Vec::new()
            };
            results.extend(together.into_iter().flatten());
            for part in one_by_one {
                // A change computed on a refused one is refused too, untried.
                let superseded: Vec<usize> = part
                    .clone()
                    .filter(|&i| group[i].computed_on(&refused))
                    .collect();
                for &i in &superseded {
                    group[i].batch = Batch::default();
                }
                let mut done = self.commit_part(w, &mut group[part.clone()]);
                for &i in &superseded {
                    done[i - part.start] = Err(self.superseded(&group[i]));
                }
                for (i, result) in part.zip(&done) {
                    if result.is_err() {
                        refused.insert(group[i].seq);
                    }
                }
                results.extend(done);
            }
        }
        // A change refused for another's sake (`Superseded`) says nothing of a lock.
        let tried = results.iter().find_map(|r| match r {
            Err(Error::Superseded { .. }) => None,
            other => Some(other),
        });
        let locked_out = match tried {
            Some(Err(e))
                if results.iter().all(Result::is_err)
                    && e.is_retryable()
                    && !e.is_conflict()
                    && !e.is_disconnect() =>
            {
                Some(e.for_group())
            }
            _ => None,
        };
        let seqs: HashSet<u64> = group.iter().map(|r| r.seq).collect();
        let refused: Vec<u64> = group
            .iter()
            .zip(&results)
            .filter(|(_, result)| result.is_err())
            .map(|(r, _)| r.seq)
            .collect();
        let mut outcomes = Vec::with_capacity(group.len());
        {
            let mut map = self.write();
            for (r, result) in group.into_iter().zip(results) {
                outcomes.push((r.done, result.map(|()| r.change.apply(&mut map))));
            }
        }
        // After memory took the changes (and without its lock): the next
        // read-modify-write reads them there.
        self.queue().finished(&seqs, refused);
        for (done, outcome) in outcomes {
            done.outcome(outcome);
        }
        locked_out
    }

    /// Commits the parts of a group (see [`parts`]) in order, as one transaction, when
    /// the store can ([`Store::apply_seq`](crate::Store::apply_seq)): the database sees
    /// every value each key takes, and the group costs one commit. `None` when there is
    /// one part, the store cannot, or the database refused a change: the parts are then
    /// committed one by one, so that only the refused changes (and those computed on
    /// them) fail.
    fn commit_together(
        &self,
        w: &mut Writer<K, V>,
        group: &[Request<K, V>],
        parts: &[std::ops::Range<usize>],
        refused: &HashSet<u64>,
    ) -> Option<Vec<Result<()>>> {
        if parts.len() < 2 || w.behind.is_some() || !w.store().applies_seq() {
            return None;
        }
        let batches: Vec<Batch> = parts
            .iter()
            .map(|part| {
                let mut merged = BatchBuilder::default();
                for r in group[part.clone()]
                    .iter()
                    .filter(|r| !r.computed_on(refused))
                {
                    merged.add(r.batch.clone());
                }
                merged.finish()
            })
            .filter(|batch| !batch.is_empty())
            .collect();
        if batches.len() < 2 {
            return None;
        }
        let mut failure = MetByAll(match w.persist_seq(&batches) {
            Ok(()) => None,
            Err(e) if MetByAll::is(&e) => Some(e),
            Err(e) => {
                tracing::debug!(table = %self.table, error = %e, parts = parts.len(),
                    "a group's parts failed together; committing them one by one");
                return None;
            }
        });
        let results = group
            .iter()
            .map(|r| {
                if r.computed_on(refused) {
                    return Err(self.superseded(r));
                }
                failure.next()
            })
            .collect();
        Some(results)
    }

    /// The error of a change computed on one the database refused.
    fn superseded(&self, r: &Request<K, V>) -> Error {
        Error::Superseded {
            table: self.table.clone(),
            call: r.call,
        }
    }

    /// Commits one part of a group (see [`parts`]): as one transaction, or, when the
    /// database refuses it, one change at a time, so that only the refused ones fail.
    fn commit_part(&self, w: &mut Writer<K, V>, part: &mut [Request<K, V>]) -> Vec<Result<()>> {
        let alone = |w: &mut Writer<K, V>, part: &mut [Request<K, V>]| -> Vec<Result<()>> {
            part.iter_mut()
                .map(|r| match std::mem::take(&mut r.batch) {
                    batch if batch.is_empty() => Ok(()),
                    batch => w.persist(batch),
                })
                .collect()
        };
        if part.len() == 1 {
            return alone(w, part);
        }
        let mut merged = BatchBuilder::default();
        for r in part.iter() {
            merged.add(r.batch.clone());
        }
        let merged = merged.finish();
        if merged.is_empty() {
            return part.iter().map(|_| Ok(())).collect();
        }
        match w.persist(merged) {
            Ok(()) => part.iter().map(|_| Ok(())).collect(),
            Err(e) if MetByAll::is(&e) => {
                let mut all = MetByAll(Some(e));
                part.iter().map(|_| all.next()).collect()
            }
            Err(e) => {
                tracing::debug!(table = %self.table, error = %e, changes = part.len(),
                    "a group commit failed; committing its changes one by one");
                alone(w, part)
            }
        }
    }

    /// Queues a read-modify-write for the next group, computed now on what its keys will
    /// hold once the changes queued before it are committed, so that no other write of
    /// the map comes between its read and its commit; waits for its outcome. `Ok(None)`
    /// when `compute` said [`Computed::Unknown`]: the caller then takes the exclusive
    /// path. `compute` runs with the queue held (other writers wait to queue), inside the
    /// map (a write of the same map from it is refused).
    fn queue_computed<R>(
        &self,
        call: &'static str,
        compute: impl FnOnce(&mut Reads<'_, K, V, S>) -> Result<Computed<K, V, R>>,
    ) -> Result<Option<R>> {
        self.enter(call)?;
        let (done, words) = mpsc::sync_channel(2);
        let (leads, result) = {
            let _gate = self.gate.read();
            let mut queue = self.queue();
            // A write whose outcome is unknown is settled before anything is read: the
            // exclusive path does it. (Set before its request leaves the queue's plans,
            // so a computation that missed the flag read the plan and depends on it.)
            if self.enc.in_doubt.load(Ordering::SeqCst) {
                return Ok(None);
            }
            let _inside = Inside::enter(self.address());
            let map = self.read();
            let mut reads = Reads {
                map: &map,
                queue: &queue,
                depends: Vec::new(),
                unknown: false,
            };
            let computed = compute(&mut reads)?;
            let depends = reads.depends;
            drop(map);
            match computed {
                Computed::Unknown => return Ok(None),
                Computed::Write {
                    batch,
                    change,
                    known,
                    result,
                } => {
                    let done = Waiter::Thread(done);
                    let leads = queue.push(call, batch, change, done, depends, known);
                    (leads, result)
                }
            }
        };
        SharedDbHashMap::wait_for(self, leads, &words)?;
        Ok(Some(result))
    }

    /// Takes the store for a read-modify-write: commits what is queued first (so that
    /// queued callers do not wait behind a run of exclusive writers), then runs `f`
    /// with no other writer in between.
    fn exclusive<R>(
        &self,
        call: &'static str,
        f: impl FnOnce(&mut Writer<K, V>) -> Result<R>,
    ) -> Result<R> {
        self.enter(call)?;
        let _gate = self.gate.write();
        let mut w = self.writer_unchecked();
        // No group commits on a lane meanwhile; what a lane left unknown is settled.
        let lanes = self.lanes.as_ref().map(Lanes::hold);
        let queued = std::mem::take(&mut self.queue().pending);
        self.commit_group(&mut w, queued);
        self.calls.fetch_add(1, Ordering::Relaxed);
        if let Some(lanes) = &lanes {
            lanes.each(|lane| self.settle(lane))?;
        }
        self.settle(&mut w)?;
        f(&mut w)
    }

    /// Settles a write whose outcome was unknown, if there is one (the table is read
    /// without the lock readers use; memory takes it in one short step), then says
    /// whether the map takes writes.
    fn settle(&self, w: &mut Writer<K, V>) -> Result<()> {
        if let Some(settlement) = w.read_unsettled()? {
            let n = settlement.apply(&mut self.write());
            w.settled(n);
        }
        w.check_writable()
    }

    fn queue(&self) -> MutexGuard<'_, Queue<K, V>> {
        unpoisoned(self.queue.lock())
    }

    /// One term as leader: commits everything queued (the leader's own change
    /// included) as one group, then hands the lead to the first caller queued since.
    /// With lanes, what a group may take now (see [`Queue::eligible`]), on whichever
    /// connection is free. `told`: the change whose caller was told to lead.
    fn lead(&self, told: Option<u64>) {
        let mut term = Leading {
            inner: self,
            held: Committing::default(),
        };
        if let Some(seq) = told {
            if let Some(r) = self.queue().pending.iter_mut().find(|r| r.seq == seq) {
                r.told = false;
            }
        }
        let mut w = self.lane();
        // The callers the last commit released are making their next change: wait
        // (briefly) for as many changes as there were callers around the last commit,
        // so that they join this group rather than wait for the next. (With lanes, the
        // next group goes on another connection instead.)
        if self.lanes.is_none() {
            self.gather();
        }
        let group = {
            let mut queue = self.queue();
            let (group, held) = queue.take_group();
            term.held = held;
            group
        };
        if group.is_empty() {
            return;
        }
        let size = group.len();
        let started = Instant::now();
        let locked_out = self.commit_group(&mut w, group);
        // A lock held elsewhere timed the whole group out: the callers who queued
        // while it waited hear the same now, rather than each waiting for the lock
        // again (each caller waits at most its own timeout, once). Not with lanes:
        // there the changes queued meanwhile may be of keys no lock holds, and they go
        // on another connection (found by probing: they failed with another key's lock
        // timeout, and their keys stayed marked as being committed, so that the next
        // write of them waited for ever).
        if let Some(e) = locked_out.filter(|_| self.lanes.is_none()) {
            let queued = std::mem::take(&mut self.queue().pending);
            self.calls.fetch_add(queued.len() as u64, Ordering::Relaxed);
            let seqs: HashSet<u64> = queued.iter().map(|r| r.seq).collect();
            self.queue().finished(&seqs, seqs.iter().copied());
            for r in queued {
                r.done.outcome(Err(e.for_group()));
            }
        }
        {
            let mut after = self.queue();
            after.callers = size + after.pending.len();
            after.last_commit = started.elapsed();
        }
        let unsettled = w.unsettled.is_some() && self.lanes.is_some();
        drop(w);
        drop(term);
        if unsettled {
            // A write on one connection whose outcome is unknown is read back while no
            // other connection writes, so that the value read is not one another
            // group is about to change (the next call would do it otherwise).
            if let Err(e) = self.exclusive("settle", |_| Ok(())) {
                tracing::debug!(table = %self.table, error = %e,
                    "a write's outcome is still unknown; the next call settles it");
            }
        }
    }

    /// A connection for a leader: the map's writer if free, else a lane (with lanes),
    /// else the map's writer once it is free.
    fn lane(&self) -> Lane<'_, K, V> {
        let Some(lanes) = &self.lanes else {
            return Lane::Main(self.writer_unchecked());
        };
        let free = match self.writer.try_lock() {
            Ok(guard) => Some(guard),
            Err(std::sync::TryLockError::Poisoned(p)) => Some(p.into_inner()),
            Err(std::sync::TryLockError::WouldBlock) => None,
        };
        if let Some(guard) = free {
            return Lane::Main(Held {
                guard,
                _inside: Inside::enter(self.address()),
            });
        }
        match lanes.take(&self.enc) {
            Some(w) => Lane::Extra {
                w: Some(w),
                lanes,
                _inside: Inside::enter(self.address()),
            },
            None => Lane::Main(self.writer_unchecked()),
        }
    }

    /// A leader's wait before taking its group: until as many changes are queued as
    /// there were callers around the last commit, for at most a quarter of that
    /// commit's time. A lone writer does not wait.
    fn gather(&self) {
        let (want, limit) = {
            let queue = self.queue();
            (queue.callers, queue.last_commit / GATHER_SHARE)
        };
        let start = Instant::now();
        while self.queue().pending.len() < want && start.elapsed() < limit {
            std::thread::yield_now();
        }
    }

    /// Applies what others committed since the last look (see
    /// [`DbHashMap::refresh`]), and tells subscribers which keys changed.
    pub(crate) fn refresh(&self) -> Result<usize>
    where
        S: Clone,
    {
        self.refresh_with(None)
    }

    /// The watcher's refresh: a row that does not decode is left out (its key keeps
    /// what memory holds) and told to subscribers, and every other change goes on.
    pub(crate) fn watch_refresh(&self) -> Result<usize>
    where
        S: Clone,
    {
        let mut skipped = Vec::new();
        let result = self.refresh_with(Some(&mut skipped));
        if !skipped.is_empty() {
            crate::metrics::rows_skipped(&self.table, skipped.len());
            for (key, reason) in skipped {
                tracing::warn!(table = %self.table, key = %key, reason = %reason,
                    "watch: a row another program wrote does not decode; its key keeps its value in memory until the row is fixed");
                self.subscribers.send(|| Event::Skipped {
                    key: key.clone(),
                    reason: reason.clone(),
                });
            }
        }
        result
    }

    fn refresh_with(&self, skipped: Option<&mut Vec<(String, String)>>) -> Result<usize>
    where
        S: Clone,
    {
        self.exclusive("refresh", |w| {
            let read = w.read_changes(&self.read(), skipped)?;
            let keys = match read {
                Refreshed::Changes(changed, reached) => {
                    let keys: Vec<Vec<u8>> = changed.iter().map(|c| c.bytes.clone()).collect();
                    apply_changes(&mut self.write(), changed);
                    w.refreshed_to(reached);
                    keys
                }
                Refreshed::FellBehind => {
                    let hasher = self.read().hasher().clone();
                    let (fresh, version) = w.load_fresh(hasher)?;
                    let keys = w.differences(&self.read(), &fresh);
                    // The old map is dropped after the lock is released.
                    let old = std::mem::replace(&mut *self.write(), fresh);
                    drop(old);
                    w.took_fresh(version);
                    self.subscribers.send(|| Event::Reloaded);
                    keys
                }
            };
            crate::metrics::refreshed(&self.table, keys.len());
            self.notify(w, &keys);
            Ok(keys.len())
        })
    }

    /// The version of the table this map has seen (coherence).
    pub(crate) fn seen(&self) -> Option<u64> {
        self.writer_unchecked().coherent.map(|c| c.seen)
    }

    fn notify(&self, w: &Writer<K, V>, keys: &[Vec<u8>]) {
        if keys.is_empty() || !self.subscribers.any() {
            return;
        }
        self.subscribers
            .send(|| Event::Changed(keys.iter().filter_map(|b| w.keys.decode(b).ok()).collect()));
    }
}

/// The longest a leader waits for changes to gather, as a share of the last commit's
/// time: a wait longer than that would cost more than a second commit.
const GATHER_SHARE: u32 = 4;

/// A failure of a group's commit that each of its changes would meet alone: an unknown
/// outcome, a lost connection that could not be made again, a lock or busy timeout.
/// Every caller hears it once (the first the error itself, the others a copy for the
/// group), instead of waiting for its change to meet it again; `None`: no failure.
struct MetByAll(Option<Error>);

impl MetByAll {
    fn is(e: &Error) -> bool {
        e.is_outcome_unknown() || e.is_retryable() || e.is_disconnect()
    }

    /// The next caller's outcome.
    fn next(&mut self) -> Result<()> {
        match self.0.take() {
            Some(e) => {
                self.0 = Some(e.for_group());
                Err(e)
            }
            None => Ok(()),
        }
    }
}

/// A leader's term. It ends when dropped, even by a panic: its group's keys are free
/// again, and the first caller still queued whose change may go now is told to lead
/// next, or, with none, nobody leads until the next change (with lanes: until another
/// group ends, or the next change).
struct Leading<'a, K, V, S> {
    inner: &'a Inner<K, V, S>,
    /// What its group holds (with lanes).
    held: Committing,
}

impl<K, V, S> Drop for Leading<'_, K, V, S> {
    fn drop(&mut self) {
        let mut queue = unpoisoned(self.inner.queue.lock());
        queue.committed(&self.held);
        queue.leaders -= 1;
        loop {
            let next = queue
                .eligible()
                .into_iter()
                .find(|&i| !queue.pending[i].told);
            let Some(i) = next else {
                return;
            };
            let next = &mut queue.pending[i];
            if next.done.lead(next.seq) {
                next.told = true;
                queue.leaders += 1;
                return;
            }
            // Its caller is gone (it cannot be, while the request is queued; but a
            // request nobody waits for must not stall the queue).
            queue.pending.remove(i);
        }
    }
}

/// The connection a leader commits its group on: the map's writer, or a lane, given
/// back when dropped.
enum Lane<'a, K, V> {
    Main(Held<'a, K, V>),
    Extra {
        w: Option<Writer<K, V>>,
        lanes: &'a Lanes<K, V>,
        _inside: Inside,
    },
}

impl<K, V> Deref for Lane<'_, K, V> {
    type Target = Writer<K, V>;

    fn deref(&self) -> &Writer<K, V> {
        match self {
            Lane::Main(held) => held,
            Lane::Extra { w, .. } => w.as_ref().expect("a lane is held until dropped"),
        }
    }
}

impl<K, V> std::ops::DerefMut for Lane<'_, K, V> {
    fn deref_mut(&mut self) -> &mut Writer<K, V> {
        match self {
            Lane::Main(held) => held,
            Lane::Extra { w, .. } => w.as_mut().expect("a lane is held until dropped"),
        }
    }
}

impl<K, V> Drop for Lane<'_, K, V> {
    fn drop(&mut self) {
        if let Lane::Extra { w, lanes, .. } = self {
            if let Some(w) = w.take() {
                lanes.give_back(w);
            }
        }
    }
}

/// Splits a group into runs that one transaction can carry with every change of every
/// call in it: a key written by two calls, or a clear after other changes, starts a new
/// run. Merged into one batch, the later change would replace the earlier one, which
/// the database would then never see (nor refuse): a call would be told its change is
/// committed when it was not even tried.
fn parts<K, V>(group: &[Request<K, V>]) -> Vec<std::ops::Range<usize>> {
    let mut parts = Vec::new();
    let mut start = 0;
    let mut keys: std::collections::HashSet<&[u8]> = std::collections::HashSet::new();
    // And where a call was computed on one in the run (an upsert after a clear): it is
    // committed only once that one was, or refused with it.
    let mut seqs: HashSet<u64> = HashSet::new();
    for (i, r) in group.iter().enumerate() {
        let mut touched = r
            .batch
            .deletes
            .iter()
            .map(Vec::as_slice)
            .chain(r.batch.puts.iter().map(|(k, _)| k.as_slice()));
        let repeats = (r.batch.clear && i > start)
            || touched.clone().any(|k| keys.contains(k))
            || r.depends.iter().any(|d| seqs.contains(d));
        if repeats {
            parts.push(start..i);
            start = i;
            keys.clear();
            seqs.clear();
        }
        keys.extend(&mut touched);
        seqs.insert(r.seq);
    }
    parts.push(start..group.len());
    parts
}

impl<K, V, S> SharedDbHashMap<K, V, S> {
    pub(crate) fn from_map(h: DbHashMap<K, V, S>, lanes: Option<LaneSource>) -> Self {
        let (map, w) = h.into_parts();
        // Lanes are for write-through maps: write-behind commits on its own thread.
        let lanes = lanes
            .filter(|l| l.extra > 0 && w.behind.is_none())
            .map(|l| LaneSource {
                coherent: w.coherent,
                ..l
            })
            .map(Lanes::new);
        let max_leaders = 1 + lanes.as_ref().map_or(0, Lanes::extra);
        SharedDbHashMap {
            inner: Arc::new(Inner {
                table: w.table.name.clone(),
                backend: w.backend,
                enc: Arc::clone(&w.enc),
                behind: w.behind.as_ref().map(crate::write_behind::Behind::probe),
                map: RwLock::new(map),
                writer: Mutex::new(w),
                lanes,
                gate: RwLock::new(()),
                queue: Mutex::new(Queue {
                    pending: Vec::new(),
                    leaders: 0,
                    max_leaders,
                    inflight: HashSet::new(),
                    inflight_threads: HashSet::new(),
                    clearing: false,
                    planned: HashMap::new(),
                    cleared: None,
                    opaque: None,
                    last: 0,
                    refused: HashSet::new(),
                    callers: 0,
                    last_commit: Duration::ZERO,
                }),
                calls: AtomicU64::new(0),
                subscribers: Subscribers::default(),
            }),
        }
    }

    pub(crate) fn inner(&self) -> &Arc<Inner<K, V, S>> {
        &self.inner
    }

    /// A read lock on the entries: a consistent view of the map while it is held,
    /// derefs to the `HashMap`. Writers wait for it only to apply a change they have
    /// committed already; do not hold it across I/O of your own.
    pub fn read(&self) -> ReadGuard<'_, K, V, S> {
        ReadGuard {
            guard: self.inner.read(),
            _inside: Inside::enter(self.inner.address()),
        }
    }

    /// The number of entries.
    pub fn len(&self) -> usize {
        self.inner.read().len()
    }

    /// Whether the map holds no entry.
    pub fn is_empty(&self) -> bool {
        self.inner.read().is_empty()
    }

    /// The name of the table the map writes to.
    pub fn table_name(&self) -> &str {
        &self.inner.table
    }

    /// The backend's name (`"SQLite"`, `"PostgreSQL"`, ...).
    pub fn backend(&self) -> &'static str {
        self.inner.backend
    }

    /// How many writes were tried again after a conflict with another writer (see
    /// [`DbHashMap::conflicts_retried`]).
    pub fn conflicts_retried(&self) -> u64 {
        self.inner.enc.conflicts_retried.load(Ordering::Relaxed)
    }

    /// How many database transactions the map's writes have taken so far (conflicts
    /// retried included; none with write-behind, whose thread writes), and how many
    /// write calls were made: with group commit the first is smaller.
    pub fn commits(&self) -> (u64, u64) {
        let commits = self.inner.enc.commits.load(Ordering::Relaxed);
        (commits, self.inner.calls.load(Ordering::Relaxed))
    }

    /// Write-behind: the changes not yet in the table (one per key). Write-through: 0.
    pub fn pending_writes(&self) -> usize {
        self.inner.behind.as_ref().map_or(0, Probe::pending)
    }

    /// Write-behind: waits until every change made so far (by any handle) is in the
    /// table. Write-through: returns at once.
    pub fn flush(&self) -> Result<()> {
        self.inner.behind.as_ref().map_or(Ok(()), Probe::flush)
    }

    /// Flushes what this handle and the others wrote; the last handle also stops the
    /// write-behind thread and reports what could not be written (see
    /// [`DbHashMap::close`]). The other handles go on working.
    pub fn close(self) -> Result<()> {
        let mut w = self.inner.writer("close")?;
        if Arc::strong_count(&self.inner) == 1 {
            w.close()
        } else {
            w.flush()
        }
    }

    /// Subscribes to the map's [`Event`]s: after every refresh that changed memory (by
    /// [`refresh`](Self::refresh) or the watcher of [`Builder::watch`](crate::Builder::watch)),
    /// the keys it changed; and what the watcher meets (a row that does not decode, an
    /// error, the database answering again, a full reload). At most 1,024 events wait;
    /// a subscriber that falls further behind loses the oldest and hears
    /// [`Event::Lagged`] (see [`subscribe_with_capacity`](Self::subscribe_with_capacity)).
    /// Dropping the subscription unsubscribes.
    ///
    /// ```
    /// # use write_thru_hash::{DbHashMap, Event, SharedDbHashMap};
    /// let dir = tempfile::tempdir()?;
    /// let url = format!("sqlite:{}", dir.path().join("db.sqlite").display());
    /// let a: SharedDbHashMap<String, i64> = DbHashMap::builder_url(&url).coherent().open_shared()?;
    /// let mut b: DbHashMap<String, i64> = DbHashMap::builder_url(&url).coherent().open()?;
    /// let events = a.subscribe();
    /// b.insert("x".into(), 1)?;
    /// a.refresh()?;
    /// assert_eq!(events.recv(), Some(Event::Changed(vec!["x".to_string()])));
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn subscribe(&self) -> Subscription<K> {
        self.subscribe_with_capacity(super::events::DEFAULT_CAPACITY)
    }

    /// [`subscribe`](Self::subscribe), holding at most `capacity` events.
    pub fn subscribe_with_capacity(&self, capacity: usize) -> Subscription<K> {
        self.inner.subscribers.add(capacity)
    }
}

impl<K, V, S> SharedDbHashMap<K, V, S>
where
    K: Eq + Hash,
    S: BuildHasher,
{
    /// A copy of the value of `key`.
    pub fn get<Q>(&self, key: &Q) -> Option<V>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
        V: Clone,
    {
        self.inner.read().get(key).cloned()
    }

    /// Whether the map holds `key`.
    pub fn contains_key<Q>(&self, key: &Q) -> bool
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        self.inner.read().contains_key(key)
    }

    /// A copy of the map's content as a plain `HashMap`, never persisted.
    pub fn to_hash_map(&self) -> HashMap<K, V, S>
    where
        K: Clone,
        V: Clone,
        S: Clone,
    {
        self.inner.read().clone()
    }

    /// Queues a change for the next group commit and waits for its outcome. When no
    /// caller is committing, this one becomes the leader: it takes everything queued,
    /// its own change included, commits it as one group, and wakes the others; callers
    /// whose changes came meanwhile wait for the next leader, one of themselves.
    fn submit(&self, call: &'static str, batch: Batch, change: Change<K, V>) -> Result<Done<K, V>> {
        // Room for the word to lead and the outcome, so that neither sender waits.
        let (done, words) = mpsc::sync_channel(2);
        let leads =
            self.inner
                .queue()
                .push(call, batch, change, Waiter::Thread(done), Vec::new(), None);
        self.wait(leads, &words)
    }

    fn wait(&self, leads: bool, words: &mpsc::Receiver<Word<K, V>>) -> Result<Done<K, V>> {
        Self::wait_for(&self.inner, leads, words)
    }

    /// Waits for the outcome of a change queued, leading a group when told to (or at
    /// once, if `leads`).
    fn wait_for(
        inner: &Inner<K, V, S>,
        leads: bool,
        words: &mpsc::Receiver<Word<K, V>>,
    ) -> Result<Done<K, V>> {
        if leads {
            inner.lead(None);
        }
        loop {
            match words.recv() {
                Ok(Word::Outcome(result)) => return result,
                Ok(Word::Lead(seq)) => inner.lead(Some(seq)),
                // The leader that took this change panicked: whether its group was
                // committed is not known.
                Err(_) => {
                    return Err(Error::OutcomeUnknown {
                        table: inner.table.clone(),
                        backend: inner.backend,
                        source: "the thread committing this change's group panicked".into(),
                    })
                }
            }
        }
    }

    /// The batch and memory change of `insert`.
    fn insert_plan(&self, key: K, value: V) -> Result<(Batch, Change<K, V>)> {
        let batch = self
            .inner
            .writer_free_plan(|w, map| w.plan_insert(map, &key, &value))?;
        Ok((batch, Change::Insert(key, value)))
    }

    /// The batch and memory change of `remove_entry`; `None` when the key is absent.
    fn remove_plan<Q>(&self, key: &Q) -> Result<Option<(Batch, Change<K, V>)>>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        let planned = self.inner.writer_free_plan(|w, map| {
            let Some((batch, held)) = w.plan_remove(map, key)? else {
                return Ok(None);
            };
            Ok(Some((batch, w.copy_key(held)?.0)))
        })?;
        Ok(planned.map(|(batch, owned)| (batch, Change::Remove(owned))))
    }

    /// The batch and memory change of `clear`.
    fn clear_plan() -> (Batch, Change<K, V>) {
        let batch = Batch {
            clear: true,
            ..Batch::default()
        };
        (batch, Change::Clear)
    }

    /// The batch and memory change of `insert_many`.
    fn insert_many_plan(&self, pairs: Vec<(K, V)>) -> Result<(Batch, Change<K, V>)> {
        let batch = self
            .inner
            .writer_free_plan(|w, map| w.encode_pairs(Some(map), &pairs))?;
        Ok((batch, Change::InsertMany(pairs)))
    }

    /// [`submit`](Self::submit) for a task: the change is queued with a oneshot channel
    /// for its outcome, and the task awaits it without a thread. A leader runs on a
    /// thread of its own: one per group, not one per call. A dropped future
    /// leaves its change queued: it is committed (or not) with its group all the same.
    #[cfg(feature = "tokio")]
    async fn submit_async(
        &self,
        call: &'static str,
        batch: Batch,
        change: Change<K, V>,
    ) -> Result<Done<K, V>>
    where
        K: Send + Sync + 'static,
        V: Send + Sync + 'static,
        S: Send + Sync + 'static,
    {
        // A leader for a task runs on a thread of its own, one per group: never on the
        // runtime's blocking pool, which may be full of calls waiting for this very
        // leader (read-modify-writes wait there), nor on a runtime gone with its task.
        let start = {
            let map = self.clone();
            move |seq| {
                let map = map.clone();
                std::thread::spawn(move || map.inner.lead(Some(seq)));
            }
        };
        let (outcome, wait) = tokio::sync::oneshot::channel();
        let done = Waiter::Task {
            outcome,
            lead: Box::new(start),
        };
        let leads = self
            .inner
            .queue()
            .push(call, batch, change, done, Vec::new(), None);
        if leads {
            let map = self.clone();
            std::thread::spawn(move || map.inner.lead(None));
        }
        wait.await.unwrap_or_else(|_| {
            Err(Error::OutcomeUnknown {
                table: self.inner.table.clone(),
                backend: self.inner.backend,
                source: "the thread committing this change's group panicked".into(),
            })
        })
    }

    /// `insert` for a task (see [`submit_async`](Self::submit_async)).
    #[cfg(feature = "tokio")]
    pub(crate) async fn insert_queued(&self, key: K, value: V) -> Result<Option<V>>
    where
        K: Send + Sync + 'static,
        V: Send + Sync + 'static,
        S: Send + Sync + 'static,
    {
        self.inner.enter("insert")?;
        let (batch, change) = self.insert_plan(key, value)?;
        match self.submit_async("insert", batch, change).await? {
            Done::Value(previous) => Ok(previous),
            _ => Ok(None),
        }
    }

    /// `remove_entry` for a task (see [`submit_async`](Self::submit_async)).
    #[cfg(feature = "tokio")]
    pub(crate) async fn remove_entry_queued<Q>(&self, key: &Q) -> Result<Option<(K, V)>>
    where
        K: Borrow<Q> + Send + Sync + 'static,
        Q: Hash + Eq + ?Sized,
        V: Send + Sync + 'static,
        S: Send + Sync + 'static,
    {
        self.inner.enter("remove")?;
        let Some((batch, change)) = self.remove_plan(key)? else {
            return Ok(None);
        };
        match self.submit_async("remove", batch, change).await? {
            Done::Entry(entry) => Ok(entry),
            _ => Ok(None),
        }
    }

    /// `clear` for a task (see [`submit_async`](Self::submit_async)).
    #[cfg(feature = "tokio")]
    pub(crate) async fn clear_queued(&self) -> Result<()>
    where
        K: Send + Sync + 'static,
        V: Send + Sync + 'static,
        S: Send + Sync + 'static,
    {
        self.inner.enter("clear")?;
        let (batch, change) = Self::clear_plan();
        self.submit_async("clear", batch, change).await.map(|_| ())
    }

    /// `insert_many` for a task (see [`submit_async`](Self::submit_async)).
    #[cfg(feature = "tokio")]
    pub(crate) async fn insert_many_queued(&self, pairs: Vec<(K, V)>) -> Result<()>
    where
        K: Send + Sync + 'static,
        V: Send + Sync + 'static,
        S: Send + Sync + 'static,
    {
        self.inner.enter("insert_many")?;
        let (batch, change) = self.insert_many_plan(pairs)?;
        self.submit_async("insert_many", batch, change)
            .await
            .map(|_| ())
    }

    /// Inserts a key-value pair, returning the value the key had (see
    /// [`DbHashMap::insert`]). Group-committed.
    pub fn insert(&self, key: K, value: V) -> Result<Option<V>> {
        self.inner.enter("insert")?;
        let (batch, change) = self.insert_plan(key, value)?;
        match self.submit("insert", batch, change)? {
            Done::Value(previous) => Ok(previous),
            _ => Ok(None),
        }
    }

    /// Removes a key, returning its value (see [`DbHashMap::remove`]). Group-committed.
    pub fn remove<Q>(&self, key: &Q) -> Result<Option<V>>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        Ok(self.remove_entry(key)?.map(|(_, v)| v))
    }

    /// Removes a key, returning the stored key and its value (see
    /// [`DbHashMap::remove_entry`]). Group-committed.
    pub fn remove_entry<Q>(&self, key: &Q) -> Result<Option<(K, V)>>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        self.inner.enter("remove")?;
        let Some((batch, change)) = self.remove_plan(key)? else {
            return Ok(None);
        };
        match self.submit("remove", batch, change)? {
            Done::Entry(entry) => Ok(entry),
            _ => Ok(None),
        }
    }

    /// Removes every entry (see [`DbHashMap::clear`]). Group-committed.
    pub fn clear(&self) -> Result<()> {
        self.inner.enter("clear")?;
        let (batch, change) = Self::clear_plan();
        self.submit("clear", batch, change).map(|_| ())
    }

    /// Inserts every pair, as one transaction (see [`DbHashMap::insert_many`]).
    /// Group-committed: its pairs and other calls' changes may share a transaction,
    /// and all of its pairs are in it.
    pub fn insert_many(&self, pairs: impl IntoIterator<Item = (K, V)>) -> Result<()> {
        self.inner.enter("insert_many")?;
        let (batch, change) = self.insert_many_plan(pairs.into_iter().collect())?;
        self.submit("insert_many", batch, change).map(|_| ())
    }

    /// Keeps only the entries for which `f` returns `true`, and says how many it
    /// removed (see [`DbHashMap::retain`]).
    pub fn retain(&self, f: impl FnMut(&K, &V) -> bool) -> Result<usize> {
        self.inner.exclusive("retain", |w| {
            w.check_writable()?;
            let (batch, doomed) = w.plan_retain(&self.inner.read(), f)?;
            if doomed.is_empty() {
                return Ok(0);
            }
            w.persist(batch)?;
            // Nobody else changes the map while the writer is held: the keys are where
            // they were when chosen.
            self.inner
                .write()
                .retain(|k, _| !doomed.contains(&(k as *const K)));
            Ok(doomed.len())
        })
    }

    /// Removes every key given that the map holds, as one transaction, and says how
    /// many it removed (see [`DbHashMap::remove_many`]).
    pub fn remove_many<'q, Q>(&self, keys: impl IntoIterator<Item = &'q Q>) -> Result<usize>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized + 'q,
    {
        self.inner.exclusive("remove_many", |w| {
            w.check_writable()?;
            let (batch, held) = w.plan_remove_many(&self.inner.read(), keys)?;
            if held.is_empty() {
                return Ok(0);
            }
            w.persist(batch)?;
            let mut map = self.inner.write();
            for q in &held {
                map.remove(*q);
            }
            Ok(held.len())
        })
    }

    /// Sets the value of `key` to what `f` makes of its current value, and returns a
    /// copy of it (see [`DbHashMap::upsert`]). Group-committed: `f` runs when the call
    /// is queued, on what the key will hold once the changes queued before it are
    /// committed, so no other write of the map comes between the read and the commit.
    pub fn upsert(&self, key: K, f: impl FnOnce(Option<&V>) -> V) -> Result<V>
    where
        V: Clone,
    {
        let bytes = self.inner.enter("upsert").and_then(|()| {
            self.inner
                .writer_free_plan(|enc, map| enc.encode_new_key(map, &key))
        })?;
        let (mut f, mut key) = (Some(f), Some(key));
        let queued = self.inner.queue_computed("upsert", |reads| {
            let Some(held) = key.as_ref() else {
                return Ok(Computed::Unknown);
            };
            let current = reads.current(&bytes, held);
            if reads.unknown {
                return Ok(Computed::Unknown);
            }
            let Some((f, key)) = f.take().zip(key.take()) else {
                return Ok(Computed::Unknown);
            };
            let value = f(current);
            let encoded = self.inner.enc.encode_value(&value)?;
            Ok(Computed::Write {
                batch: Batch {
                    puts: vec![(bytes.clone(), encoded)],
                    ..Batch::default()
                },
                change: Change::Insert(key, value.clone()),
                known: Some(vec![value.clone()]),
                result: value,
            })
        })?;
        if let Some(value) = queued {
            return Ok(value);
        }
        let (Some(f), Some(key)) = (f, key) else {
            unreachable!("the closure and key are used only when the call is queued")
        };
        self.inner.exclusive("upsert", |w| {
            w.check_writable()?;
            let (batch, value) = w.plan_upsert(&self.inner.read(), &key, f)?;
            w.persist(batch)?;
            self.inner.write().insert(key, value.clone());
            Ok(value)
        })
    }

    /// A copy of the value of `key`; if the key is absent, first inserts the value `f`
    /// makes (see [`DbHashMap::get_or_insert_with`]). Group-committed, as `upsert`.
    pub fn get_or_insert_with(&self, key: K, f: impl FnOnce() -> V) -> Result<V>
    where
        V: Clone,
    {
        if let Some(value) = self.get(&key) {
            return Ok(value);
        }
        self.upsert(key, |held| match held {
            Some(value) => value.clone(),
            None => f(),
        })
    }

    /// Folds every pair into the map as one transaction (see
    /// [`DbHashMap::upsert_many`]). Group-committed, as `upsert`.
    pub fn upsert_many(
        &self,
        pairs: impl IntoIterator<Item = (K, V)>,
        f: impl FnMut(Option<&V>, V) -> V,
    ) -> Result<()> {
        self.inner.enter("upsert_many")?;
        let pairs: Vec<(K, V)> = pairs.into_iter().collect();
        if pairs.len() > PLANNED_KEYS {
            return self.upsert_many_exclusive(pairs, f);
        }
        let encoded: Vec<Vec<u8>> = self.inner.writer_free_plan(|enc, map| {
            pairs
                .iter()
                .map(|(k, _)| enc.encode_new_key(map, k))
                .collect()
        })?;
        let (mut f, mut pairs) = (Some(f), Some(pairs));
        let queued = self.inner.queue_computed("upsert_many", |reads| {
            let Some(given) = pairs.as_ref() else {
                return Ok(Computed::Unknown);
            };
            // Each key once, in first-seen order, with what it holds before the call.
            let mut index: HashMap<&K, usize> = HashMap::with_capacity(given.len());
            let mut currents: Vec<Option<&V>> = Vec::new();
            for ((k, _), bytes) in given.iter().zip(&encoded) {
                match index.get(k) {
                    Some(&at) => self.inner.enc.same_bytes(&encoded[at], bytes)?,
                    None => {
                        index.insert(k, currents.len());
                        currents.push(reads.current(bytes, k));
                    }
                }
            }
            if reads.unknown {
                return Ok(Computed::Unknown);
            }
            drop(index);
            let (Some(mut f), Some(given)) = (f.take(), pairs.take()) else {
                return Ok(Computed::Unknown);
            };
            // Each key's value folded in call order: the first on what it holds, the
            // next on the first's result.
            let mut slots: HashMap<K, usize> = HashMap::with_capacity(currents.len());
            let mut firsts: Vec<usize> = Vec::with_capacity(currents.len());
            let mut folded: Vec<Option<V>> = Vec::with_capacity(currents.len());
            for (i, (k, v)) in given.into_iter().enumerate() {
                let slot = match slots.get(&k) {
                    Some(&slot) => slot,
                    None => {
                        let slot = folded.len();
                        firsts.push(i);
                        slots.insert(k, slot);
                        folded.push(None);
                        slot
                    }
                };
                let before = folded[slot].take();
                let held = before.as_ref().or(currents[slot]);
                folded[slot] = Some(f(held, v));
            }
            let mut keys: Vec<Option<K>> = (0..folded.len()).map(|_| None).collect();
            for (k, slot) in slots {
                keys[slot] = Some(k);
            }
            let mut batch = Batch::default();
            let mut entries = Vec::with_capacity(folded.len());
            for ((k, value), first) in keys.into_iter().zip(folded).zip(firsts) {
                let (Some(k), Some(value)) = (k, value) else {
                    continue;
                };
                let bytes = encoded[first].clone();
                batch
                    .puts
                    .push((bytes, self.inner.enc.encode_value(&value)?));
                entries.push((k, value));
            }
            // `V` need not be `Clone` here: the values are not kept for the calls
            // queued after, whose reads of these keys wait for the commit.
            Ok(Computed::Write {
                batch,
                change: Change::InsertMany(entries),
                known: None,
                result: (),
            })
        })?;
        if queued.is_some() {
            return Ok(());
        }
        let (Some(f), Some(pairs)) = (f, pairs) else {
            unreachable!("the closure and pairs are used only when the call is queued")
        };
        self.upsert_many_exclusive(pairs, f)
    }

    fn upsert_many_exclusive(
        &self,
        pairs: Vec<(K, V)>,
        f: impl FnMut(Option<&V>, V) -> V,
    ) -> Result<()> {
        self.inner.exclusive("upsert_many", |w| {
            w.check_writable()?;
            let (batch, entries) = w.plan_upsert_many(&self.inner.read(), pairs, f)?;
            w.persist(batch)?;
            self.inner.write().extend(entries);
            Ok(())
        })
    }

    /// Changes the value of `key` with `f`, returning whether the key was present (see
    /// [`DbHashMap::update`]). Group-committed, as `upsert`: no other write of the map
    /// comes between the read and the commit.
    pub fn update<Q>(&self, key: &Q, f: impl FnOnce(&mut V)) -> Result<bool>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
        V: Clone,
    {
        let mut f = Some(f);
        let queued = self.inner.queue_computed("update", |reads| {
            // A key memory does not hold may be queued to come: the exclusive path
            // decides after it.
            let Some((held, _)) = reads.map.get_key_value(key) else {
                return Ok(Computed::Unknown);
            };
            let enc = &self.inner.enc;
            let bytes = enc.encode_key(held)?;
            let current = reads.current(&bytes, key);
            if reads.unknown {
                return Ok(Computed::Unknown);
            }
            // Memory holds the key and a change queued before removes it: whether it is
            // there depends on that change's outcome, which the exclusive path waits for.
            let Some(mut value) = current.cloned() else {
                return Ok(Computed::Unknown);
            };
            let Some(f) = f.take() else {
                return Ok(Computed::Unknown);
            };
            let owned = enc.copy_key(held)?.0;
            f(&mut value);
            let encoded = enc.encode_value(&value)?;
            Ok(Computed::Write {
                batch: Batch {
                    puts: vec![(bytes, encoded)],
                    ..Batch::default()
                },
                change: Change::Insert(owned, value.clone()),
                known: Some(vec![value]),
                result: true,
            })
        })?;
        if let Some(present) = queued {
            return Ok(present);
        }
        let Some(f) = f else {
            unreachable!("the closure is used only when the call is queued")
        };
        self.inner.exclusive("update", |w| {
            w.check_writable()?;
            let Some((batch, value)) = w.plan_update(&self.inner.read(), key, f)? else {
                return Ok(false);
            };
            w.persist(batch)?;
            if let Some(slot) = self.inner.write().get_mut(key) {
                *slot = value;
            }
            Ok(true)
        })
    }

    /// Runs `f` with a [`Transaction`] and commits what it staged as one database
    /// transaction (see [`DbHashMap::transaction`]). Readers see the map as it was until
    /// the commit, then all of the transaction at once. No other write comes between.
    ///
    /// Inside `f`, read and write through the transaction: a write through the map
    /// itself would wait for the transaction, which waits for `f`.
    pub fn transaction<R>(
        &self,
        f: impl FnOnce(&mut Transaction<'_, K, V, S>) -> Result<R>,
    ) -> Result<R> {
        self.inner.exclusive("transaction", |w| {
            w.check_writable()?;
            let (result, batch, staged) = {
                let map = self.inner.read();
                let mut tx = Transaction::new(&map, w);
                let result = f(&mut tx)?;
                let (batch, staged) = tx.finish();
                (result, batch, staged)
            };
            w.persist(batch)?;
            staged.apply(&mut self.inner.write());
            Ok(result)
        })
    }

    /// Re-reads the whole table (see [`DbHashMap::reload`]); readers see the old
    /// content until the new one replaces it in one step.
    pub fn reload(&self) -> Result<()>
    where
        S: Clone,
    {
        self.inner.exclusive("reload", |w| {
            w.flush()?;
            let hasher = self.inner.read().hasher().clone();
            let (fresh, version) = w.load_fresh(hasher)?;
            let old = std::mem::replace(&mut *self.inner.write(), fresh);
            drop(old);
            w.took_fresh(version);
            Ok(())
        })
    }

    /// Applies, as one step, what others committed since the last refresh, and returns
    /// how many keys changed (see [`DbHashMap::refresh`]); [`subscribe`](Self::subscribe)
    /// receivers hear which.
    pub fn refresh(&self) -> Result<usize>
    where
        S: Clone,
    {
        self.inner.refresh()
    }
}

impl<K, V, S> Inner<K, V, S>
where
    K: Eq + Hash,
    S: BuildHasher,
{
    /// Plans a group-committed change under the read lock, without taking the writer
    /// (which may be committing): the encoder does not change after opening. Whether
    /// the map refuses writes is checked when the group is committed.
    fn writer_free_plan<R>(
        &self,
        plan: impl FnOnce(&Encoder<K, V>, &HashMap<K, V, S>) -> Result<R>,
    ) -> Result<R> {
        plan(&self.enc, &self.read())
    }
}
