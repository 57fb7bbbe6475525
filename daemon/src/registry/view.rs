//! The peer watcher's view of `<prefix>/subnets/`: every key by its etcd name, and the one peer
//! each subnet resolves to.
//!
//! Several keys can name one subnet (flannel's dual-stack alias `<subnet>&<v6 subnet>`), and
//! several leases can announce one VTEP MAC. Both are settled the same way on every node, so a
//! stray key can neither remove nor take over a live node's subnet:
//! - per subnet, among its valid keys, a plain key wins over aliases, then the oldest
//!   (create_revision), then the lowest name; the subnet goes away only when no valid key is left;
//! - per VTEP MAC, the oldest lease keeps it; a younger one announcing it at another address is
//!   skipped (the kernel keeps one destination per MAC: the two would take turns every resync).
//!   One node holding two subnets (same MAC and address, after a re-lease) is fine.
//!
//! Pure: it returns the events for the daemon and the keys newly skipped (for logs and metrics).

use std::collections::{BTreeMap, BTreeSet, HashMap};

use ipnet::Ipv4Net;

use super::{OwnLease, PeerEvent, SubnetChange, SubnetKv, MAX_LEASE_VALUE};
use crate::config::NetworkConfig;
use crate::excerpt::echo;
use crate::lease::{check_against_own, parse_lease, LeaseError};
use crate::mac::MacAddr;
use crate::peer::Peer;
use crate::subnet::{overlaps, parse_subnet_key, subnet_key};

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

/// What a change means for the daemon, and which keys it newly skips.
#[derive(Debug, Default)]
pub struct Update {
    pub events: Vec<PeerEvent>,
    pub skipped: Vec<(String, Skip)>,
}

struct Lease {
    net: Ipv4Net,
    create_revision: i64,
    /// Validated against the network config (what does not depend on our own lease).
    parsed: Result<Peer, Skip>,
}

/// The key speaking for a subnet.
#[derive(Clone, Debug)]
struct Candidate {
    key: String,
    create_revision: i64,
    peer: Peer,
}

