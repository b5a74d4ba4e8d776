//! The operations of a crash trial, generated from a seed so that the worker and the
//! test that kills it see the same sequence.

use std::collections::HashMap;

#[derive(Debug, Clone)]
pub(crate) enum Op {
    Insert(u16, i64),
    Remove(u16),
    Clear,
    InsertMany(Vec<(u16, i64)>),
    /// Inserts (`Some`) and removes (`None`), all or nothing.
    Transaction(Vec<(u16, Option<i64>)>),
}

pub(crate) fn key(k: u16) -> String {
    format!("k{k}")
}

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// `n` operations on keys `k0`…`k39`.
pub(crate) fn ops(seed: u64, n: usize) -> Vec<Op> {
    let mut r = Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
    let small = |r: &mut Rng| (r.below(40) as u16, r.below(1_000_000) as i64);
    (0..n)
        .map(|_| match r.below(100) {
            0..=44 => {
                let (k, v) = small(&mut r);
                Op::Insert(k, v)
            }
            45..=64 => Op::Remove(r.below(40) as u16),
            65 => Op::Clear,
            66..=82 => Op::InsertMany((0..1 + r.below(20)).map(|_| small(&mut r)).collect()),
            _ => Op::Transaction(
                (0..1 + r.below(8))
                    .map(|_| {
                        let (k, v) = small(&mut r);
                        (k, (r.below(3) > 0).then_some(v))
                    })
                    .collect(),
            ),
        })
        .collect()
}

/// What `op` does to a plain map: the model the table is checked against.
pub(crate) fn apply(model: &mut HashMap<String, i64>, op: &Op) {
    match op {
        Op::Insert(k, v) => {
            model.insert(key(*k), *v);
        }
        Op::Remove(k) => {
            model.remove(&key(*k));
        }
        Op::Clear => model.clear(),
        Op::InsertMany(pairs) => model.extend(pairs.iter().map(|(k, v)| (key(*k), *v))),
        Op::Transaction(changes) => {
            for (k, v) in changes {
                match v {
                    Some(v) => model.insert(key(*k), *v),
                    None => model.remove(&key(*k)),
                };
            }
        }
    }
}
