//! Subnet arithmetic: flannel's key format and picking a free subnet.

use std::collections::HashSet;
use std::net::Ipv4Addr;

use ipnet::Ipv4Net;
use rand::Rng;

use crate::config::NetworkConfig;

/// `10.244.1.0/24` -> `10.244.1.0-24`.
pub fn subnet_key(net: Ipv4Net) -> String {
    format!("{}-{}", net.network(), net.prefix_len())
}

/// `10.244.1.0-24` -> `10.244.1.0/24`; None for anything else. A dual-stack key
/// (`10.244.1.0-24&fc00::-64`) yields its v4 part. Keys with host bits set are not flannel keys.
pub fn parse_subnet_key(key: &str) -> Option<Ipv4Net> {
    let v4 = key.split('&').next()?;
    let (addr, len) = v4.split_once('-')?;
    let addr: Ipv4Addr = addr.parse().ok()?;
    // Plain decimal as flannel prints it: no sign, no leading zero (`-08` would be a second
    // spelling of `-8`: one subnet, one key).
    if len.is_empty()
        || !len.bytes().all(|b| b.is_ascii_digit())
        || len.len() > 2
        || (len.len() > 1 && len.starts_with('0'))
    {
        return None;
    }
    let net = Ipv4Net::new(addr, len.parse().ok()?).ok()?;
    (net.network() == addr).then_some(net)
}

/// Whether two networks share any address.
pub fn overlaps(a: Ipv4Net, b: Ipv4Net) -> bool {
    a.contains(&b.network()) || b.contains(&a.network())
}

/// Where operators find the leases to delete; `choose_free` does not know the etcd prefix, so
/// it says this and the registry fills in the real path.
pub const DEFAULT_SUBNETS_DIR: &str = "/coreos.com/network/subnets/";

#[derive(Debug, thiserror::Error)]
pub enum AllocError {
    /// Says the range, how many leases exist, what to change, and the keys of another length
    /// that cover part of the range (one such key can block every subnet).
    #[error(
        "out of subnets: all {count} /{subnet_len} subnets in {range} (SubnetMin-SubnetMax) are \
         taken and {leases} leases exist; use a bigger Network, a smaller SubnetLen, or delete \
         stale leases under {subnets_dir}{}",
        blocking_note(blocking)
    )]
    OutOfSubnets {
        range: String,
        leases: usize,
        count: u64,
        subnet_len: u8,
        subnets_dir: String,
        /// Keys of another length (leases from an older SubnetLen) overlapping the range.
        blocking: Vec<String>,
    },
}

fn blocking_note(keys: &[String]) -> String {
    if keys.is_empty() {
        return String::new();
    }
    format!(
        "; leases of another length cover the range: {}",
        keys.iter()
            .map(|k| crate::excerpt::echo(k).into_owned())
            .collect::<Vec<_>>()
            .join(", ")
    )
}

impl AllocError {
    /// Names the real `<prefix>/subnets/` in the message.
    pub fn with_subnets_dir(mut self, dir: &str) -> Self {
        let AllocError::OutOfSubnets { subnets_dir, .. } = &mut self;
        *subnets_dir = dir.to_string();
        self
    }

    /// Names the keys that block the range (`choose_free` only knows subnets).
    pub fn with_blocking(mut self, keys: Vec<String>) -> Self {
        let AllocError::OutOfSubnets { blocking, .. } = &mut self;
        *blocking = keys;
        self
    }
}

/// Whether `net` is free: not taken, and overlapping no taken subnet of another length (leases
/// left over from an older SubnetLen).
pub fn is_free(net: Ipv4Net, taken: &HashSet<Ipv4Net>) -> bool {
    !taken.contains(&net) && !taken.iter().any(|t| overlaps(*t, net))
}

