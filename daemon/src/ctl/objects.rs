//! twillctl's objects: documents read from YAML or JSON, validated by the engine's own rules,
//! and kept in etcd where twilld reads them.

use std::collections::BTreeMap;
use std::io::Read;

use anyhow::{bail, Context, Result};
use netpol::api::{Namespace, NetworkPolicy, Pod};
use netpol::model::Cluster;
use netpol::validate::{label_value, qualified_name, validate_namespace, validate_network_policy};
use serde::Deserialize;
use serde_json::{json, Value};
use twill_daemon::policy::{NAMESPACES, PODS, POLICIES};
use twill_daemon::registry::etcd::EtcdRegistry;
use twill_daemon::registry::objects::ObjectStore;

use super::Kind;

/// Every document in `file` (- for stdin): YAML (JSON is YAML too), several separated by `---`,
/// `kind: List` expanded.
pub fn read_documents(file: &str) -> Result<Vec<Value>> {
    let text = if file == "-" {
        let mut s = String::new();
        std::io::stdin()
            .read_to_string(&mut s)
            .context("reading standard input")?;
        s
    } else {
        std::fs::read_to_string(file).with_context(|| format!("reading {file}"))?
    };
    let mut out = Vec::new();
    for (i, doc) in serde_norway::Deserializer::from_str(&text).enumerate() {
        let v = Value::deserialize(doc).with_context(|| format!("{file}: document {}", i + 1))?;
        match v {
            Value::Null => {}
            v if v.get("kind").and_then(Value::as_str) == Some("List") => {
                let items = v
                    .get("items")
                    .and_then(Value::as_array)
                    .cloned()
                    .unwrap_or_default();
                out.extend(items);
            }
            v => out.push(v),
        }
    }
    if out.is_empty() {
        bail!("{file}: no documents");
    }
    Ok(out)
}

/// A validated object to write.
enum Obj {
    Policy(Box<NetworkPolicy>),
    Namespace(Namespace),
}

fn parse(i: usize, v: &Value) -> Result<Obj, String> {
    let kind = v.get("kind").and_then(Value::as_str).unwrap_or("");
    let name = v
        .pointer("/metadata/name")
        .and_then(Value::as_str)
        .unwrap_or("?");
    let at = format!("document {} ({kind} {name})", i + 1);
    let errors = |e: netpol::validate::ValidationErrors| {
        format!(
            "{at}: {}",
            e.0.iter()
                .map(|x| format!("{}: {}", x.field, x.message))
                .collect::<Vec<_>>()
                .join("; ")
        )
    };
    match kind {
        "NetworkPolicy" => {
            let mut p: NetworkPolicy =
                serde_json::from_value(v.clone()).map_err(|e| format!("{at}: {e}"))?;
            if p.metadata.namespace.is_none() {
                p.metadata.namespace = Some("default".into());
            }
            validate_network_policy(&p).map_err(errors)?;
            Ok(Obj::Policy(Box::new(p)))
        }
        "Namespace" => {
            let n: Namespace =
                serde_json::from_value(v.clone()).map_err(|e| format!("{at}: {e}"))?;
            validate_namespace(&n).map_err(errors)?;
            Ok(Obj::Namespace(n))
        }
        "" => Err(format!("{at}: kind: missing (NetworkPolicy or Namespace)")),
        other => Err(format!(
            "{at}: kind: {other:?} is not one twillctl applies (NetworkPolicy, Namespace)"
        )),
    }
}

/// (kind, namespace, name) of each document, for `delete -f`.
pub fn targets_of(docs: Vec<Value>) -> Result<Vec<(Kind, String, String)>> {
    let mut out = Vec::new();
    for (i, v) in docs.iter().enumerate() {
        match parse(i, v).map_err(anyhow::Error::msg)? {
            Obj::Policy(p) => out.push((
                Kind::Policies,
                p.metadata.namespace.clone().unwrap_or_default(),
                p.metadata.name.clone(),
            )),
            Obj::Namespace(n) => out.push((Kind::Namespaces, String::new(), n.metadata.name)),
        }
    }
    Ok(out)
}

pub enum LabelChange {
    Set(String, String),
    Remove(String),
}

/// `key=value` sets, `key-` removes; both checked as Kubernetes checks labels.
pub fn parse_label_args(args: &[String]) -> Result<Vec<LabelChange>> {
    args.iter()
        .map(|a| {
            if let Some((k, v)) = a.split_once('=') {
                if let Some(why) = qualified_name(k) {
                    bail!("label key {k:?}: {why}");
                }
                if let Some(why) = label_value(v) {
                    bail!("label value {v:?}: {why}");
                }
                Ok(LabelChange::Set(k.into(), v.into()))
            } else if let Some(k) = a.strip_suffix('-') {
                if let Some(why) = qualified_name(k) {
                    bail!("label key {k:?}: {why}");
                }
                Ok(LabelChange::Remove(k.into()))
            } else {
                bail!("{a:?}: expected key=value or key-")
            }
        })
        .collect()
}

