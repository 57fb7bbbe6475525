//! Faults injected into a running three-node lab while a measured UDP stream flows from a pod on
//! node 1 to a pod on node 2, and what each cost: datagrams lost, the longest gap, and kernel
//! entries churned on every node. The lab test (`tests/faults.rs`) asserts on a `FaultRun`; the
//! bench (`twill-bench faults`) reports it with longer durations.
//!
//! Each fault checks that it really happened as planned (a restarted daemon is ready again, every
//! node re-listed after etcd came back, the paused node's watch was cancelled by the compaction),
//! so a clean result cannot come from a fault that silently did nothing.

use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use serde::Serialize;

use crate::kernel::DeviceEntries;
use crate::lab::{Lab, LabOptions, SUBNETS_PREFIX, UNDERLAY_IP};
use crate::pod::Pod;
use crate::stream::{StreamOptions, StreamReport, UdpStream};
use crate::wait::{wait_for, wait_until};

pub const CONFIG: &str = r#"{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan"}}"#;
pub const DEV: &str = "twill.1";
const ADDED: &str = "twill_kernel_entries_added_total";
const REMOVED: &str = "twill_kernel_entries_removed_total";
const RESYNCS: &str = "twill_peer_resyncs_total";
/// etcd's count of watchers that fell behind (their events no longer fit the send buffer).
const ETCD_SLOW_WATCHERS: &str = "etcd_debugging_mvcc_slow_watcher_total";
/// A key under the subnets directory that is not a subnet: every node's watch carries its
/// changes, and every node ignores it, so it moves watches without moving peers.
const FILLER_KEY: &str = "twill-faults-filler";
/// Filler values: large, so few puts fill what etcd may have in flight to a paused client.
const FILLER_BYTES: usize = 256 << 10;
/// Bound on filler puts (each `FILLER_BYTES`) while waiting for etcd to count a slow watcher.
const FILLER_MAX_PUTS: usize = 1500;
/// Puts after the watcher fell behind: the compaction must remove revisions it has not seen.
const FILLER_PUTS_BEHIND: usize = 10;

/// A fault, injected while the stream flows.
#[derive(Clone, Debug)]
pub enum Fault {
    /// SIGKILL twilld on the node, start it again, wait until it is ready.
    KillRestart { node: usize },
    /// etcd stopped for `down`, then started again on its data; every node must re-list.
    EtcdDown { down: Duration },
    /// etcd stopped and started again at once on the same data dir.
    EtcdRestart,
    /// twilld on the node paused (SIGSTOP) while its peer watch falls behind (etcd counts it
    /// slow) and the history it has not read is compacted away; then resumed (SIGCONT). Its
    /// watch is cancelled by the compaction and it must re-list.
    CompactionBehind { node: usize },
    /// The node's underlay link down for `down` and up for `up`, `flaps` times: odd flaps on
    /// the node's side (admin down: the kernel flushes its routes through eth0), even flaps
    /// on the bridge's side (carrier loss, as a cable pull or switch port).
    UnderlayFlap {
        node: usize,
        flaps: usize,
        down: Duration,
        up: Duration,
    },
}

impl Fault {
    /// A short stable id ("kill-n1", "etcd-down-30s", ...).
    pub fn key(&self) -> String {
        match self {
            Fault::KillRestart { node } => format!("kill-n{node}"),
            Fault::EtcdDown { down } => format!("etcd-down-{}s", down.as_secs()),
            Fault::EtcdRestart => "etcd-restart".into(),
            Fault::CompactionBehind { node } => format!("compaction-behind-n{node}"),
            Fault::UnderlayFlap { node, flaps, .. } => format!("flap-n{node}-x{flaps}"),
        }
    }

    pub fn describe(&self) -> String {
        match self {
            Fault::KillRestart { node } => format!("kill -9 and restart of twilld on node {node}"),
            Fault::EtcdDown { down } => format!("etcd down {} s and back", down.as_secs()),
            Fault::EtcdRestart => "etcd restarted with its data".into(),
            Fault::CompactionBehind { node } => {
                format!("compaction while node {node}'s watch is behind")
            }
            Fault::UnderlayFlap {
                node,
                flaps,
                down,
                up,
            } => format!(
                "node {node}'s underlay link flapping {flaps}x ({} ms down, {} ms up)",
                down.as_millis(),
                up.as_millis()
            ),
        }
    }

