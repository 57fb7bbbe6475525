//! Netlink calls for pod networking (veth, bridge, addresses and routes inside a pod's netns).
//!
//! Two kinds of handle: [`PodNetlink::new`] talks to the namespace twilld runs in (the node's:
//! bridge, host veth ends); [`PodNetlink::in_netns`] runs a closure with a handle opened inside
//! a pod's namespace, on a dedicated thread, because a namespace belongs to a thread and tokio
//! workers must never switch. Those threads are bounded by a [`ThreadLimit`].

use std::fs::File;
use std::future::Future;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use futures::future::OptionFuture;
use futures::TryStreamExt;
use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use nix::sched::{setns, CloneFlags};
use rtnetlink::packet_route::address::{AddressAttribute, AddressFlags};
use rtnetlink::packet_route::link::{
    BridgeBooleanOptionFlags, InfoData, InfoKind, InfoVeth, LinkAttribute, LinkInfo, LinkMessage,
};
use rtnetlink::{
    Handle, LinkBridge, LinkBridgePort, LinkMessageBuilder, LinkUnspec, LinkVeth,
    RouteMessageBuilder,
};

use crate::mac::MacAddr;
use crate::metrics::Metrics;

#[derive(Debug, thiserror::Error)]
pub enum PodNetError {
    #[error("network namespace {0} does not exist (or is not a network namespace)")]
    NetnsGone(String),
    #[error("{context}: {message}")]
    Failed {
        context: String,
        message: String,
        /// The kernel's errno when the failure came from netlink.
        errno: Option<i32>,
    },
}

impl PodNetError {
    fn other(context: impl Into<String>, message: impl ToString) -> Self {
        PodNetError::Failed {
            context: context.into(),
            message: message.to_string(),
            errno: None,
        }
    }

    fn netlink(context: impl Into<String>, e: rtnetlink::Error) -> Self {
        let errno = errno_of(&e);
        let message = match errno {
            Some(n) => std::io::Error::from_raw_os_error(n).to_string(),
            None => e.to_string(),
        };
        PodNetError::Failed {
            context: context.into(),
            message,
            errno,
        }
    }

    pub fn errno(&self) -> Option<i32> {
        match self {
            PodNetError::Failed { errno, .. } => *errno,
            PodNetError::NetnsGone(_) => None,
        }
    }
}

fn errno_of(e: &rtnetlink::Error) -> Option<i32> {
    match e {
        rtnetlink::Error::NetlinkError(m) => m.code.map(|c| c.get().abs()),
        _ => None,
    }
}

/// What we need to know about a link.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LinkState {
    pub index: u32,
    pub mac: String,
    pub mtu: u32,
    pub controller: Option<u32>,
    pub is_bridge: bool,
}

fn link_state(m: &LinkMessage) -> LinkState {
    let mut s = LinkState {
        index: m.header.index,
        mac: String::new(),
        mtu: 0,
        controller: None,
        is_bridge: false,
    };
    for a in &m.attributes {
        match a {
            LinkAttribute::Address(b) if b.len() == 6 => {
                s.mac = MacAddr([b[0], b[1], b[2], b[3], b[4], b[5]]).to_string()
            }
            LinkAttribute::Mtu(m) => s.mtu = *m,
            LinkAttribute::Controller(c) => s.controller = Some(*c),
            LinkAttribute::LinkInfo(infos) => {
                s.is_bridge = infos
                    .iter()
                    .any(|i| matches!(i, LinkInfo::Kind(InfoKind::Bridge)))
            }
            _ => {}
        }
    }
    s
}

/// `ip link show NAME`; Ok(None) when it does not exist.
pub async fn link_by_name(h: &Handle, name: &str) -> Result<Option<LinkState>, PodNetError> {
    match h.link().get().match_name(name).execute().try_next().await {
        Ok(Some(m)) => Ok(Some(link_state(&m))),
        Ok(None) => Ok(None),
        Err(e) if errno_of(&e) == Some(libc::ENODEV) => Ok(None),
        Err(e) => Err(PodNetError::netlink(format!("looking up link {name}"), e)),
    }
}

/// Whether a link named `name` exists in this network namespace. An ioctl (SIOCGIFINDEX), not
/// netlink: for callers that hold no netlink handle (the policy task at start).
pub fn link_exists(name: &str) -> std::io::Result<bool> {
    match nix::net::if_::if_nametoindex(name) {
        Ok(_) => Ok(true),
        Err(nix::errno::Errno::ENODEV) => Ok(false),
        Err(e) => Err(e.into()),
    }
}

