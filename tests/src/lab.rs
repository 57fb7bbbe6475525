//! A test cluster ("lab") on one machine: an underlay namespace with a bridge and etcd, and N
//! node namespaces wired to it by veth pairs, each able to run one twilld.
//!
//! ```text
//!  <p>u:   <p>br 198.18.0.1/24 ── etcd on 198.18.0.1:<port>
//!           │ veth1        │ veth2   ...
//!  <p>n1: eth0 .11    <p>n2: eth0 .12  ...   (default route via 198.18.0.1, ip_forward=1)
//! ```
//! Nodes are numbered from 1. Dropping the lab (also while unwinding from a panic) kills every
//! process it started or that runs in its namespaces, deletes the namespaces and the temp dir.
//!
//! A lab can outlive its process (the lab CLI): build it with `detachable` (etcd and twilld
//! get sessions of their own), `detach` it to get a `LabState` instead of a teardown, and
//! `Lab::attach` that state later to manage the same processes by pid again.

use std::fs::OpenOptions;
use std::io::Write;
use std::net::{Ipv4Addr, SocketAddr};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::bins;
use crate::etcd::{new_session, tail, Etcd, EtcdState};
use crate::http;
use crate::kernel::DeviceEntries;
use crate::netns::{self, check, exec_cmd};
use crate::proc::{Proc, ProcId};
use crate::wait::{wait_for, wait_until};

/// Generated prefixes are `twl<pid>x<2 base-36 digits>`: at most 15 bytes with the longest
/// suffix used for a device (`br`), and the fixed-width counter means no prefix is a prefix of
/// another lab's.
pub const PREFIX_ROOT: &str = "twl";
/// Longest prefix accepted so that `<prefix>br` fits in IFNAMSIZ.
pub const MAX_PREFIX_LEN: usize = 13;
pub const UNDERLAY_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
pub const UNDERLAY_PREFIX_LEN: u8 = 24;
/// Where twilld serves HTTP inside each node namespace.
pub const DAEMON_HTTP: &str = "127.0.0.1:9464";
/// The etcd key of the network config (flannel's default prefix).
pub const CONFIG_KEY: &str = "/coreos.com/network/config";
pub const SUBNETS_PREFIX: &str = "/coreos.com/network/subnets/";

/// Written to the daemon log before each start.
const START_MARKER: &str = "=== lab: starting twilld";
const DAEMON_STOP_TIMEOUT: Duration = Duration::from_secs(30);

static COUNTER: AtomicU32 = AtomicU32::new(0);

#[derive(Clone, Debug)]
pub struct LabOptions {
    /// Number of nodes (1..=200).
    pub nodes: usize,
    /// Namespace/device prefix; generated (unique per process and lab) when None. A given
    /// prefix is used as is: leftovers with that prefix are removed first.
    pub prefix: Option<String>,
    /// Start etcd in the underlay namespace.
    pub etcd: bool,
    /// MTU of the underlay bridge and veths.
    pub mtu: u32,
    /// Where twilld and twill are; default: TWILL_BIN_DIR or <target>/debug (built on demand).
    pub bin_dir: Option<PathBuf>,
    /// The lab's files (etcd data, node dirs); default: <temp dir>/<prefix>. Removed on drop.
    pub dir: Option<PathBuf>,
    /// Start etcd and the daemons in sessions of their own, so that after `Lab::detach` they
    /// outlive this process (no terminal hangup or Ctrl-C reaches them).
    pub detachable: bool,
    /// Nodes on a second underlay segment (198.18.1.0/24) behind a router namespace, instead of
    /// on the underlay bridge: a routed underlay.
    pub routed: Vec<usize>,
    /// A dual-stack underlay: the bridge and every node (on the main segment) also get an
    /// IPv6 address (fd00:198:18::/64; node i has `node_ip6(i)`).
    pub ipv6: bool,
    /// An IPv6-only underlay (with `ipv6`): nodes get only their IPv6 address and an IPv6
    /// default route via the underlay host, and etcd listens on its IPv6 address.
    pub ipv6_only: bool,
}

impl Default for LabOptions {
    fn default() -> Self {
        LabOptions {
            nodes: 3,
            prefix: None,
            etcd: true,
            mtu: 1500,
            bin_dir: None,
            dir: None,
            detachable: false,
            routed: Vec::new(),
            ipv6: false,
            ipv6_only: false,
        }
    }
}

/// The underlay host's IPv6 address on a dual-stack underlay, and the segment's prefix.
pub const UNDERLAY_IP6: &str = "fd00:198:18::fe";
pub const UNDERLAY6: &str = "fd00:198:18::/64";

/// The router's address on the main underlay segment, and its own segment.
pub const ROUTER_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 254);
pub const SEGMENT2_GW: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 1);
pub const SEGMENT2: &str = "198.18.1.0/24";

pub struct Lab {
    prefix: String,
    dir: PathBuf,
    nodes: usize,
    bin_dir: PathBuf,
    bins_checked: bool,
    etcd: Option<Etcd>,
    /// Index 0 is node 1.
    daemons: Vec<Option<Proc>>,
    mtu: u32,
    detachable: bool,
    routed: Vec<usize>,
    ipv6: bool,
    ipv6_only: bool,
    /// Set by `detach`: drop leaves everything running.
    detached: bool,
}

/// Everything needed to manage a running lab again from another process (`Lab::attach`).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct LabState {
    pub prefix: String,
    pub dir: PathBuf,
    pub nodes: usize,
    pub mtu: u32,
    pub bin_dir: PathBuf,
    pub etcd: Option<EtcdState>,
    /// Index 0 is node 1.
    pub daemons: Vec<Option<ProcId>>,
    #[serde(default)]
    pub routed: Vec<usize>,
    #[serde(default)]
    pub ipv6: bool,
    #[serde(default)]
    pub ipv6_only: bool,
}

