//! The cluster the network policy bench loads into etcd, generated deterministically: team
//! namespaces with the usual apps (frontend, backend, db, cache, worker), a monitoring and an
//! ingress namespace, pods as Pod records on simulated nodes (no netns needed: other nodes'
//! pods are records to a node), and NetworkPolicies of the shapes teams write (default deny,
//! allow from a tier, from a namespace, named ports, port ranges, egress to blocks with
//! excepts). Also what kube-router's per-pod iptables layout would need for the same objects,
//! computed from that layout (not measured: kube-router does not run here).

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;

use netpol::api::{IntOrString, NetworkPolicyPeer, NetworkPolicyPort};
use netpol::model::{Cluster, PodKey, PodRecord};
use netpol::selector::Selector;
use serde_json::{json, Value};

/// twilld's etcd prefix in the lab (flannel's).
pub const PREFIX: &str = "/coreos.com/network";
pub const TEAMS: usize = 50;
pub const APPS: [&str; 5] = ["frontend", "backend", "db", "cache", "worker"];
/// Policy templates per namespace (one round); see `policy`.
pub const TEMPLATES: usize = 10;
const PODS_PER_SIM_NODE: usize = 50;

pub fn team(i: usize) -> String {
    format!("team-{:02}", i % TEAMS)
}

fn tier(app: &str) -> &'static str {
    match app {
        "frontend" => "web",
        "backend" => "api",
        "db" | "cache" => "data",
        "worker" => "batch",
        _ => "infra",
    }
}

/// Small stable hash (pod-template-hash look-alike).
fn hash(s: &str) -> u32 {
    s.bytes().fold(2166136261u32, |h, b| {
        (h ^ u32::from(b)).wrapping_mul(16777619)
    })
}

/// The labels a Deployment's pods carry.
pub fn app_labels(ns: &str, app: &str, version: usize) -> BTreeMap<String, String> {
    let mut l = BTreeMap::new();
    l.insert("app".into(), app.into());
    l.insert("tier".into(), tier(app).into());
    l.insert("version".into(), format!("v{}", 1 + version % 2));
    l.insert(
        "pod-template-hash".into(),
        format!("{:08x}", hash(&format!("{ns}/{app}/{version}"))),
    );
    l
}

/// Declared container ports (Kubernetes' ContainerPort shape).
pub fn container_ports(app: &str) -> Vec<Value> {
    let mut p = vec![json!({"name": "metrics", "containerPort": 9090, "protocol": "TCP"})];
    match app {
        "frontend" | "backend" => {
            p.push(json!({"name": "http", "containerPort": 8080, "protocol": "TCP"}))
        }
        "db" => p.push(json!({"name": "postgres", "containerPort": 5432, "protocol": "TCP"})),
        "cache" => p.push(json!({"name": "redis", "containerPort": 6379, "protocol": "TCP"})),
        _ => {}
    }
    p
}

/// Namespace objects: `(name, Namespace JSON)`.
pub fn namespaces() -> Vec<(String, Value)> {
    let mut out: Vec<(String, Value)> = (0..TEAMS)
        .map(|i| {
            let env = if i % 2 == 0 { "prod" } else { "staging" };
            (team(i), json!({"team": team(i), "env": env}))
        })
        .collect();
    out.push(("monitoring".into(), json!({"role": "monitoring"})));
    out.push(("ingress".into(), json!({"role": "ingress"})));
    out.push(("bench".into(), json!({"role": "bench"})));
    out.into_iter()
        .map(|(name, labels)| {
            let v = json!({"apiVersion": "v1", "kind": "Namespace",
                           "metadata": {"name": name, "labels": labels}});
            (name, v)
        })
        .collect()
}

pub fn namespace_kvs() -> Vec<(String, String)> {
    namespaces()
        .into_iter()
        .map(|(n, v)| (format!("{PREFIX}/namespaces/{n}"), v.to_string()))
        .collect()
}

