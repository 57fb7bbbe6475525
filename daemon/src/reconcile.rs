//! The reconcile diff: desired peers vs what the kernel has on our VXLAN device -> operations.
//! CONTRACT (owner: kernel helper). Pure, unit-tested, no kernel needed.

use std::net::Ipv4Addr;

use ipnet::Ipv4Net;

use crate::mac::MacAddr;
use crate::peer::Peer;

/// One kernel change on the VXLAN device. Adds are "replace" (idempotent).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Op {
    SetNeigh { ip: Ipv4Addr, mac: MacAddr },
    DelNeigh { ip: Ipv4Addr, mac: MacAddr },
    SetFdb { mac: MacAddr, dst: Ipv4Addr },
    DelFdb { mac: MacAddr, dst: Ipv4Addr },
    SetRoute { dst: Ipv4Net, gw: Ipv4Addr },
    DelRoute { dst: Ipv4Net, gw: Ipv4Addr },
}

/// What the kernel has on the device (only entries twill manages: permanent neighbours,
/// self fdb entries with a dst, routes via the device).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct KernelEntries {
    pub neighs: Vec<(Ipv4Addr, MacAddr)>,
    pub fdb: Vec<(MacAddr, Ipv4Addr)>,
    pub routes: Vec<(Ipv4Net, Ipv4Addr)>,
}

/// A peer appeared (old None), changed, or went away (new None).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerChange {
    pub old: Option<Peer>,
    pub new: Option<Peer>,
}

/// Ops for incremental changes, in flannel's order (adds: neigh, fdb, route; removals: route,
/// fdb, neigh).
pub fn change_ops(_changes: &[PeerChange]) -> Vec<Op> {
    todo!()
}

/// Full diff both ways: add/replace what is missing or wrong, remove what no peer wants.
pub fn diff(_desired: &[Peer], _actual: &KernelEntries) -> Vec<Op> {
    todo!()
}
