//! The CNI verbs, as twilld performs them.

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

use futures::StreamExt;
use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use serde_json::{json, Value};
use tokio::sync::{watch, OwnedMutexGuard};
use twill_proto::{
    codes, is_supported_version, validate, CniError, CniResult, Command, Dns, Interface, IpConfig,
    Request, Route, SUPPORTED_VERSIONS,
};

use super::hostlocal::HostLocal;
use super::ipam::{Claim, Ipam, IpamError, Owner};
use super::peer::PeerRoot;
use super::{CniOptions, NodeNet};
use crate::mac::MacAddr;
use crate::metrics::Metrics;
use crate::netlink::pod::{self, OpenNetnsError, PodNetError, PodNetlink};
use crate::policy::pods::{self, LocalPod};
use crate::policy::{PodUpError, PolicyHandle};

pub(super) struct Ctx {
    pub opts: CniOptions,
    pub node: watch::Receiver<Option<NodeNet>>,
    pub metrics: Arc<Metrics>,
    ipam: Arc<Ipam>,
    nl: PodNetlink,
    /// The bridge as last ensured: (gateway, MTU, ifindex, when). Checking it costs three
    /// netlink round trips, so it is redone only every BRIDGE_RECHECK or when attaching to it
    /// fails. The lock serialises that check, never the per-pod work.
    bridge: tokio::sync::Mutex<Option<(Gateways, u32, u32, std::time::Instant)>>,
    keys: KeyLocks,
    host_local: HostLocal,
}

/// The bridge's addresses: the pods' gateways, one per family the node serves.
type Gateways = (Option<Ipv4Net>, Option<Ipv6Net>);

/// How many stale attachments GC tears down at once.
const GC_PARALLEL: usize = 32;

/// How long a checked bridge is trusted (its gateway address may be removed by hand).
const BRIDGE_RECHECK: std::time::Duration = std::time::Duration::from_secs(10);

impl Ctx {
    pub fn new(
        opts: CniOptions,
        node: watch::Receiver<Option<NodeNet>>,
        metrics: Arc<Metrics>,
        ipam: Ipam,
        nl: PodNetlink,
    ) -> Self {
        Ctx {
            node,
            metrics,
            ipam: Arc::new(ipam),
            nl,
            bridge: tokio::sync::Mutex::new(None),
            keys: KeyLocks::default(),
            host_local: HostLocal::new(opts.host_local_dir.clone()),
            opts,
        }
    }

    /// The bridge's ifindex, ensured (created, up, gateway address) on first use, or again when
    /// `stale` is the index a caller found unusable.
    async fn bridge(&self, gw: Gateways, mtu: u32, stale: Option<u32>) -> Result<u32, PodNetError> {
        let mut cached = self.bridge.lock().await;
        if let Some((g, m, idx, at)) = *cached {
            if g == gw && m == mtu && Some(idx) != stale && at.elapsed() < BRIDGE_RECHECK {
                return Ok(idx);
            }
        }
        let idx = self
            .nl
            .ensure_bridge(&self.opts.bridge, gw.0, gw.1, mtu)
            .await?;
        *cached = Some((gw, mtu, idx, std::time::Instant::now()));
        Ok(idx)
    }
}

/// One operation at a time per containerID+ifname (runtimes should serialise, but a retried
/// ADD racing its DEL must not tear down what the other just built).
#[derive(Default)]
struct KeyLocks(Mutex<HashMap<Owner, Arc<tokio::sync::Mutex<()>>>>);

struct KeyGuard<'a> {
    locks: &'a KeyLocks,
    key: Owner,
    guard: Option<OwnedMutexGuard<()>>,
}

impl KeyLocks {
    /// Keys with an operation running or waiting.
    fn in_flight(&self) -> Vec<Owner> {
        let map = self.0.lock().unwrap_or_else(|p| p.into_inner());
        map.keys().cloned().collect()
    }

    async fn lock(&self, key: Owner) -> KeyGuard<'_> {
        let m = {
            let mut map = self.0.lock().unwrap_or_else(|p| p.into_inner());
            map.entry(key.clone()).or_default().clone()
        };
        KeyGuard {
            locks: self,
            key,
            guard: Some(m.lock_owned().await),
        }
    }
}

impl Drop for KeyGuard<'_> {
    fn drop(&mut self) {
        self.guard.take();
        let mut map = self.locks.0.lock().unwrap_or_else(|p| p.into_inner());
        if map
            .get(&self.key)
            .is_some_and(|m| Arc::strong_count(m) == 1)
        {
            map.remove(&self.key);
        }
    }
}

/// FNV-1a of containerID+ifname (and a salt): stable across builds (std's hasher is not).
fn attachment_hash(container_id: &str, ifname: &str, salt: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf29ce484222325;
    for b in container_id
        .bytes()
        .chain([0u8])
        .chain(ifname.bytes())
        .chain(salt.iter().copied())
    {
        h ^= b as u64;
        h = h.wrapping_mul(0x100000001b3);
    }
    h
}

/// The host end's name, derived from containerID+ifname so DEL and GC find it without a netns.
pub fn host_veth_name(container_id: &str, ifname: &str) -> String {
    format!(
        "tw{:012x}",
        attachment_hash(container_id, ifname, &[]) & 0xffff_ffff_ffff
    )
}

