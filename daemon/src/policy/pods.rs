//! Who a pod is, in etcd mode: from its CNI request. Namespace and name from CNI_ARGS
//! (`K8S_POD_NAMESPACE`, `K8S_POD_NAME`, as kubelet, containerd and CRI-O send them; `default`
//! and the container ID when absent); labels from `args.cni.labels` (the CNI convention, a list
//! of `{key, value}`); declared ports from `args.cni.containerPorts` (twill's field, Kubernetes'
//! `ContainerPort` shape: `{name, containerPort, protocol}`). `K8S_POD_UID` (kubelet through
//! containerd and CRI-O) becomes its uid: in Kubernetes mode it tells the pod being added from
//! an earlier pod of the same name. The result is a Pod object as the Kubernetes API serialises
//! one, which twilld also writes to etcd.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use netpol::api::Pod;
use netpol::validate::{dns1123_label, dns1123_subdomain};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::mac::MacAddr;

/// The annotation that ties a pod record to the CNI attachment that made it.
pub const CONTAINER_ANNOTATION: &str = "twill.io/container-id";

/// A CNI attachment: container ID and interface name.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Attachment {
    pub container_id: String,
    pub ifname: String,
}

impl Attachment {
    /// The host end of its veth: the pod's bridge port, which names its record file and its
    /// source-check entries.
    pub fn port(&self) -> String {
        crate::cni::host_veth_name(&self.container_id, &self.ifname)
    }
}

/// A pod on this node, as policy needs it and etcd holds it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LocalPod {
    pub attachment: Attachment,
    pub pod: Pod,
    /// The MAC address twill gave the pod's interface: the only one its port may send from
    /// (`spoof`). None in records written before twill chose it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<MacAddr>,
}

impl LocalPod {
    /// The pod with interface MAC `mac`.
    pub fn with_mac(mut self, mac: MacAddr) -> LocalPod {
        self.mac = Some(mac);
        self
    }

    /// The pod running with address `ip`.
    pub fn with_ip(self, ip: IpAddr) -> LocalPod {
        self.with_ips(&[ip])
    }

    /// The pod running with addresses `ips` (a dual-stack pod has one of each family; the first
    /// is its podIP, as the kubelet reports it).
    pub fn with_ips(mut self, ips: &[IpAddr]) -> LocalPod {
        let all: Vec<_> = ips.iter().map(|ip| json!({"ip": ip.to_string()})).collect();
        self.pod.status = serde_json::from_value(json!({
            "phase": "Running",
            "podIP": ips.first().map(|ip| ip.to_string()),
            "podIPs": all,
        }))
        .ok();
        self
    }

    pub fn namespace(&self) -> &str {
        self.pod.metadata.namespace.as_deref().unwrap_or("default")
    }

    /// `<namespace>/<name>`: its key under `<prefix>/pods/`.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace(), self.pod.metadata.name)
    }
}

/// The addresses a pod object reports: podIPs, or podIP alone (as the API wrote it before
/// dual stack).
pub fn pod_ips(pod: &Pod) -> BTreeSet<IpAddr> {
    let Some(st) = pod.status.as_ref() else {
        return BTreeSet::new();
    };
    let ips = st.pod_ips.iter().flatten().map(|i| i.ip.as_str());
    ips.chain(st.pod_ip.as_deref())
        .filter_map(|ip| ip.parse().ok())
        .collect()
}

/// Whether two objects of one pod name are the same pod: not when both carry a uid and the
/// uids differ (a StatefulSet's pod re-created under its name, possibly with other labels).
pub fn same_pod(a: &Pod, b: &Pod) -> bool {
    match (&a.metadata.uid, &b.metadata.uid) {
        (Some(x), Some(y)) => x == y,
        _ => true,
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{0}")]
pub struct PodArgsError(pub String);

/// `K=V;K2=V2` as CNI_ARGS carries it.
fn cni_args(args: &str) -> BTreeMap<&str, &str> {
    args.split(';')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.trim(), v.trim()))
        .collect()
}

/// A name Kubernetes would take: lower case, other characters as '-'; podman passes container
/// names like `my_app` as K8S_POD_NAME.
fn dns_name(s: &str, max: usize) -> String {
    let mut out: String = s
        .chars()
        .map(|c| {
            let c = c.to_ascii_lowercase();
            if c.is_ascii_alphanumeric() || c == '-' || c == '.' {
                c
            } else {
                '-'
            }
        })
        .collect();
    out.truncate(max);
    out.trim_matches(|c: char| c == '-' || c == '.').to_string()
}

