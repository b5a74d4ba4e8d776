//! The conformance suite: every test here runs on every backend (see `main.rs`).

use std::collections::{BTreeMap, HashMap};

use proptest::prelude::*;
use serde::{Deserialize, Serialize};
use write_thru_hash::{Bytes, DbHashMap, Dialect, Error, FnCodec, Text};

use crate::env::Env;

fn open<K, V>(env: &impl Env, table: &str) -> DbHashMap<K, V>
where
    K: Eq + std::hash::Hash + Serialize + serde::de::DeserializeOwned + 'static,
    V: Serialize + serde::de::DeserializeOwned + 'static,
{
    env.builder()
        .table(table)
        .open()
        .unwrap_or_else(|e| panic!("open {table}: {e}"))
}

/// The write-through rule's check: a fresh open of the table equals the map.
fn assert_persisted<K, V>(env: &impl Env, table: &str, h: &DbHashMap<K, V>)
where
    K: Eq + std::hash::Hash + Serialize + serde::de::DeserializeOwned + std::fmt::Debug + 'static,
    V: Serialize + serde::de::DeserializeOwned + PartialEq + std::fmt::Debug + 'static,
{
    let fresh: DbHashMap<K, V> = open(env, table);
    assert_eq!(&fresh, h, "a fresh open of {table:?} differs from the map");
}

// ---- The Racket original's tests.rkt, ported ----

