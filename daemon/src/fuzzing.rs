//! Fuzz harnesses for what twilld parses from others, shared by the cargo-fuzz targets in
//! `fuzz/` and the regression tests that replay their corpora (`daemon/tests/fuzz_corpus.rs`).
//! Each takes arbitrary bytes, must not panic, and asserts what the parser promises. Not an API.

use std::net::{IpAddr, Ipv4Addr};
use std::sync::OnceLock;

use ipnet::{Ipv4Net, Ipv6Net};
use serde_json::json;
use twill_proto::{
    encode_frame, is_supported_version, CniResult, Command, Dns, Interface, IpConfig, Request,
    Response, Route, SUPPORTED_VERSIONS,
};

use crate::cni;
use crate::config::{BackendKind, NetworkConfig};
use crate::lease::LeaseBackend;
use crate::lease::{
    check_against_own, endpoint_of, parse_peer, vtep_mac_of, LeaseAttrs, LeaseFamily,
};
use crate::policy::pods::{self, Attachment, LocalPod};
use crate::subnet::{
    dual_subnet_key, overlaps, parse_dual_subnet_key, parse_subnet_key, subnet_key as key_of, Cidr,
    SubnetRange,
};

/// However large the input, an error message quotes only an excerpt of it.
const MAX_MESSAGE: usize = 1024;

/// A request body as the socket carries it: what twilld reads from its fields before it touches
/// the kernel (version, `dns`, CHECK's prevResult, GC's attachment list, the pod's identity for
/// policy from CNI_ARGS and `args.cni`, the host veth name).
pub fn cni_request(data: &[u8]) {
    let Ok(req) = twill_proto::decode_body::<Request>(data) else {
        return;
    };
    let _ = is_supported_version(req.cni_version());
    // What twilld accepts goes into IPAM records one per line and into logs.
    let valid = cni::validate_request(&req).is_ok();
    if valid && matches!(req.command, Command::Add | Command::Check | Command::Del) {
        for v in [&req.container_id, &req.ifname] {
            assert!(!v.is_empty() && !v.chars().any(char::is_control), "{v:?}");
        }
    }
    if let Ok(dns) = cni::dns_of(&req.config) {
        // Copied into the ADD result, which must carry it in every version's shape.
        let result = CniResult {
            dns: dns.clone(),
            ..Default::default()
        };
        for v in SUPPORTED_VERSIONS {
            let back = CniResult::from_json(&result.to_json(v)).expect("a result parses back");
            assert_eq!(back.dns, result.dns);
        }
        // An ADD that passes the size check has an answer that fits a frame.
        if valid && cni::check_result_fits(&req, &dns).is_ok() {
            let answer = add_result(&req, dns);
            let frame = encode_frame(&Response::Ok(Some(answer.to_json(req.cni_version()))));
            assert!(frame.is_ok(), "the ADD result does not fit: {frame:?}");
        }
    }
    if let Ok(want) = cni::expected_of(&req) {
        assert_eq!(want.ifname, req.ifname);
    }
    let _ = cni::valid_attachments(&req.config);
    let host = cni::host_veth_name(&req.container_id, &req.ifname);
    assert!(host.len() <= 15 && host.bytes().all(|b| b.is_ascii_alphanumeric()));

    let attachment = Attachment {
        container_id: req.container_id.clone(),
        ifname: req.ifname.clone(),
    };
    let Ok(pod) = pods::from_cni(attachment, &req.args, &req.config, "n1") else {
        return;
    };
    // Its key names an etcd object `<namespace>/<name>`.
    let key = pod.key();
    let (ns, name) = key.split_once('/').expect("a pod key has a '/'");
    assert!(
        !ns.is_empty() && !name.is_empty() && !name.contains('/'),
        "{key}"
    );
    // The record in the state dir reads back as it was written.
    let saved = serde_json::to_vec(&pod).expect("a pod record serialises");
    let back: LocalPod = serde_json::from_slice(&saved).expect("a pod record parses back");
    assert_eq!(back, pod);
    // With its address the pod enters the policy model, and its etcd record reads back.
    let pod = pod.with_ip(IpAddr::V4(Ipv4Addr::new(10, 244, 1, 5)));
    let mut cluster = netpol::model::Cluster::new();
    let k = cluster
        .upsert_pod(&pod.pod)
        .expect("a pod from a CNI request enters the model");
    assert_eq!(k.to_string(), key);
    let record = serde_json::to_vec(&pod.pod).expect("a pod serialises");
    let back: netpol::api::Pod = serde_json::from_slice(&record).expect("a pod parses back");
    assert_eq!(back, pod.pod);
}

