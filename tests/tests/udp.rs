//! The udp backend (flannel's userspace fallback): pods on three nodes reach each other through
//! the TUN device without NAT, in flannel's lease and wire format (a flanneld-format peer played
//! by the test, which answers a pod's ping itself); datagrams from strangers, garbage, and
//! packets for another node are dropped and counted; a peer leaving, twilld restarting, a peer
//! joining; bulk TCP both ways intact through UDP GSO and GRO.

use std::net::{Ipv4Addr, SocketAddrV4, UdpSocket};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use twill_tests::lab::{parse_metric, UNDERLAY_IP};
use twill_tests::{pod_to_pod, wait_until, Lab, LabOptions, Pod};

const UDP: &str = r#"{"Network":"10.244.0.0/16","Backend":{"Type":"udp"}}"#;
const PORT: u16 = 8285;

fn lab(n: usize) -> Result<Lab> {
    Lab::up(
        LabOptions {
            nodes: n,
            ..Default::default()
        },
        UDP,
        &[],
    )
}

fn metric(lab: &Lab, i: usize, name: &str) -> f64 {
    lab.get(i, "/metrics")
        .ok()
        .and_then(|(_, text)| parse_metric(&text, name))
        .unwrap_or(0.0)
}

fn dropped(lab: &Lab, i: usize, reason: &str) -> f64 {
    metric(
        lab,
        i,
        &format!("twill_udp_dropped_total{{reason=\"{reason}\"}}"),
    )
}

fn subnet(lab: &Lab, i: usize) -> Result<String> {
    Ok(lab.status(i)?["node"]["subnet"]
        .as_str()
        .context("no subnet")?
        .to_string())
}

/// Send `payload` in one datagram to `to`'s udp port from inside namespace `ns` (from its own
/// address), on a thread that enters the namespace.
fn send_from(ns: &str, to: Ipv4Addr, payload: &[u8]) -> Result<()> {
    let (ns, payload) = (ns.to_string(), payload.to_vec());
    std::thread::spawn(move || -> Result<()> {
        let f = std::fs::File::open(format!("/run/netns/{ns}"))?;
        nix::sched::setns(&f, nix::sched::CloneFlags::CLONE_NEWNET)?;
        let sock = UdpSocket::bind("0.0.0.0:0")?;
        let sent = sock.send_to(&payload, SocketAddrV4::new(to, PORT))?;
        if sent != payload.len() {
            bail!("sent {sent} of {} bytes", payload.len());
        }
        Ok(())
    })
    .join()
    .map_err(|_| anyhow::anyhow!("the sending thread panicked"))?
}

/// A minimal IPv4 header (20 bytes, no payload) from `src` to `dst`.
fn ipv4_packet(src: Ipv4Addr, dst: Ipv4Addr) -> Vec<u8> {
    let mut p = vec![0u8; 20];
    p[0] = 0x45;
    p[2..4].copy_from_slice(&20u16.to_be_bytes());
    p[8] = 64;
    p[9] = 17;
    p[12..16].copy_from_slice(&src.octets());
    p[16..20].copy_from_slice(&dst.octets());
    let sum = checksum(&p);
    p[10..12].copy_from_slice(&sum.to_be_bytes());
    p
}

fn checksum(b: &[u8]) -> u16 {
    let mut s: u32 = b
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
        .sum();
    while s >> 16 != 0 {
        s = (s & 0xffff) + (s >> 16);
    }
    !(s as u16)
}

