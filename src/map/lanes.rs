//! A shared map's extra connections on a server, its *lanes*: a leader that finds the
//! map's writer busy commits its group on a lane, so that groups on different keys
//! commit at once instead of one after another. Lanes are opened as they are first
//! needed, up to [`Builder::connections`](crate::Builder::connections), and kept.

use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};

use super::writer::{Coherent, Encoder, Writer};
use crate::error::Result;

/// Where a lane's connection comes from: the map's URL, opened as the map was.
pub(crate) struct LaneSource {
    pub(crate) url: String,
    pub(crate) coherent: Option<Coherent>,
    /// Lanes at most, beside the map's writer.
    pub(crate) extra: usize,
}

/// The lanes of one shared map.
pub(crate) struct Lanes<K, V> {
    source: LaneSource,
    state: Mutex<State<K, V>>,
    returned: Condvar,
}

struct State<K, V> {
    idle: Vec<Writer<K, V>>,
    /// Lanes a leader holds now.
    out: usize,
    /// Lanes open, or being opened.
    made: usize,
    /// A call that needs the map to itself holds every lane: none is handed out.
    held: bool,
}

impl<K, V> Lanes<K, V> {
    pub(crate) fn new(source: LaneSource) -> Self {
        Lanes {
            source,
            state: Mutex::new(State {
                idle: Vec::new(),
                out: 0,
                made: 0,
                held: false,
            }),
            returned: Condvar::new(),
        }
    }

    /// How many lanes there may be beside the map's writer.
    pub(crate) fn extra(&self) -> usize {
        self.source.extra
    }

    fn state(&self) -> MutexGuard<'_, State<K, V>> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A lane for a leader: an idle one, or a new one while fewer than `extra` are open.
    /// `None` when every lane is out, a call holds them all, or a new one could not be
    /// opened (the leader then waits for the map's writer).
    pub(crate) fn take(&self, enc: &Arc<Encoder<K, V>>) -> Option<Writer<K, V>> {
        {
            let mut state = self.state();
            if state.held {
                return None;
            }
            if let Some(w) = state.idle.pop() {
                state.out += 1;
                return Some(w);
            }
            if state.made >= self.source.extra {
                return None;
            }
            state.made += 1;
            state.out += 1;
        }
        match self.open(enc) {
            Ok(w) => Some(w),
            Err(e) => {
                tracing::warn!(table = %enc.table.name, error = %e,
                    "a shared map could not open another connection; its groups take turns on the ones it has");
                let mut state = self.state();
                state.made -= 1;
                state.out -= 1;
                self.returned.notify_all();
                None
            }
        }
    }

    fn open(&self, enc: &Arc<Encoder<K, V>>) -> Result<Writer<K, V>> {
        let mut store = crate::url::connect(&self.source.url)?;
        store.open(&enc.table)?;
        if self.source.coherent.is_some() {
            store.enable_changes()?;
        }
        Ok(Writer::lane(enc, self.source.coherent, store))
    }

    /// A leader is done with a lane.
    pub(crate) fn give_back(&self, w: Writer<K, V>) {
        let mut state = self.state();
        state.out -= 1;
        state.idle.push(w);
        self.returned.notify_all();
    }

    /// Holds every lane until the guard is dropped, once those out have come back: no
    /// group commits on a lane meanwhile.
    pub(crate) fn hold(&self) -> HeldLanes<'_, K, V> {
        let mut state = self.state();
        state.held = true;
        while state.out > 0 {
            state = self
                .returned
                .wait(state)
                .unwrap_or_else(PoisonError::into_inner);
        }
        HeldLanes(self)
    }
}

/// Every lane, held (see [`Lanes::hold`]).
pub(crate) struct HeldLanes<'a, K, V>(&'a Lanes<K, V>);

impl<K, V> HeldLanes<'_, K, V> {
    /// Runs `f` on every open lane.
    pub(crate) fn each(&self, mut f: impl FnMut(&mut Writer<K, V>) -> Result<()>) -> Result<()> {
        self.0.state().idle.iter_mut().try_for_each(&mut f)
    }
}

impl<K, V> Drop for HeldLanes<'_, K, V> {
    fn drop(&mut self) {
        self.0.state().held = false;
    }
}
