//! The cluster as policy sees it: namespaces (labels), pods (labels, addresses, node, declared
//! ports) and policies, keyed by (namespace, name), with the indexes that keep incremental
//! updates and lookups cheap. Both sources (Kubernetes objects, etcd endpoint records) feed it.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::IpAddr;

use serde::{Deserialize, Serialize};

use crate::api::{self, Labels, NetworkPolicy};
use crate::validate::{self, ValidationErrors};

/// The label every namespace carries, set by the API server (and by us: it overrides a
/// user-set value, as the API server's defaulting does).
pub const NAMESPACE_NAME_LABEL: &str = "kubernetes.io/metadata.name";

/// A namespaced object's identity.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct ObjectKey {
    pub namespace: String,
    pub name: String,
}

pub type PodKey = ObjectKey;
pub type PolicyKey = ObjectKey;

impl ObjectKey {
    pub fn new(namespace: impl Into<String>, name: impl Into<String>) -> ObjectKey {
        ObjectKey {
            namespace: namespace.into(),
            name: name.into(),
        }
    }
}

impl fmt::Display for ObjectKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// The transport protocols a NetworkPolicy port can name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Protocol {
    #[serde(rename = "TCP")]
    Tcp,
    #[serde(rename = "UDP")]
    Udp,
    #[serde(rename = "SCTP")]
    Sctp,
}

impl Protocol {
    /// The API's spelling; `None` (field absent) is TCP.
    pub fn from_api(s: Option<&str>) -> Option<Protocol> {
        match s {
            None | Some("TCP") => Some(Protocol::Tcp),
            Some("UDP") => Some(Protocol::Udp),
            Some("SCTP") => Some(Protocol::Sctp),
            Some(_) => None,
        }
    }

    /// The IP protocol number (nft `meta l4proto`).
    pub fn number(self) -> u8 {
        match self {
            Protocol::Tcp => 6,
            Protocol::Udp => 17,
            Protocol::Sctp => 132,
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Protocol::Tcp => "TCP",
            Protocol::Udp => "UDP",
            Protocol::Sctp => "SCTP",
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Family {
    V4,
    V6,
}

impl Family {
    pub fn of(ip: IpAddr) -> Family {
        match ip {
            IpAddr::V4(_) => Family::V4,
            IpAddr::V6(_) => Family::V6,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Direction {
    Ingress,
    Egress,
}

impl fmt::Display for Direction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Direction::Ingress => "ingress",
            Direction::Egress => "egress",
        })
    }
}

/// What a packet carries above IP. ICMP means the flow family's ICMP (ICMPv6 for IPv6).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Transport {
    Tcp(u16),
    Udp(u16),
    Sctp(u16),
    Icmp {
        kind: u8,
    },
    /// Any other IP protocol, by number.
    Other(u8),
}

impl Transport {
    /// (protocol, destination port) for the protocols NetworkPolicy ports can match.
    pub fn port(self) -> Option<(Protocol, u16)> {
        match self {
            Transport::Tcp(p) => Some((Protocol::Tcp, p)),
            Transport::Udp(p) => Some((Protocol::Udp, p)),
            Transport::Sctp(p) => Some((Protocol::Sctp, p)),
            Transport::Icmp { .. } | Transport::Other(_) => None,
        }
    }

    pub fn on(proto: Protocol, port: u16) -> Transport {
        match proto {
            Protocol::Tcp => Transport::Tcp(port),
            Protocol::Udp => Transport::Udp(port),
            Protocol::Sctp => Transport::Sctp(port),
        }
    }

    /// IPv6 neighbour discovery (ICMPv6 133–137: router and neighbour solicitation and
    /// advertisement, redirect). twill never subjects it to policy: it is link machinery, not pod
    /// traffic, and an IPv6 pod that cannot resolve its neighbours (or its gateway, through the
    /// input hook) loses all traffic, allowed or not (kube-network-policies #191).
    pub fn is_neighbour_discovery(self, family: Family) -> bool {
        family == Family::V6 && matches!(self, Transport::Icmp { kind: 133..=137 })
    }
}

impl fmt::Display for Transport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Transport::Tcp(p) => write!(f, "TCP/{p}"),
            Transport::Udp(p) => write!(f, "UDP/{p}"),
            Transport::Sctp(p) => write!(f, "SCTP/{p}"),
            Transport::Icmp { kind } => write!(f, "ICMP type {kind}"),
            Transport::Other(n) => write!(f, "IP protocol {n}"),
        }
    }
}