pub(crate) fn basic_operations(env: &impl Env) {
    let mut h: DbHashMap<String, i64> = env.builder_conn().open().unwrap();
    assert!(env.table_exists("hashtable"));
    h.insert("a".into(), 1).unwrap();
    h.insert("b".into(), 2).unwrap();
    h.insert("c".into(), 3).unwrap();
    h.remove("b").unwrap();
    assert_eq!(h.get("a"), Some(&1));
    assert_eq!(h["c"], 3);
    let expected = HashMap::from([("a".to_string(), 1), ("c".to_string(), 3)]);
    assert_eq!(h, expected);
    let h2: DbHashMap<String, i64> = env.builder_conn().open().unwrap();
    assert_eq!(h2, expected);
    h.clear().unwrap();
    let h3: DbHashMap<String, i64> = env.builder_conn().open().unwrap();
    assert_eq!(h3, HashMap::new());
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
struct KeyStruct {
    subject_code: Vec<i64>,
    id: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct DocStruct {
    author: Vec<String>,
    title: String,
    content: String,
}

pub(crate) fn complex_keys_and_values(env: &impl Env) {
    let mut h: DbHashMap<KeyStruct, DocStruct> = open(env, "hashtable");
    let key = KeyStruct {
        subject_code: vec![123, 456, 789],
        id: "abc123".into(),
    };
    let doc = DocStruct {
        author: vec!["Jim".into(), "Bob".into()],
        title: "Title A".into(),
        content: "blah blah blah".into(),
    };
    h.insert(key.clone(), doc.clone()).unwrap();
    assert_eq!(h.get(&key), Some(&doc));
    let expected = HashMap::from([(key, doc)]);
    assert_eq!(h, expected);
    let h2: DbHashMap<KeyStruct, DocStruct> = open(env, "hashtable");
    assert_eq!(h2, expected);
    // A map inside a key encodes the same however it iterates.
    let mut m: DbHashMap<BTreeMap<String, i32>, i32> = open(env, "maps in keys");
    let k: BTreeMap<String, i32> = (0..20).map(|i| (format!("k{i}"), i)).collect();
    m.insert(k.clone(), 1).unwrap();
    m.insert(k.clone(), 2).unwrap();
    assert_persisted(env, "maps in keys", &m);
    assert_eq!(
        env.count(&format!("SELECT count(*) FROM {}", env.q("maps in keys"))),
        1
    );
}

pub(crate) fn custom_table_name(env: &impl Env) {
    let name = "hopefully it is quoted properly";
    let mut h: DbHashMap<String, i64> = open(env, name);
    assert!(env.table_exists(name));
    h.insert("a".into(), 1).unwrap();
    assert_eq!(h["a"], 1);
    assert_eq!(h, HashMap::from([("a".to_string(), 1)]));
    assert_persisted(env, name, &h);
}

pub(crate) fn initial_src_then_replace(env: &impl Env) {
    let initial = HashMap::from([("abc".to_string(), 123), ("def".to_string(), 456)]);
    let mut h: DbHashMap<String, i64> = env.builder_conn().src(initial.clone()).open().unwrap();
    assert!(env.table_exists("hashtable"));
    assert_eq!(h, initial);
    h.insert("ghi".into(), 789).unwrap();
    let expected = HashMap::from([
        ("abc".to_string(), 123),
        ("def".to_string(), 456),
        ("ghi".to_string(), 789),
    ]);
    assert_eq!(h, expected);
    assert_persisted(env, "hashtable", &h);
    let h3: DbHashMap<String, i64> = env
        .builder_conn()
        .src([("jkl".to_string(), 101)])
        .open()
        .unwrap();
    assert_eq!(h3, HashMap::from([("jkl".to_string(), 101)]));
    assert_persisted(env, "hashtable", &h3);
}

// ---- Beyond the original ----

pub(crate) fn odd_table_names_are_quoted(env: &impl Env) {
    let names = [
        "with \"double\" quotes",
        "with `backticks` and 'single'",
        "semi; DROP TABLE hashtable; --",
        "héllo wörld ñ 日本",
        // Not also "upper lower": SQLite compares table names ignoring ASCII case,
        // even quoted ones, so on SQLite the two name one table.
        "UPPER lower",
        "back\\slash",
        "key",
        "select",
    ];
    for (i, name) in names.iter().enumerate() {
        let mut h: DbHashMap<String, usize> = open(env, name);
        h.insert(name.to_string(), i).unwrap();
        assert!(env.table_exists(name), "{name:?}");
    }
    for (i, name) in names.iter().enumerate() {
        let h: DbHashMap<String, usize> = open(env, name);
        assert_eq!(h, HashMap::from([(name.to_string(), i)]), "{name:?}");
    }
}

pub(crate) fn unusable_table_names_are_refused_before_writing(env: &impl Env) {
    let mut names = vec![String::new(), "nul\0byte".to_string()];
    match env.dialect() {
        Dialect::Postgres => names.push("x".repeat(64)),
        Dialect::Mysql => names.extend(["y".repeat(65), "trailing ".into(), "crab 🦀".into()]),
        _ => names.push("sqlite_mine".into()),
    }
    for name in names {
        let err = env
            .builder::<String, i64>()
            .table(&name)
            .open()
            .unwrap_err();
        assert!(
            matches!(err, Error::InvalidTableName { .. }),
            "{name:?}: {err}"
        );
        assert!(err.to_string().contains("choose another name"), "{err}");
    }
    if env.dialect() == Dialect::Postgres {
        // Two names that PostgreSQL would truncate to the same 63 bytes stay distinct
        // because both are refused.
        let a = format!("{}a", "p".repeat(63));
        assert!(env.builder::<String, i64>().table(&a).open().is_err());
    }
}

pub(crate) fn keys_compare_byte_for_byte(env: &impl Env) {
    let mut h: DbHashMap<String, i64> = open(env, "keys");
    let keys = ["a", "A", "a ", " a", "ä", "a\u{0308}", "", "\t", "ß", "ss"];
    for (i, k) in keys.iter().enumerate() {
        h.insert(k.to_string(), i as i64).unwrap();
    }
    assert_eq!(h.len(), keys.len());
    assert_eq!(
        env.count(&format!("SELECT count(*) FROM {}", env.q("keys"))),
        keys.len() as i64
    );
    assert_persisted(env, "keys", &h);
    // The same with raw text keys in a text column.
    let mut t: DbHashMap<String, String> =
        env.builder().table("text keys").codec(Text).open().unwrap();
    for k in keys {
        t.insert(k.to_string(), k.to_uppercase()).unwrap();
    }
    let t2: DbHashMap<String, String> =
        env.builder().table("text keys").codec(Text).open().unwrap();
    assert_eq!(t, t2);
    assert_eq!(t2.len(), keys.len());
}

pub(crate) fn all_write_methods(env: &impl Env) {
    let mut h: DbHashMap<i32, String> = open(env, "writes");
    assert_eq!(h.insert(1, "one".into()).unwrap(), None);
    assert_eq!(h.insert(1, "uno".into()).unwrap(), Some("one".into()));
    h.insert_many((2..=10).map(|i| (i, i.to_string()))).unwrap();
    h.insert_many([(11, "x".to_string()), (11, "eleven".to_string())])
        .unwrap();
    assert_eq!(h[&11], "eleven");
    assert_eq!(h.remove_entry(&2).unwrap(), Some((2, "2".to_string())));
    assert_eq!(h.remove(&2).unwrap(), None);
    assert!(h.update(&3, |v| v.push('!')).unwrap());
    assert!(!h.update(&99, |v| v.push('!')).unwrap());
    assert_eq!(h[&3], "3!");
    h.retain(|k, _| k % 2 == 1).unwrap();
    assert_eq!(h.len(), 6); // 1 3 5 7 9 11
    h.retain(|_, _| true).unwrap();
    assert_persisted(env, "writes", &h);
    h.insert_many(std::iter::empty()).unwrap();
    h.clear().unwrap();
    assert!(h.is_empty());
    assert_persisted(env, "writes", &h);
}

pub(crate) fn reads_are_hashmap_reads(env: &impl Env) {
    let mut h: DbHashMap<String, i64> = open(env, "reads");
    h.insert_many([("a".into(), 1), ("b".into(), 2)]).unwrap();
    let plain: &HashMap<String, i64> = &h;
    assert_eq!(plain.len(), 2);
    assert!(h.contains_key("a"));
    let mut keys: Vec<_> = h.keys().cloned().collect();
    keys.sort();
    assert_eq!(keys, ["a", "b"]);
    assert_eq!(h.values().sum::<i64>(), 3);
    assert_eq!((&h).into_iter().count(), 2);
    let printed = format!("{h:?}");
    assert!(
        printed == r#"{"a": 1, "b": 2}"# || printed == r#"{"b": 2, "a": 1}"#,
        "{printed}"
    );
    let other: DbHashMap<String, i64> = open(env, "reads");
    assert_eq!(h, other);
    assert_eq!(h.table_name(), "reads");
}

pub(crate) fn transactions_are_all_or_nothing(env: &impl Env) {
    let mut h: DbHashMap<String, i64> = open(env, "tx");
    h.insert_many([("alice".into(), 10), ("bob".into(), 0)])
        .unwrap();
    let n = h
        .transaction(|tx| {
            let a = *tx.get("alice").unwrap();
            tx.insert("alice".into(), a - 4)?;
            tx.insert("bob".into(), tx.get("bob").unwrap() + 4)?;
            tx.insert("carol".into(), 1)?;
            tx.remove("carol")?;
            tx.insert("dave".into(), 2)?;
            assert_eq!(tx.get("carol"), None);
            assert_eq!(tx.get("alice"), Some(&6));
            Ok(7)
        })
        .unwrap();
    assert_eq!(n, 7);
    assert_eq!(
        h,
        HashMap::from([("alice".into(), 6), ("bob".into(), 4), ("dave".into(), 2)])
    );
    assert_persisted(env, "tx", &h);

    let before = h.clone_map();
    let r = h.transaction(|tx| {
        tx.insert("alice".into(), 0)?;
        tx.remove("bob")?;
        Err::<(), _>(Error::abort("on purpose"))
    });
    assert!(matches!(r, Err(Error::Aborted(_))));
    assert_eq!(h, before);
    assert_persisted(env, "tx", &h);

    let r: std::thread::Result<write_thru_hash::Result<()>> =
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            h.transaction(|tx| {
                tx.clear();
                tx.insert("zed".into(), 1)?;
                panic!("inside a transaction")
            })
        }));
    assert!(r.is_err());
    assert_eq!(h, before);
    assert_persisted(env, "tx", &h);

    h.transaction(|tx| {
        tx.clear();
        assert!(!tx.contains_key("alice"));
        tx.insert("zed".into(), 1)?;
        Ok(())
    })
    .unwrap();
    assert_eq!(h, HashMap::from([("zed".into(), 1)]));
    assert_persisted(env, "tx", &h);
}

