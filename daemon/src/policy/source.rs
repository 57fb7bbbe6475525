//! The cluster as etcd and this node's CNI requests describe it, folded into one
//! `twill_netpol` model. Objects that fail validation are skipped with a warning and a metric
//! (an invalid update of a valid policy keeps the valid version in force). This node's pods
//! are the CNI requests' (kept in the state dir); their records in etcd are written by twilld,
//! and label edits made there are taken over.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use netpol::api::{Namespace, NetworkPolicy, Pod};
use netpol::model::{Cluster, PodKey, PodRecord, PolicyKey};
use netpol::validate::ValidationErrors;
use serde::{Deserialize, Serialize};

use super::pods::{Attachment, LocalPod, PodFiles, CONTAINER_ANNOTATION};
use super::{PodUpError, NAMESPACES, PODS, POLICIES};
use crate::metrics::Metrics;
use crate::registry::objects::{DirEvent, ObjKv};

/// What applying an event did.
#[derive(Debug, Default)]
pub struct Applied {
    pub changed: bool,
    /// Pod records to write (Some) or delete (None) in etcd.
    pub records: Vec<(String, Option<Vec<u8>>)>,
    /// Other nodes' pods that came or went; when these are all that changed (`others` is
    /// false), each pod's own delta may do instead of a compile.
    pub moves: Vec<PodMove>,
    pub others: bool,
    /// A pod cut off for an unreadable record was recognised (`Objects::adopt`): its port
    /// opens after the compile this asks for (`others`).
    pub recognised: bool,
}

/// What a local pod leaving did to its name (`Objects::local_down`).
#[derive(Debug)]
pub enum Left {
    /// The name went with it: its key, and the record the cluster had.
    Gone(String, Option<PodRecord>),
    /// It did not hold its name (two records of one name from an old state dir): the model
    /// is unchanged.
    Shadowed,
    /// It held its name, and the newest other attachment recorded under it holds it now: the
    /// key, and that pod's record for etcd.
    HandedOver(String, Option<Vec<u8>>),
}

#[derive(Clone, Debug)]
pub enum PodMove {
    Added(PodKey),
    Removed(Box<PodRecord>),
}

#[derive(Serialize, Deserialize, Default)]
struct Cache {
    policies: Vec<NetworkPolicy>,
    namespaces: Vec<Namespace>,
    pods: Vec<Pod>,
}

pub struct Objects {
    node: String,
    cache_path: PathBuf,
    files: PodFiles,
    cluster: Cluster,
    listed: BTreeSet<&'static str>,
    from_cache: bool,
    namespaces: BTreeMap<String, Namespace>,
    /// Pod records in etcd that are not this node's pods.
    remote: BTreeMap<String, Pod>,
    local: BTreeMap<Attachment, LocalPod>,
    /// Which attachment's pod holds each local pod name (the one in `cluster`). One name, one
    /// attachment, except after loading a state dir from before that rule (`load_local`).
    holders: BTreeMap<String, Attachment>,
    /// The ports of local pods whose state-dir record could not be read at start: who they
    /// are, and so what their policies allow, is unknown until they are added again.
    closed: BTreeSet<String>,
    /// The attachments of those ports and their addresses (from IPAM, `resolve_closed`):
    /// what recognises their pods' objects when the source delivers them (`adopt`).
    unknown: BTreeMap<Attachment, BTreeSet<IpAddr>>,
    /// Cut-off attachments whose pods were recognised, until a compile has their policies.
    recognised: BTreeSet<Attachment>,
    /// `resolve_closed` ran: `unknown` is what IPAM holds for the cut-off ports.
    held_read: bool,
    /// etcd mode: records naming this node that no pod here holds, kept as they may be a
    /// cut-off pod's (`may_be_cut_off`); deleted once they cannot be (`released`).
    kept: BTreeMap<String, Pod>,
    /// Node names this node's loaded pods were recorded under (`named_here`).
    former_names: BTreeSet<String>,
    /// The last reason each invalid key was skipped for: logged once per reason.
    skipped: BTreeMap<String, String>,
    /// Kubernetes mode: pods come from the API server, which owns them. Its objects of this
    /// node's pods give their labels and ports (at ADD, and when edited); twilld writes no
    /// records anywhere but its state dir.
    api_pods: bool,
    /// Kubernetes mode: the API's pods that name this node, by key.
    api_here: BTreeMap<String, Pod>,
}

fn errs(e: &ValidationErrors) -> String {
    e.0.iter()
        .map(|x| format!("{}: {}", x.field, x.message))
        .collect::<Vec<_>>()
        .join("; ")
}

/// `<ns>/<name>` as a key of the policies or pods directory.
fn split_key(key: &str) -> Option<(&str, &str)> {
    let (ns, name) = key.split_once('/')?;
    (!ns.is_empty() && !name.is_empty() && !name.contains('/')).then_some((ns, name))
}

impl Objects {
    pub fn new(node: &str, state_dir: &Path) -> Objects {
        Objects {
            node: node.to_string(),
            cache_path: state_dir.join("policy-cache.json"),
            files: PodFiles::new(state_dir),
            cluster: Cluster::new(),
            listed: BTreeSet::new(),
            from_cache: false,
            namespaces: BTreeMap::new(),
            remote: BTreeMap::new(),
            local: BTreeMap::new(),
            holders: BTreeMap::new(),
            closed: BTreeSet::new(),
            unknown: BTreeMap::new(),
            recognised: BTreeSet::new(),
            held_read: false,
            kept: BTreeMap::new(),
            former_names: BTreeSet::new(),
            skipped: BTreeMap::new(),
            api_pods: false,
            api_here: BTreeMap::new(),
        }
    }

    /// Kubernetes mode (see `api_pods`).
    pub fn with_api_pods(mut self) -> Objects {
        self.api_pods = true;
        self
    }

    /// Kubernetes mode: the API's object of this node's pod `key`, if it has arrived.
    pub fn api_pod(&self, key: &str) -> Option<&Pod> {
        self.api_here.get(key)
    }

    /// This node's pod `key` as its last ADD recorded it (the state dir survives restarts):
    /// for a sandbox re-created while the API server is away.
    pub fn local_pod(&self, key: &str) -> Option<&Pod> {
        self.local_key(key).map(|p| &p.pod)
    }

    pub fn cluster(&self) -> &Cluster {
        &self.cluster
    }

    /// A cluster state is known: every directory was listed, or the cache was read.
    pub fn loaded(&self) -> bool {
        self.from_cache || self.listed.len() == 3
    }

    pub fn waiting_for(&self) -> String {
        let missing: Vec<&str> = [POLICIES, NAMESPACES, PODS]
            .into_iter()
            .filter(|d| !self.listed.contains(d))
            .collect();
        let from = if self.api_pods {
            "Kubernetes API"
        } else {
            "etcd"
        };
        format!("{from}: listing {}", missing.join(", "))
    }

    pub fn local_count(&self) -> usize {
        self.local.len()
    }

    pub fn local_pods(&self) -> impl Iterator<Item = &LocalPod> {
        self.local.values()
    }

    /// This node's pods from the state dir (at start), oldest record first. A state dir from
    /// before one pod name had one attachment can hold two records of a name: the newer holds
    /// it, as it did before the restart; the older pod stays a local pod (its port checked)
    /// and takes the name if the holder goes first.
    pub fn load_local(&mut self) {
        let loaded = self.files.load();
        self.closed = loaded.unreadable;
        for p in loaded.pods {
            let p = self.named_here(p);
            if let Some(holder) = self.local_key(&p.key()) {
                tracing::warn!(pod = %p.key(), older = %holder.attachment.container_id,
                    newer = %p.attachment.container_id,
                    "two attachments on this node recorded one pod name (a state dir from an older twilld): policy follows the newer; DEL the other");
            }
            let port = p.attachment.port();
            if !self.insert_local(p) && crate::cni::is_host_veth_name(&port) {
                // As an unreadable one: who the pod is cannot be told.
                tracing::error!(port, "invalid pod record: its port is cut off until the pod is deleted (CNI DEL) or added again");
                self.files.set_aside(&port);
                self.closed.insert(port);
            }
        }
    }

