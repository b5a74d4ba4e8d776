//! `wth`: look into, export, import and copy the tables of write-thru-hash maps.
//!
//! Everything goes through the library (`DbHashMap`): the same codecs, canonical-key
//! checks, quoting and transactions as a program's map.

use std::fs::File;
use std::io::{BufRead, BufReader, BufWriter, IsTerminal, Write};
use std::path::PathBuf;
use std::process::ExitCode;

use base64::Engine as _;
use clap::{Parser, Subcommand, ValueEnum};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde_json::value::RawValue;
use serde_json::Value;
use write_thru_hash::{Batch, Codec, Format, Json, Puts, Store, TableSpec};

const EXAMPLES: &str = "\
Examples:
  wth --db sqlite:app.db set '\"alice\"' '{\"age\": 3}'
  wth --db sqlite:app.db get '\"alice\"'
  wth --db sqlite:app.db dump backup.jsonl
  wth --db sqlite:app.db --prefix t42/ dump t42.jsonl
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
    /// Work on the slice of the table whose keys start with PREFIX, as a program's map
    /// opened with `Builder::prefix` holds it: string keys that start with it (json and
    /// text codecs), or keys whose bytes start with the base64 PREFIX (bytes). Counts,
    /// lists, dumps, clears, loads and copies that slice only, read by a range of the
    /// key's index; a key outside it is refused.
    #[arg(long, global = true)]
    prefix: Option<String>,
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
            // A cause the message already tells (the server's report, which the
            // library's message quotes) is not repeated.
            let core = match cause.downcast_ref::<write_thru_hash::mysql::Error>() {
                Some(write_thru_hash::mysql::Error::MySqlError(e)) => e.message.clone(),
                _ => said.trim_start_matches("ERROR: ").to_string(),
            };
            let core = match cause.downcast_ref::<write_thru_hash::odbc_api::Error>() {
                Some(write_thru_hash::odbc_api::Error::Diagnostics { record, .. }) => {
                    write_thru_hash::odbc_api::handles::slice_to_cow_utf8(&record.message)
                        .trim_end()
                        .to_string()
                }
                _ => core,
            };
            if !text.contains(core.lines().next().unwrap_or(&core)) {
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

/// What differs between codecs: how stored bytes are read from the command line, shown,
/// written as JSON, and read from a dump line. Every command works on the stored bytes
/// through the library's store, so no command loads the table into a map.
trait Kind {
    /// The columns' format.
    const FORMAT: Format;
    /// From a command-line argument; refuses what the codec could not read back.
    fn parse(arg: &str) -> Result<Vec<u8>, String>;
    /// For `get` and `ls`; refuses stored bytes the codec does not read.
    fn show(stored: &[u8]) -> Result<String, String>;
    /// For `dump`: the JSON text of a key or value.
    fn to_json(stored: &[u8]) -> Result<String, String>;
    /// For `load`: from a member of a line, as its JSON text.
    fn from_raw(raw: &str) -> Result<Vec<u8>, String>;
    /// For `--prefix`: how the keys that start with it begin once stored.
    fn prefix(arg: &str) -> Result<Vec<u8>, String>;
    /// For `copy`: refuses stored bytes the codec does not read, without making text.
    fn check(stored: &[u8]) -> Result<(), String> {
        Self::to_json(stored).map(drop)
    }
    /// A key as the table writes keys of its shape, given one key the table holds (the
    /// json codec: object members in the table's order).
    fn in_table_order(key: Vec<u8>, _sample: &[u8]) -> Vec<u8> {
        key
    }
    /// A key as the library's codec writes it (the json codec: a string with the
    /// escapes serde_json writes, `"a/b"` for `"a\/b"`).
    fn canonical_key(key: Vec<u8>) -> Vec<u8> {
        key
    }
}

/// The json codec, kept as the JSON text it stores, with the whitespace between tokens
/// removed and nothing else changed: the order of members and the digits of numbers
/// stay as the program's codec wrote them (a struct's fields in declaration order, an
/// `u128` whole), so a dump and a load give the table back as it was.
struct JsonKind;
impl Kind for JsonKind {
    const FORMAT: Format = Format::Text;
    fn parse(arg: &str) -> Result<Vec<u8>, String> {
        // One level deeper, as a dump line holds it, so that every value set loads back.
        serde_json::from_str::<serde::de::IgnoredAny>(&format!("[{arg}]")).map_err(|e| {
            format!(
                "{arg:?} is not JSON text ({e}); with the json codec, quote strings: \
                 '\"{arg}\"'"
            )
        })?;
        Ok(minify(arg).into_bytes())
    }
    fn show(stored: &[u8]) -> Result<String, String> {
        Self::to_json(stored)
    }
    fn to_json(stored: &[u8]) -> Result<String, String> {
        let text = std::str::from_utf8(stored).map_err(|e| format!("not UTF-8 ({e})"))?;
        serde_json::from_str::<serde::de::IgnoredAny>(text).map_err(|e| {
            format!(
                "does not decode as JSON ({e}): {}; is it a table of another codec?",
                text.chars().take(60).collect::<String>()
            )
        })?;
        Ok(minify(text))
    }
    fn from_raw(raw: &str) -> Result<Vec<u8>, String> {
        Ok(minify(raw).into_bytes())
    }
    fn prefix(arg: &str) -> Result<Vec<u8>, String> {
        Codec::<String>::string_prefix(&Json, arg)
            .ok_or_else(|| format!("the prefix {arg:?} cannot be written as JSON"))
    }
    fn check(stored: &[u8]) -> Result<(), String> {
        serde_json::from_slice::<serde::de::IgnoredAny>(stored)
            .map(drop)
            .map_err(|e| format!("does not decode as JSON ({e}); is it a table of another codec?"))
    }
    fn canonical_key(key: Vec<u8>) -> Vec<u8> {
        // A program's map writes a string key as serde_json does; the same string typed
        // with other escapes would be another row, and outside a slice it is in.
        match serde_json::from_slice::<String>(&key) {
            Ok(text) => serde_json::to_vec(&text).unwrap_or(key),
            Err(_) => key,
        }
    }
    fn in_table_order(key: Vec<u8>, sample: &[u8]) -> Vec<u8> {
        match (std::str::from_utf8(&key), std::str::from_utf8(sample)) {
            (Ok(k), Ok(s)) => reorder(k, s).map_or(key, String::into_bytes),
            _ => key,
        }
    }
}

/// An object's members in the order the text has them, each as its JSON text.
struct Members<'a>(Vec<(String, &'a RawValue)>);

