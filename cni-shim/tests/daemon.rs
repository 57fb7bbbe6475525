//! twilld's CNI side against the real kernel, driven through the real `twill` binary.
//!
//! Each test makes a "node" netns `twc<pid>n<k>` and runs `cni::serve` on a tokio runtime whose
//! threads live in it (so the bridge and host veths land there), and pod netns
//! `twc<pid>p<k>x<i>`. The machine's own namespace is never touched. Guards remove every netns
//! on drop; leftovers of crashed runs are removed by prefix at start.

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Once};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tokio::sync::{oneshot, watch};
use twill_daemon::cni::{serve, CniLimits, CniOptions, NodeNet};
use twill_daemon::metrics::Metrics;

const BIN: &str = env!("CARGO_BIN_EXE_twill");
const VERSIONS: [&str; 3] = ["0.4.0", "1.0.0", "1.1.0"];

fn sh(args: &[&str]) -> (bool, String) {
    let o = Command::new(args[0]).args(&args[1..]).output().unwrap();
    let mut s = String::from_utf8_lossy(&o.stdout).to_string();
    s.push_str(&String::from_utf8_lossy(&o.stderr));
    (o.status.success(), s)
}

fn sh_ok(args: &[&str]) -> String {
    let (ok, out) = sh(args);
    assert!(ok, "{args:?} failed: {out}");
    out
}

/// Removes netns of earlier runs of this test (prefix twc<pid>, pid no longer alive).
fn clean_leftovers() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let Ok(rd) = std::fs::read_dir("/run/netns") else {
            return;
        };
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().to_string();
            let Some(rest) = name.strip_prefix("twc") else {
                continue;
            };
            let pid: String = rest.chars().take_while(|c| c.is_ascii_digit()).collect();
            let Ok(pid) = pid.parse::<u32>() else {
                continue;
            };
            if pid != std::process::id() && !Path::new(&format!("/proc/{pid}")).exists() {
                let _ = sh(&["ip", "netns", "del", &name]);
            }
        }
    });
}

struct Netns {
    name: String,
}

impl Netns {
    fn new(name: String) -> Self {
        clean_leftovers();
        let _ = sh(&["ip", "netns", "del", &name]);
        sh_ok(&["ip", "netns", "add", &name]);
        sh_ok(&["ip", "-n", &name, "link", "set", "lo", "up"]);
        Netns { name }
    }

    fn path(&self) -> String {
        format!("/run/netns/{}", self.name)
    }

    fn ip(&self, args: &[&str]) -> String {
        let mut a = vec!["ip", "-n", &self.name];
        a.extend_from_slice(args);
        sh_ok(&a)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = sh(&["ip", "netns", "del", &self.name]);
    }
}

struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> Self {
        let p = std::env::temp_dir().join(format!("twc-{}-{tag}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn subnet() -> NodeNet {
    NodeNet {
        subnet: Some("10.244.1.0/24".parse().unwrap()),
        subnet6: None,
        mtu: 1450,
    }
}

/// `cni::serve` running in the node netns.
struct Node {
    ns: Netns,
    k: u32,
    dir: TempDir,
    socket: PathBuf,
    net_tx: watch::Sender<Option<NodeNet>>,
    metrics: Arc<Metrics>,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
    pods: u32,
    limits: CniLimits,
}

static NODES: AtomicU32 = AtomicU32::new(0);

impl Node {
    fn start(net: Option<NodeNet>) -> Self {
        Self::start_with(net, CniLimits::default())
    }

    fn start_with(net: Option<NodeNet>, limits: CniLimits) -> Self {
        let k = NODES.fetch_add(1, Ordering::Relaxed);
        let ns = Netns::new(format!("twc{}n{k}", std::process::id()));
        let dir = TempDir::new(&format!("n{k}"));
        let socket = dir.0.join("run/cni.sock");
        let (net_tx, _) = watch::channel(net);
        let mut n = Node {
            ns,
            k,
            dir,
            socket,
            net_tx,
            metrics: Arc::new(Metrics::default()),
            stop: None,
            thread: None,
            pods: 0,
            limits,
        };
        n.serve();
        n
    }

    /// Starts (or restarts) serve on a fresh runtime in the node netns.
    fn serve(&mut self) {
        let opts = CniOptions {
            socket: self.socket.clone(),
            bridge: "cni0".into(),
            state_dir: self.dir.0.join("state"),
            host_local_dir: Some(self.dir.0.join("host-local")),
            // Policy is the lab tests' (tests/tests/netpol.rs); these test the CNI verbs.
            policy: None,
            limits: self.limits,
        };
        let rx = self.net_tx.subscribe();
        let metrics = self.metrics.clone();
        let nspath = self.ns.path();
        let (stop_tx, stop_rx) = oneshot::channel::<()>();
        let _ = std::fs::remove_file(&self.socket);
        let thread = std::thread::spawn(move || {
            let f = File::open(&nspath).unwrap();
            nix::sched::setns(&f, nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
            // Worker threads are spawned from here and inherit the node netns.
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async {
                tokio::select! {
                    r = serve(opts, rx, metrics) => panic!("serve returned: {r:?}"),
                    _ = stop_rx => {}
                }
            });
            // Dropping the runtime cancels every in-flight request at its next await.
            drop(rt);
        });
        let deadline = Instant::now() + Duration::from_secs(30);
        while !self.socket.exists() {
            assert!(Instant::now() < deadline, "socket never appeared");
            std::thread::sleep(Duration::from_millis(20));
        }
        self.stop = Some(stop_tx);
        self.thread = Some(thread);
    }

    fn stop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.thread.take() {
            t.join().unwrap();
        }
    }

    fn pod(&mut self) -> Netns {
        self.pods += 1;
        Netns::new(format!(
            "twc{}p{}x{}",
            std::process::id(),
            self.k,
            self.pods
        ))
    }

    fn conf(&self, version: &str) -> Value {
        json!({"cniVersion": version, "name": "twill", "type": "twill",
               "socket": self.socket.to_str().unwrap(),
               "dns": {"nameservers": ["10.96.0.10"], "search": ["svc.cluster.local"]}})
    }

    fn ipam_files(&self) -> HashMap<String, String> {
        let dir = self.dir.0.join("state/ipam/10.244.1.0-24");
        let mut m = HashMap::new();
        if let Ok(rd) = std::fs::read_dir(dir) {
            for e in rd.flatten() {
                m.insert(
                    e.file_name().to_string_lossy().to_string(),
                    std::fs::read_to_string(e.path()).unwrap_or_default(),
                );
            }
        }
        m
    }

    fn host_links(&self) -> Vec<String> {
        self.ns
            .ip(&["-o", "link", "show"])
            .lines()
            .filter_map(|l| l.split(": ").nth(1))
            .map(|n| n.split('@').next().unwrap().to_string())
            .filter(|n| n.starts_with("tw"))
            .collect()
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.stop();
    }
}

#[derive(Debug)]
struct Out {
    json: Option<Value>,
    raw: String,
    ok: bool,
}

fn twill(env: &[(&str, &str)], stdin: &Value) -> Out {
    let mut cmd = Command::new(BIN);
    cmd.env_clear();
    for (k, v) in env {
        cmd.env(k, v);
    }
    exec(cmd, stdin).0
}

/// Runs a plugin with `stdin` as its config; stdout parsed as JSON when there is any.
fn exec(mut cmd: Command, stdin: &Value) -> (Out, String) {
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // A plugin refusing an oversized config may stop reading early.
    let _ = child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.to_string().as_bytes());
    let out = child.wait_with_output().unwrap();
    let raw = String::from_utf8(out.stdout).unwrap();
    let json = (!raw.trim().is_empty()).then(|| serde_json::from_str(&raw).unwrap());
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    (
        Out {
            json,
            raw,
            ok: out.status.success(),
        },
        stderr,
    )
}

fn cni(cmd: &str, id: &str, netns: &str, conf: &Value) -> Out {
    twill(
        &[
            ("CNI_COMMAND", cmd),
            ("CNI_CONTAINERID", id),
            ("CNI_NETNS", netns),
            ("CNI_IFNAME", "eth0"),
            ("CNI_PATH", "/usr/lib/cni"),
            ("CNI_ARGS", "IgnoreUnknown=1;K8S_POD_NAME=p"),
        ],
        conf,
    )
}

fn ok(o: Out) -> Option<Value> {
    assert!(o.ok, "expected success: {}", o.raw);
    o.json
}

fn code(o: &Out) -> u64 {
    assert!(!o.ok, "expected failure: {}", o.raw);
    o.json.as_ref().unwrap()["code"].as_u64().unwrap()
}

fn with_prev(conf: &Value, prev: &Value) -> Value {
    let mut c = conf.clone();
    c["prevResult"] = prev.clone();
    c
}

fn pod_addr(pod: &Netns) -> Option<String> {
    let (ok, out) = sh(&[
        "ip", "-n", &pod.name, "-4", "-o", "addr", "show", "dev", "eth0",
    ]);
    if !ok {
        return None;
    }
    out.split_whitespace()
        .skip_while(|w| *w != "inet")
        .nth(1)
        .map(str::to_string)
}

