//! The packet path: per TUN queue, one thread moves packets from the TUN device into UDP
//! datagrams to the peer whose subnet holds their destination, and one moves datagrams from
//! peers into the TUN device. flannel's wire format: the datagram's payload is the bare IP
//! packet. Blocking threads, not tasks: each loop is a read and a write, nothing to wait on
//! together, and they keep running whatever the control side's runtime is doing.
//!
//! Batched both ways, after wireguard-go: the device takes TCP segmentation offload, so one
//! read is up to 64 KiB of one flow, split into MTU-sized packets (`split`: headers made per
//! segment, payloads left where the read put them). Those going to one peer leave as one UDP
//! GSO send (`UDP_SEGMENT`: the kernel carries them as one buffer and cuts the datagrams as
//! late as it can, on the receiving host's socket when it takes UDP GRO), all of a read's
//! sends in one `sendmmsg`. Datagrams arrive by `recvmmsg` on a socket with `UDP_GRO`, so one
//! message is a run of same-sized datagrams from one peer; same-flow TCP segments among them
//! are coalesced again into one write to the device (`gro`, from the receive buffers). Where
//! the kernel lacks UDP GSO or GRO, one datagram per message; without TUN offload, one packet
//! per read and write.

use std::io::{self, IoSlice};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

use socket2::{Domain, Protocol, Socket, Type};
use tun_rs::SyncDevice;

use super::gro::Coalescer;
use super::split::Splitter;
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
    /// UDP messages handed to the kernel (a GSO send is one) and taken from it (a GRO run
    /// is one).
    pub tx_messages: AtomicU64,
    pub rx_messages: AtomicU64,
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

/// What the kernel does for this node's UDP sockets (UDP GSO since Linux 4.18, GRO since 5.0).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Offloads {
    /// Sends take `UDP_SEGMENT`: many datagrams to one peer in one buffer.
    pub gso: bool,
    /// The socket takes `UDP_GRO`: a receive is a run of same-sized datagrams from one peer.
    pub gro: bool,
}

/// Turns on UDP GRO for `sock` and finds whether sends can use GSO: what the kernel offers.
fn offloads(sock: &UdpSocket) -> Offloads {
    use std::os::fd::AsRawFd;
    let fd = sock.as_raw_fd();
    let on: libc::c_int = 1;
    // SAFETY: a setsockopt with a live fd and an int of the size given.
    let gro = unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_UDP,
            libc::UDP_GRO,
            (&on as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    } == 0;
    let mut val: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: a getsockopt into an int of the size given. Kernels without UDP GSO refuse it.
    let gso = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_UDP,
            libc::UDP_SEGMENT,
            (&mut val as *mut libc::c_int).cast(),
            &mut len,
        )
    } == 0;
    Offloads { gso, gro }
}

/// Starts `queues.len()` pairs of workers, one pair per TUN queue; says which UDP offloads
/// the kernel gave (none when `offload` is false).
pub fn start(
    queues: Vec<SyncDevice>,
    local: SocketAddrV4,
    table: &Arc<Published>,
    stats: &Arc<Stats>,
    offload: bool,
) -> io::Result<(Datapath, Offloads)> {
    let stop = Arc::new(AtomicBool::new(false));
    // Made first: if a later queue fails, dropping it stops the workers already started.
    let datapath = Datapath { stop: stop.clone() };
    let mut got = Offloads {
        gso: true,
        gro: true,
    };
    for (q, tun) in queues.into_iter().enumerate() {
        let tun = Arc::new(tun);
        let sock = socket(local)?;
        let off = if offload {
            offloads(&sock)
        } else {
            Offloads {
                gso: false,
                gro: false,
            }
        };
        got.gso &= off.gso;
        got.gro &= off.gro;
        let sock = Arc::new(sock);
        let (t, s, r, st, halt) = (
            tun.clone(),
            sock.clone(),
            table.reader(),
            stats.clone(),
            stop.clone(),
        );
        std::thread::Builder::new()
            .name(format!("twill-udp-tx{q}"))
            .spawn(move || to_peers(&t, &s, r, &st, &halt, off.gso))?;
        let (r, st, halt) = (table.reader(), stats.clone(), stop.clone());
        std::thread::Builder::new()
            .name(format!("twill-udp-rx{q}"))
            .spawn(move || from_peers(&tun, &sock, r, &st, &halt))?;
    }
    Ok((datapath, got))
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

/// Datagrams per `recvmmsg`.
const RX_BATCH: usize = 32;
/// The virtio-net header in front of each read from the TUN device when it takes offloads.
const HDR: usize = super::gro::VNET_HDR;

/// Whether a TUN error ends the queue (the device is gone) rather than one packet. Not EIO:
/// the kernel gives that for a write while the device is merely down.
fn fatal(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EBADFD | libc::EBADF | libc::ENODEV | libc::ENXIO)
    )
}

