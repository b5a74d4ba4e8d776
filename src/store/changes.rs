//! The SQL of coherence, for every dialect: a change log beside the table, kept by
//! triggers, so that every writer (a map, or plain SQL from any client) is seen.
//!
//! Beside table `t` live `t__wth_log` (one row per key changed: the key and the version
//! of its last change, indexed by version) and `t__wth_clock` (one row: the last
//! version handed out, and the compaction horizon). Triggers on `t` write a log row for
//! every key inserted, updated or deleted, with a version that follows commit order:
//!
//! - SQLite: the log's `AUTOINCREMENT` key. SQLite has one writer at a time, so row ids
//!   are handed out in commit order (and never reused).
//! - PostgreSQL: no counter at all. A log row holds the id of the transaction that
//!   last changed its key (`txid_current()`), and a reader's position is a snapshot
//!   (`txid_current_snapshot()`): the changes since are those whose transactions the
//!   old snapshot did not show committed (as PgQ reads its queues). Writers take no
//!   lock beyond their own keys' rows, so writers on different keys never wait on each
//!   other, and other programs' `REPEATABLE READ` transactions never fail on the log.
//! - MySQL/MariaDB: no lock either. The triggers only append a row (key, no version)
//!   to the log; an append takes no lock another writer waits for. A *sequencer* (a
//!   map's writer now and then, a refresh that read many) gives committed rows their
//!   versions later, above the clock's count, under the clock row's lock, which only
//!   sequencers take. A reader reads the rows above its version *and* every row not
//!   sequenced yet, in one snapshot: whatever committed before it is one or the other,
//!   and a row sequenced after it gets a version above the count it read. Sequencing
//!   only keeps the unsequenced rows few; no reader depends on it, so a read-only
//!   session refreshes too.
//!
//! Every change of a key takes one version, so "the last N versions" is "the last N
//! changes", which bounds the log (PostgreSQL: the last N keys changed).
//!
//! A reader asks for log rows above the version it has seen, joined with the table's
//! current rows, in one statement: one snapshot, so it sees every transaction whole or
//! not at all. Sequences and clocks are not used: they are not in commit order.

use crate::codec::Format;
use crate::error::{Action, Error, Result};
use crate::store::dialect::Marks;
use crate::store::support::{db_error, Catalog, Field};
use crate::store::{ChangeSink, Dialect, TableSpec};

/// The coherence methods of a [`Store`](crate::Store) whose connection is the field
/// `$conn` (a [`Catalog`]), for dialect `$d`: written once for the native stores.
#[cfg(any(feature = "sqlite", feature = "postgres", feature = "mysql"))]
macro_rules! coherence_methods {
    ($conn:ident, $d:expr) => {
        fn enable_changes(&mut self) -> Result<()> {
            let t = opened(&self.table, $d.name())?.clone();
            let made = self.made_table;
            let c = Coherence::enable(&mut self.$conn, &t, $d, Marks::Native, $d.name(), made)?;
            self.coherence = Some(c);
            Ok(())
        }

        fn version(&mut self) -> Result<u64> {
            let c = self
                .coherence
                .as_ref()
                .ok_or_else(|| not_enabled(&self.table))?;
            c.version(&mut self.$conn)
        }

        fn changes(&mut self, since: u64, sink: &mut ChangeSink<'_>) -> Result<Option<u64>> {
            let c = self
                .coherence
                .as_ref()
                .ok_or_else(|| not_enabled(&self.table))?;
            c.changes(&mut self.$conn, since, sink)
        }

        fn compact(&mut self, keep: u64) -> Result<()> {
            let c = self
                .coherence
                .as_ref()
                .ok_or_else(|| not_enabled(&self.table))?;
            c.compact(&mut self.$conn, keep)
        }
    };
}
#[cfg(any(feature = "sqlite", feature = "postgres", feature = "mysql"))]
pub(crate) use coherence_methods;

/// The names of what coherence adds beside a table.
#[derive(Debug)]
pub(crate) struct Names {
    pub(crate) log: String,
    pub(crate) clock: String,
    /// The triggers: one per event (and PostgreSQL's for TRUNCATE).
    pub(crate) triggers: Vec<String>,
    pub(crate) function: String,
    /// MySQL: the table whose one row lets one connection at a time install the
    /// triggers (Galera runs DDL in total order, and two nodes creating one trigger at
    /// once wedge the cluster).
    pub(crate) setup_lock: String,
    /// PostgreSQL: the trigger by which earlier releases made every writer take the
    /// clock's lock first; an open that finds it upgrades the table (see
    /// `coherence_setup`).
    pub(crate) old_lock: String,
}

impl Names {
    pub(crate) fn of(d: Dialect, t: &TableSpec) -> Result<Names> {
        let name = |suffix: &str| format!("{}__wth_{suffix}", t.name);
        let mut triggers = vec![name("ins"), name("upd"), name("del")];
        if d == Dialect::Postgres {
            triggers.push(name("truncate"));
        }
        let names = Names {
            log: name("log"),
            clock: name("clock"),
            triggers,
            function: name("note"),
            setup_lock: name("setup"),
            old_lock: name("lock"),
        };
        let lock = (d == Dialect::Mysql).then_some(&names.setup_lock);
        for n in [&names.log, &names.clock]
            .into_iter()
            .chain(lock)
            .chain(&names.triggers)
        {
            d.check_table_name(n).map_err(|_| Error::InvalidTableName {
                name: t.name.clone(),
                backend: d.name(),
                reason: format!(
                    "coherence adds a table or trigger named {n:?} beside it, which {} cannot \
                     hold; use a shorter name",
                    d.name()
                ),
            })?;
        }
        Ok(names)
    }
}

impl Dialect {
    /// The one parameter, a version bound as text, as a number.
    fn bigint_param(self, marks: Marks) -> String {
        match self {
            // A bare `CAST($1 AS BIGINT)` would make the parameter a bigint.
            Dialect::Postgres => format!("CAST(CAST({} AS TEXT) AS BIGINT)", self.mark(marks, 1)),
            _ => self.mark(marks, 1),
        }
    }

