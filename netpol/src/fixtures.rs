//! The upstream e2e NetworkPolicy cases (kubernetes `test/e2e/network/netpol`, netpol.md §2.1:
//! T1–T42, U1–U3, S1–S3) as data over the 3×3 world, for this crate's tests and for the daemon's
//! kernel tests, which replay them against real nftables.
//!
//! The world: namespaces `x`, `y`, `z`, each with pods `a`, `b`, `c` labelled `pod=<name>` and
//! declaring `serve-{80,81}-{tcp,udp,sctp}`, spread over nodes `n1`–`n3` so that every namespace
//! spans nodes and every node holds pods of several namespaces. Every case starts from that
//! world with no policies; its steps run in order, each applying its actions and then checking
//! every (from, to) pod pair, loopback excluded, on each [`Check`]'s protocol and port.
//!
//! ipBlock CIDRs that depend on pod addresses are written as placeholders and filled in by
//! [`instantiate`]: `{ns/pod}/host` (the pod's address as /32 or /128) and `{ns/pod}/large`
//! (e2e's `makeLargeCIDRForIP`: the /4 or /64 around it; it must hold every pod address, as it
//! does in e2e).
//!
//! Checks marked "(extra)" in a case's title go beyond upstream's table: they check that the
//! protocol a rule names is indeed opened.

use std::net::IpAddr;

use ipnet::IpNet;
use serde_json::{json, Value};

use crate::api::{Labels, NetworkPolicy};
use crate::model::{Cluster, ContainerPort, PodKey, PodRecord, PolicyKey, Protocol};
use crate::validate::ValidationErrors;

pub const NAMESPACES: [&str; 3] = ["x", "y", "z"];
pub const POD_NAMES: [&str; 3] = ["a", "b", "c"];
pub const NODES: [&str; 3] = ["n1", "n2", "n3"];

/// One pod of the world.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorldPod {
    pub key: PodKey,
    pub node: String,
    pub labels: Labels,
    pub ports: Vec<ContainerPort>,
}

/// The nine pods: `x/a` on n1, `x/b` on n2, `x/c` on n3, `y/a` on n2, … (node index =
/// namespace index + pod index, mod 3).
pub fn e2e_world() -> Vec<WorldPod> {
    let mut pods = Vec::new();
    for (i, ns) in NAMESPACES.iter().enumerate() {
        for (j, name) in POD_NAMES.iter().enumerate() {
            let mut ports = Vec::new();
            for port in [80u16, 81] {
                for (proto, p) in [
                    (Protocol::Tcp, "tcp"),
                    (Protocol::Udp, "udp"),
                    (Protocol::Sctp, "sctp"),
                ] {
                    ports.push(ContainerPort {
                        name: Some(format!("serve-{port}-{p}")),
                        port,
                        protocol: proto,
                    });
                }
            }
            pods.push(WorldPod {
                key: PodKey::new(*ns, *name),
                node: NODES[(i + j) % 3].to_string(),
                labels: labels(&[("pod", name)]),
                ports,
            });
        }
    }
    pods
}