#[test]
fn add_check_del_in_every_version() {
    let mut node = Node::start(Some(subnet()));
    for v in VERSIONS {
        let pod = node.pod();
        let conf = node.conf(v);
        let id = format!("ctr-{}", v.replace('.', ""));
        let r = ok(cni("ADD", &id, &pod.path(), &conf)).expect("ADD prints a result");

        assert_eq!(r["cniVersion"], v);
        let ifs = r["interfaces"].as_array().unwrap();
        assert_eq!(ifs.len(), 2);
        let host = ifs[0]["name"].as_str().unwrap().to_string();
        assert_eq!(ifs[0]["sandbox"], "");
        assert_eq!(ifs[0]["mac"].as_str().unwrap().len(), 17);
        assert_eq!(ifs[1]["name"], "eth0");
        assert_eq!(ifs[1]["sandbox"], pod.path().as_str());
        let mac = ifs[1]["mac"].as_str().unwrap().to_string();
        let ip = &r["ips"][0];
        let addr = ip["address"].as_str().unwrap().to_string();
        assert!(
            addr.starts_with("10.244.1.") && addr.ends_with("/24"),
            "{addr}"
        );
        assert_ne!(addr, "10.244.1.1/24");
        assert_eq!(ip["gateway"], "10.244.1.1");
        assert_eq!(ip["interface"], 1);
        assert_eq!(
            r["routes"],
            json!([{"dst": "0.0.0.0/0", "gw": "10.244.1.1"}])
        );
        assert_eq!(r["dns"], conf["dns"]);
        if v == "0.4.0" {
            assert_eq!(ip["version"], "4");
            assert!(ifs[1].get("mtu").is_none());
        } else {
            assert!(ip.get("version").is_none());
            assert_eq!(ifs[1]["mtu"], 1450);
        }

        // The kernel agrees with the result.
        let link = pod.ip(&["link", "show", "eth0"]);
        assert!(
            link.contains("mtu 1450") && link.contains(&mac) && link.contains("UP"),
            "{link}"
        );
        assert_eq!(pod_addr(&pod).as_deref(), Some(addr.as_str()));
        assert!(pod
            .ip(&["route"])
            .contains("default via 10.244.1.1 dev eth0"));
        let hl = node.ns.ip(&["link", "show", &host]);
        let host_mac = ifs[0]["mac"].as_str().unwrap();
        assert!(
            hl.contains("master cni0")
                && hl.contains("mtu 1450")
                && hl.contains(",UP")
                && hl.contains(host_mac),
            "{hl}"
        );
        let d = sh_ok(&[
            "bridge",
            "-n",
            &node.ns.name,
            "-d",
            "link",
            "show",
            "dev",
            &host,
        ]);
        assert!(d.contains("hairpin on"), "{d}");
        let br = node.ns.ip(&["addr", "show", "cni0"]);
        assert!(
            br.contains("10.244.1.1/24") && br.contains("mtu 1450") && br.contains("UP"),
            "{br}"
        );
        let a = addr.split('/').next().unwrap();
        assert_eq!(node.ipam_files()[a], format!("{id}\neth0\ntwill\n"));

        // CHECK passes, then fails naming what is missing.
        ok(cni("CHECK", &id, &pod.path(), &with_prev(&conf, &r)));
        pod.ip(&["route", "del", "default"]);
        let o = cni("CHECK", &id, &pod.path(), &with_prev(&conf, &r));
        assert_eq!(code(&o), 104);
        assert!(o.json.unwrap()["msg"]
            .as_str()
            .unwrap()
            .contains("route 0.0.0.0/0 via 10.244.1.1"));
        let o = cni("CHECK", &id, &pod.path(), &conf);
        assert_eq!(code(&o), 7, "CHECK without prevResult");

        assert!(ok(cni("DEL", &id, &pod.path(), &with_prev(&conf, &r))).is_none());
        assert!(!sh(&["ip", "-n", &pod.name, "link", "show", "eth0"]).0);
        assert!(node.host_links().is_empty());
        assert!(!node.ipam_files().contains_key(a));
        ok(cni("DEL", &id, &pod.path(), &conf));
    }
    assert!(node.metrics.cni_requests.load(Ordering::Relaxed) >= 15);
    assert!(node.metrics.cni_errors.load(Ordering::Relaxed) >= 6);
}

#[test]
fn add_twice_with_the_same_ifname_fails_and_keeps_the_first() {
    let mut node = Node::start(Some(subnet()));
    let pod = node.pod();
    let conf = node.conf("1.0.0");
    let r = ok(cni("ADD", "dup", &pod.path(), &conf)).unwrap();
    let addr = r["ips"][0]["address"].as_str().unwrap().to_string();
    let errors = node.metrics.cni_errors.load(Ordering::Relaxed);
    let o = cni("ADD", "dup", &pod.path(), &conf);
    assert_eq!(code(&o), 101);
    assert!(o.json.unwrap()["msg"]
        .as_str()
        .unwrap()
        .contains("eth0 already exists"));
    // Another container id, same netns and ifname: also refused, nothing leaked.
    let o = cni("ADD", "other", &pod.path(), &conf);
    assert_eq!(code(&o), 101);
    assert_eq!(node.metrics.cni_errors.load(Ordering::Relaxed), errors + 2);
    assert_eq!(pod_addr(&pod).as_deref(), Some(addr.as_str()));
    assert_eq!(node.ipam_files().len(), 1);
    assert_eq!(node.host_links().len(), 1);
    // The runtime cleans up the refused container: that must not touch the first one's eth0.
    ok(cni("DEL", "other", &pod.path(), &conf));
    assert_eq!(pod_addr(&pod).as_deref(), Some(addr.as_str()));
    assert_eq!(node.host_links().len(), 1);
    ok(cni("CHECK", "dup", &pod.path(), &with_prev(&conf, &r)));
    ok(cni("DEL", "dup", &pod.path(), &conf));
    assert!(node.ipam_files().is_empty());
}

#[test]
fn del_is_idempotent_and_tolerant() {
    let mut node = Node::start(Some(subnet()));
    let conf = node.conf("1.1.0");
    // Unknown container, with and without a netns.
    let pod = node.pod();
    ok(cni("DEL", "never-added", &pod.path(), &conf));
    ok(cni("DEL", "never-added", "", &conf));
    ok(cni(
        "DEL",
        "never-added",
        "/run/netns/twc-does-not-exist",
        &conf,
    ));

    // Empty CNI_NETNS (containerd): the pair goes from the host side, the address is freed.
    ok(cni("ADD", "c-empty", &pod.path(), &conf));
    assert_eq!(node.ipam_files().len(), 1);
    ok(cni("DEL", "c-empty", "", &conf));
    assert!(node.ipam_files().is_empty());
    assert!(node.host_links().is_empty());
    assert!(!sh(&["ip", "-n", &pod.name, "link", "show", "eth0"]).0);
    ok(cni("DEL", "c-empty", "", &conf));

    // The netns is deleted before DEL.
    let pod2 = node.pod();
    ok(cni("ADD", "c-gone", &pod2.path(), &conf));
    let path = pod2.path();
    drop(pod2);
    ok(cni("DEL", "c-gone", &path, &conf));
    ok(cni("DEL", "c-gone", &path, &conf));
    assert!(node.ipam_files().is_empty());
    assert!(node.host_links().is_empty());
}

#[test]
fn not_ready_then_status_gc() {
    let mut node = Node::start(None);
    let conf = node.conf("1.1.0");
    let pod = node.pod();
    assert_eq!(code(&twill(&[("CNI_COMMAND", "STATUS")], &conf)), 50);
    let o = cni("ADD", "early", &pod.path(), &conf);
    assert_eq!(code(&o), 11);
    assert!(o.json.unwrap()["msg"]
        .as_str()
        .unwrap()
        .contains("not ready"));

    node.net_tx.send_replace(Some(subnet()));
    let st = twill(&[("CNI_COMMAND", "STATUS")], &conf);
    assert!(st.ok && st.raw.trim().is_empty(), "{st:?}");

    let pods: Vec<Netns> = (0..3).map(|_| node.pod()).collect();
    for (i, p) in pods.iter().enumerate() {
        ok(cni("ADD", &format!("g{i}"), &p.path(), &conf));
    }
    // Not ready again: DEL still releases.
    node.net_tx.send_replace(None);
    ok(cni("DEL", "g2", &pods[2].path(), &conf));
    assert_eq!(node.ipam_files().len(), 2);
    node.net_tx.send_replace(Some(subnet()));

    // Without the key nothing is released.
    let gc = twill(&[("CNI_COMMAND", "GC")], &conf);
    assert!(gc.ok && gc.raw.trim().is_empty(), "{gc:?}");
    assert_eq!(node.ipam_files().len(), 2);
    // A leaked allocation (no veth) and the valid list naming only g0.
    ok(cni("ADD", "g2", &pods[2].path(), &conf));
    // Another network's GC (another conflist naming twill) leaves this network's pods alone.
    let mut other = conf.clone();
    other["name"] = json!("other-net");
    other["cni.dev/valid-attachments"] = json!([]);
    ok(twill(&[("CNI_COMMAND", "GC")], &other));
    assert_eq!(node.ipam_files().len(), 3);
    assert!(pod_addr(&pods[1]).is_some());
    // A flow of g1's that the node tracks (a conntrack hook in the node's netns, a ping to
    // the gateway): GC takes it with the address.
    let g1 = pod_addr(&pods[1]).unwrap();
    let g1 = g1.split('/').next().unwrap().to_string();
    assert!(
        sh(&[
            "ip",
            "netns",
            "exec",
            &node.ns.name,
            "nft",
            "add table inet track; add chain inet track inp { type filter hook input priority 0; }; \
         add rule inet track inp ct state new accept"
        ])
        .0
    );
    assert!(
        sh(&[
            "ip",
            "netns",
            "exec",
            &pods[1].name,
            "ping",
            "-c",
            "1",
            "-W",
            "2",
            "10.244.1.1"
        ])
        .0
    );
    let tracked = || {
        let (_, t) = sh(&[
            "ip",
            "netns",
            "exec",
            &node.ns.name,
            "cat",
            "/proc/net/nf_conntrack",
        ]);
        t.lines()
            .filter(|l| l.contains(&format!("src={g1} ")))
            .count()
    };
    assert!(tracked() > 0, "the node tracks no flow of g1's");
    let mut c = conf.clone();
    c["cni.dev/valid-attachments"] = json!([{"containerID": "g0", "ifname": "eth0"}]);
    ok(twill(&[("CNI_COMMAND", "GC")], &c));
    assert_eq!(tracked(), 0, "g1's conntrack entries outlived GC");
    let files = node.ipam_files();
    assert_eq!(files.len(), 1, "{files:?}");
    assert_eq!(files.values().next().unwrap(), "g0\neth0\ntwill\n");
    // GC also removed the stale pods' veths, so their addresses cannot be duplicated.
    assert!(pod_addr(&pods[0]).is_some());
    assert!(pod_addr(&pods[1]).is_none());
    assert!(pod_addr(&pods[2]).is_none());
    // The older key name works too; an empty list releases everything.
    let mut c = conf.clone();
    c["cni.dev/attachments"] = json!([]);
    ok(twill(&[("CNI_COMMAND", "GC")], &c));
    assert!(node.ipam_files().is_empty());
}

