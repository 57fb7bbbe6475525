//! Orchestration: wires the registry (leases), the backend (kernel) and the CNI server together,
//! and keeps the kernel in line with the leases: at start, on lease events, on kernel events and
//! every resync interval.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use ipnet::Ipv4Net;
use serde::Serialize;
use tokio::sync::{mpsc, watch};
use tracing::{debug, error, info, warn};

use crate::backend::offload;
use crate::backend::vxlan::VxlanBackend;
use crate::backend::{ApplyStats, Backend, BackendError, DeviceInfo, LocalNode};
use crate::cli::RunArgs;
use crate::cni::{CniOptions, NodeNet};
use crate::config::{ConfigError, NetworkConfig};
use crate::lease::LeaseAttrs;
use crate::mac::MacAddr;
use crate::metrics::Metrics;
use crate::netlink::{KernelEvent, Netlink, NetlinkError, Underlay};
use crate::peer::Peer;
use crate::reconcile::PeerChange;
use crate::registry::etcd::EtcdRegistry;
use crate::registry::{self, EtcdOptions, OwnLease, PeerEvent, RegistryError};
use crate::subnet_file::{read_previous_subnet, SubnetEnv};

/// Kernel events arrive in bursts (a hand `ip route flush`); collapse them. Our own deletions
/// are filtered out before they become events (see `netlink::own`).
const EVENT_DEBOUNCE: Duration = Duration::from_millis(300);
/// How often to repeat "still waiting for the network config".
const CONFIG_WAIT_LOG_EVERY: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("state dir {dir}: {err}")]
    State { dir: String, err: std::io::Error },
    #[error("netlink: {0}")]
    Netlink(#[from] NetlinkError),
    #[error(transparent)]
    Backend(#[from] BackendError),
    #[error("{0}")]
    Registry(#[from] RegistryError),
    #[error("cannot serve HTTP on {addr}: {err}")]
    Http { addr: String, err: std::io::Error },
    #[error("cannot serve the CNI socket {path}: {err}")]
    Cni { path: String, err: std::io::Error },
    /// A task that runs for the daemon's lifetime ended (it can only panic): exit, so the
    /// service manager restarts twilld, rather than run half a daemon.
    #[error("internal error: the {0} stopped")]
    TaskEnded(&'static str),
}

/// What /status shows. Updated by the main loop, read by the HTTP server.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Status {
    pub ready: bool,
    /// Why the node is not ready yet, when it is not.
    pub waiting_for: Option<String>,
    pub network: Option<Ipv4Net>,
    pub node: Option<NodeStatus>,
    pub peers: Vec<PeerStatus>,
    pub last_reconcile: Option<ReconcileStatus>,
}

#[derive(Clone, Debug, Serialize)]
pub struct NodeStatus {
    pub subnet: Ipv4Net,
    pub public_ip: Ipv4Addr,
    pub vtep_mac: MacAddr,
    pub underlay: String,
    pub device: String,
    pub mtu: u32,
    /// The device's transmit checksum offload (`--vxlan-checksum-offload`), if known.
    pub tx_checksum_offload: Option<bool>,
}

#[derive(Clone, Debug, Serialize)]
pub struct PeerStatus {
    pub subnet: Ipv4Net,
    pub public_ip: Ipv4Addr,
    pub vtep_mac: MacAddr,
    /// True when the last kernel operation covering this peer succeeded.
    pub programmed: bool,
}

#[derive(Clone, Debug, Serialize)]
pub struct ReconcileStatus {
    pub at_unix_ms: u64,
    pub duration_ms: f64,
    pub added: u64,
    pub removed: u64,
    pub failed: u64,
}

/// State shared between the main loop and the HTTP server.
#[derive(Default)]
pub struct Shared {
    pub metrics: Arc<Metrics>,
    pub status: RwLock<Status>,
}

impl Shared {
    fn update(&self, f: impl FnOnce(&mut Status)) {
        f(&mut self.status.write().unwrap_or_else(|e| e.into_inner()));
    }

    pub fn snapshot(&self) -> Status {
        self.status
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

/// Runs the daemon until SIGTERM/SIGINT. Returns Err only for problems that need the operator
/// (invalid config, unusable state dir, no underlay); transient etcd trouble is waited out.
pub async fn run(args: RunArgs) -> Result<(), StartError> {
    let shared = Arc::new(Shared::default());
    shared.update(|s| s.waiting_for = Some("etcd".into()));
    crate::http::spawn(args.http_addr, shared.clone())
        .await
        .map_err(|err| StartError::Http {
            addr: args.http_addr.to_string(),
            err,
        })?;

    let (node_tx, node_rx) = watch::channel::<Option<NodeNet>>(None);
    let cni_opts = CniOptions {
        socket: args.cni_socket.clone(),
        bridge: args.bridge.clone(),
        state_dir: args.state_dir.clone(),
        host_local_dir: (!args.host_local_dir.as_os_str().is_empty())
            .then(|| args.host_local_dir.clone()),
    };
    let cni_metrics = shared.metrics.clone();
    let cni_path = args.cni_socket.display().to_string();
    let cni = tokio::spawn(async move { crate::cni::serve(cni_opts, node_rx, cni_metrics).await });

    let vtep_mac = crate::state::load_or_create_vtep_mac(&args.state_dir).map_err(|err| {
        StartError::State {
            dir: args.state_dir.display().to_string(),
            err,
        }
    })?;

    let nl = Netlink::new()?;
    let mut underlay = nl.find_underlay(args.iface.as_ref()).await?;
    let public_ip = args.public_ip.unwrap_or(underlay.addr);
    info!(iface = %underlay.name, addr = %underlay.addr, mtu = underlay.mtu, %public_ip, %vtep_mac, "underlay");

    let reg = EtcdRegistry::connect(&EtcdOptions {
        endpoints: args.etcd_endpoints.clone(),
        prefix: args.etcd_prefix.clone(),
        ca_file: args.etcd_cafile.clone(),
        cert_file: args.etcd_certfile.clone(),
        key_file: args.etcd_keyfile.clone(),
    })
    .await?;

    let cfg = tokio::select! {
        cfg = wait_for_config(&reg, &args.etcd_prefix, &shared) => cfg?,
        _ = shutdown_signal() => { info!("shutting down before the node was ready"); return Ok(()); }
    };
    info!(network = %cfg.network, subnet_len = cfg.subnet_len, vni = cfg.backend.vni, "network config");
    shared.update(|s| {
        s.network = Some(cfg.network);
        s.waiting_for = Some("subnet lease".into());
    });

    let attrs = LeaseAttrs {
        public_ip,
        vni: cfg.backend.vni,
        vtep_mac,
    };
    let previous = read_previous_subnet(&args.subnet_file);
    let own = tokio::select! {
        own = acquire_until_done(&reg, &cfg, &attrs, previous, args.lease_ttl) => own,
        _ = shutdown_signal() => { info!("shutting down before the node was ready"); return Ok(()); }
    };
    info!(subnet = %own.subnet, "lease acquired");

    let release = offload::kernel_release();
    let tx_checksum = args.vxlan_checksum_offload.resolve(&release);
    info!(kernel = %release, setting = ?args.vxlan_checksum_offload, enforced = ?tx_checksum, "vxlan tx checksum offload");
    let mut backend = VxlanBackend::new(nl.clone(), &cfg.backend, tx_checksum);
    let mut local = LocalNode {
        subnet: own.subnet,
        public_ip,
        underlay_index: underlay.index,
        underlay_mtu: underlay.mtu,
        vtep_mac,
    };
    let mut device = backend.setup(&local).await?;
    info!(device = %device.name, ifindex = device.ifindex, mtu = device.mtu, "overlay device ready");
    set_node_status(&shared, &local, &underlay, &device);

    // Background tasks: lease keeper and peer watcher.
    let (attrs_tx, attrs_rx) = watch::channel(attrs.clone());
    let (own_tx, mut own_rx) = watch::channel(own.clone());
    tokio::spawn(registry::keep_lease(
        reg.clone(),
        cfg.clone(),
        own.clone(),
        args.lease_ttl,
        attrs_rx,
        own_tx,
        shared.metrics.clone(),
    ));
    let (peer_tx, mut peer_rx) = mpsc::channel::<PeerEvent>(4096);
    tokio::spawn(registry::watch_peers(
        reg.clone(),
        cfg.clone(),
        own_rx.clone(),
        peer_tx,
        shared.metrics.clone(),
    ));

    let mut kernel_rx = nl.subscribe(device.ifindex)?;
    let mut sync = Sync {
        desired: BTreeMap::new(),
        unprogrammed: BTreeSet::new(),
        reconcile_failed: false,
        listed: false,
        synced_once: false,
    };
    let mut subscribed = device.ifindex;

    let mut resync = tokio::time::interval(args.resync_interval);
    resync.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    resync.tick().await;
    let shutdown = shutdown_signal();
    tokio::pin!(shutdown);
    let mut cni = cni;
    let mut ready = false;
    // Pending kernel events: when to act on them, and whether an address changed.
    let mut kernel_deadline: Option<tokio::time::Instant> = None;
    let mut addr_changed = false;

    loop {
        tokio::select! {
            _ = &mut shutdown => {
                info!("SIGTERM: exiting; kernel entries and the lease stay in place");
                return Ok(());
            }
            res = &mut cni => {
                // The CNI server only returns when its socket cannot be served at all.
                let err = match res {
                    Ok(Err(e)) => e,
                    Ok(Ok(())) => std::io::Error::other("CNI server stopped"),
                    Err(e) => std::io::Error::other(e.to_string()),
                };
                return Err(StartError::Cni { path: cni_path, err });
            }
            ev = peer_rx.recv() => {
                let Some(ev) = ev else { return Err(StartError::TaskEnded("peer watcher")) };
                let mut batch = vec![ev];
                while let Ok(ev) = peer_rx.try_recv() {
                    batch.push(ev);
                }
                sync.handle_events(&mut backend, &mut device, &local, batch, &shared).await;
            }
            changed = own_rx.changed() => {
                if changed.is_err() { return Err(StartError::TaskEnded("lease keeper")); }
                let new = own_rx.borrow_and_update().clone();
                if new.subnet != local.subnet {
                    warn!(old = %local.subnet, new = %new.subnet, "our lease moved to another subnet");
                    local.subnet = new.subnet;
                    device = setup_or_log(&mut backend, &local, device).await;
                    set_node_status(&shared, &local, &underlay, &device);
                    if ready {
                        ready = write_ready(&args, &cfg, &local, &device, &node_tx, &shared);
                    }
                }
            }
            Some(ev) = kernel_rx.recv() => {
                addr_changed |= ev == KernelEvent::AddressChanged;
                // Collapse a burst: act once it has been quiet for a moment. A deadline in this
                // select, not a wait here, so lease events keep flowing meanwhile.
                kernel_deadline.get_or_insert_with(|| tokio::time::Instant::now() + EVENT_DEBOUNCE);
            }
            _ = sleep_until_opt(kernel_deadline), if kernel_deadline.is_some() => {
                kernel_deadline = None;
                if std::mem::take(&mut addr_changed) && args.public_ip.is_none() {
                    match nl.find_underlay(args.iface.as_ref()).await {
                        Ok(u) if u.addr != local.public_ip || u.index != local.underlay_index => {
                            info!(old = %local.public_ip, new = %u.addr, iface = %u.name, "underlay address changed");
                            local.public_ip = u.addr;
                            local.underlay_index = u.index;
                            local.underlay_mtu = u.mtu;
                            attrs_tx.send_modify(|a| a.public_ip = u.addr);
                            underlay = u;
                        }
                        Ok(_) => {}
                        Err(e) => warn!(error = %e, "underlay lookup after an address change failed"),
                    }
                }
                device = setup_or_log(&mut backend, &local, device).await;
                set_node_status(&shared, &local, &underlay, &device);
                if sync.listed {
                    sync.reconcile(&mut backend, &mut device, &local, &shared, "kernel event").await;
                }
            }
            _ = resync.tick() => {
                // Also retries a first reconcile that failed: until one succeeds the node is
                // not ready.
                if sync.listed {
                    sync.reconcile(&mut backend, &mut device, &local, &shared, "periodic").await;
                }
            }
        }
        // Whichever path recreated the device, events must follow the new one.
        if device.ifindex != subscribed {
            match nl.subscribe(device.ifindex) {
                Ok(rx) => {
                    kernel_rx = rx;
                    subscribed = device.ifindex;
                }
                Err(e) => warn!(error = %e, "re-subscribing to kernel events failed"),
            }
        }
        // Ready once the peers have been listed and programmed once, and the subnet file is
        // written (a failed write is retried on the next pass).
        if !ready && sync.synced_once {
            ready = write_ready(&args, &cfg, &local, &device, &node_tx, &shared);
        }
    }
}

/// Desired state (the peers from the leases) and how far the kernel is known to match it.
struct Sync {
    desired: BTreeMap<Ipv4Net, Peer>,
    /// Peers whose entries the kernel refused: not "programmed" until a batch that touches
    /// them succeeds (every reconcile retries them).
    unprogrammed: BTreeSet<Ipv4Net>,
    /// The last reconcile failed as a whole: no peer is known to be programmed.
    reconcile_failed: bool,
    /// A snapshot of the leases arrived: `desired` is complete and worth reconciling against.
    listed: bool,
    /// A full reconcile succeeded at least once.
    synced_once: bool,
}

impl Sync {
    async fn handle_events<B: Backend>(
        &mut self,
        backend: &mut B,
        device: &mut DeviceInfo,
        local: &LocalNode,
        batch: Vec<PeerEvent>,
        shared: &Shared,
    ) {
        let changes = match fold_events(&mut self.desired, batch) {
            Folded::Full => {
                self.listed = true;
                self.reconcile(backend, device, local, shared, "lease resync")
                    .await;
                return;
            }
            Folded::Changes(c) => c,
        };
        if changes.is_empty() {
            return;
        }
        for c in &changes {
            match (&c.old, &c.new) {
                (None, Some(p)) => {
                    info!(subnet = %p.subnet, public_ip = %p.public_ip, mac = %p.vtep_mac, "peer added")
                }
                (Some(p), None) => info!(subnet = %p.subnet, "peer removed"),
                (_, Some(p)) => {
                    info!(subnet = %p.subnet, public_ip = %p.public_ip, mac = %p.vtep_mac, "peer changed")
                }
                _ => {}
            }
        }
        let applied = backend.apply(&changes).await;
        match applied {
            Ok(stats) => {
                self.record(&stats, shared);
                for c in &changes {
                    for p in c.old.iter().chain(c.new.iter()) {
                        self.unprogrammed.remove(&p.subnet);
                    }
                }
                self.unprogrammed.extend(stats.unprogrammed.iter().copied());
            }
            Err(e) => {
                warn!(error = %e, "programming peers failed; repairing with a full reconcile");
                self.reconcile(backend, device, local, shared, "apply failed")
                    .await;
            }
        }
        self.publish(shared);
    }

    async fn reconcile<B: Backend>(
        &mut self,
        backend: &mut B,
        device: &mut DeviceInfo,
        local: &LocalNode,
        shared: &Shared,
        why: &str,
    ) {
        let desired: Vec<Peer> = self.desired.values().copied().collect();
        let start = Instant::now();
        let mut res = backend.reconcile(&desired).await;
        if matches!(res, Err(BackendError::DeviceGone(_))) {
            warn!("overlay device vanished; recreating it");
            *device = setup_or_log(backend, local, device.clone()).await;
            res = backend.reconcile(&desired).await;
        }
        let elapsed = start.elapsed();
        let m = &shared.metrics;
        Metrics::inc(&m.reconciles);
        m.last_reconcile_micros
            .store(elapsed.as_micros() as u64, Relaxed);
        m.reconcile_micros_total
            .fetch_add(elapsed.as_micros() as u64, Relaxed);
        match res {
            Ok(stats) => {
                if stats.added + stats.removed + stats.failed > 0 {
                    info!(
                        why,
                        added = stats.added,
                        removed = stats.removed,
                        failed = stats.failed,
                        peers = desired.len(),
                        "reconciled"
                    );
                } else {
                    debug!(why, peers = desired.len(), "reconciled: kernel in sync");
                }
                self.record(&stats, shared);
                self.unprogrammed = stats.unprogrammed.iter().copied().collect();
                self.reconcile_failed = false;
                self.synced_once = true;
                let at_unix_ms = SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .map(|d| d.as_millis() as u64)
                    .unwrap_or(0);
                shared.update(|s| {
                    s.last_reconcile = Some(ReconcileStatus {
                        at_unix_ms,
                        duration_ms: elapsed.as_secs_f64() * 1e3,
                        added: stats.added,
                        removed: stats.removed,
                        failed: stats.failed,
                    })
                });
            }
            Err(e) => {
                error!(why, error = %e, "reconcile failed; will retry");
                self.reconcile_failed = true;
            }
        }
        self.publish(shared);
    }

    fn record(&self, stats: &ApplyStats, shared: &Shared) {
        let m = &shared.metrics;
        m.kernel_entries_added.fetch_add(stats.added, Relaxed);
        m.kernel_entries_removed.fetch_add(stats.removed, Relaxed);
        m.kernel_entry_failures.fetch_add(stats.failed, Relaxed);
    }

    fn publish(&self, shared: &Shared) {
        shared
            .metrics
            .peers
            .store(self.desired.len() as u64, Relaxed);
        let peers = self
            .desired
            .values()
            .map(|p| PeerStatus {
                subnet: p.subnet,
                public_ip: p.public_ip,
                vtep_mac: p.vtep_mac,
                programmed: !self.reconcile_failed && !self.unprogrammed.contains(&p.subnet),
            })
            .collect();
        shared.update(|s| s.peers = peers);
    }
}

/// What a batch of peer events asks for.
#[derive(Debug, PartialEq, Eq)]
pub enum Folded {
    /// A snapshot arrived: compare everything with the kernel.
    Full,
    /// Incremental: one change per subnet whose value differs from before the batch.
    Changes(Vec<PeerChange>),
}

/// Applies a batch of peer events to `desired`. Several events for one subnet make one change
/// (first old value, last new value), so applying the changes in phases stays correct.
pub fn fold_events(desired: &mut BTreeMap<Ipv4Net, Peer>, batch: Vec<PeerEvent>) -> Folded {
    // A snapshot in the batch supersedes everything before it.
    let start = batch
        .iter()
        .rposition(|e| matches!(e, PeerEvent::Snapshot(_)));
    let mut full = false;
    let mut before: BTreeMap<Ipv4Net, Option<Peer>> = BTreeMap::new();
    for ev in batch.into_iter().skip(start.unwrap_or(0)) {
        match ev {
            PeerEvent::Snapshot(peers) => {
                *desired = peers.into_iter().map(|p| (p.subnet, p)).collect();
                full = true;
            }
            PeerEvent::Upsert(p) => {
                let old = desired.insert(p.subnet, p);
                before.entry(p.subnet).or_insert(old);
            }
            PeerEvent::Remove(net) => {
                let old = desired.remove(&net);
                before.entry(net).or_insert(old);
            }
        }
    }
    if full {
        return Folded::Full;
    }
    Folded::Changes(
        before
            .into_iter()
            .filter_map(|(net, old)| {
                let new = desired.get(&net).copied();
                (old != new).then_some(PeerChange { old, new })
            })
            .collect(),
    )
}

async fn setup_or_log<B: Backend>(
    backend: &mut B,
    local: &LocalNode,
    current: DeviceInfo,
) -> DeviceInfo {
    match backend.setup(local).await {
        Ok(d) => d,
        Err(e) => {
            error!(error = %e, "setting up the overlay device failed; will retry");
            current
        }
    }
}

fn set_node_status(shared: &Shared, local: &LocalNode, underlay: &Underlay, device: &DeviceInfo) {
    shared.update(|s| {
        s.node = Some(NodeStatus {
            subnet: local.subnet,
            public_ip: local.public_ip,
            vtep_mac: local.vtep_mac,
            underlay: underlay.name.clone(),
            device: device.name.clone(),
            mtu: device.mtu,
            tx_checksum_offload: device.tx_checksum,
        })
    });
}

/// The node is ready: tell the CNI server and write the subnet file (only now, so that pods
/// never start against a half-set-up node: flannel #2232). Returns whether the file is written.
fn write_ready(
    args: &RunArgs,
    cfg: &NetworkConfig,
    local: &LocalNode,
    device: &DeviceInfo,
    node_tx: &watch::Sender<Option<NodeNet>>,
    shared: &Shared,
) -> bool {
    let _ = node_tx.send(Some(NodeNet {
        subnet: local.subnet,
        mtu: device.mtu,
    }));
    let env = SubnetEnv {
        network: cfg.network,
        subnet: local.subnet,
        mtu: device.mtu,
        ipmasq: false,
    };
    match env.write(&args.subnet_file) {
        Ok(()) => {
            info!(file = %args.subnet_file.display(), subnet = %local.subnet, "node ready");
            shared.update(|s| {
                s.ready = true;
                s.waiting_for = None;
            });
            true
        }
        Err(e) => {
            error!(file = %args.subnet_file.display(), error = %e, "cannot write the subnet file; not ready, will retry");
            shared.update(|s| {
                s.ready = false;
                s.waiting_for = Some(format!("subnet file: {e}"))
            });
            false
        }
    }
}

/// Polls `<prefix>/config` until it exists. Invalid config is fatal: it needs the operator.
async fn wait_for_config(
    reg: &EtcdRegistry,
    prefix: &str,
    shared: &Shared,
) -> Result<NetworkConfig, StartError> {
    let key = format!("{}/config", prefix.trim_end_matches('/'));
    let mut last_log: Option<Instant> = None;
    let mut backoff = Duration::from_millis(500);
    loop {
        let waiting = match reg.get_config().await {
            Ok(Some(bytes)) => {
                return NetworkConfig::parse(&bytes).map_err(|e| {
                    error!(key = %key, error = %e, "refusing to start");
                    StartError::Config(e)
                })
            }
            Ok(None) => {
                backoff = Duration::from_millis(500);
                format!("network config: waiting for key {key} in etcd")
            }
            Err(e) => {
                Metrics::inc(&shared.metrics.etcd_reconnects);
                backoff = (backoff * 2).min(Duration::from_secs(10));
                format!("etcd: {e}")
            }
        };
        if last_log.is_none_or(|t| t.elapsed() >= CONFIG_WAIT_LOG_EVERY) {
            warn!("{waiting}");
            last_log = Some(Instant::now());
        }
        shared.update(|s| s.waiting_for = Some(waiting));
        tokio::time::sleep(backoff).await;
    }
}

/// Keeps trying to acquire: an etcd outage or full subnet range is logged and retried, because
/// leases expire and operators fix things; exiting would only make a crash loop.
async fn acquire_until_done(
    reg: &EtcdRegistry,
    cfg: &NetworkConfig,
    attrs: &LeaseAttrs,
    previous: Option<Ipv4Net>,
    ttl: Duration,
) -> OwnLease {
    let mut backoff = Duration::from_millis(500);
    loop {
        match registry::acquire(reg, cfg, attrs, previous, ttl).await {
            Ok(own) => return own,
            Err(e) => {
                error!(error = %e, retry_in = ?backoff, "cannot acquire a subnet lease");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(30));
            }
        }
    }
}

async fn sleep_until_opt(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::peer::test_peer as peer;

    #[test]
    fn folds_events_into_one_change_per_subnet() {
        let mut desired: BTreeMap<_, _> = [peer(1, 11, 1), peer(2, 12, 2), peer(3, 13, 3)]
            .into_iter()
            .map(|p| (p.subnet, p))
            .collect();
        let batch = vec![
            PeerEvent::Upsert(peer(2, 12, 8)),
            PeerEvent::Upsert(peer(2, 12, 9)), // two changes of one peer: one change, old -> last
            PeerEvent::Upsert(peer(4, 14, 4)),
            PeerEvent::Remove(peer(3, 13, 3).subnet),
            PeerEvent::Upsert(peer(1, 11, 1)), // unchanged: nothing to do
            PeerEvent::Upsert(peer(5, 15, 5)),
            PeerEvent::Remove(peer(5, 15, 5).subnet), // came and went: nothing to do
        ];
        let Folded::Changes(ch) = fold_events(&mut desired, batch) else {
            panic!("not incremental")
        };
        assert_eq!(ch.len(), 3, "{ch:?}");
        assert!(ch.contains(&PeerChange {
            old: Some(peer(2, 12, 2)),
            new: Some(peer(2, 12, 9))
        }));
        assert!(ch.contains(&PeerChange {
            old: None,
            new: Some(peer(4, 14, 4))
        }));
        assert!(ch.contains(&PeerChange {
            old: Some(peer(3, 13, 3)),
            new: None
        }));
        assert_eq!(desired.len(), 3);
        assert_eq!(
            desired[&peer(2, 0, 0).subnet].vtep_mac,
            peer(2, 12, 9).vtep_mac
        );
    }

    #[test]
    fn a_snapshot_supersedes_earlier_events() {
        let mut desired = BTreeMap::new();
        let batch = vec![
            PeerEvent::Upsert(peer(7, 17, 7)),
            PeerEvent::Snapshot(vec![peer(1, 11, 1)]),
            PeerEvent::Upsert(peer(2, 12, 2)),
        ];
        assert_eq!(fold_events(&mut desired, batch), Folded::Full);
        assert_eq!(
            desired.keys().copied().collect::<Vec<_>>(),
            vec![peer(1, 11, 1).subnet, peer(2, 12, 2).subnet]
        );
    }
}