impl Lab {
    pub fn new(opts: LabOptions) -> Result<Lab> {
        if opts.nodes == 0 || opts.nodes > 200 {
            bail!("a lab has 1..=200 nodes, not {}", opts.nodes);
        }
        let prefix = match opts.prefix {
            Some(p) => {
                check_given_prefix(&p)?;
                match &opts.dir {
                    Some(dir) => {
                        remove_namespaces(&p)?;
                        remove_dir(dir)?;
                    }
                    None => remove_prefix(&p)?,
                }
                p
            }
            None => {
                cleanup_stale(PREFIX_ROOT)?;
                generate_prefix()?
            }
        };
        let dir = opts
            .dir
            .unwrap_or_else(|| std::env::temp_dir().join(&prefix));
        let mut lab = Lab {
            prefix,
            dir,
            nodes: opts.nodes,
            bin_dir: opts.bin_dir.unwrap_or_else(bins::default_bin_dir),
            bins_checked: false,
            etcd: None,
            daemons: (0..opts.nodes).map(|_| None).collect(),
            mtu: opts.mtu,
            detachable: opts.detachable,
            routed: opts.routed,
            ipv6: opts.ipv6 || opts.ipv6_only,
            ipv6_only: opts.ipv6_only,
            detached: false,
        };
        // From here on a failure drops `lab`, which removes whatever was built so far.
        lab.build()?;
        if opts.etcd {
            let etcd =
                Etcd::start_opts(&lab.underlay_ns(), &lab.etcd_ip(), &lab.dir, lab.detachable)?;
            lab.etcd = Some(etcd);
        }
        Ok(lab)
    }

    /// Manage a lab that another process built and detached: its namespaces, dir, etcd and
    /// daemons (those still alive) are taken over as they are. Dropping the result tears the
    /// lab down, unless it is detached again.
    pub fn attach(state: LabState) -> Result<Lab> {
        check_prefix_format(&state.prefix)?;
        if state.nodes == 0 || state.nodes > 200 || state.daemons.len() != state.nodes {
            bail!(
                "lab state: {} nodes with {} daemon entries",
                state.nodes,
                state.daemons.len()
            );
        }
        let mut lab = Lab {
            prefix: state.prefix,
            dir: state.dir,
            nodes: state.nodes,
            bin_dir: state.bin_dir,
            bins_checked: false,
            etcd: None,
            daemons: state
                .daemons
                .into_iter()
                .map(|d| d.filter(ProcId::alive).map(Proc::Adopted))
                .collect(),
            mtu: state.mtu,
            detachable: true,
            routed: state.routed,
            ipv6: state.ipv6,
            ipv6_only: state.ipv6_only,
            detached: false,
        };
        lab.etcd = state
            .etcd
            .as_ref()
            .map(|e| Etcd::attach(&lab.underlay_ns(), &lab.etcd_ip(), &lab.dir, e));
        Ok(lab)
    }

    /// What `attach` needs to manage this lab from another process.
    pub fn state(&self) -> LabState {
        LabState {
            prefix: self.prefix.clone(),
            dir: self.dir.clone(),
            nodes: self.nodes,
            mtu: self.mtu,
            bin_dir: self.bin_dir.clone(),
            etcd: self.etcd.as_ref().map(Etcd::state),
            daemons: self
                .daemons
                .iter()
                .map(|d| d.as_ref().map(Proc::proc_id))
                .collect(),
            routed: self.routed.clone(),
            ipv6: self.ipv6,
            ipv6_only: self.ipv6_only,
        }
    }

    /// Let go of the lab without tearing it down: namespaces, files and processes stay (start
    /// the lab with `detachable` so the processes also survive this process). Returns what
    /// `attach` needs to take it over again.
    pub fn detach(mut self) -> LabState {
        let state = self.state();
        self.detached = true;
        if let Some(e) = self.etcd.as_mut() {
            e.detach();
        }
        state
    }

    /// Add one node (namespace, veth to the underlay bridge, address, route) with the next
    /// number; returns that number. Its daemon is not started.
    pub fn add_node(&mut self) -> Result<usize> {
        if self.nodes >= 200 {
            bail!("a lab has at most 200 nodes");
        }
        self.nodes += 1;
        self.daemons.push(None);
        let i = self.nodes;
        // A half-built node is removed with the lab; the node count already includes it.
        self.build_node(i)?;
        Ok(i)
    }

    fn build(&mut self) -> Result<()> {
        std::fs::create_dir_all(&self.dir)
            .with_context(|| format!("mkdir {}", self.dir.display()))?;
        let u = self.underlay_ns();
        let br = format!("{}br", self.prefix);
        let mtu = self.mtu.to_string();
        netns::add(&u)?;
        let ip = |args: &[&str]| -> Result<()> { netns::run_ok(args).map(|_| ()) };
        ip(&["ip", "-n", &u, "link", "set", "lo", "up"])?;
        ip(&[
            "ip", "-n", &u, "link", "add", &br, "mtu", &mtu, "type", "bridge",
        ])?;
        ip(&[
            "ip",
            "-n",
            &u,
            "addr",
            "add",
            &format!("{UNDERLAY_IP}/{UNDERLAY_PREFIX_LEN}"),
            "dev",
            &br,
        ])?;
        if self.ipv6 {
            // nodad: no one else is on this segment, and DAD would hold the address back.
            let a = format!("{UNDERLAY_IP6}/64");
            ip(&["ip", "-n", &u, "addr", "add", &a, "dev", &br, "nodad"])?;
        }
        ip(&["ip", "-n", &u, "link", "set", &br, "up"])?;
        if !self.routed.is_empty() {
            self.build_router()?;
        }
        for i in 1..=self.nodes {
            self.build_node(i)?;
        }
        Ok(())
    }

