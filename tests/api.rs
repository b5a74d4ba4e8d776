//! The API around the map, on the embedded default: the re-exported driver, paths that
//! are not UTF-8, retryable errors, connection errors that keep the driver's error, and
//! `Debug` that shows no password.

use std::error::Error as _;

use write_thru_hash::{rusqlite, DbHashMap, Error};

#[test]
fn the_reexported_driver_opens_maps() {
    let conn = write_thru_hash::rusqlite::Connection::open_in_memory().unwrap();
    let mut h: DbHashMap<String, i64> = DbHashMap::open(conn).unwrap();
    h.insert("a".into(), 1).unwrap();
    assert_eq!(h["a"], 1);
}

#[cfg(unix)]
#[test]
fn open_path_takes_paths_that_are_not_utf8() {
    use std::os::unix::ffi::OsStrExt;
    let dir = tempfile::tempdir().unwrap();
    let path = dir
        .path()
        .join(std::ffi::OsStr::from_bytes(b"caf\xe9.sqlite"));
    let mut h: DbHashMap<String, i64> = DbHashMap::open_path(&path).unwrap();
    h.insert("a".into(), 1).unwrap();
    drop(h);
    let again: DbHashMap<String, i64> = DbHashMap::open_path(&path).unwrap();
    assert_eq!(again["a"], 1);
    let mode: String = rusqlite::Connection::open(&path)
        .unwrap()
        .query_row("PRAGMA journal_mode", [], |r| r.get(0))
        .unwrap();
    assert_eq!(mode, "wal", "the durable defaults of open_url");
}

#[test]
fn a_busy_database_is_retryable() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("busy.sqlite");
    // A connection without a busy timeout, as a user may hand over.
    let conn = rusqlite::Connection::open(&path).unwrap();
    conn.busy_timeout(std::time::Duration::ZERO).unwrap();
    let mut h: DbHashMap<String, i64> = DbHashMap::open(conn).unwrap();
    let other = rusqlite::Connection::open(&path).unwrap();
    other.execute_batch("BEGIN IMMEDIATE").unwrap();
    let err = h.insert("a".into(), 1).unwrap_err();
    assert!(err.is_retryable(), "{err}");
    assert!(h.is_empty());
    other.execute_batch("COMMIT").unwrap();
    h.insert("a".into(), 1).unwrap();
    let missing = DbHashMap::<String, i64>::open_url("nosuch:x").unwrap_err();
    assert!(!missing.is_retryable());
}

#[test]
fn connection_errors_keep_the_drivers_error() {
    let err = DbHashMap::<String, i64>::open_url("sqlite:/nonexistent/dir/x.sqlite").unwrap_err();
    assert!(matches!(err, Error::Connect { .. }), "{err}");
    let source = err.source().expect("a source");
    assert!(
        source.downcast_ref::<rusqlite::Error>().is_some(),
        "{source:?}"
    );
    assert!(
        !err.to_string().contains(&source.to_string()),
        "shown once: {err}"
    );
}

#[cfg(feature = "postgres")]
#[test]
fn postgres_connection_errors_keep_the_drivers_error() {
    let err =
        DbHashMap::<String, i64>::open_url("postgres://app:pa%2Fss@127.0.0.1:1/db").unwrap_err();
    let source = err.source().expect("a source");
    assert!(source
        .downcast_ref::<write_thru_hash::postgres::Error>()
        .is_some());
    let shown = format!("{err} {err:?} {source} {source:?}");
    assert!(
        !shown.contains("pa%2Fss") && !shown.contains("pa/ss"),
        "{shown}"
    );
    // Not encoded, the password's `/` would end the host part: refused, asking for
    // percent-encoding, without showing it.
    let err =
        DbHashMap::<String, i64>::open_url("postgres://app:pa/ss@127.0.0.1:1/db").unwrap_err();
    let shown = format!("{err} {err:?}");
    assert!(
        shown.contains("percent-encoded") && !shown.contains("pa/ss"),
        "{shown}"
    );
}

