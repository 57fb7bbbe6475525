//! Kubernetes mode (flannel's `--kube-subnet-mgr`): no etcd of twill's own. This node's subnet is
//! its Node's `spec.podCIDR(s)` (assigned by kube-controller-manager), twilld publishes its VTEP
//! MAC, VNI and public IP as the Node annotations flanneld writes, and the peers are the other
//! Nodes that carry them. What the objects mean is `registry::kube`'s job; this module does the
//! talking: the client, waits, patches and the two watchers.
//!
//! The API server going away never stops the data path: the watchers back off and relist, and a
//! relist is diffed against what is programmed (a Snapshot), so a Node deleted meanwhile is
//! cleaned up.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use ipnet::{Ipv4Net, Ipv6Net};
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::api::{Api, Patch, PatchParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::runtime::watcher::{self, watcher, Event};
use kube::runtime::WatchStreamExt;
use kube::{Client, Config, ResourceExt};
use tokio::sync::{mpsc, watch};
use tracing::{info, warn};

use super::node_watch::{self, NodeWatchError, Target as NodeWatchTarget};
use super::{LeaseSource, Stored};
use crate::config::{ConfigError, NetworkConfig};
use crate::daemon::Shared;
use crate::lease::LeaseAttrs;
use crate::metrics::Metrics;
use crate::registry::kube::annotations::Annotations;
use crate::registry::kube::node::{self as knode, Peers, SkipReason};
use crate::registry::kube::slim::SlimNode;
use crate::registry::objects::HEALTHY_WATCH;
use crate::registry::skips::SkipLog;
use crate::registry::view::Skip;
use crate::registry::{Backoff, OwnLease, PeerEvent, Previous};

/// How often to repeat a wait's log line.
const WAIT_LOG_EVERY: Duration = Duration::from_secs(30);
/// Server-side timeout of each watch call: the connection is renewed this often, and a dead
/// one is noticed a few seconds after (kube-runtime's idle timeout).
const WATCH_TIMEOUT_S: u32 = 290;

#[derive(Debug, thiserror::Error)]
pub enum KubeError {
    #[error("Kubernetes API client: {0}")]
    Client(String),
    #[error("--kube-annotation-prefix: {0}")]
    Prefix(String),
    #[error("this node's name: {0}")]
    NodeName(String),
}

/// What Kubernetes mode is started with (the `--kube-*` flags).
#[derive(Clone, Debug)]
pub struct KubeOptions {
    pub api_url: Option<String>,
    pub kubeconfig: Option<PathBuf>,
    pub annotation_prefix: String,
    pub net_config_path: PathBuf,
    pub set_network_unavailable: bool,
    /// `--node-name`, if given (it wins over the environment).
    pub node_name: Option<String>,
}

#[derive(Clone)]
pub struct KubeSource {
    client: Client,
    /// The API server's URL, for the overlap check.
    url: String,
    node: String,
    ann: Annotations,
    net_config_path: PathBuf,
    set_network_unavailable: bool,
    /// The Node watch's own reader; None where it cannot go (a proxy): kube's watcher then.
    node_watch: Option<Arc<NodeWatchTarget>>,
}

impl KubeSource {
    /// The client (flannel's rules: a URL and/or a kubeconfig, else the pod's in-cluster
    /// config) and this node's name. Needs the API only when the name has to be read from our
    /// pod (POD_NAME/POD_NAMESPACE), and waits for it then.
    pub async fn connect(opts: &KubeOptions) -> Result<KubeSource, KubeError> {
        let ann = Annotations::with_prefix(&opts.annotation_prefix)
            .map_err(|e| KubeError::Prefix(e.to_string()))?;
        let config = client_config(opts).await?;
        let url = config.cluster_url.to_string();
        let node_watch = NodeWatchTarget::new(&config, node_watch::READ_TIMEOUT)
            .map_err(|e| KubeError::Client(e.to_string()))?
            .map(Arc::new);
        let client = Client::try_from(config).map_err(|e| KubeError::Client(e.to_string()))?;
        let env = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
        let node = match opts.node_name.clone() {
            Some(n) => n,
            None => match knode::node_name(env) {
                knode::NodeNameFrom::Env(n) => n,
                knode::NodeNameFrom::Pod { namespace, name } => {
                    node_of_pod(&client, &namespace, &name).await?
                }
                knode::NodeNameFrom::PodIncomplete { missing } => {
                    return Err(KubeError::NodeName(format!(
                        "POD_NAME and POD_NAMESPACE must both be set ({missing} is not); or set \
                         NODE_NAME"
                    )))
                }
                // kubelet's default node name: the host name, lower-cased.
                knode::NodeNameFrom::Hostname => nix::unistd::gethostname()
                    .ok()
                    .and_then(|h| h.into_string().ok())
                    .map(|h| h.to_lowercase())
                    .ok_or_else(|| KubeError::NodeName("no NODE_NAME and no host name".into()))?,
            },
        };
        info!(api = %url, node = %node, prefix = %opts.annotation_prefix, "Kubernetes mode");
        Ok(KubeSource {
            client,
            url,
            node,
            ann,
            net_config_path: opts.net_config_path.clone(),
            set_network_unavailable: opts.set_network_unavailable,
            node_watch,
        })
    }

    pub fn node_name(&self) -> &str {
        &self.node
    }

    /// The client, for the other watchers of Kubernetes mode (the policy engine's objects).
    pub fn client(&self) -> Client {
        self.client.clone()
    }

    fn nodes(&self) -> Api<Node> {
        Api::all(self.client.clone())
    }

    /// Our annotations as `attrs` says, written only where the Node's differ (flannel writes
    /// through nodes/status too: the only Node write its RBAC grants).
    async fn publish(&self, node: &Node, attrs: &LeaseAttrs) -> Result<bool, kube::Error> {
        let current: BTreeMap<String, String> = node.annotations().clone();
        let want = knode::own_annotations(&self.ann, attrs, &current);
        let stale = knode::stale_annotations(&self.ann, attrs);
        let Some(patch) = knode::annotation_patch(&current, &want, &stale) else {
            return Ok(false);
        };
        self.nodes()
            .patch_status(&self.node, &PatchParams::default(), &Patch::Merge(&patch))
            .await?;
        Ok(true)
    }
}

async fn client_config(opts: &KubeOptions) -> Result<Config, KubeError> {
    let url = match &opts.api_url {
        Some(u) => Some(
            u.parse()
                .map_err(|e| KubeError::Client(format!("--kube-api-url {u:?}: {e}")))?,
        ),
        None => None,
    };
    let mut config = match (&opts.kubeconfig, url.clone()) {
        (Some(path), _) => {
            let kc = Kubeconfig::read_from(path)
                .map_err(|e| KubeError::Client(format!("{}: {e}", path.display())))?;
            Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
                .await
                .map_err(|e| KubeError::Client(format!("{}: {e}", path.display())))?
        }
        // A URL alone: no credentials, as flannel (client-go) does it.
        (None, Some(u)) => Config::new(u),
        (None, None) => Config::incluster().map_err(|e| {
            KubeError::Client(format!(
                "not running in a pod ({e}): give --kubeconfig-file or --kube-api-url"
            ))
        })?,
    };
    if let Some(u) = url {
        config.cluster_url = u;
    }
    Ok(config)
}

/// `spec.nodeName` of our own pod, waited for while the API cannot answer.
async fn node_of_pod(client: &Client, namespace: &str, name: &str) -> Result<String, KubeError> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), namespace);
    let mut backoff = Backoff::new();
    let mut last_log: Option<Instant> = None;
    loop {
        match pods.get(name).await {
            Ok(p) => {
                return p
                    .spec
                    .and_then(|s| s.node_name)
                    .filter(|n| !n.is_empty())
                    .ok_or_else(|| {
                        KubeError::NodeName(format!("pod {namespace}/{name} has no spec.nodeName"))
                    })
            }
            Err(e) => {
                if last_log.is_none_or(|t| t.elapsed() >= WAIT_LOG_EVERY) {
                    warn!(error = %e, "reading our pod {namespace}/{name} for the node name; retrying");
                    last_log = Some(Instant::now());
                }
                backoff.wait().await;
            }
        }
    }
}

