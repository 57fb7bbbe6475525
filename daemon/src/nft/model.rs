//! A desired nftables table as data: sets (and maps), chains and their rules, rendered to nft's
//! own script syntax. nft (1.0.6) takes no quoted names, so table, set and chain names must not
//! be nft keywords (`fwd`, `ingress`, `set`, ...): planners use hyphenated names. Pure: planners (masquerade, policy) build a `Table`, the writer diffs it
//! against the last one it applied and sends the difference in one transaction.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::{self, Write};

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Family {
    Ip,
    Ip6,
    Inet,
    Bridge,
}

impl fmt::Display for Family {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Family::Ip => "ip",
            Family::Ip6 => "ip6",
            Family::Inet => "inet",
            Family::Bridge => "bridge",
        })
    }
}

/// A set, or a map when `kind` has a `:` (e.g. `ipv4_addr : verdict`); a `kind` starting with
/// `typeof ` declares it by expression instead of type. Elements are written as
/// nft writes them in a script (`10.0.0.0/8`, `tcp . 80-81`, `10.1.0.5 : jump grp-x`); planners
/// must produce one canonical spelling per element, because diffs compare the strings.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Set {
    pub kind: String,
    pub flags: Vec<&'static str>,
    pub elements: BTreeSet<String>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BaseChain {
    /// filter, nat, route.
    pub kind: &'static str,
    pub hook: &'static str,
    pub priority: i32,
    pub policy: &'static str,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Chain {
    pub base: Option<BaseChain>,
    pub rules: Vec<String>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Table {
    pub family: Family,
    pub name: String,
    pub sets: BTreeMap<String, Set>,
    pub chains: BTreeMap<String, Chain>,
}

impl Table {
    pub fn new(family: Family, name: impl Into<String>) -> Self {
        Table {
            family,
            name: name.into(),
            sets: BTreeMap::new(),
            chains: BTreeMap::new(),
        }
    }

    /// `ip twill-masq`: how nft commands name the table.
    pub fn id(&self) -> String {
        format!("{} {}", self.family, self.name)
    }

    /// The whole table as one atomic replacement: create it if missing, delete it (with
    /// everything in it, also what someone else added), define it anew. One transaction: no
    /// moment without the table.
    pub fn render_replace(&self) -> String {
        let id = self.id();
        let mut s = format!("add table {id}\ndelete table {id}\nadd table {id}\n");
        for (name, set) in &self.sets {
            add_set(&mut s, &id, name, set);
        }
        for (name, chain) in &self.chains {
            add_chain(&mut s, &id, name, chain);
        }
        // Elements after the chains: a verdict map's elements jump to them.
        for (name, set) in &self.sets {
            add_elements(&mut s, &id, name, set.elements.iter());
        }
        // Rules after all chains: a rule may jump to a chain defined after it.
        for (name, chain) in &self.chains {
            add_rules(&mut s, &id, name, chain);
        }
        s
    }

    /// Commands that turn `old` (what the kernel was given last) into `self`, or None when
    /// they are the same: elements added and deleted, chains whose rules changed flushed and
    /// refilled, new objects added, old ones deleted. Sent as one script, it is one transaction.
    pub fn render_diff(&self, old: &Table) -> Option<String> {
        if self == old {
            return None;
        }
        // A set's type or a base chain's hook cannot change in place (and a set still referenced
        // by rules cannot be deleted first): replace the whole table then. Planners name sets by
        // their definition, so this is rare.
        let redefined = self.sets.iter().any(|(n, set)| {
            old.sets
                .get(n)
                .is_some_and(|o| o.kind != set.kind || o.flags != set.flags)
        }) || self
            .chains
            .iter()
            .any(|(n, c)| old.chains.get(n).is_some_and(|o| o.base != c.base));
        if redefined || self.family != old.family || self.name != old.name {
            return Some(self.render_replace());
        }
        let id = self.id();
        let mut s = String::new();
        // 1. New sets and chains (empty), so everything below can refer to them.
        for (name, set) in self.sets.iter().filter(|(n, _)| !old.sets.contains_key(*n)) {
            add_set(&mut s, &id, name, set);
        }
        for (name, chain) in self
            .chains
            .iter()
            .filter(|(n, _)| !old.chains.contains_key(*n))
        {
            add_chain(&mut s, &id, name, chain);
        }
        // 2. Elements: what is gone, then what is new (a map entry whose verdict changed is
        // a delete and an add of one key: adding first would fail on the existing key).
        for (name, set) in &self.sets {
            let empty = Set::default();
            let o = old.sets.get(name).unwrap_or(&empty);
            delete_elements(&mut s, &id, name, o.elements.difference(&set.elements));
            add_elements(&mut s, &id, name, set.elements.difference(&o.elements));
        }
        // 3. Chains whose rules changed: flush and refill.
        for (name, chain) in &self.chains {
            let same = old.chains.get(name).is_some_and(|o| o.rules == chain.rules);
            if !same {
                if old.chains.contains_key(name) {
                    let _ = writeln!(s, "flush chain {id} {name}");
                }
                add_rules(&mut s, &id, name, chain);
            }
        }
        // 4. What is gone: chains first (their rules may refer to sets and to each other, so
        // flush them all before deleting any), then sets.
        let gone: Vec<&String> = old
            .chains
            .keys()
            .filter(|n| !self.chains.contains_key(*n))
            .collect();
        for name in &gone {
            let _ = writeln!(s, "flush chain {id} {name}");
        }
        for name in &gone {
            let _ = writeln!(s, "delete chain {id} {name}");
        }
        for name in old.sets.keys().filter(|n| !self.sets.contains_key(*n)) {
            let _ = writeln!(s, "delete set {id} {name}");
        }
        Some(s)
    }

    /// Rules and elements per chain and set: what a listing of the kernel's table must show.
    pub fn summary(&self) -> Summary {
        Summary {
            chains: self
                .chains
                .iter()
                .map(|(n, c)| (n.clone(), c.rules.len()))
                .collect(),
            sets: self
                .sets
                .iter()
                .map(|(n, s)| (n.clone(), s.elements.len()))
                .collect(),
        }
    }
}

/// The shape of a table: rule count per chain, element count per set. Comparing the kernel's
/// listing with the desired table by shape catches what operators and other tools do to it
/// (a flushed ruleset, a deleted table, chain or rule, flushed elements) without parsing nft's
/// normalised rule syntax back.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Summary {
    pub chains: BTreeMap<String, usize>,
    pub sets: BTreeMap<String, usize>,
}

