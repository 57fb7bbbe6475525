//! Kernel change notifications for the daemon: a multicast netlink socket, filtered down to the
//! events that can make our data path wrong, coalesced so a burst becomes one event per kind.

use futures::StreamExt;
use rtnetlink::packet_core::NetlinkPayload;
use rtnetlink::packet_route::address::AddressMessage;
use rtnetlink::packet_route::neighbour::NeighbourMessage;
use rtnetlink::packet_route::route::RouteProtocol;
use rtnetlink::packet_route::{AddressFamily, RouteNetlinkMessage};
use rtnetlink::sys::AsyncSocket;
use rtnetlink::MulticastGroup;
use tokio::sync::mpsc;

use super::own::{EntryKey, OwnDeletions};
use super::{neigh_dst_v4, neigh_lladdr, route_dst, route_oif};
use super::{KernelEvent, NetlinkError, TWILL_RTPROT};

/// What a notification means for device `ifindex`.
#[derive(Debug, PartialEq, Eq)]
enum Notice {
    /// The device itself changed.
    Device,
    /// An entry on it was deleted; `None` when the message does not say which.
    Deleted(Option<EntryKey>),
    Address,
}

/// `overlay`: `ifindex` is our overlay device, whose neighbours are ours; otherwise it is the
/// underlay (host-gw), whose neighbours come and go on their own.
fn classify(msg: &RouteNetlinkMessage, ifindex: u32, overlay: bool) -> Option<Notice> {
    use RouteNetlinkMessage as M;
    let v4 = |a: &AddressMessage| a.header.family == AddressFamily::Inet;
    match msg {
        M::NewLink(l) | M::DelLink(l) if l.header.index == ifindex => Some(Notice::Device),
        // Neighbours and FDB entries (AF_BRIDGE) both come as neighbour messages. IPv6
        // neighbours (the kernel's own multicast entries) are not ours.
        M::DelNeighbour(n)
            if overlay
                && n.header.ifindex == ifindex
                && matches!(n.header.family, AddressFamily::Inet | AddressFamily::Bridge) =>
        {
            Some(Notice::Deleted(neighbour_key(n)))
        }
        M::DelRoute(r) => {
            let direct = r.header.protocol == RouteProtocol::Other(TWILL_RTPROT);
            (route_oif(r) == Some(ifindex) || direct)
                .then(|| Notice::Deleted(route_dst(r).map(EntryKey::Route)))
        }
        M::NewAddress(a) | M::DelAddress(a) if v4(a) => Some(Notice::Address),
        _ => None,
    }
}

fn neighbour_key(n: &NeighbourMessage) -> Option<EntryKey> {
    match n.header.family {
        AddressFamily::Inet => neigh_dst_v4(n).map(EntryKey::Neigh),
        AddressFamily::Bridge => Some(EntryKey::Fdb(neigh_lladdr(n)?, neigh_dst_v4(n)?)),
        _ => None,
    }
}

