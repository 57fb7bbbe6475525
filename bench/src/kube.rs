//! Kubernetes mode at scale, against etcd mode with the same peers in the same run: N simulated
//! nodes as Node objects on twill's fake API server (annotated as flanneld annotates them) and
//! the same N as leases in etcd. Cold start to all 3N kernel entries, join convergence, memory,
//! and what kubelet heartbeats of N nodes (a status write per node every 10 s) cost twilld.
//! No real API server can run here: the fake serves real HTTP watches, and twilld's real kube
//! client reads them.

use std::time::{Duration, Instant};

use anyhow::{anyhow, Result};
use serde_json::{json, Value};
use twill_tests::fakeapi::{FakeApi, FakeApiOptions, Kind};
use twill_tests::Lab;

use crate::common::{self, ms, Ctx, DEV};
use crate::etcd::{entry_keys, peers, SimPeer, Writer, CONFIG};
use crate::nl::{self, Listener};
use crate::report::{Metric, ScenarioResult};

const ALL_TIMEOUT: Duration = Duration::from_secs(300);
const STEP_TIMEOUT: Duration = Duration::from_secs(30);
const PREFIX: &str = "flannel.alpha.coreos.com/";
/// Our node's podCIDR: clear of the simulated peers' 10.1.0.0/24 upwards.
const OWN_CIDR: &str = "10.0.5.0/24";
const JOIN_BASE: u32 = 30_000;
/// kubelet's default node status update frequency.
const HEARTBEAT_EVERY: Duration = Duration::from_secs(10);