#[test]
fn dual_stack_add_check_del_gives_both_families_and_releases_both() {
    let mut node = Node::start(Some(NodeNet {
        subnet6: Some("fd00:10:244:1::/64".parse().unwrap()),
        mtu: 1430,
        ..subnet()
    }));
    for v in ["0.4.0", "1.1.0"] {
        let conf = node.conf(v);
        let (a, b) = (node.pod(), node.pod());
        let id = format!("dual-{}", v.replace('.', ""));
        let r = ok(cni("ADD", &id, &a.path(), &conf)).expect("ADD prints a result");
        let ips = r["ips"].as_array().unwrap();
        assert_eq!(ips.len(), 2, "{r}");
        let (v4, v6) = (&ips[0], &ips[1]);
        assert!(
            v4["address"].as_str().unwrap().starts_with("10.244.1."),
            "{r}"
        );
        assert_eq!(v6["gateway"], "fd00:10:244:1::1", "{r}");
        assert_eq!(v6["interface"], 1, "{r}");
        let addr6 = v6["address"].as_str().unwrap().to_string();
        assert!(
            addr6.starts_with("fd00:10:244:1::") && addr6.ends_with("/64"),
            "{r}"
        );
        if v == "0.4.0" {
            assert_eq!(
                (&v4["version"], &v6["version"]),
                (&json!("4"), &json!("6")),
                "{r}"
            );
        }
        assert_eq!(
            r["routes"],
            json!([{"dst": "0.0.0.0/0", "gw": "10.244.1.1"}, {"dst": "::/0", "gw": "fd00:10:244:1::1"}])
        );
        // The kernel agrees: the address without DAD holding it back, the default route, the
        // bridge's v6 gateway.
        let addrs = a.ip(&["-6", "addr", "show", "dev", "eth0"]);
        assert!(addrs.contains(&format!("inet6 {addr6}")), "{addrs}");
        assert!(!addrs.contains("tentative"), "{addrs}");
        assert!(a
            .ip(&["-6", "route"])
            .contains("default via fd00:10:244:1::1 dev eth0"));
        let br = node.ns.ip(&["-6", "addr", "show", "cni0"]);
        assert!(br.contains("fd00:10:244:1::1/64"), "{br}");
        // A second pod, reached over IPv6 on the bridge.
        let rb = ok(cni("ADD", &format!("{id}b"), &b.path(), &conf)).unwrap();
        let b6 = rb["ips"][1]["address"].as_str().unwrap();
        let b6 = b6.split('/').next().unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let (good, out) = sh(&[
                "ip", "netns", "exec", &a.name, "ping", "-6", "-c", "1", "-W", "1", b6,
            ]);
            if good {
                break;
            }
            assert!(Instant::now() < deadline, "pod a cannot ping6 {b6}: {out}");
        }
        // CHECK passes, then names the missing v6 route.
        ok(cni("CHECK", &id, &a.path(), &with_prev(&conf, &r)));
        a.ip(&["-6", "route", "del", "default"]);
        let o = cni("CHECK", &id, &a.path(), &with_prev(&conf, &r));
        assert_eq!(code(&o), 104);
        let msg = o.json.unwrap()["msg"].as_str().unwrap().to_string();
        assert!(msg.contains("route ::/0 via fd00:10:244:1::1"), "{msg}");
        // DEL releases both addresses.
        let v6dir = node.dir.0.join("state/ipam/fd00:10:244:1::-64");
        let held = |dir: &Path| std::fs::read_dir(dir).map_or(0, |d| d.count());
        assert_eq!(held(&v6dir), 2);
        ok(cni("DEL", &id, &a.path(), &conf));
        ok(cni("DEL", &format!("{id}b"), &b.path(), &conf));
        assert_eq!(held(&v6dir), 0);
        assert!(node.ipam_files().is_empty());
    }
    // A pod with an IPv6 default route of its own keeps it: the result lists the IPv4 default
    // route this ADD made, and not the IPv6 one it did not.
    let conf = node.conf("1.1.0");
    let c = node.pod();
    c.ip(&["-6", "route", "add", "default", "dev", "lo"]);
    let r = ok(cni("ADD", "dual-own-route", &c.path(), &conf)).unwrap();
    assert_eq!(
        r["routes"],
        json!([{"dst": "0.0.0.0/0", "gw": "10.244.1.1"}]),
        "{r}"
    );
    ok(cni(
        "CHECK",
        "dual-own-route",
        &c.path(),
        &with_prev(&conf, &r),
    ));
    ok(cni("DEL", "dual-own-route", &c.path(), &conf));
}

/// An IPv6-only node: pods get one IPv6 address (0.4.0 results carry its version), the IPv6
/// default route, no IPv4 at all; CHECK verifies them and DEL releases the address.
#[test]
fn ipv6_only_add_check_del() {
    let mut node = Node::start(Some(NodeNet {
        subnet: None,
        subnet6: Some("fd00:10:244:1::/64".parse().unwrap()),
        mtu: 1430,
    }));
    for v in ["0.4.0", "1.1.0"] {
        let conf = node.conf(v);
        let (a, b) = (node.pod(), node.pod());
        let id = format!("only6-{}", v.replace('.', ""));
        let r = ok(cni("ADD", &id, &a.path(), &conf)).expect("ADD prints a result");
        let ips = r["ips"].as_array().unwrap();
        assert_eq!(ips.len(), 1, "{r}");
        let addr6 = ips[0]["address"].as_str().unwrap().to_string();
        assert!(
            addr6.starts_with("fd00:10:244:1::") && addr6.ends_with("/64"),
            "{r}"
        );
        assert_eq!(ips[0]["gateway"], "fd00:10:244:1::1", "{r}");
        assert_eq!(ips[0]["interface"], 1, "{r}");
        if v == "0.4.0" {
            assert_eq!(ips[0]["version"], "6", "{r}");
        }
        assert_eq!(
            r["routes"],
            json!([{"dst": "::/0", "gw": "fd00:10:244:1::1"}])
        );
        // The kernel agrees: no IPv4 address in the pod or on the bridge.
        assert!(!a
            .ip(&["-4", "addr", "show", "dev", "eth0"])
            .contains("inet "));
        assert!(a
            .ip(&["-6", "route"])
            .contains("default via fd00:10:244:1::1 dev eth0"));
        let br = node.ns.ip(&["addr", "show", "cni0"]);
        assert!(br.contains("fd00:10:244:1::1/64"), "{br}");
        assert!(!br.contains("inet "), "{br}");
        // A second pod, reached over IPv6 on the bridge.
        let rb = ok(cni("ADD", &format!("{id}b"), &b.path(), &conf)).unwrap();
        let b6 = rb["ips"][0]["address"].as_str().unwrap();
        let b6 = b6.split('/').next().unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let (good, out) = sh(&[
                "ip", "netns", "exec", &a.name, "ping", "-6", "-c", "1", "-W", "1", b6,
            ]);
            if good {
                break;
            }
            assert!(Instant::now() < deadline, "pod a cannot ping6 {b6}: {out}");
        }
        ok(cni("CHECK", &id, &a.path(), &with_prev(&conf, &r)));
        a.ip(&["-6", "route", "del", "default"]);
        let o = cni("CHECK", &id, &a.path(), &with_prev(&conf, &r));
        assert_eq!(code(&o), 104);
        let v6dir = node.dir.0.join("state/ipam/fd00:10:244:1::-64");
        let held = |dir: &Path| std::fs::read_dir(dir).map_or(0, |d| d.count());
        assert_eq!(held(&v6dir), 2);
        ok(cni("DEL", &id, &a.path(), &conf));
        ok(cni("DEL", &format!("{id}b"), &b.path(), &conf));
        assert_eq!(held(&v6dir), 0);
        assert!(node.ipam_files().is_empty());
    }
}

#[test]
fn pods_on_one_bridge_reach_each_other() {
    let mut node = Node::start(Some(subnet()));
    let conf = node.conf("1.0.0");
    let a = node.pod();
    let b = node.pod();
    ok(cni("ADD", "pa", &a.path(), &conf));
    let rb = ok(cni("ADD", "pb", &b.path(), &conf)).unwrap();
    let ipb = rb["ips"][0]["address"]
        .as_str()
        .unwrap()
        .split('/')
        .next()
        .unwrap()
        .to_string();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (good, out) = sh(&[
            "ip", "netns", "exec", &a.name, "ping", "-c", "1", "-W", "1", &ipb,
        ]);
        if good {
            break;
        }
        assert!(Instant::now() < deadline, "pod a cannot ping {ipb}: {out}");
    }
    sh_ok(&[
        "ip",
        "netns",
        "exec",
        &b.name,
        "ping",
        "-c",
        "1",
        "-W",
        "2",
        "10.244.1.1",
    ]);
    ok(cni("DEL", "pa", &a.path(), &conf));
    ok(cni("DEL", "pb", &b.path(), &conf));
}

