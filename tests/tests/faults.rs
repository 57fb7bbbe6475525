//! Faults with traffic flowing: a UDP stream of sequence-numbered datagrams at 200/s from a pod
//! on node 1 to a pod on node 2 runs across each fault, and every datagram must arrive; the
//! kernel entries on the VXLAN device must not change on any node that stayed up, nor may
//! twilld's own counters of entries added and removed move there. A restarted twilld must find
//! everything in place too (its new process adds and removes nothing).
//!
//! flannel's record in the same situations is in BENCHMARKS.md ("Faults"), where
//! `twill-bench faults` runs the same faults with production settings (30 s resync). The lab
//! runs twilld with its test flags (2 s resync): a reconcile that would undo or redo entries
//! gets several chances to show, and etcd's 30 s down is 15 of them.

use std::time::Duration;

use anyhow::{ensure, Context, Result};
use twill_tests::faults::{Fault, FaultLab, FaultRun, Plan, DEV};
use twill_tests::{wait_until, LabOptions, StreamOptions, UdpStream};

fn lab() -> Result<FaultLab> {
    FaultLab::new(
        LabOptions {
            nodes: 3,
            ..Default::default()
        },
        &[],
    )
}

/// Every datagram arrived, and nothing churned anywhere.
fn assert_clean(run: &FaultRun) -> Result<()> {
    eprintln!("{}", run.summary());
    let s = &run.stream;
    ensure!(
        !s.ran_out,
        "the stream ended before the fault did:\n{}",
        run.summary()
    );
    ensure!(
        s.sent >= 200,
        "the stream barely ran ({} datagrams):\n{}",
        s.sent,
        run.summary()
    );
    ensure!(
        s.lost.is_empty() && s.send_errors == 0,
        "datagrams lost across {}:\n{}",
        run.description,
        run.summary()
    );
    for n in &run.nodes {
        ensure!(
            n.churn() == 0,
            "node {} churned across {}:\n{}",
            n.node,
            run.description,
            run.summary()
        );
        ensure!(
            n.entries == 6,
            "node {} had {} entries, not 3 per peer",
            n.node,
            n.entries
        );
    }
    Ok(())
}

/// Each node in turn: the stream's two ends and the third node, which carries none of it but
/// whose restart must not disturb the others' entries for it.
#[test]
fn kill_9_and_restart_of_twilld_on_each_node_loses_nothing() -> Result<()> {
    let mut fl = lab()?;
    for node in [1, 2, 3] {
        let run = fl.run(&Fault::KillRestart { node }, &Plan::default())?;
        assert_clean(&run)?;
        ensure!(run.nodes[node - 1].restarted);
    }
    Ok(())
}

#[test]
fn etcd_down_and_back_loses_nothing() -> Result<()> {
    let mut fl = lab()?;
    let run = fl.run(
        &Fault::EtcdDown {
            down: Duration::from_secs(30),
        },
        &Plan::default(),
    )?;
    assert_clean(&run)
}

#[test]
fn etcd_restarted_with_its_data_loses_nothing() -> Result<()> {
    let mut fl = lab()?;
    let run = fl.run(&Fault::EtcdRestart, &Plan::default())?;
    assert_clean(&run)
}

/// The paused node's watch falls behind (etcd counts it slow), the history it missed is
/// compacted, and on resuming it is told so and re-lists (the fault checks both): the re-list
/// must be diffed against what the kernel has, not rebuilt.
#[test]
fn compaction_while_a_node_is_behind_loses_nothing() -> Result<()> {
    let mut fl = lab()?;
    let run = fl.run(&Fault::CompactionBehind { node: 1 }, &Plan::default())?;
    assert_clean(&run)
}

/// flannel #1070/#1348: a NIC flap loses routes. Node 3 carries none of the stream, but every
/// node has entries for it; its flaps must disturb nothing on the others, nor on itself.
#[test]
fn underlay_flaps_of_a_third_node_lose_nothing() -> Result<()> {
    let mut fl = lab()?;
    let run = fl.run(
        &Fault::UnderlayFlap {
            node: 3,
            flaps: 4,
            down: Duration::from_secs(1),
            up: Duration::from_secs(1),
        },
        &Plan::default(),
    )?;
    assert_clean(&run)
}

/// The measurement itself can fail: with twilld on node 1 paused (nothing repairs meanwhile),
/// its route to node 2's pods is deleted for half a second. The stream must count the datagrams
/// due in that time as lost, in one run, with a gap about that long; once twilld runs again it
/// puts the route back, and its counter of entries added moves.
#[test]
fn a_real_outage_is_counted() -> Result<()> {
    let mut fl = lab()?;
    let subnet = fl.lab.status(2)?["node"]["subnet"]
        .as_str()
        .map(str::to_owned)
        .context("node 2's subnet")?;
    let added = |fl: &FaultLab| -> Result<f64> {
        fl.lab
            .metric(1, "twill_kernel_entries_added_total")?
            .context("no added counter")
    };
    let added_before = added(&fl)?;
    let entries_before = fl.lab.entries(1, DEV)?;
    let stream = UdpStream::start(&fl.a, &fl.b, StreamOptions::default())?;
    stream.wait_flowing(Duration::from_secs(10))?;
    std::thread::sleep(Duration::from_millis(500));
    fl.lab.pause_daemon(1)?;
    let cut_at = std::time::Instant::now();
    let cut = fl
        .lab
        .exec_ok(1, &["ip", "route", "del", &subnet, "dev", DEV]);
    std::thread::sleep(Duration::from_millis(500));
    fl.lab.resume_daemon(1)?;
    cut?;
    wait_until(Duration::from_secs(30), || {
        fl.lab.entries(1, DEV).is_ok_and(|e| e == entries_before)
    })
    .context("twilld did not put the route back")?;
    // The outage lasted at most this long (the route was back by then), however slowly a
    // loaded machine resumed and repaired.
    let outage = cut_at.elapsed();
    std::thread::sleep(Duration::from_secs(1));
    let r = stream.finish()?;
    eprintln!("{} (outage at most {outage:?})", r.summary());
    // At 200/s, 500 ms without the route is about 100 datagrams (node 1 hands them to its
    // default route, which leads nowhere), plus the moment twilld takes to repair it.
    let most = (outage.as_secs_f64() * f64::from(StreamOptions::default().rate)) as u64 + 40;
    ensure!(
        (80..=most).contains(&r.lost_count()),
        "the outage was not counted (at most {most} due in {outage:?}): {}",
        r.summary()
    );
    let (first, last) = (r.lost[0], r.lost[r.lost.len() - 1]);
    ensure!(
        last - first + 1 == r.lost_count(),
        "one outage, one run of lost datagrams: {}",
        r.summary()
    );
    ensure!(r.longest_gap_ms >= 400.0, "gap not seen: {}", r.summary());
    ensure!(
        added(&fl)? > added_before,
        "twilld's added counter did not move"
    );
    Ok(())
}
