//! A single-member etcd running inside a lab's underlay namespace.

use std::fs::OpenOptions;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use rand::Rng;
use serde::{Deserialize, Serialize};

use crate::netns::{check, exec_cmd};
use crate::proc::{Proc, ProcId};
use crate::wait::wait_for;

const START_TIMEOUT: Duration = Duration::from_secs(60);
const STOP_TIMEOUT: Duration = Duration::from_secs(20);
const PORT_ATTEMPTS: usize = 5;

pub struct Etcd {
    ns: String,
    ip: String,
    port: u16,
    peer_port: u16,
    data_dir: PathBuf,
    log: PathBuf,
    child: Option<Proc>,
    /// Start etcd in a session of its own, so it outlives the process that started it.
    new_session: bool,
}

/// What it takes to manage a running etcd again from another process.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct EtcdState {
    pub port: u16,
    pub peer_port: u16,
    pub process: Option<ProcId>,
}

impl Etcd {
    /// Start etcd in `ns` listening on `ip`:<random high port>, retrying with another port if the
    /// one picked is taken; returns once `etcdctl endpoint health` succeeds.
    pub fn start(ns: &str, ip: &str, dir: &Path) -> Result<Self> {
        Self::start_opts(ns, ip, dir, false)
    }

    /// Like `start`; with `new_session` etcd runs in a session of its own (see `detach`).
    pub fn start_opts(ns: &str, ip: &str, dir: &Path, new_session: bool) -> Result<Self> {
        let mut last_err = None;
        for _ in 0..PORT_ATTEMPTS {
            let mut rng = rand::rng();
            let mut etcd = Etcd {
                ns: ns.to_owned(),
                ip: ip.to_owned(),
                port: rng.random_range(20000..40000),
                peer_port: rng.random_range(40000..60000),
                data_dir: dir.join("etcd-data"),
                log: dir.join("etcd.log"),
                child: None,
                new_session,
            };
            match etcd.start_again() {
                Ok(()) => return Ok(etcd),
                Err(e) if etcd.log_text().contains("address already in use") => last_err = Some(e),
                Err(e) => return Err(e),
            }
        }
        Err(last_err.unwrap_or_else(|| anyhow!("etcd did not start")))
    }

    /// (Re)start on the same port with the same data directory.
    pub fn start_again(&mut self) -> Result<()> {
        if self.child.is_some() {
            bail!("etcd is already running");
        }
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .with_context(|| format!("open {}", self.log.display()))?;
        let client = self.endpoint();
        let peer = format!("http://127.0.0.1:{}", self.peer_port);
        let data_dir = self.data_dir.to_string_lossy().into_owned();
        let args = [
            "etcd",
            "--name",
            "lab",
            "--data-dir",
            &data_dir,
            "--listen-client-urls",
            &client,
            "--advertise-client-urls",
            &client,
            "--listen-peer-urls",
            &peer,
            "--initial-advertise-peer-urls",
            &peer,
            "--initial-cluster",
            &format!("lab={peer}"),
            "--log-level",
            "warn",
        ];
        let mut cmd = exec_cmd(&self.ns, &args);
        cmd.stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        if self.new_session {
            new_session(&mut cmd);
        }
        let child = cmd.spawn().context("spawn etcd")?;
        self.child = Some(Proc::Child(child));
        let healthy = wait_for(START_TIMEOUT, || {
            if let Some(Some(status)) = self.child.as_mut().map(Proc::try_wait) {
                return Some(Err(anyhow!("etcd exited: {status}")));
            }
            self.ctl(&["endpoint", "health"]).ok().map(|_| Ok(()))
        })
        .and_then(|r| r);
        if let Err(e) = healthy {
            self.kill();
            bail!(
                "etcd not healthy: {e}\n--- etcd log tail ---\n{}",
                tail(&self.log_text(), 30)
            );
        }
        Ok(())
    }

