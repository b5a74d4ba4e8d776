//! The `wth` binary, run as a process, on SQLite, PostgreSQL and MariaDB: the servers
//! that `WTH_POSTGRES_URL` and `WTH_MYSQL_URL` point to (`scripts/test.sh` starts them);
//! a missing server fails its tests.

use std::io::Write;
use std::process::{Command, Output, Stdio};

use write_thru_hash::mysql::prelude::Queryable;

fn wth(db: &str, args: &[&str], input: Option<&str>) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_wth"))
        .arg("--db")
        .arg(db)
        .args(args)
        .env_remove("WTH_DB")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    if let Some(text) = input {
        stdin.write_all(text.as_bytes()).unwrap();
    }
    drop(stdin);
    child.wait_with_output().unwrap()
}

/// Runs `wth` and expects success; returns its standard output.
fn ok(db: &str, args: &[&str]) -> String {
    let out = wth(db, args, None);
    assert!(
        out.status.success(),
        "wth {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.stderr.is_empty(), "nothing on stderr: {:?}", out.stderr);
    String::from_utf8(out.stdout).unwrap()
}

/// Runs `wth` and expects failure with a one-line message; returns it.
fn fails(db: &str, args: &[&str], input: Option<&str>) -> String {
    let out = wth(db, args, input);
    assert!(!out.status.success(), "wth {args:?} should fail");
    let err = String::from_utf8(out.stderr).unwrap();
    assert_eq!(err.lines().count(), 1, "one line: {err:?}");
    assert!(err.starts_with("wth: "), "{err}");
    err
}

fn server(var: &str) -> String {
    std::env::var(var).unwrap_or_else(|_| {
        panic!("{var} is not set: run `bash scripts/test.sh`, which starts the test servers")
    })
}

fn unique(prefix: &str) -> String {
    use std::sync::atomic::{AtomicUsize, Ordering};
    static N: AtomicUsize = AtomicUsize::new(0);
    format!(
        "{prefix}_{}_{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// A fresh PostgreSQL database, as a URL.
fn postgres_db() -> String {
    use write_thru_hash::postgres;
    let admin = server("WTH_POSTGRES_URL");
    let db = unique("wth_cli");
    postgres::Client::connect(&admin, postgres::NoTls)
        .unwrap()
        .batch_execute(&format!("CREATE DATABASE {db}"))
        .unwrap();
    let (base, _) = admin.rsplit_once('/').unwrap();
    format!("{base}/{db}")
}

/// A fresh MariaDB database, as a URL.
fn mysql_db() -> String {
    use write_thru_hash::mysql;
    let admin = server("WTH_MYSQL_URL");
    let db = unique("wth_cli");
    mysql::Conn::new(mysql::Opts::from_url(&admin).unwrap())
        .unwrap()
        .query_drop(format!("CREATE DATABASE {db}"))
        .unwrap();
    let (base, _) = admin.rsplit_once('/').unwrap();
    format!("{base}/{db}")
}

fn sqlite_db(dir: &tempfile::TempDir, name: &str) -> String {
    format!("sqlite:{}", dir.path().join(name).display())
}

fn basic_commands(db: &str) {
    ok(db, &["set", "\"alice\"", "{\"age\": 3}"]);
    ok(db, &["set", "\"bob\"", "[1, 2]"]);
    assert_eq!(ok(db, &["get", "\"alice\""]), "{\"age\":3}\n");
    assert_eq!(ok(db, &["count"]), "2\n");
    assert_eq!(ok(db, &["ls"]), "\"alice\"\n\"bob\"\n");
    ok(db, &["rm", "\"bob\""]);
    assert!(fails(db, &["get", "\"bob\""], None).contains("no key"));
    assert!(fails(db, &["rm", "\"bob\""], None).contains("no key"));
    assert!(fails(db, &["get", "alice"], None).contains("not JSON"));
    assert!(ok(db, &["tables"]).lines().any(|t| t == "hashtable"));
    // Text codec: taken as it is.
    ok(
        db,
        &["--table", "plain", "--codec", "text", "set", "k", "v v"],
    );
    assert_eq!(
        ok(db, &["--table", "plain", "--codec", "text", "get", "k"]),
        "v v\n"
    );
    // A missing table is not made by a command that only reads.
    assert!(fails(db, &["--table", "nosuch", "count"], None).contains("no table"));
    assert!(!ok(db, &["tables"]).lines().any(|t| t == "nosuch"));
    // A table read with a codec of the other kind.
    let err = fails(db, &["--codec", "bytes", "count"], None);
    assert!(err.contains("hashtable"), "{err}");
    // One-row commands touch one row: a row another program broke does not stop them
    // (a command that loaded the table would fail on it).
    ok(db, &["set", "\"zzz\"", "1"]);
    ok(db, &["set", "\"broken\"", "1"]);
    let t = if db.starts_with("mysql") {
        "`hashtable`"
    } else {
        "\"hashtable\""
    };
    let k = if db.starts_with("mysql") {
        "`key`"
    } else {
        "\"key\""
    };
    let v = if db.starts_with("mysql") {
        "`value`"
    } else {
        "\"value\""
    };
    sql(
        db,
        &format!("UPDATE {t} SET {v} = 'not json' WHERE {k} = '\"zzz\"'"),
    );
    assert_eq!(ok(db, &["get", "\"alice\""]), "{\"age\":3}\n");
    ok(db, &["set", "\"new\"", "2"]);
    ok(db, &["rm", "\"new\""]);
    assert_eq!(ok(db, &["count"]), "3\n");
    let err = fails(db, &["get", "\"zzz\""], None);
    assert!(err.contains("not json") || err.contains("JSON"), "{err}");
    let err = fails(db, &["dump"], None);
    assert!(err.contains("zzz"), "names the row: {err}");
    ok(db, &["clear"]);
    assert_eq!(ok(db, &["count"]), "0\n");
    // A key typed with its members in another order than the table's is the table's.
    ok(db, &["set", "{\"tenant\":\"acme\",\"id\":3}", "1"]);
    ok(db, &["set", "{\"id\":4,\"tenant\":\"acme\"}", "2"]);
    assert_eq!(ok(db, &["get", "{\"id\":3,\"tenant\":\"acme\"}"]), "1\n");
    assert_eq!(
        ok(db, &["ls"]),
        "{\"tenant\":\"acme\",\"id\":3}\n{\"tenant\":\"acme\",\"id\":4}\n"
    );
    ok(db, &["clear"]);
}

/// Runs SQL on the database a `wth` URL names, as another program would.
fn sql(db: &str, statement: &str) {
    if let Some(path) = db.strip_prefix("sqlite:") {
        write_thru_hash::rusqlite::Connection::open(path)
            .unwrap()
            .execute_batch(statement)
            .unwrap();
    } else if db.starts_with("postgres") {
        let mut c =
            write_thru_hash::postgres::Client::connect(db, write_thru_hash::postgres::NoTls)
                .unwrap();
        c.batch_execute(statement).unwrap();
    } else {
        use write_thru_hash::mysql::prelude::Queryable;
        let mut c =
            write_thru_hash::mysql::Conn::new(write_thru_hash::mysql::Opts::from_url(db).unwrap())
                .unwrap();
        c.query_drop(statement).unwrap();
    }
}

/// Bad lines write nothing and are named.
fn bad_input(db: &str) {
    ok(db, &["set", "\"keep\"", "1"]);
    for (input, says) in [
        ("{\"key\": \"a\", \"value\": 1}\nnot json\n", "line 2"),
        ("{\"value\": 1}\n", "line 1"),
        ("{\"key\": 1, \"value\": 2}\n[1]\n", "line 2"),
        // serde takes `[K, V]` for a struct: lines must be objects.
        ("[1,2]\n", "line 1"),
    ] {
        let err = fails(db, &["load"], Some(input));
        assert!(
            err.contains(says) && err.contains("nothing was written"),
            "{err}"
        );
    }
    let err = fails(
        db,
        &["--table", "plain", "--codec", "text", "load"],
        Some("{\"key\": 7, \"value\": \"x\"}\n"),
    );
    assert!(
        err.contains("line 1") && err.contains("not a string"),
        "{err}"
    );
    assert_eq!(ok(db, &["dump"]), "{\"key\":\"keep\",\"value\":1}\n");
}

const ENTRIES: &str = concat!(
    "{\"key\":\"ünïcödé 日本\",\"value\":{\"nested\":[1,2.5,null,true]}}\n",
    "{\"key\":{\"b\":1,\"a\":[\"x\"]},\"value\":\"a map as a key\"}\n",
    "{\"key\":[1,\"two\"],\"value\":\"with \\\"quotes\\\" and \\\\ back\"}\n",
    "{\"key\":42,\"value\":-0.5}\n",
);

#[test]
fn sqlite_commands() {
    let dir = tempfile::tempdir().unwrap();
    basic_commands(&sqlite_db(&dir, "a.db"));
    bad_input(&sqlite_db(&dir, "b.db"));
    slices(&sqlite_db(&dir, "c.db"), &sqlite_db(&dir, "d.db"));
}

/// `--prefix`: every command on the slice only; a key outside it is refused, and a
/// load with one writes nothing; `copy` replaces the same slice of the target.
fn slices(db: &str, other: &str) {
    let all = "{\"key\":\"t1/a\",\"value\":1}\n{\"key\":\"t1/b\",\"value\":2}\n\
               {\"key\":\"t10\",\"value\":3}\n{\"key\":\"t2/a\",\"value\":4}\n";
    let out = wth(db, &["load"], Some(all));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    fn with<'a>(args: &[&'a str]) -> Vec<&'a str> {
        [&["--prefix", "t1/"][..], args].concat()
    }
    assert_eq!(ok(db, &with(&["count"])), "2\n");
    assert_eq!(ok(db, &with(&["ls"])), "\"t1/a\"\n\"t1/b\"\n");
    assert_eq!(
        ok(db, &with(&["dump"])),
        "{\"key\":\"t1/a\",\"value\":1}\n{\"key\":\"t1/b\",\"value\":2}\n"
    );
    assert_eq!(ok(db, &with(&["get", "\"t1/a\""])), "1\n");
    for args in [
        &["get", "\"t2/a\""][..],
        &["set", "\"t2/b\"", "5"],
        &["rm", "\"t2/a\""],
    ] {
        let err = fails(db, &with(args), None);
        assert!(err.contains("outside the slice"), "{err}");
    }
    let err = fails(
        db,
        &with(&["load"]),
        Some("{\"key\":\"t1/c\",\"value\":5}\n{\"key\":\"t3\",\"value\":6}\n"),
    );
    assert!(err.contains("line 2") && err.contains("--prefix"), "{err}");
    assert_eq!(ok(db, &["count"]), "4\n", "nothing written");
    ok(db, &with(&["set", "\"t1/c\"", "7"]));
    // Found by probing: a string key typed with other escapes than serde_json writes
    // was taken as its raw text: outside the slice it is in, or stored as a second row
    // that no map opens.
    assert_eq!(ok(db, &with(&["get", "\"t1\\/c\""])), "7\n");
    ok(db, &with(&["set", "\"t1/\\u0063\"", "8"]));
    assert_eq!(ok(db, &with(&["get", "\"t1/c\""])), "8\n");
    ok(db, &with(&["set", "\"t1/c\"", "7"]));
    ok(other, &["set", "\"t1/old\"", "0"]);
    ok(other, &["set", "\"keep\"", "0"]);
    ok(db, &with(&["copy", "--to", other]));
    assert_eq!(
        ok(other, &["ls"]),
        "\"keep\"\n\"t1/a\"\n\"t1/b\"\n\"t1/c\"\n"
    );
    ok(db, &with(&["clear"]));
    assert_eq!(ok(db, &["ls"]), "\"t10\"\n\"t2/a\"\n");
    assert_eq!(
        ok(db, &["--prefix", "", "count"]),
        "2\n",
        "the empty prefix: all"
    );
}