    fn log_key_type(self, format: Format) -> &'static str {
        match (self, format) {
            (Dialect::Sqlite, Format::Text) => "TEXT",
            (Dialect::Sqlite, Format::Binary) => "BLOB",
            // The database's default collation (deterministic: equal means the same
            // bytes), which gives way to the table's in a comparison.
            (Dialect::Postgres, Format::Text) => "TEXT",
            (Dialect::Postgres, Format::Binary) => "BYTEA",
            (Dialect::Mysql, _) => "VARBINARY(3072)",
        }
    }

    /// The statements that install coherence on `t`: the log, the clock and the
    /// triggers. Each may run again on an installed table and change nothing.
    pub(crate) fn coherence_setup(self, t: &TableSpec, n: &Names) -> Vec<String> {
        let q = |s: &str| self.quote(s);
        let (table, log, clock, key) = (q(&t.name), q(&n.log), q(&n.clock), q("key"));
        let key_type = self.log_key_type(t.key_format);
        match self {
            Dialect::Sqlite => {
                // Not INSERT OR REPLACE: a user's `INSERT OR IGNORE` into the table would
                // turn it into OR IGNORE, and the key's change would not be noted.
                let note = |k: &str| {
                    format!(
                        "DELETE FROM {log} WHERE {key} = {k}; INSERT INTO {log} ({key}) VALUES ({k});"
                    )
                };
                vec![
                    format!(
                        "CREATE TABLE IF NOT EXISTS {log} (v INTEGER PRIMARY KEY AUTOINCREMENT, \
                         {key} {key_type} NOT NULL UNIQUE)"
                    ),
                    format!(
                        "CREATE TABLE IF NOT EXISTS {clock} (id INTEGER PRIMARY KEY CHECK (id = 1), \
                         v INTEGER NOT NULL, horizon INTEGER NOT NULL)"
                    ),
                    format!("INSERT OR IGNORE INTO {clock} (id, v, horizon) VALUES (1, 0, 0)"),
                    format!(
                        "CREATE TRIGGER IF NOT EXISTS {} AFTER INSERT ON {table} BEGIN {} END",
                        q(&n.triggers[0]),
                        note(&format!("NEW.{key}"))
                    ),
                    // The old key is noted too, when an UPDATE changed it.
                    format!(
                        "CREATE TRIGGER IF NOT EXISTS {} AFTER UPDATE ON {table} BEGIN \
                         DELETE FROM {log} WHERE {key} = OLD.{key}; \
                         INSERT INTO {log} ({key}) SELECT OLD.{key} \
                         WHERE OLD.{key} IS NOT NEW.{key} COLLATE BINARY; {} END",
                        q(&n.triggers[1]),
                        note(&format!("NEW.{key}"))
                    ),
                    format!(
                        "CREATE TRIGGER IF NOT EXISTS {} AFTER DELETE ON {table} BEGIN {} END",
                        q(&n.triggers[2]),
                        note(&format!("OLD.{key}"))
                    ),
                ]
            }
            Dialect::Postgres => {
                let function = q(&n.function);
                // Statement triggers with transition tables: each key changed is noted
                // with the id of its transaction, which takes no lock but the log row of
                // a key whose table row the transaction holds already.
                let note = |keys: &str| {
                    format!(
                        "INSERT INTO {log} ({key}, v) SELECT k.{key}, txid_current() \
                         FROM ({keys}) AS k ON CONFLICT ({key}) DO UPDATE SET v = excluded.v;"
                    )
                };
                let statements = [
                    format!(
                        "CREATE TABLE IF NOT EXISTS {log} ({key} {key_type} PRIMARY KEY, \
                         v BIGINT NOT NULL)"
                    ),
                    format!(
                        "CREATE INDEX IF NOT EXISTS {} ON {log} (v)",
                        q(&format!("{}_v", n.log))
                    ),
                    // `xhorizon`: changes of transactions below it may be compacted away;
                    // `truncated`: the last transaction that truncated the table. `v`
                    // and `horizon` are what earlier releases counted with: an upgrade
                    // moves `horizon` past `v`, so that their maps, which would no
                    // longer see changes, reload on every refresh instead.
                    format!(
                        "CREATE TABLE IF NOT EXISTS {clock} (id INT PRIMARY KEY CHECK (id = 1), \
                         v BIGINT NOT NULL, horizon BIGINT NOT NULL)"
                    ),
                    format!(
                        "ALTER TABLE {clock} ADD COLUMN IF NOT EXISTS xhorizon BIGINT NOT NULL \
                         DEFAULT 0, ADD COLUMN IF NOT EXISTS truncated BIGINT NOT NULL DEFAULT 0"
                    ),
                    format!(
                        "INSERT INTO {clock} (id, v, horizon) VALUES (1, 0, 0) \
                         ON CONFLICT (id) DO NOTHING"
                    ),
                    format!("UPDATE {clock} SET horizon = v + 1 WHERE id = 1 AND horizon <= v"),
                    format!("DROP TRIGGER IF EXISTS {} ON {table}", q(&n.old_lock)),
                    dollar_quoted(
                        &format!(
                            "CREATE OR REPLACE FUNCTION {function}() RETURNS trigger \
                             LANGUAGE plpgsql SECURITY DEFINER SET search_path FROM CURRENT AS"
                        ),
                        &format!(
                            "BEGIN \
                         IF TG_OP = 'TRUNCATE' THEN \
                         UPDATE {clock} SET truncated = txid_current() WHERE id = 1; \
                         DELETE FROM {log}; \
                         ELSIF TG_OP = 'INSERT' THEN {} \
                         ELSIF TG_OP = 'UPDATE' THEN {} \
                         ELSE {} END IF; \
                         PERFORM pg_notify('wth_' || md5(TG_TABLE_NAME::text), ''); \
                         RETURN NULL; END",
                            note(&format!("SELECT {key} FROM wth_new")),
                            note(&format!(
                                "SELECT {key} FROM wth_old UNION SELECT {key} FROM wth_new"
                            )),
                            note(&format!("SELECT {key} FROM wth_old")),
                        ),
                    ),
                    format!(
                        "CREATE OR REPLACE TRIGGER {} AFTER INSERT ON {table} \
                         REFERENCING NEW TABLE AS wth_new \
                         FOR EACH STATEMENT EXECUTE FUNCTION {function}()",
                        q(&n.triggers[0])
                    ),
                    format!(
                        "CREATE OR REPLACE TRIGGER {} AFTER UPDATE ON {table} \
                         REFERENCING OLD TABLE AS wth_old NEW TABLE AS wth_new \
                         FOR EACH STATEMENT EXECUTE FUNCTION {function}()",
                        q(&n.triggers[1])
                    ),
                    format!(
                        "CREATE OR REPLACE TRIGGER {} AFTER DELETE ON {table} \
                         REFERENCING OLD TABLE AS wth_old \
                         FOR EACH STATEMENT EXECUTE FUNCTION {function}()",
                        q(&n.triggers[2])
                    ),
                    // TRUNCATE fires no row triggers: every map whose snapshot did not
                    // show it reloads in full.
                    format!(
                        "CREATE OR REPLACE TRIGGER {} AFTER TRUNCATE ON {table} \
                         FOR EACH STATEMENT EXECUTE FUNCTION {function}()",
                        q(&n.triggers[3])
                    ),
                ];
                // Fire in every session, those of replicas and restores
                // (`session_replication_role = replica`) included.
                let statements: Vec<String> = statements
                    .into_iter()
                    .chain(n.triggers.iter().map(|name| {
                        format!("ALTER TABLE {table} ENABLE ALWAYS TRIGGER {}", q(name))
                    }))
                    .collect();
                // One batch is one transaction; the lock keeps two maps that install at
                // once from tripping over each other's half-made objects.
                vec![format!(
                    "SELECT pg_advisory_xact_lock(hashtext('wth {}')); {}",
                    t.name.replace('\'', "''"),
                    statements.join("; ")
                )]
            }
            Dialect::Mysql => {
                // An append: the log's key is its own counter, so two writers never
                // write one row (nor, on Galera, one certification key).
                let note = |k: &str| format!("INSERT INTO {log} ({key}) VALUES ({k});");
                vec![
                    format!(
                        "CREATE TABLE IF NOT EXISTS {log} (id BIGINT NOT NULL AUTO_INCREMENT \
                         PRIMARY KEY, {key} {key_type} NOT NULL, v BIGINT NULL, INDEX (v)) \
                         ENGINE=InnoDB"
                    ),
                    // `seq`: the last version a sequencer gave; `qhorizon`: versions up to
                    // it may be compacted away. `v` and `horizon` are what earlier releases
                    // counted with (see `MYSQL_UPGRADE`).
                    format!(
                        "CREATE TABLE IF NOT EXISTS {clock} (id INT PRIMARY KEY, \
                         v BIGINT NOT NULL, horizon BIGINT NOT NULL, \
                         seq BIGINT NOT NULL DEFAULT 0, qhorizon BIGINT NOT NULL DEFAULT 0) \
                         ENGINE=InnoDB"
                    ),
                    format!(
                        "ALTER TABLE {clock} ADD COLUMN IF NOT EXISTS seq BIGINT NOT NULL \
                         DEFAULT 0, ADD COLUMN IF NOT EXISTS qhorizon BIGINT NOT NULL DEFAULT 0"
                    ),
                    format!("INSERT IGNORE INTO {clock} (id, v, horizon) VALUES (1, 0, 0)"),
                    format!(
                        "CREATE OR REPLACE TRIGGER {} AFTER INSERT ON {table} FOR EACH ROW {}",
                        q(&n.triggers[0]),
                        note(&format!("NEW.{key}"))
                    ),
                    // The old key too, when an UPDATE changed it.
                    format!(
                        "CREATE OR REPLACE TRIGGER {} AFTER UPDATE ON {table} FOR EACH ROW \
                         BEGIN IF BINARY OLD.{key} <> BINARY NEW.{key} THEN {} END IF; {} END",
                        q(&n.triggers[1]),
                        note(&format!("OLD.{key}")),
                        note(&format!("NEW.{key}"))
                    ),
                    format!(
                        "CREATE OR REPLACE TRIGGER {} AFTER DELETE ON {table} FOR EACH ROW {}",
                        q(&n.triggers[2]),
                        note(&format!("OLD.{key}"))
                    ),
                ]
            }
        }
    }

    /// How many of coherence's triggers exist on the table (one text column); all of
    /// them means coherence is installed, and nothing needs creating.
    pub(crate) fn coherence_installed_query(self, t: &TableSpec, n: &Names) -> String {
        let names: Vec<String> = n
            .triggers
            .iter()
            .map(|name| format!("'{}'", name.replace('\'', "''")))
            .collect();
        let names = names.join(", ");
        match self {
            Dialect::Sqlite => format!(
                "SELECT CAST(count(*) AS TEXT) FROM sqlite_master \
                 WHERE type = 'trigger' AND name IN ({names})"
            ),
            // A table that an earlier release made coherent counts one short, so that
            // the open upgrades it.
            Dialect::Postgres => format!(
                "SELECT (count(*) FILTER (WHERE tgname IN ({names})) \
                 - count(*) FILTER (WHERE tgname = '{}'))::text FROM pg_trigger \
                 WHERE tgrelid = to_regclass('{}')",
                n.old_lock.replace('\'', "''"),
                self.quote(&t.name).replace('\'', "''")
            ),
            // A log of an earlier release (one row per key, no `id`) counts one short,
            // so that the open upgrades it.
            Dialect::Mysql => {
                let log = n.log.replace('\\', "\\\\").replace('\'', "''");
                let column = |c: &str| {
                    format!(
                        "EXISTS (SELECT 1 FROM information_schema.columns WHERE \
                         table_schema = database() AND table_name = '{log}' AND column_name = '{c}')"
                    )
                };
                format!(
                    "SELECT CAST((SELECT count(*) FROM information_schema.triggers \
                     WHERE trigger_schema = database() AND trigger_name IN ({})) \
                     - ({} AND NOT {}) AS CHAR)",
                    names.replace('\\', "\\\\"),
                    column("v"),
                    column("id")
                )
            }
        }
    }

    /// MySQL: the keys changed since the count `since` (their rows above it, and every
    /// row not sequenced yet, once per key), with the table's value; and first a row
    /// of the clock read in the same snapshot: the horizon, the count, and how many rows
    /// are not sequenced.
    fn mysql_changes_query(self, t: &TableSpec, n: &Names, since: u64) -> String {
        let q = |s: &str| self.quote(s);
        let (table, log, clock, key, value) =
            (q(&t.name), q(&n.log), q(&n.clock), q("key"), q("value"));
        let slice = self
            .log_slice_condition(t)
            .map_or_else(String::new, |c| format!(" AND {c}"));
        format!(
            "SELECT CAST(c.qhorizon AS CHAR), CAST(c.seq AS CHAR), \
             CAST((SELECT count(*) FROM {log} l WHERE l.v IS NULL) AS CHAR), NULL, NULL, NULL \
             FROM {clock} c WHERE c.id = 1 \
             UNION ALL \
             SELECT NULL, NULL, NULL, l.{key}, \
             CASE WHEN EXISTS (SELECT 1 FROM {table} t WHERE t.{key} = l.{key}) THEN '1' ELSE '0' END, \
             (SELECT t.{value} FROM {table} t WHERE t.{key} = l.{key}) \
             FROM (SELECT DISTINCT l.{key} FROM {log} l \
             WHERE (l.v > {since} OR l.v IS NULL){slice}) l"
        )
    }

    /// One row of two texts: the version the table is at (PostgreSQL: the snapshot),
    /// and the compaction horizon (MySQL: three, see there).
    pub(crate) fn version_query(self, n: &Names) -> String {
        match self {
            // The log's own counter: SQLite keeps it in sqlite_sequence.
            Dialect::Sqlite => format!(
                "SELECT CAST(max(coalesce((SELECT seq FROM sqlite_sequence WHERE name = '{}'), 0), \
                 c.horizon) AS TEXT), CAST(c.horizon AS TEXT) FROM {} c WHERE c.id = 1",
                n.log.replace('\'', "''"),
                self.quote(&n.clock)
            ),
            // A position (see `PG_POSITION`), which the store numbers.
            Dialect::Postgres => format!(
                "SELECT {PG_POSITION}, xhorizon::text FROM {} WHERE id = 1",
                self.quote(&n.clock)
            ),
            // Where the table is: the clock's count, how many log rows are not
            // sequenced yet, and the compaction horizon. (Not the newest unsequenced
            // row: a transaction that commits after a later one adds an older row.)
            Dialect::Mysql => format!(
                "SELECT CAST(c.seq AS CHAR), \
                 CAST((SELECT count(*) FROM {} l WHERE l.v IS NULL) AS CHAR), \
                 CAST(c.qhorizon AS CHAR) FROM {} c WHERE c.id = 1",
                self.quote(&n.log),
                self.quote(&n.clock)
            ),
        }
    }

    /// The changes since a version (the one parameter; PostgreSQL: a snapshot as
    /// text): rows of the horizon, the change's version, the key, whether the table
    /// holds the key, and its value; one row with only the horizon when nothing
    /// changed. One statement, so one snapshot. PostgreSQL's rows begin instead with
    /// whether the changes since that snapshot were forgotten (`1`) and the snapshot
    /// reached.
    pub(crate) fn changes_query(self, t: &TableSpec, n: &Names, marks: Marks) -> String {
        let q = |s: &str| self.quote(s);
        let (table, log, clock, key, value) =
            (q(&t.name), q(&n.log), q(&n.clock), q("key"), q("value"));
        // SQLite compares with the left operand's collation: the log's key first. On
        // PostgreSQL the log's key has the database's default collation, so the
        // comparison takes the table's and its key index serves.
        let same = match self {
            Dialect::Sqlite => format!("l.{key} = t.{key}"),
            _ => format!("t.{key} = l.{key}"),
        };
        let text = |e: &str| match self {
            Dialect::Mysql => format!("CAST({e} AS CHAR)"),
            _ => format!("CAST({e} AS TEXT)"),
        };
        // A slice's reader takes its own keys' changes only (in the join's condition:
        // the clock's row comes whatever changed).
        let slice = self
            .log_slice_condition(t)
            .map_or_else(String::new, |c| format!(" AND {c}"));
        if self == Dialect::Postgres {
            // The changes of the transactions the old snapshot did not show committed:
            // those from its xmax up and those it listed in progress, two reads of the
            // log's index on `v`. (Not the range from its xmin: a transaction left open
            // anywhere on the server holds xmin back, and that range would hold every
            // change since, visible or not.)
            // A lateral lookup per change: PostgreSQL may turn a correlated EXISTS into a
            // hashed subplan, which reads the whole table to build its hash when stale
            // statistics promise many changes (measured right after a bulk write of
            // 100,000 rows: 43 ms for one change; a LIMIT 1 lateral cannot be hashed).
            let old = format!(
                "CAST(CAST({} AS TEXT) AS txid_snapshot)",
                self.mark(marks, 1)
            );
            return format!(
                "SELECT CASE WHEN c.xhorizon > txid_snapshot_xmin(s.old) \
                 OR NOT txid_visible_in_snapshot(c.truncated, s.old) THEN '1' ELSE '0' END, \
                 {PG_POSITION}, l.{key}, \
                 CASE WHEN x.v IS NULL THEN '0' ELSE '1' END, x.v \
                 FROM (SELECT {old} AS old) s JOIN {clock} c ON c.id = 1 \
                 LEFT JOIN LATERAL (SELECT l.{key} FROM {log} l \
                 WHERE l.v >= txid_snapshot_xmax(s.old){slice} UNION ALL \
                 SELECT l.{key} FROM {log} l \
                 WHERE l.v = ANY (ARRAY(SELECT txid_snapshot_xip(s.old))){slice}) l ON true \
                 LEFT JOIN LATERAL (SELECT t.{value} AS v FROM {table} t WHERE {same} LIMIT 1) x \
                 ON true"
            );
        }
        let since = format!("{}{slice}", self.bigint_param(marks));
        // Correlated subqueries: one key lookup per change, whatever the table's size
        // (a join may be planned as a scan of the table).
        format!(
            "SELECT {}, {}, l.{key}, \
             CASE WHEN EXISTS (SELECT 1 FROM {table} t WHERE {same}) THEN '1' ELSE '0' END, \
             (SELECT t.{value} FROM {table} t WHERE {same}) \
             FROM {clock} c LEFT JOIN {log} l ON l.v > {since} \
             WHERE c.id = 1 ORDER BY l.v",
            text("c.horizon"),
            text("l.v"),
        )
    }

    /// A slice's condition on the log's key (`l`), in byte order: PostgreSQL's log key
    /// has the database's collation, SQLite's may be compared otherwise.
    fn log_slice_condition(self, t: &TableSpec) -> Option<String> {
        let key = match self {
            Dialect::Sqlite => format!("l.{} COLLATE BINARY", self.quote("key")),
            Dialect::Postgres if t.key_format == Format::Text => {
                format!("l.{} COLLATE \"C\"", self.quote("key"))
            }
            Dialect::Postgres | Dialect::Mysql => format!("l.{}", self.quote("key")),
        };
        self.slice_condition(t, &key)
    }

    /// Forgets the log below a version (the one parameter) and moves the horizon there:
    /// a map that has seen less reloads in full.
    pub(crate) fn compact_statements(self, n: &Names, marks: Marks) -> [String; 2] {
        let p = self.bigint_param(marks);
        let bigger = match self {
            Dialect::Sqlite => "max",
            _ => "greatest",
        };
        [
            format!("DELETE FROM {} WHERE v <= {p}", self.quote(&n.log)),
            format!(
                "UPDATE {} SET horizon = {bigger}(horizon, {p}) WHERE id = 1",
                self.quote(&n.clock)
            ),
        ]
    }
}

