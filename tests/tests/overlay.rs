//! The VXLAN overlay end to end: real twilld processes in node namespaces, a real etcd, and the
//! kernel's entries and real pings as the proof. Each test builds its own lab.

use std::collections::BTreeSet;
use std::time::Duration;

use anyhow::{anyhow, bail, ensure, Context, Result};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde_json::Value;
use twill_tests::kernel::subnet_gateway;
use twill_tests::lab::SUBNETS_PREFIX;
use twill_tests::{wait_until, Lab, LabOptions};

const CONFIG: &str = r#"{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan"}}"#;
const DEV: &str = "twill.1";
/// Generous bounds: the machine is shared, and a wait ends as soon as its condition holds.
const READY: Duration = Duration::from_secs(60);
const CONVERGE: Duration = Duration::from_secs(60);

/// A node as it describes itself on /status.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Node {
    subnet: String,
    public_ip: String,
    mac: String,
}

impl Node {
    /// flannel's gateway (and VTEP address) for the subnet: its network address.
    fn gw(&self) -> String {
        subnet_gateway(&self.subnet)
    }

    /// The lease key suffix, "10.244.1.0-24".
    fn key(&self) -> String {
        self.subnet.replace('/', "-")
    }
}

fn node(lab: &Lab, i: usize) -> Result<Node> {
    let st = lab.status(i)?;
    let n = &st["node"];
    let field = |k: &str| {
        n[k].as_str()
            .map(str::to_owned)
            .ok_or_else(|| anyhow!("/status node.{k} missing: {st}"))
    };
    Ok(Node {
        subnet: field("subnet")?,
        public_ip: field("public_ip")?,
        mac: field("vtep_mac")?.to_ascii_lowercase(),
    })
}

fn new_lab(nodes: usize) -> Lab {
    Lab::new(LabOptions {
        nodes,
        ..Default::default()
    })
    .expect("lab")
}

fn start_ready(lab: &mut Lab, i: usize) -> Result<Node> {
    lab.start_daemon(i)?;
    node_when_ready(lab, i)
}

fn node_when_ready(lab: &mut Lab, i: usize) -> Result<Node> {
    lab.wait_ready(i, READY)?;
    node(lab, i)
}

/// A lab with the standard config and twilld running and ready on every node, fully meshed.
fn meshed_lab(n: usize) -> Result<(Lab, Vec<Node>)> {
    let mut lab = new_lab(n);
    lab.put_config(CONFIG)?;
    for i in 1..=n {
        lab.start_daemon(i)?;
    }
    let mut nodes = Vec::new();
    for i in 1..=n {
        lab.wait_ready(i, READY)?;
        nodes.push(node(&lab, i)?);
    }
    let all: Vec<usize> = (1..=n).collect();
    wait_mesh(&lab, &all, &nodes)?;
    Ok((lab, nodes))
}

/// A meshed two-node lab whose node 1 runs with `extra` flags.
fn two_nodes_first_with(extra: &[&str]) -> Result<(Lab, [Node; 2])> {
    let mut lab = new_lab(2);
    lab.put_config(CONFIG)?;
    lab.start_daemon_with(1, extra)?;
    let nodes = [node_when_ready(&mut lab, 1)?, start_ready(&mut lab, 2)?];
    wait_mesh(&lab, &[1, 2], &nodes)?;
    Ok((lab, nodes))
}

fn peers(st: &Value) -> Vec<Value> {
    st["peers"].as_array().cloned().unwrap_or_default()
}

/// Every node in `members` has complete kernel entries for every other member, and lists it on
/// /status as programmed. `nodes[k]` describes node k+1.
fn wait_mesh(lab: &Lab, members: &[usize], nodes: &[Node]) -> Result<()> {
    for &i in members {
        for &j in members.iter().filter(|&&j| j != i) {
            let p = &nodes[j - 1];
            wait_until(CONVERGE, || {
                lab.entries(i, DEV)
                    .map(|e| e.has_peer(&p.subnet, &p.mac, &p.public_ip))
                    .unwrap_or(false)
                    && lab
                        .status(i)
                        .map(|st| peer_programmed(&st, p))
                        .unwrap_or(false)
            })
            .with_context(|| {
                format!(
                    "node {i} never programmed node {j} {p:?}\nkernel: {:?}\nstatus: {:?}",
                    lab.entries(i, DEV),
                    lab.status(i)
                )
            })?;
        }
    }
    Ok(())
}

fn peer_programmed(st: &Value, p: &Node) -> bool {
    peers(st).iter().any(|x| {
        x["subnet"] == p.subnet.as_str()
            && x["public_ip"] == p.public_ip.as_str()
            && x["vtep_mac"]
                .as_str()
                .map(str::to_ascii_lowercase)
                .as_deref()
                == Some(p.mac.as_str())
            && x["programmed"] == true
    })
}

fn wait_ping(lab: &Lab, from: usize, dst: &str) -> Result<()> {
    wait_until(CONVERGE, || lab.ping(from, dst))
        .with_context(|| format!("node {from} cannot ping {dst}"))
}

fn metric(lab: &Lab, i: usize, name: &str) -> Result<f64> {
    lab.metric(i, name)?
        .ok_or_else(|| anyhow!("node {i} does not export {name}"))
}

fn lease_json(ip: &str, mac: &str) -> String {
    format!(
        r#"{{"PublicIP":"{ip}","PublicIPv6":null,"BackendType":"vxlan","BackendData":{{"VNI":1,"VtepMAC":"{mac}"}}}}"#
    )
}

fn put_lease(lab: &Lab, key: &str, value: &str) -> Result<()> {
    lab.etcdctl(&["put", &format!("{SUBNETS_PREFIX}{key}"), "--", value])
        .map(|_| ())
}

fn del_lease(lab: &Lab, key: &str) -> Result<()> {
    let out = lab.etcdctl(&["del", &format!("{SUBNETS_PREFIX}{key}")])?;
    ensure!(
        out.trim() == "1",
        "lease {key} was not there to delete: {out}"
    );
    Ok(())
}

/// "KEY=VALUE" lines of a file.
fn env_file(text: &str) -> Vec<(String, String)> {
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .filter_map(|l| l.split_once('=').map(|(k, v)| (k.to_owned(), v.to_owned())))
        .collect()
}

