//! `cargo run --release -p wth-bench -- [--quick]`: this library and the raw driver
//! issuing the same statements, side by side in one process, on the same data, with
//! the ratio of their times. Server backends run when `WTH_POSTGRES_URL` /
//! `WTH_MYSQL_URL` are set (`scripts/bench.sh` starts the servers).
//!
//! W1: single inserts, each its own commit. W2: inserts in one transaction
//! (`insert_many` against one prepared upsert per row in one transaction).
//! W3: opening a table (loading every row) against `SELECT` decoded into a `HashMap`.
//! W4: random `get`s against a plain `HashMap` of the same content.
//! W5: sustained inserts in write-behind mode: what a caller waits per insert, and the
//! background thread's throughput against the raw driver's batched throughput.
//! Memory: bytes held by a 1,000,000-entry map (and the peak while opening it) against
//! a bare `HashMap` of the same content, counted by a global allocator.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

use clap::Parser;
use mysql::prelude::Queryable;
use std::sync::atomic::AtomicBool;

use write_thru_hash::{DbHashMap, Dialect, Format, SharedDbHashMap, TableSpec, WriteBehind};

/// Counts the bytes the process holds, and the most it held since the last reset.
struct Counting;

static HELD: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            let now = HELD.fetch_add(layout.size(), Ordering::Relaxed) + layout.size();
            PEAK.fetch_max(now, Ordering::Relaxed);
        }
        p
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) };
        HELD.fetch_sub(layout.size(), Ordering::Relaxed);
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

/// Bytes held after `f` (and kept by what it returns), and the peak while it ran,
/// both above what was held before.
fn memory<T>(f: impl FnOnce() -> T) -> (T, usize, usize) {
    let base = HELD.load(Ordering::Relaxed);
    PEAK.store(base, Ordering::Relaxed);
    let value = f();
    (
        value,
        HELD.load(Ordering::Relaxed) - base,
        PEAK.load(Ordering::Relaxed) - base,
    )
}

#[derive(Parser)]
struct Args {
    /// Smaller sizes, for a smoke run.
    #[arg(long)]
    quick: bool,
    /// Rounds of each measurement; the median is reported.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Only these parts (comma-separated): sqlite, server, coherence, shared, slices,
    /// galera.
    #[arg(long, value_delimiter = ',')]
    only: Vec<String>,
}

impl Args {
    fn runs(&self, part: &str) -> bool {
        self.only.is_empty() || self.only.iter().any(|p| p == part)
    }
}

struct Row {
    backend: String,
    case: String,
    lib: Sample,
    raw: Sample,
}

/// The times of one side over the rounds.
struct Sample(Vec<Duration>);

impl Sample {
    fn median(&self) -> Duration {
        let mut v = self.0.clone();
        v.sort();
        v[v.len() / 2]
    }

    /// `median (min-max)` in milliseconds.
    fn show(&self) -> String {
        let ms = |d: &Duration| d.as_secs_f64() * 1e3;
        let min = self.0.iter().min().map_or(0.0, ms);
        let max = self.0.iter().max().map_or(0.0, ms);
        if self.0.len() > 1 {
            format!("{:.1} ms ({min:.1}-{max:.1})", ms(&self.median()))
        } else {
            format!("{:.1} ms", ms(&self.median()))
        }
    }
}

impl From<Duration> for Sample {
    fn from(d: Duration) -> Self {
        Sample(vec![d])
    }
}

/// Runs `lib` and `raw` alternately, `rounds` times each, each on a fresh table.
fn side_by_side(
    rounds: usize,
    mut lib: impl FnMut(usize) -> Duration,
    mut raw: impl FnMut(usize) -> Duration,
) -> (Sample, Sample) {
    let (mut l, mut r) = (Vec::new(), Vec::new());
    for round in 0..rounds {
        l.push(lib(round));
        r.push(raw(round));
    }
    (Sample(l), Sample(r))
}

/// Typed pairs, and the same pairs as the library's JSON codec stores them.
type Data = (Vec<(String, i64)>, Vec<(String, String)>);

fn data(n: usize) -> Data {
    let typed: Vec<(String, i64)> = (0..n)
        .map(|i| (format!("key-{i:08}"), i as i64 * 7))
        .collect();
    let encoded = typed
        .iter()
        .map(|(k, v)| (format!("\"{k}\""), v.to_string()))
        .collect();
    (typed, encoded)
}

fn spec(name: &str) -> TableSpec {
    TableSpec::new(name, Format::Text, Format::Text)
}

/// The time of `f`, and what it made, to be dropped after the clock stopped.
fn timed_keep<T>(f: impl FnOnce() -> T) -> (Duration, T) {
    let t = Instant::now();
    let value = f();
    (t.elapsed(), value)
}

fn timed(f: impl FnOnce()) -> Duration {
    let t = Instant::now();
    f();
    t.elapsed()
}

// ---- SQLite ----

fn sqlite_conn(path: &std::path::Path, journal: &str) -> rusqlite::Connection {
    let c = rusqlite::Connection::open(path).unwrap();
    c.pragma_update(None, "journal_mode", journal).unwrap();
    c.pragma_update(None, "synchronous", "FULL").unwrap();
    c
}

/// The raw side of W2 on SQLite: `sql`, prepared once, executed for each row, in one
/// transaction.
fn sqlite_upserts(c: &mut rusqlite::Connection, sql: &str, rows: &[(String, String)]) -> Duration {
    timed(|| {
        let tx = c.transaction().unwrap();
        {
            let mut st = tx.prepare_cached(sql).unwrap();
            for (k, v) in rows {
                st.execute([k, v]).unwrap();
            }
        }
        tx.commit().unwrap();
    })
}

