//! twill-lab: a twill cluster on one machine, made of network namespaces, that outlives the
//! command: `up` builds it and shows the pod-to-pod matrix, the other subcommands poke at it,
//! `down` removes it. Run through `scripts/lab`, which installs what is missing and builds.

use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use serde_json::json;

use twill_tests::lab::{remove_namespaces, UNDERLAY_IP};
use twill_tests::labcli::{
    self, conflist, conflist_path, matrix, node_info, parse_node, plugin_config, Cell, CliState,
    LabPod, NodeInfo, DEFAULT_PREFIX, DEFAULT_STATE, GONE,
};
use twill_tests::{netns, wait_until, Lab, LabOptions};

const READY_TIMEOUT: Duration = Duration::from_secs(60);
const PEERS_TIMEOUT: Duration = Duration::from_secs(60);
/// How long `up`/`add-node` let a failing pod pair retry while the overlay converges.
const SETTLE: Duration = Duration::from_secs(15);

#[derive(Parser)]
#[command(
    name = "twill-lab",
    about = "A twill cluster on this machine: nodes and pods in network namespaces, a real etcd, \
             one twilld per node, pods made through the twill CNI plugin",
    long_about = "A twill cluster on this machine: nodes and pods in network namespaces, a real \
        etcd, one twilld per node, pods made through the twill CNI plugin as a container runtime \
        would. Nothing is changed in the machine's own network namespace. The lab keeps running \
        after `up` returns; `down` removes everything it made. Needs root.\n\n\
        Usually run as `./scripts/lab <subcommand>`, which raises privileges through sudo when \
        needed; its `up` installs what is missing and builds twill first."
)]
struct Cli {
    /// The lab's state file; the lab's files go in a directory next to it.
    #[arg(long, env = "TWILL_LAB_STATE", default_value = DEFAULT_STATE, global = true)]
    state: PathBuf,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Bring up a lab (or show the one that is up) and print nodes and the pod matrix.
    #[command(
        long_about = "Bring up a lab: an underlay bridge with etcd on 198.18.0.1, N node \
        namespaces (198.18.0.11, .12, ...) each running twilld, the twill CNI plugin with a \
        conflist per node (<lab dir>/n<i>/net.d/10-twill.conflist), and M pods per node made \
        through the plugin. Then prints the nodes (subnet, public IP, VTEP MAC, ready) and the \
        pod-to-pod matrix: a TCP exchange from every pod to every other pod, its round-trip \
        time, and whether the receiver saw the sender's own pod IP (no NAT). Exits non-zero if \
        any pair fails. If a lab is already up, says so and shows its status."
    )]
    Up(UpArgs),
    /// Show the nodes and probe the pod-to-pod matrix again.
    #[command(
        long_about = "Show the nodes (subnet, public IP, VTEP MAC, ready) and probe the \
        pod-to-pod matrix again. Exits non-zero if any pair fails (pods of a killed node always \
        do) or no lab is up."
    )]
    Status(StatusArgs),
    /// Run a command inside a node's or a pod's network namespace.
    #[command(
        long_about = "Run a command inside a node's network namespace (n1 or 1) or a \
        pod's (its name as printed, e.g. n1-a), with this terminal's stdin/stdout/stderr. The \
        command's exit code is passed through. Example: exec n1-a -- ping -c3 10.244.7.2"
    )]
    Exec(ExecArgs),
    /// Take a node away: kill -9 its twilld and delete its pods and its namespace.
    #[command(
        long_about = "Take a node away as if the machine died: SIGKILL its twilld, delete \
        its pods' namespaces and its own namespace (with its VXLAN device and veth). Other nodes \
        keep working; they drop the node's routes when its lease expires in etcd (60 s). The \
        node's number is not reused. Shows the matrix afterwards: its pods fail, the rest pass."
    )]
    KillNode(KillNodeArgs),
    /// Add a node: namespace, veth to the underlay, twilld, and its pods.
    #[command(
        long_about = "Add a node with the next number: namespace, veth to the underlay \
        bridge, twilld (it leases a subnet from etcd), its conflist, and M pods made through the \
        plugin. Waits until the other nodes have it as a peer, then shows the matrix. Exits \
        non-zero if the new node's pods cannot reach or be reached by every live pod."
    )]
    AddNode(AddNodeArgs),
    /// Remove everything the lab made: namespaces, devices, processes, files.
    #[command(
        long_about = "Remove everything the lab made: every namespace with the lab's \
        prefix (which takes the devices inside with it), etcd and every twilld, the lab's \
        directory and the state file. Works on a half-built or half-removed lab (falls back to \
        the prefix when the state is missing or unreadable). Exits 0 when nothing is up."
    )]
    Down(DownArgs),
}

