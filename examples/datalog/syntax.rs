//! The text syntax of Racket's `#lang datalog`: terms, literals, clauses and the three
//! kinds of statement (`clause.` asserts, `clause~` retracts, `literal?` queries).

use std::collections::HashMap;
use std::fmt;

/// A term: a variable (a capital letter first), a symbol (an identifier or a
/// number), or a double-quoted string.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) enum Term {
    Var(String),
    Sym(String),
    Str(String),
}

/// A literal: `pred(t, …)`, `pred`, `t = t` or `t != t`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) enum Literal {
    Atom { pred: String, args: Vec<Term> },
    Eq(Term, Term),
    Neq(Term, Term),
}

/// `head.` or `head :- body, ….`
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) struct Clause {
    pub(crate) head: Literal,
    pub(crate) body: Vec<Literal>,
}

#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Statement {
    Assert(Clause),
    Retract(Clause),
    Query(Literal),
}

/// A statement and where it starts, for messages.
#[derive(Debug, Clone)]
pub(crate) struct Located {
    pub(crate) line: usize,
    pub(crate) column: usize,
    pub(crate) statement: Statement,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct SyntaxError {
    pub(crate) line: usize,
    pub(crate) column: usize,
    pub(crate) message: String,
}

impl fmt::Display for SyntaxError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "line {}, column {}: {}",
            self.line, self.column, self.message
        )
    }
}

impl std::error::Error for SyntaxError {}

impl fmt::Display for Term {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Term::Var(s) | Term::Sym(s) => f.write_str(s),
            Term::Str(s) => {
                f.write_str("\"")?;
                for c in s.chars() {
                    match c {
                        '"' => f.write_str("\\\"")?,
                        '\\' => f.write_str("\\\\")?,
                        '\n' => f.write_str("\\n")?,
                        '\t' => f.write_str("\\t")?,
                        '\r' => f.write_str("\\r")?,
                        c => write!(f, "{c}")?,
                    }
                }
                f.write_str("\"")
            }
        }
    }
}

impl fmt::Display for Literal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Literal::Atom { pred, args } if args.is_empty() => f.write_str(pred),
            Literal::Atom { pred, args } => {
                write!(f, "{pred}(")?;
                for (i, a) in args.iter().enumerate() {
                    if i > 0 {
                        f.write_str(", ")?;
                    }
                    write!(f, "{a}")?;
                }
                f.write_str(")")
            }
            Literal::Eq(a, b) => write!(f, "{a} = {b}"),
            Literal::Neq(a, b) => write!(f, "{a} != {b}"),
        }
    }
}

impl fmt::Display for Clause {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.head)?;
        for (i, l) in self.body.iter().enumerate() {
            f.write_str(if i == 0 { " :- " } else { ", " })?;
            write!(f, "{l}")?;
        }
        Ok(())
    }
}

impl Literal {
    pub(crate) fn terms(&self) -> Vec<&Term> {
        match self {
            Literal::Atom { args, .. } => args.iter().collect(),
            Literal::Eq(a, b) | Literal::Neq(a, b) => vec![a, b],
        }
    }

    fn map_terms(&self, f: &mut impl FnMut(&Term) -> Term) -> Literal {
        match self {
            Literal::Atom { pred, args } => Literal::Atom {
                pred: pred.clone(),
                args: args.iter().map(&mut *f).collect(),
            },
            Literal::Eq(a, b) => Literal::Eq(f(a), f(b)),
            Literal::Neq(a, b) => Literal::Neq(f(a), f(b)),
        }
    }
}

impl Clause {
    /// The clause with its variables renamed `A`, `B`, … in order of first appearance,
    /// so that clauses equal up to renaming have one text, and so one row.
    pub(crate) fn canonical(&self) -> Clause {
        let mut names: HashMap<String, String> = HashMap::new();
        let mut rename = |t: &Term| match t {
            Term::Var(v) => {
                let n = names.len();
                let name = names.entry(v.clone()).or_insert_with(|| var_name(n));
                Term::Var(name.clone())
            }
            other => other.clone(),
        };
        let head = self.head.map_terms(&mut rename);
        let body = self.body.iter().map(|l| l.map_terms(&mut rename)).collect();
        Clause { head, body }
    }