fn parallel<T: Send + 'static>(n: usize, f: impl Fn(usize) -> T + Send + Sync + 'static) -> Vec<T> {
    let f = Arc::new(f);
    let hs: Vec<_> = (0..n)
        .map(|i| {
            let f = f.clone();
            std::thread::spawn(move || f(i))
        })
        .collect();
    hs.into_iter().map(|h| h.join().unwrap()).collect()
}

#[test]
fn hundred_parallel_adds_then_dels() {
    let mut node = Node::start(Some(subnet()));
    let conf = node.conf("1.0.0");
    let pods: Vec<String> = (0..100)
        .map(|_| node.pod())
        .map(|p| {
            let path = p.path();
            std::mem::forget(p); // removed below by name, after the DELs
            path
        })
        .collect();
    let pods = Arc::new(pods);
    let (p2, c2) = (pods.clone(), conf.clone());
    let results = parallel(100, move |i| cni("ADD", &format!("par{i}"), &p2[i], &c2));
    let mut addrs = HashSet::new();
    for r in results {
        let v = ok(r).unwrap();
        assert!(addrs.insert(v["ips"][0]["address"].as_str().unwrap().to_string()));
    }
    assert_eq!(addrs.len(), 100);
    assert_eq!(node.ipam_files().len(), 100);
    assert_eq!(node.host_links().len(), 100);
    let (p2, c2) = (pods.clone(), conf.clone());
    for r in parallel(100, move |i| cni("DEL", &format!("par{i}"), &p2[i], &c2)) {
        ok(r);
    }
    assert!(node.ipam_files().is_empty());
    assert!(node.host_links().is_empty());
    for p in pods.iter() {
        let _ = sh(&["ip", "netns", "del", p.trim_start_matches("/run/netns/")]);
    }
}

#[test]
fn restart_mid_burst_never_duplicates_addresses() {
    let mut node = Node::start(Some(subnet()));
    let conf = node.conf("1.1.0");
    let pods: Vec<Netns> = (0..30).map(|_| node.pod()).collect();
    let paths: Arc<Vec<String>> = Arc::new(pods.iter().map(|p| p.path()).collect());
    // Ten complete, then twenty more in flight when the plug is pulled.
    let (p2, c2) = (paths.clone(), conf.clone());
    let mut results = parallel(10, move |i| cni("ADD", &format!("k{i}"), &p2[i], &c2));
    let (p2, c2) = (paths.clone(), conf.clone());
    let burst = std::thread::spawn(move || {
        parallel(20, move |i| {
            cni("ADD", &format!("k{}", i + 10), &p2[i + 10], &c2)
        })
    });
    let deadline = Instant::now() + Duration::from_secs(60);
    while node.ipam_files().len() < 14 {
        assert!(Instant::now() < deadline, "the burst made no progress");
        std::thread::sleep(Duration::from_millis(5));
    }
    node.stop();
    results.extend(burst.join().unwrap());
    node.serve();

    let succeeded: Vec<usize> = (0..30).filter(|i| results[*i].ok).collect();
    eprintln!(
        "{} of 30 ADDs completed before the restart",
        succeeded.len()
    );
    assert!(succeeded.len() >= 10);
    // Every address a pod actually has is held, by that pod, and by no one else.
    let files = node.ipam_files();
    let mut seen = HashSet::new();
    for (i, p) in pods.iter().enumerate() {
        if let Some(a) = pod_addr(p) {
            let ip = a.split('/').next().unwrap().to_string();
            assert!(seen.insert(ip.clone()), "{ip} configured twice");
            assert_eq!(
                files.get(&ip).map(String::as_str),
                Some(format!("k{i}\neth0\ntwill\n").as_str())
            );
        }
    }
    for i in &succeeded {
        assert!(
            pod_addr(&pods[*i]).is_some(),
            "k{i} succeeded but has no address"
        );
    }

    // GC with what the runtime believes exists, then retry the failed ones (DEL first, as a
    // runtime does after a failed ADD).
    let valid: Vec<Value> = succeeded
        .iter()
        .map(|i| json!({"containerID": format!("k{i}"), "ifname": "eth0"}))
        .collect();
    let mut c = conf.clone();
    c["cni.dev/valid-attachments"] = Value::Array(valid);
    ok(twill(&[("CNI_COMMAND", "GC")], &c));
    assert_eq!(node.ipam_files().len(), succeeded.len());
    // GC took the half-built pods' veths along with their addresses.
    for i in (0..30).filter(|i| !succeeded.contains(i)) {
        assert_eq!(pod_addr(&pods[i]), None, "k{i} kept an address GC released");
    }
    for i in (0..30).filter(|i| !succeeded.contains(i)) {
        ok(cni("DEL", &format!("k{i}"), &pods[i].path(), &conf));
        ok(cni("ADD", &format!("k{i}"), &pods[i].path(), &conf));
    }
    let mut all = HashSet::new();
    for p in &pods {
        assert!(all.insert(pod_addr(p).expect("every pod has an address")));
    }
    assert_eq!(node.ipam_files().len(), 30);
    for (i, p) in pods.iter().enumerate() {
        ok(cni("DEL", &format!("k{i}"), &p.path(), &conf));
    }
    assert!(node.ipam_files().is_empty());
}

/// Runs a reference plugin in the node netns, as a runtime on the node would.
fn plugin(node: &Node, ty: &str, cmd: &str, id: &str, netns: &str, stdin: &Value) -> Out {
    let exe = if ty == "twill" {
        BIN.to_string()
    } else {
        format!("/usr/lib/cni/{ty}")
    };
    let mut c = Command::new("nsenter");
    c.arg(format!("--net={}", node.ns.path()))
        .arg(&exe)
        .env_clear()
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        .env("CNI_COMMAND", cmd)
        .env("CNI_CONTAINERID", id)
        .env("CNI_NETNS", netns)
        .env("CNI_IFNAME", "eth0")
        .env("CNI_PATH", "/usr/lib/cni");
    // The reference plugins explain failures on stderr: keep it with the output.
    let (mut out, stderr) = exec(c, stdin);
    out.raw.push_str(&stderr);
    out
}

#[test]
fn chained_with_reference_plugins() {
    if !Path::new("/usr/lib/cni/portmap").exists() {
        panic!("containernetworking-plugins is not installed (/usr/lib/cni/portmap)");
    }
    let mut node = Node::start(Some(subnet()));
    let pod = node.pod();
    let socket = node.socket.to_str().unwrap().to_string();
    let conflist = json!({"cniVersion": "1.0.0", "name": "twill", "plugins": [
        {"type": "twill", "socket": socket},
        {"type": "portmap", "capabilities": {"portMappings": true}},
        {"type": "tuning", "sysctl": {"net.core.somaxconn": "777"}},
        {"type": "bandwidth", "capabilities": {"bandwidth": true}}]});
    let runtime_config = json!({"portMappings": [{"hostPort": 18080, "containerPort": 80, "protocol": "tcp"}],
                                "bandwidth": {"ingressRate": 1000000, "ingressBurst": 100000}});
    let stdin_for = |p: &Value, prev: Option<&Value>| {
        let mut c = p.clone();
        c["cniVersion"] = conflist["cniVersion"].clone();
        c["name"] = conflist["name"].clone();
        if let Some(caps) = p.get("capabilities").and_then(Value::as_object) {
            let rc: serde_json::Map<String, Value> = caps
                .keys()
                .filter_map(|k| runtime_config.get(k).map(|v| (k.clone(), v.clone())))
                .collect();
            c["runtimeConfig"] = Value::Object(rc);
        }
        if let Some(prev) = prev {
            c["prevResult"] = prev.clone();
        }
        c
    };
    let plugins = conflist["plugins"].as_array().unwrap().clone();
    let mut prev: Option<Value> = None;
    for p in &plugins {
        let ty = p["type"].as_str().unwrap();
        let o = plugin(
            &node,
            ty,
            "ADD",
            "chain1",
            &pod.path(),
            &stdin_for(p, prev.as_ref()),
        );
        assert!(o.ok, "{ty} ADD failed: {}", o.raw);
        prev = o.json;
    }
    let result = prev.clone().unwrap();
    let addr = result["ips"][0]["address"]
        .as_str()
        .unwrap()
        .split('/')
        .next()
        .unwrap()
        .to_string();
    let host = result["interfaces"][0]["name"]
        .as_str()
        .unwrap()
        .to_string();
    let nat = sh_ok(&[
        "ip",
        "netns",
        "exec",
        &node.ns.name,
        "iptables",
        "-t",
        "nat",
        "-S",
    ]);
    assert!(
        nat.contains(&format!("{addr}:80")),
        "portmap DNAT missing: {nat}"
    );
    let somax = sh_ok(&[
        "ip",
        "netns",
        "exec",
        &pod.name,
        "cat",
        "/proc/sys/net/core/somaxconn",
    ]);
    assert_eq!(somax.trim(), "777");
    let tc = sh_ok(&["tc", "-n", &node.ns.name, "qdisc", "show", "dev", &host]);
    assert!(tc.contains("tbf"), "bandwidth did not shape {host}: {tc}");

    // CHECK through the chain, then DEL in reverse order with the final result.
    for p in &plugins {
        let ty = p["type"].as_str().unwrap();
        // Debian's portmap CHECK looks for an IPv6 DNAT chain even for IPv4-only results and
        // always fails ("could not check ipv6 dnat"); the runtime-facing chain is ADD/DEL.
        if ty == "portmap" {
            continue;
        }
        let o = plugin(
            &node,
            ty,
            "CHECK",
            "chain1",
            &pod.path(),
            &stdin_for(p, Some(&result)),
        );
        assert!(o.ok, "{ty} CHECK failed: {}", o.raw);
    }
    for p in plugins.iter().rev() {
        let ty = p["type"].as_str().unwrap();
        let o = plugin(
            &node,
            ty,
            "DEL",
            "chain1",
            &pod.path(),
            &stdin_for(p, Some(&result)),
        );
        assert!(o.ok, "{ty} DEL failed: {}", o.raw);
    }
    let nat = sh_ok(&[
        "ip",
        "netns",
        "exec",
        &node.ns.name,
        "iptables",
        "-t",
        "nat",
        "-S",
    ]);
    assert!(
        !nat.contains(&format!("{addr}:80")),
        "portmap DNAT left behind: {nat}"
    );
    assert!(node.ipam_files().is_empty());
    assert!(node.host_links().is_empty());
}

