//! Deleted pods' conntrack entries (DEL, GC), before their addresses are released: an open
//! flow would go on to the next pod given the address, as established, past its policies.
//!
//! One thread (per network namespace) does it for every request, and the requests that queued
//! up while it worked go together: finding the entries means dumping the conntrack table, and a dump walks the
//! kernel's whole conntrack hash (one for all namespaces), a few ms each here. A burst of DELs
//! then pays for a few dumps, not one each.

use std::collections::{BTreeSet, HashMap};
use std::net::IpAddr;
use std::sync::mpsc;
use std::sync::{Mutex, OnceLock};

use tokio::sync::oneshot;

struct Job {
    addrs: Vec<IpAddr>,
    done: oneshot::Sender<Result<usize, String>>,
}

/// The calling thread's network namespace (its inode): conntrack is per namespace, and a
/// thread lives in the namespace of the thread that started it.
fn netns_id() -> Option<u64> {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/thread-self/ns/net")
        .ok()
        .map(|m| m.ino())
}

/// The worker for the calling thread's network namespace, started from this thread (so in it).
/// One per namespace: twilld has one, a test process running several daemons has several.
fn worker() -> Option<mpsc::Sender<Job>> {
    static WORKERS: OnceLock<Mutex<HashMap<Option<u64>, mpsc::Sender<Job>>>> = OnceLock::new();
    let mut workers = WORKERS
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    let ns = netns_id();
    if let Some(tx) = workers.get(&ns) {
        return Some(tx.clone());
    }
    let (tx, rx) = mpsc::channel::<Job>();
    let spawned = std::thread::Builder::new()
        .name("twill-conntrack".into())
        .spawn(move || {
            while let Ok(first) = rx.recv() {
                let mut jobs = vec![first];
                jobs.extend(rx.try_iter());
                let all: BTreeSet<IpAddr> =
                    jobs.iter().flat_map(|j| j.addrs.iter().copied()).collect();
                let all: Vec<IpAddr> = all.into_iter().collect();
                // A panic fails this batch, not every later DEL's.
                let res = std::panic::catch_unwind(|| {
                    crate::netlink::conntrack::delete_flows_of(&all).map_err(|e| e.to_string())
                })
                .unwrap_or_else(|_| Err("the conntrack code panicked".into()));
                for j in jobs {
                    let _ = j.done.send(res.clone());
                }
            }
        });
    match spawned {
        Ok(_) => {
            workers.insert(ns, tx.clone());
            Some(tx)
        }
        Err(e) => {
            tracing::error!(
                error = %e,
                "cannot start the conntrack thread: deleted pods' flows stay until they time out"
            );
            None
        }
    }
}

/// Deletes the conntrack entries of `addrs` (both directions, both families). Failures are
/// logged, not the caller's: a node without conntrack (or a refused entry) must not keep
/// every DEL failing and its addresses reserved for good.
pub async fn forget(addrs: Vec<IpAddr>) {
    if addrs.is_empty() {
        return;
    }
    let Some(tx) = worker() else {
        tracing::warn!(
            ?addrs,
            "no conntrack thread: a deleted pod's flows stay until they time out"
        );
        return;
    };
    let (done, wait) = oneshot::channel();
    if tx
        .send(Job {
            addrs: addrs.clone(),
            done,
        })
        .is_err()
    {
        tracing::error!(
            ?addrs,
            "the conntrack thread is gone: a deleted pod's flows stay until they time out"
        );
        return;
    }
    match wait.await {
        // The count is the batch's: what matters is that none is left.
        Ok(Ok(0)) => {}
        Ok(Ok(n)) => tracing::debug!(
            ?addrs,
            entries = n,
            "deleted conntrack entries of deleted pods"
        ),
        // The error is the batch's: it may concern another pod's entries.
        Ok(Err(e)) => tracing::warn!(?addrs, error = %e,
            "deleting deleted pods' conntrack entries failed (a batch with these addresses)"),
        Err(_) => tracing::warn!(?addrs, "the conntrack thread stopped"),
    }
}
