//! Backends and masquerade, side by side in one run on one two-node lab:
//! - pod-to-pod TCP throughput (1 and 8 streams), RTT and CPU per Gbit/s with vxlan, host-gw,
//!   vxlan with DirectRouting and udp (userspace), each against node-to-node over the underlay
//!   measured right next to it; how long a twilld restart stops udp's traffic;
//! - the floors under those with twill out of the path: host-gw's own routes and bridges with
//!   the daemons stopped and no nftables, and hand-made routed pods (no bridge) against the
//!   underlay: what the lab's topology itself costs;
//! - pod-to-world throughput and TCP connection rate with masquerade against the same pod
//!   reaching the world unNATed (a route back to the pod network on the world's side).
//!
//! The backend is switched between daemon restarts (what an operator does), and the pods are
//! made anew for each backend so they get that backend's MTU.

use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::process::Child;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context, Result};
use serde_json::{json, Value};
use twill_tests::lab::UNDERLAY_IP;
use twill_tests::{netns, wait_until, Lab, Pod};

use crate::common::{self, Ctx};
use crate::report::{Metric, ScenarioResult};

const BACKENDS: [(&str, &str); 4] = [
    (
        "vxlan",
        r#"{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan"}}"#,
    ),
    (
        "host-gw",
        r#"{"Network":"10.244.0.0/16","Backend":{"Type":"host-gw"}}"#,
    ),
    (
        "vxlan DirectRouting",
        r#"{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan","DirectRouting":true}}"#,
    ),
    (
        "udp",
        r#"{"Network":"10.244.0.0/16","Backend":{"Type":"udp"}}"#,
    ),
];

/// CPU time the whole machine spent busy so far (both lab nodes, the kernel's share of every
/// packet and userspace alike), in seconds, from /proc/stat.
fn busy_secs() -> Result<f64> {
    let stat = std::fs::read_to_string("/proc/stat")?;
    let line = stat.lines().next().context("empty /proc/stat")?;
    let f: Vec<f64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|v| v.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal: all but idle and iowait.
    let busy: f64 = f
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != 3 && *i != 4 && *i < 8)
        .map(|(_, v)| v)
        .sum();
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    Ok(busy / hz)
}

/// `iperf`, with the CPU it cost: (Gbit/s, core-seconds per Gbit moved).
fn iperf_cpu(ns: &str, ip: &str, port: u16, secs: u32, streams: u32) -> Result<(f64, f64)> {
    let before = busy_secs()?;
    let gbps = iperf(ns, ip, port, secs, streams)?;
    let cpu = busy_secs()? - before;
    Ok((gbps, cpu / (gbps * f64::from(secs)).max(1e-9)))
}

/// How long pod-to-pod pings stop when node 1's twilld restarts (SIGTERM, start): from the
/// signal to the first answered ping, pinging every 10 ms.
fn restart_outage(lab: &mut Lab, from: &Pod, to: Ipv4Addr) -> Result<f64> {
    let t0 = Instant::now();
    lab.stop_daemon(1)?;
    common::start_daemon(lab, 1, &[])?;
    let deadline = t0 + Duration::from_secs(60);
    loop {
        let out = netns::exec_cmd(
            &from.ns,
            &["ping", "-n", "-q", "-c", "1", "-W", "0.01", &to.to_string()],
        )
        .output()?;
        if out.status.success() {
            return Ok(common::ms(t0.elapsed()));
        }
        if Instant::now() > deadline {
            return Err(anyhow!(
                "pods never reached each other again after the restart"
            ));
        }
    }
}

fn ns_exec(ns: &str, args: &[&str]) -> Result<String> {
    netns::check(args, netns::exec_cmd(ns, args).output()?)
}

