//! What every scenario shares: where the binaries are, labs running twilld with production
//! settings, precise readiness waits, and reading a process's memory and CPU time.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use nix::sched::{setns, CloneFlags};
use twill_tests::{Lab, LabOptions};

use crate::etcd::CONFIG;

pub struct Ctx {
    pub quick: bool,
    /// Where twilld, twill (and this binary) are.
    pub bin_dir: PathBuf,
}

/// twilld's own defaults (30 s resync, 24 h lease), not the lab's test-speed ones: the bench
/// measures what an operator runs.
pub const DAEMON_FLAGS: &[&str] = &["--resync-interval", "30s", "--lease-ttl", "24h"];
pub const READY_TIMEOUT: Duration = Duration::from_secs(120);
pub const DEV: &str = "twill.1";

impl Ctx {
    pub fn lab(&self, nodes: usize) -> Result<Lab> {
        let lab = Lab::new(LabOptions {
            nodes,
            bin_dir: Some(self.bin_dir.clone()),
            ..Default::default()
        })?;
        lab.put_config(CONFIG)?;
        Ok(lab)
    }

    pub fn cni_plugin(&self) -> PathBuf {
        self.bin_dir.join("twill")
    }
}

pub fn start_daemon(lab: &mut Lab, i: usize, extra: &[&str]) -> Result<()> {
    let defaults: Vec<String> = DAEMON_FLAGS.iter().map(|s| s.to_string()).collect();
    let flags = twill_tests::lab::merge_args(&defaults, extra);
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    lab.start_daemon_with(i, &flags)
}

/// Poll /readyz every 5 ms (cheap: a local HTTP GET) and return when it first answered 200.
pub fn wait_ready_precise(lab: &mut Lab, i: usize, timeout: Duration) -> Result<Instant> {
    let deadline = Instant::now() + timeout;
    loop {
        if matches!(lab.get(i, "/readyz"), Ok((200, _))) {
            return Ok(Instant::now());
        }
        if !lab.daemon_running(i) {
            bail!(
                "twilld on node {i} exited\n{}",
                twill_tests::etcd::tail(&lab.daemon_log(i), 30)
            );
        }
        if Instant::now() >= deadline {
            bail!(
                "twilld on node {i} not ready after {timeout:?}\n{}",
                twill_tests::etcd::tail(&lab.daemon_log(i), 30)
            );
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

pub fn metric(lab: &Lab, i: usize, name: &str) -> Result<f64> {
    lab.metric(i, name)?
        .ok_or_else(|| anyhow!("twilld on node {i} does not export {name}"))
}

/// Resident and peak memory of a process, MiB.
pub fn rss_mib(pid: u32) -> Result<(f64, f64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("read /proc/{pid}/status"))?;
    let field = |name: &str| -> Result<f64> {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<f64>().ok())
            .map(|kib| kib / 1024.0)
            .ok_or_else(|| anyhow!("no {name} in /proc/{pid}/status"))
    };
    Ok((field("VmRSS:")?, field("VmHWM:")?))
}

/// User + system CPU time of a process, seconds.
pub fn cpu_seconds(pid: u32) -> Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let rest = stat
        .rsplit_once(')')
        .map(|(_, r)| r)
        .ok_or_else(|| anyhow!("bad /proc/{pid}/stat"))?;
    // Fields after the command: state is index 0, utime index 11, stime index 12.
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = f
        .get(11)
        .zip(f.get(12))
        .and_then(|(u, s)| Some(u.parse::<f64>().ok()? + s.parse::<f64>().ok()?))
        .ok_or_else(|| anyhow!("bad /proc/{pid}/stat"))?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    Ok(ticks / hz)
}

/// Run `f(k)` for k in 0..n, each on its own thread inside `netns`, all released together
/// once every thread has entered the namespace. Returns the results in order and the wall time
/// from release until the last finished.
pub fn ns_parallel<T, F>(netns: &str, n: usize, f: F) -> Result<(Vec<T>, Duration)>
where
    T: Send + 'static,
    F: Fn(usize) -> T + Send + Sync + 'static,
{
    let path = Path::new("/run/netns").join(netns);
    let f = Arc::new(f);
    let barrier = Arc::new(Barrier::new(n + 1));
    let mut handles = Vec::with_capacity(n);
    for k in 0..n {
        let file = File::open(&path).with_context(|| format!("open {}", path.display()))?;
        let (f, barrier) = (f.clone(), barrier.clone());
        handles.push(std::thread::spawn(move || {
            let entered = setns(&file, CloneFlags::CLONE_NEWNET);
            barrier.wait();
            entered.map(|_| f(k))
        }));
    }
    barrier.wait();
    let start = Instant::now();
    let mut out = Vec::with_capacity(n);
    for h in handles {
        out.push(
            h.join()
                .map_err(|_| anyhow!("worker panicked"))?
                .map_err(|e| anyhow!("setns into {netns}: {e}"))?,
        );
    }
    Ok((out, start.elapsed()))
}

pub fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}