#[test]
fn udp_pods_reach_each_other_without_nat_through_a_tun_device() -> Result<()> {
    let mut lab = lab(3)?;
    let pods: Vec<Pod> = (1..=3)
        .map(|i| lab.add_pod(i, "a"))
        .collect::<Result<_>>()?;
    for (i, from) in pods.iter().enumerate() {
        for (j, to) in pods.iter().enumerate() {
            if i != j {
                let seen = pod_to_pod(from, to, 7300 + (i * 3 + j) as u16)?;
                assert_eq!(seen, from.ip, "{} -> {}: NAT in the path", from.id, to.id);
            }
        }
    }
    for i in 1..=3 {
        let st = lab.status(i)?;
        assert_eq!(st["node"]["backend"], "udp");
        assert!(
            st["node"]["vtep_mac"].is_null(),
            "no VXLAN device, no VTEP MAC: {st}"
        );
        assert_eq!(st["node"]["device"], "twill-udp", "{st}");
        assert_eq!(
            st["node"]["mtu"], 1472,
            "udp pods get the underlay MTU minus 28"
        );
        for p in st["peers"].as_array().context("no peers")? {
            assert_eq!(p["path"], "udp", "{p}");
            assert_eq!(p["programmed"], true, "{p}");
        }
        let links = lab.exec_ok(i, &["ip", "-d", "link", "show"])?;
        assert!(
            !links.contains("vxlan"),
            "node {i} has a VXLAN device: {links}"
        );
        assert!(
            links.contains("twill-udp") && links.contains("tun"),
            "{links}"
        );
        // One route for the whole network through the device; the node's own subnet is more
        // specific, on its bridge.
        let r = lab.exec_ok(i, &["ip", "-4", "route", "show", "dev", "twill-udp"])?;
        assert!(r.contains("10.244.0.0/16"), "node {i}: {r}");
        assert!(metric(&lab, i, "twill_udp_packets_total{direction=\"out\"}") > 0.0);
        assert!(metric(&lab, i, "twill_udp_packets_total{direction=\"in\"}") > 0.0);
    }
    let mtu = pods[0].exec_ok(&["cat", "/sys/class/net/eth0/mtu"])?;
    assert_eq!(mtu.trim(), "1472");
    // flannel's udp lease format, exactly.
    let key = format!(
        "/coreos.com/network/subnets/{}",
        subnet(&lab, 1)?.replace('/', "-")
    );
    assert_eq!(
        lab.etcd_get(&key)?.context("no lease")?,
        format!(
            r#"{{"PublicIP":"{}","PublicIPv6":null,"BackendType":"udp"}}"#,
            lab.node_ip(1)
        )
    );

    // A peer leaving: its pods are no longer sent to, and what is sent for them is counted.
    let sub3 = subnet(&lab, 3)?;
    lab.stop_daemon(3)?;
    lab.etcdctl(&[
        "del",
        &format!("/coreos.com/network/subnets/{}", sub3.replace('/', "-")),
    ])?;
    wait_until(Duration::from_secs(20), || {
        lab.status(1)
            .is_ok_and(|s| s["peers"].as_array().map_or(0, |a| a.len()) == 1)
    })
    .with_context(|| {
        format!(
            "node 1 kept the peer whose lease ({sub3}) went: {:?} keys {:?}",
            lab.status(1).map(|s| s["peers"].clone()),
            lab.lease_keys()
        )
    })?;
    let before = dropped(&lab, 1, "no_peer");
    assert!(!pods[0].ping(pods[2].ip));
    assert!(dropped(&lab, 1, "no_peer") > before);

    // twilld restarting: the device goes with the process and comes back with it.
    lab.stop_daemon(1)?;
    let links = lab.exec_ok(1, &["ip", "link", "show"])?;
    assert!(
        !links.contains("twill-udp"),
        "the TUN device outlived twilld: {links}"
    );
    lab.start_daemon(1)?;
    lab.wait_ready(1, Duration::from_secs(30))?;
    assert_eq!(pod_to_pod(&pods[0], &pods[1], 7399)?, pods[0].ip);

    // A peer joining a running cluster: node 4's pod and node 1's reach each other.
    let i = lab.add_node()?;
    lab.start_daemon(i)?;
    lab.wait_ready(i, Duration::from_secs(30))?;
    let late = lab.add_pod(i, "a")?;
    assert_eq!(pod_to_pod(&late, &pods[0], 7398)?, late.ip);
    assert_eq!(pod_to_pod(&pods[0], &late, 7397)?, pods[0].ip);
    Ok(())
}

/// The threads of twilld `pid` whose name starts with `prefix`.
fn threads(pid: u32, prefix: &str) -> Result<usize> {
    let mut n = 0;
    for t in std::fs::read_dir(format!("/proc/{pid}/task"))? {
        let comm = std::fs::read_to_string(t?.path().join("comm")).unwrap_or_default();
        n += usize::from(comm.starts_with(prefix));
    }
    Ok(n)
}

