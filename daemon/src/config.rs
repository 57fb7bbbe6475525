//! The network configuration at `<prefix>/config`, in flannel's JSON format.
//!
//! Parsed by hand from a `serde_json::Value` rather than derived, so every error can name the
//! field and the offending value. Keys match case-insensitively, like Go's encoding/json that
//! flannel uses; unknown keys (EnableIPv4, EnableNFTables, GBP, ...) are tolerated.

use ipnet::{Ipv4Net, Ipv6Net};
use serde::Serialize;
use serde_json::{Map, Value};

use crate::subnet::{size_of_len, Cidr, SubnetRange};

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct NetworkConfig {
    /// The IPv4 subnets the network hands out (`Network`, `SubnetLen`, `SubnetMin`,
    /// `SubnetMax`); None on an IPv6-only network (`"EnableIPv4": false`).
    #[serde(flatten)]
    pub ipv4: Option<SubnetRange<Ipv4Net>>,
    /// The IPv6 side of a dual-stack or IPv6-only network (`EnableIPv6`), validated as flannel
    /// does. A network has at least one of the two.
    pub ipv6: Option<SubnetRange<Ipv6Net>>,
    pub backend: BackendConfig,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct BackendConfig {
    /// "vxlan" (the default), "host-gw" or "udp".
    pub kind: BackendKind,
    pub vni: u32,
    /// UDP port; flannel's 0 means the default, which we make explicit: 8472 for vxlan (the
    /// kernel's), 8285 for udp (flannel's).
    pub port: u16,
    /// Pod MTU if the config sets one; else the underlay MTU minus the backend's overhead
    /// (vxlan 50, host-gw 0, udp 28).
    pub mtu: Option<u32>,
    pub direct_routing: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum BackendKind {
    Vxlan,
    /// Routes via each peer's public IP on the underlay: no encapsulation, peers must share the
    /// node's L2 segment.
    HostGw,
    /// flannel's userspace backend: each IP packet in a UDP datagram, through a TUN device, for
    /// hosts where the kernel's VXLAN cannot run.
    Udp,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// Names the field and the offending value, e.g. `SubnetLen: 31 is out of range (...)`.
    #[error("invalid network config: {field}: {message}")]
    Invalid {
        field: &'static str,
        message: String,
    },
    #[error("network config is not valid JSON: {0}")]
    Json(#[from] serde_json::Error),
}

pub const DEFAULT_VXLAN_PORT: u16 = 8472;
/// flannel's udp backend port.
pub const DEFAULT_UDP_PORT: u16 = 8285;
pub const DEFAULT_VNI: u32 = 1;
const MAX_VNI: u64 = (1 << 24) - 1;

fn invalid(field: &'static str, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        field,
        message: message.into(),
    }
}

/// Go's encoding/json matches keys case-insensitively (exact match first); so do we.
fn field<'a>(obj: &'a Map<String, Value>, name: &str) -> Option<&'a Value> {
    obj.get(name)
        .or_else(|| {
            obj.iter()
                .find(|(k, _)| k.eq_ignore_ascii_case(name))
                .map(|(_, v)| v)
        })
        .filter(|v| !v.is_null())
}

/// An unsigned integer field; Go's zero value (0) counts as "not set", as in flannel.
fn uint_field(
    obj: &Map<String, Value>,
    name: &'static str,
    max: u64,
) -> Result<Option<u64>, ConfigError> {
    let Some(v) = field(obj, name) else {
        return Ok(None);
    };
    let n = v
        .as_u64()
        .ok_or_else(|| invalid(name, format!("{v} is not a non-negative integer")))?;
    if n > max {
        return Err(invalid(
            name,
            format!("{v} is out of range (at most {max})"),
        ));
    }
    Ok((n != 0).then_some(n))
}

fn bool_field(obj: &Map<String, Value>, name: &'static str) -> Result<Option<bool>, ConfigError> {
    match field(obj, name) {
        None => Ok(None),
        Some(Value::Bool(b)) => Ok(Some(*b)),
        Some(v) => Err(invalid(name, format!("{v} is not a boolean"))),
    }
}

/// A string field; "" is Go's zero value and counts as "not set".
fn str_field<'a>(
    obj: &'a Map<String, Value>,
    name: &'static str,
) -> Result<Option<&'a str>, ConfigError> {
    match field(obj, name) {
        None => Ok(None),
        Some(Value::String(s)) if s.is_empty() => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(v) => Err(invalid(name, format!("{v} is not a string"))),
    }
}

fn addr_field<N: Cidr>(
    obj: &Map<String, Value>,
    name: &'static str,
) -> Result<Option<N::Addr>, ConfigError> {
    str_field(obj, name)?
        .map(|s| {
            s.parse::<N::Addr>()
                .map_err(|_| invalid(name, format!("{s:?} is not an {} address", N::FAMILY)))
        })
        .transpose()
}

