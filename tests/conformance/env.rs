//! One test database per test, on each backend: a temporary SQLite file, or a fresh
//! database on the PostgreSQL or MariaDB server that `WTH_POSTGRES_URL` or
//! `WTH_MYSQL_URL` points to (`scripts/test.sh` starts them). A backend whose URL is
//! missing fails its tests: it is never skipped.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdout};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use write_thru_hash::{Builder, DbHashMap, Dialect, IntoStore, SharedDbHashMap, Store};

pub(crate) trait Env {
    /// A URL for this test's own database.
    fn url(&self) -> String;
    /// The native connection, opened anew, as a store.
    fn conn(&self) -> Box<dyn Store>;
    /// Runs raw SQL on a separate connection.
    fn exec(&self, sql: &str) {
        self.try_exec(sql).unwrap_or_else(|e| panic!("{sql}: {e}"));
    }
    fn try_exec(&self, sql: &str) -> Result<(), String>;
    /// Runs a query that returns one integer.
    fn count(&self, sql: &str) -> i64 {
        self.ints(sql)
            .first()
            .copied()
            .unwrap_or_else(|| panic!("{sql}: no row"))
    }
    /// Runs a query that returns integers in its first column.
    fn ints(&self, sql: &str) -> Vec<i64>;
    fn dialect(&self) -> Dialect;

    /// Whether this run opens every map with `coherent()`.
    fn coherent(&self) -> bool {
        false
    }
    /// A builder on this test's database, through its URL.
    fn builder<K, V>(&self) -> Builder<K, V>
    where
        Self: Sized,
    {
        self.wrap_builder(DbHashMap::builder_url(&self.url()))
    }
    /// A builder on a new native connection to this test's database.
    fn builder_conn<K, V>(&self) -> Builder<K, V>
    where
        Self: Sized,
    {
        self.wrap(self.conn())
    }
    /// A builder on a connection the test made.
    fn wrap<K, V>(&self, conn: Box<dyn Store>) -> Builder<K, V>
    where
        Self: Sized,
    {
        self.wrap_builder(DbHashMap::builder(conn))
    }
    fn wrap_builder<K, V>(&self, b: Builder<K, V>) -> Builder<K, V>
    where
        Self: Sized,
    {
        if self.coherent() {
            b.coherent()
        } else {
            b
        }
    }

    /// A URL for a user who may read and write `table` but create nothing, where the
    /// backend has users.
    fn restricted_url(&self, _table: &str) -> Option<String> {
        None
    }
    /// A native connection inside a transaction its caller began, where the backend
    /// can tell.
    fn conn_in_transaction(&self) -> Option<Box<dyn Store>> {
        None
    }
    /// A native connection inside a transaction that failed, where the backend has them.
    fn conn_in_failed_transaction(&self) -> Option<Box<dyn Store>> {
        None
    }
    /// A native connection with autocommit off, where the backend has the setting.
    fn conn_autocommit_off(&self) -> Option<Box<dyn Store>> {
        None
    }
    /// A new connection on which `sql` ran first, as a user might prepare it.
    fn conn_after(&self, sql: &str) -> Box<dyn Store>;

    fn q(&self, ident: &str) -> String {
        self.dialect().quote(ident)
    }

