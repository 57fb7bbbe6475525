//! nftables against the real kernel, in a network namespace of our own: set and map elements
//! over netlink (the CNI fast path) and the nft writer's diffs and drift checks.

use std::process::Command;

use twill_daemon::netlink::nft_sets::{self, key_addr, key_concat, ElemOp, NfFamily};

const PREFIX: &str = "twnft";

/// A namespace deleted on drop (also on panic).
struct Ns(String);

impl Ns {
    fn new(tag: &str) -> Ns {
        let name = format!("{PREFIX}{}{tag}", std::process::id());
        let _ = Command::new("ip").args(["netns", "del", &name]).output();
        let ok = Command::new("ip")
            .args(["netns", "add", &name])
            .status()
            .unwrap()
            .success();
        assert!(ok, "ip netns add {name}");
        Ns(name)
    }

    fn nft(&self, script: &str) -> String {
        use std::io::Write;
        let mut c = Command::new("ip")
            .args(["netns", "exec", &self.0, "nft", "-f", "-"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        c.stdin
            .take()
            .unwrap()
            .write_all(script.as_bytes())
            .unwrap();
        let out = c.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "nft: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn list(&self, what: &[&str]) -> String {
        let out = Command::new("ip")
            .args(["netns", "exec", &self.0, "nft"])
            .args(what)
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Runs `f` on a thread inside the namespace.
    fn run<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        let path = format!("/run/netns/{}", self.0);
        std::thread::spawn(move || {
            let fd = std::fs::File::open(path).unwrap();
            nix::sched::setns(fd, nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
            f()
        })
        .join()
        .unwrap()
    }
}

impl Drop for Ns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).output();
    }
}

#[test]
fn elements_of_sets_and_verdict_maps_change_in_one_transaction() {
    let ns = Ns::new("a");
    ns.nft(
        "add table inet t\n\
         add chain inet t grp\n\
         add set inet t pods { type ipv4_addr; }\n\
         add set inet t pods6 { type ipv6_addr; }\n\
         add set inet t named { type ipv4_addr . inet_proto . inet_service; }\n\
         add map inet t in4 { type ipv4_addr : verdict; }\n",
    );
    let ip = |s: &str| key_addr(s.parse().unwrap());
    let add = |set: &str, key: Vec<u8>, jump: Option<&str>| match jump {
        Some(c) => ElemOp::jump(true, set, key, c),
        None => ElemOp::new(true, set, key),
    };
    let ops = vec![
        add("pods", ip("10.244.1.5"), None),
        add("pods", ip("10.244.1.6"), None),
        add("pods6", ip("fd00::5"), None),
        add(
            "named",
            key_concat(&[&ip("10.244.1.5"), &[6], &8080u16.to_be_bytes()]),
            None,
        ),
        add("in4", ip("10.244.1.5"), Some("grp")),
    ];
    ns.run(move || nft_sets::apply(NfFamily::Inet, "t", &ops))
        .unwrap();
    let listing = ns.list(&["list", "table", "inet", "t"]);
    for want in [
        "10.244.1.5",
        "10.244.1.6",
        "fd00::5",
        "10.244.1.5 . tcp . 8080",
        "10.244.1.5 : jump grp",
    ] {
        assert!(listing.contains(want), "no {want:?} in\n{listing}");
    }
    // Delete one, add one: both or neither. A delete of a missing element fails the whole
    // batch, and the add in it is not applied.
    let bad = vec![
        add("pods", ip("10.244.1.9"), None),
        ElemOp::new(false, "pods", ip("10.244.1.77")),
    ];
    let err = ns.run(move || nft_sets::apply(NfFamily::Inet, "t", &bad));
    assert!(err.is_err());
    assert!(!ns
        .list(&["list", "set", "inet", "t", "pods"])
        .contains("10.244.1.9"));
    let good = vec![ElemOp::new(false, "pods", ip("10.244.1.6"))];
    ns.run(move || nft_sets::apply(NfFamily::Inet, "t", &good))
        .unwrap();
    let pods = ns.list(&["list", "set", "inet", "t", "pods"]);
    assert!(
        pods.contains("10.244.1.5") && !pods.contains("10.244.1.6"),
        "{pods}"
    );
    // Interval sets (peer sets: pod addresses next to ipBlock ranges): single addresses, also
    // adjacent ones, come and go as ranges of one.
    ns.nft("add set inet t peers { type ipv4_addr; flags interval; }\nadd element inet t peers { 10.1.0.0/16 }\n");
    let one = |add: bool, a: &str| {
        let a: std::net::IpAddr = a.parse().unwrap();
        nft_sets::interval(add, "peers", a, a).unwrap().to_vec()
    };
    let ops: Vec<ElemOp> = [
        one(true, "10.244.1.5"),
        one(true, "10.244.1.6"),
        one(true, "10.244.2.9"),
    ]
    .concat();
    ns.run(move || nft_sets::apply(NfFamily::Inet, "t", &ops))
        .unwrap();
    let peers = ns.list(&["list", "set", "inet", "t", "peers"]);
    for want in ["10.244.1.5", "10.244.1.6", "10.244.2.9", "10.1.0.0/16"] {
        assert!(peers.contains(want), "no {want} in {peers}");
    }
    let ops = one(false, "10.244.1.5");
    ns.run(move || nft_sets::apply(NfFamily::Inet, "t", &ops))
        .unwrap();
    let peers = ns.list(&["list", "set", "inet", "t", "peers"]);
    assert!(
        !peers.contains("10.244.1.5") && peers.contains("10.244.1.6"),
        "{peers}"
    );
    // The kernel's own lookup agrees (`get element` asks it).
    let get = |a: &str| {
        Command::new("ip")
            .args([
                "netns", "exec", &ns.0, "nft", "get", "element", "inet", "t", "peers",
            ])
            .arg(format!("{{ {a} }}"))
            .output()
            .unwrap()
            .status
            .success()
    };
    assert!(get("10.244.1.6") && get("10.1.2.3") && !get("10.244.1.5") && !get("10.244.1.7"));

    // A jump to a chain that does not exist is refused, not half applied.
    let dangling = vec![add("in4", ip("10.244.1.8"), Some("nochain"))];
    assert!(ns
        .run(move || nft_sets::apply(NfFamily::Inet, "t", &dangling))
        .is_err());
}