/// `ip link del NAME`; Ok(false) when it was not there.
pub async fn delete_link(h: &Handle, name: &str) -> Result<bool, PodNetError> {
    let Some(l) = link_by_name(h, name).await? else {
        return Ok(false);
    };
    match h.link().del(l.index).execute().await {
        Ok(()) => Ok(true),
        Err(e) if errno_of(&e) == Some(libc::ENODEV) => Ok(false),
        Err(e) => Err(PodNetError::netlink(format!("deleting link {name}"), e)),
    }
}

/// Interface `index`'s addresses of both families, with their prefix lengths.
async fn ip_addrs(h: &Handle, index: u32) -> Result<Vec<IpNet>, PodNetError> {
    let mut out = Vec::new();
    let mut s = h.address().get().set_link_index_filter(index).execute();
    while let Some(m) = s
        .try_next()
        .await
        .map_err(|e| PodNetError::netlink("listing addresses", e))?
    {
        if m.header.index != index {
            continue;
        }
        for a in &m.attributes {
            if let AddressAttribute::Address(ip) = a {
                if let Ok(n) = IpNet::new(*ip, m.header.prefix_len) {
                    out.push(n);
                }
            }
        }
    }
    Ok(out)
}

/// Routes of both families in the main table as (destination, gateway).
async fn ip_routes(h: &Handle) -> Result<Vec<(IpNet, Option<IpAddr>)>, PodNetError> {
    use super::NlFamily;
    let mut out = Vec::new();
    for req in [
        RouteMessageBuilder::<Ipv4Addr>::new().build(),
        RouteMessageBuilder::<Ipv6Addr>::new().build(),
    ] {
        let mut s = h.route().get(req).execute();
        while let Some(m) = s
            .try_next()
            .await
            .map_err(|e| PodNetError::netlink("listing routes", e))?
        {
            if super::route_table(&m) != super::MAIN_TABLE {
                continue;
            }
            if let Some(dst) = Ipv4Net::route_dst(&m) {
                out.push((dst.into(), Ipv4Net::route_gw(&m).map(IpAddr::V4)));
            } else if let Some(dst) = Ipv6Net::route_dst(&m) {
                out.push((dst.into(), Ipv6Net::route_gw(&m).map(IpAddr::V6)));
            }
        }
    }
    Ok(out)
}

/// Adds `addr` to interface `index`; an IPv6 one without duplicate address detection (the
/// address is ours to hand out: DAD would only keep it unusable for a second or more).
async fn add_addr(h: &Handle, index: u32, addr: IpNet) -> Result<(), rtnetlink::Error> {
    let mut req = h.address().add(index, addr.addr(), addr.prefix_len());
    if addr.addr().is_ipv6() {
        req.message_mut()
            .attributes
            .push(AddressAttribute::Flags(AddressFlags::Nodad));
    }
    req.execute().await
}

/// Bounds the threads pod operations run on. Each ADD, CHECK and DEL (and each attachment a GC
/// tears down) needs one, with its own runtime and netlink socket: a burst (a node restarting
/// with a hundred pods, a runtime's retry storm) queues for a slot instead of spawning them all.
#[derive(Clone)]
pub struct ThreadLimit {
    slots: Arc<tokio::sync::Semaphore>,
    metrics: Arc<Metrics>,
}

/// A thread slot; freed when the thread that holds it ends.
struct ThreadSlot {
    _permit: tokio::sync::OwnedSemaphorePermit,
    metrics: Arc<Metrics>,
}

impl ThreadLimit {
    pub fn new(max: usize, metrics: Arc<Metrics>) -> Self {
        ThreadLimit {
            slots: Arc::new(tokio::sync::Semaphore::new(max.max(1))),
            metrics,
        }
    }

    async fn acquire(&self) -> ThreadSlot {
        let permit = match self.slots.clone().try_acquire_owned() {
            Ok(p) => p,
            Err(_) => {
                Metrics::inc(&self.metrics.cni_thread_waits);
                self.slots
                    .clone()
                    .acquire_owned()
                    .await
                    .expect("the thread semaphore is never closed")
            }
        };
        Metrics::inc(&self.metrics.cni_threads);
        ThreadSlot {
            _permit: permit,
            metrics: self.metrics.clone(),
        }
    }
}

impl Drop for ThreadSlot {
    fn drop(&mut self) {
        self.metrics
            .cni_threads
            .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }
}

