//! Who a client is (bearer tokens) and what it may do: the ClusterRoles and ClusterRoleBindings
//! of a manifest (the shipped `deploy/kubernetes/twill.yaml`), evaluated like the RBAC
//! authorizer does for the requests the fake serves: verb × API group × resource[/subresource]
//! × resource name.

use std::collections::BTreeMap;
use std::path::Path;

use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, PolicyRule};
use serde::Deserialize;

/// A client identity and its rules (the union of the roles bound to it).
#[derive(Clone, Debug)]
pub struct Identity {
    pub user: String,
    pub rules: Vec<PolicyRule>,
}

/// What a request wants, in RBAC's terms.
#[derive(Clone, Debug, PartialEq)]
pub struct Attributes {
    pub verb: String,
    pub group: String,
    pub resource: String,
    pub subresource: Option<String>,
    pub name: Option<String>,
    pub namespace: Option<String>,
}

fn has(list: &[String], want: &str) -> bool {
    list.iter().any(|v| v == "*" || v == want)
}

fn rule_allows(rule: &PolicyRule, a: &Attributes) -> bool {
    if !has(&rule.verbs, &a.verb) {
        return false;
    }
    if !has(rule.api_groups.as_deref().unwrap_or_default(), &a.group) {
        return false;
    }
    let resources = rule.resources.as_deref().unwrap_or_default();
    let res_ok = match &a.subresource {
        None => has(resources, &a.resource),
        Some(sub) => resources.iter().any(|r| {
            r == "*"
                || *r == format!("{}/{sub}", a.resource)
                || *r == format!("*/{sub}")
                || *r == format!("{}/*", a.resource)
        }),
    };
    if !res_ok {
        return false;
    }
    match rule.resource_names.as_deref() {
        None | Some([]) => true,
        Some(names) => a
            .name
            .as_deref()
            .is_some_and(|n| names.iter().any(|x| x == n)),
    }
}

impl Identity {
    /// Everything (the fake's admin, like system:masters).
    pub fn admin(user: &str) -> Identity {
        Identity {
            user: user.into(),
            rules: vec![PolicyRule {
                api_groups: Some(vec!["*".into()]),
                resources: Some(vec!["*".into()]),
                verbs: vec!["*".into()],
                ..Default::default()
            }],
        }
    }

    pub fn allows(&self, a: &Attributes) -> bool {
        self.rules.iter().any(|r| rule_allows(r, a))
    }

