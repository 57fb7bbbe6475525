//! The lab CLI end to end: the `twill-lab` binary brings up a lab that outlives it, shows an
//! all-green matrix with no NAT, and kill-node / add-node / down do what they say. Each run
//! uses its own prefix (`twx<pid><tag>`) and state file, so it never touches a user's lab.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use serde_json::Value;
use twill_tests::labcli::CliState;
use twill_tests::proc::ProcId;
use twill_tests::{bins, netns, wait_until, Lab, LabOptions};

const ROOT: &str = "twx";

/// A private lab for one test; `down` runs on drop (also when the test panics), then whatever
/// is left with the prefix is removed.
struct LabCli {
    prefix: String,
    dir: PathBuf,
    state: PathBuf,
    bin_dir: PathBuf,
}

impl LabCli {
    /// `tag`: a letter per test, so no test's prefix is a prefix of another's.
    fn new(tag: char) -> Result<LabCli> {
        cleanup_stale()?;
        let bin_dir = bins::default_bin_dir();
        bins::ensure_built(&bin_dir)?;
        let prefix = format!("{ROOT}{}{tag}", std::process::id());
        let dir = std::env::temp_dir().join(&prefix);
        std::fs::create_dir_all(&dir)?;
        Ok(LabCli {
            state: dir.join("state.json"),
            prefix,
            dir,
            bin_dir,
        })
    }

