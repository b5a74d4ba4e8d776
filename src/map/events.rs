//! What a shared map tells its subscribers: the keys each refresh changed, and what its
//! background work met (rows that did not decode, errors, recoveries, full reloads).
//! Each subscription is bounded: a subscriber that does not keep up loses the oldest
//! events and is told how many with [`Event::Lagged`], never grows memory without end.

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, Weak};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

/// Something a shared map's refreshes or background work met, as
/// [`SharedDbHashMap::subscribe`](crate::SharedDbHashMap::subscribe) hands it over.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Event<K> {
    /// A refresh (by [`refresh`](crate::SharedDbHashMap::refresh) or the watcher of
    /// [`Builder::watch`](crate::Builder::watch)) changed these keys in memory.
    Changed(Vec<K>),
    /// The watcher left out a row another program wrote that does not decode (its key
    /// keeps the value it had in memory); the row is taken once it is fixed. The key as
    /// stored, and why it did not decode.
    Skipped {
        /// The stored key, shown as text or hex.
        key: String,
        /// Why the row did not decode.
        reason: String,
    },
    /// The background watcher met an error; it keeps trying, with a growing pause.
    WatchError(String),
    /// The database answers the watcher again after errors.
    Recovered,
    /// The map fell behind the change log's compaction and re-read the whole table.
    Reloaded,
    /// This subscriber did not keep up: that many events were dropped, the oldest
    /// first. Anything may have changed meanwhile: read what you need from the map.
    Lagged(usize),
}

/// The events a subscriber holds at most unless it asks for another bound.
pub(crate) const DEFAULT_CAPACITY: usize = 1024;

struct State<K> {
    queue: VecDeque<Event<K>>,
    lagged: usize,
    wakers: Vec<Waker>,
    /// The map is gone: nothing more will come.
    closed: bool,
}

pub(crate) struct Channel<K> {
    state: Mutex<State<K>>,
    ready: Condvar,
    capacity: usize,
}

impl<K> Channel<K> {
    fn lock(&self) -> MutexGuard<'_, State<K>> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn wake(&self, mut state: MutexGuard<'_, State<K>>) {
        let wakers = std::mem::take(&mut state.wakers);
        drop(state);
        self.ready.notify_all();
        for w in wakers {
            w.wake();
        }
    }
}

/// The map's side: the subscribers it tells, held weakly, so that a dropped
/// [`Subscription`] is forgotten.
pub(crate) struct Subscribers<K> {
    list: Mutex<Vec<Weak<Channel<K>>>>,
}

impl<K> Default for Subscribers<K> {
    fn default() -> Self {
        Subscribers {
            list: Mutex::new(Vec::new()),
        }
    }
}

impl<K> Subscribers<K> {
    pub(crate) fn add(&self, capacity: usize) -> Subscription<K> {
        let channel = Arc::new(Channel {
            state: Mutex::new(State {
                queue: VecDeque::new(),
                lagged: 0,
                wakers: Vec::new(),
                closed: false,
            }),
            ready: Condvar::new(),
            capacity: capacity.max(1),
        });
        self.lock().push(Arc::downgrade(&channel));
        Subscription { channel }
    }

    /// Whether anyone listens: events are made only then.
    pub(crate) fn any(&self) -> bool {
        !self.lock().is_empty()
    }

    /// Hands each subscriber the event `make` makes (one each: keys need not be
    /// `Clone`).
    pub(crate) fn send(&self, make: impl Fn() -> Event<K>) {
        let mut list = self.lock();
        list.retain(|weak| {
            let Some(channel) = weak.upgrade() else {
                return false;
            };
            let mut state = channel.lock();
            if state.queue.len() >= channel.capacity {
                state.queue.pop_front();
                state.lagged += 1;
            }
            state.queue.push_back(make());
            channel.wake(state);
            true
        });
    }

    fn lock(&self) -> MutexGuard<'_, Vec<Weak<Channel<K>>>> {
        self.list
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

impl<K> Drop for Subscribers<K> {
    fn drop(&mut self) {
        for weak in self
            .list
            .get_mut()
            .unwrap_or_else(|p| p.into_inner())
            .drain(..)
        {
            if let Some(channel) = weak.upgrade() {
                let mut state = channel.lock();
                state.closed = true;
                channel.wake(state);
            }
        }
    }
}

/// A bounded stream of a shared map's [`Event`]s, from
/// [`SharedDbHashMap::subscribe`](crate::SharedDbHashMap::subscribe). Read it with
/// [`recv`](Self::recv) from a thread, or await [`next`](Self::next) from async code
/// (any runtime: no thread is needed). Dropping it unsubscribes.
pub struct Subscription<K> {
    channel: Arc<Channel<K>>,
}

impl<K> std::fmt::Debug for Subscription<K> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let state = self.channel.lock();
        f.debug_struct("Subscription")
            .field("queued", &state.queue.len())
            .field("capacity", &self.channel.capacity)
            .finish()
    }
}

impl<K> Subscription<K> {
    fn take(state: &mut State<K>) -> Option<Event<K>> {
        if state.lagged > 0 {
            return Some(Event::Lagged(std::mem::take(&mut state.lagged)));
        }
        state.queue.pop_front()
    }

    /// The next event, waiting for it; `None` once the map is gone (every handle
    /// dropped) and nothing is left.
    pub fn recv(&self) -> Option<Event<K>> {
        let mut state = self.channel.lock();
        loop {
            if let Some(event) = Self::take(&mut state) {
                return Some(event);
            }
            if state.closed {
                return None;
            }
            state = self
                .channel
                .ready
                .wait(state)
                .unwrap_or_else(std::sync::PoisonError::into_inner);
        }
    }

    /// The next event, waiting at most `timeout`; `None` if none came (or the map is
    /// gone).
    pub fn recv_timeout(&self, timeout: Duration) -> Option<Event<K>> {
        let deadline = Instant::now() + timeout;
        let mut state = self.channel.lock();
        loop {
            if let Some(event) = Self::take(&mut state) {
                return Some(event);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if state.closed || left.is_zero() {
                return None;
            }
            state = self
                .channel
                .ready
                .wait_timeout(state, left)
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .0;
        }
    }

    /// The next event if one is waiting.
    pub fn try_recv(&self) -> Option<Event<K>> {
        Self::take(&mut self.channel.lock())
    }

    /// The next event, for async code: a future woken by the map's own thread, on any
    /// runtime. `None` once the map is gone and nothing is left.
    pub fn next(&self) -> Next<'_, K> {
        Next { sub: self }
    }
}

/// The future of [`Subscription::next`].
#[derive(Debug)]
#[must_use = "futures do nothing unless awaited"]
pub struct Next<'a, K> {
    sub: &'a Subscription<K>,
}

impl<K> Future for Next<'_, K> {
    type Output = Option<Event<K>>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut state = self.sub.channel.lock();
        if let Some(event) = Subscription::take(&mut state) {
            return Poll::Ready(Some(event));
        }
        if state.closed {
            return Poll::Ready(None);
        }
        if !state.wakers.iter().any(|w| w.will_wake(cx.waker())) {
            state.wakers.push(cx.waker().clone());
        }
        Poll::Pending
    }
}