/// flannel's names for one family's fields.
struct Fields {
    network: &'static str,
    subnet_len: &'static str,
    subnet_min: &'static str,
    subnet_max: &'static str,
}

const V4_FIELDS: Fields = Fields {
    network: "Network",
    subnet_len: "SubnetLen",
    subnet_min: "SubnetMin",
    subnet_max: "SubnetMax",
};

const V6_FIELDS: Fields = Fields {
    network: "IPv6Network",
    subnet_len: "IPv6SubnetLen",
    subnet_min: "IPv6SubnetMin",
    subnet_max: "IPv6SubnetMax",
};

/// One family's subnet range from its fields, with flannel's defaults: SubnetLen 24 (v6: 64)
/// when the network leaves room for four of them, else the network's length + 2; the first
/// subnet skipped; SubnetMin and SubnetMax inside the network and aligned.
fn parse_range<N: Cidr>(
    obj: &Map<String, Value>,
    f: &Fields,
    network: N,
) -> Result<SubnetRange<N>, ConfigError> {
    let plen = network.prefix();
    let max_len = N::BITS - 2;
    // Four subnets at least (flannel's rule): the first is skipped, so fewer leave one node.
    let min_len = plen + 2;
    let subnet_len = match uint_field(obj, f.subnet_len, u64::from(u8::MAX))? {
        Some(n) => n as u8,
        None if plen <= N::DEFAULT_SUBNET_LEN - 2 => N::DEFAULT_SUBNET_LEN,
        None if min_len > max_len => {
            return Err(invalid(
                f.network,
                format!(
                    "{network} is too small: four subnets of at least 4 addresses need a /{} \
                     or larger",
                    max_len - 2
                ),
            ))
        }
        None => min_len,
    };
    if subnet_len < min_len || subnet_len > max_len {
        return Err(invalid(
            f.subnet_len,
            format!(
                "{subnet_len} is out of range (at least {min_len}, for four subnets in the {} \
                 {network}, and at most {max_len})",
                f.network
            ),
        ));
    }

    let size = size_of_len::<N>(subnet_len); // 2 <= size <= 2^127 here
    let (net_start, net_end) = (network.start(), network.end());
    let subnet_min =
        addr_field::<N>(obj, f.subnet_min)?.unwrap_or_else(|| N::addr_from_bits(net_start + size));
    let subnet_max = addr_field::<N>(obj, f.subnet_max)?
        .unwrap_or_else(|| N::addr_from_bits(net_end - (size - 1)));
    for (name, addr) in [(f.subnet_min, subnet_min), (f.subnet_max, subnet_max)] {
        if !network.contains_addr(addr) {
            return Err(invalid(
                name,
                format!("{addr} is outside the {} {network}", f.network),
            ));
        }
        if N::addr_bits(addr) % size != 0 {
            return Err(invalid(
                name,
                format!("{addr} is not aligned to a /{subnet_len} subnet boundary"),
            ));
        }
    }
    if subnet_min > subnet_max {
        return Err(invalid(
            f.subnet_min,
            format!("{subnet_min} is greater than {} {subnet_max}", f.subnet_max),
        ));
    }
    Ok(SubnetRange {
        network,
        subnet_len,
        subnet_min,
        subnet_max,
    })
}

impl NetworkConfig {
    pub fn parse(json: &[u8]) -> Result<Self, ConfigError> {
        let value: Value = serde_json::from_slice(json)?;
        let Value::Object(obj) = value else {
            return Err(invalid("config", format!("{value} is not a JSON object")));
        };

        // Checked as flannel checks it (the config is shared with flanneld nodes): on an
        // IPv6-only network (EnableIPv4 false) the IPv4 fields are not read at all.
        let enable_ipv4 = bool_field(&obj, "EnableIPv4")? != Some(false);
        let enable_ipv6 = bool_field(&obj, "EnableIPv6")? == Some(true);
        if !enable_ipv4 && !enable_ipv6 {
            return Err(invalid(
                "EnableIPv6",
                "not true while EnableIPv4 is false: the network would have no address family \
                 (an IPv6-only network sets \"EnableIPv6\": true and an IPv6Network)",
            ));
        }
        let ipv4 = if enable_ipv4 {
            let network = match str_field(&obj, "Network")? {
                Some(s) => parse_network(s)?,
                None if field(&obj, "IPv6Network").is_some() || enable_ipv6 => {
                    return Err(invalid(
                        "Network",
                        "missing: a dual-stack network needs an IPv4 Network too; an IPv6-only \
                         network sets \"EnableIPv4\": false",
                    ))
                }
                None => return Err(invalid("Network", "missing (e.g. \"10.244.0.0/16\")")),
            };
            Some(parse_range(&obj, &V4_FIELDS, network)?)
        } else {
            None
        };

        let ipv6 = if enable_ipv6 {
            let net6 = match str_field(&obj, "IPv6Network")? {
                Some(s) => parse_network_v6(s)?,
                None => {
                    return Err(invalid(
                        "IPv6Network",
                        "missing while EnableIPv6 is true (e.g. \"fd00:10:244::/56\")",
                    ))
                }
            };
            Some(parse_range(&obj, &V6_FIELDS, net6)?)
        } else {
            None
        };

        let backend = match field(&obj, "Backend") {
            None => BackendConfig::default(),
            Some(Value::Object(b)) => parse_backend(b)?,
            Some(v) => return Err(invalid("Backend", format!("{v} is not a JSON object"))),
        };

        if ipv4.is_none() && backend.kind == BackendKind::Udp {
            return Err(invalid(
                "Backend",
                "udp carries IPv4 only: an IPv6-only network (EnableIPv4 false) needs vxlan or \
                 host-gw",
            ));
        }
        Ok(NetworkConfig {
            ipv4,
            ipv6,
            backend,
        })
    }
}

