//! The data path beyond the overlay: pods reach the world through masquerade (and only the
//! world: pod to pod keeps pod addresses), the rules survive someone flushing the ruleset, pod
//! traffic passes other tools' forward drops (iptables and nftables), host-gw routes without a
//! VXLAN device, DirectRouting picks a path per peer on a routed underlay, a backend switch
//! between restarts (vxlan, host-gw, udp) leaves nothing stale, and the optional blackhole
//! route.
//!
//! "The world" is the underlay host (198.18.0.1 in the underlay namespace): it has no route to
//! the pod network, so a reply reaches a pod only if the packet left with the node's address.

use std::net::Ipv4Addr;
use std::time::Duration;

use anyhow::{Context, Result};
use serde_json::Value;
use twill_tests::lab::{parse_metric, UNDERLAY_IP};
use twill_tests::pod::tcp_probe_ns;
use twill_tests::{pod_to_pod, wait_until, Lab, LabOptions, Pod};

const VXLAN: &str = r#"{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan"}}"#;
const HOST_GW: &str = r#"{"Network":"10.244.0.0/16","Backend":{"Type":"host-gw"}}"#;
const UDP: &str = r#"{"Network":"10.244.0.0/16","Backend":{"Type":"udp"}}"#;
const DIRECT: &str =
    r#"{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan","DirectRouting":true}}"#;
const PROBE: Duration = Duration::from_secs(2);

/// A lab with `config`, every node's twilld started with `extra` and ready.
fn nodes(n: usize) -> LabOptions {
    LabOptions {
        nodes: n,
        ..Default::default()
    }
}

/// The source address the world saw for a TCP connection from `pod` (Err: no answer).
fn to_world(lab: &Lab, pod: &Pod, port: u16) -> Result<Ipv4Addr> {
    Ok(tcp_probe_ns(&pod.ns, &lab.underlay_ns(), UNDERLAY_IP, port, PROBE)?.source_seen)
}

fn metric(lab: &Lab, i: usize, name: &str) -> Result<f64> {
    let (_, text) = lab.get(i, "/metrics")?;
    parse_metric(&text, name).with_context(|| format!("no metric {name}"))
}

fn has_table(lab: &Lab, i: usize, family: &str, name: &str) -> Result<bool> {
    Ok(lab
        .exec(i, &["nft", "list", "table", family, name])?
        .status
        .success())
}

/// Routes in node i's main table, as `ip -4 route` prints them.
fn routes(lab: &Lab, i: usize) -> Result<Vec<String>> {
    Ok(lab
        .exec_ok(i, &["ip", "-4", "route", "show", "table", "main"])?
        .lines()
        .map(str::to_string)
        .collect())
}

fn subnet(lab: &Lab, i: usize) -> Result<String> {
    Ok(lab.status(i)?["node"]["subnet"]
        .as_str()
        .context("no subnet")?
        .to_string())
}

fn peer<'a>(st: &'a Value, subnet: &str) -> Option<&'a Value> {
    st["peers"]
        .as_array()?
        .iter()
        .find(|p| p["subnet"].as_str() == Some(subnet))
}

#[test]
fn pods_reach_the_world_masqueraded_and_each_other_unnated() -> Result<()> {
    let mut lab = Lab::up(nodes(2), VXLAN, &[])?;
    let a = lab.add_pod(1, "a")?;
    let b = lab.add_pod(2, "b")?;
    assert_eq!(
        to_world(&lab, &a, 7001)?,
        lab.node_ip(1),
        "pod -> world leaves with the node's address"
    );
    assert_eq!(to_world(&lab, &b, 7002)?, lab.node_ip(2));
    assert_eq!(
        pod_to_pod(&a, &b, 7003)?,
        a.ip,
        "pod -> pod across nodes keeps the pod address"
    );
    assert_eq!(pod_to_pod(&b, &a, 7004)?, b.ip);
    let env = std::fs::read_to_string(lab.subnet_file(1))?;
    assert!(env.contains("FLANNEL_IPMASQ=true\n"), "{env}");
    let st = lab.status(1)?;
    assert_eq!(st["firewall"]["ip_masq"], true, "{st}");
    assert_eq!(st["firewall"]["random_fully"], true, "{st}");
    assert_eq!(metric(&lab, 1, "twill_masq_rules_ok")?, 1.0);
    // The host's own traffic to the world is not ours to touch.
    let seen = tcp_probe_ns(
        &lab.node_ns(1),
        &lab.underlay_ns(),
        UNDERLAY_IP,
        7005,
        PROBE,
    )?;
    assert_eq!(seen.source_seen, lab.node_ip(1));
    Ok(())
}

