//! Kubernetes mode (`--kube-subnet-mgr`) end to end: real twilld processes in a netns lab, each
//! talking through the real kube client to twill's fake API server (tests/src/fakeapi) inside
//! the lab's underlay, with the RBAC of the shipped manifest enforced (twilld uses the twill
//! ServiceAccount's token). No kube-apiserver, kind or Docker engine can run on these machines,
//! hence the fake; what only a real cluster can confirm is listed in deploy/README.md.
//! No etcd runs in these labs.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{anyhow, ensure, Context, Result};
use serde_json::Value;
use twill_tests::fakeapi::tls::TestPki;
use twill_tests::fakeapi::{Failure, FakeApi, FakeApiOptions, Kind};
use twill_tests::{wait_until, Lab, LabOptions, Pod, StreamOptions, UdpStream};

const DEV: &str = "twill.1";
const NET_CONF: &str = r#"{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan"}}"#;
const NET_CONF_DUAL: &str = r#"{"Network":"10.244.0.0/16","EnableIPv6":true,"IPv6Network":"fd00:10:244::/56","Backend":{"Type":"vxlan"}}"#;
const NET_CONF_ONLY6: &str = r#"{"EnableIPv4":false,"EnableIPv6":true,"IPv6Network":"fd00:10:244::/56","Backend":{"Type":"vxlan"}}"#;
const PREFIX: &str = "flannel.alpha.coreos.com/";
const READY: Duration = Duration::from_secs(60);
const CONVERGE: Duration = Duration::from_secs(60);

struct KubeLab {
    // Dropped first: the daemons stop before the API they talk to.
    lab: Lab,
    api: FakeApi,
}

fn pod_cidr(i: usize) -> String {
    format!("10.244.{i}.0/24")
}

fn pod_cidr6(i: usize) -> String {
    format!("fd00:10:244:{i}::/64")
}

impl KubeLab {
    /// `nodes` lab nodes, each registered as Node `n<i>` with podCIDR 10.244.<i>.0/24; twilld
    /// not started.
    fn new(nodes: usize) -> Result<KubeLab> {
        Self::build(nodes, false)
    }

    /// `new`, with the API served over TLS (a CA made for this lab; the kubeconfigs trust it).
    fn new_tls(nodes: usize) -> Result<KubeLab> {
        Self::build(nodes, true)
    }

    /// `new` on a dual-stack underlay and network: each Node gets an IPv6 podCIDR
    /// fd00:10:244:<i>::/64 too, listed first (as a cluster whose first family is IPv6 lists
    /// them: twilld must pick by family).
    fn new_dual(nodes: usize) -> Result<KubeLab> {
        let k = Self::build_with(nodes, false, true)?;
        for i in 1..=nodes {
            k.api
                .set_pod_cidrs(&format!("n{i}"), &[&pod_cidr6(i), &pod_cidr(i)])?;
            std::fs::write(k.lab.node_dir(i).join("net-conf.json"), NET_CONF_DUAL)?;
        }
        Ok(k)
    }

    fn build(nodes: usize, tls: bool) -> Result<KubeLab> {
        Self::build_with(nodes, tls, false)
    }

    fn build_with(nodes: usize, tls: bool, ipv6: bool) -> Result<KubeLab> {
        let lab = Lab::new(LabOptions {
            nodes,
            etcd: false,
            ipv6,
            ..Default::default()
        })?;
        let mut opts = FakeApiOptions::in_lab(&lab);
        if tls {
            let dir = lab.dir().join("pki");
            std::fs::create_dir(&dir)?;
            opts.tls = Some(TestPki::generate(&dir, opts.addr.ip())?);
        }
        let api = FakeApi::start(opts)?;
        let token = api
            .twill_token()
            .ok_or_else(|| anyhow!("the manifest binds no twill ServiceAccount"))?;
        for i in 1..=nodes {
            api.add_node(
                &format!("n{i}"),
                &lab.node_ip(i).to_string(),
                Some(&pod_cidr(i)),
            )?;
            std::fs::write(lab.node_dir(i).join("net-conf.json"), NET_CONF)?;
            std::fs::write(lab.node_dir(i).join("kubeconfig"), api.kubeconfig(&token))?;
        }
        Ok(KubeLab { lab, api })
    }

    fn file(&self, i: usize, name: &str) -> String {
        let p: PathBuf = self.lab.node_dir(i).join(name);
        p.display().to_string()
    }

    /// twilld's arguments on node i in Kubernetes mode.
    fn args(&self, i: usize) -> Vec<String> {
        let (kc, nc) = (self.file(i, "kubeconfig"), self.file(i, "net-conf.json"));
        let extra = [
            "--kube-subnet-mgr",
            "--kubeconfig-file",
            &kc,
            "--net-config-path",
            &nc,
            // /readyz turns 503 soon after the Node list is lost (and back once it is not).
            "--lease-list-grace",
            "5s",
        ];
        twill_tests::lab::merge_args(&self.lab.daemon_args(i), &extra)
    }

    fn start(&mut self, i: usize) -> Result<()> {
        let args = self.args(i);
        self.lab.start_daemon_args(i, &args, &[])
    }

    /// twilld on every node, each ready and with every other node programmed.
    fn start_all_meshed(&mut self) -> Result<()> {
        for i in 1..=self.lab.nodes() {
            self.start(i)?;
        }
        for i in 1..=self.lab.nodes() {
            self.lab.wait_ready(i, READY)?;
        }
        let all: Vec<usize> = (1..=self.lab.nodes()).collect();
        self.wait_mesh(&all)
    }

    /// A pod as Kubernetes makes one: its object in the API first (labels, node; Pending), then
    /// the CNI ADD on its node (as kubelet calls it, with the pod's namespace and name), then
    /// its address in the object's status (as kubelet reports it).
    fn add_pod(&mut self, i: usize, ns: &str, name: &str, labels: &[(&str, &str)]) -> Result<Pod> {
        if self.api.get_value(Kind::Namespace, "", ns).is_none() {
            self.api.add_namespace(ns, &[])?;
        }
        let l: serde_json::Map<String, Value> = labels
            .iter()
            .map(|(k, v)| (k.to_string(), Value::from(*v)))
            .collect();
        // Created unbound, then bound by the scheduler, as every pod is.
        self.api.create_value(
            Kind::Pod,
            serde_json::json!({
                "metadata": {"name": name, "namespace": ns, "labels": l},
                "spec": {"containers": [{"name": "c", "image": "busybox"}]},
                "status": {"phase": "Pending"}
            }),
        )?;
        self.api.update_value(Kind::Pod, ns, name, |p| {
            p["spec"]["nodeName"] = Value::from(format!("n{i}"));
        })?;
        let cfg = self.lab.cni_config(i, "1.0.0");
        let args = format!("IgnoreUnknown=1;K8S_POD_NAMESPACE={ns};K8S_POD_NAME={name}");
        let pod = self.lab.add_pod_with(i, name, &args, &cfg)?;
        // IPv4 first when the pod has one (an IPv6-only network gives it none).
        let addrs: Vec<String> = (!pod.ip.is_unspecified())
            .then(|| pod.ip.to_string())
            .into_iter()
            .chain(pod.ip6.map(|a| a.to_string()))
            .collect();
        let ip = addrs.first().cloned().unwrap_or_default();
        let ips: Vec<Value> = addrs.iter().map(|a| serde_json::json!({"ip": a})).collect();
        self.api.update_value(Kind::Pod, ns, name, |p| {
            p["status"] = serde_json::json!({"phase": "Running", "podIP": ip, "podIPs": ips});
        })?;
        Ok(pod)
    }

    fn set_pod_labels(&self, ns: &str, name: &str, labels: &[(&str, &str)]) -> Result<()> {
        let l: serde_json::Map<String, Value> = labels
            .iter()
            .map(|(k, v)| (k.to_string(), Value::from(*v)))
            .collect();
        self.api.update_value(Kind::Pod, ns, name, |p| {
            p["metadata"]["labels"] = Value::Object(l);
        })?;
        Ok(())
    }

    fn node(&self, name: &str) -> Result<Value> {
        self.api
            .get_value(Kind::Node, "", name)
            .ok_or_else(|| anyhow!("no Node {name}"))
    }

    /// Sets `pairs` (keys without the prefix) on Node `node`, one write each.
    fn annotate(&self, node: &str, pairs: &[(&str, String)]) -> Result<()> {
        for (key, v) in pairs {
            self.api
                .set_node_annotation(node, &format!("{PREFIX}{key}"), Some(v))?;
        }
        Ok(())
    }

    fn annotation(&self, node: &str, key: &str) -> Option<String> {
        self.node(node).ok()?["metadata"]["annotations"][format!("{PREFIX}{key}")]
            .as_str()
            .map(str::to_owned)
    }

    /// A second address on node i's underlay interface (not the one twilld would pick
    /// itself), named by an operator's `node-public-ip` annotation on its Node.
    fn annotate_second_address(&self, i: usize) -> Result<&'static str> {
        let second = "198.18.0.150";
        self.lab.exec_ok(
            i,
            &["ip", "addr", "add", &format!("{second}/24"), "dev", "eth0"],
        )?;
        self.api.set_node_annotation(
            &format!("n{i}"),
            &format!("{PREFIX}node-public-ip"),
            Some(second),
        )?;
        Ok(second)
    }

    /// Node i runs with public IP `ip` and published it.
    fn runs_on(&self, i: usize, ip: &str) -> Result<()> {
        let (_, has, _) = self.own(i)?;
        ensure!(has == ip, "node {i} runs with public IP {has}, not {ip}");
        let published = self.annotation(&format!("n{i}"), "public-ip");
        ensure!(
            published.as_deref() == Some(ip),
            "node {i} published public-ip {published:?}"
        );
        Ok(())
    }

    /// (subnet, public ip, vtep mac) of node i, from its /status.
    fn own(&self, i: usize) -> Result<(String, String, String)> {
        let st = self.lab.status(i)?;
        let f = |k: &str| {
            st["node"][k]
                .as_str()
                .map(str::to_owned)
                .ok_or_else(|| anyhow!("/status node.{k} missing: {st}"))
        };
        Ok((
            f("subnet")?,
            f("public_ip")?,
            f("vtep_mac")?.to_ascii_lowercase(),
        ))
    }

    /// Each of `nodes` has the complete entries of every other one.
    fn wait_mesh(&self, nodes: &[usize]) -> Result<()> {
        for &i in nodes {
            for &k in nodes.iter().filter(|&&k| k != i) {
                let (subnet, ip, mac) = self.own(k)?;
                wait_until(CONVERGE, || {
                    self.lab
                        .entries(i, DEV)
                        .is_ok_and(|e| e.has_peer(&subnet, &mac, &ip))
                })
                .with_context(|| {
                    format!(
                        "node {i} never programmed node {k} ({subnet}): {:?}",
                        self.lab.entries(i, DEV)
                    )
                })?;
            }
        }
        Ok(())
    }

    fn has_route(&self, i: usize, subnet: &str) -> bool {
        self.lab
            .entries(i, DEV)
            .is_ok_and(|e| e.routes.iter().any(|r| r.dst == subnet))
    }
}