fn sqlite(rows: &mut Vec<Row>, notes: &mut Vec<String>, args: &Args, journal: &str) {
    let dir = tempfile::tempdir().unwrap();
    let backend = format!("SQLite ({journal})");
    let d = Dialect::Sqlite;
    let n1 = if args.quick { 100 } else { 1_000 };
    let n2 = if args.quick { 1_000 } else { 10_000 };
    let (typed, encoded) = data(n2);

    let (lib, raw) = side_by_side(
        args.rounds,
        |r| {
            let mut h: DbHashMap<String, i64> =
                DbHashMap::builder(sqlite_conn(&dir.path().join(format!("w1l{r}")), journal))
                    .open()
                    .unwrap();
            timed(|| {
                typed[..n1].iter().for_each(|(k, v)| {
                    let _ = h.insert(k.clone(), *v).unwrap();
                })
            })
        },
        |r| {
            let c = sqlite_conn(&dir.path().join(format!("w1r{r}")), journal);
            c.execute_batch(&d.create_table(&spec("hashtable")))
                .unwrap();
            let sql = d.upsert(&spec("hashtable"), 1);
            timed(|| {
                let mut st = c.prepare_cached(&sql).unwrap();
                encoded[..n1].iter().for_each(|(k, v)| {
                    let _ = st.execute([k, v]).unwrap();
                });
            })
        },
    );
    rows.push(Row {
        backend: backend.clone(),
        case: format!("W1 {n1} single inserts, a commit each"),
        lib,
        raw,
    });

    let (lib, raw) = side_by_side(
        args.rounds,
        |r| {
            let mut h: DbHashMap<String, i64> =
                DbHashMap::builder(sqlite_conn(&dir.path().join(format!("w2l{r}")), journal))
                    .open()
                    .unwrap();
            let batch = typed.clone();
            timed(|| h.insert_many(batch).unwrap())
        },
        |r| {
            let mut c = sqlite_conn(&dir.path().join(format!("w2r{r}")), journal);
            c.execute_batch(&d.create_table(&spec("hashtable")))
                .unwrap();
            sqlite_upserts(&mut c, &d.upsert(&spec("hashtable"), 1), &encoded)
        },
    );
    rows.push(Row {
        backend: backend.clone(),
        case: format!("W2 {n2} inserts in one transaction"),
        lib,
        raw,
    });

    // W2 with the `Text` codec: both sides get the same prebuilt `String` pairs.
    let sizes: &[usize] = if args.quick {
        &[2_000, 20_000]
    } else {
        &[20_000, 200_000]
    };
    for &n in sizes {
        let pairs: Vec<(String, String)> = (0..n)
            .map(|i| {
                (
                    format!("key-{i:08}"),
                    format!("{{\"n\":{i},\"name\":\"value number {i}\"}}"),
                )
            })
            .collect();
        let (lib, raw) = side_by_side(
            args.rounds,
            |r| {
                let mut h: DbHashMap<String, String> = DbHashMap::builder(sqlite_conn(
                    &dir.path().join(format!("w2t{n}l{r}")),
                    journal,
                ))
                .codec(write_thru_hash::Text)
                .open()
                .unwrap();
                let batch = pairs.clone();
                timed(|| h.insert_many(batch).unwrap())
            },
            |r| {
                let mut c = sqlite_conn(&dir.path().join(format!("w2t{n}r{r}")), journal);
                c.execute_batch(&d.create_table(&spec("hashtable")))
                    .unwrap();
                sqlite_upserts(&mut c, &d.upsert(&spec("hashtable"), 1), &pairs)
            },
        );
        rows.push(Row {
            backend: backend.clone(),
            case: format!("W2 {n} inserts in one transaction, Text codec, prebuilt String pairs"),
            lib,
            raw,
        });
    }

    if journal != "WAL" {
        return;
    }
    let n3 = if args.quick { 20_000 } else { 1_000_000 };
    let path = dir.path().join("w3");
    let (typed3, _) = data(n3);
    let mut h: DbHashMap<String, i64> = DbHashMap::builder(sqlite_conn(&path, journal))
        .open()
        .unwrap();
    h.insert_many(typed3.iter().cloned()).unwrap();
    drop(h);
    let select = d.select_all(&spec("hashtable"));
    // The raw side's map, kept for W4: built the same way as the library's.
    let mut plain: HashMap<String, i64> = HashMap::new();
    let (lib, raw) = side_by_side(
        args.rounds,
        |_| {
            let c = sqlite_conn(&path, journal);
            let (t, h) = timed_keep(|| DbHashMap::<String, i64>::open(c).unwrap());
            assert_eq!(h.len(), n3);
            t
        },
        |_| {
            let c = sqlite_conn(&path, journal);
            let (t, map) = timed_keep(|| {
                let mut st = c.prepare(&select).unwrap();
                let mut map: HashMap<String, i64> = HashMap::new();
                let mut q = st.query([]).unwrap();
                while let Some(row) = q.next().unwrap() {
                    let k: String = serde_json_from(row.get_ref(0).unwrap().as_str().unwrap());
                    let v: i64 = serde_json_from(row.get_ref(1).unwrap().as_str().unwrap());
                    map.insert(k, v);
                }
                map
            });
            assert_eq!(map.len(), n3);
            plain = map;
            t
        },
    );
    rows.push(Row {
        backend: backend.clone(),
        case: format!("W3 open a table of {n3} rows"),
        lib,
        raw,
    });

    let h: DbHashMap<String, i64> = DbHashMap::builder(sqlite_conn(&path, journal))
        .open()
        .unwrap();
    let plain: HashMap<String, i64> = (*h).clone();
    // Probe keys of their own: a key taken from one of the maps would find its own
    // bytes in cache there and favour that map.
    let keys: Vec<String> = {
        let mut x: u64 = 88172645463325252;
        let all: Vec<&String> = plain.keys().collect();
        (0..1_000_000)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                all[(x % all.len() as u64) as usize].clone()
            })
            .collect()
    };
    // One pass of each first, so that neither pays for cold caches.
    let sum = |m: &HashMap<String, i64>| keys.iter().map(|k| *m.get(k).unwrap()).sum::<i64>();
    assert_eq!(sum(&h), sum(&plain));
    let (lib, raw) = side_by_side(
        args.rounds,
        |_| timed(|| assert!(keys.iter().map(|k| *h.get(k).unwrap()).sum::<i64>() > 0)),
        |_| timed(|| assert!(keys.iter().map(|k| *plain.get(k).unwrap()).sum::<i64>() > 0)),
    );
    rows.push(Row {
        backend: backend.clone(),
        case: "W4 1000000 random gets (raw: plain HashMap)".into(),
        lib,
        raw,
    });
    drop(h);
    drop(plain);

    // Memory: the map as opened, against the same content decoded into a bare HashMap.
    let (h, lib_held, lib_peak) =
        memory(|| DbHashMap::<String, i64>::open(sqlite_conn(&path, journal)).unwrap());
    let (bare, raw_held, raw_peak) = memory(|| {
        let c = sqlite_conn(&path, journal);
        let mut st = c.prepare(&select).unwrap();
        let mut map: HashMap<String, i64> = HashMap::new();
        let mut q = st.query([]).unwrap();
        while let Some(row) = q.next().unwrap() {
            map.insert(
                serde_json_from(row.get_ref(0).unwrap().as_str().unwrap()),
                serde_json_from(row.get_ref(1).unwrap().as_str().unwrap()),
            );
        }
        map
    });
    assert_eq!(h.len(), bare.len());
    let mb = |b: usize| b as f64 / (1 << 20) as f64;
    notes.push(format!(
        "Memory, {n3} entries: DbHashMap holds {:.1} MiB ({:.1} MiB peak while opening), \
         a bare HashMap {:.1} MiB ({:.1} MiB peak while decoding): held {:.2}x, peak {:.2}x",
        mb(lib_held),
        mb(lib_peak),
        mb(raw_held),
        mb(raw_peak),
        lib_held as f64 / raw_held as f64,
        lib_peak as f64 / raw_peak as f64
    ));
    drop(h);
    drop(bare);

    // W5: write-behind, sustained; raw: the same rows through one prepared upsert per
    // row in one transaction.
    let n5 = if args.quick { 20_000 } else { 200_000 };
    let (typed5, encoded5) = data(n5);
    let mut waits = Vec::with_capacity(n5);
    let mut h: DbHashMap<String, i64> =
        DbHashMap::builder(sqlite_conn(&dir.path().join("w5l"), journal))
            .write_behind(WriteBehind::default())
            .open()
            .unwrap();
    let start = Instant::now();
    for (k, v) in typed5 {
        let t = Instant::now();
        h.insert(k, v).unwrap();
        waits.push(t.elapsed());
    }
    let enqueued = start.elapsed();
    h.flush().unwrap();
    let lib = start.elapsed();
    drop(h);
    let raw = {
        let mut c = sqlite_conn(&dir.path().join("w5r"), journal);
        c.execute_batch(&d.create_table(&spec("hashtable")))
            .unwrap();
        sqlite_upserts(&mut c, &d.upsert(&spec("hashtable"), 1), &encoded5)
    };
    waits.sort();
    notes.push(format!(
        "W5, {n5} write-behind inserts: a caller waits {:.2} µs (median), {:.2} µs (p99), \
         {:.1} ms (max); all queued after {:.1} ms, durable after {:.1} ms: {:.0} rows/s \
         against {:.0} rows/s raw batched = {:.2}x",
        waits[n5 / 2].as_secs_f64() * 1e6,
        waits[n5 * 99 / 100].as_secs_f64() * 1e6,
        waits[n5 - 1].as_secs_f64() * 1e3,
        enqueued.as_secs_f64() * 1e3,
        lib.as_secs_f64() * 1e3,
        n5 as f64 / lib.as_secs_f64(),
        n5 as f64 / raw.as_secs_f64(),
        raw.as_secs_f64() / lib.as_secs_f64(),
    ));
    rows.push(Row {
        backend,
        case: format!("W5 {n5} write-behind inserts until durable"),
        lib: lib.into(),
        raw: raw.into(),
    });
}