/// The pod a CNI ADD describes, on `node`; its address comes later (`LocalPod::with_ip`), so
/// bad arguments fail the ADD before anything is allocated.
pub fn from_cni(
    attachment: Attachment,
    args: &str,
    config: &Value,
    node: &str,
) -> Result<LocalPod, PodArgsError> {
    let a = cni_args(args);
    let namespace = match a.get("K8S_POD_NAMESPACE").filter(|s| !s.is_empty()) {
        Some(ns) if dns1123_label(ns).is_none() => ns.to_string(),
        Some(ns) => {
            return Err(PodArgsError(format!(
                "CNI_ARGS K8S_POD_NAMESPACE {ns:?} is not a valid namespace name"
            )))
        }
        None => "default".into(),
    };
    let raw_name = a
        .get("K8S_POD_NAME")
        .filter(|s| !s.is_empty())
        .copied()
        .unwrap_or(&attachment.container_id);
    let name = if dns1123_subdomain(raw_name).is_none() {
        raw_name.to_string()
    } else {
        dns_name(raw_name, 253)
    };
    if dns1123_subdomain(&name).is_some() {
        return Err(PodArgsError(format!(
            "no valid pod name from {raw_name:?} (CNI_ARGS K8S_POD_NAME or the container ID)"
        )));
    }
    let uid = a.get("K8S_POD_UID").filter(|s| !s.is_empty());
    let cni = config.pointer("/args/cni");
    let mut labels = serde_json::Map::new();
    if let Some(list) = cni.and_then(|c| c.get("labels")) {
        let list = list.as_array().ok_or_else(|| {
            PodArgsError("args.cni.labels must be a list of {\"key\": .., \"value\": ..}".into())
        })?;
        for (i, l) in list.iter().enumerate() {
            let (Some(k), Some(v)) = (
                l.get("key").and_then(Value::as_str),
                l.get("value").and_then(Value::as_str),
            ) else {
                return Err(PodArgsError(format!(
                    "args.cni.labels[{i}]: needs string \"key\" and \"value\", got {l}"
                )));
            };
            labels.insert(k.to_string(), Value::String(v.to_string()));
        }
    }
    let ports = match cni.and_then(|c| c.get("containerPorts")) {
        None | Some(Value::Null) => Value::Array(Vec::new()),
        Some(p @ Value::Array(_)) => p.clone(),
        Some(other) => {
            return Err(PodArgsError(format!(
                "args.cni.containerPorts must be a list of {{name, containerPort, protocol}}, got {other}"
            )))
        }
    };
    let pod: Pod = serde_json::from_value(json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "labels": labels,
            "annotations": {CONTAINER_ANNOTATION: attachment.container_id},
            "uid": uid,
        },
        "spec": {
            "nodeName": node,
            "containers": [{"name": "main", "ports": ports}],
        },
    }))
    .map_err(|e| PodArgsError(format!("args.cni: {e}")))?;
    // The same checks every record from etcd gets, naming the field (a label, a port).
    netpol::validate::validate_pod(&pod).map_err(|e| {
        PodArgsError(format!(
            "pod {namespace}/{name}: {}",
            e.0.iter()
                .map(|x| format!("{}: {}", x.field, x.message))
                .collect::<Vec<_>>()
                .join("; ")
        ))
    })?;
    Ok(LocalPod {
        attachment,
        pod,
        mac: None,
    })
}

/// Local pods persisted in `<state-dir>/pods/`, one file per attachment: policy state for this
/// node's pods survives a restart (also with etcd down), and DEL, which names only the
/// attachment, finds its pod.
#[derive(Clone, Debug)]
pub struct PodFiles {
    dir: PathBuf,
}

impl PodFiles {
    pub fn new(state_dir: &Path) -> PodFiles {
        PodFiles {
            dir: state_dir.join("pods"),
        }
    }

    pub(crate) fn path(&self, a: &Attachment) -> PathBuf {
        // The same stable hash the veth names use: no container ID in a path.
        self.dir.join(format!("{}.json", a.port()))
    }

    /// When `a`'s record was last written, if it is there.
    pub fn written(&self, a: &Attachment) -> Option<std::time::SystemTime> {
        std::fs::metadata(self.path(a))
            .and_then(|m| m.modified())
            .ok()
    }

    pub fn save(&self, p: &LocalPod) -> std::io::Result<()> {
        std::fs::create_dir_all(&self.dir)?;
        let bytes = serde_json::to_vec(p).map_err(std::io::Error::other)?;
        crate::state::write_replace(&self.path(&p.attachment), &bytes)
    }

    pub fn remove(&self, a: &Attachment) -> std::io::Result<()> {
        match std::fs::remove_file(self.path(a)) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }

    /// Every readable record, oldest first, and the ports whose record cannot be read. An
    /// unreadable record is set aside as `<port>.unreadable` (kept for whoever looks into it,
    /// and so that its pod stays cut off across restarts) until its attachment is deleted or
    /// added again (`forget_unreadable`).
    pub fn load(&self) -> Loaded {
        let mut out = Loaded::default();
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return out;
        };
        let mut paths: Vec<_> = entries
            .flatten()
            .map(|e| {
                let written = e.metadata().and_then(|m| m.modified()).ok();
                (written, e.path())
            })
            .collect();
        paths.sort();
        for (_, path) in paths {
            let Some(port) = path.file_stem().and_then(|s| s.to_str()) else {
                continue;
            };
            let port = port.to_owned();
            match path.extension().and_then(|x| x.to_str()) {
                Some("json") => {}
                Some("unreadable") if crate::cni::is_host_veth_name(&port) => {
                    tracing::error!(file = %path.display(), port,
                        "a pod record set aside as unreadable by an earlier start: its pod stays cut off until it is deleted (CNI DEL) or added again");
                    out.unreadable.insert(port);
                    continue;
                }
                _ => continue,
            }
            let parsed = std::fs::read(&path)
                .map_err(|e| e.to_string())
                .and_then(|b| serde_json::from_slice::<LocalPod>(&b).map_err(|e| e.to_string()));
            let e = match parsed {
                Ok(p) => {
                    out.pods.push(p);
                    continue;
                }
                Err(e) => e,
            };
            if !crate::cni::is_host_veth_name(&port) {
                tracing::warn!(file = %path.display(), error = %e,
                    "skipping an unreadable file that names no pod port");
                continue;
            }
            // Its labels are unknown, so are the policies that select it: cut off rather than
            // left open (`spoof::Sources::closed`).
            tracing::error!(file = %path.display(), error = %e, port,
                "unreadable pod record: its pod's policies are unknown, so its port is cut off until the pod is deleted (CNI DEL) or added again");
            self.set_aside(&port);
            out.unreadable.insert(port);
        }
        // A record written since (an ADD of the attachment that ended with a crash): its own.
        for p in &out.pods {
            let port = p.attachment.port();
            if out.unreadable.remove(&port) {
                let _ = std::fs::remove_file(self.unreadable_path(&port));
            }
        }
        out
    }

    /// Moves `port`'s record to `<port>.unreadable`, where `load` finds it as unreadable.
    pub fn set_aside(&self, port: &str) {
        let (from, to) = (
            self.dir.join(format!("{port}.json")),
            self.unreadable_path(port),
        );
        match std::fs::rename(&from, &to) {
            Ok(()) => tracing::info!(file = %to.display(), "pod record set aside"),
            Err(e) => {
                tracing::warn!(file = %from.display(), error = %e, "setting a pod record aside")
            }
        }
    }

    fn unreadable_path(&self, port: &str) -> PathBuf {
        self.dir.join(format!("{port}.unreadable"))
    }

    /// Drops the unreadable record of `port` (set aside by `load`), if it has one.
    pub fn forget_unreadable(&self, port: &str) -> std::io::Result<()> {
        match std::fs::remove_file(self.unreadable_path(port)) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }
}

/// What `PodFiles::load` found.
#[derive(Debug, Default, PartialEq)]
pub struct Loaded {
    /// The readable records, oldest first.
    pub pods: Vec<LocalPod>,
    /// The ports (host-side veth names) whose record could not be read, now or at an earlier
    /// start.
    pub unreadable: BTreeSet<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn att() -> Attachment {
        Attachment {
            container_id: "abc123".into(),
            ifname: "eth0".into(),
        }
    }

    #[test]
    fn identity_labels_and_ports_from_the_request() {
        let cfg = json!({"args": {"cni": {
            "labels": [{"key": "app", "value": "web"}, {"key": "tier", "value": "front"}],
            "containerPorts": [{"name": "http", "containerPort": 8080, "protocol": "TCP"}]}}});
        let p = from_cni(
            att(),
            "IgnoreUnknown=1;K8S_POD_NAMESPACE=shop;K8S_POD_NAME=web-1",
            &cfg,
            "n1",
        )
        .unwrap()
        .with_ip("10.244.1.5".parse().unwrap());
        assert_eq!(p.key(), "shop/web-1");
        assert_eq!(p.pod.metadata.labels["app"], "web");
        assert_eq!(p.pod.spec.node_name.as_deref(), Some("n1"));
        let (key, rec) = netpol::model::PodRecord::from_api(&p.pod).unwrap();
        assert_eq!(key.to_string(), "shop/web-1");
        assert_eq!(rec.ips, vec!["10.244.1.5".parse::<IpAddr>().unwrap()]);
        assert_eq!(
            rec.named_ports("http", netpol::model::Protocol::Tcp)
                .collect::<Vec<_>>(),
            vec![8080]
        );
    }

