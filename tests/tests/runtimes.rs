//! Real container runtimes through the twill plugin: podman (CNI backend) and containerd
//! (`ctr run --cni`) on lab nodes. Containers get addresses from their node's subnet, reach
//! containers/pods on another node with their own source address (no NAT), and removing them
//! sends CNI DEL that releases the address and the host veth.

use std::net::Ipv4Addr;
use std::process::{Child, Stdio};
use std::time::Duration;

use anyhow::{anyhow, Context, Result};
use serde_json::Value;
use twill_tests::runtime::{
    attach_netns, busybox_rootfs_tar, in_subnet, ipam_holds, links, netstat_peers, node_subnet,
    twill_conflist, Containerd, Podman, IMAGE,
};
use twill_tests::{netns, tcp_probe, wait_for, wait_until, Lab, LabOptions, Pod};

const CONFIG: &str = r#"{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan"}}"#;
const PORT: u16 = 7000;
/// Seconds every container process lives at most: a test killed before its cleanup ran leaves
/// nothing running for long.
const LIFETIME: &str = "600";

/// A lab of `n` nodes with twilld ready everywhere and every node seeing the others.
fn lab_up(n: usize) -> Result<Lab> {
    Lab::up(
        LabOptions {
            nodes: n,
            ..Default::default()
        },
        CONFIG,
        &[],
    )
}

/// A `Pod` view of a runtime's container (its netns attached under the lab prefix).
fn container_pod(lab: &Lab, node: usize, name: &str, pid: u32, ip: Ipv4Addr) -> Result<Pod> {
    let ns = attach_netns(lab, node, name, pid)?;
    Ok(Pod {
        node,
        id: name.to_owned(),
        ns,
        ifname: "eth0".into(),
        ip,
        ip6: None,
        result: Value::Null,
    })
}

/// Host veths the twill plugin made in node i (`tw` + 12 hex digits).
fn twill_veths(lab: &Lab, i: usize) -> Result<Vec<String>> {
    Ok(links(lab, i)?
        .into_iter()
        .filter(|l| {
            l.len() == 14 && l.starts_with("tw") && l[2..].chars().all(|c| c.is_ascii_hexdigit())
        })
        .collect())
}

