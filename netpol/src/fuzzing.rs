//! Fuzz harness for the engine, shared by the cargo-fuzz target `netpol` (`fuzz/`) and the
//! regression test that replays its corpus (`netpol/tests/fuzz_corpus.rs`). Not an API.

use std::collections::BTreeMap;

use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::Value;

use crate::api::{Namespace, NetworkPolicy, Pod};
use crate::model::{Cluster, Family, Transport};
use crate::oracle::{evaluate, Endpoint, Flow};
use crate::program::{compile, diff, interpret, CtState, NodeProgram, Packet};
use crate::validate::{validate_namespace, validate_network_policy, validate_pod};

/// Objects looked at per input: compiling after each one is quadratic.
const MAX_OBJECTS: usize = 24;
/// Pods whose flows the oracle and the programs are asked about.
const MAX_FLOW_PODS: usize = 6;

/// `data` is JSON text: objects as the API serialises them (`kind` NetworkPolicy, Namespace or
/// Pod), one after another, or in an array, or in a `List`'s `items`. Each goes through
/// validation into the cluster as twilld's sources put it there; after each, every node's
/// program is compiled and checked. Must not panic; asserts what the engine promises.
pub fn objects(data: &[u8]) {
    let mut objects = Vec::new();
    for v in serde_json::Deserializer::from_slice(data).into_iter::<Value>() {
        let Ok(v) = v else { break };
        match v {
            Value::Array(items) => objects.extend(items),
            Value::Object(ref m) if m.get("items").is_some_and(Value::is_array) => {
                if let Some(Value::Array(items)) = m.get("items") {
                    objects.extend(items.iter().cloned());
                }
            }
            other => objects.push(other),
        }
    }
    objects.truncate(MAX_OBJECTS);

    let mut c = Cluster::new();
    // What each node has programmed; a node starts with nothing. One with no pods compiles
    // too (every node runs a program).
    let empty = |node: &str| NodeProgram {
        node: node.into(),
        ..Default::default()
    };
    let mut programs = BTreeMap::from([("n1".to_string(), empty("n1"))]);
    for o in objects {
        match o.get("kind").and_then(Value::as_str) {
            Some("NetworkPolicy") => {
                let Some(p) = decode::<NetworkPolicy>(o) else {
                    continue;
                };
                let valid = validate_network_policy(&p).is_ok();
                assert_eq!(
                    c.upsert_policy(p).is_ok(),
                    valid,
                    "upsert disagrees with validate"
                );
            }
            Some("Namespace") => {
                let Some(ns) = decode::<Namespace>(o) else {
                    continue;
                };
                let valid = validate_namespace(&ns).is_ok();
                assert_eq!(c.upsert_namespace(&ns).is_ok(), valid);
            }
            Some("Pod") => {
                let Some(pod) = decode::<Pod>(o) else {
                    continue;
                };
                let valid = validate_pod(&pod).is_ok();
                assert_eq!(c.upsert_pod(&pod).is_ok(), valid);
                if let Some(node) = pod.spec.node_name.filter(|_| valid) {
                    programs.entry(node.clone()).or_insert_with(|| empty(&node));
                }
            }
            _ => continue,
        }
        for (node, old) in programs.iter_mut() {
            let new = compile(&c, node);
            if let Err(e) = new.check() {
                panic!("the program of {node} is inconsistent: {e}\n{new}");
            }
            assert_eq!(compile(&c, node), new, "compiling is not deterministic");
            // The daemon moves the kernel from one program to the next by the diff alone.
            assert_eq!(diff(old, &new).apply(old), new, "the diff does not replay");
            assert!(diff(&new, &new).is_empty());
            *old = new;
        }
    }
    flows(&c, &programs);
}

/// An object as twilld reads it from etcd (bytes), checked to survive the policy cache
/// (written back as JSON and read again at the next start).
fn decode<T: DeserializeOwned + Serialize + PartialEq + std::fmt::Debug>(v: Value) -> Option<T> {
    let bytes = serde_json::to_vec(&v).expect("a JSON value serialises");
    let obj: T = serde_json::from_slice(&bytes).ok()?;
    let again: T = serde_json::from_slice(&serde_json::to_vec(&obj).expect("serialises"))
        .expect("a decoded object decodes again");
    assert_eq!(again, obj, "the object changes through the policy cache");
    Some(obj)
}

/// The oracle and each program's interpreter answer for flows between the first pods, whatever
/// the cluster holds (no claim that they agree: hostile clusters share addresses).
fn flows(c: &Cluster, programs: &BTreeMap<String, NodeProgram>) {
    let pods: Vec<_> = c
        .pods()
        .filter(|(_, p)| !p.ips.is_empty())
        .take(MAX_FLOW_PODS)
        .collect();
    let transports = [
        Transport::Tcp(80),
        Transport::Udp(53),
        Transport::Sctp(81),
        Transport::Icmp { kind: 8 },
    ];
    for (sk, sp) in &pods {
        for (dk, dp) in &pods {
            for family in [Family::V4, Family::V6] {
                let (Some(src), Some(dst)) = (sp.ip(family), dp.ip(family)) else {
                    continue;
                };
                for transport in transports {
                    let flow = Flow {
                        src: Endpoint::Pod((*sk).clone()),
                        dst: Endpoint::Pod((*dk).clone()),
                        family,
                        transport,
                    };
                    let _ = evaluate(c, &flow);
                    for prog in programs.values() {
                        let pkt = Packet {
                            src,
                            dst,
                            transport,
                            ct: CtState::New,
                            from_host: false,
                            to_host: false,
                        };
                        let _ = interpret(prog, &pkt);
                    }
                }
            }
        }
    }
}
