//! The subnet registry: where leases live.
//! `SubnetRegistry` holds the low-level etcd operations; `etcd::EtcdRegistry` is the real
//! implementation. `acquire`, `keep_lease` and `watch_peers` are written against the trait.

pub mod etcd;
pub mod etcd_objects;
pub mod kube;
pub mod objects;
mod peers;
pub(crate) mod skips;
pub(crate) mod view;

pub use peers::watch_peers;

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use ipnet::{Ipv4Net, Ipv6Net};
use tokio::sync::watch;

use crate::config::NetworkConfig;
use crate::lease::{endpoint_of, vtep_mac_of, LeaseAttrs};
use crate::metrics::Metrics;
use crate::peer::{Peer, PeerOf};
use crate::subnet::{
    dual_subnet_key, is_free, subnet_key_v4_part, subnet_key_v6_part, Cidr, SubnetRange,
};

#[derive(Clone, Debug)]
pub struct EtcdOptions {
    pub endpoints: Vec<String>,
    pub prefix: String,
    pub ca_file: Option<PathBuf>,
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
}

#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("etcd: {0}")]
    Etcd(String),
    #[error("Kubernetes API: {0}")]
    Kube(String),
    #[error(transparent)]
    Alloc(#[from] crate::subnet::AllocError),
    /// Bad TLS files, endpoints or prefix: retrying will not help.
    #[error("etcd options: {0}")]
    Options(String),
    /// An IPv6-only network, and no IPv6 side in our lease: nothing to claim.
    #[error("the network is IPv6-only (EnableIPv4 false), but this node has no IPv6 endpoint")]
    NoFamily,
    /// A conditional write lost to other writes every time it was tried.
    #[error("contended: {0}")]
    Contended(String),
}

impl OwnLease {
    /// The key it is held under: `10.244.1.0-24`, or with an IPv6 subnet
    /// `10.244.1.0-24&fd00:10:244:1::-64`.
    pub fn key(&self) -> String {
        dual_subnet_key(self.subnet, self.subnet6)
    }
}

/// The subnets this node had before (subnet file, or the lease just lost): preferred when
/// still free, since pods may still use them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Previous {
    pub v4: Option<Ipv4Net>,
    pub v6: Option<Ipv6Net>,
}

impl From<Option<Ipv4Net>> for Previous {
    fn from(v4: Option<Ipv4Net>) -> Self {
        Previous { v4, v6: None }
    }
}

/// Our own lease as held in the registry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OwnLease {
    /// Our IPv4 subnet; None on an IPv6-only network.
    pub subnet: Option<Ipv4Net>,
    /// Our IPv6 subnet on a dual-stack network (its endpoint and MAC are in `attrs.v6`).
    pub subnet6: Option<Ipv6Net>,
    pub attrs: LeaseAttrs,
}

/// What the peer watcher tells the daemon. A `Snapshot` is the complete, consistent set of valid
/// peers (first list, and after every re-list: reconnect, compaction); the daemon diffs it.
#[derive(Clone, Debug)]
pub enum PeerEvent {
    Snapshot(Vec<Peer>),
    Upsert(Peer),
    Remove(Ipv4Net),
    /// The same three for the IPv6 sides of the leases, on a network with IPv6: a re-list
    /// sends `Snapshot` then `Snapshot6`.
    Snapshot6(Vec<PeerOf<Ipv6Net>>),
    Upsert6(PeerOf<Ipv6Net>),
    Remove6(Ipv6Net),
    /// Listing the leases failed (the error): until the next `Snapshot`, joins and leaves of
    /// other nodes go unseen.
    ListFailed(String),
}

/// One address family's side of the peer events, for the watchers that judge both families
/// with one generic code path.
pub trait PeerFamily: crate::lease::LeaseFamily {
    /// Appended to a key's or node's name where it names this side (skips, logs).
    const TAG: &'static str;
    fn upsert(p: PeerOf<Self>) -> PeerEvent;
    fn remove(net: Self) -> PeerEvent;
    fn snapshot(peers: Vec<PeerOf<Self>>) -> PeerEvent;
}