/// `nft flush ruleset` (what `systemctl restart nftables` does) is repaired on the nftables
/// notification, not only at the next resync (set to 5 minutes here).
#[test]
fn masquerade_comes_back_after_the_ruleset_is_flushed() -> Result<()> {
    let mut lab = Lab::up(nodes(1), VXLAN, &["--resync-interval", "300s"])?;
    let a = lab.add_pod(1, "a")?;
    assert_eq!(to_world(&lab, &a, 7011)?, lab.node_ip(1));
    lab.exec_ok(1, &["nft", "flush", "ruleset"])?;
    wait_until(Duration::from_secs(10), || {
        has_table(&lab, 1, "ip", "twill-masq").unwrap_or(false)
    })
    .context("table not restored after a flush")?;
    assert_eq!(to_world(&lab, &a, 7012)?, lab.node_ip(1));
    // Counted when the repairing pass ends (after the forward rules are checked too), which
    // may be after the table is back: waited for, not read once.
    wait_until(Duration::from_secs(10), || {
        metric(&lab, 1, "twill_nft_restores_total").is_ok_and(|n| n >= 1.0)
    })
    .with_context(|| format!("the restore was not counted: {}", lab.daemon_log(1)))?;
    // One chain deleted by hand: restored too.
    lab.exec_ok(
        1,
        &["nft", "delete", "chain", "ip", "twill-masq", "forward"],
    )?;
    wait_until(Duration::from_secs(10), || {
        lab.exec(1, &["nft", "list", "chain", "ip", "twill-masq", "forward"])
            .map(|o| o.status.success())
            .unwrap_or(false)
    })
    .context("chain not restored")?;
    wait_until(Duration::from_secs(10), || {
        metric(&lab, 1, "twill_nft_restores_total").is_ok_and(|n| n >= 2.0)
    })
    .with_context(|| format!("the second restore was not counted: {}", lab.daemon_log(1)))?;
    assert!(lab
        .daemon_log(1)
        .contains("restored twill's nftables tables"));
    Ok(())
}

#[test]
fn ip_masq_false_leaves_pod_traffic_unnated_and_removes_the_rules() -> Result<()> {
    let mut lab = Lab::up(nodes(1), VXLAN, &[])?;
    let a = lab.add_pod(1, "a")?;
    assert!(has_table(&lab, 1, "ip", "twill-masq")?);
    lab.stop_daemon(1)?;
    lab.start_daemon_with(1, &["--ip-masq=false"])?;
    lab.wait_ready(1, Duration::from_secs(30))?;
    wait_until(Duration::from_secs(10), || {
        !has_table(&lab, 1, "ip", "twill-masq").unwrap_or(true)
    })
    .context("masquerade table left behind")?;
    // Without a route back the world cannot answer the pod's own address...
    assert!(
        to_world(&lab, &a, 7021).is_err(),
        "reached the world without masquerade"
    );
    // ...with one, it sees it.
    let sub = subnet(&lab, 1)?;
    lab.exec_underlay_ok(&[
        "ip",
        "route",
        "add",
        &sub,
        "via",
        &lab.node_ip(1).to_string(),
    ])?;
    assert_eq!(to_world(&lab, &a, 7022)?, a.ip);
    let env = std::fs::read_to_string(lab.subnet_file(1))?;
    assert!(env.contains("FLANNEL_IPMASQ=false\n"), "{env}");
    assert_eq!(lab.status(1)?["firewall"]["ip_masq"], false);
    Ok(())
}

