//! Write-behind: changes reach memory at once and the table a little later, written by
//! a background thread in coalesced batches. The backlog is bounded; a failed batch is
//! kept and retried, never dropped, and its failure is reported by the next call.

use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::error::{show_bytes, Error, Result};
use crate::store::{Batch, BatchBuilder, Store};

/// The settings of write-behind mode, given to
/// [`Builder::write_behind`](crate::Builder::write_behind).
///
/// ```
/// use std::time::Duration;
/// use write_thru_hash::{DbHashMap, WriteBehind};
///
/// let mut h: DbHashMap<String, i64> = DbHashMap::builder_url("sqlite::memory:")
///     .write_behind(WriteBehind::default().max_delay(Duration::from_millis(10)))
///     .open()?;
/// h.insert("a".into(), 1)?; // in memory now, in the table within about 10 ms
/// h.flush()?;               // in the table now
/// h.close()?;
/// # Ok::<(), write_thru_hash::Error>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WriteBehind {
    max_delay: Duration,
    max_batch: usize,
    max_backlog: usize,
    close_timeout: Duration,
}

impl Default for WriteBehind {
    /// At most 50 ms late, batches of up to 10,000 changes, a backlog of 100,000, and
    /// 10 s of retries at close.
    fn default() -> Self {
        WriteBehind {
            max_delay: Duration::from_millis(50),
            max_batch: 10_000,
            max_backlog: 100_000,
            close_timeout: Duration::from_secs(10),
        }
    }
}

impl WriteBehind {
    /// The longest a change waits before the background thread writes it.
    pub fn max_delay(mut self, delay: Duration) -> Self {
        self.max_delay = delay;
        self
    }

    /// The number of waiting changes that starts a batch without waiting for
    /// `max_delay`.
    pub fn max_batch(mut self, changes: usize) -> Self {
        self.max_batch = changes.max(1);
        self
    }

    /// The most changes (after coalescing: one per key) that may wait; past it, callers
    /// wait for the background thread, so memory does not grow without end.
    pub fn max_backlog(mut self, changes: usize) -> Self {
        self.max_backlog = changes.max(1);
        self
    }

    /// How long `close` (and dropping the map) keeps retrying a failing store before it
    /// gives up on what is still queued and reports how much. This is the one bound on
    /// "never dropped": until `close`, a failed batch is retried for as long as it takes.
    pub fn close_timeout(mut self, timeout: Duration) -> Self {
        self.close_timeout = timeout;
        self
    }
}

/// The shortest and longest pause between two tries of a failed batch.
const FIRST_BACKOFF: Duration = Duration::from_millis(10);
const MAX_BACKOFF: Duration = Duration::from_secs(2);

struct State {
    pending: BatchBuilder,
    pending_since: Option<Instant>,
    /// Changes taken by the thread and not yet durable.
    in_flight: usize,
    /// Number of `enqueue` calls so far, and how many of them are durable.
    enqueued: u64,
    durable: u64,
    flush_requested: bool,
    closing: bool,
    /// Set by `close` when it stops waiting for a failing store.
    abandon: bool,
    /// A failure not yet reported to a caller.
    failure: Option<Error>,
    /// Changes the table refused, not yet reported to a caller. A refused change is
    /// not tried again, so it holds nothing back; a later change of its key is a change
    /// like any other.
    refusals: std::collections::VecDeque<Error>,
    /// The thread sleeps with nothing to do: the next change must wake it.
    idle: bool,
}

struct Shared {
    state: Mutex<State>,
    /// Wakes the thread: new changes, a flush, or closing.
    work: Condvar,
    /// Wakes callers: the backlog shrank, a batch became durable, or one failed.
    progress: Condvar,
    config: WriteBehind,
    table: String,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves plain data behind; carry on with it.
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// Flushes and counts a write-behind map's changes (see [`Behind::probe`]).
#[derive(Clone)]
pub(crate) struct Probe(Arc<Shared>);

impl Probe {
    /// Waits until everything queued so far is durable, or a batch fails.
    pub(crate) fn flush(&self) -> Result<()> {
        let s = &self.0;
        let mut state = s.lock();
        let target = state.enqueued;
        loop {
            if let Some(failure) = state.failure.take().or_else(|| state.refusals.pop_front()) {
                return Err(failure);
            }
            if state.durable >= target {
                return Ok(());
            }
            state.flush_requested = true;
            s.work.notify_one();
            state = s.progress.wait(state).unwrap_or_else(|p| p.into_inner());
        }
    }

