//! The policy engine's node program as nftables: the `inet twill-policy` table (for `nft -f`),
//! and, when only elements move (a pod coming or going), the same change as netlink element
//! operations (no nft process on the CNI path). Pure.
//!
//! Every address set and map of the program is split into an IPv4 half (`<name>4`) and an
//! IPv6 half (`<name>6`). The base chains are the packet path `netpol::program`
//! documents and interprets:
//! ```text
//! np-ports   prerouting, priority -300: drop what comes from a pod's own port (`POD_PORT_DROP`)
//! np-egress  forward, priority -5: established/related accept; ND accept;
//!                                   saddr @pend-out jump pend-out; saddr vmap @egress
//! np-ingress forward, priority  5: established/related accept; ND accept;
//!                                   daddr @pend-in jump pend-in; daddr vmap @ingress
//! np-input   input,   priority  0: as np-egress
//! pend-in, pend-out: drop (a new pod waits there while its policies' chains are made, or
//!                    until its verdict-map entries follow ADD's answer)
//! ```
//! The map entries the program sends to a pending chain are elements of the plain set of that
//! name instead of the verdict map: adding an element to a set is a cheap commit, while a jump
//! added to a verdict map makes the kernel validate every chain of the table again.

use std::net::IpAddr;

use netpol::model::{Direction, Protocol};
use netpol::program::{
    AddrRanges, Chain as PChain, Elements, NodeProgram, ProgramDelta, Rule, Set as PSet, PENDING,
};

use crate::netlink::nft_sets::{self, key_addr, key_concat, ElemOp};
use crate::nft::model::{BaseChain, Chain, Family, Set, Table};

pub const TABLE: &str = "twill-policy";
/// NFLOG group of the optional denied-connection log.
pub const LOG_GROUP: u16 = 7;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RenderOpts {
    /// Log denied connections (rate limited) to NFLOG group `LOG_GROUP`.
    pub log_denied: bool,
}

fn proto(p: Protocol) -> &'static str {
    match p {
        Protocol::Tcp => "tcp",
        Protocol::Udp => "udp",
        Protocol::Sctp => "sctp",
    }
}

fn fam_suffix(v6: bool) -> &'static str {
    if v6 {
        "6"
    } else {
        "4"
    }
}

fn addr_elems(r: &AddrRanges, v6: bool) -> Vec<String> {
    let fmt = |first: String, last: String| {
        if first == last {
            first
        } else {
            format!("{first}-{last}")
        }
    };
    if v6 {
        r.v6.iter()
            .map(|x| fmt(x.first.to_string(), x.last.to_string()))
            .collect()
    } else {
        r.v4.iter()
            .map(|x| fmt(x.first.to_string(), x.last.to_string()))
            .collect()
    }
}

/// The nft sets of one program set: two halves for addresses, one for ports.
fn sets_of(name: &str, set: &PSet) -> Vec<(String, Set)> {
    match &set.elements {
        Elements::Addrs(r) => [false, true]
            .into_iter()
            .map(|v6| {
                (
                    format!("{name}{}", fam_suffix(v6)),
                    Set {
                        kind: if v6 { "ipv6_addr" } else { "ipv4_addr" }.into(),
                        flags: vec!["interval"],
                        elements: addr_elems(r, v6).into_iter().collect(),
                    },
                )
            })
            .collect(),
        Elements::Ports(ports) => vec![(
            name.to_string(),
            Set {
                kind: "inet_proto . inet_service".into(),
                flags: vec!["interval"],
                elements: ports
                    .iter()
                    .map(|p| {
                        if p.first == p.last {
                            format!("{} . {}", proto(p.proto), p.first)
                        } else {
                            format!("{} . {}-{}", proto(p.proto), p.first, p.last)
                        }
                    })
                    .collect(),
            },
        )],
        Elements::Named(named) => [false, true]
            .into_iter()
            .map(|v6| {
                (
                    format!("{name}{}", fam_suffix(v6)),
                    Set {
                        kind: if v6 {
                            "ipv6_addr . inet_proto . inet_service"
                        } else {
                            "ipv4_addr . inet_proto . inet_service"
                        }
                        .into(),
                        flags: vec![],
                        elements: named
                            .iter()
                            .filter(|e| e.ip.is_ipv6() == v6)
                            .map(|e| format!("{} . {} . {}", e.ip, proto(e.proto), e.port))
                            .collect(),
                    },
                )
            })
            .collect(),
    }
}

