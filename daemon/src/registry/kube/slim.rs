//! A Node as the peer watcher decodes it: name, resourceVersion, creationTimestamp, annotations
//! and podCIDRs, and nothing else. Every kubelet status write of every Node reaches every twilld; decoding the
//! whole object (status with its conditions and image list, managedFields) for each would make
//! a big cluster's heartbeats cost real CPU. Unknown fields are skipped without allocating.

use std::borrow::Cow;
use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{Node, NodeSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};
use kube::core::ClusterResourceScope;
use serde::{Deserialize, Deserializer};

#[derive(Clone, Debug, Default)]
pub struct SlimNode {
    pub metadata: ObjectMeta,
    pub pod_cidr: Option<String>,
    pub pod_cidrs: Option<Vec<String>>,
}

impl SlimNode {
    /// As a `Node` for `node.rs`'s functions (spec's podCIDRs only, no status).
    pub fn into_node(self) -> Node {
        Node {
            metadata: self.metadata,
            spec: Some(NodeSpec {
                pod_cidr: self.pod_cidr,
                pod_cidrs: self.pod_cidrs,
                ..Default::default()
            }),
            status: None,
        }
    }
}

impl<'de> Deserialize<'de> for SlimNode {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize, Default)]
        #[serde(default, rename_all = "camelCase")]
        struct Meta {
            name: Option<String>,
            resource_version: Option<String>,
            uid: Option<String>,
            creation_timestamp: Option<Time>,
            annotations: Option<BTreeMap<String, String>>,
        }
        #[derive(Deserialize, Default)]
        #[serde(default)]
        struct Spec {
            #[serde(rename = "podCIDR")]
            pod_cidr: Option<String>,
            #[serde(rename = "podCIDRs")]
            pod_cidrs: Option<Vec<String>>,
        }
        #[derive(Deserialize, Default)]
        #[serde(default)]
        struct Raw {
            metadata: Meta,
            spec: Option<Spec>,
        }
        let r = Raw::deserialize(d)?;
        let spec = r.spec.unwrap_or_default();
        Ok(SlimNode {
            metadata: ObjectMeta {
                name: r.metadata.name,
                resource_version: r.metadata.resource_version,
                uid: r.metadata.uid,
                creation_timestamp: r.metadata.creation_timestamp,
                annotations: r.metadata.annotations,
                ..Default::default()
            },
            pod_cidr: spec.pod_cidr,
            pod_cidrs: spec.pod_cidrs,
        })
    }
}

impl kube::Resource for SlimNode {
    type DynamicType = ();
    type Scope = ClusterResourceScope;

    fn kind(_: &()) -> Cow<'_, str> {
        "Node".into()
    }
    fn group(_: &()) -> Cow<'_, str> {
        "".into()
    }
    fn version(_: &()) -> Cow<'_, str> {
        "v1".into()
    }
    fn plural(_: &()) -> Cow<'_, str> {
        "nodes".into()
    }
    fn meta(&self) -> &ObjectMeta {
        &self.metadata
    }
    fn meta_mut(&mut self) -> &mut ObjectMeta {
        &mut self.metadata
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn keeps_what_a_peer_needs_and_drops_status_and_managed_fields() {
        let v = json!({
            "apiVersion": "v1", "kind": "Node",
            "metadata": {"name": "n2", "resourceVersion": "17", "uid": "u",
                         "creationTimestamp": "2026-01-01T00:00:00Z", "labels": {"a": "b"},
                         "annotations": {"flannel.alpha.coreos.com/public-ip": "198.18.0.12"},
                         "managedFields": [{"manager": "kubelet", "fieldsV1": {"f:status": {}}}]},
            "spec": {"podCIDR": "10.244.2.0/24", "podCIDRs": ["10.244.2.0/24", "fd00::/64"],
                     "providerID": "x"},
            "status": {"conditions": [{"type": "Ready", "status": "True"}],
                       "images": [{"names": ["a"], "sizeBytes": 1}]}
        });
        let slim: SlimNode = serde_json::from_value(v.clone()).unwrap();
        let node = slim.into_node();
        let full: Node = serde_json::from_value(v).unwrap();
        assert_eq!(node.metadata.name, full.metadata.name);
        assert_eq!(node.metadata.resource_version.as_deref(), Some("17"));
        // Which of two Nodes keeps a VTEP MAC goes by it.
        assert_eq!(
            node.metadata.creation_timestamp,
            full.metadata.creation_timestamp
        );
        assert!(node.metadata.creation_timestamp.is_some());
        assert_eq!(node.metadata.annotations, full.metadata.annotations);
        assert!(node.metadata.managed_fields.is_none());
        let (s, f) = (node.spec.unwrap(), full.spec.unwrap());
        assert_eq!((s.pod_cidr, s.pod_cidrs), (f.pod_cidr, f.pod_cidrs));
        assert!(node.status.is_none());
        // What the peer rules see is the same.
        let a = crate::registry::kube::annotations::Annotations::default();
        let full: Node = serde_json::from_value(json!({
            "metadata": {"name": "n2", "annotations": {"x": "y"}},
            "spec": {"podCIDR": "10.244.2.0/24"},
            "status": {"conditions": [{"type": "Ready", "status": "True"}]}
        }))
        .unwrap();
        let slim: SlimNode = serde_json::from_value(serde_json::to_value(&full).unwrap()).unwrap();
        assert_eq!(
            super::super::node::node_digest(&slim.into_node(), &a),
            super::super::node::node_digest(&full, &a)
        );
    }
}
