//! Kubernetes mode's object store for the policy engine: NetworkPolicies, Namespaces and Pods
//! read from the API server, shaped as the engine reads them from etcd in etcd mode (the same
//! JSON, keys `<namespace>/<name>`, resourceVersions as revisions). So one engine serves both.
//!
//! Only what policy needs is kept of each object (names, labels, node, container ports, pod
//! IPs, the policy spec): memory stays flat on big clusters. Pods with `hostNetwork` are left
//! out: their address is their node's, and NetworkPolicy does not apply to them. Pods belong to
//! the API server here: twilld writes none (its own pods' records stay in its state dir).

use futures::stream::BoxStream;
use futures::StreamExt;
use k8s_openapi::api::core::v1::{Namespace, Pod};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use kube::api::{Api, ListParams, WatchEvent, WatchParams};
use kube::{Client, Resource, ResourceExt};
use serde_json::{json, Value};

use crate::policy::{NAMESPACES, PODS, POLICIES};
use crate::registry::objects::{ObjChange, ObjKv, ObjWatch, ObjWatchMsg, ObjectStore, Removal};
use crate::registry::RegistryError;

/// Server-side timeout of each watch call; the watch is reopened from where it was.
const WATCH_TIMEOUT_S: u32 = 290;
/// Objects per list page.
const PAGE: u32 = 500;

#[derive(Clone)]
pub struct KubeObjects {
    client: Client,
}

impl KubeObjects {
    pub fn new(client: Client) -> KubeObjects {
        KubeObjects { client }
    }
}

fn api_err(e: kube::Error) -> RegistryError {
    RegistryError::Kube(e.to_string())
}

fn revision(rv: Option<&String>) -> i64 {
    rv.and_then(|v| v.parse().ok()).unwrap_or(0)
}

fn key_of<K: Resource>(o: &K) -> String {
    match o.meta().namespace.as_deref() {
        Some(ns) => format!("{ns}/{}", o.name_any()),
        None => o.name_any(),
    }
}

fn kv(key: String, value: Value, rv: Option<&String>) -> ObjKv {
    ObjKv {
        key,
        value: value.to_string().into_bytes(),
        mod_revision: revision(rv),
    }
}

/// The uid the kubelet gives the pod's sandbox, which the runtime passes to CNI as
/// `K8S_POD_UID`: the object's own, except for a static pod, whose object is a mirror of the
/// kubelet's pod and names that pod's uid in an annotation.
fn runtime_uid(p: &Pod) -> Option<String> {
    p.annotations()
        .get(MIRROR_ANNOTATION)
        .filter(|u| !u.is_empty())
        .cloned()
        .or_else(|| p.meta().uid.clone())
}

const MIRROR_ANNOTATION: &str = "kubernetes.io/config.mirror";

/// A Pod as the engine reads it; None for a host-network pod.
pub fn pod_kv(p: &Pod) -> Option<ObjKv> {
    let spec = p.spec.as_ref();
    if spec.and_then(|s| s.host_network) == Some(true) {
        return None;
    }
    let containers: Vec<Value> = spec
        .map(|s| {
            s.containers
                .iter()
                .map(|c| json!({"name": c.name, "ports": c.ports.clone().unwrap_or_default()}))
                .collect()
        })
        .unwrap_or_default();
    let status = p.status.as_ref();
    let value = json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": p.name_any(),
            "namespace": p.namespace(),
            "labels": p.labels(),
            // Tells a pod from an earlier one of its name (an ADD carries K8S_POD_UID).
            "uid": runtime_uid(p),
        },
        "spec": {
            "nodeName": spec.and_then(|s| s.node_name.clone()),
            "containers": containers,
        },
        "status": {
            "phase": status.and_then(|s| s.phase.clone()),
            "podIP": status.and_then(|s| s.pod_ip.clone()),
            "podIPs": status.and_then(|s| s.pod_ips.clone()).unwrap_or_default(),
        },
    });
    Some(kv(key_of(p), value, p.meta().resource_version.as_ref()))
}

pub fn namespace_kv(n: &Namespace) -> Option<ObjKv> {
    let value = json!({
        "apiVersion": "v1",
        "kind": "Namespace",
        "metadata": {"name": n.name_any(), "labels": n.labels()},
    });
    Some(kv(key_of(n), value, n.meta().resource_version.as_ref()))
}

