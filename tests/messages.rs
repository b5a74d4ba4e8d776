//! Messages that say what is true and what to do (issue 21, item 8): a read-only
//! session is not a read-only file, a password with URL characters asks to be
//! percent-encoded, a wrong password says so, and the server's reason for refusing a
//! write is in the message on every backend.
#![cfg(all(
    feature = "sqlite",
    feature = "postgres",
    feature = "mysql",
    feature = "odbc"
))]

#[path = "conformance/env.rs"]
#[allow(dead_code, unused_imports)]
mod env;

use env::Env;
use write_thru_hash::{rusqlite, DbHashMap, Error};

#[test]
fn sqlite_query_only_is_not_a_file_permission() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ro.sqlite");
    drop(DbHashMap::<String, i64>::open_path(&path).unwrap());
    let conn = rusqlite::Connection::open(&path).unwrap();
    conn.pragma_update(None, "query_only", true).unwrap();
    let mut h: DbHashMap<String, i64> = DbHashMap::open(conn).unwrap();
    let err = h.insert("a".into(), 1).unwrap_err();
    let text = err.to_string();
    assert!(text.contains("query_only"), "{text} / {err:?}");
    assert!(!text.contains("permissions"), "{text}");
}

#[test]
fn mysql_read_only_session_is_not_a_file_permission() {
    let env = env::MyEnv::new();
    drop(DbHashMap::<String, i64>::open_url(&env.url()).unwrap());
    let opts = ::mysql::OptsBuilder::from_opts(::mysql::Opts::from_url(&env.url()).unwrap())
        .init(vec!["SET SESSION TRANSACTION READ ONLY"]);
    let conn = ::mysql::Conn::new(opts).unwrap();
    let mut h: DbHashMap<String, i64> = DbHashMap::open(conn).unwrap();
    let text = h.insert("a".into(), 1).unwrap_err().to_string();
    assert!(text.contains("session"), "{text}");
    assert!(!text.contains("permissions"), "{text}");
}

#[test]
fn postgres_password_with_url_characters_asks_for_percent_encoding() {
    let url = "postgres://postgres:a/b;c{d}=e@127.0.0.1:5432/postgres";
    let err = DbHashMap::<String, i64>::open_url(url).unwrap_err();
    assert!(matches!(err, Error::Url { .. }), "{err}");
    let text = err.to_string();
    assert!(text.contains("percent-encoded"), "{text}");
    assert!(!text.contains("b;c"), "no password in: {text}");
}

#[test]
fn postgres_wrong_password_says_so() {
    let env = env::PgEnv::new();
    let url = env.url().replacen("wth-secret", "wrong", 1);
    let text = DbHashMap::<String, i64>::open_url(&url)
        .unwrap_err()
        .to_string();
    assert!(text.contains("password authentication failed"), "{text}");
    assert!(!text.contains("wrong"), "no password in: {text}");
}

/// The server's reason for refusing a write (here a CHECK constraint's name) is in the
/// message itself, not only down the source chain, on MariaDB and over ODBC.
fn refusal_names_the_constraint(env: &impl Env, create: &str) {
    env.exec(create);
    let mut h: DbHashMap<String, String> = env
        .builder()
        .table("checked")
        .codec(write_thru_hash::Text)
        .open()
        .unwrap();
    let text = h.insert("a".into(), "bad".into()).unwrap_err().to_string();
    assert!(
        text.contains("no_bad"),
        "the message names the constraint: {text}"
    );
}

/// The MariaDB table of the refusal tests, natively and over ODBC.
const MYSQL_CHECKED: &str = "CREATE TABLE checked (`key` VARBINARY(100) NOT NULL PRIMARY KEY, \
     `value` LONGTEXT NOT NULL, CONSTRAINT no_bad CHECK (`value` <> 'bad')) ENGINE=InnoDB";

#[test]
fn mysql_refusal_names_the_constraint() {
    refusal_names_the_constraint(&env::MyEnv::new(), MYSQL_CHECKED);
}

#[test]
fn odbc_mysql_refusal_names_the_constraint() {
    refusal_names_the_constraint(&env::OdbcEnv::mysql(), MYSQL_CHECKED);
}

#[test]
fn odbc_postgres_refusal_names_the_constraint() {
    refusal_names_the_constraint(
        &env::OdbcEnv::postgres(),
        "CREATE TABLE checked (key text COLLATE \"C\" NOT NULL PRIMARY KEY, \
         value text NOT NULL, CONSTRAINT no_bad CHECK (value <> 'bad'))",
    );
}
