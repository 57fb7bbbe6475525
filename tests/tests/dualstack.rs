//! A dual-stack network end to end: real twilld processes on a dual-stack underlay, a real
//! etcd, pods set up by the real plugin, and the kernel's entries and real traffic over both
//! overlays as the proof.

use std::collections::BTreeSet;
use std::time::Duration;

use anyhow::{anyhow, ensure, Context, Result};
use netpol::model::Protocol;
use serde_json::Value;
use twill_tests::lab::SUBNETS_PREFIX;
use twill_tests::netpol::{pod_config, probe, Servers, PREFIX};
use twill_tests::pod::{pod_to_pod6, tcp_probe_ip};
use twill_tests::{pod_to_pod, wait_until, Lab, LabOptions};

const CONFIG: &str = r#"{"Network":"10.244.0.0/16","EnableIPv6":true,"IPv6Network":"fd00:10:244::/56","Backend":{"Type":"vxlan"}}"#;
const DEV6: &str = "twill-v6.1";
const CONVERGE: Duration = Duration::from_secs(60);

/// A node's IPv6 side as /status shows it.
#[derive(Clone, Debug)]
struct Side6 {
    subnet: String,
    public_ip: String,
    mac: String,
}

impl Side6 {
    /// The device's own address: the subnet's network address (as flannel's v6 device has).
    fn addr(&self) -> String {
        self.subnet.split('/').next().unwrap_or_default().to_owned()
    }
}

fn side6(lab: &Lab, i: usize) -> Result<Side6> {
    let st = lab.status(i)?;
    let n = &st["node"]["ipv6"];
    let field = |k: &str| {
        n[k].as_str()
            .map(str::to_owned)
            .ok_or_else(|| anyhow!("/status node.ipv6.{k} missing: {st}"))
    };
    Ok(Side6 {
        subnet: field("subnet")?,
        public_ip: field("public_ip")?,
        mac: field("vtep_mac")?.to_ascii_lowercase(),
    })
}

fn dual_lab(nodes: usize) -> Result<Lab> {
    dual_lab_with(nodes, &[])
}

fn dual_lab_with(nodes: usize, extra: &[&str]) -> Result<Lab> {
    Lab::up(
        LabOptions {
            nodes,
            ipv6: true,
            ..Default::default()
        },
        CONFIG,
        extra,
    )
}

/// Until every node has the other `n - 1` as programmed IPv6 peers.
fn wait_programmed6(lab: &Lab, n: usize) -> Result<()> {
    wait_until(CONVERGE, || {
        (1..=lab.nodes()).all(|i| {
            lab.status(i).is_ok_and(|s| {
                s["peers6"]
                    .as_array()
                    .is_some_and(|p| p.len() == n - 1 && p.iter().all(|x| x["programmed"] == true))
            })
        })
    })
    .context("not every node programmed every IPv6 peer")
}

/// The first `Some` of `f`, retried for 20 s.
fn wait_for<T>(mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if std::time::Instant::now() > deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(300));
    }
}

fn ping6(lab: &Lab, i: usize, from: &str, to: &str) -> Result<()> {
    wait_until(Duration::from_secs(20), || {
        lab.exec(i, &["ping", "-6", "-c1", "-W1", "-I", from, to])
            .is_ok_and(|o| o.status.success())
    })
    .with_context(|| format!("node {i}: no ping6 from {from} to {to}"))
}

