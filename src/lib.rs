//! A `HashMap` held in memory whose every change is written through to a database
//! table, and whose every lookup is served from memory.
//!
//! ```
//! use write_thru_hash::DbHashMap;
//!
//! let conn = rusqlite::Connection::open_in_memory()?;
//! let mut h: DbHashMap<String, i64> = DbHashMap::open(conn)?; // table "hashtable"
//! h.insert("a".into(), 1)?;          // persisted first, then applied in memory
//! h.insert("b".into(), 2)?;
//! h.remove("b")?;
//! assert_eq!(h.get("a"), Some(&1));  // memory only, no I/O, no Result
//! assert_eq!(format!("{h:?}"), r#"{"a": 1}"#);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! The drivers are re-exported (`write_thru_hash::rusqlite`, and `postgres`, `mysql`,
//! `odbc_api` under their features), so the connection types `open` takes are always
//! at hand at the right version.
//!
//! **One writer per table, or coherence.** A map opened plainly trusts that nothing
//! else writes its table: two maps on one table, or a map and another program, silently
//! diverge (one map's `clear()` deletes rows the other still holds in memory). Keep one
//! map per table, or call [`reload`](DbHashMap::reload) after others wrote, or open
//! every map with [`Builder::coherent`] and call [`refresh`](DbHashMap::refresh): it
//! brings in what every other writer (plain SQL included) committed since.
//!
//! **The write-through rule.** Every method that changes the map runs its statement
//! first; memory changes only when the statement succeeded. When it fails, the error
//! is returned and memory is exactly as before, so a fresh open of the same table
//! always equals the map.
//!
//! # Features
//!
//! | feature    | default | what it adds |
//! |------------|---------|--------------|
//! | `sqlite`   | yes     | SQLite through rusqlite: `rusqlite::Connection`, `sqlite:PATH`, `open_path` |
//! | `bundled`  | yes     | SQLite compiled in (rusqlite's `bundled`); without it, the SQLite that rusqlite links, such as an application's own |
//! | `postgres` | no      | PostgreSQL through the `postgres` crate: `postgres::Client`, `postgres://…` |
//! | `mysql`    | no      | MySQL and MariaDB through the `mysql` crate, pure Rust: `mysql::Conn`, `mysql://…` |
//! | `odbc`     | no      | ODBC through odbc-api and unixODBC: `odbc_api::Connection<'static>`, `odbc:CONNECTION-STRING` |
//! | `postcard` | no      | the compact binary codec `Postcard` (serde + postcard) |
//! | `tokio`    | no      | `SharedDbHashMap`'s `…_async` write methods, for async services |
//! | `metrics`  | no      | counters and timings through the `metrics` facade crate (names in the README, "In a service") |
//!
//! On docs.rs every item that needs a feature says which.
// docs.rs builds with `--cfg docsrs` on a nightly, where `doc_cfg` also labels each
// item with the features it needs (what `doc_auto_cfg` did before it was merged in).
#![cfg_attr(docsrs, feature(doc_cfg))]

mod blocked;
mod builder;
mod canonical;
mod codec;
mod error;
mod map;
mod metrics;
mod store;
mod url;
mod write_behind;

pub use builder::{Builder, DEFAULT_TABLE};
#[cfg(feature = "postcard")]
pub use codec::Postcard;
pub use codec::{Bytes, Codec, FnCodec, Format, Json, Text};
pub use error::{Action, BoxError, Error, Result};
pub use map::{DbHashMap, Event, Next, ReadGuard, SharedDbHashMap, Subscription, Transaction};
#[cfg(feature = "mysql")]
pub use store::mysql::MysqlStore;
#[cfg(feature = "odbc")]
pub use store::odbc::OdbcStore;
#[cfg(feature = "postgres")]
pub use store::postgres::PostgresStore;
#[cfg(feature = "sqlite")]
pub use store::sqlite::SqliteStore;
pub use store::{
    Batch, ChangeSignal, ChangeSink, Dialect, IntoStore, PutSource, Puts, RowSink, Store, TableSpec,
};
pub use write_behind::WriteBehind;

/// The [`Store`] a URL names (`sqlite:PATH`, `postgres://…`, `mysql://…`,
/// `odbc:CONNECTION-STRING`), connected with the settings [`DbHashMap::open_url`] uses
/// (SQLite: WAL and `synchronous = FULL`), for work on a table without a map: one key
/// ([`Store::get`]), a count, a scan in key order, a streamed load ([`Store::put_rows`]),
/// as the `wth` tool does at any table size. [`Store::open`] it with a [`TableSpec`]
/// first.
///
/// ```
/// use write_thru_hash::{connect, Batch, Format, TableSpec};
///
/// let mut store = connect("sqlite::memory:")?;
/// store.open(&TableSpec::new("hashtable", Format::Text, Format::Text))?;
/// let mut batch = Batch::default();
/// batch.puts.push((br#""a""#.to_vec(), b"1".to_vec()));
/// store.apply(&batch)?;
/// assert_eq!(store.get(br#""a""#)?, Some(b"1".to_vec()));
/// assert_eq!(store.count()?, 1);
/// # Ok::<(), write_thru_hash::Error>(())
/// ```
pub fn connect(url: &str) -> Result<Box<dyn Store>> {
    url::connect(url)
}

// The drivers, so users name exactly the types `open` takes, at the version it takes.
#[cfg(feature = "mysql")]
pub use mysql;
#[cfg(feature = "odbc")]
pub use odbc_api;
#[cfg(feature = "postgres")]
pub use postgres;
#[cfg(feature = "sqlite")]
pub use rusqlite;

/// Entry points for the fuzz targets in `fuzz/` (feature `fuzzing`); not part of the
/// public API.
#[cfg(feature = "fuzzing")]
#[doc(hidden)]
pub mod __fuzz {
    /// Parses a database URL as `open_url` would, without connecting.
    pub fn parse_url(url: &str) -> bool {
        crate::url::parse(url).is_ok()
    }

    /// Replaces the password in a URL or connection string with `***`.
    pub fn redact(url: &str) -> String {
        crate::error::redact(url)
    }
}

#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;
