//! A dual-stack node's IPv6 side: whether and how this node serves it (planned before the
//! lease is taken), starting it (vxlan: a device `twill-v6.<VNI>`; host-gw: routes on the
//! underlay via the peers' IPv6 addresses) and how /status shows it. Running, it is a `Side`
//! like the IPv4 one.

use ipnet::Ipv6Net;
use tracing::{info, warn};

use super::side::Side;
use super::status::NodeStatus6;
use super::{Servers, StartError};
use crate::backend::hostgw::HostGwBackendOf;
use crate::backend::vxlan::VxlanBackendOf;
use crate::backend::{AnyBackend6, Backend, LocalNodeOf};
use crate::cli::RunArgs;
use crate::config::{BackendKind, NetworkConfig};
use crate::lease::{LeaseBackend, LeaseV6};
use crate::netlink::{Netlink, Underlay};
use crate::overlap::HostNetsOf;

/// What the IPv6 side needs before the lease is taken: the lease's v6 part, and the state
/// its device is built from.
pub(super) struct Plan6 {
    pub lease: LeaseV6,
    pub underlay_index: u32,
    pub underlay_mtu: u32,
    /// Kept for every backend (a later switch to vxlan finds the same MAC).
    pub vtep_mac: crate::mac::MacAddr,
}

/// Whether this node serves the network's IPv6 side, and with what. None: a v4-only network,
/// or the udp backend, which carries IPv4 only (said in the log). Err: the network has IPv6
/// but this node has no IPv6 endpoint. `stored_mac`: the IPv6 VTEP MAC the lease source holds
/// from before, taken when the state dir has none.
pub(super) fn plan(
    args: &RunArgs,
    cfg: &NetworkConfig,
    underlay: &Underlay,
    stored_mac: Option<crate::mac::MacAddr>,
) -> Result<Option<Plan6>, StartError> {
    let Some(range) = &cfg.ipv6 else {
        return Ok(None);
    };
    if cfg.backend.kind == BackendKind::Udp {
        warn!(ipv6_network = %range.network, "EnableIPv6 is set: the udp backend carries IPv4 only (as flannel's); this node runs IPv4 only");
        return Ok(None);
    }
    let public_ip = args
        .public_ipv6
        .or(underlay.addr6)
        .ok_or_else(|| StartError::NoIpv6 {
            iface: underlay.name.clone(),
        })?;
    let stored_mac = stored_mac.filter(|_| !crate::state::has_vtep_mac6(&args.state_dir));
    if let Some(mac) = stored_mac {
        info!(%mac, "taking over the IPv6 VTEP MAC this node published before");
    }
    let vtep_mac =
        crate::state::load_or_adopt_vtep_mac6(&args.state_dir, stored_mac).map_err(|err| {
            StartError::State {
                dir: args.state_dir.display().to_string(),
                err,
            }
        })?;
    info!(%public_ip, %vtep_mac, ipv6_network = %range.network, "IPv6 side");
    // Not switched on here: on a host that takes its own address from router advertisements,
    // forwarding turns that off (accept_ra). The operator decides, as for IPv4.
    if std::fs::read_to_string("/proc/sys/net/ipv6/conf/all/forwarding")
        .is_ok_and(|v| v.trim() == "0")
    {
        warn!("IPv6 forwarding is off (net.ipv6.conf.all.forwarding=0): pods' IPv6 traffic to other nodes will not pass this node; set it to 1");
    }
    let backend = match cfg.backend.kind {
        BackendKind::HostGw => LeaseBackend::HostGw,
        _ => LeaseBackend::Vxlan {
            vni: cfg.backend.vni,
            vtep_mac,
        },
    };
    Ok(Some(Plan6 {
        lease: LeaseV6 { public_ip, backend },
        underlay_index: underlay.index,
        underlay_mtu: underlay.mtu,
        vtep_mac,
    }))
}

/// The IPv6 side of a dual-stack node.
pub(super) type Side6 = Side<Ipv6Net, AnyBackend6>;

/// Sets up the IPv6 side for our IPv6 subnet; Err when the pod network would capture the
/// node's own IPv6 traffic, or the device cannot be made.
pub(super) async fn start(
    nl: &Netlink,
    args: &RunArgs,
    cfg: &NetworkConfig,
    plan: &Plan6,
    subnet: Ipv6Net,
    underlay_name: &str,
    servers: &Servers,
) -> Result<Side6, StartError> {
    let network = cfg.ipv6.as_ref().map(|r| r.network).unwrap_or(subnet);
    let host = HostNetsOf::<Ipv6Net> {
        public_ip: Some(plan.lease.public_ip),
        underlay: nl.addr_prefixes::<Ipv6Net>(plan.underlay_index).await?,
        underlay_name: underlay_name.to_string(),
        servers: servers.of::<Ipv6Net>(),
        servers_are: servers.are,
    };
    if let Err(e) = host.check_network(network) {
        tracing::error!(error = %e, "refusing to start");
        return Err(e.into());
    }
    let local = LocalNodeOf {
        subnet,
        public_ip: plan.lease.public_ip,
        underlay_index: plan.underlay_index,
        underlay_mtu: plan.underlay_mtu,
        vtep_mac: plan.vtep_mac,
    };
    let mut backend = match plan.lease.backend {
        LeaseBackend::HostGw => AnyBackend6::HostGw(HostGwBackendOf::new(nl.clone(), &cfg.backend)),
        _ => {
            let tx_checksum = args
                .vxlan_checksum_offload
                .resolve(&crate::backend::offload::kernel_release());
            AnyBackend6::Vxlan(VxlanBackendOf::new(nl.clone(), &cfg.backend, tx_checksum))
        }
    };
    let device = backend.setup(&local).await?;
    info!(device = %device.name, ifindex = device.ifindex, mtu = device.mtu, %subnet, "IPv6 backend ready");
    Ok(Side::new(backend, device, local, host))
}

/// The IPv6 side as /status shows it.
pub(super) fn status(side: &Side6) -> NodeStatus6 {
    NodeStatus6 {
        subnet: side.local.subnet,
        public_ip: side.local.public_ip,
        vtep_mac: matches!(side.backend, AnyBackend6::Vxlan(_)).then_some(side.local.vtep_mac),
        device: side.device.name.clone(),
        mtu: side.device.mtu,
    }
}