    fn restarted(&self) -> Option<usize> {
        match self {
            Fault::KillRestart { node } => Some(*node),
            _ => None,
        }
    }
}

/// How long the stream runs around a fault.
#[derive(Clone, Debug)]
pub struct Plan {
    pub stream: StreamOptions,
    /// Stream time before the fault.
    pub lead: Duration,
    /// Stream time after the lab has recovered: damage that shows late (a reconcile) is seen.
    pub tail: Duration,
    /// Bound on the recovery (a daemon ready, every node re-listed).
    pub recover_timeout: Duration,
}

impl Default for Plan {
    fn default() -> Self {
        Plan {
            stream: StreamOptions::default(),
            lead: Duration::from_secs(1),
            tail: Duration::from_secs(3),
            recover_timeout: Duration::from_secs(60),
        }
    }
}

/// What a fault did to one node's kernel entries on the VXLAN device.
#[derive(Clone, Debug, Serialize)]
pub struct NodeChurn {
    pub node: usize,
    /// Its twilld was killed and started again by the fault.
    pub restarted: bool,
    /// Neighbour, FDB and route entries on the device before the fault.
    pub entries: usize,
    /// Entries present before and gone after, plus entries new after.
    pub kernel_changed: usize,
    /// twilld's own count of entries it added / removed: the change across the fault for a
    /// daemon that stayed up; everything the new process did for a restarted one.
    pub added: u64,
    pub removed: u64,
    /// The changed entries, for messages.
    pub detail: String,
}

impl NodeChurn {
    pub fn churn(&self) -> u64 {
        self.kernel_changed as u64 + self.added + self.removed
    }
}

/// One fault with the stream across it.
#[derive(Clone, Debug, Serialize)]
pub struct FaultRun {
    pub fault: String,
    pub description: String,
    pub stream: StreamReport,
    pub nodes: Vec<NodeChurn>,
    /// From the start of the fault until the lab had recovered.
    pub fault_seconds: f64,
    pub notes: Vec<String>,
}

impl FaultRun {
    /// Kernel entries changed plus twilld's adds and removes, over the nodes that stayed up.
    pub fn churn_stayed_up(&self) -> u64 {
        self.nodes
            .iter()
            .filter(|n| !n.restarted)
            .map(NodeChurn::churn)
            .sum()
    }

    /// The same over the restarted nodes (a restart that changes nothing: 0).
    pub fn churn_restarted(&self) -> u64 {
        self.nodes
            .iter()
            .filter(|n| n.restarted)
            .map(NodeChurn::churn)
            .sum()
    }

    /// Everything in a few lines, for logs and failure messages.
    pub fn summary(&self) -> String {
        let mut s = format!(
            "{} ({:.1} s): {}\n",
            self.description,
            self.fault_seconds,
            self.stream.summary()
        );
        for n in &self.nodes {
            s.push_str(&format!(
                "  node {}{}: {} entries, {} changed in the kernel, twilld added {} removed {}{}\n",
                n.node,
                if n.restarted { " (restarted)" } else { "" },
                n.entries,
                n.kernel_changed,
                n.added,
                n.removed,
                if n.detail.is_empty() {
                    String::new()
                } else {
                    format!(": {}", n.detail)
                }
            ));
        }
        for note in &self.notes {
            s.push_str(&format!("  - {note}\n"));
        }
        s
    }
}

/// A meshed three-node lab with pod `a` on node 1 and pod `b` on node 2, ready for faults.
pub struct FaultLab {
    pub lab: Lab,
    /// twilld's extra flags, also for restarts.
    pub flags: Vec<String>,
    pub a: Pod,
    pub b: Pod,
}

