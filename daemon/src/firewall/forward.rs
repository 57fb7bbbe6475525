//! Pod traffic through other tools' forward chains. An nftables `accept` ends only the base
//! chain it is in, so twill's own accept cannot override another table's drop: Docker sets
//! iptables' FORWARD policy to DROP, firewalld ends its forward chain with a reject, an
//! nftables host may have `policy drop`. The only thing that works is an accept in *their*
//! chain, ahead of the drop. So: find forward-hook base chains that would drop (policy drop, or
//! a last rule that drops unconditionally) and insert `saddr/daddr <pod network> accept` at
//! their top, marked with a comment so they are found again (and removed when turned off).
//! Each family's pod network goes where that family's packets pass: IPv4 into `ip` chains,
//! IPv6 into `ip6` chains, both into `inet` chains.
//!
//! iptables' own chains (`ip filter FORWARD` and `ip6 filter FORWARD`, legacy or nft) are
//! changed with the iptables/ip6tables commands, so they keep understanding their tables; every
//! other chain with nft.

use std::collections::BTreeSet;

use std::net::IpAddr;

use ipnet::IpNet;
use serde_json::Value;

use crate::nft::model::Family;
use crate::nft::{iptables::Iptables, Nft, NftError};

/// The comment on every rule twill puts in another tool's chain.
pub const COMMENT: &str = "twill-forward";

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ForwardReport {
    /// `family table chain` of each chain a rule was added to in this pass.
    pub added: Vec<String>,
    /// Every foreign chain that would drop pod traffic (and has our accepts now).
    pub chains: Vec<String>,
}

/// A foreign forward-hook base chain, as `nft -j list ruleset` shows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ForeignChain {
    pub family: String,
    pub table: String,
    pub name: String,
    /// It drops what no rule accepts (policy drop, or an unconditional drop/reject last).
    pub drops: bool,
    /// Our rules in it: (handle, "saddr"|"daddr", network).
    pub ours: Vec<(u64, &'static str, IpNet)>,
    last_rule_drops: bool,
}

impl ForeignChain {
    pub fn id(&self) -> String {
        format!("{} {} {}", self.family, self.table, self.name)
    }
}

/// Forward-hook base chains of the ip, ip6 and inet families in `listing`, other than twill's.
pub fn foreign_forward_chains(listing: &Value) -> Vec<ForeignChain> {
    let Some(items) = listing.get("nftables").and_then(Value::as_array) else {
        return Vec::new();
    };
    let mut chains: Vec<ForeignChain> = items
        .iter()
        .filter_map(|i| i.get("chain"))
        .filter(|c| c.get("hook").and_then(Value::as_str) == Some("forward"))
        .filter_map(|c| {
            let s = |k: &str| c.get(k).and_then(Value::as_str).map(str::to_string);
            let family = s("family")?;
            let table = s("table")?;
            if !matches!(family.as_str(), "ip" | "ip6" | "inet") || table.starts_with("twill") {
                return None;
            }
            Some(ForeignChain {
                family,
                table,
                name: s("name")?,
                drops: s("policy").as_deref() == Some("drop"),
                ours: Vec::new(),
                last_rule_drops: false,
            })
        })
        .collect();
    for r in items.iter().filter_map(|i| i.get("rule")) {
        let s = |k: &str| r.get(k).and_then(Value::as_str);
        let Some(c) = chains.iter_mut().find(|c| {
            s("family") == Some(c.family.as_str())
                && s("table") == Some(c.table.as_str())
                && s("chain") == Some(c.name.as_str())
        }) else {
            continue;
        };
        let expr = r.get("expr").and_then(Value::as_array);
        if s("comment") == Some(COMMENT) {
            if let (Some(h), Some((dir, net))) = (
                r.get("handle").and_then(Value::as_u64),
                expr.and_then(|e| our_match(e)),
            ) {
                c.ours.push((h, dir, net));
            }
        }
        // Rules come in chain order: only the last one decides "ends with a drop".
        let last_drops = expr.is_some_and(|e| {
            e.iter()
                .any(|x| x.get("drop").is_some() || x.get("reject").is_some())
                && e.iter().all(|x| {
                    ["drop", "reject", "counter", "log"]
                        .iter()
                        .any(|k| x.get(*k).is_some())
                })
        });
        c.last_rule_drops = last_drops;
    }
    for c in &mut chains {
        c.drops |= c.last_rule_drops;
    }
    chains
}

