//! The daemon's side of the `twill` CNI plugin. CONTRACT (owner: CNI helper).
//! Listens on the CNI socket from start; until `node` holds a value, ADD answers "try again
//! later" (11) and STATUS answers 50.

use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::sync::Arc;

use ipnet::Ipv4Net;
use tokio::sync::watch;

use crate::metrics::Metrics;

#[derive(Clone, Debug)]
pub struct CniOptions {
    pub socket: PathBuf,
    pub bridge: String,
    pub state_dir: PathBuf,
}

/// The node's pod network, known once the lease is held and the overlay is up.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeNet {
    pub subnet: Ipv4Net,
    /// MTU for pod interfaces: the overlay MTU.
    pub mtu: u32,
}

impl NodeNet {
    pub fn gateway(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.subnet.network()) + 1)
    }
}

/// Serve until the process exits. Errors only if the socket cannot be created.
pub async fn serve(
    _opts: CniOptions,
    _node: watch::Receiver<Option<NodeNet>>,
    _metrics: Arc<Metrics>,
) -> std::io::Result<()> {
    std::future::pending::<()>().await;
    Ok(())
}
