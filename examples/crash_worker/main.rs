//! The worker of the crash harness (`tests/crash.rs`): performs the operations of a
//! seed on a table and prints the number of each one as soon as it is acknowledged,
//! until the test kills it with SIGKILL.
//!
//! ```text
//! cargo run --example crash_worker -- URL TABLE SEED COUNT
//! ```

#[allow(dead_code)] // the test that kills this worker uses the rest
mod ops;

use std::io::Write;

use write_thru_hash::DbHashMap;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [url, table, seed, count] = &args[..] else {
        eprintln!("usage: crash_worker URL TABLE SEED COUNT");
        std::process::exit(2);
    };
    let (seed, count): (u64, usize) = match (seed.parse(), count.parse()) {
        (Ok(s), Ok(c)) => (s, c),
        _ => {
            eprintln!("crash_worker: SEED and COUNT are numbers");
            std::process::exit(2);
        }
    };
    let mut h: DbHashMap<String, i64> = match DbHashMap::builder_url(url).table(table).open() {
        Ok(h) => h,
        Err(e) => {
            eprintln!("crash_worker: {e}");
            std::process::exit(1);
        }
    };
    let mut out = std::io::stdout().lock();
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
                    }
                }
                Ok(())
            }),
        };
        if let Err(e) = result {
            eprintln!("crash_worker: operation {i}: {e}");
            std::process::exit(1);
        }
        // The acknowledgement: operation `i` returned Ok.
        if writeln!(out, "{i}").and_then(|()| out.flush()).is_err() {
            std::process::exit(1);
        }
    }
}