fn serde_json_from<T: serde::de::DeserializeOwned>(s: &str) -> T {
    serde_json::from_str(s).unwrap()
}

// ---- Shared map ----

/// W6: `threads` threads each inserting `each` keys of their own, every call durable
/// on return: one shared map against one connection per thread, an autocommit upsert
/// per insert.
fn w6<C: Send>(
    rows: &mut Vec<Row>,
    args: &Args,
    backend: &str,
    lib_map: &dyn Fn(usize) -> SharedDbHashMap<String, i64>,
    raw_conn: &(dyn Fn(usize) -> C + Sync),
    raw_insert: &(dyn Fn(&mut C, &str, &str) + Sync),
) {
    let threads = 8;
    let each = if args.quick { 200 } else { 2_000 };
    let (typed, encoded) = data(threads * each);
    let (lib, raw) = side_by_side(
        args.rounds,
        |r| {
            let h = lib_map(r);
            let took = timed(|| {
                std::thread::scope(|s| {
                    for part in typed.chunks(each) {
                        let h = h.clone();
                        s.spawn(move || {
                            for (k, v) in part {
                                h.insert(k.clone(), *v).unwrap();
                            }
                        });
                    }
                })
            });
            let (commits, calls) = h.commits();
            eprintln!("W6 {backend}: {calls} inserts in {commits} transactions");
            took
        },
        |r| {
            let conns: Vec<C> = (0..threads).map(|_| raw_conn(r)).collect();
            timed(|| {
                std::thread::scope(|s| {
                    for (mut c, part) in conns.into_iter().zip(encoded.chunks(each)) {
                        s.spawn(move || {
                            for (k, v) in part {
                                raw_insert(&mut c, k, v);
                            }
                        });
                    }
                })
            })
        },
    );
    rows.push(Row {
        backend: backend.into(),
        case: format!(
            "W6 {threads} threads × {each} inserts, each durable on return (raw: a connection \
             per thread, a commit per insert)"
        ),
        lib,
        raw,
    });
}

/// W8: 8 threads of `upsert` (a counter's increment) on 16 shared keys, against as many
/// `insert`s of distinct keys through the same kind of shared map: read-modify-writes
/// are group-committed like inserts.
fn w8(
    rows: &mut Vec<Row>,
    args: &Args,
    backend: &str,
    map: &dyn Fn(&str) -> SharedDbHashMap<String, i64>,
) {
    let threads = 8u64;
    let each = if args.quick { 200 } else { 1_000 };
    let (lib, raw) = side_by_side(
        args.rounds,
        |r| {
            let h = map(&format!("w8u{r}"));
            let took = timed(|| {
                std::thread::scope(|s| {
                    for t in 0..threads {
                        let h = h.clone();
                        s.spawn(move || {
                            for i in 0..each {
                                let key = format!("counter-{}", (t + i) % 16);
                                h.upsert(key, |n| n.copied().unwrap_or(0) + 1).unwrap();
                            }
                        });
                    }
                })
            });
            let total: i64 = h.read().values().sum();
            assert_eq!(total as u64, threads * each, "no increment lost");
            let (commits, calls) = h.commits();
            eprintln!("W8 {backend}: {calls} upserts in {commits} transactions");
            took
        },
        |r| {
            let h = map(&format!("w8i{r}"));
            timed(|| {
                std::thread::scope(|s| {
                    for t in 0..threads {
                        let h = h.clone();
                        s.spawn(move || {
                            for i in 0..each {
                                h.insert(format!("key-{t}-{i}"), i as i64).unwrap();
                            }
                        });
                    }
                })
            })
        },
    );
    rows.push(Row {
        backend: backend.into(),
        case: format!(
            "W8 {threads} threads × {each} upserts on 16 counters, each durable on return \
             (raw: as many inserts of distinct keys through the same shared map)"
        ),
        lib,
        raw,
    });
}

