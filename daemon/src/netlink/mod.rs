//! Every netlink call twilld makes lives under this module (pod networking in `pod.rs`), and
//! the two ioctls it needs: ethtool's (`ethtool.rs`) and the interface lookup by name
//! (`pod::link_exists`).
//!
//! Queries and device setup go through an rtnetlink `Handle`. Bulk entry programming (`apply`)
//! goes through a second, plain netlink socket: requests are written in batches and the acks
//! read back afterwards, which is what makes thousands of entries fast.

mod addr;
mod batch;
pub mod conntrack;
pub mod ethtool;
mod events;
mod family;
pub mod nflog;
mod nfnl;
pub mod nft_events;
pub mod nft_sets;
mod own;
pub mod pod;

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::{Arc, Mutex};

use futures::TryStreamExt;
use ipnet::Ipv4Net;
use rtnetlink::packet_route::address::{AddressAttribute, AddressFlags, AddressMessage};
use rtnetlink::packet_route::link::{
    InfoData, InfoKind, InfoVxlan, LinkAttribute, LinkInfo, LinkMessage,
};
use rtnetlink::packet_route::neighbour::{
    NeighbourAttribute, NeighbourFlags, NeighbourMessage, NeighbourState,
};
use rtnetlink::packet_route::route::{RouteAttribute, RouteMessage, RouteProtocol, RouteType};
use rtnetlink::packet_route::{AddressFamily, RouteNetlinkMessage};
use rtnetlink::{Handle, LinkUnspec, LinkVxlan, RouteMessageBuilder};
use tokio::sync::mpsc;

use addr::{addr_ip_of, addr_of};
pub use events::{Watch, Watched};
pub use family::NlFamily;

use crate::mac::MacAddr;
use crate::reconcile::{KernelEntriesOf, OpOf};

#[derive(Debug, thiserror::Error)]
pub enum NetlinkError {
    #[error("{context}: {message}")]
    Failed { context: String, message: String },
    /// The kernel refused a request; `errno` is positive (e.g. 19 = ENODEV).
    #[error("{context}: {} (errno {errno})", std::io::Error::from_raw_os_error(*errno))]
    Errno { context: String, errno: i32 },
}

impl NetlinkError {
    fn failed(context: impl Into<String>, message: impl ToString) -> Self {
        NetlinkError::Failed {
            context: context.into(),
            message: message.to_string(),
        }
    }

    fn from_rtnl(context: impl Into<String>, e: rtnetlink::Error) -> Self {
        match &e {
            rtnetlink::Error::NetlinkError(m) if m.code.is_some() => NetlinkError::Errno {
                context: context.into(),
                errno: -m.raw_code(),
            },
            _ => Self::failed(context, e),
        }
    }

    /// The same error, its context prefixed with `outer` (the errno is kept).
    fn within(self, outer: &str) -> Self {
        match self {
            NetlinkError::Failed { context, message } => NetlinkError::Failed {
                context: format!("{outer}: {context}"),
                message,
            },
            NetlinkError::Errno { context, errno } => NetlinkError::Errno {
                context: format!("{outer}: {context}"),
                errno,
            },
        }
    }

    /// The kernel's errno, if the kernel refused the request.
    pub fn errno(&self) -> Option<i32> {
        match self {
            NetlinkError::Errno { errno, .. } => Some(*errno),
            NetlinkError::Failed { .. } => None,
        }
    }

    /// The device (or the one a request names) does not exist (any more).
    pub fn is_no_device(&self) -> bool {
        self.errno() == Some(libc::ENODEV)
    }
}

/// Which interface carries the overlay: `--iface` takes a name or an IP; None = the interface of
/// the default route.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum IfaceSelector {
    Name(String),
    /// The interface with this address (of either family), which is then its endpoint in
    /// that family.
    Addr(IpAddr),
}

/// Which default route names the underlay when no interface is given.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DefaultRoute {
    /// The IPv4 one: a network with IPv4.
    Ipv4,
    /// The IPv6 one: an IPv6-only network.
    Ipv6,
    /// The IPv4 one, else the IPv6 one: before the network config is known.
    Any,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Underlay {
    pub name: String,
    pub index: u32,
    /// The interface's first IPv4 address, if it has one (an IPv6-only host has none).
    pub addr: Option<Ipv4Addr>,
    /// The interface's stable global IPv6 address, if it has one (see `stable_ipv6`).
    pub addr6: Option<Ipv6Addr>,
    pub mtu: u32,
}

