//! Test support: carrying a flow through the nodes it crosses, as the kernel would.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::net::IpAddr;

use netpol::model::{Cluster, Family};
use netpol::oracle::{Endpoint, Flow};
use netpol::program::{compile, interpret, CtState, NodeProgram, Outcome, Packet};

enum End<'a> {
    /// A non-hostNetwork pod on a node.
    Pod {
        node: &'a str,
        ip: IpAddr,
    },
    /// A node's own stack (or a hostNetwork pod).
    Host {
        node: &'a str,
        ip: IpAddr,
    },
    External(IpAddr),
}

impl End<'_> {
    fn ip(&self) -> IpAddr {
        match self {
            End::Pod { ip, .. } | End::Host { ip, .. } | End::External(ip) => *ip,
        }
    }
    fn node(&self) -> Option<&str> {
        match self {
            End::Pod { node, .. } | End::Host { node, .. } => Some(node),
            End::External(_) => None,
        }
    }
}

fn end<'a>(c: &'a Cluster, e: &'a Endpoint, family: Family) -> Option<End<'a>> {
    Some(match e {
        Endpoint::Pod(k) => {
            let p = c.pod(k)?;
            let node = p.node.as_deref()?;
            let ip = p.ip(family)?;
            if p.host_network {
                End::Host { node, ip }
            } else {
                End::Pod { node, ip }
            }
        }
        Endpoint::Node { name, ip } => End::Host {
            node: name,
            ip: *ip,
        },
        Endpoint::External(ip) => End::External(*ip),
    })
}

/// The (node, packet) pairs a new flow's first packet meets: the source's node (forward, or input
/// when addressed to that node, or output when the node sends it), then the destination's node
/// when it is another one (forward to a pod, input to the node itself).
pub fn route(c: &Cluster, f: &Flow) -> Vec<(String, Packet)> {
    let (Some(src), Some(dst)) = (end(c, &f.src, f.family), end(c, &f.dst, f.family)) else {
        panic!("flow {f} does not resolve");
    };
    let pkt = |from_host, to_host| Packet {
        src: src.ip(),
        dst: dst.ip(),
        transport: f.transport,
        ct: CtState::New,
        from_host,
        to_host,
    };
    let mut hops = Vec::new();
    let to_host_at = |n: &str| matches!(dst, End::Host { node, .. } if node == n);
    match &src {
        End::Pod { node, .. } => hops.push((node.to_string(), pkt(false, to_host_at(node)))),
        End::Host { node, .. } => hops.push((node.to_string(), pkt(true, to_host_at(node)))),
        End::External(_) => {}
    }
    match &dst {
        End::Pod { node, .. } if src.node() != Some(node) => {
            hops.push((node.to_string(), pkt(false, false)))
        }
        End::Host { node, .. } if src.node() != Some(node) => {
            hops.push((node.to_string(), pkt(false, true)))
        }
        _ => {}
    }
    hops
}

/// Every node's program.
pub fn programs<'a>(
    c: &Cluster,
    nodes: impl IntoIterator<Item = &'a str>,
) -> BTreeMap<String, NodeProgram> {
    nodes
        .into_iter()
        .map(|n| {
            let p = compile(c, n);
            p.check()
                .unwrap_or_else(|e| panic!("program of {n} is inconsistent: {e}\n{p}"));
            (n.to_string(), p)
        })
        .collect()
}

/// Whether the dataplane lets the flow through, and what each hop did.
pub fn dataplane(
    c: &Cluster,
    progs: &BTreeMap<String, NodeProgram>,
    f: &Flow,
) -> (bool, Vec<(String, Outcome)>) {
    let empty = NodeProgram::default();
    let outcomes: Vec<(String, Outcome)> = route(c, f)
        .into_iter()
        .map(|(node, pkt)| {
            let prog = progs.get(&node).unwrap_or(&empty);
            (node, interpret(prog, &pkt))
        })
        .collect();
    (outcomes.iter().all(|(_, o)| o.accepted), outcomes)
}