#[test]
fn dual_stack_nodes_lease_both_families_and_reach_each_other_over_both_overlays() -> Result<()> {
    let lab = dual_lab(3)?;
    wait_programmed6(&lab, 3)?;
    let sides: Vec<Side6> = (1..=3).map(|i| side6(&lab, i)).collect::<Result<_>>()?;
    let subnets: BTreeSet<&str> = sides.iter().map(|s| s.subnet.as_str()).collect();
    assert_eq!(subnets.len(), 3, "{sides:?}");

    for (k, s) in sides.iter().enumerate() {
        let i = k + 1;
        assert!(
            s.subnet.starts_with("fd00:10:244:") && s.subnet.ends_with("::/64"),
            "{s:?}"
        );
        assert_eq!(s.public_ip, lab.node_ip6(i).to_string());
        let st = lab.status(i)?;
        // One key per node, both subnets in it, the v6 side in flannel's fields.
        let v4 = st["node"]["subnet"].as_str().context("v4 subnet")?;
        let key = format!("{}&{}", v4.replace('/', "-"), s.subnet.replace('/', "-"));
        let v: Value = serde_json::from_str(
            &lab.etcd_get(&format!("{SUBNETS_PREFIX}{key}"))?
                .with_context(|| format!("no lease {key}"))?,
        )?;
        assert_eq!(v["PublicIPv6"], s.public_ip.as_str(), "{v}");
        assert_eq!(v["BackendV6Data"]["VNI"], 1, "{v}");
        assert_eq!(
            v["BackendV6Data"]["VtepMAC"]
                .as_str()
                .map(str::to_ascii_lowercase),
            Some(s.mac.clone()),
            "{v}"
        );
        // The v6 device: its own MAC, MTU 1500 - 70, the subnet's address as a /128.
        let link: Value =
            serde_json::from_str(&lab.exec_ok(i, &["ip", "-j", "-d", "link", "show", DEV6])?)?;
        let link = &link[0];
        assert_eq!(link["linkinfo"]["info_data"]["id"], 1, "{link}");
        assert_eq!(
            link["linkinfo"]["info_data"]["local6"],
            s.public_ip.as_str(),
            "{link}"
        );
        assert_eq!(link["address"].as_str(), Some(s.mac.as_str()), "{link}");
        assert_eq!(link["mtu"], 1430, "{link}");
        assert_eq!(st["node"]["ipv6"]["mtu"], 1430, "{st}");
        let addrs = lab.exec_ok(i, &["ip", "-6", "-o", "addr", "show", "dev", DEV6])?;
        assert!(
            addrs.contains(&format!("inet6 {}/128", s.addr())),
            "{addrs}"
        );
        // subnet.env: both families as flanneld writes them; the pod MTU fits both overlays.
        let env = std::fs::read_to_string(lab.subnet_file(i))?;
        let first = format!("{}1/64", s.addr());
        for want in [
            "FLANNEL_IPV6_NETWORK=fd00:10:244::/56\n".to_string(),
            format!("FLANNEL_IPV6_SUBNET={first}\n"),
            "FLANNEL_MTU=1430\n".to_string(),
        ] {
            assert!(env.contains(&want), "{want:?} missing in:\n{env}");
        }
        assert_eq!(lab.metric(i, "twill_ipv6_peers")?, Some(2.0));
    }

    // Every node reaches every other's IPv6 device address through the IPv6 overlay, and the
    // IPv4 overlay still works.
    for i in 1..=3 {
        for (k, s) in sides.iter().enumerate() {
            if k + 1 != i {
                ping6(&lab, i, &sides[i - 1].addr(), &s.addr())?;
                let route = lab.exec_ok(i, &["ip", "-6", "route", "get", &s.addr()])?;
                assert!(route.contains(&format!("dev {DEV6}")), "{route}");
            }
        }
    }
    for i in 2..=3 {
        let gw = lab.status(i)?["node"]["subnet"]
            .as_str()
            .and_then(|s| s.split('/').next().map(str::to_owned))
            .context("subnet")?;
        ensure!(
            lab.ping(1, &gw),
            "node 1 cannot ping {gw} over the IPv4 overlay"
        );
    }
    Ok(())
}

/// flannel's IPv6-only network (EnableIPv4 false).
const CONFIG6: &str = r#"{"EnableIPv4":false,"EnableIPv6":true,"IPv6Network":"fd00:10:244::/56","Backend":{"Type":"vxlan"}}"#;

