//! `Transaction`: changes staged beside a map's memory, committed as one batch.

use std::borrow::Borrow;
use std::collections::hash_map::{self, RandomState};
use std::collections::HashMap;
use std::fmt;
use std::hash::{BuildHasher, Hash};

use super::writer::Encoder;
use crate::error::Result;
use crate::store::Batch;

/// An insert staged by a [`Transaction`]: the value and the encodings of key and value.
struct Put<V> {
    value: V,
    key: Vec<u8>,
    bytes: Vec<u8>,
}

/// The changes staged by [`DbHashMap::transaction`](crate::DbHashMap::transaction) and
/// [`SharedDbHashMap::transaction`](crate::SharedDbHashMap::transaction): its reads
/// (`get`, `len`, `iter`) see them; nothing reaches the database until the closure
/// returns `Ok`, and then all of it does, in one database transaction, or none of it.
///
/// The staged changes are kept beside the map, which is not touched until the commit:
/// if the transaction does not commit (an `Err`, a panic, a failed commit), the map is
/// as it was, and readers of a shared map never see a part of it.
pub struct Transaction<'m, K, V, S = RandomState> {
    base: &'m HashMap<K, V, S>,
    w: &'m Encoder<K, V>,
    /// Staged inserts.
    puts: HashMap<K, Put<V>>,
    /// Staged removals of keys the map holds (and no insert stages again): a copy of
    /// each key, read back from its encoding, and that encoding.
    removed: HashMap<K, Vec<u8>>,
    cleared: bool,
}

/// What a committed transaction changes in memory.
pub(crate) struct Staged<K, V> {
    cleared: bool,
    removed: Vec<K>,
    puts: Vec<(K, V)>,
}

impl<K, V> Staged<K, V>
where
    K: Eq + Hash,
{
    pub(crate) fn apply<S: BuildHasher>(self, map: &mut HashMap<K, V, S>) {
        if self.cleared {
            map.clear();
        }
        for key in &self.removed {
            map.remove(key);
        }
        map.extend(self.puts);
    }
}

impl<K, V, S> fmt::Debug for Transaction<'_, K, V, S>
where
    K: fmt::Debug + Eq + Hash,
    V: fmt::Debug,
{
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let puts: Vec<(&K, &V)> = self.puts.iter().map(|(k, p)| (k, &p.value)).collect();
        let removed: Vec<&K> = self.removed.keys().collect();
        f.debug_struct("Transaction")
            .field("table", &self.w.table.name)
            .field("cleared", &self.cleared)
            .field("inserts", &puts)
            .field("removes", &removed)
            .finish()
    }
}

