//! Lease values in flannel's JSON format, and turning other nodes' leases into peers.
//! `{"PublicIP":"192.168.64.3","PublicIPv6":null,"BackendType":"vxlan",
//!   "BackendData":{"VNI":1,"VtepMAC":"c6:d2:32:6f:8f:44"}}`; a dual-stack lease has
//! `"PublicIPv6":"fd00::3"` and, for vxlan, `"BackendV6Data":{"VNI":1,"VtepMAC":".."}` (the v6
//! device's own MAC).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::{Ipv4Net, Ipv6Net};
use serde::{Deserialize, Serialize};

use crate::config::{BackendKind, NetworkConfig};
use crate::excerpt::{echo, excerpt, ECHO_MAX};
use crate::mac::MacAddr;
use crate::peer::{Peer, PeerOf};
use crate::subnet::{overlaps, Cidr, SubnetRange};

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LeaseAttrs {
    /// flannel's `PublicIP` and `BackendType`/`BackendData`; None on an IPv6-only lease (flannel
    /// writes `"PublicIP":"0.0.0.0"` and no BackendData). A lease has at least one side.
    pub v4: Option<LeaseSide<Ipv4Addr>>,
    /// The IPv6 side of a dual-stack or IPv6-only lease; its backend is of the same type as
    /// the IPv4 one.
    pub v6: Option<LeaseV6>,
}

/// One address family's side of a lease: the node's endpoint and how to reach its subnet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LeaseSide<A> {
    pub public_ip: A,
    pub backend: LeaseBackend,
}

/// flannel's `PublicIPv6` and `BackendV6Data`.
pub type LeaseV6 = LeaseSide<Ipv6Addr>;

/// What a lease says about how to reach the node's subnet: flannel's BackendType and
/// BackendData.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LeaseBackend {
    /// `"BackendType":"vxlan","BackendData":{"VNI":..,"VtepMAC":".."}`.
    Vxlan { vni: u32, vtep_mac: MacAddr },
    /// `"BackendType":"host-gw"` (no BackendData): reachable only by a route via PublicIP.
    HostGw,
    /// `"BackendType":"udp"` (no BackendData): flannel's userspace backend, IP packets in UDP
    /// datagrams to PublicIP.
    Udp,
}

impl LeaseBackend {
    pub fn type_name(&self) -> &'static str {
        match self {
            LeaseBackend::Vxlan { .. } => "vxlan",
            LeaseBackend::HostGw => "host-gw",
            LeaseBackend::Udp => "udp",
        }
    }
}

// Field order and names are flannel's; `PublicIPv6` is always written (null without IPv6),
// BackendData and BackendV6Data only when the backend has some (flannel's `omitempty`).
#[derive(Serialize)]
struct LeaseOut<'a> {
    #[serde(rename = "PublicIP")]
    public_ip: Ipv4Addr,
    #[serde(rename = "PublicIPv6")]
    public_ipv6: Option<Ipv6Addr>,
    #[serde(rename = "BackendType")]
    backend_type: &'a str,
    #[serde(rename = "BackendData", skip_serializing_if = "Option::is_none")]
    backend_data: Option<BackendDataOut>,
    #[serde(rename = "BackendV6Data", skip_serializing_if = "Option::is_none")]
    backend_v6_data: Option<BackendDataOut>,
}

#[derive(Serialize)]
struct BackendDataOut {
    #[serde(rename = "VNI")]
    vni: u32,
    #[serde(rename = "VtepMAC")]
    vtep_mac: MacAddr,
}

// Reading is lenient about what other implementations add; strict about what we need.
#[derive(Deserialize)]
struct LeaseIn {
    #[serde(rename = "PublicIP", default)]
    public_ip: Option<String>,
    #[serde(rename = "BackendType", default)]
    backend_type: Option<String>,
    #[serde(rename = "BackendData", default)]
    backend_data: Option<BackendDataIn>,
    #[serde(rename = "PublicIPv6", default)]
    public_ipv6: Option<String>,
    #[serde(rename = "BackendV6Data", default)]
    backend_v6_data: Option<BackendDataIn>,
}

#[derive(Deserialize)]
struct BackendDataIn {
    #[serde(rename = "VNI", default)]
    vni: Option<u32>,
    #[serde(rename = "VtepMAC", default)]
    vtep_mac: Option<String>,
}

impl LeaseAttrs {
    /// A vxlan lease.
    pub fn vxlan(public_ip: Ipv4Addr, vni: u32, vtep_mac: MacAddr) -> Self {
        LeaseAttrs {
            v4: Some(LeaseSide {
                public_ip,
                backend: LeaseBackend::Vxlan { vni, vtep_mac },
            }),
            v6: None,
        }
    }

    /// The side that names the node (its endpoint and VTEP MAC when finding our own lease):
    /// the IPv4 one, or the IPv6 one on an IPv6-only lease.
    pub fn primary(&self) -> Option<LeaseSide<IpAddr>> {
        let side = |ip: IpAddr, backend| LeaseSide {
            public_ip: ip,
            backend,
        };
        self.v4
            .map(|s| side(s.public_ip.into(), s.backend))
            .or_else(|| self.v6.map(|s| side(s.public_ip.into(), s.backend)))
    }

    /// The VTEP MAC the primary side announces (vxlan leases only).
    pub fn vtep_mac(&self) -> Option<MacAddr> {
        self.primary()?.vtep_mac()
    }

