//! What users bring: their own tables (other types, collations, indexes), keys whose
//! `Eq` is looser than their encoding, connections in any state. Each test here is a
//! hole once found by trying the library as a new user would; it runs on every backend.

use std::collections::HashMap;
use std::hash::{Hash, Hasher};

use serde::{Deserialize, Serialize};
use write_thru_hash::{Bytes, DbHashMap, Dialect, Error, Text};

use crate::env::{chain, Env};

/// A key whose `Eq` and `Hash` ignore ASCII case while JSON keeps it: equal keys,
/// different bytes.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Ci(String);

impl PartialEq for Ci {
    fn eq(&self, other: &Self) -> bool {
        self.0.eq_ignore_ascii_case(&other.0)
    }
}
impl Eq for Ci {}
impl Hash for Ci {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.0.to_ascii_lowercase().hash(state);
    }
}

fn ci(s: &str) -> Ci {
    Ci(s.to_string())
}

/// Opening `name` with the `Text` codec is refused for its schema; the message.
fn refused_as_text_table(env: &impl Env, name: &str, ddl: &str) -> String {
    let err = env
        .builder::<String, String>()
        .table(name)
        .codec(Text)
        .open()
        .unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, Error::Schema { .. }), "{ddl}: {msg}");
    msg
}

fn rows(env: &impl Env, table: &str) -> i64 {
    env.count(&format!("SELECT count(*) FROM {}", env.q(table)))
}

fn open_ci(env: &impl Env, table: &str) -> DbHashMap<Ci, i64> {
    env.builder()
        .table(table)
        .open()
        .unwrap_or_else(|e| panic!("open {table}: {e}"))
}

/// Equal keys with different encodings inside one batch, transaction or `src` are
/// refused as a single insert is: memory would keep one key and the table another.
pub(crate) fn equal_keys_in_one_batch_are_refused(env: &impl Env) {
    let mut h = open_ci(env, "ci");
    let err = h.insert_many([(ci("a"), 1), (ci("A"), 2)]).unwrap_err();
    assert!(matches!(err, Error::NonCanonicalKey { .. }), "{err}");
    assert!(h.is_empty());
    assert_eq!(rows(env, "ci"), 0);

    let err = h
        .transaction(|tx| {
            tx.insert(ci("b"), 1)?;
            tx.insert(ci("B"), 2)
        })
        .unwrap_err();
    assert!(matches!(err, Error::NonCanonicalKey { .. }), "{err}");
    assert_eq!(rows(env, "ci"), 0);

    // The same key written the same way twice is fine, the last value wins.
    h.insert_many([(ci("c"), 1), (ci("c"), 2)]).unwrap();
    assert_eq!(h[&ci("c")], 2);
    h.transaction(|tx| {
        tx.insert(ci("d"), 1)?;
        tx.insert(ci("d"), 2)
    })
    .unwrap();
    // Against a key held: refused in a batch as in a single insert.
    let err = h.insert_many([(ci("x"), 1), (ci("C"), 9)]).unwrap_err();
    assert!(matches!(err, Error::NonCanonicalKey { .. }), "{err}");
    assert_eq!(h[&ci("c")], 2);
    let fresh = open_ci(env, "ci");
    assert_eq!(fresh, h);
    assert_eq!(rows(env, "ci"), 2);

    let replaced = env
        .builder::<Ci, i64>()
        .table("ci")
        .src([(ci("e"), 1), (ci("E"), 2)])
        .open();
    assert!(
        matches!(replaced, Err(Error::NonCanonicalKey { .. })),
        "{replaced:?}"
    );
    assert_eq!(open_ci(env, "ci"), h, "the table kept its content");
}

/// One user table that `open` must refuse, and why.
struct Refused {
    ddl: String,
    /// A word the reason must contain.
    says: &'static str,
}

fn refused(ddl: String, says: &'static str) -> Refused {
    Refused { ddl, says }
}

