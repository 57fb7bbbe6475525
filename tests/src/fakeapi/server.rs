//! The HTTP side: one hyper HTTP/1.1 connection task per client, routing Kubernetes paths to the
//! store, authentication by bearer token, RBAC, and the injected faults.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{combinators::UnsyncBoxBody, BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::{header, Method, Request, Response};
use serde::Serialize;
use serde_json::{json, Value};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;

use super::patch::{merge_patch, strategic_merge_patch};
use super::rbac::{Attributes, Identity};
use super::resource::{Key, Kind, ALL};
use super::selector::{FieldSelector, LabelSelector};
use super::store::{with_type, Filter, Store, StoreError, WatchItem};

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
type Body = UnsyncBoxBody<Bytes, BoxError>;

/// One request as the fake saw it, for tests to assert on what clients did.
#[derive(Clone, Debug, Serialize)]
pub struct RequestRecord {
    /// The authenticated user ("" when the request carried no valid token).
    pub user: String,
    pub method: String,
    pub path: String,
    pub query: String,
    /// RBAC verb (get, list, watch, create, update, patch, delete); "" for other paths.
    pub verb: String,
    /// `nodes`, or `nodes/status` for a subresource; "" for other paths.
    pub resource: String,
    pub namespace: Option<String>,
    pub name: Option<String>,
    /// The status code answered (200 for a watch that started, also when it then sends an
    /// ERROR event); 0 when the request was never answered (stall).
    pub code: u16,
    pub content_type: Option<String>,
    /// The body of writes (patch, create, update), as JSON.
    pub body: Option<Value>,
}

/// A failure answered instead of serving requests.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Failure {
    /// 500 InternalError.
    Internal,
    /// 429 TooManyRequests with `Retry-After: <secs>`.
    TooManyRequests { retry_after: u64 },
    /// 503 ServiceUnavailable.
    Unavailable,
}

#[derive(Default)]
pub struct Faults {
    pub fail: Option<(u32, Failure)>,
    pub stall_until: Option<Instant>,
    /// Open watches send nothing until then (a lagging watch cache); requests are served.
    pub hold_watches_until: Option<Instant>,
}

pub enum Cmd {
    Down(Option<std::sync::mpsc::Sender<()>>),
    Up(Option<std::sync::mpsc::Sender<Result<(), String>>>),
    Shutdown,
}

pub struct Shared {
    pub store: Mutex<Store>,
    pub faults: Mutex<Faults>,
    pub tokens: Mutex<HashMap<String, Identity>>,
    pub admin_user: String,
    pub records: Mutex<Vec<RequestRecord>>,
    /// Called with each request's record before it is answered (`FakeApi::on_request`).
    pub on_request: Mutex<Option<RequestHook>>,
    /// Bumped to cut every open watch stream.
    pub drop_watches: watch::Sender<u64>,
    pub bookmark_interval: Mutex<Duration>,
    pub default_watch_timeout: Duration,
    pub cmds: mpsc::UnboundedSender<Cmd>,
}

/// A poisoned lock only means a test thread panicked; the data is still what it was.
pub fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

// ---- the accept loop -------------------------------------------------------------------------

async fn accept(l: &Option<TcpListener>) -> std::io::Result<(TcpStream, SocketAddr)> {
    match l {
        Some(l) => l.accept().await,
        None => std::future::pending().await,
    }
}

async fn bind(addr: SocketAddr) -> Result<TcpListener, String> {
    // Right after going down the port can be briefly busy; a real restart waits too.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match TcpListener::bind(addr).await {
            Ok(l) => return Ok(l),
            Err(e) if Instant::now() < deadline => {
                let _ = e;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => return Err(format!("bind {addr}: {e}")),
        }
    }
}

/// Serve until `Cmd::Shutdown` (or the handle is gone). Going down closes the listener and every
/// connection (watches included), like a crashed apiserver; coming back binds the same address.
pub async fn run(
    shared: Arc<Shared>,
    listener: TcpListener,
    addr: SocketAddr,
    tls: Option<tokio_rustls::TlsAcceptor>,
    mut cmds: mpsc::UnboundedReceiver<Cmd>,
) {
    let mut listener = Some(listener);
    let mut conns: JoinSet<()> = JoinSet::new();
    loop {
        tokio::select! {
            cmd = cmds.recv() => match cmd {
                None | Some(Cmd::Shutdown) => break,
                Some(Cmd::Down(ack)) => {
                    listener = None;
                    conns.abort_all();
                    while conns.join_next().await.is_some() {}
                    if let Some(a) = ack { let _ = a.send(()); }
                }
                Some(Cmd::Up(ack)) => {
                    let r = if listener.is_some() { Ok(()) } else {
                        bind(addr).await.map(|l| listener = Some(l))
                    };
                    if let Some(a) = ack { let _ = a.send(r); }
                }
            },
            acc = accept(&listener) => {
                if let Ok((stream, _)) = acc {
                    let shared = shared.clone();
                    let tls = tls.clone();
                    conns.spawn(async move {
                        match tls {
                            None => serve(shared, stream).await,
                            // A failed handshake (a client that does not trust the CA) ends
                            // the connection, as with a real server.
                            Some(t) => if let Ok(s) = t.accept(stream).await {
                                serve(shared, s).await;
                            },
                        }
                    });
                }
            }
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
        }
    }
    conns.abort_all();
}

