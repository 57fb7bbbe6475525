//! The Kubernetes manifests twill ships (deploy/kubernetes, deploy/kind), checked offline:
//! - every document parses (a real YAML parser) and matches the Kubernetes API schema: it is
//!   decoded into its k8s-openapi type (the Rust types k8s-openapi 0.29 generates from the
//!   Kubernetes OpenAPI spec, here v1.33, the oldest kube 5.0 supports: required fields and
//!   field types), then encoded again and compared with the original, so any field the schema
//!   does not have (a typo, a wrong nesting) shows up as a difference;
//! - the RBAC is exactly the least-privilege role documented in the manifest;
//! - paths, flags and ports agree with twilld: the CNI socket, the conflist and its `socket`,
//!   net-conf.json, the probes' address, the host paths twilld uses, and every flag in the
//!   DaemonSet exists in `twilld --help`;
//! - the install init containers' scripts, run against a scratch directory, replace only their
//!   own files, atomically.
//!
//! A real cluster (kind) cannot run here: deploy/README.md says what remains unverified.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;

use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::{ConfigMap, Container, Namespace, ServiceAccount};
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use twill_tests::bins;

const MANIFEST: &str = "deploy/kubernetes/twill.yaml";
const KIND_CONFIG: &str = "deploy/kind/kind-config.yaml";

fn root() -> PathBuf {
    bins::workspace_dir()
}

