//! Set and map elements of an existing nftables table, added and deleted over netlink in one
//! transaction, without running the nft binary. This is the fast path for a pod coming or
//! going (CNI ADD must not pay an nft process, ~5-10 ms); everything else (chains, rules, new
//! sets) goes through `nft -f`, which knows nft's grammar.
//!
//! A key is its bytes, each field of a concatenation padded to 4 bytes, as the kernel lays out
//! its registers. Interval sets of addresses take a range as two elements, its first address
//! and the one after its last flagged as the interval's end (`interval`), as nft sends them.

use std::net::IpAddr;

use super::nfnl::{messages, recv, socket, Msg, NLMSG_ERROR, NLM_F_ACK, NLM_F_REQUEST};
use super::NetlinkError;

const NFNL_SUBSYS_NFTABLES: u16 = 10;
const NFNL_MSG_BATCH_BEGIN: u16 = 16;
const NFNL_MSG_BATCH_END: u16 = 17;
const NFT_MSG_NEWSETELEM: u16 = 12;
const NFT_MSG_DELSETELEM: u16 = 14;

const NLM_F_CREATE: u16 = 0x400;

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
        let n = recv(&sock, &mut rbuf, "read nftables acks")?;
        for m in messages(&rbuf[..n]) {
            if m.kind != NLMSG_ERROR {
                continue;
            }
            if m.errno != 0 {
                return Err(NetlinkError::Errno {
                    context: format!("nftables elements of table {table}"),
                    errno: -m.errno,
                });
            }
            pending = pending.saturating_sub(1);
        }
    }
    Ok(())
}

/// The batch: BEGIN, one message per set (adds and deletes separately), END. Returns the
/// bytes and how many acks to expect.
fn encode(family: NfFamily, table: &str, ops: &[ElemOp]) -> (Vec<u8>, usize) {
    let mut buf = Vec::new();
    let mut seq = 1u32;
    let batch_hdr = |buf: &mut Vec<u8>, kind: u16, seq: u32| {
        let mut m = Msg::new(kind, NLM_F_REQUEST, seq, 0);
        // Batch messages name the subsystem in res_id.
        m.res_id(NFNL_SUBSYS_NFTABLES);
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
        m.res_id(0);
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
        let kinds: Vec<u16> = messages(&buf).into_iter().map(|m| m.kind).collect();
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
