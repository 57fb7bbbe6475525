//! The peer table the packet path reads: which public IP a pod address is behind, and which
//! addresses may send to us. Built whole on each change and published; the workers pick up a
//! new one with one atomic load per packet, never a lock.

use std::collections::{HashMap, HashSet};
use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use ipnet::Ipv4Net;

use crate::peer::Peer;

#[derive(Debug, Default)]
pub struct Table {
    /// (network address, prefix length) of each peer's subnet → its public IP.
    by_subnet: HashMap<(u32, u8), Ipv4Addr>,
    /// The prefix lengths in use, longest first (one, unless leases of another SubnetLen are
    /// still around).
    lens: Vec<u8>,
    sources: HashSet<Ipv4Addr>,
    /// Our own subnet: what datagrams may carry to us.
    own: Option<Ipv4Net>,
}

impl Table {
    pub fn new(own: Ipv4Net, peers: impl IntoIterator<Item = Peer>) -> Table {
        let mut t = Table {
            own: Some(own),
            ..Table::default()
        };
        for p in peers {
            t.by_subnet.insert(
                (u32::from(p.subnet.network()), p.subnet.prefix_len()),
                p.public_ip,
            );
            t.sources.insert(p.public_ip);
            if !t.lens.contains(&p.subnet.prefix_len()) {
                t.lens.push(p.subnet.prefix_len());
            }
        }
        t.lens.sort_unstable_by(|a, b| b.cmp(a));
        t
    }

    /// The public IP of the peer whose subnet holds `dst`.
    pub fn peer_for(&self, dst: Ipv4Addr) -> Option<Ipv4Addr> {
        let d = u32::from(dst);
        self.lens.iter().find_map(|&len| {
            let mask = if len == 0 { 0 } else { u32::MAX << (32 - len) };
            self.by_subnet.get(&(d & mask, len)).copied()
        })
    }

    /// Whether `src` is a peer's public IP.
    pub fn is_peer(&self, src: Ipv4Addr) -> bool {
        self.sources.contains(&src)
    }

    /// Whether `dst` is ours to deliver.
    pub fn is_own(&self, dst: Ipv4Addr) -> bool {
        self.own.is_some_and(|o| o.contains(&dst))
    }

    pub fn len(&self) -> usize {
        self.by_subnet.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_subnet.is_empty()
    }
}

/// Where the control side publishes tables and the workers read them.
#[derive(Debug, Default)]
pub struct Published {
    current: Mutex<Arc<Table>>,
    generation: AtomicU64,
}

impl Published {
    pub fn publish(&self, t: Table) {
        *self.current.lock().unwrap_or_else(|e| e.into_inner()) = Arc::new(t);
        self.generation.fetch_add(1, Ordering::Release);
    }

    pub fn reader(self: &Arc<Self>) -> Reader {
        Reader {
            from: self.clone(),
            generation: u64::MAX,
            table: Arc::default(),
        }
    }
}

/// One worker's view: the table it last took, replaced when a newer one was published.
pub struct Reader {
    from: Arc<Published>,
    generation: u64,
    table: Arc<Table>,
}

impl Reader {
    pub fn table(&mut self) -> &Table {
        let g = self.from.generation.load(Ordering::Acquire);
        if g != self.generation {
            self.table = self
                .from
                .current
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone();
            self.generation = g;
        }
        &self.table
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(subnet: &str, ip: &str) -> Peer {
        Peer {
            subnet: subnet.parse().unwrap(),
            public_ip: ip.parse().unwrap(),
            vtep_mac: None,
        }
    }

    #[test]
    fn finds_the_peer_by_subnet_and_knows_its_sources() {
        let t = Table::new(
            "10.244.1.0/24".parse().unwrap(),
            [
                peer("10.244.2.0/24", "198.18.0.2"),
                peer("10.244.3.0/24", "198.18.0.3"),
                peer("10.244.16.0/20", "198.18.0.9"),
            ],
        );
        let ip = |s: &str| s.parse::<Ipv4Addr>().unwrap();
        assert_eq!(t.peer_for(ip("10.244.2.7")), Some(ip("198.18.0.2")));
        assert_eq!(t.peer_for(ip("10.244.3.255")), Some(ip("198.18.0.3")));
        assert_eq!(t.peer_for(ip("10.244.31.1")), Some(ip("198.18.0.9")));
        assert_eq!(t.peer_for(ip("10.244.1.5")), None);
        assert_eq!(t.peer_for(ip("10.244.4.1")), None);
        assert!(t.is_peer(ip("198.18.0.3")) && !t.is_peer(ip("198.18.0.4")));
        assert!(t.is_own(ip("10.244.1.0")) && !t.is_own(ip("10.244.2.1")));
    }

    #[test]
    fn a_reader_sees_what_is_published_next() {
        let p = Arc::new(Published::default());
        let mut r = p.reader();
        assert_eq!(r.table().len(), 0);
        p.publish(Table::new(
            "10.244.1.0/24".parse().unwrap(),
            [peer("10.244.2.0/24", "198.18.0.2")],
        ));
        assert_eq!(r.table().len(), 1);
        p.publish(Table::new("10.244.1.0/24".parse().unwrap(), []));
        assert_eq!(r.table().len(), 0);
    }
}
