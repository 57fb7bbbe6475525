//! The VXLAN backend, one per address family: `twill.<VNI>` over an IPv4 underlay for the
//! IPv4 pod network, `twill-v6.<VNI>` over an IPv6 underlay for the IPv6 one (flannel's
//! `flannel.<VNI>` and `flannel-v6.<VNI>`: the kernel lets both hold one VNI and port).

use std::marker::PhantomData;

use ipnet::Ipv4Net;

use super::routes::{ProgrammerOf, SegmentOf};
use super::{ApplyStatsOf, Backend, BackendError, DeviceInfo, LocalNodeOf, PeerPath};
use crate::config::BackendConfig;
use crate::netlink::{ethtool, Netlink, NlFamily, VxlanSpecOf};
use crate::peer::PeerOf;
use crate::reconcile::{Path, PeerChangeOf};
use crate::subnet::Cidr;

/// Headroom VXLAN needs over an IPv4 underlay (outer IP 20 + UDP 8 + VXLAN 8 + inner Ethernet 14).
pub const VXLAN_OVERHEAD: u32 = 50;

/// Over an IPv6 underlay the outer header is 40 bytes: 70 (flannel takes 50 and the kernel
/// silently clamps the device MTU, so pods get one too large).
pub const VXLAN6_OVERHEAD: u32 = 70;

/// The encapsulation overhead over family `N`'s underlay.
pub fn overhead<N: Cidr>() -> u32 {
    if N::BITS == 128 {
        VXLAN6_OVERHEAD
    } else {
        VXLAN_OVERHEAD
    }
}

/// What the name of our VXLAN device of family `N` starts with.
pub fn device_prefix<N: Cidr>() -> &'static str {
    prefixes::<N>().0
}

/// What our device's name starts with, and flanneld's for the same family.
fn prefixes<N: Cidr>() -> (&'static str, &'static str) {
    if N::BITS == 128 {
        ("twill-v6.", "flannel-v6.")
    } else {
        ("twill.", "flannel.")
    }
}

pub struct VxlanBackendOf<N: Cidr> {
    cfg: BackendConfig,
    name: String,
    ifindex: Option<u32>,
    /// The underlay's networks: DirectRouting routes peers inside them directly, and a host-gw
    /// peer (no VTEP) can only be reached there.
    segment: SegmentOf<N>,
    programmer: ProgrammerOf<N>,
    /// Transmit checksum offload to enforce on the device (None: the kernel's default).
    tx_checksum: Option<bool>,
    family: PhantomData<N>,
}

pub type VxlanBackend = VxlanBackendOf<Ipv4Net>;

impl<N: NlFamily> VxlanBackendOf<N> {
    pub fn new(nl: Netlink, cfg: &BackendConfig, tx_checksum: Option<bool>) -> Self {
        VxlanBackendOf {
            cfg: cfg.clone(),
            name: format!("{}{}", prefixes::<N>().0, cfg.vni),
            ifindex: None,
            segment: SegmentOf::default(),
            programmer: ProgrammerOf::new(nl, true),
            tx_checksum,
            family: PhantomData,
        }
    }

    /// The device name, `twill.<VNI>` (`twill-v6.<VNI>`).
    pub fn device_name(&self) -> &str {
        &self.name
    }

    /// The VXLAN device's ifindex once `setup` ran.
    pub fn ifindex(&self) -> Option<u32> {
        self.ifindex
    }

    fn nl(&self) -> &Netlink {
        &self.programmer.nl
    }

    fn device(&self) -> Result<u32, BackendError> {
        self.ifindex
            .ok_or_else(|| BackendError::DeviceGone(self.name.clone()))
    }

    /// Fails with DeviceGone if our ifindex no longer names our device.
    async fn check_device(&self) -> Result<u32, BackendError> {
        let idx = self.device()?;
        match self.nl().link_name(idx).await? {
            Some(n) if n == self.name => Ok(idx),
            _ => Err(BackendError::DeviceGone(self.name.clone())),
        }
    }

    /// A DeviceGone from the kernel writes names our device and forgets its index.
    fn gone<T>(&mut self, r: Result<T, BackendError>) -> Result<T, BackendError> {
        if let Err(BackendError::DeviceGone(_)) = r {
            self.ifindex = None;
            return Err(BackendError::DeviceGone(self.name.clone()));
        }
        r
    }

