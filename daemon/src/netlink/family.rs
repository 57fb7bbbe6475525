//! What netlink messages need to know of an address family, so that one set of entry writers
//! and readers serves the IPv4 devices and the IPv6 ones.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::{Ipv4Net, Ipv6Net};
use rtnetlink::packet_route::link::InfoVxlan;
use rtnetlink::packet_route::neighbour::{NeighbourAddress, NeighbourAttribute, NeighbourMessage};
use rtnetlink::packet_route::route::{RouteAddress, RouteAttribute, RouteMessage};
use rtnetlink::packet_route::AddressFamily;
use rtnetlink::{LinkMessageBuilder, LinkVxlan, RouteMessageBuilder};

use super::own::OwnDeletions;
use super::Netlink;
use crate::subnet::Cidr;

pub trait NlFamily: Cidr {
    const AF: AddressFamily;
    /// The metric the kernel gives a route added without one: twill's routes have it, and so
    /// does any route they would collide with.
    const DEFAULT_METRIC: u32;
    fn neigh_addr(a: Self::Addr) -> NeighbourAddress;
    /// A neighbour's or FDB entry's destination, if of this family. FDB entries (AF_BRIDGE)
    /// carry it as bare bytes: their length tells the family.
    fn neigh_dst(n: &NeighbourMessage) -> Option<Self::Addr>;
    /// A route message builder with destination `dst` and gateway `gw` set.
    fn route_to(dst: Self, gw: Self::Addr) -> RouteMessageBuilder<Self::Addr>;
    /// The request that dumps this family's routes.
    fn route_dump() -> RouteMessage;
    /// A route's destination (the default route has none: a /0); None if of another family.
    fn route_dst(r: &RouteMessage) -> Option<Self>;
    fn route_gw(r: &RouteMessage) -> Option<Self::Addr>;
    /// Our own deletions of this family's entries, so their notifications are not news.
    fn own(nl: &Netlink) -> &OwnDeletions<Self>;
    fn ip(a: Self::Addr) -> IpAddr;
    /// `ip` if it is of this family.
    fn from_ip(ip: IpAddr) -> Option<Self::Addr>;
    /// The address a CIDR is written with (host bits kept: `10.244.1.1/24` is 10.244.1.1).
    fn host(net: Self) -> Self::Addr;
    /// A VXLAN device's local (source) address.
    fn vxlan_local(
        b: LinkMessageBuilder<LinkVxlan>,
        a: Self::Addr,
    ) -> LinkMessageBuilder<LinkVxlan>;
    fn vxlan_local_info(a: Self::Addr) -> InfoVxlan;
}

impl NlFamily for Ipv4Net {
    const AF: AddressFamily = AddressFamily::Inet;
    const DEFAULT_METRIC: u32 = 0;
    fn neigh_addr(a: Ipv4Addr) -> NeighbourAddress {
        NeighbourAddress::Inet(a)
    }
    fn neigh_dst(n: &NeighbourMessage) -> Option<Ipv4Addr> {
        n.attributes.iter().find_map(|a| match a {
            NeighbourAttribute::Destination(NeighbourAddress::Inet(ip)) => Some(*ip),
            NeighbourAttribute::Destination(NeighbourAddress::Other(b)) => {
                <[u8; 4]>::try_from(&b[..]).ok().map(Ipv4Addr::from)
            }
            _ => None,
        })
    }
    fn route_to(dst: Ipv4Net, gw: Ipv4Addr) -> RouteMessageBuilder<Ipv4Addr> {
        RouteMessageBuilder::<Ipv4Addr>::new()
            .destination_prefix(dst.network(), dst.prefix_len())
            .gateway(gw)
    }
    fn route_dump() -> RouteMessage {
        RouteMessageBuilder::<Ipv4Addr>::new().build()
    }
    fn route_dst(r: &RouteMessage) -> Option<Ipv4Net> {
        if r.header.address_family != AddressFamily::Inet {
            return None;
        }
        let ip = r
            .attributes
            .iter()
            .find_map(|a| match a {
                RouteAttribute::Destination(RouteAddress::Inet(ip)) => Some(*ip),
                _ => None,
            })
            .unwrap_or(Ipv4Addr::UNSPECIFIED);
        Ipv4Net::new(ip, r.header.destination_prefix_length).ok()
    }
    fn route_gw(r: &RouteMessage) -> Option<Ipv4Addr> {
        r.attributes.iter().find_map(|a| match a {
            RouteAttribute::Gateway(RouteAddress::Inet(ip)) => Some(*ip),
            _ => None,
        })
    }
    fn own(nl: &Netlink) -> &OwnDeletions<Ipv4Net> {
        &nl.own
    }
    fn ip(a: Ipv4Addr) -> IpAddr {
        IpAddr::V4(a)
    }
    fn from_ip(ip: IpAddr) -> Option<Ipv4Addr> {
        match ip {
            IpAddr::V4(a) => Some(a),
            IpAddr::V6(_) => None,
        }
    }
    fn host(net: Ipv4Net) -> Ipv4Addr {
        net.addr()
    }
    fn vxlan_local(b: LinkMessageBuilder<LinkVxlan>, a: Ipv4Addr) -> LinkMessageBuilder<LinkVxlan> {
        b.local(a)
    }
    fn vxlan_local_info(a: Ipv4Addr) -> InfoVxlan {
        InfoVxlan::Local(a)
    }
}

