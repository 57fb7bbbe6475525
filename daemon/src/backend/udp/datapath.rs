//! The packet path: per TUN queue, one thread moves packets from the TUN device into UDP
//! datagrams to the peer whose subnet holds their destination, and one moves datagrams from
//! peers into the TUN device. flannel's wire format: the datagram's payload is the bare IP
//! packet. Blocking threads, not tasks: each loop is a read and a write, nothing to wait on
//! together, and they keep running whatever the control side's runtime is doing.

use std::io;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

use socket2::{Domain, Protocol, Socket, Type};
use tun_rs::SyncDevice;

use super::table::{Published, Reader};

/// What the packet path counted, for /metrics.
#[derive(Debug, Default)]
pub struct Stats {
    pub tx_packets: AtomicU64,
    pub tx_bytes: AtomicU64,
    pub rx_packets: AtomicU64,
    pub rx_bytes: AtomicU64,
    /// From the TUN device, for an address in no peer's subnet.
    pub drop_no_peer: AtomicU64,
    /// A datagram from an address that is no peer's.
    pub drop_unknown_source: AtomicU64,
    /// A datagram from a peer whose packet is not for this node's subnet.
    pub drop_not_ours: AtomicU64,
    /// Not an IPv4 packet, or shorter than its header says.
    pub drop_malformed: AtomicU64,
    /// The kernel refused to send it (no route to the peer, buffer full).
    pub drop_send_error: AtomicU64,
}

impl Stats {
    /// (reason, counter) for each drop reason.
    pub fn drops(&self) -> [(&'static str, &AtomicU64); 5] {
        [
            ("no_peer", &self.drop_no_peer),
            ("unknown_source", &self.drop_unknown_source),
            ("not_ours", &self.drop_not_ours),
            ("malformed", &self.drop_malformed),
            ("send_error", &self.drop_send_error),
        ]
    }
}

const MAX_PACKET: usize = 65535;
/// How often a worker blocked on its socket looks whether it should stop.
const POLL: Duration = Duration::from_millis(500);

/// The running workers of one TUN device; they stop when this is dropped (and on their own
/// when the device goes).
pub struct Datapath {
    stop: Arc<AtomicBool>,
}

impl Drop for Datapath {
    fn drop(&mut self) {
        self.stop.store(true, Relaxed);
    }
}

/// A UDP socket on `addr` that other queues' sockets share (SO_REUSEPORT: the kernel spreads
/// flows over them).
fn socket(addr: SocketAddrV4) -> io::Result<UdpSocket> {
    let s = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP))?;
    s.set_reuse_port(true)?;
    s.set_read_timeout(Some(POLL))?;
    // Bursts from a fast sender should wait in the kernel, not be dropped there.
    let _ = s.set_recv_buffer_size(4 << 20);
    let _ = s.set_send_buffer_size(4 << 20);
    s.bind(&SocketAddr::V4(addr).into())?;
    Ok(s.into())
}

/// Starts `queues.len()` pairs of workers, one pair per TUN queue.
pub fn start(
    queues: Vec<SyncDevice>,
    local: SocketAddrV4,
    table: &Arc<Published>,
    stats: &Arc<Stats>,
) -> io::Result<Datapath> {
    let stop = Arc::new(AtomicBool::new(false));
    for (q, tun) in queues.into_iter().enumerate() {
        let tun = Arc::new(tun);
        let sock = Arc::new(socket(local)?);
        let (t, s, r, st, halt) = (
            tun.clone(),
            sock.clone(),
            table.reader(),
            stats.clone(),
            stop.clone(),
        );
        std::thread::Builder::new()
            .name(format!("twill-udp-tx{q}"))
            .spawn(move || to_peers(&t, &s, r, &st, &halt))?;
        let (r, st, halt) = (table.reader(), stats.clone(), stop.clone());
        std::thread::Builder::new()
            .name(format!("twill-udp-rx{q}"))
            .spawn(move || from_peers(&tun, &sock, r, &st, &halt))?;
    }
    Ok(Datapath { stop })
}