    /// A loaded pod runs here, whatever node name it was recorded under (a node renamed
    /// keeps its state dir): it gets this node's name, and the old one is remembered
    /// (`former_names`: its etcd record may still carry it). Unless this node's name is not one
    /// a pod can carry: then as recorded, rather than cut off as invalid (new pods fail on that
    /// name anyway, saying why).
    fn named_here(&mut self, p: LocalPod) -> LocalPod {
        let old = p.pod.spec.node_name.clone();
        if old.as_deref() == Some(self.node.as_str()) {
            return p;
        }
        self.former_names.extend(old.clone());
        let mut renamed = p.clone();
        renamed.pod.spec.node_name = Some(self.node.clone());
        if netpol::validate::validate_pod(&renamed.pod).is_err() {
            return p;
        }
        tracing::info!(pod = %p.key(), old = old.as_deref().unwrap_or("none"), "a pod recorded under another node name runs here: taken over under this node's name");
        renamed
    }

    /// The node names this node's pods were recorded under before (a rename): their etcd
    /// records are this node's to delete too.
    pub fn former_names(&self) -> &BTreeSet<String> {
        &self.former_names
    }

    /// False if `p` is invalid (and so not taken).
    fn insert_local(&mut self, p: LocalPod) -> bool {
        if let Err(e) = self.cluster.upsert_pod(&p.pod) {
            tracing::warn!(pod = %p.key(), error = %errs(&e), "skipping an invalid local pod record");
            return false;
        }
        self.remote.remove(&p.key());
        self.holders.insert(p.key(), p.attachment.clone());
        self.local.insert(p.attachment.clone(), p);
        true
    }

    /// The ports of pods whose record could not be read (`PodFiles::load`): cut off.
    pub fn closed_ports(&self) -> &BTreeSet<String> {
        &self.closed
    }

    pub fn is_closed(&self, a: &Attachment) -> bool {
        self.closed.contains(&a.port())
    }

    /// The cut-off ports with no record (an ADD of one in flight gives it one) or a record
    /// waiting for its compile: as the kernel checks them, with no address.
    pub fn cut_off(&self) -> usize {
        let recorded: BTreeSet<_> = self
            .local
            .keys()
            .filter(|a| !self.recognised.contains(a))
            .map(|a| a.port())
            .collect();
        self.closed.difference(&recorded).count()
    }

    /// `a` was deleted, or added again: a port of it cut off for an unreadable record is not
    /// any more (true), and the record set aside goes.
    pub fn reopen(&mut self, a: &Attachment) -> bool {
        let port = a.port();
        self.unknown.remove(a);
        self.recognised.remove(a);
        if !self.closed.remove(&port) {
            return false;
        }
        if let Err(e) = self.files.forget_unreadable(&port) {
            tracing::warn!(port, error = %e, "removing an unreadable pod record set aside");
        }
        tracing::info!(port, container = %a.container_id,
            "the pod whose record was unreadable was deleted or added again: its port is no longer cut off");
        true
    }

    /// Cut-off ports that no longer exist (`exists` says; their pods are gone, a reboot or a
    /// runtime that never sent DEL): nothing to cut off, and nothing else would lift them when
    /// no address allocation names them. Their records set aside go. Run at start, before
    /// `resolve_closed`.
    pub fn drop_gone_ports(&mut self, exists: impl Fn(&str) -> std::io::Result<bool>) {
        let gone: Vec<String> = self
            .closed
            .iter()
            .filter(|port| match exists(port) {
                Ok(there) => !there,
                Err(e) => {
                    tracing::warn!(port = %port, error = %e, "cannot tell whether the port of an unreadable pod record exists: it stays cut off");
                    false
                }
            })
            .cloned()
            .collect();
        for port in gone {
            self.closed.remove(&port);
            match self.files.forget_unreadable(&port) {
                Ok(()) => tracing::info!(port, "the pod of an unreadable record is gone (its port is): its record set aside is dropped"),
                Err(e) => tracing::warn!(port, error = %e, "removing an unreadable pod record set aside"),
            }
        }
    }

    /// The attachments holding the cut-off ports, from `held` (IPAM's allocations: attachment
    /// and address), so that their pods can be recognised by their addresses.
    pub fn resolve_closed(&mut self, held: impl IntoIterator<Item = (Attachment, IpAddr)>) {
        self.held_read = true;
        for (a, ip) in held {
            let port = a.port();
            if self.closed.contains(&port) {
                self.unknown.entry(a).or_default().insert(ip);
            }
        }
        for port in &self.closed {
            let known = self.unknown.keys().any(|a| a.port() == *port);
            if !known {
                tracing::warn!(port, "no address allocation names the attachment of an unreadable pod record: its pod stays cut off until it is deleted or added again");
            }
        }
    }

    /// The object of a running pod on this node that has exactly the addresses of a cut-off
    /// attachment, and in etcd mode names that attachment's container (as every record twilld
    /// writes does; in Kubernetes mode the API's pods name none): its etcd record, or the
    /// API's pod. That pod's record is restored from it; its port stays cut off until the
    /// next compile has its policies in the kernel (`take_recognised`). True if so.
    fn adopt(&mut self, key: &str, pod: &Pod, out: &mut Applied) -> bool {
        if self.unknown.is_empty() {
            return false;
        }
        // A finished pod (a Job's) keeps its address in its status: not one that runs.
        let Ok((_, rec)) = PodRecord::from_api(pod) else {
            return false;
        };
        if !rec.is_live() {
            return false;
        }
        let ips: BTreeSet<IpAddr> = rec.ips.iter().copied().collect();
        let named = pod.metadata.annotations.get(CONTAINER_ANNOTATION);
        let Some(a) = self
            .unknown
            .iter()
            .find(|(a, held)| {
                **held == ips
                    && match named {
                        Some(c) => *c == a.container_id,
                        None => self.api_pods,
                    }
            })
            .map(|(a, _)| a.clone())
        else {
            return false;
        };
        let mut p = pod.clone();
        p.metadata.resource_version = None;
        p.metadata.annotations =
            [(CONTAINER_ANNOTATION.to_string(), a.container_id.clone())].into();
        p.spec.node_name = Some(self.node.clone());
        let ips: Vec<_> = ips.into_iter().collect();
        let local = LocalPod {
            attachment: a.clone(),
            pod: p,
            mac: None,
        }
        .with_ips(&ips);
        if let Err(e) = self.local_up(local) {
            tracing::warn!(pod = %key, error = %e, "restoring the record of a pod cut off for an unreadable one");
            return false;
        }
        tracing::info!(pod = %key, container = %a.container_id,
            "the pod of an unreadable record is recognised by its addresses: its record is restored, its port opened once its policies are in the kernel");
        self.unknown.remove(&a);
        self.recognised.insert(a);
        out.changed = true;
        out.others = true;
        out.recognised = true;
        true
    }

    /// Whether `pod` (naming this node, held by no pod here) may be a cut-off pod's: it has the
    /// addresses IPAM holds for one, or IPAM could not be read.
    fn may_be_cut_off(&self, pod: &Pod) -> bool {
        if self.closed.is_empty() {
            return false;
        }
        if !self.held_read {
            return true;
        }
        let ips = super::pods::pod_ips(pod);
        self.unknown.values().any(|held| *held == ips)
    }

    /// The kept records (`kept`) that can no longer be a cut-off pod's, now that a cut was
    /// lifted or a pod recognised: stale, for the caller to delete. One whose name a pod here
    /// holds now (an ADD of it) is that pod's, and only stops being kept.
    pub fn released(&mut self) -> Vec<String> {
        let done: Vec<String> = self
            .kept
            .iter()
            .filter(|(k, p)| self.local_key(k).is_some() || !self.may_be_cut_off(p))
            .map(|(k, _)| k.clone())
            .collect();
        for k in &done {
            self.kept.remove(k);
        }
        done.into_iter()
            .filter(|k| self.local_key(k).is_none())
            .collect()
    }

    /// Whether `a` was recognised (`adopt`) and waits for a compile before its port opens.
    pub fn awaits_compile(&self, a: &Attachment) -> bool {
        self.recognised.contains(a)
    }

