//! Kernel change notifications for the daemon: a multicast netlink socket, filtered down to the
//! events that can make our data path wrong, coalesced so a burst becomes one event per kind.

use futures::StreamExt;
use ipnet::{Ipv4Net, Ipv6Net};
use rtnetlink::packet_core::NetlinkPayload;
use rtnetlink::packet_route::address::AddressMessage;
use rtnetlink::packet_route::neighbour::NeighbourMessage;
use rtnetlink::packet_route::route::{RouteMessage, RouteProtocol};
use rtnetlink::packet_route::{AddressFamily, RouteNetlinkMessage};
use rtnetlink::sys::AsyncSocket;
use rtnetlink::MulticastGroup;
use tokio::sync::mpsc;

use super::family::NlFamily;
use super::own::OwnDeletions;
use super::{neigh_lladdr, route_oif};
use super::{KernelEvent, NetlinkError, TWILL_RTPROT};
use crate::reconcile::EntryKeyOf;

/// A device whose changes concern us.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Watched {
    pub ifindex: u32,
    /// Our overlay device, whose neighbours and FDB entries are ours; otherwise the underlay
    /// (host-gw), whose neighbours come and go on their own.
    pub overlay: bool,
}

/// What the notification socket follows: each family's device (the IPv6 one on a node that
/// serves a dual-stack network's IPv6 side) and the underlay, whose IPv6 address is the IPv6
/// endpoint. IPv4 address changes count on any interface (the underlay may move).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Watch {
    /// The IPv4 side's device; none on an IPv6-only node.
    pub v4: Option<Watched>,
    pub v6: Option<Watched>,
    pub underlay: u32,
}

/// A deleted entry of either family.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum AnyKey {
    V4(EntryKeyOf<Ipv4Net>),
    V6(EntryKeyOf<Ipv6Net>),
}

/// What a notification means for the watched devices.
#[derive(Debug, PartialEq, Eq)]
enum Notice {
    /// A device itself changed.
    Device,
    /// An entry on one was deleted; `None` when the message does not say which.
    Deleted(Option<AnyKey>),
    Address,
}

fn classify(msg: &RouteNetlinkMessage, w: &Watch) -> Option<Notice> {
    use RouteNetlinkMessage as M;
    let ours =
        |i: u32| w.v4.is_some_and(|d| d.ifindex == i) || w.v6.is_some_and(|d| d.ifindex == i);
    match msg {
        M::NewLink(l) | M::DelLink(l) if ours(l.header.index) => Some(Notice::Device),
        M::DelNeighbour(n) => deleted_neighbour(n, w),
        M::DelRoute(r) => deleted_route(r, w),
        M::NewAddress(a) | M::DelAddress(a) => address(a, w).then_some(Notice::Address),
        _ => None,
    }
}

/// Neighbours and FDB entries (AF_BRIDGE) both come as neighbour messages; on each overlay
/// device those of its family are ours (the kernel's own IPv6 entries on the IPv4 device are
/// not).
fn deleted_neighbour(n: &NeighbourMessage, w: &Watch) -> Option<Notice> {
    let (i, fam) = (n.header.ifindex, n.header.family);
    if w.v4.is_some_and(|d| d.overlay && d.ifindex == i) {
        return matches!(fam, AddressFamily::Inet | AddressFamily::Bridge)
            .then(|| Notice::Deleted(neighbour_key::<Ipv4Net>(n).map(AnyKey::V4)));
    }
    w.v6.filter(|d| d.overlay && d.ifindex == i)?;
    if !matches!(fam, AddressFamily::Inet6 | AddressFamily::Bridge) {
        return None;
    }
    let key = neighbour_key::<Ipv6Net>(n);
    // The kernel's own entries (link-local, multicast) come and go by themselves; ours are
    // the peers' gateways, global addresses.
    if let Some(EntryKeyOf::Neigh(a)) = key {
        if a.is_multicast() || a.is_unicast_link_local() {
            return None;
        }
    }
    Some(Notice::Deleted(key.map(AnyKey::V6)))
}

fn neighbour_key<N: NlFamily>(n: &NeighbourMessage) -> Option<EntryKeyOf<N>> {
    match n.header.family {
        AddressFamily::Bridge => Some(EntryKeyOf::Fdb(neigh_lladdr(n)?, N::neigh_dst(n)?)),
        _ => N::neigh_dst(n).map(EntryKeyOf::Neigh),
    }
}

