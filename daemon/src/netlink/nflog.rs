//! Packets the kernel hands to an NFLOG group (nftables `log group N`): network policy sends
//! the first packets of denied connections there (rate limited in the rule), and twilld turns
//! them into log lines that name the pods. Read on a thread of its own.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use tokio::sync::mpsc;

use super::nfnl::{attrs, listener, messages, recv, Msg, NLMSG_ERROR, NLM_F_ACK, NLM_F_REQUEST};
use super::NetlinkError;

const NFNL_SUBSYS_ULOG: u16 = 4;
const NFULNL_MSG_PACKET: u16 = 0;
const NFULNL_MSG_CONFIG: u16 = 1;
const NFULA_CFG_CMD: u16 = 1;
const NFULA_CFG_MODE: u16 = 2;
const NFULNL_CFG_CMD_BIND: u8 = 1;
const NFULNL_COPY_PACKET: u8 = 2;
const NFULA_PAYLOAD: u16 = 9;
const NFULA_PREFIX: u16 = 10;
/// Enough of each packet for the IP and transport headers.
const COPY_RANGE: u32 = 128;

/// One logged packet: the rule's prefix and what the headers say.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LoggedPacket {
    pub prefix: String,
    pub src: IpAddr,
    pub dst: IpAddr,
    /// IP protocol number.
    pub proto: u8,
    /// Destination port (TCP, UDP, SCTP), if any.
    pub dport: Option<u16>,
}

fn config_msg(group: u16, seq: u32, kind: u16, data: &[u8]) -> Vec<u8> {
    let mut m = Msg::new(
        (NFNL_SUBSYS_ULOG << 8) | NFULNL_MSG_CONFIG,
        NLM_F_REQUEST | NLM_F_ACK,
        seq,
        0, // AF_UNSPEC
    );
    m.res_id(group);
    m.attr(kind, data);
    let mut out = Vec::new();
    m.finish(&mut out);
    out
}

/// Receives what the kernel logs to `group`. The channel closes when the socket fails.
pub fn subscribe(group: u16) -> Result<mpsc::Receiver<LoggedPacket>, NetlinkError> {
    let sock = listener("NFLOG")?;
    let mut mode = COPY_RANGE.to_be_bytes().to_vec();
    mode.extend_from_slice(&[NFULNL_COPY_PACKET, 0]);
    let config = [
        (NFULA_CFG_CMD, vec![NFULNL_CFG_CMD_BIND]),
        (NFULA_CFG_MODE, mode),
    ];
    let mut buf = vec![0u8; 1 << 16];
    for (seq, (kind, data)) in (1u32..).zip(config) {
        sock.send(&config_msg(group, seq, kind, &data), 0)
            .map_err(|e| NetlinkError::failed("configure NFLOG group", e))?;
        let n = recv(&sock, &mut buf, "configure NFLOG group")?;
        // An error instead of the ack: the group is taken (another listener).
        if let Some(m) = messages(&buf[..n])
            .into_iter()
            .find(|m| m.kind == NLMSG_ERROR && m.errno != 0)
        {
            return Err(NetlinkError::Errno {
                context: format!("bind NFLOG group {group}"),
                errno: -m.errno,
            });
        }
    }
    let (tx, rx) = mpsc::channel(256);
    std::thread::Builder::new()
        .name("nflog".into())
        .spawn(move || loop {
            let n = match sock.recv(&mut &mut buf[..], 0) {
                Ok(n) => n,
                Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) => continue,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    tracing::warn!(error = %e, "the denied-connection log stopped");
                    return;
                }
            };
            for p in packets(&buf[..n]) {
                // Full: a burst of denials; the log is a sample, the counters are exact.
                if let Err(mpsc::error::TrySendError::Closed(_)) = tx.try_send(p) {
                    return;
                }
            }
        })
        .map_err(|e| NetlinkError::failed("start the NFLOG thread", e))?;
    Ok(rx)
}

