//! Source checks on the pods' bridge ports: a pod may send only from its own addresses, so
//! that the policy maps, which are keyed by the pods' addresses, see every packet it sends.
//! Without them a pod escapes its egress policy by sending from an unused address of the
//! node's subnet (CAP_NET_RAW is in the runtimes' default set), reaches an isolated pod of its
//! node through its `fe80::` address, or poisons ARP and neighbour caches (or the bridge's
//! forwarding table, with another pod's MAC) to take another pod's traffic. The table `bridge twill-source` for the local pods and the element operations
//! from one set of pods to the next (a pod's ADD and DEL) are pure; `SourceCheck` keeps the
//! kernel's table as they say.
//!
//! The bridge family, not `inet`: only there is a packet's input interface the pod's own port
//! (in the IP hooks a bridged or routed packet comes from the bridge). Ports not in `@ports`
//! (pods of another plugin on the bridge, a node moved from flannel) are not checked.
//! ```text
//! prerouting (bridge, filter): iifname @ports jump from-pod
//! from-pod: frames from another MAC than the pod's dropped (if its record has one);
//!           ARP with its own sender address; an ARP probe (sender 0.0.0.0);
//!           neighbour advertisements for other addresses dropped (the target is what caches
//!           learn, whatever the source);
//!           IPv4/IPv6 from its own addresses;
//!           from :: (duplicate address detection) and fe80::/10 only neighbour
//!           solicitations, router solicitations and multicast listener reports;
//!           everything else dropped (and counted).
//! ```
//! A port whose pod's record could not be read is in `@ports` with no address, and in `@cut`,
//! where everything it sends is dropped (`closed`): cut off, its policies being unknown.

use std::collections::BTreeSet;
use std::net::IpAddr;

use serde::Serialize;

use crate::mac::MacAddr;
use crate::netlink::nft_sets::{self, key_addr, key_concat, ElemOp, NfFamily};
use crate::nft::model::{BaseChain, Chain, Family, Set, Table};
use crate::nft::{Check, Nft, TableWriter};

use super::pods::LocalPod;

pub const TABLE: &str = "twill-source";

/// What the ports may send: (host-side veth name, address) per local pod address, and
/// (port, MAC) per pod whose record has its MAC.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Sources {
    pub entries: BTreeSet<(String, IpAddr)>,
    pub macs: BTreeSet<(String, MacAddr)>,
    /// Ports checked with nothing they may send from: pods whose record could not be read, so
    /// whose policies are unknown.
    /// Cut off rather than open, as Calico drops what comes from a workload interface it has
    /// no endpoint for. A port named in `entries` too is checked with those.
    pub closed: BTreeSet<String>,
}

impl Sources {
    /// The ports and addresses of `pods` (from their records: the addresses ADD gave them).
    pub fn of<'a>(pods: impl IntoIterator<Item = &'a LocalPod>) -> Sources {
        let mut entries = BTreeSet::new();
        let mut macs = BTreeSet::new();
        for p in pods {
            let port = p.attachment.port();
            if let Some(mac) = p.mac {
                macs.insert((port.clone(), mac));
            }
            for ip in super::pods::pod_ips(&p.pod) {
                entries.insert((port.clone(), ip));
            }
        }
        Sources {
            entries,
            macs,
            closed: BTreeSet::new(),
        }
    }

    /// These sources with `ports` cut off (`closed`).
    pub fn closing(mut self, ports: &BTreeSet<String>) -> Sources {
        self.closed.extend(ports.iter().cloned());
        self
    }

    fn ports(&self) -> BTreeSet<&str> {
        self.entries
            .iter()
            .map(|(p, _)| p.as_str())
            .chain(self.closed.iter().map(String::as_str))
            .collect()
    }

    /// The cut-off ports that have no address here (one whose ADD is in flight has): all they
    /// send is dropped, whatever the source MAC.
    fn cut(&self) -> BTreeSet<&str> {
        let with_addresses: BTreeSet<&str> = self.entries.iter().map(|(p, _)| p.as_str()).collect();
        self.closed
            .iter()
            .map(String::as_str)
            .filter(|p| !with_addresses.contains(p))
            .collect()
    }

    /// The ports with an element here (an address, a MAC, or none: cut off).
    fn named(&self) -> BTreeSet<&str> {
        self.ports()
            .into_iter()
            .chain(self.macs.iter().map(|(p, _)| p.as_str()))
            .collect()
    }

    /// These sources and what `have` holds for ports these do not name (pods that left, their
    /// ports gone): a port named here gets exactly its own elements, the others keep theirs.
    pub fn keeping_others_of(&self, have: &Sources) -> Sources {
        let named = self.named();
        let mut out = self.clone();
        let other = |p: &String| !named.contains(p.as_str());
        out.entries
            .extend(have.entries.iter().filter(|(p, _)| other(p)).cloned());
        out.macs
            .extend(have.macs.iter().filter(|(p, _)| other(p)).cloned());
        out.closed
            .extend(have.closed.iter().filter(|p| other(p)).cloned());
        out
    }
}