/// A change of the node's underlay address: the device's workers move to the new address, and
/// those of the old one stop although no packet comes to their queues (they used to wait in a
/// blocking read of the TUN device, keeping their socket on the old address, until one did).
#[test]
fn an_underlay_address_change_moves_the_workers_and_leaves_none_behind() -> Result<()> {
    let mut lab = lab(2)?;
    let (a, b) = (lab.add_pod(1, "a")?, lab.add_pod(2, "a")?);
    assert_eq!(pod_to_pod(&a, &b, 7390)?, a.ip);
    let pid = lab.daemon_pid(1).context("twilld pid")?;
    let (tx, rx) = (threads(pid, "twill-udp-tx")?, threads(pid, "twill-udp-rx")?);
    assert!(
        tx > 0 && tx == rx,
        "{tx} sending and {rx} receiving workers"
    );
    let old = lab.node_ip(1);
    let new_ip = "198.18.0.62";
    lab.renumber(1, &old.to_string(), new_ip)?;
    let key = format!(
        "/coreos.com/network/subnets/{}",
        subnet(&lab, 1)?.replace('/', "-")
    );
    wait_until(Duration::from_secs(20), || {
        lab.etcd_get(&key)
            .ok()
            .flatten()
            .is_some_and(|v| v.contains(&format!("\"PublicIP\":\"{new_ip}\"")))
    })
    .with_context(|| format!("lease not updated; log:\n{}", lab.daemon_log(1)))?;
    // Before any pod traffic: a worker that waits for a packet to notice it should stop
    // would wait forever here.
    let sockets = |lab: &Lab| lab.exec_ok(1, &["ss", "-uanH"]).unwrap_or_default();
    wait_until(Duration::from_secs(10), || {
        let s = sockets(&lab);
        threads(pid, "twill-udp-tx").ok() == Some(tx)
            && threads(pid, "twill-udp-rx").ok() == Some(rx)
            && !s.contains(&format!("{old}:{PORT}"))
            && s.contains(&format!("{new_ip}:{PORT}"))
    })
    .with_context(|| {
        format!(
            "workers left on the old address: {:?} sending, {:?} receiving (want {tx} each); sockets:\n{}",
            threads(pid, "twill-udp-tx"),
            threads(pid, "twill-udp-rx"),
            sockets(&lab)
        )
    })?;
    // And the new ones carry traffic both ways.
    wait_until(Duration::from_secs(20), || a.ping(b.ip))
        .context("node 1's pod cannot reach node 2's after the address change")?;
    assert_eq!(pod_to_pod(&a, &b, 7391)?, a.ip);
    assert_eq!(pod_to_pod(&b, &a, 7392)?, b.ip);
    Ok(())
}

/// The byte at `i` of the bulk stream: a pattern no run of zeros or repeats could fake, so a
/// lost, doubled or reordered segment shows.
fn pattern(i: u64) -> u8 {
    let x = i.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    (x >> 56) as u8 ^ (i >> 11) as u8
}

/// Sends `len` bytes of `pattern` over one TCP connection from `from` to `to`; the receiver
/// checks every byte. Returns how many it got right before the end or the first wrong one.
fn bulk(from: &Pod, to: &Pod, port: u16, len: u64) -> Result<u64> {
    use std::io::{Read, Write};
    use std::net::{TcpListener, TcpStream};
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let ip = to.ip;
    let server = twill_tests::netns::spawn_in_netns(&to.ns, "bulk-rx", move || -> Result<u64> {
        let l = TcpListener::bind((ip, port))?;
        let _ = ready_tx.send(());
        let (mut c, _) = l.accept()?;
        c.set_read_timeout(Some(Duration::from_secs(20)))?;
        let (mut at, mut buf) = (0u64, vec![0u8; 1 << 16]);
        loop {
            let n = c.read(&mut buf)?;
            if n == 0 {
                return Ok(at);
            }
            for &b in &buf[..n] {
                if b != pattern(at) {
                    bail!("byte {at} is {b:#04x}, not {:#04x}", pattern(at));
                }
                at += 1;
            }
        }
    })?;
    ready_rx
        .recv_timeout(Duration::from_secs(5))
        .context("the receiver never listened")?;
    let to_ip = to.ip;
    twill_tests::netns::in_netns(&from.ns, move || -> Result<()> {
        let mut c = TcpStream::connect_timeout(&(to_ip, port).into(), Duration::from_secs(5))?;
        c.set_write_timeout(Some(Duration::from_secs(20)))?;
        let mut at = 0u64;
        let mut buf = vec![0u8; 1 << 16];
        while at < len {
            let n = (len - at).min(buf.len() as u64) as usize;
            for (k, b) in buf[..n].iter_mut().enumerate() {
                *b = pattern(at + k as u64);
            }
            c.write_all(&buf[..n])?;
            at += n as u64;
        }
        Ok(())
    })??;
    server
        .join()
        .map_err(|_| anyhow::anyhow!("the receiver panicked"))??
}

