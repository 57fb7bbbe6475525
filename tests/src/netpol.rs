//! The NetworkPolicy world of the upstream e2e suite on a lab: namespaces x, y, z with pods a,
//! b, c (labelled `pod=<name>`, declaring `serve-{80,81}-{tcp,udp,sctp}`) spread over three
//! nodes, each pod serving TCP and UDP on 80 and 81, and probes between every pair of pods.
//! Policies, namespaces and labels are written to etcd where twilld reads them.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::os::fd::AsFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use netpol::fixtures::{self, Action, Check};
use netpol::model::{PodKey, Protocol};
use serde_json::{json, Value};

use crate::fakeapi::{FakeApi, Kind};
use crate::lab::Lab;
use crate::pod::Pod;

pub const PREFIX: &str = "/coreos.com/network";
pub const PORTS: [u16; 2] = [80, 81];
/// How long one probe waits for its answer. A denied TCP probe waits this long for nothing.
pub const PROBE_TIMEOUT: Duration = Duration::from_millis(600);

/// The CNI config of a world pod: its labels and declared ports in `args.cni`.
pub fn pod_config(lab: &Lab, node: usize, labels: &BTreeMap<String, String>) -> Value {
    let mut cfg = lab.cni_config(node, "1.0.0");
    let labels: Vec<Value> = labels
        .iter()
        .map(|(k, v)| json!({"key": k, "value": v}))
        .collect();
    let mut ports = Vec::new();
    for port in PORTS {
        for proto in ["TCP", "UDP", "SCTP"] {
            ports.push(
                json!({"name": format!("serve-{port}-{}", proto.to_lowercase()),
                              "containerPort": port, "protocol": proto}),
            );
        }
    }
    cfg["args"] = json!({"cni": {"labels": labels, "containerPorts": ports}});
    cfg
}

