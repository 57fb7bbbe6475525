//! Faults with traffic flowing: the lab test's faults (`twill_tests::faults`) with production
//! settings (30 s resync, 24 h lease) and full durations (etcd down 30 s), each with a UDP
//! stream at 200 datagrams/s from a pod on node 1 to a pod on node 2 across it. Per fault:
//! datagrams sent and lost, the longest gap at the receiver, and the kernel entries churned on
//! the nodes that stayed up (entries changed on the VXLAN device plus twilld's own counts of
//! entries added and removed).

use std::time::Duration;

use anyhow::Result;
use serde_json::json;
use twill_tests::faults::{Fault, FaultLab, FaultRun, Plan};
use twill_tests::{LabOptions, StreamOptions};

use crate::common::{Ctx, DAEMON_FLAGS};
use crate::report::{Metric, ScenarioResult};

struct Sizes {
    etcd_down: Duration,
    flaps: usize,
    flap_down: Duration,
    flap_up: Duration,
    lead: Duration,
    tail: Duration,
}

pub fn run(ctx: &Ctx, res: &mut ScenarioResult) -> Result<()> {
    let s = if ctx.quick {
        Sizes {
            etcd_down: Duration::from_secs(2),
            flaps: 2,
            flap_down: Duration::from_millis(500),
            flap_up: Duration::from_millis(500),
            lead: Duration::from_millis(500),
            tail: Duration::from_secs(1),
        }
    } else {
        Sizes {
            etcd_down: Duration::from_secs(30),
            flaps: 6,
            flap_down: Duration::from_secs(2),
            flap_up: Duration::from_secs(3),
            lead: Duration::from_secs(2),
            tail: Duration::from_secs(10),
        }
    };
    let plan = Plan {
        stream: StreamOptions {
            rate: 200,
            duration: Duration::from_secs(300),
            ..Default::default()
        },
        lead: s.lead,
        tail: s.tail,
        recover_timeout: Duration::from_secs(120),
    };
    let faults = [
        Fault::KillRestart { node: 1 },
        Fault::KillRestart { node: 2 },
        Fault::KillRestart { node: 3 },
        Fault::EtcdDown { down: s.etcd_down },
        Fault::EtcdRestart,
        Fault::CompactionBehind { node: 1 },
        Fault::UnderlayFlap {
            node: 3,
            flaps: s.flaps,
            down: s.flap_down,
            up: s.flap_up,
        },
    ];
    res.config = json!({
        "rate_per_s": plan.stream.rate,
        "datagram_bytes": plan.stream.payload,
        "lead_s": plan.lead.as_secs_f64(),
        "tail_s": plan.tail.as_secs_f64(),
        "faults": faults.iter().map(Fault::describe).collect::<Vec<_>>(),
        "daemon_flags": DAEMON_FLAGS,
    });
    let mut fl = FaultLab::new(
        LabOptions {
            nodes: 3,
            bin_dir: Some(ctx.bin_dir.clone()),
            ..Default::default()
        },
        DAEMON_FLAGS,
    )?;
    for f in &faults {
        let run = fl.run(f, &plan)?;
        eprintln!("twill-bench: faults: {}", run.summary().trim_end());
        push(res, &run);
    }
    res.notes.push(
        "the stream is UDP with sequence numbers from a pod on node 1 to a pod on node 2 \
         (through VXLAN); lost = sequence numbers that never arrived; longest gap = longest time \
         the receiver went without a datagram while they were due (5 ms is the spacing); churn = \
         entries on twill.1 that differ before and after plus twilld's added/removed counters, \
         over the nodes that stayed up (a restarted node's new process is reported apart)"
            .into(),
    );
    Ok(())
}

fn push(res: &mut ScenarioResult, run: &FaultRun) {
    let s = &run.stream;
    let name = |what: &str| format!("{}: {what}", run.description);
    // Datagrams whose send failed never arrived either: they are in `lost`.
    let lost = s.lost_count();
    res.metrics.push(
        Metric::new(&name("datagrams sent"), "datagrams", &[s.sent as f64]).note(format!(
            "{:.1} s of stream, the fault took {:.1} s; {}",
            s.seconds,
            run.fault_seconds,
            run.notes.join("; ")
        )),
    );
    res.metrics.push(
        Metric::new(&name("lost"), "datagrams", &[lost as f64])
            .target("0", Some(lost == 0))
            .note(format!(
                "{} received, {} duplicates, {} reordered, receive buffer errors {}",
                s.received, s.duplicates, s.reordered, s.rcvbuf_errors
            )),
    );
    res.metrics.push(
        Metric::new(&name("longest gap"), "ms", &[s.longest_gap_ms]).note(format!(
            "the sender's own longest pause {:.1} ms; max one-way latency {:.2} ms",
            s.longest_send_gap_ms, s.max_latency_ms
        )),
    );
    let churn = run.churn_stayed_up();
    let per_node: Vec<String> = run
        .nodes
        .iter()
        .map(|n| {
            format!(
                "node {}{}: {} of {} entries changed, twilld +{} -{}",
                n.node,
                if n.restarted { " (restarted)" } else { "" },
                n.kernel_changed,
                n.entries,
                n.added,
                n.removed
            )
        })
        .collect();
    res.metrics.push(
        Metric::new(
            &name("churn, nodes that stayed up"),
            "entries",
            &[churn as f64],
        )
        .target("0", Some(churn == 0))
        .note(per_node.join("; ")),
    );
    if run.nodes.iter().any(|n| n.restarted) {
        let c = run.churn_restarted();
        res.metrics.push(
            Metric::new(&name("churn, restarted node"), "entries", &[c as f64])
                .target("0", Some(c == 0)),
        );
    }
}
