//! Subnet arithmetic for both address families: flannel's key format and picking a free
//! subnet. Addresses are handled as `u128` so one implementation serves IPv4 and IPv6.

use std::collections::HashSet;
use std::fmt::{Debug, Display};
use std::hash::Hash;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::str::FromStr;

use ipnet::{Ipv4Net, Ipv6Net};
use rand::Rng;
use serde::Serialize;

/// A CIDR of one address family, as the arithmetic here sees it.
pub trait Cidr:
    Copy + Eq + Ord + Hash + Display + Debug + Serialize + Send + Sync + 'static
{
    type Addr: Copy + Eq + Ord + Hash + Display + Debug + FromStr + Serialize + Send + Sync;
    /// Address width: 32 or 128.
    const BITS: u8;
    /// "IPv4" or "IPv6", for messages.
    const FAMILY: &'static str;
    /// What flannel's config field names start with for this family: "" or "IPv6".
    const FIELD_PREFIX: &'static str;
    /// flannel's default subnet length when the network is large enough for it.
    const DEFAULT_SUBNET_LEN: u8;
    fn from_bits(addr: u128, len: u8) -> Option<Self>;
    fn start(self) -> u128;
    fn prefix(self) -> u8;
    fn addr_bits(a: Self::Addr) -> u128;
    fn addr_from_bits(v: u128) -> Self::Addr;
    /// The last address, as bits.
    fn end(self) -> u128 {
        let host_bits = Self::BITS.saturating_sub(self.prefix());
        let mask = u128::MAX
            .checked_shr(128 - u32::from(host_bits))
            .unwrap_or(0);
        self.start() | mask
    }
    fn contains_addr(self, a: Self::Addr) -> bool {
        (self.start()..=self.end()).contains(&Self::addr_bits(a))
    }
    /// Whether `n` lies wholly inside this network.
    fn contains_net(self, n: Self) -> bool {
        self.start() <= n.start() && n.end() <= self.end()
    }
}

impl Cidr for Ipv4Net {
    type Addr = Ipv4Addr;
    const BITS: u8 = 32;
    const FAMILY: &'static str = "IPv4";
    const FIELD_PREFIX: &'static str = "";
    const DEFAULT_SUBNET_LEN: u8 = 24;
    fn from_bits(addr: u128, len: u8) -> Option<Self> {
        Ipv4Net::new(Ipv4Addr::from(u32::try_from(addr).ok()?), len).ok()
    }
    fn start(self) -> u128 {
        u128::from(u32::from(self.network()))
    }
    fn prefix(self) -> u8 {
        self.prefix_len()
    }
    fn addr_bits(a: Ipv4Addr) -> u128 {
        u128::from(u32::from(a))
    }
    fn addr_from_bits(v: u128) -> Ipv4Addr {
        Ipv4Addr::from(v as u32)
    }
}

impl Cidr for Ipv6Net {
    type Addr = Ipv6Addr;
    const BITS: u8 = 128;
    const FAMILY: &'static str = "IPv6";
    const FIELD_PREFIX: &'static str = "IPv6";
    const DEFAULT_SUBNET_LEN: u8 = 64;
    fn from_bits(addr: u128, len: u8) -> Option<Self> {
        Ipv6Net::new(Ipv6Addr::from(addr), len).ok()
    }
    fn start(self) -> u128 {
        u128::from(self.network())
    }
    fn prefix(self) -> u8 {
        self.prefix_len()
    }
    fn addr_bits(a: Ipv6Addr) -> u128 {
        u128::from(a)
    }
    fn addr_from_bits(v: u128) -> Ipv6Addr {
        Ipv6Addr::from(v)
    }
}

/// Addresses in a /len of family N; 0 for a len beyond the family's width, and for a /0 of
/// IPv6 (2^128 does not fit: no config lets a /0 be a subnet).
pub fn size_of_len<N: Cidr>(len: u8) -> u128 {
    match N::BITS.checked_sub(len) {
        Some(s) if s < 128 => 1u128 << s,
        _ => 0,
    }
}

