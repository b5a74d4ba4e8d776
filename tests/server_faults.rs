//! PostgreSQL and MariaDB under real connection faults: the server terminates the
//! connection between two calls and in the middle of a transaction, and a network cut
//! loses the answer to a commit. Each call returns an error that says so, memory is
//! unchanged, and the map goes on once the connection is back.
#![cfg(any(feature = "postgres", feature = "mysql", feature = "odbc"))]

#[path = "conformance/env.rs"]
#[allow(dead_code, unused_imports)]
mod env;

#[path = "conformance/proxy.rs"]
#[allow(dead_code)]
mod proxy;

use std::collections::HashMap;
use std::thread;

use proxy::{via, Proxy};

use env::Env;
use write_thru_hash::{DbHashMap, Error};

fn open(url: &str, table: &str) -> DbHashMap<String, i64> {
    DbHashMap::builder_url(url).table(table).open().unwrap()
}

/// The server ends every other connection to the test database.
fn kill_connections(env: &impl Env) {
    match env.dialect() {
        write_thru_hash::Dialect::Postgres => env.exec(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
             WHERE datname = current_database() AND pid <> pg_backend_pid()",
        ),
        _ => {
            for id in env.ints(
                "SELECT id FROM information_schema.processlist \
                 WHERE db = database() AND id <> connection_id()",
            ) {
                // A connection may have ended since the list was read.
                let _ = env.try_exec(&format!("KILL {id}"));
            }
        }
    }
}

fn killed_between_calls(env: &impl Env) {
    let url = env.url();
    let mut h = open(&url, "killed");
    h.insert("a".into(), 1).unwrap();
    let before: HashMap<String, i64> = (*h).clone();
    kill_connections(env);
    thread::sleep(std::time::Duration::from_millis(200));

    // A URL map finds the connection gone before it writes, makes a new one, and the
    // write goes through. Over ODBC, where a driver may not tell before the write, the
    // call may fail with a known outcome; the next one works, with no reload.
    match h.insert("b".into(), 2) {
        Ok(_) => {}
        Err(err) if url.starts_with("odbc:") => {
            assert_eq!(*h, before, "memory unchanged after: {err}");
            assert!(!err.to_string().contains("wth-secret"), "{err}");
            h.insert("b".into(), 2)
                .expect("the call after a lost connection goes through");
        }
        Err(err) => panic!("a URL map reconnects by itself: {}", env::chain(&err)),
    }
    assert_eq!(h.get("b"), Some(&2));
    h.insert("d".into(), 4).unwrap();
    assert_eq!(open(&url, "killed"), *h);
}

fn answer_to_commit_lost(env: &impl Env) {
    let (url, server_port) = via(&env.url(), 0);
    let proxy = Proxy::to(server_port);
    let (mut url, _) = via(&url, proxy.port);
    if env.dialect() == write_thru_hash::Dialect::Mysql && !url.starts_with("odbc:") {
        // The mysql crate moves loopback connections to the Unix socket unless told not to.
        url.push_str(if url.contains('?') {
            "&prefer_socket=false"
        } else {
            "?prefer_socket=false"
        });
    }
    let mut h = open(&url, "lost answer");
    h.insert("warm".into(), 0).unwrap(); // the statement is prepared already

    if url.starts_with("odbc:") {
        // Every ODBC write is a transaction: lose the answer to its COMMIT.
        proxy.cut_answer_to_commit();
    } else {
        proxy.cut_next_answer();
    }
    let err = h.insert("a".into(), 1).unwrap_err();
    assert!(
        matches!(err, Error::OutcomeUnknown { .. }),
        "{}",
        env::chain(&err)
    );
    assert!(
        err.to_string().contains("next call"),
        "says what happens: {err}"
    );
    assert!(!err.to_string().contains("wth-secret"), "{err}");
    assert_eq!(h.get("a"), None, "memory unchanged");
    // The next call settles it: it reconnects, reads "a" back (the commit did happen),
    // and goes on. No reload.
    h.insert("b".into(), 2)
        .expect("the next call settles the unknown outcome");
    assert_eq!(h.get("a"), Some(&1), "memory took what the table holds");
    h.transaction(|tx| tx.insert("c".into(), 3)).unwrap();
    assert_eq!(open(&env.url(), "lost answer"), *h);

    // A batch: on MariaDB and over ODBC the cut hits the transaction's first statement,
    // so nothing is in doubt; on PostgreSQL a batch of puts is one statement, committed
    // on its own, whose answer is lost: run again, it leaves what it would have left
    // once. Either way the batch goes again on a new connection: the call does not fail.
    proxy.cut_next_answer();
    h.insert_many((0..10).map(|i| (format!("k{i}"), i)))
        .expect("a batch that lost its connection before anything was done goes again");
    assert_eq!(h.get("k9"), Some(&9));
    h.insert("after".into(), 5).unwrap();
    assert_eq!(open(&env.url(), "lost answer"), *h);
}

