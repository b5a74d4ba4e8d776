//! The batched word counter: words read from standard input (or the command line) are
//! counted in a table, one transaction per run, however often a word repeats.
//!
//! ```sh
//! echo "the cat and the hat" | cargo run -p write-thru-hash --example counter
//! cargo run -p write-thru-hash --example counter -- the the end   # counts add up across runs
//! ```

use std::io::Read;

use write_thru_hash::DbHashMap;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut text = std::env::args().skip(1).collect::<Vec<_>>().join(" ");
    if text.is_empty() {
        std::io::stdin().read_to_string(&mut text)?;
    }
    let mut counts: DbHashMap<String, u64> = DbHashMap::open_path("counter.sqlite")?;
    // One call, one transaction: each word's count is its old count plus one per time
    // it appears, and nothing is counted unless all of it is.
    let words = text.split_whitespace().map(|w| (w.to_lowercase(), 1));
    counts.upsert_many(words, |old, n| old.copied().unwrap_or(0) + n)?;

    let mut top: Vec<(&String, &u64)> = counts.iter().collect();
    top.sort_by(|a, b| b.1.cmp(a.1).then(a.0.cmp(b.0)));
    for (word, n) in top.into_iter().take(10) {
        println!("{n:6} {word}");
    }
    Ok(())
}