impl PeerFamily for Ipv4Net {
    const TAG: &'static str = "";
    fn upsert(p: PeerOf<Self>) -> PeerEvent {
        PeerEvent::Upsert(p)
    }
    fn remove(net: Self) -> PeerEvent {
        PeerEvent::Remove(net)
    }
    fn snapshot(peers: Vec<PeerOf<Self>>) -> PeerEvent {
        PeerEvent::Snapshot(peers)
    }
}

impl PeerFamily for Ipv6Net {
    const TAG: &'static str = " (IPv6 side)";
    fn upsert(p: PeerOf<Self>) -> PeerEvent {
        PeerEvent::Upsert6(p)
    }
    fn remove(net: Self) -> PeerEvent {
        PeerEvent::Remove6(net)
    }
    fn snapshot(peers: Vec<PeerOf<Self>>) -> PeerEvent {
        PeerEvent::Snapshot6(peers)
    }
}

/// Lease values above this size are dropped where they are read, never kept: a flannel lease
/// is about 150 bytes, and etcd accepts 1.5 MiB per value.
pub const MAX_LEASE_VALUE: usize = 64 * 1024;

/// One key under `<prefix>/subnets/`. `name` is the part after that directory
/// (`10.244.1.0-24`, possibly with a dual-stack `&...` suffix).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SubnetKv {
    pub name: String,
    /// Empty when the value was `oversized`.
    pub value: Vec<u8>,
    /// etcd lease id; 0 is a reservation (no lease, never expires).
    pub lease: i64,
    pub mod_revision: i64,
    /// When the key was created: the older of two claims wins a conflict.
    pub create_revision: i64,
    /// The value was larger than `MAX_LEASE_VALUE` (at least this many bytes) and dropped.
    pub oversized: Option<usize>,
}

impl SubnetKv {
    /// Copies `value` only when it is at most `MAX_LEASE_VALUE` bytes.
    pub fn new(
        name: String,
        value: &[u8],
        lease: i64,
        mod_revision: i64,
        create_revision: i64,
    ) -> Self {
        let oversized = (value.len() > MAX_LEASE_VALUE).then_some(value.len());
        SubnetKv {
            name,
            value: if oversized.is_some() {
                Vec::new()
            } else {
                value.to_vec()
            },
            lease,
            mod_revision,
            create_revision,
            oversized,
        }
    }
}

/// What a watch delivers.
#[derive(Clone, Debug)]
pub enum WatchMsg {
    Changes(Vec<SubnetChange>),
    /// The watch ended (cancelled, compacted, stream closed): re-list and watch again.
    Reset(String),
}

#[derive(Clone, Debug)]
pub enum SubnetChange {
    Put(SubnetKv),
    Delete(String),
}

pub trait SubnetWatch: Send + 'static {
    fn next(&mut self) -> impl Future<Output = Result<WatchMsg, RegistryError>> + Send;
}

