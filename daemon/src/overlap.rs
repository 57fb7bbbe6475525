//! Keeping pod routes off the node's own networks. A route for a pod subnet goes into the
//! overlay; if that subnet covers the node's LAN, its etcd or a peer's tunnel endpoint, the
//! node's own traffic follows it there, twilld loses etcd and with it any chance to see the
//! lease go away. So a Network that covers them is refused at start, and a peer subnet that
//! covers them (the underlay can change while running) is never routed.

use std::collections::BTreeSet;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use ipnet::Ipv4Net;

use crate::subnet::{overlaps, Cidr};

/// What one family's pod routes must never capture.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HostNetsOf<N: Cidr> {
    /// The address peers tunnel to.
    pub public_ip: Option<N::Addr>,
    /// The underlay interface's networks, with its name for messages.
    pub underlay: Vec<N>,
    pub underlay_name: String,
    /// The addresses of the lease source's servers (etcd, the API server), and what they are.
    pub servers: Vec<N::Addr>,
    pub servers_are: &'static str,
}

pub type HostNets = HostNetsOf<Ipv4Net>;

impl<N: Cidr> Default for HostNetsOf<N> {
    fn default() -> Self {
        HostNetsOf {
            public_ip: None,
            underlay: Vec::new(),
            underlay_name: String::new(),
            servers: Vec::new(),
            servers_are: "",
        }
    }
}

#[derive(Debug, thiserror::Error)]
#[error(
    "the pod network {network} ({field} in the network config) overlaps {what}: routes for pod \
     subnets would capture this node's own traffic, etcd's included; choose a {field} that \
     overlaps none of the nodes' networks"
)]
pub struct OverlapError {
    pub network: String,
    /// `Network` or `IPv6Network`.
    pub field: String,
    pub what: String,
}

impl<N: Cidr> HostNetsOf<N> {
    /// What in here `net` covers or overlaps, described; None if nothing.
    fn captured_by(&self, net: N) -> Option<String> {
        if let Some(p) = self.underlay.iter().find(|p| overlaps(**p, net)) {
            return Some(format!(
                "{p}, the network of the underlay interface {}",
                self.underlay_name
            ));
        }
        if let Some(ip) = self.public_ip.filter(|ip| net.contains_addr(*ip)) {
            return Some(format!("{ip}, this node's public IP"));
        }
        if let Some(ip) = self.servers.iter().find(|ip| net.contains_addr(**ip)) {
            return Some(format!("{ip}, {}", self.servers_are));
        }
        None
    }

    /// At start: the pod network must stay clear of the node's own addresses.
    pub fn check_network(&self, network: N) -> Result<(), OverlapError> {
        match self.captured_by(network) {
            Some(what) => Err(OverlapError {
                network: network.to_string(),
                field: format!("{}Network", N::FIELD_PREFIX),
                what,
            }),
            None => Ok(()),
        }
    }

    /// Why a peer's `subnet` must not be routed, if it must not: it covers our addresses, or a
    /// public IP in `lease_ips` (the tunnel to that node would go into the tunnel).
    pub fn refuse(&self, subnet: N, lease_ips: &BTreeSet<N::Addr>) -> Option<String> {
        if let Some(what) = self.captured_by(subnet) {
            return Some(format!("its subnet {subnet} overlaps {what}"));
        }
        lease_ips
            .range(N::addr_from_bits(subnet.start())..=N::addr_from_bits(subnet.end()))
            .next()
            .map(|ip| format!("its subnet {subnet} contains {ip}, a node's public IP"))
    }
}

/// The host part of an etcd endpoint (`http://10.0.0.11:2379`, `10.0.0.11:2379`,
/// `https://etcd.example:2379`), without scheme, user info, port or path.
pub fn endpoint_host(endpoint: &str) -> Option<&str> {
    let rest = endpoint
        .split_once("://")
        .map_or(endpoint, |(_, r)| r)
        .split('/')
        .next()?;
    let rest = rest.rsplit_once('@').map_or(rest, |(_, r)| r);
    let host = match rest.strip_prefix('[') {
        Some(v6) => v6.split(']').next()?,
        None => rest.rsplit_once(':').map_or(rest, |(h, _)| h),
    };
    (!host.is_empty()).then_some(host)
}