fn set(kind: &str, elements: impl IntoIterator<Item = String>) -> Set {
    Set {
        kind: kind.into(),
        flags: vec![],
        elements: elements.into_iter().collect(),
    }
}

/// An IPv6 address as nft spells a 128-bit integer (the `na6` set's key is a raw payload).
fn hex128(ip: std::net::Ipv6Addr) -> String {
    format!("0x{:032x}", u128::from(ip))
}

/// The whole table for `s`.
pub fn table(s: &Sources) -> Table {
    let mut t = Table::new(Family::Bridge, TABLE);
    let v4 = || {
        s.entries.iter().filter_map(|(p, ip)| match ip {
            IpAddr::V4(a) => Some((p, *a)),
            IpAddr::V6(_) => None,
        })
    };
    let v6 = || {
        s.entries.iter().filter_map(|(p, ip)| match ip {
            IpAddr::V6(a) => Some((p, *a)),
            IpAddr::V4(_) => None,
        })
    };
    t.sets.insert(
        "ports".into(),
        set("ifname", s.ports().into_iter().map(|p| format!("\"{p}\""))),
    );
    t.sets.insert(
        "cut".into(),
        set("ifname", s.cut().into_iter().map(|p| format!("\"{p}\""))),
    );
    t.sets.insert(
        "macports".into(),
        set("ifname", s.macs.iter().map(|(p, _)| format!("\"{p}\""))),
    );
    t.sets.insert(
        "macs".into(),
        set(
            "ifname . ether_addr",
            s.macs.iter().map(|(p, m)| format!("\"{p}\" . {m}")),
        ),
    );
    t.sets.insert(
        "src4".into(),
        set(
            "ifname . ipv4_addr",
            v4().map(|(p, a)| format!("\"{p}\" . {a}")),
        ),
    );
    t.sets.insert(
        "src6".into(),
        set(
            "ifname . ipv6_addr",
            v6().map(|(p, a)| format!("\"{p}\" . {a}")),
        ),
    );
    // nft 1.0.6 has no `icmpv6 taddr`: the target is the payload at offset 8 of the ICMPv6
    // header, and a set keyed by it must be declared by that expression.
    t.sets.insert(
        "na6".into(),
        set(
            "typeof iifname . @th,64,128",
            v6().map(|(p, a)| format!("\"{p}\" . {}", hex128(a))),
        ),
    );
    t.chains.insert(
        "prerouting".into(),
        Chain {
            base: Some(BaseChain {
                kind: "filter",
                hook: "prerouting",
                priority: -200,
                policy: "accept",
            }),
            rules: vec!["iifname @ports jump from-pod".into()],
        },
    );
    let link_local = "icmpv6 type { nd-router-solicit, nd-neighbor-solicit, mld-listener-report, \
                      mld-listener-done, mld2-listener-report } accept";
    t.chains.insert(
        "from-pod".into(),
        Chain {
            base: None,
            rules: vec![
                // Cut off: not even ARP probes, whose source MAC nothing checks here.
                "iifname @cut counter drop".into(),
                // The bridge learns where a MAC is from the frames' sources: another pod's
                // would draw its frames here.
                "iifname @macports iifname . ether saddr != @macs counter drop".into(),
                "iifname . arp saddr ip @src4 accept".into(),
                "arp saddr ip 0.0.0.0 accept".into(),
                // Not an accept: the advertisement's source is checked below as well.
                "icmpv6 type nd-neighbor-advert iifname . @th,64,128 != @na6 counter drop".into(),
                "iifname . ip saddr @src4 accept".into(),
                "iifname . ip6 saddr @src6 accept".into(),
                format!("ip6 saddr :: {link_local}"),
                format!("ip6 saddr fe80::/10 {link_local}"),
                "counter drop".into(),
            ],
        },
    );
    t
}