fn killed_during_a_transaction(env: &(impl Env + Sync)) {
    let url = env.url();
    DbHashMap::<String, String>::builder_url(&url)
        .table("slow")
        .src([("a".to_string(), "1".to_string())])
        .open()
        .unwrap();
    // A trigger that takes its time on one value, so the kill lands mid-transaction.
    let t = env.q("slow");
    match env.dialect() {
        write_thru_hash::Dialect::Postgres => {
            env.exec(
                "CREATE FUNCTION slow() RETURNS trigger AS $$ BEGIN \
                 IF NEW.value = '\"slow\"' THEN PERFORM pg_sleep(2); END IF; RETURN NEW; END $$ \
                 LANGUAGE plpgsql",
            );
            env.exec(&format!(
                "CREATE TRIGGER slow BEFORE INSERT ON {t} FOR EACH ROW EXECUTE FUNCTION slow()"
            ));
        }
        _ => env.exec(&format!(
            "CREATE TRIGGER slow BEFORE INSERT ON {t} FOR EACH ROW BEGIN \
             IF NEW.`value` = '\"slow\"' THEN DO SLEEP(2); END IF; END"
        )),
    }
    let mut s: DbHashMap<String, String> =
        DbHashMap::builder_url(&url).table("slow").open().unwrap();
    let before: HashMap<String, String> = (*s).clone();
    let handle = thread::scope(|scope| {
        scope.spawn(|| {
            thread::sleep(std::time::Duration::from_millis(500));
            kill_connections(env);
        });
        s.insert_many([
            ("x".to_string(), "fast".to_string()),
            ("y".to_string(), "slow".to_string()),
        ])
    });
    // The server ended the session before the commit: nothing was done, so a URL map
    // runs the transaction again on a new connection, and it goes through.
    match handle {
        Ok(()) => assert_eq!(s.get("y").map(String::as_str), Some("slow")),
        Err(err) => {
            assert_eq!(*s, before, "memory unchanged after: {err}");
            let fresh: DbHashMap<String, String> =
                DbHashMap::builder_url(&url).table("slow").open().unwrap();
            assert_eq!(
                fresh, before,
                "nothing of the killed transaction was committed"
            );
        }
    }
    s.insert("z".into(), "fine".into()).unwrap();
    let fresh: DbHashMap<String, String> =
        DbHashMap::builder_url(&url).table("slow").open().unwrap();
    assert_eq!(fresh, *s);
}

/// MySQL: a map whose connection the server closed while it was idle (KILL, or
/// `wait_timeout`) is not poisoned: nothing was sent on the dead connection, so the
/// next write either goes through on a new one (a URL map) or fails with a known
/// outcome (a map given a connection).
#[cfg(feature = "mysql")]
fn closed_while_idle(env: &env::MyEnv) {
    let url = env.url();
    let mut h = open(&url, "idle");
    h.insert("a".into(), 1).unwrap();
    kill_connections(env);
    thread::sleep(std::time::Duration::from_millis(300));
    h.insert("b".into(), 2)
        .expect("a URL map reconnects before writing on a connection closed while idle");

    let opts = ::mysql::OptsBuilder::from_opts(::mysql::Opts::from_url(&url).unwrap())
        .init(vec!["SET SESSION wait_timeout = 1"]);
    let conn = ::mysql::Conn::new(opts).unwrap();
    let mut g: DbHashMap<String, i64> = DbHashMap::builder(conn).table("idle").open().unwrap();
    thread::sleep(std::time::Duration::from_millis(2500));
    let err = g.insert("c".into(), 3).unwrap_err();
    assert!(!err.is_outcome_unknown(), "nothing was sent: {err}");
    assert!(!g.contains_key("c"));
    let again = g.insert("c".into(), 3).unwrap_err();
    assert!(!matches!(again, Error::Poisoned { .. }), "{again}");
    assert_eq!(open(&url, "idle"), *h);
}

