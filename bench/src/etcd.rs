//! Simulated peers written straight to etcd (in bulk: transactions of up to 100 puts), and
//! etcd's own request counters read from its /metrics.

use std::fs::File;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;
use std::sync::mpsc;
use std::thread::JoinHandle;

use anyhow::{anyhow, Context, Result};
use etcd_client::{Client, Txn, TxnOp};
use nix::sched::{setns, CloneFlags};
use twill_tests::lab::{Lab, SUBNETS_PREFIX, UNDERLAY_IP};

use crate::nl;

/// etcd 3.4 refuses transactions with more than 128 operations by default.
const TXN_OPS: usize = 100;

/// A remote node that exists only as a lease in etcd.
#[derive(Clone, Copy, Debug)]
pub struct SimPeer {
    pub idx: u32,
}

impl SimPeer {
    /// Subnets 10.1.0.0/24 upwards: clear of the 10.0.x.0/24 range a fresh twilld picks from.
    pub fn subnet(&self) -> Ipv4Addr {
        let i = self.idx + 256;
        Ipv4Addr::new(10, (i >> 8) as u8, (i & 0xff) as u8, 0)
    }

    /// Distinct public addresses in 198.19.0.0/16 (the benchmarking range, off the lab's /24).
    pub fn public_ip(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(Ipv4Addr::new(198, 19, 0, 0)) + self.idx + 1)
    }

    pub fn mac(&self) -> [u8; 6] {
        let i = self.idx;
        [0x0e, 0xb0, 0, (i >> 16) as u8, (i >> 8) as u8, i as u8]
    }

    pub fn key(&self) -> String {
        format!("{SUBNETS_PREFIX}{}-24", self.subnet())
    }

    pub fn value(&self) -> String {
        format!(
            r#"{{"PublicIP":"{}","PublicIPv6":null,"BackendType":"vxlan","BackendData":{{"VNI":1,"VtepMAC":"{}"}}}}"#,
            self.public_ip(),
            nl::mac_str(&self.mac())
        )
    }

    /// The three kernel entries a node installs for this peer, as the listener names them.
    pub fn entry_keys(&self) -> [String; 3] {
        [
            nl::neigh_key(self.subnet()),
            nl::fdb_key(&self.mac()),
            nl::route_key(self.subnet(), 24),
        ]
    }
}

pub fn peers(range: std::ops::Range<u32>) -> Vec<SimPeer> {
    range.map(|idx| SimPeer { idx }).collect()
}

pub fn entry_keys(peers: &[SimPeer]) -> Vec<String> {
    peers.iter().flat_map(|p| p.entry_keys()).collect()
}

/// The network config every scenario uses: a /8 so 5,000+ nodes fit.
pub const CONFIG: &str = r#"{"Network":"10.0.0.0/8","SubnetLen":24,"Backend":{"Type":"vxlan"}}"#;

/// Work for the writer's thread: anything with its runtime and client.
type Job = Box<dyn FnOnce(&tokio::runtime::Runtime, &mut Client) + Send>;

enum Cmd {
    Put(Vec<(String, String)>, mpsc::Sender<Result<usize>>),
    Delete(Vec<String>, mpsc::Sender<Result<usize>>),
    Run(Job),
}

/// An etcd client on its own thread inside the lab's underlay namespace (where etcd listens),
/// with its own tokio runtime; calls block until etcd has answered.
pub struct Writer {
    tx: Option<mpsc::Sender<Cmd>>,
    handle: Option<JoinHandle<()>>,
}

