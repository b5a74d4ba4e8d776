//! Counters and timings through the `metrics` facade crate (feature `metrics`); without
//! the feature every function here is empty and compiles away. Every metric carries the
//! label `table`. The application installs a recorder (e.g. `metrics-exporter-prometheus`)
//! to see them; without one they cost an atomic load each.
//!
//! | name | kind | what |
//! |---|---|---|
//! | `wth_writes_total` | counter | batches written through (a group commit counts once), label `outcome` = `ok` or `error` |
//! | `wth_write_seconds` | histogram | time of one write through, retries and reconnections included |
//! | `wth_write_changes` | histogram | row changes per write (a group's size in rows) |
//! | `wth_group_calls` | histogram | calls committed together by one group commit of a shared map |
//! | `wth_conflict_retries_total` | counter | writes tried again after a deadlock, serialization or certification conflict |
//! | `wth_reconnects_total` | counter | connections made again after the old one was found gone |
//! | `wth_outcome_unknown_total` | counter | writes whose outcome was unknown (the connection died during the commit) |
//! | `wth_settled_total` | counter | unknown outcomes settled by reading the write's keys back |
//! | `wth_refresh_keys` | histogram | keys a refresh changed in memory |
//! | `wth_refresh_lag_seconds` | histogram | a watching map: time from the change signal to the change in memory |
//! | `wth_watch_errors_total` | counter | errors the background watcher met (it goes on) |
//! | `wth_rows_skipped_total` | counter | rows another program wrote that did not decode, left out by the watcher |
//! | `wth_rejected_total` | counter | write-behind changes the table refused, kept apart |

use std::time::Duration;

#[cfg(feature = "metrics")]
mod on {
    use std::time::Duration;

    pub(crate) fn count(name: &'static str, table: &str, n: u64) {
        metrics::counter!(name, "table" => table.to_owned()).increment(n);
    }

    pub(crate) fn record(name: &'static str, table: &str, value: f64) {
        metrics::histogram!(name, "table" => table.to_owned()).record(value);
    }

    pub(crate) fn wrote(table: &str, changes: usize, took: Duration, ok: bool) {
        let outcome = if ok { "ok" } else { "error" };
        metrics::counter!("wth_writes_total", "table" => table.to_owned(), "outcome" => outcome)
            .increment(1);
        record("wth_write_seconds", table, took.as_secs_f64());
        record("wth_write_changes", table, changes as f64);
    }
}

#[cfg(not(feature = "metrics"))]
mod on {
    use std::time::Duration;

    pub(crate) fn count(_: &'static str, _: &str, _: u64) {}
    pub(crate) fn record(_: &'static str, _: &str, _: f64) {}
    pub(crate) fn wrote(_: &str, _: usize, _: Duration, _: bool) {}
}

pub(crate) fn wrote(table: &str, changes: usize, took: Duration, ok: bool) {
    on::wrote(table, changes, took, ok);
}

pub(crate) fn group(table: &str, calls: usize) {
    on::record("wth_group_calls", table, calls as f64);
}

pub(crate) fn conflict_retried(table: &str) {
    on::count("wth_conflict_retries_total", table, 1);
}

pub(crate) fn reconnected(table: &str) {
    on::count("wth_reconnects_total", table, 1);
}

pub(crate) fn outcome_unknown(table: &str) {
    on::count("wth_outcome_unknown_total", table, 1);
}

pub(crate) fn settled(table: &str) {
    on::count("wth_settled_total", table, 1);
}

pub(crate) fn refreshed(table: &str, keys: usize) {
    on::record("wth_refresh_keys", table, keys as f64);
}

/// A watcher's refresh after a change signal: the time from the signal to the change
/// in memory (`None`: it looked without a signal, by polling).
pub(crate) fn refresh_lag(table: &str, lag: Option<Duration>) {
    if let Some(lag) = lag {
        on::record("wth_refresh_lag_seconds", table, lag.as_secs_f64());
    }
}

pub(crate) fn watch_error(table: &str) {
    on::count("wth_watch_errors_total", table, 1);
}

pub(crate) fn rows_skipped(table: &str, n: usize) {
    on::count("wth_rows_skipped_total", table, n as u64);
}

pub(crate) fn rejected(table: &str) {
    on::count("wth_rejected_total", table, 1);
}