#[test]
fn postgres_commands() {
    basic_commands(&postgres_db());
    slices(&postgres_db(), &postgres_db());
    bad_input(&postgres_db());
    server_refusals_name_the_line(&postgres_db());
}

/// What only the server refuses (a key longer than it can index, a NUL in text) is
/// named by its line too, and nothing is written.
fn server_refusals_name_the_line(db: &str) {
    ok(db, &["set", "\"keep\"", "1"]);
    let long = format!(
        "{{\"key\":\"a\",\"value\":1}}\n{{\"key\":\"{}\",\"value\":2}}\n",
        "k".repeat(5000)
    );
    let err = fails(db, &["load"], Some(&long));
    assert!(err.contains("line 2") && err.contains("too long"), "{err}");
    let nul = "{\"key\":\"a\",\"value\":\"1\"}\n{\"key\":\"b\",\"value\":\"x\\u0000y\"}\n";
    // With the json codec a NUL is the text `\u0000`; with text it is a NUL.
    let err = fails(
        db,
        &["--table", "plain", "--codec", "text", "load"],
        Some(nul),
    );
    assert!(err.contains("line 2"), "{err}");
    assert_eq!(ok(db, &["dump"]), "{\"key\":\"keep\",\"value\":1}\n");
}

#[test]
fn mysql_commands() {
    basic_commands(&mysql_db());
    slices(&mysql_db(), &mysql_db());
    bad_input(&mysql_db());
}

