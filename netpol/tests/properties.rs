//! Property tests over random clusters (namespaces, labelled pods on nodes with IPv4 and IPv6
//! addresses, hostNetwork and unscheduled pods) and random valid policies:
//! - every flow between pods, nodes and external addresses, in both families, gets the same
//!   answer from the oracle and from the compiled programs of the nodes it crosses;
//! - a diff replays one program into the next; a remote pod coming or going changes only set
//!   elements; rewriting one policy's rules changes only that policy's chains and sets.

mod common;

use std::collections::BTreeSet;
use std::net::IpAddr;

use ipnet::IpNet;
use netpol::api::{
    IntOrString, IpBlock, LabelSelector, LabelSelectorRequirement, Labels, NetworkPolicy,
    NetworkPolicyEgressRule, NetworkPolicyIngressRule, NetworkPolicyPeer, NetworkPolicyPort,
    NetworkPolicySpec, ObjectMeta,
};
use netpol::model::{
    Cluster, ContainerPort, Direction, Family, PodKey, PodRecord, PolicyKey, Protocol, Transport,
};
use netpol::oracle::{evaluate, explain, Decision, Endpoint, Exemption, Flow};
use netpol::program::{
    closed_first, compile, diff, group_chain_name, isolating, pod_added, pod_removed,
    policy_chain_name, Chain, NodeProgram, PENDING,
};
use netpol::validate::validate_network_policy;
use proptest::collection::{btree_map, vec};
use proptest::option;
use proptest::prelude::*;
use proptest::sample::{select, subsequence};
use proptest::test_runner::FileFailurePersistence;

const NAMESPACES: [&str; 3] = ["x", "y", "z"];
const NODES: [&str; 3] = ["n1", "n2", "n3"];
const POD_KEYS: [&str; 2] = ["app", "tier"];
const POD_VALUES: [&str; 2] = ["a", "b"];
const NS_KEYS: [&str; 3] = ["app", "tier", "kubernetes.io/metadata.name"];
const NS_VALUES: [&str; 4] = ["a", "b", "x", "y"];
const CIDRS: [&str; 13] = [
    "10.0.0.0/27",
    // One pod's own address as a block: a set element that is the block's, not the pod's.
    "10.0.0.7/32",
    "fd00::7/128",
    "10.0.0.0/28",
    "10.0.0.16/28",
    "10.0.0.0/24",
    "0.0.0.0/0",
    "192.168.0.0/30",
    "fd00::/123",
    "fd00::10/124",
    "fd00::/64",
    "::/0",
    "fd00:ff::/126",
];
/// (name, port, protocol) a pod may declare.
const DECLS: [(Option<&str>, u16, Protocol); 6] = [
    (Some("http"), 80, Protocol::Tcp),
    (Some("http"), 8080, Protocol::Udp),
    (Some("dns"), 53, Protocol::Udp),
    (Some("dns"), 53, Protocol::Tcp),
    (Some("alt"), 81, Protocol::Sctp),
    (None, 81, Protocol::Tcp),
];
const TRANSPORTS: [Transport; 12] = [
    Transport::Tcp(79),
    Transport::Tcp(80),
    Transport::Tcp(81),
    Transport::Tcp(8080),
    Transport::Udp(53),
    Transport::Udp(80),
    Transport::Udp(8080),
    Transport::Sctp(81),
    Transport::Tcp(53),
    Transport::Icmp { kind: 8 },
    Transport::Icmp { kind: 135 },
    Transport::Other(47),
];

fn node_ip(node: usize, family: Family) -> IpAddr {
    match family {
        Family::V4 => format!("192.168.0.{}", node + 1).parse().unwrap(),
        Family::V6 => format!("fd00:ff::{}", node + 1).parse().unwrap(),
    }
}

fn externals(family: Family) -> [IpAddr; 2] {
    match family {
        Family::V4 => ["10.0.0.200".parse().unwrap(), "172.16.0.1".parse().unwrap()],
        Family::V6 => ["fd00::c8".parse().unwrap(), "2001:db8::1".parse().unwrap()],
    }
}

