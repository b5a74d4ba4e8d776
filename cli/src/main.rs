//! `wth`: look into, export, import and copy the tables of write-thru-hash maps.
//!
//! Everything goes through the library (`DbHashMap`): the same codecs, canonical-key
//! checks, quoting and transactions as a program's map.

use std::collections::BTreeMap;
use std::fs::File;
use std::hash::Hash;
use std::io::{BufRead, BufReader, BufWriter, IsTerminal, Write};
use std::path::PathBuf;
use std::process::ExitCode;

use base64::Engine as _;
use clap::{Parser, Subcommand, ValueEnum};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde_json::Value;
use write_thru_hash::{Bytes, Codec, DbHashMap, Text};

const EXAMPLES: &str = "\
Examples:
  wth --db sqlite:app.db set '\"alice\"' '{\"age\": 3}'
  wth --db sqlite:app.db get '\"alice\"'
  wth --db sqlite:app.db dump backup.jsonl
  WTH_DB=postgres://app:secret@localhost/app wth load backup.jsonl --replace
  wth --db sqlite:app.db copy --to mysql://app:secret@localhost/app --to-table users";

/// Look into, export, import and copy the table of a write-thru-hash map.
///
/// Keys and values are JSON text with the json codec (the default), taken as they are
/// with text, and base64 with bytes. Exit status 0 on success; otherwise a one-line
/// message on stderr.
#[derive(Parser)]
#[command(name = "wth", version, after_help = EXAMPLES)]
struct Cli {
    /// The database: sqlite:PATH, postgres://…, mysql://…, odbc:CONNECTION-STRING.
    #[arg(long, env = "WTH_DB", global = true, hide_env_values = true)]
    db: Option<String>,
    /// The table.
    #[arg(long, default_value = write_thru_hash::DEFAULT_TABLE, global = true)]
    table: String,
    /// How keys and values are stored.
    #[arg(long, value_enum, default_value_t = CodecName::Json, global = true)]
    codec: CodecName,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum CodecName {
    /// JSON text (the library's default codec).
    Json,
    /// Text stored as it is.
    Text,
    /// Bytes stored as they are; shown and read as base64.
    Bytes,
}

#[derive(Subcommand)]
enum Command {
    /// List the database's tables that have `key` and `value` columns.
    ///
    /// Example: wth --db sqlite:app.db tables
    Tables,
    /// Print how many entries the table holds.
    ///
    /// Example: wth --db sqlite:app.db count
    Count,
    /// List the keys, one a line, sorted.
    ///
    /// Example: wth --db sqlite:app.db ls
    Ls,
    /// Print the value of KEY; an absent key is an error.
    ///
    /// Example: wth --db sqlite:app.db get '"alice"'
    Get {
        /// The key (JSON text with the json codec).
        key: String,
    },
    /// Set KEY to VALUE.
    ///
    /// Example: wth --db sqlite:app.db set '"alice"' '{"age": 3}'
    Set {
        /// The key.
        key: String,
        /// The value.
        value: String,
    },
    /// Remove KEY; an absent key is an error.
    ///
    /// Example: wth --db sqlite:app.db rm '"alice"'
    Rm {
        /// The key.
        key: String,
    },
    /// Remove every entry.
    ///
    /// Example: wth --db sqlite:app.db clear
    Clear,
    /// Write every entry as JSON lines, {"key": K, "value": V}, sorted by key.
    ///
    /// To FILE, or standard output. Bytes are base64 strings.
    /// Example: wth --db sqlite:app.db dump backup.jsonl
    Dump {
        /// The file to write (standard output if absent).
        file: Option<PathBuf>,
    },
    /// Read JSON lines as `dump` writes them, in one transaction.
    ///
    /// From FILE, or standard input. A bad line writes nothing and is named in the
    /// message. A key given twice keeps its last value.
    /// Example: wth --db postgres://app@localhost/app load backup.jsonl --replace
    Load {
        /// The file to read (standard input if absent).
        file: Option<PathBuf>,
        /// Replace the table's content instead of adding to it.
        #[arg(long)]
        replace: bool,
    },
    /// Copy the table to another database (or table), replacing what is there, in one
    /// transaction.
    ///
    /// Example: wth --db sqlite:app.db copy --to postgres://app@localhost/app
    Copy {
        /// The database to copy to.
        #[arg(long)]
        to: String,
        /// The table to copy to (the same name if absent).
        #[arg(long)]
        to_table: Option<String>,
    },
}

/// The failure of a command: what the user sees, on one line.
struct Failure(String);

impl From<write_thru_hash::Error> for Failure {
    fn from(e: write_thru_hash::Error) -> Self {
        Failure::from_ref(&e)
    }
}

impl Failure {
    /// The error and its causes, each once, on one line.
    fn from_ref(e: &write_thru_hash::Error) -> Self {
        // Each cause once, on one line: the library's messages say what to do, the
        // drivers' say what the server said.
        let mut text = e.to_string();
        let mut next = std::error::Error::source(e);
        while let Some(cause) = next {
            let said = cause.to_string();
            // A cause the message already tells (PostgreSQL's report) is not repeated.
            let core = said.trim_start_matches("ERROR: ");
            if !text.contains(core.lines().next().unwrap_or(core)) {
                text.push_str(": ");
                text.push_str(&said);
            }
            next = cause.source();
        }
        Failure(text)
    }
}

const BROKEN_PIPE: &str = "broken pipe";

impl From<std::io::Error> for Failure {
    fn from(e: std::io::Error) -> Self {
        if e.kind() == std::io::ErrorKind::BrokenPipe {
            return Failure(BROKEN_PIPE.into());
        }
        Failure(e.to_string())
    }
}

type Outcome<T = ()> = Result<T, Failure>;

/// What differs between codecs: the type of keys and values, and how they are read
/// from the command line and written as JSON.
trait Kind {
    type T: Eq + Hash + Clone + AsRef<[u8]> + 'static;
    type C: Codec<Self::T> + Clone + 'static;
    fn codec() -> Self::C;
    /// From a command-line argument.
    fn parse(arg: &str) -> Result<Self::T, String>;
    /// For `get` and `ls`.
    fn show(t: &Self::T) -> String;
    /// For `dump`: the JSON text of a key or value.
    fn to_json(t: &Self::T) -> String;
    /// For `load`: from a member of a line, as its JSON text.
    fn from_raw(raw: &str) -> Result<Self::T, String>;
    /// The key the table holds that equals `key`, if its text differs (the json codec:
    /// `{"a": 1}` and `{ "a":1 }` are one key).
    fn equal_held(_h: &DbHashMap<Self::T, Self::T>, _key: &Self::T) -> Option<Self::T> {
        None
    }
    /// The bytes the codec stores.
    fn bytes(t: &Self::T) -> &[u8] {
        t.as_ref()
    }
    /// Checks the rows of an opened table, where the codec leaves that to the tool.
    fn check(_table: &str, _h: &DbHashMap<Self::T, Self::T>) -> Outcome {
        Ok(())
    }
}

/// The json codec, kept as the JSON text it stores, with the whitespace between tokens
/// removed and nothing else changed: the order of members and the digits of numbers
/// stay as the program's codec wrote them (a struct's fields in declaration order, an
/// `u128` whole), so a dump and a load give the table back as it was. Rows are checked
/// at open to be JSON.
struct JsonKind;
impl Kind for JsonKind {
    type T = String;
    type C = Text;
    fn codec() -> Text {
        Text
    }
    fn parse(arg: &str) -> Result<String, String> {
        // One level deeper, as a dump line holds it, so that every value set loads back.
        serde_json::from_str::<serde::de::IgnoredAny>(&format!("[{arg}]")).map_err(|e| {
            format!(
                "{arg:?} is not JSON text ({e}); with the json codec, quote strings: \
                 '\"{arg}\"'"
            )
        })?;
        Ok(minify(arg))
    }
    fn show(t: &String) -> String {
        minify(t)
    }
    fn to_json(t: &String) -> String {
        minify(t)
    }
    fn from_raw(raw: &str) -> Result<String, String> {
        Ok(minify(raw))
    }
    fn equal_held(h: &DbHashMap<String, String>, key: &String) -> Option<String> {
        if h.contains_key(key) {
            return None;
        }
        let wanted: Value = serde_json::from_str(key).ok()?;
        h.keys()
            .find(|held| serde_json::from_str::<Value>(held).is_ok_and(|v| v == wanted))
            .cloned()
    }
    fn check(table: &str, h: &DbHashMap<String, String>) -> Outcome {
        for (k, v) in h.iter() {
            for (what, text) in [("key", k), ("value", v)] {
                serde_json::from_str::<serde::de::IgnoredAny>(text).map_err(|e| {
                    Failure(format!(
                        "table {table:?}: a {what} does not decode as JSON ({e}): {}; is it \
                         a table of another codec?",
                        text.chars().take(60).collect::<String>()
                    ))
                })?;
            }
        }
        Ok(())
    }
}

/// JSON text without the whitespace between its tokens (valid JSON in, so strings are
/// whole and a newline can only be whitespace outside them).
fn minify(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let (mut in_string, mut escaped) = (false, false);
    for c in text.chars() {
        if in_string {
            out.push(c);
            if escaped {
                escaped = false;
            } else if c == '\\' {
                escaped = true;
            } else if c == '"' {
                in_string = false;
            }
        } else if c == '"' {
            in_string = true;
            out.push(c);
        } else if !matches!(c, ' ' | '\t' | '\n' | '\r') {
            out.push(c);
        }
    }
    out
}

struct TextKind;
impl Kind for TextKind {
    type T = String;
    type C = Text;
    fn codec() -> Text {
        Text
    }
    fn parse(arg: &str) -> Result<String, String> {
        Ok(arg.to_string())
    }
    fn show(t: &String) -> String {
        t.clone()
    }
    fn to_json(t: &String) -> String {
        Value::String(t.clone()).to_string()
    }
    fn from_raw(raw: &str) -> Result<String, String> {
        serde_json::from_str(raw)
            .map_err(|_| format!("{raw} is not a string, as the text codec needs"))
    }
}

struct BytesKind;
impl Kind for BytesKind {
    type T = Vec<u8>;
    type C = Bytes;
    fn codec() -> Bytes {
        Bytes
    }
    fn parse(arg: &str) -> Result<Vec<u8>, String> {
        base64::engine::general_purpose::STANDARD
            .decode(arg)
            .map_err(|e| format!("{arg:?} is not base64 ({e}), as the bytes codec takes it"))
    }
    fn show(t: &Vec<u8>) -> String {
        base64::engine::general_purpose::STANDARD.encode(t)
    }
    fn to_json(t: &Vec<u8>) -> String {
        Value::String(Self::show(t)).to_string()
    }
    fn from_raw(raw: &str) -> Result<Vec<u8>, String> {
        let text: String = serde_json::from_str(raw)
            .map_err(|_| format!("{raw} is not a base64 string, as the bytes codec needs"))?;
        Self::parse(&text)
    }
}

fn open<K: Kind>(db: &str, table: &str) -> Outcome<DbHashMap<K::T, K::T>> {
    let h = DbHashMap::builder_url(db)
        .table(table)
        .codec(K::codec())
        .open()?;
    K::check(table, &h)?;
    Ok(h)
}

/// A progress bar on stderr when it is a terminal and the work is large; hidden
/// otherwise, so that pipes stay clean.
fn progress(len: u64, what: &str) -> ProgressBar {
    if len < 10_000 || !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::with_draw_target(Some(len), ProgressDrawTarget::stderr());
    if let Ok(style) = ProgressStyle::with_template("{msg} {wide_bar} {pos}/{len} ({eta})") {
        bar.set_style(style);
    }
    bar.set_message(what.to_string());
    bar
}

fn run<K: Kind>(cli: &Cli, db: &str) -> Outcome {
    let table = cli.table.as_str();
    // Opening a map makes its table when absent: only the commands that write may.
    let writes = matches!(cli.command, Command::Set { .. } | Command::Load { .. });
    if !writes {
        if let Some(path) = sqlite_path(db).filter(|p| *p != ":memory:") {
            if !std::path::Path::new(path).exists() {
                return Err(Failure(format!("no database file {path:?}")));
            }
        }
        if let Ok(names) = tables(db) {
            // SQLite compares table names ignoring ASCII case.
            let same = |n: &String| match sqlite_path(db) {
                Some(_) => n.eq_ignore_ascii_case(table),
                None => n == table,
            };
            if !names.iter().any(same) {
                return Err(Failure(format!(
                    "no table {table:?} with `key` and `value` columns in {}; `wth tables` \
                     lists those there are",
                    redacted(db)
                )));
            }
        }
    }
    let parse = |arg: &str| K::parse(arg).map_err(Failure);
    let mut out = BufWriter::new(std::io::stdout().lock());
    match &cli.command {
        Command::Tables => unreachable!("handled before"),
        Command::Count => writeln!(out, "{}", open::<K>(db, table)?.len())?,
        Command::Ls => {
            let h = open::<K>(db, table)?;
            let keys: BTreeMap<String, ()> = h.keys().map(|k| (K::show(k), ())).collect();
            for key in keys.keys() {
                writeln!(out, "{key}")?;
            }
        }
        Command::Get { key } => {
            let h = open::<K>(db, table)?;
            let k = parse(key)?;
            let k = K::equal_held(&h, &k).unwrap_or(k);
            match h.get(&k) {
                Some(v) => writeln!(out, "{}", K::show(v))?,
                None => return Err(Failure(format!("no key {key} in table {table:?}"))),
            }
        }
        Command::Set { key, value } => {
            let (k, v) = (parse(key)?, parse(value)?);
            let mut h = open::<K>(db, table)?;
            let k = K::equal_held(&h, &k).unwrap_or(k);
            h.insert(k, v)?;
        }
        Command::Rm { key } => {
            let k = parse(key)?;
            let mut h = open::<K>(db, table)?;
            let k = K::equal_held(&h, &k).unwrap_or(k);
            if h.remove(&k)?.is_none() {
                return Err(Failure(format!("no key {key} in table {table:?}")));
            }
        }
        Command::Clear => open::<K>(db, table)?.clear()?,
        Command::Dump { file } => {
            let h = open::<K>(db, table)?;
            let mut entries: Vec<(String, &K::T, &K::T)> =
                h.iter().map(|(k, v)| (K::to_json(k), k, v)).collect();
            entries.sort_by(|a, b| a.0.cmp(&b.0));
            let bar = progress(entries.len() as u64, "dump");
            let mut sink: Box<dyn Write> = match file {
                Some(path) => {
                    Box::new(BufWriter::new(File::create(path).map_err(|e| {
                        Failure(format!("cannot write {}: {e}", path.display()))
                    })?))
                }
                None => Box::new(&mut out),
            };
            // One line at a time: the JSON text of the whole table is never held.
            for (key, _, value) in &entries {
                writeln!(sink, "{{\"key\":{key},\"value\":{}}}", K::to_json(value))?;
                bar.inc(1);
            }
            sink.flush()?;
            bar.finish_and_clear();
        }
        Command::Load { file, replace } => {
            let (entries, lines) = read_lines::<K>(file.as_ref())?;
            // What only the database or the codec can refuse (a key too long for the
            // server, a NUL the server takes in no text), said with the line it is on.
            let culprit = |e: &write_thru_hash::Error| -> Option<usize> {
                if let write_thru_hash::Error::KeyTooLong { len, .. } = e {
                    return entries.iter().position(|(k, _)| K::bytes(k).len() == *len);
                }
                let Failure(said) = Failure::from_ref(e);
                (said.contains("0x00") || said.contains("NUL character")).then_some(())?;
                entries
                    .iter()
                    .position(|(k, v)| K::bytes(k).contains(&0) || K::bytes(v).contains(&0))
            };
            let bar = progress(entries.len() as u64, "load");
            let result = if *replace {
                let mut first = None;
                DbHashMap::builder_url(db)
                    .table(table)
                    .codec(K::codec())
                    .src(entries.iter().cloned())
                    .open()
                    .map(drop)
                    .inspect_err(|e| first = culprit(e))
                    .map_err(|e| (e, first))
            } else {
                let mut h = open::<K>(db, table)?;
                h.insert_many(entries.iter().cloned()).map_err(|e| {
                    let at = culprit(&e);
                    (e, at)
                })
            };
            bar.finish_and_clear();
            if let Err((e, at)) = result {
                let Failure(message) = Failure::from(e);
                return Err(Failure(match at {
                    Some(i) => format!("line {}: {message}; nothing was written", lines[i]),
                    None => format!("{message}; nothing was written"),
                }));
            }
        }
        Command::Copy { to, to_table } => {
            let h = open::<K>(db, table)?;
            let bar = progress(h.len() as u64, "copy");
            let entries: Vec<(K::T, K::T)> =
                h.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
            DbHashMap::builder_url(to)
                .table(to_table.as_deref().unwrap_or(table))
                .codec(K::codec())
                .src(entries)
                .open()?;
            bar.finish_and_clear();
        }
    }
    out.flush()?;
    Ok(())
}

/// One line of a dump: its members as the JSON text they are.
#[derive(serde::Deserialize)]
struct Line<'a> {
    #[serde(borrow)]
    key: Option<&'a serde_json::value::RawValue>,
    #[serde(borrow)]
    value: Option<&'a serde_json::value::RawValue>,
}

