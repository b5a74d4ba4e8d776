//! Runs parsed statements against an engine and prints what the queries answer.

use std::io::Write;

use crate::engine::{Engine, Theory};
use crate::syntax::{Located, Statement};

/// Runs `program` in order. Each query prints its line (unless `answers_only`, which
/// prints just what Racket's datalog prints), its answers (one fact a line, sorted, as
/// Racket prints them) and a blank line.
pub(crate) fn run<T: Theory>(
    engine: &mut Engine<T>,
    program: &[Located],
    answers_only: bool,
    out: &mut impl Write,
) -> Result<(), String> {
    let at = |s: &Located, e: &dyn std::fmt::Display| {
        format!("line {}, column {}: {e}", s.line, s.column)
    };
    for s in program {
        match &s.statement {
            Statement::Assert(c) => engine.assert(c).map_err(|e| at(s, &e))?,
            Statement::Retract(c) => engine.retract(c).map_err(|e| at(s, &e))?,
            Statement::Query(q) => {
                let mut answers: Vec<String> = engine
                    .query(q)
                    .map_err(|e| at(s, &e))?
                    .iter()
                    .map(|a| format!("{a}."))
                    .collect();
                answers.sort();
                let mut text = if answers_only {
                    String::new()
                } else {
                    format!("{q}?\n")
                };
                for a in answers {
                    text.push_str(&a);
                    text.push('\n');
                }
                text.push('\n');
                out.write_all(text.as_bytes()).map_err(|e| at(s, &e))?;
            }
        }
    }
    Ok(())
}