/// A statement the server rejects part-way through a batch: nothing of the batch
/// stays, in the table or in memory.
pub(crate) fn server_rejection_rolls_back_everything(env: &impl Env) {
    let mut h: DbHashMap<String, String> = open(env, "rejects");
    h.insert_many([("keep".into(), "old".into()), ("gone".into(), "x".into())])
        .unwrap();
    env.reject_value("rejects", "\"boom\"");
    let before = h.clone_map();

    let err = h.insert("k".into(), "boom".into()).unwrap_err();
    assert!(matches!(err, Error::Database { .. }), "{err}");
    assert!(
        err.to_string().contains("rejects"),
        "the message names the table: {err}"
    );
    assert_eq!(h, before);

    let many = (0..50).map(|i| {
        (
            format!("n{i}"),
            if i == 25 { "boom" } else { "ok" }.to_string(),
        )
    });
    assert!(h.insert_many(many).is_err());
    assert_eq!(h, before);

    let r = h.transaction(|tx| {
        tx.remove("gone")?;
        tx.insert("keep".into(), "new".into())?;
        tx.insert("z".into(), "boom".into())?;
        Ok(())
    });
    assert!(r.is_err());
    assert_eq!(h, before);

    assert!(h.update("keep", |v| *v = "boom".into()).is_err());
    assert_eq!(h, before);
    assert_persisted(env, "rejects", &h);

    let replaced = env
        .builder::<String, String>()
        .table("rejects")
        .src([
            ("a".to_string(), "fine".to_string()),
            ("b".to_string(), "boom".to_string()),
        ])
        .open();
    assert!(matches!(replaced, Err(Error::Database { .. })));
    assert_persisted(env, "rejects", &h);

    // The map goes on after a rejected statement.
    h.insert("after".into(), "fine".into()).unwrap();
    assert_persisted(env, "rejects", &h);
}

