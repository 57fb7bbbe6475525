//! CNI ADD/DEL latency: the `twill` plugin against Debian's reference chain (bridge +
//! host-local), both exec'd exactly as a runtime does, from the node's namespace, into fresh pod
//! namespaces, alternated run by run.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use serde_json::json;
use twill_tests::netns;

use crate::common::{self, ms, Ctx};
use crate::report::{self, ecdf_svg, Metric, ScenarioResult};

const REF_DIR: &str = "/usr/lib/cni";
static POD: AtomicU32 = AtomicU32::new(0);

#[derive(Clone)]
pub struct Plugin {
    pub name: &'static str,
    pub bin: PathBuf,
    pub cni_path: String,
    pub config: String,
}

/// One plugin call: wall time from exec to exit, and stdout if it succeeded.
pub fn call(
    p: &Plugin,
    command: &str,
    id: &str,
    netns_path: &str,
) -> (Duration, std::result::Result<String, String>) {
    call_with_args(p, command, id, netns_path, None)
}

/// `call` with CNI_ARGS (e.g. `K8S_POD_NAMESPACE=x;K8S_POD_NAME=y`, as kubelet sends them).
pub fn call_with_args(
    p: &Plugin,
    command: &str,
    id: &str,
    netns_path: &str,
    cni_args: Option<&str>,
) -> (Duration, std::result::Result<String, String>) {
    let start = Instant::now();
    let res = (|| -> std::result::Result<String, String> {
        let mut cmd = Command::new(&p.bin);
        if let Some(a) = cni_args {
            cmd.env("CNI_ARGS", a);
        }
        let mut child = cmd
            .env("CNI_COMMAND", command)
            .env("CNI_CONTAINERID", id)
            .env("CNI_NETNS", netns_path)
            .env("CNI_IFNAME", "eth0")
            .env("CNI_PATH", &p.cni_path)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| e.to_string())?;
        child
            .stdin
            .take()
            .expect("piped")
            .write_all(p.config.as_bytes())
            .map_err(|e| e.to_string())?;
        let out = child.wait_with_output().map_err(|e| e.to_string())?;
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        if out.status.success() {
            Ok(stdout)
        } else {
            Err(format!(
                "{} {command} exit {}: {stdout} {}",
                p.name,
                out.status,
                String::from_utf8_lossy(&out.stderr)
            ))
        }
    })();
    (start.elapsed(), res)
}

pub fn twill_plugin(ctx: &Ctx, socket: &Path) -> Plugin {
    let bin = ctx.cni_plugin();
    Plugin {
        name: "twill",
        cni_path: bin
            .parent()
            .map(|d| d.display().to_string())
            .unwrap_or_default(),
        bin,
        config: json!({"cniVersion":"1.0.0","name":"twill","type":"twill","socket":socket})
            .to_string(),
    }
}

pub fn reference_plugin(data_dir: &Path) -> Plugin {
    Plugin {
        name: "bridge+host-local",
        bin: Path::new(REF_DIR).join("bridge"),
        cni_path: REF_DIR.into(),
        config: json!({
            "cniVersion": "1.0.0", "name": "refnet", "type": "bridge", "bridge": "refbr0",
            "isGateway": true, "ipMasq": false,
            "ipam": {"type": "host-local", "ranges": [[{"subnet": "10.250.0.0/16"}]],
                     "dataDir": data_dir}
        })
        .to_string(),
    }
}

/// A fresh pod namespace named under the lab's prefix (removed with the lab at the latest).
pub fn new_pod_ns(prefix: &str) -> Result<(String, String)> {
    let name = format!("{prefix}p{}", POD.fetch_add(1, Ordering::Relaxed));
    netns::add(&name)?;
    let path = format!("/run/netns/{name}");
    Ok((name, path))
}

#[derive(Default)]
struct Samples {
    add: Vec<f64>,
    del: Vec<f64>,
    add_fail: usize,
    del_fail: usize,
    add_total: Vec<f64>,
    del_total: Vec<f64>,
    first_error: Option<String>,
}