/// One HTTP/1.1 connection, plain or TLS.
async fn serve<S>(shared: Arc<Shared>, stream: S)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let svc = hyper::service::service_fn(move |req| handle(shared.clone(), req));
    let _ = hyper::server::conn::http1::Builder::new()
        .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
        .await;
}

// ---- answers --------------------------------------------------------------------------------

fn full(code: u16, v: &Value) -> Response<Body> {
    Response::builder()
        .status(code)
        .header(header::CONTENT_TYPE, "application/json")
        .body(
            Full::new(Bytes::from(v.to_string()))
                .map_err(|e: Infallible| match e {})
                .boxed_unsync(),
        )
        .expect("static response parts are valid")
}

pub fn status_json(code: u16, reason: &str, message: &str, details: Option<Value>) -> Value {
    let mut s = json!({
        "kind": "Status", "apiVersion": "v1", "metadata": {},
        "status": "Failure", "message": message, "reason": reason, "code": code,
    });
    if let Some(d) = details {
        s["details"] = d;
    }
    s
}

/// An error answer: a Status object with the HTTP code.
struct ApiError {
    code: u16,
    reason: &'static str,
    message: String,
    details: Option<Value>,
    retry_after: Option<u64>,
}

impl ApiError {
    fn new(code: u16, reason: &'static str, message: impl Into<String>) -> ApiError {
        ApiError {
            code,
            reason,
            message: message.into(),
            details: None,
            retry_after: None,
        }
    }

    fn bad_request(message: impl Into<String>) -> ApiError {
        ApiError::new(400, "BadRequest", message)
    }

    fn status(&self) -> Value {
        status_json(self.code, self.reason, &self.message, self.details.clone())
    }

    fn response(&self) -> Response<Body> {
        let mut r = full(self.code, &self.status());
        if let Some(s) = self.retry_after {
            r.headers_mut()
                .insert(header::RETRY_AFTER, s.to_string().parse().expect("digits"));
        }
        r
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> ApiError {
        let msg = e.to_string();
        let (code, reason, details) = match &e {
            StoreError::NotFound { kind, name } => {
                (404, "NotFound", Some(json!({"name": name, "kind": kind})))
            }
            StoreError::AlreadyExists { kind, name } => (
                409,
                "AlreadyExists",
                Some(json!({"name": name, "kind": kind})),
            ),
            StoreError::Conflict { kind, name } => {
                (409, "Conflict", Some(json!({"name": name, "kind": kind})))
            }
            StoreError::Gone(_) => (410, "Expired", None),
            StoreError::Invalid(_) => (422, "Invalid", None),
            StoreError::TooLarge(_) => (504, "Timeout", Some(json!({"retryAfterSeconds": 1}))),
        };
        ApiError {
            code,
            reason,
            message: msg,
            details,
            retry_after: None,
        }
    }
}

// ---- requests -------------------------------------------------------------------------------

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'+' => out.push(b' '),
            b'%' if i + 3 <= b.len() => {
                let hex = std::str::from_utf8(&b[i + 1..i + 3]).ok();
                match hex.and_then(|h| u8::from_str_radix(h, 16).ok()) {
                    Some(v) => {
                        out.push(v);
                        i += 2;
                    }
                    None => out.push(b'%'),
                }
            }
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

pub fn parse_query(q: &str) -> HashMap<String, String> {
    q.split('&')
        .filter(|p| !p.is_empty())
        .map(|p| match p.split_once('=') {
            Some((k, v)) => (percent_decode(k), percent_decode(v)),
            None => (percent_decode(p), String::new()),
        })
        .collect()
}

/// A resource path as RBAC sees it, before the fake knows whether it serves that resource:
/// /api/v1/... or /apis/<group>/<version>/...
#[derive(Debug, PartialEq)]
struct ReqPath {
    group: String,
    namespace: Option<String>,
    resource: String,
    name: Option<String>,
    sub: Option<String>,
}

fn parse_request_path(path: &str) -> Option<ReqPath> {
    let segs: Vec<&str> = path.trim_matches('/').split('/').collect();
    let (group, rest) = match segs.as_slice() {
        ["api", "v1", rest @ ..] if !rest.is_empty() => ("", rest),
        ["apis", g, _version, rest @ ..] if !rest.is_empty() => (*g, rest),
        _ => return None,
    };
    let (namespace, rest): (Option<&str>, Vec<&str>) = match rest {
        // /namespaces/<ns>/<resource>/... but /namespaces/<name>[/status] is a Namespace.
        ["namespaces", ns, resource, more @ ..] if *resource != "status" => {
            (Some(*ns), [&[*resource][..], more].concat())
        }
        r => (None, r.to_vec()),
    };
    let (resource, name, sub) = match rest.as_slice() {
        [r] => (*r, None, None),
        [r, n] => (*r, Some(*n), None),
        [r, n, s] => (*r, Some(*n), Some(*s)),
        _ => return None,
    };
    Some(ReqPath {
        group: group.into(),
        namespace: namespace.map(str::to_string),
        resource: resource.into(),
        name: name.map(str::to_string),
        sub: sub.map(str::to_string),
    })
}

/// A resource the fake serves.
#[derive(Debug, PartialEq)]
struct ResPath {
    kind: Kind,
    namespace: Option<String>,
    name: Option<String>,
    sub: Option<String>,
}

fn not_found() -> ApiError {
    ApiError::new(
        404,
        "NotFound",
        "the server could not find the requested resource",
    )
}

fn resolve(rp: &ReqPath) -> Result<ResPath, ApiError> {
    let kind = Kind::from_path(&rp.group, &rp.resource).ok_or_else(not_found)?;
    // Namespaced kinds by name need their namespace; cluster-scoped ones have none.
    let scoped_ok = if kind.namespaced() {
        rp.namespace.is_some() || rp.name.is_none()
    } else {
        rp.namespace.is_none()
    };
    if !scoped_ok {
        return Err(not_found());
    }
    if let Some(s) = &rp.sub {
        if s != "status" || !kind.has_status() {
            return Err(not_found());
        }
    }
    Ok(ResPath {
        kind,
        namespace: rp.namespace.clone(),
        name: rp.name.clone(),
        sub: rp.sub.clone(),
    })
}

fn verb_of(method: &Method, rp: &ReqPath, q: &HashMap<String, String>) -> &'static str {
    let watch = q.get("watch").is_some_and(|v| v == "true" || v == "1");
    match (method, rp.name.is_some()) {
        (&Method::GET, true) => "get",
        (&Method::GET, false) if watch => "watch",
        (&Method::GET, false) => "list",
        (&Method::POST, _) => "create",
        (&Method::PUT, _) => "update",
        (&Method::PATCH, _) => "patch",
        (&Method::DELETE, true) => "delete",
        (&Method::DELETE, false) => "deletecollection",
        _ => "unknown",
    }
}