#[test]
fn three_nodes_get_distinct_subnets_and_reach_each_other() -> Result<()> {
    let (lab, nodes) = meshed_lab(3)?;

    // Distinct /24s inside the network, each node on its own underlay address.
    let subnets: BTreeSet<&str> = nodes.iter().map(|n| n.subnet.as_str()).collect();
    assert_eq!(subnets.len(), 3, "{nodes:?}");
    for (k, n) in nodes.iter().enumerate() {
        let i = k + 1;
        assert!(
            n.subnet.starts_with("10.244.") && n.subnet.ends_with(".0/24"),
            "{n:?}"
        );
        assert_ne!(
            n.subnet, "10.244.0.0/24",
            "the first subnet is reserved (SubnetMin)"
        );
        assert_eq!(n.public_ip, lab.node_ip(i).to_string());
        let st = lab.status(i)?;
        assert_eq!(st["ready"], true, "{st}");
        assert_eq!(st["network"], "10.244.0.0/16", "{st}");
        assert_eq!(st["node"]["device"], DEV, "{st}");
        assert_eq!(st["node"]["mtu"], 1450, "{st}");
        assert_eq!(peers(&st).len(), 2, "{st}");
        assert_eq!(metric(&lab, i, "twill_peers")?, 2.0);
    }

    // The same leases, in flannel's format, in etcd.
    let mut want_keys: Vec<String> = nodes.iter().map(Node::key).collect();
    want_keys.sort();
    assert_eq!(lab.lease_keys()?, want_keys);
    for n in &nodes {
        let v = lab
            .etcd_get(&format!("{SUBNETS_PREFIX}{}", n.key()))?
            .context("lease value")?;
        let v: Value = serde_json::from_str(&v)?;
        assert_eq!(v["PublicIP"], n.public_ip.as_str(), "{v}");
        assert_eq!(v["BackendType"], "vxlan", "{v}");
        assert_eq!(v["BackendData"]["VNI"], 1, "{v}");
        assert_eq!(
            v["BackendData"]["VtepMAC"]
                .as_str()
                .map(str::to_ascii_lowercase),
            Some(n.mac.clone()),
            "{v}"
        );
    }

    // The VXLAN device: VNI 1, the VTEP MAC, MTU 1450, the subnet's .0 as a /32.
    for (k, n) in nodes.iter().enumerate() {
        let i = k + 1;
        let link: Value =
            serde_json::from_str(&lab.exec_ok(i, &["ip", "-j", "-d", "link", "show", DEV])?)?;
        let link = &link[0];
        assert_eq!(link["linkinfo"]["info_kind"], "vxlan", "{link}");
        assert_eq!(link["linkinfo"]["info_data"]["id"], 1, "{link}");
        assert_eq!(
            link["linkinfo"]["info_data"]["local"],
            n.public_ip.as_str(),
            "{link}"
        );
        assert_eq!(link["address"].as_str(), Some(n.mac.as_str()), "{link}");
        assert_eq!(link["mtu"], 1450, "{link}");
        let addrs = lab.exec_ok(i, &["ip", "-4", "-o", "addr", "show", "dev", DEV])?;
        assert!(addrs.contains(&format!("inet {}/32", n.gw())), "{addrs}");
    }

    // Every node pings every other node's VTEP address through the overlay.
    for i in 1..=3 {
        for (k, n) in nodes.iter().enumerate() {
            if k + 1 != i {
                wait_ping(&lab, i, &n.gw())?;
            }
        }
    }

    // subnet.env in flannel's format: first usable address of the subnet, MTU of the device.
    for (k, n) in nodes.iter().enumerate() {
        let text = std::fs::read_to_string(lab.subnet_file(k + 1))?;
        let env = env_file(&text);
        let keys: Vec<&str> = env.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(
            keys,
            [
                "FLANNEL_NETWORK",
                "FLANNEL_SUBNET",
                "FLANNEL_MTU",
                "FLANNEL_IPMASQ"
            ],
            "{text}"
        );
        let first = format!(
            "{}.1/24",
            n.gw().strip_suffix(".0").context("gateway ends in .0")?
        );
        assert_eq!(env[0].1, "10.244.0.0/16", "{text}");
        assert_eq!(env[1].1, first, "{text}");
        assert_eq!(env[2].1, "1450", "{text}");
        assert!(env[3].1 == "true" || env[3].1 == "false", "{text}");
    }
    Ok(())
}

#[test]
fn daemon_waits_for_the_config_then_comes_up() -> Result<()> {
    let mut lab = new_lab(1);
    lab.start_daemon(1)?;
    let (code, _) = lab.wait_get(1, "/readyz", READY)?;
    assert_eq!(code, 503, "ready without a config");
    wait_until(READY, || {
        let log = lab.daemon_log_last(1).to_ascii_lowercase();
        log.contains("wait") && log.contains("config")
    })
    .with_context(|| {
        format!(
            "the log never says it waits for the config:\n{}",
            lab.daemon_log(1)
        )
    })?;
    // Still waiting, not crashed, nothing leased or written.
    assert!(lab.daemon_running(1));
    assert_eq!(lab.get(1, "/healthz")?.0, 200);
    assert_eq!(lab.get(1, "/readyz")?.0, 503);
    assert!(!lab.subnet_file(1).exists());
    assert!(lab.lease_keys()?.is_empty());

    lab.put_config(CONFIG)?;
    lab.wait_ready(1, READY)?;
    let n = node(&lab, 1)?;
    assert!(lab.subnet_file(1).exists());
    assert_eq!(lab.lease_keys()?, vec![n.key()]);
    assert_eq!(lab.status(1)?["ready"], true);
    Ok(())
}