impl<'de> serde::Deserialize<'de> for Members<'de> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visit;
        impl<'de> serde::de::Visitor<'de> for Visit {
            type Value = Members<'de>;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<Self::Value, A::Error> {
                let mut members = Vec::new();
                while let Some(member) = map.next_entry::<String, &'de RawValue>()? {
                    members.push(member);
                }
                Ok(Members(members))
            }
        }
        d.deserialize_map(Visit)
    }
}

/// `key`'s object members put in the order `sample` has them, at every depth where both
/// are objects with the same member names; `None` when nothing is to be reordered.
fn reorder(key: &str, sample: &str) -> Option<String> {
    let (Ok(k), Ok(s)) = (
        serde_json::from_str::<Members<'_>>(key),
        serde_json::from_str::<Members<'_>>(sample),
    ) else {
        return None;
    };
    if k.0.len() != s.0.len() {
        return None;
    }
    let mut out = String::from("{");
    for (i, (name, model)) in s.0.iter().enumerate() {
        let (_, value) = k.0.iter().find(|(n, _)| n == name)?;
        if i > 0 {
            out.push(',');
        }
        out.push_str(&serde_json::to_string(name).ok()?);
        out.push(':');
        let value = value.get();
        out.push_str(&reorder(value, model.get()).unwrap_or_else(|| value.to_string()));
    }
    out.push('}');
    Some(out)
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
    const FORMAT: Format = Format::Text;
    fn parse(arg: &str) -> Result<Vec<u8>, String> {
        Ok(arg.as_bytes().to_vec())
    }
    fn show(stored: &[u8]) -> Result<String, String> {
        String::from_utf8(stored.to_vec()).map_err(|e| format!("not UTF-8 ({e})"))
    }
    fn to_json(stored: &[u8]) -> Result<String, String> {
        Ok(Value::String(Self::show(stored)?).to_string())
    }
    fn from_raw(raw: &str) -> Result<Vec<u8>, String> {
        serde_json::from_str::<String>(raw)
            .map(String::into_bytes)
            .map_err(|_| format!("{raw} is not a string, as the text codec needs"))
    }
    fn prefix(arg: &str) -> Result<Vec<u8>, String> {
        Ok(arg.as_bytes().to_vec())
    }
}