/// While watches are held: checked in short steps, so a release takes effect at once.
async fn wait_hold(shared: &Shared) {
    while lock(&shared.faults)
        .hold_watches_until
        .is_some_and(|t| t > Instant::now())
    {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn wait_stall(shared: &Shared) -> bool {
    let until = lock(&shared.faults).stall_until;
    match until {
        Some(t) if t > Instant::now() => {
            tokio::time::sleep_until(t.into()).await;
            true
        }
        _ => false,
    }
}

async fn handle(shared: Arc<Shared>, req: Request<Incoming>) -> Result<Response<Body>, BoxError> {
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let query = req.uri().query().unwrap_or_default().to_string();
    let content_type = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(|s| s.split(';').next().unwrap_or_default().trim().to_string());
    let token = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::to_string);
    let body = req.into_body().collect().await?.to_bytes();

    // A stalled server takes the request and never answers it: the connection is dropped once
    // the stall is over (clients must have given up by then). Recorded first: a client that
    // gives up makes hyper drop this future.
    let stalled = lock(&shared.faults)
        .stall_until
        .is_some_and(|t| t > Instant::now());
    if stalled {
        record(
            &shared,
            RequestRecord {
                user: String::new(),
                method: method.to_string(),
                path,
                query,
                verb: String::new(),
                resource: String::new(),
                namespace: None,
                name: None,
                code: 0,
                content_type,
                body: None,
            },
        );
        wait_stall(&shared).await;
        return Err("stalled: dropped without an answer".into());
    }

    let identity = token.and_then(|t| lock(&shared.tokens).get(&t).cloned());
    let mut rec = RequestRecord {
        user: identity
            .as_ref()
            .map(|i| i.user.clone())
            .unwrap_or_default(),
        method: method.to_string(),
        path: path.clone(),
        query: query.clone(),
        verb: String::new(),
        resource: String::new(),
        namespace: None,
        name: None,
        code: 0,
        content_type: content_type.clone(),
        body: None,
    };
    let q = parse_query(&query);
    let resp = route(
        &shared,
        &method,
        &path,
        &q,
        identity,
        content_type,
        &body,
        &mut rec,
    )
    .await;
    let resp = resp.unwrap_or_else(|e| e.response());
    rec.code = resp.status().as_u16();
    if !path.starts_with("/fake/") {
        record(&shared, rec);
    }
    Ok(resp)
}

pub type RequestHook = Arc<dyn Fn(&RequestRecord) + Send + Sync>;

fn record(shared: &Shared, r: RequestRecord) {
    let hook = lock(&shared.on_request).clone();
    if let Some(hook) = hook {
        hook(&r);
    }
    lock(&shared.records).push(r);
}

#[allow(clippy::too_many_arguments)]
async fn route(
    shared: &Arc<Shared>,
    method: &Method,
    path: &str,
    q: &HashMap<String, String>,
    identity: Option<Identity>,
    content_type: Option<String>,
    body: &Bytes,
    rec: &mut RequestRecord,
) -> Result<Response<Body>, ApiError> {
    // What the real server shows anyone (system:public-info-viewer).
    match (method, path) {
        (&Method::GET, "/version") => return Ok(full(200, &version())),
        (&Method::GET, "/healthz" | "/livez" | "/readyz") => {
            return Ok(Response::new(
                Full::new(Bytes::from_static(b"ok"))
                    .map_err(|e: Infallible| match e {})
                    .boxed_unsync(),
            ))
        }
        _ => {}
    }
    let Some(identity) = identity else {
        return Err(ApiError::new(401, "Unauthorized", "Unauthorized"));
    };
    if let Some(cmd) = path.strip_prefix("/fake/v1/") {
        if identity.user != shared.admin_user {
            return Err(ApiError::new(
                403,
                "Forbidden",
                "the fake's controls are for its admin",
            ));
        }
        return admin(shared, cmd, q);
    }
    // Overload and failures come after authentication, before authorization (as the real
    // server's priority-and-fairness filter).
    let failure = {
        let mut f = lock(&shared.faults);
        match f.fail {
            Some((n, failure)) if n > 0 => {
                f.fail = (n > 1).then_some((n - 1, failure));
                Some(failure)
            }
            _ => None,
        }
    };
    if let Some(failure) = failure {
        return Err(match failure {
            Failure::Internal => ApiError::new(
                500,
                "InternalError",
                "Internal error occurred: injected by the fake",
            ),
            Failure::Unavailable => ApiError::new(
                503,
                "ServiceUnavailable",
                "the server is currently unable to handle the request",
            ),
            Failure::TooManyRequests { retry_after } => {
                let mut e = ApiError::new(
                    429,
                    "TooManyRequests",
                    "The apiserver is overloaded, please try again later",
                );
                e.details = Some(json!({"retryAfterSeconds": retry_after}));
                e.retry_after = Some(retry_after);
                e
            }
        });
    }
    if method == Method::GET {
        if let Some(doc) = discovery(path) {
            return Ok(full(200, &doc));
        }
    }
    let Some(reqp) = parse_request_path(path) else {
        return Err(not_found());
    };
    // Authorization comes before routing, as in the real server: a client without the right
    // gets 403 also for a resource the fake does not serve.
    let verb = verb_of(method, &reqp, q);
    rec.verb = verb.into();
    rec.resource = match &reqp.sub {
        Some(s) => format!("{}/{s}", reqp.resource),
        None => reqp.resource.clone(),
    };
    rec.namespace = reqp.namespace.clone();
    rec.name = reqp.name.clone();
    let attrs = Attributes {
        verb: verb.into(),
        group: reqp.group.clone(),
        resource: reqp.resource.clone(),
        subresource: reqp.sub.clone(),
        name: reqp.name.clone(),
        namespace: reqp.namespace.clone(),
    };
    if !identity.allows(&attrs) {
        let mut e = ApiError::new(403, "Forbidden", identity.forbidden_message(&attrs));
        e.details = Some(match &reqp.name {
            Some(n) => json!({"name": n, "group": reqp.group, "kind": reqp.resource}),
            None => json!({"group": reqp.group, "kind": reqp.resource}),
        });
        return Err(e);
    }
    let rp = resolve(&reqp)?;
    let parsed_body = || -> Result<Value, ApiError> {
        serde_json::from_slice(body).map_err(|e| {
            ApiError::bad_request(format!(
                "the body of the request was in an unknown format: {e}"
            ))
        })
    };
    match verb {
        "get" => get(shared, &rp),
        "list" => list(shared, &rp, q),
        "watch" => watch_stream(shared, &rp, q),
        "patch" => {
            let patch = parsed_body()?;
            rec.body = Some(patch.clone());
            patch_object(shared, &rp, content_type.as_deref(), &patch, q)
        }
        "create" => {
            let obj = parsed_body()?;
            rec.body = Some(obj.clone());
            create(shared, &rp, obj)
        }
        "update" => {
            let obj = parsed_body()?;
            rec.body = Some(obj.clone());
            update(shared, &rp, obj, q)
        }
        "delete" => {
            let key = key_of(&rp);
            let gone = lock(&shared.store).delete(&key)?;
            Ok(full(200, &with_type(rp.kind, &gone)))
        }
        _ => Err(ApiError::new(
            405,
            "MethodNotAllowed",
            format!("{verb} is not supported by twill's fake API server"),
        )),
    }
}

fn key_of(rp: &ResPath) -> Key {
    Key::new(
        rp.kind,
        rp.namespace.as_deref().unwrap_or_default(),
        rp.name.as_deref().unwrap_or_default(),
    )
}

fn get(shared: &Shared, rp: &ResPath) -> Result<Response<Body>, ApiError> {
    let key = key_of(rp);
    let store = lock(&shared.store);
    let obj = store.get(&key).ok_or(StoreError::NotFound {
        kind: rp.kind.plural(),
        name: key.name.clone(),
    })?;
    Ok(full(200, &with_type(rp.kind, obj)))
}

fn filter_of(rp: &ResPath, q: &HashMap<String, String>) -> Result<Filter, ApiError> {
    Ok(Filter {
        namespace: rp.namespace.clone(),
        labels: LabelSelector::parse(q.get("labelSelector").map(String::as_str).unwrap_or(""))
            .map_err(ApiError::bad_request)?,
        fields: FieldSelector::parse(
            rp.kind,
            q.get("fieldSelector").map(String::as_str).unwrap_or(""),
        )
        .map_err(ApiError::bad_request)?,
    })
}

/// `resourceVersion`: absent, "" and "0" mean "any/most recent"; else a number.
fn rv_param(q: &HashMap<String, String>) -> Result<Option<u64>, ApiError> {
    match q.get("resourceVersion").map(String::as_str) {
        None | Some("") | Some("0") => Ok(None),
        Some(s) => s
            .parse()
            .map(Some)
            .map_err(|_| ApiError::bad_request(format!("invalid resource version: {s:?}"))),
    }
}

fn list(
    shared: &Shared,
    rp: &ResPath,
    q: &HashMap<String, String>,
) -> Result<Response<Body>, ApiError> {
    let filter = filter_of(rp, q)?;
    let rv = rv_param(q)?;
    let exact = match q.get("resourceVersionMatch").map(String::as_str) {
        None | Some("") | Some("NotOlderThan") => false,
        Some("Exact") if rv.is_some() => true,
        Some(m) => {
            return Err(ApiError::bad_request(format!(
                "resourceVersionMatch {m:?} is not supported here"
            )))
        }
    };
    let limit = match q.get("limit") {
        Some(l) => Some(
            l.parse::<usize>()
                .map_err(|_| ApiError::bad_request(format!("invalid limit {l:?}")))?,
        ),
        None => None,
    };
    let cont = q
        .get("continue")
        .map(String::as_str)
        .filter(|c| !c.is_empty());
    let page = lock(&shared.store).list(rp.kind, &filter, rv, exact, limit, cont)?;
    let mut meta = json!({"resourceVersion": page.rv.to_string()});
    if let Some(c) = page.continue_token {
        meta["continue"] = c.into();
    }
    if let Some(r) = page.remaining {
        meta["remainingItemCount"] = r.into();
    }
    Ok(full(
        200,
        &json!({
            "kind": format!("{}List", rp.kind.kind()),
            "apiVersion": rp.kind.api_version(),
            "metadata": meta,
            "items": page.items,
        }),
    ))
}

/// `{"type":…,"object":…}` in this order, as kube-apiserver writes it (Go's field order).
/// `json!` would sort "object" first, and a client decoding adjacently tagged events (kube-rs)
/// then has to buffer the whole object before it knows the variant: a cost no real server
/// causes.
fn event_line(typ: &str, object: &Value) -> Bytes {
    let mut s = format!("{{\"type\":{},\"object\":", Value::from(typ));
    s.push_str(&object.to_string());
    s.push_str("}\n");
    Bytes::from(s)
}

fn watch_stream(
    shared: &Arc<Shared>,
    rp: &ResPath,
    q: &HashMap<String, String>,
) -> Result<Response<Body>, ApiError> {
    if q.get("sendInitialEvents").is_some_and(|v| v == "true") {
        return Err(ApiError::bad_request(
            "sendInitialEvents (streaming lists) is not supported by twill's fake API server",
        ));
    }
    let filter = filter_of(rp, q)?;
    let rv = rv_param(q)?;
    let timeout = match q.get("timeoutSeconds") {
        Some(t) => Duration::from_secs(
            t.parse()
                .map_err(|_| ApiError::bad_request(format!("invalid timeoutSeconds {t:?}")))?,
        ),
        None => shared.default_watch_timeout,
    };
    let bookmarks = q
        .get("allowWatchBookmarks")
        .is_some_and(|v| v == "true" || v == "1");
    let (tx, rx) = mpsc::channel::<Result<Frame<Bytes>, BoxError>>(64);
    let started = lock(&shared.store).watch(rp.kind, filter, rv);
    match started {
        // The real server answers 200 and sends the error as the stream's only event.
        Err(e) => {
            let status = ApiError::from(e).status();
            let _ = tx.try_send(Ok(Frame::data(event_line("ERROR", &status))));
            drop(tx);
        }
        Ok((replay, events)) => {
            let drop_rx = shared.drop_watches.subscribe();
            tokio::spawn(watch_task(
                shared.clone(),
                rp.kind,
                replay,
                events,
                tx,
                timeout,
                bookmarks,
                drop_rx,
            ));
        }
    }
    let mut rx = rx;
    let body = StreamBody::new(futures::stream::poll_fn(move |cx| rx.poll_recv(cx)));
    Ok(Response::builder()
        .status(200)
        .header(header::CONTENT_TYPE, "application/json")
        .body(BodyExt::boxed_unsync(body))
        .expect("static response parts are valid"))
}

#[allow(clippy::too_many_arguments)]
async fn watch_task(
    shared: Arc<Shared>,
    kind: Kind,
    replay: Vec<WatchItem>,
    mut events: mpsc::UnboundedReceiver<WatchItem>,
    out: mpsc::Sender<Result<Frame<Bytes>, BoxError>>,
    timeout: Duration,
    bookmarks: bool,
    mut drop_rx: watch::Receiver<u64>,
) {
    let send = |item: WatchItem| {
        let out = out.clone();
        let shared = shared.clone();
        async move {
            // While stalled or held, nothing reaches the client (no events, no bookmarks).
            wait_stall(&shared).await;
            wait_hold(&shared).await;
            out.send(Ok(Frame::data(event_line(item.typ.as_str(), &item.object))))
                .await
                .is_ok()
        }
    };
    for item in replay {
        if !send(item).await {
            return;
        }
    }
    let deadline = tokio::time::Instant::now() + timeout;
    let interval = *lock(&shared.bookmark_interval);
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + interval, interval);
    drop_rx.mark_unchanged();
    loop {
        tokio::select! {
            _ = tokio::time::sleep_until(deadline) => return,
            _ = drop_rx.changed() => {
                // An error frame makes hyper abort the connection: the client sees it cut.
                let _ = out.send(Err("watch dropped by the fake".into())).await;
                return;
            }
            _ = out.closed() => return,
            ev = events.recv() => match ev {
                Some(item) => if !send(item).await { return },
                None => return,
            },
            _ = tick.tick(), if bookmarks => {
                // Every change up to `rv` is already queued for this watch (changes are queued
                // under the store lock): send those first, so the bookmark never runs ahead.
                let rv = lock(&shared.store).resource_version();
                while let Ok(item) = events.try_recv() {
                    if !send(item).await { return }
                }
                wait_stall(&shared).await;
                wait_hold(&shared).await;
                let bm = json!({"kind": kind.kind(), "apiVersion": kind.api_version(),
                                "metadata": {"resourceVersion": rv.to_string()}});
                if out.send(Ok(Frame::data(event_line("BOOKMARK", &bm)))).await.is_err() {
                    return;
                }
            }
        }
    }
}

