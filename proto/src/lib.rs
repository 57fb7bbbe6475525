//! Types shared by twilld and the `twill` CNI plugin.
//!
//! - [`Request`] / [`Response`]: the socket protocol, one request per connection, each message a
//!   frame of a big-endian u32 length followed by that many bytes of JSON ([`encode_frame`],
//!   [`read_frame`]); frames above [`MAX_FRAME`] are refused.
//! - [`CniResult`]: the ADD result, rendered in the shape of the version the runtime asked for.
//! - [`CniError`]: the CNI error object and its codes.

use std::io::{self, Read, Write};

use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};

#[doc(hidden)]
pub mod fuzzing;
pub mod validate;

/// Version of the socket protocol; bumped on any incompatible change.
pub const PROTOCOL: u32 = 1;
/// Largest frame either side accepts. CNI configs are a few KiB (a GC's attachment list for a
/// full node about 20 KiB); twilld decodes a request into a JSON value costing 10-16 times its
/// size, so the cap is what bounds its memory per request.
pub const MAX_FRAME: usize = 256 * 1024;
/// CNI versions twill speaks, oldest first.
pub const SUPPORTED_VERSIONS: [&str; 3] = ["0.4.0", "1.0.0", "1.1.0"];
pub const DEFAULT_SOCKET: &str = "/run/twill/cni.sock";

/// CNI error codes (SPEC.md "Error" section) and twill's own (100+).
pub mod codes {
    pub const INCOMPATIBLE_VERSION: u32 = 1;
    pub const UNSUPPORTED_FIELD: u32 = 2;
    pub const UNKNOWN_CONTAINER: u32 = 3;
    pub const INVALID_ENV: u32 = 4;
    pub const IO_FAILURE: u32 = 5;
    pub const DECODE_FAILED: u32 = 6;
    pub const INVALID_CONFIG: u32 = 7;
    pub const TRY_AGAIN_LATER: u32 = 11;
    pub const NOT_AVAILABLE: u32 = 50;
    pub const NOT_AVAILABLE_DEGRADED: u32 = 51;
    /// No free address left in the node's subnet.
    pub const SUBNET_FULL: u32 = 100;
    /// CNI_IFNAME (or the host veth) already exists.
    pub const INTERFACE_EXISTS: u32 = 101;
    /// A kernel (netlink) operation failed.
    pub const KERNEL: u32 = 102;
    /// The caller is not allowed to use the socket.
    pub const PERMISSION_DENIED: u32 = 103;
    /// CHECK found the container's network not as the previous result says.
    pub const CHECK_FAILED: u32 = 104;
    /// The pod's network policy could not be put in place (so it must not start).
    pub const POLICY: u32 = 105;
    /// A bug or an unexpected internal failure.
    pub const INTERNAL: u32 = 999;
}

pub fn is_supported_version(v: &str) -> bool {
    SUPPORTED_VERSIONS.contains(&v)
}

/// GC and STATUS exist from 1.1.0 on.
pub fn version_has_gc_status(v: &str) -> bool {
    v == "1.1.0"
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Command {
    Add,
    Del,
    Check,
    Version,
    Gc,
    Status,
}

impl Command {
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "ADD" => Command::Add,
            "DEL" => Command::Del,
            "CHECK" => Command::Check,
            "VERSION" => Command::Version,
            "GC" => Command::Gc,
            "STATUS" => Command::Status,
            _ => return None,
        })
    }

    pub fn as_str(&self) -> &'static str {
        match self {
            Command::Add => "ADD",
            Command::Del => "DEL",
            Command::Check => "CHECK",
            Command::Version => "VERSION",
            Command::Gc => "GC",
            Command::Status => "STATUS",
        }
    }

    /// Environment variables the spec requires for this verb (besides CNI_COMMAND).
    pub fn required_env(&self) -> &'static [&'static str] {
        match self {
            Command::Add | Command::Check => &["CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME"],
            Command::Del => &["CNI_CONTAINERID", "CNI_IFNAME"],
            Command::Version | Command::Gc | Command::Status => &[],
        }
    }
}