impl LeaseSource for KubeSource {
    fn name(&self) -> &'static str {
        "the Kubernetes API"
    }

    async fn server_addrs(&self) -> Vec<IpAddr> {
        crate::overlap::etcd_addresses(std::slice::from_ref(&self.url)).await
    }

    fn server_is(&self) -> &'static str {
        "the Kubernetes API server"
    }

    /// net-conf.json: waited for while missing (a ConfigMap not mounted yet); an invalid one
    /// is the operator's to fix.
    async fn network_config(&self, shared: &Shared) -> Result<NetworkConfig, ConfigError> {
        let path = &self.net_config_path;
        let mut last_log: Option<Instant> = None;
        loop {
            let waiting =
                match std::fs::read(path) {
                    Ok(bytes) => return NetworkConfig::parse(&bytes).inspect_err(|e| {
                        tracing::error!(file = %path.display(), error = %e, "refusing to start");
                    }),
                    Err(e) => format!("network config: {} ({e})", path.display()),
                };
            if last_log.is_none_or(|t| t.elapsed() >= WAIT_LOG_EVERY) {
                warn!("{waiting}");
                last_log = Some(Instant::now());
            }
            shared.update(|s| s.waiting_for = Some(waiting));
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }

    /// Waits for our Node and its podCIDR, then publishes our annotations.
    async fn acquire(
        &self,
        cfg: &NetworkConfig,
        attrs: &LeaseAttrs,
        previous: Previous,
        shared: &Shared,
    ) -> OwnLease {
        let mut backoff = Backoff::new();
        let mut last_log: Option<Instant> = None;
        loop {
            let waiting = match self.nodes().get_opt(&self.node).await {
                Ok(Some(node)) => match own_subnets(&node, cfg, attrs) {
                    Ok(Some((subnet, subnet6))) => {
                        let mut attrs = attrs.clone();
                        // (On an IPv6-only network `own_subnets` waits for the IPv6 entry.)
                        if subnet6.is_none() {
                            if let Some(r) = cfg.ipv6.as_ref().filter(|_| attrs.v6.is_some()) {
                                warn!(node = %self.node, ipv6_network = %r.network, "EnableIPv6 is set, but our Node has no IPv6 entry in spec.podCIDRs (kube-controller-manager --cluster-cidr needs an IPv6 range, and a Node keeps the podCIDRs it got first): this node serves IPv4 only");
                            }
                            attrs.v6 = None;
                        }
                        match self.publish(&node, &attrs).await {
                            Ok(_) => {
                                if let (Some(p), Some(s)) = (previous.v4, subnet) {
                                    if p != s {
                                        warn!(previous = %p, podcidr = %s, "this node's subnet changed since the last run: pods still on the old one lose the network");
                                    }
                                }
                                if let (Some(p), Some(s6)) = (previous.v6, subnet6) {
                                    if p != s6 {
                                        warn!(previous = %p, podcidr = %s6, "this node's IPv6 subnet changed since the last run: pods still on the old one lose their IPv6 network");
                                    }
                                }
                                return OwnLease {
                                    subnet,
                                    subnet6,
                                    attrs,
                                };
                            }
                            Err(e) => format!("publishing our Node annotations: {e}"),
                        }
                    }
                    Ok(None) if cfg.ipv4.is_none() => format!(
                        "node {}: no IPv6 entry in spec.podCIDRs yet, and the network is \
                         IPv6-only (kube-controller-manager --allocate-node-cidrs with an IPv6 \
                         --cluster-cidr)",
                        self.node
                    ),
                    Ok(None) => format!(
                        "node {}: no spec.podCIDR assigned yet (kube-controller-manager \
                         --allocate-node-cidrs, kubeadm --pod-network-cidr)",
                        self.node
                    ),
                    // (The error names the node.)
                    Err(e) => e.to_string(),
                },
                Ok(None) => format!("node {}: no such Node in the API", self.node),
                Err(e) => {
                    Metrics::inc(&shared.metrics.kube_api_errors);
                    format!("Kubernetes API: {e}{}", refusal_hint(&e))
                }
            };
            if last_log.is_none_or(|t| t.elapsed() >= WAIT_LOG_EVERY) {
                warn!("{waiting}");
                last_log = Some(Instant::now());
            }
            shared.update(|s| s.waiting_for = Some(waiting));
            backoff.wait().await;
        }
    }

    fn spawn(
        &self,
        cfg: NetworkConfig,
        own: OwnLease,
        attrs: watch::Receiver<LeaseAttrs>,
        own_tx: watch::Sender<OwnLease>,
        own_rx: watch::Receiver<OwnLease>,
        peers: mpsc::Sender<PeerEvent>,
        metrics: Arc<Metrics>,
    ) {
        tokio::spawn(
            self.clone()
                .keep_own(cfg.clone(), own, attrs, own_tx, metrics.clone()),
        );
        tokio::spawn(self.clone().watch_peers(cfg, own_rx, peers, metrics));
    }

    /// Our Node's VTEP MACs (backend-data and backend-v6-data, if valid) and `node-public-ip`
    /// and `node-public-ipv6`. Waits for the API server: taking new MACs and the flags' public
    /// IPs because it was slow at boot (kube-proxy not up yet, a control-plane outage) would
    /// publish an address the operator overrode (flannel #1978), and the subnet needs the API
    /// anyway. A Node that does not exist (yet) has nothing stored.
    async fn stored(&self, shared: &Shared) -> Stored {
        let nodes = self.nodes();
        let mut backoff = Backoff::new();
        let mut last_log: Option<Instant> = None;
        let node = loop {
            let why = match tokio::time::timeout(Duration::from_secs(5), nodes.get_opt(&self.node))
                .await
            {
                Ok(Ok(n)) => break n,
                Ok(Err(e)) => {
                    Metrics::inc(&shared.metrics.kube_api_errors);
                    format!("{e}{}", refusal_hint(&e))
                }
                Err(_) => "no answer in 5 s".to_string(),
            };
            let waiting = format!("Kubernetes API: reading Node {}: {why}", self.node);
            if last_log.is_none_or(|t| t.elapsed() >= WAIT_LOG_EVERY) {
                warn!("{waiting} (waiting: its annotations decide this node's VTEP MAC and public IP)");
                last_log = Some(Instant::now());
            }
            shared.update(|s| s.waiting_for = Some(waiting));
            backoff.wait().await;
        };
        if last_log.is_some() {
            info!(node = %self.node, "read our Node");
        }
        match node {
            Some(node) => Stored {
                vtep_mac: knode::stored_vtep_mac(&node, &self.ann),
                public_ip: match knode::stored_public_ip(&node, &self.ann) {
                    Ok(ip) => ip,
                    Err(bad) => {
                        warn!(annotation = self.ann.node_public_ip(), value = %bad, "not an IPv4 address; ignored");
                        None
                    }
                },
                vtep_mac6: knode::stored_vtep_mac6(&node, &self.ann),
                public_ipv6: match knode::stored_public_ipv6(&node, &self.ann) {
                    Ok(ip) => ip,
                    Err(bad) => {
                        warn!(annotation = self.ann.node_public_ipv6(), value = %bad, "not an IPv6 address; ignored");
                        None
                    }
                },
            },
            None => Stored::default(),
        }
    }

    fn node_ready(&self) {
        if !self.set_network_unavailable {
            return;
        }
        let this = self.clone();
        tokio::spawn(async move {
            let mut backoff = Backoff::new();
            loop {
                let now = now_rfc3339();
                let patch = knode::network_unavailable_patch(&now);
                match this
                    .nodes()
                    .patch_status(
                        &this.node,
                        &PatchParams::default(),
                        &Patch::Strategic(&patch),
                    )
                    .await
                {
                    Ok(_) => {
                        info!(node = %this.node, "NetworkUnavailable=False");
                        return;
                    }
                    Err(e) => {
                        warn!(error = %e, "setting our Node's NetworkUnavailable condition; retrying");
                        backoff.wait().await;
                    }
                }
            }
        });
    }
}