/// Which part a write may change: the status subresource changes status (and metadata), the
/// main resource everything but status (for kinds with a status subresource).
fn keep_other_part(kind: Kind, sub: Option<&str>, old: &Value, new: &mut Value) {
    if !kind.has_status() {
        return;
    }
    let keep = if sub == Some("status") {
        "spec"
    } else {
        "status"
    };
    match old.get(keep) {
        Some(v) => new[keep] = v.clone(),
        None => {
            if let Some(m) = new.as_object_mut() {
                m.remove(keep);
            }
        }
    }
}

fn precondition(rp: &ResPath, body: &Value, current: &Value) -> Result<(), ApiError> {
    if let Some(want) = body
        .pointer("/metadata/resourceVersion")
        .and_then(Value::as_str)
    {
        let have = current
            .pointer("/metadata/resourceVersion")
            .and_then(Value::as_str);
        if Some(want) != have {
            return Err(StoreError::Conflict {
                kind: rp.kind.plural(),
                name: rp.name.clone().unwrap_or_default(),
            }
            .into());
        }
    }
    Ok(())
}

fn patch_object(
    shared: &Shared,
    rp: &ResPath,
    content_type: Option<&str>,
    patch: &Value,
    q: &HashMap<String, String>,
) -> Result<Response<Body>, ApiError> {
    let key = key_of(rp);
    let mut store = lock(&shared.store);
    let old = store.get(&key).cloned().ok_or(StoreError::NotFound {
        kind: rp.kind.plural(),
        name: key.name.clone(),
    })?;
    precondition(rp, patch, &old)?;
    let mut new = old.clone();
    match content_type {
        Some("application/merge-patch+json") => merge_patch(&mut new, patch),
        Some("application/strategic-merge-patch+json") => strategic_merge_patch(rp.kind, &mut new, patch)
            .map_err(|e| ApiError::new(422, "Invalid", e.to_string()))?,
        other => {
            return Err(ApiError::new(
                415,
                "UnsupportedMediaType",
                format!(
                    "the body of the request was in an unknown format - accepted media types by twill's fake API server: \
                     application/merge-patch+json, application/strategic-merge-patch+json (got {other:?})"
                ),
            ))
        }
    }
    keep_other_part(rp.kind, rp.sub.as_deref(), &old, &mut new);
    if q.get("dryRun").is_some_and(|v| v == "All") {
        rp.kind
            .check_shape(&new)
            .map_err(|e| ApiError::from(StoreError::Invalid(e)))?;
        return Ok(full(200, &with_type(rp.kind, &new)));
    }
    let (stored, _) = store.update(&key, new)?;
    Ok(full(200, &with_type(rp.kind, &stored)))
}

