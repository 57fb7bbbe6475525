//! The peer watcher's view of `<prefix>/subnets/`: every key by its etcd name, and the one peer
//! each subnet resolves to, per address family.
//!
//! A key names a node's IPv4 subnet, and on a dual-stack network also its IPv6 one
//! (`10.244.1.0-24&fd00:10:244:1::-64`; an IPv6-only key has `0.0.0.0-0` for the v4 part). Each
//! family's side of a key is judged on its own (a bad v6 side never costs the v4 peer), and
//! each family keeps its own choices (`Side`): several keys can name one subnet, and several
//! leases can announce one VTEP MAC. Both are settled the same way on every node, so a stray
//! key can neither remove nor take over a live node's subnet:
//! - per subnet, among its valid keys, a plain key wins over aliases (IPv4 only: an IPv6 subnet
//!   has no plain key), then the oldest (create_revision), then the lowest name; the subnet goes
//!   away only when no valid key is left;
//! - per VTEP MAC, the oldest lease keeps it; a younger one announcing it at another address is
//!   skipped (the kernel keeps one destination per MAC: the two would take turns every resync).
//!   One node holding two subnets (same MAC and address, after a re-lease) is fine.
//!
//! Pure: it returns the events for the daemon and the keys newly skipped (for logs and metrics).

use std::collections::{BTreeMap, BTreeSet, HashMap};

use ipnet::{Ipv4Net, Ipv6Net};

use super::{OwnLease, PeerEvent, PeerFamily, SubnetChange, SubnetKv, MAX_LEASE_VALUE};
use crate::config::NetworkConfig;
use crate::excerpt::echo;
use crate::lease::{check_against_own_of, parse_lease, LeaseError};
use crate::mac::MacAddr;
use crate::peer::PeerOf;
use crate::subnet::{overlaps, parse_dual_subnet_key, subnet_key, Cidr};

/// Longer key names are never a lease (flannel's longest, a dual-stack key, is about 60 bytes);
/// they are not kept, and only an excerpt names them.
const MAX_KEY_LEN: usize = 256;

/// Why a key does not speak for its subnet.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Skip {
    NotASubnet,
    Invalid(String),
    /// The value had this many bytes (at least), more than `MAX_LEASE_VALUE`.
    Oversized(usize),
    /// Another key for the same subnet speaks for it.
    Shadowed {
        by: String,
    },
    /// An older lease announces this VTEP MAC at another address.
    DuplicateMac {
        mac: MacAddr,
        kept: String,
    },
    /// Kubernetes mode: another Node keeps this VTEP MAC (the text says which).
    MacTaken(String),
}

impl Skip {
    pub fn reason(&self) -> String {
        match self {
            Skip::NotASubnet => "the key is not a subnet".into(),
            Skip::Invalid(why) => why.clone(),
            Skip::Oversized(n) => format!(
                "its value has {n} bytes, more than the {MAX_LEASE_VALUE} a lease may have: dropped"
            ),
            Skip::Shadowed { by } => format!(
                "another key for the same subnet speaks for it: {} (a plain key wins over \
                 aliases, then the oldest)",
                echo(by)
            ),
            Skip::DuplicateMac { mac, kept } => format!(
                "VtepMAC {mac} is announced at another address by the older lease {}",
                echo(kept)
            ),
            Skip::MacTaken(why) => why.clone(),
        }
    }
}

/// What a change means for the daemon, and which keys it newly skipped. A key's IPv6 side is
/// named `<key> (IPv6 side)`.
#[derive(Debug, Default)]
pub struct Update {
    pub events: Vec<PeerEvent>,
    pub skipped: Vec<(String, Skip)>,
}

/// One family's part of a key: its subnet, and the peer it would be once validated against
/// the network config (what does not depend on our own lease).
struct Part<N: Cidr> {
    net: N,
    parsed: Result<PeerOf<N>, Skip>,
}

struct Lease {
    create_revision: i64,
    v4: Option<Part<Ipv4Net>>,
    /// Only when we serve the network's IPv6 side: elsewhere a key's v6 part is not ours to
    /// judge.
    v6: Option<Part<Ipv6Net>>,
}

impl Lease {
    fn nets(&self) -> (Option<Ipv4Net>, Option<Ipv6Net>) {
        (
            self.v4.as_ref().map(|p| p.net),
            self.v6.as_ref().map(|p| p.net),
        )
    }
}

/// The key speaking for a subnet.
#[derive(Clone, Debug)]
struct Candidate<N: Cidr> {
    key: String,
    create_revision: i64,
    peer: PeerOf<N>,
}

/// One family's choices among the keys.
struct Side<N: Cidr> {
    by_subnet: BTreeMap<N, BTreeSet<String>>,
    candidates: BTreeMap<N, Candidate<N>>,
    /// Subnets whose candidate announces the MAC.
    by_mac: HashMap<MacAddr, BTreeSet<N>>,
    /// What the daemon has been told: one peer per subnet.
    told: BTreeMap<N, PeerOf<N>>,
}

impl<N: Cidr> Default for Side<N> {
    fn default() -> Self {
        Side {
            by_subnet: BTreeMap::new(),
            candidates: BTreeMap::new(),
            by_mac: HashMap::new(),
            told: BTreeMap::new(),
        }
    }
}