pub struct Store {
    reg: EtcdRegistry,
}

fn dir_of(k: Kind) -> &'static str {
    match k {
        Kind::Policies => POLICIES,
        Kind::Pods => PODS,
        Kind::Namespaces => NAMESPACES,
    }
}

impl Store {
    pub fn new(reg: EtcdRegistry) -> Store {
        Store { reg }
    }

    /// Validates every document, then writes them; returns a line per object.
    pub async fn apply(&self, docs: Vec<Value>) -> Result<Vec<String>> {
        let mut objs = Vec::new();
        let mut errors = Vec::new();
        for (i, v) in docs.iter().enumerate() {
            match parse(i, v) {
                Ok(o) => objs.push(o),
                Err(e) => errors.push(e),
            }
        }
        if !errors.is_empty() {
            bail!("nothing applied:\n  {}", errors.join("\n  "));
        }
        let mut out = Vec::new();
        for o in objs {
            let (dir, key, what, value) = match o {
                Obj::Policy(p) => (
                    POLICIES,
                    format!(
                        "{}/{}",
                        p.metadata.namespace.as_deref().unwrap_or_default(),
                        p.metadata.name
                    ),
                    "networkpolicy",
                    serde_json::to_vec(&with_kind(&*p, "networking.k8s.io/v1", "NetworkPolicy"))?,
                ),
                Obj::Namespace(n) => (
                    NAMESPACES,
                    n.metadata.name.clone(),
                    "namespace",
                    serde_json::to_vec(&with_kind(&n, "v1", "Namespace"))?,
                ),
            };
            let existed = self.reg.get(dir, &key).await?;
            let verb = match &existed {
                Some(e) if e.value == value => "unchanged",
                Some(_) => "configured",
                None => "created",
            };
            if verb != "unchanged" {
                self.reg.put(dir, &key, &value).await?;
            }
            out.push(format!("{what} {key} {verb}"));
        }
        Ok(out)
    }

    pub async fn get(
        &self,
        kind: Kind,
        ns: Option<&str>,
        name: Option<&str>,
    ) -> Result<Vec<Value>> {
        let (kvs, _) = self.reg.list(dir_of(kind)).await?;
        let mut out = Vec::new();
        for kv in kvs {
            let (k_ns, k_name) = match kind {
                Kind::Namespaces => ("", kv.key.as_str()),
                _ => kv.key.split_once('/').unwrap_or(("", kv.key.as_str())),
            };
            if ns.is_some_and(|n| n != k_ns) || name.is_some_and(|n| n != k_name) {
                continue;
            }
            match serde_json::from_slice::<Value>(&kv.value) {
                Ok(v) => out.push(v),
                Err(e) => eprintln!("twillctl: skipping {}: not JSON: {e}", kv.key),
            }
        }
        if let (Some(n), true) = (name, out.is_empty()) {
            bail!("{} {n:?} not found", dir_of(kind));
        }
        Ok(out)
    }

    pub async fn delete(&self, targets: Vec<(Kind, String, String)>) -> Result<Vec<String>> {
        let mut out = Vec::new();
        for (kind, ns, name) in targets {
            let key = match kind {
                Kind::Namespaces => name,
                _ => format!("{ns}/{name}"),
            };
            let found = self.reg.delete(dir_of(kind), &key).await?;
            let what = match kind {
                Kind::Policies => "networkpolicy",
                Kind::Pods => "pod",
                Kind::Namespaces => "namespace",
            };
            out.push(format!(
                "{what} {key} {}",
                if found { "deleted" } else { "not found" }
            ));
        }
        Ok(out)
    }

