//! Deletions twilld itself asked for. The kernel notifies every deletion, ours included; a
//! notification that matches one of ours is its echo, anything else is someone else's change.
//! Matching per entry (not a time window after each batch) means a hand deletion is noticed even
//! when it lands in the middle of our own changes.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ipnet::Ipv4Net;

use crate::reconcile::{EntryKeyOf, OpOf};
use crate::subnet::Cidr;

/// How long an expected echo waits for its notification. It comes within milliseconds; one that
/// never comes (the entry was already gone) must not swallow a real deletion much later.
const ECHO_TTL: Duration = Duration::from_secs(10);

/// Per address family: a v4 key and a v6 key never name the same entry.
#[derive(Clone)]
pub struct OwnDeletions<N: Cidr = Ipv4Net>(Arc<Mutex<Expected<N>>>);

/// Per entry: how many deletion echoes are due, and until when.
type Expected<N> = HashMap<EntryKeyOf<N>, (u32, Instant)>;

impl<N: Cidr> Default for OwnDeletions<N> {
    fn default() -> Self {
        OwnDeletions(Arc::default())
    }
}

impl<N: Cidr> OwnDeletions<N> {
    /// Called before `ops` go to the kernel: their deletions will echo back. An add clears any
    /// expectation for its entry, so a later deletion of it is news again.
    pub fn expect(&self, ops: &[OpOf<N>]) {
        let mut m = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        m.retain(|_, (_, until)| *until > now);
        for op in ops {
            let key = EntryKeyOf::of(op);
            if op.is_delete() {
                let e = m.entry(key).or_insert((0, now));
                *e = (e.0 + 1, now + ECHO_TTL);
            } else {
                m.remove(&key);
            }
        }
    }

    /// Whether a deletion notification for `key` is the echo of one of ours (consuming it).
    pub fn take(&self, key: EntryKeyOf<N>) -> bool {
        let mut m = self.0.lock().unwrap_or_else(|p| p.into_inner());
        match m.get_mut(&key) {
            Some((n, until)) if *until > Instant::now() => {
                *n -= 1;
                if *n == 0 {
                    m.remove(&key);
                }
                true
            }
            Some(_) => {
                m.remove(&key);
                false
            }
            None => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::reconcile::{EntryKey, Op};
    use std::net::Ipv4Addr;

    use super::*;
    use crate::mac::MacAddr;

    #[test]
    fn echoes_are_consumed_once_and_adds_cancel_them() {
        let own = OwnDeletions::default();
        let ip: Ipv4Addr = "10.244.2.0".parse().unwrap();
        let mac: MacAddr = "0e:00:00:00:00:02".parse().unwrap();
        let del = Op::DelNeigh { ip, mac };
        own.expect(&[del.clone(), del.clone()]);
        assert!(own.take(EntryKey::Neigh(ip)));
        assert!(own.take(EntryKey::Neigh(ip)));
        assert!(
            !own.take(EntryKey::Neigh(ip)),
            "only as many echoes as deletions"
        );
        // Someone else's deletion of another entry is never taken for ours.
        own.expect(std::slice::from_ref(&del));
        assert!(!own.take(EntryKey::Fdb(mac, "198.18.0.2".parse().unwrap())));
        // Re-added after our deletion: a later deletion is someone else's.
        own.expect(&[Op::SetNeigh { ip, mac }]);
        assert!(!own.take(EntryKey::Neigh(ip)));
    }
}
