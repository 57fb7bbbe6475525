//! The etcd registry against a real etcd 3.4, run inside a network namespace of our own.
//!
//! Each test starts its own etcd in its own netns `twr<pid>n<k>` (loopback only) and runs its
//! async code on a thread that has setns'd into that netns. Guards kill etcd and remove the
//! netns and data directory on drop, also when the test panics.

use std::collections::BTreeMap;
use std::fs::File;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering::Relaxed};
use std::sync::{Arc, Once};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use ipnet::Ipv4Net;
use tokio::sync::{mpsc, watch};
use twill_daemon::config::NetworkConfig;
use twill_daemon::lease::LeaseAttrs;
use twill_daemon::metrics::Metrics;
use twill_daemon::peer::Peer;
use twill_daemon::registry::etcd::EtcdRegistry;
use twill_daemon::registry::{
    acquire, keep_lease, watch_peers, EtcdOptions, OwnLease, PeerEvent, RegistryError,
    SubnetChange, SubnetRegistry, SubnetWatch, WatchMsg,
};
use twill_daemon::subnet::AllocError;

const PREFIX: &str = "/coreos.com/network";
const CLIENT_PORT: u16 = 23790;
/// Where etcd listens while the clients under test must not reach it.
const HIDDEN_PORT: u16 = 23791;
const PEER_PORT: u16 = 23800;

static SEQ: AtomicU32 = AtomicU32::new(0);
static CLEAN: Once = Once::new();