impl Samples {
    fn record(&mut self, add: bool, d: Duration, r: &std::result::Result<String, String>) {
        match (add, r) {
            (true, Ok(_)) => self.add.push(ms(d)),
            (false, Ok(_)) => self.del.push(ms(d)),
            (true, Err(e)) | (false, Err(e)) => {
                if add {
                    self.add_fail += 1
                } else {
                    self.del_fail += 1
                }
                self.first_error.get_or_insert_with(|| e.clone());
            }
        }
    }
}

/// One sequential iteration of one plugin: ADD then DEL into a fresh netns.
fn sequential_one(node_ns: &str, prefix: &str, p: &Plugin, s: &mut Samples) -> Result<()> {
    let (name, path) = new_pod_ns(prefix)?;
    let id = format!("bench{name}");
    let (p1, id1, path1) = (p.clone(), id.clone(), path.clone());
    let (d, r) = netns::in_netns(node_ns, move || call(&p1, "ADD", &id1, &path1))?;
    s.record(true, d, &r);
    let p2 = p.clone();
    let (d, r) = netns::in_netns(node_ns, move || call(&p2, "DEL", &id, &path))?;
    s.record(false, d, &r);
    netns::kill_all_and_delete(&name)
}

/// `k` ADDs at once, then `k` DELs at once, each into its own fresh netns.
fn concurrent_round(
    node_ns: &str,
    prefix: &str,
    p: &Plugin,
    k: usize,
    s: &mut Samples,
) -> Result<()> {
    let pods: Vec<(String, String)> = (0..k).map(|_| new_pod_ns(prefix)).collect::<Result<_>>()?;
    for verb in ["ADD", "DEL"] {
        let (p1, pods1) = (p.clone(), pods.clone());
        let (results, total) = common::ns_parallel(node_ns, k, move |i| {
            let (name, path) = &pods1[i];
            call(&p1, verb, &format!("bench{name}"), path)
        })?;
        for (d, r) in &results {
            s.record(verb == "ADD", *d, r);
        }
        if verb == "ADD" {
            s.add_total.push(ms(total));
        } else {
            s.del_total.push(ms(total));
        }
    }
    for (name, _) in pods {
        netns::kill_all_and_delete(&name)?;
    }
    Ok(())
}

/// The kernel's share of `k` ADDs, with no plugin at all: one `ip -batch` creating `k` veth pairs
/// on a scratch bridge in the node namespace (up, peers born in `k` fresh pod namespaces), as
/// every bridge-based ADD must. The kernel does this under one lock (RTNL), one pair after the
/// other, so no plugin can finish `k` ADDs faster. Returns the wall time in ms.
fn veth_floor(node_ns: &str, prefix: &str, k: usize) -> Result<f64> {
    let pods: Vec<(String, String)> = (0..k).map(|_| new_pod_ns(prefix)).collect::<Result<_>>()?;
    let bridge = format!("{prefix}fb");
    let batch: String = pods
        .iter()
        .enumerate()
        .map(|(i, (name, _))| {
            format!(
                "link add {prefix}f{i} master {bridge} up type veth peer name eth0 netns {name}\n"
            )
        })
        .collect();
    let file = std::env::temp_dir().join(format!("{prefix}-floor.batch"));
    std::fs::write(&file, batch)?;
    let timed = (|| {
        netns::run_ok(&[
            "ip", "-n", node_ns, "link", "add", &bridge, "up", "type", "bridge",
        ])?;
        let t = Instant::now();
        netns::run_ok(&["ip", "-n", node_ns, "-batch", &file.to_string_lossy()])?;
        Ok(ms(t.elapsed()))
    })();
    // Deleting the pod namespaces removes the pairs; then the bridge.
    let _ = std::fs::remove_file(&file);
    for (name, _) in &pods {
        netns::kill_all_and_delete(name)?;
    }
    let _ = netns::run(&["ip", "-n", node_ns, "link", "del", &bridge]);
    timed
}

