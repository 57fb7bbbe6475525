//! The resources the fake serves, and how their paths, groups and lists are shaped.

use serde_json::Value;

/// One kind of object the fake stores.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    Node,
    Pod,
    Namespace,
    NetworkPolicy,
}

pub const ALL: [Kind; 4] = [Kind::Node, Kind::Pod, Kind::Namespace, Kind::NetworkPolicy];

impl Kind {
    pub fn kind(self) -> &'static str {
        match self {
            Kind::Node => "Node",
            Kind::Pod => "Pod",
            Kind::Namespace => "Namespace",
            Kind::NetworkPolicy => "NetworkPolicy",
        }
    }

    pub fn plural(self) -> &'static str {
        match self {
            Kind::Node => "nodes",
            Kind::Pod => "pods",
            Kind::Namespace => "namespaces",
            Kind::NetworkPolicy => "networkpolicies",
        }
    }

    pub fn singular(self) -> &'static str {
        match self {
            Kind::Node => "node",
            Kind::Pod => "pod",
            Kind::Namespace => "namespace",
            Kind::NetworkPolicy => "networkpolicy",
        }
    }

    /// The API group ("" is the core group).
    pub fn group(self) -> &'static str {
        match self {
            Kind::NetworkPolicy => "networking.k8s.io",
            _ => "",
        }
    }

    pub fn api_version(self) -> &'static str {
        match self {
            Kind::NetworkPolicy => "networking.k8s.io/v1",
            _ => "v1",
        }
    }

    pub fn namespaced(self) -> bool {
        matches!(self, Kind::Pod | Kind::NetworkPolicy)
    }

    /// Whether `<plural>/status` exists: writes to it change only status (and metadata), and
    /// writes to the main resource leave status alone, as the real registry strategies do.
    pub fn has_status(self) -> bool {
        matches!(self, Kind::Node | Kind::Pod | Kind::Namespace)
    }

    pub fn from_path(group: &str, plural: &str) -> Option<Kind> {
        ALL.into_iter()
            .find(|k| k.group() == group && k.plural() == plural)
    }

    pub fn from_api_version(api_version: &str, kind: &str) -> Option<Kind> {
        ALL.into_iter()
            .find(|k| k.api_version() == api_version && k.kind() == kind)
    }

    /// Deserialize into the k8s-openapi type: the fake refuses (422) what a real server's
    /// decoder would refuse (wrong types, unknown enum shapes), not semantic validation.
    pub fn check_shape(self, obj: &Value) -> Result<(), String> {
        use k8s_openapi::api::core::v1::{Namespace, Node, Pod};
        use k8s_openapi::api::networking::v1::NetworkPolicy;
        let v = obj.clone();
        let r = match self {
            Kind::Node => serde_json::from_value::<Node>(v).map(|_| ()),
            Kind::Pod => serde_json::from_value::<Pod>(v).map(|_| ()),
            Kind::Namespace => serde_json::from_value::<Namespace>(v).map(|_| ()),
            Kind::NetworkPolicy => serde_json::from_value::<NetworkPolicy>(v).map(|_| ()),
        };
        r.map_err(|e| e.to_string())
    }
}

/// Where an object lives: kind, namespace ("" for cluster-scoped kinds) and name.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Key {
    pub kind: Kind,
    pub namespace: String,
    pub name: String,
}

impl Key {
    pub fn new(kind: Kind, namespace: &str, name: &str) -> Key {
        Key {
            kind,
            namespace: if kind.namespaced() {
                namespace.to_string()
            } else {
                String::new()
            },
            name: name.to_string(),
        }
    }
}

pub fn meta_str<'a>(obj: &'a Value, field: &str) -> Option<&'a str> {
    obj.get("metadata")?.get(field)?.as_str()
}