/// Kills the child on drop (a listener started for a test).
struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn podman_containers_on_two_nodes_reach_each_other_without_nat() -> Result<()> {
    let mut lab = lab_up(2)?;
    let tar = busybox_rootfs_tar(lab.dir())?;
    // podman writes 0.4.0 conflists itself: use that version here too.
    let cfg1 = twill_conflist(&lab, 1, "0.4.0");
    let cfg2 = twill_conflist(&lab, 2, "0.4.0");
    let pa = Podman::new(&mut lab, 1, &cfg1)?;
    let pb = Podman::new(&mut lab, 2, &cfg2)?;
    pa.import(&tar)?;
    pb.import(&tar)?;

    let veths_before = twill_veths(&lab, 1)?;
    // The listener answers each connection with `netstat -tn`: the peers it sees.
    let id_a = pa.run_container(
        "a",
        &[
            "timeout",
            LIFETIME,
            "nc",
            "-ll",
            "-p",
            &PORT.to_string(),
            "-e",
            "netstat",
            "-tn",
        ],
    )?;
    pb.run_container("b", &["sleep", LIFETIME])?;
    let ip_a = pa.ip("a")?;
    let ip_b = pb.ip("b")?;
    for (ip, node) in [(ip_a, 1), (ip_b, 2)] {
        let subnet = node_subnet(&lab, node)?;
        assert!(
            in_subnet(ip, &subnet)?,
            "container on node {node} got {ip}, outside the node's subnet {subnet}"
        );
        assert!(
            ipam_holds(&lab, node, ip),
            "twilld on node {node} holds no allocation for {ip}"
        );
    }
    let veths_a = twill_veths(&lab, 1)?;
    assert_eq!(
        veths_a.len(),
        veths_before.len() + 1,
        "one host veth for container a expected in node 1: {veths_a:?}"
    );

    // From inside container b (node 2) to container a (node 1): a's listener sees b's own IP.
    let ip_a_s = ip_a.to_string();
    let port_s = PORT.to_string();
    let seen = wait_for(Duration::from_secs(30), || {
        let out = pb.exec("b", &["nc", "-w", "2", &ip_a_s, &port_s]).ok()?;
        let peers = netstat_peers(&String::from_utf8_lossy(&out.stdout), PORT);
        (!peers.is_empty()).then_some(peers)
    })
    .with_context(|| format!("container b never reached {ip_a}:{PORT} in container a"))?;
    assert_eq!(
        seen,
        vec![ip_b],
        "container a saw {seen:?} instead of container b's own address {ip_b}: NAT in the path"
    );

    // The same through the harness probe, in the containers' own network namespaces.
    let pod_a = container_pod(&lab, 1, "a", pa.pid("a")?, ip_a)?;
    let pod_b = container_pod(&lab, 2, "b", pb.pid("b")?, ip_b)?;
    let probe = tcp_probe(&pod_b, &pod_a, 7100, Duration::from_secs(10))?;
    assert_eq!(
        probe.source_seen, ip_b,
        "probe listener in a saw a NATed source"
    );

    // podman rm sends DEL: the address and the host veth are gone although a's netns is still
    // held open by the attached name (so the veth did not vanish with the netns).
    pa.rm("a")?;
    assert!(
        !ipam_holds(&lab, 1, ip_a),
        "{ip_a} is still allocated on node 1 after podman rm"
    );
    assert_eq!(
        twill_veths(&lab, 1)?,
        veths_before,
        "host veth of container a left in node 1"
    );
    netns::run_ok(&["ip", "netns", "del", &pod_a.ns])?;
    // podman handed the plugin its own netns path for ADD and again for DEL.
    let calls = pa.cni_calls();
    let for_a: Vec<&String> = calls.iter().filter(|c| c.ends_with(&id_a)).collect();
    assert!(
        for_a.len() == 2
            && for_a[0].starts_with("ADD netns=[/run/netns/netns-")
            && for_a[1].starts_with("DEL netns=[/run/netns/netns-"),
        "expected ADD then DEL with podman's netns for {id_a}: {calls:#?}"
    );

    // After the DEL node 1 keeps serving podman: a new container gets an address (twill
    // allocates round-robin, so not necessarily a's) and is reachable without NAT.
    pa.run_container(
        "c",
        &[
            "timeout", LIFETIME, "nc", "-ll", "-p", &port_s, "-e", "netstat", "-tn",
        ],
    )?;
    let ip_c = pa.ip("c")?;
    assert!(in_subnet(ip_c, &node_subnet(&lab, 1)?)? && ipam_holds(&lab, 1, ip_c));
    let ip_c_s = ip_c.to_string();
    let seen = wait_for(Duration::from_secs(30), || {
        let out = pb.exec("b", &["nc", "-w", "2", &ip_c_s, &port_s]).ok()?;
        let peers = netstat_peers(&String::from_utf8_lossy(&out.stdout), PORT);
        (!peers.is_empty()).then_some(peers)
    })?;
    assert_eq!(seen, vec![ip_b]);
    pa.rm("c")?;
    pb.rm("b")?;
    assert!(!ipam_holds(&lab, 1, ip_c) && !ipam_holds(&lab, 2, ip_b));
    Ok(())
}

/// The first IPv4 address on eth0 inside a named netns.
fn eth0_ip(ns: &str) -> Result<Ipv4Addr> {
    let out = netns::run_ok(&["ip", "-n", ns, "-j", "-4", "addr", "show", "dev", "eth0"])?;
    let v: Value = serde_json::from_str(&out)?;
    v[0]["addr_info"][0]["local"]
        .as_str()
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| anyhow!("no IPv4 address on eth0 in {ns}: {out}"))
}