impl FaultLab {
    pub fn new(opts: LabOptions, flags: &[&str]) -> Result<FaultLab> {
        if opts.nodes < 3 {
            bail!("a fault lab has at least 3 nodes");
        }
        let mut lab = Lab::new(opts)?;
        lab.put_config(CONFIG)?;
        let flags: Vec<String> = flags.iter().map(|s| s.to_string()).collect();
        let n = lab.nodes();
        for i in 1..=n {
            start(&mut lab, i, &flags)?;
        }
        for i in 1..=n {
            lab.wait_ready(i, Duration::from_secs(120))?;
        }
        wait_meshed(&lab, Duration::from_secs(60))?;
        let a = lab.add_pod(1, "a")?;
        let b = lab.add_pod(2, "b")?;
        wait_until(Duration::from_secs(30), || a.ping(b.ip) && b.ping(a.ip))
            .with_context(|| format!("pods {} and {} never reached each other", a.ip, b.ip))?;
        Ok(FaultLab { lab, flags, a, b })
    }

    /// Run the stream across `fault` and measure.
    pub fn run(&mut self, fault: &Fault, plan: &Plan) -> Result<FaultRun> {
        let n = self.lab.nodes();
        let stream = UdpStream::start(&self.a, &self.b, plan.stream.clone())?;
        stream.wait_flowing(Duration::from_secs(10))?;
        let before = (1..=n)
            .map(|i| snapshot(&self.lab, i))
            .collect::<Result<Vec<_>>>()?;
        std::thread::sleep(plan.lead);
        let t0 = Instant::now();
        let notes = self
            .inject(fault, plan)
            .with_context(|| format!("fault: {}", fault.describe()))?;
        let fault_seconds = t0.elapsed().as_secs_f64();
        std::thread::sleep(plan.tail);
        let report = stream.finish()?;
        let mut nodes = Vec::new();
        for (k, b) in before.iter().enumerate() {
            let i = k + 1;
            let after = snapshot(&self.lab, i)?;
            let restarted = fault.restarted() == Some(i);
            let (gone, new) = diff(&b.entries, &after.entries);
            let delta = |a: u64, b: u64| if restarted { a } else { a.saturating_sub(b) };
            nodes.push(NodeChurn {
                node: i,
                restarted,
                entries: count(&b.entries),
                kernel_changed: gone.len() + new.len(),
                added: delta(after.added, b.added),
                removed: delta(after.removed, b.removed),
                detail: if gone.is_empty() && new.is_empty() {
                    String::new()
                } else {
                    format!("gone {gone:?}, new {new:?}")
                },
            });
        }
        Ok(FaultRun {
            fault: fault.key(),
            description: fault.describe(),
            stream: report,
            nodes,
            fault_seconds,
            notes,
        })
    }

    fn inject(&mut self, fault: &Fault, plan: &Plan) -> Result<Vec<String>> {
        let lab = &mut self.lab;
        let mut notes = Vec::new();
        match fault {
            Fault::KillRestart { node } => {
                let node = *node;
                let status = lab.kill_daemon(node)?;
                let t = Instant::now();
                start(lab, node, &self.flags)?;
                lab.wait_ready(node, plan.recover_timeout)?;
                notes.push(format!(
                    "twilld on node {node} killed ({status}), ready again {:.0} ms after the new start",
                    t.elapsed().as_secs_f64() * 1e3
                ));
            }
            Fault::EtcdDown { down } => {
                lab.stop_etcd()?;
                // Counted once etcd is gone: a list served while it was shutting down is not
                // the re-list after its return.
                let resyncs = metrics_all(lab, RESYNCS)?;
                std::thread::sleep(*down);
                let t = Instant::now();
                lab.start_etcd()?;
                let healthy = t.elapsed();
                wait_relisted(lab, &resyncs, plan.recover_timeout)?;
                notes.push(format!(
                    "etcd answered {:.1} s after its start; every node had re-listed the leases \
                     {:.1} s after it",
                    healthy.as_secs_f64(),
                    t.elapsed().as_secs_f64()
                ));
            }
            Fault::EtcdRestart => {
                let rev = lab.etcd_revision()?;
                lab.stop_etcd()?;
                let resyncs = metrics_all(lab, RESYNCS)?;
                let t = Instant::now();
                lab.start_etcd()?;
                let healthy = t.elapsed();
                let after = lab.etcd_revision()?;
                if after < rev {
                    bail!("etcd came back at revision {after}, before {rev}: its data is gone");
                }
                wait_relisted(lab, &resyncs, plan.recover_timeout)?;
                notes.push(format!(
                    "etcd back at revision {after} (was {rev}), answering {:.1} s after its \
                     start; every node had re-listed {:.1} s after it",
                    healthy.as_secs_f64(),
                    t.elapsed().as_secs_f64()
                ));
            }
            Fault::CompactionBehind { node } => {
                notes.extend(compaction_behind(lab, *node, plan)?);
            }
            Fault::UnderlayFlap {
                node,
                flaps,
                down,
                up,
            } => {
                for k in 0..*flaps {
                    flap(lab, *node, k % 2 == 0, *down)?;
                    std::thread::sleep(*up);
                }
                if !lab.daemon_running(*node) {
                    bail!("twilld on node {node} exited during the flaps");
                }
                notes.push(format!(
                    "{} flaps on node {node}'s side (admin down), {} on the bridge's (carrier)",
                    flaps.div_ceil(2),
                    flaps / 2
                ));
            }
        }
        Ok(notes)
    }
}

