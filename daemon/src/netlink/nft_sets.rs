//! Set and map elements of an existing nftables table, added and deleted over netlink in one
//! transaction, without running the nft binary. This is the fast path for a pod coming or
//! going (CNI ADD must not pay an nft process, ~5-10 ms); everything else (chains, rules, new
//! sets) goes through `nft -f`, which knows nft's grammar.
//!
//! A key is its bytes, each field of a concatenation padded to 4 bytes, as the kernel lays out
//! its registers. Interval sets of addresses take a range as two elements, its first address
//! and the one after its last flagged as the interval's end (`interval`), as nft sends them.

use std::net::IpAddr;
use std::os::fd::AsRawFd;

use rtnetlink::sys::{Socket, SocketAddr};

use super::NetlinkError;

pub(super) const NETLINK_NETFILTER: isize = 12;
const NFNL_SUBSYS_NFTABLES: u16 = 10;
const NFNL_MSG_BATCH_BEGIN: u16 = 16;
const NFNL_MSG_BATCH_END: u16 = 17;
const NFT_MSG_NEWSETELEM: u16 = 12;
const NFT_MSG_DELSETELEM: u16 = 14;

const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
const NLM_F_CREATE: u16 = 0x400;
const NLMSG_ERROR: u16 = 2;
const NLA_F_NESTED: u16 = 0x8000;

const NFTA_SET_ELEM_LIST_TABLE: u16 = 1;
const NFTA_SET_ELEM_LIST_SET: u16 = 2;
const NFTA_SET_ELEM_LIST_ELEMENTS: u16 = 3;
const NFTA_LIST_ELEM: u16 = 1;
const NFTA_SET_ELEM_KEY: u16 = 1;
const NFTA_SET_ELEM_DATA: u16 = 2;
const NFTA_SET_ELEM_FLAGS: u16 = 3;
const NFT_SET_ELEM_INTERVAL_END: u32 = 1;
const NFTA_DATA_VALUE: u16 = 1;
const NFTA_DATA_VERDICT: u16 = 2;
const NFTA_VERDICT_CODE: u16 = 1;
const NFTA_VERDICT_CHAIN: u16 = 2;
const NFT_JUMP: i32 = -3;

/// nftables address families (NFPROTO_*).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NfFamily {
    Inet = 1,
    Ip = 2,
    Bridge = 7,
    Ip6 = 10,
}

/// One element to add to or delete from a set (or a map: with `jump`, its verdict).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ElemOp {
    pub add: bool,
    pub set: String,
    pub key: Vec<u8>,
    /// Maps of `... : verdict`: jump to this chain.
    pub jump: Option<String>,
    /// The end of an interval (interval sets only; see `interval`).
    pub interval_end: bool,
}

impl ElemOp {
    pub fn new(add: bool, set: &str, key: Vec<u8>) -> ElemOp {
        ElemOp {
            add,
            set: set.to_string(),
            key,
            jump: None,
            interval_end: false,
        }
    }

    /// A verdict map entry: `key : jump chain`.
    pub fn jump(add: bool, set: &str, key: Vec<u8>, chain: &str) -> ElemOp {
        ElemOp {
            jump: Some(chain.to_string()),
            ..ElemOp::new(add, set, key)
        }
    }
}

/// The two elements of the address range `first..=last` in an interval set. None when `last`
/// is the family's highest address (its end has no successor; nft's own encoding is needed).
pub fn interval(add: bool, set: &str, first: IpAddr, last: IpAddr) -> Option<[ElemOp; 2]> {
    let next = match last {
        IpAddr::V4(a) => IpAddr::V4(u32::from(a).checked_add(1)?.into()),
        IpAddr::V6(a) => IpAddr::V6(u128::from(a).checked_add(1)?.into()),
    };
    Some([
        ElemOp::new(add, set, key_addr(first)),
        ElemOp {
            interval_end: true,
            ..ElemOp::new(add, set, key_addr(next))
        },
    ])
}

/// The key bytes of an address (network order, 4 or 16 bytes).
pub fn key_addr(ip: IpAddr) -> Vec<u8> {
    match ip {
        IpAddr::V4(a) => a.octets().to_vec(),
        IpAddr::V6(a) => a.octets().to_vec(),
    }
}

/// The key of a concatenation: each field padded to a multiple of 4 bytes.
pub fn key_concat(fields: &[&[u8]]) -> Vec<u8> {
    let mut out = Vec::new();
    for f in fields {
        out.extend_from_slice(f);
        while !out.len().is_multiple_of(4) {
            out.push(0);
        }
    }
    out
}