struct BytesKind;
impl Kind for BytesKind {
    const FORMAT: Format = Format::Binary;
    fn parse(arg: &str) -> Result<Vec<u8>, String> {
        base64::engine::general_purpose::STANDARD
            .decode(arg)
            .map_err(|e| format!("{arg:?} is not base64 ({e}), as the bytes codec takes it"))
    }
    fn show(stored: &[u8]) -> Result<String, String> {
        Ok(base64::engine::general_purpose::STANDARD.encode(stored))
    }
    fn to_json(stored: &[u8]) -> Result<String, String> {
        Ok(Value::String(Self::show(stored)?).to_string())
    }
    fn from_raw(raw: &str) -> Result<Vec<u8>, String> {
        let text: String = serde_json::from_str(raw)
            .map_err(|_| format!("{raw} is not a base64 string, as the bytes codec needs"))?;
        Self::parse(&text)
    }
    fn prefix(arg: &str) -> Result<Vec<u8>, String> {
        Self::parse(arg)
    }
}

/// The table's store (or its slice's), opened (and checked) without loading anything.
/// Its first row is read and checked: a table of another codec is refused at once.
fn open<K: Kind>(db: &str, spec: &TableSpec) -> Outcome<Box<dyn Store>> {
    let table = &spec.name;
    let mut store = write_thru_hash::connect(db)?;
    if spec.key_prefix.is_some() && !store.reads_slices() {
        return Err(Failure(format!(
            "--prefix: the {} store cannot read a slice of a table",
            store.backend()
        )));
    }
    store.open(spec)?;
    let mut first = None;
    let scanned = store.scan(None, Some(1), &mut |k, v| {
        first = Some((K::to_json(k).err(), K::to_json(v).err()));
        Ok(())
    });
    match scanned {
        Ok(()) | Err(write_thru_hash::Error::Unsupported { .. }) => {}
        Err(e) => return Err(e.into()),
    }
    if let Some((key, value)) = first {
        if let Some(why) = key.or(value) {
            return Err(Failure(format!(
                "table {table:?}: its first row {why}; is it a table of another codec?"
            )));
        }
    }
    Ok(store)
}

/// `key` as the table writes keys of its shape (see [`Kind::in_table_order`]), from
/// the first key the table holds, if any.
fn table_order<K: Kind>(store: &mut dyn Store, key: Vec<u8>) -> Outcome<Vec<u8>> {
    let mut sample = None;
    store
        .scan(None, Some(1), &mut |k, _| {
            sample = Some(k.to_vec());
            Ok(())
        })
        .or_else(|e| match e {
            // A store that cannot scan: keys are taken as typed.
            write_thru_hash::Error::Unsupported { .. } => Ok(()),
            e => Err(e),
        })?;
    Ok(match sample {
        Some(sample) => K::in_table_order(key, &sample),
        None => key,
    })
}

