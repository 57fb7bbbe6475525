//! Node objects in, peers and patches out: the rules of flannel's kube subnet manager
//! (pkg/subnet/kube/kube.go), without I/O.
//!
//! Where twill differs from flannel on purpose: backend-data is parsed as JSON; a podCIDR
//! change is an update (flannel ignores it, rke2#11170); of two Nodes whose subnets overlap,
//! the older is served and the younger held back until it goes, instead of two routes
//! fighting (`placement`).

use std::collections::hash_map::DefaultHasher;
use std::collections::BTreeMap;
use std::hash::{Hash, Hasher};
use std::net::{Ipv4Addr, Ipv6Addr};

use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use k8s_openapi::api::core::v1::Node;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::annotations::Annotations;
use super::placement::{forget, place, Seniority, Table};
use crate::config::{BackendKind, NetworkConfig, DEFAULT_VNI};
use crate::excerpt::echo;
use crate::lease::{LeaseAttrs, LeaseBackend};
use crate::mac::MacAddr;
use crate::peer::{Peer, PeerOf};
use crate::registry::{PeerEvent, PeerFamily};
use crate::subnet::{overlaps, Cidr};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NodeError {
    #[error(
        "node {node:?}: spec.podCIDRs has {count} entries; at most one IPv4 and one IPv6 are \
         expected"
    )]
    TooManyPodCidrs { node: String, count: usize },
    #[error("node {node:?}: pod CIDR {cidr:?} is not an address/length")]
    BadPodCidr { node: String, cidr: String },
    #[error("node {node:?}: no IPv4 pod CIDR (the network has IPv4: a Node with IPv6 podCIDRs only cannot join it)")]
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
    #[error(
        "node {node:?}: its IPv6 PodCIDR {cidr} is outside the IPv6Network {network} of \
         net-conf.json (the controller manager's IPv6 cluster CIDR and IPv6Network must agree)"
    )]
    OutsideNetwork6 {
        node: String,
        cidr: Ipv6Net,
        network: Ipv6Net,
    },
}

pub(super) fn name_of(node: &Node) -> &str {
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
/// not assigned one, and on an IPv6-only network. Its own length counts: in Kubernetes mode
/// SubnetLen is not used.
pub fn pod_subnet(node: &Node, cfg: &NetworkConfig) -> Result<Option<Ipv4Net>, NodeError> {
    let Some(range) = &cfg.ipv4 else {
        return Ok(None);
    };
    let name = name_of(node);
    let Some((v4, _)) = pod_cidrs(node)? else {
        return Ok(None);
    };
    let net = v4.ok_or_else(|| NodeError::NoIpv4PodCidr { node: name.into() })?;
    if !range.network.contains(&net) {
        return Err(NodeError::OutsideNetwork {
            node: name.into(),
            cidr: net,
            network: range.network,
        });
    }
    Ok(Some(net))
}

/// The node's IPv6 pod subnet on a dual-stack network: the IPv6 entry of `spec.podCIDRs`
/// (by family, never by position: flannel #1629). None on an IPv4-only network, or while the
/// node has none (a single-stack node in a dual-stack cluster).
pub fn pod_subnet6(node: &Node, cfg: &NetworkConfig) -> Result<Option<Ipv6Net>, NodeError> {
    let Some(range) = &cfg.ipv6 else {
        return Ok(None);
    };
    let Some((_, Some(net))) = pod_cidrs(node)? else {
        return Ok(None);
    };
    if !range.network.contains(&net) {
        return Err(NodeError::OutsideNetwork6 {
            node: name_of(node).into(),
            cidr: net,
            network: range.network,
        });
    }
    Ok(Some(net))
}

/// A node's pod CIDRs by family.
type PodCidrs = (Option<Ipv4Net>, Option<Ipv6Net>);

/// The first IPv4 and first IPv6 entry of `spec.podCIDRs` (or `spec.podCIDR` when the list is
/// empty); None when nothing is assigned. Every entry must parse (flannel fails on any bad one).
fn pod_cidrs(node: &Node) -> Result<Option<PodCidrs>, NodeError> {
    let name = name_of(node);
    let spec = node.spec.as_ref();
    let list = spec.and_then(|s| s.pod_cidrs.as_deref()).unwrap_or(&[]);
    let cidrs: Vec<&str> = match list.len() {
        0 => match spec.and_then(|s| s.pod_cidr.as_deref()) {
            None | Some("") => return Ok(None),
            Some(c) => vec![c],
        },
        1 | 2 => list.iter().map(String::as_str).collect(),
        count => {
            return Err(NodeError::TooManyPodCidrs {
                node: name.into(),
                count,
            })
        }
    };
    let (mut v4, mut v6) = (None, None);
    for c in cidrs {
        match c.parse::<IpNet>() {
            // Go's ParseCIDR drops host bits; so do we.
            Ok(IpNet::V4(n)) => v4 = v4.or(Some(n.trunc())),
            Ok(IpNet::V6(n)) => v6 = v6.or(Some(n.trunc())),
            Err(_) => {
                return Err(NodeError::BadPodCidr {
                    node: name.into(),
                    cidr: echo(c).into_owned(),
                })
            }
        }
    }
    Ok(Some((v4, v6)))
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
/// `public-ip` verbatim, as flannel does (and `public-ipv6-overwrite` as `public-ipv6`). A
/// dual-stack node adds flannel's IPv6 pair: `backend-v6-data` (`null` for host-gw, as
/// flanneld writes it) and `public-ipv6`.
pub fn own_annotations(
    a: &Annotations,
    attrs: &LeaseAttrs,
    current: &BTreeMap<String, String>,
) -> BTreeMap<String, String> {
    let overwritten = |key: &str, detected: String| {
        current
            .get(key)
            .filter(|v| !v.is_empty())
            .cloned()
            .unwrap_or(detected)
    };
    let mut want = BTreeMap::from([
        (a.kube_subnet_manager().to_string(), "true".to_string()),
        (
            a.backend_type().to_string(),
            attrs
                .primary()
                .map_or("", |s| s.backend.type_name())
                .to_string(),
        ),
    ]);
    if let Some(v4) = &attrs.v4 {
        want.insert(a.backend_data().to_string(), backend_data(&v4.backend));
        want.insert(
            a.public_ip().to_string(),
            overwritten(a.public_ip_overwrite(), v4.public_ip.to_string()),
        );
    }
    if let Some(v6) = &attrs.v6 {
        want.insert(a.backend_v6_data().to_string(), backend_data(&v6.backend));
        want.insert(
            a.public_ipv6().to_string(),
            overwritten(a.public_ipv6_overwrite(), v6.public_ip.to_string()),
        );
    }
    want
}

/// The annotations of ours that must go: a family's pair when this node does not serve it (an
/// earlier run's, or flanneld's before it), or peers would route that family to a node that
/// has no device for it.
pub fn stale_annotations<'a>(a: &'a Annotations, attrs: &LeaseAttrs) -> Vec<&'a str> {
    let mut stale = Vec::new();
    if attrs.v4.is_none() {
        stale.extend([a.backend_data(), a.public_ip()]);
    }
    if attrs.v6.is_none() {
        stale.extend([a.backend_v6_data(), a.public_ipv6()]);
    }
    stale
}