impl Writer {
    pub fn connect(lab: &Lab) -> Result<Writer> {
        let path = Path::new("/run/netns").join(lab.underlay_ns());
        let ns = File::open(&path).with_context(|| format!("open {}", path.display()))?;
        let endpoint = lab.etcd_endpoint();
        let (tx, rx) = mpsc::channel::<Cmd>();
        let (ready_tx, ready_rx) = mpsc::channel::<Result<()>>();
        let handle = std::thread::Builder::new()
            .name("etcd-writer".into())
            .spawn(move || {
                let setup = || -> Result<(tokio::runtime::Runtime, Client)> {
                    setns(&ns, CloneFlags::CLONE_NEWNET).map_err(|e| anyhow!("setns: {e}"))?;
                    let rt = tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()?;
                    let client = rt.block_on(Client::connect([endpoint.as_str()], None))?;
                    Ok((rt, client))
                };
                let (rt, mut client) = match setup() {
                    Ok(v) => {
                        let _ = ready_tx.send(Ok(()));
                        v
                    }
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                        return;
                    }
                };
                for cmd in rx {
                    match cmd {
                        Cmd::Put(kvs, reply) => {
                            let _ = reply.send(rt.block_on(put(&mut client, kvs)));
                        }
                        Cmd::Delete(keys, reply) => {
                            let _ = reply.send(rt.block_on(delete(&mut client, keys)));
                        }
                        Cmd::Run(job) => job(&rt, &mut client),
                    }
                }
            })?;
        ready_rx
            .recv()
            .map_err(|_| anyhow!("etcd writer thread died"))?
            .context("connect to etcd")?;
        Ok(Writer {
            tx: Some(tx),
            handle: Some(handle),
        })
    }

    fn call(&self, make: impl FnOnce(mpsc::Sender<Result<usize>>) -> Cmd) -> Result<usize> {
        let (rtx, rrx) = mpsc::channel();
        self.tx
            .as_ref()
            .expect("writer open")
            .send(make(rtx))
            .map_err(|_| anyhow!("etcd writer gone"))?;
        rrx.recv().map_err(|_| anyhow!("etcd writer gone"))?
    }

    /// Write the leases; returns the number of etcd requests it took.
    pub fn put_peers(&self, peers: &[SimPeer]) -> Result<usize> {
        let kvs = peers.iter().map(|p| (p.key(), p.value())).collect();
        self.call(|r| Cmd::Put(kvs, r))
    }

    pub fn delete_peers(&self, peers: &[SimPeer]) -> Result<usize> {
        let keys = peers.iter().map(SimPeer::key).collect();
        self.call(|r| Cmd::Delete(keys, r))
    }

    /// Write any keys (transactions of up to 100 puts); returns the etcd requests it took.
    pub fn put_kvs(&self, kvs: Vec<(String, String)>) -> Result<usize> {
        if kvs.is_empty() {
            return Ok(0);
        }
        self.call(|r| Cmd::Put(kvs, r))
    }

    pub fn delete_keys(&self, keys: Vec<String>) -> Result<usize> {
        if keys.is_empty() {
            return Ok(0);
        }
        self.call(|r| Cmd::Delete(keys, r))
    }

    /// Run `f` on the writer's thread with its runtime and client (inside the underlay
    /// namespace), and return what it returns.
    pub fn with<T, F>(&self, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&tokio::runtime::Runtime, &mut Client) -> T + Send + 'static,
    {
        let (rtx, rrx) = mpsc::channel();
        let job: Job = Box::new(move |rt, c| {
            let _ = rtx.send(f(rt, c));
        });
        self.tx
            .as_ref()
            .expect("writer open")
            .send(Cmd::Run(job))
            .map_err(|_| anyhow!("etcd writer gone"))?;
        rrx.recv().map_err(|_| anyhow!("etcd writer gone"))
    }

    /// One put, timed: the instant just before it was sent, and when etcd acknowledged it.
    pub fn put_timed(
        &self,
        key: &str,
        value: &str,
    ) -> Result<(std::time::Instant, std::time::Duration)> {
        let (k, v) = (key.to_string(), value.to_string());
        self.with(move |rt, c| -> Result<_> {
            let t0 = std::time::Instant::now();
            rt.block_on(c.put(k, v, None))?;
            Ok((t0, t0.elapsed()))
        })?
    }

    /// The value of `key`, if present.
    pub fn get(&self, key: &str) -> Result<Option<String>> {
        let k = key.to_string();
        self.with(move |rt, c| -> Result<_> {
            let resp = rt.block_on(c.get(k, None))?;
            Ok(resp
                .kvs()
                .first()
                .map(|kv| String::from_utf8_lossy(kv.value()).into_owned()))
        })?
    }

    /// Delete every key under `prefix`; returns how many went.
    pub fn delete_prefix(&self, prefix: &str) -> Result<i64> {
        let p = prefix.to_string();
        self.with(move |rt, c| -> Result<_> {
            let opts = etcd_client::DeleteOptions::new().with_prefix();
            Ok(rt.block_on(c.delete(p, Some(opts)))?.deleted())
        })?
    }

    /// etcd's own floor under any watcher: a watch on `key` is opened, then a put is timed to
    /// the acknowledgement and to the watch event arriving (same client, same machine).
    pub fn put_watch_latency(
        &self,
        key: &str,
        value: &str,
    ) -> Result<(std::time::Duration, std::time::Duration)> {
        let (k, v) = (key.to_string(), value.to_string());
        self.with(move |rt, c| -> Result<_> {
            rt.block_on(async {
                let mut stream = c.watch(k.as_str(), None).await?;
                // The first message confirms the watch was created.
                stream.message().await?;
                let t0 = std::time::Instant::now();
                c.put(k.as_str(), v, None).await?;
                let ack = t0.elapsed();
                loop {
                    match stream.message().await? {
                        Some(r) if !r.events().is_empty() => break,
                        Some(_) => continue,
                        None => anyhow::bail!("watch closed"),
                    }
                }
                let event = t0.elapsed();
                Ok((ack, event))
            })
        })?
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        self.tx.take();
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

async fn put(client: &mut Client, kvs: Vec<(String, String)>) -> Result<usize> {
    if kvs.len() == 1 {
        let (k, v) = kvs.into_iter().next().expect("one");
        client.put(k, v, None).await?;
        return Ok(1);
    }
    let mut requests = 0;
    for chunk in kvs.chunks(TXN_OPS) {
        let ops: Vec<TxnOp> = chunk
            .iter()
            .map(|(k, v)| TxnOp::put(k.as_str(), v.as_str(), None))
            .collect();
        client.txn(Txn::new().and_then(ops)).await?;
        requests += 1;
    }
    Ok(requests)
}

async fn delete(client: &mut Client, keys: Vec<String>) -> Result<usize> {
    if keys.len() == 1 {
        client.delete(keys[0].as_str(), None).await?;
        return Ok(1);
    }
    let mut requests = 0;
    for chunk in keys.chunks(TXN_OPS) {
        let ops: Vec<TxnOp> = chunk
            .iter()
            .map(|k| TxnOp::delete(k.as_str(), None))
            .collect();
        client.txn(Txn::new().and_then(ops)).await?;
        requests += 1;
    }
    Ok(requests)
}

/// gRPC messages etcd received, summed over methods, plus the per-method split.
#[derive(Clone, Debug, Default)]
pub struct EtcdCounters {
    pub received: f64,
    pub by_method: std::collections::BTreeMap<String, f64>,
}

impl EtcdCounters {
    pub fn read(lab: &Lab) -> Result<EtcdCounters> {
        let port = lab.etcd_port().ok_or_else(|| anyhow!("no etcd"))?;
        let addr = SocketAddr::from((UNDERLAY_IP, port));
        let (code, body) = twill_tests::http::get_in_netns(&lab.underlay_ns(), addr, "/metrics")?;
        if code != 200 {
            return Err(anyhow!("etcd /metrics: HTTP {code}"));
        }
        Ok(parse_counters(&body))
    }

    /// Per-method difference `self - before`.
    pub fn delta(&self, before: &EtcdCounters) -> (f64, Vec<(String, f64)>) {
        let split = self
            .by_method
            .iter()
            .map(|(m, v)| {
                (
                    m.clone(),
                    v - before.by_method.get(m).copied().unwrap_or(0.0),
                )
            })
            .filter(|(_, d)| *d > 0.0)
            .collect();
        (self.received - before.received, split)
    }
}

/// `grpc_server_msg_received_total{grpc_method="Range",...} 12`: every unary request and every
/// message on a stream (watch creation, lease keep-alive) counts once.
pub fn parse_counters(text: &str) -> EtcdCounters {
    let mut c = EtcdCounters::default();
    for line in text.lines() {
        let Some(rest) = line.strip_prefix("grpc_server_msg_received_total{") else {
            continue;
        };
        let Some((labels, value)) = rest.split_once('}') else {
            continue;
        };
        let Ok(v) = value.trim().parse::<f64>() else {
            continue;
        };
        let method = labels
            .split(',')
            .find_map(|l| l.strip_prefix("grpc_method=\""))
            .map(|m| m.trim_end_matches('"').to_owned())
            .unwrap_or_default();
        c.received += v;
        *c.by_method.entry(method).or_default() += v;
    }
    c
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peers_are_distinct_and_flannel_shaped() {
        let ps = peers(0..6000);
        let mut subnets: Vec<_> = ps.iter().map(|p| p.subnet()).collect();
        let mut ips: Vec<_> = ps.iter().map(|p| p.public_ip()).collect();
        let mut macs: Vec<_> = ps.iter().map(|p| p.mac()).collect();
        subnets.sort();
        subnets.dedup();
        ips.sort();
        ips.dedup();
        macs.sort();
        macs.dedup();
        assert_eq!((subnets.len(), ips.len(), macs.len()), (6000, 6000, 6000));
        let p = SimPeer { idx: 1 };
        assert_eq!(p.key(), "/coreos.com/network/subnets/10.1.1.0-24");
        let v: serde_json::Value = serde_json::from_str(&p.value()).unwrap();
        assert_eq!(v["PublicIP"], "198.19.0.2");
        assert_eq!(v["BackendData"]["VtepMAC"], "0e:b0:00:00:00:01");
        assert!(ps.iter().all(|p| p.subnet().octets()[1] >= 1));
    }

    #[test]
    fn sums_grpc_received_counters() {
        let text = "# TYPE grpc_server_msg_received_total counter\n\
grpc_server_msg_received_total{grpc_method=\"Range\",grpc_service=\"etcdserverpb.KV\",grpc_type=\"unary\"} 12\n\
grpc_server_msg_received_total{grpc_method=\"Watch\",grpc_service=\"etcdserverpb.Watch\",grpc_type=\"bidi_stream\"} 3\n\
grpc_server_started_total{grpc_method=\"Range\"} 99\n";
        let c = parse_counters(text);
        assert_eq!(c.received, 15.0);
        assert_eq!(c.by_method["Range"], 12.0);
        let mut later = c.clone();
        later.received += 2.0;
        *later.by_method.get_mut("Range").unwrap() += 2.0;
        assert_eq!(later.delta(&c), (2.0, vec![("Range".to_owned(), 2.0)]));
    }
}