/// Low-level registry operations. Every call is bounded in time (an error, never a hang, when
/// etcd is unreachable). Names are relative to `<prefix>/subnets/`.
pub trait SubnetRegistry: Clone + Send + Sync + 'static {
    type Watch: SubnetWatch;

    /// `<prefix>/subnets/`, for messages.
    fn subnets_dir(&self) -> String;
    /// Raw bytes of `<prefix>/config`, None while the key does not exist.
    fn config(&self) -> impl Future<Output = Result<Option<Vec<u8>>, RegistryError>> + Send;
    /// All subnet keys and the store revision they were read at: one consistent view, however
    /// many keys and however large their values (read in pages; oversized values dropped).
    fn list_subnets(
        &self,
    ) -> impl Future<Output = Result<(Vec<SubnetKv>, i64), RegistryError>> + Send;
    /// One subnet key and the store revision it was read at.
    fn get_subnet(
        &self,
        name: &str,
    ) -> impl Future<Output = Result<(Option<SubnetKv>, i64), RegistryError>> + Send;
    fn grant_lease(&self, ttl: Duration)
        -> impl Future<Output = Result<i64, RegistryError>> + Send;
    fn revoke_lease(&self, id: i64) -> impl Future<Output = Result<(), RegistryError>> + Send;
    /// Renew lease `id` once (etcd keep-alive on the same id). Ok(false): the lease is gone.
    fn renew_lease(&self, id: i64) -> impl Future<Output = Result<bool, RegistryError>> + Send;
    /// Txn If(create_revision(key) == 0) Then Put(key, value, lease). Ok(false): key exists.
    fn create_subnet(
        &self,
        name: &str,
        value: &str,
        lease: i64,
    ) -> impl Future<Output = Result<bool, RegistryError>> + Send;
    /// Txn If(mod_revision(key) == mod_revision) Then Put(key, value, lease).
    fn replace_subnet(
        &self,
        name: &str,
        value: &str,
        lease: i64,
        mod_revision: i64,
    ) -> impl Future<Output = Result<bool, RegistryError>> + Send;
    /// Txn If(key exists and lease(key) == lease) Then Put(key, value, lease).
    fn update_subnet(
        &self,
        name: &str,
        value: &str,
        lease: i64,
    ) -> impl Future<Output = Result<bool, RegistryError>> + Send;
    /// Txn If(mod_revision(key) == mod_revision) Then Delete(key).
    fn delete_subnet(
        &self,
        name: &str,
        mod_revision: i64,
    ) -> impl Future<Output = Result<bool, RegistryError>> + Send;
    /// Watch from `from_revision`: the whole subnets directory, or one key.
    fn watch_subnets(
        &self,
        from_revision: i64,
        name: Option<&str>,
    ) -> impl Future<Output = Result<Self::Watch, RegistryError>> + Send;
}

/// Exponential backoff for reconnects: 100 ms doubling to 5 s.
pub(crate) struct Backoff(Duration);

impl Backoff {
    const MIN: Duration = Duration::from_millis(100);
    const MAX: Duration = Duration::from_secs(5);

    pub(crate) fn new() -> Self {
        Backoff(Self::MIN)
    }

    pub(crate) fn reset(&mut self) {
        self.0 = Self::MIN;
    }

    pub(crate) async fn wait(&mut self) {
        tokio::time::sleep(self.0).await;
        self.0 = (self.0 * 2).min(Self::MAX);
    }
}

/// Acquire our subnet: reuse the lease carrying our public IP or VTEP MAC, else `previous`
/// (from the old subnet file) if free, else random among the first 100 free. Claims with a
/// create-if-absent transaction and retries on a lost race. Never returns a subnet another node
/// holds.
///
/// On a network with IPv6, when `attrs` has a v6 side, an IPv6 subnet is chosen the same way
/// and both are claimed in one key (`<v4>&<v6>`, one transaction). On an IPv6-only network the
/// key is flannel's `0.0.0.0-0&<v6>`, and the lease's IPv6 side is the one that finds ours. Two nodes can create
/// different keys for one subnet at once; the older key keeps it (as every node's peer view
/// judges), so the younger one is deleted and its node picks again.
pub async fn acquire<R: SubnetRegistry>(
    reg: &R,
    cfg: &NetworkConfig,
    attrs: &LeaseAttrs,
    previous: impl Into<Previous>,
    ttl: Duration,
) -> Result<OwnLease, RegistryError> {
    let previous = previous.into();
    acquire_inner(reg, cfg, attrs, previous, ttl)
        .await
        .map(|(lease, _)| lease)
}

/// `acquire`, also returning the etcd lease id the key is attached to (0: a reservation).
async fn acquire_inner<R: SubnetRegistry>(
    reg: &R,
    cfg: &NetworkConfig,
    attrs: &LeaseAttrs,
    previous: Previous,
    ttl: Duration,
) -> Result<(OwnLease, i64), RegistryError> {
    let mut granted = None;
    let res = claim(reg, cfg, attrs, previous, ttl, &mut granted).await;
    if let (Err(_), Some(id)) = (&res, granted) {
        // Best effort: an unused lease would expire by itself anyway.
        let _ = reg.revoke_lease(id).await;
    }
    res
}