/// An interface name as a key: IFNAMSIZ bytes, zero padded.
fn key_ifname(name: &str) -> [u8; 16] {
    let mut k = [0u8; 16];
    let n = name.len().min(15);
    k[..n].copy_from_slice(&name.as_bytes()[..n]);
    k
}

/// The element operations that turn `old` into `new` (deletions first).
pub fn element_ops(old: &Sources, new: &Sources) -> Vec<ElemOp> {
    let mut ops = Vec::new();
    for add in [false, true] {
        let (from, to) = if add { (old, new) } else { (new, old) };
        for (port, ip) in to.entries.difference(&from.entries) {
            let name = key_ifname(port);
            let key = key_concat(&[&name, &key_addr(*ip)]);
            let set = if ip.is_ipv4() { "src4" } else { "src6" };
            if ip.is_ipv6() {
                ops.push(ElemOp::new(add, "na6", key.clone()));
            }
            ops.push(ElemOp::new(add, set, key));
        }
        for (port, mac) in to.macs.difference(&from.macs) {
            let name = key_ifname(port);
            ops.push(ElemOp::new(
                add,
                "macs",
                key_concat(&[&name, &mac.octets()]),
            ));
            ops.push(ElemOp::new(add, "macports", name.to_vec()));
        }
        let (from_ports, to_ports) = (from.ports(), to.ports());
        for port in to_ports.difference(&from_ports) {
            ops.push(ElemOp::new(add, "ports", key_ifname(port).to_vec()));
        }
        for port in to.cut().difference(&from.cut()) {
            ops.push(ElemOp::new(add, "cut", key_ifname(port).to_vec()));
        }
    }
    ops
}

/// What /status shows of the source checks.
#[derive(Clone, Debug, Default, Serialize)]
pub struct SourceStatus {
    /// Pod ports checked, the addresses they may send from, and the ports bound to a MAC.
    pub ports: usize,
    pub addresses: usize,
    pub macs: usize,
    /// Ports cut off: their pods' records could not be read (`Sources::closed`).
    pub closed: Vec<String>,
    /// Why the kernel does not hold them (retried at every resync).
    pub error: Option<String>,
}

impl SourceStatus {
    fn of(s: &Sources, error: Option<String>) -> Self {
        SourceStatus {
            ports: s.ports().len(),
            addresses: s.entries.len(),
            macs: s.macs.len(),
            closed: s.cut().into_iter().map(str::to_owned).collect(),
            error,
        }
    }
}

/// The kernel's `bridge twill-source`: the whole table through nft at first (and after a
/// failure), then a pod's elements over netlink (no nft process on the CNI path).
pub struct SourceCheck {
    writer: TableWriter,
    /// What the kernel holds (once `removing` is done); None before the first apply and after
    /// a failed one.
    applied: Option<Sources>,
    /// Elements being taken out on a blocking thread (`remove_stale`).
    removing: Option<Removal>,
    pub status: SourceStatus,
}

/// A transaction that only takes elements out, in flight: the ports it concerns, its result.
struct Removal {
    ports: BTreeSet<String>,
    task: tokio::task::JoinHandle<Result<(), String>>,
}

impl SourceCheck {
    pub fn new(nft: Nft) -> Self {
        SourceCheck {
            writer: TableWriter::new(nft),
            applied: None,
            removing: None,
            status: SourceStatus::default(),
        }
    }

    /// Makes the kernel hold `want`. A failure leaves the ports it could not add unchecked
    /// (a port is checked only with its addresses): ADD fails with it. Retried by `check`.
    pub async fn apply(&mut self, want: Sources) -> Result<(), String> {
        self.settle().await;
        self.apply_now(want).await
    }

