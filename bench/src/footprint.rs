//! Footprint: twilld's resident memory idle with 10 and with 5,000 peers, and the CPU time it
//! uses over a quiet period (no lease changes; periodic resync at its default 30 s).

use std::time::{Duration, Instant};

use anyhow::{anyhow, Result};
use serde_json::json;
use twill_tests::Lab;

use crate::common::{self, Ctx};
use crate::etcd::{entry_keys, peers, Writer};
use crate::nl::Listener;
use crate::report::{Metric, ScenarioResult};

const FLANNELD_REQUEST_MIB: f64 = 50.0;

struct Quiet {
    rss: Vec<f64>,
    hwm: f64,
    cpu_s: f64,
    seconds: f64,
}

/// Sample RSS once a second over `period`; CPU time is the difference across it.
fn quiet_period(lab: &Lab, period: Duration) -> Result<Quiet> {
    let pid = lab
        .daemon_pid(1)
        .ok_or_else(|| anyhow!("twilld not running"))?;
    let start = Instant::now();
    let cpu0 = common::cpu_seconds(pid)?;
    let mut rss = Vec::new();
    let mut hwm = 0.0;
    while start.elapsed() < period {
        std::thread::sleep(Duration::from_secs(1).min(period));
        let (r, h) = common::rss_mib(pid)?;
        rss.push(r);
        hwm = h;
    }
    Ok(Quiet {
        rss,
        hwm,
        cpu_s: common::cpu_seconds(pid)? - cpu0,
        seconds: start.elapsed().as_secs_f64(),
    })
}

pub fn run(ctx: &Ctx, res: &mut ScenarioResult) -> Result<()> {
    let (small, large, quiet) = if ctx.quick {
        (10u32, 50u32, Duration::from_secs(3))
    } else {
        (10, 5000, Duration::from_secs(60))
    };
    res.config = json!({"peers": [small, large], "quiet_period_s": quiet.as_secs_f64()});
    let mut lab = ctx.lab(1)?;
    let writer = Writer::connect(&lab)?;
    let first = peers(0..small);
    writer.put_peers(&first)?;
    let listener = Listener::start(&lab.node_ns(1))?;
    let t0 = Instant::now();
    common::start_daemon(&mut lab, 1, &[])?;
    lab.wait_ready(1, common::READY_TIMEOUT)?;
    listener.wait_added(&entry_keys(&first), t0, Duration::from_secs(60))?;
    std::thread::sleep(Duration::from_secs(2));
    let q_small = quiet_period(&lab, quiet)?;

    let rest = peers(small..large);
    let t1 = Instant::now();
    writer.put_peers(&rest)?;
    listener.wait_added(&entry_keys(&rest), t1, Duration::from_secs(300))?;
    std::thread::sleep(Duration::from_secs(2));
    let pid = lab
        .daemon_pid(1)
        .ok_or_else(|| anyhow!("twilld not running"))?;
    let (grown_rss, grown_hwm) = common::rss_mib(pid)?;
    // Restarted with all peers present: the steady state of a node in a large cluster.
    lab.stop_daemon(1)?;
    common::start_daemon(&mut lab, 1, &[])?;
    lab.wait_ready(1, common::READY_TIMEOUT)?;
    std::thread::sleep(Duration::from_secs(2));
    let q_large = quiet_period(&lab, quiet)?;

    let rss_metric = |name: &str, q: &Quiet, limit: f64| {
        let m = Metric::new(name, "MiB", &q.rss)
            .vs_value("flanneld memory request", FLANNELD_REQUEST_MIB);
        let met = m.twill.as_ref().map(|s| s.max < limit);
        m.target(&format!("< {limit} MiB"), met)
            .note(format!("VmHWM (peak) {:.1} MiB", q.hwm))
    };
    res.metrics.push(rss_metric(
        &format!("RSS idle, {small} peers"),
        &q_small,
        20.0,
    ));
    res.metrics.push(rss_metric(
        &format!("RSS idle, {large} peers"),
        &q_large,
        40.0,
    ));
    res.metrics.push(
        Metric::new(
            &format!("RSS after growing {small}→{large} live"),
            "MiB",
            &[grown_rss],
        )
        .note(format!(
            "VmHWM {grown_hwm:.1} MiB (includes the burst of {} new peers)",
            large - small
        )),
    );
    for (n, q) in [(small, &q_small), (large, &q_large)] {
        res.metrics.push(
            Metric::new(
                &format!("CPU over quiet {:.0} s, {n} peers", q.seconds),
                "ms",
                &[q.cpu_s * 1000.0],
            )
            .note(format!(
                "{:.3}% of one core",
                100.0 * q.cpu_s / q.seconds.max(f64::EPSILON)
            )),
        );
    }
    res.notes.push(
        "the memory reference is flanneld's DaemonSet request (50 MiB; OOM-killed at that limit in \
         the field), a published figure, not measured here"
            .into(),
    );
    Ok(())
}