async fn claim<R: SubnetRegistry>(
    reg: &R,
    cfg: &NetworkConfig,
    attrs: &LeaseAttrs,
    previous: Previous,
    ttl: Duration,
    granted: &mut Option<i64>,
) -> Result<(OwnLease, i64), RegistryError> {
    // The ranges we claim in: IPv4 when the network has it, IPv6 when we serve IPv6 too. The
    // first of the two is the key's primary part: it decides which keys are ours to reuse.
    let range4 = cfg.ipv4.as_ref();
    let v6 = cfg.ipv6.as_ref().filter(|_| attrs.v6.is_some());
    if range4.is_none() && v6.is_none() {
        return Err(RegistryError::NoFamily);
    }
    let value = attrs.to_json();
    let endpoint = attrs.primary().map(|s| s.public_ip);
    let own = |subnet, subnet6| OwnLease {
        subnet,
        subnet6,
        attrs: attrs.clone(),
    };
    'attempt: loop {
        let (kvs, _) = reg.list_subnets().await?;
        let mut taken = Taken::default();
        let mut mine = Vec::new();
        for kv in kvs {
            let (net4, net6) = key_parts(&kv.name);
            let mut primary = false;
            if let (Some(r), Some(n6)) = (v6, net6) {
                if occupies(r, n6, &kv) {
                    taken.v6.hold(n6);
                    primary = range4.is_none();
                }
            }
            if let (Some(r), Some(net)) = (range4, net4) {
                if occupies(r, net, &kv) {
                    taken.v4.hold(net);
                    if net.prefix_len() != r.subnet_len {
                        taken.odd.push((net, kv.name.clone()));
                    }
                    primary = true;
                }
            }
            if !primary {
                continue;
            }
            let same_ip = endpoint_of(&kv.value).is_some_and(|ip| Some(ip) == endpoint);
            let same_mac = attrs.vtep_mac().is_some() && vtep_mac_of(&kv.value) == attrs.vtep_mac();
            if same_ip || same_mac {
                mine.push((net4, net6, kv, same_ip, same_mac));
            }
        }
        // Both matching first, then our MAC (our address changed), then our address (a node
        // moving from flanneld, whose MAC was not ours).
        mine.sort_by_key(|(_, _, _, ip, mac)| (!(*ip && *mac), !*mac));

        // 1. Our own lease from before (same public IP or VTEP MAC): keep it if it still fits.
        let mut reuse = None;
        let mut preferred = previous;
        // Our keys for the subnets we keep, in another form: deleted only once the new key
        // exists, so peers never see the subnet go (the old key speaks for it until then, and
        // the new one, with the same primary side, after).
        let mut replaced: Vec<SubnetKv> = Vec::new();
        for (net4, net6, kv, _, same_mac) in mine {
            // Our parts of the key: each family we claim must have one inside its range.
            let part4 = range4.and_then(|r| net4.filter(|n| r.fits(*n)));
            let part6 = v6.and_then(|r| net6.filter(|n| r.fits(*n)));
            let fits = match range4 {
                Some(_) => part4.is_some(),
                None => part6.is_some(),
            };
            // The key we hold: plain on an IPv4-only network (or while we serve no IPv6),
            // `<v4>&<v6>` on a dual-stack one, `0.0.0.0-0&<v6>` on an IPv6-only one.
            let wanted = (range4.is_none() || part4.is_some())
                && (v6.is_none() || part6.is_some())
                && kv.name == dual_subnet_key(part4, part6);
            if fits && reuse.is_none() && wanted {
                reuse = Some((part4, part6, kv));
            } else if fits && !wanted {
                // A key of another form (`...&fc00::-64` while we serve IPv4 only, a plain or
                // out-of-range one when we serve IPv6): replaced for the same subnets.
                taken.release(net4, net6);
                // Still ours: beats the subnet file.
                if part4.is_some() {
                    preferred.v4 = part4;
                }
                if part6.is_some() {
                    preferred.v6 = part6;
                }
                replaced.push(kv);
            } else if !fits || same_mac {
                // Outside the config, or a second lease with our MAC (an older one of ours:
                // peers cannot reach one MAC at two addresses).
                let why = if !fits {
                    "outside the network config"
                } else {
                    "a second lease with our VTEP MAC"
                };
                tracing::info!(key = %crate::excerpt::echo(&kv.name), "deleting our old lease: {why}");
                if !reg.delete_subnet(&kv.name, kv.mod_revision).await? {
                    continue 'attempt;
                }
                taken.release(net4, net6);
            }
        }
        if let Some((net4, net6, kv)) = reuse {
            // A reservation (no lease) stays one; otherwise move the key onto our new lease.
            let lease = if kv.lease == 0 {
                0
            } else {
                lease_id(reg, ttl, granted).await?
            };
            if reg
                .replace_subnet(&kv.name, &value, lease, kv.mod_revision)
                .await?
            {
                let key = crate::excerpt::echo(&kv.name);
                match endpoint_of(&kv.value) {
                    Some(ip) if Some(ip) != endpoint => {
                        tracing::warn!(%key, old_ip = %ip,
                        "reusing the lease with our VTEP MAC: this node's address changed (if another \
                         node runs with the same MAC, its state dir was copied from this one: remove \
                         its vtep-mac file and restart it)")
                    }
                    _ => tracing::info!(%key, "reusing our lease (same public IP)"),
                }
                delete_replaced(reg, &replaced).await;
                return Ok((own(net4, net6), lease));
            }
            continue 'attempt;
        }

        // 2. The subnets from the previous subnet file, if still free and valid. 3. Random.
        let candidate = match range4 {
            None => None,
            Some(r) => Some(match preferred.v4 {
                Some(p) if r.fits(p) && is_free(p, &taken.v4.set) => p,
                _ => r.choose_free(&taken.v4.set).map_err(|e| {
                    e.with_subnets_dir(&reg.subnets_dir())
                        .with_blocking(blocking_keys(r, &taken.odd))
                })?,
            }),
        };
        let candidate6 = match v6 {
            None => None,
            Some(r) => Some(match preferred.v6 {
                Some(p) if r.fits(p) && is_free(p, &taken.v6.set) => p,
                _ => r
                    .choose_free(&taken.v6.set)
                    .map_err(|e| e.with_subnets_dir(&reg.subnets_dir()))?,
            }),
        };
        let key = dual_subnet_key(candidate, candidate6);
        let lease = lease_id(reg, ttl, granted).await?;
        if reg.create_subnet(&key, &value, lease).await? {
            if lost_race(reg, &key, &replaced).await? {
                tracing::debug!(key, "an older key claims one of our subnets; picking again");
                continue 'attempt;
            }
            tracing::info!(subnet = ?candidate, subnet6 = ?candidate6, "acquired subnet lease");
            delete_replaced(reg, &replaced).await;
            return Ok((own(candidate, candidate6), lease));
        }
        tracing::debug!(key, "lost the race for a subnet; picking again");
    }
}

