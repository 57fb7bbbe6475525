//! Pods created through the `twill` plugin on three lab nodes reach each other across nodes,
//! by ping and TCP, and the receiver sees the sender's own pod IP (no NAT).

use std::time::Duration;

use anyhow::Result;
use twill_tests::{wait_until, Lab, LabOptions};

const CONFIG: &str = r#"{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan"}}"#;

#[test]
fn pods_on_three_nodes_reach_each_other_without_nat() -> Result<()> {
    let mut lab = Lab::new(LabOptions {
        nodes: 3,
        ..Default::default()
    })?;
    lab.put_config(CONFIG)?;
    for i in 1..=3 {
        lab.start_daemon(i)?;
    }
    for i in 1..=3 {
        lab.wait_ready(i, Duration::from_secs(30))?;
    }
    let mut pods = Vec::new();
    for i in 1..=3 {
        pods.push(lab.add_pod(i, "a")?);
    }
    // Each pod's address is in its node's subnet.
    for p in &pods {
        let subnet = lab.status(p.node)?["node"]["subnet"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        let (net, len) = subnet.split_once('/').expect("subnet with prefix");
        let net: std::net::Ipv4Addr = net.parse()?;
        let mask = u32::MAX << (32 - len.parse::<u32>()?);
        assert_eq!(
            u32::from(p.ip) & mask,
            u32::from(net),
            "pod {} has {} outside node subnet {subnet}",
            p.id,
            p.ip
        );
    }
    // Overlay routes are in place once every node sees two peers.
    wait_until(Duration::from_secs(20), || {
        (1..=3).all(|i| {
            lab.status(i)
                .map(|s| s["peers"].as_array().map_or(0, |a| a.len()) == 2)
                .unwrap_or(false)
        })
    })?;
    for a in &pods {
        for b in &pods {
            if a.id == b.id {
                continue;
            }
            wait_until(Duration::from_secs(10), || a.ping(b.ip)).map_err(|e| {
                e.context(format!(
                    "pod {} ({}) cannot ping pod {} ({})",
                    a.id, a.ip, b.id, b.ip
                ))
            })?;
            // TCP: the listener in b reports the source address it saw: a's own pod IP.
            let probe = twill_tests::tcp_probe(a, b, 7777, Duration::from_secs(5))?;
            assert_eq!(
                probe.source_seen, a.ip,
                "listener in pod {} saw {} instead of pod {}'s IP {}: NAT in the path",
                b.id, probe.source_seen, a.id, a.ip
            );
        }
    }
    for p in &pods {
        lab.del_pod(p)?;
    }
    Ok(())
}