/// Every world pod serves TCP and UDP on 80 and 81 (threads inside its netns) until dropped.
pub struct Servers {
    stop: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Servers {
    pub fn start(pods: &[&Pod]) -> Result<Servers> {
        let stop = Arc::new(AtomicBool::new(false));
        let mut threads = Vec::new();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel::<Result<(), String>>();
        let mut expected = 0;
        for pod in pods {
            // On a dual-stack node, on its IPv6 address too.
            let ips = std::iter::once(IpAddr::V4(pod.ip)).chain(pod.ip6.map(IpAddr::V6));
            for ip in ips {
                for port in PORTS {
                    for udp in [false, true] {
                        expected += 1;
                        let (stop, ready) = (stop.clone(), ready_tx.clone());
                        let ns = pod.netns_path();
                        threads.push(std::thread::spawn(move || {
                            serve(&ns, ip, port, udp, stop, ready)
                        }));
                    }
                }
            }
        }
        let s = Servers { stop, threads };
        for _ in 0..expected {
            ready_rx
                .recv_timeout(Duration::from_secs(10))
                .context("a server did not start")?
                .map_err(anyhow::Error::msg)?;
        }
        Ok(s)
    }
}

impl Drop for Servers {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

fn enter(ns_path: &str) -> std::io::Result<()> {
    let f = std::fs::File::open(ns_path)?;
    nix::sched::setns(f.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET).map_err(std::io::Error::from)
}

fn serve(
    ns: &str,
    ip: IpAddr,
    port: u16,
    udp: bool,
    stop: Arc<AtomicBool>,
    ready: std::sync::mpsc::Sender<Result<(), String>>,
) {
    if let Err(e) = enter(ns) {
        let _ = ready.send(Err(format!("setns {ns}: {e}")));
        return;
    }
    let addr = SocketAddr::new(ip, port);
    if udp {
        let s = match UdpSocket::bind(addr) {
            Ok(s) => s,
            Err(e) => {
                let _ = ready.send(Err(format!("bind udp {addr}: {e}")));
                return;
            }
        };
        let _ = s.set_read_timeout(Some(Duration::from_millis(100)));
        let _ = ready.send(Ok(()));
        let mut buf = [0u8; 64];
        while !stop.load(Ordering::Relaxed) {
            if let Ok((n, from)) = s.recv_from(&mut buf) {
                let _ = s.send_to(&buf[..n], from);
            }
        }
    } else {
        let l = match TcpListener::bind(addr) {
            Ok(l) => l,
            Err(e) => {
                let _ = ready.send(Err(format!("bind tcp {addr}: {e}")));
                return;
            }
        };
        let _ = l.set_nonblocking(true);
        let _ = ready.send(Ok(()));
        while !stop.load(Ordering::Relaxed) {
            match l.accept() {
                Ok((mut s, _)) => {
                    let _ = s.set_nonblocking(false);
                    let _ = s.set_read_timeout(Some(Duration::from_secs(1)));
                    let mut b = [0u8; 16];
                    if let Ok(n) = s.read(&mut b) {
                        let _ = s.write_all(&b[..n]);
                    }
                }
                Err(_) => std::thread::sleep(Duration::from_millis(5)),
            }
        }
    }
}

/// One probe from inside `from_ns`: a TCP exchange or a UDP echo with `to`, within the timeout.
pub fn probe(from_ns: &str, to: IpAddr, port: u16, proto: Protocol) -> bool {
    let from = from_ns.to_string();
    std::thread::spawn(move || {
        if enter(&from).is_err() {
            return false;
        }
        let addr = SocketAddr::new(to, port);
        match proto {
            Protocol::Tcp => (|| -> std::io::Result<bool> {
                let mut s = TcpStream::connect_timeout(&addr, PROBE_TIMEOUT)?;
                s.set_read_timeout(Some(PROBE_TIMEOUT))?;
                s.write_all(b"probe")?;
                let mut b = [0u8; 5];
                s.read_exact(&mut b)?;
                Ok(&b == b"probe")
            })()
            .unwrap_or(false),
            Protocol::Udp => (|| -> std::io::Result<bool> {
                let s = UdpSocket::bind("0.0.0.0:0")?;
                s.set_read_timeout(Some(PROBE_TIMEOUT))?;
                s.send_to(b"probe", addr)?;
                let mut b = [0u8; 5];
                // A timed receive fails with EINTR on any handled signal: not an answer.
                let n = loop {
                    match s.recv_from(&mut b) {
                        Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                        r => break r?.0,
                    }
                };
                Ok(&b[..n] == b"probe")
            })()
            .unwrap_or(false),
            // No SCTP in the lab's kernel; such checks are skipped by callers.
            Protocol::Sctp => false,
        }
    })
    .join()
    .unwrap_or(false)
}

/// Where a world's objects live: etcd (`<prefix>/policies/` etc., as twillctl writes them), or
/// the Kubernetes API (twill's fake API server, for Kubernetes mode).
pub enum ObjectsAt {
    Etcd,
    Api(Arc<FakeApi>),
}

/// The world on a lab: its pods (created through the plugin, as a runtime would) and servers.
pub struct World {
    pub pods: BTreeMap<PodKey, Pod>,
    pub labels: BTreeMap<PodKey, BTreeMap<String, String>>,
    _servers: Servers,
    at: ObjectsAt,
}

/// The ports every world pod declares (named `serve-<port>-<proto>`), as a container's ports.
fn container_ports() -> Vec<Value> {
    let mut ports = Vec::new();
    for port in PORTS {
        for proto in ["TCP", "UDP", "SCTP"] {
            ports.push(
                json!({"name": format!("serve-{port}-{}", proto.to_lowercase()),
                              "containerPort": port, "protocol": proto}),
            );
        }
    }
    ports
}

impl World {
    /// Creates the nine pods on a lab of three nodes with twilld ready.
    pub fn new(lab: &mut Lab) -> Result<World> {
        let mut pods = BTreeMap::new();
        let mut labels = BTreeMap::new();
        for wp in fixtures::e2e_world() {
            let node: usize = wp.node.trim_start_matches('n').parse()?;
            let tag = format!("{}{}", wp.key.namespace, wp.key.name);
            let cfg = pod_config(lab, node, &wp.labels);
            let args = format!(
                "IgnoreUnknown=1;K8S_POD_NAMESPACE={};K8S_POD_NAME={}",
                wp.key.namespace, wp.key.name
            );
            let pod = lab
                .add_pod_with(node, &tag, &args, &cfg)
                .with_context(|| format!("pod {}", wp.key))?;
            labels.insert(wp.key.clone(), wp.labels.clone());
            pods.insert(wp.key, pod);
        }
        let refs: Vec<&Pod> = pods.values().collect();
        let servers = Servers::start(&refs)?;
        Ok(World {
            pods,
            labels,
            _servers: servers,
            at: ObjectsAt::Etcd,
        })
    }