#[test]
fn bulk_tcp_crosses_intact_in_offloaded_batches() -> Result<()> {
    let mut lab = lab(2)?;
    let a = lab.add_pod(1, "a")?;
    let b = lab.add_pod(2, "b")?;
    pod_to_pod(&a, &b, 7400)?;
    const LEN: u64 = 32 << 20;
    let out = |lab: &Lab, i| {
        (
            metric(lab, i, "twill_udp_packets_total{direction=\"out\"}"),
            metric(lab, i, "twill_udp_messages_total{direction=\"out\"}"),
        )
    };
    let inn = |lab: &Lab, i| {
        (
            metric(lab, i, "twill_udp_batched_packets_total{direction=\"in\"}"),
            metric(lab, i, "twill_udp_messages_total{direction=\"in\"}"),
        )
    };
    let errors = |lab: &Lab| {
        ["send_error", "malformed"]
            .iter()
            .map(|r| dropped(lab, 1, r) + dropped(lab, 2, r))
            .sum::<f64>()
    };
    let (sent0, inn0, errors0) = (out(&lab, 1), inn(&lab, 2), errors(&lab));
    // Both ways: each direction's data rides on one node's GSO sends and the other's GRO
    // receives, and its ACKs the other way.
    assert_eq!(bulk(&a, &b, 7401, LEN)?, LEN, "a -> b lost its end");
    assert_eq!(bulk(&b, &a, 7402, LEN)?, LEN, "b -> a lost its end");
    let (sent1, inn1) = (out(&lab, 1), inn(&lab, 2));
    // Packets per message above 1 on the way out: GSO sends, many datagrams in one buffer; on
    // the way in, many datagrams in one message: the socket's GRO. Without either the ratio
    // is exactly 1. The kernel here has both (UDP GSO since 4.18, GRO since 5.0).
    let gso = (sent1.0 - sent0.0) / (sent1.1 - sent0.1).max(1.0);
    let gro = (inn1.0 - inn0.0) / (inn1.1 - inn0.1).max(1.0);
    assert!(gso > 4.0, "node 1 sent {gso:.2} datagrams per message");
    assert!(gro > 4.0, "node 2 received {gro:.2} datagrams per message");
    assert_eq!(
        errors(&lab),
        errors0,
        "packets were refused or mangled on the way"
    );
    Ok(())
}

#[test]
fn without_offloads_every_packet_goes_alone_and_arrives() -> Result<()> {
    // Node 1 with --udp-offloads=false: the paths a kernel without TUN offload, UDP GSO and
    // UDP GRO takes (this kernel has all three, so turning them off is the only way to run
    // them here). Node 2 keeps its offloads: the two interoperate.
    let mut lab = Lab::new(LabOptions {
        nodes: 2,
        ..Default::default()
    })?;
    lab.put_config(UDP)?;
    lab.start_daemon_with(1, &["--udp-offloads=false"])?;
    lab.start_daemon(2)?;
    for i in 1..=2 {
        lab.wait_ready(i, Duration::from_secs(30))?;
    }
    lab.wait_meshed()?;
    let a = lab.add_pod(1, "a")?;
    let b = lab.add_pod(2, "b")?;
    pod_to_pod(&a, &b, 7410)?;
    const LEN: u64 = 8 << 20;
    assert_eq!(bulk(&a, &b, 7411, LEN)?, LEN, "a -> b lost its end");
    assert_eq!(bulk(&b, &a, 7412, LEN)?, LEN, "b -> a lost its end");
    // One packet per TUN read, one datagram per message both ways: every counter pair equal
    // in one scrape (late packets of the transfers may still move them: retried until they
    // settle; with offloads they never would).
    let one_by_one = || -> Result<String> {
        let (_, text) = lab.get(1, "/metrics")?;
        let m = |name: &str| parse_metric(&text, name).unwrap_or(0.0);
        let reads = m("twill_udp_batches_total{direction=\"out\"}");
        let pairs = [
            (
                reads,
                m("twill_udp_batched_packets_total{direction=\"out\"}"),
            ),
            (
                m("twill_udp_messages_total{direction=\"out\"}"),
                m("twill_udp_packets_total{direction=\"out\"}"),
            ),
            (
                m("twill_udp_messages_total{direction=\"in\"}"),
                m("twill_udp_batched_packets_total{direction=\"in\"}"),
            ),
        ];
        if reads > 1000.0 && pairs.iter().all(|(x, y)| x == y) {
            Ok(String::new())
        } else {
            Ok(format!("reads {reads}, pairs {pairs:?}"))
        }
    };
    let mut last = String::new();
    let settled = wait_until(Duration::from_secs(10), || match one_by_one() {
        Ok(s) if s.is_empty() => true,
        Ok(s) => {
            last = s;
            false
        }
        Err(_) => false,
    });
    assert!(
        settled.is_ok(),
        "not one packet per read and message: {last}"
    );
    let log = lab.daemon_log(1);
    assert!(log.contains("--udp-offloads=false"), "{log}");
    Ok(())
}

