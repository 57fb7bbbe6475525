//! One address family's part of a running node: its backend, the device traffic to peers
//! leaves through, what the backend knows of this node, and the peers' sync. A node runs one
//! for IPv4 and, on a dual-stack network, one for IPv6; the two are independent (each has its
//! own peers, device and kernel entries) and only meet in the node (pod MTU, firewall, status).

use tracing::{error, info, warn};

use super::peers::{SyncFamily, SyncOf};
use super::status::Shared;
use crate::backend::routes::ProgrammerOf;
use crate::backend::{Backend, DeviceInfo, LocalNodeOf, PeerPath};
use crate::netlink::NlFamily;
use crate::netlink::{Netlink, Watched};
use crate::overlap::HostNetsOf;
use crate::peer::PeerOf;
use crate::reconcile::Path;
use crate::registry::PeerEvent;

pub(super) struct Side<N: SyncFamily, B: Backend<N>> {
    pub backend: B,
    pub device: DeviceInfo,
    pub local: LocalNodeOf<N>,
    pub sync: SyncOf<N>,
}

impl<N: SyncFamily, B: Backend<N>> Side<N, B> {
    /// A side whose backend is set up (`device`); `host` is what its pod routes must not
    /// capture.
    pub fn new(backend: B, device: DeviceInfo, local: LocalNodeOf<N>, host: HostNetsOf<N>) -> Self {
        Side {
            backend,
            device,
            local,
            sync: SyncOf::new(host),
        }
    }

    /// This family's peer events.
    pub async fn on_events(&mut self, batch: Vec<PeerEvent>, shared: &Shared) {
        self.sync
            .handle_events(
                &mut self.backend,
                &mut self.device,
                &self.local,
                batch,
                shared,
            )
            .await;
    }

    /// A full reconcile, once the peers have been listed (before that there is nothing to
    /// compare the kernel with).
    pub async fn reconcile(&mut self, why: &str, shared: &Shared) {
        if self.sync.listed {
            self.sync
                .reconcile(
                    &mut self.backend,
                    &mut self.device,
                    &self.local,
                    shared,
                    why,
                )
                .await;
        }
    }

    /// The device (again, e.g. after our subnet or address moved or someone deleted it), then
    /// the underlay's networks as they are now. The last device is kept if setup fails (it
    /// is retried at the next event or resync).
    pub async fn setup(&mut self, nl: &Netlink, underlay_name: &str) {
        self.device = setup_or_log(&mut self.backend, &self.local, self.device.clone()).await;
        match nl.addr_prefixes::<N>(self.local.underlay_index).await {
            Ok(underlay) => {
                let mut host = self.sync.host().clone();
                host.public_ip = Some(self.local.public_ip);
                host.underlay = underlay;
                host.underlay_name = underlay_name.to_string();
                self.sync.set_host(host);
            }
            Err(e) => {
                warn!(family = N::FAMILY, error = %e, "reading the underlay's networks failed; keeping the last known")
            }
        }
    }

    /// What kernel events must follow for this side.
    pub fn watched(&self) -> Watched {
        Watched {
            ifindex: self.device.ifindex,
            overlay: self.device.overlay,
        }
    }
}

/// `backend.setup`, keeping `current` (and saying so) when it fails.
pub(super) async fn setup_or_log<N: SyncFamily, B: Backend<N>>(
    backend: &mut B,
    local: &LocalNodeOf<N>,
    current: DeviceInfo,
) -> DeviceInfo {
    match backend.setup(local).await {
        Ok(d) => d,
        Err(e) => {
            error!(family = N::FAMILY, error = %e, "setting up the backend's device failed; will retry");
            current
        }
    }
}

/// This node serves family N no more (or never did: a network without it): a device of an
/// earlier run named `device_prefix<VNI>` goes, and with it its routes and entries (peers'
/// subnets would otherwise stay routed into a dead overlay), and so do twill's routes of
/// family N on the underlay (host-gw's, DirectRouting's).
pub(super) async fn remove_leftovers<N: NlFamily>(
    nl: &Netlink,
    underlay_index: u32,
    device_prefix: &str,
) {
    let family = N::FAMILY;
    match nl.vxlan_devices().await {
        Ok(devices) => {
            for (index, name) in devices {
                if name.starts_with(device_prefix) {
                    info!(device = %name, family, "this node serves no such network: deleting the device of an earlier run");
                    if let Err(e) = nl.delete_link(index).await {
                        if !e.is_no_device() {
                            warn!(device = %name, error = %e, "deleting it failed");
                        }
                    }
                }
            }
        }
        Err(e) => {
            warn!(error = %e, family, "listing VXLAN devices failed; a device of an earlier run may stay")
        }
    }
    // Every route of the family with twill's protocol number is unwanted now.
    let mut routes = ProgrammerOf::<N>::new(nl.clone(), false);
    let direct = |_: &PeerOf<N>| PeerPath::ok(Path::Direct);
    match routes.reconcile(underlay_index, None, &[], direct).await {
        Ok(st) if st.removed > 0 => {
            info!(
                routes = st.removed,
                family,
                "this node serves no such network: removed twill's routes of an earlier run"
            )
        }
        Ok(_) => {}
        Err(e) => warn!(error = %e, family, "removing twill's routes of an earlier run failed"),
    }
}
