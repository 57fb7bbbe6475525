//! Leases that are wrong, hostile or just large, end to end: real twilld processes in node
//! namespaces, a real etcd, and the kernel's routes and real pings as the proof. Anyone who can
//! write etcd can write these keys; none of them may take a node's traffic or its view away.

use std::time::Duration;

use anyhow::{anyhow, ensure, Context, Result};
use serde_json::Value;
use twill_tests::kernel::subnet_gateway;
use twill_tests::lab::SUBNETS_PREFIX;
use twill_tests::{wait_until, Lab, LabOptions};

const CONFIG: &str = r#"{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan"}}"#;
const DEV: &str = "twill.1";
const READY: Duration = Duration::from_secs(60);
const CONVERGE: Duration = Duration::from_secs(60);

/// A node as it describes itself on /status.
#[derive(Clone, Debug)]
struct Node {
    subnet: String,
    public_ip: String,
    mac: String,
}

impl Node {
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
    let field = |k: &str| {
        st["node"][k]
            .as_str()
            .map(str::to_owned)
            .ok_or_else(|| anyhow!("/status node.{k} missing: {st}"))
    };
    Ok(Node {
        subnet: field("subnet")?,
        public_ip: field("public_ip")?,
        mac: field("vtep_mac")?.to_ascii_lowercase(),
    })
}

fn lab(nodes: usize) -> Lab {
    Lab::new(LabOptions {
        nodes,
        ..Default::default()
    })
    .expect("lab")
}

/// twilld started on every node of `lab` (with `extra` flags on node 1), all ready and each
/// with complete entries for every other on `dev`.
fn meshed(lab: &mut Lab, dev: &str, extra: &[&str]) -> Result<Vec<Node>> {
    for i in 1..=lab.nodes() {
        lab.start_daemon_with(i, if i == 1 { extra } else { &[] })?;
    }
    let mut nodes = Vec::new();
    for i in 1..=lab.nodes() {
        lab.wait_ready(i, READY)?;
        nodes.push(node(lab, i)?);
    }
    wait_mesh(lab, dev, &nodes)?;
    Ok(nodes)
}

fn wait_mesh(lab: &Lab, dev: &str, nodes: &[Node]) -> Result<()> {
    for i in 1..=nodes.len() {
        for (k, p) in nodes.iter().enumerate().filter(|(k, _)| k + 1 != i) {
            wait_until(CONVERGE, || {
                lab.entries(i, dev)
                    .map(|e| e.has_peer(&p.subnet, &p.mac, &p.public_ip))
                    .unwrap_or(false)
            })
            .with_context(|| {
                format!(
                    "node {i} never programmed node {} {p:?}: {:?}",
                    k + 1,
                    lab.entries(i, dev)
                )
            })?;
        }
    }
    Ok(())
}

fn lease_json(ip: &str, mac: &str) -> String {
    format!(
        r#"{{"PublicIP":"{ip}","PublicIPv6":null,"BackendType":"vxlan","BackendData":{{"VNI":1,"VtepMAC":"{mac}"}}}}"#
    )
}

fn put_lease(lab: &Lab, key: &str, value: &str) -> Result<()> {
    lab.etcdctl_input(
        &["put", &format!("{SUBNETS_PREFIX}{key}")],
        value.as_bytes(),
    )
    .map(|_| ())
}

fn del_lease(lab: &Lab, key: &str) -> Result<()> {
    lab.etcdctl(&["del", &format!("{SUBNETS_PREFIX}{key}")])
        .map(|_| ())
}

fn metric(lab: &Lab, i: usize, name: &str) -> Result<f64> {
    lab.metric(i, name)?
        .ok_or_else(|| anyhow!("node {i} does not export {name}"))
}

fn has_route(lab: &Lab, i: usize, dev: &str, subnet: &str) -> bool {
    lab.entries(i, dev)
        .map(|e| e.has_route(subnet))
        .unwrap_or(false)
}

