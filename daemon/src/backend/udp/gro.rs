//! Coalescing on the way into the TUN device. Consecutive TCP segments of one flow, as a UDP
//! GRO receive hands them over, become one super-packet: the first segment's headers, edited,
//! behind a virtio-net header that marks it TCP GSO, then every segment's payload. It is
//! written with `writev` straight from the receive buffers, so no payload byte is copied in
//! userspace; the kernel carries it on as one buffer (to a pod's TCP as one receive) and cuts
//! it again only where it must. The rules follow the kernel's own TCP GRO: same addresses,
//! ports, ToS, TTL, DF, ACK number, window and options; each segment's sequence number right after
//! the last; all the first one's size but a shorter last; plain ACK segments (PSH ends a run);
//! each segment's checksum valid, so a corrupted one is never passed off as good.

use std::io::IoSlice;

/// The virtio-net header the TUN device takes in front of each packet (IFF_VNET_HDR).
pub const VNET_HDR: usize = 10;
/// Most segments in one super-packet, and its most bytes (an IPv4 packet's limit).
const MAX_SEGMENTS: usize = 64;
const MAX_LEN: usize = 65535;
const PROTO_TCP: u8 = 6;
const ACK: u8 = 0x10;
const PSH: u8 = 0x08;
const NEEDS_CSUM: u8 = 1;
const GSO_TCPV4: u8 = 1;

/// The one's-complement sum of `b` as 16-bit words, unfolded, added to `acc`. Native-endian
/// words: the sum of 32-bit words is the same modulo 0xffff, and `fold` turns the result
/// into network order. `b` must start at an even offset of what is summed.
pub fn csum_add(b: &[u8], mut acc: u64) -> u64 {
    let mut chunks = b.chunks_exact(8);
    for c in &mut chunks {
        let x = u64::from_ne_bytes(c.try_into().expect("8 bytes"));
        acc += (x & 0xffff_ffff) + (x >> 32);
    }
    let rest = chunks.remainder();
    if !rest.is_empty() {
        let mut t = [0u8; 8];
        t[..rest.len()].copy_from_slice(rest);
        let x = u64::from_ne_bytes(t);
        acc += (x & 0xffff_ffff) + (x >> 32);
    }
    acc
}

/// `acc` folded to 16 bits, as the bytes to store in a packet.
pub fn fold(mut acc: u64) -> [u8; 2] {
    while acc >> 16 != 0 {
        acc = (acc & 0xffff) + (acc >> 16);
    }
    (acc as u16).to_ne_bytes()
}

/// The sum of the IPv4 pseudo-header of a TCP or UDP packet from the IP header `ip`.
pub fn pseudo_sum(ip: &[u8], proto: u8, l4_len: usize) -> u64 {
    let mut p = [0u8; 12];
    p[..8].copy_from_slice(&ip[12..20]);
    p[9] = proto;
    p[10..].copy_from_slice(&(l4_len as u16).to_be_bytes());
    csum_add(&p, 0)
}

/// The IPv4 header checksum of `h` (its checksum field taken as zero).
pub fn ip_checksum(h: &[u8]) -> [u8; 2] {
    let sum = csum_add(h, 0) + u64::from(u16::from_ne_bytes([h[10], h[11]]) ^ 0xffff);
    let [a, b] = fold(sum);
    [!a, !b]
}

/// A TCP segment that may join a run: header lengths, sequence number, payload length, PSH.
#[derive(Clone, Copy, Debug, PartialEq)]
struct Seg {
    thl: usize,
    seq: u32,
    payload: usize,
    psh: bool,
}

const IHL: usize = 20;