fn to_peers(
    tun: &SyncDevice,
    sock: &UdpSocket,
    mut table: Reader,
    stats: &Stats,
    stop: &AtomicBool,
    gso: bool,
) {
    use std::os::fd::AsRawFd;
    let fd = tun.as_raw_fd();
    let offload = tun.tcp_gso();
    let port = sock.local_addr().map(|a| a.port()).unwrap_or(0);
    let mut buf = vec![0u8; HDR + MAX_PACKET];
    let mut splitter = Splitter::default();
    let mut sender = Sender::new(port, gso);
    // Non-blocking, and a bounded wait when there is nothing to read: a blocking read would
    // keep this thread, its queue and its socket (bound to the node's old address after a
    // change of it) until a packet happened to come to this queue. The queue's writes (the
    // receiving thread's) never wait on a TUN device, so they are unaffected.
    // SAFETY: fcntl on a descriptor this queue owns.
    unsafe {
        let flags = libc::fcntl(fd, libc::F_GETFL);
        if flags >= 0 {
            libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK);
        }
    }
    while !stop.load(Relaxed) {
        // SAFETY: a read into a live buffer of the length given.
        let n = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            if e.kind() == io::ErrorKind::WouldBlock {
                let mut p = libc::pollfd {
                    fd,
                    events: libc::POLLIN,
                    revents: 0,
                };
                // SAFETY: one live pollfd. Its result is the next read's to interpret.
                unsafe { libc::poll(&mut p, 1, POLL.as_millis() as libc::c_int) };
                continue;
            }
            if fatal(&e) {
                if !stop.load(Relaxed) {
                    tracing::warn!(error = %e, "udp backend: reading the TUN device failed; this queue stops");
                }
                return;
            }
            Stats::inc(&stats.drop_malformed);
            continue;
        }
        let mut dgrams = Vec::with_capacity(64);
        if let Err(m) = splitter.split(&mut buf[..n as usize], offload, &mut dgrams) {
            Stats::inc(&stats.drop_malformed);
            tracing::debug!(
                why = m.0,
                "udp backend: dropped a packet from the TUN device"
            );
            continue;
        }
        Stats::batch(&stats.tx_batches, &stats.tx_batched, dgrams.len());
        let t = table.table();
        let mut out: Vec<Outgoing> = Vec::with_capacity(dgrams.len());
        for (head, payload) in dgrams {
            // A segment's headers were made from a checked packet; a packet as read is checked
            // here, and cut to the length its header gives.
            let (dst, payload) = if head.is_empty() {
                let Some((dst, _, len)) = ipv4(payload) else {
                    Stats::inc(&stats.drop_malformed);
                    continue;
                };
                (dst, &payload[..len])
            } else {
                (
                    Ipv4Addr::new(head[16], head[17], head[18], head[19]),
                    payload,
                )
            };
            let Some(peer) = t.peer_for(dst) else {
                Stats::inc(&stats.drop_no_peer);
                continue;
            };
            out.push((peer, head, payload));
        }
        let (messages, packets, bytes) = sender.send(sock, &out);
        Stats::add(&stats.tx_messages, messages);
        Stats::add(&stats.tx_packets, packets);
        Stats::add(&stats.tx_bytes, bytes);
        Stats::add(&stats.drop_send_error, out.len() as u64 - packets);
    }
}

