//! Command line of `twilld`. Every flag can also be set from the environment as
//! `TWILLD_<FLAG>` (e.g. `TWILLD_ETCD_ENDPOINTS`), so systemd units can use an env file.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

use crate::backend::offload::ChecksumOffload;
use crate::netlink::IfaceSelector;

#[derive(Debug, Parser)]
#[command(
    name = "twilld",
    version,
    about = "twill node daemon: leases this node's pod subnet (from etcd, or the Kubernetes API) and programs the overlay",
    long_about = "twilld runs on every node. It leases the node's pod subnet from etcd (flannel's \
layout, so flanneld nodes and twilld nodes can share a cluster), watches the other nodes' leases \
and programs a VXLAN device plus one neighbour, FDB and route entry per remote node, reconciling \
the kernel against etcd at start, on events and periodically. It also serves the `twill` CNI \
plugin on a Unix socket. With --kube-subnet-mgr the subnet is the Node's podCIDR and the peers \
are the other Nodes, read from the Kubernetes API (flannel's kube subnet manager).\n\nRun \
without a subcommand (or with `run`) to start the daemon.",
    args_conflicts_with_subcommands = true
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    #[command(flatten)]
    pub run: RunArgs,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the daemon (the default).
    Run(Box<RunArgs>),
    /// Print this node's lease and its peers, read from a running twilld's /status.
    Status(StatusArgs),
}