/// Kills the iperf3 servers when the scenario ends, however it ends.
pub(crate) struct Servers(pub(crate) Vec<Child>);
impl Drop for Servers {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

pub(crate) fn iperf_server(ns: &str, ip: &str, port: u16) -> Result<Child> {
    Ok(
        netns::exec_cmd(ns, &["iperf3", "-s", "-B", ip, "-p", &port.to_string()])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()?,
    )
}

/// Gbit/s received by the server side.
pub(crate) fn iperf(ns: &str, ip: &str, port: u16, secs: u32, streams: u32) -> Result<f64> {
    let out = ns_exec(
        ns,
        &[
            "iperf3",
            "-c",
            ip,
            "-p",
            &port.to_string(),
            "-t",
            &secs.to_string(),
            "-P",
            &streams.to_string(),
            "-J",
        ],
    )?;
    let v: Value = serde_json::from_str(&out).context("iperf3 -J output")?;
    v["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .map(|b| b / 1e9)
        .ok_or_else(|| anyhow!("no throughput in iperf3 output"))
}

fn rtts(ns: &str, dst: &str, count: u32) -> Result<Vec<f64>> {
    let out = ns_exec(
        ns,
        &["ping", "-n", "-c", &count.to_string(), "-i", "0.01", dst],
    )?;
    Ok(out
        .lines()
        .filter_map(|l| l.split("time=").nth(1))
        .filter_map(|t| t.split_whitespace().next()?.parse().ok())
        .collect())
}

/// Restart both daemons on `config` and wait for the mesh.
fn switch(lab: &mut Lab, config: &str, extra: &[&str]) -> Result<()> {
    for i in 1..=2 {
        if lab.daemon_running(i) {
            lab.stop_daemon(i)?;
        }
    }
    lab.put_config(config)?;
    for i in 1..=2 {
        common::start_daemon(lab, i, extra)?;
    }
    for i in 1..=2 {
        lab.wait_ready(i, common::READY_TIMEOUT)?;
    }
    lab.wait_programmed(Duration::from_secs(30))
}

fn fresh_pods(lab: &mut Lab, old: Vec<Pod>, tag: &str) -> Result<Vec<Pod>> {
    for p in &old {
        lab.del_pod(p)?;
    }
    let pods = vec![lab.add_pod(1, tag)?, lab.add_pod(2, tag)?];
    let dst = pods[1].ip;
    wait_until(Duration::from_secs(30), || pods[0].ping(dst))
        .context("pods do not reach each other")?;
    Ok(pods)
}

/// TCP connections per second from `from_ns` to a listener at `ip:port` in `to_ns`, each
/// connected, one byte exchanged, closed.
pub(crate) fn conn_rate(
    from_ns: &str,
    to_ns: &str,
    ip: Ipv4Addr,
    port: u16,
    secs: f64,
) -> Result<f64> {
    let addr = SocketAddr::from((ip, port));
    let stop = Arc::new(AtomicBool::new(false));
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let (to, s2) = (to_ns.to_string(), stop.clone());
    let server = std::thread::spawn(move || {
        netns::in_netns(&to, move || -> std::io::Result<()> {
            let l = TcpListener::bind(addr)?;
            l.set_nonblocking(true)?;
            let _ = ready_tx.send(());
            while !s2.load(Ordering::Relaxed) {
                match l.accept() {
                    Ok((mut s, _)) => {
                        use std::io::{Read, Write};
                        s.set_nonblocking(false)?;
                        let mut b = [0u8; 1];
                        let _ = s.read(&mut b);
                        let _ = s.write_all(&b);
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        std::thread::sleep(Duration::from_micros(50))
                    }
                    Err(e) => return Err(e),
                }
            }
            Ok(())
        })
    });
    ready_rx
        .recv_timeout(Duration::from_secs(5))
        .context("listener did not start")?;
    let n = netns::in_netns(from_ns, move || -> std::io::Result<u64> {
        use std::io::{Read, Write};
        let start = Instant::now();
        let mut n = 0;
        while start.elapsed().as_secs_f64() < secs {
            let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
            s.write_all(b"x")?;
            let mut b = [0u8; 1];
            s.read_exact(&mut b)?;
            abortive_close(&s);
            n += 1;
        }
        Ok(n)
    })??;
    stop.store(true, Ordering::Relaxed);
    let _ = server.join();
    Ok(n as f64 / secs)
}

/// Close with a RST (SO_LINGER 0): thousands of connections a second would otherwise fill the
/// client's ports with TIME_WAIT and stall on reused ones, which measures TCP, not the path.
fn abortive_close(s: &TcpStream) {
    use std::os::fd::AsRawFd;
    let l = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: a valid socket fd and a linger struct of the size passed.
    unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&l as *const libc::linger).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        );
    }
}

/// The pod paths of this lab with twill out of them: the daemons stopped and their nftables
/// tables gone, the same veths, bridges and routes (the bare path, against which twill's own
/// cost is read), and a routed pod on each node (a veth and a /32 route, no bridge, Calico's
/// shape) against the underlay: what the topology itself costs, since node to node is two
/// veth pairs and a bridge, and a pod's packet crosses two more veth pairs and is forwarded on
/// both nodes.
struct Floors {
    bare: Vec<f64>,
    routed: Vec<f64>,
    /// The underlay, each run right next to a routed run.
    underlay: Vec<f64>,
}

