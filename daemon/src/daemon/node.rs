//! A running node: the state the main loop keeps between events, and what each kind of event
//! does to it. `run` (mod.rs) owns the select loop and the start-up; this owns the reactions.

use std::time::Instant;

use tokio::sync::watch;
use tracing::{debug, error, info, warn};

use super::fw::NodeFirewall;
use super::side4::Side4;
use super::side6::{self, Side6};
use super::status::{NodeStatus, NodeStatus4, Shared};
use crate::cli::RunArgs;
use crate::cni::NodeNet;
use crate::config::NetworkConfig;
use crate::lease::{LeaseAttrs, LeaseBackend};
use crate::netlink::{DefaultRoute, Netlink, Underlay, Watch};
use crate::policy::PolicyHandle;
use crate::registry::{OwnLease, PeerEvent};
use crate::subnet_file::SubnetEnv;

pub(super) struct Node {
    pub args: RunArgs,
    pub cfg: NetworkConfig,
    pub shared: std::sync::Arc<Shared>,
    pub nl: Netlink,
    /// The IPv4 side; None on an IPv6-only network.
    pub v4: Option<Side4>,
    pub underlay: Underlay,
    pub firewall: NodeFirewall,
    pub node_tx: watch::Sender<Option<NodeNet>>,
    pub attrs_tx: watch::Sender<LeaseAttrs>,
    pub policy: Option<PolicyHandle>,
    /// The subnet file is written and the CNI server serves pods.
    pub ready: bool,
    /// Since when listing the leases fails, and the last error (None: the last list worked).
    list_failing: Option<(Instant, String)>,
    /// /readyz says so because the list failed for longer than `--lease-list-grace`.
    list_stale: bool,
    /// The IPv6 side of a dual-stack node.
    pub v6: Option<Side6>,
}

