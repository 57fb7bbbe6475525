//! NetworkPolicy on this node: the objects (from etcd now, from the Kubernetes API later) in one
//! `twill_netpol` cluster model, compiled for this node, rendered to nftables and kept in the
//! kernel. One task owns all of it; the CNI server and the main loop talk to it by message.
//!
//! - A pod is programmed in CNI ADD before the answer (`PolicyHandle::pod_up`): no moment where
//!   a pod some policy isolates is reachable unprotected. Usually the pod's own verdict-map
//!   entries are all it needs (its policies' chains exist already): one netlink transaction,
//!   no compile, and the full program (the pod as a peer in others' sets, its named ports)
//!   follows right after the answer, when no other request waits. Until then the pod is only
//!   ever more closed than its policies say, never more open. Otherwise the whole program is
//!   compiled and applied before the answer.
//! - Everything else (a policy, a namespace's labels, a remote pod) is applied as it arrives,
//!   as the difference to what the kernel has, in one transaction.
//! - The last cluster state is kept in `<state-dir>/policy-cache.json` and the local pods in
//!   `<state-dir>/pods/`: a restart, also with etcd down, programs exactly what was enforced.
//!   Until a cluster state is known, ADD answers "try again later": policy cannot be guessed.

pub mod pods;
pub mod render;
mod source;
pub mod spoof;

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::atomic::Ordering::{self, Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use netpol::model::Direction;
use netpol::program::{self, Chain as PChain, NodeProgram, ProgramDelta};
use serde::Serialize;
use tokio::sync::{mpsc, oneshot};

use crate::daemon::Shared;
use crate::metrics::Metrics;
use crate::nft::{Check, Nft, TableWriter};
use crate::registry::objects::{watch_dir, DirEvent, ObjKv, ObjectStore, Removal};
use crate::registry::RegistryError;
use futures::FutureExt;
use pods::{Attachment, LocalPod};
use render::RenderOpts;
use source::{Objects, PodMove};

/// The etcd directories under the prefix.
pub const POLICIES: &str = "policies";
pub const NAMESPACES: &str = "namespaces";
pub const PODS: &str = "pods";

#[derive(Clone, Debug)]
pub struct PolicyOptions {
    /// This node's name: pods' `spec.nodeName`.
    pub node: String,
    /// Kubernetes mode: pods (their labels and ports too) come from the API server.
    pub pods_from_api: bool,
    pub state_dir: PathBuf,
    pub render: RenderOpts,
}

enum Msg {
    /// The pod, with its API object when the handle read it (Kubernetes mode).
    PodUp(
        Box<LocalPod>,
        Option<Box<netpol::api::Pod>>,
        oneshot::Sender<Result<(), UpError>>,
    ),
    /// The ADD of this attachment succeeded: its record goes to etcd.
    AddDone(Attachment),
    /// The ADD of this attachment failed after its policy step succeeded (its veth, its
    /// address): undo that step. Answered once the kernel holds the result.
    AddFailed(Attachment, oneshot::Sender<()>),
    /// Compare the kernel with what was applied; restore it (resync, nftables notification).
    Check,
}

/// A pod to forget (`Engine::pods_down`). `deleted`: its port is gone (DEL, GC), so a cut for
/// an unreadable record (`spoof::Sources::closed`) is lifted.
struct Down {
    attachment: Attachment,
    deleted: bool,
    reply: oneshot::Sender<()>,
}

/// The CNI server's and main loop's way to the policy task. Cheap to clone.
#[derive(Clone)]
pub struct PolicyHandle {
    tx: mpsc::Sender<Msg>,
    /// DEL and GC: a channel of their own, so that the ones queued up go as one batch.
    down: mpsc::Sender<Down>,
    node: Arc<str>,
    busy: Arc<Busy>,
    /// Kubernetes mode: reads a pod from the API by key, for an ADD that comes before the
    /// watch delivered its pod. Here, not in the policy task: the read may take seconds, and
    /// every other request and event would wait behind it.
    fetch: Option<Fetch>,
}

/// CNI requests in progress, which deferred syncs let finish first.
#[derive(Debug, Default)]
struct Busy {
    requests: std::sync::atomic::AtomicUsize,
    idle: tokio::sync::Notify,
    /// When the last request ended.
    ended: std::sync::Mutex<Option<tokio::time::Instant>>,
}

/// Held by a CNI request while it runs (`PolicyHandle::request`).
pub struct RequestGuard(Arc<Busy>);

impl Drop for RequestGuard {
    fn drop(&mut self) {
        if let Ok(mut t) = self.0.ended.lock() {
            *t = Some(tokio::time::Instant::now());
        }
        if self.0.requests.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.0.idle.notify_waiters();
        }
    }
}

/// Until `due` is, and then until no CNI request runs, for at most its `requests_wait`.
async fn wait_due(due: Option<Due>, busy: &Busy) {
    let Some(due) = due else {
        return std::future::pending().await;
    };
    tokio::time::sleep_until(due.at).await;
    until_idle(busy, due.deadline()).await;
    if !due.after.is_zero() {
        tokio::time::sleep(due.after).await;
    }
}

/// Until `due` is, and then until no CNI request has run for `QUIET`, for at most its
/// `requests_wait`: for kernel work that would hold up the next pod's ADD (pods come and go
/// in a row while a deployment rolls; the pause between two is shorter than the work).
async fn wait_quiet(due: Option<Due>, busy: &Busy) {
    let Some(due) = due else {
        return std::future::pending().await;
    };
    tokio::time::sleep_until(due.at).await;
    let deadline = due.deadline();
    loop {
        until_idle(busy, deadline).await;
        let now = tokio::time::Instant::now();
        let ended = busy.ended.lock().ok().and_then(|t| *t);
        let quiet_at = ended.map_or(now, |t| t + QUIET);
        if now >= deadline || (busy.requests.load(Ordering::SeqCst) == 0 && now >= quiet_at) {
            return;
        }
        tokio::time::sleep_until(quiet_at.min(deadline)).await;
    }
}

/// How long no CNI request must have run for `wait_quiet`.
const QUIET: Duration = Duration::from_millis(500);

/// Until no CNI request runs, or `deadline`.
async fn until_idle(busy: &Busy, deadline: tokio::time::Instant) {
    loop {
        let idle = busy.idle.notified();
        tokio::pin!(idle);
        idle.as_mut().enable();
        if busy.requests.load(Ordering::SeqCst) == 0 {
            return;
        }
        if tokio::time::timeout_at(deadline, idle).await.is_err() {
            return;
        }
    }
}

impl std::fmt::Debug for PolicyHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PolicyHandle(node {})", self.node)
    }
}

/// Why a pod could not be programmed: ADD fails with it.
#[derive(Debug, thiserror::Error)]
pub enum PodUpError {
    /// Not yet possible (no cluster state known): the runtime should retry.
    #[error("{0}")]
    NotReady(String),
    #[error("{0}")]
    Failed(String),
    /// Another attachment on this node holds the pod's name (key): two containers whose
    /// names make the same key, or a re-created pod whose old sandbox was not deleted yet.
    /// One record per name, so only one can be protected; the caller decides whether the
    /// other is gone (`pod_down` it, then try again) or alive (ADD fails).
    #[error("pod {key} is set up on this node already, by container {} on {}", .by.container_id, .by.ifname)]
    Taken { key: String, by: Attachment },
}

/// The policy task's answer to a PodUp.
#[derive(Debug)]
enum UpError {
    Pod(PodUpError),
    /// Kubernetes mode: the watch has not delivered the pod's object yet; the handle reads it
    /// and asks again with it.
    NeedsApiObject,
}

impl From<PodUpError> for UpError {
    fn from(e: PodUpError) -> Self {
        UpError::Pod(e)
    }
}

impl PolicyHandle {
    /// This node's name, as pods' `spec.nodeName`.
    pub fn node(&self) -> &str {
        &self.node
    }

