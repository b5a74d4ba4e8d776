//! PostgreSQL as production runs it: a 3-node cluster that Patroni fails over, with
//! synchronous replication (`scripts/pg_ha.sh`, which `scripts/test.sh` starts). A map
//! on the multi-host URL (`target_session_attrs=read-write`) writes on through the
//! primary's loss (SIGKILL of the node's Patroni and PostgreSQL): writes stop only
//! while there is no primary, nothing acknowledged is lost, and the map equals the
//! table after; coherent maps, a watching one among them, follow to the new primary.
//! (pgbouncer in front of it runs the whole conformance suite: `tests/conformance`.)
#![cfg(feature = "postgres")]

#[path = "conformance/env.rs"]
#[allow(dead_code, unused_imports)]
mod env;

use std::collections::HashMap;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use write_thru_hash::{DbHashMap, SharedDbHashMap};

/// One failover at a time: each test kills the primary.
static CLUSTER: Mutex<()> = Mutex::new(());

fn ha_url() -> String {
    std::env::var("WTH_PG_HA_URL").unwrap_or_else(|_| {
        panic!(
            "WTH_PG_HA_URL is not set: run `bash scripts/test.sh`, which starts the cluster \
             (scripts/pg_ha.sh)"
        )
    })
}

fn pgbouncer_url() -> String {
    std::env::var("WTH_PGBOUNCER_URL").unwrap_or_else(|_| {
        panic!("WTH_PGBOUNCER_URL is not set: run `bash scripts/test.sh` (scripts/pg_ha.sh)")
    })
}

/// Runs one of `scripts/pg_ha.sh`'s functions on the cluster `start_pg_ha` started.
fn pg_ha(function: &str) {
    let status = Command::new("bash")
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .args(["-c", &format!(". scripts/pg_ha.sh && {function}")])
        .status()
        .unwrap();
    assert!(status.success(), "{function} failed");
}

/// Kills the primary; brings the killed node back (as a standby) when dropped, so that
/// the next test finds three nodes.
struct Failover;

impl Failover {
    fn now() -> Failover {
        pg_ha("kill_pg_primary");
        Failover
    }
}

impl Drop for Failover {
    fn drop(&mut self) {
        pg_ha("revive_pg_nodes");
    }
}

fn table(name: &str) -> String {
    format!("{name}_{}", std::process::id())
}

/// What a writer saw: its acknowledged keys, its failed calls, the longest time
/// between two acknowledgements.
#[derive(Default)]
struct Tally {
    acked: Vec<u64>,
    failed: usize,
    longest_pause: Duration,
    errors: Vec<String>,
}

/// Inserts `k1`, `k2`, … through `h` until `stop`, noting each call's outcome.
fn write_until(
    mut h: DbHashMap<String, u64>,
    stop: Arc<AtomicBool>,
) -> std::thread::JoinHandle<(DbHashMap<String, u64>, Tally)> {
    std::thread::spawn(move || {
        let mut tally = Tally::default();
        let mut last = Instant::now();
        let mut i = 0u64;
        while !stop.load(Ordering::Relaxed) {
            i += 1;
            match h.insert(format!("k{i}"), i) {
                Ok(_) => {
                    tally.acked.push(i);
                    tally.longest_pause = tally.longest_pause.max(last.elapsed());
                    last = Instant::now();
                }
                Err(e) => {
                    tally.failed += 1;
                    if tally.errors.len() < 5 {
                        tally.errors.push(format!("k{i}: {e}"));
                    }
                }
            }
        }
        (h, tally)
    })
}

/// The writer's figures, and what must hold after the failover: writes resumed within
/// 30 s, at most 50 calls failed, every acknowledged write is on the new primary, and
/// the map equals the table.
fn check_writer(how: &str, url: &str, name: &str, mut h: DbHashMap<String, u64>, tally: &Tally) {
    eprintln!(
        "failover, {how}: {} writes acknowledged, {} calls failed, longest pause {:.1} s; \
         errors: {:?}",
        tally.acked.len(),
        tally.failed,
        tally.longest_pause.as_secs_f64(),
        tally.errors
    );
    assert!(
        tally.longest_pause < Duration::from_secs(30),
        "{how}: writes resumed only after {:?}",
        tally.longest_pause
    );
    assert!(
        tally.failed <= 50,
        "{how}: {} calls failed: {:?}",
        tally.failed,
        tally.errors
    );
    // One more write settles whatever the kill left in doubt.
    h.insert("after".into(), 0).unwrap();
    let fresh: DbHashMap<String, u64> = DbHashMap::builder_url(url).table(name).open().unwrap();
    let lost: Vec<_> = tally
        .acked
        .iter()
        .filter(|i| fresh.get(&format!("k{i}")) != Some(i))
        .collect();
    assert!(lost.is_empty(), "{how}: acknowledged and lost: {lost:?}");
    assert!(
        fresh.len() > tally.acked.len() / 2,
        "{how}: writes went on after the failover"
    );
    let memory: HashMap<_, _> = h.iter().map(|(k, v)| (k.clone(), *v)).collect();
    let table: HashMap<_, _> = fresh.iter().map(|(k, v)| (k.clone(), *v)).collect();
    let differ: Vec<_> = memory
        .keys()
        .chain(table.keys())
        .filter(|k| memory.get(*k) != table.get(*k))
        .map(|k| (k, memory.get(k), table.get(k)))
        .collect();
    assert!(
        differ.is_empty(),
        "{how}: the map equals the table after the failover; (key, memory, table) differ: \
         {differ:?}"
    );
}

