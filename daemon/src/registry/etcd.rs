//! etcd v3 implementation of `SubnetRegistry` (etcd-client 0.21, works against etcd 3.4).
//!
//! The client connects lazily and reconnects by itself; every unary call is wrapped in a
//! timeout because a request to a dead endpoint otherwise waits for it forever. Watches are
//! long-lived streams: HTTP/2 keep-alive pings notice a dead or hung server.

use std::future::Future;
use std::time::Duration;

use etcd_client::{
    Certificate, Client, Compare, CompareOp, ConnectOptions, EventType, GetOptions, Identity,
    KeyValue, PutOptions, TlsOptions, Txn, TxnOp, WatchOptions, WatchStream,
};

use super::{
    EtcdOptions, RegistryError, SubnetChange, SubnetKv, SubnetRegistry, SubnetWatch, WatchMsg,
};

/// Upper bound for one unary etcd call.
const CALL_TIMEOUT: Duration = Duration::from_secs(5);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// etcd's server refuses pings more often than every 5 s (GOAWAY "too_many_pings").
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(5);
/// Keys per list page at most. A page is one gRPC message, which the client refuses above
/// 4 MiB: a page that is too large is asked again with half the keys (see `list_subnets`).
const PAGE: i64 = 500;
/// Largest watch message accepted. etcd (with `fragment`) splits a watch response above its
/// request limit (1.5 MiB by default) into several, but never one event: this leaves room for
/// a single event with a value at etcd's limit raised a few times over. A larger one ends the
/// watch, and the re-list that follows (in pages) reads past it.
const MAX_WATCH_MESSAGE: usize = 8 << 20;

#[derive(Clone)]
pub struct EtcdRegistry {
    client: Client,
    /// Without a trailing '/': `/coreos.com/network`.
    prefix: String,
}

fn etcd_err(e: etcd_client::Error) -> RegistryError {
    RegistryError::Etcd(e.to_string())
}

/// Run one etcd call with a deadline.
async fn timed<T>(
    what: &str,
    f: impl Future<Output = Result<T, etcd_client::Error>>,
) -> Result<T, RegistryError> {
    match tokio::time::timeout(CALL_TIMEOUT, f).await {
        Ok(r) => r.map_err(etcd_err),
        Err(_) => Err(RegistryError::Etcd(format!(
            "{what}: no answer within {}s (is etcd reachable?)",
            CALL_TIMEOUT.as_secs()
        ))),
    }
}

fn read_file(what: &str, path: &std::path::Path) -> Result<Vec<u8>, RegistryError> {
    std::fs::read(path)
        .map_err(|e| RegistryError::Options(format!("reading {what} {}: {e}", path.display())))
}

impl EtcdRegistry {
    /// Builds the client. The connection itself is made on first use (and remade after etcd
    /// restarts), so this succeeds while etcd is still down; bad options fail here.
    pub async fn connect(opts: &EtcdOptions) -> Result<Self, RegistryError> {
        let prefix = opts.prefix.trim_end_matches('/').to_string();
        if !prefix.starts_with('/') {
            return Err(RegistryError::Options(format!(
                "etcd prefix {:?} must start with '/'",
                opts.prefix
            )));
        }
        let endpoints: Vec<String> = opts
            .endpoints
            .iter()
            .flat_map(|e| e.split(','))
            .map(|e| e.trim().trim_end_matches('/').to_string())
            .filter(|e| !e.is_empty())
            .collect();
        if endpoints.is_empty() {
            return Err(RegistryError::Options("no etcd endpoints given".into()));
        }

        let mut options = ConnectOptions::new()
            .with_connect_timeout(CONNECT_TIMEOUT)
            .with_keep_alive(KEEPALIVE_INTERVAL, KEEPALIVE_TIMEOUT)
            .with_keep_alive_while_idle(false);
        let tls = opts.ca_file.is_some() || opts.cert_file.is_some() || opts.key_file.is_some();
        if tls {
            let mut t = TlsOptions::new();
            if let Some(ca) = &opts.ca_file {
                t = t.ca_certificate(Certificate::from_pem(read_file("etcd CA file", ca)?));
            }
            match (&opts.cert_file, &opts.key_file) {
                (Some(c), Some(k)) => {
                    t = t.identity(Identity::from_pem(
                        read_file("etcd cert file", c)?,
                        read_file("etcd key file", k)?,
                    ))
                }
                (None, None) => {}
                _ => {
                    return Err(RegistryError::Options(
                        "etcd client certificate and key must be given together".into(),
                    ))
                }
            }
            options = options.with_tls(t);
            if let Some(e) = endpoints.iter().find(|e| e.starts_with("http://")) {
                return Err(RegistryError::Options(format!(
                    "etcd endpoint {e} is plain http but TLS files were given; use https://"
                )));
            }
        }
        // Endpoints without a scheme get http:// (https:// with TLS) from etcd-client.
        let client = Client::connect(&endpoints, Some(options))
            .await
            .map_err(|e| RegistryError::Options(format!("etcd endpoints {endpoints:?}: {e}")))?;
        Ok(EtcdRegistry { client, prefix })
    }