/// Tables whose key column does not compare bytes exactly, whose primary key is not
/// the whole key, that have another unique index, or whose columns change values:
/// `open` refuses each with a schema error that says what to change, and writes
/// nothing.
pub(crate) fn tables_that_do_not_keep_keys_apart_are_refused(env: &impl Env) {
    let (k, v) = (env.q("key"), env.q("value"));
    let mut cases: Vec<Refused> = Vec::new();
    match env.dialect() {
        Dialect::Sqlite => {
            for (cols, says) in [
                (
                    format!("{k} TEXT COLLATE NOCASE PRIMARY KEY, {v} TEXT"),
                    "NOCASE",
                ),
                (
                    format!("{k} TEXT PRIMARY KEY COLLATE RTRIM, {v} TEXT"),
                    "RTRIM",
                ),
                (
                    format!("{k} TEXT, {v} TEXT, PRIMARY KEY ({k} COLLATE NOCASE)"),
                    "NOCASE",
                ),
                (format!("{k} NUMERIC PRIMARY KEY, {v} TEXT"), "affinity"),
                (format!("{k} INTEGER PRIMARY KEY, {v} TEXT"), "affinity"),
                (format!("{k} TEXT PRIMARY KEY, {v} INTEGER"), "affinity"),
                (format!("{k} TEXT PRIMARY KEY, {v} DECIMAL(10)"), "affinity"),
                (
                    format!("{k} TEXT PRIMARY KEY, {v} TEXT UNIQUE"),
                    "unique index",
                ),
                (
                    format!("{k} TEXT, {v} TEXT, PRIMARY KEY ({k}, {v})"),
                    "primary key",
                ),
            ] {
                cases.push(refused(cols, says));
            }
        }
        Dialect::Postgres => {
            env.exec(
                "CREATE COLLATION IF NOT EXISTS wth_ci \
                 (provider = icu, locale = 'und-u-ks-level2', deterministic = false)",
            );
            for (cols, says) in [
                (
                    format!("{k} char(10) PRIMARY KEY, {v} text NOT NULL"),
                    "char(n)",
                ),
                (
                    format!("{k} text PRIMARY KEY, {v} char(20) NOT NULL"),
                    "char(n)",
                ),
                (
                    format!("{k} text COLLATE wth_ci PRIMARY KEY, {v} text NOT NULL"),
                    "nondeterministic",
                ),
                (
                    "\"Key\" text PRIMARY KEY, \"VALUE\" text NOT NULL".to_string(),
                    "lower case",
                ),
                (
                    format!("{k} text PRIMARY KEY, {v} text NOT NULL UNIQUE"),
                    "unique index",
                ),
                (
                    format!("{k} text, {v} text NOT NULL, PRIMARY KEY ({k}, {v})"),
                    "primary key",
                ),
                (
                    format!("{k} varchar(3) PRIMARY KEY, {v} text NOT NULL"),
                    "length",
                ),
                (
                    format!("{k} text PRIMARY KEY, {v} varchar(10) NOT NULL"),
                    "length",
                ),
            ] {
                cases.push(refused(cols, says));
            }
        }
        _ => {
            for (cols, says) in [
                (
                    format!(
                        "{k} CHAR(20) CHARACTER SET utf8mb4 COLLATE utf8mb4_nopad_bin \
                         PRIMARY KEY, {v} LONGTEXT NOT NULL"
                    ),
                    "VARBINARY",
                ),
                (
                    format!(
                        "{k} VARCHAR(100) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin \
                         PRIMARY KEY, {v} LONGTEXT NOT NULL"
                    ),
                    "VARBINARY",
                ),
                (
                    format!(
                        "{k} VARCHAR(100) CHARACTER SET utf8mb4 COLLATE utf8mb4_general_ci \
                         PRIMARY KEY, {v} LONGTEXT NOT NULL"
                    ),
                    "VARBINARY",
                ),
                (
                    format!("{k} BINARY(20) PRIMARY KEY, {v} LONGTEXT NOT NULL"),
                    "VARBINARY",
                ),
                (
                    format!(
                        "{k} VARBINARY(100) NOT NULL, {v} LONGTEXT NOT NULL, PRIMARY KEY ({k}(4))"
                    ),
                    "first 4",
                ),
                (
                    format!(
                        "{k} VARBINARY(100) PRIMARY KEY, {v} VARCHAR(200) NOT NULL, UNIQUE ({v})"
                    ),
                    "unique index",
                ),
                (
                    format!("{k} VARBINARY(100) PRIMARY KEY, {v} CHAR(50) NOT NULL"),
                    "char",
                ),
                (
                    format!("{k} VARBINARY(100) PRIMARY KEY, {v} INT NOT NULL"),
                    "int",
                ),
                (
                    format!(
                        "{k} VARCHAR(3) CHARACTER SET utf8mb4 COLLATE utf8mb4_nopad_bin \
                         PRIMARY KEY, {v} LONGTEXT NOT NULL"
                    ),
                    "VARBINARY",
                ),
                (
                    format!("{k} VARBINARY(100) PRIMARY KEY, {v} TINYTEXT NOT NULL"),
                    "LONGTEXT",
                ),
                (
                    format!("{k} VARBINARY(100) PRIMARY KEY, {v} VARCHAR(100) NOT NULL"),
                    "LONGTEXT",
                ),
            ] {
                cases.push(refused(cols, says));
            }
        }
    }
    // A unique index that compares the key otherwise than its primary key does.
    let (table, index) = (env.q("user index"), env.q("user index ci"));
    let (key_type, ci) = match env.dialect() {
        Dialect::Sqlite => ("TEXT", format!("{k} COLLATE NOCASE")),
        Dialect::Postgres => ("text", format!("{k} COLLATE wth_ci")),
        _ => ("VARBINARY(100)", format!("{k}(2)")),
    };
    env.exec(&format!(
        "CREATE TABLE {table} ({k} {key_type} NOT NULL PRIMARY KEY, {v} TEXT NOT NULL)"
    ));
    env.exec(&format!("CREATE UNIQUE INDEX {index} ON {table} ({ci})"));
    let err = env
        .builder::<String, String>()
        .table("user index")
        .codec(Text)
        .open()
        .unwrap_err();
    assert!(err.to_string().contains("unique index"), "{err}");
    assert_eq!(rows(env, "user index"), 0);

    for (i, case) in cases.iter().enumerate() {
        let name = format!("user {i}");
        let engine = if env.dialect() == Dialect::Mysql {
            " ENGINE=InnoDB"
        } else {
            ""
        };
        env.exec(&format!(
            "CREATE TABLE {} ({}){engine}",
            env.q(&name),
            case.ddl
        ));
        let msg = refused_as_text_table(env, &name, &case.ddl);
        assert!(
            msg.to_lowercase().contains(&case.says.to_lowercase()),
            "{}: the reason names {:?}: {msg}",
            case.ddl,
            case.says
        );
        assert_eq!(rows(env, &name), 0, "nothing written: {}", case.ddl);
    }
}

