//! JSON merge patch (RFC 7386) and strategic merge patch, for the parts of the Kubernetes
//! schema twill's clients touch.
//!
//! Strategic merge needs the schema's patch strategies: which lists merge by a key, which merge
//! as sets, and which are replaced. They are listed in `list_strategy` (from the
//! `patchStrategy`/`patchMergeKey` tags of k8s.io/api core/v1 and meta/v1); every other list is
//! replaced, as for a type without tags. Directives: `$patch` (replace, delete, merge),
//! `$deleteFromPrimitiveList/<field>`, `$setElementOrder/<field>` (accepted, order not
//! enforced) and `$retainKeys`.

use serde_json::{Map, Value};

use super::resource::Kind;

/// RFC 7386: objects merge recursively, `null` deletes, anything else replaces.
pub fn merge_patch(target: &mut Value, patch: &Value) {
    let Value::Object(p) = patch else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = Value::Object(Map::new());
    }
    let t = target.as_object_mut().expect("made an object above");
    for (k, v) in p {
        if v.is_null() {
            t.remove(k);
        } else {
            merge_patch(t.entry(k.clone()).or_insert(Value::Null), v);
        }
    }
}

#[derive(Debug, PartialEq)]
enum ListStrategy {
    Replace,
    /// Elements are objects matched by this key.
    MergeByKey(&'static str),
    /// A set of scalars: the patch's values are added.
    MergeSet,
}

/// `path` is the field path from the object's root, with `[]` for list elements.
fn list_strategy(kind: Kind, path: &str) -> ListStrategy {
    use ListStrategy::*;
    match (kind, path) {
        (_, "metadata.finalizers") => MergeSet,
        (_, "metadata.ownerReferences") => MergeByKey("uid"),
        (Kind::Node, "spec.podCIDRs") => MergeSet,
        (Kind::Node, "status.conditions") => MergeByKey("type"),
        (Kind::Node, "status.addresses") => MergeByKey("type"),
        (Kind::Namespace, "status.conditions") => MergeByKey("type"),
        (Kind::Pod, "spec.containers" | "spec.initContainers" | "spec.ephemeralContainers") => {
            MergeByKey("name")
        }
        (Kind::Pod, "spec.volumes" | "spec.imagePullSecrets") => MergeByKey("name"),
        (Kind::Pod, p) if p.ends_with("Containers[].env") || p.ends_with("containers[].env") => {
            MergeByKey("name")
        }
        (Kind::Pod, p) if p.ends_with("ontainers[].ports") => MergeByKey("containerPort"),
        (Kind::Pod, p) if p.ends_with("ontainers[].volumeMounts") => MergeByKey("mountPath"),
        (Kind::Pod, "status.conditions") => MergeByKey("type"),
        (Kind::Pod, "status.podIPs") => MergeByKey("ip"),
        _ => Replace,
    }
}

#[derive(Debug, thiserror::Error, PartialEq)]
#[error("{0}")]
pub struct PatchError(pub String);

/// Apply a strategic merge patch to `target` (an object of `kind`).
pub fn strategic_merge_patch(
    kind: Kind,
    target: &mut Value,
    patch: &Value,
) -> Result<(), PatchError> {
    if !patch.is_object() {
        return Err(PatchError(
            "a strategic merge patch must be a JSON object".into(),
        ));
    }
    merge_map(kind, "", target, patch)
}

fn join(path: &str, k: &str) -> String {
    if path.is_empty() {
        k.to_string()
    } else {
        format!("{path}.{k}")
    }
}

/// A patch value with its directives applied to nothing: what a new field or element becomes.
fn fresh(kind: Kind, path: &str, v: &Value) -> Result<Value, PatchError> {
    match v {
        Value::Object(_) => {
            let mut t = Value::Object(Map::new());
            merge_map(kind, path, &mut t, v)?;
            Ok(t)
        }
        Value::Array(items) => {
            let mut t = Value::Array(Vec::new());
            merge_list(kind, path, &mut t, items)?;
            Ok(t)
        }
        other => Ok(other.clone()),
    }
}

fn merge_map(kind: Kind, path: &str, target: &mut Value, patch: &Value) -> Result<(), PatchError> {
    let p = patch.as_object().expect("callers pass objects");
    match p.get("$patch").and_then(Value::as_str) {
        Some("replace") => {
            let mut rest = patch.clone();
            rest.as_object_mut().unwrap().remove("$patch");
            *target = fresh(kind, path, &rest)?;
            return Ok(());
        }
        Some("delete") => {
            *target = Value::Object(Map::new());
            return Ok(());
        }
        Some("merge") | None => {}
        Some(other) => return Err(PatchError(format!("unknown patch directive {other:?}"))),
    }
    if !target.is_object() {
        *target = Value::Object(Map::new());
    }
    if let Some(keep) = p.get("$retainKeys") {
        let keep: Vec<&str> = keep
            .as_array()
            .ok_or_else(|| PatchError("$retainKeys must be a list".into()))?
            .iter()
            .filter_map(Value::as_str)
            .collect();
        target
            .as_object_mut()
            .unwrap()
            .retain(|k, _| keep.contains(&k.as_str()));
    }
    for (k, v) in p {
        if k == "$patch" || k == "$retainKeys" || k.starts_with("$setElementOrder/") {
            continue;
        }
        let t = target.as_object_mut().unwrap();
        if let Some(field) = k.strip_prefix("$deleteFromPrimitiveList/") {
            let gone = v
                .as_array()
                .ok_or_else(|| PatchError(format!("{k} must be a list")))?;
            if let Some(Value::Array(items)) = t.get_mut(field) {
                items.retain(|i| !gone.contains(i));
            }
            continue;
        }
        if k.starts_with('$') {
            return Err(PatchError(format!("unknown patch directive {k:?}")));
        }
        let sub = join(path, k);
        match v {
            Value::Null => {
                t.remove(k);
            }
            Value::Object(_) => match t.get_mut(k) {
                Some(existing) if existing.is_object() => merge_map(kind, &sub, existing, v)?,
                _ => {
                    // `{"$patch": "delete"}` for a field that is not there: nothing to do.
                    if v.get("$patch").and_then(Value::as_str) == Some("delete") {
                        t.remove(k);
                    } else {
                        let new = fresh(kind, &sub, v)?;
                        t.insert(k.clone(), new);
                    }
                }
            },
            Value::Array(items) => {
                let existing = t.entry(k.clone()).or_insert(Value::Array(Vec::new()));
                if !existing.is_array() {
                    *existing = Value::Array(Vec::new());
                }
                merge_list(kind, &sub, existing, items)?;
            }
            other => {
                t.insert(k.clone(), other.clone());
            }
        }
    }
    Ok(())
}

fn merge_list(
    kind: Kind,
    path: &str,
    target: &mut Value,
    items: &[Value],
) -> Result<(), PatchError> {
    let elem_path = format!("{path}[]");
    // `[{"$patch": "replace"}, ...]`: the list becomes the other elements.
    let replace = items
        .iter()
        .any(|i| i.get("$patch").and_then(Value::as_str) == Some("replace"));
    let strategy = list_strategy(kind, path);
    let t = target.as_array_mut().expect("callers pass arrays");
    if replace || strategy == ListStrategy::Replace {
        let mut out = Vec::new();
        for i in items {
            if i.get("$patch").and_then(Value::as_str) == Some("replace") {
                continue;
            }
            out.push(fresh(kind, &elem_path, i)?);
        }
        *t = out;
        return Ok(());
    }
    match strategy {
        ListStrategy::MergeSet => {
            for i in items {
                if !t.contains(i) {
                    t.push(i.clone());
                }
            }
        }
        ListStrategy::MergeByKey(key) => {
            for i in items {
                let Some(id) = i.get(key) else {
                    return Err(PatchError(format!(
                        "map: {i} does not contain declared merge key: {key}"
                    )));
                };
                let pos = t.iter().position(|e| e.get(key) == Some(id));
                if i.get("$patch").and_then(Value::as_str) == Some("delete") {
                    t.retain(|e| e.get(key) != Some(id));
                    continue;
                }
                match pos {
                    Some(p) => merge_map(kind, &elem_path, &mut t[p], i)?,
                    None => t.push(fresh(kind, &elem_path, i)?),
                }
            }
        }
        ListStrategy::Replace => unreachable!("handled above"),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn rfc7386_examples() {
        // From RFC 7386 appendix A.
        let cases = [
            (json!({"a": "b"}), json!({"a": "c"}), json!({"a": "c"})),
            (
                json!({"a": "b"}),
                json!({"b": "c"}),
                json!({"a": "b", "b": "c"}),
            ),
            (json!({"a": "b"}), json!({"a": null}), json!({})),
            (json!({"a": ["b"]}), json!({"a": "c"}), json!({"a": "c"})),
            (
                json!({"a": {"b": "c"}}),
                json!({"a": {"b": "d", "c": null}}),
                json!({"a": {"b": "d"}}),
            ),
            (
                json!({"a": [{"b": "c"}]}),
                json!({"a": [1]}),
                json!({"a": [1]}),
            ),
            (json!(["a", "b"]), json!(["c", "d"]), json!(["c", "d"])),
            (
                json!({"e": null}),
                json!({"a": 1}),
                json!({"e": null, "a": 1}),
            ),
            (
                json!([1, 2]),
                json!({"a": "b", "c": null}),
                json!({"a": "b"}),
            ),
            (
                json!({}),
                json!({"a": {"bb": {"ccc": null}}}),
                json!({"a": {"bb": {}}}),
            ),
        ];
        for (mut t, p, want) in cases {
            merge_patch(&mut t, &p);
            assert_eq!(t, want, "patch {p}");
        }
    }

    #[test]
    fn conditions_merge_by_type_and_annotations_merge() {
        let mut node = json!({
            "metadata": {"name": "n1", "annotations": {"keep": "1", "drop": "2"}},
            "spec": {"podCIDR": "10.244.1.0/24", "podCIDRs": ["10.244.1.0/24"]},
            "status": {"conditions": [
                {"type": "Ready", "status": "True"},
                {"type": "NetworkUnavailable", "status": "True", "reason": "NoRouteCreated"}
            ]}
        });
        let patch = json!({
            "metadata": {"annotations": {"drop": null, "new": "3"}},
            "spec": {"podCIDRs": ["fd00::/64"]},
            "status": {"conditions": [
                {"type": "NetworkUnavailable", "status": "False", "reason": "TwillIsUp"}
            ]}
        });
        strategic_merge_patch(Kind::Node, &mut node, &patch).unwrap();
        assert_eq!(
            node["metadata"]["annotations"],
            json!({"keep": "1", "new": "3"})
        );
        assert_eq!(
            node["spec"]["podCIDRs"],
            json!(["10.244.1.0/24", "fd00::/64"])
        );
        assert_eq!(
            node["status"]["conditions"],
            json!([
                {"type": "Ready", "status": "True"},
                {"type": "NetworkUnavailable", "status": "False", "reason": "TwillIsUp"}
            ])
        );
        // The same body as a JSON merge patch replaces the whole list (kubelet's Ready is gone).
        let mut plain = json!({"status": {"conditions": [{"type": "Ready"}]}});
        merge_patch(
            &mut plain,
            &json!({"status": {"conditions": [{"type": "X"}]}}),
        );
        assert_eq!(plain["status"]["conditions"], json!([{"type": "X"}]));
    }

    #[test]
    fn directives() {
        let mut node = json!({
            "spec": {"podCIDRs": ["a", "b"], "taints": [{"key": "t"}]},
            "status": {"conditions": [{"type": "A"}, {"type": "B"}]}
        });
        let patch = json!({
            "spec": {"$deleteFromPrimitiveList/podCIDRs": ["a"], "$setElementOrder/podCIDRs": ["b"],
                     "taints": [{"key": "u"}]},
            "status": {"conditions": [{"type": "A", "$patch": "delete"}]}
        });
        strategic_merge_patch(Kind::Node, &mut node, &patch).unwrap();
        assert_eq!(node["spec"]["podCIDRs"], json!(["b"]));
        assert_eq!(
            node["spec"]["taints"],
            json!([{"key": "u"}]),
            "no strategy: replaced"
        );
        assert_eq!(node["status"]["conditions"], json!([{"type": "B"}]));
        let patch = json!({"status": {"conditions": [{"$patch": "replace"}, {"type": "C"}]}});
        strategic_merge_patch(Kind::Node, &mut node, &patch).unwrap();
        assert_eq!(node["status"]["conditions"], json!([{"type": "C"}]));
        let patch = json!({"status": {"$patch": "replace", "phase": "x"}});
        strategic_merge_patch(Kind::Node, &mut node, &patch).unwrap();
        assert_eq!(node["status"], json!({"phase": "x"}));
        let bad = json!({"status": {"conditions": [{"status": "no type"}]}});
        assert!(strategic_merge_patch(Kind::Node, &mut node, &bad).is_err());
        assert!(strategic_merge_patch(Kind::Node, &mut node, &json!([1])).is_err());
    }
}
