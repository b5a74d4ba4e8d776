//! A Datalog engine whose theory (the clauses asserted) lives in a map from clause
//! text to assertion number: a plain `HashMap`, or a `DbHashMap` that persists every
//! assertion and retraction as one row. Answers come from a semi-naive bottom-up
//! evaluation, which terminates on recursive rules and cycles.

use std::collections::{HashMap, HashSet};

use write_thru_hash::DbHashMap;

use crate::syntax::{parse_clause, Clause, Literal, Term};

/// Where the theory is kept. Reads are the same for both kinds of map: a
/// `&HashMap` is what a `DbHashMap` derefs to.
pub(crate) trait Theory {
    fn clauses(&self) -> &HashMap<String, u64>;
    fn put(&mut self, clause: String, seq: u64) -> Result<(), write_thru_hash::Error>;
    fn delete(&mut self, clause: &str) -> Result<bool, write_thru_hash::Error>;
}

impl Theory for HashMap<String, u64> {
    fn clauses(&self) -> &HashMap<String, u64> {
        self
    }
    fn put(&mut self, clause: String, seq: u64) -> Result<(), write_thru_hash::Error> {
        self.insert(clause, seq);
        Ok(())
    }
    fn delete(&mut self, clause: &str) -> Result<bool, write_thru_hash::Error> {
        Ok(self.remove(clause).is_some())
    }
}

impl Theory for DbHashMap<String, u64> {
    fn clauses(&self) -> &HashMap<String, u64> {
        self
    }
    fn put(&mut self, clause: String, seq: u64) -> Result<(), write_thru_hash::Error> {
        self.insert(clause, seq).map(drop)
    }
    fn delete(&mut self, clause: &str) -> Result<bool, write_thru_hash::Error> {
        Ok(self.remove(clause)?.is_some())
    }
}

/// A ground value.
type Value = Term;
type Tuple = Vec<Value>;

/// The facts of one predicate, indexed by (argument position, value).
#[derive(Default, Debug)]
struct Relation {
    tuples: Vec<Tuple>,
    set: HashSet<Tuple>,
    index: HashMap<(usize, Value), Vec<usize>>,
}

impl Relation {
    fn insert(&mut self, t: Tuple) -> bool {
        if self.set.contains(&t) {
            return false;
        }
        let id = self.tuples.len();
        for (i, v) in t.iter().enumerate() {
            self.index.entry((i, v.clone())).or_default().push(id);
        }
        self.set.insert(t.clone());
        self.tuples.push(t);
        true
    }

    /// Ids of the tuples that can match `args` under `env`: through the index on the
    /// first argument that is known, else all of them.
    fn candidates(&self, args: &[Slot], env: &[Option<Value>]) -> Vec<usize> {
        for (i, a) in args.iter().enumerate() {
            if let Some(v) = a.value(env) {
                return self.index.get(&(i, v.clone())).cloned().unwrap_or_default();
            }
        }
        (0..self.tuples.len()).collect()
    }
}

type Key = (String, usize);

/// A term of a compiled rule: a constant, or a variable by number.
#[derive(Debug, Clone)]
enum Slot {
    Const(Value),
    Var(usize),
}

impl Slot {
    fn value<'a>(&'a self, env: &'a [Option<Value>]) -> Option<&'a Value> {
        match self {
            Slot::Const(c) => Some(c),
            Slot::Var(i) => env[*i].as_ref(),
        }
    }
}

#[derive(Debug, Clone)]
enum Step {
    /// A positive literal: the n-th of the rule's body, for semi-naive evaluation.
    Atom {
        key: Key,
        args: Vec<Slot>,
        n: usize,
    },
    Eq(Slot, Slot),
    Neq(Slot, Slot),
}

#[derive(Debug)]
struct Rule {
    head: (Key, Vec<Slot>),
    steps: Vec<Step>,
    vars: usize,
    atoms: usize,
}

