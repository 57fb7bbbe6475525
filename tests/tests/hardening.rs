//! twilld on a node where things are hostile or broken: a second twilld started by mistake,
//! directories others can write, an unusable state dir, nonsense durations, CNI_NETNS naming
//! twilld's own namespace. Real twilld, real etcd, real plugin, in lab namespaces.

use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::process::Stdio;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use twill_tests::lab::merge_args;
use twill_tests::{netns, wait_for, Lab, LabOptions};

const CONFIG: &str = r#"{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan"}}"#;
const READY: Duration = Duration::from_secs(30);
const EXIT: Duration = Duration::from_secs(20);

fn lab_with_config() -> Result<Lab> {
    let lab = Lab::new(LabOptions {
        nodes: 1,
        ..Default::default()
    })?;
    lab.put_config(CONFIG)?;
    Ok(lab)
}

fn link_names(lab: &Lab) -> Result<Vec<String>> {
    let out = lab.exec_ok(1, &["ip", "-o", "link", "show"])?;
    Ok(out
        .lines()
        .filter_map(|l| l.split(": ").nth(1))
        .map(|n| n.split('@').next().unwrap_or(n).to_string())
        .collect())
}

fn ipam_files(lab: &Lab) -> usize {
    let Ok(rd) = std::fs::read_dir(lab.state_dir(1).join("ipam")) else {
        return 0;
    };
    rd.flatten()
        .filter_map(|d| std::fs::read_dir(d.path()).ok())
        .map(|f| f.count())
        .sum()
}

/// A second twilld on the same state dir (started by mistake) refuses to start, naming the lock
/// and the pid holding it, and leaves the running one alone.
#[test]
fn a_second_twilld_on_the_same_state_dir_refuses_to_start() -> Result<()> {
    let mut lab = lab_with_config()?;
    lab.start_daemon(1)?;
    lab.wait_ready(1, READY)?;
    let first = lab.daemon_pid(1).context("no pid")?;
    let twilld = lab.bin("twilld")?;
    // Its own HTTP port: only the lock may stop it.
    let args = merge_args(&lab.daemon_args(1), &["--http-addr", "127.0.0.1:9465"]);
    let mut full = vec![twilld.display().to_string()];
    full.extend(args);
    let full: Vec<&str> = full.iter().map(String::as_str).collect();
    let mut second = netns::exec_cmd(&lab.node_ns(1), &full)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    let status = match wait_for(EXIT, || second.try_wait().ok().flatten()) {
        Ok(s) => s,
        Err(_) => {
            let _ = second.kill();
            let _ = second.wait();
            bail!("a second twilld kept running on the same state dir");
        }
    };
    let mut stderr = String::new();
    second
        .stderr
        .take()
        .context("stderr")?
        .read_to_string(&mut stderr)?;
    assert!(!status.success());
    let lock = lab.state_dir(1).join("lock");
    assert!(
        stderr.contains(&lock.display().to_string()) && stderr.contains(&format!("pid {first}")),
        "{stderr}"
    );
    // The first one still serves pods and HTTP.
    let pod = lab.add_pod(1, "a")?;
    assert_eq!(lab.get(1, "/readyz")?.0, 200);
    lab.del_pod(&pod)?;
    assert_eq!(lab.daemon_pid(1), Some(first));
    Ok(())
}

/// The CNI socket and the subnet file go only into directories no one but root can change: a
/// directory others can write, or owned by someone else, stops twilld at once with a message
/// naming it, before it takes a lease.
#[test]
fn socket_and_subnet_file_dirs_others_can_change_are_refused() -> Result<()> {
    let mut lab = lab_with_config()?;
    let open = lab.node_dir(1).join("open");
    std::fs::create_dir_all(&open)?;
    std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o777))?;
    let theirs = lab.node_dir(1).join("theirs");
    std::fs::create_dir_all(&theirs)?;
    nix::unistd::chown(&theirs, Some(nix::unistd::Uid::from_raw(65534)), None)?;
    let cases = [
        (
            "--cni-socket",
            open.join("cni.sock"),
            "writable by group or others",
        ),
        (
            "--subnet-file",
            open.join("subnet.env"),
            "writable by group or others",
        ),
        (
            "--subnet-file",
            theirs.join("subnet.env"),
            "owned by uid 65534",
        ),
    ];
    for (flag, path, why) in cases {
        let arg = path.display().to_string();
        lab.start_daemon_with(1, &[flag, &arg])?;
        let status = lab.wait_daemon_exit(1, EXIT)?;
        assert!(!status.success());
        let log = lab.daemon_log_last(1);
        let dir = path.parent().unwrap().display().to_string();
        assert!(
            log.contains(&dir) && log.contains(why),
            "{flag} {arg}: {log}"
        );
        assert!(!path.exists());
    }
    assert!(lab.lease_keys()?.is_empty(), "a lease was taken");
    Ok(())
}