    /// Every variable of the head and of `!=` must be bound by a positive literal
    /// of the body (or by `=` to something bound), or answers would be infinite.
    fn check_safe(&self) -> Result<(), String> {
        let mut bound: Vec<&str> = Vec::new();
        for l in &self.body {
            if let Literal::Atom { args, .. } = l {
                bound.extend(args.iter().filter_map(var));
            }
        }
        loop {
            let before = bound.len();
            for l in &self.body {
                if let Literal::Eq(a, b) = l {
                    for (x, y) in [(a, b), (b, a)] {
                        let x_bound = var(x).is_none_or(|v| bound.contains(&v));
                        if let (true, Some(v)) = (x_bound, var(y)) {
                            if !bound.contains(&v) {
                                bound.push(v);
                            }
                        }
                    }
                }
            }
            if bound.len() == before {
                break;
            }
        }
        let mut must: Vec<&Term> = self.head.terms();
        for l in &self.body {
            if !matches!(l, Literal::Atom { .. }) {
                must.extend(l.terms());
            }
        }
        for v in must.into_iter().filter_map(var) {
            if !bound.contains(&v) {
                return Err(format!(
                    "unsafe clause `{self}`: variable {v} is not bound by any literal of its body"
                ));
            }
        }
        Ok(())
    }
}

fn var(t: &Term) -> Option<&str> {
    match t {
        Term::Var(v) => Some(v),
        _ => None,
    }
}

fn var_name(n: usize) -> String {
    let letter = (b'A' + (n % 26) as u8) as char;
    if n < 26 {
        letter.to_string()
    } else {
        format!("{letter}{}", n / 26)
    }
}

#[derive(Debug, Clone, PartialEq)]
enum Tok {
    Ident(String),
    Var(String),
    Str(String),
    Open,
    Close,
    Comma,
    Dot,
    Tilde,
    Question,
    Implies,
    Eq,
    Neq,
}

impl fmt::Display for Tok {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Tok::Ident(s) | Tok::Var(s) => write!(f, "`{s}`"),
            Tok::Str(s) => write!(f, "string {s:?}"),
            Tok::Open => f.write_str("`(`"),
            Tok::Close => f.write_str("`)`"),
            Tok::Comma => f.write_str("`,`"),
            Tok::Dot => f.write_str("`.`"),
            Tok::Tilde => f.write_str("`~`"),
            Tok::Question => f.write_str("`?`"),
            Tok::Implies => f.write_str("`:-`"),
            Tok::Eq => f.write_str("`=`"),
            Tok::Neq => f.write_str("`!=`"),
        }
    }
}

/// Racket's datalog: an identifier holds any printing character but the punctuation
/// `( , ) = : . ~ ? " %`; `!` too, except where it starts `!=`.
fn is_ident_char(c: char) -> bool {
    !c.is_whitespace() && !"(),=:.~?\"%".contains(c)
}

/// A variable starts with a capital letter and holds only letters, digits and `_`.
fn is_variable(s: &str) -> bool {
    s.starts_with(|c: char| c.is_uppercase()) && s.chars().all(|c| c.is_alphanumeric() || c == '_')
}

struct Lexer<'a> {
    chars: std::iter::Peekable<std::str::Chars<'a>>,
    line: usize,
    column: usize,
}

impl Lexer<'_> {
    fn bump(&mut self) -> Option<char> {
        let c = self.chars.next()?;
        if c == '\n' {
            self.line += 1;
            self.column = 1;
        } else {
            self.column += 1;
        }
        Some(c)
    }

    fn error(&self, line: usize, column: usize, message: impl Into<String>) -> SyntaxError {
        SyntaxError {
            line,
            column,
            message: message.into(),
        }
    }

    fn tokens(mut self) -> Result<Vec<(usize, usize, Tok)>, SyntaxError> {
        let mut out = Vec::new();
        while let Some(&c) = self.chars.peek() {
            let (line, column) = (self.line, self.column);
            if c.is_whitespace() {
                self.bump();
                continue;
            }
            if c == '%' {
                while self.chars.peek().is_some_and(|&c| c != '\n') {
                    self.bump();
                }
                continue;
            }
            self.bump();
            let tok = match c {
                '(' => Tok::Open,
                ')' => Tok::Close,
                ',' => Tok::Comma,
                '.' => Tok::Dot,
                '~' => Tok::Tilde,
                '?' => Tok::Question,
                '=' => Tok::Eq,
                '!' if self.chars.peek() == Some(&'=') => {
                    self.bump();
                    Tok::Neq
                }
                ':' if self.chars.peek() == Some(&'-') => {
                    self.bump();
                    Tok::Implies
                }
                '"' => {
                    let mut s = String::new();
                    loop {
                        match self.bump() {
                            None => return Err(self.error(line, column, "unterminated string")),
                            Some('"') => break,
                            Some('\\') => match self.bump() {
                                Some('n') => s.push('\n'),
                                Some('t') => s.push('\t'),
                                Some('r') => s.push('\r'),
                                Some('a') => s.push('\u{7}'),
                                Some('b') => s.push('\u{8}'),
                                Some('f') => s.push('\u{c}'),
                                Some('v') => s.push('\u{b}'),
                                Some('\n') => {} // a line continued
                                Some(c @ ('"' | '\\' | '\'' | '?')) => s.push(c),
                                Some(h) if h.is_ascii_hexdigit() => {
                                    let l = self.bump().filter(char::is_ascii_hexdigit);
                                    let Some(l) = l else {
                                        return Err(self.error(
                                            self.line,
                                            self.column - 1,
                                            "a numeric escape takes exactly two hex digits",
                                        ));
                                    };
                                    let code =
                                        u8::from_str_radix(&format!("{h}{l}"), 16).unwrap_or(0);
                                    s.push(char::from(code));
                                }
                                Some(c) => {
                                    return Err(self.error(
                                        self.line,
                                        self.column - 1,
                                        format!("unknown escape `\\{c}` in a string"),
                                    ))
                                }
                                None => {
                                    return Err(self.error(line, column, "unterminated string"))
                                }
                            },
                            Some(c) => s.push(c),
                        }
                    }
                    Tok::Str(s)
                }
                c if is_ident_char(c) => {
                    let mut s = c.to_string();
                    while let Some(&c) = self.chars.peek().filter(|c| is_ident_char(**c)) {
                        if c == '!' && self.chars.clone().nth(1) == Some('=') {
                            break;
                        }
                        s.push(c);
                        self.bump();
                    }
                    if is_variable(&s) {
                        Tok::Var(s)
                    } else {
                        Tok::Ident(s)
                    }
                }
                c => return Err(self.error(line, column, format!("unexpected character `{c}`"))),
            };
            out.push((line, column, tok));
        }
        Ok(out)
    }
}

