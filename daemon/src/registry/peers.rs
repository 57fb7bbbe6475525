//! Following the other nodes' leases: list, then watch from the list's revision, re-list after
//! anything that breaks the watch. What the keys mean is `view`'s job.

use std::sync::Arc;

use tokio::sync::{mpsc, watch};

use super::skips::SkipLog;
use super::view::{PeerView, Update};
use super::{Backoff, OwnLease, PeerEvent, SubnetRegistry, SubnetWatch, WatchMsg};
use crate::config::NetworkConfig;
use crate::metrics::Metrics;

/// Runs forever: list `<prefix>/subnets/`, send a Snapshot, watch from revision+1, send
/// Upsert/Remove; on compaction, error or etcd restart, reconnect with backoff, re-list and send a
/// new Snapshot. A list that fails is reported (`ListFailed`) and retried. Skips (counted, and
/// logged at most every few minutes per key) invalid leases, keys that another key for the same
/// subnet outranks, leases whose VTEP MAC an older lease has, and `own_subnet`'s lease.
/// Returns only when the receiving side of `tx` is gone.
pub async fn watch_peers<R: SubnetRegistry>(
    reg: R,
    cfg: NetworkConfig,
    mut own_subnet: watch::Receiver<OwnLease>,
    tx: mpsc::Sender<PeerEvent>,
    metrics: Arc<Metrics>,
) {
    let mut backoff = Backoff::new();
    let mut listed_before = false;
    let mut own_open = true;
    let mut skips = SkipLog::new(metrics.clone());
    let mut view = PeerView::new(cfg, own_subnet.borrow().clone());
    loop {
        let own = own_subnet.borrow_and_update().clone();
        let (kvs, rev) = match reg.list_subnets().await {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!("listing subnet leases failed: {e}; retrying");
                Metrics::inc(&metrics.etcd_reconnects);
                if tx.send(PeerEvent::ListFailed(e.to_string())).await.is_err() {
                    return;
                }
                backoff.wait().await;
                continue;
            }
        };
        if listed_before {
            Metrics::inc(&metrics.peer_resyncs);
        }
        listed_before = true;
        if !send(&tx, &mut skips, view.reset(own, kvs)).await {
            return;
        }

        // From rev + 1: every change after the list, none lost; compaction in between is
        // reported by the watch and handled with a re-list.
        let mut w = match reg.watch_subnets(rev + 1, None).await {
            Ok(w) => w,
            Err(e) => {
                tracing::warn!("watching subnet leases failed: {e}; re-listing");
                Metrics::inc(&metrics.etcd_reconnects);
                backoff.wait().await;
                continue;
            }
        };
        backoff.reset();
        let why = loop {
            tokio::select! {
                msg = w.next() => match msg {
                    Err(e) => break e.to_string(),
                    Ok(WatchMsg::Reset(why)) => break why,
                    Ok(WatchMsg::Changes(changes)) => {
                        for c in changes {
                            if !send(&tx, &mut skips, view.apply(c)).await {
                                return;
                            }
                        }
                    }
                },
                r = own_subnet.changed(), if own_open => match r {
                    Err(_) => own_open = false,
                    Ok(()) => {
                        let now = own_subnet.borrow_and_update().clone();
                        if now != *view.own() && !send(&tx, &mut skips, view.set_own(now)).await {
                            return;
                        }
                    }
                },
            }
        };
        tracing::warn!("subnet watch ended: {why}; re-listing");
        Metrics::inc(&metrics.etcd_reconnects);
        backoff.wait().await;
    }
}

/// Reports the skips and sends the events; false once the daemon is gone.
async fn send(tx: &mpsc::Sender<PeerEvent>, skips: &mut SkipLog, up: Update) -> bool {
    for (key, skip) in &up.skipped {
        skips.report(key, skip);
    }
    for ev in up.events {
        if tx.send(ev).await.is_err() {
            return false;
        }
    }
    true
}
