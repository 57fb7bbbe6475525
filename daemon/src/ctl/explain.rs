//! `twillctl explain`: the engine's verdict on one connection, in words, and what the kernel
//! program twilld builds for each node on the way does with its first packet (the two agree by
//! construction and by test; a disagreement is printed loudly).

use std::fmt::Write;
use std::net::IpAddr;

use anyhow::{bail, Result};
use netpol::model::{Cluster, Family, PodKey, Protocol, Transport};
use netpol::oracle::{evaluate, explain as words, Endpoint, Flow};
use netpol::program::{compile, interpret, CtState, Packet, Step};

fn endpoint(c: &Cluster, s: &str) -> Result<(Endpoint, Option<IpAddr>)> {
    if let Ok(ip) = s.parse::<IpAddr>() {
        return Ok(match c.live_pod_with_ip(ip) {
            Some((k, _)) => (Endpoint::Pod(k.clone()), Some(ip)),
            None => (Endpoint::External(ip), Some(ip)),
        });
    }
    match s.split_once('/') {
        Some((ns, name)) if !ns.is_empty() && !name.is_empty() => {
            let k = PodKey::new(ns, name);
            if c.pod(&k).is_none() {
                bail!("no pod {k} in etcd (<prefix>/pods/{ns}/{name})");
            }
            Ok((Endpoint::Pod(k), None))
        }
        _ => bail!("{s:?}: expected <namespace>/<pod> or an IP address"),
    }
}

pub fn explain(c: &Cluster, from: &str, to: &str, port: u16, protocol: &str) -> Result<String> {
    let proto = match protocol.to_ascii_uppercase().as_str() {
        "TCP" => Protocol::Tcp,
        "UDP" => Protocol::Udp,
        "SCTP" => Protocol::Sctp,
        other => bail!("protocol {other:?}: TCP, UDP or SCTP"),
    };
    let (src, src_ip) = endpoint(c, from)?;
    let (dst, dst_ip) = endpoint(c, to)?;
    let family = match src_ip.or(dst_ip) {
        Some(IpAddr::V6(_)) => Family::V6,
        _ => Family::V4,
    };
    let flow = Flow {
        src: src.clone(),
        dst: dst.clone(),
        family,
        transport: Transport::on(proto, port),
    };
    let verdict = evaluate(c, &flow).map_err(|e| anyhow::anyhow!("{e}"))?;
    let mut out = words(&verdict);
    if !out.ends_with('\n') {
        out.push('\n');
    }
    // The kernel's view: the first packet through the sender's node (egress) and the
    // receiver's node (ingress).
    let ip_of = |e: &Endpoint, known: Option<IpAddr>| -> Option<IpAddr> {
        match e {
            Endpoint::Pod(k) => c.pod(k)?.ip(family),
            _ => known,
        }
    };
    let node_of = |e: &Endpoint| match e {
        Endpoint::Pod(k) => c.pod(k).and_then(|p| p.node.clone()),
        _ => None,
    };
    let (Some(s), Some(d)) = (ip_of(&src, src_ip), ip_of(&dst, dst_ip)) else {
        return Ok(out);
    };
    let pkt = Packet {
        src: s,
        dst: d,
        transport: flow.transport,
        ct: CtState::New,
        from_host: false,
        to_host: false,
    };
    let mut kernel_allows = true;
    let mut seen = Vec::new();
    for (node, dir) in [(node_of(&src), "egress"), (node_of(&dst), "ingress")] {
        let Some(node) = node else { continue };
        let o = interpret(&compile(c, &node), &pkt);
        let step = if dir == "egress" { o.egress } else { o.ingress };
        let text = match &step {
            Step::Accepted { chain, rule } => {
                format!("accepted by chain {chain}, rule {rule}")
            }
            Step::Dropped { group } => {
                kernel_allows = false;
                format!("dropped at the end of chain {group}")
            }
            Step::NotInMap => "not isolated (no verdict map entry)".into(),
            Step::NeighbourDiscovery => "neighbour discovery: always accepted".into(),
            Step::Established | Step::NotRun => continue,
        };
        if !seen.contains(&(node.clone(), dir)) {
            let _ = writeln!(out, "kernel, node {node}, {dir}: {text}");
            seen.push((node, dir));
        }
    }
    if kernel_allows != verdict.allowed() {
        let _ = writeln!(
            out,
            "WARNING: the kernel program and the reference semantics disagree: please report"
        );
    }
    Ok(out)
}