/// An IPv6-only network on an IPv6-only underlay: the nodes have no IPv4 address or route at
/// all, and reach etcd over IPv6.
#[test]
fn ipv6_only_nodes_lease_flannels_keys_and_pods_reach_each_other_without_nat() -> Result<()> {
    let mut lab = Lab::new(LabOptions {
        nodes: 3,
        ipv6_only: true,
        ..Default::default()
    })?;
    for i in 1..=3 {
        let v4 = lab.exec_ok(i, &["ip", "-4", "addr", "show", "dev", "eth0"])?;
        ensure!(
            v4.trim().is_empty(),
            "node {i} has IPv4 on its underlay: {v4}"
        );
    }
    ensure!(
        lab.etcd_endpoint().starts_with("http://[fd00:"),
        "{}",
        lab.etcd_endpoint()
    );
    lab.put_config(CONFIG6)?;
    for i in 1..=3 {
        lab.start_daemon_with(i, &[])?;
    }
    for i in 1..=3 {
        lab.wait_ready(i, Duration::from_secs(30))?;
    }
    wait_programmed6(&lab, 3)?;
    for i in 1..=3 {
        let st = lab.status(i)?;
        // No IPv4 side at all: no subnet, no peers, no device, no masquerade table.
        assert!(
            st["network"].is_null() && st["node"]["subnet"].is_null(),
            "{st}"
        );
        assert_eq!(st["network6"], "fd00:10:244::/56", "{st}");
        assert_eq!(st["peers"].as_array().map(Vec::len), Some(0), "{st}");
        ensure!(
            lab.exec(i, &["ip", "link", "show", "twill.1"])
                .is_ok_and(|o| !o.status.success()),
            "node {i} has an IPv4 VXLAN device"
        );
        ensure!(
            lab.exec(i, &["nft", "list", "table", "ip", "twill-masq"])
                .is_ok_and(|o| !o.status.success()),
            "node {i} has an IPv4 masquerade table"
        );
        let t = lab.exec_ok(i, &["nft", "list", "table", "ip6", "twill-masq6"])?;
        assert!(t.contains("fd00:10:244::/56"), "{t}");
        // flannel's IPv6-only key and value.
        let s = side6(&lab, i)?;
        assert_eq!(s.public_ip, lab.node_ip6(i).to_string());
        let key = format!("0.0.0.0-0&{}", s.subnet.replace('/', "-"));
        let v: Value = serde_json::from_str(
            &lab.etcd_get(&format!("{SUBNETS_PREFIX}{key}"))?
                .with_context(|| format!("no lease {key}"))?,
        )?;
        assert_eq!(v["PublicIP"], "0.0.0.0", "{v}");
        assert_eq!(v["PublicIPv6"], s.public_ip.as_str(), "{v}");
        assert!(v.get("BackendData").is_none(), "{v}");
        assert_eq!(v["BackendV6Data"]["VNI"], 1, "{v}");
        // subnet.env: only the IPv6 lines, as flanneld writes them.
        let env = std::fs::read_to_string(lab.subnet_file(i))?;
        assert!(
            !env.contains("FLANNEL_NETWORK=") && !env.contains("FLANNEL_SUBNET="),
            "{env}"
        );
        for want in [
            "FLANNEL_IPV6_NETWORK=fd00:10:244::/56\n".to_string(),
            format!("FLANNEL_IPV6_SUBNET={}1/64\n", s.addr()),
            "FLANNEL_MTU=1430\n".to_string(),
        ] {
            assert!(env.contains(&want), "{want:?} missing in:\n{env}");
        }
    }
    // Pods get an IPv6 address only, and reach each other across nodes, seen with their own
    // addresses (no NAT).
    let pods: Vec<_> = (1..=3)
        .map(|i| lab.add_pod(i, "a"))
        .collect::<Result<_>>()?;
    for p in &pods {
        let ips = p.result["ips"].as_array().map(Vec::len);
        assert_eq!(ips, Some(1), "{}", p.result);
        assert!(p.ip.is_unspecified() && p.ip6.is_some(), "{}", p.result);
    }
    for from in &pods {
        for to in &pods {
            if from.node != to.node {
                let seen = pod_to_pod6(from, to, 7010)?;
                assert_eq!(
                    seen,
                    std::net::IpAddr::V6(from.ip6.unwrap()),
                    "{} -> {}",
                    from.id,
                    to.id
                );
            }
        }
    }
    // A restart keeps the lease (found again by the IPv6 address and MAC).
    let before = side6(&lab, 2)?;
    lab.stop_daemon(2)?;
    lab.start_daemon(2)?;
    lab.wait_ready(2, CONVERGE)?;
    let after = side6(&lab, 2)?;
    assert_eq!((&after.subnet, &after.mac), (&before.subnet, &before.mac));
    assert_eq!(lab.lease_keys()?.len(), 3, "{:?}", lab.lease_keys()?);
    wait_programmed6(&lab, 3)?;
    Ok(())
}

#[test]
fn dual_stack_pods_reach_each_other_across_nodes_on_both_families_without_nat() -> Result<()> {
    let mut lab = dual_lab(3)?;
    wait_programmed6(&lab, 3)?;
    let pods: Vec<_> = (1..=3)
        .map(|i| lab.add_pod(i, "a"))
        .collect::<Result<_>>()?;
    for (i, p) in pods.iter().enumerate() {
        let ip6 = p
            .ip6
            .with_context(|| format!("pod on node {} has no IPv6 address", i + 1))?;
        let subnet = side6(&lab, i + 1)?.subnet;
        let prefix = subnet.split("::/").next().unwrap_or_default().to_owned() + "::";
        assert!(
            ip6.to_string().starts_with(&prefix),
            "{ip6} not in {subnet}"
        );
        // The pod's MTU fits the IPv6 overlay.
        let link = p.exec_ok(&["ip", "link", "show", "eth0"])?;
        assert!(link.contains("mtu 1430"), "{link}");
    }
    // Every pod reaches every other, on both families, and is seen with its own address.
    for from in &pods {
        for to in &pods {
            if from.node == to.node {
                continue;
            }
            let seen6 = pod_to_pod6(from, to, 7000)?;
            assert_eq!(
                seen6,
                std::net::IpAddr::V6(from.ip6.unwrap()),
                "{} -> {}",
                from.id,
                to.id
            );
            let seen4 = pod_to_pod(from, to, 7001)?;
            assert_eq!(seen4, from.ip, "{} -> {}", from.id, to.id);
        }
    }
    // The world (the underlay host, with no route back to the pod networks) sees each pod's
    // traffic from its node's address, on both families: masqueraded, each by its own table.
    let world6: std::net::IpAddr = twill_tests::lab::UNDERLAY_IP6.parse()?;
    for p in &pods {
        let seen = wait_for(|| {
            tcp_probe_ip(
                &p.ns,
                &lab.underlay_ns(),
                world6,
                7002,
                Duration::from_secs(2),
            )
            .ok()
        })
        .with_context(|| format!("pod {} does not reach the world over IPv6", p.id))?;
        assert_eq!(
            seen.0,
            std::net::IpAddr::V6(lab.node_ip6(p.node)),
            "{}",
            p.id
        );
    }
    for i in 1..=3 {
        let t = lab.exec_ok(i, &["nft", "list", "table", "ip6", "twill-masq6"])?;
        assert!(t.contains("fd00:10:244::/56"), "{t}");
    }

    // DEL releases both addresses: a new pod on node 1 may get them again, and node 1's IPAM
    // holds nothing for the deleted one.
    let gone = pods[0].clone();
    lab.del_pod(&gone)?;
    let ipam6 = lab
        .state_dir(1)
        .join("ipam")
        .join(side6(&lab, 1)?.subnet.replace('/', "-"));
    let held: Vec<String> = std::fs::read_dir(&ipam6)?
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    assert!(held.is_empty(), "{held:?}");
    Ok(())
}