/// A datagram on its way: the peer, its headers' piece (may be empty) and its payload's.
type Outgoing<'a> = (Ipv4Addr, &'a [u8], &'a [u8]);

/// Most datagrams in one GSO send (the kernel's `UDP_MAX_SEGMENTS` before Linux 6.10).
const GSO_SEGMENTS: usize = 64;
/// Most bytes in one GSO send: what one UDP datagram over IPv4 could carry.
const GSO_BYTES: usize = 65535 - 20 - 8;

/// Runs of `out` (peer, size) that can leave as one GSO send: same peer, same size but for a
/// shorter last one, within the kernel's limits. Each is (first index, count, segment size).
fn gso_runs(out: &[(Ipv4Addr, usize)], gso: bool, runs: &mut Vec<(usize, usize, usize)>) {
    runs.clear();
    let mut k = 0;
    while k < out.len() {
        let (peer, seg) = out[k];
        let (mut count, mut total) = (1, seg);
        while gso && k + count < out.len() && count < GSO_SEGMENTS {
            let (p, size) = out[k + count];
            if p != peer || size > seg || total + size > GSO_BYTES {
                break;
            }
            count += 1;
            total += size;
            if size < seg {
                // Only the last datagram of a GSO send may be shorter than the segment size.
                break;
            }
        }
        runs.push((k, count, seg));
        k += count;
    }
}

/// The `sendmmsg` side: its buffers live across sends so a batch allocates little.
struct Sender {
    port: u16,
    /// UDP GSO in use; cleared for good if the kernel refuses it on this path.
    gso: bool,
    sizes: Vec<(Ipv4Addr, usize)>,
    runs: Vec<(usize, usize, usize)>,
    addrs: Vec<libc::sockaddr_in>,
    iovs: Vec<libc::iovec>,
    /// One control message (`UDP_SEGMENT`, a u16) per send.
    ctrl: Vec<[u64; 4]>,
    msgs: Vec<libc::mmsghdr>,
}

impl Sender {
    fn new(port: u16, gso: bool) -> Sender {
        Sender {
            port,
            gso,
            sizes: Vec::new(),
            runs: Vec::new(),
            addrs: Vec::new(),
            iovs: Vec::new(),
            ctrl: Vec::new(),
            msgs: Vec::new(),
        }
    }