/// Whether `name` is one `host_veth_name` could have made (a pod record's file is named so).
pub fn is_host_veth_name(name: &str) -> bool {
    name.len() == 14
        && name.starts_with("tw")
        && name[2..]
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// The pod end's MAC (locally administered, unicast), derived from containerID+ifname like
/// the host end's name: an ADD retried for a running pod, or a veth made anew for the same
/// attachment, records the MAC the interface has (its port's source checks bind it).
pub fn pod_mac(container_id: &str, ifname: &str) -> MacAddr {
    let h = attachment_hash(container_id, ifname, b"\0mac").to_be_bytes();
    let mut b = [h[2], h[3], h[4], h[5], h[6], h[7]];
    b[0] = (b[0] & 0xfe) | 0x02;
    MacAddr(b)
}

fn kernel_err(e: PodNetError) -> CniError {
    match e {
        PodNetError::NetnsGone(_) => CniError::new(codes::IO_FAILURE, e.to_string()),
        _ => CniError::new(codes::KERNEL, e.to_string()),
    }
}

fn ipam_err(e: IpamError) -> CniError {
    match e {
        IpamError::Full { .. } | IpamError::TooSmall(_) => {
            CniError::new(codes::SUBNET_FULL, e.to_string())
        }
        IpamError::Io { .. } => CniError::new(codes::IO_FAILURE, e.to_string()),
    }
}

/// IPAM on a blocking thread, never on an async worker: its files may sit on a slow disk.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, IpamError> + Send + 'static,
) -> Result<T, CniError> {
    offload(f).await?.map_err(ipam_err)
}

/// `f` on a blocking thread (IPAM's in-memory reads too: its lock must never stall a worker).
async fn offload<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Result<T, CniError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| CniError::new(codes::INTERNAL, format!("IPAM task failed: {e}")))
}

/// Pods from before the node's subnet changed keep their addresses until DEL or GC (taken in
/// any overlapping subnet meanwhile): said once each time the subnet becomes known or changes.
pub(super) async fn report_outside(ctx: Arc<Ctx>) {
    let mut node = ctx.node.clone();
    loop {
        let nets = node
            .borrow_and_update()
            .as_ref()
            .map_or_else(Vec::new, NodeNet::nets);
        for net in nets {
            let ipam = ctx.ipam.clone();
            if let Ok(outside) = offload(move || ipam.outside(net)).await {
                if let Some((old, addr, holder)) = outside.first() {
                    tracing::warn!(subnet = %net, count = outside.len(), first = %addr,
                        first_subnet = %old, first_container = %holder.owner.container_id,
                        "pod addresses outside this node's subnet are still allocated (pods from before the subnet changed); they stay taken until DEL or GC releases them");
                }
            }
        }
        if node.changed().await.is_err() {
            return;
        }
    }
}

/// `peer_root` is the plugin's root (from the socket's peer): CNI_NETNS is resolved in the
/// plugin's mount namespace when twilld cannot see the path in its own.
pub(super) async fn dispatch(
    ctx: &Ctx,
    req: Request,
    peer_root: Option<PeerRoot>,
) -> Result<Option<Value>, CniError> {
    let version = req.cni_version().to_string();
    if !is_supported_version(&version) && req.command != Command::Version {
        return Err(CniError::new(
            codes::INCOMPATIBLE_VERSION,
            format!("unsupported cniVersion {version:?}"),
        ));
    }
    validate_request(&req)?;
    tracing::debug!(command = req.command.as_str(), container = %req.container_id,
        ifname = %req.ifname, netns = %req.netns, "CNI request");
    let started = std::time::Instant::now();
    let out = match req.command {
        Command::Add => add(ctx, &req, peer_root)
            .await
            .map(|r| Some(r.to_json(&version))),
        Command::Del => del(ctx, &req).await.map(|_| None),
        Command::Check => check(ctx, &req, peer_root).await.map(|_| None),
        Command::Gc => gc(ctx, &req).await.map(|_| None),
        Command::Status => status(ctx).map(|_| None),
        // The plugin answers VERSION itself; answer alike if asked anyway.
        Command::Version => Ok(Some(
            json!({"cniVersion": version, "supportedVersions": SUPPORTED_VERSIONS}),
        )),
    };
    match &out {
        Ok(_) => tracing::info!(command = req.command.as_str(), container = %req.container_id,
            ifname = %req.ifname, elapsed_ms = started.elapsed().as_millis() as u64, "CNI request done"),
        Err(e) => tracing::warn!(command = req.command.as_str(), container = %req.container_id,
            ifname = %req.ifname, code = e.code, error = %e.msg, "CNI request failed"),
    }
    out
}

/// The identifiers go into IPAM records one per line and into logs: checked here as the plugin
/// checks them, since any root process can speak the socket protocol.
pub(crate) fn validate_request(req: &Request) -> Result<(), CniError> {
    if matches!(req.command, Command::Add | Command::Check | Command::Del) {
        require("CNI_CONTAINERID", &req.container_id)?;
        require("CNI_IFNAME", &req.ifname)?;
        validate::container_id(&req.container_id)?;
        validate::ifname(&req.ifname)?;
    }
    if req.command != Command::Version {
        validate::network_name(&network_of(req))?;
    }
    Ok(())
}

fn status(ctx: &Ctx) -> Result<(), CniError> {
    if ctx.node.borrow().is_some() {
        Ok(())
    } else {
        Err(CniError::new(
            codes::NOT_AVAILABLE,
            "twilld not ready: this node has no pod subnet yet",
        ))
    }
}

/// The CNI network the request is for (the config's `name`), which scopes GC.
fn network_of(req: &Request) -> String {
    req.config
        .get("name")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_string()
}

/// CNI_NETNS, found (in the plugin's mount namespace if need be, see `resolve_netns`), opened
/// and checked to be a namespace other than twilld's own, once for the whole request. On a
/// blocking thread: the path may sit on a slow file system, and a worker thread must not wait
/// for it.
async fn open_netns(req: &Request, peer_root: Option<PeerRoot>) -> Result<File, CniError> {
    let shown = req.netns.clone();
    tokio::task::spawn_blocking(move || {
        let root = peer_root.as_ref().map(PeerRoot::path);
        let path = pod::resolve_netns(&shown, root.as_deref());
        pod::open_netns(&path).map_err(|e| {
            let code = match e {
                OpenNetnsError::Own => codes::INVALID_ENV,
                OpenNetnsError::Io(_) => codes::IO_FAILURE,
            };
            CniError::new(code, format!("cannot use network namespace {shown}: {e}"))
        })
    })
    .await
    .map_err(|e| CniError::new(codes::INTERNAL, format!("netns task failed: {e}")))?
}

