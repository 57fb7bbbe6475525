//! The practical limit for programming a VXLAN overlay: the same neighbour, FDB and route
//! entries twilld installs, added by `ip -batch` / `bridge -batch` in a namespace of our own
//! with an identical VXLAN device.

use std::io::Write;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use twill_tests::netns;

use crate::common::DEV;
use crate::etcd::SimPeer;
use crate::nl::mac_str;

static N: AtomicU32 = AtomicU32::new(0);

pub struct RefNs {
    pub name: String,
}

impl RefNs {
    /// A namespace under `prefix` with a veth underlay and a VXLAN device set up like twilld's.
    pub fn new(prefix: &str) -> Result<RefNs> {
        let name = format!("{prefix}r{}", N.fetch_add(1, Ordering::Relaxed));
        netns::add(&name)?;
        let ns = RefNs { name };
        let n = ns.name.as_str();
        for args in [
            vec!["ip", "-n", n, "link", "set", "lo", "up"],
            vec![
                "ip", "-n", n, "link", "add", "v0", "type", "veth", "peer", "name", "v1",
            ],
            vec!["ip", "-n", n, "addr", "add", "198.18.0.10/24", "dev", "v0"],
            vec!["ip", "-n", n, "link", "set", "v0", "up"],
            vec!["ip", "-n", n, "link", "set", "v1", "up"],
            vec![
                "ip",
                "-n",
                n,
                "link",
                "add",
                DEV,
                "mtu",
                "1450",
                "type",
                "vxlan",
                "id",
                "1",
                "local",
                "198.18.0.10",
                "dev",
                "v0",
                "dstport",
                "8472",
                "nolearning",
            ],
            vec!["ip", "-n", n, "link", "set", DEV, "up"],
        ] {
            netns::run_ok(&args)?;
        }
        Ok(ns)
    }

    /// Add the three entries of every peer, in flannel's order (neighbours, FDB, then routes),
    /// with one `ip -batch` / `bridge -batch` process per kind. Returns the wall time.
    pub fn add_batch(&self, peers: &[SimPeer]) -> Result<Duration> {
        let (neigh, fdb, route) = batch_lines(peers);
        let start = Instant::now();
        self.batch("ip", &neigh)?;
        self.batch("bridge", &fdb)?;
        self.batch("ip", &route)?;
        Ok(start.elapsed())
    }

    fn batch(&self, tool: &str, input: &str) -> Result<()> {
        let mut child = Command::new(tool)
            .args(["-n", &self.name, "-batch", "-"])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("spawn {tool}"))?;
        child
            .stdin
            .take()
            .expect("piped")
            .write_all(input.as_bytes())?;
        let out = child.wait_with_output()?;
        if !out.status.success() {
            bail!(
                "{tool} -batch failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(())
    }
}

impl Drop for RefNs {
    fn drop(&mut self) {
        let _ = netns::kill_all_and_delete(&self.name);
    }
}

/// (neighbour, fdb, route) batch files for the peers.
pub fn batch_lines(peers: &[SimPeer]) -> (String, String, String) {
    let (mut neigh, mut fdb, mut route) = (String::new(), String::new(), String::new());
    for p in peers {
        let (net, mac) = (p.subnet(), mac_str(&p.mac()));
        neigh.push_str(&format!(
            "neigh replace {net} lladdr {mac} dev {DEV} nud permanent\n"
        ));
        fdb.push_str(&format!(
            "fdb replace {mac} dev {DEV} dst {} self permanent\n",
            p.public_ip()
        ));
        route.push_str(&format!(
            "route replace {net}/24 via {net} dev {DEV} onlink\n"
        ));
    }
    (neigh, fdb, route)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batch_lines_match_flannels_entries() {
        let (n, f, r) = batch_lines(&[SimPeer { idx: 2 }]);
        assert_eq!(
            n,
            "neigh replace 10.1.2.0 lladdr 0e:b0:00:00:00:02 dev twill.1 nud permanent\n"
        );
        assert_eq!(
            f,
            "fdb replace 0e:b0:00:00:00:02 dev twill.1 dst 198.19.0.3 self permanent\n"
        );
        assert_eq!(
            r,
            "route replace 10.1.2.0/24 via 10.1.2.0 dev twill.1 onlink\n"
        );
    }
}