/// A netlink connection in the namespace of the calling thread (twilld's: the node's), and the
/// limit on the threads that work in pods' namespaces or on sockets of their own.
#[derive(Clone)]
pub struct PodNetlink {
    handle: Handle,
    threads: ThreadLimit,
}

impl PodNetlink {
    /// Must be called inside a tokio runtime; the connection task is spawned on it.
    pub fn new(threads: ThreadLimit) -> Result<Self, PodNetError> {
        let (conn, handle, _) =
            rtnetlink::new_connection().map_err(|e| PodNetError::other("opening netlink", e))?;
        tokio::spawn(conn);
        Ok(PodNetlink { handle, threads })
    }

    pub fn handle(&self) -> &Handle {
        &self.handle
    }

    /// The node bridge, created up with `gateway` and `mtu` if missing; an existing one gets the
    /// address, MTU and up state added if it lacks them. Returns its ifindex.
    pub async fn ensure_bridge(
        &self,
        name: &str,
        gateway: Option<Ipv4Net>,
        gateway6: Option<Ipv6Net>,
        mtu: u32,
    ) -> Result<u32, PodNetError> {
        let h = &self.handle;
        let link = match link_by_name(h, name).await? {
            Some(l) => l,
            None => {
                // A fixed MAC keeps the bridge's address stable as ports come and go (otherwise
                // it takes the lowest port MAC and pods' ARP caches go stale).
                let msg = LinkBridge::new(name)
                    .mtu(mtu)
                    .address(MacAddr::random_local().octets().to_vec())
                    .up()
                    .build();
                match h.link().add(msg).execute().await {
                    Ok(()) => {}
                    Err(e) if errno_of(&e) == Some(libc::EEXIST) => {}
                    Err(e) => {
                        return Err(PodNetError::netlink(format!("creating bridge {name}"), e))
                    }
                }
                link_by_name(h, name)
                    .await?
                    .ok_or_else(|| PodNetError::other(format!("bridge {name}"), "vanished"))?
            }
        };
        if !link.is_bridge {
            return Err(PodNetError::other(
                format!("bridge {name}"),
                "a device of that name exists and is not a bridge",
            ));
        }
        h.link()
            .set(LinkUnspec::new_with_index(link.index).up().build())
            .execute()
            .await
            .map_err(|e| PodNetError::netlink(format!("setting bridge {name} up"), e))?;
        // The bridge learns where a MAC is also from frames to link-local group addresses
        // (01:80:c2:00:00:0e passes no bridge hook), which would let a pod draw another pod's
        // frames past the ports' MAC checks. Pods have no use for it. (Linux 4.20+.)
        let no_ll_learn = LinkMessageBuilder::<LinkBridge>::new(name)
            .index(link.index)
            .set_boolean_opt(BridgeBooleanOptionFlags::NoLinkLocalLearn, true)
            .build();
        if let Err(e) = h.link().change(no_ll_learn).execute().await {
            tracing::warn!(bridge = name, error = %e, "cannot turn off the bridge's learning from link-local frames: a pod can draw another pod's frames to itself");
        }
        if link.mtu != mtu {
            // Pods get `mtu` on their veths either way; a bridge MTU the kernel refuses (e.g.
            // above a foreign port's) must not stop every ADD.
            if let Err(e) = h
                .link()
                .set(LinkUnspec::new_with_index(link.index).mtu(mtu).build())
                .execute()
                .await
            {
                tracing::warn!(bridge = name, mtu, error = %e, "cannot set the bridge MTU");
            }
        }
        let have = ip_addrs(h, link.index).await?;
        for gw in gateway
            .map(IpNet::V4)
            .into_iter()
            .chain(gateway6.map(IpNet::V6))
        {
            if have.contains(&gw) {
                continue;
            }
            match add_addr(h, link.index, gw).await {
                Ok(()) => {}
                Err(e) if errno_of(&e) == Some(libc::EEXIST) => {}
                Err(e) => {
                    return Err(PodNetError::netlink(
                        format!("adding {gw} to bridge {name}"),
                        e,
                    ))
                }
            }
        }
        Ok(link.index)
    }

