//! Dual stack against IPv4 only, side by side: twilld starting on a node whose etcd holds N
//! peers' leases (dual-stack leases: every peer twice the kernel entries, on two devices), time
//! to /readyz (readiness means every peer programmed, in both families); then one peer joining,
//! time from its lease written to it programmed (in both families) on /status. Runs alternate
//! between the two labs.

use std::net::Ipv6Addr;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use serde_json::{json, Value};
use twill_tests::{Lab, LabOptions};

use crate::common::{self, ms, Ctx, DEV};
use crate::etcd::{peers, SimPeer, Writer, CONFIG};
use crate::report::{Metric, ScenarioResult};

/// The IPv4 config plus an IPv6 network with room for every simulated peer's /64.
const CONFIG6: &str = r#"{"Network":"10.0.0.0/8","SubnetLen":24,"EnableIPv6":true,"IPv6Network":"fd00:10::/48","IPv6SubnetLen":64,"Backend":{"Type":"vxlan"}}"#;
const DEV6: &str = "twill-v6.1";

/// A simulated peer's IPv6 side: fd00:10:0:<idx + 256>::/64, from fd00:199::<idx + 1>.
fn subnet6(p: &SimPeer) -> Ipv6Addr {
    Ipv6Addr::new(0xfd00, 0x10, 0, (p.idx + 256) as u16, 0, 0, 0, 0)
}

fn dual_kv(p: &SimPeer) -> (String, String) {
    let v6mac = {
        let m = p.mac();
        format!("0e:b6:{:02x}:{:02x}:{:02x}:{:02x}", m[2], m[3], m[4], m[5])
    };
    let public6 = Ipv6Addr::from(
        u128::from(Ipv6Addr::new(0xfd00, 0x199, 0, 0, 0, 0, 0, 0)) + u128::from(p.idx) + 1,
    );
    let mut v: Value = serde_json::from_str(&p.value()).expect("a lease value");
    v["PublicIPv6"] = json!(public6.to_string());
    v["BackendV6Data"] = json!({"VNI": 1, "VtepMAC": v6mac});
    (format!("{}&{}-64", p.key(), subnet6(p)), v.to_string())
}

fn lab(ctx: &Ctx, dual: bool) -> Result<Lab> {
    let lab = Lab::new(LabOptions {
        nodes: 1,
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
            lab.exec_ok(1, &["ip", "link", "del", DEV6])?;
        }
    }
    let t0 = Instant::now();
    common::start_daemon(lab, 1, &[])?;
    let t = common::wait_ready_precise(lab, 1, common::READY_TIMEOUT)?;
    Ok(ms(t - t0))
}

/// Whether /status shows `subnet` (and on a dual node `subnet6`) programmed.
fn programmed(lab: &Lab, subnet: &str, subnet6: Option<&str>) -> bool {
    let Ok(s) = lab.status(1) else { return false };
    let has = |list: &Value, net: &str| {
        list.as_array().is_some_and(|a| {
            a.iter()
                .any(|p| p["subnet"] == net && p["programmed"] == true)
        })
    };
    has(&s["peers"], subnet) && subnet6.is_none_or(|n| has(&s["peers6"], n))
}

/// One peer joins: ms from its lease written to it programmed, polled on /status every 2 ms.
fn join(lab: &Lab, p: &SimPeer, dual: bool) -> Result<f64> {
    let w = Writer::connect(lab)?;
    let subnet = format!("{}/24", p.subnet());
    let subnet6 = format!("{}/64", subnet6(p));
    let t0 = Instant::now();
    if dual {
        w.put_kvs(vec![dual_kv(p)])?;
    } else {
        w.put_peers(std::slice::from_ref(p))?;
    }
    let deadline = t0 + Duration::from_secs(30);
    while !programmed(lab, &subnet, dual.then_some(subnet6.as_str())) {
        anyhow::ensure!(
            Instant::now() < deadline,
            "peer {subnet} was not programmed"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
    Ok(ms(t0.elapsed()))
}

pub fn run(ctx: &Ctx, res: &mut ScenarioResult) -> Result<()> {
    let (n, runs, joins) = if ctx.quick { (50, 1, 2) } else { (1000, 3, 10) };
    res.config = json!({"peers": n, "runs": runs, "joins": joins});
    let base = peers(0..n);
    let mut v4 = lab(ctx, false).context("the IPv4-only lab")?;
    let mut v6 = lab(ctx, true).context("the dual-stack lab")?;
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
    let (mut j4, mut j6) = (Vec::new(), Vec::new());
    for (k, p) in peers(20_000..20_000 + joins).iter().enumerate() {
        if k % 2 == 0 {
            j4.push(join(&v4, p, false)?);
            j6.push(join(&v6, p, true)?);
        } else {
            j6.push(join(&v6, p, true)?);
            j4.push(join(&v4, p, false)?);
        }
    }
    let m =
        Metric::new(&format!("join, {n} dual-stack peers present"), "ms", &j6).vs("IPv4 only", &j4);
    let met = m.ratio.map(|r| r <= 1.5);
    res.metrics.push(m.target("≤ 1.5x IPv4 only", met).note(
        "lease written to the peer shown programmed on /status (both families), polled every 2 ms",
    ));
    Ok(())
}
