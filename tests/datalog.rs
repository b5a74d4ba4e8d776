//! The Datalog example against Racket's own answers: every program in `tests/datalog/`
//! gives the answers of its `.expected` file (each query's answers as a set), run as
//! real processes of the example binary on SQLite and, with the feature, PostgreSQL.

#[path = "../examples/datalog/engine.rs"]
#[allow(dead_code)]
mod engine;
#[path = "../examples/datalog/run.rs"]
mod run;
#[path = "../examples/datalog/syntax.rs"]
#[allow(dead_code)]
mod syntax;

#[cfg(feature = "postgres")]
#[path = "conformance/env.rs"]
#[allow(dead_code, unused_imports)]
mod env;

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::process::Command;

use write_thru_hash::DbHashMap;

/// Each query's line and its set of answers.
type Answers = Vec<(String, BTreeSet<String>)>;

fn parse_answers(text: &str) -> Answers {
    let mut out: Answers = Vec::new();
    let mut current: Option<(String, BTreeSet<String>)> = None;
    for line in text.lines() {
        match current.as_mut() {
            None if line.is_empty() => {}
            None => current = Some((line.to_string(), BTreeSet::new())),
            Some(_) if line.is_empty() => out.extend(current.take()),
            Some((_, answers)) => {
                answers.insert(line.to_string());
            }
        }
    }
    out.extend(current);
    out
}

fn data(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/datalog")
        .join(name)
}

/// The example binary that `cargo test` builds next to this test.
fn datalog_bin() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let dir = exe.parent().unwrap().parent().unwrap();
    let bin = dir.join("examples").join("datalog");
    assert!(
        bin.exists(),
        "{} is missing: run the tests with cargo test, which builds examples",
        bin.display()
    );
    bin
}

fn run_process(db: &str, files: &[&str]) -> String {
    let out = Command::new(datalog_bin())
        .arg("--db")
        .arg(db)
        .args(files.iter().map(|f| data(f)))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "datalog failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn expected(name: &str) -> Answers {
    parse_answers(&std::fs::read_to_string(data(name)).unwrap())
}

fn check_all_programs(db_for: impl Fn(&str) -> String) {
    for name in ["family", "graph", "terms"] {
        let got = parse_answers(&run_process(&db_for(name), &[&format!("{name}.dl")]));
        assert_eq!(got, expected(&format!("{name}.expected")), "{name}.dl");
    }
    // Two processes, one database: the second sees what the first persisted.
    let db = db_for("two-processes");
    assert_eq!(run_process(&db, &["family-1-assert.dl"]), "");
    let got = parse_answers(&run_process(&db, &["family-2-query.dl"]));
    assert_eq!(got, expected("family-2-query.expected"));
}

#[test]
fn sqlite_programs_give_rackets_answers() {
    let dir = tempfile::tempdir().unwrap();
    check_all_programs(|name| {
        format!(
            "sqlite:{}",
            dir.path().join(format!("{name}.sqlite")).display()
        )
    });
}

#[cfg(feature = "postgres")]
#[test]
fn postgres_programs_give_rackets_answers() {
    use env::Env;
    let envs: std::cell::RefCell<Vec<env::PgEnv>> = Default::default();
    check_all_programs(|_| {
        let e = env::PgEnv::new();
        let url = e.url();
        envs.borrow_mut().push(e);
        url
    });
}

/// The same engine code on a plain `HashMap`: the answers do not depend on where the
/// theory lives (the Racket original's hash impersonator, done with a trait).
#[test]
fn sqlite_and_plain_hashmap_engines_agree() {
    for name in ["family", "graph", "terms"] {
        let program =
            syntax::parse(&std::fs::read_to_string(data(&format!("{name}.dl"))).unwrap()).unwrap();
        let mut plain = engine::Engine::new(HashMap::<String, u64>::new());
        let mut out_plain = Vec::new();
        run::run(&mut plain, &program, false, &mut out_plain).unwrap();
        let db: DbHashMap<String, u64> = DbHashMap::open_url("sqlite::memory:").unwrap();
        let mut persisted = engine::Engine::new(db);
        let mut out_db = Vec::new();
        run::run(&mut persisted, &program, false, &mut out_db).unwrap();
        assert_eq!(out_plain, out_db, "{name}");
        let got = parse_answers(&String::from_utf8(out_db).unwrap());
        assert_eq!(got, expected(&format!("{name}.expected")));
    }
}