/// A VXLAN device of family N: its underlay (local) address and its own address are of N.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VxlanSpecOf<N: crate::subnet::Cidr> {
    pub name: String,
    pub vni: u32,
    pub local: N::Addr,
    pub underlay_index: u32,
    pub port: u16,
    pub mtu: u32,
    pub mac: MacAddr,
    /// Our subnet's network address as /32 (v6: /128).
    pub addr: N,
}

pub type VxlanSpec = VxlanSpecOf<Ipv4Net>;

/// Something changed in the kernel that may need a reconcile.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KernelEvent {
    /// Our device, or an entry on it, was removed or changed by someone else.
    DeviceChanged,
    /// An address was added/removed on some interface (underlay may have changed).
    AddressChanged,
}

#[derive(Debug)]
pub struct ApplyReportOf<N: crate::subnet::Cidr> {
    pub applied: u64,
    pub failed: Vec<(OpOf<N>, NetlinkError)>,
}

pub type ApplyReport = ApplyReportOf<Ipv4Net>;

impl<N: crate::subnet::Cidr> Default for ApplyReportOf<N> {
    fn default() -> Self {
        ApplyReportOf {
            applied: 0,
            failed: Vec::new(),
        }
    }
}

/// Route protocol number twill puts on DirectRouting routes (they live on the underlay, next
/// to routes that are not ours, so they need a mark to be found again after a restart).
pub const TWILL_RTPROT: u8 = 116;

const MAIN_TABLE: u32 = 254;
/// Metric of the `--ip-blackhole-route` route: behind the pod bridge's connected route (metric
/// 0) for the same subnet, so it only takes over when the bridge is not there.
pub const BLACKHOLE_METRIC: u32 = 4_000_000_000;

#[derive(Clone)]
pub struct Netlink {
    handle: Handle,
    batch: Arc<Mutex<batch::BatchSocket>>,
    /// Shared by every clone and the event subscription: see `own`.
    own: own::OwnDeletions<Ipv4Net>,
    own6: own::OwnDeletions<ipnet::Ipv6Net>,
    /// One dump at a time on the shared socket: the kernel refuses a second one while the
    /// first runs (EBUSY), and the two families' reconciles run at once.
    dumps: Arc<tokio::sync::Mutex<()>>,
}

impl Netlink {
    /// Opens a netlink connection in the current network namespace (spawns its task on tokio).
    pub fn new() -> Result<Self, NetlinkError> {
        let rt = tokio::runtime::Handle::try_current()
            .map_err(|e| NetlinkError::failed("netlink connection needs a tokio runtime", e))?;
        let (conn, handle, _) = rtnetlink::new_connection()
            .map_err(|e| NetlinkError::failed("open netlink socket", e))?;
        rt.spawn(conn);
        let batch = batch::BatchSocket::open()
            .map_err(|e| NetlinkError::failed("open netlink batch socket", e))?;
        Ok(Netlink {
            handle,
            batch: Arc::new(Mutex::new(batch)),
            own: own::OwnDeletions::default(),
            own6: own::OwnDeletions::default(),
            dumps: Arc::new(tokio::sync::Mutex::new(())),
        })
    }

    /// The underlay: `sel`, else the interface of the IPv4 default route.
    pub async fn find_underlay(
        &self,
        sel: Option<&IfaceSelector>,
    ) -> Result<Underlay, NetlinkError> {
        self.find_underlay_by(sel, DefaultRoute::Ipv4).await
    }

    /// The underlay: `sel`, else the interface of the `route` default route.
    pub async fn find_underlay_by(
        &self,
        sel: Option<&IfaceSelector>,
        route: DefaultRoute,
    ) -> Result<Underlay, NetlinkError> {
        let index = match sel {
            None => self.default_route_link(route).await?,
            Some(IfaceSelector::Name(name)) => self.link_by_name(name).await?.header.index,
            Some(IfaceSelector::Addr(ip)) => {
                let msgs = self.addresses(None).await?;
                msgs.iter()
                    .find(|m| addr::addr_ip_of(m) == Some(*ip))
                    .map(|m| m.header.index)
                    .ok_or_else(|| {
                        NetlinkError::failed(
                            "find underlay",
                            format!("no interface has address {ip}"),
                        )
                    })?
            }
        };
        let link = self.link_by_index(index).await?;
        let name = link_name(&link).unwrap_or_default();
        let mtu = link_mtu(&link).unwrap_or(1500);
        let addr = match sel {
            Some(IfaceSelector::Addr(IpAddr::V4(ip))) => Some(*ip),
            _ => self
                .ipv4_addrs(Some(index))
                .await?
                .first()
                .map(|(_, a, _)| *a),
        };
        let addr6 = match sel {
            Some(IfaceSelector::Addr(IpAddr::V6(ip))) => Some(*ip),
            _ => self.stable_ipv6(index).await?,
        };
        Ok(Underlay {
            name,
            index,
            addr,
            addr6,
            mtu,
        })
    }