impl KubeSource {
    /// Follows our own Node: a podCIDR change is a new lease (sent on `out`), annotations
    /// another controller wiped or changed are put back, an attribute change (public IP) is
    /// published. Runs for the daemon's lifetime.
    async fn keep_own(
        self,
        cfg: NetworkConfig,
        mut lease: OwnLease,
        mut attrs: watch::Receiver<LeaseAttrs>,
        out: watch::Sender<OwnLease>,
        metrics: Arc<Metrics>,
    ) {
        let wc = watcher::Config::default()
            .fields(&format!("metadata.name={}", self.node))
            .timeout(WATCH_TIMEOUT_S);
        let mut events = watcher(self.nodes(), wc).default_backoff().boxed();
        let mut attrs_open = true;
        let mut last: Option<Node> = None;
        // Our IPv6 podCIDR went away (said once, not at every heartbeat).
        let mut lost6 = false;
        // A failed publish is tried again on its own: our Node may not change for minutes.
        let mut retry = Retry::new();
        let mut fight = Fight::default();
        loop {
            tokio::select! {
                () = retry.due() => {
                    if let Some(n) = &last {
                        let ok = self.republish(n, &lease.attrs, &metrics).await;
                        retry.after(ok.is_some());
                    }
                }
                () = fight.due() => {
                    if let Some(n) = &last {
                        let ok = self.republish(n, &lease.attrs, &metrics).await;
                        retry.after(ok.is_some());
                        if ok == Some(true) {
                            fight.put_back(&self.node);
                        }
                    }
                }
                ev = events.next() => match ev {
                    Some(Ok(Event::Apply(n) | Event::InitApply(n))) => {
                        let mut moved = false;
                        match knode::pod_subnet(&n, &cfg) {
                            Ok(Some(s)) if Some(s) != lease.subnet => {
                                info!(old = ?lease.subnet, new = %s, "our podCIDR changed");
                                lease.subnet = Some(s);
                                moved = true;
                            }
                            Ok(_) => {}
                            Err(e) => warn!("our Node: {e}; keeping {:?}", lease.subnet),
                        }
                        // The IPv6 side follows a move; it neither appears nor goes while
                        // twilld runs (whether this node serves IPv6 is settled at start).
                        if let Some(old6) = lease.subnet6 {
                            match knode::pod_subnet6(&n, &cfg) {
                                Ok(Some(s6)) if s6 != old6 => {
                                    info!(old = %old6, new = %s6, "our IPv6 podCIDR changed");
                                    lease.subnet6 = Some(s6);
                                    moved = true;
                                }
                                Ok(Some(_)) => lost6 = false,
                                Ok(None) if !lost6 => {
                                    lost6 = true;
                                    warn!("our Node has no IPv6 podCIDR any more; keeping {old6} until twilld restarts");
                                }
                                Ok(None) => {}
                                Err(e) => warn!("our Node: {e}; keeping {old6}"),
                            }
                        }
                        if moved {
                            out.send_replace(lease.clone());
                        }
                        // Put back what another writer changed, unless that writer keeps
                        // at it: then later (`fight.due`).
                        if !fight.holding() {
                            let ok = self.republish(&n, &lease.attrs, &metrics).await;
                            retry.after(ok.is_some());
                            if ok == Some(true) {
                                fight.put_back(&self.node);
                            }
                        }
                        last = Some(n);
                    }
                    Some(Ok(Event::Delete(_))) => {
                        warn!(node = %self.node, "our Node object was deleted; keeping the subnet until it is back");
                    }
                    Some(Ok(_)) => {}
                    Some(Err(e)) => {
                        Metrics::inc(&metrics.kube_api_errors);
                        warn!(error = %e, "watching our Node; retrying");
                    }
                    None => return,
                },
                r = attrs.changed(), if attrs_open => match r {
                    Err(_) => attrs_open = false,
                    Ok(()) => {
                        lease.attrs = attrs.borrow_and_update().clone();
                        if lease.subnet6.is_none() {
                            lease.attrs.v6 = None;
                        }
                        if let Some(n) = &last {
                            let ok = self.republish(n, &lease.attrs, &metrics).await;
                            retry.after(ok.is_some());
                        }
                        out.send_replace(lease.clone());
                    }
                },
            }
        }
    }