/// Tables users made that do keep keys apart open and work, and the map's deletes
/// compare bytes even where the column's own collation would not.
pub(crate) fn user_tables_that_keep_keys_apart_work(env: &impl Env) {
    let (k, v) = (env.q("key"), env.q("value"));
    let cols = match env.dialect() {
        // The column compares ignoring case, its primary key index byte for byte.
        Dialect::Sqlite => format!(
            "{k} TEXT NOT NULL COLLATE NOCASE, {v} TEXT NOT NULL, note TEXT, \
             PRIMARY KEY ({k} COLLATE BINARY)"
        ),
        Dialect::Postgres => {
            format!("{k} varchar COLLATE \"C\" PRIMARY KEY, {v} text NOT NULL, note text")
        }
        _ => format!(
            "{k} VARBINARY(200) PRIMARY KEY, {v} LONGTEXT CHARACTER SET utf8mb4 NOT NULL, \
             note TEXT"
        ),
    };
    env.exec(&format!("CREATE TABLE {} ({cols})", env.q("mine")));
    // A plain (not unique) index is fine, and so is a second unique index on exactly
    // the whole key, compared exactly: it cannot match another row.
    env.exec(&format!(
        "CREATE INDEX {} ON {} (note)",
        env.q("mine_note"),
        env.q("mine")
    ));
    let exact = match env.dialect() {
        // The column's own collation is NOCASE here.
        Dialect::Sqlite => format!("{k} COLLATE BINARY"),
        _ => k.clone(),
    };
    env.exec(&format!(
        "CREATE UNIQUE INDEX {} ON {} ({exact})",
        env.q("mine_key"),
        env.q("mine")
    ));
    let mut h: DbHashMap<String, String> = env.builder().table("mine").codec(Text).open().unwrap();
    for key in ["a", "A", "a "] {
        h.insert(key.into(), format!("{key}!  ")).unwrap();
    }
    h.remove("a").unwrap();
    assert_eq!(rows(env, "mine"), 2, "the delete removed only \"a\"");
    let fresh: DbHashMap<String, String> = env.builder().table("mine").codec(Text).open().unwrap();
    assert_eq!(fresh, h);
    assert_eq!(fresh["A"], "A!  ", "values come back as written");
}

