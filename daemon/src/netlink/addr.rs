//! Reading interface addresses out of netlink messages.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use rtnetlink::packet_route::address::{AddressAttribute, AddressFlags, AddressMessage};
use rtnetlink::packet_route::AddressFamily;

/// The interface's own address of either family (IFA_LOCAL, else IFA_ADDRESS).
pub(super) fn addr_ip_of(m: &AddressMessage) -> Option<IpAddr> {
    let find = |local: bool| {
        m.attributes.iter().find_map(|a| match a {
            AddressAttribute::Local(ip) if local => Some(*ip),
            AddressAttribute::Address(ip) if !local => Some(*ip),
            _ => None,
        })
    };
    find(true).or_else(|| find(false))
}

/// The interface's own IPv4 address (IFA_LOCAL; IFA_ADDRESS is the peer on point-to-point
/// links).
pub(super) fn addr_of(m: &AddressMessage) -> Option<Ipv4Addr> {
    match addr_ip_of(m)? {
        IpAddr::V4(ip) => Some(ip),
        IpAddr::V6(_) => None,
    }
}

/// Of interface `index`'s addresses, the IPv6 one for tunnel traffic: global scope (not
/// link-local), usable now (not tentative, DAD-failed or deprecated) and not a temporary
/// (privacy) address, which the kernel rotates away: flannel took one as its endpoint and
/// broke (#2293). A permanent (static) address is preferred over one from autoconfiguration.
pub(super) fn stable_ipv6(msgs: &[AddressMessage], index: u32) -> Option<Ipv6Addr> {
    let unusable = AddressFlags::Tentative
        | AddressFlags::Dadfailed
        | AddressFlags::Deprecated
        | AddressFlags::Secondary; // IFA_F_TEMPORARY is the same bit
    let mut best: Option<(bool, Ipv6Addr)> = None;
    for m in msgs {
        if m.header.family != AddressFamily::Inet6 || m.header.index != index {
            continue;
        }
        let Some(IpAddr::V6(ip)) = addr_ip_of(m) else {
            continue;
        };
        if ip.is_loopback() || ip.is_unicast_link_local() || ip.is_multicast() {
            continue;
        }
        // IFA_FLAGS holds all 32 bits; the header only the low 8 (older kernels send no more).
        let flags = m
            .attributes
            .iter()
            .find_map(|a| match a {
                AddressAttribute::Flags(f) => Some(*f),
                _ => None,
            })
            .unwrap_or_else(|| AddressFlags::from_bits_truncate(u32::from(m.header.flags.bits())));
        if flags.intersects(unusable) {
            continue;
        }
        let permanent = flags.contains(AddressFlags::Permanent);
        if best.is_none_or(|(p, _)| permanent && !p) {
            best = Some((permanent, ip));
        }
    }
    best.map(|(_, ip)| ip)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rtnetlink::packet_route::address::AddressHeaderFlags;

    fn msg(index: u32, ip: &str, flags: AddressFlags) -> AddressMessage {
        let ip: IpAddr = ip.parse().unwrap();
        let mut m = AddressMessage::default();
        m.header.family = if ip.is_ipv6() {
            AddressFamily::Inet6
        } else {
            AddressFamily::Inet
        };
        m.header.index = index;
        m.attributes.push(AddressAttribute::Address(ip));
        m.attributes.push(AddressAttribute::Flags(flags));
        m
    }

    #[test]
    fn the_ipv6_endpoint_is_stable_global_and_usable() {
        let perm = AddressFlags::Permanent;
        let none = AddressFlags::empty();
        let pick = |msgs: &[AddressMessage]| stable_ipv6(msgs, 3).map(|a| a.to_string());
        // Each unusable kind alone gives nothing.
        for (ip, flags) in [
            ("fe80::1", perm),
            ("::1", perm),
            ("fd00::1", AddressFlags::Secondary), // temporary (privacy) address
            ("fd00::2", perm | AddressFlags::Tentative),
            ("fd00::3", perm | AddressFlags::Dadfailed),
            ("fd00::4", AddressFlags::Deprecated),
        ] {
            assert_eq!(pick(&[msg(3, ip, flags)]), None, "{ip} {flags:?}");
        }
        // Another interface's, and a v4 address, are not candidates.
        assert_eq!(
            pick(&[msg(4, "fd00::5", perm), msg(3, "10.0.0.1", perm)]),
            None
        );
        // An autoconfigured one serves when it is all there is; a static one wins, listed
        // before or after it.
        assert_eq!(pick(&[msg(3, "fd00::6", none)]).as_deref(), Some("fd00::6"));
        let (auto, stat) = (msg(3, "fd00::6", none), msg(3, "fd00::7", perm));
        assert_eq!(
            pick(&[auto.clone(), stat.clone()]).as_deref(),
            Some("fd00::7")
        );
        assert_eq!(pick(&[stat, auto]).as_deref(), Some("fd00::7"));
        // Without IFA_FLAGS the header's 8 bits are read.
        let mut m = msg(3, "fd00::8", none);
        m.attributes.pop();
        m.header.flags = AddressHeaderFlags::Secondary;
        assert_eq!(pick(&[m]), None);
    }
}
