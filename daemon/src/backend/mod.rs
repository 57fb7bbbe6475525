//! Backends: how packets for remote subnets get there. `Backend` is the concern's trait;
//! `vxlan::VxlanBackend` (an overlay, with direct routes to peers on our segment when
//! DirectRouting is on) and `hostgw::HostGwBackend` (direct routes only) implement it, sharing
//! the per-peer path decision and the kernel writes in `routes`; `udp::UdpBackend` is the
//! userspace fallback (a TUN device and UDP datagrams, flannel's udp format).

pub mod hostgw;
pub mod offload;
pub mod routes;
pub mod udp;
pub mod vxlan;

use ipnet::{Ipv4Net, Ipv6Net};
use serde::Serialize;

use crate::mac::MacAddr;
use crate::netlink::NlFamily;
use crate::peer::{Peer, PeerOf};
use crate::reconcile::{Path, PeerChange, PeerChangeOf};
use crate::subnet::Cidr;

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

/// What the backend needs to know about this node, in one address family.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LocalNodeOf<N: Cidr> {
    pub subnet: N,
    pub public_ip: N::Addr,
    pub underlay_index: u32,
    pub underlay_mtu: u32,
    pub vtep_mac: MacAddr,
}

pub type LocalNode = LocalNodeOf<Ipv4Net>;

/// The interface traffic to peers leaves through: the VXLAN device, or for host-gw the
/// underlay itself.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct DeviceInfo {
    pub name: String,
    pub ifindex: u32,
    /// The pod MTU this backend allows: the underlay's minus the encapsulation overhead.
    pub mtu: u32,
    /// Transmit checksum offload as the device has it (None: unknown or not applicable).
    pub tx_checksum: Option<bool>,
    /// An overlay device of ours (its neighbours and FDB entries are ours to manage), not the
    /// underlay.
    pub overlay: bool,
}

/// How one peer is reached, and why when it cannot be.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerPath {
    pub path: Path,
    pub reason: Option<String>,
}

impl PeerPath {
    pub fn ok(path: Path) -> Self {
        PeerPath { path, reason: None }
    }

    pub fn unreachable(reason: String) -> Self {
        PeerPath {
            path: Path::Unreachable,
            reason: Some(reason),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ApplyStatsOf<N: Cidr> {
    pub added: u64,
    pub removed: u64,
    pub failed: u64,
    /// Peers (by subnet) whose entries could not all be added in this batch.
    pub unprogrammed: Vec<N>,
}

pub type ApplyStats = ApplyStatsOf<Ipv4Net>;

impl<N: Cidr> Default for ApplyStatsOf<N> {
    fn default() -> Self {
        ApplyStatsOf {
            added: 0,
            removed: 0,
            failed: 0,
            unprogrammed: Vec::new(),
        }
    }
}

/// One address family's data path to the peers (`N`: IPv4 unless said otherwise).
#[allow(async_fn_in_trait)]
pub trait Backend<N: NlFamily = Ipv4Net>: Send {
    /// Create or keep the device for `local`; never flushes existing peer entries.
    async fn setup(&mut self, local: &LocalNodeOf<N>) -> Result<DeviceInfo, BackendError>;
    /// Incremental: program the given changes (batched).
    async fn apply(&mut self, changes: &[PeerChangeOf<N>])
        -> Result<ApplyStatsOf<N>, BackendError>;
    /// Full: compare the kernel with `desired`, fix both ways.
    async fn reconcile(&mut self, desired: &[PeerOf<N>]) -> Result<ApplyStatsOf<N>, BackendError>;
    /// The path `peer` takes from this node (as of the last `setup`).
    fn path(&self, peer: &PeerOf<N>) -> PeerPath;
}

/// The backend the network config names.
pub enum AnyBackend {
    Vxlan(vxlan::VxlanBackend),
    HostGw(hostgw::HostGwBackend),
    Udp(udp::UdpBackend),
}

impl Backend for AnyBackend {
    async fn setup(&mut self, local: &LocalNode) -> Result<DeviceInfo, BackendError> {
        match self {
            AnyBackend::Vxlan(b) => b.setup(local).await,
            AnyBackend::HostGw(b) => b.setup(local).await,
            AnyBackend::Udp(b) => b.setup(local).await,
        }
    }

    async fn apply(&mut self, changes: &[PeerChange]) -> Result<ApplyStats, BackendError> {
        match self {
            AnyBackend::Vxlan(b) => b.apply(changes).await,
            AnyBackend::HostGw(b) => b.apply(changes).await,
            AnyBackend::Udp(b) => b.apply(changes).await,
        }
    }

    async fn reconcile(&mut self, desired: &[Peer]) -> Result<ApplyStats, BackendError> {
        match self {
            AnyBackend::Vxlan(b) => b.reconcile(desired).await,
            AnyBackend::HostGw(b) => b.reconcile(desired).await,
            AnyBackend::Udp(b) => b.reconcile(desired).await,
        }
    }

    fn path(&self, peer: &Peer) -> PeerPath {
        match self {
            AnyBackend::Vxlan(b) => b.path(peer),
            AnyBackend::HostGw(b) => b.path(peer),
            AnyBackend::Udp(b) => b.path(peer),
        }
    }
}

/// The backend of a dual-stack network's IPv6 side (udp carries IPv4 only).
pub enum AnyBackend6 {
    Vxlan(vxlan::VxlanBackendOf<Ipv6Net>),
    HostGw(hostgw::HostGwBackendOf<Ipv6Net>),
}

impl Backend<Ipv6Net> for AnyBackend6 {
    async fn setup(&mut self, local: &LocalNodeOf<Ipv6Net>) -> Result<DeviceInfo, BackendError> {
        match self {
            AnyBackend6::Vxlan(b) => b.setup(local).await,
            AnyBackend6::HostGw(b) => b.setup(local).await,
        }
    }

    async fn apply(
        &mut self,
        changes: &[PeerChangeOf<Ipv6Net>],
    ) -> Result<ApplyStatsOf<Ipv6Net>, BackendError> {
        match self {
            AnyBackend6::Vxlan(b) => b.apply(changes).await,
            AnyBackend6::HostGw(b) => b.apply(changes).await,
        }
    }

    async fn reconcile(
        &mut self,
        desired: &[PeerOf<Ipv6Net>],
    ) -> Result<ApplyStatsOf<Ipv6Net>, BackendError> {
        match self {
            AnyBackend6::Vxlan(b) => b.reconcile(desired).await,
            AnyBackend6::HostGw(b) => b.reconcile(desired).await,
        }
    }

    fn path(&self, peer: &PeerOf<Ipv6Net>) -> PeerPath {
        match self {
            AnyBackend6::Vxlan(b) => b.path(peer),
            AnyBackend6::HostGw(b) => b.path(peer),
        }
    }
}