/// What the view needs to know of a family: where its parts and choices live, what is ours,
/// and the events that carry it.
trait Family: PeerFamily {
    fn part(l: &Lease) -> Option<&Part<Self>>;
    fn side(v: &PeerView) -> &Side<Self>;
    fn side_mut(v: &mut PeerView) -> &mut Side<Self>;
    /// Our subnet, endpoint and VTEP MAC in this family.
    fn own(own: &OwnLease) -> Option<(Self, Self::Addr, Option<MacAddr>)>;
    /// The key that names this subnet alone, if the family has one.
    fn plain_key(net: Self) -> Option<String>;
    /// Whether this family's peers are sent to the daemon (its keys are judged either way).
    fn sent(v: &PeerView) -> bool;
}

impl Family for Ipv4Net {
    fn part(l: &Lease) -> Option<&Part<Self>> {
        l.v4.as_ref()
    }
    fn side(v: &PeerView) -> &Side<Self> {
        &v.v4
    }
    fn side_mut(v: &mut PeerView) -> &mut Side<Self> {
        &mut v.v4
    }
    fn sent(v: &PeerView) -> bool {
        v.serve4
    }
    fn own(own: &OwnLease) -> Option<(Self, std::net::Ipv4Addr, Option<MacAddr>)> {
        let v4 = own.attrs.v4?;
        Some((own.subnet?, v4.public_ip, v4.vtep_mac()))
    }
    fn plain_key(net: Self) -> Option<String> {
        Some(subnet_key(net))
    }
}

impl Family for Ipv6Net {
    fn part(l: &Lease) -> Option<&Part<Self>> {
        l.v6.as_ref()
    }
    fn side(v: &PeerView) -> &Side<Self> {
        &v.v6
    }
    fn side_mut(v: &mut PeerView) -> &mut Side<Self> {
        &mut v.v6
    }
    fn sent(v: &PeerView) -> bool {
        v.serve6
    }
    fn own(own: &OwnLease) -> Option<(Self, std::net::Ipv6Addr, Option<MacAddr>)> {
        let v6 = own.attrs.v6?;
        Some((own.subnet6?, v6.public_ip, v6.vtep_mac()))
    }
    fn plain_key(_: Self) -> Option<String> {
        None
    }
}

pub struct PeerView {
    cfg: NetworkConfig,
    own: OwnLease,
    /// We serve the network's IPv6 side (our lease has an IPv6 subnet): only then are the keys'
    /// IPv6 sides judged and sent. A node that serves IPv4 only (the udp backend) has no use
    /// for them and would only log about them. Fixed for the view's life: whether a node
    /// serves IPv6 is decided at its start.
    serve6: bool,
    /// We serve the network's IPv4 side: not on an IPv6-only network. Its keys' IPv4 parts
    /// are still judged there (a plain key is reported, not silently dropped), never sent.
    serve4: bool,
    leases: BTreeMap<String, Lease>,
    v4: Side<Ipv4Net>,
    v6: Side<Ipv6Net>,
    /// Keys (and sides) skipped now, and why: reported once per reason, not at every re-list.
    skips: HashMap<String, Skip>,
}

/// How a key is named in `skips` and logs: itself, or an excerpt when it is absurdly long.
pub fn key_id(name: &str) -> String {
    echo(name).into_owned()
}

fn reason(e: LeaseError) -> String {
    match e {
        LeaseError::Invalid(why) => why,
    }
}

impl PeerView {
    pub fn new(cfg: NetworkConfig, own: OwnLease) -> Self {
        PeerView {
            serve6: cfg.ipv6.is_some() && own.subnet6.is_some(),
            serve4: cfg.ipv4.is_some() && own.subnet.is_some(),
            cfg,
            own,
            leases: BTreeMap::new(),
            v4: Side::default(),
            v6: Side::default(),
            skips: HashMap::new(),
        }
    }

    pub fn own(&self) -> &OwnLease {
        &self.own
    }

    /// A fresh list of every key (and our lease as of then): a `Snapshot` for the IPv4 side
    /// and a `Snapshot6` for the IPv6 side, each when we serve it.
    pub fn reset(&mut self, own: OwnLease, kvs: Vec<SubnetKv>) -> Update {
        self.own = own;
        self.leases.clear();
        self.v4.by_subnet.clear();
        self.v6.by_subnet.clear();
        let mut junk = HashMap::new();
        for kv in kvs {
            match self.lease_of(&kv) {
                Some(lease) => self.insert(kv.name, lease),
                None => {
                    junk.insert(key_id(&kv.name), Skip::NotASubnet);
                }
            }
        }
        self.rebuild(junk)
    }

    /// Our own lease changed: every choice is made again (a `Snapshot`), without etcd.
    pub fn set_own(&mut self, own: OwnLease) -> Update {
        self.own = own;
        let junk = self
            .skips
            .iter()
            .filter(|(_, s)| **s == Skip::NotASubnet)
            .map(|(k, s)| (k.clone(), s.clone()))
            .collect();
        self.rebuild(junk)
    }

    /// One watched change.
    pub fn apply(&mut self, change: SubnetChange) -> Update {
        let mut up = Update::default();
        // A key always names the same subnets: those it had before a put are those after.
        let nets = match change {
            SubnetChange::Put(kv) => {
                let Some(lease) = self.lease_of(&kv) else {
                    self.note(key_id(&kv.name), Some(Skip::NotASubnet), &mut up);
                    return up;
                };
                self.remove_key(&kv.name);
                let nets = lease.nets();
                self.insert(kv.name, lease);
                nets
            }
            SubnetChange::Delete(name) => {
                self.skips.remove(&key_id(&name));
                self.skips
                    .remove(&format!("{}{}", key_id(&name), Ipv6Net::TAG));
                match self.remove_key(&name) {
                    Some(nets) => nets,
                    None => return up,
                }
            }
        };
        if let Some(net) = nets.0 {
            self.refresh(net, &mut up);
        }
        if let Some(net) = nets.1 {
            self.refresh(net, &mut up);
        }
        up
    }

