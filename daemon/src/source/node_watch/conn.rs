//! One watch request over a blocking socket: the request as kube's client would send it (its
//! base URI, credentials and extra headers layers, so token files, rotation and exec plugins
//! work as for every other request), TLS with kube's rustls configuration, and the response's
//! head read by hand.

use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpStream, ToSocketAddrs};
use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::header::{HeaderMap, ACCEPT};
use http::{Request, Uri};
use kube::client::{Body, ConfigExt};
use kube::Config;
use nix::sys::socket::MsgFlags;
use rustls::pki_types::ServerName;
use rustls::{ClientConfig, ClientConnection, StreamOwned};
use tower::{ServiceBuilder, ServiceExt};

use super::NodeWatchError;

/// Longest response head taken.
const MAX_HEAD: usize = 64 << 10;
/// How much of a refusal's body is read for its message.
const MAX_ERROR_BODY: usize = 64 << 10;

/// What every watch request needs: kube's client configuration and, for HTTPS, its rustls one.
pub struct Target {
    config: Config,
    tls: Option<Arc<ClientConfig>>,
    /// Where a read gives up: the server ends a watch after `timeoutSeconds` (and bookmarks
    /// come about once a minute), so a longer silence is a dead connection.
    pub read_timeout: Duration,
}

impl Target {
    /// None when the configuration asks for what this client does not do (a proxy): kube's
    /// watcher reads the Nodes then.
    pub fn new(config: &Config, read_timeout: Duration) -> Result<Option<Target>, NodeWatchError> {
        if config.proxy_url.is_some() {
            return Ok(None);
        }
        let tls = match config.cluster_url.scheme_str() {
            Some("https") => Some(Arc::new(
                config
                    .rustls_client_config()
                    .map_err(|e| NodeWatchError::Tls(e.to_string()))?,
            )),
            Some("http") => None,
            other => {
                return Err(NodeWatchError::Request(format!(
                    "the API server's URL has scheme {other:?}: not http or https"
                )))
            }
        };
        Ok(Some(Target {
            config: config.clone(),
            tls,
            read_timeout,
        }))
    }

    /// The request for `path_and_query`, through kube's layers (async: a token may be
    /// refreshed, or an exec plugin run).
    pub async fn request(&self, path_and_query: &str) -> Result<Request<Body>, NodeWatchError> {
        let c = &self.config;
        let err = |e: &dyn std::fmt::Display| NodeWatchError::Request(e.to_string());
        let svc = ServiceBuilder::new()
            .layer(c.base_uri_layer())
            .option_layer(c.auth_layer().map_err(|e| err(&e))?)
            .layer(c.extra_headers_layer().map_err(|e| err(&e))?)
            // The request as the layers leave it, handed back inside a response (tower-http's
            // layers want their inner service to answer with one).
            .service(tower::service_fn(|r: Request<Body>| async move {
                Ok::<_, tower::BoxError>(http::Response::new(r))
            }));
        let req = Request::get(path_and_query)
            .header(ACCEPT, "application/json")
            .body(Body::empty())
            .map_err(|e| err(&e))?;
        let out = svc.oneshot(req).await.map_err(|e| err(&e))?;
        Ok(out.into_body())
    }

    /// Connects and sends `req`; returns the stream after the response head, once that says
    /// 200, and whether the body is chunked.
    pub fn open(&self, req: &Request<Body>, shut: &ShutHandle) -> Result<Conn, NodeWatchError> {
        let uri = req.uri();
        let host = uri
            .host()
            .ok_or_else(|| NodeWatchError::Request(format!("no host in {uri}")))?;
        let port = uri
            .port_u16()
            .unwrap_or(if self.tls.is_some() { 443 } else { 80 });
        let tcp = connect(host, port, self.config.connect_timeout)?;
        tcp.set_read_timeout(Some(self.read_timeout))?;
        tcp.set_write_timeout(Some(self.read_timeout))?;
        tcp.set_nodelay(true)?;
        shut.set(&tcp)?;
        let mut stream = match &self.tls {
            None => Stream::Plain(tcp),
            Some(tls) => {
                let name = self
                    .config
                    .tls_server_name
                    .clone()
                    .unwrap_or_else(|| host.trim_matches(['[', ']']).to_string());
                let name =
                    ServerName::try_from(name).map_err(|e| NodeWatchError::Tls(e.to_string()))?;
                let conn = ClientConnection::new(tls.clone(), name)
                    .map_err(|e| NodeWatchError::Tls(e.to_string()))?;
                Stream::Tls(Box::new(StreamOwned::new(conn, tcp)))
            }
        };
        stream.write_all(&request_head(uri, req.headers(), host, port))?;
        stream.flush()?;
        let (head, rest) = read_head(&mut stream)?;
        let Head {
            code,
            chunked,
            length,
        } = parse_head(&head)?;
        if code != 200 {
            return Err(refusal(code, chunked, length, rest, &mut stream));
        }
        Ok(Conn {
            stream,
            first: rest,
            chunked,
        })
    }
}