/// flanneld's annotations of a vxlan Node (VNI 1), as its `AcquireLease` writes them.
fn flanneld(mac: &str, ip: &str) -> Vec<(&'static str, String)> {
    vec![
        ("kube-subnet-manager", "true".into()),
        ("backend-type", "vxlan".into()),
        ("backend-data", format!(r#"{{"VNI":1,"VtepMAC":"{mac}"}}"#)),
        ("public-ip", ip.into()),
    ]
}

/// A dual-stack flanneld's: `flanneld`'s and the IPv6 side's.
fn flanneld_dual(mac: &str, ip: &str, mac6: &str, ip6: &str) -> Vec<(&'static str, String)> {
    let mut a = flanneld(mac, ip);
    a.push((
        "backend-v6-data",
        format!(r#"{{"VNI":1,"VtepMAC":"{mac6}"}}"#),
    ));
    a.push(("public-ipv6", ip6.into()));
    a
}

/// An IPv6-only flanneld's: no IPv4 pair at all.
fn flanneld_v6(mac6: &str, ip6: &str) -> Vec<(&'static str, String)> {
    vec![
        ("kube-subnet-manager", "true".into()),
        ("backend-type", "vxlan".into()),
        (
            "backend-v6-data",
            format!(r#"{{"VNI":1,"VtepMAC":"{mac6}"}}"#),
        ),
        ("public-ipv6", ip6.into()),
    ]
}

fn network_unavailable(node: &Value) -> Option<String> {
    node["status"]["conditions"]
        .as_array()?
        .iter()
        .find(|c| c["type"] == "NetworkUnavailable")
        .and_then(|c| c["status"].as_str().map(str::to_owned))
}

#[test]
fn nodes_join_from_the_api_and_their_pods_reach_each_other_without_nat() -> Result<()> {
    let mut k = KubeLab::new(3)?;
    // What existed on a node when its NetworkUnavailable=False patch arrived, checked as it
    // arrives: the condition must be set last.
    let on_arrival = Arc::new(Mutex::new(Vec::<(String, bool, bool)>::new()));
    let files: HashMap<String, (PathBuf, PathBuf)> = (1..=3)
        .map(|i| {
            let files = (k.lab.subnet_file(i), k.lab.cni_socket(i));
            (format!("n{i}"), files)
        })
        .collect();
    let seen = on_arrival.clone();
    k.api.on_request(move |r| {
        let sets_condition = r.verb == "patch"
            && r.resource == "nodes/status"
            && r.body
                .as_ref()
                .is_some_and(|b| b.to_string().contains("NetworkUnavailable"));
        if let Some((node, (subnet, socket))) = r
            .name
            .as_ref()
            .and_then(|n| files.get_key_value(n))
            .filter(|_| sets_condition)
        {
            let mut seen = seen.lock().unwrap_or_else(|e| e.into_inner());
            seen.push((node.clone(), subnet.exists(), socket.exists()));
        }
    });
    k.start_all_meshed()?;
    for i in 1..=3 {
        let name = format!("n{i}");
        let (subnet, ip, mac) = k.own(i)?;
        ensure!(
            subnet == pod_cidr(i),
            "node {i} runs {subnet}, not its podCIDR"
        );
        // flanneld's exact annotation values: flanneld nodes and other consumers parse them.
        let ann = |key| k.annotation(&name, key);
        ensure!(ann("kube-subnet-manager").as_deref() == Some("true"));
        ensure!(ann("backend-type").as_deref() == Some("vxlan"));
        ensure!(
            ann("public-ip") == Some(ip.clone()),
            "public-ip {:?}",
            ann("public-ip")
        );
        let data = ann("backend-data").unwrap_or_default();
        ensure!(
            data == format!(r#"{{"VNI":1,"VtepMAC":"{mac}"}}"#),
            "backend-data {data:?} is not flannel's format for {mac}"
        );
        // Set after the node is ready, with a strategic merge patch: kubelet's Ready stays.
        wait_until(Duration::from_secs(30), || {
            k.node(&name)
                .is_ok_and(|n| network_unavailable(&n).as_deref() == Some("False"))
        })
        .context("NetworkUnavailable never became False")?;
        let n = k.node(&name)?;
        ensure!(
            n["status"]["conditions"]
                .as_array()
                .is_some_and(|c| c.iter().any(|c| c["type"] == "Ready")),
            "the Ready condition was lost: {n}"
        );
        let arrivals: Vec<_> = on_arrival
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .filter(|(n, ..)| *n == name)
            .cloned()
            .collect();
        ensure!(
            !arrivals.is_empty()
                && arrivals
                    .iter()
                    .all(|(_, subnet, socket)| *subnet && *socket),
            "node {i}'s NetworkUnavailable patches came before its subnet file or CNI socket \
             existed (node, subnet file, socket): {arrivals:?}"
        );
    }
    let mut pods = Vec::new();
    for i in 1..=3 {
        pods.push(k.add_pod(i, "default", &format!("a{i}"), &[("app", "a")])?);
    }
    for a in &pods {
        for b in pods.iter().filter(|b| b.id != a.id) {
            wait_until(Duration::from_secs(10), || a.ping(b.ip))
                .with_context(|| format!("pod {} cannot ping pod {}", a.id, b.id))?;
            let probe = twill_tests::tcp_probe(a, b, 7777, Duration::from_secs(5))?;
            ensure!(
                probe.source_seen == a.ip,
                "pod {} saw {} instead of {}: NAT in the path",
                b.id,
                probe.source_seen,
                a.ip
            );
        }
    }
    // Kubelet heartbeats of other nodes make twilld write nothing.
    k.api.clear_requests();
    for _ in 0..5 {
        for i in 1..=3 {
            k.api.heartbeat(&format!("n{i}"))?;
        }
    }
    // A barrier instead of a sleep: a Node joining after the heartbeats reaches each twilld
    // after them (one ordered watch stream), so once every node has programmed it, they had
    // all been read.
    let (name, ip, subnet) = ("n9", "198.18.0.9", "10.244.9.0/24");
    k.api.add_node(name, ip, Some(subnet))?;
    k.annotate(name, &flanneld("0a:58:0a:f4:09:01", ip))?;
    for i in 1..=3 {
        wait_until(CONVERGE, || k.has_route(i, subnet)).with_context(|| {
            format!("node {i} never programmed the Node joining after the heartbeats")
        })?;
    }
    ensure!(
        k.api.client_writes() == 0,
        "heartbeats were answered with writes: {:?}",
        k.api.requests()
    );
    for p in &pods {
        k.lab.del_pod(p)?;
    }
    Ok(())
}

#[test]
fn deleted_nodes_wiped_annotations_and_podcidr_changes_are_followed() -> Result<()> {
    let mut k = KubeLab::new(3)?;
    k.start_all_meshed()?;
    let mac1 = k.own(1)?.2;

    // A Node deleted while node 1's twilld is down is gone from node 1 when it is back (the
    // relist is diffed against the kernel: flannel #2554).
    k.lab.stop_daemon(1)?;
    k.api.delete(Kind::Node, "", "n3")?;
    k.start(1)?;
    k.lab.wait_ready(1, READY)?;
    wait_until(CONVERGE, || !k.has_route(1, &pod_cidr(3)))
        .context("node 1 kept the route of a Node deleted while it was down")?;
    wait_until(CONVERGE, || !k.has_route(2, &pod_cidr(3)))
        .context("node 2 kept the route of a deleted Node")?;
    k.wait_mesh(&[1, 2])?;
    ensure!(k.own(1)?.2 == mac1, "the VTEP MAC changed across a restart");
    ensure!(
        k.own(1)?.0 == pod_cidr(1),
        "the subnet changed across a restart"
    );

    // Another controller wipes our annotations: twilld puts them back, also when its first
    // patch fails and nothing about the Node changes after that.
    k.api.clear_requests();
    k.api.fail_next(1, Failure::Internal);
    k.api.wipe_annotations("n2")?;
    wait_until(Duration::from_secs(20), || {
        k.annotation("n2", "backend-data").is_some() && k.annotation("n2", "public-ip").is_some()
    })
    .context("node 2's annotations were not restored")?;
    // (An injected failure is answered before routing, so it is found by path.)
    let patches: Vec<u16> = k
        .api
        .requests()
        .iter()
        .filter(|r| r.method == "PATCH" && r.path == "/api/v1/nodes/n2/status")
        .map(|r| r.code)
        .collect();
    ensure!(
        patches.first() == Some(&500) && patches.last() == Some(&200),
        "expected a failed patch, then one that took: {patches:?}"
    );

    // A podCIDR change is a new subnet: its node moves, the others follow.
    k.api.set_pod_cidrs("n2", &["10.244.22.0/24"])?;
    wait_until(CONVERGE, || k.own(2).is_ok_and(|o| o.0 == "10.244.22.0/24"))
        .context("node 2 never took its new podCIDR")?;
    wait_until(CONVERGE, || {
        k.has_route(1, "10.244.22.0/24") && !k.has_route(1, &pod_cidr(2))
    })
    .with_context(|| {
        format!(
            "node 1 did not follow node 2's podCIDR: {:?}",
            k.lab.entries(1, DEV)
        )
    })?;
    Ok(())
}

#[test]
fn an_api_server_outage_loses_no_packets_and_a_relist_catches_up() -> Result<()> {
    let mut k = KubeLab::new(2)?;
    k.start_all_meshed()?;
    let a = k.add_pod(1, "default", "a", &[])?;
    let b = k.add_pod(2, "default", "b", &[])?;
    wait_until(Duration::from_secs(10), || a.ping(b.ip))?;
    let stream = UdpStream::start(
        &a,
        &b,
        StreamOptions {
            duration: Duration::from_secs(120),
            ..Default::default()
        },
    )?;
    stream.wait_flowing(Duration::from_secs(10))?;
    k.api.go_down()?;
    std::thread::sleep(Duration::from_secs(60));
    for i in 1..=2 {
        ensure!(
            k.lab.daemon_running(i),
            "twilld on node {i} exited during the outage"
        );
    }
    // Meanwhile a node joins, annotated as flanneld annotates its Node: seen once the API is
    // back (the watches resume from where they were).
    k.api.add_node("n9", "198.18.0.99", Some("10.244.9.0/24"))?;
    k.annotate("n9", &flanneld("0a:58:0a:f4:09:01", "198.18.0.99"))?;
    k.api.come_back()?;
    let report = stream.finish()?;
    ensure!(
        report.lost_count() == 0 && report.received > 0,
        "packets lost during the API outage: {}",
        report.summary()
    );
    // Not ready while the Node list was lost (longer than --lease-list-grace), ready again
    // once it is whole.
    for i in 1..=2 {
        wait_until(CONVERGE, || matches!(k.lab.get(i, "/readyz"), Ok((200, _)))).with_context(
            || {
                format!(
                    "node {i} stayed not ready after the API came back: {:?}",
                    k.lab.get(i, "/readyz")
                )
            },
        )?;
    }
    for i in 1..=2 {
        wait_until(CONVERGE, || k.has_route(i, "10.244.9.0/24")).with_context(|| {
            format!("node {i} never programmed a node written as flanneld writes it")
        })?;
        let e = k.lab.entries(i, DEV)?;
        ensure!(
            e.has_peer("10.244.9.0/24", "0a:58:0a:f4:09:01", "198.18.0.99"),
            "node {i}: flanneld-style node programmed wrongly: {e:?}"
        );
    }
    // A forced relist (history compacted, watches cut) changes nothing.
    k.api.compact();
    k.api.drop_watches();
    std::thread::sleep(Duration::from_secs(3));
    k.wait_mesh(&[1, 2])?;
    ensure!(k.has_route(1, "10.244.9.0/24"));
    k.lab.del_pod(&a)?;
    k.lab.del_pod(&b)?;
    Ok(())
}

/// A TCP exchange with `to`'s server on port 80 (`twill_tests::netpol::Servers`).
fn reaches(from: &Pod, to: &Pod) -> bool {
    twill_tests::netpol::probe(
        &from.netns_path(),
        to.ip.into(),
        80,
        netpol::model::Protocol::Tcp,
    )
}

/// In namespace x, only app=client may reach app=server, on TCP 80.
fn server_from_clients() -> Value {
    serde_json::json!({
        "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
        "metadata": {"name": "server-from-clients", "namespace": "x"},
        "spec": {
            "podSelector": {"matchLabels": {"app": "server"}},
            "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": "client"}}}],
                         "ports": [{"protocol": "TCP", "port": 80}]}]
        }
    })
}

