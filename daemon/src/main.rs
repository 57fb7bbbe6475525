//! `twilld`: the twill node daemon. See `twilld --help`.

use std::io::{IsTerminal, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::Parser;
use twill_daemon::cli::{Cli, Command, RunArgs, StatusArgs};

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Some(Command::Status(args)) => status(&args),
        Some(Command::Run(args)) => run(*args),
        None => run(cli.run),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("twilld: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: RunArgs) -> anyhow::Result<()> {
    init_logging(&args.log_format);
    // Two workers: the daemon is mostly idle, and a small footprint matters (flannel #963).
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    rt.block_on(twill_daemon::daemon::run(args)).map_err(|e| {
        tracing::error!(error = %e, "twilld stopped");
        anyhow::Error::new(e)
    })
}

fn init_logging(format: &str) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    // Colours only on a terminal: journald and log files get plain text.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    if format == "json" {
        builder.json().init();
    } else {
        builder.init();
    }
}

/// `twilld status`: a plain HTTP/1.0 GET of /status, printed as a table.
fn status(args: &StatusArgs) -> anyhow::Result<()> {
    let body = http_get(args.http_addr, "/status")?;
    if args.json {
        println!("{body}");
        return Ok(());
    }
    let v: serde_json::Value = serde_json::from_str(&body).context("decoding /status")?;
    print!("{}", render_status(&v));
    Ok(())
}

fn http_get(addr: SocketAddr, path: &str) -> anyhow::Result<String> {
    let timeout = Duration::from_secs(5);
    let mut s = TcpStream::connect_timeout(&addr, timeout).with_context(|| {
        format!("cannot reach twilld at {addr} (is it running? see --http-addr)")
    })?;
    s.set_read_timeout(Some(timeout))?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n")?;
    let mut resp = String::new();
    s.read_to_string(&mut resp)?;
    let (head, body) = resp
        .split_once("\r\n\r\n")
        .context("malformed HTTP response")?;
    if !head.starts_with("HTTP/1.0 200") && !head.starts_with("HTTP/1.1 200") {
        bail!("{path}: {}", head.lines().next().unwrap_or(""));
    }
    Ok(body.to_string())
}