/// kube-proxy marks what it masquerades itself (bit 0x4000); twill must leave those packets
/// alone, matching the bit under its mask (a mark with other bits set too is still
/// kube-proxy's: flannel's nftables mode gets this wrong).
#[test]
fn kube_proxy_marked_packets_are_left_to_kube_proxy() -> Result<()> {
    let mut lab = Lab::up(nodes(1), VXLAN, &[])?;
    let a = lab.add_pod(1, "a")?;
    let sub = subnet(&lab, 1)?;
    lab.exec_underlay_ok(&[
        "ip",
        "route",
        "add",
        &sub,
        "via",
        &lab.node_ip(1).to_string(),
    ])?;
    assert_eq!(to_world(&lab, &a, 7031)?, lab.node_ip(1));
    // A stand-in for kube-proxy's marking: 0x4001 on the pod's traffic.
    let script = format!(
        "add table ip kp\nadd chain ip kp pre {{ type filter hook prerouting priority -150; }}\n\
         add rule ip kp pre ip saddr {sub} meta mark set 0x4001\n"
    );
    lab.nft_load(1, &script)?;
    assert_eq!(
        to_world(&lab, &a, 7032)?,
        a.ip,
        "a kube-proxy-marked packet was masqueraded"
    );
    Ok(())
}

/// Docker sets iptables' FORWARD policy to DROP; an nftables host may have `policy drop` in a
/// table of its own. An accept in twill's table cannot override either: twill puts accepts in
/// their chains. Node 1 uses iptables (nf_tables flavour), node 2 plain nftables. Node 2's drop
/// comes after twilld started: the nftables notification brings the rule in.
#[test]
fn pods_pass_forward_drops_of_iptables_and_nftables() -> Result<()> {
    let mut lab = Lab::new(nodes(2))?;
    lab.put_config(VXLAN)?;
    lab.exec_ok(1, &["iptables", "-P", "FORWARD", "DROP"])?;
    // IPv6's forward drop is none of a v4-only network's business.
    lab.exec_ok(1, &["ip6tables", "-P", "FORWARD", "DROP"])?;
    for i in 1..=2 {
        lab.start_daemon_with(i, &["--resync-interval", "300s"])?;
    }
    for i in 1..=2 {
        lab.wait_ready(i, Duration::from_secs(30))?;
    }
    lab.wait_meshed()?;
    let a = lab.add_pod(1, "a")?;
    let b = lab.add_pod(2, "b")?;
    let rules = lab.exec_ok(1, &["iptables", "-S", "FORWARD"])?;
    assert!(
        rules.contains("-P FORWARD DROP") && rules.contains("twill-forward"),
        "{rules}"
    );
    let script = "add table inet filter\n\
                  add chain inet filter forward { type filter hook forward priority 0; policy drop; }\n";
    lab.nft_load(2, script)?;
    wait_until(Duration::from_secs(10), || {
        lab.exec_ok(2, &["nft", "list", "chain", "inet", "filter", "forward"])
            .map(|s| s.contains("twill-forward"))
            .unwrap_or(false)
    })
    .context("no accept rule in node 2's drop chain")?;
    assert_eq!(pod_to_pod(&a, &b, 7041)?, a.ip);
    assert_eq!(pod_to_pod(&b, &a, 7042)?, b.ip);
    assert_eq!(to_world(&lab, &a, 7043)?, lab.node_ip(1));
    assert_eq!(to_world(&lab, &b, 7044)?, lab.node_ip(2));
    let st = lab.status(2)?;
    assert!(
        st["firewall"]["forward_chains"]
            .to_string()
            .contains("inet filter forward"),
        "{st}"
    );
    let st = lab.status(1)?;
    let chains = st["firewall"]["forward_chains"].to_string();
    assert!(
        chains.contains("iptables FORWARD") && !chains.contains("ip6tables"),
        "{st}"
    );
    assert!(
        !lab.exec_ok(1, &["ip6tables", "-S", "FORWARD"])?
            .contains("twill-forward"),
        "accepts in IPv6's FORWARD on a v4-only network"
    );
    // The rules are what makes it work: without them (and the flag off, which removes them)
    // the drop wins.
    lab.stop_daemon(1)?;
    lab.start_daemon_with(1, &["--iptables-forward-rules=false"])?;
    lab.wait_ready(1, Duration::from_secs(30))?;
    wait_until(Duration::from_secs(10), || {
        lab.exec_ok(1, &["iptables", "-S", "FORWARD"])
            .map(|s| !s.contains("twill-forward"))
            .unwrap_or(false)
    })
    .context("accept rules left behind with the flag off")?;
    assert!(
        to_world(&lab, &a, 7045).is_err(),
        "the drop policy did not drop"
    );
    Ok(())
}

