//! Traits with no implementations, used as bounds on `DbHashMap` methods that shadow
//! `HashMap` methods which would change memory without the table (or copy it into a
//! map that is never persisted): calling one fails to compile with a message that says
//! what to use instead.

/// Never implemented: see `DbHashMap::clone`.
#[diagnostic::on_unimplemented(
    message = "`DbHashMap` cannot be cloned: a clone would be a plain `HashMap` whose changes are never written",
    label = "use `to_hash_map()` for a copy of the content, or open the table again",
    note = "`to_hash_map()` returns a `HashMap` copy; a second map on one table needs `reload()` to see the first one's writes"
)]
pub trait UseToHashMap {}

/// Never implemented: see `DbHashMap::entry` and `DbHashMap::get_mut`.
#[diagnostic::on_unimplemented(
    message = "`DbHashMap` hands out no `&mut V` and no entries: memory may only change after the table did",
    label = "use `upsert(k, |old| new)`, `get_or_insert_with(k, || v)`, `update(&k, |v| ...)` or `insert`",
    note = "for many keys at once, `upsert_many(pairs, |old, new| ...)` is one transaction"
)]
pub trait UseUpsert {}