/// Reads `{"key": K, "value": V}` lines; the first bad one fails the whole load.
/// The entries of a load, and the line each came from.
type Lines<T> = (Vec<(T, T)>, Vec<usize>);

/// The entries, and the line each came from.
fn read_lines<K: Kind>(file: Option<&PathBuf>) -> Outcome<Lines<K::T>> {
    let mut input: Box<dyn BufRead> = match file {
        Some(path) => {
            Box::new(BufReader::new(File::open(path).map_err(|e| {
                Failure(format!("cannot read {}: {e}", path.display()))
            })?))
        }
        None => Box::new(BufReader::new(std::io::stdin().lock())),
    };
    let mut entries = Vec::new();
    let mut lines = Vec::new();
    let mut bytes = Vec::new();
    for n in 1.. {
        bytes.clear();
        if input.read_until(b'\n', &mut bytes)? == 0 {
            break;
        }
        let bad = |why: String| Failure(format!("line {n}: {why}; nothing was written"));
        let line = std::str::from_utf8(&bytes).map_err(|e| bad(format!("not UTF-8 ({e})")))?;
        if line.trim().is_empty() {
            continue;
        }
        let parsed: Line<'_> = serde_json::from_str(line).map_err(|e| {
            bad(format!(
                "not a JSON object {{\"key\": …, \"value\": …}} ({e})"
            ))
        })?;
        let key = parsed.key.ok_or_else(|| bad("no \"key\" member".into()))?;
        let value = parsed
            .value
            .ok_or_else(|| bad("no \"value\" member".into()))?;
        let key = K::from_raw(key.get()).map_err(|e| bad(format!("the key: {e}")))?;
        let value = K::from_raw(value.get()).map_err(|e| bad(format!("the value: {e}")))?;
        entries.push((key, value));
        lines.push(n);
    }
    Ok((entries, lines))
}