    /// The router namespace: one leg on the underlay bridge (198.18.0.254), a bridge of its own
    /// for the second segment (198.18.1.1/24). The underlay host routes that segment via it.
    fn build_router(&self) -> Result<()> {
        let ip = |args: &[&str]| -> Result<()> { netns::run_ok(args).map(|_| ()) };
        let (u, r) = (self.underlay_ns(), self.router_ns());
        let br = format!("{}br", self.prefix);
        let mtu = self.mtu.to_string();
        netns::add(&r)?;
        ip(&["ip", "-n", &r, "link", "set", "lo", "up"])?;
        ip(&[
            "ip", "-n", &u, "link", "add", "vrouter", "mtu", &mtu, "type", "veth", "peer", "name",
            "up0", "mtu", &mtu, "netns", &r,
        ])?;
        ip(&[
            "ip", "-n", &u, "link", "set", "vrouter", "master", &br, "up",
        ])?;
        ip(&[
            "ip",
            "-n",
            &r,
            "addr",
            "add",
            &format!("{ROUTER_IP}/24"),
            "dev",
            "up0",
        ])?;
        ip(&["ip", "-n", &r, "link", "set", "up0", "up"])?;
        ip(&[
            "ip", "-n", &r, "link", "add", "seg2", "mtu", &mtu, "type", "bridge",
        ])?;
        ip(&[
            "ip",
            "-n",
            &r,
            "addr",
            "add",
            &format!("{SEGMENT2_GW}/24"),
            "dev",
            "seg2",
        ])?;
        ip(&["ip", "-n", &r, "link", "set", "seg2", "up"])?;
        ip(&[
            "ip",
            "-n",
            &u,
            "route",
            "add",
            SEGMENT2,
            "via",
            &ROUTER_IP.to_string(),
        ])?;
        check(
            &["sysctl"],
            exec_cmd(&r, &["sysctl", "-qw", "net.ipv4.ip_forward=1"]).output()?,
        )?;
        Ok(())
    }

    fn build_node(&self, i: usize) -> Result<()> {
        let ip = |args: &[&str]| -> Result<()> { netns::run_ok(args).map(|_| ()) };
        let routed = self.routed.contains(&i);
        // The segment's bridge and the namespace it lives in.
        let (seg_ns, br, gw) = if routed {
            (self.router_ns(), "seg2".to_string(), SEGMENT2_GW)
        } else {
            (
                self.underlay_ns(),
                format!("{}br", self.prefix),
                UNDERLAY_IP,
            )
        };
        let mtu = self.mtu.to_string();
        let n = self.node_ns(i);
        let veth = format!("veth{i}");
        netns::add(&n)?;
        std::fs::create_dir_all(self.node_dir(i))?;
        ip(&["ip", "-n", &n, "link", "set", "lo", "up"])?;
        // Both ends are created inside lab namespaces: the host namespace never sees them.
        ip(&[
            "ip", "-n", &seg_ns, "link", "add", &veth, "mtu", &mtu, "type", "veth", "peer", "name",
            "eth0", "mtu", &mtu, "netns", &n,
        ])?;
        ip(&[
            "ip", "-n", &seg_ns, "link", "set", &veth, "master", &br, "up",
        ])?;
        if !self.ipv6_only {
            let addr = format!("{}/{UNDERLAY_PREFIX_LEN}", self.node_ip(i));
            ip(&["ip", "-n", &n, "addr", "add", &addr, "dev", "eth0"])?;
        }
        if self.ipv6 && !routed {
            let a = format!("{}/64", self.node_ip6(i));
            ip(&["ip", "-n", &n, "addr", "add", &a, "dev", "eth0", "nodad"])?;
        }
        ip(&["ip", "-n", &n, "link", "set", "eth0", "up"])?;
        if self.ipv6_only {
            ip(&[
                "ip",
                "-n",
                &n,
                "-6",
                "route",
                "add",
                "default",
                "via",
                UNDERLAY_IP6,
            ])?;
        } else {
            ip(&[
                "ip",
                "-n",
                &n,
                "route",
                "add",
                "default",
                "via",
                &gw.to_string(),
            ])?;
        }
        if !routed && !self.routed.is_empty() {
            ip(&[
                "ip",
                "-n",
                &n,
                "route",
                "add",
                SEGMENT2,
                "via",
                &ROUTER_IP.to_string(),
            ])?;
        }
        self.exec_ok(i, &["sysctl", "-qw", "net.ipv4.ip_forward=1"])?;
        if self.ipv6 {
            self.exec_ok(i, &["sysctl", "-qw", "net.ipv6.conf.all.forwarding=1"])?;
        }
        Ok(())
    }

    // ---- names and places ----

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    pub fn nodes(&self) -> usize {
        self.nodes
    }

    /// The lab's temp dir (etcd data and log, one `n<i>` dir per node).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Where etcd listens: the underlay host's IPv4 address, or its IPv6 one on an IPv6-only
    /// underlay.
    fn etcd_ip(&self) -> String {
        if self.ipv6_only {
            UNDERLAY_IP6.to_string()
        } else {
            UNDERLAY_IP.to_string()
        }
    }

    pub fn underlay_ns(&self) -> String {
        format!("{}u", self.prefix)
    }

    pub fn node_ns(&self, i: usize) -> String {
        self.check_node(i);
        format!("{}n{i}", self.prefix)
    }

    /// Node i's underlay address: 198.18.0.(10+i), or 198.18.1.(10+i) behind the router.
    pub fn node_ip(&self, i: usize) -> Ipv4Addr {
        self.check_node(i);
        let seg = u8::from(self.routed.contains(&i));
        Ipv4Addr::new(198, 18, seg, 10 + i as u8)
    }

