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
        // Removals one at a time, first spaced 1 s apart (isolated), then 20 ms apart
        // (back to back, as when several nodes leave together).
        let mut removed = joined.iter();
        let mut removal_metrics = Vec::new();
        for (label, gap) in [("isolated", 1000u64), ("back-to-back", 20)] {
            let mut removal = Vec::new();
            // Per kind (neighbour, fdb, route): which of the three makes a removal slow.
            let mut by_kind: [Vec<f64>; 3] = Default::default();
            for p in removed.by_ref().take((removals / 2) as usize) {
                let t = Instant::now();
                writer.delete_peers(std::slice::from_ref(p))?;
                let keys = p.entry_keys();
                let done = listener.wait_deleted(&keys, t, STEP_TIMEOUT)?;
                removal.push(ms(done - t));
                for (k, key) in keys.iter().enumerate() {
                    if let Some(at) = listener.last(key, true) {
                        by_kind[k].push(ms(at - t));
                    }
                }
                std::thread::sleep(Duration::from_millis(gap));
            }
            removal_metrics.push(
                Metric::new(
                    &format!("removal {label}, {n} peers present"),
                    "ms",
                    &removal,
                )
                .note(format!(
                    "lease delete → all 3 deletions notified, removals {gap} ms apart; median \
                         per kind: neighbour {:.2} ms, fdb {:.2} ms, route {:.2} ms",
                    median(&by_kind[0]),
                    median(&by_kind[1]),
                    median(&by_kind[2])
                )),
            );
        }
        let remaining: Vec<SimPeer> = removed.copied().collect();
        let overruns = listener.overruns();
        let join_m = Metric::new(&format!("join, {n} peers present"), "ms", &join)
            .vs("ip+bridge -batch of the 3 entries", &join_ref)
            .note(format!(
                "lease put → all 3 entries notified by the kernel; etcd put acknowledged after \
                 median {:.2} ms; netlink overruns {overruns}",
                crate::stats::Stats::of(&put_ack).map_or(f64::NAN, |s| s.median)
            ));
        res.metrics.push(join_m);
        res.metrics.extend(removal_metrics);
        check_kernel(&lab, &base, &remaining)?;
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

fn median(v: &[f64]) -> f64 {
    crate::stats::Stats::of(v).map_or(f64::NAN, |s| s.median)
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