    /// `publish`, logged: whether it patched; None if it failed (`keep_own` tries again).
    async fn republish(&self, node: &Node, attrs: &LeaseAttrs, metrics: &Metrics) -> Option<bool> {
        match self.publish(node, attrs).await {
            Ok(true) => {
                info!(node = %self.node, "published our Node annotations");
                Some(true)
            }
            Ok(false) => Some(false),
            Err(e) => {
                Metrics::inc(&metrics.kube_api_errors);
                warn!(error = %e, "publishing our Node annotations failed; trying again");
                None
            }
        }
    }

    /// Follows every Node: a Snapshot after each (re)list, then Upserts and Removes. Status
    /// heartbeats change nothing that matters and send nothing.
    async fn watch_peers(
        self,
        cfg: NetworkConfig,
        mut own: watch::Receiver<OwnLease>,
        tx: mpsc::Sender<PeerEvent>,
        metrics: Arc<Metrics>,
    ) {
        let mut skips = SkipLog::new(metrics.clone());
        let mut own_open = true;
        let mut listed_before = false;
        let mut backoff = Backoff::new();
        // Rebuilt, with a fresh list, when our own subnet changes: which peers overlap it
        // depends on it.
        'relist: loop {
            // Every kubelet status write of every Node comes here: read on a thread of its own
            // that settles them (`node_watch`), else decoded slim by kube's watcher.
            let nodes: Api<SlimNode> = Api::all(self.client.clone());
            let mut events = match &self.node_watch {
                Some(t) => node_watch::node_events(nodes, t.clone()).boxed(),
                None => {
                    let wc = watcher::Config::default().timeout(WATCH_TIMEOUT_S);
                    watcher(nodes, wc)
                        .default_backoff()
                        .map(|r| r.map(full_event).map_err(NodeWatchError::from))
                        .boxed()
                }
            };
            let built_for = {
                let o = own.borrow_and_update();
                (o.subnet, o.subnet6)
            };
            let mut peers = Peers::new(
                self.node.clone(),
                self.ann.clone(),
                cfg.clone(),
                built_for.0,
            )
            .with_ipv6(built_for.1);
            // When this watcher's list completed: only a watch that then lasted counts as
            // healthy. One the server ends at once (RBAC without `watch`, a proxy cutting
            // streams) must not mean a full list of every Node ten times a second.
            let mut listed_at = None;
            loop {
                let (out, skips_now) = tokio::select! {
                    ev = events.next() => match ev {
                        Some(Ok(Event::Init)) => {
                            peers.init();
                            (Vec::new(), Vec::new())
                        }
                        Some(Ok(Event::InitApply(n))) => (Vec::new(), peers.init_apply(&n)),
                        Some(Ok(Event::InitDone)) => {
                            listed_at = Some(tokio::time::Instant::now());
                            if listed_before {
                                Metrics::inc(&metrics.peer_resyncs);
                            }
                            listed_before = true;
                            (peers.init_done(), Vec::new())
                        }
                        Some(Ok(Event::Apply(n))) => {
                            let a = peers.apply(&n);
                            (a.events, a.skips)
                        }
                        Some(Ok(Event::Delete(n))) => {
                            let a = peers.delete(&n);
                            (a.events, a.skips)
                        }
                        // As in etcd mode: the list is not known to be whole until a new
                        // one succeeds (its Snapshot is what tells the daemon). kube-runtime
                        // would resume the watch silently, and nothing would say it did.
                        Some(Err(e)) => {
                            Metrics::inc(&metrics.kube_api_errors);
                            warn!(error = %e, "watching Nodes; listing them again");
                            if tx.send(PeerEvent::ListFailed(e.to_string())).await.is_err() {
                                return;
                            }
                            if listed_at.is_some_and(|t| t.elapsed() >= HEALTHY_WATCH) {
                                backoff.reset();
                            }
                            backoff.wait().await;
                            continue 'relist;
                        }
                        None => return,
                    },
                    r = own.changed(), if own_open => match r {
                        Err(_) => {
                            own_open = false;
                            (Vec::new(), Vec::new())
                        }
                        // Which peers overlap ours depends on our subnet; an attribute change
                        // (public IP) alone does not need the Nodes again.
                        Ok(()) if {
                            let o = own.borrow_and_update();
                            (o.subnet, o.subnet6) != built_for
                        } => continue 'relist,
                        Ok(()) => (Vec::new(), Vec::new()),
                    },
                };
                for s in skips_now {
                    let why = s.skip.to_string();
                    skips.report(
                        &format!("node/{}{}", s.node, s.side),
                        &match s.skip.reason {
                            SkipReason::DuplicateMac => Skip::MacTaken(why),
                            _ => Skip::Invalid(why),
                        },
                    );
                }
                for ev in out {
                    if tx.send(ev).await.is_err() {
                        return;
                    }
                }
            }
        }
    }
}

