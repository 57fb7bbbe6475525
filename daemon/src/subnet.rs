//! Subnet arithmetic: flannel's key format and picking a free subnet.
//! CONTRACT (owner: registry helper). Pure, unit-tested.

use std::collections::HashSet;

use ipnet::Ipv4Net;

use crate::config::NetworkConfig;

/// `10.244.1.0/24` -> `10.244.1.0-24`.
pub fn subnet_key(_net: Ipv4Net) -> String {
    todo!()
}

/// `10.244.1.0-24` -> `10.244.1.0/24`; None for anything else (including dual-stack `&...`
/// suffix handling: the v4 part is used).
pub fn parse_subnet_key(_key: &str) -> Option<Ipv4Net> {
    todo!()
}

#[derive(Debug, thiserror::Error)]
pub enum AllocError {
    /// Says the range, how many leases exist and what to change.
    #[error("out of subnets: ...")]
    OutOfSubnets { range: String, leases: usize },
}

/// A random free subnet among the first 100 free ones between SubnetMin and SubnetMax.
pub fn choose_free(_cfg: &NetworkConfig, _taken: &HashSet<Ipv4Net>) -> Result<Ipv4Net, AllocError> {
    todo!()
}