/// A key's subnets: the IPv4 part (none for `0.0.0.0-0`, an IPv6-only key's) and the IPv6
/// part, each read leniently (`subnet_key_v4_part`).
fn key_parts(key: &str) -> (Option<Ipv4Net>, Option<Ipv6Net>) {
    let v4 = subnet_key_v4_part(key).filter(|n| *n != Ipv4Net::default());
    (v4, subnet_key_v6_part(key))
}

/// The subnets the keys in etcd name, per family.
#[derive(Default)]
struct Taken {
    v4: Holders<Ipv4Net>,
    v6: Holders<Ipv6Net>,
    /// Keys of another length that count as taken, to name them when they block the range.
    odd: Vec<(Ipv4Net, String)>,
}

impl Taken {
    /// One key of ours naming these subnets is given up.
    fn release(&mut self, net4: Option<Ipv4Net>, net6: Option<Ipv6Net>) {
        if let Some(n4) = net4 {
            if self.v4.release(n4) {
                self.odd.retain(|(n, _)| *n != n4);
            }
        }
        if let Some(n6) = net6 {
            self.v6.release(n6);
        }
    }
}

/// The taken subnets of one family, and how many keys name each: giving up one of ours frees
/// a subnet only if no other key names it too (another node's, in a conflict that predates us).
struct Holders<N> {
    set: HashSet<N>,
    count: HashMap<N, u32>,
}

impl<N> Default for Holders<N> {
    fn default() -> Self {
        Holders {
            set: HashSet::new(),
            count: HashMap::new(),
        }
    }
}

impl<N: std::hash::Hash + Eq + Copy> Holders<N> {
    fn hold(&mut self, net: N) {
        self.set.insert(net);
        *self.count.entry(net).or_default() += 1;
    }