    /// The text type a user's value column would have: on MySQL, LONGTEXT (shorter text
    /// types cut trailing spaces past their length, and are refused).
    fn text_type(&self) -> &'static str {
        match self.dialect() {
            Dialect::Mysql => "LONGTEXT",
            _ => "TEXT",
        }
    }

    fn table_exists(&self, table: &str) -> bool {
        let sql = match self.dialect() {
            Dialect::Sqlite => format!(
                "SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name = '{}'",
                table.replace('\'', "''")
            ),
            Dialect::Postgres => format!(
                "SELECT count(*) FROM information_schema.tables WHERE table_name = '{}' \
                 AND table_schema = current_schema()",
                table.replace('\'', "''")
            ),
            _ => format!(
                "SELECT count(*) FROM information_schema.tables WHERE table_name = '{}' \
                 AND table_schema = database()",
                table.replace('\'', "''").replace('\\', "\\\\")
            ),
        };
        self.count(&sql) > 0
    }

    /// Takes a lock that keeps every other writer off `table` for `hold`, on a
    /// connection of its own in another thread; returns once the lock is held.
    #[allow(dead_code)]
    fn hold_write_lock(&self, table: &str, hold: Duration) -> JoinHandle<()> {
        let _ = (table, hold);
        unimplemented!("no write lock for this backend's tests")
    }

    /// Takes the row lock of one key of `table` (a JSON text key) for `hold`, on a
    /// connection of its own in another thread; returns once the lock is held.
    #[allow(dead_code)]
    fn hold_row_lock(&self, table: &str, key: &str, hold: Duration) -> JoinHandle<()> {
        let _ = (table, key, hold);
        unimplemented!("no row lock for this backend's tests")
    }

    /// Makes the server reject any insert or update of `table` whose value column holds
    /// exactly `value`: a statement that fails part-way through a batch.
    fn reject_value(&self, table: &str, value: &str) {
        let t = self.q(table);
        let v = value.replace('\'', "''");
        let col = self.q("value");
        match self.dialect() {
            Dialect::Sqlite => {
                for (name, ev) in [("ins", "INSERT"), ("upd", "UPDATE")] {
                    self.exec(&format!(
                        "CREATE TRIGGER {} BEFORE {ev} ON {t} WHEN NEW.{col} = '{v}' \
                         BEGIN SELECT RAISE(ABORT, 'rejected by test trigger'); END",
                        self.q(&format!("{table}_{name}"))
                    ));
                }
            }
            Dialect::Postgres => {
                let f = self.q(&format!("{table}_reject"));
                self.exec(&format!(
                    "CREATE FUNCTION {f}() RETURNS trigger AS $$ BEGIN \
                     IF NEW.{col}::text = '{v}' THEN RAISE EXCEPTION 'rejected by test trigger'; \
                     END IF; RETURN NEW; END $$ LANGUAGE plpgsql"
                ));
                self.exec(&format!(
                    "CREATE TRIGGER {} BEFORE INSERT OR UPDATE ON {t} FOR EACH ROW EXECUTE FUNCTION {f}()",
                    self.q(&format!("{table}_reject"))
                ));
            }
            _ => {
                for (name, ev) in [("ins", "INSERT"), ("upd", "UPDATE")] {
                    self.exec(&format!(
                        "CREATE TRIGGER {} BEFORE {ev} ON {t} FOR EACH ROW BEGIN \
                         IF NEW.{col} = '{v}' THEN SIGNAL SQLSTATE '45000' \
                         SET MESSAGE_TEXT = 'rejected by test trigger'; END IF; END",
                        self.q(&format!("{table}_{name}"))
                    ));
                }
            }
        }
    }
}

/// An error and its sources, as an error reporter prints them.
/// Runs `take` on `conn` in a thread, returns once it did, and runs `release` `hold`
/// later.
#[allow(dead_code)]
fn held_lock<C: Send + 'static>(
    mut conn: C,
    hold: Duration,
    take: impl FnOnce(&mut C) + Send + 'static,
    release: impl FnOnce(&mut C) + Send + 'static,
) -> JoinHandle<()> {
    let (taken, wait) = std::sync::mpsc::channel();
    let thread = std::thread::spawn(move || {
        take(&mut conn);
        taken.send(()).unwrap();
        std::thread::sleep(hold);
        release(&mut conn);
    });
    wait.recv().expect("the lock was taken");
    thread
}

pub(crate) fn chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut next = e.source();
    while let Some(cause) = next {
        out.push_str(": ");
        out.push_str(&cause.to_string());
        next = cause.source();
    }
    out
}

pub(crate) struct SqliteEnv {
    _dir: tempfile::TempDir,
    path: std::path::PathBuf,
}

impl SqliteEnv {
    pub(crate) fn new() -> Self {
        let dir = tempfile::tempdir().expect("temporary directory");
        let path = dir.path().join("test.sqlite");
        SqliteEnv { _dir: dir, path }
    }

    fn raw(&self) -> rusqlite::Connection {
        rusqlite::Connection::open(&self.path).expect("open test database")
    }
}

