//! The lab CLI's state and checks (the `twill-lab` binary renders them). In the library so the
//! CLI's own test can read what the CLI saved and printed with the same types.
//!
//! A lab made by `twill-lab up` outlives that process: the state file records what it takes to
//! manage it again (the harness's `LabState`, the pods, the nodes killed on purpose).

use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::lab::{Lab, LabState};
use crate::netns;
use crate::pod::{tcp_probe_ip, Pod};

pub const DEFAULT_STATE: &str = "/run/twill-lab/state.json";
/// Namespaces are `<prefix>u`, `<prefix>n<i>`, `<prefix>p<i><pod>`.
pub const DEFAULT_PREFIX: &str = "twill";
/// The network config for `backend` (a `Backend.Type`, or `vxlan-direct` for VXLAN with
/// DirectRouting): flannel's example network, split in /24s, one per node, with that backend;
/// with `ipv6`, dual stack: also fd00:10:244::/56 in /64s.
pub fn network_config(backend: &str, ipv6: bool) -> String {
    let b = match backend {
        "vxlan-direct" => json!({"Type": "vxlan", "DirectRouting": true}),
        t => json!({ "Type": t }),
    };
    let mut c = json!({"Network": "10.244.0.0/16", "Backend": b});
    if ipv6 {
        c["EnableIPv6"] = json!(true);
        c["IPv6Network"] = json!(IPV6_NETWORK);
    }
    c.to_string()
}

/// The lab's IPv6 pod network (`up --ipv6`).
pub const IPV6_NETWORK: &str = "fd00:10:244::/56";
/// The port the matrix's TCP probes listen on inside the receiving pod.
pub const PROBE_PORT: u16 = 7777;
pub const CONFLIST: &str = "10-twill.conflist";
/// In a cell's error when a pod of a killed node is involved.
pub const GONE: &str = "(node killed)";

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct LabPod {
    /// As shown to the user: `n<node>-<letter>`.
    pub name: String,
    pub pod: Pod,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct CliState {
    pub prefix: String,
    pub dir: PathBuf,
    pub pods_per_node: usize,
    /// None until the lab's namespaces and etcd exist.
    pub lab: Option<LabState>,
    pub pods: Vec<LabPod>,
    /// Nodes removed by `kill-node` (their numbers are not reused).
    pub killed: Vec<usize>,
}

impl CliState {
    pub fn load(path: &Path) -> Result<Option<CliState>> {
        match std::fs::read_to_string(path) {
            Ok(text) => serde_json::from_str(&text)
                .map(Some)
                .with_context(|| format!("{} is not a lab state", path.display())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e).with_context(|| format!("read {}", path.display())),
        }
    }

    /// Write atomically (temp file + rename), so a crash never leaves half a state.
    pub fn save(&self, path: &Path) -> Result<()> {
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)
                .with_context(|| format!("mkdir {}", parent.display()))?;
        }
        let tmp = path.with_extension("json.tmp");
        std::fs::write(&tmp, serde_json::to_string_pretty(self)?)
            .with_context(|| format!("write {}", tmp.display()))?;
        std::fs::rename(&tmp, path).with_context(|| format!("rename to {}", path.display()))
    }

    pub fn is_killed(&self, node: usize) -> bool {
        self.killed.contains(&node)
    }

    pub fn pod(&self, name: &str) -> Option<&LabPod> {
        self.pods.iter().find(|p| p.name == name)
    }
}

/// The pod name shown for pod number `k` (0-based) of node i: n1-a, n1-b, ...
pub fn pod_name(node: usize, k: usize) -> String {
    format!("n{node}-{}", pod_letter(k))
}

pub fn pod_letter(k: usize) -> String {
    let letters = b"abcdefghijklmnopqrstuvwxyz";
    if k < letters.len() {
        (letters[k] as char).to_string()
    } else {
        format!("x{k}")
    }
}

/// "n2", "2" -> 2.
pub fn parse_node(s: &str) -> Option<usize> {
    s.strip_prefix('n')
        .unwrap_or(s)
        .parse()
        .ok()
        .filter(|&n| n > 0)
}