#[test]
fn peer_entries_follow_joins_and_lease_deletions() -> Result<()> {
    let mut lab = new_lab(2);
    lab.put_config(CONFIG)?;
    let n1 = start_ready(&mut lab, 1)?;
    // Alone: no peer entries at all.
    let e = lab.entries(1, DEV)?;
    assert!(
        e.routes.is_empty() && e.fdb.is_empty() && e.neigh.is_empty(),
        "{e:?}"
    );
    assert!(peers(&lab.status(1)?).is_empty());

    // Node 2 joins: both sides get the other's entries.
    let n2 = start_ready(&mut lab, 2)?;
    let nodes = [n1.clone(), n2.clone()];
    wait_mesh(&lab, &[1, 2], &nodes)?;
    wait_ping(&lab, 1, &n2.gw())?;

    // Its lease deleted behind its back, node 2 takes the same subnet again.
    let reacquired_before = metric(&lab, 2, "twill_lease_reacquisitions_total")?;
    del_lease(&lab, &n2.key())?;
    wait_until(CONVERGE, || {
        lab.lease_keys()
            .map(|k| k.contains(&n2.key()))
            .unwrap_or(false)
    })
    .context("node 2 never re-acquired its lease")?;
    let v: Value = serde_json::from_str(
        &lab.etcd_get(&format!("{SUBNETS_PREFIX}{}", n2.key()))?
            .unwrap(),
    )?;
    assert_eq!(v["PublicIP"], n2.public_ip.as_str());
    assert_eq!(node(&lab, 2)?, n2, "same subnet and MAC after re-acquiring");
    wait_until(CONVERGE, || {
        metric(&lab, 2, "twill_lease_reacquisitions_total")
            .map(|m| m > reacquired_before)
            .unwrap_or(false)
    })?;
    wait_mesh(&lab, &[1, 2], &nodes)?;

    // With node 2 stopped, deleting its lease removes every entry for it on node 1.
    assert!(lab.stop_daemon(2)?.success());
    let removed_before = metric(&lab, 1, "twill_kernel_entries_removed_total")?;
    del_lease(&lab, &n2.key())?;
    wait_until(CONVERGE, || {
        lab.entries(1, DEV)
            .map(|e| e.lacks_peer(&n2.subnet, &n2.mac))
            .unwrap_or(false)
    })
    .with_context(|| format!("node 1 kept node 2's entries: {:?}", lab.entries(1, DEV)))?;
    wait_until(CONVERGE, || {
        lab.status(1)
            .map(|st| peers(&st).is_empty())
            .unwrap_or(false)
    })?;
    assert_eq!(metric(&lab, 1, "twill_peers")?, 0.0);
    assert!(metric(&lab, 1, "twill_kernel_entries_removed_total")? > removed_before);

    // Back again: same subnet, same MAC, entries return on node 1.
    let again = start_ready(&mut lab, 2)?;
    assert_eq!(again, n2);
    wait_mesh(&lab, &[1, 2], &nodes)?;
    wait_ping(&lab, 2, &n1.gw())?;
    Ok(())
}

/// (transmitted, received) from ping's summary line.
fn ping_summary(out: &str) -> Result<(u32, u32)> {
    let line = out
        .lines()
        .find(|l| l.contains("packets transmitted"))
        .ok_or_else(|| anyhow!("no ping summary in {out:?}"))?;
    let num = |tag: &str| -> Result<u32> {
        let part = line
            .split(',')
            .find(|p| p.contains(tag))
            .ok_or_else(|| anyhow!("no {tag} in {line:?}"))?;
        Ok(part.split_whitespace().next().unwrap_or_default().parse()?)
    };
    Ok((num("transmitted")?, num("received")?))
}

/// The icmp_seq numbers that got a reply.
fn ping_replies(out: &str) -> BTreeSet<u32> {
    out.lines()
        .filter(|l| l.contains("bytes from"))
        .filter_map(|l| {
            l.split_whitespace()
                .find_map(|w| w.strip_prefix("icmp_seq=")?.parse().ok())
        })
        .collect()
}

#[test]
fn kill_and_restart_keeps_identity_and_other_traffic_flows() -> Result<()> {
    let (mut lab, nodes) = meshed_lab(3)?;
    let before = nodes[2].clone();

    // Continuous ping between nodes 1 and 2 over the overlay for the whole restart of node 3.
    let ping = lab.spawn(1, &["ping", "-n", "-i", "0.2", "-W", "1", &nodes[1].gw()])?;
    std::thread::sleep(Duration::from_secs(1));

    let status = lab.kill_daemon(3)?;
    assert!(
        !status.success(),
        "SIGKILL must not look like a clean exit: {status}"
    );
    let after = start_ready(&mut lab, 3)?;
    assert_eq!(after, before, "subnet or VTEP MAC changed across kill -9");
    let lease = lab
        .etcd_get(&format!("{SUBNETS_PREFIX}{}", before.key()))?
        .context("node 3 lease")?;
    let lease: Value = serde_json::from_str(&lease)?;
    assert_eq!(lease["PublicIP"], before.public_ip.as_str(), "{lease}");
    assert_eq!(
        lease["BackendData"]["VtepMAC"]
            .as_str()
            .map(str::to_ascii_lowercase),
        Some(before.mac.clone()),
        "{lease}"
    );
    assert_eq!(lab.lease_keys()?.len(), 3, "a second lease appeared");
    wait_mesh(&lab, &[1, 2, 3], &nodes)?;
    wait_ping(&lab, 3, &nodes[0].gw())?;
    wait_ping(&lab, 2, &nodes[2].gw())?;
    std::thread::sleep(Duration::from_secs(1));

    kill(Pid::from_raw(ping.id() as i32), Signal::SIGINT)?;
    let out = ping.wait_with_output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let (sent, _) = ping_summary(&text)?;
    assert!(sent >= 5, "ping barely ran: {text}");
    // Every echo must have been answered. The last one may still have been in flight when ping
    // was interrupted (ping counts it as lost), so it alone is not held against the overlay.
    let answered = ping_replies(&text);
    let lost: Vec<u32> = (1..sent).filter(|s| !answered.contains(s)).collect();
    assert!(
        lost.is_empty(),
        "node 1 -> node 2 lost echoes {lost:?} while node 3 restarted:\n{text}"
    );
    Ok(())
}

