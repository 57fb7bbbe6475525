//! The Node annotation keys flannel uses in Kubernetes mode, built from
//! `--kube-annotation-prefix` by flannel's rules (pkg/subnet/kube/annotations.go
//! `newAnnotations`), so a flanneld and a twilld in one cluster read each other's annotations.

/// flannel's default `--kube-annotation-prefix`.
pub const DEFAULT_PREFIX: &str = "flannel.alpha.coreos.com";

/// The full annotation keys for one prefix, e.g. `flannel.alpha.coreos.com/backend-type`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Annotations {
    prefix: String,
    kube_subnet_manager: String,
    backend_type: String,
    backend_data: String,
    public_ip: String,
    public_ip_overwrite: String,
    node_public_ip: String,
    backend_v6_data: String,
    public_ipv6: String,
    public_ipv6_overwrite: String,
    node_public_ipv6: String,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PrefixError {
    #[error("--kube-annotation-prefix {0:?}: at most one '/' is allowed")]
    TooManySlashes(String),
    #[error(
        "--kube-annotation-prefix {0:?}: must be a DNS name with at least one dot, optionally \
         followed by '/' and a name of [a-z0-9_-] (e.g. flannel.alpha.coreos.com or \
         example.com/twill)"
    )]
    Format(String),
}

impl Default for Annotations {
    fn default() -> Self {
        Annotations::build(format!("{DEFAULT_PREFIX}/"))
    }
}

impl Annotations {
    /// flannel's rules: no `/` → append `/`; one `/` → append `-` unless the prefix already
    /// ends in `/` or `-`; more than one `/` is an error; the result must match flannel's
    /// regex.
    pub fn with_prefix(prefix: &str) -> Result<Annotations, PrefixError> {
        let echo = || crate::excerpt::echo(prefix).into_owned();
        let mut p = prefix.to_string();
        match p.matches('/').count() {
            0 => p.push('/'),
            1 => {}
            _ => return Err(PrefixError::TooManySlashes(echo())),
        }
        if !p.ends_with('/') && !p.ends_with('-') {
            p.push('-');
        }
        if !matches_flannel_format(&p) {
            return Err(PrefixError::Format(echo()));
        }
        Ok(Annotations::build(p))
    }

    fn build(p: String) -> Annotations {
        let key = |name: &str| format!("{p}{name}");
        Annotations {
            kube_subnet_manager: key("kube-subnet-manager"),
            backend_type: key("backend-type"),
            backend_data: key("backend-data"),
            public_ip: key("public-ip"),
            public_ip_overwrite: key("public-ip-overwrite"),
            node_public_ip: key("node-public-ip"),
            backend_v6_data: key("backend-v6-data"),
            public_ipv6: key("public-ipv6"),
            public_ipv6_overwrite: key("public-ipv6-overwrite"),
            node_public_ipv6: key("node-public-ipv6"),
            prefix: p,
        }
    }

    /// The normalized prefix every key starts with (ends in `/` or `-`).
    pub fn prefix(&self) -> &str {
        &self.prefix
    }
    /// `"true"` on nodes whose annotations were written by flanneld/twilld: only those are peers.
    pub fn kube_subnet_manager(&self) -> &str {
        &self.kube_subnet_manager
    }
    /// `"vxlan"`, `"host-gw"` or `"udp"`.
    pub fn backend_type(&self) -> &str {
        &self.backend_type
    }
    /// vxlan: `{"VNI":1,"VtepMAC":"…"}`; host-gw: `null`.
    pub fn backend_data(&self) -> &str {
        &self.backend_data
    }
    /// The IPv4 address peers tunnel (or route) to.
    pub fn public_ip(&self) -> &str {
        &self.public_ip
    }
    /// Set by an operator (NAT): written into `public_ip` instead of the detected address.
    pub fn public_ip_overwrite(&self) -> &str {
        &self.public_ip_overwrite
    }
    /// Set by an operator: used as `--public-ip` at startup (picks the interface).
    pub fn node_public_ip(&self) -> &str {
        &self.node_public_ip
    }
    /// The dual-stack keys, the IPv6 counterparts of the four above: vxlan
    /// `{"VNI":1,"VtepMAC":"…"}` (host-gw `null`), the IPv6 address peers send to, an
    /// operator's override of it, and an operator's `--public-ipv6`.
    pub fn backend_v6_data(&self) -> &str {
        &self.backend_v6_data
    }
    pub fn public_ipv6(&self) -> &str {
        &self.public_ipv6
    }
    pub fn public_ipv6_overwrite(&self) -> &str {
        &self.public_ipv6_overwrite
    }
    pub fn node_public_ipv6(&self) -> &str {
        &self.node_public_ipv6
    }
}