/// Our subnets from our Node: the IPv4 one, and the IPv6 one when we serve IPv6 (`attrs` has
/// an IPv6 side). None while no podCIDR is assigned.
/// Our IPv4 and IPv6 subnets (each if we have one).
type OwnSubnets = (Option<Ipv4Net>, Option<Ipv6Net>);

/// Our subnets from our Node: None while the Node lacks one it must have (the IPv4 one; on an
/// IPv6-only network the IPv6 one). The IPv6 one is optional on a dual-stack network.
fn own_subnets(
    node: &Node,
    cfg: &NetworkConfig,
    attrs: &LeaseAttrs,
) -> Result<Option<OwnSubnets>, knode::NodeError> {
    let subnet = knode::pod_subnet(node, cfg)?;
    if cfg.ipv4.is_some() && subnet.is_none() {
        return Ok(None);
    }
    let subnet6 = match attrs.v6 {
        Some(_) => knode::pod_subnet6(node, cfg)?,
        None => None,
    };
    if subnet.is_none() && subnet6.is_none() {
        return Ok(None);
    }
    Ok(Some((subnet, subnet6)))
}

/// What to do about an API server that refuses us, for the message that reports it.
fn refusal_hint(e: &kube::Error) -> &'static str {
    match e {
        kube::Error::Api(r) if r.code == 401 => {
            " (the API server does not know our credentials: --kube-api-url alone sends none; \
             give --kubeconfig-file, or run in a pod with its service account)"
        }
        kube::Error::Api(r) if r.code == 403 => {
            " (our identity may not read Nodes: bind it to the ClusterRole in \
             deploy/kubernetes/twill.yaml)"
        }
        _ => "",
    }
}