#[test]
fn the_table_writer_applies_diffs_and_restores_what_others_change() {
    use twill_daemon::nft::model::{BaseChain, Chain, Family, Set, Table};
    use twill_daemon::nft::{Check, Nft, TableWriter};

    let ns = Ns::new("b");
    let table = |elems: &[&str], rules: &[&str]| {
        let mut t = Table::new(Family::Inet, "twill-test");
        t.sets.insert(
            "s".into(),
            Set {
                kind: "ipv4_addr".into(),
                flags: vec![],
                elements: elems.iter().map(|e| e.to_string()).collect(),
            },
        );
        t.chains.insert(
            "fwdchain".into(),
            Chain {
                base: Some(BaseChain {
                    kind: "filter",
                    hook: "forward",
                    priority: 0,
                    policy: "accept",
                }),
                rules: rules.iter().map(|r| r.to_string()).collect(),
            },
        );
        t
    };
    let listing = |ns: &Ns| ns.list(&["list", "table", "inet", "twill-test"]);
    let t1 = table(&["10.0.0.1", "10.0.0.2"], &["ip saddr @s counter accept"]);
    let t2 = table(
        &["10.0.0.2", "10.0.0.3"],
        &["ip saddr @s accept", "ip daddr @s accept"],
    );
    let (a, b) = (t1.clone(), t2.clone());
    let checks = ns.run(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let mut w = TableWriter::new(Nft::find().unwrap());
            w.apply(&a).await.unwrap();
            let first = w.check().await.unwrap();
            w.apply(&b).await.unwrap();
            let second = w.check().await.unwrap();
            (first, second)
        })
    });
    assert_eq!(checks, (Check::InSync, Check::InSync));
    let l = listing(&ns);
    assert!(l.contains("10.0.0.3") && !l.contains("10.0.0.1"), "{l}");
    assert!(l.contains("ip daddr @s accept"), "{l}");

    // Someone flushes the chain, then someone deletes an element: each is found and repaired.
    for vandal in [
        "flush chain inet twill-test fwdchain\n",
        "delete element inet twill-test s { 10.0.0.2 }\n",
        "delete table inet twill-test\n",
    ] {
        ns.nft(vandal);
        let b = t2.clone();
        let got = ns.run(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let mut w = TableWriter::new(Nft::find().unwrap());
                w.apply(&b).await.unwrap();
                (w.check().await.unwrap(), w.check().await.unwrap())
            })
        });
        // A fresh writer replaces the table on its first apply, so the vandalism is undone by
        // that; the check after it finds the table in sync.
        assert_eq!(got, (Check::InSync, Check::InSync), "after {vandal:?}");
        let l = listing(&ns);
        assert!(
            l.contains("10.0.0.2") && l.contains("ip daddr @s accept"),
            "{l}"
        );
    }

    // And a writer that already applied finds the change by itself.
    let b = t2.clone();
    let name = ns.0.clone();
    let got = ns.run(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let mut w = TableWriter::new(Nft::find().unwrap());
            w.apply(&b).await.unwrap();
            let status = Command::new("nft")
                .args(["flush", "chain", "inet", "twill-test", "fwdchain"])
                .status()
                .unwrap();
            assert!(status.success(), "flush in {name}");
            (w.check().await.unwrap(), w.check().await.unwrap())
        })
    });
    assert_eq!(got, (Check::Restored, Check::InSync));
}

