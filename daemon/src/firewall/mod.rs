//! The firewall concern: twill's own nftables tables (masquerade now, network policy next), and
//! accept rules for pod traffic in other tools' forward chains that would drop it. `Firewall`
//! is the trait the daemon talks to; `NftFirewall` implements it with the nft writer.

pub mod forward;

use std::collections::BTreeMap;

use ipnet::IpNet;
use serde::Serialize;

use crate::nft::model::{Family, Table};
use crate::nft::{Check, Nft, NftError, TableWriter};

#[derive(Debug, thiserror::Error)]
pub enum FirewallError {
    #[error("table {table}: {err}")]
    Table { table: String, err: NftError },
    #[error("forward rules: {0}")]
    Forward(NftError),
}

/// What twill wants in the firewall.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Desired {
    /// Tables by (family, name). A name mapped to None is removed (a feature turned off must
    /// not leave its rules behind, also from an earlier run).
    pub tables: BTreeMap<(Family, String), Option<Table>>,
    /// Networks (of either family) to accept in other tools' forward chains that would drop
    /// them; empty removes the rules twill put there.
    pub forward_accept: Vec<IpNet>,
}

/// What a pass found and did.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Report {
    /// Tables that had been changed by someone else and were put back.
    pub restored: Vec<String>,
    /// Accept rules added to other tools' chains, as `family table chain`.
    pub forward_added: Vec<String>,
    /// Other tools' forward chains that would drop pod traffic and now accept it first.
    pub forward_chains: Vec<String>,
}

/// One pass: what it did, and the first thing that failed. A failure does not end the pass
/// (the other tables and the forward rules are still done), so what was done is reported also
/// when something failed: a table restored is a restore even if the forward rules then failed.
#[derive(Debug, Default)]
pub struct Pass {
    pub report: Report,
    pub error: Option<FirewallError>,
}

impl Pass {
    fn fail(&mut self, e: FirewallError) {
        self.error.get_or_insert(e);
    }
}

#[allow(async_fn_in_trait)]
pub trait Firewall: Send {
    /// Makes the kernel hold `desired`; each table changes in one transaction.
    async fn apply(&mut self, desired: &Desired) -> Pass;
    /// Compares the kernel with the last `apply` and repairs what someone else changed.
    async fn check(&mut self) -> Pass;
}

pub struct NftFirewall {
    nft: Nft,
    writers: BTreeMap<(Family, String), TableWriter>,
    desired: Desired,
    forward: forward::ForwardAccept,
}

impl NftFirewall {
    pub fn new(nft: Nft) -> Self {
        NftFirewall {
            forward: forward::ForwardAccept::new(nft.clone()),
            nft,
            writers: BTreeMap::new(),
            desired: Desired::default(),
        }
    }

    fn writer(&mut self, key: &(Family, String)) -> &mut TableWriter {
        let nft = self.nft.clone();
        self.writers
            .entry(key.clone())
            .or_insert_with(|| TableWriter::new(nft))
    }

    async fn sync_forward(&mut self, pass: &mut Pass) {
        let (f, error) = self.forward.ensure(&self.desired.forward_accept).await;
        pass.report.forward_added = f.added;
        pass.report.forward_chains = f.chains;
        if let Some(e) = error {
            pass.fail(FirewallError::Forward(e));
        }
    }
}

impl Firewall for NftFirewall {
    async fn apply(&mut self, desired: &Desired) -> Pass {
        self.desired = desired.clone();
        let mut pass = Pass::default();
        for (key, table) in &desired.tables {
            let w = self.writer(key);
            let res = match table {
                Some(t) => w.apply(t).await,
                None => w.remove(key.0, &key.1).await,
            };
            if let Err(err) = res {
                pass.fail(FirewallError::Table {
                    table: format!("{} {}", key.0, key.1),
                    err,
                });
            }
        }
        self.sync_forward(&mut pass).await;
        pass
    }

    async fn check(&mut self) -> Pass {
        let mut pass = Pass::default();
        let keys: Vec<_> = self.writers.keys().cloned().collect();
        for key in keys {
            let want = self.desired.tables.get(&key).cloned().flatten();
            let w = self.writer(&key);
            // A table that failed to apply has nothing to compare with: apply it again.
            let res = match (&want, w.applied()) {
                (Some(t), None) => w.apply(t).await.map(|()| Check::Restored),
                _ => w.check().await,
            };
            match res {
                Ok(Check::Restored) => pass.report.restored.push(format!("{} {}", key.0, key.1)),
                Ok(_) => {}
                Err(err) => pass.fail(FirewallError::Table {
                    table: format!("{} {}", key.0, key.1),
                    err,
                }),
            }
        }
        self.sync_forward(&mut pass).await;
        pass
    }
}
