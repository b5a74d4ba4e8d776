//! Left running, a map heals itself: connections cut while idle (a firewall, a proxy,
//! the server's idle timeout, a restart) are made again before the write goes out, and
//! the call does not fail; a write whose answer was lost returns `OutcomeUnknown`, and
//! the next call settles it by reading its keys back, with no `reload()`. Plain and
//! shared maps, through a TCP proxy that cuts connections, on PostgreSQL and MariaDB;
//! and a short soak: writers and a plain-SQL writer while the proxy cuts at random.
#![cfg(any(feature = "postgres", feature = "mysql"))]

#[path = "conformance/env.rs"]
#[allow(dead_code, unused_imports)]
mod env;
#[path = "conformance/proxy.rs"]
#[allow(dead_code)]
mod proxy;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use env::Env;
use proxy::{proxied, Tally};
use write_thru_hash::{DbHashMap, Error, SharedDbHashMap};

fn fresh(env: &impl Env, table: &str) -> HashMap<String, i64> {
    let map: DbHashMap<String, i64> = DbHashMap::builder_url(&env.url())
        .table(table)
        .open()
        .unwrap();
    map.into_inner()
}

fn idle_cut_plain(env: &impl Env) {
    let (proxy, url) = proxied(&env.url());
    let mut h: DbHashMap<String, i64> = DbHashMap::builder_url(&url).table("idle").open().unwrap();
    h.insert("a".into(), 1).unwrap();
    for round in 0..3 {
        proxy.cut_all();
        thread::sleep(Duration::from_millis(150));
        h.insert(format!("after {round}"), round)
            .unwrap_or_else(|e| {
                panic!(
                    "a connection cut while idle is made again: {}",
                    env::chain(&e)
                )
            });
        h.insert_many([(format!("batch {round}"), round)]).unwrap();
    }
    assert!(proxy.cuts.load(Ordering::Relaxed) >= 3);
    assert_eq!(fresh(env, "idle"), *h);
}

fn idle_cut_shared(env: &impl Env) {
    let (proxy, url) = proxied(&env.url());
    let h: SharedDbHashMap<String, i64> = DbHashMap::builder_url(&url)
        .table("idle shared")
        .open_shared()
        .unwrap();
    h.insert("a".into(), 1).unwrap();
    proxy.cut_all();
    thread::sleep(Duration::from_millis(150));
    thread::scope(|s| {
        for t in 0..4 {
            let h = h.clone();
            s.spawn(move || {
                for i in 0..5 {
                    h.insert(format!("{t}/{i}"), i).unwrap();
                }
            });
        }
    });
    h.upsert("a".into(), |v| v.copied().unwrap_or(0) + 1)
        .unwrap();
    assert_eq!(fresh(env, "idle shared"), h.to_hash_map());
}

/// The answer to a write is lost: the call says the outcome is unknown, memory is as
/// before, and the next call reads the key back and goes on.
fn answer_lost_settles(env: &impl Env) {
    let (proxy, url) = proxied(&env.url());
    let mut h: DbHashMap<String, i64> = DbHashMap::builder_url(&url).table("lost").open().unwrap();
    h.insert("warm".into(), 0).unwrap();
    for (round, key) in ["a", "b", "c"].into_iter().enumerate() {
        // A write just before, so that the map does not check its connection first
        // (which would take the cut answer).
        h.insert("warm".into(), round as i64).unwrap();
        proxy.cut_next_answer();
        let err = h.insert(key.into(), 1).unwrap_err();
        assert!(
            matches!(err, Error::OutcomeUnknown { .. }),
            "{}",
            env::chain(&err)
        );
        assert!(!h.contains_key(key), "memory unchanged");
        // Another kind of call each round: every write settles first.
        match round {
            0 => drop(h.insert("next".into(), 2).unwrap()),
            1 => drop(h.remove("next").unwrap()),
            _ => drop(h.transaction(|tx| tx.insert("tx".into(), 3)).unwrap()),
        }
        assert_eq!(h.get(key), Some(&1), "the commit happened; memory took it");
        assert_eq!(fresh(env, "lost"), *h);
    }

    // A shared map: the caller hears `OutcomeUnknown`, the next call settles it.
    let s: SharedDbHashMap<String, i64> = DbHashMap::builder_url(&url)
        .table("lost shared")
        .open_shared()
        .unwrap();
    s.insert("warm".into(), 0).unwrap();
    s.insert("warm".into(), 1).unwrap();
    proxy.cut_next_answer();
    let err = s.insert("x".into(), 1).unwrap_err();
    assert!(err.is_outcome_unknown(), "{}", env::chain(&err));
    assert_eq!(s.get("x"), None);
    s.insert("y".into(), 2).unwrap();
    assert_eq!(s.get("x"), Some(1));
    assert_eq!(fresh(env, "lost shared"), s.to_hash_map());
}