fn owner_of(req: &Request) -> Owner {
    Owner::new(req.container_id.clone(), req.ifname.clone())
}

fn attachment(req: &Request) -> pods::Attachment {
    pods::Attachment {
        container_id: req.container_id.clone(),
        ifname: req.ifname.clone(),
    }
}

fn attachment_of(o: &Owner) -> pods::Attachment {
    pods::Attachment {
        container_id: o.container_id.clone(),
        ifname: o.ifname.clone(),
    }
}

fn require(what: &str, v: &str) -> Result<(), CniError> {
    if v.is_empty() {
        Err(CniError::new(codes::INVALID_ENV, format!("missing {what}")))
    } else {
        Ok(())
    }
}

/// The config's `dns`, copied into the ADD result.
pub(crate) fn dns_of(config: &Value) -> Result<Dns, CniError> {
    match config.get("dns") {
        None | Some(Value::Null) => Ok(Dns::default()),
        Some(v) => serde_json::from_value(v.clone()).map_err(|e| {
            CniError::new(
                codes::INVALID_CONFIG,
                format!("invalid \"dns\" in the config: {e}"),
            )
        }),
    }
}

/// What CHECK looks for in the pod: CNI_IFNAME's addresses and the routes of the prevResult.
pub(crate) fn expected_of(req: &Request) -> Result<pod::Expected, CniError> {
    let prev = req.config.get("prevResult").ok_or_else(|| {
        CniError::new(
            codes::INVALID_CONFIG,
            "CHECK needs a prevResult in the config",
        )
    })?;
    let prev = CniResult::from_json(prev).map_err(|e| {
        CniError::new(
            codes::DECODE_FAILED,
            format!("cannot decode prevResult: {e}"),
        )
    })?;
    let Some(if_idx) = prev
        .interfaces
        .iter()
        .position(|i| i.name == req.ifname && !i.sandbox.is_empty())
    else {
        return Err(CniError::new(
            codes::CHECK_FAILED,
            format!("prevResult lists no interface {} in a sandbox", req.ifname),
        ));
    };
    let mut want = pod::Expected {
        ifname: req.ifname.clone(),
        ..Default::default()
    };
    for ip in prev.ips.iter().filter(|ip| ip.interface == Some(if_idx)) {
        if let Ok(n) = ip.address.parse::<IpNet>() {
            want.addrs.push(n);
        }
    }
    for r in &prev.routes {
        let dst = r.dst.parse::<IpNet>().map_err(|e| {
            CniError::new(
                codes::DECODE_FAILED,
                format!("bad route {:?} in prevResult: {e}", r.dst),
            )
        });
        let Ok(dst) = dst else { continue };
        let gw = match &r.gw {
            Some(g) => Some(g.parse::<IpAddr>().map_err(|e| {
                CniError::new(
                    codes::DECODE_FAILED,
                    format!("bad gateway {g:?} in prevResult: {e}"),
                )
            })?),
            None => None,
        };
        want.routes.push((dst, gw));
    }
    Ok(want)
}

/// GC's list of the attachments the runtime still uses; None when it sent none.
pub(crate) fn valid_attachments(config: &Value) -> Result<Option<HashSet<Owner>>, CniError> {
    let list = config
        .get("cni.dev/valid-attachments")
        .or_else(|| config.get("cni.dev/attachments"));
    let Some(list) = list else {
        return Ok(None);
    };
    let items = list.as_array().ok_or_else(|| {
        CniError::new(
            codes::INVALID_CONFIG,
            "cni.dev/valid-attachments must be a list",
        )
    })?;
    let mut valid = HashSet::new();
    for it in items {
        let cid = it.get("containerID").and_then(Value::as_str);
        let ifname = it.get("ifname").and_then(Value::as_str);
        match (cid, ifname) {
            (Some(c), Some(i)) => {
                valid.insert(Owner::new(c, i));
            }
            _ => {
                return Err(CniError::new(
                    codes::INVALID_CONFIG,
                    format!(
                        "invalid attachment {it}: expected {{\"containerID\":..,\"ifname\":..}}"
                    ),
                ))
            }
        }
    }
    Ok(Some(valid))
}

/// The largest answer this ADD can give must fit a frame: checked before anything is configured,
/// since a pod set up behind an answer that cannot be sent would be left to the runtime's GC.
pub(crate) fn check_result_fits(req: &Request, dns: &Dns) -> Result<(), CniError> {
    let widest_if = |name: &str, sandbox: &str| Interface {
        name: name.to_string(),
        mac: "ff:ff:ff:ff:ff:ff".into(),
        mtu: Some(u32::MAX),
        sandbox: sandbox.to_string(),
    };
    let widest = CniResult {
        interfaces: vec![
            widest_if(&host_veth_name(&req.container_id, &req.ifname), ""),
            widest_if(&req.ifname, &req.netns),
        ],
        ips: vec![
            IpConfig {
                address: "255.255.255.255/32".into(),
                gateway: Some("255.255.255.255".into()),
                interface: Some(1),
            },
            IpConfig {
                address: "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff/128".into(),
                gateway: Some("ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff".into()),
                interface: Some(1),
            },
        ],
        routes: vec![
            Route {
                dst: "0.0.0.0/0".into(),
                gw: Some("255.255.255.255".into()),
            },
            Route {
                dst: "::/0".into(),
                gw: Some("ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff".into()),
            },
        ],
        dns: dns.clone(),
    };
    let answer = twill_proto::Response::Ok(Some(widest.to_json(req.cni_version())));
    twill_proto::encode_frame(&answer).map(|_| ()).map_err(|e| {
        CniError::new(
            codes::INVALID_CONFIG,
            format!("the ADD result would not fit the socket protocol ({e}); is \"dns\" in the configuration that large?"),
        )
    })
}

