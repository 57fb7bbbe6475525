//! Pods created through the `twill` CNI plugin exactly as a runtime does it: a named netns, the
//! plugin binary exec'd with the CNI_* environment and the network config on stdin.

use std::io::Write;
use std::net::Ipv4Addr;
use std::process::{Output, Stdio};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::lab::Lab;
use crate::netns;

/// A pod: a netns with an interface the twill plugin set up.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Pod {
    pub node: usize,
    /// CNI_CONTAINERID.
    pub id: String,
    /// The pod's named netns (/run/netns/<ns>).
    pub ns: String,
    pub ifname: String,
    /// Its IPv4 address; 0.0.0.0 on an IPv6-only network, which gives pods none.
    pub ip: Ipv4Addr,
    /// Its IPv6 address on a dual-stack or IPv6-only node.
    #[serde(default)]
    pub ip6: Option<std::net::Ipv6Addr>,
    /// The plugin's ADD result.
    pub result: Value,
}

impl Pod {
    pub fn netns_path(&self) -> String {
        format!("/run/netns/{}", self.ns)
    }

    /// Run a command inside the pod.
    pub fn exec(&self, args: &[&str]) -> Result<Output> {
        netns::exec_cmd(&self.ns, args)
            .stdin(Stdio::null())
            .output()
            .with_context(|| format!("run {args:?} in pod {}", self.id))
    }

    pub fn exec_ok(&self, args: &[&str]) -> Result<String> {
        netns::check(args, self.exec(args)?).with_context(|| format!("in pod {}", self.id))
    }

    /// One ping from this pod (1 s timeout): true if answered.
    pub fn ping(&self, dst: Ipv4Addr) -> bool {
        self.exec(&["ping", "-n", "-q", "-c", "1", "-W", "1", &dst.to_string()])
            .map(|o| o.status.success())
            .unwrap_or(false)
    }
}

/// What the plugin printed and how it exited.
#[derive(Debug)]
pub struct CniOutput {
    pub success: bool,
    pub stdout: String,
    pub stderr: String,
}

impl CniOutput {
    pub fn json(&self) -> Result<Value> {
        serde_json::from_str(&self.stdout).with_context(|| {
            format!(
                "plugin output is not JSON: {:?} (stderr {:?})",
                self.stdout, self.stderr
            )
        })
    }
}

impl Lab {
    /// The twill plugin's network config for node i, as a runtime hands it over.
    pub fn cni_config(&self, i: usize, cni_version: &str) -> Value {
        json!({
            "cniVersion": cni_version,
            "name": "twill",
            "type": "twill",
            "socket": self.cni_socket(i).display().to_string(),
        })
    }

    /// Exec the `twill` plugin for node i with the given CNI command and environment.
    pub fn cni(
        &mut self,
        i: usize,
        command: &str,
        container_id: &str,
        netns_path: &str,
        ifname: &str,
        config: &Value,
    ) -> Result<CniOutput> {
        let args = format!("IgnoreUnknown=1;K8S_POD_NAME={container_id}");
        self.cni_with_args(i, command, container_id, netns_path, ifname, &args, config)
    }

    /// `cni` with the given CNI_ARGS.
    #[allow(clippy::too_many_arguments)]
    pub fn cni_with_args(
        &mut self,
        i: usize,
        command: &str,
        container_id: &str,
        netns_path: &str,
        ifname: &str,
        cni_args: &str,
        config: &Value,
    ) -> Result<CniOutput> {
        let plugin = self.bin("twill")?;
        exec_plugin(
            &plugin,
            &self.node_ns(i),
            &CniCall {
                command,
                container_id,
                netns_path,
                ifname,
                cni_args,
            },
            config,
        )
    }

    /// Netns name for pod `name` on node i; removed with the lab (it carries the lab prefix).
    pub fn pod_ns(&self, i: usize, name: &str) -> String {
        format!("{}p{i}{name}", self.prefix())
    }

    /// Create a pod on node i through the plugin (ADD, CNI 1.0.0, eth0).
    pub fn add_pod(&mut self, i: usize, name: &str) -> Result<Pod> {
        let cfg = self.cni_config(i, "1.0.0");
        self.add_pod_with_config(i, name, &cfg)
    }

    /// Create a pod on node i through the plugin with the given network config (e.g. the one a
    /// runtime derives from a conflist).
    pub fn add_pod_with_config(&mut self, i: usize, name: &str, cfg: &Value) -> Result<Pod> {
        let id = format!("{}-n{i}-{name}", self.prefix());
        let args = format!("IgnoreUnknown=1;K8S_POD_NAME={id}");
        self.add_pod_with(i, name, &args, cfg)
    }