/// `ip|ip6 saddr|daddr <net> accept`, as nft lists the rules twill inserts.
fn our_match(expr: &[Value]) -> Option<(&'static str, IpNet)> {
    let m = expr.iter().find_map(|x| x.get("match"))?;
    let field = m.pointer("/left/payload/field")?.as_str()?;
    let dir = match field {
        "saddr" => "saddr",
        "daddr" => "daddr",
        _ => return None,
    };
    let right = m.get("right")?;
    let net = match right.get("prefix") {
        Some(p) => IpNet::new(
            p.get("addr")?.as_str()?.parse().ok()?,
            u8::try_from(p.get("len")?.as_u64()?).ok()?,
        )
        .ok()?,
        None => IpNet::from(right.as_str()?.parse::<IpAddr>().ok()?),
    };
    Some((dir, net))
}

/// Whether packets of `net`'s family pass a chain of nftables family `family`.
fn carries(family: &str, net: &IpNet) -> bool {
    match family {
        "inet" => true,
        "ip" => matches!(net, IpNet::V4(_)),
        "ip6" => matches!(net, IpNet::V6(_)),
        _ => false,
    }
}

/// nft's name for a network's address family in a match.
fn proto(net: &IpNet) -> &'static str {
    match net {
        IpNet::V4(_) => "ip",
        IpNet::V6(_) => "ip6",
    }
}

/// The nft commands that make `chain` accept `nets` first (when it drops) and drop our stale
/// rules (for networks no longer wanted, or all of them when it does not drop).
pub fn plan(chain: &ForeignChain, nets: &[IpNet]) -> Vec<String> {
    let want: BTreeSet<(&str, IpNet)> = if chain.drops {
        nets.iter()
            .filter(|n| carries(&chain.family, n))
            .flat_map(|n| [("saddr", *n), ("daddr", *n)])
            .collect()
    } else {
        BTreeSet::new()
    };
    let have: BTreeSet<(&str, IpNet)> = chain.ours.iter().map(|(_, d, n)| (*d, *n)).collect();
    let id = chain.id();
    let mut cmds: Vec<String> = chain
        .ours
        .iter()
        .filter(|(_, d, n)| !want.contains(&(*d, *n)))
        .map(|(h, _, _)| format!("delete rule {id} handle {h}"))
        .collect();
    // Each goes to the top: daddr first, so saddr ends up first.
    for (dir, net) in want.difference(&have) {
        let p = proto(net);
        cmds.push(format!(
            "insert rule {id} {p} {dir} {net} accept comment \"{COMMENT}\""
        ));
    }
    cmds
}

pub struct ForwardAccept {
    nft: Nft,
    /// The iptables and ip6tables commands, where installed.
    iptables: Vec<Iptables>,
}

impl ForwardAccept {
    pub fn new(nft: Nft) -> Self {
        ForwardAccept {
            iptables: [Family::Ip, Family::Ip6]
                .into_iter()
                .filter_map(Iptables::find)
                .collect(),
            nft,
        }
    }