impl NlFamily for Ipv6Net {
    const AF: AddressFamily = AddressFamily::Inet6;
    const DEFAULT_METRIC: u32 = 1024;
    fn neigh_addr(a: Ipv6Addr) -> NeighbourAddress {
        NeighbourAddress::Inet6(a)
    }
    fn neigh_dst(n: &NeighbourMessage) -> Option<Ipv6Addr> {
        n.attributes.iter().find_map(|a| match a {
            NeighbourAttribute::Destination(NeighbourAddress::Inet6(ip)) => Some(*ip),
            NeighbourAttribute::Destination(NeighbourAddress::Other(b)) => {
                <[u8; 16]>::try_from(&b[..]).ok().map(Ipv6Addr::from)
            }
            _ => None,
        })
    }
    fn route_to(dst: Ipv6Net, gw: Ipv6Addr) -> RouteMessageBuilder<Ipv6Addr> {
        RouteMessageBuilder::<Ipv6Addr>::new()
            .destination_prefix(dst.network(), dst.prefix_len())
            .gateway(gw)
    }
    fn route_dump() -> RouteMessage {
        RouteMessageBuilder::<Ipv6Addr>::new().build()
    }
    fn route_dst(r: &RouteMessage) -> Option<Ipv6Net> {
        if r.header.address_family != AddressFamily::Inet6 {
            return None;
        }
        let ip = r
            .attributes
            .iter()
            .find_map(|a| match a {
                RouteAttribute::Destination(RouteAddress::Inet6(ip)) => Some(*ip),
                _ => None,
            })
            .unwrap_or(Ipv6Addr::UNSPECIFIED);
        Ipv6Net::new(ip, r.header.destination_prefix_length).ok()
    }
    fn route_gw(r: &RouteMessage) -> Option<Ipv6Addr> {
        r.attributes.iter().find_map(|a| match a {
            RouteAttribute::Gateway(RouteAddress::Inet6(ip)) => Some(*ip),
            _ => None,
        })
    }
    fn own(nl: &Netlink) -> &OwnDeletions<Ipv6Net> {
        &nl.own6
    }
    fn ip(a: Ipv6Addr) -> IpAddr {
        IpAddr::V6(a)
    }
    fn from_ip(ip: IpAddr) -> Option<Ipv6Addr> {
        match ip {
            IpAddr::V6(a) => Some(a),
            IpAddr::V4(_) => None,
        }
    }
    fn host(net: Ipv6Net) -> Ipv6Addr {
        net.addr()
    }
    fn vxlan_local(b: LinkMessageBuilder<LinkVxlan>, a: Ipv6Addr) -> LinkMessageBuilder<LinkVxlan> {
        b.local6(a)
    }
    fn vxlan_local_info(a: Ipv6Addr) -> InfoVxlan {
        InfoVxlan::Local6(a)
    }
}