/// What the plugin sends: its environment and the raw stdin object.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Request {
    pub protocol: u32,
    pub command: Command,
    #[serde(default)]
    pub container_id: String,
    #[serde(default)]
    pub netns: String,
    #[serde(default)]
    pub ifname: String,
    #[serde(default)]
    pub args: String,
    #[serde(default)]
    pub path: String,
    /// The network configuration exactly as the runtime gave it on stdin.
    pub config: Value,
}

impl Request {
    /// The `cniVersion` of the configuration ("" when absent).
    pub fn cni_version(&self) -> &str {
        self.config
            .get("cniVersion")
            .and_then(Value::as_str)
            .unwrap_or("")
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Response {
    /// Success; `None` for verbs that print nothing (DEL, CHECK, GC, STATUS).
    Ok(Option<Value>),
    Err(CniError),
}

/// The CNI error object.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CniError {
    pub code: u32,
    pub msg: String,
    #[serde(default)]
    pub details: String,
}

impl CniError {
    pub fn new(code: u32, msg: impl Into<String>) -> Self {
        CniError {
            code,
            msg: msg.into(),
            details: String::new(),
        }
    }

    pub fn with_details(mut self, details: impl Into<String>) -> Self {
        self.details = details.into();
        self
    }

    /// The JSON the plugin prints on stdout.
    pub fn to_json(&self, cni_version: &str) -> Value {
        let mut m = Map::new();
        m.insert("cniVersion".into(), json!(cni_version));
        m.insert("code".into(), json!(self.code));
        m.insert("msg".into(), json!(self.msg));
        if !self.details.is_empty() {
            m.insert("details".into(), json!(self.details));
        }
        Value::Object(m)
    }
}

impl std::fmt::Display for CniError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "CNI error {}: {}", self.code, self.msg)?;
        if !self.details.is_empty() {
            write!(f, " ({})", self.details)?;
        }
        Ok(())
    }
}

impl std::error::Error for CniError {}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Interface {
    pub name: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub mac: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtu: Option<u32>,
    /// Empty for a host-side interface; the netns path for the container's.
    #[serde(default)]
    pub sandbox: String,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct IpConfig {
    /// CIDR notation: "10.244.1.5/24".
    pub address: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway: Option<String>,
    /// Index into `interfaces`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interface: Option<usize>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Route {
    pub dst: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gw: Option<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Dns {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nameservers: Vec<String>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub domain: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub search: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub options: Vec<String>,
}

impl Dns {
    pub fn is_empty(&self) -> bool {
        self.nameservers.is_empty()
            && self.domain.is_empty()
            && self.search.is_empty()
            && self.options.is_empty()
    }
}

/// An ADD result, independent of the version it is rendered in.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CniResult {
    pub interfaces: Vec<Interface>,
    pub ips: Vec<IpConfig>,
    pub routes: Vec<Route>,
    pub dns: Dns,
}

impl CniResult {
    /// Renders the result in the shape of `cni_version` (0.4.0: ips carry "version" and
    /// interfaces no "mtu"; 1.x: neither).
    pub fn to_json(&self, cni_version: &str) -> Value {
        let v04 = cni_version.starts_with("0.");
        let interfaces: Vec<Value> = self
            .interfaces
            .iter()
            .map(|i| {
                let mut i = i.clone();
                if v04 {
                    i.mtu = None;
                }
                serde_json::to_value(i).expect("plain struct")
            })
            .collect();
        let ips: Vec<Value> = self
            .ips
            .iter()
            .map(|ip| {
                let mut v = serde_json::to_value(ip).expect("plain struct");
                if v04 {
                    let family = if ip.address.contains(':') { "6" } else { "4" };
                    v.as_object_mut()
                        .expect("object")
                        .insert("version".into(), json!(family));
                }
                v
            })
            .collect();
        let mut m = Map::new();
        m.insert("cniVersion".into(), json!(cni_version));
        m.insert("interfaces".into(), Value::Array(interfaces));
        m.insert("ips".into(), Value::Array(ips));
        m.insert(
            "routes".into(),
            serde_json::to_value(&self.routes).expect("plain struct"),
        );
        m.insert(
            "dns".into(),
            serde_json::to_value(&self.dns).expect("plain struct"),
        );
        Value::Object(m)
    }