async fn add(ctx: &Ctx, req: &Request, peer_root: Option<PeerRoot>) -> Result<CniResult, CniError> {
    let node = ctx.node.borrow().clone().ok_or_else(|| {
        CniError::new(
            codes::TRY_AGAIN_LATER,
            "twilld not ready: this node has no pod subnet yet",
        )
    })?;
    require("CNI_CONTAINERID", &req.container_id)?;
    require("CNI_NETNS", &req.netns)?;
    require("CNI_IFNAME", &req.ifname)?;
    let dns = dns_of(&req.config)?;
    check_result_fits(req, &dns)?;
    // Who the pod is, for policy: bad arguments fail here, before anything is made.
    let identity = match &ctx.opts.policy {
        Some(p) => Some(
            pods::from_cni(attachment(req), &req.args, &req.config, p.node())
                .map_err(|e| CniError::new(codes::INVALID_CONFIG, e.to_string()))?,
        ),
        None => None,
    };
    let owner = owner_of(req);
    let _key = ctx.keys.lock(owner.clone()).await;

    let netns = open_netns(req, peer_root).await?;
    let gw = node.gateway().map(|g| g.addr());
    let gw6 = node.gateway6().map(|g| g.addr());
    let host = host_veth_name(&req.container_id, &req.ifname);
    // Two halves run at once: the node's (address, veth pair, hairpin) and the pod's, whose
    // thread enters the netns and opens its netlink socket while the veth is being created,
    // then waits for the address to configure the container end.
    let (go, addr_rx) = tokio::sync::oneshot::channel::<PodAddrs>();
    let ifname = req.ifname.clone();
    let ns = netns
        .try_clone()
        .map_err(|e| CniError::new(codes::IO_FAILURE, format!("duplicating the netns fd: {e}")))?;
    let pod_half = ctx.nl.in_netns(ns, req.netns.clone(), move |h| async move {
        let Ok((addr, addr6)) = addr_rx.await else {
            return Ok(None); // the node's half failed and undid itself
        };
        pod::configure_container(&h, &ifname, addr.zip(gw), addr6.zip(gw6))
            .await
            .map(Some)
    });
    let node_half = node_half(ctx, req, &node, &netns, &host, &owner, identity, go);
    let (node_res, pod_res) = tokio::join!(node_half, pod_half);
    let ((pod_addr, pod_addr6), fresh, host_mac) = node_res?;
    let (cont, routed) = match pod_res {
        Ok(Some(c)) => c,
        Ok(None) => {
            undo(ctx, Some(&host), &owner, &fresh).await;
            return Err(CniError::new(
                codes::INTERNAL,
                "the pod's half of ADD ended without its address",
            ));
        }
        Err(e) => {
            undo(ctx, Some(&host), &owner, &fresh).await;
            return Err(kernel_err(e));
        }
    };
    if let Some(p) = &ctx.opts.policy {
        p.add_done(attachment_of(&owner)).await;
    }
    let mut ips = Vec::new();
    // Only what this ADD configured: CHECK verifies the routes listed here.
    let mut routes = Vec::new();
    if let (Some(a4), Some(g4)) = (pod_addr, gw) {
        ips.push(IpConfig {
            address: a4.to_string(),
            gateway: Some(g4.to_string()),
            interface: Some(1),
        });
        if routed.v4 {
            routes.push(Route {
                dst: "0.0.0.0/0".into(),
                gw: Some(g4.to_string()),
            });
        }
    }
    if let (Some(a6), Some(g6)) = (pod_addr6, gw6) {
        ips.push(IpConfig {
            address: a6.to_string(),
            gateway: Some(g6.to_string()),
            interface: Some(1),
        });
        if routed.v6 {
            routes.push(Route {
                dst: "::/0".into(),
                gw: Some(g6.to_string()),
            });
        }
    }
    if (pod_addr.is_some() && !routed.v4) || (pod_addr6.is_some() && !routed.v6) {
        tracing::info!(container = %req.container_id, "the pod has a default route already; keeping it");
    }
    Ok(CniResult {
        interfaces: vec![
            Interface {
                name: host,
                mac: host_mac.to_string(),
                mtu: Some(node.mtu),
                sandbox: String::new(),
            },
            Interface {
                name: req.ifname.clone(),
                mac: cont.mac,
                mtu: Some(cont.mtu),
                sandbox: req.netns.clone(),
            },
        ],
        ips,
        routes,
        dns,
    })
}

/// A pod's addresses: one of each family the node serves (IPv4, IPv6 or both).
type PodAddrs = (Option<Ipv4Net>, Option<Ipv6Net>);

/// What one ADD allocated itself, as opposed to what an earlier ADD of the attachment holds
/// (a retried ADD finds those): a failure gives back exactly these, never a live pod's address.
#[derive(Clone, Debug, Default)]
struct Fresh {
    addrs: Vec<(IpNet, IpAddr)>,
    /// The attachment held no address before: no earlier ADD made it, so its policy goes too.
    whole: bool,
    /// What the attachment held before this ADD (in any subnet, also one the node had before).
    before: Vec<IpAddr>,
    /// This ADD's policy step succeeded: a later failure has the policy task undo it.
    programmed: bool,
}