impl<'m, K, V, S> Transaction<'m, K, V, S>
where
    K: Eq + Hash,
    S: BuildHasher,
{
    pub(crate) fn new(base: &'m HashMap<K, V, S>, w: &'m Encoder<K, V>) -> Self {
        Transaction {
            base,
            w,
            puts: HashMap::new(),
            removed: HashMap::new(),
            cleared: false,
        }
    }

    /// The map's own entry for `key`, if the transaction still sees it.
    fn held<Q>(&self, key: &Q) -> Option<(&'m K, &'m V)>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        if self.cleared || self.removed.contains_key(key) {
            return None;
        }
        self.base.get_key_value(key)
    }

    /// The value of `key` as the transaction sees it, staged changes included.
    pub fn get<Q>(&self, key: &Q) -> Option<&V>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        match self.puts.get(key) {
            Some(put) => Some(&put.value),
            None => self.held(key).map(|(_, v)| v),
        }
    }

    /// Whether the transaction sees `key`.
    pub fn contains_key<Q>(&self, key: &Q) -> bool
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        self.get(key).is_some()
    }

    /// The number of entries the transaction sees.
    pub fn len(&self) -> usize {
        if self.cleared {
            return self.puts.len();
        }
        let added = self
            .puts
            .keys()
            .filter(|k| !self.base.contains_key(*k))
            .count();
        self.base.len() - self.removed.len() + added
    }

    /// Whether the transaction sees no entry.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The entries the transaction sees, in no particular order.
    pub fn iter(&self) -> impl Iterator<Item = (&K, &V)> + '_ {
        let held = self.base.iter().filter(move |(k, _)| {
            !self.cleared && !self.puts.contains_key(*k) && !self.removed.contains_key(*k)
        });
        held.chain(self.puts.iter().map(|(k, put)| (k, &put.value)))
    }

    /// Stages an insert and returns the value the key had, as the map's
    /// [`insert`](crate::DbHashMap::insert) does. Fails now if the key or value does
    /// not encode, or if the key is equal to one held or staged that encodes
    /// differently.
    ///
    /// A value the map holds is given back as the value codec reads it back from its
    /// encoding (the map keeps its own until the commit); a value staged earlier in the
    /// transaction is given back as it is.
    pub fn insert(&mut self, key: K, value: V) -> Result<Option<V>> {
        let (k, v) = self.encode_put(&key, &value)?;
        let previous = match self.puts.remove(&key) {
            Some(put) => Some(put.value),
            None => self.copy_held(&key)?,
        };
        self.removed.remove(&key);
        self.puts.insert(
            key,
            Put {
                value,
                key: k,
                bytes: v,
            },
        );
        Ok(previous)
    }

    /// Stages the value `f` makes of the key's current value (`None` if the transaction
    /// does not see the key), and returns the value now staged.
    pub fn upsert(&mut self, key: K, f: impl FnOnce(Option<&V>) -> V) -> Result<&V> {
        let value = f(self.get(&key));
        let (k, v) = self.encode_put(&key, &value)?;
        self.removed.remove(&key);
        let put = Put {
            value,
            key: k,
            bytes: v,
        };
        Ok(match self.puts.entry(key) {
            hash_map::Entry::Occupied(mut staged) => {
                staged.insert(put);
                &staged.into_mut().value
            }
            hash_map::Entry::Vacant(slot) => &slot.insert(put).value,
        })
    }

    /// Stages the removal of `key` and returns the value it had, as the map's
    /// [`remove`](crate::DbHashMap::remove) does (see [`insert`](Self::insert) for how
    /// a held value is given back). A key the transaction does not see is ignored.
    pub fn remove<Q>(&mut self, key: &Q) -> Result<Option<V>>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        let staged = self.puts.remove(key).map(|put| put.value);
        let held = self.held(key);
        let previous = match (staged, held) {
            (Some(value), _) => Some(value),
            (None, Some((k, v))) => Some(self.w.copy_value(k, v)?),
            (None, None) => None,
        };
        // The map's row goes too, whether or not an insert had replaced it.
        if let Some((k, _)) = held {
            let (copy, bytes) = self.w.copy_key(k)?;
            self.removed.insert(copy, bytes);
        }
        Ok(previous)
    }

    /// Stages the removal of every entry.
    pub fn clear(&mut self) {
        self.cleared = true;
        self.puts.clear();
        self.removed.clear();
    }

    /// A copy of the value the map holds for `key`, if the transaction sees it there.
    fn copy_held(&self, key: &K) -> Result<Option<V>> {
        match self.held(key) {
            Some((k, v)) => self.w.copy_value(k, v).map(Some),
            None => Ok(None),
        }
    }

    /// Encodes a staged insert, refusing a key equal to one held or staged whose bytes
    /// differ: memory keeps one key object, the table must get the same bytes.
    fn encode_put(&self, key: &K, value: &V) -> Result<(Vec<u8>, Vec<u8>)> {
        let w = self.w;
        let k = w.encode_written_key(key)?;
        if !self.cleared {
            if let Some((held, _)) = self.base.get_key_value(key) {
                w.same_bytes(&w.encode_key(held)?, &k)?;
            }
        }
        if let Some(put) = self.puts.get(key) {
            w.same_bytes(&put.key, &k)?;
        }
        Ok((k, w.encode_value(value)?))
    }

    /// The batch that commits what was staged, and what it then changes in memory.
    pub(crate) fn finish(self) -> (Batch, Staged<K, V>) {
        let mut batch = Batch {
            clear: self.cleared,
            ..Batch::default()
        };
        let mut removed = Vec::with_capacity(self.removed.len());
        for (key, bytes) in self.removed {
            batch.deletes.push(bytes);
            removed.push(key);
        }
        let mut puts = Vec::with_capacity(self.puts.len());
        for (key, put) in self.puts {
            batch.puts.push((put.key, put.bytes));
            puts.push((key, put.value));
        }
        let staged = Staged {
            cleared: self.cleared,
            removed,
            puts,
        };
        (batch, staged)
    }
}
