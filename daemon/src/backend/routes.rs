//! What every backend shares: deciding each peer's path, turning peer changes into kernel
//! operations (`reconcile`'s pure planner), running them and accounting for what failed.

use std::collections::{BTreeSet, HashMap, HashSet};

use ipnet::Ipv4Net;

use super::{ApplyStatsOf, BackendError, PeerPath};
use crate::netlink::{ApplyReportOf, Netlink, NlFamily};
use crate::peer::PeerOf;
use crate::reconcile::{self, EntryKeyOf, OpOf, Path, PeerChangeOf};
use crate::subnet::Cidr;

/// The underlay's own networks: a peer whose public IP is in one is on our L2 segment and can
/// be routed to directly (the kernel would refuse a gateway that is not on-link).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SegmentOf<N: Cidr> {
    pub prefixes: Vec<N>,
    pub local_ip: Option<N::Addr>,
}

pub type Segment = SegmentOf<Ipv4Net>;

impl<N: Cidr> Default for SegmentOf<N> {
    fn default() -> Self {
        SegmentOf {
            prefixes: Vec::new(),
            local_ip: None,
        }
    }
}

impl<N: Cidr> SegmentOf<N> {
    pub fn contains(&self, ip: N::Addr) -> bool {
        Some(ip) != self.local_ip && self.prefixes.iter().any(|n| n.contains_addr(ip))
    }

    pub fn describe(&self) -> String {
        match self.prefixes.as_slice() {
            [] => format!("none (the underlay interface has no {} prefix)", N::FAMILY),
            p => p
                .iter()
                .map(|n| n.to_string())
                .collect::<Vec<_>>()
                .join(", "),
        }
    }
}

/// The peers as last programmed, and the kernel writes for them.
pub struct ProgrammerOf<N: Cidr> {
    pub nl: Netlink,
    /// By subnet: an incremental removal must not delete an entry another peer still uses
    /// (same MAC and IP after a re-lease).
    peers: HashMap<N, PeerOf<N>>,
    /// The device the ops name is our overlay device (its routes are ours to replace), not
    /// the underlay.
    overlay: bool,
}

pub type Programmer = ProgrammerOf<Ipv4Net>;

impl<N: NlFamily> ProgrammerOf<N> {
    pub fn new(nl: Netlink, overlay: bool) -> Self {
        ProgrammerOf {
            nl,
            peers: HashMap::new(),
            overlay,
        }
    }

    /// Programs `changes` on device `ifindex`, each peer on the path `path` gives it.
    pub async fn apply(
        &mut self,
        ifindex: u32,
        changes: &[PeerChangeOf<N>],
        path: impl Fn(&PeerOf<N>) -> PeerPath,
    ) -> Result<ApplyStatsOf<N>, BackendError> {
        let mut ops = reconcile::change_ops_with(changes, |p| path(p).path);
        for c in changes {
            if let Some(o) = c.old {
                self.peers.remove(&o.subnet);
            }
            if let Some(n) = c.new {
                self.peers.insert(n.subnet, n);
            }
        }
        // Keep entries a remaining overlay peer still needs (peers may share a MAC or VTEP
        // address). Only deletions need the check, so a join costs nothing per existing peer.
        if ops
            .iter()
            .any(|op| matches!(op, OpOf::DelFdb { .. } | OpOf::DelNeigh { .. }))
        {
            let overlay: Vec<&PeerOf<N>> = self
                .peers
                .values()
                .filter(|p| path(p).path == Path::Overlay)
                .collect();
            ops.retain(|op| match op {
                OpOf::DelFdb { mac, dst } => !overlay
                    .iter()
                    .any(|p| p.vtep_mac == Some(*mac) && p.public_ip == *dst),
                OpOf::DelNeigh { ip, .. } => !overlay.iter().any(|p| p.gateway() == *ip),
                _ => true,
            });
        }
        self.run(ifindex, ops, &path).await
    }

    /// Compares the kernel (`dump_ifindex`: the overlay device whose entries are ours, or None
    /// when only our routes count) with `desired` and fixes both ways.
    pub async fn reconcile(
        &mut self,
        ifindex: u32,
        dump_ifindex: Option<u32>,
        desired: &[PeerOf<N>],
        path: impl Fn(&PeerOf<N>) -> PeerPath,
    ) -> Result<ApplyStatsOf<N>, BackendError> {
        let actual = self.nl.dump_entries::<N>(dump_ifindex).await?;
        let ops = reconcile::diff_with(desired, &actual, |p| path(p).path);
        self.peers = desired.iter().map(|p| (p.subnet, *p)).collect();
        if !ops.is_empty() {
            tracing::info!(ops = ops.len(), "reconcile: kernel differs from leases");
        }
        self.run(ifindex, ops, &path).await
    }

    async fn run(
        &mut self,
        ifindex: u32,
        ops: Vec<OpOf<N>>,
        path: &impl Fn(&PeerOf<N>) -> PeerPath,
    ) -> Result<ApplyStatsOf<N>, BackendError> {
        let owned = self.overlay.then_some(ifindex);
        let ApplyReportOf { applied: _, failed } = self.nl.apply_owned(ifindex, owned, &ops).await;
        let mut gone = false;
        let mut failed_deletes = 0;
        for (i, (op, e)) in failed.iter().enumerate() {
            gone |= e.is_no_device();
            failed_deletes += u64::from(op.is_delete());
            // One line per failure, but not thousands when the device is gone.
            if i < 20 {
                tracing::warn!(op = ?op, error = %e, "kernel update failed");
            }
        }
        if failed.len() > 20 {
            tracing::warn!(count = failed.len(), "kernel updates failed");
        }
        let deletes = ops.iter().filter(|o| o.is_delete()).count() as u64;
        // A failed add leaves the peers that need that entry unreachable; a failed delete only
        // leaves a stale entry behind (and the next reconcile tries again).
        let refused: HashSet<EntryKeyOf<N>> = failed
            .iter()
            .filter(|(op, _)| !op.is_delete())
            .map(|(op, _)| EntryKeyOf::of(op))
            .collect();
        let mut unprogrammed: BTreeSet<N> = self
            .peers
            .values()
            .filter(|p| EntryKeyOf::of_peer(p).iter().any(|k| refused.contains(k)))
            .map(|p| p.subnet)
            .collect();
        // Peers that cannot be served on any path are never programmed.
        unprogrammed.extend(
            self.peers
                .values()
                .filter(|p| path(p).path == Path::Unreachable)
                .map(|p| p.subnet),
        );
        if gone {
            return Err(BackendError::DeviceGone(format!("#{ifindex}")));
        }
        Ok(ApplyStatsOf {
            added: ops.len() as u64 - deletes - (failed.len() as u64 - failed_deletes),
            removed: deletes - failed_deletes,
            failed: failed.len() as u64,
            unprogrammed: unprogrammed.into_iter().collect(),
        })
    }
}