/// A route of a watched family through its device, or one of ours anywhere (host-gw and
/// DirectRouting routes leave through the underlay).
fn deleted_route(r: &RouteMessage, w: &Watch) -> Option<Notice> {
    let direct = r.header.protocol == RouteProtocol::Other(TWILL_RTPROT);
    match r.header.address_family {
        AddressFamily::Inet => {
            let d4 = w.v4?;
            (route_oif(r) == Some(d4.ifindex) || direct).then(|| {
                Notice::Deleted(
                    <Ipv4Net as NlFamily>::route_dst(r).map(|d| AnyKey::V4(EntryKeyOf::Route(d))),
                )
            })
        }
        AddressFamily::Inet6 => {
            let d6 = w.v6?;
            (route_oif(r) == Some(d6.ifindex) || direct).then(|| {
                Notice::Deleted(
                    <Ipv6Net as NlFamily>::route_dst(r).map(|d| AnyKey::V6(EntryKeyOf::Route(d))),
                )
            })
        }
        _ => None,
    }
}

/// Any IPv4 address when we serve IPv4 (the underlay may move to another interface); IPv6
/// addresses of the underlay when we serve IPv6 (pods' link-local addresses on other
/// interfaces are no news).
fn address(a: &AddressMessage, w: &Watch) -> bool {
    match a.header.family {
        AddressFamily::Inet => w.v4.is_some(),
        AddressFamily::Inet6 => w.v6.is_some() && a.header.index == w.underlay,
        _ => false,
    }
}