/// W6 on SQLite (WAL, `synchronous = FULL`) and W7: `get`s of two reader threads on a
/// shared map, with and without a writer running flat out, and on a bare
/// `RwLock<HashMap>`.
fn shared(rows: &mut Vec<Row>, notes: &mut Vec<String>, args: &Args) {
    async_waits(notes);
    let dir = tempfile::tempdir().unwrap();
    let d = Dialect::Sqlite;
    let table = spec("hashtable");
    let path = |side: &str, r: usize| dir.path().join(format!("w6{side}{r}"));
    w6(
        rows,
        args,
        "SQLite (WAL)",
        &|r| {
            DbHashMap::builder(sqlite_conn(&path("l", r), "WAL"))
                .open_shared()
                .unwrap()
        },
        &|r| {
            let c = sqlite_conn(&path("r", r), "WAL");
            c.busy_timeout(Duration::from_secs(60)).unwrap();
            c.execute_batch(&d.create_table(&table)).unwrap();
            c
        },
        &|c, k, v| {
            c.prepare_cached(&d.upsert(&table, 1))
                .unwrap()
                .execute([k, v])
                .unwrap();
        },
    );

    w8(rows, args, "SQLite (WAL)", &|name| {
        DbHashMap::builder(sqlite_conn(&dir.path().join(name), "WAL"))
            .open_shared()
            .unwrap()
    });

    // W7: 100,000 entries; each reader gets `n7` random keys.
    let n7 = if args.quick { 200_000 } else { 2_000_000 };
    let (typed, _) = data(100_000);
    let h: SharedDbHashMap<String, i64> = DbHashMap::builder(sqlite_conn(&path("w7", 0), "WAL"))
        .src(typed.clone())
        .open_shared()
        .unwrap();
    let bare = std::sync::RwLock::new(typed.iter().cloned().collect::<HashMap<_, _>>());
    let keys: Vec<Vec<String>> = (0..2u64)
        .map(|t| {
            let mut x = 0x9e37_79b9_7f4a_7c15u64 ^ t;
            (0..n7)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    typed[(x % typed.len() as u64) as usize].0.clone()
                })
                .collect()
        })
        .collect();
    let readers = |get: &(dyn Fn(&str) -> Option<i64> + Sync),
                   writer: Option<&(dyn Fn(&AtomicBool) + Sync)>| {
        let stop = AtomicBool::new(false);
        timed(|| {
            std::thread::scope(|s| {
                if let Some(w) = writer {
                    let stop = &stop;
                    s.spawn(move || w(stop));
                }
                let readers: Vec<_> = keys
                    .iter()
                    .map(|keys| s.spawn(move || keys.iter().map(|k| get(k).unwrap()).sum::<i64>()))
                    .collect();
                for r in readers {
                    assert!(r.join().unwrap() > 0);
                }
                stop.store(true, Ordering::Relaxed);
            })
        })
    };
    let shared_get = |k: &str| h.get(k);
    let bare_get = |k: &str| bare.read().unwrap().get(k).copied();
    // The same writer on another map: as much work for the CPUs, no lock in common.
    let other: SharedDbHashMap<String, i64> =
        DbHashMap::builder(sqlite_conn(&path("w7other", 0), "WAL"))
            .open_shared()
            .unwrap();
    let written = AtomicUsize::new(0);
    let writer_on = |m: &SharedDbHashMap<String, i64>, stop: &AtomicBool| {
        let mut i = 0;
        while !stop.load(Ordering::Relaxed) {
            m.insert(format!("new-{i}"), i).unwrap();
            i += 1;
        }
        written.fetch_add(i as usize, Ordering::Relaxed);
    };
    let writer = |stop: &AtomicBool| writer_on(&h, stop);
    let elsewhere = |stop: &AtomicBool| writer_on(&other, stop);
    let (with, without) = side_by_side(
        args.rounds,
        |_| readers(&shared_get, Some(&writer)),
        |_| readers(&shared_get, None),
    );
    let case = format!("W7 2 readers × {n7} gets");
    rows.push(Row {
        backend: "shared map".into(),
        case: format!("{case}, a writer inserting flat out (raw: no writer)"),
        lib: with,
        raw: without,
    });
    let (here, there) = side_by_side(
        args.rounds,
        |_| readers(&shared_get, Some(&writer)),
        |_| readers(&shared_get, Some(&elsewhere)),
    );
    rows.push(Row {
        backend: "shared map".into(),
        case: format!(
            "{case}, a writer inserting flat out (raw: the same writer on another map, \
             which shares the CPUs but no lock)"
        ),
        lib: here,
        raw: there,
    });
    let (alone, rwlock) = side_by_side(
        args.rounds,
        |_| readers(&shared_get, None),
        |_| readers(&bare_get, None),
    );
    rows.push(Row {
        backend: "shared map".into(),
        case: format!("{case}, no writer (raw: a bare RwLock<HashMap>)"),
        lib: alone,
        raw: rwlock,
    });
    // The alternatives to a lock: snapshots swapped by `arc-swap` (a reader never
    // waits, but every commit copies the map) against the same bare lock.
    let snapshot = arc_swap::ArcSwap::from_pointee(bare.read().unwrap().clone());
    let snapshot_get = |k: &str| snapshot.load().get(k).copied();
    let (swapped, rwlock) = side_by_side(
        args.rounds,
        |_| readers(&snapshot_get, None),
        |_| readers(&bare_get, None),
    );
    rows.push(Row {
        backend: "alternative".into(),
        case: format!("{case} on arc-swap snapshots, no writer (raw: a bare RwLock<HashMap>)"),
        lib: swapped,
        raw: rwlock,
    });
    let mut copies = Vec::new();
    for _ in 0..args.rounds {
        let current = snapshot.load_full();
        let (t, mut next) = timed_keep(|| (*current).clone());
        next.insert("one more".into(), 1);
        snapshot.store(std::sync::Arc::new(next));
        copies.push(t);
    }
    notes.push(format!(
        "W7: with arc-swap snapshots, each commit would copy the map: {:.1} ms for its \
         {} entries (median of {}), against a lock held for one insert per commit",
        Sample(copies.clone()).median().as_secs_f64() * 1e3,
        typed.len(),
        copies.len()
    ));
    let (commits, calls) = h.commits();
    eprintln!(
        "W7: the writers committed {} inserts ({calls} calls in {commits} transactions on the \
         map read)",
        written.load(Ordering::Relaxed)
    );
}

/// The threads of the process while 1,000 `insert_async` calls wait on a SQLite file
/// another connection holds locked (a current-thread runtime), against 1,000
/// `spawn_blocking` calls of `insert`, what a caller without the async methods writes.
fn async_waits(notes: &mut Vec<String>) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("async.sqlite");
    let h: SharedDbHashMap<String, i64> = DbHashMap::builder(sqlite_conn(&path, "WAL"))
        .open_shared()
        .unwrap();
    h.insert("warm".into(), 0).unwrap();
    let threads = || std::fs::read_dir("/proc/self/task").map_or(0, |d| d.count());
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap();
    let before = threads();
    let most = |blocking: bool| -> usize {
        rt.block_on(async {
            let path = path.clone();
            let locker = std::thread::spawn(move || {
                let c = rusqlite::Connection::open(path).unwrap();
                c.execute_batch("BEGIN IMMEDIATE").unwrap();
                std::thread::sleep(Duration::from_millis(500));
                c.execute_batch("COMMIT").unwrap();
            });
            tokio::time::sleep(Duration::from_millis(50)).await;
            let calls: Vec<_> = (0..1_000)
                .map(|i| {
                    let h = h.clone();
                    let key = format!("{}{i}", if blocking { "b" } else { "a" });
                    if blocking {
                        tokio::task::spawn_blocking(move || h.insert(key, i))
                    } else {
                        tokio::spawn(async move { h.insert_async(key, i).await })
                    }
                })
                .collect();
            let mut most = 0;
            for _ in 0..10 {
                tokio::time::sleep(Duration::from_millis(30)).await;
                most = most.max(threads());
            }
            for call in calls {
                call.await.unwrap().unwrap();
            }
            locker.join().unwrap();
            most
        })
    };
    let (lib, raw) = (most(false), most(true));
    notes.push(format!(
        "async: at most {lib} threads in the process while 1,000 `insert_async` calls waited \
         on a locked SQLite file (current-thread runtime; {before} before); raw: {raw} with \
         `spawn_blocking` around `insert`"
    ));
}

/// A TCP proxy to the server of `url` that delays every read by `one_way` before
/// passing it on; the URL through it.
fn slow_link(url: &str, one_way: Duration) -> String {
    use std::io::{Read, Write};
    use std::net::{TcpListener, TcpStream};
    let at = url.rsplit_once('@').map_or(url, |(_, rest)| rest);
    let upstream = at.split('/').next().unwrap().to_string();
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let to_server = upstream.clone();
    std::thread::spawn(move || {
        for client in listener.incoming().flatten() {
            let Ok(server) = TcpStream::connect(&to_server) else {
                continue;
            };
            for (mut from, mut to) in [
                (client.try_clone().unwrap(), server.try_clone().unwrap()),
                (server, client),
            ] {
                let _ = from.set_nodelay(true);
                let _ = to.set_nodelay(true);
                std::thread::spawn(move || {
                    let mut buf = vec![0u8; 64 * 1024];
                    while let Ok(n) = from.read(&mut buf) {
                        if n == 0 {
                            break;
                        }
                        std::thread::sleep(one_way);
                        if to.write_all(&buf[..n]).is_err() {
                            break;
                        }
                    }
                    let _ = to.shutdown(std::net::Shutdown::Both);
                });
            }
        }
    });
    url.replacen(&upstream, &format!("127.0.0.1:{port}"), 1)
}