    /// After a compile that had the recognised pods in the model: their ports open (`reopen`).
    pub fn take_recognised(&mut self) -> Vec<Attachment> {
        let atts: Vec<_> = std::mem::take(&mut self.recognised).into_iter().collect();
        atts.into_iter().filter(|a| self.reopen(a)).collect()
    }

    /// The record of attachment `a`, if this node has one.
    pub fn local_of(&self, a: &Attachment) -> Option<&LocalPod> {
        self.local.get(a)
    }

    fn local_key(&self, key: &str) -> Option<&LocalPod> {
        self.local.get(self.holders.get(key)?)
    }

    /// A pod this node just set up (CNI ADD); its record is saved in the state dir.
    pub fn local_up(&mut self, p: LocalPod) -> Result<(), PodUpError> {
        self.insertable(&p)?;
        self.files
            .save(&p)
            .map_err(|e| PodUpError::Failed(format!("recording the pod in the state dir: {e}")))?;
        self.insert_local(p);
        Ok(())
    }

    /// `local_up` without the state-dir record, which the caller writes (`files`) after this
    /// succeeds; if that fails, the caller takes the record out (`local_down`) or puts the
    /// attachment's earlier one back (`local_of`, then this).
    pub fn local_insert(&mut self, p: LocalPod) -> Result<(), PodUpError> {
        self.insertable(&p)?;
        self.insert_local(p);
        Ok(())
    }

    /// Whether `local_insert` would take `p`, checked before anything is written.
    fn insertable(&self, p: &LocalPod) -> Result<(), PodUpError> {
        netpol::model::PodRecord::from_api(&p.pod).map_err(|e| PodUpError::Failed(errs(&e)))?;
        // An attachment recorded under another name: taking the new one would leave the old
        // name in the cluster, held by a record that no longer carries it.
        if let Some(was) = self.local.get(&p.attachment).filter(|q| q.key() != p.key()) {
            return Err(PodUpError::Failed(format!(
                "container {} on {} is set up on this node as pod {} already: DEL it before \
                 adding it as pod {}",
                p.attachment.container_id,
                p.attachment.ifname,
                was.key(),
                p.key()
            )));
        }
        // Another attachment with this pod's name: not replaced, which would leave its pod
        // (if it still runs) with no record, so unprotected. The name's holder itself (a label
        // edit) goes in also when an old state dir gave another attachment the name too.
        let key = p.key();
        let holds = self.holders.get(&key) == Some(&p.attachment);
        if let Some(by) = self
            .local
            .iter()
            .find(|(a, q)| !holds && q.key() == key && **a != p.attachment)
            .map(|(a, _)| a.clone())
        {
            if by.container_id == p.attachment.container_id {
                // One pod with two twill interfaces (e.g. Multus): its record would have one
                // interface's addresses and leave the other's open.
                return Err(PodUpError::Failed(format!(
                    "pod {key} has a twill interface already ({}): network policy is enforced \
                     for one twill interface per pod",
                    by.ifname
                )));
            }
            return Err(PodUpError::Taken { key, by });
        }
        Ok(())
    }

    /// Where local pods are recorded.
    pub fn files(&self) -> PodFiles {
        self.files.clone()
    }

    /// The pod of `a` is gone (DEL, GC); what that did to its name, if it was known.
    pub fn local_down(&mut self, a: &Attachment) -> Option<Left> {
        if let Err(e) = self.files.remove(a) {
            tracing::warn!(error = %e, "removing a pod record from the state dir");
        }
        let p = self.local.remove(a)?;
        let key = p.key();
        if self.holders.get(&key) != Some(a) {
            return Some(Left::Shadowed);
        }
        self.holders.remove(&key);
        // The newest of the name's other records, ties by path, as at start (`load_local`).
        let next = self
            .local
            .values()
            .filter(|q| q.key() == key)
            .max_by_key(|q| {
                let a = &q.attachment;
                (self.files.written(a), self.files.path(a))
            })
            .cloned();
        if let Some(next) = next {
            tracing::info!(pod = %key, container = %next.attachment.container_id,
                "the other attachment recorded under this pod's name holds it now");
            let rec = record(&next);
            self.insert_local(next);
            return Some(Left::HandedOver(rec.0, rec.1));
        }
        let rec = self
            .cluster
            .remove_pod(&PodKey::new(p.namespace(), &p.pod.metadata.name));
        Some(Left::Gone(key, rec))
    }

    fn skip(&mut self, metrics: &Metrics, dir: &str, key: &str, why: String) {
        Metrics::inc(&metrics.policy_invalid_objects);
        let id = format!("{dir}/{key}");
        if self.skipped.get(&id) != Some(&why) {
            tracing::warn!(key = %id, "skipping an invalid object: {why}");
            self.skipped.insert(id, why);
        }
    }

    pub fn apply(&mut self, dir: &'static str, ev: DirEvent, metrics: &Metrics) -> Applied {
        let mut out = Applied::default();
        match ev {
            DirEvent::Snapshot(kvs) => {
                self.listed.insert(dir);
                self.snapshot(dir, kvs, metrics, &mut out);
            }
            DirEvent::Put(kv) => self.put(dir, kv, metrics, &mut out),
            DirEvent::Delete(key) => self.delete(dir, &key, &mut out),
        }
        out
    }

    fn snapshot(&mut self, dir: &'static str, kvs: Vec<ObjKv>, m: &Metrics, out: &mut Applied) {
        let keys: BTreeSet<String> = kvs.iter().map(|kv| kv.key.clone()).collect();
        let gone: Vec<String> = match dir {
            POLICIES => self
                .cluster
                .policies()
                .map(|(k, _)| k.to_string())
                .filter(|k| !keys.contains(k))
                .collect(),
            NAMESPACES => self
                .namespaces
                .keys()
                .filter(|k| !keys.contains(*k))
                .cloned()
                .collect(),
            _ => self
                .remote
                .keys()
                .chain(self.api_here.keys())
                .filter(|k| !keys.contains(*k))
                .cloned()
                .collect(),
        };
        for k in gone {
            self.delete(dir, &k, out);
        }
        if dir == PODS {
            self.kept.retain(|k, _| keys.contains(k));
        }
        if dir == PODS && !self.api_pods {
            // Our pods whose record is missing: written now (made while etcd was away).
            let missing: Vec<LocalPod> = self
                .holders
                .iter()
                .filter(|(k, _)| !keys.contains(*k))
                .filter_map(|(_, a)| self.local.get(a).cloned())
                .collect();
            for p in missing {
                out.records.push(record(&p));
            }
        }
        for kv in kvs {
            self.put(dir, kv, m, out);
        }
        // Even an empty directory completes the picture.
        out.changed = true;
        out.others = true;
    }

    fn put(&mut self, dir: &'static str, kv: ObjKv, m: &Metrics, out: &mut Applied) {
        match dir {
            POLICIES => {
                let Some((ns, name)) = split_key(&kv.key) else {
                    return self.skip(m, dir, &kv.key, "the key is not <namespace>/<name>".into());
                };
                let mut p: NetworkPolicy = match serde_json::from_slice(&kv.value) {
                    Ok(p) => p,
                    Err(e) => {
                        return self.skip(m, dir, &kv.key, format!("not a NetworkPolicy: {e}"))
                    }
                };
                if p.metadata.namespace.is_none() {
                    p.metadata.namespace = Some(ns.to_string());
                }
                if p.metadata.namespace.as_deref() != Some(ns) || p.metadata.name != name {
                    return self.skip(
                        m,
                        dir,
                        &kv.key,
                        format!(
                            "metadata names {}/{}, the key {ns}/{name}",
                            p.metadata.namespace.as_deref().unwrap_or(""),
                            p.metadata.name
                        ),
                    );
                }
                let before = self.cluster.policy(&PolicyKey::new(ns, name)).cloned();
                match self.cluster.upsert_policy(p) {
                    Ok(_) => {
                        self.skipped.remove(&format!("{dir}/{}", kv.key));
                        let changed =
                            before.as_ref() != self.cluster.policy(&PolicyKey::new(ns, name));
                        out.changed |= changed;
                        out.others |= changed;
                    }
                    Err(e) => {
                        let keep = if before.is_some() {
                            "; its previous valid version stays in force"
                        } else {
                            ""
                        };
                        self.skip(m, dir, &kv.key, format!("{}{keep}", errs(&e)));
                    }
                }
            }
            NAMESPACES => {
                let mut n: Namespace = match serde_json::from_slice(&kv.value) {
                    Ok(n) => n,
                    Err(e) => return self.skip(m, dir, &kv.key, format!("not a Namespace: {e}")),
                };
                if n.metadata.name.is_empty() {
                    n.metadata.name = kv.key.clone();
                }
                if n.metadata.name != kv.key {
                    return self.skip(
                        m,
                        dir,
                        &kv.key,
                        format!("metadata.name is {:?}", n.metadata.name),
                    );
                }
                match self.cluster.upsert_namespace(&n) {
                    Ok(()) => {
                        let changed = self.namespaces.get(&kv.key) != Some(&n);
                        out.changed |= changed;
                        out.others |= changed;
                        self.namespaces.insert(kv.key.clone(), n);
                    }
                    Err(e) => self.skip(m, dir, &kv.key, errs(&e)),
                }
            }
            _ => self.put_pod(kv, m, out),
        }
    }

