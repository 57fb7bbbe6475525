//! Object directories under the prefix (`policies/`, `namespaces/`, `pods/`): listed, then
//! watched from the list's revision, re-listed after a compaction or a broken watch, exactly as
//! the subnet leases are. `ObjectStore` is the low-level trait; `watch_dir` the loop on top.

use std::future::Future;
use std::sync::Arc;

use tokio::sync::mpsc;

use super::RegistryError;
use crate::metrics::Metrics;

/// One key under a directory; `key` is relative to the directory (`<ns>/<name>`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ObjKv {
    pub key: String,
    pub value: Vec<u8>,
    pub mod_revision: i64,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ObjChange {
    Put(ObjKv),
    Delete(String),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ObjWatchMsg {
    Changes(Vec<ObjChange>),
    /// The watch ended (compacted, cancelled, closed): list again.
    Reset(String),
}

pub trait ObjWatch: Send + 'static {
    fn next(&mut self) -> impl Future<Output = Result<ObjWatchMsg, RegistryError>> + Send;
}

/// Keys under `<prefix>/<dir>/`. Every call is bounded in time.
pub trait ObjectStore: Clone + Send + Sync + 'static {
    type Watch: ObjWatch;
    /// Every key of `dir` (paginated, all at one revision) and that revision.
    fn list(
        &self,
        dir: &str,
    ) -> impl Future<Output = Result<(Vec<ObjKv>, i64), RegistryError>> + Send;
    fn watch(
        &self,
        dir: &str,
        from_revision: i64,
    ) -> impl Future<Output = Result<Self::Watch, RegistryError>> + Send;
    fn get(
        &self,
        dir: &str,
        key: &str,
    ) -> impl Future<Output = Result<Option<ObjKv>, RegistryError>> + Send;
    fn put(
        &self,
        dir: &str,
        key: &str,
        value: &[u8],
    ) -> impl Future<Output = Result<(), RegistryError>> + Send;
    /// Ok(false): there was no such key.
    fn delete(
        &self,
        dir: &str,
        key: &str,
    ) -> impl Future<Output = Result<bool, RegistryError>> + Send;
    /// Deletes `key` only while its mod revision is `mod_revision`. Ok(false): it was not (a
    /// write came in between, or the key is gone).
    fn delete_at(
        &self,
        dir: &str,
        key: &str,
        mod_revision: i64,
    ) -> impl Future<Output = Result<bool, RegistryError>> + Send;

    /// Deletes `key` if its value is one `ours` accepts, and only that value: a write that
    /// lands between the read and the delete (another node's record under the same key) is
    /// read again, not deleted blindly.
    fn delete_if<F>(
        &self,
        dir: &str,
        key: &str,
        ours: F,
    ) -> impl Future<Output = Result<Removal, RegistryError>> + Send
    where
        F: Fn(&[u8]) -> bool + Send + Sync,
    {
        async move {
            for _ in 0..DELETE_ROUNDS {
                let Some(kv) = self.get(dir, key).await? else {
                    return Ok(Removal::Absent);
                };
                if !ours(&kv.value) {
                    return Ok(Removal::NotOurs);
                }
                if self.delete_at(dir, key, kv.mod_revision).await? {
                    return Ok(Removal::Deleted);
                }
            }
            Err(RegistryError::Contended(format!(
                "{dir}/{key} changed under every one of {DELETE_ROUNDS} deletes"
            )))
        }
    }
}

/// What `ObjectStore::delete_if` did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Removal {
    Deleted,
    /// There was no such key.
    Absent,
    /// The key holds a value that is not ours: left alone.
    NotOurs,
}

/// Reads and conditional deletes a `delete_if` tries before it gives up (each lost round is a
/// write that came in between).
const DELETE_ROUNDS: usize = 5;

/// What `watch_dir` reports. A `Snapshot` is the whole directory (first list, and after every
/// re-list); the receiver replaces what it had.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DirEvent {
    Snapshot(Vec<ObjKv>),
    Put(ObjKv),
    Delete(String),
}