    /// Node i's underlay IPv6 address on a dual-stack underlay: fd00:198:18::(10+i), hex.
    pub fn node_ip6(&self, i: usize) -> std::net::Ipv6Addr {
        self.check_node(i);
        std::net::Ipv6Addr::new(0xfd00, 0x198, 0x18, 0, 0, 0, 0, 10 + i as u16)
    }

    /// The router namespace of a routed underlay (`LabOptions::routed`).
    pub fn router_ns(&self) -> String {
        format!("{}r", self.prefix)
    }

    pub fn node_dir(&self, i: usize) -> PathBuf {
        self.dir.join(format!("n{i}"))
    }

    pub fn subnet_file(&self, i: usize) -> PathBuf {
        self.node_dir(i).join("subnet.env")
    }

    pub fn state_dir(&self, i: usize) -> PathBuf {
        self.node_dir(i).join("state")
    }

    pub fn cni_socket(&self, i: usize) -> PathBuf {
        self.node_dir(i).join("cni.sock")
    }

    pub fn daemon_log_path(&self, i: usize) -> PathBuf {
        self.node_dir(i).join("twilld.log")
    }

    pub fn bin_dir(&self) -> &Path {
        &self.bin_dir
    }

    /// Path of a twill binary ("twilld", "twill"), building the workspace binaries if needed.
    pub fn bin(&mut self, name: &str) -> Result<PathBuf> {
        if !self.bins_checked {
            bins::ensure_built(&self.bin_dir)?;
            self.bins_checked = true;
        }
        Ok(self.bin_dir.join(name))
    }

    fn check_node(&self, i: usize) {
        assert!(
            (1..=self.nodes).contains(&i),
            "node {i} is not in 1..={}",
            self.nodes
        );
    }

    // ---- running things in namespaces ----

    /// Run a command inside node i; an error only if it cannot be started.
    pub fn exec(&self, i: usize, args: &[&str]) -> Result<Output> {
        exec_cmd(&self.node_ns(i), args)
            .stdin(Stdio::null())
            .output()
            .with_context(|| format!("run {args:?} in node {i}"))
    }

    /// Run a command inside node i and require success; returns stdout.
    pub fn exec_ok(&self, i: usize, args: &[&str]) -> Result<String> {
        let out = self.exec(i, args)?;
        check(args, out).with_context(|| format!("in node {i}"))
    }

    /// Load an nft script inside node i (as another tool on the node would).
    pub fn nft_load(&self, i: usize, script: &str) -> Result<()> {
        let mut child = exec_cmd(&self.node_ns(i), &["nft", "-f", "-"])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .with_context(|| format!("run nft in node {i}"))?;
        let mut stdin = child.stdin.take().context("nft's stdin")?;
        std::io::Write::write_all(&mut stdin, script.as_bytes())?;
        drop(stdin);
        anyhow::ensure!(child.wait()?.success(), "node {i}: nft refused:\n{script}");
        Ok(())
    }

    /// Run a command inside the underlay namespace and require success; returns stdout.
    pub fn exec_underlay_ok(&self, args: &[&str]) -> Result<String> {
        let out = exec_cmd(&self.underlay_ns(), args)
            .stdin(Stdio::null())
            .output()?;
        check(args, out).context("in the underlay")
    }

    /// Start a background command inside node i (stdout/stderr piped). It is killed on drop at
    /// the latest, with everything else in the node's namespace.
    pub fn spawn(&self, i: usize, args: &[&str]) -> Result<Child> {
        exec_cmd(&self.node_ns(i), args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("spawn {args:?} in node {i}"))
    }

    /// Renumbers node i's underlay from `from` to `to` (a /24 each; `to` in 198.18.0.0/24, whose
    /// underlay host becomes the default gateway) under its twilld,
    /// as DHCP or an operator would: the old address goes first (deleting a primary address
    /// would take a same-subnet secondary with it), then the new one and the default route.
    pub fn renumber(&self, i: usize, from: &str, to: &str) -> Result<()> {
        self.exec_ok(
            i,
            &["ip", "addr", "del", &format!("{from}/24"), "dev", "eth0"],
        )?;
        self.exec_ok(
            i,
            &["ip", "addr", "add", &format!("{to}/24"), "dev", "eth0"],
        )?;
        self.exec_ok(
            i,
            &["ip", "route", "replace", "default", "via", "198.18.0.1"],
        )?;
        Ok(())
    }

    /// One ping from node i to `dst` (1 s timeout): true if answered.
    pub fn ping(&self, i: usize, dst: &str) -> bool {
        self.exec(i, &["ping", "-n", "-q", "-c", "1", "-W", "1", dst])
            .map(|o| o.status.success())
            .unwrap_or(false)
    }

    /// Neighbour, FDB and route entries of `dev` inside node i.
    pub fn entries(&self, i: usize, dev: &str) -> Result<DeviceEntries> {
        DeviceEntries::read(&self.node_ns(i), dev)
    }

    // ---- etcd ----

    fn etcd_ref(&self) -> Result<&Etcd> {
        self.etcd
            .as_ref()
            .ok_or_else(|| anyhow!("this lab has no etcd"))
    }

    /// `http://198.18.0.1:<port>`, reachable from every node.
    pub fn etcd_endpoint(&self) -> String {
        self.etcd.as_ref().map(Etcd::endpoint).unwrap_or_default()
    }

    /// Cut node i off from etcd (its packets to etcd are answered with a reset, open
    /// connections included) without touching the overlay. `heal_from_etcd` undoes it.
    pub fn cut_from_etcd(&self, i: usize) -> Result<()> {
        let port = self.etcd_port().context("etcd port")?;
        self.nft_load(
            i,
            &format!(
                "table inet twlcut {{\n chain out {{\n type filter hook output priority 0;\n \
                 ip daddr 198.18.0.1 tcp dport {port} reject with tcp reset\n }}\n}}\n"
            ),
        )
    }

