//! The peers the leases ask for, and keeping the backend's kernel state in line with them:
//! incremental changes from lease events, full reconciles on snapshots and timers. A peer whose
//! subnet would capture this node's own traffic (`overlap`) is listed but never routed.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use ipnet::Ipv4Net;
use tracing::{debug, error, info, warn};

use super::node::setup_or_log;
use super::status::{PeerStatus, ReconcileStatus, Shared};
use crate::backend::{ApplyStats, Backend, BackendError, DeviceInfo, LocalNode, PeerPath};
use crate::metrics::Metrics;
use crate::overlap::HostNets;
use crate::peer::Peer;
use crate::reconcile::{Path, PeerChange};
use crate::registry::PeerEvent;

/// Desired state (the peers from the leases) and how far the kernel is known to match it.
pub(super) struct Sync {
    desired: BTreeMap<Ipv4Net, Peer>,
    /// What pod routes must not capture.
    host: HostNets,
    /// The peers of `desired` that are routed: all but those `host` refuses.
    routed: BTreeMap<Ipv4Net, Peer>,
    /// Peers not routed, and why.
    refused: BTreeMap<Ipv4Net, String>,
    /// Peers whose entries the kernel refused: not "programmed" until a batch that touches
    /// them succeeds (every reconcile retries them).
    unprogrammed: BTreeSet<Ipv4Net>,
    /// The last reconcile failed as a whole: no peer is known to be programmed.
    reconcile_failed: bool,
    /// A snapshot of the leases arrived: `desired` is complete and worth reconciling against.
    pub(super) listed: bool,
    /// A full reconcile succeeded at least once.
    pub(super) synced_once: bool,
    /// Peers no path reaches, with the reason last logged.
    unreachable: BTreeMap<Ipv4Net, String>,
}

impl Sync {
    pub(super) fn new(host: HostNets) -> Self {
        Sync {
            desired: BTreeMap::new(),
            host,
            routed: BTreeMap::new(),
            refused: BTreeMap::new(),
            unprogrammed: BTreeSet::new(),
            reconcile_failed: false,
            listed: false,
            synced_once: false,
            unreachable: BTreeMap::new(),
        }
    }

    pub(super) async fn handle_events<B: Backend>(
        &mut self,
        backend: &mut B,
        device: &mut DeviceInfo,
        local: &LocalNode,
        batch: Vec<PeerEvent>,
        shared: &Shared,
    ) {
        let before = self.routed.clone();
        if fold_events(&mut self.desired, batch) == Folded::Full {
            self.listed = true;
            self.reconcile(backend, device, local, shared, "lease resync")
                .await;
            return;
        }
        // One peer's address can change whether another is routed (a subnet covering it).
        self.route_view();
        let changes = routed_changes(&before, &self.routed);
        if changes.is_empty() {
            self.publish(backend, shared);
            return;
        }
        for c in &changes {
            match (&c.old, &c.new) {
                (None, Some(p)) => {
                    info!(subnet = %p.subnet, public_ip = %p.public_ip, mac = ?p.vtep_mac, "peer added")
                }
                (Some(p), None) => info!(subnet = %p.subnet, "peer removed"),
                (_, Some(p)) => {
                    info!(subnet = %p.subnet, public_ip = %p.public_ip, mac = ?p.vtep_mac, "peer changed")
                }
                _ => {}
            }
        }
        let applied = backend.apply(&changes).await;
        match applied {
            Ok(stats) => {
                self.record(&stats, shared);
                for c in &changes {
                    for p in c.old.iter().chain(c.new.iter()) {
                        self.unprogrammed.remove(&p.subnet);
                    }
                }
                self.unprogrammed.extend(stats.unprogrammed.iter().copied());
            }
            Err(e) => {
                warn!(error = %e, "programming peers failed; repairing with a full reconcile");
                self.reconcile(backend, device, local, shared, "apply failed")
                    .await;
            }
        }
        self.publish(backend, shared);
    }