/// Node i's conflist, shaped like deploy/cni/10-twill.conflist, with the node's own socket.
pub fn conflist(lab: &Lab, i: usize) -> Value {
    json!({
        "cniVersion": "1.0.0",
        "name": "twill",
        "plugins": [
            { "type": "twill", "socket": lab.cni_socket(i).display().to_string() }
        ]
    })
}

pub fn conflist_path(lab: &Lab, i: usize) -> PathBuf {
    lab.node_dir(i).join("net.d").join(CONFLIST)
}

/// The network config a runtime hands the first plugin of a conflist: the plugin's entry with
/// the list's cniVersion and name added.
pub fn plugin_config(conflist: &Value) -> Option<Value> {
    let mut cfg = conflist["plugins"].get(0)?.clone();
    let obj = cfg.as_object_mut()?;
    obj.insert("cniVersion".into(), conflist["cniVersion"].clone());
    obj.insert("name".into(), conflist["name"].clone());
    Some(cfg)
}

/// One node as the CLI shows it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct NodeInfo {
    pub node: usize,
    pub name: String,
    pub namespace: String,
    pub underlay_ip: Ipv4Addr,
    pub killed: bool,
    pub daemon_pid: Option<u32>,
    pub daemon_running: bool,
    pub ready: bool,
    pub subnet: Option<String>,
    pub public_ip: Option<String>,
    pub vtep_mac: Option<String>,
    pub peers: usize,
    /// Why twilld's /status could not be read, or what it is waiting for.
    pub note: Option<String>,
}

pub fn node_info(lab: &mut Lab, state: &CliState, i: usize) -> NodeInfo {
    let killed = state.is_killed(i);
    let running = !killed && lab.daemon_running(i);
    let mut info = NodeInfo {
        node: i,
        name: format!("n{i}"),
        namespace: lab.node_ns(i),
        underlay_ip: lab.node_ip(i),
        killed,
        daemon_pid: lab.daemon_pid(i),
        daemon_running: running,
        ready: false,
        subnet: None,
        public_ip: None,
        vtep_mac: None,
        peers: 0,
        note: None,
    };
    if killed {
        info.note = Some("killed".into());
        return info;
    }
    if !running {
        info.note = Some(format!(
            "twilld not running (log: {})",
            lab.daemon_log_path(i).display()
        ));
        return info;
    }
    match lab.status(i) {
        Ok(s) => {
            let text = |v: &Value| v.as_str().map(str::to_owned);
            info.ready = s["ready"].as_bool().unwrap_or(false);
            info.subnet = text(&s["node"]["subnet"]);
            info.public_ip = text(&s["node"]["public_ip"]);
            info.vtep_mac = text(&s["node"]["vtep_mac"]);
            info.peers = s["peers"].as_array().map_or(0, Vec::len);
            info.note = text(&s["waiting_for"]).map(|w| format!("waiting for {w}"));
        }
        Err(e) => info.note = Some(format!("/status: {e:#}")),
    }
    info
}

/// One cell of the pod-to-pod matrix.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Cell {
    pub from: String,
    pub to: String,
    /// "IPv4", or "IPv6" for the second probe of a dual-stack pair.
    #[serde(default = "ipv4")]
    pub family: String,
    /// Reached, and the receiver saw the sender's own pod IP.
    pub ok: bool,
    pub rtt_ms: Option<f64>,
    pub source_seen: Option<IpAddr>,
    pub error: Option<String>,
}

fn ipv4() -> String {
    "IPv4".into()
}

/// A pod's address in the family of a probe.
fn addr_of(pod: &Pod, v6: bool) -> Option<IpAddr> {
    if v6 {
        pod.ip6.map(IpAddr::V6)
    } else {
        Some(IpAddr::V4(pod.ip))
    }
}