/// SQLite keeps text 'a' and the blob X'61' apart: a table written as text and opened
/// with a binary key codec (or the reverse) is refused, not half-matched.
pub(crate) fn key_kind_must_match_the_codec(env: &impl Env) {
    if env.dialect() != Dialect::Sqlite {
        return;
    }
    let mut t: DbHashMap<String, String> = env.builder().table("kinds").codec(Text).open().unwrap();
    t.insert("a".into(), "1".into()).unwrap();
    drop(t);
    let err = DbHashMap::<Vec<u8>, Vec<u8>>::builder_url(&env.url())
        .table("kinds")
        .codec(Bytes)
        .open()
        .unwrap_err();
    assert!(matches!(err, Error::Decode { what: "key", .. }), "{err}");
    assert!(err.to_string().contains("text"), "{err}");
}

/// Text the backend cannot carry byte for byte (a NUL inside) is stored exactly or
/// refused with memory unchanged; never stored as something else.
pub(crate) fn nul_in_text_is_kept_or_refused(env: &impl Env) {
    let mut h: DbHashMap<String, String> = env.builder().table("nul").codec(Text).open().unwrap();
    h.insert("k".into(), "plain".into()).unwrap();
    for (key, value) in [("k\0z", "x"), ("k2", "v\0w")] {
        match h.insert(key.into(), value.into()) {
            Ok(_) => assert_eq!(h[key], value),
            Err(e) => assert!(!h.contains_key(key), "{e}"),
        }
    }
    let r = h.insert_many([
        ("m".to_string(), "ok".to_string()),
        ("m\0".into(), "x".into()),
    ]);
    if r.is_err() {
        assert!(!h.contains_key("m"), "the batch failed whole");
    }
    let fresh: DbHashMap<String, String> = env.builder().table("nul").codec(Text).open().unwrap();
    assert_eq!(fresh, h);
}

/// The server's reason for refusing a write reaches the user, whatever the driver's
/// error nesting.
pub(crate) fn server_reasons_are_shown(env: &impl Env) {
    let (k, v) = (env.q("key"), env.q("value"));
    let key_type = match env.dialect() {
        Dialect::Mysql => "VARBINARY(100)",
        _ => "TEXT",
    };
    env.exec(&format!(
        "CREATE TABLE {} ({k} {key_type} NOT NULL PRIMARY KEY, {v} {} NOT NULL, \
         CONSTRAINT short_values CHECK (length({v}) < 10))",
        env.q("checked"),
        env.text_type()
    ));
    let mut h: DbHashMap<String, String> =
        env.builder().table("checked").codec(Text).open().unwrap();
    let err = h
        .insert("a".into(), "far too long a value".into())
        .unwrap_err();
    assert!(h.is_empty());
    let all = chain(&err);
    assert!(
        all.contains("short_values"),
        "the chain names the constraint: {all}"
    );
    if env.dialect() == Dialect::Postgres && !env.url().starts_with("odbc:") {
        // The `postgres` crate's own message is "db error": the server's is shown.
        let shown = err.to_string();
        assert!(
            shown.contains("short_values") && shown.contains("23514"),
            "{shown}"
        );
    }
}