fn read(rel: &str) -> String {
    std::fs::read_to_string(root().join(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"))
}

/// Every YAML document of a file, as JSON values (empty documents skipped).
fn documents(text: &str) -> Vec<Value> {
    serde_norway::Deserializer::from_str(text)
        .map(|d| Value::deserialize(d).expect("valid YAML"))
        .filter(|v| !v.is_null())
        .collect()
}

/// Where `typed` (the original after a trip through its schema type) lost or changed something.
/// A key only `typed` has is a required field the original lacks: k8s-openapi fills a missing
/// required field with its default when decoding, and optional ones it leaves out.
fn schema_diff(path: &str, original: &Value, typed: &Value, out: &mut Vec<String>) {
    match (original, typed) {
        (Value::Object(a), Value::Object(b)) => {
            for (k, v) in a {
                let p = format!("{path}.{k}");
                match b.get(k) {
                    Some(w) => schema_diff(&p, v, w, out),
                    None => out.push(format!("{p}: not in the schema")),
                }
            }
            for k in b.keys().filter(|k| !a.contains_key(*k)) {
                out.push(format!("{path}.{k}: required, missing"));
            }
        }
        (Value::Array(a), Value::Array(b)) if a.len() == b.len() => {
            for (i, (v, w)) in a.iter().zip(b).enumerate() {
                schema_diff(&format!("{path}[{i}]"), v, w, out);
            }
        }
        (a, b) if a == b => {}
        (a, b) => out.push(format!("{path}: {a} became {b}")),
    }
}

fn check_as<T: Serialize + for<'de> Deserialize<'de>>(doc: &Value) -> Result<T, String> {
    let typed: T = serde_json::from_value(doc.clone()).map_err(|e| e.to_string())?;
    let back = serde_json::to_value(&typed).map_err(|e| e.to_string())?;
    let mut diffs = Vec::new();
    schema_diff("", doc, &back, &mut diffs);
    if diffs.is_empty() {
        Ok(typed)
    } else {
        Err(diffs.join("; "))
    }
}

/// Validate one document against its kind's schema type.
fn validate(doc: &Value) -> Result<(), String> {
    let av = doc["apiVersion"].as_str().unwrap_or_default();
    let kind = doc["kind"].as_str().unwrap_or_default();
    match (av, kind) {
        ("v1", "Namespace") => check_as::<Namespace>(doc).map(drop),
        ("v1", "ServiceAccount") => check_as::<ServiceAccount>(doc).map(drop),
        ("v1", "ConfigMap") => check_as::<ConfigMap>(doc).map(drop),
        ("rbac.authorization.k8s.io/v1", "ClusterRole") => check_as::<ClusterRole>(doc).map(drop),
        ("rbac.authorization.k8s.io/v1", "ClusterRoleBinding") => {
            check_as::<ClusterRoleBinding>(doc).map(drop)
        }
        ("apps/v1", "DaemonSet") => check_as::<DaemonSet>(doc).map(drop),
        _ => Err(format!("no schema for {av} {kind}")),
    }
}

struct Manifest {
    docs: Vec<Value>,
}

impl Manifest {
    fn load() -> Manifest {
        Manifest {
            docs: documents(&read(MANIFEST)),
        }
    }

    fn one<T: for<'de> Deserialize<'de>>(&self, kind: &str) -> T {
        let docs: Vec<_> = self.docs.iter().filter(|d| d["kind"] == kind).collect();
        assert_eq!(docs.len(), 1, "one {kind} in {MANIFEST}");
        serde_json::from_value(docs[0].clone()).unwrap()
    }

    fn daemonset(&self) -> DaemonSet {
        self.one("DaemonSet")
    }

    fn config(&self) -> ConfigMap {
        self.one("ConfigMap")
    }

    fn twilld(&self) -> Container {
        let ds = self.daemonset();
        let spec = ds.spec.unwrap().template.spec.unwrap();
        let c = spec.containers.into_iter().find(|c| c.name == "twilld");
        c.expect("a twilld container")
    }

    fn init(&self, name: &str) -> Container {
        let ds = self.daemonset();
        let spec = ds.spec.unwrap().template.spec.unwrap();
        let c = spec
            .init_containers
            .unwrap_or_default()
            .into_iter()
            .find(|c| c.name == name);
        c.unwrap_or_else(|| panic!("init container {name}"))
    }
}

/// `--flag=value` or `--flag value` pairs of a container's args.
fn flags(args: &[String]) -> Vec<(String, Option<String>)> {
    let mut out = Vec::new();
    let mut it = args.iter().peekable();
    while let Some(a) = it.next() {
        let Some(_) = a.strip_prefix("--") else {
            panic!("a bare argument {a:?} in the DaemonSet's args");
        };
        match a.split_once('=') {
            Some((f, v)) => out.push((f.to_string(), Some(v.to_string()))),
            None => {
                let v = it.next_if(|n| !n.starts_with("--")).cloned();
                out.push((a.clone(), v));
            }
        }
    }
    out
}

fn flag(c: &Container, name: &str) -> String {
    flags(c.args.as_deref().unwrap_or_default())
        .into_iter()
        .find(|(f, _)| f == name)
        .and_then(|(_, v)| v)
        .unwrap_or_else(|| panic!("the DaemonSet does not set {name}"))
}

#[test]
fn every_document_matches_the_kubernetes_schema() {
    let m = Manifest::load();
    let kinds: Vec<&str> = m
        .docs
        .iter()
        .map(|d| d["kind"].as_str().unwrap_or("?"))
        .collect();
    assert_eq!(
        kinds,
        [
            "Namespace",
            "ServiceAccount",
            "ClusterRole",
            "ClusterRoleBinding",
            "ConfigMap",
            "DaemonSet"
        ]
    );
    for d in &m.docs {
        if let Err(e) = validate(d) {
            panic!("{} {}: {e}", d["kind"], d["metadata"]["name"]);
        }
    }
    // The check can fail: a misspelt field, a field at the wrong level, a wrong type, a missing
    // required field.
    let ds = m
        .docs
        .iter()
        .find(|d| d["kind"] == "DaemonSet")
        .unwrap()
        .clone();
    let mut typo = ds.clone();
    typo["spec"]["template"]["spec"]["tolerationz"] = serde_json::json!([]);
    assert!(validate(&typo)
        .unwrap_err()
        .contains("tolerationz: not in the schema"));
    let mut misplaced = ds.clone();
    misplaced["spec"]["hostNetwork"] = true.into();
    assert!(validate(&misplaced)
        .unwrap_err()
        .contains(".spec.hostNetwork"));
    let mut wrong_type = ds.clone();
    wrong_type["spec"]["template"]["spec"]["hostNetwork"] = "yes".into();
    assert!(validate(&wrong_type).is_err());
    let mut no_name = ds;
    no_name["spec"]["template"]["spec"]["containers"][0]
        .as_object_mut()
        .unwrap()
        .remove("name");
    assert!(validate(&no_name).unwrap_err().contains("name"));
}

#[test]
fn rbac_is_the_documented_least_privilege() {
    let m = Manifest::load();
    let role: ClusterRole = m.one("ClusterRole");
    let mut granted = BTreeSet::new();
    for r in role.rules.unwrap_or_default() {
        assert!(r.resource_names.is_none() && r.non_resource_urls.is_none());
        for g in r.api_groups.unwrap_or_default() {
            for res in r.resources.clone().unwrap_or_default() {
                for v in &r.verbs {
                    granted.insert(format!("{g}/{res}:{v}"));
                }
            }
        }
    }
    // Each of these is justified in the manifest; a change here must change that comment.
    let want: BTreeSet<String> = [
        "/nodes:get",
        "/nodes:list",
        "/nodes:watch",
        "/nodes/status:patch",
        "/pods:get",
        "/pods:list",
        "/pods:watch",
        "/namespaces:list",
        "/namespaces:watch",
        "networking.k8s.io/networkpolicies:list",
        "networking.k8s.io/networkpolicies:watch",
    ]
    .into_iter()
    .map(String::from)
    .collect();
    assert_eq!(granted, want);
    // The binding gives the role to the DaemonSet's ServiceAccount, in its namespace.
    let binding: ClusterRoleBinding = m.one("ClusterRoleBinding");
    let sa: ServiceAccount = m.one("ServiceAccount");
    let ds = m.daemonset();
    let pod = ds.spec.unwrap().template.spec.unwrap();
    assert_eq!(binding.role_ref.name, role.metadata.name.unwrap());
    let subjects = binding.subjects.unwrap();
    assert_eq!(subjects.len(), 1);
    assert_eq!(subjects[0].kind, "ServiceAccount");
    assert_eq!(Some(&subjects[0].name), sa.metadata.name.as_ref());
    assert_eq!(pod.service_account_name.as_ref(), sa.metadata.name.as_ref());
    assert_eq!(subjects[0].namespace, ds.metadata.namespace);
    assert_eq!(sa.metadata.namespace, ds.metadata.namespace);
    // The fake API server's identity for it is built from the same documents.
    let ids =
        twill_tests::fakeapi::rbac::service_accounts_from_manifest(&root().join(MANIFEST)).unwrap();
    assert_eq!(ids.len(), 1);
    assert_eq!(ids[0].user, "system:serviceaccount:twill-system:twill");
}

#[test]
fn daemonset_pod_has_the_documented_shape() {
    let m = Manifest::load();
    let ds = m.daemonset();
    let ns: Namespace = m.one("Namespace");
    assert_eq!(ds.metadata.namespace, ns.metadata.name);
    assert_eq!(
        ns.metadata.labels.unwrap()["pod-security.kubernetes.io/enforce"],
        "privileged",
        "baseline would refuse hostNetwork, hostPath and NET_ADMIN"
    );
    let pod = ds.spec.unwrap().template.spec.unwrap();
    assert_eq!(pod.host_network, Some(true));
    assert_eq!(
        pod.priority_class_name.as_deref(),
        Some("system-node-critical")
    );
    let tolerations = pod.tolerations.unwrap();
    for effect in ["NoSchedule", "NoExecute"] {
        assert!(
            tolerations
                .iter()
                .any(|t| t.operator.as_deref() == Some("Exists")
                    && t.key.is_none()
                    && t.effect.as_deref() == Some(effect)),
            "tolerates every {effect} taint"
        );
    }
    let twilld = m.twilld();
    let sc = twilld.security_context.clone().unwrap();
    assert_eq!(sc.privileged, Some(false));
    let mut caps = sc.capabilities.unwrap().add.unwrap();
    caps.sort();
    assert_eq!(caps, ["NET_ADMIN", "NET_RAW", "SYS_ADMIN"]);
    for c in pod.init_containers.iter().flatten() {
        assert!(
            c.security_context.is_none(),
            "{}: init containers need no privileges",
            c.name
        );
    }
    // The node's name comes from the downward API.
    let env = twilld.env.clone().unwrap();
    let node_name = env.iter().find(|e| e.name == "NODE_NAME").unwrap();
    let field = node_name
        .value_from
        .as_ref()
        .unwrap()
        .field_ref
        .as_ref()
        .unwrap();
    assert_eq!(field.field_path, "spec.nodeName");
    // Every image is this version of twill.
    let version = toml_version();
    for c in pod
        .containers
        .iter()
        .chain(pod.init_containers.iter().flatten())
    {
        assert_eq!(
            c.image.as_deref(),
            Some(format!("twill:{version}").as_str()),
            "{}",
            c.name
        );
    }
    // The image has what the containers run.
    let containerfile = read("deploy/kubernetes/Containerfile");
    assert_eq!(
        twilld.command.as_deref(),
        Some(&["/usr/local/bin/twilld".to_string()][..])
    );
    for path in [
        "/usr/local/bin/twilld",
        "/usr/local/bin/twillctl",
        "/usr/local/lib/twill/twill",
    ] {
        assert!(
            containerfile.contains(&format!("/out{path}")),
            "the image lacks {path}"
        );
    }
    assert!(
        containerfile.contains("scripts/build"),
        "the image's plugin is the static build"
    );
    for pkg in ["nftables", "iptables"] {
        assert!(containerfile.contains(pkg), "the image lacks {pkg}");
    }
}

fn toml_version() -> String {
    read("Cargo.toml")
        .lines()
        .find_map(|l| l.strip_prefix("version = \""))
        .and_then(|v| v.strip_suffix('"'))
        .expect("workspace version")
        .to_string()
}

/// The host path behind the mount that holds `path` in the twilld container, and whether the
/// container sees the host's file at the same path (mountPath == hostPath).
fn host_path_of(m: &Manifest, c: &Container, path: &str) -> Option<(String, bool)> {
    let pod = m.daemonset().spec.unwrap().template.spec.unwrap();
    let mount = c
        .volume_mounts
        .iter()
        .flatten()
        .filter(|vm| Path::new(path).starts_with(&vm.mount_path))
        .max_by_key(|vm| vm.mount_path.len())?;
    let vol = pod
        .volumes
        .iter()
        .flatten()
        .find(|v| v.name == mount.name)?;
    let host = vol.host_path.as_ref()?.path.clone();
    Some((host.clone(), host == mount.mount_path))
}

/// Flags listed by `twilld --help`, and its help text.
fn twilld_help() -> (BTreeSet<String>, String) {
    let dir = bins::default_bin_dir();
    bins::ensure_built(&dir).expect("twilld builds");
    let out = Command::new(dir.join("twilld"))
        .arg("--help")
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&out.stdout).into_owned();
    let known = help
        .split_whitespace()
        .filter(|w| w.starts_with("--"))
        .map(|w| {
            w.trim_end_matches([',', '.', '='])
                .split(['=', '<', '['])
                .next()
                .unwrap_or_default()
                .to_string()
        })
        .filter(|w| w.len() > 2)
        .collect();
    (known, help)
}

#[test]
fn daemonset_agrees_with_twilld() {
    let m = Manifest::load();
    let c = m.twilld();
    let args = c.args.clone().unwrap_or_default();
    let (known, help) = twilld_help();
    assert!(
        known.contains("--cni-socket") && known.contains("--http-addr"),
        "{help}"
    );
    // Every flag exists.
    for (f, _) in flags(&args) {
        assert!(
            known.contains(&f),
            "twilld --help does not know {f}, used in the DaemonSet:\n{help}"
        );
    }

    // The conflist: the shipped one, installed under its name, and dialling twilld's socket.
    let cfg = m.config();
    let data = cfg.data.unwrap();
    let conflist: Value = serde_json::from_str(&data["cni-conf.json"]).unwrap();
    let shipped: Value = serde_json::from_str(&read("deploy/cni/10-twill.conflist")).unwrap();
    assert_eq!(
        conflist, shipped,
        "the ConfigMap's conflist is deploy/cni/10-twill.conflist"
    );
    let socket = flag(&c, "--cni-socket");
    assert_eq!(conflist["plugins"][0]["socket"], socket.as_str());
    assert!(help.contains("[default: /run/twill/cni.sock]") && socket == "/run/twill/cni.sock");
    let install = m.init("install-cni").command.unwrap().join(" ");
    assert!(
        install.contains("/host/etc/cni/net.d/10-twill.conflist"),
        "{install}"
    );

    // The host sees twilld's files where the plugin and operators look for them.
    let socket_dir = Path::new(&socket)
        .parent()
        .unwrap()
        .to_str()
        .unwrap()
        .to_string();
    for (what, path) in [
        ("--cni-socket's directory", socket_dir),
        ("--subnet-file", flag(&c, "--subnet-file")),
        ("--state-dir", flag(&c, "--state-dir")),
        ("--host-local-dir", flag(&c, "--host-local-dir")),
        ("pods' netns", "/run/netns".to_string()),
    ] {
        let (host, same) = host_path_of(&m, &c, &path)
            .unwrap_or_else(|| panic!("{what} {path} is not on a host path"));
        assert!(same, "{what}: {path} is mounted from {host}, another path");
    }
    let netns = c
        .volume_mounts
        .iter()
        .flatten()
        .find(|v| v.mount_path == "/run/netns")
        .unwrap();
    assert_eq!(netns.mount_propagation.as_deref(), Some("HostToContainer"));

    // net-conf.json: at --net-config-path, from the ConfigMap, flannel's format.
    let net_conf_path = flag(&c, "--net-config-path");
    let mount = c
        .volume_mounts
        .iter()
        .flatten()
        .find(|v| Path::new(&net_conf_path).parent() == Some(Path::new(&v.mount_path)))
        .expect("net-conf's directory is mounted");
    let pod = m.daemonset().spec.unwrap().template.spec.unwrap();
    let vol = pod
        .volumes
        .iter()
        .flatten()
        .find(|v| v.name == mount.name)
        .unwrap();
    assert_eq!(
        vol.config_map.as_ref().unwrap().name,
        cfg.metadata.name.clone().unwrap()
    );
    let key = Path::new(&net_conf_path)
        .file_name()
        .unwrap()
        .to_str()
        .unwrap();
    let net_conf: Value = serde_json::from_str(&data[key]).expect("net-conf.json is JSON");
    let network: ipnet_lite::Net = net_conf["Network"].as_str().unwrap().parse().unwrap();
    assert_eq!(net_conf["Backend"]["Type"], "vxlan");

    // Probes: twilld's HTTP address.
    let http: SocketAddr = flag(&c, "--http-addr").parse().unwrap();
    for (probe, path) in [
        (c.liveness_probe.clone(), "/healthz"),
        (c.readiness_probe.clone(), "/readyz"),
    ] {
        let get = probe.unwrap().http_get.unwrap();
        assert_eq!(get.path.as_deref(), Some(path));
        assert_eq!(get.host.as_deref(), Some(http.ip().to_string().as_str()));
        assert_eq!(
            get.port,
            k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(http.port().into())
        );
    }

    // The kind cluster's podSubnet lies inside the Network.
    let kind = kind_config();
    let pod_subnet: ipnet_lite::Net = kind.networking.pod_subnet.parse().unwrap();
    assert!(
        network.contains(&pod_subnet),
        "kind's podSubnet {pod_subnet:?} is outside {network:?}"
    );
}

/// IPv4 prefixes, enough to compare the pod network with podSubnet.
mod ipnet_lite {
    use std::net::Ipv4Addr;
    use std::str::FromStr;

    #[derive(Debug, Clone, Copy)]
    pub struct Net(u32, u8);

    impl FromStr for Net {
        type Err = String;
        fn from_str(s: &str) -> Result<Net, String> {
            let (a, l) = s.split_once('/').ok_or("no prefix length")?;
            let a: Ipv4Addr = a.parse().map_err(|e| format!("{s}: {e}"))?;
            let l: u8 = l.parse().map_err(|e| format!("{s}: {e}"))?;
            if l > 32 {
                return Err(format!("{s}: prefix length"));
            }
            Ok(Net(u32::from(a), l))
        }
    }

    impl Net {
        fn mask(self) -> u32 {
            if self.1 == 0 {
                0
            } else {
                u32::MAX << (32 - self.1)
            }
        }
        pub fn contains(&self, o: &Net) -> bool {
            o.1 >= self.1 && (o.0 & self.mask()) == (self.0 & self.mask())
        }
    }
}

/// kind's cluster config (kind.x-k8s.io/v1alpha4), the fields used, unknown ones refused.
#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct KindCluster {
    kind: String,
    api_version: String,
    networking: KindNetworking,
    nodes: Vec<KindNode>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct KindNetworking {
    #[serde(rename = "disableDefaultCNI")]
    disable_default_cni: bool,
    pod_subnet: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct KindNode {
    role: String,
}

fn kind_config() -> KindCluster {
    let docs = documents(&read(KIND_CONFIG));
    assert_eq!(docs.len(), 1);
    serde_json::from_value(docs[0].clone()).expect("kind config")
}

#[test]
fn kind_config_leaves_the_cni_to_twill() {
    let k = kind_config();
    assert_eq!(
        (k.kind.as_str(), k.api_version.as_str()),
        ("Cluster", "kind.x-k8s.io/v1alpha4")
    );
    assert!(
        k.networking.disable_default_cni,
        "kindnet must not be installed"
    );
    let roles: Vec<&str> = k.nodes.iter().map(|n| n.role.as_str()).collect();
    assert_eq!(
        roles,
        ["control-plane", "worker", "worker"],
        "pods across nodes need several"
    );
    // deny_unknown_fields bites: a misspelt field is refused.
    let bad = read(KIND_CONFIG).replace("disableDefaultCNI", "disableDefaultCni");
    let doc = documents(&bad).remove(0);
    assert!(serde_json::from_value::<KindCluster>(doc).is_err());
}

/// Run an init container's script against `scratch` (its /host/... and source paths moved
/// there), as the kubelet would on a node.
fn run_install(c: &Container, scratch: &Path, sources: &[(&str, &Path)]) {
    let cmd = c.command.clone().unwrap();
    assert_eq!(&cmd[..2], ["/bin/sh", "-c"], "{}", c.name);
    let mut script = cmd[2].replace("/host/", &format!("{}/host/", scratch.display()));
    for (from, to) in sources {
        script = script.replace(from, &to.display().to_string());
    }
    let out = Command::new("sh").arg("-c").arg(&script).output().unwrap();
    assert!(
        out.status.success(),
        "{}: {}",
        c.name,
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn install_containers_replace_only_their_files_atomically() {
    use std::os::unix::fs::PermissionsExt;
    let m = Manifest::load();
    let scratch =
        std::env::temp_dir().join(format!("twill-manifest-install-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&scratch);
    struct Rm(PathBuf);
    impl Drop for Rm {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
    let _rm = Rm(scratch.clone());
    let bin = scratch.join("host/opt/cni/bin");
    let net = scratch.join("host/etc/cni/net.d");
    std::fs::create_dir_all(&bin).unwrap();
    std::fs::create_dir_all(&net).unwrap();
    // What a node already has: other plugins and networks, and an older twill.
    std::fs::write(bin.join("portmap"), "other plugin").unwrap();
    std::fs::write(bin.join("twill"), "old twill").unwrap();
    std::fs::write(net.join("99-other.conflist"), "{}").unwrap();
    std::fs::write(net.join("10-twill.conflist"), "old").unwrap();
    let plugin = scratch.join("image-twill");
    std::fs::write(&plugin, "new twill").unwrap();
    let conf = scratch.join("cni-conf.json");
    let cfg = m.config().data.unwrap();
    std::fs::write(&conf, &cfg["cni-conf.json"]).unwrap();

    let plugin_c = m.init("install-cni-plugin");
    let conf_c = m.init("install-cni");
    // Atomic: each writes a temporary name in the target's own directory and renames it.
    for (c, target) in [
        (&plugin_c, "/host/opt/cni/bin/twill"),
        (&conf_c, "/host/etc/cni/net.d/10-twill.conflist"),
    ] {
        let script = &c.command.as_ref().unwrap()[2];
        let mv = script
            .lines()
            .find(|l| l.trim_start().starts_with("mv "))
            .expect("renamed into place");
        let words: Vec<&str> = mv.split_whitespace().collect();
        let (from, to) = (words[words.len() - 2], words[words.len() - 1]);
        assert_eq!(to, target);
        assert_eq!(
            Path::new(from).parent(),
            Path::new(to).parent(),
            "{}: same directory",
            c.name
        );
        assert!(!script.contains("rm "), "{}: deletes nothing", c.name);
    }
    run_install(
        &plugin_c,
        &scratch,
        &[("/usr/local/lib/twill/twill", &plugin)],
    );
    run_install(&conf_c, &scratch, &[("/etc/twill/cni-conf.json", &conf)]);
    assert_eq!(
        std::fs::read_to_string(bin.join("twill")).unwrap(),
        "new twill"
    );
    assert_eq!(
        std::fs::metadata(bin.join("twill"))
            .unwrap()
            .permissions()
            .mode()
            & 0o777,
        0o755
    );
    assert_eq!(
        std::fs::read_to_string(net.join("10-twill.conflist")).unwrap(),
        cfg["cni-conf.json"]
    );
    assert_eq!(
        std::fs::read_to_string(bin.join("portmap")).unwrap(),
        "other plugin"
    );
    assert_eq!(
        std::fs::read_to_string(net.join("99-other.conflist")).unwrap(),
        "{}"
    );
    let mut left: Vec<String> = std::fs::read_dir(&bin)
        .unwrap()
        .chain(std::fs::read_dir(&net).unwrap())
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    left.sort();
    assert_eq!(
        left,
        ["10-twill.conflist", "99-other.conflist", "portmap", "twill"],
        "no temporary file left"
    );
    // Run again (a pod restart): same result.
    run_install(
        &plugin_c,
        &scratch,
        &[("/usr/local/lib/twill/twill", &plugin)],
    );
    assert_eq!(
        std::fs::read_to_string(bin.join("twill")).unwrap(),
        "new twill"
    );
}

#[test]
fn deploy_readme_covers_kubernetes_and_says_what_is_untested() {
    let readme = read("deploy/README.md");
    for needle in [
        MANIFEST,
        KIND_CONFIG,
        "deploy/kubernetes/Containerfile",
        "kind load",
        "NetworkPolicy",
        "not run",
    ] {
        assert!(
            readme.contains(needle),
            "deploy/README.md does not mention {needle:?}"
        );
    }
}