/// Routed pods made by hand for `floors`: gone with their namespaces (the lab's prefix, so a
/// crash leaves nothing the lab's own cleanup misses) and their routes on the nodes.
struct RoutedPods<'a> {
    lab: &'a Lab,
    made: usize,
}

/// The routed pod on node `i`: its namespace, and its address outside the cluster network.
fn routed_pod(lab: &Lab, i: usize) -> (String, String) {
    (format!("{}rp{i}", lab.prefix()), format!("10.201.{i}.2"))
}

impl RoutedPods<'_> {
    fn make(&mut self, i: usize) -> Result<()> {
        let (ns, ip) = routed_pod(self.lab, i);
        let node = self.lab.node_ns(i);
        // Inside the node's namespace, like the lab's own eth0: no prefix needed.
        let (host_if, pod_if) = ("rh0", "rp0");
        netns::add(&ns)?;
        self.made = i;
        for args in [
            vec![
                "ip", "link", "add", &host_if, "type", "veth", "peer", "name", pod_if,
            ],
            vec!["ip", "link", "set", pod_if, "netns", &ns],
            vec!["ip", "link", "set", &host_if, "up"],
            vec!["ip", "route", "add", &format!("{ip}/32"), "dev", &host_if],
        ] {
            ns_exec(&node, &args)?;
        }
        let mac = ns_exec(
            &node,
            &["cat", &format!("/sys/class/net/{host_if}/address")],
        )?;
        for args in [
            vec!["ip", "link", "set", "lo", "up"],
            vec!["ip", "addr", "add", &format!("{ip}/32"), "dev", pod_if],
            vec!["ip", "link", "set", pod_if, "up"],
            // A gateway that answers by a static neighbour entry: no proxy ARP needed.
            vec![
                "ip",
                "route",
                "add",
                "169.254.1.1",
                "dev",
                pod_if,
                "scope",
                "link",
            ],
            vec![
                "ip",
                "neigh",
                "add",
                "169.254.1.1",
                "lladdr",
                mac.trim(),
                "dev",
                pod_if,
            ],
            vec![
                "ip",
                "route",
                "add",
                "default",
                "via",
                "169.254.1.1",
                "dev",
                pod_if,
            ],
        ] {
            ns_exec(&ns, &args)?;
        }
        let peer = 3 - i;
        let via = self.lab.node_ip(peer).to_string();
        ns_exec(
            &node,
            &[
                "ip",
                "route",
                "add",
                &format!("10.201.{peer}.0/24"),
                "via",
                &via,
            ],
        )?;
        Ok(())
    }
}

impl Drop for RoutedPods<'_> {
    fn drop(&mut self) {
        for i in 1..=self.made {
            let _ = netns::kill_all_and_delete(&routed_pod(self.lab, i).0);
            let route = format!("10.201.{}.0/24", 3 - i);
            let _ = ns_exec(&self.lab.node_ns(i), &["ip", "route", "del", &route]);
        }
    }
}

fn floors(lab: &mut Lab, pods: &[Pod], secs: u32, runs: u32) -> Result<Floors> {
    for i in 1..=2 {
        lab.stop_daemon(i)?;
        ns_exec(&lab.node_ns(i), &["nft", "flush", "ruleset"])?;
    }
    let mut routed_pods = RoutedPods { lab, made: 0 };
    routed_pods.make(1)?;
    routed_pods.make(2)?;
    let ((rp1, _), (rp2, rp2_ip)) = (routed_pod(lab, 1), routed_pod(lab, 2));
    let (n1, n2_ip) = (lab.node_ns(1), lab.node_ip(2).to_string());
    let ip = pods[1].ip.to_string();
    let _s = Servers(vec![
        iperf_server(&pods[1].ns, &ip, 5204)?,
        iperf_server(&rp2, &rp2_ip, 5205)?,
    ]);
    wait_until(Duration::from_secs(20), || {
        iperf(&pods[0].ns, &ip, 5204, 1, 1).is_ok() && iperf(&rp1, &rp2_ip, 5205, 1, 1).is_ok()
    })
    .context("floors: iperf3 servers did not come up")?;
    let mut f = Floors {
        bare: Vec::new(),
        routed: Vec::new(),
        underlay: Vec::new(),
    };
    for r in 0..runs {
        f.bare.push(iperf(&pods[0].ns, &ip, 5204, secs, 1)?);
        // Alternate which goes first: the machine's noise drifts.
        let routed = |f: &mut Floors| -> Result<()> {
            f.routed.push(iperf(&rp1, &rp2_ip, 5205, secs, 1)?);
            Ok(())
        };
        if r % 2 == 1 {
            routed(&mut f)?;
        }
        f.underlay.push(iperf(&n1, &n2_ip, 5201, secs, 1)?);
        if r % 2 == 0 {
            routed(&mut f)?;
        }
    }
    Ok(f)
}