/// An unusable state dir (here its `ipam` is a file) stops twilld at once, naming the path,
/// before it talks to etcd: no lease taken, no device set up.
#[test]
fn an_unusable_state_dir_stops_twilld_before_it_takes_a_lease() -> Result<()> {
    let mut lab = lab_with_config()?;
    let state = lab.state_dir(1);
    std::fs::create_dir_all(&state)?;
    std::fs::write(state.join("ipam"), "not a directory")?;
    lab.start_daemon(1)?;
    let status = lab.wait_daemon_exit(1, EXIT)?;
    assert!(!status.success());
    let log = lab.daemon_log_last(1);
    assert!(
        log.contains(&state.join("ipam").display().to_string()),
        "{log}"
    );
    assert!(lab.lease_keys()?.is_empty(), "a lease was taken");
    assert!(!link_names(&lab)?.iter().any(|l| l.starts_with("twill")));
    Ok(())
}

/// Zero, too small, too large and overflowing durations stop twilld at its command line, with
/// a message naming the flag and the value; never a panic, never a half-started daemon.
#[test]
fn bad_durations_stop_twilld_with_a_clear_message() -> Result<()> {
    let mut lab = Lab::new(LabOptions {
        nodes: 1,
        etcd: false,
        ..Default::default()
    })?;
    for (flag, value) in [
        ("--resync-interval", "0"),
        ("--resync-interval", "0s"),
        ("--resync-interval", "99999999999h"),
        ("--resync-interval", "5124095576030432h"),
        ("--lease-ttl", "0"),
        ("--lease-ttl", "5s"),
        ("--lease-ttl", "18446744073709551615s1s"),
    ] {
        lab.start_daemon_with(1, &[flag, value])?;
        let status = lab.wait_daemon_exit(1, EXIT)?;
        let log = lab.daemon_log_last(1);
        assert_eq!(status.code(), Some(2), "{flag} {value}: {log}");
        let err = log.lines().find(|l| l.starts_with("error:")).unwrap_or("");
        assert!(
            err.contains(flag) && err.contains(value),
            "{flag} {value}: {log}"
        );
        assert!(!log.contains("panicked"), "{log}");
    }
    Ok(())
}

/// CNI_NETNS naming twilld's own network namespace (/proc/<twilld>/ns/net) is refused with
/// code 4, and nothing is created: no interface among the node's, no address taken.
#[test]
fn twillds_own_netns_is_refused_as_cni_netns() -> Result<()> {
    let mut lab = lab_with_config()?;
    lab.start_daemon(1)?;
    lab.wait_ready(1, READY)?;
    let pid = lab.daemon_pid(1).context("no pid")?;
    let links = link_names(&lab)?;
    let cfg = lab.cni_config(1, "1.0.0");
    let out = lab.cni(
        1,
        "ADD",
        "own",
        &format!("/proc/{pid}/ns/net"),
        "eth0",
        &cfg,
    )?;
    assert!(!out.success, "{}", out.stdout);
    let v = out.json()?;
    assert_eq!(v["code"], 4, "{v}");
    assert!(
        v["msg"]
            .as_str()
            .unwrap_or("")
            .contains("own network namespace"),
        "{v}"
    );
    assert_eq!(link_names(&lab)?, links);
    assert_eq!(ipam_files(&lab), 0);
    // Pods are unaffected.
    let pod = lab.add_pod(1, "a")?;
    lab.del_pod(&pod)?;
    Ok(())
}
