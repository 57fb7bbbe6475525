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
}

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
        tokio::time::sleep(backoff).await;
    }
}