/// Two writers through one failover: one on the multi-host URL, one through pgbouncer
/// (which follows the primary).
#[test]
fn pg_ha_a_writer_writes_on_through_a_killed_primary() {
    let _one = CLUSTER.lock().unwrap_or_else(|e| e.into_inner());
    let urls = [
        ("on the multi-host URL", ha_url(), table("failover")),
        (
            "through pgbouncer",
            pgbouncer_url(),
            table("failover_pooled"),
        ),
    ];
    let stop = Arc::new(AtomicBool::new(false));
    let writers: Vec<_> = urls
        .iter()
        .map(|(_, url, name)| {
            let mut h: DbHashMap<String, u64> =
                DbHashMap::builder_url(url).table(name).open().unwrap();
            h.clear().unwrap();
            write_until(h, stop.clone())
        })
        .collect();
    std::thread::sleep(Duration::from_secs(2));
    let failover = Failover::now();
    // Writes go on for a while on the new primary.
    std::thread::sleep(Duration::from_secs(25));
    stop.store(true, Ordering::Relaxed);
    let done: Vec<_> = writers.into_iter().map(|w| w.join().unwrap()).collect();
    for ((how, url, name), (h, tally)) in urls.iter().zip(done) {
        check_writer(how, url, name, h, &tally);
    }
    drop(failover);
}

#[test]
fn pg_ha_coherent_maps_follow_to_the_new_primary() {
    let _one = CLUSTER.lock().unwrap_or_else(|e| e.into_inner());
    let url = ha_url();
    let name = table("coherent_failover");
    let mut before: DbHashMap<String, i64> = DbHashMap::builder_url(&url)
        .table(&name)
        .coherent()
        .open()
        .unwrap();
    before.clear().unwrap();
    let watching: SharedDbHashMap<String, i64> = DbHashMap::builder_url(&url)
        .table(&name)
        .coherent()
        .watch()
        .open_shared()
        .unwrap();
    before.insert("old".into(), 1).unwrap();
    env::eventually("the watcher sees a write", Duration::from_secs(10), || {
        watching.get("old") == Some(1)
    });

    let failover = Failover::now();
    // A map opened once there is a primary again (an open fails at once while there
    // is none), and writes on both sides.
    let started = Instant::now();
    let mut after: DbHashMap<String, i64> = loop {
        match DbHashMap::builder_url(&url).table(&name).coherent().open() {
            Ok(h) => break h,
            Err(e) if started.elapsed() < Duration::from_secs(30) => {
                eprintln!("open during the failover: {e}");
                std::thread::sleep(Duration::from_millis(500));
            }
            Err(e) => panic!("no primary 30 s after the kill: {e}"),
        }
    };
    assert_eq!(after.get("old"), Some(&1), "the committed write survived");
    after.insert("new".into(), 2).unwrap();
    let mut tries = 0;
    while let Err(e) = before.insert("old".into(), 3) {
        tries += 1;
        assert!(tries < 5, "the map opened before never wrote again: {e}");
    }
    before.refresh().unwrap();
    after.refresh().unwrap();
    let expected = HashMap::from([("old".to_string(), 3), ("new".to_string(), 2)]);
    let as_map = |h: &DbHashMap<String, i64>| -> HashMap<String, i64> {
        h.iter().map(|(k, v)| (k.clone(), *v)).collect()
    };
    assert_eq!(as_map(&before), expected);
    assert_eq!(as_map(&after), expected);
    env::eventually(
        "the watching map follows to the new primary",
        Duration::from_secs(30),
        || watching.read().clone() == expected,
    );
    drop(failover);
}
