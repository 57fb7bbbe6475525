//! One watch event's line to what the peer watcher needs: nothing for a heartbeat, else the
//! slim Node. A kubelet status write changes a Node's status and resourceVersion (and its
//! managedFields) but never its spec, creation time or annotations, which are all a peer is
//! made of. A probe that borrows from the line hashes the raw text of those three, and an
//! update whose hash is the one seen last for that Node is settled before anything is decoded.
//! Anything else is decoded slim and judged by `Peers` as before, so a change the probe does
//! not see as one cannot be lost; at worst it is decoded for nothing.

use std::borrow::Cow;
use std::collections::hash_map::DefaultHasher;
use std::collections::HashMap;
use std::hash::{Hash, Hasher};

use k8s_openapi::api::core::v1::Node;
use serde::Deserialize;
use serde_json::value::RawValue;

use super::NodeWatchError;
use crate::registry::kube::slim::SlimNode;

/// What a line said.
#[derive(Debug)]
pub enum Line {
    /// A Node added or changed in what makes it a peer (or seen first since the list).
    Apply(Node),
    Delete(Node),
    /// A heartbeat, a bookmark: only the resourceVersion moved.
    Nothing,
}

#[derive(Deserialize)]
struct Probe<'a> {
    #[serde(rename = "type", borrow)]
    kind: Cow<'a, str>,
    #[serde(borrow)]
    object: ProbeObject<'a>,
}

#[derive(Deserialize)]
struct ProbeObject<'a> {
    #[serde(borrow, default)]
    metadata: Option<ProbeMeta<'a>>,
    #[serde(borrow, default)]
    spec: Option<&'a RawValue>,
}

#[derive(Deserialize)]
struct ProbeMeta<'a> {
    #[serde(borrow, default)]
    name: Option<Cow<'a, str>>,
    #[serde(rename = "resourceVersion", borrow, default)]
    resource_version: Option<Cow<'a, str>>,
    #[serde(rename = "creationTimestamp", borrow, default)]
    created: Option<&'a RawValue>,
    #[serde(borrow, default)]
    annotations: Option<&'a RawValue>,
}

#[derive(Deserialize)]
struct Full {
    #[serde(rename = "type")]
    kind: String,
    object: SlimNode,
}

/// An ERROR event's object: a Status.
#[derive(Deserialize)]
struct Status {
    #[serde(default)]
    code: u16,
    #[serde(default)]
    message: String,
}

/// Reads a watch's lines; keeps the resourceVersion to resume from and, per Node, the hash of
/// what a heartbeat leaves alone.
#[derive(Debug)]
pub struct Events {
    seen: HashMap<String, u64>,
    /// The last resourceVersion read (a watch resumes from it).
    pub resource_version: String,
}

impl Events {
    pub fn new(resource_version: String) -> Events {
        Events {
            seen: HashMap::new(),
            resource_version,
        }
    }

    pub fn line(&mut self, line: &[u8]) -> Result<Line, NodeWatchError> {
        // A line the probe cannot read is decoded in full below, which says what is wrong.
        if let Ok(p) = serde_json::from_slice::<Probe>(line) {
            if let (Some(rv), "ADDED" | "MODIFIED" | "BOOKMARK") = (
                p.object
                    .metadata
                    .as_ref()
                    .and_then(|m| m.resource_version.as_deref()),
                &*p.kind,
            ) {
                self.resource_version.clear();
                self.resource_version.push_str(rv);
            }
            match &*p.kind {
                "BOOKMARK" => return Ok(Line::Nothing),
                "ADDED" | "MODIFIED" => {
                    if let Some((name, hash)) = p.object.metadata.as_ref().and_then(|m| {
                        let name = m.name.as_deref()?;
                        let mut h = DefaultHasher::new();
                        p.object.spec.map(RawValue::get).hash(&mut h);
                        m.created.map(RawValue::get).hash(&mut h);
                        m.annotations.map(RawValue::get).hash(&mut h);
                        Some((name, h.finish()))
                    }) {
                        match self.seen.get_mut(name) {
                            Some(old) if *old == hash => return Ok(Line::Nothing),
                            Some(old) => *old = hash,
                            None => {
                                self.seen.insert(name.to_string(), hash);
                            }
                        }
                    }
                }
                _ => {}
            }
        }
        let full: Full = serde_json::from_slice(line).map_err(NodeWatchError::Decode)?;
        if matches!(full.kind.as_str(), "ADDED" | "MODIFIED" | "DELETED")
            && full.object.metadata.name.is_none()
        {
            return Err(NodeWatchError::Http(format!(
                "a {} watch event without a Node name",
                full.kind
            )));
        }
        if let Some(rv) = &full.object.metadata.resource_version {
            self.resource_version.clone_from(rv);
        }
        match full.kind.as_str() {
            "ADDED" | "MODIFIED" => Ok(Line::Apply(full.object.into_node())),
            "DELETED" => {
                if let Some(name) = &full.object.metadata.name {
                    self.seen.remove(name);
                }
                Ok(Line::Delete(full.object.into_node()))
            }
            "BOOKMARK" => Ok(Line::Nothing),
            "ERROR" => Err(error_event(line)),
            other => Err(NodeWatchError::Http(format!(
                "a watch event of unknown type {other:?}"
            ))),
        }
    }
}