struct Parser {
    toks: Vec<(usize, usize, Tok)>,
    pos: usize,
    end: (usize, usize),
}

impl Parser {
    fn peek(&self) -> Option<&Tok> {
        self.toks.get(self.pos).map(|(_, _, t)| t)
    }

    fn here(&self) -> (usize, usize) {
        self.toks
            .get(self.pos)
            .map_or(self.end, |(l, c, _)| (*l, *c))
    }

    fn error(&self, expected: &str) -> SyntaxError {
        let (line, column) = self.here();
        let found = self
            .peek()
            .map_or("the end of the input".to_string(), |t| t.to_string());
        SyntaxError {
            line,
            column,
            message: format!("expected {expected}, found {found}"),
        }
    }

    fn next(&mut self) -> Option<Tok> {
        let t = self.toks.get(self.pos).map(|(_, _, t)| t.clone());
        self.pos += 1;
        t
    }

    fn eat(&mut self, tok: &Tok) -> bool {
        if self.peek() == Some(tok) {
            self.pos += 1;
            true
        } else {
            false
        }
    }

    fn term(&mut self) -> Result<Term, SyntaxError> {
        match self.peek() {
            Some(Tok::Var(_) | Tok::Ident(_) | Tok::Str(_)) => Ok(match self.next() {
                Some(Tok::Var(v)) => Term::Var(v),
                Some(Tok::Ident(s)) => Term::Sym(s),
                Some(Tok::Str(s)) => Term::Str(s),
                _ => unreachable!("peeked a term"),
            }),
            _ => Err(self.error("a term (a variable, an identifier or a string)")),
        }
    }

    fn literal(&mut self) -> Result<Literal, SyntaxError> {
        let first = match self.peek() {
            Some(Tok::Ident(_))
                if !matches!(
                    self.toks.get(self.pos + 1),
                    Some((_, _, Tok::Eq | Tok::Neq))
                ) =>
            {
                let Some(Tok::Ident(pred)) = self.next() else {
                    unreachable!("peeked an identifier")
                };
                let mut args = Vec::new();
                if self.eat(&Tok::Open) && !self.eat(&Tok::Close) {
                    loop {
                        args.push(self.term()?);
                        if self.eat(&Tok::Close) {
                            break;
                        }
                        if !self.eat(&Tok::Comma) {
                            return Err(self.error("`,` or `)`"));
                        }
                    }
                }
                return Ok(Literal::Atom { pred, args });
            }
            _ => self.term()?,
        };
        if self.eat(&Tok::Eq) {
            Ok(Literal::Eq(first, self.term()?))
        } else if self.eat(&Tok::Neq) {
            Ok(Literal::Neq(first, self.term()?))
        } else {
            Err(self.error("`=` or `!=` after a term that starts a literal"))
        }
    }

