//! twill's own fake Kubernetes API server, over real HTTP/1.1, for the tests of Kubernetes mode.
//!
//! Why a fake: no kube-apiserver, kind or Docker engine can run on the machines twill is built
//! and tested on (nothing packages an apiserver here, and there is no image registry for kind's
//! node image). So the real clients (the `kube` crate, twilld, kubectl) talk to this instead.
//! It keeps what those clients depend on, and nothing more:
//! - one global resourceVersion counter; every object carries `metadata.resourceVersion`;
//!   lists are served at one resourceVersion (also across `limit`/`continue` pages); watches
//!   replay every change after the resourceVersion they name, then stream new ones; a
//!   resourceVersion older than the compaction point is `410 Gone` (an ERROR event in a watch,
//!   as the real server sends it; a 410 answer for an Exact list or an old continue token);
//!   BOOKMARK events when asked (`allowWatchBookmarks`); `timeoutSeconds` ends a watch;
//!   an object that starts or stops matching a watch's selectors arrives as ADDED or DELETED;
//! - nodes (+ `nodes/status`), pods (+ `pods/status`), namespaces (+ `namespaces/status`),
//!   networking.k8s.io/v1 networkpolicies; get, list, watch, create, update, delete, and patch as
//!   JSON merge patch (RFC 7386) or strategic merge patch (the strategies of the fields twill's
//!   clients touch: `metadata.annotations`, `status.conditions` merged by `type`,
//!   `spec.podCIDRs`, ...; see `patch`). A write that changes nothing is no write (no new
//!   resourceVersion, no event), as with the real server; the status subresource changes only
//!   status and metadata, the main resource leaves status alone;
//! - authentication by bearer token, authorization by the ClusterRoles and ClusterRoleBindings
//!   of the shipped manifest (`deploy/kubernetes/twill.yaml`): 403 with the real Status and
//!   message for any verb × resource × subresource the role does not grant;
//! - minimal discovery (`/api`, `/apis`, `/version`) so kubectl can drive it by hand.
//!
//! What it does not do (so tests must not rely on it): server-side apply and JSON patch (415),
//! `sendInitialEvents` streaming lists (400), graceful deletion and finalizers (deletes are
//! immediate), admission beyond the namespace having to exist, defaulting, semantic validation
//! (only the shape: each object must decode as its k8s-openapi type), managedFields, protobuf,
//! client certificates. TLS is optional (`FakeApiOptions::tls`, a per-test CA from `tls`). A
//! green test against this fake says nothing about those; see deploy/README.md for what a
//! real cluster has to confirm.
//!
//! Faults, driven from the test process: cut every watch stream, stall (requests are taken and
//! never answered; open watches go silent), hold the watches alone (events queue up while
//! requests are served, as behind a lagging watch cache), answer 500/503/429 (with Retry-After) to the next N
//! requests, go down (stop listening, cut every connection) and come back on the same address,
//! advance the compaction point. Every request is recorded (user, verb, resource, code, patch
//! bodies) for tests to check what clients did.
//!
//! The server runs on a thread of its own with its own runtime, optionally inside a named
//! network namespace (a lab's underlay), so both synchronous tests and async ones can use it.
//! Dropping the handle stops it.

pub mod patch;
pub mod rbac;
pub mod resource;
pub mod selector;
pub mod server;
pub mod store;
pub mod tls;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use k8s_openapi::api::rbac::v1::PolicyRule;
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::{json, Value};
use tokio::sync::{mpsc, watch};

pub use rbac::Identity;
pub use resource::{Key, Kind};
pub use server::{Failure, RequestRecord};
pub use store::StoreError;

use server::{lock, Cmd, Faults, Shared};
use store::Store;

/// The ServiceAccount the shipped manifest binds twill's ClusterRole to.
pub const TWILL_SERVICE_ACCOUNT: (&str, &str) = ("twill-system", "twill");

