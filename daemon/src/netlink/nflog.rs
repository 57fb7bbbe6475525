//! Packets the kernel hands to an NFLOG group (nftables `log group N`): network policy sends
//! the first packets of denied connections there (rate limited in the rule), and twilld turns
//! them into log lines that name the pods. Read on a thread of its own.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use rtnetlink::sys::{Socket, SocketAddr};
use tokio::sync::mpsc;

use super::NetlinkError;

const NETLINK_NETFILTER: isize = 12;
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

fn attr(buf: &mut Vec<u8>, kind: u16, data: &[u8]) {
    buf.extend_from_slice(&((4 + data.len()) as u16).to_ne_bytes());
    buf.extend_from_slice(&kind.to_ne_bytes());
    buf.extend_from_slice(data);
    while !buf.len().is_multiple_of(4) {
        buf.push(0);
    }
}

fn config_msg(group: u16, attrs: &[u8], seq: u32) -> Vec<u8> {
    let mut m = Vec::new();
    m.extend_from_slice(&0u32.to_ne_bytes());
    m.extend_from_slice(&((NFNL_SUBSYS_ULOG << 8) | NFULNL_MSG_CONFIG).to_ne_bytes());
    m.extend_from_slice(&(0x1u16 | 0x4).to_ne_bytes()); // REQUEST | ACK
    m.extend_from_slice(&seq.to_ne_bytes());
    m.extend_from_slice(&0u32.to_ne_bytes());
    m.push(0); // AF_UNSPEC
    m.push(0); // NFNETLINK_V0
    m.extend_from_slice(&group.to_be_bytes());
    m.extend_from_slice(attrs);
    let len = m.len() as u32;
    m[0..4].copy_from_slice(&len.to_ne_bytes());
    m
}

/// Receives what the kernel logs to `group`. The channel closes when the socket fails.
pub fn subscribe(group: u16) -> Result<mpsc::Receiver<LoggedPacket>, NetlinkError> {
    let mut sock =
        Socket::new(NETLINK_NETFILTER).map_err(|e| NetlinkError::failed("open NFLOG socket", e))?;
    sock.bind_auto()
        .map_err(|e| NetlinkError::failed("bind NFLOG socket", e))?;
    sock.connect(&SocketAddr::new(0, 0))
        .map_err(|e| NetlinkError::failed("connect NFLOG socket", e))?;
    let mut bind = Vec::new();
    attr(&mut bind, NFULA_CFG_CMD, &[NFULNL_CFG_CMD_BIND]);
    let mut mode = Vec::new();
    let mut m = COPY_RANGE.to_be_bytes().to_vec();
    m.extend_from_slice(&[NFULNL_COPY_PACKET, 0]);
    attr(&mut mode, NFULA_CFG_MODE, &m);
    let mut buf = vec![0u8; 1 << 16];
    for (seq, attrs) in [(1u32, bind), (2, mode)] {
        sock.send(&config_msg(group, &attrs, seq), 0)
            .map_err(|e| NetlinkError::failed("configure NFLOG group", e))?;
        // EINTR: interrupted by a signal; the answer is still coming.
        let n = loop {
            match sock.recv(&mut &mut buf[..], 0) {
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                r => break r.map_err(|e| NetlinkError::failed("configure NFLOG group", e))?,
            }
        };
        // An NLMSG_ERROR with a non-zero code: the group is taken (another listener).
        if n >= 20 && u16::from_ne_bytes([buf[4], buf[5]]) == 2 {
            let code = i32::from_ne_bytes([buf[16], buf[17], buf[18], buf[19]]);
            if code != 0 {
                return Err(NetlinkError::Errno {
                    context: format!("bind NFLOG group {group}"),
                    errno: -code,
                });
            }
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
pub fn packets(mut data: &[u8]) -> Vec<LoggedPacket> {
    let mut out = Vec::new();
    while data.len() >= 20 {
        let len = u32::from_ne_bytes([data[0], data[1], data[2], data[3]]) as usize;
        let kind = u16::from_ne_bytes([data[4], data[5]]);
        if len < 20 || len > data.len() {
            break;
        }
        if kind == (NFNL_SUBSYS_ULOG << 8) | NFULNL_MSG_PACKET {
            if let Some(p) = packet(&data[20..len]) {
                out.push(p);
            }
        }
        data = data.get((len + 3) & !3..).unwrap_or(&[]);
    }
    out
}

fn packet(mut attrs: &[u8]) -> Option<LoggedPacket> {
    let (mut prefix, mut payload) = (String::new(), None);
    while attrs.len() >= 4 {
        let len = u16::from_ne_bytes([attrs[0], attrs[1]]) as usize;
        let kind = u16::from_ne_bytes([attrs[2], attrs[3]]) & 0x3fff;
        if len < 4 || len > attrs.len() {
            break;
        }
        let body = &attrs[4..len];
        match kind {
            NFULA_PREFIX => {
                prefix = String::from_utf8_lossy(body.split(|b| *b == 0).next().unwrap_or(&[]))
                    .trim()
                    .to_string()
            }
            NFULA_PAYLOAD => payload = Some(body),
            _ => {}
        }
        attrs = attrs.get((len + 3) & !3..).unwrap_or(&[]);
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
        let mut attrs = Vec::new();
        attr(&mut attrs, 1, &[0, 0x08, 0, 0]); // NFULA_PACKET_HDR
        let mut p = prefix.as_bytes().to_vec();
        p.push(0);
        attr(&mut attrs, NFULA_PREFIX, &p);
        attr(&mut attrs, NFULA_PAYLOAD, payload);
        let mut m = Vec::new();
        m.extend_from_slice(&((20 + attrs.len()) as u32).to_ne_bytes());
        m.extend_from_slice(&(NFNL_SUBSYS_ULOG << 8).to_ne_bytes());
        m.extend_from_slice(&[0u8; 10]);
        m.extend_from_slice(&[2, 0, 0, 7]);
        m.extend_from_slice(&attrs);
        m
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
