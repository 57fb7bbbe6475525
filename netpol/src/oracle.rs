//! The reference semantics of NetworkPolicy, one flow at a time, written to be read rather than to
//! be fast. It works from the API objects directly (not from the compiled program), so that the
//! property tests comparing it with [`crate::program`] compare two independent readings.
//!
//! A flow is allowed iff egress from its source (when that is a pod) and ingress to its
//! destination (when that is a pod) both allow it. Per direction (netpol.md §0):
//! - a pod is isolated when a policy of its namespace selects it and has that direction among its
//!   effective `policyTypes`; an unisolated pod admits everything;
//! - an isolated pod admits the union of its policies' rules; a rule matches when one of its peers
//!   matches (no peers: every peer) and one of its ports matches (no ports: every port and
//!   protocol);
//! - traffic from the node the destination pod runs on is always admitted; a pod's egress to its
//!   own node is not exempt;
//! - twill's one addition: IPv6 neighbour discovery is never policy's business
//!   ([`Transport::is_neighbour_discovery`]).

use std::fmt::{self, Write as _};
use std::net::IpAddr;

use ipnet::IpNet;
use serde::Serialize;

use crate::api::{IntOrString, NetworkPolicy, NetworkPolicyPeer, NetworkPolicyPort};
use crate::model::{Cluster, Direction, Family, PodKey, PodRecord, PolicyKey, Protocol, Transport};
use crate::selector;

/// One end of a flow.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub enum Endpoint {
    /// A pod, by key. A hostNetwork pod behaves as its node.
    Pod(PodKey),
    /// A node's own network stack (kubelet, host processes), with the address it uses.
    Node { name: String, ip: IpAddr },
    /// Anything outside the cluster's pods and nodes.
    External(IpAddr),
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Endpoint::Pod(k) => write!(f, "pod {k}"),
            Endpoint::Node { name, ip } => write!(f, "node {name} ({ip})"),
            Endpoint::External(ip) => write!(f, "{ip}"),
        }
    }
}

/// A new connection (its first packet): from, to, over which family, with what transport.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct Flow {
    pub src: Endpoint,
    pub dst: Endpoint,
    pub family: Family,
    pub transport: Transport,
}

impl fmt::Display for Flow {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let fam = match self.family {
            Family::V4 => "IPv4",
            Family::V6 => "IPv6",
        };
        write!(
            f,
            "{} -> {}, {} over {fam}",
            self.src, self.dst, self.transport
        )
    }
}

/// Why a flow cannot be evaluated: it could not exist on the wire.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FlowError {
    #[error("no pod {0}")]
    UnknownPod(PodKey),
    #[error("pod {pod} has no {family:?} address (or is finished)")]
    NoAddress { pod: PodKey, family: Family },
    #[error("pod {0} is not on a node")]
    NoNode(PodKey),
    #[error("{ip} is not an address of the flow's family {family:?}")]
    WrongFamily { ip: IpAddr, family: Family },
    #[error("{ip} belongs to pod {pod}: name the pod, not the address")]
    AddressOfPod { ip: IpAddr, pod: PodKey },
}

/// The verdict on one flow, per direction, with the reasons.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Verdict {
    pub flow: Flow,
    pub egress: Decision,
    pub ingress: Decision,
}

impl Verdict {
    pub fn allowed(&self) -> bool {
        self.egress.allows() && self.ingress.allows()
    }
}

/// The decision for one direction.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub enum Decision {
    /// This side is not a pod policy applies to (a node, a hostNetwork pod, an external address).
    NotApplicable,
    /// No policy isolates the pod in this direction.
    NotIsolated,
    /// Isolated, but this traffic is exempt.
    Exempt(Exemption),
    /// The first matching rule, in policy key order.
    Allowed { policy: PolicyKey, rule: usize },
    /// Isolated by these policies and none of their rules matched.
    Denied {
        isolated_by: Vec<PolicyKey>,
        misses: Vec<Miss>,
    },
}

impl Decision {
    pub fn allows(&self) -> bool {
        !matches!(self, Decision::Denied { .. })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Exemption {
    /// Ingress from the node the pod runs on.
    OwnNode,
    NeighbourDiscovery,
}

/// Why one policy's rule (or the policy) did not match.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub enum Miss {
    /// The policy has no rules in this direction: it only isolates.
    NoRules {
        policy: PolicyKey,
    },
    PeerNotMatched {
        policy: PolicyKey,
        rule: usize,
    },
    /// A peer matched but no port did.
    PortNotMatched {
        policy: PolicyKey,
        rule: usize,
    },
}

/// One rule: its peers (`from` or `to`) and its ports.
type RuleParts<'p> = (
    Option<&'p Vec<NetworkPolicyPeer>>,
    Option<&'p Vec<NetworkPolicyPort>>,
);