    /// Programs `pod` (in its IPAM file, not yet answered to the runtime). An error means it
    /// is not protected as it should be: ADD must fail.
    pub async fn pod_up(&self, pod: LocalPod) -> Result<(), PodUpError> {
        match self.send_up(pod.clone(), None).await {
            Err(UpError::NeedsApiObject) => {}
            Err(UpError::Pod(e)) => return Err(e),
            Ok(()) => return Ok(()),
        }
        let api = self.read_api_pod(&pod.key()).await?;
        match self.send_up(pod, Some(Box::new(api))).await {
            Ok(()) => Ok(()),
            Err(UpError::Pod(e)) => Err(e),
            Err(UpError::NeedsApiObject) => Err(PodUpError::Failed(
                "the policy task asked for the pod's API object it was given".into(),
            )),
        }
    }

    async fn send_up(
        &self,
        pod: LocalPod,
        api: Option<Box<netpol::api::Pod>>,
    ) -> Result<(), UpError> {
        let (tx, rx) = oneshot::channel();
        let gone = || UpError::Pod(PodUpError::Failed("the policy task stopped".into()));
        self.tx
            .send(Msg::PodUp(Box::new(pod), api, tx))
            .await
            .map_err(|_| gone())?;
        rx.await.map_err(|_| gone())?
    }

    /// The pod's object from the API, waited for a bounded time; a pod the API does not have
    /// (yet) is refused, to be retried by the runtime.
    async fn read_api_pod(&self, key: &str) -> Result<netpol::api::Pod, PodUpError> {
        let Some(fetch) = self.fetch.as_ref() else {
            return Err(PodUpError::Failed(
                "the pod's API object was asked for outside Kubernetes mode".into(),
            ));
        };
        let not_ready = |why: String| PodUpError::NotReady(format!("pod {key} {why}"));
        match tokio::time::timeout(API_POD_WAIT, fetch(key.to_string())).await {
            Ok(Ok(Some(kv))) => serde_json::from_slice(&kv.value)
                .map_err(|e| not_ready(format!("as the Kubernetes API has it: {e}"))),
            Ok(Ok(None)) => Err(not_ready("is not in the Kubernetes API (yet)".into())),
            Ok(Err(e)) => Err(not_ready(format!(
                "could not be read from the Kubernetes API: {e}"
            ))),
            Err(_) => Err(not_ready(
                "could not be read from the Kubernetes API in time".into(),
            )),
        }
    }

    /// Forgets the pod of `attachment`, whose port is gone (DEL, GC). Best effort.
    pub async fn pod_down(&self, attachment: Attachment) {
        self.down(attachment, true).await
    }

    /// Forgets the pod a failed ADD of a new attachment programmed. Its port may be another
    /// pod's that runs on (the ADD found the interface there): one cut off for an unreadable
    /// record stays so.
    pub async fn add_undone(&self, attachment: Attachment) {
        self.down(attachment, false).await
    }

    async fn down(&self, attachment: Attachment, deleted: bool) {
        let (reply, rx) = oneshot::channel();
        let d = Down {
            attachment,
            deleted,
            reply,
        };
        if self.down.send(d).await.is_ok() {
            let _ = rx.await;
        }
    }

    /// The ADD that programmed `attachment` succeeded: its record goes to etcd.
    pub async fn add_done(&self, attachment: Attachment) {
        let _ = self.tx.send(Msg::AddDone(attachment)).await;
    }

    /// The ADD that programmed `attachment` failed later on: its record is taken back out, and
    /// the attachment's earlier record (the running pod's, labels and addresses) put back, or
    /// the pod forgotten when it had none. False when the policy task did not answer.
    pub async fn add_failed(&self, attachment: Attachment) -> bool {
        let (tx, rx) = oneshot::channel();
        self.tx.send(Msg::AddFailed(attachment, tx)).await.is_ok() && rx.await.is_ok()
    }

    pub fn check(&self) {
        let _ = self.tx.try_send(Msg::Check);
    }

    /// Marks a CNI request in progress until the guard drops: deferred policy work waits for
    /// it rather than take the CPU it needs.
    pub fn request(&self) -> RequestGuard {
        self.busy.requests.fetch_add(1, Ordering::SeqCst);
        RequestGuard(self.busy.clone())
    }
}

/// What /status shows of policy.
#[derive(Clone, Debug, Default, Serialize)]
pub struct PolicyStatus {
    /// A cluster state is known (from etcd, or the cache of an earlier run).
    pub loaded: bool,
    pub waiting_for: Option<String>,
    /// Policies that select a pod on this node, and the pods they isolate.
    pub in_force: Vec<PolicyInForce>,
    /// Policies known in the cluster (in force here or not).
    pub policies: usize,
    pub local_pods: usize,
    /// Local pod addresses waiting in the pending chains for their policies' chains.
    pub pending: usize,
    pub sets: usize,
    pub chains: usize,
    pub elements: usize,
    pub last_sync_ms: Option<f64>,
    /// Where the last change's time went.
    pub last_sync: Option<SyncSteps>,
    /// Where the last CNI ADD's policy step went.
    pub last_pod_up: Option<PodUpSteps>,
    pub error: Option<String>,
    /// Each pod port may send only from its pod's addresses (`spoof`).
    pub source_check: spoof::SourceStatus,
}

/// The steps of one sync, ms: the cluster compiled for this node, the table rendered and
/// compared with what the kernel has, the change applied (netlink element operations, or
/// `nft -f` with the table's difference).
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct SyncSteps {
    pub why: String,
    pub compile_ms: f64,
    pub render_ms: f64,
    pub apply_ms: f64,
    /// "netlink" or "nft".
    pub path: &'static str,
}

/// One CNI ADD's policy step inside the engine, ms: the pod's record in the state dir and,
/// at the same time, programming it ("own delta": set elements, and map entries to the
/// pending chains, over netlink; "pending": map entries to the pending chains; "compile": a
/// full sync).
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct PodUpSteps {
    pub record_ms: f64,
    pub program_ms: f64,
    pub total_ms: f64,
    pub path: &'static str,
    /// "own delta" for a pod its policies isolate: from the answer until its map entries were
    /// in (it was closed in between).
    pub open_ms: Option<f64>,
}

#[derive(Clone, Debug, Serialize)]
pub struct PolicyInForce {
    pub policy: String,
    pub ingress: Vec<String>,
    pub egress: Vec<String>,
}

/// Packets and bytes dropped per policy and direction (counted on the groups that policy is
/// part of), for /metrics.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Denied {
    pub policy: String,
    pub direction: &'static str,
    pub packets: u64,
    pub bytes: u64,
}

/// Starts the policy task. It watches `store`'s policy, namespace and pod directories itself.
pub fn spawn<S: ObjectStore>(store: S, opts: PolicyOptions, shared: Arc<Shared>) -> PolicyHandle {
    let (tx, rx) = mpsc::channel(256);
    let (down, down_rx) = mpsc::channel(256);
    let node: Arc<str> = opts.node.clone().into();
    let busy = Arc::new(Busy::default());
    let fetch: Option<Fetch> = opts.pods_from_api.then(|| {
        let s = store.clone();
        Arc::new(move |key: String| {
            let s = s.clone();
            async move { s.get(PODS, &key).await }.boxed()
        }) as Fetch
    });
    tokio::spawn(run(store, opts, rx, down_rx, shared, busy.clone()));
    PolicyHandle {
        tx,
        down,
        node,
        busy,
        fetch,
    }
}

struct Engine {
    opts: PolicyOptions,
    shared: Arc<Shared>,
    writer: Option<TableWriter>,
    /// The pods' source checks (None without nft, as `writer`).
    spoof: Option<spoof::SourceCheck>,
    objects: Objects,
    /// What the kernel was last given, as a program.
    program: Option<NodeProgram>,
    status: PolicyStatus,
    /// When each connection (source, destination, protocol, port) was last logged as denied:
    /// its retransmissions are not news.
    logged:
        std::collections::HashMap<(std::net::IpAddr, std::net::IpAddr, u8, Option<u16>), Instant>,
    /// Pod records to write to (Some) or delete from (None) etcd, by key; retried until done.
    records: mpsc::UnboundedSender<(String, Option<Vec<u8>>)>,
    cache_dirty: bool,
    /// When the full program is due and why (a pod went in or out by its own delta, a pod
    /// left, etcd changed something): one sync for all of them, once no request waits.
    sync_due: Option<Due>,
    /// When the source checks of pods that left are due out of the kernel (see `pods_down`).
    sources_due: Option<Due>,
    /// Own deltas went to the kernel since the writer last rendered the table.
    kernel_ahead: bool,
    /// Each ADD whose policy step succeeded and whose end is not known yet (its veth may
    /// still fail), by attachment: the record the attachment had before it (None: a new
    /// attachment), what undoing the ADD puts back.
    unsettled: std::collections::HashMap<Attachment, Option<LocalPod>>,
}