fn check_body_kind(rp: &ResPath, obj: &mut Value) -> Result<(), ApiError> {
    let av = obj.get("apiVersion").and_then(Value::as_str);
    let k = obj.get("kind").and_then(Value::as_str);
    if (av.is_some() || k.is_some())
        && Kind::from_api_version(av.unwrap_or_default(), k.unwrap_or_default()) != Some(rp.kind)
    {
        return Err(ApiError::bad_request(format!(
            "the API version in the data ({}) does not match the expected API version ({})",
            av.unwrap_or_default(),
            rp.kind.api_version()
        )));
    }
    if let Some(ns) = &rp.namespace {
        match obj.pointer("/metadata/namespace").and_then(Value::as_str) {
            Some(n) if n != ns => {
                return Err(ApiError::bad_request(
                    "the namespace of the provided object does not match the namespace sent on the request",
                ))
            }
            _ => obj["metadata"]["namespace"] = ns.clone().into(),
        }
    }
    Ok(())
}

fn create(shared: &Shared, rp: &ResPath, mut obj: Value) -> Result<Response<Body>, ApiError> {
    if rp.name.is_some() || rp.sub.is_some() {
        return Err(ApiError::new(
            405,
            "MethodNotAllowed",
            "create goes to the collection",
        ));
    }
    if !obj.get("metadata").is_some_and(Value::is_object) {
        obj["metadata"] = json!({});
    }
    check_body_kind(rp, &mut obj)?;
    let stored = lock(&shared.store).create(rp.kind, obj)?;
    Ok(full(201, &with_type(rp.kind, &stored)))
}

