//! The Node watch on a thread of its own. Every kubelet status write of every Node reaches every
//! twilld as a watch event: 500 a second with 5,000 Nodes and 10 s heartbeats. Through
//! kube-runtime's watcher each one cost a hand-off from hyper's connection task, a wake-up of the
//! watcher and a decode, 1.33 % of a core at 5,000 Nodes where curl reading the same stream cost
//! 0.40 % (BENCHMARKS §11). Here a plain thread reads the watch with blocking reads, settles a
//! heartbeat before decoding it (`events`), and hands the async side only what changes a peer.
//! When what it read changed nothing and nothing more has come, it rests 20 ms, so that
//! heartbeats are read several at a time; a change arriving meanwhile waits at most that long.
//!
//! The list stays kube's (paged, as its watcher lists); the thread watches from the list's
//! resourceVersion, resumes from the last one it read when the server ends a watch, and reports
//! anything else (410 Gone, a refusal, a dead connection) as an error, on which the caller lists
//! again, as it does for kube's watcher.

mod body;
mod conn;
mod events;

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use futures::Stream;
use k8s_openapi::api::core::v1::Node;
use kube::api::{Api, ListParams};
use kube::runtime::watcher::Event;
use tokio::sync::mpsc;
use tracing::debug;

use crate::registry::kube::slim::SlimNode;
use body::BodyLines;
use conn::ShutHandle;
pub use conn::Target;
use events::{Events, Line};

/// Asked of the server per watch; it ends the watch then, and the thread resumes.
const WATCH_TIMEOUT_S: u32 = 290;
/// No byte for this long (no event, no bookmark, the server's end not seen): a dead connection.
pub const READ_TIMEOUT: Duration = Duration::from_secs(WATCH_TIMEOUT_S as u64 + 30);
/// The rest after a read that changed nothing.
const REST: Duration = Duration::from_millis(20);
/// A watch that ends sooner than this with nothing read is an error, not a resume: a server or
/// proxy that ends every watch at once must not be asked again in a loop.
const SHORTEST_WATCH: Duration = Duration::from_secs(1);
/// Page size of the list (kube's watcher's).
const PAGE: u32 = 500;
/// The read buffer: a burst of heartbeats read in one go.
const READ_BUF: usize = 256 << 10;