type Fetch = Arc<
    dyn Fn(String) -> futures::future::BoxFuture<'static, Result<Option<ObjKv>, RegistryError>>
        + Send
        + Sync,
>;

/// How long an ADD in Kubernetes mode waits for its pod's object from the API.
const API_POD_WAIT: Duration = Duration::from_secs(3);

/// How the local pods' source checks are written (`SourceCheck`).
#[derive(Clone, Copy, Debug)]
enum SourcesWrite {
    /// Exactly the local pods' elements: at start.
    Exact,
    /// An ADD's: its pod's elements in; those of pods that left stay until `Left` (unless
    /// their port's name is taken again).
    Added,
    /// The elements of pods that left out, off this task (`sources_due`).
    Left,
}

/// A deferred sync.
#[derive(Clone, Copy, Debug)]
struct Due {
    why: &'static str,
    at: tokio::time::Instant,
    /// Then how long it may wait for the CNI requests in progress to finish: they share the
    /// node's CPUs, and a compile would take its time from them.
    requests_wait: Duration,
    /// And then how long to leave the plugin, once answered, to hand its answer on.
    after: Duration,
}

/// The longest a pod record waits for the CNI requests in progress before it goes to etcd.
const RECORDS_WAIT: Duration = Duration::from_millis(100);
/// How long a sync that only confirms an own delta waits: pods in a burst share one.
const CHECK_DELAY: Duration = Duration::from_secs(1);

impl Due {
    /// As soon as nothing else is ready (etcd changed something).
    fn now(why: &'static str) -> Due {
        Due {
            why,
            at: tokio::time::Instant::now(),
            requests_wait: Duration::ZERO,
            after: Duration::ZERO,
        }
    }

    /// Once no CNI request has run for a moment, at the latest in 10 s (`wait_quiet`).
    fn quiet(why: &'static str) -> Due {
        Due {
            requests_wait: Duration::from_secs(10),
            ..Due::now(why)
        }
    }

    /// Once the CNI requests in progress are answered (a pod left the slow way).
    fn soon(why: &'static str) -> Due {
        Due {
            requests_wait: Duration::from_millis(250),
            ..Due::now(why)
        }
    }

    /// A new pod waits in the pending chains: right after its ADD is answered and the plugin
    /// has had a moment to hand the answer on (the compile and `nft` take two cores' worth).
    fn pending(why: &'static str) -> Due {
        Due {
            requests_wait: Duration::from_millis(20),
            after: Duration::from_millis(5),
            ..Due::now(why)
        }
    }

    /// A compile that only confirms what an own delta did.
    fn check(why: &'static str) -> Due {
        Due {
            at: tokio::time::Instant::now() + CHECK_DELAY,
            ..Due::soon(why)
        }
    }

    /// One sync for both: the earlier, and the shorter wait.
    fn merge(self, other: Due) -> Due {
        let (first, second) = if other.deadline() < self.deadline() {
            (other, self)
        } else {
            (self, other)
        };
        Due {
            at: first.at.min(second.at),
            requests_wait: first.requests_wait.min(second.requests_wait),
            after: first.after.min(second.after),
            ..first
        }
    }

    fn deadline(&self) -> tokio::time::Instant {
        self.at + self.requests_wait
    }
}

async fn run<S: ObjectStore>(
    store: S,
    opts: PolicyOptions,
    mut rx: mpsc::Receiver<Msg>,
    mut down_rx: mpsc::Receiver<Down>,
    shared: Arc<Shared>,
    busy: Arc<Busy>,
) {
    ensure_bridge_netfilter();
    let (writer, spoof) = match Nft::find() {
        Ok(n) => (
            Some(TableWriter::new(n.clone())),
            Some(spoof::SourceCheck::new(n)),
        ),
        Err(e) => {
            tracing::error!(error = %e, "network policy cannot be enforced; pods will not start");
            (None, None)
        }
    };
    let mut objects = Objects::new(&opts.node, &opts.state_dir);
    if opts.pods_from_api {
        objects = objects.with_api_pods();
    }
    objects.load_local();
    objects.drop_gone_ports(crate::netlink::pod::link_exists);
    if !objects.closed_ports().is_empty() {
        // Who holds the cut-off ports, to recognise their pods (read only: IPAM's files as
        // they were before this start).
        let dir = opts.state_dir.clone();
        let read = tokio::task::spawn_blocking(move || {
            crate::cni::ipam::Ipam::open(&dir)
                .map(|i| i.allocations())
                .map_err(|e| e.to_string())
        })
        .await
        .unwrap_or_else(|e| Err(e.to_string()));
        match read {
            Ok(held) => objects.resolve_closed(held.into_iter().map(|(_, ip, h)| {
                let a = Attachment {
                    container_id: h.owner.container_id,
                    ifname: h.owner.ifname,
                };
                (a, ip)
            })),
            Err(e) => {
                tracing::warn!(error = %e, "reading the address allocations for the pods cut off")
            }
        }
    }
    let cached = objects.load_cache();
    let (records, records_rx) = mpsc::unbounded_channel();
    let mut names = objects.former_names().clone();
    names.insert(opts.node.clone());
    tokio::spawn(write_records(
        store.clone(),
        names,
        records_rx,
        shared.metrics.clone(),
        busy.clone(),
    ));
    let (dir_tx, mut dir_rx) = mpsc::channel(1024);
    for dir in [POLICIES, NAMESPACES, PODS] {
        tokio::spawn(watch_dir(
            store.clone(),
            dir,
            dir_tx.clone(),
            shared.metrics.clone(),
        ));
    }
    let mut e = Engine {
        opts,
        shared,
        writer,
        spoof,
        objects,
        program: None,
        status: PolicyStatus::default(),
        logged: std::collections::HashMap::new(),
        records,
        cache_dirty: false,
        sync_due: None,
        sources_due: None,
        kernel_ahead: false,
        unsettled: std::collections::HashMap::new(),
    };
    // The recorded pods' ports are checked from the start, before anything else runs.
    let _ = e.sources(SourcesWrite::Exact).await;
    if cached {
        tracing::info!("policy: programming the cached cluster state until etcd answers");
        e.sync("cache").await;
    }
    e.publish();
    let mut denied_rx = if e.opts.render.log_denied {
        match crate::netlink::nflog::subscribe(render::LOG_GROUP) {
            Ok(rx) => Some(rx),
            Err(err) => {
                tracing::error!(error = %err, "cannot read the denied-connection log (NFLOG); counters in /metrics still count denials");
                None
            }
        }
    } else {
        None
    };
    let mut cache_tick = tokio::time::interval(Duration::from_secs(2));
    let mut cache_write: Option<tokio::task::JoinHandle<()>> = None;
    loop {
        tokio::select! {
            // Requests first: a CNI ADD must not wait behind work that can wait.
            biased;
            down = down_rx.recv() => {
                let Some(first) = down else { return };
                // DEL before ADD (as they came, mostly: an ADD may wait for a DEL of its pod's
                // name). The DELs queued up meanwhile go with it: taking set elements out costs the
                // kernel an RCU grace period per transaction (10-20 ms here), so a burst of
                // DELs pays it once, not one after another.
                let mut batch = vec![first];
                while let Ok(more) = down_rx.try_recv() {
                    batch.push(more);
                }
                let _ = e.reopen(batch.iter().filter(|d| d.deleted).map(|d| &d.attachment));
                e.pods_down(batch.iter().map(|d| &d.attachment)).await;
                for d in batch {
                    let _ = d.reply.send(());
                }
                tokio::task::yield_now().await;
                e.publish();
            }
            msg = rx.recv() => match msg {
                None => return,
                Some(Msg::PodUp(pod, api, reply)) => {
                    let (r, opening) = match e.pod_up(*pod, api.map(|a| *a)).await {
                        Ok(opening) => (Ok(()), opening),
                        Err(err) => (Err(err), None),
                    };
                    let answered = Instant::now();
                    let _ = reply.send(r);
                    // The pod's opening and /status after the answer: the request goes on
                    // first (it was woken into this worker's LIFO slot, see the deferred sync
                    // below).
                    tokio::task::yield_now().await;
                    e.open(opening, answered).await;
                    e.publish();
                }
                Some(Msg::AddDone(a)) => {
                    if e.add_done(&a) {
                        e.publish();
                    }
                }
                Some(Msg::AddFailed(a, reply)) => {
                    e.add_failed(&a).await;
                    let _ = reply.send(());
                    e.publish();
                }
                Some(Msg::Check) => e.check().await,
            },
            Some(p) = recv_opt(&mut denied_rx) => e.log_denied(p),
            ev = dir_rx.recv() => {
                let Some((dir, ev)) = ev else { return };
                let mut out = e.on_dir(dir, ev);
                // A burst (a re-list, a script applying many objects): one program for all.
                while let Ok((dir, ev)) = dir_rx.try_recv() {
                    let more = e.on_dir(dir, ev);
                    out.changed |= more.changed;
                    out.others |= more.others;
                    out.moves.extend(more.moves);
                }
                if out.changed && e.objects.loaded() {
                    let d = if !out.others && e.pods_moved(out.moves).await {
                        Due::check("etcd: pods")
                    } else {
                        Due::now("etcd")
                    };
                    e.due(d);
                }
                e.publish();
            }
            _ = cache_tick.tick() => {
                // Written off this task: the file grows with the cluster, and ADDs wait here.
                let idle = cache_write.as_ref().is_none_or(|w| w.is_finished());
                if idle && std::mem::take(&mut e.cache_dirty) {
                    match e.objects.cache_bytes() {
                        Ok(bytes) => {
                            let path = e.objects.cache_path().to_path_buf();
                            cache_write = Some(tokio::task::spawn_blocking(move || {
                                if let Err(err) = crate::state::write_atomic(&path, &bytes) {
                                    tracing::warn!(file = %path.display(), error = %err, "saving the policy cache failed");
                                }
                            }));
                        }
                        Err(err) => tracing::warn!(error = %err, "serialising the policy cache failed"),
                    }
                }
            }
            _ = wait_quiet(e.sources_due, &busy), if e.sources_due.is_some() => {
                e.sources_due = None;
                let _ = e.sources(SourcesWrite::Left).await;
                e.publish();
            }
            // Nothing else is ready: the program left for later.
            _ = wait_due(e.sync_due, &busy), if e.sync_due.is_some() => {
                // The request just answered was woken into this worker's LIFO slot, which no
                // other worker steals: it would wait out the whole compile (which never
                // yields) unless this task steps aside first.
                tokio::task::yield_now().await;
                let why = e.sync_due.map_or("due", |d| d.why);
                e.sync(why).await;
                e.publish();
            }
        }
    }
}

