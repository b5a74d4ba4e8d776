//! The read-modify-write API and the transaction's view, on every backend: each keeps
//! the write-through rule (memory changes only after the table did; a fresh open
//! equals the map).

use std::hash::Hash;

use serde::{Deserialize, Serialize};
use write_thru_hash::{DbHashMap, Error};

use crate::env::{chain, Env};

fn open<K, V>(env: &impl Env, table: &str) -> DbHashMap<K, V>
where
    K: Eq + Hash + Serialize + serde::de::DeserializeOwned + 'static,
    V: Serialize + serde::de::DeserializeOwned + 'static,
{
    env.builder()
        .table(table)
        .open()
        .unwrap_or_else(|e| panic!("open {table}: {}", chain(&e)))
}

fn assert_fresh_equal<K, V>(env: &impl Env, h: &DbHashMap<K, V>)
where
    K: Eq + Hash + Serialize + serde::de::DeserializeOwned + std::fmt::Debug + 'static,
    V: Serialize + serde::de::DeserializeOwned + PartialEq + std::fmt::Debug + 'static,
{
    let fresh: DbHashMap<K, V> = open(env, h.table_name());
    assert_eq!(&fresh, h, "a fresh open differs from the map");
}

/// A key type without `Clone`: the transaction's `remove` must not need it.
#[derive(Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
struct Name(String);

/// A value type without `Clone`: `upsert` must not need it.
#[derive(Debug, PartialEq, Serialize, Deserialize)]
struct Count(u64);

pub(crate) fn read_modify_write(env: &impl Env) {
    let mut h: DbHashMap<String, Count> = open(env, "rmw");
    for word in "the cat and the hat and the bat".split(' ') {
        h.upsert(word.into(), |c| Count(c.map_or(0, |c| c.0) + 1))
            .unwrap();
    }
    assert_eq!(h["the"], Count(3));
    assert_eq!(*h.upsert("cat".into(), |_| Count(10)).unwrap(), Count(10));
    assert_fresh_equal(env, &h);

    // Present: no I/O and `f` is not called, so a dropped table is no obstacle.
    let held = h
        .get_or_insert_with("the".into(), || unreachable!())
        .unwrap();
    assert_eq!(*held, Count(3));
    let made = h.get_or_insert_with("dog".into(), || Count(1)).unwrap();
    assert_eq!(*made, Count(1));

    // The batched counter: one call, one transaction, repeats folded in order.
    let mut counts: DbHashMap<String, u64> = open(env, "counts");
    let words = "a rose is a rose is a rose"
        .split(' ')
        .map(|w| (w.to_string(), 1));
    counts
        .upsert_many(words, |old, n| old.copied().unwrap_or(0) + n)
        .unwrap();
    counts
        .upsert_many([("rose".to_string(), 10)], |old, n| {
            old.copied().unwrap_or(0) * n
        })
        .unwrap();
    assert_eq!((counts["rose"], counts["a"], counts["is"]), (30, 3, 2));
    assert_fresh_equal(env, &counts);

    assert_eq!(counts.remove_many(["a", "is", "absent", "a"]).unwrap(), 2);
    assert_eq!(counts.len(), 1);
    assert_eq!(counts.remove_many(["absent"]).unwrap(), 0);
    counts
        .insert_many((0..10).map(|i| (format!("n{i}"), i)))
        .unwrap();
    assert_eq!(counts.retain(|_, v| v % 2 == 0).unwrap(), 5);
    assert_eq!(counts.retain(|_, _| true).unwrap(), 0);
    assert_fresh_equal(env, &counts);

    // A failed write changes nothing: the rejected value, in each form.
    env.reject_value("counts", "13");
    let before = counts.to_hash_map();
    assert!(counts.upsert("rose".into(), |_| 13).is_err());
    assert!(counts
        .upsert_many([("x".to_string(), 1), ("rose".into(), 13)], |_, n| n)
        .is_err());
    assert!(counts.get_or_insert_with("y".into(), || 13).is_err());
    assert_eq!(*counts, before);
    env.exec(&format!("DROP TABLE {}", env.q("counts")));
    assert!(counts.remove_many(["rose"]).is_err());
    assert_eq!(*counts, before);
}