    pub fn heal_from_etcd(&self, i: usize) -> Result<()> {
        self.exec_ok(i, &["nft", "delete", "table", "inet", "twlcut"])
            .map(|_| ())
    }

    /// Run etcdctl (API v3) inside the underlay namespace; returns stdout.
    pub fn etcdctl(&self, args: &[&str]) -> Result<String> {
        self.etcd_ref()?.ctl(args)
    }

    /// etcdctl with `input` on stdin (e.g. `put <key>` with a value too large for an argument).
    pub fn etcdctl_input(&self, args: &[&str], input: &[u8]) -> Result<String> {
        self.etcd_ref()?.ctl_input(args, input)
    }

    /// Put the network config at /coreos.com/network/config.
    pub fn put_config(&self, json: &str) -> Result<()> {
        self.etcdctl(&["put", CONFIG_KEY, "--", json]).map(|_| ())
    }

    /// The value of a key, None if absent.
    pub fn etcd_get(&self, key: &str) -> Result<Option<String>> {
        let out = self.etcdctl(&["get", key, "--print-value-only"])?;
        // etcdctl prints the value followed by a newline; nothing for a missing key.
        Ok(if out.is_empty() {
            None
        } else {
            Some(out.strip_suffix('\n').unwrap_or(&out).to_owned())
        })
    }

    /// Keys under `prefix`, sorted.
    pub fn etcd_keys(&self, prefix: &str) -> Result<Vec<String>> {
        let out = self.etcdctl(&["get", prefix, "--prefix", "--keys-only"])?;
        let mut keys: Vec<String> = out
            .lines()
            .filter(|l| !l.is_empty())
            .map(str::to_owned)
            .collect();
        keys.sort();
        Ok(keys)
    }

    /// The subnet lease keys (e.g. "10.244.1.0-24"), without the prefix, sorted.
    pub fn lease_keys(&self) -> Result<Vec<String>> {
        Ok(self
            .etcd_keys(SUBNETS_PREFIX)?
            .into_iter()
            .map(|k| k.trim_start_matches(SUBNETS_PREFIX).to_owned())
            .collect())
    }

    /// Stop etcd gracefully (its data stays).
    pub fn stop_etcd(&mut self) -> Result<()> {
        self.etcd
            .as_mut()
            .ok_or_else(|| anyhow!("this lab has no etcd"))?
            .stop()
            .map(|_| ())
    }

    /// Start etcd again on the same address and data dir.
    pub fn start_etcd(&mut self) -> Result<()> {
        self.etcd
            .as_mut()
            .ok_or_else(|| anyhow!("this lab has no etcd"))?
            .start_again()
    }

    /// Compact etcd's history (physically) up to the current revision; returns that revision.
    pub fn compact_etcd(&self) -> Result<i64> {
        self.etcd_ref()?.compact()
    }

    /// An unlabelled metric from etcd's own /metrics (None if etcd does not export it).
    pub fn etcd_metric(&self, name: &str) -> Result<Option<f64>> {
        let port = self
            .etcd_port()
            .ok_or_else(|| anyhow!("this lab has no etcd"))?;
        let addr = SocketAddr::from((UNDERLAY_IP, port));
        let (code, body) = http::get_in_netns(&self.underlay_ns(), addr, "/metrics")?;
        if code != 200 {
            bail!("GET /metrics from etcd: {code}");
        }
        Ok(parse_metric(&body, name))
    }

    pub fn etcd_revision(&self) -> Result<i64> {
        self.etcd_ref()?.revision()
    }

    /// The client port etcd listens on (on 198.18.0.1).
    pub fn etcd_port(&self) -> Option<u16> {
        self.etcd.as_ref().map(Etcd::port)
    }

    pub fn etcd_pid(&self) -> Option<u32> {
        self.etcd.as_ref().and_then(Etcd::pid)
    }

    // ---- daemons ----

    /// The arguments twilld gets on node i (before any extras).
    pub fn daemon_args(&self, i: usize) -> Vec<String> {
        let p = |p: PathBuf| p.to_string_lossy().into_owned();
        [
            ("--etcd-endpoints", self.etcd_endpoint()),
            ("--iface", "eth0".into()),
            ("--subnet-file", p(self.subnet_file(i))),
            ("--state-dir", p(self.state_dir(i))),
            ("--host-local-dir", p(self.node_dir(i).join("host-local"))),
            ("--http-addr", DAEMON_HTTP.into()),
            ("--cni-socket", p(self.cni_socket(i))),
            ("--resync-interval", "2s".into()),
            ("--lease-ttl", "60s".into()),
            ("--node-name", format!("n{i}")),
        ]
        .into_iter()
        .flat_map(|(k, v)| [k.to_owned(), v])
        .collect()
    }

    pub fn start_daemon(&mut self, i: usize) -> Result<()> {
        self.start_daemon_with_env(i, &[], &[])
    }

    /// Start twilld with extra arguments; an extra `--flag` replaces the default for that flag.
    pub fn start_daemon_with(&mut self, i: usize, extra: &[&str]) -> Result<()> {
        self.start_daemon_with_env(i, extra, &[])
    }