impl Summary {
    /// The shape of table `name` in the output of `nft -j list table ...` (or `list ruleset`).
    /// None when the listing has no such table.
    pub fn from_listing(json: &serde_json::Value, family: Family, name: &str) -> Option<Summary> {
        let items = json.get("nftables")?.as_array()?;
        let fam = family.to_string();
        let ours = |o: &serde_json::Value| {
            o.get("family").and_then(|f| f.as_str()) == Some(fam.as_str())
                && o.get("table").and_then(|t| t.as_str()) == Some(name)
        };
        let mut found = false;
        let mut s = Summary::default();
        for item in items {
            if let Some(t) = item.get("table") {
                found |= t.get("family").and_then(|f| f.as_str()) == Some(fam.as_str())
                    && t.get("name").and_then(|n| n.as_str()) == Some(name);
            } else if let Some(c) = item.get("chain").filter(|c| ours(c)) {
                if let Some(n) = c.get("name").and_then(|n| n.as_str()) {
                    s.chains.entry(n.to_string()).or_insert(0);
                }
            } else if let Some(r) = item.get("rule").filter(|r| ours(r)) {
                if let Some(n) = r.get("chain").and_then(|n| n.as_str()) {
                    *s.chains.entry(n.to_string()).or_insert(0) += 1;
                }
            } else if let Some(set) = item
                .get("set")
                .or_else(|| item.get("map"))
                .filter(|x| ours(x))
            {
                if let Some(n) = set.get("name").and_then(|n| n.as_str()) {
                    let elems = set
                        .get("elem")
                        .and_then(|e| e.as_array())
                        .map_or(0, |a| a.len());
                    s.sets.insert(n.to_string(), elems);
                }
            }
        }
        found.then_some(s)
    }
}

fn add_set(s: &mut String, id: &str, name: &str, set: &Set) {
    let what = if set.kind.contains(':') { "map" } else { "set" };
    let flags = if set.flags.is_empty() {
        String::new()
    } else {
        format!(" flags {};", set.flags.join(","))
    };
    // `typeof <expr>` declares a set by the expression it is looked up with (raw payloads).
    let kind = if set.kind.starts_with("typeof ") {
        set.kind.clone()
    } else {
        format!("type {}", set.kind)
    };
    let _ = writeln!(s, "add {what} {id} {name} {{ {kind};{flags} }}");
}

/// Elements in chunks: one command per few hundred keeps each line (and nft's parser) small.
fn add_elements<'a>(s: &mut String, id: &str, name: &str, elems: impl Iterator<Item = &'a String>) {
    element_cmds(s, "add", id, name, elems)
}

fn delete_elements<'a>(
    s: &mut String,
    id: &str,
    name: &str,
    elems: impl Iterator<Item = &'a String>,
) {
    element_cmds(s, "delete", id, name, elems)
}

fn element_cmds<'a>(
    s: &mut String,
    verb: &str,
    id: &str,
    name: &str,
    elems: impl Iterator<Item = &'a String>,
) {
    let elems: Vec<&String> = elems.collect();
    for chunk in elems.chunks(256) {
        let list = chunk
            .iter()
            .map(|e| e.as_str())
            .collect::<Vec<_>>()
            .join(", ");
        let _ = writeln!(s, "{verb} element {id} {name} {{ {list} }}");
    }
}