pub(crate) fn failures_leave_memory_unchanged(env: &impl Env) {
    let mut h: DbHashMap<String, i64> = open(env, "dropped");
    h.insert("a".into(), 1).unwrap();
    env.exec(&format!("DROP TABLE {}", env.q("dropped")));
    let before = h.clone_map();
    assert!(h.insert("b".into(), 2).is_err());
    assert!(h.remove("a").is_err());
    assert!(h.clear().is_err());
    assert!(h.insert_many([("c".into(), 3)]).is_err());
    assert_eq!(h, before);
    // A key the map does not hold: no I/O, so no error.
    assert_eq!(h.remove("absent").unwrap(), None);
    // `reload` reads the table again: here, a table that is gone.
    assert!(h.reload().is_err());
    assert_eq!(h, before);
}

pub(crate) fn reload_sees_outside_changes(env: &impl Env) {
    let mut h: DbHashMap<String, i64> = open(env, "outside");
    h.insert("a".into(), 1).unwrap();
    let mut other: DbHashMap<String, i64> = open(env, "outside");
    other.insert("b".into(), 2).unwrap();
    other.remove("a").unwrap();
    assert_eq!(h.len(), 1);
    h.reload().unwrap();
    assert_eq!(h, HashMap::from([("b".into(), 2)]));
}

pub(crate) fn undecodable_rows_are_errors(env: &impl Env) {
    let t = env.q("bad rows");
    let _: DbHashMap<String, i64> = open(env, "bad rows");
    let (k, v) = (env.q("key"), env.q("value"));
    env.exec(&format!(
        "INSERT INTO {t} ({k}, {v}) VALUES ('\"ok\"', '1')"
    ));
    env.exec(&format!(
        "INSERT INTO {t} ({k}, {v}) VALUES ('\"bad value\"', 'not json')"
    ));
    let err = env
        .builder::<String, i64>()
        .table("bad rows")
        .open()
        .unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, Error::Decode { what: "value", .. }), "{msg}");
    assert!(
        msg.contains("bad rows") && msg.contains("bad value"),
        "names table and row: {msg}"
    );

    env.exec(&format!("DELETE FROM {t}"));
    env.exec(&format!(
        "INSERT INTO {t} ({k}, {v}) VALUES ('unquoted', '1')"
    ));
    let err = env
        .builder::<String, i64>()
        .table("bad rows")
        .open()
        .unwrap_err();
    assert!(matches!(err, Error::Decode { what: "key", .. }), "{err}");

    // A key stored in a form the codec would not write: equal keys, other bytes.
    env.exec(&format!("DELETE FROM {t}"));
    env.exec(&format!(
        "INSERT INTO {t} ({k}, {v}) VALUES ('{{\"b\":1,\"a\":2}}', '1')"
    ));
    let err = DbHashMap::<BTreeMap<String, i32>, i64>::builder_url(&env.url())
        .table("bad rows")
        .open()
        .unwrap_err();
    assert!(matches!(err, Error::NonCanonicalKey { .. }), "{err}");
}