    pub fn to_json(&self) -> String {
        let data = |b: LeaseBackend| match b {
            LeaseBackend::Vxlan { vni, vtep_mac } => Some(BackendDataOut { vni, vtep_mac }),
            LeaseBackend::HostGw | LeaseBackend::Udp => None,
        };
        serde_json::to_string(&LeaseOut {
            // flannel's IPv6-only lease has the zero address here.
            public_ip: self.v4.map_or(Ipv4Addr::UNSPECIFIED, |v| v.public_ip),
            public_ipv6: self.v6.map(|v| v.public_ip),
            // Both sides have the same type; a lease without either is never written.
            backend_type: self.primary().map_or("", |s| s.backend.type_name()),
            backend_data: self.v4.and_then(|v| data(v.backend)),
            backend_v6_data: self.v6.and_then(|v| data(v.backend)),
        })
        .expect("serializing plain data cannot fail")
    }

    /// Decode and check a lease value (ours or a peer's): vxlan, host-gw or udp, with an IPv4
    /// side, an IPv6 side or both. Errors echo at most an excerpt of what the value holds.
    pub fn from_json(value: &[u8]) -> Result<Self, LeaseError> {
        let sides = Sides::read(value)?;
        let v4 = sides.v4?;
        // Beside an IPv4 side the IPv6 one is only read, never a reason to lose the IPv4 one: a
        // side with a problem is judged on its own (`parse_lease`). Alone it is the lease.
        let v6 = match v4 {
            Some(_) => sides.v6.ok().flatten(),
            None => Some(sides.v6?.ok_or_else(|| {
                LeaseError::Invalid(
                    "PublicIP is 0.0.0.0 and PublicIPv6 is missing: the lease names no endpoint"
                        .into(),
                )
            })?),
        };
        Ok(LeaseAttrs { v4, v6 })
    }
}

/// Both sides of a lease value, each checked on its own: an IPv6 side's problem is not the IPv4
/// side's (a broken IPv4 side, though, makes the value no lease: see `Ipv6Net`'s
/// `side_from_json`). Ok(None): the value has no such side.
struct Sides {
    v4: Result<Option<LeaseSide<Ipv4Addr>>, LeaseError>,
    v6: Result<Option<LeaseV6>, LeaseError>,
}

impl Sides {
    /// Errors here (not JSON, no usable BackendType) are both sides'.
    fn read(value: &[u8]) -> Result<Sides, LeaseError> {
        let raw = decode(value)
            .map_err(|e| LeaseError::Invalid(format!("lease value is not valid JSON: {e}")))?;
        let backend = match raw.backend_type.as_deref() {
            Some(t @ ("vxlan" | "host-gw" | "udp")) => t,
            Some(t) => {
                return Err(LeaseError::Invalid(format!(
                    "BackendType {:?} is not supported (\"vxlan\", \"host-gw\" or \"udp\")",
                    echo(t)
                )))
            }
            None => return Err(LeaseError::Invalid("BackendType is missing".into())),
        };
        Ok(Sides {
            v4: v4_side(raw.public_ip, raw.backend_data, backend),
            v6: v6_side(raw.public_ipv6, raw.backend_v6_data, backend),
        })
    }
}

/// The backend of one side: `data` is its BackendData (or BackendV6Data), read for vxlan.
fn side_backend(
    backend: &str,
    data: Option<BackendDataIn>,
    field: &str,
) -> Result<LeaseBackend, LeaseError> {
    Ok(match backend {
        "vxlan" => vxlan_data(data, field)?,
        "host-gw" => LeaseBackend::HostGw,
        _ => LeaseBackend::Udp,
    })
}

/// PublicIP and BackendData. flannel writes `"PublicIP":"0.0.0.0"` on an IPv6-only lease: no
/// IPv4 side.
fn v4_side(
    public_ip: Option<String>,
    data: Option<BackendDataIn>,
    backend: &str,
) -> Result<Option<LeaseSide<Ipv4Addr>>, LeaseError> {
    let ip = public_ip.ok_or_else(|| LeaseError::Invalid("PublicIP is missing".into()))?;
    if ip == "0.0.0.0" {
        return Ok(None);
    }
    let public_ip: Ipv4Addr = ip.parse().map_err(|_| {
        LeaseError::Invalid(format!("PublicIP {:?} is not an IPv4 address", echo(&ip)))
    })?;
    if public_ip.is_unspecified()
        || public_ip.is_multicast()
        || public_ip.is_broadcast()
        || public_ip.is_loopback()
    {
        return Err(LeaseError::Invalid(format!(
            "PublicIP {public_ip} cannot be a tunnel endpoint"
        )));
    }
    let backend = side_backend(backend, data, "BackendData")?;
    Ok(Some(LeaseSide { public_ip, backend }))
}

/// PublicIPv6 and BackendV6Data; the v6 backend is of the lease's BackendType.
fn v6_side(
    public_ipv6: Option<String>,
    data: Option<BackendDataIn>,
    backend: &str,
) -> Result<Option<LeaseV6>, LeaseError> {
    let Some(ip) = public_ipv6 else {
        return Ok(None);
    };
    let public_ip: Ipv6Addr = ip.parse().map_err(|_| {
        LeaseError::Invalid(format!("PublicIPv6 {:?} is not an IPv6 address", echo(&ip)))
    })?;
    if public_ip.is_unspecified() || public_ip.is_multicast() || public_ip.is_loopback() {
        return Err(LeaseError::Invalid(format!(
            "PublicIPv6 {public_ip} cannot be a tunnel endpoint"
        )));
    }
    let backend = side_backend(backend, data, "BackendV6Data")?;
    Ok(Some(LeaseV6 { public_ip, backend }))
}