#[test]
fn entries_deleted_by_hand_come_back() -> Result<()> {
    let (lab, nodes) = meshed_lab(2)?;
    let p = &nodes[1];
    let gw = p.gw();
    let has = |lab: &Lab| {
        lab.entries(1, DEV)
            .map(|e| e.has_peer(&p.subnet, &p.mac, &p.public_ip))
            .unwrap_or(false)
    };

    // Only the FDB entry: a reconcile that looks at routes alone would miss it.
    let added_before = metric(&lab, 1, "twill_kernel_entries_added_total")?;
    lab.exec_ok(
        1,
        &[
            "bridge",
            "fdb",
            "del",
            &p.mac,
            "dev",
            DEV,
            "dst",
            &p.public_ip,
            "self",
        ],
    )?;
    wait_until(CONVERGE, || has(&lab)).context("FDB entry not restored")?;
    assert!(metric(&lab, 1, "twill_kernel_entries_added_total")? > added_before);

    // All three.
    let added_before = metric(&lab, 1, "twill_kernel_entries_added_total")?;
    lab.exec_ok(1, &["ip", "route", "del", &p.subnet, "dev", DEV])?;
    lab.exec_ok(1, &["ip", "neigh", "del", &gw, "dev", DEV])?;
    // The route and neighbour may already be back; the FDB delete must not fail the test then.
    let _ = lab.exec(
        1,
        &[
            "bridge",
            "fdb",
            "del",
            &p.mac,
            "dev",
            DEV,
            "dst",
            &p.public_ip,
            "self",
        ],
    );
    wait_until(CONVERGE, || has(&lab))
        .with_context(|| format!("entries not restored: {:?}", lab.entries(1, DEV)))?;
    assert!(metric(&lab, 1, "twill_kernel_entries_added_total")? > added_before);
    wait_ping(&lab, 1, &gw)?;
    wait_ping(&lab, 2, &nodes[0].gw())?;
    Ok(())
}

#[test]
fn a_hand_deletion_among_our_own_changes_is_repaired_at_once() -> Result<()> {
    // No periodic resync to fall back on within the test: only the kernel event can repair.
    let mut lab = new_lab(1);
    lab.put_config(CONFIG)?;
    lab.start_daemon_with(1, &["--resync-interval", "300s"])?;
    lab.wait_ready(1, READY)?;
    let (a, b) = ("10.244.210.0/24", "10.244.211.0/24");
    put_lease(
        &lab,
        "10.244.210.0-24",
        &lease_json("198.18.0.90", "0e:00:00:00:00:90"),
    )?;
    put_lease(
        &lab,
        "10.244.211.0-24",
        &lease_json("198.18.0.91", "0e:00:00:00:00:91"),
    )?;
    let routes = |lab: &Lab| {
        lab.entries(1, DEV)
            .map(|e| (e.has_route(a), e.has_route(b)))
    };
    wait_until(CONVERGE, || routes(&lab).is_ok_and(|r| r == (true, true)))
        .context("peers never programmed")?;
    // twilld deletes a's entries (their notifications are its own echo), and right then
    // someone else deletes b's route: that one is news and must be repaired.
    del_lease(&lab, "10.244.210.0-24")?;
    lab.exec_ok(1, &["ip", "route", "del", b, "dev", DEV])?;
    wait_until(CONVERGE, || routes(&lab).is_ok_and(|r| r == (false, true)))
        .with_context(|| format!("b's route not restored: {:?}", lab.entries(1, DEV)))?;
    Ok(())
}

#[test]
fn etcd_restart_and_compaction_are_survived() -> Result<()> {
    let mut lab = new_lab(3);
    lab.put_config(CONFIG)?;
    let n1 = start_ready(&mut lab, 1)?;
    let n2 = start_ready(&mut lab, 2)?;
    wait_mesh(&lab, &[1, 2], &[n1.clone(), n2.clone()])?;

    // etcd down: the daemons keep running and the data path keeps working.
    lab.stop_etcd()?;
    std::thread::sleep(Duration::from_secs(3));
    for i in 1..=2 {
        assert!(
            lab.daemon_running(i),
            "node {i} died without etcd:\n{}",
            lab.daemon_log(i)
        );
        assert_eq!(lab.get(i, "/healthz")?.0, 200);
    }
    assert!(lab
        .entries(1, DEV)?
        .has_peer(&n2.subnet, &n2.mac, &n2.public_ip));
    wait_ping(&lab, 1, &n2.gw())?;

    // etcd back: a node joining afterwards is seen by both.
    lab.start_etcd()?;
    let n3 = start_ready(&mut lab, 3)?;
    let nodes = [n1.clone(), n2.clone(), n3.clone()];
    wait_mesh(&lab, &[1, 2, 3], &nodes)?;
    wait_ping(&lab, 1, &n3.gw())?;

    // A (fake) peer B that node 1 knows about...
    let b = Node {
        subnet: "10.244.201.0/24".into(),
        public_ip: "198.18.0.201".into(),
        mac: "0e:00:00:00:02:01".into(),
    };
    let a = Node {
        subnet: "10.244.200.0/24".into(),
        public_ip: "198.18.0.200".into(),
        mac: "0e:00:00:00:02:00".into(),
    };
    put_lease(&lab, &b.key(), &lease_json(&b.public_ip, &b.mac))?;
    wait_until(CONVERGE, || {
        lab.entries(1, DEV)
            .map(|e| e.has_peer(&b.subnet, &b.mac, &b.public_ip))
            .unwrap_or(false)
    })?;

    // ...then node 1 loses etcd (restart breaks its connection, the partition keeps it out)
    // while B leaves, A joins and the history is compacted past what node 1 has seen.
    let reconnects_before = metric(&lab, 1, "twill_etcd_reconnects_total")?;
    lab.cut_from_etcd(1)?;
    lab.stop_etcd()?;
    lab.start_etcd()?;
    del_lease(&lab, &b.key())?;
    put_lease(&lab, &a.key(), &lease_json(&a.public_ip, &a.mac))?;
    for k in 0..5 {
        lab.etcdctl(&["put", "/twill-test/churn", &k.to_string()])?;
    }
    lab.compact_etcd()?;
    // Node 2 is connected and sees the changes through its watch.
    wait_until(CONVERGE, || {
        lab.entries(2, DEV)
            .map(|e| e.has_peer(&a.subnet, &a.mac, &a.public_ip) && e.lacks_peer(&b.subnet, &b.mac))
            .unwrap_or(false)
    })?;

    // Healed, node 1 must catch up although its watch revision was compacted away.
    lab.heal_from_etcd(1)?;
    wait_until(CONVERGE, || {
        lab.entries(1, DEV)
            .map(|e| e.has_peer(&a.subnet, &a.mac, &a.public_ip) && e.lacks_peer(&b.subnet, &b.mac))
            .unwrap_or(false)
    })
    .with_context(|| {
        format!(
            "node 1 did not resync after compaction: {:?}\n{}",
            lab.entries(1, DEV),
            lab.daemon_log(1)
        )
    })?;
    assert!(metric(&lab, 1, "twill_etcd_reconnects_total")? > reconnects_before);
    // The real peers are untouched and node 1 still holds its lease.
    wait_mesh(&lab, &[1, 2, 3], &nodes)?;
    assert!(lab.lease_keys()?.contains(&n1.key()));
    for i in 1..=3 {
        assert!(lab.daemon_running(i));
    }
    Ok(())
}