/// Simulated pod `i`: (namespace, name, Pod JSON). 1 in 52 is in monitoring, 1 in 52 in
/// ingress, the rest spread over the team namespaces and their apps; 50 per simulated node,
/// addresses in 10.64.0.0/10 (one /24 per simulated node, clear of the lab nodes' 10.0.x.0/24).
pub fn sim_pod(i: usize) -> (String, String, Value) {
    let k = i % (TEAMS + 2);
    let (ns, app) = match k {
        k if k == TEAMS => ("monitoring".to_string(), "prometheus"),
        k if k == TEAMS + 1 => ("ingress".to_string(), "ingress-nginx"),
        k => (team(k), APPS[(i / (TEAMS + 2)) % APPS.len()]),
    };
    let version = i / (TEAMS + 2) / APPS.len();
    let labels = app_labels(&ns, app, version);
    let name = format!("{app}-{}-{i}", &labels["pod-template-hash"][..6]);
    let f = i / PODS_PER_SIM_NODE;
    let ip = Ipv4Addr::new(
        10,
        64 + (f / 256) as u8,
        (f % 256) as u8,
        (2 + i % PODS_PER_SIM_NODE) as u8,
    );
    let pod = json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": ns, "labels": labels},
        "spec": {"nodeName": format!("sim-{f:03}"),
                 "containers": [{"name": app, "image": format!("registry.example/{app}:1"),
                                 "ports": container_ports(app)}]},
        "status": {"phase": "Running", "podIP": ip.to_string(),
                   "podIPs": [{"ip": ip.to_string()}]}
    });
    (ns, name, pod)
}

pub fn sim_pod_kv(i: usize) -> (String, String) {
    let (ns, name, pod) = sim_pod(i);
    (format!("{PREFIX}/pods/{ns}/{name}"), pod.to_string())
}

pub fn sim_pod_key(i: usize) -> String {
    sim_pod_kv(i).0
}

fn sel(labels: &[(&str, &str)]) -> Value {
    let m: serde_json::Map<String, Value> = labels
        .iter()
        .map(|(k, v)| (k.to_string(), json!(v)))
        .collect();
    json!({"matchLabels": m})
}

fn tcp(port: u16) -> Value {
    json!({"protocol": "TCP", "port": port})
}

/// Generated policy `g`: namespace `team((g / 10) % 50)`, template `g % 10`; a second round
/// over the namespaces (g >= 500) is variant 1 of each template (other ports, its own name).
pub fn policy(g: usize) -> (String, String, Value) {
    let ns = team(g / TEMPLATES);
    let t = g % TEMPLATES;
    let v = g / (TEMPLATES * TEAMS);
    let p = |base: u16| base + v as u16;
    let (name, spec) = match t {
        0 => (
            "default-deny-ingress",
            json!({"podSelector": {}, "policyTypes": ["Ingress"]}),
        ),
        1 => (
            "frontend-from-ingress",
            json!({"podSelector": sel(&[("app", "frontend")]), "policyTypes": ["Ingress"],
                   "ingress": [{"from": [{"namespaceSelector": sel(&[("role", "ingress")])}],
                                "ports": [tcp(p(8080))]}]}),
        ),
        2 => (
            "backend-from-frontend",
            json!({"podSelector": sel(&[("app", "backend")]), "policyTypes": ["Ingress"],
                   "ingress": [{"from": [{"podSelector": sel(&[("app", "frontend")])}],
                                "ports": [{"protocol": "TCP", "port": "http"}]}]}),
        ),
        3 => (
            "db-from-api",
            json!({"podSelector": sel(&[("app", "db")]), "policyTypes": ["Ingress"],
                   "ingress": [{"from": [{"podSelector": sel(&[("tier", "api")])}],
                                "ports": [tcp(p(5432))]}]}),
        ),
        4 => (
            "cache-from-apps",
            json!({"podSelector": sel(&[("app", "cache")]), "policyTypes": ["Ingress"],
                   "ingress": [{"from": [{"podSelector": sel(&[("app", "backend")])},
                                         {"podSelector": sel(&[("app", "worker")])}],
                                "ports": [tcp(p(6379))]}]}),
        ),
        5 => (
            "metrics-from-monitoring",
            json!({"podSelector": {}, "policyTypes": ["Ingress"],
                   "ingress": [{"from": [{"namespaceSelector": sel(&[("role", "monitoring")]),
                                          "podSelector": sel(&[("app", "prometheus")])}],
                                "ports": [{"protocol": "TCP", "port": "metrics"}]}]}),
        ),
        6 => (
            "backend-egress",
            json!({"podSelector": sel(&[("app", "backend")]), "policyTypes": ["Egress"],
                   "egress": [
                       {"to": [{"podSelector": sel(&[("app", "db")])}], "ports": [tcp(p(5432))]},
                       {"to": [{"podSelector": sel(&[("app", "cache")])}], "ports": [tcp(p(6379))]},
                       {"to": [{"namespaceSelector": {}, "podSelector": sel(&[("k8s-app", "kube-dns")])}],
                        "ports": [{"protocol": "UDP", "port": 53}, {"protocol": "TCP", "port": 53}]},
                       {"to": [{"ipBlock": {"cidr": "192.0.2.0/24"}}], "ports": [tcp(443)]}]}),
        ),
        7 => (
            "worker-egress-external",
            json!({"podSelector": sel(&[("app", "worker")]), "policyTypes": ["Egress"],
                   "egress": [{"to": [{"ipBlock": {"cidr": "0.0.0.0/0",
                                       "except": ["10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16"]}}],
                               "ports": [tcp(443)]},
                              {"to": [{"podSelector": sel(&[("app", "cache")])}],
                               "ports": [tcp(p(6379))]}]}),
        ),
        8 => (
            "web-from-same-namespace",
            json!({"podSelector": sel(&[("tier", "web")]), "policyTypes": ["Ingress"],
                   "ingress": [{"from": [{"podSelector": {}}]}]}),
        ),
        _ => (
            "frontend-from-staging-frontends",
            json!({"podSelector": sel(&[("app", "frontend")]), "policyTypes": ["Ingress"],
                   "ingress": [{"from": [{"namespaceSelector": sel(&[("env", "staging")]),
                                          "podSelector": sel(&[("app", "frontend")])}],
                                "ports": [{"protocol": "TCP", "port": p(8080), "endPort": p(8090)}]}]}),
        ),
    };
    let name = if v == 0 {
        name.to_string()
    } else {
        format!("{name}-v{v}")
    };
    let pol = json!({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
                     "metadata": {"name": name, "namespace": ns}, "spec": spec});
    (ns, name, pol)
}

