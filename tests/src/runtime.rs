//! Real container runtimes on lab nodes, networked through the twill CNI plugin: podman with
//! its CNI backend and containerd driven by `ctr run --cni`.
//!
//! Each runtime instance runs "on" a node: in the node's network namespace (so the plugin puts
//! the host veth there) and in a private mount namespace held open by a `sleep` process. Inside
//! that mount namespace tmpfs hides /run, /var/lib, /dev/shm and /opt, and the CNI config and
//! plugin dirs are bind mounts of lab dirs: podman's netns mounts and SHM locks, libcni's result
//! cache, containerd's shim sockets and runc state never touch the machine's own directories.
//! Storage (podman --root, containerd root/state) lives in the lab dir. Dropping a runtime
//! removes its containers and kills every process left in its mount namespace (and their
//! children: the container processes).

use std::fs;
use std::io::{BufRead, BufReader};
use std::net::Ipv4Addr;
use std::os::unix::fs::{symlink, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde_json::{json, Value};

use crate::lab::Lab;
use crate::netns::{self, check};
use crate::wait::{wait_for, wait_until};

/// Applets linked into the busybox image (the binary is busybox-static's).
const BUSYBOX_APPLETS: &[&str] = &[
    "sh", "nc", "netstat", "ip", "sleep", "cat", "ls", "ping", "ifconfig", "true", "timeout",
];
const BUSYBOX: &str = "/bin/busybox";
/// The name of the busybox image in every runtime.
pub const IMAGE: &str = "localhost/bb:latest";
/// The CNI network name the twill conflist declares.
pub const NETWORK: &str = "twill";
const STOP_TIMEOUT: Duration = Duration::from_secs(20);

/// Build `<dir>/bb.tar`: a root filesystem with busybox-static and applet symlinks.
pub fn busybox_rootfs_tar(dir: &Path) -> Result<PathBuf> {
    let root = dir.join("bb-rootfs");
    let bin = root.join("bin");
    fs::create_dir_all(&bin)?;
    fs::copy(BUSYBOX, bin.join("busybox"))
        .with_context(|| format!("copy {BUSYBOX} (is busybox-static installed?) into the image"))?;
    for a in BUSYBOX_APPLETS {
        symlink("busybox", bin.join(a))?;
    }
    fs::create_dir_all(root.join("tmp"))?;
    let tar = dir.join("bb.tar");
    netns::run_ok(&[
        "tar",
        "-C",
        &root.display().to_string(),
        "-cf",
        &tar.display().to_string(),
        ".",
    ])?;
    Ok(tar)
}

/// A conflist with the twill plugin alone, talking to node i's twilld.
pub fn twill_conflist(lab: &Lab, i: usize, cni_version: &str) -> Value {
    json!({
        "cniVersion": cni_version,
        "name": NETWORK,
        "plugins": [{"type": "twill", "socket": lab.cni_socket(i).display().to_string()}],
    })
}

/// The log of twill plugin calls in a runtime's dir, one `VERB netns=[..] id=..` a line.
const CNI_CALLS: &str = "cni-calls.log";

/// The twill plugin calls a runtime made, oldest first.
fn cni_calls(dir: &Path) -> Vec<String> {
    fs::read_to_string(dir.join(CNI_CALLS))
        .unwrap_or_default()
        .lines()
        .map(str::to_owned)
        .collect()
}

/// `<dir>/cni-bin`: the twill plugin (behind a call-recording wrapper) plus the reference plugins (loopback, ...) as symlinks.
fn plugin_dir(lab: &mut Lab, dir: &Path) -> Result<PathBuf> {
    let out = dir.join("cni-bin");
    fs::create_dir_all(&out)?;
    // A wrapper that records each call (verb, netns, container id) before exec'ing twill.
    let wrapper = format!(
        "#!/bin/sh\necho \"$CNI_COMMAND netns=[$CNI_NETNS] id=$CNI_CONTAINERID\" >> '{log}'\n\
         exec '{twill}' \"$@\"\n",
        log = dir.join(CNI_CALLS).display(),
        twill = lab.bin("twill")?.display(),
    );
    fs::write(out.join("twill"), wrapper)?;
    fs::set_permissions(out.join("twill"), fs::Permissions::from_mode(0o755))?;
    if let Ok(entries) = fs::read_dir("/usr/lib/cni") {
        for e in entries.flatten() {
            let name = e.file_name();
            if name != "twill" {
                symlink(e.path(), out.join(name))?;
            }
        }
    }
    Ok(out)
}

fn write_conflist(dir: &Path, conflist: &Value) -> Result<PathBuf> {
    let netd = dir.join("net.d");
    fs::create_dir_all(&netd)?;
    fs::write(
        netd.join("10-twill.conflist"),
        serde_json::to_string_pretty(conflist)?,
    )?;
    Ok(netd)
}

/// A private mount namespace inside a node's network namespace, held by a `sleep`.
pub struct MountNs {
    holder: Child,
    node_ns: String,
    mnt: PathBuf,
}

impl MountNs {
    /// Hide /run, /var/lib, /dev/shm and /opt behind tmpfs, bind `cni_conf` over
    /// /etc/cni/net.d and `cni_bin` over /opt/cni/bin. /run/netns stays a peer of the
    /// machine's: twilld (outside) opens the netns paths podman creates there.
    pub fn start(node_ns: &str, dir: &Path, cni_conf: &Path, cni_bin: &Path) -> Result<MountNs> {
        let keep = dir.join("netns-peer");
        fs::create_dir_all(&keep)?;
        // Every mount but /run/netns becomes private first, so nothing mounted here
        // propagates out; a bind of the shared /run/netns joins its peer group.
        let script = format!(
            "set -e
             [ -d /etc/cni/net.d ] || {{ echo 'no /etc/cni/net.d to bind over' >&2; exit 1; }}
             awk '{{print $5}}' /proc/self/mountinfo | grep -v '^/run/netns' | sort -u |
               while read -r m; do mount --make-private \"$m\" 2>/dev/null || true; done
             for d in /run /var/lib /dev/shm /opt /etc/cni/net.d '{keep}'; do
               if findmnt -n -o PROPAGATION --target $d | grep -qv '^private$'; then
                 echo \"$d is on a mount that is not private\" >&2; exit 1
               fi
             done
             mount --bind /run/netns '{keep}'
             for d in /run /var/lib /dev/shm /opt; do mount -t tmpfs -o mode=755 twillrt $d; done
             mkdir -p /run/netns /opt/cni/bin
             mount --bind '{keep}' /run/netns
             mount --bind '{conf}' /etc/cni/net.d
             mount --bind '{bin}' /opt/cni/bin
             echo ready
             exec sleep 86400",
            keep = keep.display(),
            conf = cni_conf.display(),
            bin = cni_bin.display(),
        );
        let mut holder = Command::new("nsenter")
            .arg(format!("--net={}/{node_ns}", netns::NETNS_DIR))
            .args([
                "unshare",
                "--mount",
                "--propagation",
                "unchanged",
                "sh",
                "-c",
            ])
            .arg(&script)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("spawn the mount namespace holder")?;
        let mut line = String::new();
        let stdout = holder.stdout.take().expect("piped stdout");
        let _ = BufReader::new(stdout).read_line(&mut line);
        if line.trim() != "ready" {
            let _ = holder.kill();
            let out = holder.wait_with_output()?;
            bail!(
                "mount namespace setup failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        let mnt = PathBuf::from(format!("/proc/{}/ns/mnt", holder.id()));
        Ok(MountNs {
            holder,
            node_ns: node_ns.to_owned(),
            mnt,
        })
    }

    pub fn pid(&self) -> u32 {
        self.holder.id()
    }

    /// A command run inside this mount namespace and the node's network namespace. nsenter
    /// opens both namespace files before entering either, so the node's /run/netns entry is
    /// still reachable although /run is hidden inside.
    pub fn command(&self, args: &[&str]) -> Command {
        let mut c = Command::new("nsenter");
        c.arg(format!("--mount={}", self.mnt.display()))
            .arg(format!("--net={}/{}", netns::NETNS_DIR, self.node_ns))
            .arg("--")
            .args(args)
            .stdin(Stdio::null());
        c
    }

    /// Pids of the processes in this mount namespace other than the holder, with the children
    /// of each (container processes live in mount namespaces of their own).
    fn stragglers(&self) -> Vec<i32> {
        let Ok(me) = fs::read_link(&self.mnt) else {
            return Vec::new();
        };
        let holder = self.holder.id() as i32;
        let mut procs = Vec::new(); // (pid, ppid, same mount ns)
        for e in fs::read_dir("/proc").into_iter().flatten().flatten() {
            let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
                continue;
            };
            let same = fs::read_link(format!("/proc/{pid}/ns/mnt")).is_ok_and(|l| l == me);
            let ppid = fs::read_to_string(format!("/proc/{pid}/stat"))
                .ok()
                .and_then(|s| {
                    let rest = s.rsplit_once(')')?.1.to_owned();
                    rest.split_whitespace().nth(1)?.parse::<i32>().ok()
                })
                .unwrap_or(0);
            procs.push((pid, ppid, same));
        }
        let inside: Vec<i32> = procs
            .iter()
            .filter(|p| p.2 && p.0 != holder)
            .map(|p| p.0)
            .collect();
        // Children first, so they are not reparented away before they are found.
        let mut out: Vec<i32> = procs
            .iter()
            .filter(|p| !p.2 && (inside.contains(&p.1) || p.1 == holder))
            .map(|p| p.0)
            .collect();
        out.extend(inside);
        out
    }

    fn kill_all(&mut self) {
        for _ in 0..3 {
            let pids = self.stragglers();
            if pids.is_empty() {
                break;
            }
            for p in &pids {
                let _ = kill(Pid::from_raw(*p), Signal::SIGKILL);
            }
            let _ = wait_until(Duration::from_secs(5), || {
                pids.iter().all(|&p| netns::is_dead(p))
            });
        }
        let _ = self.holder.kill();
        let _ = self.holder.wait();
    }
}

impl Drop for MountNs {
    fn drop(&mut self) {
        self.kill_all();
    }
}

fn output_ok(mut cmd: Command, what: &str) -> Result<String> {
    let out = cmd.output().with_context(|| format!("run {what}"))?;
    check(&[what], out)
}

// ---------------------------------------------------------------- podman

/// A podman with the CNI backend on a lab node, its state under `<node dir>/podman`.
pub struct Podman {
    ns: MountNs,
    dir: PathBuf,
    conf: PathBuf,
}

impl Podman {
    /// Set up podman on node i with `conflist` as its only CNI network (no image yet).
    pub fn new(lab: &mut Lab, i: usize, conflist: &Value) -> Result<Podman> {
        let dir = lab.node_dir(i).join("podman");
        fs::create_dir_all(dir.join("tmp"))?;
        let netd = write_conflist(&dir, conflist)?;
        let bin = plugin_dir(lab, &dir)?;
        let conf = dir.join("containers.conf");
        fs::write(
            &conf,
            format!(
                "[containers]\nlog_driver = \"k8s-file\"\n\
                 [network]\nnetwork_backend = \"cni\"\ncni_plugin_dirs = [\"{bin}\"]\n\
                 network_config_dir = \"{netd}\"\n\
                 [engine]\nevents_logger = \"file\"\ntmp_dir = \"{tmp}\"\n",
                bin = bin.display(),
                netd = netd.display(),
                tmp = dir.join("tmp").display(),
            ),
        )?;
        let ns = MountNs::start(&lab.node_ns(i), &dir, &netd, &bin)?;
        Ok(Podman { ns, dir, conf })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The twill plugin calls podman made (`VERB netns=[..] id=..`).
    pub fn cni_calls(&self) -> Vec<String> {
        cni_calls(&self.dir)
    }

    /// `podman <global flags> args...` inside the node.
    pub fn command(&self, args: &[&str]) -> Command {
        let root = self.dir.join("root").display().to_string();
        let runroot = self.dir.join("runroot").display().to_string();
        let mut full = vec![
            "podman",
            "--root",
            &root,
            "--runroot",
            &runroot,
            "--runtime",
            "runc",
            "--cgroup-manager",
            "cgroupfs",
            "--storage-driver",
            "vfs",
        ];
        full.extend_from_slice(args);
        let mut c = self.ns.command(&full);
        c.env("CONTAINERS_CONF", &self.conf);
        c
    }

    pub fn run(&self, args: &[&str]) -> Result<Output> {
        self.command(args)
            .output()
            .with_context(|| format!("run podman {args:?}"))
    }

    pub fn run_ok(&self, args: &[&str]) -> Result<String> {
        let out = self.run(args)?;
        check(&[&["podman"], args].concat(), out)
    }

    /// Import the busybox image from a rootfs tarball as [`IMAGE`].
    pub fn import(&self, tar: &Path) -> Result<()> {
        self.run_ok(&["import", &tar.display().to_string(), IMAGE])
            .map(|_| ())
    }

    /// `podman run -d` on the twill network; returns the container id.
    pub fn run_container(&self, name: &str, cmd: &[&str]) -> Result<String> {
        let mut args = vec![
            "run",
            "-d",
            "--name",
            name,
            "--network",
            NETWORK,
            "--ulimit",
            "nofile=1024:1024",
            "--ulimit",
            "nproc=1024:1024",
            IMAGE,
        ];
        args.extend_from_slice(cmd);
        Ok(self.run_ok(&args)?.trim().to_owned())
    }

    pub fn inspect(&self, name: &str, format: &str) -> Result<String> {
        Ok(self
            .run_ok(&["inspect", "-f", format, name])?
            .trim()
            .to_owned())
    }

    /// The container's address on the twill network.
    pub fn ip(&self, name: &str) -> Result<Ipv4Addr> {
        let s = self.inspect(
            name,
            &format!("{{{{(index .NetworkSettings.Networks \"{NETWORK}\").IPAddress}}}}"),
        )?;
        s.parse()
            .with_context(|| format!("container {name} has no twill address ({s:?})"))
    }

    /// The pid of the container's init process (its netns is /proc/<pid>/ns/net).
    pub fn pid(&self, name: &str) -> Result<u32> {
        let s = self.inspect(name, "{{.State.Pid}}")?;
        s.parse()
            .with_context(|| format!("container {name} has no pid ({s:?})"))
    }

    /// `podman exec` in a container.
    pub fn exec(&self, name: &str, cmd: &[&str]) -> Result<Output> {
        let mut args = vec!["exec", name];
        args.extend_from_slice(cmd);
        self.run(&args)
    }

    /// `podman rm -f -t 0` (CNI DEL happens here).
    pub fn rm(&self, name: &str) -> Result<()> {
        self.run_ok(&["rm", "-f", "-t", "0", name]).map(|_| ())
    }
}

impl Drop for Podman {
    fn drop(&mut self) {
        let _ = self.run(&["rm", "-a", "-f", "-t", "0"]);
        self.ns.kill_all();
    }
}

// ---------------------------------------------------------------- containerd

/// The containerd namespace `ctr` works in.
pub const CTR_NAMESPACE: &str = "twill";

/// A containerd on a lab node (CRI disabled), root/state/socket under `<node dir>/containerd`.
pub struct Containerd {
    ns: MountNs,
    dir: PathBuf,
    socket: PathBuf,
    daemon: Option<Child>,
    /// Foreground `ctr run --rm --cni` processes by container id: each sends CNI DEL (with
    /// CNI_NETNS="") and deletes its container once the task exits.
    runs: Vec<(String, Child)>,
}

impl Containerd {
    /// Start containerd on node i with `conflist` in (its view of) /etc/cni/net.d.
    pub fn start(lab: &mut Lab, i: usize, conflist: &Value) -> Result<Containerd> {
        let dir = lab.node_dir(i).join("containerd");
        fs::create_dir_all(&dir)?;
        let netd = write_conflist(&dir, conflist)?;
        let bin = plugin_dir(lab, &dir)?;
        let socket = dir.join("c.sock");
        let config = dir.join("config.toml");
        fs::write(
            &config,
            format!(
                "version = 2\nroot = \"{root}\"\nstate = \"{state}\"\n\
                 disabled_plugins = [\"io.containerd.grpc.v1.cri\", \
                 \"io.containerd.snapshotter.v1.btrfs\", \"io.containerd.snapshotter.v1.zfs\", \
                 \"io.containerd.snapshotter.v1.devmapper\", \"io.containerd.snapshotter.v1.aufs\"]\n\
                 [grpc]\naddress = \"{sock}\"\n[ttrpc]\naddress = \"{sock}.ttrpc\"\n",
                root = dir.join("root").display(),
                state = dir.join("state").display(),
                sock = socket.display(),
            ),
        )?;
        let ns = MountNs::start(&lab.node_ns(i), &dir, &netd, &bin)?;
        let log = fs::File::create(dir.join("containerd.log"))?;
        let daemon = ns
            .command(&["containerd", "--config", &config.display().to_string()])
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("spawn containerd")?;
        let c = Containerd {
            ns,
            dir,
            socket,
            daemon: Some(daemon),
            runs: Vec::new(),
        };
        let res = wait_until(Duration::from_secs(30), || {
            c.ctr(&["version"])
                .output()
                .is_ok_and(|o| o.status.success())
        });
        if let Err(e) = res {
            return Err(e).with_context(|| {
                format!(
                    "containerd does not answer\n--- log ---\n{}",
                    c.log()
                        .lines()
                        .rev()
                        .take(30)
                        .collect::<Vec<_>>()
                        .join("\n")
                )
            });
        }
        Ok(c)
    }

    pub fn log(&self) -> String {
        fs::read_to_string(self.dir.join("containerd.log")).unwrap_or_default()
    }

    /// The twill plugin calls ctr made (`VERB netns=[..] id=..`).
    pub fn cni_calls(&self) -> Vec<String> {
        cni_calls(&self.dir)
    }

    /// `ctr --address <socket> --namespace twill args...` inside the node.
    pub fn ctr(&self, args: &[&str]) -> Command {
        let sock = self.socket.display().to_string();
        let mut full = vec!["ctr", "--address", &sock, "--namespace", CTR_NAMESPACE];
        full.extend_from_slice(args);
        self.ns.command(&full)
    }

    pub fn ctr_ok(&self, args: &[&str]) -> Result<String> {
        output_ok(self.ctr(args), &format!("ctr {}", args.join(" ")))
    }

    /// Import a docker-archive tarball (native snapshotter: overlayfs is not needed).
    pub fn import(&self, tar: &Path) -> Result<String> {
        self.ctr_ok(&[
            "images",
            "import",
            "--snapshotter",
            "native",
            &tar.display().to_string(),
        ])
    }

    /// Start `ctr run --rm --cni` in the foreground (kept as a child) and wait for the task
    /// to be running.
    pub fn run_cni(&mut self, image: &str, id: &str, cmd: &[&str]) -> Result<u32> {
        let log = fs::File::create(self.dir.join(format!("ctr-run-{id}.log")))?;
        let mut args = vec!["run", "--rm", "--cni", "--snapshotter", "native", image, id];
        args.extend_from_slice(cmd);
        let child = self
            .ctr(&args)
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("spawn ctr run")?;
        self.runs.push((id.to_owned(), child));
        let pid = wait_for(Duration::from_secs(60), || {
            if !self.run_alive(id) {
                return Some(None);
            }
            self.task_pid(id).ok().flatten().map(Some)
        });
        match pid {
            Ok(Some(pid)) => Ok(pid),
            Ok(None) => bail!(
                "ctr run {id} exited:\n{}\n--- containerd log tail ---\n{}",
                self.run_log(id),
                self.log()
                    .lines()
                    .rev()
                    .take(20)
                    .collect::<Vec<_>>()
                    .join("\n")
            ),
            Err(e) => Err(e).with_context(|| format!("task {id} never ran: {}", self.run_log(id))),
        }
    }

    pub fn run_log(&self, id: &str) -> String {
        fs::read_to_string(self.dir.join(format!("ctr-run-{id}.log"))).unwrap_or_default()
    }

    fn run_alive(&mut self, id: &str) -> bool {
        self.runs
            .iter_mut()
            .find(|(i, _)| i == id)
            .is_some_and(|(_, c)| matches!(c.try_wait(), Ok(None)))
    }

    /// The pid of a RUNNING task, None if it is not (yet) running.
    pub fn task_pid(&self, id: &str) -> Result<Option<u32>> {
        let out = self.ctr_ok(&["tasks", "ls"])?;
        // TASK  PID  STATUS
        Ok(out.lines().skip(1).find_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.len() >= 3 && f[0] == id && f[2] == "RUNNING")
                .then(|| f[1].parse().ok())
                .flatten()
        }))
    }

    /// `ctr tasks exec` in a running task.
    pub fn exec(&self, id: &str, exec_id: &str, cmd: &[&str]) -> Result<Output> {
        let mut args = vec!["tasks", "exec", "--exec-id", exec_id, id];
        args.extend_from_slice(cmd);
        self.ctr(&args)
            .output()
            .with_context(|| format!("ctr tasks exec {cmd:?}"))
    }

    /// SIGKILL the task and wait for its foreground `ctr run --rm` to finish (CNI DEL, then
    /// container delete); returns how that ctr exited.
    pub fn kill_task(&mut self, id: &str) -> Result<ExitStatus> {
        self.ctr_ok(&["tasks", "kill", "--signal", "SIGKILL", id])?;
        let at = self
            .runs
            .iter()
            .position(|(i, _)| i == id)
            .ok_or_else(|| anyhow!("no ctr run for {id}"))?;
        let (_, mut child) = self.runs.remove(at);
        match wait_for(STOP_TIMEOUT, || child.try_wait().ok().flatten()) {
            Ok(status) => Ok(status),
            Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                bail!("ctr run {id} did not exit after its task was killed")
            }
        }
    }

    /// Container ids containerd still knows.
    pub fn containers(&self) -> Result<Vec<String>> {
        Ok(self
            .ctr_ok(&["containers", "ls", "-q"])?
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .map(str::to_owned)
            .collect())
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        let ids: Vec<String> = self.runs.iter().map(|(i, _)| i.clone()).collect();
        for id in ids {
            let _ = self.kill_task(&id);
        }
        for id in self.containers().unwrap_or_default() {
            let _ = self
                .ctr(&["tasks", "kill", "--signal", "SIGKILL", &id])
                .output();
            let _ = self.ctr(&["tasks", "delete", "--force", &id]).output();
            let _ = self.ctr(&["containers", "delete", &id]).output();
        }
        if let Some(mut d) = self.daemon.take() {
            let _ = kill(Pid::from_raw(d.id() as i32), Signal::SIGTERM);
            if wait_for(STOP_TIMEOUT, || d.try_wait().ok().flatten()).is_err() {
                let _ = d.kill();
                let _ = d.wait();
            }
        }
        // Shims and anything else still in the mount namespace.
        self.ns.kill_all();
    }
}

