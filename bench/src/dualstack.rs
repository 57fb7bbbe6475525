//! Dual stack against IPv4 only, side by side: twilld starting on a node whose etcd holds N
//! peers' leases (dual-stack leases: every peer twice the kernel entries, on two devices), time
//! to /readyz (readiness means every peer programmed, in both families); then one peer joining,
//! time from its lease written to the kernel's notification of its last entry (3 entries, or
//! 6 with both families). Runs alternate between the two labs. Last, pod-to-pod TCP throughput
//! across two dual-stack nodes over IPv6 against over IPv4 (iperf3, one stream, alternating).

use std::net::Ipv6Addr;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use serde_json::{json, Value};
use twill_tests::{Lab, LabOptions};

use crate::backends::{iperf, iperf_server, Servers};
use crate::common::{self, ms, Ctx, DEV};
use crate::etcd::{peers, SimPeer, Writer, CONFIG};
use crate::nl::{self, Listener};
use crate::report::{Metric, ScenarioResult};

/// The IPv4 config plus an IPv6 network with room for every simulated peer's /64.
const CONFIG6: &str = r#"{"Network":"10.0.0.0/8","SubnetLen":24,"EnableIPv6":true,"IPv6Network":"fd00:10::/48","IPv6SubnetLen":64,"Backend":{"Type":"vxlan"}}"#;
const DEV6: &str = "twill-v6.1";

/// A simulated peer's IPv6 side: fd00:10:0:<idx + 256>::/64, from fd00:199::<idx + 1>.
fn subnet6(p: &SimPeer) -> Ipv6Addr {
    Ipv6Addr::new(0xfd00, 0x10, 0, (p.idx + 256) as u16, 0, 0, 0, 0)
}

fn mac6(p: &SimPeer) -> [u8; 6] {
    let m = p.mac();
    [0x0e, 0xb6, m[2], m[3], m[4], m[5]]
}

/// The entries a node installs for a peer: its IPv4 three, and with `dual` its IPv6 three.
fn entry_keys(p: &SimPeer, dual: bool) -> Vec<String> {
    let mut keys = p.entry_keys().to_vec();
    if dual {
        keys.extend([
            nl::neigh_key(subnet6(p)),
            nl::fdb_key(&mac6(p)),
            nl::route_key(subnet6(p), 64),
        ]);
    }
    keys
}

fn dual_kv(p: &SimPeer) -> (String, String) {
    let v6mac = nl::mac_str(&mac6(p));
    let public6 = Ipv6Addr::from(
        u128::from(Ipv6Addr::new(0xfd00, 0x199, 0, 0, 0, 0, 0, 0)) + u128::from(p.idx) + 1,
    );
    let mut v: Value = serde_json::from_str(&p.value()).expect("a lease value");
    v["PublicIPv6"] = json!(public6.to_string());
    v["BackendV6Data"] = json!({"VNI": 1, "VtepMAC": v6mac});
    (format!("{}&{}-64", p.key(), subnet6(p)), v.to_string())
}

fn lab(ctx: &Ctx, dual: bool, nodes: usize) -> Result<Lab> {
    let lab = Lab::new(LabOptions {
        nodes,
        bin_dir: Some(ctx.bin_dir.clone()),
        ipv6: dual,
        ..Default::default()
    })?;
    lab.put_config(if dual { CONFIG6 } else { CONFIG })?;
    Ok(lab)
}

fn put(lab: &Lab, peers: &[SimPeer], dual: bool) -> Result<()> {
    let w = Writer::connect(lab)?;
    if dual {
        w.put_kvs(peers.iter().map(dual_kv).collect())?;
    } else {
        w.put_peers(peers)?;
    }
    Ok(())
}

/// Cold start: no device (its entries go with it), twilld started; ms to /readyz.
fn cold_start(lab: &mut Lab, dual: bool) -> Result<f64> {
    if lab.daemon_running(1) {
        lab.kill_daemon(1)?;
        lab.exec_ok(1, &["ip", "link", "del", DEV])?;
        if dual {
            lab.exec_ok(1, &["ip", "link", "del", DEV6])
                .with_context(|| {
                    format!(
                        "links: {}\nlog: {}",
                        lab.exec_ok(1, &["ip", "-o", "link"]).unwrap_or_default(),
                        lab.daemon_log_last(1)
                    )
                })?;
        }
    }
    let t0 = Instant::now();
    common::start_daemon(lab, 1, &[])?;
    let t = common::wait_ready_precise(lab, 1, common::READY_TIMEOUT)?;
    Ok(ms(t - t0))
}

/// One peer joins: ms from its lease written to the last of its entries notified.
fn join(lab: &Lab, listener: &Listener, p: &SimPeer, dual: bool) -> Result<f64> {
    let w = Writer::connect(lab)?;
    let t0 = Instant::now();
    if dual {
        w.put_kvs(vec![dual_kv(p)])?;
    } else {
        w.put_peers(std::slice::from_ref(p))?;
    }
    let done = listener.wait_added(&entry_keys(p, dual), t0, Duration::from_secs(30))?;
    Ok(ms(done - t0))
}

