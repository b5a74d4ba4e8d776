//! What each fuzz target checks, shared by the targets (`fuzz_targets/`) and by the
//! test that replays the corpus (`tests/fuzz_corpus.rs`): never a panic, and
//! whatever decodes encodes and decodes back to itself.

use std::collections::BTreeMap;

use write_thru_hash::{
    Batch, Bytes, Codec, DbHashMap, Json, Postcard, RowSink, Store, TableSpec, Text,
};

#[derive(Debug, PartialEq, serde::Serialize, serde::Deserialize)]
enum Shape {
    Unit,
    Pair(i64, String),
    Record {
        name: String,
        tags: Vec<Option<u8>>,
        extra: BTreeMap<String, bool>,
    },
}

fn round_trip<T: PartialEq + std::fmt::Debug>(codec: &impl Codec<T>, data: &[u8]) {
    if let Ok(value) = codec.decode(data) {
        let mut again = Vec::new();
        if codec.encode(&value, &mut again).is_ok() {
            let back = codec
                .decode(&again)
                .expect("what a codec encodes, it decodes");
            assert_eq!(back, value);
        }
    }
}

/// The codecs' decoders on arbitrary bytes.
pub(crate) fn codecs(data: &[u8]) {
    round_trip::<serde_json::Value>(&Json, data);
    round_trip::<(String, Vec<i64>, Option<f64>)>(&Json, data);
    round_trip::<Shape>(&Json, data);
    round_trip::<Shape>(&Postcard, data);
    round_trip::<(String, u64, Vec<Option<i32>>)>(&Postcard, data);
    round_trip::<String>(&Text, data);
    round_trip::<Vec<u8>>(&Bytes, data);
}

/// The URL parser and the password redaction on arbitrary text.
pub(crate) fn url(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    write_thru_hash::__fuzz::parse_url(text);
    let redacted = write_thru_hash::__fuzz::redact(text);
    // A password after `user:` in a URL's authority never survives redaction there.
    let authority = |url: &str| -> Option<String> {
        let (_, rest) = url.split_once("://")?;
        Some(rest.split(['/', '?']).next().unwrap_or("").to_string())
    };
    // Drivers read credentials up to the last `@`: a password holding `/` or `?` is
    // hidden too (checked where it appears once, so that it cannot be another part).
    if let Some((_, rest)) = text.split_once("://") {
        if let Some((userinfo, _)) = rest.rsplit_once('@') {
            if let Some((user, password)) = userinfo.split_once(':') {
                if password.len() >= 4
                    && !user.contains(['/', '?', '#', '&', '='])
                    && text.matches(password).count() == 1
                {
                    assert!(!redacted.contains(password), "{text:?} -> {redacted:?}");
                }
            }
        }
    }
    if let (Some(before), Some(after)) = (authority(text), authority(&redacted)) {
        if let Some((userinfo, _)) = before.rsplit_once('@') {
            if let Some((_, password)) = userinfo.split_once(':') {
                if !password.is_empty() && password != "***" {
                    assert!(
                        !after.contains(&format!(":{password}@")),
                        "{text:?} -> {redacted:?}"
                    );
                }
            }
        }
    }
}

/// The Datalog parser on arbitrary text: a clause it accepts prints as text that
/// parses back to the same clause.
pub(crate) fn datalog(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(program) = crate::syntax::parse(text) else {
        return;
    };
    for located in program {
        if let crate::syntax::Statement::Assert(clause) = located.statement {
            let canonical = clause.canonical();
            let printed = canonical.to_string();
            let back = crate::syntax::parse_clause(&printed).expect("a printed clause parses");
            assert_eq!(back.canonical(), canonical, "{printed}");
        }
    }
}

/// A store whose table holds the rows the fuzzer made.
struct Rows(Vec<(Vec<u8>, Vec<u8>)>);

impl Store for Rows {
    fn backend(&self) -> &'static str {
        "fuzz"
    }
    fn open(&mut self, _: &TableSpec) -> write_thru_hash::Result<()> {
        Ok(())
    }
    fn load(&mut self, sink: &mut RowSink<'_>) -> write_thru_hash::Result<()> {
        for (k, v) in &self.0 {
            sink(k, v)?;
        }
        Ok(())
    }
    fn apply(&mut self, _: &Batch) -> write_thru_hash::Result<()> {
        Ok(())
    }
}

/// Opening a table of arbitrary rows (split at 0xFF bytes: key, value, key, …).
pub(crate) fn load(data: &[u8]) {
    let parts: Vec<&[u8]> = data.split(|b| *b == 0xFF).collect();
    let rows: Vec<(Vec<u8>, Vec<u8>)> = parts
        .chunks(2)
        .filter(|c| c.len() == 2)
        .map(|c| (c[0].to_vec(), c[1].to_vec()))
        .collect();
    let n = rows.len();
    if let Ok(h) = DbHashMap::<String, BTreeMap<String, i64>>::open(Rows(rows.clone())) {
        assert!(h.len() <= n);
    }
    if let Ok(h) = DbHashMap::<(u8, String), Shape>::builder(Rows(rows))
        .codec(Postcard)
        .open()
    {
        assert!(h.len() <= n);
    }
}