/// `--network-policy=false`: no policy table of ours may stay behind (also from an earlier run).
pub async fn remove_table() {
    if let Ok(nft) = Nft::find() {
        let mut w = TableWriter::new(nft);
        for (family, table) in [
            (crate::nft::model::Family::Inet, render::TABLE),
            (crate::nft::model::Family::Bridge, spoof::TABLE),
        ] {
            if let Err(e) = w.remove(family, table).await {
                tracing::warn!(error = %e, table, "removing a network policy table failed");
            }
        }
    }
}

async fn recv_opt<T>(rx: &mut Option<mpsc::Receiver<T>>) -> Option<T> {
    match rx {
        Some(r) => r.recv().await,
        None => std::future::pending().await,
    }
}

/// br_netfilter: bridged traffic between pods of one node passes the IP hooks only with this.
fn ensure_bridge_netfilter() {
    for f in ["bridge-nf-call-iptables", "bridge-nf-call-ip6tables"] {
        let path = format!("/proc/sys/net/bridge/{f}");
        match std::fs::read_to_string(&path) {
            Ok(v) if v.trim() == "1" => {}
            Ok(_) => {
                if let Err(e) = std::fs::write(&path, "1") {
                    tracing::error!(%path, error = %e, "cannot turn on br_netfilter: traffic between pods of the same node is not filtered by policy");
                }
            }
            Err(e) => {
                tracing::error!(%path, error = %e, "br_netfilter is not available (module not loaded): traffic between pods of the same node is not filtered by policy")
            }
        }
    }
}

impl Engine {
    /// Programs the pod; returns its verdict-map entries to open once ADD is answered (closed
    /// until then: `netpol::program::closed_first`), when it took the fast path.
    async fn pod_up(
        &mut self,
        pod: LocalPod,
        api: Option<netpol::api::Pod>,
    ) -> Result<Option<ProgramDelta>, UpError> {
        let start = Instant::now();
        if self.writer.is_none() {
            return Err(PodUpError::Failed(
                "nft is not installed: network policy cannot be enforced (install nftables, \
                 or run twilld with --network-policy=false)"
                    .into(),
            )
            .into());
        }
        if !self.objects.loaded() {
            return Err(PodUpError::NotReady(
                "network policy state not known yet (waiting for etcd): try again later".into(),
            )
            .into());
        }
        let mut pod = pod;
        if self.opts.pods_from_api {
            self.labels_from_api(&mut pod, api)?;
        }
        Ok(self.program_pod(pod, start).await?)
    }

    /// `pod_up` once the pod's labels are known.
    async fn program_pod(
        &mut self,
        pod: LocalPod,
        start: Instant,
    ) -> Result<Option<ProgramDelta>, PodUpError> {
        let pod_key = netpol::model::PodKey::new(pod.namespace(), &pod.pod.metadata.name);
        // A pod re-created under its name replaces a record whose addresses the program may
        // still hold: compiled whole.
        let replaces = self.objects.cluster().pod(&pod_key).is_some();
        let attachment = pod.attachment.clone();
        // An earlier ADD of the attachment that never said how it ended is over now.
        self.unsettled.remove(&attachment);
        // A running attachment's record (a retried ADD, a label edit): what a failed step puts
        // back, so that its pod does not run on unprotected.
        let before = self.objects.local_of(&attachment).cloned();
        let copy = pod.clone();
        // Refused before the record is written: that write would replace the record of what
        // holds the name or the attachment now.
        self.objects.local_insert(pod)?;
        // The state-dir record (what a restart programs from) is written while the kernel is
        // programmed; ADD answers only when both are done.
        let files = self.objects.files();
        let saving = tokio::task::spawn_blocking(move || {
            let t = Instant::now();
            files.save(&copy).map(|()| t.elapsed())
        });
        if let Err(e) = self.sources(SourcesWrite::Added).await {
            // A pod that could send from any address would escape its policies.
            let _ = saving.await;
            self.pod_up_failed(&attachment, before).await;
            return Err(PodUpError::Failed(format!(
                "programming the pod's source checks: {e}"
            )));
        }
        let recorded = Instant::now();
        // Closed at first where its policies isolate it; opened right after the answer.
        let mut opening = None;
        let fast = !replaces
            && self
                .apply_own_delta(|c, node, prog| {
                    let (first, then) =
                        program::closed_first(program::pod_added(c, node, prog, &pod_key)?);
                    opening = then;
                    Some(first)
                })
                .await;
        // Its policies' chains are missing (the first pod of its kind here): it waits in the
        // pending chains, closed, until the compile right after the answer makes them.
        let pending = !replaces
            && !fast
            && self
                .apply_own_delta(|c, node, prog| program::pod_pending(c, node, prog, &pod_key))
                .await;
        let path = if fast {
            self.due(Due::check("pod added"));
            "own delta"
        } else if pending {
            self.due(Due::pending("pod added (first of its kind)"));
            "pending"
        } else {
            self.sync("pod added").await;
            if let Some(err) = self.status.error.clone() {
                // No record of this ADD may outlive it.
                let _ = saving.await;
                self.pod_up_failed(&attachment, before).await;
                return Err(PodUpError::Failed(format!(
                    "programming network policy: {err}"
                )));
            }
            "compile"
        };
        let programmed = recorded.elapsed();
        let saved = match saving.await {
            Ok(Ok(d)) => d,
            failed => {
                let why = match failed {
                    Ok(Err(e)) => e.to_string(),
                    Err(e) => e.to_string(),
                    Ok(Ok(_)) => unreachable!(),
                };
                // A new pod twilld cannot bring back after a restart must not start (taken
                // back out of the cluster and the kernel); a running one keeps what it had.
                self.pod_up_failed(&attachment, before).await;
                return Err(PodUpError::Failed(format!(
                    "recording the pod in the state dir: {why}"
                )));
            }
        };
        let ms = |d: Duration| d.as_secs_f64() * 1e3;
        self.status.last_pod_up = Some(PodUpSteps {
            record_ms: ms(saved),
            program_ms: ms(programmed),
            total_ms: ms(start.elapsed()),
            path,
            open_ms: None,
        });
        // Until the ADD ends, its veth may still fail: then `before` is put back. Its record
        // goes to etcd once it succeeded: written now, a failed ADD's labels would come back
        // from etcd as an edit after they were put back.
        self.unsettled.insert(attachment, before);
        Ok(opening.filter(|_| fast))
    }