#[test]
fn containerd_ctr_run_cni_container_reaches_a_pod_and_is_cleaned_up() -> Result<()> {
    let mut lab = lab_up(2)?;
    let tar = busybox_rootfs_tar(lab.dir())?;
    let pod_b = lab.add_pod(2, "b")?;

    // The image: podman import, then save as a docker archive containerd can import.
    let archive = lab.dir().join("bb-docker.tar");
    {
        let cfg = twill_conflist(&lab, 1, "0.4.0");
        let p = Podman::new(&mut lab, 1, &cfg)?;
        p.import(&tar)?;
        p.run_ok(&[
            "save",
            "--format",
            "docker-archive",
            "-o",
            &archive.display().to_string(),
            IMAGE,
        ])?;
    }
    let cfg = twill_conflist(&lab, 1, "1.0.0");
    let mut ctd = Containerd::start(&mut lab, 1, &cfg)?;
    ctd.import(&archive)?;
    let images = ctd.ctr_ok(&["images", "ls", "-q"])?;
    let image = images
        .lines()
        .find(|l| l.contains("bb"))
        .ok_or_else(|| anyhow!("imported image not listed: {images:?}"))?
        .trim()
        .to_owned();

    let veths_before = twill_veths(&lab, 1)?;
    let pid = ctd.run_cni(&image, "c1", &["sleep", LIFETIME])?;
    let ns = attach_netns(&lab, 1, "c1", pid)?;
    let ip = eth0_ip(&ns)?;
    let subnet = node_subnet(&lab, 1)?;
    assert!(
        in_subnet(ip, &subnet)?,
        "ctr container got {ip}, outside node 1's subnet {subnet}"
    );
    assert!(ipam_holds(&lab, 1, ip), "no allocation for {ip} on node 1");
    let veths = twill_veths(&lab, 1)?;
    assert_eq!(
        veths.len(),
        veths_before.len() + 1,
        "one host veth for the container expected: {veths:?}"
    );

    // A listener in the pod on node 2 that answers with the peers it sees (host busybox
    // inside the pod's netns reads that netns's /proc/net/tcp).
    let port = PORT.to_string();
    let _listener = KillOnDrop(
        netns::exec_cmd(
            &pod_b.ns,
            &[
                "busybox", "nc", "-ll", "-p", &port, "-e", "busybox", "netstat", "-tn",
            ],
        )
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("start the listener in pod b")?,
    );
    let dst = pod_b.ip.to_string();
    let mut n = 0;
    let seen = wait_for(Duration::from_secs(30), || {
        n += 1;
        let out = ctd
            .exec("c1", &format!("nc{n}"), &["nc", "-w", "2", &dst, &port])
            .ok()?;
        let peers = netstat_peers(&String::from_utf8_lossy(&out.stdout), PORT);
        (!peers.is_empty()).then_some(peers)
    })
    .with_context(|| format!("the ctr container never reached pod b at {dst}:{port}"))?;
    assert_eq!(
        seen,
        vec![ip],
        "pod b saw {seen:?} instead of the container's own address {ip}: NAT in the path"
    );
    let me = container_pod(&lab, 1, "probe", pid, ip)?;
    let probe = tcp_probe(&me, &pod_b, 7100, Duration::from_secs(10))?;
    assert_eq!(
        probe.source_seen, ip,
        "probe listener in pod b saw a NATed source"
    );
    netns::run_ok(&["ip", "netns", "del", &me.ns])?;

    // Kill the task: the foreground `ctr run --rm` sends DEL with CNI_NETNS="" and deletes
    // the container. The attached name keeps the netns alive, so the host veth can only be
    // gone because twilld removed it.
    ctd.kill_task("c1")?;
    let log = ctd.run_log("c1");
    assert!(
        !log.contains("level=error"),
        "ctr run reported an error while cleaning up:\n{log}"
    );
    assert!(
        !ctd.containers()?.contains(&"c1".to_string()),
        "container c1 still exists in containerd"
    );
    assert!(!ipam_holds(&lab, 1, ip), "{ip} still allocated after DEL");
    // ctr passed the task's /proc netns for ADD and an empty CNI_NETNS for DEL.
    let calls = ctd.cni_calls();
    assert_eq!(
        calls,
        [
            format!("ADD netns=[/proc/{pid}/ns/net] id=twill-c1"),
            "DEL netns=[] id=twill-c1".to_string()
        ],
        "unexpected plugin calls from ctr"
    );
    assert_eq!(
        twill_veths(&lab, 1)?,
        veths_before,
        "host veth of the container left in node 1"
    );
    netns::run_ok(&["ip", "netns", "del", &ns])?;
    lab.del_pod(&pod_b)?;
    Ok(())
}

