//! The reconcile diff: desired peers vs what the kernel has on our VXLAN device -> operations.
//! Pure, unit-tested, no kernel needed.
//!
//! Kernel keys decide what a "delete" may touch: a neighbour is keyed by its IP and a route by
//! its destination, so a wrong MAC or gateway is fixed by a replace alone (a delete would remove
//! the fresh entry too). FDB entries are keyed by (MAC, dst), so a stale pair is deleted.

use std::collections::{HashMap, HashSet};

use ipnet::Ipv4Net;

use crate::mac::MacAddr;
use crate::peer::PeerOf;
use crate::subnet::Cidr;

/// One kernel change on the VXLAN device of family N. Adds are "replace" (idempotent).
///
/// A route whose gateway is the destination's network address goes out of the VXLAN device
/// (onlink); any other gateway is a DirectRouting route via the peer's public IP on the underlay.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum OpOf<N: Cidr> {
    SetNeigh { ip: N::Addr, mac: MacAddr },
    DelNeigh { ip: N::Addr, mac: MacAddr },
    SetFdb { mac: MacAddr, dst: N::Addr },
    DelFdb { mac: MacAddr, dst: N::Addr },
    SetRoute { dst: N, gw: N::Addr },
    DelRoute { dst: N, gw: N::Addr },
}

pub type Op = OpOf<Ipv4Net>;
pub type EntryKey = EntryKeyOf<Ipv4Net>;
pub type KernelEntries = KernelEntriesOf<Ipv4Net>;
pub type PeerChange = PeerChangeOf<Ipv4Net>;

impl<N: Cidr> OpOf<N> {
    pub fn is_delete(&self) -> bool {
        matches!(
            self,
            OpOf::DelNeigh { .. } | OpOf::DelFdb { .. } | OpOf::DelRoute { .. }
        )
    }
}

/// A kernel entry on the overlay device, as ops and deletion notifications name it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum EntryKeyOf<N: Cidr> {
    Neigh(N::Addr),
    Fdb(MacAddr, N::Addr),
    Route(N),
}

impl<N: Cidr> EntryKeyOf<N> {
    pub fn of(op: &OpOf<N>) -> Self {
        match *op {
            OpOf::SetNeigh { ip, .. } | OpOf::DelNeigh { ip, .. } => EntryKeyOf::Neigh(ip),
            OpOf::SetFdb { mac, dst } | OpOf::DelFdb { mac, dst } => EntryKeyOf::Fdb(mac, dst),
            OpOf::SetRoute { dst, .. } | OpOf::DelRoute { dst, .. } => EntryKeyOf::Route(dst),
        }
    }

    /// The entries a peer needs (a direct peer has only the route; the other keys never occur
    /// in its ops).
    pub fn of_peer(p: &PeerOf<N>) -> Vec<Self> {
        let mut keys = vec![EntryKeyOf::Route(p.subnet), EntryKeyOf::Neigh(p.gateway())];
        keys.extend(p.vtep_mac.map(|m| EntryKeyOf::Fdb(m, p.public_ip)));
        keys
    }
}

/// What the kernel has on the device (only entries twill manages: permanent neighbours,
/// self fdb entries with a dst, routes via the device).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KernelEntriesOf<N: Cidr> {
    pub neighs: Vec<(N::Addr, MacAddr)>,
    pub fdb: Vec<(MacAddr, N::Addr)>,
    pub routes: Vec<(N, N::Addr)>,
}

// Derived Default would ask N for one.
impl<N: Cidr> Default for KernelEntriesOf<N> {
    fn default() -> Self {
        KernelEntriesOf {
            neighs: Vec::new(),
            fdb: Vec::new(),
            routes: Vec::new(),
        }
    }
}

/// A peer appeared (old None), changed, or went away (new None).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerChangeOf<N: Cidr> {
    pub old: Option<PeerOf<N>>,
    pub new: Option<PeerOf<N>>,
}

/// How a peer's subnet is reached, decided per peer by the backend.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Path {
    /// A plain route via the peer's public IP on the underlay (host-gw, DirectRouting).
    Direct,
    /// Through the VXLAN device: neighbour, FDB entry and an onlink route.
    Overlay,
    /// It cannot be reached (host-gw and not on our segment; no VTEP and not on our segment):
    /// nothing is installed, so nothing wrong is either.
    Unreachable,
    /// Through the udp backend's TUN device and its userspace peer table: no kernel entry of
    /// its own (one route covers the whole network).
    Userspace,
}