pub fn policy_kv(p: &NetworkPolicy) -> Option<ObjKv> {
    let value = json!({
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {"name": p.name_any(), "namespace": p.namespace()},
        "spec": p.spec,
    });
    Some(kv(key_of(p), value, p.meta().resource_version.as_ref()))
}

/// Every object of one kind, page by page, and the list's resourceVersion.
async fn list_all<K>(
    api: Api<K>,
    conv: fn(&K) -> Option<ObjKv>,
) -> Result<(Vec<ObjKv>, i64), RegistryError>
where
    K: Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    let mut out = Vec::new();
    let mut token: Option<String> = None;
    loop {
        let mut lp = ListParams::default().limit(PAGE);
        if let Some(t) = &token {
            lp = lp.continue_token(t);
        }
        let page = api.list(&lp).await.map_err(api_err)?;
        out.extend(page.items.iter().filter_map(conv));
        match page.metadata.continue_.filter(|t| !t.is_empty()) {
            Some(t) => token = Some(t),
            None => return Ok((out, revision(page.metadata.resource_version.as_ref()))),
        }
    }
}

/// One event of a watch, whatever its kind.
enum Ev {
    Put(ObjKv),
    /// The key, and the resourceVersion of the delete (the object's, as last written).
    Delete(String, Option<String>),
    /// Nothing changed; the watch is at this resourceVersion.
    At(String),
    Gone(String),
    Failed(String),
}

fn ev<K: Resource>(e: WatchEvent<K>, conv: fn(&K) -> Option<ObjKv>) -> Ev {
    match e {
        WatchEvent::Added(o) | WatchEvent::Modified(o) => match conv(&o) {
            Some(kv) => Ev::Put(kv),
            // Left out (a host-network pod): as if it were not there.
            None => Ev::Delete(key_of(&o), o.meta().resource_version.clone()),
        },
        WatchEvent::Deleted(o) => Ev::Delete(key_of(&o), o.meta().resource_version.clone()),
        WatchEvent::Bookmark(b) => Ev::At(b.metadata.resource_version),
        WatchEvent::Error(s) if s.code == 410 => Ev::Gone(s.message),
        WatchEvent::Error(s) => Ev::Failed(format!("{} ({})", s.message, s.code)),
    }
}

async fn open(
    client: &Client,
    dir: &str,
    rv: &str,
) -> Result<BoxStream<'static, Result<Ev, kube::Error>>, kube::Error> {
    let wp = WatchParams::default().timeout(WATCH_TIMEOUT_S);
    Ok(match dir {
        PODS => Api::<Pod>::all(client.clone())
            .watch(&wp, rv)
            .await?
            .map(|r| r.map(|e| ev(e, pod_kv)))
            .boxed(),
        NAMESPACES => Api::<Namespace>::all(client.clone())
            .watch(&wp, rv)
            .await?
            .map(|r| r.map(|e| ev(e, namespace_kv)))
            .boxed(),
        _ => Api::<NetworkPolicy>::all(client.clone())
            .watch(&wp, rv)
            .await?
            .map(|r| r.map(|e| ev(e, policy_kv)))
            .boxed(),
    })
}

/// A watch of one kind; a watch call that times out is reopened from the last resourceVersion
/// seen, so only a 410 Gone (history compacted) or an error makes the engine list again.
pub struct KubeWatch {
    client: Client,
    dir: &'static str,
    rv: String,
    stream: Option<BoxStream<'static, Result<Ev, kube::Error>>>,
}

impl ObjWatch for KubeWatch {
    async fn next(&mut self) -> Result<ObjWatchMsg, RegistryError> {
        loop {
            let stream = match &mut self.stream {
                Some(s) => s,
                None => self.stream.insert(
                    open(&self.client, self.dir, &self.rv)
                        .await
                        .map_err(api_err)?,
                ),
            };
            match stream.next().await {
                None => self.stream = None,
                Some(Err(e)) => return Err(api_err(e)),
                Some(Ok(Ev::At(rv))) => self.rv = rv,
                Some(Ok(Ev::Gone(why))) => {
                    return Ok(ObjWatchMsg::Reset(format!("410 Gone: {why}")))
                }
                Some(Ok(Ev::Failed(why))) => return Ok(ObjWatchMsg::Reset(why)),
                Some(Ok(Ev::Put(kv))) => {
                    self.rv = kv.mod_revision.to_string();
                    return Ok(ObjWatchMsg::Changes(vec![ObjChange::Put(kv)]));
                }
                Some(Ok(Ev::Delete(key, rv))) => {
                    // Reopened after a timeout, the watch starts past the delete.
                    if let Some(rv) = rv {
                        self.rv = rv;
                    }
                    return Ok(ObjWatchMsg::Changes(vec![ObjChange::Delete(key)]));
                }
            }
        }
    }
}