    /// Changes queued or being written, one per key.
    pub(crate) fn pending(&self) -> usize {
        let state = self.0.lock();
        state.pending.len() + state.in_flight
    }
}

/// The map's side of write-behind: queues batches for the thread.
pub(crate) struct Behind {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

impl Behind {
    pub(crate) fn start(
        config: WriteBehind,
        table: String,
        store: Arc<Mutex<Box<dyn Store>>>,
    ) -> Result<Behind> {
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                pending: BatchBuilder::default(),
                pending_since: None,
                in_flight: 0,
                enqueued: 0,
                durable: 0,
                flush_requested: false,
                closing: false,
                abandon: false,
                failure: None,
                refusals: std::collections::VecDeque::new(),
                idle: true,
            }),
            work: Condvar::new(),
            progress: Condvar::new(),
            config,
            table: table.clone(),
        });
        let worker = Arc::clone(&shared);
        let thread = std::thread::Builder::new()
            .name(format!("write-thru-hash {table}"))
            .spawn(move || run(&worker, &store))
            .map_err(|e| Error::Background {
                table,
                pending: 0,
                abandoned: true,
                source: format!("starting the write-behind thread: {e}").into(),
            })?;
        Ok(Behind {
            shared,
            thread: Some(thread),
        })
    }

    /// Queues a batch, after reporting any failure not yet reported; waits while the
    /// backlog is full.
    pub(crate) fn enqueue(&self, batch: Batch) -> Result<()> {
        let s = &self.shared;
        let mut state = s.lock();
        if let Some(failure) = state.failure.take().or_else(|| state.refusals.pop_front()) {
            return Err(failure);
        }

        // The bound counts what the thread is writing too, so it holds for everything
        // not yet durable.
        while state.pending.len() + state.in_flight > 0
            && state.pending.len() + state.in_flight + batch.len() > s.config.max_backlog
        {
            state.flush_requested = true;
            s.work.notify_one();
            state = s.progress.wait(state).unwrap_or_else(|p| p.into_inner());
            // A caller waiting for room hears of a failure too, rather than waiting for
            // as long as the store keeps failing; its change is not queued.
            if let Some(failure) = state.failure.take() {
                return Err(failure);
            }
        }
        state.pending.add(batch);
        state.enqueued += 1;
        state.pending_since.get_or_insert_with(Instant::now);
        // Waking the thread costs a system call: only when it sleeps with nothing to do
        // (it then waits `max_delay`) or a batch is full.
        if state.idle || state.pending.len() >= s.config.max_batch {
            state.idle = false;
            s.work.notify_one();
        }
        Ok(())
    }

    /// Waits until everything queued so far is durable, or a batch fails.
    pub(crate) fn flush(&self) -> Result<()> {
        self.probe().flush()
    }

    /// Changes queued or being written, one per key.
    pub(crate) fn pending(&self) -> usize {
        self.probe().pending()
    }

    /// A handle that flushes and counts without the map: a shared map's callers use it
    /// without taking the map's writer.
    pub(crate) fn probe(&self) -> Probe {
        Probe(Arc::clone(&self.shared))
    }

    /// Flushes, then stops the thread. If the store keeps failing for longer than the
    /// close timeout, gives up on what is still queued and says how much.
    pub(crate) fn close(&mut self) -> Result<()> {
        let Some(thread) = self.thread.take() else {
            return Ok(());
        };
        let s = &self.shared;
        let deadline = Instant::now() + s.config.close_timeout;
        let result = loop {
            // Each failed try is reported to `flush`; the thread goes on retrying, so try
            // again until the deadline.
            match self.flush() {
                Err(e) if Instant::now() < deadline => {
                    tracing::warn!(table = %s.table, error = %e, "write-behind: retrying at close");
                }
                other => break other,
            }
        };
        {
            let mut state = s.lock();
            state.closing = true;
            if result.is_err() {
                state.abandon = true;
            }
            s.work.notify_one();
        }
        let _ = thread.join();
        let lost = self.pending();
        match result {
            Err(Error::Background { table, source, .. }) if lost > 0 => Err(Error::Background {
                table,
                pending: lost,
                abandoned: true,
                source,
            }),
            // Nothing was lost after all: the last try succeeded.
            Err(Error::Background { .. }) => Ok(()),
            other => other,
        }
    }
}

impl Drop for Behind {
    fn drop(&mut self) {
        if let Err(e) = self.close() {
            tracing::error!(table = %self.shared.table, error = %e, "write-behind: changes not written at close");
        }
    }
}