/// Runs until the receiver is gone: list `dir`, send a Snapshot, watch from the list's revision
/// + 1 (no change lost in between), send every change; on any watch end, back off, re-list.
pub async fn watch_dir<S: ObjectStore>(
    store: S,
    dir: &'static str,
    tx: mpsc::Sender<(&'static str, DirEvent)>,
    metrics: Arc<Metrics>,
) {
    let mut backoff = std::time::Duration::from_millis(200);
    let max = std::time::Duration::from_secs(10);
    // Watches in a row that ended before HEALTHY_WATCH.
    let mut quick_ends = 0u32;
    loop {
        let (kvs, rev) = match store.list(dir).await {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(dir, "listing failed: {e}; retrying");
                Metrics::inc(&metrics.etcd_reconnects);
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(max);
                continue;
            }
        };
        if tx.send((dir, DirEvent::Snapshot(kvs))).await.is_err() {
            return;
        }
        let mut w = match store.watch(dir, rev + 1).await {
            Ok(w) => w,
            Err(e) => {
                tracing::warn!(dir, "watching failed: {e}; re-listing");
                Metrics::inc(&metrics.etcd_reconnects);
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(max);
                continue;
            }
        };
        backoff = std::time::Duration::from_millis(200);
        let opened = tokio::time::Instant::now();
        let why = loop {
            match w.next().await {
                Err(e) => break e.to_string(),
                Ok(ObjWatchMsg::Reset(why)) => break why,
                Ok(ObjWatchMsg::Changes(changes)) => {
                    for c in changes {
                        let ev = match c {
                            ObjChange::Put(kv) => DirEvent::Put(kv),
                            ObjChange::Delete(k) => DirEvent::Delete(k),
                        };
                        if tx.send((dir, ev)).await.is_err() {
                            return;
                        }
                    }
                }
            }
        };
        tracing::warn!(dir, "watch ended: {why}; re-listing");
        Metrics::inc(&metrics.etcd_reconnects);
        // Only a watch that lasted counts as healthy: watches that a server ends at once (a
        // Kubernetes API server refusing them, say) must not mean a full list every 200 ms.
        quick_ends = if opened.elapsed() >= HEALTHY_WATCH {
            0
        } else {
            quick_ends + 1
        };
        let wait = backoff * 2u32.pow(quick_ends.saturating_sub(1).min(6));
        tokio::time::sleep(wait.min(max)).await;
    }
}

