//! Reading a node's VXLAN entries back from the kernel with `ip -j` / `bridge -j`, so tests
//! check what the kernel really has rather than what the daemon says it did.

use anyhow::{Context, Result};
use serde_json::Value;

use crate::netns::{check, exec_cmd};

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Neigh {
    pub dst: String,
    pub lladdr: Option<String>,
    /// Upper case, as `ip` prints it: "PERMANENT", "REACHABLE", ...
    pub state: Vec<String>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Fdb {
    pub mac: String,
    pub dst: Option<String>,
    pub flags: Vec<String>,
    /// "permanent", "static", ... (empty when the kernel reports none)
    pub state: String,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Route {
    /// "10.244.2.0/24"
    pub dst: String,
    pub gateway: Option<String>,
    pub flags: Vec<String>,
}

/// The neighbour, FDB and route entries on one device of one namespace.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DeviceEntries {
    pub neigh: Vec<Neigh>,
    pub fdb: Vec<Fdb>,
    pub routes: Vec<Route>,
}

impl DeviceEntries {
    /// Read the entries of `dev` in netns `ns`. A missing device gives an error.
    pub fn read(ns: &str, dev: &str) -> Result<Self> {
        let neigh = json(ns, &["ip", "-j", "neigh", "show", "dev", dev])?;
        let fdb = json(ns, &["bridge", "-j", "fdb", "show", "dev", dev])?;
        let routes = json(ns, &["ip", "-j", "route", "show", "dev", dev])?;
        Ok(DeviceEntries {
            neigh: neigh.iter().map(parse_neigh).collect(),
            fdb: fdb.iter().map(parse_fdb).collect(),
            routes: routes.iter().map(parse_route).collect(),
        })
    }

    /// All three entries flannel's VXLAN backend installs for a peer are present and right:
    /// a permanent neighbour `<gw> lladdr <mac>`, a permanent self FDB entry `<mac> dst <ip>`,
    /// and a route `<subnet> via <gw> onlink`. `subnet` is "10.244.2.0/24"; gw is its .0.
    pub fn has_peer(&self, subnet: &str, mac: &str, public_ip: &str) -> bool {
        let gw = subnet_gateway(subnet);
        let mac = mac.to_ascii_lowercase();
        let neigh = self.neigh.iter().any(|n| {
            n.dst == gw
                && n.lladdr.as_deref().map(str::to_ascii_lowercase) == Some(mac.clone())
                && n.state.iter().any(|s| s == "PERMANENT")
        });
        let fdb = self.fdb.iter().any(|f| {
            f.mac.to_ascii_lowercase() == mac
                && f.dst.as_deref() == Some(public_ip)
                && f.flags.iter().any(|x| x == "self")
                && f.state == "permanent"
        });
        let route = self.routes.iter().any(|r| {
            r.dst == subnet
                && r.gateway.as_deref() == Some(gw.as_str())
                && r.flags.iter().any(|x| x == "onlink")
        });
        neigh && fdb && route
    }

    /// No entry of any kind refers to this peer's subnet, gateway or MAC.
    pub fn lacks_peer(&self, subnet: &str, mac: &str) -> bool {
        let gw = subnet_gateway(subnet);
        let mac = mac.to_ascii_lowercase();
        !self.neigh.iter().any(|n| {
            n.dst == gw || n.lladdr.as_deref().map(str::to_ascii_lowercase) == Some(mac.clone())
        }) && !self.fdb.iter().any(|f| f.mac.to_ascii_lowercase() == mac)
            && !self.routes.iter().any(|r| r.dst == subnet)
    }

    /// True if any route on the device points at `subnet`.
    pub fn has_route(&self, subnet: &str) -> bool {
        self.routes.iter().any(|r| r.dst == subnet)
    }
}

/// "10.244.2.0/24" -> "10.244.2.0" (flannel's gateway for a peer subnet is its network address).
pub fn subnet_gateway(subnet: &str) -> String {
    subnet.split('/').next().unwrap_or(subnet).to_owned()
}

fn json(ns: &str, args: &[&str]) -> Result<Vec<Value>> {
    let out = exec_cmd(ns, args).output().context("run ip")?;
    let text = check(args, out)?;
    if text.trim().is_empty() {
        return Ok(Vec::new());
    }
    let v: Value = serde_json::from_str(&text).with_context(|| format!("{args:?}: {text}"))?;
    Ok(v.as_array().cloned().unwrap_or_default())
}

fn s(v: &Value, k: &str) -> Option<String> {
    v.get(k).and_then(Value::as_str).map(str::to_owned)
}

fn strings(v: &Value, k: &str) -> Vec<String> {
    match v.get(k) {
        Some(Value::Array(a)) => a
            .iter()
            .filter_map(|x| x.as_str().map(str::to_owned))
            .collect(),
        Some(Value::String(x)) => vec![x.clone()],
        _ => Vec::new(),
    }
}

fn parse_neigh(v: &Value) -> Neigh {
    Neigh {
        dst: s(v, "dst").unwrap_or_default(),
        lladdr: s(v, "lladdr"),
        state: strings(v, "state"),
    }
}

fn parse_fdb(v: &Value) -> Fdb {
    Fdb {
        mac: s(v, "mac").unwrap_or_default(),
        dst: s(v, "dst"),
        flags: strings(v, "flags"),
        state: s(v, "state").unwrap_or_default(),
    }
}

fn parse_route(v: &Value) -> Route {
    Route {
        dst: s(v, "dst").unwrap_or_default(),
        gateway: s(v, "gateway"),
        flags: strings(v, "flags"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entries() -> DeviceEntries {
        let n: Value = serde_json::from_str(
            r#"[{"dst":"10.244.2.0","lladdr":"0a:00:00:00:00:02","state":["PERMANENT"]}]"#,
        )
        .unwrap();
        let f: Value = serde_json::from_str(
            r#"[{"mac":"0a:00:00:00:00:02","dst":"198.18.0.12","flags":["self"],"state":"permanent"}]"#,
        )
        .unwrap();
        let r: Value = serde_json::from_str(
            r#"[{"dst":"10.244.2.0/24","gateway":"10.244.2.0","flags":["onlink"]}]"#,
        )
        .unwrap();
        DeviceEntries {
            neigh: n.as_array().unwrap().iter().map(parse_neigh).collect(),
            fdb: f.as_array().unwrap().iter().map(parse_fdb).collect(),
            routes: r.as_array().unwrap().iter().map(parse_route).collect(),
        }
    }

    #[test]
    fn recognises_a_complete_peer() {
        let e = entries();
        assert!(e.has_peer("10.244.2.0/24", "0A:00:00:00:00:02", "198.18.0.12"));
        assert!(!e.has_peer("10.244.2.0/24", "0a:00:00:00:00:02", "198.18.0.13"));
        assert!(!e.has_peer("10.244.3.0/24", "0a:00:00:00:00:02", "198.18.0.12"));
        assert!(!e.lacks_peer("10.244.2.0/24", "0a:00:00:00:00:02"));
        assert!(e.lacks_peer("10.244.3.0/24", "0a:00:00:00:00:03"));
    }

    #[test]
    fn a_missing_entry_is_not_a_complete_peer() {
        let mut e = entries();
        e.fdb.clear();
        assert!(!e.has_peer("10.244.2.0/24", "0a:00:00:00:00:02", "198.18.0.12"));
        let mut e = entries();
        e.routes[0].flags.clear();
        assert!(!e.has_peer("10.244.2.0/24", "0a:00:00:00:00:02", "198.18.0.12"));
        let mut e = entries();
        e.neigh[0].state = vec!["STALE".into()];
        assert!(!e.has_peer("10.244.2.0/24", "0a:00:00:00:00:02", "198.18.0.12"));
    }
}