    /// The networks of interface `index`'s IPv4 addresses (e.g. 198.18.0.0/24): the hosts in
    /// them are on-link.
    pub async fn addr_prefixes<N: NlFamily>(&self, index: u32) -> Result<Vec<N>, NetlinkError> {
        let msgs = self.addresses(Some(index)).await?;
        let mut nets: Vec<N> = msgs
            .iter()
            .filter(|m| m.header.family == N::AF && m.header.index == index)
            .filter_map(|m| {
                let a = N::from_ip(addr_ip_of(m)?)?;
                let len = m.header.prefix_len;
                let n = N::from_bits(N::addr_bits(a), len)?;
                N::from_bits(n.start(), len)
            })
            .filter(|n| n.prefix() < N::BITS)
            .collect();
        nets.sort();
        nets.dedup();
        Ok(nets)
    }

    /// The name of link `index`, or None if there is no such link.
    pub async fn link_name(&self, index: u32) -> Result<Option<String>, NetlinkError> {
        match self.link_by_index(index).await {
            Ok(l) => Ok(link_name(&l)),
            Err(e) if e.is_no_device() => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Keeps a device that matches `spec`, replaces one that does not, creates a missing one;
    /// sets the address and brings it up. Returns the ifindex.
    pub async fn ensure_vxlan<N: NlFamily>(
        &self,
        spec: &VxlanSpecOf<N>,
    ) -> Result<u32, NetlinkError> {
        let ctx = format!("vxlan device {}", spec.name);
        let existing = match self.link_by_name(&spec.name).await {
            Ok(l) => Some(l),
            Err(e) if e.is_no_device() => None,
            Err(e) => return Err(e),
        };
        let index = match existing {
            Some(l) if vxlan_matches(&l, spec) => {
                tracing::debug!(device = %spec.name, index = l.header.index, "keeping existing vxlan device");
                l.header.index
            }
            other => {
                if let Some(l) = other {
                    tracing::info!(device = %spec.name, "replacing vxlan device with different settings");
                    self.handle
                        .link()
                        .del(l.header.index)
                        .execute()
                        .await
                        .map_err(|e| NetlinkError::from_rtnl(format!("{ctx}: delete"), e))?;
                }
                let msg = N::vxlan_local(LinkVxlan::new(&spec.name, spec.vni), spec.local)
                    .dev(spec.underlay_index)
                    .port(spec.port)
                    .learning(false)
                    .mtu(spec.mtu)
                    .address(spec.mac.octets().to_vec())
                    .build();
                self.handle
                    .link()
                    .add(msg)
                    .execute()
                    .await
                    .map_err(|e| NetlinkError::from_rtnl(format!("{ctx}: create"), e))?;
                self.link_by_name(&spec.name).await?.header.index
            }
        };
        // MTU only: setting the MAC, even to the same value, flushes the device's neighbours.
        let set = LinkUnspec::new_with_index(index).mtu(spec.mtu).build();
        self.handle
            .link()
            .set(set)
            .execute()
            .await
            .map_err(|e| NetlinkError::from_rtnl(format!("{ctx}: set mtu"), e))?;

        self.ensure_only_addr(index, spec.addr, &ctx).await?;
        self.handle
            .link()
            .set(LinkUnspec::new_with_index(index).up().build())
            .execute()
            .await
            .map_err(|e| NetlinkError::from_rtnl(format!("{ctx}: set up"), e))?;
        Ok(index)
    }

    /// `want` as the only address of its family on device `index` (others removed; an IPv6
    /// link-local address is the kernel's and stays). A v6 address is added without duplicate
    /// address detection: it is the subnet's own, and DAD would hold it tentative for seconds.
    async fn ensure_only_addr<N: NlFamily>(
        &self,
        index: u32,
        want: N,
        ctx: &str,
    ) -> Result<(), NetlinkError> {
        let want_ip = N::ip(N::host(want));
        let mut have_want = false;
        let addrs = self
            .addresses(Some(index))
            .await
            .map_err(|e| e.within(ctx))?;
        for a in addrs {
            if a.header.index != index || a.header.family != N::AF {
                continue;
            }
            let ip = addr_ip_of(&a);
            if matches!(ip, Some(IpAddr::V6(v6)) if v6.is_unicast_link_local()) {
                continue;
            }
            if ip == Some(want_ip) && a.header.prefix_len == want.prefix() {
                have_want = true;
                continue;
            }
            self.handle
                .address()
                .del(a)
                .execute()
                .await
                .map_err(|e| NetlinkError::from_rtnl(format!("{ctx}: remove stale address"), e))?;
        }
        if !have_want {
            let mut req = self
                .handle
                .address()
                .add(index, want_ip, want.prefix())
                .replace();
            if want_ip.is_ipv6() {
                req.message_mut()
                    .attributes
                    .push(AddressAttribute::Flags(AddressFlags::Nodad));
            }
            req.execute()
                .await
                .map_err(|e| NetlinkError::from_rtnl(format!("{ctx}: add address {want}"), e))?;
        }
        Ok(())
    }

    /// The udp backend's TUN device `name` (opened by the backend), configured as flannel's
    /// udp backend configures its own: `mtu`; `addr`, the node subnet's first address as a /32
    /// (the source of host-to-pod traffic, and no broadcast routes); up; and one route for the
    /// whole `network` through it (the node's own subnet is more specific, on its bridge).
    /// Returns its index.
    pub async fn ensure_tun(
        &self,
        name: &str,
        mtu: u32,
        addr: Ipv4Net,
        network: Ipv4Net,
    ) -> Result<u32, NetlinkError> {
        let ctx = format!("tun device {name}");
        let index = self.link_by_name(name).await?.header.index;
        self.handle
            .link()
            .set(LinkUnspec::new_with_index(index).mtu(mtu).build())
            .execute()
            .await
            .map_err(|e| NetlinkError::from_rtnl(format!("{ctx}: set mtu"), e))?;
        self.ensure_only_addr(index, addr, &ctx).await?;
        self.handle
            .link()
            .set(LinkUnspec::new_with_index(index).up().build())
            .execute()
            .await
            .map_err(|e| NetlinkError::from_rtnl(format!("{ctx}: set up"), e))?;
        let route = RouteMessageBuilder::<Ipv4Addr>::new()
            .destination_prefix(network.network(), network.prefix_len())
            .output_interface(index)
            .protocol(RouteProtocol::Other(TWILL_RTPROT))
            .build();
        self.handle
            .route()
            .add(route)
            .replace()
            .execute()
            .await
            .map_err(|e| NetlinkError::from_rtnl(format!("{ctx}: route {network}"), e))?;
        Ok(index)
    }

    /// Whether device `index` still has the route for `network` (`ensure_tun` puts it back).
    pub async fn has_dev_route(&self, index: u32, network: Ipv4Net) -> Result<bool, NetlinkError> {
        let routes = self.all_routes().await?;
        Ok(routes.iter().any(|r| {
            route_table(r) == MAIN_TABLE
                && route_oif(r) == Some(index)
                && route_dst(r) == Some(network)
        }))
    }

    /// VXLAN devices of family N other than `except` with VNI `vni` on UDP port `port`, as
    /// (ifindex, name): the kernel refuses to create a second one (EEXIST). One of the other
    /// family shares them without conflict (flannel's `flannel.1` and `flannel-v6.1`).
    pub async fn vxlan_devices_using<N: NlFamily>(
        &self,
        vni: u32,
        port: u16,
        except: &str,
    ) -> Result<Vec<(u32, String)>, NetlinkError> {
        let v6 = N::AF == AddressFamily::Inet6;
        Ok(self
            .links()
            .await?
            .iter()
            .filter(|l| {
                vxlan_data(l).is_some_and(|d| {
                    d.contains(&InfoVxlan::Id(vni))
                        && d.contains(&InfoVxlan::Port(port))
                        && vxlan_is_v6(d) == v6
                })
            })
            .filter_map(|l| Some((l.header.index, link_name(l)?)))
            .filter(|(_, n)| n != except)
            .collect())
    }

    /// Every VXLAN device, as (ifindex, name).
    pub async fn vxlan_devices(&self) -> Result<Vec<(u32, String)>, NetlinkError> {
        Ok(self
            .links()
            .await?
            .iter()
            .filter(|l| vxlan_data(l).is_some())
            .filter_map(|l| Some((l.header.index, link_name(l)?)))
            .collect())
    }

    /// Deletes link `index` (tests and teardown).
    pub async fn delete_link(&self, index: u32) -> Result<(), NetlinkError> {
        self.handle
            .link()
            .del(index)
            .execute()
            .await
            .map_err(|e| NetlinkError::from_rtnl("delete link", e))
    }

    /// The entries twill manages: on overlay device `ifindex` its permanent neighbours, FDB
    /// entries and routes; anywhere, routes with twill's protocol number (direct routes). With
    /// `ifindex` None (no overlay device) only the latter.
    pub async fn dump_entries<N: NlFamily>(
        &self,
        ifindex: Option<u32>,
    ) -> Result<KernelEntriesOf<N>, NetlinkError> {
        let mut out = KernelEntriesOf::default();
        let Some(ifindex) = ifindex else {
            out.routes = self.dump_routes(None).await?;
            return Ok(out);
        };

        let dumping = self.dumps.lock().await;
        let mut req = self
            .handle
            .neighbours()
            .get()
            .set_address_family(N::AF)
            .execute();
        while let Some(n) = req
            .try_next()
            .await
            .map_err(|e| NetlinkError::from_rtnl("dump neighbours", e))?
        {
            if n.header.ifindex != ifindex || n.header.state != NeighbourState::Permanent {
                continue;
            }
            if let (Some(ip), Some(mac)) = (N::neigh_dst(&n), neigh_lladdr(&n)) {
                out.neighs.push((ip, mac));
            }
        }

        let mut req = self
            .handle
            .neighbours()
            .get()
            .set_address_family(AddressFamily::Bridge)
            .execute();
        while let Some(n) = req
            .try_next()
            .await
            .map_err(|e| NetlinkError::from_rtnl("dump fdb", e))?
        {
            if n.header.ifindex != ifindex || !n.header.flags.contains(NeighbourFlags::Own) {
                continue;
            }
            if let (Some(dst), Some(mac)) = (N::neigh_dst(&n), neigh_lladdr(&n)) {
                // The all-zeros entries are default destinations (flooding), not peers.
                if !mac.is_zero() {
                    out.fdb.push((mac, dst));
                }
            }
        }
        // The route dump takes the lock itself.
        drop(dumping);

        out.routes = self.dump_routes(Some(ifindex)).await?;
        Ok(out)
    }

    /// Makes twill's blackhole routes (protocol 116) exactly `want`. Returns whether it changed
    /// anything.
    pub async fn sync_blackholes(&self, want: Option<Ipv4Net>) -> Result<bool, NetlinkError> {
        let routes = self.all_routes().await?;
        let mut changed = false;
        let mut have = false;
        for r in routes {
            let ours = route_table(&r) == MAIN_TABLE
                && r.header.kind == RouteType::BlackHole
                && r.header.protocol == RouteProtocol::Other(TWILL_RTPROT);
            if !ours {
                continue;
            }
            if route_dst(&r) == want && route_priority(&r) == BLACKHOLE_METRIC {
                have = true;
                continue;
            }
            self.handle
                .route()
                .del(r)
                .execute()
                .await
                .map_err(|e| NetlinkError::from_rtnl("delete blackhole route", e))?;
            changed = true;
        }
        if let (Some(net), false) = (want, have) {
            let msg = RouteMessageBuilder::<Ipv4Addr>::new()
                .destination_prefix(net.network(), net.prefix_len())
                .kind(RouteType::BlackHole)
                .protocol(RouteProtocol::Other(TWILL_RTPROT))
                .priority(BLACKHOLE_METRIC)
                .build();
            self.handle
                .route()
                .add(msg)
                .replace()
                .execute()
                .await
                .map_err(|e| NetlinkError::from_rtnl(format!("add blackhole route {net}"), e))?;
            changed = true;
        }
        Ok(changed)
    }

    /// Main-table routes that are ours: out of `ifindex`, or with twill's protocol number.
    async fn dump_routes<N: NlFamily>(
        &self,
        ifindex: Option<u32>,
    ) -> Result<Vec<(N, N::Addr)>, NetlinkError> {
        let mut out = Vec::new();
        for r in self.routes_of::<N>().await? {
            if route_table(&r) != MAIN_TABLE {
                continue;
            }
            let ours = (ifindex.is_some() && route_oif(&r) == ifindex)
                || r.header.protocol == RouteProtocol::Other(TWILL_RTPROT);
            if !ours {
                continue;
            }
            if let (Some(dst), Some(gw)) = (N::route_dst(&r), N::route_gw(&r)) {
                out.push((dst, gw));
            }
        }
        Ok(out)
    }

    /// Pipelined: sends all requests, then collects the acks. Continues past errors. `ifindex`
    /// is our overlay device: its routes are ours (see `apply_owned`).
    pub async fn apply<N: NlFamily>(&self, ifindex: u32, ops: &[OpOf<N>]) -> ApplyReportOf<N> {
        self.apply_owned(ifindex, Some(ifindex), ops).await
    }

    /// `apply`, where `owned` is the device whose routes are ours (None: only routes with
    /// twill's protocol number are, e.g. for host-gw, whose `ifindex` is the underlay).
    ///
    /// Runs in phases so a batch keeps flannel's order: stale routes, then stale fdb/neighbours,
    /// then neighbours/fdb, then routes (a route via a gateway needs its neighbour first).
    /// Routes are added exclusively; one refused because the destination has a route already is
    /// replaced only if that route is ours, and otherwise left alone and reported.
    pub async fn apply_owned<N: NlFamily>(
        &self,
        ifindex: u32,
        owned: Option<u32>,
        ops: &[OpOf<N>],
    ) -> ApplyReportOf<N> {
        let phase = |op: &OpOf<N>| match op {
            OpOf::DelRoute { .. } => 0,
            OpOf::DelFdb { .. } | OpOf::DelNeigh { .. } => 1,
            OpOf::SetNeigh { .. } | OpOf::SetFdb { .. } => 2,
            OpOf::SetRoute { .. } => 3,
        };
        let mut phases: Vec<Vec<OpOf<N>>> = vec![Vec::new(); 4];
        for op in ops {
            phases[phase(op)].push(op.clone());
        }
        // Before the kernel sees them, so no echo can arrive first.
        N::own(self).expect(ops);
        let mut report = self.run_batches(ifindex, phases, batch::op_message).await;
        let (exists, failed): (Vec<_>, Vec<_>) = report.failed.drain(..).partition(|(op, e)| {
            matches!(op, OpOf::SetRoute { .. }) && e.errno() == Some(libc::EEXIST)
        });
        report.failed = failed;
        if exists.is_empty() {
            return report;
        }
        let dsts: HashSet<N> = exists
            .iter()
            .filter_map(|(op, _)| match op {
                OpOf::SetRoute { dst, .. } => Some(*dst),
                _ => None,
            })
            .collect();
        let foreign = match self.foreign_routes(&dsts, owned).await {
            Ok(f) => f,
            Err(e) => {
                report.failed.extend(exists.into_iter().map(|(op, _)| {
                    let err = NetlinkError::failed(format!("{op:?}"), &e);
                    (op, err)
                }));
                return report;
            }
        };
        let mut replace = Vec::new();
        for (op, _) in exists {
            let OpOf::SetRoute { dst, .. } = op else {
                continue;
            };
            match foreign.get(&dst) {
                Some(what) => {
                    let err = NetlinkError::failed(
                        format!("{op:?}"),
                        format!(
                            "{dst} already has a route that is not twill's ({what}): left alone"
                        ),
                    );
                    report.failed.push((op, err));
                }
                None => replace.push(op),
            }
        }
        if !replace.is_empty() {
            let again = self
                .run_batches(ifindex, vec![replace], batch::replace_route)
                .await;
            report.applied += again.applied;
            report.failed.extend(again.failed);
        }
        report
    }

    /// Sends each group of ops as batches, one group after the other, built by `message`.
    async fn run_batches<N: NlFamily>(
        &self,
        ifindex: u32,
        groups: Vec<Vec<OpOf<N>>>,
        message: fn(u32, &OpOf<N>) -> rtnetlink::packet_core::NetlinkMessage<RouteNetlinkMessage>,
    ) -> ApplyReportOf<N> {
        let all: Vec<OpOf<N>> = groups.iter().flatten().cloned().collect();
        let batch = self.batch.clone();
        let res = tokio::task::spawn_blocking(move || {
            let mut sock = batch.lock().unwrap_or_else(|p| p.into_inner());
            let mut report = ApplyReportOf::default();
            for ops in groups.iter().filter(|p| !p.is_empty()) {
                let msgs = ops
                    .iter()
                    .map(|op| message(ifindex, op))
                    .collect::<Vec<_>>();
                for (op, res) in ops.iter().zip(sock.run(msgs)) {
                    match res {
                        Ok(()) => report.applied += 1,
                        Err(errno)
                            if op.is_delete()
                                && (errno == libc::ENOENT || errno == libc::ESRCH) =>
                        {
                            report.applied += 1
                        }
                        Err(errno) => report.failed.push((
                            op.clone(),
                            NetlinkError::Errno {
                                context: format!("{op:?}"),
                                errno,
                            },
                        )),
                    }
                }
            }
            report
        })
        .await;
        match res {
            Ok(r) => r,
            Err(e) => ApplyReportOf {
                applied: 0,
                failed: all
                    .into_iter()
                    .map(|op| {
                        let err = NetlinkError::failed(format!("{op:?}"), &e);
                        (op, err)
                    })
                    .collect(),
            },
        }
    }

    /// Of the destinations `dsts`, those whose main-table route at the family's default metric
    /// (the one a route of ours would collide with: 0 for IPv4, 1024 for IPv6) is not ours,
    /// with what it is. Ours: out of `owned`, or carrying twill's protocol number.
    async fn foreign_routes<N: NlFamily>(
        &self,
        dsts: &HashSet<N>,
        owned: Option<u32>,
    ) -> Result<HashMap<N, String>, NetlinkError> {
        let mut out = HashMap::new();
        for r in self.routes_of::<N>().await? {
            if route_table(&r) != MAIN_TABLE || route_priority(&r) != N::DEFAULT_METRIC {
                continue;
            }
            let Some(dst) = N::route_dst(&r).filter(|d| dsts.contains(d)) else {
                continue;
            };
            let ours = (owned.is_some() && route_oif(&r) == owned)
                || r.header.protocol == RouteProtocol::Other(TWILL_RTPROT);
            if !ours {
                let dev = match route_oif(&r) {
                    Some(i) => self.link_name(i).await?.unwrap_or_else(|| format!("#{i}")),
                    None => "no device".into(),
                };
                out.insert(dst, format!("dev {dev}, protocol {:?}", r.header.protocol));
            }
        }
        Ok(out)
    }

    /// Multicast subscription (links, addresses, routes, neighbours): changes to the watched
    /// devices and their entries made by anyone but this `Netlink` (and its clones), and
    /// address changes (see `Watch`).
    pub fn subscribe(&self, watch: Watch) -> Result<mpsc::Receiver<KernelEvent>, NetlinkError> {
        events::subscribe(watch, self.own.clone(), self.own6.clone())
    }

    /// Every IPv4 route the kernel has, all tables.
    async fn all_routes(&self) -> Result<Vec<RouteMessage>, NetlinkError> {
        self.routes_of::<Ipv4Net>().await
    }

    /// Every route of family N, all tables.
    async fn routes_of<N: NlFamily>(&self) -> Result<Vec<RouteMessage>, NetlinkError> {
        let _dumping = self.dumps.lock().await;
        self.handle
            .route()
            .get(N::route_dump())
            .execute()
            .try_collect()
            .await
            .map_err(|e| NetlinkError::from_rtnl("dump routes", e))
    }

    /// The interface of the main table's default route of `route`'s family.
    async fn default_route_link(&self, route: DefaultRoute) -> Result<u32, NetlinkError> {
        let default = |routes: Vec<RouteMessage>| {
            routes
                .iter()
                .filter(|r| r.header.destination_prefix_length == 0 && route_table(r) == MAIN_TABLE)
                .filter_map(|r| Some((route_priority(r), route_oif(r)?)))
                .min()
                .map(|(_, oif)| oif)
        };
        let v4 = match route {
            DefaultRoute::Ipv4 | DefaultRoute::Any => default(self.all_routes().await?),
            DefaultRoute::Ipv6 => None,
        };
        let found = match (v4, route) {
            (Some(oif), _) => Some(oif),
            (None, DefaultRoute::Ipv4) => None,
            (None, _) => default(self.routes_of::<ipnet::Ipv6Net>().await?),
        };
        found.ok_or_else(|| {
            let which = if route == DefaultRoute::Ipv6 {
                "IPv6 "
            } else {
                ""
            };
            NetlinkError::failed(
                "find underlay",
                format!("no {which}default route; pass --iface"),
            )
        })
    }

    async fn link_by_name(&self, name: &str) -> Result<LinkMessage, NetlinkError> {
        let mut s = self.handle.link().get().match_name(name).execute();
        let ctx = format!("link {name}");
        s.try_next()
            .await
            .map_err(|e| NetlinkError::from_rtnl(ctx.clone(), e))?
            .ok_or(NetlinkError::Errno {
                context: ctx,
                errno: libc::ENODEV,
            })
    }

    async fn link_by_index(&self, index: u32) -> Result<LinkMessage, NetlinkError> {
        let mut s = self.handle.link().get().match_index(index).execute();
        let ctx = format!("link #{index}");
        s.try_next()
            .await
            .map_err(|e| NetlinkError::from_rtnl(ctx.clone(), e))?
            .ok_or(NetlinkError::Errno {
                context: ctx,
                errno: libc::ENODEV,
            })
    }

    /// Interface `index`'s IPv6 address for tunnel traffic: see `addr::stable_ipv6`.
    async fn stable_ipv6(&self, index: u32) -> Result<Option<Ipv6Addr>, NetlinkError> {
        Ok(addr::stable_ipv6(
            &self.addresses(Some(index)).await?,
            index,
        ))
    }

    async fn links(&self) -> Result<Vec<LinkMessage>, NetlinkError> {
        let _dumping = self.dumps.lock().await;
        self.handle
            .link()
            .get()
            .execute()
            .try_collect()
            .await
            .map_err(|e| NetlinkError::from_rtnl("list links", e))
    }

    /// Every address of either family (of interface `index` only, if given), in kernel order.
    async fn addresses(&self, index: Option<u32>) -> Result<Vec<AddressMessage>, NetlinkError> {
        let _dumping = self.dumps.lock().await;
        let mut req = self.handle.address().get();
        if let Some(i) = index {
            req = req.set_link_index_filter(i);
        }
        req.execute()
            .try_collect()
            .await
            .map_err(|e| NetlinkError::from_rtnl("list addresses", e))
    }

    /// (ifindex, address, prefix length) of IPv4 addresses, in kernel order.
    async fn ipv4_addrs(
        &self,
        index: Option<u32>,
    ) -> Result<Vec<(u32, Ipv4Addr, u8)>, NetlinkError> {
        let msgs = self.addresses(index).await?;
        Ok(msgs
            .iter()
            .filter(|m| {
                m.header.family == AddressFamily::Inet && index.is_none_or(|i| m.header.index == i)
            })
            .filter_map(|m| Some((m.header.index, addr_of(m)?, m.header.prefix_len)))
            .collect())
    }
}

/// Whether a VXLAN device's endpoint is IPv6 (the kernel's rule: an IPv6 local address or
/// group/remote makes the device's socket IPv6; otherwise it is IPv4).
fn vxlan_is_v6(d: &[InfoVxlan]) -> bool {
    d.iter()
        .any(|i| matches!(i, InfoVxlan::Local6(_) | InfoVxlan::Group6(_)))
}

/// The VXLAN attributes of a link, if it is a VXLAN device.
fn vxlan_data(l: &LinkMessage) -> Option<&[InfoVxlan]> {
    l.attributes.iter().find_map(|a| match a {
        LinkAttribute::LinkInfo(infos) => {
            let is_vxlan = infos
                .iter()
                .any(|i| matches!(i, LinkInfo::Kind(InfoKind::Vxlan)));
            infos.iter().find_map(|i| match i {
                LinkInfo::Data(InfoData::Vxlan(d)) if is_vxlan => Some(d.as_slice()),
                _ => None,
            })
        }
        _ => None,
    })
}

fn vxlan_matches<N: NlFamily>(l: &LinkMessage, spec: &VxlanSpecOf<N>) -> bool {
    let mac_ok = l
        .attributes
        .iter()
        .any(|a| matches!(a, LinkAttribute::Address(m) if m[..] == spec.mac.octets()));
    let Some(data) = vxlan_data(l) else {
        return false;
    };
    let has = |want: InfoVxlan| data.contains(&want);
    mac_ok
        && has(InfoVxlan::Id(spec.vni))
        && has(N::vxlan_local_info(spec.local))
        && has(InfoVxlan::Link(spec.underlay_index))
        && has(InfoVxlan::Port(spec.port))
        && has(InfoVxlan::Learning(false))
}

fn link_name(l: &LinkMessage) -> Option<String> {
    l.attributes.iter().find_map(|a| match a {
        LinkAttribute::IfName(n) => Some(n.clone()),
        _ => None,
    })
}

fn link_mtu(l: &LinkMessage) -> Option<u32> {
    l.attributes.iter().find_map(|a| match a {
        LinkAttribute::Mtu(m) => Some(*m),
        _ => None,
    })
}

fn neigh_lladdr(n: &NeighbourMessage) -> Option<MacAddr> {
    n.attributes.iter().find_map(|a| match a {
        NeighbourAttribute::LinkLayerAddress(l) => <[u8; 6]>::try_from(&l[..]).ok().map(MacAddr),
        _ => None,
    })
}

fn route_table(r: &RouteMessage) -> u32 {
    r.attributes
        .iter()
        .find_map(|a| match a {
            RouteAttribute::Table(t) => Some(*t),
            _ => None,
        })
        .unwrap_or(r.header.table as u32)
}

fn route_oif(r: &RouteMessage) -> Option<u32> {
    r.attributes.iter().find_map(|a| match a {
        RouteAttribute::Oif(i) => Some(*i),
        _ => None,
    })
}

fn route_priority(r: &RouteMessage) -> u32 {
    r.attributes
        .iter()
        .find_map(|a| match a {
            RouteAttribute::Priority(p) => Some(*p),
            _ => None,
        })
        .unwrap_or(0)
}

fn route_dst(r: &RouteMessage) -> Option<Ipv4Net> {
    <Ipv4Net as NlFamily>::route_dst(r)
}