// ---------------------------------------------------------------------------------------------
// Strategies

fn labels(
    keys: &'static [&'static str],
    values: &'static [&'static str],
) -> impl Strategy<Value = Labels> {
    btree_map(
        select(keys).prop_map(String::from),
        select(values).prop_map(String::from),
        0..=2,
    )
}

/// Selectors over a vocabulary the labels use, so that they match sometimes and miss sometimes;
/// a third are empty (everything).
fn selector_over(
    keys: &'static [&'static str],
    values: &'static [&'static str],
) -> impl Strategy<Value = LabelSelector> {
    let expr = (
        select(keys),
        select(&["In", "NotIn", "Exists", "DoesNotExist"][..]),
        subsequence(values.to_vec(), 1..=2),
    )
        .prop_map(|(k, op, vals)| LabelSelectorRequirement {
            key: k.into(),
            operator: op.into(),
            values: if op == "In" || op == "NotIn" {
                vals.into_iter().map(String::from).collect()
            } else {
                vec![]
            },
        });
    let some = (
        btree_map(
            select(keys).prop_map(String::from),
            select(values).prop_map(String::from),
            0..=1,
        ),
        vec(expr, 0..=1),
    )
        .prop_map(|(match_labels, match_expressions)| LabelSelector {
            match_labels,
            match_expressions,
        });
    prop_oneof![1 => Just(LabelSelector::default()), 2 => some]
}

fn pod_selector() -> impl Strategy<Value = LabelSelector> {
    selector_over(&POD_KEYS, &POD_VALUES)
}

fn ns_selector() -> impl Strategy<Value = LabelSelector> {
    selector_over(&NS_KEYS, &NS_VALUES)
}

fn ip_block() -> impl Strategy<Value = IpBlock> {
    (select(&CIDRS[..]), vec((any::<u128>(), 1u8..=5), 0..=2)).prop_map(|(cidr, ex)| {
        let net: IpNet = cidr.parse().unwrap();
        let except = ex
            .into_iter()
            .filter_map(|(r, extra)| {
                let len = net.prefix_len() + extra;
                if len > net.max_prefix_len() {
                    return None;
                }
                let addr = match net {
                    IpNet::V4(n) => {
                        let host = u32::from(n.hostmask()) & (r as u32);
                        IpAddr::from((u32::from(n.network()) | host).to_be_bytes())
                    }
                    IpNet::V6(n) => {
                        let host = u128::from(n.hostmask()) & r;
                        IpAddr::from((u128::from(n.network()) | host).to_be_bytes())
                    }
                };
                Some(IpNet::new(addr, len).unwrap().trunc().to_string())
            })
            .collect();
        IpBlock {
            cidr: cidr.into(),
            except,
        }
    })
}

fn peer() -> impl Strategy<Value = NetworkPolicyPeer> {
    prop_oneof![
        pod_selector().prop_map(|s| NetworkPolicyPeer {
            pod_selector: Some(s),
            ..Default::default()
        }),
        ns_selector().prop_map(|s| NetworkPolicyPeer {
            namespace_selector: Some(s),
            ..Default::default()
        }),
        (pod_selector(), ns_selector()).prop_map(|(p, n)| NetworkPolicyPeer {
            pod_selector: Some(p),
            namespace_selector: Some(n),
            ..Default::default()
        }),
        ip_block().prop_map(|b| NetworkPolicyPeer {
            ip_block: Some(b),
            ..Default::default()
        }),
    ]
}