#[derive(Debug, thiserror::Error)]
pub enum FakeApiError {
    #[error("fake API server: {0}")]
    Start(String),
    #[error(transparent)]
    Rbac(#[from] rbac::RbacError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("no such kind: {0}")]
    UnknownKind(String),
    #[error("{0}")]
    Json(#[from] serde_json::Error),
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

#[derive(Clone, Debug)]
pub struct FakeApiOptions {
    /// Where to listen (port 0: any free port; `addr()` tells which).
    pub addr: SocketAddr,
    /// Listen inside this named network namespace (/run/netns/<name>) instead of the caller's.
    pub netns: Option<String>,
    /// The manifest whose ClusterRoleBindings give ServiceAccounts their rights; default
    /// `deploy/kubernetes/twill.yaml`. None: only the admin and `add_identity` identities.
    pub manifest: Option<PathBuf>,
    /// How often a watch that asked for bookmarks gets one (the real server: about a minute).
    pub bookmark_interval: Duration,
    /// A watch's length when the client gives no `timeoutSeconds` (the real server: 30-60 min).
    pub default_watch_timeout: Duration,
    /// Serve HTTPS with this certificate (None: plain HTTP).
    pub tls: Option<tls::TestPki>,
}

impl Default for FakeApiOptions {
    fn default() -> Self {
        FakeApiOptions {
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            netns: None,
            manifest: Some(crate::bins::workspace_dir().join("deploy/kubernetes/twill.yaml")),
            bookmark_interval: Duration::from_secs(60),
            default_watch_timeout: Duration::from_secs(1800),
            tls: None,
        }
    }
}

impl FakeApiOptions {
    /// Listen on a lab's underlay bridge address (any port), inside its underlay namespace,
    /// where twilld processes in the lab's node namespaces reach it as they reach etcd.
    pub fn in_lab(lab: &crate::Lab) -> FakeApiOptions {
        FakeApiOptions {
            addr: SocketAddr::from((crate::lab::UNDERLAY_IP, 0)),
            netns: Some(lab.underlay_ns()),
            ..Default::default()
        }
    }
}

/// A patch a client sent, as recorded.
#[derive(Clone, Debug, PartialEq)]
pub struct RecordedPatch {
    pub user: String,
    /// None for the main resource, Some("status") for the subresource.
    pub subresource: Option<String>,
    pub content_type: Option<String>,
    pub body: Value,
    pub code: u16,
}

/// A running fake API server. See the module doc.
pub struct FakeApi {
    shared: Arc<Shared>,
    addr: SocketAddr,
    cmds: mpsc::UnboundedSender<Cmd>,
    thread: Option<JoinHandle<()>>,
    admin_token: String,
    last_beat: Mutex<u64>,
    tls: Option<tls::TestPki>,
}

fn new_token() -> String {
    use rand::Rng;
    let mut rng = rand::rng();
    (0..32)
        .map(|_| char::from(b"abcdefghijklmnopqrstuvwxyz0123456789"[rng.random_range(0..36)]))
        .collect()
}

fn kind_of<K: k8s_openapi::Resource>() -> Result<Kind, FakeApiError> {
    Kind::from_api_version(K::API_VERSION, K::KIND)
        .ok_or_else(|| FakeApiError::UnknownKind(format!("{}/{}", K::API_VERSION, K::KIND)))
}

impl FakeApi {
    /// Start on 127.0.0.1, any port, with the shipped manifest's RBAC.
    pub fn start_default() -> Result<FakeApi, FakeApiError> {
        Self::start(FakeApiOptions::default())
    }

    pub fn start(opts: FakeApiOptions) -> Result<FakeApi, FakeApiError> {
        let admin_user = "twill-fakeapi:admin".to_string();
        let admin_token = new_token();
        let mut tokens = HashMap::new();
        tokens.insert(admin_token.clone(), Identity::admin(&admin_user));
        if let Some(m) = &opts.manifest {
            for id in rbac::service_accounts_from_manifest(m)? {
                tokens.insert(new_token(), id);
            }
        }
        let acceptor = opts.tls.as_ref().map(tls::TestPki::acceptor).transpose()?;
        let (cmds, cmd_rx) = mpsc::unbounded_channel();
        let shared = Arc::new(Shared {
            store: Mutex::new(Store::default()),
            faults: Mutex::new(Faults::default()),
            tokens: Mutex::new(tokens),
            admin_user,
            records: Mutex::new(Vec::new()),
            on_request: Mutex::new(None),
            drop_watches: watch::channel(0).0,
            bookmark_interval: Mutex::new(opts.bookmark_interval),
            default_watch_timeout: opts.default_watch_timeout,
            cmds: cmds.clone(),
        });
        let (ready_tx, ready_rx) = std::sync::mpsc::channel::<Result<SocketAddr, String>>();
        let netns = opts.netns.clone();
        let want = opts.addr;
        let sh = shared.clone();
        let thread = std::thread::Builder::new()
            .name("twill-fakeapi".into())
            .spawn(move || {
                // Sockets belong to the namespace of the thread that makes them; the runtime is
                // single-threaded, so everything stays on this thread.
                if let Some(ns) = &netns {
                    let path = PathBuf::from(crate::netns::NETNS_DIR).join(ns);
                    let entered = std::fs::File::open(&path)
                        .map_err(|e| e.to_string())
                        .and_then(|f| {
                            nix::sched::setns(&f, nix::sched::CloneFlags::CLONE_NEWNET)
                                .map_err(|e| e.to_string())
                        });
                    if let Err(e) = entered {
                        let _ = ready_tx.send(Err(format!("enter netns {ns}: {e}")));
                        return;
                    }
                }
                let rt = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(rt) => rt,
                    Err(e) => {
                        let _ = ready_tx.send(Err(format!("runtime: {e}")));
                        return;
                    }
                };
                rt.block_on(async move {
                    let listener = match tokio::net::TcpListener::bind(want).await {
                        Ok(l) => l,
                        Err(e) => {
                            let _ = ready_tx.send(Err(format!("bind {want}: {e}")));
                            return;
                        }
                    };
                    let addr = match listener.local_addr() {
                        Ok(a) => a,
                        Err(e) => {
                            let _ = ready_tx.send(Err(e.to_string()));
                            return;
                        }
                    };
                    let _ = ready_tx.send(Ok(addr));
                    server::run(sh, listener, addr, acceptor, cmd_rx).await;
                });
            })?;
        let addr = match ready_rx.recv() {
            Ok(Ok(a)) => a,
            Ok(Err(e)) => {
                let _ = thread.join();
                return Err(FakeApiError::Start(e));
            }
            Err(_) => {
                let _ = thread.join();
                return Err(FakeApiError::Start("server thread died".into()));
            }
        };
        Ok(FakeApi {
            shared,
            addr,
            cmds,
            thread: Some(thread),
            admin_token,
            last_beat: Mutex::new(0),
            tls: opts.tls,
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://<addr>` (`https://` with TLS): what `--kube-api-url` and a kubeconfig's
    /// `server` take.
    pub fn url(&self) -> String {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        format!("{scheme}://{}", self.addr)
    }

    /// The CA clients must trust, when serving TLS.
    pub fn ca_cert(&self) -> Option<&std::path::Path> {
        self.tls.as_ref().map(|t| t.ca_cert.as_path())
    }

    // ---- identities -----------------------------------------------------------------------

    /// A token with every right (like system:masters).
    pub fn admin_token(&self) -> &str {
        &self.admin_token
    }

    /// The token of a user the fake knows (e.g. `system:serviceaccount:twill-system:twill`).
    pub fn token_for(&self, user: &str) -> Option<String> {
        lock(&self.shared.tokens)
            .iter()
            .find(|(_, id)| id.user == user)
            .map(|(t, _)| t.clone())
    }

    /// The token of a ServiceAccount the manifest binds a ClusterRole to.
    pub fn service_account_token(&self, namespace: &str, name: &str) -> Option<String> {
        self.token_for(&format!("system:serviceaccount:{namespace}:{name}"))
    }

    /// twill's ServiceAccount token (from the shipped manifest's binding).
    pub fn twill_token(&self) -> Option<String> {
        self.service_account_token(TWILL_SERVICE_ACCOUNT.0, TWILL_SERVICE_ACCOUNT.1)
    }

    /// A new identity with these rules; returns its token.
    pub fn add_identity(&self, user: &str, rules: Vec<PolicyRule>) -> String {
        let token = new_token();
        lock(&self.shared.tokens).insert(
            token.clone(),
            Identity {
                user: user.into(),
                rules,
            },
        );
        token
    }

    /// A new token for a user the fake knows, the old ones still valid (a rotated
    /// ServiceAccount token); None for an unknown user.
    pub fn new_token_for(&self, user: &str) -> Option<String> {
        let mut tokens = lock(&self.shared.tokens);
        let id = tokens.values().find(|id| id.user == user)?.clone();
        let token = new_token();
        tokens.insert(token.clone(), id);
        Some(token)
    }

    /// Stop accepting a token (401 from now on), as an expired one is.
    pub fn revoke_token(&self, token: &str) -> bool {
        lock(&self.shared.tokens).remove(token).is_some()
    }

    /// A kubeconfig for this server and token (what `--kubeconfig-file` reads).
    pub fn kubeconfig(&self, token: &str) -> String {
        let ca = self
            .ca_cert()
            .map(|p| format!("    certificate-authority: {}\n", p.display()))
            .unwrap_or_default();
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster:\n    server: {}\n{ca}\
             users:\n- name: user\n  user:\n    token: {token}\ncontexts:\n- name: fake\n  context:\n    \
             cluster: fake\n    user: user\n    namespace: default\ncurrent-context: fake\n",
            self.url()
        )
    }

    // ---- objects (as a controller or a user would change them, without RBAC) --------------

    /// Create an object of `kind` from JSON; returns it as stored.
    pub fn create_value(&self, kind: Kind, obj: Value) -> Result<Value, FakeApiError> {
        Ok(lock(&self.shared.store).create(kind, obj)?)
    }

    /// Create a typed object (Node, Pod, Namespace, NetworkPolicy).
    pub fn create<K>(&self, obj: &K) -> Result<K, FakeApiError>
    where
        K: k8s_openapi::Resource + Serialize + DeserializeOwned,
    {
        let stored = self.create_value(kind_of::<K>()?, serde_json::to_value(obj)?)?;
        Ok(serde_json::from_value(store::with_type(
            kind_of::<K>()?,
            &stored,
        ))?)
    }

    pub fn get_value(&self, kind: Kind, namespace: &str, name: &str) -> Option<Value> {
        lock(&self.shared.store)
            .get(&Key::new(kind, namespace, name))
            .map(|v| store::with_type(kind, v))
    }

    pub fn get<K>(&self, namespace: &str, name: &str) -> Option<K>
    where
        K: k8s_openapi::Resource + DeserializeOwned,
    {
        let v = self.get_value(kind_of::<K>().ok()?, namespace, name)?;
        serde_json::from_value(v).ok()
    }

    /// Change an object in place (spec, status and metadata alike); a change that changes
    /// nothing is no write. Returns the stored object.
    pub fn update_value(
        &self,
        kind: Kind,
        namespace: &str,
        name: &str,
        f: impl FnOnce(&mut Value),
    ) -> Result<Value, FakeApiError> {
        let key = Key::new(kind, namespace, name);
        let mut store = lock(&self.shared.store);
        let mut obj = store
            .get(&key)
            .cloned()
            .ok_or_else(|| StoreError::NotFound {
                kind: kind.plural(),
                name: name.into(),
            })?;
        f(&mut obj);
        Ok(store.update(&key, obj)?.0)
    }

    pub fn delete(&self, kind: Kind, namespace: &str, name: &str) -> Result<Value, FakeApiError> {
        Ok(lock(&self.shared.store).delete(&Key::new(kind, namespace, name))?)
    }

    /// Names of the objects of a kind (`ns/name` for namespaced kinds).
    pub fn names(&self, kind: Kind) -> Vec<String> {
        lock(&self.shared.store)
            .objects(kind)
            .map(|(k, _)| {
                if kind.namespaced() {
                    format!("{}/{}", k.namespace, k.name)
                } else {
                    k.name.clone()
                }
            })
            .collect()
    }

    /// A Node as the kubelet registers it: an InternalIP, Ready=False until a CNI is there,
    /// and, when given, the podCIDR kube-controller-manager would assign.
    pub fn add_node(
        &self,
        name: &str,
        internal_ip: &str,
        pod_cidr: Option<&str>,
    ) -> Result<Value, FakeApiError> {
        let mut spec = json!({});
        if let Some(c) = pod_cidr {
            spec = json!({"podCIDR": c, "podCIDRs": [c]});
        }
        self.create_value(
            Kind::Node,
            json!({
                "metadata": {"name": name, "labels": {"kubernetes.io/hostname": name, "kubernetes.io/os": "linux"}},
                "spec": spec,
                "status": {
                    "addresses": [{"type": "InternalIP", "address": internal_ip}, {"type": "Hostname", "address": name}],
                    "conditions": [{"type": "Ready", "status": "False", "reason": "KubeletNotReady",
                                    "message": "container runtime network not ready: cni plugin not initialized",
                                    "lastHeartbeatTime": store::now_rfc3339(), "lastTransitionTime": store::now_rfc3339()}]
                }
            }),
        )
    }

    /// Set a Node's podCIDRs (podCIDR is the first), as kube-controller-manager does.
    pub fn set_pod_cidrs(&self, node: &str, cidrs: &[&str]) -> Result<Value, FakeApiError> {
        self.update_value(Kind::Node, "", node, |n| {
            n["spec"]["podCIDR"] = cidrs.first().map(|c| json!(c)).unwrap_or(Value::Null);
            n["spec"]["podCIDRs"] = json!(cidrs);
            if cidrs.is_empty() {
                let spec = n["spec"].as_object_mut().expect("spec is an object");
                spec.remove("podCIDR");
                spec.remove("podCIDRs");
            }
        })
    }

    /// Remove every annotation of a Node (another controller "cleaning up").
    pub fn wipe_annotations(&self, node: &str) -> Result<Value, FakeApiError> {
        self.update_value(Kind::Node, "", node, |n| {
            if let Some(m) = n["metadata"].as_object_mut() {
                m.remove("annotations");
            }
        })
    }

    /// Set (Some) or remove (None) one annotation of a Node.
    pub fn set_node_annotation(
        &self,
        node: &str,
        key: &str,
        value: Option<&str>,
    ) -> Result<Value, FakeApiError> {
        self.update_value(Kind::Node, "", node, |n| {
            let meta = n["metadata"]
                .as_object_mut()
                .expect("metadata is an object");
            let ann = meta.entry("annotations").or_insert_with(|| json!({}));
            match value {
                Some(v) => ann[key] = v.into(),
                None => {
                    ann.as_object_mut().map(|a| a.remove(key));
                }
            }
        })
    }

    /// A kubelet heartbeat: the Ready condition's lastHeartbeatTime moves (a write that twill
    /// must not answer with writes of its own).
    pub fn heartbeat(&self, node: &str) -> Result<Value, FakeApiError> {
        // Strictly later than the last beat, also for several beats within one second.
        let beat = {
            let mut last = lock(&self.last_beat);
            *last = (*last + 1).max(store::unix_now());
            *last
        };
        self.update_value(Kind::Node, "", node, |n| {
            if let Some(conds) = n["status"]["conditions"].as_array_mut() {
                for c in conds.iter_mut().filter(|c| c["type"] == "Ready") {
                    c["lastHeartbeatTime"] = store::rfc3339(beat).into();
                }
            }
        })
    }

    pub fn add_namespace(
        &self,
        name: &str,
        labels: &[(&str, &str)],
    ) -> Result<Value, FakeApiError> {
        let mut l: serde_json::Map<String, Value> = labels
            .iter()
            .map(|(k, v)| (k.to_string(), json!(v)))
            .collect();
        l.insert("kubernetes.io/metadata.name".into(), json!(name));
        self.create_value(
            Kind::Namespace,
            json!({"metadata": {"name": name, "labels": l}}),
        )
    }

    /// A running pod on `node` with `ip`, as the kubelet reports it.
    pub fn add_pod(
        &self,
        namespace: &str,
        name: &str,
        node: &str,
        ip: &str,
        labels: &[(&str, &str)],
    ) -> Result<Value, FakeApiError> {
        let l: serde_json::Map<String, Value> = labels
            .iter()
            .map(|(k, v)| (k.to_string(), json!(v)))
            .collect();
        self.create_value(
            Kind::Pod,
            json!({
                "metadata": {"name": name, "namespace": namespace, "labels": l},
                "spec": {"nodeName": node, "containers": [{"name": "c", "image": "busybox"}]},
                "status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}]}
            }),
        )
    }

    /// A NetworkPolicy from its JSON (namespace from `metadata.namespace`).
    pub fn add_network_policy(&self, policy: Value) -> Result<Value, FakeApiError> {
        self.create_value(Kind::NetworkPolicy, policy)
    }

    /// The current (last issued) resourceVersion.
    pub fn resource_version(&self) -> u64 {
        lock(&self.shared.store).resource_version()
    }

    // ---- faults ---------------------------------------------------------------------------

    /// Cut every open watch stream (the connection is aborted, as when a proxy or apiserver
    /// instance goes away). Clients must resume from their last resourceVersion.
    pub fn drop_watches(&self) {
        self.shared.drop_watches.send_modify(|g| *g += 1);
    }

    /// For `d`, take requests and never answer them (the connection is dropped when the stall
    /// ends), and send nothing on open watches. Detects clients without timeouts.
    pub fn stall_for(&self, d: Duration) {
        lock(&self.shared.faults).stall_until = Some(Instant::now() + d);
    }

    /// End a stall early.
    pub fn unstall(&self) {
        lock(&self.shared.faults).stall_until = None;
    }

    /// For `d`, open watches send nothing (events queue up, in order) while every request is
    /// served: a watch cache lagging behind what GET returns.
    pub fn hold_watches_for(&self, d: Duration) {
        lock(&self.shared.faults).hold_watches_until = Some(Instant::now() + d);
    }

    /// Let held watches send what queued up.
    pub fn release_watches(&self) {
        lock(&self.shared.faults).hold_watches_until = None;
    }

    /// Answer the next `n` authenticated requests with `failure` instead of serving them.
    pub fn fail_next(&self, n: u32, failure: Failure) {
        lock(&self.shared.faults).fail = (n > 0).then_some((n, failure));
    }

    /// Stop listening and cut every connection; returns once nothing is served any more.
    pub fn go_down(&self) -> Result<(), FakeApiError> {
        let (tx, rx) = std::sync::mpsc::channel();
        self.cmds
            .send(Cmd::Down(Some(tx)))
            .map_err(|_| FakeApiError::Start("server is gone".into()))?;
        rx.recv_timeout(Duration::from_secs(10))
            .map_err(|_| FakeApiError::Start("server did not go down".into()))
    }

    /// Listen again on the same address (state kept, as an apiserver restarting over etcd).
    pub fn come_back(&self) -> Result<(), FakeApiError> {
        let (tx, rx) = std::sync::mpsc::channel();
        self.cmds
            .send(Cmd::Up(Some(tx)))
            .map_err(|_| FakeApiError::Start("server is gone".into()))?;
        rx.recv_timeout(Duration::from_secs(10))
            .map_err(|_| FakeApiError::Start("server did not come back".into()))?
            .map_err(FakeApiError::Start)
    }

    /// Compact up to the current resourceVersion: every older one answers 410 Gone.
    pub fn compact(&self) {
        let mut s = lock(&self.shared.store);
        let rv = s.resource_version();
        s.compact_to(rv);
    }

    pub fn compact_to(&self, rv: u64) {
        lock(&self.shared.store).compact_to(rv);
    }

    pub fn compacted(&self) -> u64 {
        lock(&self.shared.store).compacted()
    }

    /// How often watches that asked for bookmarks get one (applies to watches opened later).
    pub fn set_bookmark_interval(&self, d: Duration) {
        *lock(&self.shared.bookmark_interval) = d;
    }

    /// Watch streams open now.
    pub fn open_watches(&self) -> usize {
        lock(&self.shared.store).open_watches()
    }

    // ---- what clients did -----------------------------------------------------------------

    pub fn requests(&self) -> Vec<RequestRecord> {
        lock(&self.shared.records).clone()
    }

    /// Runs `hook` on each request (not the fake's own `/fake/` paths) after it is handled and
    /// before its answer leaves: what held when a client sent something, checked as it arrives.
    pub fn on_request(&self, hook: impl Fn(&RequestRecord) + Send + Sync + 'static) {
        *lock(&self.shared.on_request) = Some(Arc::new(hook));
    }

    pub fn clear_requests(&self) {
        lock(&self.shared.records).clear();
    }

    /// Requests with this verb on this resource (`nodes`, `nodes/status`, ...), any answer.
    pub fn count(&self, verb: &str, resource: &str) -> usize {
        lock(&self.shared.records)
            .iter()
            .filter(|r| r.verb == verb && r.resource == resource)
            .count()
    }

    /// Writes (patch, create, update, delete) by anyone but the fake's admin, on any resource:
    /// what "costs nothing" must keep at zero.
    pub fn client_writes(&self) -> usize {
        lock(&self.shared.records)
            .iter()
            .filter(|r| matches!(r.verb.as_str(), "patch" | "create" | "update" | "delete"))
            .count()
    }

    /// The patches sent for a Node (main resource and status), oldest first.
    pub fn node_patches(&self, node: &str) -> Vec<RecordedPatch> {
        lock(&self.shared.records)
            .iter()
            .filter(|r| {
                r.verb == "patch"
                    && r.resource.starts_with("nodes")
                    && r.name.as_deref() == Some(node)
            })
            .map(|r| RecordedPatch {
                user: r.user.clone(),
                subresource: r.resource.split_once('/').map(|(_, s)| s.to_string()),
                content_type: r.content_type.clone(),
                body: r.body.clone().unwrap_or(Value::Null),
                code: r.code,
            })
            .collect()
    }
}

impl Drop for FakeApi {
    fn drop(&mut self) {
        let _ = self.cmds.send(Cmd::Shutdown);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
