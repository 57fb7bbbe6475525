//! The node's firewall as the daemon runs it: what it should hold (from the flags, the network
//! config and the backend's device), applying that, checking it, and reporting.

use std::sync::atomic::Ordering::Relaxed;
use std::time::Instant;

use tracing::{error, info, warn};

use super::status::{FirewallStatus, Shared};
use crate::backend::DeviceInfo;
use crate::cli::RunArgs;
use crate::config::NetworkConfig;
use crate::firewall::{Desired, Firewall, FirewallError, NftFirewall, Pass};
use crate::masq::{self, MasqSpec};
use crate::metrics::Metrics;
use crate::nft::model::Family;
use crate::nft::Nft;

fn not_installed() -> Pass {
    Pass {
        report: Default::default(),
        error: Some(FirewallError::Forward(crate::nft::NftError::NotInstalled)),
    }
}

/// Desired firewall state for this node (`device`, `device6`: each family's overlay device,
/// when the node serves that family). Pure.
pub fn desired(
    args: &RunArgs,
    cfg: &NetworkConfig,
    device: Option<&DeviceInfo>,
    device6: Option<&DeviceInfo>,
    random_fully: bool,
) -> Desired {
    let spec = |network: ipnet::IpNet, dev: &DeviceInfo| MasqSpec {
        network,
        random_fully,
        kube_proxy_mark: args.kube_proxy_masq_mark,
        tunnel_device: dev.overlay.then(|| dev.name.clone()),
    };
    let masq = match (&cfg.ipv4, device) {
        (Some(r), Some(d)) if args.ip_masq => Some(masq::table(&spec(r.network.into(), d))),
        _ => None,
    };
    let masq6 = match (&cfg.ipv6, device6) {
        (Some(r), Some(d)) if args.ip_masq => Some(masq::table(&spec(r.network.into(), d))),
        _ => None,
    };
    Desired {
        tables: [
            ((Family::Ip, masq::TABLE.to_string()), masq),
            // Named when absent too: a table of an earlier run is removed.
            ((Family::Ip6, masq::TABLE6.to_string()), masq6),
        ]
        .into(),
        forward_accept: if args.iptables_forward_rules {
            let v6 = match (&cfg.ipv6, device6) {
                (Some(r), Some(_)) => Some(r.network.into()),
                _ => None,
            };
            let v4 = match (&cfg.ipv4, device) {
                (Some(r), Some(_)) => Some(r.network.into()),
                _ => None,
            };
            v4.into_iter().chain(v6).collect()
        } else {
            Vec::new()
        },
    }
}

pub struct NodeFirewall {
    fw: Option<NftFirewall>,
    nft: Option<Nft>,
    /// `fully-random` works here (checked once against the kernel).
    random_fully: bool,
    want: Option<Desired>,
    status: FirewallStatus,
    last_error_log: Option<Instant>,
}

impl NodeFirewall {
    /// Finds nft and checks what the kernel supports. Without nft the daemon still runs (the
    /// overlay does not need it); /status and the log say what is missing.
    pub async fn new(args: &RunArgs) -> Self {
        let nft = match Nft::find() {
            Ok(n) => Some(n),
            Err(e) => {
                error!(error = %e, "masquerade and forward rules are unavailable");
                None
            }
        };
        let mut random_fully = false;
        if let (Some(n), true) = (&nft, args.ip_masq_random_fully) {
            random_fully = n
                .accepts(
                    "add table ip twill-probe\n\
                     add chain ip twill-probe p { type nat hook postrouting priority 100; }\n\
                     add rule ip twill-probe p masquerade fully-random\n",
                )
                .await;
            if !random_fully {
                warn!("this kernel or nft has no fully-random masquerade; masquerading without it");
            }
        }
        NodeFirewall {
            fw: nft.clone().map(NftFirewall::new),
            nft,
            random_fully,
            want: None,
            status: FirewallStatus {
                ip_masq: args.ip_masq,
                random_fully,
                forward_rules: args.iptables_forward_rules,
                error: None,
                ..Default::default()
            },
            last_error_log: None,
        }
    }