    fn put_pod(&mut self, kv: ObjKv, m: &Metrics, out: &mut Applied) {
        self.kept.remove(&kv.key);
        let Some((ns, name)) = split_key(&kv.key) else {
            return self.skip(m, PODS, &kv.key, "the key is not <namespace>/<name>".into());
        };
        let mut pod: Pod = match serde_json::from_slice(&kv.value) {
            Ok(p) => p,
            Err(e) => return self.skip(m, PODS, &kv.key, format!("not a Pod: {e}")),
        };
        if pod.metadata.namespace.is_none() {
            pod.metadata.namespace = Some(ns.to_string());
        }
        if pod.metadata.namespace.as_deref() != Some(ns) || pod.metadata.name != name {
            return self.skip(m, PODS, &kv.key, "metadata does not name the key".into());
        }
        if let Err(e) = netpol::model::PodRecord::from_api(&pod) {
            return self.skip(m, PODS, &kv.key, errs(&e));
        }
        if self.api_pods && pod.spec.node_name.as_deref() == Some(self.node.as_str()) {
            return self.put_api_pod_here(kv.key, pod, out);
        }
        if let Some(local) = self.local_key(&kv.key).cloned() {
            let ours = pod.metadata.annotations.get(CONTAINER_ANNOTATION)
                == Some(&local.attachment.container_id);
            if !ours {
                // Another pod's record under our pod's name: ours is what runs here.
                out.records.push(record(&local));
                return;
            }
            // Labels (and declared ports) edited in etcd take effect; the rest is ours.
            let mut updated = local.clone();
            updated.pod.metadata.labels = pod.metadata.labels.clone();
            updated.pod.spec.containers = pod.spec.containers.clone();
            if updated != local {
                tracing::info!(pod = %kv.key, "labels edited in etcd: taking them over");
                if let Err(e) = self.local_up(updated) {
                    tracing::warn!(pod = %kv.key, error = %e, "taking over edited labels failed");
                }
                out.changed = true;
                out.others = true;
            }
            if pod.spec.node_name != local.pod.spec.node_name {
                // Ours under this node's old name: written again naming this node.
                if let Some(now) = self.local_key(&kv.key) {
                    out.records.push(record(now));
                }
            }
            return;
        }
        if pod.spec.node_name.as_deref() == Some(self.node.as_str()) {
            if self.adopt(&kv.key, &pod, out) {
                return;
            }
            if self.may_be_cut_off(&pod) {
                // The record of a cut-off pod not recognised (yet): the only copy of its
                // labels, kept. Its addresses are IPAM's still, so no new pod gets them.
                tracing::info!(pod = %kv.key, "keeping a record of this node that no pod here holds: it may be a cut-off pod's");
                self.kept.insert(kv.key, pod);
                return;
            }
            // Says it runs here, but no CNI attachment here made it: stale (state dir lost,
            // or GC while etcd was away).
            out.records.push((kv.key, None));
            return;
        }
        if self.remote.get(&kv.key) != Some(&pod) {
            let before = self
                .remote
                .contains_key(&kv.key)
                .then(|| self.cluster.pod(&PodKey::new(ns, name)).cloned())
                .flatten();
            if let Ok(key) = self.cluster.upsert_pod(&pod) {
                out.changed = true;
                let live_now = self.cluster.pod(&key).is_some_and(PodRecord::is_live);
                match before {
                    // A pod is not live until it has a node and an address (every pod in
                    // Kubernetes starts so, and kubelet reports its address later): until
                    // then it is in no program, and only comes now.
                    None => out.moves.push(PodMove::Added(key)),
                    Some(b) if !b.is_live() => out.moves.push(PodMove::Added(key)),
                    // Finished: it only goes.
                    Some(b) if !live_now => out.moves.push(PodMove::Removed(Box::new(b))),
                    Some(_) => out.others = true,
                }
            }
            self.remote.insert(kv.key, pod);
        }
    }

    /// Kubernetes mode: the API's object of a pod on this node. Its labels and declared ports
    /// are the pod's; the rest (address, attachment) is what this node's CNI set up. One with
    /// no attachment here yet waits for its ADD.
    fn put_api_pod_here(&mut self, key: String, pod: Pod, out: &mut Applied) {
        // Seen before it was bound to a node (as every pod is created): not another node's.
        if self.remote.remove(&key).is_some() && self.local_key(&key).is_none() {
            if let Some((ns, name)) = split_key(&key) {
                if let Some(rec) = self.cluster.remove_pod(&PodKey::new(ns, name)) {
                    out.moves.push(PodMove::Removed(Box::new(rec)));
                    out.changed = true;
                }
            }
        }
        // The watch may still deliver an earlier pod of the name after this one's ADD: its
        // labels are not this pod's.
        let local = self
            .local_key(&key)
            .filter(|l| super::pods::same_pod(&l.pod, &pod))
            .cloned();
        if local.is_none() {
            self.adopt(&key, &pod, out);
        }
        if let Some(local) = local {
            let mut updated = local.clone();
            updated.pod.metadata.labels = pod.metadata.labels.clone();
            updated.pod.spec.containers = pod.spec.containers.clone();
            if updated != local {
                tracing::info!(pod = %key, "labels changed in the Kubernetes API: taking them over");
                if let Err(e) = self.local_up(updated) {
                    tracing::warn!(pod = %key, error = %e, "taking over changed labels failed");
                }
                out.changed = true;
                out.others = true;
            }
        }
        self.api_here.insert(key, pod);
    }

    fn delete(&mut self, dir: &'static str, key: &str, out: &mut Applied) {
        self.skipped.remove(&format!("{dir}/{key}"));
        if dir == PODS {
            self.kept.remove(key);
        }
        if dir == PODS && self.api_pods && self.api_here.remove(key).is_some() {
            // This node's pod: it goes with its CNI DEL.
            return;
        }
        match dir {
            POLICIES => {
                if let Some((ns, name)) = split_key(key) {
                    let changed = self
                        .cluster
                        .remove_policy(&PolicyKey::new(ns, name))
                        .is_some();
                    out.changed |= changed;
                    out.others |= changed;
                }
            }
            NAMESPACES => {
                if self.namespaces.remove(key).is_some() {
                    // The namespace keeps existing for its pods, with its automatic label only.
                    self.cluster.remove_namespace(key);
                    out.changed = true;
                    out.others = true;
                }
            }
            _ => {
                if let Some(local) = self.local_key(key).cloned() {
                    // Our running pod's record went: it is written again.
                    out.records.push(record(&local));
                } else if self.remote.remove(key).is_some() {
                    let rec = split_key(key)
                        .and_then(|(ns, name)| self.cluster.remove_pod(&PodKey::new(ns, name)));
                    match rec {
                        Some(rec) => out.moves.push(PodMove::Removed(Box::new(rec))),
                        None => out.others = true,
                    }
                    out.changed = true;
                }
            }
        }
    }