/// The IPv4 header's destination and source, if `p` is a whole IPv4 packet (`p` cut to the
/// length its header gives).
fn ipv4(p: &[u8]) -> Option<(Ipv4Addr, Ipv4Addr, usize)> {
    if p.len() < 20 || p[0] >> 4 != 4 || usize::from(p[0] & 0x0f) * 4 < 20 {
        return None;
    }
    let total = usize::from(u16::from_be_bytes([p[2], p[3]]));
    if total < usize::from(p[0] & 0x0f) * 4 || total > p.len() {
        return None;
    }
    let src = Ipv4Addr::new(p[12], p[13], p[14], p[15]);
    let dst = Ipv4Addr::new(p[16], p[17], p[18], p[19]);
    Some((dst, src, total))
}

fn to_peers(
    tun: &SyncDevice,
    sock: &UdpSocket,
    mut table: Reader,
    stats: &Stats,
    stop: &AtomicBool,
) {
    let port = sock.local_addr().map(|a| a.port()).unwrap_or(0);
    let mut buf = vec![0u8; MAX_PACKET];
    while !stop.load(Relaxed) {
        let n = match tun.recv(&mut buf) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                if !stop.load(Relaxed) {
                    tracing::warn!(error = %e, "udp backend: reading the TUN device failed; this queue stops");
                }
                return;
            }
        };
        let Some((dst, _, len)) = ipv4(&buf[..n]) else {
            Stats::inc(&stats.drop_malformed);
            continue;
        };
        let Some(peer) = table.table().peer_for(dst) else {
            Stats::inc(&stats.drop_no_peer);
            continue;
        };
        match sock.send_to(&buf[..len], SocketAddrV4::new(peer, port)) {
            Ok(_) => {
                Stats::inc(&stats.tx_packets);
                stats.tx_bytes.fetch_add(len as u64, Relaxed);
            }
            Err(_) => Stats::inc(&stats.drop_send_error),
        }
    }
}

fn from_peers(
    tun: &SyncDevice,
    sock: &UdpSocket,
    mut table: Reader,
    stats: &Stats,
    stop: &AtomicBool,
) {
    let mut buf = vec![0u8; MAX_PACKET];
    while !stop.load(Relaxed) {
        let (n, from) = match sock.recv_from(&mut buf) {
            Ok(r) => r,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock
                        | io::ErrorKind::TimedOut
                        | io::ErrorKind::Interrupted
                ) =>
            {
                continue
            }
            Err(e) => {
                tracing::warn!(error = %e, "udp backend: receiving failed; this queue stops");
                return;
            }
        };
        let t = table.table();
        let SocketAddr::V4(from) = from else {
            Stats::inc(&stats.drop_unknown_source);
            continue;
        };
        if !t.is_peer(*from.ip()) {
            Stats::inc(&stats.drop_unknown_source);
            continue;
        }
        let Some((dst, _, len)) = ipv4(&buf[..n]) else {
            Stats::inc(&stats.drop_malformed);
            continue;
        };
        if !t.is_own(dst) {
            Stats::inc(&stats.drop_not_ours);
            continue;
        }
        match tun.send(&buf[..len]) {
            Ok(_) => {
                Stats::inc(&stats.rx_packets);
                stats.rx_bytes.fetch_add(len as u64, Relaxed);
            }
            Err(e) => {
                if stop.load(Relaxed) {
                    return;
                }
                Stats::inc(&stats.drop_send_error);
                tracing::debug!(error = %e, "udp backend: writing to the TUN device failed");
            }
        }
    }
}

impl Stats {
    fn inc(c: &AtomicU64) {
        c.fetch_add(1, Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_whole_ipv4_headers_only() {
        let mut p = vec![0u8; 28];
        p[0] = 0x45;
        p[2..4].copy_from_slice(&28u16.to_be_bytes());
        p[12..16].copy_from_slice(&[10, 244, 1, 2]);
        p[16..20].copy_from_slice(&[10, 244, 2, 3]);
        assert_eq!(
            ipv4(&p),
            Some((
                Ipv4Addr::new(10, 244, 2, 3),
                Ipv4Addr::new(10, 244, 1, 2),
                28
            ))
        );
        // Trailing bytes beyond the header's length are not the packet's.
        p.extend([0u8; 4]);
        assert_eq!(ipv4(&p).map(|x| x.2), Some(28));
        // Shorter than it says, IPv6, a header length below 20, garbage.
        assert_eq!(ipv4(&p[..27]), None);
        let mut v6 = p.clone();
        v6[0] = 0x60;
        assert_eq!(ipv4(&v6), None);
        let mut short = p.clone();
        short[0] = 0x44;
        assert_eq!(ipv4(&short), None);
        assert_eq!(ipv4(b"hello"), None);
    }
}
