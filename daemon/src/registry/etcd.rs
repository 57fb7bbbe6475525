//! etcd v3 implementation of `SubnetRegistry`. CONTRACT (owner: registry helper).

use super::{EtcdOptions, RegistryError};

#[derive(Clone)]
pub struct EtcdRegistry {}

impl EtcdRegistry {
    pub async fn connect(_opts: &EtcdOptions) -> Result<Self, RegistryError> {
        todo!()
    }

    /// Raw bytes of `<prefix>/config`, None while the key does not exist.
    pub async fn get_config(&self) -> Result<Option<Vec<u8>>, RegistryError> {
        todo!()
    }
}

impl super::SubnetRegistry for EtcdRegistry {}