    fn statement(&mut self) -> Result<Located, SyntaxError> {
        let (line, column) = self.here();
        let head = self.literal()?;
        let mut body = Vec::new();
        if self.eat(&Tok::Implies) {
            loop {
                body.push(self.literal()?);
                if !self.eat(&Tok::Comma) {
                    break;
                }
            }
        }
        let is_atom = matches!(head, Literal::Atom { .. });
        let statement = match self.peek() {
            Some(Tok::Question) if body.is_empty() => Statement::Query(head),
            Some(Tok::Dot | Tok::Tilde) if is_atom => {
                let clause = Clause { head, body };
                clause.check_safe().map_err(|message| SyntaxError {
                    line,
                    column,
                    message,
                })?;
                if self.peek() == Some(&Tok::Dot) {
                    Statement::Assert(clause)
                } else {
                    Statement::Retract(clause)
                }
            }
            Some(Tok::Dot | Tok::Tilde) => {
                return Err(SyntaxError {
                    line,
                    column,
                    message: "the head of a clause must be a predicate, not `=` or `!=`".into(),
                })
            }
            _ if body.is_empty() => return Err(self.error("`.`, `~`, `?`, `:-` or `,`")),
            _ => return Err(self.error("`.`, `~` or `,`")),
        };
        self.pos += 1;
        Ok(Located {
            line,
            column,
            statement,
        })
    }
}

/// Parses a whole program; the first syntax error stops it, before anything runs.
pub(crate) fn parse(text: &str) -> Result<Vec<Located>, SyntaxError> {
    let lexer = Lexer {
        chars: text.chars().peekable(),
        line: 1,
        column: 1,
    };
    let toks = lexer.tokens()?;
    let end = text.lines().count().max(1);
    let end_col = text.lines().last().map_or(1, |l| l.chars().count() + 1);
    let mut p = Parser {
        toks,
        pos: 0,
        end: (end, end_col),
    };
    let mut out = Vec::new();
    while p.peek().is_some() {
        out.push(p.statement()?);
    }
    Ok(out)
}

/// Parses one clause as stored in the theory table.
pub(crate) fn parse_clause(text: &str) -> Result<Clause, SyntaxError> {
    match parse(&format!("{text}."))?.pop().map(|l| l.statement) {
        Some(Statement::Assert(c)) => Ok(c),
        _ => Err(SyntaxError {
            line: 1,
            column: 1,
            message: format!("not a clause: {text}"),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_form() {
        let p = parse(
            "% comment\nparent(abe, homer). sib(X,Y) :- parent(Z, X), parent(Z, Y), X != Y.\n\
             name(p2, \"Bob, Jr.\"). ready. ready? path(a, X)? edge(d, a)~ q :- X = a, r(X).",
        )
        .unwrap();
        assert_eq!(p.len(), 8);
        assert!(
            matches!(&p[4].statement, Statement::Query(Literal::Atom { pred, .. }) if pred == "ready")
        );
        assert!(matches!(&p[6].statement, Statement::Retract(_)));
        assert_eq!(p[1].line, 2);
    }

    #[test]
    fn prints_as_racket_does() {
        let c = parse_clause("name(p2, \"Bob, \\\"Jr.\\\"\")").unwrap();
        assert_eq!(c.to_string(), "name(p2, \"Bob, \\\"Jr.\\\"\")");
        let c = parse_clause("sibling(X, Y) :- parent(Z, X), parent(Z, Y), X != Y").unwrap();
        assert_eq!(
            c.canonical().to_string(),
            "sibling(A, B) :- parent(C, A), parent(C, B), A != B"
        );
    }

    #[test]
    fn errors_name_line_and_column() {
        let e = parse("p(a).\nq(b c).").unwrap_err();
        assert_eq!((e.line, e.column), (2, 5), "{e}");
        let e = parse("p(X).").unwrap_err();
        assert!(e.message.contains("unsafe"), "{e}");
        let e = parse("p(a)").unwrap_err();
        assert!(e.message.contains("the end of the input"), "{e}");
        let e = parse("p(\"abc").unwrap_err();
        assert!(e.message.contains("unterminated"), "{e}");
        assert!(parse("a(X) :- b(X), X != Y.").is_err());
        assert!(parse("a(Y) :- b(X), Y = X.").is_ok());
    }

    #[test]
    fn lexes_as_racket_does() {
        let p = parse("p(_x, a-b, hello!, \"tab\\there \\41\\\nnext\")? q(X) :- r(X, Y), X!=Y.")
            .unwrap();
        let Statement::Query(Literal::Atom { args, .. }) = &p[0].statement else {
            panic!()
        };
        assert_eq!(args[0], Term::Sym("_x".into()));
        assert_eq!(args[1], Term::Sym("a-b".into()));
        assert_eq!(args[2], Term::Sym("hello!".into()));
        assert_eq!(args[3], Term::Str("tab\there Anext".into()));
        let Statement::Assert(rule) = &p[1].statement else {
            panic!()
        };
        assert_eq!(
            rule.body[1],
            Literal::Neq(Term::Var("X".into()), Term::Var("Y".into()))
        );
    }
}