    pub fn start_daemon_with_env(
        &mut self,
        i: usize,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> Result<()> {
        let args = merge_args(&self.daemon_args(i), extra);
        self.start_daemon_args(i, &args, env)
    }

    /// Start twilld with exactly `args` (see `daemon_args` and `merge_args`): for a test that
    /// needs one of the defaults gone.
    pub fn start_daemon_args(
        &mut self,
        i: usize,
        args: &[String],
        env: &[(&str, &str)],
    ) -> Result<()> {
        self.start_daemon_wrapped(i, &[], args, env)
    }

    /// `start_daemon_args`, with twilld started by `wrapper` (inside the node's namespace,
    /// `wrapper... twilld args...`): e.g. a shell that sets up twilld's mount namespace and
    /// then execs it, so the daemon's pid stays the wrapper's.
    pub fn start_daemon_wrapped(
        &mut self,
        i: usize,
        wrapper: &[&str],
        args: &[String],
        env: &[(&str, &str)],
    ) -> Result<()> {
        self.check_node(i);
        if self.daemon_running(i) {
            bail!("twilld is already running on node {i}");
        }
        let twilld = self.bin(bins::TWILLD)?;
        let log_path = self.daemon_log_path(i);
        let mut log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .with_context(|| format!("open {}", log_path.display()))?;
        writeln!(log, "{START_MARKER} {}", args.join(" "))?;
        let mut full: Vec<&str> = wrapper.to_vec();
        full.push(
            twilld
                .to_str()
                .ok_or_else(|| anyhow!("non-UTF-8 binary path"))?,
        );
        full.extend(args.iter().map(String::as_str));
        let mut cmd = exec_cmd(&self.node_ns(i), &full);
        cmd.env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        for (k, v) in env {
            cmd.env(k, v);
        }
        if self.detachable {
            new_session(&mut cmd);
        }
        let child = cmd
            .spawn()
            .with_context(|| format!("spawn twilld on node {i}"))?;
        self.daemons[i - 1] = Some(Proc::Child(child));
        Ok(())
    }

    /// True while the twilld started on node i has not exited (reaps it if it has).
    pub fn daemon_running(&mut self, i: usize) -> bool {
        self.check_node(i);
        match &mut self.daemons[i - 1] {
            Some(c) => c.try_wait().is_none(),
            None => false,
        }
    }

    pub fn daemon_pid(&self, i: usize) -> Option<u32> {
        self.check_node(i);
        self.daemons[i - 1].as_ref().map(Proc::id)
    }

    /// SIGTERM and wait for exit (SIGKILL after 30 s, reported as an error).
    pub fn stop_daemon(&mut self, i: usize) -> Result<ExitStatus> {
        self.signal_and_wait(i, Signal::SIGTERM)
    }

    /// SIGKILL and reap.
    pub fn kill_daemon(&mut self, i: usize) -> Result<ExitStatus> {
        self.signal_and_wait(i, Signal::SIGKILL)
    }

    /// SIGSTOP: twilld on node i stops running (its sockets stay open, nothing is read)
    /// until `resume_daemon`. Teardown kills a paused daemon like any other.
    pub fn pause_daemon(&mut self, i: usize) -> Result<()> {
        self.signal_daemon(i, Signal::SIGSTOP)
    }

    /// SIGCONT after `pause_daemon`.
    pub fn resume_daemon(&mut self, i: usize) -> Result<()> {
        self.signal_daemon(i, Signal::SIGCONT)
    }

    fn signal_daemon(&mut self, i: usize, sig: Signal) -> Result<()> {
        self.check_node(i);
        let child = self.daemons[i - 1]
            .as_mut()
            .ok_or_else(|| anyhow!("no twilld started on node {i}"))?;
        if child.try_wait().is_some() {
            bail!("twilld on node {i} has exited");
        }
        child
            .signal(sig)
            .with_context(|| format!("{sig} to twilld on node {i}"))
    }

    fn signal_and_wait(&mut self, i: usize, sig: Signal) -> Result<ExitStatus> {
        self.check_node(i);
        let mut child = self.daemons[i - 1]
            .take()
            .ok_or_else(|| anyhow!("no twilld started on node {i}"))?;
        if let Some(status) = child.try_wait() {
            bail!("twilld on node {i} had already exited ({status})");
        }
        kill(Pid::from_raw(child.id() as i32), sig)?;
        match wait_for(DAEMON_STOP_TIMEOUT, || child.try_wait()) {
            // An adopted process's status is unknown: report the signal that was sent.
            Ok(status) => Ok(match child {
                Proc::Child(_) => status,
                Proc::Adopted(_) => ExitStatus::from_raw(sig as i32),
            }),
            Err(_) => {
                child.kill();
                bail!("twilld on node {i} ignored {sig} for {DAEMON_STOP_TIMEOUT:?}; killed")
            }
        }
    }

    /// Wait for the twilld on node i to exit on its own (e.g. refusing a bad config).
    pub fn wait_daemon_exit(&mut self, i: usize, timeout: Duration) -> Result<ExitStatus> {
        self.check_node(i);
        let child = self.daemons[i - 1]
            .as_mut()
            .ok_or_else(|| anyhow!("no twilld started on node {i}"))?;
        let status = wait_for(timeout, || child.try_wait())
            .with_context(|| format!("twilld on node {i} still running"))?;
        self.daemons[i - 1] = None;
        Ok(status)
    }

    /// Everything twilld on node i printed, across restarts.
    pub fn daemon_log(&self, i: usize) -> String {
        std::fs::read_to_string(self.daemon_log_path(i)).unwrap_or_default()
    }

    /// What twilld on node i printed since it was last started.
    pub fn daemon_log_last(&self, i: usize) -> String {
        let log = self.daemon_log(i);
        match log.rfind(START_MARKER) {
            Some(at) => log[at..].to_owned(),
            None => log,
        }
    }

    /// GET `path` from twilld's HTTP server inside node i: (status code, body).
    pub fn get(&self, i: usize, path: &str) -> Result<(u16, String)> {
        let addr: SocketAddr = DAEMON_HTTP.parse().expect("valid address");
        http::get_in_netns(&self.node_ns(i), addr, path)
    }

    /// twilld's /status as JSON.
    pub fn status(&self, i: usize) -> Result<Value> {
        let (code, body) = self.get(i, "/status")?;
        if code != 200 {
            bail!("GET /status on node {i}: {code}: {body}");
        }
        serde_json::from_str(&body)
            .with_context(|| format!("/status on node {i} is not JSON: {body}"))
    }

    /// The value of an unlabelled Prometheus metric from /metrics (None if not exported).
    pub fn metric(&self, i: usize, name: &str) -> Result<Option<f64>> {
        let (code, body) = self.get(i, "/metrics")?;
        if code != 200 {
            bail!("GET /metrics on node {i}: {code}");
        }
        Ok(parse_metric(&body, name))
    }

    /// A lab of `opts`, with the network config `config` in etcd, twilld (with `extra`
    /// arguments) running and ready on every node, and every node holding all the others as
    /// peers.
    pub fn up(opts: LabOptions, config: &str, extra: &[&str]) -> Result<Lab> {
        let n = opts.nodes;
        let mut lab = Lab::new(opts)?;
        lab.put_config(config)?;
        for i in 1..=n {
            lab.start_daemon_with(i, extra)?;
        }
        for i in 1..=n {
            lab.wait_ready(i, Duration::from_secs(30))?;
        }
        lab.wait_meshed()?;
        Ok(lab)
    }

    /// Waits (20 s at most) until every node lists all the others as peers.
    pub fn wait_meshed(&self) -> Result<()> {
        let n = self.nodes();
        wait_until(Duration::from_secs(20), || {
            (1..=n).all(|i| {
                self.status(i)
                    .is_ok_and(|s| s["peers"].as_array().map_or(0, |a| a.len()) == n - 1)
            })
        })
        .context("nodes did not mesh")
    }

    /// Wait until every node has every other node as a peer and has programmed it (a peer
    /// that cannot be programmed, such as host-gw's off-segment one, never satisfies this).
    pub fn wait_programmed(&self, timeout: Duration) -> Result<()> {
        let n = self.nodes();
        wait_until(timeout, || {
            (1..=n).all(|i| {
                self.status(i).is_ok_and(|s| {
                    s["peers"].as_array().is_some_and(|p| {
                        p.len() == n - 1 && p.iter().all(|x| x["programmed"] == true)
                    })
                })
            })
        })
        .context("not every node programmed every peer")
    }

    /// Wait until node i's /readyz answers 200. Fails early, with the log, if twilld exits.
    pub fn wait_ready(&mut self, i: usize, timeout: Duration) -> Result<()> {
        let mut exited = None;
        let res = wait_until(timeout, || {
            if !self.daemon_running(i) {
                exited = Some(());
                return true;
            }
            matches!(self.get(i, "/readyz"), Ok((200, _)))
        });
        if exited.is_some() {
            bail!(
                "twilld on node {i} is not running\n--- log tail ---\n{}",
                tail(&self.daemon_log(i), 40)
            );
        }
        res.with_context(|| {
            format!(
                "twilld on node {i} not ready\n--- log tail ---\n{}",
                tail(&self.daemon_log(i), 40)
            )
        })
    }

    /// Wait until twilld on node i answers `path` at all (any status); fails early, with the
    /// log, if it exits.
    pub fn wait_get(&mut self, i: usize, path: &str, timeout: Duration) -> Result<(u16, String)> {
        let res = wait_for(timeout, || {
            if !self.daemon_running(i) {
                return Some(None);
            }
            self.get(i, path).ok().map(Some)
        });
        match res {
            Ok(Some(answer)) => Ok(answer),
            Ok(None) => bail!(
                "twilld on node {i} is not running\n--- log tail ---\n{}",
                tail(&self.daemon_log(i), 40)
            ),
            Err(e) => Err(e).with_context(|| {
                format!(
                    "twilld on node {i} never answered {path}\n--- log tail ---\n{}",
                    tail(&self.daemon_log(i), 40)
                )
            }),
        }
    }

    /// Pids of the processes this lab started and still tracks (daemons and etcd).
    pub fn pids(&self) -> Vec<u32> {
        self.daemons
            .iter()
            .flatten()
            .map(Proc::id)
            .chain(self.etcd_pid())
            .collect()
    }

    /// Every namespace belonging to this lab (nodes, underlay, and any made with its prefix).
    pub fn namespaces(&self) -> Result<Vec<String>> {
        Ok(netns::list()?
            .into_iter()
            .filter(|n| n.starts_with(&self.prefix))
            .collect())
    }

    fn teardown(&mut self) -> Result<()> {
        for c in self.daemons.iter_mut().flatten() {
            c.kill();
        }
        self.daemons.iter_mut().for_each(|d| *d = None);
        if let Some(mut e) = self.etcd.take() {
            e.kill();
        }
        let ns = remove_namespaces(&self.prefix);
        let dir = remove_dir(&self.dir);
        ns.and(dir)
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        if self.detached {
            return;
        }
        if let Err(e) = self.teardown() {
            eprintln!("lab {}: cleanup failed: {e:#}", self.prefix);
        }
    }
}

/// Defaults overridden by extras: a `--flag` (or `--flag=v`) in `extra` drops the default
/// `--flag <v>` pair, so twilld never sees a flag twice.
pub fn merge_args(defaults: &[String], extra: &[&str]) -> Vec<String> {
    let flag_name = |a: &str| a.split('=').next().unwrap_or(a).to_owned();
    let overridden: Vec<String> = extra
        .iter()
        .filter(|a| a.starts_with("--"))
        .map(|a| flag_name(a))
        .collect();
    let mut out = Vec::new();
    let mut it = defaults.chunks(2);
    for pair in &mut it {
        if !overridden.contains(&pair[0]) {
            out.extend_from_slice(pair);
        }
    }
    out.extend(extra.iter().map(|s| s.to_string()));
    out
}

/// The value of an unlabelled sample `name` in Prometheus text.
pub fn parse_metric(text: &str, name: &str) -> Option<f64> {
    text.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
        let (n, v) = l.split_once(char::is_whitespace)?;
        (n == name).then(|| v.split_whitespace().next()?.parse().ok())?
    })
}

