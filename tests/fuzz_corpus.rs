//! Replays the fuzz corpus (`fuzz/corpus/<target>/`) through the same checks the fuzz
//! targets run (`fuzz/common.rs`), as ordinary tests: every input the fuzzer kept
//! stays harmless. `bash scripts/fuzz.sh` grows the corpus.

#[path = "../fuzz/common.rs"]
#[allow(dead_code)]
mod common;

#[path = "../examples/datalog/syntax.rs"]
#[allow(dead_code)]
mod syntax;

use std::path::Path;

fn replay(target: &str, check: fn(&[u8])) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/corpus")
        .join(target);
    let mut n = 0;
    for entry in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        let path = entry.unwrap().path();
        let data = std::fs::read(&path).unwrap();
        let outcome = std::panic::catch_unwind(|| check(&data));
        assert!(outcome.is_ok(), "{} panics {target}", path.display());
        n += 1;
    }
    assert!(n > 0, "the {target} corpus is empty");
    eprintln!("{target}: {n} inputs replayed");
}

#[test]
fn codecs_corpus() {
    replay("codecs", common::codecs);
}

#[test]
fn url_corpus() {
    replay("url", common::url);
}

#[test]
fn datalog_corpus() {
    replay("datalog", common::datalog);
}

#[test]
fn load_corpus() {
    replay("load", common::load);
}
