//! The subnet registry: where leases live. CONTRACT (owner: registry helper).
//! `SubnetRegistry` is the concern's trait; `etcd::EtcdRegistry` the real implementation.
//! `acquire`, `keep_lease` and `watch_peers` are written against the trait.

pub mod etcd;

use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use ipnet::Ipv4Net;
use tokio::sync::{mpsc, watch};

use crate::config::NetworkConfig;
use crate::lease::LeaseAttrs;
use crate::metrics::Metrics;
use crate::peer::Peer;

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
    #[error(transparent)]
    Alloc(#[from] crate::subnet::AllocError),
}

/// Our own lease as held in the registry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OwnLease {
    pub subnet: Ipv4Net,
    pub attrs: LeaseAttrs,
}

/// What the peer watcher tells the daemon. A `Snapshot` is the complete, consistent set of valid
/// peers (first list, and after every re-list: reconnect, compaction); the daemon diffs it.
#[derive(Clone, Debug)]
pub enum PeerEvent {
    Snapshot(Vec<Peer>),
    Upsert(Peer),
    Remove(Ipv4Net),
}

pub trait SubnetRegistry: Clone + Send + Sync + 'static {}

/// Acquire our subnet: reuse the lease carrying `attrs.public_ip`, else `previous` (from the old
/// subnet file) if free, else random among the first 100 free. Claims with a create-if-absent
/// transaction and retries on a lost race. Never returns a subnet another node holds.
pub async fn acquire<R: SubnetRegistry>(
    _reg: &R,
    _cfg: &NetworkConfig,
    _attrs: &LeaseAttrs,
    _previous: Option<Ipv4Net>,
    _ttl: Duration,
) -> Result<OwnLease, RegistryError> {
    todo!()
}

/// Runs until `shutdown` flips: renews our etcd lease well before expiry (same lease id), and if
/// our key is deleted or expires, re-acquires (same subnet if still free) and publishes the new
/// lease on `out`. `attrs` lets the daemon change the advertised value (public IP change).
pub async fn keep_lease<R: SubnetRegistry>(
    _reg: R,
    _cfg: NetworkConfig,
    _lease: OwnLease,
    _ttl: Duration,
    _attrs: watch::Receiver<LeaseAttrs>,
    _out: watch::Sender<OwnLease>,
    _metrics: Arc<Metrics>,
) {
    todo!()
}

/// Runs forever: list `<prefix>/subnets/`, send a Snapshot, watch from revision+1, send
/// Upsert/Remove; on compaction, error or etcd restart, reconnect with backoff, re-list and send a
/// new Snapshot. Skips (with a warning) invalid leases and `own_subnet`'s lease.
pub async fn watch_peers<R: SubnetRegistry>(
    _reg: R,
    _cfg: NetworkConfig,
    _own_subnet: watch::Receiver<OwnLease>,
    _tx: mpsc::Sender<PeerEvent>,
    _metrics: Arc<Metrics>,
) {
    todo!()
}

#[allow(unused)]
fn _unused(_: Ipv4Addr) {}
