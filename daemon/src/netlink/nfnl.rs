//! The netfilter netlink wire format (nfnetlink) shared by the modules that speak it without
//! a library: nftables set elements and notifications, ctnetlink, NFLOG. Messages are a
//! netlink header and an nfgenmsg, then attributes; a datagram holds several.

use std::os::fd::AsRawFd;

use rtnetlink::sys::{Socket, SocketAddr};

use super::NetlinkError;

pub(super) const NETLINK_NETFILTER: isize = 12;
pub(super) const NLM_F_REQUEST: u16 = 0x1;
pub(super) const NLM_F_ACK: u16 = 0x4;
pub(super) const NLMSG_ERROR: u16 = 2;
pub(super) const NLMSG_DONE: u16 = 3;
const NLA_F_NESTED: u16 = 0x8000;
const NLA_TYPE_MASK: u16 = 0x3fff;
/// nlmsghdr (16) and nfgenmsg (4).
const HEADERS: usize = 20;

/// A netfilter netlink socket for requests (nftables, ctnetlink: `what` names it in
/// errors), connected to the kernel, its receives timing out after 5 s.
pub(super) fn socket(what: &str) -> Result<Socket, NetlinkError> {
    let sock = listener(what)?;
    set_rcv_timeout(&sock, 5);
    Ok(sock)
}

/// A netfilter netlink socket connected to the kernel whose receives wait as long as it
/// takes: for a thread that reads what the kernel sends (NFLOG).
pub(super) fn listener(what: &str) -> Result<Socket, NetlinkError> {
    let mut sock = Socket::new(NETLINK_NETFILTER)
        .map_err(|e| NetlinkError::failed(format!("open {what} socket"), e))?;
    sock.bind_auto()
        .map_err(|e| NetlinkError::failed(format!("bind {what} socket"), e))?;
    sock.connect(&SocketAddr::new(0, 0))
        .map_err(|e| NetlinkError::failed(format!("connect {what} socket"), e))?;
    Ok(sock)
}

/// Receives on `sock` fail with EAGAIN after `secs`: never block forever on a lost answer.
pub(super) fn set_rcv_timeout(sock: &Socket, secs: libc::time_t) {
    let tv = libc::timeval {
        tv_sec: secs,
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

/// One datagram into `buf`; `what` names the read in errors.
pub(super) fn recv(sock: &Socket, buf: &mut [u8], what: &str) -> Result<usize, NetlinkError> {
    loop {
        match sock.recv(&mut &mut buf[..], 0) {
            Ok(n) => return Ok(n),
            // With a receive timeout set, any handled signal (SIGTERM, SIGHUP) fails the
            // receive with EINTR (signal(7)); the answer is still coming.
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(NetlinkError::failed(what.to_string(), e)),
        }
    }
}

/// One message of a received datagram.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct Message<'a> {
    /// Message type: NLMSG_ERROR, NLMSG_DONE, or (subsystem << 8) | message.
    pub kind: u16,
    /// An NLMSG_ERROR's code (0: an ack; negative: an errno); 0 for other messages.
    pub errno: i32,
    /// What follows the nfgenmsg: the attributes (empty for a message too short to have any).
    pub attrs: &'a [u8],
}

/// The messages in a datagram; a truncated or malformed one ends the list.
pub(super) fn messages(mut data: &[u8]) -> Vec<Message<'_>> {
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
        let attrs = data.get(HEADERS..len).unwrap_or(&[]);
        out.push(Message { kind, errno, attrs });
        data = data.get((len + 3) & !3..).unwrap_or(&[]);
    }
    out
}

/// The attributes in `data`: (type without flags, payload); a malformed one ends the list.
pub(super) fn attrs(mut data: &[u8]) -> Vec<(u16, &[u8])> {
    let mut out = Vec::new();
    while data.len() >= 4 {
        let len = u16::from_ne_bytes([data[0], data[1]]) as usize;
        let kind = u16::from_ne_bytes([data[2], data[3]]) & NLA_TYPE_MASK;
        if len < 4 || len > data.len() {
            break;
        }
        out.push((kind, &data[4..len]));
        data = data.get((len + 3) & !3..).unwrap_or(&[]);
    }
    out
}

/// One netfilter netlink message under construction: header, nfgenmsg, attributes.
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

    /// The nfgenmsg's last field, res_id (big endian): a resource id (NFLOG's group) or 0.
    pub(super) fn res_id(&mut self, id: u16) {
        self.bytes.extend_from_slice(&id.to_be_bytes());
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
    fn messages_and_attributes_read_back_what_msg_wrote() {
        let mut dgram = Vec::new();
        let mut m = Msg::new(0x0a0c, NLM_F_REQUEST, 1, 2);
        m.res_id(7);
        m.attr(1, b"twill\0");
        let nest = m.begin(3);
        m.attr(1, &[1, 2, 3]);
        m.end(nest);
        m.finish(&mut dgram);
        let mut ack = Msg::new(NLMSG_ERROR, 0, 1, 0);
        ack.bytes.truncate(16);
        ack.bytes.extend_from_slice(&(-libc::ENOENT).to_ne_bytes());
        ack.finish(&mut dgram);

        let got = messages(&dgram);
        assert_eq!(got.len(), 2);
        assert_eq!((got[0].kind, got[0].errno), (0x0a0c, 0));
        let a = attrs(got[0].attrs);
        assert_eq!(a.len(), 2);
        assert_eq!(a[0], (1, &b"twill\0"[..]));
        assert_eq!(a[1].0, 3, "the nested flag is masked off");
        assert_eq!(attrs(a[1].1), vec![(1, &[1u8, 2, 3][..])]);
        assert_eq!((got[1].kind, got[1].errno), (NLMSG_ERROR, -libc::ENOENT));
    }

    #[test]
    fn truncated_or_lying_lengths_end_the_list_without_a_panic() {
        let mut dgram = Vec::new();
        let mut m = Msg::new(0x0a0f, 0, 1, 2);
        m.attr(2, &9u32.to_be_bytes());
        m.finish(&mut dgram);
        for cut in 0..dgram.len() {
            let got = messages(&dgram[..cut]);
            assert!(got.is_empty(), "cut at {cut}: {got:?}");
        }
        let mut bad = dgram.clone();
        bad[0] = 255;
        assert!(messages(&bad).is_empty());
        assert!(attrs(&[200, 0, 1, 0, 0]).is_empty());
        assert!(
            attrs(&[2, 0, 1, 0]).is_empty(),
            "an attribute shorter than its header"
        );
    }
}
