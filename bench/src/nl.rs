//! A netlink multicast listener inside a namespace: the kernel tells us when a neighbour, FDB
//! entry or route appears or goes, so convergence is timed from notifications rather than by
//! polling dumps (which would load the machine and blur the very thing measured).

use std::collections::HashMap;
use std::fs::File;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use nix::sched::{setns, CloneFlags};

const RTM_NEWROUTE: u16 = 24;
const RTM_DELROUTE: u16 = 25;
const RTM_NEWNEIGH: u16 = 28;
const RTM_DELNEIGH: u16 = 29;
const RTMGRP_NEIGH: u32 = 0x4;
const RTMGRP_IPV4_ROUTE: u32 = 0x40;
const RTMGRP_IPV6_ROUTE: u32 = 0x400;
const NDA_DST: u16 = 1;
const NDA_LLADDR: u16 = 2;
const RTA_DST: u16 = 1;
const AF_INET: u8 = libc::AF_INET as u8;
const AF_INET6: u8 = libc::AF_INET6 as u8;
const AF_BRIDGE: u8 = libc::AF_BRIDGE as u8;
/// Large enough for the burst of 15,000 notifications of a cold start at 5,000 peers.
const RCVBUF: libc::c_int = 256 << 20;

/// Keys as the listener records them.
pub fn neigh_key(ip: impl Into<IpAddr>) -> String {
    format!("n{}", ip.into())
}
pub fn fdb_key(mac: &[u8; 6]) -> String {
    format!("f{}", mac_str(mac))
}
pub fn route_key(net: impl Into<IpAddr>, len: u8) -> String {
    format!("r{}/{len}", net.into())
}