/// Applies `ops` to sets of table `family table` as one transaction: all or nothing.
pub fn apply(family: NfFamily, table: &str, ops: &[ElemOp]) -> Result<(), NetlinkError> {
    if ops.is_empty() {
        return Ok(());
    }
    let sock = socket("nftables")?;
    let (buf, acked) = encode(family, table, ops);
    sock.send(&buf, 0)
        .map_err(|e| NetlinkError::failed("send nftables batch", e))?;
    // One ack per element message; the kernel answers an error instead for a refused one and
    // aborts the whole transaction.
    let mut pending = acked;
    let mut rbuf = vec![0u8; 1 << 16];
    while pending > 0 {
        let n = match sock.recv(&mut &mut rbuf[..], 0) {
            Ok(n) => n,
            // With a receive timeout set, any handled signal (SIGTERM, SIGHUP) fails the
            // receive with EINTR (signal(7)); the acks are still coming.
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(NetlinkError::failed("read nftables acks", e)),
        };
        for (kind, errno) in messages(&rbuf[..n]) {
            if kind != NLMSG_ERROR {
                continue;
            }
            if errno != 0 {
                return Err(NetlinkError::Errno {
                    context: format!("nftables elements of table {table}"),
                    errno: -errno,
                });
            }
            pending = pending.saturating_sub(1);
        }
    }
    Ok(())
}

/// A netfilter netlink socket (nftables, ctnetlink: `what` names it in errors), its receives
/// timing out after 5 s.
pub(super) fn socket(what: &str) -> Result<Socket, NetlinkError> {
    let mut sock = Socket::new(NETLINK_NETFILTER)
        .map_err(|e| NetlinkError::failed(format!("open {what} socket"), e))?;
    sock.bind_auto()
        .map_err(|e| NetlinkError::failed(format!("bind {what} socket"), e))?;
    sock.connect(&SocketAddr::new(0, 0))
        .map_err(|e| NetlinkError::failed(format!("connect {what} socket"), e))?;
    set_rcv_timeout(&sock);
    Ok(sock)
}

fn set_rcv_timeout(sock: &Socket) {
    let tv = libc::timeval {
        tv_sec: 5,
        tv_usec: 0,
    };
    // SAFETY: a valid socket fd and a timeval of the size passed.
    unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&tv as *const libc::timeval).cast(),
            std::mem::size_of::<libc::timeval>() as libc::socklen_t,
        );
    }
}

/// (message type, error code of an NLMSG_ERROR) for each message in a datagram.
pub(super) fn messages(mut data: &[u8]) -> Vec<(u16, i32)> {
    let mut out = Vec::new();
    while data.len() >= 16 {
        let len = u32::from_ne_bytes([data[0], data[1], data[2], data[3]]) as usize;
        let kind = u16::from_ne_bytes([data[4], data[5]]);
        if len < 16 || len > data.len() {
            break;
        }
        let errno = if kind == NLMSG_ERROR && len >= 20 {
            i32::from_ne_bytes([data[16], data[17], data[18], data[19]])
        } else {
            0
        };
        out.push((kind, errno));
        data = data.get((len + 3) & !3..).unwrap_or(&[]);
    }
    out
}

/// The batch: BEGIN, one message per set (adds and deletes separately), END. Returns the
/// bytes and how many acks to expect.
fn encode(family: NfFamily, table: &str, ops: &[ElemOp]) -> (Vec<u8>, usize) {
    let mut buf = Vec::new();
    let mut seq = 1u32;
    let batch_hdr = |buf: &mut Vec<u8>, kind: u16, seq: u32| {
        let mut m = Msg::new(kind, NLM_F_REQUEST, seq, 0);
        m.bytes
            .extend_from_slice(&NFNL_SUBSYS_NFTABLES.to_be_bytes());
        m.finish(buf);
    };
    batch_hdr(&mut buf, NFNL_MSG_BATCH_BEGIN, seq);
    let mut acked = 0;
    // Group by (set, add/delete), keeping first-seen order: deletes of one set before adds of
    // the same key elsewhere do not matter, every message names its set.
    let mut groups: Vec<(&str, bool, Vec<&ElemOp>)> = Vec::new();
    for op in ops {
        match groups
            .iter_mut()
            .find(|(s, a, _)| *s == op.set && *a == op.add)
        {
            Some(g) => g.2.push(op),
            None => groups.push((&op.set, op.add, vec![op])),
        }
    }
    for (set, add, elems) in groups {
        seq += 1;
        let (kind, flags) = if add {
            (NFT_MSG_NEWSETELEM, NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE)
        } else {
            (NFT_MSG_DELSETELEM, NLM_F_REQUEST | NLM_F_ACK)
        };
        let mut m = Msg::new((NFNL_SUBSYS_NFTABLES << 8) | kind, flags, seq, family as u8);
        m.bytes.extend_from_slice(&0u16.to_be_bytes());
        m.attr(NFTA_SET_ELEM_LIST_TABLE, &cstr(table));
        m.attr(NFTA_SET_ELEM_LIST_SET, &cstr(set));
        let list = m.begin(NFTA_SET_ELEM_LIST_ELEMENTS);
        for e in elems {
            let item = m.begin(NFTA_LIST_ELEM);
            let key = m.begin(NFTA_SET_ELEM_KEY);
            m.attr(NFTA_DATA_VALUE, &e.key);
            m.end(key);
            if e.interval_end {
                m.attr(
                    NFTA_SET_ELEM_FLAGS,
                    &NFT_SET_ELEM_INTERVAL_END.to_be_bytes(),
                );
            }
            if let Some(chain) = &e.jump {
                let data = m.begin(NFTA_SET_ELEM_DATA);
                let verdict = m.begin(NFTA_DATA_VERDICT);
                m.attr(NFTA_VERDICT_CODE, &NFT_JUMP.to_be_bytes());
                m.attr(NFTA_VERDICT_CHAIN, &cstr(chain));
                m.end(verdict);
                m.end(data);
            }
            m.end(item);
        }
        m.end(list);
        m.finish(&mut buf);
        acked += 1;
    }
    seq += 1;
    batch_hdr(&mut buf, NFNL_MSG_BATCH_END, seq);
    (buf, acked)
}