    /// Moves the pod whose ADD was answered at `answered` from the pending chains to its
    /// policies' (one netlink transaction), or has the next compile do it.
    async fn open(&mut self, opening: Option<ProgramDelta>, answered: Instant) {
        let Some(d) = opening else {
            return;
        };
        if self.apply_own_delta(|_, _, _| Some(d)).await {
            if let Some(up) = self.status.last_pod_up.as_mut() {
                up.open_ms = Some(answered.elapsed().as_secs_f64() * 1e3);
            }
        } else {
            self.due(Due::now("opening a new pod"));
        }
    }

    /// Kubernetes mode: the pod's labels and declared ports are its API object's (the CNI
    /// request carries neither). Taken from the watch, else from `read` (the object the
    /// handle read by name, when the watch did not have it); without either, the handle is
    /// asked to read it: programming the pod without its labels could leave it open where its
    /// policies close it.
    fn labels_from_api(
        &self,
        pod: &mut LocalPod,
        read: Option<netpol::api::Pod>,
    ) -> Result<(), UpError> {
        let key = pod.key();
        // An object of an earlier pod of this name (a StatefulSet's pod re-created before the
        // watch caught up) is not this pod's: its labels could open what this pod's close.
        let ours = |p: &&netpol::api::Pod| pods::same_pod(&pod.pod, p);
        let api = match self.objects.api_pod(&key).filter(ours) {
            Some(p) => p.clone(),
            // A sandbox re-created (runtime restart, reboot) for a pod whose labels this node
            // recorded: they do, also while the API server is away.
            None => match (self.objects.local_pod(&key).filter(ours), read) {
                (Some(p), _) => p.clone(),
                (None, Some(p)) if ours(&&p) => p,
                (None, Some(p)) => {
                    return Err(UpError::Pod(PodUpError::NotReady(format!(
                        "pod {key}: the Kubernetes API still has an earlier pod of that name \
                         (uid {}), not the one being added (uid {})",
                        p.metadata.uid.unwrap_or_default(),
                        pod.pod.metadata.uid.as_deref().unwrap_or_default()
                    ))))
                }
                (None, None) => return Err(UpError::NeedsApiObject),
            },
        };
        pod.pod.metadata.labels = api.metadata.labels;
        pod.pod.spec.containers = api.spec.containers;
        Ok(())
    }

    /// One pod's own delta, without a compile (`netpol::program::pod_added`, `pod_removed`):
    /// its addresses in the sets that select it, its named ports, its verdict-map entries, in
    /// one netlink transaction. False when that is not all it takes (the caller compiles): no
    /// program in the kernel yet, a chain to add or remove, an address another record claims.
    async fn apply_own_delta(
        &mut self,
        delta: impl FnOnce(&netpol::model::Cluster, &str, &NodeProgram) -> Option<ProgramDelta>,
    ) -> bool {
        let (Some(prog), Some(_)) = (
            self.program.as_ref(),
            self.writer.as_ref().and_then(TableWriter::applied),
        ) else {
            return false;
        };
        let Some(d) = delta(self.objects.cluster(), &self.opts.node, prog) else {
            return false;
        };
        if d.is_empty() {
            // A pod that is in no program yet (no address): nothing to do.
            return true;
        }
        let Some(ops) = render::element_ops(&d, prog) else {
            return false;
        };
        // In place, not on the blocking pool: one kernel transaction of a few elements takes
        // less than handing it to another thread and back would.
        let done = crate::netlink::nft_sets::apply(
            crate::netlink::nft_sets::NfFamily::Inet,
            render::TABLE,
            &ops,
        );
        if let Err(e) = done {
            tracing::debug!(error = %e, "a pod's own delta was refused; compiling instead");
            return false;
        }
        // What the kernel holds now; the writer's copy is rendered from it when next needed.
        d.apply_to(self.program.as_mut().expect("checked above"));
        self.kernel_ahead = true;
        Metrics::inc(&self.shared.metrics.policy_fast_syncs);
        true
    }

