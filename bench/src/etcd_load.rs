//! etcd load: gRPC requests per node per hour, read from etcd's own counters before and after,
//! in steady state and during a join storm of simulated nodes written in bulk.

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use serde_json::json;
use twill_tests::wait_until;

use crate::common::{self, Ctx};
use crate::etcd::{peers, EtcdCounters, Writer};
use crate::report::{Metric, ScenarioResult};

/// Every Kubernetes node already renews its Lease object every 10 s: the load a cluster
/// accepts per node as a matter of course (published default, not measured here).
const KUBELET_LEASE_PER_HOUR: f64 = 360.0;

pub fn run(ctx: &Ctx, res: &mut ScenarioResult) -> Result<()> {
    let (nodes, window, storm) = if ctx.quick {
        (2usize, Duration::from_secs(5), 50u32)
    } else {
        (3, Duration::from_secs(120), 1000)
    };
    res.config =
        json!({"daemons": nodes, "steady_window_s": window.as_secs_f64(), "storm_joins": storm});
    let mut lab = ctx.lab(nodes)?;
    for i in 1..=nodes {
        common::start_daemon(&mut lab, i, &[])?;
    }
    for i in 1..=nodes {
        lab.wait_ready(i, common::READY_TIMEOUT)?;
    }
    std::thread::sleep(Duration::from_secs(3));

    let c0 = EtcdCounters::read(&lab)?;
    let t0 = Instant::now();
    std::thread::sleep(window);
    let c1 = EtcdCounters::read(&lab)?;
    let secs = t0.elapsed().as_secs_f64();
    let (steady, split) = c1.delta(&c0);
    let per_node_hour = steady / nodes as f64 / secs * 3600.0;
    res.metrics.push(
        Metric::new("steady state", "requests/node/h", &[per_node_hour])
            .vs_value(
                "kubelet node Lease renewals (every 10 s)",
                KUBELET_LEASE_PER_HOUR,
            )
            .note(format!(
                "{steady} gRPC messages in {secs:.0} s from {nodes} daemons; by method: {split:?}"
            )),
    );

    let writer = Writer::connect(&lab)?;
    let joined = peers(10_000..10_000 + storm);
    let c2 = EtcdCounters::read(&lab)?;
    let t2 = Instant::now();
    let writes = writer.put_peers(&joined)?;
    let want = (nodes - 1) as f64 + storm as f64;
    wait_until(Duration::from_secs(300), || {
        (1..=nodes).all(|i| common::metric(&lab, i, "twill_peers").is_ok_and(|p| p >= want))
    })
    .context("not every node saw the whole storm")?;
    let storm_secs = t2.elapsed().as_secs_f64();
    let c3 = EtcdCounters::read(&lab)?;
    let (total, split) = c3.delta(&c2);
    let per_node = (total - writes as f64) / nodes as f64;
    res.metrics.push(
        Metric::new(
            &format!("{storm}-node join storm"),
            "requests/node",
            &[per_node],
        )
        .note(format!(
            "{total} gRPC messages during the storm ({storm_secs:.1} s until every node had \
                 all peers), minus the {writes} bulk writes; per join per node: {:.4}; by method: \
                 {split:?}",
            per_node / storm as f64
        )),
    );
    res.metrics.push(Metric::new(
        "during the join storm",
        "requests/node/h",
        &[per_node / storm_secs * 3600.0],
    ));
    res.notes.push(
        "counted: etcd's grpc_server_msg_received_total (every unary request and every stream \
         message: watch creation, lease keep-alive); daemons run with production flags \
         (24 h lease, 30 s resync)"
            .into(),
    );
    Ok(())
}