#[test]
fn debug_output_shows_no_password_and_what_is_staged() {
    let b = DbHashMap::<String, i64>::builder_url("postgres://app:hunter2@h/db").table("t");
    let shown = format!("{b:?}");
    assert!(
        shown.contains("\"t\"") && !shown.contains("hunter2"),
        "{shown}"
    );
    let mut h: DbHashMap<String, i64> = DbHashMap::open_url("sqlite::memory:").unwrap();
    h.insert("gone".into(), 0).unwrap();
    h.transaction(|tx| {
        tx.insert("a".into(), 1)?;
        tx.remove("gone")?;
        let shown = format!("{tx:?}");
        assert!(
            shown.contains("\"a\"") && shown.contains("\"gone\""),
            "{shown}"
        );
        Ok(())
    })
    .unwrap();
}

/// Maps opening one new SQLite file at once (the switch to WAL needs the file to
/// itself) all open it: 30 rounds of four, two of them coherent.
#[test]
fn a_new_sqlite_file_opened_by_four_at_once() {
    for _ in 0..30 {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite:{}", dir.path().join("new.db").display());
        std::thread::scope(|s| {
            let opens: Vec<_> = (0..4)
                .map(|i| {
                    let url = &url;
                    s.spawn(move || {
                        let b = DbHashMap::<String, i64>::builder_url(url).table("raced");
                        if i % 2 == 0 { b.coherent() } else { b }.open().map(drop)
                    })
                })
                .collect();
            for open in opens {
                if let Err(e) = open.join().unwrap() {
                    panic!("{e}: {:?}", e.source());
                }
            }
        });
    }
}

/// A slice reads a range of the key's index, never the whole table: found when an `OR`
/// of a text and a blob range made SQLite 3.54 scan the table (a 1% slice of 1,000,000
/// rows took 189 ms to open, 26 ms before).
#[test]
fn sqlite_slices_search_the_index() {
    use write_thru_hash::{Dialect, Format, TableSpec};
    let conn = rusqlite::Connection::open_in_memory().unwrap();
    conn.execute_batch(&Dialect::Sqlite.create_table(&TableSpec::new(
        "t",
        Format::Text,
        Format::Text,
    )))
    .unwrap();
    let slice = TableSpec::new("t", Format::Text, Format::Text).with_key_prefix("\"t42/");
    for sql in [
        Dialect::Sqlite.select_all(&slice),
        Dialect::Sqlite.delete_all(&slice),
    ] {
        let mut plan = conn.prepare(&format!("EXPLAIN QUERY PLAN {sql}")).unwrap();
        let steps: Vec<String> = plan
            .query_map([], |r| r.get::<_, String>(3))
            .unwrap()
            .map(Result::unwrap)
            .collect();
        assert!(
            steps.iter().all(|s| !s.starts_with("SCAN")),
            "{sql}: {steps:?}"
        );
        assert!(
            steps.iter().any(|s| s.contains("INDEX")),
            "{sql}: {steps:?}"
        );
    }
}

/// `Store::apply_seq`: the batches in order, in one transaction; one refused, none
/// applied. A shared map's group commit puts the runs of a group that write one key
/// twice in it, so that the database sees each value.
#[test]
fn sqlite_apply_seq_is_all_or_nothing_and_in_order() {
    use write_thru_hash::{Batch, Format, TableSpec};
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite:{}", dir.path().join("seq.db").display());
    let mut store = write_thru_hash::connect(&url).unwrap();
    store
        .open(&TableSpec::new("t", Format::Text, Format::Text))
        .unwrap();
    assert!(store.applies_seq());
    let put = |k: &str, v: &str| {
        let mut b = Batch::default();
        b.puts.push((k.as_bytes().to_vec(), v.as_bytes().to_vec()));
        b
    };
    store.apply_seq(&[put("k", "1"), put("k", "2")]).unwrap();
    assert_eq!(store.get(b"k").unwrap(), Some(b"2".to_vec()));
    let conn = rusqlite::Connection::open(dir.path().join("seq.db")).unwrap();
    conn.execute_batch(
        "CREATE TRIGGER no13 BEFORE UPDATE ON t WHEN NEW.value = '13' \
         BEGIN SELECT RAISE(ABORT, 'no 13'); END",
    )
    .unwrap();
    let refused = store.apply_seq(&[put("k", "3"), put("j", "1"), put("k", "13"), put("k", "4")]);
    assert!(refused.is_err(), "{refused:?}");
    assert_eq!(store.get(b"k").unwrap(), Some(b"2".to_vec()));
    assert_eq!(store.get(b"j").unwrap(), None);
}