fn compile(c: &Clause) -> Rule {
    let mut names: HashMap<String, usize> = HashMap::new();
    let mut slot = |t: &Term| match t {
        Term::Var(v) => {
            let n = names.len();
            Slot::Var(*names.entry(v.clone()).or_insert(n))
        }
        other => Slot::Const(other.clone()),
    };
    let Literal::Atom { pred, args } = &c.head else {
        unreachable!("heads are atoms")
    };
    let head = (
        (pred.clone(), args.len()),
        args.iter().map(&mut slot).collect(),
    );
    let mut pending: Vec<Step> = Vec::new();
    let mut atoms = 0;
    for l in &c.body {
        pending.push(match l {
            Literal::Atom { pred, args } => {
                atoms += 1;
                Step::Atom {
                    key: (pred.clone(), args.len()),
                    args: args.iter().map(&mut slot).collect(),
                    n: atoms - 1,
                }
            }
            Literal::Eq(a, b) => Step::Eq(slot(a), slot(b)),
            Literal::Neq(a, b) => Step::Neq(slot(a), slot(b)),
        });
    }
    let vars = names.len();
    // Order the steps so that `=` and `!=` run as soon as their variables are known.
    let mut bound = vec![false; vars];
    let known = |s: &Slot, bound: &[bool]| match s {
        Slot::Const(_) => true,
        Slot::Var(i) => bound[*i],
    };
    let mut steps = Vec::new();
    while !pending.is_empty() {
        let ready = pending.iter().position(|s| match s {
            Step::Eq(a, b) => known(a, &bound) || known(b, &bound),
            Step::Neq(a, b) => known(a, &bound) && known(b, &bound),
            Step::Atom { .. } => false,
        });
        let i = ready
            .or_else(|| pending.iter().position(|s| matches!(s, Step::Atom { .. })))
            .unwrap_or(0);
        let step = pending.remove(i);
        match &step {
            Step::Atom { args, .. } => args.iter().for_each(|a| {
                if let Slot::Var(v) = a {
                    bound[*v] = true;
                }
            }),
            Step::Eq(a, b) => [a, b].iter().for_each(|a| {
                if let Slot::Var(v) = a {
                    bound[*v] = true;
                }
            }),
            Step::Neq(..) => {}
        }
        steps.push(step);
    }
    Rule {
        head,
        steps,
        vars,
        atoms,
    }
}

/// The least model of the theory: every fact it implies.
#[derive(Default)]
struct Model {
    relations: HashMap<Key, Relation>,
}

struct Join<'a> {
    rule: &'a Rule,
    full: &'a HashMap<Key, Relation>,
    delta: Option<(usize, &'a HashMap<Key, Relation>)>,
    out: Vec<(Key, Tuple)>,
}

impl Join<'_> {
    fn run(&mut self, step: usize, env: &mut Vec<Option<Value>>) {
        let Some(s) = self.rule.steps.get(step) else {
            let (key, args) = &self.rule.head;
            let tuple = args
                .iter()
                .map(|a| a.value(env).cloned().expect("safe rules bind the head"))
                .collect();
            self.out.push((key.clone(), tuple));
            return;
        };
        match s {
            Step::Eq(a, b) => match (a.value(env).cloned(), b.value(env).cloned()) {
                (Some(x), Some(y)) if x == y => self.run(step + 1, env),
                (Some(x), None) | (None, Some(x)) => {
                    let Slot::Var(v) = (if a.value(env).is_none() { a } else { b }) else {
                        return;
                    };
                    env[*v] = Some(x);
                    self.run(step + 1, env);
                    env[*v] = None;
                }
                _ => {}
            },
            Step::Neq(a, b) => {
                if a.value(env) != b.value(env) {
                    self.run(step + 1, env);
                }
            }
            Step::Atom { key, args, n } => {
                let source = match self.delta {
                    Some((d, delta)) if d == *n => delta,
                    _ => self.full,
                };
                let Some(rel) = source.get(key) else { return };
                'tuples: for id in rel.candidates(args, env) {
                    let tuple = &rel.tuples[id];
                    let mut newly = Vec::new();
                    for (a, v) in args.iter().zip(tuple) {
                        match a {
                            Slot::Const(c) if c != v => break,
                            Slot::Const(_) => {}
                            Slot::Var(i) => match &env[*i] {
                                Some(x) if x != v => {
                                    for j in newly.drain(..) {
                                        env[j] = None;
                                    }
                                    continue 'tuples;
                                }
                                Some(_) => {}
                                None => {
                                    env[*i] = Some(v.clone());
                                    newly.push(*i);
                                }
                            },
                        }
                    }
                    let matched = args.iter().zip(tuple).all(|(a, v)| a.value(env) == Some(v));
                    if matched {
                        self.run(step + 1, env);
                    }
                    for j in newly {
                        env[j] = None;
                    }
                }
            }
        }
    }
}

