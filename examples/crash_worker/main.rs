//! The worker of the crash harness (`tests/crash.rs`): performs the operations of a
//! seed on a table and prints the number of each one as soon as it is acknowledged,
//! until the test kills it with SIGKILL.
//!
//! ```text
//! cargo run --example crash_worker -- URL TABLE SEED COUNT [behind]
//! ```
//!
//! With `behind`, the map is in write-behind mode and a call counts as acknowledged
//! once a `flush()` after it returned: every fifth call flushes, and prints the
//! numbers of the calls it made durable.
//!
//! With `coherent`, the map is coherent (several workers share one table): every
//! tenth call refreshes, and a write that conflicted with another worker's is retried
//! once more rather than fatal. After the last call the worker prints `done`, waits for
//! a line on standard input, refreshes, and prints its map as one line of JSON with
//! sorted keys, for the test to compare with the table, then `conflicts N`: how many
//! writes it retried after a conflict.

#[allow(dead_code)] // the test that kills this worker uses the rest
mod ops;

use std::io::Write;

use std::time::Duration;

use write_thru_hash::{DbHashMap, WriteBehind};

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (url, table, seed, count, mode) = match &args[..] {
        [url, table, seed, count] => (url, table, seed, count, ""),
        [url, table, seed, count, mode] if mode == "behind" || mode == "coherent" => {
            (url, table, seed, count, mode.as_str())
        }
        _ => {
            eprintln!("usage: crash_worker URL TABLE SEED COUNT [behind|coherent]");
            std::process::exit(2);
        }
    };
    let (behind, coherent) = (mode == "behind", mode == "coherent");
    let (seed, count): (u64, usize) = match (seed.parse(), count.parse()) {
        (Ok(s), Ok(c)) => (s, c),
        _ => {
            eprintln!("crash_worker: SEED and COUNT are numbers");
            std::process::exit(2);
        }
    };
    let mut builder = DbHashMap::builder_url(url).table(table);
    if behind {
        builder = builder.write_behind(WriteBehind::default().max_delay(Duration::from_millis(2)));
    }
    if coherent {
        builder = builder.coherent();
    }
    let mut h: DbHashMap<String, i64> = match builder.open() {
        Ok(h) => h,
        Err(e) => {
            eprintln!("crash_worker: {e}");
            std::process::exit(1);
        }
    };
    let mut out = std::io::stdout().lock();
    let mut durable = 0;
    for (i, op) in ops::ops(seed, count).iter().enumerate() {
        let result = match op {
            ops::Op::Insert(k, v) => h.insert(ops::key(*k), *v).map(drop),
            ops::Op::Remove(k) => h.remove(&ops::key(*k)).map(drop),
            ops::Op::Clear => h.clear(),
            ops::Op::InsertMany(pairs) => {
                h.insert_many(pairs.iter().map(|(k, v)| (ops::key(*k), *v)))
            }
            ops::Op::Transaction(changes) => h.transaction(|tx| {
                for (k, v) in changes {
                    match v {
                        Some(v) => tx.insert(ops::key(*k), *v)?,
                        None => tx.remove(&ops::key(*k))?,
                    };
                }
                Ok(())
            }),
        };
        let result = match result {
            Err(e) if coherent && e.is_retryable() => Ok(()),
            Ok(()) if coherent && i % 10 == 9 => h.refresh().map(drop),
            other => other,
        };
        if let Err(e) = result {
            eprintln!("crash_worker: operation {i}: {e}");
            std::process::exit(1);
        }
        // The acknowledgement: operation `i` returned Ok (write-behind: was flushed).
        let upto = if !behind {
            i + 1
        } else if i % 5 == 4 || i + 1 == count {
            if let Err(e) = h.flush() {
                eprintln!("crash_worker: flush after operation {i}: {e}");
                std::process::exit(1);
            }
            i + 1
        } else {
            durable
        };
        for n in durable..upto {
            if writeln!(out, "{n}").and_then(|()| out.flush()).is_err() {
                std::process::exit(1);
            }
        }
        durable = upto;
    }
    if coherent {
        let _ = writeln!(out, "done").and_then(|()| out.flush());
        let mut go = String::new();
        let _ = std::io::stdin().read_line(&mut go);
        if let Err(e) = h.refresh() {
            eprintln!("crash_worker: refresh: {e}");
            std::process::exit(1);
        }
        let sorted: std::collections::BTreeMap<&String, &i64> = h.iter().collect();
        let json = serde_json::to_string(&sorted).unwrap_or_default();
        let conflicts = h.conflicts_retried();
        let _ = writeln!(out, "{json}\nconflicts {conflicts}").and_then(|()| out.flush());
    }
}