/// A map on a connection it was given cannot make a new one: it refuses writes until
/// `reload()`, and says why.
#[cfg(feature = "postgres")]
fn given_connection_waits_for_reload(env: &env::PgEnv) {
    let (proxy, url) = proxied(&env.url());
    let client = ::postgres::Client::connect(&url, ::postgres::NoTls).unwrap();
    let mut h: DbHashMap<String, i64> = DbHashMap::builder(client).table("given").open().unwrap();
    h.insert("warm".into(), 0).unwrap();
    proxy.cut_next_answer();
    let err = h.insert("a".into(), 1).unwrap_err();
    assert!(matches!(err, Error::OutcomeUnknown { .. }), "{err}");
    let refused = h.insert("b".into(), 2).unwrap_err();
    assert!(matches!(refused, Error::Poisoned { .. }), "{refused}");
    assert!(
        refused.to_string().contains("given"),
        "says which case: {refused}"
    );
    assert!(refused.to_string().contains("reload()"), "{refused}");
}

/// PostgreSQL's own idle timeout ends the session (57P05) while the map is idle.
#[cfg(feature = "postgres")]
fn server_idle_timeout(env: &env::PgEnv) {
    let url = format!(
        "{}{}options=-c%20idle_session_timeout%3D300",
        env.url(),
        if env.url().contains('?') { "&" } else { "?" }
    );
    let mut h: DbHashMap<String, i64> = DbHashMap::builder_url(&url)
        .table("timeout")
        .open()
        .unwrap();
    h.insert("a".into(), 1).unwrap();
    for i in 0..2 {
        thread::sleep(Duration::from_millis(800));
        h.insert(format!("b{i}"), 2).unwrap_or_else(|e| {
            panic!(
                "the session the server ended is made again: {}",
                env::chain(&e)
            )
        });
    }
    assert_eq!(fresh(env, "timeout"), *h);
}

/// A short soak: four threads write through one shared map and a fifth through a plain
/// one, a plain-SQL client writes rows of its own, while the proxy cuts every
/// connection at random moments. Every acknowledged write is in the table, the calls
/// that failed are only those whose outcome was unknown (each settled by the next call,
/// never by `reload()`), and the maps equal the table at the end.
pub(crate) fn soak(env: &(impl Env + Sync), run: Duration) -> (usize, usize, usize) {
    let (proxy, url) = proxied(&env.url());
    let shared: SharedDbHashMap<String, i64> = DbHashMap::builder_url(&url)
        .table("soak")
        .open_shared()
        .unwrap();
    let mut plain: DbHashMap<String, i64> = DbHashMap::builder_url(&url)
        .table("soak plain")
        .open()
        .unwrap();
    let stop = AtomicBool::new(false);
    // Calls refused count those that failed with nothing written: reconnecting was cut
    // too, every try.
    let (tally, plain_tally) = (Tally::default(), Tally::default());
    let started = Instant::now();
    thread::scope(|s| {
        for t in 0..4 {
            let (shared, stop, tally) = (shared.clone(), &stop, &tally);
            s.spawn(move || {
                let mut i = 0i64;
                while !stop.load(Ordering::Relaxed) {
                    let key = format!("{t}/{}", i % 50);
                    tally.note(key.clone(), i, shared.insert(key, i));
                    i += 1;
                    if i % 7 == 0 {
                        // Idle now and then, so that cuts land on idle connections too.
                        thread::sleep(Duration::from_millis(120));
                    }
                }
            });
        }
        s.spawn(|| {
            let mut i = 0;
            while !stop.load(Ordering::Relaxed) {
                let key = format!("p{}", i % 20);
                plain_tally.note(key.clone(), i, plain.insert(key, i));
                i += 1;
                thread::sleep(Duration::from_millis(5));
            }
        });
        s.spawn(|| {
            // Another program, straight to the server, on keys of its own.
            let t = env.q("soak");
            let mut i = 0;
            while !stop.load(Ordering::Relaxed) {
                let _ = env.try_exec(&format!(
                    "DELETE FROM {t} WHERE {} = '\"sql{}\"'",
                    env.q("key"),
                    i % 5
                ));
                i += 1;
                thread::sleep(Duration::from_millis(40));
            }
        });
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        while started.elapsed() < run {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            thread::sleep(Duration::from_millis(50 + seed % 300));
            proxy.cut_all();
        }
        stop.store(true, Ordering::Relaxed);
    });
    // One more call each settles what is still in doubt (a cut just before the end may
    // take one more unknown outcome: the call after it settles that).
    let mut tries = 0;
    while let Err(e) = shared
        .insert("end".into(), 0)
        .and(plain.insert("end".into(), 0).map(drop))
    {
        tries += 1;
        assert!(
            tries < 3 && !matches!(e, Error::Poisoned { .. }),
            "{}",
            env::chain(&e)
        );
    }
    let table = fresh(env, "soak");
    tally.check(&table);
    plain_tally.check(&fresh(env, "soak plain"));
    assert_eq!(
        table,
        shared.to_hash_map(),
        "the shared map equals the table"
    );
    assert_eq!(
        fresh(env, "soak plain"),
        *plain,
        "the plain map equals the table"
    );
    let cuts = proxy.cuts.load(Ordering::Relaxed);
    let (commits, calls) = shared.commits();
    eprintln!(
        "soak on {:?}: {cuts} connections cut, {} calls failed with an unknown outcome (each \
         settled by the next call), {} failed with nothing written (reconnecting was cut \
         too), {calls} shared calls in {commits} commits, 0 reloads",
        env.dialect(),
        tally.unknown.load(Ordering::Relaxed) + plain_tally.unknown.load(Ordering::Relaxed),
        tally.refused.load(Ordering::Relaxed) + plain_tally.refused.load(Ordering::Relaxed)
    );
    (cuts, tally.unknown.load(Ordering::Relaxed), calls as usize)
}