/// Resolves and connects, trying each address in turn.
fn connect(host: &str, port: u16, timeout: Option<Duration>) -> Result<TcpStream, NodeWatchError> {
    let host = host.trim_matches(['[', ']']);
    let mut last = None;
    for addr in (host, port).to_socket_addrs()? {
        let r = match timeout {
            Some(t) => TcpStream::connect_timeout(&addr, t),
            None => TcpStream::connect(addr),
        };
        match r {
            Ok(s) => return Ok(s),
            Err(e) => last = Some(e),
        }
    }
    Err(last
        .unwrap_or_else(|| {
            io::Error::new(io::ErrorKind::NotFound, format!("{host} has no address"))
        })
        .into())
}

/// The request line and headers, as HTTP/1.1.
fn request_head(uri: &Uri, headers: &HeaderMap, host: &str, port: u16) -> Vec<u8> {
    let path = uri.path_and_query().map_or("/", |p| p.as_str());
    let mut h = format!("GET {path} HTTP/1.1\r\n");
    if !headers.contains_key(http::header::HOST) {
        match uri.port_u16() {
            Some(_) => h.push_str(&format!("Host: {host}:{port}\r\n")),
            None => h.push_str(&format!("Host: {host}\r\n")),
        }
    }
    let mut v = h.into_bytes();
    for (name, value) in headers {
        v.extend_from_slice(name.as_str().as_bytes());
        v.extend_from_slice(b": ");
        v.extend_from_slice(value.as_bytes());
        v.extend_from_slice(b"\r\n");
    }
    if !headers.contains_key(http::header::USER_AGENT) {
        v.extend_from_slice(b"User-Agent: twilld\r\n");
    }
    v.extend_from_slice(b"\r\n");
    v
}

/// Reads up to the end of the response head; returns it and what came after it.
fn read_head(s: &mut impl Read) -> Result<(Vec<u8>, Vec<u8>), NodeWatchError> {
    let mut buf = Vec::with_capacity(4096);
    let mut chunk = [0u8; 4096];
    loop {
        let n = s.read(&mut chunk)?;
        if n == 0 {
            return Err(NodeWatchError::Http(
                "the connection closed before the response head".into(),
            ));
        }
        let from = buf.len().saturating_sub(3);
        buf.extend_from_slice(&chunk[..n]);
        if let Some(i) = memchr::memmem::find(&buf[from..], b"\r\n\r\n") {
            let end = from + i + 4;
            let rest = buf.split_off(end);
            return Ok((buf, rest));
        }
        if buf.len() > MAX_HEAD {
            return Err(NodeWatchError::Http("a response head over 64 KiB".into()));
        }
    }
}

/// What the response head says.
#[derive(Debug, PartialEq)]
struct Head {
    code: u16,
    chunked: bool,
    /// Content-Length, if given.
    length: Option<usize>,
}

fn parse_head(head: &[u8]) -> Result<Head, NodeWatchError> {
    let text = std::str::from_utf8(head)
        .map_err(|_| NodeWatchError::Http("a response head that is not text".into()))?;
    let mut lines = text.split("\r\n");
    let status = lines.next().unwrap_or_default();
    let code = status
        .strip_prefix("HTTP/1.1 ")
        .or_else(|| status.strip_prefix("HTTP/1.0 "))
        .and_then(|r| r.get(..3))
        .and_then(|c| c.parse::<u16>().ok())
        .ok_or_else(|| NodeWatchError::Http(format!("a bad status line {status:?}")))?;
    let mut h = Head {
        code,
        chunked: false,
        length: None,
    };
    for (k, v) in lines.filter_map(|l| l.split_once(':')) {
        let (k, v) = (k.trim(), v.trim());
        if k.eq_ignore_ascii_case("transfer-encoding") {
            h.chunked |= v.to_ascii_lowercase().contains("chunked");
        } else if k.eq_ignore_ascii_case("content-length") {
            h.length = v.parse().ok();
        }
    }
    Ok(h)
}

