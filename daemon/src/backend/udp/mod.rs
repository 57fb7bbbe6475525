//! The udp backend: flannel's userspace fallback for hosts where the kernel's VXLAN cannot run.
//! A TUN device takes every packet for the pod network (one route for the whole network; the
//! node's own subnet is more specific, on its bridge); userspace workers send each one as a
//! UDP datagram to the peer whose subnet holds its destination (port 8285, the bare IP packet
//! as payload: flannel's wire format), and write the datagrams peers send back into the
//! device. Peers have no kernel entries of their own: adding or removing one publishes a new
//! peer table to the workers.
//!
//! The packet path lives in this process: twilld stopping (or killed) takes the TUN device and
//! its route with it, and traffic to other nodes stops until twilld is back (README).

pub mod datapath;
mod gro;
mod split;
pub mod table;

use std::collections::HashMap;
use std::net::SocketAddrV4;
use std::sync::Arc;

use ipnet::Ipv4Net;

use super::routes::Programmer;
use super::{ApplyStats, Backend, BackendError, DeviceInfo, LocalNode, PeerPath};
use crate::config::BackendConfig;
use crate::netlink::Netlink;
use crate::peer::Peer;
use crate::reconcile::{Path, PeerChange};
use datapath::{Datapath, Stats};
use table::{Published, Table};

/// The TUN device's name.
pub const DEVICE: &str = "twill-udp";
/// IPv4 and UDP headers: each datagram's overhead.
pub const OVERHEAD: u32 = 28;

struct Running {
    ifindex: u32,
    local: LocalNode,
    _workers: Datapath,
}

pub struct UdpBackend {
    cfg: BackendConfig,
    network: Ipv4Net,
    nl: Netlink,
    peers: HashMap<Ipv4Net, Peer>,
    table: Arc<Published>,
    stats: Arc<Stats>,
    /// Use the kernel's offloads where it has them (`--udp-offloads`).
    offloads: bool,
    running: Option<Running>,
}

impl UdpBackend {
    pub fn new(
        nl: Netlink,
        cfg: &BackendConfig,
        network: Ipv4Net,
        stats: Arc<Stats>,
        offloads: bool,
    ) -> Self {
        if !offloads {
            tracing::info!("udp backend: offloads off (--udp-offloads=false); one packet per read, write and message");
        }
        UdpBackend {
            cfg: cfg.clone(),
            network,
            nl,
            peers: HashMap::new(),
            table: Arc::default(),
            stats,
            offloads,
            running: None,
        }
    }

    fn mtu(&self, local: &LocalNode) -> u32 {
        self.cfg
            .mtu
            .unwrap_or(local.underlay_mtu.saturating_sub(OVERHEAD))
    }

    fn publish(&self) {
        if let Some(r) = &self.running {
            self.table
                .publish(Table::new(r.local.subnet, self.peers.values().copied()));
        }
    }

    /// The device, its address and route, and the workers; the ones already running are kept
    /// while the device is.
    async fn ensure(&mut self, local: &LocalNode) -> Result<u32, BackendError> {
        let mtu = self.mtu(local);
        let addr = Ipv4Net::new(local.subnet.network(), 32).expect("/32 is a valid prefix");
        if let Some(r) = &self.running {
            if r.local.public_ip == local.public_ip
                && self.nl.link_name(r.ifindex).await?.as_deref() == Some(DEVICE)
            {
                let i = self.nl.ensure_tun(DEVICE, mtu, addr, self.network).await?;
                self.running.as_mut().expect("checked").local = local.clone();
                return Ok(i);
            }
        }
        // A new device (first start, or it was deleted): the old workers go with the old one.
        self.running = None;
        let queues =
            open_queues(mtu, self.offloads).map_err(|e| io_error("open the TUN device", e))?;
        // IPv4 only (for now): without this the kernel sends its IPv6 router solicitations and
        // MLD reports into the device. Absent when IPv6 is off altogether.
        let _ = std::fs::write(
            format!("/proc/sys/net/ipv6/conf/{DEVICE}/disable_ipv6"),
            "1",
        );
        let ifindex = self.nl.ensure_tun(DEVICE, mtu, addr, self.network).await?;
        let at = SocketAddrV4::new(local.public_ip, self.cfg.port);
        let (workers, offloads) =
            datapath::start(queues, at, &self.table, &self.stats, self.offloads)
                .map_err(|e| io_error(&format!("listen on UDP {at}"), e))?;
        if self.offloads && (!offloads.gso || !offloads.gro) {
            tracing::info!(
                udp_gso = offloads.gso,
                udp_gro = offloads.gro,
                "udp backend: the kernel lacks UDP segmentation (GSO) or receive (GRO) offload; without it, one datagram per message that way"
            );
        }
        self.running = Some(Running {
            ifindex,
            local: local.clone(),
            _workers: workers,
        });
        Ok(ifindex)
    }
}

fn io_error(what: &str, e: std::io::Error) -> BackendError {
    BackendError::Netlink(crate::netlink::NetlinkError::Errno {
        context: format!("udp backend: {what}: {e}"),
        errno: e.raw_os_error().unwrap_or(libc::EIO),
    })
}