#[test]
fn subnet_full_and_subnet_change() {
    let small = NodeNet {
        subnet: Some("10.244.7.0/29".parse().unwrap()),
        subnet6: None,
        mtu: 1450,
    };
    let mut node = Node::start(Some(small));
    let conf = node.conf("1.0.0");
    let pods: Vec<Netns> = (0..6).map(|_| node.pod()).collect();
    let mut got = Vec::new();
    for (i, p) in pods.iter().enumerate().take(5) {
        let r = ok(cni("ADD", &format!("f{i}"), &p.path(), &conf)).unwrap();
        got.push(r["ips"][0]["address"].as_str().unwrap().to_string());
    }
    assert_eq!(
        got,
        [
            "10.244.7.2/29",
            "10.244.7.3/29",
            "10.244.7.4/29",
            "10.244.7.5/29",
            "10.244.7.6/29"
        ]
    );
    let o = cni("ADD", "f5", &pods[5].path(), &conf);
    assert_eq!(code(&o), 100);
    let m = o.json.unwrap()["msg"].as_str().unwrap().to_string();
    assert!(m.contains("10.244.7.0/29") && m.contains('5'), "{m}");
    // The failed ADD left nothing behind.
    assert!(!sh(&["ip", "-n", &pods[5].name, "link", "show", "eth0"]).0);
    assert_eq!(node.host_links().len(), 5);

    // The node's subnet changes: new pods come from the new one, old pods still DEL cleanly.
    node.net_tx.send_replace(Some(subnet()));
    let r = ok(cni("ADD", "f5", &pods[5].path(), &conf)).unwrap();
    assert!(r["ips"][0]["address"]
        .as_str()
        .unwrap()
        .starts_with("10.244.1."));
    ok(cni("DEL", "f0", &pods[0].path(), &conf));
    let old = node.dir.0.join("state/ipam/10.244.7.0-29");
    assert_eq!(std::fs::read_dir(&old).unwrap().count(), 4);
    let mut c = node.conf("1.1.0");
    c["cni.dev/valid-attachments"] = json!([{"containerID": "f5", "ifname": "eth0"}]);
    ok(twill(&[("CNI_COMMAND", "GC")], &c));
    assert_eq!(std::fs::read_dir(&old).unwrap().count(), 0);
    assert_eq!(node.ipam_files().len(), 1);
}

fn raw_exchange(socket: &Path, bytes: &[u8]) -> twill_proto::Response {
    let mut s = std::os::unix::net::UnixStream::connect(socket).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    s.write_all(bytes).unwrap();
    twill_proto::read_frame(&mut s).unwrap()
}

fn raw_err(r: twill_proto::Response) -> twill_proto::CniError {
    match r {
        twill_proto::Response::Err(e) => e,
        other => panic!("expected an error, got {other:?}"),
    }
}

#[test]
fn bad_clients_are_refused_and_never_stall_others() {
    use std::os::unix::process::CommandExt;

    let mut node = Node::start(Some(subnet()));
    let conf = node.conf("1.1.0");
    let mode = std::fs::metadata(&node.socket).unwrap();
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&mode.permissions()) & 0o777,
        0o600
    );

    // Oversized and malformed frames get an error, not a crash.
    let huge = ((twill_proto::MAX_FRAME + 1) as u32).to_be_bytes();
    let e = raw_err(raw_exchange(&node.socket, &huge));
    assert_eq!(e.code, 6);
    assert!(e.msg.contains("exceeds"), "{}", e.msg);
    let mut garbage = 7u32.to_be_bytes().to_vec();
    garbage.extend_from_slice(b"{nope!}");
    assert_eq!(raw_err(raw_exchange(&node.socket, &garbage)).code, 6);
    let mut req = twill_proto::Request {
        protocol: 99,
        command: twill_proto::Command::Status,
        container_id: String::new(),
        netns: String::new(),
        ifname: String::new(),
        args: String::new(),
        path: String::new(),
        config: conf.clone(),
    };
    let frame = twill_proto::encode_frame(&req).unwrap();
    assert_eq!(raw_err(raw_exchange(&node.socket, &frame)).code, 1);
    req.protocol = twill_proto::PROTOCOL;
    let frame = twill_proto::encode_frame(&req).unwrap();
    assert_eq!(
        raw_exchange(&node.socket, &frame),
        twill_proto::Response::Ok(None)
    );
    req.command = twill_proto::Command::Version;
    let frame = twill_proto::encode_frame(&req).unwrap();
    assert_eq!(
        raw_exchange(&node.socket, &frame),
        twill_proto::Response::Ok(Some(
            json!({"cniVersion": "1.1.0", "supportedVersions": ["0.4.0", "1.0.0", "1.1.0"]})
        ))
    );

    // A client that connects and sends nothing does not hold up anyone.
    let _stalled: Vec<_> = (0..4)
        .map(|_| std::os::unix::net::UnixStream::connect(&node.socket).unwrap())
        .collect();
    let pod = node.pod();
    ok(cni("ADD", "alive", &pod.path(), &conf));

    // A FIFO as CNI_NETNS is refused without hanging the daemon.
    let fifo = node.dir.0.join("fifo");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
    let o = cni("ADD", "fifo", fifo.to_str().unwrap(), &conf);
    assert_eq!(code(&o), 5, "{o:?}");
    assert_eq!(node.ipam_files().len(), 1);

    // Non-root peers are refused (socket opened up so the connect itself succeeds).
    std::fs::set_permissions(
        &node.socket,
        std::os::unix::fs::PermissionsExt::from_mode(0o666),
    )
    .unwrap();
    let mut child = Command::new(BIN)
        .env_clear()
        .env("CNI_COMMAND", "STATUS")
        .uid(65534)
        .gid(65534)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(conf.to_string().as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(!out.status.success());
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["code"], 103, "{v}");
    assert!(v["msg"].as_str().unwrap().contains("65534"));

    ok(cni("DEL", "alive", &pod.path(), &conf));
    assert!(node.ipam_files().is_empty());
}

#[test]
fn failed_add_undoes_everything() {
    let mut node = Node::start(Some(subnet()));
    let conf = node.conf("1.0.0");
    // The pod's netns has no rule to look up the main table, so the kernel finds our gateway
    // unreachable: the default route fails after the veth, address and link state are in
    // place, and ADD must take all of it back.
    let pod = node.pod();
    pod.ip(&["rule", "del", "pref", "32766"]);
    let o = cni("ADD", "rb", &pod.path(), &conf);
    assert_eq!(code(&o), 102);
    assert!(o.json.unwrap()["msg"]
        .as_str()
        .unwrap()
        .contains("default route"));
    assert!(
        !sh(&["ip", "-n", &pod.name, "link", "show", "eth0"]).0,
        "half-built eth0 left"
    );
    assert!(
        node.host_links().is_empty(),
        "host veth left: {:?}",
        node.host_links()
    );
    assert!(node.ipam_files().is_empty(), "address not released");
    // The runtime's DEL after the failure is fine too.
    ok(cni("DEL", "rb", &pod.path(), &conf));

    // A non-bridge device squatting the bridge name: clear error, nothing left behind.
    let mut node2 = Node::start(Some(subnet()));
    node2.ns.ip(&[
        "link", "add", "name", "cni0", "type", "veth", "peer", "name", "cni0p",
    ]);
    let pod2 = node2.pod();
    let o = cni("ADD", "nb", &pod2.path(), &node2.conf("1.0.0"));
    assert_eq!(code(&o), 102);
    assert!(o.json.unwrap()["msg"]
        .as_str()
        .unwrap()
        .contains("not a bridge"));
    assert!(node2.ipam_files().is_empty());
    assert!(!sh(&["ip", "-n", &pod2.name, "link", "show", "eth0"]).0);
}

#[test]
fn a_bridge_deleted_or_stripped_by_hand_is_rebuilt() {
    let mut node = Node::start(Some(subnet()));
    let conf = node.conf("1.0.0");
    let a = node.pod();
    ok(cni("ADD", "bra", &a.path(), &conf));
    // Someone deletes the bridge between two ADDs: the next ADD rebuilds it and attaches.
    node.ns.ip(&["link", "del", "cni0"]);
    let b = node.pod();
    ok(cni("ADD", "brb", &b.path(), &conf));
    let shown = node.ns.ip(&["-o", "link", "show", "master", "cni0"]);
    assert!(
        shown.contains("tw"),
        "the new pod's veth is not on a rebuilt cni0: {shown}"
    );
    let addrs = node.ns.ip(&["-4", "-o", "addr", "show", "dev", "cni0"]);
    assert!(
        addrs.contains("10.244.1.1/24"),
        "rebuilt bridge lacks the gateway: {addrs}"
    );
}