/// `p` as a coalescing candidate: a whole IPv4 packet without options or fragmentation,
/// carrying a TCP segment with data and only ACK (or ACK and PSH) set.
fn candidate(p: &[u8]) -> Option<Seg> {
    if p.len() < IHL + 20 || p[0] != 0x45 || p[9] != PROTO_TCP {
        return None;
    }
    if usize::from(u16::from_be_bytes([p[2], p[3]])) != p.len() {
        return None;
    }
    // Its header is rewritten when it heads a run: a corrupted one must not come out valid.
    if fold(csum_add(&p[..IHL], 0)) != [0xff, 0xff] {
        return None;
    }
    // MF set or a fragment offset: a fragment.
    if p[6] & 0x3f != 0 || p[7] != 0 {
        return None;
    }
    let thl = usize::from(p[IHL + 12] >> 4) * 4;
    if !(20..=60).contains(&thl) || p.len() <= IHL + thl {
        return None;
    }
    let flags = p[IHL + 13];
    if flags != ACK && flags != ACK | PSH {
        return None;
    }
    Some(Seg {
        thl,
        seq: u32::from_be_bytes(p[IHL + 4..IHL + 8].try_into().expect("4 bytes")),
        payload: p.len() - IHL - thl,
        psh: flags & PSH != 0,
    })
}

/// Whether the TCP checksum of the whole IPv4 packet `p` (no options) is right.
fn tcp_checksum_ok(p: &[u8]) -> bool {
    let sum = csum_add(&p[IHL..], pseudo_sum(p, PROTO_TCP, p.len() - IHL));
    fold(sum) == [0xff, 0xff]
}

/// Where a packet lies: (receive buffer, start, length).
type Piece = (usize, usize, usize);

/// The run being built.
#[derive(Debug)]
struct Run {
    first: Piece,
    seg: Seg,
    /// The sequence number the next segment must carry.
    next_seq: u32,
    /// The super-packet's IP length so far.
    total: usize,
    psh: bool,
}

/// Builds runs across the packets of one receive batch and writes them out. `flush` must be
/// called before the receive buffers are reused.
pub struct Coalescer {
    /// Whether the device takes virtio-net headers (TUN offload); without, every packet is
    /// written as it came.
    offload: bool,
    run: Option<Run>,
    /// The payloads of the run's segments after the first.
    rest: Vec<Piece>,
    head: [u8; VNET_HDR + IHL + 60],
}

impl Coalescer {
    pub fn new(offload: bool) -> Coalescer {
        Coalescer {
            offload,
            run: None,
            rest: Vec::with_capacity(MAX_SEGMENTS),
            head: [0; VNET_HDR + IHL + 60],
        }
    }