/// A user who may read and write a table but not create one opens it; a read-only
/// session opens it too, and its writes fail with memory unchanged.
pub(crate) fn existing_tables_open_without_create_rights(env: &impl Env) {
    let mut h: DbHashMap<String, i64> = env.builder().table("granted").open().unwrap();
    h.insert("a".into(), 1).unwrap();
    drop(h);
    let Some(url) = env.restricted_url("granted") else {
        return;
    };
    let mut r: DbHashMap<String, i64> = DbHashMap::builder_url(&url)
        .table("granted")
        .open()
        .unwrap_or_else(|e| panic!("open with DML rights only: {}", chain(&e)));
    assert_eq!(r, HashMap::from([("a".to_string(), 1)]));
    r.insert("b".into(), 2).unwrap();
    r.remove("a").unwrap();
    assert_eq!(
        env.builder::<String, i64>()
            .table("granted")
            .open()
            .unwrap(),
        r
    );
    // A table that does not exist cannot be made with those rights: a clear error.
    let err = DbHashMap::<String, i64>::builder_url(&url)
        .table("not granted")
        .open()
        .unwrap_err();
    assert!(matches!(err, Error::Database { .. }), "{err}");
}

/// A connection handed over inside a transaction its caller began is refused (the map
/// would commit or roll back the caller's work); one with autocommit off is used, and
/// every write it acknowledges is committed.
pub(crate) fn connections_in_any_state(env: &impl Env) {
    if let Some(conn) = env.conn_in_failed_transaction() {
        let err = env
            .wrap::<String, i64>(conn)
            .table("states")
            .open()
            .unwrap_err();
        assert!(matches!(err, Error::ConnectionState { .. }), "{err}");
    }
    if let Some(conn) = env.conn_in_transaction() {
        let err = env
            .wrap::<String, i64>(conn)
            .table("states")
            .open()
            .unwrap_err();
        assert!(matches!(err, Error::ConnectionState { .. }), "{err}");
        assert!(err.to_string().contains("transaction"), "{err}");
    }
    if let Some(conn) = env.conn_autocommit_off() {
        let mut h: DbHashMap<String, i64> = env.wrap(conn).table("states").open().unwrap();
        h.insert("single".into(), 1).unwrap();
        h.insert_many([("many".to_string(), 2), ("more".to_string(), 3)])
            .unwrap();
        h.remove("more").unwrap();
        h.transaction(|tx| tx.insert("tx".into(), 4)).unwrap();
        drop(h);
        let fresh: DbHashMap<String, i64> = env.builder().table("states").open().unwrap();
        let expected = HashMap::from([
            ("single".to_string(), 1),
            ("many".to_string(), 2),
            ("tx".to_string(), 4),
        ]);
        assert_eq!(fresh, expected, "every acknowledged write was committed");
    }
}

/// A temporary table of the same name hides the table on the connection handed over:
/// writes would go to it, and a fresh open would not see them. Refused at open.
pub(crate) fn temporary_tables_that_hide_the_table_are_refused(env: &impl Env) {
    let (k, v) = (env.q("key"), env.q("value"));
    let (key_type, temp) = match env.dialect() {
        Dialect::Mysql => ("VARBINARY(100)", "TEMPORARY"),
        _ => ("TEXT", "TEMP"),
    };
    let mut h: DbHashMap<String, String> =
        env.builder().table("hidden").codec(Text).open().unwrap();
    h.insert("base".into(), "1".into()).unwrap();
    let conn = env.conn_after(&format!(
        "CREATE {temp} TABLE {} ({k} {key_type} NOT NULL PRIMARY KEY, {v} TEXT NOT NULL)",
        env.q("hidden")
    ));
    let err = env
        .wrap::<String, String>(conn)
        .table("hidden")
        .codec(Text)
        .open()
        .unwrap_err();
    assert!(matches!(err, Error::Schema { .. }), "{err}");
    assert!(err.to_string().contains("temporary"), "{err}");
}

