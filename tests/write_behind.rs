//! Write-behind: ordering, a bounded backlog under a store slower than the writers, a
//! batch the database rejects and later accepts, a store that fails then recovers,
//! and close/drop flushing.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use write_thru_hash::{Batch, DbHashMap, Error, IntoStore, RowSink, Store, TableSpec, WriteBehind};

fn url(dir: &tempfile::TempDir) -> String {
    format!("sqlite:{}", dir.path().join("wb.sqlite").display())
}

fn reopen(url: &str) -> DbHashMap<String, i64> {
    DbHashMap::open_url(url).unwrap()
}

/// An error and its sources, as an error reporter prints them.
fn chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut next = e.source();
    while let Some(cause) = next {
        out.push_str(&format!(": {cause}"));
        next = cause.source();
    }
    out
}

/// A map whose table fails every write of the value 13 (a trigger's `RAISE`, a policy
/// that may be lifted, unlike a constraint on the value), until the trigger is
/// dropped: a failure write-behind keeps retrying, with a small backlog.
fn rejecting(
    dir: &tempfile::TempDir,
    wb: WriteBehind,
) -> (DbHashMap<String, i64>, rusqlite::Connection) {
    let mut h: DbHashMap<String, i64> = DbHashMap::builder_url(&url(dir))
        .write_behind(wb)
        .open()
        .unwrap();
    h.insert("warm".into(), 0).unwrap();
    h.flush().unwrap();
    let raw = rusqlite::Connection::open(dir.path().join("wb.sqlite")).unwrap();
    raw.execute_batch(
        "CREATE TRIGGER no13 BEFORE INSERT ON hashtable WHEN NEW.value = '13' \
         BEGIN SELECT RAISE(ABORT, 'no 13 today'); END",
    )
    .unwrap();
    (h, raw)
}

#[test]
fn a_caller_waiting_for_room_hears_of_the_failure() {
    let dir = tempfile::tempdir().unwrap();
    let wb = WriteBehind::default()
        .max_delay(Duration::from_millis(1))
        .max_backlog(4)
        .close_timeout(Duration::from_millis(100));
    let (mut h, _raw) = rejecting(&dir, wb);
    h.insert("bad".into(), 13).unwrap();
    // The backlog fills behind the batch the store keeps rejecting; the calls that wait
    // for room return the failure instead of waiting for as long as it lasts.
    let (tx, rx) = std::sync::mpsc::channel();
    let writer = std::thread::spawn(move || {
        let mut failures = 0;
        for i in 0..20 {
            if h.insert(format!("k{i}"), i).is_err() {
                failures += 1;
            }
        }
        tx.send(failures).unwrap();
        h
    });
    let failures = rx
        .recv_timeout(Duration::from_secs(20))
        .expect("callers waiting for room are not blocked by a failing store");
    assert!(failures > 0);
    let h = writer.join().unwrap();
    assert!(h.pending_writes() <= 4, "the backlog stayed bounded");
}

#[test]
fn a_failure_overcome_by_a_retry_is_not_reported_at_close() {
    let dir = tempfile::tempdir().unwrap();
    let wb = WriteBehind::default().max_delay(Duration::from_millis(1));
    let (mut h, raw) = rejecting(&dir, wb);
    h.insert("bad".into(), 13).unwrap();
    // Let the batch fail at least once, then let it through.
    std::thread::sleep(Duration::from_millis(50));
    raw.execute_batch("DROP TRIGGER no13").unwrap();
    let waited = std::time::Instant::now();
    while h.pending_writes() > 0 && waited.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(h.pending_writes(), 0, "the retry went through");
    let expected = (*h).clone();
    h.close()
        .expect("nothing is lost, so close reports nothing");
    assert_eq!(*reopen(&url(&dir)), expected);
}

#[test]
fn close_retries_until_the_store_takes_the_batch() {
    let dir = tempfile::tempdir().unwrap();
    let wb = WriteBehind::default()
        .max_delay(Duration::from_millis(1))
        .close_timeout(Duration::from_secs(10));
    let (mut h, raw) = rejecting(&dir, wb);
    h.insert("bad".into(), 13).unwrap();
    let expected = (*h).clone();
    // The store accepts the batch a second after close begins: well within its bound.
    let fixer = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_secs(1));
        raw.execute_batch("DROP TRIGGER no13").unwrap();
    });
    h.close()
        .expect("close kept retrying until the store took the batch");
    fixer.join().unwrap();
    assert_eq!(*reopen(&url(&dir)), expected);
}

#[test]
fn close_gives_up_after_its_timeout_and_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let wb = WriteBehind::default()
        .max_delay(Duration::from_millis(1))
        .close_timeout(Duration::from_millis(300));
    let (mut h, _raw) = rejecting(&dir, wb);
    h.insert("bad".into(), 13).unwrap();
    let err = h.close().unwrap_err();
    assert!(matches!(err, Error::Background { pending: 1, .. }), "{err}");
    assert!(err.to_string().contains("not written"), "{err}");
    assert!(!err.to_string().contains("retried"), "{err}");
}