/// A random free subnet among the first 100 free ones between SubnetMin and SubnetMax.
pub fn choose_free(cfg: &NetworkConfig, taken: &HashSet<Ipv4Net>) -> Result<Ipv4Net, AllocError> {
    const CANDIDATES: usize = 100;
    let size = crate::config::subnet_size(cfg.subnet_len).max(1);
    let min = u64::from(u32::from(cfg.subnet_min));
    let max = u64::from(u32::from(cfg.subnet_max));
    // Exact matches are a hash lookup; only leases of a different length need the overlap scan.
    let odd: Vec<Ipv4Net> = taken
        .iter()
        .filter(|t| t.prefix_len() != cfg.subnet_len)
        .copied()
        .collect();
    let mut free = Vec::with_capacity(CANDIDATES);
    let mut a = min;
    while a <= max && free.len() < CANDIDATES {
        // Only a hand-built config with a bad SubnetLen fails here: nothing to hand out.
        let Ok(net) = Ipv4Net::new(Ipv4Addr::from(a as u32), cfg.subnet_len) else {
            break;
        };
        if !taken.contains(&net) && !odd.iter().any(|t| overlaps(*t, net)) {
            free.push(net);
        }
        a += size;
    }
    if free.is_empty() {
        return Err(AllocError::OutOfSubnets {
            range: format!("{}-{}", cfg.subnet_min, cfg.subnet_max),
            leases: taken.len(),
            count: cfg.subnet_count(),
            subnet_len: cfg.subnet_len,
            subnets_dir: DEFAULT_SUBNETS_DIR.to_string(),
            blocking: Vec::new(),
        });
    }
    Ok(free[rand::rng().random_range(0..free.len())])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> Ipv4Net {
        s.parse().unwrap()
    }

    fn cfg(json: &str) -> NetworkConfig {
        NetworkConfig::parse(json.as_bytes()).unwrap()
    }

    #[test]
    fn key_round_trip() {
        for s in ["10.244.1.0/24", "10.0.0.0/8", "172.16.0.4/30", "0.0.0.0/0"] {
            let n = net(s);
            let k = subnet_key(n);
            assert_eq!(parse_subnet_key(&k), Some(n), "{k}");
        }
        assert_eq!(subnet_key(net("10.244.1.0/24")), "10.244.1.0-24");
    }

    #[test]
    fn key_dual_stack_suffix() {
        assert_eq!(
            parse_subnet_key("10.244.1.0-24&fc00::-64"),
            Some(net("10.244.1.0/24"))
        );
        assert_eq!(
            parse_subnet_key("10.244.7.0-24&fc00:0:0:7::-64"),
            Some(net("10.244.7.0/24"))
        );
    }

    #[test]
    fn key_rejects_garbage() {
        for k in [
            "",
            "10.244.1.0",
            "10.244.1.0/24",
            "10.244.1.0-",
            "10.244.1.0-33",
            "10.244.1.0-+24",
            "10.244.1.0-024",
            "0.0.0.0-01", // a second spelling of 0.0.0.0-1 (found by fuzzing)
            "10.0.0.0-08",
            "0.0.0.0-00",
            "10.244.1.5-24", // host bits: not a flannel key
            "fc00::-64",
            "garbage-24",
            "-24",
            "&10.244.1.0-24",
        ] {
            assert_eq!(parse_subnet_key(k), None, "{k:?}");
        }
    }

    #[test]
    fn choose_free_never_returns_taken_and_respects_min_max() {
        let c = cfg(r#"{"Network":"10.0.0.0/16","SubnetMin":"10.0.5.0","SubnetMax":"10.0.20.0"}"#);
        let mut taken: HashSet<Ipv4Net> = HashSet::new();
        for i in [5u8, 6, 9, 11, 20] {
            taken.insert(net(&format!("10.0.{i}.0/24")));
        }
        let mut seen = HashSet::new();
        for _ in 0..500 {
            let n = choose_free(&c, &taken).unwrap();
            assert!(!taken.contains(&n), "{n} is taken");
            assert_eq!(n.prefix_len(), 24);
            assert!(
                n.network() >= c.subnet_min && n.network() <= c.subnet_max,
                "{n}"
            );
            seen.insert(n);
        }
        // 16 subnets in range, 5 taken: all 11 free ones turn up (it is random, not first-fit).
        assert_eq!(seen.len(), 11, "{seen:?}");
    }

    #[test]
    fn choose_free_picks_among_the_first_100_free() {
        let c = cfg(r#"{"Network":"10.0.0.0/8"}"#); // 65535 subnets
        let taken: HashSet<Ipv4Net> = [net("10.0.1.0/24"), net("10.0.50.0/24")].into();
        // The first 100 free are 10.0.2.0 .. 10.0.102.0 (skipping 10.0.50.0).
        let last = u32::from(Ipv4Addr::new(10, 0, 102, 0));
        let mut seen = HashSet::new();
        for _ in 0..2000 {
            let n = choose_free(&c, &taken).unwrap();
            assert!(
                u32::from(n.network()) <= last,
                "{n} is beyond the first 100 free"
            );
            assert!(!taken.contains(&n));
            seen.insert(n);
        }
        assert!(
            seen.len() > 50,
            "random choice should spread: {}",
            seen.len()
        );
    }

    #[test]
    fn choose_free_avoids_leases_of_another_length() {
        let c = cfg(r#"{"Network":"10.0.0.0/16","SubnetMax":"10.0.4.0"}"#);
        // A /22 left over from an older config covers 10.0.0.0-10.0.3.255.
        let taken: HashSet<Ipv4Net> = [net("10.0.0.0/22")].into();
        for _ in 0..50 {
            assert_eq!(choose_free(&c, &taken).unwrap(), net("10.0.4.0/24"));
        }
        assert!(!is_free(net("10.0.2.0/24"), &taken));
        assert!(is_free(net("10.0.4.0/24"), &taken));
    }

    #[test]
    fn out_of_subnets_message() {
        let c = cfg(r#"{"Network":"10.9.0.0/16","SubnetMin":"10.9.1.0","SubnetMax":"10.9.3.0"}"#);
        let taken: HashSet<Ipv4Net> = [
            net("10.9.1.0/24"),
            net("10.9.2.0/24"),
            net("10.9.3.0/24"),
            net("10.9.7.0/24"),
        ]
        .into();
        let e = choose_free(&c, &taken).unwrap_err();
        let AllocError::OutOfSubnets { leases, count, .. } = &e;
        assert_eq!((*leases, *count), (4, 3));
        let m = e.with_subnets_dir("/x/subnets/").to_string();
        for want in [
            "out of subnets",
            "10.9.1.0-10.9.3.0",
            "all 3 /24 subnets",
            "4 leases exist",
            "bigger Network",
            "smaller SubnetLen",
            "delete stale leases under /x/subnets/",
        ] {
            assert!(m.contains(want), "{m:?} lacks {want:?}");
        }
        assert!(!m.contains("another length"), "{m}");
        let m = choose_free(&c, &taken)
            .unwrap_err()
            .with_blocking(vec!["10.9.0.0-16".into()])
            .to_string();
        assert!(
            m.contains("leases of another length cover the range: 10.9.0.0-16"),
            "{m}"
        );
    }
}