/// W6 on PostgreSQL.
fn shared_postgres(rows: &mut Vec<Row>, args: &Args, url: &str) {
    let d = Dialect::Postgres;
    let fresh = |name: &str| {
        let mut c = postgres::Client::connect(url, postgres::NoTls).unwrap();
        c.batch_execute(&format!("DROP TABLE IF EXISTS {}", d.quote(name)))
            .unwrap();
        c
    };
    let raw_table = spec("bench_w6_raw");
    // Here, and over a link with a round trip of 0.5 ms (a proxy that delays every
    // read by 0.25 ms each way), as a server on another machine of a data centre; with
    // one connection and with four.
    let slow = slow_link(url, Duration::from_micros(250));
    for (label, url, connections) in [
        ("PostgreSQL", url, 1),
        ("PostgreSQL, 4 connections", url, 4),
        ("PostgreSQL, 0.5 ms away", slow.as_str(), 1),
        ("PostgreSQL, 0.5 ms away, 4 connections", slow.as_str(), 4),
    ] {
        w6(
            rows,
            args,
            label,
            &|_| {
                fresh("bench_w6_lib");
                DbHashMap::builder_url(url)
                    .table("bench_w6_lib")
                    .connections(connections)
                    .open_shared()
                    .unwrap()
            },
            &|_| {
                let mut c = postgres::Client::connect(url, postgres::NoTls).unwrap();
                c.batch_execute(&d.create_table(&raw_table)).unwrap();
                c.batch_execute(&format!("DELETE FROM {}", d.quote("bench_w6_raw")))
                    .unwrap();
                let st = c.prepare(&d.upsert(&raw_table, 1)).unwrap();
                (c, st)
            },
            &|(c, st), k, v| {
                c.execute(&*st, &[&k, &v]).unwrap();
            },
        );
    }
    drop(fresh("bench_w6_raw"));
    w8(rows, args, "PostgreSQL", &|name| {
        drop(fresh(name));
        DbHashMap::builder_url(url)
            .table(name)
            .open_shared()
            .unwrap()
    });
}

/// W6 and W8 on MariaDB (the database of the URL; triggers need none, the tables are
/// plain).
fn shared_mysql(rows: &mut Vec<Row>, args: &Args, url: &str) {
    let d = Dialect::Mysql;
    let fresh = |name: &str| {
        let mut c = <mysql::Conn as Raw>::connect(url);
        Raw::exec(&mut c, &format!("DROP TABLE IF EXISTS {}", d.quote(name)));
        c
    };
    let raw_table = spec("bench_w6_raw");
    w6(
        rows,
        args,
        "MariaDB",
        &|_| {
            drop(fresh("bench_w6_lib"));
            DbHashMap::builder_url(url)
                .table("bench_w6_lib")
                .open_shared()
                .unwrap()
        },
        &|_| {
            let mut c = <mysql::Conn as Raw>::connect(url);
            Raw::exec(&mut c, &d.create_table(&raw_table));
            Raw::exec(&mut c, &format!("DELETE FROM {}", d.quote("bench_w6_raw")));
            let st = c.prep(d.upsert(&raw_table, 1)).unwrap();
            (c, st)
        },
        &|(c, st), k, v| {
            c.exec_drop(&*st, (k.as_bytes(), v.as_bytes())).unwrap();
        },
    );
    drop(fresh("bench_w6_raw"));
    w8(rows, args, "MariaDB", &|name| {
        drop(fresh(name));
        DbHashMap::builder_url(url)
            .table(name)
            .open_shared()
            .unwrap()
    });
}

// ---- Galera ----

/// A 3-node Galera cluster (`WTH_GALERA_URL_1..3`): coherent maps writing single
/// inserts, 3 writers on 3 nodes against 1 writer on 1 node, with disjoint keys and
/// with keys all three share; and how many writes were retried after error 1213.
fn galera(rows: &mut Vec<Row>, notes: &mut Vec<String>, args: &Args, urls: &[String]) {
    let n = if args.quick { 200 } else { 1_000 };
    let mut round = 0;
    let mut open = |url: &str| -> DbHashMap<String, i64> {
        round += 1;
        DbHashMap::builder_url(url)
            .table(format!("bench_galera_{round}"))
            .coherent()
            .open()
            .unwrap()
    };
    let key = |writer: usize, i: usize, shared: bool| {
        if shared {
            format!("k{}", i % 50)
        } else {
            format!("w{writer}-{i}")
        }
    };
    let run = |maps: &mut [DbHashMap<String, i64>], shared: bool, batch: usize| {
        let took = timed(|| {
            std::thread::scope(|s| {
                for (w, m) in maps.iter_mut().enumerate() {
                    s.spawn(move || {
                        for i in (0..n).step_by(batch) {
                            // Beyond its retries a conflict is an error: counted, not fatal.
                            let _ = if batch == 1 {
                                m.insert(key(w, i, shared), i as i64).map(drop)
                            } else {
                                m.insert_many((i..i + batch).map(|j| (key(w, j, shared), j as i64)))
                            };
                        }
                    });
                }
            })
        });
        (
            took,
            maps.iter().map(DbHashMap::conflicts_retried).sum::<u64>(),
        )
    };
    for (shared, batch) in [(false, 1), (true, 1), (false, 5), (true, 5)] {
        let (mut three, mut one) = (Vec::new(), Vec::new());
        let (mut retried, mut calls) = (0, 0);
        for _ in 0..args.rounds {
            let mut maps: Vec<_> = urls.iter().map(|u| open(u)).collect();
            let (t, r) = run(&mut maps, shared, batch);
            three.push(t);
            retried += r;
            calls += 3 * (n / batch) as u64;
            let mut single = vec![open(&urls[0])];
            one.push(run(&mut single, shared, batch).0);
        }
        let keys = if shared {
            "50 keys all share"
        } else {
            "keys of their own"
        };
        let what = if batch == 1 {
            format!("single inserts, {keys}")
        } else {
            format!("insert_many of {batch}, {keys}")
        };
        notes.push(format!(
            "Galera, {what}: {retried} retries after error 1213 for {calls} writes by 3 \
             writers on 3 nodes ({:.1} %)",
            retried as f64 * 100.0 / calls as f64
        ));
        rows.push(Row {
            backend: "Galera (3 nodes)".into(),
            case: format!(
                "3 writers on 3 nodes × {n} keys, coherent, {what} (raw: 1 writer on 1 \
                 node, {n} keys; a ratio under 3 is a gain in throughput)"
            ),
            lib: Sample(three),
            raw: Sample(one),
        });
    }
}

// ---- Server backends ----

/// What the benchmark needs of a server driver, the raw side of the comparison.
trait Raw: write_thru_hash::IntoStore + Sized {
    const NAME: &'static str;
    const DIALECT: Dialect;
    fn connect(url: &str) -> Self;
    fn exec(&mut self, sql: &str);
    /// `sql` prepared once, executed for each row; in one transaction if `tx`.
    fn upserts(&mut self, sql: &str, rows: &[(String, String)], tx: bool) -> Duration;
    /// `sql`'s rows of two JSON texts decoded into a map.
    fn select_map(&mut self, sql: &str) -> HashMap<String, i64>;
}