/// The attachment's address in each of `nets`: the one it holds, or a new one. On failure,
/// what this call took goes back (not half an attachment).
fn allocate_all(
    ipam: &Ipam,
    nets: &[IpNet],
    owner: &Owner,
    network: &str,
) -> Result<(Vec<IpAddr>, Fresh), IpamError> {
    let mut before = ipam.held(owner);
    // IPv4 first, as the pod's record lists them when it is put back (its podIP).
    before.sort_by_key(IpAddr::is_ipv6);
    let mut addrs = Vec::with_capacity(nets.len());
    let mut fresh = Fresh {
        whole: before.is_empty(),
        before,
        ..Fresh::default()
    };
    for &net in nets {
        match ipam.allocate(net, owner, network) {
            Ok((a, new)) => {
                if new {
                    fresh.addrs.push((net.trunc(), a));
                }
                addrs.push(a);
            }
            Err(e) => {
                let _ = ipam.release_addrs(owner, &fresh.addrs);
                return Err(e);
            }
        }
    }
    Ok((addrs, fresh))
}

/// The addresses an ADD's policy record carries: the pod's, then any other the attachment
/// holds (a running pod's from before its node's subnet changed, which a retried ADD does not
/// give it): protected as long as IPAM keeps them this attachment's, until DEL.
fn record_ips(addrs: &[IpAddr], fresh: &Fresh) -> Vec<IpAddr> {
    let mut ips = addrs.to_vec();
    ips.extend(fresh.before.iter().filter(|a| !addrs.contains(a)));
    ips
}

/// The node's half of ADD: the addresses (IPAM) followed by the pod's network policy, at once
/// with the veth pair; then hairpin. Sends the pod's addresses through `go` once the container
/// end exists and policy is in place (before the pod's end gets them: no moment unprotected).
/// Undoes itself on failure. Returns the pod's addresses, which of them were allocated now (not
/// by an earlier ADD), and the host end's MAC.
#[allow(clippy::too_many_arguments)]
async fn node_half(
    ctx: &Ctx,
    req: &Request,
    node: &NodeNet,
    netns: &File,
    host: &str,
    owner: &Owner,
    identity: Option<pods::LocalPod>,
    go: tokio::sync::oneshot::Sender<PodAddrs>,
) -> Result<(PodAddrs, Fresh, MacAddr), CniError> {
    let ipam = ctx.ipam.clone();
    let (o, network) = (owner.clone(), network_of(req));
    let nets = node.nets();
    let mac = MacAddr::random_local();
    // The pod's MAC is chosen here, not by the kernel: its policy record binds its port to it.
    let pod_mac = pod_mac(&req.container_id, &req.ifname);
    // The addresses, then the pod's policy, while the veth pair is being made: the policy step
    // costs ADD nothing it would not wait for anyway.
    let alloc_and_policy = async {
        // The error, and what this ADD allocated itself.
        let (addrs, mut fresh) = blocking(move || allocate_all(&ipam, &nets, &o, &network))
            .await
            .map_err(|e| (e, Fresh::default()))?;
        if let (Some(policy), Some(pod)) = (&ctx.opts.policy, identity) {
            let pod = pod.with_mac(pod_mac);
            let ips = record_ips(&addrs, &fresh);
            if let Err(e) = policy_up(ctx, policy, pod.with_ips(&ips)).await {
                return Err((e, fresh.clone()));
            }
            fresh.programmed = true;
        }
        Ok((addrs, fresh))
    };
    let (alloc, created) = tokio::join!(
        alloc_and_policy,
        create_veth(ctx, req, node, netns, host, mac, pod_mac),
    );
    let (addrs, fresh) = match (alloc, created) {
        (Ok(a), Ok(())) => a,
        (alloc, created) => {
            // Ends the pod's half now: its thread must not hold a slot that undo may need.
            drop(go);
            // An address this ADD allocated goes back (and the pod's policy, if it got that far).
            let fresh = match &alloc {
                Ok((_, fresh)) | Err((_, fresh)) => fresh,
            };
            undo(ctx, created.is_ok().then_some(host), owner, fresh).await;
            // An IPAM or policy failure (e.g. subnet full) wins: it is what the runtime can
            // act on.
            return Err(match (alloc, created) {
                (Err((e, _)), _) | (_, Err(e)) => e,
                _ => unreachable!("one of them failed"),
            });
        }
    };
    let pod = with_lengths(&addrs, node);
    // The pod's half may already have failed (e.g. its netns vanished): that is reported there.
    let _ = go.send(pod);
    if let Err(e) = ctx.nl.set_hairpin(host).await {
        undo(ctx, Some(host), owner, &fresh).await;
        return Err(kernel_err(e));
    }
    Ok((pod, fresh, mac))
}

/// The pod's policy, before it gets its address. Another attachment holding the pod's name is
/// forgotten if its host veth is gone (its DEL never came: a crashed runtime, a reboot), and
/// the pod programmed then; one that is still there keeps the name, and this ADD fails.
async fn policy_up(ctx: &Ctx, policy: &PolicyHandle, pod: LocalPod) -> Result<(), CniError> {
    let mut result = policy.pod_up(pod.clone()).await;
    if let Err(PodUpError::Taken { by, .. }) = &result {
        let host = host_veth_name(&by.container_id, &by.ifname);
        // An ADD of the holder still running has its record before its veth: not gone.
        let running = ctx
            .keys
            .in_flight()
            .contains(&Owner::new(by.container_id.clone(), by.ifname.clone()));
        if !running && ctx.nl.link_by_name(&host).await.is_ok_and(|l| l.is_none()) {
            tracing::info!(container = %by.container_id, ifname = %by.ifname,
                "forgetting a pod whose interface is gone, for a new one of the same name");
            policy.pod_down(by.clone()).await;
            result = policy.pod_up(pod).await;
        }
    }
    result.map_err(|e| match e {
        PodUpError::NotReady(m) => CniError::new(codes::TRY_AGAIN_LATER, m),
        PodUpError::Failed(m) => CniError::new(codes::POLICY, m),
        e @ PodUpError::Taken { .. } => CniError::new(
            codes::TRY_AGAIN_LATER,
            format!("{e}, whose interface is still there: one pod name, one attachment (DEL that one first)"),
        ),
    })
}