/// A port a pod declares (`spec.containers[].ports[]`); named ports resolve against these.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct ContainerPort {
    pub name: Option<String>,
    pub port: u16,
    pub protocol: Protocol,
}

/// What policy needs to know about a pod.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PodRecord {
    pub labels: Labels,
    /// At most one per family in Kubernetes; any number here.
    pub ips: Vec<IpAddr>,
    pub node: Option<String>,
    pub host_network: bool,
    pub ports: Vec<ContainerPort>,
}

impl PodRecord {
    /// A pod policy can see: on a node, with an address, not sharing the node's network.
    /// Only such pods are targets or members of peer sets; hostNetwork pods' addresses are their
    /// node's, which must never land in a pod set (kube-network-policies #379).
    pub fn is_live(&self) -> bool {
        !self.host_network && self.node.is_some() && !self.ips.is_empty()
    }

    pub fn ip(&self, family: Family) -> Option<IpAddr> {
        self.ips
            .iter()
            .copied()
            .find(|ip| Family::of(*ip) == family)
    }

    /// The ports this pod declares under `name` for `proto`.
    pub fn named_ports<'a>(
        &'a self,
        name: &'a str,
        proto: Protocol,
    ) -> impl Iterator<Item = u16> + 'a {
        self.ports
            .iter()
            .filter(move |p| p.name.as_deref() == Some(name) && p.protocol == proto)
            .map(|p| p.port)
    }

    /// Reads a validated API pod. Finished pods (`Succeeded`, `Failed`) get no addresses: they
    /// keep `podIP` in their status although a new pod may already use it.
    pub fn from_api(pod: &api::Pod) -> Result<(PodKey, PodRecord), ValidationErrors> {
        validate::validate_pod(pod)?;
        let key = PodKey::new(
            pod.metadata.namespace.clone().unwrap_or_default(),
            &pod.metadata.name,
        );
        let mut ips: Vec<IpAddr> = Vec::new();
        if let Some(st) = &pod.status {
            let finished = matches!(st.phase.as_deref(), Some("Succeeded" | "Failed"));
            let listed: Vec<&str> = match &st.pod_ips {
                Some(list) if !list.is_empty() => list.iter().map(|p| p.ip.as_str()).collect(),
                _ => st.pod_ip.iter().map(String::as_str).collect(),
            };
            if !finished {
                for s in listed {
                    let ip: IpAddr = s.parse().expect("validated");
                    if !ips.contains(&ip) {
                        ips.push(ip);
                    }
                }
            }
        }
        let ports = pod
            .spec
            .containers
            .iter()
            .flat_map(|c| &c.ports)
            .map(|p| ContainerPort {
                name: p.name.clone(),
                port: u16::try_from(p.container_port).expect("validated"),
                protocol: Protocol::from_api(p.protocol.as_deref()).expect("validated"),
            })
            .collect();
        let record = PodRecord {
            labels: pod.metadata.labels.clone(),
            ips,
            node: pod.spec.node_name.clone(),
            host_network: pod.spec.host_network.unwrap_or(false),
            ports,
        };
        Ok((key, record))
    }
}

/// Namespaces, pods and policies, with indexes by namespace, node and address.
#[derive(Debug, Clone, Default)]
pub struct Cluster {
    /// User labels of namespaces that have an object.
    namespaces: BTreeMap<String, Labels>,
    pods: BTreeMap<PodKey, PodRecord>,
    policies: BTreeMap<PolicyKey, NetworkPolicy>,
    pods_by_namespace: BTreeMap<String, BTreeSet<String>>,
    pods_by_node: BTreeMap<String, BTreeSet<PodKey>>,
    pods_by_ip: BTreeMap<IpAddr, BTreeSet<PodKey>>,
    policies_by_namespace: BTreeMap<String, BTreeSet<String>>,
}

impl Cluster {
    pub fn new() -> Cluster {
        Cluster::default()
    }

    // --- namespaces

    pub fn upsert_namespace(&mut self, ns: &api::Namespace) -> Result<(), ValidationErrors> {
        validate::validate_namespace(ns)?;
        self.namespaces
            .insert(ns.metadata.name.clone(), ns.metadata.labels.clone());
        Ok(())
    }

    /// etcd mode: a namespace is just its labels.
    pub fn set_namespace_labels(
        &mut self,
        name: &str,
        labels: Labels,
    ) -> Result<(), ValidationErrors> {
        self.upsert_namespace(&api::Namespace {
            metadata: api::ObjectMeta {
                name: name.into(),
                labels,
                ..Default::default()
            },
            ..Default::default()
        })
    }