    /// Makes every foreign forward chain that would drop pod traffic accept `nets` first, and
    /// removes our rules where they are no longer wanted (`nets` empty: everywhere). A failure
    /// in one place does not stop the others; the first is returned with what was done.
    pub async fn ensure(&self, nets: &[IpNet]) -> (ForwardReport, Option<NftError>) {
        let mut report = ForwardReport::default();
        let mut error = None;
        // `ip filter FORWARD` / `ip6 filter FORWARD` belong to the nf_tables iptables.
        let mut owned: Vec<String> = Vec::new();
        for ipt in &self.iptables {
            let family = ipt.family().to_string();
            let mine: Vec<IpNet> = nets
                .iter()
                .filter(|n| carries(&family, n))
                .copied()
                .collect();
            if ipt.is_nft() {
                owned.push(family);
            }
            let id = format!("{} FORWARD", ipt.command());
            match ipt.ensure_forward_accept(&mine, COMMENT).await {
                Ok((drops, added)) => {
                    if drops && !mine.is_empty() {
                        report.chains.push(id.clone());
                    }
                    if added {
                        report.added.push(id);
                    }
                }
                // Nothing of this family is wanted: only rules of an earlier run could be
                // removed, and a host without that family's tables (IPv6 off, no module) is
                // no error.
                Err(e) if mine.is_empty() => {
                    tracing::debug!(error = %e, "{id}: not looked at");
                }
                Err(e) => {
                    error.get_or_insert(e);
                }
            }
        }
        let listing = match self.nft.list_json(&["list", "ruleset"]).await {
            Ok(Some(l)) => l,
            Ok(None) => return (report, error),
            Err(e) => return (report, error.or(Some(e))),
        };
        let mut script = String::new();
        for chain in foreign_forward_chains(&listing) {
            if owned.contains(&chain.family) && chain.table == "filter" && chain.name == "FORWARD" {
                continue;
            }
            if chain.drops && nets.iter().any(|n| carries(&chain.family, n)) {
                report.chains.push(chain.id());
            }
            let cmds = plan(&chain, nets);
            if cmds.iter().any(|c| c.starts_with("insert")) {
                report.added.push(chain.id());
            }
            for c in cmds {
                script.push_str(&c);
                script.push('\n');
            }
        }
        if !script.is_empty() {
            if let Err(e) = self.nft.run("forward accept rules", &script).await {
                error.get_or_insert(e);
            }
        }
        (report, error)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn net() -> IpNet {
        "10.244.0.0/16".parse().unwrap()
    }

    fn net6() -> IpNet {
        "fd00:10:244::/56".parse().unwrap()
    }

    fn listing(rules: Vec<Value>, policy: &str) -> Value {
        let mut items = vec![
            json!({"table": {"family": "inet", "name": "filter"}}),
            json!({"chain": {"family": "inet", "table": "filter", "name": "forward",
                "type": "filter", "hook": "forward", "prio": 0, "policy": policy}}),
            json!({"chain": {"family": "inet", "table": "filter", "name": "input",
                "type": "filter", "hook": "input", "prio": 0, "policy": "drop"}}),
            json!({"chain": {"family": "ip", "table": "twill-masq", "name": "forward",
                "type": "filter", "hook": "forward", "prio": 0, "policy": "drop"}}),
            json!({"chain": {"family": "ip6", "table": "f6", "name": "forward",
                "type": "filter", "hook": "forward", "prio": 0, "policy": "drop"}}),
        ];
        items.extend(rules);
        json!({ "nftables": items })
    }

    fn rule(handle: u64, expr: Value, comment: Option<&str>) -> Value {
        let mut r = json!({"family": "inet", "table": "filter", "chain": "forward",
            "handle": handle, "expr": expr});
        if let Some(c) = comment {
            r["comment"] = json!(c);
        }
        json!({ "rule": r })
    }

    fn ours(handle: u64, field: &str, net: &str) -> Value {
        let (addr, len) = net.split_once('/').unwrap();
        let protocol = if addr.contains(':') { "ip6" } else { "ip" };
        rule(
            handle,
            json!([{"match": {"op": "==", "left": {"payload": {"protocol": protocol, "field": field}},
                "right": {"prefix": {"addr": addr, "len": len.parse::<u64>().unwrap()}}}},
                {"accept": null}]),
            Some(COMMENT),
        )
    }

    #[test]
    fn only_foreign_forward_chains_that_drop_get_rules() {
        let chains = foreign_forward_chains(&listing(vec![], "drop"));
        assert_eq!(chains.len(), 2, "{chains:?}");
        assert_eq!(chains[0].id(), "inet filter forward");
        assert_eq!(chains[1].id(), "ip6 f6 forward");
        assert!(chains[0].drops);
        assert_eq!(
            plan(&chains[0], &[net()]),
            vec![
                "insert rule inet filter forward ip daddr 10.244.0.0/16 accept comment \"twill-forward\"",
                "insert rule inet filter forward ip saddr 10.244.0.0/16 accept comment \"twill-forward\"",
            ]
        );
        let accepting = foreign_forward_chains(&listing(vec![], "accept"));
        assert!(!accepting[0].drops);
        assert!(plan(&accepting[0], &[net()]).is_empty());
    }

    /// Each family's network goes into the chains its packets pass: both into an inet chain,
    /// only the IPv6 one into an ip6 chain (nft would refuse `ip saddr` there).
    #[test]
    fn each_family_goes_where_its_packets_pass() {
        let chains = foreign_forward_chains(&listing(vec![], "drop"));
        let inet = plan(&chains[0], &[net(), net6()]);
        assert_eq!(
            inet,
            vec![
                "insert rule inet filter forward ip daddr 10.244.0.0/16 accept comment \"twill-forward\"",
                "insert rule inet filter forward ip6 daddr fd00:10:244::/56 accept comment \"twill-forward\"",
                "insert rule inet filter forward ip saddr 10.244.0.0/16 accept comment \"twill-forward\"",
                "insert rule inet filter forward ip6 saddr fd00:10:244::/56 accept comment \"twill-forward\"",
            ]
        );
        assert_eq!(
            plan(&chains[1], &[net(), net6()]),
            vec![
                "insert rule ip6 f6 forward ip6 daddr fd00:10:244::/56 accept comment \"twill-forward\"",
                "insert rule ip6 f6 forward ip6 saddr fd00:10:244::/56 accept comment \"twill-forward\"",
            ]
        );
        // IPv6 switched off: the IPv6 rules go, the IPv4 ones stay.
        let l = listing(
            vec![
                ours(3, "saddr", "10.244.0.0/16"),
                ours(4, "daddr", "10.244.0.0/16"),
                ours(5, "saddr", "fd00:10:244::/56"),
                ours(6, "daddr", "fd00:10:244::/56"),
            ],
            "drop",
        );
        let c = &foreign_forward_chains(&l)[0];
        assert_eq!(c.ours.len(), 4, "{c:?}");
        assert_eq!(
            plan(c, &[net()]),
            vec![
                "delete rule inet filter forward handle 5",
                "delete rule inet filter forward handle 6"
            ]
        );
        assert!(plan(c, &[net(), net6()]).is_empty());
    }

    #[test]
    fn an_unconditional_reject_last_counts_as_dropping() {
        // firewalld's forward chain: policy accept, but it ends with a reject.
        let conditional = rule(
            7,
            json!([{"match": {"op": "==", "left": {"meta": {"key": "iifname"}}, "right": "docker0"}},
                {"drop": null}]),
            None,
        );
        let reject = rule(
            8,
            json!([{"counter": null}, {"reject": {"type": "icmpx"}}]),
            None,
        );
        let c = foreign_forward_chains(&listing(vec![reject], "accept"));
        assert!(c[0].drops);
        let c = foreign_forward_chains(&listing(vec![conditional], "accept"));
        assert!(!c[0].drops, "a conditional drop does not drop everything");
    }

    #[test]
    fn present_rules_are_kept_and_stale_ones_removed() {
        let l = listing(
            vec![
                ours(3, "saddr", "10.244.0.0/16"),
                ours(4, "daddr", "10.244.0.0/16"),
                ours(5, "saddr", "10.99.0.0/16"),
            ],
            "drop",
        );
        let c = &foreign_forward_chains(&l)[0];
        assert_eq!(c.ours.len(), 3);
        assert_eq!(
            plan(c, &[net()]),
            vec!["delete rule inet filter forward handle 5"]
        );
        // Turned off: all ours go.
        assert_eq!(plan(c, &[]).len(), 3);
    }
}