    /// These attachments were deleted (DEL, GC) or added again: ports of theirs cut off for
    /// an unreadable record (`spoof::Sources::closed`) are not any more. A failed ADD leaves
    /// its port cut off.
    fn reopen<'a>(&mut self, atts: impl IntoIterator<Item = &'a Attachment>) -> bool {
        let mut any = false;
        for a in atts {
            any |= self.objects.reopen(a);
        }
        if any {
            self.sources_later("a pod with an unreadable record deleted or added again");
            self.release_kept();
        }
        any
    }

    /// etcd mode: deletes the stale records of this node kept as they might have been a
    /// cut-off pod's, once they cannot be (`Objects::released`).
    fn release_kept(&mut self) {
        for key in self.objects.released() {
            tracing::info!(pod = %key, "deleting a record of this node kept for a pod that was cut off: no pod here can be it any more");
            let _ = self.records.send((key, None));
        }
    }

    async fn pod_down(&mut self, a: &Attachment) {
        self.pods_down([a]).await
    }

    /// The ADD of `a` succeeded: its record (as it is now, with any edit taken over
    /// meanwhile) goes to etcd.
    /// True when that reopened a port cut off for an unreadable record (`reopen`).
    fn add_done(&mut self, a: &Attachment) -> bool {
        // Its new record replaces the unreadable one.
        let reopened = self.reopen([a]);
        if self.unsettled.remove(a).is_some() {
            if let Some(p) = self.objects.local_of(a) {
                let _ = self.records.send(source::record(p));
            }
        }
        reopened
    }

    /// An ADD whose policy step succeeded failed later (`PolicyHandle::add_failed`): the
    /// attachment goes back to the record it had before that ADD, or is forgotten. Nothing to
    /// do when the policy step itself failed (`pod_up_failed` ran then), or when the ADD
    /// changed nothing (a retry with the same labels and addresses).
    async fn add_failed(&mut self, a: &Attachment) {
        let Some(before) = self.unsettled.remove(a) else {
            return;
        };
        if before.is_some() && before.as_ref() == self.objects.local_of(a) {
            return;
        }
        self.pod_up_failed(a, before).await;
    }

    /// Takes a failed ADD's record back out: the attachment's earlier record goes back in
    /// where it had one (its pod runs on, and must stay protected), else the pod is forgotten.
    /// The kernel is compiled again before the ADD answers (it may hold this ADD's labels and
    /// addresses); the source checks drop a new address with the next cleanup.
    async fn pod_up_failed(&mut self, a: &Attachment, before: Option<LocalPod>) {
        let Some(before) = before else {
            return self.pod_down(a).await;
        };
        let key = before.key();
        if let Err(e) = self.objects.local_insert(before.clone()) {
            tracing::error!(pod = %key, error = %e, "putting back the running pod's record after a failed ADD; forgetting the pod");
            return self.pod_down(a).await;
        }
        tracing::warn!(pod = %key, container = %a.container_id,
            "an ADD of a running attachment failed: its earlier record is put back");
        // In etcd too: the failed ADD's may have been written there meanwhile (a record found
        // missing is written again), and would come back as an edit.
        let _ = self.records.send(source::record(&before));
        let files = self.objects.files();
        let saved = tokio::task::spawn_blocking(move || files.save(&before)).await;
        if let Some(e) = match saved {
            Ok(r) => r.err().map(|e| e.to_string()),
            Err(e) => Some(e.to_string()),
        } {
            tracing::error!(pod = %key, error = %e, "writing the running pod's earlier record back to the state dir; a restart programs it from the failed ADD's, if that was written");
        }
        self.sources_later("a failed ADD's record put back");
        // Not left for later: requests queued meanwhile would keep the failed ADD's program
        // (its labels could open the pod) in force until they are answered.
        self.sync("a failed ADD's record put back").await;
    }

    /// Has the source checks drop what no local pod sends from any more, once no CNI request
    /// has run for a moment (taking elements out stalls every nftables transaction, see
    /// `pods_down`).
    fn sources_later(&mut self, why: &'static str) {
        self.sources_due = Some(match self.sources_due {
            Some(old) => old.merge(Due::quiet(why)),
            None => Due::quiet(why),
        });
    }

    /// Forgets these pods (DEL, GC, a failed ADD): each one's own policy delta now, their
    /// source checks once no CNI request has run for a moment (`Due::quiet`). Taking set
    /// elements out costs the kernel an RCU grace period per transaction (10-20 ms here),
    /// during which every other nftables transaction of the node waits, an ADD's too; the
    /// pods' ports are gone by now (their callers delete the veth first), so the stale
    /// elements check nothing meanwhile, and an ADD that makes a port of the same name takes
    /// that port's out with it. (Not so after a failed ADD of a pod cut off for an unreadable
    /// record, which runs on: its elements go at once.)
    async fn pods_down<'a>(&mut self, atts: impl IntoIterator<Item = &'a Attachment>) {
        let atts: Vec<_> = atts.into_iter().collect();
        let gone_ports_closed = atts.iter().any(|a| self.objects.is_closed(a));
        let gone: Vec<_> = atts
            .into_iter()
            .filter_map(|a| {
                self.unsettled.remove(a);
                self.objects.local_down(a)
            })
            .collect();
        if gone.is_empty() {
            return;
        }
        if gone_ports_closed {
            // A failed ADD of a cut-off pod, which runs on: the addresses that ADD gave its
            // port leave now, not once CNI is quiet.
            if let Err(e) = self.sources(SourcesWrite::Left).await {
                tracing::error!(error = %e, "cutting a pod off again after its failed ADD; retried at the next resync");
            }
        } else {
            self.sources_later("pods left");
        }
        for left in gone {
            let (key, rec) = match left {
                source::Left::Gone(key, rec) => (key, rec),
                source::Left::Shadowed => continue,
                source::Left::HandedOver(key, value) => {
                    // Another pod has the name's addresses now: a full program, not a delta.
                    let _ = self.records.send((key, value));
                    if self.objects.loaded() {
                        self.due(Due::soon("pod deleted"));
                    }
                    continue;
                }
            };
            let _ = self.records.send((key, None));
            if !self.objects.loaded() {
                continue;
            }
            let fast = match rec {
                Some(rec) => {
                    self.apply_own_delta(|c, node, prog| program::pod_removed(c, node, prog, &rec))
                        .await
                }
                None => false,
            };
            // Otherwise its entries can wait for the CNI requests in flight: nothing runs
            // behind them any more, and an ADD that gets its address first takes the full
            // path (the address is still in the program).
            self.due(if fast {
                Due::check("pod deleted")
            } else {
                Due::soon("pod deleted")
            });
        }
    }

    /// The local pods' source checks into the kernel (`spoof`), the way `how` says.
    async fn sources(&mut self, how: SourcesWrite) -> Result<(), String> {
        let want = self.wanted_sources();
        let Some(sc) = self.spoof.as_mut() else {
            return Ok(());
        };
        match how {
            SourcesWrite::Exact => sc.apply(want).await,
            SourcesWrite::Added => sc.apply_keeping(want).await,
            SourcesWrite::Left => sc.remove_stale(want).await,
        }
    }

    /// What the source checks are to hold: the local pods' addresses, and the ports of pods
    /// whose record could not be read cut off.
    fn wanted_sources(&self) -> spoof::Sources {
        // A recognised pod's addresses wait for the compile that has its policies.
        let pods = self
            .objects
            .local_pods()
            .filter(|p| !self.objects.awaits_compile(&p.attachment));
        spoof::Sources::of(pods).closing(self.objects.closed_ports())
    }

    /// After a compile is in the kernel: the ports of pods recognised before it open.
    fn compiled(&mut self) {
        if !self.objects.take_recognised().is_empty() {
            self.sources_later("pods cut off for an unreadable record recognised");
            self.release_kept();
        }
    }

    /// Schedules a sync (one for all that are due).
    fn due(&mut self, d: Due) {
        self.sync_due = Some(match self.sync_due {
            Some(old) => old.merge(d),
            None => d,
        });
    }

    /// The writer's idea of the kernel's table, after element changes made around it.
    fn writer_in_step(&mut self) {
        if !std::mem::take(&mut self.kernel_ahead) {
            return;
        }
        if let (Some(w), Some(p)) = (self.writer.as_mut(), &self.program) {
            if w.applied().is_some() {
                w.assume(render::table(p, self.opts.render));
            }
        }
    }

    /// One etcd event: what changed.
    fn on_dir(&mut self, dir: &'static str, ev: DirEvent) -> source::Applied {
        let mut out = self.objects.apply(dir, ev, &self.shared.metrics);
        for (key, value) in std::mem::take(&mut out.records) {
            let _ = self.records.send((key, value));
        }
        self.cache_dirty |= out.changed;
        out
    }

    /// Other nodes' pods that came or went, each by its own delta (a few at a time; a burst is
    /// compiled). False: not all of them could be; a compile must follow.
    async fn pods_moved(&mut self, moves: Vec<PodMove>) -> bool {
        if moves.is_empty() || moves.len() > 16 {
            return false;
        }
        for m in moves {
            let done = match m {
                PodMove::Added(key) => {
                    self.apply_own_delta(|c, node, prog| program::pod_added(c, node, prog, &key))
                        .await
                }
                PodMove::Removed(rec) => {
                    self.apply_own_delta(|c, node, prog| program::pod_removed(c, node, prog, &rec))
                        .await
                }
            };
            if !done {
                return false;
            }
        }
        true
    }

    /// Compiles the cluster for this node and makes the kernel hold it: element operations
    /// over netlink when only elements move, else the table difference through nft.
    async fn sync(&mut self, why: &str) {
        self.sync_due = None;
        self.writer_in_step();
        let Some(writer) = self.writer.as_mut() else {
            return;
        };
        let start = Instant::now();
        let new = program::compile(self.objects.cluster(), &self.opts.node);
        let compiled = Instant::now();
        if let Err(e) = new.check() {
            // A compiler bug, not input: keep what is enforced.
            tracing::error!(error = %e, "policy program failed its own check; not applied");
            self.status.error = Some(e.to_string());
            return;
        }
        let table = render::table(&new, self.opts.render);
        let fast = match (&self.program, writer.applied()) {
            (Some(old), Some(_)) => {
                let d = program::diff(old, &new);
                if d.is_empty() {
                    // The kernel has what the cluster asks (a failed change was undone, e.g. a
                    // failed ADD's record put back): an earlier failure is over.
                    self.status.error = None;
                    self.program = Some(new);
                    self.compiled();
                    return;
                }
                render::element_ops(&d, old)
            }
            _ => None,
        };
        let rendered = Instant::now();
        let mut path = if fast.is_some() { "netlink" } else { "nft" };
        let res = match fast {
            Some(ops) => {
                let m = self.shared.metrics.clone();
                let done = tokio::task::spawn_blocking(move || {
                    crate::netlink::nft_sets::apply(
                        crate::netlink::nft_sets::NfFamily::Inet,
                        render::TABLE,
                        &ops,
                    )
                })
                .await;
                match done {
                    Ok(Ok(())) => {
                        Metrics::inc(&m.policy_fast_syncs);
                        writer.assume(table);
                        Ok(())
                    }
                    other => {
                        let why = match other {
                            Ok(Err(e)) => e.to_string(),
                            Err(e) => e.to_string(),
                            Ok(Ok(())) => unreachable!(),
                        };
                        tracing::warn!(error = %why, "netlink element update refused; applying through nft");
                        path = "nft";
                        writer.apply(&table).await
                    }
                }
            }
            None => writer.apply(&table).await,
        };
        let m = &self.shared.metrics;
        match res {
            Ok(()) => {
                Metrics::inc(&m.policy_syncs);
                let ms = start.elapsed().as_secs_f64() * 1e3;
                let steps = SyncSteps {
                    why: why.to_string(),
                    compile_ms: (compiled - start).as_secs_f64() * 1e3,
                    render_ms: (rendered - compiled).as_secs_f64() * 1e3,
                    apply_ms: rendered.elapsed().as_secs_f64() * 1e3,
                    path,
                };
                tracing::debug!(why, ms, ?steps, "policy programmed");
                self.status.last_sync_ms = Some(ms);
                self.status.last_sync = Some(steps);
                self.status.error = None;
                if !new.shared_addresses.is_empty() {
                    tracing::warn!(addresses = ?new.shared_addresses, "several pods claim one address (a stale record?): each gets every claimant's policies");
                }
                self.program = Some(new);
                self.compiled();
            }
            Err(e) => {
                Metrics::inc(&m.policy_errors);
                tracing::error!(why, error = %e, "programming network policy failed; the kernel keeps what it had, retried at the next resync");
                self.status.error = Some(e.to_string());
            }
        }
    }

    async fn check(&mut self) {
        let want = self.wanted_sources();
        if let Some(sc) = self.spoof.as_mut() {
            if sc.check(want).await {
                Metrics::inc(&self.shared.metrics.nft_restores);
            }
        }
        if !self.objects.loaded() {
            return;
        }
        self.writer_in_step();
        // A failed apply has nothing to compare with: apply again.
        if self.status.error.is_some()
            || self.writer.as_ref().is_some_and(|w| w.applied().is_none())
        {
            self.program = None;
            self.sync("retry").await;
        } else if let Some(w) = self.writer.as_mut() {
            match w.check().await {
                Ok(Check::Restored) => {
                    Metrics::inc(&self.shared.metrics.nft_restores);
                    tracing::warn!(
                        "restored the network policy table after someone else changed it"
                    );
                }
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %e, "checking the network policy table failed"),
            }
        }
        self.read_counters().await;
        self.publish();
    }

    /// One log line per denied connection (retransmissions within 10 s are not repeated),
    /// naming the pods and the policies that isolate the one that refused it.
    fn log_denied(&mut self, p: crate::netlink::nflog::LoggedPacket) {
        let key = (p.src, p.dst, p.proto, p.dport);
        let now = Instant::now();
        if self
            .logged
            .get(&key)
            .is_some_and(|t| now.duration_since(*t) < Duration::from_secs(10))
        {
            return;
        }
        if self.logged.len() > 4096 {
            self.logged
                .retain(|_, t| now.duration_since(*t) < Duration::from_secs(10));
        }
        self.logged.insert(key, now);
        let c = self.objects.cluster();
        let name = |ip: std::net::IpAddr| match c.live_pod_with_ip(ip) {
            Some((k, _)) => format!("{k} ({ip})"),
            None => ip.to_string(),
        };
        let group = p_group(&p.prefix);
        let pending = program::PENDING.iter().position(|c| *c == group);
        let (direction, policies) = match self
            .program
            .as_ref()
            .and_then(|prog| prog.chains.get(&group))
        {
            _ if pending.is_some() => (
                if pending == Some(0) {
                    "ingress"
                } else {
                    "egress"
                },
                "none yet (a new pod, its policies being programmed)".to_string(),
            ),
            Some(PChain::Group {
                direction,
                policies,
            }) => (
                match direction {
                    Direction::Ingress => "ingress",
                    Direction::Egress => "egress",
                },
                policies
                    .iter()
                    .filter_map(|pc| match self.program.as_ref()?.chains.get(pc)? {
                        PChain::Policy { policy, .. } => Some(policy.to_string()),
                        _ => None,
                    })
                    .collect::<Vec<_>>()
                    .join(", "),
            ),
            _ => ("?", String::new()),
        };
        let proto = match p.proto {
            6 => "TCP".to_string(),
            17 => "UDP".to_string(),
            132 => "SCTP".to_string(),
            1 | 58 => "ICMP".to_string(),
            n => format!("protocol {n}"),
        };
        let port = p.dport.map(|d| format!("/{d}")).unwrap_or_default();
        tracing::warn!(
            target: "twill::policy::denied",
            "connection denied by network policy: {} -> {} {proto}{port} ({direction}; isolated by {policies})",
            name(p.src),
            name(p.dst),
        );
        Metrics::inc(&self.shared.metrics.policy_denied_logged);
    }

    /// Drop counters of the group chains, summed per policy and direction.
    async fn read_counters(&mut self) {
        let (Some(w), Some(p)) = (self.writer.as_ref(), self.program.as_ref()) else {
            return;
        };
        let Ok(Some(listing)) = w.listing().await else {
            return;
        };
        let mut per: BTreeMap<(String, &'static str), (u64, u64)> = BTreeMap::new();
        for (chain, pkts, bytes) in drop_counters(&listing) {
            let Some(PChain::Group {
                direction,
                policies,
            }) = p.chains.get(&chain)
            else {
                continue;
            };
            let dir = match direction {
                Direction::Ingress => "ingress",
                Direction::Egress => "egress",
            };
            for pc in policies {
                if let Some(PChain::Policy { policy, .. }) = p.chains.get(pc) {
                    let e = per.entry((policy.to_string(), dir)).or_default();
                    e.0 += pkts;
                    e.1 += bytes;
                }
            }
        }
        let denied = per
            .into_iter()
            .map(|((policy, direction), (packets, bytes))| Denied {
                policy,
                direction,
                packets,
                bytes,
            })
            .collect();
        *self
            .shared
            .metrics
            .policy_denied
            .write()
            .unwrap_or_else(|e| e.into_inner()) = denied;
    }

    fn publish(&mut self) {
        let st = &mut self.status;
        st.loaded = self.objects.loaded();
        st.waiting_for = (!st.loaded).then(|| self.objects.waiting_for());
        st.local_pods = self.objects.local_count();
        st.policies = self.objects.cluster().policies().count();
        if let Some(p) = &self.program {
            st.pending = p
                .ingress
                .values()
                .chain(p.egress.values())
                .filter(|c| program::PENDING.contains(&c.as_str()))
                .count();
            st.sets = p.sets.len();
            st.chains = p.chains.len();
            st.elements = p.sets.values().map(|s| s.elements.len()).sum();
            st.in_force = in_force(p, self.objects.cluster());
        }
        if self.writer.is_none() {
            st.error = Some("nft is not installed".into());
        }
        if let Some(sc) = &self.spoof {
            st.source_check = sc.status.clone();
        }
        let cut_off = self.objects.cut_off() as u64;
        self.shared
            .metrics
            .policy_ports_cut_off
            .store(cut_off, std::sync::atomic::Ordering::Relaxed);
        let s = st.clone();
        self.shared.update(|x| x.policy = Some(s));
    }
}

