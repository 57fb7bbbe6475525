//! The per-node kernel program: what one node must enforce, as sets, chains and verdict maps, in
//! a form twilld renders to nftables (one `inet` table; every address set and map is split into
//! an IPv4 and an IPv6 half by the renderer, which appends `4` or `6` to the name).
//!
//! Packet path (the daemon builds exactly this; [`interpret`] models it):
//! ```text
//! forward, egress  (earlier priority): ct established,related accept
//!                                      icmpv6 type 133-137 accept          (neighbour discovery)
//!                                      saddr vmap @egress  -> jump grp-out-…
//! forward, ingress (later priority):   ct established,related accept
//!                                      icmpv6 type 133-137 accept
//!                                      daddr vmap @ingress -> jump grp-in-…
//! input (pod -> this node):            the egress part only
//! output:                              nothing: the node's own traffic is never filtered, which is
//!                                      how "the pod's own node is always allowed in" holds
//! grp-…:  jump pol-… for each policy isolating the pod; counter drop
//! pol-…:  one nft rule per [`Rule`]: accept when every set it names matches
//! ```
//! An `accept` inside a jumped chain ends only the current base chain (so an egress accept still
//! meets the ingress chain); a drop is final.
//!
//! Cost is linear: address sets per distinct rule peer definition (cluster-wide members), port
//! sets per distinct port list, named-port sets per distinct name list, chains per active policy
//! and per distinct policy combination, map entries per local pod address. Nothing is pods × pods.
//!
//! Names hash a set's or chain's *definition* (selectors, blocks, ports, policy identity), never
//! its members, so a pod coming or going changes only elements and map entries.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::IpNet;
use serde::Serialize;

use crate::api::{IntOrString, NetworkPolicy, NetworkPolicyPeer, NetworkPolicyPort};
use crate::model::{Cluster, Direction, Family, PodKey, PodRecord, PolicyKey, Protocol, Transport};
use crate::selector::Selector;

/// Longest name the program uses; the renderer's one-character family suffix keeps it within
/// nft's 63 bytes for sets (and chains have no suffix).
pub const MAX_NAME_LEN: usize = 62;

// ---------------------------------------------------------------------------------------------
// Elements

/// An inclusive address range.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct AddrRange<A> {
    pub first: A,
    pub last: A,
}

/// Sorted, non-overlapping address ranges of both families. Adjacent ranges are kept apart, so
/// one pod is one element whatever its neighbours' addresses.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Serialize)]
pub struct AddrRanges {
    pub v4: Vec<AddrRange<Ipv4Addr>>,
    pub v6: Vec<AddrRange<Ipv6Addr>>,
}

impl AddrRanges {
    pub fn contains(&self, ip: IpAddr) -> bool {
        match ip {
            IpAddr::V4(a) => find(&self.v4, a),
            IpAddr::V6(a) => find(&self.v6, a),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.v4.is_empty() && self.v6.is_empty()
    }

    pub fn len(&self) -> usize {
        self.v4.len() + self.v6.len()
    }

    /// Adds `ip` as a one-address range (kept sorted).
    fn push_single(&mut self, ip: IpAddr) {
        fn put<A: Ord + Copy>(v: &mut Vec<AddrRange<A>>, a: A) {
            let r = AddrRange { first: a, last: a };
            let i = v.partition_point(|x| *x < r);
            v.insert(i, r);
        }
        match ip {
            IpAddr::V4(a) => put(&mut self.v4, a),
            IpAddr::V6(a) => put(&mut self.v6, a),
        }
    }

    /// Whether `ip` is an element of its own (a pod's), not part of a wider range.
    fn has_single(&self, ip: IpAddr) -> bool {
        match ip {
            IpAddr::V4(a) => self.v4.contains(&AddrRange { first: a, last: a }),
            IpAddr::V6(a) => self.v6.contains(&AddrRange { first: a, last: a }),
        }
    }
}

fn find<A: Ord + Copy>(ranges: &[AddrRange<A>], a: A) -> bool {
    let i = ranges.partition_point(|r| r.last < a);
    ranges.get(i).is_some_and(|r| r.first <= a)
}

/// An inclusive port range of one protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct PortRange {
    pub proto: Protocol,
    pub first: u16,
    pub last: u16,
}

/// A named port resolved on a pod: (pod address, protocol, port).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct NamedPortElem {
    pub ip: IpAddr,
    pub proto: Protocol,
    pub port: u16,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
pub enum Elements {
    /// nft: `ipv4_addr` / `ipv6_addr`, flags interval.
    Addrs(AddrRanges),
    /// nft: `inet_proto . inet_service`, flags interval.
    Ports(Vec<PortRange>),
    /// nft: `ipv4_addr . inet_proto . inet_service` (and the ipv6 one).
    Named(BTreeSet<NamedPortElem>),
}

impl Elements {
    pub fn is_empty(&self) -> bool {
        match self {
            Elements::Addrs(a) => a.is_empty(),
            Elements::Ports(p) => p.is_empty(),
            Elements::Named(n) => n.is_empty(),
        }
    }

    pub fn len(&self) -> usize {
        match self {
            Elements::Addrs(a) => a.len(),
            Elements::Ports(p) => p.len(),
            Elements::Named(n) => n.len(),
        }
    }

