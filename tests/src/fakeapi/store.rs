//! The object store: one global resourceVersion counter, every change an event in a log that
//! watches replay from, and a compaction point below which resourceVersions are gone (410).

use std::collections::{BTreeMap, VecDeque};

use serde_json::{json, Value};
use tokio::sync::mpsc;

use super::resource::{meta_str, Key, Kind};
use super::selector::{FieldSelector, LabelSelector};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EventType {
    Added,
    Modified,
    Deleted,
}

impl EventType {
    pub fn as_str(self) -> &'static str {
        match self {
            EventType::Added => "ADDED",
            EventType::Modified => "MODIFIED",
            EventType::Deleted => "DELETED",
        }
    }
}

/// One change. `object` is the object after it (for a delete: as it was, with the delete's
/// resourceVersion); `prev` is the object before it, so the store can go back in time.
#[derive(Clone, Debug)]
pub struct Change {
    pub rv: u64,
    pub key: Key,
    pub typ: EventType,
    pub object: Value,
    pub prev: Option<Value>,
}

/// What a watch (or list) selects.
#[derive(Clone, Debug, Default)]
pub struct Filter {
    pub namespace: Option<String>,
    pub labels: LabelSelector,
    pub fields: FieldSelector,
}

impl Filter {
    pub fn matches(&self, kind: Kind, obj: &Value) -> bool {
        if let Some(ns) = &self.namespace {
            if meta_str(obj, "namespace") != Some(ns.as_str()) {
                return false;
            }
        }
        self.labels.matches(obj) && self.fields.matches(kind, obj)
    }
}

/// A watch event as sent on the wire (object carries kind and apiVersion).
#[derive(Clone, Debug)]
pub struct WatchItem {
    pub typ: EventType,
    pub object: Value,
}

struct Watcher {
    kind: Kind,
    filter: Filter,
    tx: mpsc::UnboundedSender<WatchItem>,
}