#[test]
fn garbage_leases_are_skipped() -> Result<()> {
    let mut lab = new_lab(3);
    lab.put_config(CONFIG)?;
    let missing_mac = r#"{"PublicIP":"198.18.0.60","BackendType":"vxlan","BackendData":{"VNI":1}}"#;
    // Present before the daemons start (read by the initial list)...
    put_lease(&lab, "10.244.50.0-24", "this is not json")?;
    put_lease(
        &lab,
        "10.245.0.0-24",
        &lease_json("198.18.0.70", "0e:00:00:00:00:70"),
    )?;
    put_lease(&lab, "10.244.60.0-24", missing_mac)?;
    put_lease(
        &lab,
        "not-a-subnet",
        &lease_json("198.18.0.71", "0e:00:00:00:00:71"),
    )?;
    let n1 = start_ready(&mut lab, 1)?;
    let n2 = start_ready(&mut lab, 2)?;
    wait_mesh(&lab, &[1, 2], &[n1.clone(), n2.clone()])?;

    // ...and arriving through the watch: one overlapping node 1's subnet, more bad JSON. These
    // keys lie beyond the first 100 free subnets, the only ones a daemon picks from: a running
    // node may hold any subnet below them.
    let overlap = n1.subnet.replace("/24", "-25");
    put_lease(
        &lab,
        &overlap,
        &lease_json("198.18.0.72", "0e:00:00:00:00:72"),
    )?;
    put_lease(&lab, "10.244.151.0-24", "{")?;
    put_lease(
        &lab,
        "10.244.152.0-24",
        r#"{"PublicIP":"198.18.0.73","BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":""}}"#,
    )?;

    // A real node joining afterwards is still picked up: the watch survived the garbage.
    let n3 = start_ready(&mut lab, 3)?;
    let nodes = [n1.clone(), n2.clone(), n3.clone()];
    wait_mesh(&lab, &[1, 2, 3], &nodes)?;

    for i in 1..=3 {
        assert!(
            lab.daemon_running(i),
            "node {i} died:\n{}",
            lab.daemon_log(i)
        );
        wait_until(CONVERGE, || {
            metric(&lab, i, "twill_invalid_leases_skipped_total")
                .map(|m| m > 0.0)
                .unwrap_or(false)
        })
        .with_context(|| format!("node {i} does not count skipped leases"))?;
        let st = lab.status(i)?;
        assert_eq!(peers(&st).len(), 2, "only the two real peers: {st}");
        let e = lab.entries(i, DEV)?;
        for bad in [
            "10.244.50.0/24",
            "10.245.0.0/24",
            "10.244.60.0/24",
            "10.244.151.0/24",
            "10.244.152.0/24",
        ] {
            assert!(
                !e.has_route(bad),
                "node {i} programmed garbage {bad}: {e:?}"
            );
        }
        assert!(
            !e.has_route(&n1.subnet.replace("/24", "/25")),
            "node {i}: {e:?}"
        );
        assert_eq!(e.routes.len(), 2, "node {i}: {e:?}");
    }
    wait_ping(&lab, 1, &n2.gw())?;
    wait_ping(&lab, 3, &n1.gw())?;
    Ok(())
}

/// `programmed` on /status for the peer with `subnet`, if it is listed.
fn programmed(st: &Value, subnet: &str) -> Option<bool> {
    peers(st)
        .iter()
        .find(|x| x["subnet"] == subnet)
        .and_then(|x| x["programmed"].as_bool())
}

#[test]
fn programmed_is_tracked_per_peer() -> Result<()> {
    let mut lab = new_lab(1);
    lab.put_config(CONFIG)?;
    start_ready(&mut lab, 1)?;
    // The kernel refuses one peer's route when its gateway is a local address of the node
    // ("Nexthop has invalid gateway"): hold 10.244.201.0 on a veth in node 1's namespace.
    let ns = lab.node_ns(1);
    let (a, b) = (format!("{}lp", lab.prefix()), format!("{}lq", lab.prefix()));
    twill_tests::netns::run_ok(&[
        "ip", "-n", &ns, "link", "add", &a, "type", "veth", "peer", "name", &b,
    ])?;
    twill_tests::netns::run_ok(&["ip", "-n", &ns, "link", "set", &a, "up"])?;
    twill_tests::netns::run_ok(&["ip", "-n", &ns, "addr", "add", "10.244.201.0/32", "dev", &a])?;
    let (good, bad) = ("10.244.200.0/24", "10.244.201.0/24");
    put_lease(
        &lab,
        "10.244.200.0-24",
        &lease_json("198.18.0.80", "0e:00:00:00:00:80"),
    )?;
    put_lease(
        &lab,
        "10.244.201.0-24",
        &lease_json("198.18.0.81", "0e:00:00:00:00:81"),
    )?;
    let split =
        |st: &Value| programmed(st, good) == Some(true) && programmed(st, bad) == Some(false);
    wait_until(CONVERGE, || {
        lab.status(1).map(|st| split(&st)).unwrap_or(false)
    })
    .with_context(|| format!("status: {:?}", lab.status(1)))?;
    ensure!(metric(&lab, 1, "twill_kernel_entry_failures_total")? > 0.0);
    // Periodic reconciles (every 2 s in the lab) retry the route and keep the split.
    std::thread::sleep(Duration::from_secs(5));
    let st = lab.status(1)?;
    ensure!(split(&st), "after reconciles: {st}");
    ensure!(lab.entries(1, DEV)?.has_route(good));

    // The address goes away: the next reconcile programs the peer.
    twill_tests::netns::run_ok(&["ip", "-n", &ns, "addr", "del", "10.244.201.0/32", "dev", &a])?;
    wait_until(CONVERGE, || {
        lab.status(1)
            .map(|st| programmed(&st, good) == Some(true) && programmed(&st, bad) == Some(true))
            .unwrap_or(false)
            && lab
                .entries(1, DEV)
                .map(|e| e.has_route(bad))
                .unwrap_or(false)
    })
    .with_context(|| format!("status: {:?}", lab.status(1)))?;
    Ok(())
}