/// A refusal's error, with the Status message from its body when it has one. The connection
/// may stay open after the body (keep-alive), so the body is read by its framing: to the last
/// chunk, to its Content-Length, or (neither) to the connection's end.
fn refusal(
    code: u16,
    chunked: bool,
    length: Option<usize>,
    mut body: Vec<u8>,
    s: &mut impl Read,
) -> NodeWatchError {
    let whole = |b: &[u8]| match (chunked, length) {
        (true, _) => b.ends_with(b"\n0\r\n\r\n") || b.starts_with(b"0\r\n"),
        (false, Some(n)) => b.len() >= n,
        (false, None) => false,
    };
    let mut chunk = [0u8; 4096];
    while body.len() < MAX_ERROR_BODY && !whole(&body) {
        match s.read(&mut chunk) {
            Ok(0) | Err(_) => break,
            Ok(n) => body.extend_from_slice(&chunk[..n]),
        }
    }
    if code == 410 {
        return NodeWatchError::Gone;
    }
    let message = serde_json::from_slice::<serde_json::Value>(trim_chunking(&body))
        .ok()
        .and_then(|v| v["message"].as_str().map(str::to_string))
        .unwrap_or_else(|| {
            let text = String::from_utf8_lossy(trim_chunking(&body))
                .trim()
                .to_string();
            match text.char_indices().nth(200) {
                Some((i, _)) => format!("{}...", &text[..i]),
                None => text,
            }
        });
    NodeWatchError::Status { code, message }
}

/// A small chunked body's JSON: from the first `{` to the last `}`.
fn trim_chunking(b: &[u8]) -> &[u8] {
    match (
        b.iter().position(|c| *c == b'{'),
        b.iter().rposition(|c| *c == b'}'),
    ) {
        (Some(i), Some(j)) if i < j => &b[i..=j],
        _ => b,
    }
}

enum Stream {
    Plain(TcpStream),
    Tls(Box<StreamOwned<ClientConnection, TcpStream>>),
}

impl Read for Stream {
    fn read(&mut self, b: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Plain(s) => s.read(b),
            Stream::Tls(s) => s.read(b),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, b: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Plain(s) => s.write(b),
            Stream::Tls(s) => s.write(b),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        match self {
            Stream::Plain(s) => s.flush(),
            Stream::Tls(s) => s.flush(),
        }
    }
}

/// An open watch: its stream after the head, and what was read past the head.
pub struct Conn {
    stream: Stream,
    pub first: Vec<u8>,
    pub chunked: bool,
}

impl Conn {
    pub fn read(&mut self, b: &mut [u8]) -> io::Result<usize> {
        self.stream.read(b)
    }

    /// Whether a read would return at once: plaintext rustls holds, or bytes (or the end) on
    /// the socket. rustls reads the socket a record or so at a time, so a burst is several
    /// reads.
    pub fn more_ready(&mut self) -> bool {
        let sock = match &mut self.stream {
            Stream::Plain(s) => &*s,
            Stream::Tls(s) => {
                let buffered = s
                    .conn
                    .process_new_packets()
                    .map_or(true, |st| st.plaintext_bytes_to_read() > 0);
                if buffered {
                    return true;
                }
                &s.sock
            }
        };
        let mut b = [0u8; 1];
        let r = nix::sys::socket::recv(
            sock.as_raw_fd(),
            &mut b,
            MsgFlags::MSG_PEEK | MsgFlags::MSG_DONTWAIT,
        );
        !matches!(r, Err(nix::errno::Errno::EAGAIN))
    }
}

/// Lets the async side end a blocked read: shuts the current connection's socket down.
#[derive(Clone, Default)]
pub struct ShutHandle {
    inner: Arc<Mutex<ShutState>>,
}

#[derive(Default)]
struct ShutState {
    socket: Option<TcpStream>,
    shut: bool,
}

impl ShutHandle {
    fn set(&self, s: &TcpStream) -> Result<(), NodeWatchError> {
        let mut st = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        if st.shut {
            let _ = s.shutdown(Shutdown::Both);
            return Err(NodeWatchError::Stopped);
        }
        st.socket = Some(s.try_clone()?);
        Ok(())
    }

    pub fn is_shut(&self) -> bool {
        self.inner.lock().unwrap_or_else(|p| p.into_inner()).shut
    }

