//! Batched netlink requests on a plain (blocking) socket: write a window of requests in one
//! sendmsg, then read their acks. The window is bounded so the acks fit in the receive buffer
//! (a full buffer makes the kernel drop acks with ENOBUFS, flannel's #958).

use std::collections::HashMap;
use std::io;
use std::os::fd::AsRawFd;

use rtnetlink::packet_core::{
    NetlinkMessage, NetlinkPayload, NLM_F_ACK, NLM_F_CREATE, NLM_F_EXCL, NLM_F_REPLACE,
    NLM_F_REQUEST,
};
use rtnetlink::packet_route::neighbour::{
    NeighbourAttribute, NeighbourFlags, NeighbourMessage, NeighbourState,
};
use rtnetlink::packet_route::route::{RouteProtocol, RouteScope};
use rtnetlink::packet_route::{AddressFamily, RouteNetlinkMessage};
use rtnetlink::sys::{protocols::NETLINK_ROUTE, Socket, SocketAddr};

use super::nfnl::set_rcv_timeout;
use super::{NlFamily, TWILL_RTPROT};
use crate::reconcile::OpOf;

/// Requests in flight per window, at most. Each ack costs well under 1 KiB of receive buffer;
/// with a smaller buffer (no CAP_NET_ADMIN for SO_RCVBUFFORCE) the window shrinks to fit.
const WINDOW: usize = 512;
const RCVBUF: usize = 4 << 20;

pub(super) struct BatchSocket {
    sock: Socket,
    seq: u32,
    window: usize,
    buf: Vec<u8>,
}

impl BatchSocket {
    pub(super) fn open() -> io::Result<Self> {
        let mut sock = Socket::new(NETLINK_ROUTE)?;
        sock.bind_auto()?;
        sock.connect(&SocketAddr::new(0, 0))?;
        // Acks without the request echoed back keep them small.
        sock.set_cap_ack(true)?;
        set_rcvbuf(&sock, RCVBUF);
        set_rcv_timeout(&sock, 10);
        let window = sock
            .get_rx_buf_sz()
            .map(|b| (b / 1024).clamp(16, WINDOW))
            .unwrap_or(64);
        Ok(BatchSocket {
            sock,
            seq: 1,
            window,
            buf: Vec::with_capacity(1 << 16),
        })
    }

    /// Sends every message and returns one result per message (Err = positive errno).
    pub(super) fn run(
        &mut self,
        msgs: Vec<NetlinkMessage<RouteNetlinkMessage>>,
    ) -> Vec<Result<(), i32>> {
        let mut results = Vec::with_capacity(msgs.len());
        let mut msgs = msgs.into_iter().peekable();
        while msgs.peek().is_some() {
            let window: Vec<_> = msgs.by_ref().take(self.window).collect();
            results.extend(self.run_window(window));
        }
        results
    }

    fn run_window(
        &mut self,
        window: Vec<NetlinkMessage<RouteNetlinkMessage>>,
    ) -> Vec<Result<(), i32>> {
        let n = window.len();
        let mut pending: HashMap<u32, usize> = HashMap::with_capacity(n);
        let mut results: Vec<Option<Result<(), i32>>> = vec![None; n];
        let mut out = Vec::new();
        for (i, mut m) in window.into_iter().enumerate() {
            let seq = self.seq;
            self.seq = self.seq.wrapping_add(1).max(1);
            m.header.sequence_number = seq;
            m.finalize();
            let start = out.len();
            out.resize(start + m.buffer_len(), 0);
            m.serialize(&mut out[start..]);
            pending.insert(seq, i);
        }
        if let Err(e) = self.sock.send(&out, 0) {
            let errno = e.raw_os_error().unwrap_or(libc::EIO);
            return vec![Err(errno); n];
        }
        while !pending.is_empty() {
            self.buf.clear();
            match self.sock.recv(&mut self.buf, 0) {
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    // ENOBUFS (lost acks) or timeout: the outcome of the rest is unknown.
                    let errno = e.raw_os_error().unwrap_or(libc::EIO);
                    tracing::warn!(error = %e, unanswered = pending.len(), "netlink batch: acks lost");
                    for (_, i) in pending.drain() {
                        results[i] = Some(Err(errno));
                    }
                    break;
                }
            }
            let mut off = 0;
            while off + 16 <= self.buf.len() {
                let len = u32::from_ne_bytes(self.buf[off..off + 4].try_into().unwrap()) as usize;
                if len < 16 || off + len > self.buf.len() {
                    break;
                }
                let seq = u32::from_ne_bytes(self.buf[off + 8..off + 12].try_into().unwrap());
                if let Ok(msg) =
                    NetlinkMessage::<RouteNetlinkMessage>::deserialize(&self.buf[off..off + len])
                {
                    if let NetlinkPayload::Error(e) = msg.payload {
                        if let Some(i) = pending.remove(&seq) {
                            results[i] = Some(match e.code {
                                None => Ok(()),
                                Some(c) => Err(-c.get()),
                            });
                        }
                    }
                }
                off += (len + 3) & !3;
            }
        }
        results
            .into_iter()
            .map(|r| r.unwrap_or(Err(libc::EIO)))
            .collect()
    }
}