    /// As `apply` when `want` only takes elements out (pods left, their ports gone): the
    /// transaction runs on a blocking thread, as it costs the kernel an RCU grace period
    /// (10-20 ms here) that the policy task need not sit out. (The kernel makes the node's
    /// other nftables transactions wait for it all the same: see `Due::quiet`.) An ADD that
    /// names one of its ports waits for it (`apply_keeping`).
    pub async fn remove_stale(&mut self, want: Sources) -> Result<(), String> {
        self.settle().await;
        let Some(have) = &self.applied else {
            return self.apply_now(want).await;
        };
        let ops = element_ops(have, &want);
        if ops.is_empty() || ops.iter().any(|o| o.add) {
            return self.apply_now(want).await;
        }
        let ports = have
            .entries
            .difference(&want.entries)
            .map(|(p, _)| p)
            .chain(have.macs.difference(&want.macs).map(|(p, _)| p))
            .chain(have.closed.difference(&want.closed))
            .cloned()
            .collect();
        let task = tokio::task::spawn_blocking(move || {
            nft_sets::apply(NfFamily::Bridge, TABLE, &ops).map_err(|e| e.to_string())
        });
        self.removing = Some(Removal { ports, task });
        // Assumed done: what the next apply starts from; `settle` takes it back on failure.
        self.writer.assume(table(&want));
        self.status = SourceStatus::of(&want, None);
        self.applied = Some(want);
        Ok(())
    }

    /// Waits for the removal in flight; a failed one leaves the kernel's state unknown, so
    /// the next apply writes the whole table.
    async fn settle(&mut self) {
        let Some(r) = self.removing.take() else {
            return;
        };
        let res = r.task.await.map_err(|e| e.to_string()).and_then(|r| r);
        if let Err(e) = res {
            tracing::warn!(error = %e, "taking source checks of pods that left out failed; applying the table through nft");
            // What the kernel holds is unknown (the writer assumed the removal): whole table.
            self.applied = None;
            self.writer.forget();
            self.status.error = Some(e);
        }
    }

    async fn apply_now(&mut self, want: Sources) -> Result<(), String> {
        let res = self.apply_inner(&want).await;
        self.status = SourceStatus::of(&want, res.as_ref().err().cloned());
        if let Err(e) = &res {
            tracing::error!(error = %e, "pod source checks not programmed (retried at the next resync)");
        }
        res
    }

    /// As `apply`, but ports `want` does not name keep what the kernel holds for them: no
    /// element is taken out (that costs the kernel an RCU grace period, 10-20 ms) unless a
    /// port of `want` had other ones. For an ADD; `apply` later takes the rest out.
    pub async fn apply_keeping(&mut self, want: Sources) -> Result<(), String> {
        let named = want.named();
        if let Some(r) = &self.removing {
            // A removal that takes out elements of a port named again must land first.
            if r.task.is_finished() || r.ports.iter().any(|p| named.contains(p.as_str())) {
                self.settle().await;
            }
        }
        let target = match &self.applied {
            Some(have) => want.keeping_others_of(have),
            None => want.clone(),
        };
        let res = self.apply_now(target).await;
        // The pods checked, not the elements of ports that left.
        self.status = SourceStatus::of(&want, res.as_ref().err().cloned());
        res
    }

    async fn apply_inner(&mut self, want: &Sources) -> Result<(), String> {
        if let Some(have) = &self.applied {
            if have == want {
                return Ok(());
            }
            match nft_sets::apply(NfFamily::Bridge, TABLE, &element_ops(have, want)) {
                Ok(()) => {
                    self.writer.assume(table(want));
                    self.applied = Some(want.clone());
                    return Ok(());
                }
                Err(e) => {
                    tracing::warn!(error = %e, "source check elements refused; applying the table through nft")
                }
            }
        }
        // The writer must not start from a removal's assumed outcome that may not hold.
        self.settle().await;
        self.applied = None;
        self.writer
            .apply(&table(want))
            .await
            .map_err(|e| e.to_string())?;
        self.applied = Some(want.clone());
        Ok(())
    }