    pub fn shut(&self) {
        let mut st = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        st.shut = true;
        if let Some(s) = st.socket.take() {
            let _ = s.shutdown(Shutdown::Both);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_head_gives_the_code_and_the_framing() {
        let h = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n";
        let want = Head {
            code: 200,
            chunked: true,
            length: None,
        };
        assert_eq!(parse_head(h).unwrap(), want);
        let h = b"HTTP/1.1 403 Forbidden\r\ncontent-length: 10\r\n\r\n";
        let want = Head {
            code: 403,
            chunked: false,
            length: Some(10),
        };
        assert_eq!(parse_head(h).unwrap(), want);
        assert!(parse_head(b"SSH-2.0-OpenSSH\r\n\r\n").is_err());
        assert!(parse_head(b"HTTP/1.1 2\r\n\r\n").is_err());
    }

    #[test]
    fn the_head_is_read_up_to_its_end_and_the_rest_kept() {
        let wire = b"HTTP/1.1 200 OK\r\nA: b\r\n\r\n5\r\nhello".to_vec();
        // One byte at a time, so the end of the head straddles reads.
        struct Slow(Vec<u8>, usize);
        impl Read for Slow {
            fn read(&mut self, b: &mut [u8]) -> io::Result<usize> {
                if self.1 == self.0.len() {
                    return Ok(0);
                }
                b[0] = self.0[self.1];
                self.1 += 1;
                Ok(1)
            }
        }
        let (head, rest) = read_head(&mut Slow(wire.clone(), 0)).unwrap();
        assert_eq!(head, b"HTTP/1.1 200 OK\r\nA: b\r\n\r\n");
        assert!(rest.is_empty());
        let (head, rest) = read_head(&mut &wire[..]).unwrap();
        assert_eq!(head.len(), 25);
        assert_eq!(rest, b"5\r\nhello");
        assert!(read_head(&mut &b"HTTP/1.1 200 OK\r\n"[..]).is_err());
    }

    #[test]
    fn a_refusal_carries_the_status_message() {
        // A body that came whole with the head is not read further: the server keeps the
        // connection open after it, and a read would wait for the read timeout.
        struct NoMore;
        impl Read for NoMore {
            fn read(&mut self, _: &mut [u8]) -> io::Result<usize> {
                panic!("read past a whole body");
            }
        }
        let body = br#"{"kind":"Status","status":"Failure","message":"nodes is forbidden: no","code":403}"#;
        match refusal(403, false, Some(body.len()), body.to_vec(), &mut NoMore) {
            NodeWatchError::Status { code, message } => {
                assert_eq!(code, 403);
                assert_eq!(message, "nodes is forbidden: no");
            }
            e => panic!("{e}"),
        }
        let chunked = b"4f\r\n{\"message\":\"too old\",\"code\":410}\r\n0\r\n\r\n".to_vec();
        assert!(matches!(
            refusal(410, true, None, chunked, &mut NoMore),
            NodeWatchError::Gone
        ));
        // An empty body, and one that is not JSON (a proxy's page): no read past them.
        match refusal(503, false, Some(0), Vec::new(), &mut NoMore) {
            NodeWatchError::Status { code, message } => {
                assert_eq!(code, 503);
                assert_eq!(message, "");
            }
            e => panic!("{e}"),
        }
        match refusal(502, false, Some(9), b"<html>..."[..].to_vec(), &mut NoMore) {
            NodeWatchError::Status { message, .. } => assert_eq!(message, "<html>..."),
            e => panic!("{e}"),
        }
        // A body in two reads.
        let first = br#"{"messag"#;
        let mut rest = &br#"e":"split","code":500}"#[..];
        let len = first.len() + rest.len();
        match refusal(500, false, Some(len), first.to_vec(), &mut rest) {
            NodeWatchError::Status { message, .. } => assert_eq!(message, "split"),
            e => panic!("{e}"),
        }
        // Neither chunked nor a length: to the connection's end.
        match refusal(500, false, None, b"oo".to_vec(), &mut &b"ps"[..]) {
            NodeWatchError::Status { message, .. } => assert_eq!(message, "oops"),
            e => panic!("{e}"),
        }
    }

    #[test]
    fn the_request_head_names_path_host_and_headers() {
        let uri: Uri = "https://api.example:6443/api/v1/nodes?watch=true"
            .parse()
            .unwrap();
        let mut h = HeaderMap::new();
        h.insert("authorization", "Bearer t".parse().unwrap());
        let head = String::from_utf8(request_head(&uri, &h, "api.example", 6443)).unwrap();
        assert!(
            head.starts_with("GET /api/v1/nodes?watch=true HTTP/1.1\r\n"),
            "{head}"
        );
        assert!(head.contains("Host: api.example:6443\r\n"), "{head}");
        assert!(head.contains("authorization: Bearer t\r\n"), "{head}");
        assert!(head.ends_with("\r\n\r\n"));
    }

    #[tokio::test]
    async fn requests_go_through_kubes_layers() {
        let mut c = Config::new("https://api.example:6443/prefix".parse().unwrap());
        c.auth_info.token = Some("sekret".to_string().into());
        let t = Target::new(&c, Duration::from_secs(1)).unwrap().unwrap();
        let req = t.request("/api/v1/nodes?watch=true").await.unwrap();
        assert_eq!(
            req.uri().to_string(),
            "https://api.example:6443/prefix/api/v1/nodes?watch=true"
        );
        assert_eq!(req.headers()["authorization"], "Bearer sekret");
        // A proxy: not this client's.
        c.proxy_url = Some("http://proxy:3128".parse().unwrap());
        assert!(Target::new(&c, Duration::from_secs(1)).unwrap().is_none());
    }
}
