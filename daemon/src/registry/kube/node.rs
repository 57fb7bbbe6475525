//! Node objects in, peers and patches out: the rules of flannel's kube subnet manager
//! (pkg/subnet/kube/kube.go), without I/O.
//!
//! Where twill differs from flannel on purpose: backend-data is parsed as JSON; a podCIDR
//! change is an update (flannel ignores it, rke2#11170); a peer whose subnet overlaps another
//! node's is held back until that one goes, instead of two routes fighting.

use std::collections::hash_map::DefaultHasher;
use std::collections::BTreeMap;
use std::hash::{Hash, Hasher};
use std::net::Ipv4Addr;

use ipnet::{IpNet, Ipv4Net};
use k8s_openapi::api::core::v1::Node;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::annotations::Annotations;
use crate::config::{BackendKind, NetworkConfig, DEFAULT_VNI};
use crate::excerpt::echo;
use crate::lease::{LeaseAttrs, LeaseBackend};
use crate::mac::MacAddr;
use crate::peer::Peer;
use crate::registry::PeerEvent;
use crate::subnet::overlaps;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NodeError {
    #[error(
        "node {node:?}: spec.podCIDRs has {count} entries; at most one IPv4 and one IPv6 are \
         expected"
    )]
    TooManyPodCidrs { node: String, count: usize },
    #[error("node {node:?}: pod CIDR {cidr:?} is not an address/length")]
    BadPodCidr { node: String, cidr: String },
    #[error("node {node:?}: no IPv4 pod CIDR (twill needs one; IPv6-only nodes are unsupported)")]
    NoIpv4PodCidr { node: String },
    #[error(
        "node {node:?}: its PodCIDR {cidr} is outside the Network {network} of net-conf.json \
         (the cluster CIDR given to the controller manager and net-conf.json's Network must \
         agree)"
    )]
    OutsideNetwork {
        node: String,
        cidr: Ipv4Net,
        network: Ipv4Net,
    },
}

fn name_of(node: &Node) -> &str {
    node.metadata.name.as_deref().unwrap_or("")
}

fn annotation<'a>(node: &'a Node, key: &str) -> Option<&'a str> {
    node.metadata
        .annotations
        .as_ref()?
        .get(key)
        .map(String::as_str)
}

/// The node's IPv4 pod subnet, as flannel picks it: `spec.podCIDRs` (one or two entries: the
/// IPv4 one), or `spec.podCIDR` when that list is empty. None while the controller manager has
/// not assigned one. Its own length counts: in Kubernetes mode SubnetLen is not used.
pub fn pod_subnet(node: &Node, cfg: &NetworkConfig) -> Result<Option<Ipv4Net>, NodeError> {
    let name = name_of(node);
    let spec = node.spec.as_ref();
    let list = spec.and_then(|s| s.pod_cidrs.as_deref()).unwrap_or(&[]);
    let net = match list.len() {
        0 => match spec.and_then(|s| s.pod_cidr.as_deref()) {
            None | Some("") => return Ok(None),
            Some(c) => first_v4(name, [c])?,
        },
        1 | 2 => first_v4(name, list.iter().map(String::as_str))?,
        count => {
            return Err(NodeError::TooManyPodCidrs {
                node: name.into(),
                count,
            })
        }
    };
    if !cfg.network.contains(&net) {
        return Err(NodeError::OutsideNetwork {
            node: name.into(),
            cidr: net,
            network: cfg.network,
        });
    }
    Ok(Some(net))
}

/// The first IPv4 entry; every entry must parse (flannel fails on any bad one).
fn first_v4<'a>(
    node: &str,
    cidrs: impl IntoIterator<Item = &'a str>,
) -> Result<Ipv4Net, NodeError> {
    let mut v4 = None;
    for c in cidrs {
        match c.parse::<IpNet>() {
            // Go's ParseCIDR drops host bits; so do we.
            Ok(IpNet::V4(n)) => v4 = v4.or(Some(n.trunc())),
            Ok(IpNet::V6(_)) => {}
            Err(_) => {
                return Err(NodeError::BadPodCidr {
                    node: node.into(),
                    cidr: echo(c).into_owned(),
                })
            }
        }
    }
    v4.ok_or_else(|| NodeError::NoIpv4PodCidr { node: node.into() })
}

// Field order and names are flannel's `vxlanLeaseAttrs`: external tools (F5, Citrix) parse it.
#[derive(Serialize)]
struct VxlanDataOut {
    #[serde(rename = "VNI")]
    vni: u32,
    #[serde(rename = "VtepMAC")]
    vtep_mac: MacAddr,
}

/// The backend-data annotation value: `{"VNI":1,"VtepMAC":"12:c6:65:89:b4:e3"}` for vxlan;
/// `null` for host-gw and udp (flannel marshals their empty BackendData).
pub fn backend_data(backend: &LeaseBackend) -> String {
    match *backend {
        LeaseBackend::Vxlan { vni, vtep_mac } => {
            serde_json::to_string(&VxlanDataOut { vni, vtep_mac })
                .expect("serializing plain data cannot fail")
        }
        LeaseBackend::HostGw | LeaseBackend::Udp => "null".into(),
    }
}

/// The annotations this node must carry, with exactly flannel's values. `current` is the
/// node's annotations now: an operator's non-empty `public-ip-overwrite` there is published as
/// `public-ip` verbatim, as flannel does.
pub fn own_annotations(
    a: &Annotations,
    attrs: &LeaseAttrs,
    current: &BTreeMap<String, String>,
) -> BTreeMap<String, String> {
    let public_ip = current
        .get(a.public_ip_overwrite())
        .filter(|v| !v.is_empty())
        .cloned()
        .unwrap_or_else(|| attrs.public_ip.to_string());
    BTreeMap::from([
        (a.kube_subnet_manager().to_string(), "true".to_string()),
        (
            a.backend_type().to_string(),
            attrs.backend.type_name().to_string(),
        ),
        (a.backend_data().to_string(), backend_data(&attrs.backend)),
        (a.public_ip().to_string(), public_ip),
    ])
}

/// The patch that makes `current` carry `want`: only the keys whose value differs, or None
/// when none does (then nothing is written at all). A JSON merge patch and a strategic merge
/// patch are the same for this string map; flannel sends it to `nodes/<name>/status`.
pub fn annotation_patch(
    current: &BTreeMap<String, String>,
    want: &BTreeMap<String, String>,
) -> Option<Value> {
    let differ: serde_json::Map<String, Value> = want
        .iter()
        .filter(|(k, v)| current.get(*k) != Some(*v))
        .map(|(k, v)| (k.clone(), Value::String(v.clone())))
        .collect();
    (!differ.is_empty()).then(|| json!({ "metadata": { "annotations": differ } }))
}

/// The body that sets the node's NetworkUnavailable condition to False once the network is up.
/// It must go as a *strategic* merge patch to `nodes/<name>/status`: conditions then merge by
/// `type` and kubelet's Ready, MemoryPressure… stay; a JSON merge patch would replace the list.
pub fn network_unavailable_patch(now_rfc3339: &str) -> Value {
    json!({
        "status": {
            "conditions": [{
                "type": "NetworkUnavailable",
                "status": "False",
                "reason": "TwillIsUp",
                "message": "twilld is running on this node",
                "lastTransitionTime": now_rfc3339,
                "lastHeartbeatTime": now_rfc3339,
            }]
        }
    })
}

/// Why a node that looks like a peer is not used. `label()` is for a metric.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum SkipReason {
    BadPodCidr,
    OutsideNetwork,
    OverlapsOwn,
    OverlapsPeer,
    /// Its VTEP MAC is another node's, at another address (a copied state dir, or a hostile
    /// annotation): the kernel keeps one remote per MAC, so both cannot be served.
    DuplicateMac,
    BackendType,
    NoPublicIp,
    BadPublicIp,
    BadBackendData,
    VniMismatch,
}