/// The subnets a network hands out: `subnet_len`-long, from `subnet_min` to `subnet_max`
/// (flannel's SubnetMin/SubnetMax, or IPv6SubnetMin/IPv6SubnetMax).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct SubnetRange<N: Cidr> {
    pub network: N,
    pub subnet_len: u8,
    pub subnet_min: N::Addr,
    pub subnet_max: N::Addr,
}

impl<N: Cidr> SubnetRange<N> {
    /// How many subnets lie between min and max (inclusive).
    pub fn subnet_count(&self) -> u128 {
        let size = size_of_len::<N>(self.subnet_len);
        let (min, max) = (N::addr_bits(self.subnet_min), N::addr_bits(self.subnet_max));
        if size == 0 || min > max {
            return 0;
        }
        // Saturates for a hand-built range of every /128 (2^128 does not fit).
        ((max - min) / size).saturating_add(1)
    }

    /// Whether `net` is a subnet this range could hand out (flannel's "compatible" check).
    pub fn fits(&self, net: N) -> bool {
        let a = net.start();
        net.prefix() == self.subnet_len
            && a >= N::addr_bits(self.subnet_min)
            && a <= N::addr_bits(self.subnet_max)
    }

    /// A random free subnet among the first 100 free ones between min and max. Free: not
    /// taken, and overlapping no taken subnet of another length (leases left over from an
    /// older SubnetLen).
    pub fn choose_free(&self, taken: &HashSet<N>) -> Result<N, AllocError> {
        const CANDIDATES: usize = 100;
        let size = size_of_len::<N>(self.subnet_len).max(1);
        let max = N::addr_bits(self.subnet_max);
        // Exact matches are a hash lookup; only leases of a different length need the
        // overlap scan.
        let odd: Vec<N> = taken
            .iter()
            .filter(|t| t.prefix() != self.subnet_len)
            .copied()
            .collect();
        let mut free = Vec::with_capacity(CANDIDATES);
        let mut a = Some(N::addr_bits(self.subnet_min));
        while let Some(at) = a.filter(|at| *at <= max) {
            if free.len() >= CANDIDATES {
                break;
            }
            // Only a hand-built range with a bad length fails here: nothing to hand out.
            let Some(net) = N::from_bits(at, self.subnet_len) else {
                break;
            };
            if !taken.contains(&net) && !odd.iter().any(|t| overlaps(*t, net)) {
                free.push(net);
            }
            a = at.checked_add(size);
        }
        if free.is_empty() {
            return Err(AllocError::OutOfSubnets {
                range: format!("{}-{}", self.subnet_min, self.subnet_max),
                leases: taken.len(),
                count: u64::try_from(self.subnet_count()).unwrap_or(u64::MAX),
                subnet_len: self.subnet_len,
                fields: N::FIELD_PREFIX,
                subnets_dir: DEFAULT_SUBNETS_DIR.to_string(),
                blocking: Vec::new(),
            });
        }
        Ok(free[rand::rng().random_range(0..free.len())])
    }
}

/// `10.244.1.0/24` -> `10.244.1.0-24`.
pub fn subnet_key(net: Ipv4Net) -> String {
    format!("{}-{}", net.network(), net.prefix_len())
}

/// flannel's key for a node's subnets: `10.244.1.0-24`, and with an IPv6 subnet
/// `10.244.1.0-24&fd00:10:244:1::-64`. An IPv6-only node's key has `0.0.0.0-0` for its v4
/// part, as flannel writes it.
pub fn dual_subnet_key(v4: Option<Ipv4Net>, v6: Option<Ipv6Net>) -> String {
    let v4 = subnet_key(v4.unwrap_or_default());
    match v6 {
        Some(v6) => format!("{v4}&{}-{}", v6.network(), v6.prefix_len()),
        None => v4,
    }
}