fn dir_static(dir: &str) -> &'static str {
    match dir {
        PODS => PODS,
        NAMESPACES => NAMESPACES,
        _ => POLICIES,
    }
}

impl ObjectStore for KubeObjects {
    type Watch = KubeWatch;

    async fn list(&self, dir: &str) -> Result<(Vec<ObjKv>, i64), RegistryError> {
        let c = self.client.clone();
        match dir {
            PODS => list_all(Api::<Pod>::all(c), pod_kv).await,
            NAMESPACES => list_all(Api::<Namespace>::all(c), namespace_kv).await,
            _ => list_all(Api::<NetworkPolicy>::all(c), policy_kv).await,
        }
    }

    /// `from_revision` is etcd's "from this revision on", as `watch_dir` passes it: the
    /// API's "after this resourceVersion" is one less.
    async fn watch(&self, dir: &str, from_revision: i64) -> Result<KubeWatch, RegistryError> {
        let rv = (from_revision - 1).max(0).to_string();
        let stream = open(&self.client, dir, &rv).await.map_err(api_err)?;
        Ok(KubeWatch {
            client: self.client.clone(),
            dir: dir_static(dir),
            rv,
            stream: Some(stream),
        })
    }

    async fn get(&self, dir: &str, key: &str) -> Result<Option<ObjKv>, RegistryError> {
        let c = self.client.clone();
        let (ns, name) = key.split_once('/').unwrap_or(("", key));
        let got = match dir {
            PODS => Api::<Pod>::namespaced(c, ns)
                .get_opt(name)
                .await
                .map(|o| o.as_ref().and_then(pod_kv)),
            NAMESPACES => Api::<Namespace>::all(c)
                .get_opt(key)
                .await
                .map(|o| o.as_ref().and_then(namespace_kv)),
            _ => Api::<NetworkPolicy>::namespaced(c, ns)
                .get_opt(name)
                .await
                .map(|o| o.as_ref().and_then(policy_kv)),
        };
        got.map_err(api_err)
    }

    /// Pods are the API server's: twilld keeps its own pods' records in its state dir only.
    async fn put(&self, dir: &str, _key: &str, _value: &[u8]) -> Result<(), RegistryError> {
        read_only(dir)
    }

    async fn delete(&self, dir: &str, _key: &str) -> Result<bool, RegistryError> {
        read_only(dir).map(|()| false)
    }

    /// Nothing to delete (pods: no records of ours here; the rest: refused).
    async fn delete_at(&self, dir: &str, _key: &str, _rev: i64) -> Result<bool, RegistryError> {
        read_only(dir).map(|()| false)
    }

    /// Without a read first: there are no records of ours to check in the API.
    async fn delete_if<F>(&self, dir: &str, _key: &str, _ours: F) -> Result<Removal, RegistryError>
    where
        F: Fn(&[u8]) -> bool + Send + Sync,
    {
        read_only(dir).map(|()| Removal::Absent)
    }
}

fn read_only(dir: &str) -> Result<(), RegistryError> {
    if dir == PODS {
        Ok(())
    } else {
        Err(RegistryError::Kube(format!(
            "{dir} are read from the Kubernetes API in Kubernetes mode; change them there"
        )))
    }
}

