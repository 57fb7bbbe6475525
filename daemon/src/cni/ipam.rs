//! Pod address allocation, crash-safe and concurrent.
//!
//! On disk: `<state_dir>/ipam/<a.b.c.d-prefix>/<address>` (IPv6: `<fd00:10:244:1::-64>/...`),
//! one file per allocated address,
//! created with O_CREAT|O_EXCL (the file system is the lock) and holding
//! `containerID\nifname\nnetwork\n` (files from before the network line have none).
//! The file exists before the address is handed out, so a kill -9 at any moment
//! can leak an address (GC reclaims it) but never hand it out twice after a restart.
//! In memory: an index rebuilt from disk at start. Its mutex covers only in-memory work, never
//! file I/O: a slow or hung disk stalls only the requests that touch it, not every other pod's.
//! Subnet directories that overlap (the node's subnet changed with SubnetLen or Network) are one
//! address space: an address held in any of them is taken in all.

use std::collections::{HashMap, HashSet};
use std::fs::{self, OpenOptions};
use std::io::{ErrorKind, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use ipnet::IpNet;

use super::hostlocal::HostLocal;

/// Who holds an address: allocations are keyed by containerID + ifname.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Owner {
    pub container_id: String,
    pub ifname: String,
}

/// An allocation: who holds it, and for which CNI network (the config's `name`; GC is scoped to
/// it). Empty for files written before the network was recorded: any network's GC may take them.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Holder {
    pub owner: Owner,
    pub network: String,
}

impl Holder {
    /// Whether a GC of CNI network `network` may release this allocation.
    pub fn in_gc_of(&self, network: &str) -> bool {
        self.network.is_empty() || self.network == network
    }
}

