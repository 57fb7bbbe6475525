//! API-server-like validation of the objects the engine accepts. Every error names its field path
//! (`spec.ingress[0].from[1].ipBlock.except[0]`) and all errors are returned, not just the first,
//! so an operator fixing an etcd-mode policy sees everything at once.
//!
//! The rules follow Kubernetes' `ValidateNetworkPolicy`, `ValidateLabelSelector` and the name and
//! label syntax checks of apimachinery.

use std::collections::BTreeSet;
use std::fmt;
use std::net::IpAddr;

use ipnet::IpNet;

use crate::api::{
    IntOrString, IpBlock, LabelSelector, Labels, Namespace, NetworkPolicy, NetworkPolicyPeer,
    NetworkPolicyPort, ObjectMeta, Pod,
};
use crate::model::{ContainerPort, PodKey, PodRecord};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ValidationError {
    /// e.g. `spec.ingress[0].ports[1].endPort`.
    pub field: String,
    pub message: String,
}

impl fmt::Display for ValidationError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.field, self.message)
    }
}

/// Every problem found in one object.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}", render(.0))]
pub struct ValidationErrors(pub Vec<ValidationError>);

fn render(errs: &[ValidationError]) -> String {
    errs.iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("; ")
}

impl ValidationErrors {
    /// The error for `field`, if any (tests and tooling).
    pub fn for_field(&self, field: &str) -> Option<&ValidationError> {
        self.0.iter().find(|e| e.field == field)
    }
}

/// Collects errors while walking an object.
#[derive(Default)]
struct Errs(Vec<ValidationError>);

impl Errs {
    fn add(&mut self, field: impl Into<String>, message: impl Into<String>) {
        self.0.push(ValidationError {
            field: field.into(),
            message: message.into(),
        });
    }