/// A watch that ran this long before it ended was working; the next re-list is quick.
pub(crate) const HEALTHY_WATCH: std::time::Duration = std::time::Duration::from_secs(30);

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// A store whose watches end at once (the real ones, etcd and the API server, cannot be
    /// made to do that on cue; `tests/tests` runs them for everything else). Counts lists.
    #[derive(Clone, Default)]
    struct Refusing {
        lists: Arc<AtomicUsize>,
    }

    struct Ends;

    impl ObjWatch for Ends {
        async fn next(&mut self) -> Result<ObjWatchMsg, RegistryError> {
            Ok(ObjWatchMsg::Reset("refused".into()))
        }
    }

    impl ObjectStore for Refusing {
        type Watch = Ends;
        async fn list(&self, _: &str) -> Result<(Vec<ObjKv>, i64), RegistryError> {
            self.lists.fetch_add(1, Ordering::Relaxed);
            Ok((Vec::new(), 1))
        }
        async fn watch(&self, _: &str, _: i64) -> Result<Ends, RegistryError> {
            Ok(Ends)
        }
        async fn get(&self, _: &str, _: &str) -> Result<Option<ObjKv>, RegistryError> {
            Ok(None)
        }
        async fn put(&self, _: &str, _: &str, _: &[u8]) -> Result<(), RegistryError> {
            Ok(())
        }
        async fn delete(&self, _: &str, _: &str) -> Result<bool, RegistryError> {
            Ok(false)
        }
        async fn delete_at(&self, _: &str, _: &str, _: i64) -> Result<bool, RegistryError> {
            Ok(false)
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_watch_that_ends_at_once_backs_off() {
        let store = Refusing::default();
        let (tx, mut rx) = mpsc::channel(16);
        let metrics = Arc::new(Metrics::default());
        tokio::spawn(watch_dir(store.clone(), "pods", tx, metrics));
        tokio::spawn(async move { while rx.recv().await.is_some() {} });
        tokio::time::sleep(std::time::Duration::from_secs(60)).await;
        // Waits of 0.2, 0.4, ... 6.4 s, then 10 s: 11 lists in a minute; at a steady 200 ms
        // it would be 300.
        let lists = store.lists.load(Ordering::Relaxed);
        assert!((10..=14).contains(&lists), "{lists} lists in a minute");
    }

    /// A value and its mod revision.
    type Held = Option<(Vec<u8>, i64)>;

    /// One key in memory, with etcd's revision rule, and writes that land between a read and
    /// the delete after it on cue (etcd cannot be made to interleave them so; the lab test
    /// `a_delayed_record_delete_spares_another_nodes_record` runs delete_if against etcd).
    #[derive(Clone, Default)]
    struct OneKey {
        kv: Arc<std::sync::Mutex<Held>>,
        /// Values written, one after each read, as another writer would.
        interleaved: Arc<std::sync::Mutex<Vec<Vec<u8>>>>,
    }

    impl OneKey {
        fn holding(value: &str) -> OneKey {
            let k = OneKey::default();
            *k.kv.lock().unwrap() = Some((value.as_bytes().to_vec(), 1));
            k
        }
        fn value(&self) -> Option<String> {
            let kv = self.kv.lock().unwrap();
            kv.as_ref()
                .map(|(v, _)| String::from_utf8(v.clone()).unwrap())
        }
    }

    impl ObjectStore for OneKey {
        type Watch = Ends;
        async fn list(&self, _: &str) -> Result<(Vec<ObjKv>, i64), RegistryError> {
            unreachable!()
        }
        async fn watch(&self, _: &str, _: i64) -> Result<Ends, RegistryError> {
            unreachable!()
        }
        async fn get(&self, _: &str, key: &str) -> Result<Option<ObjKv>, RegistryError> {
            let mut kv = self.kv.lock().unwrap();
            let read = kv.as_ref().map(|(v, rev)| ObjKv {
                key: key.into(),
                value: v.clone(),
                mod_revision: *rev,
            });
            let mut writes = self.interleaved.lock().unwrap();
            if !writes.is_empty() {
                let rev = kv.as_ref().map_or(1, |(_, r)| r + 1);
                *kv = Some((writes.remove(0), rev));
            }
            Ok(read)
        }
        async fn put(&self, _: &str, _: &str, _: &[u8]) -> Result<(), RegistryError> {
            unreachable!()
        }
        async fn delete(&self, _: &str, _: &str) -> Result<bool, RegistryError> {
            unreachable!()
        }
        async fn delete_at(&self, _: &str, _: &str, rev: i64) -> Result<bool, RegistryError> {
            let mut kv = self.kv.lock().unwrap();
            let at = kv.as_ref().is_some_and(|(_, r)| *r == rev);
            if at {
                *kv = None;
            }
            Ok(at)
        }
    }

    fn mine(v: &[u8]) -> bool {
        v.starts_with(b"mine")
    }

    #[tokio::test]
    async fn delete_if_deletes_only_a_value_it_read_as_ours() {
        let absent = OneKey::default();
        assert_eq!(
            absent.delete_if("pods", "x/a", mine).await.unwrap(),
            Removal::Absent
        );

        let theirs = OneKey::holding("theirs");
        assert_eq!(
            theirs.delete_if("pods", "x/a", mine).await.unwrap(),
            Removal::NotOurs
        );
        assert_eq!(theirs.value().as_deref(), Some("theirs"));

        let ours = OneKey::holding("mine");
        assert_eq!(
            ours.delete_if("pods", "x/a", mine).await.unwrap(),
            Removal::Deleted
        );
        assert_eq!(ours.value(), None);

        // Ours when read, another's by the time of the delete: read again, and left.
        let taken = OneKey::holding("mine");
        taken.interleaved.lock().unwrap().push(b"theirs".to_vec());
        assert_eq!(
            taken.delete_if("pods", "x/a", mine).await.unwrap(),
            Removal::NotOurs
        );
        assert_eq!(taken.value().as_deref(), Some("theirs"));

        // Rewritten as ours once in between: the second read's value is deleted.
        let rewritten = OneKey::holding("mine 1");
        rewritten
            .interleaved
            .lock()
            .unwrap()
            .push(b"mine 2".to_vec());
        assert_eq!(
            rewritten.delete_if("pods", "x/a", mine).await.unwrap(),
            Removal::Deleted
        );
        assert_eq!(rewritten.value(), None);

        // Written between every read and its delete: an error (retried later), nothing lost.
        let busy = OneKey::holding("mine 0");
        let writes = (1..=DELETE_ROUNDS).map(|i| format!("mine {i}").into_bytes());
        busy.interleaved.lock().unwrap().extend(writes);
        let err = busy.delete_if("pods", "x/a", mine).await.unwrap_err();
        assert!(matches!(err, RegistryError::Contended(_)), "{err}");
        assert_eq!(busy.value(), Some(format!("mine {DELETE_ROUNDS}")));
    }
}