pub(crate) fn transaction_view_and_previous_values(env: &impl Env) {
    let mut h: DbHashMap<Name, Count> = open(env, "txview");
    h.insert_many([(Name("a".into()), Count(1)), (Name("b".into()), Count(2))])
        .unwrap();
    let n = h
        .transaction(|tx| {
            assert_eq!(tx.len(), 2);
            assert_eq!(tx.insert(Name("a".into()), Count(10))?, Some(Count(1)));
            assert_eq!(tx.insert(Name("a".into()), Count(11))?, Some(Count(10)));
            assert_eq!(tx.insert(Name("c".into()), Count(3))?, None);
            assert_eq!(tx.remove(&Name("b".into()))?, Some(Count(2)));
            assert_eq!(tx.remove(&Name("b".into()))?, None);
            assert_eq!(
                tx.upsert(Name("c".into()), |c| Count(c.unwrap().0 * 10))?,
                &Count(30)
            );
            assert_eq!(
                tx.upsert(Name("d".into()), |c| Count(c.map_or(4, |c| c.0)))?
                    .0,
                4
            );
            assert_eq!(tx.len(), 3);
            assert!(!tx.is_empty());
            let mut seen: Vec<(String, u64)> = tx.iter().map(|(k, v)| (k.0.clone(), v.0)).collect();
            seen.sort();
            assert_eq!(seen, [("a".into(), 11), ("c".into(), 30), ("d".into(), 4)]);
            Ok(tx.len())
        })
        .unwrap();
    assert_eq!(n, 3);
    assert_eq!(h.len(), 3);
    assert_eq!(h[&Name("a".into())], Count(11));
    assert!(!h.contains_key(&Name("b".into())));
    assert_fresh_equal(env, &h);

    // Rolled back, by an error, a panic or the database: memory as it was.
    let snapshot = |h: &DbHashMap<Name, Count>| {
        let mut v: Vec<(String, u64)> = h.iter().map(|(k, v)| (k.0.clone(), v.0)).collect();
        v.sort();
        v
    };
    let before = snapshot(&h);
    let r = h.transaction(|tx| {
        tx.remove(&Name("a".into()))?;
        tx.insert(Name("c".into()), Count(0))?;
        tx.clear();
        tx.insert(Name("z".into()), Count(26))?;
        Err::<(), _>(Error::abort("no"))
    });
    assert!(matches!(r, Err(Error::Aborted(_))));
    assert_eq!(snapshot(&h), before);
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        h.transaction::<()>(|tx| {
            tx.remove(&Name("a".into()))?;
            tx.upsert(Name("d".into()), |_| Count(0))?;
            panic!("inside")
        })
    }));
    assert!(r.is_err());
    assert_eq!(snapshot(&h), before);
    env.exec(&format!("DROP TABLE {}", env.q("txview")));
    let r = h.transaction(|tx| {
        tx.remove(&Name("a".into()))?;
        tx.insert(Name("e".into()), Count(5))
    });
    assert!(r.is_err());
    assert_eq!(snapshot(&h), before);
}

/// Errors: the caller's own reason comes back from `abort`; a chain printed cause by
/// cause shows each cause once.
pub(crate) fn errors_chain_each_cause_once(env: &impl Env) {
    #[derive(Debug)]
    struct Mine(u32);
    impl std::fmt::Display for Mine {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            write!(f, "mine {}", self.0)
        }
    }
    impl std::error::Error for Mine {}

    let mut h: DbHashMap<String, i64> = open(env, "chains");
    let err = h
        .transaction(|_| Err::<(), _>(Error::abort(Mine(7))))
        .unwrap_err();
    let source = std::error::Error::source(&err).expect("the reason is the source");
    assert_eq!(source.downcast_ref::<Mine>().map(|m| m.0), Some(7));

    h.insert("a".into(), 1).unwrap();
    env.exec(&format!("DROP TABLE {}", env.q("chains")));
    let err = h.insert("b".into(), 2).unwrap_err();
    assert!(matches!(err, Error::Database { .. }));
    assert_once(&err);
    let bad = DbHashMap::<String, i64>::open_url("nosuch://u:pw@h/db").unwrap_err();
    assert_once(&bad);
}