fn generate_prefix() -> Result<String> {
    let pid = std::process::id();
    for _ in 0..36 * 36 {
        let n = COUNTER.fetch_add(1, Ordering::Relaxed) % (36 * 36);
        let digit = |d: u32| char::from_digit(d, 36).expect("base-36 digit");
        let p = format!("{PREFIX_ROOT}{pid}x{}{}", digit(n / 36), digit(n % 36));
        if !netns::list()?.iter().any(|ns| ns.starts_with(&p)) {
            return Ok(p);
        }
    }
    bail!("no free lab prefix left in this process")
}

/// A prefix given by the caller is used as is: it must fit device names and must not match
/// generated lab names (leftovers of a given prefix are removed).
fn check_given_prefix(p: &str) -> Result<()> {
    check_prefix_format(p)?;
    if p.starts_with(PREFIX_ROOT) || PREFIX_ROOT.starts_with(p) {
        bail!("lab prefix {p:?} collides with generated {PREFIX_ROOT}<pid>x.. names");
    }
    Ok(())
}

fn check_prefix_format(p: &str) -> Result<()> {
    if p.is_empty() || p.len() > MAX_PREFIX_LEN || !p.chars().all(|c| c.is_ascii_alphanumeric()) {
        bail!("lab prefix {p:?} must be 1..={MAX_PREFIX_LEN} ASCII letters/digits");
    }
    Ok(())
}

