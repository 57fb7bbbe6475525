//! Conntrack entries of addresses that left (a deleted pod's), removed over ctnetlink: a flow
//! conntrack still holds as established would go on to the next pod that gets the address,
//! past that pod's policies (`ct state established` is accepted before any policy), and a
//! masqueraded one would keep its old translation. The kernel has no delete by address: the
//! table is dumped per family and each matching entry deleted by its original tuple, as
//! `conntrack -D -s/-d` does.

use std::net::IpAddr;

use super::nfnl::{
    attrs, messages, recv, socket, Msg, NLMSG_DONE, NLMSG_ERROR, NLM_F_ACK, NLM_F_REQUEST,
};
use super::NetlinkError;

const NFNL_SUBSYS_CTNETLINK: u16 = 1;
const IPCTNL_MSG_CT_NEW: u16 = 0;
const IPCTNL_MSG_CT_GET: u16 = 1;
const IPCTNL_MSG_CT_DELETE: u16 = 2;
const NLM_F_DUMP: u16 = 0x300;
/// The kernel acks each delete in a buffer of its own (under 1 KiB with its overhead, the
/// request carried back in a refusal): a datagram's acks stay well inside the socket's receive
/// buffer (208 KiB by default), where an overflow would lose acks.
const DELETES_PER_DATAGRAM: usize = 64;

const CTA_TUPLE_ORIG: u16 = 1;
const CTA_TUPLE_REPLY: u16 = 2;
const CTA_ZONE: u16 = 18;
const CTA_TUPLE_IP: u16 = 1;
const CTA_IP_V4_SRC: u16 = 1;
const CTA_IP_V4_DST: u16 = 2;
const CTA_IP_V6_SRC: u16 = 3;
const CTA_IP_V6_DST: u16 = 4;

/// The addresses of a tuple (CTA_TUPLE_ORIG or _REPLY's payload).
fn tuple_addrs(tuple: &[u8]) -> Vec<IpAddr> {
    let mut out = Vec::new();
    for (kind, ip) in attrs(tuple) {
        if kind != CTA_TUPLE_IP {
            continue;
        }
        for (k, v) in attrs(ip) {
            match k {
                CTA_IP_V4_SRC | CTA_IP_V4_DST => {
                    if let Ok(b) = <[u8; 4]>::try_from(v) {
                        out.push(IpAddr::from(b));
                    }
                }
                CTA_IP_V6_SRC | CTA_IP_V6_DST => {
                    if let Ok(b) = <[u8; 16]>::try_from(v) {
                        out.push(IpAddr::from(b));
                    }
                }
                _ => {}
            }
        }
    }
    out
}

/// One conntrack entry to delete: its original tuple and zone, as the dump gave them.
struct Entry {
    orig: Vec<u8>,
    zone: Option<Vec<u8>>,
}

/// The entries of one dumped message (a conntrack entry) that involve any of `addrs`.
fn matching(payload: &[u8], addrs: &[IpAddr]) -> Option<Entry> {
    let mut orig = None;
    let mut zone = None;
    let mut hit = false;
    for (kind, v) in attrs(payload) {
        match kind {
            CTA_TUPLE_ORIG | CTA_TUPLE_REPLY => {
                hit |= tuple_addrs(v).iter().any(|a| addrs.contains(a));
                if kind == CTA_TUPLE_ORIG {
                    orig = Some(v.to_vec());
                }
            }
            CTA_ZONE => zone = Some(v.to_vec()),
            _ => {}
        }
    }
    hit.then_some(())?;
    Some(Entry { orig: orig?, zone })
}

/// Deletes every conntrack entry (either direction) with one of `addrs`; returns how many.
/// An entry the kernel refuses (e.g. EBUSY, offloaded to a flowtable) does not stop the rest:
/// the first error is returned at the end. Blocking: call it off the runtime's workers.
pub fn delete_flows_of(addrs: &[IpAddr]) -> Result<usize, NetlinkError> {
    let mut deleted = 0;
    let mut first_err = None;
    for (family, v6) in [(libc::AF_INET as u8, false), (libc::AF_INET6 as u8, true)] {
        let ours: Vec<IpAddr> = addrs
            .iter()
            .copied()
            .filter(|a| a.is_ipv6() == v6)
            .collect();
        if ours.is_empty() {
            continue;
        }
        let entries = match dump_matching(family, &ours) {
            Ok(e) => e,
            Err(e) => {
                first_err.get_or_insert(e);
                continue;
            }
        };
        if entries.is_empty() {
            continue;
        }
        let sock = socket("conntrack")?;
        let mut buf = vec![0u8; 1 << 16];
        // Many deletes to a datagram, each acked on its own: a pod with thousands of flows
        // costs a few round trips, not thousands.
        for batch in entries.chunks(DELETES_PER_DATAGRAM) {
            let mut out = Vec::new();
            for (seq, e) in batch.iter().enumerate() {
                let mut m = Msg::new(
                    (NFNL_SUBSYS_CTNETLINK << 8) | IPCTNL_MSG_CT_DELETE,
                    NLM_F_REQUEST | NLM_F_ACK,
                    seq as u32 + 1,
                    family,
                );
                m.res_id(0);
                let t = m.begin(CTA_TUPLE_ORIG);
                m.bytes.extend_from_slice(&e.orig);
                m.end(t);
                if let Some(z) = &e.zone {
                    m.attr(CTA_ZONE, z);
                }
                m.finish(&mut out);
            }
            sock.send(&out, 0)
                .map_err(|e| NetlinkError::failed("send conntrack delete", e))?;
            let mut acked = 0;
            while acked < batch.len() {
                let n = recv(&sock, &mut buf, "read conntrack")?;
                for m in messages(&buf[..n]) {
                    if m.kind != NLMSG_ERROR {
                        continue;
                    }
                    acked += 1;
                    match m.errno {
                        0 => deleted += 1,
                        // Gone meanwhile (it timed out, or was the reply of one deleted): fine.
                        e if e == -libc::ENOENT => {}
                        e => {
                            first_err.get_or_insert(NetlinkError::Errno {
                                context: "deleting a conntrack entry".into(),
                                errno: -e,
                            });
                        }
                    }
                }
            }
        }
    }
    match first_err {
        Some(e) => Err(e),
        None => Ok(deleted),
    }
}

/// The entries of `family` that involve any of `addrs`.
fn dump_matching(family: u8, addrs: &[IpAddr]) -> Result<Vec<Entry>, NetlinkError> {
    let sock = socket("conntrack")?;
    let mut out = Vec::new();
    let mut m = Msg::new(
        (NFNL_SUBSYS_CTNETLINK << 8) | IPCTNL_MSG_CT_GET,
        NLM_F_REQUEST | NLM_F_DUMP,
        1,
        family,
    );
    m.res_id(0);
    m.finish(&mut out);
    sock.send(&out, 0)
        .map_err(|e| NetlinkError::failed("send conntrack dump", e))?;
    let mut found = Vec::new();
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = recv(&sock, &mut buf, "read conntrack")?;
        for m in messages(&buf[..n]) {
            match m.kind {
                NLMSG_DONE => return Ok(found),
                NLMSG_ERROR if m.errno != 0 => {
                    return Err(NetlinkError::Errno {
                        context: "dumping conntrack".into(),
                        errno: -m.errno,
                    });
                }
                k if k == (NFNL_SUBSYS_CTNETLINK << 8) | IPCTNL_MSG_CT_NEW => {
                    found.extend(matching(m.attrs, addrs));
                }
                _ => {}
            }
        }
    }
}