#[derive(Args)]
struct UpArgs {
    /// Number of nodes.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u8).range(1..=100))]
    nodes: u8,
    /// Pods per node.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u8).range(0..=26))]
    pods: u8,
    /// Name prefix of the lab's namespaces (<prefix>u, <prefix>n1, <prefix>p1a, ...).
    #[arg(long, env = "TWILL_LAB_PREFIX", default_value = DEFAULT_PREFIX)]
    prefix: String,
    /// How nodes carry pod traffic: vxlan (kernel VXLAN), host-gw (plain routes, nodes share
    /// the underlay bridge), vxlan-direct (VXLAN with DirectRouting: direct routes to peers on
    /// the same segment) or udp (userspace tunnel over a TUN device).
    #[arg(long, default_value = "vxlan", value_parser = ["vxlan", "host-gw", "vxlan-direct", "udp"])]
    backend: String,
    /// Dual stack: the underlay gets IPv6 too (fd00:198:18::/64), the network an IPv6 pod
    /// network (fd00:10:244::/56), every pod an address of each family, and the matrix probes
    /// both. With the vxlan, vxlan-direct and host-gw backends (udp carries IPv4 only).
    #[arg(long)]
    ipv6: bool,
}

#[derive(Args)]
struct StatusArgs {
    /// Print JSON (nodes, pods, matrix) instead of tables.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct ExecArgs {
    /// n<i> or <i> for a node, the pod's name (n1-a) for a pod.
    target: String,
    /// The command and its arguments, after `--`.
    #[arg(last = true, required = true)]
    cmd: Vec<String>,
}

#[derive(Args)]
struct KillNodeArgs {
    /// n<i> or <i>.
    node: String,
}

#[derive(Args)]
struct AddNodeArgs {
    /// Pods on the new node (default: as many as `up` made per node).
    #[arg(long, value_parser = clap::value_parser!(u8).range(0..=26))]
    pods: Option<u8>,
}