fn port() -> impl Strategy<Value = NetworkPolicyPort> {
    let proto =
        || option::of(select(&["TCP", "UDP", "SCTP"][..])).prop_map(|p| p.map(String::from));
    let numeric = (
        proto(),
        select(&[53, 79, 80, 81, 8080][..]),
        option::of(select(&[0, 1, 2, 100][..])),
    )
        .prop_map(|(protocol, port, end)| NetworkPolicyPort {
            protocol,
            port: Some(IntOrString::Int(port)),
            end_port: end.map(|d| port + d),
        });
    // Named ports mostly with the protocol some pod declares them with, so that they resolve.
    let named = select(
        &[
            ("http", None),
            ("http", Some("TCP")),
            ("http", Some("UDP")),
            ("dns", Some("UDP")),
            ("dns", None),
            ("alt", Some("SCTP")),
            ("alt", None),
            ("nope", None),
        ][..],
    )
    .prop_map(|(name, proto)| NetworkPolicyPort {
        protocol: proto.map(String::from),
        port: Some(IntOrString::String(name.into())),
        end_port: None,
    });
    let any_port = proto().prop_map(|protocol| NetworkPolicyPort {
        protocol,
        port: None,
        end_port: None,
    });
    prop_oneof![1 => any_port, 2 => numeric, 2 => named]
}

type RuleGen = (
    Option<Vec<NetworkPolicyPeer>>,
    Option<Vec<NetworkPolicyPort>>,
);

fn rules() -> impl Strategy<Value = Option<Vec<RuleGen>>> {
    option::of(vec(
        (
            option::of(vec(peer(), 0..=2)),
            option::of(vec(port(), 0..=2)),
        ),
        0..=2,
    ))
}

fn spec() -> impl Strategy<Value = NetworkPolicySpec> {
    let types = prop_oneof![
        Just(None),
        Just(Some(vec!["Ingress"])),
        Just(Some(vec!["Egress"])),
        Just(Some(vec!["Ingress", "Egress"])),
    ];
    (pod_selector(), rules(), rules(), types).prop_map(|(pod_selector, ingress, egress, types)| {
        NetworkPolicySpec {
            pod_selector,
            ingress: ingress.map(|rs| {
                rs.into_iter()
                    .map(|(from, ports)| NetworkPolicyIngressRule { from, ports })
                    .collect()
            }),
            egress: egress.map(|rs| {
                rs.into_iter()
                    .map(|(to, ports)| NetworkPolicyEgressRule { to, ports })
                    .collect()
            }),
            policy_types: types.map(|t| t.into_iter().map(String::from).collect()),
        }
    })
}

#[derive(Debug, Clone)]
struct PodGen {
    ns: usize,
    node: Option<usize>,
    labels: Labels,
    v4: bool,
    v6: bool,
    host_network: bool,
    decls: Vec<usize>,
}

fn pod() -> impl Strategy<Value = PodGen> {
    (
        0..3usize,
        prop_oneof![9 => (0..3usize).prop_map(Some), 1 => Just(None)],
        labels(&POD_KEYS, &POD_VALUES),
        prop_oneof![4 => Just((true, true)), 2 => Just((true, false)), 2 => Just((false, true)), 1 => Just((false, false))],
        prop::bool::weighted(0.1),
        subsequence((0..DECLS.len()).collect::<Vec<_>>(), 0..=4),
    )
        .prop_map(|(ns, node, labels, (v4, v6), host_network, decls)| PodGen {
            ns,
            node,
            labels,
            v4,
            v6,
            host_network,
            decls,
        })
}

#[derive(Debug, Clone)]
struct World {
    ns_labels: [Labels; 3],
    pods: Vec<PodGen>,
    /// Pod i's host part: 10.0.0.<n> and fd00::<n>, all distinct.
    addrs: Vec<u8>,
    policies: Vec<(usize, NetworkPolicySpec)>,
}

fn world() -> impl Strategy<Value = World> {
    (
        [
            labels(&POD_KEYS, &POD_VALUES),
            labels(&POD_KEYS, &POD_VALUES),
            labels(&POD_KEYS, &POD_VALUES),
        ],
        vec(pod(), 0..=8),
        Just((1u8..=31).collect::<Vec<u8>>()).prop_shuffle(),
        vec((0..3usize, spec()), 0..=4),
    )
        .prop_map(|(ns_labels, pods, addrs, policies)| World {
            ns_labels,
            pods,
            addrs,
            policies,
        })
}

fn pod_key(i: usize, p: &PodGen) -> PodKey {
    PodKey::new(NAMESPACES[p.ns], format!("p{i}"))
}