#[test]
fn gso_sends_the_path_cannot_carry_go_out_one_by_one() -> Result<()> {
    let mut lab = lab(2)?;
    let a = lab.add_pod(1, "a")?;
    let b = lab.add_pod(2, "b")?;
    pod_to_pod(&a, &b, 7420)?;
    // A path MTU towards node 2 below the datagrams' size: the kernel refuses a GSO send whose
    // segments do not fit (EINVAL), where a single datagram is fragmented on the way out.
    let n2 = lab.node_ip(2).to_string();
    lab.exec_ok(
        1,
        &[
            "ip",
            "route",
            "add",
            &format!("{n2}/32"),
            "dev",
            "eth0",
            "mtu",
            "lock",
            "1200",
        ],
    )?;
    let errors = |lab: &Lab| dropped(lab, 1, "send_error");
    let before = errors(&lab);
    const LEN: u64 = 4 << 20;
    assert_eq!(
        bulk(&a, &b, 7421, LEN)?,
        LEN,
        "a -> b stalled or lost its end"
    );
    assert_eq!(errors(&lab), before, "datagrams were counted lost");
    Ok(())
}

#[test]
fn strangers_garbage_and_packets_for_other_nodes_are_dropped_and_counted() -> Result<()> {
    // No pods: nothing legitimate crosses while this runs, so every datagram counted in is one
    // of the test's (late packets of earlier pod connections once made this flaky).
    let lab = lab(2)?;
    lab.wait_programmed(Duration::from_secs(10))?;
    let delivered = metric(&lab, 1, "twill_udp_packets_total{direction=\"in\"}");
    let n1 = lab.node_ip(1);
    let base = |i: usize| -> Result<Ipv4Addr> {
        let s = subnet(&lab, i)?;
        Ok(s.split('/').next().unwrap_or_default().parse()?)
    };
    let (sub1, sub2) = (base(1)?, base(2)?);
    // From the underlay host, which is no peer: dropped whatever it carries.
    let before = dropped(&lab, 1, "unknown_source");
    send_from(
        &lab.underlay_ns(),
        n1,
        &ipv4_packet(Ipv4Addr::new(10, 244, 250, 1), sub1),
    )?;
    send_from(&lab.underlay_ns(), n1, b"not a packet")?;
    wait_until(Duration::from_secs(5), || {
        dropped(&lab, 1, "unknown_source") == before + 2.0
    })
    .context("datagrams from a stranger were not counted")?;
    // From the peer: garbage, and a packet for its own subnet (not node 1's).
    let node2 = lab.node_ns(2);
    let (m, o) = (dropped(&lab, 1, "malformed"), dropped(&lab, 1, "not_ours"));
    send_from(&node2, n1, b"\x45garbage")?;
    send_from(
        &node2,
        n1,
        &ipv4_packet(sub2, Ipv4Addr::new(192, 168, 7, 7)),
    )?;
    wait_until(Duration::from_secs(5), || {
        dropped(&lab, 1, "malformed") > m && dropped(&lab, 1, "not_ours") > o
    })
    .with_context(|| {
        format!(
            "garbage from a peer, or a packet not for node 1, was not counted: {}",
            lab.get(1, "/metrics")
                .map(|(_, t)| t
                    .lines()
                    .filter(|l| l.starts_with("twill_udp"))
                    .collect::<Vec<_>>()
                    .join("; "))
                .unwrap_or_default()
        ) + &format!(
            " route: {:?} peers: {:?}",
            lab.exec_ok(2, &["ip", "-4", "route", "get", &n1.to_string()]),
            lab.status(1).map(|s| s["peers"].clone())
        )
    })?;
    assert_eq!(
        metric(&lab, 1, "twill_udp_packets_total{direction=\"in\"}"),
        delivered,
        "a dropped datagram was written to the TUN device"
    );
    // The kernel sends nothing but IPv4 into the device (IPv6 is off on it).
    assert_eq!(dropped(&lab, 1, "malformed"), m + 1.0);
    Ok(())
}

