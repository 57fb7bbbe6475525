//! What /status shows, and the state the main loop shares with the HTTP server.

use std::net::{Ipv4Addr, Ipv6Addr};
use std::sync::{Arc, RwLock};

use ipnet::{Ipv4Net, Ipv6Net};
use serde::Serialize;

use crate::mac::MacAddr;
use crate::metrics::Metrics;
use crate::subnet::Cidr;

#[derive(Clone, Debug, Default, Serialize)]
pub struct Status {
    pub ready: bool,
    /// Why the node is not ready yet, when it is not.
    pub waiting_for: Option<String>,
    /// The IPv4 pod network; none on an IPv6-only network.
    pub network: Option<Ipv4Net>,
    /// The IPv6 pod network, on a network with IPv6.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub network6: Option<Ipv6Net>,
    pub node: Option<NodeStatus>,
    pub peers: Vec<PeerStatus>,
    /// The IPv6 peers, when this node serves the IPv6 side of a dual-stack network.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub peers6: Option<Vec<PeerStatusOf<Ipv6Net>>>,
    pub last_reconcile: Option<ReconcileStatus>,
    pub firewall: Option<FirewallStatus>,
    pub policy: Option<crate::policy::PolicyStatus>,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct FirewallStatus {
    /// `--ip-masq`: pod traffic leaving the pod network is masqueraded.
    pub ip_masq: bool,
    /// Masquerade picks random source ports (`fully-random`).
    pub random_fully: bool,
    /// `--iptables-forward-rules`.
    pub forward_rules: bool,
    /// Other tools' forward chains that would drop pod traffic (and accept it first now).
    pub forward_chains: Vec<String>,
    /// Times a twill table was restored after someone else changed it.
    pub restores: u64,
    /// The last firewall error, until a pass succeeds.
    pub error: Option<String>,
}

#[derive(Clone, Debug, Serialize)]
pub struct NodeStatus {
    /// This node's IPv4 side (its fields at the top level, as before IPv6); none on an
    /// IPv6-only network.
    #[serde(flatten)]
    pub v4: Option<NodeStatus4>,
    pub underlay: String,
    pub backend: String,
    /// This node's IPv6 side, when it serves one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ipv6: Option<NodeStatus6>,
}

/// The IPv4 subnet, endpoint and device.
#[derive(Clone, Debug, Serialize)]
pub struct NodeStatus4 {
    pub subnet: Ipv4Net,
    pub public_ip: Ipv4Addr,
    /// The VXLAN device's MAC; none with backends that have no VXLAN device.
    pub vtep_mac: Option<MacAddr>,
    pub device: String,
    pub mtu: u32,
    /// The device's transmit checksum offload (`--vxlan-checksum-offload`), if known.
    pub tx_checksum_offload: Option<bool>,
}

/// A dual-stack node's IPv6 subnet, endpoint and device.
#[derive(Clone, Debug, Serialize)]
pub struct NodeStatus6 {
    pub subnet: Ipv6Net,
    pub public_ip: Ipv6Addr,
    pub vtep_mac: Option<MacAddr>,
    pub device: String,
    pub mtu: u32,
}

#[derive(Clone, Debug, Serialize)]
pub struct PeerStatusOf<N: Cidr> {
    pub subnet: N,
    pub public_ip: N::Addr,
    pub vtep_mac: Option<MacAddr>,
    /// True when the last kernel operation covering this peer succeeded.
    pub programmed: bool,
    /// "direct" (a route via its public IP), "vxlan", or "none" (no path: see `reason`).
    pub path: &'static str,
    /// Why the peer cannot be programmed, when it cannot.
    pub reason: Option<String>,
}

pub type PeerStatus = PeerStatusOf<Ipv4Net>;

#[derive(Clone, Debug, Serialize)]
pub struct ReconcileStatus {
    pub at_unix_ms: u64,
    pub duration_ms: f64,
    pub added: u64,
    pub removed: u64,
    pub failed: u64,
}

/// State shared between the main loop and the HTTP server.
#[derive(Default)]
pub struct Shared {
    pub metrics: Arc<Metrics>,
    pub status: RwLock<Status>,
}

impl Shared {
    pub(crate) fn update(&self, f: impl FnOnce(&mut Status)) {
        f(&mut self.status.write().unwrap_or_else(|e| e.into_inner()));
    }

    pub fn snapshot(&self) -> Status {
        self.status
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}
