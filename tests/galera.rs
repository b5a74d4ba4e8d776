//! Scale-out on a 3-node MariaDB Galera cluster (`scripts/galera.sh`, which
//! `scripts/test.sh` starts): one coherent map per node converges with the others and
//! with the table on every node, while writers on all three nodes conflict over shared
//! keys; a node killed with SIGKILL leaves the other two working, and its map gets
//! clear errors until the node rejoins and it reloads.
#![cfg(feature = "mysql")]

#[path = "conformance/env.rs"]
#[allow(dead_code, unused_imports)]
mod env;

use std::collections::HashMap;
use std::io::BufReader;
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::time::Instant;

use env::{chain, worker_bin};
use write_thru_hash::{DbHashMap, Error, SharedDbHashMap};

/// The tests share one cluster, and one of them kills a node: one at a time.
static CLUSTER: Mutex<()> = Mutex::new(());

fn urls() -> [String; 3] {
    [1, 2, 3].map(|n| {
        let var = format!("WTH_GALERA_URL_{n}");
        std::env::var(&var).unwrap_or_else(|_| {
            panic!("{var} is not set: run `bash scripts/test.sh`, which starts a Galera cluster")
        })
    })
}

/// A table name of this run's own.
fn table(name: &str) -> String {
    format!("{name}_{}", std::process::id())
}

fn coherent(url: &str, table: &str) -> DbHashMap<String, i64> {
    DbHashMap::builder_url(url)
        .table(table)
        .coherent()
        .open()
        .unwrap_or_else(|e| panic!("open {table} on {}: {}", redacted(url), chain(&e)))
}

fn fresh(url: &str, table: &str) -> HashMap<String, i64> {
    let h: DbHashMap<String, i64> = DbHashMap::builder_url(url).table(table).open().unwrap();
    h.into_inner()
}

fn redacted(url: &str) -> String {
    url.split('@').next_back().unwrap_or("").to_string()
}

/// Runs `scripts/galera.sh`'s function `f` on node `n`.
fn cluster(f: &str, n: usize) {
    let dir = std::env::var("WTH_GALERA_DIR").unwrap_or_else(|_| {
        panic!("WTH_GALERA_DIR is not set: the node tests need the cluster of scripts/galera.sh")
    });
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/galera.sh");
    let status = Command::new("bash")
        .args(["-c", &format!(". '{script}' && {f} {n}")])
        .env("WTH_GALERA_DIR", dir)
        .status()
        .unwrap();
    assert!(status.success(), "{f} {n} failed");
}

/// One coherent map per node, in three threads, writing keys of their own and keys
/// they share; after they stop and refresh, the three maps equal each other and the
/// table as every node holds it.
#[test]
fn galera_maps_on_every_node_converge() {
    let _one = CLUSTER.lock().unwrap_or_else(|p| p.into_inner());
    let urls = urls();
    let t = table("converge");
    let mut maps: Vec<DbHashMap<String, i64>> = urls.iter().map(|u| coherent(u, &t)).collect();
    let start = Instant::now();
    std::thread::scope(|s| {
        for (n, m) in maps.iter_mut().enumerate() {
            s.spawn(move || {
                for i in 0..150i64 {
                    let shared = format!("shared-{}", i % 7);
                    let own = format!("node{n}-{}", i % 20);
                    let result = match i % 6 {
                        0 => m.insert(shared, i).map(drop),
                        1 => m.insert_many([(own, i), (format!("shared-{}", i % 3), i)]),
                        2 => m.remove(&shared).map(drop),
                        3 => m.transaction(|tx| {
                            tx.insert(own.clone(), i)?;
                            tx.insert(shared.clone(), -i)?;
                            Ok(())
                        }),
                        4 => m.upsert(own, |v| v.copied().unwrap_or(0) + 1).map(drop),
                        _ => m.refresh().map(drop),
                    };
                    // Conflicts beyond the retries are said plainly, and change nothing.
                    if let Err(e) = result {
                        assert!(e.is_retryable(), "node {n}, call {i}: {}", chain(&e));
                    }
                }
            });
        }
    });
    let took = start.elapsed();
    for m in &mut maps {
        m.refresh().unwrap();
    }
    let retried: u64 = maps.iter().map(DbHashMap::conflicts_retried).sum();
    eprintln!("3 nodes × 150 calls in {took:?}; {retried} writes retried after error 1213");
    let table_on_1 = fresh(&urls[0], &t);
    for (n, m) in maps.iter().enumerate() {
        assert_eq!(**m, table_on_1, "the map on node {}", n + 1);
        assert_eq!(
            fresh(&urls[n], &t),
            table_on_1,
            "the table on node {}",
            n + 1
        );
    }
    assert!(!table_on_1.is_empty());
}