/// The group chain named by a log prefix.
fn p_group(prefix: &str) -> String {
    prefix.trim().to_string()
}

/// Policies with a chain here, and the local pods each isolates per direction.
fn in_force(p: &NodeProgram, c: &netpol::model::Cluster) -> Vec<PolicyInForce> {
    let mut out: BTreeMap<String, PolicyInForce> = BTreeMap::new();
    let pod_of = |ip: &std::net::IpAddr| {
        c.live_pod_with_ip(*ip)
            .map(|(k, _)| k.to_string())
            .unwrap_or_else(|| ip.to_string())
    };
    for (map, dir) in [
        (&p.ingress, Direction::Ingress),
        (&p.egress, Direction::Egress),
    ] {
        for (ip, group) in map {
            let Some(PChain::Group { policies, .. }) = p.chains.get(group) else {
                continue;
            };
            for pc in policies {
                let Some(PChain::Policy { policy, .. }) = p.chains.get(pc) else {
                    continue;
                };
                let e = out
                    .entry(policy.to_string())
                    .or_insert_with(|| PolicyInForce {
                        policy: policy.to_string(),
                        ingress: Vec::new(),
                        egress: Vec::new(),
                    });
                let list = match dir {
                    Direction::Ingress => &mut e.ingress,
                    Direction::Egress => &mut e.egress,
                };
                let pod = pod_of(ip);
                if !list.contains(&pod) {
                    list.push(pod);
                }
            }
        }
    }
    out.into_values().collect()
}

