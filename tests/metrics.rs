//! Feature `metrics`: the counters and timings reach the application's recorder, under
//! the names the README lists, labelled with the table.
#![cfg(all(feature = "metrics", feature = "sqlite"))]

use metrics_util::debugging::{DebugValue, DebuggingRecorder};
use write_thru_hash::DbHashMap;

/// A metric as the recorder saw it: its name, its labels, its value.
type Seen = (String, Vec<(String, String)>, DebugValue);

#[test]
fn sqlite_metrics_reach_the_recorder() {
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    metrics::with_local_recorder(&recorder, || {
        let mut h: DbHashMap<String, i64> = DbHashMap::open_url("sqlite::memory:").unwrap();
        h.insert("a".into(), 1).unwrap();
        h.insert_many([("b".to_string(), 2), ("c".into(), 3)])
            .unwrap();
    });
    let seen: Vec<Seen> = snapshotter
        .snapshot()
        .into_vec()
        .into_iter()
        .map(|(key, _, _, value)| {
            let labels = key
                .key()
                .labels()
                .map(|l| (l.key().to_string(), l.value().to_string()))
                .collect();
            (key.key().name().to_string(), labels, value)
        })
        .collect();
    let writes = seen
        .iter()
        .find(|(name, labels, _)| {
            name == "wth_writes_total" && labels.contains(&("outcome".into(), "ok".into()))
        })
        .unwrap_or_else(|| panic!("no wth_writes_total in {seen:?}"));
    assert_eq!(writes.2, DebugValue::Counter(2));
    assert!(writes.1.contains(&("table".into(), "hashtable".into())));
    assert!(seen.iter().any(|(name, _, _)| name == "wth_write_seconds"));
}