fn render_status(v: &serde_json::Value) -> String {
    use std::fmt::Write as _;
    let s = |x: &serde_json::Value| match x {
        serde_json::Value::String(s) => s.clone(),
        serde_json::Value::Null => "-".into(),
        other => other.to_string(),
    };
    let mut out = String::new();
    let ready = v["ready"].as_bool().unwrap_or(false);
    let _ = writeln!(
        out,
        "ready:    {}",
        if ready {
            "yes".to_string()
        } else {
            format!("no ({})", s(&v["waiting_for"]))
        }
    );
    let v4 = !v["network"].is_null() || v["network6"].is_null();
    if v4 {
        let _ = writeln!(out, "network:  {}", s(&v["network"]));
    }
    if !v["network6"].is_null() {
        let _ = writeln!(out, "network6: {}", s(&v["network6"]));
    }
    let n = &v["node"];
    if n.is_object() && !v4 {
        // An IPv6-only network: no IPv4 side.
        let _ = writeln!(
            out,
            "underlay: {} ({})",
            s(&n["underlay"]),
            s(&n["backend"])
        );
    }
    if n.is_object() && v4 {
        let _ = writeln!(out, "subnet:   {}", s(&n["subnet"]));
        let _ = writeln!(
            out,
            "public:   {} (via {})",
            s(&n["public_ip"]),
            s(&n["underlay"])
        );
        let csum = match n["tx_checksum_offload"].as_bool() {
            Some(true) => "on",
            Some(false) => "off",
            None => "-",
        };
        if n["backend"].as_str() == Some("host-gw") {
            let _ = writeln!(
                out,
                "backend:  host-gw via {}, pod mtu {}",
                s(&n["device"]),
                s(&n["mtu"])
            );
        } else {
            let _ = writeln!(
                out,
                "vtep:     {} {} mtu {}, tx checksum offload {csum}",
                s(&n["device"]),
                s(&n["vtep_mac"]),
                s(&n["mtu"])
            );
        }
    }
    if n.is_object() {
        let n6 = &n["ipv6"];
        if n6.is_object() {
            let _ = writeln!(out, "subnet6:  {}", s(&n6["subnet"]));
            let _ = writeln!(out, "public6:  {}", s(&n6["public_ip"]));
            if n6["vtep_mac"].is_null() {
                let _ = writeln!(
                    out,
                    "backend6: host-gw via {}, mtu {}",
                    s(&n6["device"]),
                    s(&n6["mtu"])
                );
            } else {
                let _ = writeln!(
                    out,
                    "vtep6:    {} {} mtu {}",
                    s(&n6["device"]),
                    s(&n6["vtep_mac"]),
                    s(&n6["mtu"])
                );
            }
        }
    }
    if let Some(f) = v["firewall"].as_object() {
        let on = |k: &str| {
            if f.get(k).and_then(|b| b.as_bool()) == Some(true) {
                "on"
            } else {
                "off"
            }
        };
        let _ = writeln!(
            out,
            "firewall: masquerade {} (fully-random {}), forward rules {}, restored {} times{}",
            on("ip_masq"),
            on("random_fully"),
            on("forward_rules"),
            f.get("restores").map_or("0".into(), s),
            match f.get("error").and_then(|e| e.as_str()) {
                Some(e) => format!("; error: {e}"),
                None => String::new(),
            }
        );
        if let Some(chains) = f.get("forward_chains").and_then(|c| c.as_array()) {
            for c in chains {
                let _ = writeln!(
                    out,
                    "          pod traffic accepted ahead of drops in {}",
                    s(c)
                );
            }
        }
    }
    if let Some(p) = v["policy"].as_object() {
        let loaded = p.get("loaded").and_then(|b| b.as_bool()) == Some(true);
        let _ = writeln!(
            out,
            "network policy: {}, {} policies, {} local pods{}, {} chains, {} set elements{}{}",
            if loaded {
                "loaded".to_string()
            } else {
                format!(
                    "not loaded ({})",
                    p.get("waiting_for").map(s).unwrap_or_default()
                )
            },
            p.get("policies").map(s).unwrap_or_default(),
            p.get("local_pods").map(s).unwrap_or_default(),
            match p.get("pending").and_then(|n| n.as_u64()) {
                Some(n) if n > 0 => format!(" ({n} pending)"),
                _ => String::new(),
            },
            p.get("chains").map(s).unwrap_or_default(),
            p.get("elements").map(s).unwrap_or_default(),
            p.get("last_sync_ms")
                .and_then(|m| m.as_f64())
                .map(|m| {
                    let st = &p["last_sync"];
                    let f = |k: &str| st[k].as_f64().unwrap_or(f64::NAN);
                    let steps = match st["path"].as_str() {
                        Some(path) => format!(
                            " (compile {:.1}, render {:.1}, apply {:.1} by {path})",
                            f("compile_ms"),
                            f("render_ms"),
                            f("apply_ms")
                        ),
                        None => String::new(),
                    };
                    format!(", last change {m:.1} ms{steps}")
                })
                .unwrap_or_default(),
            match p.get("error").and_then(|e| e.as_str()) {
                Some(e) => format!("; error: {e}"),
                None => String::new(),
            }
        );
        for f in p
            .get("in_force")
            .and_then(|f| f.as_array())
            .into_iter()
            .flatten()
        {
            let list = |k: &str| {
                f[k].as_array()
                    .map(|a| a.iter().map(s).collect::<Vec<_>>().join(", "))
                    .unwrap_or_default()
            };
            let mut parts = Vec::new();
            for dir in ["ingress", "egress"] {
                let pods = list(dir);
                if !pods.is_empty() {
                    parts.push(format!("{pods} ({dir})"));
                }
            }
            let _ = writeln!(
                out,
                "policy: {} isolates {}",
                s(&f["policy"]),
                parts.join("; ")
            );
        }
        let closed: Vec<_> = p["source_check"]["closed"]
            .as_array()
            .into_iter()
            .flatten()
            .map(s)
            .collect();
        if !closed.is_empty() {
            let _ = writeln!(
                out,
                "policy: cut off (their pod records are unreadable; delete the pods): {}",
                closed.join(", ")
            );
        }
    }
    if let Some(r) = v["last_reconcile"].as_object() {
        let _ = writeln!(
            out,
            "reconcile: {:.1} ms, +{} -{} !{}",
            r.get("duration_ms").and_then(|d| d.as_f64()).unwrap_or(0.0),
            s(&r["added"]),
            s(&r["removed"]),
            s(&r["failed"])
        );
    }
    if v4 {
        peer_table(&mut out, "peers", &v["peers"], 20);
    }
    if v["peers6"].is_array() {
        peer_table(&mut out, "IPv6 peers", &v["peers6"], 26);
    }
    out
}