/// A flow endpoint resolved against the cluster, with the address the flow uses.
enum Resolved<'a> {
    /// A live pod: policy applies to it and selectors can match it.
    Pod {
        key: &'a PodKey,
        pod: &'a PodRecord,
        ip: IpAddr,
    },
    /// A node's own stack (or a hostNetwork pod on it).
    Host {
        node: Option<&'a str>,
        ip: IpAddr,
    },
    External {
        ip: IpAddr,
    },
}

impl Resolved<'_> {
    fn ip(&self) -> IpAddr {
        match self {
            Resolved::Pod { ip, .. } | Resolved::Host { ip, .. } | Resolved::External { ip } => *ip,
        }
    }
}

fn resolve<'a>(c: &'a Cluster, e: &'a Endpoint, family: Family) -> Result<Resolved<'a>, FlowError> {
    let check_ip = |ip: IpAddr| {
        if Family::of(ip) != family {
            return Err(FlowError::WrongFamily { ip, family });
        }
        if let Some((key, _)) = c.pods_with_ip(ip).find(|(_, p)| p.is_live()) {
            return Err(FlowError::AddressOfPod {
                ip,
                pod: key.clone(),
            });
        }
        Ok(ip)
    };
    match e {
        Endpoint::Pod(key) => {
            let (key, pod) = c
                .pod(key)
                .map(|p| (key, p))
                .ok_or_else(|| FlowError::UnknownPod(key.clone()))?;
            let node = pod
                .node
                .as_deref()
                .ok_or_else(|| FlowError::NoNode(key.clone()))?;
            let ip = pod.ip(family).ok_or_else(|| FlowError::NoAddress {
                pod: key.clone(),
                family,
            })?;
            if pod.host_network {
                Ok(Resolved::Host {
                    node: Some(node),
                    ip,
                })
            } else {
                Ok(Resolved::Pod { key, pod, ip })
            }
        }
        Endpoint::Node { name, ip } => Ok(Resolved::Host {
            node: Some(name),
            ip: check_ip(*ip)?,
        }),
        Endpoint::External(ip) => Ok(Resolved::External { ip: check_ip(*ip)? }),
    }
}

/// Evaluates one flow against the cluster's policies.
pub fn evaluate(c: &Cluster, flow: &Flow) -> Result<Verdict, FlowError> {
    let src = resolve(c, &flow.src, flow.family)?;
    let dst = resolve(c, &flow.dst, flow.family)?;
    let egress = match &src {
        Resolved::Pod { key, pod, .. } => decide(c, Direction::Egress, key, pod, &dst, &dst, flow),
        _ => Decision::NotApplicable,
    };
    let ingress = match &dst {
        Resolved::Pod { key, pod, .. } => decide(c, Direction::Ingress, key, pod, &src, &dst, flow),
        _ => Decision::NotApplicable,
    };
    Ok(Verdict {
        flow: flow.clone(),
        egress,
        ingress,
    })
}