/// A real store with faults added: a pause before every batch, and failures.
struct Faulty {
    inner: Box<dyn Store>,
    delay: Duration,
    fail_next: Arc<AtomicUsize>,
    batches: Arc<AtomicUsize>,
}

impl Store for Faulty {
    fn backend(&self) -> &'static str {
        self.inner.backend()
    }
    fn open(&mut self, table: &TableSpec) -> write_thru_hash::Result<()> {
        self.inner.open(table)
    }
    fn load(&mut self, sink: &mut RowSink<'_>) -> write_thru_hash::Result<()> {
        self.inner.load(sink)
    }
    fn apply(&mut self, batch: &Batch) -> write_thru_hash::Result<()> {
        std::thread::sleep(self.delay);
        if self.fail_next.load(Ordering::SeqCst) > 0 {
            self.fail_next.fetch_sub(1, Ordering::SeqCst);
            return Err(Error::Database {
                action: write_thru_hash::Action::Write,
                table: "wb".into(),
                backend: "test",
                source: "injected failure".into(),
            });
        }
        self.batches.fetch_add(1, Ordering::SeqCst);
        self.inner.apply(batch)
    }
}

fn faulty(
    dir: &tempfile::TempDir,
    delay: Duration,
) -> (Faulty, Arc<AtomicUsize>, Arc<AtomicUsize>) {
    let conn = rusqlite::Connection::open(dir.path().join("wb.sqlite")).unwrap();
    let fail = Arc::new(AtomicUsize::new(0));
    let batches = Arc::new(AtomicUsize::new(0));
    let store = Faulty {
        inner: conn.into_store(),
        delay,
        fail_next: Arc::clone(&fail),
        batches: Arc::clone(&batches),
    };
    (store, fail, batches)
}

#[test]
fn changes_land_in_order_and_coalesce() {
    let dir = tempfile::tempdir().unwrap();
    let (store, _, batches) = faulty(&dir, Duration::ZERO);
    let mut h: DbHashMap<String, i64> = DbHashMap::builder(store)
        .write_behind(WriteBehind::default().max_delay(Duration::from_secs(5)))
        .open()
        .unwrap();
    h.insert("gone".into(), 1).unwrap();
    h.remove("gone").unwrap(); // insert then remove of one key: the remove wins
    h.insert("kept".into(), 1).unwrap();
    h.insert("kept".into(), 2).unwrap(); // last write per key wins
    h.insert("back".into(), 1).unwrap();
    h.remove("back").unwrap();
    h.insert("back".into(), 3).unwrap(); // remove then insert: the insert wins
    h.clear().unwrap();
    h.insert("after clear".into(), 4).unwrap();
    h.transaction(|tx| {
        tx.insert("tx".into(), 5)?;
        tx.remove("after clear")
    })
    .unwrap();
    assert_eq!(h.len(), 1);
    assert!(
        h.pending_writes() > 0,
        "nothing is written before max_delay"
    );
    h.flush().unwrap();
    assert_eq!(h.pending_writes(), 0);
    assert_eq!(reopen(&url(&dir)), *h);
    assert_eq!(
        batches.load(Ordering::SeqCst),
        1,
        "all of it went in one coalesced batch"
    );
}

#[test]
fn backlog_stays_bounded_when_the_store_is_slower_than_the_writers() {
    let dir = tempfile::tempdir().unwrap();
    let (store, _, batches) = faulty(&dir, Duration::from_millis(20));
    let bound = 100;
    let mut h: DbHashMap<String, i64> = DbHashMap::builder(store)
        .write_behind(
            WriteBehind::default()
                .max_backlog(bound)
                .max_batch(50)
                .max_delay(Duration::from_millis(5)),
        )
        .open()
        .unwrap();
    let mut most = 0;
    for i in 0..2_000 {
        h.insert(format!("k{i}"), i).unwrap();
        most = most.max(h.pending_writes());
        assert!(
            h.pending_writes() <= bound,
            "backlog {} over its bound {bound}",
            h.pending_writes()
        );
    }
    h.flush().unwrap();
    assert!(
        most > bound / 2,
        "the writers did outrun the store (most {most})"
    );
    assert!(batches.load(Ordering::SeqCst) >= 2_000 / bound);
    assert_eq!(reopen(&url(&dir)), *h);
}