    /// Takes the packet at `at` in `bufs`; writes through `write` what can no longer grow.
    /// `write` gets the pieces of one write, and the packets and bytes they carry.
    pub fn push<W>(&mut self, bufs: &[Vec<u8>], at: Piece, write: &mut W)
    where
        W: FnMut(&[IoSlice<'_>], u64, u64),
    {
        let p = &bufs[at.0][at.1..at.1 + at.2];
        let seg = if self.offload { candidate(p) } else { None };
        let Some(seg) = seg else {
            self.flush(bufs, write);
            return self.plain(p, write);
        };
        if let Some(run) = &mut self.run {
            let f = &bufs[run.first.0][run.first.1..run.first.1 + run.first.2];
            let thl = run.seg.thl;
            // The whole of byte 12: the header length and the reserved and AE (Accurate ECN)
            // bits, which the merged header would otherwise lose (the kernel compares them too).
            let joins = p[IHL + 12] == f[IHL + 12]
                && seg.seq == run.next_seq
                && seg.payload <= run.seg.payload
                && 1 + self.rest.len() < MAX_SEGMENTS
                && run.total + seg.payload <= MAX_LEN
                && p[1] == f[1]
                && p[6] >> 5 == f[6] >> 5
                && p[8] == f[8]
                && p[12..20] == f[12..20]
                // Ports, ACK number, window (the kernel's GRO flushes on a window change: the
                // merged header would carry a stale one), options.
                && p[IHL..IHL + 4] == f[IHL..IHL + 4]
                && p[IHL + 8..IHL + 12] == f[IHL + 8..IHL + 12]
                && p[IHL + 14..IHL + 16] == f[IHL + 14..IHL + 16]
                && p[IHL + 20..IHL + thl] == f[IHL + 20..IHL + thl]
                && tcp_checksum_ok(p);
            if joins {
                self.rest.push((at.0, at.1 + IHL + thl, seg.payload));
                run.next_seq = run.next_seq.wrapping_add(seg.payload as u32);
                run.total += seg.payload;
                run.psh = seg.psh;
                // Nothing may follow a PSH or a shorter segment.
                if seg.psh || seg.payload < run.seg.payload {
                    self.flush(bufs, write);
                }
                return;
            }
            self.flush(bufs, write);
        }
        if seg.psh || !tcp_checksum_ok(p) {
            // Alone either way (a bad checksum is the kernel's to drop).
            return self.plain(p, write);
        }
        self.run = Some(Run {
            first: at,
            seg,
            next_seq: seg.seq.wrapping_add(seg.payload as u32),
            total: p.len(),
            psh: false,
        });
    }

    /// Writes the run being built, if any.
    pub fn flush<W>(&mut self, bufs: &[Vec<u8>], write: &mut W)
    where
        W: FnMut(&[IoSlice<'_>], u64, u64),
    {
        let Some(run) = self.run.take() else {
            return;
        };
        let f = &bufs[run.first.0][run.first.1..run.first.1 + run.first.2];
        if self.rest.is_empty() {
            return self.plain(f, write);
        }
        let hl = IHL + run.seg.thl;
        let h = &mut self.head;
        h[..VNET_HDR].fill(0);
        h[0] = NEEDS_CSUM;
        h[1] = GSO_TCPV4;
        h[2..4].copy_from_slice(&(hl as u16).to_ne_bytes());
        h[4..6].copy_from_slice(&(run.seg.payload as u16).to_ne_bytes());
        h[6..8].copy_from_slice(&(IHL as u16).to_ne_bytes());
        h[8..10].copy_from_slice(&16u16.to_ne_bytes());
        let ip = &mut h[VNET_HDR..VNET_HDR + hl];
        ip.copy_from_slice(&f[..hl]);
        ip[2..4].copy_from_slice(&(run.total as u16).to_be_bytes());
        ip[10..12].fill(0);
        let c = ip_checksum(&ip[..IHL]);
        ip[10..12].copy_from_slice(&c);
        if run.psh {
            ip[IHL + 13] |= PSH;
        }
        // NEEDS_CSUM: the checksum field holds the pseudo-header's sum, the kernel (or
        // whoever segments) adds the rest.
        let ps = fold(pseudo_sum(ip, PROTO_TCP, run.total - IHL));
        ip[IHL + 16..IHL + 18].copy_from_slice(&ps);
        let mut iov = Vec::with_capacity(2 + self.rest.len());
        iov.push(IoSlice::new(&self.head[..VNET_HDR + hl]));
        iov.push(IoSlice::new(&f[hl..]));
        for &(k, s, n) in &self.rest {
            iov.push(IoSlice::new(&bufs[k][s..s + n]));
        }
        let packets = 1 + self.rest.len();
        write(
            &iov,
            packets as u64,
            (run.total + (packets - 1) * hl) as u64,
        );
        self.rest.clear();
    }

    /// Writes `p` as it is.
    fn plain<W>(&self, p: &[u8], write: &mut W)
    where
        W: FnMut(&[IoSlice<'_>], u64, u64),
    {
        const NONE: [u8; VNET_HDR] = [0; VNET_HDR];
        let n = p.len() as u64;
        if self.offload {
            write(&[IoSlice::new(&NONE), IoSlice::new(p)], 1, n);
        } else {
            write(&[IoSlice::new(p)], 1, n);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A TCP segment from 10.244.1.2:4000 to 10.244.2.3:5201 with `payload`, checksums right.
    fn segment(seq: u32, flags: u8, payload: &[u8]) -> Vec<u8> {
        let mut p = vec![0u8; 40];
        p[0] = 0x45;
        p[6] = 0x40; // DF
        p[8] = 64;
        p[9] = PROTO_TCP;
        p[12..16].copy_from_slice(&[10, 244, 1, 2]);
        p[16..20].copy_from_slice(&[10, 244, 2, 3]);
        p[20..22].copy_from_slice(&4000u16.to_be_bytes());
        p[22..24].copy_from_slice(&5201u16.to_be_bytes());
        p[24..28].copy_from_slice(&seq.to_be_bytes());
        p[28..32].copy_from_slice(&77u32.to_be_bytes());
        p[32] = 5 << 4;
        p[33] = flags;
        p[34..36].copy_from_slice(&512u16.to_be_bytes());
        p.extend_from_slice(payload);
        let len = p.len();
        p[2..4].copy_from_slice(&(len as u16).to_be_bytes());
        let c = ip_checksum(&p[..20]);
        p[10..12].copy_from_slice(&c);
        let [a, b] = fold(csum_add(&p[20..], pseudo_sum(&p, PROTO_TCP, len - 20)));
        p[36..38].copy_from_slice(&[!a, !b]);
        p
    }

    /// Recomputes the TCP checksum of a test segment after an edit.
    fn reseal(p: &mut [u8]) {
        p[36..38].fill(0);
        let len = p.len();
        let [a, b] = fold(csum_add(&p[20..], pseudo_sum(p, PROTO_TCP, len - 20)));
        p[36..38].copy_from_slice(&[!a, !b]);
    }

    /// The slow, obviously right checksum: 16-bit big-endian words.
    fn reference(b: &[u8]) -> u16 {
        let mut s: u64 = b
            .chunks(2)
            .map(|c| u64::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
            .sum();
        while s >> 16 != 0 {
            s = (s & 0xffff) + (s >> 16);
        }
        s as u16
    }

    #[test]
    fn checksum_matches_the_word_by_word_sum() {
        let data: Vec<u8> = (0..1500u32).map(|i| (i * 7919 % 251) as u8).collect();
        for len in [0, 1, 2, 3, 7, 8, 9, 15, 16, 17, 1499, 1500] {
            let got = u16::from_be_bytes(fold(csum_add(&data[..len], 0)));
            assert_eq!(got, reference(&data[..len]), "length {len}");
        }
        assert!(tcp_checksum_ok(&segment(1, ACK, b"hello")));
        let mut bad = segment(1, ACK, b"hello");
        bad[41] ^= 1;
        assert!(!tcp_checksum_ok(&bad));
    }

    /// Pushes `pkts` (each in its own buffer) and flushes; returns what was written, each
    /// write's pieces joined.
    fn run(offload: bool, pkts: &[Vec<u8>]) -> (Vec<Vec<u8>>, u64) {
        let mut c = Coalescer::new(offload);
        let mut out = Vec::new();
        let mut packets = 0;
        let mut write = |iov: &[IoSlice<'_>], n: u64, bytes: u64| {
            let w: Vec<u8> = iov.iter().flat_map(|s| s.to_vec()).collect();
            let hdr = if offload { VNET_HDR as u64 } else { 0 };
            let headers = if offload && w[1] == GSO_TCPV4 {
                (n - 1) * 40
            } else {
                0
            };
            assert_eq!(w.len() as u64 - hdr + headers, bytes, "bytes counted");
            out.push(w);
            packets += n;
        };
        for (k, p) in pkts.iter().enumerate() {
            c.push(pkts, (k, 0, p.len()), &mut write);
        }
        c.flush(pkts, &mut write);
        (out, packets)
    }

    #[test]
    fn consecutive_segments_become_one_super_packet_with_a_gso_header() {
        let (a, b, c) = ([1u8; 100], [2u8; 100], [3u8; 60]);
        let pkts = vec![
            segment(1000, ACK, &a),
            segment(1100, ACK, &b),
            segment(1200, ACK | PSH, &c),
        ];
        let (out, packets) = run(true, &pkts);
        assert_eq!(packets, 3);
        assert_eq!(out.len(), 1, "one write");
        let w = &out[0];
        assert_eq!(w[0], NEEDS_CSUM);
        assert_eq!(w[1], GSO_TCPV4);
        assert_eq!(u16::from_ne_bytes([w[2], w[3]]), 40, "header length");
        assert_eq!(u16::from_ne_bytes([w[4], w[5]]), 100, "segment size");
        assert_eq!(u16::from_ne_bytes([w[6], w[7]]), 20, "checksum start");
        assert_eq!(u16::from_ne_bytes([w[8], w[9]]), 16, "checksum offset");
        let ip = &w[VNET_HDR..];
        assert_eq!(usize::from(u16::from_be_bytes([ip[2], ip[3]])), ip.len());
        assert_eq!(ip.len(), 40 + 260);
        assert_eq!(reference(&ip[..20]), 0xffff, "IP header checksum");
        assert_eq!(ip[33], ACK | PSH, "the last segment's PSH");
        assert_eq!(&ip[24..28], &1000u32.to_be_bytes());
        assert_eq!(&ip[40..140], &a[..]);
        assert_eq!(&ip[140..240], &b[..]);
        assert_eq!(&ip[240..], &c[..]);
        // Completing the checksum the kernel's way gives a valid segment.
        let mut whole = ip.to_vec();
        let partial = u16::from_ne_bytes([whole[36], whole[37]]);
        whole[36..38].fill(0);
        let [x, y] = fold(csum_add(&whole[20..], u64::from(partial)));
        whole[36..38].copy_from_slice(&[!x, !y]);
        assert!(tcp_checksum_ok(&whole));
    }

    #[test]
    fn what_cannot_join_is_written_as_it_came() {
        let d = [9u8; 100];
        let mut other_flow = segment(1100, ACK, &d);
        other_flow[20..22].copy_from_slice(&4001u16.to_be_bytes());
        let mut bad_sum = segment(1100, ACK, &d);
        bad_sum[45] ^= 0xff;
        let cases: Vec<(&str, Vec<u8>)> = vec![
            ("a gap in the sequence", segment(1300, ACK, &d)),
            ("another flow", other_flow),
            ("a bad checksum", bad_sum),
            ("a longer segment", segment(1100, ACK, &[9u8; 120])),
            ("SYN", segment(1100, 0x02, &d)),
            ("no payload", segment(1100, ACK, &[])),
            ("a bad IP header checksum", {
                let mut h = segment(1100, ACK, &d);
                h[10] ^= 0x10;
                h
            }),
            ("the AE bit set", {
                let mut e = segment(1100, ACK, &d);
                e[32] |= 0x01;
                reseal(&mut e);
                e
            }),
            ("another window", {
                let mut w = segment(1100, ACK, &d);
                w[34..36].copy_from_slice(&1024u16.to_be_bytes());
                reseal(&mut w);
                w
            }),
        ];
        for (what, second) in cases {
            let pkts = vec![segment(1000, ACK, &d), second.clone()];
            let (out, packets) = run(true, &pkts);
            assert_eq!(packets, 2, "{what}");
            assert_eq!(out.len(), 2, "{what}: two writes");
            assert_eq!(&out[0][..VNET_HDR], &[0u8; VNET_HDR], "{what}");
            assert_eq!(&out[0][VNET_HDR..], &pkts[0][..], "{what}: unchanged");
            assert_eq!(&out[1][VNET_HDR..], &second[..], "{what}: unchanged");
        }
        // After PSH or a shorter segment nothing joins.
        for first in [segment(1000, ACK | PSH, &d), segment(1000, ACK, &d[..50])] {
            let next =
                u32::from_be_bytes(first[24..28].try_into().unwrap()) + (first.len() - 40) as u32;
            let (out, _) = run(true, &[first, segment(next, ACK, &d)]);
            assert_eq!(out.len(), 2);
        }
        // Without device offload nothing is coalesced and no header goes in front.
        let pkts = vec![segment(1000, ACK, &d), segment(1100, ACK, &d)];
        let (out, _) = run(false, &pkts);
        assert_eq!(out, pkts);
    }

    #[test]
    fn runs_stop_at_the_kernels_limits() {
        let d = [5u8; 1400];
        let pkts: Vec<Vec<u8>> = (0..100u32).map(|i| segment(i * 1400, ACK, &d)).collect();
        let (out, packets) = run(true, &pkts);
        assert_eq!(packets, 100);
        for w in &out {
            let ip = &w[VNET_HDR..];
            assert!(ip.len() <= MAX_LEN);
            assert!((ip.len() - 40) / 1400 <= MAX_SEGMENTS);
        }
        let carried: usize = out.iter().map(|w| w.len() - VNET_HDR - 40).sum();
        assert_eq!(carried, 100 * 1400, "every payload byte once");
    }
}