impl SkipReason {
    pub fn label(self) -> &'static str {
        match self {
            SkipReason::BadPodCidr => "bad-pod-cidr",
            SkipReason::OutsideNetwork => "outside-network",
            SkipReason::OverlapsOwn => "overlaps-own",
            SkipReason::OverlapsPeer => "overlaps-peer",
            SkipReason::DuplicateMac => "duplicate-mac",
            SkipReason::BackendType => "backend-type",
            SkipReason::NoPublicIp => "no-public-ip",
            SkipReason::BadPublicIp => "bad-public-ip",
            SkipReason::BadBackendData => "bad-backend-data",
            SkipReason::VniMismatch => "vni-mismatch",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{detail}")]
pub struct Skip {
    pub reason: SkipReason,
    pub detail: String,
}

fn skip(reason: SkipReason, detail: impl Into<String>) -> Skip {
    Skip {
        reason,
        detail: detail.into(),
    }
}

impl From<NodeError> for Skip {
    fn from(e: NodeError) -> Skip {
        let reason = match e {
            NodeError::OutsideNetwork { .. } => SkipReason::OutsideNetwork,
            _ => SkipReason::BadPodCidr,
        };
        skip(reason, e.to_string())
    }
}

// Lenient about extra fields (other implementations), strict about what we need.
#[derive(Deserialize)]
struct VxlanDataIn {
    #[serde(rename = "VNI", default)]
    vni: Option<u32>,
    #[serde(rename = "VtepMAC", default)]
    vtep_mac: Option<String>,
}

/// The VTEP MAC an earlier flanneld or twilld published in our own Node's backend-data (flannel's
/// persistent-MAC feature): taken over when the state dir has none, so a node moving from
/// flanneld, or one whose state dir was lost, keeps the MAC its peers have programmed. Only a
/// valid unicast MAC counts.
pub fn stored_vtep_mac(node: &Node, a: &Annotations) -> Option<MacAddr> {
    let v = node.metadata.annotations.as_ref()?.get(a.backend_data())?;
    let data: VxlanDataIn = serde_json::from_str(v).ok()?;
    let mac: MacAddr = data.vtep_mac?.parse().ok()?;
    (!mac.is_zero() && !mac.is_multicast()).then_some(mac)
}

/// An operator's `node-public-ip` annotation: Ok(None) when absent or empty, Err(value) when
/// it is not an IPv4 address.
pub fn stored_public_ip(node: &Node, a: &Annotations) -> Result<Option<Ipv4Addr>, String> {
    let Some(v) = node
        .metadata
        .annotations
        .as_ref()
        .and_then(|m| m.get(a.node_public_ip()))
        .filter(|v| !v.trim().is_empty())
    else {
        return Ok(None);
    };
    v.trim().parse().map(Some).map_err(|_| v.clone())
}

/// Another node as a peer. Ok(None) when it is not one (yet): no `kube-subnet-manager: "true"`
/// (not run by flanneld/twilld) or no podCIDR assigned. A Skip when its annotations are wrong:
/// the same checks as an etcd lease (`lease::parse_lease`), the subnet's length aside.
pub fn peer_from_node(
    node: &Node,
    a: &Annotations,
    cfg: &NetworkConfig,
    own: Option<Ipv4Net>,
) -> Result<Option<Peer>, Skip> {
    if annotation(node, a.kube_subnet_manager()) != Some("true") {
        return Ok(None);
    }
    let Some(subnet) = pod_subnet(node, cfg)? else {
        return Ok(None);
    };
    if let Some(own) = own.filter(|o| overlaps(*o, subnet)) {
        return Err(skip(
            SkipReason::OverlapsOwn,
            format!("subnet {subnet} overlaps our own subnet {own}"),
        ));
    }
    let backend_type = annotation(node, a.backend_type());
    let public_ip = parse_public_ip(annotation(node, a.public_ip()), cfg)?;
    let vtep_mac = match backend_type {
        Some("vxlan") => Some(parse_vxlan_data(annotation(node, a.backend_data()), cfg)?),
        Some("host-gw" | "udp") => None,
        other => {
            return Err(skip(
                SkipReason::BackendType,
                format!(
                    "backend-type {:?} is not supported (\"vxlan\", \"host-gw\" or \"udp\")",
                    echo(other.unwrap_or(""))
                ),
            ))
        }
    };
    Ok(Some(Peer {
        subnet,
        public_ip,
        vtep_mac,
    }))
}

fn parse_public_ip(value: Option<&str>, cfg: &NetworkConfig) -> Result<Ipv4Addr, Skip> {
    let v = value
        .filter(|v| !v.is_empty())
        .ok_or_else(|| skip(SkipReason::NoPublicIp, "public-ip annotation is missing"))?;
    let ip: Ipv4Addr = v.parse().map_err(|_| {
        skip(
            SkipReason::BadPublicIp,
            format!("public-ip {:?} is not an IPv4 address", echo(v)),
        )
    })?;
    if ip.is_unspecified() || ip.is_multicast() || ip.is_broadcast() || ip.is_loopback() {
        return Err(skip(
            SkipReason::BadPublicIp,
            format!("public-ip {ip} cannot be a tunnel endpoint"),
        ));
    }
    if cfg.network.contains(&ip) {
        return Err(skip(
            SkipReason::BadPublicIp,
            format!(
                "public-ip {ip} is inside the pod network {}: a pod address cannot carry the \
                 tunnel",
                cfg.network
            ),
        ));
    }
    Ok(ip)
}

fn parse_vxlan_data(value: Option<&str>, cfg: &NetworkConfig) -> Result<MacAddr, Skip> {
    let bad = |d: String| skip(SkipReason::BadBackendData, format!("backend-data: {d}"));
    let v = value.ok_or_else(|| bad("missing".into()))?;
    let short = |e: serde_json::Error| echo(&e.to_string()).into_owned();
    // A JSON object only: serde would take `[1,"mac"]` for the struct too.
    let data: VxlanDataIn = match serde_json::from_str::<Value>(v).map_err(|e| bad(short(e)))? {
        o @ Value::Object(_) => serde_json::from_value(o).map_err(|e| bad(short(e)))?,
        _ => return Err(bad(format!("{:?} is not a JSON object", echo(v)))),
    };
    let mac = data
        .vtep_mac
        .ok_or_else(|| bad("VtepMAC is missing".into()))?;
    let mac: MacAddr = mac.parse().map_err(|e| bad(format!("VtepMAC: {e}")))?;
    // Zero or group MACs cannot be programmed as unicast FDB entries.
    if mac.is_zero() || mac.is_multicast() {
        return Err(bad(format!("VtepMAC {mac} is not a unicast address")));
    }
    let vni = data.vni.unwrap_or(DEFAULT_VNI);
    // The kernel drops VXLAN packets of another VNI: a silent blackhole. host-gw ignores it.
    if cfg.backend.kind == BackendKind::Vxlan && vni != cfg.backend.vni {
        return Err(skip(
            SkipReason::VniMismatch,
            format!(
                "VNI {vni} is not this network's VNI {} (a node not yet restarted after a VNI \
                 change?)",
                cfg.backend.vni
            ),
        ));
    }
    Ok(mac)
}

/// A fingerprint of what makes a node a peer: its pod CIDRs and the annotations read by
/// `peer_from_node`. Status heartbeats, labels and other annotations leave it unchanged.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NodeDigest(u64);

/// A hash rather than copies of the values keeps memory bounded per node. A collision only
/// hides an update of a node whose writer (its kubelet or an admin) controls it anyway.
pub fn node_digest(node: &Node, a: &Annotations) -> NodeDigest {
    // DefaultHasher::new() has fixed keys: digests compare across calls.
    let mut h = DefaultHasher::new();
    let spec = node.spec.as_ref();
    spec.and_then(|s| s.pod_cidr.as_deref()).hash(&mut h);
    spec.and_then(|s| s.pod_cidrs.as_deref()).hash(&mut h);
    for key in [
        a.kube_subnet_manager(),
        a.backend_type(),
        a.backend_data(),
        a.public_ip(),
    ] {
        annotation(node, key).hash(&mut h);
    }
    NodeDigest(h.finish())
}

#[derive(Clone, Copy, Debug)]
enum State {
    /// Not a peer (not annotated, no podCIDR, invalid).
    Ignored,
    Active(Peer),
    /// Valid, but held back by another node's active peer: its subnet overlaps that one's (a
    /// podCIDR handed over before the old node's deletion was seen), or it announces that
    /// one's VTEP MAC at another address. Becomes active when the conflict goes.
    Blocked(Peer),
}

impl State {
    fn active(&self) -> Option<Peer> {
        match *self {
            State::Active(p) => Some(p),
            _ => None,
        }
    }
}

#[derive(Clone, Debug)]
struct Known {
    digest: NodeDigest,
    state: State,
    seniority: Seniority,
}

/// Which of two Nodes announcing one VTEP MAC keeps it: the older (`creationTimestamp`), then
/// the first by name, as etcd mode keeps it for the oldest lease. Every twilld decides the
/// same, whatever order it saw the Nodes in.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Seniority {
    /// Nanoseconds since the epoch; none (never from a real API server) counts as newest.
    created: i128,
    name: String,
}

impl Seniority {
    fn of(node: &Node) -> Seniority {
        Seniority {
            created: node
                .metadata
                .creation_timestamp
                .as_ref()
                .map_or(i128::MAX, |t| t.0.as_nanosecond()),
            name: name_of(node).to_string(),
        }
    }
}

/// A node that was not made a peer, for the caller to count (`skip.reason.label()`) and log.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeSkip {
    pub node: String,
    pub skip: Skip,
}