fn pod_record(w: &World, i: usize) -> PodRecord {
    let p = &w.pods[i];
    let mut ips = Vec::new();
    if p.host_network {
        if let Some(n) = p.node {
            ips.push(node_ip(n, Family::V4));
            ips.push(node_ip(n, Family::V6));
        }
    } else {
        if p.v4 {
            ips.push(format!("10.0.0.{}", w.addrs[i]).parse().unwrap());
        }
        if p.v6 {
            ips.push(format!("fd00::{:x}", w.addrs[i]).parse().unwrap());
        }
    }
    PodRecord {
        labels: p.labels.clone(),
        ips,
        node: p.node.map(|n| NODES[n].to_string()),
        host_network: p.host_network,
        ports: p
            .decls
            .iter()
            .map(|d| {
                let (name, port, protocol) = DECLS[*d];
                ContainerPort {
                    name: name.map(String::from),
                    port,
                    protocol,
                }
            })
            .collect(),
    }
}

fn policy_object(i: usize, ns: usize, spec: &NetworkPolicySpec) -> NetworkPolicy {
    NetworkPolicy {
        api_version: Some("networking.k8s.io/v1".into()),
        kind: Some("NetworkPolicy".into()),
        metadata: ObjectMeta {
            name: format!("np{i}"),
            namespace: Some(NAMESPACES[ns].into()),
            ..Default::default()
        },
        spec: spec.clone(),
    }
}

fn build(w: &World) -> Cluster {
    let mut c = Cluster::new();
    for (i, l) in w.ns_labels.iter().enumerate() {
        c.set_namespace_labels(NAMESPACES[i], l.clone()).unwrap();
    }
    for (i, p) in w.pods.iter().enumerate() {
        c.upsert_pod_record(pod_key(i, p), pod_record(w, i))
            .unwrap();
    }
    for (i, (ns, spec)) in w.policies.iter().enumerate() {
        let p = policy_object(i, *ns, spec);
        if let Err(e) = validate_network_policy(&p) {
            panic!("generated policy is invalid: {e}\n{p:#?}");
        }
        c.upsert_policy(p).unwrap();
    }
    c
}

fn endpoints(w: &World, family: Family) -> Vec<Endpoint> {
    let mut e: Vec<Endpoint> = w
        .pods
        .iter()
        .enumerate()
        .map(|(i, p)| Endpoint::Pod(pod_key(i, p)))
        .collect();
    e.extend(NODES.iter().enumerate().map(|(n, name)| Endpoint::Node {
        name: name.to_string(),
        ip: node_ip(n, family),
    }));
    e.extend(externals(family).map(Endpoint::External));
    e
}

// ---------------------------------------------------------------------------------------------
// Properties