#[derive(Args)]
struct DownArgs {
    /// Prefix to clean up when there is no readable state file.
    #[arg(long, env = "TWILL_LAB_PREFIX", default_value = DEFAULT_PREFIX)]
    prefix: String,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if !nix::unistd::geteuid().is_root() {
        eprintln!(
            "twill-lab: must run as root (it creates network namespaces); ./scripts/lab runs it through sudo"
        );
        return ExitCode::from(2);
    }
    let out = Out::new();
    let res = match cli.cmd {
        Cmd::Up(a) => up(&out, &cli.state, a),
        Cmd::Status(a) => status(&out, &cli.state, a.json),
        Cmd::Exec(a) => exec(&cli.state, a),
        Cmd::KillNode(a) => kill_node(&out, &cli.state, a),
        Cmd::AddNode(a) => add_node(&out, &cli.state, a),
        Cmd::Down(a) => down(&out, &cli.state, &a.prefix),
    };
    match res {
        Ok(code) => code,
        Err(e) => {
            eprintln!("twill-lab: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Output styling: colours and symbols on a terminal, plain words when piped.
struct Out {
    color: bool,
}

impl Out {
    fn new() -> Out {
        Out {
            color: std::io::stdout().is_terminal() && std::env::var_os("NO_COLOR").is_none(),
        }
    }

    fn paint(&self, code: &str, s: &str) -> String {
        if self.color {
            format!("\x1b[{code}m{s}\x1b[0m")
        } else {
            s.to_owned()
        }
    }

    fn good(&self, s: &str) -> String {
        self.paint("32", s)
    }

    fn bad(&self, s: &str) -> String {
        self.paint("31", s)
    }

    fn dim(&self, s: &str) -> String {
        self.paint("2", s)
    }

    fn bold(&self, s: &str) -> String {
        self.paint("1", s)
    }

    fn ok_word(&self) -> &'static str {
        if self.color {
            "✓"
        } else {
            "ok"
        }
    }

    fn fail_word(&self) -> &'static str {
        if self.color {
            "✗"
        } else {
            "FAIL"
        }
    }

    /// A progress line (stderr, so stdout stays the report).
    fn step(&self, s: &str) {
        let arrow = if std::io::stderr().is_terminal() {
            "\x1b[36m▸\x1b[0m"
        } else {
            "-"
        };
        eprintln!("{arrow} {s}");
    }
}

fn lab_cmd() -> String {
    std::env::var("TWILL_LAB_CMD").unwrap_or_else(|_| "twill-lab".into())
}

fn lab_dir(state_path: &Path, prefix: &str) -> PathBuf {
    state_path
        .parent()
        .unwrap_or(Path::new("/run/twill-lab"))
        .join(prefix)
}

// ---- up ----

fn up(out: &Out, state_path: &Path, a: UpArgs) -> Result<ExitCode> {
    if let Some(st) = load_state_lenient(state_path) {
        if st.lab.is_some() && netns::exists(&format!("{}u", st.prefix)) {
            out.step(&format!(
                "a lab is already up (prefix {}, state {}); showing its status — `{} down` removes it",
                st.prefix,
                state_path.display(),
                lab_cmd()
            ));
            return status(out, state_path, false);
        }
        out.step("a previous lab was never finished or is gone; cleaning it up first");
        down(out, state_path, &st.prefix)?;
    }
    if a.ipv6 && a.backend == "udp" {
        bail!("--ipv6 needs the vxlan, vxlan-direct or host-gw backend: udp carries IPv4 only");
    }
    let nodes = a.nodes as usize;
    let pods = a.pods as usize;
    let dir = lab_dir(state_path, &a.prefix);
    let leftovers: Vec<String> = netns::list()?
        .into_iter()
        .filter(|n| n.starts_with(&a.prefix))
        .collect();
    if !leftovers.is_empty() {
        out.step(&format!(
            "removing {} leftover namespaces with prefix {}",
            leftovers.len(),
            a.prefix
        ));
    }
    let mut st = CliState {
        prefix: a.prefix.clone(),
        dir: dir.clone(),
        pods_per_node: pods,
        lab: None,
        pods: Vec::new(),
        killed: Vec::new(),
    };
    // Saved before anything exists, so `down` knows the prefix and dir whatever happens next.
    st.save(state_path)?;
    out.step(&format!(
        "creating the underlay (namespace {p}u, bridge {p}br, 198.18.0.1/24) and {nodes} node namespaces",
        p = a.prefix
    ));
    out.step(&format!(
        "starting etcd on {UNDERLAY_IP} and waiting until it is healthy"
    ));
    let built = Lab::new(LabOptions {
        nodes,
        prefix: Some(a.prefix.clone()),
        etcd: true,
        dir: Some(dir.clone()),
        detachable: true,
        ipv6: a.ipv6,
        ..Default::default()
    });
    let mut lab = match built {
        Ok(lab) => lab,
        Err(e) => {
            // Lab::new removes what it built on failure; the state file is ours to remove.
            let _ = std::fs::remove_file(state_path);
            return Err(e.context("building the lab failed (everything it made was removed)"));
        }
    };
    // From here a failure tears the lab down (drop) and removes the state file.
    let res = bring_up(
        out,
        &mut lab,
        &mut st,
        state_path,
        &labcli::network_config(&a.backend, a.ipv6),
    );
    match res {
        Ok(()) => {
            st.lab = Some(lab.detach());
            st.save(state_path)?;
        }
        Err(e) => {
            out.step("bring-up failed; removing everything it made");
            drop(lab);
            let _ = std::fs::remove_file(state_path);
            return Err(e);
        }
    }
    report(out, state_path, &st, Some(SETTLE), true).map(|(code, _)| code)
}

fn bring_up(
    out: &Out,
    lab: &mut Lab,
    st: &mut CliState,
    state_path: &Path,
    config: &str,
) -> Result<()> {
    st.lab = Some(lab.state());
    st.save(state_path)?;
    out.step(&format!(
        "etcd is up at {}; writing the network config {config}",
        lab.etcd_endpoint()
    ));
    lab.put_config(config)?;
    for i in 1..=lab.nodes() {
        start_node(out, lab, i)?;
        st.lab = Some(lab.state());
        st.save(state_path)?;
    }
    for i in 1..=lab.nodes() {
        wait_ready(out, lab, i)?;
    }
    let live: Vec<usize> = (1..=lab.nodes()).collect();
    wait_peers(out, lab, &live)?;
    for i in 1..=lab.nodes() {
        add_pods(out, lab, st, i, st.pods_per_node)?;
        st.lab = Some(lab.state());
        st.save(state_path)?;
    }
    Ok(())
}

fn start_node(out: &Out, lab: &mut Lab, i: usize) -> Result<()> {
    let path = conflist_path(lab, i);
    std::fs::create_dir_all(path.parent().expect("conflist has a parent"))?;
    std::fs::write(
        &path,
        serde_json::to_string_pretty(&conflist(lab, i))? + "\n",
    )
    .with_context(|| format!("write {}", path.display()))?;
    out.step(&format!(
        "n{i}: starting twilld in {} (log {})",
        lab.node_ns(i),
        lab.daemon_log_path(i).display()
    ));
    lab.start_daemon(i)
}

fn wait_ready(out: &Out, lab: &mut Lab, i: usize) -> Result<()> {
    out.step(&format!(
        "n{i}: waiting for twilld to lease a subnet and answer /readyz"
    ));
    lab.wait_ready(i, READY_TIMEOUT)
}

/// Wait until each live node has every other live node as a programmed peer.
fn wait_peers(out: &Out, lab: &mut Lab, live: &[usize]) -> Result<()> {
    if live.len() < 2 {
        return Ok(());
    }
    out.step(&format!(
        "waiting for every node to program its {} peers (routes, neighbours, FDB)",
        live.len() - 1
    ));
    let subnets: Vec<String> = live
        .iter()
        .map(|&i| {
            lab.status(i)
                .ok()
                .and_then(|s| s["node"]["subnet"].as_str().map(str::to_owned))
                .unwrap_or_default()
        })
        .collect();
    wait_until(PEERS_TIMEOUT, || {
        live.iter().all(|&i| {
            let Ok(s) = lab.status(i) else { return false };
            let peers = s["peers"].as_array().cloned().unwrap_or_default();
            let own = s["node"]["subnet"].as_str().unwrap_or_default().to_owned();
            subnets.iter().filter(|sub| **sub != own).all(|sub| {
                peers.iter().any(|p| {
                    p["subnet"].as_str() == Some(sub) && p["programmed"].as_bool() == Some(true)
                })
            })
        })
    })
    .context("the nodes did not all see each other as peers")
}

fn add_pods(out: &Out, lab: &mut Lab, st: &mut CliState, i: usize, count: usize) -> Result<()> {
    let list: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(conflist_path(lab, i)).context("read the node's conflist")?,
    )?;
    let cfg = plugin_config(&list).ok_or_else(|| anyhow!("conflist without plugins"))?;
    for k in 0..count {
        let name = labcli::pod_name(i, k);
        let pod = lab
            .add_pod_with_config(i, &labcli::pod_letter(k), &cfg)
            .with_context(|| format!("pod {name}"))?;
        let ip6 = pod.ip6.map_or(String::new(), |a| format!(" and {a}"));
        out.step(&format!(
            "{name}: CNI ADD through the twill plugin -> {}{ip6} in namespace {}",
            pod.ip, pod.ns
        ));
        st.pods.push(LabPod { name, pod });
    }
    Ok(())
}

// ---- status and the report ----

fn status(out: &Out, state_path: &Path, as_json: bool) -> Result<ExitCode> {
    let mut sess = Session::open(state_path)?;
    if as_json {
        let (lab, st) = sess.parts();
        let nodes = all_nodes(lab, st);
        let cells = matrix(st, None, |_| {});
        let ok = cells.iter().all(|c| c.ok);
        let pods: Vec<_> = st
            .pods
            .iter()
            .map(|p| json!({"name": p.name, "node": p.pod.node, "ip": p.pod.ip, "ip6": p.pod.ip6, "namespace": p.pod.ns}))
            .collect();
        println!(
            "{}",
            serde_json::to_string_pretty(&json!({
                "prefix": st.prefix, "dir": st.dir, "etcd": lab.etcd_endpoint(),
                "nodes": nodes, "pods": pods, "matrix": cells, "ok": ok,
            }))?
        );
        sess.close()?;
        return Ok(if ok {
            ExitCode::SUCCESS
        } else {
            ExitCode::FAILURE
        });
    }
    let st = sess.st.clone();
    sess.close()?;
    report(out, state_path, &st, None, false).map(|(code, _)| code)
}

fn all_nodes(lab: &mut Lab, st: &CliState) -> Vec<NodeInfo> {
    (1..=lab.nodes()).map(|i| node_info(lab, st, i)).collect()
}

/// Print the nodes and the matrix; the exit code says whether every pair passed.
fn report(
    out: &Out,
    state_path: &Path,
    st: &CliState,
    settle: Option<Duration>,
    hints: bool,
) -> Result<(ExitCode, Vec<Cell>)> {
    let mut sess = Session::open(state_path)?;
    let (lab, _) = sess.parts();
    let nodes = all_nodes(lab, st);
    let etcd = lab.etcd_endpoint();
    sess.close()?;
    print_nodes(out, &nodes, &etcd, st);
    let n = st.pods.len();
    if n < 2 {
        println!("\n(fewer than two pods: no matrix)");
        return Ok((ExitCode::SUCCESS, Vec::new()));
    }
    let dual = st.pods.iter().all(|p| p.pod.ip6.is_some());
    out.step(&format!(
        "probing {} pod pairs over TCP (port {}){}",
        n * (n - 1),
        labcli::PROBE_PORT,
        if dual { ", on IPv4 and on IPv6" } else { "" }
    ));
    let cells = matrix(st, settle, |_| {});
    print_matrix(out, st, &cells);
    let ok = cells.iter().all(|c| c.ok);
    if ok && hints {
        let cmd = lab_cmd();
        let first = &st.pods[0];
        let last = &st.pods[n - 1];
        let hints = [
            (
                format!("exec {} -- ping -c3 {}", first.name, last.pod.ip),
                "pod to pod across nodes",
            ),
            (
                "exec n1 -- ip route".to_string(),
                "the node's overlay routes",
            ),
            (
                "kill-node 2 / add-node / status".to_string(),
                "lose a node, add one, look",
            ),
            ("down".to_string(), "remove everything"),
        ];
        let width = hints.iter().map(|(c, _)| c.len()).max().unwrap_or(0);
        println!("\nTry:");
        for (c, why) in hints {
            println!("  {cmd} {c:<width$}  # {why}");
        }
    }
    let code = if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    };
    Ok((code, cells))
}