/// Why the store refused something; the server turns these into Status answers.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum StoreError {
    #[error("{kind} \"{name}\" not found")]
    NotFound { kind: &'static str, name: String },
    #[error("{kind} \"{name}\" already exists")]
    AlreadyExists { kind: &'static str, name: String },
    #[error("Operation cannot be fulfilled on {kind} \"{name}\": the object has been modified; please apply your changes to the latest version and try again")]
    Conflict { kind: &'static str, name: String },
    #[error("{0}")]
    Gone(String),
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    TooLarge(String),
}

pub struct Store {
    rv: u64,
    /// resourceVersions below this are compacted away.
    compacted: u64,
    uid: u64,
    objects: BTreeMap<Key, Value>,
    log: VecDeque<Change>,
    watchers: Vec<Watcher>,
}

/// With kind and apiVersion, as single objects and watch events carry them.
pub fn with_type(kind: Kind, obj: &Value) -> Value {
    let mut o = obj.clone();
    if let Value::Object(m) = &mut o {
        m.insert("apiVersion".into(), kind.api_version().into());
        m.insert("kind".into(), kind.kind().into());
    }
    o
}

/// Without kind and apiVersion, as list items come from the real server.
fn without_type(obj: &Value) -> Value {
    let mut o = obj.clone();
    if let Value::Object(m) = &mut o {
        m.remove("apiVersion");
        m.remove("kind");
    }
    o
}

fn set_meta(obj: &mut Value, field: &str, v: Value) {
    if !obj.get("metadata").is_some_and(Value::is_object) {
        obj["metadata"] = json!({});
    }
    obj["metadata"][field] = v;
}

/// RFC 3339 in UTC, as metav1.Time.
pub fn now_rfc3339() -> String {
    rfc3339(unix_now())
}

pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

pub fn rfc3339(secs: u64) -> String {
    let (days, rem) = (secs / 86400, secs % 86400);
    // Civil from days (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// A page of a list, at one resourceVersion.
pub struct Page {
    pub rv: u64,
    pub items: Vec<Value>,
    pub continue_token: Option<String>,
    pub remaining: Option<u64>,
}

fn encode_continue(rv: u64, key: &Key) -> String {
    let hex = |s: &str| s.bytes().map(|b| format!("{b:02x}")).collect::<String>();
    format!("c1.{rv}.{}.{}", hex(&key.namespace), hex(&key.name))
}

fn decode_continue(token: &str) -> Option<(u64, String, String)> {
    let unhex = |s: &str| -> Option<String> {
        let bytes: Option<Vec<u8>> = (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
            .collect();
        String::from_utf8(bytes?).ok()
    };
    let mut parts = token.split('.');
    if parts.next()? != "c1" {
        return None;
    }
    let rv = parts.next()?.parse().ok()?;
    let ns = unhex(parts.next()?)?;
    let name = unhex(parts.next()?)?;
    Some((rv, ns, name))
}

pub fn too_old(rv: u64, compacted: u64) -> StoreError {
    StoreError::Gone(format!("too old resource version: {rv} ({compacted})"))
}

impl Default for Store {
    fn default() -> Self {
        Store {
            // Real clusters start far from 0; a client must not assume small numbers.
            rv: 1000,
            compacted: 0,
            uid: 0,
            objects: BTreeMap::new(),
            log: VecDeque::new(),
            watchers: Vec::new(),
        }
    }
}

impl Store {
    pub fn resource_version(&self) -> u64 {
        self.rv
    }

    pub fn compacted(&self) -> u64 {
        self.compacted
    }

    /// Forget every change at or below `rv` (at most the current one): older resourceVersions
    /// answer 410 Gone from now on.
    pub fn compact_to(&mut self, rv: u64) {
        let rv = rv.min(self.rv);
        if rv <= self.compacted {
            return;
        }
        self.compacted = rv;
        while self.log.front().is_some_and(|c| c.rv <= rv) {
            self.log.pop_front();
        }
    }

    pub fn get(&self, key: &Key) -> Option<&Value> {
        self.objects.get(key)
    }

    pub fn objects(&self, kind: Kind) -> impl Iterator<Item = (&Key, &Value)> {
        self.objects.iter().filter(move |(k, _)| k.kind == kind)
    }

    fn next_rv(&mut self) -> u64 {
        self.rv += 1;
        self.rv
    }

    fn publish(&mut self, change: Change) {
        self.watchers.retain(|w| !w.tx.is_closed());
        for w in &self.watchers {
            if w.kind != change.key.kind {
                continue;
            }
            if let Some(item) = watch_item(w.kind, &w.filter, &change) {
                let _ = w.tx.send(item);
            }
        }
        self.log.push_back(change);
    }

    /// Store a new object: uid, creationTimestamp and resourceVersion are set here.
    pub fn create(&mut self, kind: Kind, mut obj: Value) -> Result<Value, StoreError> {
        let name = meta_str(&obj, "name").unwrap_or_default().to_string();
        if name.is_empty() {
            return Err(StoreError::Invalid(format!(
                "{} is invalid: metadata.name: Required value: name or generateName is required",
                kind.kind()
            )));
        }
        let ns = meta_str(&obj, "namespace").unwrap_or_default().to_string();
        if kind.namespaced() {
            if ns.is_empty() {
                return Err(StoreError::Invalid(format!(
                    "{} {name:?} is invalid: metadata.namespace: Required value",
                    kind.kind()
                )));
            }
            // The NamespaceLifecycle admission plugin's answer.
            let ns_key = Key::new(Kind::Namespace, "", &ns);
            if !self.objects.contains_key(&ns_key) {
                return Err(StoreError::NotFound {
                    kind: "namespaces",
                    name: ns,
                });
            }
        } else if let Some(m) = obj.get_mut("metadata").and_then(Value::as_object_mut) {
            m.remove("namespace");
        }
        let key = Key::new(kind, &ns, &name);
        if self.objects.contains_key(&key) {
            return Err(StoreError::AlreadyExists {
                kind: kind.plural(),
                name,
            });
        }
        kind.check_shape(&obj).map_err(StoreError::Invalid)?;
        self.uid += 1;
        let rv = self.next_rv();
        set_meta(
            &mut obj,
            "uid",
            format!("fa4e0000-0000-4000-8000-{:012x}", self.uid).into(),
        );
        set_meta(&mut obj, "creationTimestamp", now_rfc3339().into());
        set_meta(&mut obj, "resourceVersion", rv.to_string().into());
        if let Some(m) = obj.get_mut("metadata").and_then(Value::as_object_mut) {
            m.remove("deletionTimestamp");
            m.remove("generateName");
        }
        if kind == Kind::Namespace && obj.pointer("/status/phase").is_none() {
            obj["status"] = json!({"phase": "Active"});
        }
        let obj = without_type(&obj);
        self.objects.insert(key.clone(), obj.clone());
        self.publish(Change {
            rv,
            key,
            typ: EventType::Added,
            object: obj.clone(),
            prev: None,
        });
        Ok(obj)
    }

    /// Replace an object with `new` (already patched or updated by the caller). A write that
    /// changes nothing is no write: no new resourceVersion, no event (as the real server).
    /// Returns the stored object and whether it changed.
    pub fn update(&mut self, key: &Key, new: Value) -> Result<(Value, bool), StoreError> {
        let old = self
            .objects
            .get(key)
            .cloned()
            .ok_or_else(|| StoreError::NotFound {
                kind: key.kind.plural(),
                name: key.name.clone(),
            })?;
        let mut new = without_type(&new);
        // Immutable metadata comes from the stored object.
        for f in [
            "name",
            "namespace",
            "uid",
            "creationTimestamp",
            "resourceVersion",
        ] {
            match old.get("metadata").and_then(|m| m.get(f)) {
                Some(v) => set_meta(&mut new, f, v.clone()),
                None => {
                    if let Some(m) = new.get_mut("metadata").and_then(Value::as_object_mut) {
                        m.remove(f);
                    }
                }
            }
        }
        key.kind.check_shape(&new).map_err(StoreError::Invalid)?;
        if new == old {
            return Ok((old, false));
        }
        let rv = self.next_rv();
        set_meta(&mut new, "resourceVersion", rv.to_string().into());
        self.objects.insert(key.clone(), new.clone());
        self.publish(Change {
            rv,
            key: key.clone(),
            typ: EventType::Modified,
            object: new.clone(),
            prev: Some(old),
        });
        Ok((new, true))
    }

    /// Remove an object at once (no finalizers, no grace period). Deleting a namespace deletes
    /// what is in it first, as the namespace controller would (eventually).
    pub fn delete(&mut self, key: &Key) -> Result<Value, StoreError> {
        if key.kind == Kind::Namespace {
            let inside: Vec<Key> = self
                .objects
                .keys()
                .filter(|k| k.kind.namespaced() && k.namespace == key.name)
                .cloned()
                .collect();
            if self.objects.contains_key(key) {
                for k in inside {
                    self.delete(&k)?;
                }
            }
        }
        let old = self
            .objects
            .remove(key)
            .ok_or_else(|| StoreError::NotFound {
                kind: key.kind.plural(),
                name: key.name.clone(),
            })?;
        let rv = self.next_rv();
        let mut gone = old.clone();
        set_meta(&mut gone, "resourceVersion", rv.to_string().into());
        self.publish(Change {
            rv,
            key: key.clone(),
            typ: EventType::Deleted,
            object: gone.clone(),
            prev: Some(old),
        });
        Ok(gone)
    }

    /// The objects of `kind` as they were at `rv` (compacted <= rv <= current).
    fn state_at(&self, kind: Kind, rv: u64) -> BTreeMap<Key, Value> {
        let mut state: BTreeMap<Key, Value> = self
            .objects(kind)
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        for c in self.log.iter().rev().take_while(|c| c.rv > rv) {
            if c.key.kind != kind {
                continue;
            }
            match &c.prev {
                Some(p) => state.insert(c.key.clone(), p.clone()),
                None => state.remove(&c.key),
            };
        }
        state
    }

    /// A list: `rv` with `exact` is resourceVersionMatch=Exact; a continue token lists the
    /// rest at the token's resourceVersion. Other resourceVersions are served at the current
    /// state (NotOlderThan), as the real server's watch cache does.
    pub fn list(
        &self,
        kind: Kind,
        filter: &Filter,
        rv: Option<u64>,
        exact: bool,
        limit: Option<usize>,
        continue_token: Option<&str>,
    ) -> Result<Page, StoreError> {
        let (at, after) = match continue_token {
            Some(token) => {
                let (rv, ns, name) = decode_continue(token).ok_or_else(|| {
                    StoreError::Invalid(format!("invalid continue token {token:?}"))
                })?;
                if rv < self.compacted {
                    return Err(StoreError::Gone(
                        "The provided continue parameter is too old to display a consistent list \
                         result. You can start a new list without the continue parameter, or use \
                         the continue token in this response to retrieve the remainder of the \
                         results. Continuing with the provided token results in an inconsistent \
                         list - objects that were created, modified, or deleted between the time \
                         the first chunk was returned and now may show up in the list."
                            .into(),
                    ));
                }
                (rv, Some(Key::new(kind, &ns, &name)))
            }
            None => match rv {
                Some(rv) if rv > self.rv => {
                    return Err(StoreError::TooLarge(format!(
                        "Too large resource version: {rv}, current: {}",
                        self.rv
                    )))
                }
                Some(rv) if exact && rv < self.compacted => {
                    return Err(too_old(rv, self.compacted))
                }
                Some(rv) if exact => (rv, None),
                _ => (self.rv, None),
            },
        };
        let state = if at == self.rv {
            self.objects(kind)
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect()
        } else {
            self.state_at(kind, at)
        };
        let matching: Vec<(Key, Value)> = state
            .into_iter()
            .filter(|(k, _)| after.as_ref().is_none_or(|a| k > a))
            .filter(|(_, v)| filter.matches(kind, v))
            .collect();
        let total = matching.len();
        let take = limit.filter(|&l| l > 0).unwrap_or(total).min(total);
        let continue_token = (take < total).then(|| encode_continue(at, &matching[take - 1].0));
        let remaining = (take < total).then_some((total - take) as u64);
        Ok(Page {
            rv: at,
            items: matching.into_iter().take(take).map(|(_, v)| v).collect(),
            continue_token,
            remaining,
        })
    }

    /// Start a watch from `rv` (None: the current state as ADDED events, then changes).
    /// Returns the events to replay; later ones arrive on the returned channel.
    pub fn watch(
        &mut self,
        kind: Kind,
        filter: Filter,
        rv: Option<u64>,
    ) -> Result<(Vec<WatchItem>, mpsc::UnboundedReceiver<WatchItem>), StoreError> {
        let replay = match rv {
            None => self
                .objects(kind)
                .filter(|(_, v)| filter.matches(kind, v))
                .map(|(_, v)| WatchItem {
                    typ: EventType::Added,
                    object: with_type(kind, v),
                })
                .collect(),
            Some(rv) if rv < self.compacted => return Err(too_old(rv, self.compacted)),
            Some(rv) if rv > self.rv => {
                return Err(StoreError::TooLarge(format!(
                    "Too large resource version: {rv}, current: {}",
                    self.rv
                )))
            }
            Some(rv) => self
                .log
                .iter()
                .filter(|c| c.rv > rv && c.key.kind == kind)
                .filter_map(|c| watch_item(kind, &filter, c))
                .collect(),
        };
        let (tx, rx) = mpsc::unbounded_channel();
        self.watchers.push(Watcher { kind, filter, tx });
        Ok((replay, rx))
    }

    /// Open watches (those whose client is still there).
    pub fn open_watches(&mut self) -> usize {
        self.watchers.retain(|w| !w.tx.is_closed());
        self.watchers.len()
    }
}

/// A change as one watch sees it: an object that starts (stops) matching the watch's selectors
/// arrives as ADDED (DELETED), as with the real server.
fn watch_item(kind: Kind, filter: &Filter, c: &Change) -> Option<WatchItem> {
    let now = filter.matches(kind, &c.object);
    let before = c.prev.as_ref().is_some_and(|p| filter.matches(kind, p));
    let typ = match (c.typ, before, now) {
        (EventType::Deleted, true, _) => EventType::Deleted,
        (EventType::Deleted, false, _) => return None,
        (_, true, true) => EventType::Modified,
        (_, false, true) => EventType::Added,
        (_, true, false) => EventType::Deleted,
        (_, false, false) => return None,
    };
    Some(WatchItem {
        typ,
        object: with_type(kind, &c.object),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(name: &str) -> Value {
        json!({"metadata": {"name": name}, "spec": {}})
    }

    #[test]
    fn lists_at_a_past_version_and_pages() {
        let mut s = Store::default();
        for n in ["a", "b", "c"] {
            s.create(Kind::Node, node(n)).unwrap();
        }
        let at = s.resource_version();
        let f = Filter::default();
        let p1 = s.list(Kind::Node, &f, None, false, Some(2), None).unwrap();
        assert_eq!(p1.items.len(), 2);
        assert_eq!(p1.remaining, Some(1));
        let token = p1.continue_token.unwrap();
        // Changes between pages do not show: the rest is served at the first page's version.
        s.delete(&Key::new(Kind::Node, "", "c")).unwrap();
        s.create(Kind::Node, node("d")).unwrap();
        let p2 = s
            .list(Kind::Node, &f, None, false, Some(2), Some(&token))
            .unwrap();
        assert_eq!(p2.rv, at);
        let names: Vec<_> = p2
            .items
            .iter()
            .map(|i| meta_str(i, "name").unwrap())
            .collect();
        assert_eq!(names, ["c"]);
        assert!(p2.continue_token.is_none());
        // Exact at the old version, then compacted: 410.
        let old = s.list(Kind::Node, &f, Some(at), true, None, None).unwrap();
        assert_eq!(old.items.len(), 3);
        s.compact_to(s.resource_version());
        assert!(matches!(
            s.list(Kind::Node, &f, Some(at), true, None, None),
            Err(StoreError::Gone(_))
        ));
        assert!(matches!(
            s.list(Kind::Node, &f, None, false, None, Some(&token)),
            Err(StoreError::Gone(_))
        ));
        // NotOlderThan with an old version is served from the current state.
        assert_eq!(
            s.list(Kind::Node, &f, Some(at), false, None, None)
                .unwrap()
                .items
                .len(),
            3
        );
    }

    #[test]
    fn watch_replays_and_translates_selector_moves() {
        let mut s = Store::default();
        s.create(Kind::Namespace, json!({"metadata": {"name": "ns"}}))
            .unwrap();
        let pod =
            |l: &str| json!({"metadata": {"name": "p", "namespace": "ns", "labels": {"app": l}}});
        s.create(Kind::Pod, pod("a")).unwrap();
        let from = s.resource_version();
        let key = Key::new(Kind::Pod, "ns", "p");
        s.update(&key, pod("b")).unwrap();
        s.update(&key, pod("a")).unwrap();
        let filter = Filter {
            labels: LabelSelector::parse("app=a").unwrap(),
            ..Default::default()
        };
        let (replay, _rx) = s.watch(Kind::Pod, filter, Some(from)).unwrap();
        let types: Vec<_> = replay.iter().map(|i| i.typ).collect();
        assert_eq!(types, [EventType::Deleted, EventType::Added]);
        assert_eq!(replay[0].object["kind"], "Pod");
        // A no-op update is no write.
        let rv = s.resource_version();
        let (_, changed) = s.update(&key, pod("a")).unwrap();
        assert!(!changed);
        assert_eq!(s.resource_version(), rv);
        s.compact_to(rv);
        assert!(s.watch(Kind::Pod, Filter::default(), Some(from)).is_err());
    }

    #[test]
    fn timestamps_are_rfc3339() {
        let t = now_rfc3339();
        assert_eq!(t.len(), 20, "{t}");
        assert!(t.starts_with("20") && t.ends_with('Z'), "{t}");
    }
}