fn update(
    shared: &Shared,
    rp: &ResPath,
    mut obj: Value,
    q: &HashMap<String, String>,
) -> Result<Response<Body>, ApiError> {
    if !obj.get("metadata").is_some_and(Value::is_object) {
        obj["metadata"] = json!({});
    }
    check_body_kind(rp, &mut obj)?;
    if obj.pointer("/metadata/name").and_then(Value::as_str) != rp.name.as_deref() {
        return Err(ApiError::bad_request(
            "the name of the object does not match the name on the URL",
        ));
    }
    let key = key_of(rp);
    let mut store = lock(&shared.store);
    let old = store.get(&key).cloned().ok_or(StoreError::NotFound {
        kind: rp.kind.plural(),
        name: key.name.clone(),
    })?;
    precondition(rp, &obj, &old)?;
    keep_other_part(rp.kind, rp.sub.as_deref(), &old, &mut obj);
    if q.get("dryRun").is_some_and(|v| v == "All") {
        return Ok(full(200, &with_type(rp.kind, &obj)));
    }
    let (stored, _) = store.update(&key, obj)?;
    Ok(full(200, &with_type(rp.kind, &stored)))
}

// ---- discovery and controls -----------------------------------------------------------------

fn version() -> Value {
    json!({"major": "1", "minor": "33", "gitVersion": "v1.33.0-twill-fakeapi",
           "gitCommit": "", "gitTreeState": "clean", "buildDate": "", "goVersion": "",
           "compiler": "", "platform": "linux/amd64"})
}