macro_rules! heal {
    ($backend:ident, $env:expr) => {
        mod $backend {
            use super::*;
            #[test]
            fn idle_cut_plain() {
                super::idle_cut_plain(&$env);
            }
            #[test]
            fn idle_cut_shared() {
                super::idle_cut_shared(&$env);
            }
            #[test]
            fn answer_lost_settles() {
                super::answer_lost_settles(&$env);
            }
            #[test]
            fn soak() {
                let secs = std::env::var("WTH_SOAK_SECS")
                    .ok()
                    .and_then(|s| s.parse().ok())
                    .unwrap_or(4);
                let (cuts, _, calls) = super::soak(&$env, Duration::from_secs(secs));
                assert!(cuts > 0 && calls > 0);
            }
        }
    };
}

#[cfg(feature = "postgres")]
heal!(postgres, env::PgEnv::new());
#[cfg(feature = "mysql")]
heal!(mysql, env::MyEnv::new());

#[cfg(feature = "postgres")]
#[test]
fn postgres_given_connection_waits_for_reload() {
    given_connection_waits_for_reload(&env::PgEnv::new());
}

/// The server did a write, then ended the session with a FATAL instead of its answer
/// (a failover's dying primary does: "terminating connection due to unexpected
/// postmaster exit"). The write is done again on a new connection, which leaves what
/// it left once; when no new connection can be made in time, the call's outcome is
/// unknown (it was "nothing done", memory without a row the table held), and the next
/// call settles it.
#[cfg(feature = "postgres")]
#[test]
fn postgres_a_session_ended_after_a_write_leaves_its_outcome_unknown() {
    let env = env::PgEnv::new();
    let (proxy, url) = proxied(&env.url());
    // Reconnecting is tried for the connect timeout: 1 s here.
    let url = format!("{url}?connect_timeout=1");
    let mut h: DbHashMap<String, i64> = DbHashMap::builder_url(&url).table("fatal").open().unwrap();
    h.insert("a".into(), 1).unwrap();

    // A new connection at once: the write goes again, and the call succeeds. (Idle for
    // a while first, as on a loaded machine: the map checks its connection before the
    // write, and the FATAL is the answer to the INSERT, not to that check.)
    proxy.fatal_instead_of_answer_to_insert();
    thread::sleep(Duration::from_millis(150));
    h.insert("b".into(), 2).unwrap();
    assert_eq!(h, fresh(&env, "fatal"));

    // No new connection in time: the outcome is unknown, not "nothing done".
    proxy.fatal_instead_of_answer_to_insert();
    proxy.refuse_new(true);
    thread::sleep(Duration::from_millis(150));
    let err = h.insert("c".into(), 3).unwrap_err();
    assert!(err.is_outcome_unknown(), "{err}");
    assert_eq!(
        fresh(&env, "fatal").get("c"),
        Some(&3),
        "the write was done"
    );
    proxy.refuse_new(false);
    // The next call settles it: memory holds what the table holds.
    h.insert("d".into(), 4).unwrap();
    assert_eq!(h.get("c"), Some(&3));
    assert_eq!(h, fresh(&env, "fatal"));
}

#[cfg(feature = "postgres")]
#[test]
fn postgres_server_idle_timeout() {
    server_idle_timeout(&env::PgEnv::new());
}