/// What one watch event changed.
#[derive(Debug, Default)]
pub struct Applied {
    pub events: Vec<PeerEvent>,
    /// The node's own skip, and that of a node it took a VTEP MAC back from.
    pub skips: Vec<NodeSkip>,
}

/// Turns a Node watch (kube-runtime `watcher::Event`s: Init, InitApply…, InitDone, then
/// Apply/Delete) into `PeerEvent`s: a `Snapshot` after every (re)list, then only real changes.
pub struct Peers {
    own_name: String,
    own_subnet: Option<Ipv4Net>,
    annotations: Annotations,
    cfg: NetworkConfig,
    nodes: BTreeMap<String, Known>,
    /// Being built between `init` and `init_done`; replaces `nodes` then.
    relist: Option<BTreeMap<String, Known>>,
}

impl Peers {
    pub fn new(
        own_name: impl Into<String>,
        annotations: Annotations,
        cfg: NetworkConfig,
        own_subnet: Option<Ipv4Net>,
    ) -> Self {
        Peers {
            own_name: own_name.into(),
            own_subnet,
            annotations,
            cfg,
            nodes: BTreeMap::new(),
            relist: None,
        }
    }

    /// A (re)list starts.
    pub fn init(&mut self) {
        self.relist = Some(BTreeMap::new());
    }

    /// One node of the list. Events wait for `init_done`.
    pub fn init_apply(&mut self, node: &Node) -> Vec<NodeSkip> {
        let Some((name, digest, candidate, skip)) = self.evaluate(node) else {
            return Vec::new();
        };
        let nodes = self.relist.get_or_insert_with(BTreeMap::new);
        let placed = place(nodes, &name, digest, Seniority::of(node), candidate);
        skips(name, skip.or(placed.skip), placed.demoted)
    }

    /// The list is complete: one `Snapshot` of all valid peers. Nodes not listed again (deleted
    /// while the watch was down) are gone from it.
    pub fn init_done(&mut self) -> Vec<PeerEvent> {
        if let Some(fresh) = self.relist.take() {
            self.nodes = fresh;
        }
        let peers = self
            .nodes
            .values()
            .filter_map(|k| k.state.active())
            .collect();
        vec![PeerEvent::Snapshot(peers)]
    }

    /// A node was added or changed. Nothing when what matters for a peer did not change.
    pub fn apply(&mut self, node: &Node) -> Applied {
        // A heartbeat changes nothing that matters: settled on the digest alone, before the
        // node's annotations are parsed.
        let name = name_of(node);
        if self.nodes.get(name).map(|k| k.digest) == Some(node_digest(node, &self.annotations)) {
            return Applied::default();
        }
        let Some((name, digest, candidate, skip)) = self.evaluate(node) else {
            return Applied::default();
        };
        let placed = place(
            &mut self.nodes,
            &name,
            digest,
            Seniority::of(node),
            candidate,
        );
        Applied {
            events: placed.events,
            skips: skips(name, skip.or(placed.skip), placed.demoted),
        }
    }

    /// A node was deleted: its peer goes (and a peer it held back may come).
    pub fn delete(&mut self, node: &Node) -> Vec<PeerEvent> {
        let name = name_of(node);
        match self.nodes.remove(name).and_then(|k| k.state.active()) {
            Some(p) => {
                let mut events = vec![PeerEvent::Remove(p.subnet)];
                events.extend(promote(&mut self.nodes));
                events
            }
            None => Vec::new(),
        }
    }

    /// None for nodes that are never peers: ours, and nameless ones.
    fn evaluate(&self, node: &Node) -> Option<(String, NodeDigest, Option<Peer>, Option<Skip>)> {
        let name = name_of(node);
        if name.is_empty() || name == self.own_name {
            return None;
        }
        let digest = node_digest(node, &self.annotations);
        let (peer, skip) = match peer_from_node(node, &self.annotations, &self.cfg, self.own_subnet)
        {
            Ok(p) => (p, None),
            Err(s) => (None, Some(s)),
        };
        Some((name.to_string(), digest, peer, skip))
    }
}

fn skips(node: String, skip: Option<Skip>, demoted: Option<NodeSkip>) -> Vec<NodeSkip> {
    skip.map(|skip| NodeSkip { node, skip })
        .into_iter()
        .chain(demoted)
        .collect()
}

/// Why another node's active peer holds `p` back, if one does: an overlapping subnet, or the
/// same VTEP MAC at another address (the first node to announce a MAC keeps it: the kernel
/// has one remote per MAC, and a second node taking it over would redirect the first one's
/// traffic).
fn active_conflict(nodes: &BTreeMap<String, Known>, p: &Peer) -> Option<Skip> {
    conflict_with(nodes, p).map(|(_, s)| s)
}

/// `active_conflict`, with the name of the node holding `p` back.
fn conflict_with<'a>(nodes: &'a BTreeMap<String, Known>, p: &Peer) -> Option<(&'a str, Skip)> {
    nodes.iter().find_map(|(n, k)| {
        let q = k.state.active()?;
        if overlaps(q.subnet, p.subnet) {
            return Some((
                n.as_str(),
                Skip {
                    reason: SkipReason::OverlapsPeer,
                    detail: format!(
                        "subnet {} overlaps node {:?}'s subnet {}",
                        p.subnet,
                        echo(n),
                        q.subnet
                    ),
                },
            ));
        }
        match p.vtep_mac {
            Some(mac) if q.vtep_mac == Some(mac) && q.public_ip != p.public_ip => Some((
                n.as_str(),
                Skip {
                    reason: SkipReason::DuplicateMac,
                    detail: format!(
                        "VtepMAC {mac} is node {:?}'s, at {} (a copied state dir?); held back \
                     until that node goes or changes its MAC",
                        echo(n),
                        q.public_ip
                    ),
                },
            )),
            _ => None,
        }
    })
}

/// What placing one node did.
struct Placed {
    events: Vec<PeerEvent>,
    /// Why the node is held back, if it is.
    skip: Option<Skip>,
    /// A younger node that had this node's VTEP MAC and is held back now.
    demoted: Option<NodeSkip>,
}

/// Record `name`'s new state and say what changed for the data path.
fn place(
    nodes: &mut BTreeMap<String, Known>,
    name: &str,
    digest: NodeDigest,
    seniority: Seniority,
    candidate: Option<Peer>,
) -> Placed {
    let old = nodes.remove(name).and_then(|k| k.state.active());
    let mut events = Vec::new();
    // An older node takes its VTEP MAC back from a younger one that holds it (the younger
    // one is held back, and promoted again below if this node ends up not taking it).
    let mut demoted = None;
    if let Some(p) = candidate {
        if let Some((holder, s)) = conflict_with(nodes, &p) {
            let younger = nodes.get(holder).is_some_and(|k| k.seniority > seniority);
            if s.reason == SkipReason::DuplicateMac && younger {
                let holder = holder.to_string();
                if let Some(k) = nodes.get_mut(&holder) {
                    if let State::Active(q) = k.state {
                        k.state = State::Blocked(q);
                        events.push(PeerEvent::Remove(q.subnet));
                        demoted = Some(NodeSkip {
                            skip: Skip {
                                reason: SkipReason::DuplicateMac,
                                detail: format!(
                                    "VtepMAC {} is node {:?}'s too, at {}, which is older and \
                                     keeps it (a copied state dir?); held back until that node \
                                     goes or one of them changes its MAC",
                                    p.vtep_mac.map(|m| m.to_string()).unwrap_or_default(),
                                    echo(name),
                                    p.public_ip
                                ),
                            },
                            node: holder,
                        });
                    }
                }
            }
        }
    }
    let mut skip = None;
    let state = match candidate {
        None => State::Ignored,
        Some(p) => match active_conflict(nodes, &p) {
            Some(s) => {
                skip = Some(s);
                State::Blocked(p)
            }
            None => State::Active(p),
        },
    };
    let new = state.active();
    nodes.insert(
        name.to_string(),
        Known {
            digest,
            state,
            seniority,
        },
    );
    match (old, new) {
        (Some(o), Some(n)) if o == n => {}
        (Some(o), Some(n)) if o.subnet == n.subnet => {
            events.push(PeerEvent::Upsert(n));
            // A MAC or address it gave up may free a peer held back by it.
            events.extend(promote(nodes));
        }
        (old, new) => {
            if let Some(o) = old {
                events.push(PeerEvent::Remove(o.subnet));
            }
            if let Some(n) = new {
                events.push(PeerEvent::Upsert(n));
            }
            if old.is_some() || (demoted.is_some() && new.is_none()) {
                events.extend(promote(nodes));
            }
        }
    }
    Placed {
        events,
        skip,
        demoted,
    }
}