pub(super) fn subscribe(
    ifindex: u32,
    overlay: bool,
    own: OwnDeletions,
) -> Result<mpsc::Receiver<KernelEvent>, NetlinkError> {
    let rt = tokio::runtime::Handle::try_current()
        .map_err(|e| NetlinkError::failed("netlink subscription needs a tokio runtime", e))?;
    let (mut conn, _handle, mut messages) = rtnetlink::new_multicast_connection(&[
        MulticastGroup::Link,
        MulticastGroup::Ipv4Ifaddr,
        MulticastGroup::Ipv4Route,
        MulticastGroup::Neigh,
    ])
    .map_err(|e| NetlinkError::failed("subscribe to kernel events", e))?;
    // Deleting thousands of entries floods the socket; a bigger buffer makes overruns rare, and
    // an overrun is reported as a change anyway.
    let _ = conn.socket_mut().socket_mut().set_rx_buf_sz(4usize << 20);
    rt.spawn(conn);

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
                        NetlinkPayload::InnerMessage(msg) => match classify(&msg, ifindex, overlay) {
                            Some(Notice::Device) => device = true,
                            // Our own deletions echo back: not news.
                            Some(Notice::Deleted(Some(key))) if own.take(key) => {}
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

    use super::*;

    #[test]
    fn classifies_only_what_concerns_us() {
        use RouteNetlinkMessage as M;
        let mut link = LinkMessage::default();
        link.header.index = 7;
        assert_eq!(
            classify(&M::DelLink(link.clone()), 7, true),
            Some(Notice::Device)
        );
        assert_eq!(classify(&M::DelLink(link), 8, true), None);

        let ip: Ipv4Addr = "10.244.2.0".parse().unwrap();
        let mac: MacAddr = "0e:00:00:00:00:02".parse().unwrap();
        let mut n = NeighbourMessage::default();
        n.header.ifindex = 7;
        n.header.family = AddressFamily::Inet;
        n.attributes
            .push(NeighbourAttribute::Destination(NeighbourAddress::Inet(ip)));
        assert_eq!(
            classify(&M::DelNeighbour(n.clone()), 7, true),
            Some(Notice::Deleted(Some(EntryKey::Neigh(ip))))
        );
        assert_eq!(classify(&M::NewNeighbour(n.clone()), 7, true), None);
        // FDB: AF_BRIDGE, keyed by MAC and remote VTEP.
        let vtep: Ipv4Addr = "198.18.0.2".parse().unwrap();
        n.header.family = AddressFamily::Bridge;
        n.attributes = vec![
            NeighbourAttribute::LinkLayerAddress(mac.octets().to_vec()),
            // As the kernel's AF_BRIDGE notifications parse: raw address bytes.
            NeighbourAttribute::Destination(NeighbourAddress::Other(vtep.octets().to_vec())),
        ];
        assert_eq!(
            classify(&M::DelNeighbour(n.clone()), 7, true),
            Some(Notice::Deleted(Some(EntryKey::Fdb(mac, vtep))))
        );
        // Without the attributes it cannot be matched to ours: still news.
        n.attributes.clear();
        assert_eq!(
            classify(&M::DelNeighbour(n.clone()), 7, true),
            Some(Notice::Deleted(None))
        );
        // On the underlay (host-gw) neighbours come and go by themselves: not ours.
        assert_eq!(classify(&M::DelNeighbour(n.clone()), 7, false), None);
        n.header.family = AddressFamily::Inet6;
        assert_eq!(classify(&M::DelNeighbour(n), 7, true), None);

        let mut r = RouteMessage::default();
        r.header.address_family = AddressFamily::Inet;
        r.attributes.push(RouteAttribute::Oif(7));
        r.attributes
            .push(RouteAttribute::Destination(RouteAddress::Inet(ip)));
        r.header.destination_prefix_length = 24;
        let key = EntryKey::Route("10.244.2.0/24".parse().unwrap());
        assert_eq!(
            classify(&M::DelRoute(r.clone()), 7, true),
            Some(Notice::Deleted(Some(key)))
        );
        assert_eq!(classify(&M::DelRoute(r.clone()), 9, true), None);
        r.header.protocol = RouteProtocol::Other(TWILL_RTPROT);
        assert_eq!(
            classify(&M::DelRoute(r), 9, true),
            Some(Notice::Deleted(Some(key)))
        );

        let mut a = AddressMessage::default();
        a.header.family = AddressFamily::Inet;
        assert_eq!(
            classify(&M::NewAddress(a.clone()), 1, true),
            Some(Notice::Address)
        );
        a.header.family = AddressFamily::Inet6;
        assert_eq!(classify(&M::DelAddress(a), 1, true), None);
    }

    #[test]
    fn needs_a_runtime() {
        assert!(subscribe(1, true, OwnDeletions::default()).is_err());
        assert!(crate::netlink::Netlink::new().is_err());
    }
}