    /// Raw bytes of `<prefix>/config`, None while the key does not exist.
    pub async fn get_config(&self) -> Result<Option<Vec<u8>>, RegistryError> {
        let key = format!("{}/config", self.prefix);
        let mut kv = self.client.kv_client();
        let resp = timed("get config", kv.get(key, None)).await?;
        Ok(resp.kvs().first().map(|kv| kv.value().to_vec()))
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The underlying client, for tests and tooling (e.g. compaction).
    pub fn client(&self) -> &Client {
        &self.client
    }

    fn dir(&self) -> String {
        format!("{}/subnets/", self.prefix)
    }

    fn key(&self, name: &str) -> String {
        format!("{}/subnets/{name}", self.prefix)
    }

    fn to_kv(&self, kv: &KeyValue) -> Option<SubnetKv> {
        let dir = self.dir();
        let key = std::str::from_utf8(kv.key()).ok()?;
        Some(SubnetKv::new(
            key.strip_prefix(&dir)?.to_string(),
            kv.value(),
            kv.lease(),
            kv.mod_revision(),
            kv.create_revision(),
        ))
    }

    /// One page of the subnets directory from key `from` on, at `revision` (0: the newest).
    async fn page(
        &self,
        from: &[u8],
        revision: i64,
        limit: i64,
        keys_only: bool,
    ) -> Result<etcd_client::GetResponse, PageError> {
        let mut opts = GetOptions::new()
            .with_range(prefix_end(self.dir().as_bytes()))
            .with_limit(limit)
            .with_revision(revision);
        if keys_only {
            opts = opts.with_keys_only();
        }
        let mut kv = self.client.kv_client();
        match timed("list subnets", kv.get(from.to_vec(), Some(opts))).await {
            Err(RegistryError::Etcd(m)) if m.contains("message length too large") => {
                Err(PageError::TooLarge)
            }
            r => r.map_err(PageError::Other),
        }
    }

    async fn txn(&self, what: &str, txn: Txn) -> Result<bool, RegistryError> {
        let mut kv = self.client.kv_client();
        Ok(timed(what, kv.txn(txn)).await?.succeeded())
    }

    /// Deletes `key` only while its mod revision is `mod_revision`; false if it was not.
    pub(super) async fn delete_at_revision(
        &self,
        what: &str,
        key: String,
        mod_revision: i64,
    ) -> Result<bool, RegistryError> {
        let txn = Txn::new()
            .when([Compare::mod_revision(
                key.clone(),
                CompareOp::Equal,
                mod_revision,
            )])
            .and_then([TxnOp::delete(key, None)]);
        self.txn(what, txn).await
    }
}

fn put_opts(lease: i64) -> Option<PutOptions> {
    (lease != 0).then(|| PutOptions::new().with_lease(lease))
}

fn revision(h: Option<&etcd_client::ResponseHeader>) -> i64 {
    h.map(|h| h.revision()).unwrap_or(0)
}

/// The client's limit for one unary answer (tonic's default).
const MAX_UNARY_MESSAGE: usize = 4 << 20;

enum PageError {
    /// The answer was larger than the client accepts in one message.
    TooLarge,
    Other(RegistryError),
}

impl From<PageError> for RegistryError {
    fn from(e: PageError) -> Self {
        match e {
            PageError::TooLarge => RegistryError::Etcd(format!(
                "list subnets: one key is larger than {MAX_UNARY_MESSAGE} bytes"
            )),
            PageError::Other(e) => e,
        }
    }
}

/// The first key after `key`.
fn next_key(key: &[u8]) -> Vec<u8> {
    let mut k = key.to_vec();
    k.push(0);
    k
}

/// The end of the range of keys starting with `prefix` (etcd's "prefix + 1").
fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0] // every key
}

