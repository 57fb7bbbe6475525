//! Which Nodes are served when their peers conflict (overlapping subnets, or one VTEP MAC at
//! two addresses): the older Node (`creationTimestamp`, then name) wins, whatever order this
//! twilld saw the Nodes in, so every node of the cluster routes a contested subnet to the same
//! place (first-seen would not: a running watch sees Nodes in event order, a relist by name).
//!
//! Kept after every change: a Node's peer is active exactly when it conflicts with no older
//! active peer, which is what placing every Node oldest first would give.

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::api::core::v1::Node;

use super::node::{name_of, NodeDigest, NodeSkip, Skip, SkipReason};
use crate::excerpt::echo;
use crate::peer::PeerOf;
use crate::registry::{PeerEvent, PeerFamily};
use crate::subnet::{overlaps, Cidr};

#[derive(Clone, Copy, Debug)]
pub(super) enum State<N: Cidr> {
    /// Not a peer (not annotated, no podCIDR, invalid).
    Ignored,
    Active(PeerOf<N>),
    /// Valid, but held back by an older node's active peer: its subnet overlaps that one's (a
    /// podCIDR handed over before the old node's deletion was seen, or set by hand twice), or
    /// it announces that one's VTEP MAC at another address. Becomes active when the conflict
    /// goes.
    Blocked(PeerOf<N>),
}

impl<N: Cidr> State<N> {
    pub(super) fn active(&self) -> Option<PeerOf<N>> {
        match *self {
            State::Active(p) => Some(p),
            _ => None,
        }
    }

    fn peer(&self) -> Option<PeerOf<N>> {
        match *self {
            State::Active(p) | State::Blocked(p) => Some(p),
            State::Ignored => None,
        }
    }
}

#[derive(Clone, Debug)]
pub(super) struct Known<N: Cidr> {
    pub(super) digest: NodeDigest,
    pub(super) state: State<N>,
    pub(super) seniority: Seniority,
}

/// One family's view of every Node by name.
pub(super) type Table<N> = BTreeMap<String, Known<N>>;

/// The order in which Nodes claim what they announce: the older (`creationTimestamp`) first,
/// then by name, as etcd mode keeps the oldest lease.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(super) struct Seniority {
    /// Nanoseconds since the epoch; none (never from a real API server) counts as newest.
    created: i128,
    name: String,
}