#[derive(Debug, Clone, Args)]
pub struct RunArgs {
    /// etcd endpoints, comma separated (http://host:2379 or https://...).
    #[arg(
        long,
        env = "TWILLD_ETCD_ENDPOINTS",
        value_delimiter = ',',
        default_value = "http://127.0.0.1:2379"
    )]
    pub etcd_endpoints: Vec<String>,
    /// etcd key prefix holding `config` and `subnets/` (flannel's default).
    #[arg(
        long,
        env = "TWILLD_ETCD_PREFIX",
        default_value = "/coreos.com/network"
    )]
    pub etcd_prefix: String,
    /// CA certificate to verify etcd's server certificate (enables TLS).
    #[arg(long, env = "TWILLD_ETCD_CAFILE")]
    pub etcd_cafile: Option<PathBuf>,
    /// Client certificate for etcd (with --etcd-keyfile).
    #[arg(long, env = "TWILLD_ETCD_CERTFILE", requires = "etcd_keyfile")]
    pub etcd_certfile: Option<PathBuf>,
    /// Client key for etcd (with --etcd-certfile).
    #[arg(long, env = "TWILLD_ETCD_KEYFILE", requires = "etcd_certfile")]
    pub etcd_keyfile: Option<PathBuf>,
    /// Underlay interface for VXLAN traffic, by name or by address (IPv4 or IPv6; that address
    /// is then the endpoint in its family). Default: the interface of the default route (the
    /// IPv6 one on an IPv6-only network).
    #[arg(long, env = "TWILLD_IFACE", value_parser = parse_iface)]
    pub iface: Option<IfaceSelector>,
    /// Address other nodes send VXLAN traffic to. Default: the underlay interface's address.
    #[arg(long, env = "TWILLD_PUBLIC_IP")]
    pub public_ip: Option<Ipv4Addr>,
    /// On a dual-stack network (EnableIPv6): the address other nodes send IPv6 pod traffic to
    /// (the IPv6 VXLAN endpoint; with host-gw, the next hop of their IPv6 routes). Default: the
    /// underlay interface's stable global IPv6 address (never a temporary one).
    #[arg(long, env = "TWILLD_PUBLIC_IPV6")]
    pub public_ipv6: Option<std::net::Ipv6Addr>,
    /// Where to write the subnet file (flannel's subnet.env format) once the node is ready. Its
    /// directory must be root's alone (owned by root, writable by nobody else).
    #[arg(
        long,
        env = "TWILLD_SUBNET_FILE",
        default_value = "/run/twill/subnet.env"
    )]
    pub subnet_file: PathBuf,
    /// Directory for state that must survive restarts and reboots (VTEP MAC, IP allocations).
    #[arg(long, env = "TWILLD_STATE_DIR", default_value = "/var/lib/twill")]
    pub state_dir: PathBuf,
    /// Lifetime of this node's lease in etcd; renewed long before it runs out (e.g. 24h, 90m,
    /// 60s). 10s to 365d.
    #[arg(long, env = "TWILLD_LEASE_TTL", default_value = "24h", value_parser = parse_lease_ttl)]
    pub lease_ttl: Duration,
    /// How often the kernel state is compared with the leases and repaired (e.g. 30s). 1s to 24h.
    #[arg(long, env = "TWILLD_RESYNC_INTERVAL", default_value = "30s", value_parser = parse_resync_interval)]
    pub resync_interval: Duration,
    /// How long listing the other nodes' leases may keep failing before /readyz says this node
    /// is not ready: meanwhile nodes joining or leaving go unseen.
    #[arg(long, env = "TWILLD_LEASE_LIST_GRACE", default_value = "2m", value_parser = parse_duration)]
    pub lease_list_grace: Duration,
    /// Address for /healthz, /readyz, /metrics and /status. While it is taken, twilld runs
    /// without it and retries binding.
    #[arg(long, env = "TWILLD_HTTP_ADDR", default_value = "127.0.0.1:9464")]
    pub http_addr: SocketAddr,
    /// Most HTTP connections open at once; more are closed at once (the endpoints are for local
    /// probes and scrapes). 1 to 4096.
    #[arg(long, env = "TWILLD_HTTP_MAX_CONNECTIONS", default_value_t = 64,
          value_parser = clap::value_parser!(u32).range(1..=4096))]
    pub http_max_connections: u32,
    /// How long an HTTP client may take to send a request's headers; a connection idle that
    /// long, before or between requests, is closed. 1s to 5m.
    #[arg(long, env = "TWILLD_HTTP_HEADER_TIMEOUT", default_value = "10s", value_parser = parse_http_header_timeout)]
    pub http_header_timeout: Duration,
    /// Unix socket the `twill` CNI plugin talks to. Its directory must be root's alone (owned
    /// by root, writable by nobody else).
    #[arg(long, env = "TWILLD_CNI_SOCKET", default_value = "/run/twill/cni.sock")]
    pub cni_socket: PathBuf,
    /// CNI requests served at once; more wait in the socket's backlog (each holds its decoded
    /// request, up to 16 times its 256 KiB frame). 1 to 1024.
    #[arg(long, env = "TWILLD_CNI_MAX_CONNECTIONS", default_value_t = 16,
          value_parser = clap::value_parser!(u32).range(1..=1024))]
    pub cni_max_connections: u32,
    /// Threads CNI operations run on at once (one per ADD, CHECK or DEL, each with its own
    /// netlink socket); more operations wait for one. 1 to 1024.
    #[arg(long, env = "TWILLD_CNI_MAX_THREADS", default_value_t = 32,
          value_parser = clap::value_parser!(u32).range(1..=1024))]
    pub cni_max_threads: u32,
    /// Bridge that pod veths attach to; created with the gateway address if missing.
    #[arg(long, env = "TWILLD_BRIDGE", default_value = "cni0")]
    pub bridge: String,
    /// host-local's data dir, as flannel's CNI plugin (bridge + host-local) used it. Addresses
    /// it reserved inside this node's subnets (IPv4 and IPv6) are never handed out, and DEL
    /// releases them, so a node moving from flannel keeps its running pods. Empty: ignore
    /// host-local.
    #[arg(
        long,
        env = "TWILLD_HOST_LOCAL_DIR",
        default_value = "/var/lib/cni/networks"
    )]
    pub host_local_dir: PathBuf,
    /// Transmit checksum offload on the VXLAN device. auto: off on kernels before 5.7, whose
    /// offload sends bad checksums once traffic is NATed (63 s TCP stalls: flannel #1268), else
    /// left on. off: also for an underlay behind NAT that corrupts them; costs throughput.
    #[arg(
        long,
        env = "TWILLD_VXLAN_CHECKSUM_OFFLOAD",
        value_enum,
        default_value = "auto"
    )]
    pub vxlan_checksum_offload: ChecksumOffload,
    /// The udp backend uses the kernel's offloads where it has them: segmentation offload on
    /// its TUN device, UDP GSO on sends and UDP GRO on receives, so one read, send or receive
    /// moves up to 64 KiB. false: one packet per read and write and one datagram per message,
    /// for a kernel or an underlay whose offloads misbehave; several times slower.
    #[arg(long, env = "TWILLD_UDP_OFFLOADS", default_value_t = true, num_args = 0..=1,
          default_missing_value = "true", action = clap::ArgAction::Set)]
    pub udp_offloads: bool,
    /// Masquerade pod traffic that leaves the pod network (to the node's address, with nftables
    /// in twill's own table `ip twill-masq`): pods reach the world. Pod-to-pod traffic, on any
    /// node, is never masqueraded. --ip-masq=false removes twill's masquerade rules.
    #[arg(long, env = "TWILLD_IP_MASQ", default_value_t = true, num_args = 0..=1,
          default_missing_value = "true", action = clap::ArgAction::Set)]
    pub ip_masq: bool,
    /// Masquerade with random source ports (`fully-random`), where the kernel has it: avoids
    /// SNAT port races (5 s DNS delays). false keeps ports where possible.
    #[arg(long, env = "TWILLD_IP_MASQ_RANDOM_FULLY", default_value_t = true, num_args = 0..=1,
          default_missing_value = "true", action = clap::ArgAction::Set)]
    pub ip_masq_random_fully: bool,
    /// The mark kube-proxy sets on packets it masquerades itself (its --iptables-masquerade-bit,
    /// default 14): twill leaves such packets to kube-proxy, matched under this mask.
    #[arg(long, env = "TWILLD_KUBE_PROXY_MASQ_MARK", default_value = "0x4000", value_parser = parse_mark)]
    pub kube_proxy_masq_mark: u32,
    /// Accept pod-network traffic (both families on a dual-stack network) at the top of other
    /// tools' forward chains that would drop it (iptables' and ip6tables' FORWARD with policy
    /// DROP, as Docker sets it; nftables forward chains with policy drop or a final reject, as
    /// firewalld has). false removes twill's accept rules.
    #[arg(long, env = "TWILLD_IPTABLES_FORWARD_RULES", default_value_t = true, num_args = 0..=1,
          default_missing_value = "true", action = clap::ArgAction::Set)]
    pub iptables_forward_rules: bool,
    /// Install a blackhole route for this node's subnet (behind the pod bridge's own route),
    /// so packets for pod addresses that are not in use are dropped here instead of following
    /// the default route out of the node.
    #[arg(long, env = "TWILLD_IP_BLACKHOLE_ROUTE", default_value_t = false, num_args = 0..=1,
          default_missing_value = "true", action = clap::ArgAction::Set)]
    pub ip_blackhole_route: bool,
    /// Enforce Kubernetes NetworkPolicy (networking.k8s.io/v1) on this node's pods, with
    /// nftables (table inet twill-policy). Policies, namespaces and pod records come from etcd
    /// (<prefix>/policies/, namespaces/, pods/), or from the API server with
    /// --kube-subnet-mgr. With no policies nothing is isolated. Pods may send only from
    /// their own addresses (table bridge twill-source). false removes both tables.
    #[arg(long, env = "TWILLD_NETWORK_POLICY", default_value_t = true, num_args = 0..=1,
          default_missing_value = "true", action = clap::ArgAction::Set)]
    pub network_policy: bool,
    /// Log connections network policy denies (rate limited, with pods' names). Counters per
    /// policy are always in /metrics.
    #[arg(long, env = "TWILLD_POLICY_LOG_DENIED", default_value_t = false, num_args = 0..=1,
          default_missing_value = "true", action = clap::ArgAction::Set)]
    pub policy_log_denied: bool,
    /// This node's name, as pods' spec.nodeName. Default: NODE_NAME from the environment, else
    /// the host name.
    #[arg(long, env = "TWILLD_NODE_NAME")]
    pub node_name: Option<String>,
    /// Kubernetes mode (flannel's flag): no etcd of twill's own; this node's subnet is its
    /// Node's spec.podCIDR(s), peers are the other Nodes carrying flannel's annotations, and the
    /// network config comes from --net-config-path. The --etcd-* flags are ignored.
    #[arg(long, env = "TWILLD_KUBE_SUBNET_MGR", default_value_t = false, num_args = 0..=1,
          default_missing_value = "true", action = clap::ArgAction::Set)]
    pub kube_subnet_mgr: bool,
    /// Kubernetes API server URL. With neither this nor --kubeconfig-file, twilld uses its pod's
    /// in-cluster config (service account token, KUBERNETES_SERVICE_HOST/PORT).
    #[arg(long, env = "TWILLD_KUBE_API_URL")]
    pub kube_api_url: Option<String>,
    /// kubeconfig file for the Kubernetes API (its current context).
    #[arg(long, env = "TWILLD_KUBECONFIG_FILE")]
    pub kubeconfig_file: Option<PathBuf>,
    /// Prefix of the Node annotations that carry each node's VTEP MAC, VNI and public IP
    /// (flannel's; keep it to share a cluster with flanneld nodes).
    #[arg(
        long,
        env = "TWILLD_KUBE_ANNOTATION_PREFIX",
        default_value = "flannel.alpha.coreos.com"
    )]
    pub kube_annotation_prefix: String,
    /// Kubernetes mode: the network config (flannel's net-conf.json, the same JSON as the etcd
    /// config key).
    #[arg(
        long,
        env = "TWILLD_NET_CONFIG_PATH",
        default_value = "/etc/kube-flannel/net-conf.json"
    )]
    pub net_config_path: PathBuf,
    /// Kubernetes mode: set this Node's NetworkUnavailable condition to False once the node is
    /// ready. false: leave it to another controller (a cloud route controller).
    #[arg(long, env = "TWILLD_SET_NODE_NETWORK_UNAVAILABLE", default_value_t = true, num_args = 0..=1,
          default_missing_value = "true", action = clap::ArgAction::Set)]
    pub set_node_network_unavailable: bool,
    /// Log format: text or json. Log level comes from RUST_LOG (default info).
    #[arg(long, env = "TWILLD_LOG_FORMAT", default_value = "text", value_parser = ["text", "json"])]
    pub log_format: String,
}