/// `10.244.1.0-24` -> `10.244.1.0/24`; None for anything else. A dual-stack key
/// (`10.244.1.0-24&fc00::-64`) yields its v4 part. Keys with host bits set are not flannel keys.
pub fn parse_subnet_key(key: &str) -> Option<Ipv4Net> {
    parse_dual_subnet_key(key).map(|(v4, _)| v4)
}

/// The v4 part of a key, whatever follows it: for the set of subnets taken, where any key that
/// names a v4 subnet holds it, also one whose v6 part this parser would refuse as a key.
pub fn subnet_key_v4_part(key: &str) -> Option<Ipv4Net> {
    parse_part::<Ipv4Net>(key.split('&').next()?)
}

/// The v6 part of a key, if it has one that reads as a subnet: for the set of IPv6 subnets
/// taken (lenient, like `subnet_key_v4_part`).
pub fn subnet_key_v6_part(key: &str) -> Option<Ipv6Net> {
    parse_part::<Ipv6Net>(key.split_once('&')?.1)
}

/// Both parts of a key: `10.244.1.0-24&fd00:10:244:1::-64` -> (10.244.1.0/24, fd00:..::/64).
/// Each part is written as flannel writes it (the v6 part in RFC 5952 form, lengths in plain
/// decimal) so that a subnet has one key; anything else is not a key.
pub fn parse_dual_subnet_key(key: &str) -> Option<(Ipv4Net, Option<Ipv6Net>)> {
    let (v4, v6) = match key.split_once('&') {
        Some((v4, v6)) => (v4, Some(v6)),
        None => (key, None),
    };
    let v4 = parse_part::<Ipv4Net>(v4)?;
    let v6 = match v6 {
        Some(v6) => Some(parse_part::<Ipv6Net>(v6)?),
        None => None,
    };
    Some((v4, v6))
}

fn parse_part<N: Cidr>(part: &str) -> Option<N> {
    // The v6 address holds no '-': the last one splits.
    let (addr, len) = part.rsplit_once('-')?;
    let parsed: N::Addr = addr.parse().ok()?;
    // Plain decimal as flannel prints it: no sign, no leading zero (`-08` would be a second
    // spelling of `-8`: one subnet, one key).
    if len.is_empty()
        || !len.bytes().all(|b| b.is_ascii_digit())
        || len.len() > 3
        // flannel reads the v6 length into 7 bits: a -128 key is not one of its keys.
        || (N::BITS == 128 && len == "128")
        || (len.len() > 1 && len.starts_with('0'))
        || parsed.to_string() != addr
        // flannel's pattern for the v6 part is `[a-f\d:]+`: no embedded v4 form.
        || (N::BITS == 128 && !addr.bytes().all(|b| b == b':' || b.is_ascii_hexdigit()))
    {
        return None;
    }
    let net = N::from_bits(N::addr_bits(parsed), len.parse().ok()?)?;
    (net.start() == N::addr_bits(parsed)).then_some(net)
}

/// Whether two networks share any address.
pub fn overlaps<N: Cidr>(a: N, b: N) -> bool {
    a.start() <= b.end() && b.start() <= a.end()
}

/// Where operators find the leases to delete; `choose_free` does not know the etcd prefix, so
/// it says this and the registry fills in the real path.
pub const DEFAULT_SUBNETS_DIR: &str = "/coreos.com/network/subnets/";