/// The background thread: takes the waiting changes as one batch, writes it, and on
/// failure keeps it and tries again with a growing pause.
fn run(s: &Shared, store: &Mutex<Box<dyn Store>>) {
    loop {
        let (batch, upto) = {
            let mut state = s.lock();
            loop {
                let ready = state.pending.len() > 0
                    && (state.flush_requested
                        || state.closing
                        || state.pending.len() >= s.config.max_batch
                        || state
                            .pending_since
                            .is_some_and(|t| t.elapsed() >= s.config.max_delay));
                if ready {
                    break;
                }
                if state.pending.len() == 0 {
                    // Everything queued is durable: tell flushers, who may be waiting
                    // for calls that coalesced into nothing.
                    state.durable = state.enqueued;
                    state.flush_requested = false;
                    s.progress.notify_all();
                    if state.closing {
                        return;
                    }
                    state.idle = true;
                    state = s.work.wait(state).unwrap_or_else(|p| p.into_inner());
                } else {
                    let waited = state.pending_since.map_or(Duration::ZERO, |t| t.elapsed());
                    let left = s.config.max_delay.saturating_sub(waited);
                    state = s
                        .work
                        .wait_timeout(state, left)
                        .unwrap_or_else(|p| p.into_inner())
                        .0;
                }
            }
            let batch = std::mem::take(&mut state.pending).finish();
            state.in_flight = batch.len();
            state.pending_since = None;
            state.flush_requested = false;
            // The backlog has room again.
            s.progress.notify_all();
            (batch, state.enqueued)
        };
        let mut backoff = FIRST_BACKOFF;
        let mut remaining = batch;
        loop {
            let result = write(s, store, remaining);
            let mut state = s.lock();
            match result {
                Ok(()) => {
                    state.in_flight = 0;
                    state.durable = upto;
                    // A failure that a retry has since overcome is no longer news.
                    state.failure = None;
                    s.progress.notify_all();
                    break;
                }
                Err(failed) => {
                    let (e, left) = *failed;
                    tracing::warn!(table = %s.table, error = %e, "write-behind batch failed; retrying");
                    state.failure = Some(Error::Background {
                        table: s.table.clone(),
                        pending: left.len() + state.pending.len(),
                        abandoned: false,
                        source: Box::new(e),
                    });
                    s.progress.notify_all();
                    if state.abandon {
                        return;
                    }
                    drop(
                        s.work
                            .wait_timeout(state, backoff)
                            .unwrap_or_else(|p| p.into_inner()),
                    );
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                    remaining = left;
                }
            }
        }
    }
}

/// Writes a batch. When the table refuses it for one of its changes (a constraint),
/// its changes are written one at a time, and those refused are kept apart and
/// reported, so that they hold nothing back. A failure that may pass (a lost
/// connection, a lock) gives back what is left to write.
fn write(
    s: &Shared,
    store: &Mutex<Box<dyn Store>>,
    batch: Batch,
) -> std::result::Result<(), Box<(Error, Batch)>> {
    let apply = |batch: &Batch| {
        let mut store = store.lock().unwrap_or_else(|p| p.into_inner());
        let result = store.apply(batch);
        if result.is_err() {
            // Upserts and deletes can be applied twice: a batch whose outcome is
            // unknown is simply written again, on a fresh connection if need be.
            let _ = store.reconnect();
        }
        result
    };
    match apply(&batch) {
        Ok(()) => return Ok(()),
        Err(e) if !e.is_rejection() => return Err(Box::new((e, batch))),
        Err(_) => {}
    }
    let mut singles = one_by_one(batch).into_iter();
    while let Some(single) = singles.next() {
        match apply(&single) {
            Ok(()) => {}
            Err(e) if e.is_rejection() => {
                let key = single
                    .puts
                    .first()
                    .map(|(k, _)| k.clone())
                    .or_else(|| single.deletes.first().cloned())
                    .unwrap_or_default();
                let shown = show_bytes(&key);
                tracing::warn!(table = %s.table, key = %shown, error = %e,
                    "write-behind: the table refused a change; kept apart, not retried");
                crate::metrics::rejected(&s.table);
                let mut state = s.lock();
                state.refusals.push_back(Error::Rejected {
                    table: s.table.clone(),
                    key: shown,
                    source: Box::new(e),
                });
                // A caller can hear of it at most this many times; older ones are said
                // in the log.
                while state.refusals.len() > MAX_REFUSALS_KEPT {
                    state.refusals.pop_front();
                }
            }
            Err(e) => {
                let mut left = BatchBuilder::default();
                left.add(single);
                for rest in singles {
                    left.add(rest);
                }
                return Err(Box::new((e, left.finish())));
            }
        }
    }
    Ok(())
}

/// The refusals kept for callers to hear; the log has them all.
const MAX_REFUSALS_KEPT: usize = 64;

/// A batch's changes, each a batch of its own, in an order that gives the same result
/// (a clear first).
fn one_by_one(batch: Batch) -> Vec<Batch> {
    let mut out = Vec::with_capacity(batch.len());
    if batch.clear {
        out.push(Batch {
            clear: true,
            ..Batch::default()
        });
    }
    for key in batch.deletes {
        out.push(Batch {
            deletes: vec![key],
            ..Batch::default()
        });
    }
    for put in batch.puts {
        out.push(Batch {
            puts: vec![put],
            ..Batch::default()
        });
    }
    out
}