pub fn run(ctx: &Ctx, out_dir: &Path, res: &mut ScenarioResult) -> Result<()> {
    let (iters, levels): (usize, Vec<(usize, usize)>) = if ctx.quick {
        (5, vec![(4, 1), (16, 1)])
    } else {
        (200, vec![(16, 10), (100, 3)])
    };
    res.config = json!({"sequential_iterations": iters,
        "concurrency_levels": levels.iter().map(|(k, r)| json!({"concurrent": k, "rounds": r})).collect::<Vec<_>>()});
    if !Path::new(REF_DIR).join("bridge").is_file() {
        bail!("{REF_DIR}/bridge missing: install containernetworking-plugins");
    }
    let mut lab = ctx.lab(1)?;
    common::start_daemon(&mut lab, 1, &[])?;
    lab.wait_ready(1, common::READY_TIMEOUT)?;
    let node = lab.node_ns(1);
    let prefix = lab.prefix().to_owned();
    let twill = twill_plugin(ctx, &lab.cni_socket(1));
    let hl_dir = lab.dir().join("host-local");
    std::fs::create_dir_all(&hl_dir)?;
    let reference = reference_plugin(&hl_dir);

    // Warm-up: page cache, the bridges, first-call costs; not recorded.
    for p in [&twill, &reference] {
        sequential_one(&node, &prefix, p, &mut Samples::default())?;
    }

    let (mut ts, mut rs) = (Samples::default(), Samples::default());
    for i in 0..iters {
        // Alternate who goes first so drift in the machine's load hits both alike.
        if i % 2 == 0 {
            sequential_one(&node, &prefix, &twill, &mut ts)?;
            sequential_one(&node, &prefix, &reference, &mut rs)?;
        } else {
            sequential_one(&node, &prefix, &reference, &mut rs)?;
            sequential_one(&node, &prefix, &twill, &mut ts)?;
        }
    }
    let refl = reference.name;
    // The floor under every call: exec'ing the plugin binary at all (VERSION needs no daemon
    // and no kernel work in either plugin).
    let (mut tv, mut rv) = (Vec::new(), Vec::new());
    for i in 0..iters {
        let one = |p: &Plugin, v: &mut Vec<f64>| {
            if let (d, Ok(_)) = call(p, "VERSION", "", "") {
                v.push(ms(d));
            }
        };
        if i % 2 == 0 {
            one(&twill, &mut tv);
            one(&reference, &mut rv);
        } else {
            one(&reference, &mut rv);
            one(&twill, &mut tv);
        }
    }
    let add = Metric::new("ADD sequential", "ms", &ts.add).vs(refl, &rs.add);
    let met = add
        .twill
        .as_ref()
        .zip(add.ratio)
        .map(|(t, r)| r <= 0.25 && t.p99 < 10.0);
    res.metrics.push(
        add.target("median ≤ ref/4, p99 < 10 ms", met)
            .note(fail_note(&ts, &rs, true)),
    );
    res.metrics.push(
        Metric::new("DEL sequential", "ms", &ts.del)
            .vs(refl, &rs.del)
            .note(fail_note(&ts, &rs, false)),
    );
    res.metrics.push(
        Metric::new("VERSION (exec floor)", "ms", &tv)
            .vs("bridge", &rv)
            .note("one exec of the plugin binary, no daemon or kernel work: the part of every call no daemon can remove"),
    );
    report::write(
        &out_dir.join("cni_add.svg"),
        &ecdf_svg(
            "CNI ADD latency, sequential: twill vs bridge+host-local",
            &[("twill", "#d62728", &ts.add), (refl, "#1f77b4", &rs.add)],
        ),
    )?;
    report::write(
        &out_dir.join("cni_del.svg"),
        &ecdf_svg(
            "CNI DEL latency, sequential: twill vs bridge+host-local",
            &[("twill", "#d62728", &ts.del), (refl, "#1f77b4", &rs.del)],
        ),
    )?;

    for (k, rounds) in levels {
        let (mut tc, mut rc) = (Samples::default(), Samples::default());
        let mut floor = Vec::new();
        for r in 0..rounds {
            floor.push(veth_floor(&node, &prefix, k)?);
            if r % 2 == 0 {
                concurrent_round(&node, &prefix, &twill, k, &mut tc)?;
                concurrent_round(&node, &prefix, &reference, k, &mut rc)?;
            } else {
                concurrent_round(&node, &prefix, &reference, k, &mut rc)?;
                concurrent_round(&node, &prefix, &twill, k, &mut tc)?;
            }
        }
        let add = Metric::new(&format!("ADD {k} concurrent"), "ms", &tc.add).vs(refl, &rc.add);
        let (target, met) = if k >= 100 {
            let met = add
                .twill
                .as_ref()
                .map(|t| tc.add_fail == 0 && t.p99 < 100.0);
            (Some("all succeed, p99 < 100 ms"), met)
        } else {
            (None, None)
        };
        let mut add = add.note(fail_note(&tc, &rc, true));
        if let Some(t) = target {
            add = add.target(t, met);
        }
        res.metrics.push(add);
        res.metrics.push(
            Metric::new(&format!("DEL {k} concurrent"), "ms", &tc.del)
                .vs(refl, &rc.del)
                .note(fail_note(&tc, &rc, false)),
        );
        res.metrics.push(
            Metric::new(&format!("{k} ADDs total"), "ms", &tc.add_total)
                .vs(refl, &rc.add_total)
                .note("wall time from release of the burst to the last exit"),
        );
        res.metrics.push(
            Metric::new(&format!("{k} DELs total"), "ms", &tc.del_total).vs(refl, &rc.del_total),
        );
        res.metrics.push(
            Metric::new(&format!("{k} veth pairs, ip -batch"), "ms", &floor).note(format!(
                "kernel floor under {k} ADDs, no plugin: one ip -batch creating {k} veth pairs on \
                 a bridge, up, peers in {k} fresh netns (serialised by the kernel's RTNL lock)"
            )),
        );
        res.metrics.push(
            Metric::new(
                &format!("failures at {k} concurrent"),
                "calls",
                &[(tc.add_fail + tc.del_fail) as f64],
            )
            .vs_value(refl, (rc.add_fail + rc.del_fail) as f64),
        );
        if k == 100 || (ctx.quick && k == 16) {
            report::write(
                &out_dir.join("cni_add_concurrent.svg"),
                &ecdf_svg(
                    &format!("CNI ADD latency, {k} concurrent: twill vs bridge+host-local"),
                    &[("twill", "#d62728", &tc.add), (refl, "#1f77b4", &rc.add)],
                ),
            )?;
        }
    }
    let cni_errors = common::metric(&lab, 1, "twill_cni_errors_total").unwrap_or(f64::NAN);
    res.notes.push(format!(
        "plugins exec'd from a thread inside the node namespace (as a runtime on the node does), \
         pod namespaces created before the clock starts; twilld counted {cni_errors} CNI errors"
    ));
    Ok(())
}