/// nft rules for one program rule: per family when an address set is involved.
fn rules_of(r: &Rule, dir: Direction) -> Vec<String> {
    let peer_field = match dir {
        Direction::Ingress => "saddr",
        Direction::Egress => "daddr",
    };
    let ports = r
        .ports
        .as_ref()
        .map(|p| format!("meta l4proto . th dport @{p}"));
    if r.peers.is_none() && r.named.is_none() {
        let mut parts: Vec<String> = ports.into_iter().collect();
        parts.push("accept".into());
        return vec![parts.join(" ")];
    }
    [false, true]
        .into_iter()
        .map(|v6| {
            let (ipf, sfx) = if v6 { ("ip6", "6") } else { ("ip", "4") };
            let mut parts = Vec::new();
            if let Some(p) = &r.peers {
                parts.push(format!("{ipf} {peer_field} @{p}{sfx}"));
            }
            parts.extend(ports.clone());
            if let Some(n) = &r.named {
                parts.push(format!("{ipf} daddr . meta l4proto . th dport @{n}{sfx}"));
            }
            parts.push("accept".into());
            parts.join(" ")
        })
        .collect()
}

/// Neighbour discovery (ICMPv6 133-137) is never policy's business: without it nothing works.
const ND: &str = "icmpv6 type { nd-router-solicit, nd-router-advert, nd-neighbor-solicit, \
                  nd-neighbor-advert, nd-redirect } accept";

/// A pod's packets reach the IP hooks from the bridge. From a pod's own port (the host end of
/// its veth: `tw` and 12 hex digits, `cni::host_veth_name`; twill's other devices, `twill.*`,
/// are no veths) only a frame the bridge hands up unbridged does: one sent to a reserved
/// bridge address (01:80:c2:00:00:0x), which passes no bridge hook, so none of the pods'
/// source checks (`spoof`). Nothing legitimate does.
const POD_PORT_DROP: &str = "meta iifkind \"veth\" iifname \"tw*\" counter drop";

fn base(hook: &'static str, priority: i32, rules: Vec<String>) -> Chain {
    Chain {
        base: Some(BaseChain {
            kind: "filter",
            hook,
            priority,
            policy: "accept",
        }),
        rules,
    }
}

