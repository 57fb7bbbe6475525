//! A single-member etcd running inside a lab's underlay namespace.

use std::fs::OpenOptions;
use std::path::{Path, PathBuf};
use std::process::{Child, ExitStatus, Stdio};
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use rand::Rng;

use crate::netns::{check, exec_cmd};
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
    child: Option<Child>,
}

impl Etcd {
    /// Start etcd in `ns` listening on `ip`:<random high port>, retrying with another port if the
    /// one picked is taken; returns once `etcdctl endpoint health` succeeds.
    pub fn start(ns: &str, ip: &str, dir: &Path) -> Result<Self> {
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
        let child = exec_cmd(&self.ns, &args)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("spawn etcd")?;
        self.child = Some(child);
        let healthy = wait_for(START_TIMEOUT, || {
            if let Some(Ok(Some(status))) = self.child.as_mut().map(|c| c.try_wait()) {
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
        format!("http://{}:{}", self.ip, self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
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
        let status = wait_for(STOP_TIMEOUT, || child.try_wait().ok().flatten());
        match status {
            Ok(s) => Ok(s),
            Err(_) => {
                let _ = child.kill();
                Ok(child.wait()?)
            }
        }
    }

    /// SIGKILL and reap; used on teardown.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The last `n` lines of `text`.
pub fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}