    /// Reads the cluster state an earlier run saved; true if there was one.
    pub fn load_cache(&mut self) -> bool {
        let Ok(bytes) = std::fs::read(&self.cache_path) else {
            return false;
        };
        let cache: Cache = match serde_json::from_slice(&bytes) {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(file = %self.cache_path.display(), error = %e, "ignoring an unreadable policy cache");
                return false;
            }
        };
        for p in cache.policies {
            let _ = self.cluster.upsert_policy(p);
        }
        for n in cache.namespaces {
            if self.cluster.upsert_namespace(&n).is_ok() {
                self.namespaces.insert(n.metadata.name.clone(), n);
            }
        }
        for p in cache.pods {
            let key = format!(
                "{}/{}",
                p.metadata.namespace.as_deref().unwrap_or(""),
                p.metadata.name
            );
            if self.local_key(&key).is_none() && self.cluster.upsert_pod(&p).is_ok() {
                self.remote.insert(key, p);
            }
        }
        self.from_cache = true;
        true
    }

    /// The cache file's contents now (the engine serialises; the file is written elsewhere).
    pub fn cache_bytes(&self) -> std::io::Result<Vec<u8>> {
        let cache = Cache {
            policies: self.cluster.policies().map(|(_, p)| p.clone()).collect(),
            namespaces: self.namespaces.values().cloned().collect(),
            pods: self.remote.values().cloned().collect(),
        };
        serde_json::to_vec(&cache).map_err(std::io::Error::other)
    }

    pub fn cache_path(&self) -> &std::path::Path {
        &self.cache_path
    }
}