#[test]
fn network_policy_holds_on_ipv6_as_on_ipv4_and_never_blocks_neighbour_discovery() -> Result<()> {
    let mut lab = dual_lab(2)?;
    wait_until(CONVERGE, || {
        (1..=2).all(|i| lab.status(i).is_ok_and(|s| s["policy"]["loaded"] == true))
    })
    .context("policy state did not load")?;
    let pod = |lab: &mut Lab, node: usize, name: &str| {
        let labels = [("app".to_string(), name.to_string())].into();
        let cfg = pod_config(lab, node, &labels);
        let args = format!("IgnoreUnknown=1;K8S_POD_NAMESPACE=x;K8S_POD_NAME={name}");
        lab.add_pod_with(node, &format!("x{name}"), &args, &cfg)
    };
    let a = pod(&mut lab, 1, "a")?;
    let b = pod(&mut lab, 2, "b")?;
    let _servers = Servers::start(&[&b])?;
    let (from, b4, b6) = (
        a.netns_path(),
        std::net::IpAddr::V4(b.ip),
        std::net::IpAddr::V6(b.ip6.context("b has no IPv6 address")?),
    );
    let reach = |ip, port| probe(&from, ip, port, Protocol::Tcp);
    wait_until(CONVERGE, || reach(b6, 80) && reach(b4, 80))
        .context("a does not reach b before any policy")?;
    let put = |name: &str, spec: &str| {
        let v = format!(r#"{{"metadata":{{"name":"{name}","namespace":"x"}},"spec":{spec}}}"#);
        lab.etcdctl(&["put", &format!("{PREFIX}/policies/x/{name}"), "--", &v])
    };

    // Default deny ingress: closed on both families.
    put("deny-in", r#"{"podSelector":{},"policyTypes":["Ingress"]}"#)?;
    wait_until(CONVERGE, || !reach(b6, 80) && !reach(b4, 80))
        .context("default deny left b open")?;
    // Neighbour discovery still works for b (the answers to its solicitations are ingress).
    let gw6 = side6(&lab, 2)?.addr().replace("::", "::1");
    b.exec_ok(&["ip", "-6", "neigh", "flush", "dev", "eth0"])?;
    let pinged = b.exec(&["ping", "-6", "-c1", "-W2", &gw6])?;
    assert!(
        pinged.status.success(),
        "b cannot reach its IPv6 gateway under default deny: {pinged:?}"
    );

    // Allowed from app=a on port 80: both families, port 81 still closed.
    put(
        "from-a",
        r#"{"podSelector":{"matchLabels":{"app":"b"}},"ingress":[{"from":[{"podSelector":{"matchLabels":{"app":"a"}}}],"ports":[{"port":80,"protocol":"TCP"}]}]}"#,
    )?;
    wait_until(CONVERGE, || reach(b6, 80) && reach(b4, 80))
        .context("the allow did not open port 80 on both families")?;
    assert!(!reach(b6, 81) && !reach(b4, 81), "port 81 opened");

    // An ipBlock of a's IPv6 address on port 81: open over IPv6 only.
    let a6 = a.ip6.context("a has no IPv6 address")?;
    put(
        "block6",
        &format!(
            r#"{{"podSelector":{{}},"ingress":[{{"from":[{{"ipBlock":{{"cidr":"{a6}/128"}}}}],"ports":[{{"port":81,"protocol":"TCP"}}]}}]}}"#
        ),
    )?;
    wait_until(CONVERGE, || reach(b6, 81)).context("the IPv6 ipBlock did not open port 81")?;
    assert!(!reach(b4, 81), "an IPv6 ipBlock opened IPv4");
    Ok(())
}

#[test]
fn dual_stack_restart_keeps_both_subnets_and_a_flanneld_dual_lease_is_programmed() -> Result<()> {
    // No periodic resync within the test: IPv6 drift must be found by kernel events.
    let mut lab = dual_lab_with(2, &["--resync-interval", "600s"])?;
    wait_programmed6(&lab, 2)?;
    let before = side6(&lab, 2)?;
    let v4 = lab.status(2)?["node"]["subnet"].clone();

    // Restart: the same key, both subnets, the same v6 MAC; node 1 keeps reaching it.
    lab.stop_daemon(2)?;
    lab.start_daemon(2)?;
    lab.wait_ready(2, CONVERGE)?;
    let after = side6(&lab, 2)?;
    assert_eq!((&after.subnet, &after.mac), (&before.subnet, &before.mac));
    assert_eq!(lab.status(2)?["node"]["subnet"], v4);
    assert_eq!(lab.lease_keys()?.len(), 2, "{:?}", lab.lease_keys()?);
    wait_programmed6(&lab, 2)?;
    ping6(&lab, 1, &side6(&lab, 1)?.addr(), &after.addr())?;

    // Drift: node 2's route and FDB entry removed by hand on node 1 come back.
    lab.exec_ok(1, &["ip", "-6", "route", "del", &after.subnet, "dev", DEV6])?;
    lab.exec_ok(
        1,
        &[
            "bridge",
            "fdb",
            "del",
            &after.mac,
            "dev",
            DEV6,
            "dst",
            &after.public_ip,
        ],
    )?;
    wait_until(CONVERGE, || {
        lab.exec_ok(1, &["ip", "-6", "route", "show", "dev", DEV6])
            .is_ok_and(|r| r.contains(&after.subnet))
            && lab
                .exec_ok(1, &["bridge", "fdb", "show", "dev", DEV6])
                .is_ok_and(|f| f.contains(&after.public_ip))
    })
    .context("the IPv6 entries removed by hand were not restored")?;
    ping6(&lab, 1, &side6(&lab, 1)?.addr(), &after.addr())?;

    // Node 2's underlay IPv6 address moves (again no resync: kernel events only): node 2 takes
    // the new one as its endpoint, its lease says so, and node 1 tunnels IPv6 there.
    let moved = "fd00:198:18::99";
    let old6 = format!("{}/64", lab.node_ip6(2));
    lab.exec_ok(
        2,
        &[
            "ip",
            "-6",
            "addr",
            "add",
            &format!("{moved}/64"),
            "dev",
            "eth0",
            "nodad",
        ],
    )?;
    lab.exec_ok(2, &["ip", "-6", "addr", "del", &old6, "dev", "eth0"])?;
    wait_until(CONVERGE, || {
        lab.exec_ok(1, &["bridge", "fdb", "show", "dev", DEV6])
            .is_ok_and(|f| f.contains(&format!("dst {moved} ")))
    })
    .context("node 1 does not tunnel IPv6 to node 2's new address")?;
    // (The lease changes first; /status once node 2 has set up its device again.)
    wait_until(CONVERGE, || {
        side6(&lab, 2).is_ok_and(|s| s.public_ip == moved)
    })
    .context("node 2's /status keeps the old IPv6 endpoint")?;
    ping6(&lab, 1, &side6(&lab, 1)?.addr(), &after.addr())?;

    // A dual-stack flanneld node's lease, as flanneld writes it: programmed on the v6 device
    // (neighbour, FDB entry, route) like ours.
    let key = "10.244.200.0-24&fd00:10:244:c8::-64";
    let value = r#"{"PublicIP":"198.18.0.200","PublicIPv6":"fd00:198:18::c8","BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"0a:00:00:00:00:c8"},"BackendV6Data":{"VNI":1,"VtepMAC":"0a:00:00:00:06:c8"}}"#;
    lab.etcdctl(&["put", &format!("{SUBNETS_PREFIX}{key}"), "--", value])?;
    let programmed = || -> Result<bool> {
        let routes = lab.exec_ok(1, &["ip", "-6", "route", "show", "dev", DEV6])?;
        let fdb = lab.exec_ok(1, &["bridge", "fdb", "show", "dev", DEV6])?;
        let neigh = lab.exec_ok(1, &["ip", "-6", "neigh", "show", "dev", DEV6])?;
        Ok(routes.contains("fd00:10:244:c8::/64 via fd00:10:244:c8::")
            && fdb.contains("0a:00:00:00:06:c8 dst fd00:198:18::c8")
            && neigh.contains("fd00:10:244:c8:: lladdr 0a:00:00:00:06:c8"))
    };
    wait_until(CONVERGE, || programmed().unwrap_or(false))
        .context("the flanneld dual-stack lease was not programmed on the v6 device")?;
    // Its IPv4 side on the IPv4 device, as before.
    let routes = lab.exec_ok(1, &["ip", "route", "show", "dev", "twill.1"])?;
    assert!(
        routes.contains("10.244.200.0/24 via 10.244.200.0"),
        "{routes}"
    );

    // It leaves: both sides go, nothing stale on the v6 device.
    let out = lab.etcdctl(&["del", &format!("{SUBNETS_PREFIX}{key}")])?;
    assert_eq!(out.trim(), "1");
    wait_until(CONVERGE, || {
        lab.exec_ok(1, &["ip", "-6", "route", "show", "dev", DEV6])
            .is_ok_and(|r| !r.contains("fd00:10:244:c8::"))
            && lab
                .exec_ok(1, &["bridge", "fdb", "show", "dev", DEV6])
                .is_ok_and(|f| !f.contains("fd00:198:18::c8"))
    })
    .context("the removed lease's v6 entries stayed")?;

    // The network goes back to IPv4 only: a restarted node drops its IPv6 device (and the
    // routes through it) and its IPv6 masquerade table, and keeps its IPv4 subnet.
    lab.put_config(r#"{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan"}}"#)?;
    lab.stop_daemon(2)?;
    lab.start_daemon(2)?;
    lab.wait_ready(2, CONVERGE)?;
    assert_eq!(lab.status(2)?["node"]["subnet"], v4);
    let links = lab.exec_ok(2, &["ip", "-o", "link"])?;
    assert!(!links.contains(DEV6), "{links}");
    assert!(
        !lab.exec(2, &["nft", "list", "table", "ip6", "twill-masq6"])?
            .status
            .success(),
        "the IPv6 masquerade table stayed"
    );
    assert!(lab.status(2)?["node"]["ipv6"].is_null());
    Ok(())
}

#[test]
fn a_dual_stack_network_without_an_ipv6_underlay_is_refused_with_the_fix() -> Result<()> {
    let mut lab = Lab::new(LabOptions {
        nodes: 1,
        ..Default::default()
    })?;
    lab.put_config(CONFIG)?;
    lab.start_daemon(1)?;
    let status = lab.wait_daemon_exit(1, CONVERGE)?;
    assert!(!status.success());
    let log = lab.daemon_log(1);
    for want in [
        "EnableIPv6",
        "no usable global IPv6 address",
        "--public-ipv6",
    ] {
        assert!(log.contains(want), "{want:?} missing in:\n{log}");
    }
    // Refused before any lease is taken.
    assert!(lab.lease_keys()?.is_empty(), "{:?}", lab.lease_keys()?);
    Ok(())
}

/// ip6tables' FORWARD policy DROP (Docker sets it when its IPv6 is on) and an nftables inet
/// chain with `policy drop` drop pods' IPv6 traffic between nodes unless accepts for the IPv6
/// pod network sit in those chains: node 1 has the ip6tables drop from the start, node 2 gets
/// the inet drop after twilld started (the nftables notification brings the rules in).
#[test]
fn ipv6_pod_traffic_passes_forward_drops_of_ip6tables_and_nftables() -> Result<()> {
    let mut lab = Lab::new(LabOptions {
        nodes: 2,
        ipv6: true,
        ..Default::default()
    })?;
    lab.put_config(CONFIG)?;
    lab.exec_ok(1, &["ip6tables", "-P", "FORWARD", "DROP"])?;
    for i in 1..=2 {
        lab.start_daemon_with(i, &["--resync-interval", "300s"])?;
    }
    for i in 1..=2 {
        lab.wait_ready(i, CONVERGE)?;
    }
    wait_programmed6(&lab, 2)?;
    let a = lab.add_pod(1, "a")?;
    let b = lab.add_pod(2, "b")?;
    let rules = lab.exec_ok(1, &["ip6tables", "-S", "FORWARD"])?;
    for want in [
        "-P FORWARD DROP",
        "-A FORWARD -s fd00:10:244::/56 -m comment --comment twill-forward -j ACCEPT",
        "-A FORWARD -d fd00:10:244::/56 -m comment --comment twill-forward -j ACCEPT",
    ] {
        assert!(rules.contains(want), "{want:?} missing in:\n{rules}");
    }
    assert!(
        !lab.exec_ok(1, &["iptables", "-S", "FORWARD"])?
            .contains("twill-forward"),
        "IPv4's FORWARD does not drop: no rules there"
    );
    let script = "add table inet filter\n\
                  add chain inet filter forward { type filter hook forward priority 0; policy drop; }\n";
    lab.nft_load(2, script)?;
    wait_until(Duration::from_secs(10), || {
        lab.exec_ok(2, &["nft", "list", "chain", "inet", "filter", "forward"])
            .is_ok_and(|s| {
                s.contains("ip6 saddr fd00:10:244::/56 accept")
                    && s.contains("ip saddr 10.244.0.0/16 accept")
            })
    })
    .context("no accepts for both families in node 2's inet drop chain")?;
    let (a6, b6) = (
        std::net::IpAddr::V6(a.ip6.context("a has no IPv6")?),
        std::net::IpAddr::V6(b.ip6.context("b has no IPv6")?),
    );
    assert_eq!(pod_to_pod6(&a, &b, 7051)?, a6);
    assert_eq!(pod_to_pod6(&b, &a, 7052)?, b6);
    assert_eq!(pod_to_pod(&a, &b, 7053)?, a.ip);
    assert_eq!(pod_to_pod(&b, &a, 7054)?, b.ip);
    let chains = |i| {
        lab.status(i)
            .map(|s| s["firewall"]["forward_chains"].to_string())
    };
    assert!(chains(1)?.contains("ip6tables FORWARD"), "{}", chains(1)?);
    assert!(chains(2)?.contains("inet filter forward"), "{}", chains(2)?);

    // The rules are what makes it work: with the flag off (which removes them) the drop wins.
    lab.stop_daemon(1)?;
    lab.start_daemon_with(1, &["--iptables-forward-rules=false"])?;
    lab.wait_ready(1, CONVERGE)?;
    wait_until(Duration::from_secs(10), || {
        lab.exec_ok(1, &["ip6tables", "-S", "FORWARD"])
            .is_ok_and(|s| !s.contains("twill-forward"))
    })
    .context("IPv6 accept rules left behind with the flag off")?;
    let dropped = tcp_probe_ip(&a.ns, &b.ns, b6, 7055, Duration::from_secs(2));
    assert!(dropped.is_err(), "ip6tables' drop policy did not drop");
    Ok(())
}

/// host-gw on a dual-stack network: each family routed via the peers' addresses of that
/// family on the underlay, no VXLAN device of either family (the ones of an earlier vxlan run
/// go), the underlay's MTU, and pods reaching each other on both families with their own
/// addresses. The leases say host-gw with PublicIPv6 and no BackendV6Data, as flanneld's do.
#[test]
fn dual_stack_host_gw_routes_both_families_via_the_peers_without_a_vxlan_device() -> Result<()> {
    const HOST_GW: &str = r#"{"Network":"10.244.0.0/16","EnableIPv6":true,"IPv6Network":"fd00:10:244::/56","Backend":{"Type":"host-gw"}}"#;
    // First vxlan, then host-gw after a restart: nothing of the overlay may stay.
    let mut lab = dual_lab(3)?;
    wait_programmed6(&lab, 3)?;
    for i in 1..=3 {
        lab.stop_daemon(i)?;
    }
    lab.put_config(HOST_GW)?;
    for i in 1..=3 {
        lab.start_daemon(i)?;
    }
    for i in 1..=3 {
        lab.wait_ready(i, CONVERGE)?;
    }
    wait_programmed6(&lab, 3)?;
    let subnet6 = |i| -> Result<String> {
        lab.status(i)?["node"]["ipv6"]["subnet"]
            .as_str()
            .map(str::to_owned)
            .context("no IPv6 subnet in /status")
    };
    for i in 1..=3 {
        let links = lab.exec_ok(i, &["ip", "-d", "link", "show"])?;
        ensure!(
            !links.contains("vxlan"),
            "node {i} kept a VXLAN device: {links}"
        );
        let st = lab.status(i)?;
        let n6 = &st["node"]["ipv6"];
        assert_eq!(n6["device"], "eth0", "{st}");
        assert!(n6["vtep_mac"].is_null(), "{st}");
        assert_eq!(n6["mtu"], 1500, "{st}");
        for p in st["peers6"].as_array().context("no peers6")? {
            assert_eq!(p["path"], "direct", "{p}");
        }
        // One IPv6 route per peer via its IPv6 address, marked as twill's.
        let routes = lab.exec_ok(i, &["ip", "-6", "route", "show"])?;
        for j in (1..=3).filter(|j| *j != i) {
            let want = format!("{} via {} dev eth0 proto 116", subnet6(j)?, lab.node_ip6(j));
            assert!(
                routes.contains(&want),
                "node {i}: no {want:?} in:\n{routes}"
            );
        }
    }
    // Node 1's lease as flanneld writes a dual-stack host-gw one.
    let own6 = subnet6(1)?.replace('/', "-");
    let key = lab
        .lease_keys()?
        .into_iter()
        .find(|k| k.ends_with(&own6))
        .context("node 1's lease key")?;
    let value: Value = serde_json::from_str(
        &lab.etcd_get(&format!("{SUBNETS_PREFIX}{key}"))?
            .context("node 1's lease")?,
    )?;
    assert_eq!(value["BackendType"], "host-gw", "{value}");
    assert_eq!(value["PublicIPv6"], lab.node_ip6(1).to_string(), "{value}");
    assert!(value.get("BackendV6Data").is_none(), "{value}");

    let pods: Vec<_> = (1..=3)
        .map(|i| lab.add_pod(i, "a"))
        .collect::<Result<_>>()?;
    let link = pods[0].exec_ok(&["ip", "link", "show", "eth0"])?;
    assert!(link.contains("mtu 1500"), "{link}");
    for from in &pods {
        for to in pods.iter().filter(|p| p.node != from.node) {
            let ip6 = from.ip6.context("pod without IPv6")?;
            assert_eq!(pod_to_pod6(from, to, 7060)?, std::net::IpAddr::V6(ip6));
            assert_eq!(pod_to_pod(from, to, 7061)?, from.ip);
        }
    }

    // Back to IPv4 only: a restarted node removes its IPv6 routes (nothing else would: no
    // IPv6 side reconciles them any more).
    lab.put_config(r#"{"Network":"10.244.0.0/16","Backend":{"Type":"host-gw"}}"#)?;
    lab.stop_daemon(1)?;
    lab.start_daemon(1)?;
    lab.wait_ready(1, CONVERGE)?;
    let left = lab.exec_ok(1, &["ip", "-6", "route", "show", "proto", "116"])?;
    assert!(left.trim().is_empty(), "IPv6 routes left behind:\n{left}");
    assert!(lab.status(1)?["node"]["ipv6"].is_null());
    Ok(())
}

/// twilld confined as the shipped DaemonSet confines it (deploy/kubernetes/twill.yaml): not
/// privileged, so only the runtime's default capabilities plus the manifest's NET_ADMIN,
/// NET_RAW and SYS_ADMIN, and `/proc/sys` read-only (runc mounts it so in a non-privileged
/// container). No container runtime or Kubernetes can run here: the confinement is made with
/// `setpriv` and a read-only bind mount in twilld's own mount namespace. Dual-stack pods come up
/// and reach each other on both families.
#[test]
fn twilld_confined_as_the_daemonset_sets_up_dual_stack_pods() -> Result<()> {
    // containerd's default set, then the manifest's three (manifests.rs checks those).
    const CAPS: [&str; 16] = [
        "chown",
        "dac_override",
        "fsetid",
        "fowner",
        "mknod",
        "net_raw",
        "setgid",
        "setuid",
        "setfcap",
        "setpcap",
        "net_bind_service",
        "sys_chroot",
        "kill",
        "audit_write",
        "net_admin",
        "sys_admin",
    ];
    let mut lab = Lab::new(LabOptions {
        nodes: 2,
        ipv6: true,
        ..Default::default()
    })?;
    lab.put_config(CONFIG)?;
    let set = format!("-all,{}", CAPS.map(|c| format!("+{c}")).join(","));
    let script = format!(
        "mount --bind /proc/sys /proc/sys && mount -o remount,bind,ro /proc/sys && \
         exec setpriv --inh-caps={set} --bounding-set={set} -- \"$@\""
    );
    for i in 1..=2 {
        let args = lab.daemon_args(i);
        lab.start_daemon_wrapped(i, &["sh", "-c", &script, "confined"], &args, &[])?;
    }
    // Up: twilld has exec'd (before, the pid is the wrapper's).
    for i in 1..=2 {
        lab.wait_ready(i, CONVERGE)?;
    }
    wait_programmed6(&lab, 2)?;
    // The confinement holds: twilld's effective capabilities are exactly those, and it sees
    // /proc/sys read-only.
    let want: u64 = CAPS
        .iter()
        .map(|c| {
            let bit = match *c {
                "chown" => 0,
                "dac_override" => 1,
                "fowner" => 3,
                "fsetid" => 4,
                "kill" => 5,
                "setgid" => 6,
                "setuid" => 7,
                "setpcap" => 8,
                "net_bind_service" => 10,
                "net_admin" => 12,
                "net_raw" => 13,
                "sys_chroot" => 18,
                "sys_admin" => 21,
                "mknod" => 27,
                "audit_write" => 29,
                "setfcap" => 31,
                other => panic!("no bit for {other}"),
            };
            1u64 << bit
        })
        .sum();
    for i in 1..=2 {
        let pid = lab.daemon_pid(i).context("twilld not running")?;
        let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
        let eff = status
            .lines()
            .find_map(|l| l.strip_prefix("CapEff:"))
            .map(|v| u64::from_str_radix(v.trim(), 16))
            .context("no CapEff")??;
        assert_eq!(eff, want, "node {i}: CapEff {eff:x}, want {want:x}");
        let mounts = std::fs::read_to_string(format!("/proc/{pid}/mountinfo"))?;
        assert!(
            mounts
                .lines()
                .any(|l| l.split(' ').nth(4) == Some("/proc/sys")
                    && l.split(' ').nth(5).is_some_and(|o| o.starts_with("ro"))),
            "node {i}: /proc/sys is not read-only for twilld"
        );
    }
    let pods: Vec<_> = (1..=2)
        .map(|i| lab.add_pod(i, "c"))
        .collect::<Result<_>>()?;
    let (a, b) = (&pods[0], &pods[1]);
    ensure!(
        a.ip6.is_some() && b.ip6.is_some(),
        "a pod has no IPv6 address"
    );
    for (from, to) in [(a, b), (b, a)] {
        let seen6 = pod_to_pod6(from, to, 7010)?;
        assert_eq!(seen6, std::net::IpAddr::V6(from.ip6.unwrap()));
        let seen4 = pod_to_pod(from, to, 7011)?;
        assert_eq!(seen4, from.ip);
    }
    for p in &pods {
        lab.del_pod(p)?;
    }
    Ok(())
}