/// PostgreSQL: where a reader is, as text: the snapshot its statement runs in, whose
/// transactions it has seen if committed. A standby's snapshot lists no transaction in
/// progress (recovery keeps them apart): there every transaction from the snapshot's
/// oldest one up counts as not seen (`xmin:xmin:`), and the whole snapshot follows
/// after a space, so that positions still differ when something committed. Only the
/// first word is a snapshot to compare with.
const PG_POSITION: &str = "CASE WHEN pg_is_in_recovery() THEN \
     txid_snapshot_xmin(txid_current_snapshot())::text || ':' || \
     txid_snapshot_xmin(txid_current_snapshot())::text || ': ' || \
     txid_current_snapshot()::text ELSE txid_current_snapshot()::text END";

/// MySQL: how an open upgrades a change log of an earlier release (one row per key,
/// its version from a clock row that every writer locked), under the setup lock: the
/// log gains its own counter as key, in one statement, before the triggers are
/// replaced; the clock's count starts above every version the log holds; and the old
/// horizon is moved past any version, so that maps of the earlier release still
/// running reload on each refresh (never stale) until they are restarted.
const MYSQL_UPGRADE: [&str; 3] = [
    "ALTER TABLE {log} DROP PRIMARY KEY, \
     ADD COLUMN id BIGINT NOT NULL AUTO_INCREMENT PRIMARY KEY FIRST, MODIFY v BIGINT NULL",
    "UPDATE {clock} SET seq = greatest(seq, (SELECT coalesce(max(v), 0) FROM {log})) \
     WHERE id = 1",
    "UPDATE {clock} SET horizon = 4611686018427387904",
];