fn cstr(s: &str) -> Vec<u8> {
    let mut v = s.as_bytes().to_vec();
    v.push(0);
    v
}

/// One netfilter netlink message under construction: header, nfgenmsg, attributes (also
/// ctnetlink's, `conntrack`).
pub(super) struct Msg {
    pub(super) bytes: Vec<u8>,
}

impl Msg {
    pub(super) fn new(kind: u16, flags: u16, seq: u32, family: u8) -> Msg {
        let mut bytes = Vec::with_capacity(256);
        bytes.extend_from_slice(&0u32.to_ne_bytes()); // length, set by finish
        bytes.extend_from_slice(&kind.to_ne_bytes());
        bytes.extend_from_slice(&flags.to_ne_bytes());
        bytes.extend_from_slice(&seq.to_ne_bytes());
        bytes.extend_from_slice(&0u32.to_ne_bytes()); // port id: the kernel fills it in
        bytes.push(family); // nfgenmsg.nfgen_family
        bytes.push(0); // version NFNETLINK_V0
        Msg { bytes }
    }

    pub(super) fn attr(&mut self, kind: u16, data: &[u8]) {
        let len = 4 + data.len();
        self.bytes.extend_from_slice(&(len as u16).to_ne_bytes());
        self.bytes.extend_from_slice(&kind.to_ne_bytes());
        self.bytes.extend_from_slice(data);
        self.pad();
    }

    /// Opens a nested attribute; returns where its header is.
    pub(super) fn begin(&mut self, kind: u16) -> usize {
        let at = self.bytes.len();
        self.bytes.extend_from_slice(&0u16.to_ne_bytes());
        self.bytes
            .extend_from_slice(&(kind | NLA_F_NESTED).to_ne_bytes());
        at
    }

    pub(super) fn end(&mut self, at: usize) {
        let len = (self.bytes.len() - at) as u16;
        self.bytes[at..at + 2].copy_from_slice(&len.to_ne_bytes());
    }

    fn pad(&mut self) {
        while !self.bytes.len().is_multiple_of(4) {
            self.bytes.push(0);
        }
    }

    pub(super) fn finish(mut self, out: &mut Vec<u8>) {
        self.pad();
        let len = self.bytes.len() as u32;
        self.bytes[0..4].copy_from_slice(&len.to_ne_bytes());
        out.extend_from_slice(&self.bytes);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn concatenated_keys_pad_every_field_to_four_bytes() {
        let ip = key_addr("10.244.1.5".parse().unwrap());
        let key = key_concat(&[&ip, &[6], &80u16.to_be_bytes()]);
        assert_eq!(key, vec![10, 244, 1, 5, 6, 0, 0, 0, 0, 80, 0, 0]);
        assert_eq!(key_addr("fd00::1".parse().unwrap()).len(), 16);
    }

    #[test]
    fn a_batch_is_begin_one_message_per_set_and_verb_end() {
        let op = |add, set: &str, last: u8| ElemOp::new(add, set, vec![10, 0, 0, last]);
        let ops = [
            op(true, "a", 1),
            op(true, "a", 2),
            op(false, "a", 3),
            op(true, "b", 4),
        ];
        let (buf, acked) = encode(NfFamily::Inet, "t", &ops);
        assert_eq!(acked, 3);
        let kinds: Vec<u16> = messages(&buf).into_iter().map(|(k, _)| k).collect();
        let el = |m: u16| (NFNL_SUBSYS_NFTABLES << 8) | m;
        assert_eq!(
            kinds,
            vec![
                NFNL_MSG_BATCH_BEGIN,
                el(NFT_MSG_NEWSETELEM),
                el(NFT_MSG_DELSETELEM),
                el(NFT_MSG_NEWSETELEM),
                NFNL_MSG_BATCH_END
            ]
        );
    }
}