// ---------------------------------------------------------------- checks

/// True if `ip` is inside `cidr` ("10.244.1.0/24").
pub fn in_subnet(ip: Ipv4Addr, cidr: &str) -> Result<bool> {
    let (net, len) = cidr
        .split_once('/')
        .ok_or_else(|| anyhow!("no prefix length in {cidr:?}"))?;
    let net: Ipv4Addr = net.parse()?;
    let len: u32 = len.parse()?;
    let mask = if len == 0 { 0 } else { u32::MAX << (32 - len) };
    Ok(u32::from(ip) & mask == u32::from(net) & mask)
}

/// twilld's subnet for node i, from /status.
pub fn node_subnet(lab: &Lab, i: usize) -> Result<String> {
    let s = lab.status(i)?;
    s["node"]["subnet"]
        .as_str()
        .map(str::to_owned)
        .ok_or_else(|| anyhow!("no node.subnet in /status of node {i}: {s}"))
}

/// True if twilld's IPAM on node i holds `ip` (a file `<state>/ipam/<subnet>/<ip>`).
pub fn ipam_holds(lab: &Lab, i: usize, ip: Ipv4Addr) -> bool {
    let root = lab.state_dir(i).join("ipam");
    fs::read_dir(root)
        .into_iter()
        .flatten()
        .flatten()
        .any(|d| d.path().join(ip.to_string()).exists())
}