impl Env for SqliteEnv {
    fn url(&self) -> String {
        format!("sqlite:{}", self.path.display())
    }
    fn conn(&self) -> Box<dyn Store> {
        self.raw().into_store()
    }
    fn try_exec(&self, sql: &str) -> Result<(), String> {
        self.raw().execute_batch(sql).map_err(|e| e.to_string())
    }
    fn ints(&self, sql: &str) -> Vec<i64> {
        let c = self.raw();
        let mut stmt = c.prepare(sql).unwrap_or_else(|e| panic!("{sql}: {e}"));
        let rows = stmt.query_map([], |r| r.get(0)).and_then(|r| r.collect());
        rows.unwrap_or_else(|e| panic!("{sql}: {e}"))
    }
    fn dialect(&self) -> Dialect {
        Dialect::Sqlite
    }
    fn hold_write_lock(&self, _table: &str, hold: Duration) -> JoinHandle<()> {
        held_lock(
            self.raw(),
            hold,
            |c| c.execute_batch("BEGIN IMMEDIATE").unwrap(),
            |c| c.execute_batch("COMMIT").unwrap(),
        )
    }
    fn conn_in_transaction(&self) -> Option<Box<dyn Store>> {
        let c = self.raw();
        c.execute_batch("BEGIN; CREATE TABLE IF NOT EXISTS users_own (x)")
            .unwrap();
        Some(c.into_store())
    }
    fn conn_after(&self, sql: &str) -> Box<dyn Store> {
        let c = self.raw();
        c.execute_batch(sql)
            .unwrap_or_else(|e| panic!("{sql}: {e}"));
        c.into_store()
    }
}

/// The URL of a server backend from the environment, or a failure that says how to
/// get one: a backend without its server fails, it is never skipped.
#[allow(dead_code)]
fn server_url(var: &str) -> String {
    match std::env::var(var) {
        Ok(url) if !url.is_empty() => url,
        _ => panic!(
            "{var} is not set: run `bash scripts/test.sh`, which starts the test servers, \
             or point {var} at a server you run"
        ),
    }
}