impl Seniority {
    pub(super) fn of(node: &Node) -> Seniority {
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

/// What placing or forgetting one node did.
#[derive(Default)]
pub(super) struct Placed {
    /// Removals first, then upserts: a subnet that changes hands is removed before it is added.
    pub(super) events: Vec<PeerEvent>,
    /// Why the node is held back, if it is.
    pub(super) skip: Option<Skip>,
    /// Younger nodes that were peers and are held back now.
    pub(super) demoted: Vec<NodeSkip>,
}

/// Record `name`'s new state in one family and say what changed for the data path.
pub(super) fn place<N: PeerFamily>(
    nodes: &mut Table<N>,
    name: &str,
    digest: NodeDigest,
    seniority: Seniority,
    candidate: Option<PeerOf<N>>,
) -> Placed {
    let old = nodes.remove(name);
    let old_active = old.as_ref().and_then(|k| k.state.active());
    // Who may change with this node: every node its old or new peer conflicts with.
    let mut work = BTreeSet::new();
    for p in [old.and_then(|k| k.state.peer()), candidate]
        .into_iter()
        .flatten()
    {
        work.extend(touched(nodes, &p));
    }
    work.insert((seniority.clone(), name.to_string()));
    nodes.insert(
        name.to_string(),
        Known {
            digest,
            state: candidate.map_or(State::Ignored, State::Blocked),
            seniority: seniority.clone(),
        },
    );
    let settled = settle(nodes, work, Some(name));
    let new_active = nodes.get(name).and_then(|k| k.state.active());
    let skip = match (candidate, new_active) {
        (Some(p), None) => held_back_by(nodes, name, &seniority, &p),
        _ => None,
    };
    let mut events = Vec::new();
    match (old_active, new_active) {
        (Some(o), Some(n)) if o.subnet == n.subnet => {}
        (Some(o), _) => events.push(N::remove(o.subnet)),
        _ => {}
    }
    events.extend(settled.removed.iter().map(|&s| N::remove(s)));
    if let Some(n) = new_active.filter(|&n| old_active != Some(n)) {
        events.push(N::upsert(n));
    }
    events.extend(settled.added.iter().map(|&p| N::upsert(p)));
    Placed {
        events,
        skip,
        demoted: demoted_skips(nodes, settled.demoted),
    }
}

/// `name` is gone from one family's table: its peer's removal, and what that frees.
pub(super) fn forget<N: PeerFamily>(nodes: &mut Table<N>, name: &str) -> Placed {
    let Some(k) = nodes.remove(name) else {
        return Placed::default();
    };
    let Some(p) = k.state.peer() else {
        return Placed::default();
    };
    let settled = settle(nodes, touched(nodes, &p), None);
    let mut events: Vec<PeerEvent> = k
        .state
        .active()
        .map(|p| N::remove(p.subnet))
        .into_iter()
        .collect();
    events.extend(settled.removed.iter().map(|&s| N::remove(s)));
    events.extend(settled.added.iter().map(|&p| N::upsert(p)));
    Placed {
        events,
        skip: None,
        demoted: demoted_skips(nodes, settled.demoted),
    }
}

/// Why `p` cannot be served next to `q`, the active peer of node `holder`, if it cannot.
pub(super) fn conflict<N: Cidr>(p: &PeerOf<N>, q: &PeerOf<N>, holder: &str) -> Option<Skip> {
    if overlaps(q.subnet, p.subnet) {
        return Some(Skip {
            reason: SkipReason::OverlapsPeer,
            detail: format!(
                "subnet {} overlaps node {:?}'s subnet {}, which is older and keeps it; held \
                 back until that node goes",
                p.subnet,
                echo(holder),
                q.subnet
            ),
        });
    }
    match p.vtep_mac {
        Some(mac) if q.vtep_mac == Some(mac) && q.public_ip != p.public_ip => Some(Skip {
            reason: SkipReason::DuplicateMac,
            detail: format!(
                "VtepMAC {mac} is node {:?}'s, at {}, which is older and keeps it (a copied \
                 state dir?); held back until that node goes or one of them changes its MAC",
                echo(holder),
                q.public_ip
            ),
        }),
        _ => None,
    }
}

/// The older node's active peer that holds `p` (node `name`'s) back, if one does.
fn held_back_by<N: Cidr>(
    nodes: &Table<N>,
    name: &str,
    seniority: &Seniority,
    p: &PeerOf<N>,
) -> Option<Skip> {
    nodes
        .iter()
        .filter(|(n, k)| n.as_str() != name && k.seniority < *seniority)
        .find_map(|(n, k)| conflict(p, &k.state.active()?, n))
}

/// Every node whose peer, served or held back, conflicts with `p`.
fn touched<N: Cidr>(nodes: &Table<N>, p: &PeerOf<N>) -> BTreeSet<(Seniority, String)> {
    nodes
        .iter()
        .filter(|(n, k)| k.state.peer().is_some_and(|q| conflict(&q, p, n).is_some()))
        .map(|(n, k)| (k.seniority.clone(), n.clone()))
        .collect()
}

/// What `settle` changed for nodes other than the one being placed.
struct Settled<N: Cidr> {
    removed: Vec<N>,
    added: Vec<PeerOf<N>>,
    demoted: Vec<String>,
}

/// Re-judge the nodes in `work`, and those a change makes worth re-judging, oldest first: a
/// node's state depends only on older ones, so each is judged once, after all of those.
/// `own` (being placed) is judged whatever its recorded state; its events are the caller's.
fn settle<N: Cidr>(
    nodes: &mut Table<N>,
    mut work: BTreeSet<(Seniority, String)>,
    own: Option<&str>,
) -> Settled<N> {
    let mut out = Settled {
        removed: Vec::new(),
        added: Vec::new(),
        demoted: Vec::new(),
    };
    while let Some((seniority, name)) = work.pop_first() {
        let Some(p) = nodes.get(&name).and_then(|k| k.state.peer()) else {
            continue;
        };
        let was = nodes[&name].state.active().is_some();
        let now = held_back_by(nodes, &name, &seniority, &p).is_none();
        let is_own = own == Some(name.as_str());
        if was == now && !is_own {
            continue;
        }
        if let Some(k) = nodes.get_mut(&name) {
            k.state = if now {
                State::Active(p)
            } else {
                State::Blocked(p)
            };
        }
        if !is_own && now {
            out.added.push(p);
        } else if !is_own {
            out.removed.push(p.subnet);
            out.demoted.push(name.clone());
        }
        // Younger nodes this one holds back, or no longer does.
        work.extend(
            touched(nodes, &p)
                .into_iter()
                .filter(|(s, _)| *s > seniority),
        );
    }
    out
}

fn demoted_skips<N: PeerFamily>(nodes: &Table<N>, names: Vec<String>) -> Vec<NodeSkip> {
    names
        .into_iter()
        .filter_map(|name| {
            let k = nodes.get(&name)?;
            let skip = held_back_by(nodes, &name, &k.seniority, &k.state.peer()?)?;
            Some(NodeSkip {
                node: name,
                side: N::TAG,
                skip,
            })
        })
        .collect()
}