impl Raw for postgres::Client {
    const NAME: &'static str = "PostgreSQL";
    const DIALECT: Dialect = Dialect::Postgres;
    fn connect(url: &str) -> Self {
        postgres::Client::connect(url, postgres::NoTls).unwrap()
    }
    fn exec(&mut self, sql: &str) {
        self.batch_execute(sql).unwrap();
    }
    fn upserts(&mut self, sql: &str, rows: &[(String, String)], tx: bool) -> Duration {
        let st = self.prepare(sql).unwrap();
        timed(|| {
            if tx {
                let mut t = self.transaction().unwrap();
                for (k, v) in rows {
                    t.execute(&st, &[k, v]).unwrap();
                }
                t.commit().unwrap();
            } else {
                for (k, v) in rows {
                    self.execute(&st, &[k, v]).unwrap();
                }
            }
        })
    }
    fn select_map(&mut self, sql: &str) -> HashMap<String, i64> {
        use postgres::fallible_iterator::FallibleIterator;
        let mut map = HashMap::new();
        let mut rows = self.query_raw(sql, std::iter::empty::<&str>()).unwrap();
        while let Some(row) = rows.next().unwrap() {
            let k: &str = row.get(0);
            let v: &str = row.get(1);
            map.insert(serde_json_from(k), serde_json_from(v));
        }
        map
    }
}

impl Raw for mysql::Conn {
    const NAME: &'static str = "MariaDB";
    const DIALECT: Dialect = Dialect::Mysql;
    fn connect(url: &str) -> Self {
        mysql::Conn::new(mysql::Opts::from_url(url).unwrap()).unwrap()
    }
    fn exec(&mut self, sql: &str) {
        self.query_drop(sql).unwrap();
    }
    fn upserts(&mut self, sql: &str, rows: &[(String, String)], tx: bool) -> Duration {
        let st = self.prep(sql).unwrap();
        timed(|| {
            if tx {
                let mut t = self.start_transaction(mysql::TxOpts::default()).unwrap();
                for (k, v) in rows {
                    t.exec_drop(&st, (k.as_bytes(), v.as_bytes())).unwrap();
                }
                t.commit().unwrap();
            } else {
                for (k, v) in rows {
                    self.exec_drop(&st, (k.as_bytes(), v.as_bytes())).unwrap();
                }
            }
        })
    }
    fn select_map(&mut self, sql: &str) -> HashMap<String, i64> {
        let mut map = HashMap::new();
        for row in self.query_iter(sql).unwrap() {
            let row = row.unwrap();
            let k: Vec<u8> = row.get(0).unwrap();
            let v: Vec<u8> = row.get(1).unwrap();
            map.insert(
                serde_json_from(std::str::from_utf8(&k).unwrap()),
                serde_json_from(std::str::from_utf8(&v).unwrap()),
            );
        }
        map
    }
}

/// W1 and W2 on a server: the library through `C`'s connection, and `C` itself.
fn server<C: Raw>(rows: &mut Vec<Row>, args: &Args, url: &str) {
    let d = C::DIALECT;
    let n1 = if args.quick { 100 } else { 1_000 };
    let n2 = if args.quick { 1_000 } else { 10_000 };
    let (typed, encoded) = data(n2);
    let fresh = |name: &str| {
        C::connect(url).exec(&format!("DROP TABLE IF EXISTS {}", d.quote(name)));
        spec(name)
    };
    let lib_map = || -> DbHashMap<String, i64> {
        fresh("bench_lib");
        DbHashMap::builder(C::connect(url))
            .table("bench_lib")
            .open()
            .unwrap()
    };
    let raw_conn = || {
        let t = fresh("bench_raw");
        let mut c = C::connect(url);
        c.exec(&d.create_table(&t));
        (c, d.upsert(&t, 1))
    };
    let (lib, raw) = side_by_side(
        args.rounds,
        |_| {
            let mut h = lib_map();
            timed(|| {
                for (k, v) in &typed[..n1] {
                    h.insert(k.clone(), *v).unwrap();
                }
            })
        },
        |_| {
            let (mut c, sql) = raw_conn();
            c.upserts(&sql, &encoded[..n1], false)
        },
    );
    let backend = C::NAME.to_string();
    rows.push(Row {
        backend: backend.clone(),
        case: format!("W1 {n1} single inserts, a commit each"),
        lib,
        raw,
    });
    let (lib, raw) = side_by_side(
        args.rounds,
        |_| {
            let mut h = lib_map();
            let batch = typed.clone();
            timed(|| h.insert_many(batch).unwrap())
        },
        |_| {
            let (mut c, sql) = raw_conn();
            c.upserts(&sql, &encoded, true)
        },
    );
    rows.push(Row {
        backend: backend.clone(),
        case: format!("W2 {n2} inserts in one transaction"),
        lib,
        raw,
    });

    // W3: a table of `n3` rows, opened by the library and selected into a map raw.
    let n3 = if args.quick { 20_000 } else { 1_000_000 };
    let (typed3, _) = data(n3);
    fresh("bench_w3");
    let mut h: DbHashMap<String, i64> = DbHashMap::builder(C::connect(url))
        .table("bench_w3")
        .open()
        .unwrap();
    for part in typed3.chunks(100_000) {
        h.insert_many(part.iter().cloned()).unwrap();
    }
    drop(h);
    let select = d.select_all(&spec("bench_w3"));
    let (lib, raw) = side_by_side(
        args.rounds,
        |_| {
            let c = C::connect(url);
            let (t, h) = timed_keep(|| {
                DbHashMap::<String, i64>::builder(c)
                    .table("bench_w3")
                    .open()
                    .unwrap()
            });
            assert_eq!(h.len(), n3);
            t
        },
        |_| {
            let mut c = C::connect(url);
            let (t, map) = timed_keep(|| c.select_map(&select));
            assert_eq!(map.len(), n3);
            t
        },
    );
    rows.push(Row {
        backend,
        case: format!("W3 open a table of {n3} rows (raw: SELECT into a HashMap)"),
        lib,
        raw,
    });
}

