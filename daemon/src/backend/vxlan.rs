//! The VXLAN backend.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::net::Ipv4Addr;

use ipnet::Ipv4Net;

use super::{ApplyStats, Backend, BackendError, DeviceInfo, LocalNode};
use crate::config::BackendConfig;
use crate::netlink::{ethtool, ApplyReport, Netlink, VxlanSpec};
use crate::peer::Peer;
use crate::reconcile::{self, EntryKey, Op, PeerChange};

/// Headroom VXLAN needs over an IPv4 underlay (outer IP 20 + UDP 8 + VXLAN 8 + inner Ethernet 14).
const VXLAN_OVERHEAD: u32 = 50;

pub struct VxlanBackend {
    nl: Netlink,
    cfg: BackendConfig,
    name: String,
    ifindex: Option<u32>,
    /// The underlay's own subnet, for DirectRouting (peers inside it are on-link).
    underlay_net: Option<Ipv4Net>,
    local_ip: Option<Ipv4Addr>,
    /// What we last programmed, by subnet: an incremental removal must not delete an entry
    /// another peer still uses (same MAC and IP after a re-lease).
    peers: HashMap<Ipv4Net, Peer>,
    /// Transmit checksum offload to enforce on the device (None: the kernel's default).
    tx_checksum: Option<bool>,
}

impl VxlanBackend {
    pub fn new(nl: Netlink, cfg: &BackendConfig, tx_checksum: Option<bool>) -> Self {
        VxlanBackend {
            nl,
            cfg: cfg.clone(),
            name: format!("twill.{}", cfg.vni),
            ifindex: None,
            underlay_net: None,
            local_ip: None,
            peers: HashMap::new(),
            tx_checksum,
        }
    }

    /// The device name, `twill.<VNI>`.
    pub fn device_name(&self) -> &str {
        &self.name
    }

    /// The VXLAN device's ifindex once `setup` ran.
    pub fn ifindex(&self) -> Option<u32> {
        self.ifindex
    }

    fn is_direct(&self, p: &Peer) -> bool {
        self.cfg.direct_routing
            && Some(p.public_ip) != self.local_ip
            && self.underlay_net.is_some_and(|n| n.contains(&p.public_ip))
    }

    fn device(&self) -> Result<u32, BackendError> {
        self.ifindex
            .ok_or_else(|| BackendError::DeviceGone(self.name.clone()))
    }

    /// Fails with DeviceGone if our ifindex no longer names our device.
    async fn check_device(&self) -> Result<u32, BackendError> {
        let idx = self.device()?;
        match self.nl.link_name(idx).await? {
            Some(n) if n == self.name => Ok(idx),
            _ => Err(BackendError::DeviceGone(self.name.clone())),
        }
    }

    /// Creating our device failed with EEXIST: another VXLAN device holds the VNI and port. A
    /// node moving from flanneld still has `flannel.<VNI>`; it is taken over (deleted, its routes
    /// with it, and ours programmed next). Anything else is an error naming the device. `None`:
    /// no such device, the EEXIST came from something else.
    async fn free_vni(&self, spec: &VxlanSpec) -> Result<(), Option<BackendError>> {
        let others = self
            .nl
            .vxlan_devices_using(spec.vni, spec.port, &spec.name)
            .await
            .map_err(|e| Some(e.into()))?;
        let flannel = format!("flannel.{}", spec.vni);
        match others.as_slice() {
            [] => Err(None),
            [(index, name)] if *name == flannel => {
                tracing::warn!(device = %name, vni = spec.vni, port = spec.port,
                    "taking over from flanneld: deleting its VXLAN device (stop flanneld before starting twilld)");
                self.nl
                    .delete_link(*index)
                    .await
                    .map_err(|e| Some(e.into()))
            }
            _ => Err(Some(BackendError::VniInUse {
                vni: spec.vni,
                port: spec.port,
                devices: others
                    .iter()
                    .map(|(_, n)| n.as_str())
                    .collect::<Vec<_>>()
                    .join(", "),
            })),
        }
    }