/// The stored value of `key`: one indexed read, or (a store that cannot) a scan.
fn get(store: &mut dyn Store, key: &[u8]) -> Outcome<Option<Vec<u8>>> {
    match store.get(key) {
        Err(write_thru_hash::Error::Unsupported { .. }) => {
            let mut found = None;
            store.load(&mut |k, v| {
                if k == key {
                    found = Some(v.to_vec());
                }
                Ok(())
            })?;
            Ok(found)
        }
        other => Ok(other?),
    }
}

/// Every row in key order: a scan, or (a store that cannot) the rows loaded and sorted,
/// which holds the table in memory.
fn each_row(store: &mut dyn Store, sink: &mut dyn FnMut(&[u8], &[u8]) -> Outcome) -> Outcome {
    let mut failed = None;
    let mut pass = |k: &[u8], v: &[u8]| -> write_thru_hash::Result<()> {
        sink(k, v).map_err(|e| {
            failed = Some(e);
            write_thru_hash::Error::abort("stopped")
        })
    };
    let result = match store.scan(None, None, &mut pass) {
        Err(write_thru_hash::Error::Unsupported { .. }) => {
            let mut rows = Vec::new();
            store.load(&mut |k, v| {
                rows.push((k.to_vec(), v.to_vec()));
                Ok(())
            })?;
            rows.sort();
            rows.iter().try_for_each(|(k, v)| pass(k, v))
        }
        other => other,
    };
    match (result, failed) {
        (_, Some(failure)) => Err(failure),
        (result, None) => Ok(result?),
    }
}

/// A progress bar on stderr when it is a terminal and the work is large; hidden
/// otherwise, so that pipes stay clean.
fn progress(len: u64, what: &str, unit: &str) -> ProgressBar {
    if len < 10_000 || !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::with_draw_target(Some(len), ProgressDrawTarget::stderr());
    let template = match unit {
        "bytes" => "{msg} {wide_bar} {bytes}/{total_bytes} ({eta})",
        _ => "{msg} {wide_bar} {pos}/{len} rows ({eta})",
    };
    if let Ok(style) = ProgressStyle::with_template(template) {
        bar.set_style(style);
    }
    bar.set_message(what.to_string());
    bar
}

/// Rows handed to the store at a time, when loading and copying.
const CHUNK: usize = 4096;