    /// One key naming `net` is given up. Returns whether `net` is free now.
    fn release(&mut self, net: N) -> bool {
        let left = self.count.get_mut(&net).map_or(0, |n| {
            *n = n.saturating_sub(1);
            *n
        });
        if left == 0 {
            self.set.remove(&net);
        }
        left == 0
    }
}

/// Our keys of the other form, once their successor exists. Best effort: our new key stands
/// either way (an error here must not cost it), and one left behind is ours to delete at the
/// next start; one changed meanwhile (another node's now) is left alone.
async fn delete_replaced<R: SubnetRegistry>(reg: &R, replaced: &[SubnetKv]) {
    for kv in replaced {
        let key = crate::excerpt::echo(&kv.name);
        match reg.delete_subnet(&kv.name, kv.mod_revision).await {
            Ok(true) => tracing::info!(%key, "deleted our old lease of the other form"),
            Ok(false) => {
                tracing::warn!(%key, "our old lease changed before it could be deleted; left alone")
            }
            Err(e) => {
                tracing::warn!(%key, error = %e, "deleting our old lease of the other form failed; it is retried at the next start")
            }
        }
    }
}

/// After creating `key`: whether it lost a race with a key created between our list and our
/// create that names one of its subnets (their names differ, so create-if-absent could not see
/// it). If so ours is deleted and we pick again. Every creator checks, and the younger key
/// always sees the older one (it was created first), so of two such keys at most one stays:
/// the older wins. A dual key also gives way to a plain key for its IPv4 subnet whatever their
/// age, as every peer prefers the plain one (it may be a flanneld's, which never checks; one
/// created after our check is not seen); when both creators see each other both give way and
/// pick again, which is a retry, never a shared subnet. Our own keys that `key` replaces
/// (`replaced`, the same name and creation) do not count.
async fn lost_race<R: SubnetRegistry>(
    reg: &R,
    key: &str,
    replaced: &[SubnetKv],
) -> Result<bool, RegistryError> {
    let (kvs, _) = reg.list_subnets().await?;
    let Some(ours) = kvs.iter().find(|kv| kv.name == key) else {
        return Ok(true); // gone already (deleted, or expired): pick again
    };
    let (v4, v6) = key_parts(key);
    let plain = |name: &str| !name.contains('&');
    let older = |kv: &SubnetKv| (kv.create_revision, &kv.name) < (ours.create_revision, &ours.name);
    let beaten = kvs.iter().any(|kv| {
        kv.name != key
            && !replaced
                .iter()
                .any(|r| r.name == kv.name && r.create_revision == kv.create_revision)
            && ((v4.is_some()
                && key_parts(&kv.name).0 == v4
                && (older(kv) || (plain(&kv.name) && !plain(key))))
                || (v6.is_some() && subnet_key_v6_part(&kv.name) == v6 && older(kv)))
    });
    if beaten {
        reg.delete_subnet(key, ours.mod_revision).await?;
    }
    Ok(beaten)
}

/// Whether a key keeps its subnet (of `range`'s family) from being handed out. A key of the
/// configured length does, whatever its value (a node's lease being rewritten is still that
/// node's). A key of another length (a leftover from an older SubnetLen) covers a whole range,
/// so it counts only when it is a lease at all and lies inside the network: one stray
/// `10.244.0.0-16` must not block every allocation.
fn occupies<N: Cidr>(range: &SubnetRange<N>, net: N, kv: &SubnetKv) -> bool {
    net.prefix() == range.subnet_len
        || (range.network.contains_net(net) && LeaseAttrs::from_json(&kv.value).is_ok())
}

/// The keys of another length that overlap SubnetMin..SubnetMax (a few, for the message).
fn blocking_keys<N: Cidr>(range: &SubnetRange<N>, odd: &[(N, String)]) -> Vec<String> {
    let last = N::from_bits(N::addr_bits(range.subnet_max), range.subnet_len)
        .map_or(N::addr_bits(range.subnet_max), |n| n.end());
    let first = N::addr_bits(range.subnet_min);
    odd.iter()
        .filter(|(net, _)| net.start() <= last && net.end() >= first)
        .map(|(_, k)| k.clone())
        .take(5)
        .collect()
}