/// Our annotations put back after another writer changed them. A controller that keeps
/// resetting them (one that copies Node objects from elsewhere) must not get a patch for each
/// of its writes, nor make every peer re-program this node each time: past `LIMIT` put-backs
/// within `WINDOW`, the next one waits, 10 s doubling to 5 min while the fight goes on; it is
/// over once no put-back was needed for `WINDOW` and twice the last wait.
#[derive(Default)]
struct Fight {
    recent: std::collections::VecDeque<tokio::time::Instant>,
    hold: Duration,
    until: Option<tokio::time::Instant>,
}

impl Fight {
    const WINDOW: Duration = Duration::from_secs(60);
    const LIMIT: usize = 5;
    const MIN_HOLD: Duration = Duration::from_secs(10);
    const MAX_HOLD: Duration = Duration::from_secs(300);

    /// A put-back was just made.
    fn put_back(&mut self, node: &str) {
        let now = tokio::time::Instant::now();
        let quiet = Self::WINDOW.max(self.hold * 2);
        if self
            .recent
            .back()
            .is_some_and(|t| now.duration_since(*t) > quiet)
        {
            self.recent.clear();
            self.hold = Duration::ZERO;
        }
        self.recent.push_back(now);
        while self
            .recent
            .front()
            .is_some_and(|t| now.duration_since(*t) > Self::WINDOW)
        {
            self.recent.pop_front();
        }
        // Holding already: the fight goes on, the wait doubles.
        if self.hold.is_zero() && self.recent.len() <= Self::LIMIT {
            return;
        }
        self.hold = if self.hold.is_zero() {
            Self::MIN_HOLD
        } else {
            (self.hold * 2).min(Self::MAX_HOLD)
        };
        self.until = Some(now + self.hold);
        warn!(%node, puts_back = self.recent.len(), wait = ?self.hold,
              "another writer keeps changing our Node's annotations; putting them back less often (find that controller: peers cannot reach this node's pods while they are wrong)");
    }