/// Session settings a user may have made, or a server may default to: the map's writes
/// still end committed, and the table holds what was written.
pub(crate) fn session_settings_do_not_change_what_is_stored(env: &impl Env) {
    let settings: &[&str] = match (env.dialect(), env.url().starts_with("odbc:")) {
        (Dialect::Mysql, false) => &[
            "SET SESSION completion_type = 'CHAIN'",
            "SET NAMES latin1",
            "SET SESSION sql_mode = 'EMPTY_STRING_IS_NULL'",
            "SET SESSION sql_mode = 'ORACLE'",
        ],
        (Dialect::Mysql, true) => &[
            "SET SESSION completion_type = 'CHAIN'",
            "SET SESSION sql_mode = 'EMPTY_STRING_IS_NULL'",
        ],
        (Dialect::Postgres, false) => &["SET client_encoding = 'LATIN1'"],
        _ => &[],
    };
    for (i, setting) in settings.iter().enumerate() {
        let table = format!("session {i}");
        let conn = env.conn_after(setting);
        let mut h: DbHashMap<String, String> =
            env.wrap(conn).table(&table).codec(Text).open().unwrap();
        h.insert_many([
            ("batch".to_string(), "é".to_string()),
            ("b2".into(), "2".into()),
        ])
        .unwrap();
        h.insert("single".into(), String::new()).unwrap();
        h.insert("ünï".into(), "日本".into()).unwrap();
        h.remove("b2").unwrap();
        // Another connection sees it all while the map is still open.
        let seen: DbHashMap<String, String> =
            env.builder().table(&table).codec(Text).open().unwrap();
        assert_eq!(seen, h, "after {setting}");
    }
}

/// A key codec that writes two unequal keys as the same bytes (`None` and `Some(())`
/// are both JSON `null`) would make them one row: the second is refused.
pub(crate) fn keys_that_read_back_as_others_are_refused(env: &impl Env) {
    let mut h: DbHashMap<Option<()>, i32> = env.builder().table("collide").open().unwrap();
    h.insert(None, 1).unwrap();
    let err = h.insert(Some(()), 2).unwrap_err();
    assert!(matches!(err, Error::Encode { what: "key", .. }), "{err}");
    assert!(h.insert_many([(Some(()), 3)]).is_err());
    assert!(h.upsert(Some(()), |_| 4).is_err());
    assert!(h.transaction(|tx| tx.insert(Some(()), 5)).is_err());
    assert_eq!(h.len(), 1);
    let fresh: DbHashMap<Option<()>, i32> = env.builder().table("collide").open().unwrap();
    assert_eq!(fresh, h);
}

/// A trigger or rule that silently drops a written row: the write fails, memory is
/// unchanged (SQLite `RAISE(IGNORE)`, PostgreSQL `DO INSTEAD NOTHING`).
pub(crate) fn rows_dropped_by_the_table_are_errors(env: &impl Env) {
    let mut h: DbHashMap<String, i64> = env.builder().table("dropper").open().unwrap();
    let (t, v) = (env.q("dropper"), env.q("value"));
    match env.dialect() {
        Dialect::Sqlite => env.exec(&format!(
            "CREATE TRIGGER drop13 BEFORE INSERT ON {t} WHEN NEW.{v} = '13' \
             BEGIN SELECT RAISE(IGNORE); END"
        )),
        Dialect::Postgres => env.exec(&format!(
            "CREATE RULE drop13 AS ON INSERT TO {t} WHERE NEW.{v} = '13' DO INSTEAD NOTHING"
        )),
        _ => return,
    }
    h.insert("a".into(), 1).unwrap();
    assert!(h.insert("b".into(), 13).is_err());
    assert!(h
        .insert_many([("c".to_string(), 1), ("d".into(), 13)])
        .is_err());
    assert_eq!(h, HashMap::from([("a".to_string(), 1)]));
    let fresh: DbHashMap<String, i64> = env.builder().table("dropper").open().unwrap();
    assert_eq!(fresh, h);
}

