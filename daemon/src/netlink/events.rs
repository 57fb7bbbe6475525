//! Kernel change notifications for the daemon: a multicast netlink socket, filtered down to the
//! events that can make our data path wrong, coalesced so a burst becomes one event per kind.

use futures::StreamExt;
use rtnetlink::packet_core::NetlinkPayload;
use rtnetlink::packet_route::address::AddressMessage;
use rtnetlink::packet_route::route::{RouteAttribute, RouteProtocol};
use rtnetlink::packet_route::{AddressFamily, RouteNetlinkMessage};
use rtnetlink::sys::AsyncSocket;
use rtnetlink::MulticastGroup;
use tokio::sync::mpsc;

use super::{KernelEvent, NetlinkError, TWILL_RTPROT};

/// Which event (if any) a notification means for device `ifindex`.
fn classify(msg: &RouteNetlinkMessage, ifindex: u32) -> Option<KernelEvent> {
    use RouteNetlinkMessage as M;
    let v4 = |a: &AddressMessage| a.header.family == AddressFamily::Inet;
    match msg {
        M::NewLink(l) | M::DelLink(l) if l.header.index == ifindex => {
            Some(KernelEvent::DeviceChanged)
        }
        // Neighbours and FDB entries (AF_BRIDGE) both come as neighbour messages.
        M::DelNeighbour(n) if n.header.ifindex == ifindex => Some(KernelEvent::DeviceChanged),
        M::DelRoute(r) => {
            let oif = r
                .attributes
                .iter()
                .any(|a| matches!(a, RouteAttribute::Oif(i) if *i == ifindex));
            let direct = r.header.protocol == RouteProtocol::Other(TWILL_RTPROT);
            (oif || direct).then_some(KernelEvent::DeviceChanged)
        }
        M::NewAddress(a) | M::DelAddress(a) if v4(a) => Some(KernelEvent::AddressChanged),
        _ => None,
    }
}

pub(super) fn subscribe(ifindex: u32) -> Result<mpsc::Receiver<KernelEvent>, NetlinkError> {
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
                        NetlinkPayload::InnerMessage(msg) => match classify(&msg, ifindex) {
                            Some(KernelEvent::DeviceChanged) => device = true,
                            Some(KernelEvent::AddressChanged) => address = true,
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
    use rtnetlink::packet_route::link::LinkMessage;
    use rtnetlink::packet_route::neighbour::NeighbourMessage;
    use rtnetlink::packet_route::route::RouteMessage;

    use super::*;

    #[test]
    fn classifies_only_what_concerns_us() {
        use RouteNetlinkMessage as M;
        let mut link = LinkMessage::default();
        link.header.index = 7;
        assert_eq!(
            classify(&M::DelLink(link.clone()), 7),
            Some(KernelEvent::DeviceChanged)
        );
        assert_eq!(classify(&M::DelLink(link), 8), None);

        let mut n = NeighbourMessage::default();
        n.header.ifindex = 7;
        assert_eq!(
            classify(&M::DelNeighbour(n.clone()), 7),
            Some(KernelEvent::DeviceChanged)
        );
        assert_eq!(classify(&M::NewNeighbour(n), 7), None);

        let mut r = RouteMessage::default();
        r.attributes.push(RouteAttribute::Oif(7));
        assert_eq!(
            classify(&M::DelRoute(r.clone()), 7),
            Some(KernelEvent::DeviceChanged)
        );
        assert_eq!(classify(&M::DelRoute(r.clone()), 9), None);
        r.header.protocol = RouteProtocol::Other(TWILL_RTPROT);
        assert_eq!(
            classify(&M::DelRoute(r), 9),
            Some(KernelEvent::DeviceChanged)
        );

        let mut a = AddressMessage::default();
        a.header.family = AddressFamily::Inet;
        assert_eq!(
            classify(&M::NewAddress(a.clone()), 1),
            Some(KernelEvent::AddressChanged)
        );
        a.header.family = AddressFamily::Inet6;
        assert_eq!(classify(&M::DelAddress(a), 1), None);
    }

    #[test]
    fn needs_a_runtime() {
        assert!(subscribe(1).is_err());
        assert!(crate::netlink::Netlink::new().is_err());
    }
}
