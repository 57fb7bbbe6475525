//! Named network namespaces (/run/netns/<name>) through the `ip` tool, running commands inside
//! them, and running Rust code inside them on a dedicated thread.

use std::fs::File;
use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use nix::sched::{setns, CloneFlags};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use crate::wait::wait_until;

pub const NETNS_DIR: &str = "/run/netns";

/// Run a command to completion; an error only if it cannot be started.
pub fn run(args: &[&str]) -> Result<Output> {
    let (prog, rest) = args.split_first().ok_or_else(|| anyhow!("empty command"))?;
    Command::new(prog)
        .args(rest)
        .output()
        .with_context(|| format!("cannot run {args:?}"))
}

/// Run a command and require success; returns stdout. The error carries stdout and stderr.
pub fn run_ok(args: &[&str]) -> Result<String> {
    let out = run(args)?;
    check(args, out)
}

/// Turn a finished command into its stdout, or an error that shows everything it printed.
pub fn check(args: &[&str], out: Output) -> Result<String> {
    if out.status.success() {
        return Ok(String::from_utf8_lossy(&out.stdout).into_owned());
    }
    bail!(
        "{args:?} failed ({}):\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout).trim_end(),
        String::from_utf8_lossy(&out.stderr).trim_end()
    )
}

/// `ip netns exec <ns> <args...>` as a Command (ip execs the program: the child pid is its pid).
pub fn exec_cmd(ns: &str, args: &[&str]) -> Command {
    let mut c = Command::new("ip");
    c.args(["netns", "exec", ns]).args(args);
    c
}

pub fn exists(name: &str) -> bool {
    Path::new(NETNS_DIR).join(name).exists()
}

pub fn add(name: &str) -> Result<()> {
    run_ok(&["ip", "netns", "add", name]).map(|_| ())
}

/// Names of all named namespaces.
pub fn list() -> Result<Vec<String>> {
    // `ip netns list` prints "name (id: N)" or just "name".
    let out = run_ok(&["ip", "netns", "list"])?;
    Ok(out
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_owned)
        .collect())
}

/// Processes whose network namespace is `name`.
pub fn pids(name: &str) -> Result<Vec<i32>> {
    let out = run_ok(&["ip", "netns", "pids", name])?;
    Ok(out.lines().filter_map(|l| l.trim().parse().ok()).collect())
}

/// SIGKILL every process inside the namespace, then delete it. Waits (bounded) for the
/// processes to be gone so a caller can check that nothing is left behind.
pub fn kill_all_and_delete(name: &str) -> Result<()> {
    if !exists(name) {
        return Ok(());
    }
    for pid in pids(name)? {
        let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
    }
    // Killed children of ours are reaped by their owners; others are reaped by init.
    let _ = wait_until(Duration::from_secs(10), || {
        pids(name)
            .map(|p| p.iter().all(|&p| is_dead(p)))
            .unwrap_or(true)
    });
    run_ok(&["ip", "netns", "del", name]).map(|_| ())
}

/// True if the process does not exist or is a zombie (dead, not yet reaped).
pub fn is_dead(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the parenthesised command name, which may itself contain ')'.
        Ok(stat) => stat
            .rsplit_once(')')
            .map(|(_, rest)| rest.trim_start().starts_with('Z'))
            .unwrap_or(false),
        Err(_) => true,
    }
}

/// True if a live (non-zombie) process with this pid exists.
pub fn alive(pid: i32) -> bool {
    !is_dead(pid)
}

/// Run `f` on a fresh thread that has entered the named network namespace. Sockets opened by
/// `f` belong to that namespace; the calling thread's namespace is untouched.
pub fn in_netns<T, F>(name: &str, f: F) -> Result<T>
where
    T: Send + 'static,
    F: FnOnce() -> T + Send + 'static,
{
    let path = Path::new(NETNS_DIR).join(name);
    let file = File::open(&path).with_context(|| format!("open {}", path.display()))?;
    let ns = name.to_owned();
    std::thread::spawn(move || -> Result<T> {
        setns(&file, CloneFlags::CLONE_NEWNET).with_context(|| format!("setns into {ns}"))?;
        Ok(f())
    })
    .join()
    .map_err(|_| anyhow!("thread inside netns {name} panicked"))?
}

/// Start `f` on a named thread that has entered the named network namespace, and return once
/// it is inside, without waiting for `f`: for long-lived sockets (a traffic stream). Errors
/// here if the namespace cannot be entered; `f`'s value comes with the join.
pub fn spawn_in_netns<T, F>(
    name: &str,
    thread: &str,
    f: F,
) -> Result<std::thread::JoinHandle<Result<T>>>
where
    T: Send + 'static,
    F: FnOnce() -> T + Send + 'static,
{
    let path = Path::new(NETNS_DIR).join(name);
    let file = File::open(&path).with_context(|| format!("open {}", path.display()))?;
    let (entered_tx, entered_rx) = std::sync::mpsc::channel::<Result<(), String>>();
    let ns = name.to_owned();
    let handle = std::thread::Builder::new()
        .name(thread.to_owned())
        .spawn(move || -> Result<T> {
            if let Err(e) = setns(&file, CloneFlags::CLONE_NEWNET) {
                let _ = entered_tx.send(Err(e.to_string()));
                bail!("setns into {ns}: {e}");
            }
            let _ = entered_tx.send(Ok(()));
            Ok(f())
        })
        .context("spawn thread")?;
    match entered_rx.recv() {
        Ok(Ok(())) => Ok(handle),
        Ok(Err(e)) => {
            let _ = handle.join();
            bail!("setns into {name}: {e}")
        }
        Err(_) => bail!("the thread for netns {name} died before entering it"),
    }
}
