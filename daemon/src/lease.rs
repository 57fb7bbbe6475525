//! Lease values in flannel's JSON format, and turning other nodes' leases into peers.
//! CONTRACT (owner: registry helper). Pure, unit-tested.
//! `{"PublicIP":"192.168.64.3","PublicIPv6":null,"BackendType":"vxlan",
//!   "BackendData":{"VNI":1,"VtepMAC":"c6:d2:32:6f:8f:44"}}`

use std::net::Ipv4Addr;

use ipnet::Ipv4Net;

use crate::config::NetworkConfig;
use crate::mac::MacAddr;
use crate::peer::Peer;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LeaseAttrs {
    pub public_ip: Ipv4Addr,
    pub vni: u32,
    pub vtep_mac: MacAddr,
}

impl LeaseAttrs {
    pub fn to_json(&self) -> String {
        todo!()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum LeaseError {
    #[error("...")]
    Invalid(String),
}

/// Validate another node's lease (key already parsed to `subnet`): JSON must decode, subnet must
/// be inside the network with the configured length, must not overlap `own`, MAC present.
pub fn parse_peer(
    _cfg: &NetworkConfig,
    _own: Option<Ipv4Net>,
    _subnet: Ipv4Net,
    _value: &[u8],
) -> Result<Peer, LeaseError> {
    todo!()
}