    async fn run(&mut self, ops: Vec<Op>) -> Result<ApplyStats, BackendError> {
        let idx = self.device()?;
        let ApplyReport { applied: _, failed } = self.nl.apply(idx, &ops).await;
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
        let deletes = ops.iter().filter(|o| o.is_delete()).count() as u64;
        // A failed add leaves the peers that need that entry unreachable; a failed delete only
        // leaves a stale entry behind (and the next reconcile tries again).
        let refused: HashSet<EntryKey> = failed
            .iter()
            .filter(|(op, _)| !op.is_delete())
            .map(|(op, _)| EntryKey::of(op))
            .collect();
        let unprogrammed: BTreeSet<Ipv4Net> = if refused.is_empty() {
            BTreeSet::new()
        } else {
            self.peers
                .values()
                .filter(|p| EntryKey::of_peer(p).iter().any(|k| refused.contains(k)))
                .map(|p| p.subnet)
                .collect()
        };
        let stats = ApplyStats {
            added: ops.len() as u64 - deletes - (failed.len() as u64 - failed_deletes),
            removed: deletes - failed_deletes,
            failed: failed.len() as u64,
            unprogrammed: unprogrammed.into_iter().collect(),
        };
        if failed.len() > 20 {
            tracing::warn!(count = failed.len(), "kernel updates failed");
        }
        if gone {
            self.ifindex = None;
            return Err(BackendError::DeviceGone(self.name.clone()));
        }
        Ok(stats)
    }
}

impl Backend for VxlanBackend {
    async fn setup(&mut self, local: &LocalNode) -> Result<DeviceInfo, BackendError> {
        let mtu = self
            .cfg
            .mtu
            .unwrap_or(local.underlay_mtu.saturating_sub(VXLAN_OVERHEAD));
        let spec = VxlanSpec {
            name: self.name.clone(),
            vni: self.cfg.vni,
            local: local.public_ip,
            underlay_index: local.underlay_index,
            port: self.cfg.port,
            mtu,
            mac: local.vtep_mac,
            addr: Ipv4Net::new(local.subnet.network(), 32).expect("/32 is valid"),
        };
        let ifindex = match self.nl.ensure_vxlan(&spec).await {
            Err(e) if e.errno() == Some(libc::EEXIST) => {
                self.free_vni(&spec)
                    .await
                    .map_err(|c| c.unwrap_or(e.into()))?;
                self.nl.ensure_vxlan(&spec).await?
            }
            r => r?,
        };
        // As enforced, or as the kernel has it. A failure is not fatal: traffic that is not
        // NATed flows either way.
        let tx_checksum = match self.tx_checksum {
            Some(on) => match ethtool::set_tx_checksum(&self.name, on) {
                Ok(changed) => {
                    if changed {
                        tracing::info!(device = %self.name, on, "tx checksum offload set");
                    }
                    Some(on)
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cannot set tx checksum offload");
                    ethtool::tx_checksum(&self.name).ok()
                }
            },
            None => ethtool::tx_checksum(&self.name).ok(),
        };
        self.ifindex = Some(ifindex);
        self.local_ip = Some(local.public_ip);
        self.underlay_net = if self.cfg.direct_routing {
            self.nl
                .addr_prefix(local.underlay_index, local.public_ip)
                .await?
        } else {
            None
        };
        tracing::info!(device = %self.name, ifindex, mtu, "vxlan device ready");
        Ok(DeviceInfo {
            name: self.name.clone(),
            ifindex,
            mtu,
            tx_checksum,
        })
    }

    async fn apply(&mut self, changes: &[PeerChange]) -> Result<ApplyStats, BackendError> {
        self.device()?;
        let mut ops = reconcile::change_ops_with(changes, |p| self.is_direct(p));
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
            .any(|op| matches!(op, Op::DelFdb { .. } | Op::DelNeigh { .. }))
        {
            let overlay: Vec<&Peer> = self.peers.values().filter(|p| !self.is_direct(p)).collect();
            ops.retain(|op| match op {
                Op::DelFdb { mac, dst } => !overlay
                    .iter()
                    .any(|p| p.vtep_mac == *mac && p.public_ip == *dst),
                Op::DelNeigh { ip, .. } => !overlay.iter().any(|p| p.gateway() == *ip),
                _ => true,
            });
        }
        self.run(ops).await
    }

    async fn reconcile(&mut self, desired: &[Peer]) -> Result<ApplyStats, BackendError> {
        let idx = self.check_device().await?;
        let actual = self.nl.dump_entries(idx).await?;
        let ops = reconcile::diff_with(desired, &actual, |p| self.is_direct(p));
        self.peers = desired.iter().map(|p| (p.subnet, *p)).collect();
        if !ops.is_empty() {
            tracing::info!(ops = ops.len(), "reconcile: kernel differs from leases");
        }
        self.run(ops).await
    }
}
