//! The addresses host-local handed out on this node before it moved to twill.
//!
//! flannel's CNI plugin delegates to bridge + host-local, which keeps one file per address in
//! `<dir>/<network>/<address>` holding `containerID\r\nifname` (older versions: the ID alone).
//! A node moving from flanneld keeps its subnet and its running pods, so twill must not hand
//! out their addresses, and DEL of such a pod (the runtime now calls twill) releases it. Both
//! families: flannel's CNI runs host-local with each subnet the node has (the IPv6 one on a
//! dual-stack or IPv6-only network; the file is named by the address's text form). Only
//! addresses inside the node's subnet are ever looked at or touched: other networks that use
//! host-local on the node are not ours.

use std::collections::HashSet;
use std::fs;
use std::io::ErrorKind;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use ipnet::IpNet;

#[derive(Clone, Debug, Default)]
pub struct HostLocal {
    dir: Option<PathBuf>,
}

impl HostLocal {
    /// `None`: ignore host-local altogether.
    pub fn new(dir: Option<PathBuf>) -> Self {
        HostLocal { dir }
    }

    /// The per-network directories (none: nothing to check).
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

    /// The addresses host-local holds inside `subnet`, in any network. Read in one pass before an
    /// allocation takes the IPAM lock, so a slow disk here never holds up other pods' requests.
    pub fn held_in(&self, subnet: IpNet) -> HashSet<IpAddr> {
        let mut held = HashSet::new();
        for d in self.network_dirs() {
            let Some(entries) = read_network_dir(&d) else {
                continue;
            };
            held.extend(
                entries
                    .flatten()
                    .filter_map(|e| e.file_name().to_str()?.parse::<IpAddr>().ok())
                    .filter(|a| subnet.contains(a)),
            );
        }
        held
    }

    /// Releases what host-local holds inside `subnet` for `container_id` + `ifname` (a file
    /// without an ifname line matches any). Returns the addresses released.
    pub fn release(
        &self,
        subnet: IpNet,
        container_id: &str,
        ifname: &str,
    ) -> std::io::Result<Vec<IpAddr>> {
        release_in(&self.network_dirs(), subnet, container_id, ifname)
    }

    /// Whether host-local holds an address for `container_id` + `ifname` in any network and
    /// subnet: a DEL that comes before the node knows its subnets cannot tell whether it is
    /// ours to release.
    pub fn holds_any(&self, container_id: &str, ifname: &str) -> bool {
        self.network_dirs().iter().any(|d| {
            read_network_dir(d).is_some_and(|entries| {
                entries
                    .flatten()
                    .any(|e| address_file(&e).is_some() && is_for(&e.path(), container_id, ifname))
            })
        })
    }
}

/// The address an entry of a network dir reserves (other files, like `last_reserved_ip.0`,
/// reserve nothing).
fn address_file(e: &fs::DirEntry) -> Option<IpAddr> {
    e.file_name().to_str()?.parse().ok()
}

/// Whether the reservation file `path` is `container_id`'s on `ifname` (a file without an
/// ifname line, older host-local's, matches any).
fn is_for(path: &Path, container_id: &str, ifname: &str) -> bool {
    let text = crate::cni::ipam::read_regular(path);
    let mut lines = text.lines().map(str::trim);
    let (id, ifn) = (lines.next().unwrap_or(""), lines.next());
    id == container_id && ifn.is_none_or(|i| i == ifname)
}

/// A network dir's entries. One that vanished since it was listed holds nothing any more; one
/// that cannot be read (another network's, a disk error) is logged and skipped: neither may
/// fail a DEL whose own cleanup worked.
fn read_network_dir(d: &Path) -> Option<fs::ReadDir> {
    match fs::read_dir(d) {
        Ok(rd) => Some(rd),
        Err(e) if e.kind() == ErrorKind::NotFound => None,
        Err(e) => {
            tracing::warn!(dir = %d.display(), error = %e, "cannot read a host-local network dir; skipping it");
            None
        }
    }
}