async fn lease_id<R: SubnetRegistry>(
    reg: &R,
    ttl: Duration,
    granted: &mut Option<i64>,
) -> Result<i64, RegistryError> {
    if let Some(id) = *granted {
        return Ok(id);
    }
    let id = reg.grant_lease(ttl).await?;
    *granted = Some(id);
    Ok(id)
}

/// How often to renew: a third of the TTL (so two renewals may fail before expiry), at most
/// every minute is plenty for long TTLs, and never busier than twice a second.
fn renew_interval(ttl: Duration) -> Duration {
    (ttl / 3).clamp(Duration::from_millis(500), Duration::from_secs(60))
}

enum Interrupt {
    /// Our key or etcd lease is gone or taken over: acquire again.
    Lost(String),
    /// etcd trouble or a broken watch: back off and look again.
    Retry(String),
}

impl From<RegistryError> for Interrupt {
    fn from(e: RegistryError) -> Self {
        Interrupt::Retry(e.to_string())
    }
}

/// Our lease as keep_lease tracks it.
struct Held {
    lease: OwnLease,
    name: String,
    /// etcd lease id, 0 for a reservation; None until read back from etcd.
    id: Option<i64>,
}

/// Runs forever (abort the task to stop it): renews our etcd lease well before expiry (same
/// lease id), and if our key is deleted or expires, re-acquires (same subnet if still free) and
/// publishes the new lease on `out`. `attrs` lets the daemon change the advertised value
/// (public IP change). Never gives up while etcd is away; backs off instead.
pub async fn keep_lease<R: SubnetRegistry>(
    reg: R,
    cfg: NetworkConfig,
    lease: OwnLease,
    ttl: Duration,
    mut attrs: watch::Receiver<LeaseAttrs>,
    out: watch::Sender<OwnLease>,
    metrics: Arc<Metrics>,
) {
    let mut held = Held {
        name: lease.key(),
        lease,
        id: None,
    };
    let mut backoff = Backoff::new();
    // Losses in quick succession mean another live node claims our lease (same public IP or a
    // copied state dir): re-acquiring at once would make the two trade it at etcd's pace.
    let mut last_lost: Option<std::time::Instant> = None;
    let mut lost_backoff = Backoff::new();
    let mut attrs_open = true;
    loop {
        let Err(interrupt) = hold(
            &reg,
            ttl,
            &mut held,
            &mut attrs,
            &mut attrs_open,
            &out,
            &metrics,
            &mut backoff,
        )
        .await;
        let why = match interrupt {
            Interrupt::Retry(why) => {
                tracing::warn!(key = %held.name, "lease keeper: {why}; retrying");
                Metrics::inc(&metrics.etcd_reconnects);
                backoff.wait().await;
                continue;
            }
            Interrupt::Lost(why) => why,
        };
        tracing::warn!(key = %held.name, "lost our subnet lease: {why}; acquiring again");
        if last_lost.is_some_and(|t| t.elapsed() < Duration::from_secs(60)) {
            tracing::error!(key = %held.name,
                "our lease was lost again within a minute: does another node run with our public \
                 IP or a copy of our state dir?");
            lost_backoff.wait().await;
        } else {
            lost_backoff.reset();
        }
        last_lost = Some(std::time::Instant::now());
        let want = attrs.borrow().clone();
        loop {
            let previous = Previous {
                v4: held.lease.subnet,
                v6: held.lease.subnet6,
            };
            match acquire_inner(&reg, &cfg, &want, previous, ttl).await {
                Ok((lease, id)) => {
                    if let Some(old) = held.id.filter(|&old| old != 0 && old != id) {
                        let _ = reg.revoke_lease(old).await;
                    }
                    tracing::info!(key = %lease.key(), "re-acquired subnet lease");
                    Metrics::inc(&metrics.lease_reacquisitions);
                    held = Held {
                        name: lease.key(),
                        lease,
                        id: Some(id),
                    };
                    out.send_if_modified(|cur| {
                        let changed = *cur != held.lease;
                        *cur = held.lease.clone();
                        changed
                    });
                    backoff.reset();
                    break;
                }
                Err(e) => {
                    tracing::error!("re-acquiring a subnet lease failed: {e}");
                    if matches!(e, RegistryError::Etcd(_)) {
                        Metrics::inc(&metrics.etcd_reconnects);
                    }
                    backoff.wait().await;
                }
            }
        }
    }
}