    /// The lease a key holds, None for a key that is not a subnet.
    fn lease_of(&self, kv: &SubnetKv) -> Option<Lease> {
        if kv.name.len() > MAX_KEY_LEN {
            return None;
        }
        let (net4, net6) = parse_dual_subnet_key(&kv.name)?;
        let invalid = |e| Skip::Invalid(reason(e));
        let v6 = match net6 {
            Some(net) if self.serve6 => Some(Part {
                net,
                parsed: match kv.oversized {
                    Some(n) => Err(Skip::Oversized(n)),
                    None => parse_lease(&self.cfg, net, &kv.value).map_err(invalid),
                },
            }),
            _ => None,
        };
        // flannel's IPv6-only key: no v4 side. On a network without IPv6 it is judged as the
        // v4 subnet 0.0.0.0/0 (and refused) so that it is reported, not silently dropped.
        let v6_only = net4 == Ipv4Net::default() && net6.is_some() && self.cfg.ipv6.is_some();
        let v4 = (!v6_only).then(|| Part {
            net: net4,
            parsed: match kv.oversized {
                Some(n) => Err(Skip::Oversized(n)),
                None => parse_lease(&self.cfg, net4, &kv.value).map_err(invalid),
            },
        });
        Some(Lease {
            create_revision: kv.create_revision,
            v4,
            v6,
        })
    }

    fn insert(&mut self, name: String, lease: Lease) {
        if let Some(p) = &lease.v4 {
            self.v4
                .by_subnet
                .entry(p.net)
                .or_default()
                .insert(name.clone());
        }
        if let Some(p) = &lease.v6 {
            self.v6
                .by_subnet
                .entry(p.net)
                .or_default()
                .insert(name.clone());
        }
        self.leases.insert(name, lease);
    }

    /// Forgets a key; returns the subnets it named, if it was one.
    fn remove_key(&mut self, name: &str) -> Option<(Option<Ipv4Net>, Option<Ipv6Net>)> {
        let lease = self.leases.remove(name)?;
        let nets = lease.nets();
        fn forget<N: Cidr>(side: &mut Side<N>, net: N, name: &str) {
            if let Some(keys) = side.by_subnet.get_mut(&net) {
                keys.remove(name);
                if keys.is_empty() {
                    side.by_subnet.remove(&net);
                }
            }
        }
        if let Some(p) = lease.v4 {
            forget(&mut self.v4, p.net, name);
        }
        if let Some(p) = lease.v6 {
            forget(&mut self.v6, p.net, name);
        }
        Some(nets)
    }

    /// Keys for our own subnet are ours to keep, not peers: left out without a word. (A key
    /// of another length overlapping it is judged like any other, and is invalid.)
    fn is_own_subnet<N: Family>(&self, net: N) -> bool {
        N::own(&self.own).is_some_and(|(own, _, _)| own == net)
    }

    /// A peer from this key's side, or why not (None: our own lease, silently left out).
    fn judge<N: Family>(&self, name: &str) -> Option<Result<PeerOf<N>, Skip>> {
        let part = N::part(self.leases.get(name)?)?;
        let p = match &part.parsed {
            Ok(p) => *p,
            Err(s) => return Some(Err(s.clone())),
        };
        let Some((_, ip, mac)) = N::own(&self.own) else {
            return Some(Ok(p));
        };
        // Our public IP and our VTEP MAC: ours, whatever its subnet (right after a re-acquire
        // the new key can arrive before the keeper says it is ours).
        if p.public_ip == ip && p.vtep_mac == mac {
            return None;
        }
        Some(
            check_against_own_of(&p, ip, mac)
                .map(|()| p)
                .map_err(|e| Skip::Invalid(reason(e))),
        )
    }

    fn candidate<N: Family>(&self, net: N) -> Option<Candidate<N>> {
        if N::own(&self.own).is_some_and(|(own, _, _)| overlaps(net, own)) {
            return None;
        }
        let plain = N::plain_key(net);
        N::side(self)
            .by_subnet
            .get(&net)?
            .iter()
            .filter_map(|k| match self.judge::<N>(k) {
                Some(Ok(peer)) => Some(Candidate {
                    key: k.clone(),
                    create_revision: self.leases[k].create_revision,
                    peer,
                }),
                _ => None,
            })
            .min_by(|a, b| {
                let rank = |c: &Candidate<N>| {
                    (
                        plain.as_deref() != Some(c.key.as_str()),
                        c.create_revision,
                        c.key.clone(),
                    )
                };
                rank(a).cmp(&rank(b))
            })
    }

    /// The peer a subnet resolves to, or the MAC conflict that keeps it out.
    fn effective<N: Family>(&self, net: N) -> Result<Option<PeerOf<N>>, Skip> {
        let side = N::side(self);
        let Some(c) = side.candidates.get(&net) else {
            return Ok(None);
        };
        if let Some(mac) = c.peer.vtep_mac {
            // The lease that keeps `mac`: the oldest candidate announcing it.
            let keeper = side
                .by_mac
                .get(&mac)
                .into_iter()
                .flatten()
                .filter_map(|n| side.candidates.get(n))
                .min_by(|a, b| (a.create_revision, &a.key).cmp(&(b.create_revision, &b.key)));
            if let Some(k) = keeper {
                if k.peer.public_ip != c.peer.public_ip {
                    return Err(Skip::DuplicateMac {
                        mac,
                        kept: format!("{}{}", k.key, N::TAG),
                    });
                }
            }
        }
        Ok(Some(c.peer))
    }