pub(crate) fn wrong_layout_is_refused(env: &impl Env) {
    env.exec(&format!(
        "CREATE TABLE {} (id INTEGER PRIMARY KEY, name TEXT)",
        env.q("other")
    ));
    let err = env
        .builder::<String, i64>()
        .table("other")
        .open()
        .unwrap_err();
    assert!(matches!(err, Error::Schema { .. }), "{err}");
    let key_type = if env.dialect() == Dialect::Mysql {
        "VARCHAR(100)"
    } else {
        "TEXT"
    };
    env.exec(&format!(
        "CREATE TABLE {} ({} {key_type} NOT NULL, {} TEXT NOT NULL)",
        env.q("no pk"),
        env.q("key"),
        env.q("value")
    ));
    let err = env
        .builder::<String, i64>()
        .table("no pk")
        .open()
        .unwrap_err();
    assert!(matches!(err, Error::Schema { .. }), "{err}");
    if env.dialect() == Dialect::Mysql {
        // A case-folding, space-padding key column would merge distinct keys.
        env.exec(
            "CREATE TABLE folding (`key` VARCHAR(100) NOT NULL PRIMARY KEY, `value` TEXT NOT NULL)",
        );
        let err = env
            .builder::<String, i64>()
            .table("folding")
            .open()
            .unwrap_err();
        assert!(err.to_string().contains("VARBINARY"), "{err}");
        env.exec("CREATE TABLE myisam (`key` VARBINARY(100) NOT NULL PRIMARY KEY, `value` TEXT NOT NULL) ENGINE=MyISAM");
        let err = env
            .builder::<String, i64>()
            .table("myisam")
            .open()
            .unwrap_err();
        assert!(err.to_string().contains("InnoDB"), "{err}");
    }
}

pub(crate) fn non_canonical_key_codec_is_caught(env: &impl Env) {
    use std::sync::atomic::{AtomicUsize, Ordering};
    static CALLS: AtomicUsize = AtomicUsize::new(0);
    // Pads keys with a growing number of zeros: equal keys, different text.
    let codec = FnCodec::text(
        |n: &u32| {
            format!(
                "{:0width$}",
                n,
                width = CALLS.fetch_add(1, Ordering::Relaxed) % 4 + 1
            )
        },
        |s: &str| s.parse::<u32>(),
    );
    let mut h: DbHashMap<u32, String> = env
        .builder()
        .table("loose")
        .key_codec(codec)
        .value_codec(Text)
        .open()
        .unwrap();
    h.insert(7, "a".into()).unwrap();
    let err = h.insert(7, "b".into()).unwrap_err();
    assert!(matches!(err, Error::NonCanonicalKey { .. }), "{err}");
    assert_eq!(h[&7], "a");
    assert_eq!(
        env.count(&format!("SELECT count(*) FROM {}", env.q("loose"))),
        1
    );
}