/// The file of a `sqlite:` URL.
fn sqlite_path(db: &str) -> Option<&str> {
    let (scheme, rest) = db.split_once(':')?;
    scheme
        .eq_ignore_ascii_case("sqlite")
        .then(|| rest.strip_prefix("//").unwrap_or(rest))
}

/// The tables of the database that have `key` and `value` columns.
fn tables(db: &str) -> Outcome<Vec<String>> {
    let fail = |e: &dyn std::fmt::Display| Failure(format!("listing the tables: {e}"));
    let (scheme, rest) = db.split_once(':').unwrap_or(("", db));
    match scheme.to_ascii_lowercase().as_str() {
        "sqlite" => {
            let path = sqlite_path(db).unwrap_or(rest);
            let conn = write_thru_hash::rusqlite::Connection::open(path).map_err(|e| fail(&e))?;
            let mut stmt = conn
                .prepare(
                    "SELECT m.name FROM sqlite_master m WHERE m.type = 'table' \
                     AND EXISTS (SELECT 1 FROM pragma_table_info(m.name) WHERE name = 'key') \
                     AND EXISTS (SELECT 1 FROM pragma_table_info(m.name) WHERE name = 'value') \
                     ORDER BY 1",
                )
                .map_err(|e| fail(&e))?;
            let names = stmt
                .query_map([], |r| r.get(0))
                .and_then(|rows| rows.collect::<Result<Vec<String>, _>>())
                .map_err(|e| fail(&e))?;
            Ok(names)
        }
        "postgres" | "postgresql" => {
            use write_thru_hash::postgres;
            let mut c = postgres::Client::connect(db, postgres::NoTls)
                .map_err(|e| connect_error("PostgreSQL", &e))?;
            let rows = c
                .query(
                    "SELECT table_name::text FROM information_schema.columns \
                     WHERE table_schema = current_schema() AND column_name IN ('key', 'value') \
                     GROUP BY table_name HAVING count(*) = 2 ORDER BY 1",
                    &[],
                )
                .map_err(|e| fail(&e))?;
            Ok(rows.iter().map(|r| r.get(0)).collect())
        }
        "mysql" | "mariadb" => {
            use write_thru_hash::mysql::{self, prelude::Queryable};
            let url = format!("mysql:{rest}");
            let opts = mysql::Opts::from_url(&url).map_err(|_| {
                Failure("the mysql driver does not accept the URL: check its syntax".into())
            })?;
            let mut c = mysql::Conn::new(opts).map_err(|e| connect_error("MySQL/MariaDB", &e))?;
            let names: Vec<String> = c
                .query(
                    "SELECT table_name FROM information_schema.columns \
                     WHERE table_schema = database() AND lower(column_name) IN ('key', 'value') \
                     GROUP BY table_name HAVING count(*) = 2 ORDER BY 1",
                )
                .map_err(|e| fail(&e))?;
            Ok(names)
        }
        _ => Err(Failure(
            "`tables` knows sqlite:, postgres:// and mysql:// URLs; over ODBC, use the \
             database's own tools"
                .into(),
        )),
    }
}