#[test]
fn invalid_config_is_refused_naming_the_field() -> Result<()> {
    let mut lab = new_lab(1);
    let cases = [
        (
            r#"{"Network":"10.244.0.0/16","SubnetLen":31,"Backend":{"Type":"vxlan"}}"#,
            "SubnetLen",
        ),
        (
            r#"{"Network":"10.244.0.0/16","SubnetMin":"10.99.0.0","Backend":{"Type":"vxlan"}}"#,
            "SubnetMin",
        ),
    ];
    for (config, field) in cases {
        lab.put_config(config)?;
        lab.start_daemon(1)?;
        wait_until(READY, || {
            !lab.daemon_running(1) || lab.daemon_log_last(1).contains(field)
        })
        .with_context(|| format!("no word about {field}:\n{}", lab.daemon_log_last(1)))?;
        let log = lab.daemon_log_last(1);
        assert!(log.contains(field), "the refusal must name {field}:\n{log}");
        if lab.daemon_running(1) {
            // Still waiting for a valid config is acceptable; becoming ready is not.
            assert_eq!(lab.get(1, "/readyz")?.0, 503, "{log}");
            lab.stop_daemon(1)?;
        } else {
            let status = lab.wait_daemon_exit(1, READY)?;
            assert!(
                !status.success(),
                "refusing a config must not exit 0:\n{log}"
            );
        }
        assert!(
            lab.lease_keys()?.is_empty(),
            "leased a subnet under an invalid config"
        );
        assert!(!lab.subnet_file(1).exists());
    }
    Ok(())
}

#[test]
fn sigterm_exits_zero_and_leaves_the_data_path_in_place() -> Result<()> {
    let (mut lab, nodes) = meshed_lab(2)?;
    let (n1, n2) = (&nodes[0], &nodes[1]);
    let key1 = format!("{SUBNETS_PREFIX}{}", n1.key());
    let lease = lab.etcd_get(&key1)?.context("node 1 lease")?;

    let status = lab.stop_daemon(1)?;
    assert_eq!(
        status.code(),
        Some(0),
        "SIGTERM must exit 0:\n{}",
        lab.daemon_log(1)
    );
    // Longer than the resync interval, so that anything a stopping daemon left to do has run.
    std::thread::sleep(Duration::from_secs(3));

    // Device, address and peer entries stay; so does the lease; node 2 keeps node 1.
    let addrs = lab.exec_ok(1, &["ip", "-4", "-o", "addr", "show", "dev", DEV])?;
    assert!(addrs.contains(&format!("inet {}/32", n1.gw())), "{addrs}");
    assert!(lab
        .entries(1, DEV)?
        .has_peer(&n2.subnet, &n2.mac, &n2.public_ip));
    assert_eq!(lab.etcd_get(&key1)?.as_deref(), Some(lease.as_str()));
    assert!(lab
        .entries(2, DEV)?
        .has_peer(&n1.subnet, &n1.mac, &n1.public_ip));
    // The kernel forwards without the daemon.
    wait_ping(&lab, 2, &n1.gw())?;
    wait_ping(&lab, 1, &n2.gw())?;

    // Restarted, it is the same node.
    assert_eq!(start_ready(&mut lab, 1)?, *n1);
    Ok(())
}

/// A SIGTERM that comes while twilld is still starting (its backend being set up, its first
/// passes running) is honoured, whenever it comes: the daemon exits soon after (before its
/// signal handler exists, the signal's default action ends it). It used to be lost between the
/// start's waits, and twilld ran on until SIGKILL. Each stop fails after 30 s of waiting.
#[test]
fn sigterm_while_starting_is_honoured() -> Result<()> {
    let mut lab = new_lab(1);
    lab.put_config(CONFIG)?;
    // The first start makes the VXLAN device and the lease; the rest take the shorter path a
    // restart takes, with the same windows.
    for delay_ms in [0u64, 20, 50, 100, 150, 200, 300, 400, 600, 900] {
        lab.start_daemon(1)?;
        std::thread::sleep(Duration::from_millis(delay_ms));
        let status = lab
            .stop_daemon(1)
            .with_context(|| format!("SIGTERM {delay_ms} ms after the start"))?;
        use std::os::unix::process::ExitStatusExt;
        assert!(
            status.code() == Some(0) || status.signal() == Some(libc::SIGTERM),
            "SIGTERM {delay_ms} ms after the start: {status}\n{}",
            lab.daemon_log(1)
        );
    }
    Ok(())
}

#[test]
fn ping_summary_is_parsed() -> Result<()> {
    let out = "--- 10.244.2.0 ping statistics ---\n25 packets transmitted, 24 received, 4% packet loss, time 4800ms\n";
    assert_eq!(ping_summary(out)?, (25, 24));
    let replies = "PING 10.244.2.0 (10.244.2.0) 56(84) bytes of data.\n\
        64 bytes from 10.244.2.0: icmp_seq=1 ttl=64 time=0.08 ms\n\
        From 10.244.1.0 icmp_seq=2 Destination Host Unreachable\n\
        64 bytes from 10.244.2.0: icmp_seq=3 ttl=64 time=0.07 ms\n";
    assert_eq!(ping_replies(replies), BTreeSet::from([1, 3]));
    if ping_summary("nothing").is_ok() {
        bail!("parsed a summary out of nothing");
    }
    Ok(())
}