/// One TUN queue per core (up to 4): the kernel spreads flows over them. With segmentation
/// offload where the kernel has it and `offload` asks for it (a read is then up to 64 KiB of
/// one flow).
fn open_queues(mtu: u32, offload: bool) -> std::io::Result<Vec<tun_rs::SyncDevice>> {
    let n = std::thread::available_parallelism().map_or(1, |n| n.get().min(4));
    let build = |offload: bool| {
        tun_rs::DeviceBuilder::new()
            .name(DEVICE)
            .mtu(u16::try_from(mtu).unwrap_or(u16::MAX))
            .multi_queue(true)
            .offload(offload)
            .build_sync()
    };
    let first = match build(offload) {
        Ok(d) => d,
        Err(e) if offload => {
            tracing::warn!(error = %e, "udp backend: the TUN device takes no offloads here; one packet per read");
            build(false)?
        }
        Err(e) => return Err(e),
    };
    if offload && !first.tcp_gso() {
        tracing::info!(
            "udp backend: no TCP segmentation offload on the TUN device; one packet per read"
        );
    }
    let mut queues = Vec::with_capacity(n);
    for _ in 1..n {
        queues.push(first.try_clone()?);
    }
    queues.insert(0, first);
    Ok(queues)
}

impl Backend for UdpBackend {
    async fn setup(&mut self, local: &LocalNode) -> Result<DeviceInfo, BackendError> {
        // A node switched from vxlan or host-gw: their device and routes must go, or traffic to
        // peers would keep using them.
        for (index, name) in self.nl.vxlan_devices().await? {
            if name.starts_with("twill.") {
                tracing::info!(device = %name, "backend is udp: deleting the VXLAN device of an earlier run");
                self.nl.delete_link(index).await?;
            }
        }
        let mut leftovers = Programmer::new(self.nl.clone(), false);
        let stale = leftovers
            .reconcile(local.underlay_index, None, &[], |_| {
                PeerPath::ok(Path::Direct)
            })
            .await?;
        if stale.removed > 0 {
            tracing::info!(
                routes = stale.removed,
                "backend is udp: removed host-gw routes of an earlier run"
            );
        }
        let ifindex = self.ensure(local).await?;
        self.publish();
        let mtu = self.mtu(local);
        tracing::info!(device = DEVICE, mtu, port = self.cfg.port, network = %self.network, "udp backend ready");
        Ok(DeviceInfo {
            name: DEVICE.into(),
            ifindex,
            mtu,
            tx_checksum: None,
            overlay: true,
        })
    }

    async fn apply(&mut self, changes: &[PeerChange]) -> Result<ApplyStats, BackendError> {
        let stats = merge(&mut self.peers, changes);
        if stats.added + stats.removed > 0 {
            self.publish();
        }
        Ok(stats)
    }

    async fn reconcile(&mut self, desired: &[Peer]) -> Result<ApplyStats, BackendError> {
        let Some(r) = &self.running else {
            return Err(BackendError::DeviceGone(DEVICE.into()));
        };
        if self.nl.link_name(r.ifindex).await?.as_deref() != Some(DEVICE) {
            self.running = None;
            return Err(BackendError::DeviceGone(DEVICE.into()));
        }
        // Its route is all the kernel holds for peers: put back if someone removed it.
        let mut stats = ApplyStats::default();
        if !self.nl.has_dev_route(r.ifindex, self.network).await? {
            tracing::warn!(network = %self.network, "the route through {DEVICE} was gone: restoring it");
            let local = r.local.clone();
            self.ensure(&local).await?;
            stats.added += 1;
        }
        let want: HashMap<Ipv4Net, Peer> = desired.iter().map(|p| (p.subnet, *p)).collect();
        if want != self.peers {
            self.peers = want;
            self.publish();
        }
        Ok(stats)
    }

    fn path(&self, _peer: &Peer) -> PeerPath {
        PeerPath::ok(Path::Userspace)
    }
}

/// `changes` applied to the peer table; counts only what changed it (a peer sent again as it
/// is changes nothing).
fn merge(peers: &mut HashMap<Ipv4Net, Peer>, changes: &[PeerChange]) -> ApplyStats {
    let mut stats = ApplyStats::default();
    for c in changes {
        if let Some(o) = c.old {
            // A peer replaced under its own subnet is an update, counted below.
            if c.new.map(|n| n.subnet) != Some(o.subnet) && peers.remove(&o.subnet).is_some() {
                stats.removed += 1;
            }
        }
        if let Some(n) = c.new {
            if peers.insert(n.subnet, n) != Some(n) {
                stats.added += 1;
            }
        }
    }
    stats
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(third: u8, ip: u8) -> Peer {
        Peer {
            subnet: format!("10.244.{third}.0/24").parse().unwrap(),
            public_ip: std::net::Ipv4Addr::new(198, 18, 0, ip),
            vtep_mac: None,
        }
    }

    #[test]
    fn merge_counts_what_changed_the_table() {
        let mut peers = HashMap::new();
        let (a, b) = (peer(1, 11), peer(2, 12));
        let add = |p| PeerChange {
            old: None,
            new: Some(p),
        };
        let s = merge(&mut peers, &[add(a), add(b)]);
        assert_eq!((s.added, s.removed), (2, 0));
        // The same peer again: nothing to do.
        let again = PeerChange {
            old: Some(a),
            new: Some(a),
        };
        let s = merge(&mut peers, &[again, add(b)]);
        assert_eq!((s.added, s.removed), (0, 0));
        // A new public IP under the same subnet: one update.
        let moved = peer(1, 21);
        let s = merge(
            &mut peers,
            &[PeerChange {
                old: Some(a),
                new: Some(moved),
            }],
        );
        assert_eq!((s.added, s.removed), (1, 0));
        assert_eq!(peers[&a.subnet], moved);
        // Gone, and gone again.
        let gone = PeerChange {
            old: Some(b),
            new: None,
        };
        assert_eq!(merge(&mut peers, std::slice::from_ref(&gone)).removed, 1);
        assert_eq!(merge(&mut peers, &[gone]).removed, 0);
        assert_eq!(peers.len(), 1);
    }
}
