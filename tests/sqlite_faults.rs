//! SQLite under real faults: a read-only connection, a lock held by another
//! connection (statements and commits).
//! Each call either succeeds or returns a clear error; memory always equals the table.

use std::collections::HashMap;
use std::time::Duration;

use rusqlite::{Connection, OpenFlags};
use write_thru_hash::{DbHashMap, Error};

fn setup() -> (tempfile::TempDir, std::path::PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("faults.sqlite");
    (dir, path)
}

fn reopen(path: &std::path::Path) -> DbHashMap<String, i64> {
    DbHashMap::open(Connection::open(path).unwrap()).unwrap()
}

#[test]
fn sqlite_read_only_connection_reads_but_refuses_writes() {
    let (_dir, path) = setup();
    let mut h = reopen(&path);
    h.insert_many([("a".into(), 1), ("b".into(), 2)]).unwrap();
    drop(h);

    let ro = Connection::open_with_flags(&path, OpenFlags::SQLITE_OPEN_READ_ONLY).unwrap();
    let mut h: DbHashMap<String, i64> = DbHashMap::open(ro).unwrap();
    let before: HashMap<String, i64> = (*h).clone();
    assert_eq!(before.len(), 2);

    let err = h.insert("c".into(), 3).unwrap_err();
    assert!(matches!(err, Error::Database { .. }), "{err}");
    assert!(
        err.to_string().contains("read-only"),
        "says what to do: {err}"
    );
    assert!(h.remove("a").is_err());
    assert!(h.clear().is_err());
    assert!(h.update("a", |v| *v += 1).is_err());
    assert!(h.insert_many([("x".into(), 9)]).is_err());
    assert!(h.transaction(|tx| tx.insert("y".into(), 1)).is_err());
    assert_eq!(*h, before);
    assert_eq!(reopen(&path), before);
}

#[test]
fn sqlite_read_only_connection_cannot_create_a_table() {
    let (_dir, path) = setup();
    Connection::open(&path)
        .unwrap()
        .execute_batch("CREATE TABLE other (x)")
        .unwrap();
    let ro = Connection::open_with_flags(&path, OpenFlags::SQLITE_OPEN_READ_ONLY).unwrap();
    let err = DbHashMap::<String, i64>::open(ro).unwrap_err();
    assert!(err.to_string().contains("hashtable"), "{err}");
}

#[test]
fn sqlite_locked_by_another_connection() {
    let (_dir, path) = setup();
    let conn = Connection::open(&path).unwrap();
    conn.busy_timeout(Duration::from_millis(50)).unwrap();
    let mut h: DbHashMap<String, i64> = DbHashMap::open(conn).unwrap();
    h.insert("a".into(), 1).unwrap();
    let before: HashMap<String, i64> = (*h).clone();

    let other = Connection::open(&path).unwrap();
    other.execute_batch("BEGIN EXCLUSIVE").unwrap();
    let err = h.insert("b".into(), 2).unwrap_err();
    assert!(err.to_string().contains("lock"), "{err}");
    assert!(h.insert_many([("c".into(), 3), ("d".into(), 4)]).is_err());
    assert!(h.remove("a").is_err());
    assert_eq!(*h, before);
    other.execute_batch("COMMIT").unwrap();

    // The lock is gone: the map goes on, and the table holds what the map holds.
    h.insert("b".into(), 2).unwrap();
    assert_eq!(reopen(&path), *h);
}

#[test]
fn sqlite_commit_blocked_by_a_reader_in_rollback_journal_mode() {
    let (_dir, path) = setup();
    let conn = Connection::open(&path).unwrap();
    conn.pragma_update(None, "journal_mode", "DELETE").unwrap();
    conn.busy_timeout(Duration::from_millis(50)).unwrap();
    let mut h: DbHashMap<String, i64> = DbHashMap::open(conn).unwrap();
    h.insert("a".into(), 1).unwrap();
    let before: HashMap<String, i64> = (*h).clone();

    // A reader mid-transaction holds a SHARED lock: writers may prepare their changes
    // but cannot COMMIT them until it is gone.
    let reader = Connection::open(&path).unwrap();
    reader.execute_batch("BEGIN").unwrap();
    let n: i64 = reader
        .query_row("SELECT count(*) FROM hashtable", [], |r| r.get(0))
        .unwrap();
    assert_eq!(n, 1);

    let err = h
        .insert_many((0..100).map(|i| (format!("k{i}"), i)))
        .unwrap_err();
    assert!(err.to_string().contains("lock"), "{err}");
    assert!(h.insert("single".into(), 1).is_err());
    assert!(h.transaction(|tx| tx.insert("t".into(), 1)).is_err());
    assert_eq!(*h, before);
    reader.execute_batch("COMMIT").unwrap();

    assert_eq!(
        reopen(&path),
        before,
        "nothing of the blocked commits reached the file"
    );
    h.insert("after".into(), 5).unwrap();
    assert_eq!(reopen(&path), *h);
}

#[test]
fn sqlite_wrong_column_types_are_decode_errors() {
    let (_dir, path) = setup();
    // A table made elsewhere, without column types: SQLite keeps numbers as numbers.
    let raw = Connection::open(&path).unwrap();
    raw.execute_batch(
        "CREATE TABLE hashtable (key NOT NULL, value, PRIMARY KEY (key));
         INSERT INTO hashtable (key, value) VALUES ('\"n\"', 5)",
    )
    .unwrap();
    let err = DbHashMap::<String, i64>::open(Connection::open(&path).unwrap()).unwrap_err();
    assert!(matches!(err, Error::Decode { what: "value", .. }), "{err}");
    assert!(
        err.to_string().contains("number or NULL") && err.to_string().contains("hashtable"),
        "{err}"
    );
    raw.execute_batch("UPDATE hashtable SET value = NULL")
        .unwrap();
    let err = DbHashMap::<String, i64>::open(Connection::open(&path).unwrap()).unwrap_err();
    assert!(matches!(err, Error::Decode { what: "value", .. }), "{err}");
    raw.execute_batch("DELETE FROM hashtable; INSERT INTO hashtable (key, value) VALUES (7, '1')")
        .unwrap();
    let err = DbHashMap::<String, i64>::open(Connection::open(&path).unwrap()).unwrap_err();
    assert!(matches!(err, Error::Decode { what: "key", .. }), "{err}");
}

#[test]
fn sqlite_busy_timeout_waits_for_a_lock_to_go() {
    let (_dir, path) = setup();
    let conn = Connection::open(&path).unwrap();
    conn.busy_timeout(Duration::from_secs(5)).unwrap();
    let mut h: DbHashMap<String, i64> = DbHashMap::open(conn).unwrap();
    let other = Connection::open(&path).unwrap();
    other.execute_batch("BEGIN EXCLUSIVE").unwrap();
    let release = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(200));
        other.execute_batch("COMMIT").unwrap();
    });
    // Within its busy timeout the write waits for the lock instead of failing.
    let start = std::time::Instant::now();
    h.insert("waited".into(), 1).unwrap();
    assert!(start.elapsed() >= Duration::from_millis(150));
    release.join().unwrap();
    assert_eq!(reopen(&path), *h);
}