    /// No elements, of the same kind.
    fn empty_of_kind(&self) -> Elements {
        match self {
            Elements::Addrs(_) => Elements::Addrs(AddrRanges::default()),
            Elements::Ports(_) => Elements::Ports(Vec::new()),
            Elements::Named(_) => Elements::Named(BTreeSet::new()),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Definitions (what names hash)

/// Which namespaces a pod peer draws from.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub enum NamespaceScope {
    /// podSelector alone: the policy's namespace.
    Is(String),
    Selected(Selector),
}

/// One canonical peer.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub enum PeerDef {
    Pods {
        namespaces: NamespaceScope,
        pods: Selector,
    },
    Block {
        cidr: IpNet,
        except: BTreeSet<IpNet>,
    },
}

/// Where named ports are resolved: on the destination pod, which for ingress is a local target
/// (the chain only runs for those) and for egress any pod of the cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub enum NamedScope {
    LocalPods,
    AllPods,
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub enum SetDef {
    /// The union of one rule's peers (one lookup per rule; merged, so never overlapping).
    Peers(BTreeSet<PeerDef>),
    /// A rule's numeric ports, canonical (the definition is the content).
    Ports(Vec<PortRange>),
    Named {
        scope: NamedScope,
        ports: BTreeSet<(String, Protocol)>,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
pub struct Set {
    pub def: SetDef,
    pub elements: Elements,
}

// ---------------------------------------------------------------------------------------------
// Chains

/// Accept when every named set matches: `peers` on the source (ingress) or destination (egress)
/// address, `ports` on (protocol, destination port), `named` on (destination address, protocol,
/// destination port). None matches anything. A policy rule with both numeric and named ports
/// becomes two of these.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
pub struct Rule {
    pub peers: Option<String>,
    pub ports: Option<String>,
    pub named: Option<String>,
    /// The index of the policy rule this comes from (for counters and logs).
    pub policy_rule: usize,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
pub enum Chain {
    /// One policy in one direction. No rules: matches nothing.
    Policy {
        policy: PolicyKey,
        direction: Direction,
        rules: Vec<Rule>,
    },
    /// Jump each policy chain in turn; if none accepted, count and drop.
    Group {
        direction: Direction,
        policies: Vec<String>,
    },
}

/// Everything one node enforces.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct NodeProgram {
    pub node: String,
    /// Every address of every live pod on this node (for the daemon's readiness gate and
    /// counters; no rule of the policy path uses it).
    pub local: BTreeSet<IpAddr>,
    pub sets: BTreeMap<String, Set>,
    pub chains: BTreeMap<String, Chain>,
    /// Local pod address -> ingress group chain; absent when not isolated for ingress.
    pub ingress: BTreeMap<IpAddr, String>,
    /// Local pod address -> egress group chain; absent when not isolated for egress.
    pub egress: BTreeMap<IpAddr, String>,
    /// Local addresses claimed by several pods (stale records); they get the union of the
    /// claimants' policies. The daemon should say so.
    pub shared_addresses: BTreeSet<IpAddr>,
}

// ---------------------------------------------------------------------------------------------
// Names

/// FNV-1a, 128 bits: stable across builds and platforms, and collisions are out of reach for any
/// number of definitions a cluster can hold.
fn fnv1a128(bytes: &[u8]) -> u128 {
    const OFFSET: u128 = 0x6c62272e07bb014262b821756295c58d;
    const PRIME: u128 = 0x0000000001000000000000000000013B;
    bytes
        .iter()
        .fold(OFFSET, |h, b| (h ^ u128::from(*b)).wrapping_mul(PRIME))
}

fn name_of<T: Serialize>(prefix: &str, def: &T) -> String {
    let bytes = serde_json::to_vec(def).expect("definitions serialise");
    format!("{prefix}-{:032x}", fnv1a128(&bytes))
}

fn set_name(def: &SetDef) -> String {
    let prefix = match def {
        SetDef::Peers(_) => "peer",
        SetDef::Ports(_) => "port",
        SetDef::Named { .. } => "named",
    };
    name_of(prefix, def)
}

fn dir_tag(dir: Direction) -> &'static str {
    match dir {
        Direction::Ingress => "in",
        Direction::Egress => "out",
    }
}

/// Named by the policy's identity, so editing a policy changes its chain in place.
pub fn policy_chain_name(key: &PolicyKey, dir: Direction) -> String {
    name_of(
        &format!("pol-{}", dir_tag(dir)),
        &(&key.namespace, &key.name),
    )
}

/// Named by the sorted list of policies.
pub fn group_chain_name(policies: &BTreeSet<PolicyKey>, dir: Direction) -> String {
    name_of(&format!("grp-{}", dir_tag(dir)), policies)
}

/// Whom `policy` isolates and in which directions: its podSelector and [ingress, egress].
/// None when the selector does not parse (validated on upsert, so never in practice).
fn targets(policy: &NetworkPolicy) -> Option<(Selector, [bool; 2])> {
    let sel = Selector::parse(&policy.spec.pod_selector).ok()?;
    let types = policy.spec.effective_types();
    Some((sel, [types.ingress, types.egress]))
}

const DIRECTIONS: [Direction; 2] = [Direction::Ingress, Direction::Egress];

/// The policies isolating one pod with `labels` in `namespace`, [ingress, egress]: the same
/// choice `compile` makes for every local pod, for one (CNI ADD's fast path).
pub fn isolating(
    c: &Cluster,
    namespace: &str,
    labels: &crate::api::Labels,
) -> [BTreeSet<PolicyKey>; 2] {
    let mut out: [BTreeSet<PolicyKey>; 2] = Default::default();
    for (pkey, policy) in c.policies_in_namespace(namespace) {
        let Some((sel, on)) = targets(policy) else {
            continue;
        };
        if sel.matches(labels) {
            for i in 0..2 {
                if on[i] {
                    out[i].insert(pkey.clone());
                }
            }
        }
    }
    out
}

/// What pod `key` of `c` adds to `prog`, the program compiled for `node` from `c` without that
/// pod, when only set elements and map entries move: its addresses in the peer sets that
/// select it and in the named-port sets its declared ports match, and on its own node its
/// verdict-map entries (the group chains of its policies must exist already). Equal to
/// `diff(prog, &compile(c, node))` whenever it is Some; empty for a pod that is not live (no
/// program holds one). None (compile instead) when the pod shares an address with another
/// record, or needs a chain that `prog` lacks.
pub fn pod_added(
    c: &Cluster,
    node: &str,
    prog: &NodeProgram,
    key: &PodKey,
) -> Option<ProgramDelta> {
    let rec = c.pod(key)?;
    if !rec.is_live() {
        return Some(ProgramDelta::default());
    }
    if rec
        .ips
        .iter()
        .any(|ip| prog.local.contains(ip) || c.pods_with_ip(*ip).count() > 1)
    {
        return None;
    }
    let local = rec.node.as_deref() == Some(node);
    let mut d = ProgramDelta::default();
    if local {
        d.local_added = rec.ips.iter().copied().collect();
        let iso = isolating(c, &key.namespace, &rec.labels);
        for ((policies, dir), map) in iso
            .iter()
            .zip(DIRECTIONS)
            .zip([&mut d.ingress, &mut d.egress])
        {
            if policies.is_empty() {
                continue;
            }
            let group = group_chain_name(policies, dir);
            if !prog.chains.contains_key(&group) {
                return None;
            }
            map.added
                .extend(rec.ips.iter().map(|ip| (*ip, group.clone())));
        }
    }
    let ns_labels = c.namespace_labels(&key.namespace);
    for (name, set) in &prog.sets {
        let added = match (&set.def, &set.elements) {
            (SetDef::Peers(defs), Elements::Addrs(have)) => {
                if !defs
                    .iter()
                    .any(|p| selects(p, &key.namespace, &ns_labels, rec))
                {
                    continue;
                }
                // An address inside one of the set's blocks is absorbed by it.
                let mut r = AddrRanges::default();
                for ip in rec.ips.iter().filter(|ip| !have.contains(**ip)) {
                    r.push_single(*ip);
                }
                Elements::Addrs(r)
            }
            (SetDef::Named { scope, ports }, Elements::Named(have)) => {
                if *scope == NamedScope::LocalPods && !local {
                    continue;
                }
                Elements::Named(
                    named_elems(rec, ports)
                        .filter(|e| !have.contains(e))
                        .collect(),
                )
            }
            _ => continue,
        };
        if !added.is_empty() {
            let removed = added.empty_of_kind();
            d.elements
                .insert(name.clone(), ElementsDelta { added, removed });
        }
    }
    Some(d)
}

/// The chains a pod waits in, [ingress, egress], while the chains of its policies are being
/// made or its verdict-map entries are on their way ([`closed_first`]): they drop everything.
/// The renderer makes them in every table, and puts the addresses the maps send there in
/// plain sets instead of the verdict maps; no compiled program names them.
pub const PENDING: [&str; 2] = ["pend-in", "pend-out"];

/// A new local pod's map entries to [`PENDING`] for each direction a policy isolates it in:
/// for when [`pod_added`] finds a chain missing, so that the pod is closed (more than its
/// policies say, never less) until the compile that makes the chains. None when the pod is not
/// local and live, or shares an address.
pub fn pod_pending(
    c: &Cluster,
    node: &str,
    prog: &NodeProgram,
    key: &PodKey,
) -> Option<ProgramDelta> {
    let rec = c.pod(key)?;
    if !rec.is_live()
        || rec.node.as_deref() != Some(node)
        || rec
            .ips
            .iter()
            .any(|ip| prog.local.contains(ip) || c.pods_with_ip(*ip).count() > 1)
    {
        return None;
    }
    let mut d = ProgramDelta {
        local_added: rec.ips.iter().copied().collect(),
        ..Default::default()
    };
    let iso = isolating(c, &key.namespace, &rec.labels);
    for ((policies, chain), map) in iso.iter().zip(PENDING).zip([&mut d.ingress, &mut d.egress]) {
        if !policies.is_empty() {
            map.added
                .extend(rec.ips.iter().map(|ip| (*ip, chain.to_string())));
        }
    }
    Some(d)
}

/// An own delta in two steps, for CNI ADD: the first is `d` with every new verdict-map entry
/// pointing to the [`PENDING`] chain of its direction (the pod is closed, never more open than
/// its policies say); the second moves those entries to their group chains. The daemon applies
/// the first before ADD answers and the second right after: the pending chains are reached
/// through plain address sets, while a jump added to a verdict map makes the kernel re-validate
/// every chain of the table at commit (about 0.4 ms at a hundred policies), which ADD then need
/// not wait for. Applied in turn, the two equal `d`. None for the second when `d` adds no entry
/// (the pod is isolated in no direction): `d` is then returned whole.
pub fn closed_first(d: ProgramDelta) -> (ProgramDelta, Option<ProgramDelta>) {
    let mut first = d;
    let mut then = ProgramDelta::default();
    for ((md, open), pending) in [
        (&mut first.ingress, &mut then.ingress),
        (&mut first.egress, &mut then.egress),
    ]
    .into_iter()
    .zip(PENDING)
    {
        for (ip, group) in md.added.iter_mut() {
            // An entry that replaces another is left as it is: only new addresses wait.
            if md.removed.contains(ip) || group == pending {
                continue;
            }
            open.removed.insert(*ip);
            open.added
                .insert(*ip, std::mem::replace(group, pending.to_string()));
        }
    }
    let then = (!then.is_empty()).then_some(then);
    (first, then)
}

/// What the removal of a pod whose record was `rec` takes out of `prog`, the program compiled
/// for `node` with it, `c` being the cluster without it: the mirror of [`pod_added`].
/// Empty for a pod that was not live. None (compile instead) when a chain would go (the last
/// pod of its policy combination), or another record still claims one of its addresses.
pub fn pod_removed(
    c: &Cluster,
    node: &str,
    prog: &NodeProgram,
    rec: &PodRecord,
) -> Option<ProgramDelta> {
    if !rec.is_live() {
        return Some(ProgramDelta::default());
    }
    if rec.ips.iter().any(|ip| c.pods_with_ip(*ip).count() > 0) {
        return None;
    }
    let local = rec.node.as_deref() == Some(node);
    let mut d = ProgramDelta::default();
    if local {
        d.local_removed = rec
            .ips
            .iter()
            .filter(|ip| prog.local.contains(ip))
            .copied()
            .collect();
        for (map, md) in [
            (&prog.ingress, &mut d.ingress),
            (&prog.egress, &mut d.egress),
        ] {
            for ip in &rec.ips {
                let Some(group) = map.get(ip) else { continue };
                // The group's last user: compile drops the chain (and maybe its policies').
                if !map
                    .iter()
                    .any(|(other, g)| g == group && !rec.ips.contains(other))
                {
                    return None;
                }
                md.removed.insert(*ip);
            }
        }
    }
    for (name, set) in &prog.sets {
        let removed = match (&set.def, &set.elements) {
            (SetDef::Peers(defs), Elements::Addrs(have)) => {
                let mut r = AddrRanges::default();
                for ip in &rec.ips {
                    let covered = defs.iter().any(|p| match p {
                        PeerDef::Block { cidr, except } => {
                            cidr.contains(ip) && !except.iter().any(|x| x.contains(ip))
                        }
                        PeerDef::Pods { .. } => false,
                    });
                    if !covered && have.has_single(*ip) {
                        r.push_single(*ip);
                    }
                }
                Elements::Addrs(r)
            }
            (SetDef::Named { .. }, Elements::Named(have)) => Elements::Named(
                have.iter()
                    .filter(|e| rec.ips.contains(&e.ip))
                    .copied()
                    .collect(),
            ),
            _ => continue,
        };
        if !removed.is_empty() {
            let added = removed.empty_of_kind();
            d.elements
                .insert(name.clone(), ElementsDelta { added, removed });
        }
    }
    Some(d)
}

/// Whether peer `p` selects a live pod `rec` in namespace `ns` (labelled `ns_labels`).
fn selects(p: &PeerDef, ns: &str, ns_labels: &crate::api::Labels, rec: &PodRecord) -> bool {
    match p {
        PeerDef::Pods { namespaces, pods } => {
            let in_scope = match namespaces {
                NamespaceScope::Is(n) => n == ns,
                NamespaceScope::Selected(sel) => sel.matches(ns_labels),
            };
            in_scope && pods.matches(&rec.labels)
        }
        PeerDef::Block { .. } => false,
    }
}

/// `rec`'s named-port elements for the (name, protocol) pairs of a named-port set.
fn named_elems<'a>(
    rec: &'a PodRecord,
    ports: &'a BTreeSet<(String, Protocol)>,
) -> impl Iterator<Item = NamedPortElem> + 'a {
    ports.iter().flat_map(move |(pname, proto)| {
        rec.named_ports(pname, *proto).flat_map(move |port| {
            rec.ips.iter().map(move |ip| NamedPortElem {
                ip: *ip,
                proto: *proto,
                port,
            })
        })
    })
}

