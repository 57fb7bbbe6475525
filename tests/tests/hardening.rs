//! twilld on a node where things are hostile or broken: its HTTP port taken or flooded by a
//! local user, a second twilld started by mistake, directories others can write, an unusable
//! state dir, nonsense durations, CNI_NETNS naming twilld's own namespace. Real twilld, real
//! etcd, real plugin, in lab namespaces.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use twill_tests::lab::{merge_args, DAEMON_HTTP};
use twill_tests::{netns, wait_for, wait_until, Lab, LabOptions};

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

/// A local user holding twilld's HTTP port (an unprivileged one) while twilld starts does not
/// keep the node from coming up: it leases, writes the subnet file and serves CNI, and serves
/// HTTP once the port is free.
#[test]
fn a_squatted_http_port_does_not_keep_the_node_from_starting() -> Result<()> {
    let mut lab = lab_with_config()?;
    let squatter = netns::in_netns(&lab.node_ns(1), || TcpListener::bind(DAEMON_HTTP))??;
    lab.start_daemon(1)?;
    wait_until(READY, || {
        !lab.daemon_running(1) || std::fs::metadata(lab.subnet_file(1)).is_ok()
    })
    .with_context(|| lab.daemon_log(1))?;
    assert!(lab.daemon_running(1), "{}", lab.daemon_log(1));
    let pod = lab.add_pod(1, "a")?;
    assert!(
        lab.daemon_log_last(1).contains("cannot serve HTTP"),
        "{}",
        lab.daemon_log_last(1)
    );
    drop(squatter);
    lab.wait_ready(1, READY)?;
    lab.del_pod(&pod)?;
    Ok(())
}

/// Reads until the server closes the connection; false if it is still open after `limit`.
fn closed_within(s: &mut TcpStream, limit: Duration) -> bool {
    let deadline = Instant::now() + limit;
    let mut buf = [0u8; 512];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return false;
        }
        s.set_read_timeout(Some(left)).unwrap();
        match s.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => {}
            // A timed read fails with EINTR on any signal (signal(7)): read again.
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                return false
            }
            // A reset is closed too.
            Err(_) => return true,
        }
    }
}

/// A local user opening connections to the HTTP port and sending nothing (or a byte now and
/// then) holds at most --http-max-connections of them, each for at most --http-header-timeout.
/// Meanwhile a connection beyond the cap is turned away at once, pods still come up, and a
/// fresh probe is answered as soon as the idle ones are gone.
#[test]
fn idle_http_connections_are_capped_and_dropped_while_pods_come_up() -> Result<()> {
    let mut lab = lab_with_config()?;
    lab.start_daemon_with(
        1,
        &["--http-max-connections", "8", "--http-header-timeout", "3s"],
    )?;
    lab.wait_ready(1, READY)?;
    let addr: SocketAddr = DAEMON_HTTP.parse()?;
    let ns = lab.node_ns(1);
    let mut idle = netns::in_netns(&ns, move || {
        (0..8)
            .map(|_| TcpStream::connect(addr))
            .collect::<std::io::Result<Vec<_>>>()
    })??;
    // The ninth, a client that only listens, hears why it is turned away.
    let mut ninth = netns::in_netns(&ns, move || TcpStream::connect(addr))??;
    ninth.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut answer = String::new();
    ninth.read_to_string(&mut answer)?;
    assert!(
        answer.starts_with("HTTP/1.1 503") && answer.ends_with("too many connections\n"),
        "{answer:?}"
    );
    // Pods come up while every slot is taken.
    let pod = lab.add_pod(1, "a")?;
    for (k, s) in idle.iter_mut().enumerate() {
        assert!(
            closed_within(s, Duration::from_secs(30)),
            "idle connection {k} still open"
        );
    }
    assert_eq!(lab.get(1, "/readyz")?.0, 200);
    let refused = lab.metric(1, "twill_http_connections_refused_total")?;
    assert!(refused >= Some(1.0), "{refused:?}");

    // Headers sent a byte every half second never complete: cut off like an idle connection.
    let closed = netns::in_netns(&ns, move || -> std::io::Result<Option<Duration>> {
        let mut s = TcpStream::connect(addr)?;
        let t0 = Instant::now();
        let dribble = format!("GET /readyz HTTP/1.1\r\nX-Slow: {}", "a".repeat(200));
        for b in dribble.bytes() {
            if s.write_all(&[b]).is_err() || closed_within(&mut s, Duration::from_millis(500)) {
                return Ok(Some(t0.elapsed()));
            }
        }
        Ok(None)
    })??;
    let after = closed.context("a client dribbling its headers for 100 s was never cut off")?;
    assert!(
        after < Duration::from_secs(20),
        "cut off only after {after:?}"
    );
    lab.del_pod(&pod)?;
    Ok(())
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
fn socket_subnet_file_and_state_dirs_others_can_change_are_refused() -> Result<()> {
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
    // The state dir (IPAM records, the VTEP MAC) is held to the same rule.
    let state = open.join("state");
    lab.start_daemon_with(1, &["--state-dir", &state.display().to_string()])?;
    assert!(!lab.wait_daemon_exit(1, EXIT)?.success());
    let log = lab.daemon_log_last(1);
    assert!(
        log.contains("--state-dir")
            && log.contains(&open.display().to_string())
            && log.contains("writable by group or others"),
        "{log}"
    );
    assert!(!state.join("lock").exists() && !state.join("ipam").exists());
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
        ("--http-header-timeout", "0"),
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