    pub fn endpoint(&self) -> String {
        if self.ip.contains(':') {
            format!("http://[{}]:{}", self.ip, self.port)
        } else {
            format!("http://{}:{}", self.ip, self.port)
        }
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Proc::id)
    }

    /// What `attach` needs to manage this etcd from another process.
    pub fn state(&self) -> EtcdState {
        EtcdState {
            port: self.port,
            peer_port: self.peer_port,
            process: self.child.as_ref().map(Proc::proc_id),
        }
    }

    /// Manage an etcd started by another process (from its `state`); a process that is gone
    /// counts as stopped.
    pub fn attach(ns: &str, ip: &str, dir: &Path, state: &EtcdState) -> Etcd {
        Etcd {
            ns: ns.to_owned(),
            ip: ip.to_owned(),
            port: state.port,
            peer_port: state.peer_port,
            data_dir: dir.join("etcd-data"),
            log: dir.join("etcd.log"),
            child: state.process.filter(ProcId::alive).map(Proc::Adopted),
            new_session: true,
        }
    }

    /// Let go of the process without stopping it: it keeps running after this is dropped.
    pub fn detach(&mut self) {
        self.child = None;
    }

    pub fn running(&self) -> bool {
        self.child.is_some()
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Run etcdctl (v3 API) inside the namespace against this etcd; returns stdout.
    pub fn ctl(&self, args: &[&str]) -> Result<String> {
        let endpoints = format!("--endpoints={}", self.endpoint());
        let mut full = vec![
            "etcdctl",
            &endpoints,
            "--dial-timeout=2s",
            "--command-timeout=10s",
        ];
        full.extend_from_slice(args);
        let out = exec_cmd(&self.ns, &full)
            .env("ETCDCTL_API", "3")
            .stdin(Stdio::null())
            .output()
            .context("run etcdctl")?;
        check(&full, out)
    }

    /// `ctl` with `input` on stdin: etcdctl `put <key>` without a value reads it from there,
    /// for values larger than a command line argument may be (128 KiB).
    pub fn ctl_input(&self, args: &[&str], input: &[u8]) -> Result<String> {
        use std::io::Write;
        let endpoints = format!("--endpoints={}", self.endpoint());
        let mut full = vec![
            "etcdctl",
            &endpoints,
            "--dial-timeout=2s",
            "--command-timeout=10s",
        ];
        full.extend_from_slice(args);
        let mut child = exec_cmd(&self.ns, &full)
            .env("ETCDCTL_API", "3")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("run etcdctl")?;
        let mut stdin = child.stdin.take().context("etcdctl stdin")?;
        let input = input.to_vec();
        // Written from a thread: etcdctl's output pipes must be drained meanwhile.
        let writer = std::thread::spawn(move || stdin.write_all(&input));
        let out = child.wait_with_output().context("wait for etcdctl")?;
        writer
            .join()
            .map_err(|_| anyhow!("etcdctl stdin writer panicked"))?
            .context("write etcdctl stdin")?;
        check(&full, out)
    }

    /// The current revision of the key space.
    pub fn revision(&self) -> Result<i64> {
        let out = self.ctl(&["endpoint", "status", "-w", "json"])?;
        let v: serde_json::Value = serde_json::from_str(&out).context("endpoint status json")?;
        v[0]["Status"]["header"]["revision"]
            .as_i64()
            .ok_or_else(|| anyhow!("no revision in {out}"))
    }

    /// Compact (physically) up to the current revision; returns that revision.
    pub fn compact(&self) -> Result<i64> {
        let rev = self.revision()?;
        self.ctl(&["compact", &rev.to_string(), "--physical"])?;
        Ok(rev)
    }

    /// Graceful stop (SIGTERM, then SIGKILL if it does not exit).
    pub fn stop(&mut self) -> Result<ExitStatus> {
        let mut child = self
            .child
            .take()
            .ok_or_else(|| anyhow!("etcd is not running"))?;
        let _ = kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM);
        let status = wait_for(STOP_TIMEOUT, || child.try_wait());
        match status {
            Ok(s) => Ok(s),
            Err(_) => {
                child.kill();
                Ok(child.try_wait().unwrap_or_else(|| {
                    std::os::unix::process::ExitStatusExt::from_raw(Signal::SIGKILL as i32)
                }))
            }
        }
    }

    /// SIGKILL and reap; used on teardown.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            c.kill();
        }
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Make the command's process the leader of a new session: no controlling terminal, not in
/// the caller's process group, so neither a terminal hangup nor a Ctrl-C meant for the caller
/// reaches it.
pub fn new_session(cmd: &mut std::process::Command) {
    // SAFETY: setsid is async-signal-safe and touches no memory of the parent.
    unsafe {
        cmd.pre_exec(|| {
            if libc::setsid() == -1 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// The last `n` lines of `text`.
pub fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}
