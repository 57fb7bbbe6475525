//! Orchestration: wires the registry (leases), the backend (kernel) and the CNI server together,
//! and keeps the kernel in line with the leases: at start, on lease events, on kernel events and
//! every resync interval.

mod fw;
mod node;
mod peers;
mod side;
mod side4;
mod side6;
mod start;
mod status;

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tracing::{info, warn};

pub use peers::{fold_events, Folded};
pub use status::{FirewallStatus, NodeStatus, PeerStatus, ReconcileStatus, Shared, Status};

use crate::backend::BackendError;
use crate::cli::RunArgs;
use crate::cni::{CniLimits, CniOptions, NodeNet};
use crate::config::ConfigError;
use crate::http::HttpLimits;
use crate::lease::LeaseAttrs;
use crate::netlink::{DefaultRoute, KernelEvent, Netlink, NetlinkError};
use crate::registry::etcd::EtcdRegistry;
use crate::registry::objects::ObjectStore;
use crate::registry::{EtcdOptions, PeerEvent, RegistryError};
use crate::source::kube_objects::KubeObjects;
use crate::source::{EtcdSource, KubeOptions, KubeSource, LeaseSource};
use crate::subnet_file::read_previous_subnet;
use fw::NodeFirewall;
use node::Node;
use start::{sleep_until_opt, Shutdown};

/// The lease source's servers (etcd, the API server): a pod network over one of their
/// addresses would cut the node off from it.
pub(super) struct Servers {
    pub addrs: Vec<std::net::IpAddr>,
    pub are: &'static str,
}

impl Servers {
    /// Those of family N.
    pub fn of<N: crate::netlink::NlFamily>(&self) -> Vec<N::Addr> {
        self.addrs.iter().filter_map(|a| N::from_ip(*a)).collect()
    }
}

