//! The VXLAN data path against the real kernel, inside network namespaces of our own.
//!
//! Each test gets two namespaces `twk<pid>-<t>a` / `twk<pid>-<t>b` joined by a veth pair
//! (198.18.<n>.1/24 and .2/24). Netlink code runs on a thread that setns'd into a namespace;
//! results are checked with `ip` / `bridge`.

use std::future::Future;
use std::net::Ipv4Addr;
use std::os::fd::AsFd;
use std::process::Command;
use std::time::{Duration, Instant};

use ipnet::Ipv4Net;
use twill_daemon::backend::vxlan::VxlanBackend;
use twill_daemon::backend::{Backend, BackendError, LocalNode};
use twill_daemon::config::{BackendConfig, BackendKind};
use twill_daemon::mac::MacAddr;
use twill_daemon::netlink::{
    DefaultRoute, IfaceSelector, KernelEvent, Netlink, VxlanSpec, Watch, Watched,
};
use twill_daemon::peer::Peer;
use twill_daemon::reconcile::{self, Op, Path, PeerChange};

const PREFIX: &str = "twk";

fn sh(args: &str) -> String {
    let out = Command::new("sh")
        .arg("-c")
        .arg(args)
        .output()
        .expect("run sh");
    assert!(
        out.status.success(),
        "`{args}` failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn sh_ok(args: &str) -> bool {
    Command::new("sh")
        .arg("-c")
        .arg(args)
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

/// Removes namespaces left by crashed runs of this test (their pid is no longer alive).
fn clean_leftovers() {
    for line in sh("ip netns list").lines() {
        let name = line.split_whitespace().next().unwrap_or("");
        let Some(rest) = name.strip_prefix(PREFIX) else {
            continue;
        };
        let pid: String = rest.chars().take_while(|c| c.is_ascii_digit()).collect();
        let alive = pid.parse::<u32>().is_ok_and(|p| {
            p == std::process::id() || std::path::Path::new(&format!("/proc/{p}")).exists()
        });
        if !alive {
            let _ = sh_ok(&format!("ip netns del {name}"));
        }
    }
}

/// Two namespaces joined by a veth pair; deleted on drop (also on panic).
struct Pair {
    a: String,
    b: String,
    ip_a: Ipv4Addr,
    ip_b: Ipv4Addr,
}

impl Pair {
    /// `tag` keeps tests of this binary (same pid) apart; `n` picks 198.18.<n>.0/24.
    fn new(tag: char, n: u8) -> Pair {
        clean_leftovers();
        let pid = std::process::id();
        // The `-` ends the pid for `clean_leftovers`: a digit tag right after it made another
        // test process read a pid that does not exist and delete this pair under the test.
        let a = format!("{PREFIX}{pid}-{tag}a");
        let b = format!("{PREFIX}{pid}-{tag}b");
        let p = Pair {
            a,
            b,
            ip_a: Ipv4Addr::new(198, 18, n, 1),
            ip_b: Ipv4Addr::new(198, 18, n, 2),
        };
        let (a, b) = (&p.a, &p.b);
        let _ = sh_ok(&format!("ip netns del {a}; ip netns del {b}"));
        sh(&format!("ip netns add {a} && ip netns add {b}"));
        // Created inside `a` with the peer end put straight into `b`: the host never sees it.
        sh(&format!(
            "ip -n {a} link add va type veth peer name vb netns {b}"
        ));
        sh(&format!(
            "ip -n {a} addr add {}/24 dev va && ip -n {a} link set va up && ip -n {a} link set lo up",
            p.ip_a
        ));
        sh(&format!(
            "ip -n {b} addr add {}/24 dev vb && ip -n {b} link set vb up && ip -n {b} link set lo up",
            p.ip_b
        ));
        p
    }
}

impl Drop for Pair {
    fn drop(&mut self) {
        let _ = sh_ok(&format!("ip netns del {}", self.a));
        let _ = sh_ok(&format!("ip netns del {}", self.b));
    }
}

/// Runs `f` on a fresh thread inside namespace `ns` with its own tokio runtime.
fn in_ns<F, Fut, T>(ns: &str, f: F) -> T
where
    F: FnOnce() -> Fut + Send + 'static,
    Fut: Future<Output = T>,
    T: Send + 'static,
{
    let path = format!("/run/netns/{ns}");
    std::thread::spawn(move || {
        let fd = std::fs::File::open(&path).expect("open netns");
        nix::sched::setns(fd.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(f())
    })
    .join()
    .unwrap_or_else(|e| std::panic::resume_unwind(e))
}

fn mac(i: u32) -> MacAddr {
    let b = i.to_be_bytes();
    MacAddr([0x02, 0x42, b[0], b[1], b[2], b[3]])
}

/// Synthetic peers: 10.(100 + i/250).(i%250).0/24, public IP 198.19.x.y.
fn peers(n: u32) -> Vec<Peer> {
    (0..n)
        .map(|i| Peer {
            subnet: Ipv4Net::new(
                Ipv4Addr::new(10, (100 + i / 250) as u8, (i % 250) as u8, 0),
                24,
            )
            .unwrap(),
            public_ip: Ipv4Addr::new(198, 19, (i / 250) as u8, (i % 250 + 1) as u8),
            vtep_mac: Some(mac(i)),
        })
        .collect()
}

fn spec(underlay: &str, local: Ipv4Addr, index: u32, port: u16, subnet: &str) -> VxlanSpec {
    let _ = underlay;
    let net: Ipv4Net = subnet.parse().unwrap();
    VxlanSpec {
        name: "twill.1".into(),
        vni: 1,
        local,
        underlay_index: index,
        port,
        mtu: 1450,
        mac: MacAddr([0x02, 0xaa, 0xbb, 0xcc, 0xdd, 0x01]),
        addr: Ipv4Net::new(net.network(), 32).unwrap(),
    }
}

fn count(ns: &str, cmd: &str, filter: impl Fn(&str) -> bool) -> usize {
    sh(&format!("ip netns exec {ns} {cmd}"))
        .lines()
        .filter(|l| filter(l))
        .count()
}

fn kernel_counts(ns: &str) -> (usize, usize, usize) {
    (
        count(ns, "ip neigh show dev twill.1 nud permanent", |l| {
            !l.trim().is_empty()
        }),
        count(ns, "bridge fdb show dev twill.1", |l| {
            l.contains(" dst ") && !l.starts_with("00:00:00:00:00:00")
        }),
        count(ns, "ip route show dev twill.1", |l| l.contains(" via ")),
    )
}

#[test]
fn underlay_selection() {
    let p = Pair::new('u', 10);
    let ns = p.a.clone();
    let ip = p.ip_a;
    let (by_name, by_addr, no_default) = in_ns(&ns, move || async move {
        let nl = Netlink::new().unwrap();
        let by_name = nl
            .find_underlay(Some(&IfaceSelector::Name("va".into())))
            .await
            .unwrap();
        let by_addr = nl
            .find_underlay(Some(&IfaceSelector::Addr(ip.into())))
            .await
            .unwrap();
        let no_default = nl.find_underlay(None).await.unwrap_err().to_string();
        (by_name, by_addr, no_default)
    });
    assert_eq!(by_name.name, "va");
    assert_eq!(by_name.addr, Some(ip));
    assert_eq!(by_name.mtu, 1500);
    assert_eq!(by_addr, by_name);
    assert!(
        no_default.contains("no default route; pass --iface"),
        "{no_default}"
    );

    sh(&format!("ip -n {ns} route add default via {}", p.ip_b));
    let by_default = in_ns(&ns, || async {
        Netlink::new().unwrap().find_underlay(None).await.unwrap()
    });
    assert_eq!(by_default, by_name);

    // The IPv6 endpoint: only the kernel's link-local address so far, which is none.
    let addr6 = || {
        in_ns(&ns, || async {
            let nl = Netlink::new().unwrap();
            let u = nl
                .find_underlay(Some(&IfaceSelector::Name("va".into())))
                .await
                .unwrap();
            u.addr6.map(|a| a.to_string())
        })
    };
    assert_eq!(by_name.addr6, None);
    // Deprecated, still in duplicate address detection (held there by 100 probes), and one
    // from autoconfiguration (a lifetime, not permanent): only the last is usable.
    sh(&format!(
        "ip -n {ns} addr add fd00:18:10::9/64 dev va nodad preferred_lft 0 && \
         ip netns exec {ns} sysctl -qw net.ipv6.conf.va.dad_transmits=100 && \
         ip -n {ns} addr add fd00:18:10::7/64 dev va && \
         ip -n {ns} addr add fd00:18:10::3/64 dev va nodad valid_lft 3600 preferred_lft 3600"
    ));
    assert!(
        sh(&format!("ip -n {ns} -6 addr show dev va")).contains("tentative"),
        "the DAD address is not tentative"
    );
    assert_eq!(addr6().as_deref(), Some("fd00:18:10::3"));
    // A static address wins over an autoconfigured one, also one added after it (the kernel
    // lists the newest first).
    sh(&format!(
        "ip -n {ns} addr del fd00:18:10::3/64 dev va && \
         ip -n {ns} addr add fd00:18:10::5/64 dev va nodad && \
         ip -n {ns} addr add fd00:18:10::3/64 dev va nodad valid_lft 3600 preferred_lft 3600"
    ));
    assert_eq!(addr6().as_deref(), Some("fd00:18:10::5"));

    // An IPv6-only host: no IPv4 address and no IPv4 default route. The IPv6 default route
    // names the underlay, which has no IPv4 address (an IPv6-only network's node).
    sh(&format!(
        "ip -n {ns} route del default && ip -n {ns} addr del {ip}/24 dev va && \
         ip -n {ns} -6 route add default via fd00:18:10::1 dev va"
    ));
    let only6 = in_ns(&ns, || async {
        let nl = Netlink::new().unwrap();
        // The IPv4 default route is gone: none for a network with IPv4.
        let none4 = nl.find_underlay(None).await.unwrap_err().to_string();
        assert!(none4.contains("no default route; pass --iface"), "{none4}");
        for route in [DefaultRoute::Ipv6, DefaultRoute::Any] {
            let u = nl.find_underlay_by(None, route).await.unwrap();
            assert_eq!(u.name, "va", "{route:?}");
        }
        nl.find_underlay_by(None, DefaultRoute::Ipv6).await.unwrap()
    });
    assert_eq!(only6.name, "va");
    assert_eq!(only6.addr, None);
    // By one of its IPv6 addresses (here the autoconfigured one): that address is the
    // endpoint, whichever one the interface would prefer.
    let by_addr6 = in_ns(&ns, || async {
        Netlink::new()
            .unwrap()
            .find_underlay(Some(&IfaceSelector::Addr("fd00:18:10::3".parse().unwrap())))
            .await
            .unwrap()
    });
    assert_eq!(by_addr6.name, "va");
    assert_eq!(
        by_addr6.addr6.map(|a| a.to_string()).as_deref(),
        Some("fd00:18:10::3")
    );
    assert_eq!(
        only6.addr6.map(|a| a.to_string()).as_deref(),
        Some("fd00:18:10::5")
    );
}

#[test]
fn ensure_vxlan_creates_keeps_and_replaces() {
    let p = Pair::new('e', 11);
    let ns = p.a.clone();
    let ip = p.ip_a;
    let (idx1, idx2) = in_ns(&ns, move || async move {
        let nl = Netlink::new().unwrap();
        let u = nl
            .find_underlay(Some(&IfaceSelector::Name("va".into())))
            .await
            .unwrap();
        let s = spec("va", ip, u.index, 8472, "10.244.1.0/24");
        let idx1 = nl.ensure_vxlan(&s).await.unwrap();
        let ops = reconcile::diff(&peers(3), &Default::default());
        let r = nl.apply(idx1, &ops).await;
        assert!(r.failed.is_empty(), "{:?}", r.failed);
        // Another address on the device is not ours: it must go.
        std::process::Command::new("ip")
            .args(["addr", "add", "10.9.9.9/24", "dev", "twill.1"])
            .status()
            .unwrap();
        let idx2 = nl.ensure_vxlan(&s).await.unwrap();
        (idx1, idx2)
    });
    let d = sh(&format!("ip -n {ns} -d link show twill.1"));
    for want in [
        "vxlan id 1 ",
        &format!("local {ip} "),
        "dev va ",
        "dstport 8472 ",
        "nolearning",
        "mtu 1450 ",
        "link/ether 02:aa:bb:cc:dd:01",
        "state UNKNOWN",
    ] {
        assert!(d.contains(want), "missing {want:?} in:\n{d}");
    }
    assert!(
        d.contains("<BROADCAST,MULTICAST,UP,LOWER_UP>"),
        "not up:\n{d}"
    );
    let addrs = sh(&format!("ip -n {ns} -4 -o addr show dev twill.1"));
    assert!(addrs.contains("inet 10.244.1.0/32"), "{addrs}");
    assert!(!addrs.contains("10.9.9.9"), "stale address kept: {addrs}");
    assert_eq!(idx1, idx2, "a matching device must be kept, not recreated");
    assert_eq!(
        kernel_counts(&ns),
        (3, 3, 3),
        "entries must survive a second ensure_vxlan"
    );

    // Other port: the device is replaced.
    let idx3 = in_ns(&ns, move || async move {
        let nl = Netlink::new().unwrap();
        let u = nl
            .find_underlay(Some(&IfaceSelector::Name("va".into())))
            .await
            .unwrap();
        nl.ensure_vxlan(&spec("va", ip, u.index, 4789, "10.244.1.0/24"))
            .await
            .unwrap()
    });
    assert_ne!(idx3, idx1);
    let d = sh(&format!("ip -n {ns} -d link show twill.1"));
    assert!(d.contains("dstport 4789 "), "{d}");
    assert_eq!(kernel_counts(&ns), (0, 0, 0));
}

#[test]
fn bulk_apply_dump_diff_and_stale_removal() {
    const N: u32 = 5000;
    let p = Pair::new('m', 12);
    let ns = p.a.clone();
    let ip = p.ip_a;
    let idx = in_ns(&ns, move || async move {
        let nl = Netlink::new().unwrap();
        let u = nl
            .find_underlay(Some(&IfaceSelector::Name("va".into())))
            .await
            .unwrap();
        let idx = nl
            .ensure_vxlan(&spec("va", ip, u.index, 8472, "10.244.1.0/24"))
            .await
            .unwrap();
        let all = peers(N);
        let ops = reconcile::change_ops(
            &all.iter()
                .map(|p| PeerChange {
                    old: None,
                    new: Some(*p),
                })
                .collect::<Vec<_>>(),
        );
        assert_eq!(ops.len(), 3 * N as usize);
        let t = Instant::now();
        let r = nl.apply(idx, &ops).await;
        eprintln!("applied {} entries in {:?}", ops.len(), t.elapsed());
        assert!(
            r.failed.is_empty(),
            "{:?}",
            &r.failed[..r.failed.len().min(5)]
        );
        assert_eq!(r.applied, 3 * N as u64);
        let t = Instant::now();
        let dump = nl.dump_entries(Some(idx)).await.unwrap();
        eprintln!("dumped in {:?}", t.elapsed());
        assert_eq!(
            (dump.neighs.len(), dump.fdb.len(), dump.routes.len()),
            (N as usize, N as usize, N as usize)
        );
        assert_eq!(
            reconcile::diff(&all, &dump),
            vec![],
            "in-sync kernel must yield no ops"
        );
        // Re-applying is idempotent (replace).
        let r = nl.apply(idx, &ops[..300]).await;
        assert!(r.failed.is_empty(), "{:?}", r.failed);
        idx
    });
    assert_eq!(kernel_counts(&ns), (N as usize, N as usize, N as usize));
    let line = sh(&format!("ip -n {ns} route show 10.100.7.0/24"));
    assert!(
        line.contains("via 10.100.7.0 dev twill.1") && line.contains("onlink"),
        "{line}"
    );
    let fdb = sh(&format!("bridge -n {ns} fdb show dev twill.1"));
    assert!(
        fdb.contains(&format!("{} dst 198.19.0.8 self permanent", mac(7))),
        "fdb line for peer 7 missing"
    );
    let neigh = sh(&format!("ip -n {ns} neigh show 10.100.7.0 dev twill.1"));
    assert!(
        neigh.contains(&format!("lladdr {} PERMANENT", mac(7))),
        "{neigh}"
    );

    // A restart with fewer peers: the rest is stale and goes; a changed MAC is fixed.
    let (stale_ops, left) = in_ns(&ns, move || async move {
        let nl = Netlink::new().unwrap();
        let mut keep = peers(N - 500);
        keep[7].vtep_mac = Some(mac(900_000));
        let dump = nl.dump_entries(Some(idx)).await.unwrap();
        let ops = reconcile::diff(&keep, &dump);
        let r = nl.apply(idx, &ops).await;
        assert!(
            r.failed.is_empty(),
            "{:?}",
            &r.failed[..r.failed.len().min(5)]
        );
        let after = nl.dump_entries(Some(idx)).await.unwrap();
        assert_eq!(reconcile::diff(&keep, &after), vec![]);
        // Deleting what is already gone is not an error.
        let gone = [
            Op::DelRoute {
                dst: "10.200.0.0/24".parse().unwrap(),
                gw: "10.200.0.0".parse().unwrap(),
            },
            Op::DelNeigh {
                ip: "10.200.0.0".parse().unwrap(),
                mac: mac(1),
            },
            Op::DelFdb {
                mac: mac(999_999),
                dst: "198.19.200.1".parse().unwrap(),
            },
        ];
        let r = nl.apply(idx, &gone).await;
        assert!(r.failed.is_empty(), "{:?}", r.failed);
        (ops, after)
    });
    assert_eq!(
        stale_ops.iter().filter(|o| o.is_delete()).count(),
        3 * 500 + 1,
        "500 stale peers + old fdb of peer 7"
    );
    assert_eq!(left.neighs.len(), (N - 500) as usize);
    assert_eq!(
        kernel_counts(&ns),
        ((N - 500) as usize, (N - 500) as usize, (N - 500) as usize)
    );
    let fdb = sh(&format!("bridge -n {ns} fdb show dev twill.1"));
    assert!(
        !fdb.contains(&mac(7).to_string()),
        "old fdb entry of peer 7 kept"
    );
    assert!(fdb.contains(&mac(900_000).to_string()));
    let neigh = sh(&format!("ip -n {ns} neigh show 10.100.7.0 dev twill.1"));
    assert!(neigh.contains(&mac(900_000).to_string()), "{neigh}");
}

fn backend_cfg(direct: bool) -> BackendConfig {
    BackendConfig {
        kind: BackendKind::Vxlan,
        vni: 1,
        port: 8472,
        mtu: None,
        direct_routing: direct,
    }
}

/// This node as the backend sees it: the underlay found by `ip`, the given subnet and MAC.
async fn local_node(nl: &Netlink, ip: Ipv4Addr, subnet: Ipv4Net, vtep_mac: MacAddr) -> LocalNode {
    let u = nl
        .find_underlay(Some(&IfaceSelector::Addr(ip.into())))
        .await
        .unwrap();
    LocalNode {
        subnet,
        public_ip: ip,
        underlay_index: u.index,
        underlay_mtu: u.mtu,
        vtep_mac,
    }
}

/// Sets up one node's backend in `ns` and programs `peers`; returns the ifindex.
fn node(
    ns: &str,
    public_ip: Ipv4Addr,
    subnet: &str,
    mac: MacAddr,
    peers: Vec<Peer>,
    direct: bool,
) -> u32 {
    let subnet: Ipv4Net = subnet.parse().unwrap();
    in_ns(ns, move || async move {
        let nl = Netlink::new().unwrap();
        let local = local_node(&nl, public_ip, subnet, mac).await;
        let mut b = VxlanBackend::new(nl, &backend_cfg(direct), None);
        let info = b.setup(&local).await.unwrap();
        assert_eq!(info.name, "twill.1");
        assert_eq!(info.mtu, 1450);
        let stats = b.reconcile(&peers).await.unwrap();
        assert_eq!(stats.failed, 0);
        info.ifindex
    })
}

fn ping_until(ns: &str, dst: &str) -> bool {
    ping_from_until(ns, None, dst)
}

/// Pings `dst` (v4 or v6) from namespace `ns`, from address `src` if given, for up to 10 s.
fn ping_from_until(ns: &str, src: Option<&str>, dst: &str) -> bool {
    let from = src.map_or(String::new(), |s| format!("-I {s} "));
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if sh_ok(&format!("ip netns exec {ns} ping -c1 -W1 {from}{dst}")) {
            return true;
        }
        // An immediate failure (no route yet) would otherwise spin.
        std::thread::sleep(Duration::from_millis(50));
    }
    false
}

#[test]
fn data_path_between_two_nodes() {
    let p = Pair::new('d', 13);
    let (ma, mb) = (
        MacAddr([0x02, 0, 0, 0, 0xa, 1]),
        MacAddr([0x02, 0, 0, 0, 0xb, 1]),
    );
    let pa = Peer {
        subnet: "10.244.1.0/24".parse().unwrap(),
        public_ip: p.ip_a,
        vtep_mac: Some(ma),
    };
    let pb = Peer {
        subnet: "10.244.2.0/24".parse().unwrap(),
        public_ip: p.ip_b,
        vtep_mac: Some(mb),
    };
    node(&p.a, p.ip_a, "10.244.1.0/24", ma, vec![pb], false);
    node(&p.b, p.ip_b, "10.244.2.0/24", mb, vec![pa], false);
    assert!(
        ping_until(&p.a, "10.244.2.0"),
        "no ping from node a to b's VTEP over vxlan"
    );
    assert!(
        ping_until(&p.b, "10.244.1.0"),
        "no ping from node b to a's VTEP over vxlan"
    );
    let route = sh(&format!("ip -n {} route get 10.244.2.0", p.a));
    assert!(route.contains("dev twill.1"), "{route}");
}

#[test]
fn direct_routing_for_on_link_peers() {
    let p = Pair::new('r', 14);
    let (ma, mb) = (
        MacAddr([0x02, 0, 0, 0, 0xa, 2]),
        MacAddr([0x02, 0, 0, 0, 0xb, 2]),
    );
    let pa = Peer {
        subnet: "10.244.1.0/24".parse().unwrap(),
        public_ip: p.ip_a,
        vtep_mac: Some(ma),
    };
    let pb = Peer {
        subnet: "10.244.2.0/24".parse().unwrap(),
        public_ip: p.ip_b,
        vtep_mac: Some(mb),
    };
    // An off-link peer (not in 198.18.15.0/24) still goes over vxlan.
    let far = Peer {
        subnet: "10.244.9.0/24".parse().unwrap(),
        public_ip: "198.19.9.9".parse().unwrap(),
        vtep_mac: Some(mac(9)),
    };
    node(&p.a, p.ip_a, "10.244.1.0/24", ma, vec![pb, far], true);
    node(&p.b, p.ip_b, "10.244.2.0/24", mb, vec![pa], true);
    let route = sh(&format!("ip -n {} route show 10.244.2.0/24", p.a));
    assert!(route.contains(&format!("via {} dev va", p.ip_b)), "{route}");
    let route = sh(&format!("ip -n {} route show 10.244.9.0/24", p.a));
    assert!(route.contains("via 10.244.9.0 dev twill.1"), "{route}");
    assert_eq!(
        kernel_counts(&p.a),
        (1, 1, 1),
        "only the far peer uses the overlay"
    );
    assert!(
        ping_until(&p.a, "10.244.2.0"),
        "no ping over the direct route"
    );

    // Dropping the peer removes the direct route (found again by its protocol mark).
    let ns = p.a.clone();
    let ip_a = p.ip_a;
    in_ns(&ns, move || async move {
        let nl = Netlink::new().unwrap();
        let local = local_node(&nl, ip_a, "10.244.1.0/24".parse().unwrap(), ma).await;
        let mut b = VxlanBackend::new(nl, &backend_cfg(true), None);
        b.setup(&local).await.unwrap();
        let s = b.reconcile(&[far]).await.unwrap();
        assert_eq!((s.removed, s.failed), (1, 0));
    });
    let route = sh(&format!("ip -n {} route show 10.244.2.0/24", p.a));
    assert!(route.trim().is_empty(), "stale direct route kept: {route}");
}

#[test]
fn backend_survives_device_deletion() {
    let p = Pair::new('g', 16);
    let ns = p.a.clone();
    let ip = p.ip_a;
    let want = peers(50);
    in_ns(&ns, move || async move {
        let nl = Netlink::new().unwrap();
        let local = local_node(&nl, ip, "10.244.1.0/24".parse().unwrap(), mac(77)).await;
        let mut b = VxlanBackend::new(nl.clone(), &backend_cfg(false), None);
        b.setup(&local).await.unwrap();
        let s = b.reconcile(&want).await.unwrap();
        assert_eq!((s.added, s.removed, s.failed), (150, 0, 0));
        // In sync: a second reconcile does nothing.
        assert_eq!(b.reconcile(&want).await.unwrap(), Default::default());
        let idx = b.ifindex().unwrap();
        nl.delete_link(idx).await.unwrap();
        assert!(matches!(
            b.reconcile(&want).await,
            Err(BackendError::DeviceGone(_))
        ));
        let change = [PeerChange {
            old: None,
            new: Some(peers(51)[50]),
        }];
        assert!(matches!(
            b.apply(&change).await,
            Err(BackendError::DeviceGone(_))
        ));
        b.setup(&local).await.unwrap();
        let s = b.reconcile(&want).await.unwrap();
        assert_eq!((s.added, s.failed), (150, 0));
        let s = b.apply(&change).await.unwrap();
        assert_eq!((s.added, s.failed), (3, 0));
        let s = b
            .apply(&[PeerChange {
                old: Some(peers(51)[50]),
                new: None,
            }])
            .await
            .unwrap();
        assert_eq!((s.removed, s.failed), (3, 0));
    });
    assert_eq!(kernel_counts(&ns), (50, 50, 50));
}

#[test]
fn subscribe_reports_deleted_entries_devices_and_addresses() {
    let p = Pair::new('s', 17);
    let ns = p.a.clone();
    let ip = p.ip_a;
    let events = in_ns(&ns, move || async move {
        let nl = Netlink::new().unwrap();
        let u = nl
            .find_underlay(Some(&IfaceSelector::Addr(ip.into())))
            .await
            .unwrap();
        let idx = nl
            .ensure_vxlan(&spec("va", ip, u.index, 8472, "10.244.1.0/24"))
            .await
            .unwrap();
        let r = nl
            .apply(idx, &reconcile::diff(&peers(2), &Default::default()))
            .await;
        assert!(r.failed.is_empty());
        let mut rx = nl
            .subscribe(Watch {
                v4: Some(Watched {
                    ifindex: idx,
                    overlay: true,
                }),
                v6: None,
                underlay: u.index,
            })
            .unwrap();
        let mut seen = Vec::new();
        // Each check starts from an empty queue, so an event can only come from its action.
        drain(&mut rx);
        // Our own deletions (peer 1's three entries, through this Netlink) are no event...
        let actual = nl.dump_entries(Some(idx)).await.unwrap();
        let ours = reconcile::diff(&peers(1), &actual);
        assert_eq!(ours.len(), 3, "{ours:?}");
        assert!(nl.apply(idx, &ours).await.failed.is_empty());
        let quiet = tokio::time::timeout(Duration::from_millis(500), rx.recv())
            .await
            .is_err();
        seen.push(("silence after our own deletions", quiet));
        // ...while a hand deletion right behind them is one.
        sh("ip route del 10.100.0.0/24 dev twill.1");
        seen.push((
            "route deleted by hand after ours",
            next_event(&mut rx, KernelEvent::DeviceChanged)
                .await
                .unwrap_or(false),
        ));
        let actual = nl.dump_entries(Some(idx)).await.unwrap();
        let back = reconcile::diff(&peers(2), &actual);
        assert!(nl.apply(idx, &back).await.failed.is_empty());
        drain(&mut rx);
        sh("ip neigh del 10.100.1.0 dev twill.1");
        seen.push((
            "neigh deleted",
            next_event(&mut rx, KernelEvent::DeviceChanged)
                .await
                .unwrap_or(false),
        ));
        drain(&mut rx);
        sh(&format!(
            "bridge fdb del {} dev twill.1 dst 198.19.0.1 self",
            mac(0)
        ));
        seen.push((
            "fdb deleted",
            next_event(&mut rx, KernelEvent::DeviceChanged)
                .await
                .unwrap_or(false),
        ));
        drain(&mut rx);
        sh("ip addr add 198.18.99.1/24 dev va");
        seen.push((
            "address added",
            next_event(&mut rx, KernelEvent::AddressChanged)
                .await
                .unwrap_or(false),
        ));
        drain(&mut rx);
        sh("ip link del twill.1");
        seen.push((
            "device deleted",
            next_event(&mut rx, KernelEvent::DeviceChanged)
                .await
                .unwrap_or(false),
        ));
        seen
    });
    for (what, ok) in events {
        assert!(ok, "no event for: {what}");
    }
}

/// A dual-stack node's IPv6 device is watched like the IPv4 one: our own deletions of its
/// entries are no event, a hand deletion of its route, neighbour or FDB entry is, and so is
/// an IPv6 address change on the underlay (the IPv6 endpoint may move).
#[test]
fn subscribe_reports_the_ipv6_side_too() {
    use ipnet::Ipv6Net;
    use std::net::Ipv6Addr;
    use twill_daemon::netlink::VxlanSpecOf;
    use twill_daemon::peer::PeerOf;
    use twill_daemon::reconcile::KernelEntriesOf;

    let p = Pair::new('h', 64);
    sh(&format!(
        "ip -n {} addr add fd00:18:62::1/64 dev va nodad",
        p.a
    ));
    let ns = p.a.clone();
    let ip = p.ip_a;
    let events = in_ns(&ns, move || async move {
        let nl = Netlink::new().unwrap();
        let u = nl
            .find_underlay(Some(&IfaceSelector::Addr(ip.into())))
            .await
            .unwrap();
        let idx4 = nl
            .ensure_vxlan(&spec("va", ip, u.index, 8472, "10.244.1.0/24"))
            .await
            .unwrap();
        let peer = |i: u32| PeerOf::<Ipv6Net> {
            subnet: format!("fd00:10:244:{i:x}::/64").parse().unwrap(),
            public_ip: format!("fd00:18:62::{i:x}").parse().unwrap(),
            vtep_mac: Some(mac(600 + i)),
        };
        let idx6 = nl
            .ensure_vxlan(&VxlanSpecOf::<Ipv6Net> {
                name: "twill-v6.1".into(),
                vni: 1,
                local: "fd00:18:62::1".parse::<Ipv6Addr>().unwrap(),
                underlay_index: u.index,
                port: 8472,
                mtu: 1430,
                mac: mac(601),
                addr: "fd00:10:244:1::/128".parse().unwrap(),
            })
            .await
            .unwrap();
        let both = [peer(2), peer(3)];
        let r = nl
            .apply(idx6, &reconcile::diff(&both, &KernelEntriesOf::default()))
            .await;
        assert!(r.failed.is_empty(), "{:?}", r.failed);
        let mut rx = nl
            .subscribe(Watch {
                v4: Some(Watched {
                    ifindex: idx4,
                    overlay: true,
                }),
                v6: Some(Watched {
                    ifindex: idx6,
                    overlay: true,
                }),
                underlay: u.index,
            })
            .unwrap();
        let mut seen = Vec::new();
        tokio::time::sleep(Duration::from_millis(200)).await;
        drain(&mut rx);
        // Our own removal of peer 3's three entries: silence.
        let actual = nl.dump_entries::<Ipv6Net>(Some(idx6)).await.unwrap();
        let ours = reconcile::diff(&[peer(2)], &actual);
        assert_eq!(ours.len(), 3, "{ours:?}");
        assert!(nl.apply(idx6, &ours).await.failed.is_empty());
        let quiet = tokio::time::timeout(Duration::from_millis(500), rx.recv())
            .await
            .is_err();
        seen.push(("silence after our own IPv6 deletions", quiet));
        for (what, cmd) in [
            (
                "IPv6 route deleted",
                "ip -6 route del fd00:10:244:2::/64 dev twill-v6.1",
            ),
            (
                "IPv6 neighbour deleted",
                "ip -6 neigh del fd00:10:244:2:: dev twill-v6.1",
            ),
            (
                "IPv6 FDB entry deleted",
                &format!(
                    "bridge fdb del {} dev twill-v6.1 dst fd00:18:62::2 self",
                    mac(602)
                ),
            ),
        ] {
            drain(&mut rx);
            sh(cmd);
            seen.push((
                what,
                next_event(&mut rx, KernelEvent::DeviceChanged)
                    .await
                    .unwrap_or(false),
            ));
        }
        drain(&mut rx);
        sh("ip -6 addr add fd00:18:62::99/64 dev va nodad");
        seen.push((
            "IPv6 address added on the underlay",
            next_event(&mut rx, KernelEvent::AddressChanged)
                .await
                .unwrap_or(false),
        ));
        drain(&mut rx);
        sh("ip link del twill-v6.1");
        seen.push((
            "IPv6 device deleted",
            next_event(&mut rx, KernelEvent::DeviceChanged)
                .await
                .unwrap_or(false),
        ));
        seen
    });
    for (what, ok) in events {
        assert!(ok, "no event for: {what}");
    }
}

/// Empties the queue, so that the next event can only come from the next action.
fn drain(rx: &mut tokio::sync::mpsc::Receiver<KernelEvent>) {
    while rx.try_recv().is_ok() {}
}

/// Waits (bounded) for `want`; other events are skipped.
async fn next_event(
    rx: &mut tokio::sync::mpsc::Receiver<KernelEvent>,
    want: KernelEvent,
) -> Result<bool, tokio::time::error::Elapsed> {
    let fut = async {
        loop {
            match rx.recv().await {
                Some(e) if e == want => return true,
                Some(_) => continue,
                None => return false,
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(10), fut).await
}

#[test]
fn apply_continues_past_errors_and_reports_each() {
    let p = Pair::new('f', 18);
    let ns = p.a.clone();
    let ip = p.ip_a;
    let report = in_ns(&ns, move || async move {
        let nl = Netlink::new().unwrap();
        let u = nl
            .find_underlay(Some(&IfaceSelector::Addr(ip.into())))
            .await
            .unwrap();
        let idx = nl
            .ensure_vxlan(&spec("va", ip, u.index, 8472, "10.244.1.0/24"))
            .await
            .unwrap();
        let good = peers(2);
        let mut ops = reconcile::diff(&good, &Default::default());
        // A direct route via an address no route reaches: the kernel refuses it.
        let bad = Op::SetRoute {
            dst: "10.250.0.0/24".parse().unwrap(),
            gw: "203.0.113.9".parse().unwrap(),
        };
        ops.insert(1, bad.clone());
        ops.push(bad);
        nl.apply(idx, &ops).await
    });
    assert_eq!(report.applied, 6);
    assert_eq!(report.failed.len(), 2, "{:?}", report.failed);
    for (op, e) in &report.failed {
        assert!(matches!(op, Op::SetRoute { .. }));
        assert_eq!(e.errno(), Some(libc::ENETUNREACH), "{e}");
    }
    assert_eq!(kernel_counts(&ns), (2, 2, 2));
}

#[test]
fn backend_keeps_entries_another_peer_still_uses() {
    let p = Pair::new('l', 19);
    let ns = p.a.clone();
    let ip = p.ip_a;
    in_ns(&ns, move || async move {
        let nl = Netlink::new().unwrap();
        let local = local_node(&nl, ip, "10.244.1.0/24".parse().unwrap(), mac(1)).await;
        let mut b = VxlanBackend::new(nl, &backend_cfg(false), None);
        b.setup(&local).await.unwrap();
        // A node re-leased a new subnet with its persisted MAC; the old lease expires later.
        let old = peers(1)[0];
        let new = Peer {
            subnet: "10.244.3.0/24".parse().unwrap(),
            ..old
        };
        b.apply(&[PeerChange {
            old: None,
            new: Some(old),
        }])
        .await
        .unwrap();
        b.apply(&[PeerChange {
            old: None,
            new: Some(new),
        }])
        .await
        .unwrap();
        let s = b
            .apply(&[PeerChange {
                old: Some(old),
                new: None,
            }])
            .await
            .unwrap();
        assert_eq!((s.removed, s.failed), (2, 0), "route and neighbour only");
    });
    let fdb = sh(&format!("bridge -n {ns} fdb show dev twill.1"));
    assert!(
        fdb.contains(&format!("{} dst 198.19.0.1", mac(0))),
        "shared fdb entry deleted: {fdb}"
    );
    assert_eq!(kernel_counts(&ns), (1, 1, 1));
}

/// `ethtool -k` of `dev` in `ns`: is tx-checksum-ip-generic on? (The real tool, as a check
/// independent of twilld's ioctl.)
fn ethtool_tx_csum(ns: &str, dev: &str) -> bool {
    let out = sh(&format!("ip netns exec {ns} ethtool -k {dev}"));
    let line = out
        .lines()
        .find(|l| l.trim_start().starts_with("tx-checksum-ip-generic:"))
        .unwrap_or_else(|| panic!("no tx-checksum-ip-generic in ethtool -k:\n{out}"));
    line.contains(": on")
}

#[test]
fn tx_checksum_offload_is_enforced_also_on_a_recreated_device() {
    use twill_daemon::netlink::ethtool;
    let p = Pair::new('c', 20);
    let ns = p.a.clone();
    let ip = p.ip_a;
    let ns2 = ns.clone();
    in_ns(&ns, move || async move {
        let nl = Netlink::new().unwrap();
        let local = local_node(&nl, ip, "10.244.1.0/24".parse().unwrap(), mac(78)).await;
        // None: the kernel's default (on) is left alone.
        let mut b = VxlanBackend::new(nl.clone(), &backend_cfg(false), None);
        b.setup(&local).await.unwrap();
        assert!(ethtool::tx_checksum("twill.1").unwrap());
        assert!(ethtool_tx_csum(&ns2, "twill.1"));

        // Off: set at setup, and again on a device recreated after someone deleted it.
        let mut b = VxlanBackend::new(nl.clone(), &backend_cfg(false), Some(false));
        b.setup(&local).await.unwrap();
        assert!(!ethtool_tx_csum(&ns2, "twill.1"));
        nl.delete_link(b.ifindex().unwrap()).await.unwrap();
        b.setup(&local).await.unwrap();
        assert!(!ethtool::tx_checksum("twill.1").unwrap());
        assert!(!ethtool_tx_csum(&ns2, "twill.1"));
        // Turned back on by hand: the next setup (twilld runs it on the device's events) undoes it.
        sh(&format!("ip netns exec {ns2} ethtool -K twill.1 tx on"));
        assert!(ethtool_tx_csum(&ns2, "twill.1"));
        b.setup(&local).await.unwrap();
        assert!(!ethtool_tx_csum(&ns2, "twill.1"));

        // The calls themselves: idempotent, and errors name the device.
        assert!(!ethtool::set_tx_checksum("twill.1", false).unwrap());
        assert!(ethtool::set_tx_checksum("twill.1", true).unwrap());
        assert!(ethtool_tx_csum(&ns2, "twill.1"));
        let e = ethtool::set_tx_checksum("twk-nosuchdev", false).unwrap_err();
        assert_eq!(e.errno(), Some(libc::ENODEV), "{e}");
        assert!(e.to_string().contains("twk-nosuchdev"), "{e}");
    });
}

/// F2: a peer route must never overwrite a route that is not twill's. The kernel's connected
/// route for the node's own LAN and an operator's static route stay as they are (the op fails,
/// reported); routes that are ours (on our device, or with twill's protocol) are replaced.
#[test]
fn routes_that_are_not_ours_are_never_replaced() {
    let p = Pair::new('x', 21);
    let ns = p.a.clone();
    let (ip, ip_b) = (p.ip_a, p.ip_b);
    let lan: Ipv4Net = Ipv4Net::new(ip, 24).unwrap().trunc();
    sh(&format!(
        "ip -n {ns} route add 10.250.0.0/24 via {ip_b} dev va"
    ));
    let before = sh(&format!("ip -n {ns} -4 route show"));
    let report = in_ns(&ns, move || async move {
        let nl = Netlink::new().unwrap();
        let u = nl
            .find_underlay(Some(&IfaceSelector::Name("va".into())))
            .await
            .unwrap();
        let idx = nl
            .ensure_vxlan(&spec("va", ip, u.index, 8472, "10.244.1.0/24"))
            .await
            .unwrap();
        // Ours from before: one on our device with a stale gateway, one direct (protocol 116).
        let mine = peers(2);
        let r = nl
            .apply(idx, &reconcile::diff(&mine, &Default::default()))
            .await;
        assert!(r.failed.is_empty(), "{:?}", r.failed);
        let direct = Op::SetRoute {
            dst: mine[1].subnet,
            gw: ip_b,
        };
        let r = nl.apply(idx, std::slice::from_ref(&direct)).await;
        assert!(r.failed.is_empty(), "{:?}", r.failed);
        let ops = [
            // A lease for the node's own LAN, and one for the operator's route.
            Op::SetRoute {
                dst: lan,
                gw: lan.network(),
            },
            Op::SetRoute {
                dst: "10.250.0.0/24".parse().unwrap(),
                gw: "10.250.0.0".parse().unwrap(),
            },
            // Ours: replaced (direct -> overlay, overlay re-put).
            Op::SetRoute {
                dst: mine[1].subnet,
                gw: mine[1].gateway(),
            },
            Op::SetRoute {
                dst: mine[0].subnet,
                gw: mine[0].gateway(),
            },
        ];
        nl.apply(idx, &ops).await
    });
    assert_eq!(report.applied, 2, "{report:?}");
    let refused: Vec<String> = report
        .failed
        .iter()
        .map(|(op, e)| format!("{op:?}: {e}"))
        .collect();
    assert_eq!(refused.len(), 2, "{refused:?}");
    assert!(
        refused.iter().all(|e| e.contains("not twill's")),
        "{refused:?}"
    );
    let after = sh(&format!("ip -n {ns} -4 route show"));
    for line in before.lines() {
        assert!(after.contains(line), "lost {line:?}:\n{after}");
    }
    let lan_route = sh(&format!("ip -n {ns} route show {lan}"));
    assert!(
        lan_route.contains("dev va") && lan_route.contains("proto kernel"),
        "{lan_route}"
    );
    // The peer moved from the direct route to the overlay.
    let moved = sh(&format!("ip -n {ns} route show 10.100.1.0/24"));
    assert!(moved.contains("dev twill.1"), "{moved}");
    assert!(
        sh_ok(&format!("ip netns exec {ns} ping -c1 -W2 {ip_b}")),
        "the LAN is unreachable"
    );
}

/// An apply report's failures, as text.
fn said<O: std::fmt::Debug, E: std::fmt::Display>(failed: &[(O, E)]) -> Vec<String> {
    failed.iter().map(|(o, e)| format!("{o:?}: {e}")).collect()
}

/// Routes that are not twill's, in either family: a direct route (host-gw, DirectRouting) of
/// twill's for the same destination is refused, not put over them (IPv6's default metric is
/// 1024, not IPv4's 0), and a peer's direct route going away deletes only twill's route, never
/// the operator's one that its SetRoute was refused for.
#[test]
fn foreign_routes_of_both_families_are_never_replaced_nor_deleted() {
    use ipnet::Ipv6Net;
    use std::net::Ipv6Addr;
    use twill_daemon::reconcile::OpOf;

    let p = Pair::new('y', 22);
    let (ns, ip_b) = (p.a.clone(), p.ip_b);
    sh(&format!(
        "ip -n {a} addr add fd00:18:22::1/64 dev va nodad && ip -n {b} addr add fd00:18:22::2/64 dev vb nodad && \
         ip -n {a} -6 route add fd00:10:244:5::/64 via fd00:18:22::2 dev va proto static && \
         ip -n {a} route add 10.251.0.0/24 via {ip_b} dev va proto static",
        a = p.a,
        b = p.b
    ));
    let before = |v: &str| sh(&format!("ip -n {ns} {v} route show"));
    let (before4, before6) = (before("-4"), before("-6"));
    let (dst4, dst6): (Ipv4Net, Ipv6Net) = (
        "10.251.0.0/24".parse().unwrap(),
        "fd00:10:244:5::/64".parse().unwrap(),
    );
    let gw6: Ipv6Addr = "fd00:18:22::2".parse().unwrap();
    let (set, del) = in_ns(&ns, move || async move {
        let nl = Netlink::new().unwrap();
        let u = nl
            .find_underlay(Some(&IfaceSelector::Name("va".into())))
            .await
            .unwrap();
        let set4 = nl
            .apply_owned(
                u.index,
                None,
                &[Op::SetRoute {
                    dst: dst4,
                    gw: ip_b,
                }],
            )
            .await;
        let set6 = nl
            .apply_owned(
                u.index,
                None,
                &[OpOf::<Ipv6Net>::SetRoute { dst: dst6, gw: gw6 }],
            )
            .await;
        let del4 = nl
            .apply_owned(
                u.index,
                None,
                &[Op::DelRoute {
                    dst: dst4,
                    gw: ip_b,
                }],
            )
            .await;
        let del6 = nl
            .apply_owned(
                u.index,
                None,
                &[OpOf::<Ipv6Net>::DelRoute { dst: dst6, gw: gw6 }],
            )
            .await;
        (
            (said(&set4.failed), said(&set6.failed)),
            (del4.failed.len(), del6.failed.len()),
        )
    });
    for (family, refused) in [("IPv4", set.0), ("IPv6", set.1)] {
        assert_eq!(refused.len(), 1, "{family}: {refused:?}");
        assert!(refused[0].contains("not twill's"), "{family}: {refused:?}");
    }
    // Deleting a route of ours that is not there is no failure.
    assert_eq!(del, (0, 0));
    assert_eq!(
        before("-4"),
        before4,
        "an IPv4 route that is not twill's changed"
    );
    assert_eq!(
        before("-6"),
        before6,
        "an IPv6 route that is not twill's changed"
    );
    assert!(before("-6").contains("fd00:10:244:5::/64 via fd00:18:22::2"));
    assert!(before("-4").contains(&format!("10.251.0.0/24 via {ip_b}")));
}

/// The v6 side of a dual-stack node: a VXLAN device over an IPv6 underlay (flannel's
/// `flannel-v6.<VNI>` layout), programmed by the same planner and netlink writers as the v4
/// device, carries traffic both ways; a dump reads back exactly what was written, a stale v6
/// peer's entries are removed, and re-ensuring the device keeps its entries and the kernel's
/// link-local address.
#[test]
fn ipv6_vxlan_device_entries_and_traffic() {
    use ipnet::Ipv6Net;
    use std::net::Ipv6Addr;
    use twill_daemon::netlink::VxlanSpecOf;
    use twill_daemon::peer::PeerOf;
    use twill_daemon::reconcile::KernelEntriesOf;

    let p = Pair::new('6', 60);
    sh(&format!(
        "ip -n {} addr add fd00:18:60::1/64 dev va nodad && ip -n {} addr add fd00:18:60::2/64 dev vb nodad",
        p.a, p.b
    ));
    let v6 = |s: &str| s.parse::<Ipv6Net>().unwrap();
    let ip6 = |s: &str| s.parse::<Ipv6Addr>().unwrap();
    let node = |i: u8| PeerOf::<Ipv6Net> {
        subnet: v6(&format!("fd00:10:244:{i}::/64")),
        public_ip: ip6(&format!("fd00:18:60::{i}")),
        vtep_mac: Some(mac(600 + u32::from(i))),
    };
    let stale = PeerOf::<Ipv6Net> {
        subnet: v6("fd00:10:244:77::/64"),
        public_ip: ip6("fd00:18:60::77"),
        vtep_mac: Some(mac(677)),
    };
    let program = |ns: String, dev: &'static str, me: PeerOf<Ipv6Net>, peer: PeerOf<Ipv6Net>| {
        in_ns(&ns, move || async move {
            let nl = Netlink::new().unwrap();
            let u = nl
                .find_underlay(Some(&IfaceSelector::Name(dev.into())))
                .await
                .unwrap();
            let spec = VxlanSpecOf::<Ipv6Net> {
                name: "twill-v6.1".into(),
                vni: 1,
                local: me.public_ip,
                underlay_index: u.index,
                port: 8472,
                mtu: 1430,
                mac: me.vtep_mac.unwrap(),
                addr: Ipv6Net::new(me.gateway(), 128).unwrap(),
            };
            let idx = nl.ensure_vxlan(&spec).await.unwrap();
            // The real peer and a stale one, then a reconcile that wants only the first.
            let ops = reconcile::diff(&[peer, stale], &KernelEntriesOf::default());
            let r = nl.apply(idx, &ops).await;
            assert!(r.failed.is_empty(), "{:?}", r.failed);
            let k = nl.dump_entries::<Ipv6Net>(Some(idx)).await.unwrap();
            assert!(reconcile::diff(&[peer, stale], &k).is_empty(), "{k:?}");
            let ops = reconcile::diff(&[peer], &k);
            assert_eq!(ops.len(), 3, "{ops:?}");
            assert!(ops.iter().all(|o| o.is_delete()), "{ops:?}");
            let r = nl.apply(idx, &ops).await;
            assert!(r.failed.is_empty(), "{:?}", r.failed);
            let k = nl.dump_entries::<Ipv6Net>(Some(idx)).await.unwrap();
            assert!(reconcile::diff(&[peer], &k).is_empty(), "{k:?}");
            assert_eq!((k.neighs.len(), k.fdb.len(), k.routes.len()), (1, 1, 1));
            // The v4 view of the same device sees none of it.
            let k4 = nl.dump_entries::<Ipv4Net>(Some(idx)).await.unwrap();
            assert_eq!(k4, Default::default());
            assert_eq!(nl.ensure_vxlan(&spec).await.unwrap(), idx);
            let k = nl.dump_entries::<Ipv6Net>(Some(idx)).await.unwrap();
            assert!(reconcile::diff(&[peer], &k).is_empty(), "{k:?}");
        })
    };
    program(p.a.clone(), "va", node(1), node(2));
    program(p.b.clone(), "vb", node(2), node(1));

    let d = sh(&format!("ip -n {} -d link show twill-v6.1", p.a));
    for want in [
        "vxlan id 1 ",
        "local fd00:18:60::1 ",
        "dev va ",
        "mtu 1430 ",
    ] {
        assert!(d.contains(want), "missing {want:?} in:\n{d}");
    }
    let addrs = sh(&format!("ip -n {} -6 -o addr show dev twill-v6.1", p.a));
    let own = addrs
        .lines()
        .find(|l| l.contains("inet6 fd00:10:244:1::/128"))
        .unwrap_or_else(|| panic!("no device address: {addrs}"));
    assert!(!own.contains("tentative"), "DAD holds the address: {own}");
    // The kernel's link-local address survived the second ensure.
    assert!(addrs.contains("inet6 fe80::"), "{addrs}");
    let routes = sh(&format!("ip -n {} -6 route show dev twill-v6.1", p.a));
    assert!(
        routes.contains("fd00:10:244:2::/64 via fd00:10:244:2::") && routes.contains("onlink"),
        "{routes}"
    );
    assert!(
        !routes.contains("fd00:10:244:77::"),
        "stale route kept: {routes}"
    );
    // Both ways through the overlay, from each node's own v6 device address.
    let ping = |ns: &str, from: &str, to: &str| ping_from_until(ns, Some(from), to);
    assert!(ping(&p.a, "fd00:10:244:1::", "fd00:10:244:2::"), "a -> b");
    assert!(ping(&p.b, "fd00:10:244:2::", "fd00:10:244:1::"), "b -> a");

    // A v4 device on the same VNI and port shares them with the v6 one (flannel's flannel.1
    // next to flannel-v6.1): only a device of the same family holds them against ours.
    sh(&format!(
        "ip -n {} link add flannel.1 type vxlan id 1 local {} dstport 8472 dev va nolearning",
        p.a, p.ip_a
    ));
    let (v4, v6) = in_ns(&p.a, || async {
        let nl = Netlink::new().unwrap();
        (
            nl.vxlan_devices_using::<Ipv4Net>(1, 8472, "twill.1")
                .await
                .unwrap(),
            nl.vxlan_devices_using::<Ipv6Net>(1, 8472, "twill-v6.1")
                .await
                .unwrap(),
        )
    });
    let names = |d: Vec<(u32, String)>| d.into_iter().map(|(_, n)| n).collect::<Vec<_>>();
    assert_eq!(names(v4), vec!["flannel.1".to_string()]);
    assert_eq!(names(v6), Vec::<String>::new());
}

#[test]
fn ipv6_backend_takes_over_flannel_v6_and_routes_directly_when_asked() {
    use ipnet::Ipv6Net;
    use twill_daemon::backend::vxlan::VxlanBackendOf;
    use twill_daemon::backend::LocalNodeOf;
    use twill_daemon::peer::PeerOf;

    let p = Pair::new('7', 61);
    sh(&format!(
        "ip -n {} addr add fd00:18:61::1/64 dev va nodad && ip -n {} addr add fd00:18:61::2/64 dev vb nodad",
        p.a, p.b
    ));
    // What a dual-stack flanneld leaves on node a: both its devices on VNI 1.
    sh(&format!(
        "ip -n {a} link add flannel-v6.1 type vxlan id 1 local fd00:18:61::1 dstport 8472 dev va nolearning && \
         ip -n {a} link add flannel.1 type vxlan id 1 local {ip} dstport 8472 dev va nolearning",
        a = p.a,
        ip = p.ip_a
    ));
    let node6 = |i: u8| PeerOf::<Ipv6Net> {
        subnet: format!("fd00:10:244:{i}::/64").parse().unwrap(),
        public_ip: format!("fd00:18:61::{i}").parse().unwrap(),
        vtep_mac: Some(mac(700 + u32::from(i))),
    };
    let run = |ns: String, dev: &'static str, me: PeerOf<Ipv6Net>, peer, direct: bool| {
        in_ns(&ns, move || async move {
            let nl = Netlink::new().unwrap();
            let u = nl
                .find_underlay(Some(&IfaceSelector::Name(dev.into())))
                .await
                .unwrap();
            let local = LocalNodeOf::<Ipv6Net> {
                subnet: me.subnet,
                public_ip: me.public_ip,
                underlay_index: u.index,
                underlay_mtu: u.mtu,
                vtep_mac: me.vtep_mac.unwrap(),
            };
            let mut b = VxlanBackendOf::<Ipv6Net>::new(nl, &backend_cfg(direct), None);
            let info = b.setup(&local).await.unwrap();
            assert_eq!(info.name, "twill-v6.1");
            // 1500 - 70: the IPv6 outer header is 20 bytes longer than the IPv4 one.
            assert_eq!(info.mtu, 1430);
            let want = if direct { Path::Direct } else { Path::Overlay };
            assert_eq!(b.path(&peer).path, want);
            let stats = b.reconcile(&[peer]).await.unwrap();
            assert_eq!((stats.failed, stats.unprogrammed.len()), (0, 0));
        })
    };
    run(p.a.clone(), "va", node6(1), node6(2), false);
    run(p.b.clone(), "vb", node6(2), node6(1), false);
    let links = sh(&format!("ip -n {} -o link show", p.a));
    assert!(
        !links.contains("flannel-v6.1"),
        "flanneld's v6 device kept:\n{links}"
    );
    assert!(
        links.contains("flannel.1"),
        "the v4 device is not the v6 backend's:\n{links}"
    );
    let d = sh(&format!("ip -n {} -d link show twill-v6.1", p.a));
    assert!(
        d.contains("local fd00:18:61::1 ") && d.contains("mtu 1430 "),
        "{d}"
    );
    let ping = |ns: &str, from: &str, to: &str| ping_from_until(ns, Some(from), to);
    assert!(
        ping(&p.a, "fd00:10:244:1::", "fd00:10:244:2::"),
        "a -> b over vxlan"
    );
    let route = sh(&format!("ip -n {} -6 route get fd00:10:244:2::", p.a));
    assert!(route.contains("dev twill-v6.1"), "{route}");

    // DirectRouting: the peer shares our v6 segment, so a route via its address replaces the
    // overlay path, and the overlay entries go.
    sh(&format!("ip -n {} link del flannel.1", p.a));
    run(p.a.clone(), "va", node6(1), node6(2), true);
    run(p.b.clone(), "vb", node6(2), node6(1), true);
    let route = sh(&format!("ip -n {} -6 route show fd00:10:244:2::/64", p.a));
    assert!(
        route.contains("via fd00:18:61::2 dev va"),
        "no direct route: {route}"
    );
    let fdb = sh(&format!("bridge -n {} fdb show dev twill-v6.1", p.a));
    assert!(!fdb.contains("fd00:18:61::2"), "overlay entry kept: {fdb}");
    assert!(
        ping(&p.a, "fd00:10:244:1::", "fd00:10:244:2::"),
        "a -> b directly"
    );
}

/// The two families' reconciles run at once on one netlink handle: their dumps must not
/// collide (the kernel refuses a second dump on a socket while one runs, with EBUSY).
#[test]
fn concurrent_dumps_of_both_families_on_one_handle_all_succeed() {
    use ipnet::Ipv6Net;
    let p = Pair::new('8', 62);
    let idx = node(&p.a, p.ip_a, "10.244.1.0/24", mac(801), peers(200), false);
    in_ns(&p.a, move || async move {
        let nl = Netlink::new().unwrap();
        let dumps = (0..16).map(|i| {
            let nl = nl.clone();
            async move {
                if i % 2 == 0 {
                    nl.dump_entries::<Ipv4Net>(Some(idx))
                        .await
                        .map(|k| k.routes.len())
                } else {
                    nl.dump_entries::<Ipv6Net>(Some(idx))
                        .await
                        .map(|k| k.routes.len())
                }
            }
        });
        let results = futures::future::join_all(dumps).await;
        for (i, r) in results.iter().enumerate() {
            let n = r
                .as_ref()
                .unwrap_or_else(|e| panic!("dump {i} failed: {e}"));
            assert_eq!(*n, if i % 2 == 0 { 200 } else { 0 }, "dump {i}");
        }
    });
}
