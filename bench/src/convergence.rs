//! Convergence: with N simulated peers already programmed, the time from a new lease being
//! written to etcd until its route, neighbour and FDB entry are in the node's kernel (seen by
//! a netlink listener), and the same for a lease removal.

use std::time::{Duration, Instant};

use anyhow::Result;
use serde_json::json;

use crate::common::{self, ms, Ctx};
use crate::etcd::{entry_keys, peers, SimPeer, Writer};
use crate::nl::Listener;
use crate::refns::RefNs;
use crate::report::{Metric, ScenarioResult};

const STEP_TIMEOUT: Duration = Duration::from_secs(30);
/// Joins use indices far above the pre-populated peers.
const JOIN_BASE: u32 = 30_000;

pub fn run(ctx: &Ctx, res: &mut ScenarioResult) -> Result<()> {
    let (sizes, joins, removals): (Vec<u32>, u32, u32) = if ctx.quick {
        (vec![50], 10, 5)
    } else {
        (vec![1000, 5000], 100, 30)
    };
    res.config = json!({"peers_present": sizes, "joins": joins, "removals": removals});
    for n in sizes {
        let mut lab = ctx.lab(1)?;
        let writer = Writer::connect(&lab)?;
        let base = peers(0..n);
        writer.put_peers(&base)?;
        let listener = Listener::start(&lab.node_ns(1))?;
        let t0 = Instant::now();
        common::start_daemon(&mut lab, 1, &[])?;
        lab.wait_ready(1, common::READY_TIMEOUT)?;
        listener.wait_added(&entry_keys(&base), t0, Duration::from_secs(300))?;
        // Reference: the same table size, entries added by the tools themselves.
        let refns = RefNs::new(lab.prefix())?;
        refns.add_batch(&base)?;
        std::thread::sleep(Duration::from_millis(500));

        let (mut join, mut join_ref, mut put_ack) = (Vec::new(), Vec::new(), Vec::new());
        let joined = peers(JOIN_BASE..JOIN_BASE + joins);
        for (j, p) in joined.iter().enumerate() {
            let keys = p.entry_keys();
            let mut twill_step = || -> Result<()> {
                let t = Instant::now();
                writer.put_peers(std::slice::from_ref(p))?;
                put_ack.push(ms(t.elapsed()));
                let done = listener.wait_added(&keys, t, STEP_TIMEOUT)?;
                join.push(ms(done - t));
                Ok(())
            };
            let mut ref_step = || -> Result<()> {
                join_ref.push(ms(refns.add_batch(std::slice::from_ref(p))?));
                Ok(())
            };
            if j % 2 == 0 {
                twill_step()?;
                ref_step()?;
            } else {
                ref_step()?;
                twill_step()?;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let mut removal = Vec::new();
        for p in joined.iter().take(removals as usize) {
            let t = Instant::now();
            writer.delete_peers(std::slice::from_ref(p))?;
            let done = listener.wait_deleted(&p.entry_keys(), t, STEP_TIMEOUT)?;
            removal.push(ms(done - t));
            std::thread::sleep(Duration::from_millis(20));
        }
        let overruns = listener.overruns();
        let join_m = Metric::new(&format!("join, {n} peers present"), "ms", &join)
            .vs("ip+bridge -batch of the 3 entries", &join_ref)
            .note(format!(
                "lease put → all 3 entries notified by the kernel; etcd put acknowledged after \
                 median {:.2} ms; netlink overruns {overruns}",
                crate::stats::Stats::of(&put_ack).map_or(f64::NAN, |s| s.median)
            ));
        res.metrics.push(join_m);
        res.metrics.push(
            Metric::new(&format!("removal, {n} peers present"), "ms", &removal)
                .note("lease delete → all 3 entries' deletions notified"),
        );
        check_kernel(&lab, &base, &joined[removals as usize..])?;
        drop(refns);
        drop(listener);
        drop(writer);
        drop(lab);
    }
    res.notes.push(
        "the reference is the floor of programming one peer with the stock tools (2 execs, no \
         etcd in the path); twill's number includes the etcd write, the watch and the daemon"
            .into(),
    );
    Ok(())
}

/// The kernel really holds every peer still leased (a dump, once, after the timed part).
fn check_kernel(lab: &twill_tests::Lab, base: &[SimPeer], joined: &[SimPeer]) -> Result<()> {
    let e = lab.entries(1, common::DEV)?;
    let want = base.len() + joined.len();
    anyhow::ensure!(
        e.neigh.len() >= want && e.fdb.len() >= want && e.routes.len() >= want,
        "kernel holds {} neighbours, {} fdb, {} routes; expected {want} each",
        e.neigh.len(),
        e.fdb.len(),
        e.routes.len()
    );
    Ok(())
}