/// The policy table across program changes that move a pod to another group (a map entry
/// whose verdict changes) and add chains and sets: each applied as one diff the kernel takes.
#[test]
fn policy_programs_follow_policy_changes_in_the_kernel() {
    use netpol::fixtures;
    use twill_daemon::nft::{Nft, TableWriter};
    use twill_daemon::policy::render;

    let ns = Ns::new("c");
    let pol = |json: &str| -> netpol::api::NetworkPolicy { serde_json::from_str(json).unwrap() };
    let p1 = pol(r#"{"metadata":{"name":"deny","namespace":"x"},
        "spec":{"podSelector":{},"policyTypes":["Ingress"],"ingress":[]}}"#);
    let p2 = pol(r#"{"metadata":{"name":"allow-a","namespace":"x"},
        "spec":{"podSelector":{"matchLabels":{"pod":"a"}},
                "ingress":[{"from":[{"podSelector":{},"namespaceSelector":{}}]}]}}"#);
    let mut cluster = fixtures::e2e_cluster(|k| {
        let n = fixtures::NAMESPACES
            .iter()
            .position(|x| *x == k.namespace)
            .unwrap()
            * 3
            + fixtures::POD_NAMES
                .iter()
                .position(|x| *x == k.name)
                .unwrap();
        vec![format!("10.244.{}.2", n + 1).parse().unwrap()]
    });
    let mut programs = Vec::new();
    cluster.upsert_policy(p1.clone()).unwrap();
    programs.push(netpol::program::compile(&cluster, "n1"));
    cluster.upsert_policy(p2).unwrap();
    programs.push(netpol::program::compile(&cluster, "n1"));
    let key = netpol::model::PolicyKey::new("x", "deny");
    cluster.remove_policy(&key);
    programs.push(netpol::program::compile(&cluster, "n1"));
    let tables: Vec<_> = programs
        .iter()
        .map(|p| render::table(p, render::RenderOpts::default()))
        .collect();
    let listings = ns.run(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let mut w = TableWriter::new(Nft::find().unwrap());
            let mut out = Vec::new();
            for t in &tables {
                // Straight to the kernel as a diff: the writer would fall back to a whole
                // replacement, which would hide a diff the kernel refuses.
                let script = match w.applied() {
                    Some(old) => t.render_diff(old).unwrap_or_default(),
                    None => t.render_replace(),
                };
                let nft = Nft::find().unwrap();
                if let Err(e) = nft.run("policy diff", &script).await {
                    panic!("{e}\n{script}");
                }
                w.assume(t.clone());
                let l = Command::new("nft")
                    .args(["list", "table", "inet", render::TABLE])
                    .output()
                    .unwrap();
                out.push(String::from_utf8_lossy(&l.stdout).into_owned());
            }
            out
        })
    });
    // x/a (10.244.1.2) moves from the deny-only group to one with both policies, then to the
    // allow-only group; the program's own chain names must be what the kernel has.
    for (p, l) in programs.iter().zip(&listings) {
        let group = &p.ingress[&"10.244.1.2".parse().unwrap()];
        assert!(l.contains(&format!("10.244.1.2 : jump {group}")), "{l}");
        for chain in p.chains.keys() {
            assert!(
                l.contains(&format!("chain {chain} {{")),
                "no {chain} in {l}"
            );
        }
    }
}