/// One slow request holds up no other. The slow one is real: a CHECK of a pod whose netns has
/// 300,000 routes, which twilld lists in full (about a second). ADDs for other pods, sent while
/// it runs, all complete before it does; a daemon that served one request at a time (or held a
/// lock across a request) would finish the CHECK first.
#[test]
fn a_slow_request_holds_up_no_other() {
    let mut node = Node::start(Some(subnet()));
    let conf = node.conf("1.0.0");
    let slow = node.pod();
    let r = ok(cni("ADD", "slow", &slow.path(), &conf)).expect("ADD");
    let batch = node.dir.0.join("routes.batch");
    let routes: String = (0..300_000u32)
        .map(|i| {
            format!(
                "route add 10.{}.{}.{}/32 dev eth0\n",
                100 + (i >> 16),
                (i >> 8) & 255,
                i & 255
            )
        })
        .collect();
    std::fs::write(&batch, routes).unwrap();
    slow.ip(&["-batch", batch.to_str().unwrap()]);
    let check_conf = with_prev(&conf, &r);
    let path = slow.path();
    let t0 = Instant::now();
    let check = std::thread::spawn(move || cni("CHECK", "slow", &path, &check_conf));
    // Let the CHECK reach twilld (an exec and a connect) and start listing.
    std::thread::sleep(Duration::from_millis(100));
    let pods: Vec<Netns> = (0..5).map(|_| node.pod()).collect();
    for (k, p) in pods.iter().enumerate() {
        assert!(ok(cni("ADD", &format!("quick{k}"), &p.path(), &conf)).is_some());
        assert!(!check.is_finished(), "ADD {k} waited for the slow CHECK");
    }
    let adds = t0.elapsed();
    let out = check.join().unwrap();
    eprintln!("5 ADDs done after {adds:?}, CHECK after {:?}", t0.elapsed());
    assert!(ok(out).is_none(), "CHECK of an intact pod succeeds");
}

/// A pod attached to another network first already has a default route. The reference plugins
/// let the first one win; so does twill: ADD succeeds without its own default route, says so in
/// its result (no routes), and CHECK and DEL work with that result.
#[test]
fn a_pod_with_a_default_route_keeps_it() {
    let mut node = Node::start(Some(subnet()));
    let conf = node.conf("1.0.0");
    let pod = node.pod();
    pod.ip(&[
        "link", "add", "other0", "type", "veth", "peer", "name", "other1",
    ]);
    pod.ip(&["addr", "add", "192.0.2.2/24", "dev", "other0"]);
    pod.ip(&["link", "set", "other0", "up"]);
    pod.ip(&["route", "add", "default", "via", "192.0.2.1"]);
    let r = ok(cni("ADD", "second-net", &pod.path(), &conf)).expect("ADD");
    assert_eq!(r["routes"], json!([]), "{r}");
    assert!(pod_addr(&pod).is_some());
    let routes = pod.ip(&["route", "show", "default"]);
    assert!(routes.contains("via 192.0.2.1 dev other0"), "{routes}");
    assert!(!routes.contains("10.244.1.1"), "{routes}");
    assert!(ok(cni(
        "CHECK",
        "second-net",
        &pod.path(),
        &with_prev(&conf, &r)
    ))
    .is_none());
    assert!(ok(cni("DEL", "second-net", &pod.path(), &with_prev(&conf, &r))).is_none());
    assert!(node.ipam_files().is_empty());
}