impl Node {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        args: RunArgs,
        cfg: NetworkConfig,
        shared: std::sync::Arc<Shared>,
        nl: Netlink,
        v4: Option<Side4>,
        underlay: Underlay,
        firewall: NodeFirewall,
        node_tx: watch::Sender<Option<NodeNet>>,
        attrs_tx: watch::Sender<LeaseAttrs>,
        policy: Option<PolicyHandle>,
        v6: Option<Side6>,
    ) -> Self {
        let node = Node {
            args,
            cfg,
            shared,
            nl,
            v4,
            underlay,
            firewall,
            node_tx,
            attrs_tx,
            policy,
            ready: false,
            list_failing: None,
            list_stale: false,
            v6,
        };
        node.publish_node();
        node
    }

    pub async fn on_peer_events(&mut self, batch: Vec<PeerEvent>) {
        let mut peers = Vec::with_capacity(batch.len());
        let mut peers6 = Vec::new();
        for ev in batch {
            match ev {
                PeerEvent::ListFailed(e) => {
                    self.list_failing
                        .get_or_insert_with(|| (Instant::now(), String::new()))
                        .1 = e
                }
                // Either family's snapshot is a list that worked (an IPv6-only node gets only
                // the IPv6 one).
                PeerEvent::Snapshot(_) => {
                    self.list_failing = None;
                    peers.push(ev);
                }
                PeerEvent::Snapshot6(_) => {
                    self.list_failing = None;
                    peers6.push(ev);
                }
                PeerEvent::Upsert6(_) | PeerEvent::Remove6(_) => peers6.push(ev),
                ev => peers.push(ev),
            }
        }
        // The two families' kernel writes are independent: they run at once.
        let shared = &self.shared;
        let v4 = async {
            if let (Some(v4), false) = (&mut self.v4, peers.is_empty()) {
                v4.on_events(peers, shared).await;
            }
        };
        let v6 = async {
            if let (Some(v6), false) = (&mut self.v6, peers6.is_empty()) {
                v6.on_events(peers6, shared).await;
            }
        };
        tokio::join!(v4, v6);
    }

    pub async fn on_own_lease(&mut self, new: OwnLease) {
        let moved6 = match (&mut self.v6, new.subnet6) {
            (Some(v6), Some(s6)) if s6 != v6.local.subnet => {
                warn!(old = %v6.local.subnet, new = %s6, "our lease moved to another IPv6 subnet");
                v6.local.subnet = s6;
                true
            }
            _ => false,
        };
        let moved4 = match (&mut self.v4, new.subnet) {
            (Some(v4), Some(s)) if s != v4.local.subnet => {
                warn!(old = %v4.local.subnet, new = %s, "our lease moved to another subnet");
                v4.local.subnet = s;
                true
            }
            _ => false,
        };
        if !moved4 && !moved6 {
            return;
        }
        self.setup().await;
        if self.ready {
            self.write_ready().await;
        }
    }

    /// Kernel events settled: the underlay may have moved; the device or entries may be gone.
    pub async fn on_kernel_change(&mut self, addr_changed: bool) {
        let follow4 = self.args.public_ip.is_none() && self.v4.is_some();
        let follow6 = self.args.public_ipv6.is_none() && self.v6.is_some();
        if addr_changed && (follow4 || follow6) {
            // One lookup (routes, links, addresses) feeds both families.
            // The default route of the node's first family names the underlay.
            let route = if self.v4.is_some() {
                DefaultRoute::Ipv4
            } else {
                DefaultRoute::Ipv6
            };
            match self
                .nl
                .find_underlay_by(self.args.iface.as_ref(), route)
                .await
            {
                Ok(u) => {
                    let moved6 = follow6 && self.follow_ipv6_endpoint(&u);
                    let moved4 = follow4 && self.follow_ipv4_endpoint(&u);
                    if moved4 || moved6 {
                        self.underlay = u;
                    }
                }
                Err(e) => warn!(error = %e, "underlay lookup after an address change failed"),
            }
        }
        // (setup below also redoes the IPv6 device for a moved endpoint)
        // Also redoes each peer's path (the underlay's prefixes may have changed).
        self.setup().await;
        self.reconcile("kernel event").await;
        self.sync_blackhole().await;
    }

    /// The IPv4 endpoint follows the underlay's address (or another interface taking over the
    /// default route), and the lease says so.
    /// Whether it moved.
    fn follow_ipv4_endpoint(&mut self, u: &Underlay) -> bool {
        let Some(v4) = &mut self.v4 else {
            return false;
        };
        let Some(addr) = u.addr else {
            debug!(iface = %u.name, kept = %v4.local.public_ip, "the underlay has no IPv4 address now; keeping the last one");
            return false;
        };
        if addr == v4.local.public_ip && u.index == v4.local.underlay_index {
            return false;
        }
        info!(old = %v4.local.public_ip, new = %addr, iface = %u.name, "underlay address changed");
        v4.local.public_ip = addr;
        v4.local.underlay_index = u.index;
        v4.local.underlay_mtu = u.mtu;
        self.attrs_tx.send_modify(|a| {
            if let Some(l4) = a.v4.as_mut() {
                l4.public_ip = addr;
            }
        });
        true
    }

    pub async fn on_resync(&mut self) {
        // Also retries a first reconcile that failed: until one succeeds the node is not ready.
        // (Addresses, the underlay's IPv6 one too, are followed on kernel events.)
        self.reconcile("periodic").await;
        self.sync_blackhole().await;
        self.firewall.check(&self.shared).await;
        if let Some(p) = &self.policy {
            p.check();
        }
    }

    /// Someone else changed the nftables ruleset.
    pub async fn on_nft_change(&mut self) {
        self.firewall.check(&self.shared).await;
        if let Some(p) = &self.policy {
            p.check();
        }
    }

    /// After every event: ready once the peers have been listed and programmed once and the
    /// subnet file is written (a failed write is retried on the next pass).
    pub async fn after_event(&mut self) {
        let synced4 = self.v4.as_ref().is_none_or(|v4| v4.sync.synced_once);
        let synced6 = self.v6.as_ref().is_none_or(|v6| v6.sync.synced_once);
        if !self.ready && synced4 && synced6 {
            self.write_ready().await;
        }
        self.publish_readiness();
    }

    /// A ready node stops saying so while it cannot list the leases for longer than
    /// `--lease-list-grace`: its peers may be out of date, and it would not know.
    fn publish_readiness(&mut self) {
        if !self.ready {
            return;
        }
        let grace = self.args.lease_list_grace;
        let stale = self
            .list_failing
            .as_ref()
            .filter(|(since, _)| since.elapsed() >= grace)
            .map(|(since, e)| {
                format!(
                    "cannot list the subnet leases for {}s: {e}",
                    since.elapsed().as_secs()
                )
            });
        if stale.is_some() != self.list_stale {
            self.list_stale = stale.is_some();
            match &stale {
                Some(why) => warn!("not ready: {why}"),
                None => info!("the subnet leases are listed again: ready"),
            }
        }
        self.shared.update(|s| {
            s.ready = stale.is_none();
            s.waiting_for = stale;
        });
    }

    /// Both families at once (their kernel writes are independent).
    async fn reconcile(&mut self, why: &str) {
        let shared = &self.shared;
        let v4 = async {
            if let Some(v4) = &mut self.v4 {
                v4.reconcile(why, shared).await;
            }
        };
        let v6 = async {
            if let Some(v6) = &mut self.v6 {
                v6.reconcile(why, shared).await;
            }
        };
        tokio::join!(v4, v6);
    }

    /// Each side's device (again) and underlay networks; the firewall follows a changed device.
    async fn setup(&mut self) {
        let devices = |n: &Self| {
            (
                n.v4.as_ref().map(|v4| v4.device.clone()),
                n.v6.as_ref().map(|v6| v6.device.clone()),
            )
        };
        let before = devices(self);
        let name = self.underlay.name.clone();
        if let Some(v4) = &mut self.v4 {
            v4.setup(&self.nl, &name).await;
        }
        if let Some(v6) = &mut self.v6 {
            v6.setup(&self.nl, &name).await;
        }
        self.publish_node();
        if self.ready && devices(self) != before {
            self.apply_firewall().await;
        }
    }

    /// The firewall for this node's devices as they are now.
    async fn apply_firewall(&mut self) {
        self.firewall
            .apply(
                &self.args,
                &self.cfg,
                self.v4.as_ref().map(|v4| &v4.device),
                self.v6.as_ref().map(|v6| &v6.device),
                &self.shared,
            )
            .await;
    }

    /// The node is ready: the firewall first (pods must reach the world from their first
    /// packet), then the CNI server and the subnet file (only now, so that pods never start
    /// against a half-set-up node: flannel #2232).
    async fn write_ready(&mut self) {
        self.apply_firewall().await;
        self.sync_blackhole().await;
        let _ = self.node_tx.send(Some(NodeNet {
            subnet: self.v4.as_ref().map(|v4| v4.local.subnet),
            subnet6: self.v6.as_ref().map(|v6| v6.local.subnet),
            mtu: self.pod_mtu(),
        }));
        let env = SubnetEnv {
            ipv4: self
                .v4
                .as_ref()
                .zip(self.cfg.ipv4.as_ref())
                .map(|(v4, r)| (r.network, v4.local.subnet)),
            mtu: self.pod_mtu(),
            ipmasq: self.args.ip_masq,
            ipv6: self
                .v6
                .as_ref()
                .zip(self.cfg.ipv6.as_ref())
                .map(|(v6, r)| (r.network, v6.local.subnet)),
        };
        let file = &self.args.subnet_file;
        match env.write(file) {
            Ok(()) => {
                let subnet = self.v4.as_ref().map(|v4| v4.local.subnet);
                let subnet6 = self.v6.as_ref().map(|v6| v6.local.subnet);
                info!(file = %file.display(), ?subnet, ?subnet6, "node ready");
                self.shared.update(|s| {
                    s.ready = true;
                    s.waiting_for = None;
                });
                self.ready = true;
            }
            Err(e) => {
                error!(file = %file.display(), error = %e, "cannot write the subnet file; not ready, will retry");
                self.shared.update(|s| {
                    s.ready = false;
                    s.waiting_for = Some(format!("subnet file: {e}"))
                });
                self.ready = false;
            }
        }
    }

    /// `--ip-blackhole-route`: a blackhole route for our subnet, behind the bridge's own route;
    /// without the flag, none of ours (also from an earlier run with it).
    async fn sync_blackhole(&mut self) {
        // IPv4 only (flannel's flag); none on an IPv6-only node.
        let want = self
            .v4
            .as_ref()
            .filter(|_| self.args.ip_blackhole_route)
            .map(|v4| v4.local.subnet);
        match self.nl.sync_blackholes(want).await {
            Ok(true) => info!(route = ?want, "blackhole route for our subnet updated"),
            Ok(false) => {}
            Err(e) => warn!(error = %e, "blackhole route for our subnet failed; will retry"),
        }
    }

    fn publish_node(&self) {
        let backend = self.attrs_tx.borrow().primary().map(|s| s.backend);
        let vxlan = matches!(backend, Some(LeaseBackend::Vxlan { .. }));
        let v4 = self.v4.as_ref().map(|v4| NodeStatus4 {
            subnet: v4.local.subnet,
            public_ip: v4.local.public_ip,
            vtep_mac: vxlan.then_some(v4.local.vtep_mac),
            device: v4.device.name.clone(),
            mtu: v4.device.mtu,
            tx_checksum_offload: v4.device.tx_checksum,
        });
        self.shared.update(|s| {
            s.node = Some(NodeStatus {
                v4,
                underlay: self.underlay.name.clone(),
                backend: backend.map_or("", |b| b.type_name()).into(),
                ipv6: self.v6.as_ref().map(side6::status),
            })
        });
    }

    /// What kernel events must follow: each family's device and the underlay.
    pub fn watch(&self) -> Watch {
        Watch {
            v4: self.v4.as_ref().map(|v4| v4.watched()),
            v6: self.v6.as_ref().map(Side6::watched),
            underlay: self.underlay.index,
        }
    }

    /// The MTU pods get: a pod's packets of either family must fit the path they take, and the
    /// IPv6 overlay's overhead is 20 bytes more than the IPv4 one's.
    fn pod_mtu(&self) -> u32 {
        let mtus = [
            &self.v4.as_ref().map(|v4| v4.device.mtu),
            &self.v6.as_ref().map(|v6| v6.device.mtu),
        ];
        mtus.into_iter().flatten().copied().min().unwrap_or(1500)
    }

    /// The IPv6 endpoint follows the underlay's IPv6 address (as the IPv4 one follows the IPv4
    /// address), and the lease says so.
    /// Whether it moved.
    fn follow_ipv6_endpoint(&mut self, u: &Underlay) -> bool {
        let Some(v6) = &mut self.v6 else {
            return false;
        };
        match u.addr6 {
            Some(a) if a != v6.local.public_ip => {
                info!(old = %v6.local.public_ip, new = %a, iface = %u.name, "underlay IPv6 address changed");
                v6.local.public_ip = a;
                v6.local.underlay_index = u.index;
                v6.local.underlay_mtu = u.mtu;
                self.attrs_tx.send_modify(|attrs| {
                    if let Some(l6) = &mut attrs.v6 {
                        l6.public_ip = a;
                    }
                });
                true
            }
            Some(_) => false,
            None => {
                debug!(iface = %u.name, kept = %v6.local.public_ip, "the underlay has no usable IPv6 address now; keeping the last one");
                false
            }
        }
    }
}