    fn holding(&self) -> bool {
        self.until.is_some()
    }

    /// Resolves when a held put-back is due (never while none is).
    async fn due(&mut self) {
        match self.until {
            Some(at) => {
                tokio::time::sleep_until(at).await;
                self.until = None;
            }
            None => std::future::pending().await,
        }
    }
}

/// When to try a failed publish again: 500 ms, doubling to 30 s; never after a success.
struct Retry {
    at: Option<tokio::time::Instant>,
    delay: Duration,
}

impl Retry {
    const MIN: Duration = Duration::from_millis(500);
    const MAX: Duration = Duration::from_secs(30);

    fn new() -> Self {
        Retry {
            at: None,
            delay: Self::MIN,
        }
    }

    fn after(&mut self, ok: bool) {
        if ok {
            *self = Retry::new();
        } else {
            self.at = Some(tokio::time::Instant::now() + self.delay);
            self.delay = (self.delay * 2).min(Self::MAX);
        }
    }

    /// Resolves when a retry is due (never while none is).
    async fn due(&mut self) {
        match self.at {
            Some(at) => {
                tokio::time::sleep_until(at).await;
                self.at = None;
            }
            None => std::future::pending().await,
        }
    }
}

/// A watch event of slim Nodes as one of Nodes (`registry::kube::node` works on those).
fn full_event(e: Event<SlimNode>) -> Event<Node> {
    match e {
        Event::Apply(n) => Event::Apply(n.into_node()),
        Event::Delete(n) => Event::Delete(n.into_node()),
        Event::Init => Event::Init,
        Event::InitApply(n) => Event::InitApply(n.into_node()),
        Event::InitDone => Event::InitDone,
    }
}