/// The world as a cluster, with addresses from `ips_of` (one per family the test runs).
pub fn e2e_cluster(ips_of: impl Fn(&PodKey) -> Vec<IpAddr>) -> Cluster {
    let mut c = Cluster::new();
    for p in e2e_world() {
        let rec = PodRecord {
            labels: p.labels,
            ips: ips_of(&p.key),
            node: Some(p.node),
            host_network: false,
            ports: p.ports,
        };
        c.upsert_pod_record(p.key, rec).expect("the world is valid");
    }
    c
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct E2eCase {
    /// `T1` … `T42`, `U1` … `U3`, `S1` … `S3`.
    pub id: &'static str,
    /// Upstream's title fragment.
    pub title: &'static str,
    pub steps: Vec<Step>,
}

impl E2eCase {
    /// Whether the case's policies name pod addresses (ipBlock placeholders). Such a policy covers
    /// one family only, so in a dual-stack cluster check it in the family its placeholders were
    /// filled from, as e2e does.
    pub fn uses_addresses(&self) -> bool {
        self.steps.iter().flat_map(|s| &s.actions).any(|a| match a {
            Action::UpsertPolicy(p) => **p != instantiate(p, |_| IpAddr::from([0, 0, 0, 0])),
            _ => false,
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Step {
    pub actions: Vec<Action>,
    pub checks: Vec<Check>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Create or replace; may hold address placeholders (see [`instantiate`]).
    UpsertPolicy(Box<NetworkPolicy>),
    DeletePolicy(PolicyKey),
    /// Replaces the namespace's own labels (the automatic name label stays).
    SetNamespaceLabels {
        namespace: String,
        labels: Labels,
    },
    /// Replaces the pod's labels.
    SetPodLabels {
        pod: PodKey,
        labels: Labels,
    },
}

/// Expected reachability on one protocol and port: allowed unless an [`Expect`] says otherwise;
/// the last matching one wins (the e2e `Reachability` builder's order).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Check {
    pub protocol: Protocol,
    pub port: u16,
    pub expect: Vec<Expect>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Expect {
    pub from: Pattern,
    pub to: Pattern,
    pub allowed: bool,
}

/// `x/a`, `x/*` or `*`: None is any.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pattern {
    pub namespace: Option<String>,
    pub pod: Option<String>,
}

impl Pattern {
    pub fn parse(s: &str) -> Pattern {
        let any = |p: &str| (p != "*").then(|| p.to_string());
        match s.split_once('/') {
            Some((ns, pod)) => Pattern {
                namespace: any(ns),
                pod: any(pod),
            },
            None => Pattern {
                namespace: any(s),
                pod: None,
            },
        }
    }

    pub fn matches(&self, k: &PodKey) -> bool {
        self.namespace.as_ref().is_none_or(|n| *n == k.namespace)
            && self.pod.as_ref().is_none_or(|p| *p == k.name)
    }
}

impl Check {
    pub fn expected(&self, from: &PodKey, to: &PodKey) -> bool {
        self.expect
            .iter()
            .rev()
            .find(|e| e.from.matches(from) && e.to.matches(to))
            .is_none_or(|e| e.allowed)
    }
}

/// Every ordered pair of distinct world pods (loopback is undefined upstream and ignored).
pub fn pairs() -> Vec<(PodKey, PodKey)> {
    let pods: Vec<PodKey> = e2e_world().into_iter().map(|p| p.key).collect();
    let mut out = Vec::new();
    for a in &pods {
        for b in &pods {
            if a != b {
                out.push((a.clone(), b.clone()));
            }
        }
    }
    out
}

/// Fills in `{ns/pod}/host` and `{ns/pod}/large` placeholders in ipBlocks.
pub fn instantiate(policy: &NetworkPolicy, ip_of: impl Fn(&PodKey) -> IpAddr) -> NetworkPolicy {
    let fill = |s: &mut String| {
        let Some(rest) = s.strip_prefix('{') else {
            return;
        };
        let Some((pod, kind)) = rest.split_once("}/") else {
            return;
        };
        let Some((ns, name)) = pod.split_once('/') else {
            return;
        };
        let ip = ip_of(&PodKey::new(ns, name));
        let len = match (kind, ip) {
            ("host", IpAddr::V4(_)) => 32,
            ("host", IpAddr::V6(_)) => 128,
            ("large", IpAddr::V4(_)) => 4,
            ("large", IpAddr::V6(_)) => 64,
            _ => return,
        };
        *s = IpNet::new(ip, len)
            .expect("valid prefix")
            .trunc()
            .to_string();
    };
    let mut p = policy.clone();
    let spec = &mut p.spec;
    let peers = spec
        .ingress
        .iter_mut()
        .flatten()
        .flat_map(|r| r.from.iter_mut().flatten())
        .chain(
            spec.egress
                .iter_mut()
                .flatten()
                .flat_map(|r| r.to.iter_mut().flatten()),
        );
    for peer in peers {
        if let Some(b) = &mut peer.ip_block {
            fill(&mut b.cidr);
            b.except.iter_mut().for_each(fill);
        }
    }
    p
}

/// Applies one action to a cluster (placeholders filled with `ip_of`).
pub fn apply(
    c: &mut Cluster,
    action: &Action,
    ip_of: impl Fn(&PodKey) -> IpAddr,
) -> Result<(), ValidationErrors> {
    match action {
        Action::UpsertPolicy(p) => c.upsert_policy(instantiate(p, ip_of)).map(|_| ()),
        Action::DeletePolicy(k) => {
            c.remove_policy(k);
            Ok(())
        }
        Action::SetNamespaceLabels { namespace, labels } => {
            c.set_namespace_labels(namespace, labels.clone())
        }
        Action::SetPodLabels { pod, labels } => {
            let mut rec = c.pod(pod).cloned().unwrap_or_default();
            rec.labels = labels.clone();
            c.upsert_pod_record(pod.clone(), rec)
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The table

fn labels(kv: &[(&str, &str)]) -> Labels {
    kv.iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn policy(ns: &str, name: &str, spec: Value) -> NetworkPolicy {
    serde_json::from_value(json!({
        "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
        "metadata": {"name": name, "namespace": ns},
        "spec": spec,
    }))
    .expect("fixture policies deserialise")
}

fn pod_is(name: &str) -> Value {
    json!({"matchLabels": {"pod": name}})
}

fn ns_is(name: &str) -> Value {
    json!({"matchLabels": {"kubernetes.io/metadata.name": name}})
}

fn deny(from: &str, to: &str) -> Expect {
    Expect {
        from: Pattern::parse(from),
        to: Pattern::parse(to),
        allowed: false,
    }
}

fn allow(from: &str, to: &str) -> Expect {
    Expect {
        from: Pattern::parse(from),
        to: Pattern::parse(to),
        allowed: true,
    }
}

fn tcp(port: u16, expect: Vec<Expect>) -> Check {
    Check {
        protocol: Protocol::Tcp,
        port,
        expect,
    }
}

fn on(protocol: Protocol, port: u16, expect: Vec<Expect>) -> Check {
    Check {
        protocol,
        port,
        expect,
    }
}

fn step(actions: Vec<Action>, checks: Vec<Check>) -> Step {
    Step { actions, checks }
}

fn up(p: NetworkPolicy) -> Action {
    Action::UpsertPolicy(Box::new(p))
}

fn case(id: &'static str, title: &'static str, steps: Vec<Step>) -> E2eCase {
    E2eCase { id, title, steps }
}

/// One policy, one check: most cases.
fn simple(
    id: &'static str,
    title: &'static str,
    p: Vec<NetworkPolicy>,
    checks: Vec<Check>,
) -> E2eCase {
    case(
        id,
        title,
        vec![step(p.into_iter().map(up).collect(), checks)],
    )
}

/// Ingress-isolating policy in x selecting `pod=a`, with these ingress rules.
fn xa_ingress(name: &str, rules: Value) -> NetworkPolicy {
    policy(
        "x",
        name,
        json!({"podSelector": pod_is("a"), "policyTypes": ["Ingress"], "ingress": rules}),
    )
}

fn xa_egress(name: &str, rules: Value) -> NetworkPolicy {
    policy(
        "x",
        name,
        json!({"podSelector": pod_is("a"), "policyTypes": ["Egress"], "egress": rules}),
    )
}

fn all_ingress(ns: &str, name: &str, rules: Value) -> NetworkPolicy {
    policy(
        ns,
        name,
        json!({"podSelector": {}, "policyTypes": ["Ingress"], "ingress": rules}),
    )
}

fn all_egress(ns: &str, name: &str, rules: Value) -> NetworkPolicy {
    policy(
        ns,
        name,
        json!({"podSelector": {}, "policyTypes": ["Egress"], "egress": rules}),
    )
}

/// The whole table, in upstream's order.
#[rustfmt::skip]
pub fn e2e_cases() -> Vec<E2eCase> {
    use Protocol::{Sctp, Udp};
    let only_xb = || vec![deny("*", "x/a"), allow("x/b", "x/a")];
    let from_y = || vec![deny("x/*", "x/a"), deny("z/*", "x/a")];
    let ns_not_in_x = json!({"matchExpressions": [
        {"key": "kubernetes.io/metadata.name", "operator": "NotIn", "values": ["x"]}]});
    let y_a = json!([{"from": [{"namespaceSelector": ns_is("y"), "podSelector": pod_is("a")}]}]);
    let t35 = xa_egress(
        "allow-client-a-via-cidr-egress-rule",
        json!([{"to": [{"ipBlock": {"cidr": "{x/b}/large", "except": ["{x/b}/host"]}}]}]),
    );
    vec![
        simple("T1", "support a 'default-deny-ingress' policy",
            vec![all_ingress("x", "deny-ingress", json!([]))],
            vec![tcp(80, vec![deny("*", "x/*")])]),
        simple("T2", "support a 'default-deny-all' policy",
            vec![policy("x", "deny-all", json!({"podSelector": {}, "policyTypes": ["Ingress", "Egress"],
                                                 "ingress": [], "egress": []}))],
            vec![tcp(80, vec![deny("*", "x/*"), deny("x/*", "*")])]),
        simple("T3", "allow traffic from pods within server namespace based on PodSelector",
            vec![xa_ingress("x-a-allows-x-b", json!([{"from": [{"podSelector": pod_is("b")}]}]))],
            vec![tcp(80, only_xb())]),
        simple("T4", "allow ingress traffic for a target",
            vec![all_ingress("x", "deny-ingress", json!([])),
                 xa_ingress("allow-all-to-a", json!([{"from": [{"podSelector": {}, "namespaceSelector": {}}]}]))],
            vec![tcp(80, vec![deny("*", "x/b"), deny("*", "x/c")])]),
        simple("T5", "allow ingress traffic from pods in all namespaces",
            vec![xa_ingress("allow-all-ns", json!([{"from": [{"namespaceSelector": {}}]}]))],
            vec![tcp(80, vec![])]),
        simple("T6", "allow traffic only from a different namespace, based on NamespaceSelector",
            vec![xa_ingress("allow-ns-y", json!([{"from": [{"namespaceSelector": ns_is("y")}]}]))],
            vec![tcp(80, from_y())]),
        simple("T7", "allow traffic based on PodSelector with MatchExpressions",
            vec![xa_ingress("allow-pod-in-b", json!([{"from": [{"podSelector": {"matchExpressions": [
                {"key": "pod", "operator": "In", "values": ["b"]}]}}]}]))],
            vec![tcp(80, only_xb())]),
        simple("T8", "allow traffic based on NamespaceSelector with MatchExpressions",
            vec![xa_ingress("allow-ns-in-y", json!([{"from": [{"namespaceSelector": {"matchExpressions": [
                {"key": "kubernetes.io/metadata.name", "operator": "In", "values": ["y"]}]}}]}]))],
            vec![tcp(80, from_y())]),
        simple("T9", "allow traffic based on PodSelector or NamespaceSelector",
            vec![xa_ingress("allow-ns-not-x-or-pod-b", json!([{"from": [
                {"namespaceSelector": ns_not_in_x.clone()}, {"podSelector": pod_is("b")}]}]))],
            vec![tcp(80, vec![deny("x/*", "x/a"), allow("x/b", "x/a")])]),
        simple("T10", "allow traffic based on PodSelector and NamespaceSelector",
            vec![xa_ingress("allow-ns-not-x-and-pod-b", json!([{"from": [
                {"namespaceSelector": ns_not_in_x.clone(), "podSelector": pod_is("b")}]}]))],
            vec![tcp(80, vec![deny("*", "x/a"), allow("y/b", "x/a"), allow("z/b", "x/a")])]),
        simple("T11", "allow traffic based on Multiple PodSelectors and NamespaceSelectors",
            vec![xa_ingress("allow-ns-not-x-and-pod-b-or-c", json!([{"from": [
                {"namespaceSelector": ns_not_in_x.clone(), "podSelector": {"matchExpressions": [
                    {"key": "pod", "operator": "In", "values": ["b", "c"]}]}}]}]))],
            vec![tcp(80, vec![deny("x/*", "x/a"), deny("y/a", "x/a"), deny("z/a", "x/a")])]),
        simple("T12", "allow traffic based on any PodSelectors",
            vec![xa_ingress("allow-pod-b-or-c", json!([{"from": [{"podSelector": pod_is("b")},
                                                                  {"podSelector": pod_is("c")}]}]))],
            vec![tcp(80, vec![deny("*", "x/a"), allow("x/b", "x/a"), allow("x/c", "x/a")])]),
        simple("T13", "allow traffic only from a pod in a different namespace based on PodSelector and NamespaceSelector",
            vec![xa_ingress("allow-y-a", y_a.clone())],
            vec![tcp(80, vec![deny("*", "x/a"), allow("y/a", "x/a")])]),
        simple("T14", "enforce policy based on Ports (port 80 checked: extra)",
            vec![xa_ingress("allow-y-on-81", json!([{"from": [{"namespaceSelector": ns_is("y")}],
                                                     "ports": [{"port": 81, "protocol": "TCP"}]}]))],
            vec![tcp(81, from_y()), tcp(80, vec![deny("*", "x/a")])]),
        case("T15", "enforce multiple, stacked policies with overlapping podSelectors", vec![
            step(vec![up(xa_ingress("allow-y-on-81", json!([{"from": [{"namespaceSelector": ns_is("y")}],
                                                             "ports": [{"port": 81, "protocol": "TCP"}]}])))],
                 vec![tcp(81, from_y()), tcp(80, vec![deny("*", "x/a")])]),
            step(vec![up(xa_ingress("allow-y-on-80", json!([{"from": [{"namespaceSelector": ns_is("y")}],
                                                             "ports": [{"port": 80, "protocol": "TCP"}]}])))],
                 vec![tcp(80, from_y()), tcp(81, from_y())]),
        ]),
        simple("T16", "support allow-all policy",
            vec![all_ingress("x", "allow-all", json!([{}]))],
            vec![tcp(80, vec![]), tcp(81, vec![])]),
        simple("T17", "allow ingress access on one named port",
            vec![all_ingress("x", "allow-81-named", json!([{"ports": [{"port": "serve-81-tcp"}]}]))],
            vec![tcp(81, vec![]), tcp(80, vec![deny("*", "x/*")])]),
        simple("T18", "allow ingress access from namespace on one named port",
            vec![xa_ingress("allow-y-named-80", json!([{"from": [{"namespaceSelector": ns_is("y")}],
                                                        "ports": [{"port": "serve-80-tcp", "protocol": "TCP"}]}]))],
            vec![tcp(80, from_y()), tcp(81, vec![deny("*", "x/a")])]),
        simple("T19", "allow egress access on one named port",
            vec![all_egress("x", "allow-egress-named-80", json!([{"ports": [{"port": "serve-80-tcp"}]}]))],
            vec![tcp(80, vec![]), tcp(81, vec![deny("x/*", "*")])]),
        case("T20", "enforce updated policy", vec![
            step(vec![up(all_ingress("x", "allow-all-mutate-to-deny-all", json!([{}])))], vec![tcp(81, vec![])]),
            step(vec![up(all_ingress("x", "allow-all-mutate-to-deny-all", json!([])))],
                 vec![tcp(81, vec![deny("*", "x/*")])]),
        ]),
        case("T21", "allow ingress access from updated namespace", vec![
            step(vec![up(xa_ingress("allow-updated-ns", json!([{"from": [
                     {"namespaceSelector": {"matchLabels": {"ns2": "updated"}}}]}])))],
                 vec![tcp(80, vec![deny("*", "x/a")])]),
            step(vec![Action::SetNamespaceLabels { namespace: "y".into(), labels: labels(&[("ns2", "updated")]) }],
                 vec![tcp(80, vec![deny("*", "x/a"), allow("y/*", "x/a")])]),
        ]),
        case("T22", "allow ingress access from updated pod", vec![
            step(vec![up(xa_ingress("allow-updated-pod", json!([{"from": [
                     {"podSelector": {"matchLabels": {"pod": "b", "pod2": "updated"}}}]}])))],
                 vec![tcp(80, vec![deny("*", "x/a")])]),
            step(vec![Action::SetPodLabels { pod: PodKey::new("x", "b"),
                                             labels: labels(&[("pod", "b"), ("pod2", "updated")]) }],
                 vec![tcp(80, only_xb())]),
        ]),
        simple("T23", "deny ingress from pods on other namespaces",
            vec![all_ingress("x", "deny-other-ns", json!([{"from": [{"podSelector": {}}]}]))],
            vec![tcp(80, vec![deny("y/*", "x/*"), deny("z/*", "x/*")])]),
        case("T24", "deny ingress access to updated pod", vec![
            step(vec![up(policy("x", "deny-isolated", json!({"podSelector": {"matchLabels": {"target": "isolated"}},
                                                            "policyTypes": ["Ingress"], "ingress": []})))],
                 vec![tcp(80, vec![])]),
            step(vec![Action::SetPodLabels { pod: PodKey::new("x", "a"),
                                             labels: labels(&[("pod", "a"), ("target", "isolated")]) }],
                 vec![tcp(80, vec![deny("*", "x/a")])]),
        ]),
        simple("T25", "deny egress from pods based on PodSelector",
            vec![xa_egress("deny-egress-pod-a", json!([]))],
            vec![tcp(80, vec![deny("x/a", "*")])]),
        simple("T26", "deny egress from all pods in a namespace",
            vec![all_egress("x", "deny-egress-ns-x", json!([]))],
            vec![tcp(80, vec![deny("x/*", "*")])]),
        simple("T27", "work with Ingress, Egress specified together",
            vec![policy("x", "allow-client-a-via-pod-selector", json!({
                "podSelector": pod_is("a"), "policyTypes": ["Egress", "Ingress"],
                "ingress": [{"from": [{"podSelector": pod_is("b")}]}],
                "egress": [{"ports": [{"port": 80}]}]}))],
            vec![tcp(80, only_xb()),
                 tcp(81, vec![deny("*", "x/a"), allow("x/b", "x/a"), deny("x/a", "*")])]),
        simple("T28", "support denying of egress traffic on the client side (even if the server explicitly allows this traffic)",
            vec![xa_egress("allow-to-ns-y-pod-a", json!([{"to": [{"namespaceSelector": ns_is("y"), "podSelector": pod_is("a")}]}])),
                 policy("y", "allow-from-xa-to-ya", json!({"podSelector": pod_is("a"), "policyTypes": ["Ingress"],
                     "ingress": [{"from": [{"namespaceSelector": ns_is("x"), "podSelector": pod_is("a")}]}]})),
                 policy("y", "allow-from-xa-to-yb", json!({"podSelector": pod_is("b"), "policyTypes": ["Ingress"],
                     "ingress": [{"from": [{"namespaceSelector": ns_is("x"), "podSelector": pod_is("a")}]}]}))],
            vec![tcp(80, vec![deny("x/a", "*"), deny("*", "y/a"), deny("*", "y/b"), allow("x/a", "y/a")])]),
        simple("T29", "enforce egress policy allowing traffic to a server in a different namespace based on PodSelector and NamespaceSelector",
            vec![xa_egress("allow-to-ns-y-pod-a", json!([{"to": [{"namespaceSelector": ns_is("y"), "podSelector": pod_is("a")}]}]))],
            vec![tcp(80, vec![deny("x/a", "*"), allow("x/a", "y/a")])]),
        simple("T30", "enforce ingress policy allowing any port traffic to a server on a specific protocol",
            vec![xa_ingress("allow-ingress-by-proto", json!([{"ports": [{"protocol": "TCP"}]}]))],
            vec![tcp(80, vec![]), on(Udp, 80, vec![deny("*", "x/a")])]),
        case("T31", "enforce multiple ingress policies with ingress allow-all policy taking precedence", vec![
            step(vec![up(all_ingress("x", "allow-ingress-port-80", json!([{"ports": [{"port": 80}]}])))],
                 vec![tcp(81, vec![deny("*", "x/*")])]),
            step(vec![up(all_ingress("x", "allow-ingress", json!([{}])))], vec![tcp(81, vec![])]),
        ]),
        case("T32", "enforce multiple egress policies with egress allow-all policy taking precedence", vec![
            step(vec![up(all_egress("x", "allow-egress-port-80", json!([{"ports": [{"port": 80}]}])))],
                 vec![tcp(81, vec![deny("x/*", "*")])]),
            step(vec![up(all_egress("x", "allow-egress", json!([{}])))], vec![tcp(81, vec![])]),
        ]),
        case("T33", "stop enforcing policies after they are deleted", vec![
            step(vec![up(policy("x", "deny-all", json!({"podSelector": {}, "policyTypes": ["Ingress", "Egress"],
                                                         "ingress": [], "egress": []})))],
                 vec![tcp(80, vec![deny("*", "x/*"), deny("x/*", "*")])]),
            step(vec![Action::DeletePolicy(PolicyKey::new("x", "deny-all"))], vec![tcp(80, vec![])]),
        ]),
        simple("T34", "allow egress access to server in CIDR block",
            vec![xa_egress("allow-client-a-via-cidr-egress-rule", json!([{"to": [{"ipBlock": {"cidr": "{y/b}/host"}}]}]))],
            vec![tcp(80, vec![deny("x/a", "*"), allow("x/a", "y/b")])]),
        simple("T35", "enforce except clause while egress access to server in CIDR block",
            vec![t35.clone()],
            vec![tcp(80, vec![deny("x/a", "x/b")])]),
        case("T36", "ensure an IP overlapping both IPBlock.CIDR and IPBlock.Except is allowed", vec![
            step(vec![up(t35)], vec![tcp(80, vec![deny("x/a", "x/b")])]),
            step(vec![up(xa_egress("allow-client-a-via-cidr-egress-rule",
                                   json!([{"to": [{"ipBlock": {"cidr": "{x/b}/host"}}]}])))],
                 vec![tcp(80, vec![deny("x/a", "*"), allow("x/a", "x/b")])]),
        ]),
        case("T37", "check ingress and egress policies can be controlled independently based on PodSelector", vec![
            step(vec![up(xa_egress("allow-egress-for-target", json!([{}])))], vec![tcp(80, vec![])]),
            step(vec![up(xa_ingress("deny-ingress-via-isolation", json!([])))],
                 vec![tcp(80, vec![deny("*", "x/a")])]),
        ]),
        simple("T38", "not mistakenly treat 'protocol: SCTP' as 'protocol: TCP', even if the plugin doesn't support SCTP (SCTP checked: extra)",
            vec![all_ingress("x", "deny-all", json!([])),
                 xa_ingress("allow-only-sctp-ingress-on-port-81", json!([{"ports": [{"port": 81, "protocol": "SCTP"}]}]))],
            vec![tcp(81, vec![deny("*", "x/*")]), on(Sctp, 81, vec![deny("*", "x/*"), allow("*", "x/a")])]),
        simple("T39", "properly isolate pods that are selected by a policy allowing SCTP, even if the plugin doesn't support SCTP (SCTP checked: extra)",
            vec![xa_ingress("allow-only-sctp-ingress-on-port-80", json!([{"ports": [{"port": 80, "protocol": "SCTP"}]}]))],
            vec![tcp(81, vec![deny("*", "x/a")]), on(Sctp, 80, vec![])]),
        simple("T40", "not allow access by TCP when a policy specifies only UDP (UDP checked: extra)",
            vec![xa_ingress("allow-only-udp-ingress-on-port-81", json!([{"ports": [{"port": 81, "protocol": "UDP"}]}]))],
            vec![tcp(81, vec![deny("*", "x/a")]), on(Udp, 81, vec![])]),
        simple("T41", "enforce policy to allow traffic based on NamespaceSelector with MatchLabels using default ns label",
            vec![xa_ingress("allow-client-a-via-ns-selector", json!([{"from": [{"namespaceSelector": ns_is("y")}]}]))],
            vec![tcp(80, from_y())]),
        simple("T42", "enforce policy based on NamespaceSelector with MatchExpressions using default ns label",
            vec![xa_egress("allow-client-a-via-ns-selector", json!([{"to": [{"namespaceSelector": {"matchExpressions": [
                {"key": "kubernetes.io/metadata.name", "operator": "NotIn", "values": ["y"]}]}}]}]))],
            vec![tcp(80, vec![deny("x/a", "y/*")])]),
        simple("U1", "UDP: support a 'default-deny-ingress' policy",
            vec![all_ingress("x", "deny-all", json!([]))],
            vec![on(Udp, 80, vec![deny("*", "x/*")])]),
        simple("U2", "UDP: enforce policy based on Ports",
            vec![xa_ingress("allow-ingress-on-port-81-ns-x", json!([{"from": [{"namespaceSelector": ns_is("y")}],
                                                                     "ports": [{"port": 81, "protocol": "UDP"}]}]))],
            vec![on(Udp, 81, from_y())]),
        simple("U3", "UDP: enforce policy to allow traffic only from a pod in a different namespace based on PodSelector and NamespaceSelector",
            vec![xa_ingress("allow-ns-y-pod-a-via-namespace-pod-selector", y_a.clone())],
            vec![on(Udp, 80, vec![deny("*", "x/a"), allow("y/a", "x/a")])]),
        simple("S1", "SCTP: support a 'default-deny-ingress' policy",
            vec![all_ingress("x", "deny-all", json!([]))],
            vec![on(Sctp, 80, vec![deny("*", "x/*")])]),
        simple("S2", "SCTP: enforce policy based on Ports",
            vec![xa_ingress("allow-ingress-on-port-81-ns-x", json!([{"from": [{"namespaceSelector": ns_is("y")}],
                                                                     "ports": [{"port": 81, "protocol": "SCTP"}]}]))],
            vec![on(Sctp, 81, from_y())]),
        simple("S3", "SCTP: enforce policy to allow traffic only from a pod in a different namespace based on PodSelector and NamespaceSelector",
            vec![xa_ingress("allow-ns-y-pod-a-via-namespace-pod-selector", y_a)],
            vec![on(Sctp, 80, vec![deny("*", "x/a"), allow("y/a", "x/a")])]),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_is_complete_and_valid() {
        let cases = e2e_cases();
        let ids: Vec<&str> = cases.iter().map(|c| c.id).collect();
        let mut want: Vec<String> = (1..=42).map(|i| format!("T{i}")).collect();
        want.extend(["U1", "U2", "U3", "S1", "S2", "S3"].map(String::from));
        assert_eq!(ids, want);
        let by_address: Vec<&str> = cases
            .iter()
            .filter(|c| c.uses_addresses())
            .map(|c| c.id)
            .collect();
        assert_eq!(by_address, ["T34", "T35", "T36"]);
        let ip = |k: &PodKey| -> IpAddr { format!("10.244.0.{}", k.name.len()).parse().unwrap() };
        for c in &cases {
            assert!(
                !c.steps.is_empty() && c.steps.iter().all(|s| !s.checks.is_empty()),
                "{}",
                c.id
            );
            for s in &c.steps {
                for a in &s.actions {
                    if let Action::UpsertPolicy(p) = a {
                        crate::validate::validate_network_policy(&instantiate(p, ip))
                            .unwrap_or_else(|e| panic!("{}: {e}", c.id));
                    }
                }
            }
        }
    }

    #[test]
    fn world_spreads_namespaces_over_nodes() {
        let w = e2e_world();
        assert_eq!(w.len(), 9);
        for ns in NAMESPACES {
            let nodes: std::collections::BTreeSet<_> = w
                .iter()
                .filter(|p| p.key.namespace == ns)
                .map(|p| &p.node)
                .collect();
            assert_eq!(nodes.len(), 3, "{ns}");
        }
        assert_eq!(pairs().len(), 72);
    }

    #[test]
    fn patterns_and_last_match_wins() {
        let c = tcp(
            80,
            vec![deny("*", "x/a"), allow("x/b", "x/a"), deny("x/a", "*")],
        );
        let k = |s: &str| {
            let (n, p) = s.split_once('/').unwrap();
            PodKey::new(n, p)
        };
        assert!(!c.expected(&k("y/c"), &k("x/a")));
        assert!(c.expected(&k("x/b"), &k("x/a")));
        assert!(!c.expected(&k("x/a"), &k("x/b")));
        assert!(c.expected(&k("y/a"), &k("z/a")));
        assert!(Pattern::parse("x").matches(&k("x/c")));
    }

    #[test]
    fn placeholders_are_filled_per_family() {
        let p = policy(
            "x",
            "p",
            json!({"egress": [{"to": [{"ipBlock": {"cidr": "{x/b}/large", "except": ["{x/b}/host"]}}]}]}),
        );
        let v4 = instantiate(&p, |_| "10.244.2.7".parse().unwrap());
        let b = v4.spec.egress.as_ref().unwrap()[0].to.as_ref().unwrap()[0]
            .ip_block
            .clone()
            .unwrap();
        assert_eq!(
            (b.cidr.as_str(), b.except[0].as_str()),
            ("0.0.0.0/4", "10.244.2.7/32")
        );
        let v6 = instantiate(&p, |_| "fd00:10:244::2:7".parse().unwrap());
        let b = v6.spec.egress.as_ref().unwrap()[0].to.as_ref().unwrap()[0]
            .ip_block
            .clone()
            .unwrap();
        assert_eq!(
            (b.cidr.as_str(), b.except[0].as_str()),
            ("fd00:10:244::/64", "fd00:10:244::2:7/128")
        );
    }
}