fn start(lab: &mut Lab, i: usize, flags: &[String]) -> Result<()> {
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    lab.start_daemon_with(i, &flags)
}

/// Every node has complete entries for every other node.
fn wait_meshed(lab: &Lab, timeout: Duration) -> Result<()> {
    let n = lab.nodes();
    let mut nodes = Vec::new();
    for i in 1..=n {
        let st = lab.status(i)?;
        let field = |k: &str| {
            st["node"][k]
                .as_str()
                .map(str::to_owned)
                .ok_or_else(|| anyhow!("/status node.{k} missing on node {i}: {st}"))
        };
        nodes.push((field("subnet")?, field("vtep_mac")?, field("public_ip")?));
    }
    for i in 1..=n {
        wait_until(timeout, || {
            let Ok(e) = lab.entries(i, DEV) else {
                return false;
            };
            nodes
                .iter()
                .enumerate()
                .filter(|(k, _)| k + 1 != i)
                .all(|(_, (subnet, mac, ip))| e.has_peer(subnet, mac, ip))
        })
        .with_context(|| {
            format!(
                "node {i} never programmed its peers: {:?}",
                lab.entries(i, DEV)
            )
        })?;
    }
    Ok(())
}

struct Snapshot {
    entries: DeviceEntries,
    added: u64,
    removed: u64,
}

fn snapshot(lab: &Lab, i: usize) -> Result<Snapshot> {
    Ok(Snapshot {
        entries: lab.entries(i, DEV)?,
        added: metric(lab, i, ADDED)?,
        removed: metric(lab, i, REMOVED)?,
    })
}

fn metric(lab: &Lab, i: usize, name: &str) -> Result<u64> {
    lab.metric(i, name)?
        .map(|v| v as u64)
        .ok_or_else(|| anyhow!("twilld on node {i} does not export {name}"))
}

fn metrics_all(lab: &Lab, name: &str) -> Result<Vec<u64>> {
    (1..=lab.nodes()).map(|i| metric(lab, i, name)).collect()
}

/// Wait until every node's peer watcher has listed the leases again since `before`.
fn wait_relisted(lab: &Lab, before: &[u64], timeout: Duration) -> Result<()> {
    wait_until(timeout, || {
        metrics_all(lab, RESYNCS)
            .map(|now| now.iter().zip(before).all(|(n, b)| n > b))
            .unwrap_or(false)
    })
    .with_context(|| {
        format!(
            "not every node re-listed the leases (before {before:?}, now {:?})",
            metrics_all(lab, RESYNCS)
        )
    })
}

fn count(e: &DeviceEntries) -> usize {
    e.neigh.len() + e.fdb.len() + e.routes.len()
}