    /// Creates the veth pair in one message: the host end `host` already enslaved to `bridge`,
    /// up and with `mac` (so nothing needs looking up afterwards), the container end born inside
    /// the pod's namespace under its final name with `peer_mac` (its port's source checks know
    /// it before it exists), so no half-named device is ever visible there.
    /// EEXIST if either name is taken. A failure leaves nothing: the kernel unregisters the pair
    /// when any part of the message (e.g. a stale bridge index) is refused.
    pub async fn create_veth(
        &self,
        host: &str,
        container: &str,
        netns: &File,
        mtu: u32,
        bridge: u32,
        (mac, peer_mac): (MacAddr, MacAddr),
    ) -> Result<(), PodNetError> {
        let peer = LinkUnspec::new_with_name(container)
            .mtu(mtu)
            .address(peer_mac.octets().to_vec())
            .setns_by_fd(netns.as_raw_fd())
            .build();
        let msg = LinkMessageBuilder::<LinkVeth>::new_with_info_kind(InfoKind::Veth)
            .name(host.to_string())
            .mtu(mtu)
            .address(mac.octets().to_vec())
            .controller(bridge)
            .up()
            .set_info_data(InfoData::Veth(InfoVeth::Peer(peer)))
            .build();
        self.handle
            .link()
            .add(msg)
            .execute()
            .await
            .map_err(|e| PodNetError::netlink(format!("creating veth {host} <-> {container}"), e))
    }

    /// Turns hairpin on for a bridge port, addressed by name (the kernel resolves IFLA_IFNAME
    /// when the index is 0). Bridge port options cannot ride along when the link is created.
    pub async fn set_hairpin(&self, port: &str) -> Result<(), PodNetError> {
        // Port options go through RTM_NEWLINK (what `ip link set type bridge_slave` sends).
        self.handle
            .link()
            .change(LinkBridgePort::new(0).name(port).hairpin(true).build())
            .execute()
            .await
            .map_err(|e| PodNetError::netlink(format!("turning hairpin on for {port}"), e))
    }

    /// On a socket of its own: see `on_own_socket`.
    pub async fn delete_link(&self, name: &str) -> Result<bool, PodNetError> {
        let name = name.to_string();
        self.on_own_socket(move |h| async move { delete_link(&h, &name).await })
            .await
    }

    /// Runs `f` with a netlink handle opened inside the namespace `netns` (from `open_netns`;
    /// `shown` names it in errors), on a fresh thread that ends afterwards (so no thread ever
    /// returns to a pool in the wrong namespace). Requests for different pods run in parallel,
    /// up to the thread limit. Taking the open namespace, not its path, means the thread enters
    /// exactly the one the caller checked.
    pub async fn in_netns<T, F, Fut>(
        &self,
        netns: File,
        shown: String,
        f: F,
    ) -> Result<T, PodNetError>
    where
        T: Send + 'static,
        F: FnOnce(Handle) -> Fut + Send + 'static,
        Fut: Future<Output = Result<T, PodNetError>>,
    {
        on_own_thread(&self.threads, Some((netns, shown)), f).await
    }

    /// Runs `f` with a netlink connection of its own, in twilld's namespace, on a dedicated
    /// thread. Deleting a veth waits for an RCU grace period (~25 ms) inside the kernel's
    /// sendmsg: on the shared connection that serialises every DEL behind the others (and
    /// stalls a tokio worker), while separate sockets let the kernel batch concurrent
    /// unregistrations.
    async fn on_own_socket<T, F, Fut>(&self, f: F) -> Result<T, PodNetError>
    where
        T: Send + 'static,
        F: FnOnce(Handle) -> Fut + Send + 'static,
        Fut: Future<Output = Result<T, PodNetError>>,
    {
        on_own_thread(&self.threads, None, f).await
    }

    pub async fn link_by_name(&self, name: &str) -> Result<Option<LinkState>, PodNetError> {
        link_by_name(&self.handle, name).await
    }
}

/// CNI_NETNS as the plugin sees it. A runtime may create the netns file in a mount namespace
/// twilld does not share (e.g. twilld in a container, podman's /run/netns): when the path is not
/// visible here, look through the plugin's root (`peer_root`, see `cni::peer`), opened when the
/// plugin connected.
pub fn resolve_netns(path: &str, peer_root: Option<&Path>) -> PathBuf {
    let p = PathBuf::from(path);
    if path.is_empty() || p.exists() {
        return p;
    }
    if let Some(root) = peer_root {
        let alt = root.join(p.strip_prefix("/").unwrap_or(&p));
        if alt.exists() {
            return alt;
        }
    }
    p
}