fn run<K: Kind>(cli: &Cli, db: &str) -> Outcome {
    let table = cli.table.as_str();
    let mut spec = TableSpec::new(table, K::FORMAT, K::FORMAT);
    if let Some(prefix) = &cli.prefix {
        let stored = K::prefix(prefix).map_err(|why| Failure(format!("--prefix: {why}")))?;
        spec = spec.with_key_prefix(stored);
    }
    let spec = &spec;
    // One-row commands on a slice: a key outside it is refused, as a map of the slice
    // refuses it.
    let inside = |key: &str, stored: &[u8]| {
        if spec.holds_key(stored) {
            Ok(())
        } else {
            Err(Failure(format!(
                "key {key} is outside the slice --prefix {:?} of table {table:?}",
                cli.prefix.as_deref().unwrap_or_default()
            )))
        }
    };
    // Opening a store makes its table when absent: only the commands that write may.
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
    let bad_row = |what: &str, key: &[u8], why: String| {
        Failure(format!(
            "table {table:?}: the {what} of row {} {why}",
            String::from_utf8_lossy(&key[..key.len().min(60)])
        ))
    };
    let mut out = BufWriter::new(std::io::stdout().lock());
    match &cli.command {
        Command::Tables => unreachable!("handled before"),
        Command::Count => writeln!(out, "{}", open::<K>(db, spec)?.count()?)?,
        Command::Ls => {
            let mut store = open::<K>(db, spec)?;
            each_row(&mut *store, &mut |k, _| {
                let shown = K::show(k).map_err(|why| bad_row("key", k, why))?;
                writeln!(out, "{shown}")?;
                Ok(())
            })?;
        }
        Command::Get { key } => {
            let k = K::canonical_key(parse(key)?);
            let mut store = open::<K>(db, spec)?;
            let k = table_order::<K>(&mut *store, k)?;
            inside(key, &k)?;
            match get(&mut *store, &k)? {
                Some(v) => {
                    let shown = K::show(&v).map_err(|why| bad_row("value", &k, why))?;
                    writeln!(out, "{shown}")?;
                }
                None => return Err(Failure(format!("no key {key} in table {table:?}"))),
            }
        }
        Command::Set { key, value } => {
            let (k, v) = (K::canonical_key(parse(key)?), parse(value)?);
            let mut store = open::<K>(db, spec)?;
            let k = table_order::<K>(&mut *store, k)?;
            inside(key, &k)?;
            let mut batch = Batch::default();
            batch.puts.push((k, v));
            store.apply(&batch)?;
        }
        Command::Rm { key } => {
            let k = K::canonical_key(parse(key)?);
            let mut store = open::<K>(db, spec)?;
            let k = table_order::<K>(&mut *store, k)?;
            inside(key, &k)?;
            if get(&mut *store, &k)?.is_none() {
                return Err(Failure(format!("no key {key} in table {table:?}")));
            }
            let mut batch = Batch::default();
            batch.deletes.push(k);
            store.apply(&batch)?;
        }
        Command::Clear => {
            let mut batch = Batch::default();
            batch.clear = true;
            open::<K>(db, spec)?.apply(&batch)?;
        }
        Command::Dump { file } => {
            let mut store = open::<K>(db, spec)?;
            let bar = progress(store.count()?, "dump", "rows");
            let mut sink: Box<dyn Write> = match file {
                Some(path) => Box::new(BufWriter::with_capacity(
                    1 << 16,
                    File::create(path)
                        .map_err(|e| Failure(format!("cannot write {}: {e}", path.display())))?,
                )),
                None => Box::new(&mut out),
            };
            // A row at a time, as the store reads them: nothing of the table is held.
            let mut n = 0u64;
            each_row(&mut *store, &mut |k, v| {
                let key = K::to_json(k).map_err(|why| bad_row("key", k, why))?;
                let value = K::to_json(v).map_err(|why| bad_row("value", k, why))?;
                writeln!(sink, "{{\"key\":{key},\"value\":{value}}}")?;
                n += 1;
                if n.is_multiple_of(1024) {
                    bar.set_position(n);
                }
                Ok(())
            })?;
            sink.flush()?;
            bar.finish_and_clear();
        }
        Command::Load { file, replace } => {
            let (input, size): (Box<dyn BufRead>, u64) = match file {
                Some(path) => {
                    let f = File::open(path)
                        .map_err(|e| Failure(format!("cannot read {}: {e}", path.display())))?;
                    let size = f.metadata().map_or(0, |m| m.len());
                    (Box::new(BufReader::with_capacity(1 << 16, f)), size)
                }
                None => (Box::new(BufReader::new(std::io::stdin().lock())), 0),
            };
            let mut store = open::<K>(db, spec)?;
            let sample = {
                let mut sample = None;
                if K::FORMAT == Format::Text {
                    let _ = store.scan(None, Some(1), &mut |k, _| {
                        sample = Some(k.to_vec());
                        Ok(())
                    });
                }
                sample
            };
            let bar = progress(size, "load", "bytes");
            let mut lines = Lines::<K>::new(input, sample, &*store, spec);
            let result = store.put_rows(*replace, false, &mut |_| {
                let chunk = lines.chunk();
                bar.set_position(lines.read);
                chunk
            });
            bar.finish_and_clear();
            if let Some(Failure(why)) = lines.failure.take() {
                return Err(Failure(format!("{why}; nothing was written")));
            }
            if let Err(e) = result {
                let Failure(message) = Failure::from(e);
                return Err(Failure(format!("{message}; nothing was written")));
            }
        }
        Command::Copy { to, to_table } => copy::<K>(db, spec, to, to_table.as_deref())?,
    }
    out.flush()?;
    Ok(())
}