/// Hold the lease until something interrupts: check our key, renew, publish attribute changes,
/// and watch our key for deletion or takeover.
#[allow(clippy::too_many_arguments)]
async fn hold<R: SubnetRegistry>(
    reg: &R,
    ttl: Duration,
    held: &mut Held,
    attrs: &mut watch::Receiver<LeaseAttrs>,
    attrs_open: &mut bool,
    out: &watch::Sender<OwnLease>,
    metrics: &Metrics,
    backoff: &mut Backoff,
) -> Result<std::convert::Infallible, Interrupt> {
    let (kv, rev) = reg.get_subnet(&held.name).await?;
    let Some(kv) = kv else {
        return Err(Interrupt::Lost("our key is gone".into()));
    };
    let ours = match held.id {
        Some(id) => kv.lease == id,
        None => endpoint_of(&kv.value)
            .is_some_and(|ip| Some(ip) == held.lease.attrs.primary().map(|s| s.public_ip)),
    };
    if !ours {
        return Err(Interrupt::Lost(
            "our key now belongs to another node".into(),
        ));
    }
    let id = kv.lease;
    held.id = Some(id);
    // Renew at once: after an outage this tells whether the lease survived it.
    renew(reg, id, metrics).await?;
    let want = attrs.borrow_and_update().clone();
    if want != held.lease.attrs || LeaseAttrs::from_json(&kv.value).ok().as_ref() != Some(&want) {
        publish(reg, held, want, out).await?;
    }

    let mut w = reg.watch_subnets(rev + 1, Some(&held.name)).await?;
    backoff.reset();
    let every = renew_interval(ttl);
    let mut next_renew = tokio::time::Instant::now() + every;
    loop {
        tokio::select! {
            _ = tokio::time::sleep_until(next_renew) => {
                renew(reg, id, metrics).await?;
                next_renew = tokio::time::Instant::now() + every;
            }
            msg = w.next() => match msg? {
                WatchMsg::Changes(changes) => {
                    for c in changes {
                        match c {
                            SubnetChange::Delete(_) => {
                                return Err(Interrupt::Lost("our key was deleted".into()))
                            }
                            SubnetChange::Put(kv) if kv.lease != id => {
                                return Err(Interrupt::Lost(
                                    "our key was overwritten by another lease".into(),
                                ))
                            }
                            SubnetChange::Put(_) => {}
                        }
                    }
                }
                WatchMsg::Reset(why) => return Err(Interrupt::Retry(why)),
            },
            r = attrs.changed(), if *attrs_open => match r {
                Err(_) => *attrs_open = false,
                Ok(()) => {
                    let want = attrs.borrow_and_update().clone();
                    if want != held.lease.attrs {
                        publish(reg, held, want, out).await?;
                    }
                }
            },
        }
    }
}

async fn renew<R: SubnetRegistry>(reg: &R, id: i64, metrics: &Metrics) -> Result<(), Interrupt> {
    if id == 0 {
        return Ok(()); // a reservation does not expire
    }
    if !reg.renew_lease(id).await? {
        return Err(Interrupt::Lost(format!("etcd lease {id:x} expired")));
    }
    Metrics::inc(&metrics.lease_renewals);
    Ok(())
}

/// Re-put our value with new attributes, only while the key is still on our lease.
async fn publish<R: SubnetRegistry>(
    reg: &R,
    held: &mut Held,
    want: LeaseAttrs,
    out: &watch::Sender<OwnLease>,
) -> Result<(), Interrupt> {
    let id = held.id.unwrap_or(0);
    if !reg.update_subnet(&held.name, &want.to_json(), id).await? {
        return Err(Interrupt::Lost("our key changed while updating it".into()));
    }
    let public_ip = want.primary().map(|s| s.public_ip);
    tracing::info!(key = %held.name, public_ip = ?public_ip, "updated our lease");
    held.lease.attrs = want;
    out.send_replace(held.lease.clone());
    Ok(())
}