/// Kernel events arrive in bursts (a hand `ip route flush`); collapse them. Our own deletions
/// are filtered out before they become events (see `netlink::own`).
const EVENT_DEBOUNCE: Duration = Duration::from_millis(300);

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(
        "the network config enables IPv6 (EnableIPv6), but the underlay interface {iface} has no \
         usable global IPv6 address (static or autoconfigured, not tentative, deprecated or \
         temporary): add one, or pass --public-ipv6 (in Kubernetes mode also: the Node's \
         node-public-ipv6 annotation)"
    )]
    NoIpv6 { iface: String },
    #[error(
        "the underlay interface {iface} has no IPv4 address: add one, or pass --public-ip (in \
         Kubernetes mode also: the Node's node-public-ip annotation); an IPv6-only network sets \
         \"EnableIPv4\": false"
    )]
    NoIpv4 { iface: String },
    #[error("state dir {dir}: {err}")]
    State { dir: String, err: std::io::Error },
    #[error("netlink: {0}")]
    Netlink(#[from] NetlinkError),
    #[error(transparent)]
    Backend(#[from] BackendError),
    #[error("{0}")]
    Registry(#[from] RegistryError),
    #[error(transparent)]
    Overlap(#[from] crate::overlap::OverlapError),
    #[error(transparent)]
    Instance(#[from] crate::instance::LockError),
    #[error("--subnet-file: {0}")]
    SubnetFile(crate::paths::PathError),
    #[error("--state-dir: {0}")]
    StateDir(crate::paths::PathError),
    #[error(transparent)]
    Kube(#[from] crate::source::kube::KubeError),
    #[error("cannot serve the CNI socket {path}: {err}")]
    Cni { path: String, err: std::io::Error },
    /// A task that runs for the daemon's lifetime ended (it can only panic): exit, so the
    /// service manager restarts twilld, rather than run half a daemon.
    #[error("internal error: the {0} stopped")]
    TaskEnded(&'static str),
}

/// Runs the daemon until SIGTERM/SIGINT. Returns Err only for problems that need the operator
/// (invalid config, unusable state dir, socket or subnet file path, another twilld running, no
/// underlay); transient trouble with etcd or the API server is waited out. Everything local is
/// checked before twilld talks to either, so such a problem never leaves a lease or a device
/// behind.
pub async fn run(args: RunArgs) -> Result<(), StartError> {
    let mut shutdown = Shutdown::listen();
    // It holds the IPAM records, the pods' policy records and the VTEP MAC: root's alone.
    crate::paths::private_parent(&args.state_dir.join(crate::instance::LOCK_FILE))
        .map_err(StartError::StateDir)?;
    let _instance = crate::instance::lock(&args.state_dir)?;
    check_subnet_file_dir(&args)?;
    if args.kube_subnet_mgr {
        let opts = KubeOptions {
            api_url: args.kube_api_url.clone(),
            kubeconfig: args.kubeconfig_file.clone(),
            annotation_prefix: args.kube_annotation_prefix.clone(),
            net_config_path: args.net_config_path.clone(),
            set_network_unavailable: args.set_node_network_unavailable,
            node_name: args.node_name.clone(),
        };
        let connect = KubeSource::connect(&opts);
        // It may wait for the API server (to read our pod's node name).
        let source = tokio::select! {
            s = connect => s?,
            _ = shutdown.wait() => { info!("shutting down before the node was ready"); return Ok(()); }
        };
        let objects = Objects {
            store: KubeObjects::new(source.client()),
            node: source.node_name().to_string(),
            pods_from_api: true,
        };
        return run_with(args, source, objects, shutdown).await;
    }
    // The registry client connects lazily: building it needs no etcd yet.
    let reg = EtcdRegistry::connect(&EtcdOptions {
        endpoints: args.etcd_endpoints.clone(),
        prefix: args.etcd_prefix.clone(),
        ca_file: args.etcd_cafile.clone(),
        cert_file: args.etcd_certfile.clone(),
        key_file: args.etcd_keyfile.clone(),
    })
    .await?;
    let source = EtcdSource::new(
        reg.clone(),
        args.etcd_endpoints.clone(),
        args.etcd_prefix.clone(),
        args.lease_ttl,
    );
    let objects = Objects {
        store: reg,
        node: args.node_name(),
        pods_from_api: false,
    };
    run_with(args, source, objects, shutdown).await
}

/// Where the policy engine's objects (policies, namespaces, pods) live.
struct Objects<O> {
    store: O,
    /// This node's name, as pods' spec.nodeName.
    node: String,
    /// The API server owns the pods (Kubernetes mode); else twilld writes its pods' records.
    pods_from_api: bool,
}

/// The daemon over one lease source and one object store.
async fn run_with<S: LeaseSource, O: ObjectStore>(
    mut args: RunArgs,
    source: S,
    objects: Objects<O>,
    mut shutdown: Shutdown,
) -> Result<(), StartError> {
    let shared = Arc::new(Shared::default());
    shared.update(|s| s.waiting_for = Some(source.name().into()));
    // Policy first: the CNI server programs every pod through it.
    let policy = args.network_policy.then(|| {
        crate::policy::spawn(
            objects.store,
            crate::policy::PolicyOptions {
                node: objects.node,
                pods_from_api: objects.pods_from_api,
                state_dir: args.state_dir.clone(),
                render: crate::policy::render::RenderOpts {
                    log_denied: args.policy_log_denied,
                },
            },
            shared.clone(),
        )
    });
    if policy.is_none() {
        crate::policy::remove_table().await;
    }

    let (node_tx, node_rx) = watch::channel::<Option<NodeNet>>(None);
    let cni_opts = CniOptions {
        socket: args.cni_socket.clone(),
        bridge: args.bridge.clone(),
        state_dir: args.state_dir.clone(),
        host_local_dir: (!args.host_local_dir.as_os_str().is_empty())
            .then(|| args.host_local_dir.clone()),
        policy: policy.clone(),
        limits: CniLimits {
            max_connections: args.cni_max_connections as usize,
            max_threads: args.cni_max_threads as usize,
        },
    };
    let cni_path = args.cni_socket.display().to_string();
    let cni = crate::cni::Server::bind(cni_opts, node_rx, shared.metrics.clone())
        .await
        .map_err(|err| StartError::Cni {
            path: cni_path.clone(),
            err,
        })?;

    // Never fatal: while the address is taken (anyone may bind an unprivileged port), the rest
    // runs and binding is retried. Up before the source is asked anything: /healthz answers
    // while twilld waits for it.
    crate::http::spawn(
        args.http_addr,
        shared.clone(),
        HttpLimits {
            max_connections: args.http_max_connections as usize,
            header_timeout: args.http_header_timeout,
        },
    );
    // Served at once too: ADD answers "try again later" and DEL works until the node is ready,
    // however long the source takes.
    let cni = tokio::spawn(cni.serve());
    let stored = tokio::select! {
        s = source.stored(&shared) => s,
        _ = shutdown.wait() => { info!("shutting down before the node was ready"); return Ok(()); }
    };
    let stored_mac = stored
        .vtep_mac
        .filter(|_| !crate::state::has_vtep_mac(&args.state_dir));
    if let Some(mac) = stored_mac {
        info!(%mac, "taking over the VTEP MAC this node published before");
    }
    if let Some(ip) = stored.public_ip {
        if args.public_ip.is_some_and(|flag| flag != ip) {
            warn!(%ip, "the Node's node-public-ip annotation wins over --public-ip");
        }
        info!(%ip, "public IP from the Node's node-public-ip annotation");
        args.public_ip = Some(ip);
    }
    if let Some(ip) = stored.public_ipv6 {
        if args.public_ipv6.is_some_and(|flag| flag != ip) {
            warn!(%ip, "the Node's node-public-ipv6 annotation wins over --public-ipv6");
        }
        info!(%ip, "public IPv6 address from the Node's node-public-ipv6 annotation");
        args.public_ipv6 = Some(ip);
    }
    let vtep_mac =
        crate::state::load_or_adopt_vtep_mac(&args.state_dir, stored_mac).map_err(|err| {
            StartError::State {
                dir: args.state_dir.display().to_string(),
                err,
            }
        })?;

    let nl = Netlink::new()?;
    // Checked before the lease source is asked for anything; which default route names the
    // underlay depends on the network's families (settled below, once the config is known).
    let underlay = nl
        .find_underlay_by(args.iface.as_ref(), DefaultRoute::Any)
        .await?;

    let cfg = tokio::select! {
        cfg = source.network_config(&shared) => cfg?,
        _ = shutdown.wait() => { info!("shutting down before the node was ready"); return Ok(()); }
    };
    info!(network = ?cfg.ipv4.as_ref().map(|r| r.network), network6 = ?cfg.ipv6.as_ref().map(|r| r.network), vni = cfg.backend.vni, "network config");
    let underlay = match (&args.iface, cfg.ipv4.is_some()) {
        (Some(_), _) => underlay,
        (None, true) => nl.find_underlay_by(None, DefaultRoute::Ipv4).await?,
        (None, false) => nl.find_underlay_by(None, DefaultRoute::Ipv6).await?,
    };
    info!(iface = %underlay.name, addr = ?underlay.addr, addr6 = ?underlay.addr6, mtu = underlay.mtu, %vtep_mac, "underlay");
    shared.update(|s| {
        s.network = cfg.ipv4.as_ref().map(|r| r.network);
        s.network6 = cfg.ipv6.as_ref().map(|r| r.network);
        s.waiting_for = Some("subnet lease".into());
    });

    // Each family's side this node serves, planned before any lease is taken.
    let servers = Servers {
        addrs: source.server_addrs().await,
        are: source.server_is(),
    };
    let plan4 = match &cfg.ipv4 {
        Some(range) => {
            Some(side4::plan(&args, &cfg, range, &nl, &underlay, &servers, vtep_mac).await?)
        }
        None => None,
    };
    let plan6 = side6::plan(&args, &cfg, &underlay, stored.vtep_mac6)?;
    let attrs = LeaseAttrs {
        v4: plan4.as_ref().map(|p| p.lease),
        v6: plan6.as_ref().map(|p| p.lease),
    };
    let previous = read_previous_subnet(&args.subnet_file);
    let own = tokio::select! {
        own = source.acquire(&cfg, &attrs, previous, &shared) => own,
        _ = shutdown.wait() => { info!("shutting down before the node was ready"); return Ok(()); }
    };
    info!(subnet = ?own.subnet, subnet6 = ?own.subnet6, "lease acquired");

    let v4 = match (plan4, &cfg.ipv4, own.subnet) {
        (Some(plan), Some(range), Some(subnet)) => Some(
            side4::start(
                &nl, &args, &cfg, range, plan, subnet, &underlay, vtep_mac, &shared,
            )
            .await?,
        ),
        _ => {
            side::remove_leftovers::<ipnet::Ipv4Net>(&nl, underlay.index, "twill.").await;
            None
        }
    };
    let v6 = match (&plan6, own.subnet6) {
        (Some(plan), Some(subnet6)) => {
            Some(side6::start(&nl, &args, &cfg, plan, subnet6, &underlay.name, &servers).await?)
        }
        _ => {
            side::remove_leftovers::<ipnet::Ipv6Net>(&nl, underlay.index, "twill-v6.").await;
            None
        }
    };
    let firewall = NodeFirewall::new(&args).await;
    // Changes to the nftables ruleset made by others (a flush, `systemctl restart nftables`).
    let mut nft_rx = match crate::netlink::nft_events::subscribe() {
        Ok(rx) => Some(rx),
        Err(e) => {
            warn!(error = %e, "no nftables notifications; firewall drift is found at each resync only");
            None
        }
    };

    // Background tasks: lease keeper and peer watcher.
    let (attrs_tx, attrs_rx) = watch::channel(attrs.clone());
    let (own_tx, mut own_rx) = watch::channel(own.clone());
    let (peer_tx, mut peer_rx) = mpsc::channel::<PeerEvent>(4096);
    source.spawn(
        cfg.clone(),
        own.clone(),
        attrs_rx,
        own_tx,
        own_rx.clone(),
        peer_tx,
        shared.metrics.clone(),
    );

    let resync_every = args.resync_interval;
    let mut node = Node::new(
        args, cfg, shared, nl, v4, underlay, firewall, node_tx, attrs_tx, policy, v6,
    );
    let mut subscribed = node.watch();
    let mut kernel_rx = node.nl.subscribe(subscribed)?;

    let mut resync = tokio::time::interval(resync_every);
    resync.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    resync.tick().await;
    let mut cni = cni;
    // Pending kernel and nftables events: when to act on them, and whether an address changed.
    let mut kernel_deadline: Option<tokio::time::Instant> = None;
    let mut addr_changed = false;
    let mut nft_deadline: Option<tokio::time::Instant> = None;
    let mut told_ready = false;

    loop {
        tokio::select! {
            _ = shutdown.wait() => {
                info!("SIGTERM: exiting; kernel entries, firewall rules and the lease stay in place");
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
                node.on_peer_events(batch).await;
            }
            changed = own_rx.changed() => {
                if changed.is_err() { return Err(StartError::TaskEnded("lease keeper")); }
                let new = own_rx.borrow_and_update().clone();
                node.on_own_lease(new).await;
            }
            Some(ev) = kernel_rx.recv() => {
                addr_changed |= ev == KernelEvent::AddressChanged;
                // Collapse a burst: act once it has been quiet for a moment. A deadline in this
                // select, not a wait here, so lease events keep flowing meanwhile.
                kernel_deadline.get_or_insert_with(|| tokio::time::Instant::now() + EVENT_DEBOUNCE);
            }
            _ = sleep_until_opt(kernel_deadline), if kernel_deadline.is_some() => {
                kernel_deadline = None;
                node.on_kernel_change(std::mem::take(&mut addr_changed)).await;
            }
            Some(pid) = recv_opt(&mut nft_rx) => {
                let ours = node.firewall.nft().is_some_and(|n| n.is_ours(pid));
                if !ours {
                    nft_deadline.get_or_insert_with(|| tokio::time::Instant::now() + EVENT_DEBOUNCE);
                }
            }
            _ = sleep_until_opt(nft_deadline), if nft_deadline.is_some() => {
                nft_deadline = None;
                node.on_nft_change().await;
            }
            _ = resync.tick() => node.on_resync().await,
        }
        // Whichever path recreated a device (or moved the underlay), events must follow it.
        if node.watch() != subscribed {
            match node.nl.subscribe(node.watch()) {
                Ok(rx) => {
                    kernel_rx = rx;
                    subscribed = node.watch();
                }
                Err(e) => warn!(error = %e, "re-subscribing to kernel events failed"),
            }
        }
        node.after_event().await;
        if node.ready && !told_ready {
            told_ready = true;
            source.node_ready();
        }
    }
}

/// A subnet file's directory that others can write is refused now. One that cannot be created
/// yet (e.g. a file in its place) is not: writing the subnet file is retried until it works.
fn check_subnet_file_dir(args: &RunArgs) -> Result<(), StartError> {
    match crate::paths::private_parent(&args.subnet_file) {
        Ok(_) => Ok(()),
        Err(e @ crate::paths::PathError::Io { .. }) => {
            warn!(error = %e, "the subnet file's directory is not usable yet; writing it will be retried");
            Ok(())
        }
        Err(e) => Err(StartError::SubnetFile(e)),
    }
}

async fn recv_opt<T>(rx: &mut Option<mpsc::Receiver<T>>) -> Option<T> {
    match rx {
        Some(r) => r.recv().await,
        None => std::future::pending().await,
    }
}