#[test]
fn underlay_address_change_moves_the_tunnel_endpoint() -> Result<()> {
    let (lab, nodes) = meshed_lab(2)?;
    let old = nodes[0].clone();
    // Node 1's underlay address changes under the daemon (DHCP renumbering, operator change).
    let new_ip = "198.18.0.61";
    lab.renumber(1, &old.public_ip, new_ip)?;
    // The lease now advertises the new address, with the same subnet and MAC.
    wait_until(CONVERGE, || {
        lab.etcd_get(&format!("{SUBNETS_PREFIX}{}", old.key()))
            .ok()
            .flatten()
            .is_some_and(|v| v.contains(&format!("\"PublicIP\":\"{new_ip}\"")))
    })
    .with_context(|| format!("lease not updated; log:\n{}", lab.daemon_log_last(1)))?;
    let moved = Node {
        public_ip: new_ip.into(),
        ..old.clone()
    };
    wait_until(CONVERGE, || node(&lab, 1).is_ok_and(|n| n == moved))
        .with_context(|| format!("/status of node 1: {:?}", lab.status(1)))?;
    // The device tunnels from the new address, and node 2 sends to it.
    let link = lab.exec_ok(1, &["ip", "-d", "link", "show", DEV])?;
    ensure!(
        link.contains(&format!("local {new_ip}")),
        "device still on the old address: {link}"
    );
    wait_mesh(&lab, &[1, 2], &[moved.clone(), nodes[1].clone()])?;
    let fdb = lab.exec_ok(2, &["bridge", "fdb", "show", "dev", DEV])?;
    ensure!(
        !fdb.contains(&format!("dst {} ", old.public_ip)),
        "stale FDB entry on node 2: {fdb}"
    );
    wait_ping(&lab, 2, &moved.gw())?;
    wait_ping(&lab, 1, &nodes[1].gw())?;
    Ok(())
}

/// flannel #1070/#1348: a link flap loses routes and nothing re-adds them. The kernel flushes the
/// routes through a device that goes down; twilld sets its device up again if it was left down
/// and puts the routes back, on the kernel's events (node 1 has no periodic resync within the
/// test). An underlay flap must leave the overlay working too. twilld is paused during each flap
/// so the test sees the loss it must repair (the events wait for it in its netlink socket).
#[test]
fn link_flaps_are_repaired() -> Result<()> {
    let (lab, nodes) = two_nodes_first_with(&["--resync-interval", "300s"])?;
    let p = &nodes[1];
    let pid = Pid::from_raw(lab.daemon_pid(1).context("twilld pid")? as i32);
    let complete = |lab: &Lab| {
        lab.entries(1, DEV)
            .map(|e| e.has_peer(&p.subnet, &p.mac, &p.public_ip))
            .unwrap_or(false)
    };
    // (device, set up again by hand): a device left down is twilld's to bring up.
    for (dev, up_again) in [(DEV, true), (DEV, false), ("eth0", true)] {
        kill(pid, Signal::SIGSTOP)?;
        let mut flap = lab.exec_ok(1, &["ip", "link", "set", dev, "down"]);
        if up_again {
            flap = flap.and_then(|_| lab.exec_ok(1, &["ip", "link", "set", dev, "up"]));
        }
        let lost = !complete(&lab);
        kill(pid, Signal::SIGCONT)?;
        flap?;
        if dev == DEV {
            ensure!(
                lost,
                "the kernel kept the routes through {DEV}: the test proves nothing"
            );
        }
        wait_until(CONVERGE, || complete(&lab)).with_context(|| {
            format!(
                "entries not back after {dev} went down (up again by hand: {up_again}): {:?}\n{}",
                lab.entries(1, DEV),
                lab.daemon_log(1)
            )
        })?;
        wait_ping(&lab, 1, &p.gw())?;
        wait_ping(&lab, 2, &nodes[0].gw())?;
    }
    Ok(())
}

/// Is tx-checksum-ip-generic on for `dev` on node i (`ethtool -k`)?
fn tx_checksum_on(lab: &Lab, i: usize, dev: &str) -> Result<bool> {
    let out = lab.exec_ok(i, &["ethtool", "-k", dev])?;
    out.lines()
        .find(|l| l.trim_start().starts_with("tx-checksum-ip-generic:"))
        .map(|l| l.contains(": on"))
        .with_context(|| format!("no tx-checksum-ip-generic in ethtool -k:\n{out}"))
}

/// flannel #1268: `--vxlan-checksum-offload off` turns the device's transmit checksum offload
/// off, and TCP between pods still flows; `auto` leaves it on where the kernel is fixed (5.7+).
#[test]
fn checksum_offload_setting_reaches_the_device() -> Result<()> {
    let (mut lab, _) = two_nodes_first_with(&["--vxlan-checksum-offload", "off"])?;
    assert!(!tx_checksum_on(&lab, 1, DEV)?, "{}", lab.daemon_log(1));
    assert_eq!(lab.status(1)?["node"]["tx_checksum_offload"], false);
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease")?;
    let mut v = release.trim().split(|c: char| !c.is_ascii_digit());
    let (major, minor): (u32, u32) = (
        v.next().unwrap_or("0").parse()?,
        v.next().unwrap_or("0").parse()?,
    );
    assert_eq!(
        tx_checksum_on(&lab, 2, DEV)?,
        (major, minor) >= (5, 7),
        "auto on kernel {release}: {}",
        lab.daemon_log(2)
    );
    assert_eq!(
        lab.status(2)?["node"]["tx_checksum_offload"],
        (major, minor) >= (5, 7)
    );
    let a = lab.add_pod(1, "a")?;
    let b = lab.add_pod(2, "b")?;
    for (from, to) in [(&a, &b), (&b, &a)] {
        wait_until(CONVERGE, || from.ping(to.ip))?;
        let probe = twill_tests::tcp_probe(from, to, 7777, Duration::from_secs(5))?;
        assert_eq!(probe.source_seen, from.ip);
    }
    Ok(())
}

/// A VXLAN device `name` on node i with twill's VNI (1) and port (8472), local = the node's
/// address: what flanneld leaves behind as `flannel.1`.
fn add_vxlan_on_our_vni(lab: &Lab, i: usize, name: &str) -> Result<()> {
    let ip = lab.node_ip(i).to_string();
    let args =
        format!("ip link add {name} type vxlan id 1 local {ip} dev eth0 dstport 8472 nolearning");
    lab.exec_ok(i, &args.split(' ').collect::<Vec<_>>())
        .map(|_| ())
}