#[derive(Debug, thiserror::Error)]
pub enum OpenNetnsError {
    #[error("{0}")]
    Io(#[from] std::io::Error),
    /// Pod interfaces would land among the node's own (with a pod address and route).
    #[error("it is twilld's own network namespace, not a pod's")]
    Own,
}

/// Opens a netns path without blocking (a FIFO planted as CNI_NETNS must not hang a thread).
/// Anything else than a namespace file (nsfs) is refused here, before it reaches the kernel, and
/// so is the namespace twilld itself runs in.
pub fn open_netns(path: &Path) -> Result<File, OpenNetnsError> {
    const NSFS_MAGIC: libc::c_long = 0x6e73_6673;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(path)?;
    // SAFETY: fstatfs fills the zeroed struct for a valid open fd.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::fstatfs(file.as_raw_fd(), &mut st) } != 0 {
        return Err(std::io::Error::last_os_error().into());
    }
    if st.f_type as libc::c_long != NSFS_MAGIC {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "not a network namespace",
        )
        .into());
    }
    // This thread's namespace is twilld's: only pod threads ever switch, and they end after.
    let ns = file.metadata()?;
    let own = std::fs::metadata("/proc/thread-self/ns/net")?;
    if (ns.dev(), ns.ino()) == (own.dev(), own.ino()) {
        return Err(OpenNetnsError::Own);
    }
    Ok(file)
}

async fn on_own_thread<T, F, Fut>(
    limit: &ThreadLimit,
    netns: Option<(File, String)>,
    f: F,
) -> Result<T, PodNetError>
where
    T: Send + 'static,
    F: FnOnce(Handle) -> Fut + Send + 'static,
    Fut: Future<Output = Result<T, PodNetError>>,
{
    let slot = limit.acquire().await;
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("twill-netns".into())
        .spawn(move || {
            // Freed when this thread is done, runtime and socket included (dropped last).
            let _slot = slot;
            let setup = || -> Result<tokio::runtime::Runtime, PodNetError> {
                if let Some((file, shown)) = netns {
                    enter_netns(&file, &shown)?;
                }
                tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .map_err(|e| PodNetError::other("building a runtime", e))
            };
            let rt = match setup() {
                Ok(rt) => rt,
                Err(e) => {
                    let _ = tx.send(Err(e));
                    return;
                }
            };
            rt.block_on(async {
                let run = async {
                    let (conn, handle, _) = rtnetlink::new_connection()
                        .map_err(|e| PodNetError::other("opening netlink", e))?;
                    tokio::spawn(conn);
                    f(handle).await
                };
                // Answer before the runtime and socket are torn down: the caller need not
                // wait for that.
                let _ = tx.send(run.await);
            });
        })
        .map_err(|e| PodNetError::other("spawning a netlink thread", e))?;
    rx.await
        .map_err(|_| PodNetError::other("netlink thread", "ended without an answer"))?
}

/// Moves the calling thread into the network namespace `file`. Only for threads that end
/// afterwards (see `on_own_thread`).
fn enter_netns(file: &File, shown: &str) -> Result<(), PodNetError> {
    setns(file, CloneFlags::CLONE_NEWNET).map_err(|e| {
        // A namespace file, but not a network namespace.
        if e == nix::errno::Errno::EINVAL {
            PodNetError::NetnsGone(shown.to_string())
        } else {
            PodNetError::other(format!("entering netns {shown}"), e)
        }
    })
}