/// The decision for `pod` in `dir`, where `peer` is the other end and `dst` the destination
/// (named ports resolve on it).
fn decide(
    c: &Cluster,
    dir: Direction,
    key: &PodKey,
    pod: &PodRecord,
    peer: &Resolved,
    dst: &Resolved,
    flow: &Flow,
) -> Decision {
    let isolating: Vec<(&PolicyKey, &NetworkPolicy)> = c
        .policies_in_namespace(&key.namespace)
        .filter(|(_, p)| {
            let types = p.spec.effective_types();
            let in_dir = match dir {
                Direction::Ingress => types.ingress,
                Direction::Egress => types.egress,
            };
            in_dir && selector::matches(&p.spec.pod_selector, &pod.labels)
        })
        .collect();
    if isolating.is_empty() {
        return Decision::NotIsolated;
    }
    if flow.transport.is_neighbour_discovery(flow.family) {
        return Decision::Exempt(Exemption::NeighbourDiscovery);
    }
    if dir == Direction::Ingress {
        if let Resolved::Host { node: Some(n), .. } = peer {
            if pod.node.as_deref() == Some(*n) {
                return Decision::Exempt(Exemption::OwnNode);
            }
        }
    }
    let mut misses = Vec::new();
    for (pkey, p) in &isolating {
        // (peers, ports) of each rule in this direction.
        let rules: Vec<RuleParts> = match dir {
            Direction::Ingress => p
                .spec
                .ingress
                .iter()
                .flatten()
                .map(|r| (r.from.as_ref(), r.ports.as_ref()))
                .collect(),
            Direction::Egress => p
                .spec
                .egress
                .iter()
                .flatten()
                .map(|r| (r.to.as_ref(), r.ports.as_ref()))
                .collect(),
        };
        if rules.is_empty() {
            misses.push(Miss::NoRules {
                policy: (*pkey).clone(),
            });
        }
        for (i, (peers, ports)) in rules.into_iter().enumerate() {
            let peer_ok = match peers {
                None => true,
                Some(list) if list.is_empty() => true,
                Some(list) => list
                    .iter()
                    .any(|pp| peer_matches(c, &pkey.namespace, pp, peer)),
            };
            if !peer_ok {
                misses.push(Miss::PeerNotMatched {
                    policy: (*pkey).clone(),
                    rule: i,
                });
                continue;
            }
            let port_ok = match ports {
                None => true,
                Some(list) if list.is_empty() => true,
                Some(list) => list.iter().any(|pp| port_matches(pp, flow.transport, dst)),
            };
            if !port_ok {
                misses.push(Miss::PortNotMatched {
                    policy: (*pkey).clone(),
                    rule: i,
                });
                continue;
            }
            return Decision::Allowed {
                policy: (*pkey).clone(),
                rule: i,
            };
        }
    }
    Decision::Denied {
        isolated_by: isolating.into_iter().map(|(k, _)| k.clone()).collect(),
        misses,
    }
}

/// Whether one peer of a policy in `policy_ns` covers `other`.
fn peer_matches(c: &Cluster, policy_ns: &str, peer: &NetworkPolicyPeer, other: &Resolved) -> bool {
    if let Some(block) = &peer.ip_block {
        // ipBlock applies to every address, pods' included (e2e T34–T36).
        let ip = other.ip();
        let inside = |s: &str| s.parse::<IpNet>().is_ok_and(|n| n.trunc().contains(&ip));
        return inside(&block.cidr) && !block.except.iter().any(|x| inside(x));
    }
    let Resolved::Pod { key, pod, .. } = other else {
        return false;
    };
    let ns_ok = match &peer.namespace_selector {
        // podSelector alone: pods of the policy's own namespace.
        None => key.namespace == policy_ns,
        Some(sel) => selector::matches(sel, &c.namespace_labels(&key.namespace)),
    };
    let pod_ok = match &peer.pod_selector {
        None => true,
        Some(sel) => selector::matches(sel, &pod.labels),
    };
    ns_ok && pod_ok
}

/// Whether one port entry covers the flow; named ports resolve on the destination pod.
fn port_matches(p: &NetworkPolicyPort, transport: Transport, dst: &Resolved) -> bool {
    let Some((proto, port)) = transport.port() else {
        return false;
    };
    if Protocol::from_api(p.protocol.as_deref()) != Some(proto) {
        return false;
    }
    match (&p.port, p.end_port) {
        (None, _) => true,
        (Some(IntOrString::Int(n)), None) => i32::from(port) == *n,
        (Some(IntOrString::Int(n)), Some(end)) => (*n..=end).contains(&i32::from(port)),
        (Some(IntOrString::String(name)), _) => match dst {
            Resolved::Pod { pod, .. } => pod.named_ports(name, proto).any(|p| p == port),
            _ => false,
        },
    }
}