impl SubnetRegistry for EtcdRegistry {
    type Watch = EtcdWatch;

    fn subnets_dir(&self) -> String {
        self.dir()
    }

    async fn config(&self) -> Result<Option<Vec<u8>>, RegistryError> {
        self.get_config().await
    }

    /// In pages, all at the revision of the first, so the result is one consistent view and
    /// the watch can start right after it. A page too large for one gRPC message is asked again
    /// with fewer keys; a single value too large even alone is skipped by name (read without
    /// values) and reported as oversized.
    async fn list_subnets(&self) -> Result<(Vec<SubnetKv>, i64), RegistryError> {
        let mut out = Vec::new();
        let mut from = self.dir().into_bytes();
        let mut rev = 0;
        let mut limit = PAGE;
        loop {
            let resp = match self.page(&from, rev, limit, false).await {
                Ok(r) => r,
                Err(PageError::TooLarge) if limit > 1 => {
                    limit = (limit / 2).max(1);
                    continue;
                }
                Err(PageError::TooLarge) => {
                    let resp = self.page(&from, rev, 1, true).await?;
                    if rev == 0 {
                        rev = revision(resp.header());
                    }
                    let Some(kv) = resp.kvs().first() else { break };
                    if let Some(mut big) = self.to_kv(kv) {
                        big.oversized = Some(MAX_UNARY_MESSAGE);
                        out.push(big);
                    }
                    from = next_key(kv.key());
                    continue;
                }
                Err(PageError::Other(e)) => return Err(e),
            };
            if rev == 0 {
                rev = revision(resp.header());
            }
            out.extend(resp.kvs().iter().filter_map(|kv| self.to_kv(kv)));
            match resp.kvs().last() {
                Some(last) if resp.more() => from = next_key(last.key()),
                _ => break,
            }
            limit = (limit * 2).min(PAGE);
        }
        Ok((out, rev))
    }

    async fn get_subnet(&self, name: &str) -> Result<(Option<SubnetKv>, i64), RegistryError> {
        let mut kv = self.client.kv_client();
        let resp = timed("get subnet", kv.get(self.key(name), None)).await?;
        let found = resp.kvs().first().and_then(|kv| self.to_kv(kv));
        Ok((found, revision(resp.header())))
    }

    async fn grant_lease(&self, ttl: Duration) -> Result<i64, RegistryError> {
        let mut lease = self.client.lease_client();
        let secs = ttl.as_secs().max(1) as i64;
        Ok(timed("grant lease", lease.grant(secs, None)).await?.id())
    }

    async fn revoke_lease(&self, id: i64) -> Result<(), RegistryError> {
        let mut lease = self.client.lease_client();
        timed("revoke lease", lease.revoke(id)).await.map(|_| ())
    }

    async fn renew_lease(&self, id: i64) -> Result<bool, RegistryError> {
        let mut lease = self.client.lease_client();
        // etcd-client sends the first keep-alive and checks its TTL itself; TTL 0 (lease gone)
        // comes back as this error.
        match tokio::time::timeout(CALL_TIMEOUT, lease.keep_alive(id)).await {
            Ok(Ok(_)) => Ok(true),
            Ok(Err(etcd_client::Error::LeaseKeepAliveError(m))) if m.contains("not found") => {
                Ok(false)
            }
            Ok(Err(e)) => Err(etcd_err(e)),
            Err(_) => Err(RegistryError::Etcd("renew lease: no answer in time".into())),
        }
    }

