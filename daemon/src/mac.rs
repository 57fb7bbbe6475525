//! Ethernet MAC addresses as flannel writes them in leases ("c6:d2:32:6f:8f:44").

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct MacAddr(pub [u8; 6]);

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid MAC address {0:?}: expected six hex octets separated by ':'")]
pub struct MacParseError(pub String);

impl MacParseError {
    /// Holds an excerpt only: MACs come from etcd, where anyone with write access picks them.
    fn new(s: &str) -> Self {
        MacParseError(crate::excerpt::echo(s).into_owned())
    }
}

impl MacAddr {
    /// A random, locally administered, unicast MAC (what flannel uses for VTEPs).
    pub fn random_local() -> Self {
        let mut b: [u8; 6] = rand::random();
        b[0] = (b[0] & 0xfe) | 0x02;
        MacAddr(b)
    }

    pub fn octets(&self) -> [u8; 6] {
        self.0
    }

    pub fn is_zero(&self) -> bool {
        self.0 == [0; 6]
    }

    /// A group address (multicast, broadcast): never one device's, and the kernel refuses
    /// to program it as a unicast FDB entry.
    pub fn is_multicast(&self) -> bool {
        self.0[0] & 0x01 != 0
    }
}

impl fmt::Display for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            b[0], b[1], b[2], b[3], b[4], b[5]
        )
    }
}

impl fmt::Debug for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl FromStr for MacAddr {
    type Err = MacParseError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || MacParseError::new(s);
        let mut out = [0u8; 6];
        let mut parts = s.split(':');
        for o in out.iter_mut() {
            let p = parts.next().ok_or_else(err)?;
            if p.len() != 2 {
                return Err(err());
            }
            *o = u8::from_str_radix(p, 16).map_err(|_| err())?;
        }
        if parts.next().is_some() {
            return Err(err());
        }
        Ok(MacAddr(out))
    }
}

impl Serialize for MacAddr {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for MacAddr {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let m: MacAddr = "c6:d2:32:6f:8f:44".parse().unwrap();
        assert_eq!(m.0, [0xc6, 0xd2, 0x32, 0x6f, 0x8f, 0x44]);
        assert_eq!(m.to_string(), "c6:d2:32:6f:8f:44");
        assert_eq!(serde_json::to_string(&m).unwrap(), "\"c6:d2:32:6f:8f:44\"");
    }

    #[test]
    fn rejects_garbage() {
        for s in [
            "",
            "c6:d2:32:6f:8f",
            "c6:d2:32:6f:8f:44:00",
            "zz:d2:32:6f:8f:44",
            "c6d2:32:6f:8f:44:",
        ] {
            assert!(s.parse::<MacAddr>().is_err(), "{s}");
        }
    }

    #[test]
    fn multicast_and_broadcast_are_group_addresses() {
        for s in [
            "01:00:5e:00:00:01",
            "ff:ff:ff:ff:ff:ff",
            "33:33:00:00:00:01",
        ] {
            assert!(s.parse::<MacAddr>().unwrap().is_multicast(), "{s}");
        }
        assert!(!"c6:d2:32:6f:8f:44"
            .parse::<MacAddr>()
            .unwrap()
            .is_multicast());
    }

    #[test]
    fn random_is_local_unicast() {
        for _ in 0..100 {
            let m = MacAddr::random_local();
            assert_eq!(m.0[0] & 0x01, 0, "unicast");
            assert_eq!(m.0[0] & 0x02, 0x02, "locally administered");
        }
    }
}