/// MySQL: a refresh that read this many log rows not sequenced yet sequences them.
const SEQUENCE_AT: u64 = 64;

/// MySQL: the most rows one sequencing run gives versions to, in one transaction (a
/// bulk write's rows are sequenced over several).
const SEQUENCE_ROWS: usize = 20_000;

/// MySQL: the log rows of the runs of ids given, by the log's primary key: every id in
/// a run was read, so a range holds no row of a transaction still open.
fn id_condition(runs: &[(u64, u64)]) -> String {
    let runs: Vec<String> = runs
        .iter()
        .map(|&(a, b)| {
            if a == b {
                format!("id = {a}")
            } else {
                format!("id BETWEEN {a} AND {b}")
            }
        })
        .collect();
    runs.join(" OR ")
}

/// Runs of consecutive numbers in sorted `ids`, as (first, last).
fn id_runs(ids: &[u64]) -> Vec<(u64, u64)> {
    let mut runs: Vec<(u64, u64)> = Vec::new();
    for &id in ids {
        match runs.last_mut() {
            Some((_, last)) if *last + 1 == id => *last = id,
            _ => runs.push((id, id)),
        }
    }
    runs
}

/// `head $tag$ body $tag$`, with a dollar-quote tag that occurs nowhere in the body:
/// the body holds the table's names, which may hold any text, `$wth$` included.
fn dollar_quoted(head: &str, body: &str) -> String {
    let mut tag = String::from("wth");
    while body.contains(&format!("${tag}$")) {
        tag.push('_');
    }
    format!("{head} ${tag}$ {body} ${tag}$")
}

/// Coherence on one table of one store: what its statements need.
#[derive(Debug)]
pub(crate) struct Coherence {
    table: TableSpec,
    names: Names,
    dialect: Dialect,
    marks: Marks,
    backend: &'static str,
    /// MySQL: the positions handed out (the clock's count, how many rows are not
    /// sequenced), under the numbers the map keeps.
    positions: std::sync::Mutex<Positions<(u64, u64)>>,
    /// PostgreSQL: the snapshots handed out, likewise.
    snapshots: std::sync::Mutex<Positions<String>>,
}

/// MySQL's positions are a count and a row, PostgreSQL's are snapshots; the map keeps
/// one number. The store hands out numbers for the positions it read, and remembers the
/// last few.
#[derive(Debug)]
struct Positions<T> {
    next: u64,
    known: Vec<(u64, T)>,
}

impl<T> Default for Positions<T> {
    fn default() -> Self {
        Positions {
            next: 0,
            known: Vec::new(),
        }
    }
}

impl<T: PartialEq + Clone> Positions<T> {
    /// How many are remembered: the map's own and the ones read since.
    const KEEP: usize = 8;

    fn number(&mut self, position: T) -> u64 {
        if let Some((n, _)) = self.known.iter().find(|(_, p)| *p == position) {
            return *n;
        }
        self.next += 1;
        if self.known.len() == Self::KEEP {
            self.known.remove(0);
        }
        self.known.push((self.next, position));
        self.next
    }

    fn position(&self, number: u64) -> Option<T> {
        self.known
            .iter()
            .find(|(n, _)| *n == number)
            .map(|(_, p)| p.clone())
    }
}