    fn run(&self, args: &[&str]) -> Output {
        let out = Command::new(env!("CARGO_BIN_EXE_twill-lab"))
            .args(args)
            .env("TWILL_LAB_STATE", &self.state)
            .env("TWILL_LAB_PREFIX", &self.prefix)
            .env("TWILL_BIN_DIR", &self.bin_dir)
            .env_remove("NO_COLOR")
            .output()
            .expect("run twill-lab");
        eprintln!(
            "$ twill-lab {}\n-> {}\n{}{}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        out
    }

    fn run_ok(&self, args: &[&str]) -> Result<String> {
        let out = self.run(args);
        ensure!(out.status.success(), "twill-lab {args:?} failed");
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// `status --json` (its exit code only says whether every pair passed).
    fn status(&self) -> Result<Value> {
        let out = self.run(&["status", "--json"]);
        serde_json::from_slice(&out.stdout).context("status --json output")
    }

    fn saved(&self) -> Result<CliState> {
        CliState::load(&self.state)?.context("no state file")
    }

    fn namespaces(&self) -> Vec<String> {
        netns::list()
            .unwrap_or_default()
            .into_iter()
            .filter(|n| n.starts_with(&self.prefix))
            .collect()
    }
}

impl Drop for LabCli {
    fn drop(&mut self) {
        let _ = self.run(&["down"]);
        let _ = twill_tests::lab::remove_namespaces(&self.prefix);
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Namespaces and dirs of earlier runs whose process is gone.
fn cleanup_stale() -> Result<()> {
    let dead_owner = |name: &str| {
        let digits: String = name
            .strip_prefix(ROOT)
            .unwrap_or_default()
            .chars()
            .take_while(char::is_ascii_digit)
            .collect();
        digits.parse::<i32>().is_ok_and(netns::is_dead) && name.starts_with(ROOT)
    };
    for ns in netns::list()?.into_iter().filter(|n| dead_owner(n)) {
        netns::kill_all_and_delete(&ns)?;
    }
    for e in std::fs::read_dir(std::env::temp_dir())?.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if dead_owner(&name) {
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
    Ok(())
}

fn cells(status: &Value) -> Vec<Value> {
    status["matrix"].as_array().cloned().unwrap_or_default()
}

fn pod_ip(status: &Value, name: &str) -> Option<Ipv4Addr> {
    status["pods"]
        .as_array()?
        .iter()
        .find(|p| p["name"] == name)?["ip"]
        .as_str()?
        .parse()
        .ok()
}

/// Every pair among `pods` passed, and the receiver saw the sender's own pod IP.
fn assert_all_reach(status: &Value, pods: &[&str]) {
    let mut checked = 0;
    for c in cells(status) {
        let (from, to) = (c["from"].as_str().unwrap(), c["to"].as_str().unwrap());
        if !pods.contains(&from) || !pods.contains(&to) {
            continue;
        }
        assert_eq!(c["ok"], true, "{from} -> {to} failed: {c}");
        let seen: Ipv4Addr = c["source_seen"].as_str().unwrap().parse().unwrap();
        assert_eq!(Some(seen), pod_ip(status, from), "NAT on {from} -> {to}");
        checked += 1;
    }
    assert_eq!(checked, pods.len() * (pods.len() - 1), "missing cells");
}

fn daemon_pids(st: &CliState) -> Vec<ProcId> {
    let lab = st.lab.as_ref().expect("lab in state");
    lab.daemons
        .iter()
        .flatten()
        .copied()
        .chain(lab.etcd.as_ref().and_then(|e| e.process))
        .collect()
}

#[test]
fn lab_cli_up_poke_and_down() -> Result<()> {
    let lab = LabCli::new('a')?;

    // up: three nodes, two pods each, every pod reaches every pod without NAT.
    let up = lab.run_ok(&["up", "--nodes", "3", "--pods", "2"])?;
    assert!(up.contains("30/30 pod pairs reachable"), "{up}");
    assert!(
        !up.contains("FAIL") && !up.contains('\x1b'),
        "piped output is plain: {up}"
    );
    let s = lab.status()?;
    assert_eq!(s["ok"], true);
    let nodes = s["nodes"].as_array().unwrap();
    assert_eq!(nodes.len(), 3);
    for n in nodes {
        assert_eq!(n["ready"], true, "{n}");
        assert!(n["subnet"]
            .as_str()
            .is_some_and(|x| x.starts_with("10.244.")));
        assert!(n["vtep_mac"].as_str().is_some());
    }
    let all = ["n1-a", "n1-b", "n2-a", "n2-b", "n3-a", "n3-b"];
    assert_all_reach(&s, &all);
    // The conflist a runtime would use, one per node, with the node's socket.
    let st = lab.saved()?;
    let list: Value = serde_json::from_str(&std::fs::read_to_string(
        st.dir.join("n2/net.d/10-twill.conflist"),
    )?)?;
    assert_eq!(list["plugins"][0]["type"], "twill");
    assert_eq!(
        list["plugins"][0]["socket"],
        st.dir.join("n2/cni.sock").display().to_string()
    );

    // The lab outlived the `up` process: etcd and the daemons still run.
    let procs = daemon_pids(&st);
    assert_eq!(procs.len(), 4);
    assert!(procs.iter().all(ProcId::alive), "{procs:?}");

    // up again: says so, changes nothing.
    let again = lab.run(&["up"]);
    assert!(again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("already up"));
    assert_eq!(daemon_pids(&lab.saved()?), procs);

    // exec: in a pod and in a node, exit codes passed through.
    let n1a = pod_ip(&s, "n1-a").unwrap();
    let addr = lab.run_ok(&[
        "exec", "n1-a", "--", "ip", "-4", "-o", "addr", "show", "eth0",
    ])?;
    assert!(addr.contains(&format!("{n1a}/24")), "{addr}");
    let n3b = pod_ip(&s, "n3-b").unwrap().to_string();
    lab.run_ok(&["exec", "n1-a", "--", "ping", "-c1", "-W2", &n3b])?;
    let node = lab.run_ok(&["exec", "n2", "--", "ip", "-4", "-o", "addr", "show", "eth0"])?;
    assert!(node.contains("198.18.0.12/24"), "{node}");
    assert_eq!(
        lab.run(&["exec", "2", "--", "sh", "-c", "exit 7"])
            .status
            .code(),
        Some(7)
    );
    assert!(!lab.run(&["exec", "n7-z", "--", "true"]).status.success());

    // kill-node 2: its daemon and namespaces are gone, the others still reach each other.
    let n2_daemon = st.lab.as_ref().unwrap().daemons[1].unwrap();
    lab.run_ok(&["kill-node", "n2"])?;
    assert!(!n2_daemon.alive());
    let left = lab.namespaces();
    for gone in ["n2", "p2a", "p2b"] {
        assert!(!left.contains(&format!("{}{gone}", lab.prefix)), "{left:?}");
    }
    let s = lab.status()?;
    assert_eq!(s["ok"], false, "n2's pods must fail");
    assert_all_reach(&s, &["n1-a", "n1-b", "n3-a", "n3-b"]);
    let n2_cells: Vec<Value> = cells(&s)
        .into_iter()
        .filter(|c| {
            c["from"].as_str().unwrap().starts_with("n2-")
                || c["to"].as_str().unwrap().starts_with("n2-")
        })
        .collect();
    assert_eq!(n2_cells.len(), 30 - 12);
    assert!(n2_cells.iter().all(|c| c["ok"] == false), "{n2_cells:?}");
    assert!(!lab.run(&["exec", "n2-a", "--", "true"]).status.success());

    // add-node: n4 joins and its pods reach and are reached by every live pod.
    lab.run_ok(&["add-node"])?;
    let s = lab.status()?;
    let n4 = &s["nodes"][3];
    assert_eq!(n4["name"], "n4");
    assert_eq!(n4["ready"], true, "{n4}");
    assert_eq!(n4["underlay_ip"], "198.18.0.14");
    assert_all_reach(&s, &["n1-a", "n1-b", "n3-a", "n3-b", "n4-a", "n4-b"]);

    // down: nothing of the lab is left.
    let procs = daemon_pids(&lab.saved()?);
    assert_eq!(procs.len(), 4, "n1, n3, n4 and etcd");
    let down = lab.run_ok(&["down"])?;
    assert!(down.contains("removed"), "{down}");
    assert!(lab.namespaces().is_empty(), "{:?}", lab.namespaces());
    assert!(procs.iter().all(|p| !p.alive()), "{procs:?}");
    assert!(!lab.state.exists());
    assert!(!st.dir.exists());
    // down with nothing up is fine.
    let again = lab.run_ok(&["down"])?;
    assert!(again.contains("no lab is up"), "{again}");
    assert!(!lab.run(&["status"]).status.success());
    Ok(())
}

/// `down` cleans up a lab whose `up` never finished: only the prefix is known.
#[test]
fn lab_cli_up_with_another_backend() -> Result<()> {
    let lab = LabCli::new('e')?;
    let up = lab.run_ok(&["up", "--nodes", "2", "--pods", "1", "--backend", "host-gw"])?;
    assert!(up.contains("2/2 pod pairs reachable"), "{up}");
    let s = lab.status()?;
    for n in s["nodes"].as_array().context("no nodes")? {
        assert!(n["vtep_mac"].is_null(), "host-gw has no VTEP: {n}");
    }
    // Pod traffic between nodes goes by plain routes: no VXLAN device on any node.
    let links = lab.run_ok(&["exec", "n1", "--", "ip", "-d", "link", "show"])?;
    assert!(!links.contains("vxlan"), "{links}");
    let routes = lab.run_ok(&["exec", "n1", "--", "ip", "-4", "route"])?;
    assert!(routes.contains("via 198.18.0.12"), "{routes}");
    // A backend twill does not have is refused before anything is made.
    let bad = lab.run(&["up", "--backend", "ipip"]);
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("possible values"));
    Ok(())
}

#[test]
fn lab_cli_up_dual_stack_probes_both_families() -> Result<()> {
    let lab = LabCli::new('d')?;
    // IPv6 with a backend that does not serve it is refused before anything is made.
    let bad = lab.run(&["up", "--ipv6", "--backend", "udp"]);
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("udp carries IPv4 only"));
    let up = lab.run_ok(&["up", "--nodes", "2", "--pods", "1", "--ipv6"])?;
    assert!(up.contains("IPv6 pod-to-pod matrix"), "{up}");
    assert!(up.contains("4/4 pod pairs reachable"), "{up}");
    let s = lab.status()?;
    let v6: Vec<Value> = cells(&s)
        .into_iter()
        .filter(|c| c["family"] == "IPv6")
        .collect();
    assert_eq!(v6.len(), 2, "{s}");
    for c in &v6 {
        let from = c["from"].as_str().unwrap();
        let ip6 = s["pods"]
            .as_array()
            .and_then(|p| p.iter().find(|p| p["name"] == from))
            .and_then(|p| p["ip6"].as_str())
            .context("no ip6 in status")?;
        assert_eq!(c["ok"], true, "{c}");
        assert_eq!(c["source_seen"].as_str(), Some(ip6), "NAT on {c}");
    }
    Ok(())
}

#[test]
fn lab_cli_down_removes_a_partial_lab() -> Result<()> {
    let lab = LabCli::new('b')?;
    let under = format!("{}u", lab.prefix);
    let node = format!("{}n1", lab.prefix);
    netns::add(&under)?;
    netns::add(&node)?;
    // A process running in the half-built lab, as a killed `up` leaves behind.
    let mut sleeper = netns::exec_cmd(&node, &["sleep", "600"]).spawn()?;
    std::fs::write(
        &lab.state,
        format!(
            r#"{{"prefix":"{}","dir":"{}","pods_per_node":2,"lab":null,"pods":[],"killed":[]}}"#,
            lab.prefix,
            lab.dir.join(&lab.prefix).display()
        ),
    )?;
    // status refuses a lab that was never fully built, and says how to clean it.
    let st = lab.run(&["status"]);
    assert!(!st.status.success());
    assert!(String::from_utf8_lossy(&st.stderr).contains("down"));
    lab.run_ok(&["down"])?;
    assert!(lab.namespaces().is_empty(), "{:?}", lab.namespaces());
    wait_until(Duration::from_secs(10), || {
        matches!(sleeper.try_wait(), Ok(Some(_)))
    })?;
    assert!(!lab.state.exists());

    // A corrupt state file: down falls back to the prefix.
    netns::add(&node)?;
    std::fs::write(&lab.state, "{not json")?;
    let out = lab.run(&["down"]);
    assert!(out.status.success());
    assert!(lab.namespaces().is_empty());
    assert!(!lab.state.exists());
    Ok(())
}

#[test]
fn every_subcommand_explains_itself() {
    let expect = [
        ("up", "pod-to-pod matrix"),
        ("status", "probe the"),
        ("exec", "exit code is passed through"),
        ("kill-node", "SIGKILL its twilld"),
        ("add-node", "next number"),
        ("down", "Exits 0 when nothing is up"),
    ];
    for (sub, words) in expect {
        let out = Command::new(env!("CARGO_BIN_EXE_twill-lab"))
            .args([sub, "--help"])
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).replace('\n', " ");
        let text = text.split_whitespace().collect::<Vec<_>>().join(" ");
        assert!(out.status.success(), "{sub} --help");
        assert!(text.contains(words), "{sub} --help: {text}");
    }
}

/// Not root and no sudo: both the wrapper and the binary refuse before touching anything, and
/// the wrapper says how to run it. (With sudo, the wrapper re-runs itself through it; the
/// fresh-root check as a normal user shows that path: `scripts/fresh-root --user`.)
#[test]
fn refuses_without_root() {
    if Command::new("setpriv").arg("--help").output().is_err() {
        panic!("setpriv (util-linux) is needed to run a command as another user");
    }
    let as_nobody = |prog: &Path, args: &[&str]| {
        Command::new("setpriv")
            .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
            .arg(prog)
            .args(args)
            .env("TWILL_LAB_STATE", "/nonexistent/state.json")
            // As on a machine without sudo (this one may have it).
            .env("TWILL_SUDO", "/nonexistent/sudo")
            .output()
            .unwrap()
    };
    let out = as_nobody(Path::new(env!("CARGO_BIN_EXE_twill-lab")), &["up"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("must run as root"));
    let script = bins::workspace_dir().join("scripts/lab");
    let out = as_nobody(&script, &["up"]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("needs root") && err.contains("sudo is not installed"),
        "{err}"
    );
}

/// The harness side of persistence: a detached lab keeps running; attaching takes it over and
/// dropping that tears everything down.
#[test]
fn detached_lab_is_attached_and_torn_down() -> Result<()> {
    let mut lab = Lab::new(LabOptions {
        nodes: 1,
        detachable: true,
        ..Default::default()
    })?;
    lab.put_config(r#"{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan"}}"#)?;
    lab.start_daemon(1)?;
    lab.wait_ready(1, Duration::from_secs(30))?;
    let prefix = lab.prefix().to_owned();
    let dir = lab.dir().to_path_buf();
    let state = lab.detach();
    let daemon = state.daemons[0].unwrap();
    let etcd = state.etcd.as_ref().unwrap().process.unwrap();
    assert!(daemon.alive() && etcd.alive());
    assert!(netns::exists(&format!("{prefix}n1")) && dir.exists());

    let mut again = Lab::attach(state)?;
    assert!(again.daemon_running(1));
    assert_eq!(again.daemon_pid(1), Some(daemon.pid));
    assert_eq!(again.status(1)?["ready"], true);
    again.etcdctl(&["endpoint", "health"])?;
    // Stopping an adopted daemon and starting a new one works as for a child.
    again.stop_daemon(1)?;
    assert!(!daemon.alive());
    again.start_daemon(1)?;
    again.wait_ready(1, Duration::from_secs(30))?;
    let new_daemon = ProcId::of(again.daemon_pid(1).unwrap());
    drop(again);
    assert!(!new_daemon.alive() && !etcd.alive());
    assert!(!netns::list()?.iter().any(|n| n.starts_with(&prefix)));
    assert!(!dir.exists());
    Ok(())
}