/// SQLite → PostgreSQL → MariaDB → SQLite by dump and load, and by copy: every dump
/// is the same bytes.
#[test]
fn sqlite_postgres_mysql_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let (first, pg, my, last) = (
        sqlite_db(&dir, "first.db"),
        postgres_db(),
        mysql_db(),
        sqlite_db(&dir, "last.db"),
    );
    let out = wth(&first, &["load"], Some(ENTRIES));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let dump = ok(&first, &["dump"]);
    assert_eq!(dump.lines().count(), 4);
    let mut previous = dump.clone();
    for db in [&pg, &my, &last] {
        let file = dir.path().join("dump.jsonl");
        std::fs::write(&file, &previous).unwrap();
        ok(db, &["load", "--replace", file.to_str().unwrap()]);
        let again = ok(db, &["dump"]);
        assert_eq!(again, dump, "through {db}");
        previous = again;
    }
    // copy, with another table name
    ok(&first, &["copy", "--to", &pg, "--to-table", "copied"]);
    assert_eq!(ok(&pg, &["--table", "copied", "dump"]), dump);
    // dump to a file
    let file = dir.path().join("out.jsonl");
    ok(&my, &["dump", file.to_str().unwrap()]);
    assert_eq!(std::fs::read_to_string(&file).unwrap(), dump);
}