/// An ADD's result as twilld gives it for `req`.
fn add_result(req: &Request, dns: Dns) -> CniResult {
    CniResult {
        interfaces: vec![
            Interface {
                name: cni::host_veth_name(&req.container_id, &req.ifname),
                mac: "02:00:00:00:00:01".into(),
                mtu: Some(1450),
                sandbox: String::new(),
            },
            Interface {
                name: req.ifname.clone(),
                mac: "02:00:00:00:00:02".into(),
                mtu: Some(1450),
                sandbox: req.netns.clone(),
            },
        ],
        ips: vec![IpConfig {
            address: "10.244.1.5/24".into(),
            gateway: Some("10.244.1.1".into()),
            interface: Some(1),
        }],
        routes: vec![Route {
            dst: "0.0.0.0/0".into(),
            gw: Some("10.244.1.1".into()),
        }],
        dns,
    }
}

fn configs() -> &'static [NetworkConfig; 4] {
    static CONFIGS: OnceLock<[NetworkConfig; 4]> = OnceLock::new();
    CONFIGS.get_or_init(|| {
        [
            br#"{"Network":"10.244.0.0/16"}"#.as_slice(),
            br#"{"Network":"10.244.0.0/16","Backend":{"Type":"host-gw"}}"#,
            br#"{"Network":"10.244.0.0/16","EnableIPv6":true,"IPv6Network":"fd00:10:244::/56"}"#,
            br#"{"EnableIPv4":false,"EnableIPv6":true,"IPv6Network":"fd00:10:244::/56"}"#,
        ]
        .map(|c| NetworkConfig::parse(c).expect("a valid config"))
    })
}

/// A lease value as etcd holds it, optionally preceded by a line with its key
/// (`10.244.2.0-24\n{...}`; without one the key is 10.244.2.0-24): decoded, and judged as
/// another node's lease against a vxlan and a host-gw network, with and without an own subnet.
pub fn lease(data: &[u8]) {
    let mut subnet: Ipv4Net = "10.244.2.0/24".parse().expect("a subnet");
    let mut value = data;
    if let Some(i) = data.iter().position(|&b| b == b'\n') {
        if let Some(net) = std::str::from_utf8(&data[..i])
            .ok()
            .and_then(parse_subnet_key)
        {
            (subnet, value) = (net, &data[i + 1..]);
        }
    }
    let attrs = LeaseAttrs::from_json(value);
    match &attrs {
        Ok(a) => {
            let primary = a.primary().expect("a lease has a side");
            if let Some(v4) = a.v4 {
                let ip = v4.public_ip;
                assert!(!ip.is_unspecified() && !ip.is_multicast());
                assert!(!ip.is_broadcast() && !ip.is_loopback());
            }
            if let Some(mac) = a.vtep_mac() {
                assert!(!mac.is_zero() && !mac.is_multicast(), "{mac}");
                assert_eq!(vtep_mac_of(value), Some(mac));
            }
            assert_eq!(endpoint_of(value), Some(primary.public_ip));
            // Each side is the one its own check reads; beside an IPv4 side an IPv6 one is
            // kept exactly when it passes its check, alone it is the lease.
            assert_eq!(Ipv4Net::side_from_json(value).ok(), Some(a.v4));
            match Ipv6Net::side_from_json(value) {
                Ok(side) => assert_eq!(side, a.v6),
                Err(e) => {
                    assert!(a.v4.is_some() && a.v6.is_none(), "{e}");
                    assert!(e.to_string().len() <= MAX_MESSAGE, "{e}");
                }
            }
            if let Some(v6) = a.v6 {
                let ip = v6.public_ip;
                assert!(!ip.is_unspecified() && !ip.is_multicast() && !ip.is_loopback());
                if let LeaseBackend::Vxlan { vtep_mac, .. } = v6.backend {
                    assert!(
                        !vtep_mac.is_zero() && !vtep_mac.is_multicast(),
                        "{vtep_mac}"
                    );
                }
            }
            // What twilld writes for such a lease reads back the same.
            let written = a.to_json();
            assert_eq!(
                LeaseAttrs::from_json(written.as_bytes()).ok().as_ref(),
                Some(a)
            );
        }
        Err(e) => {
            assert!(e.to_string().len() <= MAX_MESSAGE, "{e}");
            let _ = (endpoint_of(value), vtep_mac_of(value));
        }
    }
    let own = LeaseAttrs::vxlan(
        Ipv4Addr::new(198, 18, 0, 1),
        1,
        "02:00:00:00:00:01".parse().expect("a MAC"),
    );
    for cfg in configs() {
        for own_net in [None, Some("10.244.1.0/24".parse().expect("a subnet"))] {
            let peer = match parse_peer(cfg, own_net, subnet, value) {
                Ok(p) => p,
                Err(e) => {
                    assert!(e.to_string().len() <= MAX_MESSAGE, "{e}");
                    continue;
                }
            };
            let a = attrs.as_ref().expect("a valid peer is a valid lease");
            let v4 = a.v4.expect("a valid IPv4 peer is a lease's IPv4 side");
            assert_eq!((peer.subnet, peer.public_ip), (subnet, v4.public_ip));
            assert_eq!(peer.vtep_mac, v4.vtep_mac());
            let range = cfg.ipv4.as_ref().expect("an IPv4 peer's network has IPv4");
            assert!(range.network.contains(&subnet) && subnet.prefix_len() == range.subnet_len);
            assert!(!range.network.contains(&peer.public_ip));

            assert!(own_net.is_none_or(|o| !overlaps(o, subnet)));
            if let (BackendKind::Vxlan, LeaseBackend::Vxlan { vni, .. }) =
                (cfg.backend.kind, v4.backend)
            {
                assert_eq!(vni, cfg.backend.vni);
            }
            let _ = check_against_own(&peer, &own);
        }
    }
}