pub struct PeerView {
    cfg: NetworkConfig,
    own: OwnLease,
    leases: BTreeMap<String, Lease>,
    by_subnet: BTreeMap<Ipv4Net, BTreeSet<String>>,
    candidates: BTreeMap<Ipv4Net, Candidate>,
    /// Subnets whose candidate announces the MAC.
    by_mac: HashMap<MacAddr, BTreeSet<Ipv4Net>>,
    /// What the daemon has been told: one peer per subnet.
    told: BTreeMap<Ipv4Net, Peer>,
    /// Keys skipped now, and why: a key is reported once per reason, not at every re-list.
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
            cfg,
            own,
            leases: BTreeMap::new(),
            by_subnet: BTreeMap::new(),
            candidates: BTreeMap::new(),
            by_mac: HashMap::new(),
            told: BTreeMap::new(),
            skips: HashMap::new(),
        }
    }

    pub fn own(&self) -> &OwnLease {
        &self.own
    }

    /// A fresh list of every key (and our lease as of then): a `Snapshot`.
    pub fn reset(&mut self, own: OwnLease, kvs: Vec<SubnetKv>) -> Update {
        self.own = own;
        self.leases.clear();
        self.by_subnet.clear();
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
        match change {
            SubnetChange::Put(kv) => {
                let Some(lease) = self.lease_of(&kv) else {
                    self.note(key_id(&kv.name), Some(Skip::NotASubnet), &mut up);
                    return up;
                };
                let net = lease.net;
                self.remove_key(&kv.name);
                self.insert(kv.name, lease);
                self.refresh(net, &mut up);
            }
            SubnetChange::Delete(name) => {
                self.skips.remove(&key_id(&name));
                if let Some(net) = self.remove_key(&name) {
                    self.refresh(net, &mut up);
                }
            }
        }
        up
    }

    /// The lease a key holds, None for a key that is not a subnet.
    fn lease_of(&self, kv: &SubnetKv) -> Option<Lease> {
        if kv.name.len() > MAX_KEY_LEN {
            return None;
        }
        let net = parse_subnet_key(&kv.name)?;
        let parsed = match kv.oversized {
            Some(n) => Err(Skip::Oversized(n)),
            None => parse_lease(&self.cfg, net, &kv.value).map_err(|e| Skip::Invalid(reason(e))),
        };
        Some(Lease {
            net,
            create_revision: kv.create_revision,
            parsed,
        })
    }

    fn insert(&mut self, name: String, lease: Lease) {
        self.by_subnet
            .entry(lease.net)
            .or_default()
            .insert(name.clone());
        self.leases.insert(name, lease);
    }

    /// Forgets a key; returns its subnet if it was one.
    fn remove_key(&mut self, name: &str) -> Option<Ipv4Net> {
        let lease = self.leases.remove(name)?;
        if let Some(keys) = self.by_subnet.get_mut(&lease.net) {
            keys.remove(name);
            if keys.is_empty() {
                self.by_subnet.remove(&lease.net);
            }
        }
        Some(lease.net)
    }

    /// Keys for our own subnet are ours to keep, not peers: left out without a word. (A key
    /// of another length overlapping it is judged like any other, and is invalid.)
    fn is_own_subnet(&self, net: Ipv4Net) -> bool {
        net == self.own.subnet
    }

    /// A peer from this key, or why not (None: our own lease, silently left out).
    fn judge(&self, name: &str) -> Option<Result<Peer, Skip>> {
        let lease = self.leases.get(name)?;
        let p = match &lease.parsed {
            Ok(p) => *p,
            Err(s) => return Some(Err(s.clone())),
        };
        // Our public IP and our VTEP MAC: ours, whatever its subnet (right after a re-acquire
        // the new key can arrive before the keeper says it is ours).
        if p.public_ip == self.own.attrs.public_ip && p.vtep_mac == self.own.attrs.vtep_mac() {
            return None;
        }
        Some(
            check_against_own(&p, &self.own.attrs)
                .map(|()| p)
                .map_err(|e| Skip::Invalid(reason(e))),
        )
    }

    fn candidate(&self, net: Ipv4Net) -> Option<Candidate> {
        if overlaps(net, self.own.subnet) {
            return None;
        }
        let plain = subnet_key(net);
        self.by_subnet
            .get(&net)?
            .iter()
            .filter_map(|k| match self.judge(k) {
                Some(Ok(peer)) => Some(Candidate {
                    key: k.clone(),
                    create_revision: self.leases[k].create_revision,
                    peer,
                }),
                _ => None,
            })
            .min_by(|a, b| {
                (a.key != plain, a.create_revision, &a.key).cmp(&(
                    b.key != plain,
                    b.create_revision,
                    &b.key,
                ))
            })
    }

    /// The lease that keeps `mac`: the oldest candidate announcing it.
    fn mac_keeper(&self, mac: MacAddr) -> Option<&Candidate> {
        self.by_mac
            .get(&mac)?
            .iter()
            .filter_map(|n| self.candidates.get(n))
            .min_by(|a, b| (a.create_revision, &a.key).cmp(&(b.create_revision, &b.key)))
    }

    /// The peer a subnet resolves to, or the MAC conflict that keeps it out.
    fn effective(&self, net: Ipv4Net) -> Result<Option<Peer>, Skip> {
        let Some(c) = self.candidates.get(&net) else {
            return Ok(None);
        };
        if let Some(mac) = c.peer.vtep_mac {
            if let Some(k) = self.mac_keeper(mac) {
                if k.peer.public_ip != c.peer.public_ip {
                    return Err(Skip::DuplicateMac {
                        mac,
                        kept: k.key.clone(),
                    });
                }
            }
        }
        Ok(Some(c.peer))
    }

    fn set_candidate(&mut self, net: Ipv4Net, c: Option<Candidate>) -> Option<Candidate> {
        let old = self.candidates.remove(&net);
        if let Some(mac) = old.as_ref().and_then(|o| o.peer.vtep_mac) {
            if let Some(nets) = self.by_mac.get_mut(&mac) {
                nets.remove(&net);
                if nets.is_empty() {
                    self.by_mac.remove(&mac);
                }
            }
        }
        if let Some(c) = c {
            if let Some(mac) = c.peer.vtep_mac {
                self.by_mac.entry(mac).or_default().insert(net);
            }
            self.candidates.insert(net, c);
        }
        old
    }

    /// The keys of `net` changed: choose again for it and for the subnets sharing a MAC with
    /// its old or new choice.
    fn refresh(&mut self, net: Ipv4Net, up: &mut Update) {
        let new = self.candidate(net);
        let new_mac = new.as_ref().and_then(|c| c.peer.vtep_mac);
        let old = self.set_candidate(net, new);
        let old_mac = old.and_then(|c| c.peer.vtep_mac);
        let mut affected = BTreeSet::from([net]);
        for mac in [old_mac, new_mac].into_iter().flatten() {
            affected.extend(self.by_mac.get(&mac).into_iter().flatten().copied());
        }
        for s in affected {
            let eff = self.effective(s);
            let peer = eff.as_ref().ok().copied().flatten();
            let before = match peer {
                Some(p) => self.told.insert(s, p),
                None => self.told.remove(&s),
            };
            match peer {
                Some(p) if before != Some(p) => up.events.push(PeerEvent::Upsert(p)),
                // The changed subnet always says so when it has no peer: it may have had one
                // before this view was built (the daemon ignores a Remove of nothing).
                None if before.is_some() || (s == net && !self.is_own_subnet(s)) => {
                    up.events.push(PeerEvent::Remove(s))
                }
                _ => {}
            }
            self.judge_keys(s, eff.err(), up);
        }
    }

    /// Records why each key of `net` is skipped (`mac`: the subnet's MAC conflict, if any),
    /// reporting the new ones.
    fn judge_keys(&mut self, net: Ipv4Net, mac: Option<Skip>, up: &mut Update) {
        let chosen = self.candidates.get(&net).map(|c| c.key.clone());
        let keys: Vec<String> = self
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
                match self.judge(&k) {
                    Some(Err(s)) => Some(s),
                    Some(Ok(_)) => chosen.clone().map(|by| Skip::Shadowed { by }),
                    None => None,
                }
            };
            self.note(key_id(&k), skip, up);
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

    /// Chooses everything again from `leases`; `junk` are the keys that are not subnets.
    fn rebuild(&mut self, junk: HashMap<String, Skip>) -> Update {
        let old_skips = std::mem::take(&mut self.skips);
        self.candidates.clear();
        self.by_mac.clear();
        let nets: Vec<Ipv4Net> = self.by_subnet.keys().copied().collect();
        for &net in &nets {
            let c = self.candidate(net);
            self.set_candidate(net, c);
        }
        let mut up = Update::default();
        self.told.clear();
        for &net in &nets {
            let eff = self.effective(net);
            if let Ok(Some(p)) = eff {
                self.told.insert(net, p);
            }
            self.judge_keys(net, eff.err(), &mut up);
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
        up.events = vec![PeerEvent::Snapshot(self.told.values().copied().collect())];
        up
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;
    use crate::lease::LeaseAttrs;

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
            subnet: "10.244.1.0/24".parse().unwrap(),
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
        assert_eq!(w.told, v.told);
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
        assert_eq!(v.told.len(), 1);
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
}