    fn into_result(self) -> Result<(), ValidationErrors> {
        if self.0.is_empty() {
            Ok(())
        } else {
            Err(ValidationErrors(self.0))
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Objects

pub fn validate_network_policy(p: &NetworkPolicy) -> Result<(), ValidationErrors> {
    let mut e = Errs::default();
    meta(&mut e, &p.metadata);
    let spec = &p.spec;
    selector(&mut e, "spec.podSelector", &spec.pod_selector);
    for (i, rule) in spec.ingress.iter().flatten().enumerate() {
        let path = format!("spec.ingress[{i}]");
        for (j, peer) in rule.from.iter().flatten().enumerate() {
            policy_peer(&mut e, &format!("{path}.from[{j}]"), peer);
        }
        for (j, port) in rule.ports.iter().flatten().enumerate() {
            policy_port(&mut e, &format!("{path}.ports[{j}]"), port);
        }
    }
    for (i, rule) in spec.egress.iter().flatten().enumerate() {
        let path = format!("spec.egress[{i}]");
        for (j, peer) in rule.to.iter().flatten().enumerate() {
            policy_peer(&mut e, &format!("{path}.to[{j}]"), peer);
        }
        for (j, port) in rule.ports.iter().flatten().enumerate() {
            policy_port(&mut e, &format!("{path}.ports[{j}]"), port);
        }
    }
    if let Some(types) = &spec.policy_types {
        if types.len() > 2 {
            e.add(
                "spec.policyTypes",
                "may not specify more than two policyTypes",
            );
        } else {
            for (i, t) in types.iter().enumerate() {
                if t != "Ingress" && t != "Egress" {
                    e.add(
                        format!("spec.policyTypes[{i}]"),
                        format!("{t:?} is not supported: must be Ingress or Egress"),
                    );
                }
            }
        }
    }
    e.into_result()
}

pub fn validate_namespace(ns: &Namespace) -> Result<(), ValidationErrors> {
    let mut e = Errs::default();
    if ns.metadata.name.is_empty() {
        e.add("metadata.name", "is required");
    } else if let Some(why) = dns1123_label(&ns.metadata.name) {
        e.add("metadata.name", format!("{:?} {why}", ns.metadata.name));
    }
    labels(&mut e, "metadata.labels", &ns.metadata.labels);
    e.into_result()
}

pub fn validate_pod(pod: &Pod) -> Result<(), ValidationErrors> {
    let mut e = Errs::default();
    meta(&mut e, &pod.metadata);
    if let Some(node) = &pod.spec.node_name {
        if let Some(why) = dns1123_subdomain(node) {
            e.add("spec.nodeName", format!("{node:?} {why}"));
        }
    }
    for (i, c) in pod.spec.containers.iter().enumerate() {
        let mut names = BTreeSet::new();
        for (j, p) in c.ports.iter().enumerate() {
            let path = format!("spec.containers[{i}].ports[{j}]");
            if let Some(name) = &p.name {
                if let Some(why) = iana_svc_name(name) {
                    e.add(format!("{path}.name"), format!("{name:?} {why}"));
                } else if !names.insert(name) {
                    e.add(
                        format!("{path}.name"),
                        format!("{name:?} is a duplicate port name"),
                    );
                }
            }
            port_number(&mut e, &format!("{path}.containerPort"), p.container_port);
            if let Some(proto) = &p.protocol {
                protocol(&mut e, &format!("{path}.protocol"), proto);
            }
        }
    }
    if let Some(st) = &pod.status {
        if let Some(ip) = &st.pod_ip {
            ip_addr(&mut e, "status.podIP", ip);
        }
        for (i, ip) in st.pod_ips.iter().flatten().enumerate() {
            ip_addr(&mut e, &format!("status.podIPs[{i}].ip"), &ip.ip);
        }
    }
    e.into_result()
}

/// A pod record from a source that is not the Kubernetes API (etcd mode endpoints).
pub fn validate_pod_record(key: &PodKey, pod: &PodRecord) -> Result<(), ValidationErrors> {
    let mut e = Errs::default();
    if let Some(why) = dns1123_label(&key.namespace) {
        e.add("namespace", format!("{:?} {why}", key.namespace));
    }
    if let Some(why) = dns1123_subdomain(&key.name) {
        e.add("name", format!("{:?} {why}", key.name));
    }
    labels(&mut e, "labels", &pod.labels);
    if let Some(node) = &pod.node {
        if let Some(why) = dns1123_subdomain(node) {
            e.add("node", format!("{node:?} {why}"));
        }
    }
    for (i, ContainerPort { name, port, .. }) in pod.ports.iter().enumerate() {
        if let Some(name) = name {
            if let Some(why) = iana_svc_name(name) {
                e.add(format!("ports[{i}].name"), format!("{name:?} {why}"));
            }
        }
        if *port == 0 {
            e.add(format!("ports[{i}].port"), "0 must be between 1 and 65535");
        }
    }
    e.into_result()
}

// ---------------------------------------------------------------------------------------------
// Parts

/// A namespaced object's metadata: name a DNS subdomain, namespace a DNS label.
fn meta(e: &mut Errs, m: &ObjectMeta) {
    if m.name.is_empty() {
        e.add("metadata.name", "is required");
    } else if let Some(why) = dns1123_subdomain(&m.name) {
        e.add("metadata.name", format!("{:?} {why}", m.name));
    }
    match m.namespace.as_deref() {
        None | Some("") => e.add("metadata.namespace", "is required"),
        Some(ns) => {
            if let Some(why) = dns1123_label(ns) {
                e.add("metadata.namespace", format!("{ns:?} {why}"));
            }
        }
    }
    labels(e, "metadata.labels", &m.labels);
}

fn labels(e: &mut Errs, path: &str, labels: &Labels) {
    for (k, v) in labels {
        if let Some(why) = qualified_name(k) {
            e.add(path, format!("key {k:?} {why}"));
        }
        if let Some(why) = label_value(v) {
            e.add(format!("{path}[{k}]"), format!("{v:?} {why}"));
        }
    }
}

fn selector(e: &mut Errs, path: &str, sel: &LabelSelector) {
    labels(e, &format!("{path}.matchLabels"), &sel.match_labels);
    for (i, r) in sel.match_expressions.iter().enumerate() {
        let rpath = format!("{path}.matchExpressions[{i}]");
        if let Some(why) = qualified_name(&r.key) {
            e.add(format!("{rpath}.key"), format!("{:?} {why}", r.key));
        }
        match r.operator.as_str() {
            "In" | "NotIn" => {
                if r.values.is_empty() {
                    e.add(
                        format!("{rpath}.values"),
                        format!("must be specified when operator is {}", r.operator),
                    );
                }
                for (j, v) in r.values.iter().enumerate() {
                    if let Some(why) = label_value(v) {
                        e.add(format!("{rpath}.values[{j}]"), format!("{v:?} {why}"));
                    }
                }
            }
            "Exists" | "DoesNotExist" => {
                if !r.values.is_empty() {
                    e.add(
                        format!("{rpath}.values"),
                        format!("may not be specified when operator is {}", r.operator),
                    );
                }
            }
            other => e.add(
                format!("{rpath}.operator"),
                format!("{other:?} is not a valid selector operator: must be In, NotIn, Exists or DoesNotExist"),
            ),
        }
    }
}

fn policy_peer(e: &mut Errs, path: &str, peer: &NetworkPolicyPeer) {
    let selectors = peer.pod_selector.is_some() as u8 + peer.namespace_selector.is_some() as u8;
    match (&peer.ip_block, selectors) {
        (None, 0) => e.add(
            path,
            "must specify a peer (podSelector, namespaceSelector or ipBlock)",
        ),
        (Some(_), n) if n > 0 => e.add(
            path,
            "may not specify both ipBlock and another peer (podSelector or namespaceSelector)",
        ),
        _ => {}
    }
    if let Some(s) = &peer.pod_selector {
        selector(e, &format!("{path}.podSelector"), s);
    }
    if let Some(s) = &peer.namespace_selector {
        selector(e, &format!("{path}.namespaceSelector"), s);
    }
    if let Some(b) = &peer.ip_block {
        ip_block(e, &format!("{path}.ipBlock"), b);
    }
}

fn ip_block(e: &mut Errs, path: &str, b: &IpBlock) {
    if b.cidr.is_empty() {
        e.add(format!("{path}.cidr"), "is required");
        return;
    }
    let Some(cidr) = parse_cidr(e, &format!("{path}.cidr"), &b.cidr) else {
        // The excepts cannot be checked against an unreadable cidr; still check their syntax.
        for (i, x) in b.except.iter().enumerate() {
            parse_cidr(e, &format!("{path}.except[{i}]"), x);
        }
        return;
    };
    let cidr = cidr.trunc();
    for (i, x) in b.except.iter().enumerate() {
        let xpath = format!("{path}.except[{i}]");
        let Some(ex) = parse_cidr(e, &xpath, x) else {
            continue;
        };
        if !cidr.contains(&ex.network()) || ex.prefix_len() < cidr.prefix_len() {
            e.add(xpath, format!("{x:?} is not inside cidr {cidr}"));
        } else if ex.prefix_len() == cidr.prefix_len() {
            e.add(
                xpath,
                format!("{x:?} is not strictly inside cidr {cidr} (it is the whole block)"),
            );
        }
    }
}

fn parse_cidr(e: &mut Errs, path: &str, s: &str) -> Option<IpNet> {
    match s.parse::<IpNet>() {
        Ok(n) => Some(n),
        Err(_) => {
            e.add(
                path,
                format!("{s:?} is not a valid CIDR (e.g. 10.0.0.0/8 or fd00::/64)"),
            );
            None
        }
    }
}

fn policy_port(e: &mut Errs, path: &str, p: &NetworkPolicyPort) {
    if let Some(proto) = &p.protocol {
        protocol(e, &format!("{path}.protocol"), proto);
    }
    match &p.port {
        None => {}
        Some(IntOrString::Int(n)) => port_number(e, &format!("{path}.port"), *n),
        Some(IntOrString::String(name)) => {
            if let Some(why) = iana_svc_name(name) {
                e.add(format!("{path}.port"), format!("{name:?} {why}"));
            }
        }
    }
    if let Some(end) = p.end_port {
        let epath = format!("{path}.endPort");
        match &p.port {
            None => e.add(epath, "may not be specified when port is not specified"),
            Some(IntOrString::String(_)) => {
                e.add(epath, "may not be specified when port is a named port")
            }
            Some(IntOrString::Int(port)) => {
                if !(1..=65535).contains(&end) {
                    e.add(epath, format!("{end} must be between 1 and 65535"));
                } else if end < *port {
                    e.add(
                        epath,
                        format!("{end} must be greater than or equal to port {port}"),
                    );
                }
            }
        }
    }
}

fn protocol(e: &mut Errs, path: &str, p: &str) {
    if !matches!(p, "TCP" | "UDP" | "SCTP") {
        e.add(
            path,
            format!("{p:?} is not supported: must be TCP, UDP or SCTP"),
        );
    }
}

fn port_number(e: &mut Errs, path: &str, n: i32) {
    if !(1..=65535).contains(&n) {
        e.add(path, format!("{n} must be between 1 and 65535"));
    }
}

fn ip_addr(e: &mut Errs, path: &str, s: &str) {
    if s.parse::<IpAddr>().is_err() {
        e.add(path, format!("{s:?} is not a valid IP address"));
    }
}

// ---------------------------------------------------------------------------------------------
// Syntax (apimachinery's validation helpers). Each returns why the string is invalid.

fn is_alnum(b: u8) -> bool {
    b.is_ascii_alphanumeric()
}

/// RFC 1123 label: `[a-z0-9]([-a-z0-9]*[a-z0-9])?`, at most 63 characters.
pub fn dns1123_label(s: &str) -> Option<String> {
    const WHY: &str = "must be a lowercase RFC 1123 label: lowercase letters, digits and '-', \
                       starting and ending with a letter or digit, at most 63 characters";
    let b = s.as_bytes();
    let ok = !b.is_empty()
        && b.len() <= 63
        && b.iter()
            .all(|&c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'-')
        && b[0] != b'-'
        && b[b.len() - 1] != b'-';
    (!ok).then(|| WHY.to_string())
}

/// RFC 1123 subdomain: dot-separated labels, at most 253 characters.
pub fn dns1123_subdomain(s: &str) -> Option<String> {
    const WHY: &str = "must be a lowercase RFC 1123 subdomain: labels of lowercase letters, \
                       digits and '-' separated by '.', at most 253 characters";
    let ok = !s.is_empty()
        && s.len() <= 253
        && s.split('.').all(|l| {
            let b = l.as_bytes();
            !b.is_empty()
                && b.iter()
                    .all(|&c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'-')
                && b[0] != b'-'
                && b[b.len() - 1] != b'-'
        });
    (!ok).then(|| WHY.to_string())
}

/// A label name part: `([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]`, 1..=63 characters.
fn label_name(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= 63
        && is_alnum(b[0])
        && is_alnum(b[b.len() - 1])
        && b.iter()
            .all(|&c| is_alnum(c) || c == b'-' || c == b'_' || c == b'.')
}

/// A label key: `[prefix/]name` where prefix is a DNS subdomain.
pub fn qualified_name(s: &str) -> Option<String> {
    let (prefix, name) = match s.split_once('/') {
        Some((p, n)) => (Some(p), n),
        None => (None, s),
    };
    if let Some(p) = prefix {
        if p.is_empty() || dns1123_subdomain(p).is_some() {
            return Some(
                "must have a DNS subdomain prefix before '/' (e.g. 'example.com/key')".into(),
            );
        }
    }
    if !label_name(name) {
        return Some(
            "must be a qualified name: 1 to 63 letters, digits, '-', '_' or '.', starting and \
             ending with a letter or digit, with an optional DNS subdomain prefix and '/'"
                .into(),
        );
    }
    None
}

/// A label value: empty or a label name.
pub fn label_value(s: &str) -> Option<String> {
    (!s.is_empty() && !label_name(s)).then(|| {
        "must be a valid label value: empty, or 1 to 63 letters, digits, '-', '_' or '.', starting \
         and ending with a letter or digit"
            .into()
    })
}

/// IANA_SVC_NAME (RFC 6335): 1..=15 lowercase letters, digits and '-', at least one letter, no
/// '-' at either end, no '--'.
pub fn iana_svc_name(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let ok = !b.is_empty()
        && b.len() <= 15
        && b.iter()
            .all(|&c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'-')
        && b.iter().any(|c| c.is_ascii_lowercase())
        && b[0] != b'-'
        && b[b.len() - 1] != b'-'
        && !s.contains("--");
    (!ok).then(|| {
        "must be a port name (IANA_SVC_NAME): 1 to 15 lowercase letters, digits and '-', with at \
         least one letter, no '-' at either end and no '--'"
            .into()
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{NetworkPolicySpec, PodIp, PodStatus};

    fn policy(spec: serde_json::Value) -> NetworkPolicy {
        serde_json::from_value(serde_json::json!({
            "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "metadata": {"name": "p", "namespace": "x"},
            "spec": spec,
        }))
        .unwrap()
    }

    fn errors(spec: serde_json::Value) -> Vec<String> {
        match validate_network_policy(&policy(spec)) {
            Ok(()) => vec![],
            Err(e) => e.0.iter().map(ToString::to_string).collect(),
        }
    }

    #[test]
    fn a_full_valid_policy_passes() {
        let e = errors(serde_json::json!({
            "podSelector": {"matchLabels": {"app.kubernetes.io/name": "web", "tier": ""},
                            "matchExpressions": [{"key": "env", "operator": "NotIn", "values": ["prod"]},
                                                 {"key": "canary", "operator": "DoesNotExist"}]},
            "ingress": [{"from": [{"podSelector": {}}, {"namespaceSelector": {}},
                                  {"podSelector": {}, "namespaceSelector": {"matchLabels": {"a": "b"}}},
                                  {"ipBlock": {"cidr": "10.0.0.0/8", "except": ["10.1.0.0/16", "10.2.3.4/32"]}},
                                  {"ipBlock": {"cidr": "fd00::/48", "except": ["fd00::/64"]}}],
                         "ports": [{"port": 80}, {"port": "serve-80-tcp"}, {"protocol": "UDP"},
                                   {"protocol": "SCTP", "port": 1000, "endPort": 2000},
                                   {"port": 5, "endPort": 5}]}],
            "egress": [{}],
            "policyTypes": ["Ingress", "Egress"],
        }));
        assert_eq!(e, Vec::<String>::new());
    }

    #[test]
    fn except_outside_cidr_is_named_precisely() {
        let e = errors(serde_json::json!({
            "ingress": [{"from": [{"podSelector": {}},
                                  {"ipBlock": {"cidr": "10.1.0.0/16", "except": ["10.0.0.0/8"]}}]}],
        }));
        assert_eq!(
            e,
            vec![
                r#"spec.ingress[0].from[1].ipBlock.except[0]: "10.0.0.0/8" is not inside cidr 10.1.0.0/16"#
            ]
        );
    }

    #[test]
    fn except_must_be_strictly_inside_and_same_family() {
        let e = errors(serde_json::json!({
            "egress": [{"to": [{"ipBlock": {"cidr": "10.1.0.0/16",
                                            "except": ["10.1.0.0/16", "10.2.0.0/24", "fd00::/64",
                                                       "10.1.0.0/33", "10.1.5.0/24"]}}]}],
        }));
        let p = "spec.egress[0].to[0].ipBlock.except";
        assert_eq!(e.len(), 4, "{e:?}");
        assert!(
            e[0].starts_with(&format!("{p}[0]: ")) && e[0].contains("strictly"),
            "{e:?}"
        );
        assert!(e[1].starts_with(&format!("{p}[1]: ")) && e[1].contains("not inside"));
        assert!(e[2].starts_with(&format!("{p}[2]: ")) && e[2].contains("not inside"));
        assert!(e[3].starts_with(&format!("{p}[3]: ")) && e[3].contains("not a valid CIDR"));
    }

    #[test]
    fn bad_cidr_and_missing_cidr() {
        let e = errors(serde_json::json!({
            "ingress": [{"from": [{"ipBlock": {"cidr": "10.0.0.0"}}, {"ipBlock": {"cidr": ""}},
                                  {"ipBlock": {"cidr": "10.0.0.0/40", "except": ["nope"]}}]}],
        }));
        assert_eq!(e.len(), 4, "{e:?}");
        assert!(e[0]
            .starts_with("spec.ingress[0].from[0].ipBlock.cidr: \"10.0.0.0\" is not a valid CIDR"));
        assert_eq!(e[1], "spec.ingress[0].from[1].ipBlock.cidr: is required");
        assert!(e[2].starts_with("spec.ingress[0].from[2].ipBlock.cidr: "));
        assert!(e[3].starts_with("spec.ingress[0].from[2].ipBlock.except[0]: \"nope\""));
    }

    #[test]
    fn peers_must_be_non_empty_and_ipblock_alone() {
        let e = errors(serde_json::json!({
            "ingress": [{"from": [{}, {"ipBlock": {"cidr": "10.0.0.0/8"}, "podSelector": {}},
                                  {"ipBlock": {"cidr": "10.0.0.0/8"}, "namespaceSelector": {}}]}],
        }));
        assert_eq!(e.len(), 3, "{e:?}");
        assert!(e[0].starts_with("spec.ingress[0].from[0]: must specify a peer"));
        assert!(e[1].starts_with("spec.ingress[0].from[1]: may not specify both ipBlock"));
        assert!(e[2].starts_with("spec.ingress[0].from[2]: may not specify both ipBlock"));
    }

    #[test]
    fn ports_protocols_and_end_port() {
        let e = errors(serde_json::json!({
            "egress": [{"ports": [{"port": 0}, {"port": 65536}, {"protocol": "ICMP"},
                                  {"protocol": "tcp", "port": 80},
                                  {"port": 80, "endPort": 79}, {"endPort": 90},
                                  {"port": "serve-80-tcp", "endPort": 90},
                                  {"port": 80, "endPort": 70000},
                                  {"port": "80"}, {"port": "Serve"}, {"port": "a--b"},
                                  {"port": "this-name-is-too-long"}, {"port": 65535, "endPort": 65535}]}],
        }));
        let p = "spec.egress[0].ports";
        let want = [
            format!("{p}[0].port: 0 must be between 1 and 65535"),
            format!("{p}[1].port: 65536 must be between 1 and 65535"),
            format!("{p}[2].protocol: \"ICMP\" is not supported: must be TCP, UDP or SCTP"),
            format!("{p}[3].protocol: \"tcp\" is not supported: must be TCP, UDP or SCTP"),
            format!("{p}[4].endPort: 79 must be greater than or equal to port 80"),
            format!("{p}[5].endPort: may not be specified when port is not specified"),
            format!("{p}[6].endPort: may not be specified when port is a named port"),
            format!("{p}[7].endPort: 70000 must be between 1 and 65535"),
        ];
        assert_eq!(&e[..want.len()], &want[..], "{e:#?}");
        let rest = &e[want.len()..];
        assert_eq!(rest.len(), 4, "{rest:#?}");
        for (k, idx) in [8, 9, 10, 11].iter().enumerate() {
            assert!(
                rest[k].starts_with(&format!("{p}[{idx}].port: ")),
                "{rest:?}"
            );
            assert!(rest[k].contains("IANA_SVC_NAME"), "{rest:?}");
        }
    }

    #[test]
    fn selector_operators_and_values() {
        let e = errors(serde_json::json!({
            "podSelector": {"matchExpressions": [
                {"key": "a", "operator": "In"},
                {"key": "a", "operator": "NotIn", "values": []},
                {"key": "a", "operator": "Exists", "values": ["x"]},
                {"key": "a", "operator": "DoesNotExist", "values": ["x"]},
                {"key": "a", "operator": "Gt", "values": ["1"]},
                {"key": "-bad", "operator": "Exists"},
                {"key": "a", "operator": "In", "values": ["ok", "-bad-"]}]},
        }));
        let p = "spec.podSelector.matchExpressions";
        assert_eq!(e.len(), 7, "{e:#?}");
        assert_eq!(
            e[0],
            format!("{p}[0].values: must be specified when operator is In")
        );
        assert_eq!(
            e[1],
            format!("{p}[1].values: must be specified when operator is NotIn")
        );
        assert_eq!(
            e[2],
            format!("{p}[2].values: may not be specified when operator is Exists")
        );
        assert_eq!(
            e[3],
            format!("{p}[3].values: may not be specified when operator is DoesNotExist")
        );
        assert!(e[4].starts_with(&format!(
            "{p}[4].operator: \"Gt\" is not a valid selector operator"
        )));
        assert!(e[5].starts_with(&format!("{p}[5].key: \"-bad\" must be a qualified name")));
        assert!(e[6].starts_with(&format!(
            "{p}[6].values[1]: \"-bad-\" must be a valid label value"
        )));
    }

    #[test]
    fn label_syntax_in_peers() {
        let e = errors(serde_json::json!({
            "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"Bad Key": "v", "k": "no way",
                                                                        "example.com/ok": "fine",
                                                                        "EXAMPLE.com/k": "v",
                                                                        "a/b/c": "v"}}}]}],
        }));
        let p = "spec.ingress[0].from[0].namespaceSelector.matchLabels";
        assert_eq!(e.len(), 4, "{e:#?}");
        assert!(e
            .iter()
            .any(|x| x.starts_with(&format!("{p}: key \"Bad Key\""))));
        assert!(e
            .iter()
            .any(|x| x.starts_with(&format!("{p}: key \"EXAMPLE.com/k\""))));
        assert!(e
            .iter()
            .any(|x| x.starts_with(&format!("{p}: key \"a/b/c\""))));
        assert!(e
            .iter()
            .any(|x| x.starts_with(&format!("{p}[k]: \"no way\""))));
    }

    #[test]
    fn policy_types_only_ingress_and_egress() {
        let e = errors(serde_json::json!({"policyTypes": ["Ingress", "egress"]}));
        assert_eq!(
            e,
            vec![r#"spec.policyTypes[1]: "egress" is not supported: must be Ingress or Egress"#]
        );
        let e = errors(serde_json::json!({"policyTypes": ["Ingress", "Egress", "Ingress"]}));
        assert_eq!(
            e,
            vec!["spec.policyTypes: may not specify more than two policyTypes"]
        );
    }

    #[test]
    fn metadata_names() {
        let mut p = policy(serde_json::json!({}));
        p.metadata.name = "Bad_Name".into();
        p.metadata.namespace = Some("a.b".into());
        let e = validate_network_policy(&p).unwrap_err();
        assert!(e
            .for_field("metadata.name")
            .unwrap()
            .message
            .contains("RFC 1123 subdomain"));
        assert!(e
            .for_field("metadata.namespace")
            .unwrap()
            .message
            .contains("RFC 1123 label"));
        p.metadata.name = "ok.name-1".into();
        p.metadata.namespace = None;
        let e = validate_network_policy(&p).unwrap_err();
        assert_eq!(e.0.len(), 1);
        assert_eq!(e.0[0].to_string(), "metadata.namespace: is required");
        let p = NetworkPolicy {
            spec: NetworkPolicySpec::default(),
            ..Default::default()
        };
        let e = validate_network_policy(&p).unwrap_err();
        assert_eq!(e.for_field("metadata.name").unwrap().message, "is required");
    }

    #[test]
    fn returns_all_errors_and_displays_them() {
        let p = policy(serde_json::json!({
            "podSelector": {"matchLabels": {"k": "-"}},
            "ingress": [{"ports": [{"port": 0}]}],
            "egress": [{"to": [{}]}],
        }));
        let e = validate_network_policy(&p).unwrap_err();
        assert_eq!(e.0.len(), 3);
        let s = e.to_string();
        assert!(s.contains("spec.podSelector.matchLabels[k]"), "{s}");
        assert!(s.contains("; spec.ingress[0].ports[0].port: 0"), "{s}");
        assert!(
            s.contains("; spec.egress[0].to[0]: must specify a peer"),
            "{s}"
        );
    }

    #[test]
    fn syntax_helpers() {
        assert!(dns1123_label("x").is_none());
        assert!(dns1123_label("a-1").is_none());
        assert!(dns1123_label(&"a".repeat(63)).is_none());
        for bad in ["", "-a", "a-", "A", "a.b", &"a".repeat(64)] {
            assert!(dns1123_label(bad).is_some(), "{bad}");
        }
        assert!(dns1123_subdomain("a.b-c.d").is_none());
        for bad in ["", "a..b", ".a", "a.", "a_b"] {
            assert!(dns1123_subdomain(bad).is_some(), "{bad}");
        }
        for good in [
            "a",
            "A_b.c-9",
            "example.com/x",
            "kubernetes.io/metadata.name",
        ] {
            assert!(qualified_name(good).is_none(), "{good}");
        }
        for bad in ["", "/x", "x/", "_a", "a_", &"a".repeat(64)] {
            assert!(qualified_name(bad).is_some(), "{bad}");
        }
        assert!(label_value("").is_none());
        assert!(label_value("A.b_c-d").is_none());
        assert!(label_value("a b").is_some());
        for good in ["http", "serve-80-tcp", "a1", "x-y-z"] {
            assert!(iana_svc_name(good).is_none(), "{good}");
        }
        for bad in [
            "",
            "80",
            "-a",
            "a-",
            "a--b",
            "Http",
            "a_b",
            "abcdefghijklmnop",
        ] {
            assert!(iana_svc_name(bad).is_some(), "{bad}");
        }
    }

    #[test]
    fn pods_and_namespaces() {
        let ns = Namespace {
            metadata: ObjectMeta {
                name: "Bad".into(),
                ..Default::default()
            },
            ..Default::default()
        };
        assert_eq!(
            validate_namespace(&ns).unwrap_err().0[0].field,
            "metadata.name"
        );
        let ok = Namespace {
            metadata: ObjectMeta {
                name: "y".into(),
                ..Default::default()
            },
            ..Default::default()
        };
        assert!(validate_namespace(&ok).is_ok());

        let mut pod: Pod = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "a", "namespace": "x"},
            "spec": {"nodeName": "n1", "containers": [{"name": "c", "ports": [
                {"name": "serve-80-tcp", "containerPort": 80},
                {"name": "serve-80-tcp", "containerPort": 81},
                {"name": "Bad", "containerPort": 0, "protocol": "ICMP"}]}]},
        }))
        .unwrap();
        pod.status = Some(PodStatus {
            pod_ip: Some("10.0.0.1".into()),
            pod_ips: Some(vec![
                PodIp {
                    ip: "10.0.0.1".into(),
                },
                PodIp {
                    ip: "fd00::zz".into(),
                },
            ]),
            phase: None,
        });
        let e = validate_pod(&pod).unwrap_err();
        let fields: Vec<_> = e.0.iter().map(|e| e.field.as_str()).collect();
        assert_eq!(
            fields,
            [
                "spec.containers[0].ports[1].name",
                "spec.containers[0].ports[2].name",
                "spec.containers[0].ports[2].containerPort",
                "spec.containers[0].ports[2].protocol",
                "status.podIPs[1].ip",
            ]
        );
    }
}