impl RunArgs {
    /// `--node-name`, else NODE_NAME, else the host name.
    pub fn node_name(&self) -> String {
        self.node_name
            .clone()
            .or_else(|| std::env::var("NODE_NAME").ok().filter(|s| !s.is_empty()))
            .or_else(|| nix::unistd::gethostname().ok()?.into_string().ok())
            .unwrap_or_else(|| "localhost".into())
    }
}

#[derive(Debug, Clone, Args)]
pub struct StatusArgs {
    /// The daemon's HTTP address.
    #[arg(long, env = "TWILLD_HTTP_ADDR", default_value = "127.0.0.1:9464")]
    pub http_addr: SocketAddr,
    /// Print the raw /status JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// A non-zero mark, hex (0x4000) or decimal.
fn parse_mark(s: &str) -> Result<u32, String> {
    let v = match s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        Some(h) => u32::from_str_radix(h, 16),
        None => s.parse(),
    }
    .map_err(|_| format!("{s:?} is not a mark (e.g. 0x4000)"))?;
    if v == 0 {
        return Err("the mark must not be 0".into());
    }
    Ok(v)
}

fn parse_iface(s: &str) -> Result<IfaceSelector, String> {
    if s.is_empty() {
        return Err("empty interface".into());
    }
    Ok(match s.parse::<std::net::IpAddr>() {
        Ok(ip) => IfaceSelector::Addr(ip),
        Err(_) => IfaceSelector::Name(s.to_string()),
    })
}