/// Moving a node from flanneld to twilld. Node 1 starts as a flanneld node would leave it: its
/// lease in flannel's format, `flannel.1` (same VNI and port as twill's device) programmed for
/// node 2, which runs twilld: the two kinds of node reach each other. Then twilld starts on
/// node 1 (flanneld stopped): it keeps the subnet, takes over from `flannel.1`, publishes its
/// own VTEP MAC, and node 2 follows.
#[test]
fn a_flannel_node_moves_to_twill_keeping_its_subnet() -> Result<()> {
    let mut lab = new_lab(2);
    lab.put_config(CONFIG)?;
    let subnet = "10.244.177.0/24";
    let gw = subnet_gateway(subnet);
    let ip1 = lab.node_ip(1).to_string();
    add_vxlan_on_our_vni(&lab, 1, "flannel.1")?;
    lab.exec_ok(
        1,
        &["ip", "addr", "add", &format!("{gw}/32"), "dev", "flannel.1"],
    )?;
    lab.exec_ok(1, &["ip", "link", "set", "flannel.1", "up"])?;
    let flannel_mac = lab
        .exec_ok(1, &["cat", "/sys/class/net/flannel.1/address"])?
        .trim()
        .to_string();
    put_lease(&lab, "10.244.177.0-24", &lease_json(&ip1, &flannel_mac))?;

    // Node 2 (twilld) programs the flannel node; the flannel node gets node 2 by hand, as
    // flanneld would program it.
    let n2 = start_ready(&mut lab, 2)?;
    let flannel_node = Node {
        subnet: subnet.into(),
        public_ip: ip1.clone(),
        mac: flannel_mac.clone(),
    };
    wait_mesh(&lab, &[2], &[flannel_node.clone(), n2.clone()])?;
    let n2gw = n2.gw();
    for cmd in [
        vec![
            "ip",
            "neigh",
            "add",
            &n2gw,
            "lladdr",
            &n2.mac,
            "dev",
            "flannel.1",
            "nud",
            "permanent",
        ],
        vec![
            "bridge",
            "fdb",
            "add",
            &n2.mac,
            "dev",
            "flannel.1",
            "dst",
            &n2.public_ip,
            "self",
            "permanent",
        ],
        vec![
            "ip",
            "route",
            "add",
            &n2.subnet,
            "via",
            &n2gw,
            "dev",
            "flannel.1",
            "onlink",
        ],
    ] {
        lab.exec_ok(1, &cmd)?;
    }
    wait_ping(&lab, 1, &n2gw).context("flannel node -> twill node")?;
    wait_ping(&lab, 2, &gw).context("twill node -> flannel node")?;

    // flanneld stopped, twilld started: same subnet, flannel.1 gone, a new MAC everywhere.
    let n1 = start_ready(&mut lab, 1)?;
    assert_eq!(n1.subnet, subnet, "{}", lab.daemon_log(1));
    assert_ne!(n1.mac, flannel_mac);
    assert!(
        !lab.exec(1, &["ip", "link", "show", "flannel.1"])?
            .status
            .success(),
        "flannel.1 still there"
    );
    assert!(lab.daemon_log(1).contains("taking over from flanneld"));
    assert_eq!(lab.lease_keys()?.len(), 2, "{:?}", lab.lease_keys());
    wait_mesh(&lab, &[1, 2], &[n1.clone(), n2.clone()])?;
    wait_until(CONVERGE, || {
        lab.entries(2, DEV)
            .map(|e| {
                !e.fdb
                    .iter()
                    .any(|f| f.mac.eq_ignore_ascii_case(&flannel_mac))
                    && !e.neigh.iter().any(|n| {
                        n.lladdr
                            .as_deref()
                            .is_some_and(|m| m.eq_ignore_ascii_case(&flannel_mac))
                    })
            })
            .unwrap_or(false)
    })
    .context("node 2 kept the flannel MAC")?;
    wait_ping(&lab, 1, &n2gw)?;
    wait_ping(&lab, 2, &gw)?;
    Ok(())
}

/// Any other VXLAN device on our VNI and port is not taken over: twilld refuses to start and
/// names it.
#[test]
fn a_foreign_device_on_our_vni_is_named_not_deleted() -> Result<()> {
    let mut lab = new_lab(1);
    lab.put_config(CONFIG)?;
    add_vxlan_on_our_vni(&lab, 1, "other.1")?;
    lab.start_daemon(1)?;
    let status = lab.wait_daemon_exit(1, READY)?;
    assert!(!status.success());
    let log = lab.daemon_log(1);
    assert!(
        log.contains("VXLAN VNI 1 on UDP port 8472 is already used by other.1"),
        "{log}"
    );
    assert!(lab
        .exec(1, &["ip", "link", "show", "other.1"])?
        .status
        .success());
    Ok(())
}

/// The subnet file cannot be written at first (its directory's place is taken by a file): the
/// node stays not ready and says why, then writes it and becomes ready once that is fixed.
#[test]
fn a_failed_subnet_file_write_is_retried() -> Result<()> {
    let mut lab = new_lab(1);
    lab.put_config(CONFIG)?;
    let blocker = lab.node_dir(1).join("blocked");
    std::fs::write(&blocker, "not a directory")?;
    let file = blocker.join("subnet.env");
    let file_arg = file.display().to_string();
    lab.start_daemon_with(1, &["--subnet-file", &file_arg])?;
    wait_until(READY, || {
        lab.status(1)
            .map(|s| {
                s["waiting_for"]
                    .as_str()
                    .is_some_and(|w| w.starts_with("subnet file"))
            })
            .unwrap_or(false)
    })
    .with_context(|| format!("{:?}\n{}", lab.status(1), lab.daemon_log(1)))?;
    assert_eq!(lab.get(1, "/readyz")?.0, 503);
    std::fs::remove_file(&blocker)?;
    lab.wait_ready(1, READY)?;
    assert!(std::fs::read_to_string(&file)?.contains("FLANNEL_SUBNET="));
    Ok(())
}