/// Found by probing (issue 21): a delete that a rule or trigger drops was acknowledged:
/// memory dropped the key, the table kept it, and it came back on the next open. Every
/// way a map deletes (`remove`, `remove_many`, `retain`, `clear`, a transaction) is
/// refused when the table keeps the row, with memory and table as before. (MySQL's
/// triggers cannot keep a row: there is nothing to test.)
pub(crate) fn deletes_dropped_by_the_table_are_errors(env: &impl Env) {
    let mut h: DbHashMap<String, i64> = env.builder().table("keeper").open().unwrap();
    h.insert_many((0..6).map(|i| (format!("k{i}"), i))).unwrap();
    h.insert("keep".into(), 13).unwrap();
    let (t, k, v) = (env.q("keeper"), env.q("key"), env.q("value"));
    match env.dialect() {
        Dialect::Sqlite => env.exec(&format!(
            "CREATE TRIGGER keep13 BEFORE DELETE ON {t} WHEN OLD.{v} = '13' \
             BEGIN SELECT RAISE(IGNORE); END"
        )),
        // A soft delete, as users write them.
        Dialect::Postgres => env.exec(&format!(
            "CREATE RULE keep13 AS ON DELETE TO {t} WHERE OLD.{v} = '13' \
             DO INSTEAD UPDATE {t} SET {v} = '13' WHERE {k} = OLD.{k}"
        )),
        _ => return,
    }
    let before = h.to_hash_map();
    assert!(h.remove("keep").is_err(), "remove");
    assert!(h.remove_many(["k1", "keep"]).is_err(), "remove_many");
    assert!(h.retain(|_, v| *v % 2 == 0).is_err(), "retain");
    assert!(h.clear().is_err(), "clear");
    assert!(
        h.transaction(|tx| {
            tx.remove("keep")?;
            tx.insert("new".into(), 1)?;
            Ok(())
        })
        .is_err(),
        "transaction"
    );
    assert_eq!(*h, before, "memory unchanged");
    let fresh: DbHashMap<String, i64> = env.builder().table("keeper").open().unwrap();
    assert_eq!(fresh, h, "the table unchanged");
    // Deletes the table does take still work.
    assert_eq!(h.remove("k2").unwrap(), Some(2));
    assert_eq!(h.remove_many(["k3", "k4"]).unwrap(), 2);
    let fresh: DbHashMap<String, i64> = env.builder().table("keeper").open().unwrap();
    assert_eq!(fresh, h);
}

/// The same with a PostgreSQL trigger that returns NULL before a delete.
pub(crate) fn deletes_skipped_by_a_trigger_are_errors(env: &impl Env) {
    if env.dialect() != Dialect::Postgres {
        return;
    }
    let mut h: DbHashMap<String, i64> = env.builder().table("skipper").open().unwrap();
    h.insert_many([("a".to_string(), 1), ("keep".into(), 13)])
        .unwrap();
    let (t, v) = (env.q("skipper"), env.q("value"));
    env.exec(&format!(
        "CREATE FUNCTION skip13() RETURNS trigger AS $$ BEGIN \
         IF OLD.{v} = '13' THEN RETURN NULL; END IF; RETURN OLD; END $$ LANGUAGE plpgsql; \
         CREATE TRIGGER skip13 BEFORE DELETE ON {t} FOR EACH ROW EXECUTE FUNCTION skip13()"
    ));
    assert!(h.remove("keep").is_err());
    assert!(h.clear().is_err());
    assert_eq!(h.len(), 2);
    assert_eq!(h.remove("a").unwrap(), Some(1));
    let fresh: DbHashMap<String, i64> = env.builder().table("skipper").open().unwrap();
    assert_eq!(fresh, h);
}