    /// Sends `out`; returns (messages, packets, bytes) sent.
    fn send(&mut self, sock: &UdpSocket, out: &[Outgoing<'_>]) -> (u64, u64, u64) {
        self.sizes.clear();
        self.sizes
            .extend(out.iter().map(|(p, h, d)| (*p, h.len() + d.len())));
        gso_runs(&self.sizes, self.gso, &mut self.runs);
        match self.sendmmsg(sock, out) {
            Ok(sent) => sent,
            Err(e) => {
                // EIO: the path out has no checksum offload for GSO. Without GSO from now on.
                tracing::warn!(error = %e, "udp backend: the kernel refused UDP segmentation offload on the way to peers; one datagram per packet from now on");
                self.gso = false;
                gso_runs(&self.sizes, false, &mut self.runs);
                self.sendmmsg(sock, out).unwrap_or((0, 0, 0))
            }
        }
    }

    /// One `sendmmsg` of `self.runs`. Err only when the kernel refused GSO before anything
    /// was sent.
    fn sendmmsg(&mut self, sock: &UdpSocket, out: &[Outgoing<'_>]) -> io::Result<(u64, u64, u64)> {
        use std::os::fd::AsRawFd;
        if out.is_empty() {
            return Ok((0, 0, 0));
        }
        let n = self.runs.len();
        self.addrs.clear();
        self.iovs.clear();
        self.ctrl.clear();
        self.msgs.clear();
        // Where each send's iovecs start.
        let mut starts = Vec::with_capacity(n);
        for &(k, count, seg) in &self.runs {
            self.addrs.push(libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: self.port.to_be(),
                sin_addr: libc::in_addr {
                    s_addr: u32::from(out[k].0).to_be(),
                },
                sin_zero: [0; 8],
            });
            starts.push(self.iovs.len());
            for (_, head, payload) in &out[k..k + count] {
                for piece in [head, payload] {
                    if !piece.is_empty() {
                        self.iovs.push(libc::iovec {
                            iov_base: piece.as_ptr() as *mut libc::c_void,
                            iov_len: piece.len(),
                        });
                    }
                }
            }
            self.ctrl.push(segment_cmsg(seg));
        }
        starts.push(self.iovs.len());
        // Pointers are taken only now: the vectors no longer grow.
        for m in 0..n {
            // SAFETY: mmsghdr is plain data; all-zero is a valid empty header.
            let mut h: libc::mmsghdr = unsafe { std::mem::zeroed() };
            h.msg_hdr.msg_name = (&mut self.addrs[m] as *mut libc::sockaddr_in).cast();
            h.msg_hdr.msg_namelen = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
            // SAFETY: starts[m] is within iovs (the last start is its length, never used here).
            h.msg_hdr.msg_iov = unsafe { self.iovs.as_mut_ptr().add(starts[m]) };
            h.msg_hdr.msg_iovlen = starts[m + 1] - starts[m];
            if self.runs[m].1 > 1 {
                h.msg_hdr.msg_control = self.ctrl[m].as_mut_ptr().cast();
                // SAFETY: arithmetic only.
                h.msg_hdr.msg_controllen = unsafe { libc::CMSG_SPACE(2) } as usize;
            }
            self.msgs.push(h);
        }
        let (mut done, mut messages, mut packets, mut bytes) = (0usize, 0u64, 0u64, 0u64);
        while done < n {
            // SAFETY: every header points at a live address, iovecs, control message and
            // buffers, which outlive the call; the count is the headers left.
            let r = unsafe {
                libc::sendmmsg(
                    sock.as_raw_fd(),
                    self.msgs[done..].as_mut_ptr(),
                    (n - done) as libc::c_uint,
                    0,
                )
            };
            if r <= 0 {
                let e = io::Error::last_os_error();
                if r < 0 && e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                // EIO for a GSO send: the path cannot segment (the caller turns GSO off). A
                // single datagram's EIO says nothing about GSO.
                if r < 0
                    && done == 0
                    && self.gso
                    && self.runs[done].1 > 1
                    && e.raw_os_error() == Some(libc::EIO)
                {
                    return Err(e);
                }
                // The first one left was refused. A GSO send is refused whole when its
                // datagrams no longer fit the path's MTU (EINVAL, EMSGSIZE), where single
                // datagrams are fragmented: send those one by one. Otherwise it is lost.
                let (k, count, _) = self.runs[done];
                if count > 1 {
                    for (peer, head, payload) in &out[k..k + count] {
                        if let Some(sent) = send_one(sock, self.port, *peer, head, payload) {
                            messages += 1;
                            packets += 1;
                            bytes += sent;
                        }
                    }
                }
                done += 1;
                continue;
            }
            messages += r as u64;
            for m in done..done + r as usize {
                packets += self.runs[m].1 as u64;
                bytes += u64::from(self.msgs[m].msg_len);
            }
            done += r as usize;
        }
        Ok((messages, packets, bytes))
    }
}

/// One datagram, `head` then `payload`, to `peer`; the bytes sent, or None if refused.
fn send_one(
    sock: &UdpSocket,
    port: u16,
    peer: Ipv4Addr,
    head: &[u8],
    payload: &[u8],
) -> Option<u64> {
    use std::os::fd::AsRawFd;
    let mut addr = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: port.to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from(peer).to_be(),
        },
        sin_zero: [0; 8],
    };
    let mut iov = [
        libc::iovec {
            iov_base: head.as_ptr() as *mut libc::c_void,
            iov_len: head.len(),
        },
        libc::iovec {
            iov_base: payload.as_ptr() as *mut libc::c_void,
            iov_len: payload.len(),
        },
    ];
    // SAFETY: msghdr is plain data; all-zero is a valid empty header.
    let mut h: libc::msghdr = unsafe { std::mem::zeroed() };
    h.msg_name = (&mut addr as *mut libc::sockaddr_in).cast();
    h.msg_namelen = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
    h.msg_iov = iov.as_mut_ptr();
    h.msg_iovlen = iov.len();
    // SAFETY: the header points at a live address, iovecs and buffers.
    let r = unsafe { libc::sendmsg(sock.as_raw_fd(), &h, 0) };
    u64::try_from(r).ok()
}

