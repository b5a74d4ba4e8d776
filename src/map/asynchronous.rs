//! Feature `tokio`: `SharedDbHashMap`'s write methods for async code; reads stay
//! synchronous (they are memory reads). No write holds up the runtime's worker threads:
//!
//! - the group-committed ones (`insert`, `remove`, `remove_entry`, `clear`,
//!   `insert_many`) queue their change and await a oneshot channel that the committing
//!   thread fulfils: a waiting call holds no thread, and one blocking thread commits
//!   each group (measured: 1,000 waiting calls, a handful of threads);
//! - the others (read-modify-write, transactions, refresh) run the blocking method on
//!   one of tokio's blocking threads.
//!
//! They must run inside a tokio runtime (any flavour): polled elsewhere they panic, as
//! tokio's own functions do. A future dropped before it completes does not stop its
//! write: the change is committed (or refused) with the others, and its outcome dropped.

use std::borrow::Borrow;
use std::hash::{BuildHasher, Hash};

use super::shared::SharedDbHashMap;
use super::transaction::Transaction;
use crate::error::{Error, Result};

impl<K, V, S> SharedDbHashMap<K, V, S>
where
    K: Eq + Hash + Send + Sync + 'static,
    V: Send + Sync + 'static,
    S: BuildHasher + Send + Sync + 'static,
{
    /// Runs `f` on this map on a blocking thread of the current tokio runtime. A future
    /// that is dropped does not stop the write: it completes, and its outcome is
    /// dropped with the future.
    ///
    /// A task that holds this map's read guard (or runs inside one of its closures) is
    /// refused with [`Error::Reentrant`], as the blocking call is: the blocking thread
    /// would commit, then wait for the guard, which the task holds while it waits for
    /// that thread.
    async fn blocking<R: Send + 'static>(
        &self,
        call: &'static str,
        f: impl FnOnce(&Self) -> Result<R> + Send + 'static,
    ) -> Result<R> {
        self.inner().enter(call)?;
        let this = self.clone();
        match tokio::task::spawn_blocking(move || f(&this)).await {
            Ok(result) => result,
            Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
            Err(e) => Err(Error::Background {
                table: self.table_name().to_string(),
                pending: 0,
                abandoned: true,
                source: format!("the runtime is shutting down: {e}").into(),
            }),
        }
    }

    /// [`insert`](Self::insert) for async code. Like every `…_async` method, it must
    /// run inside a tokio runtime.
    ///
    /// ```
    /// # use write_thru_hash::{DbHashMap, SharedDbHashMap};
    /// # let dir = tempfile::tempdir()?;
    /// # let url = format!("sqlite:{}", dir.path().join("db.sqlite").display());
    /// let h: SharedDbHashMap<String, i64> = DbHashMap::builder_url(&url).open_shared()?;
    /// let rt = tokio::runtime::Builder::new_current_thread().build()?;
    /// rt.block_on(async {
    ///     h.insert_async("a".into(), 1).await?;
    ///     assert_eq!(h.get("a"), Some(1));
    ///     Ok::<(), write_thru_hash::Error>(())
    /// })?;
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub async fn insert_async(&self, key: K, value: V) -> Result<Option<V>> {
        self.insert_queued(key, value).await
    }

    /// [`remove`](Self::remove) for async code; the key is given by value.
    pub async fn remove_async<Q>(&self, key: Q) -> Result<Option<V>>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + Send + 'static,
    {
        Ok(self.remove_entry_queued(&key).await?.map(|(_, v)| v))
    }

    /// [`remove_entry`](Self::remove_entry) for async code; the key is given by value.
    pub async fn remove_entry_async<Q>(&self, key: Q) -> Result<Option<(K, V)>>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + Send + 'static,
    {
        self.remove_entry_queued(&key).await
    }

    /// [`clear`](Self::clear) for async code.
    pub async fn clear_async(&self) -> Result<()> {
        self.clear_queued().await
    }

    /// [`insert_many`](Self::insert_many) for async code.
    pub async fn insert_many_async(
        &self,
        pairs: impl IntoIterator<Item = (K, V)> + Send + 'static,
    ) -> Result<()> {
        self.insert_many_queued(pairs.into_iter().collect()).await
    }

    /// [`get_or_insert_with`](Self::get_or_insert_with) for async code: no I/O when the
    /// key is held.
    pub async fn get_or_insert_with_async(
        &self,
        key: K,
        f: impl FnOnce() -> V + Send + 'static,
    ) -> Result<V>
    where
        V: Clone,
    {
        if let Some(value) = self.get(&key) {
            return Ok(value);
        }
        self.blocking("get_or_insert_with", move |h| h.get_or_insert_with(key, f))
            .await
    }

    /// [`remove_many`](Self::remove_many) for async code; the keys are given by value.
    pub async fn remove_many_async<Q>(
        &self,
        keys: impl IntoIterator<Item = Q> + Send + 'static,
    ) -> Result<usize>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + Send + 'static,
    {
        let keys: Vec<Q> = keys.into_iter().collect();
        self.blocking("remove_many", move |h| h.remove_many(keys.iter()))
            .await
    }

    /// [`retain`](Self::retain) for async code.
    pub async fn retain_async(
        &self,
        f: impl FnMut(&K, &V) -> bool + Send + 'static,
    ) -> Result<usize> {
        self.blocking("retain", move |h| h.retain(f)).await
    }

    /// [`upsert`](Self::upsert) for async code.
    pub async fn upsert_async(
        &self,
        key: K,
        f: impl FnOnce(Option<&V>) -> V + Send + 'static,
    ) -> Result<V>
    where
        V: Clone,
    {
        self.blocking("upsert", move |h| h.upsert(key, f)).await
    }

    /// [`upsert_many`](Self::upsert_many) for async code.
    pub async fn upsert_many_async(
        &self,
        pairs: impl IntoIterator<Item = (K, V)> + Send + 'static,
        f: impl FnMut(Option<&V>, V) -> V + Send + 'static,
    ) -> Result<()> {
        self.blocking("upsert_many", move |h| h.upsert_many(pairs, f))
            .await
    }

    /// [`update`](Self::update) for async code; the key is given by value.
    pub async fn update_async<Q>(
        &self,
        key: Q,
        f: impl FnOnce(&mut V) + Send + 'static,
    ) -> Result<bool>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + Send + 'static,
        V: Clone,
    {
        self.blocking("update", move |h| h.update(&key, f)).await
    }

    /// [`transaction`](Self::transaction) for async code: `f` runs on a blocking
    /// thread, so it cannot `.await`.
    pub async fn transaction_async<R: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Transaction<'_, K, V, S>) -> Result<R> + Send + 'static,
    ) -> Result<R> {
        self.blocking("transaction", move |h| h.transaction(f))
            .await
    }

    /// [`refresh`](Self::refresh) for async code.
    pub async fn refresh_async(&self) -> Result<usize>
    where
        S: Clone,
    {
        self.blocking("refresh", |h| h.refresh()).await
    }

    /// [`reload`](Self::reload) for async code.
    pub async fn reload_async(&self) -> Result<()>
    where
        S: Clone,
    {
        self.blocking("reload", |h| h.reload()).await
    }

    /// [`flush`](Self::flush) for async code.
    pub async fn flush_async(&self) -> Result<()> {
        self.blocking("flush", |h| h.flush()).await
    }
}