/// Found by probing (issue 21): tables on which every write fails were accepted, and
/// each write then failed. They are refused at open, naming the column and what to
/// change: an extra NOT NULL column without a default (every backend), a generated
/// value column, a DEFERRABLE primary key (PostgreSQL: ON CONFLICT cannot use it), a
/// SQLite STRICT table whose value column's type refuses the codec's output.
pub(crate) fn tables_on_which_every_write_fails_are_refused(env: &impl Env) {
    let (k, v) = (env.q("key"), env.q("value"));
    let (key_type, value_type, engine) = match env.dialect() {
        Dialect::Sqlite => ("TEXT", "TEXT", ""),
        Dialect::Postgres => ("text COLLATE \"C\"", "text", ""),
        _ => ("VARBINARY(100)", "LONGTEXT", " ENGINE=InnoDB"),
    };
    let mut cases = vec![
        (
            format!(
                "{k} {key_type} NOT NULL PRIMARY KEY, {v} {value_type} NOT NULL, \
                 tenant INT NOT NULL"
            ),
            "tenant",
        ),
        (
            format!(
                "{k} {key_type} NOT NULL PRIMARY KEY, \
                 {v} {value_type} GENERATED ALWAYS AS ('x') STORED"
            ),
            "generated",
        ),
    ];
    match env.dialect() {
        Dialect::Postgres => cases.push((
            format!("{k} {key_type} NOT NULL, {v} TEXT NOT NULL, PRIMARY KEY ({k}) DEFERRABLE"),
            "DEFERRABLE",
        )),
        Dialect::Sqlite if !env.url().starts_with("odbc:") => {
            cases.push((
                format!(
                    "{k} TEXT NOT NULL PRIMARY KEY, {v} BLOB NOT NULL) STRICT, WITHOUT ROWID --"
                ),
                "STRICT",
            ));
        }
        _ => {}
    }
    for (i, (ddl, says)) in cases.iter().enumerate() {
        let name = format!("unwritable {i}");
        let ddl = if ddl.ends_with("--") {
            format!(
                "CREATE TABLE {} ({}",
                env.q(&name),
                ddl.trim_end_matches(" --")
            )
        } else {
            format!("CREATE TABLE {} ({ddl}){engine}", env.q(&name))
        };
        env.exec(&ddl);
        let msg = refused_as_text_table(env, &name, &ddl);
        assert!(msg.contains(says), "{ddl}: names {says:?}: {msg}");
    }
    // STRICT with the right types, and ANY, work.
    if env.dialect() == Dialect::Sqlite && !env.url().starts_with("odbc:") {
        env.exec(&format!(
            "CREATE TABLE {} ({k} TEXT NOT NULL PRIMARY KEY, {v} ANY NOT NULL) STRICT",
            env.q("strict any")
        ));
        let mut h: DbHashMap<String, String> = env
            .builder()
            .table("strict any")
            .codec(Text)
            .open()
            .unwrap();
        h.insert("a".into(), "007".into()).unwrap();
        let fresh: DbHashMap<String, String> = env
            .builder()
            .table("strict any")
            .codec(Text)
            .open()
            .unwrap();
        assert_eq!(fresh["a"], "007");
    }
}

/// Found by probing (issue 21): a single write that a trigger drops after writing
/// elsewhere (an audit row) returned an error, but the trigger's other change stayed
/// committed. A refused write takes back everything it did, single writes included.
pub(crate) fn a_refused_write_leaves_no_trace(env: &impl Env) {
    let (t, v, audit) = (env.q("traced"), env.q("value"), env.q("traced audit"));
    let key_type = if env.dialect() == Dialect::Postgres {
        "text COLLATE \"C\""
    } else {
        "TEXT"
    };
    match env.dialect() {
        Dialect::Sqlite => env.exec(&format!(
            "CREATE TABLE {t} ({} {key_type} NOT NULL PRIMARY KEY, {v} TEXT NOT NULL); \
             CREATE TABLE {audit} (what TEXT); \
             CREATE TRIGGER traced13 BEFORE INSERT ON {t} WHEN NEW.{v} = '13' \
             BEGIN INSERT INTO {audit} VALUES ('tried 13'); SELECT RAISE(IGNORE); END",
            env.q("key")
        )),
        Dialect::Postgres => env.exec(&format!(
            "CREATE TABLE {t} ({} {key_type} NOT NULL PRIMARY KEY, {v} text NOT NULL); \
             CREATE TABLE {audit} (what text); \
             CREATE FUNCTION traced13() RETURNS trigger AS $$ BEGIN \
             IF NEW.{v} = '13' THEN INSERT INTO {audit} VALUES ('tried 13'); RETURN NULL; END IF; \
             RETURN NEW; END $$ LANGUAGE plpgsql; \
             CREATE TRIGGER traced13 BEFORE INSERT ON {t} FOR EACH ROW EXECUTE FUNCTION traced13()",
            env.q("key")
        )),
        _ => return,
    }
    let mut h: DbHashMap<String, i64> = env.builder().table("traced").open().unwrap();
    h.insert("a".into(), 1).unwrap();
    assert!(h.insert("b".into(), 13).is_err());
    assert!(h.upsert("c".into(), |_| 13).is_err());
    assert_eq!(
        env.count(&format!("SELECT count(*) FROM {audit}")),
        0,
        "the trigger's audit rows were taken back with the refused writes"
    );
    let fresh: DbHashMap<String, i64> = env.builder().table("traced").open().unwrap();
    assert_eq!(fresh, h);
}