/// The network config at `<prefix>/config`: what `parse` accepts is consistent, reads back
/// the same when written in flannel's format, and hands out subnets it accepts.
pub fn net_config(data: &[u8]) {
    let cfg = match NetworkConfig::parse(data) {
        Ok(c) => c,
        Err(_) => return,
    };
    assert!(
        cfg.ipv4.is_some() || cfg.ipv6.is_some(),
        "a network has a family"
    );
    assert!(cfg.backend.vni < 1 << 24 && cfg.backend.port != 0);
    assert!(cfg.backend.mtu.is_none_or(|m| (68..=65535).contains(&m)));
    assert!(cfg.ipv4.is_some() || cfg.backend.kind != BackendKind::Udp);

    let mut backend = json!({
        "Type": match cfg.backend.kind {
            BackendKind::Vxlan => "vxlan",
            BackendKind::HostGw => "host-gw",
            BackendKind::Udp => "udp",
        },
        "VNI": cfg.backend.vni,
        "Port": cfg.backend.port,
        "DirectRouting": cfg.backend.direct_routing,
    });
    if let Some(mtu) = cfg.backend.mtu {
        backend["MTU"] = json!(mtu);
    }
    let mut written = json!({ "Backend": backend });
    match &cfg.ipv4 {
        Some(r) => {
            check_range(r, 30);
            written["Network"] = json!(r.network.to_string());
            written["SubnetLen"] = json!(r.subnet_len);
            written["SubnetMin"] = json!(r.subnet_min.to_string());
            written["SubnetMax"] = json!(r.subnet_max.to_string());
        }
        None => written["EnableIPv4"] = json!(false),
    }
    if let Some(r) = &cfg.ipv6 {
        check_range(r, 126);
        written["EnableIPv6"] = json!(true);
        written["IPv6Network"] = json!(r.network.to_string());
        written["IPv6SubnetLen"] = json!(r.subnet_len);
        written["IPv6SubnetMin"] = json!(r.subnet_min.to_string());
        written["IPv6SubnetMax"] = json!(r.subnet_max.to_string());
    }
    let again = NetworkConfig::parse(written.to_string().as_bytes());
    assert_eq!(again.ok().as_ref(), Some(&cfg), "{written}");
}