/// A simulated peer as a Node: podCIDR, flanneld's annotations, and a kubelet-like status
/// (which heartbeats rewrite).
fn node_object(p: &SimPeer) -> Value {
    let cidr = format!("{}/24", p.subnet());
    let now = "2026-01-01T00:00:00Z";
    json!({
        "metadata": {
            "name": format!("sim-{:05}", p.idx),
            "labels": {"kubernetes.io/hostname": format!("sim-{:05}", p.idx), "kubernetes.io/os": "linux"},
            "annotations": {
                format!("{PREFIX}kube-subnet-manager"): "true",
                format!("{PREFIX}backend-type"): "vxlan",
                format!("{PREFIX}backend-data"): format!(r#"{{"VNI":1,"VtepMAC":"{}"}}"#, nl::mac_str(&p.mac())),
                format!("{PREFIX}public-ip"): p.public_ip().to_string(),
            }
        },
        "spec": {"podCIDR": cidr, "podCIDRs": [cidr]},
        "status": {
            "addresses": [{"type": "InternalIP", "address": p.public_ip().to_string()}],
            "conditions": [
                {"type": "Ready", "status": "True", "reason": "KubeletReady", "message": "kubelet is posting ready status",
                 "lastHeartbeatTime": now, "lastTransitionTime": now},
                {"type": "MemoryPressure", "status": "False", "reason": "KubeletHasSufficientMemory",
                 "message": "kubelet has sufficient memory available", "lastHeartbeatTime": now, "lastTransitionTime": now},
                {"type": "DiskPressure", "status": "False", "reason": "KubeletHasNoDiskPressure",
                 "message": "kubelet has no disk pressure", "lastHeartbeatTime": now, "lastTransitionTime": now}
            ],
            "nodeInfo": {"kubeletVersion": "v1.33.0", "containerRuntimeVersion": "containerd://2.0.0",
                         "kernelVersion": "6.12.0", "osImage": "Debian GNU/Linux 12", "architecture": "amd64",
                         "operatingSystem": "linux", "machineID": "m", "systemUUID": "s", "bootID": "b",
                         "kubeProxyVersion": ""}
        }
    })
}

struct Modes {
    kube: Vec<String>,
}

impl Modes {
    fn new(lab: &Lab, api: &FakeApi) -> Result<Modes> {
        let dir = lab.node_dir(1);
        let token = api
            .twill_token()
            .ok_or_else(|| anyhow!("the manifest binds no twill ServiceAccount"))?;
        std::fs::write(dir.join("kubeconfig"), api.kubeconfig(&token))?;
        std::fs::write(dir.join("net-conf.json"), CONFIG)?;
        let p = |f: &str| dir.join(f).display().to_string();
        Ok(Modes {
            kube: vec![
                "--kube-subnet-mgr".into(),
                "--kubeconfig-file".into(),
                p("kubeconfig"),
                "--net-config-path".into(),
                p("net-conf.json"),
            ],
        })
    }

    /// Cold: SIGKILL, the VXLAN device deleted (its entries go with it), then start.
    fn restart(&self, lab: &mut Lab, kube: bool) -> Result<()> {
        if lab.daemon_running(1) {
            lab.kill_daemon(1)?;
            lab.exec_ok(1, &["ip", "link", "del", DEV])?;
        }
        let extra: Vec<&str> = if kube {
            self.kube.iter().map(String::as_str).collect()
        } else {
            Vec::new()
        };
        common::start_daemon(lab, 1, &extra)
    }
}

fn pid(lab: &Lab) -> Result<u32> {
    lab.daemon_pid(1)
        .ok_or_else(|| anyhow!("twilld is not running"))
}

/// The CPU shares of one core of the processes `pids` over `window`, while `during` runs
/// every 100 ms.
fn cpu_shares(pids: &[u32], window: Duration, mut during: impl FnMut(usize)) -> Result<Vec<f64>> {
    let c0 = pids
        .iter()
        .map(|p| common::cpu_seconds(*p))
        .collect::<Result<Vec<_>>>()?;
    let t0 = Instant::now();
    let mut tick = 0;
    while t0.elapsed() < window {
        during(tick);
        tick += 1;
        let next = t0 + Duration::from_millis(100) * tick as u32;
        std::thread::sleep(next.saturating_duration_since(Instant::now()));
    }
    let secs = t0.elapsed().as_secs_f64();
    pids.iter()
        .zip(c0)
        .map(|(p, c0)| Ok(100.0 * (common::cpu_seconds(*p)? - c0) / secs))
        .collect()
}

/// The least a client of the Node watch can cost: curl in twilld's namespace, as the same
/// identity, reading the same stream and writing it nowhere (no decoding, one thread, poll and
/// read). It runs next to twilld in the same windows, so the two readings share the machine's
/// day.
struct BareWatch(std::process::Child);

impl BareWatch {
    fn start(lab: &Lab, api: &FakeApi) -> Result<BareWatch> {
        let token = api
            .twill_token()
            .ok_or_else(|| anyhow!("the manifest binds no twill ServiceAccount"))?;
        let url = format!(
            "{}/api/v1/nodes?watch=true&resourceVersion={}",
            api.url(),
            api.resource_version()
        );
        let auth = format!("Authorization: Bearer {token}");
        let child = lab.spawn(1, &["curl", "-sSfN", "-o", "/dev/null", "-H", &auth, &url])?;
        Ok(BareWatch(child))
    }

    fn pid(&mut self) -> Result<u32> {
        match self.0.try_wait()? {
            None => Ok(self.0.id()),
            Some(status) => Err(anyhow!("curl's watch of the Nodes ended: {status}")),
        }
    }
}

impl Drop for BareWatch {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub fn run(ctx: &Ctx, res: &mut ScenarioResult) -> Result<()> {
    let (sizes, runs, joins, window, windows): (Vec<u32>, usize, u32, Duration, usize) =
        if ctx.quick {
            (vec![50], 1, 5, Duration::from_secs(5), 1)
        } else {
            (vec![1000, 5000], 3, 20, Duration::from_secs(15), 5)
        };
    res.config = json!({"nodes": sizes, "runs": runs, "joins": joins,
                        "heartbeat_window_s": window.as_secs_f64(),
                        "heartbeat_windows": windows,
                        "heartbeat_every_s": HEARTBEAT_EVERY.as_secs_f64()});
    for n in sizes {
        let mut lab = ctx.lab(1)?;
        let writer = Writer::connect(&lab)?;
        let base = peers(0..n);
        writer.put_peers(&base)?;
        let api = FakeApi::start(FakeApiOptions::in_lab(&lab))?;
        api.add_node("n1", &lab.node_ip(1).to_string(), Some(OWN_CIDR))?;
        for p in &base {
            api.create_value(Kind::Node, node_object(p))?;
        }
        let modes = Modes::new(&lab, &api)?;
        let keys = entry_keys(&base);
        let node = lab.node_ns(1);
        let (mut cold_kube, mut cold_etcd, mut rss_kube, mut rss_etcd) =
            (vec![], vec![], vec![], vec![]);
        // Alternating, ending in Kubernetes mode for what follows.
        for r in 0..2 * runs {
            let kube = r % 2 == 1;
            let listener = Listener::start(&node)?;
            let t0 = Instant::now();
            modes.restart(&mut lab, kube)?;
            let t_all = listener.wait_added(&keys, t0, ALL_TIMEOUT)?;
            std::thread::sleep(Duration::from_secs(1));
            let rss = common::rss_mib(pid(&lab)?)?.0;
            if kube {
                cold_kube.push(ms(t_all - t0));
                rss_kube.push(rss);
            } else {
                cold_etcd.push(ms(t_all - t0));
                rss_etcd.push(rss);
            }
        }
        res.metrics.push(
            Metric::new(&format!("cold start to all {} entries, {n} Nodes", 3 * n), "ms", &cold_kube)
                .vs("etcd mode, same peers", &cold_etcd)
                .note("from twilld exec (Kubernetes mode) to the last kernel entry notified; the etcd-mode runs alternate with these"),
        );
        res.metrics.push(
            Metric::new(&format!("twilld RSS, {n} Nodes"), "MiB", &rss_kube)
                .vs("etcd mode, same peers", &rss_etcd)
                .note("1 s after the last entry"),
        );

        // Heartbeats: every Node's Ready condition rewritten once per 10 s, spread evenly.
        // Windows with and without them alternate, so that the machine's drift (and which
        // window a periodic resync falls in) lands on both sides.
        let per_tick = (n as usize).div_ceil((HEARTBEAT_EVERY.as_millis() / 100) as usize);
        let mut bare = BareWatch::start(&lab, &api)?;
        let (mut idle, mut busy, mut bare_busy, mut beats) =
            (Vec::new(), Vec::new(), Vec::new(), 0u64);
        for _ in 0..windows {
            let pids = [pid(&lab)?, bare.pid()?];
            idle.push(cpu_shares(&pids[..1], window, |_| {})?[0]);
            let shares = cpu_shares(&pids, window, |tick| {
                for j in 0..per_tick {
                    let idx = (tick * per_tick + j) % n as usize;
                    if api.heartbeat(&format!("sim-{idx:05}")).is_ok() {
                        beats += 1;
                    }
                }
            })?;
            busy.push(shares[0]);
            bare_busy.push(shares[1]);
        }
        // Still watching at the end: its windows read a live stream.
        bare.pid()?;
        drop(bare);
        let added = common::metric(&lab, 1, "twill_kernel_entries_added_total")?;
        let m = Metric::new(
            &format!("CPU with {n} Nodes heartbeating"),
            "% of a core",
            &busy,
        )
        // Not paired: the idle windows are mostly 0 ticks of CPU time, no base for a ratio.
        .vs("no heartbeats", &idle);
        let met = m.twill.as_ref().map(|s| s.median < 1.0);
        let secs = window.as_secs_f64() * windows as f64;
        res.metrics
            .push(m.target("under 1 % of a core (median)", met).note(format!(
                "{windows} windows of {:.0} s each way, alternating; {beats} status writes \
                     ({:.0}/s), each a watch event to twilld; kernel entries added meanwhile \
                     (total since start): {added}; /proc counts CPU time in 10 ms ticks, so \
                     one window resolves {:.3} % of a core",
                window.as_secs_f64(),
                beats as f64 / secs,
                100.0 * 0.01 / window.as_secs_f64()
            )));
        res.metrics.push(
            Metric::new(
                &format!("CPU with {n} Nodes heartbeating, against a bare watch"),
                "% of a core",
                &busy,
            )
            .vs_paired("curl reading the same watch", &busy, &bare_busy)
            .note(
                "the same windows as above: curl in twilld's namespace, as twilld's identity, \
                 watching the Nodes and discarding what it reads (no decoding): the least any \
                 client of this stream costs on this machine",
            ),
        );

        // Joins: a Node object (with its annotations) created, against a lease put in etcd.
        let joined = peers(JOIN_BASE..JOIN_BASE + 2 * joins);
        let (kube_joins, etcd_joins) = joined.split_at(joins as usize);
        let listener = Listener::start(&node)?;
        let mut join_kube = Vec::new();
        for p in kube_joins {
            let t = Instant::now();
            api.create_value(Kind::Node, node_object(p))?;
            join_kube.push(ms(
                listener.wait_added(&p.entry_keys(), t, STEP_TIMEOUT)? - t
            ));
        }
        let listener = Listener::start(&node)?;
        let t0 = Instant::now();
        modes.restart(&mut lab, false)?;
        listener.wait_added(&keys, t0, ALL_TIMEOUT)?;
        let mut join_etcd = Vec::new();
        for p in etcd_joins {
            let t = Instant::now();
            writer.put_peers(std::slice::from_ref(p))?;
            join_etcd.push(ms(
                listener.wait_added(&p.entry_keys(), t, STEP_TIMEOUT)? - t
            ));
        }
        res.metrics.push(
            Metric::new(&format!("join, {n} Nodes present"), "ms", &join_kube)
                .vs("etcd mode: lease put", &join_etcd)
                .note("from the Node's create (the lease's put) to its 3 kernel entries notified"),
        );
        drop(lab);
        drop(api);
    }
    res.notes.push(
        "one lab node; the fake API server (tests/src/fakeapi) runs in this process, in the lab's \
         underlay, with the shipped manifest's RBAC; simulated Nodes carry a kubelet-like status \
         (~1.5 KB each)"
            .into(),
    );
    Ok(())
}