pub fn policy_kv(g: usize) -> (String, String) {
    let (ns, name, pol) = policy(g);
    (format!("{PREFIX}/policies/{ns}/{name}"), pol.to_string())
}

// ---------------------------------------------------------------------------------------------
// kube-router's iptables layout, counted

/// What kube-router's iptables network policy controller programs on one node for a cluster,
/// per its layout (pkg/controllers/netpol: `syncNetworkPolicyChains`, `processIngressRules`,
/// `processEgressRules`, `appendRuleToPolicyChain`, `syncPodFirewallChains`), IPv4 only, not
/// counting its fixed top-level chains (a handful of rules).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct KubeRouter {
    pub chains: usize,
    pub rules: usize,
    pub ipsets: usize,
    pub members: usize,
}

fn peer_pods(c: &Cluster, policy_ns: &str, peers: &[NetworkPolicyPeer]) -> BTreeSet<PodKey> {
    let mut out = BTreeSet::new();
    for p in peers {
        if p.ip_block.is_some() {
            continue;
        }
        let pods = match &p.pod_selector {
            Some(s) => Selector::parse(s).unwrap_or_else(|_| Selector::everything()),
            None => Selector::everything(),
        };
        let nss: Vec<String> = match &p.namespace_selector {
            None => vec![policy_ns.to_string()],
            Some(s) => {
                let s = Selector::parse(s).unwrap_or_else(|_| Selector::everything());
                c.namespaces_with_pods()
                    .filter(|ns| s.matches(&c.namespace_labels(ns)))
                    .map(str::to_string)
                    .collect()
            }
        };
        for ns in &nss {
            for (k, r) in c.pods_in_namespace(ns) {
                if r.is_live() && pods.matches(&r.labels) {
                    out.insert(k.clone());
                }
            }
        }
    }
    out
}

