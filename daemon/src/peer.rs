//! A remote node as the data path needs it: its pod subnet, where to tunnel, its VTEP MAC.

use std::net::Ipv4Addr;

use ipnet::Ipv4Net;
use serde::Serialize;

use crate::mac::MacAddr;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
pub struct Peer {
    /// The peer's pod subnet, e.g. 10.244.2.0/24.
    pub subnet: Ipv4Net,
    /// The underlay address VXLAN packets for this subnet are sent to.
    pub public_ip: Ipv4Addr,
    /// The MAC of the peer's VXLAN device; None for a host-gw lease (no VXLAN device: reachable
    /// only by a direct route).
    pub vtep_mac: Option<MacAddr>,
}

impl Peer {
    /// The peer's VTEP address: the subnet's network address (flannel assigns it as /32).
    pub fn gateway(&self) -> Ipv4Addr {
        self.subnet.network()
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