/// Entries of `a` missing from `b`, and of `b` missing from `a`, as text.
fn diff(a: &DeviceEntries, b: &DeviceEntries) -> (Vec<String>, Vec<String>) {
    fn one<T: PartialEq + std::fmt::Debug>(x: &[T], y: &[T], out: &mut Vec<String>) {
        out.extend(
            x.iter()
                .filter(|e| !y.contains(e))
                .map(|e| format!("{e:?}")),
        );
    }
    let (mut gone, mut new) = (Vec::new(), Vec::new());
    one(&a.neigh, &b.neigh, &mut gone);
    one(&a.fdb, &b.fdb, &mut gone);
    one(&a.routes, &b.routes, &mut gone);
    one(&b.neigh, &a.neigh, &mut new);
    one(&b.fdb, &a.fdb, &mut new);
    one(&b.routes, &a.routes, &mut new);
    (gone, new)
}

/// Pause the node's twilld; put filler values under the subnets directory until etcd counts a
/// slow watcher (the paused client's watch no longer fits what etcd may hold for it), a few more
/// so the watch misses revisions, delete the filler, compact, resume. The node's watch is then
/// cancelled with the compact revision and the node must re-list.
fn compaction_behind(lab: &mut Lab, node: usize, plan: &Plan) -> Result<Vec<String>> {
    let resyncs = metric(lab, node, RESYNCS)?;
    let key = format!("{SUBNETS_PREFIX}{FILLER_KEY}");
    let value = vec![b'x'; FILLER_BYTES];
    let slow =
        |lab: &Lab| -> Result<f64> { Ok(lab.etcd_metric(ETCD_SLOW_WATCHERS)?.unwrap_or(0.0)) };
    let slow_before = slow(lab)?;
    lab.pause_daemon(node)?;
    // Whatever happens below, the daemon must not stay paused.
    let res = (|| -> Result<(usize, i64)> {
        let mut puts = 0;
        while slow(lab)? <= slow_before {
            if puts >= FILLER_MAX_PUTS {
                bail!(
                    "etcd counted no slow watcher after {puts} puts of {FILLER_BYTES} bytes: \
                     node {node}'s watch did not fall behind"
                );
            }
            lab.etcdctl_input(&["put", &key], &value)?;
            puts += 1;
        }
        for _ in 0..FILLER_PUTS_BEHIND {
            lab.etcdctl_input(&["put", &key], &value)?;
            puts += 1;
        }
        lab.etcdctl(&["del", &key])?;
        let rev = lab.compact_etcd()?;
        Ok((puts, rev))
    })();
    let resumed = lab.resume_daemon(node);
    let (puts, rev) = res?;
    resumed?;
    let t = Instant::now();
    wait_for(plan.recover_timeout, || {
        let log = lab.daemon_log_last(node);
        (log.contains("was compacted") && metric(lab, node, RESYNCS).is_ok_and(|r| r > resyncs))
            .then_some(())
    })
    .with_context(|| {
        format!(
            "node {node} did not re-list after its watch was compacted away\n{}",
            crate::etcd::tail(&lab.daemon_log_last(node), 20)
        )
    })?;
    Ok(vec![
        format!(
            "twilld on node {node} paused through {puts} puts of {} KiB under the subnets \
             directory (etcd counted its watch slow), then a compaction to revision {rev}",
            FILLER_BYTES >> 10
        ),
        format!(
            "after SIGCONT node {node}'s watch was cancelled as compacted and it re-listed \
             within {:.1} s",
            t.elapsed().as_secs_f64()
        ),
    ])
}

/// One flap of the node's underlay link: its own end (admin down, which flushes the routes
/// through it; the default route is put back afterwards as the node's network config would)
/// or the bridge's end (the node sees carrier loss).
fn flap(lab: &Lab, node: usize, node_side: bool, down: Duration) -> Result<()> {
    if node_side {
        lab.exec_ok(node, &["ip", "link", "set", "eth0", "down"])?;
        std::thread::sleep(down);
        lab.exec_ok(node, &["ip", "link", "set", "eth0", "up"])?;
        lab.exec_ok(
            node,
            &[
                "ip",
                "route",
                "replace",
                "default",
                "via",
                &UNDERLAY_IP.to_string(),
            ],
        )?;
    } else {
        let veth = format!("veth{node}");
        lab.exec_underlay_ok(&["ip", "link", "set", &veth, "down"])?;
        std::thread::sleep(down);
        lab.exec_underlay_ok(&["ip", "link", "set", &veth, "up"])?;
    }
    Ok(())
}