/// A vxlan lease on a vxlan network must use our VNI: the kernel would drop its packets (a
/// silent blackhole).
fn check_vni(cfg: &NetworkConfig, backend: LeaseBackend) -> Result<(), LeaseError> {
    if let (BackendKind::Vxlan, LeaseBackend::Vxlan { vni, .. }) = (cfg.backend.kind, backend) {
        if vni != cfg.backend.vni {
            return Err(LeaseError::Invalid(format!(
                "VNI {vni} is not this network's VNI {} (a node not yet restarted after a VNI \
                 change?)",
                cfg.backend.vni
            )));
        }
    }
    Ok(())
}

/// A vxlan lease's BackendData (or BackendV6Data): a usable unicast VTEP MAC, and the VNI
/// (flannel's default when missing).
fn vxlan_data(data: Option<BackendDataIn>, field: &str) -> Result<LeaseBackend, LeaseError> {
    let data = data.ok_or_else(|| LeaseError::Invalid(format!("{field} is missing")))?;
    let mac = data
        .vtep_mac
        .ok_or_else(|| LeaseError::Invalid(format!("{field}.VtepMAC is missing")))?;
    let vtep_mac: MacAddr = mac
        .parse()
        .map_err(|e| LeaseError::Invalid(format!("{field}.VtepMAC: {e}")))?;
    if vtep_mac.is_zero() {
        return Err(LeaseError::Invalid(format!(
            "{field}.VtepMAC is 00:00:00:00:00:00"
        )));
    }
    // The kernel keeps group addresses out of the FDB as unicast entries: the peer could never
    // be programmed.
    if vtep_mac.is_multicast() {
        return Err(LeaseError::Invalid(format!(
            "{field}.VtepMAC {vtep_mac} is a multicast or broadcast address"
        )));
    }
    Ok(LeaseBackend::Vxlan {
        vni: data.vni.unwrap_or(crate::config::DEFAULT_VNI),
        vtep_mac,
    })
}

/// A lease value must be a JSON object (serde would also take `[]` for a struct). serde's
/// messages quote the offending value, hence the excerpt.
fn decode(value: &[u8]) -> Result<LeaseIn, String> {
    let short = |e: serde_json::Error| excerpt(&e.to_string(), 2 * ECHO_MAX).into_owned();
    match serde_json::from_slice::<serde_json::Value>(value) {
        Ok(v @ serde_json::Value::Object(_)) => serde_json::from_value(v).map_err(short),
        Ok(v) => Err(format!("a JSON {} is not an object", kind(&v))),
        Err(e) => Err(short(e)),
    }
}

fn kind(v: &serde_json::Value) -> &'static str {
    match v {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "boolean",
        serde_json::Value::Number(_) => "number",
        serde_json::Value::String(_) => "string",
        serde_json::Value::Array(_) => "array",
        serde_json::Value::Object(_) => "object",
    }
}

/// The endpoint of a lease value's primary side, whatever its backend (PublicIP, or
/// PublicIPv6 on an IPv6-only lease): used to find our own old lease.
pub fn endpoint_of(value: &[u8]) -> Option<IpAddr> {
    let raw = decode(value).ok()?;
    match raw.public_ip.as_deref()? {
        "0.0.0.0" => raw.public_ipv6?.parse::<Ipv6Addr>().ok().map(IpAddr::V6),
        ip => ip.parse::<Ipv4Addr>().ok().map(IpAddr::V4),
    }
}

/// The VTEP MAC of a lease value's primary side, if any: twilld keeps its MAC across restarts
/// and reboots, so a lease with ours is this node's, whatever address it had then.
pub fn vtep_mac_of(value: &[u8]) -> Option<MacAddr> {
    let raw = decode(value).ok()?;
    let data = match raw.public_ip.as_deref() {
        Some("0.0.0.0") => raw.backend_v6_data,
        _ => raw.backend_data,
    };
    data?.vtep_mac?.parse().ok()
}

#[derive(Debug, thiserror::Error)]
pub enum LeaseError {
    #[error("invalid lease: {0}")]
    Invalid(String),
}

/// Validate another node's lease (key already parsed to `subnet`): `parse_lease`, and the subnet
/// must not overlap `own`.
pub fn parse_peer(
    cfg: &NetworkConfig,
    own: Option<Ipv4Net>,
    subnet: Ipv4Net,
    value: &[u8],
) -> Result<Peer, LeaseError> {
    if let Some(own) = own {
        if overlaps(own, subnet) {
            return Err(LeaseError::Invalid(format!(
                "subnet {subnet} overlaps our own subnet {own}"
            )));
        }
    }
    parse_lease(cfg, subnet, value)
}

/// What differs between a lease's two sides: where each lives in the value and the config,
/// and the field names errors use.
pub trait LeaseFamily: Cidr {
    /// Put before "subnet" and "network" in messages: "" or "IPv6 ".
    const LABEL: &'static str;
    const PUBLIC_IP_FIELD: &'static str;
    const VTEP_MAC_FIELD: &'static str;
    /// How a lease value without this side looks.
    const ABSENT: &'static str;
    /// The subnets the network hands out in this family, if it has this family.
    fn range(cfg: &NetworkConfig) -> Option<&SubnetRange<Self>>;
    /// This family's side of a lease value, checked on its own (None: the lease has none).
    fn side_from_json(value: &[u8]) -> Result<Option<LeaseSide<Self::Addr>>, LeaseError>;
}