/// A podman container on a network whose conflist gives its pods labels (`args.cni.labels`,
/// the CNI convention) is recorded with them and isolated by a policy that selects them:
/// reachable from the pods the policy allows, not from others.
#[test]
fn podman_container_gets_its_labels_and_is_isolated() -> Result<()> {
    use twill_tests::netpol::probe;
    let mut lab = lab_up(2)?;
    let tar = busybox_rootfs_tar(lab.dir())?;
    let mut cfg = twill_conflist(&lab, 1, "0.4.0");
    cfg["plugins"][0]["args"] =
        serde_json::json!({"cni": {"labels": [{"key": "app", "value": "db"}]}});
    let pm = Podman::new(&mut lab, 1, &cfg)?;
    pm.import(&tar)?;
    lab.etcdctl(&[
        "put",
        "/coreos.com/network/policies/default/db-from-web",
        "--",
        r#"{"apiVersion":"networking.k8s.io/v1","kind":"NetworkPolicy",
            "metadata":{"name":"db-from-web","namespace":"default"},
            "spec":{"podSelector":{"matchLabels":{"app":"db"}},
                    "ingress":[{"from":[{"podSelector":{"matchLabels":{"app":"web"}}}]}]}}"#,
    ])?;
    pm.run_container(
        "db1",
        &["timeout", LIFETIME, "nc", "-ll", "-p", "7000", "-e", "cat"],
    )?;
    let ip = pm.ip("db1")?;
    // Its record, as podman named it (K8S_POD_NAME), with the network's labels.
    let rec: Value = wait_for(Duration::from_secs(10), || {
        let v = lab
            .etcd_get("/coreos.com/network/pods/default/db1")
            .ok()??;
        serde_json::from_str(&v).ok()
    })
    .context("no pod record for the podman container")?;
    assert_eq!(rec["metadata"]["labels"]["app"], "db", "{rec}");
    assert_eq!(rec["spec"]["nodeName"], "n1", "{rec}");
    assert_eq!(rec["status"]["podIP"], ip.to_string(), "{rec}");

    let pod = |lab: &mut Lab, name: &str, app: &str| {
        let cfg =
            twill_tests::netpol::pod_config(lab, 2, &[("app".to_string(), app.to_string())].into());
        lab.add_pod_with(
            2,
            name,
            &format!("K8S_POD_NAMESPACE=default;K8S_POD_NAME={name}"),
            &cfg,
        )
    };
    let web = pod(&mut lab, "web", "web")?;
    let other = pod(&mut lab, "other", "batch")?;
    wait_until(Duration::from_secs(15), || {
        probe(
            &web.netns_path(),
            std::net::IpAddr::V4(ip),
            7000,
            netpol::model::Protocol::Tcp,
        )
    })
    .context("the allowed pod never reached the podman container")?;
    assert!(
        !probe(
            &other.netns_path(),
            std::net::IpAddr::V4(ip),
            7000,
            netpol::model::Protocol::Tcp
        ),
        "a pod the policy does not allow reached the podman container"
    );
    pm.rm("db1")?;
    wait_until(Duration::from_secs(10), || {
        lab.etcd_get("/coreos.com/network/pods/default/db1")
            .is_ok_and(|v| v.is_none())
    })
    .context("the record outlived the container")?;
    Ok(())
}