    /// The real authorizer's 403 message.
    pub fn forbidden_message(&self, a: &Attributes) -> String {
        let resource = match &a.subresource {
            Some(s) => format!("{}/{s}", a.resource),
            None => a.resource.clone(),
        };
        let what = match &a.name {
            Some(n) => format!("{} \"{n}\" is forbidden", a.resource),
            None => format!("{} is forbidden", a.resource),
        };
        let scope = match &a.namespace {
            Some(ns) => format!("in the namespace \"{ns}\""),
            None => "at the cluster scope".into(),
        };
        format!(
            "{what}: User \"{}\" cannot {} resource \"{resource}\" in API group \"{}\" {scope}",
            self.user, a.verb, a.group
        )
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RbacError {
    #[error("read {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}: document {index}: {message}")]
    Parse {
        path: String,
        index: usize,
        message: String,
    },
    #[error("{0}")]
    Binding(String),
}

/// The ServiceAccount identities of a manifest: `system:serviceaccount:<ns>:<name>` for each
/// ServiceAccount subject of a ClusterRoleBinding, with the rules of the ClusterRole bound.
pub fn service_accounts_from_manifest(path: &Path) -> Result<Vec<Identity>, RbacError> {
    let text = std::fs::read_to_string(path).map_err(|source| RbacError::Read {
        path: path.display().to_string(),
        source,
    })?;
    service_accounts_from_yaml(&text, &path.display().to_string())
}

pub fn service_accounts_from_yaml(text: &str, origin: &str) -> Result<Vec<Identity>, RbacError> {
    let mut roles: BTreeMap<String, ClusterRole> = BTreeMap::new();
    let mut bindings = Vec::new();
    for (index, doc) in serde_norway::Deserializer::from_str(text).enumerate() {
        let err = |message: String| RbacError::Parse {
            path: origin.into(),
            index,
            message,
        };
        let v = serde_json::Value::deserialize(doc).map_err(|e| err(e.to_string()))?;
        match v.get("kind").and_then(|k| k.as_str()) {
            Some("ClusterRole") => {
                let r: ClusterRole = serde_json::from_value(v).map_err(|e| err(e.to_string()))?;
                let name = r.metadata.name.clone().unwrap_or_default();
                roles.insert(name, r);
            }
            Some("ClusterRoleBinding") => {
                let b: ClusterRoleBinding =
                    serde_json::from_value(v).map_err(|e| err(e.to_string()))?;
                bindings.push(b);
            }
            _ => {}
        }
    }
    let mut out: BTreeMap<String, Identity> = BTreeMap::new();
    for b in bindings {
        let bname = b.metadata.name.clone().unwrap_or_default();
        if b.role_ref.kind != "ClusterRole" || b.role_ref.api_group != "rbac.authorization.k8s.io" {
            return Err(RbacError::Binding(format!(
                "ClusterRoleBinding {bname}: roleRef {}/{} is not a ClusterRole",
                b.role_ref.api_group, b.role_ref.kind
            )));
        }
        // A binding to a role that does not exist grants nothing (as in a real cluster).
        let rules = roles
            .get(&b.role_ref.name)
            .map(|r| r.rules.clone().unwrap_or_default())
            .unwrap_or_default();
        for s in b.subjects.unwrap_or_default() {
            if s.kind != "ServiceAccount" {
                continue;
            }
            let user = format!(
                "system:serviceaccount:{}:{}",
                s.namespace.unwrap_or_default(),
                s.name
            );
            out.entry(user.clone())
                .or_insert_with(|| Identity {
                    user,
                    rules: Vec::new(),
                })
                .rules
                .extend(rules.iter().cloned());
        }
    }
    Ok(out.into_values().collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    const MANIFEST: &str = r#"
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRole
metadata: {name: r}
rules:
  - apiGroups: [""]
    resources: [nodes]
    verbs: [get, list, watch]
  - apiGroups: [""]
    resources: [nodes/status]
    verbs: [patch]
  - apiGroups: [""]
    resources: [configmaps]
    resourceNames: [one]
    verbs: [get]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata: {name: b}
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: r}
subjects:
  - {kind: ServiceAccount, name: sa, namespace: ns}
"#;

    fn attrs(verb: &str, res: &str, sub: Option<&str>, name: Option<&str>) -> Attributes {
        Attributes {
            verb: verb.into(),
            group: String::new(),
            resource: res.into(),
            subresource: sub.map(Into::into),
            name: name.map(Into::into),
            namespace: None,
        }
    }

    #[test]
    fn binding_grants_the_roles_rules_only() {
        let ids = service_accounts_from_yaml(MANIFEST, "test").unwrap();
        assert_eq!(ids.len(), 1);
        let sa = &ids[0];
        assert_eq!(sa.user, "system:serviceaccount:ns:sa");
        assert!(sa.allows(&attrs("watch", "nodes", None, None)));
        assert!(sa.allows(&attrs("patch", "nodes", Some("status"), Some("n1"))));
        assert!(!sa.allows(&attrs("patch", "nodes", None, Some("n1"))));
        assert!(!sa.allows(&attrs("update", "nodes", Some("status"), Some("n1"))));
        assert!(!sa.allows(&attrs("list", "pods", None, None)));
        assert!(sa.allows(&attrs("get", "configmaps", None, Some("one"))));
        assert!(!sa.allows(&attrs("get", "configmaps", None, Some("two"))));
        assert!(!sa.allows(&attrs("list", "configmaps", None, None)));
        let m = sa.forbidden_message(&attrs("patch", "nodes", None, Some("n1")));
        assert_eq!(
            m,
            "nodes \"n1\" is forbidden: User \"system:serviceaccount:ns:sa\" cannot patch \
             resource \"nodes\" in API group \"\" at the cluster scope"
        );
        assert!(Identity::admin("a").allows(&attrs("delete", "nodes", None, Some("x"))));
    }
}