    fn set_candidate<N: Family>(
        &mut self,
        net: N,
        c: Option<Candidate<N>>,
    ) -> Option<Candidate<N>> {
        let side = N::side_mut(self);
        let old = side.candidates.remove(&net);
        if let Some(mac) = old.as_ref().and_then(|o| o.peer.vtep_mac) {
            if let Some(nets) = side.by_mac.get_mut(&mac) {
                nets.remove(&net);
                if nets.is_empty() {
                    side.by_mac.remove(&mac);
                }
            }
        }
        if let Some(c) = c {
            if let Some(mac) = c.peer.vtep_mac {
                side.by_mac.entry(mac).or_default().insert(net);
            }
            side.candidates.insert(net, c);
        }
        old
    }

    /// The keys of `net` changed: choose again for it and for the subnets sharing a MAC with
    /// its old or new choice.
    fn refresh<N: Family>(&mut self, net: N, up: &mut Update) {
        let new = self.candidate(net);
        let new_mac = new.as_ref().and_then(|c| c.peer.vtep_mac);
        let old = self.set_candidate(net, new);
        let old_mac = old.and_then(|c| c.peer.vtep_mac);
        let mut affected = BTreeSet::from([net]);
        for mac in [old_mac, new_mac].into_iter().flatten() {
            affected.extend(
                N::side(self)
                    .by_mac
                    .get(&mac)
                    .into_iter()
                    .flatten()
                    .copied(),
            );
        }
        for s in affected {
            let eff = self.effective(s);
            let peer = eff.as_ref().ok().copied().flatten();
            let own = self.is_own_subnet(s);
            let sent = N::sent(self);
            let told = &mut N::side_mut(self).told;
            let before = match peer {
                Some(p) => told.insert(s, p),
                None => told.remove(&s),
            };
            match peer {
                _ if !sent => {}
                Some(p) if before != Some(p) => up.events.push(N::upsert(p)),
                // The changed subnet always says so when it has no peer: it may have had one
                // before this view was built (the daemon ignores a Remove of nothing).
                None if before.is_some() || (s == net && !own) => up.events.push(N::remove(s)),
                _ => {}
            }
            self.judge_keys(s, eff.err(), up);
        }
    }

    /// Records why each key of `net` is skipped (`mac`: the subnet's MAC conflict, if any),
    /// reporting the new ones.
    fn judge_keys<N: Family>(&mut self, net: N, mac: Option<Skip>, up: &mut Update) {
        let side = N::side(self);
        let chosen = side.candidates.get(&net).map(|c| c.key.clone());
        let keys: Vec<String> = side
            .by_subnet
            .get(&net)
            .map(|k| k.iter().cloned().collect())
            .unwrap_or_default();
        for k in keys {
            let skip = if self.is_own_subnet(net) {
                None
            } else if chosen.as_deref() == Some(k.as_str()) {
                mac.clone()
            } else {
                match self.judge::<N>(&k) {
                    Some(Err(s)) => Some(s),
                    Some(Ok(_)) => chosen.clone().map(|by| Skip::Shadowed { by }),
                    None => None,
                }
            };
            self.note(format!("{}{}", key_id(&k), N::TAG), skip, up);
        }
    }

    fn note(&mut self, id: String, skip: Option<Skip>, up: &mut Update) {
        match skip {
            Some(s) => {
                if self.skips.get(&id) != Some(&s) {
                    self.skips.insert(id.clone(), s.clone());
                    up.skipped.push((id, s));
                }
            }
            None => {
                self.skips.remove(&id);
            }
        }
    }

    /// Chooses everything again for one family; returns its snapshot.
    fn rebuild_side<N: Family>(&mut self, up: &mut Update) -> PeerEvent {
        let side = N::side_mut(self);
        side.candidates.clear();
        side.by_mac.clear();
        side.told.clear();
        let nets: Vec<N> = side.by_subnet.keys().copied().collect();
        for &net in &nets {
            let c = self.candidate(net);
            self.set_candidate(net, c);
        }
        for &net in &nets {
            let eff = self.effective(net);
            if let Ok(Some(p)) = eff {
                N::side_mut(self).told.insert(net, p);
            }
            self.judge_keys(net, eff.err(), up);
        }
        N::snapshot(N::side(self).told.values().copied().collect())
    }