    /// Parses a result (e.g. a prevResult) of any supported version; unknown keys are ignored.
    pub fn from_json(v: &Value) -> Result<Self, String> {
        #[derive(Deserialize)]
        struct Raw {
            #[serde(default)]
            interfaces: Vec<Interface>,
            #[serde(default)]
            ips: Vec<IpConfig>,
            #[serde(default)]
            routes: Vec<Route>,
            #[serde(default)]
            dns: Dns,
        }
        let raw: Raw = serde_json::from_value(v.clone()).map_err(|e| e.to_string())?;
        Ok(CniResult {
            interfaces: raw.interfaces,
            ips: raw.ips,
            routes: raw.routes,
            dns: raw.dns,
        })
    }
}

#[derive(Debug)]
pub enum FrameError {
    Io(io::Error),
    TooLarge(usize),
    Json(serde_json::Error),
}

impl std::fmt::Display for FrameError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            FrameError::Io(e) => write!(f, "i/o error: {e}"),
            FrameError::TooLarge(n) => {
                write!(
                    f,
                    "frame of {n} bytes exceeds the limit of {MAX_FRAME} bytes"
                )
            }
            FrameError::Json(e) => write!(f, "malformed JSON: {e}"),
        }
    }
}

impl std::error::Error for FrameError {}

impl From<io::Error> for FrameError {
    fn from(e: io::Error) -> Self {
        FrameError::Io(e)
    }
}

/// Serializes `msg` as one frame: u32 big-endian length, then the JSON.
pub fn encode_frame<T: Serialize>(msg: &T) -> Result<Vec<u8>, FrameError> {
    let body = serde_json::to_vec(msg).map_err(FrameError::Json)?;
    if body.len() > MAX_FRAME {
        return Err(FrameError::TooLarge(body.len()));
    }
    let mut out = Vec::with_capacity(4 + body.len());
    out.extend_from_slice(&(body.len() as u32).to_be_bytes());
    out.extend_from_slice(&body);
    Ok(out)
}

/// Validates a frame header; returns the body length.
pub fn frame_len(header: [u8; 4]) -> Result<usize, FrameError> {
    let n = u32::from_be_bytes(header) as usize;
    if n > MAX_FRAME {
        return Err(FrameError::TooLarge(n));
    }
    Ok(n)
}

pub fn decode_body<T: for<'de> Deserialize<'de>>(body: &[u8]) -> Result<T, FrameError> {
    serde_json::from_slice(body).map_err(FrameError::Json)
}

pub fn write_frame<T: Serialize, W: Write>(w: &mut W, msg: &T) -> Result<(), FrameError> {
    w.write_all(&encode_frame(msg)?)?;
    w.flush()?;
    Ok(())
}