    pub async fn label(
        &self,
        pod: bool,
        ns: &str,
        name: &str,
        changes: &[LabelChange],
        overwrite: bool,
    ) -> Result<String> {
        let (dir, key) = if pod {
            (PODS, format!("{ns}/{name}"))
        } else {
            (NAMESPACES, name.to_string())
        };
        let mut v: Value = match self.reg.get(dir, &key).await? {
            Some(kv) => serde_json::from_slice(&kv.value)
                .with_context(|| format!("{dir}/{key} is not JSON"))?,
            // A namespace with no object yet exists for its pods: make one.
            None if !pod => {
                json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}})
            }
            None => bail!("no pod record {key} (pods are recorded by twilld when they start)"),
        };
        let labels = v
            .pointer_mut("/metadata")
            .and_then(Value::as_object_mut)
            .context("no metadata")?
            .entry("labels")
            .or_insert_with(|| json!({}));
        let labels = labels
            .as_object_mut()
            .context("metadata.labels is not a map")?;
        for c in changes {
            match c {
                LabelChange::Set(k, val) => {
                    if let Some(old) = labels.get(k).and_then(Value::as_str) {
                        if old != val && !overwrite {
                            bail!("{k} is already {old:?} (--overwrite to change it)");
                        }
                    }
                    labels.insert(k.clone(), json!(val));
                }
                LabelChange::Remove(k) => {
                    labels.remove(k);
                }
            }
        }
        self.reg.put(dir, &key, &serde_json::to_vec(&v)?).await?;
        Ok(format!(
            "{} {key} labeled",
            if pod { "pod" } else { "namespace" }
        ))
    }

    /// The cluster as twilld sees it (invalid objects skipped with a note on stderr).
    pub async fn cluster(&self) -> Result<Cluster> {
        let mut c = Cluster::new();
        for (dir, kvs) in [
            (NAMESPACES, self.reg.list(NAMESPACES).await?.0),
            (PODS, self.reg.list(PODS).await?.0),
            (POLICIES, self.reg.list(POLICIES).await?.0),
        ] {
            for kv in kvs {
                let res: Result<(), String> = match dir {
                    NAMESPACES => serde_json::from_slice::<Namespace>(&kv.value)
                        .map_err(|e| e.to_string())
                        .and_then(|n| c.upsert_namespace(&n).map_err(|e| format!("{e:?}"))),
                    PODS => serde_json::from_slice::<Pod>(&kv.value)
                        .map_err(|e| e.to_string())
                        .and_then(|p| c.upsert_pod(&p).map(drop).map_err(|e| format!("{e:?}"))),
                    _ => serde_json::from_slice::<NetworkPolicy>(&kv.value)
                        .map_err(|e| e.to_string())
                        .and_then(|p| c.upsert_policy(p).map(drop).map_err(|e| format!("{e:?}"))),
                };
                if let Err(e) = res {
                    eprintln!("twillctl: skipping {dir}/{}: {e}", kv.key);
                }
            }
        }
        Ok(c)
    }
}

fn with_kind<T: serde::Serialize>(o: &T, api: &str, kind: &str) -> Value {
    let mut v = serde_json::to_value(o).unwrap_or(Value::Null);
    if let Some(m) = v.as_object_mut() {
        m.insert("apiVersion".into(), json!(api));
        m.insert("kind".into(), json!(kind));
    }
    v
}

pub fn list_doc(items: &[Value]) -> Value {
    json!({"apiVersion": "v1", "kind": "List", "items": items})
}

fn labels_of(v: &Value) -> String {
    let l: BTreeMap<String, Value> = v
        .pointer("/metadata/labels")
        .and_then(|l| serde_json::from_value(l.clone()).ok())
        .unwrap_or_default();
    if l.is_empty() {
        return "<none>".into();
    }
    l.iter()
        .map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or_default()))
        .collect::<Vec<_>>()
        .join(",")
}

/// Columns per kind, as people read them.
pub fn table(kind: Kind, items: &[Value]) -> String {
    let s = |v: &Value, p: &str| {
        v.pointer(p)
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string()
    };
    let rows: Vec<Vec<String>> = items
        .iter()
        .map(|v| match kind {
            Kind::Policies => vec![
                s(v, "/metadata/namespace"),
                s(v, "/metadata/name"),
                v.pointer("/spec/podSelector")
                    .map(|p| {
                        if p == &json!({}) {
                            "<all>".into()
                        } else {
                            p.to_string()
                        }
                    })
                    .unwrap_or_default(),
                v.pointer("/spec/policyTypes")
                    .and_then(Value::as_array)
                    .map(|t| {
                        t.iter()
                            .filter_map(Value::as_str)
                            .collect::<Vec<_>>()
                            .join(",")
                    })
                    .unwrap_or_else(|| "(default)".into()),
            ],
            Kind::Pods => vec![
                s(v, "/metadata/namespace"),
                s(v, "/metadata/name"),
                s(v, "/spec/nodeName"),
                s(v, "/status/podIP"),
                labels_of(v),
            ],
            Kind::Namespaces => vec![s(v, "/metadata/name"), labels_of(v)],
        })
        .collect();
    let head: Vec<&str> = match kind {
        Kind::Policies => vec!["NAMESPACE", "NAME", "POD-SELECTOR", "POLICY-TYPES"],
        Kind::Pods => vec!["NAMESPACE", "NAME", "NODE", "IP", "LABELS"],
        Kind::Namespaces => vec!["NAME", "LABELS"],
    };
    let mut widths: Vec<usize> = head.iter().map(|h| h.len()).collect();
    for r in &rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.len());
        }
    }
    let line = |cells: Vec<&str>| {
        let mut l = cells
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect::<Vec<_>>()
            .join("  ");
        l.truncate(l.trim_end().len());
        l + "\n"
    };
    let mut out = line(head.clone());
    for r in &rows {
        out.push_str(&line(r.iter().map(String::as_str).collect()));
    }
    out
}
