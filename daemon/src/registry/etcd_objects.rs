//! etcd implementation of `ObjectStore`: directories of objects under the prefix.

use std::time::Duration;

use etcd_client::{EventType, GetOptions, WatchOptions, WatchStream};

use super::etcd::EtcdRegistry;
use super::objects::{ObjChange, ObjKv, ObjWatch, ObjWatchMsg, ObjectStore};
use super::RegistryError;

const CALL_TIMEOUT: Duration = Duration::from_secs(5);
/// Keys per Range request: bounds each response far below gRPC's 4 MiB message limit even with
/// large objects (values are limited, see `MAX_VALUE`).
const PAGE: i64 = 256;
/// Values larger than this are not objects twill writes or reads (a NetworkPolicy is a few KiB);
/// they are skipped by the readers, and never held.
pub const MAX_VALUE: usize = 256 * 1024;

async fn timed<T>(
    what: &str,
    f: impl std::future::Future<Output = Result<T, etcd_client::Error>>,
) -> Result<T, RegistryError> {
    match tokio::time::timeout(CALL_TIMEOUT, f).await {
        Ok(r) => r.map_err(|e| RegistryError::Etcd(e.to_string())),
        Err(_) => Err(RegistryError::Etcd(format!(
            "{what}: no answer within {}s (is etcd reachable?)",
            CALL_TIMEOUT.as_secs()
        ))),
    }
}

/// The end of the key range that holds every key starting with `prefix`.
fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

impl EtcdRegistry {
    fn obj_dir(&self, dir: &str) -> String {
        format!("{}/{}/", self.prefix(), dir.trim_matches('/'))
    }
}

fn to_obj(dir: &str, key: &[u8], value: &[u8], rev: i64) -> Option<ObjKv> {
    Some(ObjKv {
        key: std::str::from_utf8(key)
            .ok()?
            .strip_prefix(dir)?
            .to_string(),
        value: value.to_vec(),
        mod_revision: rev,
    })
}

impl ObjectStore for EtcdRegistry {
    type Watch = EtcdObjWatch;

    async fn list(&self, dir: &str) -> Result<(Vec<ObjKv>, i64), RegistryError> {
        let d = self.obj_dir(dir);
        let end = prefix_end(d.as_bytes());
        let mut kv = self.client().kv_client();
        let mut out = Vec::new();
        let mut start = d.as_bytes().to_vec();
        let mut revision = 0;
        loop {
            let mut opts = GetOptions::new().with_range(end.clone()).with_limit(PAGE);
            if revision != 0 {
                // Every page at the first page's revision: one consistent snapshot.
                opts = opts.with_revision(revision);
            }
            let resp = timed("list", kv.get(start.clone(), Some(opts))).await?;
            if revision == 0 {
                revision = resp.header().map(|h| h.revision()).unwrap_or(0);
            }
            for k in resp.kvs() {
                if let Some(o) = to_obj(&d, k.key(), k.value(), k.mod_revision()) {
                    out.push(o);
                }
            }
            match resp.kvs().last() {
                Some(last) if resp.more() => {
                    start = last.key().to_vec();
                    start.push(0);
                }
                _ => return Ok((out, revision)),
            }
        }
    }

    async fn watch(&self, dir: &str, from_revision: i64) -> Result<EtcdObjWatch, RegistryError> {
        let d = self.obj_dir(dir);
        let opts = WatchOptions::new()
            .with_start_revision(from_revision)
            .with_prefix();
        let mut wc = self.client().watch_client();
        let stream = timed("watch", wc.watch(d.clone(), Some(opts))).await?;
        Ok(EtcdObjWatch { stream, dir: d })
    }

    async fn get(&self, dir: &str, key: &str) -> Result<Option<ObjKv>, RegistryError> {
        let d = self.obj_dir(dir);
        let mut kv = self.client().kv_client();
        let resp = timed("get", kv.get(format!("{d}{key}"), None)).await?;
        Ok(resp
            .kvs()
            .first()
            .and_then(|k| to_obj(&d, k.key(), k.value(), k.mod_revision())))
    }

    async fn put(&self, dir: &str, key: &str, value: &[u8]) -> Result<(), RegistryError> {
        let d = self.obj_dir(dir);
        let mut kv = self.client().kv_client();
        timed("put", kv.put(format!("{d}{key}"), value.to_vec(), None)).await?;
        Ok(())
    }

    async fn delete(&self, dir: &str, key: &str) -> Result<bool, RegistryError> {
        let d = self.obj_dir(dir);
        let mut kv = self.client().kv_client();
        let resp = timed("delete", kv.delete(format!("{d}{key}"), None)).await?;
        Ok(resp.deleted() > 0)
    }

    async fn delete_at(
        &self,
        dir: &str,
        key: &str,
        mod_revision: i64,
    ) -> Result<bool, RegistryError> {
        let k = format!("{}{key}", self.obj_dir(dir));
        self.delete_at_revision("delete", k, mod_revision).await
    }
}

/// A watch stream on a directory.
pub struct EtcdObjWatch {
    stream: WatchStream,
    dir: String,
}

impl ObjWatch for EtcdObjWatch {
    async fn next(&mut self) -> Result<ObjWatchMsg, RegistryError> {
        loop {
            let resp = match self.stream.message().await {
                Ok(Some(r)) => r,
                Ok(None) => return Ok(ObjWatchMsg::Reset("etcd closed the watch stream".into())),
                Err(e) => return Err(RegistryError::Etcd(e.to_string())),
            };
            if resp.compact_revision() > 0 {
                return Ok(ObjWatchMsg::Reset(format!(
                    "watch start revision was compacted (compact revision {})",
                    resp.compact_revision()
                )));
            }
            if resp.canceled() {
                return Ok(ObjWatchMsg::Reset(format!(
                    "etcd cancelled the watch: {}",
                    resp.cancel_reason()
                )));
            }
            let changes: Vec<ObjChange> = resp
                .events()
                .iter()
                .filter_map(|ev| {
                    let kv = ev.kv()?;
                    let o = to_obj(&self.dir, kv.key(), kv.value(), kv.mod_revision())?;
                    Some(match ev.event_type() {
                        EventType::Put => ObjChange::Put(o),
                        EventType::Delete => ObjChange::Delete(o.key),
                    })
                })
                .collect();
            if !changes.is_empty() {
                return Ok(ObjWatchMsg::Changes(changes));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_end_covers_the_directory() {
        assert_eq!(prefix_end(b"/p/pods/"), b"/p/pods0".to_vec());
        assert_eq!(prefix_end(b"a\xff"), b"b".to_vec());
    }
}
