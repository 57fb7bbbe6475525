//! Self-tests of the lab harness: the topology, etcd control, running things in nodes, the
//! daemon process plumbing (with a stand-in twilld script), and that nothing is left behind.

use std::io::{Read, Write};
use std::net::TcpListener;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::Result;
use twill_tests::lab::{owner_pid, CONFIG_KEY, PREFIX_ROOT};
use twill_tests::netns;
use twill_tests::{cleanup_stale, wait_until, Lab, LabOptions};

fn lab(nodes: usize) -> Lab {
    Lab::new(LabOptions {
        nodes,
        ..Default::default()
    })
    .expect("lab")
}

fn netns_with_prefix(prefix: &str) -> Vec<String> {
    netns::list()
        .unwrap()
        .into_iter()
        .filter(|n| n.starts_with(prefix))
        .collect()
}

#[test]
fn topology_etcd_and_exec() -> Result<()> {
    let lab = lab(3);
    assert!(lab.prefix().len() <= 13, "{}", lab.prefix());
    let mut expected = vec![lab.underlay_ns()];
    expected.extend((1..=3).map(|i| lab.node_ns(i)));
    expected.sort();
    let mut got = lab.namespaces()?;
    got.sort();
    assert_eq!(got, expected);

    // etcd answers from inside the underlay, on the bridge address.
    assert!(
        lab.etcd_endpoint().starts_with("http://198.18.0.1:"),
        "{}",
        lab.etcd_endpoint()
    );
    lab.etcdctl(&["endpoint", "health"])?;
    lab.put_config(r#"{"Network":"10.244.0.0/16"}"#)?;
    assert_eq!(
        lab.etcd_get(CONFIG_KEY)?.as_deref(),
        Some(r#"{"Network":"10.244.0.0/16"}"#)
    );
    assert_eq!(lab.etcd_get("/nope")?, None);
    lab.etcdctl(&["put", "/coreos.com/network/subnets/10.244.5.0-24", "x"])?;
    assert_eq!(lab.lease_keys()?, vec!["10.244.5.0-24".to_owned()]);

    for i in 1..=3 {
        // Addressing, MTU, default route and forwarding as twilld expects to find them.
        let addr = lab.exec_ok(i, &["ip", "-4", "-o", "addr", "show", "dev", "eth0"])?;
        assert!(
            addr.contains(&format!("inet 198.18.0.{}/24", 10 + i)),
            "{addr}"
        );
        let link = lab.exec_ok(i, &["ip", "-o", "link", "show", "dev", "eth0"])?;
        assert!(
            link.contains("mtu 1500") && link.contains("state UP"),
            "{link}"
        );
        let route = lab.exec_ok(i, &["ip", "route", "show", "default"])?;
        assert!(route.contains("default via 198.18.0.1 dev eth0"), "{route}");
        let fwd = lab.exec_ok(i, &["sysctl", "-n", "net.ipv4.ip_forward"])?;
        assert_eq!(fwd.trim(), "1");
        assert!(lab
            .exec_ok(i, &["ip", "-o", "link", "show", "dev", "lo"])?
            .contains("UP"));
        // Every node reaches the underlay gateway, etcd's address, and every other node.
        assert!(
            lab.ping(i, "198.18.0.1"),
            "node {i} cannot ping the underlay"
        );
        for j in 1..=3 {
            let dst = lab.node_ip(j).to_string();
            assert!(lab.ping(i, &dst), "node {i} cannot ping node {j} ({dst})");
        }
        // Nothing outside the lab is reachable: the nodes have no way to the host.
        assert!(!lab.ping(i, "198.18.0.99"));
    }
    // exec reports failures with the command's output.
    let err = lab
        .exec_ok(1, &["ip", "link", "show", "dev", "nosuchdev"])
        .unwrap_err();
    assert!(format!("{err:#}").contains("nosuchdev"), "{err:#}");
    Ok(())
}

#[test]
fn etcd_restart_keeps_data_and_compaction_works() -> Result<()> {
    let mut lab = lab(1);
    let endpoint = lab.etcd_endpoint();
    lab.etcdctl(&["put", "/k", "v1"])?;
    lab.etcdctl(&["put", "/k", "v2"])?;
    lab.stop_etcd()?;
    assert!(
        lab.etcdctl(&["get", "/k"]).is_err(),
        "etcd still answers after stop"
    );
    lab.start_etcd()?;
    assert_eq!(
        lab.etcd_endpoint(),
        endpoint,
        "restart must keep the address"
    );
    assert_eq!(lab.etcd_get("/k")?.as_deref(), Some("v2"));
    // A node reaches etcd over the underlay.
    let health = lab.exec(
        1,
        &["etcdctl", "--endpoints", &endpoint, "endpoint", "health"],
    )?;
    assert!(health.status.success(), "{health:?}");

    let rev = lab.compact_etcd()?;
    assert!(rev >= 3, "revision {rev}");
    // History before the compaction point is gone.
    let err = lab.etcdctl(&["get", "/k", "--rev", "2"]).unwrap_err();
    assert!(format!("{err:#}").contains("compacted"), "{err:#}");
    Ok(())
}

/// A stand-in for twilld: prints its arguments and where it runs, exits 0 on SIGTERM.
fn fake_bin_dir(dir: &Path) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    let script = "#!/bin/sh\n\
        echo \"args: $*\"\n\
        echo \"env: RUST_LOG=$RUST_LOG\"\n\
        ip -4 -o addr show dev eth0\n\
        trap 'echo got TERM; exit 0' TERM\n\
        while true; do sleep 0.1; done\n";
    for name in ["twilld", "twill"] {
        let p = dir.join(name);
        std::fs::write(&p, script).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    dir.to_path_buf()
}

#[test]
fn daemon_plumbing_with_a_stand_in_binary() -> Result<()> {
    let bins = tempdir("fakebin");
    let mut lab = Lab::new(LabOptions {
        nodes: 2,
        bin_dir: Some(fake_bin_dir(&bins)),
        ..Default::default()
    })?;
    lab.start_daemon(2)?;
    wait_until(Duration::from_secs(10), || {
        lab.daemon_log(2).contains("inet 198.18.0.12/24")
    })?;
    let log = lab.daemon_log(2);
    let endpoint = format!("--etcd-endpoints {}", lab.etcd_endpoint());
    for want in [
        endpoint.as_str(),
        "--iface eth0",
        "--http-addr 127.0.0.1:9464",
        "--resync-interval 2s",
        "--lease-ttl 60s",
        "env: RUST_LOG=info",
    ] {
        assert!(log.contains(want), "missing {want:?} in:\n{log}");
    }
    assert!(
        log.contains(&format!("--subnet-file {}", lab.subnet_file(2).display())),
        "{log}"
    );
    assert!(
        lab.start_daemon(2).is_err(),
        "a second twilld on the same node must be refused"
    );

    // SIGTERM: the script exits 0.
    let status = lab.stop_daemon(2)?;
    assert!(status.success(), "{status}");
    assert!(lab.daemon_log(2).contains("got TERM"));

    // Restart with an override; the log is appended to, not truncated.
    lab.start_daemon_with(2, &["--lease-ttl", "5s", "--public-ip=198.18.0.12"])?;
    wait_until(Duration::from_secs(10), || {
        lab.daemon_log(2).matches("args:").count() == 2
    })?;
    let second = lab
        .daemon_log(2)
        .rsplit("=== lab:")
        .next()
        .unwrap()
        .to_owned();
    assert!(
        second.contains("--lease-ttl 5s") && !second.contains("--lease-ttl 60s"),
        "{second}"
    );
    assert!(second.contains("--public-ip=198.18.0.12"), "{second}");

    // SIGKILL: not a clean exit.
    let pid = lab.daemon_pid(2).unwrap() as i32;
    let status = lab.kill_daemon(2)?;
    assert!(!status.success());
    assert!(netns::is_dead(pid));
    assert!(!lab.daemon_running(2));

    // A daemon that exits by itself is observed (no instance runs while the script changes).
    std::fs::write(bins.join("twilld"), "#!/bin/sh\nexit 3\n")?;
    lab.start_daemon(1)?;
    let status = lab.wait_daemon_exit(1, Duration::from_secs(10))?;
    assert_eq!(status.code(), Some(3));
    let err = lab.wait_ready(1, Duration::from_secs(5)).unwrap_err();
    assert!(format!("{err:#}").contains("not running"), "{err:#}");
    drop(lab);
    std::fs::remove_dir_all(&bins)?;
    Ok(())
}

#[test]
fn http_get_runs_inside_the_node() -> Result<()> {
    let lab = lab(2);
    let ns = lab.node_ns(1);
    // A one-shot server on 127.0.0.1:9464 inside node 1 only.
    let server = std::thread::spawn(move || {
        netns::in_netns(&ns, || {
            let l = TcpListener::bind("127.0.0.1:9464").unwrap();
            let (mut s, _) = l.accept().unwrap();
            let mut req = Vec::new();
            let mut buf = [0u8; 1024];
            while !req.ends_with(b"\r\n\r\n") {
                let n = s.read(&mut buf).unwrap();
                assert!(n > 0, "client closed early");
                req.extend_from_slice(&buf[..n]);
            }
            let req = String::from_utf8_lossy(&req).into_owned();
            s.write_all(b"HTTP/1.0 503 Service Unavailable\r\nContent-Length: 9\r\n\r\nnot ready")
                .unwrap();
            req
        })
        .unwrap()
    });
    let (code, body) =
        twill_tests::wait_for(Duration::from_secs(10), || lab.get(1, "/readyz").ok())?;
    assert_eq!((code, body.as_str()), (503, "not ready"));
    assert!(server
        .join()
        .unwrap()
        .starts_with("GET /readyz HTTP/1.0\r\n"));
    // Node 2 has its own loopback: nothing listens there.
    assert!(lab.get(2, "/readyz").is_err());
    assert!(lab.status(2).is_err());
    Ok(())
}

#[test]
fn drop_removes_namespaces_processes_and_files() -> Result<()> {
    let bins = tempdir("dropbin");
    let mut lab = Lab::new(LabOptions {
        nodes: 2,
        bin_dir: Some(fake_bin_dir(&bins)),
        ..Default::default()
    })?;
    let prefix = lab.prefix().to_owned();
    let dir = lab.dir().to_path_buf();
    lab.start_daemon(2)?;
    let mut bg = lab.spawn(1, &["sleep", "600"])?;
    let mut pids: Vec<i32> = lab.pids().into_iter().map(|p| p as i32).collect();
    pids.push(bg.id() as i32);
    assert_eq!(pids.len(), 3, "the daemon, etcd and the sleep");
    assert!(pids.iter().all(|&p| netns::alive(p)));
    assert!(dir.is_dir());
    assert_eq!(netns_with_prefix(&prefix).len(), 3);
    drop(lab);
    let _ = bg.wait(); // reap our own child so it does not linger as a zombie
    assert!(
        netns_with_prefix(&prefix).is_empty(),
        "{:?}",
        netns_with_prefix(&prefix)
    );
    for pid in pids {
        assert!(netns::is_dead(pid), "pid {pid} survived the lab");
    }
    assert!(!dir.exists());
    std::fs::remove_dir_all(&bins)?;
    Ok(())
}

#[test]
fn drop_runs_on_panic() {
    let (tx, rx) = std::sync::mpsc::channel();
    let res = std::panic::catch_unwind(move || {
        let lab = lab(1);
        tx.send((lab.prefix().to_owned(), lab.etcd_pid().unwrap() as i32))
            .unwrap();
        panic!("test failure inside a lab");
    });
    assert!(res.is_err());
    let (prefix, etcd) = rx.recv().unwrap();
    assert!(netns_with_prefix(&prefix).is_empty());
    assert!(netns::is_dead(etcd));
}

#[test]
fn stale_leftovers_of_dead_processes_are_removed() -> Result<()> {
    // A pid that is not running: a finished child of ours.
    let mut c = Command::new("true").spawn()?;
    c.wait()?;
    let dead = c.id();
    assert!(netns::is_dead(dead as i32));
    // Its own root, so that labs starting in parallel (which sweep PREFIX_ROOT) do not race us.
    let root = "twz";
    let stale = format!("{root}{dead}x00");
    assert_eq!(owner_pid(root, &format!("{stale}u")), Some(dead as i32));
    // Leftovers: two namespaces (one with a process in it) and a temp dir.
    netns::add(&format!("{stale}u"))?;
    netns::add(&format!("{stale}n1"))?;
    let mut inside = netns::exec_cmd(&format!("{stale}n1"), &["sleep", "600"]).spawn()?;
    std::fs::create_dir_all(std::env::temp_dir().join(&stale).join("n1"))?;
    // Leftovers of a live process (this one) must survive the sweep.
    let live = format!("{root}{}x00u", std::process::id());
    netns::add(&live)?;

    cleanup_stale(root)?;
    let _ = inside.wait();
    assert!(netns_with_prefix(&stale).is_empty());
    assert!(!std::env::temp_dir().join(&stale).exists());
    assert!(netns::is_dead(inside.id() as i32));
    assert!(netns::exists(&live));
    netns::kill_all_and_delete(&live)?;
    // The generated names use the same scheme.
    let lab = lab(1);
    assert_eq!(
        owner_pid(PREFIX_ROOT, &lab.node_ns(1)),
        Some(std::process::id() as i32)
    );
    Ok(())
}

#[test]
fn bad_options_are_refused() {
    let refused = |nodes: usize, prefix: &str| {
        let prefix = (!prefix.is_empty()).then(|| prefix.to_owned());
        Lab::new(LabOptions {
            nodes,
            prefix,
            ..Default::default()
        })
        .is_err()
    };
    assert!(refused(0, ""));
    assert!(
        refused(1, "averyverylongprefix"),
        "device names would exceed 15 bytes"
    );
    assert!(refused(1, "bad/name"));
    // These would match (and so remove) other processes' generated labs.
    assert!(refused(1, "twl"));
    assert!(refused(1, "tw"));
    assert!(refused(1, "twl123x00"));
}

#[test]
fn given_prefix_and_no_etcd() -> Result<()> {
    let prefix = format!("twq{}", std::process::id());
    let lab = Lab::new(LabOptions {
        nodes: 1,
        prefix: Some(prefix.clone()),
        etcd: false,
        ..Default::default()
    })?;
    assert_eq!(lab.node_ns(1), format!("{prefix}n1"));
    assert!(lab.etcdctl(&["endpoint", "health"]).is_err());
    assert!(lab.ping(1, "198.18.0.1"));
    drop(lab);
    assert!(netns_with_prefix(&prefix).is_empty());
    Ok(())
}

fn tempdir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("twill-harness-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

#[test]
fn twill_binaries_are_located_and_built() -> Result<()> {
    // Runs `cargo build -p twill-daemon -p twill-cni` (a no-op when fresh) unless TWILL_BIN_DIR
    // is set; either way both binaries must then exist.
    let dir = twill_tests::bins::default_bin_dir();
    twill_tests::bins::ensure_built(&dir)?;
    assert!(dir.join("twilld").is_file());
    assert!(dir.join("twill").is_file());
    Ok(())
}