fn fail_note(t: &Samples, r: &Samples, add: bool) -> String {
    let (tf, rf) = if add {
        (t.add_fail, r.add_fail)
    } else {
        (t.del_fail, r.del_fail)
    };
    if tf + rf == 0 {
        return String::new();
    }
    let first = t
        .first_error
        .as_ref()
        .or(r.first_error.as_ref())
        .map(|e| e.chars().take(300).collect::<String>())
        .unwrap_or_default();
    format!("failures: twill {tf}, reference {rf}; first: {first}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_binary_is_a_failed_call_not_a_panic() {
        let p = Plugin {
            name: "none",
            bin: "/nonexistent/plugin".into(),
            cni_path: String::new(),
            config: "{}".into(),
        };
        let (_, r) = call(&p, "ADD", "x", "/run/netns/none");
        assert!(r.is_err());
    }

    #[test]
    fn failures_are_counted_per_verb() {
        let mut s = Samples::default();
        s.record(true, Duration::from_millis(2), &Ok(String::new()));
        s.record(true, Duration::from_millis(2), &Err("boom".into()));
        s.record(false, Duration::from_millis(3), &Ok(String::new()));
        assert_eq!(
            (s.add.len(), s.add_fail, s.del.len(), s.del_fail),
            (1, 1, 1, 0)
        );
        assert_eq!(s.first_error.as_deref(), Some("boom"));
    }

    #[test]
    fn configs_are_what_a_runtime_sends() {
        let r = reference_plugin(Path::new("/tmp/x"));
        let v: serde_json::Value = serde_json::from_str(&r.config).unwrap();
        assert_eq!(v["ipam"]["type"], "host-local");
        assert_eq!(v["type"], "bridge");
    }
}