/// The pods' source-check table: what nft makes of the rendered table, and the same change as
/// netlink element operations (a pod's ADD and DEL), give the kernel the same table.
#[test]
fn pod_source_checks_change_by_netlink_as_nft_writes_them() {
    use twill_daemon::policy::pods::{Attachment, LocalPod};
    use twill_daemon::policy::spoof::{element_ops, table, Sources, TABLE};

    let pod = |cid: &str, ips: &[&str]| {
        LocalPod {
            attachment: Attachment {
                container_id: cid.into(),
                ifname: "eth0".into(),
            },
            pod: serde_json::from_value(
                serde_json::json!({"metadata": {"name": cid, "namespace": "default"}}),
            )
            .unwrap(),
            mac: None,
        }
        .with_ips(&ips.iter().map(|s| s.parse().unwrap()).collect::<Vec<_>>())
    };
    let (a, b) = (
        pod("a", &["10.244.1.2", "fd00::2"]),
        pod("bb", &["10.244.1.3", "fd00::3"]).with_mac("02:00:5e:10:00:03".parse().unwrap()),
    );
    let one = Sources::of([&a]);
    let two = Sources::of([&a, &b]);
    let by_nft = Ns::new("s1");
    by_nft.nft(&table(&two).render_replace());
    let by_netlink = Ns::new("s2");
    by_netlink.nft(&table(&one).render_replace());
    let ops = element_ops(&one, &two);
    by_netlink
        .run(move || nft_sets::apply(NfFamily::Bridge, TABLE, &ops))
        .unwrap();
    let list = |ns: &Ns| ns.list(&["list", "table", "bridge", TABLE]);
    let want = list(&by_nft);
    for elem in [
        "10.244.1.3",
        "0xfd000000000000000000000000000003",
        "02:00:5e:10:00:03",
    ] {
        assert!(want.contains(elem), "no {elem} in {want}");
    }
    assert_eq!(list(&by_netlink), want);
    // And back (DEL): the first table again.
    let back = element_ops(&two, &one);
    by_netlink
        .run(move || nft_sets::apply(NfFamily::Bridge, TABLE, &back))
        .unwrap();
    let first = Ns::new("s3");
    first.nft(&table(&one).render_replace());
    assert_eq!(list(&by_netlink), list(&first));
}

/// A deleted pod's conntrack entries go, in both families, and no one else's.
#[test]
fn conntrack_entries_of_given_addresses_are_deleted() {
    use std::net::{IpAddr, UdpSocket};
    use twill_daemon::netlink::conntrack::delete_flows_of;

    let ns = Ns::new("ct");
    for cmd in [
        "ip link add d0 type veth peer name d1",
        "ip link set d1 up",
        "ip addr add 10.99.0.1/24 dev d0",
        "ip -6 addr add fd99::1/64 dev d0 nodad",
        "ip link set d0 up",
    ] {
        let args: Vec<&str> = cmd.split(' ').collect();
        let ok = Command::new("ip")
            .args(["netns", "exec", &ns.0])
            .args(&args)
            .status()
            .unwrap()
            .success();
        assert!(ok, "{cmd}");
    }
    // A conntrack hook in the namespace, so that its flows are tracked.
    ns.nft(
        "add table inet t\n\
         add chain inet t out { type filter hook output priority 0; }\n\
         add rule inet t out ct state new accept\n",
    );
    let ip = |s: &str| -> IpAddr { s.parse().unwrap() };
    ns.run(move || {
        for to in ["10.99.0.2", "10.99.0.3", "fd99::2"] {
            let bind = if to.contains(':') {
                "[::]:0"
            } else {
                "0.0.0.0:0"
            };
            let s = UdpSocket::bind(bind).unwrap();
            s.send_to(b"x", (to.parse::<IpAddr>().unwrap(), 9)).unwrap();
        }
    });
    let gone = [ip("10.99.0.2"), ip("fd99::2")];
    assert_eq!(ns.run(move || delete_flows_of(&gone)).unwrap(), 2);
    // Deleted: none left of them; the other flow is still there.
    assert_eq!(ns.run(move || delete_flows_of(&gone)).unwrap(), 0);
    assert_eq!(
        ns.run(move || delete_flows_of(&[ip("10.99.0.3")])).unwrap(),
        1
    );
}