fn set_rcvbuf(sock: &Socket, size: usize) {
    let v = size as libc::c_int;
    // SAFETY: valid fd and an int option. SO_RCVBUFFORCE (root) ignores rmem_max; fall back to
    // SO_RCVBUF (capped) without privileges.
    unsafe {
        let p = &v as *const _ as *const libc::c_void;
        let l = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        if libc::setsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVBUFFORCE,
            p,
            l,
        ) != 0
        {
            libc::setsockopt(sock.as_raw_fd(), libc::SOL_SOCKET, libc::SO_RCVBUF, p, l);
        }
    }
}

/// How a request treats an entry that is already there.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Write {
    /// Deletes.
    Plain,
    /// Create, or fail with EEXIST: routes, which share the main table with everyone else's.
    Exclusive,
    /// Create or overwrite: entries on our own device, and routes known to be ours.
    Replace,
}

fn request(msg: RouteNetlinkMessage, write: Write) -> NetlinkMessage<RouteNetlinkMessage> {
    let mut m = NetlinkMessage::from(msg);
    m.header.flags = NLM_F_REQUEST | NLM_F_ACK;
    match write {
        Write::Plain => {}
        Write::Exclusive => m.header.flags |= NLM_F_CREATE | NLM_F_EXCL,
        Write::Replace => m.header.flags |= NLM_F_CREATE | NLM_F_REPLACE,
    }
    m
}

fn neigh(
    ifindex: u32,
    family: AddressFamily,
    flags: NeighbourFlags,
    attrs: Vec<NeighbourAttribute>,
) -> NeighbourMessage {
    let mut n = NeighbourMessage::default();
    n.header.family = family;
    n.header.ifindex = ifindex;
    n.header.state = NeighbourState::Permanent;
    n.header.flags = flags;
    n.attributes = attrs;
    n
}

/// The netlink request for one op on VXLAN device `ifindex` (see `Op` for the route rule). A
/// route is added exclusively: a replace would overwrite whatever route the main table has for
/// that destination at metric 0, the kernel's connected route for the node's own LAN included.
/// `replace_route` overwrites instead, for a route found to be ours.
pub(super) fn op_message<N: NlFamily>(
    ifindex: u32,
    op: &OpOf<N>,
) -> NetlinkMessage<RouteNetlinkMessage> {
    op_message_with(ifindex, op, Write::Exclusive)
}

pub(super) fn replace_route<N: NlFamily>(
    ifindex: u32,
    op: &OpOf<N>,
) -> NetlinkMessage<RouteNetlinkMessage> {
    op_message_with(ifindex, op, Write::Replace)
}

fn op_message_with<N: NlFamily>(
    ifindex: u32,
    op: &OpOf<N>,
    route: Write,
) -> NetlinkMessage<RouteNetlinkMessage> {
    use NeighbourAttribute::{Destination, LinkLayerAddress};
    match *op {
        OpOf::SetNeigh { ip, mac } | OpOf::DelNeigh { ip, mac } => {
            let n = neigh(
                ifindex,
                N::AF,
                NeighbourFlags::empty(),
                vec![
                    Destination(N::neigh_addr(ip)),
                    LinkLayerAddress(mac.octets().to_vec()),
                ],
            );
            match op {
                OpOf::SetNeigh { .. } => {
                    request(RouteNetlinkMessage::NewNeighbour(n), Write::Replace)
                }
                _ => request(RouteNetlinkMessage::DelNeighbour(n), Write::Plain),
            }
        }
        OpOf::SetFdb { mac, dst } | OpOf::DelFdb { mac, dst } => {
            let n = neigh(
                ifindex,
                AddressFamily::Bridge,
                NeighbourFlags::Own,
                vec![
                    LinkLayerAddress(mac.octets().to_vec()),
                    Destination(N::neigh_addr(dst)),
                ],
            );
            match op {
                OpOf::SetFdb { .. } => {
                    request(RouteNetlinkMessage::NewNeighbour(n), Write::Replace)
                }
                _ => request(RouteNetlinkMessage::DelNeighbour(n), Write::Plain),
            }
        }
        OpOf::SetRoute { dst, gw } | OpOf::DelRoute { dst, gw } => {
            let set = matches!(op, OpOf::SetRoute { .. });
            let b = N::route_to(dst, gw);
            let overlay = N::addr_bits(gw) == dst.start();
            let mut r = if overlay {
                // Out of the VXLAN device; the gateway is the peer's VTEP, only reachable onlink.
                b.output_interface(ifindex).onlink().build()
            } else {
                // DirectRouting: via the peer's public IP; the kernel picks the underlay link.
                b.protocol(RouteProtocol::Other(TWILL_RTPROT)).build()
            };
            if set {
                request(RouteNetlinkMessage::NewRoute(r), route)
            } else {
                // Match whatever scope the route was created with. An overlay route names our
                // device; a direct one is matched by twill's protocol, so that a route of the
                // same destination that is not ours (which a SetRoute refused) stays.
                if overlay {
                    r.header.protocol = RouteProtocol::Unspec;
                }
                r.header.scope = RouteScope::NoWhere;
                request(RouteNetlinkMessage::DelRoute(r), Write::Plain)
            }
        }
    }
}
