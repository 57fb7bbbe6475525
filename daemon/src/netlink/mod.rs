//! Every netlink call twilld makes lives under this module. CONTRACT (owner: kernel helper,
//! except `pod.rs`, owner: CNI helper).

pub mod pod;

use std::net::Ipv4Addr;

use ipnet::Ipv4Net;
use tokio::sync::mpsc;

use crate::mac::MacAddr;
use crate::reconcile::{KernelEntries, Op};

#[derive(Debug, thiserror::Error)]
pub enum NetlinkError {
    #[error("{context}: {message}")]
    Failed { context: String, message: String },
}

/// Which interface carries the overlay: `--iface` takes a name or an IP; None = the interface of
/// the default route.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum IfaceSelector {
    Name(String),
    Addr(Ipv4Addr),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Underlay {
    pub name: String,
    pub index: u32,
    pub addr: Ipv4Addr,
    pub mtu: u32,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VxlanSpec {
    pub name: String,
    pub vni: u32,
    pub local: Ipv4Addr,
    pub underlay_index: u32,
    pub port: u16,
    pub mtu: u32,
    pub mac: MacAddr,
    /// Our subnet's network address as /32.
    pub addr: Ipv4Net,
}

/// Something changed in the kernel that may need a reconcile.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KernelEvent {
    /// Our device, or an entry on it, was removed or changed by someone else.
    DeviceChanged,
    /// An address was added/removed on some interface (underlay may have changed).
    AddressChanged,
}

#[derive(Debug, Default)]
pub struct ApplyReport {
    pub applied: u64,
    pub failed: Vec<(Op, NetlinkError)>,
}

#[derive(Clone)]
pub struct Netlink {}

impl Netlink {
    /// Opens a netlink connection in the current network namespace (spawns its task on tokio).
    pub fn new() -> Result<Self, NetlinkError> {
        todo!()
    }
    pub async fn find_underlay(&self, _sel: Option<&IfaceSelector>) -> Result<Underlay, NetlinkError> {
        todo!()
    }
    /// Keeps a device that matches `spec`, replaces one that does not, creates a missing one;
    /// sets the address and brings it up. Returns the ifindex.
    pub async fn ensure_vxlan(&self, _spec: &VxlanSpec) -> Result<u32, NetlinkError> {
        todo!()
    }
    pub async fn dump_entries(&self, _ifindex: u32) -> Result<KernelEntries, NetlinkError> {
        todo!()
    }
    /// Pipelined: sends all requests, then collects the acks. Continues past errors.
    pub async fn apply(&self, _ifindex: u32, _ops: &[Op]) -> ApplyReport {
        todo!()
    }
    /// Multicast subscription (links, v4 addresses, routes, neighbours).
    pub fn subscribe(_ifindex: u32) -> Result<mpsc::Receiver<KernelEvent>, NetlinkError> {
        todo!()
    }
}