/// One clause, one row: asserting and retracting write a row each, never the theory.
#[test]
fn sqlite_one_row_per_clause() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("rows.sqlite");
    let db = format!("sqlite:{}", path.display());
    run_process(&db, &["family-1-assert.dl"]);
    let conn = rusqlite::Connection::open(&path).unwrap();
    let rows = |c: &rusqlite::Connection| -> i64 {
        c.query_row("SELECT count(*) FROM datalog", [], |r| r.get(0))
            .unwrap()
    };
    // 13 facts and 11 rules.
    assert_eq!(rows(&conn), 24);
    let theory: DbHashMap<String, u64> =
        DbHashMap::builder_url(&db).table("datalog").open().unwrap();
    let mut e = engine::Engine::new(theory);
    let fact = syntax::parse_clause("parent(bart, lisa_jr)").unwrap();
    e.assert(&fact).unwrap();
    assert_eq!(rows(&conn), 25);
    e.retract(&fact).unwrap();
    let rule = syntax::parse_clause("sibling(P, Q) :- parent(R, P), parent(R, Q), P != Q").unwrap();
    e.retract(&rule).unwrap(); // equal to the stored rule up to variable names
    assert_eq!(rows(&conn), 23);
    let stored: String = conn
        .query_row(
            "SELECT key FROM datalog WHERE key LIKE '%father(%' ORDER BY key LIMIT 1",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert!(
        stored.contains(":-"),
        "rules are stored as readable text: {stored}"
    );
}

#[test]
fn sqlite_syntax_error_names_line_and_column_and_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("err.sqlite");
    let db = format!("sqlite:{}", path.display());
    let bad = dir.path().join("bad.dl");
    std::fs::write(&bad, "good(a).\nalso(b).\nbroken(c d).\n").unwrap();
    let out = Command::new(datalog_bin())
        .arg("--db")
        .arg(&db)
        .arg(&bad)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("line 3, column 10"), "{err}");
    let theory: DbHashMap<String, u64> =
        DbHashMap::builder_url(&db).table("datalog").open().unwrap();
    assert!(theory.is_empty(), "nothing of the file ran: {theory:?}");
}

#[test]
fn sqlite_reads_standard_input_and_odd_strings() {
    use std::io::Write;
    let dir = tempfile::tempdir().unwrap();
    let db = format!("sqlite:{}", dir.path().join("stdin.sqlite").display());
    let mut child = Command::new(datalog_bin())
        .arg("--db")
        .arg(&db)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all("says(o_brien, \"it's, \\\"quoted\\\" — ünïcödé\"). says(X, Y)?\n".as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(
        text.contains("says(o_brien, \"it's, \\\"quoted\\\" — ünïcödé\")."),
        "{text}"
    );
}

#[test]
fn long_chains_terminate() {
    let mut program = String::new();
    for i in 0..60 {
        program.push_str(&format!("edge(n{i}, n{}).\n", i + 1));
    }
    program.push_str("edge(n60, n0).\npath(X, Y) :- edge(X, Y).\npath(X, Y) :- edge(X, Z), path(Z, Y).\npath(n0, X)?\n");
    let parsed = syntax::parse(&program).unwrap();
    let mut e = engine::Engine::new(HashMap::<String, u64>::new());
    let mut out = Vec::new();
    run::run(&mut e, &parsed, false, &mut out).unwrap();
    let answers = parse_answers(&String::from_utf8(out).unwrap());
    assert_eq!(answers[0].1.len(), 61);
}

#[test]
fn sqlite_answers_only_prints_what_racket_prints() {
    let dir = tempfile::tempdir().unwrap();
    let db = format!("sqlite:{}", dir.path().join("a.sqlite").display());
    let out = Command::new(datalog_bin())
        .args(["--answers-only", "--db", &db])
        .arg(data("graph.dl"))
        .output()
        .unwrap();
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(!text.contains('?'), "{text}");
    let expected: Vec<String> = expected("graph.expected")
        .into_iter()
        .map(|(_, answers)| answers.into_iter().collect::<Vec<_>>().join("\n"))
        .collect();
    let got: Vec<&str> = text.split("\n\n").map(str::trim_end).collect();
    assert_eq!(got[..expected.len()], expected[..], "{text}");
}