/// Names of the links in node i's namespace.
pub fn links(lab: &Lab, i: usize) -> Result<Vec<String>> {
    let out = lab.exec_ok(i, &["ip", "-j", "link", "show"])?;
    let v: Value = serde_json::from_str(&out)?;
    let mut names: Vec<String> = v
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|l| l["ifname"].as_str().map(str::to_owned))
        .collect();
    names.sort();
    Ok(names)
}

/// Attach the netns of `pid` as a named netns with the lab's prefix (removed with the lab), so
/// the harness's pod helpers (exec, tcp_probe) work on a runtime's container.
pub fn attach_netns(lab: &Lab, node: usize, name: &str, pid: u32) -> Result<String> {
    let ns = lab.pod_ns(node, name);
    netns::run_ok(&["ip", "netns", "attach", &ns, &pid.to_string()])?;
    Ok(ns)
}

/// The peer addresses of the TCP connections to local port `port` in `netstat -tn` output
/// (IPv4-mapped IPv6 addresses are unmapped).
pub fn netstat_peers(netstat: &str, port: u16) -> Vec<Ipv4Addr> {
    let suffix = format!(":{port}");
    netstat
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            if f.len() < 5 || !f[0].starts_with("tcp") || !f[3].ends_with(&suffix) {
                return None;
            }
            let (addr, _) = f[4].rsplit_once(':')?;
            addr.trim_start_matches("::ffff:").parse().ok()
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn netstat_peers_unmaps_and_filters_by_port() {
        let text = "Active Internet connections (w/o servers)\n\
            Proto Recv-Q Send-Q Local Address           Foreign Address         State\n\
            tcp        1      0 ::ffff:10.99.0.2:7000   ::ffff:10.99.0.3:47012  CLOSE_WAIT\n\
            tcp        0      0 10.99.0.2:7000          10.1.2.3:5000           ESTABLISHED\n\
            tcp        0      0 10.99.0.2:22            10.9.9.9:6000           ESTABLISHED\n";
        assert_eq!(
            netstat_peers(text, 7000),
            vec![Ipv4Addr::new(10, 99, 0, 3), Ipv4Addr::new(10, 1, 2, 3)]
        );
    }

    #[test]
    fn subnet_membership() {
        let ip = Ipv4Addr::new(10, 244, 3, 7);
        assert!(in_subnet(ip, "10.244.3.0/24").unwrap());
        assert!(!in_subnet(ip, "10.244.2.0/24").unwrap());
        assert!(in_subnet(ip, "0.0.0.0/0").unwrap());
        assert!(in_subnet(ip, "10.244.3.0").is_err());
    }
}