    /// Forgets the namespace's labels; its pods and policies stay (the sources delete those).
    pub fn remove_namespace(&mut self, name: &str) -> bool {
        self.namespaces.remove(name).is_some()
    }

    /// The labels policy sees on a namespace, object or not: its own plus
    /// `kubernetes.io/metadata.name=<name>`, which wins over a user-set value.
    pub fn namespace_labels(&self, name: &str) -> Labels {
        let mut labels = self.namespaces.get(name).cloned().unwrap_or_default();
        labels.insert(NAMESPACE_NAME_LABEL.into(), name.into());
        labels
    }

    /// Namespaces that have pods (the only ones a namespace selector can yield pods from).
    pub fn namespaces_with_pods(&self) -> impl Iterator<Item = &str> {
        self.pods_by_namespace.keys().map(String::as_str)
    }

    // --- pods

    pub fn upsert_pod(&mut self, pod: &api::Pod) -> Result<PodKey, ValidationErrors> {
        let (key, record) = PodRecord::from_api(pod)?;
        self.insert_pod(key.clone(), record);
        Ok(key)
    }

    /// etcd mode: a pod record from its endpoint key.
    pub fn upsert_pod_record(
        &mut self,
        key: PodKey,
        record: PodRecord,
    ) -> Result<(), ValidationErrors> {
        validate::validate_pod_record(&key, &record)?;
        self.insert_pod(key, record);
        Ok(())
    }

    fn insert_pod(&mut self, key: PodKey, record: PodRecord) {
        self.remove_pod(&key);
        self.pods_by_namespace
            .entry(key.namespace.clone())
            .or_default()
            .insert(key.name.clone());
        if let Some(node) = &record.node {
            self.pods_by_node
                .entry(node.clone())
                .or_default()
                .insert(key.clone());
        }
        for ip in &record.ips {
            self.pods_by_ip.entry(*ip).or_default().insert(key.clone());
        }
        self.pods.insert(key, record);
    }

    pub fn remove_pod(&mut self, key: &PodKey) -> Option<PodRecord> {
        let old = self.pods.remove(key)?;
        unindex(&mut self.pods_by_namespace, &key.namespace, &key.name);
        if let Some(node) = &old.node {
            unindex(&mut self.pods_by_node, node, key);
        }
        for ip in &old.ips {
            unindex(&mut self.pods_by_ip, ip, key);
        }
        Some(old)
    }

    pub fn pod(&self, key: &PodKey) -> Option<&PodRecord> {
        self.pods.get(key)
    }

    pub fn pods(&self) -> impl Iterator<Item = (&PodKey, &PodRecord)> {
        self.pods.iter()
    }

    pub fn pods_in_namespace<'a>(
        &'a self,
        ns: &'a str,
    ) -> impl Iterator<Item = (&'a PodKey, &'a PodRecord)> + 'a {
        self.pods_by_namespace
            .get(ns)
            .into_iter()
            .flatten()
            .map(move |name| {
                self.pods
                    .get_key_value(&PodKey::new(ns, name.as_str()))
                    .expect("index in step with pods")
            })
    }

    pub fn pods_on_node<'a>(
        &'a self,
        node: &str,
    ) -> impl Iterator<Item = (&'a PodKey, &'a PodRecord)> + 'a {
        self.pods_by_node
            .get(node)
            .into_iter()
            .flatten()
            .map(|k| self.pods.get_key_value(k).expect("index in step with pods"))
    }

    /// Every pod record claiming `ip` (normally one; a hostNetwork pod claims its node's).
    pub fn pods_with_ip(&self, ip: IpAddr) -> impl Iterator<Item = (&PodKey, &PodRecord)> {
        self.pods_by_ip
            .get(&ip)
            .into_iter()
            .flatten()
            .map(|k| self.pods.get_key_value(k).expect("index in step with pods"))
    }

    /// The live pod using `ip`, if exactly one does.
    pub fn live_pod_with_ip(&self, ip: IpAddr) -> Option<(&PodKey, &PodRecord)> {
        let mut live = self.pods_with_ip(ip).filter(|(_, p)| p.is_live());
        let first = live.next()?;
        live.next().is_none().then_some(first)
    }

    // --- policies

    pub fn upsert_policy(&mut self, policy: NetworkPolicy) -> Result<PolicyKey, ValidationErrors> {
        validate::validate_network_policy(&policy)?;
        let key = PolicyKey::new(
            policy.metadata.namespace.clone().expect("validated"),
            &policy.metadata.name,
        );
        self.policies_by_namespace
            .entry(key.namespace.clone())
            .or_default()
            .insert(key.name.clone());
        self.policies.insert(key.clone(), policy);
        Ok(key)
    }

    pub fn remove_policy(&mut self, key: &PolicyKey) -> Option<NetworkPolicy> {
        let old = self.policies.remove(key)?;
        unindex(&mut self.policies_by_namespace, &key.namespace, &key.name);
        Some(old)
    }

    pub fn policy(&self, key: &PolicyKey) -> Option<&NetworkPolicy> {
        self.policies.get(key)
    }

    pub fn policies(&self) -> impl Iterator<Item = (&PolicyKey, &NetworkPolicy)> {
        self.policies.iter()
    }

    /// The policies that can select pods of `ns`, in key order.
    pub fn policies_in_namespace<'a>(
        &'a self,
        ns: &'a str,
    ) -> impl Iterator<Item = (&'a PolicyKey, &'a NetworkPolicy)> + 'a {
        self.policies_by_namespace
            .get(ns)
            .into_iter()
            .flatten()
            .map(move |name| {
                self.policies
                    .get_key_value(&PolicyKey::new(ns, name.as_str()))
                    .expect("index in step with policies")
            })
    }
}