/// The operator's answer to "why was this allowed / dropped?".
pub fn explain(v: &Verdict) -> String {
    let mut s = format!(
        "{}: {}\n",
        v.flow,
        if v.allowed() { "ALLOWED" } else { "DENIED" }
    );
    let sides = [
        (Direction::Egress, &v.flow.src, &v.egress),
        (Direction::Ingress, &v.flow.dst, &v.ingress),
    ];
    for (dir, end, d) in sides {
        let who = match dir {
            Direction::Egress => format!("egress from {end}"),
            Direction::Ingress => format!("ingress to {end}"),
        };
        let _ = match d {
            Decision::NotApplicable => writeln!(s, "  {who}: not a pod, no policy applies"),
            Decision::NotIsolated => {
                writeln!(s, "  {who}: allowed, no policy selects it for {dir}")
            }
            Decision::Exempt(Exemption::OwnNode) => writeln!(
                s,
                "  {who}: allowed, traffic from the pod's own node is always admitted"
            ),
            Decision::Exempt(Exemption::NeighbourDiscovery) => writeln!(
                s,
                "  {who}: allowed, IPv6 neighbour discovery is never subject to policy"
            ),
            Decision::Allowed { policy, rule } => {
                writeln!(s, "  {who}: allowed by policy {policy}, {dir} rule {rule}")
            }
            Decision::Denied {
                isolated_by,
                misses,
            } => {
                let names: Vec<String> = isolated_by.iter().map(ToString::to_string).collect();
                let _ = writeln!(
                    s,
                    "  {who}: DENIED, isolated for {dir} by {}; no {dir} rule of {} matched:",
                    names.join(", "),
                    if names.len() == 1 { "it" } else { "them" },
                );
                for m in misses {
                    let _ = match m {
                        Miss::NoRules { policy } => {
                            writeln!(s, "    - {policy} has no {dir} rules (it allows nothing)")
                        }
                        Miss::PeerNotMatched { policy, rule } => {
                            let other = match dir {
                                Direction::Egress => &v.flow.dst,
                                Direction::Ingress => &v.flow.src,
                            };
                            writeln!(s, "    - {policy} rule {rule}: no peer matches {other}")
                        }
                        Miss::PortNotMatched { policy, rule } => writeln!(
                            s,
                            "    - {policy} rule {rule}: a peer matches, but no port matches {}",
                            v.flow.transport
                        ),
                    };
                }
                Ok(())
            }
        };
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::Labels;
    use crate::model::{ContainerPort, PodRecord};

    fn labels(kv: &[(&str, &str)]) -> Labels {
        kv.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    /// x/a, x/b, y/a on nodes n1, n2, n1; dual-stack; x/a declares web ports, x/b none.
    fn cluster() -> Cluster {
        let mut c = Cluster::new();
        let web = vec![
            ContainerPort {
                name: Some("http".into()),
                port: 8080,
                protocol: Protocol::Tcp,
            },
            ContainerPort {
                name: Some("dns".into()),
                port: 53,
                protocol: Protocol::Udp,
            },
        ];
        let pods = [
            ("x", "a", "n1", "10.0.1.1", "fd00::1:1", web),
            ("x", "b", "n2", "10.0.2.1", "fd00::2:1", vec![]),
            ("y", "a", "n1", "10.0.1.2", "fd00::1:2", vec![]),
        ];
        for (ns, name, node, v4, v6, ports) in pods {
            let rec = PodRecord {
                labels: labels(&[("pod", name)]),
                ips: vec![v4.parse().unwrap(), v6.parse().unwrap()],
                node: Some(node.into()),
                host_network: false,
                ports,
            };
            c.upsert_pod_record(PodKey::new(ns, name), rec).unwrap();
        }
        c
    }

    fn policy(c: &mut Cluster, ns: &str, name: &str, spec: serde_json::Value) {
        let p = serde_json::from_value(serde_json::json!({
            "metadata": {"name": name, "namespace": ns}, "spec": spec,
        }))
        .unwrap();
        c.upsert_policy(p).unwrap();
    }

    fn pod(ns: &str, name: &str) -> Endpoint {
        Endpoint::Pod(PodKey::new(ns, name))
    }

    fn flow(src: Endpoint, dst: Endpoint, t: Transport) -> Flow {
        Flow {
            src,
            dst,
            family: Family::V4,
            transport: t,
        }
    }

    fn v6(src: Endpoint, dst: Endpoint, t: Transport) -> Flow {
        Flow {
            src,
            dst,
            family: Family::V6,
            transport: t,
        }
    }

    fn allowed(c: &Cluster, f: Flow) -> bool {
        evaluate(c, &f).unwrap().allowed()
    }

    #[test]
    fn nothing_isolated_allows_everything() {
        let c = cluster();
        let v = evaluate(&c, &flow(pod("x", "a"), pod("x", "b"), Transport::Tcp(80))).unwrap();
        assert_eq!(
            (v.egress.clone(), v.ingress.clone()),
            (Decision::NotIsolated, Decision::NotIsolated)
        );
        assert!(v.allowed());
        let ext = Endpoint::External("192.0.2.1".parse().unwrap());
        let v = evaluate(&c, &flow(ext, pod("x", "a"), Transport::Other(47))).unwrap();
        assert_eq!(v.egress, Decision::NotApplicable);
    }

    #[test]
    fn egress_only_policy_without_types_isolates_ingress_too() {
        let mut c = cluster();
        policy(
            &mut c,
            "x",
            "p",
            serde_json::json!({"podSelector": {}, "egress": [{}]}),
        );
        let v = evaluate(&c, &flow(pod("y", "a"), pod("x", "b"), Transport::Tcp(80))).unwrap();
        assert!(matches!(v.ingress, Decision::Denied { .. }), "{v:?}");
        assert!(allowed(
            &c,
            flow(pod("x", "b"), pod("y", "a"), Transport::Tcp(80))
        ));
    }

    #[test]
    fn empty_egress_without_types_does_not_isolate_egress() {
        let mut c = cluster();
        policy(
            &mut c,
            "x",
            "p",
            serde_json::json!({"podSelector": {}, "egress": []}),
        );
        assert!(allowed(
            &c,
            flow(pod("x", "b"), pod("y", "a"), Transport::Tcp(80))
        ));
        assert!(!allowed(
            &c,
            flow(pod("y", "a"), pod("x", "b"), Transport::Tcp(80))
        ));
    }

    #[test]
    fn policy_types_egress_ignores_ingress_rules() {
        let mut c = cluster();
        policy(
            &mut c,
            "x",
            "p",
            serde_json::json!({"podSelector": {}, "policyTypes": ["Egress"], "ingress": []}),
        );
        assert!(allowed(
            &c,
            flow(pod("y", "a"), pod("x", "b"), Transport::Tcp(80))
        ));
        assert!(!allowed(
            &c,
            flow(pod("x", "b"), pod("y", "a"), Transport::Tcp(80))
        ));
    }

    #[test]
    fn empty_versus_missing_rules_and_fields() {
        let deny_all = [
            serde_json::json!({"podSelector": {}}),
            serde_json::json!({"podSelector": {}, "ingress": []}),
            serde_json::json!({"podSelector": {}, "policyTypes": ["Ingress"]}),
        ];
        for spec in deny_all {
            let mut c = cluster();
            policy(&mut c, "x", "p", spec.clone());
            assert!(
                !allowed(&c, flow(pod("y", "a"), pod("x", "b"), Transport::Udp(5))),
                "{spec}"
            );
        }
        let allow_all = [
            serde_json::json!({"podSelector": {}, "ingress": [{}]}),
            serde_json::json!({"podSelector": {}, "ingress": [{"from": []}]}),
            serde_json::json!({"podSelector": {}, "ingress": [{"ports": []}]}),
            serde_json::json!({"podSelector": {}, "ingress": [{"from": [], "ports": []}]}),
        ];
        for spec in allow_all {
            let mut c = cluster();
            policy(&mut c, "x", "p", spec.clone());
            for t in [
                Transport::Udp(5),
                Transport::Icmp { kind: 8 },
                Transport::Other(47),
            ] {
                assert!(
                    allowed(&c, flow(pod("y", "a"), pod("x", "b"), t)),
                    "{spec} {t}"
                );
            }
        }
    }

    #[test]
    fn additive_policies() {
        let mut c = cluster();
        policy(
            &mut c,
            "x",
            "deny",
            serde_json::json!({"podSelector": {}, "ingress": []}),
        );
        policy(
            &mut c,
            "x",
            "allow-81",
            serde_json::json!({"podSelector": {}, "ingress": [{"ports": [{"port": 81}]}]}),
        );
        assert!(!allowed(
            &c,
            flow(pod("y", "a"), pod("x", "b"), Transport::Tcp(80))
        ));
        let v = evaluate(&c, &flow(pod("y", "a"), pod("x", "b"), Transport::Tcp(81))).unwrap();
        assert_eq!(
            v.ingress,
            Decision::Allowed {
                policy: PolicyKey::new("x", "allow-81"),
                rule: 0
            }
        );
    }

    #[test]
    fn peer_kinds() {
        // podSelector alone is the policy's namespace; namespaceSelector {} all; both AND.
        let cases = [
            (
                serde_json::json!([{"podSelector": {"matchLabels": {"pod": "a"}}}]),
                [true, false],
            ),
            (serde_json::json!([{"podSelector": {}}]), [true, false]),
            (serde_json::json!([{"namespaceSelector": {}}]), [true, true]),
            (
                serde_json::json!([{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "y"}}}]),
                [false, true],
            ),
            (
                serde_json::json!([{"namespaceSelector": {}, "podSelector": {"matchLabels": {"pod": "b"}}}]),
                [false, false],
            ),
            (
                serde_json::json!([{"namespaceSelector": {}, "podSelector": {"matchLabels": {"pod": "a"}}}]),
                [true, true],
            ),
            (
                serde_json::json!([{"podSelector": {"matchLabels": {"pod": "zzz"}}},
                                   {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "y"}}}]),
                [false, true],
            ),
        ];
        for (from, [from_xa, from_ya]) in cases {
            let mut c = cluster();
            policy(
                &mut c,
                "x",
                "p",
                serde_json::json!({"podSelector": {"matchLabels": {"pod": "b"}}, "ingress": [{"from": from}]}),
            );
            assert_eq!(
                allowed(&c, flow(pod("x", "a"), pod("x", "b"), Transport::Tcp(80))),
                from_xa,
                "{from}"
            );
            assert_eq!(
                allowed(&c, flow(pod("y", "a"), pod("x", "b"), Transport::Tcp(80))),
                from_ya,
                "{from}"
            );
        }
    }

    #[test]
    fn ip_block_with_except_applies_to_pod_ips_v4_and_v6() {
        let mut c = cluster();
        policy(
            &mut c,
            "x",
            "p",
            serde_json::json!({"podSelector": {"matchLabels": {"pod": "b"}}, "ingress": [{"from": [
                {"ipBlock": {"cidr": "10.0.0.0/16", "except": ["10.0.1.2/32"]}},
                {"ipBlock": {"cidr": "fd00::1:0/112", "except": ["fd00::1:1/128"]}}]}]}),
        );
        let b = || pod("x", "b");
        assert!(allowed(&c, flow(pod("x", "a"), b(), Transport::Tcp(80))));
        assert!(
            !allowed(&c, flow(pod("y", "a"), b(), Transport::Tcp(80))),
            "except"
        );
        assert!(
            !allowed(&c, v6(pod("x", "a"), b(), Transport::Tcp(80))),
            "v6 except"
        );
        assert!(allowed(&c, v6(pod("y", "a"), b(), Transport::Tcp(80))));
        let ext = |ip: &str| Endpoint::External(ip.parse().unwrap());
        assert!(allowed(
            &c,
            flow(ext("10.0.200.1"), b(), Transport::Tcp(80))
        ));
        assert!(!allowed(&c, flow(ext("10.1.0.1"), b(), Transport::Tcp(80))));
        assert!(allowed(&c, v6(ext("fd00::1:ff"), b(), Transport::Tcp(80))));
        assert!(!allowed(&c, v6(ext("fd00::2:ff"), b(), Transport::Tcp(80))));
    }

    #[test]
    fn ports_protocols_and_ranges() {
        let mut c = cluster();
        policy(
            &mut c,
            "x",
            "p",
            serde_json::json!({"podSelector": {}, "ingress": [{"ports": [
                {"port": 80}, {"protocol": "UDP", "port": 1000, "endPort": 1002},
                {"protocol": "SCTP"}]}]}),
        );
        let ok = |t| allowed(&c, flow(pod("y", "a"), pod("x", "b"), t));
        assert!(ok(Transport::Tcp(80)));
        assert!(!ok(Transport::Tcp(81)));
        assert!(!ok(Transport::Udp(80)), "port without protocol is TCP only");
        assert!(!ok(Transport::Udp(999)));
        assert!(ok(Transport::Udp(1000)) && ok(Transport::Udp(1001)) && ok(Transport::Udp(1002)));
        assert!(!ok(Transport::Udp(1003)));
        assert!(!ok(Transport::Tcp(1001)));
        assert!(
            ok(Transport::Sctp(1)) && ok(Transport::Sctp(65535)),
            "protocol only: all ports"
        );
        assert!(
            !ok(Transport::Icmp { kind: 8 }),
            "a rule with ports never matches ICMP"
        );
    }

    #[test]
    fn sctp_and_udp_rules_never_open_tcp() {
        for proto in ["SCTP", "UDP"] {
            let mut c = cluster();
            policy(
                &mut c,
                "x",
                "p",
                serde_json::json!({"podSelector": {}, "ingress": [{"ports": [{"port": 81, "protocol": proto}]}]}),
            );
            assert!(
                !allowed(&c, flow(pod("y", "a"), pod("x", "b"), Transport::Tcp(81))),
                "{proto}"
            );
            let same = if proto == "SCTP" {
                Transport::Sctp(81)
            } else {
                Transport::Udp(81)
            };
            assert!(
                allowed(&c, flow(pod("y", "a"), pod("x", "b"), same)),
                "{proto}"
            );
        }
    }

    #[test]
    fn named_ports_resolve_on_the_destination() {
        let mut c = cluster();
        // Ingress: x/a declares http=8080/TCP, x/b declares nothing.
        policy(
            &mut c,
            "x",
            "in",
            serde_json::json!({"podSelector": {}, "policyTypes": ["Ingress"],
                               "ingress": [{"ports": [{"port": "http"}, {"port": "dns", "protocol": "UDP"}]}]}),
        );
        let to = |dst: Endpoint, t| allowed(&c, flow(pod("y", "a"), dst, t));
        assert!(to(pod("x", "a"), Transport::Tcp(8080)));
        assert!(!to(pod("x", "a"), Transport::Tcp(80)));
        assert!(
            !to(pod("x", "a"), Transport::Udp(8080)),
            "name matches, protocol does not"
        );
        assert!(to(pod("x", "a"), Transport::Udp(53)));
        assert!(
            !to(pod("x", "b"), Transport::Tcp(8080)),
            "a pod without ports has no named port"
        );

        // Egress: resolved on the peer, never on the source.
        let mut c = cluster();
        policy(
            &mut c,
            "y",
            "out",
            serde_json::json!({"podSelector": {}, "policyTypes": ["Egress"],
                               "egress": [{"ports": [{"port": "http"}]}]}),
        );
        assert!(allowed(
            &c,
            flow(pod("y", "a"), pod("x", "a"), Transport::Tcp(8080))
        ));
        assert!(!allowed(
            &c,
            flow(pod("y", "a"), pod("x", "b"), Transport::Tcp(8080))
        ));
        let ext = Endpoint::External("192.0.2.1".parse().unwrap());
        assert!(!allowed(&c, flow(pod("y", "a"), ext, Transport::Tcp(8080))));
        // A named port with the wrong protocol in the rule matches nothing.
        let mut c = cluster();
        policy(
            &mut c,
            "x",
            "p",
            serde_json::json!({"podSelector": {}, "ingress": [{"ports": [{"port": "http", "protocol": "UDP"}]}]}),
        );
        assert!(!allowed(
            &c,
            flow(pod("y", "a"), pod("x", "a"), Transport::Tcp(8080))
        ));
        assert!(!allowed(
            &c,
            flow(pod("y", "a"), pod("x", "a"), Transport::Udp(8080))
        ));
    }

    #[test]
    fn own_node_is_exempt_for_ingress_only() {
        let mut c = cluster();
        policy(
            &mut c,
            "x",
            "deny",
            serde_json::json!({"podSelector": {}, "policyTypes": ["Ingress", "Egress"]}),
        );
        let n1 = || Endpoint::Node {
            name: "n1".into(),
            ip: "192.168.0.1".parse().unwrap(),
        };
        let n2 = || Endpoint::Node {
            name: "n2".into(),
            ip: "192.168.0.2".parse().unwrap(),
        };
        // x/a runs on n1.
        let v = evaluate(&c, &flow(n1(), pod("x", "a"), Transport::Tcp(80))).unwrap();
        assert_eq!(v.ingress, Decision::Exempt(Exemption::OwnNode));
        assert!(v.allowed());
        assert!(
            !allowed(&c, flow(n2(), pod("x", "a"), Transport::Tcp(80))),
            "another node is not"
        );
        assert!(
            !allowed(&c, flow(pod("x", "a"), n1(), Transport::Tcp(10250))),
            "egress to own node"
        );
        // A hostNetwork pod speaks for its node.
        let host = PodRecord {
            ips: vec!["192.168.0.1".parse().unwrap()],
            node: Some("n1".into()),
            host_network: true,
            ..Default::default()
        };
        c.upsert_pod_record(PodKey::new("kube-system", "agent"), host)
            .unwrap();
        assert!(allowed(
            &c,
            flow(
                pod("kube-system", "agent"),
                pod("x", "a"),
                Transport::Tcp(80)
            )
        ));
        assert!(!allowed(
            &c,
            flow(
                pod("kube-system", "agent"),
                pod("x", "b"),
                Transport::Tcp(80)
            )
        ));
    }

    #[test]
    fn host_network_pods_are_never_peers() {
        let mut c = cluster();
        let host = PodRecord {
            labels: labels(&[("pod", "a")]),
            ips: vec!["192.168.0.2".parse().unwrap()],
            node: Some("n2".into()),
            host_network: true,
            ..Default::default()
        };
        c.upsert_pod_record(PodKey::new("x", "h"), host).unwrap();
        policy(
            &mut c,
            "x",
            "p",
            serde_json::json!({"podSelector": {"matchLabels": {"pod": "a"}},
                               "ingress": [{"from": [{"podSelector": {"matchLabels": {"pod": "a"}}}]}]}),
        );
        // x/h (on n2, not x/a's node n1) carries pod=a but is not a pod set member.
        assert!(!allowed(
            &c,
            flow(pod("x", "h"), pod("x", "a"), Transport::Tcp(80))
        ));
        // And it is never a target: everything reaches it.
        assert!(allowed(
            &c,
            flow(pod("y", "a"), pod("x", "h"), Transport::Tcp(80))
        ));
    }

    #[test]
    fn neighbour_discovery_is_exempt_ipv6_only() {
        let mut c = cluster();
        policy(
            &mut c,
            "x",
            "deny",
            serde_json::json!({"podSelector": {}, "policyTypes": ["Ingress", "Egress"]}),
        );
        assert!(allowed(
            &c,
            v6(pod("x", "a"), pod("x", "b"), Transport::Icmp { kind: 135 })
        ));
        assert!(!allowed(
            &c,
            v6(pod("x", "a"), pod("x", "b"), Transport::Icmp { kind: 128 })
        ));
        assert!(!allowed(
            &c,
            flow(pod("x", "a"), pod("x", "b"), Transport::Icmp { kind: 135 })
        ));
    }

    #[test]
    fn flow_errors() {
        let c = cluster();
        let e = evaluate(
            &c,
            &flow(pod("x", "nope"), pod("x", "a"), Transport::Tcp(1)),
        )
        .unwrap_err();
        assert_eq!(e, FlowError::UnknownPod(PodKey::new("x", "nope")));
        let ext = Endpoint::External("10.0.1.1".parse().unwrap());
        let e = evaluate(&c, &flow(ext, pod("x", "b"), Transport::Tcp(1))).unwrap_err();
        assert!(matches!(e, FlowError::AddressOfPod { .. }));
        let ext = Endpoint::External("fd00::9".parse().unwrap());
        let e = evaluate(&c, &flow(ext, pod("x", "b"), Transport::Tcp(1))).unwrap_err();
        assert!(matches!(e, FlowError::WrongFamily { .. }));
    }

    #[test]
    fn explain_names_policies_rules_and_misses() {
        let mut c = cluster();
        policy(
            &mut c,
            "x",
            "web",
            serde_json::json!({"podSelector": {"matchLabels": {"pod": "b"}}, "ingress": [
                {"from": [{"podSelector": {"matchLabels": {"pod": "a"}}}], "ports": [{"port": 80}]},
                {"from": [{"namespaceSelector": {"matchLabels": {"team": "ops"}}}]}]}),
        );
        policy(&mut c, "x", "deny", serde_json::json!({"podSelector": {}}));
        let v = evaluate(&c, &flow(pod("x", "a"), pod("x", "b"), Transport::Tcp(81))).unwrap();
        let text = explain(&v);
        assert!(
            text.starts_with("pod x/a -> pod x/b, TCP/81 over IPv4: DENIED"),
            "{text}"
        );
        assert!(
            text.contains("egress from pod x/a: allowed, no policy selects it for egress"),
            "{text}"
        );
        assert!(
            text.contains("isolated for ingress by x/deny, x/web"),
            "{text}"
        );
        assert!(text.contains("x/deny has no ingress rules"), "{text}");
        assert!(
            text.contains("x/web rule 0: a peer matches, but no port matches TCP/81"),
            "{text}"
        );
        assert!(
            text.contains("x/web rule 1: no peer matches pod x/a"),
            "{text}"
        );

        let v = evaluate(&c, &flow(pod("x", "a"), pod("x", "b"), Transport::Tcp(80))).unwrap();
        assert!(explain(&v).contains("ingress to pod x/b: allowed by policy x/web, ingress rule 0"));
    }
}