/// The patch that makes `current` carry `want` and none of `stale`: only the keys whose value
/// differs (a stale key as `null`, which deletes it), or None when none does (then nothing is
/// written at all). A JSON merge patch and a strategic merge patch are the same for this string
/// map; flannel sends it to `nodes/<name>/status`.
pub fn annotation_patch(
    current: &BTreeMap<String, String>,
    want: &BTreeMap<String, String>,
    stale: &[&str],
) -> Option<Value> {
    let mut differ: serde_json::Map<String, Value> = want
        .iter()
        .filter(|(k, v)| current.get(*k) != Some(*v))
        .map(|(k, v)| (k.clone(), Value::String(v.clone())))
        .collect();
    for k in stale.iter().filter(|k| current.contains_key(**k)) {
        differ.insert(k.to_string(), Value::Null);
    }
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
            NodeError::OutsideNetwork { .. } | NodeError::OutsideNetwork6 { .. } => {
                SkipReason::OutsideNetwork
            }
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
    stored_mac_in(node, a.backend_data())
}

/// `stored_vtep_mac` of the IPv6 device, from backend-v6-data.
pub fn stored_vtep_mac6(node: &Node, a: &Annotations) -> Option<MacAddr> {
    stored_mac_in(node, a.backend_v6_data())
}

fn stored_mac_in(node: &Node, key: &str) -> Option<MacAddr> {
    let v = annotation(node, key)?;
    let data: VxlanDataIn = serde_json::from_str(v).ok()?;
    let mac: MacAddr = data.vtep_mac?.parse().ok()?;
    (!mac.is_zero() && !mac.is_multicast()).then_some(mac)
}

/// An operator's `node-public-ip` annotation: Ok(None) when absent or empty, Err(value) when
/// it is not an IPv4 address.
pub fn stored_public_ip(node: &Node, a: &Annotations) -> Result<Option<Ipv4Addr>, String> {
    stored_addr(node, a.node_public_ip())
}

/// An operator's `node-public-ipv6` annotation, as `stored_public_ip`.
pub fn stored_public_ipv6(node: &Node, a: &Annotations) -> Result<Option<Ipv6Addr>, String> {
    stored_addr(node, a.node_public_ipv6())
}

