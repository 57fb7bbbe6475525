//! The host-gw backend: for each peer a route `<subnet> via <peer public IP>` on the underlay,
//! no encapsulation, the underlay's full MTU. It needs every peer on the node's own L2 segment;
//! a peer that is not cannot be served, and says so (per peer, in the log, /status and the
//! metrics) instead of getting a route that cannot work. Either family: a dual-stack node
//! runs one for each, the IPv6 one with routes via the peers' IPv6 addresses.

use ipnet::Ipv4Net;

use super::routes::{ProgrammerOf, SegmentOf};
use super::{ApplyStatsOf, Backend, BackendError, DeviceInfo, LocalNodeOf, PeerPath};
use crate::config::BackendConfig;
use crate::netlink::{Netlink, NlFamily};
use crate::peer::PeerOf;
use crate::reconcile::{Path, PeerChangeOf};
use crate::subnet::Cidr;

pub struct HostGwBackendOf<N: Cidr> {
    cfg: BackendConfig,
    underlay: Option<u32>,
    segment: SegmentOf<N>,
    programmer: ProgrammerOf<N>,
}

pub type HostGwBackend = HostGwBackendOf<Ipv4Net>;

impl<N: NlFamily> HostGwBackendOf<N> {
    pub fn new(nl: Netlink, cfg: &BackendConfig) -> Self {
        HostGwBackendOf {
            cfg: cfg.clone(),
            underlay: None,
            segment: SegmentOf::default(),
            programmer: ProgrammerOf::new(nl, false),
        }
    }

    fn underlay(&self) -> Result<u32, BackendError> {
        self.underlay
            .ok_or_else(|| BackendError::DeviceGone("underlay".into()))
    }
}

impl<N: NlFamily> Backend<N> for HostGwBackendOf<N> {
    async fn setup(&mut self, local: &LocalNodeOf<N>) -> Result<DeviceInfo, BackendError> {
        let nl = &self.programmer.nl;
        // A node switched from vxlan: its VXLAN device of this family (and the routes through
        // it) must go, or traffic to peers would keep using it.
        let ours = super::vxlan::device_prefix::<N>();
        for (index, name) in nl.vxlan_devices().await? {
            if name.starts_with(ours) {
                tracing::info!(device = %name, "backend is host-gw: deleting the VXLAN device of an earlier run");
                nl.delete_link(index).await?;
            }
        }
        let name = nl
            .link_name(local.underlay_index)
            .await?
            .ok_or_else(|| BackendError::DeviceGone("underlay".into()))?;
        self.segment = SegmentOf {
            prefixes: nl.addr_prefixes::<N>(local.underlay_index).await?,
            local_ip: Some(local.public_ip),
        };
        self.underlay = Some(local.underlay_index);
        let mtu = self.cfg.mtu.unwrap_or(local.underlay_mtu);
        tracing::info!(underlay = %name, mtu, segment = %self.segment.describe(), family = N::FAMILY, "host-gw ready");
        Ok(DeviceInfo {
            name,
            ifindex: local.underlay_index,
            mtu,
            tx_checksum: None,
            overlay: false,
        })
    }

    async fn apply(
        &mut self,
        changes: &[PeerChangeOf<N>],
    ) -> Result<ApplyStatsOf<N>, BackendError> {
        let idx = self.underlay()?;
        let segment = &self.segment;
        self.programmer
            .apply(idx, changes, |p| path(segment, p))
            .await
    }

    async fn reconcile(&mut self, desired: &[PeerOf<N>]) -> Result<ApplyStatsOf<N>, BackendError> {
        let idx = self.underlay()?;
        if self.programmer.nl.link_name(idx).await?.is_none() {
            self.underlay = None;
            return Err(BackendError::DeviceGone("underlay".into()));
        }
        let segment = &self.segment;
        self.programmer
            .reconcile(idx, None, desired, |p| path(segment, p))
            .await
    }

    fn path(&self, peer: &PeerOf<N>) -> PeerPath {
        path(&self.segment, peer)
    }
}

/// Direct when the peer shares our segment (vxlan peers too: their nodes forward plain routed
/// packets to their pods); otherwise there is no way.
fn path<N: Cidr>(segment: &SegmentOf<N>, p: &PeerOf<N>) -> PeerPath {
    if segment.contains(p.public_ip) {
        PeerPath::ok(Path::Direct)
    } else {
        PeerPath::unreachable(format!(
            "its address {} is not on this node's underlay segment ({}): host-gw needs every \
             node on one L2 segment; use the vxlan backend (with DirectRouting) across subnets",
            p.public_ip,
            segment.describe()
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::peer::test_peer;

    #[test]
    fn only_peers_on_the_segment_are_served() {
        let seg = SegmentOf::<Ipv4Net> {
            prefixes: vec!["198.18.0.0/24".parse().unwrap()],
            local_ip: Some("198.18.0.11".parse().unwrap()),
        };
        assert_eq!(path(&seg, &test_peer(2, 12, 2)).path, Path::Direct);
        let mut far = test_peer(3, 13, 3);
        far.public_ip = "198.18.1.13".parse().unwrap();
        let p = path(&seg, &far);
        assert_eq!(p.path, Path::Unreachable);
        let why = p.reason.unwrap();
        assert!(
            why.contains("198.18.1.13") && why.contains("198.18.0.0/24"),
            "{why}"
        );
        // Our own address is never a gateway.
        let mut me = test_peer(4, 11, 4);
        me.vtep_mac = None;
        assert_eq!(path(&seg, &me).path, Path::Unreachable);
    }

    /// The IPv6 side decides on the IPv6 segment, with the peer's IPv6 address.
    #[test]
    fn ipv6_peers_are_served_on_the_ipv6_segment() {
        let seg = SegmentOf::<ipnet::Ipv6Net> {
            prefixes: vec!["fd00:198:18::/64".parse().unwrap()],
            local_ip: Some("fd00:198:18::b".parse().unwrap()),
        };
        let mut peer = PeerOf::<ipnet::Ipv6Net> {
            subnet: "fd00:10:244:2::/64".parse().unwrap(),
            public_ip: "fd00:198:18::c".parse().unwrap(),
            vtep_mac: None,
        };
        assert_eq!(path(&seg, &peer).path, Path::Direct);
        peer.public_ip = "fd00:198:19::c".parse().unwrap();
        let p = path(&seg, &peer);
        assert_eq!(p.path, Path::Unreachable);
        assert!(p.reason.unwrap().contains("fd00:198:18::/64"));
    }
}
