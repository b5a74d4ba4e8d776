//! `Builder::watch`: a thread that refreshes a shared map when its table changes.
//!
//! It holds the map weakly, so that it stops once the last handle is dropped, and the
//! store strongly, to look at the table's version without taking the map's writer.

use std::hash::{BuildHasher, Hash};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use super::events::Event;
use super::shared::{Inner, SharedDbHashMap};
use super::writer::lock;
use crate::error::{Error, Result};
use crate::store::{ChangeSignal, Store};

/// How a watcher looks for changes.
#[derive(Debug, Clone, Copy)]
pub(crate) struct WatchConfig {
    /// How often `data_version` or the version is polled.
    pub(crate) every: Duration,
}

impl WatchConfig {
    /// The shortest poll: below it a watcher would spin.
    pub(crate) const MIN_EVERY: Duration = Duration::from_millis(1);
}

impl Default for WatchConfig {
    fn default() -> Self {
        WatchConfig {
            every: Duration::from_millis(5),
        }
    }
}

/// How long a signal is waited for before the version is looked at anyway: a missed
/// notification (a lost connection, a table whose triggers predate them) costs at most
/// this much delay.
const LOOK_ANYWAY: Duration = Duration::from_millis(250);

/// The longest pause between tries while the database fails.
const MAX_PAUSE: Duration = Duration::from_secs(2);

/// Starts the watcher thread of `map`.
pub(crate) fn start<K, V, S>(map: &SharedDbHashMap<K, V, S>, config: WatchConfig) -> Result<()>
where
    K: Eq + Hash + Send + Sync + 'static,
    V: Send + Sync + 'static,
    S: BuildHasher + Clone + Send + Sync + 'static,
{
    let inner = map.inner();
    let store = Arc::clone(&inner.writer_store());
    let table = map.table_name().to_string();
    let weak = Arc::downgrade(inner);
    let name = table.clone();
    // The signal is made before `open_shared` returns: a change committed right after
    // must not slip by before a listener is in place.
    let (signal, try_signal) = make_signal(&store, config, &table);
    std::thread::Builder::new()
        .name(format!("write-thru-hash watch {table}"))
        .spawn(move || run(&weak, &store, config, &name, signal, try_signal))
        .map(|_| ())
        .map_err(|e| Error::Background {
            table,
            pending: 0,
            abandoned: false,
            source: format!("starting the watcher thread: {e}").into(),
        })
}

/// The store's change signal, if it has one; on failure none yet, and when to try
/// again.
fn make_signal(
    store: &Mutex<Box<dyn Store>>,
    config: WatchConfig,
    table: &str,
) -> (Option<Box<dyn ChangeSignal>>, Option<Instant>) {
    match lock(store).change_signal(config.every) {
        Ok(signal) => (signal, None),
        Err(e) => {
            tracing::warn!(table, error = %e, "watch: no change signal; polling the version meanwhile");
            (None, Some(Instant::now() + MAX_PAUSE))
        }
    }
}

fn run<K, V, S>(
    weak: &Weak<Inner<K, V, S>>,
    store: &Mutex<Box<dyn Store>>,
    config: WatchConfig,
    table: &str,
    mut signal: Option<Box<dyn ChangeSignal>>,
    mut try_signal: Option<Instant>,
) where
    K: Eq + Hash,
    S: BuildHasher + Clone,
{
    let mut failures = 0u32;
    // A first look at once: a change made between the open and the signal's start.
    let mut first = true;
    loop {
        if try_signal.is_some_and(|at| at <= Instant::now()) {
            (signal, try_signal) = make_signal(store, config, table);
        }
        let mut signalled = None;
        if !std::mem::take(&mut first) {
            match &mut signal {
                Some(s) => {
                    let waited = s.wait(LOOK_ANYWAY);
                    if let Ok(true) = waited {
                        signalled = Some(Instant::now());
                    }
                    if let Err(e) = waited {
                        tracing::warn!(table, error = %e, "watch: the change signal failed; making it again");
                        signal = None;
                        try_signal = Some(Instant::now() + MAX_PAUSE);
                    }
                }
                None => std::thread::sleep(config.every),
            }
        }
        let Some(map) = weak.upgrade() else {
            return;
        };
        match look(&map, store, failures > 0) {
            Ok(changed) => {
                if changed > 0 {
                    crate::metrics::refresh_lag(table, signalled.map(|at| at.elapsed()));
                }
                if failures > 0 {
                    tracing::info!(table, "watch: the database answers again");
                    map.subscribers.send(|| Event::Recovered);
                }
                failures = 0;
            }
            Err(e) => {
                failures += 1;
                crate::metrics::watch_error(table);
                if failures.is_power_of_two() {
                    tracing::warn!(table, error = %e, failures, "watch: refreshing failed; trying again");
                    let said = e.to_string();
                    map.subscribers.send(|| Event::WatchError(said.clone()));
                }
                drop(map);
                std::thread::sleep(pause(failures));
            }
        }
    }
}

/// Refreshes the map if the table's version moved since it last looked; says how many
/// keys changed.
fn look<K, V, S>(
    map: &Inner<K, V, S>,
    store: &Mutex<Box<dyn Store>>,
    reconnect: bool,
) -> Result<usize>
where
    K: Eq + Hash,
    S: BuildHasher + Clone,
{
    let Some(seen) = map.seen() else {
        return Ok(0);
    };
    let now = {
        let mut store = lock(store);
        if reconnect {
            store.reconnect()?;
        }
        store.version()?
    };
    if now == seen {
        return Ok(0);
    }
    map.watch_refresh()
}

/// The pause after `failures` failures in a row: 50 ms, doubling, at most `MAX_PAUSE`.
fn pause(failures: u32) -> Duration {
    (Duration::from_millis(50) * 2u32.saturating_pow(failures.min(10))).min(MAX_PAUSE)
}