impl Default for BackendConfig {
    fn default() -> Self {
        BackendConfig {
            kind: BackendKind::Vxlan,
            vni: DEFAULT_VNI,
            port: DEFAULT_VXLAN_PORT,
            mtu: None,
            direct_routing: false,
        }
    }
}

fn parse_network(s: &str) -> Result<Ipv4Net, ConfigError> {
    match s.parse::<Ipv4Net>() {
        // Host bits are tolerated and dropped, like Go's net.ParseCIDR does.
        Ok(n) => Ok(n.trunc()),
        Err(_) if s.parse::<ipnet::Ipv6Net>().is_ok() => Err(invalid(
            "Network",
            format!(
                "{s:?} is an IPv6 network: the IPv6 side goes in IPv6Network (with \
                 \"EnableIPv6\": true; an IPv6-only network sets \"EnableIPv4\": false)"
            ),
        )),
        Err(_) => Err(invalid(
            "Network",
            format!("{s:?} is not a valid IPv4 CIDR (e.g. \"10.244.0.0/16\")"),
        )),
    }
}

fn parse_network_v6(s: &str) -> Result<Ipv6Net, ConfigError> {
    match s.parse::<Ipv6Net>() {
        Ok(n) => Ok(n.trunc()),
        Err(_) if s.parse::<Ipv4Net>().is_ok() => Err(invalid(
            "IPv6Network",
            format!("{s:?} is an IPv4 network; the IPv4 one goes in Network"),
        )),
        Err(_) => Err(invalid(
            "IPv6Network",
            format!("{s:?} is not a valid IPv6 CIDR (e.g. \"fd00:10:244::/56\")"),
        )),
    }
}

fn parse_backend(b: &Map<String, Value>) -> Result<BackendConfig, ConfigError> {
    let mut cfg = BackendConfig::default();
    if let Some(t) = str_field(b, "Type").map_err(rename("Backend.Type"))? {
        cfg.kind = if t.eq_ignore_ascii_case("vxlan") {
            BackendKind::Vxlan
        } else if t.eq_ignore_ascii_case("host-gw") {
            BackendKind::HostGw
        } else if t.eq_ignore_ascii_case("udp") {
            cfg.port = DEFAULT_UDP_PORT;
            BackendKind::Udp
        } else {
            return Err(invalid(
                "Backend.Type",
                format!("{t:?} is not supported (\"vxlan\", \"host-gw\" or \"udp\")"),
            ));
        };
    }
    if let Some(vni) = uint_field(b, "VNI", MAX_VNI).map_err(rename("Backend.VNI"))? {
        cfg.vni = vni as u32;
    }
    if let Some(port) =
        uint_field(b, "Port", u64::from(u16::MAX)).map_err(rename("Backend.Port"))?
    {
        cfg.port = port as u16;
    }
    if let Some(mtu) = uint_field(b, "MTU", 65535).map_err(rename("Backend.MTU"))? {
        if mtu < 68 {
            return Err(invalid(
                "Backend.MTU",
                format!("{mtu} is too small (at least 68)"),
            ));
        }
        cfg.mtu = Some(mtu as u32);
    }
    if let Some(d) = bool_field(b, "DirectRouting").map_err(rename("Backend.DirectRouting"))? {
        cfg.direct_routing = d;
    }
    Ok(cfg)
}

