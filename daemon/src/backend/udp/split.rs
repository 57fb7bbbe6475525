//! Splitting on the way out of the TUN device. With offloads a read is a virtio-net header and
//! a packet of up to 64 KiB that the kernel left to segment (TCP, or UDP from a pod using
//! UDP GSO) or whose checksum it left to finish. The datagrams are made here as (headers,
//! payload) pairs: each segment's headers are written into a small buffer of their own, its
//! payload stays where the read put it, and the send gathers both, so no payload byte is
//! copied in userspace. The headers are the kernel's (`tcp_gso_segment`): IP length, ID
//! counting up and checksum per segment, TCP sequence numbers counting up, FIN and PSH only on
//! the last segment and CWR only on the first, and full checksums.

use super::gro::{csum_add, fold, ip_checksum, pseudo_sum, VNET_HDR};

const NEEDS_CSUM: u8 = 1;
const GSO_NONE: u8 = 0;
const GSO_TCPV4: u8 = 1;
const GSO_UDP_L4: u8 = 5;
const GSO_ECN: u8 = 0x80;
/// IP (up to 60) and TCP (up to 60) headers.
const MAX_HEADERS: usize = 120;

/// Why a read could not be made into datagrams.
#[derive(Debug, PartialEq, Eq)]
pub struct Malformed(pub &'static str);

/// The per-segment headers of the last split, kept to be reused.
#[derive(Default)]
pub struct Splitter {
    heads: Vec<[u8; MAX_HEADERS]>,
}

/// One datagram: its headers' piece (may be empty) and its payload's.
pub type Datagram<'a> = (&'a [u8], &'a [u8]);

impl Splitter {
    /// Splits the read `b` (a virtio-net header first when `offload`) into the datagrams it
    /// carries, in order, into `out`.
    pub fn split<'a>(
        &'a mut self,
        b: &'a mut [u8],
        offload: bool,
        out: &mut Vec<Datagram<'a>>,
    ) -> Result<(), Malformed> {
        if !offload {
            out.push((&[], b));
            return Ok(());
        }
        if b.len() < VNET_HDR + 20 {
            return Err(Malformed("shorter than a header"));
        }
        let (h, p) = b.split_at_mut(VNET_HDR);
        let (flags, gso_type) = (h[0], h[1] & !GSO_ECN);
        let gso_size = usize::from(u16::from_ne_bytes([h[4], h[5]]));
        let csum_start = usize::from(u16::from_ne_bytes([h[6], h[7]]));
        let csum_offset = usize::from(u16::from_ne_bytes([h[8], h[9]]));
        if gso_type == GSO_NONE {
            if flags & NEEDS_CSUM != 0 {
                // The field holds the pseudo-header's sum; the rest is ours to add.
                let at = csum_start + csum_offset;
                if at + 2 > p.len() || csum_start >= p.len() {
                    return Err(Malformed("checksum outside the packet"));
                }
                let [x, y] = fold(csum_add(&p[csum_start..], 0));
                // As the kernel's skb_checksum_help: a zero result goes out as all ones (for
                // UDP zero means "no checksum"; for TCP the two are the same).
                let c = if [!x, !y] == [0, 0] {
                    [0xff, 0xff]
                } else {
                    [!x, !y]
                };
                p[at..at + 2].copy_from_slice(&c);
            }
            out.push((&[], p));
            return Ok(());
        }
        let tcp = match gso_type {
            GSO_TCPV4 => true,
            GSO_UDP_L4 => false,
            _ => {
                return Err(Malformed(
                    "a segmentation type other than TCP or UDP over IPv4",
                ))
            }
        };
        if p[0] >> 4 != 4 {
            return Err(Malformed("segmentation of a packet that is not IPv4"));
        }
        let ihl = usize::from(p[0] & 0x0f) * 4;
        let l4 = if tcp {
            p.get(ihl + 12).map_or(0, |b| usize::from(b >> 4) * 4)
        } else {
            8
        };
        let hl = ihl + l4;
        let proto = if tcp { 6 } else { 17 };
        if ihl < 20 || p.len() <= hl || p[9] != proto {
            return Err(Malformed("headers that do not match the segmentation type"));
        }
        if (tcp && l4 < 20) || hl > MAX_HEADERS || gso_size == 0 {
            return Err(Malformed("headers or segment size out of range"));
        }
        let p: &'a [u8] = p;
        let payload = &p[hl..];
        let n = payload.len().div_ceil(gso_size);
        if self.heads.len() < n {
            self.heads.resize(n, [0; MAX_HEADERS]);
        }
        let id = u16::from_be_bytes([p[4], p[5]]);
        let seq = u32::from_be_bytes([p[ihl + 4], p[ihl + 5], p[ihl + 6], p[ihl + 7]]);
        for (i, chunk) in payload.chunks(gso_size).enumerate() {
            let hd = &mut self.heads[i][..hl];
            hd.copy_from_slice(&p[..hl]);
            hd[2..4].copy_from_slice(&((hl + chunk.len()) as u16).to_be_bytes());
            hd[4..6].copy_from_slice(&id.wrapping_add(i as u16).to_be_bytes());
            hd[10..12].fill(0);
            let c = ip_checksum(&hd[..ihl]);
            hd[10..12].copy_from_slice(&c);
            let (sum_at, proto) = if tcp {
                let s = seq.wrapping_add((i * gso_size) as u32);
                hd[ihl + 4..ihl + 8].copy_from_slice(&s.to_be_bytes());
                if i + 1 < n {
                    hd[ihl + 13] &= !0x09; // FIN, PSH: the last segment's
                }
                if i > 0 {
                    hd[ihl + 13] &= !0x80; // CWR: the first's
                }
                (ihl + 16, 6)
            } else {
                hd[ihl + 4..ihl + 6].copy_from_slice(&((8 + chunk.len()) as u16).to_be_bytes());
                (ihl + 6, 17)
            };
            hd[sum_at..sum_at + 2].fill(0);
            let sum = csum_add(
                chunk,
                csum_add(&hd[ihl..], pseudo_sum(hd, proto, l4 + chunk.len())),
            );
            let [x, y] = fold(sum);
            // UDP sends an all-zero checksum as all ones (zero means none).
            let c = if !tcp && [!x, !y] == [0, 0] {
                [0xff, 0xff]
            } else {
                [!x, !y]
            };
            hd[sum_at..sum_at + 2].copy_from_slice(&c);
        }
        let heads: &'a [[u8; MAX_HEADERS]] = &self.heads;
        for (i, chunk) in payload.chunks(gso_size).enumerate() {
            out.push((&heads[i][..hl], chunk));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn valid(l4_proto: u8, pkt: &[u8]) -> bool {
        let sum = csum_add(&pkt[20..], pseudo_sum(pkt, l4_proto, pkt.len() - 20));
        fold(sum) == [0xff, 0xff] && fold(csum_add(&pkt[..20], 0)) == [0xff, 0xff]
    }

    /// A TCP super-packet as the TUN device hands it over: headers of the whole, pseudo-header
    /// sum in the checksum field, `payload`, segments of `mss`.
    fn super_packet(flags: u8, payload: &[u8], mss: u16) -> Vec<u8> {
        let mut b = vec![0u8; VNET_HDR];
        b[0] = NEEDS_CSUM;
        b[1] = GSO_TCPV4;
        b[2..4].copy_from_slice(&40u16.to_ne_bytes());
        b[4..6].copy_from_slice(&mss.to_ne_bytes());
        b[6..8].copy_from_slice(&20u16.to_ne_bytes());
        b[8..10].copy_from_slice(&16u16.to_ne_bytes());
        let mut p = vec![0u8; 40];
        p[0] = 0x45;
        p[2..4].copy_from_slice(&((40 + payload.len()) as u16).to_be_bytes());
        p[4..6].copy_from_slice(&0xfffeu16.to_be_bytes());
        p[6] = 0x40;
        p[8] = 64;
        p[9] = 6;
        p[12..16].copy_from_slice(&[10, 244, 1, 2]);
        p[16..20].copy_from_slice(&[10, 244, 2, 3]);
        p[24..28].copy_from_slice(&0xffff_ff00u32.to_be_bytes());
        p[32] = 5 << 4;
        p[33] = flags;
        let c = ip_checksum(&p[..20]);
        p[10..12].copy_from_slice(&c);
        let ps = fold(pseudo_sum(&p, 6, 20 + payload.len()));
        p[36..38].copy_from_slice(&ps);
        p.extend_from_slice(payload);
        b.extend_from_slice(&p);
        b
    }

    #[test]
    fn a_tcp_super_packet_becomes_the_segments_the_kernel_would_make() {
        let payload: Vec<u8> = (0..3000u32).map(|i| (i % 253) as u8).collect();
        let mut b = super_packet(0x80 | 0x18 | 0x01, &payload, 1400); // CWR, ACK, PSH, FIN
        let mut s = Splitter::default();
        let mut out = Vec::new();
        s.split(&mut b, true, &mut out).unwrap();
        assert_eq!(out.len(), 3);
        let mut seen = Vec::new();
        for (i, (h, d)) in out.iter().enumerate() {
            let pkt = [*h, *d].concat();
            assert!(valid(6, &pkt), "segment {i}: checksums");
            assert_eq!(usize::from(u16::from_be_bytes([pkt[2], pkt[3]])), pkt.len());
            assert_eq!(
                u16::from_be_bytes([pkt[4], pkt[5]]),
                0xfffeu16.wrapping_add(i as u16),
                "IP IDs count up (and wrap)"
            );
            let seq = u32::from_be_bytes(pkt[24..28].try_into().unwrap());
            assert_eq!(seq, 0xffff_ff00u32.wrapping_add(i as u32 * 1400));
            let flags = pkt[33];
            assert_eq!(flags & 0x80 != 0, i == 0, "CWR on the first only");
            assert_eq!(flags & 0x09 != 0, i == 2, "PSH and FIN on the last only");
            assert_eq!(flags & 0x10, 0x10);
            seen.extend_from_slice(d);
        }
        assert_eq!(out[2].1.len(), 200);
        assert_eq!(seen, payload, "every payload byte once, in order");
    }

    #[test]
    fn a_packet_whose_checksum_the_kernel_left_is_finished() {
        let mut b = super_packet(0x18, b"hello, world", 1400);
        b[1] = GSO_NONE;
        let mut s = Splitter::default();
        let mut out = Vec::new();
        s.split(&mut b, true, &mut out).unwrap();
        assert_eq!(out.len(), 1);
        assert!(out[0].0.is_empty());
        assert!(valid(6, out[0].1));
        // Without offloads the read is the packet, as it is.
        let mut plain = b"anything".to_vec();
        let mut out = Vec::new();
        s.split(&mut plain, false, &mut out).unwrap();
        assert_eq!(out, vec![(&b""[..], &b"anything"[..])]);
    }

    #[test]
    fn udp_segmentation_gives_whole_datagrams() {
        let payload = vec![7u8; 2500];
        let mut b = super_packet(0, &payload, 1000);
        b[1] = GSO_UDP_L4;
        let p = &mut b[VNET_HDR..];
        p[9] = 17;
        // A UDP header in place of TCP's first 8 bytes; the UDP "payload" runs from byte 28.
        p[24..26].copy_from_slice(&0u16.to_be_bytes());
        let mut s = Splitter::default();
        let mut out = Vec::new();
        s.split(&mut b, true, &mut out).unwrap();
        let total: usize = out.iter().map(|(_, d)| d.len()).sum();
        assert_eq!(total, 2500 + 40 - 28, "the bytes after the UDP header");
        for (h, d) in &out {
            let pkt = [*h, *d].concat();
            assert!(valid(17, &pkt));
            assert_eq!(
                usize::from(u16::from_be_bytes([pkt[24], pkt[25]])),
                pkt.len() - 20
            );
        }
    }

    #[test]
    fn garbage_is_refused_not_split() {
        let refused = |b: &mut [u8]| {
            let mut s = Splitter::default();
            let mut out = Vec::new();
            s.split(b, true, &mut out).is_err() && out.is_empty()
        };
        assert!(refused(&mut [0u8; 12]), "shorter than the headers");
        assert!(
            refused(&mut super_packet(0x10, &[1u8; 100], 0)),
            "segment size 0"
        );
        let mut b = super_packet(0x10, &[1u8; 100], 40);
        b[1] = 4; // TCPv6
        assert!(refused(&mut b));
        let mut b = super_packet(0x10, &[1u8; 100], 40);
        b[1] = GSO_NONE;
        b[6..8].copy_from_slice(&500u16.to_ne_bytes());
        assert!(refused(&mut b), "checksum start past the end");
        for offset in [2u8, 3, 4] {
            let mut b = super_packet(0x10, &[1u8; 100], 40);
            b[VNET_HDR + 32] = offset << 4;
            assert!(refused(&mut b), "a TCP header of {} bytes", offset * 4);
        }
        let mut b = super_packet(0x10, &[1u8; 100], 40);
        b[VNET_HDR + 9] = 17;
        assert!(refused(&mut b), "TCP segmentation of a UDP packet");
    }
}