/// A lease for an otherwise unused subnet, put and waited for on `nodes`: every change put
/// before it has been seen by then (the watch delivers in order).
fn marker(lab: &Lab, nodes: &[usize], n: u8) -> Result<()> {
    let key = format!("10.244.{n}.0-24");
    put_lease(
        lab,
        &key,
        &lease_json(&format!("198.18.0.{n}"), &format!("0e:00:00:00:01:{n:02x}")),
    )?;
    let subnet = format!("10.244.{n}.0/24");
    for &i in nodes {
        wait_until(CONVERGE, || has_route(lab, i, DEV, &subnet))
            .with_context(|| format!("node {i} never programmed the marker {subnet}"))?;
    }
    Ok(())
}

fn peer_status(st: &Value, subnet: &str) -> Option<Value> {
    st["peers"]
        .as_array()?
        .iter()
        .find(|p| p["subnet"] == subnet)
        .cloned()
}

/// F2: a pod Network over the node's own LAN (198.16.0.0/14 over the 198.18.0.0/24 underlay)
/// used to let one lease for the LAN's subnet replace the node's route to etcd, and the node
/// never recovered. Now such a Network is refused at start, naming both. And when the LAN
/// grows into the pod network while the node runs, a lease covering it is not routed (and one
/// routed before is taken back): the node keeps its LAN and keeps working.
#[test]
fn pod_routes_never_capture_the_nodes_own_network() -> Result<()> {
    let mut lab = lab(2);
    lab.put_config(r#"{"Network":"198.16.0.0/14"}"#)?;
    // The finding's lease: the underlay's own subnet, announced by some VTEP.
    put_lease(
        &lab,
        "198.18.0.0-24",
        &lease_json("203.0.113.9", "0e:00:00:00:00:09"),
    )?;
    lab.start_daemon(1)?;
    let status = lab.wait_daemon_exit(1, READY)?;
    ensure!(!status.success(), "twilld accepted the Network: {status}");
    let log = lab.daemon_log_last(1);
    ensure!(
        log.contains("198.16.0.0/14") && log.contains("198.18.0.0/24"),
        "the refusal does not name the Network and the underlay's network:\n{log}"
    );
    ensure!(
        lab.lease_keys()? == vec!["198.18.0.0-24".to_string()],
        "a lease was taken: {:?}",
        lab.lease_keys()
    );
    let route = lab.exec_ok(1, &["ip", "route", "show", "198.18.0.0/24"])?;
    ensure!(
        route.contains("dev eth0") && route.contains("proto kernel"),
        "{route}"
    );
    ensure!(lab.ping(1, "198.18.0.1"), "node 1 lost its LAN");

    // A sane Network; later the underlay of node 1 gains a network inside it.
    lab.put_config(CONFIG)?;
    del_lease(&lab, "198.18.0.0-24")?;
    meshed(&mut lab, DEV, &[])?;
    let (lan, lan_key) = ("10.244.248.0/24", "10.244.248.0-24");
    put_lease(
        &lab,
        lan_key,
        &lease_json("198.18.0.77", "0e:00:00:00:00:77"),
    )?;
    for i in [1, 2] {
        wait_until(CONVERGE, || has_route(&lab, i, DEV, lan))
            .with_context(|| format!("node {i} never routed {lan}"))?;
    }
    let (u, br) = (lab.underlay_ns(), format!("{}br", lab.prefix()));
    twill_tests::netns::run_ok(&["ip", "-n", &u, "addr", "add", "10.244.248.1/22", "dev", &br])?;
    lab.exec_ok(1, &["ip", "addr", "add", "10.244.248.11/22", "dev", "eth0"])?;
    // Node 1 takes its route back (the address change is a kernel event), and reaches its LAN.
    wait_until(CONVERGE, || {
        !has_route(&lab, 1, DEV, lan) && lab.ping(1, "10.244.248.1")
    })
    .with_context(|| {
        format!(
            "node 1 still routes its own LAN into the overlay: {}",
            lab.exec_ok(1, &["ip", "route"]).unwrap_or_default()
        )
    })?;
    let st = lab.status(1)?;
    let p = peer_status(&st, lan).context("the lease is not listed")?;
    ensure!(p["programmed"] == false, "{p}");
    let why = p["reason"].as_str().unwrap_or_default();
    ensure!(
        why.contains("not routed") && why.contains("10.244.248.0/22"),
        "{p}"
    );
    ensure!(metric(&lab, 1, "twill_peers_refused_overlap")? == 1.0);
    // Node 2's LAN is not involved: the lease is a peer like any other there.
    ensure!(has_route(&lab, 2, DEV, lan));
    ensure!(metric(&lab, 2, "twill_peers_refused_overlap")? == 0.0);

    // Node 1 keeps working: ready, talking to etcd, following joins.
    marker(&lab, &[1, 2], 231)?;
    let (code, _) = lab.get(1, "/readyz")?;
    ensure!(code == 200, "node 1 not ready");
    ensure!(lab.daemon_running(1) && lab.daemon_running(2));
    // Once the network is gone from the underlay again, the peer is routed again.
    lab.exec_ok(1, &["ip", "addr", "del", "10.244.248.11/22", "dev", "eth0"])?;
    wait_until(CONVERGE, || has_route(&lab, 1, DEV, lan))
        .context("node 1 never routed the lease again")?;
    Ok(())
}

/// F5 and F7: a garbage alias key `<subnet>&junk` next to a live lease used to remove that
/// peer's route, neighbour and FDB entries on every other node (and deleting the alias did not
/// bring them back); a valid alias could redirect the subnet; a lease copying a node's VTEP MAC
/// could pull that node's traffic to another address. None of them touch the real peer now.
#[test]
fn alias_keys_and_copied_vtep_macs_cannot_take_a_peer_away() -> Result<()> {
    let mut lab = lab(3);
    lab.put_config(CONFIG)?;
    let nodes = meshed(&mut lab, DEV, &[])?;
    let victim = &nodes[1];
    put_lease(&lab, &format!("{}&junk", victim.key()), "junk")?;
    put_lease(
        &lab,
        &format!("{}&fc00::-64", victim.key()),
        &lease_json("198.18.0.66", "0e:00:00:00:00:66"),
    )?;
    put_lease(
        &lab,
        "10.244.222.0-24",
        &lease_json("198.18.0.99", &victim.mac),
    )?;
    marker(&lab, &[1, 3], 223)?;
    // Over several resyncs (2 s in the lab): entries that take turns would show.
    let check = |lab: &Lab| -> Result<()> {
        for i in [1, 3] {
            let e = lab.entries(i, DEV)?;
            ensure!(
                e.has_peer(&victim.subnet, &victim.mac, &victim.public_ip),
                "node {i} lost node 2: {e:?}"
            );
            ensure!(
                !e.fdb
                    .iter()
                    .any(|f| f.mac == victim.mac && f.dst.as_deref() != Some(&victim.public_ip)),
                "node {i} sends node 2's MAC elsewhere: {e:?}"
            );
            ensure!(
                !e.has_route("10.244.222.0/24"),
                "node {i} routes the copy: {e:?}"
            );
        }
        Ok(())
    };
    for _ in 0..4 {
        check(&lab)?;
        std::thread::sleep(Duration::from_secs(2));
    }
    for i in [1, 3] {
        ensure!(metric(&lab, i, "twill_lease_alias_conflicts_total")? >= 1.0);
        ensure!(metric(&lab, i, "twill_duplicate_vtep_macs_total")? >= 1.0);
        ensure!(lab.ping(i, &victim.gw()), "node {i} cannot reach node 2");
    }

    // Deleting the aliases changes nothing either.
    del_lease(&lab, &format!("{}&junk", victim.key()))?;
    del_lease(&lab, &format!("{}&fc00::-64", victim.key()))?;
    marker(&lab, &[1, 3], 224)?;
    check(&lab)?;
    for i in [1, 3] {
        ensure!(lab.ping(i, &victim.gw()), "node {i} cannot reach node 2");
    }
    Ok(())
}

/// F11 and F18: leases whose endpoint cannot work (a multicast VTEP MAC, loopback, this node's
/// address with another MAC, a pod address, another VNI) are skipped with a reason, never
/// programmed; a large garbage value is echoed only in part, and once, not at every re-list.
#[test]
fn leases_with_impossible_endpoints_are_skipped_and_logged_briefly() -> Result<()> {
    let mut lab = lab(2);
    lab.put_config(CONFIG)?;
    let nodes = meshed(&mut lab, DEV, &[])?;
    let n1 = &nodes[0];
    let vni7 = r#"{"PublicIP":"198.18.0.94","BackendType":"vxlan","BackendData":{"VNI":7,"VtepMAC":"0e:00:00:00:00:94"}}"#;
    let bad = [
        (
            "10.244.210.0-24",
            lease_json("198.18.0.90", "01:00:5e:00:00:10"),
        ),
        (
            "10.244.211.0-24",
            lease_json("127.0.0.1", "0e:00:00:00:00:91"),
        ),
        (
            "10.244.212.0-24",
            lease_json(&n1.public_ip, "0e:00:00:00:00:92"),
        ),
        (
            "10.244.213.0-24",
            lease_json("10.244.99.9", "0e:00:00:00:00:93"),
        ),
        ("10.244.214.0-24", vni7.to_string()),
    ];
    for (k, v) in &bad {
        put_lease(&lab, k, v)?;
    }
    // 60 KiB: under the size limit, so it is read, and its error quotes the value.
    let huge = format!(
        r#"{{"PublicIP":"{}","BackendType":"vxlan"}}"#,
        "A".repeat(60 * 1024)
    );
    put_lease(&lab, "10.244.215.0-24", &huge)?;
    marker(&lab, &[1, 2], 216)?;

    for (k, _) in &bad {
        let subnet = k.replace('-', "/");
        ensure!(!has_route(&lab, 1, DEV, &subnet), "node 1 routes {k}");
        if !k.starts_with("10.244.212.") {
            ensure!(!has_route(&lab, 2, DEV, &subnet), "node 2 routes {k}");
        }
    }
    ensure!(metric(&lab, 1, "twill_invalid_leases_skipped_total")? >= 6.0);
    let log = lab.daemon_log_last(1);
    for want in [
        "multicast or broadcast",
        "PublicIP 127.0.0.1 cannot be a tunnel endpoint",
        "is this node's address",
        "inside the pod network",
        "VNI 7 is not this network's VNI 1",
    ] {
        ensure!(log.contains(want), "node 1's log lacks {want:?}");
    }
    let echoes = |log: &str| {
        log.lines()
            .filter(|l| l.contains("10.244.215.0-24"))
            .count()
    };
    ensure!(
        echoes(&log) == 1,
        "{} warnings for the big value",
        echoes(&log)
    );
    ensure!(
        !log.contains(&"A".repeat(200)),
        "the log echoes the whole value"
    );

    // etcd restarts: every node re-lists, and says nothing new about the same keys.
    let resyncs = metric(&lab, 1, "twill_peer_resyncs_total")?;
    lab.stop_etcd()?;
    lab.start_etcd()?;
    wait_until(CONVERGE, || {
        metric(&lab, 1, "twill_peer_resyncs_total").is_ok_and(|r| r > resyncs)
    })
    .context("node 1 never re-listed")?;
    marker(&lab, &[1, 2], 217)?;
    let log = lab.daemon_log_last(1);
    ensure!(
        echoes(&log) == 1,
        "{} warnings for the big value after a re-list",
        echoes(&log)
    );
    for i in [1, 2] {
        let peer = &nodes[2 - i];
        ensure!(lab.ping(i, &peer.gw()), "node {i} cannot reach its peer");
    }
    Ok(())
}

/// 1.4 MiB: etcd takes it (1.5 MiB request limit by default); three exceed a 4 MiB message.
fn big_value(i: usize) -> Vec<u8> {
    format!("{{\"junk{i}\":\"{}\"}}", "x".repeat(1_400_000)).into_bytes()
}

/// F6: three ~1.4 MiB values under subnets/ used to make every list fail ("decoded message
/// length too large"): no node could join, running nodes went blind after their next watch
/// reset, and /readyz kept saying ready. Now the list is read in pages and the values are
/// dropped (counted); and a node that cannot list for longer than `--lease-list-grace` is not
/// ready until it can again.
#[test]
fn large_values_stop_neither_joins_nor_running_nodes() -> Result<()> {
    let mut lab = lab(2);
    lab.put_config(CONFIG)?;
    lab.start_daemon_with(1, &["--lease-list-grace", "3s"])?;
    lab.wait_ready(1, READY)?;
    for i in 0..3 {
        lab.etcdctl_input(
            &["put", &format!("{SUBNETS_PREFIX}10.244.{}.0-24", 240 + i)],
            &big_value(i),
        )?;
    }
    // Node 1's watch breaks and it re-lists.
    lab.stop_etcd()?;
    lab.start_etcd()?;
    // A new node joins, and the running one sees it.
    lab.start_daemon(2)?;
    lab.wait_ready(2, READY)?;
    let nodes = [node(&lab, 1)?, node(&lab, 2)?];
    wait_mesh(&lab, DEV, &nodes)?;
    ensure!(metric(&lab, 2, "twill_oversized_leases_dropped_total")? == 3.0);
    wait_until(CONVERGE, || {
        metric(&lab, 1, "twill_oversized_leases_dropped_total").is_ok_and(|m| m == 3.0)
    })
    .context("node 1 did not count the big values")?;
    ensure!(lab.ping(1, &nodes[1].gw()));

    // etcd away for longer than the grace: node 1 says it is not ready, and why.
    lab.stop_etcd()?;
    let answer = wait_until(
        CONVERGE,
        || matches!(lab.get(1, "/readyz"), Ok((503, body)) if body.contains("cannot list the subnet leases")),
    );
    let readyz = lab.get(1, "/readyz");
    lab.start_etcd()?;
    answer.with_context(|| format!("/readyz: {readyz:?}"))?;
    wait_until(CONVERGE, || matches!(lab.get(1, "/readyz"), Ok((200, _))))
        .context("node 1 not ready again after etcd came back")?;
    ensure!(lab.daemon_running(1) && lab.daemon_running(2));
    Ok(())
}

/// F21: after the VNI changes (config, then a restart of every node) the old `twill.<VNI>`
/// device and its entries are gone, including those of a peer that left while the nodes were
/// down, and the nodes reach each other over the new one.
#[test]
fn a_vni_change_removes_the_old_device() -> Result<()> {
    let mut lab = lab(2);
    lab.put_config(CONFIG)?;
    meshed(&mut lab, DEV, &[])?;
    marker(&lab, &[1, 2], 230)?;
    for i in [1, 2] {
        lab.stop_daemon(i)?;
    }
    // The peer leaves while nobody watches; the VNI changes.
    del_lease(&lab, "10.244.230.0-24")?;
    lab.put_config(r#"{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan","VNI":2}}"#)?;
    let nodes = meshed(&mut lab, "twill.2", &[])?;
    for i in [1, 2] {
        let old = lab.exec(i, &["ip", "link", "show", DEV])?;
        ensure!(
            !old.status.success(),
            "node {i} kept {DEV}: {}",
            String::from_utf8_lossy(&old.stdout)
        );
        let routes = lab.exec_ok(i, &["ip", "route"])?;
        ensure!(
            !routes.contains("10.244.230.0/24"),
            "node {i} kept the route of the peer that left: {routes}"
        );
        let peer = &nodes[2 - i];
        wait_until(CONVERGE, || lab.ping(i, &peer.gw()))
            .with_context(|| format!("node {i} cannot reach its peer over twill.2"))?;
    }
    Ok(())
}