/// Inside the pod's netns: each family's address (IPv4, IPv6 or both), up, default route via
/// the family's gateway. Returns the link, and whether each default route was added: a pod
/// attached to another network first may have one already, and then the first one wins (as
/// with the reference plugins), not an error. The IPv4 changes are sent back to back on one
/// socket without waiting for each answer: the kernel handles a socket's messages in order, so
/// the route still finds the address and the link up. The first failure in that order is the
/// one reported.
pub async fn configure_container(
    h: &Handle,
    ifname: &str,
    v4: Option<(Ipv4Net, Ipv4Addr)>,
    v6: Option<(Ipv6Net, Ipv6Addr)>,
) -> Result<(LinkState, Routed), PodNetError> {
    let l = link_by_name(h, ifname)
        .await?
        .ok_or_else(|| PodNetError::other(format!("interface {ifname}"), "not found in netns"))?;
    if v6.is_some() {
        // No DAD on the pod's end at all (its link-local address too): the addresses are ours
        // to hand out, and DAD would hold them for a second or more after the pod starts. This
        // thread is in the pod's netns, so /proc/sys/net is the pod's.
        let path = format!("/proc/sys/net/ipv6/conf/{ifname}/accept_dad");
        if let Err(e) = std::fs::write(&path, "0") {
            // A container that is not privileged (the shipped DaemonSet) has /proc/sys
            // read-only. The pod's own address is added without DAD anyway (IFA_F_NODAD), so
            // it works at once; only its link-local address goes through DAD.
            static SAID: std::sync::Once = std::sync::Once::new();
            SAID.call_once(|| {
                tracing::warn!(%path, error = %e, "cannot turn DAD off in pods (is /proc/sys read-only here?); their IPv6 addresses are added without DAD, link-local ones keep it")
            });
        }
    }
    let add_v4 = OptionFuture::from(v4.map(|(addr, _)| add_addr(h, l.index, addr.into())));
    let set_up = h
        .link()
        .set(LinkUnspec::new_with_index(l.index).up().build())
        .execute();
    let add_route = OptionFuture::from(v4.map(|(_, gateway)| {
        h.route()
            .add(
                RouteMessageBuilder::<Ipv4Addr>::new()
                    .destination_prefix(Ipv4Addr::UNSPECIFIED, 0)
                    .gateway(gateway)
                    .output_interface(l.index)
                    .build(),
            )
            .execute()
    }));
    // join! polls (and so queues) them in this order.
    let (a, u, r) = futures::join!(add_v4, set_up, add_route);
    if let (Some(a), Some((addr, _))) = (a, v4) {
        a.map_err(|e| PodNetError::netlink(format!("adding {addr} to {ifname}"), e))?;
    }
    u.map_err(|e| PodNetError::netlink(format!("setting {ifname} up"), e))?;
    let routed4 = match (r, v4) {
        (Some(Ok(())), _) => true,
        (Some(Err(e)), _) if errno_of(&e) == Some(libc::EEXIST) => false,
        (Some(Err(e)), Some((_, gateway))) => {
            return Err(PodNetError::netlink(
                format!("adding default route via {gateway}"),
                e,
            ))
        }
        _ => false,
    };
    let Some((addr6, gateway6)) = v6 else {
        return Ok((
            l,
            Routed {
                v4: routed4,
                v6: false,
            },
        ));
    };
    // Without DAD the address is usable at once, and so the route via the bridge.
    add_addr(h, l.index, addr6.into())
        .await
        .map_err(|e| PodNetError::netlink(format!("adding {addr6} to {ifname}"), e))?;
    let routed6 = match h
        .route()
        .add(
            RouteMessageBuilder::<Ipv6Addr>::new()
                .destination_prefix(Ipv6Addr::UNSPECIFIED, 0)
                .gateway(gateway6)
                .output_interface(l.index)
                .build(),
        )
        .execute()
        .await
    {
        Ok(()) => true,
        Err(e) if errno_of(&e) == Some(libc::EEXIST) => false,
        Err(e) => {
            return Err(PodNetError::netlink(
                format!("adding default route via {gateway6}"),
                e,
            ))
        }
    };
    Ok((
        l,
        Routed {
            v4: routed4,
            v6: routed6,
        },
    ))
}

/// Which default routes ADD made (a pod with its own keeps it): the result lists only those.
#[derive(Clone, Copy, Debug)]
pub struct Routed {
    pub v4: bool,
    pub v6: bool,
}

/// What CHECK expects to find inside the pod's netns.
#[derive(Clone, Debug, Default)]
pub struct Expected {
    pub ifname: String,
    pub addrs: Vec<IpNet>,
    pub routes: Vec<(IpNet, Option<IpAddr>)>,
}

/// Lists everything in `want` that is missing; empty means all is there.
pub async fn check_container(h: &Handle, want: &Expected) -> Result<Vec<String>, PodNetError> {
    let mut missing = Vec::new();
    let Some(l) = link_by_name(h, &want.ifname).await? else {
        missing.push(format!("interface {}", want.ifname));
        return Ok(missing);
    };
    let have = ip_addrs(h, l.index).await?;
    for a in &want.addrs {
        if !have.contains(a) {
            missing.push(format!("address {a} on {}", want.ifname));
        }
    }
    let routes = ip_routes(h).await?;
    for (dst, gw) in &want.routes {
        let found = routes
            .iter()
            .any(|(d, g)| d == dst && (gw.is_none() || g == gw));
        if !found {
            match gw {
                Some(gw) => missing.push(format!("route {dst} via {gw}")),
                None => missing.push(format!("route {dst}")),
            }
        }
    }
    Ok(missing)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Only reads: every network namespace has `lo`, and none a link of a made-up name.
    #[test]
    fn link_exists_tells_present_from_absent_links() {
        assert!(link_exists("lo").unwrap());
        assert!(!link_exists("twnosuchlink0").unwrap());
    }
}