/// (name, port) endpoints of a named port over `pods`: kube-router makes one ipset and one
/// rule pair per distinct resolved (protocol, port), holding the pods that expose it.
fn named_endpoints<'a>(
    pods: impl Iterator<Item = &'a PodRecord>,
    name: &str,
) -> BTreeMap<u16, usize> {
    let mut eps: BTreeMap<u16, usize> = BTreeMap::new();
    for p in pods {
        for cp in &p.ports {
            if cp.name.as_deref() == Some(name) {
                *eps.entry(cp.port).or_default() += p.ips.len();
            }
        }
    }
    eps
}

/// One ingress or egress rule: (rules, ipsets, members) kube-router adds to the policy chain.
fn rule_cost(
    c: &Cluster,
    policy_ns: &str,
    peers: Option<&Vec<NetworkPolicyPeer>>,
    ports: Option<&Vec<NetworkPolicyPort>>,
    targets: &[&PodRecord],
) -> (usize, usize, usize) {
    let peers: &[NetworkPolicyPeer] = peers.map(Vec::as_slice).unwrap_or(&[]);
    let ports: &[NetworkPolicyPort] = ports.map(Vec::as_slice).unwrap_or(&[]);
    let pods = peer_pods(c, policy_ns, peers);
    let numeric = ports
        .iter()
        .filter(|p| !matches!(p.port, Some(IntOrString::String(_))))
        .count();
    // Named ports resolve on the destination: the targets for ingress (the caller passes the
    // peers' records for egress).
    let mut named_sets = 0;
    let mut named_members = 0;
    for p in ports {
        if let Some(IntOrString::String(name)) = &p.port {
            for (_, n) in named_endpoints(targets.iter().copied(), name) {
                named_sets += 1;
                named_members += n;
            }
        }
    }
    let per_source = if ports.is_empty() {
        2
    } else {
        2 * (numeric + named_sets)
    };
    let (mut rules, mut sets, mut members) = (0, 0, 0);
    if peers.is_empty() {
        rules += per_source;
        sets += named_sets;
        members += named_members;
    }
    if !pods.is_empty() {
        sets += 1 + named_sets;
        members += pods.len() + named_members;
        rules += per_source;
    }
    let blocks: Vec<_> = peers.iter().filter_map(|p| p.ip_block.as_ref()).collect();
    if !blocks.is_empty() {
        sets += 1;
        // ipset cannot hold /0: kube-router writes it as two /1 entries; excepts are
        // `nomatch` entries of the same hash:net set.
        members += blocks
            .iter()
            .map(|b| if b.cidr.ends_with("/0") { 2 } else { 1 } + b.except.len())
            .sum::<usize>();
        rules += per_source;
    }
    (rules, sets, members)
}