/// Coherence, on the backend at `url`: single inserts and a load with `coherent()`
/// against the plain map (the "raw driver" column holds the plain map here), and the
/// time of a refresh after 1 and after 1,000 changes on a large table.
fn coherence(rows: &mut Vec<Row>, notes: &mut Vec<String>, args: &Args, backend: &str, url: &str) {
    let n1 = if args.quick { 100 } else { 1_000 };
    let n3 = if args.quick { 20_000 } else { 1_000_000 };
    let (typed, _) = data(n1);
    let open = |table: &str, coherent: bool| -> DbHashMap<String, i64> {
        let b = DbHashMap::builder_url(url).table(table);
        if coherent { b.coherent() } else { b }.open().unwrap()
    };
    let (lib, raw) = side_by_side(
        args.rounds,
        |r| {
            let mut h = open(&format!("coh_w1c{r}"), true);
            h.clear().unwrap();
            timed(|| {
                for (k, v) in &typed {
                    h.insert(k.clone(), *v).unwrap();
                }
            })
        },
        |r| {
            let mut h = open(&format!("coh_w1p{r}"), false);
            h.clear().unwrap();
            timed(|| {
                for (k, v) in &typed {
                    h.insert(k.clone(), *v).unwrap();
                }
            })
        },
    );
    rows.push(Row {
        backend: backend.to_string(),
        case: format!("W1 {n1} single inserts, coherent (vs. the plain map)"),
        lib,
        raw,
    });

    // A large table, made coherent before the timing so that the triggers exist.
    let mut writer = open("coh_big", true);
    if writer.len() != n3 {
        writer.clear().unwrap();
        let (big, _) = data(n3);
        for chunk in big.chunks(50_000) {
            writer.insert_many(chunk.iter().cloned()).unwrap();
        }
    }
    let (lib, raw) = side_by_side(
        args.rounds,
        |_| timed(|| assert_eq!(open("coh_big", true).len(), n3)),
        |_| timed(|| assert_eq!(open("coh_big", false).len(), n3)),
    );
    rows.push(Row {
        backend: backend.to_string(),
        case: format!("W3 open a table of {n3} rows, coherent (vs. the plain map)"),
        lib,
        raw,
    });
    let mut reader = open("coh_big", true);
    for changes in [1usize, 1_000] {
        let mut times = Vec::new();
        for round in 0..args.rounds.max(3) {
            let start = round * changes;
            writer
                .insert_many((start..start + changes).map(|i| (format!("key-{i:08}"), -1)))
                .unwrap();
            times.push(timed(|| assert_eq!(reader.refresh().unwrap(), changes)));
            // Undo, and let the reader see it, off the clock.
            writer
                .insert_many(
                    (start..start + changes).map(|i| (format!("key-{i:08}"), i as i64 * 7)),
                )
                .unwrap();
            reader.refresh().unwrap();
        }
        notes.push(format!(
            "{backend}: refresh after {changes} change(s) on a table of {n3} rows: {:.3} ms \
             (median of {})",
            Sample(times.clone()).median().as_secs_f64() * 1e3,
            times.len()
        ));
    }
}

/// Slices: opening 1% of a table of `n` rows against opening all of it (time, and the
/// memory the map holds); then a slice's refresh while every slice changes, against a
/// whole-table map's refresh over the same changes.
fn slices(rows: &mut Vec<Row>, notes: &mut Vec<String>, args: &Args, backend: &str, url: &str) {
    let n = if args.quick { 100_000 } else { 1_000_000 };
    let table = "slices";
    // 100 tenants, `t00/` to `t99/`, of n / 100 keys each; ~55-byte values.
    let key = |j: usize| format!("\"t{:02}/{j:07}\"", j % 100);
    let value = |j: usize| format!("\"{j:07}-{}\"", "v".repeat(44));
    let mut store = write_thru_hash::connect(url).unwrap();
    store.open(&spec(table)).unwrap();
    let mut next = 0;
    store
        .put_rows(true, true, &mut |_| {
            if next >= n {
                return None;
            }
            let end = (next + 10_000).min(n);
            let chunk = (next..end)
                .map(|j| (key(j).into_bytes(), value(j).into_bytes()))
                .collect();
            next = end;
            Some(Ok(chunk))
        })
        .unwrap();
    drop(store);
    // What autovacuum would do after a bulk load, done before the clock runs: neither
    // side should pay for the load's after-work (PostgreSQL's visibility map and
    // statistics; measured: the first slice opens took 160-500 ms, then 25 ms).
    if url.starts_with("postgres") {
        Raw::exec(
            &mut <postgres::Client as Raw>::connect(url),
            "VACUUM ANALYZE slices",
        );
    }
    let open = |prefix: Option<&str>, coherent: bool| -> DbHashMap<String, String> {
        let mut b = DbHashMap::builder_url(url).table(table);
        if let Some(p) = prefix {
            b = b.prefix(p);
        }
        if coherent {
            b = b.coherent();
        }
        b.open().unwrap()
    };
    // Each map is dropped, and the allocator settled, before the clock runs again:
    // glibc defers merging the chunks a 1,000,000-entry map frees to the next
    // allocation of 1 KiB or more (measured: a PostgreSQL connect right after dropping
    // the whole table's map took 430 ms, 0.5 ms otherwise), which is not the next
    // open's cost.
    let timed_open = |prefix: Option<&str>| {
        let (t, map) = timed_keep(|| open(prefix, false));
        drop(map);
        drop(std::hint::black_box(vec![0u8; 64 << 10]));
        t
    };
    let (lib, raw) = side_by_side(
        args.rounds,
        |_| timed_open(Some("t42/")),
        |_| timed_open(None),
    );
    let mut empty: Vec<Duration> = (0..args.rounds)
        .map(|_| timed_open(Some("none/")))
        .collect();
    empty.sort();
    notes.push(format!(
        "S1 {backend}: an empty slice opens in {:.1} ms (connecting, and the checks of the \
         table's layout): the part of an open that does not grow with the rows",
        empty[empty.len() / 2].as_secs_f64() * 1e3
    ));
    rows.push(Row {
        backend: backend.into(),
        case: format!("S1 open a 1% slice of {n} rows (vs. opening the whole table)"),
        lib,
        raw,
    });
    if url.starts_with("postgres") {
        // PostgreSQL keeps rows where they were written: a tenant's rows written over
        // time lie on most of the table's pages (here 10,000 of its 12,352 for a 1%
        // slice). Kept in key order (CLUSTER, or rows loaded tenant by tenant), a slice
        // is a few hundred pages.
        Raw::exec(
            &mut <postgres::Client as Raw>::connect(url),
            "CLUSTER slices USING slices_pkey; ANALYZE slices",
        );
        let (lib, raw) = side_by_side(
            args.rounds,
            |_| timed_open(Some("t42/")),
            |_| timed_open(None),
        );
        rows.push(Row {
            backend: backend.into(),
            case: format!(
                "S1 open a 1% slice of {n} rows after CLUSTER on the key (vs. the whole table)"
            ),
            lib,
            raw,
        });
    }
    // Each measured on the second open: the first may fill the driver's buffer pool.
    // What an empty slice holds is the connection's: the mysql crate reserves two
    // buffers of 4 MiB (max_allowed_packet) per connection, the others a few KiB.
    let measure = |prefix: Option<&str>| {
        let _ = memory(|| open(prefix, false));
        memory(|| open(prefix, false))
    };
    let (_, empty, _) = measure(Some("none/"));
    let (slice, slice_held, slice_peak) = measure(Some("t42/"));
    let (whole, whole_held, whole_peak) = measure(None);
    let mib = |b: usize| b.saturating_sub(empty) as f64 / (1 << 20) as f64;
    notes.push(format!(
        "S1 {backend}: beyond the {:.2} MiB an empty slice holds (the connection), the 1% \
         slice holds {} entries in {:.2} MiB (peak {:.2} MiB while opening), the whole table \
         {} in {:.1} MiB (peak {:.1} MiB): {:.2}% of the memory",
        empty as f64 / (1 << 20) as f64,
        slice.len(),
        mib(slice_held),
        mib(slice_peak),
        whole.len(),
        mib(whole_held),
        mib(whole_peak),
        100.0 * mib(slice_held) / mib(whole_held)
    ));
    drop((slice, whole));

    // S2: each round, another writer changes one key in each of the 100 slices.
    let mut slice = open(Some("t42/"), true);
    let mut whole = open(None, true);
    let mut writer = write_thru_hash::connect(url).unwrap();
    writer.open(&spec(table)).unwrap();
    let (mut lib, mut raw) = (Vec::new(), Vec::new());
    for round in 0..args.rounds.max(5) {
        let mut batch = write_thru_hash::Batch::default();
        batch.puts = (0..100)
            .map(|t| {
                let k = format!("\"t{t:02}/new{round:04}\"");
                (k.into_bytes(), value(round).into_bytes())
            })
            .collect();
        writer.apply(&batch).unwrap();
        let (t, seen) = timed_keep(|| slice.refresh().unwrap());
        assert_eq!(seen, 1, "the slice sees its own key only");
        lib.push(t);
        let (t, seen) = timed_keep(|| whole.refresh().unwrap());
        assert_eq!(seen, 100);
        raw.push(t);
    }
    let (lib, raw) = (Sample(lib), Sample(raw));
    rows.push(Row {
        backend: backend.into(),
        case: format!(
            "S2 refresh a 1% slice after 100 changes, 1 in it (vs. the whole table's map), \
             {n} rows"
        ),
        lib,
        raw,
    });

    // S3: the other slices change a lot between two refreshes of this one: 10,000 rows
    // of theirs, 1 of its own. The log's index on the key lets the slice read its range
    // of it rather than every change.
    let (mut lib, mut raw) = (Vec::new(), Vec::new());
    for round in 0..args.rounds {
        let mut batch = write_thru_hash::Batch::default();
        batch.puts = (0..10_000)
            .map(|i| {
                let k = format!("\"t{:02}/busy{round:02}-{i:05}\"", 43 + i % 50);
                (k.into_bytes(), value(i).into_bytes())
            })
            .collect();
        batch.puts.push((
            format!("\"t42/busy{round:02}\"").into_bytes(),
            value(round).into_bytes(),
        ));
        writer.apply(&batch).unwrap();
        let (t, seen) = timed_keep(|| slice.refresh().unwrap());
        assert_eq!(seen, 1, "the slice sees its own key only");
        lib.push(t);
        let (t, seen) = timed_keep(|| whole.refresh().unwrap());
        assert_eq!(seen, 10_001);
        raw.push(t);
    }
    rows.push(Row {
        backend: backend.into(),
        case: format!(
            "S3 refresh a 1% slice after 10,001 changes, 1 in it (vs. the whole table's \
             map), {n} rows"
        ),
        lib: Sample(lib),
        raw: Sample(raw),
    });
}