impl LeaseFamily for Ipv4Net {
    const LABEL: &'static str = "";
    const PUBLIC_IP_FIELD: &'static str = "PublicIP";
    const VTEP_MAC_FIELD: &'static str = "VtepMAC";
    const ABSENT: &'static str = "is 0.0.0.0";
    fn range(cfg: &NetworkConfig) -> Option<&SubnetRange<Self>> {
        cfg.ipv4.as_ref()
    }
    fn side_from_json(value: &[u8]) -> Result<Option<LeaseSide<Ipv4Addr>>, LeaseError> {
        Sides::read(value)?.v4
    }
}

impl LeaseFamily for Ipv6Net {
    const LABEL: &'static str = "IPv6 ";
    const PUBLIC_IP_FIELD: &'static str = "PublicIPv6";
    const VTEP_MAC_FIELD: &'static str = "BackendV6Data.VtepMAC";
    const ABSENT: &'static str = "is missing";
    fn range(cfg: &NetworkConfig) -> Option<&SubnetRange<Self>> {
        cfg.ipv6.as_ref()
    }
    /// A value whose IPv4 side is broken (not just absent: flannel's IPv6-only `0.0.0.0`) is
    /// no lease at all, as flanneld drops it whole: the IPv6 side is not used either.
    fn side_from_json(value: &[u8]) -> Result<Option<LeaseV6>, LeaseError> {
        let sides = Sides::read(value)?;
        sides.v4?;
        sides.v6
    }
}

impl<A> LeaseSide<A> {
    /// The VTEP MAC this side announces (vxlan only).
    pub fn vtep_mac(&self) -> Option<MacAddr> {
        match self.backend {
            LeaseBackend::Vxlan { vtep_mac, .. } => Some(vtep_mac),
            LeaseBackend::HostGw | LeaseBackend::Udp => None,
        }
    }
}

/// Validate one family's side of a lease against the network config alone (the same on every
/// node): JSON must decode, the subnet must be inside the family's network with its configured
/// length, the public IP must not be a pod address, and a vxlan lease on a vxlan network must
/// use our VNI (the kernel would drop its packets: a silent blackhole).
pub fn parse_lease<N: LeaseFamily>(
    cfg: &NetworkConfig,
    subnet: N,
    value: &[u8],
) -> Result<PeerOf<N>, LeaseError> {
    let label = N::LABEL;
    let Some(range) = N::range(cfg) else {
        return Err(LeaseError::Invalid(format!(
            "{label}subnet {subnet}: this network has no {0} (Enable{0})",
            N::FAMILY
        )));
    };
    if !range.network.contains_net(subnet) {
        return Err(LeaseError::Invalid(format!(
            "{label}subnet {subnet} is outside the {label}network {}",
            range.network
        )));
    }
    if subnet.prefix() != range.subnet_len {
        return Err(LeaseError::Invalid(format!(
            "{label}subnet {subnet} is not a /{} ({}SubnetLen)",
            range.subnet_len,
            N::FIELD_PREFIX
        )));
    }
    let side = N::side_from_json(value)?.ok_or_else(|| {
        LeaseError::Invalid(format!(
            "the key names the {label}subnet {subnet}, but the lease has no {} side ({} {})",
            N::FAMILY,
            N::PUBLIC_IP_FIELD,
            N::ABSENT
        ))
    })?;
    if range.network.contains_addr(side.public_ip) {
        return Err(LeaseError::Invalid(format!(
            "{} {} is inside the {label}pod network {}: a pod address cannot carry the tunnel",
            N::PUBLIC_IP_FIELD,
            side.public_ip,
            range.network
        )));
    }
    check_vni(cfg, side.backend)?;
    Ok(PeerOf {
        subnet,
        public_ip: side.public_ip,
        vtep_mac: side.vtep_mac(),
    })
}

/// A peer lease that claims this node's identity only in part: our public IP with another MAC
/// (we would encapsulate to ourselves), or our VTEP MAC at another address (the FDB entry for
/// our own MAC would send our traffic away). A lease with both ours is ours, not an error.
pub fn check_against_own(p: &Peer, own: &LeaseAttrs) -> Result<(), LeaseError> {
    match own.v4 {
        Some(s) => check_against_own_of(p, s.public_ip, s.vtep_mac()),
        // No IPv4 side of ours to claim.
        None => Ok(()),
    }
}