impl Owner {
    pub fn new(container_id: impl Into<String>, ifname: impl Into<String>) -> Self {
        Owner {
            container_id: container_id.into(),
            ifname: ifname.into(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum IpamError {
    #[error("subnet {subnet} is full: all {count} pod addresses are allocated")]
    Full { subnet: IpNet, count: usize },
    #[error("subnet {0} has no addresses for pods (prefix too long)")]
    TooSmall(IpNet),
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
}

fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> IpamError {
    let context = context.into();
    move |source| IpamError::Io { context, source }
}

#[derive(Debug)]
struct SubnetIndex {
    dir: PathBuf,
    used: HashMap<IpAddr, Slot>,
    /// Last address handed out: picking continues after it, so a just-freed address is not
    /// reused at once (stale ARP entries, late packets).
    last: u128,
}

/// An allocated address: its holder, and when it was last handed to them (`Ipam::gen`; 0:
/// loaded from disk or adopted).
#[derive(Debug)]
struct Slot {
    holder: Holder,
    gen: u64,
    /// GC is removing its file (outside the lock): still taken, but no longer anyone's.
    releasing: bool,
}

impl Slot {
    fn new(holder: Holder, gen: u64) -> Self {
        Slot {
            holder,
            gen,
            releasing: false,
        }
    }

    fn held_by(&self, owner: &Owner) -> bool {
        !self.releasing && self.holder.owner == *owner
    }
}

/// An allocation as GC saw it. GC releases it only if it is unchanged when GC gets to it:
/// same holder and not handed out again since (an ADD for that attachment re-ran, or a DEL and
/// a new ADD reused the address).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Claim {
    pub net: IpNet,
    pub addr: IpAddr,
    pub owner: Owner,
    gen: u64,
}

#[derive(Debug)]
pub struct Ipam {
    root: PathBuf,
    index: Mutex<HashMap<IpNet, SubnetIndex>>,
    gen: AtomicU64,
    /// Addresses host-local handed out before the node moved to twill: never handed out here.
    host_local: HostLocal,
}

pub fn subnet_key(net: &IpNet) -> String {
    format!("{}-{}", net.network(), net.prefix_len())
}

fn parse_subnet_key(s: &str) -> Option<IpNet> {
    // An IPv6 address holds no '-': the last one splits.
    let (a, p) = s.rsplit_once('-')?;
    let net = IpNet::new(a.parse().ok()?, p.parse().ok()?).ok()?;
    (net.network() == net.addr()).then_some(net)
}

fn overlaps(a: &IpNet, b: &IpNet) -> bool {
    a.contains(&b.network()) || b.contains(&a.network())
}

fn bits(a: IpAddr) -> u128 {
    match a {
        IpAddr::V4(a) => u32::from(a).into(),
        IpAddr::V6(a) => a.into(),
    }
}

/// The address of `net`'s family with these bits.
fn addr_of(net: &IpNet, v: u128) -> IpAddr {
    match net {
        IpNet::V4(_) => IpAddr::V4(Ipv4Addr::from(v as u32)),
        IpNet::V6(_) => IpAddr::V6(Ipv6Addr::from(v)),
    }
}

/// Pods get network+2 ..= broadcast-1 (network+1 is the gateway on the bridge); IPv6 does
/// not reserve the last address, but one address less in a /64 costs nothing and keeps one
/// rule for both.
fn pod_range(net: &IpNet) -> Option<(u128, u128)> {
    let first = bits(net.network()).checked_add(2)?;
    let last = bits(net.broadcast()).checked_sub(1)?;
    (net.prefix_len() <= net.max_prefix_len() - 2 && first <= last).then_some((first, last))
}

/// The contents of a regular file; nothing for anything else. Opened without blocking and
/// without following links, so a FIFO or a link planted in the state dir cannot hang or redirect
/// an allocation.
pub(crate) fn read_regular(path: &Path) -> String {
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;
    let mut text = String::new();
    if let Ok(mut f) = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOFOLLOW)
        .open(path)
    {
        if f.metadata().is_ok_and(|m| m.is_file()) {
            let _ = f.read_to_string(&mut text);
        }
    }
    text
}

fn read_holder(path: &Path) -> Holder {
    // An empty or unreadable file (crash between create and write) still holds its address;
    // it has no valid owner and no network, so any GC reclaims it.
    let text = read_regular(path);
    let mut lines = text.lines().map(str::trim);
    let mut next = || lines.next().unwrap_or("").to_string();
    let owner = Owner::new(next(), next());
    Holder {
        owner,
        network: next(),
    }
}

impl Ipam {
    /// Opens (creating) `<state_dir>/ipam` and loads every subnet's allocations.
    pub fn open(state_dir: &Path) -> Result<Self, IpamError> {
        let root = state_dir.join("ipam");
        fs::create_dir_all(&root).map_err(io(format!("creating {}", root.display())))?;
        let mut index = HashMap::new();
        for entry in fs::read_dir(&root).map_err(io(format!("reading {}", root.display())))? {
            let entry = entry.map_err(io(format!("reading {}", root.display())))?;
            let Some(net) = entry.file_name().to_str().and_then(parse_subnet_key) else {
                continue;
            };
            let dir = entry.path();
            let mut used = HashMap::new();
            for f in fs::read_dir(&dir).map_err(io(format!("reading {}", dir.display())))? {
                let f = f.map_err(io(format!("reading {}", dir.display())))?;
                let Some(addr) = f.file_name().to_str().and_then(|s| s.parse().ok()) else {
                    continue;
                };
                if net.contains(&addr) {
                    used.insert(addr, Slot::new(read_holder(&f.path()), 0));
                }
            }
            index.insert(net, SubnetIndex { dir, used, last: 0 });
        }
        Ok(Ipam {
            root,
            index: Mutex::new(index),
            gen: AtomicU64::new(1),
            host_local: HostLocal::default(),
        })
    }

    /// Also avoid the addresses host-local holds in `host_local`'s store.
    pub fn with_host_local(mut self, host_local: HostLocal) -> Self {
        self.host_local = host_local;
        self
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<IpNet, SubnetIndex>> {
        // A panic while holding the lock leaves the index consistent (single inserts/removes).
        self.index.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The address `owner` holds in `net`, if any.
    pub fn lookup(&self, net: IpNet, owner: &Owner) -> Option<IpAddr> {
        let idx = self.lock();
        idx.get(&net)?
            .used
            .iter()
            .find(|(_, x)| x.held_by(owner))
            .map(|(a, _)| *a)
    }

    /// An address of `net` for `owner` on CNI network `network`, persisted before it returns.
    /// Returns the address and whether it is new (false: `owner` already held it).
    pub fn allocate(
        &self,
        net: IpNet,
        owner: &Owner,
        network: &str,
    ) -> Result<(IpAddr, bool), IpamError> {
        let net = net.trunc();
        let (first, last) = pod_range(&net).ok_or(IpamError::TooSmall(net))?;
        let dir = self.root.join(subnet_key(&net));
        fs::create_dir_all(&dir).map_err(io(format!("creating {}", dir.display())))?;
        // Read before the lock: the lock is never held across file I/O.
        let host_local: HashSet<IpAddr> = self.host_local.held_in(net);
        loop {
            let (addr, dir) = {
                let mut idx = self.lock();
                let gen = self.gen.fetch_add(1, Ordering::SeqCst);
                if let Some(s) = idx.get_mut(&net) {
                    if let Some((a, x)) = s.used.iter_mut().find(|(_, x)| x.held_by(owner)) {
                        x.gen = gen;
                        return Ok((*a, false));
                    }
                }
                // Pods of an earlier, overlapping subnet of this node may still run on the
                // bridge: their addresses are as taken as our own.
                let elsewhere: HashSet<IpAddr> = idx
                    .iter()
                    .filter(|(n, _)| **n != net && overlaps(n, &net))
                    .flat_map(|(_, s)| s.used.keys().copied())
                    .collect();
                let s = idx.entry(net).or_insert_with(|| SubnetIndex {
                    dir: dir.clone(),
                    used: HashMap::new(),
                    last: 0,
                });
                let size = last - first + 1;
                let start = if s.last >= first && s.last < last {
                    s.last + 1
                } else {
                    first
                };
                // Lazy: in a /64 the scan stops at the first free address, a few past the used
                // ones at most.
                let pick = (0..size)
                    .map(|i| first + (start - first + i) % size)
                    .map(|v| addr_of(&net, v))
                    .find(|a| {
                        !s.used.contains_key(a) && !elsewhere.contains(a) && !host_local.contains(a)
                    });
                let Some(addr) = pick else {
                    return Err(IpamError::Full {
                        subnet: net,
                        count: s.used.len() + elsewhere.iter().filter(|a| net.contains(*a)).count(),
                    });
                };
                // Reserved in memory now; the file below makes it real.
                let holder = Holder {
                    owner: owner.clone(),
                    network: network.to_string(),
                };
                s.used.insert(addr, Slot::new(holder, gen));
                s.last = bits(addr);
                (addr, s.dir.clone())
            };
            let path = dir.join(addr.to_string());
            match OpenOptions::new().write(true).create_new(true).open(&path) {
                Ok(mut f) => {
                    // No fsync: the file is in the page cache the moment create_new returns, and
                    // that survives any crash of twilld (kill -9 included). Only a machine crash
                    // loses it, and that takes every pod's netns with it; a file that survives
                    // one is an ordinary leak that GC reclaims. fsync cost ~1.7 ms per ADD.
                    let written = f.write_all(
                        format!("{}\n{}\n{network}\n", owner.container_id, owner.ifname).as_bytes(),
                    );
                    if let Err(e) = written {
                        let _ = fs::remove_file(&path);
                        self.forget(net, addr);
                        return Err(io(format!("writing {}", path.display()))(e));
                    }
                    return Ok((addr, true));
                }
                Err(e) if e.kind() == ErrorKind::AlreadyExists => {
                    // Someone else's file we did not know about: adopt it and pick again.
                    let holder = read_holder(&path);
                    if let Some(s) = self.lock().get_mut(&net) {
                        s.used.insert(addr, Slot::new(holder, 0));
                    }
                }
                Err(e) => {
                    self.forget(net, addr);
                    return Err(io(format!("creating {}", path.display()))(e));
                }
            }
        }
    }

    fn forget(&self, net: IpNet, addr: IpAddr) {
        if let Some(s) = self.lock().get_mut(&net) {
            s.used.remove(&addr);
        }
    }

    fn release_entries(&self, entries: Vec<(IpNet, IpAddr)>) -> Result<Vec<IpAddr>, IpamError> {
        let mut out = Vec::new();
        let mut first_err = None;
        for (net, addr) in entries {
            let path = self.root.join(subnet_key(&net)).join(addr.to_string());
            match fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == ErrorKind::NotFound => {}
                Err(e) => {
                    first_err.get_or_insert(io(format!("removing {}", path.display()))(e));
                    continue;
                }
            }
            // Removed from the index only once the file is gone.
            self.forget(net, addr);
            out.push(addr);
        }
        match first_err {
            Some(e) => Err(e),
            None => Ok(out),
        }
    }

    /// What `owner` holds, in every subnet (also ones the node no longer has).
    fn entries_of(&self, owner: &Owner) -> Vec<(IpNet, IpAddr)> {
        self.lock()
            .iter()
            .flat_map(|(net, s)| {
                s.used
                    .iter()
                    .filter(|(_, x)| x.holder.owner == *owner)
                    .map(move |(a, _)| (*net, *a))
            })
            .collect()
    }

    /// The addresses `owner` holds. From the index alone (no file I/O): callable from async
    /// code without a blocking thread.
    pub fn held(&self, owner: &Owner) -> Vec<IpAddr> {
        self.entries_of(owner).into_iter().map(|(_, a)| a).collect()
    }

    /// Releases everything `owner` holds, in every subnet (also ones the node no longer has).
    pub fn release(&self, owner: &Owner) -> Result<Vec<IpAddr>, IpamError> {
        self.release_entries(self.entries_of(owner))
    }

    /// Releases those of `entries` that `owner` still holds: what one ADD allocated, when it
    /// fails (its other addresses are an earlier ADD's, in use by the pod).
    pub fn release_addrs(
        &self,
        owner: &Owner,
        entries: &[(IpNet, IpAddr)],
    ) -> Result<Vec<IpAddr>, IpamError> {
        let held: Vec<_> = {
            let idx = self.lock();
            entries
                .iter()
                .filter(|(net, a)| {
                    idx.get(net)
                        .and_then(|s| s.used.get(a))
                        .is_some_and(|x| x.held_by(owner))
                })
                .copied()
                .collect()
        };
        self.release_entries(held)
    }

    /// A mark for GC, read before it learns which ADDs are in flight: an allocation made after
    /// it (by an ADD that began after GC looked) is never a candidate.
    pub fn gc_mark(&self) -> u64 {
        self.gen.load(Ordering::SeqCst)
    }

    /// The allocations of CNI network `network` whose owner is not in `valid`, made before
    /// `mark` (`gc_mark`), for GC.
    pub fn gc_candidates(&self, network: &str, valid: &HashSet<Owner>, mark: u64) -> Vec<Claim> {
        let idx = self.lock();
        idx.iter()
            .flat_map(|(net, s)| {
                s.used
                    .iter()
                    .filter(|(_, x)| {
                        !x.releasing
                            && x.gen < mark
                            && x.holder.in_gc_of(network)
                            && !valid.contains(&x.holder.owner)
                    })
                    .map(move |(a, x)| Claim {
                        net: *net,
                        addr: *a,
                        owner: x.holder.owner.clone(),
                        gen: x.gen,
                    })
            })
            .collect()
    }

    fn is_unchanged(idx: &HashMap<IpNet, SubnetIndex>, c: &Claim) -> bool {
        idx.get(&c.net)
            .and_then(|s| s.used.get(&c.addr))
            .is_some_and(|x| x.held_by(&c.owner) && x.gen == c.gen)
    }

    /// Whether `c` still holds as GC saw it.
    pub fn unchanged(&self, c: &Claim) -> bool {
        Self::is_unchanged(&self.lock(), c)
    }

    /// Releases `c` if it is unchanged; false if it changed (then it is left alone). The check
    /// marks the slot under the lock, so nothing can take it over or hand it out while its file
    /// is removed outside the lock; the slot goes once the file is gone.
    pub fn release_claim(&self, c: &Claim) -> Result<bool, IpamError> {
        {
            let mut idx = self.lock();
            if !Self::is_unchanged(&idx, c) {
                return Ok(false);
            }
            if let Some(x) = idx.get_mut(&c.net).and_then(|s| s.used.get_mut(&c.addr)) {
                x.releasing = true;
            }
        }
        let path = self.root.join(subnet_key(&c.net)).join(c.addr.to_string());
        let removed = match fs::remove_file(&path) {
            Err(e) if e.kind() != ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        };
        let mut idx = self.lock();
        let s = idx.get_mut(&c.net);
        match removed {
            Ok(()) => {
                if let Some(s) = s {
                    s.used.remove(&c.addr);
                }
                Ok(true)
            }
            Err(e) => {
                // Still held: the next GC may try again.
                if let Some(x) = s.and_then(|s| s.used.get_mut(&c.addr)) {
                    x.releasing = false;
                }
                Err(io(format!("removing {}", path.display()))(e))
            }
        }
    }

    /// Allocations outside `net` (pods from before the node's subnet changed): they keep their
    /// addresses until DEL or GC, and those stay taken in any overlapping subnet.
    pub fn outside(&self, net: IpNet) -> Vec<(IpNet, IpAddr, Holder)> {
        let mut v = self.allocations();
        // Only the same family's: the other family's allocations are in its own subnet.
        v.retain(|(_, a, _)| a.is_ipv4() == net.addr().is_ipv4() && !net.contains(a));
        v
    }

    /// Every allocation, sorted.
    pub fn allocations(&self) -> Vec<(IpNet, IpAddr, Holder)> {
        let idx = self.lock();
        let mut v: Vec<_> = idx
            .iter()
            .flat_map(|(net, s)| {
                s.used
                    .iter()
                    .map(move |(a, x)| (*net, *a, x.holder.clone()))
            })
            .collect();
        v.sort();
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An ADD that began after GC looked for in-flight ones allocates after GC's mark: never a
    /// candidate of that GC, though the runtime's list did not have it.
    #[test]
    fn gc_leaves_allocations_made_after_its_mark_alone() {
        let d = tmp();
        let n = net("10.244.1.0/24");
        let ipam = Ipam::open(&d).unwrap();
        let (o1, o2) = (Owner::new("c1", "eth0"), Owner::new("c2", "eth0"));
        let (a1, _) = ipam.allocate(n, &o1, "net").unwrap();
        let mark = ipam.gc_mark();
        ipam.allocate(n, &o2, "net").unwrap();
        let claims = ipam.gc_candidates("net", &HashSet::new(), mark);
        assert_eq!(claims.iter().map(|c| c.addr).collect::<Vec<_>>(), [a1]);
        // The next GC's mark covers it.
        let all = ipam.gc_candidates("net", &HashSet::new(), ipam.gc_mark());
        assert_eq!(all.len(), 2);
        // An earlier attachment's ADD run again after the mark: left alone too.
        let mark = ipam.gc_mark();
        ipam.allocate(n, &o1, "net").unwrap();
        let claims = ipam.gc_candidates("net", &HashSet::new(), mark);
        assert_eq!(claims.iter().map(|c| &c.owner).collect::<Vec<_>>(), [&o2]);
        fs::remove_dir_all(d).unwrap();
    }

    /// A failed ADD gives back what it allocated, and nothing of the pod's that an earlier ADD
    /// allocated (in another subnet of the node, e.g. before the subnet grew).
    #[test]
    fn release_addrs_takes_back_only_the_given_addresses_still_held() {
        let d = tmp();
        let (old, new) = (net("10.244.0.0/24"), net("10.244.0.0/23"));
        let ipam = Ipam::open(&d).unwrap();
        let (o1, o2) = (Owner::new("c1", "eth0"), Owner::new("c2", "eth0"));
        let (live, _) = ipam.allocate(old, &o1, "net").unwrap();
        let (added, fresh) = ipam.allocate(new, &o1, "net").unwrap();
        assert!(fresh && added != live);
        let (other, _) = ipam.allocate(new, &o2, "net").unwrap();
        // o2's address is not o1's to give back, whatever the caller says.
        assert_eq!(
            ipam.release_addrs(&o1, &[(new, added), (new, other)])
                .unwrap(),
            [added]
        );
        let held: Vec<_> = ipam.allocations().into_iter().map(|(_, a, _)| a).collect();
        assert!(held.contains(&live) && held.contains(&other) && !held.contains(&added));
        assert!(d.join("ipam/10.244.0.0-24").join(live.to_string()).exists());
        fs::remove_dir_all(d).unwrap();
    }

    /// What DEL reads before it releases (to forget the pod's flows first): the owner's
    /// addresses in every subnet, nobody else's; nothing once released.
    #[test]
    fn held_names_the_owners_addresses_in_every_subnet_and_no_others() {
        let d = tmp();
        let (v4, v6) = (net("10.244.3.0/24"), net("fd00:10:244:3::/64"));
        let ipam = Ipam::open(&d).unwrap();
        let (o1, o2) = (Owner::new("c1", "eth0"), Owner::new("c2", "eth0"));
        let (a4, _) = ipam.allocate(v4, &o1, "net").unwrap();
        let (a6, _) = ipam.allocate(v6, &o1, "net").unwrap();
        let (other, _) = ipam.allocate(v4, &o2, "net").unwrap();
        let mut held = ipam.held(&o1);
        held.sort();
        assert_eq!(held, [a4, a6]);
        assert_eq!(ipam.held(&o2), [other]);
        assert!(ipam.held(&Owner::new("c1", "eth1")).is_empty());
        let mut released = ipam.release(&o1).unwrap();
        released.sort();
        assert_eq!(released, [a4, a6]);
        assert!(ipam.held(&o1).is_empty());
        assert_eq!(ipam.held(&o2), [other]);
        fs::remove_dir_all(d).unwrap();
    }

    /// GC without concurrent operations: every candidate released.
    fn gc(ipam: &Ipam, network: &str, valid: &HashSet<Owner>) -> Vec<IpAddr> {
        let claims = ipam.gc_candidates(network, valid, ipam.gc_mark());
        claims
            .into_iter()
            .filter(|c| ipam.release_claim(c).unwrap())
            .map(|c| c.addr)
            .collect()
    }

    fn tmp() -> PathBuf {
        let d = std::env::temp_dir().join(format!(
            "twill-ipam-{}-{}",
            std::process::id(),
            rand::random::<u32>()
        ));
        fs::create_dir_all(&d).unwrap();
        d
    }

    fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }

    #[test]
    fn allocates_from_dot_two_and_never_gateway_or_broadcast() {
        let d = tmp();
        let ipam = Ipam::open(&d).unwrap();
        let n = net("10.244.1.0/29");
        let mut got = Vec::new();
        for i in 0..5 {
            let (a, fresh) = ipam
                .allocate(n, &Owner::new(format!("c{i}"), "eth0"), "net1")
                .unwrap();
            assert!(fresh);
            got.push(a.to_string());
        }
        assert_eq!(
            got,
            [
                "10.244.1.2",
                "10.244.1.3",
                "10.244.1.4",
                "10.244.1.5",
                "10.244.1.6"
            ]
        );
        let e = ipam
            .allocate(n, &Owner::new("c9", "eth0"), "net1")
            .unwrap_err();
        assert!(matches!(e, IpamError::Full { count: 5, .. }), "{e}");
        assert!(e.to_string().contains("10.244.1.0/29"));
        // Same owner again: same address, not fresh.
        let (a, fresh) = ipam.allocate(n, &Owner::new("c0", "eth0"), "net1").unwrap();
        assert_eq!((a.to_string().as_str(), fresh), ("10.244.1.2", false));
        fs::remove_dir_all(d).unwrap();
    }

    #[test]
    fn persists_and_reloads_and_releases() {
        let d = tmp();
        let n = net("10.244.1.0/24");
        let a = {
            let ipam = Ipam::open(&d).unwrap();
            ipam.allocate(n, &Owner::new("c1", "eth0"), "net1")
                .unwrap()
                .0
        };
        let file = d.join("ipam/10.244.1.0-24").join(a.to_string());
        assert_eq!(fs::read_to_string(&file).unwrap(), "c1\neth0\nnet1\n");
        let ipam = Ipam::open(&d).unwrap();
        assert_eq!(ipam.lookup(n, &Owner::new("c1", "eth0")), Some(a));
        // A fresh owner never gets the persisted address.
        let (b, _) = ipam.allocate(n, &Owner::new("c2", "eth0"), "net1").unwrap();
        assert_ne!(a, b);
        assert_eq!(ipam.release(&Owner::new("c1", "eth0")).unwrap(), vec![a]);
        assert!(!file.exists());
        assert!(ipam.release(&Owner::new("c1", "eth0")).unwrap().is_empty());
        fs::remove_dir_all(d).unwrap();
    }

    #[test]
    fn adopts_unknown_files_and_gc_keeps_valid_only() {
        let d = tmp();
        let n = net("10.244.1.0/24");
        let ipam = Ipam::open(&d).unwrap();
        // A file the index does not know (e.g. written by an earlier process after load).
        fs::create_dir_all(d.join("ipam/10.244.1.0-24")).unwrap();
        fs::write(d.join("ipam/10.244.1.0-24/10.244.1.2"), "").unwrap();
        let (a, _) = ipam.allocate(n, &Owner::new("c1", "eth0"), "net1").unwrap();
        assert_ne!(a.to_string(), "10.244.1.2");
        let (b, _) = ipam.allocate(n, &Owner::new("c2", "eth0"), "net1").unwrap();
        // Old subnet's allocation: ignored for ADD, released by GC.
        let old = net("10.244.9.0/24");
        ipam.allocate(old, &Owner::new("c3", "eth0"), "net1")
            .unwrap();
        let valid: HashSet<_> = [Owner::new("c1", "eth0")].into_iter().collect();
        let mut freed = gc(&ipam, "net1", &valid);
        freed.sort();
        assert_eq!(freed.len(), 3, "{freed:?}");
        assert!(freed.contains(&b));
        let left = ipam.allocations();
        assert_eq!(left.len(), 1);
        assert_eq!(left[0].1, a);
        fs::remove_dir_all(d).unwrap();
    }

    #[test]
    fn gc_is_scoped_to_its_network() {
        let d = tmp();
        let n = net("10.244.1.0/24");
        let ipam = Ipam::open(&d).unwrap();
        let (a, _) = ipam.allocate(n, &Owner::new("c1", "eth0"), "net1").unwrap();
        let (b, _) = ipam.allocate(n, &Owner::new("c2", "eth1"), "net2").unwrap();
        // A file from before the network line: no network, so any network's GC may take it.
        fs::write(d.join("ipam/10.244.1.0-24/10.244.1.200"), "c3\neth0\n").unwrap();
        let ipam = Ipam::open(&d).unwrap();
        assert_eq!(
            fs::read_to_string(d.join(format!("ipam/10.244.1.0-24/{b}"))).unwrap(),
            "c2\neth1\nnet2\n"
        );
        // net1's GC with an empty list: its own and the legacy one go, net2's stays.
        let mut freed = gc(&ipam, "net1", &HashSet::new());
        freed.sort();
        assert_eq!(freed, vec![a, "10.244.1.200".parse().unwrap()]);
        let left = ipam.allocations();
        assert_eq!(left.len(), 1);
        assert_eq!((left[0].1, left[0].2.network.as_str()), (b, "net2"));
        assert_eq!(gc(&ipam, "net2", &HashSet::new()), vec![b]);
        fs::remove_dir_all(d).unwrap();
    }

    #[test]
    fn gc_releases_only_what_is_unchanged_since_it_looked() {
        let d = tmp();
        let n = net("10.244.1.0/24");
        let ipam = Ipam::open(&d).unwrap();
        let (o1, o2, o3) = (
            Owner::new("c1", "eth0"),
            Owner::new("c2", "eth0"),
            Owner::new("c3", "eth0"),
        );
        let (a1, _) = ipam.allocate(n, &o1, "net").unwrap();
        let (a2, _) = ipam.allocate(n, &o2, "net").unwrap();
        let (a3, _) = ipam.allocate(n, &o3, "net").unwrap();
        let claims = ipam.gc_candidates("net", &HashSet::new(), ipam.gc_mark());
        assert_eq!(claims.len(), 3);
        let claim = |o: &Owner| claims.iter().find(|c| c.owner == *o).unwrap().clone();
        // After GC looked: c1's ADD runs again (same address, handed out anew), c2 is deleted
        // and its address goes to a new pod. c3 is left as it was.
        assert_eq!(ipam.allocate(n, &o1, "net").unwrap(), (a1, false));
        ipam.release(&o2).unwrap();
        ipam.lock().get_mut(&n).unwrap().last = bits(a2) - 1;
        let o4 = Owner::new("c4", "eth0");
        assert_eq!(ipam.allocate(n, &o4, "net").unwrap(), (a2, true));
        assert!(!ipam.unchanged(&claim(&o1)));
        assert!(!ipam.release_claim(&claim(&o1)).unwrap());
        assert!(!ipam.release_claim(&claim(&o2)).unwrap());
        assert!(ipam.unchanged(&claim(&o3)));
        assert!(ipam.release_claim(&claim(&o3)).unwrap());
        let left: Vec<_> = ipam
            .allocations()
            .into_iter()
            .map(|(_, a, h)| (a, h.owner))
            .collect();
        assert_eq!(left, vec![(a1, o1), (a2, o4)]);
        assert!(!d.join(format!("ipam/10.244.1.0-24/{a3}")).exists());
        assert!(d.join(format!("ipam/10.244.1.0-24/{a2}")).exists());
        fs::remove_dir_all(d).unwrap();
    }

    #[test]
    fn a_fifo_in_the_state_dir_neither_hangs_nor_is_handed_out() {
        let d = tmp();
        let n = net("10.244.1.0/24");
        let dir = d.join("ipam/10.244.1.0-24");
        fs::create_dir_all(&dir).unwrap();
        let fifo = std::ffi::CString::new(dir.join("10.244.1.2").to_str().unwrap()).unwrap();
        // SAFETY: mkfifo with a valid C string.
        assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o600) }, 0);
        // Twice: found at load, and found by O_EXCL after a fresh open without it in the index.
        for preload in [true, false] {
            let (tx, rx) = std::sync::mpsc::channel();
            let d2 = d.clone();
            std::thread::spawn(move || {
                let ipam = Ipam::open(&d2).unwrap();
                if !preload {
                    ipam.lock().clear();
                }
                let _ = tx.send(ipam.allocate(n, &Owner::new("c1", "eth0"), "net1"));
            });
            let (a, _) = rx
                .recv_timeout(std::time::Duration::from_secs(10))
                .expect("allocation hung on the FIFO")
                .unwrap();
            assert_eq!(a.to_string(), "10.244.1.3");
            fs::remove_file(dir.join("10.244.1.3")).unwrap();
        }
        fs::remove_dir_all(d).unwrap();
    }