    /// The periodic check: applied again after a failure, restored when someone changed it.
    pub async fn check(&mut self, want: Sources) -> bool {
        self.settle().await;
        if self.applied.is_none() {
            let _ = self.apply(want).await;
            return false;
        }
        match self.writer.check().await {
            Ok(Check::Restored) => {
                tracing::warn!("restored the pod source check table after someone else changed it");
                true
            }
            Ok(_) => false,
            Err(e) => {
                tracing::warn!(error = %e, "checking the pod source check table failed");
                false
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cni::host_veth_name;
    use crate::policy::pods::{Attachment, LocalPod};

    fn pod(cid: &str, ips: &[&str]) -> LocalPod {
        let p: netpol::api::Pod = serde_json::from_value(serde_json::json!({
            "metadata": {"name": cid, "namespace": "default"}
        }))
        .unwrap();
        LocalPod {
            attachment: Attachment {
                container_id: cid.into(),
                ifname: "eth0".into(),
            },
            pod: p,
            mac: None,
        }
        .with_ips(&ips.iter().map(|s| s.parse().unwrap()).collect::<Vec<_>>())
    }

    #[test]
    fn each_port_may_send_from_its_own_addresses_only() {
        let a = pod("a", &["10.1.0.2", "fd00::2"]);
        let b = pod("b", &["10.1.0.3"]);
        let s = Sources::of([&a, &b]);
        let (pa, pb) = (host_veth_name("a", "eth0"), host_veth_name("b", "eth0"));
        let t = table(&s);
        assert_eq!(
            t.sets["src4"].elements,
            BTreeSet::from([
                format!("\"{pa}\" . 10.1.0.2"),
                format!("\"{pb}\" . 10.1.0.3")
            ])
        );
        assert_eq!(
            t.sets["src6"].elements,
            BTreeSet::from([format!("\"{pa}\" . fd00::2")])
        );
        assert_eq!(
            t.sets["na6"].elements,
            BTreeSet::from([format!("\"{pa}\" . 0x{:032x}", 0xfd00u128 << 112 | 2)])
        );
        assert_eq!(t.sets["ports"].elements.len(), 2);
        // The last rule drops: nothing unlisted passes.
        assert_eq!(
            t.chains["from-pod"].rules.last().map(String::as_str),
            Some("counter drop")
        );
        // A pod without addresses (none recorded) is not a checked port.
        let none = pod("c", &[]);
        assert!(Sources::of([&none]).entries.is_empty());
    }

    #[test]
    fn element_ops_move_one_pod_and_its_port() {
        let a = pod("a", &["10.1.0.2", "fd00::2"]);
        let b = pod("b", &["10.1.0.3"]);
        let old = Sources::of([&a]);
        let new = Sources::of([&a, &b]);
        let ops = element_ops(&old, &new);
        let pb = key_ifname(&host_veth_name("b", "eth0"));
        assert_eq!(
            ops,
            vec![
                ElemOp::new(true, "src4", key_concat(&[&pb, &[10, 1, 0, 3]])),
                ElemOp::new(true, "ports", pb.to_vec()),
            ]
        );
        // And back: the same elements deleted; `a`'s IPv6 address also leaves `na6`.
        let back = element_ops(&new, &old);
        assert!(back.iter().all(|o| !o.add) && back.len() == 2);
        let gone = element_ops(&old, &Sources::default());
        let sets: Vec<_> = gone.iter().map(|o| o.set.as_str()).collect();
        assert_eq!(sets, ["src4", "na6", "src6", "ports"]);
        assert!(element_ops(&new, &new).is_empty());
    }

    #[test]
    fn an_add_keeps_the_elements_of_ports_that_left_but_not_of_its_own() {
        let mac: MacAddr = "02:00:5e:00:00:07".parse().unwrap();
        let a = pod("a", &["10.1.0.2"]).with_mac(mac);
        let b = pod("b", &["10.1.0.3", "fd00::3"]);
        let have = Sources::of([&a, &b]);
        // `a` left; `c` came and got `a`'s address: only adds, `a`'s elements stay.
        let c = pod("c", &["10.1.0.2"]);
        let want = Sources::of([&b, &c]);
        let kept = want.keeping_others_of(&have);
        let ops = element_ops(&have, &kept);
        assert!(!ops.is_empty() && ops.iter().all(|o| o.add), "{ops:?}");
        let pa = host_veth_name("a", "eth0");
        assert!(kept
            .entries
            .contains(&(pa.clone(), "10.1.0.2".parse().unwrap())));
        assert!(kept.macs.contains(&(pa, mac)));
        // The exact apply afterwards takes out `a`'s and nothing else.
        let out = element_ops(&kept, &want);
        assert!(out.iter().all(|o| !o.add));
        assert_eq!(element_ops(&have, &want).len(), ops.len() + out.len());
        // `b` again under its port with another address: its old one goes in the same apply.
        let b2 = pod("b", &["10.1.0.9"]);
        let again = Sources::of([&b2]).keeping_others_of(&have);
        let pb = host_veth_name("b", "eth0");
        assert!(!again
            .entries
            .iter()
            .any(|(p, ip)| *p == pb && ip.to_string() != "10.1.0.9"));
        assert!(element_ops(&have, &again).iter().any(|o| !o.add));
    }

    #[test]
    fn a_port_with_a_recorded_mac_may_send_only_from_it() {
        let mac: MacAddr = "02:00:5e:00:00:07".parse().unwrap();
        let a = pod("a", &["10.1.0.2"]).with_mac(mac);
        let b = pod("b", &["10.1.0.3"]); // an older record: no MAC
        let s = Sources::of([&a, &b]);
        let pa = host_veth_name("a", "eth0");
        let t = table(&s);
        assert_eq!(
            t.sets["macs"].elements,
            BTreeSet::from([format!("\"{pa}\" . 02:00:5e:00:00:07")])
        );
        assert_eq!(
            t.sets["macports"].elements,
            BTreeSet::from([format!("\"{pa}\"")])
        );
        // First in the chain (after the cut-off ports): a frame from another MAC is not even
        // looked at further.
        assert!(t.chains["from-pod"].rules[1].contains("ether saddr != @macs"));
        let ops = element_ops(&Sources::of([&b]), &s);
        let name = key_ifname(&pa);
        assert!(ops.contains(&ElemOp::new(
            true,
            "macs",
            key_concat(&[&name, &mac.octets()])
        )));
        assert!(ops.contains(&ElemOp::new(true, "macports", name.to_vec())));
    }

    #[test]
    fn a_closed_port_is_checked_with_nothing_to_send_from_until_its_pod_is_added() {
        let a = pod("a", &["10.1.0.2"]);
        let pc = host_veth_name("c", "eth0");
        let open = Sources::of([&a]);
        let closed = Sources::of([&a]).closing(&[pc.clone()].into());
        let t = table(&closed);
        assert!(t.sets["ports"].elements.contains(&format!("\"{pc}\"")));
        assert!(!t.sets["src4"].elements.iter().any(|e| e.contains(&pc)));
        assert_eq!(SourceStatus::of(&closed, None).closed, vec![pc.clone()]);
        let key = key_ifname(&pc).to_vec();
        assert!(t.sets["cut"].elements.contains(&format!("\"{pc}\"")));
        assert_eq!(t.chains["from-pod"].rules[0], "iifname @cut counter drop");
        assert_eq!(
            element_ops(&open, &closed),
            vec![
                ElemOp::new(true, "ports", key.clone()),
                ElemOp::new(true, "cut", key.clone())
            ]
        );
        assert_eq!(
            element_ops(&closed, &open),
            vec![
                ElemOp::new(false, "ports", key.clone()),
                ElemOp::new(false, "cut", key.clone())
            ]
        );
        // An ADD of it in flight: checked with its addresses, no longer shown as cut off; an
        // ADD of another pod keeps it cut off.
        let c = pod("c", &["10.1.0.4"]);
        let adding = Sources::of([&a, &c]).closing(&closed.closed);
        assert!(SourceStatus::of(&adding, None).closed.is_empty());
        assert!(!table(&adding).sets["cut"]
            .elements
            .iter()
            .any(|e| e.contains(&pc)));
        let ops = element_ops(&closed, &adding);
        assert!(
            ops.contains(&ElemOp::new(false, "cut", key.clone())),
            "{ops:?}"
        );
        let other = Sources::of([&a, &pod("d", &["10.1.0.5"])]).keeping_others_of(&closed);
        assert!(other.closed.contains(&pc));
    }

    #[test]
    fn interface_names_are_keys_of_ifnamsiz_bytes() {
        let k = key_ifname("twv0123");
        assert_eq!(&k[..7], b"twv0123");
        assert!(k[7..].iter().all(|b| *b == 0));
    }
}
