//! Counters and gauges, rendered in the Prometheus text format on /metrics.
//! Plain atomics: a handful of values does not need a metrics framework.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

#[derive(Debug, Default)]
pub struct Metrics {
    /// The udp backend's packet path (zero with the other backends).
    pub udp: std::sync::Arc<crate::backend::udp::datapath::Stats>,
    pub peers: AtomicU64,
    /// The same three for the IPv6 peers of a dual-stack node.
    pub peers6: AtomicU64,
    pub peers6_unreachable: AtomicU64,
    pub peers6_refused_overlap: AtomicU64,
    pub kernel_entries_added: AtomicU64,
    pub kernel_entries_removed: AtomicU64,
    pub kernel_entry_failures: AtomicU64,
    pub etcd_reconnects: AtomicU64,
    /// Kubernetes mode: failed API requests and broken watches.
    pub kube_api_errors: AtomicU64,
    pub peer_resyncs: AtomicU64,
    pub invalid_leases_skipped: AtomicU64,
    pub lease_renewals: AtomicU64,
    pub lease_reacquisitions: AtomicU64,
    pub reconciles: AtomicU64,
    /// Duration of the last full reconcile, microseconds.
    pub last_reconcile_micros: AtomicU64,
    /// Sum of full reconcile durations, microseconds.
    pub reconcile_micros_total: AtomicU64,
    pub cni_requests: AtomicU64,
    pub cni_errors: AtomicU64,
    /// Peers no path reaches (host-gw across subnets).
    pub peers_unreachable: AtomicU64,
    /// twill's nftables tables put back after someone else changed or removed them.
    pub nft_restores: AtomicU64,
    /// Firewall passes (apply or check) that failed.
    pub firewall_errors: AtomicU64,
    /// Accept rules added to other tools' forward chains.
    pub forward_rules_added: AtomicU64,
    /// 1 while the masquerade rules are known to be in the kernel as wanted.
    pub masq_rules_ok: AtomicU64,
    /// Network policy programs applied (any way), and those done with netlink elements only.
    pub policy_syncs: AtomicU64,
    pub policy_fast_syncs: AtomicU64,
    pub policy_errors: AtomicU64,
    /// Policies, namespaces and pod records skipped as invalid.
    pub policy_invalid_objects: AtomicU64,
    /// This node's pod records waiting to be written to etcd.
    pub policy_records_pending: AtomicU64,
    /// Denied connections logged (--policy-log-denied).
    pub policy_denied_logged: AtomicU64,
    /// Dropped packets and bytes per policy and direction, as last read from the kernel.
    pub policy_denied: std::sync::RwLock<Vec<crate::policy::Denied>>,
    /// Lease values over the size limit, dropped unread.
    pub oversized_leases_dropped: AtomicU64,
    /// Keys for a subnet that another key for it outranks (aliases).
    pub lease_alias_conflicts: AtomicU64,
    /// Leases (Nodes) skipped because an older lease (a Node seen first) announces their VTEP
    /// MAC at another address.
    pub duplicate_vtep_macs: AtomicU64,
    /// Peers whose subnet would cover this node's own addresses: not routed.
    pub peers_refused_overlap: AtomicU64,
    pub policy_ports_cut_off: AtomicU64,
    /// CNI connections being served (at most --cni-max-connections).
    pub cni_connections: AtomicU64,
    /// Times every CNI connection slot was taken (further clients wait in the backlog).
    pub cni_connections_at_limit: AtomicU64,
    /// Threads CNI operations run on right now (at most --cni-max-threads).
    pub cni_threads: AtomicU64,
    /// CNI operations that waited for a thread.
    pub cni_thread_waits: AtomicU64,
    /// HTTP connections open (at most --http-max-connections).
    pub http_connections: AtomicU64,
    /// HTTP connections closed at once because every slot was taken.
    pub http_connections_refused: AtomicU64,
}

/// Holds a gauge up by one while it lives.
#[derive(Debug)]
pub struct GaugeGuard<'a>(&'a AtomicU64);

impl<'a> GaugeGuard<'a> {
    pub fn new(g: &'a AtomicU64) -> Self {
        g.fetch_add(1, Relaxed);
        GaugeGuard(g)
    }
}

impl Drop for GaugeGuard<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Relaxed);
    }
}

impl Metrics {
    pub fn inc(c: &AtomicU64) {
        c.fetch_add(1, Relaxed);
    }

