//! Real faults, each call either succeeding or returning a clear error, and memory
//! equal to the table afterwards: the disk fills up (a size-limited tmpfs), the
//! database file turns read-only under an open map (the immutable attribute, which
//! stops root too), and the PostgreSQL server is stopped and started again mid-run
//! (write-through and write-behind).
//!
//! Mounting, `chattr` and `runuser` need root, as CI and `scripts/test.sh` have;
//! without it these tests fail and say so rather than skip.

#[cfg(feature = "postgres")]
#[path = "conformance/proxy.rs"]
#[allow(dead_code)]
mod proxy;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use write_thru_hash::{DbHashMap, Error};

fn run(cmd: &str, args: &[&str]) {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{cmd}: {e}"));
    assert!(
        out.status.success(),
        "{cmd} {args:?} failed (these tests need root, as scripts/test.sh has): {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A tmpfs of `size` mounted on a new directory, unmounted when dropped.
struct SmallDisk {
    dir: tempfile::TempDir,
}

impl SmallDisk {
    fn new(size: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        run(
            "mount",
            &[
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size}"),
                "tmpfs",
                dir.path().to_str().unwrap(),
            ],
        );
        SmallDisk { dir }
    }
    fn path(&self) -> &Path {
        self.dir.path()
    }
    fn grow(&self, opts: &str) {
        run(
            "mount",
            &[
                "-o",
                &format!("remount,{opts}"),
                self.path().to_str().unwrap(),
            ],
        );
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(self.dir.path()).status();
    }
}

fn url(dir: &Path) -> String {
    format!("sqlite:{}", dir.join("db.sqlite").display())
}

fn reopen(url: &str) -> HashMap<String, String> {
    (*DbHashMap::<String, String>::open_url(url).unwrap()).clone()
}

#[test]
fn sqlite_disk_full() {
    let disk = SmallDisk::new("384k");
    let u = url(disk.path());
    let mut h: DbHashMap<String, String> = DbHashMap::open_url(&u).unwrap();
    let value = "x".repeat(8 * 1024);
    let mut failures = 0;
    let mut first_error = None;
    for i in 0..200 {
        let before = (*h).clone();
        let result = if i % 3 == 0 {
            h.insert_many((0..4).map(|j| (format!("b{i}-{j}"), value.clone())))
        } else {
            h.insert(format!("k{i}"), value.clone()).map(drop)
        };
        if let Err(e) = result {
            failures += 1;
            assert_eq!(*h, before, "a failed call changed memory: {e}");
            first_error.get_or_insert(e);
        }
    }
    let err = first_error.expect("the disk filled up");
    assert!(matches!(err, Error::Database { .. }), "{err}");
    assert!(
        err.to_string().contains("full"),
        "says the disk is full: {err}"
    );
    assert!(failures > 10);
    assert_eq!(reopen(&u), *h, "the table holds what the map holds");

    // Space comes back: the map goes on.
    disk.grow("size=8m");
    h.insert("after".into(), value.clone()).unwrap();
    h.insert_many((0..10).map(|j| (format!("more{j}"), value.clone())))
        .unwrap();
    assert_eq!(reopen(&u), *h);
}

/// Sets or clears the immutable attribute: even root cannot write the file then, not
/// even through a descriptor opened before.
fn immutable(path: &Path, on: bool) {
    run(
        "chattr",
        &[if on { "+i" } else { "-i" }, path.to_str().unwrap()],
    );
}

#[test]
fn sqlite_file_turns_read_only_under_an_open_map() {
    // Under target/, not /tmp: a tmpfs /tmp would not take the attribute.
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let path = dir.path().join("db.sqlite");
    let conn = rusqlite::Connection::open(&path).unwrap();
    conn.pragma_update(None, "journal_mode", "DELETE").unwrap();
    let mut h: DbHashMap<String, String> = DbHashMap::open(conn).unwrap();
    h.insert("a".into(), "1".into()).unwrap();
    immutable(&path, true);
    let before = (*h).clone();
    let results = [
        h.insert("b".into(), "2".into()).map(drop),
        h.insert_many([("c".to_string(), "3".to_string())]),
        h.remove("a").map(drop),
        h.clear(),
        h.transaction(|tx| tx.insert("d".into(), "4".into()))
            .map(drop),
    ];
    immutable(&path, false);
    for r in &results {
        let err = r.as_ref().unwrap_err();
        assert!(matches!(err, Error::Database { .. }), "{err}");
    }
    assert_eq!(*h, before, "memory unchanged");
    assert_eq!(
        reopen(&format!("sqlite:{}", path.display())),
        before,
        "the table too"
    );
    h.insert("b".into(), "2".into()).unwrap();
    assert_eq!(reopen(&format!("sqlite:{}", path.display())), *h);
}

/// A PostgreSQL server of the test's own, to stop and start at will.
#[cfg(feature = "postgres")]
struct OwnPostgres {
    dir: tempfile::TempDir,
    port: u16,
}

#[cfg(feature = "postgres")]
impl OwnPostgres {
    const BIN: &'static str = "/usr/lib/postgresql/15/bin";

    fn as_postgres(cmd: &str, args: &[&str]) {
        let bin = format!("{}/{cmd}", Self::BIN);
        let mut all = vec!["-u", "postgres", "--", bin.as_str()];
        all.extend_from_slice(args);
        run("runuser", &all);
    }

    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        run("chown", &["postgres", dir.path().to_str().unwrap()]);
        let data = dir.path().join("data");
        Self::as_postgres(
            "initdb",
            &[
                "-D",
                data.to_str().unwrap(),
                "-U",
                "postgres",
                "--auth=trust",
            ],
        );
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let pg = OwnPostgres { dir, port };
        pg.start();
        pg
    }

    fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn start(&self) {
        let opts = format!(
            "-c listen_addresses=127.0.0.1 -p {} -k {}",
            self.port,
            self.dir.path().display()
        );
        let log = self.dir.path().join("log");
        Self::as_postgres(
            "pg_ctl",
            &[
                "-D",
                self.data().to_str().unwrap(),
                "-l",
                log.to_str().unwrap(),
                "-w",
                "-o",
                &opts,
                "start",
            ],
        );
    }

    fn stop(&self) {
        Self::as_postgres(
            "pg_ctl",
            &[
                "-D",
                self.data().to_str().unwrap(),
                "-m",
                "fast",
                "-w",
                "stop",
            ],
        );
    }

    fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }
}