/// `check_against_own` for one family's side: `own_ip` and `own_mac` are this node's
/// endpoint and VTEP MAC in that family.
pub fn check_against_own_of<N: LeaseFamily>(
    p: &PeerOf<N>,
    own_ip: N::Addr,
    own_mac: Option<MacAddr>,
) -> Result<(), LeaseError> {
    let (ip_field, mac_field) = (N::PUBLIC_IP_FIELD, N::VTEP_MAC_FIELD);
    let same_ip = p.public_ip == own_ip;
    let same_mac = p.vtep_mac.is_some() && p.vtep_mac == own_mac;
    if same_ip && p.vtep_mac != own_mac {
        return Err(LeaseError::Invalid(format!(
            "{ip_field} {} is this node's address, but the lease has another {mac_field} ({})",
            p.public_ip,
            p.vtep_mac.map_or("none".to_string(), |m| m.to_string())
        )));
    }
    if same_mac && !same_ip {
        return Err(LeaseError::Invalid(format!(
            "{mac_field} {} is this node's, but the lease has another {ip_field} ({})",
            own_mac.map_or(String::new(), |m| m.to_string()),
            p.public_ip
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAC: &str = "c6:d2:32:6f:8f:44";

    fn cfg() -> NetworkConfig {
        NetworkConfig::parse(br#"{"Network":"10.244.0.0/16"}"#).unwrap()
    }

    fn net(s: &str) -> Ipv4Net {
        s.parse().unwrap()
    }

    fn attrs() -> LeaseAttrs {
        LeaseAttrs {
            v4: Some(LeaseSide {
                public_ip: Ipv4Addr::new(192, 168, 64, 3),
                backend: LeaseBackend::Vxlan {
                    vni: 1,
                    vtep_mac: MAC.parse().unwrap(),
                },
            }),
            v6: None,
        }
    }

    #[test]
    fn json_is_flannels_exactly() {
        assert_eq!(
            attrs().to_json(),
            r#"{"PublicIP":"192.168.64.3","PublicIPv6":null,"BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"c6:d2:32:6f:8f:44"}}"#
        );
    }

    #[test]
    fn json_round_trip() {
        let a = LeaseAttrs {
            v4: Some(LeaseSide {
                public_ip: Ipv4Addr::new(198, 18, 0, 7),
                backend: LeaseBackend::Vxlan {
                    vni: 4096,
                    vtep_mac: "02:00:00:aa:bb:cc".parse().unwrap(),
                },
            }),
            v6: None,
        };
        assert_eq!(LeaseAttrs::from_json(a.to_json().as_bytes()).unwrap(), a);
        assert_eq!(
            endpoint_of(a.to_json().as_bytes()),
            a.v4.map(|s| s.public_ip.into())
        );
        let h = LeaseAttrs {
            v4: Some(LeaseSide {
                backend: LeaseBackend::HostGw,
                ..a.v4.unwrap()
            }),
            ..a
        };
        assert_eq!(LeaseAttrs::from_json(h.to_json().as_bytes()).unwrap(), h);
    }

    fn dual(backend: LeaseBackend, v6: LeaseBackend) -> LeaseAttrs {
        LeaseAttrs {
            v4: Some(LeaseSide {
                public_ip: Ipv4Addr::new(192, 168, 64, 3),
                backend,
            }),
            v6: Some(LeaseV6 {
                public_ip: "fd00:64::3".parse().unwrap(),
                backend: v6,
            }),
        }
    }

    #[test]
    fn dual_stack_json_is_flannels_exactly() {
        let vx = |m: &str| LeaseBackend::Vxlan {
            vni: 1,
            vtep_mac: m.parse().unwrap(),
        };
        let a = dual(vx(MAC), vx("c6:d2:32:6f:8f:45"));
        assert_eq!(
            a.to_json(),
            r#"{"PublicIP":"192.168.64.3","PublicIPv6":"fd00:64::3","BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"c6:d2:32:6f:8f:44"},"BackendV6Data":{"VNI":1,"VtepMAC":"c6:d2:32:6f:8f:45"}}"#
        );
        assert_eq!(LeaseAttrs::from_json(a.to_json().as_bytes()).unwrap(), a);
        let h = dual(LeaseBackend::HostGw, LeaseBackend::HostGw);
        assert_eq!(
            h.to_json(),
            r#"{"PublicIP":"192.168.64.3","PublicIPv6":"fd00:64::3","BackendType":"host-gw"}"#
        );
        assert_eq!(LeaseAttrs::from_json(h.to_json().as_bytes()).unwrap(), h);
        // A v4-only lease reads back with no v6 side, written as null or left out.
        assert_eq!(
            LeaseAttrs::from_json(attrs().to_json().as_bytes())
                .unwrap()
                .v6,
            None
        );
        let v = format!(
            r#"{{"PublicIP":"198.18.0.2","BackendType":"vxlan","BackendData":{{"VtepMAC":"{MAC}"}}}}"#
        );
        assert_eq!(LeaseAttrs::from_json(v.as_bytes()).unwrap().v6, None);
    }

    /// flannel's IPv6-only lease: `"PublicIP":"0.0.0.0"` and no BackendData; only the IPv6
    /// side names the node.
    #[test]
    fn ipv6_only_json_is_flannels_exactly() {
        let vx = LeaseBackend::Vxlan {
            vni: 1,
            vtep_mac: "c6:d2:32:6f:8f:45".parse().unwrap(),
        };
        let only6 = |backend| LeaseAttrs {
            v4: None,
            v6: Some(LeaseV6 {
                public_ip: "fd00:64::3".parse().unwrap(),
                backend,
            }),
        };
        let a = only6(vx);
        let flannel = r#"{"PublicIP":"0.0.0.0","PublicIPv6":"fd00:64::3","BackendType":"vxlan","BackendV6Data":{"VNI":1,"VtepMAC":"c6:d2:32:6f:8f:45"}}"#;
        assert_eq!(a.to_json(), flannel);
        assert_eq!(LeaseAttrs::from_json(flannel.as_bytes()).unwrap(), a);
        let h = only6(LeaseBackend::HostGw);
        assert_eq!(
            h.to_json(),
            r#"{"PublicIP":"0.0.0.0","PublicIPv6":"fd00:64::3","BackendType":"host-gw"}"#
        );
        assert_eq!(LeaseAttrs::from_json(h.to_json().as_bytes()).unwrap(), h);
        // The IPv6 side names the node: its address and MAC find our own old lease.
        assert_eq!(
            endpoint_of(flannel.as_bytes()),
            Some("fd00:64::3".parse().unwrap())
        );
        assert_eq!(vtep_mac_of(flannel.as_bytes()), a.vtep_mac());
        assert_eq!(
            a.vtep_mac().unwrap().to_string(),
            "c6:d2:32:6f:8f:45".to_string()
        );
        assert_eq!(Ipv4Net::side_from_json(flannel.as_bytes()).unwrap(), None);
        // Under an IPv4 key it is no IPv4 peer, and says why.
        let e = parse_peer(&cfg(), None, net("10.244.2.0/24"), flannel.as_bytes()).unwrap_err();
        assert!(
            e.to_string()
                .contains("has no IPv4 side (PublicIP is 0.0.0.0)"),
            "{e}"
        );
        // A broken IPv4 side (not flannel's 0.0.0.0) makes the value no lease, as flanneld
        // drops it whole: no IPv6 peer from it either.
        let broken = r#"{"PublicIP":"nope","PublicIPv6":"fd00:64::3","BackendType":"host-gw"}"#;
        let e = Ipv6Net::side_from_json(broken.as_bytes()).unwrap_err();
        assert!(e.to_string().contains("PublicIP \"nope\""), "{e}");
        // Alone, the IPv6 side must be usable: it is the whole lease.
        for (value, want) in [
            (
                r#"{"PublicIP":"0.0.0.0","PublicIPv6":null,"BackendType":"vxlan"}"#,
                "PublicIP is 0.0.0.0 and PublicIPv6 is missing",
            ),
            (
                r#"{"PublicIP":"0.0.0.0","PublicIPv6":"fd00:64::3","BackendType":"vxlan"}"#,
                "BackendV6Data is missing",
            ),
            (
                r#"{"PublicIP":"0.0.0.0","PublicIPv6":"ff02::1","BackendType":"host-gw"}"#,
                "PublicIPv6 ff02::1 cannot be a tunnel endpoint",
            ),
        ] {
            let e = LeaseAttrs::from_json(value.as_bytes())
                .unwrap_err()
                .to_string();
            assert!(e.contains(want), "{e:?} lacks {want:?}");
        }
    }

    #[test]
    fn dual_stack_lease_errors_name_the_v6_field_and_keep_the_v4_peer() {
        let v6cfg = NetworkConfig::parse(
            br#"{"Network":"10.244.0.0/16","EnableIPv6":true,"IPv6Network":"fd00:10:244::/56"}"#,
        )
        .unwrap();
        let value = |ip6: &str, data6: &str| {
            format!(
                r#"{{"PublicIP":"198.18.0.2","PublicIPv6":{ip6},"BackendType":"vxlan","BackendData":{{"VNI":1,"VtepMAC":"{MAC}"}}{data6}}}"#
            )
        };
        let good6 = r#","BackendV6Data":{"VNI":1,"VtepMAC":"02:00:00:00:00:06"}"#;
        for (ip6, data6, want) in [
            (
                r#""banana""#,
                good6,
                r#"PublicIPv6 "banana" is not an IPv6 address"#,
            ),
            (r#""10.0.0.1""#, good6, "is not an IPv6 address"),
            (
                r#""::1""#,
                good6,
                "PublicIPv6 ::1 cannot be a tunnel endpoint",
            ),
            (r#""ff02::1""#, good6, "cannot be a tunnel endpoint"),
            (r#""fd00:1::2""#, "", "BackendV6Data is missing"),
            (
                r#""fd00:1::2""#,
                r#","BackendV6Data":{"VNI":1}"#,
                "BackendV6Data.VtepMAC is missing",
            ),
            (
                r#""fd00:1::2""#,
                r#","BackendV6Data":{"VtepMAC":"01:00:5e:00:00:01"}"#,
                "BackendV6Data.VtepMAC 01:00:5e:00:00:01 is a multicast",
            ),
        ] {
            let v = value(ip6, data6);
            let e = Ipv6Net::side_from_json(v.as_bytes())
                .unwrap_err()
                .to_string();
            assert!(e.contains(want), "{e:?} lacks {want:?}");
            // The v4 side is a peer all the same, without a v6 side.
            assert_eq!(LeaseAttrs::from_json(v.as_bytes()).unwrap().v6, None);
            for cfg in [cfg(), v6cfg.clone()] {
                let p = parse_peer(&cfg, None, net("10.244.2.0/24"), v.as_bytes());
                assert_eq!(p.unwrap().public_ip, Ipv4Addr::new(198, 18, 0, 2), "{v}");
            }
        }
        // Against the config: the subnet in IPv6Network with IPv6SubnetLen, not a v6 pod
        // address, the network's VNI.
        let side = |subnet: &str, ip6: &str, data6: &str| {
            parse_lease::<Ipv6Net>(
                &v6cfg,
                subnet.parse().unwrap(),
                value(ip6, data6).as_bytes(),
            )
            .map_err(|e| e.to_string())
        };
        let sub = "fd00:10:244:2::/64";
        for (subnet, ip6, data6, want) in [
            (
                sub,
                r#""fd00:10:244:5::9""#,
                good6,
                "PublicIPv6 fd00:10:244:5::9 is inside the IPv6 pod network",
            ),
            (
                sub,
                r#""fd00:1::2""#,
                r#","BackendV6Data":{"VNI":7,"VtepMAC":"02:00:00:00:00:06"}"#,
                "VNI 7 is not this network's VNI 1",
            ),
            (
                "fd00:10:245::/64",
                r#""fd00:1::2""#,
                good6,
                "IPv6 subnet fd00:10:245::/64 is outside the IPv6 network fd00:10:244::/56",
            ),
            (
                "fd00:10:244:2::/63",
                r#""fd00:1::2""#,
                good6,
                "is not a /64 (IPv6SubnetLen)",
            ),
            (
                sub,
                "null",
                good6,
                "but the lease has no IPv6 side (PublicIPv6 is missing)",
            ),
        ] {
            let e = side(subnet, ip6, data6).unwrap_err();
            assert!(e.contains(want), "{e:?} lacks {want:?}");
        }
        let p = side(sub, r#""fd00:1::2""#, good6).unwrap();
        assert_eq!(
            (p.public_ip, p.vtep_mac.map(|m| m.to_string())),
            (
                "fd00:1::2".parse().unwrap(),
                Some("02:00:00:00:00:06".into())
            )
        );
        let e = parse_lease::<Ipv6Net>(
            &cfg(),
            sub.parse().unwrap(),
            value(r#""fd00:1::2""#, good6).as_bytes(),
        )
        .unwrap_err();
        assert!(
            e.to_string()
                .contains("this network has no IPv6 (EnableIPv6)"),
            "{e}"
        );
        assert_eq!(
            Ipv6Net::side_from_json(attrs().to_json().as_bytes()).unwrap(),
            None
        );
    }

    #[test]
    fn host_gw_json_is_flannels_exactly() {
        let h = LeaseAttrs {
            v4: Some(LeaseSide {
                public_ip: Ipv4Addr::new(192, 168, 64, 3),
                backend: LeaseBackend::HostGw,
            }),
            v6: None,
        };
        // flannel omits an empty BackendData (`json:",omitempty"`).
        assert_eq!(
            h.to_json(),
            r#"{"PublicIP":"192.168.64.3","PublicIPv6":null,"BackendType":"host-gw"}"#
        );
        let p = parse_peer(
            &cfg(),
            None,
            net("10.244.2.0/24"),
            br#"{"PublicIP":"198.18.0.2","PublicIPv6":null,"BackendType":"host-gw"}"#,
        )
        .unwrap();
        assert_eq!(p.vtep_mac, None);
    }

    #[test]
    fn udp_json_is_flannels_exactly() {
        let u = LeaseAttrs {
            v4: Some(LeaseSide {
                public_ip: Ipv4Addr::new(192, 168, 64, 3),
                backend: LeaseBackend::Udp,
            }),
            v6: None,
        };
        // flanneld's udp backend writes no BackendData.
        assert_eq!(
            u.to_json(),
            r#"{"PublicIP":"192.168.64.3","PublicIPv6":null,"BackendType":"udp"}"#
        );
        assert_eq!(LeaseAttrs::from_json(u.to_json().as_bytes()).unwrap(), u);
        let p = parse_peer(
            &cfg(),
            None,
            net("10.244.2.0/24"),
            br#"{"PublicIP":"198.18.0.2","BackendType":"udp"}"#,
        )
        .unwrap();
        assert_eq!(
            (p.public_ip, p.vtep_mac),
            (Ipv4Addr::new(198, 18, 0, 2), None)
        );
    }

    #[test]
    fn parse_peer_accepts_flannel_lease() {
        let p = parse_peer(
            &cfg(),
            Some(net("10.244.1.0/24")),
            net("10.244.2.0/24"),
            attrs().to_json().as_bytes(),
        )
        .unwrap();
        assert_eq!(p.subnet, net("10.244.2.0/24"));
        assert_eq!(p.public_ip, Ipv4Addr::new(192, 168, 64, 3));
        assert_eq!(p.vtep_mac.unwrap().to_string(), MAC);
        // flannel writes PublicIPv6 only on dual-stack; extra keys are fine.
        let v = format!(
            r#"{{"PublicIP":"198.18.0.2","BackendType":"vxlan","BackendData":{{"VNI":1,"VtepMAC":"{MAC}"}},"Extra":1}}"#
        );
        assert!(parse_peer(&cfg(), None, net("10.244.2.0/24"), v.as_bytes()).is_ok());
    }

    #[track_caller]
    fn rejects(own: Option<&str>, subnet: &str, value: &str, want: &str) {
        let e = parse_peer(&cfg(), own.map(net), net(subnet), value.as_bytes())
            .expect_err(value)
            .to_string();
        assert!(e.contains(want), "{e:?} lacks {want:?}");
    }

    #[test]
    fn parse_peer_rejections() {
        let good = attrs().to_json();
        rejects(None, "10.244.2.0/24", "{not json", "not valid JSON");
        rejects(None, "10.244.2.0/24", "[]", "not valid JSON");
        rejects(
            None,
            "10.245.2.0/24",
            &good,
            "outside the network 10.244.0.0/16",
        );
        rejects(None, "10.244.2.0/25", &good, "is not a /24");
        rejects(None, "10.244.0.0/23", &good, "is not a /24");
        rejects(
            Some("10.244.2.0/24"),
            "10.244.2.0/24",
            &good,
            "overlaps our own subnet",
        );
        let mac = |m: &str| {
            format!(
                r#"{{"PublicIP":"198.18.0.2","BackendType":"vxlan","BackendData":{{"VNI":1{m}}}}}"#
            )
        };
        rejects(None, "10.244.2.0/24", &mac(""), "VtepMAC is missing");
        rejects(
            None,
            "10.244.2.0/24",
            &mac(r#","VtepMAC":"00:00:00:00:00:00""#),
            "00:00:00:00:00:00",
        );
        rejects(None, "10.244.2.0/24", &mac(r#","VtepMAC":"zz""#), "VtepMAC");
        rejects(
            None,
            "10.244.2.0/24",
            r#"{"PublicIP":"198.18.0.2","BackendType":"ipip"}"#,
            "BackendType \"ipip\" is not supported",
        );
        rejects(
            None,
            "10.244.2.0/24",
            r#"{"PublicIP":"198.18.0.2","BackendData":{"VtepMAC":"02:00:00:00:00:01"}}"#,
            "BackendType is missing",
        );
        rejects(
            None,
            "10.244.2.0/24",
            r#"{"PublicIP":"198.18.0.2","BackendType":"vxlan"}"#,
            "BackendData is missing",
        );
        rejects(
            None,
            "10.244.2.0/24",
            r#"{"BackendType":"vxlan","BackendData":{"VtepMAC":"02:00:00:00:00:01"}}"#,
            "PublicIP is missing",
        );
        rejects(
            None,
            "10.244.2.0/24",
            r#"{"PublicIP":"nope","BackendType":"vxlan","BackendData":{"VtepMAC":"02:00:00:00:00:01"}}"#,
            "PublicIP \"nope\"",
        );
        rejects(
            None,
            "10.244.2.0/24",
            r#"{"PublicIP":"0.0.0.0","BackendType":"vxlan","BackendData":{"VtepMAC":"02:00:00:00:00:01"}}"#,
            "but the lease has no IPv4 side (PublicIP is 0.0.0.0)",
        );
    }

    fn lease(ip: &str, vni: u32, mac: &str) -> String {
        format!(
            r#"{{"PublicIP":"{ip}","BackendType":"vxlan","BackendData":{{"VNI":{vni},"VtepMAC":"{mac}"}}}}"#
        )
    }

    #[test]
    fn group_mac_addresses_are_refused() {
        for m in [
            "01:00:5e:00:00:01",
            "ff:ff:ff:ff:ff:ff",
            "03:00:00:00:00:02",
        ] {
            rejects(
                None,
                "10.244.2.0/24",
                &lease("198.18.0.2", 1, m),
                "multicast or broadcast",
            );
        }
    }

    #[test]
    fn loopback_and_pod_addresses_are_no_tunnel_endpoints() {
        rejects(
            None,
            "10.244.2.0/24",
            &lease("127.0.0.1", 1, MAC),
            "PublicIP 127.0.0.1 cannot be a tunnel endpoint",
        );
        rejects(
            None,
            "10.244.2.0/24",
            &lease("127.5.6.7", 1, MAC),
            "cannot be a tunnel endpoint",
        );
        rejects(
            None,
            "10.244.2.0/24",
            &lease("10.244.9.3", 1, MAC),
            "PublicIP 10.244.9.3 is inside the pod network 10.244.0.0/16",
        );
    }

    #[test]
    fn another_vni_is_refused_naming_it() {
        rejects(
            None,
            "10.244.2.0/24",
            &lease("198.18.0.2", 7, MAC),
            "VNI 7 is not this network's VNI 1",
        );
        // A missing VNI is flannel's default, 1.
        let no_vni = format!(
            r#"{{"PublicIP":"198.18.0.2","BackendType":"vxlan","BackendData":{{"VtepMAC":"{MAC}"}}}}"#
        );
        assert!(parse_peer(&cfg(), None, net("10.244.2.0/24"), no_vni.as_bytes()).is_ok());
        // host-gw routes directly: the VNI does not matter there.
        let hostgw =
            NetworkConfig::parse(br#"{"Network":"10.244.0.0/16","Backend":{"Type":"host-gw"}}"#)
                .unwrap();
        let v = lease("198.18.0.2", 7, MAC);
        assert!(parse_peer(&hostgw, None, net("10.244.2.0/24"), v.as_bytes()).is_ok());
    }

    #[test]
    fn our_identity_in_part_is_refused() {
        let ours = attrs(); // 192.168.64.3, MAC
        let peer = |ip: &str, mac: Option<&str>| Peer {
            subnet: net("10.244.2.0/24"),
            public_ip: ip.parse().unwrap(),
            vtep_mac: mac.map(|m| m.parse().unwrap()),
        };
        // Both ours: our own lease, not an error (the watcher leaves it out).
        assert!(check_against_own(&peer("192.168.64.3", Some(MAC)), &ours).is_ok());
        assert!(check_against_own(&peer("192.168.64.4", Some("02:00:00:00:00:09")), &ours).is_ok());
        let e = check_against_own(&peer("192.168.64.3", Some("02:00:00:00:00:09")), &ours)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("PublicIP 192.168.64.3 is this node's address"),
            "{e}"
        );
        let e = check_against_own(&peer("192.168.64.3", None), &ours)
            .unwrap_err()
            .to_string();
        assert!(e.contains("this node's address"), "{e}");
        let e = check_against_own(&peer("192.168.64.9", Some(MAC)), &ours)
            .unwrap_err()
            .to_string();
        assert!(e.contains(&format!("VtepMAC {MAC} is this node's")), "{e}");
    }

    #[test]
    fn errors_echo_only_an_excerpt_of_the_value() {
        let huge = "x".repeat(1 << 20);
        let cases = [
            format!(r#"{{"PublicIP":"{huge}","BackendType":"vxlan"}}"#),
            lease("198.18.0.2", 1, &huge),
            format!(r#"{{"PublicIP":"198.18.0.2","BackendType":"{huge}"}}"#),
            format!(
                r#"{{"PublicIP":"198.18.0.2","BackendType":"vxlan","BackendData":{{"VNI":"{huge}"}}}}"#
            ),
            format!(r#"["{huge}"]"#),
            format!(r#""{huge}""#),
            format!("{huge}{{"),
        ];
        for v in cases {
            let e = parse_peer(&cfg(), None, net("10.244.2.0/24"), v.as_bytes())
                .expect_err("garbage")
                .to_string();
            assert!(
                e.len() < 300,
                "{} bytes: {}",
                e.len(),
                &e[..300.min(e.len())]
            );
        }
    }
}