    async fn create_subnet(
        &self,
        name: &str,
        value: &str,
        lease: i64,
    ) -> Result<bool, RegistryError> {
        let key = self.key(name);
        let txn = Txn::new()
            .when([Compare::create_revision(key.clone(), CompareOp::Equal, 0)])
            .and_then([TxnOp::put(key, value, put_opts(lease))]);
        self.txn("claim subnet", txn).await
    }

    async fn replace_subnet(
        &self,
        name: &str,
        value: &str,
        lease: i64,
        mod_revision: i64,
    ) -> Result<bool, RegistryError> {
        let key = self.key(name);
        let txn = Txn::new()
            .when([Compare::mod_revision(
                key.clone(),
                CompareOp::Equal,
                mod_revision,
            )])
            .and_then([TxnOp::put(key, value, put_opts(lease))]);
        self.txn("re-put subnet", txn).await
    }

    async fn update_subnet(
        &self,
        name: &str,
        value: &str,
        lease: i64,
    ) -> Result<bool, RegistryError> {
        let key = self.key(name);
        let txn = Txn::new()
            .when([
                Compare::version(key.clone(), CompareOp::Greater, 0),
                Compare::lease(key.clone(), CompareOp::Equal, lease),
            ])
            .and_then([TxnOp::put(key, value, put_opts(lease))]);
        self.txn("update subnet", txn).await
    }

    async fn delete_subnet(&self, name: &str, mod_revision: i64) -> Result<bool, RegistryError> {
        self.delete_at_revision("delete subnet", self.key(name), mod_revision)
            .await
    }

    async fn watch_subnets(
        &self,
        from_revision: i64,
        name: Option<&str>,
    ) -> Result<EtcdWatch, RegistryError> {
        // No prev_kv (unused, and it doubles a message); fragments keep messages small.
        let mut opts = WatchOptions::new()
            .with_start_revision(from_revision)
            .with_fragment();
        let key = match name {
            Some(n) => self.key(n),
            None => {
                opts = opts.with_prefix();
                self.dir()
            }
        };
        let mut wc = self
            .client
            .watch_client()
            .max_decoding_message_size(MAX_WATCH_MESSAGE);
        let stream = timed("watch subnets", wc.watch(key, Some(opts))).await?;
        Ok(EtcdWatch {
            stream,
            dir: self.dir(),
        })
    }
}

/// A watch stream. Holds the request side too: etcd ends the watch when the client's request
/// stream closes.
pub struct EtcdWatch {
    stream: WatchStream,
    dir: String,
}

impl SubnetWatch for EtcdWatch {
    async fn next(&mut self) -> Result<WatchMsg, RegistryError> {
        loop {
            let resp = match self.stream.message().await {
                Ok(Some(r)) => r,
                Ok(None) => return Ok(WatchMsg::Reset("etcd closed the watch stream".into())),
                Err(e) => return Err(etcd_err(e)),
            };
            if resp.compact_revision() > 0 {
                return Ok(WatchMsg::Reset(format!(
                    "watch start revision was compacted (compact revision {})",
                    resp.compact_revision()
                )));
            }
            if resp.canceled() {
                return Ok(WatchMsg::Reset(format!(
                    "etcd cancelled the watch: {}",
                    resp.cancel_reason()
                )));
            }
            let changes: Vec<SubnetChange> = resp
                .events()
                .iter()
                .filter_map(|ev| {
                    let kv = ev.kv()?;
                    let name = std::str::from_utf8(kv.key())
                        .ok()?
                        .strip_prefix(&self.dir)?
                        .to_string();
                    Some(match ev.event_type() {
                        EventType::Put => SubnetChange::Put(SubnetKv::new(
                            name,
                            kv.value(),
                            kv.lease(),
                            kv.mod_revision(),
                            kv.create_revision(),
                        )),
                        EventType::Delete => SubnetChange::Delete(name),
                    })
                })
                .collect();
            // "created" and progress notifications carry no events.
            if !changes.is_empty() {
                return Ok(WatchMsg::Changes(changes));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_ranges() {
        assert_eq!(prefix_end(b"/a/subnets/"), b"/a/subnets0".to_vec());
        assert_eq!(prefix_end(b"a\xff"), b"b".to_vec());
        assert_eq!(next_key(b"k"), b"k\0".to_vec());
    }
}
