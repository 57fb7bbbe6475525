//! nftables change notifications (NFNLGRP_NFTABLES): every committed transaction ends with a
//! NEWGEN message that names the process that made it. The daemon uses them to notice, within
//! moments, that someone flushed the ruleset or deleted one of its tables.

use std::io;

use rtnetlink::sys::{Socket, SocketAddr};
use tokio::sync::mpsc;

use super::nfnl::{attrs, messages, NETLINK_NETFILTER};
use super::NetlinkError;

const NFNLGRP_NFTABLES: u32 = 7;
const NFNL_SUBSYS_NFTABLES: u16 = 10;
const NFT_MSG_NEWGEN: u16 = 15;
const NFTA_GEN_PROC_PID: u16 = 2;
/// Set when the receive buffer overflowed: changes were missed, so report one anyway.
pub const UNKNOWN_PID: u32 = 0;

/// The pid of the process behind each committed nftables transaction in this network namespace
/// (`UNKNOWN_PID` when notifications were lost). Read on a thread of its own; the channel
/// closes if the socket fails.
pub fn subscribe() -> Result<mpsc::Receiver<u32>, NetlinkError> {
    let mut sock = Socket::new(NETLINK_NETFILTER)
        .map_err(|e| NetlinkError::failed("open nftables notification socket", e))?;
    sock.bind(&SocketAddr::new(0, 0))
        .map_err(|e| NetlinkError::failed("bind nftables notification socket", e))?;
    sock.add_membership(NFNLGRP_NFTABLES)
        .map_err(|e| NetlinkError::failed("subscribe to nftables notifications", e))?;
    let (tx, rx) = mpsc::channel(64);
    std::thread::Builder::new()
        .name("nft-events".into())
        .spawn(move || {
            let mut buf = vec![0u8; 1 << 16];
            loop {
                let n = match sock.recv(&mut &mut buf[..], 0) {
                    Ok(n) => n,
                    Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) => {
                        if tx.blocking_send(UNKNOWN_PID).is_err() {
                            return;
                        }
                        continue;
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => {
                        tracing::warn!(error = %e, "nftables notifications stopped");
                        return;
                    }
                };
                for pid in newgen_pids(&buf[..n]) {
                    // Full channel: the daemon already has a check pending; drop the extra.
                    if let Err(mpsc::error::TrySendError::Closed(_)) = tx.try_send(pid) {
                        return;
                    }
                }
            }
        })
        .map_err(|e| NetlinkError::failed("start nftables notification thread", e))?;
    Ok(rx)
}

/// The process pid of each NEWGEN message in a datagram (UNKNOWN_PID where it has none).
pub fn newgen_pids(data: &[u8]) -> Vec<u32> {
    messages(data)
        .into_iter()
        .filter(|m| m.kind == (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_NEWGEN)
        .map(|m| gen_pid(m.attrs).unwrap_or(UNKNOWN_PID))
        .collect()
}

/// NFTA_GEN_PROC_PID (big endian) among a NEWGEN message's attributes.
fn gen_pid(data: &[u8]) -> Option<u32> {
    let (_, v) = attrs(data)
        .into_iter()
        .find(|(kind, _)| *kind == NFTA_GEN_PROC_PID)?;
    Some(u32::from_be_bytes(v.get(..4)?.try_into().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// nlmsghdr (16) + nfgenmsg (4).
    const HEADERS: usize = 20;

    fn attr(kind: u16, data: &[u8]) -> Vec<u8> {
        let mut a = ((4 + data.len()) as u16).to_ne_bytes().to_vec();
        a.extend(kind.to_ne_bytes());
        a.extend(data);
        while !a.len().is_multiple_of(4) {
            a.push(0);
        }
        a
    }

    fn msg(kind: u16, attrs: &[Vec<u8>]) -> Vec<u8> {
        let body: Vec<u8> = attrs.concat();
        let len = (HEADERS + body.len()) as u32;
        let mut m = len.to_ne_bytes().to_vec();
        m.extend(kind.to_ne_bytes());
        m.extend([0u8; 10]); // flags, seq, pid
        m.extend([2, 0, 0, 0]); // nfgenmsg
        m.extend(body);
        m
    }

    #[test]
    fn finds_the_committing_pid_of_each_generation() {
        let newgen = (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_NEWGEN;
        let newtable = NFNL_SUBSYS_NFTABLES << 8;
        let mut dgram = msg(newtable, &[attr(1, b"twill\0")]);
        dgram.extend(msg(
            newgen,
            &[
                attr(1, &7u32.to_be_bytes()),
                attr(NFTA_GEN_PROC_PID, &4242u32.to_be_bytes()),
                attr(3, b"nft\0"),
            ],
        ));
        dgram.extend(msg(newgen, &[attr(1, &8u32.to_be_bytes())]));
        assert_eq!(newgen_pids(&dgram), vec![4242, UNKNOWN_PID]);
    }

    #[test]
    fn truncated_input_is_not_a_panic() {
        let newgen = (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_NEWGEN;
        let m = msg(newgen, &[attr(NFTA_GEN_PROC_PID, &1u32.to_be_bytes())]);
        for cut in 0..m.len() {
            let _ = newgen_pids(&m[..cut]);
        }
        let mut bad = m.clone();
        bad[0] = 255; // length beyond the datagram
        assert!(newgen_pids(&bad).is_empty());
    }
}