/// The whole table for `p`.
pub fn table(p: &NodeProgram, opts: RenderOpts) -> Table {
    let mut t = Table::new(Family::Inet, TABLE);
    for (name, set) in &p.sets {
        t.sets.extend(sets_of(name, set));
    }
    for ((map, entries), pending) in [("ingress", &p.ingress), ("egress", &p.egress)]
        .into_iter()
        .zip(PENDING)
    {
        for v6 in [false, true] {
            let family = |ip: &&IpAddr| ip.is_ipv6() == v6;
            t.sets.insert(
                format!("{map}{}", fam_suffix(v6)),
                Set {
                    kind: if v6 {
                        "ipv6_addr : verdict"
                    } else {
                        "ipv4_addr : verdict"
                    }
                    .into(),
                    flags: vec![],
                    elements: entries
                        .iter()
                        .filter(|(ip, g)| family(ip) && *g != pending)
                        .map(|(ip, g)| format!("{ip} : jump {g}"))
                        .collect(),
                },
            );
            t.sets.insert(
                format!("{pending}{}", fam_suffix(v6)),
                Set {
                    kind: if v6 { "ipv6_addr" } else { "ipv4_addr" }.into(),
                    flags: vec![],
                    elements: entries
                        .iter()
                        .filter(|(ip, g)| family(ip) && *g == pending)
                        .map(|(ip, _)| ip.to_string())
                        .collect(),
                },
            );
        }
    }
    for (name, chain) in &p.chains {
        let rules = match chain {
            PChain::Policy {
                direction, rules, ..
            } => rules.iter().flat_map(|r| rules_of(r, *direction)).collect(),
            PChain::Group { policies, .. } => {
                let mut r: Vec<String> = policies.iter().map(|c| format!("jump {c}")).collect();
                if opts.log_denied {
                    r.push(format!(
                        "limit rate 20/second burst 40 packets log prefix \"{name} \" group {LOG_GROUP}"
                    ));
                }
                r.push("counter drop".into());
                r
            }
        };
        t.chains.insert(name.clone(), Chain { base: None, rules });
    }
    // Where a new pod waits while the chains of its policies are made (CNI ADD answers first).
    for name in PENDING {
        let mut rules = Vec::new();
        if opts.log_denied {
            rules.push(format!(
                "limit rate 20/second burst 40 packets log prefix \"{name} \" group {LOG_GROUP}"
            ));
        }
        rules.push("counter drop".into());
        t.chains.insert(name.into(), Chain { base: None, rules });
    }
    let head = || {
        vec![
            "ct state established,related accept".to_string(),
            ND.to_string(),
        ]
    };
    // The pending sets before the maps: an address is in one or the other, never both.
    let dispatch = |field: &str, map: &str, pending: &str| {
        let mut v = head();
        for (ipf, sfx) in [("ip", "4"), ("ip6", "6")] {
            v.push(format!("{ipf} {field} @{pending}{sfx} jump {pending}"));
        }
        for (ipf, sfx) in [("ip", "4"), ("ip6", "6")] {
            v.push(format!("{ipf} {field} vmap @{map}{sfx}"));
        }
        v
    };
    let [pend_in, pend_out] = PENDING;
    t.chains.insert(
        "np-egress".into(),
        base("forward", -5, dispatch("saddr", "egress", pend_out)),
    );
    t.chains.insert(
        "np-ingress".into(),
        base("forward", 5, dispatch("daddr", "ingress", pend_in)),
    );
    t.chains.insert(
        "np-input".into(),
        base("input", 0, dispatch("saddr", "egress", pend_out)),
    );
    // Before conntrack and routing: not even an ICMP error goes back to such a packet.
    t.chains.insert(
        "np-ports".into(),
        base("prerouting", -300, vec![POD_PORT_DROP.to_string()]),
    );
    t
}

/// The element operations that carry out `d` on `old` when it only moves elements and map
/// entries, in the order the transaction needs (deletions first); None when `d` changes sets or
/// chains, or holds an element netlink cannot express here (a range ending at the last
/// address).
pub fn element_ops(d: &ProgramDelta, old: &NodeProgram) -> Option<Vec<ElemOp>> {
    if !d.is_elements_only() {
        return None;
    }
    let mut dels = Vec::new();
    let mut adds = Vec::new();
    for (name, delta) in &d.elements {
        let set = old.sets.get(name)?;
        for (elems, add) in [(&delta.removed, false), (&delta.added, true)] {
            let out = if add { &mut adds } else { &mut dels };
            match (elems, &set.elements) {
                (Elements::Addrs(r), Elements::Addrs(_)) => {
                    let v4 =
                        r.v4.iter()
                            .map(|x| (IpAddr::V4(x.first), IpAddr::V4(x.last)));
                    let v6 =
                        r.v6.iter()
                            .map(|x| (IpAddr::V6(x.first), IpAddr::V6(x.last)));
                    for (first, last) in v4.chain(v6) {
                        let half = format!("{name}{}", fam_suffix(first.is_ipv6()));
                        out.extend(nft_sets::interval(add, &half, first, last)?);
                    }
                }
                (Elements::Named(n), Elements::Named(_)) => {
                    for e in n {
                        let half = format!("{name}{}", fam_suffix(e.ip.is_ipv6()));
                        let key = key_concat(&[
                            &key_addr(e.ip),
                            &[e.proto.number()],
                            &e.port.to_be_bytes(),
                        ]);
                        out.push(ElemOp::new(add, &half, key));
                    }
                }
                // Port sets are their definition: they never change in place.
                _ => return None,
            }
        }
    }
    for (((map, md), had), pending) in [("ingress", &d.ingress), ("egress", &d.egress)]
        .into_iter()
        .zip([&old.ingress, &old.egress])
        .zip(PENDING)
    {
        let half = |set: &str, ip: &IpAddr| format!("{set}{}", fam_suffix(ip.is_ipv6()));
        for ip in &md.removed {
            let set = if had.get(ip).is_some_and(|g| g == pending) {
                pending
            } else {
                map
            };
            dels.push(ElemOp::new(false, &half(set, ip), key_addr(*ip)));
        }
        for (ip, g) in &md.added {
            adds.push(if g == pending {
                ElemOp::new(true, &half(pending, ip), key_addr(*ip))
            } else {
                ElemOp::jump(true, &half(map, ip), key_addr(*ip), g)
            });
        }
    }
    dels.extend(adds);
    Some(dels)
}