    pub fn render(&self) -> String {
        let mut out = String::new();
        let mut metric = |name: &str, kind: &str, help: &str, v: f64| {
            let _ = writeln!(out, "# HELP twill_{name} {help}");
            let _ = writeln!(out, "# TYPE twill_{name} {kind}");
            let _ = writeln!(out, "twill_{name} {v}");
        };
        let g = |c: &AtomicU64| c.load(Relaxed) as f64;
        metric(
            "peers",
            "gauge",
            "Remote nodes with a valid lease.",
            g(&self.peers),
        );
        metric(
            "ipv6_peers",
            "gauge",
            "Remote nodes with a valid IPv6 lease side (dual-stack nodes).",
            g(&self.peers6),
        );
        metric(
            "ipv6_peers_unreachable",
            "gauge",
            "Remote nodes whose IPv6 side no path reaches.",
            g(&self.peers6_unreachable),
        );
        metric(
            "ipv6_peers_refused_overlap",
            "gauge",
            "Remote nodes whose IPv6 subnet is not routed: it covers this node's own networks.",
            g(&self.peers6_refused_overlap),
        );
        metric(
            "kernel_entries_added_total",
            "counter",
            "Neighbour, FDB and route entries added or replaced.",
            g(&self.kernel_entries_added),
        );
        metric(
            "kernel_entries_removed_total",
            "counter",
            "Neighbour, FDB and route entries removed.",
            g(&self.kernel_entries_removed),
        );
        metric(
            "kernel_entry_failures_total",
            "counter",
            "Kernel entry operations that failed.",
            g(&self.kernel_entry_failures),
        );
        metric(
            "etcd_reconnects_total",
            "counter",
            "Times the etcd watch or lease keeper had to reconnect.",
            g(&self.etcd_reconnects),
        );
        metric(
            "kube_api_errors_total",
            "counter",
            "Kubernetes mode: failed API requests and broken watches (each retried).",
            g(&self.kube_api_errors),
        );
        metric(
            "peer_resyncs_total",
            "counter",
            "Full re-lists of the subnet leases.",
            g(&self.peer_resyncs),
        );
        metric(
            "invalid_leases_skipped_total",
            "counter",
            "Leases of other nodes skipped as invalid.",
            g(&self.invalid_leases_skipped),
        );
        metric(
            "lease_renewals_total",
            "counter",
            "Renewals of this node's etcd lease.",
            g(&self.lease_renewals),
        );
        metric(
            "lease_reacquisitions_total",
            "counter",
            "Times this node's lease was lost and acquired again.",
            g(&self.lease_reacquisitions),
        );
        metric(
            "reconciles_total",
            "counter",
            "Full reconciles of kernel state against leases.",
            g(&self.reconciles),
        );
        metric(
            "reconcile_duration_seconds",
            "gauge",
            "Duration of the last full reconcile.",
            g(&self.last_reconcile_micros) / 1e6,
        );
        metric(
            "reconcile_duration_seconds_total",
            "counter",
            "Total time spent in full reconciles.",
            g(&self.reconcile_micros_total) / 1e6,
        );
        metric(
            "cni_requests_total",
            "counter",
            "CNI requests served.",
            g(&self.cni_requests),
        );
        metric(
            "cni_errors_total",
            "counter",
            "CNI requests answered with an error.",
            g(&self.cni_errors),
        );
        metric(
            "peers_unreachable",
            "gauge",
            "Remote nodes no path reaches (e.g. host-gw peers outside this node's segment).",
            g(&self.peers_unreachable),
        );
        metric(
            "nft_restores_total",
            "counter",
            "Times a twill nftables table was restored after someone else changed or removed it.",
            g(&self.nft_restores),
        );
        metric(
            "firewall_errors_total",
            "counter",
            "Firewall updates or checks that failed (retried at the next resync).",
            g(&self.firewall_errors),
        );
        metric(
            "forward_rules_added_total",
            "counter",
            "Pod-network accept rules added to other tools' forward chains that drop.",
            g(&self.forward_rules_added),
        );
        metric(
            "masq_rules_ok",
            "gauge",
            "1 when the masquerade rules are in the kernel as wanted (0 also when --ip-masq=false).",
            g(&self.masq_rules_ok),
        );
        metric(
            "policy_syncs_total",
            "counter",
            "Network policy programs applied to the kernel.",
            g(&self.policy_syncs),
        );
        metric(
            "policy_fast_syncs_total",
            "counter",
            "Network policy changes applied as netlink element updates only (no nft run).",
            g(&self.policy_fast_syncs),
        );
        metric(
            "policy_errors_total",
            "counter",
            "Network policy programs the kernel refused (retried at the next resync).",
            g(&self.policy_errors),
        );
        metric(
            "policy_invalid_objects_total",
            "counter",
            "Policies, namespaces and pod records skipped as invalid.",
            g(&self.policy_invalid_objects),
        );
        metric(
            "policy_denied_logged_total",
            "counter",
            "Connections logged as denied by network policy (--policy-log-denied).",
            g(&self.policy_denied_logged),
        );
        metric(
            "policy_records_pending",
            "gauge",
            "This node's pod records not yet written to etcd.",
            g(&self.policy_records_pending),
        );
        metric(
            "oversized_leases_dropped_total",
            "counter",
            "Lease values over 64 KiB, dropped without being kept.",
            g(&self.oversized_leases_dropped),
        );
        metric(
            "lease_alias_conflicts_total",
            "counter",
            "Subnet keys ignored because another key for the same subnet outranks them.",
            g(&self.lease_alias_conflicts),
        );
        metric(
            "duplicate_vtep_macs_total",
            "counter",
            "Leases (in Kubernetes mode, Nodes) skipped because an older lease (a Node seen first) announces their VTEP MAC at another address.",
            g(&self.duplicate_vtep_macs),
        );
        metric(
            "peers_refused_overlap",
            "gauge",
            "Peers not routed because their subnet covers this node's underlay, public IP, an etcd \
             endpoint or a node's public IP.",
            g(&self.peers_refused_overlap),
        );
        metric(
            "policy_ports_cut_off",
            "gauge",
            "Pod ports cut off because the pod's record in the state dir could not be read (its \
             policies are unknown) until the pod is deleted or added again.",
            g(&self.policy_ports_cut_off),
        );
        metric(
            "cni_connections",
            "gauge",
            "CNI connections being served (at most --cni-max-connections).",
            g(&self.cni_connections),
        );
        metric(
            "cni_connections_at_limit_total",
            "counter",
            "Times every CNI connection slot was taken; more clients wait in the socket's backlog.",
            g(&self.cni_connections_at_limit),
        );
        metric(
            "cni_threads",
            "gauge",
            "Threads CNI operations (ADD, CHECK, DEL, GC) run on (at most --cni-max-threads).",
            g(&self.cni_threads),
        );
        metric(
            "cni_thread_waits_total",
            "counter",
            "CNI operations that waited for a thread (--cni-max-threads reached).",
            g(&self.cni_thread_waits),
        );
        metric(
            "http_connections",
            "gauge",
            "HTTP connections open (at most --http-max-connections).",
            g(&self.http_connections),
        );
        metric(
            "http_connections_refused_total",
            "counter",
            "HTTP connections closed at once because --http-max-connections were open.",
            g(&self.http_connections_refused),
        );
        let u = &self.udp;
        for (name, help, pairs) in [
            (
                "udp_packets_total",
                "udp backend: packets through the TUN device, per direction (out: to peers).",
                [("out", &u.tx_packets), ("in", &u.rx_packets)],
            ),
            (
                "udp_bytes_total",
                "udp backend: bytes of those packets, per direction.",
                [("out", &u.tx_bytes), ("in", &u.rx_bytes)],
            ),
            (
                "udp_batches_total",
                "udp backend: TUN reads (out) and recvmmsg calls (in) that moved packets.",
                [("out", &u.tx_batches), ("in", &u.rx_batches)],
            ),
            (
                "udp_batched_packets_total",
                "udp backend: packets those moved; divided by the batches, the mean batch size.",
                [("out", &u.tx_batched), ("in", &u.rx_batched)],
            ),
            (
                "udp_messages_total",
                "udp backend: UDP messages sent to and received from the kernel; with UDP GSO \
                 and GRO one message carries many datagrams (udp_packets_total divided by \
                 this: the mean).",
                [("out", &u.tx_messages), ("in", &u.rx_messages)],
            ),
        ] {
            let _ = writeln!(out, "# HELP twill_{name} {help}");
            let _ = writeln!(out, "# TYPE twill_{name} counter");
            for (dir, c) in pairs {
                let _ = writeln!(out, "twill_{name}{{direction=\"{dir}\"}} {}", g(c));
            }
        }
        let _ = writeln!(
            out,
            "# HELP twill_udp_dropped_total udp backend: packets dropped, per reason."
        );
        let _ = writeln!(out, "# TYPE twill_udp_dropped_total counter");
        for (reason, c) in u.drops() {
            let _ = writeln!(
                out,
                "twill_udp_dropped_total{{reason=\"{reason}\"}} {}",
                g(c)
            );
        }
        let denied = self.policy_denied.read().unwrap_or_else(|e| e.into_inner());
        for (name, help, pick) in [
            (
                "policy_denied_packets_total",
                "Packets dropped for pods this policy isolates, per direction.",
                (|d: &crate::policy::Denied| d.packets) as fn(&crate::policy::Denied) -> u64,
            ),
            (
                "policy_denied_bytes_total",
                "Bytes dropped for pods this policy isolates, per direction.",
                |d: &crate::policy::Denied| d.bytes,
            ),
        ] {
            let _ = writeln!(out, "# HELP twill_{name} {help}");
            let _ = writeln!(out, "# TYPE twill_{name} counter");
            for d in denied.iter() {
                let _ = writeln!(
                    out,
                    "twill_{name}{{policy=\"{}\",direction=\"{}\"}} {}",
                    d.policy,
                    d.direction,
                    pick(d)
                );
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_prometheus_text() {
        let m = Metrics::default();
        m.peers.store(3, Relaxed);
        Metrics::inc(&m.etcd_reconnects);
        m.last_reconcile_micros.store(1500, Relaxed);
        let text = m.render();
        assert!(text.contains("# TYPE twill_peers gauge\ntwill_peers 3\n"));
        assert!(text.contains("twill_etcd_reconnects_total 1\n"));
        assert!(text.contains("twill_reconcile_duration_seconds 0.0015\n"));
    }
}