/// No message in the chain repeats the one after it.
fn assert_once(err: &dyn std::error::Error) {
    let mut messages = vec![err.to_string()];
    let mut next = err.source();
    while let Some(cause) = next {
        messages.push(cause.to_string());
        next = cause.source();
    }
    for pair in messages.windows(2) {
        assert!(
            !pair[1].is_empty() && !pair[0].contains(&pair[1]),
            "{:?} repeats its source {:?}",
            pair[0],
            pair[1]
        );
    }
}

/// Batches big enough for `insert_many` to stream them to the store (SQLite, from
/// 50,000 pairs) while it fills the map: all of a batch or none of it, in memory and in the table alike,
/// whatever stops it: the server rejecting a row far into the batch, a value that does
/// not encode, a codec that panics. Keys repeated in the batch keep their last value.
pub(crate) fn big_batches_are_all_or_nothing(env: &impl Env) {
    let mut h: DbHashMap<String, f64> = open(env, "big");
    h.insert_many((0..60_000).map(|i| (format!("k{i}"), f64::from(i))))
        .unwrap();
    let before = h.to_hash_map();
    assert_fresh_equal(env, &h);

    // Rejected by the server at the 50,000th row: old keys keep their old values, new
    // keys are not there.
    env.reject_value("big", "-1.0");
    let batch = (30_000..90_000).map(|i| {
        let v = if i == 80_000 {
            -1.0
        } else {
            -f64::from(i) - 2.0
        };
        (format!("k{i}"), v)
    });
    let err = h.insert_many(batch).unwrap_err();
    assert!(matches!(err, Error::Database { .. }), "{}", chain(&err));
    assert_eq!(
        h.to_hash_map(),
        before,
        "memory changed by a rejected batch"
    );
    assert_fresh_equal(env, &h);

    // A value that does not encode (JSON has no NaN), far into the batch.
    let batch = (0..60_000).map(|i| (format!("n{i}"), if i == 55_000 { f64::NAN } else { 1.0 }));
    let err = h.insert_many(batch).unwrap_err();
    assert!(matches!(err, Error::Encode { .. }), "{}", chain(&err));
    assert_eq!(h.to_hash_map(), before);
    assert_fresh_equal(env, &h);

    // Repeated keys: the last value wins, here and in the table.
    let batch: Vec<(String, f64)> = (0..60_000)
        .map(|i| (format!("k{}", i % 25_000), f64::from(i)))
        .collect();
    h.insert_many(batch).unwrap();
    assert_eq!(h["k0"], 50_000.0);
    assert_eq!(h["k24999"], 49_999.0);
    assert_eq!(h["k59999"], 59_999.0);
    assert_fresh_equal(env, &h);
}