/// One family's matrix (`cells` of that family).
fn print_family_matrix(out: &Out, st: &CliState, family: &str, cells: &[&Cell]) {
    println!();
    let title = if family == "IPv6" {
        "IPv6 pod-to-pod matrix"
    } else {
        "pod-to-pod matrix"
    };
    println!(
        "{}",
        out.bold(&format!("{title}: row = sender, column = receiver; TCP round trip, and the receiver must see the sender's pod IP (no NAT)"))
    );
    const W: usize = 10;
    let name_w = st.pods.iter().map(|p| p.name.len()).max().unwrap_or(4) + 1;
    let v6 = family == "IPv6";
    let ip_w = if v6 { 24 } else { 15 };
    let mut header = format!("{:<name_w$}{:<ip_w$}", "", "");
    for p in &st.pods {
        header.push_str(&format!("{:>W$}", p.name));
    }
    println!("{header}");
    for a in &st.pods {
        let ip = if v6 {
            a.pod.ip6.map_or("-".to_string(), |x| x.to_string())
        } else {
            a.pod.ip.to_string()
        };
        let mut line = format!("{:<name_w$}{:<ip_w$}", a.name, ip);
        for b in &st.pods {
            let text = if a.name == b.name {
                out.dim(&format!("{:>W$}", "·"))
            } else {
                match cells.iter().find(|c| c.from == a.name && c.to == b.name) {
                    Some(c) if c.ok => {
                        let s = format!("{} {:.2}ms", out.ok_word(), c.rtt_ms.unwrap_or(0.0));
                        out.good(&format!("{s:>W$}"))
                    }
                    Some(c) if c.error.as_deref().is_some_and(|e| e.contains(GONE)) => {
                        out.bad(&format!("{:>W$}", format!("{} gone", out.fail_word())))
                    }
                    _ => out.bad(&format!("{:>W$}", out.fail_word())),
                }
            };
            line.push_str(&text);
        }
        println!("{line}");
    }
}