pub(super) fn subscribe(
    w: Watch,
    own: OwnDeletions<Ipv4Net>,
    own6: OwnDeletions<Ipv6Net>,
) -> Result<mpsc::Receiver<KernelEvent>, NetlinkError> {
    let rt = tokio::runtime::Handle::try_current()
        .map_err(|e| NetlinkError::failed("netlink subscription needs a tokio runtime", e))?;
    let mut groups = vec![
        MulticastGroup::Link,
        MulticastGroup::Ipv4Ifaddr,
        MulticastGroup::Ipv4Route,
        MulticastGroup::Neigh,
    ];
    if w.v6.is_some() {
        groups.extend([MulticastGroup::Ipv6Ifaddr, MulticastGroup::Ipv6Route]);
    }
    let (mut conn, _handle, mut messages) = rtnetlink::new_multicast_connection(&groups)
        .map_err(|e| NetlinkError::failed("subscribe to kernel events", e))?;
    // Deleting thousands of entries floods the socket; a bigger buffer makes overruns rare, and
    // an overrun is reported as a change anyway.
    let _ = conn.socket_mut().socket_mut().set_rx_buf_sz(4usize << 20);
    rt.spawn(conn);
    let echo = move |k: AnyKey| match k {
        AnyKey::V4(k) => own.take(k),
        AnyKey::V6(k) => own6.take(k),
    };

    let (tx, rx) = mpsc::channel(2);
    rt.spawn(async move {
        let (mut device, mut address) = (false, false);
        loop {
            let pending = device || address;
            tokio::select! {
                // Drain what is queued before reporting: one event per burst.
                biased;
                m = messages.next() => {
                    let Some((m, _)) = m else { break };
                    match m.payload {
                        NetlinkPayload::InnerMessage(msg) => match classify(&msg, &w) {
                            Some(Notice::Device) => device = true,
                            // Our own deletions echo back: not news.
                            Some(Notice::Deleted(Some(key))) if echo(key) => {}
                            Some(Notice::Deleted(_)) => device = true,
                            Some(Notice::Address) => address = true,
                            None => {}
                        },
                        // Lost notifications: assume everything changed.
                        NetlinkPayload::Overrun(_) => (device, address) = (true, true),
                        _ => {}
                    }
                }
                permit = tx.reserve(), if pending => {
                    let Ok(permit) = permit else { break };
                    if device {
                        device = false;
                        permit.send(KernelEvent::DeviceChanged);
                    } else {
                        address = false;
                        permit.send(KernelEvent::AddressChanged);
                    }
                }
                _ = tx.closed() => break,
            }
        }
    });
    Ok(rx)
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use rtnetlink::packet_route::link::LinkMessage;
    use rtnetlink::packet_route::neighbour::{NeighbourAddress, NeighbourAttribute};
    use rtnetlink::packet_route::route::{RouteAddress, RouteAttribute, RouteMessage};

    use crate::mac::MacAddr;
    use crate::reconcile::EntryKey;

    use super::*;

    /// The IPv4 device 7 (an overlay unless `overlay` is false), no IPv6 side, underlay 1.
    fn w4(ifindex: u32, overlay: bool) -> Watch {
        Watch {
            v4: Some(Watched { ifindex, overlay }),
            v6: None,
            underlay: 1,
        }
    }

    fn del(k: EntryKey) -> Option<Notice> {
        Some(Notice::Deleted(Some(AnyKey::V4(k))))
    }

    #[test]
    fn classifies_only_what_concerns_us() {
        use RouteNetlinkMessage as M;
        let mut link = LinkMessage::default();
        link.header.index = 7;
        assert_eq!(
            classify(&M::DelLink(link.clone()), &w4(7, true)),
            Some(Notice::Device)
        );
        assert_eq!(classify(&M::DelLink(link), &w4(8, true)), None);

        let ip: Ipv4Addr = "10.244.2.0".parse().unwrap();
        let mac: MacAddr = "0e:00:00:00:00:02".parse().unwrap();
        let mut n = NeighbourMessage::default();
        n.header.ifindex = 7;
        n.header.family = AddressFamily::Inet;
        n.attributes
            .push(NeighbourAttribute::Destination(NeighbourAddress::Inet(ip)));
        assert_eq!(
            classify(&M::DelNeighbour(n.clone()), &w4(7, true)),
            del(EntryKey::Neigh(ip))
        );
        assert_eq!(classify(&M::NewNeighbour(n.clone()), &w4(7, true)), None);
        // FDB: AF_BRIDGE, keyed by MAC and remote VTEP.
        let vtep: Ipv4Addr = "198.18.0.2".parse().unwrap();
        n.header.family = AddressFamily::Bridge;
        n.attributes = vec![
            NeighbourAttribute::LinkLayerAddress(mac.octets().to_vec()),
            // As the kernel's AF_BRIDGE notifications parse: raw address bytes.
            NeighbourAttribute::Destination(NeighbourAddress::Other(vtep.octets().to_vec())),
        ];
        assert_eq!(
            classify(&M::DelNeighbour(n.clone()), &w4(7, true)),
            del(EntryKey::Fdb(mac, vtep))
        );
        // Without the attributes it cannot be matched to ours: still news.
        n.attributes.clear();
        assert_eq!(
            classify(&M::DelNeighbour(n.clone()), &w4(7, true)),
            Some(Notice::Deleted(None))
        );
        // On the underlay (host-gw) neighbours come and go by themselves: not ours.
        assert_eq!(classify(&M::DelNeighbour(n.clone()), &w4(7, false)), None);
        n.header.family = AddressFamily::Inet6;
        assert_eq!(classify(&M::DelNeighbour(n), &w4(7, true)), None);

        let mut r = RouteMessage::default();
        r.header.address_family = AddressFamily::Inet;
        r.attributes.push(RouteAttribute::Oif(7));
        r.attributes
            .push(RouteAttribute::Destination(RouteAddress::Inet(ip)));
        r.header.destination_prefix_length = 24;
        let key = EntryKey::Route("10.244.2.0/24".parse().unwrap());
        assert_eq!(classify(&M::DelRoute(r.clone()), &w4(7, true)), del(key));
        assert_eq!(classify(&M::DelRoute(r.clone()), &w4(9, true)), None);
        r.header.protocol = RouteProtocol::Other(TWILL_RTPROT);
        assert_eq!(classify(&M::DelRoute(r), &w4(9, true)), del(key));

        let mut a = AddressMessage::default();
        a.header.family = AddressFamily::Inet;
        assert_eq!(
            classify(&M::NewAddress(a.clone()), &w4(1, true)),
            Some(Notice::Address)
        );
        a.header.family = AddressFamily::Inet6;
        assert_eq!(classify(&M::DelAddress(a), &w4(1, true)), None);
    }

    /// A dual-stack node: the IPv6 device's entries, its IPv6 routes and twill's IPv6 routes
    /// anywhere, and the underlay's IPv6 addresses are watched too; a v4-only node ignores them.
    #[test]
    fn classifies_the_ipv6_side() {
        use std::net::Ipv6Addr;
        use RouteNetlinkMessage as M;
        let dual = Watch {
            v4: Some(Watched {
                ifindex: 7,
                overlay: true,
            }),
            v6: Some(Watched {
                ifindex: 8,
                overlay: true,
            }),
            underlay: 1,
        };
        let v4_only = w4(7, true);
        let del6 = |k| Some(Notice::Deleted(Some(AnyKey::V6(k))));
        let mut link = LinkMessage::default();
        link.header.index = 8;
        assert_eq!(
            classify(&M::DelLink(link.clone()), &dual),
            Some(Notice::Device)
        );
        assert_eq!(classify(&M::DelLink(link), &v4_only), None);

        let gw: Ipv6Addr = "fd00:10:244:2::".parse().unwrap();
        let vtep: Ipv6Addr = "fd00:198:18::c".parse().unwrap();
        let mac: MacAddr = "0e:00:00:00:06:02".parse().unwrap();
        let mut n = NeighbourMessage::default();
        n.header.ifindex = 8;
        n.header.family = AddressFamily::Inet6;
        n.attributes
            .push(NeighbourAttribute::Destination(NeighbourAddress::Inet6(gw)));
        assert_eq!(
            classify(&M::DelNeighbour(n.clone()), &dual),
            del6(EntryKeyOf::Neigh(gw))
        );
        assert_eq!(classify(&M::DelNeighbour(n.clone()), &v4_only), None);
        // The kernel's IPv6 neighbours on the IPv4 device stay no news, and so do its own
        // (link-local, multicast) ones on the IPv6 device.
        n.header.ifindex = 7;
        assert_eq!(classify(&M::DelNeighbour(n.clone()), &dual), None);
        n.header.ifindex = 8;
        for own in ["fe80::1", "ff02::1:ff00:2"] {
            let mut k = n.clone();
            k.attributes = vec![NeighbourAttribute::Destination(NeighbourAddress::Inet6(
                own.parse().unwrap(),
            ))];
            assert_eq!(classify(&M::DelNeighbour(k), &dual), None, "{own}");
        }
        n.header.family = AddressFamily::Bridge;
        n.attributes = vec![
            NeighbourAttribute::LinkLayerAddress(mac.octets().to_vec()),
            NeighbourAttribute::Destination(NeighbourAddress::Other(vtep.octets().to_vec())),
        ];
        assert_eq!(
            classify(&M::DelNeighbour(n), &dual),
            del6(EntryKeyOf::Fdb(mac, vtep))
        );

        let mut r = RouteMessage::default();
        r.header.address_family = AddressFamily::Inet6;
        r.header.destination_prefix_length = 64;
        r.attributes.push(RouteAttribute::Oif(8));
        r.attributes
            .push(RouteAttribute::Destination(RouteAddress::Inet6(gw)));
        let key = EntryKeyOf::Route("fd00:10:244:2::/64".parse().unwrap());
        assert_eq!(classify(&M::DelRoute(r.clone()), &dual), del6(key));
        assert_eq!(classify(&M::DelRoute(r.clone()), &v4_only), None);
        // host-gw / DirectRouting: ours on the underlay.
        r.attributes[0] = RouteAttribute::Oif(1);
        assert_eq!(classify(&M::DelRoute(r.clone()), &dual), None);
        r.header.protocol = RouteProtocol::Other(TWILL_RTPROT);
        let r6 = r.clone();
        assert_eq!(classify(&M::DelRoute(r), &dual), del6(key));

        let mut a = AddressMessage::default();
        a.header.family = AddressFamily::Inet6;
        a.header.index = 1;
        assert_eq!(
            classify(&M::NewAddress(a.clone()), &dual),
            Some(Notice::Address)
        );
        assert_eq!(classify(&M::NewAddress(a.clone()), &v4_only), None);
        // A pod's veth getting its link-local address is no news.
        a.header.index = 23;
        assert_eq!(classify(&M::NewAddress(a), &dual), None);

        // An IPv6-only node: its IPv6 device and routes are watched; IPv4 routes and
        // addresses (it has no IPv4 side) are no news.
        let only6 = Watch { v4: None, ..dual };
        assert_eq!(classify(&M::DelRoute(r6.clone()), &only6), del6(key));
        let mut r4 = RouteMessage::default();
        r4.header.address_family = AddressFamily::Inet;
        r4.header.protocol = RouteProtocol::Other(TWILL_RTPROT);
        r4.attributes.push(RouteAttribute::Oif(7));
        assert_eq!(classify(&M::DelRoute(r4.clone()), &only6), None);
        assert!(classify(&M::DelRoute(r4), &dual).is_some());
        let mut a4 = AddressMessage::default();
        a4.header.family = AddressFamily::Inet;
        a4.header.index = 1;
        assert_eq!(classify(&M::NewAddress(a4.clone()), &only6), None);
        assert_eq!(classify(&M::NewAddress(a4), &dual), Some(Notice::Address));
        let mut link = LinkMessage::default();
        link.header.index = 7;
        assert_eq!(classify(&M::DelLink(link), &only6), None);
    }

    #[test]
    fn needs_a_runtime() {
        assert!(subscribe(
            w4(1, true),
            OwnDeletions::default(),
            OwnDeletions::default()
        )
        .is_err());
        assert!(crate::netlink::Netlink::new().is_err());
    }
}