/// Now, as RFC 3339 in UTC (the form of Kubernetes' Time fields).
fn now_rfc3339() -> String {
    k8s_openapi::jiff::Timestamp::now()
        .round(k8s_openapi::jiff::Unit::Second)
        .map_or_else(
            |_| k8s_openapi::jiff::Timestamp::now().to_string(),
            |t| t.to_string(),
        )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Five put-backs a minute go out at once; past that each waits, 10 s doubling, and a minute
    /// of peace ends the fight.
    #[tokio::test(start_paused = true)]
    async fn a_fight_over_our_annotations_is_damped_and_forgotten() {
        let mut f = Fight::default();
        for _ in 0..Fight::LIMIT {
            f.put_back("n1");
            assert!(!f.holding());
        }
        f.put_back("n1");
        assert!(f.holding());
        let t = tokio::time::Instant::now();
        f.due().await;
        assert_eq!(t.elapsed(), Duration::from_secs(10));
        assert!(!f.holding());
        // The fight goes on (a put-back needed each time the wait ends): 20 s, 40 s ... 5 min.
        for want in [20, 40, 80, 160, 300, 300] {
            f.put_back("n1");
            let t = tokio::time::Instant::now();
            f.due().await;
            assert_eq!(t.elapsed(), Duration::from_secs(want));
        }
        // Quiet for the window and twice the last wait: the next put-back goes out at once.
        tokio::time::advance(Duration::from_secs(601)).await;
        f.put_back("n1");
        assert!(!f.holding());
        for _ in 0..Fight::LIMIT - 1 {
            f.put_back("n1");
        }
        f.put_back("n1");
        let t = tokio::time::Instant::now();
        f.due().await;
        assert_eq!(t.elapsed(), Duration::from_secs(10), "the hold starts over");
    }
}
