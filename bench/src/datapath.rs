//! Data path: pod-to-pod TCP throughput (iperf3, 1 and 8 streams) and round-trip time across
//! two lab nodes through the overlay, against node-to-node over the underlay in the same run;
//! then the overlay at the MTU twill chose against 100 bytes lower and higher.

use std::process::Child;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use serde_json::{json, Value};
use twill_tests::{netns, wait_until, Lab};

use crate::cni::{call, new_pod_ns, twill_plugin};
use crate::common::{self, Ctx, DEV};
use crate::report::{Metric, ScenarioResult};

struct Pod {
    ns: String,
    ip: String,
    host_veth: String,
}

fn add_pod(ctx: &Ctx, lab: &Lab, node: usize) -> Result<Pod> {
    let (ns, path) = new_pod_ns(lab.prefix())?;
    let plugin = twill_plugin(ctx, &lab.cni_socket(node));
    let id = format!("bench{ns}");
    let (_, out) = netns::in_netns(&lab.node_ns(node), move || call(&plugin, "ADD", &id, &path))?;
    let out = out.map_err(|e| anyhow!("CNI ADD on node {node}: {e}"))?;
    let v: Value = serde_json::from_str(&out).context("CNI result")?;
    let ip = v["ips"][0]["address"]
        .as_str()
        .and_then(|a| a.split('/').next())
        .ok_or_else(|| anyhow!("no IP in CNI result {out}"))?
        .to_owned();
    let host_veth = v["interfaces"]
        .as_array()
        .and_then(|ifs| {
            ifs.iter()
                .find(|i| i["sandbox"].as_str().unwrap_or("").is_empty())
        })
        .and_then(|i| i["name"].as_str())
        .ok_or_else(|| anyhow!("no host interface in CNI result {out}"))?
        .to_owned();
    Ok(Pod { ns, ip, host_veth })
}

fn ns_exec(ns: &str, args: &[&str]) -> Result<String> {
    let out = netns::exec_cmd(ns, args).output()?;
    netns::check(args, out)
}