fn stored_addr<A: std::str::FromStr>(node: &Node, key: &str) -> Result<Option<A>, String> {
    let Some(v) = annotation(node, key).filter(|v| !v.trim().is_empty()) else {
        return Ok(None);
    };
    v.trim().parse().map(Some).map_err(|_| v.to_string())
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
        Some("vxlan") => Some(parse_vxlan_data(
            annotation(node, a.backend_data()),
            "backend-data",
            cfg,
        )?),
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

/// Another node's IPv6 side as a peer, on a dual-stack network: its IPv6 podCIDR, reached at
/// `public-ipv6` (vxlan: with the MAC of `backend-v6-data`). Ok(None) when the node is no peer
/// or has no IPv6 side: no IPv6 podCIDR, or no `public-ipv6` (a node that serves IPv4 only).
/// Its IPv4 side is judged on its own (`peer_from_node`): a bad IPv6 side never costs it.
pub fn peer6_from_node(
    node: &Node,
    a: &Annotations,
    cfg: &NetworkConfig,
    own: Option<Ipv6Net>,
) -> Result<Option<PeerOf<Ipv6Net>>, Skip> {
    if annotation(node, a.kube_subnet_manager()) != Some("true") {
        return Ok(None);
    }
    let Some(range) = &cfg.ipv6 else {
        return Ok(None);
    };
    // On a dual-stack network a node that publishes no IPv6 address serves IPv4 only: its
    // podCIDRs are the IPv4 side's business. On an IPv6-only network this side is the node's
    // only one, and says what is wrong with it.
    let only6 = cfg.ipv4.is_none();
    let Some(ip) = annotation(node, a.public_ipv6()).filter(|v| !v.is_empty()) else {
        return if only6 {
            Err(skip(
                SkipReason::NoPublicIp,
                "public-ipv6 annotation is missing",
            ))
        } else {
            Ok(None)
        };
    };
    let subnet = match pod_subnet6(node, cfg) {
        Ok(Some(s)) => s,
        Ok(None) => return Ok(None),
        Err(e @ NodeError::OutsideNetwork6 { .. }) => return Err(e.into()),
        Err(e) if only6 => return Err(e.into()),
        // Unreadable podCIDRs are reported once, by the IPv4 side.
        Err(_) => return Ok(None),
    };
    if let Some(own) = own.filter(|o| overlaps(*o, subnet)) {
        return Err(skip(
            SkipReason::OverlapsOwn,
            format!("IPv6 subnet {subnet} overlaps our own IPv6 subnet {own}"),
        ));
    }
    let public_ip: Ipv6Addr = ip.parse().map_err(|_| {
        skip(
            SkipReason::BadPublicIp,
            format!("public-ipv6 {:?} is not an IPv6 address", echo(ip)),
        )
    })?;
    if public_ip.is_unspecified() || public_ip.is_multicast() || public_ip.is_loopback() {
        return Err(skip(
            SkipReason::BadPublicIp,
            format!("public-ipv6 {public_ip} cannot be a tunnel endpoint"),
        ));
    }
    if range.network.contains(&public_ip) {
        return Err(skip(
            SkipReason::BadPublicIp,
            format!(
                "public-ipv6 {public_ip} is inside the IPv6 pod network {}: a pod address \
                 cannot carry the tunnel",
                range.network
            ),
        ));
    }
    let vtep_mac = match annotation(node, a.backend_type()) {
        Some("vxlan") => Some(parse_vxlan_data(
            annotation(node, a.backend_v6_data()),
            "backend-v6-data",
            cfg,
        )?),
        Some("host-gw") => None,
        // udp carries IPv4 only; anything else is reported by the IPv4 side.
        _ => return Ok(None),
    };
    Ok(Some(PeerOf {
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
    if let Some(r) = cfg.ipv4.as_ref().filter(|r| r.network.contains(&ip)) {
        return Err(skip(
            SkipReason::BadPublicIp,
            format!(
                "public-ip {ip} is inside the pod network {}: a pod address cannot carry the \
                 tunnel",
                r.network
            ),
        ));
    }
    Ok(ip)
}

/// A vxlan node's backend-data (or backend-v6-data, named by `key`): its unicast VTEP MAC.
fn parse_vxlan_data(value: Option<&str>, key: &str, cfg: &NetworkConfig) -> Result<MacAddr, Skip> {
    let bad = |d: String| skip(SkipReason::BadBackendData, format!("{key}: {d}"));
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
/// `peer_from_node` and `peer6_from_node`, and its creation time (which decides contests).
/// Status heartbeats, labels and other annotations leave it unchanged.
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
    // A Node re-created under its name whose delete was not seen: it may win or lose a contest.
    node.metadata
        .creation_timestamp
        .as_ref()
        .map(|t| t.0.as_nanosecond())
        .hash(&mut h);
    for key in [
        a.kube_subnet_manager(),
        a.backend_type(),
        a.backend_data(),
        a.public_ip(),
        a.backend_v6_data(),
        a.public_ipv6(),
    ] {
        annotation(node, key).hash(&mut h);
    }
    NodeDigest(h.finish())
}

/// A node (or one family's side of it) that was not made a peer, for the caller to count
/// (`skip.reason.label()`) and log.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeSkip {
    pub node: String,
    /// "" for the IPv4 side, `PeerFamily::TAG` of the IPv6 side.
    pub side: &'static str,
    pub skip: Skip,
}

/// What one watch event changed.
#[derive(Debug, Default)]
pub struct Applied {
    pub events: Vec<PeerEvent>,
    /// The node's own skip, and that of a node it took a VTEP MAC back from.
    pub skips: Vec<NodeSkip>,
}

/// One node judged in both families.
struct Judged {
    name: String,
    digest: NodeDigest,
    seniority: Seniority,
    v4: (Option<Peer>, Option<Skip>),
    /// Judged only when we serve IPv6.
    v6: Option<(Option<PeerOf<Ipv6Net>>, Option<Skip>)>,
}

/// Turns a Node watch (kube-runtime `watcher::Event`s: Init, InitApply…, InitDone, then
/// Apply/Delete) into `PeerEvent`s: a `Snapshot` (and a `Snapshot6` when we serve IPv6) after
/// every (re)list, then only real changes. Each family's side of a Node is placed on its own:
/// a bad IPv6 side never costs the IPv4 peer.
pub struct Peers {
    own_name: String,
    own_subnet: Option<Ipv4Net>,
    /// Our IPv6 subnet: only when we have one are the Nodes' IPv6 sides judged and sent.
    own_subnet6: Option<Ipv6Net>,
    annotations: Annotations,
    cfg: NetworkConfig,
    nodes: Table<Ipv4Net>,
    nodes6: Table<Ipv6Net>,
    /// Being built between `init` and `init_done`; replaces `nodes` and `nodes6` then.
    relist: Option<(Table<Ipv4Net>, Table<Ipv6Net>)>,
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
            own_subnet6: None,
            annotations,
            cfg,
            nodes: BTreeMap::new(),
            nodes6: BTreeMap::new(),
            relist: None,
        }
    }

    /// Serve the IPv6 sides too, ours being `own6` (None: IPv4 only).
    pub fn with_ipv6(mut self, own6: Option<Ipv6Net>) -> Self {
        self.own_subnet6 = own6.filter(|_| self.cfg.ipv6.is_some());
        self
    }

    /// A (re)list starts.
    pub fn init(&mut self) {
        self.relist = Some(Default::default());
    }

    /// One node of the list. Events wait for `init_done`.
    pub fn init_apply(&mut self, node: &Node) -> Vec<NodeSkip> {
        let Some(j) = self.evaluate(node) else {
            return Vec::new();
        };
        let (t4, t6) = self.relist.get_or_insert_with(Default::default);
        let mut out = Vec::new();
        let placed = place(t4, &j.name, j.digest, j.seniority.clone(), j.v4.0);
        out.extend(skips::<Ipv4Net>(
            &j.name,
            j.v4.1.or(placed.skip),
            placed.demoted,
        ));
        if let Some((p6, s6)) = j.v6 {
            let placed = place(t6, &j.name, j.digest, j.seniority, p6);
            out.extend(skips::<Ipv6Net>(
                &j.name,
                s6.or(placed.skip),
                placed.demoted,
            ));
        }
        out
    }

    /// The list is complete: one `Snapshot` of all valid peers (none on an IPv6-only network)
    /// and a `Snapshot6` when we serve IPv6. Nodes not listed again (deleted while the watch
    /// was down) are gone from it.
    pub fn init_done(&mut self) -> Vec<PeerEvent> {
        if let Some((fresh, fresh6)) = self.relist.take() {
            self.nodes = fresh;
            self.nodes6 = fresh6;
        }
        fn active<N: Cidr>(t: &Table<N>) -> Vec<PeerOf<N>> {
            t.values().filter_map(|k| k.state.active()).collect()
        }
        let mut out = Vec::new();
        if self.cfg.ipv4.is_some() {
            out.push(PeerEvent::Snapshot(active(&self.nodes)));
        }
        if self.own_subnet6.is_some() {
            out.push(PeerEvent::Snapshot6(active(&self.nodes6)));
        }
        out
    }

    /// A node was added or changed. Nothing when what matters for a peer did not change.
    pub fn apply(&mut self, node: &Node) -> Applied {
        // A heartbeat changes nothing that matters: settled on the digest alone, before the
        // node's annotations are parsed. (Every judged node is in `nodes`, peer or not.)
        let name = name_of(node);
        if self.nodes.get(name).map(|k| k.digest) == Some(node_digest(node, &self.annotations)) {
            return Applied::default();
        }
        let Some(j) = self.evaluate(node) else {
            return Applied::default();
        };
        let mut out = Applied::default();
        let placed = place(
            &mut self.nodes,
            &j.name,
            j.digest,
            j.seniority.clone(),
            j.v4.0,
        );
        out.events = placed.events;
        out.skips = skips::<Ipv4Net>(&j.name, j.v4.1.or(placed.skip), placed.demoted);
        if let Some((p6, s6)) = j.v6 {
            let placed = place(&mut self.nodes6, &j.name, j.digest, j.seniority, p6);
            out.events.extend(placed.events);
            out.skips.extend(skips::<Ipv6Net>(
                &j.name,
                s6.or(placed.skip),
                placed.demoted,
            ));
        }
        out
    }

    /// A node was deleted: its peers go (and peers it held back may come, which may hold
    /// back younger ones in turn).
    pub fn delete(&mut self, node: &Node) -> Applied {
        let name = name_of(node);
        let mut out = Applied::default();
        let gone = forget(&mut self.nodes, name);
        out.events = gone.events;
        out.skips = skips::<Ipv4Net>(name, None, gone.demoted);
        let gone = forget(&mut self.nodes6, name);
        out.events.extend(gone.events);
        out.skips.extend(skips::<Ipv6Net>(name, None, gone.demoted));
        out
    }

    /// None for nodes that are never peers: ours, and nameless ones.
    fn evaluate(&self, node: &Node) -> Option<Judged> {
        let name = name_of(node);
        if name.is_empty() || name == self.own_name {
            return None;
        }
        let a = &self.annotations;
        // Not served on an IPv6-only network: the Node is still placed in the IPv4 table
        // (without a peer), which keeps every judged Node's digest.
        let v4 = match self.cfg.ipv4 {
            Some(_) => split(peer_from_node(node, a, &self.cfg, self.own_subnet)),
            None => (None, None),
        };
        let v6 = self
            .own_subnet6
            .map(|own6| split(peer6_from_node(node, a, &self.cfg, Some(own6))));
        Some(Judged {
            name: name.to_string(),
            digest: node_digest(node, a),
            seniority: Seniority::of(node),
            v4,
            v6,
        })
    }
}

/// A judgement as (peer, skip).
fn split<T>(r: Result<Option<T>, Skip>) -> (Option<T>, Option<Skip>) {
    match r {
        Ok(p) => (p, None),
        Err(s) => (None, Some(s)),
    }
}

fn skips<N: PeerFamily>(node: &str, skip: Option<Skip>, demoted: Vec<NodeSkip>) -> Vec<NodeSkip> {
    skip.map(|skip| NodeSkip {
        node: node.to_string(),
        side: N::TAG,
        skip,
    })
    .into_iter()
    .chain(demoted)
    .collect()
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
    use crate::lease::LeaseSide;
    use std::collections::BTreeSet;

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

        let v = vxlan_attrs();
        let hostgw = LeaseAttrs {
            v4: Some(LeaseSide {
                backend: LeaseBackend::HostGw,
                ..v.v4.unwrap()
            }),
            ..v
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
        let data = backend_data(&vxlan_attrs().v4.unwrap().backend);
        assert_eq!(data, r#"{"VNI":1,"VtepMAC":"12:c6:65:89:b4:e3"}"#);
        // What we write, another twilld (or flanneld) reads back to the same peer.
        let annotations = own_annotations(&ann(), &vxlan_attrs(), &BTreeMap::new());
        let n = to_node(node_json("n1", spec("10.244.3.0/24"), json!(annotations)));
        let p = peer_from_node(&n, &ann(), &cfg(), None).unwrap().unwrap();
        assert_eq!(p.public_ip, vxlan_attrs().v4.unwrap().public_ip);
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
        assert_eq!(annotation_patch(&current, &want, &[]), None);

        current.insert(format!("{P}public-ip"), "172.18.0.99".into());
        current.remove(&format!("{P}kube-subnet-manager"));
        assert_eq!(
            annotation_patch(&current, &want, &[]),
            Some(json!({"metadata": {"annotations": {
                "flannel.alpha.coreos.com/kube-subnet-manager": "true",
                "flannel.alpha.coreos.com/public-ip": "172.18.0.3",
            }}}))
        );
        let all = annotation_patch(&BTreeMap::new(), &want, &[]).unwrap();
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

    /// `listed`, where some Nodes may be held back.
    fn listed_held(nodes: &[Node]) -> Peers {
        let mut p = peers();
        p.init();
        for n in nodes {
            p.init_apply(n);
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
        assert!(p.delete(&me).events.is_empty());
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
        assert_eq!(es(&p.delete(&peer_node("a", 1)).events), [rm(1)]);
        assert!(p.delete(&peer_node("a", 1)).events.is_empty());
        assert!(p.delete(&peer_node("never-seen", 3)).events.is_empty());
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
        assert!(p.delete(&peer_node("b", 2)).events.is_empty());
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

    /// `node`, created at `when` (RFC 3339).
    fn created(mut node: Node, when: &str) -> Node {
        node.metadata.creation_timestamp =
            Some(serde_json::from_value(json!(when)).expect("an RFC 3339 time"));
        node
    }

    #[test]
    fn subnet_handed_over_before_old_node_delete_is_seen() {
        let old = created(peer_node("old", 1), "2026-01-01T00:00:00Z");
        let mut p = listed(std::slice::from_ref(&old));
        // "new" got old's podCIDR; the delete of "old" is still on its way.
        let new = created(
            to_node(node_json(
                "new",
                spec("10.244.1.0/24"),
                flannel_annotations("172.18.0.77", &vxlan_data(1, MAC)),
            )),
            "2026-06-01T00:00:00Z",
        );
        let a = p.apply(&new);
        assert!(a.events.is_empty(), "{:?}", a.events);
        assert_eq!(a.skips[0].clone().skip.reason, SkipReason::OverlapsPeer);
        let new_peer = E::Up(net("10.244.1.0/24"), Ipv4Addr::new(172, 18, 0, 77));
        assert_eq!(es(&p.delete(&old).events), [rm(1), new_peer]);
        // Now "new" is the owner: its deletion removes the subnet.
        assert_eq!(es(&p.delete(&new).events), [rm(1)]);
    }

    /// Overlapping podCIDRs (set by hand on two Nodes): the older Node's is served whatever
    /// order this twilld saw them in, so every node routes the subnet to the same place.
    #[test]
    fn overlapping_subnets_stay_with_the_older_node_in_any_order() {
        let at = |name: &str, cidr: &str, n: u8, when: &str| {
            created(
                to_node(node_json(
                    name,
                    spec(cidr),
                    flannel_annotations(
                        &format!("172.18.0.{n}"),
                        &vxlan_data(1, &format!("12:c6:65:89:b4:{n:02x}")),
                    ),
                )),
                when,
            )
        };
        let up = |cidr: &str, n: u8| E::Up(net(cidr), Ipv4Addr::new(172, 18, 0, n));
        // By age: "z" (10.244.4.0/23), then "m" (10.244.5.0/24, inside z's), then "a"
        // (10.244.5.0/25: inside m's, and z's). Names sort the other way round.
        let z = at("z", "10.244.4.0/23", 1, "2026-01-01T00:00:00Z");
        let m = at("m", "10.244.5.0/24", 2, "2026-02-01T00:00:00Z");
        let a = at("a", "10.244.5.0/25", 3, "2026-03-01T00:00:00Z");
        // The younger seen first is served until the older comes, then held back, saying why.
        let mut p = listed(std::slice::from_ref(&m));
        let applied = p.apply(&z);
        assert_eq!(
            es(&applied.events),
            [E::Rm(net("10.244.5.0/24")), up("10.244.4.0/23", 1)]
        );
        assert_eq!(applied.skips.len(), 1, "{:?}", applied.skips);
        assert_eq!(applied.skips[0].node, "m");
        assert_eq!(applied.skips[0].skip.reason, SkipReason::OverlapsPeer);
        assert!(
            applied.skips[0].skip.detail.contains("\"z\""),
            "{}",
            applied.skips[0].skip.detail
        );
        // Every order of events, and a list, ends with z served and the others held back.
        let orders = [[&z, &m, &a], [&a, &m, &z], [&m, &a, &z], [&a, &z, &m]];
        for order in orders {
            let mut p = listed(&[]);
            let mut served = BTreeSet::new();
            for n in order {
                for e in es(&p.apply(n).events) {
                    match e {
                        E::Up(s, _) => assert!(served.insert(s), "{s} twice"),
                        E::Rm(s) => assert!(served.remove(&s), "{s} not served"),
                        other => panic!("{other:?}"),
                    }
                }
            }
            assert_eq!(served, BTreeSet::from([net("10.244.4.0/23")]), "{order:?}");
            let mut l = peers();
            l.init();
            for n in order {
                l.init_apply(n);
            }
            assert_eq!(es(&l.init_done()), [E::Snap(vec![net("10.244.4.0/23")])]);
        }
        // z goes: m (the older of the two left) is served, and a stays held back, by m now.
        let mut p = listed_held(&[a.clone(), m.clone(), z.clone()]);
        let gone = p.delete(&z);
        assert_eq!(
            es(&gone.events),
            [E::Rm(net("10.244.4.0/23")), up("10.244.5.0/24", 2)]
        );
        assert!(gone.skips.is_empty(), "{:?}", gone.skips);
        // m goes: a is served.
        assert_eq!(
            es(&p.delete(&m).events),
            [E::Rm(net("10.244.5.0/24")), up("10.244.5.0/25", 3)]
        );
        // A promotion can hold a younger node back: w (oldest) and y share a VTEP MAC, so y
        // waits; x overlaps only y, so it is served. w goes: y is served and x waits, which
        // the delete reports.
        let mac = "12:c6:65:89:b4:aa";
        let with = |name: &str, cidr: &str, n: u8, mac: &str, when: &str| {
            created(
                to_node(node_json(
                    name,
                    spec(cidr),
                    flannel_annotations(&format!("172.18.0.{n}"), &vxlan_data(1, mac)),
                )),
                when,
            )
        };
        let w = with("w", "10.244.8.0/24", 8, mac, "2026-01-01T00:00:00Z");
        let y = with("y", "10.244.9.0/24", 9, mac, "2026-02-01T00:00:00Z");
        let x = with("x", "10.244.9.0/25", 10, MAC, "2026-03-01T00:00:00Z");
        let mut p = listed_held(&[w.clone(), y, x]);
        let gone = p.delete(&w);
        assert_eq!(
            es(&gone.events),
            [
                E::Rm(net("10.244.8.0/24")),
                E::Rm(net("10.244.9.0/25")),
                up("10.244.9.0/24", 9)
            ]
        );
        assert_eq!(gone.skips.len(), 1, "{:?}", gone.skips);
        assert_eq!(
            (gone.skips[0].node.as_str(), gone.skips[0].skip.reason),
            ("x", SkipReason::OverlapsPeer)
        );
    }

    /// Nodes contesting a few subnets and VTEP MACs, added, changed and deleted in random
    /// order: after every event, the peers told are those a fresh list of the same Nodes gives.
    #[test]
    fn contested_peers_do_not_depend_on_the_order_of_events() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let cidrs = [
            "10.244.4.0/23",
            "10.244.4.0/24",
            "10.244.5.0/24",
            "10.244.5.0/25",
            "10.244.5.128/25",
            "10.244.6.0/24",
        ];
        let macs = [
            "12:c6:65:89:b4:01",
            "12:c6:65:89:b4:02",
            "12:c6:65:89:b4:03",
        ];
        let mut contested = 0;
        for _ in 0..300 {
            let mut p = listed(&[]);
            let mut told: BTreeMap<Ipv4Net, Ipv4Addr> = BTreeMap::new();
            let mut held: BTreeMap<String, Node> = BTreeMap::new();
            for _ in 0..24 {
                let name = format!("n{}", rng.random_range(0..6));
                let applied = if rng.random_bool(0.25) {
                    match held.remove(&name) {
                        Some(n) => p.delete(&n),
                        None => continue,
                    }
                } else {
                    let node = created(
                        to_node(node_json(
                            &name,
                            spec(cidrs[rng.random_range(0..cidrs.len())]),
                            flannel_annotations(
                                &format!("172.18.0.{}", rng.random_range(1..4)),
                                &vxlan_data(1, macs[rng.random_range(0..macs.len())]),
                            ),
                        )),
                        &format!("2026-0{}-01T00:00:00Z", rng.random_range(1..4)),
                    );
                    held.insert(name, node.clone());
                    p.apply(&node)
                };
                contested += applied.skips.len();
                for e in es(&applied.events) {
                    match e {
                        E::Up(s, ip) => {
                            told.insert(s, ip);
                        }
                        E::Rm(s) => assert!(told.remove(&s).is_some(), "{s} was not told"),
                        E::Snap(_) => panic!("a snapshot outside a list"),
                    }
                }
                let fresh = listed_held(&held.values().cloned().collect::<Vec<_>>());
                let listed: BTreeMap<Ipv4Net, Ipv4Addr> = fresh
                    .nodes
                    .values()
                    .filter_map(|k| k.state.active())
                    .map(|q| (q.subnet, q.public_ip))
                    .collect();
                let nodes: Vec<String> = held
                    .values()
                    .map(|n| {
                        format!(
                            "{} {:?} {:?} {:?} {}",
                            name_of(n),
                            n.spec.as_ref().and_then(|s| s.pod_cidr.as_deref()),
                            annotation(n, &format!("{P}public-ip")),
                            annotation(n, &format!("{P}backend-data")),
                            n.metadata.creation_timestamp.as_ref().unwrap().0
                        )
                    })
                    .collect();
                assert_eq!(told, listed, "{nodes:#?}");
            }
        }
        assert!(contested > 1000, "few contested cases: {contested}");
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
        assert_eq!(
            es(&p.delete(&with_mac("c", 3, a_mac)).events),
            [rm(3), up(4)]
        );
        // A relist keeps one of each MAC: the first listed.
        let mut p = peers();
        p.init();
        assert_eq!(p.init_apply(&peer_node("a", 1)), vec![]);
        let held = p.init_apply(&with_mac("b", 2, a_mac)).remove(0);
        assert_eq!(held.skip.reason, SkipReason::DuplicateMac);
        assert_eq!(es(&p.init_done()), [E::Snap(vec![net("10.244.1.0/24")])]);
        // A host-gw node has no MAC: nothing to share.
        let hostgw = |n: u8| Peer {
            subnet: net(&format!("10.244.{n}.0/24")),
            public_ip: Ipv4Addr::new(172, 18, 0, n),
            vtep_mac: None,
        };
        assert!(super::super::placement::conflict(&hostgw(9), &hostgw(8), "a").is_none());
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
        assert_eq!(es(&p.delete(&old).events), [rm(1), up(2)]);
    }

    // ---- dual stack ----

    const MAC6: &str = "12:c6:65:89:b6:06";

    fn dual_cfg(backend: &str) -> NetworkConfig {
        NetworkConfig::parse(
            format!(
                r#"{{"Network":"10.244.0.0/16","EnableIPv6":true,"IPv6Network":"fd00:10:244::/56","Backend":{{"Type":"{backend}"}}}}"#
            )
            .as_bytes(),
        )
        .unwrap()
    }

    fn net6(s: &str) -> Ipv6Net {
        s.parse().unwrap()
    }

    /// A dual-stack vxlan node as flanneld v0.28 writes it: `n` in both pod CIDRs, both
    /// addresses and both MACs.
    fn dual_node(name: &str, n: u8) -> Node {
        let mut ann = flannel_annotations(
            &format!("172.18.0.{n}"),
            &vxlan_data(1, &format!("12:c6:65:89:b4:{n:02x}")),
        );
        ann[format!("{P}backend-v6-data")] =
            json!(vxlan_data(1, &format!("12:c6:65:89:b6:{n:02x}")));
        ann[format!("{P}public-ipv6")] = json!(format!("2001:db8::{n}"));
        to_node(node_json(
            name,
            // IPv6 listed first: by family, never by index (flannel #1629).
            json!({"podCIDR": format!("fd00:10:244:{n}::/64"),
                   "podCIDRs": [format!("fd00:10:244:{n}::/64"), format!("10.244.{n}.0/24")]}),
            ann,
        ))
    }

    fn set_ann(node: &Node, key: &str, value: Option<&str>) -> Node {
        let mut v = serde_json::to_value(node).unwrap();
        match value {
            Some(x) => v["metadata"]["annotations"][format!("{P}{key}")] = json!(x),
            None => {
                v["metadata"]["annotations"]
                    .as_object_mut()
                    .unwrap()
                    .remove(&format!("{P}{key}"));
            }
        }
        to_node(v)
    }

    /// flanneld's IPv6-only Node: only the IPv6 annotations and an IPv6 podCIDR.
    fn only6_node(name: &str, n: u8) -> Node {
        let ann = json!({
            format!("{P}kube-subnet-manager"): "true",
            format!("{P}backend-type"): "vxlan",
            format!("{P}backend-v6-data"): vxlan_data(1, &format!("12:c6:65:89:b6:{n:02x}")),
            format!("{P}public-ipv6"): format!("2001:db8::{n}"),
        });
        to_node(node_json(
            name,
            json!({"podCIDR": format!("fd00:10:244:{n}::/64"),
                   "podCIDRs": [format!("fd00:10:244:{n}::/64")]}),
            ann,
        ))
    }

    /// On an IPv6-only network only IPv6 peers are sent (no `Snapshot`), a Node without
    /// public-ipv6 is reported (it is the Node's only side), and heartbeats stay no news.
    #[test]
    fn an_ipv6_only_network_has_only_ipv6_peers() {
        let c = NetworkConfig::parse(
            br#"{"EnableIPv4":false,"EnableIPv6":true,"IPv6Network":"fd00:10:244::/56"}"#,
        )
        .unwrap();
        assert_eq!(pod_subnet(&only6_node("a", 1), &c).unwrap(), None);
        let mut p = Peers::new("me", ann(), c, None).with_ipv6(Some(net6("fd00:10:244::/64")));
        p.init();
        assert_eq!(p.init_apply(&only6_node("a", 1)), vec![]);
        let no_ip = set_ann(&only6_node("b", 2), "public-ipv6", None);
        let skips = p.init_apply(&no_ip);
        assert_eq!(skips.len(), 1, "{skips:?}");
        assert_eq!(skips[0].skip.reason, SkipReason::NoPublicIp);
        let evs = p.init_done();
        assert!(
            matches!(evs.as_slice(), [PeerEvent::Snapshot6(ps)]
                if ps.len() == 1 && ps[0].subnet == net6("fd00:10:244:1::/64")
                    && ps[0].public_ip == "2001:db8::1".parse::<std::net::Ipv6Addr>().unwrap()),
            "{evs:?}"
        );
        // A new Node is an IPv6 upsert; the same Node again (a heartbeat) is nothing.
        let a = p.apply(&only6_node("c", 3));
        assert!(
            matches!(a.events.as_slice(), [PeerEvent::Upsert6(p6)] if p6.subnet == net6("fd00:10:244:3::/64")),
            "{:?}",
            a.events
        );
        let a = p.apply(&only6_node("c", 3));
        assert!(a.events.is_empty() && a.skips.is_empty(), "{a:?}");
    }

    #[test]
    fn ipv6_pod_subnet_is_the_ipv6_entry_inside_ipv6_network() {
        let c = dual_cfg("vxlan");
        let n = dual_node("a", 3);
        assert_eq!(pod_subnet(&n, &c).unwrap(), Some(net("10.244.3.0/24")));
        assert_eq!(
            pod_subnet6(&n, &c).unwrap(),
            Some(net6("fd00:10:244:3::/64"))
        );
        // An IPv4-only network never reads it; a single-stack node has none.
        assert_eq!(pod_subnet6(&n, &cfg()).unwrap(), None);
        assert_eq!(pod_subnet6(&peer_node("b", 2), &c).unwrap(), None);
        let outside = with_spec(json!({"podCIDRs": ["10.244.1.0/24", "fd00:99::/64"]}));
        let e = pod_subnet6(&outside, &c).unwrap_err();
        assert!(
            matches!(e, NodeError::OutsideNetwork6 { .. }) && e.to_string().contains("IPv6Network"),
            "{e}"
        );
        // The IPv4 side of that node is still fine.
        assert_eq!(
            pod_subnet(&outside, &c).unwrap(),
            Some(net("10.244.1.0/24"))
        );
    }

    #[test]
    fn dual_stack_annotations_are_flannels_and_go_when_ipv6_does() {
        let v6 = |backend| crate::lease::LeaseV6 {
            public_ip: "2001:db8::3".parse().unwrap(),
            backend,
        };
        let vxlan6 = LeaseBackend::Vxlan {
            vni: 1,
            vtep_mac: MAC6.parse().unwrap(),
        };
        let dual = LeaseAttrs {
            v6: Some(v6(vxlan6)),
            ..vxlan_attrs()
        };
        let got = own_annotations(&ann(), &dual, &BTreeMap::new());
        assert_eq!(got.len(), 6, "{got:?}");
        assert_eq!(
            got[&format!("{P}backend-v6-data")],
            format!(r#"{{"VNI":1,"VtepMAC":"{MAC6}"}}"#)
        );
        assert_eq!(got[&format!("{P}public-ipv6")], "2001:db8::3");
        assert_eq!(got[&format!("{P}backend-data")], vxlan_data(1, MAC));
        // host-gw: flanneld writes backend-v6-data "null" and the address.
        let hostgw = LeaseAttrs {
            v4: Some(LeaseSide {
                public_ip: "172.18.0.3".parse().unwrap(),
                backend: LeaseBackend::HostGw,
            }),
            v6: Some(v6(LeaseBackend::HostGw)),
        };
        let got = own_annotations(&ann(), &hostgw, &BTreeMap::new());
        assert_eq!(got[&format!("{P}backend-v6-data")], "null");
        // An operator's public-ipv6-overwrite is published verbatim.
        let current = map(&[(&format!("{P}public-ipv6-overwrite"), "2001:db8:ff::1")]);
        let got = own_annotations(&ann(), &dual, &current);
        assert_eq!(got[&format!("{P}public-ipv6")], "2001:db8:ff::1");
        // Serving IPv4 only: the IPv6 pair of an earlier run is deleted (null in the patch),
        // and nothing is written when there is none.
        let v4 = vxlan_attrs();
        let a = ann();
        let stale = stale_annotations(&a, &v4);
        let mut current = own_annotations(&ann(), &v4, &BTreeMap::new());
        assert_eq!(annotation_patch(&current, &current, &stale), None);
        current.insert(format!("{P}public-ipv6"), "2001:db8::3".into());
        current.insert(format!("{P}backend-v6-data"), vxlan_data(1, MAC6));
        let want = own_annotations(&ann(), &v4, &current);
        assert_eq!(
            annotation_patch(&current, &want, &stale),
            Some(json!({"metadata": {"annotations": {
                format!("{P}public-ipv6"): null,
                format!("{P}backend-v6-data"): null,
            }}}))
        );
        assert!(stale_annotations(&ann(), &dual).is_empty());
        // IPv6-only: flannel's IPv6 pair and backend-type, and the IPv4 pair goes.
        let only6 = LeaseAttrs { v4: None, ..dual };
        let got = own_annotations(&ann(), &only6, &BTreeMap::new());
        assert_eq!(
            got.keys().cloned().collect::<Vec<_>>(),
            [
                "backend-type",
                "backend-v6-data",
                "kube-subnet-manager",
                "public-ipv6"
            ]
            .map(|k| format!("{P}{k}"))
        );
        assert_eq!(got[&format!("{P}backend-type")], "vxlan");
        assert_eq!(
            stale_annotations(&a, &only6),
            [format!("{P}backend-data"), format!("{P}public-ip")]
        );
    }

    #[test]
    fn stored_ipv6_mac_and_address() {
        let n = dual_node("me", 4);
        assert_eq!(
            stored_vtep_mac6(&n, &ann()),
            Some("12:c6:65:89:b6:04".parse().unwrap())
        );
        assert_eq!(stored_vtep_mac6(&peer_node("x", 1), &ann()), None);
        let n = set_ann(&n, "node-public-ipv6", Some(" 2001:db8::77 "));
        assert_eq!(
            stored_public_ipv6(&n, &ann()),
            Ok(Some("2001:db8::77".parse().unwrap()))
        );
        let n = set_ann(&n, "node-public-ipv6", Some("10.0.0.1"));
        assert_eq!(stored_public_ipv6(&n, &ann()), Err("10.0.0.1".into()));
    }

    #[test]
    fn a_flanneld_dual_stack_node_is_a_peer_in_both_families() {
        let c = dual_cfg("vxlan");
        let n = dual_node("a", 3);
        let p4 = peer_from_node(&n, &ann(), &c, None).unwrap().unwrap();
        assert_eq!(p4.subnet, net("10.244.3.0/24"));
        let p6 = peer6_from_node(&n, &ann(), &c, Some(net6("fd00:10:244::/64")))
            .unwrap()
            .unwrap();
        assert_eq!(
            (p6.subnet, p6.public_ip.to_string(), p6.vtep_mac),
            (
                net6("fd00:10:244:3::/64"),
                "2001:db8::3".into(),
                Some("12:c6:65:89:b6:03".parse().unwrap())
            )
        );
        // host-gw: no MAC on either side.
        let hg = set_ann(
            &set_ann(&n, "backend-type", Some("host-gw")),
            "backend-v6-data",
            Some("null"),
        );
        let p6 = peer6_from_node(&hg, &ann(), &dual_cfg("host-gw"), None)
            .unwrap()
            .unwrap();
        assert_eq!(p6.vtep_mac, None);
        // No IPv6 side: an IPv4-only node, or an IPv4-only network.
        let v4only = set_ann(&n, "public-ipv6", None);
        assert_eq!(peer6_from_node(&v4only, &ann(), &c, None), Ok(None));
        assert_eq!(peer6_from_node(&n, &ann(), &cfg(), None), Ok(None));
        assert_eq!(
            peer6_from_node(&peer_node("b", 2), &ann(), &c, None),
            Ok(None)
        );
    }

    #[test]
    fn bad_ipv6_sides_are_skipped_with_a_reason() {
        let c = dual_cfg("vxlan");
        let n = dual_node("a", 3);
        let cases: Vec<(Node, SkipReason, &str)> = vec![
            (
                set_ann(&n, "public-ipv6", Some("172.18.0.3")),
                SkipReason::BadPublicIp,
                "not an IPv6 address",
            ),
            (
                set_ann(&n, "public-ipv6", Some("::")),
                SkipReason::BadPublicIp,
                "cannot be a tunnel endpoint",
            ),
            (
                set_ann(&n, "public-ipv6", Some("fd00:10:244:7::1")),
                SkipReason::BadPublicIp,
                "inside the IPv6 pod network",
            ),
            (
                set_ann(&n, "backend-v6-data", None),
                SkipReason::BadBackendData,
                "backend-v6-data: missing",
            ),
            (
                set_ann(
                    &n,
                    "backend-v6-data",
                    Some(&vxlan_data(1, "01:00:5e:00:00:01")),
                ),
                SkipReason::BadBackendData,
                "backend-v6-data",
            ),
            (
                set_ann(&n, "backend-v6-data", Some(&vxlan_data(7, MAC6))),
                SkipReason::VniMismatch,
                "VNI 7",
            ),
        ];
        for (node, reason, part) in cases {
            let e = peer6_from_node(&node, &ann(), &c, None).unwrap_err();
            assert_eq!(e.reason, reason, "{e}");
            assert!(e.detail.contains(part), "{e} lacks {part:?}");
            // The IPv4 side is unaffected.
            assert!(peer_from_node(&node, &ann(), &c, None).unwrap().is_some());
        }
        let own = net6("fd00:10:244:3::/64");
        let e = peer6_from_node(&n, &ann(), &c, Some(own)).unwrap_err();
        assert_eq!(e.reason, SkipReason::OverlapsOwn);
    }

    #[test]
    fn the_node_watcher_sends_both_families_only_when_we_serve_ipv6() {
        type P6 = PeerOf<Ipv6Net>;
        let subnets6 = |evs: &[PeerEvent]| -> Vec<String> {
            evs.iter()
                .filter_map(|e| match e {
                    PeerEvent::Snapshot6(ps) => Some(format!(
                        "snap6 {:?}",
                        ps.iter()
                            .map(|p: &P6| p.subnet.to_string())
                            .collect::<Vec<_>>()
                    )),
                    PeerEvent::Upsert6(p) => Some(format!("up6 {} {}", p.subnet, p.public_ip)),
                    PeerEvent::Remove6(s) => Some(format!("rm6 {s}")),
                    _ => None,
                })
                .collect()
        };
        let own6 = Some(net6("fd00:10:244::/64"));
        let mut p =
            Peers::new("me", ann(), dual_cfg("vxlan"), Some(net("10.244.0.0/24"))).with_ipv6(own6);
        p.init();
        for n in [dual_node("a", 1), peer_node("b", 2)] {
            assert_eq!(p.init_apply(&n), vec![]);
        }
        let evs = p.init_done();
        assert_eq!(subnets6(&evs), ["snap6 [\"fd00:10:244:1::/64\"]"]);
        assert!(matches!(&evs[0], PeerEvent::Snapshot(ps) if ps.len() == 2));
        // A bad IPv6 side costs only that side, and is reported as the IPv6 side's.
        let bad = set_ann(&dual_node("c", 3), "public-ipv6", Some("garbage"));
        let a = p.apply(&bad);
        assert_eq!(es(&a.events[..1]), [up(3)]);
        assert!(subnets6(&a.events).is_empty(), "{:?}", a.events);
        assert_eq!(a.skips.len(), 1, "{:?}", a.skips);
        assert_eq!(
            (a.skips[0].node.as_str(), a.skips[0].side),
            ("c", " (IPv6 side)")
        );
        // Fixed: the IPv6 side comes; a changed public-ipv6 alone is an IPv6 upsert.
        let a = p.apply(&dual_node("c", 3));
        assert_eq!(subnets6(&a.events), ["up6 fd00:10:244:3::/64 2001:db8::3"]);
        let moved = set_ann(&dual_node("c", 3), "public-ipv6", Some("2001:db8::33"));
        assert_eq!(
            subnets6(&p.apply(&moved).events),
            ["up6 fd00:10:244:3::/64 2001:db8::33"]
        );
        // Two nodes with one IPv6 VTEP MAC at different addresses: the first keeps it.
        let copy = set_ann(
            &set_ann(
                &dual_node("d", 4),
                "backend-v6-data",
                Some(&vxlan_data(1, "12:c6:65:89:b6:01")),
            ),
            "public-ipv6",
            Some("2001:db8::4"),
        );
        let a = p.apply(&copy);
        assert!(subnets6(&a.events).is_empty(), "{:?}", a.events);
        assert!(
            a.skips
                .iter()
                .any(|s| s.skip.reason == SkipReason::DuplicateMac && !s.side.is_empty()),
            "{:?}",
            a.skips
        );
        // Deleting a node removes both sides (and frees the MAC for the held-back one).
        let evs = p.delete(&dual_node("a", 1)).events;
        assert!(
            evs.iter().any(|e| matches!(e, PeerEvent::Remove(_))),
            "{evs:?}"
        );
        assert_eq!(
            subnets6(&evs),
            [
                "rm6 fd00:10:244:1::/64",
                "up6 fd00:10:244:4::/64 2001:db8::4"
            ]
        );

        // Not serving IPv6 (udp, or no IPv6 podCIDR of ours): no IPv6 event at all.
        let mut p =
            Peers::new("me", ann(), dual_cfg("vxlan"), Some(net("10.244.0.0/24"))).with_ipv6(None);
        p.init();
        p.init_apply(&dual_node("a", 1));
        let evs = p.init_done();
        assert_eq!(evs.len(), 1, "{evs:?}");
        assert!(subnets6(&p.apply(&dual_node("c", 3)).events).is_empty());
        // Nor on an IPv4-only network, whatever we are told.
        let p = Peers::new("me", ann(), cfg(), None).with_ipv6(own6);
        assert!(p.own_subnet6.is_none());
    }

    #[test]
    fn a_node_losing_its_ipv6_side_is_removed_there_only_and_frees_its_mac() {
        let rm6_up6 = |evs: &[PeerEvent]| -> Vec<String> {
            evs.iter()
                .map(|e| match e {
                    PeerEvent::Upsert6(p) => format!("up6 {}", p.subnet),
                    PeerEvent::Remove6(s) => format!("rm6 {s}"),
                    other => format!("{other:?}"),
                })
                .collect()
        };
        let mut p = Peers::new("me", ann(), dual_cfg("vxlan"), Some(net("10.244.0.0/24")))
            .with_ipv6(Some(net6("fd00:10:244::/64")));
        p.init();
        // d announces a's IPv6 MAC at another address: held back while a has it.
        let d = set_ann(
            &dual_node("d", 4),
            "backend-v6-data",
            Some(&vxlan_data(1, "12:c6:65:89:b6:01")),
        );
        for n in [dual_node("a", 1), d] {
            p.init_apply(&n);
        }
        p.init_done();
        // a stops publishing its IPv6 address (it serves IPv4 only now): only its IPv6 side
        // goes, and d's comes.
        let a = p.apply(&set_ann(&dual_node("a", 1), "public-ipv6", None));
        assert_eq!(
            rm6_up6(&a.events),
            ["rm6 fd00:10:244:1::/64", "up6 fd00:10:244:4::/64"]
        );
        assert!(a.skips.is_empty(), "{:?}", a.skips);
        // Losing its IPv6 podCIDR does the same.
        let mut p = Peers::new("me", ann(), dual_cfg("vxlan"), None)
            .with_ipv6(Some(net6("fd00:10:244::/64")));
        p.init();
        p.init_apply(&dual_node("a", 1));
        p.init_done();
        let mut v = serde_json::to_value(dual_node("a", 1)).unwrap();
        v["spec"] = spec("10.244.1.0/24");
        assert_eq!(
            rm6_up6(&p.apply(&to_node(v)).events),
            ["rm6 fd00:10:244:1::/64"]
        );
    }

    #[test]
    fn a_bad_pod_cidr_is_reported_once_and_an_ipv4_only_nodes_ipv6_cidr_not_at_all() {
        let mut p = Peers::new("me", ann(), dual_cfg("vxlan"), None)
            .with_ipv6(Some(net6("fd00:10:244::/64")));
        p.init();
        p.init_done();
        let mut v = serde_json::to_value(dual_node("a", 1)).unwrap();
        v["spec"] = json!({"podCIDRs": ["10.244.1.0/24", "garbage"]});
        let a = p.apply(&to_node(v));
        assert_eq!(a.skips.len(), 1, "{:?}", a.skips);
        assert_eq!(
            (a.skips[0].side, a.skips[0].skip.reason),
            ("", SkipReason::BadPodCidr)
        );
        // No public-ipv6: an IPv4-only node, whatever its IPv6 podCIDR.
        let mut v = serde_json::to_value(set_ann(&dual_node("b", 2), "public-ipv6", None)).unwrap();
        v["spec"] = json!({"podCIDRs": ["10.244.2.0/24", "fd00:99::/64"]});
        let a = p.apply(&to_node(v));
        assert!(a.skips.is_empty(), "{:?}", a.skips);
        assert_eq!(es(&a.events), [up(2)]);
    }

    #[test]
    fn the_digest_follows_the_ipv6_annotations() {
        let n = dual_node("a", 1);
        for key in ["public-ipv6", "backend-v6-data"] {
            assert_ne!(
                node_digest(&n, &ann()),
                node_digest(&set_ann(&n, key, Some("x")), &ann()),
                "{key}"
            );
        }
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