    pub fn nft(&self) -> Option<&Nft> {
        self.nft.as_ref()
    }

    /// Applies the firewall for this node (called when it is ready, and when the device or
    /// the config it depends on changed).
    pub async fn apply(
        &mut self,
        args: &RunArgs,
        cfg: &NetworkConfig,
        device: Option<&DeviceInfo>,
        device6: Option<&DeviceInfo>,
        shared: &Shared,
    ) {
        let want = desired(args, cfg, device, device6, self.random_fully);
        let pass = match &mut self.fw {
            Some(fw) => fw.apply(&want).await,
            None => not_installed(),
        };
        if self.want.as_ref() != Some(&want) && pass.error.is_none() {
            info!(
                ip_masq = args.ip_masq,
                random_fully = self.random_fully,
                forward_rules = args.iptables_forward_rules,
                "firewall rules in place"
            );
        }
        self.want = Some(want);
        self.finish("apply", pass, shared);
    }

    /// Compares the kernel with the last apply and restores what someone else changed.
    pub async fn check(&mut self, shared: &Shared) {
        if self.want.is_none() {
            return;
        }
        let pass = match &mut self.fw {
            Some(fw) => fw.check().await,
            None => not_installed(),
        };
        self.finish("check", pass, shared);
    }

    fn finish(&mut self, what: &str, pass: Pass, shared: &Shared) {
        let m = &shared.metrics;
        let r = pass.report;
        if !r.restored.is_empty() {
            warn!(tables = ?r.restored, "restored twill's nftables tables after someone else changed them");
            m.nft_restores.fetch_add(r.restored.len() as u64, Relaxed);
            self.status.restores += r.restored.len() as u64;
        }
        if !r.forward_added.is_empty() {
            info!(chains = ?r.forward_added, "pod network accepted ahead of other tools' forward drops");
            m.forward_rules_added
                .fetch_add(r.forward_added.len() as u64, Relaxed);
        }
        match pass.error {
            None => {
                self.status.forward_chains = r.forward_chains;
                self.status.error = None;
                m.masq_rules_ok
                    .store(u64::from(self.status.ip_masq), Relaxed);
            }
            Some(e) => {
                Metrics::inc(&m.firewall_errors);
                m.masq_rules_ok.store(0, Relaxed);
                // Once a minute at most: a missing nft fails every resync.
                if self
                    .last_error_log
                    .is_none_or(|t| t.elapsed().as_secs() >= 60)
                {
                    error!(error = %e, "firewall {what} failed; retrying at the next resync");
                    self.last_error_log = Some(Instant::now());
                }
                self.status.error = Some(e.to_string());
            }
        }
        let st = self.status.clone();
        shared.update(|s| s.firewall = Some(st));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::firewall::Report;
    use clap::Parser;

    fn args(extra: &[&str]) -> RunArgs {
        crate::cli::Cli::try_parse_from(["twilld"].iter().chain(extra))
            .unwrap()
            .run
    }

    fn device(overlay: bool) -> DeviceInfo {
        DeviceInfo {
            name: if overlay { "twill.1" } else { "eth0" }.into(),
            ifindex: 3,
            mtu: 1450,
            tx_checksum: None,
            overlay,
        }
    }

    fn cfg() -> NetworkConfig {
        NetworkConfig::parse(br#"{"Network":"10.244.0.0/16"}"#).unwrap()
    }

    #[test]
    fn masquerade_and_forward_rules_follow_the_flags() {
        let key = (Family::Ip, masq::TABLE.to_string());
        let d = desired(&args(&[]), &cfg(), Some(&device(true)), None, true);
        let t = d.tables[&key].as_ref().expect("masquerade on by default");
        // No IPv6 side: its table is named, to be removed.
        assert_eq!(
            d.tables.get(&(Family::Ip6, masq::TABLE6.to_string())),
            Some(&None)
        );
        assert!(t.chains["postrouting"]
            .rules
            .iter()
            .any(|r| r.starts_with("oifname \"twill.1\"")));
        assert_eq!(d.forward_accept, vec![cfg().ipv4.unwrap().network.into()]);

        // Off: the table is still named, to be removed.
        let d = desired(
            &args(&["--ip-masq=false", "--iptables-forward-rules=false"]),
            &cfg(),
            Some(&device(false)),
            None,
            true,
        );
        assert_eq!(d.tables.get(&key), Some(&None));
        assert!(d.forward_accept.is_empty());

        // host-gw: no tunnel rule.
        let d = desired(&args(&[]), &cfg(), Some(&device(false)), None, false);
        let t = d.tables[&key].as_ref().unwrap();
        assert!(!t.chains["postrouting"]
            .rules
            .iter()
            .any(|r| r.contains("oifname")));
        assert_eq!(t.chains["postrouting"].rules.last().unwrap(), "masquerade");
    }

    /// A node serving a dual-stack network's IPv6 side masquerades and accepts its IPv6 pod
    /// network too; without the IPv6 side (no device) only the IPv4 one.
    #[test]
    fn the_ipv6_side_gets_its_masquerade_table_and_forward_accepts() {
        let cfg = NetworkConfig::parse(
            br#"{"Network":"10.244.0.0/16","EnableIPv6":true,"IPv6Network":"fd00:10:244::/56"}"#,
        )
        .unwrap();
        let v4: ipnet::IpNet = "10.244.0.0/16".parse().unwrap();
        let v6: ipnet::IpNet = "fd00:10:244::/56".parse().unwrap();
        let key4 = (Family::Ip, masq::TABLE.to_string());
        let key6 = (Family::Ip6, masq::TABLE6.to_string());
        let d = desired(
            &args(&[]),
            &cfg,
            Some(&device(true)),
            Some(&device(true)),
            true,
        );
        assert_eq!(d.forward_accept, vec![v4, v6]);
        assert!(d.tables[&key6].is_some());
        let d = desired(&args(&[]), &cfg, Some(&device(true)), None, true);
        assert_eq!(d.forward_accept, vec![v4]);
        assert_eq!(d.tables.get(&key6), Some(&None));
        let d = desired(
            &args(&["--iptables-forward-rules=false"]),
            &cfg,
            Some(&device(true)),
            Some(&device(true)),
            true,
        );
        assert!(d.forward_accept.is_empty());
        // IPv6-only: no IPv4 masquerade table (one of an earlier run is removed), and only the
        // IPv6 network is accepted for forwarding.
        let only6 = NetworkConfig::parse(
            br#"{"EnableIPv4":false,"EnableIPv6":true,"IPv6Network":"fd00:10:244::/56"}"#,
        )
        .unwrap();
        let d = desired(
            &args(&[]),
            &only6,
            Some(&device(true)),
            Some(&device(true)),
            true,
        );
        assert_eq!(d.forward_accept, vec![v6]);
        assert_eq!(d.tables.get(&key4), Some(&None));
        assert!(d.tables[&key6].is_some());
    }

    /// A check that restored a table and then failed on the forward rules still counts the
    /// restore (it happened: the table is back), and reports the failure.
    #[test]
    fn a_restore_counts_even_when_the_rest_of_the_pass_failed() {
        let shared = Shared::default();
        let mut fw = NodeFirewall {
            fw: None,
            nft: None,
            random_fully: false,
            want: None,
            status: FirewallStatus {
                ip_masq: true,
                ..Default::default()
            },
            last_error_log: None,
        };
        let pass = Pass {
            report: Report {
                restored: vec!["ip twill-masq".into()],
                ..Default::default()
            },
            error: Some(FirewallError::Forward(crate::nft::NftError::Timeout(
                std::time::Duration::from_secs(5),
            ))),
        };
        fw.finish("check", pass, &shared);
        let m = &shared.metrics;
        assert_eq!(m.nft_restores.load(Relaxed), 1);
        assert_eq!(m.firewall_errors.load(Relaxed), 1);
        assert_eq!(m.masq_rules_ok.load(Relaxed), 0);
        let st = shared.snapshot().firewall.unwrap();
        assert_eq!(st.restores, 1);
        assert!(st.error.unwrap().contains("forward rules"));
    }
}
