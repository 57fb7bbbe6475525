//! Cold start at scale: twilld starting on a node whose etcd already holds N peers, time to
//! /readyz and to all 3N kernel entries, against `ip -batch`/`bridge -batch` adding the same 3N
//! entries in a fresh namespace. Then a restart with everything programmed: nothing may churn.

use std::time::{Duration, Instant};

use anyhow::Result;
use serde_json::json;

use crate::common::{self, ms, Ctx, DEV};
use crate::etcd::{entry_keys, peers, Writer};
use crate::nl::Listener;
use crate::refns::RefNs;
use crate::report::{Metric, ScenarioResult};

const ALL_TIMEOUT: Duration = Duration::from_secs(300);

pub fn run(ctx: &Ctx, res: &mut ScenarioResult) -> Result<()> {
    let (sizes, runs, settle): (Vec<u32>, usize, Duration) = if ctx.quick {
        (vec![50], 1, Duration::from_secs(1))
    } else {
        (vec![1000, 5000], 3, Duration::from_secs(5))
    };
    res.config = json!({"peers": sizes, "runs": runs, "restart_settle_s": settle.as_secs_f64()});
    for n in sizes {
        let mut lab = ctx.lab(1)?;
        let writer = Writer::connect(&lab)?;
        let base = peers(0..n);
        writer.put_peers(&base)?;
        drop(writer);
        let keys = entry_keys(&base);
        let node = lab.node_ns(1);
        let prefix = lab.prefix().to_owned();
        let (mut ready, mut all, mut batch, mut overruns) = (vec![], vec![], vec![], 0);
        for r in 0..runs {
            let mut twill_run = |lab: &mut twill_tests::Lab| -> Result<()> {
                if lab.daemon_running(1) {
                    lab.kill_daemon(1)?;
                    // Cold: no device, so no entries (they go with it).
                    lab.exec_ok(1, &["ip", "link", "del", DEV])?;
                }
                let listener = Listener::start(&node)?;
                let t0 = Instant::now();
                common::start_daemon(lab, 1, &[])?;
                let t_ready = common::wait_ready_precise(lab, 1, common::READY_TIMEOUT)?;
                let t_all = listener.wait_added(&keys, t0, ALL_TIMEOUT)?;
                ready.push(ms(t_ready - t0));
                all.push(ms(t_all - t0));
                overruns += listener.overruns();
                Ok(())
            };
            let batch_run = |batch: &mut Vec<f64>| -> Result<()> {
                let refns = RefNs::new(&prefix)?;
                batch.push(ms(refns.add_batch(&base)?));
                Ok(())
            };
            if r % 2 == 0 {
                twill_run(&mut lab)?;
                batch_run(&mut batch)?;
            } else {
                batch_run(&mut batch)?;
                twill_run(&mut lab)?;
            }
        }
        let m = Metric::new(&format!("all {} entries, {n} peers", 3 * n), "ms", &all)
            .vs("ip/bridge -batch", &batch);
        let met = m.ratio.map(|r| r <= 2.0);
        res.metrics
            .push(m.target("≤ 2x the batch tools", met).note(format!(
                "from twilld exec to the last entry notified; netlink overruns {overruns}"
            )));
        res.metrics.push(
            Metric::new(&format!("ready, {n} peers"), "ms", &ready)
                .vs("ip/bridge -batch", &batch)
                .note("from exec to the first 200 on /readyz (readiness means peers programmed)"),
        );

        // Restart with everything in place: count what the new process adds or removes.
        let listener = Listener::start(&node)?;
        let (new0, del0) = listener.counts();
        lab.stop_daemon(1)?;
        let t0 = Instant::now();
        common::start_daemon(&mut lab, 1, &[])?;
        let t_ready = common::wait_ready_precise(&mut lab, 1, common::READY_TIMEOUT)?;
        std::thread::sleep(settle);
        let added = common::metric(&lab, 1, "twill_kernel_entries_added_total")?;
        let removed = common::metric(&lab, 1, "twill_kernel_entries_removed_total")?;
        let (new1, del1) = listener.counts();
        res.metrics.push(
            Metric::new(
                &format!("restart churn, {n} peers"),
                "entries",
                &[added + removed],
            )
            .vs_value("no churn", 0.0)
            .target("0 added, 0 removed", Some(added + removed == 0.0))
            .note(format!(
                "twilld metrics after restart: {added} added, {removed} removed; kernel \
                     notifications during restart: {} new, {} deleted",
                new1 - new0,
                del1 - del0
            )),
        );
        res.metrics.push(Metric::new(
            &format!("restart to ready, {n} peers"),
            "ms",
            &[ms(t_ready - t0)],
        ));
        let e = lab.entries(1, DEV)?;
        anyhow::ensure!(
            e.neigh.len() >= n as usize
                && e.fdb.len() >= n as usize
                && e.routes.len() >= n as usize,
            "after restart the kernel holds {} neighbours, {} fdb, {} routes; expected {n} each",
            e.neigh.len(),
            e.fdb.len(),
            e.routes.len()
        );
    }
    res.notes.push(
        "each twill run: SIGKILL, delete the VXLAN device (taking all entries), start twilld; the \
         batch reference gets a fresh namespace with the same device; runs alternate"
            .into(),
    );
    Ok(())
}