/// The kernel entries one peer needs on its path.
#[derive(Clone, Debug, PartialEq, Eq)]
struct PeerEntries<N: Cidr> {
    neigh: Option<(N::Addr, MacAddr)>,
    fdb: Option<(MacAddr, N::Addr)>,
    route: (N, N::Addr),
}

/// A change's entries before and after.
type Planned<N> = (Option<PeerEntries<N>>, Option<PeerEntries<N>>);

fn entries<N: Cidr>(p: &PeerOf<N>, path: Path) -> Option<PeerEntries<N>> {
    match (path, p.vtep_mac) {
        (Path::Direct, _) => Some(PeerEntries {
            neigh: None,
            fdb: None,
            route: (p.subnet, p.public_ip),
        }),
        (Path::Overlay, Some(mac)) => Some(PeerEntries {
            neigh: Some((p.gateway(), mac)),
            fdb: Some((mac, p.public_ip)),
            route: (p.subnet, p.gateway()),
        }),
        (Path::Overlay, None) | (Path::Unreachable, _) | (Path::Userspace, _) => None,
    }
}

fn set_ops<N: Cidr>(e: &PeerEntries<N>, out: &mut Vec<OpOf<N>>) {
    if let Some((ip, mac)) = e.neigh {
        out.push(OpOf::SetNeigh { ip, mac });
    }
    if let Some((mac, dst)) = e.fdb {
        out.push(OpOf::SetFdb { mac, dst });
    }
    out.push(OpOf::SetRoute {
        dst: e.route.0,
        gw: e.route.1,
    });
}

/// Ops for incremental changes, in flannel's order (adds: neigh, fdb, route; removals: route,
/// fdb, neigh), every peer through the overlay.
pub fn change_ops<N: Cidr>(changes: &[PeerChangeOf<N>]) -> Vec<OpOf<N>> {
    change_ops_with(changes, |_| Path::Overlay)
}

/// `change_ops` where `path(peer)` says how each peer is reached.
pub fn change_ops_with<N: Cidr>(
    changes: &[PeerChangeOf<N>],
    path: impl Fn(&PeerOf<N>) -> Path,
) -> Vec<OpOf<N>> {
    let mut out = Vec::new();
    // Keys some change in this batch sets: never delete those (e.g. a subnet moving between
    // two leases in the same batch).
    let mut wanted_neigh = HashSet::new();
    let mut wanted_fdb = HashSet::new();
    let mut wanted_route = HashSet::new();
    let planned: Vec<Planned<N>> = changes
        .iter()
        .filter(|c| c.old != c.new)
        .map(|c| {
            (
                c.old.and_then(|p| entries(&p, path(&p))),
                c.new.and_then(|p| entries(&p, path(&p))),
            )
        })
        .collect();
    for (_, new) in &planned {
        if let Some(n) = new {
            if let Some((ip, _)) = n.neigh {
                wanted_neigh.insert(ip);
            }
            if let Some(f) = n.fdb {
                wanted_fdb.insert(f);
            }
            wanted_route.insert(n.route.0);
        }
    }
    for (old, new) in &planned {
        if let Some(n) = new {
            set_ops(n, &mut out);
        }
        if let Some(o) = old {
            if !wanted_route.contains(&o.route.0) {
                out.push(OpOf::DelRoute {
                    dst: o.route.0,
                    gw: o.route.1,
                });
            }
            if let Some((mac, dst)) = o.fdb {
                if !wanted_fdb.contains(&(mac, dst)) {
                    out.push(OpOf::DelFdb { mac, dst });
                }
            }
            if let Some((ip, mac)) = o.neigh {
                if !wanted_neigh.contains(&ip) {
                    out.push(OpOf::DelNeigh { ip, mac });
                }
            }
        }
    }
    out
}

/// Full diff both ways: add/replace what is missing or wrong, remove what no peer wants; every
/// peer through the overlay.
pub fn diff<N: Cidr>(desired: &[PeerOf<N>], actual: &KernelEntriesOf<N>) -> Vec<OpOf<N>> {
    diff_with(desired, actual, |_| Path::Overlay)
}