/// (chain, packets, bytes) of every rule ending in `counter drop` in an `nft -j` listing.
pub fn drop_counters(listing: &serde_json::Value) -> Vec<(String, u64, u64)> {
    let Some(items) = listing.get("nftables").and_then(|v| v.as_array()) else {
        return Vec::new();
    };
    items
        .iter()
        .filter_map(|i| i.get("rule"))
        .filter_map(|r| {
            let expr = r.get("expr")?.as_array()?;
            expr.last()?.get("drop")?;
            let c = expr.iter().find_map(|x| x.get("counter"))?;
            Some((
                r.get("chain")?.as_str()?.to_string(),
                c.get("packets")?.as_u64()?,
                c.get("bytes")?.as_u64()?,
            ))
        })
        .collect()
}

/// Writes and deletes this node's pod records in etcd, coalesced per key (only the last wish
/// counts) and retried with backoff while etcd is away: a pod made while etcd was down is
/// written when it is back. A delete removes only a record that names this node (`names`: its
/// name, and any its pods were recorded under before a rename): one that waited out an outage
/// must not take the record another node wrote meanwhile under the same name (a pod moved there).
async fn write_records<S: ObjectStore>(
    store: S,
    names: BTreeSet<String>,
    mut rx: mpsc::UnboundedReceiver<(String, Option<Vec<u8>>)>,
    metrics: Arc<Metrics>,
    busy: Arc<Busy>,
) {
    let mut pending: BTreeMap<String, Option<Vec<u8>>> = BTreeMap::new();
    let mut backoff = Duration::from_millis(200);
    loop {
        if pending.is_empty() {
            match rx.recv().await {
                Some((k, v)) => {
                    pending.insert(k, v);
                }
                None => return,
            }
            // The ADD that sent it is being answered: the write (and every node's reaction
            // to it) can wait for that, briefly.
            until_idle(&busy, tokio::time::Instant::now() + RECORDS_WAIT).await;
        }
        while let Ok((k, v)) = rx.try_recv() {
            pending.insert(k, v);
        }
        let mut failed = false;
        let keys: Vec<String> = pending.keys().cloned().collect();
        for key in keys {
            let res = match &pending[&key] {
                Some(v) => store.put(PODS, &key, v).await,
                None => delete_record(&store, &names, &key).await,
            };
            match res {
                Ok(()) => {
                    pending.remove(&key);
                }
                Err(e) => {
                    tracing::warn!(key, error = %e, "writing a pod record to etcd failed; retrying");
                    Metrics::inc(&metrics.etcd_reconnects);
                    failed = true;
                    break;
                }
            }
        }
        if failed {
            // New wishes still coalesce while we wait.
            let sleep = tokio::time::sleep(backoff);
            tokio::pin!(sleep);
            loop {
                tokio::select! {
                    _ = &mut sleep => break,
                    m = rx.recv() => match m {
                        Some((k, v)) => { pending.insert(k, v); }
                        None => return,
                    },
                }
            }
            backoff = (backoff * 2).min(Duration::from_secs(10));
        } else {
            backoff = Duration::from_millis(200);
        }
        metrics
            .policy_records_pending
            .store(pending.len() as u64, Relaxed);
    }
}

/// Deletes this node's record of `key`, and only such a record: one naming this node by one of
/// `names` (its name, and those its pods were recorded under before a rename).
async fn delete_record<S: ObjectStore>(
    store: &S,
    names: &BTreeSet<String>,
    key: &str,
) -> Result<(), RegistryError> {
    let names_us = |v: &[u8]| names_one_of(v, names);
    if store.delete_if(PODS, key, names_us).await? == Removal::NotOurs {
        tracing::info!(pod = %key, "not deleting the pod's record: it does not name this node (another node's now)");
    }
    Ok(())
}

/// Whether a pod record names one of `names` as its node.
fn names_one_of(value: &[u8], names: &BTreeSet<String>) -> bool {
    record_node(value).is_some_and(|n| names.contains(&n))
}

/// The node a pod record names (`spec.nodeName`), if it is one.
fn record_node(value: &[u8]) -> Option<String> {
    #[derive(serde::Deserialize)]
    struct Rec {
        spec: Spec,
    }
    #[derive(serde::Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct Spec {
        node_name: Option<String>,
    }
    serde_json::from_slice::<Rec>(value).ok()?.spec.node_name
}

#[cfg(test)]
mod tests {
    use super::*;

    fn guard(busy: &Arc<Busy>) -> RequestGuard {
        busy.requests.fetch_add(1, Ordering::SeqCst);
        RequestGuard(busy.clone())
    }

    #[tokio::test(start_paused = true)]
    async fn quiet_work_waits_for_a_pause_in_the_requests_and_no_longer_than_its_bound() {
        let busy = Arc::new(Busy::default());
        let t0 = tokio::time::Instant::now();
        // Nothing ran yet: at once.
        wait_quiet(Some(Due::quiet("t")), &busy).await;
        assert_eq!(t0.elapsed(), Duration::ZERO);

        // A request runs for 200 ms, then none: QUIET after its end.
        let g = guard(&busy);
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(200)).await;
            drop(g);
        });
        let t0 = tokio::time::Instant::now();
        wait_quiet(Some(Due::quiet("t")), &busy).await;
        assert_eq!(t0.elapsed(), Duration::from_millis(200) + QUIET);

        // Requests back to back, 100 ms apart: never quiet, so the bound (10 s) decides.
        let b = busy.clone();
        let churn = tokio::spawn(async move {
            loop {
                let g = guard(&b);
                tokio::time::sleep(Duration::from_millis(40)).await;
                drop(g);
                tokio::time::sleep(Duration::from_millis(60)).await;
            }
        });
        tokio::time::sleep(Duration::from_millis(10)).await; // the churn has begun
        let t0 = tokio::time::Instant::now();
        let bounded = tokio::time::timeout(
            Duration::from_secs(11),
            wait_quiet(Some(Due::quiet("t")), &busy),
        )
        .await;
        let waited = t0.elapsed();
        churn.abort();
        assert!(bounded.is_ok(), "still waiting after {waited:?}");
        assert!(
            waited >= Duration::from_secs(10) && waited < Duration::from_millis(10_100),
            "{waited:?}"
        );
    }

    #[test]
    fn a_record_names_its_node_or_none() {
        let rec = |v: serde_json::Value| record_node(&serde_json::to_vec(&v).unwrap());
        // As records are written: a Pod serialised.
        let mut pod = netpol::api::Pod::default();
        pod.metadata.name = "a".into();
        pod.spec.node_name = Some("n1".into());
        let written = serde_json::to_vec(&pod).unwrap();
        assert_eq!(record_node(&written).as_deref(), Some("n1"));
        assert_eq!(
            rec(serde_json::json!({"metadata": {"name": "a"}, "spec": {}})),
            None
        );
        assert_eq!(rec(serde_json::json!({"spec": {"nodeName": 3}})), None);
        assert_eq!(record_node(b"\0garbage"), None);

        // This node's name and a former one (a rename) are ours; another node's is not.
        let names = BTreeSet::from(["n2".to_string(), "old".to_string()]);
        let mut of = |node: &str| {
            pod.spec.node_name = Some(node.into());
            names_one_of(&serde_json::to_vec(&pod).unwrap(), &names)
        };
        assert!(of("n2") && of("old") && !of("n1"));
        assert!(!names_one_of(b"\0garbage", &names));
    }
}