// ---------------------------------------------------------------------------------------------
// Compile

/// The program `node` must run for the cluster as it is.
pub fn compile(c: &Cluster, node: &str) -> NodeProgram {
    let local: Vec<(&PodKey, &PodRecord)> =
        c.pods_on_node(node).filter(|(_, p)| p.is_live()).collect();
    let mut b = Builder {
        c,
        local: &local,
        sets: BTreeMap::new(),
        chains: BTreeMap::new(),
    };

    // Which policies isolate which local pod, per direction.
    let mut by_ns: BTreeMap<&str, Vec<(&PodKey, &PodRecord)>> = BTreeMap::new();
    for (k, p) in &local {
        by_ns.entry(k.namespace.as_str()).or_default().push((k, p));
    }
    let mut isolating: BTreeMap<&PodKey, [BTreeSet<PolicyKey>; 2]> = BTreeMap::new();
    let mut active: BTreeSet<(PolicyKey, Direction)> = BTreeSet::new();
    for (ns, pods) in &by_ns {
        for (pkey, policy) in c.policies_in_namespace(ns) {
            let Some((sel, on)) = targets(policy) else {
                continue;
            };
            for (k, p) in pods {
                if !sel.matches(&p.labels) {
                    continue;
                }
                let entry = isolating.entry(k).or_default();
                for (i, dir) in DIRECTIONS.into_iter().enumerate() {
                    if on[i] {
                        entry[i].insert(pkey.clone());
                        active.insert((pkey.clone(), dir));
                    }
                }
            }
        }
    }
    for (pkey, dir) in &active {
        let policy = c.policy(pkey).expect("listed by the cluster");
        b.policy_chain(pkey, policy, *dir);
    }

    // Per local address: the union of its claimants' policies (normally one claimant).
    let mut claims: BTreeMap<IpAddr, (usize, [BTreeSet<PolicyKey>; 2])> = BTreeMap::new();
    for (k, p) in &local {
        for ip in &p.ips {
            let e = claims.entry(*ip).or_default();
            e.0 += 1;
            if let Some(sets) = isolating.get(k) {
                e.1[0].extend(sets[0].iter().cloned());
                e.1[1].extend(sets[1].iter().cloned());
            }
        }
    }
    let mut prog = NodeProgram {
        node: node.to_string(),
        ..Default::default()
    };
    for (ip, (n, [ingress, egress])) in claims {
        prog.local.insert(ip);
        if n > 1 {
            prog.shared_addresses.insert(ip);
        }
        if !ingress.is_empty() {
            prog.ingress
                .insert(ip, b.group(&ingress, Direction::Ingress));
        }
        if !egress.is_empty() {
            prog.egress.insert(ip, b.group(&egress, Direction::Egress));
        }
    }
    prog.sets = b.sets;
    prog.chains = b.chains;
    prog
}

struct Builder<'a> {
    c: &'a Cluster,
    local: &'a [(&'a PodKey, &'a PodRecord)],
    sets: BTreeMap<String, Set>,
    chains: BTreeMap<String, Chain>,
}

type RuleParts<'p> = (
    Option<&'p Vec<NetworkPolicyPeer>>,
    Option<&'p Vec<NetworkPolicyPort>>,
);

impl Builder<'_> {
    fn policy_chain(&mut self, key: &PolicyKey, policy: &NetworkPolicy, dir: Direction) {
        let parts: Vec<RuleParts> = match dir {
            Direction::Ingress => policy
                .spec
                .ingress
                .iter()
                .flatten()
                .map(|r| (r.from.as_ref(), r.ports.as_ref()))
                .collect(),
            Direction::Egress => policy
                .spec
                .egress
                .iter()
                .flatten()
                .map(|r| (r.to.as_ref(), r.ports.as_ref()))
                .collect(),
        };
        let mut rules = Vec::new();
        for (i, (peers, ports)) in parts.into_iter().enumerate() {
            let peers = match peers {
                Some(list) if !list.is_empty() => Some(self.peer_set(&key.namespace, list)),
                _ => None,
            };
            let ports = ports.filter(|l| !l.is_empty());
            let Some(ports) = ports else {
                rules.push(Rule {
                    peers,
                    ports: None,
                    named: None,
                    policy_rule: i,
                });
                continue;
            };
            let mut numeric = Vec::new();
            let mut named = BTreeSet::new();
            for p in ports {
                let Some(proto) = Protocol::from_api(p.protocol.as_deref()) else {
                    continue;
                };
                match &p.port {
                    None => numeric.push(PortRange {
                        proto,
                        first: 0,
                        last: u16::MAX,
                    }),
                    Some(IntOrString::Int(n)) => {
                        let (Ok(first), Ok(last)) =
                            (u16::try_from(*n), u16::try_from(p.end_port.unwrap_or(*n)))
                        else {
                            continue;
                        };
                        numeric.push(PortRange { proto, first, last });
                    }
                    Some(IntOrString::String(name)) => {
                        named.insert((name.clone(), proto));
                    }
                }
            }
            if !numeric.is_empty() {
                let set = self.port_set(numeric);
                rules.push(Rule {
                    peers: peers.clone(),
                    ports: Some(set),
                    named: None,
                    policy_rule: i,
                });
            }
            if !named.is_empty() {
                let scope = match dir {
                    Direction::Ingress => NamedScope::LocalPods,
                    Direction::Egress => NamedScope::AllPods,
                };
                let set = self.named_set(scope, named);
                rules.push(Rule {
                    peers,
                    ports: None,
                    named: Some(set),
                    policy_rule: i,
                });
            }
        }
        let chain = Chain::Policy {
            policy: key.clone(),
            direction: dir,
            rules,
        };
        self.chains.insert(policy_chain_name(key, dir), chain);
    }

    fn group(&mut self, policies: &BTreeSet<PolicyKey>, dir: Direction) -> String {
        let name = group_chain_name(policies, dir);
        self.chains
            .entry(name.clone())
            .or_insert_with(|| Chain::Group {
                direction: dir,
                policies: policies.iter().map(|k| policy_chain_name(k, dir)).collect(),
            });
        name
    }

    fn peer_set(&mut self, policy_ns: &str, peers: &[NetworkPolicyPeer]) -> String {
        let peers: BTreeSet<PeerDef> = peers
            .iter()
            .filter_map(|p| canonical_peer(policy_ns, p))
            .collect();
        let name = set_name(&SetDef::Peers(peers.clone()));
        if !self.sets.contains_key(&name) {
            let elements = Elements::Addrs(self.peer_members(&peers));
            let def = SetDef::Peers(peers);
            self.sets.insert(name.clone(), Set { def, elements });
        }
        name
    }

    fn peer_members(&self, peers: &BTreeSet<PeerDef>) -> AddrRanges {
        let (mut v4, mut v6) = (Vec::new(), Vec::new());
        for peer in peers {
            match peer {
                PeerDef::Pods { namespaces, pods } => {
                    let nss: Vec<&str> = match namespaces {
                        NamespaceScope::Is(ns) => vec![ns.as_str()],
                        NamespaceScope::Selected(sel) => self
                            .c
                            .namespaces_with_pods()
                            .filter(|ns| sel.matches(&self.c.namespace_labels(ns)))
                            .collect(),
                    };
                    for ns in nss {
                        for (_, p) in self.c.pods_in_namespace(ns) {
                            if p.is_live() && pods.matches(&p.labels) {
                                for ip in &p.ips {
                                    let (a, f) = ip_to_u128(*ip);
                                    match f {
                                        Family::V4 => v4.push((a, a)),
                                        Family::V6 => v6.push((a, a)),
                                    }
                                }
                            }
                        }
                    }
                }
                PeerDef::Block { cidr, except } => {
                    let block =
                        subtract_all(net_range(cidr), except.iter().map(net_range).collect());
                    match cidr {
                        IpNet::V4(_) => v4.extend(block),
                        IpNet::V6(_) => v6.extend(block),
                    }
                }
            }
        }
        AddrRanges {
            v4: merge_overlapping(v4)
                .into_iter()
                .map(|(a, b)| AddrRange {
                    first: Ipv4Addr::from(a as u32),
                    last: Ipv4Addr::from(b as u32),
                })
                .collect(),
            v6: merge_overlapping(v6)
                .into_iter()
                .map(|(a, b)| AddrRange {
                    first: Ipv6Addr::from(a),
                    last: Ipv6Addr::from(b),
                })
                .collect(),
        }
    }

    fn port_set(&mut self, ranges: Vec<PortRange>) -> String {
        let mut canonical = Vec::new();
        for proto in [Protocol::Tcp, Protocol::Udp, Protocol::Sctp] {
            let of: Vec<(u128, u128)> = ranges
                .iter()
                .filter(|r| r.proto == proto)
                .map(|r| (u128::from(r.first), u128::from(r.last)))
                .collect();
            canonical.extend(merge_overlapping(of).into_iter().map(|(a, b)| PortRange {
                proto,
                first: a as u16,
                last: b as u16,
            }));
        }
        let def = SetDef::Ports(canonical.clone());
        let name = set_name(&def);
        self.sets.entry(name.clone()).or_insert(Set {
            def,
            elements: Elements::Ports(canonical),
        });
        name
    }

    fn named_set(&mut self, scope: NamedScope, ports: BTreeSet<(String, Protocol)>) -> String {
        let name = set_name(&SetDef::Named {
            scope,
            ports: ports.clone(),
        });
        if !self.sets.contains_key(&name) {
            let pods: Box<dyn Iterator<Item = &PodRecord>> = match scope {
                NamedScope::LocalPods => Box::new(self.local.iter().map(|(_, p)| *p)),
                NamedScope::AllPods => {
                    Box::new(self.c.pods().map(|(_, p)| p).filter(|p| p.is_live()))
                }
            };
            let elems = pods.flat_map(|p| named_elems(p, &ports)).collect();
            let def = SetDef::Named { scope, ports };
            self.sets.insert(
                name.clone(),
                Set {
                    def,
                    elements: Elements::Named(elems),
                },
            );
        }
        name
    }
}