/// Three worker processes, one per node, doing random writes (some to the same keys)
/// with coherent maps; after they stop and refresh, their maps equal the table on
/// every node. The count of retries after error 1213 is printed.
#[test]
fn galera_processes_on_every_node_converge() {
    let _one = CLUSTER.lock().unwrap_or_else(|p| p.into_inner());
    let urls = urls();
    let t = table("procs");
    // Made first, so that the workers do not race to install it.
    drop(coherent(&urls[0], &t));
    let mut workers: Vec<_> = urls
        .iter()
        .enumerate()
        .map(|(n, url)| {
            Command::new(worker_bin())
                .args([url, &t, &(n as u64 + 1).to_string(), "200", "coherent"])
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::inherit())
                .spawn()
                .unwrap()
        })
        .collect();
    let mut outputs: Vec<_> = workers
        .iter_mut()
        .map(|w| BufReader::new(w.stdout.take().unwrap()))
        .collect();
    env::wait_for_done(&mut outputs);
    let table_now = fresh(&urls[0], &t);
    let mut retried = 0u64;
    for (w, out) in workers.iter_mut().zip(&mut outputs) {
        let (seen, conflicts) = env::final_map(w, out);
        assert_eq!(seen, table_now, "a worker's map after its refresh");
        retried += conflicts;
    }
    eprintln!("3 worker processes × 200 calls: {retried} writes retried after error 1213");
    for url in &urls {
        assert_eq!(fresh(url, &t), table_now);
    }
}

/// A node killed with SIGKILL mid-run: the maps on the other two keep working; the map
/// on the killed node gets clear errors, its memory as it was; once the node is back,
/// `reload()` on it succeeds and all maps converge.
#[test]
fn galera_node_killed_and_rejoined() {
    let _one = CLUSTER.lock().unwrap_or_else(|p| p.into_inner());
    let urls = urls();
    let t = table("killed");
    let mut maps: Vec<DbHashMap<String, i64>> = urls.iter().map(|u| coherent(u, &t)).collect();
    for (n, m) in maps.iter_mut().enumerate() {
        m.insert(format!("before-{n}"), n as i64).unwrap();
    }
    cluster("kill_galera_node", 3);
    let killed_at = Instant::now();
    // The survivors go on (the first write waits until the cluster has noticed).
    for i in 0..20 {
        let (a, b) = maps.split_at_mut(1);
        a[0].insert(format!("during-{i}"), i).unwrap();
        b[0].insert(format!("during-b-{i}"), i).unwrap();
    }
    eprintln!(
        "40 writes on the 2 survivors, {:?} after the kill",
        killed_at.elapsed()
    );
    let before = maps[2].to_hash_map();
    for k in ["lost-1", "lost-2"] {
        match maps[2].insert(k.into(), 1) {
            Ok(_) => panic!("a write on the killed node succeeded"),
            Err(e) => {
                eprintln!("the map on the killed node: {e}");
                assert!(
                    matches!(
                        e,
                        Error::Database { .. }
                            | Error::OutcomeUnknown { .. }
                            | Error::Poisoned { .. }
                            | Error::Connect { .. }
                    ),
                    "{}",
                    chain(&e)
                );
                assert!(!e.to_string().contains("p/w?x"));
            }
        }
    }
    assert_eq!(
        maps[2].to_hash_map(),
        before,
        "memory changed by failed writes"
    );
    cluster("restart_galera_node", 3);
    eprintln!("node 3 back {:?} after the kill", killed_at.elapsed());
    maps[2]
        .reload()
        .unwrap_or_else(|e| panic!("reload on node 3: {}", chain(&e)));
    maps[2].insert("after".into(), 3).unwrap();
    for m in &mut maps {
        m.refresh().unwrap();
    }
    let table_now = fresh(&urls[0], &t);
    assert_eq!(table_now.len(), 3 + 40 + 1);
    for (n, m) in maps.iter().enumerate() {
        assert_eq!(**m, table_now, "the map on node {}", n + 1);
        assert_eq!(
            fresh(&urls[n], &t),
            table_now,
            "the table on node {}",
            n + 1
        );
    }
}