/// Remove every namespace whose name starts with `prefix` (killing what runs inside), and its
/// temp dir.
pub fn remove_prefix(prefix: &str) -> Result<()> {
    let ns = remove_namespaces(prefix);
    let dir = remove_dir(&std::env::temp_dir().join(prefix));
    ns.and(dir)
}

/// Remove every namespace whose name starts with `prefix`, killing what runs inside; returns
/// the names removed.
pub fn remove_namespaces(prefix: &str) -> Result<Vec<String>> {
    let mut errors = Vec::new();
    let mut removed = Vec::new();
    for ns in netns::list()?.into_iter().filter(|n| n.starts_with(prefix)) {
        match netns::kill_all_and_delete(&ns) {
            Ok(()) => removed.push(ns),
            Err(e) => errors.push(format!("{ns}: {e:#}")),
        }
    }
    if !errors.is_empty() {
        bail!("cleanup of {prefix}: {}", errors.join("; "));
    }
    Ok(removed)
}

fn remove_dir(dir: &Path) -> Result<()> {
    if dir.exists() {
        std::fs::remove_dir_all(dir).with_context(|| format!("rm -r {}", dir.display()))?;
    }
    Ok(())
}

/// The pid encoded in a generated lab name (`<root><pid>x...`), if `name` is one.
pub fn owner_pid(root: &str, name: &str) -> Option<i32> {
    let rest = name.strip_prefix(root)?;
    let (pid, tail) = rest.split_once('x')?;
    if pid.is_empty() || !pid.bytes().all(|b| b.is_ascii_digit()) || tail.len() < 2 {
        return None;
    }
    pid.parse().ok()
}

/// Remove leftovers of labs whose process is gone: namespaces (and what runs inside them) and
/// temp dirs named `<root><pid>x..` where no process `pid` lives any more.
pub fn cleanup_stale(root: &str) -> Result<()> {
    let dead = |name: &str| owner_pid(root, name).is_some_and(netns::is_dead);
    let mut stale_prefixes: Vec<String> = netns::list()?
        .into_iter()
        .filter(|n| dead(n))
        .map(|n| n[..lab_prefix_len(root, &n)].to_owned())
        .collect();
    if let Ok(rd) = std::fs::read_dir(std::env::temp_dir()) {
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if dead(&name) {
                stale_prefixes.push(name[..lab_prefix_len(root, &name)].to_owned());
            }
        }
    }
    stale_prefixes.sort();
    stale_prefixes.dedup();
    for p in stale_prefixes {
        remove_prefix(&p)?;
    }
    Ok(())
}

/// Length of the lab prefix `<root><pid>x<2 chars>` at the start of `name`.
fn lab_prefix_len(root: &str, name: &str) -> usize {
    let pid_len = name[root.len()..].find('x').unwrap_or(0);
    (root.len() + pid_len + 3).min(name.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn extras_replace_defaults() {
        let d: Vec<String> = ["--iface", "eth0", "--lease-ttl", "60s", "--http-addr", "a"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        assert_eq!(
            merge_args(&d, &["--lease-ttl=5s", "--public-ip", "1.2.3.4"]),
            [
                "--iface",
                "eth0",
                "--http-addr",
                "a",
                "--lease-ttl=5s",
                "--public-ip",
                "1.2.3.4"
            ]
        );
        assert_eq!(merge_args(&d, &[]), d);
    }

    #[test]
    fn reads_unlabelled_metrics() {
        let text = "# HELP twill_peers x\n# TYPE twill_peers gauge\ntwill_peers 3\ntwill_peers_total 9\ntwill_x 0.5 1700000000\n";
        assert_eq!(parse_metric(text, "twill_peers"), Some(3.0));
        assert_eq!(parse_metric(text, "twill_x"), Some(0.5));
        assert_eq!(parse_metric(text, "twill_missing"), None);
    }

    #[test]
    fn recognises_generated_names() {
        assert_eq!(owner_pid("twl", "twl1234x0au"), Some(1234));
        assert_eq!(owner_pid("twl", "twl1234x0an12"), Some(1234));
        assert_eq!(owner_pid("twl", "twlabcx0au"), None);
        assert_eq!(owner_pid("twl", "twt1234x0au"), None);
        assert_eq!(owner_pid("twl", "twl1234"), None);
        assert_eq!(lab_prefix_len("twl", "twl1234x0an12"), "twl1234x0a".len());
    }
}