fn release_in(
    dirs: &[PathBuf],
    subnet: IpNet,
    container_id: &str,
    ifname: &str,
) -> std::io::Result<Vec<IpAddr>> {
    let mut out = Vec::new();
    for d in dirs {
        let Some(entries) = read_network_dir(d) else {
            continue;
        };
        for e in entries.flatten() {
            let Some(addr) = address_file(&e) else {
                continue;
            };
            if !subnet.contains(&addr) {
                continue;
            }
            if is_for(&e.path(), container_id, ifname) {
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
        let net: IpNet = "10.244.1.0/24".parse().unwrap();
        let held = hl.held_in(net);
        assert!(held.contains(&"10.244.1.2".parse().unwrap()));
        assert!(held.contains(&"10.244.1.4".parse().unwrap()));
        assert!(!held.contains(&"10.244.1.5".parse().unwrap()));
        assert!(
            !held.contains(&"10.99.0.2".parse().unwrap()),
            "outside the subnet"
        );
        // c1's eth0 only: its net1 attachment stays, as does everything outside the subnet.
        assert_eq!(
            hl.release(net, "c1", "eth0").unwrap(),
            vec!["10.244.1.2".parse::<IpAddr>().unwrap()]
        );
        assert!(other.join("10.244.1.4").exists() && other.join("10.99.0.2").exists());
        // An old file without an ifname matches the container on any interface.
        assert_eq!(hl.release(net, "c2", "eth0").unwrap().len(), 1);
        assert!(cbr0.join("last_reserved_ip.0").exists());
        assert!(HostLocal::new(None).network_dirs().is_empty());
        // Held anywhere, whatever the subnet: c1's net1 is, its eth0 no longer, c9 never was.
        assert!(hl.holds_any("c1", "net1"));
        assert!(!hl.holds_any("c1", "eth0"));
        assert!(!hl.holds_any("c9", "eth0"));
        assert!(!HostLocal::new(None).holds_any("c1", "net1"));
        // IPv6: flannel's CNI runs host-local with the IPv6 subnet too (files named by the
        // address's text form).
        fs::write(cbr0.join("fd00:10:244:1::2"), "c3\r\neth0").unwrap();
        fs::write(cbr0.join("fd00:10:245::2"), "c3\r\neth0").unwrap();
        let net6: IpNet = "fd00:10:244:1::/64".parse().unwrap();
        let held = hl.held_in(net6);
        assert_eq!(
            held,
            HashSet::from(["fd00:10:244:1::2".parse::<IpAddr>().unwrap()])
        );
        assert!(hl.held_in(net).iter().all(|a| a.is_ipv4()));
        assert_eq!(
            hl.release(net6, "c3", "eth0").unwrap(),
            vec!["fd00:10:244:1::2".parse::<IpAddr>().unwrap()]
        );
        assert!(
            cbr0.join("fd00:10:245::2").exists(),
            "outside the IPv6 subnet"
        );
        fs::remove_dir_all(d).unwrap();
    }

    /// A network dir removed between listing and scanning (another runtime's DEL of its last
    /// address, an operator) holds nothing: DEL goes on with the others.
    #[test]
    fn a_network_dir_that_vanished_during_the_scan_is_skipped() {
        let d = std::env::temp_dir().join(format!("twill-hl-gone-{}", std::process::id()));
        for n in ["a-net", "b-net", "c-net"] {
            fs::create_dir_all(d.join(n)).unwrap();
        }
        fs::write(d.join("c-net/10.244.1.7"), "c1\r\neth0").unwrap();
        let hl = HostLocal::new(Some(d.clone()));
        let dirs = hl.network_dirs();
        assert_eq!(dirs.len(), 3);
        fs::remove_dir(d.join("a-net")).unwrap();
        let net: IpNet = "10.244.1.0/24".parse().unwrap();
        assert_eq!(
            release_in(&dirs, net, "c1", "eth0").unwrap(),
            vec!["10.244.1.7".parse::<IpAddr>().unwrap()]
        );
        fs::remove_dir_all(d).unwrap();
    }

    /// Drops CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH from the calling thread's effective set
    /// (capabilities are per thread), so permission bits apply to it although it runs as root.
    fn drop_dac_override_on_this_thread() {
        #[repr(C)]
        struct Header {
            version: u32,
            pid: i32,
        }
        #[repr(C)]
        #[derive(Clone, Copy, Default)]
        struct Data {
            effective: u32,
            permitted: u32,
            inheritable: u32,
        }
        let mut h = Header {
            version: 0x2008_0522, // _LINUX_CAPABILITY_VERSION_3
            pid: 0,
        };
        let mut data = [Data::default(); 2];
        // SAFETY: capget/capset with a valid header and two data structs (version 3).
        unsafe {
            assert_eq!(
                libc::syscall(libc::SYS_capget, &mut h, data.as_mut_ptr()),
                0
            );
            data[0].effective &= !((1 << 1) | (1 << 2));
            assert_eq!(libc::syscall(libc::SYS_capset, &mut h, data.as_ptr()), 0);
        }
    }

    /// A network dir twilld cannot read (here: mode 000 for a thread without DAC override) is
    /// logged and skipped: DEL still releases what it can and does not fail.
    #[test]
    fn an_unreadable_network_dir_does_not_fail_del() {
        use std::os::unix::fs::PermissionsExt;
        let d = std::env::temp_dir().join(format!("twill-hl-locked-{}", std::process::id()));
        fs::create_dir_all(d.join("locked")).unwrap();
        fs::create_dir_all(d.join("cbr0")).unwrap();
        fs::write(d.join("locked/10.244.1.3"), "c9").unwrap();
        fs::write(d.join("cbr0/10.244.1.2"), "c1\r\neth0").unwrap();
        fs::set_permissions(d.join("locked"), fs::Permissions::from_mode(0o000)).unwrap();
        let hl = HostLocal::new(Some(d.clone()));
        let net: IpNet = "10.244.1.0/24".parse().unwrap();
        let (released, held) = std::thread::spawn(move || {
            drop_dac_override_on_this_thread();
            assert!(
                fs::read_dir(
                    hl.network_dirs()
                        .iter()
                        .find(|p| p.ends_with("locked"))
                        .unwrap()
                )
                .is_err(),
                "the test needs a dir this thread cannot read"
            );
            (hl.release(net, "c1", "eth0"), hl.held_in(net))
        })
        .join()
        .unwrap();
        assert_eq!(
            released.unwrap(),
            vec!["10.244.1.2".parse::<IpAddr>().unwrap()]
        );
        assert!(held.is_empty(), "{held:?}");
        assert!(!d.join("cbr0/10.244.1.2").exists());
        fs::set_permissions(d.join("locked"), fs::Permissions::from_mode(0o755)).unwrap();
        fs::remove_dir_all(d).unwrap();
    }
}