/// `copy`: the source's rows in key order, checked, go chunk by chunk to the target,
/// which takes them in one transaction that replaces its content (with `--prefix`, the
/// slice's rows replace the same slice of the target). The source is read on a thread
/// of its own, a few chunks ahead of the writing.
fn copy<K: Kind>(db: &str, spec: &TableSpec, to: &str, to_table: Option<&str>) -> Outcome {
    let table = spec.name.as_str();
    let mut source = open::<K>(db, spec)?;
    let total = source.count()?;
    let mut target = write_thru_hash::connect(to)?;
    let mut target_spec = spec.clone();
    target_spec.name = to_table.unwrap_or(table).to_string();
    if target_spec.key_prefix.is_some() && !target.reads_slices() {
        return Err(Failure(format!(
            "--prefix: the {} store cannot replace a slice of a table",
            target.backend()
        )));
    }
    target.open(&target_spec)?;
    let bar = progress(total, "copy", "rows");
    let (send, chunks) = std::sync::mpsc::sync_channel::<Outcome<Puts>>(4);
    std::thread::scope(|s| {
        let reader = s.spawn(move || {
            let mut chunk = Vec::with_capacity(CHUNK);
            let sent = each_row(&mut *source, &mut |k, v| {
                K::check(k).map_err(|why| Failure(format!("table {table:?}: a key {why}")))?;
                K::check(v).map_err(|why| Failure(format!("table {table:?}: a value {why}")))?;
                chunk.push((k.to_vec(), v.to_vec()));
                if chunk.len() == CHUNK {
                    let full = std::mem::replace(&mut chunk, Vec::with_capacity(CHUNK));
                    // The writer gave up: its error is the one to tell.
                    send.send(Ok(full))
                        .map_err(|_| Failure("the target failed".into()))?;
                }
                Ok(())
            });
            let _ = match sent {
                Ok(()) if chunk.is_empty() => Ok(()),
                Ok(()) => send.send(Ok(chunk)),
                Err(e) => send.send(Err(e)),
            };
        });
        let mut failure = None;
        let mut copied = 0u64;
        let written = target.put_rows(true, true, &mut |_| match chunks.recv() {
            Ok(Ok(chunk)) => {
                copied += chunk.len() as u64;
                bar.set_position(copied);
                Some(Ok(chunk))
            }
            Ok(Err(e)) => {
                failure = Some(e);
                Some(Err(write_thru_hash::Error::abort(
                    "reading the source failed",
                )))
            }
            Err(_) => None,
        });
        drop(chunks);
        let _ = reader.join();
        bar.finish_and_clear();
        match (failure, written) {
            (Some(Failure(why)), _) => Err(Failure(format!("{why}; nothing was copied"))),
            (None, result) => Ok(result?),
        }
    })
}

/// The lines of a `load`, read as the store asks for rows: a chunk at a time, so the
/// input is never held whole. The first bad line stops the load (the store rolls back)
/// and is kept to be said.
struct Lines<K: Kind> {
    input: Box<dyn BufRead>,
    /// A key the table holds, for the order of object members.
    sample: Option<Vec<u8>>,
    line: usize,
    read: u64,
    bytes: Vec<u8>,
    failure: Option<Failure>,
    /// What the backend cannot take, said with the line rather than by the server
    /// after the fact: the longest key it indexes, and whether its text holds a NUL.
    max_key: Option<usize>,
    nul_in_text: bool,
    /// `--prefix`: the slice the keys must be in.
    slice: TableSpec,
    _kind: std::marker::PhantomData<K>,
}

