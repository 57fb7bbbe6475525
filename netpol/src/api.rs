//! The Kubernetes objects the engine reads, as the API server serialises them: networking.k8s.io/v1
//! `NetworkPolicy`, core/v1 `Namespace` and `Pod` (only the fields policy needs).
//!
//! Unknown fields are ignored, since real objects carry many more. Where the API tells a missing
//! field from an empty one, so do these types (`Option<Vec<_>>`, `Option<LabelSelector>`); where it
//! does not (labels, `matchLabels`, `except`), `null`, missing and empty all read as empty.
//! Strings the API restricts to an enum (`protocol`, `policyTypes`, `operator`) stay strings here,
//! so that `validate` can name a bad value instead of serde failing on the whole object.

use std::collections::BTreeMap;

use serde::{Deserialize, Deserializer, Serialize};

/// Label keys to values.
pub type Labels = BTreeMap<String, String>;

/// Reads `null` as the type's default (the API server omits empty fields, clients may send null).
fn nullable<'de, D, T>(d: D) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: Default + Deserialize<'de>,
{
    Ok(Option::<T>::deserialize(d)?.unwrap_or_default())
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ObjectMeta {
    #[serde(default, deserialize_with = "nullable")]
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    #[serde(
        default,
        deserialize_with = "nullable",
        skip_serializing_if = "BTreeMap::is_empty"
    )]
    pub labels: Labels,
    #[serde(
        default,
        deserialize_with = "nullable",
        skip_serializing_if = "BTreeMap::is_empty"
    )]
    pub annotations: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uid: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resource_version: Option<String>,
}

/// `matchLabels` AND `matchExpressions`; empty selects everything.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LabelSelector {
    #[serde(
        default,
        deserialize_with = "nullable",
        skip_serializing_if = "BTreeMap::is_empty"
    )]
    pub match_labels: Labels,
    #[serde(
        default,
        deserialize_with = "nullable",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub match_expressions: Vec<LabelSelectorRequirement>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LabelSelectorRequirement {
    #[serde(default, deserialize_with = "nullable")]
    pub key: String,
    /// `In`, `NotIn`, `Exists` or `DoesNotExist`.
    #[serde(default, deserialize_with = "nullable")]
    pub operator: String,
    #[serde(
        default,
        deserialize_with = "nullable",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub values: Vec<String>,
}

/// A port given as a number or as a container port name.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum IntOrString {
    Int(i32),
    String(String),
}

// ---------------------------------------------------------------------------------------------
// networking.k8s.io/v1 NetworkPolicy

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NetworkPolicy {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_version: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    #[serde(default)]
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: NetworkPolicySpec,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NetworkPolicySpec {
    /// The pods of the policy's namespace it applies to; empty selects them all.
    #[serde(default, deserialize_with = "nullable")]
    pub pod_selector: LabelSelector,
    /// None and `[]` both allow nothing (when the policy isolates ingress).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ingress: Option<Vec<NetworkPolicyIngressRule>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub egress: Option<Vec<NetworkPolicyEgressRule>>,
    /// `Ingress` / `Egress`; when absent see [`NetworkPolicySpec::effective_types`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy_types: Option<Vec<String>>,
}

/// The directions a policy isolates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PolicyTypes {
    pub ingress: bool,
    pub egress: bool,
}