/// A local pod's record for etcd: its key and value.
pub(super) fn record(p: &LocalPod) -> (String, Option<Vec<u8>>) {
    (p.key(), serde_json::to_vec(&p.pod).ok())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn kv(key: &str, v: serde_json::Value) -> ObjKv {
        ObjKv {
            key: key.into(),
            value: serde_json::to_vec(&v).unwrap(),
            mod_revision: 1,
        }
    }

    fn objects(tag: &str) -> (Objects, PathBuf) {
        let dir = std::env::temp_dir().join(format!("twill-src-{}-{tag}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        (Objects::new("n1", &dir), dir)
    }

    fn local(name: &str, ip: &str, labels: serde_json::Value) -> LocalPod {
        let cfg = json!({"args": {"cni": {"labels": labels}}});
        super::super::pods::from_cni(
            Attachment {
                container_id: format!("cid-{name}"),
                ifname: "eth0".into(),
            },
            &format!("K8S_POD_NAMESPACE=x;K8S_POD_NAME={name}"),
            &cfg,
            "n1",
        )
        .unwrap()
        .with_ip(ip.parse().unwrap())
    }

    #[test]
    fn loaded_after_all_three_lists_and_invalid_objects_are_skipped() {
        let (mut o, dir) = objects("a");
        let m = Metrics::default();
        assert!(!o.loaded());
        let good = json!({"metadata": {"name": "p", "namespace": "x"},
                          "spec": {"podSelector": {}, "policyTypes": ["Ingress"]}});
        let bad = json!({"metadata": {"name": "q", "namespace": "x"},
                         "spec": {"podSelector": {}, "ingress": [{"ports": [{"port": 70000}]}]}});
        let out = o.apply(
            POLICIES,
            DirEvent::Snapshot(vec![kv("x/p", good), kv("x/q", bad)]),
            &m,
        );
        assert!(out.changed);
        assert_eq!(o.cluster().policies().count(), 1);
        assert_eq!(
            m.policy_invalid_objects
                .load(std::sync::atomic::Ordering::Relaxed),
            1
        );
        o.apply(NAMESPACES, DirEvent::Snapshot(vec![]), &m);
        assert!(!o.loaded());
        o.apply(PODS, DirEvent::Snapshot(vec![]), &m);
        assert!(o.loaded());
        // An invalid update of a valid policy keeps the valid one.
        let worse = json!({"metadata": {"name": "p", "namespace": "x"},
                           "spec": {"podSelector": {"matchExpressions": [{"key": "a", "operator": "In"}]}}});
        let out = o.apply(POLICIES, DirEvent::Put(kv("x/p", worse)), &m);
        assert!(!out.changed);
        assert_eq!(o.cluster().policies().count(), 1);
        // A key that does not match the object is refused.
        let elsewhere =
            json!({"metadata": {"name": "r", "namespace": "y"}, "spec": {"podSelector": {}}});
        o.apply(POLICIES, DirEvent::Put(kv("x/r", elsewhere)), &m);
        assert_eq!(o.cluster().policies().count(), 1);
        let _ = std::fs::remove_dir_all(dir);
    }

    /// A node renamed (`--node-name`) keeps its state dir, whose records, and the pods'
    /// records in etcd, name the old node. The pods are this node's: their etcd records are
    /// written again naming it, since a node deletes only records that name it.
    #[test]
    fn records_of_a_renamed_node_name_it_again() {
        let (mut old, dir) = objects("renamed");
        let a = local("a", "10.244.1.5", json!([{"key": "app", "value": "db"}]));
        old.local_up(a.clone()).unwrap();
        // A record with no node name (a hand edit) is this node's pod as well.
        let mut b = local("b", "10.244.1.6", json!([]));
        b.pod.spec.node_name = None;
        old.local_up(b.clone()).unwrap();
        let in_etcd = record(&a);
        let m = Metrics::default();

        // A name no pod can carry: the pods stay as recorded, not cut off as invalid.
        let mut bad = Objects::new("N9_bad", &dir);
        bad.load_local();
        let kept = bad.local_of(&a.attachment).expect("the pod is loaded");
        assert_eq!(kept.pod.spec.node_name.as_deref(), Some("n1"));
        assert!(bad.closed_ports().is_empty());
        // Its etcd record names the old node still: this node's to delete.
        assert_eq!(bad.former_names(), &BTreeSet::from(["n1".to_string()]));

        let mut o = Objects::new("n9", &dir);
        o.load_local();
        let here = o.local_of(&a.attachment).expect("the pod is loaded");
        assert_eq!(here.pod.spec.node_name.as_deref(), Some("n9"));
        let unnamed = o.local_of(&b.attachment).expect("the pod is loaded");
        assert_eq!(unnamed.pod.spec.node_name.as_deref(), Some("n9"));
        assert_eq!(o.former_names(), &BTreeSet::from(["n1".to_string()]));
        let put = |v: Vec<u8>| {
            DirEvent::Put(ObjKv {
                key: "x/a".into(),
                value: v,
                mod_revision: 2,
            })
        };
        // Its record in etcd, with a label edited there meanwhile: taken over, and written
        // again naming this node.
        let mut edited: Pod = serde_json::from_slice(&in_etcd.1.unwrap()).unwrap();
        edited.metadata.labels.insert("app".into(), "web".into());
        let out = o.apply(PODS, put(serde_json::to_vec(&edited).unwrap()), &m);
        assert_eq!(out.records.len(), 1, "{out:?}");
        let (key, value) = &out.records[0];
        assert_eq!(key, "x/a");
        let written: Pod = serde_json::from_slice(value.as_ref().unwrap()).unwrap();
        assert_eq!(written.spec.node_name.as_deref(), Some("n9"));
        assert_eq!(written.metadata.labels, edited.metadata.labels);
        // Once it names this node, it is ours as it was: nothing more to write.
        let out = o.apply(PODS, put(value.clone().unwrap()), &m);
        assert!(out.records.is_empty(), "{out:?}");
        let _ = std::fs::remove_dir_all(dir);
    }

    /// An attachment already recorded under one pod name is refused under another (a repeated
    /// ADD with other CNI_ARGS): taking it would leave the first name in the cluster, held by a
    /// record that no longer carries it. Nothing changes, on disk either, until it is DELeted.
    #[test]
    fn an_attachment_is_not_renamed_without_a_del() {
        let (mut o, dir) = objects("rename");
        let a = local("a", "10.244.1.5", json!([{"key": "app", "value": "db"}]));
        o.local_up(a.clone()).unwrap();
        let mut renamed = local("b", "10.244.1.5", json!([{"key": "app", "value": "web"}]));
        renamed.attachment = a.attachment.clone();
        for r in [o.local_up(renamed.clone()), o.local_insert(renamed.clone())] {
            match r {
                Err(PodUpError::Failed(m)) => {
                    assert!(m.contains("as pod x/a already") && m.contains("DEL"), "{m}")
                }
                other => panic!("{other:?}"),
            }
        }
        assert!(o.cluster().pod(&PodKey::new("x", "b")).is_none());
        let rec = o.cluster().pod(&PodKey::new("x", "a")).unwrap();
        assert_eq!(rec.labels.get("app").map(String::as_str), Some("db"));
        assert_eq!(o.local_pod("x/a"), Some(&a.pod));
        assert_eq!(o.files().load().pods, vec![a.clone()]);
        o.local_down(&a.attachment).unwrap();
        o.local_up(renamed.clone()).unwrap();
        assert!(o.cluster().pod(&PodKey::new("x", "a")).is_none());
        assert!(o.cluster().pod(&PodKey::new("x", "b")).is_some());
        assert_eq!(o.files().load().pods, vec![renamed]);
        let _ = std::fs::remove_dir_all(dir);
    }

    /// One record per pod name: a second attachment under a name another one holds is refused
    /// (naming the holder), not put in its place, which left the holder's pod unprotected;
    /// once the holder is gone it is taken.
    #[test]
    fn a_pod_name_held_by_another_attachment_is_refused_until_that_one_goes() {
        let (mut o, dir) = objects("t");
        let a = local("a", "10.244.1.5", json!([{"key": "app", "value": "db"}]));
        o.local_up(a.clone()).unwrap();
        let mut b = local("a", "10.244.1.6", json!([{"key": "app", "value": "web"}]));
        b.attachment.container_id = "cid-other".into();
        match o.local_insert(b.clone()) {
            Err(PodUpError::Taken { key, by }) => {
                assert_eq!((key.as_str(), &by), ("x/a", &a.attachment))
            }
            other => panic!("{other:?}"),
        }
        let rec = o.cluster().pod(&PodKey::new("x", "a")).unwrap();
        assert_eq!(rec.labels.get("app").map(String::as_str), Some("db"));
        // A second twill interface of the same pod (Multus): refused for good, said plainly.
        let mut net1 = a.clone();
        net1.attachment.ifname = "net1".into();
        match o.local_insert(net1) {
            Err(PodUpError::Failed(m)) => assert!(m.contains("one twill interface per pod"), "{m}"),
            other => panic!("{other:?}"),
        }
        // The same attachment again (a retried ADD) is no conflict.
        o.local_insert(a.clone()).unwrap();
        o.local_down(&a.attachment).unwrap();
        o.local_insert(b).unwrap();
        let rec = o.cluster().pod(&PodKey::new("x", "a")).unwrap();
        assert_eq!(rec.labels.get("app").map(String::as_str), Some("web"));
        let _ = std::fs::remove_dir_all(dir);
    }

    /// A state dir from before one pod name had one attachment can hold two records of a
    /// name. After a restart the newer holds the name (as before it); the older leaving
    /// changes nothing, and the holder leaving hands the name to the other instead of taking
    /// it out of the model while that pod runs.
    #[test]
    fn two_records_of_one_name_from_an_old_state_dir() {
        let (_, dir) = objects("dup");
        let older = local("a", "10.244.1.5", json!([{"key": "app", "value": "db"}]));
        // Sorts after the older one ("cid-a"): the first of the name in the map is not the
        // holder.
        let mut newer = local("a", "10.244.1.6", json!([{"key": "app", "value": "web"}]));
        newer.attachment.container_id = "cid-z".into();
        let files = PodFiles::new(&dir);
        let write = |p: &LocalPod, age: u64| {
            files.save(p).unwrap();
            let path = files.path(&p.attachment);
            let at = std::time::SystemTime::now() - std::time::Duration::from_secs(age);
            std::fs::File::options()
                .write(true)
                .open(path)
                .unwrap()
                .set_modified(at)
                .unwrap();
        };
        let app = |o: &Objects| {
            let rec = o.cluster().pod(&PodKey::new("x", "a"))?;
            rec.labels.get("app").cloned()
        };
        let held_by = |o: &Objects| {
            o.local_pod("x/a")
                .and_then(|p| p.metadata.labels.get("app").cloned())
        };
        let load = || {
            write(&older, 60);
            write(&newer, 0);
            let mut o = Objects::new("n1", &dir);
            o.load_local();
            assert_eq!(o.local_count(), 2, "both ports stay checked");
            assert_eq!(app(&o).as_deref(), Some("web"));
            assert_eq!(held_by(&o).as_deref(), Some("web"));
            o
        };
        let mut o = load();
        // The holder takes label edits; the other record of its name does not refuse them.
        let mut edited = newer.clone();
        edited
            .pod
            .metadata
            .labels
            .insert("app".into(), "api".into());
        o.local_up(edited).unwrap();
        assert_eq!(app(&o).as_deref(), Some("api"));
        // A listing of etcd without the name's record writes the holder's.
        let out = o.apply(PODS, DirEvent::Snapshot(vec![]), &Metrics::default());
        let written: Vec<Pod> = out
            .records
            .iter()
            .map(|(_, v)| serde_json::from_slice(v.as_ref().unwrap()).unwrap())
            .collect();
        assert_eq!(written.len(), 1);
        assert_eq!(
            written[0].metadata.labels.get("app").map(String::as_str),
            Some("api")
        );
        assert!(matches!(
            o.local_down(&older.attachment),
            Some(Left::Shadowed)
        ));
        assert_eq!(app(&o).as_deref(), Some("api"));
        assert_eq!(o.local_count(), 1);
        let mut o = load();
        match o.local_down(&newer.attachment) {
            Some(Left::HandedOver(key, Some(value))) => {
                assert_eq!(key, "x/a");
                let pod: Pod = serde_json::from_slice(&value).unwrap();
                assert_eq!(
                    pod.metadata.labels.get("app").map(String::as_str),
                    Some("db")
                );
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(app(&o).as_deref(), Some("db"));
        assert_eq!(held_by(&o).as_deref(), Some("db"));
        assert!(matches!(
            o.local_down(&older.attachment),
            Some(Left::Gone(_, Some(_)))
        ));
        assert_eq!(app(&o), None);
        let _ = std::fs::remove_dir_all(dir);
    }

    /// Three records of one name: each hand-over goes to the newest left, not to the first
    /// in the map's order.
    #[test]
    fn a_name_is_handed_to_the_newest_other_record() {
        let (_, dir) = objects("dup3");
        let files = PodFiles::new(&dir);
        let mut recs = Vec::new();
        // Oldest first; the oldest's container ID sorts first in the map.
        for (cid, app, age) in [
            ("cid-a", "old", 60),
            ("cid-m", "mid", 30),
            ("cid-z", "new", 0),
        ] {
            let mut p = local("a", "10.244.1.5", json!([{"key": "app", "value": app}]));
            p.attachment.container_id = cid.into();
            files.save(&p).unwrap();
            let at = std::time::SystemTime::now() - std::time::Duration::from_secs(age);
            std::fs::File::options()
                .write(true)
                .open(files.path(&p.attachment))
                .unwrap()
                .set_modified(at)
                .unwrap();
            recs.push(p);
        }
        let mut o = Objects::new("n1", &dir);
        o.load_local();
        let app = |o: &Objects| {
            let rec = o.cluster().pod(&PodKey::new("x", "a"))?;
            rec.labels.get("app").cloned()
        };
        assert_eq!(app(&o).as_deref(), Some("new"));
        assert!(matches!(
            o.local_down(&recs[2].attachment),
            Some(Left::HandedOver(..))
        ));
        assert_eq!(app(&o).as_deref(), Some("mid"));
        assert!(matches!(
            o.local_down(&recs[1].attachment),
            Some(Left::HandedOver(..))
        ));
        assert_eq!(app(&o).as_deref(), Some("old"));
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn local_pods_own_their_records_and_take_label_edits() {
        let (mut o, dir) = objects("b");
        let m = Metrics::default();
        let a = local("a", "10.244.1.5", json!([{"key": "app", "value": "web"}]));
        o.local_up(a.clone()).unwrap();
        // Listing etcd without our record: it is written.
        let out = o.apply(PODS, DirEvent::Snapshot(vec![]), &m);
        assert_eq!(out.records.len(), 1);
        assert_eq!(out.records[0].0, "x/a");
        // Someone edits our record's labels: taken over, and kept across a restart.
        let mut edited = a.pod.clone();
        edited.metadata.labels.insert("tier".into(), "front".into());
        o.apply(
            PODS,
            DirEvent::Put(kv("x/a", serde_json::to_value(&edited).unwrap())),
            &m,
        );
        let rec = o.cluster().pod(&PodKey::new("x", "a")).unwrap();
        assert_eq!(rec.labels.get("tier").map(String::as_str), Some("front"));
        let mut again = Objects::new("n1", &dir);
        again.load_local();
        assert_eq!(again.local_count(), 1);
        let rec = again.cluster().pod(&PodKey::new("x", "a")).unwrap();
        assert_eq!(rec.labels.get("tier").map(String::as_str), Some("front"));
        // Our record deleted by someone while the pod runs: written again.
        let out = o.apply(PODS, DirEvent::Delete("x/a".into()), &m);
        assert_eq!(out.records.len(), 1);
        // A record that claims this node but no attachment here made: deleted as stale.
        let stale = local("s", "10.244.1.9", json!([])).pod;
        let out = o.apply(
            PODS,
            DirEvent::Put(kv("x/s", serde_json::to_value(&stale).unwrap())),
            &m,
        );
        assert_eq!(out.records, vec![("x/s".to_string(), None)]);
        // Remote pods enter the model; DEL of ours leaves it.
        let mut remote = local("r", "10.244.2.7", json!([])).pod;
        remote.spec.node_name = Some("n2".into());
        o.apply(
            PODS,
            DirEvent::Put(kv("x/r", serde_json::to_value(&remote).unwrap())),
            &m,
        );
        assert!(o.cluster().pod(&PodKey::new("x", "r")).is_some());
        let Some(Left::Gone(key, rec)) = o.local_down(&a.attachment) else {
            panic!("the pod's name did not go with it");
        };
        assert_eq!((key.as_str(), rec.is_some()), ("x/a", true));
        assert!(o.cluster().pod(&PodKey::new("x", "a")).is_none());
        let _ = std::fs::remove_dir_all(dir);
    }

    /// A pod whose record in the state dir is unreadable is cut off, and recognised by its
    /// addresses (IPAM's) when its object comes: in etcd mode its record there (not deleted as
    /// stale), in Kubernetes mode the API's pod.
    #[test]
    fn a_cut_off_pod_is_recognised_by_its_addresses() {
        for api in [false, true] {
            let (mut o, dir) = objects(if api { "cut-api" } else { "cut-etcd" });
            if api {
                o = o.with_api_pods();
            }
            let m = Metrics::default();
            let db = local("db", "10.244.1.5", json!([{"key": "app", "value": "db"}]));
            o.local_up(db.clone()).unwrap();
            std::fs::write(o.files().path(&db.attachment), b"{").unwrap();
            let port = crate::cni::host_veth_name("cid-db", "eth0");
            let mut o = Objects::new("n1", &dir);
            if api {
                o = o.with_api_pods();
            }
            o.load_local();
            assert_eq!(o.closed_ports(), &BTreeSet::from([port.clone()]));
            assert_eq!(o.local_count(), 0);
            let other = Attachment {
                container_id: "cid-other".into(),
                ifname: "eth0".into(),
            };
            o.resolve_closed([
                (db.attachment.clone(), "10.244.1.5".parse().unwrap()),
                (other, "10.244.1.6".parse().unwrap()),
            ]);
            // Another address, or another container named: not this pod.
            let mut wrong = db.pod.clone();
            wrong.metadata.name = "wrong".into();
            let wrong_ip = local("wrong", "10.244.1.6", json!([])).pod;
            let mut wrong_cid = wrong.clone();
            wrong_cid
                .metadata
                .annotations
                .insert(CONTAINER_ANNOTATION.into(), "cid-else".into());
            // A finished pod that had the address (a Job's): not one that runs.
            let mut finished = db.pod.clone();
            finished.metadata.name = "wrong".into();
            if let Some(st) = finished.status.as_mut() {
                st.phase = Some("Succeeded".into());
            }
            let mut wrongs = vec![wrong_ip, wrong_cid, finished];
            if !api {
                // etcd mode: twilld's records name their container; one that does not is not ours.
                let mut unnamed = wrong.clone();
                unnamed.metadata.annotations.clear();
                wrongs.push(unnamed);
            }
            for w in wrongs {
                let db_ips =
                    super::super::pods::pod_ips(&w) == super::super::pods::pod_ips(&db.pod);
                let out = o.apply(
                    PODS,
                    DirEvent::Put(kv("x/wrong", serde_json::to_value(&w).unwrap())),
                    &m,
                );
                assert!(!out.recognised);
                // etcd mode: a stale record is kept only when it has the cut-off pod's addresses.
                let deleted = out.records == vec![("x/wrong".to_string(), None)];
                assert_eq!(deleted, !api && !db_ips, "{w:?}");
                // Kept while the pod it may be is cut off and not recognised.
                assert!(o.released().is_empty());
            }
            assert_eq!(o.closed_ports().len(), 1);
            // Its own object: the record is back, labels and addresses, and the port open.
            let mut obj = db.pod.clone();
            if api {
                obj.metadata.annotations.clear();
            }
            let out = o.apply(
                PODS,
                DirEvent::Put(kv("x/db", serde_json::to_value(&obj).unwrap())),
                &m,
            );
            assert!(out.recognised && out.records.is_empty(), "{out:?}");
            // etcd mode: the records kept for it now cannot be its (it was recognised), and go.
            let kept = if api {
                vec![]
            } else {
                vec!["x/wrong".to_string()]
            };
            assert_eq!(o.released(), kept);
            assert!(o.released().is_empty());
            // Cut off until compiled.
            assert!(o.awaits_compile(&db.attachment) && o.cut_off() == 1);
            assert_eq!(o.closed_ports().len(), 1);
            assert_eq!(o.take_recognised(), vec![db.attachment.clone()]);
            assert!(o.closed_ports().is_empty());
            let back = o.local_of(&db.attachment).unwrap();
            assert_eq!(back.pod.metadata.labels["app"], "db");
            assert_eq!(
                super::super::pods::pod_ips(&back.pod),
                BTreeSet::from(["10.244.1.5".parse().unwrap()])
            );
            assert_eq!(
                back.pod.metadata.annotations.get(CONTAINER_ANNOTATION),
                Some(&"cid-db".to_string())
            );
            assert_eq!(o.files().load().pods.len(), 1);
            assert!(o.files().load().unreadable.is_empty());
            let _ = std::fs::remove_dir_all(dir);
        }
    }

    /// A record that reads but is invalid (here a label value Kubernetes would refuse) tells
    /// no more than an unreadable one: its port is cut off too.
    #[test]
    fn an_invalid_local_record_cuts_its_pod_off() {
        let (o, dir) = objects("invalid");
        let db = local("db", "10.244.1.5", json!([]));
        let mut bad = db.clone();
        bad.pod
            .metadata
            .labels
            .insert("app".into(), "not a valid value!".into());
        o.files().save(&bad).unwrap();
        let mut o = Objects::new("n1", &dir);
        o.load_local();
        let port = crate::cni::host_veth_name("cid-db", "eth0");
        assert_eq!(o.closed_ports(), &BTreeSet::from([port.clone()]));
        assert_eq!((o.local_count(), o.cut_off()), (0, 1));
        assert!(dir.join(format!("pods/{port}.unreadable")).is_file());
        // Its ADD in flight: recorded, so no longer counted as cut off.
        o.local_up(db.clone()).unwrap();
        assert_eq!(o.cut_off(), 0);
        assert!(o.is_closed(&db.attachment));
        assert!(o.reopen(&db.attachment) && !o.is_closed(&db.attachment));
        assert!(!dir.join(format!("pods/{port}.unreadable")).exists());
        let _ = std::fs::remove_dir_all(dir);
    }

    /// A cut-off port that no longer exists at start (its pod went while twilld was down) is
    /// dropped with its record set aside; one that exists, or whose existence cannot be told,
    /// stays cut off.
    #[test]
    fn cut_off_ports_that_are_gone_are_dropped() {
        let (o, dir) = objects("gone");
        let pods = ["a", "b", "c"].map(|n| local(n, "10.244.1.5", json!([])));
        for p in &pods {
            o.files().save(p).unwrap();
            let port = p.attachment.port();
            std::fs::write(dir.join(format!("pods/{port}.json")), b"\0").unwrap();
        }
        let ports = pods.map(|p| p.attachment.port());
        let mut o = Objects::new("n1", &dir);
        o.load_local();
        assert_eq!(o.cut_off(), 3);
        o.drop_gone_ports(|port| match port {
            p if p == ports[0] => Ok(false),
            p if p == ports[1] => Ok(true),
            _ => Err(std::io::Error::from_raw_os_error(libc::EPERM)),
        });
        assert_eq!(
            o.closed_ports(),
            &BTreeSet::from([ports[1].clone(), ports[2].clone()])
        );
        assert!(!dir.join(format!("pods/{}.unreadable", ports[0])).exists());
        assert!(dir.join(format!("pods/{}.unreadable", ports[1])).is_file());
        // Set aside for good: the next start does not see it either.
        let mut again = Objects::new("n1", &dir);
        again.load_local();
        assert_eq!(again.cut_off(), 2);
        let _ = std::fs::remove_dir_all(dir);
    }

    /// Kubernetes mode: the watch delivering an earlier pod of a running pod's name (a
    /// StatefulSet's pod re-created before the watch caught up) does not give the running pod
    /// that pod's labels; its own object does.
    #[test]
    fn an_earlier_pod_of_the_name_from_the_watch_leaves_the_pods_labels_alone() {
        let (o, dir) = objects("u");
        let mut o = o.with_api_pods();
        let m = Metrics::default();
        let mut now = local(
            "web-0",
            "10.244.1.5",
            json!([{"key": "app", "value": "locked"}]),
        );
        now.pod.metadata.uid = Some("u-2".into());
        o.local_up(now.clone()).unwrap();
        let api = |uid: &str, app: &str| {
            json!({"metadata": {"name": "web-0", "namespace": "x", "uid": uid,
                                "labels": {"app": app}},
                   "spec": {"nodeName": "n1"}, "status": {"podIPs": [{"ip": "10.244.1.5"}]}})
        };
        let app = |o: &Objects| {
            let rec = o.cluster().pod(&PodKey::new("x", "web-0")).unwrap();
            rec.labels.get("app").cloned()
        };
        o.apply(PODS, DirEvent::Put(kv("x/web-0", api("u-1", "open"))), &m);
        assert_eq!(app(&o).as_deref(), Some("locked"));
        o.apply(
            PODS,
            DirEvent::Put(kv("x/web-0", api("u-2", "relabelled"))),
            &m,
        );
        assert_eq!(app(&o).as_deref(), Some("relabelled"));
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn other_nodes_pods_coming_and_going_are_moves_the_rest_is_not() {
        let (mut o, dir) = objects("m");
        let m = Metrics::default();
        for d in [POLICIES, NAMESPACES, PODS] {
            assert!(o.apply(d, DirEvent::Snapshot(vec![]), &m).others);
        }
        let pod = |ip: &str, app: &str| {
            json!({"metadata": {"name": "r", "namespace": "x", "labels": {"app": app}},
                   "spec": {"nodeName": "n2"}, "status": {"podIPs": [{"ip": ip}]}})
        };
        let out = o.apply(PODS, DirEvent::Put(kv("x/r", pod("10.244.2.9", "a"))), &m);
        assert!(out.changed && !out.others);
        assert!(matches!(&out.moves[..], [PodMove::Added(k)] if *k == PodKey::new("x", "r")));
        // The same record again changes nothing; another version of it is no move.
        assert!(
            !o.apply(PODS, DirEvent::Put(kv("x/r", pod("10.244.2.9", "a"))), &m)
                .changed
        );
        let out = o.apply(PODS, DirEvent::Put(kv("x/r", pod("10.244.2.9", "b"))), &m);
        assert!(out.changed && out.others && out.moves.is_empty());
        let out = o.apply(PODS, DirEvent::Delete("x/r".into()), &m);
        assert!(out.changed && !out.others);
        assert!(matches!(&out.moves[..], [PodMove::Removed(r)] if r.labels["app"] == "b"));
        let pol = json!({"metadata": {"name": "p", "namespace": "x"}, "spec": {"podSelector": {}}});
        let out = o.apply(POLICIES, DirEvent::Put(kv("x/p", pol)), &m);
        assert!(out.changed && out.others && out.moves.is_empty());
        let _ = std::fs::remove_dir_all(dir);
    }

    /// Kubernetes mode: another node's pod is created without a node and an address, bound,
    /// given its address, and finishes. Each step is the pod coming or going, never a change
    /// that needs a compile.
    #[test]
    fn another_nodes_pod_getting_its_address_and_finishing_are_moves() {
        let (mut o, dir) = objects("l");
        let m = Metrics::default();
        for d in [POLICIES, NAMESPACES, PODS] {
            o.apply(d, DirEvent::Snapshot(vec![]), &m);
        }
        let pod = |node: Option<&str>, ip: Option<&str>, phase: &str| {
            json!({"metadata": {"name": "r", "namespace": "x", "labels": {"app": "a"}},
                   "spec": {"nodeName": node},
                   "status": {"phase": phase, "podIPs": ip.map(|i| vec![json!({"ip": i})]).unwrap_or_default()}})
        };
        let key = PodKey::new("x", "r");
        for step in [pod(None, None, "Pending"), pod(Some("n2"), None, "Pending")] {
            let out = o.apply(PODS, DirEvent::Put(kv("x/r", step)), &m);
            assert!(out.changed && !out.others, "{out:?}");
            assert!(matches!(&out.moves[..], [PodMove::Added(k)] if *k == key));
            assert!(!o.cluster().pod(&key).unwrap().is_live());
        }
        let out = o.apply(
            PODS,
            DirEvent::Put(kv("x/r", pod(Some("n2"), Some("10.244.2.9"), "Running"))),
            &m,
        );
        assert!(out.changed && !out.others, "{out:?}");
        assert!(matches!(&out.moves[..], [PodMove::Added(k)] if *k == key));
        assert!(o.cluster().pod(&key).unwrap().is_live());
        let out = o.apply(
            PODS,
            DirEvent::Put(kv("x/r", pod(Some("n2"), Some("10.244.2.9"), "Succeeded"))),
            &m,
        );
        assert!(out.changed && !out.others, "{out:?}");
        assert!(matches!(&out.moves[..], [PodMove::Removed(r)] if r.is_live()));
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn the_cache_brings_back_the_last_state() {
        let (mut o, dir) = objects("c");
        let m = Metrics::default();
        let pol = json!({"metadata": {"name": "p", "namespace": "x"}, "spec": {"podSelector": {}}});
        o.apply(POLICIES, DirEvent::Snapshot(vec![kv("x/p", pol)]), &m);
        o.apply(
            NAMESPACES,
            DirEvent::Snapshot(vec![kv(
                "x",
                json!({"metadata": {"name": "x", "labels": {"team": "a"}}}),
            )]),
            &m,
        );
        crate::state::write_atomic(o.cache_path(), &o.cache_bytes().unwrap()).unwrap();
        let mut again = Objects::new("n1", &dir);
        assert!(!again.loaded());
        assert!(again.load_cache());
        assert!(again.loaded());
        assert_eq!(again.cluster().policies().count(), 1);
        assert_eq!(
            again
                .cluster()
                .namespace_labels("x")
                .get("team")
                .map(String::as_str),
            Some("a")
        );
        let _ = std::fs::remove_dir_all(dir);
    }
}