/// `90s`, `5m`, `24h`, `500ms`, `1h30m`; a bare number is seconds. Never zero; a value too
/// large for a `Duration` is an error, not a panic.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let total = if let Ok(n) = s.parse::<u64>() {
        Duration::from_secs(n)
    } else {
        parse_with_units(s)?
    };
    if total.is_zero() {
        return Err(format!("invalid duration {s:?}: must be greater than zero"));
    }
    Ok(total)
}

fn parse_with_units(s: &str) -> Result<Duration, String> {
    let too_large = || format!("invalid duration {s:?}: too large");
    let mut total = Duration::ZERO;
    let mut rest = s;
    while !rest.is_empty() {
        let digits = rest
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(rest.len());
        if digits == 0 {
            return Err(format!(
                "invalid duration {s:?}: expected e.g. 30s, 5m, 24h"
            ));
        }
        let n: u64 = rest[..digits].parse().map_err(|_| too_large())?;
        rest = &rest[digits..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit())
            .unwrap_or(rest.len());
        let unit = &rest[..unit_len];
        rest = &rest[unit_len..];
        let secs_per = match unit {
            "ms" => {
                total = total
                    .checked_add(Duration::from_millis(n))
                    .ok_or_else(too_large)?;
                continue;
            }
            "s" => 1,
            "m" => 60,
            "h" => 3600,
            "d" => 86400,
            _ => {
                return Err(format!(
                    "invalid duration {s:?}: unknown unit {unit:?} (use ms, s, m, h, d)"
                ))
            }
        };
        let part = n.checked_mul(secs_per).ok_or_else(too_large)?;
        total = total
            .checked_add(Duration::from_secs(part))
            .ok_or_else(too_large)?;
    }
    Ok(total)
}