pub(crate) fn codecs_and_column_types(env: &impl Env) {
    // A table of plain strings, as the Racket original's layout holds them.
    let t = env.q("hashtable");
    let (k, v) = (env.q("key"), env.q("value"));
    // MySQL never ran the original; there a text key needs a byte-exact column.
    let text_type = if env.dialect() == Dialect::Mysql {
        "VARBINARY(200)"
    } else {
        "text"
    };
    env.exec(&format!(
        "CREATE TABLE {t} ({k} {text_type} NOT NULL, {v} {} NOT NULL, PRIMARY KEY ({k}))",
        env.text_type()
    ));
    env.exec(&format!(
        "INSERT INTO {t} ({k}, {v}) VALUES ('greeting', 'hello, world')"
    ));
    let mut h: DbHashMap<String, String> = env.builder_conn().codec(Text).open().unwrap();
    assert_eq!(h["greeting"], "hello, world");
    h.insert("name".into(), "Zoë \"quoted\" 'single'".into())
        .unwrap();
    let stored = env.count(&format!(
        "SELECT count(*) FROM {t} WHERE {v} = 'Zoë \"quoted\" ''single'''"
    ));
    assert_eq!(stored, 1, "text is stored as it is");

    // Raw bytes in binary columns, any byte values, large.
    let mut b: DbHashMap<Vec<u8>, Vec<u8>> =
        env.builder().table("bytes").codec(Bytes).open().unwrap();
    let all: Vec<u8> = (0..=255).collect();
    b.insert(all.clone(), all.repeat(4096)).unwrap(); // 1 MiB
    b.insert(vec![0], vec![]).unwrap();
    b.insert(vec![], vec![0]).unwrap();
    let b2: DbHashMap<Vec<u8>, Vec<u8>> = env.builder().table("bytes").codec(Bytes).open().unwrap();
    assert_eq!(b, b2);

    #[cfg(feature = "postcard")]
    {
        use write_thru_hash::Postcard;
        let mut p: DbHashMap<(String, u64), Vec<Option<f64>>> = env
            .builder()
            .table("postcard")
            .codec(Postcard)
            .open()
            .unwrap();
        p.insert(("a".into(), 1), vec![Some(1.5), None]).unwrap();
        p.insert(("b".into(), u64::MAX), vec![Some(f64::NAN)])
            .unwrap();
        let p2: DbHashMap<(String, u64), Vec<Option<f64>>> = env
            .builder()
            .table("postcard")
            .codec(Postcard)
            .open()
            .unwrap();
        assert_eq!(p2.len(), 2);
        assert_eq!(p2[&("a".to_string(), 1)], vec![Some(1.5), None]);
        assert!(p2[&("b".to_string(), u64::MAX)][0].unwrap().is_nan());
        let mut m: DbHashMap<BTreeMap<u8, u8>, u8> = env
            .builder()
            .table("postcard maps")
            .codec(Postcard)
            .open()
            .unwrap();
        assert!(matches!(
            m.insert(BTreeMap::from([(1, 2)]), 3),
            Err(Error::Encode { .. })
        ));
    }

    // Large JSON values.
    let mut j: DbHashMap<String, String> = open(env, "big");
    j.insert("64k".into(), "x".repeat(64 * 1024 + 1)).unwrap();
    j.insert("1m".into(), "é".repeat(512 * 1024)).unwrap();
    assert_persisted(env, "big", &j);
}

pub(crate) fn long_keys_are_refused_or_stored_whole(env: &impl Env) {
    let mut h: DbHashMap<Vec<u8>, i32> = env
        .builder()
        .table("long keys")
        .codec(Bytes)
        .value_codec(write_thru_hash::Json)
        .open()
        .unwrap();
    // Random bytes do not compress, so PostgreSQL's limit applies in full.
    let mut x: u64 = 0x9E3779B97F4A7C15;
    let mut random = |n: usize| -> Vec<u8> {
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    };
    match env.dialect() {
        Dialect::Sqlite => {
            let k = random(100_000);
            h.insert(k.clone(), 1).unwrap();
            assert_persisted_bytes(env, &h);
        }
        d => {
            let max = d.max_key_len().unwrap();
            let ok = random(max);
            h.insert(ok.clone(), 1).unwrap();
            let too_long = random(max + 1);
            let err = h.insert(too_long.clone(), 2).unwrap_err();
            assert!(matches!(err, Error::KeyTooLong { .. }), "{err}");
            assert!(err.to_string().contains(&format!("{}", max + 1)), "{err}");
            let r = h.insert_many([(random(10), 3), (too_long, 4)]);
            assert!(matches!(r, Err(Error::KeyTooLong { .. })));
            assert_eq!(h.len(), 1);
            assert_persisted_bytes(env, &h);
        }
    }
}

fn assert_persisted_bytes(env: &impl Env, h: &DbHashMap<Vec<u8>, i32>) {
    let fresh: DbHashMap<Vec<u8>, i32> = env
        .builder()
        .table(h.table_name())
        .codec(Bytes)
        .value_codec(write_thru_hash::Json)
        .open()
        .unwrap();
    assert_eq!(&fresh, h);
}