fn discovery(path: &str) -> Option<Value> {
    let resources = |group: &str| -> Vec<Value> {
        let mut out = Vec::new();
        for k in ALL.into_iter().filter(|k| k.group() == group) {
            out.push(json!({"name": k.plural(), "singularName": k.singular(), "namespaced": k.namespaced(),
                "kind": k.kind(), "verbs": ["create", "delete", "get", "list", "patch", "update", "watch"]}));
            if k.has_status() {
                out.push(json!({"name": format!("{}/status", k.plural()), "singularName": "",
                    "namespaced": k.namespaced(), "kind": k.kind(), "verbs": ["get", "patch", "update"]}));
            }
        }
        out
    };
    let net = json!({"name": "networking.k8s.io",
        "versions": [{"groupVersion": "networking.k8s.io/v1", "version": "v1"}],
        "preferredVersion": {"groupVersion": "networking.k8s.io/v1", "version": "v1"}});
    Some(match path.trim_end_matches('/') {
        "/api" => json!({"kind": "APIVersions", "versions": ["v1"],
                         "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": ""}]}),
        "/api/v1" => {
            json!({"kind": "APIResourceList", "groupVersion": "v1", "resources": resources("")})
        }
        "/apis" => json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": [net]}),
        "/apis/networking.k8s.io" => {
            let mut g = net;
            g["kind"] = "APIGroup".into();
            g["apiVersion"] = "v1".into();
            g
        }
        "/apis/networking.k8s.io/v1" => json!({"kind": "APIResourceList", "apiVersion": "v1",
            "groupVersion": "networking.k8s.io/v1", "resources": resources("networking.k8s.io")}),
        _ => return None,
    })
}