/// Every flow between the world's endpoints, in both families, over `transports`.
fn flows(w: &World, transports: &[Transport]) -> Vec<Flow> {
    let mut out = Vec::new();
    for family in [Family::V4, Family::V6] {
        let ends = endpoints(w, family);
        for src in &ends {
            for dst in &ends {
                out.extend(transports.iter().map(|t| Flow {
                    src: src.clone(),
                    dst: dst.clone(),
                    family,
                    transport: *t,
                }));
            }
        }
    }
    out
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 256,
        failure_persistence: Some(Box::new(FileFailurePersistence::WithSource("regressions"))),
        ..ProptestConfig::default()
    })]

    #[test]
    fn compiled_programs_agree_with_the_oracle(w in world(), transports in subsequence(TRANSPORTS.to_vec(), 4)) {
        let c = build(&w);
        let progs = common::programs(&c, NODES);
        let mut checked = 0;
        for flow in flows(&w, &transports) {
            // Flows that cannot exist (no address of the family, unscheduled pod).
            let Ok(verdict) = evaluate(&c, &flow) else { continue };
            checked += 1;
            let (kernel, hops) = common::dataplane(&c, &progs, &flow);
            prop_assert_eq!(
                verdict.allowed(), kernel,
                "{}\nhops: {:?}\nprograms:\n{}", explain(&verdict), hops,
                progs.values().map(ToString::to_string).collect::<String>()
            );
        }
        // Nodes and externals always resolve.
        prop_assert!(checked >= 2 * 25 * 4);
    }

    /// CNI ADD's fast path picks a new pod's group chains with `isolating`: it must be the
    /// choice `compile` makes.
    #[test]
    fn one_pods_isolating_policies_name_compiles_group_chains(w in world()) {
        let c = build(&w);
        for node in NODES {
            let prog = compile(&c, node);
            for (k, p) in c.pods_on_node(node).filter(|(_, p)| p.is_live()) {
                let iso = netpol::program::isolating(&c, &k.namespace, &p.labels);
                for ip in &p.ips {
                    // A shared address gets every claimant's policies: the fast path
                    // leaves those to the full compile.
                    if c.pods_with_ip(*ip).count() > 1 {
                        continue;
                    }
                    for (set, map, dir) in [
                        (&iso[0], &prog.ingress, Direction::Ingress),
                        (&iso[1], &prog.egress, Direction::Egress),
                    ] {
                        let want = (!set.is_empty())
                            .then(|| netpol::program::group_chain_name(set, dir));
                        prop_assert_eq!(map.get(ip).cloned(), want, "{} {}", k, ip);
                    }
                }
            }
        }
    }

    #[test]
    fn a_remote_pod_changes_only_set_elements(w in world(), pick in any::<prop::sample::Index>()) {
        prop_assume!(!w.pods.is_empty());
        let i = pick.index(w.pods.len());
        let full = build(&w);
        let mut without = full.clone();
        let key = pod_key(i, &w.pods[i]);
        without.remove_pod(&key);
        for node in NODES {
            let (a, b) = (compile(&full, node), compile(&without, node));
            let (down, up) = (diff(&a, &b), diff(&b, &a));
            prop_assert_eq!(&down.apply(&a), &b);
            prop_assert_eq!(&up.apply(&b), &a);
            if w.pods[i].node.map(|n| NODES[n]) != Some(node) {
                prop_assert!(down.is_elements_only(), "{node}: {down:#?}");
                prop_assert!(down.ingress.is_empty() && down.egress.is_empty() && down.local_removed.is_empty());
                prop_assert!(up.is_elements_only(), "{node}: {up:#?}");
            }
        }
    }

    /// CNI ADD's and DEL's fast paths: a pod's own delta, when there is one, is exactly the
    /// compiled difference; and there is one whenever no chain has to come or go.
    #[test]
    fn a_pods_own_delta_is_the_compiled_difference(w in world(), pick in any::<prop::sample::Index>()) {
        prop_assume!(!w.pods.is_empty());
        let i = pick.index(w.pods.len());
        let full = build(&w);
        let key = pod_key(i, &w.pods[i]);
        let mut without = full.clone();
        let rec = without.remove_pod(&key).expect("built from w");
        let unique = rec.is_live() && rec.ips.iter().all(|ip| full.pods_with_ip(*ip).count() == 1);
        for node in NODES {
            let (with, wo) = (compile(&full, node), compile(&without, node));
            let added = pod_added(&full, node, &wo, &key);
            let removed = pod_removed(&without, node, &with, &rec);
            if let Some(d) = &added {
                prop_assert_eq!(d, &diff(&wo, &with), "{} added on {}", key, node);
            }
            if let Some(d) = &removed {
                prop_assert_eq!(d, &diff(&with, &wo), "{} removed on {}", key, node);
            }
            if !unique {
                continue;
            }
            // When a delta must exist: the groups the pod needs exist without it (added), and
            // stay with other users after it (removed).
            let groups: Vec<String> = if rec.node.as_deref() == Some(node) {
                let iso = isolating(&full, &key.namespace, &rec.labels);
                iso.iter().zip([Direction::Ingress, Direction::Egress])
                    .filter(|(set, _)| !set.is_empty())
                    .map(|(set, dir)| group_chain_name(set, dir))
                    .collect()
            } else {
                Vec::new()
            };
            let needs_none = groups.iter().all(|g| wo.chains.contains_key(g));
            prop_assert_eq!(added.is_some(), needs_none, "{} added on {}", key, node);
            prop_assert_eq!(removed.is_some(), needs_none, "{} removed on {}", key, node);
        }
    }

    /// CNI ADD applies a pod's own delta closed first (its map entries to the pending chains)
    /// and opens it right after the answer: the two steps end where the delta does, and in
    /// between no flow in either family is let through that the finished program refuses.
    #[test]
    fn a_new_pod_waits_closed_and_never_more_open(w in world(), pick in any::<prop::sample::Index>(), transports in subsequence(TRANSPORTS.to_vec(), 4)) {
        prop_assume!(!w.pods.is_empty());
        let i = pick.index(w.pods.len());
        let full = build(&w);
        let key = pod_key(i, &w.pods[i]);
        let mut without = full.clone();
        without.remove_pod(&key).expect("built from w");
        let mut progs = common::programs(&full, NODES);
        for node in NODES {
            let wo = compile(&without, node);
            let Some(d) = pod_added(&full, node, &wo, &key) else { continue };
            let with = d.apply(&wo);
            let isolated = !d.ingress.added.is_empty() || !d.egress.added.is_empty();
            let (first, then) = closed_first(d);
            prop_assert_eq!(then.is_some(), isolated);
            let mid = first.apply(&wo);
            let end = then.as_ref().map_or(mid.clone(), |t| t.apply(&mid));
            prop_assert_eq!(&end, &with);
            // Every entry the pod gets waits in its direction's pending chain.
            for (map, pending) in [(&mid.ingress, PENDING[0]), (&mid.egress, PENDING[1])] {
                for (ip, g) in map {
                    let theirs = with.ingress.contains_key(ip) || with.egress.contains_key(ip);
                    if wo.ingress.get(ip) != Some(g) && wo.egress.get(ip) != Some(g) {
                        prop_assert!(theirs && g == pending, "{} -> {}", ip, g);
                    }
                }
            }
            let finished = progs.clone();
            progs.insert(node.to_string(), mid);
            for flow in flows(&w, &transports) {
                if evaluate(&full, &flow).is_err() {
                    continue;
                }
                let (closed, _) = common::dataplane(&full, &progs, &flow);
                let (open, _) = common::dataplane(&full, &finished, &flow);
                prop_assert!(!closed || open, "{:?} passes while {} waits", flow, key);
            }
            progs = finished;
        }
    }

    #[test]
    fn rewriting_a_policy_touches_only_its_chains_and_sets(
        w in world(), ingress in rules(), egress in rules(), pick in any::<prop::sample::Index>()
    ) {
        prop_assume!(!w.policies.is_empty());
        let i = pick.index(w.policies.len());
        let before = build(&w);
        // Same targets and types (made explicit, since defaulting looks at the egress rules).
        let (ns, spec) = &w.policies[i];
        let types = spec.effective_types();
        let mut new_spec = spec.clone();
        new_spec.policy_types = Some(
            [(types.ingress, "Ingress"), (types.egress, "Egress")]
                .iter().filter(|(on, _)| *on).map(|(_, t)| t.to_string()).collect(),
        );
        let mut before_explicit = before.clone();
        before_explicit.upsert_policy(policy_object(i, *ns, &new_spec)).unwrap();
        new_spec.ingress = ingress.map(|rs| rs.into_iter().map(|(from, ports)| NetworkPolicyIngressRule { from, ports }).collect());
        new_spec.egress = egress.map(|rs| rs.into_iter().map(|(to, ports)| NetworkPolicyEgressRule { to, ports }).collect());
        let mut after = before_explicit.clone();
        after.upsert_policy(policy_object(i, *ns, &new_spec)).unwrap();
        let key = PolicyKey::new(NAMESPACES[*ns], format!("np{i}"));
        let own: BTreeSet<String> =
            [Direction::Ingress, Direction::Egress].iter().map(|d| policy_chain_name(&key, *d)).collect();
        for node in NODES {
            let (a, b) = (compile(&before_explicit, node), compile(&after, node));
            prop_assert_eq!(&compile(&before, node), &a, "explicit types changed nothing");
            let d = diff(&a, &b);
            prop_assert_eq!(&d.apply(&a), &b);
            prop_assert!(d.chains_added.is_empty() && d.chains_removed.is_empty(), "{d:#?}");
            prop_assert!(d.chains_changed.keys().all(|k| own.contains(k)), "{d:#?}");
            prop_assert!(d.ingress.is_empty() && d.egress.is_empty());
            prop_assert!(d.elements.is_empty(), "members do not depend on the policy: {d:#?}");
            let refs = |p: &NodeProgram| -> BTreeSet<String> {
                own.iter().filter_map(|c| p.chains.get(c)).flat_map(|c| match c {
                    Chain::Policy { rules, .. } => rules.iter()
                        .flat_map(|r| [&r.peers, &r.ports, &r.named]).flatten().cloned().collect::<Vec<_>>(),
                    Chain::Group { .. } => vec![],
                }).collect()
            };
            prop_assert!(d.sets_added.keys().all(|s| refs(&b).contains(s)));
            prop_assert!(d.sets_removed.iter().all(|s| refs(&a).contains(s)));
        }
    }
}