    /// Create a pod on node i through the plugin with the given CNI_ARGS and network config.
    pub fn add_pod_with(
        &mut self,
        i: usize,
        name: &str,
        cni_args: &str,
        cfg: &Value,
    ) -> Result<Pod> {
        let ns = self.pod_ns(i, name);
        netns::add(&ns)?;
        let _ = netns::run(&["ip", "-n", &ns, "link", "set", "lo", "up"]);
        let id = format!("{}-n{i}-{name}", self.prefix());
        let path = format!("/run/netns/{ns}");
        let cfg = cfg.clone();
        let out = self.cni_with_args(i, "ADD", &id, &path, "eth0", cni_args, &cfg)?;
        if !out.success {
            let _ = netns::kill_all_and_delete(&ns);
            bail!(
                "CNI ADD for pod {name} on node {i} failed: {} {}",
                out.stdout.trim(),
                out.stderr.trim()
            );
        }
        let result = out.json()?;
        let addrs = || {
            result["ips"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|c| c["address"].as_str()?.split('/').next())
        };
        let ip4: Option<Ipv4Addr> = addrs().find_map(|a| a.parse().ok());
        let ip6 = addrs().find_map(|a| a.parse().ok());
        if ip4.is_none() && ip6.is_none() {
            bail!("no address in ADD result {result}");
        }
        // An IPv6-only network gives pods no IPv4 address.
        let ip = ip4.unwrap_or(Ipv4Addr::UNSPECIFIED);
        Ok(Pod {
            node: i,
            id,
            ns,
            ifname: "eth0".into(),
            ip,
            ip6,
            result,
        })
    }

    /// Delete a pod through the plugin (DEL), then its netns.
    pub fn del_pod(&mut self, pod: &Pod) -> Result<()> {
        let mut cfg = self.cni_config(pod.node, "1.0.0");
        cfg["prevResult"] = pod.result.clone();
        let out = self.cni(
            pod.node,
            "DEL",
            &pod.id,
            &pod.netns_path(),
            &pod.ifname,
            &cfg,
        )?;
        let _ = netns::kill_all_and_delete(&pod.ns);
        if !out.success {
            bail!(
                "CNI DEL for pod {} failed: {} {}",
                pod.id,
                out.stdout.trim(),
                out.stderr.trim()
            );
        }
        Ok(())
    }
}

/// What a TCP probe from one pod to another saw.
#[derive(Clone, Copy, Debug)]
pub struct TcpProbe {
    /// The source address the receiving pod's listener saw for the connection.
    pub source_seen: Ipv4Addr,
    /// Time for connect + one request/response round trip.
    pub rtt: std::time::Duration,
}

/// Open a TCP connection from `from` to a listener in `to` (both on threads inside the pods'
/// namespaces), exchange one line, and report the source address the listener saw. `Ok` only if
/// the exchange completed within `timeout`.
pub fn tcp_probe(
    from: &Pod,
    to: &Pod,
    port: u16,
    timeout: std::time::Duration,
) -> Result<TcpProbe> {
    tcp_probe_ns(&from.ns, &to.ns, to.ip, port, timeout)
        .with_context(|| format!("pod {} to pod {}", from.id, to.id))
}

/// The source address pod `to` saw for a TCP connection from `from`, retried (10 times,
/// 0.3 s apart) while routes and peers settle.
pub fn pod_to_pod(from: &Pod, to: &Pod, port: u16) -> Result<Ipv4Addr> {
    let mut last = None;
    for _ in 0..10 {
        match tcp_probe(from, to, port, std::time::Duration::from_secs(2)) {
            Ok(p) => return Ok(p.source_seen),
            Err(e) => last = Some(e),
        }
        std::thread::sleep(std::time::Duration::from_millis(300));
    }
    Err(last.expect("tried")).with_context(|| format!("{} -> {}", from.id, to.id))
}

/// The source address pod `to` saw for a TCP connection from `from` over IPv6 (both need an
/// IPv6 address), retried like `pod_to_pod`.
pub fn pod_to_pod6(from: &Pod, to: &Pod, port: u16) -> Result<std::net::IpAddr> {
    let to_ip = to
        .ip6
        .with_context(|| format!("pod {} has no IPv6 address", to.id))?;
    let mut last = None;
    for _ in 0..10 {
        let r = tcp_probe_ip(
            &from.ns,
            &to.ns,
            to_ip.into(),
            port,
            std::time::Duration::from_secs(2),
        );
        match r {
            Ok((seen, _)) => return Ok(seen),
            Err(e) => last = Some(e),
        }
        std::thread::sleep(std::time::Duration::from_millis(300));
    }
    Err(last.expect("tried")).with_context(|| format!("{} -> {} over IPv6", from.id, to.id))
}

/// `tcp_probe` between any two namespaces: connect from `from_ns` to a listener on
/// `to_ip:port` inside `to_ns`.
pub fn tcp_probe_ns(
    from_ns: &str,
    to_ns: &str,
    to_ip: Ipv4Addr,
    port: u16,
    timeout: std::time::Duration,
) -> Result<TcpProbe> {
    let (seen, rtt) = tcp_probe_ip(from_ns, to_ns, to_ip.into(), port, timeout)?;
    let source_seen = match seen {
        std::net::IpAddr::V4(v4) => v4,
        other => bail!("listener saw a non-IPv4 source {other}"),
    };
    Ok(TcpProbe { source_seen, rtt })
}

