//! Persistence across runs: each run opens the same table, finds what earlier runs
//! wrote, and adds to it.
//!
//! ```text
//! cargo run -p write-thru-hash --example quickstart     # first run: an empty table
//! cargo run -p write-thru-hash --example quickstart     # a new process sees what the first one wrote
//! ```

use write_thru_hash::DbHashMap;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let path = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "quickstart.sqlite".into());
    let conn = rusqlite::Connection::open(&path)?;
    let mut h: DbHashMap<String, i64> = DbHashMap::open(conn)?; // table "hashtable"
    println!("opened {path}: {h:?}");

    let runs = h.get("runs").copied().unwrap_or(0) + 1;
    h.insert("runs".into(), runs)?; // persisted first, then applied in memory
    h.insert("a".into(), 1)?;
    h.insert("b".into(), 2)?;
    h.remove("b")?;
    assert_eq!(h.get("a"), Some(&1)); // memory only, no I/O, no Result

    println!("now:       {h:?}");
    println!("run {runs}: run me again and I will find these values in {path}");
    Ok(())
}
