//! Network policy, side by side in one run on one three-node lab (real etcd, kernel, plugin):
//!
//! 1. policy write in etcd → enforcement: a server pod on node 1, a client pod on node 2, a
//!    policy selecting the server edited so that the client's verdict flips (allow → deny and
//!    back), with 1,000 pods and 100 policies in the cluster; the first probe that sees the
//!    new verdict ends the clock. Reference, alternated with it: the same flip made by one `nft`
//!    run inside node 1 (what the kernel and the stock tool need, no etcd, no daemon), and etcd's
//!    own put → watch-event latency.
//! 2. a pod's label edited in its etcd record → enforcement: the client's (a peer: a set element
//!    moves) and the server's (the target: the policies isolating it change).
//! 3. CNI ADD with policy on (node 1) against policy off (node 3, `--network-policy=false`),
//!    same cluster loaded, calls alternated: an unselected pod, a replica of a pod already here
//!    (same policies), and the first pod of its kind on the node (new chains). What is added
//!    is the median of the pairs' differences (each ADD against the reference ADD next to it).
//! 4. pod-to-pod TCP throughput and connection rate with the 100 policies in force against
//!    none, alternated.
//! 5. scale: nft rules, set elements and twilld's memory for 1k/5k pods × 10/100/1,000
//!    policies, against what kube-router's per-pod iptables layout would need for the same
//!    objects (computed from its layout; kube-router does not run here).
//!
//! Probing: from inside the client pod a TCP connect starts every 2 ms (25 ms timeout, closed
//! with a RST); the delay is the send time of the first probe with the new verdict minus the
//! instant just before the etcd put (resolution: the probe spacing).

use std::collections::BTreeMap;
use std::fs::File;
use std::io::Write;
use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use nix::sched::{setns, CloneFlags};
use serde_json::{json, Value};
use twill_tests::{netns, wait_until, Lab, Pod};

use crate::backends::{self, Servers};
use crate::cni::{self, Plugin};
use crate::common::{self, ms, Ctx};
use crate::etcd::Writer;
use crate::polgen::{self, PREFIX};
use crate::report::{Metric, ScenarioResult};
use crate::stats::{percentile, Stats};

const PROBE_PORT: u16 = 7000;
const IPERF_PORT: u16 = 5201;
const CONN_PORT: u16 = 7900;
const PROBE_EVERY: Duration = Duration::from_millis(2);
const PROBE_TIMEOUT: Duration = Duration::from_millis(25);
/// How long a deny must hold (every probe failing) before it counts.
const DENY_HOLD: Duration = Duration::from_millis(40);
const FLIP_TIMEOUT: Duration = Duration::from_secs(10);
const TARGET_MS: f64 = 100.0;
const BENCH_POLICIES: usize = 8;

struct Config {
    pods: usize,
    policies: usize,
    resident: usize,
    reps: usize,
    cni_pairs: usize,
    iperf_secs: u32,
    runs: usize,
    rate_secs: f64,
    scale_pods: Vec<usize>,
    scale_policies: Vec<usize>,
    quiet: Duration,
}