fn main() {
    let args = Args::parse();
    let mut rows = Vec::new();
    let mut notes = Vec::new();
    if args.runs("sqlite") {
        sqlite(&mut rows, &mut notes, &args, "WAL");
        sqlite(&mut rows, &mut notes, &args, "DELETE");
    }
    if args.runs("shared") {
        shared(&mut rows, &mut notes, &args);
        if let Ok(url) = std::env::var("WTH_POSTGRES_URL") {
            shared_postgres(&mut rows, &args, &url);
        }
        if let Ok(url) = std::env::var("WTH_MYSQL_URL") {
            shared_mysql(&mut rows, &args, &url);
        }
    }
    match std::env::var("WTH_POSTGRES_URL") {
        Ok(_) if !args.runs("server") => {}
        Ok(url) => server::<postgres::Client>(&mut rows, &args, &url),
        Err(_) => eprintln!(
            "WTH_POSTGRES_URL not set: PostgreSQL not measured (scripts/bench.sh starts a server)"
        ),
    }
    match std::env::var("WTH_MYSQL_URL") {
        Ok(_) if !args.runs("server") => {}
        Ok(url) => server::<mysql::Conn>(&mut rows, &args, &url),
        Err(_) => eprintln!(
            "WTH_MYSQL_URL not set: MariaDB not measured (scripts/bench.sh starts a server)"
        ),
    }
    let dir = tempfile::tempdir().unwrap();
    let lite = format!("sqlite:{}", dir.path().join("coherence.sqlite").display());
    let coherent = args.runs("coherence");
    if coherent {
        coherence(&mut rows, &mut notes, &args, "SQLite (WAL)", &lite);
    }
    if let Some(url) = std::env::var("WTH_POSTGRES_URL").ok().filter(|_| coherent) {
        coherence(&mut rows, &mut notes, &args, "PostgreSQL", &url);
    }
    if let Some(url) = std::env::var("WTH_MYSQL_URL").ok().filter(|_| coherent) {
        // Triggers cannot live in the `mysql` schema the test servers' URL names.
        let mut c = <mysql::Conn as Raw>::connect(&url);
        Raw::exec(&mut c, "CREATE DATABASE IF NOT EXISTS wth_bench");
        let (base, _) = url.rsplit_once('/').unwrap();
        coherence(
            &mut rows,
            &mut notes,
            &args,
            "MariaDB",
            &format!("{base}/wth_bench"),
        );
    }
    if args.runs("slices") {
        slices(
            &mut rows,
            &mut notes,
            &args,
            "SQLite (WAL)",
            &lite.replace("coherence", "slices"),
        );
        if let Ok(url) = std::env::var("WTH_POSTGRES_URL") {
            slices(&mut rows, &mut notes, &args, "PostgreSQL", &url);
        }
        if let Ok(url) = std::env::var("WTH_MYSQL_URL") {
            let mut c = <mysql::Conn as Raw>::connect(&url);
            Raw::exec(&mut c, "CREATE DATABASE IF NOT EXISTS wth_bench");
            let (base, _) = url.rsplit_once('/').unwrap();
            slices(
                &mut rows,
                &mut notes,
                &args,
                "MariaDB",
                &format!("{base}/wth_bench"),
            );
        }
    }
    let galera_urls: Vec<String> = (1..=3)
        .filter_map(|n| std::env::var(format!("WTH_GALERA_URL_{n}")).ok())
        .collect();
    if args.runs("galera") && galera_urls.len() == 3 {
        galera(&mut rows, &mut notes, &args, &galera_urls);
    }
    println!("| backend | case | write-thru-hash, median (min-max) | raw driver | ratio (min-max of rounds) |");
    println!("|---|---|---:|---:|---:|");
    for r in rows {
        let ratio = |l: Duration, r: Duration| l.as_secs_f64() / r.as_secs_f64();
        let spread = if r.lib.0.len() == r.raw.0.len() && r.lib.0.len() > 1 {
            let each: Vec<f64> = r
                .lib
                .0
                .iter()
                .zip(&r.raw.0)
                .map(|(l, r)| ratio(*l, *r))
                .collect();
            let lo = each.iter().copied().fold(f64::INFINITY, f64::min);
            let hi = each.iter().copied().fold(0.0, f64::max);
            format!(" ({lo:.2}-{hi:.2})")
        } else {
            String::new()
        };
        println!(
            "| {} | {} | {} | {} | {:.2}x{spread} |",
            r.backend,
            r.case,
            r.lib.show(),
            r.raw.show(),
            ratio(r.lib.median(), r.raw.median()),
        );
    }
    println!();
    for note in notes {
        println!("{note}");
    }
}