/// The database's URL as messages may show it: only its scheme and host part, never
/// the credentials.
fn redacted(db: &str) -> String {
    match db.split_once("://") {
        Some((scheme, rest)) => {
            let host = rest.rsplit_once('@').map_or(rest, |(_, host)| host);
            let host = host.split(['/', '?']).next().unwrap_or("");
            format!("{scheme}://{host}")
        }
        None => db.split(';').next().unwrap_or("").to_string(),
    }
}

/// A connection failure: the driver's words, without the URL (which may hold a
/// password).
fn connect_error(backend: &str, e: &dyn std::fmt::Display) -> Failure {
    Failure(format!(
        "connecting to the {backend} server failed: {e}; check that it is running and that \
         the URL's host, port, database, user and password are right"
    ))
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) if !e.use_stderr() => e.exit(), // --help, --version
        Err(e) => {
            // One line, as every other failure.
            let text = e.to_string();
            let first = text
                .lines()
                .next()
                .unwrap_or("")
                .trim_start_matches("error: ");
            eprintln!("wth: {first}; see wth --help");
            return ExitCode::from(2);
        }
    };
    let Some(db) = cli.db.clone() else {
        eprintln!("wth: no database: give --db URL, or set WTH_DB");
        return ExitCode::from(2);
    };
    let result = match (&cli.command, cli.codec) {
        (Command::Tables, _) => tables(&db).and_then(|names| {
            let mut out = std::io::stdout().lock();
            for name in names {
                writeln!(out, "{name}")?;
            }
            Ok(())
        }),
        (_, CodecName::Json) => run::<JsonKind>(&cli, &db),
        (_, CodecName::Text) => run::<TextKind>(&cli, &db),
        (_, CodecName::Bytes) => run::<BytesKind>(&cli, &db),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        // The reader went away (`wth dump | head`): nothing to say.
        Err(Failure(message)) if message == BROKEN_PIPE => ExitCode::SUCCESS,
        Err(Failure(message)) => {
            eprintln!("wth: {}", message.replace('\n', " "));
            ExitCode::FAILURE
        }
    }
}