#[test]
fn network_policy_from_the_api_is_enforced_and_follows_label_changes() -> Result<()> {
    let mut k = KubeLab::new(2)?;
    k.start_all_meshed()?;
    let server = k.add_pod(1, "x", "server", &[("app", "server")])?;
    let client = k.add_pod(2, "x", "client", &[("app", "client")])?;
    let other = k.add_pod(2, "x", "other", &[("app", "other")])?;
    let _servers = twill_tests::netpol::Servers::start(&[&server])?;
    for p in [&client, &other] {
        wait_until(Duration::from_secs(10), || reaches(p, &server))
            .with_context(|| format!("{} never reached the server before any policy", p.id))?;
    }
    // Only app=client may reach the server, on 80.
    k.api.add_network_policy(server_from_clients())?;
    wait_until(CONVERGE, || !reaches(&other, &server))
        .context("the policy from the API never closed the server to app=other")?;
    wait_until(Duration::from_secs(5), || reaches(&client, &server))
        .context("app=client lost the server")?;
    // Another node's new pod (created, bound, then given its address, as kubelet reports it)
    // is only its own delta on node 1: its address joins the peer set, no compile.
    let metric = |lab: &Lab, name: &str| lab.metric(1, name).map(|v| v.unwrap_or(0.0));
    let (syncs, fast) = (
        metric(&k.lab, "twill_policy_syncs_total")?,
        metric(&k.lab, "twill_policy_fast_syncs_total")?,
    );
    let client2 = k.add_pod(2, "x", "client2", &[("app", "client")])?;
    wait_until(CONVERGE, || reaches(&client2, &server))
        .context("a new app=client pod on another node never reached the server")?;
    ensure!(
        metric(&k.lab, "twill_policy_syncs_total")? == syncs
            && metric(&k.lab, "twill_policy_fast_syncs_total")? > fast,
        "node 1 compiled for another node's new pod: syncs {syncs} -> {:?}, fast {fast} -> {:?}",
        metric(&k.lab, "twill_policy_syncs_total"),
        metric(&k.lab, "twill_policy_fast_syncs_total")
    );
    k.lab.del_pod(&client2)?;
    // A peer's label change in the API: it is let in.
    k.set_pod_labels("x", "other", &[("app", "client")])?;
    wait_until(CONVERGE, || reaches(&other, &server))
        .context("a peer relabelled app=client in the API was never let in")?;
    // The target's label change: no longer selected, open to all.
    k.set_pod_labels("x", "other", &[("app", "other")])?;
    wait_until(CONVERGE, || !reaches(&other, &server))
        .context("relabelled back, the peer was never shut out again")?;
    k.set_pod_labels("x", "server", &[("app", "web")])?;
    wait_until(CONVERGE, || reaches(&other, &server))
        .context("the server, no longer selected, stayed closed")?;
    // A pod whose object the API does not have is refused (retried by the runtime), not
    // started without its policy.
    let cfg = k.lab.cni_config(1, "1.0.0");
    let err = k
        .lab
        .add_pod_with(
            1,
            "ghost",
            "IgnoreUnknown=1;K8S_POD_NAMESPACE=x;K8S_POD_NAME=ghost",
            &cfg,
        )
        .err()
        .ok_or_else(|| anyhow!("ADD of a pod the API does not know succeeded"))?;
    ensure!(
        format!("{err:#}").contains("not in the Kubernetes API"),
        "unexpected refusal: {err:#}"
    );
    for p in [&server, &client, &other] {
        k.lab.del_pod(p)?;
    }
    Ok(())
}

/// One node; x/server, x/client and x/other; the server-from-clients policy in force. What the
/// tests below start from.
struct ServerLab {
    k: KubeLab,
    server: Pod,
    client: Pod,
    other: Pod,
    _servers: twill_tests::netpol::Servers,
}

impl ServerLab {
    fn start() -> Result<ServerLab> {
        let mut k = KubeLab::new(1)?;
        k.start_all_meshed()?;
        let server = k.add_pod(1, "x", "server", &[("app", "server")])?;
        let client = k.add_pod(1, "x", "client", &[("app", "client")])?;
        let other = k.add_pod(1, "x", "other", &[("app", "other")])?;
        let _servers = twill_tests::netpol::Servers::start(&[&server])?;
        k.api.add_network_policy(server_from_clients())?;
        let s = ServerLab {
            k,
            server,
            client,
            other,
            _servers,
        };
        wait_until(CONVERGE, || s.policy_holds().is_ok())
            .context("the policy never took effect")?;
        Ok(s)
    }

    /// The server isolated, app=client let in.
    fn policy_holds(&self) -> Result<()> {
        ensure!(
            !reaches(&self.other, &self.server),
            "the server is not isolated"
        );
        wait_until(Duration::from_secs(5), || {
            reaches(&self.client, &self.server)
        })
        .context("app=client does not reach the server")
    }

    /// `policy_holds`, through a compile or two.
    fn policy_keeps_holding(&self) -> Result<()> {
        for _ in 0..5 {
            self.policy_holds()?;
            std::thread::sleep(Duration::from_millis(400));
        }
        Ok(())
    }

    /// The server's record in the state dir.
    fn record(&self) -> Result<std::path::PathBuf> {
        let port = self.server.result["interfaces"][0]["name"]
            .as_str()
            .context("no host interface in the ADD result")?;
        Ok(self
            .k
            .lab
            .state_dir(1)
            .join("pods")
            .join(format!("{port}.json")))
    }

    fn del_all(mut self) -> Result<()> {
        for p in [&self.server, &self.client, &self.other] {
            self.k.lab.del_pod(p)?;
        }
        Ok(())
    }
}