impl Coherence {
    /// Installs coherence on an opened table, unless it is there already (then nothing
    /// is created, so a read-only session or a user without DDL rights can use it).
    pub(crate) fn enable(
        conn: &mut dyn Catalog,
        table: &TableSpec,
        dialect: Dialect,
        marks: Marks,
        backend: &'static str,
        made_table: bool,
    ) -> Result<Coherence> {
        let names = Names::of(dialect, table)?;
        let fail = |e| db_error(Action::Open, table, backend, e);
        if dialect == Dialect::Mysql {
            // InnoDB's foreign-key actions change rows without firing triggers: a change
            // a parent table's cascade makes here would never reach the change log.
            let cascades = conn
                .texts(
                    &format!(
                        "SELECT constraint_name FROM information_schema.referential_constraints \
                         WHERE constraint_schema = database() AND table_name = {} AND \
                         (delete_rule <> 'RESTRICT' AND delete_rule <> 'NO ACTION' OR \
                          update_rule <> 'RESTRICT' AND update_rule <> 'NO ACTION')",
                        dialect.mark(marks, 1)
                    ),
                    Some(&table.name),
                )
                .map_err(fail)?;
            if let Some(name) = cascades.first().and_then(|r| r.first()) {
                return Err(Error::NotCoherent {
                    table: table.name.clone(),
                    reason: format!(
                        "its foreign key {name:?} cascades (ON DELETE or ON UPDATE CASCADE, SET \
                         NULL or SET DEFAULT), and MySQL/MariaDB fire no trigger for the rows a \
                         cascade changes, so other maps would never see those changes; make \
                         the foreign key RESTRICT, or open the map without coherent()"
                    ),
                });
            }
        }
        let installed = conn
            .texts(&dialect.coherence_installed_query(table, &names), None)
            .map_err(fail)?;
        let count = installed
            .first()
            .and_then(|r| r.first())
            .and_then(|c| c.trim().parse::<usize>().ok())
            .unwrap_or(0);
        if count < names.triggers.len() {
            // A refused open writes nothing: what this setup makes is taken away again
            // when a later step fails (on MySQL every DDL commits on its own).
            let existed: Vec<bool> = [&names.log, &names.clock, &names.setup_lock]
                .iter()
                .map(|n| table_exists(conn, dialect, marks, n))
                .collect();
            let result = Self::install(conn, table, &names, dialect, backend);
            // A conflict with a concurrent open (Galera's 1213) is tried again by the
            // caller: what is there stays, other opens may be using it already.
            if let Err(e) = result {
                if e.is_conflict() {
                    return Err(e);
                }
                let mut undo = |sql: String| {
                    let _ = conn.exec(&sql);
                };
                if count == 0 {
                    for trigger in &names.triggers {
                        undo(dialect.drop_trigger(table, trigger));
                    }
                }
                for (name, existed) in [&names.log, &names.clock, &names.setup_lock]
                    .into_iter()
                    .zip(existed)
                {
                    if !existed {
                        undo(format!("DROP TABLE IF EXISTS {}", dialect.quote(name)));
                    }
                }
                if made_table {
                    undo(format!(
                        "DROP TABLE IF EXISTS {}",
                        dialect.quote(&table.name)
                    ));
                }
                return Err(e);
            }
        }
        Ok(Coherence {
            table: table.clone(),
            names,
            dialect,
            marks,
            backend,
            positions: std::sync::Mutex::default(),
            snapshots: std::sync::Mutex::default(),
        })
    }

    /// Installs the log, the clock and the triggers.
    fn install(
        conn: &mut dyn Catalog,
        table: &TableSpec,
        names: &Names,
        dialect: Dialect,
        backend: &'static str,
    ) -> Result<()> {
        let fail = |e| db_error(Action::Open, table, backend, e);
        {
            let setup = dialect.coherence_setup(table, names);
            if dialect == Dialect::Mysql {
                let (tables, triggers) = setup.split_at(setup.len() - names.triggers.len());
                for sql in tables {
                    retry_conflicts(|| conn.exec(sql)).map_err(fail)?;
                }
                let log_columns = conn
                    .texts(
                        "SELECT column_name FROM information_schema.columns WHERE \
                         table_schema = database() AND table_name = ?",
                        Some(&names.log),
                    )
                    .map_err(fail)?;
                let upgrade = !log_columns.is_empty()
                    && !log_columns
                        .iter()
                        .any(|c| c.first().is_some_and(|c| c.eq_ignore_ascii_case("id")));
                let mut steps = Vec::new();
                if upgrade {
                    steps.push(MYSQL_UPGRADE[0].replace("{log}", &dialect.quote(&names.log)));
                }
                steps.extend(triggers.iter().cloned());
                if upgrade {
                    steps.extend(MYSQL_UPGRADE[1..].iter().map(|sql| {
                        sql.replace("{log}", &dialect.quote(&names.log))
                            .replace("{clock}", &dialect.quote(&names.clock))
                    }));
                }
                install_one_at_a_time(conn, table, names, &steps, backend)?;
            } else {
                for sql in setup {
                    conn.exec(&sql).map_err(fail)?;
                }
            }
        }
        Ok(())
    }

    /// The version the table is at: MySQL's positions (a count and the rows not
    /// sequenced) and PostgreSQL's snapshots go by a number the store hands out.
    pub(crate) fn version(&self, conn: &mut dyn Catalog) -> Result<u64> {
        match self.dialect {
            Dialect::Sqlite => return self.clock(conn).map(|(v, _)| v),
            Dialect::Postgres => {
                let snapshot = self.snapshot(conn)?;
                return Ok(self.snapshots().number(snapshot));
            }
            Dialect::Mysql => {}
        }
        let (seq, unsequenced, _) = self.mysql_clock(conn)?;
        Ok(self.positions().number((seq, unsequenced)))
    }

    /// Calls `sink` with every key changed since `since` (its value, or `None` when the
    /// table no longer holds it), and returns the version reached, or `None` when
    /// `since` is older than the horizon: those changes are forgotten.
    pub(crate) fn changes(
        &self,
        conn: &mut dyn Catalog,
        since: u64,
        sink: &mut ChangeSink<'_>,
    ) -> Result<Option<u64>> {
        match self.dialect {
            Dialect::Sqlite => return self.changes_one(conn, since, sink),
            Dialect::Postgres => return self.changes_in_snapshots(conn, since, sink),
            Dialect::Mysql => {}
        }
        // A number this store did not hand out (or forgot): start again from a load.
        let Some((seen, _)) = self.positions().position(since) else {
            return Ok(None);
        };
        let fail = |e| db_error(Action::Load, &self.table, self.backend, e);
        let sql = self
            .dialect
            .mysql_changes_query(&self.table, &self.names, seen);
        let rows = conn.rows(&sql, None).map_err(fail)?;
        let number = |f: &Option<Vec<u8>>| -> Option<u64> {
            f.as_deref()
                .and_then(|b| std::str::from_utf8(b).ok())
                .and_then(|s| s.trim().parse().ok())
        };
        let mut reached = None;
        let mut unsequenced = 0;
        for row in &rows {
            let [horizon, seq, waiting, key, present, value] = row.as_slice() else {
                return Err(fail(
                    "the change query returned a row of another shape".into(),
                ));
            };
            match key {
                None => {
                    if number(horizon).unwrap_or(0) > seen {
                        return Ok(None);
                    }
                    let (Some(seq), Some(waiting)) = (number(seq), number(waiting)) else {
                        return Err(fail("the change log's clock row is not numbers".into()));
                    };
                    reached = Some((seq, waiting));
                    unsequenced = waiting;
                }
                Some(key) => {
                    let present = present.as_deref() == Some(b"1");
                    sink(key, if present { value.as_deref() } else { None })?;
                }
            }
        }
        let Some(reached) = reached else {
            return Err(fail(self.no_clock_row()));
        };
        // Every refresh reads the rows not sequenced yet: when they are many, give them
        // their versions, so that the next refresh reads only what is new.
        if unsequenced >= SEQUENCE_AT {
            self.sequence_quietly(conn);
        }
        Ok(Some(self.positions().number(reached)))
    }