    pub(super) async fn reconcile<B: Backend>(
        &mut self,
        backend: &mut B,
        device: &mut DeviceInfo,
        local: &LocalNode,
        shared: &Shared,
        why: &str,
    ) {
        self.route_view();
        let desired: Vec<Peer> = self.routed.values().copied().collect();
        let start = Instant::now();
        let mut res = backend.reconcile(&desired).await;
        if matches!(res, Err(BackendError::DeviceGone(_))) {
            warn!("overlay device vanished; recreating it");
            *device = setup_or_log(backend, local, device.clone()).await;
            res = backend.reconcile(&desired).await;
        }
        let elapsed = start.elapsed();
        let m = &shared.metrics;
        Metrics::inc(&m.reconciles);
        m.last_reconcile_micros
            .store(elapsed.as_micros() as u64, Relaxed);
        m.reconcile_micros_total
            .fetch_add(elapsed.as_micros() as u64, Relaxed);
        match res {
            Ok(stats) => {
                if stats.added + stats.removed + stats.failed > 0 {
                    info!(
                        why,
                        added = stats.added,
                        removed = stats.removed,
                        failed = stats.failed,
                        peers = desired.len(),
                        "reconciled"
                    );
                } else {
                    debug!(why, peers = desired.len(), "reconciled: kernel in sync");
                }
                self.record(&stats, shared);
                self.unprogrammed = stats.unprogrammed.iter().copied().collect();
                self.reconcile_failed = false;
                self.synced_once = true;
                let at_unix_ms = SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .map(|d| d.as_millis() as u64)
                    .unwrap_or(0);
                shared.update(|s| {
                    s.last_reconcile = Some(ReconcileStatus {
                        at_unix_ms,
                        duration_ms: elapsed.as_secs_f64() * 1e3,
                        added: stats.added,
                        removed: stats.removed,
                        failed: stats.failed,
                    })
                });
            }
            Err(e) => {
                error!(why, error = %e, "reconcile failed; will retry");
                self.reconcile_failed = true;
            }
        }
        self.publish(backend, shared);
    }

    /// The node's own networks changed (underlay addresses): the next reconcile routes by them.
    pub(super) fn set_host(&mut self, host: HostNets) {
        self.host = host;
    }

    pub(super) fn host(&self) -> &HostNets {
        &self.host
    }

    /// Splits `desired` into routed and refused peers; a newly refused one is logged.
    fn route_view(&mut self) {
        let ips: BTreeSet<Ipv4Addr> = self.desired.values().map(|p| p.public_ip).collect();
        let mut routed = BTreeMap::new();
        let mut refused = BTreeMap::new();
        for p in self.desired.values() {
            match self.host.refuse(p.subnet, &ips) {
                Some(why) => {
                    if self.refused.get(&p.subnet) != Some(&why) {
                        warn!(subnet = %p.subnet, public_ip = %p.public_ip, "peer not routed: {why}");
                    }
                    refused.insert(p.subnet, why);
                }
                None => {
                    routed.insert(p.subnet, *p);
                }
            }
        }
        self.routed = routed;
        self.refused = refused;
    }

    fn record(&self, stats: &ApplyStats, shared: &Shared) {
        let m = &shared.metrics;
        m.kernel_entries_added.fetch_add(stats.added, Relaxed);
        m.kernel_entries_removed.fetch_add(stats.removed, Relaxed);
        m.kernel_entry_failures.fetch_add(stats.failed, Relaxed);
    }

    /// Status and metrics per peer; a peer that newly cannot be served is logged once, with
    /// the reason.
    fn publish<B: Backend>(&mut self, backend: &B, shared: &Shared) {
        let m = &shared.metrics;
        m.peers.store(self.desired.len() as u64, Relaxed);
        m.peers_refused_overlap
            .store(self.refused.len() as u64, Relaxed);
        let mut unreachable = BTreeMap::new();
        let peers: Vec<PeerStatus> = self
            .desired
            .values()
            .map(|p| {
                if let Some(why) = self.refused.get(&p.subnet) {
                    return PeerStatus {
                        subnet: p.subnet,
                        public_ip: p.public_ip,
                        vtep_mac: p.vtep_mac,
                        programmed: false,
                        path: "none",
                        reason: Some(format!("not routed: {why}")),
                    };
                }
                let PeerPath { path, reason } = backend.path(p);
                if let Some(why) = &reason {
                    if self.unreachable.get(&p.subnet) != Some(why) {
                        warn!(subnet = %p.subnet, public_ip = %p.public_ip, "peer cannot be reached: {why}");
                    }
                    unreachable.insert(p.subnet, why.clone());
                }
                PeerStatus {
                    subnet: p.subnet,
                    public_ip: p.public_ip,
                    vtep_mac: p.vtep_mac,
                    programmed: !self.reconcile_failed
                        && !self.unprogrammed.contains(&p.subnet),
                    path: match path {
                        Path::Direct => "direct",
                        Path::Overlay => "vxlan",
                        Path::Unreachable => "none",
                        Path::Userspace => "udp",
                    },
                    reason,
                }
            })
            .collect();
        m.peers_unreachable.store(unreachable.len() as u64, Relaxed);
        self.unreachable = unreachable;
        shared.update(|s| s.peers = peers);
    }
}