/// The harnesses' configs all have IPv4.
fn v4_network(cfg: &NetworkConfig) -> Ipv4Net {
    cfg.ipv4
        .as_ref()
        .expect("the harness configs have IPv4")
        .network
}

/// A family's range as the config hands it out: aligned, inside its network, not empty.
fn check_range<N: Cidr>(r: &SubnetRange<N>, max_len: u8) {
    let net = r.network;
    assert_eq!(
        N::from_bits(net.start(), net.prefix()),
        Some(net),
        "host bits are dropped"
    );
    assert!(r.subnet_len >= net.prefix() + 2 && r.subnet_len <= max_len);
    for a in [r.subnet_min, r.subnet_max] {
        assert!(net.contains_addr(a), "{a} outside {net}");
        let s = N::from_bits(N::addr_bits(a), r.subnet_len).expect("a valid length");
        assert_eq!(s.start(), N::addr_bits(a), "{a} is not aligned");
        assert!(r.fits(s));
    }
    assert!(r.subnet_min <= r.subnet_max && r.subnet_count() >= 1);
    let free = r
        .choose_free(&Default::default())
        .expect("an empty network has room");
    assert!(r.fits(free) && net.contains_net(free), "{free}");
}

/// Keys under `<prefix>/subnets/`, one per line: a key is one subnet's only spelling (plus a
/// dual-stack suffix), printed back it parses to the same subnet, and overlap is symmetric.
pub fn subnet_key(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let nets: Vec<Ipv4Net> = text
        .split('\n')
        .take(16)
        .filter_map(|key| {
            let net = parse_subnet_key(key)?;
            assert_eq!(net.network(), net.addr(), "{key:?} has host bits");
            let printed = key_of(net);
            assert_eq!(parse_subnet_key(&printed), Some(net));
            let v4 = key.split('&').next().unwrap_or_default();
            assert_eq!(v4, printed, "{key:?} is another spelling of {net}");
            // Both parts: one spelling for the pair, too.
            let (v4net, v6) = parse_dual_subnet_key(key).expect("parsed above");
            assert_eq!(v4net, net);
            if let Some(v6) = v6 {
                assert_eq!(v6.network(), v6.addr(), "{key:?} has v6 host bits");
            }
            assert_eq!(dual_subnet_key(Some(net), v6), key, "another spelling");
            Some(net)
        })
        .collect();
    for a in &nets {
        for b in &nets {
            let (a0, a1) = (u32::from(a.network()), u32::from(a.broadcast()));
            let (b0, b1) = (u32::from(b.network()), u32::from(b.broadcast()));
            assert_eq!(overlaps(*a, *b), a0 <= b1 && b0 <= a1, "{a} {b}");
            assert_eq!(a.end(), u128::from(a1));
        }
    }
}

/// What etcd holds under `<prefix>/subnets/` as it changes, one change per line, through the
/// peer watcher's view (`registry::view`) as twilld runs it, on a v4-only, a dual-stack and an
/// IPv6-only network (no IPv4 event ever there):
/// - `+REV KEY VALUE`: a put of KEY created at revision REV (a number; 0 if not);
/// - `-KEY`: a delete;
/// - `=`: a re-list (after a compaction or a reconnect);
/// - `oN`: this node's lease is now 10.244.N.0/24, from 198.18.0.N with MAC 02:00:00:00:00:N
///   (dual stack: also fd00:10:244:N::/64 from fd00:198:18::N with MAC 02:00:00:00:06:N;
///   IPv6-only: only that).
///
/// After each, the peers the daemon was told (its snapshots, upserts and removes, per family)
/// are exactly those a fresh list of the same keys gives, and they are consistent: none
/// overlaps our subnet or claims our identity, and no VTEP MAC is announced at two addresses.
pub fn peer_view(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    peer_view_on(&configs()[0], &text);
    peer_view_on(&configs()[2], &text);
    peer_view_on(&configs()[3], &text);
}