    #[test]
    fn parallel_allocations_are_distinct() {
        let d = tmp();
        let n = net("10.244.1.0/24");
        let ipam = std::sync::Arc::new(Ipam::open(&d).unwrap());
        let hs: Vec<_> = (0..16)
            .map(|t| {
                let ipam = ipam.clone();
                std::thread::spawn(move || {
                    (0..15)
                        .map(|i| {
                            ipam.allocate(n, &Owner::new(format!("c{t}-{i}"), "eth0"), "net1")
                                .unwrap()
                                .0
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        let all: Vec<_> = hs.into_iter().flat_map(|h| h.join().unwrap()).collect();
        let set: HashSet<_> = all.iter().collect();
        assert_eq!(set.len(), 240);
        assert_eq!(
            fs::read_dir(d.join("ipam/10.244.1.0-24")).unwrap().count(),
            240
        );
        fs::remove_dir_all(d).unwrap();
    }

    /// Runs `f` on a thread of its own; its answer, or None if it is not back within `wait`.
    fn within<T: Send + 'static>(
        wait: std::time::Duration,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> Option<T> {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(f());
        });
        rx.recv_timeout(wait).ok()
    }

    /// Starts `f` on a thread and returns once that thread is blocked in the kernel (on the
    /// wedged dir); the receiver gets its answer later.
    fn start_blocked<T: Send + 'static>(
        f: impl FnOnce() -> T + Send + 'static,
    ) -> std::sync::mpsc::Receiver<T> {
        use twill_tests::stall::{gettid, thread_state};
        let (tid_tx, tid_rx) = std::sync::mpsc::channel();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = tid_tx.send(gettid());
            let _ = tx.send(f());
        });
        let tid = tid_rx.recv().unwrap();
        twill_tests::wait_until(std::time::Duration::from_secs(10), || {
            thread_state(tid) == Some('D')
        })
        .expect("the operation never reached the hung dir");
        rx
    }

    const PROMPTLY: std::time::Duration = std::time::Duration::from_secs(10);

    /// host-local's store on a hung disk: the allocation reading it waits, but nothing else
    /// does, because it reads before taking the index lock.
    #[test]
    fn a_hung_host_local_dir_holds_up_no_other_ipam_user() {
        let d = tmp();
        let hl = d.join("host-local");
        fs::create_dir_all(hl.join("cbr0")).unwrap();
        let n = net("10.244.1.0/24");
        let ipam = std::sync::Arc::new(
            Ipam::open(&d)
                .unwrap()
                .with_host_local(HostLocal::new(Some(hl.clone()))),
        );
        let (a0, _) = ipam.allocate(n, &Owner::new("c0", "eth0"), "net").unwrap();
        let mut wedge = twill_tests::stall::DirWedge::new(&hl.join("cbr0")).unwrap();
        let i = ipam.clone();
        let stuck = start_blocked(move || i.allocate(n, &Owner::new("c1", "eth0"), "net"));
        let i = ipam.clone();
        let others = within(PROMPTLY, move || {
            let all = i.allocations();
            let gc = i.gc_candidates("net", &HashSet::new(), i.gc_mark());
            let released = i.release(&Owner::new("c0", "eth0")).unwrap();
            (all.len(), gc.len(), released)
        })
        .expect("IPAM users waited for an allocation stuck on host-local's disk");
        assert_eq!(others, (1, 1, vec![a0]));
        assert!(
            stuck.try_recv().is_err(),
            "the stuck allocation went through"
        );
        wedge.release();
        let (a1, fresh) = stuck.recv_timeout(PROMPTLY).unwrap().unwrap();
        assert!(fresh && a1 != a0, "{a1}");
        drop(wedge);
        fs::remove_dir_all(d).unwrap();
    }

    /// GC removing a file on a hung disk: the address stays taken meanwhile, and everyone else
    /// goes on, because the file is removed outside the index lock.
    #[test]
    fn gc_stuck_on_a_hung_disk_holds_up_no_other_ipam_user() {
        let d = tmp();
        let n = net("10.244.1.0/24");
        let ipam = std::sync::Arc::new(Ipam::open(&d).unwrap());
        let (o1, o2) = (Owner::new("c1", "eth0"), Owner::new("c2", "eth0"));
        let (a1, _) = ipam.allocate(n, &o1, "net").unwrap();
        ipam.allocate(n, &o2, "net").unwrap();
        let valid: HashSet<_> = [o2.clone()].into_iter().collect();
        let claims = ipam.gc_candidates("net", &valid, ipam.gc_mark());
        assert_eq!(claims.len(), 1);
        let mut wedge = twill_tests::stall::DirWedge::new(&d.join("ipam/10.244.1.0-24")).unwrap();
        let (i, c) = (ipam.clone(), claims[0].clone());
        let stuck = start_blocked(move || i.release_claim(&c));
        let (i, c) = (ipam.clone(), claims[0].clone());
        let (held, unchanged, other) = within(PROMPTLY, move || {
            let held: Vec<_> = i.allocations().into_iter().map(|(_, a, _)| a).collect();
            let other = i.allocate(net("10.244.9.0/24"), &Owner::new("c3", "eth0"), "net");
            (held, i.unchanged(&c), other)
        })
        .expect("IPAM users waited for GC stuck on a hung disk");
        assert!(held.contains(&a1), "released before its file was gone");
        assert!(
            !unchanged,
            "a claim being released is no longer GC's to take again"
        );
        assert!(other.is_ok());
        assert!(stuck.try_recv().is_err());
        wedge.release();
        assert!(stuck.recv_timeout(PROMPTLY).unwrap().unwrap());
        assert!(!ipam.allocations().iter().any(|(_, a, _)| *a == a1));
        assert!(!d.join(format!("ipam/10.244.1.0-24/{a1}")).exists());
        drop(wedge);
        fs::remove_dir_all(d).unwrap();
    }

    /// After a SubnetLen change the node's new subnet lies inside its old one: addresses the
    /// old pods hold (in the old subnet's dir) are taken for the new one too, also after a
    /// restart, and they are reported as outside the current subnet.
    #[test]
    fn overlapping_subnets_share_their_addresses() {
        let d = tmp();
        let (old, new) = (net("10.244.0.0/23"), net("10.244.0.0/24"));
        let mut held = Vec::new();
        {
            let ipam = Ipam::open(&d).unwrap();
            for i in 0..3 {
                held.push(
                    ipam.allocate(old, &Owner::new(format!("o{i}"), "eth0"), "net")
                        .unwrap()
                        .0,
                );
            }
            // One of the old pods sits in the old subnet's upper half.
            ipam.lock().get_mut(&old).unwrap().last = bits("10.244.1.9".parse().unwrap());
            held.push(
                ipam.allocate(old, &Owner::new("o3", "eth0"), "net")
                    .unwrap()
                    .0,
            );
        }
        assert_eq!(
            held[..3],
            [
                "10.244.0.2".parse::<Ipv4Addr>().unwrap(),
                "10.244.0.3".parse().unwrap(),
                "10.244.0.4".parse().unwrap()
            ]
        );
        let ipam = Ipam::open(&d).unwrap();
        let (a, _) = ipam
            .allocate(new, &Owner::new("n0", "eth0"), "net")
            .unwrap();
        assert_eq!(a.to_string(), "10.244.0.5");
        let outside: Vec<_> = ipam
            .outside(new)
            .into_iter()
            .map(|(_, a, _)| a.to_string())
            .collect();
        assert_eq!(outside, ["10.244.1.10"]);
        // The other way round (a larger subnet after a smaller one) too.
        let (b, _) = ipam
            .allocate(net("10.244.0.0/22"), &Owner::new("n1", "eth0"), "net")
            .unwrap();
        assert!(!held.contains(&b) && b != a, "{b}");
        fs::remove_dir_all(d).unwrap();
    }

    #[test]
    fn ipv6_allocates_from_two_in_a_64_persists_and_releases_with_the_v4_address() {
        let d = tmp();
        let (n4, n6) = (net("10.244.1.0/24"), net("fd00:10:244:1::/64"));
        let owner = Owner::new("c1", "eth0");
        let (a6, b6) = {
            let ipam = Ipam::open(&d).unwrap();
            let (a4, _) = ipam.allocate(n4, &owner, "net1").unwrap();
            let (a6, fresh) = ipam.allocate(n6, &owner, "net1").unwrap();
            assert!(fresh);
            assert_eq!(a4.to_string(), "10.244.1.2");
            assert_eq!(a6.to_string(), "fd00:10:244:1::2");
            let (b6, _) = ipam
                .allocate(n6, &Owner::new("c2", "eth0"), "net1")
                .unwrap();
            assert_eq!(b6.to_string(), "fd00:10:244:1::3");
            // The v6 allocation is not "outside" the v4 subnet, nor the v4 one the v6 subnet.
            assert!(ipam.outside(n4).is_empty() && ipam.outside(n6).is_empty());
            (a6, b6)
        };
        let file = d.join("ipam/fd00:10:244:1::-64").join(a6.to_string());
        assert_eq!(fs::read_to_string(&file).unwrap(), "c1\neth0\nnet1\n");
        // Reloaded after a restart: held, and never handed out again.
        let ipam = Ipam::open(&d).unwrap();
        assert_eq!(ipam.lookup(n6, &owner), Some(a6));
        let (c6, _) = ipam
            .allocate(n6, &Owner::new("c3", "eth0"), "net1")
            .unwrap();
        assert!(c6 != a6 && c6 != b6, "{c6}");
        // DEL releases both families' addresses of the attachment.
        let mut freed = ipam.release(&owner).unwrap();
        freed.sort();
        assert_eq!(freed.len(), 2, "{freed:?}");
        assert!(freed.contains(&a6) && !file.exists());
        // GC takes both families' stale allocations.
        let valid = HashSet::from([Owner::new("c3", "eth0")]);
        assert_eq!(gc(&ipam, "net1", &valid), vec![b6]);
        fs::remove_dir_all(d).unwrap();
    }

    #[test]
    fn a_small_ipv6_subnet_fills_up_and_a_too_small_one_is_refused() {
        let d = tmp();
        let ipam = Ipam::open(&d).unwrap();
        // /125: 8 addresses, the first two and the last reserved: 5 for pods.
        let n = net("fd00::/125");
        for i in 0..5 {
            ipam.allocate(n, &Owner::new(format!("c{i}"), "eth0"), "x")
                .unwrap();
        }
        let e = ipam
            .allocate(n, &Owner::new("c9", "eth0"), "x")
            .unwrap_err();
        assert!(matches!(e, IpamError::Full { count: 5, .. }), "{e}");
        let e = ipam
            .allocate(net("fd00::/127"), &Owner::new("c9", "eth0"), "x")
            .unwrap_err();
        assert!(matches!(e, IpamError::TooSmall(_)), "{e}");
        fs::remove_dir_all(d).unwrap();
    }
}
