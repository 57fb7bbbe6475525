//! The peers the leases ask for, and keeping the backend's kernel state in line with them:
//! incremental changes from lease events, full reconciles on snapshots and timers. A peer whose
//! subnet would capture this node's own traffic (`overlap`) is listed but never routed.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use ipnet::{Ipv4Net, Ipv6Net};
use tracing::{debug, error, info, warn};

use super::side::setup_or_log;
use super::status::{PeerStatusOf, ReconcileStatus, Shared, Status};
use crate::backend::{ApplyStatsOf, Backend, BackendError, DeviceInfo, LocalNodeOf, PeerPath};
use crate::metrics::Metrics;
use crate::netlink::NlFamily;
use crate::overlap::HostNetsOf;
use crate::peer::PeerOf;
use crate::reconcile::{Path, PeerChangeOf};
use crate::registry::PeerEvent;

/// One family's peer events, as the watchers send them inside `PeerEvent`.
#[derive(Debug)]
pub enum FamilyEvent<N: NlFamily> {
    Snapshot(Vec<PeerOf<N>>),
    Upsert(PeerOf<N>),
    Remove(N),
}

/// Where a family's peers come from and where their state is shown.
pub trait SyncFamily: NlFamily {
    /// This family's event, if `ev` is one.
    fn event(ev: PeerEvent) -> Option<FamilyEvent<Self>>;
    /// Peers, peers refused for overlap, peers unreachable.
    fn gauges(m: &Metrics) -> [&AtomicU64; 3];
    fn show(s: &mut Status, peers: Vec<PeerStatusOf<Self>>);
}

impl SyncFamily for Ipv4Net {
    fn event(ev: PeerEvent) -> Option<FamilyEvent<Self>> {
        match ev {
            PeerEvent::Snapshot(p) => Some(FamilyEvent::Snapshot(p)),
            PeerEvent::Upsert(p) => Some(FamilyEvent::Upsert(p)),
            PeerEvent::Remove(n) => Some(FamilyEvent::Remove(n)),
            _ => None,
        }
    }
    fn gauges(m: &Metrics) -> [&AtomicU64; 3] {
        [&m.peers, &m.peers_refused_overlap, &m.peers_unreachable]
    }
    fn show(s: &mut Status, peers: Vec<PeerStatusOf<Self>>) {
        s.peers = peers;
    }
}

impl SyncFamily for Ipv6Net {
    fn event(ev: PeerEvent) -> Option<FamilyEvent<Self>> {
        match ev {
            PeerEvent::Snapshot6(p) => Some(FamilyEvent::Snapshot(p)),
            PeerEvent::Upsert6(p) => Some(FamilyEvent::Upsert(p)),
            PeerEvent::Remove6(n) => Some(FamilyEvent::Remove(n)),
            _ => None,
        }
    }
    fn gauges(m: &Metrics) -> [&AtomicU64; 3] {
        [&m.peers6, &m.peers6_refused_overlap, &m.peers6_unreachable]
    }
    fn show(s: &mut Status, peers: Vec<PeerStatusOf<Self>>) {
        s.peers6 = Some(peers);
    }
}

/// Desired state (the peers from the leases) and how far the kernel is known to match it, for
/// one address family.
pub(super) struct SyncOf<N: SyncFamily> {
    desired: BTreeMap<N, PeerOf<N>>,
    /// What pod routes must not capture.
    host: HostNetsOf<N>,
    /// The peers of `desired` that are routed: all but those `host` refuses.
    routed: BTreeMap<N, PeerOf<N>>,
    /// Peers not routed, and why.
    refused: BTreeMap<N, String>,
    /// Peers whose entries the kernel refused: not "programmed" until a batch that touches
    /// them succeeds (every reconcile retries them).
    unprogrammed: BTreeSet<N>,
    /// The last reconcile failed as a whole: no peer is known to be programmed.
    reconcile_failed: bool,
    /// A snapshot of the leases arrived: `desired` is complete and worth reconciling against.
    pub(super) listed: bool,
    /// A full reconcile succeeded at least once.
    pub(super) synced_once: bool,
    /// Peers no path reaches, with the reason last logged.
    unreachable: BTreeMap<N, String>,
}