/// Labels of the objects listed, for tests.
#[cfg(test)]
fn labels_of(kvs: &[ObjKv]) -> std::collections::BTreeMap<String, Value> {
    kvs.iter()
        .map(|kv| {
            let v: Value = serde_json::from_slice(&kv.value).unwrap();
            (kv.key.clone(), v["metadata"]["labels"].clone())
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(v: Value) -> Pod {
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn pods_keep_what_policy_reads_and_host_network_pods_are_left_out() {
        let p = pod(json!({
            "metadata": {"name": "web-1", "namespace": "shop", "labels": {"app": "web"},
                         "resourceVersion": "42", "uid": "u-7", "managedFields": [{"manager": "kubelet"}],
                         "annotations": {"big": "x".repeat(1000)}},
            "spec": {"nodeName": "n1", "containers": [{"name": "c", "image": "nginx",
                     "ports": [{"name": "http", "containerPort": 8080, "protocol": "TCP"}]}]},
            "status": {"phase": "Running", "podIP": "10.244.1.5", "podIPs": [{"ip": "10.244.1.5"}]}
        }));
        let kv = pod_kv(&p).expect("a pod");
        assert_eq!(kv.key, "shop/web-1");
        assert_eq!(kv.mod_revision, 42);
        let v: Value = serde_json::from_slice(&kv.value).unwrap();
        assert_eq!(
            v["spec"]["containers"][0]["ports"][0]["containerPort"],
            8080
        );
        assert_eq!(v["status"]["podIP"], "10.244.1.5");
        assert!(v["metadata"].get("managedFields").is_none());
        assert!(v["metadata"].get("annotations").is_none());
        // What the engine parses.
        let parsed: netpol::api::Pod = serde_json::from_slice(&kv.value).unwrap();
        assert_eq!(parsed.metadata.uid.as_deref(), Some("u-7"));
        // A static pod's mirror: the uid its CNI ADD carries is the kubelet's, in an annotation.
        let mut mirror = p.clone();
        mirror
            .metadata
            .annotations
            .get_or_insert_with(Default::default)
            .insert(MIRROR_ANNOTATION.into(), "3f1c0ffee".into());
        let v: Value = serde_json::from_slice(&pod_kv(&mirror).unwrap().value).unwrap();
        assert_eq!(v["metadata"]["uid"], "3f1c0ffee");
        let rec = netpol::model::PodRecord::from_api(&parsed).unwrap();
        assert!(rec.1.is_live());
        assert_eq!(labels_of(&[kv])["shop/web-1"]["app"], "web");

        let host = pod(json!({
            "metadata": {"name": "kube-proxy-x", "namespace": "kube-system"},
            "spec": {"hostNetwork": true, "nodeName": "n1", "containers": []},
            "status": {"phase": "Running", "podIP": "198.18.0.11"}
        }));
        assert!(pod_kv(&host).is_none());
        assert!(matches!(
            ev(WatchEvent::Modified(host), pod_kv),
            Ev::Delete(k, _) if k == "kube-system/kube-proxy-x"
        ));
    }

    #[test]
    fn policies_and_namespaces_parse_as_the_engine_reads_them() {
        let np: NetworkPolicy = serde_json::from_value(json!({
            "metadata": {"name": "deny", "namespace": "shop", "uid": "u", "generation": 3},
            "spec": {"podSelector": {}, "policyTypes": ["Ingress"]}
        }))
        .unwrap();
        let kv = policy_kv(&np).unwrap();
        assert_eq!(kv.key, "shop/deny");
        let parsed: netpol::api::NetworkPolicy = serde_json::from_slice(&kv.value).unwrap();
        assert_eq!(parsed.metadata.name, "deny");
        let ns: Namespace = serde_json::from_value(json!({
            "metadata": {"name": "shop", "labels": {"team": "a"}}
        }))
        .unwrap();
        let kv = namespace_kv(&ns).unwrap();
        assert_eq!(kv.key, "shop");
        let parsed: netpol::api::Namespace = serde_json::from_slice(&kv.value).unwrap();
        assert_eq!(parsed.metadata.labels["team"], "a");
    }

    #[test]
    fn a_410_is_a_relist_and_bookmarks_move_the_resource_version() {
        let gone: WatchEvent<Pod> = serde_json::from_value(json!({
            "type": "ERROR",
            "object": {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                       "message": "too old resource version", "reason": "Expired", "code": 410}
        }))
        .unwrap();
        assert!(matches!(ev(gone, pod_kv), Ev::Gone(_)));
        let bm: WatchEvent<Pod> = serde_json::from_value(json!({
            "type": "BOOKMARK",
            "object": {"kind": "Pod", "apiVersion": "v1", "metadata": {"resourceVersion": "77"}}
        }))
        .unwrap();
        assert!(matches!(ev(bm, pod_kv), Ev::At(rv) if rv == "77"));
        // A delete moves it too: a watch reopened after it starts past it.
        let del: WatchEvent<Pod> = serde_json::from_value(json!({
            "type": "DELETED",
            "object": {"kind": "Pod", "apiVersion": "v1",
                       "metadata": {"name": "a", "namespace": "x", "resourceVersion": "90"}}
        }))
        .unwrap();
        assert!(matches!(
            ev(del, pod_kv),
            Ev::Delete(k, Some(rv)) if k == "x/a" && rv == "90"
        ));
    }
}