    /// Forgets the changes older than the last `keep` versions (MySQL: the last `keep`
    /// sequenced rows), once the log holds twice as many.
    pub(crate) fn compact(&self, conn: &mut dyn Catalog, keep: u64) -> Result<()> {
        match self.dialect {
            Dialect::Sqlite => return self.compact_one(conn, keep),
            Dialect::Postgres => return self.compact_snapshots(conn, keep),
            Dialect::Mysql => {}
        }
        // The rows a compaction could take are the sequenced ones: sequence first.
        self.sequence_quietly(conn);
        let fail = |e| db_error(Action::Write, &self.table, self.backend, e);
        let (log, clock) = (
            self.dialect.quote(&self.names.log),
            self.dialect.quote(&self.names.clock),
        );
        let nth = |n: u64| {
            format!("SELECT v FROM {log} WHERE v IS NOT NULL ORDER BY v DESC LIMIT 1 OFFSET {n}")
        };
        let sql = format!(
            "SELECT CAST(({}) AS CHAR) FROM {clock} WHERE id = 1 AND EXISTS ({})",
            nth(keep),
            nth(keep.saturating_mul(2))
        );
        let Some(upto) = self.compaction_point(conn, &sql)? else {
            return Ok(());
        };
        // The horizon first: a reader that read the clock before the delete and the log
        // after it would otherwise miss the rows deleted in between.
        conn.exec(&format!(
            "UPDATE {clock} SET qhorizon = greatest(qhorizon, {upto}) WHERE id = 1"
        ))
        .map_err(fail)?;
        // The rows go by their ids, read first without a lock: a delete by `v` reads
        // the index's unsequenced rows too, and waited for a transaction of another
        // program that had appended one and was still open (found by probing: the
        // map's write that compacted waited 50 s).
        let ids: Vec<u64> = conn
            .texts(
                &format!(
                    "SELECT CAST(id AS CHAR) FROM {log} WHERE v IS NOT NULL AND v <= {upto} \
                     ORDER BY id"
                ),
                None,
            )
            .map_err(fail)?
            .iter()
            .filter_map(|r| r.first().and_then(|id| id.trim().parse().ok()))
            .collect();
        for ids in id_runs(&ids).chunks(500) {
            conn.exec("SET TRANSACTION ISOLATION LEVEL READ COMMITTED")
                .map_err(fail)?;
            conn.exec(&format!("DELETE FROM {log} WHERE {}", id_condition(ids)))
                .map_err(fail)?;
        }
        tracing::debug!(table = %self.table.name, upto, "change log compacted");
        Ok(())
    }

    /// The version up to which a compaction deletes, as `sql` reads it: `None` when the
    /// log does not need compacting yet.
    fn compaction_point(&self, conn: &mut dyn Catalog, sql: &str) -> Result<Option<u64>> {
        let fail = |e| db_error(Action::Write, &self.table, self.backend, e);
        let rows = conn.texts(sql, None).map_err(fail)?;
        let Some(upto) = rows.first().and_then(|r| r.first()) else {
            return Ok(None);
        };
        upto.trim()
            .parse()
            .map(Some)
            .map_err(|_| fail(format!("the log's version {upto:?} is not a number").into()))
    }

    /// MySQL: the clock's count, how many log rows are not sequenced, and the
    /// compaction horizon, in one snapshot.
    fn mysql_clock(&self, conn: &mut dyn Catalog) -> Result<(u64, u64, u64)> {
        let fail = |e| db_error(Action::Load, &self.table, self.backend, e);
        let rows = conn
            .texts(&self.dialect.version_query(&self.names), None)
            .map_err(fail)?;
        let Some(row) = rows.first() else {
            return Err(fail(self.no_clock_row()));
        };
        let n: Vec<Option<u64>> = row.iter().map(|f| f.trim().parse().ok()).collect();
        match n.as_slice() {
            [Some(seq), Some(newest), Some(horizon)] => Ok((*seq, *newest, *horizon)),
            _ => Err(fail("the change log's clock row is not numbers".into())),
        }
    }

    fn no_clock_row(&self) -> crate::error::BoxError {
        format!(
            "the change log's clock {:?} has no row 1; open the map with coherent() again \
             to restore it",
            self.names.clock
        )
        .into()
    }

    /// MySQL: gives the log's committed rows that have no version yet their versions,
    /// above the clock's count, at most `SEQUENCE_ROWS` of them. Only sequencers take
    /// the clock row's lock; the rows were read committed, by their ids, so no writer
    /// is waited for. Readers do not depend on it (see the module's notes): a failure
    /// (a read-only session, no right to update the log, a Galera conflict with another
    /// node's sequencer) is logged and leaves the rows for the next one.
    fn sequence_quietly(&self, conn: &mut dyn Catalog) {
        // Run after run until what was committed before is sequenced: rows left
        // unsequenced are read again by every refresh (found: a refresh after one
        // change read the 980,000 rows left of a bulk write, 4.4 s).
        loop {
            match self.sequence(conn) {
                Ok(n) if n == SEQUENCE_ROWS => {}
                Ok(_) => return,
                Err(e) => {
                    let _ = conn.exec("ROLLBACK");
                    tracing::debug!(table = %self.table.name, error = %e,
                        "change log rows left unsequenced");
                    return;
                }
            }
        }
    }

    /// One run of `sequence_quietly`: how many rows it found to sequence.
    fn sequence(
        &self,
        conn: &mut dyn Catalog,
    ) -> std::result::Result<usize, crate::error::BoxError> {
        let (log, clock) = (
            self.dialect.quote(&self.names.log),
            self.dialect.quote(&self.names.clock),
        );
        let ids: Vec<u64> = conn
            .texts(
                &format!(
                    "SELECT CAST(id AS CHAR) FROM {log} WHERE v IS NULL ORDER BY id \
                     LIMIT {SEQUENCE_ROWS}"
                ),
                None,
            )?
            .iter()
            .filter_map(|r| r.first().and_then(|id| id.trim().parse().ok()))
            .collect();
        let (Some(&first), Some(&last)) = (ids.first(), ids.last()) else {
            return Ok(0);
        };
        conn.exec("SET TRANSACTION ISOLATION LEVEL READ COMMITTED")?;
        conn.exec("START TRANSACTION")?;
        let count = conn.texts(
            &format!("SELECT CAST(seq AS CHAR) FROM {clock} WHERE id = 1 FOR UPDATE"),
            None,
        )?;
        let count: u64 = count
            .first()
            .and_then(|r| r.first())
            .and_then(|c| c.trim().parse().ok())
            .ok_or("the change log's clock has no row 1")?;
        // Row `id` takes version `id + offset`: above the count, one per row, in the
        // order of the ids.
        let offset = i128::from(count) + 1 - i128::from(first);
        for ids in id_runs(&ids).chunks(500) {
            conn.exec(&format!(
                "UPDATE {log} SET v = id + ({offset}) WHERE v IS NULL AND ({})",
                id_condition(ids)
            ))?;
        }
        conn.exec(&format!(
            "UPDATE {clock} SET seq = {} WHERE id = 1",
            i128::from(last) + offset
        ))?;
        conn.exec("COMMIT")?;
        tracing::debug!(table = %self.table.name, rows = ids.len(), "change log rows sequenced");
        Ok(ids.len())
    }

    fn positions(&self) -> std::sync::MutexGuard<'_, Positions<(u64, u64)>> {
        self.positions
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn snapshots(&self) -> std::sync::MutexGuard<'_, Positions<String>> {
        self.snapshots
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// PostgreSQL: the snapshot the table is seen in now, as its text.
    fn snapshot(&self, conn: &mut dyn Catalog) -> Result<String> {
        let fail = |e| db_error(Action::Load, &self.table, self.backend, e);
        let rows = conn
            .texts(&self.dialect.version_query(&self.names), None)
            .map_err(fail)?;
        rows.into_iter()
            .next()
            .and_then(|r| r.into_iter().next())
            .ok_or_else(|| {
                fail(
                    format!(
                        "the change log's clock {:?} has no row 1; open the map with coherent() \
                     again to restore it",
                        self.names.clock
                    )
                    .into(),
                )
            })
    }

