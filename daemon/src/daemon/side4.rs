//! The IPv4 side of a node on a network with IPv4: its endpoint, checked before the lease is
//! taken, and starting it (vxlan: a device `twill.<VNI>`; host-gw: routes on the underlay; udp:
//! a TUN device). Running, it is a `Side` like the IPv6 one. An IPv6-only network has none.

use std::net::Ipv4Addr;

use ipnet::Ipv4Net;
use tracing::{error, info};

use super::side::Side;
use super::status::Shared;
use super::Servers;
use super::StartError;
use crate::backend::hostgw::HostGwBackend;
use crate::backend::offload;
use crate::backend::udp::UdpBackend;
use crate::backend::vxlan::VxlanBackend;
use crate::backend::{AnyBackend, Backend, LocalNode};
use crate::cli::RunArgs;
use crate::config::{BackendKind, NetworkConfig};
use crate::lease::{LeaseBackend, LeaseSide};
use crate::netlink::{Netlink, Underlay};
use crate::overlap::HostNets;
use crate::subnet::SubnetRange;

/// The IPv4 side of a node.
pub(super) type Side4 = Side<Ipv4Net, AnyBackend>;

/// What the IPv4 side needs before the lease is taken: the lease's IPv4 part, and what the
/// pod network must not capture.
pub(super) struct Plan4 {
    pub lease: LeaseSide<Ipv4Addr>,
    pub host: HostNets,
}

/// The IPv4 endpoint (`--public-ip`, else the underlay's address), checked: a pod network over
/// the node's own networks, its public IP or the lease source's servers would cut it off.
#[allow(clippy::too_many_arguments)]
pub(super) async fn plan(
    args: &RunArgs,
    cfg: &NetworkConfig,
    range: &SubnetRange<Ipv4Net>,
    nl: &Netlink,
    underlay: &Underlay,
    servers: &Servers,
    vtep_mac: crate::mac::MacAddr,
) -> Result<Plan4, StartError> {
    let public_ip = args
        .public_ip
        .or(underlay.addr)
        .ok_or_else(|| StartError::NoIpv4 {
            iface: underlay.name.clone(),
        })?;
    info!(%public_ip, %vtep_mac, network = %range.network, "IPv4 side");
    let host = HostNets {
        public_ip: Some(public_ip),
        underlay: nl.addr_prefixes(underlay.index).await?,
        underlay_name: underlay.name.clone(),
        servers: servers.of::<Ipv4Net>(),
        servers_are: servers.are,
    };
    if let Err(e) = host.check_network(range.network) {
        error!(error = %e, "refusing to start");
        return Err(e.into());
    }
    let backend = match cfg.backend.kind {
        BackendKind::Vxlan => LeaseBackend::Vxlan {
            vni: cfg.backend.vni,
            vtep_mac,
        },
        BackendKind::HostGw => LeaseBackend::HostGw,
        BackendKind::Udp => LeaseBackend::Udp,
    };
    Ok(Plan4 {
        lease: LeaseSide { public_ip, backend },
        host,
    })
}

/// Sets up the IPv4 side's backend for our IPv4 subnet.
#[allow(clippy::too_many_arguments)]
pub(super) async fn start(
    nl: &Netlink,
    args: &RunArgs,
    cfg: &NetworkConfig,
    range: &SubnetRange<Ipv4Net>,
    plan: Plan4,
    subnet: Ipv4Net,
    underlay: &Underlay,
    vtep_mac: crate::mac::MacAddr,
    shared: &Shared,
) -> Result<Side4, StartError> {
    let mut backend = match cfg.backend.kind {
        BackendKind::Vxlan => {
            let release = offload::kernel_release();
            let tx_checksum = args.vxlan_checksum_offload.resolve(&release);
            info!(kernel = %release, setting = ?args.vxlan_checksum_offload, enforced = ?tx_checksum, "vxlan tx checksum offload");
            AnyBackend::Vxlan(VxlanBackend::new(nl.clone(), &cfg.backend, tx_checksum))
        }
        BackendKind::HostGw => AnyBackend::HostGw(HostGwBackend::new(nl.clone(), &cfg.backend)),
        BackendKind::Udp => AnyBackend::Udp(UdpBackend::new(
            nl.clone(),
            &cfg.backend,
            range.network,
            shared.metrics.udp.clone(),
            args.udp_offloads,
        )),
    };
    let local = LocalNode {
        subnet,
        public_ip: plan.lease.public_ip,
        underlay_index: underlay.index,
        underlay_mtu: underlay.mtu,
        vtep_mac,
    };
    let device = backend.setup(&local).await?;
    info!(backend = ?cfg.backend.kind, device = %device.name, ifindex = device.ifindex, mtu = device.mtu, "backend ready");
    Ok(Side::new(backend, device, local, plan.host))
}