impl Config {
    fn new(quick: bool) -> Config {
        if quick {
            Config {
                pods: 120,
                policies: 20,
                resident: 3,
                reps: 2,
                cni_pairs: 2,
                iperf_secs: 1,
                runs: 1,
                rate_secs: 0.5,
                scale_pods: vec![120, 240],
                scale_policies: vec![10, 20],
                quiet: Duration::from_millis(500),
            }
        } else {
            Config {
                pods: 1000,
                policies: 100,
                resident: 20,
                reps: 50,
                cni_pairs: 60,
                iperf_secs: 5,
                runs: 9,
                rate_secs: 8.0,
                scale_pods: vec![1000, 5000],
                scale_policies: vec![10, 100, 1000],
                quiet: Duration::from_millis(1500),
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The bench's own objects

fn sel(k: &str, v: &str) -> Value {
    json!({"matchLabels": {k: v}})
}

fn tcp_ports(ports: &[u16]) -> Value {
    Value::Array(
        ports
            .iter()
            .map(|p| json!({"protocol": "TCP", "port": p}))
            .collect(),
    )
}

fn bench_policy(name: &str, spec: Value) -> (String, String) {
    let v = json!({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
                   "metadata": {"name": name, "namespace": "bench"}, "spec": spec});
    (format!("{PREFIX}/policies/bench/{name}"), v.to_string())
}

/// The policy whose edit flips the client's verdict: allow from the client, or from nobody.
fn flip_policy(allow: bool) -> (String, String) {
    let peer = if allow {
        "bench-client"
    } else {
        "bench-nobody"
    };
    bench_policy(
        "b-flip",
        json!({"podSelector": sel("app", "bench-server"), "policyTypes": ["Ingress"],
               "ingress": [{"from": [{"podSelector": sel("app", peer)}],
                            "ports": tcp_ports(&[PROBE_PORT, IPERF_PORT, CONN_PORT])}]}),
    )
}

/// Eight policies around the bench pods: the server is isolated and selected by six (the
/// client allowed by at most one rule among them), the client's egress by one.
fn bench_policies(flip_allows: bool) -> Vec<(String, String)> {
    vec![
        bench_policy(
            "b-default-deny",
            json!({"podSelector": sel("app", "bench-server"), "policyTypes": ["Ingress"]}),
        ),
        bench_policy(
            "b-from-frontends",
            json!({"podSelector": sel("app", "bench-server"), "policyTypes": ["Ingress"],
                   "ingress": [{"from": [{"namespaceSelector": sel("env", "prod"),
                                          "podSelector": sel("app", "frontend")}],
                                "ports": tcp_ports(&[8080])}]}),
        ),
        bench_policy(
            "b-from-monitoring",
            json!({"podSelector": sel("app", "bench-server"), "policyTypes": ["Ingress"],
                   "ingress": [{"from": [{"namespaceSelector": sel("role", "monitoring")}],
                                "ports": [{"protocol": "TCP", "port": "metrics"}]}]}),
        ),
        bench_policy(
            "b-from-partners",
            json!({"podSelector": sel("app", "bench-server"), "policyTypes": ["Ingress"],
                   "ingress": [{"from": [{"ipBlock": {"cidr": "192.0.2.0/24",
                                                      "except": ["192.0.2.128/25"]}}],
                                "ports": tcp_ports(&[IPERF_PORT, PROBE_PORT])}]}),
        ),
        flip_policy(flip_allows),
        bench_policy(
            "b-by-label",
            json!({"podSelector": sel("app", "bench-server"), "policyTypes": ["Ingress"],
                   "ingress": [{"from": [{"podSelector": sel("access", "granted")}],
                                "ports": tcp_ports(&[PROBE_PORT])}]}),
        ),
        bench_policy(
            "b-open",
            json!({"podSelector": sel("open", "yes"), "policyTypes": ["Ingress"],
                   "ingress": [{"from": [{"podSelector": sel("app", "bench-client")}],
                                "ports": tcp_ports(&[PROBE_PORT])}]}),
        ),
        bench_policy(
            "b-client-egress",
            json!({"podSelector": sel("app", "bench-client"), "policyTypes": ["Egress"],
                   "egress": [
                       {"to": [{"namespaceSelector": sel("role", "monitoring")}],
                        "ports": tcp_ports(&[9090])},
                       {"to": [{"ipBlock": {"cidr": "192.0.2.0/24"}}], "ports": tcp_ports(&[443])},
                       {"to": [{"namespaceSelector": sel("env", "prod"),
                                "podSelector": sel("tier", "api")}], "ports": tcp_ports(&[8080])},
                       {"to": [{"podSelector": sel("app", "bench-server")}],
                        "ports": tcp_ports(&[PROBE_PORT, IPERF_PORT, CONN_PORT])}]}),
        ),
    ]
}

/// The cluster's policies: the bench's eight and generated ones up to `total`.
fn all_policies(total: usize, flip_allows: bool) -> Vec<(String, String)> {
    let mut v = bench_policies(flip_allows);
    v.extend((0..total.saturating_sub(BENCH_POLICIES)).map(polgen::policy_kv));
    v
}

fn labels_json(labels: &BTreeMap<String, String>) -> Value {
    Value::Array(
        labels
            .iter()
            .map(|(k, v)| json!({"key": k, "value": v}))
            .collect(),
    )
}

/// The twill plugin's network config for node `i` with a pod's labels and declared ports.
fn pod_cfg(lab: &Lab, i: usize, labels: &BTreeMap<String, String>, ports: Vec<Value>) -> Value {
    let mut cfg = lab.cni_config(i, "1.0.0");
    cfg["args"] = json!({"cni": {"labels": labels_json(labels), "containerPorts": ports}});
    cfg
}

fn server_ports() -> Vec<Value> {
    vec![
        json!({"name": "probe", "containerPort": PROBE_PORT, "protocol": "TCP"}),
        json!({"name": "iperf", "containerPort": IPERF_PORT, "protocol": "TCP"}),
        json!({"name": "metrics", "containerPort": 9090, "protocol": "TCP"}),
    ]
}

/// A real pod (through the plugin) and what the kube-router count needs to know of it.
struct RealPod {
    pod: Pod,
    namespace: String,
    name: String,
    labels: BTreeMap<String, String>,
    ports: Vec<Value>,
    node: usize,
}

impl RealPod {
    fn api(&self) -> Value {
        json!({"metadata": {"name": self.name, "namespace": self.namespace, "labels": self.labels},
               "spec": {"nodeName": format!("n{}", self.node),
                        "containers": [{"name": "c", "ports": self.ports}]},
               "status": {"phase": "Running", "podIP": self.pod.ip.to_string(),
                          "podIPs": [{"ip": self.pod.ip.to_string()}]}})
    }
}

fn add_real(
    lab: &mut Lab,
    node: usize,
    namespace: &str,
    name: &str,
    labels: BTreeMap<String, String>,
    ports: Vec<Value>,
) -> Result<RealPod> {
    let cfg = pod_cfg(lab, node, &labels, ports.clone());
    let args = format!("IgnoreUnknown=1;K8S_POD_NAMESPACE={namespace};K8S_POD_NAME={name}");
    let tag = format!("{}{}", &namespace[..namespace.len().min(6)], name);
    let pod = lab
        .add_pod_with(node, &tag, &args, &cfg)
        .with_context(|| format!("pod {namespace}/{name} on node {node}"))?;
    Ok(RealPod {
        pod,
        namespace: namespace.into(),
        name: name.into(),
        labels,
        ports,
        node,
    })
}

fn labels(kv: &[(&str, &str)]) -> BTreeMap<String, String> {
    kv.iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Waiting for twilld

fn metric0(lab: &Lab, i: usize, name: &str) -> f64 {
    lab.metric(i, name).ok().flatten().unwrap_or(0.0)
}

/// Until twilld on node `i` has applied everything: policy state loaded, no sync and almost no
/// CPU for `quiet`, no pod record waiting to be written.
fn settle(lab: &Lab, i: usize, quiet: Duration, timeout: Duration) -> Result<()> {
    let pid = lab
        .daemon_pid(i)
        .ok_or_else(|| anyhow!("twilld not running on node {i}"))?;
    let deadline = Instant::now() + timeout;
    loop {
        let syncs = metric0(lab, i, "twill_policy_syncs_total");
        let cpu = common::cpu_seconds(pid)?;
        std::thread::sleep(quiet);
        let busy = common::cpu_seconds(pid)? - cpu;
        let st = lab.status(i)?;
        let loaded = st["policy"]["loaded"] == true;
        if loaded
            && metric0(lab, i, "twill_policy_syncs_total") == syncs
            && metric0(lab, i, "twill_policy_records_pending") == 0.0
            && busy < quiet.as_secs_f64() * 0.05
        {
            if let Some(e) = st["policy"]["error"].as_str() {
                bail!("twilld on node {i} reports a policy error: {e}");
            }
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("twilld on node {i} did not settle within {timeout:?}");
        }
    }
}

/// twilld's account of its last sync: total, compile, render (and compare), apply, in ms, and
/// whether the apply went through netlink (else nft -f).
#[derive(Clone, Copy, Debug)]
struct Steps {
    total: f64,
    compile: f64,
    render: f64,
    apply: f64,
    netlink: bool,
}

fn last_steps(lab: &Lab, i: usize) -> Option<Steps> {
    let st = lab.status(i).ok()?;
    let p = &st["policy"];
    let s = &p["last_sync"];
    Some(Steps {
        total: p["last_sync_ms"].as_f64()?,
        compile: s["compile_ms"].as_f64()?,
        render: s["render_ms"].as_f64()?,
        apply: s["apply_ms"].as_f64()?,
        netlink: s["path"] == "netlink",
    })
}

/// The last CNI ADD's policy step inside twilld: (record ms, program ms, total ms, path).
fn last_pod_up(lab: &Lab, i: usize) -> Option<(f64, f64, f64, String)> {
    let st = lab.status(i).ok()?;
    let s = &st["policy"]["last_pod_up"];
    Some((
        s["record_ms"].as_f64()?,
        s["program_ms"].as_f64()?,
        s["total_ms"].as_f64()?,
        s["path"].as_str()?.to_string(),
    ))
}

#[derive(Default)]
struct PodUpSamples {
    record: Vec<f64>,
    program: Vec<f64>,
    total: Vec<f64>,
    paths: BTreeMap<String, usize>,
}

impl PodUpSamples {
    fn describe(&self) -> String {
        let m = |v: &[f64]| Stats::of(v).map_or(f64::NAN, |s| s.median);
        let paths: Vec<String> = self.paths.iter().map(|(p, n)| format!("{n} {p}")).collect();
        format!(
            "the policy step inside twilld: median {:.2} ms (pod record {:.2}, programming \
             {:.2}; {})",
            m(&self.total),
            m(&self.record),
            m(&self.program),
            paths.join(", ")
        )
    }
}

#[derive(Default)]
struct StepSamples {
    total: Vec<f64>,
    compile: Vec<f64>,
    render: Vec<f64>,
    apply: Vec<f64>,
    netlink: usize,
}

impl StepSamples {
    fn push(&mut self, s: Steps) {
        self.total.push(s.total);
        self.compile.push(s.compile);
        self.render.push(s.render);
        self.apply.push(s.apply);
        self.netlink += usize::from(s.netlink);
    }

    fn describe(&self) -> String {
        let m = |v: &[f64]| Stats::of(v).map_or(f64::NAN, |s| s.median);
        format!(
            "median compile {:.2}, render + compare {:.2}, apply {:.2} ms; {} of {} applied \
             through netlink, the rest nft -f",
            m(&self.compile),
            m(&self.render),
            m(&self.apply),
            self.netlink,
            self.total.len()
        )
    }
}

/// After a change: wait for node `i`'s sync counter to pass `before`, then twilld's account
/// of that sync.
fn sync_after(lab: &Lab, i: usize, before: (f64, f64)) -> Option<Steps> {
    let deadline = Instant::now() + Duration::from_secs(3);
    while Instant::now() < deadline {
        let syncs = metric0(lab, i, "twill_policy_syncs_total");
        if syncs > before.0 {
            // The counter moves just before /status is published.
            std::thread::sleep(Duration::from_millis(30));
            return last_steps(lab, i);
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    None
}

fn sync_counters(lab: &Lab, i: usize) -> (f64, f64) {
    (
        metric0(lab, i, "twill_policy_syncs_total"),
        metric0(lab, i, "twill_policy_fast_syncs_total"),
    )
}

// ---------------------------------------------------------------------------------------------
// Probing

/// TCP connects from inside a pod every `PROBE_EVERY`, each on its own socket (a new
/// connection every time, so conntrack never lets it through as established), reported as
/// (send instant, connected within `PROBE_TIMEOUT`).
struct Prober {
    stop: Arc<AtomicBool>,
    rx: mpsc::Receiver<(Instant, bool)>,
    seen: Vec<(Instant, bool)>,
    /// Median spacing of the probes' send times during each flip, ms (the resolution).
    spacing: Vec<f64>,
    handle: Option<JoinHandle<()>>,
}

impl Prober {
    fn start(ns: &str, addr: SocketAddr) -> Result<Prober> {
        let path = Path::new("/run/netns").join(ns);
        let file = File::open(&path).with_context(|| format!("open {}", path.display()))?;
        let stop = Arc::new(AtomicBool::new(false));
        let (tx, rx) = mpsc::channel();
        let (ready_tx, ready_rx) = mpsc::channel::<Result<(), String>>();
        let s2 = stop.clone();
        let handle = std::thread::Builder::new()
            .name("prober".into())
            .spawn(move || {
                if let Err(e) = setns(&file, CloneFlags::CLONE_NEWNET) {
                    let _ = ready_tx.send(Err(format!("setns: {e}")));
                    return;
                }
                let rt = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(rt) => rt,
                    Err(e) => {
                        let _ = ready_tx.send(Err(e.to_string()));
                        return;
                    }
                };
                let _ = ready_tx.send(Ok(()));
                rt.block_on(async move {
                    let mut tick = tokio::time::interval(PROBE_EVERY);
                    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                    while !s2.load(Ordering::Relaxed) {
                        tick.tick().await;
                        let tx = tx.clone();
                        tokio::spawn(async move {
                            let sent = Instant::now();
                            let attempt = async {
                                let s = tokio::net::TcpSocket::new_v4()?;
                                // A RST on close: no TIME_WAIT piling up at 500 connects/s.
                                // (Deprecated for blocking in drop; a zero linger never does.)
                                #[allow(deprecated)]
                                s.set_linger(Some(Duration::ZERO))?;
                                let c = s.connect(addr).await?;
                                drop(c);
                                Ok::<(), std::io::Error>(())
                            };
                            let ok = matches!(
                                tokio::time::timeout(PROBE_TIMEOUT, attempt).await,
                                Ok(Ok(()))
                            );
                            let _ = tx.send((sent, ok));
                        });
                    }
                    // Let the probes in flight finish.
                    tokio::time::sleep(PROBE_TIMEOUT * 2).await;
                });
            })?;
        ready_rx
            .recv_timeout(Duration::from_secs(5))
            .context("prober did not start")?
            .map_err(|e| anyhow!(e))?;
        Ok(Prober {
            stop,
            rx,
            seen: Vec::new(),
            spacing: Vec::new(),
            handle: Some(handle),
        })
    }

    fn drain(&mut self, wait: Duration) {
        if let Ok(r) = self.rx.recv_timeout(wait) {
            self.seen.push(r);
        }
        while let Ok(r) = self.rx.try_recv() {
            self.seen.push(r);
        }
    }

    /// Probes sent in [from, now - timeout - margin]: all of them have reported.
    fn resolved(&self, from: Instant) -> (Vec<(Instant, bool)>, Instant) {
        let horizon = Instant::now() - PROBE_TIMEOUT - Duration::from_millis(5);
        let mut v: Vec<(Instant, bool)> = self
            .seen
            .iter()
            .copied()
            .filter(|(s, _)| *s >= from && *s <= horizon)
            .collect();
        v.sort_by_key(|(s, _)| *s);
        (v, horizon)
    }

    /// Waits until the last `n` probes all saw `allowed`, then forgets what was seen.
    fn steady(&mut self, allowed: bool, n: usize, timeout: Duration) -> Result<()> {
        self.seen.clear();
        let start = Instant::now();
        loop {
            self.drain(PROBE_EVERY);
            let (v, _) = self.resolved(start);
            if v.len() >= n && v[v.len() - n..].iter().all(|(_, ok)| *ok == allowed) {
                self.seen.clear();
                return Ok(());
            }
            if start.elapsed() > timeout {
                let oks = v.iter().filter(|(_, ok)| *ok).count();
                bail!(
                    "the client's verdict is not steadily {} ({oks} of {} probes connected)",
                    if allowed { "allowed" } else { "denied" },
                    v.len()
                );
            }
        }
    }

    /// The delay from `t0` to the send time of the first probe that saw the new verdict:
    /// for `allowed`, the first that connected; for a deny, the first failure after which
    /// every probe failed for `DENY_HOLD`.
    fn flip(&mut self, t0: Instant, allowed: bool) -> Result<Duration> {
        loop {
            self.drain(PROBE_EVERY);
            let (v, horizon) = self.resolved(t0);
            let mut gaps: Vec<f64> = v.windows(2).map(|w| ms(w[1].0 - w[0].0)).collect();
            gaps.sort_by(f64::total_cmp);
            if allowed {
                if let Some((s, _)) = v.iter().find(|(_, ok)| *ok) {
                    let d = *s - t0;
                    if !gaps.is_empty() {
                        self.spacing.push(percentile(&gaps, 50.0));
                    }
                    self.seen.clear();
                    return Ok(d);
                }
            } else {
                let first_fail = match v.iter().rposition(|(_, ok)| *ok) {
                    Some(i) => v.get(i + 1),
                    None => v.first(),
                };
                if let Some((s, _)) = first_fail {
                    if horizon.saturating_duration_since(*s) >= DENY_HOLD {
                        let d = *s - t0;
                        if !gaps.is_empty() {
                            self.spacing.push(percentile(&gaps, 50.0));
                        }
                        self.seen.clear();
                        return Ok(d);
                    }
                }
            }
            if t0.elapsed() > FLIP_TIMEOUT {
                bail!(
                    "the client's verdict did not become {} within {FLIP_TIMEOUT:?}",
                    if allowed { "allowed" } else { "denied" }
                );
            }
        }
    }
}

impl Drop for Prober {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

/// Accepts (and drops) connections on `addr` inside `ns` until dropped.
struct Acceptor {
    stop: Arc<AtomicBool>,
    handle: Option<JoinHandle<()>>,
}

impl Acceptor {
    fn start(ns: &str, addr: SocketAddr) -> Result<Acceptor> {
        let path = Path::new("/run/netns").join(ns);
        let file = File::open(&path).with_context(|| format!("open {}", path.display()))?;
        let stop = Arc::new(AtomicBool::new(false));
        let s2 = stop.clone();
        let (ready_tx, ready_rx) = mpsc::channel::<Result<(), String>>();
        let handle = std::thread::spawn(move || {
            let l = (|| -> std::io::Result<TcpListener> {
                setns(&file, CloneFlags::CLONE_NEWNET).map_err(std::io::Error::from)?;
                let l = TcpListener::bind(addr)?;
                l.set_nonblocking(true)?;
                Ok(l)
            })();
            let l = match l {
                Ok(l) => {
                    let _ = ready_tx.send(Ok(()));
                    l
                }
                Err(e) => {
                    let _ = ready_tx.send(Err(e.to_string()));
                    return;
                }
            };
            while !s2.load(Ordering::Relaxed) {
                match l.accept() {
                    Ok((s, _)) => drop(s),
                    Err(_) => std::thread::sleep(Duration::from_millis(1)),
                }
            }
        });
        ready_rx
            .recv_timeout(Duration::from_secs(5))
            .context("acceptor did not start")?
            .map_err(|e| anyhow!(e))?;
        Ok(Acceptor {
            stop,
            handle: Some(handle),
        })
    }
}

impl Drop for Acceptor {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

/// `nft -f -` run from a thread inside `ns`; returns the instant just before the exec.
fn nft_in(ns: &str, script: String) -> Result<Instant> {
    netns::in_netns(ns, move || -> Result<Instant> {
        let t0 = Instant::now();
        let mut child = Command::new("nft")
            .args(["-f", "-"])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()?;
        child
            .stdin
            .take()
            .expect("piped")
            .write_all(script.as_bytes())?;
        let out = child.wait_with_output()?;
        if !out.status.success() {
            bail!("nft: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(t0)
    })?
}

// ---------------------------------------------------------------------------------------------
// 1 and 2: write → enforcement

#[derive(Default)]
struct FlipSamples {
    allow: Vec<f64>,
    deny: Vec<f64>,
    ref_allow: Vec<f64>,
    ref_deny: Vec<f64>,
    ack: Vec<f64>,
    steps: StepSamples,
    /// The slowest flip through twill: (write → enforced, put ack, node 1's sync), all ms: a
    /// tail is pinned on etcd, on twilld's sync, or on neither (the wait between, the probes).
    slowest: Option<(f64, f64, Option<f64>)>,
}

impl FlipSamples {
    fn both(&self) -> Vec<f64> {
        self.allow.iter().chain(&self.deny).copied().collect()
    }
    fn ref_both(&self) -> Vec<f64> {
        self.ref_allow
            .iter()
            .chain(&self.ref_deny)
            .copied()
            .collect()
    }
}

struct Floor<'a> {
    ns: &'a str,
    client: Ipv4Addr,
    server: Ipv4Addr,
}

impl Floor<'_> {
    fn setup(&self) -> Result<()> {
        nft_in(
            self.ns,
            "add table inet twlbench\nadd chain inet twlbench bench { type filter hook forward \
             priority -10; policy accept; }\n"
                .into(),
        )
        .map(drop)
    }

    fn flip(&self, allow: bool) -> Result<Instant> {
        let script = if allow {
            "flush chain inet twlbench bench\n".to_string()
        } else {
            format!(
                "add rule inet twlbench bench ip saddr {} ip daddr {} tcp dport {PROBE_PORT} drop\n",
                self.client, self.server
            )
        };
        nft_in(self.ns, script)
    }

    fn remove(&self) {
        let _ = nft_in(self.ns, "delete table inet twlbench\n".into());
    }
}

/// `reps` rounds of: twill → allow, nft → deny, nft → allow, twill → deny (the reference runs
/// while twill allows). Starts and ends with twill denying.
fn flip_loop(
    lab: &Lab,
    prober: &mut Prober,
    floor: &Floor,
    reps: usize,
    // One verdict flip made through etcd: (the instant just before the put, its ack time).
    twill: &mut dyn FnMut(bool) -> Result<(Instant, Duration)>,
) -> Result<FlipSamples> {
    let mut s = FlipSamples::default();
    prober.steady(false, 10, Duration::from_secs(10))?;
    for r in 0..reps {
        for allow in [true, false] {
            prober.steady(!allow, 5, Duration::from_secs(5))?;
            let before = sync_counters(lab, 1);
            let (t0, ack) = twill(allow)?;
            let d = ms(prober.flip(t0, allow)?);
            if allow { &mut s.allow } else { &mut s.deny }.push(d);
            s.ack.push(ms(ack));
            let st = sync_after(lab, 1, before);
            let sync = st.as_ref().map(|st| st.total);
            if s.slowest.is_none_or(|(w, ..)| d > w) {
                s.slowest = Some((d, ms(ack), sync));
            }
            if let Some(st) = st {
                s.steps.push(st);
            }
            if allow {
                for a in [false, true] {
                    prober.steady(!a, 5, Duration::from_secs(5))?;
                    let t0 = floor.flip(a)?;
                    let d = ms(prober.flip(t0, a)?);
                    if a { &mut s.ref_allow } else { &mut s.ref_deny }.push(d);
                }
            }
            // Off the beat of anything periodic.
            std::thread::sleep(Duration::from_millis(20 + (r as u64 * 7) % 30));
        }
    }
    Ok(s)
}

fn target_met(v: &[f64]) -> Option<bool> {
    Stats::of(v).map(|s| s.p99 < TARGET_MS)
}

fn push_flip_rows(res: &mut ScenarioResult, what: &str, s: &FlipSamples, path: &str) {
    let both = s.both();
    res.metrics.push(
        Metric::new(&format!("{what}: write → enforced"), "ms", &both)
            .vs("the same flip by one nft run in node 1", &s.ref_both())
            .target("p99 < 100 ms", target_met(&both))
            .note(format!(
                "both directions; etcd acknowledged the put after median {:.2} ms (p99 {:.2}, \
                 max {:.2}); the slowest flip: {}",
                Stats::of(&s.ack).map_or(f64::NAN, |x| x.median),
                Stats::of(&s.ack).map_or(f64::NAN, |x| x.p99),
                Stats::of(&s.ack).map_or(f64::NAN, |x| x.max),
                match s.slowest {
                    Some((d, ack, sync)) => format!(
                        "{d:.1} ms, its put acknowledged after {ack:.1} ms, node 1's sync {}",
                        sync.map_or("not seen".into(), |t| format!("{t:.1} ms"))
                    ),
                    None => "none".into(),
                }
            )),
    );
    res.metrics.push(
        Metric::new(&format!("{what}: deny → allow"), "ms", &s.allow)
            .vs("nft run, drop rule removed", &s.ref_allow),
    );
    res.metrics.push(
        Metric::new(&format!("{what}: allow → deny"), "ms", &s.deny)
            .vs("nft run, drop rule added", &s.ref_deny)
            .note(format!(
                "a deny is seen when probes start failing: its first failure, confirmed by \
                 {} ms of failures",
                DENY_HOLD.as_millis()
            )),
    );
    res.metrics.push(
        Metric::new(
            &format!("{what}: twilld sync on node 1"),
            "ms",
            &s.steps.total,
        )
        .note(format!(
            "twilld's own account (/status last_sync): {} ({path})",
            s.steps.describe()
        )),
    );
}

// ---------------------------------------------------------------------------------------------
// 3: CNI ADD with policy on and off

struct Kind {
    name: &'static str,
    namespace: String,
    labels: BTreeMap<String, String>,
    ports: Vec<Value>,
}

fn cni_plugin(ctx: &Ctx, lab: &Lab, node: usize, k: &Kind) -> Plugin {
    let bin = ctx.cni_plugin();
    Plugin {
        name: "twill",
        cni_path: bin
            .parent()
            .map(|d| d.display().to_string())
            .unwrap_or_default(),
        bin,
        config: pod_cfg(lab, node, &k.labels, k.ports.clone()).to_string(),
    }
}

/// One ADD + DEL on `node` into a fresh netns: (ADD ms, DEL ms). `between` runs after the
/// ADD, off the clock.
fn add_del(
    lab: &Lab,
    node: usize,
    p: &Plugin,
    ns: &str,
    name: &str,
    between: &mut dyn FnMut(),
) -> Result<(f64, f64)> {
    let (pod_ns, path) = cni::new_pod_ns(lab.prefix())?;
    let id = format!("bench{pod_ns}");
    let args = format!("IgnoreUnknown=1;K8S_POD_NAMESPACE={ns};K8S_POD_NAME={name}");
    let mut out = Vec::new();
    for verb in ["ADD", "DEL"] {
        let (p1, id1, path1, a1) = (p.clone(), id.clone(), path.clone(), args.clone());
        let (d, r) = netns::in_netns(&lab.node_ns(node), move || {
            cni::call_with_args(&p1, verb, &id1, &path1, Some(&a1))
        })?;
        r.map_err(|e| anyhow!("{verb} on node {node}: {e}"))?;
        out.push(ms(d));
        if verb == "ADD" {
            between();
        }
    }
    netns::kill_all_and_delete(&pod_ns)?;
    Ok((out[0], out[1]))
}

// ---------------------------------------------------------------------------------------------
// 5: counting the kernel's table

#[derive(Clone, Copy, Debug, Default)]
struct NftCounts {
    rules: usize,
    elements: usize,
    sets: usize,
    chains: usize,
}

fn nft_counts(ns: &str) -> Result<NftCounts> {
    let args = ["nft", "-j", "list", "table", "inet", "twill-policy"];
    let out = netns::check(&args, netns::exec_cmd(ns, &args).output()?)?;
    let v: Value = serde_json::from_str(&out).context("nft -j output")?;
    let mut c = NftCounts::default();
    for item in v["nftables"].as_array().into_iter().flatten() {
        if item.get("rule").is_some() {
            c.rules += 1;
        } else if item.get("chain").is_some() {
            c.chains += 1;
        } else if let Some(s) = item.get("set").or_else(|| item.get("map")) {
            c.sets += 1;
            c.elements += s["elem"].as_array().map_or(0, Vec::len);
        }
    }
    Ok(c)
}

fn model_cluster(real: &[RealPod], sim: usize, policies: usize) -> Result<netpol::model::Cluster> {
    let mut c = netpol::model::Cluster::new();
    for (_, ns) in polgen::namespaces() {
        c.upsert_namespace(&serde_json::from_value(ns)?)
            .map_err(|e| anyhow!("{e:?}"))?;
    }
    for i in 0..sim {
        c.upsert_pod(&serde_json::from_value(polgen::sim_pod(i).2)?)
            .map_err(|e| anyhow!("{e:?}"))?;
    }
    for p in real {
        c.upsert_pod(&serde_json::from_value(p.api())?)
            .map_err(|e| anyhow!("{e:?}"))?;
    }
    for g in 0..policies {
        c.upsert_policy(serde_json::from_value(polgen::policy(g).2)?)
            .map_err(|e| anyhow!("{e:?}"))?;
    }
    Ok(c)
}

fn k(n: usize) -> String {
    if n >= 1000 && n.is_multiple_of(1000) {
        format!("{}k", n / 1000)
    } else {
        n.to_string()
    }
}

// ---------------------------------------------------------------------------------------------

pub fn run(ctx: &Ctx, res: &mut ScenarioResult) -> Result<()> {
    let cfg = Config::new(ctx.quick);
    res.config = json!({
        "pods": cfg.pods, "policies": cfg.policies, "resident_pods_node1": cfg.resident,
        "flip_rounds": cfg.reps, "cni_pairs_per_kind": cfg.cni_pairs,
        "iperf_seconds": cfg.iperf_secs, "runs": cfg.runs,
        "connection_rate_seconds": cfg.rate_secs,
        "scale_pods": cfg.scale_pods, "scale_policies": cfg.scale_policies,
        "probe_every_ms": ms(PROBE_EVERY), "probe_timeout_ms": ms(PROBE_TIMEOUT),
    });
    let mut lab = ctx.lab(3)?;
    common::start_daemon(&mut lab, 1, &[])?;
    common::start_daemon(&mut lab, 2, &[])?;
    common::start_daemon(&mut lab, 3, &["--network-policy=false"])?;
    for i in 1..=3 {
        lab.wait_ready(i, common::READY_TIMEOUT)?;
    }
    let writer = Writer::connect(&lab)?;
    writer.put_kvs(polgen::namespace_kvs())?;

    // Real pods: residents on node 1 (one per team namespace, the apps in turn), the server on
    // node 1 and the client on node 2.
    let mut real = Vec::new();
    for j in 0..cfg.resident {
        let ns = polgen::team(j);
        let app = polgen::APPS[j % polgen::APPS.len()];
        let l = polgen::app_labels(&ns, app, 0);
        real.push(add_real(
            &mut lab,
            1,
            &ns,
            &format!("{app}-res{j}"),
            l,
            polgen::container_ports(app),
        )?);
    }
    let server = add_real(
        &mut lab,
        1,
        "bench",
        "server",
        labels(&[("app", "bench-server"), ("open", "no")]),
        server_ports(),
    )?;
    let client = add_real(
        &mut lab,
        2,
        "bench",
        "client",
        labels(&[("app", "bench-client"), ("access", "none")]),
        vec![],
    )?;
    let (server_ip, client_ip) = (server.pod.ip, client.pod.ip);
    let (server_ns, client_ns) = (server.pod.ns.clone(), client.pod.ns.clone());
    real.push(server);
    real.push(client);
    // Node 3, the CNI reference, gets as many pods as node 1 holds (the same veths on its
    // bridge, the same kernel tables to search), so that only policy differs between the two.
    for j in 0..=cfg.resident {
        let ns = polgen::team(j);
        let tag = format!("twin{j}");
        let args = format!("IgnoreUnknown=1;K8S_POD_NAMESPACE={ns};K8S_POD_NAME={tag}");
        let cfg3 = pod_cfg(&lab, 3, &labels(&[("app", "twin")]), vec![]);
        lab.add_pod_with(3, &tag, &args, &cfg3)
            .with_context(|| format!("twin pod {j} on node 3"))?;
    }
    let sim = cfg.pods - real.len();
    writer.put_kvs((0..sim).map(polgen::sim_pod_kv).collect())?;
    writer.put_kvs(all_policies(cfg.policies, false))?;
    for i in [1, 2] {
        settle(&lab, i, cfg.quiet, Duration::from_secs(120))?;
    }
    let node1 = lab.node_ns(1);
    let _acceptor = Acceptor::start(&server_ns, SocketAddr::from((server_ip, PROBE_PORT)))?;
    let mut prober = Prober::start(&client_ns, SocketAddr::from((server_ip, PROBE_PORT)))?;
    let floor = Floor {
        ns: &node1,
        client: client_ip,
        server: server_ip,
    };
    floor.setup()?;

    // etcd's own floor: put → watch event, same machine.
    let mut watch_ev = Vec::new();
    let mut watch_ack = Vec::new();
    for n in 0..cfg.reps.max(5) {
        let (ack, ev) =
            writer.put_watch_latency("/twill-bench/watch-floor", &format!("{{\"n\":{n}}}"))?;
        watch_ack.push(ms(ack));
        watch_ev.push(ms(ev));
    }

    // 1. Policy edits.
    let policy_flips = flip_loop(&lab, &mut prober, &floor, cfg.reps, &mut |allow| {
        let (k, v) = flip_policy(allow);
        writer.put_timed(&k, &v)
    })?;
    push_flip_rows(
        res,
        "policy edit",
        &policy_flips,
        "a new peer set and the chain's rules",
    );
    res.metrics.push(
        Metric::new("etcd put → watch event", "ms", &watch_ev).note(format!(
            "etcd's own floor under any watcher (the bench's client, a watch opened before the \
             put); put acknowledged after median {:.2} ms",
            Stats::of(&watch_ack).map_or(f64::NAN, |x| x.median)
        )),
    );

    // 2a. The client's labels (a peer of b-by-label).
    let record = |key: &str| -> Result<Value> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(v) = writer.get(key)? {
                return Ok(serde_json::from_str(&v)?);
            }
            if Instant::now() > deadline {
                bail!("no record {key} in etcd");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    let client_key = format!("{PREFIX}/pods/bench/client");
    let mut rec = record(&client_key)?;
    let client_rec: Vec<String> = ["none", "granted"]
        .iter()
        .map(|a| {
            rec["metadata"]["labels"]["access"] = json!(a);
            rec.to_string()
        })
        .collect();
    let peer_flips = flip_loop(&lab, &mut prober, &floor, cfg.reps, &mut |allow| {
        writer.put_timed(&client_key, &client_rec[usize::from(allow)])
    })?;
    push_flip_rows(
        res,
        "peer label edit",
        &peer_flips,
        "the client's address in or out of one peer set",
    );

    // 2b. The server's labels (selected by b-open or not).
    let server_key = format!("{PREFIX}/pods/bench/server");
    let mut rec = record(&server_key)?;
    let server_rec: Vec<String> = ["no", "yes"]
        .iter()
        .map(|o| {
            rec["metadata"]["labels"]["open"] = json!(o);
            rec.to_string()
        })
        .collect();
    let target_flips = flip_loop(&lab, &mut prober, &floor, cfg.reps, &mut |allow| {
        writer.put_timed(&server_key, &server_rec[usize::from(allow)])
    })?;
    push_flip_rows(
        res,
        "target label edit",
        &target_flips,
        "the server's combination of policies changes: its group chain",
    );
    floor.remove();
    let spacing = Stats::of(&prober.spacing).map_or(f64::NAN, |s| s.median);
    drop(prober);

    // 3. CNI ADD, policy on (node 1) and off (node 3), alternated call by call.
    let team0 = polgen::team(0);
    let kinds = [
        Kind {
            name: "unselected pod",
            namespace: "bench".into(),
            labels: labels(&[("app", "scratch")]),
            ports: vec![],
        },
        Kind {
            name: "replica of a pod here",
            namespace: team0.clone(),
            labels: polgen::app_labels(&team0, "frontend", 0),
            ports: polgen::container_ports("frontend"),
        },
        Kind {
            name: "first of its kind here",
            namespace: team0.clone(),
            labels: polgen::app_labels(&team0, "worker", 0),
            ports: polgen::container_ports("worker"),
        },
    ];
    for kind in &kinds {
        let on = cni_plugin(ctx, &lab, 1, kind);
        let off = cni_plugin(ctx, &lab, 3, kind);
        // Warm-up, not recorded.
        add_del(&lab, 1, &on, &kind.namespace, "warm-on", &mut || {})?;
        add_del(&lab, 3, &off, &kind.namespace, "warm-off", &mut || {})?;
        let before = sync_counters(&lab, 1);
        let (mut a_on, mut a_off, mut d_on, mut d_off) = (vec![], vec![], vec![], vec![]);
        let mut steps = StepSamples::default();
        let mut ups = PodUpSamples::default();
        for n in 0..cfg.cni_pairs {
            let mut one = |node: usize| -> Result<()> {
                let (p, a, d) = if node == 1 {
                    (&on, &mut a_on, &mut d_on)
                } else {
                    (&off, &mut a_off, &mut d_off)
                };
                let mut between = || {
                    if node == 1 {
                        if let Some(st) = last_steps(&lab, 1) {
                            steps.push(st);
                        }
                        if let Some((r, p, t, path)) = last_pod_up(&lab, 1) {
                            ups.record.push(r);
                            ups.program.push(p);
                            ups.total.push(t);
                            *ups.paths.entry(path).or_default() += 1;
                        }
                    }
                };
                let (add, del) = add_del(
                    &lab,
                    node,
                    p,
                    &kind.namespace,
                    &format!("cni-{n}"),
                    &mut between,
                )?;
                a.push(add);
                d.push(del);
                Ok(())
            };
            // Node 1's work after its pair (the DEL's sync, a first-of-its-kind pod's chains)
            // is done before node 3's pair starts, off the clock: each ADD meets a quiet machine.
            let quiet = Duration::from_millis(50);
            if n % 2 == 0 {
                one(1)?;
                settle(&lab, 1, quiet, Duration::from_secs(10))?;
                one(3)?;
            } else {
                one(3)?;
                one(1)?;
                settle(&lab, 1, quiet, Duration::from_secs(10))?;
            }
        }
        let after = sync_counters(&lab, 1);
        let (on_s, off_s) = (Stats::of(&a_on), Stats::of(&a_off));
        // The target's reading: each ADD against the reference ADD next to it (the machine's
        // drift, which moves both, cancels); the difference of the two medians is shown too.
        let pairs: Vec<f64> = a_on.iter().zip(&a_off).map(|(a, b)| a - b).collect();
        let added = Stats::of(&pairs).map(|s| s.median);
        let medians_apart = on_s
            .as_ref()
            .zip(off_s.as_ref())
            .map(|(a, b)| a.median - b.median);
        res.metrics.push(
            Metric::new(&format!("CNI ADD, {}", kind.name), "ms", &a_on)
                .vs("same ADD, --network-policy=false (node 3)", &a_off)
                .target(
                    "< 1 ms added at the median (of pairs)",
                    added.map(|d| d < 1.0),
                )
                .note(format!(
                    "added at the median of the {} pairs: {:.2} ms (the medians {:.2} ms \
                     apart); p99 {:.2} vs {:.2} ms; DEL median {:.2} vs \
                     {:.2} ms; {}; node 1 synced {} times for {} ADD+DEL, {} through netlink \
                     only; the last sync before each DEL: median {:.2} ms, {}",
                    pairs.len(),
                    added.unwrap_or(f64::NAN),
                    medians_apart.unwrap_or(f64::NAN),
                    on_s.as_ref().map_or(f64::NAN, |s| s.p99),
                    off_s.as_ref().map_or(f64::NAN, |s| s.p99),
                    Stats::of(&d_on).map_or(f64::NAN, |s| s.median),
                    Stats::of(&d_off).map_or(f64::NAN, |s| s.median),
                    ups.describe(),
                    after.0 - before.0,
                    cfg.cni_pairs,
                    after.1 - before.1,
                    Stats::of(&steps.total).map_or(f64::NAN, |s| s.median),
                    steps.describe(),
                )),
        );
    }

    // 4. Throughput and connection rate, 100 policies against none.
    writer.put_kvs(vec![flip_policy(true)])?;
    let mut servers = Servers(vec![backends::iperf_server(
        &server_ns,
        &server_ip.to_string(),
        IPERF_PORT,
    )?]);
    let sip = server_ip.to_string();
    wait_until(Duration::from_secs(30), || {
        backends::iperf(&client_ns, &sip, IPERF_PORT, 1, 1).is_ok()
    })
    .context("iperf3 through the policies did not connect")?;
    let policies_now = all_policies(cfg.policies, true);
    let set_policies = |on: bool| -> Result<()> {
        if on {
            writer.put_kvs(policies_now.clone())?;
        } else {
            writer.delete_prefix(&format!("{PREFIX}/policies/"))?;
        }
        for i in [1, 2] {
            settle(&lab, i, cfg.quiet, Duration::from_secs(60))?;
        }
        Ok(())
    };
    let (mut g_on, mut g_off, mut c_on, mut c_off) = (vec![], vec![], vec![], vec![]);
    for r in 0..cfg.runs {
        let order = if r % 2 == 0 {
            [true, false]
        } else {
            [false, true]
        };
        for on in order {
            set_policies(on)?;
            let g = backends::iperf(&client_ns, &sip, IPERF_PORT, cfg.iperf_secs, 1)?;
            let c =
                backends::conn_rate(&client_ns, &server_ns, server_ip, CONN_PORT, cfg.rate_secs)?;
            if on {
                g_on.push(g);
                c_on.push(c);
            } else {
                g_off.push(g);
                c_off.push(c);
            }
        }
    }
    servers.0.clear();
    drop(servers);
    let within = |m: &Metric| m.ratio.map(|r| r >= 0.95);
    let m = Metric::new(
        &format!("TCP 1 stream, {} policies in force", cfg.policies),
        "Gbit/s",
        &g_on,
    )
    .vs_paired("no policies", &g_on, &g_off);
    let met = within(&m);
    res.metrics.push(
        m.target("within 5 %", met)
            .note("client on node 2 → server on node 1"),
    );
    let m = Metric::new(
        &format!("TCP connections, {} policies in force", cfg.policies),
        "conn/s",
        &c_on,
    )
    .vs_paired("no policies", &c_on, &c_off);
    let met = within(&m);
    res.metrics.push(m.target("within 5 %", met).note(
        "connect, 1 byte each way, close with RST; every connection's first packet passes the \
         client's egress chains on node 2 and the server's ingress chains on node 1",
    ));

    // 5. Scale.
    writer.delete_prefix(&format!("{PREFIX}/policies/"))?;
    let real_count = real.len();
    let mut sim_now = sim;
    let mut pol_now = 0usize;
    let mut points: Vec<(usize, usize)> = Vec::new();
    for (n, p) in cfg.scale_pods.iter().enumerate() {
        let mut ps = cfg.scale_policies.clone();
        if n % 2 == 1 {
            ps.reverse();
        }
        points.extend(ps.into_iter().map(|g| (*p, g)));
    }
    let mut growth: Vec<(usize, usize, NftCounts, polgen::KubeRouter)> = Vec::new();
    for (pods, pols) in points {
        let t_load = Instant::now();
        let want_sim = pods.saturating_sub(real_count);
        if want_sim > sim_now {
            writer.put_kvs((sim_now..want_sim).map(polgen::sim_pod_kv).collect())?;
        } else if want_sim < sim_now {
            writer.delete_keys((want_sim..sim_now).map(polgen::sim_pod_key).collect())?;
        }
        sim_now = want_sim;
        if pols > pol_now {
            writer.put_kvs((pol_now..pols).map(polgen::policy_kv).collect())?;
        } else if pols < pol_now {
            writer.delete_keys((pols..pol_now).map(|g| polgen::policy_kv(g).0).collect())?;
        }
        pol_now = pols;
        settle(&lab, 1, cfg.quiet, Duration::from_secs(600))?;
        let load_s = t_load.elapsed().as_secs_f64() - cfg.quiet.as_secs_f64();
        let live = nft_counts(&node1)?;
        let pid = lab.daemon_pid(1).ok_or_else(|| anyhow!("twilld gone"))?;
        let (rss_live, hwm_live) = common::rss_mib(pid)?;
        // One edit of an active policy (team-00's default deny gains or loses a rule: nft -f),
        // and one remote pod's label edit (set elements only: netlink), timed by twilld.
        let (pk, _) = polgen::policy_kv(0);
        let (_, _, mut base) = polgen::policy(0);
        let mut edit_ms = Vec::new();
        let mut edit_steps = StepSamples::default();
        let mut label_ms = Vec::new();
        // Simulated pod 1 is a frontend in a staging namespace: a peer of team-00's
        // frontend-from-staging-frontends, which node 1 enforces for its team-00 frontend.
        let (sk, sv) = polgen::sim_pod_kv(1);
        let mut sim0: Value = serde_json::from_str(&sv)?;
        for e in 0..3u16 {
            base["spec"]["ingress"] = if e % 2 == 0 {
                json!([{"from": [{"podSelector": sel("app", "frontend")}],
                        "ports": tcp_ports(&[1000 + e])}])
            } else {
                Value::Null
            };
            let before = sync_counters(&lab, 1);
            writer.put_timed(&pk, &base.to_string())?;
            if let Some(st) = sync_after(&lab, 1, before) {
                edit_ms.push(st.total);
                edit_steps.push(st);
            }
            sim0["metadata"]["labels"]["app"] =
                json!(if e % 2 == 0 { "backend" } else { "frontend" });
            let before = sync_counters(&lab, 1);
            writer.put_timed(&sk, &sim0.to_string())?;
            if let Some(st) = sync_after(&lab, 1, before) {
                label_ms.push(st.total);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        // Back to the generated objects.
        writer.put_kvs(vec![polgen::policy_kv(0), polgen::sim_pod_kv(1)])?;
        settle(&lab, 1, cfg.quiet, Duration::from_secs(600))?;
        // A fresh twilld with this state: memory not shaped by the history, and the time to
        // program the whole table (its cache removed, so the first sync is from etcd's lists).
        lab.stop_daemon(1)?;
        let _ = std::fs::remove_file(lab.state_dir(1).join("policy-cache.json"));
        common::start_daemon(&mut lab, 1, &[])?;
        lab.wait_ready(1, common::READY_TIMEOUT)?;
        settle(&lab, 1, cfg.quiet, Duration::from_secs(600))?;
        let fresh = nft_counts(&node1)?;
        let pid = lab.daemon_pid(1).ok_or_else(|| anyhow!("twilld gone"))?;
        let (rss, hwm) = common::rss_mib(pid)?;
        let st = lab.status(1)?;
        let full_ms = st["policy"]["last_sync_ms"].as_f64().unwrap_or(f64::NAN);
        let full_steps = last_steps(&lab, 1);
        let model = model_cluster(&real, sim_now, pols)?;
        let kr = polgen::kube_router(&model, "n1");
        let tag = format!("{} pods × {} policies", k(pods), k(pols));
        res.metrics.push(
            Metric::new(&format!("nft rules, {tag}"), "rules", &[fresh.rules as f64])
                .vs_value("kube-router iptables rules (computed)", kr.rules as f64)
                .note(format!(
                    "twill: {} chains, {} sets/maps; kube-router: {} chains, {} ipsets; live \
                     before the restart: {} rules",
                    fresh.chains, fresh.sets, kr.chains, kr.ipsets, live.rules
                )),
        );
        res.metrics.push(
            Metric::new(
                &format!("set elements, {tag}"),
                "elements",
                &[fresh.elements as f64],
            )
            .vs_value("kube-router ipset members (computed)", kr.members as f64)
            .note(format!("live before the restart: {}", live.elements)),
        );
        res.metrics.push(
            Metric::new(&format!("twilld RSS, {tag}"), "MiB", &[rss]).note(format!(
                "fresh twilld with this state (VmHWM {hwm:.1}); the one that grew into it: \
                 {rss_live:.1} (VmHWM {hwm_live:.1}); the load was applied ≈{load_s:.1} s \
                 after its writes began"
            )),
        );
        res.metrics.push(
            Metric::new(&format!("whole table programmed, {tag}"), "ms", &[full_ms]).note(format!(
                "twilld's first sync after a start: compile {:.1}, render {:.1}, nft -f of \
                     the whole table {:.1} ms",
                full_steps.map_or(f64::NAN, |s| s.compile),
                full_steps.map_or(f64::NAN, |s| s.render),
                full_steps.map_or(f64::NAN, |s| s.apply),
            )),
        );
        res.metrics.push(
            Metric::new(&format!("one policy edit, {tag}"), "ms", &edit_ms).note(format!(
                "twilld's sync for an edit of an active policy: {}; one remote pod's label \
                 edit (netlink elements): median {:.2} ms",
                edit_steps.describe(),
                Stats::of(&label_ms).map_or(f64::NAN, |s| s.median)
            )),
        );
        growth.push((pods, pols, fresh, kr));
    }
    res.notes.push(growth_note(&growth));
    res.notes.push(format!(
        "lab: 3 nodes; node 1 holds {} resident pods (one per team namespace) and the server, \
         node 2 the client, node 3 runs twilld with --network-policy=false for the CNI \
         reference and holds as many pods as node 1; the rest of the cluster are Pod records on simulated nodes; probes every \
         {} ms from the client ({} ms timeout): a flip's time is the send time of the first \
         probe that saw it, so it is late by up to one probe interval (resolution: the \
         probes' median spacing, {spacing:.2} ms in this run); throughput and connection \
         rate with policies against none run in pairs back to back (alternating which goes \
         first), their ratio the median of the pairs' ratios",
        cfg.resident,
        ms(PROBE_EVERY),
        ms(PROBE_TIMEOUT),
    ));
    res.notes.push(
        "kube-router numbers are computed from its iptables layout for the same objects on \
         node 1 (a chain per policy of the cluster with a target ipset per direction, per rule \
         a peer ipset and a MARK + RETURN pair per port, a firewall chain per local pod a \
         policy selects with a jump per policy and 8 more rules), not measured; IPv4 only, \
         while twill's table holds both families' rules"
            .into(),
    );
    Ok(())
}

/// Growth per step of the grid: elements as pods grow ×5 at each policy count, and rules and
/// elements as policies grow at each pod count.
fn growth_note(g: &[(usize, usize, NftCounts, polgen::KubeRouter)]) -> String {
    let find = |p: usize, q: usize| g.iter().find(|x| x.0 == p && x.1 == q);
    let mut pods: Vec<usize> = g.iter().map(|x| x.0).collect();
    pods.sort_unstable();
    pods.dedup();
    let mut pols: Vec<usize> = g.iter().map(|x| x.1).collect();
    pols.sort_unstable();
    pols.dedup();
    let mut parts = Vec::new();
    for w in pods.windows(2) {
        for &q in &pols {
            if let (Some(a), Some(b)) = (find(w[0], q), find(w[1], q)) {
                parts.push(format!(
                    "pods {}→{} at {} policies: elements ×{:.2} (kube-router members ×{:.2}), \
                     rules ×{:.2}",
                    k(w[0]),
                    k(w[1]),
                    k(q),
                    b.2.elements as f64 / a.2.elements.max(1) as f64,
                    b.3.members as f64 / a.3.members.max(1) as f64,
                    b.2.rules as f64 / a.2.rules.max(1) as f64,
                ));
            }
        }
    }
    for &p in &pods {
        for w in pols.windows(2) {
            if let (Some(a), Some(b)) = (find(p, w[0]), find(p, w[1])) {
                parts.push(format!(
                    "policies {}→{} at {} pods: rules ×{:.2} (kube-router ×{:.2}), elements \
                     ×{:.2} (kube-router ×{:.2})",
                    k(w[0]),
                    k(w[1]),
                    k(p),
                    b.2.rules as f64 / a.2.rules.max(1) as f64,
                    b.3.rules as f64 / a.3.rules.max(1) as f64,
                    b.2.elements as f64 / a.2.elements.max(1) as f64,
                    b.3.members as f64 / a.3.members.max(1) as f64,
                ));
            }
        }
    }
    format!("growth: {}", parts.join("; "))
}