fn peer_view_on(cfg: &NetworkConfig, text: &str) {
    use std::collections::BTreeMap;
    use std::net::Ipv6Addr;

    use ipnet::Ipv6Net;

    use crate::lease::{check_against_own_of, LeaseV6};
    use crate::peer::PeerOf;
    use crate::registry::view::PeerView;
    use crate::registry::{OwnLease, PeerEvent, SubnetChange, SubnetKv};

    let dual = cfg.ipv6.is_some();
    let only6 = cfg.ipv4.is_none();
    let own_of = |n: u8| {
        let mut attrs = LeaseAttrs::vxlan(
            Ipv4Addr::new(198, 18, 0, n),
            1,
            crate::mac::MacAddr([2, 0, 0, 0, 0, n]),
        );
        if only6 {
            attrs.v4 = None;
        }
        attrs.v6 = dual.then_some(LeaseV6 {
            public_ip: Ipv6Addr::new(0xfd00, 0x198, 0x18, 0, 0, 0, 0, n.into()),
            backend: LeaseBackend::Vxlan {
                vni: 1,
                vtep_mac: crate::mac::MacAddr([2, 0, 0, 0, 6, n]),
            },
        });
        OwnLease {
            subnet: (!only6)
                .then(|| Ipv4Net::new(Ipv4Addr::new(10, 244, n, 0), 24).expect("a /24")),
            subnet6: dual.then(|| {
                Ipv6Net::new(Ipv6Addr::new(0xfd00, 0x10, 0x244, n.into(), 0, 0, 0, 0), 64)
                    .expect("a /64")
            }),
            attrs,
        }
    };
    let mut own = own_of(1);
    let mut store: BTreeMap<String, SubnetKv> = BTreeMap::new();
    let mut view = PeerView::new(cfg.clone(), own.clone());
    type Told<N> = BTreeMap<N, PeerOf<N>>;
    let mut told: Told<Ipv4Net> = BTreeMap::new();
    let mut told6: Told<Ipv6Net> = BTreeMap::new();
    let mut revision = 0;
    for line in text.split('\n').take(64) {
        let update = if let Some(put) = line.strip_prefix('+') {
            let mut parts = put.splitn(3, ' ');
            let created: i64 = parts.next().unwrap_or_default().parse().unwrap_or(0);
            let key = parts.next().unwrap_or_default().to_string();
            let value = parts.next().unwrap_or_default().as_bytes();
            revision += 1;
            let kv = SubnetKv::new(key.clone(), value, 0, revision, created);
            store.insert(key, kv.clone());
            view.apply(SubnetChange::Put(kv))
        } else if let Some(key) = line.strip_prefix('-') {
            store.remove(key);
            view.apply(SubnetChange::Delete(key.to_string()))
        } else if line == "=" {
            view.reset(own.clone(), store.values().cloned().collect())
        } else if let Some(n) = line.strip_prefix('o').and_then(|n| n.parse::<u8>().ok()) {
            own = own_of(n);
            view.set_own(own.clone())
        } else {
            continue;
        };
        fn by_subnet<N: crate::subnet::Cidr>(peers: &[PeerOf<N>]) -> Told<N> {
            peers.iter().map(|p| (p.subnet, *p)).collect()
        }
        for ev in update.events {
            let v4 = matches!(
                ev,
                PeerEvent::Snapshot(_) | PeerEvent::Upsert(_) | PeerEvent::Remove(_)
            );
            assert!(
                !(only6 && v4),
                "an IPv4 event on an IPv6-only network: {ev:?}"
            );
            match ev {
                PeerEvent::Snapshot(peers) => told = by_subnet(&peers),
                PeerEvent::Upsert(p) => {
                    told.insert(p.subnet, p);
                }
                PeerEvent::Remove(net) => {
                    told.remove(&net);
                }
                PeerEvent::Snapshot6(peers) => told6 = by_subnet(&peers),
                PeerEvent::Upsert6(p) => {
                    assert!(dual, "an IPv6 peer on a v4-only network: {p:?}");
                    told6.insert(p.subnet, p);
                }
                PeerEvent::Remove6(net) => {
                    told6.remove(&net);
                }
                PeerEvent::ListFailed(_) => unreachable!("the view does not list"),
            }
        }
        let mut fresh = PeerView::new(cfg.clone(), own.clone());
        let (listed, listed6) = match fresh
            .reset(own.clone(), store.values().cloned().collect())
            .events
            .as_slice()
        {
            [PeerEvent::Snapshot(peers)] if !dual => (by_subnet(peers), BTreeMap::new()),
            [PeerEvent::Snapshot6(peers6)] if only6 => (BTreeMap::new(), by_subnet(peers6)),
            [PeerEvent::Snapshot(peers), PeerEvent::Snapshot6(peers6)] if dual && !only6 => {
                (by_subnet(peers), by_subnet(peers6))
            }
            other => panic!("a list gives one snapshot per family, not {other:?}"),
        };
        assert_eq!(
            told, listed,
            "after {line:?} the daemon's peers differ from a fresh list"
        );
        assert_eq!(
            told6, listed6,
            "after {line:?} the daemon's IPv6 peers differ from a fresh list"
        );
        fn consistent<N: crate::lease::LeaseFamily>(
            told: &Told<N>,
            own: Option<(N, N::Addr, Option<crate::mac::MacAddr>)>,
        ) {
            let mut macs = BTreeMap::new();
            for p in told.values() {
                if let Some((subnet, ip, mac)) = own {
                    assert!(!overlaps(p.subnet, subnet), "{p:?} overlaps our subnet");
                    assert!(
                        check_against_own_of(p, ip, mac).is_ok(),
                        "{p:?} claims our identity"
                    );
                    assert!(p.public_ip != ip, "{p:?} is us");
                }
                if let Some(mac) = p.vtep_mac {
                    let ip = *macs.entry(mac).or_insert(p.public_ip);
                    assert_eq!(ip, p.public_ip, "VTEP MAC {mac} at two addresses");
                }
            }
        }
        if let (Some(subnet), Some(v4)) = (own.subnet, own.attrs.v4) {
            consistent(&told, Some((subnet, v4.public_ip, v4.vtep_mac())));
        }
        if let (Some(subnet6), Some(v6)) = (own.subnet6, own.attrs.v6) {
            consistent(&told6, Some((subnet6, v6.public_ip, v6.vtep_mac())));
        }
    }
}

