//! Getting to a running node: the network config, the lease, signals.

use std::time::{Duration, Instant};

use ipnet::Ipv4Net;
use tracing::{error, warn};

use super::status::Shared;
use super::StartError;
use crate::config::NetworkConfig;
use crate::lease::LeaseAttrs;
use crate::metrics::Metrics;
use crate::registry::etcd::EtcdRegistry;
use crate::registry::{self, OwnLease};

/// How often to repeat "still waiting for the network config".
const CONFIG_WAIT_LOG_EVERY: Duration = Duration::from_secs(30);

pub(super) async fn wait_for_config(
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
pub(super) async fn acquire_until_done(
    reg: &EtcdRegistry,
    cfg: &NetworkConfig,
    attrs: &LeaseAttrs,
    previous: Option<Ipv4Net>,
    ttl: Duration,
    shared: &Shared,
) -> OwnLease {
    let mut backoff = Duration::from_millis(500);
    loop {
        match registry::acquire(reg, cfg, attrs, previous, ttl).await {
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

pub(super) async fn sleep_until_opt(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

pub(super) async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}