impl<N: SyncFamily> SyncOf<N> {
    pub(super) fn new(host: HostNetsOf<N>) -> Self {
        SyncOf {
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

    pub(super) async fn handle_events<B: Backend<N>>(
        &mut self,
        backend: &mut B,
        device: &mut DeviceInfo,
        local: &LocalNodeOf<N>,
        batch: Vec<PeerEvent>,
        shared: &Shared,
    ) {
        let before = self.routed.clone();
        if fold_events(&mut self.desired, batch) == FoldedOf::Full {
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
                    info!(family = N::FAMILY, subnet = %p.subnet, public_ip = %p.public_ip, mac = ?p.vtep_mac, "peer added")
                }
                (Some(p), None) => info!(family = N::FAMILY, subnet = %p.subnet, "peer removed"),
                (_, Some(p)) => {
                    info!(family = N::FAMILY, subnet = %p.subnet, public_ip = %p.public_ip, mac = ?p.vtep_mac, "peer changed")
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

    pub(super) async fn reconcile<B: Backend<N>>(
        &mut self,
        backend: &mut B,
        device: &mut DeviceInfo,
        local: &LocalNodeOf<N>,
        shared: &Shared,
        why: &str,
    ) {
        self.route_view();
        let desired: Vec<PeerOf<N>> = self.routed.values().copied().collect();
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
                        family = N::FAMILY,
                        added = stats.added,
                        removed = stats.removed,
                        failed = stats.failed,
                        peers = desired.len(),
                        "reconciled"
                    );
                } else {
                    debug!(
                        why,
                        family = N::FAMILY,
                        peers = desired.len(),
                        "reconciled: kernel in sync"
                    );
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
                error!(why, family = N::FAMILY, error = %e, "reconcile failed; will retry");
                self.reconcile_failed = true;
            }
        }
        self.publish(backend, shared);
    }

    /// The node's own networks changed (underlay addresses): the next reconcile routes by them.
    pub(super) fn set_host(&mut self, host: HostNetsOf<N>) {
        self.host = host;
    }

    pub(super) fn host(&self) -> &HostNetsOf<N> {
        &self.host
    }

    /// Splits `desired` into routed and refused peers; a newly refused one is logged.
    fn route_view(&mut self) {
        let ips: BTreeSet<N::Addr> = self.desired.values().map(|p| p.public_ip).collect();
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

    fn record(&self, stats: &ApplyStatsOf<N>, shared: &Shared) {
        let m = &shared.metrics;
        m.kernel_entries_added.fetch_add(stats.added, Relaxed);
        m.kernel_entries_removed.fetch_add(stats.removed, Relaxed);
        m.kernel_entry_failures.fetch_add(stats.failed, Relaxed);
    }

    /// Status and metrics per peer; a peer that newly cannot be served is logged once, with
    /// the reason.
    fn publish<B: Backend<N>>(&mut self, backend: &B, shared: &Shared) {
        let [peers_gauge, refused_gauge, unreachable_gauge] = N::gauges(&shared.metrics);
        peers_gauge.store(self.desired.len() as u64, Relaxed);
        refused_gauge.store(self.refused.len() as u64, Relaxed);
        let mut unreachable = BTreeMap::new();
        let peers: Vec<PeerStatusOf<N>> = self
            .desired
            .values()
            .map(|p| {
                if let Some(why) = self.refused.get(&p.subnet) {
                    return PeerStatusOf {
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
                PeerStatusOf {
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
        unreachable_gauge.store(unreachable.len() as u64, Relaxed);
        self.unreachable = unreachable;
        shared.update(|s| N::show(s, peers));
    }
}

/// One change per subnet whose routed peer differs between `before` and `after`.
fn routed_changes<N: SyncFamily>(
    before: &BTreeMap<N, PeerOf<N>>,
    after: &BTreeMap<N, PeerOf<N>>,
) -> Vec<PeerChangeOf<N>> {
    let nets: BTreeSet<&N> = before.keys().chain(after.keys()).collect();
    nets.into_iter()
        .filter_map(|n| {
            let (old, new) = (before.get(n).copied(), after.get(n).copied());
            (old != new).then_some(PeerChangeOf { old, new })
        })
        .collect()
}

/// What a batch of peer events asks for.
#[derive(Debug, PartialEq, Eq)]
pub enum FoldedOf<N: NlFamily> {
    /// A snapshot arrived: compare everything with the kernel.
    Full,
    /// Incremental: one change per subnet whose value differs from before the batch.
    Changes(Vec<PeerChangeOf<N>>),
}

pub type Folded = FoldedOf<Ipv4Net>;

/// Applies family `N`'s events of a batch to `desired` (the others are not its business).
/// Several events for one subnet make one change (first old value, last new value), so
/// applying the changes in phases stays correct.
pub fn fold_events<N: SyncFamily>(
    desired: &mut BTreeMap<N, PeerOf<N>>,
    batch: Vec<PeerEvent>,
) -> FoldedOf<N> {
    let batch: Vec<FamilyEvent<N>> = batch.into_iter().filter_map(N::event).collect();
    // A snapshot in the batch supersedes everything before it.
    let start = batch
        .iter()
        .rposition(|e| matches!(e, FamilyEvent::Snapshot(_)));
    let mut full = false;
    let mut before: BTreeMap<N, Option<PeerOf<N>>> = BTreeMap::new();
    for ev in batch.into_iter().skip(start.unwrap_or(0)) {
        match ev {
            FamilyEvent::Snapshot(peers) => {
                *desired = peers.into_iter().map(|p| (p.subnet, p)).collect();
                full = true;
            }
            FamilyEvent::Upsert(p) => {
                let old = desired.insert(p.subnet, p);
                before.entry(p.subnet).or_insert(old);
            }
            FamilyEvent::Remove(net) => {
                let old = desired.remove(&net);
                before.entry(net).or_insert(old);
            }
        }
    }
    if full {
        return FoldedOf::Full;
    }
    FoldedOf::Changes(
        before
            .into_iter()
            .filter_map(|(net, old)| {
                let new = desired.get(&net).copied();
                (old != new).then_some(PeerChangeOf { old, new })
            })
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::peer::test_peer as peer;
    use crate::reconcile::PeerChange;

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

    #[test]
    fn each_family_folds_only_its_own_events() {
        let p6 = |n: u16| PeerOf::<Ipv6Net> {
            subnet: format!("fd00:10:244:{n:x}::/64").parse().unwrap(),
            public_ip: format!("fd00:198:18::{n:x}").parse().unwrap(),
            vtep_mac: Some(crate::mac::MacAddr([2, 0, 0, 0, 6, n as u8])),
        };
        let batch = || {
            vec![
                PeerEvent::Snapshot6(vec![p6(1)]),
                PeerEvent::Upsert(peer(2, 12, 2)),
                PeerEvent::Snapshot(vec![peer(1, 11, 1)]),
                PeerEvent::Upsert6(p6(2)),
                PeerEvent::Remove6(p6(1).subnet),
                PeerEvent::ListFailed("x".into()),
            ]
        };
        let mut v6: BTreeMap<Ipv6Net, _> = BTreeMap::new();
        // The v4 snapshot is not the v6 family's: its own (earlier) one makes it full.
        assert_eq!(fold_events(&mut v6, batch()), FoldedOf::Full);
        assert_eq!(v6.keys().copied().collect::<Vec<_>>(), vec![p6(2).subnet]);
        let mut v4: BTreeMap<Ipv4Net, _> = BTreeMap::new();
        assert_eq!(fold_events(&mut v4, batch()), Folded::Full);
        assert_eq!(
            v4.keys().copied().collect::<Vec<_>>(),
            vec![peer(1, 0, 0).subnet]
        );
        // Without a v6 snapshot, the v6 events are changes; v4 ones are not among them.
        let mut v6 = BTreeMap::from([(p6(1).subnet, p6(1))]);
        let FoldedOf::Changes(ch) = fold_events(&mut v6, batch().split_off(1)) else {
            panic!("not incremental")
        };
        assert_eq!(
            ch,
            vec![
                PeerChangeOf {
                    old: Some(p6(1)),
                    new: None
                },
                PeerChangeOf {
                    old: None,
                    new: Some(p6(2))
                },
            ]
        );
    }
}
