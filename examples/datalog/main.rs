//! Persistent Datalog: the Racket original's motivating example. The theory lives in a
//! `DbHashMap`, so every assertion and retraction is one row written as it happens.
//!
//! ```text
//! cargo run -p write-thru-hash --example datalog -- examples/family.dl          # assert and query
//! echo 'sister(X, bart)?' | cargo run -p write-thru-hash --example datalog      # a new process asks again
//! cargo run -p write-thru-hash --example datalog -- --db sqlite:other.db --table theory FILE...
//! ```
//!
//! Each query prints its line, then its answers one fact a line, then a blank line;
//! `--answers-only` leaves out the query's line, as Racket's datalog does.

mod engine;
mod run;
mod syntax;

use std::io::Read;
use std::process::ExitCode;

use clap::Parser;
use write_thru_hash::DbHashMap;

/// Runs Datalog programs (Racket's `#lang datalog` syntax) against a theory kept in
/// a database table.
#[derive(Parser)]
struct Args {
    /// Database URL: sqlite:PATH, sqlite::memory:, postgres://…, mysql://…
    #[arg(long, default_value = "sqlite:datalog.sqlite")]
    db: String,
    /// Table that holds the theory, one clause a row.
    #[arg(long, default_value = "datalog")]
    table: String,
    /// Print only the answers, as Racket's datalog does, without each query's line.
    #[arg(long)]
    answers_only: bool,
    /// Program files, run in order; standard input when none.
    files: Vec<std::path::PathBuf>,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let mut sources = Vec::new();
    if args.files.is_empty() {
        let mut text = String::new();
        if let Err(e) = std::io::stdin().read_to_string(&mut text) {
            eprintln!("datalog: reading standard input: {e}");
            return ExitCode::from(2);
        }
        sources.push(("<stdin>".to_string(), text));
    }
    for f in &args.files {
        match std::fs::read_to_string(f) {
            Ok(text) => sources.push((f.display().to_string(), text)),
            Err(e) => {
                eprintln!("datalog: {}: {e}", f.display());
                return ExitCode::from(2);
            }
        }
    }
    // Every file is parsed before anything runs: a syntax error changes nothing.
    let mut programs = Vec::new();
    for (name, text) in &sources {
        match syntax::parse(text) {
            Ok(p) => programs.push((name.as_str(), p)),
            Err(e) => {
                eprintln!("datalog: {name}: {e}");
                return ExitCode::from(2);
            }
        }
    }
    let theory: DbHashMap<String, u64> =
        match DbHashMap::builder_url(&args.db).table(&args.table).open() {
            Ok(t) => t,
            Err(e) => {
                eprintln!("datalog: {e}");
                return ExitCode::from(1);
            }
        };
    let mut engine = engine::Engine::new(theory);
    let mut out = std::io::stdout().lock();
    for (name, program) in programs {
        if let Err(e) = run::run(&mut engine, &program, args.answers_only, &mut out) {
            eprintln!("datalog: {name}: {e}");
            return ExitCode::from(1);
        }
    }
    ExitCode::SUCCESS
}