/// A node moving from flannel keeps the pods flannel's CNI made: the addresses host-local (the
/// reference plugin, run here for real) reserved in the node's subnet are never handed out,
/// and DEL of such a pod, which the runtime now sends to twill, releases its reservation.
#[test]
fn addresses_host_local_handed_out_stay_taken_until_del() {
    let mut node = Node::start(Some(subnet()));
    let data = node.dir.0.join("host-local");
    let flannel_conf = json!({"cniVersion": "1.0.0", "name": "cbr0", "ipam": {
        "type": "host-local", "dataDir": data.to_str().unwrap(),
        "ranges": [[{"subnet": "10.244.1.0/24", "rangeStart": "10.244.1.2"}]]}});
    let mut held = Vec::new();
    for k in 0..3 {
        let out = plugin(
            &node,
            "host-local",
            "ADD",
            &format!("old{k}"),
            "/dev/null",
            &flannel_conf,
        );
        assert!(out.ok, "host-local ADD: {}", out.raw);
        let ip = out.json.unwrap()["ips"][0]["address"]
            .as_str()
            .unwrap()
            .to_string();
        held.push(ip.split('/').next().unwrap().to_string());
    }
    assert_eq!(held, ["10.244.1.2", "10.244.1.3", "10.244.1.4"]);
    let conf = node.conf("1.0.0");
    let pod = node.pod();
    let r = ok(cni("ADD", "new", &pod.path(), &conf)).expect("ADD");
    assert_eq!(r["ips"][0]["address"], "10.244.1.5/24", "{r}");
    // The runtime deletes an old pod through twill: host-local's file goes, only that one.
    assert!(ok(cni("DEL", "old1", "", &conf)).is_none());
    let left: Vec<String> = std::fs::read_dir(data.join("cbr0"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("10."))
        .collect();
    assert_eq!(left.len(), 2, "{left:?}");
    assert!(!left.contains(&"10.244.1.3".to_string()), "{left:?}");
    // Before the node knows its subnet (twilld starting), DEL of such a pod cannot tell whether
    // the reservation is ours: try again later, not an OK that leaves the file for good. A pod
    // host-local never saw is deleted as ever.
    let ready = node.net_tx.send_replace(None);
    let o = cni("DEL", "old2", "", &conf);
    assert_eq!(code(&o), 11, "{:?}", o.json);
    assert!(data.join("cbr0/10.244.1.4").exists());
    assert!(ok(cni("DEL", "never", "", &conf)).is_none());
    node.net_tx.send_replace(ready);
    assert!(ok(cni("DEL", "old2", "", &conf)).is_none());
    assert!(!data.join("cbr0/10.244.1.4").exists());
}

/// The same on an IPv6-only node: flannel's CNI ran host-local with the IPv6 subnet there.
#[test]
fn ipv6_addresses_host_local_handed_out_stay_taken_until_del() {
    let mut node = Node::start(Some(NodeNet {
        subnet: None,
        subnet6: Some("fd00:10:244:1::/64".parse().unwrap()),
        mtu: 1430,
    }));
    let data = node.dir.0.join("host-local");
    let flannel_conf = json!({"cniVersion": "1.0.0", "name": "cbr0", "ipam": {
        "type": "host-local", "dataDir": data.to_str().unwrap(),
        "ranges": [[{"subnet": "fd00:10:244:1::/64", "rangeStart": "fd00:10:244:1::2"}]]}});
    let mut held = Vec::new();
    for k in 0..3 {
        let out = plugin(
            &node,
            "host-local",
            "ADD",
            &format!("old{k}"),
            "/dev/null",
            &flannel_conf,
        );
        assert!(out.ok, "host-local ADD: {}", out.raw);
        let ip = out.json.unwrap()["ips"][0]["address"]
            .as_str()
            .unwrap()
            .to_string();
        held.push(ip.split('/').next().unwrap().to_string());
    }
    assert_eq!(
        held,
        ["fd00:10:244:1::2", "fd00:10:244:1::3", "fd00:10:244:1::4"]
    );
    let conf = node.conf("1.0.0");
    let pod = node.pod();
    let r = ok(cni("ADD", "new", &pod.path(), &conf)).expect("ADD");
    let got = r["ips"][0]["address"].as_str().unwrap().to_string();
    assert!(
        !held.iter().any(|h| got.starts_with(&format!("{h}/"))),
        "{got} is host-local's"
    );
    assert!(ok(cni("DEL", "old1", "", &conf)).is_none());
    let left: Vec<String> = std::fs::read_dir(data.join("cbr0"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("fd00:"))
        .collect();
    assert_eq!(left.len(), 2, "{left:?}");
    assert!(!left.contains(&"fd00:10:244:1::3".to_string()), "{left:?}");
}

fn request(
    command: twill_proto::Command,
    id: &str,
    netns: &str,
    ifname: &str,
    config: &Value,
) -> twill_proto::Request {
    twill_proto::Request {
        protocol: twill_proto::PROTOCOL,
        command,
        container_id: id.into(),
        netns: netns.into(),
        ifname: ifname.into(),
        args: String::new(),
        path: String::new(),
        config: config.clone(),
    }
}

fn send(socket: &Path, req: &twill_proto::Request) -> twill_proto::Response {
    raw_exchange(socket, &twill_proto::encode_frame(req).unwrap())
}

/// Any root process can speak the socket protocol, bypassing the plugin's checks: twilld
/// checks container ID, ifname and network name itself (libcni's rules, no control characters,
/// no edge whitespace), before anything is allocated or created. A newline or edge whitespace
/// would otherwise corrupt its one-per-line IPAM records.
#[test]
fn the_daemon_checks_identifiers_itself() {
    use twill_proto::Command::{Add, Check, Del, Gc};
    let mut node = Node::start(Some(subnet()));
    let conf = node.conf("1.1.0");
    let pod = node.pod();
    let path = pod.path();
    let mut cases: Vec<(twill_proto::Request, u32)> = Vec::new();
    for id in ["ctr\n1", " ctr1", "ctr1 ", "ctr\u{1}1", "-ctr"] {
        for cmd in [Add, Check, Del] {
            cases.push((request(cmd, id, &path, "eth0", &conf), 4));
        }
    }
    for ifname in [
        "eth0\n",
        " eth0",
        "eth0 ",
        "et\u{7f}h0",
        "a/b",
        "0123456789abcdef",
    ] {
        for cmd in [Add, Check, Del] {
            cases.push((request(cmd, "ctr1", &path, ifname, &conf), 4));
        }
    }
    for name in [
        json!("bad name"),
        json!("net\ntwo"),
        json!(" net"),
        json!(""),
        Value::Null,
    ] {
        let mut c = conf.clone();
        c["name"] = name;
        for cmd in [Add, Del, Gc] {
            cases.push((request(cmd, "ctr1", &path, "eth0", &c), 7));
        }
    }
    for (req, want) in &cases {
        let e = raw_err(send(&node.socket, req));
        assert_eq!(
            e.code, *want,
            "{:?} {:?} {:?} {}: {}",
            req.command, req.container_id, req.ifname, req.config["name"], e.msg
        );
    }
    assert!(node.ipam_files().is_empty(), "{:?}", node.ipam_files());
    assert!(node.host_links().is_empty());
    assert!(!sh(&["ip", "-n", &pod.name, "link", "show", "eth0"]).0);
    // The same request with valid identifiers goes through.
    let ok_add = request(Add, "ctr1", &path, "eth0", &conf);
    assert!(matches!(
        send(&node.socket, &ok_add),
        twill_proto::Response::Ok(Some(_))
    ));
    ok(cni("DEL", "ctr1", &path, &conf));
}

/// Samples `gauge` every millisecond until the returned stop flag is set; joins to the highest
/// value seen.
fn sample_max(
    gauge: impl Fn() -> u64 + Send + 'static,
) -> (
    Arc<std::sync::atomic::AtomicBool>,
    std::thread::JoinHandle<u64>,
) {
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let s = stop.clone();
    let t = std::thread::spawn(move || {
        let mut max = 0;
        let deadline = Instant::now() + Duration::from_secs(120);
        while !s.load(Ordering::Relaxed) && Instant::now() < deadline {
            max = max.max(gauge());
            std::thread::sleep(Duration::from_millis(1));
        }
        max
    });
    (stop, t)
}

fn stop_sampling(
    s: (
        Arc<std::sync::atomic::AtomicBool>,
        std::thread::JoinHandle<u64>,
    ),
) -> u64 {
    s.0.store(true, Ordering::Relaxed);
    s.1.join().unwrap()
}

/// Frames are capped at 256 KiB on both sides, each with a clear error. While a client keeps
/// sending frames over the cap, a pod's ADD still goes through.
#[test]
fn requests_over_the_frame_cap_are_refused_and_pods_still_come_up() {
    use std::io::Read;
    assert_eq!(twill_proto::MAX_FRAME, 256 * 1024);
    let mut node = Node::start(Some(subnet()));
    let conf = node.conf("1.0.0");
    // 300 KiB: refused by its header (the old 4 MiB cap took it in and decoded it).
    let e = raw_err(raw_exchange(&node.socket, &(300 * 1024u32).to_be_bytes()));
    assert_eq!(e.code, 6);
    assert!(
        e.msg.contains("exceeds the limit of 262144 bytes"),
        "{}",
        e.msg
    );

    // The bound being hit over and over while a pod is set up.
    let refused = Arc::new(AtomicU32::new(0));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (sock, r, s) = (node.socket.clone(), refused.clone(), stop.clone());
    let hammer = std::thread::spawn(move || {
        let mut frame = (300 * 1024u32).to_be_bytes().to_vec();
        frame.resize(4 + 300 * 1024, b' ');
        let deadline = Instant::now() + Duration::from_secs(60);
        while !s.load(Ordering::Relaxed) && Instant::now() < deadline {
            let mut c = std::os::unix::net::UnixStream::connect(&sock).unwrap();
            c.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
            // twilld answers after the header and closes: the rest may not be taken.
            let _ = c.write_all(&frame);
            let mut answer = Vec::new();
            let _ = c.read_to_end(&mut answer);
            if let Ok(twill_proto::Response::Err(e)) =
                twill_proto::read_frame::<twill_proto::Response, _>(&mut answer.as_slice())
            {
                if e.code == 6 {
                    r.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
    });
    let deadline = Instant::now() + Duration::from_secs(30);
    while refused.load(Ordering::Relaxed) < 5 {
        assert!(
            Instant::now() < deadline,
            "oversized frames were not refused"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let pod = node.pod();
    ok(cni("ADD", "under-load", &pod.path(), &conf));
    stop.store(true, Ordering::Relaxed);
    hammer.join().unwrap();
    assert!(pod_addr(&pod).is_some());

    // Through the plugin: a config over the cap is refused before twilld is asked; one just
    // under it whose request (config plus environment) is over, too, as a config problem.
    let mut big = conf.clone();
    big["dns"] = json!({"search": [""]});
    let base = big.to_string().len();
    big["dns"]["search"][0] = json!("a".repeat(twill_proto::MAX_FRAME + 10 - base));
    let o = cni("ADD", "big", &node.pod().path(), &big);
    assert_eq!(code(&o), 6, "{o:?}");
    assert!(
        o.raw.contains("exceeds the limit of 262144 bytes"),
        "{}",
        o.raw
    );
    big["dns"]["search"][0] = json!("a".repeat(twill_proto::MAX_FRAME - 50 - base));
    assert!(big.to_string().len() <= twill_proto::MAX_FRAME);
    let o = cni("ADD", "big", &node.pod().path(), &big);
    assert_eq!(code(&o), 7, "{o:?}");
    assert!(o.raw.contains("too large"), "{}", o.raw);
    assert_eq!(node.ipam_files().len(), 1);
    ok(cni("DEL", "under-load", &pod.path(), &conf));
}

/// An ADD whose result would not fit a frame (a "dns" that fills the request) is refused before
/// anything is configured, not after (when the answer could not be sent and the pod would be
/// left half-known). Any other answer that does not fit becomes an error answer, never silence.
#[test]
fn an_answer_too_large_is_an_error_before_anything_is_configured() {
    let mut node = Node::start(Some(subnet()));
    let pod = node.pod();
    // Request overhead is smaller than the result's: a request just under the cap makes a
    // result over it.
    let mut conf = json!({"cniVersion": "1.0.0", "name": "twill", "dns": {"search": [""]}});
    let req = request(
        twill_proto::Command::Add,
        "huge",
        &pod.path(),
        "eth0",
        &conf,
    );
    let base = twill_proto::encode_frame(&req).unwrap().len() - 4;
    conf["dns"]["search"][0] = json!("a".repeat(twill_proto::MAX_FRAME - 10 - base));
    let req = request(
        twill_proto::Command::Add,
        "huge",
        &pod.path(),
        "eth0",
        &conf,
    );
    let e = raw_err(send(&node.socket, &req));
    assert_eq!(e.code, 7, "{}", e.msg);
    assert!(e.msg.contains("dns"), "{}", e.msg);
    assert!(node.ipam_files().is_empty());
    assert!(node.host_links().is_empty());
    assert!(pod_addr(&pod).is_none());

    // VERSION echoes the asked version: a request at the cap gets an error back.
    let head = r#"{"protocol":1,"command":"VERSION","config":{"cniVersion":""#;
    let tail = r#""}}"#;
    let body = format!(
        "{head}{}{tail}",
        "9".repeat(twill_proto::MAX_FRAME - head.len() - tail.len())
    );
    let mut frame = (body.len() as u32).to_be_bytes().to_vec();
    frame.extend_from_slice(body.as_bytes());
    let e = raw_err(raw_exchange(&node.socket, &frame));
    assert_eq!(e.code, 999, "{}", e.msg);
    assert!(e.msg.contains("exceeds"), "{}", e.msg);
}

/// At most `max_connections` requests are served at once; further clients wait in the socket's
/// backlog. Clients holding every slot without sending anything delay a pod's ADD until the
/// read timeout drops them, but do not fail it; a burst larger than the limit all completes,
/// never using more slots than allowed.
#[test]
fn connections_beyond_the_limit_wait_and_pods_still_come_up() {
    let limits = CniLimits {
        max_connections: 3,
        ..CniLimits::default()
    };
    let mut node = Node::start_with(Some(subnet()), limits);
    let conf = node.conf("1.0.0");
    let m = node.metrics.clone();
    let sampler = sample_max(move || m.cni_connections.load(Ordering::Relaxed));
    let idle: Vec<_> = (0..3)
        .map(|_| std::os::unix::net::UnixStream::connect(&node.socket).unwrap())
        .collect();
    let deadline = Instant::now() + Duration::from_secs(10);
    while node.metrics.cni_connections.load(Ordering::Relaxed) < 3 {
        assert!(Instant::now() < deadline, "idle connections not taken in");
        std::thread::sleep(Duration::from_millis(10));
    }
    let pod = node.pod();
    ok(cni("ADD", "waited", &pod.path(), &conf));
    assert!(
        node.metrics
            .cni_connections_at_limit
            .load(Ordering::Relaxed)
            >= 1
    );
    drop(idle);

    let pods: Vec<Netns> = (0..12).map(|_| node.pod()).collect();
    let paths: Arc<Vec<String>> = Arc::new(pods.iter().map(Netns::path).collect());
    let (p2, c2) = (paths.clone(), conf.clone());
    for r in parallel(12, move |i| cni("ADD", &format!("burst{i}"), &p2[i], &c2)) {
        ok(r);
    }
    let (p2, c2) = (paths.clone(), conf.clone());
    for r in parallel(12, move |i| cni("DEL", &format!("burst{i}"), &p2[i], &c2)) {
        ok(r);
    }
    let max = stop_sampling(sampler);
    assert!(max <= 3, "{max} connections served at once, limit 3");
    assert_eq!(max, 3);
    assert_eq!(node.ipam_files().len(), 1);
    ok(cni("DEL", "waited", &pod.path(), &conf));
}

/// Each ADD, CHECK and DEL runs on a thread of its own: at most `max_threads` exist at once, and
/// a burst beyond that waits for them and completes.
#[test]
fn a_burst_beyond_the_thread_limit_completes() {
    let limits = CniLimits {
        max_threads: 2,
        ..CniLimits::default()
    };
    let mut node = Node::start_with(Some(subnet()), limits);
    let conf = node.conf("1.0.0");
    let m = node.metrics.clone();
    let sampler = sample_max(move || m.cni_threads.load(Ordering::Relaxed));
    let pods: Vec<Netns> = (0..20).map(|_| node.pod()).collect();
    let paths: Arc<Vec<String>> = Arc::new(pods.iter().map(Netns::path).collect());
    let (p2, c2) = (paths.clone(), conf.clone());
    for r in parallel(20, move |i| cni("ADD", &format!("thr{i}"), &p2[i], &c2)) {
        ok(r);
    }
    assert_eq!(node.host_links().len(), 20);
    let (p2, c2) = (paths.clone(), conf.clone());
    for r in parallel(20, move |i| cni("DEL", &format!("thr{i}"), &p2[i], &c2)) {
        ok(r);
    }
    let max = stop_sampling(sampler);
    assert!(max <= 2, "{max} pod threads at once, limit 2");
    assert!(
        node.metrics.cni_thread_waits.load(Ordering::Relaxed) > 0,
        "the burst never had to wait for a thread"
    );
    assert!(node.ipam_files().is_empty() && node.host_links().is_empty());
    let deadline = Instant::now() + Duration::from_secs(10);
    while node.metrics.cni_threads.load(Ordering::Relaxed) != 0 {
        assert!(Instant::now() < deadline, "pod threads never ended");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// host-local's store on a hung disk (a directory wedged in the kernel): the ADD that reads it
/// waits, nothing else does. Two CHECKs at once and a STATUS are answered meanwhile: IPAM never
/// runs on the two async workers and never holds its lock across file I/O.
#[test]
fn a_hung_disk_stalls_only_the_requests_that_touch_it() {
    use twill_tests::stall::{threads_in_d_state, DirWedge};
    let mut node = Node::start(Some(subnet()));
    let mut conf = node.conf("1.1.0");
    conf["timeout"] = json!(15);
    let hl = node.dir.0.join("host-local/cbr0");
    std::fs::create_dir_all(&hl).unwrap();
    let a = node.pod();
    let r = ok(cni("ADD", "before", &a.path(), &conf)).unwrap();
    let mut wedge = DirWedge::new(&hl).unwrap();
    let blocked = threads_in_d_state().len();
    let b = node.pod();
    let (bp, c2) = (b.path(), conf.clone());
    let stuck = std::thread::spawn(move || cni("ADD", "during", &bp, &c2));
    let deadline = Instant::now() + Duration::from_secs(20);
    while threads_in_d_state().len() <= blocked {
        assert!(
            Instant::now() < deadline,
            "the ADD never reached the hung dir"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let (ap, check_conf) = (a.path(), with_prev(&conf, &r));
    for o in parallel(2, move |_| cni("CHECK", "before", &ap, &check_conf)) {
        ok(o);
    }
    let st = twill(&[("CNI_COMMAND", "STATUS")], &conf);
    assert!(st.ok, "{st:?}");
    assert!(
        !stuck.is_finished(),
        "the ADD did not wait for the hung dir"
    );
    wedge.release();
    ok(stuck.join().unwrap());
    ok(cni("DEL", "during", &b.path(), &conf));
    ok(cni("DEL", "before", &a.path(), &conf));
    assert!(node.ipam_files().is_empty());
}

/// CNI_NETNS naming twilld's own network namespace is refused (code 4) before anything is
/// made: the "container" end would land among the node's interfaces with a pod address.
#[test]
fn the_daemons_own_netns_is_refused() {
    let node = Node::start(Some(subnet()));
    let conf = node.conf("1.0.0");
    let links = node.ns.ip(&["-o", "link", "show"]);
    // The serving threads run in the node netns; /proc/<pid>/ns/net would be the test's own.
    for cmd in ["ADD", "CHECK"] {
        let c = if cmd == "CHECK" {
            with_prev(
                &conf,
                &json!({"cniVersion": "1.0.0", "interfaces": [{"name": "eth0", "sandbox": node.ns.path()}]}),
            )
        } else {
            conf.clone()
        };
        let o = cni(cmd, "own", &node.ns.path(), &c);
        assert_eq!(code(&o), 4, "{cmd}: {o:?}");
        assert!(
            o.raw.contains("twilld's own network namespace"),
            "{}",
            o.raw
        );
    }
    assert_eq!(node.ns.ip(&["-o", "link", "show"]), links);
    assert!(node.ipam_files().is_empty());
}

/// The node's subnet shrinks (SubnetLen changed) to one inside the old: pods of the old one keep
/// running on the bridge, so their addresses are not handed out again.
#[test]
fn a_smaller_subnet_inside_the_old_one_avoids_the_old_pods_addresses() {
    let old = NodeNet {
        subnet: Some("10.244.0.0/23".parse().unwrap()),
        subnet6: None,
        mtu: 1450,
    };
    let mut node = Node::start(Some(old));
    let conf = node.conf("1.0.0");
    let pods: Vec<Netns> = (0..3).map(|_| node.pod()).collect();
    let mut addrs = Vec::new();
    for (i, p) in pods.iter().enumerate().take(2) {
        let r = ok(cni("ADD", &format!("s{i}"), &p.path(), &conf)).unwrap();
        addrs.push(r["ips"][0]["address"].as_str().unwrap().to_string());
    }
    assert_eq!(addrs, ["10.244.0.2/23", "10.244.0.3/23"]);
    node.net_tx.send_replace(Some(NodeNet {
        subnet: Some("10.244.0.0/24".parse().unwrap()),
        subnet6: None,
        mtu: 1450,
    }));
    let r = ok(cni("ADD", "s2", &pods[2].path(), &conf)).unwrap();
    assert_eq!(r["ips"][0]["address"], "10.244.0.4/24", "{r}");
    for (i, p) in pods.iter().enumerate() {
        ok(cni("DEL", &format!("s{i}"), &p.path(), &conf));
    }
    let dir = node.dir.0.join("state/ipam");
    for d in std::fs::read_dir(dir).unwrap().flatten() {
        assert_eq!(std::fs::read_dir(d.path()).unwrap().count(), 0, "{d:?}");
    }
}

/// A retried ADD of a running pod after the node's subnet grew finds no address of the pod in
/// the new subnet and takes one; its failure (the pod has its eth0) gives back that one only,
/// never the address the pod runs with (which would then go to a second pod).
#[test]
fn a_retried_add_after_the_subnet_grew_keeps_the_running_pods_address() {
    let mut node = Node::start(Some(subnet()));
    let conf = node.conf("1.0.0");
    let (pod, other) = (node.pod(), node.pod());
    let r = ok(cni("ADD", "live", &pod.path(), &conf)).unwrap();
    let addr = r["ips"][0]["address"].as_str().unwrap().to_string();
    let before = node.ipam_files();
    assert_eq!(before.len(), 1);
    node.net_tx.send_replace(Some(NodeNet {
        subnet: Some("10.244.0.0/23".parse().unwrap()),
        subnet6: None,
        mtu: 1450,
    }));
    let o = cni("ADD", "live", &pod.path(), &conf);
    assert_eq!(code(&o), 101, "{:?}", o.json);
    assert_eq!(
        node.ipam_files(),
        before,
        "the running pod's address was given back"
    );
    let grown = node.dir.0.join("state/ipam/10.244.0.0-23");
    let in_grown = || std::fs::read_dir(&grown).map_or(0, |d| d.count());
    assert_eq!(in_grown(), 0, "the retry's own address was kept");
    assert_eq!(pod_addr(&pod).as_deref(), Some(addr.as_str()));
    // So the next pod does not get it.
    let r = ok(cni("ADD", "next", &other.path(), &conf)).unwrap();
    let next = r["ips"][0]["address"].as_str().unwrap();
    assert_ne!(
        next.split('/').next(),
        addr.split('/').next(),
        "{next} {addr}"
    );
    ok(cni("DEL", "next", &other.path(), &conf));
    ok(cni("DEL", "live", &pod.path(), &conf));
    assert!(node.ipam_files().is_empty());
    assert_eq!(in_grown(), 0);
}

/// With a single pod thread, a failing ADD must still undo itself: its pod half holds the
/// thread while it waits for an address, and must let it go before the undo (removing the veth
/// pair) needs one. Here the subnet has one pod address, so the second ADD fails in IPAM after
/// its veth pair was made.
#[test]
fn a_failed_add_undoes_itself_with_a_single_thread() {
    let tiny = NodeNet {
        subnet: Some("10.244.9.0/30".parse().unwrap()),
        subnet6: None,
        mtu: 1450,
    };
    let limits = CniLimits {
        max_threads: 1,
        ..CniLimits::default()
    };
    let mut node = Node::start_with(Some(tiny), limits);
    let mut conf = node.conf("1.0.0");
    conf["timeout"] = json!(20);
    let (a, b) = (node.pod(), node.pod());
    ok(cni("ADD", "only", &a.path(), &conf));
    let o = cni("ADD", "second", &b.path(), &conf);
    assert_eq!(code(&o), 100, "{o:?}");
    assert_eq!(node.host_links().len(), 1);
    assert!(pod_addr(&b).is_none());
    ok(cni("DEL", "only", &a.path(), &conf));
    assert!(node.host_links().is_empty() && node.ipam_files().is_empty());
}