#[cfg(feature = "postgres")]
impl Drop for OwnPostgres {
    fn drop(&mut self) {
        let _ = Command::new("runuser")
            .args([
                "-u",
                "postgres",
                "--",
                &format!("{}/pg_ctl", Self::BIN),
                "-D",
            ])
            .arg(self.data())
            .args(["-m", "immediate", "stop"])
            .output();
    }
}

#[cfg(feature = "postgres")]
#[test]
fn postgres_server_stopped_mid_run() {
    let pg = OwnPostgres::new();
    let u = pg.url();
    let mut h: DbHashMap<String, String> = DbHashMap::open_url(&u).unwrap();
    h.insert_many((0..20).map(|i| (format!("k{i}"), i.to_string())))
        .unwrap();
    pg.stop();
    let before = (*h).clone();
    let err = h.insert("down".into(), "x".into()).unwrap_err();
    assert!(!err.to_string().is_empty());
    assert!(h
        .insert_many([("down2".to_string(), "y".to_string())])
        .is_err());
    assert!(h.remove("k1").is_err());
    assert_eq!(*h, before, "memory unchanged while the server is down");
    pg.start();
    // The map reconnects by itself: no reload.
    h.insert("up".into(), "z".into())
        .expect("a URL map writes again once the server is back");
    let fresh: DbHashMap<String, String> = DbHashMap::open_url(&u).unwrap();
    assert_eq!(fresh, *h);
}

