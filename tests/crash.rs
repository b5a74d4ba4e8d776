//! The crash harness: a worker process runs a random sequence of inserts, removes,
//! clears, batches and transactions, acknowledging each; the test kills it with
//! SIGKILL at a random moment, reopens the table and checks that it holds the result
//! of a prefix of the sequence that includes every acknowledged call (so no
//! acknowledged write was lost and no transaction is half applied).
//!
//! `WTH_CRASH_TRIALS` sets the number of trials per backend (default 50).

#[path = "../examples/crash_worker/ops.rs"]
mod ops;

#[path = "conformance/env.rs"]
#[allow(dead_code, unused_imports)]
mod env;

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use env::worker_bin;
use write_thru_hash::DbHashMap;

const OPS: usize = 150;

fn trials() -> u64 {
    std::env::var("WTH_CRASH_TRIALS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(50)
}

#[derive(Debug, Default)]
struct Tally {
    trials: u64,
    /// Killed after the first acknowledged call and before the last.
    killed_mid_run: u64,
    acknowledged: u64,
    in_flight_landed: u64,
}

/// One trial: run, kill after `delay`, reopen, compare with the prefixes.
fn trial(url: &str, table: &str, seed: u64, delay: Duration, behind: bool, tally: &mut Tally) {
    let mut child = Command::new(worker_bin())
        .args([url, table, &seed.to_string(), &OPS.to_string()])
        .args(behind.then_some("behind"))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (acks, first) = std::sync::mpsc::channel();
    let reader = std::thread::spawn(move || {
        let mut n = 0;
        for _ in BufReader::new(stdout).lines().map_while(Result::ok) {
            n += 1;
            let _ = acks.send(());
        }
        n
    });
    // Most kills land after the worker got going (connecting can take longer than the
    // whole delay); one trial in ten kills it while it starts.
    if !seed.is_multiple_of(10) {
        let _ = first.recv_timeout(Duration::from_secs(20));
    }
    let start = Instant::now();
    while start.elapsed() < delay {
        if child.try_wait().unwrap().is_some() {
            break;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    let _ = child.kill(); // SIGKILL
    let status = child.wait().unwrap();
    let acked = reader.join().unwrap();
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
    assert!(
        stderr.is_empty() || status.code().is_none(),
        "worker failed: {stderr}"
    );

    let ops = ops::ops(seed, OPS);
    let mut states = vec![HashMap::new()];
    for op in &ops {
        let mut next = states.last().unwrap().clone();
        ops::apply(&mut next, op);
        states.push(next);
    }
    let table_now: DbHashMap<String, i64> =
        DbHashMap::builder_url(url).table(table).open().unwrap();
    // Every acknowledged call is in; the one in flight may or may not be (write-behind:
    // any number of calls after the last flush may be).
    let candidates = acked..=if behind { OPS } else { (acked + 1).min(OPS) };
    let matched = candidates.clone().find(|&k| *table_now == states[k]);
    assert!(
        matched.is_some(),
        "seed {seed}: {acked} calls acknowledged, but the table equals none of the states after \
         calls {candidates:?}: {:?}",
        *table_now
    );
    tally.trials += 1;
    tally.acknowledged += acked as u64;
    if acked > 0 && acked < OPS {
        tally.killed_mid_run += 1;
    }
    if matched.is_some_and(|k| k > acked) {
        tally.in_flight_landed += 1;
    }
}

fn run_trials(backend: &str, behind: bool, url_for: impl Fn(u64) -> (String, String)) {
    let mut tally = Tally::default();
    for t in 0..trials() {
        let seed = 1_000 + t;
        // Kill anywhere from before the first call to after the last.
        // Write-behind calls return sooner: its window to kill in is shorter.
        let window = if behind { 10_000 } else { 40_000 };
        let delay = Duration::from_micros(seed.wrapping_mul(2_654_435_761) % window);
        let (url, table) = url_for(t);
        trial(&url, &table, seed, delay, behind, &mut tally);
    }
    let mode = if behind {
        "write-behind"
    } else {
        "write-through"
    };
    eprintln!("{backend} {mode} crash trials: {tally:?}, data lost: 0");
    assert!(
        tally.killed_mid_run * 2 >= tally.trials,
        "most kills land mid-run: {tally:?}"
    );
}

#[test]
fn sqlite_kill_at_random_moments() {
    let dir = tempfile::tempdir().unwrap();
    run_trials("SQLite", false, |t| {
        (
            format!(
                "sqlite:{}",
                dir.path().join(format!("crash{t}.sqlite")).display()
            ),
            "crash".into(),
        )
    });
}

#[cfg(feature = "postgres")]
#[test]
fn postgres_kill_at_random_moments() {
    use env::Env;
    let pg = env::PgEnv::new();
    run_trials("PostgreSQL", false, |t| (pg.url(), format!("crash {t}")));
}

/// Write-behind: every flushed call survives, and the table is always the state after
/// some prefix of the calls (a batch is a snapshot of what was queued, never half a
/// transaction).
#[test]
fn sqlite_write_behind_kill_at_random_moments() {
    let dir = tempfile::tempdir().unwrap();
    run_trials("SQLite", true, |t| {
        (
            format!(
                "sqlite:{}",
                dir.path().join(format!("behind{t}.sqlite")).display()
            ),
            "crash".into(),
        )
    });
}