/// Each family's address with the length of the node's subnet it was allocated from.
fn with_lengths(addrs: &[IpAddr], node: &NodeNet) -> PodAddrs {
    let mut pod: PodAddrs = (None, None);
    for a in addrs {
        match *a {
            IpAddr::V4(a) => {
                pod.0 = node
                    .subnet
                    .and_then(|s| Ipv4Net::new(a, s.prefix_len()).ok())
            }
            IpAddr::V6(a) => {
                pod.1 = node
                    .subnet6
                    .and_then(|s| Ipv6Net::new(a, s.prefix_len()).ok())
            }
        }
    }
    pod
}

/// The veth pair, on the node's bridge (ensured, or rechecked when the cached one is refused).
async fn create_veth(
    ctx: &Ctx,
    req: &Request,
    node: &NodeNet,
    netns: &File,
    host: &str,
    mac: MacAddr,
    pod_mac: MacAddr,
) -> Result<(), CniError> {
    let gw_net = (node.gateway(), node.gateway6());
    let bridge = ctx
        .bridge(gw_net, node.mtu, None)
        .await
        .map_err(kernel_err)?;
    let create = |bridge| {
        ctx.nl
            .create_veth(host, &req.ifname, netns, node.mtu, bridge, (mac, pod_mac))
    };
    let mut res = create(bridge).await;
    if matches!(&res, Err(e) if e.errno() != Some(libc::EEXIST)) {
        // The bridge may have been deleted or recreated since it was cached (the kernel then
        // refuses the whole pair): ensure it again and retry once.
        let bridge = ctx
            .bridge(gw_net, node.mtu, Some(bridge))
            .await
            .map_err(kernel_err)?;
        res = create(bridge).await;
    }
    let Err(e) = res else { return Ok(()) };
    // An existing CNI_IFNAME in the netns makes the creation fail with EEXIST (the container
    // end is created there under its final name): no separate look first.
    if e.errno() != Some(libc::EEXIST) {
        return Err(kernel_err(e));
    }
    let host_exists = matches!(ctx.nl.link_by_name(host).await, Ok(Some(_)));
    let msg = if host_exists {
        format!(
            "interface {} already exists for container {} (host end {host})",
            req.ifname, req.container_id
        )
    } else {
        format!("interface {} already exists in {}", req.ifname, req.netns)
    };
    Err(CniError::new(codes::INTERFACE_EXISTS, msg))
}

/// Takes back what a failed ADD built: the veth pair (deleting one end removes both, wherever
/// the other is), the pod's policy record (a running attachment's earlier one goes back) and
/// the addresses this ADD allocated. Failures are logged: the ADD's own error is the one the
/// runtime needs.
async fn undo(ctx: &Ctx, host: Option<&str>, owner: &Owner, fresh: &Fresh) {
    let mut release = true;
    if let Some(host) = host {
        if let Err(e) = ctx.nl.delete_link(host).await {
            // The pod's end may carry the address already: handing it out again would put it
            // on two pods. DEL (the runtime's, after a failed ADD) or GC releases it.
            tracing::error!(error = %e, %host, "removing the veth after a failed ADD; its addresses stay reserved until DEL or GC");
            release = false;
        }
    }
    // The policy step before the new addresses go back: the next pod to get one must not be
    // taken for this one.
    if let Some(p) = &ctx.opts.policy {
        if fresh.whole {
            // A new pod goes with its port (if that is still there, DEL or GC takes both).
            if release {
                p.add_undone(attachment_of(owner)).await;
            }
        } else if fresh.programmed && !p.add_failed(attachment_of(owner)).await {
            // Unanswered, its record may still name the new addresses: reserved, as above.
            tracing::error!("the policy task did not undo a failed ADD; its new addresses stay reserved until DEL or GC");
            release = false;
        }
    }
    if release && !fresh.addrs.is_empty() {
        let (ipam, owner, addrs) = (ctx.ipam.clone(), owner.clone(), fresh.addrs.clone());
        if let Err(e) = blocking(move || ipam.release_addrs(&owner, &addrs)).await {
            tracing::error!(error = %e.msg, "releasing the address after a failed ADD");
        }
    }
}