/// Input the codec or the database cannot take: a clear error, nothing written half,
/// memory equal to the table.
pub(crate) fn bad_input_is_refused_cleanly(env: &impl Env) {
    let mut f: DbHashMap<String, Vec<f64>> = open(env, "floats");
    f.insert("ok".into(), vec![1.5, -0.0, 1e300]).unwrap();
    for bad in [f64::NAN, f64::INFINITY, f64::NEG_INFINITY] {
        let err = f.insert("bad".into(), vec![1.0, bad]).unwrap_err();
        assert!(matches!(err, Error::Encode { what: "value", .. }), "{err}");
        assert!(err.to_string().contains("JSON cannot hold"), "{err}");
    }
    assert!(f
        .insert_many([
            ("x".to_string(), vec![0.0]),
            ("y".to_string(), vec![f64::NAN])
        ])
        .is_err());
    assert!(f
        .transaction(|tx| tx.insert("t".into(), vec![f64::NAN]))
        .is_err());
    let fresh: DbHashMap<String, Vec<f64>> = open(env, "floats");
    assert_eq!(fresh, f);
    assert_eq!(f.len(), 1);

    // A map whose keys JSON cannot write as object keys.
    let mut m: DbHashMap<String, HashMap<(i32, i32), i32>> = open(env, "pair keys");
    let err = m
        .insert("p".into(), HashMap::from([((1, 2), 3)]))
        .unwrap_err();
    assert!(matches!(err, Error::Encode { .. }), "{err}");

    // A value bigger than some servers take in one packet (MariaDB's default is 16 MiB).
    let mut big: DbHashMap<String, String> = open(env, "huge");
    big.insert("small".into(), "s".into()).unwrap();
    match big.insert("huge".into(), "h".repeat(20 << 20)) {
        Ok(_) => assert_eq!(big["huge"].len(), 20 << 20),
        Err(e) => {
            assert_eq!(env.dialect(), Dialect::Mysql, "{e}");
            assert!(matches!(e, Error::ValueTooLong { .. }), "{e}");
            assert!(e.to_string().contains("max_allowed_packet"), "{e}");
            assert!(!big.contains_key("huge"));
        }
    }
    // Many large values in one batch: more than one packet's worth altogether.
    big.insert_many((0..8).map(|i| (format!("m{i}"), "m".repeat(3 << 20))))
        .unwrap();
    let fresh: DbHashMap<String, String> = open(env, "huge");
    assert_eq!(fresh, big);

    // A table with one more column the map does not fill: its writes fail, clearly.
    let (k, v) = (env.q("key"), env.q("value"));
    let key_type = if env.dialect() == Dialect::Mysql {
        "VARBINARY(100)"
    } else {
        "TEXT"
    };
    env.exec(&format!(
        "CREATE TABLE {} ({k} {key_type} NOT NULL PRIMARY KEY, {v} {} NOT NULL, {} INTEGER NOT NULL)",
        env.q("extra"),
        env.text_type(),
        env.q("extra")
    ));
    // Every insert would fail: refused at open, naming the column (issue 21).
    let err = env
        .builder::<String, i64>()
        .table("extra")
        .open()
        .unwrap_err();
    assert!(matches!(err, Error::Schema { .. }), "{err}");
    assert!(err.to_string().contains("\"extra\""), "{err}");
    // A nullable extra column is fine.
    env.exec(&format!(
        "CREATE TABLE {} ({k} {key_type} NOT NULL PRIMARY KEY, {v} {} NOT NULL, {} INTEGER)",
        env.q("extra ok"),
        env.text_type(),
        env.q("note")
    ));
    let mut y: DbHashMap<String, i64> = open(env, "extra ok");
    y.insert("a".into(), 1).unwrap();
    assert_persisted(env, "extra ok", &y);
}

// ---- The property test: random operations, with failures, against a model ----

#[derive(Debug, Clone)]
enum Op {
    Insert(u8, i16),
    Remove(u8),
    Update(u8, i16),
    InsertMany(Vec<(u8, i16)>),
    Retain(u8),
    Clear,
    Transaction(Vec<(u8, Option<i16>)>, bool),
    Reopen,
}

/// The value the server is told to reject: writes of it fail, as a real fault would.
const POISON: i16 = 13;

