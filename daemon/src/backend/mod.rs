//! Backends: how packets for remote subnets get there.
//! `Backend` is the concern's trait; `vxlan::VxlanBackend` the first implementation.

pub mod offload;
pub mod vxlan;

use std::net::Ipv4Addr;

use ipnet::Ipv4Net;
use serde::Serialize;

use crate::mac::MacAddr;
use crate::peer::Peer;
use crate::reconcile::PeerChange;

#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error(transparent)]
    Netlink(#[from] crate::netlink::NetlinkError),
    /// The device vanished (deleted by someone, or never set up): call `setup` again, then
    /// `reconcile`.
    #[error("overlay device {0} is gone; setup must run again")]
    DeviceGone(String),
    /// Another VXLAN device holds our VNI and port (not flanneld's, which is taken over).
    #[error(
        "VXLAN VNI {vni} on UDP port {port} is already used by {devices}: delete it \
         (ip link del <name>) or set another Backend.VNI or Backend.Port in the network config"
    )]
    VniInUse {
        vni: u32,
        port: u16,
        devices: String,
    },
}

/// What the backend needs to know about this node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LocalNode {
    pub subnet: Ipv4Net,
    pub public_ip: Ipv4Addr,
    pub underlay_index: u32,
    pub underlay_mtu: u32,
    pub vtep_mac: MacAddr,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct DeviceInfo {
    pub name: String,
    pub ifindex: u32,
    pub mtu: u32,
    /// Transmit checksum offload as the device has it (None: unknown or not applicable).
    pub tx_checksum: Option<bool>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct ApplyStats {
    pub added: u64,
    pub removed: u64,
    pub failed: u64,
    /// Peers (by subnet) whose entries could not all be added in this batch.
    pub unprogrammed: Vec<Ipv4Net>,
}

#[allow(async_fn_in_trait)]
pub trait Backend: Send {
    /// Create or keep the device for `local`; never flushes existing peer entries.
    async fn setup(&mut self, local: &LocalNode) -> Result<DeviceInfo, BackendError>;
    /// Incremental: program the given changes (batched).
    async fn apply(&mut self, changes: &[PeerChange]) -> Result<ApplyStats, BackendError>;
    /// Full: compare the kernel with `desired`, fix both ways.
    async fn reconcile(&mut self, desired: &[Peer]) -> Result<ApplyStats, BackendError>;
}