/// The fake's own controls over HTTP (for the `twill-fakeapi` binary; tests use the handle).
fn admin(
    shared: &Arc<Shared>,
    cmd: &str,
    q: &HashMap<String, String>,
) -> Result<Response<Body>, ApiError> {
    let num = |k: &str, default: u64| -> Result<u64, ApiError> {
        match q.get(k) {
            Some(v) => v
                .parse()
                .map_err(|_| ApiError::bad_request(format!("{k}: not a number: {v:?}"))),
            None => Ok(default),
        }
    };
    match cmd {
        "drop-watches" => {
            shared.drop_watches.send_modify(|g| *g += 1);
        }
        "stall" => {
            lock(&shared.faults).stall_until =
                Some(Instant::now() + Duration::from_secs(num("seconds", 10)?));
        }
        "fail" => {
            let failure = match num("code", 500)? {
                500 => Failure::Internal,
                503 => Failure::Unavailable,
                429 => Failure::TooManyRequests {
                    retry_after: num("retryAfter", 1)?,
                },
                c => return Err(ApiError::bad_request(format!("code {c}: 500, 503 or 429"))),
            };
            lock(&shared.faults).fail = Some((num("count", 1)? as u32, failure));
        }
        "compact" => {
            let mut s = lock(&shared.store);
            let rv = s.resource_version();
            s.compact_to(num("to", rv)?);
        }
        "down" => {
            let secs = num("seconds", 10)?;
            let cmds = shared.cmds.clone();
            tokio::spawn(async move {
                // After this answer is out.
                tokio::time::sleep(Duration::from_millis(100)).await;
                let _ = cmds.send(Cmd::Down(None));
                tokio::time::sleep(Duration::from_secs(secs)).await;
                let _ = cmds.send(Cmd::Up(None));
            });
        }
        "requests" => return Ok(full(200, &json!(*lock(&shared.records)))),
        _ => {
            return Err(ApiError::new(
                404,
                "NotFound",
                format!("no control {cmd:?}"),
            ))
        }
    }
    Ok(full(200, &json!({"ok": cmd})))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn watch_events_name_their_type_before_the_object() {
        let line = event_line("MODIFIED", &json!({"metadata": {"name": "n\"1"}}));
        let text = std::str::from_utf8(&line).unwrap();
        assert!(
            text.starts_with(r#"{"type":"MODIFIED","object":{"#),
            "{text}"
        );
        assert!(text.ends_with("}\n"));
        let v: Value = serde_json::from_str(text).unwrap();
        assert_eq!(v["object"]["metadata"]["name"], "n\"1");
    }

    #[test]
    fn paths() {
        let p = |s: &str| {
            let r = parse_request_path(s)?;
            Some(resolve(&r).map_err(|e| e.code))
        };
        assert_eq!(
            p("/api/v1/nodes/n1/status"),
            Some(Ok(ResPath {
                kind: Kind::Node,
                namespace: None,
                name: Some("n1".into()),
                sub: Some("status".into())
            }))
        );
        assert_eq!(
            p("/api/v1/namespaces/default/pods"),
            Some(Ok(ResPath {
                kind: Kind::Pod,
                namespace: Some("default".into()),
                name: None,
                sub: None
            }))
        );
        assert_eq!(
            p("/api/v1/pods"),
            Some(Ok(ResPath {
                kind: Kind::Pod,
                namespace: None,
                name: None,
                sub: None
            }))
        );
        assert_eq!(
            p("/api/v1/namespaces/kube-system"),
            Some(Ok(ResPath {
                kind: Kind::Namespace,
                namespace: None,
                name: Some("kube-system".into()),
                sub: None
            }))
        );
        assert_eq!(
            p("/api/v1/namespaces/x/status"),
            Some(Ok(ResPath {
                kind: Kind::Namespace,
                namespace: None,
                name: Some("x".into()),
                sub: Some("status".into())
            }))
        );
        assert_eq!(
            p("/apis/networking.k8s.io/v1/namespaces/a/networkpolicies/deny"),
            Some(Ok(ResPath {
                kind: Kind::NetworkPolicy,
                namespace: Some("a".into()),
                name: Some("deny".into()),
                sub: None
            }))
        );
        assert_eq!(p("/api/v1/configmaps"), Some(Err(404)));
        assert_eq!(
            p("/api/v1/pods/p1"),
            Some(Err(404)),
            "a pod by name needs its namespace"
        );
        assert_eq!(p("/api/v1/nodes/n1/proxy"), Some(Err(404)));
        assert_eq!(
            p("/apis/networking.k8s.io/v1/networkpolicies/x/status"),
            Some(Err(404))
        );
        assert_eq!(p("/version"), None);
        let r = parse_request_path("/apis/coordination.k8s.io/v1/namespaces/n/leases/l").unwrap();
        assert_eq!(
            (r.group.as_str(), r.resource.as_str(), r.name.as_deref()),
            ("coordination.k8s.io", "leases", Some("l"))
        );
    }

    #[test]
    fn queries() {
        let q = parse_query("labelSelector=app%3Dweb%2Ctier+in+(a)&watch=true&x");
        assert_eq!(q["labelSelector"], "app=web,tier in (a)");
        assert_eq!(q["watch"], "true");
        assert_eq!(q["x"], "");
    }
}