/// Activate held-back peers that no longer conflict with an active one (the oldest first).
fn promote(nodes: &mut BTreeMap<String, Known>) -> Vec<PeerEvent> {
    let mut blocked: Vec<(&Seniority, String, Peer)> = nodes
        .iter()
        .filter_map(|(n, k)| match k.state {
            State::Blocked(p) => Some((&k.seniority, n.clone(), p)),
            _ => None,
        })
        .collect();
    blocked.sort_by(|a, b| a.0.cmp(b.0));
    let blocked: Vec<(String, Peer)> = blocked.into_iter().map(|(_, n, p)| (n, p)).collect();
    let mut events = Vec::new();
    for (name, p) in blocked {
        if active_conflict(nodes, &p).is_none() {
            if let Some(k) = nodes.get_mut(&name) {
                k.state = State::Active(p);
                events.push(PeerEvent::Upsert(p));
            }
        }
    }
    events
}

/// Where this node's name comes from, in flannel's order, then kube-router's fallback.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NodeNameFrom {
    /// `NODE_NAME` (the downward API's `spec.nodeName`).
    Env(String),
    /// `POD_NAME` and `POD_NAMESPACE`: GET that pod and use its `spec.nodeName` (flannel's
    /// manifests; needs RBAC `pods: get`).
    Pod { namespace: String, name: String },
    /// Only one of `POD_NAME`/`POD_NAMESPACE` is set: a broken manifest, an error as in
    /// flannel ("env variables POD_NAME and POD_NAMESPACE must be set").
    PodIncomplete { missing: &'static str },
    /// None set: the host name (kubelet's default node name is the lower-cased host name).
    Hostname,
}