#[test]
fn a_store_that_fails_then_recovers_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let (store, fail, _) = faulty(&dir, Duration::ZERO);
    let mut h: DbHashMap<String, i64> = DbHashMap::builder(store)
        .write_behind(WriteBehind::default().max_delay(Duration::from_millis(1)))
        .open()
        .unwrap();
    fail.store(3, Ordering::SeqCst);
    h.insert("a".into(), 1).unwrap();
    // The failure is reported by a later call (and that call changes nothing) ...
    let mut reported = None;
    for i in 0..200 {
        std::thread::sleep(Duration::from_millis(2));
        match h.insert(format!("b{i}"), i) {
            Ok(_) => {}
            Err(e) => {
                reported = Some((i, e));
                break;
            }
        }
    }
    let (i, err) = reported.expect("the failure was reported");
    assert!(matches!(err, Error::Background { .. }), "{err}");
    assert!(err.to_string().contains("retried"), "{err}");
    assert!(
        !h.contains_key(&format!("b{i}")),
        "the reporting call did not apply its change"
    );
    // ... while the batch is retried until the store takes it (flush reports any
    // failure it sees on the way).
    assert!((0..10).any(|_| h.flush().is_ok()));
    assert_eq!(reopen(&url(&dir)), *h);
    assert_eq!(h["a"], 1);
}

#[test]
fn a_batch_that_fails_for_no_fault_of_its_changes_is_kept_until_it_is_accepted() {
    let dir = tempfile::tempdir().unwrap();
    let u = url(&dir);
    let (mut h, raw) = rejecting(
        &dir,
        WriteBehind::default().max_delay(Duration::from_millis(1)),
    );
    h.insert_many((0..50).map(|i| (format!("k{i}"), i)))
        .unwrap();
    let err = h.flush().unwrap_err();
    assert!(chain(&err).contains("no 13 today"), "{}", chain(&err));
    assert_eq!(
        reopen(&u).len(),
        1,
        "the failed batch was rolled back whole"
    );
    raw.execute_batch("DROP TRIGGER no13").unwrap();
    assert!((0..10).any(|_| h.flush().is_ok()));
    assert_eq!(reopen(&u), *h);
    assert_eq!(h.len(), 51);
}

/// Found by probing (issue 20): one value the table refuses (a CHECK constraint) held
/// back everything after it, for good: its batch was retried whole, the changes behind
/// it queued, `flush()` failed and `close()` gave up with the table empty. The refused
/// change is kept apart and reported once; the others are written; a later write of
/// the same key replaces it.
#[test]
fn a_change_the_table_refuses_is_kept_apart_and_holds_nothing_back() {
    let dir = tempfile::tempdir().unwrap();
    let u = url(&dir);
    let raw = rusqlite::Connection::open(dir.path().join("wb.sqlite")).unwrap();
    raw.execute_batch(
        "CREATE TABLE hashtable (key TEXT NOT NULL PRIMARY KEY, \
         value TEXT NOT NULL CHECK (value <> '\"bad\"'))",
    )
    .unwrap();
    let mut h: DbHashMap<String, String> = DbHashMap::builder_url(&u)
        .write_behind(WriteBehind::default().max_delay(Duration::from_millis(20)))
        .open()
        .unwrap();
    h.insert("good1".into(), "1".into()).unwrap();
    h.insert("bad".into(), "bad".into()).unwrap();
    h.insert("good2".into(), "2".into()).unwrap();
    let err = h.flush().unwrap_err();
    assert!(matches!(err, Error::Rejected { .. }), "{}", chain(&err));
    assert!(err.to_string().contains("bad"), "names the key: {err}");
    assert!(
        chain(&err).to_lowercase().contains("check"),
        "{}",
        chain(&err)
    );
    h.flush().expect("reported once; the rest is durable");
    h.insert("good3".into(), "3".into()).unwrap();
    assert_eq!(h.remove("bad").unwrap().as_deref(), Some("bad"));
    h.flush().unwrap();
    let table: DbHashMap<String, String> = DbHashMap::open_url(&u).unwrap();
    assert_eq!(table, *h);
    assert_eq!(h.len(), 3);
    h.close().expect("nothing is held back at close");
}

#[test]
fn close_and_drop_flush() {
    let dir = tempfile::tempdir().unwrap();
    let u = url(&dir);
    let wb = WriteBehind::default().max_delay(Duration::from_secs(60));
    let mut h: DbHashMap<String, i64> = DbHashMap::builder_url(&u).write_behind(wb).open().unwrap();
    h.insert("closed".into(), 1).unwrap();
    h.close().unwrap();
    let mut h: DbHashMap<String, i64> = DbHashMap::builder_url(&u).write_behind(wb).open().unwrap();
    h.insert("dropped".into(), 2).unwrap();
    drop(h);
    let expected = HashMap::from([("closed".to_string(), 1), ("dropped".to_string(), 2)]);
    assert_eq!(reopen(&u), expected);
}

#[test]
fn reload_flushes_first() {
    let dir = tempfile::tempdir().unwrap();
    let u = url(&dir);
    let mut h: DbHashMap<String, i64> = DbHashMap::builder_url(&u)
        .write_behind(WriteBehind::default().max_delay(Duration::from_secs(60)))
        .open()
        .unwrap();
    h.insert("a".into(), 1).unwrap();
    h.reload().unwrap();
    assert_eq!(h["a"], 1);
}