fn print_nodes(out: &Out, nodes: &[NodeInfo], etcd: &str, st: &CliState) {
    println!(
        "{}",
        out.bold(&format!(
            "twill lab {}: {} nodes, etcd {etcd}, files in {}",
            st.prefix,
            nodes.len(),
            st.dir.display()
        ))
    );
    println!();
    println!(
        "{:<5} {:<12} {:<16} {:<15} {:<18} {:<6} twilld",
        "node", "underlay", "subnet", "public IP", "VTEP MAC", "peers"
    );
    for n in nodes {
        let state = if n.killed {
            out.bad("killed")
        } else if n.ready {
            out.good(&format!(
                "{} ready (pid {})",
                out.ok_word(),
                n.daemon_pid.unwrap_or(0)
            ))
        } else {
            out.bad(&format!(
                "{} {}",
                out.fail_word(),
                n.note.as_deref().unwrap_or("not ready")
            ))
        };
        let dash = || "-".to_owned();
        println!(
            "{:<5} {:<12} {:<16} {:<15} {:<18} {:<6} {}",
            n.name,
            n.underlay_ip.to_string(),
            n.subnet.clone().unwrap_or_else(dash),
            n.public_ip.clone().unwrap_or_else(dash),
            n.vtep_mac.clone().unwrap_or_else(dash),
            if n.killed {
                dash()
            } else {
                n.peers.to_string()
            },
            state
        );
    }
}

