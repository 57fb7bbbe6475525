//! The addresses host-local handed out on this node before it moved to twill.
//!
//! flannel's CNI plugin delegates to bridge + host-local, which keeps one file per address in
//! `<dir>/<network>/<address>` holding `containerID\r\nifname` (older versions: the ID alone).
//! A node moving from flanneld keeps its subnet and its running pods, so twill must not hand
//! out their addresses, and DEL of such a pod (the runtime now calls twill) releases it. Only
//! addresses inside the node's subnet are ever looked at or touched: other networks that use
//! host-local on the node are not ours.

use std::fs;
use std::io::ErrorKind;
use std::net::Ipv4Addr;
use std::path::PathBuf;

use ipnet::Ipv4Net;

#[derive(Clone, Debug, Default)]
pub struct HostLocal {
    dir: Option<PathBuf>,
}

impl HostLocal {
    /// `None`: ignore host-local altogether.
    pub fn new(dir: Option<PathBuf>) -> Self {
        HostLocal { dir }
    }

    /// The per-network directories, read once per allocation (none: nothing to check).
    pub fn network_dirs(&self) -> Vec<PathBuf> {
        let Some(dir) = &self.dir else {
            return Vec::new();
        };
        match fs::read_dir(dir) {
            Ok(rd) => rd
                .flatten()
                .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                .map(|e| e.path())
                .collect(),
            Err(_) => Vec::new(),
        }
    }

    /// Whether host-local holds `addr` in one of `dirs`.
    pub fn holds(dirs: &[PathBuf], addr: Ipv4Addr) -> bool {
        let name = addr.to_string();
        dirs.iter()
            .any(|d| fs::symlink_metadata(d.join(&name)).is_ok())
    }

    /// Releases what host-local holds inside `subnet` for `container_id` + `ifname` (a file
    /// without an ifname line matches any). Returns the addresses released.
    pub fn release(
        &self,
        subnet: Ipv4Net,
        container_id: &str,
        ifname: &str,
    ) -> std::io::Result<Vec<Ipv4Addr>> {
        let mut out = Vec::new();
        for d in self.network_dirs() {
            for e in fs::read_dir(&d)?.flatten() {
                let Some(addr) = e
                    .file_name()
                    .to_str()
                    .and_then(|n| n.parse::<Ipv4Addr>().ok())
                else {
                    continue;
                };
                if !subnet.contains(&addr) {
                    continue;
                }
                let text = crate::cni::ipam::read_regular(&e.path());
                let mut lines = text.lines().map(str::trim);
                let (id, ifn) = (lines.next().unwrap_or(""), lines.next());
                if id == container_id && ifn.is_none_or(|i| i == ifname) {
                    match fs::remove_file(e.path()) {
                        Ok(()) => out.push(addr),
                        Err(err) if err.kind() == ErrorKind::NotFound => {}
                        Err(err) => return Err(err),
                    }
                }
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn holds_and_releases_only_inside_the_subnet_and_for_the_owner() {
        let d = std::env::temp_dir().join(format!("twill-hl-{}", std::process::id()));
        let cbr0 = d.join("cbr0");
        let other = d.join("other");
        fs::create_dir_all(&cbr0).unwrap();
        fs::create_dir_all(&other).unwrap();
        fs::write(cbr0.join("10.244.1.2"), "c1\r\neth0").unwrap();
        fs::write(cbr0.join("10.244.1.3"), "c2").unwrap();
        fs::write(cbr0.join("last_reserved_ip.0"), "10.244.1.3").unwrap();
        fs::write(other.join("10.99.0.2"), "c1\r\nnet1").unwrap();
        fs::write(other.join("10.244.1.4"), "c1\r\nnet1").unwrap();
        let hl = HostLocal::new(Some(d.clone()));
        let dirs = hl.network_dirs();
        assert!(HostLocal::holds(&dirs, "10.244.1.2".parse().unwrap()));
        assert!(HostLocal::holds(&dirs, "10.244.1.4".parse().unwrap()));
        assert!(!HostLocal::holds(&dirs, "10.244.1.5".parse().unwrap()));
        let net: Ipv4Net = "10.244.1.0/24".parse().unwrap();
        // c1's eth0 only: its net1 attachment stays, as does everything outside the subnet.
        assert_eq!(
            hl.release(net, "c1", "eth0").unwrap(),
            vec!["10.244.1.2".parse::<Ipv4Addr>().unwrap()]
        );
        assert!(other.join("10.244.1.4").exists() && other.join("10.99.0.2").exists());
        // An old file without an ifname matches the container on any interface.
        assert_eq!(hl.release(net, "c2", "eth0").unwrap().len(), 1);
        assert!(cbr0.join("last_reserved_ip.0").exists());
        assert!(HostLocal::new(None).network_dirs().is_empty());
        fs::remove_dir_all(d).unwrap();
    }
}