/// Kills the iperf3 servers when the scenario ends, however it ends.
struct Servers(Vec<Child>);
impl Drop for Servers {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Gbit/s received by the server side.
fn iperf(client_ns: &str, server_ip: &str, secs: u32, streams: u32) -> Result<f64> {
    let (t, p) = (secs.to_string(), streams.to_string());
    let out = ns_exec(
        client_ns,
        &["iperf3", "-c", server_ip, "-t", &t, "-P", &p, "-J"],
    )?;
    let v: Value = serde_json::from_str(&out).context("iperf3 -J output")?;
    v["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .map(|b| b / 1e9)
        .ok_or_else(|| {
            anyhow!(
                "no throughput in iperf3 output: {}",
                &out[..out.len().min(400)]
            )
        })
}

/// Per-packet round-trip times, ms.
fn rtts(ns: &str, dst: &str, count: u32) -> Result<Vec<f64>> {
    let c = count.to_string();
    let out = ns_exec(ns, &["ping", "-n", "-c", &c, "-i", "0.01", dst])?;
    Ok(out
        .lines()
        .filter_map(|l| l.split("time=").nth(1))
        .filter_map(|t| t.split_whitespace().next()?.parse().ok())
        .collect())
}

fn link_mtu(ns: &str, dev: &str) -> Result<u32> {
    let out = ns_exec(ns, &["ip", "-j", "link", "show", dev])?;
    let v: Value = serde_json::from_str(&out)?;
    v[0]["mtu"]
        .as_u64()
        .map(|m| m as u32)
        .ok_or_else(|| anyhow!("no mtu for {dev} in {ns}"))
}

/// Set the MTU along the whole pod path on both nodes; returns what the kernel refused.
fn set_path_mtu(lab: &Lab, pods: &[Pod; 2], mtu: u32) -> Vec<String> {
    let m = mtu.to_string();
    let mut refused = Vec::new();
    for (i, pod) in pods.iter().enumerate() {
        let node = lab.node_ns(i + 1);
        for (ns, dev) in [
            (pod.ns.as_str(), "eth0"),
            (node.as_str(), pod.host_veth.as_str()),
            (node.as_str(), "cni0"),
            (node.as_str(), DEV),
        ] {
            if let Err(e) = ns_exec(ns, &["ip", "link", "set", dev, "mtu", &m]) {
                let first = e.to_string().lines().last().unwrap_or_default().to_owned();
                refused.push(format!("{dev} on node {}: {first}", i + 1));
            }
        }
    }
    refused
}

pub fn run(ctx: &Ctx, res: &mut ScenarioResult) -> Result<()> {
    let (secs, runs, pings) = if ctx.quick { (1, 1, 20) } else { (5, 3, 200) };
    res.config = json!({"iperf_seconds": secs, "runs": runs, "pings": pings});
    let mut lab = ctx.lab(2)?;
    // No periodic resync during the MTU variations (it would put the device MTU back).
    for i in 1..=2 {
        common::start_daemon(&mut lab, i, &["--resync-interval", "1h"])?;
    }
    for i in 1..=2 {
        lab.wait_ready(i, common::READY_TIMEOUT)?;
    }
    let pods = [add_pod(ctx, &lab, 1)?, add_pod(ctx, &lab, 2)?];
    let (p1, p2) = (&pods[0], &pods[1]);
    let n2_ip = lab.node_ip(2).to_string();
    wait_until(Duration::from_secs(60), || {
        ns_exec(&p1.ns, &["ping", "-c", "1", "-W", "1", &p2.ip]).is_ok()
    })
    .context("pod 1 never reached pod 2 through the overlay")?;

    let mut servers = Servers(Vec::new());
    for (ns, ip) in [
        (p2.ns.clone(), p2.ip.clone()),
        (lab.node_ns(2), n2_ip.clone()),
    ] {
        servers.0.push(
            netns::exec_cmd(&ns, &["iperf3", "-s", "-B", &ip])
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .spawn()?,
        );
    }
    // Servers are up once a zero-length probe connects.
    wait_until(Duration::from_secs(20), || {
        iperf(&p1.ns, &p2.ip, 1, 1).is_ok() && iperf(&lab.node_ns(1), &n2_ip, 1, 1).is_ok()
    })
    .context("iperf3 servers did not come up")?;

    let n1 = lab.node_ns(1);
    for streams in [1u32, 8] {
        let (mut over, mut under) = (Vec::new(), Vec::new());
        for r in 0..runs {
            if r % 2 == 0 {
                over.push(iperf(&p1.ns, &p2.ip, secs, streams)?);
                under.push(iperf(&n1, &n2_ip, secs, streams)?);
            } else {
                under.push(iperf(&n1, &n2_ip, secs, streams)?);
                over.push(iperf(&p1.ns, &p2.ip, secs, streams)?);
            }
        }
        res.metrics.push(
            Metric::new(
                &format!(
                    "TCP {streams} stream{}, pod-to-pod",
                    if streams > 1 { "s" } else { "" }
                ),
                "Gbit/s",
                &over,
            )
            .vs("underlay node-to-node", &under)
            .note("ratio = the overlay's share of the underlay"),
        );
    }
    let over_rtt = rtts(&p1.ns, &p2.ip, pings)?;
    let under_rtt = rtts(&n1, &n2_ip, pings)?;
    res.metrics.push(
        Metric::new("RTT, pod-to-pod", "ms", &over_rtt).vs("underlay node-to-node", &under_rtt),
    );

    // MTU: the daemons stop (kernel state stays) so nothing puts the MTU back under us.
    let chosen = link_mtu(&p1.ns, "eth0")?;
    let underlay = link_mtu(&n1, "eth0")?;
    for i in 1..=2 {
        lab.stop_daemon(i)?;
    }
    let mut by_mtu: Vec<(u32, Vec<f64>, Vec<String>)> = Vec::new();
    let variants = [chosen - 100, chosen, chosen + 100];
    for r in 0..runs {
        // Rotate the order so no variant always runs first.
        for k in 0..variants.len() {
            let mtu = variants[(k + r) % variants.len()];
            let refused = set_path_mtu(&lab, &pods, mtu);
            let gbps = iperf(&p1.ns, &p2.ip, secs, 1)?;
            match by_mtu.iter_mut().find(|(m, _, _)| *m == mtu) {
                Some(e) => e.1.push(gbps),
                None => by_mtu.push((mtu, vec![gbps], refused)),
            }
        }
    }
    set_path_mtu(&lab, &pods, chosen);
    by_mtu.sort_by_key(|e| e.0);
    let base = by_mtu
        .iter()
        .find(|e| e.0 == chosen)
        .map(|e| e.1.clone())
        .ok_or_else(|| anyhow!("no run at the chosen MTU"))?;
    for (mtu, gbps, refused) in &by_mtu {
        if *mtu == chosen {
            continue;
        }
        let mut m = Metric::new(&format!("TCP 1 stream at MTU {mtu}"), "Gbit/s", gbps)
            .vs(&format!("twill's MTU {chosen}"), &base);
        if !refused.is_empty() {
            m = m.note(format!("kernel refused: {}", refused.join("; ")));
        }
        res.metrics.push(m);
    }
    if chosen != underlay - 50 {
        bail!(
            "twill chose MTU {chosen} on a {underlay} underlay; expected {}",
            underlay - 50
        );
    }
    res.notes.push(format!(
        "underlay: veth pairs over a bridge in the lab's underlay namespace, MTU {underlay}; twill \
         chose {chosen} (underlay - 50); MTU variants set on pod eth0, host veth, cni0 and {DEV} \
         on both nodes with the daemons stopped"
    ));
    Ok(())
}