#[test]
fn host_gw_pods_reach_each_other_without_a_vxlan_device() -> Result<()> {
    let mut lab = Lab::up(nodes(3), HOST_GW, &[])?;
    let pods: Vec<Pod> = (1..=3)
        .map(|i| lab.add_pod(i, "a"))
        .collect::<Result<_>>()?;
    for (i, from) in pods.iter().enumerate() {
        for (j, to) in pods.iter().enumerate() {
            if i != j {
                assert_eq!(pod_to_pod(from, to, 7100 + (i * 3 + j) as u16)?, from.ip);
            }
        }
    }
    for i in 1..=3 {
        let links = lab.exec_ok(i, &["ip", "-d", "link", "show"])?;
        assert!(
            !links.contains("vxlan"),
            "node {i} has a VXLAN device: {links}"
        );
        let st = lab.status(i)?;
        assert_eq!(st["node"]["backend"], "host-gw");
        assert!(
            st["node"]["vtep_mac"].is_null(),
            "no VXLAN device, no VTEP MAC: {st}"
        );
        assert_eq!(st["node"]["mtu"], 1500, "host-gw pods get the underlay MTU");
        for p in st["peers"].as_array().unwrap() {
            assert_eq!(p["path"], "direct", "{p}");
            assert_eq!(p["programmed"], true, "{p}");
        }
    }
    // One route per peer via its public IP, marked as twill's.
    let r = routes(&lab, 1)?;
    for j in 2..=3 {
        let want = format!(
            "{} via {} dev eth0 proto 116",
            subnet(&lab, j)?,
            lab.node_ip(j)
        );
        assert!(
            r.iter().any(|l| l.starts_with(&want)),
            "no {want:?} in {r:?}"
        );
    }
    let mtu = pods[0].exec_ok(&["cat", "/sys/class/net/eth0/mtu"])?;
    assert_eq!(mtu.trim(), "1500");
    // flannel's host-gw lease format, exactly.
    let key = format!(
        "/coreos.com/network/subnets/{}",
        subnet(&lab, 1)?.replace('/', "-")
    );
    assert_eq!(
        lab.etcd_get(&key)?.unwrap(),
        format!(
            r#"{{"PublicIP":"{}","PublicIPv6":null,"BackendType":"host-gw"}}"#,
            lab.node_ip(1)
        )
    );
    // A route removed by hand is back (event or resync).
    let sub2 = subnet(&lab, 2)?;
    lab.exec_ok(1, &["ip", "route", "del", &sub2])?;
    wait_until(Duration::from_secs(10), || {
        routes(&lab, 1).is_ok_and(|r| r.iter().any(|l| l.starts_with(&sub2)))
    })
    .context("host-gw route not restored")?;
    // A peer that left while twilld was down: its route is gone after the start.
    let sub3 = subnet(&lab, 3)?;
    lab.stop_daemon(1)?;
    lab.stop_daemon(3)?;
    lab.etcdctl(&[
        "del",
        &format!("/coreos.com/network/subnets/{}", sub3.replace('/', "-")),
    ])?;
    assert!(
        routes(&lab, 1)?.iter().any(|l| l.starts_with(&sub3)),
        "the premise: node 3's route stays while node 1's twilld is down"
    );
    lab.start_daemon(1)?;
    lab.wait_ready(1, Duration::from_secs(30))?;
    wait_until(Duration::from_secs(10), || {
        routes(&lab, 1).is_ok_and(|r| !r.iter().any(|l| l.starts_with(&sub3)))
    })
    .context("the route of a peer that left while twilld was down stayed")?;
    assert!(
        routes(&lab, 1)?.iter().any(|l| l.starts_with(&sub2)),
        "the remaining peer's route went too"
    );
    Ok(())
}