impl<K: Kind> Lines<K> {
    fn new(
        input: Box<dyn BufRead>,
        sample: Option<Vec<u8>>,
        store: &dyn Store,
        slice: &TableSpec,
    ) -> Self {
        Lines {
            input,
            sample,
            line: 0,
            read: 0,
            bytes: Vec::new(),
            failure: None,
            max_key: store.max_key_len(),
            nul_in_text: store.backend() != "PostgreSQL",
            slice: slice.clone(),
            _kind: std::marker::PhantomData,
        }
    }

    /// The next chunk of rows, `None` at the end, or an error (the first bad line).
    fn chunk(&mut self) -> Option<write_thru_hash::Result<Puts>> {
        let mut chunk = Vec::with_capacity(CHUNK);
        while chunk.len() < CHUNK {
            match self.next_row() {
                Ok(Some(row)) => chunk.push(row),
                Ok(None) => break,
                Err(failure) => {
                    self.failure = Some(failure);
                    return Some(Err(write_thru_hash::Error::abort("a bad line")));
                }
            }
        }
        (!chunk.is_empty()).then_some(Ok(chunk))
    }

    fn next_row(&mut self) -> Outcome<Option<(Vec<u8>, Vec<u8>)>> {
        loop {
            self.bytes.clear();
            let n = self.input.read_until(b'\n', &mut self.bytes)?;
            if n == 0 {
                return Ok(None);
            }
            self.read += n as u64;
            self.line += 1;
            let at = self.line;
            let bad = |why: String| Failure(format!("line {at}: {why}"));
            let line =
                std::str::from_utf8(&self.bytes).map_err(|e| bad(format!("not UTF-8 ({e})")))?;
            if line.trim().is_empty() {
                continue;
            }
            let shape = "not a JSON object {\"key\": …, \"value\": …}";
            // serde would take `[K, V]` for the two members: lines are objects.
            if !line.trim_start().starts_with('{') {
                return Err(bad(shape.into()));
            }
            let parsed: Line<'_> =
                serde_json::from_str(line).map_err(|e| bad(format!("{shape} ({e})")))?;
            let key = parsed.key.ok_or_else(|| bad("no \"key\" member".into()))?;
            let value = parsed
                .value
                .ok_or_else(|| bad("no \"value\" member".into()))?;
            let key = K::from_raw(key.get()).map_err(|e| bad(format!("the key: {e}")))?;
            let key = K::canonical_key(key);
            let value = K::from_raw(value.get()).map_err(|e| bad(format!("the value: {e}")))?;
            let key = match &self.sample {
                Some(sample) => K::in_table_order(key, sample),
                None => key,
            };
            if !self.slice.holds_key(&key) {
                return Err(bad(
                    "the key is outside the slice that --prefix names".into()
                ));
            }
            if let Some(max) = self.max_key.filter(|max| key.len() > *max) {
                return Err(bad(format!(
                    "the key is too long: {} bytes, and the backend indexes at most {max}",
                    key.len()
                )));
            }
            if !self.nul_in_text
                && K::FORMAT == Format::Text
                && (key.contains(&0) || value.contains(&0))
            {
                return Err(bad(
                    "a NUL character, which PostgreSQL text cannot hold".into()
                ));
            }
            return Ok(Some((key, value)));
        }
    }
}

/// One line of a dump: its members as the JSON text they are.
#[derive(serde::Deserialize)]
struct Line<'a> {
    #[serde(borrow)]
    key: Option<&'a RawValue>,
    #[serde(borrow)]
    value: Option<&'a RawValue>,
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
            // Read-only: listing makes no file where there is none.
            let conn = write_thru_hash::rusqlite::Connection::open_with_flags(
                path,
                write_thru_hash::rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
            )
            .map_err(|e| match std::path::Path::new(path).exists() {
                false => Failure(format!("no database file {path:?}")),
                true => fail(&e),
            })?;
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
            // The library's connection first: its messages say what is wrong with the
            // URL or the server (the driver says "db error" for a wrong password).
            write_thru_hash::connect(db)?;
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
            write_thru_hash::connect(db)?;
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
