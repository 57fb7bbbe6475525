//! Leases in etcd, in flannel's layout: the network config at `<prefix>/config`, one key per
//! node under `<prefix>/subnets/`, claimed with a CAS transaction and held by an etcd lease.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, watch};
use tracing::{error, warn};

use super::LeaseSource;
use crate::config::{ConfigError, NetworkConfig};
use crate::daemon::Shared;
use crate::lease::LeaseAttrs;
use crate::metrics::Metrics;
use crate::registry::etcd::EtcdRegistry;
use crate::registry::{self, OwnLease, PeerEvent, Previous};

/// How often to repeat "still waiting for the network config".
const CONFIG_WAIT_LOG_EVERY: Duration = Duration::from_secs(30);

#[derive(Clone)]
pub struct EtcdSource {
    reg: EtcdRegistry,
    endpoints: Vec<String>,
    prefix: String,
    lease_ttl: Duration,
}

impl EtcdSource {
    pub fn new(
        reg: EtcdRegistry,
        endpoints: Vec<String>,
        prefix: String,
        lease_ttl: Duration,
    ) -> Self {
        EtcdSource {
            reg,
            endpoints,
            prefix,
            lease_ttl,
        }
    }
}

impl LeaseSource for EtcdSource {
    fn name(&self) -> &'static str {
        "etcd"
    }

    async fn server_addrs(&self) -> Vec<IpAddr> {
        crate::overlap::etcd_addresses(&self.endpoints).await
    }

    fn server_is(&self) -> &'static str {
        "an etcd endpoint"
    }

    async fn network_config(&self, shared: &Shared) -> Result<NetworkConfig, ConfigError> {
        let key = format!("{}/config", self.prefix.trim_end_matches('/'));
        let mut last_log: Option<Instant> = None;
        let mut backoff = Duration::from_millis(500);
        loop {
            let waiting = match self.reg.get_config().await {
                Ok(Some(bytes)) => {
                    return NetworkConfig::parse(&bytes).inspect_err(|e| {
                        error!(key = %key, error = %e, "refusing to start");
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

    /// Keeps trying: an etcd outage or a full subnet range is logged and retried, because
    /// leases expire and operators fix things; exiting would only make a crash loop.
    async fn acquire(
        &self,
        cfg: &NetworkConfig,
        attrs: &LeaseAttrs,
        previous: Previous,
        shared: &Shared,
    ) -> OwnLease {
        let mut backoff = Duration::from_millis(500);
        loop {
            match registry::acquire(&self.reg, cfg, attrs, previous, self.lease_ttl).await {
                Ok(own) => return own,
                Err(e) => {
                    error!(error = %e, retry_in = ?backoff, "cannot acquire a subnet lease");
                    shared.update(|s| s.waiting_for = Some(format!("subnet lease: {e}")));
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(30));
                }
            }
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
        tokio::spawn(registry::keep_lease(
            self.reg.clone(),
            cfg.clone(),
            own,
            self.lease_ttl,
            attrs,
            own_tx,
            metrics.clone(),
        ));
        tokio::spawn(registry::watch_peers(
            self.reg.clone(),
            cfg,
            own_rx,
            peers,
            metrics,
        ));
    }
}