fn canonical_peer(policy_ns: &str, p: &NetworkPolicyPeer) -> Option<PeerDef> {
    if let Some(b) = &p.ip_block {
        let cidr = b.cidr.parse::<IpNet>().ok()?.trunc();
        let except = b
            .except
            .iter()
            .filter_map(|x| x.parse::<IpNet>().ok())
            .map(|n| n.trunc())
            .collect();
        return Some(PeerDef::Block { cidr, except });
    }
    let namespaces = match &p.namespace_selector {
        None => NamespaceScope::Is(policy_ns.to_string()),
        Some(s) => NamespaceScope::Selected(Selector::parse(s).ok()?),
    };
    let pods = match &p.pod_selector {
        None => Selector::everything(),
        Some(s) => Selector::parse(s).ok()?,
    };
    Some(PeerDef::Pods { namespaces, pods })
}

fn ip_to_u128(ip: IpAddr) -> (u128, Family) {
    match ip {
        IpAddr::V4(a) => (u128::from(u32::from(a)), Family::V4),
        IpAddr::V6(a) => (u128::from(a), Family::V6),
    }
}

fn net_range(n: &IpNet) -> (u128, u128) {
    (ip_to_u128(n.network()).0, ip_to_u128(n.broadcast()).0)
}

/// `(first, last)` minus every range of `cuts`, in one sort and one sweep: a policy may list
/// tens of thousands of excepts, and cutting them one at a time costs their number squared.
fn subtract_all((first, last): (u128, u128), mut cuts: Vec<(u128, u128)>) -> Vec<(u128, u128)> {
    cuts.sort_unstable();
    let mut out = Vec::new();
    // The first address not yet kept or cut.
    let mut next = first;
    for (a, b) in cuts {
        if a > last {
            break;
        }
        if b < next {
            continue;
        }
        if a > next {
            out.push((next, a - 1));
        }
        if b >= last {
            return out;
        }
        next = b + 1;
    }
    out.push((next, last));
    out
}

/// `ranges` minus `cut`: the obvious version, to check `subtract_all` against.
#[cfg(test)]
fn subtract(ranges: Vec<(u128, u128)>, (a, b): (u128, u128)) -> Vec<(u128, u128)> {
    let mut out = Vec::with_capacity(ranges.len() + 1);
    for (x, y) in ranges {
        if b < x || y < a {
            out.push((x, y));
            continue;
        }
        if x < a {
            out.push((x, a - 1));
        }
        if b < y {
            out.push((b + 1, y));
        }
    }
    out
}

/// Sorts and merges overlapping ranges; touching ones stay apart.
fn merge_overlapping(mut v: Vec<(u128, u128)>) -> Vec<(u128, u128)> {
    v.sort_unstable();
    let mut out: Vec<(u128, u128)> = Vec::with_capacity(v.len());
    for (a, b) in v {
        match out.last_mut() {
            Some(last) if a <= last.1 => last.1 = last.1.max(b),
            _ => out.push((a, b)),
        }
    }
    out
}

// ---------------------------------------------------------------------------------------------
// Checks

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProgramError {
    #[error("{from} refers to {what} {name}, which does not exist or is of another kind")]
    Dangling {
        from: String,
        what: &'static str,
        name: String,
    },
    #[error("name {0:?} is not a valid nft identifier of at most {MAX_NAME_LEN} bytes")]
    BadName(String),
}

impl NodeProgram {
    /// Referential integrity and name syntax: what the renderer relies on.
    pub fn check(&self) -> Result<(), ProgramError> {
        let valid = |n: &str| {
            n.len() <= MAX_NAME_LEN
                && n.starts_with(|c: char| c.is_ascii_alphabetic())
                && n.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        };
        for name in self.sets.keys().chain(self.chains.keys()) {
            if !valid(name) {
                return Err(ProgramError::BadName(name.clone()));
            }
        }
        let set_of =
            |from: &str, name: &str, want: fn(&Elements) -> bool, what| match self.sets.get(name) {
                Some(s) if want(&s.elements) => Ok(()),
                _ => Err(ProgramError::Dangling {
                    from: from.into(),
                    what,
                    name: name.into(),
                }),
            };
        for (cname, chain) in &self.chains {
            match chain {
                Chain::Policy { rules, .. } => {
                    for r in rules {
                        if let Some(s) = &r.peers {
                            set_of(cname, s, |e| matches!(e, Elements::Addrs(_)), "address set")?;
                        }
                        if let Some(s) = &r.ports {
                            set_of(cname, s, |e| matches!(e, Elements::Ports(_)), "port set")?;
                        }
                        if let Some(s) = &r.named {
                            set_of(
                                cname,
                                s,
                                |e| matches!(e, Elements::Named(_)),
                                "named-port set",
                            )?;
                        }
                    }
                }
                Chain::Group {
                    direction,
                    policies,
                } => {
                    for p in policies {
                        match self.chains.get(p) {
                            Some(Chain::Policy { direction: d, .. }) if d == direction => {}
                            _ => {
                                return Err(ProgramError::Dangling {
                                    from: cname.clone(),
                                    what: "policy chain",
                                    name: p.clone(),
                                })
                            }
                        }
                    }
                }
            }
        }
        for (map, dir) in [
            (&self.ingress, Direction::Ingress),
            (&self.egress, Direction::Egress),
        ] {
            for (ip, g) in map {
                match self.chains.get(g) {
                    Some(Chain::Group { direction, .. }) if *direction == dir => {}
                    _ => {
                        return Err(ProgramError::Dangling {
                            from: format!("{dir} map entry {ip}"),
                            what: "group chain",
                            name: g.clone(),
                        })
                    }
                }
            }
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// Interpret

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum CtState {
    New,
    Established,
    Related,
}

/// A packet as one node's netfilter sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Packet {
    pub src: IpAddr,
    pub dst: IpAddr,
    pub transport: Transport,
    pub ct: CtState,
    /// Sent by this node's own stack (kubelet, host processes, hostNetwork pods).
    pub from_host: bool,
    /// Addressed to this node's own stack.
    pub to_host: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Hook {
    /// Host-originated: no policy chain at all.
    Output,
    /// To this node: the egress check of the sending pod.
    Input,
    /// Through this node: egress of a local sender, then ingress of a local receiver.
    Forward,
}

/// What one base chain did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub enum Step {
    NotRun,
    Established,
    NeighbourDiscovery,
    /// The address is not in the verdict map: not isolated here.
    NotInMap,
    Accepted {
        chain: String,
        rule: usize,
    },
    Dropped {
        group: String,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Outcome {
    pub hook: Hook,
    pub accepted: bool,
    pub egress: Step,
    pub ingress: Step,
}

/// Runs `pkt` through the node's hooks exactly as the rendered table would.
pub fn interpret(p: &NodeProgram, pkt: &Packet) -> Outcome {
    let hook = if pkt.from_host {
        Hook::Output
    } else if pkt.to_host {
        Hook::Input
    } else {
        Hook::Forward
    };
    let (egress, ingress) = match hook {
        Hook::Output => (Step::NotRun, Step::NotRun),
        Hook::Input => (base_chain(p, Direction::Egress, pkt), Step::NotRun),
        Hook::Forward => {
            let e = base_chain(p, Direction::Egress, pkt);
            let i = if matches!(e, Step::Dropped { .. }) {
                Step::NotRun
            } else {
                base_chain(p, Direction::Ingress, pkt)
            };
            (e, i)
        }
    };
    let accepted =
        !matches!(egress, Step::Dropped { .. }) && !matches!(ingress, Step::Dropped { .. });
    Outcome {
        hook,
        accepted,
        egress,
        ingress,
    }
}

fn base_chain(p: &NodeProgram, dir: Direction, pkt: &Packet) -> Step {
    if pkt.ct != CtState::New {
        return Step::Established;
    }
    if pkt.transport.is_neighbour_discovery(Family::of(pkt.dst)) {
        return Step::NeighbourDiscovery;
    }
    let (map, key) = match dir {
        Direction::Ingress => (&p.ingress, pkt.dst),
        Direction::Egress => (&p.egress, pkt.src),
    };
    let Some(group) = map.get(&key) else {
        return Step::NotInMap;
    };
    if let Some(Chain::Group { policies, .. }) = p.chains.get(group) {
        for pc in policies {
            let Some(Chain::Policy {
                rules, direction, ..
            }) = p.chains.get(pc)
            else {
                continue;
            };
            for (i, r) in rules.iter().enumerate() {
                if rule_matches(p, *direction, r, pkt) {
                    return Step::Accepted {
                        chain: pc.clone(),
                        rule: i,
                    };
                }
            }
        }
    }
    Step::Dropped {
        group: group.clone(),
    }
}

fn rule_matches(p: &NodeProgram, dir: Direction, r: &Rule, pkt: &Packet) -> bool {
    let elems = |name: &String| p.sets.get(name).map(|s| &s.elements);
    if let Some(s) = &r.peers {
        let addr = match dir {
            Direction::Ingress => pkt.src,
            Direction::Egress => pkt.dst,
        };
        if !matches!(elems(s), Some(Elements::Addrs(a)) if a.contains(addr)) {
            return false;
        }
    }
    if r.ports.is_some() || r.named.is_some() {
        let Some((proto, port)) = pkt.transport.port() else {
            return false;
        };
        if let Some(s) = &r.ports {
            let hit = matches!(elems(s), Some(Elements::Ports(ps))
                if ps.iter().any(|x| x.proto == proto && x.first <= port && port <= x.last));
            if !hit {
                return false;
            }
        }
        if let Some(s) = &r.named {
            let want = NamedPortElem {
                ip: pkt.dst,
                proto,
                port,
            };
            if !matches!(elems(s), Some(Elements::Named(n)) if n.contains(&want)) {
                return false;
            }
        }
    }
    true
}

// ---------------------------------------------------------------------------------------------
// Diff

/// Elements to add to and remove from a set that exists on both sides. Interval elements are
/// exact ranges: delete `removed`, then add `added`, in one transaction.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ElementsDelta {
    pub added: Elements,
    pub removed: Elements,
}

/// Map changes; a key whose target changed is in both (delete, then add).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct MapDelta {
    pub removed: BTreeSet<IpAddr>,
    pub added: BTreeMap<IpAddr, String>,
}

impl MapDelta {
    pub fn is_empty(&self) -> bool {
        self.removed.is_empty() && self.added.is_empty()
    }
}

/// What turns one program into another, for one nft transaction in this order: add sets; add
/// chains, then replace changed ones (they may jump to or name the new ones); per set, delete
/// elements, then add elements; per map, delete entries, then add them; delete chains, groups
/// before the policy chains they jump to; delete sets.
///
/// Within a set whose definition is fixed, only single pod addresses come and go: ipBlock
/// pieces are part of the definition, and a pod address inside one is absorbed by it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct ProgramDelta {
    pub local_added: BTreeSet<IpAddr>,
    pub local_removed: BTreeSet<IpAddr>,
    pub sets_added: BTreeMap<String, Set>,
    pub sets_removed: BTreeSet<String>,
    /// Element changes of sets present on both sides.
    pub elements: BTreeMap<String, ElementsDelta>,
    pub chains_added: BTreeMap<String, Chain>,
    /// New contents of chains present on both sides.
    pub chains_changed: BTreeMap<String, Chain>,
    pub chains_removed: BTreeSet<String>,
    pub ingress: MapDelta,
    pub egress: MapDelta,
    pub shared_addresses: Option<BTreeSet<IpAddr>>,
}

impl ProgramDelta {
    pub fn is_empty(&self) -> bool {
        *self == ProgramDelta::default()
    }