async fn del(ctx: &Ctx, req: &Request) -> Result<(), CniError> {
    require("CNI_CONTAINERID", &req.container_id)?;
    require("CNI_IFNAME", &req.ifname)?;
    let owner = owner_of(req);
    let _key = ctx.keys.lock(owner.clone()).await;
    let mut errors = Vec::new();
    // The pair goes from the host end: that works with CNI_NETNS empty (containerd) or gone,
    // and never removes a CNI_IFNAME in the netns that another container's ADD created.
    let host = host_veth_name(&req.container_id, &req.ifname);
    if let Err(e) = ctx.nl.delete_link(&host).await {
        // The pod may still use its addresses on that veth: released now, they could go to
        // another pod while this one runs. The runtime retries a failed DEL; GC does the same.
        return Err(CniError::new(
            codes::KERNEL,
            format!("DEL incomplete: {e}; the pod's addresses stay reserved until a DEL succeeds"),
        ));
    }
    if let Some(p) = &ctx.opts.policy {
        p.pod_down(attachment_of(&owner)).await;
    }
    // Its flows go before its addresses: once released, an address may go to the next pod.
    super::flows::forget(ctx.ipam.held(&owner)).await;
    let ipam = ctx.ipam.clone();
    if let Err(e) = blocking(move || ipam.release(&owner)).await {
        errors.push(e.msg);
    }
    // A pod from before the node moved from flannel: its addresses are host-local's. Only
    // those inside the node's subnets are ours (other networks use host-local too).
    let node = ctx.node.borrow().clone();
    let nets = node.as_ref().map_or_else(Vec::new, NodeNet::nets);
    if node.is_none() {
        // Before the subnets are known (twilld starting): acknowledging now would leave such a
        // reservation behind for good. The runtime retries; twill's own release above stands.
        let (hl, cid, ifname) = (
            ctx.host_local.clone(),
            req.container_id.clone(),
            req.ifname.clone(),
        );
        if offload(move || hl.holds_any(&cid, &ifname)).await? {
            return Err(CniError::new(
                codes::TRY_AGAIN_LATER,
                "twilld not ready: host-local holds an address for this pod (from before the \
                 node moved from flannel), released once this node's pod subnet is known",
            ));
        }
    }
    if !nets.is_empty() {
        let (hl, cid, ifname) = (
            ctx.host_local.clone(),
            req.container_id.clone(),
            req.ifname.clone(),
        );
        let released = tokio::task::spawn_blocking(move || {
            let mut all = Vec::new();
            for net in nets {
                all.extend(hl.release(net, &cid, &ifname)?);
            }
            Ok::<_, std::io::Error>(all)
        })
        .await;
        match released {
            Ok(Ok(a)) if !a.is_empty() => {
                tracing::info!(addresses = ?a, "released host-local's reservation (a pod from before flannel moved out)");
                super::flows::forget(a).await;
            }
            Ok(Ok(_)) => {}
            Ok(Err(e)) => errors.push(format!("releasing host-local's reservation: {e}")),
            Err(e) => errors.push(format!("host-local task failed: {e}")),
        }
    }
    if errors.is_empty() {
        Ok(())
    } else {
        Err(CniError::new(
            codes::KERNEL,
            format!("DEL incomplete: {}", errors.join("; ")),
        ))
    }
}

async fn check(ctx: &Ctx, req: &Request, peer_root: Option<PeerRoot>) -> Result<(), CniError> {
    require("CNI_CONTAINERID", &req.container_id)?;
    require("CNI_NETNS", &req.netns)?;
    require("CNI_IFNAME", &req.ifname)?;
    let want = expected_of(req)?;

    let mut missing = Vec::new();
    let held = ctx.ipam.held(&owner_of(req));
    for a in &want.addrs {
        if !held.contains(&a.addr()) {
            missing.push(format!(
                "IPAM allocation of {} for this container",
                a.addr()
            ));
        }
    }
    let host = host_veth_name(&req.container_id, &req.ifname);
    match ctx.nl.link_by_name(&host).await.map_err(kernel_err)? {
        None => missing.push(format!("host veth {host}")),
        Some(l) => {
            let br = ctx
                .nl
                .link_by_name(&ctx.opts.bridge)
                .await
                .map_err(kernel_err)?;
            if br.is_none() || l.controller != br.map(|b| b.index) {
                missing.push(format!("host veth {host} on bridge {}", ctx.opts.bridge));
            }
        }
    }
    let w = want.clone();
    let netns = open_netns(req, peer_root).await?;
    let in_ns = ctx
        .nl
        .in_netns(netns, req.netns.clone(), move |h| async move {
            pod::check_container(&h, &w).await
        })
        .await
        .map_err(kernel_err)?;
    missing.extend(in_ns);
    if missing.is_empty() {
        Ok(())
    } else {
        Err(CniError::new(
            codes::CHECK_FAILED,
            format!(
                "CHECK failed for {} in {}: missing {}",
                req.ifname,
                req.netns,
                missing.join(", ")
            ),
        ))
    }
}