    #[test]
    fn the_uid_tells_a_pod_from_an_earlier_one_of_its_name() {
        let args = "K8S_POD_NAMESPACE=shop;K8S_POD_NAME=web-0;K8S_POD_UID=";
        let unknown = from_cni(att(), args, &json!({}), "n1").unwrap();
        assert_eq!(unknown.pod.metadata.uid, None);
        let new = from_cni(att(), &format!("{args}u-2"), &json!({}), "n1").unwrap();
        let old = from_cni(att(), &format!("{args}u-1"), &json!({}), "n1").unwrap();
        assert_eq!(new.pod.metadata.uid.as_deref(), Some("u-2"));
        assert!(same_pod(&new.pod, &new.pod.clone()));
        assert!(!same_pod(&new.pod, &old.pod));
        // Without a uid on either side (podman sends none, old records have none): the name.
        assert!(same_pod(&new.pod, &unknown.pod));
        assert!(same_pod(&unknown.pod, &old.pod));
        // The record keeps it (and one written without it reads back without it).
        let back: LocalPod = serde_json::from_slice(&serde_json::to_vec(&new).unwrap()).unwrap();
        assert_eq!(back, new);
    }

    #[test]
    fn defaults_and_podman_names() {
        let p = from_cni(att(), "", &json!({}), "n1").unwrap();
        assert_eq!(p.key(), "default/abc123");
        assert!(p.pod.metadata.labels.is_empty());
        let p = from_cni(
            att(),
            "IgnoreUnknown=1;K8S_POD_NAME=My_App",
            &json!({}),
            "n1",
        )
        .unwrap();
        assert_eq!(p.key(), "default/my-app");
    }

    #[test]
    fn bad_input_is_an_error_naming_it() {
        let e = from_cni(att(), "K8S_POD_NAMESPACE=Not Valid", &json!({}), "n1").unwrap_err();
        assert!(e.0.contains("K8S_POD_NAMESPACE"), "{e}");
        let bad_label = json!({"args": {"cni": {"labels": [{"key": "bad key", "value": "x"}]}}});
        let e = from_cni(att(), "", &bad_label, "n1").unwrap_err();
        assert!(e.0.contains("labels"), "{e}");
        let not_list = json!({"args": {"cni": {"labels": {"app": "x"}}}});
        assert!(from_cni(att(), "", &not_list, "n1").is_err());
        let bad_port = json!({"args": {"cni": {"containerPorts": [{"containerPort": 70000}]}}});
        let e = from_cni(att(), "", &bad_port, "n1").unwrap_err();
        assert!(e.0.contains("ontainerPort"), "{e}");
    }

    #[test]
    fn records_survive_in_the_state_dir() {
        let dir = std::env::temp_dir().join(format!("twill-podfiles-{}", std::process::id()));
        let files = PodFiles::new(&dir);
        let p = from_cni(att(), "K8S_POD_NAME=a", &json!({}), "n1")
            .unwrap()
            .with_ip("10.0.0.2".parse().unwrap());
        files.save(&p).unwrap();
        std::fs::write(dir.join("pods/garbage.json"), b"{").unwrap();
        let loaded = files.load();
        assert_eq!(loaded.pods, vec![p.clone()]);
        assert!(loaded.unreadable.is_empty(), "{loaded:?}");
        files.remove(&p.attachment).unwrap();
        files.remove(&p.attachment).unwrap();
        assert_eq!(files.load(), Loaded::default());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn an_unreadable_record_is_set_aside_and_named_until_its_attachment_goes() {
        let dir = std::env::temp_dir().join(format!("twill-podfiles-bad-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let files = PodFiles::new(&dir);
        let p = from_cni(att(), "K8S_POD_NAME=a", &json!({}), "n1").unwrap();
        files.save(&p).unwrap();
        let path = files.path(&p.attachment);
        std::fs::write(&path, b"{\"pod\": 1}").unwrap();
        let port = crate::cni::host_veth_name("abc123", "eth0");
        let want = Loaded {
            pods: vec![],
            unreadable: [port.clone()].into(),
        };
        assert_eq!(files.load(), want);
        assert!(!path.exists());
        let aside = dir.join(format!("pods/{port}.unreadable"));
        assert_eq!(std::fs::read(&aside).unwrap(), b"{\"pod\": 1}");
        // Still named at the next start, from the file set aside.
        assert_eq!(files.load(), want);
        // The attachment added again, and twilld gone before the ADD ended: the new record is
        // its own, the one set aside goes.
        files.save(&p).unwrap();
        let loaded = files.load();
        assert_eq!(loaded.pods, vec![p.clone()]);
        assert!(loaded.unreadable.is_empty() && !aside.exists());
        std::fs::write(&aside, b"x").unwrap();
        files.remove(&p.attachment).unwrap();
        files.forget_unreadable(&p.attachment.port()).unwrap();
        files.forget_unreadable(&p.attachment.port()).unwrap();
        assert_eq!(files.load().unreadable, BTreeSet::new());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