/// Node objects as the Node watcher sees them (Kubernetes mode), one event per line, through
/// `registry::kube::node::Peers` on a dual-stack vxlan network, as twilld (`me`, 10.244.0.0/24
/// and fd00:10:244::/64) runs it:
/// - `+JSON`: a Node was added or changed (decoded as the watcher decodes it; a line that
///   does not decode is skipped, as the watcher would never deliver it);
/// - `-NAME`: Node NAME was deleted;
/// - `=`: a re-list of the Nodes held now.
///
/// After each, the peers the daemon was told, per family, are exactly those a fresh list of
/// the same Nodes gives; none overlaps our subnet or another told peer, none has an address
/// inside the pod network, and no VTEP MAC is announced at two addresses. Every Node's own
/// judgement keeps the parsers' promises.
pub fn kube_nodes(data: &[u8]) {
    use std::collections::BTreeMap;

    use ipnet::Ipv6Net;
    use k8s_openapi::api::core::v1::Node;

    use crate::peer::PeerOf;
    use crate::registry::kube::annotations::Annotations;
    use crate::registry::kube::node::{peer6_from_node, peer_from_node, Peers};
    use crate::registry::kube::slim::SlimNode;
    use crate::registry::PeerEvent;

    let cfg = &configs()[2];
    let range = cfg.ipv6.as_ref().expect("a dual-stack config");
    let own: Ipv4Net = "10.244.0.0/24".parse().expect("a subnet");
    let own6: Ipv6Net = "fd00:10:244::/64".parse().expect("a subnet");
    let ann = Annotations::default();
    let peers = || Peers::new("me", ann.clone(), cfg.clone(), Some(own)).with_ipv6(Some(own6));
    type Told<N> = BTreeMap<N, PeerOf<N>>;
    fn by_subnet<N: Cidr>(peers: &[PeerOf<N>]) -> Told<N> {
        peers.iter().map(|p| (p.subnet, *p)).collect()
    }
    fn tell(events: Vec<PeerEvent>, told: &mut Told<Ipv4Net>, told6: &mut Told<Ipv6Net>) {
        for ev in events {
            match ev {
                PeerEvent::Snapshot(p) => *told = by_subnet(&p),
                PeerEvent::Upsert(p) => {
                    told.insert(p.subnet, p);
                }
                PeerEvent::Remove(n) => {
                    told.remove(&n);
                }
                PeerEvent::Snapshot6(p) => *told6 = by_subnet(&p),
                PeerEvent::Upsert6(p) => {
                    told6.insert(p.subnet, p);
                }
                PeerEvent::Remove6(n) => {
                    told6.remove(&n);
                }
                PeerEvent::ListFailed(_) => unreachable!("Peers does not list"),
            }
        }
    }
    fn consistent<N: Cidr>(told: &Told<N>, own: N, network: N) {
        let mut macs = BTreeMap::new();
        let all: Vec<&PeerOf<N>> = told.values().collect();
        for (i, p) in all.iter().enumerate() {
            assert!(!overlaps(p.subnet, own), "{p:?} overlaps our subnet");
            assert!(!network.contains_addr(p.public_ip), "{p:?}: a pod address");
            for q in &all[i + 1..] {
                assert!(!overlaps(p.subnet, q.subnet), "{p:?} overlaps {q:?}");
            }
            if let Some(mac) = p.vtep_mac {
                assert!(!mac.is_zero() && !mac.is_multicast(), "{mac}");
                let ip = *macs.entry(mac).or_insert(p.public_ip);
                assert_eq!(ip, p.public_ip, "VTEP MAC {mac} at two addresses");
            }
        }
    }

    let mut held: BTreeMap<String, Node> = BTreeMap::new();
    let mut p = peers();
    p.init();
    let mut told = BTreeMap::new();
    let mut told6 = BTreeMap::new();
    tell(p.init_done(), &mut told, &mut told6);
    for line in String::from_utf8_lossy(data).split('\n').take(64) {
        let events = if let Some(json) = line.strip_prefix('+') {
            let Ok(node) = serde_json::from_str::<SlimNode>(json).map(SlimNode::into_node) else {
                continue;
            };
            for (judged4, judged6) in [
                (
                    peer_from_node(&node, &ann, cfg, Some(own)).map(|p| p.map(|p| p.subnet)),
                    peer6_from_node(&node, &ann, cfg, Some(own6)).map(|p| p.map(|p| p.subnet)),
                ),
                (
                    peer_from_node(&node, &ann, cfg, None).map(|p| p.map(|p| p.subnet)),
                    peer6_from_node(&node, &ann, cfg, None).map(|p| p.map(|p| p.subnet)),
                ),
            ] {
                match judged4 {
                    Ok(Some(s)) => assert!(v4_network(cfg).contains(&s), "{s}"),
                    Ok(None) => {}
                    Err(e) => assert!(e.to_string().len() <= MAX_MESSAGE, "{e}"),
                }
                match judged6 {
                    Ok(Some(s)) => assert!(range.network.contains(&s), "{s}"),
                    Ok(None) => {}
                    Err(e) => assert!(e.to_string().len() <= MAX_MESSAGE, "{e}"),
                }
            }
            let applied = p.apply(&node);
            for s in &applied.skips {
                assert!(s.skip.to_string().len() <= MAX_MESSAGE, "{}", s.skip);
            }
            if let Some(name) = node.metadata.name.clone() {
                held.insert(name, node);
            }
            applied.events
        } else if let Some(name) = line.strip_prefix('-') {
            match held.remove(name) {
                Some(node) => {
                    let gone = p.delete(&node);
                    for s in &gone.skips {
                        assert!(s.skip.to_string().len() <= MAX_MESSAGE, "{}", s.skip);
                    }
                    gone.events
                }
                None => continue,
            }
        } else if line == "=" {
            p.init();
            for n in held.values() {
                p.init_apply(n);
            }
            p.init_done()
        } else {
            continue;
        };
        tell(events, &mut told, &mut told6);
        // A fresh list of the same Nodes, in name order.
        let mut fresh = peers();
        fresh.init();
        for n in held.values() {
            fresh.init_apply(n);
        }
        let (mut listed, mut listed6) = (BTreeMap::new(), BTreeMap::new());
        tell(fresh.init_done(), &mut listed, &mut listed6);
        // Which of two Nodes keeps a contested MAC or subnet does not depend on the order
        // they came in: what was told after every event is what a fresh list gives.
        consistent(&told, own, v4_network(cfg));
        consistent(&told6, own6, range.network);
        assert_eq!(told, listed, "the events give the fresh list's peers");
        assert_eq!(
            told6, listed6,
            "the events give the fresh list's IPv6 peers"
        );
    }
}