/// A duration within `[min, max]`, both shown in the error.
fn parse_bounded(
    s: &str,
    min: Duration,
    max: Duration,
    shown: (&str, &str),
) -> Result<Duration, String> {
    let d = parse_duration(s)?;
    if d < min || d > max {
        return Err(format!(
            "{s:?} is out of range: must be between {} and {}",
            shown.0, shown.1
        ));
    }
    Ok(d)
}

/// A lease shorter than 10 s is lost on any hiccup; etcd refuses absurdly long ones.
fn parse_lease_ttl(s: &str) -> Result<Duration, String> {
    parse_bounded(
        s,
        Duration::from_secs(10),
        Duration::from_secs(365 * 86400),
        ("10s", "365d"),
    )
}

/// Probes send their headers at once; a minute is plenty even for a loaded node.
fn parse_http_header_timeout(s: &str) -> Result<Duration, String> {
    parse_bounded(
        s,
        Duration::from_secs(1),
        Duration::from_secs(300),
        ("1s", "5m"),
    )
}

/// A resync below 1 s would keep the node busy comparing; above a day repairs come too late.
fn parse_resync_interval(s: &str) -> Result<Duration, String> {
    parse_bounded(
        s,
        Duration::from_secs(1),
        Duration::from_secs(86400),
        ("1s", "24h"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("30s").unwrap(), Duration::from_secs(30));
        assert_eq!(parse_duration("24h").unwrap(), Duration::from_secs(86400));
        assert_eq!(parse_duration("1h30m").unwrap(), Duration::from_secs(5400));
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("45").unwrap(), Duration::from_secs(45));
        for bad in ["", "s", "10x", "0s", "-1s", "0", "0ms", "0h0m"] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
        // Values a Duration cannot hold (or whose product overflows u64) are errors, not panics.
        for huge in [
            "99999999999999999999",
            "99999999999999999999s",
            "5124095576030432h",
            "213503982334602d",
            "18446744073709551615s18446744073709551615s",
        ] {
            let e = parse_duration(huge).unwrap_err();
            assert!(e.contains("too large"), "{huge}: {e}");
        }
        assert_eq!(parse_duration("1000ms").unwrap(), Duration::from_secs(1));
    }

    #[test]
    fn intervals_and_ttls_are_bounded() {
        for bad in ["0", "0s", "500ms", "99999999999h", "25h"] {
            let e = Cli::try_parse_from(["twilld", "--resync-interval", bad]).unwrap_err();
            let msg = e.to_string();
            assert!(
                msg.contains("--resync-interval")
                    && (msg.contains("between 1s and 24h") || msg.contains("greater than zero")),
                "{bad}: {msg}"
            );
        }
        for bad in ["0", "9s", "9999ms", "366d", "99999999999h"] {
            let e = Cli::try_parse_from(["twilld", "--lease-ttl", bad]).unwrap_err();
            assert!(e.to_string().contains("--lease-ttl"), "{bad}: {e}");
        }
        let cli = Cli::try_parse_from(["twilld", "--resync-interval", "1s", "--lease-ttl", "10s"])
            .unwrap();
        assert_eq!(cli.run.resync_interval, Duration::from_secs(1));
        assert_eq!(cli.run.lease_ttl, Duration::from_secs(10));
        let cli =
            Cli::try_parse_from(["twilld", "--resync-interval", "24h", "--lease-ttl", "365d"])
                .unwrap();
        assert_eq!(cli.run.lease_ttl, Duration::from_secs(365 * 86400));
    }

    #[test]
    fn resource_limits_are_bounded() {
        for (flag, bad) in [
            ("--http-max-connections", "0"),
            ("--http-max-connections", "4097"),
            ("--cni-max-connections", "0"),
            ("--cni-max-threads", "0"),
            ("--cni-max-threads", "99999999999"),
            ("--http-header-timeout", "0"),
            ("--http-header-timeout", "500ms"),
            ("--http-header-timeout", "6m"),
        ] {
            let e = Cli::try_parse_from(["twilld", flag, bad]).unwrap_err();
            assert!(e.to_string().contains(flag), "{flag} {bad}: {e}");
        }
        let cli = Cli::try_parse_from([
            "twilld",
            "--http-max-connections",
            "1",
            "--http-header-timeout",
            "2s",
            "--cni-max-connections",
            "1024",
            "--cni-max-threads",
            "1",
        ])
        .unwrap();
        assert_eq!(
            (
                cli.run.http_max_connections,
                cli.run.http_header_timeout,
                cli.run.cni_max_connections,
                cli.run.cni_max_threads
            ),
            (1, Duration::from_secs(2), 1024, 1)
        );
    }

    #[test]
    fn defaults_and_env_names() {
        let cli = Cli::try_parse_from(["twilld"]).unwrap();
        assert!(cli.command.is_none());
        assert_eq!(cli.run.etcd_prefix, "/coreos.com/network");
        assert_eq!(cli.run.lease_ttl, Duration::from_secs(86400));
        assert_eq!(cli.run.resync_interval, Duration::from_secs(30));
        assert_eq!(cli.run.lease_list_grace, Duration::from_secs(120));
        assert_eq!(cli.run.http_addr.to_string(), "127.0.0.1:9464");
        assert_eq!(cli.run.bridge, "cni0");
        assert_eq!(cli.run.vxlan_checksum_offload, ChecksumOffload::Auto);
        assert!(cli.run.udp_offloads);
        let off = Cli::try_parse_from(["twilld", "--udp-offloads=false"]).unwrap();
        assert!(!off.run.udp_offloads);
        assert_eq!(cli.run.http_max_connections, 64);
        assert_eq!(cli.run.http_header_timeout, Duration::from_secs(10));
        assert_eq!(cli.run.cni_max_connections, 16);
        assert_eq!(cli.run.cni_max_threads, 32);
        let off = Cli::try_parse_from(["twilld", "--vxlan-checksum-offload", "off"]).unwrap();
        assert_eq!(off.run.vxlan_checksum_offload, ChecksumOffload::Off);
        assert!(Cli::try_parse_from(["twilld", "--vxlan-checksum-offload", "maybe"]).is_err());
        let cli = Cli::try_parse_from([
            "twilld",
            "--etcd-endpoints",
            "http://a:2379,http://b:2379",
            "--iface",
            "198.18.0.11",
        ])
        .unwrap();
        assert_eq!(
            cli.run.etcd_endpoints,
            vec!["http://a:2379", "http://b:2379"]
        );
        assert_eq!(
            cli.run.iface,
            Some(IfaceSelector::Addr("198.18.0.11".parse().unwrap()))
        );
        let cli = Cli::try_parse_from(["twilld", "--iface", "fd00:198:18::b"]).unwrap();
        assert_eq!(
            cli.run.iface,
            Some(IfaceSelector::Addr("fd00:198:18::b".parse().unwrap()))
        );
        let cli = Cli::try_parse_from(["twilld", "status", "--json"]).unwrap();
        assert!(matches!(
            cli.command,
            Some(Command::Status(StatusArgs { json: true, .. }))
        ));
        assert!(
            Cli::try_parse_from(["twilld", "--etcd-certfile", "/x"]).is_err(),
            "cert needs key"
        );
    }

    #[test]
    fn datapath_flags() {
        let cli = Cli::try_parse_from(["twilld"]).unwrap();
        assert!(cli.run.ip_masq && cli.run.ip_masq_random_fully && cli.run.iptables_forward_rules);
        assert!(!cli.run.ip_blackhole_route);
        assert_eq!(cli.run.kube_proxy_masq_mark, 0x4000);
        // flannel's spelling (`--ip-masq` alone) and the explicit forms.
        for (args, want) in [
            (vec!["--ip-masq"], true),
            (vec!["--ip-masq=false"], false),
            (vec!["--ip-masq", "false"], false),
        ] {
            let cli = Cli::try_parse_from(["twilld"].into_iter().chain(args)).unwrap();
            assert_eq!(cli.run.ip_masq, want);
        }
        let cli = Cli::try_parse_from([
            "twilld",
            "--ip-blackhole-route",
            "--kube-proxy-masq-mark",
            "32768",
        ])
        .unwrap();
        assert!(cli.run.ip_blackhole_route);
        assert_eq!(cli.run.kube_proxy_masq_mark, 0x8000);
        for bad in ["0", "0x", "nope"] {
            assert!(Cli::try_parse_from(["twilld", "--kube-proxy-masq-mark", bad]).is_err());
        }
    }
}
