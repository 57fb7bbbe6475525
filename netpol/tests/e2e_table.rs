//! The upstream e2e table (T1–T42, U1–U3, S1–S3) over the 3×3 world, checked on the oracle and on
//! every node's compiled program, in IPv4, IPv6 and dual-stack clusters.

mod common;

use std::net::IpAddr;

use netpol::fixtures::{
    self, e2e_cases, e2e_cluster, e2e_world, pairs, NAMESPACES, NODES, POD_NAMES,
};
use netpol::model::{Cluster, Family, PodKey, Transport};
use netpol::oracle::{evaluate, explain, Endpoint, Flow};
use netpol::program::diff;

/// 10.244.<node>.<n> and fd00:10:244::<node>:<n>: all inside e2e's "large CIDR" (0.0.0.0/4,
/// fd00:10:244::/64), as T35/T36 require.
fn ip(k: &PodKey, family: Family) -> IpAddr {
    let world = e2e_world();
    let p = world.iter().find(|p| p.key == *k).expect("world pod");
    let node = 1 + NODES.iter().position(|n| *n == p.node).unwrap();
    let n = 10 * (1 + NAMESPACES.iter().position(|x| *x == k.namespace).unwrap())
        + POD_NAMES.iter().position(|x| *x == k.name).unwrap();
    match family {
        Family::V4 => format!("10.244.{node}.{n}").parse().unwrap(),
        Family::V6 => format!("fd00:10:244::{node}:{n}").parse().unwrap(),
    }
}

/// Runs the whole table with pods holding addresses of `families`; placeholders use the first.
fn run(families: &[Family]) {
    let mut failures = Vec::new();
    let mut cells = 0;
    for case in e2e_cases() {
        let mut c: Cluster = e2e_cluster(|k| families.iter().map(|f| ip(k, *f)).collect());
        let mut progs = common::programs(&c, NODES);
        for (si, step) in case.steps.iter().enumerate() {
            for a in &step.actions {
                fixtures::apply(&mut c, a, |k| ip(k, families[0])).unwrap();
            }
            let next = common::programs(&c, NODES);
            for (node, old) in &progs {
                let d = diff(old, &next[node]);
                assert_eq!(
                    d.apply(old),
                    next[node],
                    "{} step {si}: diff/apply on {node}",
                    case.id
                );
            }
            progs = next;
            for check in &step.checks {
                // An ipBlock naming pod addresses covers the family they were taken from.
                let families = if case.uses_addresses() {
                    &families[..1]
                } else {
                    families
                };
                for family in families {
                    for (from, to) in pairs() {
                        cells += 1;
                        let want = check.expected(&from, &to);
                        let flow = Flow {
                            src: Endpoint::Pod(from.clone()),
                            dst: Endpoint::Pod(to.clone()),
                            family: *family,
                            transport: Transport::on(check.protocol, check.port),
                        };
                        let verdict = evaluate(&c, &flow).unwrap();
                        let (kernel, hops) = common::dataplane(&c, &progs, &flow);
                        if verdict.allowed() != want || kernel != want {
                            failures.push(format!(
                                "{} step {si} {}/{} {from} -> {to} ({family:?}): want {want}, oracle {}, program {kernel}\n{}hops: {hops:?}",
                                case.id, check.protocol, check.port, verdict.allowed(), explain(&verdict)
                            ));
                        }
                    }
                }
            }
        }
    }
    eprintln!(
        "{families:?}: {cells} (from, to, protocol/port) cells checked on oracle and programs"
    );
    assert!(cells > 5000, "the table ran ({cells} cells)");
    assert!(
        failures.is_empty(),
        "{} failures:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[test]
fn e2e_table_ipv4() {
    run(&[Family::V4]);
}

#[test]
fn e2e_table_ipv6() {
    run(&[Family::V6]);
}

#[test]
fn e2e_table_dual_stack() {
    run(&[Family::V4, Family::V6]);
}

/// The table itself must discriminate: under no policy at all most checks would fail.
#[test]
fn e2e_table_is_not_vacuous() {
    let mut denying_checks = 0;
    let mut total = 0;
    for case in e2e_cases() {
        for step in &case.steps {
            for check in &step.checks {
                total += 1;
                if pairs().iter().any(|(a, b)| !check.expected(a, b)) {
                    denying_checks += 1;
                }
            }
        }
    }
    assert!(
        denying_checks * 10 >= total * 8,
        "{denying_checks} of {total} checks deny something"
    );
}
