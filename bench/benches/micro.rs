//! Micro benchmarks (divan): `cargo bench -p wth-bench`. The side-by-side table with
//! the raw drivers is the `bench` binary (`bash scripts/bench.sh`).

use std::collections::HashMap;
use std::time::Duration;

use write_thru_hash::{Codec, DbHashMap, Json, WriteBehind};

fn main() {
    divan::main();
}

fn keys(n: usize) -> Vec<String> {
    (0..n).map(|i| format!("key-{i:08}")).collect()
}

/// A read through `Deref`, against the same read on a plain `HashMap`.
#[divan::bench(args = ["DbHashMap", "HashMap"])]
fn get(bencher: divan::Bencher, which: &str) {
    let ks = keys(100_000);
    let mut h: DbHashMap<String, i64> = DbHashMap::open_url("sqlite::memory:").unwrap();
    h.insert_many(ks.iter().cloned().zip(0..)).unwrap();
    let plain: HashMap<String, i64> = (*h).clone();
    let probe: Vec<String> = ks.iter().step_by(7).cloned().collect();
    let mut i = 0;
    bencher.bench_local(|| {
        i = (i + 1) % probe.len();
        let k = &probe[i];
        if which == "DbHashMap" {
            divan::black_box(h.get(k))
        } else {
            divan::black_box(plain.get(k))
        }
        .copied()
    });
}

/// The JSON codec's canonical key encoding, and its value encoding.
#[divan::bench]
fn encode_key(bencher: divan::Bencher) {
    let k = "key-00001234".to_string();
    let mut out = Vec::with_capacity(64);
    bencher.bench_local(|| {
        out.clear();
        Json.encode_key(divan::black_box(&k), &mut out).unwrap();
    });
}

/// What a caller waits for one insert in write-behind mode.
#[divan::bench(sample_count = 20, sample_size = 1000)]
fn write_behind_insert(bencher: divan::Bencher) {
    let mut h: DbHashMap<String, i64> = DbHashMap::builder_url("sqlite::memory:")
        .write_behind(WriteBehind::default().max_delay(Duration::from_millis(5)))
        .open()
        .unwrap();
    let mut i = 0i64;
    bencher.bench_local(|| {
        i += 1;
        h.insert(format!("k{}", i % 50_000), i).unwrap();
    });
    h.flush().unwrap();
}