/// One family's peers as a table; `w` is the width of the subnet and address columns.
fn peer_table(out: &mut String, title: &str, peers: &serde_json::Value, w: usize) {
    use std::fmt::Write;
    let s = |v: &serde_json::Value| match v {
        serde_json::Value::String(x) => x.clone(),
        serde_json::Value::Null => "-".into(),
        other => other.to_string(),
    };
    let peers = peers.as_array().cloned().unwrap_or_default();
    let _ = writeln!(out, "\n{title}: {}", peers.len());
    let _ = writeln!(
        out,
        "{:<w$} {:<a$} {:<18} {:<7} PROGRAMMED",
        "SUBNET",
        "PUBLIC IP",
        "VTEP MAC",
        "PATH",
        a = w - 4
    );
    for p in &peers {
        let prog = if p["programmed"].as_bool().unwrap_or(false) {
            "yes".to_string()
        } else {
            match p["reason"].as_str() {
                Some(why) => format!("no: {why}"),
                None => "no".into(),
            }
        };
        let _ = writeln!(
            out,
            "{:<w$} {:<a$} {:<18} {:<7} {prog}",
            s(&p["subnet"]),
            s(&p["public_ip"]),
            s(&p["vtep_mac"]),
            s(&p["path"]),
            a = w - 4
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_both_families_of_a_dual_stack_node() {
        let v = serde_json::json!({
            "ready": true, "network": "10.244.0.0/16",
            "node": {"subnet": "10.244.1.0/24", "public_ip": "198.18.0.11", "vtep_mac": "02:00:00:00:00:01",
                     "underlay": "eth0", "device": "twill.1", "mtu": 1430,
                     "ipv6": {"subnet": "fd00:10:244:1::/64", "public_ip": "fd00:198:18::b",
                              "vtep_mac": "02:00:00:00:06:01", "device": "twill-v6.1", "mtu": 1430}},
            "peers": [{"subnet": "10.244.2.0/24", "public_ip": "198.18.0.12", "vtep_mac": "02:00:00:00:00:02", "programmed": true, "path": "vxlan"}],
            "peers6": [{"subnet": "fd00:10:244:2::/64", "public_ip": "fd00:198:18::c", "vtep_mac": "02:00:00:00:06:02", "programmed": true, "path": "vxlan"}]
        });
        let out = render_status(&v);
        assert!(out.contains("subnet6:  fd00:10:244:1::/64"), "{out}");
        assert!(
            out.contains("vtep6:    twill-v6.1 02:00:00:00:06:01 mtu 1430"),
            "{out}"
        );
        assert!(out.contains("IPv6 peers: 1"), "{out}");
        assert!(
            out.contains(
                "fd00:10:244:2::/64         fd00:198:18::c         02:00:00:00:06:02  vxlan   yes"
            ),
            "{out}"
        );
        // host-gw's IPv6 side: no VTEP.
        let mut hg = v.clone();
        hg["node"]["ipv6"]["vtep_mac"] = serde_json::Value::Null;
        hg["node"]["ipv6"]["device"] = "eth0".into();
        let out = render_status(&hg);
        assert!(
            out.contains("backend6: host-gw via eth0, mtu 1430") && !out.contains("vtep6"),
            "{out}"
        );
        // A v4-only node shows no IPv6 parts.
        let mut v4 = v.clone();
        v4["node"]["ipv6"] = serde_json::Value::Null;
        v4.as_object_mut().unwrap().remove("peers6");
        let out = render_status(&v4);
        assert!(!out.contains("IPv6") && !out.contains("subnet6"), "{out}");
        // An IPv6-only node shows no IPv4 parts.
        let only6 = serde_json::json!({
            "ready": true, "network": null, "network6": "fd00:10:244::/56",
            "node": {"underlay": "eth0", "backend": "vxlan", "ipv6": v["node"]["ipv6"]},
            "peers": [], "peers6": v["peers6"]
        });
        let out = render_status(&only6);
        assert!(out.contains("network6: fd00:10:244::/56"), "{out}");
        assert!(out.contains("underlay: eth0 (vxlan)"), "{out}");
        assert!(out.contains("subnet6:  fd00:10:244:1::/64"), "{out}");
        assert!(out.contains("IPv6 peers: 1"), "{out}");
        assert!(
            !out.contains("network: ") && !out.contains("subnet: ") && !out.contains("\npeers:"),
            "{out}"
        );
    }

    #[test]
    fn renders_status_table() {
        let v = serde_json::json!({
            "ready": true, "network": "10.244.0.0/16",
            "node": {"subnet": "10.244.1.0/24", "public_ip": "198.18.0.11", "vtep_mac": "02:00:00:00:00:01",
                     "underlay": "eth0", "device": "twill.1", "mtu": 1450, "tx_checksum_offload": false},
            "peers": [{"subnet": "10.244.2.0/24", "public_ip": "198.18.0.12", "vtep_mac": "02:00:00:00:00:02", "programmed": true, "path": "vxlan"},
                      {"subnet": "10.244.3.0/24", "public_ip": "198.18.1.13", "vtep_mac": null, "programmed": false, "path": "none", "reason": "not on our segment"}],
            "firewall": {"ip_masq": true, "random_fully": true, "forward_rules": true, "restores": 2,
                         "forward_chains": ["iptables FORWARD"], "error": null},
            "policy": {"loaded": true, "policies": 3, "local_pods": 2, "pending": 1, "chains": 4, "elements": 9, "last_sync_ms": 0.4,
                       "last_sync": {"why": "pod added", "compile_ms": 0.1, "render_ms": 0.1, "apply_ms": 0.2, "path": "netlink"},
                       "in_force": [{"policy": "x/deny", "ingress": ["x/a", "x/b"], "egress": ["x/a"]}],
                       "source_check": {"ports": 3, "addresses": 2, "macs": 2, "closed": ["tw0123456789ab"]}},
            "last_reconcile": {"duration_ms": 1.5, "added": 3, "removed": 0, "failed": 0}
        });
        let out = render_status(&v);
        assert!(
            out.contains("network policy: loaded, 3 policies, 2 local pods (1 pending), 4 chains, 9 set elements"),
            "{out}"
        );
        assert!(out.contains("subnet:   10.244.1.0/24"), "{out}");
        assert!(
            out.contains("twill.1 02:00:00:00:00:01 mtu 1450, tx checksum offload off"),
            "{out}"
        );
        assert!(
            out.contains("10.244.2.0/24        198.18.0.12      02:00:00:00:00:02  vxlan   yes"),
            "{out}"
        );
        assert!(
            out.contains("10.244.3.0/24        198.18.1.13      -                  none    no: not on our segment"),
            "{out}"
        );
        assert!(out.contains("peers: 2"));
        assert!(
            out.contains("masquerade on (fully-random on), forward rules on, restored 2 times\n"),
            "{out}"
        );
        assert!(
            out.contains("accepted ahead of drops in iptables FORWARD"),
            "{out}"
        );
        assert!(
            out.contains("last change 0.4 ms (compile 0.1, render 0.1, apply 0.2 by netlink)"),
            "{out}"
        );
        assert!(
            out.contains("policy: cut off (their pod records are unreadable; delete the pods): tw0123456789ab\n"),
            "{out}"
        );
    }
}