/// MySQL: batches fit the server's `max_allowed_packet`, whatever it is.
fn small_max_allowed_packet(env: &impl Env) {
    let before = env.count("SELECT @@GLOBAL.max_allowed_packet");
    env.exec("SET GLOBAL max_allowed_packet = 1048576");
    // New sessions read the global value; the map's is one of them.
    let opened = DbHashMap::<String, String>::builder_url(&env.url())
        .table("packets")
        .open();
    env.exec(&format!("SET GLOBAL max_allowed_packet = {before}"));
    let mut h = opened.unwrap();
    let values = (0..100).map(|i| (format!("k{i}"), "v".repeat(20_000)));
    h.insert_many(values).unwrap();
    assert_eq!(h.len(), 100);
    let fresh: DbHashMap<String, String> = DbHashMap::builder_url(&env.url())
        .table("packets")
        .open()
        .unwrap();
    assert_eq!(fresh, *h);
}

#[cfg(feature = "mysql")]
#[test]
fn mysql_closed_while_idle() {
    closed_while_idle(&env::MyEnv::new());
}

#[cfg(feature = "mysql")]
#[test]
fn mysql_small_max_allowed_packet() {
    small_max_allowed_packet(&env::MyEnv::new());
}

#[cfg(feature = "odbc")]
#[test]
fn odbc_mysql_small_max_allowed_packet() {
    small_max_allowed_packet(&env::OdbcEnv::mysql());
}

/// MariaDB's ODBC driver answers some statements the server rejected (error 1265,
/// whose SQLSTATE is 01000) with "success with information": that is an error too,
/// and nothing of the batch is committed.
fn rejection_with_a_warning_state(env: &impl Env) {
    env.exec(
        "CREATE TABLE warned (`key` VARBINARY(100) PRIMARY KEY, `value` LONGTEXT NOT NULL, \
         e ENUM('a', 'b') NULL) ENGINE=InnoDB",
    );
    env.exec(
        "CREATE TRIGGER warned_ins BEFORE INSERT ON warned FOR EACH ROW \
         IF NEW.`value` = '\"boom\"' THEN SET NEW.e = 'zzz'; END IF",
    );
    let mut h: DbHashMap<String, String> = DbHashMap::builder_url(&env.url())
        .table("warned")
        .open()
        .unwrap();
    h.insert("fine".into(), "ok".into()).unwrap();
    let err = h.insert("bad".into(), "boom".into()).unwrap_err();
    assert!(matches!(err, Error::Database { .. }), "{err}");
    let batch = [
        ("x".to_string(), "ok".to_string()),
        ("y".into(), "boom".into()),
    ];
    assert!(h.insert_many(batch).is_err());
    assert_eq!(h.len(), 1);
    assert_eq!(
        env.count("SELECT count(*) FROM warned"),
        1,
        "nothing of the batch"
    );
    let fresh: DbHashMap<String, String> = DbHashMap::builder_url(&env.url())
        .table("warned")
        .open()
        .unwrap();
    assert_eq!(fresh, *h);
}

#[cfg(feature = "mysql")]
#[test]
fn mysql_rejection_with_a_warning_state() {
    rejection_with_a_warning_state(&env::MyEnv::new());
}

#[cfg(feature = "odbc")]
#[test]
fn odbc_mysql_rejection_with_a_warning_state() {
    rejection_with_a_warning_state(&env::OdbcEnv::mysql());
}

macro_rules! faults {
    ($backend:ident, $env:expr) => {
        mod $backend {
            use super::*;
            #[test]
            fn killed_between_calls() {
                super::killed_between_calls(&$env);
            }
            #[test]
            fn answer_to_commit_lost() {
                super::answer_to_commit_lost(&$env);
            }
            #[test]
            fn killed_during_a_transaction() {
                super::killed_during_a_transaction(&$env);
            }
        }
    };
}

#[cfg(feature = "postgres")]
faults!(postgres, env::PgEnv::new());
#[cfg(feature = "mysql")]
faults!(mysql, env::MyEnv::new());
#[cfg(feature = "odbc")]
faults!(odbc_postgres, env::OdbcEnv::postgres());
#[cfg(feature = "odbc")]
faults!(odbc_mysql, env::OdbcEnv::mysql());