/// kube-router's counts on `node` for cluster `c`: a chain per policy of the cluster (every
/// node builds them all), a target ipset per direction with the policy's pods cluster-wide, per
/// rule a peer ipset with the matching pods' addresses and two iptables rules (MARK, RETURN) per
/// port; a firewall chain per local pod some policy selects, with a jump per policy and the
/// jumps into it from FORWARD/OUTPUT/INPUT.
pub fn kube_router(c: &Cluster, node: &str) -> KubeRouter {
    let mut k = KubeRouter::default();
    // Per local pod: (ingress policies, egress policies) selecting it.
    let mut local: BTreeMap<PodKey, (usize, usize)> = c
        .pods_on_node(node)
        .filter(|(_, p)| p.is_live())
        .map(|(key, _)| (key.clone(), (0, 0)))
        .collect();
    for (pk, pol) in c.policies() {
        let Ok(sel) = Selector::parse(&pol.spec.pod_selector) else {
            continue;
        };
        let targets: Vec<(&PodKey, &PodRecord)> = c
            .pods_in_namespace(&pk.namespace)
            .filter(|(_, p)| p.is_live() && sel.matches(&p.labels))
            .collect();
        let recs: Vec<&PodRecord> = targets.iter().map(|(_, p)| *p).collect();
        let types = pol.spec.effective_types();
        k.chains += 1;
        if types.ingress {
            k.ipsets += 1;
            k.members += targets.len();
            for r in pol.spec.ingress.iter().flatten() {
                let (ru, s, m) =
                    rule_cost(c, &pk.namespace, r.from.as_ref(), r.ports.as_ref(), &recs);
                k.rules += ru;
                k.ipsets += s;
                k.members += m;
            }
        }
        if types.egress {
            k.ipsets += 1;
            k.members += targets.len();
            for r in pol.spec.egress.iter().flatten() {
                let peers: Vec<&PodRecord> =
                    peer_pods(c, &pk.namespace, r.to.as_deref().unwrap_or(&[]))
                        .iter()
                        .filter_map(|key| c.pod(key))
                        .collect();
                let (ru, s, m) =
                    rule_cost(c, &pk.namespace, r.to.as_ref(), r.ports.as_ref(), &peers);
                k.rules += ru;
                k.ipsets += s;
                k.members += m;
            }
        }
        for (key, _) in &targets {
            if let Some(e) = local.get_mut(*key) {
                if types.ingress {
                    e.0 += 1;
                }
                if types.egress {
                    e.1 += 1;
                }
            }
        }
    }
    for (_, (i, e)) in local {
        if i > 0 {
            // Jumps per policy, local-node accept, stateful accept, FORWARD/OUTPUT/bridged
            // FORWARD jumps into the chain, NFLOG, REJECT, mark reset.
            k.chains += 1;
            k.rules += i + 2 + 3 + 3;
        }
        if e > 0 {
            if i == 0 {
                k.chains += 1;
                k.rules += 3;
            }
            // Jumps per policy, stateful accept, INPUT/FORWARD/OUTPUT/bridged FORWARD jumps.
            k.rules += e + 1 + 4;
        }
    }
    k
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cluster(pods: usize, policies: usize) -> Cluster {
        let mut c = Cluster::new();
        for (_, ns) in namespaces() {
            let ns: netpol::api::Namespace = serde_json::from_value(ns).unwrap();
            c.upsert_namespace(&ns).unwrap();
        }
        for i in 0..pods {
            let pod: netpol::api::Pod = serde_json::from_value(sim_pod(i).2).unwrap();
            c.upsert_pod(&pod).unwrap();
        }
        for g in 0..policies {
            let p: netpol::api::NetworkPolicy = serde_json::from_value(policy(g).2).unwrap();
            c.upsert_policy(p).unwrap();
        }
        c
    }

    #[test]
    fn every_generated_object_is_valid_and_distinct() {
        let c = cluster(5000, 1000);
        assert_eq!(c.pods().count(), 5000);
        assert_eq!(c.policies().count(), 1000);
        let ips: BTreeSet<_> = c.pods().flat_map(|(_, p)| p.ips.clone()).collect();
        assert_eq!(ips.len(), 5000);
        // Pods spread over every team namespace and app, monitoring and ingress included.
        assert!(c.pods_in_namespace("monitoring").count() > 50);
        assert!(c.pods_in_namespace("team-49").count() > 50);
    }

    #[test]
    fn kube_router_counts_follow_its_layout() {
        // One policy: default deny ingress in team-00 (no rules): a chain and the target set.
        let mut c = cluster(104, 1);
        let k = kube_router(&c, "sim-000");
        let in_team0 = c.pods_in_namespace("team-00").count();
        assert_eq!(k.ipsets, 1);
        assert_eq!(k.members, in_team0);
        // Pods of team-00 on sim-000: a firewall chain each with 9 rules (1 jump + 8).
        let local = c
            .pods_on_node("sim-000")
            .filter(|(k, _)| k.namespace == "team-00")
            .count();
        assert!(local > 0);
        assert_eq!(k.chains, 1 + local);
        assert_eq!(k.rules, 9 * local);
        // frontend-from-ingress: a rule pair for port 8080 with the ingress pods as peers.
        let p: netpol::api::NetworkPolicy = serde_json::from_value(policy(1).2).unwrap();
        c.upsert_policy(p).unwrap();
        let k2 = kube_router(&c, "nowhere");
        let ingress = c.pods_in_namespace("ingress").count();
        let frontends = c
            .pods_in_namespace("team-00")
            .filter(|(_, p)| p.labels["app"] == "frontend")
            .count();
        assert_eq!(k2.chains, 2);
        assert_eq!(k2.rules, 2);
        assert_eq!(k2.ipsets, 3);
        assert_eq!(k2.members, in_team0 + frontends + ingress);
    }
}