#[derive(Debug, thiserror::Error)]
pub enum AllocError {
    /// Says the range, how many leases exist, what to change, and the keys of another length
    /// that cover part of the range (one such key can block every subnet).
    #[error(
        "out of subnets: all {count} /{subnet_len} subnets in {range} \
         ({fields}SubnetMin-{fields}SubnetMax) are taken and {leases} leases exist; use a bigger \
         {fields}Network, a smaller {fields}SubnetLen, or delete stale leases under \
         {subnets_dir}{}",
        blocking_note(blocking)
    )]
    OutOfSubnets {
        range: String,
        leases: usize,
        /// Saturated at u64::MAX (a v6 range can hold more; such a range is never full).
        count: u64,
        subnet_len: u8,
        /// The family's config field prefix: "" or "IPv6".
        fields: &'static str,
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
pub fn is_free<N: Cidr>(net: N, taken: &HashSet<N>) -> bool {
    !taken.contains(&net) && !taken.iter().any(|t| overlaps(*t, net))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::NetworkConfig;

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
    fn dual_stack_keys_are_flannels() {
        let v6 = |s: &str| s.parse::<Ipv6Net>().unwrap();
        let k = dual_subnet_key(Some(net("10.244.1.0/24")), Some(v6("fd00:10:244:1::/64")));
        assert_eq!(k, "10.244.1.0-24&fd00:10:244:1::-64");
        assert_eq!(
            parse_dual_subnet_key(&k),
            Some((net("10.244.1.0/24"), Some(v6("fd00:10:244:1::/64"))))
        );
        assert_eq!(
            dual_subnet_key(Some(net("10.244.1.0/24")), None),
            "10.244.1.0-24"
        );
        assert_eq!(
            parse_dual_subnet_key("10.244.1.0-24"),
            Some((net("10.244.1.0/24"), None))
        );
        // IPv6-only: flannel writes its empty v4 network.
        let k = dual_subnet_key(None, Some(v6("fc00::/64")));
        assert_eq!(k, "0.0.0.0-0&fc00::-64");
        assert_eq!(
            parse_dual_subnet_key(&k),
            Some((net("0.0.0.0/0"), Some(v6("fc00::/64"))))
        );
        // Lengths up to /128; the compressed form is the only spelling.
        assert_eq!(
            parse_dual_subnet_key("10.0.0.0-8&fd00::4-126").map(|(_, v6)| v6),
            Some(Some(v6("fd00::4/126")))
        );
        for k in [
            "10.244.1.0-24&",
            "10.244.1.0-24&fc00::",
            "10.244.1.0-24&fc00::-",
            "10.244.1.0-24&fc00::-129",
            "10.244.1.0-24&fc00::-064",
            "10.244.1.0-24&fc00::1-64",  // host bits
            "10.244.1.0-24&fc00:0::-64", // not RFC 5952
            "10.244.1.0-24&FC00::-64",   // upper case
            "10.244.1.0-24&10.0.0.0-8",  // a second v4 part
            "10.244.1.0-24&fc00::-64&x",
            "10.244.1.0-24&::ffff:10.0.0.0-104", // flannel's pattern has no dots
            "10.244.1.0-24&fd00::1-128",         // flannel's v6 length has 7 bits
        ] {
            assert_eq!(parse_dual_subnet_key(k), None, "{k:?}");
            assert_eq!(parse_subnet_key(k), None, "{k:?}");
            // Not a key, but its v4 subnet is still held against allocation.
            assert_eq!(subnet_key_v4_part(k), Some(net("10.244.1.0/24")), "{k:?}");
        }
    }

    #[test]
    fn overlap_and_ends_for_both_families() {
        let v6 = |s: &str| s.parse::<Ipv6Net>().unwrap();
        assert!(overlaps(v6("fd00::/48"), v6("fd00:0:0:5::/64")));
        assert!(overlaps(v6("fd00:0:0:5::/64"), v6("fd00::/48")));
        assert!(!overlaps(v6("fd00:0:0:5::/64"), v6("fd00:0:0:6::/64")));
        assert!(overlaps(v6("::/0"), v6("fd00::/8")));
        assert_eq!(v6("::/0").end(), u128::MAX);
        let every = SubnetRange {
            network: v6("::/0"),
            subnet_len: 128,
            subnet_min: Ipv6Addr::UNSPECIFIED,
            subnet_max: Ipv6Addr::from(u128::MAX),
        };
        assert_eq!(every.subnet_count(), u128::MAX);
        assert_eq!(net("0.0.0.0/0").end(), u128::from(u32::MAX));
        assert_eq!(
            net("10.0.0.0/8").end(),
            u128::from(u32::from(Ipv4Addr::new(10, 255, 255, 255)))
        );
        assert!(!overlaps(net("10.0.0.0/24"), net("10.0.1.0/24")));
        assert!(overlaps(net("10.0.0.0/22"), net("10.0.3.0/24")));
    }

    #[test]
    fn choose_free_v6_among_the_first_100_and_around_old_lengths() {
        let v6 = |s: &str| s.parse::<Ipv6Net>().unwrap();
        let c = NetworkConfig::parse(
            br#"{"Network":"10.0.0.0/16","EnableIPv6":true,"IPv6Network":"fd00::/48"}"#,
        )
        .unwrap();
        let r = c.ipv6.unwrap();
        // An old /62 covers fd00:0:0:4:: - fd00:0:0:7::; fd00:0:0:1:: is taken exactly.
        let taken: HashSet<Ipv6Net> = [v6("fd00:0:0:1::/64"), v6("fd00:0:0:4::/62")].into();
        let mut seen = HashSet::new();
        for _ in 0..2000 {
            let n = r.choose_free(&taken).unwrap();
            assert!(is_free(n, &taken) && r.fits(n), "{n}");
            let third = (n.start() >> 64) as u16;
            // The first 100 free: 2, 3, then 8..=105.
            assert!(third <= 105, "{n} is beyond the first 100 free");
            seen.insert(n);
        }
        assert!(
            seen.len() > 50,
            "random choice should spread: {}",
            seen.len()
        );
        assert!(seen.contains(&v6("fd00:0:0:2::/64")) || seen.contains(&v6("fd00:0:0:3::/64")));

        // A full range says which fields to change, with the v6 names.
        let small = NetworkConfig::parse(
            br#"{"Network":"10.0.0.0/16","EnableIPv6":true,"IPv6Network":"fd00::/124"}"#,
        )
        .unwrap()
        .ipv6
        .unwrap();
        let taken: HashSet<Ipv6Net> =
            [v6("fd00::4/126"), v6("fd00::8/126"), v6("fd00::c/126")].into();
        let e = small.choose_free(&taken).unwrap_err().to_string();
        for want in [
            "all 3 /126 subnets in fd00::4-fd00::c",
            "(IPv6SubnetMin-IPv6SubnetMax)",
            "a bigger IPv6Network, a smaller IPv6SubnetLen",
        ] {
            assert!(e.contains(want), "{e:?} lacks {want:?}");
        }
        // The last subnet of the whole space is reachable without overflow.
        let all = NetworkConfig::parse(
            br#"{"Network":"10.0.0.0/16","EnableIPv6":true,"IPv6Network":"::/0",
                 "IPv6SubnetMin":"ffff:ffff:ffff:ffff::"}"#,
        )
        .unwrap()
        .ipv6
        .unwrap();
        assert_eq!(
            all.choose_free(&HashSet::new()).unwrap(),
            v6("ffff:ffff:ffff:ffff::/64")
        );
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
            let n = c.ipv4.as_ref().unwrap().choose_free(&taken).unwrap();
            assert!(!taken.contains(&n), "{n} is taken");
            assert_eq!(n.prefix_len(), 24);
            assert!(
                n.network() >= c.ipv4.as_ref().unwrap().subnet_min
                    && n.network() <= c.ipv4.as_ref().unwrap().subnet_max,
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
            let n = c.ipv4.as_ref().unwrap().choose_free(&taken).unwrap();
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
            assert_eq!(
                c.ipv4.as_ref().unwrap().choose_free(&taken).unwrap(),
                net("10.0.4.0/24")
            );
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
        let e = c.ipv4.as_ref().unwrap().choose_free(&taken).unwrap_err();
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
        let m = c
            .ipv4
            .as_ref()
            .unwrap()
            .choose_free(&taken)
            .unwrap_err()
            .with_blocking(vec!["10.9.0.0-16".into()])
            .to_string();
        assert!(
            m.contains("leases of another length cover the range: 10.9.0.0-16"),
            "{m}"
        );
    }
}