/// Whether the rule a decision names has only named ports (so only named-port resolution can
/// have let the flow through).
fn by_named_port(c: &Cluster, d: &Decision, dir: Direction) -> bool {
    let Decision::Allowed { policy, rule } = d else {
        return false;
    };
    let spec = &c.policy(policy).unwrap().spec;
    let ports = match dir {
        Direction::Ingress => spec.ingress.as_ref().unwrap()[*rule].ports.as_ref(),
        Direction::Egress => spec.egress.as_ref().unwrap()[*rule].ports.as_ref(),
    };
    ports.is_some_and(|ps| {
        !ps.is_empty()
            && ps
                .iter()
                .all(|p| matches!(p.port, Some(IntOrString::String(_))))
    })
}

/// The world generator must produce the situations the properties are about.
#[test]
fn generated_worlds_cover_the_interesting_cases() {
    use proptest::strategy::ValueTree;
    use proptest::test_runner::TestRunner;
    let mut runner = TestRunner::deterministic();
    let strategy = world();
    let (mut denied, mut allowed, mut v6_denied, mut named_in, mut named_out, mut own_node) =
        (0, 0, 0, 0, 0, 0);
    for _ in 0..500 {
        let w = strategy.new_tree(&mut runner).unwrap().current();
        let c = build(&w);
        for family in [Family::V4, Family::V6] {
            for src in endpoints(&w, family) {
                for dst in endpoints(&w, family) {
                    for t in [
                        Transport::Tcp(80),
                        Transport::Udp(53),
                        Transport::Sctp(81),
                        Transport::Udp(8080),
                    ] {
                        let flow = Flow {
                            src: src.clone(),
                            dst: dst.clone(),
                            family,
                            transport: t,
                        };
                        let Ok(v) = evaluate(&c, &flow) else { continue };
                        if v.allowed() {
                            allowed += 1;
                        } else {
                            denied += 1;
                            v6_denied += (family == Family::V6) as usize;
                        }
                        named_in += by_named_port(&c, &v.ingress, Direction::Ingress) as usize;
                        named_out += by_named_port(&c, &v.egress, Direction::Egress) as usize;
                        own_node +=
                            matches!(v.ingress, Decision::Exempt(Exemption::OwnNode)) as usize;
                    }
                }
            }
        }
    }
    assert!(
        denied > 10000 && allowed > 10000,
        "denied {denied}, allowed {allowed}"
    );
    assert!(v6_denied > 3000, "{v6_denied}");
    eprintln!("denied {denied}, allowed {allowed}, v6 denied {v6_denied}, named in {named_in} out {named_out}, own node {own_node}");
    assert!(
        named_in > 20 && named_out > 20,
        "allowed by named ports: ingress {named_in}, egress {named_out}"
    );
    assert!(own_node > 50, "{own_node}");
}
