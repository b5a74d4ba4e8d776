//! A map on a PostgreSQL hot standby (streaming replication, `scripts/servers.sh`
//! starts one): it loads the table, refuses writes with an error that says the server
//! is read-only, memory unchanged, and a coherent map refreshes from it; a watching
//! shared map there polls, and hears of every change the primary commits.
#![cfg(feature = "postgres")]

#[path = "conformance/env.rs"]
#[allow(dead_code, unused_imports)]
mod env;

use std::time::Duration;

use write_thru_hash::{DbHashMap, Error, SharedDbHashMap};

fn url(var: &str) -> String {
    std::env::var(var).unwrap_or_else(|_| {
        panic!("{var} is not set: run `bash scripts/test.sh`, which starts the servers")
    })
}

/// A new database `wth_{name}_{pid}` on the primary: its URLs on the primary and on
/// the standby, its name, and an admin connection to drop it with.
fn fresh_database(name: &str) -> (String, String, String, postgres::Client) {
    let (primary, standby) = (url("WTH_POSTGRES_URL"), url("WTH_POSTGRES_STANDBY_URL"));
    let db = format!("wth_{name}_{}", std::process::id());
    let mut admin = postgres::Client::connect(&primary, postgres::NoTls).unwrap();
    admin
        .batch_execute(&format!("DROP DATABASE IF EXISTS {db} WITH (FORCE)"))
        .unwrap();
    admin
        .batch_execute(&format!("CREATE DATABASE {db}"))
        .unwrap();
    let on = |url: &str| format!("{}/{db}", url.rsplit_once('/').unwrap().0);
    (on(&primary), on(&standby), db, admin)
}

#[test]
fn postgres_standby_loads_refuses_writes_and_refreshes() {
    let (primary, standby, db, mut admin) = fresh_database("standby");

    let mut writer: DbHashMap<String, i64> = DbHashMap::builder_url(&primary)
        .table("replicated")
        .coherent()
        .open()
        .unwrap();
    writer
        .insert_many([("a".to_string(), 1), ("b".into(), 2)])
        .unwrap();

    // The standby replays the database, the table, its change log and the rows.
    let mut reader: Option<DbHashMap<String, i64>> = None;
    env::eventually("the table on the standby", Duration::from_secs(10), || {
        match DbHashMap::builder_url(&standby)
            .table("replicated")
            .coherent()
            .open()
        {
            Ok(h) if h.len() == 2 => {
                reader = Some(h);
                true
            }
            _ => false,
        }
    });
    let mut reader = reader.unwrap();
    assert_eq!(reader, writer);

    // Writes are refused, clearly, and change nothing.
    let err = reader.insert("c".into(), 3).unwrap_err();
    assert!(matches!(err, Error::Database { .. }), "{err}");
    let shown = err.to_string();
    assert!(
        shown.contains("25006") && shown.contains("primary"),
        "{shown}"
    );
    assert!(!err.is_retryable());
    assert!(reader.remove("a").is_err());
    assert!(reader.insert_many([("d".to_string(), 4)]).is_err());
    assert_eq!(reader, writer);

    // The primary's writes reach the standby map through refresh (polling).
    writer.insert("c".into(), 3).unwrap();
    writer.remove("a").unwrap();
    let mut seen = 0;
    env::eventually(
        "the changes on the standby",
        Duration::from_secs(10),
        || {
            seen += reader.refresh().unwrap();
            reader == writer
        },
    );
    assert_eq!(seen, 2);

    // A plain map opens on the standby too: the table exists, nothing is created.
    let plain: DbHashMap<String, i64> = DbHashMap::builder_url(&standby)
        .table("replicated")
        .open()
        .unwrap();
    assert_eq!(plain, writer);

    // A watching shared map on the standby (which cannot LISTEN: it polls) hears of
    // every change the primary commits.
    let watched: SharedDbHashMap<String, i64> = DbHashMap::builder_url(&standby)
        .table("replicated")
        .watch()
        .open_shared()
        .unwrap();
    let delays = env::changes_reach(&mut writer, &watched);
    eprintln!(
        "primary commit to the standby's watching map: {}",
        env::spread(&delays)
    );
    drop((reader, plain, writer, watched));
    let _ = admin.batch_execute(&format!("DROP DATABASE IF EXISTS {db} WITH (FORCE)"));
}

/// Found by probing: on a standby `txid_current_snapshot()` lists no transaction in
/// progress (recovery keeps them elsewhere), so a coherent map there took a primary
/// transaction still open for committed, and never saw it once it did commit. A
/// standby's position now counts every transaction from the snapshot's oldest one up as
/// not yet seen.
#[test]
fn postgres_standby_sees_a_transaction_that_commits_after_a_later_one() {
    let (primary, standby, db, mut admin) = fresh_database("standby_order");
    let open = |url: &str| {
        DbHashMap::<String, i64>::builder_url(url)
            .table("t")
            .coherent()
            .open()
    };
    let mut writer = open(&primary).unwrap();
    writer.insert("x".into(), 0).unwrap();
    let mut reader = None;
    env::eventually(
        "the table on the standby",
        Duration::from_secs(10),
        || match open(&standby) {
            Ok(h) if h.len() == 1 => {
                reader = Some(h);
                true
            }
            _ => false,
        },
    );
    let mut reader = reader.unwrap();
    let mut early = postgres::Client::connect(&primary, postgres::NoTls).unwrap();
    early
        .batch_execute("BEGIN; INSERT INTO t (key, value) VALUES ('\"a\"', '1')")
        .unwrap();
    writer.insert("b".into(), 2).unwrap();
    env::eventually("b on the standby's map", Duration::from_secs(10), || {
        reader.refresh().unwrap();
        reader.get("b") == Some(&2)
    });
    early.batch_execute("COMMIT").unwrap();
    env::eventually("a on the standby's map", Duration::from_secs(10), || {
        reader.refresh().unwrap();
        reader.get("a") == Some(&1)
    });
    let fresh = open(&standby).unwrap();
    assert_eq!(reader, fresh);
    drop((reader, writer, fresh));
    let _ = admin.batch_execute(&format!("DROP DATABASE IF EXISTS {db} WITH (FORCE)"));
}