/// Backend fields are reported with their full path (`Backend.VNI`).
fn rename(full: &'static str) -> impl Fn(ConfigError) -> ConfigError {
    move |e| match e {
        ConfigError::Invalid { message, .. } => ConfigError::Invalid {
            field: full,
            message,
        },
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{Ipv4Addr, Ipv6Addr};

    fn parse(s: &str) -> Result<NetworkConfig, ConfigError> {
        NetworkConfig::parse(s.as_bytes())
    }

    fn err(s: &str) -> (String, String) {
        match parse(s) {
            Err(ConfigError::Invalid { field, message }) => (field.to_string(), message),
            other => panic!("expected Invalid for {s}, got {other:?}"),
        }
    }

    #[track_caller]
    fn assert_invalid(json: &str, want_field: &str, want_in_message: &[&str]) {
        let (f, m) = err(json);
        assert_eq!(f, want_field, "field for {json}: {m}");
        for w in want_in_message {
            assert!(m.contains(w), "message {m:?} for {json} lacks {w:?}");
        }
    }

    #[test]
    fn defaults_for_a_16() {
        let c = parse(r#"{"Network":"10.244.0.0/16"}"#).unwrap();
        assert_eq!(
            c.ipv4.as_ref().unwrap().network,
            "10.244.0.0/16".parse().unwrap()
        );
        assert_eq!(c.ipv4.as_ref().unwrap().subnet_len, 24);
        assert_eq!(
            c.ipv4.as_ref().unwrap().subnet_min,
            Ipv4Addr::new(10, 244, 1, 0)
        );
        assert_eq!(
            c.ipv4.as_ref().unwrap().subnet_max,
            Ipv4Addr::new(10, 244, 255, 0)
        );
        assert_eq!(c.backend, BackendConfig::default());
        assert_eq!(c.backend.kind, BackendKind::Vxlan);
        assert_eq!(c.backend.vni, 1);
        assert_eq!(c.backend.port, 8472);
        assert_eq!(c.ipv4.as_ref().unwrap().subnet_count(), 255);
    }

    #[test]
    fn default_subnet_len_small_networks() {
        // /22 is still "large": 24.
        let c = parse(r#"{"Network":"10.0.0.0/22"}"#).unwrap();
        assert_eq!(c.ipv4.as_ref().unwrap().subnet_len, 24);
        assert_eq!(
            c.ipv4.as_ref().unwrap().subnet_min,
            Ipv4Addr::new(10, 0, 1, 0)
        );
        assert_eq!(
            c.ipv4.as_ref().unwrap().subnet_max,
            Ipv4Addr::new(10, 0, 3, 0)
        );
        // /23 and smaller: prefix + 2.
        let c = parse(r#"{"Network":"10.0.0.0/23"}"#).unwrap();
        assert_eq!(c.ipv4.as_ref().unwrap().subnet_len, 25);
        let c = parse(r#"{"Network":"10.0.0.0/28"}"#).unwrap();
        assert_eq!(c.ipv4.as_ref().unwrap().subnet_len, 30);
        assert_eq!(
            c.ipv4.as_ref().unwrap().subnet_min,
            Ipv4Addr::new(10, 0, 0, 4)
        );
        assert_eq!(
            c.ipv4.as_ref().unwrap().subnet_max,
            Ipv4Addr::new(10, 0, 0, 12)
        );
        assert_eq!(c.ipv4.as_ref().unwrap().subnet_count(), 3);
    }

    #[test]
    fn full_config_with_unknown_keys() {
        let c = parse(
            r#"{"Network":"172.16.0.0/12","SubnetLen":20,"SubnetMin":"172.16.32.0",
                "SubnetMax":"172.31.224.0","EnableIPv4":true,"EnableNFTables":false,
                "Backend":{"Type":"vxlan","VNI":42,"Port":4789,"MTU":1400,
                           "DirectRouting":true,"GBP":false,"Learning":false}}"#,
        )
        .unwrap();
        assert_eq!(c.ipv4.as_ref().unwrap().subnet_len, 20);
        assert_eq!(
            c.ipv4.as_ref().unwrap().subnet_min,
            Ipv4Addr::new(172, 16, 32, 0)
        );
        assert_eq!(
            c.ipv4.as_ref().unwrap().subnet_max,
            Ipv4Addr::new(172, 31, 224, 0)
        );
        assert_eq!(
            c.backend,
            BackendConfig {
                kind: BackendKind::Vxlan,
                vni: 42,
                port: 4789,
                mtu: Some(1400),
                direct_routing: true
            }
        );
    }

    #[test]
    fn go_zero_values_mean_default() {
        let c = parse(
            r#"{"Network":"10.1.0.0/16","SubnetLen":0,"SubnetMin":"",
                "Backend":{"Type":"vxlan","VNI":0,"Port":0,"MTU":0}}"#,
        )
        .unwrap();
        assert_eq!(c.ipv4.as_ref().unwrap().subnet_len, 24);
        assert_eq!(
            c.ipv4.as_ref().unwrap().subnet_min,
            Ipv4Addr::new(10, 1, 1, 0)
        );
        assert_eq!(c.backend.vni, 1);
        assert_eq!(c.backend.port, 8472);
        assert_eq!(c.backend.mtu, None);
    }

    #[test]
    fn keys_are_case_insensitive_and_backend_defaults_to_vxlan() {
        let c = parse(r#"{"network":"10.2.0.0/16","backend":{"vni":7}}"#).unwrap();
        assert_eq!(
            c.ipv4.as_ref().unwrap().network,
            "10.2.0.0/16".parse().unwrap()
        );
        assert_eq!(c.backend.vni, 7);
        assert_eq!(c.backend.kind, BackendKind::Vxlan);
        let c = parse(r#"{"Network":"10.2.0.0/16","Backend":{"Type":"VXLAN"}}"#).unwrap();
        assert_eq!(c.backend.kind, BackendKind::Vxlan);
    }

    #[test]
    fn dual_stack_config_keeps_both_parts() {
        let c = parse(
            r#"{"Network":"10.3.0.0/16","EnableIPv6":true,"IPv6Network":"fc00::/48",
                "IPv6SubnetLen":64}"#,
        )
        .unwrap();
        assert_eq!(
            c.ipv4.as_ref().unwrap().network,
            "10.3.0.0/16".parse().unwrap()
        );
        let v6 = c.ipv6.unwrap();
        assert_eq!(v6.network, "fc00::/48".parse().unwrap());
        assert_eq!(v6.subnet_len, 64);
        assert_eq!(v6.subnet_min, "fc00:0:0:1::".parse::<Ipv6Addr>().unwrap());
        assert_eq!(
            v6.subnet_max,
            "fc00:0:0:ffff::".parse::<Ipv6Addr>().unwrap()
        );
        assert_eq!(v6.subnet_count(), 65535);
        // Without EnableIPv6 the v6 fields are not used (flannel's rule).
        let c = parse(r#"{"Network":"10.3.0.0/16","IPv6Network":"fc00::/48"}"#).unwrap();
        assert_eq!(c.ipv6, None);
    }

    #[test]
    fn ipv6_defaults_follow_flannels() {
        let v6 = |net: &str| {
            parse(&format!(
                r#"{{"Network":"10.0.0.0/16","EnableIPv6":true,"IPv6Network":"{net}"}}"#
            ))
            .unwrap()
            .ipv6
            .unwrap()
        };
        let a = |s: &str| s.parse::<Ipv6Addr>().unwrap();
        // /62 still gives each node a /64; host bits in the network are dropped.
        let r = v6("fd00:10:244::5/62");
        assert_eq!(r.network, "fd00:10:244::/62".parse().unwrap());
        assert_eq!(r.subnet_len, 64);
        assert_eq!(
            (r.subnet_min, r.subnet_max),
            (a("fd00:10:244:1::"), a("fd00:10:244:3::"))
        );
        // Smaller networks: length + 2, down to a /124 (four /126s, the first skipped).
        let r = v6("fd00::/100");
        assert_eq!(r.subnet_len, 102);
        let r = v6("fd00::/124");
        assert_eq!(r.subnet_len, 126);
        assert_eq!((r.subnet_min, r.subnet_max), (a("fd00::4"), a("fd00::c")));
        assert_eq!(r.subnet_count(), 3);
        // The whole space neither overflows nor panics.
        let r = v6("::/0");
        assert_eq!(r.subnet_len, 64);
        assert_eq!(r.subnet_max, a("ffff:ffff:ffff:ffff::"));
        assert_eq!(r.subnet_count(), (1 << 64) - 1);
        assert!(r.fits("ffff:ffff:ffff:ffff::/64".parse().unwrap()));
        assert!(
            !r.fits("::/64".parse().unwrap()),
            "the first subnet is skipped"
        );
    }

    #[test]
    fn ipv6_fields_explicit() {
        let c = parse(
            r#"{"Network":"10.0.0.0/16","EnableIPv6":true,"IPv6Network":"fd00:10:244::/48",
                "IPv6SubnetLen":80,"IPv6SubnetMin":"fd00:10:244:5::",
                "IPv6SubnetMax":"fd00:10:244:5:2::"}"#,
        )
        .unwrap();
        let r = c.ipv6.unwrap();
        assert_eq!(r.subnet_len, 80);
        assert_eq!(r.subnet_count(), 3);
        assert!(r.fits("fd00:10:244:5:1::/80".parse().unwrap()));
        assert!(!r.fits("fd00:10:244:5:3::/80".parse().unwrap()));
    }

    #[test]
    fn ipv6_errors_name_the_field() {
        let n = r#""Network":"10.0.0.0/16","EnableIPv6":true"#;
        assert_invalid(
            &format!("{{{n}}}"),
            "IPv6Network",
            &["missing", "EnableIPv6"],
        );
        assert_invalid(
            &format!(r#"{{{n},"IPv6Network":"10.1.0.0/16"}}"#),
            "IPv6Network",
            &["\"10.1.0.0/16\"", "IPv4 network"],
        );
        assert_invalid(
            &format!(r#"{{{n},"IPv6Network":"fd00::/129"}}"#),
            "IPv6Network",
            &["\"fd00::/129\"", "not a valid IPv6 CIDR"],
        );
        assert_invalid(
            &format!(r#"{{{n},"IPv6Network":"fd00::/125"}}"#),
            "IPv6Network",
            &["fd00::/125 is too small", "/124 or larger"],
        );
        assert_invalid(
            &format!(r#"{{{n},"IPv6Network":"fd00::/48","IPv6SubnetLen":127}}"#),
            "IPv6SubnetLen",
            &["127", "at least 50", "IPv6Network fd00::/48", "at most 126"],
        );
        assert_invalid(
            &format!(r#"{{{n},"IPv6Network":"fd00::/48","IPv6SubnetLen":49}}"#),
            "IPv6SubnetLen",
            &["49 is out of range", "at least 50"],
        );
        assert_invalid(
            &format!(r#"{{{n},"IPv6Network":"fd00::/48","IPv6SubnetLen":48}}"#),
            "IPv6SubnetLen",
            &["48 is out of range"],
        );
        assert_invalid(
            &format!(r#"{{{n},"IPv6Network":"fd00::/48","IPv6SubnetMin":"fd01::"}}"#),
            "IPv6SubnetMin",
            &["fd01::", "outside the IPv6Network fd00::/48"],
        );
        assert_invalid(
            &format!(r#"{{{n},"IPv6Network":"fd00::/48","IPv6SubnetMax":"fd00:0:0:7::1"}}"#),
            "IPv6SubnetMax",
            &["fd00:0:0:7::1", "aligned", "/64"],
        );
        assert_invalid(
            &format!(
                r#"{{{n},"IPv6Network":"fd00::/48","IPv6SubnetMin":"fd00:0:0:9::",
                    "IPv6SubnetMax":"fd00:0:0:8::"}}"#
            ),
            "IPv6SubnetMin",
            &["fd00:0:0:9::", "greater than IPv6SubnetMax fd00:0:0:8::"],
        );
        assert_invalid(
            &format!(r#"{{{n},"IPv6Network":"fd00::/48","IPv6SubnetMin":"10.0.1.0"}}"#),
            "IPv6SubnetMin",
            &["\"10.0.1.0\"", "not an IPv6 address"],
        );
        assert_invalid(
            &format!(r#"{{{n},"IPv6Network":"fd00::/48","IPv6SubnetLen":"64"}}"#),
            "IPv6SubnetLen",
            &["not a non-negative integer"],
        );
    }

    #[test]
    fn bad_json() {
        assert!(matches!(parse("{"), Err(ConfigError::Json(_))));
        assert_invalid("[1]", "config", &["[1]", "not a JSON object"]);
    }

    #[test]
    fn network_errors() {
        assert_invalid("{}", "Network", &["missing"]);
        assert_invalid(
            r#"{"Network":"10.0.0.0/33"}"#,
            "Network",
            &["\"10.0.0.0/33\"", "IPv4 CIDR"],
        );
        assert_invalid(r#"{"Network":"banana"}"#, "Network", &["\"banana\""]);
        assert_invalid(r#"{"Network":16}"#, "Network", &["16", "not a string"]);
        assert_invalid(
            r#"{"Network":"fc00::/48"}"#,
            "Network",
            &["\"fc00::/48\"", "IPv6"],
        );
        assert_invalid(
            r#"{"EnableIPv6":true,"IPv6Network":"fc00::/48"}"#,
            "Network",
            &["missing", "dual-stack", "\"EnableIPv4\": false"],
        );
        assert_invalid(
            r#"{"EnableIPv4":false,"Network":"10.0.0.0/16","EnableIPv6":true}"#,
            "IPv6Network",
            &["missing"],
        );
        assert_invalid(
            r#"{"EnableIPv4":false,"Network":"10.0.0.0/16"}"#,
            "EnableIPv6",
            &["EnableIPv4 is false", "no address family"],
        );
        assert_invalid(
            r#"{"EnableIPv4":"no","Network":"10.0.0.0/16"}"#,
            "EnableIPv4",
            &["\"no\""],
        );
    }

    /// flannel's IPv6-only network: EnableIPv4 false, the IPv4 fields not read at all.
    #[test]
    fn ipv6_only_config() {
        let c = parse(
            r#"{"EnableIPv4":false,"EnableIPv6":true,"IPv6Network":"fd00:10:244::/56",
                "Backend":{"Type":"vxlan"}}"#,
        )
        .unwrap();
        assert_eq!(c.ipv4, None);
        let r = c.ipv6.as_ref().unwrap();
        assert_eq!(r.network, "fd00:10:244::/56".parse().unwrap());
        assert_eq!(r.subnet_len, 64);
        // Network is ignored, also when it is not one (flannel does not read it).
        let d = parse(
            r#"{"EnableIPv4":false,"Network":"banana","EnableIPv6":true,
                "IPv6Network":"fd00:10:244::/56","Backend":{"Type":"vxlan"}}"#,
        )
        .unwrap();
        assert_eq!(d, c);
        let h = parse(
            r#"{"EnableIPv4":false,"EnableIPv6":true,"IPv6Network":"fd00:10:244::/56",
                "Backend":{"Type":"host-gw"}}"#,
        )
        .unwrap();
        assert_eq!(h.backend.kind, BackendKind::HostGw);
        // udp carries IPv4 only.
        assert_invalid(
            r#"{"EnableIPv4":false,"EnableIPv6":true,"IPv6Network":"fd00:10:244::/56",
                "Backend":{"Type":"udp"}}"#,
            "Backend",
            &["udp", "IPv4 only", "vxlan or host-gw"],
        );
    }

    #[test]
    fn subnet_len_errors() {
        assert_invalid(
            r#"{"Network":"10.0.0.0/16","SubnetLen":31}"#,
            "SubnetLen",
            &["31", "out of range", "30"],
        );
        assert_invalid(
            r#"{"Network":"10.0.0.0/16","SubnetLen":16}"#,
            "SubnetLen",
            &["16", "out of range"],
        );
        assert_invalid(
            r#"{"Network":"10.0.0.0/16","SubnetLen":8}"#,
            "SubnetLen",
            &["8 is out of range"],
        );
        assert_invalid(
            r#"{"Network":"10.0.0.0/16","SubnetLen":"24"}"#,
            "SubnetLen",
            &["\"24\"", "not a non-negative integer"],
        );
        assert_invalid(
            r#"{"Network":"10.0.0.0/16","SubnetLen":-1}"#,
            "SubnetLen",
            &["-1"],
        );
        assert_invalid(
            r#"{"Network":"10.0.0.0/16","SubnetLen":300}"#,
            "SubnetLen",
            &["300"],
        );
        // Default prefix + 2 would be 31: the network is what is wrong.
        assert_invalid(
            r#"{"Network":"10.0.0.0/29"}"#,
            "Network",
            &["10.0.0.0/29 is too small", "/28 or larger"],
        );
        // Two subnets (the first skipped) are not enough, as in flannel.
        assert_invalid(
            r#"{"Network":"10.0.0.0/16","SubnetLen":17}"#,
            "SubnetLen",
            &["17 is out of range", "at least 18", "10.0.0.0/16"],
        );
        assert!(parse(r#"{"Network":"10.0.0.0/16","SubnetLen":18}"#).is_ok());
    }

    #[test]
    fn subnet_min_max_errors() {
        let n = r#""Network":"10.0.0.0/16""#;
        assert_invalid(
            &format!(r#"{{{n},"SubnetMin":"10.1.0.0"}}"#),
            "SubnetMin",
            &["10.1.0.0", "outside", "10.0.0.0/16"],
        );
        assert_invalid(
            &format!(r#"{{{n},"SubnetMax":"11.0.0.0"}}"#),
            "SubnetMax",
            &["11.0.0.0", "outside"],
        );
        assert_invalid(
            &format!(r#"{{{n},"SubnetMin":"10.0.1.128"}}"#),
            "SubnetMin",
            &["10.0.1.128", "aligned", "/24"],
        );
        assert_invalid(
            &format!(r#"{{{n},"SubnetMax":"10.0.9.1"}}"#),
            "SubnetMax",
            &["10.0.9.1", "aligned"],
        );
        assert_invalid(
            &format!(r#"{{{n},"SubnetMin":"10.0.9.0","SubnetMax":"10.0.8.0"}}"#),
            "SubnetMin",
            &["10.0.9.0", "greater than SubnetMax 10.0.8.0"],
        );
        assert_invalid(
            &format!(r#"{{{n},"SubnetMin":"10.0.300.0"}}"#),
            "SubnetMin",
            &["\"10.0.300.0\"", "not an IPv4 address"],
        );
    }

    #[test]
    fn udp_backend_defaults_to_flannels_port() {
        let c = parse(r#"{"Network":"10.0.0.0/16","Backend":{"Type":"udp"}}"#).unwrap();
        assert_eq!(c.backend.kind, BackendKind::Udp);
        assert_eq!(c.backend.port, DEFAULT_UDP_PORT);
        let c = parse(r#"{"Network":"10.0.0.0/16","Backend":{"Type":"UDP","Port":9000}}"#).unwrap();
        assert_eq!((c.backend.kind, c.backend.port), (BackendKind::Udp, 9000));
        // Port 0 is flannel's "not set".
        let c = parse(r#"{"Network":"10.0.0.0/16","Backend":{"Type":"udp","Port":0}}"#).unwrap();
        assert_eq!(c.backend.port, DEFAULT_UDP_PORT);
    }

    #[test]
    fn host_gw_backend() {
        let c = parse(r#"{"Network":"10.0.0.0/16","Backend":{"Type":"host-gw"}}"#).unwrap();
        assert_eq!(c.backend.kind, BackendKind::HostGw);
        let c = parse(r#"{"Network":"10.0.0.0/16","Backend":{"Type":"Host-GW"}}"#).unwrap();
        assert_eq!(c.backend.kind, BackendKind::HostGw);
    }

    #[test]
    fn backend_errors() {
        let n = r#""Network":"10.0.0.0/16""#;
        assert_invalid(
            &format!(r#"{{{n},"Backend":{{"Type":"ipip"}}}}"#),
            "Backend.Type",
            &["\"ipip\""],
        );
        assert_invalid(
            &format!(r#"{{{n},"Backend":"vxlan"}}"#),
            "Backend",
            &["\"vxlan\"", "not a JSON object"],
        );
        assert_invalid(
            &format!(r#"{{{n},"Backend":{{"VNI":16777216}}}}"#),
            "Backend.VNI",
            &["16777216", "out of range"],
        );
        assert_invalid(
            &format!(r#"{{{n},"Backend":{{"Port":70000}}}}"#),
            "Backend.Port",
            &["70000"],
        );
        assert_invalid(
            &format!(r#"{{{n},"Backend":{{"MTU":50}}}}"#),
            "Backend.MTU",
            &["50", "too small"],
        );
        assert_invalid(
            &format!(r#"{{{n},"Backend":{{"DirectRouting":"yes"}}}}"#),
            "Backend.DirectRouting",
            &["\"yes\"", "boolean"],
        );
    }

    #[test]
    fn error_display_names_field_and_value() {
        let e = parse(r#"{"Network":"10.0.0.0/16","SubnetLen":31}"#).unwrap_err();
        let s = e.to_string();
        assert!(
            s.starts_with("invalid network config: SubnetLen: 31 "),
            "{s}"
        );
    }

    #[test]
    fn whole_address_space_does_not_overflow() {
        let c = parse(r#"{"Network":"0.0.0.0/0"}"#).unwrap();
        assert_eq!(
            c.ipv4.as_ref().unwrap().subnet_min,
            Ipv4Addr::new(0, 0, 1, 0)
        );
        assert_eq!(
            c.ipv4.as_ref().unwrap().subnet_max,
            Ipv4Addr::new(255, 255, 255, 0)
        );
        assert_eq!(c.ipv4.as_ref().unwrap().subnet_count(), (1 << 24) - 1);
        // Hand-built nonsense gives no subnets rather than a panic.
        let mut bad = c.clone();
        bad.ipv4.as_mut().unwrap().subnet_len = 40;
        assert_eq!(bad.ipv4.as_ref().unwrap().subnet_count(), 0);
        assert!(bad
            .ipv4
            .as_ref()
            .unwrap()
            .choose_free(&Default::default())
            .is_err());
    }

    #[test]
    fn fits() {
        let c = parse(r#"{"Network":"10.0.0.0/16","SubnetMax":"10.0.10.0"}"#).unwrap();
        assert!(c
            .ipv4
            .as_ref()
            .unwrap()
            .fits("10.0.1.0/24".parse().unwrap()));
        assert!(c
            .ipv4
            .as_ref()
            .unwrap()
            .fits("10.0.10.0/24".parse().unwrap()));
        assert!(
            !c.ipv4
                .as_ref()
                .unwrap()
                .fits("10.0.0.0/24".parse().unwrap()),
            "below SubnetMin"
        );
        assert!(
            !c.ipv4
                .as_ref()
                .unwrap()
                .fits("10.0.11.0/24".parse().unwrap()),
            "above SubnetMax"
        );
        assert!(
            !c.ipv4
                .as_ref()
                .unwrap()
                .fits("10.0.2.0/23".parse().unwrap()),
            "wrong length"
        );
        assert_eq!(c.ipv4.as_ref().unwrap().subnet_count(), 10);
    }
}