/// A retried ADD of a running pod after its node's podCIDR changed gets a new address from the
/// new subnet and then fails (the pod's interface exists). Its failure must leave the running
/// pod's policy as it was: before, it dropped the pod's record (the ADD looked like a new
/// attachment, every address of it new), and the pod was open to everyone.
#[test]
fn a_failed_re_add_after_a_podcidr_change_keeps_the_running_pods_policy() -> Result<()> {
    let mut s = ServerLab::start()?;

    // The node moves; its running pods keep their addresses (same bridge, same old /24).
    s.k.api.set_pod_cidrs("n1", &["10.244.31.0/24"])?;
    // subnet.env is written once the CNI side has the new subnet too.
    wait_until(CONVERGE, || {
        std::fs::read_to_string(s.k.lab.subnet_file(1)).is_ok_and(|e| e.contains("10.244.31."))
    })
    .context("node 1 never took its new podCIDR")?;
    s.policy_holds()
        .context("the policy changed with the podCIDR alone")?;

    let cfg = s.k.lab.cni_config(1, "1.0.0");
    let out = s.k.lab.cni_with_args(
        1,
        "ADD",
        &s.server.id,
        &s.server.netns_path(),
        &s.server.ifname,
        "IgnoreUnknown=1;K8S_POD_NAMESPACE=x;K8S_POD_NAME=server",
        &cfg,
    )?;
    ensure!(
        !out.success && out.stdout.contains("already exists"),
        "a second ADD of a running pod: {} {}",
        out.stdout,
        out.stderr
    );
    // Its record is put back as it was: its own address only, not the one the failed ADD got.
    let record = s.record()?;
    let ips = || -> Option<Vec<String>> {
        let rec: Value = serde_json::from_slice(&std::fs::read(&record).ok()?).ok()?;
        rec["pod"]["status"]["podIPs"]
            .as_array()?
            .iter()
            .map(|a| a["ip"].as_str().map(str::to_owned))
            .collect()
    };
    wait_until(Duration::from_secs(10), || {
        ips() == Some(vec![s.server.ip.to_string()])
    })
    .with_context(|| format!("the running pod's record after the failed ADD: {:?}", ips()))?;
    s.policy_keeps_holding()
        .context("the running pod lost its policy to the failed ADD")?;
    s.del_all()
}

/// A pod whose record in the state dir cannot be read after a restart is cut off until the
/// API's pod with its addresses comes, which gives its record back: the policy that selects it
/// holds again, and nothing is left cut off. (The etcd-mode counterpart, with a pod that has
/// no object and stays cut off, is in tests/netpol.rs.)
#[test]
fn a_pod_with_an_unreadable_record_is_recognised_from_the_api() -> Result<()> {
    let mut s = ServerLab::start()?;
    let record = s.record()?;
    let app = || -> Option<String> {
        let rec: Value = serde_json::from_slice(&std::fs::read(&record).ok()?).ok()?;
        rec["pod"]["metadata"]["labels"]["app"]
            .as_str()
            .map(str::to_owned)
    };
    ensure!(
        app().as_deref() == Some("server"),
        "no record at {}",
        record.display()
    );

    s.k.lab.stop_daemon(1)?;
    std::fs::write(&record, b"[]")?;
    s.k.start(1)?;
    s.k.lab.wait_ready(1, READY)?;
    wait_until(CONVERGE, || app().as_deref() == Some("server"))
        .with_context(|| format!("the record never came back: {}", s.k.lab.daemon_log_last(1)))?;
    let log = s.k.lab.daemon_log_last(1);
    ensure!(
        log.contains("unreadable pod record") && log.contains("recognised by its addresses"),
        "the log does not say what happened:\n{log}"
    );
    wait_until(CONVERGE, || {
        s.k.lab
            .status(1)
            .is_ok_and(|s| s["policy"]["source_check"]["closed"] == serde_json::json!([]))
    })
    .context("the recognised pod is still cut off")?;
    ensure!(
        !record.with_extension("unreadable").exists(),
        "the unreadable record is still kept"
    );
    // Isolated as before, reachable from app=client (its replies get out: not cut off).
    s.policy_keeps_holding()
        .context("the recognised pod has not its policy back")?;
    s.del_all()
}

/// An ADD whose pod the watch has not delivered reads the pod from the API, waiting up to
/// 3 s. That read happens outside the policy task: another pod's ADD meanwhile is answered
/// without waiting for it. (With the API stalled, the read takes its whole 3 s and then
/// refuses the pod, to be retried.)
#[test]
fn an_add_reading_its_pod_from_the_api_holds_up_no_other_add() -> Result<()> {
    let mut k = KubeLab::new(1)?;
    k.start_all_meshed()?;
    // "known" is in the watch's cache: its object is made before another pod's ADD (whose
    // event comes after it).
    k.api.create_value(
        Kind::Namespace,
        serde_json::json!({"metadata": {"name": "x"}}),
    )?;
    k.api.create_value(
        Kind::Pod,
        serde_json::json!({
            "metadata": {"name": "known", "namespace": "x", "labels": {"app": "a"}},
            "spec": {"nodeName": "n1", "containers": [{"name": "c", "image": "busybox"}]},
            "status": {"phase": "Pending"}
        }),
    )?;
    let before = k.add_pod(1, "x", "before", &[("app", "a")])?;

    k.api.stall_for(Duration::from_secs(30));
    let plugin = k.lab.bin("twill")?;
    let node_ns = k.lab.node_ns(1);
    let late_ns = k.lab.pod_ns(1, "late");
    twill_tests::netns::add(&late_ns)?;
    let cfg = k.lab.cni_config(1, "1.0.0");
    let late = std::thread::spawn(move || {
        let call = twill_tests::pod::CniCall {
            command: "ADD",
            container_id: "late",
            netns_path: &format!("/run/netns/{late_ns}"),
            ifname: "eth0",
            cni_args: "IgnoreUnknown=1;K8S_POD_NAMESPACE=x;K8S_POD_NAME=late",
        };
        twill_tests::pod::exec_plugin(&plugin, &node_ns, &call, &cfg)
    });
    // Let the late ADD reach its read of the API first.
    std::thread::sleep(Duration::from_millis(500));
    let cfg = k.lab.cni_config(1, "1.0.0");
    let t = std::time::Instant::now();
    let known = k.lab.add_pod_with(
        1,
        "known",
        "IgnoreUnknown=1;K8S_POD_NAMESPACE=x;K8S_POD_NAME=known",
        &cfg,
    );
    let took = t.elapsed();
    k.api.unstall();
    let late = late
        .join()
        .map_err(|_| anyhow!("the late ADD's thread panicked"))??;
    let known = known.context("the ADD of a pod the watch had delivered failed")?;
    // Had it waited behind the late read, it would have taken the rest of its 3 s (2.5 s);
    // alone, an ADD takes a tenth of that here, even in a debug build on a busy machine.
    ensure!(
        took < Duration::from_secs(2),
        "the ADD of a pod in the watch's cache took {took:?}: it waited for the late ADD's \
         read of the API"
    );
    ensure!(
        !late.success && late.stdout.contains("in time"),
        "the late ADD, its API read stalled, was not refused as not ready: {} {}",
        late.stdout,
        late.stderr
    );
    for p in [&known, &before] {
        k.lab.del_pod(p)?;
    }
    Ok(())
}

/// A StatefulSet's pod re-created under its name with other labels, while this node's watch
/// still has the earlier pod (the watch lags behind the API; held here): the ADD carries the
/// new pod's uid (`K8S_POD_UID`, as kubelet sends it), so the earlier pod's labels are not
/// taken for it; the new pod's object is read from the API. While the API itself still has
/// only the earlier pod, the ADD is refused (the runtime retries).
#[test]
fn a_pod_re_created_under_its_name_gets_its_own_labels_not_the_earlier_pods() -> Result<()> {
    let mut k = KubeLab::new(1)?;
    k.start_all_meshed()?;
    let client = k.add_pod(1, "x", "client", &[("app", "client")])?;
    let old = k.add_pod(1, "x", "web-0", &[("app", "locked")])?;
    k.api.add_network_policy(serde_json::json!({
        "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
        "metadata": {"name": "locked", "namespace": "x"},
        "spec": {"podSelector": {"matchLabels": {"app": "locked"}}, "policyTypes": ["Ingress"]}
    }))?;
    {
        let _servers = twill_tests::netpol::Servers::start(&[&old])?;
        wait_until(CONVERGE, || !reaches(&client, &old))
            .context("the app=locked pod was never closed")?;
        // Relabelled in the API: once it is open, the watch has delivered the earlier pod with
        // app=open, and that is what the held watch keeps.
        k.set_pod_labels("x", "web-0", &[("app", "open")])?;
        wait_until(CONVERGE, || reaches(&client, &old))
            .context("web-0 relabelled app=open was never opened")?;
    }
    k.api.hold_watches_for(Duration::from_secs(120));
    let result = (|| -> Result<()> {
        k.lab.del_pod(&old)?;
        let cfg = k.lab.cni_config(1, "1.0.0");
        let args = |uid: &str| {
            format!("IgnoreUnknown=1;K8S_POD_NAMESPACE=x;K8S_POD_NAME=web-0;K8S_POD_UID={uid}")
        };
        // The API has only the earlier web-0 yet: refused, not started with its labels.
        let err = k
            .lab
            .add_pod_with(1, "web-0a", &args("fa4e0000-not-created-yet"), &cfg)
            .err()
            .ok_or_else(|| anyhow!("ADD of a web-0 the API does not have yet succeeded"))?;
        ensure!(
            format!("{err:#}").contains("earlier pod of that name"),
            "unexpected refusal: {err:#}"
        );
        k.api.delete(Kind::Pod, "x", "web-0")?;
        let created = k.api.create_value(
            Kind::Pod,
            serde_json::json!({
                "metadata": {"name": "web-0", "namespace": "x", "labels": {"app": "locked"}},
                "spec": {"nodeName": "n1", "containers": [{"name": "c", "image": "busybox"}]},
                "status": {"phase": "Pending"}
            }),
        )?;
        let uid = created["metadata"]["uid"]
            .as_str()
            .ok_or_else(|| anyhow!("the fake gave web-0 no uid: {created}"))?
            .to_string();
        let new = k.lab.add_pod_with(1, "web-0b", &args(&uid), &cfg)?;
        let _servers = twill_tests::netpol::Servers::start(&[&new])?;
        // Given a moment in which a wrong opening would show.
        let open = wait_until(Duration::from_secs(3), || reaches(&client, &new)).is_ok();
        ensure!(
            !open,
            "the re-created web-0 (app=locked) was open: it got the earlier pod's labels"
        );
        k.api.release_watches();
        std::thread::sleep(Duration::from_secs(2));
        ensure!(
            !reaches(&client, &new),
            "the re-created web-0 opened once the watch caught up"
        );
        k.lab.del_pod(&new)
    })();
    k.api.release_watches();
    result?;
    k.lab.del_pod(&client)
}