/// A watching shared map on node 2 hears of every change a map on node 1 commits.
#[test]
fn galera_watch_sees_other_nodes() {
    let _one = CLUSTER.lock().unwrap_or_else(|p| p.into_inner());
    let urls = urls();
    let t = table("watched");
    let mut writer = coherent(&urls[0], &t);
    let watched: SharedDbHashMap<String, i64> = DbHashMap::builder_url(&urls[1])
        .table(&t)
        .watch()
        .open_shared()
        .unwrap();
    let delays = env::changes_reach(&mut writer, &watched);
    eprintln!(
        "commit on node 1 to node 2's watching map: {}",
        env::spread(&delays)
    );
}

/// Found by measuring (issue 24): once a node changed a key that another node had
/// changed last, no log row held the first node's newest version, and a refresh
/// stopped short of it while the table's version said more: a watcher on an idle
/// table refreshed again at every look (170-316 queries a second). A refresh now
/// reaches the version the table is at.
#[test]
fn galera_a_refresh_reaches_the_version_of_an_idle_table() {
    use write_thru_hash::{Format, TableSpec};
    let _one = CLUSTER.lock().unwrap_or_else(|p| p.into_inner());
    let urls = urls();
    let t = table("superseded");
    let mut first = coherent(&urls[0], &t);
    let mut second = coherent(&urls[1], &t);
    let mut store = write_thru_hash::connect(&urls[2]).unwrap();
    store
        .open(&TableSpec::new(&t, Format::Text, Format::Text))
        .unwrap();
    store.enable_changes().unwrap();
    let start = store.version().unwrap();
    // The first node's newest version goes to "k", which the second then changes.
    first.insert("only-first".into(), 1).unwrap();
    first.insert("k".into(), 1).unwrap();
    second.refresh().unwrap();
    second.insert("k".into(), 2).unwrap();
    let deadline = Instant::now() + std::time::Duration::from_secs(10);
    while store.get(b"\"k\"").unwrap() != Some(b"2".to_vec()) {
        assert!(
            Instant::now() < deadline,
            "node 3 did not get the change in 10 s"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let mut keys = 0;
    let reached = store
        .changes(start, &mut |_, _| {
            keys += 1;
            Ok(())
        })
        .unwrap()
        .expect("nothing was compacted");
    assert_eq!(keys, 2);
    assert_eq!(
        store.version().unwrap(),
        reached,
        "the table is idle: its version is the one the refresh reached"
    );
}

/// Found by probing (issue 20): coherent maps opened at the same moment on every node,
/// on a new table, wedged the whole cluster (4 of 5 tries with three nodes): two nodes
/// creating one trigger at once wait for each other's metadata lock. The triggers are
/// now installed by one connection at a time in the cluster. Five rounds, each on a new
/// table, each open and its 20 inserts within 60 s, then the maps converge.
#[test]
fn galera_concurrent_coherent_opens_on_a_new_table() {
    let _one = CLUSTER.lock().unwrap_or_else(|p| p.into_inner());
    let urls = urls();
    for round in 0..5 {
        let name = table(&format!("at_once_{round}"));
        let barrier = std::sync::Arc::new(std::sync::Barrier::new(urls.len()));
        let (done, finished) = std::sync::mpsc::channel();
        // Threads of their own, not scoped: a hung open must fail the test, not hang it.
        for (node, url) in urls.iter().enumerate() {
            let (barrier, done, name, url) =
                (barrier.clone(), done.clone(), name.clone(), url.clone());
            std::thread::spawn(move || {
                barrier.wait();
                let opened = DbHashMap::<String, i64>::builder_url(&url)
                    .table(&name)
                    .coherent()
                    .open();
                let result = opened.and_then(|mut h| {
                    for i in 0..20 {
                        h.insert(format!("{node}/{i}"), i)?;
                    }
                    Ok(h.len())
                });
                let _ = done.send((node, result));
            });
        }
        drop(done);
        for _ in 0..urls.len() {
            let (node, result) = finished
                .recv_timeout(std::time::Duration::from_secs(60))
                .unwrap_or_else(|_| panic!("round {round}: an open or insert hung for 60 s"));
            let len =
                result.unwrap_or_else(|e| panic!("round {round}, node {node}: {}", chain(&e)));
            // Its own 20, and whatever other nodes wrote before it loaded.
            assert!(len >= 20, "round {round}, node {node}: {len}");
        }
        let mut maps: Vec<DbHashMap<String, i64>> =
            urls.iter().map(|u| coherent(u, &name)).collect();
        for h in &mut maps {
            h.refresh().unwrap();
            assert_eq!(h.len(), 60, "round {round}");
        }
        assert_eq!(fresh(&urls[0], &name), *maps[1]);
    }
}