/// One change per subnet whose routed peer differs between `before` and `after`.
fn routed_changes(
    before: &BTreeMap<Ipv4Net, Peer>,
    after: &BTreeMap<Ipv4Net, Peer>,
) -> Vec<PeerChange> {
    let nets: BTreeSet<&Ipv4Net> = before.keys().chain(after.keys()).collect();
    nets.into_iter()
        .filter_map(|n| {
            let (old, new) = (before.get(n).copied(), after.get(n).copied());
            (old != new).then_some(PeerChange { old, new })
        })
        .collect()
}

/// What a batch of peer events asks for.
#[derive(Debug, PartialEq, Eq)]
pub enum Folded {
    /// A snapshot arrived: compare everything with the kernel.
    Full,
    /// Incremental: one change per subnet whose value differs from before the batch.
    Changes(Vec<PeerChange>),
}

/// Applies a batch of peer events to `desired`. Several events for one subnet make one change
/// (first old value, last new value), so applying the changes in phases stays correct.
pub fn fold_events(desired: &mut BTreeMap<Ipv4Net, Peer>, batch: Vec<PeerEvent>) -> Folded {
    // A snapshot in the batch supersedes everything before it.
    let start = batch
        .iter()
        .rposition(|e| matches!(e, PeerEvent::Snapshot(_)));
    let mut full = false;
    let mut before: BTreeMap<Ipv4Net, Option<Peer>> = BTreeMap::new();
    for ev in batch.into_iter().skip(start.unwrap_or(0)) {
        match ev {
            PeerEvent::Snapshot(peers) => {
                *desired = peers.into_iter().map(|p| (p.subnet, p)).collect();
                full = true;
            }
            PeerEvent::Upsert(p) => {
                let old = desired.insert(p.subnet, p);
                before.entry(p.subnet).or_insert(old);
            }
            PeerEvent::Remove(net) => {
                let old = desired.remove(&net);
                before.entry(net).or_insert(old);
            }
            // About the watcher's health, not the peers (the node keeps track of it).
            PeerEvent::ListFailed(_) => {}
            // twilld does not serve the IPv6 side of a network yet (it says so at start).
            PeerEvent::Snapshot6(_) | PeerEvent::Upsert6(_) | PeerEvent::Remove6(_) => {}
        }
    }
    if full {
        return Folded::Full;
    }
    Folded::Changes(
        before
            .into_iter()
            .filter_map(|(net, old)| {
                let new = desired.get(&net).copied();
                (old != new).then_some(PeerChange { old, new })
            })
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::peer::test_peer as peer;

    #[test]
    fn folds_events_into_one_change_per_subnet() {
        let mut desired: BTreeMap<_, _> = [peer(1, 11, 1), peer(2, 12, 2), peer(3, 13, 3)]
            .into_iter()
            .map(|p| (p.subnet, p))
            .collect();
        let batch = vec![
            PeerEvent::Upsert(peer(2, 12, 8)),
            PeerEvent::Upsert(peer(2, 12, 9)), // two changes of one peer: one change, old -> last
            PeerEvent::Upsert(peer(4, 14, 4)),
            PeerEvent::Remove(peer(3, 13, 3).subnet),
            PeerEvent::Upsert(peer(1, 11, 1)), // unchanged: nothing to do
            PeerEvent::Upsert(peer(5, 15, 5)),
            PeerEvent::Remove(peer(5, 15, 5).subnet), // came and went: nothing to do
        ];
        let Folded::Changes(ch) = fold_events(&mut desired, batch) else {
            panic!("not incremental")
        };
        assert_eq!(ch.len(), 3, "{ch:?}");
        assert!(ch.contains(&PeerChange {
            old: Some(peer(2, 12, 2)),
            new: Some(peer(2, 12, 9))
        }));
        assert!(ch.contains(&PeerChange {
            old: None,
            new: Some(peer(4, 14, 4))
        }));
        assert!(ch.contains(&PeerChange {
            old: Some(peer(3, 13, 3)),
            new: None
        }));
        assert_eq!(desired.len(), 3);
        assert_eq!(
            desired[&peer(2, 0, 0).subnet].vtep_mac,
            peer(2, 12, 9).vtep_mac
        );
    }

    #[test]
    fn a_snapshot_supersedes_earlier_events() {
        let mut desired = BTreeMap::new();
        let batch = vec![
            PeerEvent::Upsert(peer(7, 17, 7)),
            PeerEvent::Snapshot(vec![peer(1, 11, 1)]),
            PeerEvent::Upsert(peer(2, 12, 2)),
        ];
        assert_eq!(fold_events(&mut desired, batch), Folded::Full);
        assert_eq!(
            desired.keys().copied().collect::<Vec<_>>(),
            vec![peer(1, 11, 1).subnet, peer(2, 12, 2).subnet]
        );
    }
}