fn op() -> impl Strategy<Value = Op> {
    let key = 0u8..12;
    let value = prop_oneof![4 => -100i16..100, 1 => Just(POISON)];
    prop_oneof![
        6 => (key.clone(), value.clone()).prop_map(|(k, v)| Op::Insert(k, v)),
        3 => key.clone().prop_map(Op::Remove),
        2 => (key.clone(), value.clone()).prop_map(|(k, v)| Op::Update(k, v)),
        2 => prop::collection::vec((key.clone(), value.clone()), 0..6).prop_map(Op::InsertMany),
        1 => (2u8..5).prop_map(Op::Retain),
        1 => Just(Op::Clear),
        2 => (prop::collection::vec((key, prop::option::of(value)), 0..6), any::<bool>())
            .prop_map(|(ops, abort)| Op::Transaction(ops, abort)),
        1 => Just(Op::Reopen),
    ]
}

pub(crate) fn random_operations_match_a_model(env: &impl Env) {
    let cases = std::env::var("WTH_PROPTEST_CASES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(12);
    let mut runner = proptest::test_runner::TestRunner::new(ProptestConfig {
        cases,
        failure_persistence: None,
        ..ProptestConfig::default()
    });
    let counter = std::cell::Cell::new(0);
    runner
        .run(&prop::collection::vec(op(), 1..40), |ops| {
            counter.set(counter.get() + 1);
            let table = format!("model {}", counter.get());
            let mut h: DbHashMap<u8, i16> = open(env, &table);
            env.reject_value(&table, &POISON.to_string());
            let mut model: HashMap<u8, i16> = HashMap::new();
            for op in ops {
                apply(env, &table, &mut h, &mut model, op);
                prop_assert_eq!(&*h, &model);
            }
            let fresh: DbHashMap<u8, i16> = open(env, &table);
            prop_assert_eq!(&*fresh, &model);
            Ok(())
        })
        .unwrap();
}

fn apply(
    env: &impl Env,
    table: &str,
    h: &mut DbHashMap<u8, i16>,
    model: &mut HashMap<u8, i16>,
    op: Op,
) {
    match op {
        Op::Insert(k, v) => match h.insert(k, v) {
            Ok(old) => assert_eq!(old, model.insert(k, v)),
            Err(_) => assert_eq!(v, POISON),
        },
        Op::Remove(k) => assert_eq!(h.remove(&k).unwrap(), model.remove(&k)),
        Op::Update(k, v) => match h.update(&k, |x| *x = v) {
            Ok(found) => {
                assert_eq!(found, model.contains_key(&k));
                if let Some(x) = model.get_mut(&k) {
                    *x = v;
                }
            }
            Err(_) => assert_eq!(v, POISON),
        },
        Op::InsertMany(pairs) => {
            let poisoned = pairs.iter().any(|(_, v)| *v == POISON);
            match h.insert_many(pairs.clone()) {
                Ok(()) => model.extend(pairs),
                Err(_) => assert!(poisoned),
            }
        }
        Op::Retain(m) => {
            h.retain(|k, _| k % m != 0).unwrap();
            model.retain(|k, _| k % m != 0);
        }
        Op::Clear => {
            h.clear().unwrap();
            model.clear();
        }
        Op::Transaction(ops, abort) => {
            let mut staged = model.clone();
            let r = h.transaction(|tx| {
                for (k, v) in &ops {
                    match v {
                        Some(v) => {
                            tx.insert(*k, *v)?;
                            staged.insert(*k, *v);
                        }
                        None => {
                            tx.remove(k)?;
                            staged.remove(k);
                        }
                    }
                    assert_eq!(tx.get(k), staged.get(k));
                }
                if abort {
                    return Err(Error::abort("model says so"));
                }
                Ok(())
            });
            let staged_poison = {
                let mut changes: HashMap<u8, Option<i16>> = HashMap::new();
                for (k, v) in &ops {
                    changes.insert(*k, *v);
                }
                changes.values().any(|v| *v == Some(POISON))
            };
            match r {
                Ok(()) => {
                    assert!(!abort && !staged_poison);
                    *model = staged;
                }
                Err(_) => assert!(abort || staged_poison),
            }
        }
        Op::Reopen => {
            *h = open(env, table);
        }
    }
}

/// Test helper: a copy of the map's content.
trait CloneMap<K, V> {
    fn clone_map(&self) -> HashMap<K, V>;
}

impl<K: Clone + Eq + std::hash::Hash, V: Clone> CloneMap<K, V> for DbHashMap<K, V> {
    fn clone_map(&self) -> HashMap<K, V> {
        (**self).clone()
    }
}