/// A control message asking the kernel to cut the send into `seg`-byte datagrams.
fn segment_cmsg(seg: usize) -> [u64; 4] {
    let mut buf = [0u64; 4];
    // SAFETY: the buffer is 32 aligned bytes, room for a cmsghdr and a u16 (CMSG_SPACE(2)).
    unsafe {
        let c = buf.as_mut_ptr() as *mut libc::cmsghdr;
        (*c).cmsg_level = libc::SOL_UDP;
        (*c).cmsg_type = libc::UDP_SEGMENT;
        (*c).cmsg_len = libc::CMSG_LEN(2) as _;
        std::ptr::write_unaligned(libc::CMSG_DATA(c) as *mut u16, seg as u16);
    }
    buf
}

fn from_peers(
    tun: &SyncDevice,
    sock: &UdpSocket,
    mut table: Reader,
    stats: &Stats,
    stop: &AtomicBool,
) {
    use std::os::fd::AsRawFd;
    let fd = tun.as_raw_fd();
    let mut bufs: Vec<Vec<u8>> = (0..RX_BATCH).map(|_| vec![0u8; MAX_PACKET]).collect();
    let mut gro = Coalescer::new(tun.tcp_gso());
    // SAFETY (for all): plain data, zero is valid.
    let mut addrs: Vec<libc::sockaddr_in> = vec![unsafe { std::mem::zeroed() }; RX_BATCH];
    let mut iovs: Vec<libc::iovec> = vec![unsafe { std::mem::zeroed() }; RX_BATCH];
    let mut ctrl: Vec<[u64; 4]> = vec![[0; 4]; RX_BATCH];
    let mut msgs: Vec<libc::mmsghdr> = vec![unsafe { std::mem::zeroed() }; RX_BATCH];
    // A write error that ends the queue (the device is gone), seen by the loop below.
    let gone = std::cell::Cell::new(None);
    // One write to the device: its pieces, the packets and bytes they carry.
    let mut write = |iov: &[IoSlice<'_>], packets: u64, bytes: u64| {
        // SAFETY: IoSlice is an iovec on Unix; the pieces outlive the call.
        let r = unsafe { libc::writev(fd, iov.as_ptr().cast(), iov.len() as libc::c_int) };
        if r >= 0 {
            Stats::add(&stats.rx_packets, packets);
            Stats::add(&stats.rx_bytes, bytes);
            return;
        }
        let e = io::Error::last_os_error();
        if fatal(&e) {
            gone.set(Some(e));
        } else {
            Stats::add(&stats.drop_send_error, packets);
            tracing::debug!(error = %e, "udp backend: writing to the TUN device failed");
        }
    };
    while !stop.load(Relaxed) {
        for k in 0..RX_BATCH {
            iovs[k] = libc::iovec {
                iov_base: bufs[k].as_mut_ptr() as *mut libc::c_void,
                iov_len: MAX_PACKET,
            };
            let h = &mut msgs[k].msg_hdr;
            h.msg_name = (&mut addrs[k] as *mut libc::sockaddr_in).cast();
            h.msg_namelen = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
            h.msg_iov = &mut iovs[k];
            h.msg_iovlen = 1;
            h.msg_control = ctrl[k].as_mut_ptr().cast();
            h.msg_controllen = std::mem::size_of::<[u64; 4]>();
            h.msg_flags = 0;
            msgs[k].msg_len = 0;
        }
        // SAFETY: the headers point at live addresses, iovecs, control buffers and buffers of
        // the sizes given. MSG_WAITFORONE: block (up to the socket's timeout) for the first,
        // take what else is there.
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
        let t = table.table();
        let mut datagrams = 0;
        for k in 0..r as usize {
            let from = Ipv4Addr::from(u32::from_be(addrs[k].sin_addr.s_addr));
            let got = msgs[k].msg_len as usize;
            // With UDP GRO one message is a run of datagrams of `seg` bytes (the last may be
            // shorter), all from one sender.
            let seg = gro_segment(&msgs[k].msg_hdr).unwrap_or(got).max(1);
            let count = got.div_ceil(seg).max(1);
            datagrams += count;
            if addrs[k].sin_family != libc::AF_INET as libc::sa_family_t || !t.is_peer(from) {
                Stats::add(&stats.drop_unknown_source, count as u64);
                continue;
            }
            for start in (0..got).step_by(seg) {
                let d = &bufs[k][start..got.min(start + seg)];
                let Some((dst, _, len)) = ipv4(d) else {
                    Stats::inc(&stats.drop_malformed);
                    continue;
                };
                if !t.is_own(dst) {
                    Stats::inc(&stats.drop_not_ours);
                    continue;
                }
                gro.push(&bufs, (k, start, len), &mut write);
            }
        }
        // Before the buffers are received into again.
        gro.flush(&bufs, &mut write);
        Stats::batch(&stats.rx_batches, &stats.rx_batched, datagrams);
        Stats::add(&stats.rx_messages, r as u64);
        if let Some(e) = gone.take() {
            if !stop.load(Relaxed) {
                tracing::warn!(error = %e, "udp backend: writing to the TUN device failed; this queue stops");
            }
            return;
        }
    }
}