/// The logged packets in a datagram.
pub fn packets(data: &[u8]) -> Vec<LoggedPacket> {
    messages(data)
        .into_iter()
        .filter(|m| m.kind == (NFNL_SUBSYS_ULOG << 8) | NFULNL_MSG_PACKET)
        .filter_map(|m| packet(m.attrs))
        .collect()
}

fn packet(data: &[u8]) -> Option<LoggedPacket> {
    let (mut prefix, mut payload) = (String::new(), None);
    for (kind, body) in attrs(data) {
        match kind {
            NFULA_PREFIX => {
                prefix = String::from_utf8_lossy(body.split(|b| *b == 0).next().unwrap_or(&[]))
                    .trim()
                    .to_string()
            }
            NFULA_PAYLOAD => payload = Some(body),
            _ => {}
        }
    }
    let ip = payload?;
    let (src, dst, proto, l4) = match ip.first()? >> 4 {
        4 if ip.len() >= 20 => {
            let ihl = usize::from(ip[0] & 0x0f) * 4;
            let s = Ipv4Addr::new(ip[12], ip[13], ip[14], ip[15]);
            let d = Ipv4Addr::new(ip[16], ip[17], ip[18], ip[19]);
            (IpAddr::V4(s), IpAddr::V4(d), ip[9], ip.get(ihl..)?)
        }
        6 if ip.len() >= 40 => {
            let s = Ipv6Addr::from(<[u8; 16]>::try_from(&ip[8..24]).ok()?);
            let d = Ipv6Addr::from(<[u8; 16]>::try_from(&ip[24..40]).ok()?);
            (IpAddr::V6(s), IpAddr::V6(d), ip[6], &ip[40..])
        }
        _ => return None,
    };
    let dport = match proto {
        6 | 17 | 132 if l4.len() >= 4 => Some(u16::from_be_bytes([l4[2], l4[3]])),
        _ => None,
    };
    Some(LoggedPacket {
        prefix,
        src,
        dst,
        proto,
        dport,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nflog_msg(prefix: &str, payload: &[u8]) -> Vec<u8> {
        let mut m = Msg::new((NFNL_SUBSYS_ULOG << 8) | NFULNL_MSG_PACKET, 0, 0, 2);
        m.res_id(7);
        m.attr(1, &[0, 0x08, 0, 0]); // NFULA_PACKET_HDR
        let mut p = prefix.as_bytes().to_vec();
        p.push(0);
        m.attr(NFULA_PREFIX, &p);
        m.attr(NFULA_PAYLOAD, payload);
        let mut out = Vec::new();
        m.finish(&mut out);
        out
    }

    #[test]
    fn reads_prefix_addresses_and_port() {
        let mut ip = vec![0x45, 0, 0, 40, 0, 0, 0, 0, 64, 6, 0, 0];
        ip.extend_from_slice(&[10, 244, 2, 3, 10, 244, 1, 2]);
        ip.extend_from_slice(&[0xc3, 0x50, 0, 80, 0, 0, 0, 0]); // sport 50000, dport 80
        let mut d = nflog_msg("grp-in-abc", &ip);
        d.extend(nflog_msg("grp-out-def", &ip));
        let got = packets(&d);
        assert_eq!(got.len(), 2);
        assert_eq!(got[0].prefix, "grp-in-abc");
        assert_eq!(got[0].src, "10.244.2.3".parse::<IpAddr>().unwrap());
        assert_eq!(got[0].dst, "10.244.1.2".parse::<IpAddr>().unwrap());
        assert_eq!((got[0].proto, got[0].dport), (6, Some(80)));
        // Truncated input: no panic, nothing made up.
        for cut in 0..d.len() {
            let _ = packets(&d[..cut]);
        }
        assert!(packets(&nflog_msg("x", &[0x45, 0])).is_empty());
    }
}
