//! Label selector matching, with Kubernetes' semantics (`labels.Selector` from a
//! `metav1.LabelSelector`): `matchLabels` AND every `matchExpressions` entry; an empty selector
//! matches everything. A nil selector is the caller's business (it means different things in
//! different places of a NetworkPolicy).

use std::collections::BTreeSet;

use serde::Serialize;

use crate::api::{LabelSelector, Labels};

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub enum Operator {
    In,
    NotIn,
    Exists,
    DoesNotExist,
}

impl Operator {
    pub fn parse(s: &str) -> Option<Operator> {
        Some(match s {
            "In" => Operator::In,
            "NotIn" => Operator::NotIn,
            "Exists" => Operator::Exists,
            "DoesNotExist" => Operator::DoesNotExist,
            _ => return None,
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct Requirement {
    pub key: String,
    pub op: Operator,
    pub values: BTreeSet<String>,
}

impl Requirement {
    pub fn matches(&self, labels: &Labels) -> bool {
        let value = labels.get(&self.key);
        match self.op {
            Operator::In => value.is_some_and(|v| self.values.contains(v)),
            // NotIn also matches objects without the key, as in Kubernetes.
            Operator::NotIn => value.is_none_or(|v| !self.values.contains(v)),
            Operator::Exists => value.is_some(),
            Operator::DoesNotExist => value.is_none(),
        }
    }
}

/// A parsed selector in canonical form: `matchLabels` entries become `In [v]` requirements, and
/// requirements are sorted and deduplicated, so equal meanings compare (and hash) equal in the
/// common cases.
#[derive(Debug, Clone, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct Selector {
    pub requirements: BTreeSet<Requirement>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown selector operator {0:?}")]
pub struct UnknownOperator(pub String);

impl Selector {
    /// Everything.
    pub fn everything() -> Selector {
        Selector::default()
    }

    pub fn parse(sel: &LabelSelector) -> Result<Selector, UnknownOperator> {
        let mut requirements = BTreeSet::new();
        for (k, v) in &sel.match_labels {
            requirements.insert(Requirement {
                key: k.clone(),
                op: Operator::In,
                values: BTreeSet::from([v.clone()]),
            });
        }
        for e in &sel.match_expressions {
            let op =
                Operator::parse(&e.operator).ok_or_else(|| UnknownOperator(e.operator.clone()))?;
            let values = match op {
                Operator::In | Operator::NotIn => e.values.iter().cloned().collect(),
                Operator::Exists | Operator::DoesNotExist => BTreeSet::new(),
            };
            requirements.insert(Requirement {
                key: e.key.clone(),
                op,
                values,
            });
        }
        Ok(Selector { requirements })
    }

    pub fn is_everything(&self) -> bool {
        self.requirements.is_empty()
    }

    pub fn matches(&self, labels: &Labels) -> bool {
        self.requirements.iter().all(|r| r.matches(labels))
    }
}

/// Matches `labels` against an API selector. A selector that does not parse (unknown operator;
/// validation rejects those) matches nothing, never everything.
pub fn matches(sel: &LabelSelector, labels: &Labels) -> bool {
    Selector::parse(sel).is_ok_and(|s| s.matches(labels))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::LabelSelectorRequirement;

    fn labels(kv: &[(&str, &str)]) -> Labels {
        kv.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn expr(key: &str, op: &str, values: &[&str]) -> LabelSelectorRequirement {
        LabelSelectorRequirement {
            key: key.into(),
            operator: op.into(),
            values: values.iter().map(|v| v.to_string()).collect(),
        }
    }

    fn sel(ml: &[(&str, &str)], me: Vec<LabelSelectorRequirement>) -> LabelSelector {
        LabelSelector {
            match_labels: labels(ml),
            match_expressions: me,
        }
    }

    #[test]
    fn empty_selector_matches_everything() {
        assert!(matches(&LabelSelector::default(), &labels(&[])));
        assert!(matches(&LabelSelector::default(), &labels(&[("a", "b")])));
        assert!(Selector::parse(&LabelSelector::default())
            .unwrap()
            .is_everything());
    }

    #[test]
    fn match_labels_needs_every_pair() {
        let s = sel(&[("pod", "a"), ("tier", "web")], vec![]);
        assert!(matches(
            &s,
            &labels(&[("pod", "a"), ("tier", "web"), ("x", "y")])
        ));
        assert!(!matches(&s, &labels(&[("pod", "a")])));
        assert!(!matches(&s, &labels(&[("pod", "a"), ("tier", "db")])));
        assert!(!matches(&s, &labels(&[])));
    }

    #[test]
    fn operators() {
        let l = labels(&[("pod", "b"), ("env", "")]);
        let m = |e| matches(&sel(&[], vec![e]), &l);
        assert!(m(expr("pod", "In", &["a", "b"])));
        assert!(!m(expr("pod", "In", &["a", "c"])));
        assert!(!m(expr("missing", "In", &["a"])));
        assert!(m(expr("env", "In", &[""])), "empty value is a value");
        assert!(m(expr("pod", "NotIn", &["a", "c"])));
        assert!(!m(expr("pod", "NotIn", &["b"])));
        assert!(
            m(expr("missing", "NotIn", &["b"])),
            "NotIn matches a missing key"
        );
        assert!(m(expr("env", "Exists", &[])));
        assert!(!m(expr("missing", "Exists", &[])));
        assert!(m(expr("missing", "DoesNotExist", &[])));
        assert!(!m(expr("pod", "DoesNotExist", &[])));
    }

    #[test]
    fn labels_and_expressions_are_anded() {
        let s = sel(&[("pod", "a")], vec![expr("env", "NotIn", &["prod"])]);
        assert!(matches(&s, &labels(&[("pod", "a")])));
        assert!(matches(&s, &labels(&[("pod", "a"), ("env", "dev")])));
        assert!(!matches(&s, &labels(&[("pod", "a"), ("env", "prod")])));
        assert!(!matches(&s, &labels(&[("pod", "b"), ("env", "dev")])));
    }

    #[test]
    fn unknown_operator_matches_nothing() {
        let s = sel(&[], vec![expr("pod", "Gt", &["1"])]);
        assert!(!matches(&s, &labels(&[("pod", "2")])));
        assert_eq!(Selector::parse(&s), Err(UnknownOperator("Gt".into())));
    }

    #[test]
    fn canonical_form_ignores_order_and_spelling() {
        let a = sel(&[("pod", "a")], vec![expr("k", "In", &["2", "1", "1"])]);
        let b = sel(
            &[],
            vec![expr("k", "In", &["1", "2"]), expr("pod", "In", &["a"])],
        );
        assert_eq!(Selector::parse(&a).unwrap(), Selector::parse(&b).unwrap());
        let c = sel(&[], vec![expr("pod", "In", &["a", "b"])]);
        assert_ne!(Selector::parse(&a).unwrap(), Selector::parse(&c).unwrap());
    }
}
