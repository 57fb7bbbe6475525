//! Where a node's subnet and its peers come from: etcd (flannel's etcd layout, `etcd`) or, in
//! Kubernetes mode, the API server. The daemon is written against [`LeaseSource`] alone, so a
//! source plugs in without touching the backends, the reconciler or the CNI server.

pub mod etcd;
pub mod kube;
pub mod kube_objects;
pub mod node_watch;

use std::future::Future;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::Arc;

use tokio::sync::{mpsc, watch};

use crate::config::{ConfigError, NetworkConfig};
use crate::daemon::Shared;
use crate::lease::LeaseAttrs;
use crate::metrics::Metrics;
use crate::registry::{OwnLease, PeerEvent, Previous};

/// See `LeaseSource::stored`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Stored {
    /// The VTEP MAC this node published before, taken for a state dir that has none.
    pub vtep_mac: Option<crate::mac::MacAddr>,
    /// Kubernetes mode: the Node's `node-public-ip` annotation. It is this node's
    /// `--public-ip` (flannel reads it at start, and it wins over the flag).
    pub public_ip: Option<Ipv4Addr>,
    /// The same two for the IPv6 side of a dual-stack node (`backend-v6-data`,
    /// `node-public-ipv6`).
    pub vtep_mac6: Option<crate::mac::MacAddr>,
    pub public_ipv6: Option<Ipv6Addr>,
}

pub use etcd::EtcdSource;
pub use kube::{KubeOptions, KubeSource};

/// One source of leases. Every wait here is a wait for the source (an outage, a config not yet
/// written, a subnet not yet assigned): it is retried and shown on `/readyz`, never fatal.
pub trait LeaseSource: Send + Sync + 'static {
    /// What `/readyz` says the daemon waits for before the source has answered.
    fn name(&self) -> &'static str;

    /// The IPv4 addresses of the source's servers: a pod network over them would cut the node
    /// off from its source (best effort: names that do not resolve now are left out).
    fn server_addrs(&self) -> impl Future<Output = Vec<IpAddr>> + Send;

    /// What one of those servers is, for messages ("an etcd endpoint").
    fn server_is(&self) -> &'static str;

    /// Waits for the network config. Err only for a config that is there but invalid: the
    /// operator has to fix it.
    fn network_config(
        &self,
        shared: &Shared,
    ) -> impl Future<Output = Result<NetworkConfig, ConfigError>> + Send;

    /// Waits until this node holds its subnet, advertised with `attrs`. `previous` is the
    /// subnet the node had before a restart (its pods still use it), if any.
    fn acquire(
        &self,
        cfg: &NetworkConfig,
        attrs: &LeaseAttrs,
        previous: Previous,
        shared: &Shared,
    ) -> impl Future<Output = OwnLease> + Send;

    /// Starts the background tasks for the daemon's lifetime: keeping our lease (publishing
    /// `attrs` changes, re-acquiring a lost lease and sending it on `own_tx`) and following the
    /// other nodes (`peers`: a Snapshot after every (re)list, then changes).
    #[allow(clippy::too_many_arguments)]
    fn spawn(
        &self,
        cfg: NetworkConfig,
        own: OwnLease,
        attrs: watch::Receiver<LeaseAttrs>,
        own_tx: watch::Sender<OwnLease>,
        own_rx: watch::Receiver<OwnLease>,
        peers: mpsc::Sender<PeerEvent>,
        metrics: Arc<Metrics>,
    );

    /// What the source holds about this node from before twilld starts: the VTEP MAC it
    /// published (flannel's persistent MAC) and an operator's public IP. Empty when there is
    /// nothing; a source that keeps them waits for an answer (the lease needs it anyway).
    fn stored(&self, shared: &Shared) -> impl Future<Output = Stored> + Send {
        let _ = shared;
        async { Stored::default() }
    }

    /// The node is ready (subnet file written, CNI served): tell whoever waits for that. Called
    /// once, the first time.
    fn node_ready(&self) {}
}