/// The addresses (both families) of the etcd endpoints: literal ones as they are, names looked
/// up (best effort: a name that does not resolve now is left out). Each family's side checks
/// its own.
pub async fn etcd_addresses(endpoints: &[String]) -> Vec<IpAddr> {
    let mut out = Vec::new();
    for e in endpoints.iter().flat_map(|e| e.split(',')) {
        let Some(host) = endpoint_host(e.trim()) else {
            continue;
        };
        if let Ok(ip) = host.parse::<IpAddr>() {
            out.push(ip);
            continue;
        }
        let lookup = tokio::net::lookup_host((host, 0));
        match tokio::time::timeout(Duration::from_secs(3), lookup).await {
            Ok(Ok(addrs)) => out.extend(addrs.map(|a: SocketAddr| a.ip())),
            _ => tracing::warn!(
                host,
                "cannot resolve the etcd endpoint's name; not checked against the pod network"
            ),
        }
    }
    out.sort();
    out.dedup();
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host() -> HostNets {
        HostNets {
            public_ip: Some("198.18.0.11".parse().unwrap()),
            underlay: vec!["198.18.0.0/24".parse().unwrap()],
            underlay_name: "eth0".into(),
            servers: vec!["192.0.2.10".parse().unwrap()],
            servers_are: "an etcd endpoint",
        }
    }

    fn net(s: &str) -> Ipv4Net {
        s.parse().unwrap()
    }

    #[test]
    fn a_network_over_the_nodes_own_addresses_is_refused_naming_both() {
        let h = host();
        let e = h
            .check_network(net("198.16.0.0/14"))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("198.16.0.0/14") && e.contains("198.18.0.0/24") && e.contains("eth0"),
            "{e}"
        );
        let e = h
            .check_network(net("192.0.2.0/24"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("192.0.2.10, an etcd endpoint"), "{e}");
        let mut other = host();
        other.public_ip = Some("203.0.113.5".parse().unwrap());
        let e = other
            .check_network(net("203.0.0.0/8"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("203.0.113.5, this node's public IP"), "{e}");
        // Inside the underlay's network is refused as well as around it.
        assert!(h.check_network(net("198.18.0.128/25")).is_err());
        h.check_network(net("10.244.0.0/16")).unwrap();
    }

    #[test]
    fn peer_subnets_over_our_addresses_or_a_tunnel_endpoint_are_refused() {
        let h = host();
        let ips: BTreeSet<std::net::Ipv4Addr> =
            ["198.18.0.12".parse().unwrap(), "10.9.4.7".parse().unwrap()].into();
        let why = h.refuse(net("198.18.0.0/24"), &ips).unwrap();
        assert!(why.contains("the underlay interface eth0"), "{why}");
        let why = h.refuse(net("10.9.4.0/24"), &ips).unwrap();
        assert!(why.contains("10.9.4.7, a node's public IP"), "{why}");
        assert!(h
            .refuse(net("192.0.2.0/24"), &ips)
            .unwrap()
            .contains("etcd"));
        assert_eq!(h.refuse(net("10.244.3.0/24"), &ips), None);
        assert_eq!(HostNets::default().refuse(net("10.244.3.0/24"), &ips), None);
    }

    #[test]
    fn endpoint_hosts() {
        for (e, want) in [
            ("http://198.18.0.1:2379", Some("198.18.0.1")),
            ("198.18.0.1:2379", Some("198.18.0.1")),
            ("https://user:pw@etcd.example:2379/x", Some("etcd.example")),
            ("etcd", Some("etcd")),
            ("http://[fd00::1]:2379", Some("fd00::1")),
            ("http://:2379", None),
        ] {
            assert_eq!(endpoint_host(e), want, "{e}");
        }
    }

    #[test]
    fn literal_endpoint_addresses_need_no_lookup() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let ips = rt.block_on(etcd_addresses(&[
            "http://198.18.0.1:2379,198.18.0.2:2379".into(),
            "http://[fd00::1]:2379".into(),
            "http://198.18.0.1:2379".into(),
        ]));
        assert_eq!(
            ips,
            vec![
                "198.18.0.1".parse::<IpAddr>().unwrap(),
                "198.18.0.2".parse().unwrap(),
                "fd00::1".parse().unwrap()
            ]
        );
    }
}