#[derive(Debug, thiserror::Error)]
pub enum NodeWatchError {
    #[error("listing Nodes: {0}")]
    List(#[from] kube::Error),
    #[error("watching Nodes: {0}")]
    Watcher(#[from] kube::runtime::watcher::Error),
    #[error("building the Node watch request: {0}")]
    Request(String),
    #[error("TLS to the API server: {0}")]
    Tls(String),
    #[error("Node watch connection: {0}")]
    Io(#[from] std::io::Error),
    #[error("the Node watch was refused ({code}): {message}")]
    Status { code: u16, message: String },
    #[error("the Node watch's resourceVersion is too old (410 Gone)")]
    Gone,
    #[error("a Node watch event that does not decode: {0}")]
    Decode(serde_json::Error),
    #[error("the Node watch's HTTP: {0}")]
    Http(String),
    #[error("the API server ended the Node watch at once, with nothing sent")]
    EndedAtOnce,
    #[error("the Node watch was stopped")]
    Stopped,
    #[error("the Node watch's thread ended without saying why")]
    ThreadEnded,
}

pub type Item = Result<Event<Node>, NodeWatchError>;

/// The Nodes as kube's watcher would give them (Init, InitApply.., InitDone, then Apply and
/// Delete), less the heartbeats. Dropping the stream ends the thread's watch.
pub fn node_events(api: Api<SlimNode>, target: std::sync::Arc<Target>) -> NodeEvents {
    let (tx, rx) = mpsc::channel::<Item>(256);
    let shut = ShutHandle::default();
    let handle = tokio::runtime::Handle::current();
    let s = shut.clone();
    tokio::spawn(async move {
        let Some(rv) = list(&api, &tx).await else {
            return;
        };
        let spawned = std::thread::Builder::new()
            .name("node-watch".into())
            .spawn(move || {
                if let Err(e) = watch(&target, &handle, rv, &tx, &s) {
                    if !matches!(e, NodeWatchError::Stopped) {
                        let _ = tx.blocking_send(Err(e));
                    }
                }
            });
        if let Err(e) = spawned {
            // The thread's closure (and its sender) is gone with the error; the stream says
            // `ThreadEnded`.
            tracing::error!(error = %e, "could not start the Node watch's thread");
        }
    });
    NodeEvents {
        rx,
        shut,
        ended: false,
    }
}

pub struct NodeEvents {
    rx: mpsc::Receiver<Item>,
    shut: ShutHandle,
    ended: bool,
}

impl Stream for NodeEvents {
    type Item = Item;
    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Item>> {
        match self.rx.poll_recv(cx) {
            // Every way out of the list and the thread says why, but a panic or a thread that
            // could not start: an error, so that the caller lists again (kube's watcher never
            // ends, and the caller takes an end as its own shutdown).
            Poll::Ready(None) if !self.ended => {
                self.ended = true;
                Poll::Ready(Some(Err(NodeWatchError::ThreadEnded)))
            }
            p => p,
        }
    }
}

impl Drop for NodeEvents {
    fn drop(&mut self) {
        self.shut.shut();
    }
}

/// Lists every Node in pages; sends Init, InitApply for each, InitDone. The list's
/// resourceVersion, or None when the list failed (said on `tx`) or nobody listens.
async fn list(api: &Api<SlimNode>, tx: &mpsc::Sender<Item>) -> Option<String> {
    tx.send(Ok(Event::Init)).await.ok()?;
    let mut cont: Option<String> = None;
    loop {
        let mut lp = ListParams::default().limit(PAGE);
        if let Some(c) = &cont {
            lp = lp.continue_token(c);
        }
        let page = match api.list(&lp).await {
            Ok(p) => p,
            Err(e) => {
                let _ = tx.send(Err(e.into())).await;
                return None;
            }
        };
        for n in page.items {
            tx.send(Ok(Event::InitApply(n.into_node()))).await.ok()?;
        }
        cont = page.metadata.continue_.filter(|c| !c.is_empty());
        if cont.is_none() {
            let rv = page.metadata.resource_version.unwrap_or_default();
            tx.send(Ok(Event::InitDone)).await.ok()?;
            return Some(rv);
        }
    }
}

/// Watches from `rv` until an error (or the stream's drop, `Stopped`).
fn watch(
    target: &Target,
    rt: &tokio::runtime::Handle,
    rv: String,
    tx: &mpsc::Sender<Item>,
    shut: &ShutHandle,
) -> Result<(), NodeWatchError> {
    let mut events = Events::new(rv);
    let mut buf = vec![0u8; READ_BUF];
    loop {
        if shut.is_shut() {
            return Err(NodeWatchError::Stopped);
        }
        let path = format!(
            "/api/v1/nodes?watch=true&allowWatchBookmarks=true&timeoutSeconds={WATCH_TIMEOUT_S}\
             &resourceVersion={}",
            events.resource_version
        );
        let req = rt.block_on(target.request(&path))?;
        let started = Instant::now();
        let mut conn = target.open(&req, shut)?;
        let mut lines = BodyLines::new(conn.chunked);
        let mut any_line = false;
        let first = std::mem::take(&mut conn.first);
        let mut pending: &[u8] = &first;
        loop {
            let mut changed = false;
            lines.feed(pending, |l| {
                any_line = true;
                let out = match events.line(l)? {
                    Line::Nothing => return Ok(()),
                    Line::Apply(n) => Event::Apply(n),
                    Line::Delete(n) => Event::Delete(n),
                };
                changed = true;
                tx.blocking_send(Ok(out))
                    .map_err(|_| NodeWatchError::Stopped)
            })?;
            if lines.done() {
                break;
            }
            // A read that changed nothing, with nothing more come since: rest, so that what
            // comes meanwhile is read in one go.
            if !changed && !pending.is_empty() && !conn.more_ready() {
                std::thread::sleep(REST);
            }
            let n = match conn.read(&mut buf) {
                Ok(n) => n,
                Err(_) if shut.is_shut() => return Err(NodeWatchError::Stopped),
                Err(e) => return Err(e.into()),
            };
            if n == 0 {
                if shut.is_shut() {
                    return Err(NodeWatchError::Stopped);
                }
                if conn.chunked {
                    return Err(NodeWatchError::Http(
                        "the connection closed inside the Node watch's body".into(),
                    ));
                }
                break;
            }
            pending = &buf[..n];
        }
        if !any_line && started.elapsed() < SHORTEST_WATCH {
            return Err(NodeWatchError::EndedAtOnce);
        }
        debug!(resource_version = %events.resource_version, "the Node watch ended; resuming");
    }
}

#[cfg(test)]
mod tests {
    //! The thread against a scripted HTTP server on loopback: what it asks and what it hands
    //! on. The lab tests (tests/tests/kube.rs) run twilld's whole Kubernetes mode, this watch
    //! included, against twill's fake API server.

    use super::*;
    use std::io::{Read, Write};
    use std::net::TcpListener;
    use std::sync::mpsc as smpsc;

    use kube::ResourceExt;
    use serde_json::json;

    /// Answers one connection per script entry, in order; sends each request's head back.
    fn server(script: Vec<Vec<u8>>, hold: bool) -> (String, smpsc::Receiver<String>) {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", l.local_addr().unwrap());
        let (tx, rx) = smpsc::channel();
        std::thread::spawn(move || {
            let mut kept = Vec::new();
            for answer in script {
                let Ok((mut s, _)) = l.accept() else { return };
                let mut head = Vec::new();
                let mut b = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") && s.read(&mut b).unwrap_or(0) == 1 {
                    head.push(b[0]);
                }
                let _ = tx.send(String::from_utf8_lossy(&head).to_string());
                let _ = s.write_all(&answer);
                if hold {
                    kept.push(s);
                }
            }
            // Held connections stay open until the test ends.
            std::thread::sleep(Duration::from_secs(60));
            drop(kept);
        });
        (url, rx)
    }

    fn chunk(s: &str) -> String {
        format!("{:x}\r\n{s}\r\n", s.len())
    }

    fn event(kind: &str, name: &str, rv: u32, beat: &str, ip: &str) -> String {
        let obj = json!({
            "metadata": {"name": name, "resourceVersion": rv.to_string(),
                         "annotations": {"flannel.alpha.coreos.com/public-ip": ip}},
            "spec": {"podCIDR": "10.1.1.0/24"},
            "status": {"conditions": [{"type": "Ready", "lastHeartbeatTime": beat}]}
        });
        format!("{}\n", json!({"type": kind, "object": obj}))
    }

    const OK: &str =
        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n";

    fn target(url: &str) -> Target {
        let mut c = kube::Config::new(url.parse().unwrap());
        c.auth_info.token = Some("t0ken".to_string().into());
        Target::new(&c, Duration::from_secs(30)).unwrap().unwrap()
    }

    /// Runs the thread's watch from resourceVersion 3; returns what it handed on, its end, and
    /// the shut handle.
    fn run(
        url: &str,
    ) -> (
        mpsc::Receiver<Item>,
        smpsc::Receiver<NodeWatchError>,
        ShutHandle,
    ) {
        let (tx, rx) = mpsc::channel(16);
        let (end_tx, end_rx) = smpsc::channel();
        let shut = ShutHandle::default();
        let t = target(url);
        let rt = tokio::runtime::Handle::current();
        let s = shut.clone();
        std::thread::spawn(move || {
            let e = watch(&t, &rt, "3".into(), &tx, &s).unwrap_err();
            let _ = end_tx.send(e);
        });
        (rx, end_rx, shut)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn heartbeats_stay_in_the_thread_and_a_watch_resumes_where_it_ended() {
        let first = format!(
            "{OK}{}{}{}{}0\r\n\r\n",
            chunk(&event("ADDED", "a", 5, "t1", "198.19.0.1")),
            chunk(&event("MODIFIED", "a", 6, "t2", "198.19.0.1")),
            chunk(&(event("MODIFIED", "b", 7, "t2", "198.19.0.2") + &event("MODIFIED", "a", 8, "t3", "198.19.0.1"))),
            chunk("{\"type\":\"BOOKMARK\",\"object\":{\"kind\":\"Node\",\"metadata\":{\"resourceVersion\":\"9\"}}}\n"),
        );
        let second = format!(
            "{OK}{}{}",
            chunk(&event("MODIFIED", "a", 10, "t4", "198.19.0.7")),
            chunk("{\"type\":\"ERROR\",\"object\":{\"kind\":\"Status\",\"code\":410,\"message\":\"too old\"}}\n"),
        );
        let (url, heads) = server(vec![first.into_bytes(), second.into_bytes()], false);
        let (mut rx, end, _shut) = run(&url);
        let mut got = Vec::new();
        while let Some(Ok(e)) = rx.recv().await {
            got.push(match e {
                Event::Apply(n) => format!(
                    "apply {} {}",
                    n.name_any(),
                    n.annotations()["flannel.alpha.coreos.com/public-ip"]
                ),
                Event::Delete(n) => format!("delete {}", n.name_any()),
                _ => "other".into(),
            });
        }
        assert_eq!(
            got,
            [
                "apply a 198.19.0.1",
                "apply b 198.19.0.2",
                "apply a 198.19.0.7"
            ]
        );
        assert!(matches!(end.recv().unwrap(), NodeWatchError::Gone));
        let (h1, h2) = (heads.recv().unwrap(), heads.recv().unwrap());
        assert!(h1.starts_with("GET /api/v1/nodes?watch=true&allowWatchBookmarks=true&timeoutSeconds=290&resourceVersion=3 HTTP/1.1\r\n"), "{h1}");
        assert!(h1.contains("authorization: Bearer t0ken\r\n"), "{h1}");
        assert!(h2.contains("&resourceVersion=9 HTTP/1.1"), "{h2}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_refusal_and_a_watch_ended_at_once_are_errors() {
        let refused = "HTTP/1.1 403 Forbidden\r\nContent-Type: application/json\r\nContent-Length: 63\r\n\r\n{\"kind\":\"Status\",\"code\":403,\"message\":\"nodes is forbidden: no\"}";
        // Held open after the answer, as a keep-alive server does.
        let (url, _) = server(vec![refused.as_bytes().to_vec()], true);
        let (_rx, end, _shut) = run(&url);
        // A bound on a hang (a read past the answer waits for the 30 s read timeout).
        match end
            .recv_timeout(Duration::from_secs(10))
            .expect("the refusal was not reported")
        {
            NodeWatchError::Status { code: 403, message } => {
                assert_eq!(message, "nodes is forbidden: no")
            }
            e => panic!("{e}"),
        }
        let (url, _) = server(vec![format!("{OK}0\r\n\r\n").into_bytes()], false);
        let (_rx, end, _shut) = run(&url);
        assert!(matches!(end.recv().unwrap(), NodeWatchError::EndedAtOnce));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn shutting_ends_a_blocked_read() {
        let open = format!("{OK}{}", chunk(&event("ADDED", "a", 5, "t1", "198.19.0.1")));
        let (url, _) = server(vec![open.into_bytes()], true);
        let (mut rx, end, shut) = run(&url);
        assert!(matches!(rx.recv().await, Some(Ok(Event::Apply(_)))));
        // The thread now waits in a read on a connection the server holds open.
        shut.shut();
        // A bound on a hang, not a timing: the read returns as soon as the socket is shut.
        let e = end
            .recv_timeout(Duration::from_secs(20))
            .expect("the thread did not end");
        assert!(matches!(e, NodeWatchError::Stopped), "{e}");
    }

    #[tokio::test]
    async fn a_thread_gone_without_a_word_is_an_error_once() {
        use futures::StreamExt;
        let (tx, rx) = mpsc::channel(1);
        drop(tx);
        let mut s = NodeEvents {
            rx,
            shut: ShutHandle::default(),
            ended: false,
        };
        assert!(matches!(
            s.next().await,
            Some(Err(NodeWatchError::ThreadEnded))
        ));
        assert!(s.next().await.is_none());
    }

    #[test]
    fn a_connection_refused_is_an_error() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        drop(l);
        let rt = tokio::runtime::Runtime::new().unwrap();
        let t = target(&format!("http://{addr}"));
        let (tx, _rx) = mpsc::channel(1);
        let e = watch(&t, rt.handle(), "1".into(), &tx, &ShutHandle::default()).unwrap_err();
        assert!(matches!(e, NodeWatchError::Io(_)), "{e}");
    }
}