/// A flanneld host-gw node (its lease written as flanneld writes it, its routes set as flanneld
/// sets them) and a twill host-gw node reach each other's pod networks.
#[test]
fn host_gw_interoperates_with_a_flanneld_host_gw_node() -> Result<()> {
    let mut lab = Lab::new(nodes(2))?;
    lab.put_config(HOST_GW)?;
    // Node 2 plays flanneld: a lease in flannel's format and a "cni0" with the gateway address.
    let flannel_net = "10.244.200.0/24";
    lab.etcdctl(&[
        "put",
        "/coreos.com/network/subnets/10.244.200.0-24",
        &format!(
            r#"{{"PublicIP":"{}","PublicIPv6":null,"BackendType":"host-gw"}}"#,
            lab.node_ip(2)
        ),
    ])?;
    lab.exec_ok(2, &["ip", "link", "add", "cni0", "type", "bridge"])?;
    lab.exec_ok(2, &["ip", "addr", "add", "10.244.200.1/24", "dev", "cni0"])?;
    lab.exec_ok(2, &["ip", "link", "set", "cni0", "up"])?;
    lab.start_daemon(1)?;
    lab.wait_ready(1, Duration::from_secs(30))?;
    let a = lab.add_pod(1, "a")?;
    // flanneld on node 2 would program node 1's lease as this route.
    let sub1 = subnet(&lab, 1)?;
    lab.exec_ok(
        2,
        &[
            "ip",
            "route",
            "add",
            &sub1,
            "via",
            &lab.node_ip(1).to_string(),
            "dev",
            "eth0",
        ],
    )?;
    wait_until(Duration::from_secs(10), || {
        a.ping("10.244.200.1".parse().unwrap())
    })
    .context("twill pod -> flanneld node's pod network")?;
    let r = routes(&lab, 1)?;
    assert!(
        r.iter()
            .any(|l| l.starts_with(&format!("{flannel_net} via {}", lab.node_ip(2)))),
        "{r:?}"
    );
    Ok(())
}

/// host-gw cannot reach a node behind a router: that peer is reported (log, /status, metric)
/// and gets no route, the others work.
#[test]
fn host_gw_reports_a_peer_behind_a_router_instead_of_routing_it() -> Result<()> {
    let mut lab = Lab::up(
        LabOptions {
            nodes: 3,
            routed: vec![3],
            ..Default::default()
        },
        HOST_GW,
        &[],
    )?;
    let sub3 = subnet(&lab, 3)?;
    let st = lab.status(1)?;
    let p3 = peer(&st, &sub3).context("node 3 not listed")?;
    assert_eq!(p3["programmed"], false, "{p3}");
    assert_eq!(p3["path"], "none");
    let why = p3["reason"].as_str().unwrap_or_default();
    assert!(
        why.contains("198.18.1.13") && why.contains("198.18.0.0/24"),
        "{why}"
    );
    assert_eq!(metric(&lab, 1, "twill_peers_unreachable")?, 1.0);
    assert!(lab.daemon_log(1).contains("peer cannot be reached"));
    assert!(!routes(&lab, 1)?.iter().any(|l| l.starts_with(&sub3)));
    let a = lab.add_pod(1, "a")?;
    let b = lab.add_pod(2, "b")?;
    assert_eq!(pod_to_pod(&a, &b, 7201)?, a.ip);
    Ok(())
}