    /// Chooses everything again from `leases`; `junk` are the keys that are not subnets.
    fn rebuild(&mut self, junk: HashMap<String, Skip>) -> Update {
        let old_skips = std::mem::take(&mut self.skips);
        let mut up = Update::default();
        let v4 = self.rebuild_side::<Ipv4Net>(&mut up);
        let mut events = Vec::new();
        if Ipv4Net::sent(self) {
            events.push(v4);
        }
        if self.serve6 {
            events.push(self.rebuild_side::<Ipv6Net>(&mut up));
        }
        self.skips.extend(junk);
        // Report only what is new since before the re-list.
        up.skipped = self
            .skips
            .iter()
            .filter(|(k, s)| old_skips.get(*k) != Some(*s))
            .map(|(k, s)| (k.clone(), s.clone()))
            .collect();
        up.skipped.sort_by(|a, b| a.0.cmp(&b.0));
        up.events = events;
        up
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;
    use crate::lease::LeaseAttrs;
    use crate::peer::Peer;

    fn cfg() -> NetworkConfig {
        NetworkConfig::parse(br#"{"Network":"10.244.0.0/16"}"#).unwrap()
    }

    fn attrs(ip: u8, mac: u8) -> LeaseAttrs {
        LeaseAttrs::vxlan(
            Ipv4Addr::new(198, 18, 0, ip),
            1,
            crate::mac::MacAddr([2, 0, 0, 0, 0, mac]),
        )
    }

    fn own() -> OwnLease {
        OwnLease {
            subnet: Some("10.244.1.0/24".parse().unwrap()),
            subnet6: None,
            attrs: attrs(1, 1),
        }
    }

    fn kv(name: &str, value: &str, created: i64) -> SubnetKv {
        SubnetKv::new(name.into(), value.as_bytes(), 0, created, created)
    }

    fn peer(n: u8, ip: u8, mac: u8) -> Peer {
        crate::peer::test_peer(n, ip, mac)
    }

    fn snapshot(up: &Update) -> Vec<Peer> {
        match up.events.as_slice() {
            [PeerEvent::Snapshot(p)] => p.clone(),
            other => panic!("not a snapshot: {other:?}"),
        }
    }

    fn put(v: &mut PeerView, name: &str, value: &str, created: i64) -> Update {
        v.apply(SubnetChange::Put(kv(name, value, created)))
    }

    fn del(v: &mut PeerView, name: &str) -> Update {
        v.apply(SubnetChange::Delete(name.into()))
    }

    fn events(up: &Update) -> Vec<String> {
        up.events
            .iter()
            .map(|e| match e {
                PeerEvent::Upsert(p) => format!("+{} {}", p.subnet, p.vtep_mac.unwrap()),
                PeerEvent::Remove(n) => format!("-{n}"),
                other => format!("{other:?}"),
            })
            .collect()
    }

    #[test]
    fn an_alias_cannot_remove_or_replace_a_live_plain_key() {
        let mut v = PeerView::new(cfg(), own());
        let good = attrs(2, 2).to_json();
        // The alias sorts after the plain key: it used to win the list.
        let up = v.reset(
            own(),
            vec![
                kv("10.244.2.0-24", &good, 5),
                kv("10.244.2.0-24&fd00:0:0:2::-64", "junk", 6),
            ],
        );
        assert_eq!(snapshot(&up), vec![peer(2, 2, 2)]);
        assert_eq!(up.skipped.len(), 1);
        assert!(matches!(up.skipped[0].1, Skip::Invalid(_)));
        // A garbage put and a delete of the alias change nothing.
        assert!(
            put(&mut v, "10.244.2.0-24&fd00:0:0:2::-64", "still junk", 6)
                .events
                .is_empty()
        );
        assert!(del(&mut v, "10.244.2.0-24&fd00:0:0:2::-64")
            .events
            .is_empty());
        // A valid alias pointing elsewhere is shadowed by the plain key, and reported.
        let evil = attrs(66, 66).to_json();
        let up = put(&mut v, "10.244.2.0-24&fd00:0:0:66::-64", &evil, 9);
        assert!(up.events.is_empty(), "{:?}", events(&up));
        assert_eq!(
            up.skipped,
            vec![(
                "10.244.2.0-24&fd00:0:0:66::-64".to_string(),
                Skip::Shadowed {
                    by: "10.244.2.0-24".into()
                }
            )]
        );
        // The plain key goes: the alias is all that is left and speaks for the subnet; when it
        // goes too, the subnet does.
        assert_eq!(
            events(&del(&mut v, "10.244.2.0-24")),
            vec!["+10.244.2.0/24 02:00:00:00:00:42"]
        );
        assert_eq!(
            events(&del(&mut v, "10.244.2.0-24&fd00:0:0:66::-64")),
            vec!["-10.244.2.0/24"]
        );
    }

    #[test]
    fn among_aliases_the_oldest_speaks() {
        let mut v = PeerView::new(cfg(), own());
        let up = v.reset(
            own(),
            vec![
                kv("10.244.3.0-24&fd00:0:0:b::-64", &attrs(3, 3).to_json(), 7),
                kv("10.244.3.0-24&fd00:0:0:a::-64", &attrs(4, 4).to_json(), 8),
            ],
        );
        assert_eq!(snapshot(&up), vec![peer(3, 3, 3)]);
        // Same order whatever order they arrive in.
        let mut w = PeerView::new(cfg(), own());
        put(
            &mut w,
            "10.244.3.0-24&fd00:0:0:a::-64",
            &attrs(4, 4).to_json(),
            8,
        );
        put(
            &mut w,
            "10.244.3.0-24&fd00:0:0:b::-64",
            &attrs(3, 3).to_json(),
            7,
        );
        assert_eq!(w.v4.told, v.v4.told);
    }

    #[test]
    fn a_vtep_mac_at_two_addresses_stays_with_the_oldest_lease() {
        let mut v = PeerView::new(cfg(), own());
        let up = v.reset(
            own(),
            vec![
                kv("10.244.2.0-24", &attrs(2, 9).to_json(), 10),
                kv("10.244.3.0-24", &attrs(3, 9).to_json(), 4),
            ],
        );
        assert_eq!(snapshot(&up), vec![peer(3, 3, 9)]);
        assert_eq!(
            up.skipped,
            vec![(
                "10.244.2.0-24".to_string(),
                Skip::DuplicateMac {
                    mac: crate::mac::MacAddr([2, 0, 0, 0, 0, 9]),
                    kept: "10.244.3.0-24".into()
                }
            )]
        );
        // A re-list reports nothing new.
        let up = v.reset(
            own(),
            vec![
                kv("10.244.2.0-24", &attrs(2, 9).to_json(), 10),
                kv("10.244.3.0-24", &attrs(3, 9).to_json(), 4),
            ],
        );
        assert!(up.skipped.is_empty(), "{:?}", up.skipped);
        // The keeper leaves: the other lease gets the MAC.
        assert_eq!(
            events(&del(&mut v, "10.244.3.0-24")),
            vec!["+10.244.2.0/24 02:00:00:00:00:09", "-10.244.3.0/24"]
        );
        // A younger lease copying the MAC cannot take it over.
        let up = put(&mut v, "10.244.4.0-24", &attrs(4, 9).to_json(), 20);
        assert_eq!(events(&up), vec!["-10.244.4.0/24"]);
        assert!(matches!(up.skipped[0].1, Skip::DuplicateMac { .. }));
        assert_eq!(v.v4.told.len(), 1);
        // One node with two subnets (same MAC, same address) is not a conflict.
        let up = put(&mut v, "10.244.5.0-24", &attrs(2, 9).to_json(), 21);
        assert_eq!(events(&up), vec!["+10.244.5.0/24 02:00:00:00:00:09"]);
    }

    #[test]
    fn oversized_and_junk_keys_are_reported_once() {
        let mut v = PeerView::new(cfg(), own());
        let big = "x".repeat(MAX_LEASE_VALUE + 1);
        let huge_key = format!("10.244.9.0-24&{}", "y".repeat(1000));
        let kvs = || {
            vec![
                kv("10.244.7.0-24", &big, 1),
                kv("not-a-subnet", "{}", 2),
                kv(&huge_key, &attrs(9, 9).to_json(), 3),
            ]
        };
        let up = v.reset(own(), kvs());
        assert_eq!(snapshot(&up), vec![]);
        assert_eq!(up.skipped.len(), 3, "{:?}", up.skipped);
        assert!(up
            .skipped
            .contains(&("10.244.7.0-24".into(), Skip::Oversized(MAX_LEASE_VALUE + 1))));
        assert!(up.skipped.iter().all(|(k, _)| k.len() < 100));
        assert!(v.reset(own(), kvs()).skipped.is_empty());
        assert!(v.set_own(own()).skipped.is_empty());
    }

    #[test]
    fn our_own_leases_are_left_out() {
        let mut v = PeerView::new(cfg(), own());
        let up = v.reset(
            own(),
            vec![
                kv("10.244.1.0-24", &attrs(1, 1).to_json(), 1),
                // Ours (address and MAC) under another subnet: right after a re-acquire.
                kv("10.244.9.0-24", &attrs(1, 1).to_json(), 2),
                // Our address with another MAC: refused.
                kv("10.244.8.0-24", &attrs(1, 8).to_json(), 3),
            ],
        );
        assert_eq!(snapshot(&up), vec![]);
        assert_eq!(up.skipped.len(), 1, "{:?}", up.skipped);
        assert_eq!(up.skipped[0].0, "10.244.8.0-24");
        // A key of another length over our subnet is just invalid.
        let up = put(&mut v, "10.244.1.0-25", &attrs(6, 6).to_json(), 4);
        assert!(matches!(&up.skipped[..], [(k, Skip::Invalid(_))] if k == "10.244.1.0-25"));
        // Our own subnet changing produces nothing.
        assert!(put(&mut v, "10.244.1.0-24", &attrs(5, 5).to_json(), 1)
            .events
            .is_empty());
    }

    fn dual_cfg() -> NetworkConfig {
        NetworkConfig::parse(
            br#"{"Network":"10.244.0.0/16","EnableIPv6":true,"IPv6Network":"fd00:10:244::/56"}"#,
        )
        .unwrap()
    }

    /// A dual-stack lease: v4 side as `attrs`, v6 side from fd00:198:18::`ip`, MAC
    /// 02:00:00:00:06:`mac`.
    fn dual_attrs(ip: u8, mac: u8) -> LeaseAttrs {
        let mut a = attrs(ip, mac);
        a.v6 = Some(crate::lease::LeaseV6 {
            public_ip: format!("fd00:198:18::{ip:x}").parse().unwrap(),
            backend: crate::lease::LeaseBackend::Vxlan {
                vni: 1,
                vtep_mac: crate::mac::MacAddr([2, 0, 0, 0, 6, mac]),
            },
        });
        a
    }

    /// flannel's IPv6-only lease: `dual_attrs` without its IPv4 side.
    fn only6_attrs(ip: u8, mac: u8) -> LeaseAttrs {
        LeaseAttrs {
            v4: None,
            ..dual_attrs(ip, mac)
        }
    }

    fn dual_own() -> OwnLease {
        OwnLease {
            subnet: Some("10.244.1.0/24".parse().unwrap()),
            subnet6: Some("fd00:10:244:1::/64".parse().unwrap()),
            attrs: dual_attrs(1, 1),
        }
    }

    fn peer6(n: u8, ip: u8, mac: u8) -> PeerOf<Ipv6Net> {
        PeerOf {
            subnet: format!("fd00:10:244:{n:x}::/64").parse().unwrap(),
            public_ip: format!("fd00:198:18::{ip:x}").parse().unwrap(),
            vtep_mac: Some(crate::mac::MacAddr([2, 0, 0, 0, 6, mac])),
        }
    }

    fn snapshots(up: &Update) -> (Vec<Peer>, Vec<PeerOf<Ipv6Net>>) {
        match up.events.as_slice() {
            [PeerEvent::Snapshot(p), PeerEvent::Snapshot6(p6)] => (p.clone(), p6.clone()),
            other => panic!("not a snapshot per family: {other:?}"),
        }
    }

    #[test]
    fn a_dual_stack_key_is_a_peer_in_each_family() {
        let mut v = PeerView::new(dual_cfg(), dual_own());
        let up = v.reset(
            dual_own(),
            vec![
                kv(
                    "10.244.2.0-24&fd00:10:244:2::-64",
                    &dual_attrs(2, 2).to_json(),
                    5,
                ),
                // Ours: left out in both families.
                kv(
                    "10.244.1.0-24&fd00:10:244:1::-64",
                    &dual_attrs(1, 1).to_json(),
                    1,
                ),
            ],
        );
        assert_eq!(snapshots(&up), (vec![peer(2, 2, 2)], vec![peer6(2, 2, 2)]));
        assert!(up.skipped.is_empty(), "{:?}", up.skipped);
        // The node leaves: both sides go.
        let up = del(&mut v, "10.244.2.0-24&fd00:10:244:2::-64");
        assert!(
            matches!(up.events.as_slice(), [PeerEvent::Remove(a), PeerEvent::Remove6(b)]
                if *a == peer(2, 2, 2).subnet && *b == peer6(2, 2, 2).subnet),
            "{:?}",
            up.events
        );
        // On a v4-only network the same key is a v4 peer, and nothing is said of its v6 side.
        let mut w = PeerView::new(cfg(), own());
        let up = w.reset(
            own(),
            vec![kv(
                "10.244.2.0-24&fd00:10:244:2::-64",
                &dual_attrs(2, 2).to_json(),
                5,
            )],
        );
        assert_eq!(snapshot(&up), vec![peer(2, 2, 2)]);
        assert!(up.skipped.is_empty(), "{:?}", up.skipped);
    }

    #[test]
    fn ipv6_only_keys_are_separate_v6_peers_and_no_v4_subnet() {
        let mut v = PeerView::new(dual_cfg(), dual_own());
        let up = v.reset(
            dual_own(),
            vec![
                kv(
                    "0.0.0.0-0&fd00:10:244:3::-64",
                    &only6_attrs(3, 3).to_json(),
                    5,
                ),
                kv(
                    "0.0.0.0-0&fd00:10:244:4::-64",
                    &only6_attrs(4, 4).to_json(),
                    6,
                ),
            ],
        );
        assert_eq!(
            snapshots(&up),
            (vec![], vec![peer6(3, 3, 3), peer6(4, 4, 4)])
        );
        assert!(up.skipped.is_empty(), "{:?}", up.skipped);
        let up = del(&mut v, "0.0.0.0-0&fd00:10:244:3::-64");
        assert!(
            matches!(up.events.as_slice(), [PeerEvent::Remove6(n)] if *n == peer6(3, 3, 3).subnet),
            "{:?}",
            up.events
        );
        assert_eq!(
            v.v6.told.values().copied().collect::<Vec<_>>(),
            vec![peer6(4, 4, 4)]
        );
        // On a v4-only network such a key is reported, not silently dropped.
        let mut w = PeerView::new(cfg(), own());
        let up = w.reset(
            own(),
            vec![kv(
                "0.0.0.0-0&fd00:10:244:3::-64",
                &only6_attrs(3, 3).to_json(),
                5,
            )],
        );
        assert_eq!(snapshot(&up), vec![]);
        assert!(
            matches!(&up.skipped[..], [(k, Skip::Invalid(_))] if k == "0.0.0.0-0&fd00:10:244:3::-64"),
            "{:?}",
            up.skipped
        );
    }

    /// On an IPv6-only network only IPv6 peers are sent (a `Snapshot6`, no `Snapshot`);
    /// flannel's IPv6-only leases are peers, and a plain IPv4 key is reported.
    #[test]
    fn an_ipv6_only_network_sends_only_ipv6_peers() {
        let cfg = NetworkConfig::parse(
            br#"{"EnableIPv4":false,"EnableIPv6":true,"IPv6Network":"fd00:10:244::/56"}"#,
        )
        .unwrap();
        let own = OwnLease {
            subnet: None,
            subnet6: Some("fd00:10:244:1::/64".parse().unwrap()),
            attrs: only6_attrs(1, 1),
        };
        let mut v = PeerView::new(cfg, own.clone());
        let up = v.reset(
            own,
            vec![
                kv(
                    "0.0.0.0-0&fd00:10:244:1::-64",
                    &only6_attrs(1, 1).to_json(),
                    4,
                ),
                kv(
                    "0.0.0.0-0&fd00:10:244:3::-64",
                    &only6_attrs(3, 3).to_json(),
                    5,
                ),
                kv("10.244.2.0-24", &attrs(2, 2).to_json(), 6),
            ],
        );
        assert!(
            matches!(up.events.as_slice(), [PeerEvent::Snapshot6(p)] if *p == vec![peer6(3, 3, 3)]),
            "{:?}",
            up.events
        );
        assert!(
            matches!(&up.skipped[..], [(k, Skip::Invalid(why))]
                if k == "10.244.2.0-24" && why.contains("no IPv4 (EnableIPv4)")),
            "{:?}",
            up.skipped
        );
        let up = v.apply(SubnetChange::Put(kv(
            "0.0.0.0-0&fd00:10:244:4::-64",
            &only6_attrs(4, 4).to_json(),
            7,
        )));
        assert!(
            matches!(up.events.as_slice(), [PeerEvent::Upsert6(p)] if *p == peer6(4, 4, 4)),
            "{:?}",
            up.events
        );
        // A plain IPv4 key put or deleted later is reported, and sends nothing.
        let up = v.apply(SubnetChange::Put(kv(
            "10.244.5.0-24",
            &attrs(5, 5).to_json(),
            8,
        )));
        assert!(up.events.is_empty(), "{:?}", up.events);
        assert!(
            matches!(&up.skipped[..], [(k, Skip::Invalid(_))] if k == "10.244.5.0-24"),
            "{:?}",
            up.skipped
        );
        let up = del(&mut v, "10.244.5.0-24");
        assert!(up.events.is_empty(), "{:?}", up.events);
    }

    /// A node that serves IPv4 only on a dual-stack network (udp backend) neither judges nor
    /// sends the keys' IPv6 sides: no Snapshot6, nothing skipped for a bad IPv6 side, and an
    /// IPv6-only key is no IPv4 subnet either.
    #[test]
    fn a_node_serving_no_ipv6_leaves_the_ipv6_sides_alone() {
        let mut own = own();
        own.attrs = attrs(1, 1);
        let mut v = PeerView::new(dual_cfg(), own.clone());
        let up = v.reset(
            own,
            vec![
                kv(
                    "10.244.2.0-24&fd00:10:244:2::-64",
                    &attrs(2, 2).to_json(),
                    5,
                ),
                kv(
                    "0.0.0.0-0&fd00:10:244:3::-64",
                    &dual_attrs(3, 3).to_json(),
                    6,
                ),
            ],
        );
        assert!(
            matches!(up.events.as_slice(), [PeerEvent::Snapshot(p)] if *p == vec![peer(2, 2, 2)]),
            "{:?}",
            up.events
        );
        assert!(up.skipped.is_empty(), "{:?}", up.skipped);
        let up = del(&mut v, "0.0.0.0-0&fd00:10:244:3::-64");
        assert!(up.events.is_empty(), "{:?}", up.events);
    }

    #[test]
    fn a_bad_v6_side_costs_only_the_v6_peer() {
        let mut v = PeerView::new(dual_cfg(), dual_own());
        // No PublicIPv6 at all, and a v6 subnet of the wrong length.
        let up = v.reset(
            dual_own(),
            vec![
                kv(
                    "10.244.2.0-24&fd00:10:244:2::-64",
                    &attrs(2, 2).to_json(),
                    5,
                ),
                kv(
                    "10.244.3.0-24&fd00:10:244:3::-80",
                    &dual_attrs(3, 3).to_json(),
                    6,
                ),
            ],
        );
        assert_eq!(snapshots(&up), (vec![peer(2, 2, 2), peer(3, 3, 3)], vec![]));
        let why: BTreeMap<String, String> = up
            .skipped
            .iter()
            .map(|(k, s)| (k.clone(), s.reason()))
            .collect();
        assert_eq!(why.len(), 2, "{why:?}");
        assert!(
            why["10.244.2.0-24&fd00:10:244:2::-64 (IPv6 side)"].contains("PublicIPv6 is missing")
        );
        assert!(why["10.244.3.0-24&fd00:10:244:3::-80 (IPv6 side)"].contains("IPv6SubnetLen"));
        // Fixed: the v6 peer comes, the v4 one is unchanged (no event for it).
        let up = put(
            &mut v,
            "10.244.2.0-24&fd00:10:244:2::-64",
            &dual_attrs(2, 2).to_json(),
            5,
        );
        assert!(
            matches!(up.events.as_slice(), [PeerEvent::Upsert6(p)] if *p == peer6(2, 2, 2)),
            "{:?}",
            up.events
        );
    }

    #[test]
    fn v6_identity_and_mac_conflicts_are_judged_in_the_v6_family() {
        let mut v = PeerView::new(dual_cfg(), dual_own());
        // Our v6 MAC at another v6 address; and two leases with one v6 MAC at two addresses.
        let mut thief = dual_attrs(5, 5);
        thief.v6 = dual_attrs(5, 1).v6;
        let mut copy = dual_attrs(7, 7);
        copy.v6 = dual_attrs(7, 6).v6;
        let up = v.reset(
            dual_own(),
            vec![
                kv("10.244.5.0-24&fd00:10:244:5::-64", &thief.to_json(), 3),
                kv(
                    "10.244.6.0-24&fd00:10:244:6::-64",
                    &dual_attrs(6, 6).to_json(),
                    4,
                ),
                kv("10.244.7.0-24&fd00:10:244:7::-64", &copy.to_json(), 9),
            ],
        );
        // Every v4 side is fine; v6: only the oldest holder of MAC ..:06:06 and not the thief.
        let (p4, p6) = snapshots(&up);
        assert_eq!(p4.len(), 3);
        assert_eq!(p6, vec![peer6(6, 6, 6)]);
        let why: BTreeMap<String, Skip> = up.skipped.into_iter().collect();
        assert_eq!(why.len(), 2, "{why:?}");
        assert!(why["10.244.5.0-24&fd00:10:244:5::-64 (IPv6 side)"]
            .reason()
            .contains("BackendV6Data.VtepMAC 02:00:00:00:06:01 is this node's"));
        assert_eq!(
            why["10.244.7.0-24&fd00:10:244:7::-64 (IPv6 side)"],
            Skip::DuplicateMac {
                mac: crate::mac::MacAddr([2, 0, 0, 0, 6, 6]),
                kept: "10.244.6.0-24&fd00:10:244:6::-64 (IPv6 side)".into()
            }
        );
    }
}
