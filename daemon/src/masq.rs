//! The masquerade planner: which pod traffic leaves with the node's address. Pure: builds the
//! `ip twill-masq` table; the firewall writer puts it in the kernel.
//!
//! Pod traffic to anything outside the pod network is masqueraded; pod to pod, on any node,
//! never is; multicast and broadcast are left alone; packets kube-proxy marked for masquerade
//! are left to kube-proxy (it clears the mark when it NATs them; NATing them here would leave the
//! mark on the VXLAN packet: double NAT, flannel #1679).

use ipnet::Ipv4Net;

use crate::nft::model::{BaseChain, Chain, Family, Set, Table};

pub const TABLE: &str = "twill-masq";
/// kube-proxy's masquerade mark: bit 14 (`--iptables-masquerade-bit`'s default).
pub const KUBE_PROXY_MARK: u32 = 0x4000;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MasqSpec {
    /// The whole pod network (every node's subnets).
    pub network: Ipv4Net,
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
    let mut t = Table::new(Family::Ip, TABLE);
    t.sets.insert(
        "cluster".into(),
        Set {
            kind: "ipv4_addr".into(),
            flags: vec!["interval"],
            elements: [spec.network.to_string()].into(),
        },
    );
    t.sets.insert(
        "nomasq".into(),
        Set {
            kind: "ipv4_addr".into(),
            flags: vec!["interval"],
            elements: ["224.0.0.0/4".to_string(), "255.255.255.255".to_string()].into(),
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
            "oifname \"{dev}\" ip saddr != @cluster fib saddr type local {masquerade}"
        ));
    }
    post.extend([
        "ip saddr != @cluster return".to_string(),
        "ip daddr @cluster return".to_string(),
        "ip daddr @nomasq return".to_string(),
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
            rules: vec!["ip saddr @cluster ip daddr != @cluster ct state invalid drop".into()],
        },
    );
    t
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> MasqSpec {
        MasqSpec {
            network: "10.244.0.0/16".parse().unwrap(),
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
}