/// Probe one ordered pair: a TCP exchange from `from` to a listener in `to`, reporting the source
/// address the listener saw. A pod of a killed node has no namespace any more: from it there is
/// nothing to probe; to it, a plain connect to its old address is tried (and must fail).
///
/// `v6`: over IPv6, between the pods' IPv6 addresses (a dual-stack lab).
pub fn probe(state: &CliState, from: &LabPod, to: &LabPod, v6: bool, timeout: Duration) -> Cell {
    let mut cell = Cell {
        from: from.name.clone(),
        to: to.name.clone(),
        family: if v6 { "IPv6" } else { "IPv4" }.into(),
        ok: false,
        rtt_ms: None,
        source_seen: None,
        error: None,
    };
    if state.is_killed(from.pod.node) || !netns::exists(&from.pod.ns) {
        cell.error = Some(format!("{} is gone {GONE}", from.name));
        return cell;
    }
    let (Some(from_ip), Some(to_ip)) = (addr_of(&from.pod, v6), addr_of(&to.pod, v6)) else {
        cell.error = Some("no IPv6 address".into());
        return cell;
    };
    if state.is_killed(to.pod.node) || !netns::exists(&to.pod.ns) {
        let addr = SocketAddr::new(to_ip, PROBE_PORT);
        let res = netns::in_netns(&from.pod.ns, move || {
            TcpStream::connect_timeout(&addr, Duration::from_secs(1))
        });
        cell.error = Some(match res {
            Ok(Ok(_)) => format!("{addr} answered although {} is gone", to.name),
            Ok(Err(e)) => format!("{} is gone {GONE}: {e}", to.name),
            Err(e) => format!("{e:#}"),
        });
        return cell;
    }
    match tcp_probe_ip(&from.pod.ns, &to.pod.ns, to_ip, PROBE_PORT, timeout) {
        Ok((seen, rtt)) => {
            cell.rtt_ms = Some(rtt.as_secs_f64() * 1000.0);
            cell.source_seen = Some(seen);
            cell.ok = seen == from_ip;
            if !cell.ok {
                cell.error = Some(format!(
                    "receiver saw {seen} instead of {from_ip}: NAT in the path"
                ));
            }
        }
        Err(e) => cell.error = Some(format!("{e:#}")),
    }
    cell
}

/// Every pod to every other pod. With `settle`, a failing live pair is retried until it passes
/// or `settle` has passed (right after pods are created the overlay may still be converging).
pub fn matrix(
    state: &CliState,
    settle: Option<Duration>,
    mut progress: impl FnMut(&Cell),
) -> Vec<Cell> {
    let deadline = settle.map(|s| Instant::now() + s);
    let mut cells = Vec::new();
    for a in &state.pods {
        for b in &state.pods {
            if a.name == b.name {
                continue;
            }
            let live = !state.is_killed(a.pod.node) && !state.is_killed(b.pod.node);
            // Both families between dual-stack pods.
            let dual = a.pod.ip6.is_some() && b.pod.ip6.is_some();
            for v6 in [false, true].into_iter().filter(|v6| !v6 || dual) {
                let mut cell = probe(state, a, b, v6, Duration::from_secs(2));
                while !cell.ok && live && deadline.is_some_and(|d| Instant::now() < d) {
                    std::thread::sleep(Duration::from_millis(200));
                    cell = probe(state, a, b, v6, Duration::from_secs(2));
                }
                progress(&cell);
                cells.push(cell);
            }
        }
    }
    cells
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_nodes_and_pods() {
        assert_eq!(parse_node("n2"), Some(2));
        assert_eq!(parse_node("12"), Some(12));
        assert_eq!(parse_node("n0"), None);
        assert_eq!(parse_node("n1-a"), None);
        assert_eq!(pod_name(3, 1), "n3-b");
    }

    #[test]
    fn plugin_config_is_the_first_plugin_with_list_fields() {
        let list = json!({"cniVersion": "1.0.0", "name": "twill",
            "plugins": [{"type": "twill", "socket": "/s"}]});
        assert_eq!(
            plugin_config(&list).unwrap(),
            json!({"cniVersion": "1.0.0", "name": "twill", "type": "twill", "socket": "/s"})
        );
        assert!(plugin_config(&json!({"plugins": []})).is_none());
    }
}
