//! The masquerade planner: which pod traffic leaves with the node's address. Pure: builds the
//! `ip twill-masq` table, and on a dual-stack node the `ip6 twill-masq6` one with the same
//! rules for the IPv6 pod network; the firewall writer puts them in the kernel.
//!
//! Pod traffic to anything outside the pod network is masqueraded; pod to pod, on any node,
//! never is; multicast and broadcast are left alone; packets kube-proxy marked for masquerade
//! are left to kube-proxy (it clears the mark when it NATs them; NATing them here would leave the
//! mark on the VXLAN packet: double NAT, flannel #1679).

use ipnet::IpNet;

use crate::nft::model::{BaseChain, Chain, Family, Set, Table};

pub const TABLE: &str = "twill-masq";
/// The IPv6 pod network's table (its own: an `ip` table never sees IPv6 packets).
pub const TABLE6: &str = "twill-masq6";
/// kube-proxy's masquerade mark: bit 14 (`--iptables-masquerade-bit`'s default).
pub const KUBE_PROXY_MARK: u32 = 0x4000;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MasqSpec {
    /// The whole pod network (every node's subnets) of one family: its table is that family's.
    pub network: IpNet,
    /// `masquerade fully-random` (random source ports: no SNAT port races, flannel #1040).
    pub random_fully: bool,
    /// The mark bit kube-proxy sets on packets it masquerades itself (matched under its mask).
    pub kube_proxy_mark: u32,
    /// The overlay device, if the backend has one: the node's own processes that send into it
    /// from an address outside the pod network (bound to the underlay address) are
    /// masqueraded to the device's pod-network address, so the far pod can answer.
    pub tunnel_device: Option<String>,
}

pub fn table(spec: &MasqSpec) -> Table {
    let v6 = matches!(spec.network, IpNet::V6(_));
    // Multicast and broadcast (IPv6 has no broadcast; link-local never leaves the link).
    let (family, name, ip, kind, nomasq) = if v6 {
        (
            Family::Ip6,
            TABLE6,
            "ip6",
            "ipv6_addr",
            vec!["ff00::/8", "fe80::/10"],
        )
    } else {
        (
            Family::Ip,
            TABLE,
            "ip",
            "ipv4_addr",
            vec!["224.0.0.0/4", "255.255.255.255"],
        )
    };
    let mut t = Table::new(family, name);
    t.sets.insert(
        "cluster".into(),
        Set {
            kind: kind.into(),
            flags: vec!["interval"],
            elements: [spec.network.trunc().to_string()].into(),
        },
    );
    t.sets.insert(
        "nomasq".into(),
        Set {
            kind: kind.into(),
            flags: vec!["interval"],
            elements: nomasq.into_iter().map(String::from).collect(),
        },
    );
    let mark = spec.kube_proxy_mark;
    let masquerade = if spec.random_fully {
        "masquerade fully-random"
    } else {
        "masquerade"
    };
    let mut post = vec![format!("meta mark & {mark:#x} == {mark:#x} return")];
    if let Some(dev) = &spec.tunnel_device {
        post.push(format!(
            "oifname \"{dev}\" {ip} saddr != @cluster fib saddr type local {masquerade}"
        ));
    }
    post.extend([
        format!("{ip} saddr != @cluster return"),
        format!("{ip} daddr @cluster return"),
        format!("{ip} daddr @nomasq return"),
        masquerade.to_string(),
    ]);
    t.chains.insert(
        "postrouting".into(),
        Chain {
            base: Some(BaseChain {
                kind: "nat",
                hook: "postrouting",
                priority: 100, // srcnat
                policy: "accept",
            }),
            rules: post,
        },
    );
    // Conntrack cannot NAT a packet it finds invalid, so it would leave with the pod's address
    // (flannel #1253): drop those.
    t.chains.insert(
        "forward".into(),
        Chain {
            base: Some(BaseChain {
                kind: "filter",
                hook: "forward",
                priority: 0,
                policy: "accept",
            }),
            rules: vec![format!(
                "{ip} saddr @cluster {ip} daddr != @cluster ct state invalid drop"
            )],
        },
    );
    t
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> MasqSpec {
        MasqSpec {
            network: "10.244.0.0/16".parse::<ipnet::Ipv4Net>().unwrap().into(),
            random_fully: true,
            kube_proxy_mark: KUBE_PROXY_MARK,
            tunnel_device: Some("twill.1".into()),
        }
    }

    #[test]
    fn kube_proxy_marks_are_matched_under_the_mask_first() {
        let t = table(&spec());
        let rules = &t.chains["postrouting"].rules;
        // A mask match: 0x4001 (kube-proxy's bit and another) is kube-proxy's too, unlike
        // flannel's exact `meta mark 0x4000`.
        assert_eq!(rules[0], "meta mark & 0x4000 == 0x4000 return");
        assert_eq!(rules.last().unwrap(), "masquerade fully-random");
    }

    #[test]
    fn pod_to_pod_and_multicast_return_before_masquerade() {
        let t = table(&spec());
        let rules = &t.chains["postrouting"].rules;
        let pos = |r: &str| rules.iter().position(|x| x == r).unwrap();
        let masq = rules.len() - 1;
        assert!(pos("ip saddr != @cluster return") < masq);
        assert!(pos("ip daddr @cluster return") < masq);
        assert!(pos("ip daddr @nomasq return") < masq);
        assert!(t.sets["nomasq"].elements.contains("224.0.0.0/4"));
        assert_eq!(
            t.sets["cluster"].elements,
            ["10.244.0.0/16".to_string()].into()
        );
    }

    #[test]
    fn flags_shape_the_rules() {
        let mut s = spec();
        s.random_fully = false;
        s.tunnel_device = None;
        s.kube_proxy_mark = 0x8000;
        let t = table(&s);
        let rules = &t.chains["postrouting"].rules;
        assert_eq!(rules[0], "meta mark & 0x8000 == 0x8000 return");
        assert_eq!(rules.last().unwrap(), "masquerade");
        assert!(!rules.iter().any(|r| r.contains("oifname")));
    }

    #[test]
    fn the_ipv6_table_has_the_same_rules_for_the_ipv6_pod_network() {
        let t = table(&MasqSpec {
            network: "fd00:10:244::/56".parse::<ipnet::Ipv6Net>().unwrap().into(),
            tunnel_device: Some("twill-v6.1".into()),
            ..spec()
        });
        assert_eq!((t.family, t.name.as_str()), (Family::Ip6, TABLE6));
        assert_eq!(t.sets["cluster"].kind, "ipv6_addr");
        assert_eq!(
            t.sets["cluster"].elements,
            ["fd00:10:244::/56".to_string()].into()
        );
        assert!(t.sets["nomasq"].elements.contains("ff00::/8"));
        let rules = &t.chains["postrouting"].rules;
        assert_eq!(rules[0], "meta mark & 0x4000 == 0x4000 return");
        assert!(rules.contains(&"ip6 daddr @cluster return".to_string()));
        assert!(rules[1].starts_with("oifname \"twill-v6.1\" ip6 saddr != @cluster"));
        assert!(rules
            .iter()
            .all(|r| !r.contains("ip saddr") && !r.contains("ip daddr")));
        assert_eq!(
            t.chains["forward"].rules,
            ["ip6 saddr @cluster ip6 daddr != @cluster ct state invalid drop"]
        );
    }
}