    /// No set or chain is added, removed or changed: only elements and map entries move.
    pub fn is_elements_only(&self) -> bool {
        self.sets_added.is_empty()
            && self.sets_removed.is_empty()
            && self.chains_added.is_empty()
            && self.chains_changed.is_empty()
            && self.chains_removed.is_empty()
    }

    /// `old` with this delta applied (the daemon's fake table and the tests use it).
    pub fn apply(&self, old: &NodeProgram) -> NodeProgram {
        let mut p = old.clone();
        self.apply_to(&mut p);
        p
    }

    /// Applies this delta to `p` in place.
    pub fn apply_to(&self, p: &mut NodeProgram) {
        p.local.retain(|ip| !self.local_removed.contains(ip));
        p.local.extend(self.local_added.iter().copied());
        for name in &self.sets_removed {
            p.sets.remove(name);
        }
        for (name, d) in &self.elements {
            if let Some(set) = p.sets.get_mut(name) {
                set.elements = apply_elements(&set.elements, d);
            }
        }
        p.sets
            .extend(self.sets_added.iter().map(|(k, v)| (k.clone(), v.clone())));
        for name in &self.chains_removed {
            p.chains.remove(name);
        }
        p.chains.extend(
            self.chains_added
                .iter()
                .map(|(k, v)| (k.clone(), v.clone())),
        );
        p.chains.extend(
            self.chains_changed
                .iter()
                .map(|(k, v)| (k.clone(), v.clone())),
        );
        for (map, d) in [
            (&mut p.ingress, &self.ingress),
            (&mut p.egress, &self.egress),
        ] {
            for ip in &d.removed {
                map.remove(ip);
            }
            map.extend(d.added.iter().map(|(k, v)| (*k, v.clone())));
        }
        if let Some(s) = &self.shared_addresses {
            p.shared_addresses = s.clone();
        }
    }
}

/// The changes from `old` to `new` (same node).
pub fn diff(old: &NodeProgram, new: &NodeProgram) -> ProgramDelta {
    let mut d = ProgramDelta {
        local_added: new.local.difference(&old.local).copied().collect(),
        local_removed: old.local.difference(&new.local).copied().collect(),
        ..Default::default()
    };
    for (name, set) in &old.sets {
        match new.sets.get(name) {
            None => {
                d.sets_removed.insert(name.clone());
            }
            // Same name, other definition: only a hash collision; replace it whole.
            Some(n) if n.def != set.def => {
                d.sets_removed.insert(name.clone());
                d.sets_added.insert(name.clone(), n.clone());
            }
            Some(n) => {
                if let Some(e) = diff_elements(&set.elements, &n.elements) {
                    d.elements.insert(name.clone(), e);
                }
            }
        }
    }
    for (name, set) in &new.sets {
        if !old.sets.contains_key(name) {
            d.sets_added.insert(name.clone(), set.clone());
        }
    }
    for (name, chain) in &old.chains {
        match new.chains.get(name) {
            None => {
                d.chains_removed.insert(name.clone());
            }
            Some(n) if n != chain => {
                d.chains_changed.insert(name.clone(), n.clone());
            }
            Some(_) => {}
        }
    }
    for (name, chain) in &new.chains {
        if !old.chains.contains_key(name) {
            d.chains_added.insert(name.clone(), chain.clone());
        }
    }
    d.ingress = diff_map(&old.ingress, &new.ingress);
    d.egress = diff_map(&old.egress, &new.egress);
    if old.shared_addresses != new.shared_addresses {
        d.shared_addresses = Some(new.shared_addresses.clone());
    }
    d
}

fn diff_map(old: &BTreeMap<IpAddr, String>, new: &BTreeMap<IpAddr, String>) -> MapDelta {
    let mut d = MapDelta::default();
    for (ip, g) in old {
        if new.get(ip) != Some(g) {
            d.removed.insert(*ip);
        }
    }
    for (ip, g) in new {
        if old.get(ip) != Some(g) {
            d.added.insert(*ip, g.clone());
        }
    }
    d
}

fn minus<T: Ord + Clone>(a: &[T], b: &[T]) -> Vec<T> {
    let b: BTreeSet<&T> = b.iter().collect();
    a.iter().filter(|x| !b.contains(x)).cloned().collect()
}

fn diff_elements(old: &Elements, new: &Elements) -> Option<ElementsDelta> {
    if old == new {
        return None;
    }
    let (added, removed) = match (old, new) {
        (Elements::Addrs(o), Elements::Addrs(n)) => (
            Elements::Addrs(AddrRanges {
                v4: minus(&n.v4, &o.v4),
                v6: minus(&n.v6, &o.v6),
            }),
            Elements::Addrs(AddrRanges {
                v4: minus(&o.v4, &n.v4),
                v6: minus(&o.v6, &n.v6),
            }),
        ),
        (Elements::Ports(o), Elements::Ports(n)) => {
            (Elements::Ports(minus(n, o)), Elements::Ports(minus(o, n)))
        }
        (Elements::Named(o), Elements::Named(n)) => (
            Elements::Named(n.difference(o).copied().collect()),
            Elements::Named(o.difference(n).copied().collect()),
        ),
        // Kinds never change under one name (the name hashes the kind's definition).
        _ => (new.clone(), old.clone()),
    };
    Some(ElementsDelta { added, removed })
}

fn apply_elements(old: &Elements, d: &ElementsDelta) -> Elements {
    fn merge<T: Ord + Clone>(old: &[T], removed: &[T], added: &[T]) -> Vec<T> {
        let mut v: Vec<T> = minus(old, removed);
        v.extend(added.iter().cloned());
        v.sort();
        v
    }
    match (old, &d.removed, &d.added) {
        (Elements::Addrs(o), Elements::Addrs(r), Elements::Addrs(a)) => {
            Elements::Addrs(AddrRanges {
                v4: merge(&o.v4, &r.v4, &a.v4),
                v6: merge(&o.v6, &r.v6, &a.v6),
            })
        }
        (Elements::Ports(o), Elements::Ports(r), Elements::Ports(a)) => {
            Elements::Ports(merge(o, r, a))
        }
        (Elements::Named(o), Elements::Named(r), Elements::Named(a)) => {
            Elements::Named(o.difference(r).chain(a.iter()).copied().collect())
        }
        _ => d.added.clone(),
    }
}

impl fmt::Display for NodeProgram {
    /// A compact listing for humans and test failure messages.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "node {}: {} local addresses",
            self.node,
            self.local.len()
        )?;
        for (name, s) in &self.sets {
            writeln!(f, "  set {name}: {} elements", s.elements.len())?;
        }
        for (name, c) in &self.chains {
            match c {
                Chain::Policy {
                    policy,
                    direction,
                    rules,
                } => {
                    writeln!(f, "  chain {name}: policy {policy} {direction}")?;
                    for r in rules {
                        writeln!(f, "    {r:?}")?;
                    }
                }
                Chain::Group {
                    direction,
                    policies,
                } => {
                    writeln!(
                        f,
                        "  chain {name}: {direction} group of {}",
                        policies.join(", ")
                    )?;
                }
            }
        }
        for (ip, g) in &self.ingress {
            writeln!(f, "  ingress {ip} -> {g}")?;
        }
        for (ip, g) in &self.egress {
            writeln!(f, "  egress {ip} -> {g}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::Labels;
    use crate::model::ContainerPort;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn labels(kv: &[(&str, &str)]) -> Labels {
        kv.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn add_pod(
        c: &mut Cluster,
        ns: &str,
        name: &str,
        node: &str,
        ips: &[&str],
        ports: Vec<ContainerPort>,
    ) {
        let rec = PodRecord {
            labels: labels(&[("pod", name)]),
            ips: ips.iter().map(|s| ip(s)).collect(),
            node: Some(node.into()),
            host_network: false,
            ports,
        };
        c.upsert_pod_record(PodKey::new(ns, name), rec).unwrap();
    }

    fn add_policy(c: &mut Cluster, ns: &str, name: &str, spec: serde_json::Value) {
        let p = serde_json::from_value(
            serde_json::json!({"metadata": {"name": name, "namespace": ns}, "spec": spec}),
        )
        .unwrap();
        c.upsert_policy(p).unwrap();
    }

    fn http() -> Vec<ContainerPort> {
        vec![ContainerPort {
            name: Some("http".into()),
            port: 8080,
            protocol: Protocol::Tcp,
        }]
    }

    /// x/a (n1, dual-stack, declares http), x/b (n2), y/a (n1), y/b (n2, declares http).
    fn cluster() -> Cluster {
        let mut c = Cluster::new();
        add_pod(&mut c, "x", "a", "n1", &["10.0.1.1", "fd00::1:1"], http());
        add_pod(&mut c, "x", "b", "n2", &["10.0.2.1", "fd00::2:1"], vec![]);
        add_pod(&mut c, "y", "a", "n1", &["10.0.1.2"], vec![]);
        add_pod(&mut c, "y", "b", "n2", &["10.0.2.2", "fd00::2:2"], http());
        c
    }

    /// A pod without an address yet (as every Kubernetes pod starts) is in no program: its
    /// coming and going are empty deltas, not compiles.
    #[test]
    fn a_pod_that_is_not_live_is_an_empty_delta() {
        let mut c = cluster();
        add_policy(
            &mut c,
            "x",
            "p",
            serde_json::json!({"podSelector": {}, "ingress": [{"from": [{"podSelector": {}}]}]}),
        );
        add_pod(&mut c, "x", "new", "n2", &[], http());
        let key = PodKey::new("x", "new");
        let mut without = c.clone();
        let rec = without.remove_pod(&key).unwrap();
        assert!(!rec.is_live());
        for node in ["n1", "n2"] {
            let (with, wo) = (compile(&c, node), compile(&without, node));
            assert_eq!(diff(&wo, &with), ProgramDelta::default());
            assert_eq!(
                pod_added(&c, node, &wo, &key),
                Some(ProgramDelta::default())
            );
            assert_eq!(
                pod_removed(&without, node, &with, &rec),
                Some(ProgramDelta::default())
            );
        }
    }

    #[test]
    fn a_pods_delta_leaves_a_block_that_is_its_own_address() {
        let mut c = cluster();
        add_policy(
            &mut c,
            "x",
            "p",
            serde_json::json!({"podSelector": {"matchLabels": {"pod": "a"}}, "ingress": [{"from": [
                {"podSelector": {"matchLabels": {"pod": "b"}}},
                {"ipBlock": {"cidr": "10.0.2.1/32"}},
            ]}]}),
        );
        let with = compile(&c, "n1");
        let key = PodKey::new("x", "b");
        let mut without = c.clone();
        let rec = without.remove_pod(&key).unwrap();
        let wo = compile(&without, "n1");
        // x/b's v6 address leaves the peer set; its v4 one stays as the block.
        let d = pod_removed(&without, "n1", &with, &rec).unwrap();
        assert_eq!(d, diff(&with, &wo));
        let [(_, e)] = d.elements.iter().collect::<Vec<_>>()[..] else {
            panic!("one set changes: {d:#?}");
        };
        let Elements::Addrs(r) = &e.removed else {
            panic!("{e:#?}")
        };
        assert!(r.v4.is_empty() && r.v6.len() == 1, "{r:#?}");
        let back = pod_added(&c, "n1", &wo, &key).unwrap();
        assert_eq!(back, diff(&wo, &with));
        // x/a is the policy's only target: its group goes with it, so no delta; added back,
        // it waits in the pending chains (ingress only: the policy has no egress).
        let a = PodKey::new("x", "a");
        let mut no_a = c.clone();
        no_a.remove_pod(&a).unwrap();
        let before = compile(&no_a, "n1");
        let p = pod_pending(&c, "n1", &before, &a).unwrap();
        let ips: BTreeSet<IpAddr> = [ip("10.0.1.1"), ip("fd00::1:1")].into();
        assert_eq!(p.local_added, ips);
        assert!(p.egress.is_empty() && p.elements.is_empty() && p.is_elements_only());
        assert_eq!(
            p.ingress.added,
            ips.iter().map(|i| (*i, PENDING[0].to_string())).collect()
        );
        // Not for a pod of another node.
        assert_eq!(pod_pending(&c, "n2", &compile(&no_a, "n2"), &a), None);
        // x/a is the policy's only target: its group goes with it, so no delta.
        let a = PodKey::new("x", "a");
        let mut no_a = c.clone();
        let rec_a = no_a.remove_pod(&a).unwrap();
        assert_eq!(pod_removed(&no_a, "n1", &with, &rec_a), None);
        assert_eq!(pod_added(&c, "n1", &compile(&no_a, "n1"), &a), None);
    }

    fn policy_chain<'a>(p: &'a NodeProgram, ns: &str, name: &str, dir: Direction) -> &'a [Rule] {
        match p
            .chains
            .get(&policy_chain_name(&PolicyKey::new(ns, name), dir))
        {
            Some(Chain::Policy { rules, .. }) => rules,
            other => panic!("no policy chain {ns}/{name} {dir}: {other:?}\n{p}"),
        }
    }

    fn addrs<'a>(p: &'a NodeProgram, set: &Option<String>) -> &'a AddrRanges {
        match &p.sets[set.as_ref().expect("a peer set")].elements {
            Elements::Addrs(a) => a,
            e => panic!("not an address set: {e:?}"),
        }
    }

    fn r4(a: &str, b: &str) -> AddrRange<Ipv4Addr> {
        AddrRange {
            first: a.parse().unwrap(),
            last: b.parse().unwrap(),
        }
    }

    fn r6(a: &str, b: &str) -> AddrRange<Ipv6Addr> {
        AddrRange {
            first: a.parse().unwrap(),
            last: b.parse().unwrap(),
        }
    }

    fn pkt(src: &str, dst: &str, t: Transport) -> Packet {
        Packet {
            src: ip(src),
            dst: ip(dst),
            transport: t,
            ct: CtState::New,
            from_host: false,
            to_host: false,
        }
    }

    #[test]
    fn subtracting_all_excepts_at_once_is_subtracting_them_one_by_one() {
        // A small LCG: many shapes of overlapping, nested, touching and outside cuts.
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = |m: u64| {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (x >> 33) % m
        };
        for _ in 0..2000 {
            let first = u128::from(next(40));
            let last = first + u128::from(next(60));
            let cuts: Vec<(u128, u128)> = (0..next(8))
                .map(|_| {
                    let a = u128::from(next(120));
                    (a, a + u128::from(next(20)))
                })
                .collect();
            let one_by_one = cuts
                .iter()
                .fold(vec![(first, last)], |r, c| subtract(r, *c));
            assert_eq!(
                subtract_all((first, last), cuts.clone()),
                one_by_one,
                "{first}-{last} minus {cuts:?}"
            );
        }
        let all = (0, u128::MAX);
        assert_eq!(
            subtract_all(all, vec![(u128::MAX, u128::MAX)]),
            vec![(0, u128::MAX - 1)]
        );
        assert_eq!(subtract_all(all, vec![(0, 0)]), vec![(1, u128::MAX)]);
        assert_eq!(subtract_all(all, vec![all]), vec![]);
        // 100,000 excepts (a hostile policy fits that many in an object) take one sort.
        let cuts: Vec<_> = (0..100_000u128).rev().map(|i| (2 * i, 2 * i)).collect();
        assert_eq!(subtract_all((0, 200_000), cuts).len(), 100_000);
    }

    #[test]
    fn range_arithmetic() {
        assert_eq!(subtract(vec![(0, 10)], (3, 5)), vec![(0, 2), (6, 10)]);
        assert_eq!(subtract(vec![(0, 10)], (0, 10)), vec![]);
        assert_eq!(subtract(vec![(0, 10)], (0, 0)), vec![(1, 10)]);
        assert_eq!(subtract(vec![(0, 10)], (10, 20)), vec![(0, 9)]);
        assert_eq!(subtract(vec![(5, 10)], (0, 4)), vec![(5, 10)]);
        assert_eq!(
            subtract(vec![(0, u128::MAX)], (u128::MAX, u128::MAX)),
            vec![(0, u128::MAX - 1)]
        );
        assert_eq!(
            merge_overlapping(vec![(5, 9), (1, 1), (2, 2), (3, 6), (20, 30), (25, 26)]),
            vec![(1, 1), (2, 2), (3, 9), (20, 30)]
        );
        let r = AddrRanges {
            v4: vec![r4("10.0.0.1", "10.0.0.1"), r4("10.0.0.8", "10.0.0.15")],
            v6: vec![],
        };
        for (a, want) in [
            ("10.0.0.0", false),
            ("10.0.0.1", true),
            ("10.0.0.2", false),
            ("10.0.0.8", true),
        ] {
            assert_eq!(r.contains(ip(a)), want, "{a}");
        }
        assert!(
            r.contains(ip("10.0.0.15")) && !r.contains(ip("10.0.0.16")) && !r.contains(ip("::1"))
        );
    }

    #[test]
    fn peer_sets_hold_the_union_of_a_rules_peers_in_both_families() {
        let mut c = cluster();
        add_policy(
            &mut c,
            "x",
            "p",
            serde_json::json!({"podSelector": {"matchLabels": {"pod": "a"}}, "ingress": [{"from": [
                {"podSelector": {"matchLabels": {"pod": "b"}}},
                {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "y"}},
                 "podSelector": {"matchLabels": {"pod": "a"}}},
                {"ipBlock": {"cidr": "192.168.0.0/24", "except": ["192.168.0.128/25", "192.168.0.5/32"]}},
                {"ipBlock": {"cidr": "10.0.2.0/24", "except": ["10.0.2.1/32"]}},
                {"ipBlock": {"cidr": "fd00:aa::/64", "except": ["fd00:aa::/65"]}}]}]}),
        );
        let p = compile(&c, "n1");
        p.check().unwrap();
        let rules = policy_chain(&p, "x", "p", Direction::Ingress);
        assert_eq!(rules.len(), 1);
        let a = addrs(&p, &rules[0].peers);
        // x/b's 10.0.2.1 is an except of the 10.0.2.0/24 block but selected by podSelector: in,
        // as its own element (touching ranges stay apart: one pod, one element).
        assert_eq!(
            a.v4,
            vec![
                r4("10.0.1.2", "10.0.1.2"),
                r4("10.0.2.0", "10.0.2.0"),
                r4("10.0.2.1", "10.0.2.1"),
                r4("10.0.2.2", "10.0.2.255"),
                r4("192.168.0.0", "192.168.0.4"),
                r4("192.168.0.6", "192.168.0.127"),
            ]
        );
        assert_eq!(
            a.v6,
            vec![
                r6("fd00::2:1", "fd00::2:1"),
                r6("fd00:aa::8000:0:0:0", "fd00:aa::ffff:ffff:ffff:ffff")
            ]
        );
        assert!(rules[0].ports.is_none() && rules[0].named.is_none());
    }

    #[test]
    fn set_names_hash_definitions_not_members() {
        let spec = serde_json::json!({"podSelector": {}, "ingress": [{"from": [{"podSelector": {}}],
                                                                        "ports": [{"port": 80}, {"port": "http"}]}]});
        let mut small = Cluster::new();
        add_pod(&mut small, "x", "a", "n1", &["10.0.1.1"], vec![]);
        add_policy(&mut small, "x", "p", spec.clone());
        let big = {
            let mut c = cluster();
            add_policy(&mut c, "x", "p", spec);
            c
        };
        let (ps, pb) = (compile(&small, "n1"), compile(&big, "n1"));
        assert_eq!(
            ps.sets.keys().collect::<Vec<_>>(),
            pb.sets.keys().collect::<Vec<_>>()
        );
        assert_eq!(ps.chains, pb.chains);
        assert_ne!(ps.sets, pb.sets, "the members differ");
        for name in pb.sets.keys().chain(pb.chains.keys()) {
            assert!(name.len() <= MAX_NAME_LEN, "{name}");
        }
        assert_eq!(compile(&big, "n1"), pb, "deterministic");
    }

    #[test]
    fn port_sets_are_canonical_and_named_ports_get_their_own_rule() {
        let mut c = cluster();
        add_policy(
            &mut c,
            "x",
            "p",
            serde_json::json!({"podSelector": {}, "ingress": [{"ports": [
                {"port": 81}, {"port": 80, "endPort": 85}, {"protocol": "UDP"}, {"protocol": "SCTP", "port": 9},
                {"port": "http"}, {"port": "dns", "protocol": "UDP"}]}]}),
        );
        let p = compile(&c, "n1");
        let rules = policy_chain(&p, "x", "p", Direction::Ingress);
        assert_eq!(rules.len(), 2, "numeric and named: two nft rules");
        let Elements::Ports(ports) = &p.sets[rules[0].ports.as_ref().unwrap()].elements else {
            panic!()
        };
        assert_eq!(
            ports,
            &vec![
                PortRange {
                    proto: Protocol::Tcp,
                    first: 80,
                    last: 85
                },
                PortRange {
                    proto: Protocol::Udp,
                    first: 0,
                    last: 65535
                },
                PortRange {
                    proto: Protocol::Sctp,
                    first: 9,
                    last: 9
                },
            ]
        );
        assert!(rules[0].named.is_none() && rules[1].ports.is_none());
        assert_eq!(rules[1].policy_rule, 0);
        let SetDef::Named { scope, ports } = &p.sets[rules[1].named.as_ref().unwrap()].def else {
            panic!()
        };
        assert_eq!(*scope, NamedScope::LocalPods);
        assert_eq!(ports.len(), 2);
    }

    #[test]
    fn named_ports_resolve_on_local_targets_for_ingress_and_on_any_pod_for_egress() {
        let mut c = cluster();
        add_policy(
            &mut c,
            "x",
            "in",
            serde_json::json!({"podSelector": {}, "ingress": [{"ports": [{"port": "http"}]}]}),
        );
        add_policy(
            &mut c,
            "y",
            "out",
            serde_json::json!({"podSelector": {}, "policyTypes": ["Egress"], "egress": [{"ports": [{"port": "http"}]}]}),
        );
        let p = compile(&c, "n1");
        let named = |ns, name, dir| {
            let r = &policy_chain(&p, ns, name, dir)[0];
            match &p.sets[r.named.as_ref().unwrap()].elements {
                Elements::Named(n) => n
                    .iter()
                    .map(|e| (e.ip, e.proto, e.port))
                    .collect::<Vec<_>>(),
                e => panic!("{e:?}"),
            }
        };
        // Ingress on n1: only x/a (local, declares http); y/b declares it too but is remote.
        assert_eq!(
            named("x", "in", Direction::Ingress),
            vec![
                (ip("10.0.1.1"), Protocol::Tcp, 8080),
                (ip("fd00::1:1"), Protocol::Tcp, 8080),
            ]
        );
        // Egress: every pod declaring it, remote ones included.
        assert_eq!(named("y", "out", Direction::Egress).len(), 4);
        let out = pkt("10.0.1.2", "10.0.2.2", Transport::Tcp(8080));
        assert!(interpret(&p, &out).accepted);
        assert!(!interpret(&p, &pkt("10.0.1.2", "10.0.2.2", Transport::Tcp(80))).accepted);
        assert!(
            !interpret(&p, &pkt("10.0.1.2", "10.0.2.1", Transport::Tcp(8080))).accepted,
            "x/b has no ports"
        );
    }

    #[test]
    fn only_policies_selecting_local_pods_compile_and_maps_follow_types() {
        let mut c = cluster();
        add_policy(
            &mut c,
            "x",
            "b-only",
            serde_json::json!({"podSelector": {"matchLabels": {"pod": "b"}}, "ingress": []}),
        );
        add_policy(
            &mut c,
            "x",
            "egress",
            serde_json::json!({"podSelector": {}, "policyTypes": ["Egress"], "egress": [{}]}),
        );
        let host = PodRecord {
            labels: labels(&[("pod", "h")]),
            ips: vec![ip("192.168.0.1")],
            node: Some("n1".into()),
            host_network: true,
            ports: vec![],
        };
        c.upsert_pod_record(PodKey::new("x", "h"), host).unwrap();
        let p = compile(&c, "n1");
        p.check().unwrap();
        // x/b lives on n2: its policy has no chain here.
        assert!(!p.chains.contains_key(&policy_chain_name(
            &PolicyKey::new("x", "b-only"),
            Direction::Ingress
        )));
        assert!(
            p.ingress.is_empty(),
            "nothing on n1 is isolated for ingress"
        );
        let egress: Vec<_> = p.egress.keys().copied().collect();
        assert_eq!(
            egress,
            vec![ip("10.0.1.1"), ip("fd00::1:1")],
            "x/a only; y/a has no policy"
        );
        assert_eq!(
            p.local.len(),
            3,
            "x/a's two addresses and y/a's; never the hostNetwork pod's"
        );
        let n2 = compile(&c, "n2");
        assert!(
            n2.ingress.contains_key(&ip("10.0.2.1")) && n2.egress.contains_key(&ip("10.0.2.1"))
        );
        assert!(
            policy_chain(&n2, "x", "b-only", Direction::Ingress).is_empty(),
            "no rules: matches nothing"
        );
    }

    #[test]
    fn pods_with_the_same_policies_share_a_group() {
        let mut c = cluster();
        add_pod(&mut c, "x", "c", "n1", &["10.0.1.3"], vec![]);
        add_policy(&mut c, "x", "all", serde_json::json!({"podSelector": {}}));
        add_policy(
            &mut c,
            "x",
            "a-only",
            serde_json::json!({"podSelector": {"matchLabels": {"pod": "a"}}}),
        );
        let p = compile(&c, "n1");
        let (a, c3) = (&p.ingress[&ip("10.0.1.1")], &p.ingress[&ip("10.0.1.3")]);
        assert_ne!(a, c3);
        assert_eq!(&p.ingress[&ip("fd00::1:1")], a);
        let Chain::Group { policies, .. } = &p.chains[a] else {
            panic!()
        };
        assert_eq!(policies.len(), 2);
        add_pod(&mut c, "x", "d", "n1", &["10.0.1.4"], vec![]);
        let p = compile(&c, "n1");
        assert_eq!(p.ingress[&ip("10.0.1.4")], p.ingress[&ip("10.0.1.3")]);
        let groups = p
            .chains
            .values()
            .filter(|c| matches!(c, Chain::Group { .. }))
            .count();
        assert_eq!(groups, 2);
    }

    #[test]
    fn hooks_model_the_packet_path() {
        let mut c = cluster();
        add_policy(
            &mut c,
            "x",
            "deny",
            serde_json::json!({"podSelector": {}, "policyTypes": ["Ingress", "Egress"]}),
        );
        let p = compile(&c, "n1");
        // y/a -> x/a, both on n1: egress of y/a not isolated, ingress of x/a drops.
        let o = interpret(&p, &pkt("10.0.1.2", "10.0.1.1", Transport::Tcp(80)));
        assert_eq!(
            (o.hook, o.accepted, &o.egress),
            (Hook::Forward, false, &Step::NotInMap)
        );
        assert!(matches!(o.ingress, Step::Dropped { .. }));
        // The node itself reaches x/a: output, never filtered.
        let from_node = Packet {
            from_host: true,
            ..pkt("192.168.0.1", "10.0.1.1", Transport::Tcp(80))
        };
        assert_eq!(interpret(&p, &from_node).hook, Hook::Output);
        assert!(interpret(&p, &from_node).accepted);
        // x/a -> its node: input, egress applies.
        let to_node = Packet {
            to_host: true,
            ..pkt("10.0.1.1", "192.168.0.1", Transport::Tcp(10250))
        };
        let o = interpret(&p, &to_node);
        assert_eq!(
            (o.hook, o.accepted, &o.ingress),
            (Hook::Input, false, &Step::NotRun)
        );
        // y/a -> its node: not isolated.
        let o = interpret(
            &p,
            &Packet {
                src: ip("10.0.1.2"),
                ..to_node
            },
        );
        assert!(o.accepted && o.egress == Step::NotInMap);
        // Replies and related traffic pass; so does neighbour discovery, v6 only.
        let reply = Packet {
            ct: CtState::Established,
            ..pkt("10.0.2.1", "10.0.1.1", Transport::Tcp(80))
        };
        assert_eq!(interpret(&p, &reply).ingress, Step::Established);
        assert!(
            interpret(
                &p,
                &Packet {
                    ct: CtState::Related,
                    ..reply
                }
            )
            .accepted
        );
        let ns = pkt("fd00::2:1", "fd00::1:1", Transport::Icmp { kind: 135 });
        assert_eq!(interpret(&p, &ns).ingress, Step::NeighbourDiscovery);
        let ping6 = pkt("fd00::2:1", "fd00::1:1", Transport::Icmp { kind: 128 });
        assert!(!interpret(&p, &ping6).accepted);
        assert!(
            !interpret(
                &p,
                &pkt("10.0.2.1", "10.0.1.1", Transport::Icmp { kind: 135 })
            )
            .accepted
        );
    }

    #[test]
    fn an_egress_accept_still_meets_the_ingress_chain() {
        let mut c = cluster();
        add_policy(
            &mut c,
            "y",
            "out",
            serde_json::json!({"podSelector": {}, "policyTypes": ["Egress"], "egress": [{}]}),
        );
        add_policy(
            &mut c,
            "x",
            "in",
            serde_json::json!({"podSelector": {}, "ingress": []}),
        );
        let p = compile(&c, "n1");
        let o = interpret(&p, &pkt("10.0.1.2", "10.0.1.1", Transport::Tcp(80)));
        assert!(matches!(o.egress, Step::Accepted { .. }), "{o:?}");
        assert!(matches!(o.ingress, Step::Dropped { .. }), "{o:?}");
        assert!(!o.accepted);
    }

    #[test]
    fn check_finds_dangling_references_and_bad_names() {
        let mut c = cluster();
        add_policy(
            &mut c,
            "x",
            "p",
            serde_json::json!({"podSelector": {}, "ingress": [{"from": [{"podSelector": {}}], "ports": [{"port": 1}]}]}),
        );
        let good = compile(&c, "n1");
        good.check().unwrap();
        let mut bad = good.clone();
        let peer = bad
            .sets
            .keys()
            .find(|k| k.starts_with("peer-"))
            .unwrap()
            .clone();
        bad.sets.remove(&peer);
        assert!(matches!(
            bad.check(),
            Err(ProgramError::Dangling {
                what: "address set",
                ..
            })
        ));
        let mut bad = good.clone();
        let policy_chain = bad
            .chains
            .keys()
            .find(|k| k.starts_with("pol-"))
            .unwrap()
            .clone();
        bad.chains.remove(&policy_chain);
        assert!(matches!(
            bad.check(),
            Err(ProgramError::Dangling {
                what: "policy chain",
                ..
            })
        ));
        let mut bad = good.clone();
        bad.ingress.insert(ip("10.0.1.9"), policy_chain);
        assert!(matches!(
            bad.check(),
            Err(ProgramError::Dangling {
                what: "group chain",
                ..
            })
        ));
        let mut bad = good;
        let set = bad.sets.pop_first().unwrap().1;
        bad.sets.insert("x".repeat(MAX_NAME_LEN + 1), set);
        assert!(matches!(bad.check(), Err(ProgramError::BadName(_))));
    }

    #[test]
    fn cost_grows_with_pods_only_in_elements_and_map_entries() {
        let build = |n: u32| {
            let mut c = Cluster::new();
            for i in 0..n {
                let node = if i % 2 == 0 { "n1" } else { "n2" };
                let addr = format!("10.{}.{}.{}", i >> 16, (i >> 8) & 255, i & 255);
                add_pod(
                    &mut c,
                    ["x", "y"][(i % 3 == 0) as usize],
                    &format!("p{i}"),
                    node,
                    &[&addr],
                    http(),
                );
            }
            add_policy(
                &mut c,
                "x",
                "web",
                serde_json::json!({"podSelector": {}, "ingress": [
                {"from": [{"namespaceSelector": {}}], "ports": [{"port": "http"}]}]}),
            );
            add_policy(
                &mut c,
                "y",
                "out",
                serde_json::json!({"podSelector": {}, "policyTypes": ["Egress"], "egress": [
                {"to": [{"podSelector": {}}], "ports": [{"port": "http"}, {"port": 53, "protocol": "UDP"}]}]}),
            );
            compile(&c, "n1")
        };
        let (small, large) = (build(30), build(3000));
        assert_eq!(small.sets.len(), large.sets.len());
        assert_eq!(small.chains, large.chains);
        let elements = |p: &NodeProgram| p.sets.values().map(|s| s.elements.len()).sum::<usize>();
        let entries = |p: &NodeProgram| p.ingress.len() + p.egress.len();
        // Linear: 100× the pods, about 100× the elements and entries, never 10000×.
        assert!(
            elements(&large) <= 110 * elements(&small),
            "{} vs {}",
            elements(&large),
            elements(&small)
        );
        assert!(entries(&large) <= 110 * entries(&small));
        assert_eq!(entries(&large), 1500);
    }

    // --- diff

    #[test]
    fn diff_of_a_program_with_itself_is_empty() {
        let mut c = cluster();
        add_policy(
            &mut c,
            "x",
            "p",
            serde_json::json!({"podSelector": {}, "ingress": [{"from": [{"podSelector": {}}]}]}),
        );
        let p = compile(&c, "n1");
        assert!(diff(&p, &p).is_empty());
    }

    #[test]
    fn a_local_pod_joining_an_existing_group_changes_only_elements_and_map_entries() {
        let mut c = cluster();
        add_policy(
            &mut c,
            "x",
            "p",
            serde_json::json!({"podSelector": {}, "ingress": [
            {"from": [{"namespaceSelector": {}}], "ports": [{"port": "http"}]}]}),
        );
        let before = compile(&c, "n1");
        add_pod(&mut c, "x", "new", "n1", &["10.0.1.9", "fd00::1:9"], http());
        let after = compile(&c, "n1");
        let d = diff(&before, &after);
        assert!(d.is_elements_only(), "{d:#?}");
        assert_eq!(d.local_added, [ip("10.0.1.9"), ip("fd00::1:9")].into());
        assert_eq!(d.ingress.added.len(), 2);
        assert!(d.ingress.removed.is_empty() && d.egress.is_empty());
        // The peer set gains its addresses, the local named-port set its ports.
        assert_eq!(d.elements.len(), 2, "{d:#?}");
        for e in d.elements.values() {
            assert_eq!(e.added.len(), 2);
            assert!(e.removed.is_empty());
        }
        assert_eq!(d.apply(&before), after);
        // And leaving undoes exactly that.
        let back = diff(&after, &before);
        assert!(back.is_elements_only());
        assert_eq!(back.ingress.removed.len(), 2);
        assert_eq!(back.apply(&after), before);
    }

    #[test]
    fn the_first_local_target_of_a_policy_brings_its_chains() {
        let mut c = cluster();
        add_policy(
            &mut c,
            "z",
            "p",
            serde_json::json!({"podSelector": {}, "ingress": []}),
        );
        let before = compile(&c, "n1");
        add_pod(&mut c, "z", "a", "n1", &["10.0.1.7"], vec![]);
        let d = diff(&before, &compile(&c, "n1"));
        assert_eq!(
            d.chains_added.len(),
            2,
            "the policy chain and its group: {d:#?}"
        );
        assert!(d.chains_changed.is_empty() && d.chains_removed.is_empty());
        assert_eq!(d.ingress.added.len(), 1);
    }

    #[test]
    fn a_remote_pod_relabelled_changes_only_elements() {
        let mut c = cluster();
        add_policy(
            &mut c,
            "x",
            "p",
            serde_json::json!({"podSelector": {}, "ingress": [
            {"from": [{"namespaceSelector": {}, "podSelector": {"matchLabels": {"role": "client"}}}]}]}),
        );
        let before = compile(&c, "n1");
        let mut yb = c.pod(&PodKey::new("y", "b")).unwrap().clone();
        yb.labels.insert("role".into(), "client".into());
        c.upsert_pod_record(PodKey::new("y", "b"), yb).unwrap();
        let after = compile(&c, "n1");
        let d = diff(&before, &after);
        assert!(
            d.is_elements_only() && d.ingress.is_empty() && d.egress.is_empty(),
            "{d:#?}"
        );
        let (name, e) = d.elements.first_key_value().unwrap();
        assert!(name.starts_with("peer-"));
        assert_eq!(
            e.added,
            Elements::Addrs(AddrRanges {
                v4: vec![r4("10.0.2.2", "10.0.2.2")],
                v6: vec![r6("fd00::2:2", "fd00::2:2")]
            })
        );
        assert_eq!(d.apply(&before), after);
    }

    #[test]
    fn changing_a_policy_rule_changes_only_its_chain_and_its_sets() {
        let mut c = cluster();
        let spec = |port: u16| {
            serde_json::json!({"podSelector": {}, "ingress": [
            {"from": [{"podSelector": {"matchLabels": {"pod": "b"}}}], "ports": [{"port": port}]}]})
        };
        add_policy(&mut c, "x", "p", spec(80));
        add_policy(
            &mut c,
            "x",
            "q",
            serde_json::json!({"podSelector": {}, "ingress": [
            {"from": [{"podSelector": {"matchLabels": {"pod": "b"}}}], "ports": [{"port": 80}]}]}),
        );
        let before = compile(&c, "n1");
        add_policy(&mut c, "x", "p", spec(443));
        let after = compile(&c, "n1");
        let d = diff(&before, &after);
        let p_chain = policy_chain_name(&PolicyKey::new("x", "p"), Direction::Ingress);
        assert_eq!(d.chains_changed.keys().collect::<Vec<_>>(), [&p_chain]);
        assert!(d.chains_added.is_empty() && d.chains_removed.is_empty());
        assert!(d.ingress.is_empty() && d.egress.is_empty() && d.elements.is_empty());
        // The new port set is added; the old one stays, q still uses it; the peer set is shared.
        assert_eq!(d.sets_added.len(), 1);
        assert!(d.sets_removed.is_empty());
        assert_eq!(d.apply(&before), after);
        // Deleting q now frees the port-80 set.
        c.remove_policy(&PolicyKey::new("x", "q"));
        let d = diff(&after, &compile(&c, "n1"));
        assert_eq!(d.sets_removed.len(), 1);
        assert_eq!(
            d.chains_removed.len(),
            2,
            "q's chain and the {{p, q}} group"
        );
        assert_eq!(d.chains_added.len(), 1, "the {{p}} group");
        // x/a's two addresses move to the new group: each is removed and added.
        assert_eq!(d.ingress.removed.len(), 2);
        assert_eq!(d.ingress.added.len(), 2);
        assert!(d.ingress.added.keys().eq(d.ingress.removed.iter()));
    }
}