/// flannel's `(?:[a-z0-9_-]+\.)+[a-z0-9_-]+/(?:[a-z0-9_-]+-)?$`, matched as Go's
/// `regexp.MatchString` does: anchored at the end only. Before the `/` it is enough that the
/// name *ends* in two dot-separated labels of `[a-z0-9_-]`; after it, nothing or a name ending
/// in `-`. `p` has exactly one `/` here.
fn matches_flannel_format(p: &str) -> bool {
    let word = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '-';
    let Some((host, rest)) = p.split_once('/') else {
        return false;
    };
    let rest_ok =
        rest.is_empty() || (rest.len() >= 2 && rest.ends_with('-') && rest.chars().all(word));
    // The unanchored start means only the longest tail made of label characters and dots
    // counts.
    let tail_start = host
        .char_indices()
        .rfind(|&(_, c)| !(word(c) || c == '.'))
        .map_or(0, |(i, c)| i + c.len_utf8());
    let mut labels = host[tail_start..].rsplit('.');
    let two_labels = matches!(
        (labels.next(), labels.next()),
        (Some(last), Some(before)) if !last.is_empty() && !before.is_empty()
    );
    rest_ok && two_labels
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_keys_are_flannels() {
        let a = Annotations::default();
        assert_eq!(a, Annotations::with_prefix(DEFAULT_PREFIX).unwrap());
        assert_eq!(a.prefix(), "flannel.alpha.coreos.com/");
        let keys = [
            (a.kube_subnet_manager(), "kube-subnet-manager"),
            (a.backend_type(), "backend-type"),
            (a.backend_data(), "backend-data"),
            (a.public_ip(), "public-ip"),
            (a.public_ip_overwrite(), "public-ip-overwrite"),
            (a.node_public_ip(), "node-public-ip"),
            (a.backend_v6_data(), "backend-v6-data"),
            (a.public_ipv6(), "public-ipv6"),
            (a.public_ipv6_overwrite(), "public-ipv6-overwrite"),
            (a.node_public_ipv6(), "node-public-ipv6"),
        ];
        for (got, name) in keys {
            assert_eq!(got, format!("flannel.alpha.coreos.com/{name}"));
        }
    }

    #[test]
    fn prefix_rules() {
        // (flag value, resulting backend-type key)
        let cases = [
            (
                "flannel.alpha.coreos.com",
                "flannel.alpha.coreos.com/backend-type",
            ),
            ("example.com", "example.com/backend-type"),
            ("example.com/", "example.com/backend-type"),
            ("example.com/twill", "example.com/twill-backend-type"),
            ("example.com/twill-", "example.com/twill-backend-type"),
            ("example.com/my_net-1", "example.com/my_net-1-backend-type"),
            ("a-b.c_d.example.com", "a-b.c_d.example.com/backend-type"),
            // Go's MatchString is not anchored at the start: flannel accepts these too (the
            // API server may still refuse the key; flannel would fail the same way).
            ("Flannel.example.com", "Flannel.example.com/backend-type"),
            (".example.com", ".example.com/backend-type"),
        ];
        for (flag, want) in cases {
            let a = Annotations::with_prefix(flag).unwrap_or_else(|e| panic!("{flag}: {e}"));
            assert_eq!(a.backend_type(), want, "{flag}");
        }
    }

    #[test]
    fn prefix_errors_name_the_flag() {
        let slashes = ["a.com/b/c", "example.com//", "/a.com/"];
        for flag in slashes {
            let e = Annotations::with_prefix(flag).unwrap_err();
            assert_eq!(e, PrefixError::TooManySlashes(flag.into()), "{flag}");
        }
        let bad = [
            "",
            "/",
            "localhost",
            "localhost/twill",
            "EXAMPLE.COM",
            "example.com./",
            "example..com/",
            "example.com/Twill",
            "example.com/-",
            "example.com/tw ill",
            "example.com:8080/",
        ];
        for flag in bad {
            let e = Annotations::with_prefix(flag).unwrap_err();
            assert_eq!(e, PrefixError::Format(flag.into()), "{flag}");
            assert!(e.to_string().contains("--kube-annotation-prefix"), "{e}");
        }
    }

    #[test]
    fn errors_echo_only_an_excerpt() {
        let long = format!("{}/x/y", "a".repeat(10_000));
        let e = Annotations::with_prefix(&long).unwrap_err().to_string();
        assert!(e.len() < 300, "{}", e.len());
    }
}