/// DirectRouting on a routed underlay: node 2 shares node 1's segment (direct route, no
/// encapsulation), node 3 sits behind a router (VXLAN). Both reachable, pod addresses kept.
/// When node 3 moves onto node 1's segment, both sides route each other directly.
#[test]
fn direct_routing_routes_same_segment_peers_directly_and_tunnels_the_rest() -> Result<()> {
    let mut lab = Lab::up(
        LabOptions {
            nodes: 3,
            routed: vec![3],
            ..Default::default()
        },
        DIRECT,
        &[],
    )?;
    let (sub2, sub3) = (subnet(&lab, 2)?, subnet(&lab, 3)?);
    let st = lab.status(1)?;
    assert_eq!(peer(&st, &sub2).unwrap()["path"], "direct", "{st}");
    assert_eq!(peer(&st, &sub3).unwrap()["path"], "vxlan", "{st}");
    let r = routes(&lab, 1)?;
    let direct = format!("{sub2} via {} dev eth0 proto 116", lab.node_ip(2));
    assert!(r.iter().any(|l| l.starts_with(&direct)), "{r:?}");
    assert!(
        r.iter()
            .any(|l| l.starts_with(&sub3) && l.contains("dev twill.1")),
        "{r:?}"
    );
    let pods: Vec<Pod> = (1..=3)
        .map(|i| lab.add_pod(i, "a"))
        .collect::<Result<_>>()?;
    for (i, from) in pods.iter().enumerate() {
        for (j, to) in pods.iter().enumerate() {
            if i != j {
                assert_eq!(pod_to_pod(from, to, 7300 + (i * 3 + j) as u16)?, from.ip);
            }
        }
    }
    // Traffic to node 2 is not encapsulated: nothing on the VXLAN port while pods talk.
    let mut cap = lab.spawn(
        1,
        &[
            "tcpdump",
            "-n",
            "-i",
            "eth0",
            "-c",
            "1",
            "udp",
            "port",
            "8472",
            "and",
            "host",
            &lab.node_ip(2).to_string(),
        ],
    )?;
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(pod_to_pod(&pods[0], &pods[1], 7320)?, pods[0].ip);
    std::thread::sleep(Duration::from_millis(500));
    assert!(cap.try_wait()?.is_none(), "VXLAN packets to a direct peer");
    let _ = cap.kill();

    // The underlay changes under the running daemons: node 3 is moved onto node 1's segment
    // and renumbered into it. Node 3 redoes its segment, node 1 sees node 3's new address, and
    // both decide afresh: direct both ways.
    let (u, r) = (lab.underlay_ns(), lab.router_ns());
    let ip = |args: &[&str]| twill_tests::netns::run_ok(args).map(|_| ());
    ip(&["ip", "-n", &r, "link", "set", "veth3", "netns", &u])?;
    let br = format!("{}br", lab.prefix());
    ip(&["ip", "-n", &u, "link", "set", "veth3", "master", &br, "up"])?;
    let new = "198.18.0.13";
    lab.renumber(3, &lab.node_ip(3).to_string(), new)?;
    let sub1 = subnet(&lab, 1)?;
    let direct3 = format!("{sub3} via {new} dev eth0 proto 116");
    wait_until(Duration::from_secs(30), || {
        let on1 = lab
            .status(1)
            .is_ok_and(|st| peer(&st, &sub3).is_some_and(|p| p["path"] == "direct"));
        let on3 = lab
            .status(3)
            .is_ok_and(|st| peer(&st, &sub1).is_some_and(|p| p["path"] == "direct"));
        let route = routes(&lab, 1).is_ok_and(|r| r.iter().any(|l| l.starts_with(&direct3)));
        on1 && on3 && route
    })
    .with_context(|| {
        format!(
            "node 3 on node 1's segment is not routed directly: {:?} {:?}",
            lab.status(1).ok(),
            routes(&lab, 1).ok()
        )
    })?;
    let r = routes(&lab, 1)?;
    assert!(
        !r.iter()
            .any(|l| l.starts_with(&sub3) && l.contains("dev twill.1")),
        "node 3's tunnel route stayed: {r:?}"
    );
    assert_eq!(pod_to_pod(&pods[0], &pods[2], 7321)?, pods[0].ip);
    assert_eq!(pod_to_pod(&pods[2], &pods[0], 7322)?, pods[2].ip);
    Ok(())
}

