//! The subnet file in flannel's format (subnet.env), read by flannel's CNI plugin and tooling.

use std::net::{Ipv4Addr, Ipv6Addr};
use std::path::Path;

use ipnet::{Ipv4Net, Ipv6Net};

use crate::registry::Previous;
use crate::state::write_atomic;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SubnetEnv {
    /// The node's IPv4 network and subnet (FLANNEL_NETWORK, FLANNEL_SUBNET); None on an
    /// IPv6-only network, where flannel leaves both lines out.
    pub ipv4: Option<(Ipv4Net, Ipv4Net)>,
    pub mtu: u32,
    pub ipmasq: bool,
    /// A dual-stack node's IPv6 network and subnet (FLANNEL_IPV6_NETWORK, FLANNEL_IPV6_SUBNET).
    pub ipv6: Option<(Ipv6Net, Ipv6Net)>,
}

impl SubnetEnv {
    /// flannel's order: the v4 lines, the v6 lines, MTU, masquerade (a family's lines only
    /// when the network has it).
    pub fn render(&self) -> String {
        let mut out = String::new();
        if let Some((network, subnet)) = self.ipv4 {
            // FLANNEL_SUBNET carries the first usable address, not the network address.
            let first = Ipv4Addr::from(u32::from(subnet.network()) + 1);
            out += &format!(
                "FLANNEL_NETWORK={network}\nFLANNEL_SUBNET={first}/{}\n",
                subnet.prefix_len()
            );
        }
        if let Some((network, subnet)) = self.ipv6 {
            let first = Ipv6Addr::from(u128::from(subnet.network()) + 1);
            out += &format!(
                "FLANNEL_IPV6_NETWORK={network}\nFLANNEL_IPV6_SUBNET={first}/{}\n",
                subnet.prefix_len()
            );
        }
        out + &format!("FLANNEL_MTU={}\nFLANNEL_IPMASQ={}\n", self.mtu, self.ipmasq)
    }

    /// Into a directory only root may write (checked each time: see `paths`).
    pub fn write(&self, path: &Path) -> std::io::Result<()> {
        crate::paths::private_parent(path).map_err(std::io::Error::other)?;
        write_atomic(path, self.render().as_bytes())
    }
}

/// The subnets recorded in a previous subnet file (FLANNEL_SUBNET, FLANNEL_IPV6_SUBNET), each
/// if there and it parses.
pub fn read_previous_subnet(path: &Path) -> Previous {
    let Ok(text) = std::fs::read_to_string(path) else {
        return Previous::default();
    };
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix('=').map(str::trim))
    };
    Previous {
        v4: field("FLANNEL_SUBNET").and_then(|v| v.parse::<Ipv4Net>().ok().map(|n| n.trunc())),
        v6: field("FLANNEL_IPV6_SUBNET").and_then(|v| v.parse::<Ipv6Net>().ok().map(|n| n.trunc())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_flannel_format_and_reads_back() {
        let env = SubnetEnv {
            ipv4: Some((
                "10.244.0.0/16".parse().unwrap(),
                "10.244.1.0/24".parse().unwrap(),
            )),
            mtu: 1450,
            ipmasq: false,
            ipv6: None,
        };
        assert_eq!(
            env.render(),
            "FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=10.244.1.1/24\nFLANNEL_MTU=1450\nFLANNEL_IPMASQ=false\n"
        );
        // Dual stack, as flanneld writes it.
        let dual = SubnetEnv {
            ipv6: Some((
                "fd00:10:244::/56".parse().unwrap(),
                "fd00:10:244:1::/64".parse().unwrap(),
            )),
            ..env.clone()
        };
        assert_eq!(
            dual.render(),
            "FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=10.244.1.1/24\n\
             FLANNEL_IPV6_NETWORK=fd00:10:244::/56\nFLANNEL_IPV6_SUBNET=fd00:10:244:1::1/64\n\
             FLANNEL_MTU=1450\nFLANNEL_IPMASQ=false\n"
        );
        let dir = std::env::temp_dir().join(format!("twill-subnet-env-{}", std::process::id()));
        let path = dir.join("subnet.env");
        env.write(&path).unwrap();
        assert_eq!(
            read_previous_subnet(&path),
            Previous {
                v4: Some("10.244.1.0/24".parse().unwrap()),
                v6: None
            }
        );
        dual.write(&path).unwrap();
        assert_eq!(
            read_previous_subnet(&path),
            Previous {
                v4: Some("10.244.1.0/24".parse().unwrap()),
                v6: Some("fd00:10:244:1::/64".parse().unwrap())
            }
        );
        // IPv6-only: flannel leaves the IPv4 lines out.
        let only6 = SubnetEnv {
            ipv4: None,
            ..dual.clone()
        };
        assert_eq!(
            only6.render(),
            "FLANNEL_IPV6_NETWORK=fd00:10:244::/56\nFLANNEL_IPV6_SUBNET=fd00:10:244:1::1/64\n\
             FLANNEL_MTU=1450\nFLANNEL_IPMASQ=false\n"
        );
        only6.write(&path).unwrap();
        assert_eq!(
            read_previous_subnet(&path),
            Previous {
                v4: None,
                v6: Some("fd00:10:244:1::/64".parse().unwrap())
            }
        );
        std::fs::write(&path, "FLANNEL_SUBNET=garbage\nFLANNEL_IPV6_SUBNET=junk\n").unwrap();
        assert_eq!(read_previous_subnet(&path), Previous::default());
        std::fs::remove_file(&path).unwrap();
        assert_eq!(read_previous_subnet(&path), Previous::default());
        std::fs::remove_dir(&dir).unwrap();
        // Straight into a directory others can write (/tmp): refused, not written.
        let open =
            std::env::temp_dir().join(format!("twill-subnet-open-{}.env", std::process::id()));
        let e = env.write(&open).unwrap_err();
        assert!(e.to_string().contains("writable by group or others"), "{e}");
        assert!(!open.exists());
    }
}