    /// Runs the change query with its one parameter. PostgreSQL plans the log's range
    /// by its statistics, which a log just filled (a bulk load, before autovacuum
    /// analyzed it) lacks: it then reads the whole log (measured: 81 ms instead of
    /// 0.5 ms on a log of 100,000 rows). The index on `v` is always the way in; the
    /// query says so for its transaction.
    fn change_rows(&self, conn: &mut dyn Catalog, since: &str) -> Result<Vec<Vec<Field>>> {
        let fail = |e| db_error(Action::Load, &self.table, self.backend, e);
        let sql = self
            .dialect
            .changes_query(&self.table, &self.names, self.marks);
        let steer = self.dialect == Dialect::Postgres && self.marks == Marks::Native;
        if steer {
            // And no JIT: the plan's cost, scaled by those statistics, passes its
            // threshold, and compiling took 7 ms of a 7.5 ms refresh of one change.
            conn.exec(
                "BEGIN READ ONLY; SET LOCAL enable_seqscan = off; \
                 SELECT set_config('jit', 'off', true) \
                 WHERE current_setting('jit', true) IS NOT NULL",
            )
            .map_err(fail)?;
        }
        let rows = conn.rows(&sql, Some(since));
        if steer {
            // Read only: ending it cannot lose anything; a failed query left it aborted.
            let _ = conn.exec("COMMIT");
        }
        rows.map_err(fail)
    }

    /// PostgreSQL: the changes of the transactions that the snapshot numbered `since`
    /// did not show committed, read in a new snapshot, which is the position reached.
    fn changes_in_snapshots(
        &self,
        conn: &mut dyn Catalog,
        since: u64,
        sink: &mut ChangeSink<'_>,
    ) -> Result<Option<u64>> {
        // A number this store did not hand out (or forgot): start again from a load.
        let Some(old) = self.snapshots().position(since) else {
            return Ok(None);
        };
        let old = old.split(' ').next().unwrap_or_default();
        let rows = self.change_rows(conn, old)?;
        let mut reached = None;
        for row in &rows {
            let [behind, snapshot, key, present, value] = row.as_slice() else {
                return Err(db_error(
                    Action::Load,
                    &self.table,
                    self.backend,
                    crate::error::BoxError::from(
                        "the change query returned a row of another shape",
                    ),
                ));
            };
            if behind.as_deref() != Some(b"0") {
                return Ok(None);
            }
            if reached.is_none() {
                reached = snapshot
                    .as_deref()
                    .and_then(|b| std::str::from_utf8(b).ok())
                    .map(str::to_owned);
            }
            if let Some(key) = key {
                let present = present.as_deref() == Some(b"1");
                sink(key, if present { value.as_deref() } else { None })?;
            }
        }
        Ok(reached.map(|snapshot| self.snapshots().number(snapshot)))
    }

    /// PostgreSQL: once the log holds twice `keep` keys, forgets all but the last
    /// `keep` changed, of transactions that every snapshot shows ended. Rows a writer
    /// holds are left: it is changing them again. The horizon moves first, so a crash
    /// in between leaves only log rows nobody needs.
    fn compact_snapshots(&self, conn: &mut dyn Catalog, keep: u64) -> Result<()> {
        let fail = |e| db_error(Action::Write, &self.table, self.backend, e);
        let (log, clock) = (
            self.dialect.quote(&self.names.log),
            self.dialect.quote(&self.names.clock),
        );
        let nth = |n: u64| format!("SELECT v FROM {log} ORDER BY v DESC OFFSET {n} LIMIT 1");
        let sql = format!(
            "SELECT least(({}), txid_snapshot_xmin(txid_current_snapshot()) - 1)::text \
             WHERE EXISTS ({})",
            nth(keep),
            nth(keep.saturating_mul(2))
        );
        let Some(upto) = self.compaction_point(conn, &sql)? else {
            return Ok(());
        };
        for sql in [
            format!(
                "UPDATE {clock} SET xhorizon = greatest(xhorizon, {}) WHERE id = 1",
                upto + 1
            ),
            format!(
                "DELETE FROM {log} WHERE ctid = ANY (ARRAY(SELECT ctid FROM {log} \
                 WHERE v <= {upto} FOR UPDATE SKIP LOCKED))"
            ),
        ] {
            conn.exec(&sql).map_err(fail)?;
        }
        tracing::debug!(table = %self.table.name, upto, "change log compacted");
        Ok(())
    }

    /// SQLite: the version the table is at, and its compaction horizon.
    fn clock(&self, conn: &mut dyn Catalog) -> Result<(u64, u64)> {
        let fail = |e| db_error(Action::Load, &self.table, self.backend, e);
        let rows = conn
            .texts(&self.dialect.version_query(&self.names), None)
            .map_err(fail)?;
        let number = |i: usize| {
            rows.first()
                .and_then(|r| r.get(i))
                .and_then(|v| v.trim().parse::<u64>().ok())
        };
        match (number(0), number(1)) {
            (Some(v), Some(h)) => Ok((v, h)),
            _ => Err(fail(
                format!(
                    "the change log's clock {:?} has no row 1; open the map with coherent() \
                     again to restore it",
                    self.names.clock
                )
                .into(),
            )),
        }
    }

    /// SQLite: [`changes`](Self::changes) by the log's counter.
    fn changes_one(
        &self,
        conn: &mut dyn Catalog,
        since: u64,
        sink: &mut ChangeSink<'_>,
    ) -> Result<Option<u64>> {
        let fail = |e: crate::error::BoxError| db_error(Action::Load, &self.table, self.backend, e);
        let rows = self.change_rows(conn, &since.to_string())?;
        let number = |f: &Option<Vec<u8>>| -> Option<u64> {
            f.as_deref()
                .and_then(|b| std::str::from_utf8(b).ok())
                .and_then(|s| s.trim().parse().ok())
        };
        let mut reached = since;
        for row in &rows {
            let [horizon, version, key, present, value] = row.as_slice() else {
                return Err(fail(
                    "the change query returned a row of another shape".into(),
                ));
            };
            if number(horizon).unwrap_or(0) > since {
                return Ok(None);
            }
            // The clock's row alone: nothing changed.
            let (Some(version), Some(key)) = (number(version), key) else {
                continue;
            };
            let present = present.as_deref() == Some(b"1");
            sink(key, if present { value.as_deref() } else { None })?;
            reached = reached.max(version);
        }
        Ok(Some(reached))
    }

    /// SQLite: forgets the changes older than the last `keep` versions, once the log
    /// holds twice as many. The horizon moves first, so a crash in between leaves only
    /// log rows nobody needs.
    fn compact_one(&self, conn: &mut dyn Catalog, keep: u64) -> Result<()> {
        let (version, horizon) = self.clock(conn)?;
        if version.saturating_sub(horizon) < keep.saturating_mul(2) {
            return Ok(());
        }
        let upto = (version - keep).to_string();
        let [delete, horizon] = self.dialect.compact_statements(&self.names, self.marks);
        for sql in [horizon, delete] {
            conn.exec_with(&sql, Some(&upto))
                .map_err(|e| db_error(Action::Write, &self.table, self.backend, e))?;
        }
        tracing::debug!(table = %self.table.name, upto = %upto, "change log compacted");
        Ok(())
    }
}

/// The error of a coherence call on a store opened without it.
pub(crate) fn not_enabled(table: &Option<TableSpec>) -> Error {
    Error::NotCoherent {
        table: table.as_ref().map(|t| t.name.clone()).unwrap_or_default(),
        reason: "the map was opened without `coherent()`: open it with \
                 `DbHashMap::builder(…).coherent()`"
            .into(),
    }
}