#[test]
fn a_node_waits_for_its_podcidr_and_says_so() -> Result<()> {
    let mut k = KubeLab::new(1)?;
    k.api.set_pod_cidrs("n1", &[])?;
    k.start(1)?;
    wait_until(READY, || {
        k.lab
            .get(1, "/readyz")
            .is_ok_and(|(code, body)| code == 503 && body.contains("podCIDR"))
    })
    .with_context(|| {
        format!(
            "/readyz never said it waits for the podCIDR: {:?}",
            k.lab.get(1, "/readyz")
        )
    })?;
    ensure!(k.lab.daemon_running(1), "twilld exited without a podCIDR");
    ensure!(
        k.annotation("n1", "backend-data").is_none(),
        "annotations published before the node had a subnet"
    );
    k.api.set_pod_cidrs("n1", &["10.244.7.0/24"])?;
    k.lab.wait_ready(1, READY)?;
    ensure!(k.own(1)?.0 == "10.244.7.0/24");
    ensure!(k.annotation("n1", "kube-subnet-manager").as_deref() == Some("true"));
    Ok(())
}

/// Without --node-name or NODE_NAME, as in flannel's DaemonSet: the name is our pod's
/// spec.nodeName (POD_NAME/POD_NAMESPACE from the downward API); half of that pair is an error
/// that says what is missing.
#[test]
fn the_node_name_comes_from_our_pod_when_not_given() -> Result<()> {
    let mut k = KubeLab::new(1)?;
    let mut args = k.args(1);
    let at = args
        .iter()
        .position(|a| a == "--node-name")
        .ok_or_else(|| anyhow!("the lab no longer passes --node-name: {args:?}"))?;
    args.drain(at..at + 2);

    k.lab
        .start_daemon_args(1, &args, &[("POD_NAME", "twill-x1")])?;
    wait_until(Duration::from_secs(30), || !k.lab.daemon_running(1))
        .context("twilld ran with POD_NAME but no POD_NAMESPACE")?;
    let log = k.lab.daemon_log_last(1);
    ensure!(
        log.contains("POD_NAMESPACE"),
        "the error does not name what is missing: {log}"
    );

    // Our pod is host-network, on n1; the machine's host name is not n1.
    k.api.add_namespace("kube-flannel", &[])?;
    k.api.create_value(
        Kind::Pod,
        serde_json::json!({
            "metadata": {"name": "twill-x1", "namespace": "kube-flannel"},
            "spec": {"nodeName": "n1", "hostNetwork": true,
                     "containers": [{"name": "twilld", "image": "twill"}]}
        }),
    )?;
    let env = [("POD_NAME", "twill-x1"), ("POD_NAMESPACE", "kube-flannel")];
    k.lab.start_daemon_args(1, &args, &env)?;
    k.lab.wait_ready(1, READY)?;
    ensure!(
        k.own(1)?.0 == pod_cidr(1),
        "node 1 did not take n1's podCIDR"
    );
    ensure!(
        k.annotation("n1", "kube-subnet-manager").as_deref() == Some("true"),
        "n1 carries no annotations: twilld took another name"
    );
    Ok(())
}

/// The upstream e2e NetworkPolicy cases (the etcd-mode suite's table), driven through the API:
/// policies, namespace labels and pod labels written as Kubernetes objects.
#[test]
fn upstream_e2e_cases_hold_through_the_api() -> Result<()> {
    use netpol::fixtures::{self, Check};
    use netpol::model::Protocol;
    use twill_tests::netpol::World;
    const SETTLE: Duration = Duration::from_secs(20);
    let KubeLab { mut lab, api } = {
        let mut k = KubeLab::new(3)?;
        k.start_all_meshed()?;
        k
    };
    let api = std::sync::Arc::new(api);
    wait_until(Duration::from_secs(30), || {
        (1..=3).all(|i| lab.status(i).is_ok_and(|s| s["policy"]["loaded"] == true))
    })
    .context("the policy state never loaded from the API")?;
    let mut world = World::new_in_api(&mut lab, api.clone())?;
    let all_allowed = Check {
        protocol: Protocol::Tcp,
        port: 80,
        expect: Vec::new(),
    };
    world.wait_matrix(&all_allowed, SETTLE)?;
    let (mut failures, mut checked) = (Vec::new(), 0);
    for case in fixtures::e2e_cases() {
        world.reset(&lab)?;
        world
            .wait_matrix(&all_allowed, SETTLE)
            .with_context(|| format!("resetting before {}", case.id))?;
        'steps: for (n, step) in case.steps.iter().enumerate() {
            for a in &step.actions {
                world.apply(&lab, a)?;
            }
            for check in step.checks.iter().filter(|c| c.protocol != Protocol::Sctp) {
                checked += 1;
                if let Err(e) = world.wait_matrix(check, SETTLE) {
                    failures.push(format!("{} ({}) step {n}: {e:#}", case.id, case.title));
                    break 'steps;
                }
            }
        }
    }
    ensure!(
        failures.is_empty(),
        "{} of the cases failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
    ensure!(checked > 60, "only {checked} checks ran");
    drop(world);
    drop(lab);
    Ok(())
}

/// A Node that joins right behind a burst of heartbeats (a big cluster's steady state), and one
/// that joins after a quiet spell, are both programmed promptly: the heartbeats are read through
/// and do not hold the join up. (A read-in-bursts variant of the Node watch once took 20 s
/// for this.)
#[test]
fn a_node_joining_during_heartbeats_is_programmed() -> Result<()> {
    let mut k = KubeLab::new(2)?;
    k.start_all_meshed()?;
    let join = |k: &KubeLab, n: u32| -> Result<()> {
        let name = format!("n{n}");
        let ip = format!("198.18.0.{n}");
        k.api
            .add_node(&name, &ip, Some(&format!("10.244.{n}.0/24")))?;
        k.annotate(&name, &flanneld(&format!("0a:58:0a:f4:{n:02x}:01"), &ip))
    };
    for n in [50, 51] {
        for _ in 0..200 {
            k.api.heartbeat("n2")?;
        }
        if n == 51 {
            std::thread::sleep(Duration::from_secs(1));
        }
        join(&k, n)?;
        let subnet = format!("10.244.{n}.0/24");
        wait_until(Duration::from_secs(10), || k.has_route(1, &subnet)).with_context(|| {
            format!(
                "node 1 did not program n{n} within 10 s: {:?}",
                k.lab.entries(1, DEV)
            )
        })?;
    }
    Ok(())
}

/// A node that ran flanneld (its Node annotated as flanneld annotates it) moves to twilld: same
/// subnet (its podCIDR), same VTEP MAC (taken over from backend-data, the state dir being new),
/// so its peers' entries stay valid and its annotations need no rewrite.
#[test]
fn a_node_moving_from_flanneld_keeps_its_subnet_and_vtep_mac() -> Result<()> {
    let mut k = KubeLab::new(2)?;
    let mac = "0a:58:0a:f4:01:01";
    let ip = k.lab.node_ip(1).to_string();
    k.annotate("n1", &flanneld(mac, &ip))?;
    k.start_all_meshed()?;
    let (subnet, _, own_mac) = k.own(1)?;
    ensure!(subnet == pod_cidr(1), "node 1 runs {subnet}");
    ensure!(
        own_mac == mac,
        "node 1 made a new VTEP MAC {own_mac} instead of flanneld's {mac}"
    );
    ensure!(
        k.lab.entries(2, DEV)?.has_peer(&subnet, mac, &ip),
        "node 2 does not reach node 1 at flanneld's MAC"
    );
    let rewrites: Vec<_> = k
        .api
        .node_patches("n1")
        .into_iter()
        .filter(|p| !p.body["metadata"]["annotations"].is_null())
        .collect();
    ensure!(
        rewrites.is_empty(),
        "flanneld's annotations were rewritten: {rewrites:?}"
    );
    Ok(())
}

/// The same when the API server is away as twilld starts (at boot, before kube-proxy makes
/// the Service address work; a control-plane outage): twilld waits to read its Node rather
/// than start on the address it would pick itself and publish that (flannel #1978).
#[test]
fn the_node_public_ip_annotation_wins_also_when_the_api_is_late() -> Result<()> {
    let mut k = KubeLab::new(2)?;
    let second = k.annotate_second_address(1)?;
    k.api.go_down()?;
    // SIGTERM ends the wait.
    k.start(1)?;
    std::thread::sleep(Duration::from_secs(3));
    let st = k.lab.stop_daemon(1)?;
    ensure!(st.success(), "twilld waiting for the API ended with {st}");
    k.start(1)?;
    // Longer than the one quick read twilld used to make before taking its own choice.
    std::thread::sleep(Duration::from_secs(8));
    ensure!(
        k.lab.daemon_running(1),
        "twilld exited while the API was away"
    );
    ensure!(
        k.lab.get(1, "/healthz").is_ok_and(|(code, _)| code == 200),
        "/healthz does not answer while twilld waits for the API"
    );
    k.api.come_back()?;
    k.start(2)?;
    for i in [1, 2] {
        k.lab.wait_ready(i, READY)?;
    }
    k.wait_mesh(&[1, 2])?;
    k.runs_on(1, second)?;
    Ok(())
}

/// An operator's `node-public-ip` annotation is the node's public IP, as flanneld takes it:
/// published as `public-ip`, the VXLAN source and the address its peers send to.
#[test]
fn the_node_public_ip_annotation_is_the_nodes_public_ip() -> Result<()> {
    let mut k = KubeLab::new(2)?;
    let second = k.annotate_second_address(1)?;
    // `start_all_meshed` waits for node 2 to program node 1 at the public IP node 1 reports.
    k.start_all_meshed()?;
    k.runs_on(1, second)?;
    let (_, ip2, _) = k.own(2)?;
    ensure!(
        ip2 == k.lab.node_ip(2).to_string(),
        "node 2 (no annotation) runs with {ip2}"
    );
    let a = k.add_pod(1, "default", "a", &[])?;
    let b = k.add_pod(2, "default", "b", &[])?;
    wait_until(Duration::from_secs(10), || b.ping(a.ip))
        .context("node 2's pod cannot reach node 1's through the annotated address")?;
    ensure!(k.lab.daemon_log(1).contains("node-public-ip"));
    k.lab.del_pod(&a)?;
    k.lab.del_pod(&b)?;
    Ok(())
}