async fn gc(ctx: &Ctx, req: &Request) -> Result<(), CniError> {
    // No list is not "nothing is valid": without it we cannot know, so release nothing.
    let Some(mut valid) = valid_attachments(&req.config)? else {
        return Ok(());
    };
    // An ADD still running is not in the runtime's list yet; GC must not pull it from under it.
    // One that begins after this look allocates after the mark, and is left alone by that.
    let mark = ctx.ipam.gc_mark();
    valid.extend(ctx.keys.in_flight());
    // Only this network's attachments: another conflist naming twill has its own list.
    let network = network_of(req);
    let mut stale: HashMap<Owner, Vec<Claim>> = HashMap::new();
    let ipam = ctx.ipam.clone();
    for c in offload(move || ipam.gc_candidates(&network, &valid, mark)).await? {
        stale.entry(c.owner.clone()).or_default().push(c);
    }
    // Each attachment under its key lock, like ADD and DEL; one whose ADD or DEL ran since GC
    // looked is no longer what GC saw and is left alone. Its leaked host veth (the pod netns
    // still alive) goes first. Several at once: each delete waits for an RCU grace
    // period, and concurrent ones share it (see delete_link); bounded, as each has a thread.
    let results: Vec<Result<usize, CniError>> = futures::stream::iter(stale)
        .map(|(owner, claims)| async move {
            let _key = ctx.keys.lock(owner.clone()).await;
            let (ipam, seen) = (ctx.ipam.clone(), claims.clone());
            if !offload(move || seen.iter().all(|c| ipam.unchanged(c))).await? {
                return Ok(0);
            }
            if !owner.container_id.is_empty() {
                let host = host_veth_name(&owner.container_id, &owner.ifname);
                if let Err(e) = ctx.nl.delete_link(&host).await {
                    // Its pod may still use the address: keep it for the next GC to retry,
                    // rather than hand it out twice.
                    tracing::warn!(error = %e, %host, "GC: cannot remove a stale veth; keeping its address");
                    return Ok(0);
                }
            }
            if let Some(p) = &ctx.opts.policy {
                p.pod_down(attachment_of(&owner)).await;
            }
            // Flows before addresses, as in DEL.
            super::flows::forget(claims.iter().map(|c| c.addr).collect()).await;
            let ipam = ctx.ipam.clone();
            blocking(move || {
                let mut n = 0;
                for c in &claims {
                    n += usize::from(ipam.release_claim(c)?);
                }
                Ok(n)
            })
            .await
        })
        .buffer_unordered(GC_PARALLEL)
        .collect()
        .await;
    let freed: usize = results.iter().flatten().sum();
    if freed > 0 {
        tracing::info!(count = freed, "GC released stale pod addresses");
    }
    if let Some(Err(e)) = results.into_iter().find(Result::is_err) {
        return Err(e);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pod_macs_are_stable_unicast_and_locally_administered() {
        let m = pod_mac("abc", "eth0");
        assert_eq!(m, pod_mac("abc", "eth0"));
        assert_ne!(m, pod_mac("abc", "eth1"));
        assert_ne!(m, pod_mac("abd", "eth0"));
        for id in ["a", "b", "c", "0123456789abcdef"] {
            let o = pod_mac(id, "eth0").octets();
            assert_eq!(o[0] & 0x03, 0x02, "{o:?}");
        }
    }

    /// A retried ADD of an attachment that holds an address in the node's earlier subnet is
    /// not a new attachment: its failure must not drop the running pod's policy record.
    #[test]
    fn an_attachment_with_an_address_from_an_earlier_subnet_is_not_whole() {
        struct Gone(std::path::PathBuf);
        impl Drop for Gone {
            fn drop(&mut self) {
                let _ = std::fs::remove_dir_all(&self.0);
            }
        }
        let dir = Gone(std::env::temp_dir().join(format!(
            "twill-ops-fresh-{}-{}",
            std::process::id(),
            rand::random::<u32>()
        )));
        let ipam = Ipam::open(&dir.0).unwrap();
        let (old, new): (IpNet, IpNet) = (
            "10.244.1.0/24".parse().unwrap(),
            "10.244.9.0/24".parse().unwrap(),
        );
        let pod = Owner::new("c1", "eth0");
        let (first, fresh) = allocate_all(&ipam, &[old], &pod, "net").unwrap();
        assert!(fresh.whole && fresh.before.is_empty(), "{fresh:?}");
        assert_eq!(record_ips(&first, &fresh), first);
        // The same ADD again: nothing new, the record is the pod's addresses.
        let (again, fresh) = allocate_all(&ipam, &[old], &pod, "net").unwrap();
        assert_eq!(again, first);
        assert!(!fresh.whole && fresh.addrs.is_empty(), "{fresh:?}");
        assert_eq!(record_ips(&again, &fresh), first);
        // The node's subnet changed: a new address, but the attachment is not new, and its
        // record keeps the running pod's address while the ADD runs.
        let (moved, fresh) = allocate_all(&ipam, &[new], &pod, "net").unwrap();
        assert!(new.contains(&moved[0]));
        assert!(!fresh.whole, "{fresh:?}");
        assert_eq!(fresh.before, first);
        assert_eq!(fresh.addrs, vec![(new, moved[0])]);
        assert_eq!(record_ips(&moved, &fresh), vec![moved[0], first[0]]);
        // Once more (the failed ADD's new address kept, its record not put back): nothing new,
        // and the record still has the address the pod runs with.
        let (again, fresh) = allocate_all(&ipam, &[new], &pod, "net").unwrap();
        assert_eq!(again, moved);
        assert!(!fresh.whole && fresh.addrs.is_empty(), "{fresh:?}");
        let mut ips = record_ips(&again, &fresh);
        assert_eq!(ips[0], moved[0]);
        ips.sort();
        let mut want = vec![first[0], moved[0]];
        want.sort();
        assert_eq!(ips, want);
        // Another attachment is whole.
        let (_, other) = allocate_all(&ipam, &[new], &Owner::new("c2", "eth0"), "net").unwrap();
        assert!(other.whole, "{other:?}");
    }

    #[test]
    fn host_veth_names_are_stable_and_short() {
        let a = host_veth_name("abc", "eth0");
        assert_eq!(a, host_veth_name("abc", "eth0"));
        assert_ne!(a, host_veth_name("abc", "eth1"));
        assert_ne!(host_veth_name("ab", "ceth0"), host_veth_name("abc", "eth0"));
        assert!(a.len() <= 15 && a.starts_with("tw"), "{a}");
        assert!(is_host_veth_name(&a), "{a}");
        for not in [
            "tw",
            "garbage",
            "tw0123456789aG",
            "tw0123456789abc",
            "xx0123456789ab",
        ] {
            assert!(!is_host_veth_name(not), "{not}");
        }
    }

    #[test]
    fn each_family_gets_its_subnets_length() {
        let node = |subnet: Option<&str>, subnet6: Option<&str>| NodeNet {
            subnet: subnet.map(|s| s.parse().unwrap()),
            subnet6: subnet6.map(|s| s.parse().unwrap()),
            mtu: 1450,
        };
        let (a4, a6): (IpAddr, IpAddr) = (
            "10.5.3.7".parse().unwrap(),
            "fd00:0:0:3::7".parse().unwrap(),
        );
        let dual = node(Some("10.5.3.0/24"), Some("fd00:0:0:3::/64"));
        let want4 = Some("10.5.3.7/24".parse().unwrap());
        let want6 = Some("fd00:0:0:3::7/64".parse().unwrap());
        assert_eq!(with_lengths(&[a4, a6], &dual), (want4, want6));
        // The order IPAM returns them in does not matter.
        assert_eq!(with_lengths(&[a6, a4], &dual), (want4, want6));
        assert_eq!(
            with_lengths(&[a6], &node(None, Some("fd00:0:0:3::/64"))),
            (None, want6)
        );
        assert_eq!(
            with_lengths(&[a4], &node(Some("10.5.3.0/24"), None)),
            (want4, None)
        );
    }
}