/// vxlan -> host-gw -> vxlan -> udp -> vxlan across restarts: each time only the current
/// backend's state is left (no VXLAN device under host-gw, no direct routes under plain
/// vxlan, no TUN device but under udp), the lease names the backend, and pods keep reaching
/// each other.
#[test]
fn switching_backend_between_restarts_leaves_nothing_stale() -> Result<()> {
    let mut lab = Lab::up(nodes(2), VXLAN, &[])?;
    let a = lab.add_pod(1, "a")?;
    let b = lab.add_pod(2, "b")?;
    assert_eq!(pod_to_pod(&a, &b, 7401)?, a.ip);
    for (config, port) in [(HOST_GW, 7402), (VXLAN, 7403), (UDP, 7404), (VXLAN, 7405)] {
        for i in 1..=2 {
            lab.stop_daemon(i)?;
        }
        lab.put_config(config)?;
        for i in 1..=2 {
            lab.start_daemon(i)?;
        }
        for i in 1..=2 {
            lab.wait_ready(i, Duration::from_secs(30))?;
        }
        lab.wait_meshed()?;
        wait_until(Duration::from_secs(10), || {
            (1..=2).all(|i| {
                let links = lab
                    .exec_ok(i, &["ip", "-d", "link", "show"])
                    .unwrap_or_default();
                let r = routes(&lab, i).unwrap_or_default();
                let ours = |l: &&String| l.contains("proto 116");
                let via = r
                    .iter()
                    .filter(ours)
                    .filter(|l| l.contains(" via "))
                    .count();
                let (vxlan, tun) = (links.contains("twill.1"), links.contains("twill-udp"));
                match config {
                    HOST_GW => !vxlan && !tun && via == 1,
                    UDP => !vxlan && tun && via == 0,
                    _ => vxlan && !tun && r.iter().filter(ours).count() == 0,
                }
            })
        })
        .with_context(|| format!("stale state after switching to {config}"))?;
        let want = serde_json::from_str::<Value>(config)?["Backend"]["Type"].clone();
        for i in 1..=2 {
            let key = format!(
                "/coreos.com/network/subnets/{}",
                subnet(&lab, i)?.replace('/', "-")
            );
            let lease: Value = serde_json::from_str(&lab.etcd_get(&key)?.context("no lease")?)?;
            assert_eq!(lease["BackendType"], want, "after switching to {config}");
        }
        assert_eq!(
            pod_to_pod(&a, &b, port)?,
            a.ip,
            "after switching to {config}"
        );
    }
    Ok(())
}

#[test]
fn blackhole_route_keeps_unused_pod_addresses_on_the_node() -> Result<()> {
    let mut lab = Lab::up(nodes(1), VXLAN, &["--ip-blackhole-route"])?;
    let sub = subnet(&lab, 1)?;
    let unused: Ipv4Addr = {
        let net: Ipv4Addr = sub.split('/').next().unwrap_or_default().parse()?;
        Ipv4Addr::from(u32::from(net) + 200)
    };
    let r = lab.exec_ok(1, &["ip", "route", "show", "type", "blackhole"])?;
    assert!(r.contains(&format!("blackhole {sub} proto 116")), "{r:?}");
    // No bridge yet: an unused pod address is blackholed, not sent out of the default route.
    let get = lab.exec(1, &["ip", "route", "get", &unused.to_string()])?;
    let text =
        String::from_utf8_lossy(&get.stdout).to_string() + &String::from_utf8_lossy(&get.stderr);
    assert!(!text.contains("via 198.18.0.1"), "{text}");
    // With pods, the bridge's own route wins.
    let _a = lab.add_pod(1, "a")?;
    let get = lab.exec_ok(1, &["ip", "route", "get", &unused.to_string()])?;
    assert!(get.contains("dev cni0"), "{get}");
    // Off again: removed.
    lab.stop_daemon(1)?;
    lab.start_daemon(1)?;
    lab.wait_ready(1, Duration::from_secs(30))?;
    wait_until(Duration::from_secs(10), || {
        lab.exec_ok(1, &["ip", "route", "show", "type", "blackhole"])
            .is_ok_and(|r| r.trim().is_empty())
    })
    .context("blackhole route left behind")?;
    Ok(())
}
