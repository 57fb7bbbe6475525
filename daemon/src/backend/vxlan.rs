//! The VXLAN backend. CONTRACT (owner: kernel helper).

use crate::config::BackendConfig;
use crate::netlink::Netlink;

pub struct VxlanBackend {}

impl VxlanBackend {
    pub fn new(_nl: Netlink, _cfg: &BackendConfig) -> Self {
        todo!()
    }
}
impl crate::backend::Backend for VxlanBackend {
    async fn setup(
        &mut self,
        _l: &crate::backend::LocalNode,
    ) -> Result<crate::backend::DeviceInfo, crate::backend::BackendError> {
        todo!()
    }
    async fn apply(
        &mut self,
        _c: &[crate::reconcile::PeerChange],
    ) -> Result<crate::backend::ApplyStats, crate::backend::BackendError> {
        todo!()
    }
    async fn reconcile(
        &mut self,
        _d: &[crate::peer::Peer],
    ) -> Result<crate::backend::ApplyStats, crate::backend::BackendError> {
        todo!()
    }
}