    /// The same world in Kubernetes mode: namespaces and pods are API objects (each pod's
    /// object first, then its CNI ADD, then its address in the object's status, as kubelet
    /// does), and everything `apply` writes goes to the API.
    pub fn new_in_api(lab: &mut Lab, api: Arc<FakeApi>) -> Result<World> {
        for ns in fixtures::NAMESPACES {
            if api.get_value(Kind::Namespace, "", ns).is_none() {
                api.add_namespace(ns, &[])?;
            }
        }
        let mut pods = BTreeMap::new();
        let mut labels = BTreeMap::new();
        for wp in fixtures::e2e_world() {
            let node: usize = wp.node.trim_start_matches('n').parse()?;
            let (ns, name) = (&wp.key.namespace, &wp.key.name);
            // Created unbound, then bound by the scheduler, as every pod is.
            api.create_value(
                Kind::Pod,
                json!({
                    "metadata": {"name": name, "namespace": ns, "labels": wp.labels},
                    "spec": {"containers": [{"name": "c", "image": "busybox", "ports": container_ports()}]},
                    "status": {"phase": "Pending"}
                }),
            )?;
            api.update_value(Kind::Pod, ns, name, |p| {
                p["spec"]["nodeName"] = json!(wp.node);
            })?;
            let args = format!("IgnoreUnknown=1;K8S_POD_NAMESPACE={ns};K8S_POD_NAME={name}");
            let cfg = lab.cni_config(node, "1.0.0");
            let pod = lab
                .add_pod_with(node, &format!("{ns}{name}"), &args, &cfg)
                .with_context(|| format!("pod {}", wp.key))?;
            let ip = pod.ip.to_string();
            api.update_value(Kind::Pod, ns, name, |p| {
                p["status"] = json!({"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}]});
            })?;
            labels.insert(wp.key.clone(), wp.labels.clone());
            pods.insert(wp.key, pod);
        }
        let refs: Vec<&Pod> = pods.values().collect();
        let servers = Servers::start(&refs)?;
        Ok(World {
            pods,
            labels,
            _servers: servers,
            at: ObjectsAt::Api(api),
        })
    }

    pub fn ip(&self, k: &PodKey) -> IpAddr {
        IpAddr::V4(self.pods[k].ip)
    }

    /// Writes an action where twilld reads it.
    pub fn apply(&mut self, lab: &Lab, action: &Action) -> Result<()> {
        if let ObjectsAt::Api(api) = &self.at {
            let api = api.clone();
            return self.apply_in_api(&api, action);
        }
        match action {
            Action::UpsertPolicy(p) => {
                let p = fixtures::instantiate(p, |k| self.ip(k));
                let ns = p.metadata.namespace.clone().unwrap_or_default();
                let key = format!("{PREFIX}/policies/{ns}/{}", p.metadata.name);
                lab.etcdctl(&["put", &key, "--", &serde_json::to_string(&p)?])?;
            }
            Action::DeletePolicy(k) => {
                lab.etcdctl(&[
                    "del",
                    &format!("{PREFIX}/policies/{}/{}", k.namespace, k.name),
                ])?;
            }
            Action::SetNamespaceLabels { namespace, labels } => {
                let v = json!({"apiVersion": "v1", "kind": "Namespace",
                               "metadata": {"name": namespace, "labels": labels}});
                lab.etcdctl(&[
                    "put",
                    &format!("{PREFIX}/namespaces/{namespace}"),
                    "--",
                    &v.to_string(),
                ])?;
            }
            Action::SetPodLabels { pod, labels } => {
                self.set_pod_labels(lab, pod, labels.clone())?;
            }
        }
        Ok(())
    }

    fn apply_in_api(&mut self, api: &FakeApi, action: &Action) -> Result<()> {
        match action {
            Action::UpsertPolicy(p) => {
                let p = fixtures::instantiate(p, |k| self.ip(k));
                let ns = p.metadata.namespace.clone().unwrap_or_default();
                let mut v = serde_json::to_value(&p)?;
                v["apiVersion"] = json!("networking.k8s.io/v1");
                v["kind"] = json!("NetworkPolicy");
                if api
                    .get_value(Kind::NetworkPolicy, &ns, &p.metadata.name)
                    .is_some()
                {
                    api.update_value(Kind::NetworkPolicy, &ns, &p.metadata.name, |old| {
                        old["spec"] = v["spec"].clone();
                    })?;
                } else {
                    api.add_network_policy(v)?;
                }
            }
            Action::DeletePolicy(k) => {
                api.delete(Kind::NetworkPolicy, &k.namespace, &k.name)?;
            }
            Action::SetNamespaceLabels { namespace, labels } => {
                let mut l = labels.clone();
                // The API server keeps this label on every namespace.
                l.insert("kubernetes.io/metadata.name".into(), namespace.clone());
                api.update_value(Kind::Namespace, "", namespace, |n| {
                    n["metadata"]["labels"] = json!(l);
                })?;
            }
            Action::SetPodLabels { pod, labels } => {
                api.update_value(Kind::Pod, &pod.namespace, &pod.name, |p| {
                    p["metadata"]["labels"] = json!(labels);
                })?;
                self.labels.insert(pod.clone(), labels.clone());
            }
        }
        Ok(())
    }

    /// Edits a pod's record in etcd as an operator would (`twillctl label` does the same).
    pub fn set_pod_labels(
        &mut self,
        lab: &Lab,
        pod: &PodKey,
        labels: BTreeMap<String, String>,
    ) -> Result<()> {
        let key = format!("{PREFIX}/pods/{}/{}", pod.namespace, pod.name);
        let deadline = Instant::now() + Duration::from_secs(10);
        // The record appears once twilld has written it.
        let mut v: Value = loop {
            let out = lab.etcdctl(&["get", &key, "--print-value-only"])?;
            if !out.trim().is_empty() {
                break serde_json::from_str(out.trim())?;
            }
            if Instant::now() > deadline {
                bail!("no record {key} in etcd");
            }
            std::thread::sleep(Duration::from_millis(100));
        };
        v["metadata"]["labels"] = json!(labels);
        lab.etcdctl(&["put", &key, "--", &v.to_string()])?;
        self.labels.insert(pod.clone(), labels);
        Ok(())
    }

    /// Back to the world as a case starts: no policies, no namespace objects, pods' own labels.
    pub fn reset(&mut self, lab: &Lab) -> Result<()> {
        if let ObjectsAt::Api(api) = &self.at {
            let api = api.clone();
            for key in api.names(Kind::NetworkPolicy) {
                let (ns, name) = key.split_once('/').unwrap_or(("", &key));
                api.delete(Kind::NetworkPolicy, ns, name)?;
            }
            for ns in fixtures::NAMESPACES {
                api.update_value(Kind::Namespace, "", ns, |n| {
                    n["metadata"]["labels"] = json!({"kubernetes.io/metadata.name": ns});
                })?;
            }
            for wp in fixtures::e2e_world() {
                if self.labels.get(&wp.key) != Some(&wp.labels) {
                    self.apply_in_api(
                        &api,
                        &Action::SetPodLabels {
                            pod: wp.key.clone(),
                            labels: wp.labels.clone(),
                        },
                    )?;
                }
            }
            return Ok(());
        }
        lab.etcdctl(&["del", "--prefix", &format!("{PREFIX}/policies/")])?;
        lab.etcdctl(&["del", "--prefix", &format!("{PREFIX}/namespaces/")])?;
        for wp in fixtures::e2e_world() {
            if self.labels.get(&wp.key) != Some(&wp.labels) {
                self.set_pod_labels(lab, &wp.key, wp.labels.clone())?;
            }
        }
        Ok(())
    }

    /// Probes every pair on `check`'s protocol and port, all at once; the pairs whose outcome
    /// differs from the expectation, as "from -> to: allowed/denied".
    pub fn mismatches(&self, check: &Check) -> Vec<String> {
        let handles: Vec<_> = fixtures::pairs()
            .into_iter()
            .map(|(from, to)| {
                let ns = self.pods[&from].netns_path();
                let ip = self.ip(&to);
                let (port, proto) = (check.port, check.protocol);
                let want = check.expected(&from, &to);
                std::thread::spawn(move || {
                    let got = probe(&ns, ip, port, proto);
                    (from, to, want, got)
                })
            })
            .collect();
        handles
            .into_iter()
            .filter_map(|h| h.join().ok())
            .filter(|(_, _, want, got)| want != got)
            .map(|(from, to, want, _)| {
                format!(
                    "{from} -> {to}: expected {}",
                    if want { "allowed" } else { "denied" }
                )
            })
            .collect()
    }

    /// Probes until the matrix matches `check` (policy is applied within moments, not
    /// instantly across nodes), or fails after `within` with what still differs.
    pub fn wait_matrix(&self, check: &Check, within: Duration) -> Result<()> {
        let deadline = Instant::now() + within;
        loop {
            let bad = self.mismatches(check);
            if bad.is_empty() {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "{}/{}: {} of 72 pairs differ: {}",
                    check.protocol,
                    check.port,
                    bad.len(),
                    bad.join("; ")
                );
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}