/// A Node announcing another Node's VTEP MAC at another address (a copied state dir) is held
/// back and counted: the kernel keeps one remote per MAC, and the first Node keeps its traffic.
#[test]
fn a_node_announcing_anothers_vtep_mac_is_held_back() -> Result<()> {
    let mut k = KubeLab::new(2)?;
    k.start_all_meshed()?;
    let (subnet1, ip1, mac1) = k.own(1)?;
    let clone_net = "10.244.9.0/24";
    let clone_ip = "198.18.0.99";
    let data = |mac: &str| format!(r#"{{"VNI":1,"VtepMAC":"{mac}"}}"#);
    // The older Node keeps a MAC, then the first by name: creationTimestamp has whole seconds,
    // and this Node may come in node 1's second; its name sorts after "n1" either way.
    // Annotated before its podCIDR: a Node is a peer candidate only with both, so its first
    // skip is the copied MAC (a key's skips are logged once per 10 minutes).
    k.api.add_node("n9-clone", clone_ip, None)?;
    k.annotate("n9-clone", &flanneld(&mac1, clone_ip))?;
    k.api.set_pod_cidrs("n9-clone", &[clone_net])?;
    wait_until(CONVERGE, || {
        k.lab
            .metric(2, "twill_duplicate_vtep_macs_total")
            .ok()
            .flatten()
            .is_some_and(|v| v >= 1.0)
    })
    .context("node 2 did not count the copied MAC")?;
    ensure!(
        !k.has_route(2, clone_net),
        "node 2 routed the Node with a copied MAC"
    );
    ensure!(
        k.lab.entries(2, DEV)?.has_peer(&subnet1, &mac1, &ip1),
        "node 1's entries on node 2 were taken over: {:?}",
        k.lab.entries(2, DEV)
    );
    let log = k.lab.daemon_log(2);
    ensure!(
        log.contains("(a copied state dir?)"),
        "{}",
        log.lines()
            .filter(|l| l.contains("n9-clone"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    // With a MAC of its own it is a peer.
    k.api.set_node_annotation(
        "n9-clone",
        &format!("{PREFIX}backend-data"),
        Some(&data("0a:58:0a:f4:09:01")),
    )?;
    wait_until(CONVERGE, || k.has_route(2, clone_net))
        .context("the Node with its own MAC was not let in")?;
    ensure!(k.lab.entries(2, DEV)?.has_peer(&subnet1, &mac1, &ip1));
    Ok(())
}

/// `--kube-api-url` is the API server also when the kubeconfig names another (flannel's rule:
/// the URL wins, the kubeconfig's credentials stay). Alone it sends no credentials: the
/// server's refusal is what twilld waits on, and says so.
#[test]
fn the_api_url_wins_over_the_kubeconfig_and_alone_sends_no_credentials() -> Result<()> {
    let mut k = KubeLab::new(1)?;
    let url = k.api.url();
    // The kubeconfig's token is right, its server is not (nothing listens there).
    let kc = k.file(1, "kubeconfig");
    let wrong = std::fs::read_to_string(&kc)?.replace(&url, "http://198.18.0.1:9");
    ensure!(!wrong.contains(&url), "the kubeconfig does not name {url}");
    std::fs::write(&kc, wrong)?;
    let args = twill_tests::lab::merge_args(&k.args(1), &["--kube-api-url", &url]);
    k.lab.start_daemon_args(1, &args, &[])?;
    k.lab.wait_ready(1, READY)?;
    ensure!(
        k.own(1)?.0 == pod_cidr(1),
        "node 1 did not take its podCIDR"
    );
    k.lab.stop_daemon(1)?;

    let nc = k.file(1, "net-conf.json");
    let alone = [
        "--kube-subnet-mgr",
        "--kube-api-url",
        &url,
        "--net-config-path",
        &nc,
    ];
    let args = twill_tests::lab::merge_args(&k.lab.daemon_args(1), &alone);
    k.lab.start_daemon_args(1, &args, &[])?;
    wait_until(Duration::from_secs(20), || {
        k.lab.status(1).is_ok_and(|s| {
            s["waiting_for"]
                .as_str()
                .is_some_and(|w| w.contains("401") && w.contains("--kube-api-url alone"))
        })
    })
    .with_context(|| format!("/status does not say why: {:?}", k.lab.status(1)))?;
    ensure!(
        !matches!(k.lab.get(1, "/readyz"), Ok((200, _))),
        "ready without being able to read its Node"
    );
    ensure!(k
        .lab
        .metric(1, "twill_kube_api_errors_total")?
        .is_some_and(|v| v >= 1.0));
    Ok(())
}

/// In-cluster config, as twilld runs in the DaemonSet: no `--kubeconfig-file` and no
/// `--kube-api-url`, only KUBERNETES_SERVICE_HOST/PORT and the ServiceAccount's token, ca.crt
/// and namespace under /var/run/secrets/kubernetes.io/serviceaccount, with the API served over
/// TLS by the cluster's CA. The files are put there in twilld's own mount namespace (a tmpfs
/// over /var; `ip netns exec` keeps mounts from reaching the host), so the machine's /var is
/// untouched. A rotated token (kubelet rewrites the projected token before it expires) is read
/// again, and requests go on with it once the old one is refused. Node 2 reads a kubeconfig
/// that trusts the same CA.
#[test]
fn in_cluster_config_talks_tls_with_the_service_account_token_and_follows_its_rotation(
) -> Result<()> {
    const SA_DIR: &str = "/var/run/secrets/kubernetes.io/serviceaccount";
    let mut k = KubeLab::new_tls(2)?;
    let sa = k.lab.node_dir(1).join("serviceaccount");
    ensure!(
        !sa.starts_with("/var"),
        "the lab is under /var ({}), which this test hides from twilld: set TMPDIR elsewhere",
        sa.display()
    );
    let user = format!(
        "system:serviceaccount:{}:{}",
        twill_tests::fakeapi::TWILL_SERVICE_ACCOUNT.0,
        twill_tests::fakeapi::TWILL_SERVICE_ACCOUNT.1
    );
    let old = k.api.twill_token().context("no twill ServiceAccount")?;
    std::fs::create_dir(&sa)?;
    std::fs::write(sa.join("token"), &old)?;
    std::fs::copy(k.api.ca_cert().context("no CA")?, sa.join("ca.crt"))?;
    std::fs::write(
        sa.join("namespace"),
        twill_tests::fakeapi::TWILL_SERVICE_ACCOUNT.0,
    )?;
    // Node 2 has a token of its own, so that revoking node 1's leaves it alone.
    let token2 = k.api.new_token_for(&user).context("no token for node 2")?;
    std::fs::write(
        k.lab.node_dir(2).join("kubeconfig"),
        k.api.kubeconfig(&token2),
    )?;

    let nc = k.file(1, "net-conf.json");
    let extra = [
        "--kube-subnet-mgr",
        "--net-config-path",
        &nc,
        "--lease-list-grace",
        "5s",
    ];
    let args = twill_tests::lab::merge_args(&k.lab.daemon_args(1), &extra);
    let script = format!(
        "mount -t tmpfs -o mode=0755,size=1m twill-test-sa /var && mkdir -p {SA_DIR} && \
         cp -- \"$0/token\" \"$0/ca.crt\" \"$0/namespace\" {SA_DIR}/ && exec \"$@\""
    );
    let (host, port) = (
        k.api.addr().ip().to_string(),
        k.api.addr().port().to_string(),
    );
    let sa_str = sa.display().to_string();
    k.lab.start_daemon_wrapped(
        1,
        &["sh", "-c", &script, &sa_str],
        &args,
        &[
            ("KUBERNETES_SERVICE_HOST", &host),
            ("KUBERNETES_SERVICE_PORT", &port),
        ],
    )?;
    k.start(2)?;
    for i in [1, 2] {
        k.lab.wait_ready(i, READY)?;
    }
    k.wait_mesh(&[1, 2])?;
    ensure!(
        k.own(1)?.0 == pod_cidr(1),
        "node 1 did not take its podCIDR"
    );
    let log = k.lab.daemon_log(1);
    ensure!(
        log.contains(&format!("https://{}", k.api.addr())),
        "node 1 does not say it uses the in-cluster API address:\n{log}"
    );
    // Only node 1 writes n1's status: it did, as the ServiceAccount.
    let n1_patched_by = |code: u16| {
        k.api
            .requests()
            .iter()
            .filter(|r| {
                r.method == "PATCH" && r.path == "/api/v1/nodes/n1/status" && r.code == code
            })
            .map(|r| r.user.clone())
            .collect::<Vec<_>>()
    };
    ensure!(
        n1_patched_by(200).contains(&user),
        "node 1 never published its annotations as {user}: {:?}",
        n1_patched_by(200)
    );

    // Rotation: the new token in the file, the old one refused from now on. Node 1's watches
    // are cut and its annotations wiped: putting them back needs a request with the new token.
    // kube's client reads the file again when the token it has is 50 s old.
    let pid = k.lab.daemon_pid(1).context("node 1 is not running")?;
    let live = PathBuf::from(format!("/proc/{pid}/root{SA_DIR}"));
    let new = k.api.new_token_for(&user).context("no new token")?;
    std::fs::write(live.join("token.new"), &new)?;
    std::fs::rename(live.join("token.new"), live.join("token"))?;
    ensure!(k.api.revoke_token(&old), "the old token was not known");
    k.api.clear_requests();
    k.api.drop_watches();
    k.api.wipe_annotations("n1")?;
    wait_until(Duration::from_secs(120), || {
        k.annotation("n1", "backend-data").is_some() && k.annotation("n1", "public-ip").is_some()
    })
    .with_context(|| {
        format!(
            "node 1 did not put its annotations back with the rotated token; patches refused: \
             {}",
            n1_patched_by(401).len()
        )
    })?;
    ensure!(k.lab.daemon_running(1), "node 1's twilld exited");
    k.wait_mesh(&[1, 2])?;
    Ok(())
}

/// `peers6` of node i's /status as (subnet, public_ip, vtep_mac, programmed).
fn peers6(k: &KubeLab, i: usize) -> Vec<(String, String, String, bool)> {
    let Ok(st) = k.lab.status(i) else {
        return Vec::new();
    };
    st["peers6"]
        .as_array()
        .map(|ps| {
            ps.iter()
                .map(|p| {
                    let f = |k: &str| p[k].as_str().unwrap_or_default().to_ascii_lowercase();
                    (
                        f("subnet"),
                        f("public_ip"),
                        f("vtep_mac"),
                        p["programmed"] == true,
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

/// Dual stack in Kubernetes mode: each twilld takes the IPv6 entry of its Node's podCIDRs
/// (listed first) as its IPv6 subnet, publishes flannel's `backend-v6-data` and `public-ipv6`,
/// programs the other Nodes' IPv6 sides (a flanneld one too), takes over the IPv6 VTEP MAC a
/// flanneld published before, and pods reach each other over both families without NAT.
#[test]
fn dual_stack_nodes_publish_and_program_both_families_through_the_api() -> Result<()> {
    let mut k = KubeLab::new_dual(2)?;
    // Node 1 ran flanneld before: its IPv6 VTEP MAC is taken over, not replaced.
    let flannel_mac6 = "0a:58:fd:00:01:01";
    let ip6 = k.lab.node_ip6(1).to_string();
    k.annotate(
        "n1",
        &flanneld_dual(
            "0a:58:0a:f4:01:01",
            &k.lab.node_ip(1).to_string(),
            flannel_mac6,
            &ip6,
        ),
    )?;
    // A flanneld-only dual-stack node, annotated as flanneld writes it.
    let (n9_ip6, n9_mac6) = ("fd00:198:18::99", "0a:58:fd:00:09:01");
    k.api.add_node("n9", "198.18.0.99", None)?;
    k.api
        .set_pod_cidrs("n9", &["10.244.9.0/24", &pod_cidr6(9)])?;
    k.annotate(
        "n9",
        &flanneld_dual("0a:58:0a:f4:09:01", "198.18.0.99", n9_mac6, n9_ip6),
    )?;
    k.start_all_meshed()?;

    let mut sides = Vec::new();
    for i in 1..=2 {
        let st = k.lab.status(i)?;
        let side = &st["node"]["ipv6"];
        let subnet = side["subnet"].as_str().unwrap_or_default().to_string();
        let public = side["public_ip"].as_str().unwrap_or_default().to_string();
        let mac = side["vtep_mac"]
            .as_str()
            .unwrap_or_default()
            .to_ascii_lowercase();
        ensure!(
            subnet == pod_cidr6(i),
            "node {i} runs IPv6 subnet {subnet:?}, not its IPv6 podCIDR: {st}"
        );
        ensure!(public == k.lab.node_ip6(i).to_string(), "node {i}: {st}");
        // flannel's exact values, so flanneld nodes read them.
        let name = format!("n{i}");
        ensure!(
            k.annotation(&name, "backend-v6-data")
                == Some(format!(r#"{{"VNI":1,"VtepMAC":"{mac}"}}"#)),
            "node {i}'s backend-v6-data {:?} for MAC {mac}",
            k.annotation(&name, "backend-v6-data")
        );
        ensure!(k.annotation(&name, "public-ipv6") == Some(public.clone()));
        sides.push((subnet, public, mac));
    }
    ensure!(
        sides[0].2 == flannel_mac6,
        "node 1 made a new IPv6 VTEP MAC {} instead of flanneld's {flannel_mac6}",
        sides[0].2
    );
    ensure!(sides[1].2 != flannel_mac6);
    // Each node programs the other twilld node's IPv6 side and the flanneld node's.
    for (i, other) in [(1, 1), (2, 0)] {
        let (subnet, public, mac) = &sides[other];
        let want = [
            (subnet.clone(), public.clone(), mac.clone(), true),
            (pod_cidr6(9), n9_ip6.to_string(), n9_mac6.to_string(), true),
        ];
        wait_until(CONVERGE, || {
            let got = peers6(&k, i);
            want.iter().all(|w| got.contains(w))
        })
        .with_context(|| format!("node {i}'s IPv6 peers: {:?}", peers6(&k, i)))?;
        let routes = k
            .lab
            .exec_ok(i, &["ip", "-6", "route", "show", "dev", "twill-v6.1"])?;
        ensure!(
            routes.contains(&pod_cidr6(9)),
            "node {i} has no IPv6 route to the flanneld node: {routes}"
        );
    }

    let a = k.add_pod(1, "default", "a", &[])?;
    let b = k.add_pod(2, "default", "b", &[])?;
    let (a6, b6) = (
        a.ip6.context("pod a got no IPv6 address")?,
        b.ip6.context("pod b got no IPv6 address")?,
    );
    ensure!(
        a6.to_string().starts_with("fd00:10:244:1:"),
        "pod a's {a6} is not in node 1's IPv6 podCIDR"
    );
    let seen = twill_tests::pod::pod_to_pod6(&a, &b, 7777)?;
    ensure!(
        seen == std::net::IpAddr::V6(a6),
        "pod b saw {seen}, not {a6}: NAT in the path"
    );
    let seen = twill_tests::pod::pod_to_pod6(&b, &a, 7778)?;
    ensure!(
        seen == std::net::IpAddr::V6(b6),
        "pod a saw {seen}, not {b6}"
    );
    wait_until(Duration::from_secs(10), || a.ping(b.ip)).context("IPv4 between the pods")?;

    // Node 2's IPv6 podCIDR changes (its IPv4 one stays): node 2 moves its IPv6 side, and
    // node 1 follows.
    let moved6 = "fd00:10:244:22::/64";
    k.api.set_pod_cidrs("n2", &[&pod_cidr(2), moved6])?;
    wait_until(CONVERGE, || {
        k.lab.status(2).is_ok_and(|s| {
            s["node"]["ipv6"]["subnet"] == moved6 && s["node"]["subnet"] == pod_cidr(2)
        })
    })
    .context("node 2 never moved to its new IPv6 podCIDR")?;
    wait_until(CONVERGE, || {
        let got = peers6(&k, 1);
        got.iter().any(|p| p.0 == moved6 && p.3) && !got.iter().any(|p| p.0 == sides[1].0)
    })
    .with_context(|| {
        format!(
            "node 1 never followed node 2's IPv6 move: {:?}",
            peers6(&k, 1)
        )
    })?;
    ensure!(
        k.annotation("n2", "public-ipv6") == Some(sides[1].1.clone()),
        "node 2's public-ipv6 changed with its podCIDR"
    );

    // The flanneld node goes: its IPv6 side goes everywhere.
    k.api.delete(Kind::Node, "", "n9")?;
    for i in 1..=2 {
        wait_until(CONVERGE, || {
            !peers6(&k, i).iter().any(|p| p.0 == pod_cidr6(9))
                && k.lab
                    .exec_ok(i, &["ip", "-6", "route", "show", "dev", "twill-v6.1"])
                    .is_ok_and(|r| !r.contains(&pod_cidr6(9)))
        })
        .with_context(|| format!("node {i} kept the deleted node's IPv6 side"))?;
    }
    k.lab.del_pod(&a)?;
    k.lab.del_pod(&b)?;
    Ok(())
}

/// An IPv6-only network in Kubernetes mode: each twilld takes its Node's IPv6 podCIDR,
/// publishes flannel's IPv6 annotations only (an IPv4 pair of an earlier flanneld run goes),
/// programs the other Nodes (an IPv6-only flanneld one too), and pods reach each other over
/// IPv6 without NAT.
#[test]
fn ipv6_only_nodes_publish_and_program_through_the_api() -> Result<()> {
    let mut k = KubeLab::build_with(2, false, true)?;
    for i in 1..=2 {
        k.api.set_pod_cidrs(&format!("n{i}"), &[&pod_cidr6(i)])?;
        std::fs::write(k.lab.node_dir(i).join("net-conf.json"), NET_CONF_ONLY6)?;
    }
    // Node 1 carries an IPv4 pair from an earlier run: peers must not route IPv4 to it.
    k.annotate(
        "n1",
        &flanneld("0a:58:0a:f4:01:01", &k.lab.node_ip(1).to_string()),
    )?;
    let (n9_ip6, n9_mac6) = ("fd00:198:18::99", "0a:58:fd:00:09:01");
    k.api.add_node("n9", "198.18.0.99", None)?;
    k.api.set_pod_cidrs("n9", &[&pod_cidr6(9)])?;
    k.annotate("n9", &flanneld_v6(n9_mac6, n9_ip6))?;
    for i in 1..=2 {
        k.start(i)?;
    }
    for i in 1..=2 {
        k.lab.wait_ready(i, READY)?;
    }
    let mut sides = Vec::new();
    for i in 1..=2 {
        let st = k.lab.status(i)?;
        ensure!(
            st["network"].is_null() && st["node"]["subnet"].is_null(),
            "node {i} has an IPv4 side: {st}"
        );
        let side = &st["node"]["ipv6"];
        let subnet = side["subnet"].as_str().unwrap_or_default().to_string();
        let public = side["public_ip"].as_str().unwrap_or_default().to_string();
        let mac = side["vtep_mac"]
            .as_str()
            .unwrap_or_default()
            .to_ascii_lowercase();
        ensure!(subnet == pod_cidr6(i), "node {i}: {st}");
        ensure!(public == k.lab.node_ip6(i).to_string(), "node {i}: {st}");
        let name = format!("n{i}");
        wait_until(CONVERGE, || {
            k.annotation(&name, "backend-v6-data")
                == Some(format!(r#"{{"VNI":1,"VtepMAC":"{mac}"}}"#))
                && k.annotation(&name, "public-ipv6") == Some(public.clone())
                && k.annotation(&name, "backend-type") == Some("vxlan".into())
                && k.annotation(&name, "backend-data").is_none()
                && k.annotation(&name, "public-ip").is_none()
        })
        .with_context(|| format!("node {i}'s annotations: {:?}", k.node(&name)))?;
        sides.push((subnet, public, mac));
    }
    for (i, other) in [(1, 1), (2, 0)] {
        let (subnet, public, mac) = &sides[other];
        let want = [
            (subnet.clone(), public.clone(), mac.clone(), true),
            (pod_cidr6(9), n9_ip6.to_string(), n9_mac6.to_string(), true),
        ];
        wait_until(CONVERGE, || {
            let got = peers6(&k, i);
            want.iter().all(|w| got.contains(w))
        })
        .with_context(|| format!("node {i}'s IPv6 peers: {:?}", peers6(&k, i)))?;
        ensure!(
            k.lab.status(i)?["peers"].as_array().map(Vec::len) == Some(0),
            "node {i} has IPv4 peers"
        );
    }
    let a = k.add_pod(1, "default", "a", &[])?;
    let b = k.add_pod(2, "default", "b", &[])?;
    ensure!(
        a.ip.is_unspecified() && b.ip.is_unspecified(),
        "a pod got an IPv4 address"
    );
    let (a6, b6) = (
        a.ip6.context("pod a got no IPv6 address")?,
        b.ip6.context("pod b got no IPv6 address")?,
    );
    let seen = twill_tests::pod::pod_to_pod6(&a, &b, 7781)?;
    ensure!(
        seen == std::net::IpAddr::V6(a6),
        "pod b saw {seen}, not {a6}"
    );
    let seen = twill_tests::pod::pod_to_pod6(&b, &a, 7782)?;
    ensure!(
        seen == std::net::IpAddr::V6(b6),
        "pod a saw {seen}, not {b6}"
    );
    k.lab.del_pod(&a)?;
    k.lab.del_pod(&b)?;
    Ok(())
}

/// EnableIPv6 in net-conf.json, but the Node got no IPv6 podCIDR (a cluster that was
/// single-stack when it joined): twilld serves IPv4, says why, and leaves no IPv6 annotation of
/// an earlier dual-stack run for peers to route to.
#[test]
fn a_node_without_an_ipv6_podcidr_serves_ipv4_and_unpublishes_its_ipv6_side() -> Result<()> {
    let mut k = KubeLab::new_dual(2)?;
    k.api.set_pod_cidrs("n2", &[&pod_cidr(2)])?;
    k.api.set_node_annotation(
        "n2",
        &format!("{PREFIX}public-ipv6"),
        Some(&k.lab.node_ip6(2).to_string()),
    )?;
    k.api.set_node_annotation(
        "n2",
        &format!("{PREFIX}backend-v6-data"),
        Some(r#"{"VNI":1,"VtepMAC":"0a:58:fd:00:02:02"}"#),
    )?;
    k.start_all_meshed()?;
    let st = k.lab.status(2)?;
    ensure!(st["node"]["ipv6"].is_null(), "node 2 serves IPv6: {st}");
    ensure!(
        k.lab
            .daemon_log(2)
            .contains("no IPv6 entry in spec.podCIDRs"),
        "node 2 did not say why it serves IPv4 only"
    );
    wait_until(Duration::from_secs(20), || {
        k.annotation("n2", "public-ipv6").is_none()
            && k.annotation("n2", "backend-v6-data").is_none()
    })
    .context("node 2's stale IPv6 annotations stayed")?;
    // Node 1 serves both; node 2 is its IPv4 peer and no IPv6 one.
    ensure!(k.lab.status(1)?["node"]["ipv6"]["subnet"] == pod_cidr6(1));
    wait_until(CONVERGE, || {
        k.lab.status(1).is_ok_and(|s| {
            s["peers6"].as_array().is_some_and(|p| p.is_empty())
                && s["peers"].as_array().is_some_and(|p| p.len() == 1)
        })
    })
    .context("node 1's peers")?;
    let a = k.add_pod(1, "default", "a", &[])?;
    let b = k.add_pod(2, "default", "b", &[])?;
    ensure!(
        b.ip6.is_none(),
        "a pod on the IPv4-only node got an IPv6 address"
    );
    wait_until(Duration::from_secs(10), || a.ping(b.ip)).context("IPv4 between the pods")?;
    k.lab.del_pod(&a)?;
    k.lab.del_pod(&b)?;
    Ok(())
}

/// NetworkPolicy from the API on a dual-stack cluster: the pods' IPv6 addresses (status.podIPs)
/// are in the engine's sets, so a policy holds on IPv6 as on IPv4.
#[test]
fn network_policy_from_the_api_holds_on_ipv6_too() -> Result<()> {
    let mut k = KubeLab::new_dual(2)?;
    k.start_all_meshed()?;
    let server = k.add_pod(1, "x", "server", &[("app", "server")])?;
    let client = k.add_pod(2, "x", "client", &[("app", "client")])?;
    let other = k.add_pod(2, "x", "other", &[("app", "other")])?;
    let server6 = server.ip6.context("the server got no IPv6 address")?;
    let _servers = twill_tests::netpol::Servers::start(&[&server])?;
    let reaches6 = |from: &Pod| {
        twill_tests::netpol::probe(
            &from.netns_path(),
            server6.into(),
            80,
            netpol::model::Protocol::Tcp,
        )
    };
    for p in [&client, &other] {
        wait_until(Duration::from_secs(20), || reaches6(p))
            .with_context(|| format!("{} never reached the server over IPv6", p.id))?;
    }
    k.api.add_network_policy(server_from_clients())?;
    wait_until(CONVERGE, || !reaches6(&other) && !reaches(&other, &server))
        .context("the policy never closed the server to app=other on both families")?;
    wait_until(Duration::from_secs(10), || {
        reaches6(&client) && reaches(&client, &server)
    })
    .context("app=client lost the server on a family")?;
    for p in [&server, &client, &other] {
        k.lab.del_pod(p)?;
    }
    Ok(())
}

/// A Node watch the API server keeps refusing while lists work (here RBAC without `watch` on
/// nodes; in life a proxy that cuts long streams, or an API server catching up after a
/// restart): twilld lists again with a growing wait, not every 100 ms.
#[test]
fn a_refused_node_watch_is_retried_with_backoff_not_a_list_storm() -> Result<()> {
    let mut k = KubeLab::new(1)?;
    let manifest = twill_tests::bins::workspace_dir().join("deploy/kubernetes/twill.yaml");
    let sa = twill_tests::fakeapi::TWILL_SERVICE_ACCOUNT;
    let twill = twill_tests::fakeapi::rbac::service_accounts_from_manifest(&manifest)?
        .into_iter()
        .find(|i| i.user == format!("system:serviceaccount:{}:{}", sa.0, sa.1))
        .context("the manifest binds no twill ServiceAccount")?;
    let mut rules = twill.rules;
    let mut dropped = false;
    for r in &mut rules {
        if r.resources.iter().flatten().any(|x| x == "nodes") {
            dropped |= r.verbs.iter().any(|v| v == "watch");
            r.verbs.retain(|v| v != "watch");
        }
    }
    ensure!(dropped, "twill's role has no watch on nodes to take away");
    let token = k.api.add_identity("twill-without-node-watch", rules);
    std::fs::write(
        k.lab.node_dir(1).join("kubeconfig"),
        k.api.kubeconfig(&token),
    )?;
    k.start(1)?;
    let peer_lists = |api: &FakeApi| {
        api.requests()
            .iter()
            .filter(|r| {
                r.verb == "list" && r.resource == "nodes" && !r.query.contains("fieldSelector")
            })
            .map(|r| r.code)
            .collect::<Vec<_>>()
    };
    wait_until(Duration::from_secs(30), || {
        peer_lists(&k.api).contains(&200)
    })
    .context("twilld never listed the Nodes")?;
    // The watch follows the list (on a loaded machine, a moment later).
    let refused = || {
        k.api
            .requests()
            .iter()
            .any(|r| r.verb == "watch" && r.resource == "nodes" && r.code == 403)
    };
    wait_until(Duration::from_secs(10), refused).context("no Node watch was refused")?;
    k.api.clear_requests();
    std::thread::sleep(Duration::from_secs(10));
    let lists = peer_lists(&k.api);
    // 100 ms doubling up to 5 s: about seven in the first 10 s, two once at the cap. Before,
    // each completed list reset the wait and a refused watch meant ~10 lists a second.
    ensure!(
        lists.len() <= 10,
        "{} Node lists in 10 s: {lists:?}",
        lists.len()
    );
    ensure!(!lists.is_empty(), "twilld stopped listing the Nodes");
    ensure!(k.lab.daemon_running(1), "twilld exited");
    Ok(())
}

/// A controller that keeps wiping our Node's annotations (one that copies Node objects from
/// elsewhere): twilld puts them back at once a few times, then less and less often, not with a
/// patch for each of its writes; once it stops, they are back.
#[test]
fn a_controller_fighting_over_our_annotations_gets_fewer_and_fewer_patches() -> Result<()> {
    let mut k = KubeLab::new(1)?;
    k.start(1)?;
    k.lab.wait_ready(1, READY)?;
    ensure!(
        k.annotation("n1", "backend-data").is_some(),
        "not published"
    );
    k.api.clear_requests();
    let t0 = std::time::Instant::now();
    let mut wipes = 0;
    while t0.elapsed() < Duration::from_secs(20) {
        k.api.wipe_annotations("n1")?;
        wipes += 1;
        std::thread::sleep(Duration::from_millis(300));
    }
    let patches = k
        .api
        .requests()
        .iter()
        .filter(|r| r.method == "PATCH" && r.path == "/api/v1/nodes/n1/status" && r.code == 200)
        .count();
    // Five at once, then after 10 s, then 20 s: a handful, against one per wipe before.
    ensure!(
        (5..=10).contains(&patches),
        "{patches} put-backs for {wipes} wipes in 20 s"
    );
    ensure!(
        k.lab
            .daemon_log(1)
            .contains("keeps changing our Node's annotations"),
        "twilld did not say why it waits"
    );
    wait_until(Duration::from_secs(90), || {
        k.annotation("n1", "backend-data").is_some() && k.annotation("n1", "public-ip").is_some()
    })
    .context("the annotations were not put back once the fight stopped")?;
    Ok(())
}