/// An ERROR event: 410 is a resourceVersion too old (list again), anything else as it says.
fn error_event(line: &[u8]) -> NodeWatchError {
    #[derive(Deserialize)]
    struct E {
        object: Status,
    }
    match serde_json::from_slice::<E>(line) {
        Ok(E { object }) if object.code == 410 => NodeWatchError::Gone,
        Ok(E { object }) => NodeWatchError::Status {
            code: object.code,
            message: object.message,
        },
        Err(e) => NodeWatchError::Decode(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kube::ResourceExt;
    use serde_json::{json, Value};

    fn node(name: &str, rv: &str, beat: &str, public_ip: &str) -> Value {
        json!({
            "metadata": {
                "name": name, "resourceVersion": rv, "creationTimestamp": "2026-01-01T00:00:00Z",
                "annotations": {"flannel.alpha.coreos.com/public-ip": public_ip,
                                "flannel.alpha.coreos.com/backend-data": "{\"VNI\":1,\"VtepMAC\":\"02:00:00:00:00:01\"}"},
                "managedFields": [{"manager": "kubelet", "time": beat}]
            },
            "spec": {"podCIDR": "10.1.1.0/24", "podCIDRs": ["10.1.1.0/24"]},
            "status": {"conditions": [{"type": "Ready", "status": "True", "lastHeartbeatTime": beat}]}
        })
    }

    fn line(kind: &str, obj: Value) -> Vec<u8> {
        format!("{}\n", json!({"type": kind, "object": obj})).into_bytes()
    }

    #[test]
    fn a_heartbeat_is_settled_and_a_change_is_not() {
        let mut ev = Events::new("1".into());
        // First sight since the list: decoded and handed on.
        let first = ev
            .line(&line("MODIFIED", node("a", "5", "t1", "198.19.0.1")))
            .unwrap();
        assert!(matches!(&first, Line::Apply(n) if n.name_any() == "a"));
        assert_eq!(ev.resource_version, "5");
        // A heartbeat: status, managedFields and resourceVersion move.
        let beat = ev
            .line(&line("MODIFIED", node("a", "6", "t2", "198.19.0.1")))
            .unwrap();
        assert!(matches!(beat, Line::Nothing));
        assert_eq!(ev.resource_version, "6");
        // Another Node's first event is its own.
        assert!(matches!(
            ev.line(&line("MODIFIED", node("b", "7", "t2", "198.19.0.2")))
                .unwrap(),
            Line::Apply(_)
        ));
        // An annotation changed.
        assert!(matches!(
            ev.line(&line("MODIFIED", node("a", "8", "t3", "198.19.0.9")))
                .unwrap(),
            Line::Apply(n) if n.annotations()["flannel.alpha.coreos.com/public-ip"] == "198.19.0.9"
        ));
        // The spec changed.
        let mut n = node("a", "9", "t3", "198.19.0.9");
        n["spec"]["podCIDRs"] = json!(["10.1.1.0/24", "fd00::/64"]);
        assert!(matches!(
            ev.line(&line("MODIFIED", n)).unwrap(),
            Line::Apply(_)
        ));
    }

    #[test]
    fn a_delete_is_handed_on_and_forgets_the_node() {
        let mut ev = Events::new("1".into());
        let a = node("a", "5", "t1", "198.19.0.1");
        ev.line(&line("ADDED", a.clone())).unwrap();
        assert!(matches!(
            ev.line(&line("DELETED", node("a", "6", "t1", "198.19.0.1")))
                .unwrap(),
            Line::Delete(n) if n.name_any() == "a"
        ));
        assert_eq!(ev.resource_version, "6");
        // Created again with the same content: not a heartbeat.
        assert!(matches!(
            ev.line(&line("ADDED", a)).unwrap(),
            Line::Apply(_)
        ));
    }

    #[test]
    fn bookmarks_move_the_resource_version_only() {
        let mut ev = Events::new("1".into());
        let b = line(
            "BOOKMARK",
            json!({"kind": "Node", "apiVersion": "v1", "metadata": {"resourceVersion": "42"}}),
        );
        assert!(matches!(ev.line(&b).unwrap(), Line::Nothing));
        assert_eq!(ev.resource_version, "42");
    }

    #[test]
    fn error_events_say_what_they_are() {
        let mut ev = Events::new("1".into());
        let gone = line(
            "ERROR",
            json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
                   "message": "too old resource version: 1 (5)", "reason": "Expired", "code": 410}),
        );
        assert!(matches!(ev.line(&gone), Err(NodeWatchError::Gone)));
        let other = line(
            "ERROR",
            json!({"kind": "Status", "status": "Failure", "message": "internal", "code": 500}),
        );
        assert!(matches!(
            ev.line(&other),
            Err(NodeWatchError::Status { code: 500, .. })
        ));
        assert_eq!(ev.resource_version, "1");
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        let mut ev = Events::new("1".into());
        for l in [
            &b"not json\n"[..],
            b"{\"type\":\"MODIFIED\"}\n",
            b"{\"type\":\"MODIFIED\",\"object\":[]}\n",
            b"{\"type\":\"WHAT\",\"object\":{}}\n",
            b"\n",
        ] {
            assert!(ev.line(l).is_err(), "{}", String::from_utf8_lossy(l));
        }
    }
}
