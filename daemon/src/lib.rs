//! twilld: the twill node daemon.
//!
//! Leases this node's pod subnet from etcd (flannel's layout), watches the other nodes' leases,
//! and programs the kernel VXLAN data path so pods reach each other across nodes without NAT.
//! It also serves the `twill` CNI plugin over a Unix socket.

pub mod backend;
pub mod cli;
pub mod cni;
pub mod config;
pub mod daemon;
pub mod excerpt;
pub mod firewall;
#[doc(hidden)]
pub mod fuzzing;
pub mod http;
pub mod instance;
pub mod lease;
pub mod mac;
pub mod masq;
pub mod metrics;
pub mod netlink;
pub mod nft;
pub mod overlap;
pub mod paths;
pub mod peer;
pub mod policy;
pub mod reconcile;
pub mod registry;
pub mod source;
pub mod state;
pub mod subnet;
pub mod subnet_file;
