//! A remote node as the data path needs it: its pod subnet, where to tunnel, its VTEP MAC.

use ipnet::Ipv4Net;
use serde::Serialize;

use crate::mac::MacAddr;
use crate::subnet::Cidr;

/// A peer as one address family's data path sees it: a dual-stack node is a `Peer` for the
/// IPv4 devices and a `PeerOf<Ipv6Net>` for the IPv6 ones.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
pub struct PeerOf<N: Cidr> {
    /// The peer's pod subnet, e.g. 10.244.2.0/24.
    pub subnet: N,
    /// The underlay address VXLAN packets for this subnet are sent to.
    pub public_ip: N::Addr,
    /// The MAC of the peer's VXLAN device; None for a host-gw lease (no VXLAN device: reachable
    /// only by a direct route).
    pub vtep_mac: Option<MacAddr>,
}

pub type Peer = PeerOf<Ipv4Net>;

impl<N: Cidr> PeerOf<N> {
    /// The peer's VTEP address: the subnet's network address (flannel assigns it as /32, and
    /// the v6 device's as /128).
    pub fn gateway(&self) -> N::Addr {
        N::addr_from_bits(self.subnet.start())
    }
}

/// A peer for unit tests: subnet 10.244.`n`.0/24, public IP 198.18.0.`ip`, MAC
/// 02:00:00:00:00:`mac`.
#[cfg(test)]
pub(crate) fn test_peer(n: u8, ip: u8, mac: u8) -> Peer {
    Peer {
        subnet: format!("10.244.{n}.0/24").parse().unwrap(),
        public_ip: std::net::Ipv4Addr::new(198, 18, 0, ip),
        vtep_mac: Some(crate::mac::MacAddr([2, 0, 0, 0, 0, mac])),
    }
}