    /// Creating our device failed with EEXIST: another VXLAN device holds the VNI and port. A
    /// node moving from flanneld still has `flannel.<VNI>`; it is taken over (deleted, its routes
    /// with it, and ours programmed next). Anything else is an error naming the device. `None`:
    /// no such device, the EEXIST came from something else.
    async fn free_vni(&self, spec: &VxlanSpecOf<N>) -> Result<(), Option<BackendError>> {
        let others = self
            .nl()
            .vxlan_devices_using::<N>(spec.vni, spec.port, &spec.name)
            .await
            .map_err(|e| Some(e.into()))?;
        let flannel = format!("{}{}", prefixes::<N>().1, spec.vni);
        match others.as_slice() {
            [] => Err(None),
            [(index, name)] if *name == flannel => {
                tracing::warn!(device = %name, vni = spec.vni, port = spec.port,
                    "taking over from flanneld: deleting its VXLAN device (stop flanneld before starting twilld)");
                self.nl()
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
}

impl<N: NlFamily> VxlanBackendOf<N> {
    /// Deletes our devices for other VNIs (`twill.<N>`, `twill-v6.<N>`), left by a run before the network
    /// config's VNI changed: with them go their neighbours, FDB entries and the routes through
    /// them, which would otherwise stay forever (peers that left meanwhile included).
    async fn remove_other_vnis(&self) -> Result<(), BackendError> {
        for (index, name) in self.nl().vxlan_devices().await? {
            let ours = name
                .strip_prefix(prefixes::<N>().0)
                .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()));
            if ours && name != self.name {
                tracing::info!(device = %name, current = %self.name,
                    "deleting the VXLAN device of an earlier run with another VNI");
                match self.nl().delete_link(index).await {
                    Err(e) if !e.is_no_device() => return Err(e.into()),
                    _ => {}
                }
            }
        }
        Ok(())
    }
}

impl<N: NlFamily> Backend<N> for VxlanBackendOf<N> {
    async fn setup(&mut self, local: &LocalNodeOf<N>) -> Result<DeviceInfo, BackendError> {
        self.remove_other_vnis().await?;
        // A configured MTU is the IPv4 device's (flannel's Backend.MTU); the IPv6 device's
        // encapsulation takes 20 bytes more.
        let extra = overhead::<N>() - VXLAN_OVERHEAD;
        let mtu = match self.cfg.mtu {
            Some(m) => m.saturating_sub(extra),
            None => local.underlay_mtu.saturating_sub(overhead::<N>()),
        };
        let spec = VxlanSpecOf::<N> {
            name: self.name.clone(),
            vni: self.cfg.vni,
            local: local.public_ip,
            underlay_index: local.underlay_index,
            port: self.cfg.port,
            mtu,
            mac: local.vtep_mac,
            addr: N::from_bits(local.subnet.start(), N::BITS).expect("a host route is valid"),
        };
        let ifindex = match self.nl().ensure_vxlan(&spec).await {
            Err(e) if e.errno() == Some(libc::EEXIST) => {
                self.free_vni(&spec)
                    .await
                    .map_err(|c| c.unwrap_or(e.into()))?;
                self.nl().ensure_vxlan(&spec).await?
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
        // Redone at every setup (the daemon runs it again when the underlay's addresses
        // change), so each peer's path follows the underlay.
        self.segment = SegmentOf {
            prefixes: self.nl().addr_prefixes::<N>(local.underlay_index).await?,
            local_ip: Some(local.public_ip),
        };
        tracing::info!(device = %self.name, ifindex, mtu, segment = %self.segment.describe(), "vxlan device ready");
        Ok(DeviceInfo {
            name: self.name.clone(),
            ifindex,
            mtu,
            tx_checksum,
            overlay: true,
        })
    }

    async fn apply(
        &mut self,
        changes: &[PeerChangeOf<N>],
    ) -> Result<ApplyStatsOf<N>, BackendError> {
        let idx = self.device()?;
        let (cfg, segment) = (&self.cfg, &self.segment);
        let r = self
            .programmer
            .apply(idx, changes, |p| path(cfg, segment, p))
            .await;
        self.gone(r)
    }

    async fn reconcile(&mut self, desired: &[PeerOf<N>]) -> Result<ApplyStatsOf<N>, BackendError> {
        let idx = self.check_device().await?;
        let (cfg, segment) = (&self.cfg, &self.segment);
        let r = self
            .programmer
            .reconcile(idx, Some(idx), desired, |p| path(cfg, segment, p))
            .await;
        self.gone(r)
    }

    fn path(&self, peer: &PeerOf<N>) -> PeerPath {
        path(&self.cfg, &self.segment, peer)
    }
}

/// A VTEP peer goes through the overlay, or directly when DirectRouting is on and it shares our
/// segment (Calico's CrossSubnet idea: encapsulate only across subnets). A peer without a VTEP
/// (a host-gw lease) can only be reached directly.
fn path<N: Cidr>(cfg: &BackendConfig, segment: &SegmentOf<N>, p: &PeerOf<N>) -> PeerPath {
    let direct = segment.contains(p.public_ip);
    match p.vtep_mac {
        Some(_) if cfg.direct_routing && direct => PeerPath::ok(Path::Direct),
        Some(_) => PeerPath::ok(Path::Overlay),
        None if direct => PeerPath::ok(Path::Direct),
        None => PeerPath::unreachable(format!(
            "a host-gw node (no VXLAN endpoint) whose address {} is not on this node's \
             underlay segment ({}): it can only be routed to directly",
            p.public_ip,
            segment.describe()
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::peer::test_peer;

    fn segment() -> SegmentOf<Ipv4Net> {
        SegmentOf {
            prefixes: vec!["198.18.0.0/24".parse().unwrap()],
            local_ip: Some("198.18.0.11".parse().unwrap()),
        }
    }

    #[test]
    fn direct_routing_is_decided_per_peer() {
        let mut cfg = BackendConfig::default();
        let near = test_peer(2, 12, 2); // 198.18.0.12: on our segment
        let mut far = test_peer(3, 12, 3);
        far.public_ip = "198.18.1.13".parse().unwrap();
        assert_eq!(path(&cfg, &segment(), &near).path, Path::Overlay);
        cfg.direct_routing = true;
        assert_eq!(path(&cfg, &segment(), &near).path, Path::Direct);
        assert_eq!(path(&cfg, &segment(), &far).path, Path::Overlay);
    }

    #[test]
    fn a_host_gw_peer_is_direct_or_unreachable() {
        let cfg = BackendConfig::default();
        let mut near = test_peer(2, 12, 2);
        near.vtep_mac = None;
        assert_eq!(path(&cfg, &segment(), &near).path, Path::Direct);
        let mut far = near;
        far.public_ip = "203.0.113.9".parse().unwrap();
        let p = path(&cfg, &segment(), &far);
        assert_eq!(p.path, Path::Unreachable);
        assert!(p.reason.unwrap().contains("198.18.0.0/24"));
    }
}