fn print_matrix(out: &Out, st: &CliState, cells: &[Cell]) {
    for family in ["IPv4", "IPv6"] {
        let of: Vec<&Cell> = cells.iter().filter(|c| c.family == family).collect();
        if of.is_empty() {
            continue;
        }
        print_family_matrix(out, st, family, &of);
    }
    let total = cells.len();
    let passed = cells.iter().filter(|c| c.ok).count();
    println!();
    if passed == total {
        println!(
            "{}",
            out.good(&format!(
                "{} {passed}/{total} pod pairs reachable, every receiver saw the sender's own pod IP (no NAT)",
                out.ok_word()
            ))
        );
    } else {
        println!(
            "{}",
            out.bad(&format!(
                "{} {passed}/{total} pod pairs passed; failures:",
                out.fail_word()
            ))
        );
        for c in cells.iter().filter(|c| !c.ok) {
            println!(
                "  {} -> {} ({}): {}",
                c.from,
                c.to,
                c.family,
                c.error.as_deref().unwrap_or("failed")
            );
        }
    }
    let _ = std::io::stdout().flush();
}

// ---- exec, kill-node, add-node ----

fn exec(state_path: &Path, a: ExecArgs) -> Result<ExitCode> {
    let mut sess = Session::open(state_path)?;
    let (lab, st) = sess.parts();
    let ns = if let Some(p) = st.pod(&a.target) {
        if st.is_killed(p.pod.node) {
            bail!(
                "pod {} was on node n{}, which was killed",
                p.name,
                p.pod.node
            );
        }
        p.pod.ns.clone()
    } else if let Some(i) = parse_node(&a.target).filter(|&i| i <= lab.nodes()) {
        if st.is_killed(i) {
            bail!("node n{i} was killed");
        }
        lab.node_ns(i)
    } else {
        let pods: Vec<&str> = st.pods.iter().map(|p| p.name.as_str()).collect();
        bail!(
            "no node or pod {:?} (nodes n1..n{}, pods {})",
            a.target,
            lab.nodes(),
            pods.join(" ")
        );
    };
    sess.close()?;
    let args: Vec<&str> = a.cmd.iter().map(String::as_str).collect();
    let status = netns::exec_cmd(&ns, &args)
        .status()
        .with_context(|| format!("run {args:?} in {ns}"))?;
    use std::os::unix::process::ExitStatusExt;
    let code = match (status.code(), status.signal()) {
        (Some(c), _) => c,
        (None, Some(sig)) => 128 + sig,
        _ => 1,
    };
    Ok(ExitCode::from(code.clamp(0, 255) as u8))
}