pub fn read_frame<T: for<'de> Deserialize<'de>, R: Read>(r: &mut R) -> Result<T, FrameError> {
    let mut header = [0u8; 4];
    r.read_exact(&mut header)?;
    let n = frame_len(header)?;
    let mut body = vec![0u8; n];
    r.read_exact(&mut body)?;
    decode_body(&body)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> CniResult {
        CniResult {
            interfaces: vec![
                Interface {
                    name: "twabc".into(),
                    mac: "aa:bb:cc:dd:ee:ff".into(),
                    mtu: Some(1450),
                    sandbox: String::new(),
                },
                Interface {
                    name: "eth0".into(),
                    mac: "02:00:00:00:00:01".into(),
                    mtu: Some(1450),
                    sandbox: "/run/netns/x".into(),
                },
            ],
            ips: vec![IpConfig {
                address: "10.244.1.2/24".into(),
                gateway: Some("10.244.1.1".into()),
                interface: Some(1),
            }],
            routes: vec![Route {
                dst: "0.0.0.0/0".into(),
                gw: Some("10.244.1.1".into()),
            }],
            dns: Dns {
                nameservers: vec!["10.96.0.10".into()],
                ..Default::default()
            },
        }
    }

    #[test]
    fn result_0_4_0_has_ip_version_and_no_mtu() {
        let v = sample().to_json("0.4.0");
        assert_eq!(v["cniVersion"], "0.4.0");
        assert_eq!(v["ips"][0]["version"], "4");
        assert_eq!(v["ips"][0]["interface"], 1);
        assert!(v["interfaces"][1].get("mtu").is_none());
        assert_eq!(v["interfaces"][0]["sandbox"], "");
    }

    #[test]
    fn result_1_x_shape() {
        let v = sample().to_json("1.0.0");
        assert!(v["ips"][0].get("version").is_none());
        assert_eq!(v["interfaces"][1]["mtu"], 1450);
        assert_eq!(v["routes"][0]["gw"], "10.244.1.1");
        assert_eq!(v["dns"]["nameservers"][0], "10.96.0.10");
        assert_eq!(CniResult::from_json(&v).unwrap(), sample());
        // A 0.4.0 result parses back too (the extra "version" key is ignored).
        let old = CniResult::from_json(&sample().to_json("0.4.0")).unwrap();
        assert_eq!(old.ips, sample().ips);
    }

    #[test]
    fn error_json() {
        let e = CniError::new(codes::INVALID_ENV, "missing CNI_NETNS").with_details("d");
        let v = e.to_json("1.1.0");
        assert_eq!(
            v,
            json!({"cniVersion":"1.1.0","code":4,"msg":"missing CNI_NETNS","details":"d"})
        );
        assert!(CniError::new(1, "x")
            .to_json("1.0.0")
            .get("details")
            .is_none());
    }

    #[test]
    fn frames_round_trip_and_limit() {
        let req = Request {
            protocol: PROTOCOL,
            command: Command::Add,
            container_id: "c1".into(),
            netns: "/run/netns/x".into(),
            ifname: "eth0".into(),
            args: "IgnoreUnknown=1".into(),
            path: "/opt/cni/bin".into(),
            config: json!({"cniVersion":"1.0.0","name":"twill","type":"twill"}),
        };
        let mut buf = Vec::new();
        write_frame(&mut buf, &req).unwrap();
        let back: Request = read_frame(&mut buf.as_slice()).unwrap();
        assert_eq!(back, req);
        assert_eq!(back.cni_version(), "1.0.0");

        let huge = ((MAX_FRAME + 1) as u32).to_be_bytes();
        assert!(matches!(frame_len(huge), Err(FrameError::TooLarge(_))));
        let mut bad = Vec::new();
        bad.extend_from_slice(&3u32.to_be_bytes());
        bad.extend_from_slice(b"{x}");
        assert!(matches!(
            read_frame::<Request, _>(&mut bad.as_slice()),
            Err(FrameError::Json(_))
        ));
    }

    #[test]
    fn response_round_trip() {
        for r in [
            Response::Ok(None),
            Response::Ok(Some(json!({"a":1}))),
            Response::Err(CniError::new(11, "later")),
        ] {
            let b = encode_frame(&r).unwrap();
            let back: Response = read_frame(&mut b.as_slice()).unwrap();
            assert_eq!(back, r);
        }
    }

    #[test]
    fn commands() {
        for c in ["ADD", "DEL", "CHECK", "VERSION", "GC", "STATUS"] {
            assert_eq!(Command::parse(c).unwrap().as_str(), c);
        }
        assert!(Command::parse("add").is_none());
        assert!(!Command::Del.required_env().contains(&"CNI_NETNS"));
    }
}
