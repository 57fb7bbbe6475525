//! The packet path: per TUN queue, one thread moves packets from the TUN device into UDP
//! datagrams to the peer whose subnet holds their destination, and one moves datagrams from
//! peers into the TUN device. flannel's wire format: the datagram's payload is the bare IP
//! packet. Blocking threads, not tasks: each loop is a read and a write, nothing to wait on
//! together, and they keep running whatever the control side's runtime is doing.
//!
//! Batched both ways, after wireguard-go: the device takes TCP segmentation offload, so one
//! read is up to 64 KiB of one flow, split into MTU-sized packets that leave in one
//! `sendmmsg`; datagrams arrive by `recvmmsg`, and same-flow TCP segments among them are
//! coalesced again into one write to the device (tun-rs's GSO split and GRO table).

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
    /// Reads from the TUN device, and the packets they gave (one super-packet is many).
    pub tx_batches: AtomicU64,
    pub tx_batched: AtomicU64,
    /// `recvmmsg` calls that returned datagrams, and the datagrams.
    pub rx_batches: AtomicU64,
    pub rx_batched: AtomicU64,
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
    mtu: usize,
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
            .spawn(move || to_peers(&t, &s, r, &st, &halt, mtu))?;
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

/// Packets from the TUN device per read: with offloads one read is a TCP super-packet of up to
/// 64 KiB, split here into MTU-sized packets (tun-rs, after wireguard-go).
const TX_BATCH: usize = tun_rs::IDEAL_BATCH_SIZE;
/// Datagrams per `recvmmsg`.
const RX_BATCH: usize = 32;
/// Room in front of each received packet for the virtio-net header the TUN device takes.
const HDR: usize = tun_rs::VIRTIO_NET_HDR_LEN;

/// Whether a TUN error ends the queue (the device is gone) rather than one packet.
fn fatal(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EBADFD | libc::EBADF | libc::ENODEV | libc::ENXIO | libc::EIO)
    )
}

fn to_peers(
    tun: &SyncDevice,
    sock: &UdpSocket,
    mut table: Reader,
    stats: &Stats,
    stop: &AtomicBool,
    mtu: usize,
) {
    let port = sock.local_addr().map(|a| a.port()).unwrap_or(0);
    let mut original = vec![0u8; HDR + MAX_PACKET];
    let mut bufs = vec![vec![0u8; mtu.max(576) + 64]; TX_BATCH];
    let mut sizes = vec![0usize; TX_BATCH];
    let mut out: Vec<(usize, Ipv4Addr)> = Vec::with_capacity(TX_BATCH);
    while !stop.load(Relaxed) {
        let n = match tun.recv_multiple(&mut original, &mut bufs, &mut sizes, 0) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) if fatal(&e) => {
                if !stop.load(Relaxed) {
                    tracing::warn!(error = %e, "udp backend: reading the TUN device failed; this queue stops");
                }
                return;
            }
            Err(_) => {
                Stats::inc(&stats.drop_malformed);
                continue;
            }
        };
        Stats::batch(&stats.tx_batches, &stats.tx_batched, n);
        let t = table.table();
        out.clear();
        for i in 0..n {
            let Some((dst, _, len)) = ipv4(&bufs[i][..sizes[i]]) else {
                Stats::inc(&stats.drop_malformed);
                continue;
            };
            let Some(peer) = t.peer_for(dst) else {
                Stats::inc(&stats.drop_no_peer);
                continue;
            };
            sizes[i] = len;
            out.push((i, peer));
        }
        let sent = send_batch(sock, port, &bufs, &sizes, &out);
        Stats::add(&stats.tx_packets, sent.0);
        Stats::add(&stats.tx_bytes, sent.1);
        Stats::add(&stats.drop_send_error, (out.len() - sent.0 as usize) as u64);
    }
}

/// `sendmmsg` of the packets `out` names (buffer index, peer); returns (packets, bytes) sent.
fn send_batch(
    sock: &UdpSocket,
    port: u16,
    bufs: &[Vec<u8>],
    sizes: &[usize],
    out: &[(usize, Ipv4Addr)],
) -> (u64, u64) {
    use std::os::fd::AsRawFd;
    if out.is_empty() {
        return (0, 0);
    }
    let addrs: Vec<libc::sockaddr_in> = out
        .iter()
        .map(|(_, peer)| libc::sockaddr_in {
            sin_family: libc::AF_INET as libc::sa_family_t,
            sin_port: port.to_be(),
            sin_addr: libc::in_addr {
                s_addr: u32::from(*peer).to_be(),
            },
            sin_zero: [0; 8],
        })
        .collect();
    let mut iovs: Vec<libc::iovec> = out
        .iter()
        .map(|(i, _)| libc::iovec {
            iov_base: bufs[*i].as_ptr() as *mut libc::c_void,
            iov_len: sizes[*i],
        })
        .collect();
    let mut msgs: Vec<libc::mmsghdr> = (0..out.len())
        .map(|k| {
            // SAFETY: mmsghdr is plain data; all-zero is a valid empty header.
            let mut m: libc::mmsghdr = unsafe { std::mem::zeroed() };
            m.msg_hdr.msg_name = (&addrs[k] as *const libc::sockaddr_in) as *mut libc::c_void;
            m.msg_hdr.msg_namelen = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
            m.msg_hdr.msg_iov = &mut iovs[k];
            m.msg_hdr.msg_iovlen = 1;
            m
        })
        .collect();
    let (mut done, mut bytes) = (0usize, 0u64);
    while done < msgs.len() {
        // SAFETY: every header points at a live address, iovec and buffer, which outlive the
        // call; the count is the headers left.
        let r = unsafe {
            libc::sendmmsg(
                sock.as_raw_fd(),
                msgs[done..].as_mut_ptr(),
                (msgs.len() - done) as libc::c_uint,
                0,
            )
        };
        if r <= 0 {
            if r < 0 && io::Error::last_os_error().kind() == io::ErrorKind::Interrupted {
                continue;
            }
            // The first one left was refused: count it lost and go on with the rest.
            done += 1;
            continue;
        }
        for m in &msgs[done..done + r as usize] {
            bytes += u64::from(m.msg_len);
        }
        done += r as usize;
    }
    let refused = msgs.iter().filter(|m| m.msg_len == 0).count();
    ((msgs.len() - refused) as u64, bytes)
}