/// Polls until `f` holds, every 10 ms, for at most `limit`: what another connection,
/// a standby or a watcher does comes a moment later.
#[allow(dead_code)]
pub(crate) fn eventually(what: &str, limit: Duration, mut f: impl FnMut() -> bool) {
    let start = Instant::now();
    while !f() {
        assert!(start.elapsed() < limit, "{what}: not within {limit:?}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A unique database name for one test.
#[allow(dead_code)]
fn unique_db() -> String {
    use std::sync::atomic::{AtomicUsize, Ordering};
    static N: AtomicUsize = AtomicUsize::new(0);
    format!(
        "wth_{}_{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// `url` with its database (path) replaced by `db`.
#[allow(dead_code)]
fn with_db(url: &str, db: &str) -> String {
    let (scheme, rest) = url.split_once("://").expect("URL with ://");
    let (authority, query) = match rest.split_once('/') {
        Some((a, path)) => (
            a,
            path.split_once('?')
                .map(|(_, q)| format!("?{q}"))
                .unwrap_or_default(),
        ),
        None => (rest, String::new()),
    };
    format!("{scheme}://{authority}/{db}{query}")
}

#[cfg(feature = "postgres")]
pub(crate) use pg::PgEnv;
#[cfg(feature = "postgres")]
mod pg {
    use super::*;

    pub(crate) struct PgEnv {
        admin: String,
        url: String,
        db: String,
    }

    impl PgEnv {
        pub(crate) fn new() -> Self {
            Self::at("WTH_POSTGRES_URL")
        }

        /// Through pgbouncer in transaction pooling (`scripts/pg_ha.sh`), where no
        /// session state lasts from one transaction to the next.
        pub(crate) fn pgbouncer() -> Self {
            Self::at("WTH_PGBOUNCER_URL")
        }

        fn at(var: &str) -> Self {
            let admin = server_url(var);
            let db = unique_db();
            let mut c = postgres::Client::connect(&admin, postgres::NoTls)
                .unwrap_or_else(|e| panic!("PostgreSQL at {var} is not reachable: {e}"));
            c.batch_execute(&format!("CREATE DATABASE {db}"))
                .expect("create test database");
            PgEnv {
                url: with_db(&admin, &db),
                admin,
                db,
            }
        }

        fn raw(&self) -> postgres::Client {
            postgres::Client::connect(&self.url, postgres::NoTls).expect("connect to test database")
        }
    }

    impl Drop for PgEnv {
        fn drop(&mut self) {
            if let Ok(mut c) = postgres::Client::connect(&self.admin, postgres::NoTls) {
                let _ =
                    c.batch_execute(&format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.db));
                let _ = c.batch_execute(&format!("DROP ROLE IF EXISTS {}_dml", self.db));
            }
        }
    }

    impl Env for PgEnv {
        fn url(&self) -> String {
            self.url.clone()
        }
        fn conn(&self) -> Box<dyn Store> {
            self.raw().into_store()
        }
        fn try_exec(&self, sql: &str) -> Result<(), String> {
            self.raw().batch_execute(sql).map_err(|e| e.to_string())
        }
        fn ints(&self, sql: &str) -> Vec<i64> {
            // Sent whole (not prepared), as behind a pooler it must be.
            let rows = self
                .raw()
                .query_typed(sql, &[])
                .unwrap_or_else(|e| panic!("{sql}: {e}"));
            rows.iter()
                .map(|r| {
                    r.try_get::<_, i64>(0)
                        .unwrap_or_else(|_| i64::from(r.get::<_, i32>(0)))
                })
                .collect()
        }
        fn dialect(&self) -> Dialect {
            Dialect::Postgres
        }
        fn hold_write_lock(&self, table: &str, hold: Duration) -> JoinHandle<()> {
            let lock = format!("BEGIN; LOCK TABLE {} IN EXCLUSIVE MODE", self.q(table));
            held_lock(
                self.raw(),
                hold,
                move |c| c.batch_execute(&lock).unwrap(),
                |c| c.batch_execute("COMMIT").unwrap(),
            )
        }
        fn hold_row_lock(&self, table: &str, key: &str, hold: Duration) -> JoinHandle<()> {
            let lock = format!(
                "BEGIN; SELECT 1 FROM {} WHERE key = '\"{key}\"' FOR UPDATE",
                self.q(table)
            );
            held_lock(
                self.raw(),
                hold,
                move |c| c.batch_execute(&lock).unwrap(),
                |c| c.batch_execute("COMMIT").unwrap(),
            )
        }
        fn restricted_url(&self, table: &str) -> Option<String> {
            let role = format!("{}_dml", self.db);
            self.exec(&format!(
                "CREATE ROLE {role} LOGIN PASSWORD 'dml/pw?x'; \
                 REVOKE CREATE ON SCHEMA public FROM PUBLIC; \
                 GRANT SELECT, INSERT, UPDATE, DELETE ON {} TO {role}",
                self.q(table)
            ));
            let (_, rest) = self.url.split_once('@').unwrap();
            Some(format!("postgres://{role}:dml%2Fpw%3Fx@{rest}"))
        }
        fn conn_in_transaction(&self) -> Option<Box<dyn Store>> {
            let mut c = self.raw();
            c.batch_execute("BEGIN; SELECT 1").unwrap();
            Some(c.into_store())
        }
        fn conn_after(&self, sql: &str) -> Box<dyn Store> {
            let mut c = self.raw();
            c.batch_execute(sql)
                .unwrap_or_else(|e| panic!("{sql}: {e}"));
            c.into_store()
        }
        fn conn_in_failed_transaction(&self) -> Option<Box<dyn Store>> {
            let mut c = self.raw();
            c.batch_execute("BEGIN").unwrap();
            assert!(c.batch_execute("SELECT 1/0").is_err());
            Some(c.into_store())
        }
    }
}

#[cfg(feature = "mysql")]
pub(crate) use my::MyEnv;
#[cfg(feature = "mysql")]
mod my {
    use super::*;
    use mysql::prelude::Queryable;

    pub(crate) struct MyEnv {
        admin: String,
        url: String,
        db: String,
    }

    impl MyEnv {
        pub(crate) fn new() -> Self {
            let admin = server_url("WTH_MYSQL_URL");
            let db = unique_db();
            let mut c = mysql::Conn::new(mysql::Opts::from_url(&admin).expect("MySQL URL"))
                .unwrap_or_else(|e| panic!("MariaDB at WTH_MYSQL_URL is not reachable: {e}"));
            c.query_drop(format!("CREATE DATABASE {db}"))
                .expect("create test database");
            MyEnv {
                url: with_db(&admin, &db),
                admin,
                db,
            }
        }

        fn raw(&self) -> mysql::Conn {
            mysql::Conn::new(mysql::Opts::from_url(&self.url).expect("URL")).expect("connect")
        }
    }

    impl Drop for MyEnv {
        fn drop(&mut self) {
            if let Ok(opts) = mysql::Opts::from_url(&self.admin) {
                if let Ok(mut c) = mysql::Conn::new(opts) {
                    let _ = c.query_drop(format!("DROP DATABASE IF EXISTS {}", self.db));
                    let _ = c.query_drop(format!("DROP USER IF EXISTS '{}_dml'@'%'", self.db));
                }
            }
        }
    }

    impl Env for MyEnv {
        fn url(&self) -> String {
            self.url.clone()
        }
        fn conn(&self) -> Box<dyn Store> {
            self.raw().into_store()
        }
        fn try_exec(&self, sql: &str) -> Result<(), String> {
            self.raw().query_drop(sql).map_err(|e| e.to_string())
        }
        fn ints(&self, sql: &str) -> Vec<i64> {
            self.raw()
                .query::<i64, _>(sql)
                .unwrap_or_else(|e| panic!("{sql}: {e}"))
        }
        fn dialect(&self) -> Dialect {
            Dialect::Mysql
        }
        fn hold_write_lock(&self, table: &str, hold: Duration) -> JoinHandle<()> {
            let lock = format!("LOCK TABLES {} WRITE", self.q(table));
            held_lock(
                self.raw(),
                hold,
                move |c| c.query_drop(&lock).unwrap(),
                |c| c.query_drop("UNLOCK TABLES").unwrap(),
            )
        }
        fn hold_row_lock(&self, table: &str, key: &str, hold: Duration) -> JoinHandle<()> {
            let lock = format!(
                "SELECT 1 FROM {} WHERE `key` = '\"{key}\"' FOR UPDATE",
                self.q(table)
            );
            held_lock(
                self.raw(),
                hold,
                move |c| {
                    c.query_drop("START TRANSACTION").unwrap();
                    c.query_drop(&lock).unwrap();
                },
                |c| c.query_drop("COMMIT").unwrap(),
            )
        }
        fn restricted_url(&self, table: &str) -> Option<String> {
            let user = format!("{}_dml", self.db);
            self.exec(&format!(
                "CREATE USER '{user}'@'%' IDENTIFIED BY 'dml/pw?x'"
            ));
            self.exec(&format!(
                "GRANT SELECT, INSERT, UPDATE, DELETE ON {}.{} TO '{user}'@'%'",
                self.db,
                self.q(table)
            ));
            let (_, rest) = self.url.split_once('@').unwrap();
            Some(format!("mysql://{user}:dml%2Fpw%3Fx@{rest}"))
        }
        fn conn_in_transaction(&self) -> Option<Box<dyn Store>> {
            let mut c = self.raw();
            c.query_drop("START TRANSACTION").unwrap();
            c.query_drop("SELECT count(*) FROM information_schema.tables")
                .unwrap();
            Some(c.into_store())
        }
        fn conn_after(&self, sql: &str) -> Box<dyn Store> {
            let mut c = self.raw();
            c.query_drop(sql).unwrap_or_else(|e| panic!("{sql}: {e}"));
            c.into_store()
        }
        fn conn_autocommit_off(&self) -> Option<Box<dyn Store>> {
            let opts = mysql::OptsBuilder::from_opts(mysql::Opts::from_url(&self.url).unwrap())
                .init(vec!["SET autocommit = 0"]);
            Some(mysql::Conn::new(opts).expect("connect").into_store())
        }
    }
}

#[cfg(feature = "odbc")]
pub(crate) use odbc::OdbcEnv;
#[cfg(feature = "odbc")]
mod odbc {
    use super::*;
    use odbc_api::{ConnectionOptions, Cursor};

    /// A test database behind an ODBC driver: a new database on the PostgreSQL or
    /// MariaDB server, or a new SQLite file. Raw statements go through ODBC too.
    pub(crate) struct OdbcEnv {
        conn_string: String,
        dialect: Dialect,
        admin: Option<String>,
        db: String,
        _dir: Option<tempfile::TempDir>,
    }

    fn connect(cs: &str) -> odbc_api::Connection<'static> {
        odbc_api::environment()
            .expect("ODBC environment")
            .connect_with_connection_string(cs, ConnectionOptions::default())
            .unwrap_or_else(|e| panic!("ODBC connection {cs:?}: {e}"))
    }

    /// `cs` with its `Database=…` replaced by `db`.
    fn with_database(cs: &str, db: &str) -> String {
        cs.split(';')
            .map(|part| match part.split_once('=') {
                Some((k, _)) if k.trim().eq_ignore_ascii_case("database") => format!("{k}={db}"),
                _ => part.to_string(),
            })
            .collect::<Vec<_>>()
            .join(";")
    }

    impl OdbcEnv {
        fn server(var: &str, dialect: Dialect) -> Self {
            let admin = server_url(var);
            let db = unique_db();
            connect(&admin)
                .execute(&format!("CREATE DATABASE {db}"), (), None)
                .unwrap_or_else(|e| panic!("create test database over ODBC: {e}"));
            OdbcEnv {
                conn_string: with_database(&admin, &db),
                dialect,
                admin: Some(admin),
                db,
                _dir: None,
            }
        }

        pub(crate) fn postgres() -> Self {
            Self::server("WTH_ODBC_POSTGRES", Dialect::Postgres)
        }

        pub(crate) fn mysql() -> Self {
            Self::server("WTH_ODBC_MYSQL", Dialect::Mysql)
        }

        pub(crate) fn sqlite() -> Self {
            let base = server_url("WTH_ODBC_SQLITE");
            let dir = tempfile::tempdir().expect("temporary directory");
            let path = dir.path().join("test.sqlite");
            let cs = format!(
                "{};Database={};",
                base.trim_end_matches(';'),
                path.display()
            );
            OdbcEnv {
                conn_string: cs,
                dialect: Dialect::Sqlite,
                admin: None,
                db: String::new(),
                _dir: Some(dir),
            }
        }
    }

    impl Drop for OdbcEnv {
        fn drop(&mut self) {
            if let Some(admin) = &self.admin {
                let sql = match self.dialect {
                    Dialect::Postgres => {
                        format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.db)
                    }
                    _ => format!("DROP DATABASE IF EXISTS {}", self.db),
                };
                if let Ok(env) = odbc_api::environment() {
                    if let Ok(c) =
                        env.connect_with_connection_string(admin, ConnectionOptions::default())
                    {
                        let _ = c.execute(&sql, (), None);
                    }
                }
            }
        }
    }

    impl Env for OdbcEnv {
        fn url(&self) -> String {
            format!("odbc:{}", self.conn_string)
        }
        fn conn(&self) -> Box<dyn Store> {
            connect(&self.conn_string).into_store()
        }
        fn try_exec(&self, sql: &str) -> Result<(), String> {
            connect(&self.conn_string)
                .execute(sql, (), None)
                .map(drop)
                .map_err(|e| e.to_string())
        }
        fn ints(&self, sql: &str) -> Vec<i64> {
            let conn = connect(&self.conn_string);
            let mut out = Vec::new();
            if let Some(mut cursor) = conn
                .execute(sql, (), None)
                .unwrap_or_else(|e| panic!("{sql}: {e}"))
            {
                let mut buf = Vec::new();
                while let Some(mut row) = cursor.next_row().unwrap() {
                    row.get_text(1, &mut buf).unwrap();
                    let text = String::from_utf8_lossy(&buf);
                    out.push(
                        text.trim()
                            .parse()
                            .unwrap_or_else(|e| panic!("{sql}: {text:?}: {e}")),
                    );
                }
            }
            out
        }
        fn dialect(&self) -> Dialect {
            self.dialect
        }
        fn conn_in_transaction(&self) -> Option<Box<dyn Store>> {
            // MariaDB says so (@@in_transaction); the others' drivers keep it to
            // themselves.
            (self.dialect == Dialect::Mysql).then(|| {
                let c = connect(&self.conn_string);
                c.set_autocommit(false).unwrap();
                // A read of an InnoDB table opens the transaction.
                c.execute("SELECT count(*) FROM mysql.innodb_table_stats", (), None)
                    .unwrap();
                c.into_store()
            })
        }
        fn conn_autocommit_off(&self) -> Option<Box<dyn Store>> {
            let c = connect(&self.conn_string);
            c.set_autocommit(false).unwrap();
            Some(c.into_store())
        }
        fn conn_after(&self, sql: &str) -> Box<dyn Store> {
            let c = connect(&self.conn_string);
            c.execute(sql, (), None)
                .unwrap_or_else(|e| panic!("{sql}: {e}"));
            c.into_store()
        }
    }
}

/// The same database, every map opened with `coherent()`: the whole conformance suite
/// holds in coherent mode too.
pub(crate) struct Coherent<E>(pub(crate) E);

impl<E: Env> Env for Coherent<E> {
    fn url(&self) -> String {
        self.0.url()
    }
    fn conn(&self) -> Box<dyn Store> {
        self.0.conn()
    }
    fn try_exec(&self, sql: &str) -> Result<(), String> {
        self.0.try_exec(sql)
    }
    fn ints(&self, sql: &str) -> Vec<i64> {
        self.0.ints(sql)
    }
    fn dialect(&self) -> Dialect {
        self.0.dialect()
    }
    fn coherent(&self) -> bool {
        true
    }
    fn restricted_url(&self, table: &str) -> Option<String> {
        self.0.restricted_url(table)
    }
    fn conn_in_transaction(&self) -> Option<Box<dyn Store>> {
        self.0.conn_in_transaction()
    }
    fn conn_in_failed_transaction(&self) -> Option<Box<dyn Store>> {
        self.0.conn_in_failed_transaction()
    }
    fn conn_autocommit_off(&self) -> Option<Box<dyn Store>> {
        self.0.conn_autocommit_off()
    }
    fn conn_after(&self, sql: &str) -> Box<dyn Store> {
        self.0.conn_after(sql)
    }
}

/// The crash harness's worker (`examples/crash_worker`), which `cargo test` builds.
#[allow(dead_code)]
pub(crate) fn worker_bin() -> std::path::PathBuf {
    example_bin("crash_worker")
}

/// An example's binary, which `cargo test` builds beside the test binaries.
#[allow(dead_code)]
pub(crate) fn example_bin(name: &str) -> std::path::PathBuf {
    let exe = std::env::current_exe().unwrap();
    let bin = exe
        .parent()
        .unwrap()
        .parent()
        .unwrap()
        .join("examples")
        .join(name);
    assert!(
        bin.exists(),
        "{} is missing: cargo test builds it",
        bin.display()
    );
    bin
}

/// Reads each worker's output (`examples/crash_worker`, coherent mode) until it says
/// `done`.
#[allow(dead_code)]
pub(crate) fn wait_for_done(outputs: &mut [BufReader<ChildStdout>]) {
    for out in outputs {
        let mut line = String::new();
        loop {
            line.clear();
            assert!(
                out.read_line(&mut line).unwrap() > 0,
                "a worker stopped early"
            );
            if line.trim() == "done" {
                break;
            }
        }
    }
}

/// Tells a worker that said `done` to refresh, and reads its map and how many writes
/// it retried after a conflict; it must then exit cleanly.
#[allow(dead_code)]
pub(crate) fn final_map(
    worker: &mut Child,
    out: &mut BufReader<ChildStdout>,
) -> (HashMap<String, i64>, u64) {
    writeln!(worker.stdin.take().unwrap(), "go").unwrap();
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    let map = serde_json::from_str(line.trim()).unwrap_or_else(|e| panic!("{e}: {line:?}"));
    line.clear();
    out.read_line(&mut line).unwrap();
    let conflicts = line
        .trim()
        .strip_prefix("conflicts ")
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no conflict count: {line:?}"));
    assert!(worker.wait().unwrap().success());
    (map, conflicts)
}

/// `watch()`: `writer` commits 20 changes (every fifth removes the key written just
/// before), and each must reach `watched`, in memory and through its subscription,
/// within 10 s. Returns how long each took, in order.
#[allow(dead_code)]
pub(crate) fn changes_reach(
    writer: &mut DbHashMap<String, i64>,
    watched: &SharedDbHashMap<String, i64>,
) -> Vec<Duration> {
    let changes = watched.subscribe();
    let mut delays = Vec::new();
    for i in 0..20 {
        let key = format!("k{}", if i % 5 == 4 { i - 1 } else { i } % 7);
        let t = Instant::now();
        if i % 5 == 4 {
            writer.remove(&key).unwrap();
        } else {
            writer.insert(key.clone(), i).unwrap();
        }
        loop {
            let event = changes
                .recv_timeout(Duration::from_secs(10))
                .expect("the change arrives within 10 s");
            let write_thru_hash::Event::Changed(keys) = event else {
                continue;
            };
            if keys.contains(&key) && watched.get(&key) == writer.get(&key).copied() {
                break;
            }
        }
        delays.push(t.elapsed());
    }
    assert_eq!(watched.to_hash_map(), **writer);
    delays
}

/// `median …, max …` of some delays.
#[allow(dead_code)]
pub(crate) fn spread(delays: &[Duration]) -> String {
    let mut sorted = delays.to_vec();
    sorted.sort();
    format!(
        "median {:?}, max {:?}",
        sorted[sorted.len() / 2],
        sorted.last().unwrap()
    )
}