#[test]
fn unreachable_servers_are_one_line_without_the_password() {
    for db in [
        "postgres://app:s3cr3t/pw@127.0.0.1:1/db",
        "mysql://app:s3cr3t?pw@127.0.0.1:1/db",
        "nosuch://app:s3cr3t@h/db",
    ] {
        for args in [&["count"][..], &["tables"], &["set", "1", "2"]] {
            let err = fails(db, args, None);
            assert!(!err.contains("s3cr3t"), "{err}");
        }
    }
    let out = Command::new(env!("CARGO_BIN_EXE_wth"))
        .args(["count"])
        .env_remove("WTH_DB")
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("WTH_DB"));
}

#[derive(serde::Serialize, serde::Deserialize, PartialEq, Eq, Hash, Debug)]
struct Point {
    y: i64,
    x: i64,
}

/// A table the library's own codec wrote (a struct's fields in declaration order, a
/// number beyond 64 bits): `wth` reads it, and a dump and a load give it back as it was.
#[test]
fn sqlite_tables_written_by_the_library_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let (db, other) = (sqlite_db(&dir, "lib.db"), sqlite_db(&dir, "other.db"));
    {
        let mut h: write_thru_hash::DbHashMap<Point, u128> =
            write_thru_hash::DbHashMap::open_url(&db).unwrap();
        h.insert(Point { y: 1, x: 2 }, u128::MAX).unwrap();
    }
    let dump = ok(&db, &["dump"]);
    assert_eq!(
        dump,
        "{\"key\":{\"y\":1,\"x\":2},\"value\":340282366920938463463374607431768211455}\n"
    );
    assert_eq!(ok(&db, &["count"]), "1\n");
    let file = dir.path().join("lib.jsonl");
    std::fs::write(&file, &dump).unwrap();
    ok(&other, &["load", file.to_str().unwrap()]);
    assert_eq!(ok(&other, &["dump"]), dump);
    let back: write_thru_hash::DbHashMap<Point, u128> =
        write_thru_hash::DbHashMap::open_url(&other).unwrap();
    assert_eq!(back[&Point { y: 1, x: 2 }], u128::MAX);
    // The same key written otherwise is the same key, not a second row.
    ok(&db, &["set", "{ \"x\": 2, \"y\": 1 }", "5"]);
    assert_eq!(ok(&db, &["count"]), "1\n");
    assert_eq!(ok(&db, &["get", "{\"x\":2,\"y\":1}"]), "5\n");
}

