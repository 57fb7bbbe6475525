//! The VXLAN backend. CONTRACT (owner: kernel helper).

use crate::config::BackendConfig;
use crate::netlink::Netlink;

pub struct VxlanBackend {}

impl VxlanBackend {
    pub fn new(_nl: Netlink, _cfg: &BackendConfig) -> Self {
        todo!()
    }
}
