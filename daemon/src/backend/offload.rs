//! Whether the VXLAN device offloads transmit checksums.
//!
//! Kernels before 5.7 compute wrong outer UDP checksums for offloaded VXLAN packets once they
//! are NATed (e.g. kube-proxy's `MASQUERADE --random-fully`); the receiver drops them and TCP
//! stalls for 63 s (flannel #1268/#1279, calico #3145). flannel turns offload off everywhere,
//! which costs throughput on every kernel; calico turns it off on kernels before 5.7 only. twill
//! does what calico does, and lets the operator force either way (an underlay behind NAT can
//! corrupt the checksums on any kernel: flannel #1929).

/// `--vxlan-checksum-offload`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum ChecksumOffload {
    /// Off on kernels before 5.7, else left as the kernel sets it (on).
    Auto,
    /// On (the kernel's default for VXLAN devices).
    On,
    /// Off: checksums computed in software, and TSO off with it.
    Off,
}

/// The first kernel whose VXLAN checksum offload survives NAT.
const FIXED_IN: (u32, u32) = (5, 7);

impl ChecksumOffload {
    /// What to set on the device for kernel `release` (`uname -r`): `Some(on)`, or `None` to
    /// leave the kernel's default.
    pub fn resolve(self, release: &str) -> Option<bool> {
        match self {
            ChecksumOffload::On => Some(true),
            ChecksumOffload::Off => Some(false),
            ChecksumOffload::Auto => match kernel_version(release) {
                Some(v) if v < FIXED_IN => Some(false),
                _ => None,
            },
        }
    }
}

/// (major, minor) from a release string such as "5.4.0-150-generic" or "6.18.44-fc".
pub fn kernel_version(release: &str) -> Option<(u32, u32)> {
    let mut parts = release.split(|c: char| !c.is_ascii_digit());
    let major = parts.next()?.parse().ok()?;
    let minor = parts.next()?.parse().ok()?;
    Some((major, minor))
}

/// The running kernel's release, as `uname -r` prints it.
pub fn kernel_release() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_parse() {
        assert_eq!(kernel_version("5.4.0-150-generic"), Some((5, 4)));
        assert_eq!(kernel_version("6.18.44-fc-v782"), Some((6, 18)));
        assert_eq!(kernel_version("3.10.0-1160.el7.x86_64"), Some((3, 10)));
        assert_eq!(kernel_version("5.7"), Some((5, 7)));
        assert_eq!(kernel_version(""), None);
        assert_eq!(kernel_version("six"), None);
        assert_eq!(kernel_version("6"), None);
    }

    #[test]
    fn auto_turns_offload_off_only_on_broken_kernels() {
        use ChecksumOffload::*;
        assert_eq!(Auto.resolve("5.4.0-150-generic"), Some(false));
        assert_eq!(Auto.resolve("4.19.0"), Some(false));
        assert_eq!(Auto.resolve("5.7.0"), None);
        assert_eq!(Auto.resolve("6.18.44-fc"), None);
        // Unknown: leave the kernel's choice rather than cost every node throughput.
        assert_eq!(Auto.resolve("garbage"), None);
        assert_eq!(On.resolve("4.19.0"), Some(true));
        assert_eq!(Off.resolve("6.18.44"), Some(false));
    }
}