fn kill_node(out: &Out, state_path: &Path, a: KillNodeArgs) -> Result<ExitCode> {
    let mut sess = Session::open(state_path)?;
    let (lab, st) = sess.parts();
    let i = parse_node(&a.node)
        .filter(|&i| i <= lab.nodes())
        .ok_or_else(|| anyhow!("no node {:?} (nodes n1..n{})", a.node, lab.nodes()))?;
    if st.is_killed(i) {
        bail!("node n{i} was already killed");
    }
    let res = (|| -> Result<()> {
        match lab.daemon_pid(i) {
            Some(pid) if lab.daemon_running(i) => {
                lab.kill_daemon(i)?;
                out.step(&format!("n{i}: twilld (pid {pid}) killed with SIGKILL"));
            }
            _ => out.step(&format!("n{i}: twilld was not running")),
        }
        for p in st.pods.iter().filter(|p| p.pod.node == i) {
            netns::kill_all_and_delete(&p.pod.ns)?;
            out.step(&format!("{}: namespace {} deleted", p.name, p.pod.ns));
        }
        let ns = lab.node_ns(i);
        netns::kill_all_and_delete(&ns)?;
        out.step(&format!(
            "n{i}: namespace {ns} deleted (its VXLAN device and veth with it)"
        ));
        Ok(())
    })();
    st.killed.push(i);
    let st = st.clone();
    sess.close()?;
    res?;
    out.step(&format!(
        "n{i} is gone; its lease stays in etcd until it expires (60 s), then the others drop its routes"
    ));
    // The matrix shows the effect; kill-node itself succeeded.
    report(out, state_path, &st, None, false)?;
    Ok(ExitCode::SUCCESS)
}

fn add_node(out: &Out, state_path: &Path, a: AddNodeArgs) -> Result<ExitCode> {
    let mut sess = Session::open(state_path)?;
    let (lab, st) = sess.parts();
    let pods = a.pods.map_or(st.pods_per_node, usize::from);
    let res = (|| -> Result<usize> {
        out.step("creating a node namespace and its veth to the underlay bridge");
        let i = lab.add_node()?;
        st.lab = Some(lab.state());
        st.save(state_path)?;
        start_node(out, lab, i)?;
        st.lab = Some(lab.state());
        st.save(state_path)?;
        wait_ready(out, lab, i)?;
        let live: Vec<usize> = (1..=lab.nodes()).filter(|&n| !st.is_killed(n)).collect();
        wait_peers(out, lab, &live)?;
        add_pods(out, lab, st, i, pods)?;
        Ok(i)
    })();
    // Whatever was made is recorded, so `status` shows it and `down` removes it.
    let st = st.clone();
    sess.close()?;
    let i = res?;
    let new: Vec<&str> = st
        .pods
        .iter()
        .filter(|p| p.pod.node == i)
        .map(|p| p.name.as_str())
        .collect();
    out.step(&format!("n{i} joined with pods {}", new.join(" ")));
    let (_, cells) = report(out, state_path, &st, Some(SETTLE), false)?;
    // The verdict is about the new node: its pods and every live pod, both ways.
    let bad: Vec<&Cell> = cells
        .iter()
        .filter(|c| new.contains(&c.from.as_str()) || new.contains(&c.to.as_str()))
        .filter(|c| {
            let live = |name: &str| st.pod(name).is_some_and(|p| !st.is_killed(p.pod.node));
            live(&c.from) && live(&c.to) && !c.ok
        })
        .collect();
    if bad.is_empty() {
        Ok(ExitCode::SUCCESS)
    } else {
        eprintln!("twill-lab: {} pairs with n{i}'s pods failed", bad.len());
        Ok(ExitCode::FAILURE)
    }
}

// ---- down ----

