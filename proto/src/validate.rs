//! The identifiers a runtime passes, checked as libcni checks them (plus control characters),
//! by the plugin and again by twilld: anyone who is root can speak the socket protocol, and
//! twilld writes these values into its IPAM records, one per line.

use crate::{codes, CniError};

/// libcni's rule for container IDs and network names: `^[a-zA-Z0-9][a-zA-Z0-9_.\-]*$`.
fn is_identifier(s: &str) -> bool {
    let mut chars = s.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphanumeric())
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
}

/// CNI_CONTAINERID (code 4, as libcni's ValidateContainerID).
pub fn container_id(id: &str) -> Result<(), CniError> {
    if is_identifier(id) {
        Ok(())
    } else {
        Err(CniError::new(
            codes::INVALID_ENV,
            format!("invalid CNI_CONTAINERID {id:?}: must start with a letter or digit followed by letters, digits, '_', '.' or '-'"),
        ))
    }
}

/// CNI_IFNAME: what the kernel accepts as a device name, as libcni's ValidateInterfaceName
/// (code 4), and no control characters.
pub fn ifname(name: &str) -> Result<(), CniError> {
    let ok = !name.is_empty()
        && name.len() <= 15
        && name != "."
        && name != ".."
        && !name
            .chars()
            .any(|c| c == '/' || c == ':' || c.is_whitespace() || c.is_control());
    if ok {
        Ok(())
    } else {
        Err(CniError::new(
            codes::INVALID_ENV,
            format!("invalid CNI_IFNAME {name:?}: must be 1-15 characters without '/', ':', whitespace or control characters"),
        ))
    }
}

/// The network configuration's `name` (code 7, as libcni's ValidateNetworkName).
pub fn network_name(name: &str) -> Result<(), CniError> {
    if is_identifier(name) {
        Ok(())
    } else {
        Err(CniError::new(
            codes::INVALID_CONFIG,
            format!("invalid network name {name:?} in the configuration: must start with a letter or digit followed by letters, digits, '_', '.' or '-'"),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn container_ids_and_network_names() {
        for ok in ["a", "abc-1.2_3", "0f3e", "K8S_pod.1"] {
            assert!(container_id(ok).is_ok(), "{ok}");
            assert!(network_name(ok).is_ok(), "{ok}");
        }
        for bad in [
            "", "-a", "a/b", "a b", "_x", " a", "a ", "a\nb", "a\n", "a\u{7f}", "é", "a\tb",
        ] {
            assert_eq!(container_id(bad).unwrap_err().code, 4, "{bad:?}");
            assert_eq!(network_name(bad).unwrap_err().code, 7, "{bad:?}");
        }
    }

    #[test]
    fn ifnames() {
        for ok in ["eth0", "net1", "a234567890abcde", "eth%d"] {
            assert!(ifname(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            ".",
            "..",
            "a/b",
            "a b",
            "a234567890abcdef",
            "e:1",
            " eth0",
            "eth0 ",
            "eth0\n",
            "et\u{1}h",
            "eth\u{a0}",
        ] {
            assert_eq!(ifname(bad).unwrap_err().code, 4, "{bad:?}");
        }
    }
}