pub fn mac_str(mac: &[u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

#[derive(Default)]
struct State {
    /// Last time each key was added (or replaced) / deleted.
    added: HashMap<String, Instant>,
    deleted: HashMap<String, Instant>,
    new_events: u64,
    del_events: u64,
    /// ENOBUFS: notifications were lost; results relying on them are then flagged.
    overruns: u64,
}

pub struct Listener {
    shared: Arc<(Mutex<State>, Condvar)>,
    stop: Arc<AtomicBool>,
    handle: Option<JoinHandle<()>>,
}

impl Listener {
    /// Start listening inside the named netns. Returns once the socket is subscribed, so any
    /// change made after this call is seen.
    pub fn start(netns: &str) -> Result<Listener> {
        let path = Path::new("/run/netns").join(netns);
        let file = File::open(&path).with_context(|| format!("open {}", path.display()))?;
        let shared = Arc::new((Mutex::new(State::default()), Condvar::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (ready_tx, ready_rx) = std::sync::mpsc::channel::<Result<()>>();
        let (sh, st) = (shared.clone(), stop.clone());
        let handle = std::thread::Builder::new()
            .name("nl-listener".into())
            .spawn(move || {
                let fd = match setns(&file, CloneFlags::CLONE_NEWNET)
                    .map_err(|e| anyhow!("setns: {e}"))
                    .and_then(|_| open_socket())
                {
                    Ok(fd) => {
                        let _ = ready_tx.send(Ok(()));
                        fd
                    }
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                        return;
                    }
                };
                recv_loop(fd, &sh, &st);
                // SAFETY: fd is ours and no longer used.
                unsafe { libc::close(fd) };
            })?;
        ready_rx
            .recv()
            .map_err(|_| anyhow!("listener thread died"))??;
        Ok(Listener {
            shared,
            stop,
            handle: Some(handle),
        })
    }

    /// Wait until every key has been added at or after `since`; returns the latest of those
    /// times. Bounded by `timeout`.
    pub fn wait_added(
        &self,
        keys: &[String],
        since: Instant,
        timeout: Duration,
    ) -> Result<Instant> {
        self.wait(keys, since, timeout, true)
    }

    pub fn wait_deleted(
        &self,
        keys: &[String],
        since: Instant,
        timeout: Duration,
    ) -> Result<Instant> {
        self.wait(keys, since, timeout, false)
    }

    fn wait(
        &self,
        keys: &[String],
        since: Instant,
        timeout: Duration,
        add: bool,
    ) -> Result<Instant> {
        let deadline = Instant::now() + timeout;
        let (lock, cv) = &*self.shared;
        let mut st = lock.lock().map_err(|_| anyhow!("listener poisoned"))?;
        loop {
            let map = if add { &st.added } else { &st.deleted };
            let mut latest = since;
            let mut missing = 0usize;
            for k in keys {
                match map.get(k) {
                    Some(t) if *t >= since => latest = latest.max(*t),
                    _ => missing += 1,
                }
            }
            if missing == 0 {
                return Ok(latest);
            }
            let now = Instant::now();
            if now >= deadline {
                bail!(
                    "{missing} of {} entries still not {} after {timeout:?} (overruns: {})",
                    keys.len(),
                    if add { "added" } else { "deleted" },
                    st.overruns
                );
            }
            // Re-check at most every 20 ms under a burst: scanning thousands of keys per
            // notification would cost more than the daemon's own work.
            let wait = (deadline - now).min(Duration::from_millis(20));
            st = cv
                .wait_timeout(st, wait)
                .map_err(|_| anyhow!("listener poisoned"))?
                .0;
        }
    }

    /// When `key` was last added (or deleted).
    pub fn last(&self, key: &str, deleted: bool) -> Option<Instant> {
        let st = self.shared.0.lock().expect("listener lock");
        let map = if deleted { &st.deleted } else { &st.added };
        map.get(key).copied()
    }

    /// (new, deleted) notification counts so far.
    pub fn counts(&self) -> (u64, u64) {
        let st = self.shared.0.lock().expect("listener lock");
        (st.new_events, st.del_events)
    }

    pub fn overruns(&self) -> u64 {
        self.shared.0.lock().expect("listener lock").overruns
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

fn open_socket() -> Result<libc::c_int> {
    // SAFETY: plain socket calls; every return value is checked.
    unsafe {
        let fd = libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            libc::NETLINK_ROUTE,
        );
        if fd < 0 {
            bail!("netlink socket: {}", std::io::Error::last_os_error());
        }
        let sz = RCVBUF;
        let p = &sz as *const libc::c_int as *const libc::c_void;
        let len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        // FORCE needs CAP_NET_ADMIN (we are root); fall back to the capped size otherwise.
        if libc::setsockopt(fd, libc::SOL_SOCKET, libc::SO_RCVBUFFORCE, p, len) != 0 {
            libc::setsockopt(fd, libc::SOL_SOCKET, libc::SO_RCVBUF, p, len);
        }
        let tv = libc::timeval {
            tv_sec: 0,
            tv_usec: 100_000,
        };
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            &tv as *const libc::timeval as *const libc::c_void,
            std::mem::size_of::<libc::timeval>() as libc::socklen_t,
        );
        let mut addr: libc::sockaddr_nl = std::mem::zeroed();
        addr.nl_family = libc::AF_NETLINK as u16;
        addr.nl_groups = RTMGRP_NEIGH | RTMGRP_IPV4_ROUTE | RTMGRP_IPV6_ROUTE;
        if libc::bind(
            fd,
            &addr as *const libc::sockaddr_nl as *const libc::sockaddr,
            std::mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t,
        ) != 0
        {
            let e = std::io::Error::last_os_error();
            libc::close(fd);
            bail!("bind netlink socket: {e}");
        }
        Ok(fd)
    }
}

fn recv_loop(fd: libc::c_int, shared: &Arc<(Mutex<State>, Condvar)>, stop: &AtomicBool) {
    let mut buf = vec![0u8; 1 << 20];
    while !stop.load(Ordering::Relaxed) {
        // SAFETY: buf is valid for its length.
        let n = unsafe { libc::recv(fd, buf.as_mut_ptr() as *mut libc::c_void, buf.len(), 0) };
        let at = Instant::now();
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::ENOBUFS) {
                shared.0.lock().expect("listener lock").overruns += 1;
            }
            continue;
        }
        let events = parse(&buf[..n as usize]);
        if events.is_empty() {
            continue;
        }
        let (lock, cv) = &**shared;
        let mut st = lock.lock().expect("listener lock");
        for (add, key) in events {
            if add {
                st.new_events += 1;
                st.added.insert(key, at);
            } else {
                st.del_events += 1;
                st.deleted.insert(key, at);
            }
        }
        drop(st);
        cv.notify_all();
    }
}

/// (is_add, key) for every neighbour, FDB and IPv4 route notification in a datagram.
pub fn parse(mut buf: &[u8]) -> Vec<(bool, String)> {
    let mut out = Vec::new();
    while buf.len() >= 16 {
        let len = u32::from_ne_bytes(buf[0..4].try_into().expect("4 bytes")) as usize;
        let ty = u16::from_ne_bytes(buf[4..6].try_into().expect("2 bytes"));
        if len < 16 || len > buf.len() {
            break;
        }
        let body = &buf[16..len];
        match ty {
            RTM_NEWNEIGH | RTM_DELNEIGH if body.len() >= 12 => {
                let family = body[0];
                let attrs = attrs(&body[12..]);
                let key = match family {
                    AF_INET => attrs.get(&NDA_DST).and_then(|v| ipv4(v)).map(neigh_key),
                    AF_INET6 => attrs.get(&NDA_DST).and_then(|v| ipv6(v)).map(neigh_key),
                    AF_BRIDGE => attrs
                        .get(&NDA_LLADDR)
                        .and_then(|v| <[u8; 6]>::try_from(*v).ok())
                        .map(|m| fdb_key(&m)),
                    _ => None,
                };
                if let Some(k) = key {
                    out.push((ty == RTM_NEWNEIGH, k));
                }
            }
            RTM_NEWROUTE | RTM_DELROUTE if body.len() >= 12 => {
                let dst_len = body[1];
                let attrs = attrs(&body[12..]);
                let dst = attrs.get(&RTA_DST).and_then(|v| match body[0] {
                    AF_INET => ipv4(v).map(IpAddr::V4),
                    AF_INET6 => ipv6(v).map(IpAddr::V6),
                    _ => None,
                });
                if let Some(dst) = dst {
                    out.push((ty == RTM_NEWROUTE, route_key(dst, dst_len)));
                }
            }
            _ => {}
        }
        let next = (len + 3) & !3;
        if next >= buf.len() {
            break;
        }
        buf = &buf[next..];
    }
    out
}

fn ipv4(v: &[u8]) -> Option<Ipv4Addr> {
    <[u8; 4]>::try_from(v).ok().map(Ipv4Addr::from)
}

fn ipv6(v: &[u8]) -> Option<Ipv6Addr> {
    <[u8; 16]>::try_from(v).ok().map(Ipv6Addr::from)
}

fn attrs(mut buf: &[u8]) -> HashMap<u16, &[u8]> {
    let mut out = HashMap::new();
    while buf.len() >= 4 {
        let len = u16::from_ne_bytes([buf[0], buf[1]]) as usize;
        let ty = u16::from_ne_bytes([buf[2], buf[3]]) & 0x3fff;
        if len < 4 || len > buf.len() {
            break;
        }
        out.insert(ty, &buf[4..len]);
        let next = (len + 3) & !3;
        if next >= buf.len() {
            break;
        }
        buf = &buf[next..];
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn attr(ty: u16, v: &[u8]) -> Vec<u8> {
        let mut a = Vec::new();
        a.extend_from_slice(&((4 + v.len()) as u16).to_ne_bytes());
        a.extend_from_slice(&ty.to_ne_bytes());
        a.extend_from_slice(v);
        while a.len() % 4 != 0 {
            a.push(0);
        }
        a
    }

    fn msg(ty: u16, hdr: &[u8], attrs: &[Vec<u8>]) -> Vec<u8> {
        let mut body = hdr.to_vec();
        for a in attrs {
            body.extend_from_slice(a);
        }
        let mut m = Vec::new();
        m.extend_from_slice(&((16 + body.len()) as u32).to_ne_bytes());
        m.extend_from_slice(&ty.to_ne_bytes());
        m.extend_from_slice(&[0u8; 10]);
        m.extend_from_slice(&body);
        m
    }

    #[test]
    fn parses_neigh_fdb_and_route_notifications() {
        let mut ndm = [0u8; 12];
        ndm[0] = AF_INET;
        let mut buf = msg(RTM_NEWNEIGH, &ndm, &[attr(NDA_DST, &[10, 1, 2, 0])]);
        ndm[0] = AF_BRIDGE;
        buf.extend(msg(
            RTM_DELNEIGH,
            &ndm,
            &[attr(NDA_LLADDR, &[0x0e, 0xb0, 0, 0, 1, 2])],
        ));
        let mut rtm = [0u8; 12];
        rtm[0] = AF_INET;
        rtm[1] = 24;
        buf.extend(msg(RTM_NEWROUTE, &rtm, &[attr(RTA_DST, &[10, 1, 2, 0])]));
        assert_eq!(
            parse(&buf),
            vec![
                (true, "n10.1.2.0".to_owned()),
                (false, "f0e:b0:00:00:01:02".to_owned()),
                (true, "r10.1.2.0/24".to_owned()),
            ]
        );
    }

    #[test]
    fn ignores_truncated_input() {
        assert!(parse(&[1, 2, 3]).is_empty());
        assert!(parse(&[200, 0, 0, 0, 28, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]).is_empty());
    }
}