fn add_chain(s: &mut String, id: &str, name: &str, chain: &Chain) {
    match &chain.base {
        Some(b) => {
            let _ = writeln!(
                s,
                "add chain {id} {name} {{ type {} hook {} priority {}; policy {}; }}",
                b.kind, b.hook, b.priority, b.policy
            );
        }
        None => {
            let _ = writeln!(s, "add chain {id} {name}");
        }
    }
}

fn add_rules(s: &mut String, id: &str, name: &str, chain: &Chain) {
    for r in &chain.rules {
        let _ = writeln!(s, "add rule {id} {name} {r}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table() -> Table {
        let mut t = Table::new(Family::Ip, "twill-test");
        t.sets.insert(
            "cluster".into(),
            Set {
                kind: "ipv4_addr".into(),
                flags: vec!["interval"],
                elements: ["10.244.0.0/16".to_string()].into(),
            },
        );
        t.chains.insert(
            "post".into(),
            Chain {
                base: Some(BaseChain {
                    kind: "nat",
                    hook: "postrouting",
                    priority: 100,
                    policy: "accept",
                }),
                rules: vec!["ip saddr != @cluster return".into(), "masquerade".into()],
            },
        );
        t
    }

    #[test]
    fn replace_recreates_the_table_in_one_script() {
        let s = table().render_replace();
        assert_eq!(
            s,
            "add table ip twill-test\ndelete table ip twill-test\nadd table ip twill-test\n\
             add set ip twill-test cluster { type ipv4_addr; flags interval; }\n\
             add chain ip twill-test post { type nat hook postrouting priority 100; policy accept; }\n\
             add element ip twill-test cluster { 10.244.0.0/16 }\n\
             add rule ip twill-test post ip saddr != @cluster return\n\
             add rule ip twill-test post masquerade\n"
        );
    }

    #[test]
    fn diff_of_equal_tables_is_none() {
        assert_eq!(table().render_diff(&table()), None);
    }

    #[test]
    fn diff_touches_only_what_changed() {
        let old = table();
        let mut new = table();
        let set = new.sets.get_mut("cluster").unwrap();
        set.elements.insert("10.245.0.0/16".into());
        set.elements.remove("10.244.0.0/16");
        assert_eq!(
            new.render_diff(&old).unwrap(),
            "delete element ip twill-test cluster { 10.244.0.0/16 }\n\
             add element ip twill-test cluster { 10.245.0.0/16 }\n"
        );
        let mut new = table();
        new.chains.get_mut("post").unwrap().rules.pop();
        new.chains.insert("extra".into(), Chain::default());
        assert_eq!(
            new.render_diff(&old).unwrap(),
            "add chain ip twill-test extra\n\
             flush chain ip twill-test post\n\
             add rule ip twill-test post ip saddr != @cluster return\n"
        );
        // And back: the extra chain is flushed, then deleted; the rule comes back.
        assert_eq!(
            old.render_diff(&new).unwrap(),
            "flush chain ip twill-test post\n\
             add rule ip twill-test post ip saddr != @cluster return\n\
             add rule ip twill-test post masquerade\n\
             flush chain ip twill-test extra\n\
             delete chain ip twill-test extra\n"
        );
    }

    #[test]
    fn summary_reads_nft_json_listings() {
        let listing = serde_json::json!({"nftables": [
            {"metainfo": {"version": "1.0.6"}},
            {"table": {"family": "ip", "name": "twill-test", "handle": 3}},
            {"set": {"family": "ip", "name": "cluster", "table": "twill-test", "type": "ipv4_addr",
                     "flags": ["interval"], "elem": [{"prefix": {"addr": "10.244.0.0", "len": 16}}]}},
            {"chain": {"family": "ip", "table": "twill-test", "name": "post", "type": "nat",
                       "hook": "postrouting", "prio": 100, "policy": "accept"}},
            {"rule": {"family": "ip", "table": "twill-test", "chain": "post", "expr": []}},
            {"rule": {"family": "ip", "table": "twill-test", "chain": "post", "expr": []}},
            {"table": {"family": "ip", "name": "other"}},
            {"rule": {"family": "ip", "table": "other", "chain": "post", "expr": []}}
        ]});
        let got = Summary::from_listing(&listing, Family::Ip, "twill-test").unwrap();
        assert_eq!(got, table().summary());
        assert!(Summary::from_listing(&listing, Family::Ip6, "twill-test").is_none());
        // A flushed chain shows: 0 rules.
        let flushed = serde_json::json!({"nftables": [
            {"table": {"family": "ip", "name": "twill-test"}},
            {"chain": {"family": "ip", "table": "twill-test", "name": "post"}}
        ]});
        let got = Summary::from_listing(&flushed, Family::Ip, "twill-test").unwrap();
        assert_ne!(got, table().summary());
    }
}