fn unindex<K: Ord, V: Ord>(index: &mut BTreeMap<K, BTreeSet<V>>, key: &K, value: &V) {
    if let Some(set) = index.get_mut(key) {
        set.remove(value);
        if set.is_empty() {
            index.remove(key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod_json(name: &str, extra: serde_json::Value) -> api::Pod {
        let mut v = serde_json::json!({
            "metadata": {"name": name, "namespace": "x", "labels": {"pod": name}},
            "spec": {"nodeName": "n1", "containers": [{"name": "c", "ports": [
                {"name": "serve-80-tcp", "containerPort": 80},
                {"name": "serve-80-udp", "containerPort": 80, "protocol": "UDP"}]}]},
            "status": {"podIP": "10.0.0.1", "podIPs": [{"ip": "10.0.0.1"}, {"ip": "fd00::1"}]},
        });
        merge(&mut v, extra);
        serde_json::from_value(v).unwrap()
    }

    fn merge(a: &mut serde_json::Value, b: serde_json::Value) {
        match (a, b) {
            (serde_json::Value::Object(a), serde_json::Value::Object(b)) => {
                for (k, v) in b {
                    merge(a.entry(k).or_insert(serde_json::Value::Null), v);
                }
            }
            (a, b) => *a = b,
        }
    }

    #[test]
    fn pod_from_api() {
        let (key, p) = PodRecord::from_api(&pod_json("a", serde_json::json!({}))).unwrap();
        assert_eq!(key, PodKey::new("x", "a"));
        assert_eq!(
            p.ips,
            vec![
                "10.0.0.1".parse::<IpAddr>().unwrap(),
                "fd00::1".parse().unwrap()
            ]
        );
        assert_eq!(p.ip(Family::V6), Some("fd00::1".parse().unwrap()));
        assert_eq!(p.node.as_deref(), Some("n1"));
        assert!(p.is_live());
        assert_eq!(
            p.named_ports("serve-80-tcp", Protocol::Tcp)
                .collect::<Vec<_>>(),
            vec![80]
        );
        assert_eq!(p.named_ports("serve-80-tcp", Protocol::Udp).count(), 0);
        assert_eq!(
            p.named_ports("serve-80-udp", Protocol::Udp)
                .collect::<Vec<_>>(),
            vec![80]
        );
    }

    #[test]
    fn pod_ip_fallback_and_finished_pods() {
        let only_ip = pod_json("a", serde_json::json!({"status": {"podIPs": null}}));
        assert_eq!(PodRecord::from_api(&only_ip).unwrap().1.ips.len(), 1);
        let done = pod_json("a", serde_json::json!({"status": {"phase": "Succeeded"}}));
        let p = PodRecord::from_api(&done).unwrap().1;
        assert!(p.ips.is_empty() && !p.is_live());
        let host = pod_json("a", serde_json::json!({"spec": {"hostNetwork": true}}));
        assert!(!PodRecord::from_api(&host).unwrap().1.is_live());
        let unscheduled = pod_json("a", serde_json::json!({"spec": {"nodeName": null}}));
        assert!(!PodRecord::from_api(&unscheduled).unwrap().1.is_live());
        let bad = pod_json(
            "a",
            serde_json::json!({"status": {"podIP": "nope", "podIPs": null}}),
        );
        assert_eq!(
            PodRecord::from_api(&bad).unwrap_err().0[0].field,
            "status.podIP"
        );
    }

    #[test]
    fn namespace_label_is_automatic_and_wins() {
        let mut c = Cluster::new();
        assert_eq!(c.namespace_labels("ghost")[NAMESPACE_NAME_LABEL], "ghost");
        let labels: Labels = [
            (NAMESPACE_NAME_LABEL.to_string(), "liar".to_string()),
            ("ns".into(), "y".into()),
        ]
        .into_iter()
        .collect();
        c.set_namespace_labels("y", labels).unwrap();
        let l = c.namespace_labels("y");
        assert_eq!(l[NAMESPACE_NAME_LABEL], "y");
        assert_eq!(l["ns"], "y");
        assert!(c.remove_namespace("y"));
        assert!(!c.namespace_labels("y").contains_key("ns"));
        assert!(c.set_namespace_labels("Bad", Labels::new()).is_err());
    }

    #[test]
    fn indexes_follow_upserts_and_removals() {
        let mut c = Cluster::new();
        let key = c.upsert_pod(&pod_json("a", serde_json::json!({}))).unwrap();
        let v4: IpAddr = "10.0.0.1".parse().unwrap();
        assert_eq!(c.live_pod_with_ip(v4).unwrap().0, &key);
        assert_eq!(c.pods_on_node("n1").count(), 1);
        assert_eq!(c.pods_in_namespace("x").count(), 1);
        assert_eq!(c.namespaces_with_pods().collect::<Vec<_>>(), ["x"]);

        // Moving the pod to another node and address leaves no stale index entry.
        let moved = pod_json(
            "a",
            serde_json::json!({"spec": {"nodeName": "n2"}, "status": {"podIP": "10.0.0.9", "podIPs": null}}),
        );
        c.upsert_pod(&moved).unwrap();
        assert_eq!(c.pods_on_node("n1").count(), 0);
        assert_eq!(c.pods_on_node("n2").count(), 1);
        assert!(c.live_pod_with_ip(v4).is_none());
        assert_eq!(c.pods_with_ip("fd00::1".parse().unwrap()).count(), 0);
        assert!(c.live_pod_with_ip("10.0.0.9".parse().unwrap()).is_some());

        // Two live pods on one address: neither is "the" pod.
        let twin = pod_json(
            "b",
            serde_json::json!({"status": {"podIP": "10.0.0.9", "podIPs": null}}),
        );
        c.upsert_pod(&twin).unwrap();
        assert_eq!(c.pods_with_ip("10.0.0.9".parse().unwrap()).count(), 2);
        assert!(c.live_pod_with_ip("10.0.0.9".parse().unwrap()).is_none());

        c.remove_pod(&key).unwrap();
        c.remove_pod(&PodKey::new("x", "b")).unwrap();
        assert!(c.remove_pod(&key).is_none());
        assert_eq!(c.pods().count(), 0);
        assert_eq!(c.namespaces_with_pods().count(), 0);
        assert!(c.pods_by_ip.is_empty() && c.pods_by_node.is_empty());
    }

    #[test]
    fn policies_are_validated_and_indexed() {
        let mut c = Cluster::new();
        let p: NetworkPolicy = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "p", "namespace": "x"}, "spec": {"podSelector": {}}
        }))
        .unwrap();
        let key = c.upsert_policy(p.clone()).unwrap();
        assert_eq!(c.policies_in_namespace("x").count(), 1);
        let mut bad = p.clone();
        bad.spec.policy_types = Some(vec!["Sideways".into()]);
        assert!(c.upsert_policy(bad).is_err());
        assert_eq!(
            c.policy(&key),
            Some(&p),
            "a rejected update leaves the old policy"
        );
        assert!(c.remove_policy(&key).is_some());
        assert_eq!(c.policies_in_namespace("x").count(), 0);
        assert_eq!(c.policies().count(), 0);
    }

    #[test]
    fn pod_records_are_validated() {
        let mut c = Cluster::new();
        let rec = PodRecord {
            ports: vec![ContainerPort {
                name: Some("Bad".into()),
                port: 0,
                protocol: Protocol::Tcp,
            }],
            ..Default::default()
        };
        let e = c.upsert_pod_record(PodKey::new("x", "a"), rec).unwrap_err();
        let fields: Vec<_> = e.0.iter().map(|e| e.field.as_str()).collect();
        assert_eq!(fields, ["ports[0].name", "ports[0].port"]);
        assert_eq!(c.pods().count(), 0);
    }
}
