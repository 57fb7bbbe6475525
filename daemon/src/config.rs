//! The network configuration at `<prefix>/config`, in flannel's JSON format.
//! CONTRACT (owner: registry helper): parse + validate + defaults; unit tests.

use std::net::Ipv4Addr;

use ipnet::Ipv4Net;
use serde::Serialize;

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct NetworkConfig {
    pub network: Ipv4Net,
    pub subnet_len: u8,
    pub subnet_min: Ipv4Addr,
    pub subnet_max: Ipv4Addr,
    pub backend: BackendConfig,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct BackendConfig {
    /// Only "vxlan" for now.
    pub kind: BackendKind,
    pub vni: u32,
    /// UDP port; flannel's 0 means the kernel default, which we make explicit: 8472.
    pub port: u16,
    /// Overlay MTU if the config sets one; else underlay MTU - 50.
    pub mtu: Option<u32>,
    pub direct_routing: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendKind {
    Vxlan,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// Names the field and the offending value, e.g. `SubnetLen: 31 is out of range (...)`.
    #[error("invalid network config: {field}: {message}")]
    Invalid { field: &'static str, message: String },
    #[error("network config is not valid JSON: {0}")]
    Json(#[from] serde_json::Error),
}

impl NetworkConfig {
    pub fn parse(_json: &[u8]) -> Result<Self, ConfigError> {
        todo!("registry helper")
    }
}