/// The soak of `tests/heal.rs` with the rest of what a server's life brings: through a
/// proxy in front of a server of the test's own, three threads write through a shared
/// map while, in turns, every connection is cut, the network pauses for half a second,
/// and the server is stopped and started again. Calls fail only while the server is
/// down (with nothing written) or with an unknown outcome (settled by the next call);
/// every acknowledged write is in the table, the map equals it, and nothing needed
/// `reload()`.
#[cfg(feature = "postgres")]
#[test]
fn postgres_soak_through_restarts_pauses_and_cuts() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use write_thru_hash::{Error, SharedDbHashMap};

    let pg = OwnPostgres::new();
    let (proxy, url) = proxy::proxied(&pg.url());
    let h: SharedDbHashMap<String, i64> = DbHashMap::builder_url(&url).open_shared().unwrap();
    let stop = AtomicBool::new(false);
    let tally = proxy::Tally::default();
    std::thread::scope(|s| {
        for t in 0..3 {
            let (h, stop, tally) = (&h, &stop, &tally);
            s.spawn(move || {
                let mut i = 0i64;
                while !stop.load(Ordering::Relaxed) {
                    let key = format!("{t}/{}", i % 40);
                    tally.note(key.clone(), i, h.insert(key, i));
                    i += 1;
                    if i % 5 == 0 {
                        std::thread::sleep(Duration::from_millis(120));
                    }
                }
            });
        }
        for _ in 0..2 {
            std::thread::sleep(Duration::from_millis(300));
            proxy.cut_all();
            std::thread::sleep(Duration::from_millis(300));
            proxy.pause(Duration::from_millis(500));
            std::thread::sleep(Duration::from_millis(300));
            pg.stop();
            std::thread::sleep(Duration::from_millis(300));
            pg.start();
        }
        std::thread::sleep(Duration::from_millis(300));
        stop.store(true, Ordering::Relaxed);
    });
    let mut tries = 0;
    while let Err(e) = h.insert("end".into(), 0) {
        tries += 1;
        assert!(tries < 10 && !matches!(e, Error::Poisoned { .. }), "{e}");
        std::thread::sleep(Duration::from_millis(200));
    }
    let table = reopen_i64(&pg.url());
    tally.check(&table);
    assert_eq!(table, h.to_hash_map());
    eprintln!(
        "soak with 2 restarts, 2 pauses, {} connections cut: {} unknown outcomes (settled), \
         {} calls refused while the server was down, {} calls, 0 reloads",
        proxy.cuts.load(Ordering::Relaxed),
        tally.unknown.load(Ordering::Relaxed),
        tally.refused.load(Ordering::Relaxed),
        h.commits().1
    );
}

#[cfg(feature = "postgres")]
fn reopen_i64(url: &str) -> HashMap<String, i64> {
    let h: DbHashMap<String, i64> = DbHashMap::open_url(url).unwrap();
    h.into_inner()
}

#[cfg(feature = "postgres")]
#[test]
fn postgres_write_behind_survives_a_server_restart() {
    let pg = OwnPostgres::new();
    let u = pg.url();
    let mut h: DbHashMap<String, String> = DbHashMap::builder_url(&u)
        .write_behind(write_thru_hash::WriteBehind::default().max_delay(Duration::from_millis(5)))
        .open()
        .unwrap();
    h.insert("before".into(), "1".into()).unwrap();
    h.flush().unwrap();
    pg.stop();
    // Calls go on while the server is down; a failed batch is kept and reported.
    let mut reported = 0;
    for i in 0..30 {
        if h.insert(format!("during{i}"), i.to_string()).is_err() {
            reported += 1;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    assert!(
        reported > 0 || h.flush().is_err(),
        "the failure was reported"
    );
    pg.start();
    assert!((0..50).any(|_| {
        std::thread::sleep(Duration::from_millis(50));
        h.flush().is_ok()
    }));
    let fresh: DbHashMap<String, String> = DbHashMap::open_url(&u).unwrap();
    assert_eq!(
        fresh, *h,
        "nothing queued while the server was down was lost"
    );
}