/// `diff` where `path(peer)` says how each peer is reached (an unreachable peer gets nothing,
/// so whatever it had is removed). Adds come first, per peer in neigh -> fdb -> route order,
/// then removals (routes, fdb, neighbours).
pub fn diff_with<N: Cidr>(
    desired: &[PeerOf<N>],
    actual: &KernelEntriesOf<N>,
    path: impl Fn(&PeerOf<N>) -> Path,
) -> Vec<OpOf<N>> {
    let have_neigh: HashMap<N::Addr, HashSet<MacAddr>> =
        actual
            .neighs
            .iter()
            .fold(HashMap::new(), |mut m, (ip, mac)| {
                m.entry(*ip).or_default().insert(*mac);
                m
            });
    let have_fdb: HashSet<(MacAddr, N::Addr)> = actual.fdb.iter().copied().collect();
    let have_route: HashSet<(N, N::Addr)> = actual.routes.iter().copied().collect();

    let mut out = Vec::new();
    let mut want_neigh = HashSet::new();
    let mut want_fdb = HashSet::new();
    let mut want_route = HashSet::new();
    for e in desired.iter().filter_map(|p| entries(p, path(p))) {
        if let Some((ip, mac)) = e.neigh {
            let ok = have_neigh
                .get(&ip)
                .is_some_and(|m| m.len() == 1 && m.contains(&mac));
            if !ok && want_neigh.insert(ip) {
                out.push(OpOf::SetNeigh { ip, mac });
            }
            want_neigh.insert(ip);
        }
        if let Some(f) = e.fdb {
            if !have_fdb.contains(&f) && want_fdb.insert(f) {
                out.push(OpOf::SetFdb { mac: f.0, dst: f.1 });
            }
            want_fdb.insert(f);
        }
        let r = e.route;
        if !have_route.contains(&r) && want_route.insert(r) {
            out.push(OpOf::SetRoute { dst: r.0, gw: r.1 });
        }
        want_route.insert(r);
    }
    // Removals. A route delete names its gateway, so it only matches the stale route even when
    // the replace above already took its place.
    let mut seen = HashSet::new();
    for &(dst, gw) in &actual.routes {
        if !want_route.contains(&(dst, gw)) && seen.insert((dst, gw)) {
            out.push(OpOf::DelRoute { dst, gw });
        }
    }
    let mut seen = HashSet::new();
    for &(mac, dst) in &actual.fdb {
        if !want_fdb.contains(&(mac, dst)) && seen.insert((mac, dst)) {
            out.push(OpOf::DelFdb { mac, dst });
        }
    }
    let mut seen = HashSet::new();
    for &(ip, mac) in &actual.neighs {
        if !want_neigh.contains(&ip) && seen.insert(ip) {
            out.push(OpOf::DelNeigh { ip, mac });
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::peer::test_peer as peer;
    use crate::peer::Peer;
    use std::net::Ipv4Addr;

    fn adds(p: &Peer) -> Vec<Op> {
        vec![
            Op::SetNeigh {
                ip: p.gateway(),
                mac: p.vtep_mac.unwrap(),
            },
            Op::SetFdb {
                mac: p.vtep_mac.unwrap(),
                dst: p.public_ip,
            },
            Op::SetRoute {
                dst: p.subnet,
                gw: p.gateway(),
            },
        ]
    }

    fn dels(p: &Peer) -> Vec<Op> {
        vec![
            Op::DelRoute {
                dst: p.subnet,
                gw: p.gateway(),
            },
            Op::DelFdb {
                mac: p.vtep_mac.unwrap(),
                dst: p.public_ip,
            },
            Op::DelNeigh {
                ip: p.gateway(),
                mac: p.vtep_mac.unwrap(),
            },
        ]
    }

    fn kernel_of(peers: &[Peer]) -> KernelEntries {
        KernelEntries {
            neighs: peers
                .iter()
                .map(|p| (p.gateway(), p.vtep_mac.unwrap()))
                .collect(),
            fdb: peers
                .iter()
                .map(|p| (p.vtep_mac.unwrap(), p.public_ip))
                .collect(),
            routes: peers.iter().map(|p| (p.subnet, p.gateway())).collect(),
        }
    }

    #[test]
    fn add_is_neigh_fdb_route() {
        let p = peer(2, 2, 2);
        let ops = change_ops(&[PeerChange {
            old: None,
            new: Some(p),
        }]);
        assert_eq!(ops, adds(&p));
        assert_eq!(
            ops[0],
            Op::SetNeigh {
                ip: "10.244.2.0".parse().unwrap(),
                mac: p.vtep_mac.unwrap()
            }
        );
        assert_eq!(
            ops[2],
            Op::SetRoute {
                dst: "10.244.2.0/24".parse().unwrap(),
                gw: "10.244.2.0".parse().unwrap()
            }
        );
    }

    #[test]
    fn removal_is_route_fdb_neigh() {
        let p = peer(2, 2, 2);
        assert_eq!(
            change_ops(&[PeerChange {
                old: Some(p),
                new: None
            }]),
            dels(&p)
        );
    }

    #[test]
    fn unchanged_is_nothing() {
        let p = peer(2, 2, 2);
        assert!(change_ops(&[PeerChange {
            old: Some(p),
            new: Some(p)
        }])
        .is_empty());
    }

    #[test]
    fn mac_change_sets_new_and_drops_old_fdb_only() {
        let old = peer(2, 2, 2);
        let new = peer(2, 2, 9);
        let ops = change_ops(&[PeerChange {
            old: Some(old),
            new: Some(new),
        }]);
        let mut want = adds(&new);
        want.push(Op::DelFdb {
            mac: old.vtep_mac.unwrap(),
            dst: old.public_ip,
        });
        assert_eq!(ops, want);
    }

    #[test]
    fn ip_change_drops_old_fdb_dst() {
        let old = peer(2, 2, 2);
        let new = peer(2, 7, 2);
        let ops = change_ops(&[PeerChange {
            old: Some(old),
            new: Some(new),
        }]);
        let mut want = adds(&new);
        want.push(Op::DelFdb {
            mac: old.vtep_mac.unwrap(),
            dst: old.public_ip,
        });
        assert_eq!(ops, want);
    }

    #[test]
    fn subnet_change_drops_old_route_and_neigh() {
        let old = peer(2, 2, 2);
        let new = peer(3, 2, 2);
        let ops = change_ops(&[PeerChange {
            old: Some(old),
            new: Some(new),
        }]);
        let mut want = adds(&new);
        // Same MAC and dst: the FDB entry is shared, not deleted.
        want.push(Op::DelRoute {
            dst: old.subnet,
            gw: old.gateway(),
        });
        want.push(Op::DelNeigh {
            ip: old.gateway(),
            mac: old.vtep_mac.unwrap(),
        });
        assert_eq!(ops, want);
    }

    #[test]
    fn batch_never_deletes_what_another_change_sets() {
        // A node re-leased: old subnet goes, new one comes, same MAC and IP.
        let old = peer(2, 2, 2);
        let new = peer(3, 2, 2);
        let ops = change_ops(&[
            PeerChange {
                old: Some(old),
                new: None,
            },
            PeerChange {
                old: None,
                new: Some(new),
            },
        ]);
        assert!(
            !ops.contains(&Op::DelFdb {
                mac: old.vtep_mac.unwrap(),
                dst: old.public_ip
            }),
            "{ops:?}"
        );
        assert!(ops.contains(&Op::DelRoute {
            dst: old.subnet,
            gw: old.gateway()
        }));
        assert!(ops.contains(&Op::DelNeigh {
            ip: old.gateway(),
            mac: old.vtep_mac.unwrap()
        }));
    }

    #[test]
    fn diff_empty_kernel_adds_everything_in_per_peer_order() {
        let peers = [peer(2, 2, 2), peer(3, 3, 3)];
        let ops = diff(&peers, &KernelEntries::default());
        let want: Vec<Op> = peers.iter().flat_map(adds).collect();
        assert_eq!(ops, want);
    }

    #[test]
    fn diff_in_sync_is_empty() {
        let peers: Vec<Peer> = (1..=200u8).map(|i| peer(i, i, i)).collect();
        let mut k = kernel_of(&peers);
        k.neighs.reverse();
        k.routes.rotate_left(17);
        assert_eq!(diff(&peers, &k), vec![]);
    }

    #[test]
    fn diff_removes_stale_peers() {
        let keep = peer(2, 2, 2);
        let stale = peer(9, 9, 9);
        let ops = diff(&[keep], &kernel_of(&[keep, stale]));
        assert_eq!(ops, dels(&stale));
    }

    #[test]
    fn diff_fixes_wrong_entries() {
        let p = peer(2, 2, 2);
        let mut k = kernel_of(&[p]);
        let wrong_mac = MacAddr([0x02, 0, 0, 0, 0, 0x77]);
        let wrong_ip = Ipv4Addr::new(198, 18, 0, 77);
        k.neighs[0].1 = wrong_mac;
        k.fdb[0].1 = wrong_ip;
        k.routes[0].1 = Ipv4Addr::new(10, 244, 2, 1);
        let ops = diff(&[p], &k);
        let mut want = adds(&p);
        // The neighbour is replaced in place (deleting by IP would hit the new one too); the
        // stale route (delete matches the gateway) and FDB pair go.
        want.push(Op::DelRoute {
            dst: p.subnet,
            gw: Ipv4Addr::new(10, 244, 2, 1),
        });
        want.push(Op::DelFdb {
            mac: p.vtep_mac.unwrap(),
            dst: wrong_ip,
        });
        assert_eq!(ops, want);
    }

    #[test]
    fn diff_adds_only_missing_parts() {
        let p = peer(2, 2, 2);
        let mut k = kernel_of(&[p]);
        k.fdb.clear();
        assert_eq!(
            diff(&[p], &k),
            vec![Op::SetFdb {
                mac: p.vtep_mac.unwrap(),
                dst: p.public_ip
            }]
        );
        let mut k = kernel_of(&[p]);
        k.routes.clear();
        assert_eq!(
            diff(&[p], &k),
            vec![Op::SetRoute {
                dst: p.subnet,
                gw: p.gateway()
            }]
        );
    }

    #[test]
    fn direct_peers_get_only_a_route_via_public_ip() {
        let p = peer(2, 2, 2);
        let ops = change_ops_with(
            &[PeerChange {
                old: None,
                new: Some(p),
            }],
            |_| Path::Direct,
        );
        assert_eq!(
            ops,
            vec![Op::SetRoute {
                dst: p.subnet,
                gw: p.public_ip
            }]
        );
        // Switching an overlay peer to direct: the route is replaced, overlay entries go.
        let ops = diff_with(&[p], &kernel_of(&[p]), |_| Path::Direct);
        assert_eq!(
            ops,
            vec![
                Op::SetRoute {
                    dst: p.subnet,
                    gw: p.public_ip
                },
                Op::DelRoute {
                    dst: p.subnet,
                    gw: p.gateway()
                },
                Op::DelFdb {
                    mac: p.vtep_mac.unwrap(),
                    dst: p.public_ip
                },
                Op::DelNeigh {
                    ip: p.gateway(),
                    mac: p.vtep_mac.unwrap()
                },
            ]
        );
        let k = KernelEntries {
            routes: vec![(p.subnet, p.public_ip)],
            ..Default::default()
        };
        assert!(diff_with(&[p], &k, |_| Path::Direct).is_empty());
    }

    #[test]
    fn the_same_plans_serve_ipv6_peers() {
        use ipnet::Ipv6Net;
        let p = PeerOf::<Ipv6Net> {
            subnet: "fd00:10:244:2::/64".parse().unwrap(),
            public_ip: "fd00:18::2".parse().unwrap(),
            vtep_mac: Some(MacAddr([2, 0, 0, 0, 0, 2])),
        };
        let gw: std::net::Ipv6Addr = "fd00:10:244:2::".parse().unwrap();
        assert_eq!(p.gateway(), gw);
        let mac = p.vtep_mac.unwrap();
        let ops = diff(&[p], &KernelEntriesOf::default());
        assert_eq!(
            ops,
            vec![
                OpOf::SetNeigh { ip: gw, mac },
                OpOf::SetFdb {
                    mac,
                    dst: p.public_ip
                },
                OpOf::SetRoute { dst: p.subnet, gw },
            ]
        );
        // Programmed: nothing to do; a stale v6 peer's entries go, route first.
        let k = KernelEntriesOf {
            neighs: vec![(gw, mac)],
            fdb: vec![(mac, p.public_ip)],
            routes: vec![(p.subnet, gw)],
        };
        assert!(diff(&[p], &k).is_empty());
        let ops = change_ops(&[PeerChangeOf {
            old: Some(p),
            new: None,
        }]);
        assert!(ops.iter().all(OpOf::is_delete) && ops.len() == 3, "{ops:?}");
        assert_eq!(ops[0], OpOf::DelRoute { dst: p.subnet, gw });
        // A direct v6 peer: a route via its public IPv6 alone.
        let ops = diff_with(&[p], &KernelEntriesOf::default(), |_| Path::Direct);
        assert_eq!(
            ops,
            vec![OpOf::SetRoute {
                dst: p.subnet,
                gw: p.public_ip
            }]
        );
    }
}
