//! Pods created through the `twill` plugin on three lab nodes reach each other across nodes,
//! by ping and TCP, and the receiver sees the sender's own pod IP (no NAT); also while etcd is
//! down.

use std::time::Duration;

use anyhow::{bail, Context, Result};
use twill_tests::{wait_until, Lab, LabOptions};

const CONFIG: &str = r#"{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan"}}"#;

/// A lab of `nodes` nodes with twilld running and ready on each.
fn ready_lab(nodes: usize) -> Result<Lab> {
    let mut lab = Lab::new(LabOptions {
        nodes,
        ..Default::default()
    })?;
    lab.put_config(CONFIG)?;
    for i in 1..=nodes {
        lab.start_daemon(i)?;
    }
    for i in 1..=nodes {
        lab.wait_ready(i, Duration::from_secs(30))?;
    }
    Ok(lab)
}

/// Every node lists all the others as peers (their overlay routes are in place).
fn wait_meshed(lab: &Lab) -> Result<()> {
    let n = lab.nodes();
    wait_until(Duration::from_secs(20), || {
        (1..=n).all(|i| {
            lab.status(i)
                .map(|s| s["peers"].as_array().map_or(0, |a| a.len()) == n - 1)
                .unwrap_or(false)
        })
    })
}

#[test]
fn pods_on_three_nodes_reach_each_other_without_nat() -> Result<()> {
    let mut lab = ready_lab(3)?;
    let mut pods = Vec::new();
    for i in 1..=3 {
        pods.push(lab.add_pod(i, "a")?);
    }
    // Each pod's address is in its node's subnet.
    for p in &pods {
        let subnet = lab.status(p.node)?["node"]["subnet"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        let (net, len) = subnet.split_once('/').expect("subnet with prefix");
        let net: std::net::Ipv4Addr = net.parse()?;
        let mask = u32::MAX << (32 - len.parse::<u32>()?);
        assert_eq!(
            u32::from(p.ip) & mask,
            u32::from(net),
            "pod {} has {} outside node subnet {subnet}",
            p.id,
            p.ip
        );
    }
    wait_meshed(&lab)?;
    for a in &pods {
        for b in &pods {
            if a.id == b.id {
                continue;
            }
            wait_until(Duration::from_secs(10), || a.ping(b.ip)).map_err(|e| {
                e.context(format!(
                    "pod {} ({}) cannot ping pod {} ({})",
                    a.id, a.ip, b.id, b.ip
                ))
            })?;
            // TCP: the listener in b reports the source address it saw: a's own pod IP.
            let probe = twill_tests::tcp_probe(a, b, 7777, Duration::from_secs(5))?;
            assert_eq!(
                probe.source_seen, a.ip,
                "listener in pod {} saw {} instead of pod {}'s IP {}: NAT in the path",
                b.id, probe.source_seen, a.id, a.ip
            );
        }
    }
    for p in &pods {
        lab.del_pod(p)?;
    }
    Ok(())
}

/// A runtime may create the pod's netns file in a mount namespace twilld does not share (podman
/// with a private /run, twilld in a container). The plugin's view of CNI_NETNS must count.
#[test]
fn netns_visible_only_in_the_plugins_mount_namespace() -> Result<()> {
    use std::io::Write;
    use std::process::Stdio;

    let mut lab = ready_lab(1)?;
    let ns = lab.pod_ns(1, "priv");
    twill_tests::netns::add(&ns)?;
    let private = lab.dir().join("private-netns");
    std::fs::create_dir_all(&private)?;
    let hidden = private.join("pod");
    assert!(!hidden.exists());
    let plugin = lab.bin("twill")?;
    let cfg = lab.cni_config(1, "1.0.0");
    // The plugin runs in its own mount namespace where `hidden` is a bind mount of the pod netns;
    // twilld (in the node's mount namespace) sees no file there.
    let script = format!(
        "mount -t tmpfs twill-test {d} && touch {h} && mount --bind /run/netns/{ns} {h} && exec {plugin}",
        d = private.display(),
        h = hidden.display(),
        plugin = plugin.display()
    );
    let mut child = twill_tests::netns::exec_cmd(
        &lab.node_ns(1),
        &[
            "unshare",
            "-m",
            "--propagation",
            "private",
            "sh",
            "-c",
            &script,
        ],
    )
    .env("CNI_COMMAND", "ADD")
    .env("CNI_CONTAINERID", "privmnt")
    .env("CNI_NETNS", &hidden)
    .env("CNI_IFNAME", "eth0")
    .env("CNI_PATH", plugin.parent().unwrap())
    .stdin(Stdio::piped())
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    .spawn()?;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(cfg.to_string().as_bytes())?;
    let out = child.wait_with_output()?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "ADD failed: {stdout} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        !hidden.exists(),
        "the bind mount leaked into the test's mount namespace"
    );
    let result: serde_json::Value = serde_json::from_str(&stdout)?;
    // The result names CNI_NETNS as given, and the interface is really in the pod's netns.
    assert_eq!(
        result["interfaces"][1]["sandbox"],
        hidden.display().to_string(),
        "{result}"
    );
    let addr = result["ips"][0]["address"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let shown =
        twill_tests::netns::run_ok(&["ip", "-n", &ns, "-4", "-o", "addr", "show", "dev", "eth0"])?;
    assert!(shown.contains(&addr), "pod netns has no {addr}: {shown}");
    Ok(())
}

/// Pod setup needs only the node's own lease: with etcd gone, ADD, CHECK, STATUS and DEL still
/// work, and a pod created meanwhile reaches a pod on another node.
#[test]
fn pods_come_and_go_while_etcd_is_down() -> Result<()> {
    let mut lab = ready_lab(2)?;
    let remote = lab.add_pod(2, "r")?;
    wait_meshed(&lab)?;

    lab.stop_etcd()?;
    assert!(lab.etcdctl(&["get", "/"]).is_err(), "etcd still answers");
    let cfg = lab.cni_config(1, "1.1.0");
    let status = lab.cni(1, "STATUS", "", "", "", &cfg)?;
    assert!(
        status.success,
        "STATUS without etcd: {} {}",
        status.stdout, status.stderr
    );
    let local = lab.add_pod(1, "l")?;
    let mut check_cfg = lab.cni_config(1, "1.0.0");
    check_cfg["prevResult"] = local.result.clone();
    let check = lab.cni(
        1,
        "CHECK",
        &local.id,
        &local.netns_path(),
        "eth0",
        &check_cfg,
    )?;
    assert!(
        check.success,
        "CHECK without etcd: {} {}",
        check.stdout, check.stderr
    );
    wait_until(Duration::from_secs(10), || local.ping(remote.ip))
        .map_err(|e| e.context("new pod cannot reach the other node's pod while etcd is down"))?;
    let probe = twill_tests::tcp_probe(&local, &remote, 7777, Duration::from_secs(5))?;
    assert_eq!(probe.source_seen, local.ip, "NAT in the path");
    lab.del_pod(&local)?;
    // DEL removed the host end and released the address.
    let host_end = local.result["interfaces"][0]["name"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(!host_end.is_empty(), "{}", local.result);
    assert!(!lab
        .exec(1, &["ip", "link", "show", &host_end])?
        .status
        .success());
    let held: Vec<_> = std::fs::read_dir(lab.state_dir(1).join("ipam"))?
        .flatten()
        .filter_map(|d| std::fs::read_dir(d.path()).ok())
        .flatten()
        .flatten()
        .map(|f| f.file_name().to_string_lossy().into_owned())
        .collect();
    assert!(
        !held.contains(&local.ip.to_string()),
        "{} still allocated: {held:?}",
        local.ip
    );
    assert!(lab.daemon_running(1), "{}", lab.daemon_log(1));
    Ok(())
}

/// DEL takes the pod's conntrack entries with it: a flow still counted as established would go
/// on to the next pod given the address, past that pod's policies. Hundreds of them here, so
/// the deletes span several of the datagrams they are batched in.
#[test]
fn del_forgets_the_pods_conntrack_entries() -> Result<()> {
    let mut lab = ready_lab(1)?;
    let a = lab.add_pod(1, "a")?;
    let b = lab.add_pod(1, "b")?;
    let b_ip = b.ip.to_string();
    let tracked = |lab: &Lab| -> Result<usize> {
        let t = lab.exec_ok(1, &["cat", "/proc/net/nf_conntrack"])?;
        Ok(t.lines()
            .filter(|l| l.contains(&format!("src={b_ip} ")) || l.contains(&format!("dst={b_ip} ")))
            .count())
    };
    wait_until(Duration::from_secs(10), || a.ping(b.ip)).context("a does not reach b")?;
    // One UDP flow per source port (conntrack keeps an unanswered one for 30 s).
    let to = std::net::SocketAddr::from((b.ip, 9));
    twill_tests::netns::in_netns(&a.ns, move || -> std::io::Result<()> {
        // All open at once: 300 distinct ports.
        let socks = (0..300)
            .map(|_| std::net::UdpSocket::bind("0.0.0.0:0"))
            .collect::<std::io::Result<Vec<_>>>()?;
        for s in &socks {
            s.send_to(b"x", to)?;
        }
        Ok(())
    })??;
    wait_until(Duration::from_secs(10), || {
        tracked(&lab).is_ok_and(|n| n >= 300)
    })
    .with_context(|| format!("the node tracks {:?} flows of b's, not 300", tracked(&lab)))?;
    lab.del_pod(&b)?;
    let left = tracked(&lab)?;
    assert_eq!(left, 0, "b's conntrack entries outlived its DEL");
    lab.del_pod(&a)?;
    Ok(())
}

/// DEL answers before the pod's source checks (`bridge twill-source`) leave the kernel: taking
/// set elements out costs the kernel a grace period, and the pod's port is gone already. They
/// leave once no request has run for a moment; an ADD meanwhile adds its own and keeps the
/// other pods', and one that makes a port of the same name takes that port's old ones out.
#[test]
fn a_deleted_pods_source_checks_leave_the_kernel_after_its_del() -> Result<()> {
    let mut lab = ready_lab(1)?;
    let a = lab.add_pod(1, "a")?;
    let b = lab.add_pod(1, "b")?;
    // The words of `nft list set bridge twill-source <set>`.
    let words = |lab: &Lab, set: &str| -> Result<Vec<String>> {
        let l = lab.exec_ok(1, &["nft", "list", "set", "bridge", "twill-source", set])?;
        Ok(l.split(|c: char| c.is_whitespace() || c == ',')
            .filter(|w| !w.is_empty())
            .map(str::to_string)
            .collect())
    };
    // The elements of `src4`: ("<port>", address).
    let checked = |lab: &Lab| -> Result<Vec<(String, String)>> {
        let w = words(lab, "src4")?;
        Ok(w.windows(3)
            .filter(|t| t[1] == "." && t[2].parse::<std::net::Ipv4Addr>().is_ok())
            .map(|t| (t[0].clone(), t[2].clone()))
            .collect())
    };
    let of = |now: &[(String, String)], ip: &str| now.iter().find(|(_, i)| i == ip).cloned();
    let of_port = |now: &[(String, String)], port: &str| -> Vec<String> {
        now.iter()
            .filter(|(p, _)| p == port)
            .map(|(_, i)| i.clone())
            .collect()
    };
    let (a_ip, b_ip) = (a.ip.to_string(), b.ip.to_string());
    let now = checked(&lab)?;
    let (Some(a_el), Some(b_el)) = (of(&now, &a_ip), of(&now, &b_ip)) else {
        bail!("a's and b's ports are not checked: {now:?}");
    };
    lab.del_pod(&b)?;
    let c = lab.add_pod(1, "c")?;
    let now = checked(&lab)?;
    let Some(c_el) = of(&now, &c.ip.to_string()) else {
        bail!("c's port is not checked: {now:?}");
    };
    assert!(
        now.contains(&a_el),
        "an ADD after a DEL lost a's checks: {now:?}"
    );
    wait_until(Duration::from_secs(10), || {
        checked(&lab).is_ok_and(|now| !now.contains(&b_el))
            && words(&lab, "ports").is_ok_and(|w| !w.contains(&b_el.0))
    })
    .context("b's source checks stayed in the kernel after its DEL")?;
    assert!(
        words(&lab, "ports")?.contains(&c_el.0),
        "c's port left `ports`"
    );
    let status = lab.status(1)?;
    let sc = &status["policy"]["source_check"];
    assert_eq!(
        (&sc["ports"], &sc["addresses"]),
        (&2.into(), &2.into()),
        "{sc}"
    );

    // c again, under the same container ID and so the same port, right after its DEL.
    lab.del_pod(&c)?;
    let c2 = lab.add_pod(1, "c")?;
    let now = checked(&lab)?;
    assert_eq!(
        of_port(&now, &c_el.0),
        vec![c2.ip.to_string()],
        "the re-created port may send from other addresses than its own (before: {})",
        c_el.1
    );
    assert!(now.contains(&a_el), "a's checks went with c's: {now:?}");
    lab.del_pod(&c2)?;
    lab.del_pod(&a)?;
    Ok(())
}