/// Resolve the node name source from the environment (`env` is `std::env::var(..).ok()` in the
/// daemon). Empty values count as unset, as in flannel.
pub fn node_name(env: impl Fn(&str) -> Option<String>) -> NodeNameFrom {
    let get = |k: &str| env(k).filter(|v| !v.is_empty());
    if let Some(n) = get("NODE_NAME") {
        return NodeNameFrom::Env(n);
    }
    match (get("POD_NAME"), get("POD_NAMESPACE")) {
        (Some(name), Some(namespace)) => NodeNameFrom::Pod { namespace, name },
        (Some(_), None) => NodeNameFrom::PodIncomplete {
            missing: "POD_NAMESPACE",
        },
        (None, Some(_)) => NodeNameFrom::PodIncomplete {
            missing: "POD_NAME",
        },
        (None, None) => NodeNameFrom::Hostname,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAC: &str = "12:c6:65:89:b4:e3";
    const P: &str = "flannel.alpha.coreos.com/";

    fn cfg() -> NetworkConfig {
        NetworkConfig::parse(br#"{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan"}}"#).unwrap()
    }

    fn hostgw_cfg() -> NetworkConfig {
        NetworkConfig::parse(br#"{"Network":"10.244.0.0/16","Backend":{"Type":"host-gw"}}"#)
            .unwrap()
    }

    fn net(s: &str) -> Ipv4Net {
        s.parse().unwrap()
    }

    fn ann() -> Annotations {
        Annotations::default()
    }

    /// The annotations flanneld v0.28 writes for a vxlan node.
    fn flannel_annotations(ip: &str, data: &str) -> Value {
        json!({
            format!("{P}backend-data"): data,
            format!("{P}backend-type"): "vxlan",
            format!("{P}kube-subnet-manager"): "true",
            format!("{P}public-ip"): ip,
            "node.alpha.kubernetes.io/ttl": "0",
            "volumes.kubernetes.io/controller-managed-attach-detach": "true",
        })
    }

    fn vxlan_data(vni: u32, mac: &str) -> String {
        format!(r#"{{"VNI":{vni},"VtepMAC":"{mac}"}}"#)
    }

    /// A node as the API server returns it, status and all.
    fn node_json(name: &str, spec: Value, annotations: Value) -> Value {
        json!({
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {
                "name": name,
                "resourceVersion": "1000",
                "labels": {"kubernetes.io/hostname": name},
                "annotations": annotations,
            },
            "spec": spec,
            "status": {
                "conditions": [{
                    "type": "Ready", "status": "True", "reason": "KubeletReady",
                    "message": "kubelet is posting ready status",
                    "lastHeartbeatTime": "2025-01-01T00:00:00Z",
                    "lastTransitionTime": "2025-01-01T00:00:00Z",
                }],
                "addresses": [{"type": "InternalIP", "address": "172.18.0.3"}],
            },
        })
    }

    fn to_node(v: Value) -> Node {
        serde_json::from_value(v).expect("a valid Node")
    }

    fn spec(cidr: &str) -> Value {
        json!({"podCIDR": cidr, "podCIDRs": [cidr]})
    }

    /// A vxlan peer node, `n` in the third octet of its pod subnet and the public IP and in
    /// the last byte of its VTEP MAC.
    fn peer_node(name: &str, n: u8) -> Node {
        to_node(node_json(
            name,
            spec(&format!("10.244.{n}.0/24")),
            flannel_annotations(
                &format!("172.18.0.{n}"),
                &vxlan_data(1, &format!("12:c6:65:89:b4:{n:02x}")),
            ),
        ))
    }

    fn with_spec(s: Value) -> Node {
        to_node(node_json(
            "n1",
            s,
            flannel_annotations("172.18.0.3", &vxlan_data(1, MAC)),
        ))
    }

    #[test]
    fn pod_subnet_rules() {
        let ok = [
            (json!({}), None),
            (json!({"podCIDR": ""}), None),
            (json!({"podCIDR": "10.244.1.0/24"}), Some("10.244.1.0/24")),
            (
                json!({"podCIDRs": ["10.244.1.0/24"]}),
                Some("10.244.1.0/24"),
            ),
            (spec("10.244.1.0/24"), Some("10.244.1.0/24")),
            // Dual stack, either order: the IPv4 one.
            (
                json!({"podCIDR": "10.244.1.0/24", "podCIDRs": ["10.244.1.0/24", "fd00:10:244:1::/64"]}),
                Some("10.244.1.0/24"),
            ),
            (
                json!({"podCIDR": "fd00:10:244:1::/64", "podCIDRs": ["fd00:10:244:1::/64", "10.244.1.0/24"]}),
                Some("10.244.1.0/24"),
            ),
            // podCIDRs wins over podCIDR when both are set.
            (
                json!({"podCIDR": "10.244.9.0/24", "podCIDRs": ["10.244.1.0/24"]}),
                Some("10.244.1.0/24"),
            ),
            // SubnetLen (24) does not apply: the podCIDR's own length counts.
            (spec("10.244.1.64/26"), Some("10.244.1.64/26")),
            (spec("10.244.0.0/16"), Some("10.244.0.0/16")),
            // Host bits are dropped, as Go's ParseCIDR does.
            (spec("10.244.1.7/24"), Some("10.244.1.0/24")),
        ];
        for (s, want) in ok {
            let got = pod_subnet(&with_spec(s.clone()), &cfg());
            assert_eq!(got, Ok(want.map(net)), "{s}");
        }
    }

    #[test]
    fn pod_subnet_errors() {
        let three = json!({"podCIDRs": ["10.244.1.0/24", "fd00::/64", "10.244.2.0/24"]});
        let cases = [
            (three, "has 3 entries"),
            (spec("fd00:10:244:1::/64"), "no IPv4 pod CIDR"),
            (json!({"podCIDR": "fd00::/64"}), "no IPv4 pod CIDR"),
            (
                spec("10.244.1.0"),
                "\"10.244.1.0\" is not an address/length",
            ),
            (spec("garbage"), "not an address/length"),
            (
                json!({"podCIDRs": ["10.244.1.0/24", "bad"]}),
                "not an address/length",
            ),
            (
                spec("10.245.1.0/24"),
                "PodCIDR 10.245.1.0/24 is outside the Network 10.244.0.0/16",
            ),
            (spec("10.0.0.0/8"), "outside the Network"),
        ];
        for (s, want) in cases {
            let e = pod_subnet(&with_spec(s.clone()), &cfg()).expect_err(&s.to_string());
            let msg = e.to_string();
            assert!(msg.contains(want), "{s}: {msg:?} lacks {want:?}");
            assert!(msg.starts_with("node \"n1\""), "{msg}");
        }
    }

    fn vxlan_attrs() -> LeaseAttrs {
        LeaseAttrs::vxlan("172.18.0.3".parse().unwrap(), 1, MAC.parse().unwrap())
    }

    fn map(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn own_annotations_are_flannels_exactly() {
        let want = map(&[
            (
                "flannel.alpha.coreos.com/backend-data",
                r#"{"VNI":1,"VtepMAC":"12:c6:65:89:b4:e3"}"#,
            ),
            ("flannel.alpha.coreos.com/backend-type", "vxlan"),
            ("flannel.alpha.coreos.com/kube-subnet-manager", "true"),
            ("flannel.alpha.coreos.com/public-ip", "172.18.0.3"),
        ]);
        assert_eq!(
            own_annotations(&ann(), &vxlan_attrs(), &BTreeMap::new()),
            want
        );

        let hostgw = LeaseAttrs {
            backend: LeaseBackend::HostGw,
            ..vxlan_attrs()
        };
        let got = own_annotations(&ann(), &hostgw, &BTreeMap::new());
        assert_eq!(got[&format!("{P}backend-type")], "host-gw");
        assert_eq!(got[&format!("{P}backend-data")], "null");

        let custom = Annotations::with_prefix("example.com/twill").unwrap();
        let got = own_annotations(&custom, &vxlan_attrs(), &BTreeMap::new());
        assert!(
            got.contains_key("example.com/twill-backend-data"),
            "{got:?}"
        );
        assert_eq!(got.len(), 4);
    }

    #[test]
    fn public_ip_overwrite_is_published() {
        let over = |v: &str| map(&[(&format!("{P}public-ip-overwrite"), v)]);
        let cases = [
            (over("203.0.113.7"), "203.0.113.7"),
            // Empty means unset (flannel compares with "").
            (over(""), "172.18.0.3"),
            (BTreeMap::new(), "172.18.0.3"),
            // Another prefix's overwrite is not ours.
            (
                map(&[("example.com/public-ip-overwrite", "203.0.113.7")]),
                "172.18.0.3",
            ),
        ];
        for (current, want) in cases {
            let got = own_annotations(&ann(), &vxlan_attrs(), &current);
            assert_eq!(got[&format!("{P}public-ip")], want, "{current:?}");
        }
    }

    #[test]
    fn a_stored_public_ip_is_an_ipv4_address_or_an_error() {
        let a = Annotations::default();
        let node = |v: Option<&str>| -> Node {
            let mut n = json!({"metadata": {"name": "n1", "annotations": {}}});
            if let Some(v) = v {
                n["metadata"]["annotations"]["flannel.alpha.coreos.com/node-public-ip"] = json!(v);
            }
            serde_json::from_value(n).unwrap()
        };
        assert_eq!(
            stored_public_ip(&node(Some("203.0.113.9")), &a),
            Ok(Some(Ipv4Addr::new(203, 0, 113, 9)))
        );
        assert_eq!(stored_public_ip(&node(None), &a), Ok(None));
        assert_eq!(stored_public_ip(&node(Some("")), &a), Ok(None));
        assert_eq!(
            stored_public_ip(&node(Some("2001:db8::1")), &a),
            Err("2001:db8::1".into())
        );
        assert_eq!(
            stored_public_ip(&node(Some("eth0")), &a),
            Err("eth0".into())
        );
    }

    #[test]
    fn a_stored_vtep_mac_is_taken_only_when_valid() {
        let a = Annotations::default();
        let node = |data: &str| -> Node {
            serde_json::from_value(json!({
                "metadata": {"name": "n1", "annotations": {"flannel.alpha.coreos.com/backend-data": data}}
            }))
            .unwrap()
        };
        let mac: MacAddr = "12:c6:65:89:b4:e3".parse().unwrap();
        assert_eq!(
            stored_vtep_mac(&node(r#"{"VNI":1,"VtepMAC":"12:c6:65:89:b4:e3"}"#), &a),
            Some(mac)
        );
        for bad in [
            "null",
            r#"{"VNI":1}"#,
            r#"{"VNI":1,"VtepMAC":"01:00:5e:00:00:01"}"#,
            r#"{"VNI":1,"VtepMAC":"00:00:00:00:00:00"}"#,
            r#"{"VNI":1,"VtepMAC":"zz"}"#,
        ] {
            assert_eq!(stored_vtep_mac(&node(bad), &a), None, "{bad}");
        }
        let bare: Node = serde_json::from_value(json!({"metadata": {"name": "n1"}})).unwrap();
        assert_eq!(stored_vtep_mac(&bare, &a), None);
    }

    #[test]
    fn backend_data_round_trips() {
        let data = backend_data(&vxlan_attrs().backend);
        assert_eq!(data, r#"{"VNI":1,"VtepMAC":"12:c6:65:89:b4:e3"}"#);
        // What we write, another twilld (or flanneld) reads back to the same peer.
        let annotations = own_annotations(&ann(), &vxlan_attrs(), &BTreeMap::new());
        let n = to_node(node_json("n1", spec("10.244.3.0/24"), json!(annotations)));
        let p = peer_from_node(&n, &ann(), &cfg(), None).unwrap().unwrap();
        assert_eq!(p.public_ip, vxlan_attrs().public_ip);
        assert_eq!(p.vtep_mac, vxlan_attrs().vtep_mac());
        assert_eq!(p.subnet, net("10.244.3.0/24"));
    }

    #[test]
    fn flanneld_node_parses_to_peer() {
        let n = to_node(node_json(
            "kind-worker",
            json!({"podCIDR": "10.244.1.0/24", "podCIDRs": ["10.244.1.0/24"],
                   "providerID": "kind://docker/kind/kind-worker"}),
            flannel_annotations("172.18.0.3", r#"{"VNI":1,"VtepMAC":"12:c6:65:89:b4:e3"}"#),
        ));
        let p = peer_from_node(&n, &ann(), &cfg(), Some(net("10.244.0.0/24")));
        assert_eq!(
            p,
            Ok(Some(Peer {
                subnet: net("10.244.1.0/24"),
                public_ip: "172.18.0.3".parse().unwrap(),
                vtep_mac: Some(MAC.parse().unwrap()),
            }))
        );
    }

    #[test]
    fn annotation_patch_sends_only_differences() {
        let want = own_annotations(&ann(), &vxlan_attrs(), &BTreeMap::new());
        let mut current = want.clone();
        current.insert("node.alpha.kubernetes.io/ttl".into(), "0".into());
        assert_eq!(annotation_patch(&current, &want), None);

        current.insert(format!("{P}public-ip"), "172.18.0.99".into());
        current.remove(&format!("{P}kube-subnet-manager"));
        assert_eq!(
            annotation_patch(&current, &want),
            Some(json!({"metadata": {"annotations": {
                "flannel.alpha.coreos.com/kube-subnet-manager": "true",
                "flannel.alpha.coreos.com/public-ip": "172.18.0.3",
            }}}))
        );
        let all = annotation_patch(&BTreeMap::new(), &want).unwrap();
        assert_eq!(all["metadata"]["annotations"].as_object().unwrap().len(), 4);
    }

    #[test]
    fn network_unavailable_patch_touches_one_condition() {
        let now = "2025-06-01T12:00:00Z";
        let p = network_unavailable_patch(now);
        assert_eq!(
            p,
            json!({"status": {"conditions": [{
                "type": "NetworkUnavailable", "status": "False", "reason": "TwillIsUp",
                "message": "twilld is running on this node",
                "lastTransitionTime": now, "lastHeartbeatTime": now,
            }]}})
        );
        // Field names and the time format are the API's: it reads as a Node.
        let n: Node = serde_json::from_value(p).unwrap();
        let conds = n.status.unwrap().conditions.unwrap();
        assert_eq!(conds.len(), 1);
        assert_eq!(conds[0].type_, "NetworkUnavailable");
        assert!(conds[0].last_transition_time.is_some());
    }

    #[test]
    fn nodes_not_run_by_flannel_or_without_pod_cidr_are_no_peers() {
        let mut no_mgr = flannel_annotations("172.18.0.3", &vxlan_data(1, MAC));
        no_mgr
            .as_object_mut()
            .unwrap()
            .remove(&format!("{P}kube-subnet-manager"));
        let mut mgr_false = no_mgr.clone();
        mgr_false[format!("{P}kube-subnet-manager")] = json!("false");
        let good = flannel_annotations("172.18.0.3", &vxlan_data(1, MAC));
        let cases = [
            node_json("a", spec("10.244.1.0/24"), no_mgr),
            node_json("b", spec("10.244.1.0/24"), mgr_false),
            node_json("c", json!({}), good.clone()),
            node_json("d", json!({"podCIDR": ""}), good),
            node_json("e", spec("10.244.1.0/24"), json!(null)),
        ];
        for c in cases {
            assert_eq!(
                peer_from_node(&to_node(c.clone()), &ann(), &cfg(), None),
                Ok(None),
                "{c}"
            );
        }
        // Another prefix's annotations are not ours.
        let custom = Annotations::with_prefix("example.com").unwrap();
        assert_eq!(
            peer_from_node(&peer_node("x", 2), &custom, &cfg(), None),
            Ok(None)
        );
    }

    #[track_caller]
    fn rejects(
        c: &NetworkConfig,
        sp: Value,
        edit: &[(&str, Option<&str>)],
        reason: SkipReason,
        want: &str,
    ) {
        let mut a = flannel_annotations("172.18.0.3", &vxlan_data(1, MAC));
        for (k, v) in edit {
            let key = format!("{P}{k}");
            match v {
                Some(v) => a[key] = json!(v),
                None => {
                    a.as_object_mut().unwrap().remove(&key);
                }
            }
        }
        let n = to_node(node_json("bad", sp, a));
        let s = peer_from_node(&n, &ann(), c, Some(net("10.244.0.0/24")))
            .expect_err(&format!("{edit:?}"));
        assert_eq!(s.reason, reason, "{edit:?}: {s}");
        assert!(
            s.detail.contains(want),
            "{edit:?}: {:?} lacks {want:?}",
            s.detail
        );
    }

    #[test]
    fn bad_nodes_are_skipped_with_a_reason() {
        use SkipReason::*;
        let s = || spec("10.244.1.0/24");
        let c = &cfg();
        rejects(
            c,
            spec("10.245.1.0/24"),
            &[],
            OutsideNetwork,
            "outside the Network",
        );
        rejects(c, spec("fd00::/64"), &[], BadPodCidr, "no IPv4");
        rejects(
            c,
            spec("10.244.0.0/23"),
            &[],
            OverlapsOwn,
            "overlaps our own subnet 10.244.0.0/24",
        );
        rejects(
            c,
            spec("10.244.0.128/25"),
            &[],
            OverlapsOwn,
            "overlaps our own",
        );
        rejects(
            c,
            s(),
            &[("backend-type", Some("ipip"))],
            BackendType,
            "\"ipip\" is not supported",
        );
        rejects(
            c,
            s(),
            &[("backend-type", None)],
            BackendType,
            "\"\" is not supported",
        );
        rejects(c, s(), &[("public-ip", None)], NoPublicIp, "missing");
        rejects(c, s(), &[("public-ip", Some(""))], NoPublicIp, "missing");
        rejects(
            c,
            s(),
            &[("public-ip", Some("nope"))],
            BadPublicIp,
            "\"nope\" is not an IPv4",
        );
        rejects(
            c,
            s(),
            &[("public-ip", Some("fd00::1"))],
            BadPublicIp,
            "not an IPv4",
        );
        rejects(
            c,
            s(),
            &[("public-ip", Some("127.0.0.1"))],
            BadPublicIp,
            "tunnel endpoint",
        );
        rejects(
            c,
            s(),
            &[("public-ip", Some("0.0.0.0"))],
            BadPublicIp,
            "tunnel endpoint",
        );
        rejects(
            c,
            s(),
            &[("public-ip", Some("10.244.7.1"))],
            BadPublicIp,
            "inside the pod network",
        );
        rejects(c, s(), &[("backend-data", None)], BadBackendData, "missing");
        rejects(
            c,
            s(),
            &[("backend-data", Some("null"))],
            BadBackendData,
            "not a JSON object",
        );
        rejects(
            c,
            s(),
            &[("backend-data", Some(r#"[1,"x"]"#))],
            BadBackendData,
            "not a JSON object",
        );
        rejects(
            c,
            s(),
            &[("backend-data", Some("{\"VNI\":1,"))],
            BadBackendData,
            "backend-data",
        );
        rejects(
            c,
            s(),
            &[("backend-data", Some(r#"{"VNI":1}"#))],
            BadBackendData,
            "VtepMAC is missing",
        );
        rejects(
            c,
            s(),
            &[(
                "backend-data",
                Some(r#"{"VNI":"1","VtepMAC":"12:c6:65:89:b4:e3"}"#),
            )],
            BadBackendData,
            "backend-data",
        );
        rejects(
            c,
            s(),
            &[("backend-data", Some(&vxlan_data(1, "zz")))],
            BadBackendData,
            "VtepMAC",
        );
        rejects(
            c,
            s(),
            &[("backend-data", Some(&vxlan_data(1, "00:00:00:00:00:00")))],
            BadBackendData,
            "not a unicast",
        );
        rejects(
            c,
            s(),
            &[("backend-data", Some(&vxlan_data(1, "ff:ff:ff:ff:ff:ff")))],
            BadBackendData,
            "not a unicast",
        );
        rejects(
            c,
            s(),
            &[("backend-data", Some(&vxlan_data(7, MAC)))],
            VniMismatch,
            "VNI 7 is not this network's VNI 1",
        );
        let labels = [
            OutsideNetwork.label(),
            OverlapsOwn.label(),
            NoPublicIp.label(),
            VniMismatch.label(),
            BadBackendData.label(),
            BackendType.label(),
        ];
        assert_eq!(
            labels,
            [
                "outside-network",
                "overlaps-own",
                "no-public-ip",
                "vni-mismatch",
                "bad-backend-data",
                "backend-type"
            ]
        );
    }

    #[test]
    fn vni_and_backend_rules() {
        let node = |ty: &str, data: &str| {
            let mut a = flannel_annotations("172.18.0.3", data);
            a[format!("{P}backend-type")] = json!(ty);
            to_node(node_json("n", spec("10.244.1.0/24"), a))
        };
        let peer = |n: &Node, c: &NetworkConfig| peer_from_node(n, &ann(), c, None);
        // host-gw: no MAC, backend-data ignored (flannel writes "null").
        let hg = peer(&node("host-gw", "null"), &cfg()).unwrap().unwrap();
        assert_eq!(hg.vtep_mac, None);
        assert_eq!(
            peer(&node("host-gw", "garbage"), &hostgw_cfg())
                .unwrap()
                .unwrap()
                .vtep_mac,
            None
        );
        // A missing VNI is flannel's default, 1.
        let no_vni = format!(r#"{{"VtepMAC":"{MAC}"}}"#);
        assert!(peer(&node("vxlan", &no_vni), &cfg()).unwrap().is_some());
        // The VNI matters only on a vxlan network; extra fields are fine.
        assert!(peer(&node("vxlan", &vxlan_data(7, MAC)), &hostgw_cfg())
            .unwrap()
            .is_some());
        let extra = format!(r#"{{"VNI":1,"VtepMAC":"{MAC}","Extra":true}}"#);
        assert!(peer(&node("vxlan", &extra), &cfg()).unwrap().is_some());
        let vni42 = NetworkConfig::parse(
            br#"{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan","VNI":42}}"#,
        )
        .unwrap();
        assert!(peer(&node("vxlan", &vxlan_data(42, MAC)), &vni42)
            .unwrap()
            .is_some());
        assert_eq!(
            peer(&node("vxlan", &vxlan_data(1, MAC)), &vni42)
                .unwrap_err()
                .reason,
            SkipReason::VniMismatch
        );
    }

    #[test]
    fn skip_details_echo_only_an_excerpt() {
        let huge = "x".repeat(200_000);
        for key in ["public-ip", "backend-type", "backend-data"] {
            let mut a = flannel_annotations("172.18.0.3", &vxlan_data(1, MAC));
            a[format!("{P}{key}")] = json!(huge);
            let n = to_node(node_json("n", spec("10.244.1.0/24"), a));
            let s = peer_from_node(&n, &ann(), &cfg(), None).unwrap_err();
            assert!(s.detail.len() < 300, "{key}: {} bytes", s.detail.len());
        }
    }

    #[test]
    fn digest_ignores_heartbeats_and_unrelated_fields() {
        let base = node_json(
            "n",
            spec("10.244.1.0/24"),
            flannel_annotations("172.18.0.3", &vxlan_data(1, MAC)),
        );
        let d = |v: &Value| node_digest(&to_node(v.clone()), &ann());
        let mut hb = base.clone();
        hb["metadata"]["resourceVersion"] = json!("1001");
        hb["status"]["conditions"][0]["lastHeartbeatTime"] = json!("2025-01-01T00:00:40Z");
        hb["metadata"]["labels"]["x"] = json!("y");
        hb["metadata"]["annotations"]["node.alpha.kubernetes.io/ttl"] = json!("30");
        hb["metadata"]["annotations"][format!("{P}public-ip-overwrite")] = json!("1.2.3.4");
        hb["spec"]["unschedulable"] = json!(true);
        assert_eq!(d(&base), d(&hb));

        let mut changes = Vec::new();
        for key in [
            "kube-subnet-manager",
            "backend-type",
            "backend-data",
            "public-ip",
        ] {
            let mut v = base.clone();
            v["metadata"]["annotations"][format!("{P}{key}")] = json!("changed");
            changes.push(v);
        }
        let mut v = base.clone();
        v["spec"]["podCIDRs"] = json!(["10.244.2.0/24"]);
        changes.push(v);
        let mut v = base.clone();
        v["spec"]["podCIDR"] = json!("10.244.2.0/24");
        changes.push(v);
        for c in changes {
            assert_ne!(d(&base), d(&c), "{c}");
        }
    }

    /// PeerEvent has no PartialEq: compare a plain rendering.
    #[derive(Debug, PartialEq)]
    enum E {
        Snap(Vec<Ipv4Net>),
        Up(Ipv4Net, Ipv4Addr),
        Rm(Ipv4Net),
    }

    fn es(events: &[PeerEvent]) -> Vec<E> {
        events
            .iter()
            .map(|e| match e {
                PeerEvent::Snapshot(ps) => {
                    let mut s: Vec<_> = ps.iter().map(|p| p.subnet).collect();
                    s.sort();
                    E::Snap(s)
                }
                PeerEvent::Upsert(p) => E::Up(p.subnet, p.public_ip),
                PeerEvent::Remove(s) => E::Rm(*s),
                other => panic!("unexpected {other:?}"),
            })
            .collect()
    }

    fn up(n: u8) -> E {
        E::Up(
            net(&format!("10.244.{n}.0/24")),
            Ipv4Addr::new(172, 18, 0, n),
        )
    }

    fn rm(n: u8) -> E {
        E::Rm(net(&format!("10.244.{n}.0/24")))
    }

    fn peers() -> Peers {
        Peers::new("me", ann(), cfg(), Some(net("10.244.0.0/24")))
    }

    fn listed(nodes: &[Node]) -> Peers {
        let mut p = peers();
        p.init();
        for n in nodes {
            assert_eq!(p.init_apply(n), vec![]);
        }
        p.init_done();
        p
    }

    #[test]
    fn list_gives_one_snapshot_without_own_node() {
        let mut p = peers();
        p.init();
        let me = to_node(node_json(
            "me",
            spec("10.244.0.0/24"),
            flannel_annotations("172.18.0.100", &vxlan_data(1, MAC)),
        ));
        for n in [peer_node("a", 1), me.clone(), peer_node("b", 2)] {
            assert_eq!(p.init_apply(&n), vec![]);
        }
        assert_eq!(
            es(&p.init_done()),
            [E::Snap(vec![net("10.244.1.0/24"), net("10.244.2.0/24")])]
        );
        // Own node changes: never a peer event.
        let mut me2 = me.clone();
        me2.spec.as_mut().unwrap().pod_cidrs = Some(vec!["10.244.9.0/24".into()]);
        assert!(p.apply(&me2).events.is_empty());
        assert!(p.delete(&me).is_empty());
    }

    #[test]
    fn heartbeat_only_changes_give_no_event() {
        let mut p = listed(&[peer_node("a", 1)]);
        let mut v = serde_json::to_value(peer_node("a", 1)).unwrap();
        v["status"]["conditions"][0]["lastHeartbeatTime"] = json!("2025-01-01T00:05:00Z");
        v["metadata"]["resourceVersion"] = json!("2000");
        let a = p.apply(&to_node(v));
        assert!(a.events.is_empty() && a.skips.is_empty(), "{a:?}");
        // A skipped node's heartbeat is not reported again.
        let mut bad = serde_json::to_value(peer_node("b", 2)).unwrap();
        bad["metadata"]["annotations"][format!("{P}backend-type")] = json!("ipip");
        assert!(!p.apply(&to_node(bad.clone())).skips.is_empty());
        bad["status"]["conditions"][0]["lastHeartbeatTime"] = json!("2025-01-01T00:05:00Z");
        let a = p.apply(&to_node(bad));
        assert!(a.events.is_empty() && a.skips.is_empty(), "{a:?}");
        // A real change does give one.
        let mut v = serde_json::to_value(peer_node("a", 1)).unwrap();
        v["metadata"]["annotations"][format!("{P}public-ip")] = json!("172.18.0.50");
        assert_eq!(
            es(&p.apply(&to_node(v)).events),
            [E::Up(net("10.244.1.0/24"), Ipv4Addr::new(172, 18, 0, 50))]
        );
    }

    #[test]
    fn new_node_is_upserted_once() {
        let mut p = listed(&[]);
        assert_eq!(es(&p.apply(&peer_node("a", 1)).events), [up(1)]);
        assert!(p.apply(&peer_node("a", 1)).events.is_empty());
    }

    #[test]
    fn pod_cidr_change_removes_then_upserts() {
        let mut p = listed(&[peer_node("a", 1)]);
        let mut v = serde_json::to_value(peer_node("a", 1)).unwrap();
        v["spec"] = spec("10.244.7.0/24");
        assert_eq!(
            es(&p.apply(&to_node(v)).events),
            [
                rm(1),
                E::Up(net("10.244.7.0/24"), Ipv4Addr::new(172, 18, 0, 1))
            ]
        );
    }

    #[test]
    fn node_losing_annotations_or_validity_is_removed() {
        let mut p = listed(&[peer_node("a", 1), peer_node("b", 2)]);
        let mut v = serde_json::to_value(peer_node("a", 1)).unwrap();
        v["metadata"]["annotations"] = json!({});
        let a = p.apply(&to_node(v));
        assert_eq!(es(&a.events), [rm(1)]);
        assert!(a.skips.is_empty());

        let mut v = serde_json::to_value(peer_node("b", 2)).unwrap();
        v["metadata"]["annotations"][format!("{P}backend-data")] = json!(vxlan_data(9, MAC));
        let a = p.apply(&to_node(v.clone()));
        assert_eq!(es(&a.events), [rm(2)]);
        let s = a.skips[0].clone();
        assert_eq!(
            (s.node.as_str(), s.skip.reason),
            ("b", SkipReason::VniMismatch)
        );
        // Still invalid, unchanged: no event and no second report.
        let a = p.apply(&to_node(v));
        assert!(a.events.is_empty() && a.skips.is_empty());
        // Fixed: back.
        assert_eq!(es(&p.apply(&peer_node("b", 2)).events), [up(2)]);
    }

    #[test]
    fn delete_removes_only_active_peers() {
        let mut p = listed(&[peer_node("a", 1)]);
        assert_eq!(es(&p.delete(&peer_node("a", 1))), [rm(1)]);
        assert!(p.delete(&peer_node("a", 1)).is_empty());
        assert!(p.delete(&peer_node("never-seen", 3)).is_empty());
    }

    #[test]
    fn relist_snapshot_drops_node_deleted_meanwhile() {
        let mut p = listed(&[peer_node("a", 1), peer_node("b", 2)]);
        // The watch broke; "b" was deleted while it was down; "c" joined.
        p.init();
        p.init_apply(&peer_node("a", 1));
        p.init_apply(&peer_node("c", 3));
        assert_eq!(
            es(&p.init_done()),
            [E::Snap(vec![net("10.244.1.0/24"), net("10.244.3.0/24")])]
        );
        // State follows the snapshot: "b" is unknown now, "c" unchanged.
        assert!(p.delete(&peer_node("b", 2)).is_empty());
        assert!(p.apply(&peer_node("c", 3)).events.is_empty());
    }

    #[test]
    fn relist_reports_skips() {
        let mut p = peers();
        p.init();
        let mut v = serde_json::to_value(peer_node("a", 1)).unwrap();
        v["metadata"]["annotations"][format!("{P}public-ip")] = json!("");
        let s = p.init_apply(&to_node(v)).remove(0);
        assert_eq!(
            (s.node.as_str(), s.skip.reason.label()),
            ("a", "no-public-ip")
        );
        assert_eq!(es(&p.init_done()), [E::Snap(vec![])]);
    }

    #[test]
    fn subnet_handed_over_before_old_node_delete_is_seen() {
        let mut p = listed(&[peer_node("old", 1)]);
        // "new" got old's podCIDR; the delete of "old" is still on its way.
        let new = to_node(node_json(
            "new",
            spec("10.244.1.0/24"),
            flannel_annotations("172.18.0.77", &vxlan_data(1, MAC)),
        ));
        let a = p.apply(&new);
        assert!(a.events.is_empty(), "{:?}", a.events);
        assert_eq!(a.skips[0].clone().skip.reason, SkipReason::OverlapsPeer);
        let new_peer = E::Up(net("10.244.1.0/24"), Ipv4Addr::new(172, 18, 0, 77));
        assert_eq!(es(&p.delete(&peer_node("old", 1))), [rm(1), new_peer]);
        // Now "new" is the owner: its deletion removes the subnet.
        assert_eq!(es(&p.delete(&new)), [rm(1)]);
    }

    #[test]
    fn a_vtep_mac_announced_by_two_nodes_stays_with_the_first() {
        let with_mac = |name: &str, n: u8, mac: &str| {
            to_node(node_json(
                name,
                spec(&format!("10.244.{n}.0/24")),
                flannel_annotations(&format!("172.18.0.{n}"), &vxlan_data(1, mac)),
            ))
        };
        let up = |n: u8| {
            E::Up(
                net(&format!("10.244.{n}.0/24")),
                Ipv4Addr::new(172, 18, 0, n),
            )
        };
        let a_mac = "12:c6:65:89:b4:01";
        let mut p = listed(&[peer_node("a", 1)]);
        // "b" runs on a copy of a's state dir: a's MAC at its own address.
        let a = p.apply(&with_mac("b", 2, a_mac));
        assert!(a.events.is_empty(), "{:?}", a.events);
        let skip = a.skips[0].clone();
        assert_eq!(skip.skip.reason, SkipReason::DuplicateMac);
        assert!(skip.skip.detail.contains("\"a\""), "{}", skip.skip.detail);
        // b gets a MAC of its own: a peer.
        assert_eq!(es(&p.apply(&peer_node("b", 2)).events), [up(2)]);
        // "c" copies a's MAC too; then a moves to another MAC and c is let in.
        assert_eq!(
            p.apply(&with_mac("c", 3, a_mac)).skips[0].skip.reason,
            SkipReason::DuplicateMac
        );
        assert_eq!(
            es(&p.apply(&with_mac("a", 1, "12:c6:65:89:b4:aa")).events),
            [up(1), up(3)]
        );
        // "d" copies c's (now active) MAC; c's deletion lets it in.
        assert!(p.apply(&with_mac("d", 4, a_mac)).events.is_empty());
        assert_eq!(es(&p.delete(&with_mac("c", 3, a_mac))), [rm(3), up(4)]);
        // A relist keeps one of each MAC: the first listed.
        let mut p = peers();
        p.init();
        assert_eq!(p.init_apply(&peer_node("a", 1)), vec![]);
        let held = p.init_apply(&with_mac("b", 2, a_mac)).remove(0);
        assert_eq!(held.skip.reason, SkipReason::DuplicateMac);
        assert_eq!(es(&p.init_done()), [E::Snap(vec![net("10.244.1.0/24")])]);
        // A host-gw node has no MAC: nothing to share.
        assert!(active_conflict(
            &p.nodes,
            &Peer {
                subnet: net("10.244.9.0/24"),
                public_ip: Ipv4Addr::new(172, 18, 0, 9),
                vtep_mac: None,
            }
        )
        .is_none());
    }

    /// The older Node keeps a VTEP MAC two announce, whichever this twilld saw first: every
    /// node decides the same (as etcd mode keeps the oldest lease's).
    #[test]
    fn a_vtep_mac_two_nodes_announce_stays_with_the_older() {
        let at = |name: &str, n: u8, mac: &str, created: &str| {
            let mut node = to_node(node_json(
                name,
                spec(&format!("10.244.{n}.0/24")),
                flannel_annotations(&format!("172.18.0.{n}"), &vxlan_data(1, mac)),
            ));
            node.metadata.creation_timestamp =
                Some(serde_json::from_value(json!(created)).expect("an RFC 3339 time"));
            node
        };
        let up = |n: u8| {
            E::Up(
                net(&format!("10.244.{n}.0/24")),
                Ipv4Addr::new(172, 18, 0, n),
            )
        };
        let mac = "12:c6:65:89:b4:01";
        // "z" is older than "a": the name order is not what decides.
        let old = at("z", 1, mac, "2026-01-01T00:00:00Z");
        let young = at("a", 2, mac, "2026-06-01T00:00:00Z");
        // The younger one seen first is a peer until the older one comes; then it is held back
        // and says why.
        let mut p = listed(std::slice::from_ref(&young));
        let a = p.apply(&old);
        assert_eq!(es(&a.events), [rm(2), up(1)]);
        assert_eq!(a.skips.len(), 1, "{:?}", a.skips);
        assert_eq!(a.skips[0].node, "a");
        assert_eq!(a.skips[0].skip.reason, SkipReason::DuplicateMac);
        assert!(
            a.skips[0].skip.detail.contains("\"z\""),
            "{}",
            a.skips[0].skip.detail
        );
        // The older one seen first: the younger is held back, as before.
        let mut p = listed(std::slice::from_ref(&old));
        let a = p.apply(&young);
        assert!(a.events.is_empty(), "{:?}", a.events);
        assert_eq!(a.skips[0].node, "a");
        // A list in either order keeps the older one.
        for order in [[&young, &old], [&old, &young]] {
            let mut p = peers();
            p.init();
            let held: Vec<NodeSkip> = order.iter().flat_map(|n| p.init_apply(n)).collect();
            assert_eq!(es(&p.init_done()), [E::Snap(vec![net("10.244.1.0/24")])]);
            assert!(held.iter().all(|s| s.node == "a"), "{held:?}");
        }
        // The older one goes: the younger comes back.
        let mut p = peers();
        p.init();
        for n in [&young, &old] {
            p.init_apply(n);
        }
        p.init_done();
        assert_eq!(es(&p.delete(&old)), [rm(1), up(2)]);
    }

    #[test]
    fn node_name_resolution_order() {
        let env = |pairs: &'static [(&'static str, &'static str)]| {
            move |k: &str| {
                pairs
                    .iter()
                    .find(|(n, _)| *n == k)
                    .map(|(_, v)| v.to_string())
            }
        };
        let pod = NodeNameFrom::Pod {
            namespace: "kube-flannel".into(),
            name: "twill-x".into(),
        };
        let cases: [(&'static [(&str, &str)], NodeNameFrom); 6] = [
            (
                &[
                    ("NODE_NAME", "w1"),
                    ("POD_NAME", "twill-x"),
                    ("POD_NAMESPACE", "kube-flannel"),
                ],
                NodeNameFrom::Env("w1".into()),
            ),
            (
                &[
                    ("NODE_NAME", ""),
                    ("POD_NAME", "twill-x"),
                    ("POD_NAMESPACE", "kube-flannel"),
                ],
                pod.clone(),
            ),
            (
                &[("POD_NAME", "twill-x"), ("POD_NAMESPACE", "kube-flannel")],
                pod,
            ),
            (
                &[("POD_NAME", "twill-x")],
                NodeNameFrom::PodIncomplete {
                    missing: "POD_NAMESPACE",
                },
            ),
            (
                &[("POD_NAMESPACE", "kube-flannel"), ("POD_NAME", "")],
                NodeNameFrom::PodIncomplete {
                    missing: "POD_NAME",
                },
            ),
            (&[], NodeNameFrom::Hostname),
        ];
        for (vars, want) in cases {
            assert_eq!(node_name(env(vars)), want, "{vars:?}");
        }
    }
}