impl NetworkPolicySpec {
    /// The API's defaulting rule: without `policyTypes`, Ingress always, Egress only when `egress`
    /// has at least one rule. With it, exactly the listed types.
    pub fn effective_types(&self) -> PolicyTypes {
        match &self.policy_types {
            Some(types) if !types.is_empty() => PolicyTypes {
                ingress: types.iter().any(|t| t == "Ingress"),
                egress: types.iter().any(|t| t == "Egress"),
            },
            _ => PolicyTypes {
                ingress: true,
                egress: self.egress.as_ref().is_some_and(|e| !e.is_empty()),
            },
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NetworkPolicyIngressRule {
    /// None and `[]` both match every source.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from: Option<Vec<NetworkPolicyPeer>>,
    /// None and `[]` both match every port and protocol.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ports: Option<Vec<NetworkPolicyPort>>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NetworkPolicyEgressRule {
    /// None and `[]` both match every destination.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to: Option<Vec<NetworkPolicyPeer>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ports: Option<Vec<NetworkPolicyPort>>,
}

/// One peer: selectors (nil and empty differ!) or an ipBlock, never both.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NetworkPolicyPeer {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_selector: Option<LabelSelector>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace_selector: Option<LabelSelector>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ip_block: Option<IpBlock>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct IpBlock {
    #[serde(default, deserialize_with = "nullable")]
    pub cidr: String,
    #[serde(
        default,
        deserialize_with = "nullable",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub except: Vec<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NetworkPolicyPort {
    /// `TCP` (the default), `UDP` or `SCTP`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocol: Option<String>,
    /// None: every port of the protocol.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<IntOrString>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub end_port: Option<i32>,
}

// ---------------------------------------------------------------------------------------------
// core/v1 Namespace

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Namespace {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_version: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    #[serde(default)]
    pub metadata: ObjectMeta,
}

// ---------------------------------------------------------------------------------------------
// core/v1 Pod

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Pod {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_version: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    #[serde(default)]
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: PodSpec,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<PodStatus>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PodSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_network: Option<bool>,
    #[serde(
        default,
        deserialize_with = "nullable",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub containers: Vec<Container>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Container {
    #[serde(default, deserialize_with = "nullable")]
    pub name: String,
    #[serde(
        default,
        deserialize_with = "nullable",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub ports: Vec<ContainerPort>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ContainerPort {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default)]
    pub container_port: i32,
    /// `TCP` (the default), `UDP` or `SCTP`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocol: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PodStatus {
    /// `Pending`, `Running`, `Succeeded`, `Failed`, `Unknown`. Finished pods keep their `podIP`
    /// although the address may already belong to a new pod.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<String>,
    #[serde(default, rename = "podIP", skip_serializing_if = "Option::is_none")]
    pub pod_ip: Option<String>,
    #[serde(default, rename = "podIPs", skip_serializing_if = "Option::is_none")]
    pub pod_ips: Option<Vec<PodIp>>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PodIp {
    #[serde(default, deserialize_with = "nullable")]
    pub ip: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_a_real_policy_and_ignores_unknown_fields() {
        let json = r#"{
          "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
          "metadata": {"name": "allow-web", "namespace": "x", "uid": "u-1", "generation": 3,
                       "managedFields": [{"manager": "kubectl"}], "labels": {"app": "web"}},
          "spec": {
            "podSelector": {"matchLabels": {"pod": "a"}},
            "ingress": [{"from": [{"namespaceSelector": {}, "podSelector": null},
                                  {"ipBlock": {"cidr": "10.0.0.0/8", "except": ["10.1.0.0/16"]}}],
                         "ports": [{"port": 80}, {"port": "serve-81-tcp", "protocol": "TCP"},
                                   {"protocol": "UDP", "port": 1000, "endPort": 2000}]}],
            "policyTypes": ["Ingress"]
          },
          "status": {}
        }"#;
        let p: NetworkPolicy = serde_json::from_str(json).unwrap();
        assert_eq!(p.metadata.name, "allow-web");
        assert_eq!(p.metadata.namespace.as_deref(), Some("x"));
        assert_eq!(p.metadata.labels["app"], "web");
        let rule = &p.spec.ingress.as_ref().unwrap()[0];
        let from = rule.from.as_ref().unwrap();
        assert_eq!(from[0].namespace_selector, Some(LabelSelector::default()));
        assert_eq!(from[0].pod_selector, None, "null reads as absent");
        assert_eq!(
            from[1].ip_block.as_ref().unwrap().except,
            vec!["10.1.0.0/16"]
        );
        let ports = rule.ports.as_ref().unwrap();
        assert_eq!(ports[0].port, Some(IntOrString::Int(80)));
        assert_eq!(ports[0].protocol, None);
        assert_eq!(
            ports[1].port,
            Some(IntOrString::String("serve-81-tcp".into()))
        );
        assert_eq!(ports[2].end_port, Some(2000));
        assert_eq!(p.spec.egress, None);
    }

    #[test]
    fn missing_and_empty_rules_stay_distinct() {
        let absent: NetworkPolicySpec = serde_json::from_str(r#"{"podSelector": {}}"#).unwrap();
        let empty: NetworkPolicySpec =
            serde_json::from_str(r#"{"podSelector": {}, "ingress": [], "egress": []}"#).unwrap();
        let allow_all: NetworkPolicySpec =
            serde_json::from_str(r#"{"podSelector": {}, "ingress": [{}]}"#).unwrap();
        assert_eq!(absent.ingress, None);
        assert_eq!(empty.ingress, Some(vec![]));
        assert_eq!(empty.egress, Some(vec![]));
        assert_eq!(
            allow_all.ingress,
            Some(vec![NetworkPolicyIngressRule::default()])
        );
        let r = &allow_all.ingress.as_ref().unwrap()[0];
        assert_eq!((r.from.as_ref(), r.ports.as_ref()), (None, None));

        let rules: NetworkPolicyIngressRule =
            serde_json::from_str(r#"{"from": [], "ports": []}"#).unwrap();
        assert_eq!(rules.from, Some(vec![]));
        assert_eq!(rules.ports, Some(vec![]));
        assert_eq!(absent.policy_types, None);
    }

    #[test]
    fn serialises_back_in_api_form() {
        let p = NetworkPolicy {
            api_version: Some("networking.k8s.io/v1".into()),
            kind: Some("NetworkPolicy".into()),
            metadata: ObjectMeta {
                name: "p".into(),
                namespace: Some("x".into()),
                ..Default::default()
            },
            spec: NetworkPolicySpec {
                ingress: Some(vec![NetworkPolicyIngressRule {
                    from: Some(vec![]),
                    ports: Some(vec![NetworkPolicyPort {
                        port: Some(IntOrString::Int(80)),
                        end_port: Some(90),
                        ..Default::default()
                    }]),
                }]),
                ..Default::default()
            },
        };
        let v = serde_json::to_value(&p).unwrap();
        assert_eq!(v["apiVersion"], "networking.k8s.io/v1");
        assert_eq!(v["spec"]["podSelector"], serde_json::json!({}));
        assert_eq!(v["spec"]["ingress"][0]["from"], serde_json::json!([]));
        assert_eq!(v["spec"]["ingress"][0]["ports"][0]["endPort"], 90);
        assert!(v["spec"].get("egress").is_none());
        assert!(v["spec"].get("policyTypes").is_none());
        let back: NetworkPolicy = serde_json::from_value(v).unwrap();
        assert_eq!(back, p);
    }

    #[test]
    fn reads_a_real_pod() {
        let json = r#"{
          "apiVersion": "v1", "kind": "Pod",
          "metadata": {"name": "a", "namespace": "x", "labels": {"pod": "a"}},
          "spec": {"nodeName": "n1", "restartPolicy": "Always",
                   "containers": [{"name": "cont-80-tcp", "image": "agnhost",
                                   "ports": [{"name": "serve-80-tcp", "containerPort": 80, "protocol": "TCP"}]},
                                  {"name": "cont-81-udp",
                                   "ports": [{"name": "serve-81-udp", "containerPort": 81, "protocol": "UDP"}]},
                                  {"name": "no-ports"}]},
          "status": {"phase": "Running", "podIP": "10.244.1.5",
                     "podIPs": [{"ip": "10.244.1.5"}, {"ip": "fd00::5"}], "hostIP": "198.18.0.11"}
        }"#;
        let p: Pod = serde_json::from_str(json).unwrap();
        assert_eq!(p.spec.node_name.as_deref(), Some("n1"));
        assert_eq!(p.spec.host_network, None);
        assert_eq!(p.spec.containers.len(), 3);
        assert_eq!(p.spec.containers[1].ports[0].container_port, 81);
        assert_eq!(
            p.spec.containers[1].ports[0].protocol.as_deref(),
            Some("UDP")
        );
        assert!(p.spec.containers[2].ports.is_empty());
        let st = p.status.unwrap();
        assert_eq!(st.pod_ip.as_deref(), Some("10.244.1.5"));
        assert_eq!(st.pod_ips.unwrap()[1].ip, "fd00::5");
        assert_eq!(st.phase.as_deref(), Some("Running"));
    }

    #[test]
    fn reads_a_namespace_with_null_labels() {
        let ns: Namespace =
            serde_json::from_str(r#"{"metadata": {"name": "y", "labels": null}, "spec": {}}"#)
                .unwrap();
        assert_eq!(ns.metadata.name, "y");
        assert!(ns.metadata.labels.is_empty());
    }

    #[test]
    fn policy_types_default() {
        let spec = |j: &str| {
            serde_json::from_str::<NetworkPolicySpec>(j)
                .unwrap()
                .effective_types()
        };
        let t = |ingress, egress| PolicyTypes { ingress, egress };
        assert_eq!(spec(r#"{}"#), t(true, false));
        assert_eq!(spec(r#"{"ingress": []}"#), t(true, false));
        assert_eq!(
            spec(r#"{"egress": []}"#),
            t(true, false),
            "empty egress does not add Egress"
        );
        assert_eq!(
            spec(r#"{"egress": [{}]}"#),
            t(true, true),
            "egress-only still isolates ingress"
        );
        assert_eq!(
            spec(r#"{"policyTypes": [], "egress": [{}]}"#),
            t(true, true)
        );
        assert_eq!(
            spec(r#"{"policyTypes": ["Egress"], "ingress": [{}]}"#),
            t(false, true)
        );
        assert_eq!(
            spec(r#"{"policyTypes": ["Ingress"], "egress": [{}]}"#),
            t(true, false)
        );
        assert_eq!(
            spec(r#"{"policyTypes": ["Ingress", "Egress"]}"#),
            t(true, true)
        );
    }
}