#[cfg(test)]
mod tests {
    use super::*;
    use netpol::model::Cluster;
    use netpol::program::{compile, diff};

    fn cluster() -> Cluster {
        let mut c = Cluster::new();
        let pol: netpol::api::NetworkPolicy = serde_json::from_value(serde_json::json!({
            "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "metadata": {"name": "db", "namespace": "x"},
            "spec": {"podSelector": {"matchLabels": {"app": "db"}},
                     "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": "web"}}}],
                                  "ports": [{"port": 5432}, {"port": "metrics"}]}]}
        }))
        .unwrap();
        c.upsert_policy(pol).unwrap();
        c
    }

    fn pod(c: &mut Cluster, name: &str, app: &str, ip: &str, node: &str) {
        let p: netpol::api::Pod = serde_json::from_value(serde_json::json!({
            "metadata": {"name": name, "namespace": "x", "labels": {"app": app}},
            "spec": {"nodeName": node, "containers": [{"name": "c",
                     "ports": [{"name": "metrics", "containerPort": 9100}]}]},
            "status": {"podIPs": [{"ip": ip}]}
        }))
        .unwrap();
        c.upsert_pod(&p).unwrap();
    }

    #[test]
    fn renders_base_chains_maps_sets_and_policy_rules() {
        let mut c = cluster();
        pod(&mut c, "db-1", "db", "10.244.1.5", "n1");
        pod(&mut c, "web-1", "web", "10.244.2.7", "n2");
        let p = compile(&c, "n1");
        let t = table(&p, RenderOpts::default());
        assert_eq!(
            t.chains["np-ingress"].rules.last().unwrap(),
            "ip6 daddr vmap @ingress6"
        );
        let entry = t.sets["ingress4"].elements.iter().next().unwrap().clone();
        assert!(entry.starts_with("10.244.1.5 : jump grp-in-"), "{entry}");
        let group = entry.split("jump ").nth(1).unwrap();
        assert_eq!(t.chains[group].rules.last().unwrap(), "counter drop");
        let pol = t.chains[&t.chains[group].rules[0]["jump ".len()..]].clone();
        // The peer set holds web-1; the rule checks it and the port set, per family.
        assert!(
            pol.rules.iter().any(|r| r.starts_with("ip saddr @peer-")
                && r.contains("meta l4proto . th dport @port-")
                && r.ends_with("accept")),
            "{:?}",
            pol.rules
        );
        assert!(t
            .sets
            .iter()
            .any(|(n, s)| n.starts_with("peer-") && s.elements.contains("10.244.2.7")));
        assert!(t
            .sets
            .iter()
            .any(|(n, s)| n.starts_with("port-") && s.elements.contains("tcp . 5432")));
        assert!(t.sets.iter().any(
            |(n, s)| n.starts_with("named-") && s.elements.contains("10.244.1.5 . tcp . 9100")
        ));
        // The pending chains are always there, and drop.
        for name in netpol::program::PENDING {
            assert_eq!(t.chains[name].rules, ["counter drop"], "{name}");
        }
        // Logging is an option.
        let logged = table(&p, RenderOpts { log_denied: true });
        assert!(logged.chains[group]
            .rules
            .iter()
            .any(|r| r.contains("log prefix") && r.contains(&format!("group {LOG_GROUP}"))));
    }

    #[test]
    fn a_pod_coming_is_netlink_element_operations_only() {
        let mut c = cluster();
        pod(&mut c, "db-1", "db", "10.244.1.5", "n1");
        pod(&mut c, "web-1", "web", "10.244.2.7", "n2");
        let old = compile(&c, "n1");
        // A second db pod here (same group), a second web pod elsewhere (a peer).
        pod(&mut c, "db-2", "db", "10.244.1.6", "n1");
        pod(&mut c, "web-2", "web", "10.244.3.9", "n3");
        let new = compile(&c, "n1");
        let ops = element_ops(&diff(&old, &new), &old).expect("elements only");
        let adds: Vec<&ElemOp> = ops.iter().filter(|o| o.add).collect();
        assert!(adds
            .iter()
            .any(|o| o.set == "ingress4" && o.key == vec![10, 244, 1, 6] && o.jump.is_some()));
        assert!(adds
            .iter()
            .any(|o| o.set.starts_with("peer-") && o.key == vec![10, 244, 3, 9]));
        // The interval's end follows its start.
        assert!(adds
            .iter()
            .any(|o| o.key == vec![10, 244, 3, 10] && o.interval_end));
        // A new policy is not element-only.
        let mut c2 = c.clone();
        let pol: netpol::api::NetworkPolicy = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "deny", "namespace": "x"},
            "spec": {"podSelector": {}, "policyTypes": ["Egress"]}
        }))
        .unwrap();
        c2.upsert_policy(pol).unwrap();
        assert!(element_ops(&diff(&new, &compile(&c2, "n1")), &new).is_none());
    }

    /// CNI ADD's two steps for a replica: closed through the plain pending set (no jump
    /// added to a verdict map, so no table validation in the kernel), then opened.
    #[test]
    fn a_replica_waits_in_the_pending_set_then_gets_its_map_entry() {
        let mut c = cluster();
        pod(&mut c, "db-1", "db", "10.244.1.5", "n1");
        let old = compile(&c, "n1");
        pod(&mut c, "db-2", "db", "10.244.1.6", "n1");
        let key = netpol::model::PodKey::new("x", "db-2");
        let d = netpol::program::pod_added(&c, "n1", &old, &key).expect("a replica");
        let (first, then) = netpol::program::closed_first(d);
        let then = then.expect("db-2 is isolated for ingress");
        let mid = first.apply(&old);
        let ops = element_ops(&first, &old).expect("elements only");
        let db2 = vec![10, 244, 1, 6];
        assert!(ops.iter().all(|o| o.add && o.jump.is_none()), "{ops:?}");
        assert!(ops.iter().any(|o| o.set == "pend-in4" && o.key == db2));
        assert!(!ops.iter().any(|o| o.set == "ingress4"), "{ops:?}");
        let t = table(&mid, RenderOpts::default());
        assert!(t.sets["pend-in4"].elements.contains("10.244.1.6"));
        assert!(t.sets["pend-out4"].elements.is_empty());
        assert!(!t.sets["ingress4"]
            .elements
            .iter()
            .any(|e| e.starts_with("10.244.1.6 ")));
        // The pending sets are looked up before the maps.
        let rules = &t.chains["np-ingress"].rules;
        let at = |r: &str| rules.iter().position(|x| x == r).expect(r);
        assert!(at("ip daddr @pend-in4 jump pend-in") < at("ip daddr vmap @ingress4"));
        assert!(t.chains["np-input"]
            .rules
            .contains(&"ip6 saddr @pend-out6 jump pend-out".to_string()));
        // Opened: out of the pending set, into the map, in one transaction.
        let ops = element_ops(&then, &mid).expect("elements only");
        assert_eq!(ops.len(), 2, "{ops:?}");
        assert!(!ops[0].add && ops[0].set == "pend-in4" && ops[0].key == db2);
        assert!(ops[1].add && ops[1].set == "ingress4" && ops[1].jump.is_some());
        assert_eq!(then.apply(&mid), compile(&c, "n1"));
    }
}