/// The probe for either family: the source address the listener saw, and the RTT.
pub fn tcp_probe_ip(
    from_ns: &str,
    to_ns: &str,
    to_ip: std::net::IpAddr,
    port: u16,
    timeout: std::time::Duration,
) -> Result<(std::net::IpAddr, std::time::Duration)> {
    use std::io::{BufRead, BufReader};
    use std::net::{SocketAddr, TcpListener, TcpStream};
    use std::sync::mpsc;

    let (ready_tx, ready_rx) = mpsc::channel::<std::io::Result<()>>();
    let (seen_tx, seen_rx) = mpsc::channel::<std::io::Result<SocketAddr>>();
    let bind = SocketAddr::from((to_ip, port));
    let to_ns = to_ns.to_string();
    let to_ns_name = to_ns.clone();
    // The listener thread: bind, report, accept one connection (bounded), echo, report its peer.
    std::thread::spawn(move || {
        let res = netns::in_netns(&to_ns, move || {
            let l = match TcpListener::bind(bind) {
                Ok(l) => l,
                Err(e) => {
                    let _ = ready_tx.send(Err(e));
                    return;
                }
            };
            // A blocking accept bounded by SO_RCVTIMEO (Linux honours it for accept): the
            // connection is taken as soon as it arrives, so the RTT has no polling delay in it.
            if let Err(e) = set_accept_timeout(&l, timeout) {
                let _ = ready_tx.send(Err(e));
                return;
            }
            let _ = ready_tx.send(Ok(()));
            match l.accept() {
                Ok((mut s, peer)) => {
                    let _ = s.set_read_timeout(Some(timeout));
                    let mut line = String::new();
                    let _ = BufReader::new(&s).read_line(&mut line);
                    let _ = s.write_all(line.as_bytes());
                    let _ = seen_tx.send(Ok(peer));
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    let err = std::io::Error::new(std::io::ErrorKind::TimedOut, "no connection");
                    let _ = seen_tx.send(Err(err));
                }
                Err(e) => {
                    let _ = seen_tx.send(Err(e));
                }
            }
        });
        drop(res);
    });
    ready_rx
        .recv_timeout(timeout)
        .context("listener did not start")?
        .with_context(|| format!("bind {bind} in {to_ns_name}"))?;

    let from_ns = from_ns.to_string();
    let rtt = netns::in_netns(&from_ns, move || -> std::io::Result<std::time::Duration> {
        let start = std::time::Instant::now();
        let mut s = TcpStream::connect_timeout(&bind, timeout)?;
        s.set_read_timeout(Some(timeout))?;
        s.write_all(b"twill-probe\n")?;
        let mut line = String::new();
        BufReader::new(&s).read_line(&mut line)?;
        if line != "twill-probe\n" {
            return Err(std::io::Error::other(format!("unexpected echo {line:?}")));
        }
        Ok(start.elapsed())
    })?
    .with_context(|| format!("TCP from {from_ns} to {bind}"))?;
    let peer = seen_rx
        .recv_timeout(timeout)
        .context("listener did not report")?
        .context("listener")?;
    Ok((peer.ip(), rtt))
}

fn set_accept_timeout(
    l: &std::net::TcpListener,
    timeout: std::time::Duration,
) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let tv = libc::timeval {
        tv_sec: timeout.as_secs() as libc::time_t,
        tv_usec: timeout.subsec_micros() as libc::suseconds_t,
    };
    // SAFETY: a valid socket fd and a timeval of the size passed.
    let rc = unsafe {
        libc::setsockopt(
            l.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&tv as *const libc::timeval).cast(),
            std::mem::size_of::<libc::timeval>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// One CNI invocation's environment.
pub struct CniCall<'a> {
    pub command: &'a str,
    pub container_id: &'a str,
    pub netns_path: &'a str,
    pub ifname: &'a str,
    pub cni_args: &'a str,
}

/// Exec `plugin` in the node namespace `node_ns`, as a runtime does, with `call` and `config`
/// on stdin. Free of the lab, for a test that runs CNI requests side by side.
pub fn exec_plugin(
    plugin: &std::path::Path,
    node_ns: &str,
    call: &CniCall<'_>,
    config: &Value,
) -> Result<CniOutput> {
    // Runtimes exec the plugin in the node's own namespace.
    let plugin_path = plugin.display().to_string();
    let mut child = netns::exec_cmd(node_ns, &[&plugin_path])
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("CNI_COMMAND", call.command)
        .env("CNI_CONTAINERID", call.container_id)
        .env("CNI_NETNS", call.netns_path)
        .env("CNI_IFNAME", call.ifname)
        .env("CNI_ARGS", call.cni_args)
        .env(
            "CNI_PATH",
            plugin.parent().unwrap_or(std::path::Path::new("/")),
        )
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("exec {}", plugin.display()))?;
    child
        .stdin
        .take()
        .expect("piped stdin")
        .write_all(config.to_string().as_bytes())?;
    let out = child.wait_with_output()?;
    Ok(CniOutput {
        success: out.status.success(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    })
}