fn sh(args: &[&str]) -> Result<()> {
    let out = Command::new(args[0]).args(&args[1..]).output()?;
    if !out.status.success() {
        bail!("{args:?}: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(())
}

/// Remove namespaces left by crashed runs: `twr<pid>n<k>` whose pid is gone.
fn clean_leftovers() {
    let Ok(dir) = std::fs::read_dir("/run/netns") else {
        return;
    };
    for e in dir.flatten() {
        let name = e.file_name().to_string_lossy().to_string();
        let Some(pid) = name
            .strip_prefix("twr")
            .and_then(|r| r.split('n').next())
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if !PathBuf::from(format!("/proc/{pid}")).exists() {
            let _ = sh(&["ip", "netns", "del", &name]);
        }
    }
}

/// An etcd in a netns of its own. Drop kills it and removes the netns and data.
struct Etcd {
    ns: String,
    dir: PathBuf,
    child: Option<Child>,
    /// Serve https with client-certificate auth, certificates under `dir/pki`.
    tls: bool,
}

impl Etcd {
    fn start() -> Result<Etcd> {
        Self::start_with(false)
    }

    fn start_with(tls: bool) -> Result<Etcd> {
        CLEAN.call_once(clean_leftovers);
        let ns = format!("twr{}n{}", std::process::id(), SEQ.fetch_add(1, Relaxed));
        let dir = std::env::temp_dir().join(format!("{ns}-etcd"));
        sh(&["ip", "netns", "add", &ns])?;
        let mut e = Etcd {
            ns,
            dir,
            child: None,
            tls,
        };
        sh(&["ip", "-n", &e.ns, "link", "set", "lo", "up"])?;
        std::fs::create_dir_all(&e.dir)?;
        if tls {
            make_pki(&e.dir.join("pki"))?;
        }
        e.spawn()?;
        Ok(e)
    }

    fn spawn(&mut self) -> Result<()> {
        self.spawn_on(CLIENT_PORT)
    }

    fn spawn_on(&mut self, port: u16) -> Result<()> {
        let scheme = if self.tls { "https" } else { "http" };
        let client = format!("{scheme}://127.0.0.1:{port}");
        let peer = format!("http://127.0.0.1:{PEER_PORT}");
        let log = File::create(self.dir.with_extension("log"))?;
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.ns, "etcd", "--name", "twr"]);
        if self.tls {
            let pki = self.dir.join("pki");
            cmd.arg("--cert-file")
                .arg(pki.join("server.pem"))
                .arg("--key-file")
                .arg(pki.join("server-key.pem"))
                .arg("--trusted-ca-file")
                .arg(pki.join("ca.pem"))
                .arg("--client-cert-auth");
        }
        let child = cmd
            .arg("--data-dir")
            .arg(self.dir.join("data"))
            .args(["--listen-client-urls", &client])
            .args(["--advertise-client-urls", &client])
            .args(["--listen-peer-urls", &peer])
            .args(["--initial-advertise-peer-urls", &peer])
            .args(["--initial-cluster", &format!("twr={peer}")])
            .args(["--log-level", "error"])
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .context("starting etcd")?;
        self.child = Some(child);
        Ok(())
    }

    fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// etcdctl against the hidden port (this thread is not in the netns).
    fn ctl(&self, args: &[&str]) -> Result<String> {
        let out = Command::new("ip")
            .args(["netns", "exec", &self.ns, "etcdctl"])
            .arg(format!("--endpoints=http://127.0.0.1:{HIDDEN_PORT}"))
            .args(args)
            .env("ETCDCTL_API", "3")
            .output()?;
        if !out.status.success() {
            bail!("etcdctl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(String::from_utf8_lossy(&out.stdout).to_string())
    }

    /// `ctl` with stdin from `input` (values too large for an argument).
    fn ctl_input(&self, args: &[&str], input: &std::path::Path) -> Result<String> {
        let out = Command::new("ip")
            .args(["netns", "exec", &self.ns, "etcdctl"])
            .arg(format!("--endpoints=http://127.0.0.1:{HIDDEN_PORT}"))
            .args(args)
            .env("ETCDCTL_API", "3")
            .stdin(File::open(input)?)
            .output()?;
        if !out.status.success() {
            bail!("etcdctl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(String::from_utf8_lossy(&out.stdout).to_string())
    }

    /// While no client under test can reach etcd: change leases and compact the history.
    fn change_and_compact_hidden(&mut self) -> Result<()> {
        self.stop();
        self.spawn_on(HIDDEN_PORT)?;
        let mut tries = 0;
        while self.ctl(&["endpoint", "health"]).is_err() {
            tries += 1;
            if tries > 300 {
                bail!("hidden etcd did not come up");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        self.ctl(&[
            "put",
            &format!("{PREFIX}/subnets/10.100.30.0-24"),
            &attrs(30).to_json(),
        ])?;
        self.ctl(&["del", &format!("{PREFIX}/subnets/10.100.2.0-24")])?;
        self.ctl(&[
            "put",
            &format!("{PREFIX}/subnets/10.100.31.0-24"),
            &attrs(31).to_json(),
        ])?;
        self.ctl(&["del", &format!("{PREFIX}/subnets/10.100.31.0-24")])?;
        let status: serde_json::Value =
            serde_json::from_str(&self.ctl(&["endpoint", "status", "-w", "json"])?)?;
        let rev = status[0]["Status"]["header"]["revision"]
            .as_i64()
            .context("revision in etcdctl status")?;
        self.ctl(&["compact", &rev.to_string()])?;
        self.stop();
        self.spawn_on(CLIENT_PORT)
    }

    fn restart(&mut self) -> Result<()> {
        self.stop();
        self.spawn()
    }

    fn opts(&self) -> EtcdOptions {
        let pki = self.dir.join("pki");
        let file = |f: &str| self.tls.then(|| pki.join(f));
        EtcdOptions {
            // No scheme on purpose: the registry must cope.
            endpoints: vec![format!("127.0.0.1:{CLIENT_PORT}")],
            prefix: PREFIX.to_string(),
            ca_file: file("ca.pem"),
            cert_file: file("client.pem"),
            key_file: file("client-key.pem"),
        }
    }

    /// Run async test code on a thread inside this etcd's netns.
    fn run<F, Fut>(&self, f: F) -> Result<()>
    where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: std::future::Future<Output = Result<()>>,
    {
        let path = format!("/run/netns/{}", self.ns);
        std::thread::spawn(move || -> Result<()> {
            let fd = File::open(&path)?;
            nix::sched::setns(&fd, nix::sched::CloneFlags::CLONE_NEWNET)?;
            // current_thread: every task stays on this thread, hence in this netns.
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            rt.block_on(f())
        })
        .join()
        .map_err(|_| anyhow::anyhow!("test thread panicked"))?
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        self.stop();
        let _ = sh(&["ip", "netns", "del", &self.ns]);
        let _ = std::fs::remove_dir_all(&self.dir);
        let _ = std::fs::remove_file(self.dir.with_extension("log"));
    }
}

/// A CA, a server certificate for 127.0.0.1 and a client certificate, made with openssl.
fn make_pki(dir: &std::path::Path) -> Result<()> {
    std::fs::create_dir_all(dir)?;
    let p = |f: &str| dir.join(f).to_string_lossy().to_string();
    sh(&[
        "openssl",
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-days",
        "2",
        "-subj",
        "/CN=twr-test-ca",
        "-keyout",
        &p("ca-key.pem"),
        "-out",
        &p("ca.pem"),
    ])?;
    for (name, ext) in [
        (
            "server",
            "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth",
        ),
        ("client", "extendedKeyUsage=clientAuth"),
    ] {
        sh(&[
            "openssl",
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-subj",
            &format!("/CN=twr-{name}"),
            "-keyout",
            &p(&format!("{name}-key.pem")),
            "-out",
            &p(&format!("{name}.csr")),
        ])?;
        std::fs::write(
            p(&format!("{name}.ext")),
            format!(
                "basicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\n{ext}\n"
            ),
        )?;
        sh(&[
            "openssl",
            "x509",
            "-req",
            "-in",
            &p(&format!("{name}.csr")),
            "-CA",
            &p("ca.pem"),
            "-CAkey",
            &p("ca-key.pem"),
            "-CAcreateserial",
            "-days",
            "2",
            "-extfile",
            &p(&format!("{name}.ext")),
            "-out",
            &p(&format!("{name}.pem")),
        ])?;
    }
    Ok(())
}

/// Connect and wait (bounded) until etcd answers.
async fn connect(opts: &EtcdOptions) -> Result<EtcdRegistry> {
    let reg = EtcdRegistry::connect(opts).await?;
    wait_for("etcd to answer", Duration::from_secs(30), || {
        let reg = reg.clone();
        async move { reg.get_config().await.is_ok() }
    })
    .await?;
    Ok(reg)
}

async fn wait_for<F, Fut>(what: &str, limit: Duration, mut cond: F) -> Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        if cond().await {
            return Ok(());
        }
        if tokio::time::Instant::now() > deadline {
            bail!("timed out waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn put(reg: &EtcdRegistry, key: &str, value: &str) -> Result<()> {
    reg.client()
        .kv_client()
        .put(format!("{PREFIX}/{key}"), value, None)
        .await?;
    Ok(())
}

async fn del(reg: &EtcdRegistry, key: &str) -> Result<()> {
    reg.client()
        .kv_client()
        .delete(format!("{PREFIX}/{key}"), None)
        .await?;
    Ok(())
}

/// key -> (value, lease) of everything under subnets/.
async fn subnets(reg: &EtcdRegistry) -> Result<BTreeMap<String, (String, i64)>> {
    let (kvs, _) = reg.list_subnets().await?;
    Ok(kvs
        .into_iter()
        .map(|kv| {
            (
                kv.name,
                (String::from_utf8_lossy(&kv.value).to_string(), kv.lease),
            )
        })
        .collect())
}

fn cfg(json: &str) -> NetworkConfig {
    NetworkConfig::parse(json.as_bytes()).unwrap()
}

fn attrs(i: u8) -> LeaseAttrs {
    LeaseAttrs::vxlan(
        Ipv4Addr::new(198, 18, 0, i),
        1,
        format!("02:00:00:00:00:{i:02x}").parse().unwrap(),
    )
}

fn net(s: &str) -> Ipv4Net {
    s.parse().unwrap()
}

const TTL: Duration = Duration::from_secs(30);

#[test]
fn racing_acquires_never_share_a_subnet_and_run_out_cleanly() -> Result<()> {
    let etcd = Etcd::start()?;
    let opts = etcd.opts();
    etcd.run(move || async move {
        let reg = connect(&opts).await?;
        // /24 split into /28s: 16 subnets, the first skipped, so 15 to hand out.
        let c = cfg(r#"{"Network":"10.50.0.0/24","SubnetLen":28}"#);
        let mut tasks = Vec::new();
        for i in 1..=20u8 {
            // Each racer has its own client: real concurrent transactions.
            let reg = EtcdRegistry::connect(&opts).await?;
            let c = c.clone();
            tasks.push(tokio::spawn(async move {
                (i, acquire(&reg, &c, &attrs(i), None, TTL).await)
            }));
        }
        let mut won = BTreeMap::new();
        let mut out_of_subnets = Vec::new();
        for t in tasks {
            let (i, r) = t.await?;
            match r {
                Ok(l) => {
                    assert_eq!(l.attrs, attrs(i));
                    if let Some(other) = won.insert(l.subnet.unwrap(), i) {
                        panic!("{} given to both {other} and {i}", l.subnet.unwrap());
                    }
                }
                Err(RegistryError::Alloc(e)) => out_of_subnets.push(e.to_string()),
                Err(e) => bail!("racer {i}: {e}"),
            }
        }
        assert_eq!(won.len(), 15, "{won:?}");
        assert_eq!(out_of_subnets.len(), 5);
        for m in &out_of_subnets {
            for want in [
                "10.50.0.16-10.50.0.240",
                "all 15 /28 subnets",
                "15 leases exist",
                "delete stale leases under /coreos.com/network/subnets/",
            ] {
                assert!(m.contains(want), "{m:?} lacks {want:?}");
            }
        }
        // etcd agrees: one key per winner, carrying the winner's lease value.
        let stored = subnets(&reg).await?;
        assert_eq!(stored.len(), 15);
        for (subnet, i) in &won {
            let (value, lease) = &stored[&format!("{}-{}", subnet.network(), 28)];
            assert_eq!(value, &attrs(*i).to_json());
            assert_ne!(*lease, 0, "claimed on an etcd lease");
        }
        Ok(())
    })
}

/// `attrs(i)` with a v6 side: fd00:198:18::`i`, MAC 02:00:00:00:06:`i`.
fn attrs6(i: u8) -> LeaseAttrs {
    let mut a = attrs(i);
    a.v6 = Some(twill_daemon::lease::LeaseV6 {
        public_ip: format!("fd00:198:18::{i:x}").parse().unwrap(),
        backend: twill_daemon::lease::LeaseBackend::Vxlan {
            vni: 1,
            vtep_mac: format!("02:00:00:00:06:{i:02x}").parse().unwrap(),
        },
    });
    a
}

#[test]
fn racing_dual_stack_acquires_never_share_either_subnet() -> Result<()> {
    let etcd = Etcd::start()?;
    let opts = etcd.opts();
    etcd.run(move || async move {
        let reg = connect(&opts).await?;
        // 15 subnets in each family: every racer gets one of each, and no two share either.
        // Two racers can create different keys naming one subnet; the younger must give way.
        let c = cfg(r#"{"Network":"10.50.0.0/24","SubnetLen":28,
            "EnableIPv6":true,"IPv6Network":"fd00:50::/60","IPv6SubnetLen":64}"#);
        let mut tasks = Vec::new();
        for i in 1..=15u8 {
            let reg = EtcdRegistry::connect(&opts).await?;
            let c = c.clone();
            tasks.push(tokio::spawn(async move {
                (i, acquire(&reg, &c, &attrs6(i), None, TTL).await)
            }));
        }
        let (mut v4, mut v6) = (BTreeMap::new(), BTreeMap::new());
        for t in tasks {
            let (i, r) = t.await?;
            let l = r.with_context(|| format!("racer {i}"))?;
            let s6 = l.subnet6.context("no IPv6 subnet")?;
            assert!(c.ipv6.as_ref().unwrap().fits(s6), "{s6}");
            if let Some(o) = v4.insert(l.subnet.unwrap(), i) {
                panic!("{} given to both {o} and {i}", l.subnet.unwrap());
            }
            if let Some(o) = v6.insert(s6, i) {
                panic!("{s6} given to both {o} and {i}");
            }
        }
        // etcd holds exactly one dual-stack key per racer, with its value.
        let stored = subnets(&reg).await?;
        assert_eq!(stored.len(), 15, "{:?}", stored.keys());
        for (s4, i) in &v4 {
            let s6 = v6.iter().find(|(_, j)| *j == i).unwrap().0;
            let key = format!("{}-28&{}-64", s4.network(), s6.network());
            assert_eq!(stored[&key].0, attrs6(*i).to_json(), "{key}");
        }
        Ok(())
    })
}

/// flannel's IPv6-only lease for racer `i`: `attrs6(i)` without its IPv4 side.
fn attrs6_only(i: u8) -> LeaseAttrs {
    LeaseAttrs {
        v4: None,
        ..attrs6(i)
    }
}

/// IPv6-only nodes racing for one pool: every key is `0.0.0.0-0&<v6>`, so the IPv4 parts
/// must not count as one subnet (every racer but the oldest would give way forever), and two
/// keys naming one IPv6 subnet leave only the older.
#[test]
fn racing_ipv6_only_acquires_never_share_a_subnet() -> Result<()> {
    let etcd = Etcd::start()?;
    let opts = etcd.opts();
    etcd.run(move || async move {
        let reg = connect(&opts).await?;
        let c = cfg(
            r#"{"EnableIPv4":false,"EnableIPv6":true,"IPv6Network":"fd00:50::/60",
            "IPv6SubnetLen":64}"#,
        );
        let mut tasks = Vec::new();
        for i in 1..=15u8 {
            let reg = EtcdRegistry::connect(&opts).await?;
            let c = c.clone();
            tasks.push(tokio::spawn(async move {
                (i, acquire(&reg, &c, &attrs6_only(i), None, TTL).await)
            }));
        }
        let mut v6 = BTreeMap::new();
        for t in tasks {
            let (i, r) = t.await?;
            let l = r.with_context(|| format!("racer {i}"))?;
            assert_eq!(l.subnet, None, "racer {i}: {l:?}");
            let s6 = l.subnet6.context("no IPv6 subnet")?;
            if let Some(o) = v6.insert(s6, i) {
                panic!("{s6} given to both {o} and {i}");
            }
        }
        // etcd holds flannel's IPv6-only key and value per racer, and nothing else.
        let stored = subnets(&reg).await?;
        assert_eq!(stored.len(), 15, "{:?}", stored.keys());
        for (s6, i) in &v6 {
            let key = format!("0.0.0.0-0&{}-64", s6.network());
            assert_eq!(stored[&key].0, attrs6_only(*i).to_json(), "{key}");
        }
        // The pool is full: the 16th gets a clear error naming the IPv6 fields.
        let e = acquire(&reg, &c, &attrs6_only(16), None, TTL)
            .await
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("all 15 /64 subnets") && e.contains("IPv6SubnetMin-IPv6SubnetMax"),
            "{e}"
        );
        Ok(())
    })
}

/// An IPv6-only node finds its own lease by its IPv6 address, or by its IPv6 VTEP MAC after
/// its address changed, and honours its previous subnet.
#[test]
fn ipv6_only_acquire_reuses_by_address_or_mac_and_honours_previous() -> Result<()> {
    let etcd = Etcd::start()?;
    let opts = etcd.opts();
    etcd.run(move || async move {
        let reg = connect(&opts).await?;
        let c = cfg(r#"{"EnableIPv4":false,"EnableIPv6":true,"IPv6Network":"fd00:60::/56"}"#);
        let net6 = |s: &str| -> ipnet::Ipv6Net { s.parse().unwrap() };
        put(
            &reg,
            "subnets/0.0.0.0-0&fd00:60:0:7::-64",
            &attrs6_only(1).to_json(),
        )
        .await?;
        put(
            &reg,
            "subnets/0.0.0.0-0&fd00:60:0:8::-64",
            &attrs6_only(2).to_json(),
        )
        .await?;
        let l = acquire(&reg, &c, &attrs6_only(1), None, TTL).await?;
        assert_eq!(
            (l.subnet, l.subnet6),
            (None, Some(net6("fd00:60:0:7::/64")))
        );
        assert_eq!(l.key(), "0.0.0.0-0&fd00:60:0:7::-64");
        // Moved to another address, same MAC: the same lease, rewritten.
        let mut moved = attrs6_only(1);
        moved.v6.as_mut().unwrap().public_ip = "fd00:198:18::65".parse().unwrap();
        let l = acquire(&reg, &c, &moved, None, TTL).await?;
        assert_eq!(l.subnet6, Some(net6("fd00:60:0:7::/64")));
        let stored = subnets(&reg).await?;
        assert_eq!(stored["0.0.0.0-0&fd00:60:0:7::-64"].0, moved.to_json());
        assert_eq!(
            stored["0.0.0.0-0&fd00:60:0:8::-64"].0,
            attrs6_only(2).to_json()
        );
        assert_eq!(stored.len(), 2, "{stored:?}");
        // A new node takes its previous subnet when free, never another node's.
        let prev = twill_daemon::registry::Previous {
            v4: None,
            v6: Some(net6("fd00:60:0:9::/64")),
        };
        let n = acquire(&reg, &c, &attrs6_only(3), prev, TTL).await?;
        assert_eq!(n.subnet6, Some(net6("fd00:60:0:9::/64")));
        let prev = twill_daemon::registry::Previous {
            v4: None,
            v6: Some(net6("fd00:60:0:8::/64")),
        };
        let m = acquire(&reg, &c, &attrs6_only(4), prev, TTL).await?;
        let s6 = m.subnet6.context("no IPv6 subnet")?;
        assert!(
            ![7, 8, 9]
                .map(|i| net6(&format!("fd00:60:0:{i}::/64")))
                .contains(&s6),
            "{s6}"
        );
        Ok(())
    })
}

/// The first `n` changes under subnets/ from revision `from` on, as `put <key>`/`delete <key>`.
async fn changes_since(reg: &EtcdRegistry, from: i64, n: usize) -> Result<Vec<String>> {
    let mut w = reg.watch_subnets(from, None).await?;
    let mut out = Vec::new();
    while out.len() < n {
        match tokio::time::timeout(Duration::from_secs(10), w.next()).await?? {
            WatchMsg::Changes(cs) => out.extend(cs.into_iter().map(|c| match c {
                SubnetChange::Put(kv) => format!("put {}", kv.name),
                SubnetChange::Delete(k) => format!("delete {k}"),
            })),
            WatchMsg::Reset(why) => bail!("watch reset: {why}"),
        }
    }
    Ok(out)
}

/// Dual-stack and IPv4-only twilld nodes (host-gw or udp) racing for one pool: a plain key and
/// a dual key can name one IPv4 subnet (the names differ, so create-if-absent cannot see it).
/// Both check after creating; the younger key gives way (a dual key also to a plain one).
#[test]
fn racing_dual_stack_and_ipv4_only_acquires_never_share_a_subnet() -> Result<()> {
    let etcd = Etcd::start()?;
    let opts = etcd.opts();
    etcd.run(move || async move {
        let reg = connect(&opts).await?;
        let c = cfg(r#"{"Network":"10.50.0.0/24","SubnetLen":28,
            "EnableIPv6":true,"IPv6Network":"fd00:50::/60","IPv6SubnetLen":64}"#);
        let mut tasks = Vec::new();
        for i in 1..=15u8 {
            let reg = EtcdRegistry::connect(&opts).await?;
            let c = c.clone();
            // Odd racers serve IPv4 only.
            let a = if i % 2 == 1 { attrs(i) } else { attrs6(i) };
            tasks.push(tokio::spawn(async move {
                (i, acquire(&reg, &c, &a, None, TTL).await)
            }));
        }
        let mut v4 = BTreeMap::new();
        for t in tasks {
            let (i, r) = t.await?;
            let l = r.with_context(|| format!("racer {i}"))?;
            assert_eq!(l.subnet6.is_some(), i % 2 == 0, "racer {i}: {l:?}");
            if let Some(o) = v4.insert(l.subnet.unwrap(), i) {
                panic!("{} given to both {o} and {i}", l.subnet.unwrap());
            }
        }
        // etcd agrees: one key per racer, none naming another's IPv4 subnet.
        let stored = subnets(&reg).await?;
        assert_eq!(stored.len(), 15, "{:?}", stored.keys());
        Ok(())
    })
}

/// Our key is to be replaced by one of the other form, but another node's key names the same
/// IPv4 subnet (a conflict from before, e.g. with a flanneld): the subnet stays taken, so we
/// move to another one instead of trying it again forever.
#[test]
fn replacing_our_key_in_a_conflict_moves_on() -> Result<()> {
    let etcd = Etcd::start()?;
    let opts = etcd.opts();
    etcd.run(move || async move {
        let reg = connect(&opts).await?;
        let v4only = cfg(r#"{"Network":"10.60.0.0/16"}"#);
        let dual =
            cfg(r#"{"Network":"10.60.0.0/16","EnableIPv6":true,"IPv6Network":"fd00:60::/56"}"#);
        let bound = Duration::from_secs(20);
        // IPv6 switched on; another node's older dual key names our IPv4 subnet.
        let other = "10.60.5.0-24&fd00:60:0:5::-64";
        put(&reg, &format!("subnets/{other}"), &attrs6(2).to_json()).await?;
        put(&reg, "subnets/10.60.5.0-24", &attrs(1).to_json()).await?;
        let up = tokio::time::timeout(bound, acquire(&reg, &dual, &attrs6(1), None, TTL))
            .await
            .context("acquire loops")??;
        assert_ne!(up.subnet.unwrap(), net("10.60.5.0/24"));
        let keys = subnets(&reg).await?;
        assert!(keys.contains_key(other), "{:?}", keys.keys());
        assert!(!keys.contains_key("10.60.5.0-24"), "{:?}", keys.keys());
        assert!(keys.contains_key(&up.key()), "{:?}", keys.keys());
        // IPv6 switched off; another node's plain key names our IPv4 subnet.
        put(&reg, "subnets/10.60.6.0-24", &attrs(3).to_json()).await?;
        let ours = "10.60.6.0-24&fd00:60:0:6::-64";
        put(&reg, &format!("subnets/{ours}"), &attrs6(4).to_json()).await?;
        let down = tokio::time::timeout(bound, acquire(&reg, &v4only, &attrs(4), None, TTL))
            .await
            .context("acquire loops")??;
        assert_ne!(down.subnet.unwrap(), net("10.60.6.0/24"));
        let keys = subnets(&reg).await?;
        assert!(keys.contains_key("10.60.6.0-24"), "{:?}", keys.keys());
        assert!(!keys.contains_key(ours), "{:?}", keys.keys());
        Ok(())
    })
}

#[test]
fn dual_stack_acquire_reuses_and_upgrades_a_plain_key() -> Result<()> {
    let etcd = Etcd::start()?;
    let opts = etcd.opts();
    etcd.run(move || async move {
        let reg = connect(&opts).await?;
        let v4only = cfg(r#"{"Network":"10.60.0.0/16"}"#);
        let dual =
            cfg(r#"{"Network":"10.60.0.0/16","EnableIPv6":true,"IPv6Network":"fd00:60::/56"}"#);
        // A v4-only run leaves a plain key; IPv6 is enabled: same v4 subnet, now with a v6
        // one, in one key.
        let first = acquire(&reg, &v4only, &attrs(1), None, TTL).await?;
        assert_eq!(first.subnet6, None);
        let (_, rev) = reg.list_subnets().await?;
        let up = acquire(&reg, &dual, &attrs6(1), None, TTL).await?;
        assert_eq!(up.subnet.unwrap(), first.subnet.unwrap());
        // The new key first, then the old one goes: peers never see the IPv4 subnet without a
        // key (the plain key speaks for it until the dual one, with the same IPv4 side, does).
        assert_eq!(
            changes_since(&reg, rev + 1, 2).await?,
            vec![
                format!("put {}", up.key()),
                format!("delete {}", first.key())
            ]
        );
        let s6 = up.subnet6.context("no IPv6 subnet")?;
        let stored = subnets(&reg).await?;
        assert_eq!(stored.keys().collect::<Vec<_>>(), vec![&up.key()]);
        assert_eq!(
            up.key(),
            format!("{}-24&{}-64", up.subnet.unwrap().network(), s6.network())
        );
        assert_eq!(stored[&up.key()].0, attrs6(1).to_json());
        // Restarted after a crash between the two steps (both keys there): the dual key is
        // kept, the plain one goes.
        put(
            &reg,
            &format!("subnets/{}", first.key()),
            &attrs(1).to_json(),
        )
        .await?;
        let again = acquire(&reg, &dual, &attrs6(1), None, TTL).await?;
        assert_eq!(again, up);
        assert_eq!(
            subnets(&reg).await?.keys().collect::<Vec<_>>(),
            vec![&up.key()]
        );
        // Another node honours its subnet file's v6 subnet when it is free (the first node's
        // subnets are chosen at random: pick ones it does not hold).
        let (want4, want6): (Ipv4Net, ipnet::Ipv6Net) = (42..)
            .map(|i| {
                (
                    net(&format!("10.60.{i}.0/24")),
                    format!("fd00:60:0:{i:x}::/64").parse().unwrap(),
                )
            })
            .find(|&(v4, v6)| up.subnet != Some(v4) && s6 != v6)
            .unwrap();
        let prev = twill_daemon::registry::Previous {
            v4: Some(want4),
            v6: Some(want6),
        };
        let other = acquire(&reg, &dual, &attrs6(2), prev, TTL).await?;
        assert_eq!((other.subnet.unwrap(), other.subnet6), (want4, Some(want6)));
        // Back to v4 only (IPv6 disabled, or a twilld not serving it): a plain key again,
        // created before the dual one goes.
        let (_, rev) = reg.list_subnets().await?;
        let down = acquire(&reg, &v4only, &attrs(1), None, TTL).await?;
        assert_eq!(
            (down.subnet.unwrap(), down.subnet6),
            (first.subnet.unwrap(), None)
        );
        assert_eq!(
            changes_since(&reg, rev + 1, 2).await?,
            vec![
                format!("put {}", down.key()),
                format!("delete {}", up.key())
            ]
        );
        assert!(subnets(&reg)
            .await?
            .contains_key(&format!("{}-24", first.subnet.unwrap().network())));
        Ok(())
    })
}

#[test]
fn acquire_reuses_by_public_ip_and_honours_previous() -> Result<()> {
    let etcd = Etcd::start()?;
    let opts = etcd.opts();
    etcd.run(move || async move {
        let reg = connect(&opts).await?;
        let c = cfg(r#"{"Network":"10.60.0.0/16","SubnetMax":"10.60.20.0"}"#);

        // Reuse: same public IP, new MAC -> same subnet, new value, moved onto a new lease.
        let first = acquire(&reg, &c, &attrs(1), None, TTL).await?;
        let key = format!("{}-24", first.subnet.unwrap().network());
        let old_lease = subnets(&reg).await?[&key].1;
        let mut again = attrs(1);
        again = LeaseAttrs::vxlan(
            again.v4.unwrap().public_ip,
            1,
            "02:aa:bb:cc:dd:ee".parse().unwrap(),
        );
        let second = acquire(&reg, &c, &again, Some(net("10.60.9.0/24")), TTL).await?;
        assert_eq!(second.subnet, first.subnet, "reuse beats previous");
        let (value, lease) = subnets(&reg).await?[&key].clone();
        assert_eq!(value, again.to_json());
        assert_ne!(lease, old_lease, "re-put on our new etcd lease");
        assert_eq!(subnets(&reg).await?.len(), 1);

        // Previous subnet honoured when free and valid (`first` took a random one: avoid it).
        let prev = [net("10.60.7.0/24"), net("10.60.8.0/24")]
            .into_iter()
            .find(|n| *n != first.subnet.unwrap())
            .unwrap();
        let b = acquire(&reg, &c, &attrs(2), Some(prev), TTL).await?;
        assert_eq!(b.subnet.unwrap(), prev);
        // Previous taken -> some other free subnet.
        let d = acquire(&reg, &c, &attrs(3), Some(prev), TTL).await?;
        assert!(d.subnet != b.subnet && d.subnet != first.subnet, "{d:?}");
        // Previous outside SubnetMin..SubnetMax -> ignored.
        let e = acquire(&reg, &c, &attrs(4), Some(net("10.60.30.0/24")), TTL).await?;
        assert!(
            c.ipv4.as_ref().unwrap().fits(e.subnet.unwrap())
                && e.subnet.unwrap() != net("10.60.30.0/24")
        );

        // Our old lease that no longer fits (left from an older config) is deleted, a new one
        // taken.
        put(&reg, "subnets/10.60.0.0-24", &attrs(5).to_json()).await?;
        let f = acquire(&reg, &c, &attrs(5), None, TTL).await?;
        assert!(c.ipv4.as_ref().unwrap().fits(f.subnet.unwrap()));
        let stored = subnets(&reg).await?;
        assert!(!stored.contains_key("10.60.0.0-24"), "{stored:?}");
        assert_eq!(stored.len(), 5);

        // Our dual-stack key is replaced by a plain key for the same subnet. The subnets above
        // were picked at random, so use two that are still free.
        let free: Vec<String> = (1..=20)
            .map(|i| format!("10.60.{i}.0"))
            .filter(|n| !stored.contains_key(&format!("{n}-24")))
            .collect();
        let (dual, prev) = (&free[0], &free[1]);
        let dual_key = format!("subnets/{dual}-24&fc00::-64");
        put(&reg, &dual_key, &attrs(6).to_json()).await?;
        let g = acquire(&reg, &c, &attrs(6), Some(net(&format!("{prev}/24"))), TTL).await?;
        assert_eq!(
            g.subnet.unwrap(),
            net(&format!("{dual}/24")),
            "own key beats previous"
        );
        let stored = subnets(&reg).await?;
        assert!(
            !stored.contains_key(&dual_key["subnets/".len()..]),
            "{stored:?}"
        );
        assert_eq!(stored[&format!("{dual}-24")].0, attrs(6).to_json());
        Ok(())
    })
}

/// twilld keeps its VTEP MAC across reboots; a node whose address changed finds its lease by
/// that MAC, and a second lease with its MAC (peers would flip one MAC between two addresses)
/// is deleted.
#[test]
fn acquire_reuses_by_vtep_mac_when_the_address_changed() -> Result<()> {
    let etcd = Etcd::start()?;
    let opts = etcd.opts();
    etcd.run(move || async move {
        let reg = connect(&opts).await?;
        let c = cfg(r#"{"Network":"10.65.0.0/16"}"#);
        let mut moved = attrs(1);
        moved.v4.as_mut().unwrap().public_ip = Ipv4Addr::new(198, 18, 0, 101);
        put(&reg, "subnets/10.65.201.0-24", &attrs(1).to_json()).await?;
        put(&reg, "subnets/10.65.202.0-24", &attrs(1).to_json()).await?;
        put(&reg, "subnets/10.65.203.0-24", &attrs(2).to_json()).await?;
        let l = acquire(&reg, &c, &moved, None, TTL).await?;
        assert_eq!(l.subnet.unwrap(), net("10.65.201.0/24"));
        let stored = subnets(&reg).await?;
        assert_eq!(stored["10.65.201.0-24"].0, moved.to_json());
        assert!(!stored.contains_key("10.65.202.0-24"), "{stored:?}");
        assert_eq!(stored["10.65.203.0-24"].0, attrs(2).to_json());
        assert_eq!(stored.len(), 2);
        Ok(())
    })
}

/// Two nodes misconfigured with one public IP take the lease from each other. They must not do
/// it at etcd's pace: each loss within a minute of the last waits longer (up to 5 s).
#[test]
fn two_keepers_of_one_lease_back_off() -> Result<()> {
    let etcd = Etcd::start()?;
    let opts = etcd.opts();
    etcd.run(move || async move {
        let reg = connect(&opts).await?;
        let c = cfg(r#"{"Network":"10.85.0.0/16"}"#);
        let ttl = Duration::from_secs(60);
        let mut tasks = Vec::new();
        let mut all = Vec::new();
        for _ in 0..2 {
            let lease = acquire(&reg, &c, &attrs(1), None, ttl).await?;
            let metrics = Arc::new(Metrics::default());
            let (attrs_tx, attrs_rx) = watch::channel(attrs(1));
            let (out_tx, out_rx) = watch::channel(lease.clone());
            // The channels' other ends stay alive with the task, as in the daemon.
            tasks.push((
                tokio::spawn(keep_lease(
                    reg.clone(),
                    c.clone(),
                    lease,
                    ttl,
                    attrs_rx,
                    out_tx,
                    metrics.clone(),
                )),
                attrs_tx,
                out_rx,
            ));
            all.push(metrics);
        }
        tokio::time::sleep(Duration::from_secs(4)).await;
        let total: u64 = all
            .iter()
            .map(|m| m.lease_reacquisitions.load(Relaxed))
            .sum();
        for (t, _, _) in &tasks {
            t.abort();
        }
        // Without the backoff this was 111 here (each round is a few etcd round trips);
        // with it, about five per keeper. At least one loss shows the two did collide.
        assert!((1..40).contains(&total), "{total} re-acquisitions in 4 s");
        Ok(())
    })
}

#[test]
fn out_of_subnets_counts_foreign_and_garbage_keys() -> Result<()> {
    let etcd = Etcd::start()?;
    let opts = etcd.opts();
    etcd.run(move || async move {
        let reg = connect(&opts).await?;
        let c =
            cfg(r#"{"Network":"10.70.0.0/16","SubnetMin":"10.70.1.0","SubnetMax":"10.70.3.0"}"#);
        put(&reg, "subnets/10.70.1.0-24", &attrs(1).to_json()).await?;
        // Garbage value still occupies its subnet.
        put(&reg, "subnets/10.70.2.0-24", "not json").await?;
        // So does a key whose v6 part is not flannel's spelling: its v4 subnet is named.
        put(
            &reg,
            "subnets/10.70.3.0-24&fc00:0::-64",
            &attrs(3).to_json(),
        )
        .await?;
        let e = acquire(&reg, &c, &attrs(9), None, TTL).await.unwrap_err();
        let RegistryError::Alloc(AllocError::OutOfSubnets { leases, .. }) = &e else {
            bail!("expected out of subnets, got {e}");
        };
        assert_eq!(*leases, 3);
        let m = e.to_string();
        assert!(
            m.contains("10.70.1.0-10.70.3.0") && m.contains("3 leases exist"),
            "{m}"
        );
        Ok(())
    })
}

#[test]
fn keep_lease_renews_reacquires_and_republishes() -> Result<()> {
    let etcd = Etcd::start()?;
    let opts = etcd.opts();
    etcd.run(move || async move {
        let reg = connect(&opts).await?;
        let c = cfg(r#"{"Network":"10.80.0.0/16"}"#);
        let ttl = Duration::from_secs(5);
        let lease = acquire(&reg, &c, &attrs(1), None, ttl).await?;
        let key = format!("{}-24", lease.subnet.unwrap().network());
        let metrics = Arc::new(Metrics::default());
        let (attrs_tx, attrs_rx) = watch::channel(attrs(1));
        let (out_tx, mut out_rx) = watch::channel(lease.clone());
        let task = tokio::spawn(keep_lease(
            reg.clone(),
            c.clone(),
            lease.clone(),
            ttl,
            attrs_rx,
            out_tx,
            metrics.clone(),
        ));

        // Renewals keep the 5 s lease alive well past its TTL.
        let m = metrics.clone();
        wait_for("6 renewals", Duration::from_secs(30), || {
            let m = m.clone();
            async move { m.lease_renewals.load(Relaxed) >= 6 }
        })
        .await?;
        assert!(
            subnets(&reg).await?.contains_key(&key),
            "lease survived > TTL"
        );
        assert_eq!(metrics.lease_reacquisitions.load(Relaxed), 0);

        // Deleted by hand -> the same subnet comes back.
        let before = subnets(&reg).await?[&key].1;
        del(&reg, &format!("subnets/{key}")).await?;
        let r = reg.clone();
        let k = key.clone();
        wait_for("the lease to come back", Duration::from_secs(30), || {
            let (r, k) = (r.clone(), k.clone());
            async move {
                subnets(&r)
                    .await
                    .map(|s| s.get(&k).is_some_and(|(v, _)| *v == attrs(1).to_json()))
                    .unwrap_or(false)
            }
        })
        .await?;
        // Counted once acquire returns, which is a moment after the key is back.
        let m = metrics.clone();
        wait_for("reacquisition 1 counted", Duration::from_secs(10), || {
            let m = m.clone();
            async move { m.lease_reacquisitions.load(Relaxed) >= 1 }
        })
        .await?;
        assert_eq!(metrics.lease_reacquisitions.load(Relaxed), 1);
        assert_eq!(out_rx.borrow_and_update().subnet, lease.subnet);
        let after = subnets(&reg).await?[&key].1;
        assert_ne!(after, before, "claimed on a fresh etcd lease");

        // The etcd lease revoked by hand (as if it expired) -> back again.
        reg.client().lease_client().revoke(after).await?;
        let r = reg.clone();
        let k = key.clone();
        wait_for(
            "the lease to come back after revoke",
            Duration::from_secs(30),
            || {
                let (r, k) = (r.clone(), k.clone());
                async move {
                    subnets(&r)
                        .await
                        .map(|s| s.get(&k).is_some_and(|(_, l)| *l != after))
                        .unwrap_or(false)
                }
            },
        )
        .await?;
        // Counted once acquire returns, which is a moment after the key is back.
        let m = metrics.clone();
        wait_for("reacquisition 2 counted", Duration::from_secs(10), || {
            let m = m.clone();
            async move { m.lease_reacquisitions.load(Relaxed) >= 2 }
        })
        .await?;
        assert_eq!(metrics.lease_reacquisitions.load(Relaxed), 2);

        // New attributes (MAC changed) are re-put and published.
        let mut new = attrs(1);
        new = LeaseAttrs::vxlan(
            new.v4.unwrap().public_ip,
            1,
            "02:11:22:33:44:55".parse().unwrap(),
        );
        attrs_tx.send(new.clone())?;
        let r = reg.clone();
        let (k, n) = (key.clone(), new.clone());
        wait_for("the new value", Duration::from_secs(30), || {
            let (r, k, n) = (r.clone(), k.clone(), n.clone());
            async move {
                subnets(&r)
                    .await
                    .map(|s| s.get(&k).is_some_and(|(v, _)| *v == n.to_json()))
                    .unwrap_or(false)
            }
        })
        .await?;
        wait_for("out to carry new attrs", Duration::from_secs(10), || {
            let ok = out_rx.borrow().attrs == new;
            async move { ok }
        })
        .await?;
        assert_eq!(
            metrics.lease_reacquisitions.load(Relaxed),
            2,
            "update is not a loss"
        );
        assert!(!task.is_finished());
        task.abort();
        Ok(())
    })
}

#[test]
fn keep_lease_survives_etcd_restart_and_takes_same_subnet() -> Result<()> {
    let mut etcd = Etcd::start()?;
    let opts = etcd.opts();
    let (stop_tx, stop_rx) = std::sync::mpsc::channel::<()>();
    let (go_tx, go_rx) = std::sync::mpsc::channel::<()>();
    let path = format!("/run/netns/{}", etcd.ns);
    // The test thread controls etcd; the netns thread runs the keeper.
    let worker = std::thread::spawn(move || -> Result<()> {
        let fd = File::open(&path)?;
        nix::sched::setns(&fd, nix::sched::CloneFlags::CLONE_NEWNET)?;
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        rt.block_on(async move {
            let reg = connect(&opts).await?;
            let c = cfg(r#"{"Network":"10.90.0.0/16"}"#);
            let ttl = Duration::from_secs(3);
            let lease = acquire(&reg, &c, &attrs(1), None, ttl).await?;
            let metrics = Arc::new(Metrics::default());
            let (_attrs_tx, attrs_rx) = watch::channel(attrs(1));
            let (out_tx, out_rx) = watch::channel(lease.clone());
            let task = tokio::spawn(keep_lease(
                reg.clone(),
                c,
                lease.clone(),
                ttl,
                attrs_rx,
                out_tx,
                metrics.clone(),
            ));
            stop_tx.send(())?;
            // etcd is down for longer than the TTL while we wait here.
            tokio::task::spawn_blocking(move || go_rx.recv()).await??;
            let m = metrics.clone();
            wait_for("reconnects to be counted", Duration::from_secs(30), || {
                let m = m.clone();
                async move { m.etcd_reconnects.load(Relaxed) >= 1 }
            })
            .await?;
            let r = reg.clone();
            let key = format!("{}-24", lease.subnet.unwrap().network());
            wait_for("our key after the restart", Duration::from_secs(60), || {
                let (r, k) = (r.clone(), key.clone());
                async move {
                    subnets(&r)
                        .await
                        .map(|s| s.get(&k).is_some_and(|(v, _)| *v == attrs(1).to_json()))
                        .unwrap_or(false)
                }
            })
            .await?;
            // Still renewing afterwards.
            let n = metrics.lease_renewals.load(Relaxed);
            let m = metrics.clone();
            wait_for(
                "renewals after the restart",
                Duration::from_secs(30),
                || {
                    let m = m.clone();
                    async move { m.lease_renewals.load(Relaxed) > n + 2 }
                },
            )
            .await?;
            assert_eq!(out_rx.borrow().subnet, lease.subnet);
            assert!(!task.is_finished());
            task.abort();
            Ok(())
        })
    });
    stop_rx.recv()?;
    etcd.stop();
    // Longer than the 3 s TTL: the lease is expired on restart (etcd restores leases with a
    // fresh TTL, so either way the keeper must end up holding the subnet).
    std::thread::sleep(Duration::from_secs(5));
    etcd.restart()?;
    go_tx.send(())?;
    worker
        .join()
        .map_err(|_| anyhow::anyhow!("worker panicked"))?
}

/// Applies peer events like the daemon would: a Snapshot replaces, Upsert/Remove patch.
#[derive(Default)]
struct Model {
    peers: BTreeMap<Ipv4Net, Peer>,
    snapshots: usize,
}

impl Model {
    fn apply(&mut self, ev: PeerEvent) {
        match ev {
            PeerEvent::Snapshot(ps) => {
                self.snapshots += 1;
                self.peers = ps.into_iter().map(|p| (p.subnet, p)).collect();
            }
            PeerEvent::Upsert(p) => {
                self.peers.insert(p.subnet, p);
            }
            PeerEvent::Remove(n) => {
                self.peers.remove(&n);
            }
            // Only says the view may be stale until the next snapshot.
            PeerEvent::ListFailed(_) => {}
            other => panic!("an IPv6 event on a v4-only network: {other:?}"),
        }
    }
}

async fn next(rx: &mut mpsc::Receiver<PeerEvent>) -> Result<PeerEvent> {
    tokio::time::timeout(Duration::from_secs(30), rx.recv())
        .await
        .context("no peer event")?
        .context("watcher ended")
}

fn peer(i: u8) -> Peer {
    let a = attrs(i);
    Peer {
        subnet: net(&format!("10.100.{i}.0/24")),
        public_ip: a.v4.unwrap().public_ip,
        vtep_mac: a.vtep_mac(),
    }
}

async fn put_peer(reg: &EtcdRegistry, i: u8) -> Result<()> {
    put(
        reg,
        &format!("subnets/10.100.{i}.0-24"),
        &attrs(i).to_json(),
    )
    .await
}

fn own(i: u8) -> OwnLease {
    OwnLease {
        subnet: Some(net(&format!("10.100.{i}.0/24"))),
        subnet6: None,
        attrs: attrs(i),
    }
}

#[test]
fn watch_peers_snapshot_then_changes_skipping_garbage() -> Result<()> {
    let etcd = Etcd::start()?;
    let opts = etcd.opts();
    etcd.run(move || async move {
        let reg = connect(&opts).await?;
        let c = cfg(r#"{"Network":"10.100.0.0/16"}"#);
        put_peer(&reg, 1).await?; // ours
        put_peer(&reg, 2).await?;
        put_peer(&reg, 3).await?;
        put(&reg, "subnets/10.100.4.0-24", "{garbage").await?;
        put(&reg, "subnets/10.101.0.0-24", &attrs(5).to_json()).await?; // outside network
        put(&reg, "subnets/10.100.6.0-25", &attrs(6).to_json()).await?; // wrong length
        put(&reg, "subnets/not-a-subnet", &attrs(7).to_json()).await?;
        let metrics = Arc::new(Metrics::default());
        let (own_tx, own_rx) = watch::channel(own(1));
        let (tx, mut rx) = mpsc::channel(64);
        let task = tokio::spawn(watch_peers(reg.clone(), c, own_rx, tx, metrics.clone()));

        let PeerEvent::Snapshot(ps) = next(&mut rx).await? else {
            bail!("first event must be a snapshot");
        };
        assert_eq!(ps, vec![peer(2), peer(3)]);
        assert_eq!(metrics.invalid_leases_skipped.load(Relaxed), 4);

        // Our own subnet changing produces nothing, nor does a lease with our public IP and MAC
        // under another subnet (our new one, before the keeper says so); the next peer does.
        put(&reg, "subnets/10.100.1.0-24", &attrs(1).to_json()).await?;
        put(&reg, "subnets/10.100.9.0-24", &attrs(1).to_json()).await?;
        put_peer(&reg, 8).await?;
        assert!(matches!(next(&mut rx).await?, PeerEvent::Remove(n) if n == net("10.100.9.0/24")));
        assert!(matches!(next(&mut rx).await?, PeerEvent::Upsert(p) if p == peer(8)));
        // A lease turning invalid is removed.
        put(
            &reg,
            "subnets/10.100.2.0-24",
            r#"{"PublicIP":"198.18.0.2"}"#,
        )
        .await?;
        assert!(matches!(next(&mut rx).await?, PeerEvent::Remove(n) if n == peer(2).subnet));
        // Delete -> Remove.
        del(&reg, "subnets/10.100.3.0-24").await?;
        assert!(matches!(next(&mut rx).await?, PeerEvent::Remove(n) if n == peer(3).subnet));
        // A changed value -> Upsert with the new MAC.
        let mut moved = attrs(8);
        moved = LeaseAttrs::vxlan(
            moved.v4.unwrap().public_ip,
            1,
            "02:00:00:00:01:08".parse().unwrap(),
        );
        put(&reg, "subnets/10.100.8.0-24", &moved.to_json()).await?;
        let PeerEvent::Upsert(p) = next(&mut rx).await? else {
            bail!("expected upsert")
        };
        assert_eq!(p.vtep_mac, moved.vtep_mac());

        // Our subnet moves to 10.100.8.0/24 with node 8's address and MAC: a snapshot without
        // it, and with the leases carrying our old ones, which are someone else's now as far as
        // this watcher knows.
        own_tx.send(own(8))?;
        let PeerEvent::Snapshot(ps) = next(&mut rx).await? else {
            bail!("expected a snapshot after our subnet changed")
        };
        let nine = Peer {
            subnet: net("10.100.9.0/24"),
            ..peer(1)
        };
        assert_eq!(ps, vec![peer(1), nine]);
        assert!(!task.is_finished());
        task.abort();
        Ok(())
    })
}

#[test]
fn watch_peers_loses_nothing_under_churn_restart_and_compaction() -> Result<()> {
    let mut etcd = Etcd::start()?;
    let opts = etcd.opts();
    let path = format!("/run/netns/{}", etcd.ns);
    let (phase_tx, phase_rx) = std::sync::mpsc::channel::<()>();
    let (go_tx, go_rx) = std::sync::mpsc::channel::<()>();
    let worker = std::thread::spawn(move || -> Result<()> {
        let fd = File::open(&path)?;
        nix::sched::setns(&fd, nix::sched::CloneFlags::CLONE_NEWNET)?;
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        rt.block_on(async move {
            let reg = connect(&opts).await?;
            let c = cfg(r#"{"Network":"10.100.0.0/16"}"#);
            // A writer churns leases while the watcher lists and starts watching: whatever
            // falls between list and watch must still arrive.
            let writer = {
                let reg = EtcdRegistry::connect(&opts).await?;
                tokio::spawn(async move {
                    for round in 0..300u32 {
                        let i = (round * 7 % 20) as u8 + 2;
                        if round % 3 == 2 {
                            del(&reg, &format!("subnets/10.100.{i}.0-24")).await?;
                        } else {
                            put_peer(&reg, i).await?;
                        }
                    }
                    anyhow::Ok(())
                })
            };
            let metrics = Arc::new(Metrics::default());
            let (_own_tx, own_rx) = watch::channel(own(1));
            let (tx, mut rx) = mpsc::channel(1024);
            tokio::time::sleep(Duration::from_millis(20)).await;
            let task = tokio::spawn(watch_peers(
                reg.clone(),
                c.clone(),
                own_rx,
                tx,
                metrics.clone(),
            ));
            writer.await??;

            let mut model = Model::default();
            let expected = |s: BTreeMap<String, (String, i64)>| -> BTreeMap<Ipv4Net, Peer> {
                s.keys()
                    .map(|k| k.trim_start_matches("10.100.").trim_end_matches(".0-24"))
                    .filter_map(|i| i.parse::<u8>().ok())
                    .filter(|&i| i != 1)
                    .map(|i| (peer(i).subnet, peer(i)))
                    .collect()
            };
            let want = expected(subnets(&reg).await?);
            assert!(!want.is_empty());
            while model.peers != want {
                model.apply(next(&mut rx).await?);
            }

            // etcd goes away; while the watcher cannot reach it, leases change and the history
            // is compacted. When etcd is back the watcher re-lists (a new Snapshot) with the
            // changes, and keeps following.
            phase_tx.send(())?;
            tokio::task::spawn_blocking(move || go_rx.recv()).await??;
            let reg = connect(&opts).await?;
            let want = expected(subnets(&reg).await?);
            assert!(want.contains_key(&peer(30).subnet));
            assert!(!want.contains_key(&peer(2).subnet));
            let snapshots = model.snapshots;
            while model.peers != want || model.snapshots == snapshots {
                model.apply(next(&mut rx).await?);
            }
            put_peer(&reg, 32).await?;
            let want = expected(subnets(&reg).await?);
            while model.peers != want {
                model.apply(next(&mut rx).await?);
            }
            assert!(metrics.peer_resyncs.load(Relaxed) >= 1);
            assert!(metrics.etcd_reconnects.load(Relaxed) >= 1);
            assert!(!task.is_finished());
            task.abort();
            Ok(())
        })
    });
    if phase_rx.recv().is_ok() {
        etcd.change_and_compact_hidden()?;
        go_tx.send(())?;
    }
    worker
        .join()
        .map_err(|_| anyhow::anyhow!("worker panicked"))?
}

#[test]
fn watch_from_a_compacted_revision_asks_for_a_relist() -> Result<()> {
    let etcd = Etcd::start()?;
    let opts = etcd.opts();
    etcd.run(move || async move {
        let reg = connect(&opts).await?;
        put_peer(&reg, 2).await?;
        let (_, rev) = reg.list_subnets().await?;
        put_peer(&reg, 3).await?;
        del(&reg, "subnets/10.100.2.0-24").await?;
        let (_, now) = reg.list_subnets().await?;
        reg.client().kv_client().compact(now, None).await?;
        // Watching from just after the old list hits the compaction.
        let mut w = reg.watch_subnets(rev + 1, None).await?;
        let msg = tokio::time::timeout(Duration::from_secs(10), w.next()).await??;
        assert!(
            matches!(&msg, WatchMsg::Reset(why) if why.contains("compacted")),
            "{msg:?}"
        );
        // From the current revision it works and sees the next change.
        let mut w = reg.watch_subnets(now + 1, None).await?;
        put_peer(&reg, 4).await?;
        let msg = tokio::time::timeout(Duration::from_secs(10), w.next()).await??;
        assert!(
            matches!(msg, WatchMsg::Changes(ref c) if c.len() == 1),
            "{msg:?}"
        );
        Ok(())
    })
}

#[test]
fn dead_etcd_gives_errors_not_hangs() -> Result<()> {
    let mut etcd = Etcd::start()?;
    etcd.stop();
    let opts = etcd.opts();
    etcd.run(move || async move {
        // connect is lazy and succeeds; calls fail within the call timeout.
        let reg = EtcdRegistry::connect(&opts).await?;
        let r = tokio::time::timeout(Duration::from_secs(60), reg.get_config()).await?;
        assert!(matches!(r, Err(RegistryError::Etcd(_))), "{r:?}");
        let r = tokio::time::timeout(
            Duration::from_secs(60),
            acquire(
                &reg,
                &cfg(r#"{"Network":"10.1.0.0/16"}"#),
                &attrs(1),
                None,
                TTL,
            ),
        )
        .await?;
        assert!(matches!(r, Err(RegistryError::Etcd(_))), "{r:?}");
        Ok(())
    })
}

#[test]
fn bad_options_are_reported() -> Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let mut o = EtcdOptions {
            endpoints: vec!["http://127.0.0.1:1".into()],
            prefix: PREFIX.into(),
            ca_file: Some("/nonexistent/ca.pem".into()),
            cert_file: None,
            key_file: None,
        };
        let e = EtcdRegistry::connect(&o)
            .await
            .err()
            .context("missing CA")?;
        assert!(e.to_string().contains("/nonexistent/ca.pem"), "{e}");
        o.ca_file = None;
        o.endpoints = vec![];
        assert!(EtcdRegistry::connect(&o).await.is_err());
        o.endpoints = vec!["127.0.0.1:1".into()];
        o.prefix = "relative".into();
        assert!(EtcdRegistry::connect(&o).await.is_err());
        Ok(())
    })
}

#[test]
fn tls_with_client_certificates() -> Result<()> {
    let etcd = Etcd::start_with(true)?;
    let opts = etcd.opts();
    etcd.run(move || async move {
        // Scheme-less endpoint + TLS files -> https.
        let reg = connect(&opts).await?;
        let c = cfg(r#"{"Network":"10.110.0.0/16"}"#);
        let l = acquire(&reg, &c, &attrs(1), None, TTL).await?;
        assert!(subnets(&reg)
            .await?
            .contains_key(&format!("{}-24", l.subnet.unwrap().network())));
        // Explicit https:// works too.
        let mut o = opts.clone();
        o.endpoints = vec![format!("https://127.0.0.1:{CLIENT_PORT}")];
        let reg2 = connect(&o).await?;
        assert_eq!(subnets(&reg2).await?.len(), 1);
        // Without a client certificate etcd refuses us: an error, not a hang.
        o.cert_file = None;
        o.key_file = None;
        let reg3 = EtcdRegistry::connect(&o).await?;
        let r = tokio::time::timeout(Duration::from_secs(60), reg3.get_config()).await?;
        assert!(r.is_err(), "{r:?}");
        // Plain http endpoint with TLS files is refused up front.
        let mut o = opts.clone();
        o.endpoints = vec![format!("http://127.0.0.1:{CLIENT_PORT}")];
        assert!(matches!(
            EtcdRegistry::connect(&o).await,
            Err(RegistryError::Options(_))
        ));
        Ok(())
    })
}

/// Starts `watch_peers` for node 1 (10.100.1.0/24) on the 10.100.0.0/16 network.
fn start_watcher(
    reg: &EtcdRegistry,
) -> (
    tokio::task::JoinHandle<()>,
    mpsc::Receiver<PeerEvent>,
    Arc<Metrics>,
    watch::Sender<OwnLease>,
) {
    let metrics = Arc::new(Metrics::default());
    let (own_tx, own_rx) = watch::channel(own(1));
    let (tx, rx) = mpsc::channel(1024);
    let task = tokio::spawn(watch_peers(
        reg.clone(),
        cfg(r#"{"Network":"10.100.0.0/16"}"#),
        own_rx,
        tx,
        metrics.clone(),
    ));
    (task, rx, metrics, own_tx)
}

/// Applies events until `model` satisfies `done` (bounded by `next`'s timeout).
async fn until(
    rx: &mut mpsc::Receiver<PeerEvent>,
    model: &mut Model,
    done: impl Fn(&Model) -> bool,
) -> Result<()> {
    while !done(model) {
        model.apply(next(rx).await?);
    }
    Ok(())
}

/// F5: an alias key (`<subnet>&...`, flannel's dual-stack form) next to a live lease must
/// neither remove that peer (garbage, or the alias deleted) nor replace it (a valid value
/// pointing elsewhere); when the plain key goes, a valid alias speaks for the subnet.
#[test]
fn alias_keys_neither_remove_nor_replace_a_live_peer() -> Result<()> {
    let etcd = Etcd::start()?;
    let opts = etcd.opts();
    etcd.run(move || async move {
        let reg = connect(&opts).await?;
        put_peer(&reg, 2).await?;
        // Listed before the watch starts: the alias sorts after the plain key.
        put(&reg, "subnets/10.100.2.0-24&fd00:0:0:2::-64", "junk").await?;
        let (task, mut rx, metrics, _own) = start_watcher(&reg);
        let PeerEvent::Snapshot(ps) = next(&mut rx).await? else {
            bail!("first event must be a snapshot");
        };
        assert_eq!(ps, vec![peer(2)]);
        let mut model = Model::default();
        model.apply(PeerEvent::Snapshot(ps));

        // Through the watch: garbage on the alias, the alias deleted, a valid alias pointing at
        // another node. Then a marker: everything before it has been seen once it arrives.
        put(&reg, "subnets/10.100.2.0-24&fd00:0:0:2::-64", "still junk").await?;
        del(&reg, "subnets/10.100.2.0-24&fd00:0:0:2::-64").await?;
        put(
            &reg,
            "subnets/10.100.2.0-24&fc00::-64",
            &attrs(66).to_json(),
        )
        .await?;
        put_peer(&reg, 3).await?;
        until(&mut rx, &mut model, |m| {
            m.peers.contains_key(&peer(3).subnet)
        })
        .await?;
        assert_eq!(
            model.peers.get(&peer(2).subnet),
            Some(&peer(2)),
            "{:?}",
            model.peers
        );
        assert_eq!(metrics.lease_alias_conflicts.load(Relaxed), 1);

        // The plain key goes: the alias is what is left; then it goes too.
        del(&reg, "subnets/10.100.2.0-24").await?;
        let hijack = Peer {
            subnet: peer(2).subnet,
            ..peer(66)
        };
        until(&mut rx, &mut model, |m| {
            m.peers.get(&peer(2).subnet) == Some(&hijack)
        })
        .await?;
        del(&reg, "subnets/10.100.2.0-24&fc00::-64").await?;
        until(&mut rx, &mut model, |m| {
            !m.peers.contains_key(&peer(2).subnet)
        })
        .await?;
        assert!(!task.is_finished());
        task.abort();
        Ok(())
    })
}

/// F7: two leases announcing one VTEP MAC at two addresses: the older keeps it, the younger is
/// skipped (counted); when the older goes, the younger is a peer.
#[test]
fn a_copied_vtep_mac_stays_with_the_older_lease() -> Result<()> {
    let etcd = Etcd::start()?;
    let opts = etcd.opts();
    etcd.run(move || async move {
        let reg = connect(&opts).await?;
        put_peer(&reg, 4).await?;
        let copy = LeaseAttrs::vxlan(
            attrs(5).v4.unwrap().public_ip,
            1,
            attrs(4).vtep_mac().unwrap(),
        );
        put(&reg, "subnets/10.100.5.0-24", &copy.to_json()).await?;
        let (task, mut rx, metrics, _own) = start_watcher(&reg);
        let PeerEvent::Snapshot(ps) = next(&mut rx).await? else {
            bail!("first event must be a snapshot");
        };
        assert_eq!(ps, vec![peer(4)]);
        assert_eq!(metrics.duplicate_vtep_macs.load(Relaxed), 1);
        let mut model = Model::default();
        model.apply(PeerEvent::Snapshot(ps));

        // A younger copy arriving through the watch cannot take the MAC either.
        put(&reg, "subnets/10.100.6.0-24", &copy.to_json()).await?;
        put_peer(&reg, 7).await?;
        until(&mut rx, &mut model, |m| {
            m.peers.contains_key(&peer(7).subnet)
        })
        .await?;
        assert!(
            !model.peers.contains_key(&peer(6).subnet),
            "{:?}",
            model.peers
        );
        assert_eq!(model.peers[&peer(4).subnet], peer(4));
        assert_eq!(metrics.duplicate_vtep_macs.load(Relaxed), 2);

        // The keeper leaves: the older of the two copies gets the MAC.
        del(&reg, "subnets/10.100.4.0-24").await?;
        let five = Peer {
            subnet: peer(5).subnet,
            public_ip: copy.v4.unwrap().public_ip,
            vtep_mac: copy.vtep_mac(),
        };
        until(&mut rx, &mut model, |m| {
            m.peers.get(&five.subnet) == Some(&five) && !m.peers.contains_key(&peer(4).subnet)
        })
        .await?;
        assert!(!model.peers.contains_key(&peer(6).subnet));
        task.abort();
        Ok(())
    })
}

/// 1.4 MiB: etcd (1.5 MiB request limit by default) takes it; three exceed a 4 MiB message.
fn big_value(i: u8) -> String {
    format!("{{\"junk{i}\":\"{}\"}}", "x".repeat(1_400_000))
}

/// F6: values that together exceed one gRPC message (4 MiB) must stop neither the list (joins,
/// re-lists) nor the watch (one revision deleting them all, a watcher catching up over them).
/// They are dropped unkept and counted.
#[test]
fn large_values_stop_neither_list_nor_watch() -> Result<()> {
    let mut etcd = Etcd::start()?;
    let opts = etcd.opts();
    let path = format!("/run/netns/{}", etcd.ns);
    let (phase_tx, phase_rx) = std::sync::mpsc::channel::<()>();
    let (go_tx, go_rx) = std::sync::mpsc::channel::<()>();
    let worker = std::thread::spawn(move || -> Result<()> {
        let fd = File::open(&path)?;
        nix::sched::setns(&fd, nix::sched::CloneFlags::CLONE_NEWNET)?;
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        rt.block_on(async move {
            let reg = connect(&opts).await?;
            let c = cfg(r#"{"Network":"10.100.0.0/16"}"#);
            put_peer(&reg, 2).await?;
            for i in 0..3 {
                put(
                    &reg,
                    &format!("subnets/10.100.{}.0-24", 50 + i),
                    &big_value(i),
                )
                .await?;
            }
            put_peer(&reg, 3).await?;
            // Many small keys too: the list takes several pages.
            for i in 100..=250u8 {
                put_peer(&reg, i).await?;
            }
            let (kvs, rev) = reg.list_subnets().await?;
            assert_eq!(kvs.len(), 2 + 3 + 151);
            assert!(rev > 0);
            let big: Vec<_> = kvs.iter().filter(|kv| kv.oversized.is_some()).collect();
            assert_eq!(big.len(), 3);
            assert!(big.iter().all(|kv| kv.value.is_empty()));
            // A node can still join.
            let l = acquire(&reg, &c, &attrs(9), Some(net("10.100.90.0/24")), TTL).await?;
            assert_eq!(l.subnet.unwrap(), net("10.100.90.0/24"));

            let (task, mut rx, metrics, _own) = start_watcher(&reg);
            let PeerEvent::Snapshot(ps) = next(&mut rx).await? else {
                bail!("first event must be a snapshot");
            };
            assert_eq!(ps.len(), 2 + 151 + 1, "peers 2, 3, 100..=250 and node 9");
            assert_eq!(metrics.oversized_leases_dropped.load(Relaxed), 3);
            let mut model = Model::default();
            model.apply(PeerEvent::Snapshot(ps));

            // One revision deleting all three: a single watch response of their size with the
            // previous values attached.
            reg.client()
                .kv_client()
                .delete(
                    format!("{PREFIX}/subnets/10.100.5"),
                    Some(etcd_client::DeleteOptions::new().with_prefix()),
                )
                .await?;
            put_peer(&reg, 4).await?;
            until(&mut rx, &mut model, |m| {
                m.peers.contains_key(&peer(4).subnet)
            })
            .await?;

            // While the watcher cannot reach etcd, big values arrive; it catches up over them by
            // re-listing.
            let resyncs = metrics.peer_resyncs.load(Relaxed);
            phase_tx.send(())?;
            tokio::task::spawn_blocking(move || go_rx.recv()).await??;
            let reg = connect(&opts).await?;
            put_peer(&reg, 5).await?;
            until(&mut rx, &mut model, |m| {
                m.peers.contains_key(&peer(5).subnet)
            })
            .await?;
            until(&mut rx, &mut model, |m| {
                m.peers.contains_key(&peer(6).subnet)
            })
            .await?;
            assert!(metrics.peer_resyncs.load(Relaxed) > resyncs);
            assert_eq!(metrics.oversized_leases_dropped.load(Relaxed), 6);
            assert!(!task.is_finished());
            task.abort();
            Ok(())
        })
    });
    if phase_rx.recv().is_ok() {
        etcd.stop();
        etcd.spawn_on(HIDDEN_PORT)?;
        let mut tries = 0;
        while etcd.ctl(&["endpoint", "health"]).is_err() {
            tries += 1;
            if tries > 300 {
                bail!("hidden etcd did not come up");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let file = etcd.dir.join("big.json");
        for i in 0..3 {
            std::fs::write(&file, big_value(10 + i))?;
            etcd.ctl_input(
                &["put", &format!("{PREFIX}/subnets/10.100.{}.0-24", 60 + i)],
                &file,
            )?;
        }
        etcd.ctl(&[
            "put",
            &format!("{PREFIX}/subnets/10.100.6.0-24"),
            &attrs(6).to_json(),
        ])?;
        etcd.stop();
        etcd.spawn_on(CLIENT_PORT)?;
        go_tx.send(())?;
    }
    worker
        .join()
        .map_err(|_| anyhow::anyhow!("worker panicked"))?
}

/// F6: a watcher that cannot list says so (the daemon's /readyz uses it), and recovers.
#[test]
fn a_failing_list_is_reported() -> Result<()> {
    let mut etcd = Etcd::start()?;
    etcd.stop();
    let opts = etcd.opts();
    let path = format!("/run/netns/{}", etcd.ns);
    let (failed_tx, failed_rx) = std::sync::mpsc::channel::<()>();
    let (go_tx, go_rx) = std::sync::mpsc::channel::<()>();
    let worker = std::thread::spawn(move || -> Result<()> {
        let fd = File::open(&path)?;
        nix::sched::setns(&fd, nix::sched::CloneFlags::CLONE_NEWNET)?;
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        rt.block_on(async move {
            let reg = EtcdRegistry::connect(&opts).await?;
            let (task, mut rx, _metrics, _own) = start_watcher(&reg);
            let PeerEvent::ListFailed(why) = next(&mut rx).await? else {
                bail!("expected ListFailed while etcd is down");
            };
            assert!(why.contains("etcd"), "{why}");
            failed_tx.send(())?;
            tokio::task::spawn_blocking(move || go_rx.recv()).await??;
            loop {
                match next(&mut rx).await? {
                    PeerEvent::ListFailed(_) => continue,
                    PeerEvent::Snapshot(ps) => {
                        assert!(ps.is_empty());
                        break;
                    }
                    other => bail!("unexpected {other:?}"),
                }
            }
            task.abort();
            Ok(())
        })
    });
    if failed_rx.recv().is_ok() {
        etcd.restart()?;
        go_tx.send(())?;
    }
    worker
        .join()
        .map_err(|_| anyhow::anyhow!("worker panicked"))?
}

/// F16: a key of another length counts only as a lease inside the network: one stray
/// `<network>-16` with garbage must not block every subnet (nor a node's own re-acquire); one
/// that does block is named.
#[test]
fn a_stray_key_of_another_length_blocks_nothing() -> Result<()> {
    let etcd = Etcd::start()?;
    let opts = etcd.opts();
    etcd.run(move || async move {
        let reg = connect(&opts).await?;
        let c =
            cfg(r#"{"Network":"10.90.0.0/16","SubnetMin":"10.90.1.0","SubnetMax":"10.90.3.0"}"#);
        put(&reg, "subnets/10.90.0.0-16", "garbage").await?;
        put(&reg, "subnets/0.0.0.0-1", &attrs(7).to_json()).await?; // outside the network
        let a = acquire(&reg, &c, &attrs(1), None, TTL).await?;
        assert!(c.ipv4.as_ref().unwrap().fits(a.subnet.unwrap()));
        // Our own subnet again after our key was deleted.
        del(&reg, &format!("subnets/{}-24", a.subnet.unwrap().network())).await?;
        let again = acquire(&reg, &c, &attrs(1), Some(a.subnet.unwrap()), TTL).await?;
        assert_eq!(again.subnet.unwrap(), a.subnet.unwrap());

        // A real lease of another length (an older SubnetLen) still covers its range, and when
        // it blocks everything the error says which key it is.
        put(&reg, "subnets/10.90.0.0-22", &attrs(8).to_json()).await?;
        let e = acquire(&reg, &c, &attrs(2), None, TTL).await.unwrap_err();
        let m = e.to_string();
        assert!(
            m.contains("out of subnets") && m.contains("cover the range: 10.90.0.0-22"),
            "{m}"
        );
        assert!(!m.contains("10.90.0.0-16"), "{m}");
        Ok(())
    })
}