fn down(out: &Out, state_path: &Path, default_prefix: &str) -> Result<ExitCode> {
    let st = load_state_lenient(state_path);
    let prefix = st
        .as_ref()
        .map_or(default_prefix.to_owned(), |s| s.prefix.clone());
    let dir = st
        .as_ref()
        .map_or_else(|| lab_dir(state_path, &prefix), |s| s.dir.clone());
    let mut did = Vec::new();
    let mut errors = Vec::new();
    let dir_existed = dir.exists();
    // The processes first (by the pids recorded, checked against their start time), then
    // whatever still lives in the namespaces.
    if let Some(lab_state) = st.as_ref().and_then(|s| s.lab.clone()) {
        match Lab::attach(lab_state) {
            Ok(lab) => {
                let pids = lab.pids();
                if !pids.is_empty() {
                    did.push(format!("{} processes", pids.len()));
                }
                // Dropping an attached lab kills its processes, deletes its namespaces and dir.
                drop(lab);
            }
            Err(e) => errors.push(format!("{e:#}")),
        }
    }
    match remove_namespaces(&prefix) {
        Ok(removed) if !removed.is_empty() => did.push(format!("{} namespaces", removed.len())),
        Ok(_) => {}
        Err(e) => errors.push(format!("{e:#}")),
    }
    if dir.exists() {
        if let Err(e) = std::fs::remove_dir_all(&dir) {
            errors.push(format!("rm -r {}: {e}", dir.display()));
        }
    }
    if dir_existed && !dir.exists() {
        did.push(dir.display().to_string());
    }
    for f in [
        state_path.to_path_buf(),
        state_path.with_extension("json.tmp"),
    ] {
        if f.exists() {
            match std::fs::remove_file(&f) {
                Ok(()) => did.push(f.display().to_string()),
                Err(e) => errors.push(format!("rm {}: {e}", f.display())),
            }
        }
    }
    // The state directory is ours when it is the default one; leave it only if not empty.
    if state_path == Path::new(DEFAULT_STATE) {
        if let Some(parent) = state_path.parent() {
            let _ = std::fs::remove_dir(parent);
        }
    }
    if !errors.is_empty() {
        bail!("down left something behind: {}", errors.join("; "));
    }
    if did.is_empty() && st.is_none() {
        println!("no lab is up (prefix {prefix}); nothing to remove");
    } else {
        println!(
            "{} lab {prefix} removed: {}",
            out.good(out.ok_word()),
            if did.is_empty() {
                "nothing was left".to_owned()
            } else {
                did.join(", ")
            }
        );
    }
    Ok(ExitCode::SUCCESS)
}

// ---- state ----

/// The state, or None when there is none or it cannot be read (reported on stderr).
fn load_state_lenient(path: &Path) -> Option<CliState> {
    match CliState::load(path) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("twill-lab: ignoring the state file: {e:#}");
            None
        }
    }
}

/// The running lab taken over from the state file. It is never torn down here: dropping the
/// session (also on an error or a panic) lets go of the lab and saves the state.
struct Session {
    lab: Option<Lab>,
    st: CliState,
    path: PathBuf,
}

impl Session {
    fn open(state_path: &Path) -> Result<Session> {
        let (lab, st) = attach(state_path)?;
        Ok(Session {
            lab: Some(lab),
            st,
            path: state_path.to_path_buf(),
        })
    }

    fn parts(&mut self) -> (&mut Lab, &mut CliState) {
        (
            self.lab
                .as_mut()
                .expect("the session holds the lab until closed"),
            &mut self.st,
        )
    }

    /// Let go of the lab (it keeps running) and save its state.
    fn close(mut self) -> Result<()> {
        self.release()
    }

    fn release(&mut self) -> Result<()> {
        match self.lab.take() {
            Some(lab) => {
                self.st.lab = Some(lab.detach());
                self.st.save(&self.path)
            }
            None => Ok(()),
        }
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        if let Err(e) = self.release() {
            eprintln!("twill-lab: saving the state: {e:#}");
        }
    }
}

/// Take over the running lab recorded in the state file.
fn attach(state_path: &Path) -> Result<(Lab, CliState)> {
    let st = CliState::load(state_path)?.ok_or_else(|| {
        anyhow!(
            "no lab is up (no state at {}); start one with `{} up`",
            state_path.display(),
            lab_cmd()
        )
    })?;
    let lab_state = st.lab.clone().ok_or_else(|| {
        anyhow!(
            "the lab at {} was never fully built; `{} down` cleans it up",
            state_path.display(),
            lab_cmd()
        )
    })?;
    Ok((Lab::attach(lab_state)?, st))
}