/// Whether a table of that name exists (a refused setup drops only what it made).
fn table_exists(conn: &mut dyn Catalog, d: Dialect, marks: Marks, name: &str) -> bool {
    let param = d.layout_param(&TableSpec::new(name, Format::Text, Format::Text));
    conn.texts(&d.layout_query(marks), Some(&param))
        .is_ok_and(|cols| !cols.is_empty())
}

/// How long an open waits for another connection that installs the triggers, and how
/// old a lock row must be to be taken as left by a connection that died.
const SETUP_WAIT: std::time::Duration = std::time::Duration::from_secs(60);

/// MySQL: installs the triggers on one connection at a time in the whole cluster. On
/// Galera, DDL runs in total order on every node: two nodes creating the same trigger at
/// once wait for each other's metadata lock and wedge the cluster (measured: 8 of 8
/// tries with three nodes), and a `CREATE TRIGGER IF NOT EXISTS` that finds the trigger
/// there still makes other nodes' writes fail certification. So: no DDL when the
/// triggers are all there; otherwise whoever inserts the one row of the lock table
/// (replicated, certified: one insert wins) installs them, and the others wait until
/// they are there. A row older than `SETUP_WAIT` was left by a connection that died.
fn install_one_at_a_time(
    conn: &mut dyn Catalog,
    table: &TableSpec,
    names: &Names,
    triggers: &[String],
    backend: &'static str,
) -> Result<()> {
    let d = Dialect::Mysql;
    let fail = |e| db_error(Action::Open, table, backend, e);
    let lock = d.quote(&names.setup_lock);
    retry_conflicts(|| {
        conn.exec(&format!(
            "CREATE TABLE IF NOT EXISTS {lock} (id INT PRIMARY KEY, \
             taken TIMESTAMP NOT NULL DEFAULT CURRENT_TIMESTAMP) ENGINE=InnoDB"
        ))
    })
    .map_err(fail)?;
    let query = d.coherence_installed_query(table, names);
    let installed = |conn: &mut dyn Catalog| -> Result<bool> {
        let rows = conn.texts(&query, None).map_err(fail)?;
        let n = rows
            .first()
            .and_then(|r| r.first())
            .and_then(|c| c.trim().parse::<usize>().ok())
            .unwrap_or(0);
        Ok(n >= names.triggers.len())
    };
    let deadline = std::time::Instant::now() + SETUP_WAIT;
    loop {
        if installed(conn)? {
            return Ok(());
        }
        match conn.exec(&format!("INSERT INTO {lock} (id) VALUES (1)")) {
            Ok(()) => {
                let made = (|| {
                    if !installed(conn)? {
                        for sql in triggers {
                            conn.exec(sql).map_err(fail)?;
                        }
                    }
                    Ok(())
                })();
                let freed =
                    retry_conflicts(|| conn.exec(&format!("DELETE FROM {lock} WHERE id = 1")));
                made?;
                return freed.map_err(fail);
            }
            // Taken: a duplicate key here, or a certification conflict with another
            // node's insert of the same row.
            Err(e) if lock_taken(e.as_ref()) => {
                if std::time::Instant::now() > deadline {
                    return Err(fail(
                        format!(
                            "another connection has been installing coherence's triggers for over \
                         {} s; if it died, delete the row of {} and open again",
                            SETUP_WAIT.as_secs(),
                            names.setup_lock
                        )
                        .into(),
                    ));
                }
                let _ = conn.exec(&format!(
                    "DELETE FROM {lock} WHERE id = 1 AND taken < NOW() - INTERVAL {} SECOND",
                    SETUP_WAIT.as_secs()
                ));
                std::thread::sleep(std::time::Duration::from_millis(50));
            }
            Err(e) => return Err(fail(e)),
        }
    }
}

/// The server's error number behind a driver's error (MySQL's, or a MariaDB ODBC
/// driver's native error).
fn mysql_code(e: &(dyn std::error::Error + Send + Sync + 'static)) -> Option<u32> {
    #[cfg(feature = "mysql")]
    if let Some(mysql::Error::MySqlError(e)) = e.downcast_ref::<mysql::Error>() {
        return Some(u32::from(e.code));
    }
    #[cfg(feature = "odbc")]
    if let Some(odbc_api::Error::Diagnostics { record, .. }) = e.downcast_ref::<odbc_api::Error>() {
        return u32::try_from(record.native_error).ok();
    }
    let _ = e;
    None
}

/// Whether the error of inserting the lock row says another connection holds it: a
/// duplicate key, or a certification conflict with another node's insert.
fn lock_taken(e: &(dyn std::error::Error + Send + Sync + 'static)) -> bool {
    matches!(mysql_code(e), Some(1062 | 1213))
}

/// Runs a DDL or a statement of the setup again when a certification or deadlock
/// conflict (Galera: two nodes creating one table at once) rolled it back.
fn retry_conflicts(
    mut f: impl FnMut() -> std::result::Result<(), crate::error::BoxError>,
) -> std::result::Result<(), crate::error::BoxError> {
    let mut tries = 0;
    loop {
        match f() {
            Err(e) if tries < 5 && mysql_code(e.as_ref()) == Some(1213) => {
                tries += 1;
                std::thread::sleep(std::time::Duration::from_millis(20 << tries));
            }
            other => return other,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(name: &str) -> TableSpec {
        TableSpec::new(name, Format::Text, Format::Text)
    }

    #[test]
    fn names_sit_beside_the_table_and_fit_the_backend() {
        let n = Names::of(Dialect::Sqlite, &spec("h")).unwrap();
        assert_eq!(
            (n.log.as_str(), n.clock.as_str()),
            ("h__wth_log", "h__wth_clock")
        );
        assert!(Names::of(Dialect::Postgres, &spec(&"p".repeat(60))).is_err());
        assert!(Names::of(Dialect::Postgres, &spec(&"p".repeat(49))).is_ok());
        assert!(Names::of(Dialect::Postgres, &spec(&"p".repeat(50))).is_err());
    }

    #[test]
    fn golden_changes_query() {
        let t = spec("h");
        let n = Names::of(Dialect::Sqlite, &t).unwrap();
        assert_eq!(
            Dialect::Sqlite.changes_query(&t, &n, Marks::Native),
            "SELECT CAST(c.horizon AS TEXT), CAST(l.v AS TEXT), l.\"key\", \
             CASE WHEN EXISTS (SELECT 1 FROM \"h\" t WHERE l.\"key\" = t.\"key\") \
             THEN '1' ELSE '0' END, (SELECT t.\"value\" FROM \"h\" t WHERE l.\"key\" = t.\"key\") \
             FROM \"h__wth_clock\" c LEFT JOIN \"h__wth_log\" l ON l.v > ?1 \
             WHERE c.id = 1 ORDER BY l.v"
        );
        let n = Names::of(Dialect::Postgres, &t).unwrap();
        assert!(Dialect::Postgres
            .changes_query(&t, &n, Marks::Native)
            .contains("l.v = ANY (ARRAY(SELECT txid_snapshot_xip(s.old)))"));
        let [delete, horizon] = Dialect::Mysql.compact_statements(&n, Marks::Native);
        assert_eq!(delete, "DELETE FROM `h__wth_log` WHERE v <= ?");
        assert_eq!(
            horizon,
            "UPDATE `h__wth_clock` SET horizon = greatest(horizon, ?) WHERE id = 1"
        );
    }

    #[test]
    fn setup_is_idempotent_sql() {
        for d in [Dialect::Sqlite, Dialect::Postgres, Dialect::Mysql] {
            let t = spec("h");
            let n = Names::of(d, &t).unwrap();
            for sql in d.coherence_setup(&t, &n) {
                assert!(
                    sql.contains("IF NOT EXISTS")
                        || sql.contains("OR REPLACE")
                        || sql.contains("IGNORE")
                        || sql.contains("DO NOTHING"),
                    "{d:?}: {sql}"
                );
            }
        }
    }
}