impl Model {
    fn build(clauses: &[Clause]) -> Model {
        let mut model = Model::default();
        let mut rules = Vec::new();
        for c in clauses {
            match (&c.head, c.body.is_empty()) {
                (Literal::Atom { pred, args }, true) => {
                    model
                        .relations
                        .entry((pred.clone(), args.len()))
                        .or_default()
                        .insert(args.clone());
                }
                _ => rules.push(compile(c)),
            }
        }
        // Semi-naive: each round joins every rule with at least one literal taken from
        // the facts that the previous round found new.
        let mut delta: HashMap<Key, Relation> = HashMap::new();
        for (k, r) in &model.relations {
            let d = delta.entry(k.clone()).or_default();
            for t in &r.tuples {
                d.insert(t.clone());
            }
        }
        let mut first = true;
        loop {
            let mut found: Vec<(Key, Tuple)> = Vec::new();
            for rule in &rules {
                let mut join = Join {
                    rule,
                    full: &model.relations,
                    delta: None,
                    out: Vec::new(),
                };
                let mut env = vec![None; rule.vars];
                if rule.atoms == 0 {
                    if first {
                        join.run(0, &mut env);
                    }
                } else {
                    for n in 0..rule.atoms {
                        join.delta = Some((n, &delta));
                        join.run(0, &mut env);
                    }
                }
                found.append(&mut join.out);
            }
            first = false;
            let mut next: HashMap<Key, Relation> = HashMap::new();
            for (key, tuple) in found {
                let rel = model.relations.entry(key.clone()).or_default();
                if rel.insert(tuple.clone()) {
                    next.entry(key).or_default().insert(tuple);
                }
            }
            if next.is_empty() {
                return model;
            }
            delta = next;
        }
    }

    fn answers(&self, query: &Literal) -> Vec<Literal> {
        let Literal::Atom { pred, args } = query else {
            return Vec::new();
        };
        let Some(rel) = self.relations.get(&(pred.clone(), args.len())) else {
            return Vec::new();
        };
        let mut names: HashMap<&str, usize> = HashMap::new();
        let slots: Vec<Slot> = args
            .iter()
            .map(|t| match t {
                Term::Var(v) => {
                    let n = names.len();
                    Slot::Var(*names.entry(v).or_insert(n))
                }
                c => Slot::Const(c.clone()),
            })
            .collect();
        let env = vec![None; names.len()];
        let mut seen = HashSet::new();
        let mut out = Vec::new();
        for id in rel.candidates(&slots, &env) {
            let t = &rel.tuples[id];
            let mut env = env.clone();
            let ok = slots.iter().zip(t).all(|(s, v)| match s {
                Slot::Const(c) => c == v,
                Slot::Var(i) => match &env[*i] {
                    Some(x) => x == v,
                    None => {
                        env[*i] = Some(v.clone());
                        true
                    }
                },
            });
            if ok && seen.insert(t.clone()) {
                out.push(Literal::Atom {
                    pred: pred.clone(),
                    args: t.clone(),
                });
            }
        }
        out
    }
}

/// The engine: a theory, and its model while the theory is unchanged.
pub(crate) struct Engine<T: Theory> {
    theory: T,
    model: Option<Model>,
    next_seq: u64,
}

impl<T: Theory> Engine<T> {
    pub(crate) fn new(theory: T) -> Self {
        let next_seq = theory
            .clauses()
            .values()
            .copied()
            .max()
            .map_or(0, |m| m + 1);
        Engine {
            theory,
            model: None,
            next_seq,
        }
    }

    /// Asserts a clause: one row, whatever the size of the theory.
    pub(crate) fn assert(&mut self, clause: &Clause) -> Result<(), write_thru_hash::Error> {
        let text = clause.canonical().to_string();
        if self.theory.clauses().contains_key(&text) {
            return Ok(());
        }
        self.theory.put(text, self.next_seq)?;
        self.next_seq += 1;
        self.model = None;
        Ok(())
    }

    /// Retracts a clause (a fact or a rule, up to the names of its variables).
    pub(crate) fn retract(&mut self, clause: &Clause) -> Result<(), write_thru_hash::Error> {
        if self.theory.delete(&clause.canonical().to_string())? {
            self.model = None;
        }
        Ok(())
    }

    /// The facts that answer `query`, in no particular order.
    pub(crate) fn query(&mut self, query: &Literal) -> Result<Vec<Literal>, String> {
        if !matches!(query, Literal::Atom { .. }) {
            return Err(format!("`{query}?`: a query must be a predicate"));
        }
        if self.model.is_none() {
            let mut rows: Vec<(&String, &u64)> = self.theory.clauses().iter().collect();
            rows.sort_by_key(|(_, seq)| **seq);
            let clauses = rows
                .into_iter()
                .map(|(text, _)| {
                    parse_clause(text).map_err(|e| format!("stored clause `{text}`: {e}"))
                })
                .collect::<Result<Vec<_>, _>>()?;
            self.model = Some(Model::build(&clauses));
        }
        Ok(self
            .model
            .as_ref()
            .map(|m| m.answers(query))
            .unwrap_or_default())
    }
}