pub fn run(ctx: &Ctx, res: &mut ScenarioResult) -> Result<()> {
    let (n, runs, joins) = if ctx.quick { (50, 1, 2) } else { (1000, 3, 10) };
    res.config = json!({"peers": n, "runs": runs, "joins": joins});
    let base = peers(0..n);
    let mut v4 = lab(ctx, false, 1).context("the IPv4-only lab")?;
    let mut v6 = lab(ctx, true, 1).context("the dual-stack lab")?;
    put(&v4, &base, false)?;
    put(&v6, &base, true)?;
    let (mut ready4, mut ready6) = (Vec::new(), Vec::new());
    for r in 0..runs {
        if r % 2 == 0 {
            ready4.push(cold_start(&mut v4, false)?);
            ready6.push(cold_start(&mut v6, true)?);
        } else {
            ready6.push(cold_start(&mut v6, true)?);
            ready4.push(cold_start(&mut v4, false)?);
        }
    }
    // Every entry there, in both families.
    let e = v6.entries(1, DEV)?;
    let routes6 = v6
        .exec_ok(1, &["ip", "-6", "route", "show", "dev", DEV6])?
        .lines()
        .filter(|l| l.contains(" via "))
        .count();
    anyhow::ensure!(
        e.routes.len() >= n as usize && routes6 >= n as usize,
        "the dual-stack node holds {} IPv4 and {routes6} IPv6 routes; expected {n} each",
        e.routes.len(),
    );
    let m = Metric::new(&format!("ready, {n} dual-stack peers"), "ms", &ready6)
        .vs(&format!("{n} IPv4-only peers"), &ready4);
    let met = m.ratio.map(|r| r <= 1.5);
    res.metrics.push(
        m.target("≤ 1.5x IPv4 only", met)
            .note("cold start (no devices) to the first 200 on /readyz: every peer programmed, on both devices"),
    );
    let (l4, l6) = (
        Listener::start(&v4.node_ns(1))?,
        Listener::start(&v6.node_ns(1))?,
    );
    let (mut j4, mut j6) = (Vec::new(), Vec::new());
    for (k, p) in peers(20_000..20_000 + joins).iter().enumerate() {
        if k % 2 == 0 {
            j4.push(join(&v4, &l4, p, false)?);
            j6.push(join(&v6, &l6, p, true)?);
        } else {
            j6.push(join(&v6, &l6, p, true)?);
            j4.push(join(&v4, &l4, p, false)?);
        }
    }
    let m =
        Metric::new(&format!("join, {n} dual-stack peers present"), "ms", &j6).vs("IPv4 only", &j4);
    let met = m.ratio.map(|r| r <= 1.5);
    res.metrics.push(m.target("≤ 1.5x IPv4 only", met).note(
        "lease written to the kernel's notification of the peer's last entry (6 entries with \
         both families, 3 with IPv4 only)",
    ));
    drop((l4, l6, v4, v6));
    throughput(ctx, res)
}

/// Pod to pod across two dual-stack nodes, over IPv6 and over IPv4, alternating.
fn throughput(ctx: &Ctx, res: &mut ScenarioResult) -> Result<()> {
    let (secs, runs) = if ctx.quick { (1, 1) } else { (5, 5) };
    let mut lab = lab(ctx, true, 2)?;
    for i in 1..=2 {
        common::start_daemon(&mut lab, i, &[])?;
    }
    for i in 1..=2 {
        lab.wait_ready(i, common::READY_TIMEOUT)?;
    }
    let (a, b) = (lab.add_pod(1, "a")?, lab.add_pod(2, "b")?);
    let b6 = b.ip6.context("pod b has no IPv6 address")?.to_string();
    let b4 = b.ip.to_string();
    let _servers = Servers(vec![
        iperf_server(&b.ns, &b4, 5301)?,
        iperf_server(&b.ns, &b6, 5302)?,
    ]);
    twill_tests::wait_until(Duration::from_secs(30), || {
        iperf(&a.ns, &b4, 5301, 1, 1).is_ok() && iperf(&a.ns, &b6, 5302, 1, 1).is_ok()
    })
    .context("iperf3 between the pods did not come up on both families")?;
    let (mut g4, mut g6) = (Vec::new(), Vec::new());
    for r in 0..runs {
        if r % 2 == 0 {
            g6.push(iperf(&a.ns, &b6, 5302, secs, 1)?);
            g4.push(iperf(&a.ns, &b4, 5301, secs, 1)?);
        } else {
            g4.push(iperf(&a.ns, &b4, 5301, secs, 1)?);
            g6.push(iperf(&a.ns, &b6, 5302, secs, 1)?);
        }
    }
    res.metrics.push(
        Metric::new("pod-to-pod TCP, one stream, over IPv6", "Gbit/s", &g6)
            .vs("over IPv4", &g4)
            .note(format!(
                "iperf3 {secs} s per run across two nodes (VXLAN; pod MTU 1430 for both families)"
            )),
    );
    Ok(())
}