/// The datagram size of a message received with UDP GRO, if the kernel coalesced it.
fn gro_segment(h: &libc::msghdr) -> Option<usize> {
    // SAFETY: walks the control buffer the kernel filled, within `msg_controllen`.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(h);
        while !c.is_null() {
            if (*c).cmsg_level == libc::SOL_UDP && (*c).cmsg_type == libc::UDP_GRO {
                let v = std::ptr::read_unaligned(libc::CMSG_DATA(c) as *const libc::c_int);
                return usize::try_from(v).ok().filter(|&v| v > 0);
            }
            c = libc::CMSG_NXTHDR(h, c);
        }
    }
    None
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
    fn gso_runs_group_same_peer_same_size_and_end_at_a_short_one() {
        let (a, b) = (Ipv4Addr::new(198, 18, 0, 12), Ipv4Addr::new(198, 18, 0, 13));
        let out = [
            (a, 1400),
            (a, 1400),
            (a, 1400),
            (a, 900), // shorter: ends the run
            (a, 1400),
            (b, 1400), // another peer
            (b, 1400),
            (b, 1500), // larger than the run's size: a run of its own
        ];
        let mut runs = Vec::new();
        gso_runs(&out, true, &mut runs);
        assert_eq!(
            runs,
            vec![(0, 4, 1400), (4, 1, 1400), (5, 2, 1400), (7, 1, 1500)]
        );
        // Without GSO every packet is its own send.
        gso_runs(&out, false, &mut runs);
        assert_eq!(runs.len(), out.len());
        assert!(runs.iter().all(|r| r.1 == 1));
        // The kernel's limits: at most 64 datagrams and 65507 bytes in one send.
        let out = vec![(a, 1000); 200];
        gso_runs(&out, true, &mut runs);
        assert!(runs
            .iter()
            .all(|r| r.1 <= GSO_SEGMENTS && r.1 * 1000 <= GSO_BYTES));
        assert_eq!(runs.iter().map(|r| r.1).sum::<usize>(), 200);
        gso_runs(&[(a, 1472); 100], true, &mut runs);
        assert_eq!(runs[0].1, GSO_BYTES / 1472);
    }

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