/// A codec that panics far into a big batch: the panic goes on to the caller, and the
/// map and the table are as they were.
pub(crate) fn a_codec_panic_in_a_big_batch_changes_nothing(env: &impl Env) {
    let codec = write_thru_hash::FnCodec::text(
        |v: &i64| {
            assert!(*v != 7_777_777, "the codec panics");
            v.to_string()
        },
        |s: &str| s.parse::<i64>(),
    );
    let mut h: DbHashMap<String, i64> = env
        .builder()
        .table("panicky")
        .value_codec(codec)
        .open()
        .unwrap();
    h.insert_many((0..2000).map(|i| (format!("k{i}"), i)))
        .unwrap();
    let before = h.to_hash_map();
    let caught = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        h.insert_many(
            (1000..4000).map(|i| (format!("k{i}"), if i == 3000 { 7_777_777 } else { -i })),
        )
    }));
    assert!(caught.is_err(), "the panic reaches the caller");
    assert_eq!(h.to_hash_map(), before);
    h.insert("after".into(), 1).unwrap();
    let fresh: DbHashMap<String, i64> = env
        .builder()
        .table("panicky")
        .value_codec(write_thru_hash::FnCodec::text(
            |v: &i64| v.to_string(),
            |s: &str| s.parse::<i64>(),
        ))
        .open()
        .unwrap();
    assert_eq!(fresh, h);
}

/// The table without a map (`write_thru_hash::connect` and the `Store` methods `wth`
/// uses at any table size): rows streamed in one transaction, a key given twice keeping
/// its last value, a source that fails half-way writing nothing, a replace, a count, a
/// scan in key order from a key and up to a limit, and one key read alone.
pub(crate) fn store_without_a_map(env: &impl Env) {
    use write_thru_hash::{Format, Puts, TableSpec};
    let mut store = write_thru_hash::connect(&env.url()).unwrap();
    store
        .open(&TableSpec::new("rows", Format::Text, Format::Text))
        .unwrap();
    let row = |i: usize| {
        (
            format!("\"k{i:05}\"").into_bytes(),
            format!("{i}").into_bytes(),
        )
    };
    // 10,000 rows in chunks of 1,000, then k00007 again with another value.
    let mut chunks: Vec<Puts> = (0..10)
        .map(|c| (c * 1000..(c + 1) * 1000).map(row).collect())
        .collect();
    chunks.push(vec![(b"\"k00007\"".to_vec(), b"-7".to_vec())]);
    let mut source = chunks.clone().into_iter();
    store
        .put_rows(false, false, &mut |_| source.next().map(Ok))
        .unwrap();
    assert_eq!(store.count().unwrap(), 10_000);
    assert_eq!(store.get(b"\"k00007\"").unwrap(), Some(b"-7".to_vec()));
    assert_eq!(store.get(b"\"nope\"").unwrap(), None);

    // A source that fails after 5 chunks: nothing of the replace is written.
    let mut given = 0;
    let failed = store.put_rows(true, true, &mut |_| {
        given += 1;
        if given > 5 {
            return Some(Err(write_thru_hash::Error::abort("the source failed")));
        }
        Some(Ok((0..100)
            .map(|i| row(50_000 + given * 100 + i))
            .collect()))
    });
    assert!(failed.is_err());
    assert_eq!(store.count().unwrap(), 10_000, "nothing of it was written");

    let mut seen = Vec::new();
    let scanned = store.scan(Some(b"\"k09998\""), Some(5), &mut |k, v| {
        seen.push((k.to_vec(), v.to_vec()));
        Ok(())
    });
    if !matches!(scanned, Err(write_thru_hash::Error::Unsupported { .. })) {
        scanned.unwrap();
        assert_eq!(seen, vec![row(9998), row(9999)]);
        let mut all = Vec::new();
        store
            .scan(None, None, &mut |k, _| {
                all.push(k.to_vec());
                Ok(())
            })
            .unwrap();
        assert_eq!(all.len(), 10_000);
        assert!(all.windows(2).all(|w| w[0] < w[1]), "in key order");
    }

    // A replace with the rows of another table.
    let mut source = vec![vec![row(1), row(2)]].into_iter();
    store
        .put_rows(true, true, &mut |_| source.next().map(Ok))
        .unwrap();
    assert_eq!(store.count().unwrap(), 2);
    let map: write_thru_hash::DbHashMap<String, i64> = env
        .wrap_builder(DbHashMap::builder_url(&env.url()))
        .table("rows")
        .open()
        .unwrap();
    assert_eq!(map.len(), 2);
    assert_eq!(map["k00002"], 2);
}