pub fn run(ctx: &Ctx, res: &mut ScenarioResult) -> Result<()> {
    let (secs, runs, pings, rate_secs) = if ctx.quick {
        (1, 1, 20, 0.5)
    } else {
        (5, 5, 200, 3.0)
    };
    res.config = json!({"iperf_seconds": secs, "runs": runs, "pings": pings,
                        "connection_rate_seconds": rate_secs});
    let mut lab = ctx.lab(2)?;
    let (n1, n2) = (lab.node_ns(1), lab.node_ns(2));
    let n2_ip = lab.node_ip(2).to_string();
    let mut servers = Servers(vec![iperf_server(&n2, &n2_ip, 5201)?]);
    let mut pods: Vec<Pod> = Vec::new();
    let mut single: Vec<(&str, Vec<f64>)> = Vec::new();
    for (name, config) in BACKENDS {
        switch(&mut lab, config, &[])?;
        pods = fresh_pods(
            &mut lab,
            pods,
            &name.replace(' ', "").chars().take(5).collect::<String>(),
        )?;
        let (p1, p2) = (&pods[0], &pods[1]);
        let server = iperf_server(&p2.ns, &p2.ip.to_string(), 5202)?;
        servers.0.push(server);
        let pip = p2.ip.to_string();
        wait_until(Duration::from_secs(20), || {
            iperf(&p1.ns, &pip, 5202, 1, 1).is_ok() && iperf(&n1, &n2_ip, 5201, 1, 1).is_ok()
        })
        .context("iperf3 servers did not come up")?;
        for streams in [1u32, 8] {
            let (mut pod, mut under) = (Vec::new(), Vec::new());
            let (mut pod_cpu, mut under_cpu) = (Vec::new(), Vec::new());
            for r in 0..runs {
                // Alternate which goes first: the machine's noise drifts.
                let mut run_pod = || -> Result<()> {
                    let (g, c) = iperf_cpu(&p1.ns, &pip, 5202, secs, streams)?;
                    pod.push(g);
                    pod_cpu.push(c);
                    Ok(())
                };
                if r % 2 == 0 {
                    run_pod()?;
                    let (g, c) = iperf_cpu(&n1, &n2_ip, 5201, secs, streams)?;
                    under.push(g);
                    under_cpu.push(c);
                } else {
                    let (g, c) = iperf_cpu(&n1, &n2_ip, 5201, secs, streams)?;
                    under.push(g);
                    under_cpu.push(c);
                    run_pod()?;
                }
            }
            if streams == 1 {
                res.metrics.push(
                    Metric::new(
                        &format!("{name}: CPU per Gbit, TCP 1 stream"),
                        "core-s/Gbit",
                        &pod_cpu,
                    )
                    .vs("underlay node-to-node", &under_cpu)
                    .note("busy CPU of the whole machine (both nodes, kernel and userspace) per Gbit moved; ratio above 1: what the path costs beyond the underlay"),
                );
            }
            let mut m = Metric::new(
                &format!("{name}: TCP {streams} stream(s), pod-to-pod"),
                "Gbit/s",
                &pod,
            )
            .vs_paired("underlay node-to-node", &pod, &under);
            if streams == 1 && matches!(name, "host-gw" | "vxlan DirectRouting") {
                let met = m.ratio.map(|r| r >= 0.95);
                m = m.target("at least 0.95 of the underlay", met);
            }
            res.metrics.push(m);
            if streams == 1 {
                single.push((name, pod));
            }
        }
        let pod_rtt = rtts(&p1.ns, &pip, pings)?;
        let under_rtt = rtts(&n1, &n2_ip, pings)?;
        res.metrics.push(
            Metric::new(&format!("{name}: RTT, pod-to-pod"), "ms", &pod_rtt)
                .vs("underlay node-to-node", &under_rtt),
        );
        if let Some(mut s) = servers.0.pop() {
            let _ = s.kill();
            let _ = s.wait();
        }
        if name == "udp" {
            // The packet path is twilld's own: a restart stops it until the new process has
            // set the device up again.
            let dst = pods[1].ip;
            let outages = (0..3)
                .map(|_| restart_outage(&mut lab, &pods[0], dst))
                .collect::<Result<Vec<f64>>>()?;
            res.metrics.push(
                Metric::new("udp: pod-to-pod outage across a twilld restart", "ms", &outages)
                    .note("SIGTERM to node 1's twilld, then its start; until the first of 10 ms pings is answered"),
            );
        }
        if name == "host-gw" {
            // The same routes with twill stopped and its rules gone: the topology's own floor.
            let host_gw = single.last().map(|(_, v)| v.clone()).unwrap_or_default();
            let floors = floors(&mut lab, &pods, secs, runs)?;
            res.metrics.push(
                Metric::new("host-gw: TCP 1 stream, pod-to-pod", "Gbit/s", &host_gw)
                    .vs("same routes, twill stopped, no nftables", &floors.bare)
                    .target("at least 0.95 of the bare path", None)
                    .note("twill's own cost on the packet path: its nftables tables (conntrack for masquerade)"),
            );
            if let Some(m) = res.metrics.last_mut() {
                m.met = m.ratio.map(|r| r >= 0.95);
            }
            res.metrics.push(
                Metric::new("routed pod, no bridge, no twill: TCP 1 stream", "Gbit/s", &floors.routed)
                    .vs_paired("underlay node-to-node", &floors.routed, &floors.underlay)
                    .note("a veth and a /32 route per pod, host-gw routes, nothing of twill's: what the lab's topology leaves of the underlay"),
            );
        }
    }
    // The routed backends against the tunnel, from the same run.
    let vxlan = single[0].1.clone();
    for (name, gbps) in &single[1..] {
        let mut m = Metric::new(&format!("{name} vs vxlan: TCP 1 stream"), "Gbit/s", gbps)
            .vs("vxlan pod-to-pod", &vxlan);
        if *name == "udp" {
            let met = m.ratio.map(|r| r >= 0.7);
            m = m
                .target("at least 0.7 of vxlan", met)
                .note("the userspace tunnel against the kernel's");
        } else {
            m = m.note("ratio above 1: the encapsulation's cost saved");
        }
        res.metrics.push(m);
    }

    // Masquerade: the pod reaches the world with and without NAT (vxlan backend).
    let world = lab.underlay_ns();
    let world_ip = UNDERLAY_IP.to_string();
    servers.0.push(iperf_server(&world, &world_ip, 5203)?);
    let mut results: Vec<(bool, Vec<f64>, Vec<f64>)> = Vec::new();
    for masq in [true, false] {
        let flag = if masq {
            "--ip-masq=true"
        } else {
            "--ip-masq=false"
        };
        switch(&mut lab, BACKENDS[0].1, &[flag])?;
        pods = fresh_pods(&mut lab, pods, if masq { "masq" } else { "nonat" })?;
        let p1 = &pods[0];
        let sub = lab.status(1)?["node"]["subnet"]
            .as_str()
            .context("no subnet")?
            .to_string();
        let via = lab.node_ip(1).to_string();
        if !masq {
            // The world needs a route back to reach the pod's own address.
            ns_exec(&world, &["ip", "route", "replace", &sub, "via", &via])?;
        }
        wait_until(Duration::from_secs(20), || {
            iperf(&p1.ns, &world_ip, 5203, 1, 1).is_ok()
        })
        .context("pod does not reach the world")?;
        let mut gbps = Vec::new();
        let mut rate = Vec::new();
        for _ in 0..runs {
            gbps.push(iperf(&p1.ns, &world_ip, 5203, secs, 1)?);
            rate.push(conn_rate(&p1.ns, &world, UNDERLAY_IP, 7900, rate_secs)?);
        }
        if !masq {
            ns_exec(&world, &["ip", "route", "del", &sub])?;
        }
        results.push((masq, gbps, rate));
    }
    let (with, without) = (&results[0], &results[1]);
    res.metrics.push(
        Metric::new("pod-to-world TCP 1 stream, masqueraded", "Gbit/s", &with.1)
            .vs("pod-to-world unNATed", &without.1)
            .note("ratio = masquerade's share of the unNATed throughput"),
    );
    res.metrics.push(
        Metric::new(
            "pod-to-world TCP connections, masqueraded",
            "conn/s",
            &with.2,
        )
        .vs("pod-to-world unNATed", &without.2)
        .note("connect, 1 byte each way, close; ratio = masquerade's share"),
    );
    res.notes.push(
        "one two-node lab; the backend is switched between daemon restarts and pods are made \
         anew for each (so they get its MTU); the underlay is measured next to every backend; \
         the world is the underlay host, which has no route to the pod network unless the \
         unNATed case adds one; pod-to-pod vs underlay throughput runs in pairs back to back \
         (alternating which goes first) and its ratio is the median of the pairs' ratios, so \
         that the machine's drift between pairs cancels out"
            .into(),
    );
    Ok(())
}