fn from_peers(
    tun: &SyncDevice,
    sock: &UdpSocket,
    mut table: Reader,
    stats: &Stats,
    stop: &AtomicBool,
) {
    use std::os::fd::AsRawFd;
    let full = HDR + MAX_PACKET;
    let mut bufs: Vec<Vec<u8>> = (0..RX_BATCH).map(|_| vec![0u8; full]).collect();
    let mut gro = tun_rs::GROTable::default();
    // SAFETY (for both): plain data, zero is valid.
    let mut addrs: Vec<libc::sockaddr_in> = vec![unsafe { std::mem::zeroed() }; RX_BATCH];
    let mut iovs: Vec<libc::iovec> = vec![unsafe { std::mem::zeroed() }; RX_BATCH];
    let mut msgs: Vec<libc::mmsghdr> = vec![unsafe { std::mem::zeroed() }; RX_BATCH];
    while !stop.load(Relaxed) {
        for (k, b) in bufs.iter_mut().enumerate() {
            // SAFETY: every byte up to `full` was initialised when the buffer was made (the
            // GRO table only ever grows a buffer by filling it), and capacity is at least that.
            unsafe { b.set_len(full) };
            iovs[k] = libc::iovec {
                iov_base: b[HDR..].as_mut_ptr() as *mut libc::c_void,
                iov_len: MAX_PACKET,
            };
            msgs[k].msg_hdr.msg_name = (&mut addrs[k] as *mut libc::sockaddr_in).cast();
            msgs[k].msg_hdr.msg_namelen =
                std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
            msgs[k].msg_hdr.msg_iov = &mut iovs[k];
            msgs[k].msg_hdr.msg_iovlen = 1;
            msgs[k].msg_len = 0;
        }
        // SAFETY: the headers point at live addresses, iovecs and buffers of the sizes given.
        // MSG_WAITFORONE: block (up to the socket's timeout) for the first, take what else
        // is there.
        let r = unsafe {
            libc::recvmmsg(
                sock.as_raw_fd(),
                msgs.as_mut_ptr(),
                RX_BATCH as libc::c_uint,
                libc::MSG_WAITFORONE,
                std::ptr::null_mut(),
            )
        };
        if r < 0 {
            let e = io::Error::last_os_error();
            if matches!(
                e.kind(),
                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut | io::ErrorKind::Interrupted
            ) {
                continue;
            }
            tracing::warn!(error = %e, "udp backend: receiving failed; this queue stops");
            return;
        }
        let n = r as usize;
        Stats::batch(&stats.rx_batches, &stats.rx_batched, n);
        let t = table.table();
        let mut keep = 0;
        for k in 0..n {
            let from = Ipv4Addr::from(u32::from_be(addrs[k].sin_addr.s_addr));
            let got = msgs[k].msg_len as usize;
            if addrs[k].sin_family != libc::AF_INET as libc::sa_family_t || !t.is_peer(from) {
                Stats::inc(&stats.drop_unknown_source);
                continue;
            }
            let Some((dst, _, len)) = ipv4(&bufs[k][HDR..HDR + got]) else {
                Stats::inc(&stats.drop_malformed);
                continue;
            };
            if !t.is_own(dst) {
                Stats::inc(&stats.drop_not_ours);
                continue;
            }
            bufs.swap(keep, k);
            bufs[keep].truncate(HDR + len);
            keep += 1;
        }
        if keep == 0 {
            continue;
        }
        let bytes: usize = bufs[..keep].iter().map(|b| b.len() - HDR).sum();
        // Same-flow TCP segments are coalesced into one write when the device takes offloads.
        match tun.send_multiple(&mut gro, &mut bufs[..keep], HDR) {
            Ok(_) => {
                Stats::add(&stats.rx_packets, keep as u64);
                Stats::add(&stats.rx_bytes, bytes as u64);
            }
            Err(e) => {
                if stop.load(Relaxed) || fatal(&e) {
                    return;
                }
                Stats::add(&stats.drop_send_error, keep as u64);
                tracing::debug!(error = %e, "udp backend: writing to the TUN device failed");
            }
        }
    }
}

impl Stats {
    fn inc(c: &AtomicU64) {
        c.fetch_add(1, Relaxed);
    }

    fn add(c: &AtomicU64, n: u64) {
        if n > 0 {
            c.fetch_add(n, Relaxed);
        }
    }

    fn batch(batches: &AtomicU64, packets: &AtomicU64, n: usize) {
        batches.fetch_add(1, Relaxed);
        packets.fetch_add(n as u64, Relaxed);
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