/// Odd input and output: a value with a newline stored by another client is dumped on
/// one line; a line that is not UTF-8 is named; a usage error is one line; a reader
/// that stops early is no failure; a read command on a missing SQLite file makes none.
#[test]
fn sqlite_odd_input_and_output() {
    let dir = tempfile::tempdir().unwrap();
    let db = sqlite_db(&dir, "odd.db");
    ok(&db, &["set", "\"k\"", "1"]);
    let conn = write_thru_hash::rusqlite::Connection::open(dir.path().join("odd.db")).unwrap();
    conn.execute_batch("UPDATE hashtable SET value = '[1,\n 2]'")
        .unwrap();
    drop(conn);
    assert_eq!(ok(&db, &["dump"]), "{\"key\":\"k\",\"value\":[1,2]}\n");

    let mut child = Command::new(env!("CARGO_BIN_EXE_wth"))
        .args(["--db", &db, "load"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"{\"key\":\"a\",\"value\":1}\n{\"key\":\"\xff\",\"value\":2}\n")
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("line 2") && err.contains("UTF-8"),
        "{err}"
    );

    let err = fails(&db, &["frobnicate"], None);
    assert!(err.contains("--help"), "{err}");

    let many: String = (0..20_000)
        .map(|i| format!("{{\"key\":{i},\"value\":\"{}\"}}\n", "v".repeat(50)))
        .collect();
    assert!(wth(&db, &["load"], Some(&many)).status.success());
    let mut child = Command::new(env!("CARGO_BIN_EXE_wth"))
        .args(["--db", &db, "dump"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut first = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(child.stdout.take().unwrap()),
        &mut first,
    )
    .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let missing = dir.path().join("missing.db");
    let url = format!("sqlite:{}", missing.display());
    assert!(fails(&url, &["count"], None).contains("no database file"));
    assert!(fails(&url, &["tables"], None).contains("no database file"));
    assert!(!missing.exists());
}

/// A wrong password says so, on one line, without the password; a MariaDB refusal is
/// the server's words once, not the driver's raw `MySqlError { … }` (issue 21).
#[test]
fn postgres_and_mysql_errors_say_what_the_server_said() {
    let pg = postgres_db().replacen("wth-secret", "not-the-password", 1);
    let err = fails(&pg, &["tables"], None);
    assert!(err.contains("password authentication failed"), "{err}");
    assert!(!err.contains("not-the-password"), "{err}");
    let my = mysql_db();
    ok(&my, &["set", "\"a\"", "1"]);
    let t = "`hashtable`";
    sql(
        &my,
        &format!("ALTER TABLE {t} ADD CONSTRAINT no_two CHECK (`value` <> '2')"),
    );
    let err = fails(&my, &["set", "\"b\"", "2"], None);
    assert!(err.contains("no_two"), "{err}");
    assert!(!err.contains("MySqlError"), "{err}");
}