/// A flanneld `udp` node, played by the test in the underlay namespace (198.18.0.1): its lease
/// in flannel's format, and its side of the wire format. A pod's ping to an address in its
/// subnet arrives as the bare IPv4 packet in a datagram to port 8285; the answer, sent the
/// same way, reaches the pod.
#[test]
fn a_pod_pings_through_a_flanneld_format_udp_peer() -> Result<()> {
    let mut lab = lab(1)?;
    // Beyond the first 100 free subnets, among which node 1 picked its own.
    lab.etcdctl(&[
        "put",
        "/coreos.com/network/subnets/10.244.199.0-24",
        &format!(r#"{{"PublicIP":"{UNDERLAY_IP}","BackendType":"udp"}}"#),
    ])?;
    wait_until(Duration::from_secs(20), || {
        lab.status(1)
            .is_ok_and(|s| s["peers"].as_array().map_or(0, |a| a.len()) == 1)
    })
    .context("node 1 did not take the flanneld-format lease")?;
    let pod = lab.add_pod(1, "a")?;
    let underlay = lab.underlay_ns();
    // The peer: answer every echo request, up to 3.
    let peer = std::thread::spawn(move || -> Result<Vec<Vec<u8>>> {
        let ns = std::fs::File::open(format!("/run/netns/{underlay}"))?;
        nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET)?;
        let sock = UdpSocket::bind(SocketAddrV4::new(UNDERLAY_IP, PORT))?;
        sock.set_read_timeout(Some(Duration::from_secs(10)))?;
        let mut seen = Vec::new();
        let mut buf = [0u8; 65535];
        while seen.len() < 3 {
            let Ok((n, from)) = sock.recv_from(&mut buf) else {
                break;
            };
            let p = buf[..n].to_vec();
            seen.push(p.clone());
            if let Some(reply) = echo_reply(&p) {
                sock.send_to(&reply, from)?;
            }
        }
        Ok(seen)
    });
    std::thread::sleep(Duration::from_millis(300));
    let answered = (0..3).any(|_| pod.ping(Ipv4Addr::new(10, 244, 199, 5)));
    let seen = peer
        .join()
        .map_err(|_| anyhow::anyhow!("the peer thread panicked"))??;
    let first = seen.first().context("the peer received nothing")?;
    // The datagram is the pod's packet itself: IPv4, from the pod to the peer's pod address,
    // ICMP, with no header of twill's in front.
    assert_eq!(first[0] >> 4, 4, "{first:02x?}");
    assert_eq!(
        &first[12..16],
        &pod.ip.octets(),
        "not the pod's source address"
    );
    assert_eq!(&first[16..20], &[10, 244, 199, 5]);
    assert_eq!(first[9], 1, "not ICMP");
    assert!(answered, "the pod got no answer through the udp peer");
    assert!(metric(&lab, 1, "twill_udp_packets_total{direction=\"in\"}") >= 1.0);
    Ok(())
}

/// The echo reply to an IPv4 ICMP echo request (addresses swapped, checksums redone).
fn echo_reply(p: &[u8]) -> Option<Vec<u8>> {
    let hl = usize::from(p.first()? & 0x0f) * 4;
    if p.len() < hl + 8 || p[9] != 1 || p[hl] != 8 {
        return None;
    }
    let mut r = p.to_vec();
    r[12..16].copy_from_slice(&p[16..20]);
    r[16..20].copy_from_slice(&p[12..16]);
    r[8] = 64;
    r[10..12].copy_from_slice(&[0, 0]);
    let sum = checksum(&r[..hl]);
    r[10..12].copy_from_slice(&sum.to_be_bytes());
    r[hl] = 0;
    r[hl + 2..hl + 4].copy_from_slice(&[0, 0]);
    let sum = checksum(&r[hl..]);
    r[hl + 2..hl + 4].copy_from_slice(&sum.to_be_bytes());
    Some(r)
}
