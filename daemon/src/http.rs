//! /healthz, /readyz, /metrics and /status, for local probes and scrapes.
//!
//! The HTTP side never stands in the way of the rest: its address (an unprivileged port by
//! default) may be taken by anyone, so binding is retried in the background while CNI, the
//! lease and the data path go on. Its resources are bounded against a local user holding
//! connections open: at most `max_connections` (more are closed at once), each must send its
//! headers within `header_timeout` (also the most a connection may sit idle between requests),
//! and none lives longer than `MAX_CONNECTION_LIFETIME`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

use crate::daemon::Shared;
use crate::metrics::{GaugeGuard, Metrics};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HttpLimits {
    pub max_connections: usize,
    pub header_timeout: Duration,
}

/// Covers what the header timeout does not: a client that never reads its answer. Probes and
/// scrapes take milliseconds.
pub const MAX_CONNECTION_LIFETIME: Duration = Duration::from_secs(60);
/// While the address is taken, binding is retried this often.
const BIND_RETRY: Duration = Duration::from_secs(2);
/// ... and the failure logged again this often.
const BIND_LOG_EVERY: Duration = Duration::from_secs(60);

const REFUSED: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 21\r\nConnection: close\r\n\r\ntoo many connections\n";

/// Serves in the background, from as soon as the address can be bound.
pub fn spawn(addr: SocketAddr, shared: Arc<Shared>, limits: HttpLimits) {
    tokio::spawn(serve(addr, shared, limits));
}

async fn serve(addr: SocketAddr, shared: Arc<Shared>, limits: HttpLimits) {
    let listener = bind_retrying(addr).await;
    let app = router(shared.clone());
    let slots = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    loop {
        let stream = match listener.accept().await {
            Ok((s, _)) => s,
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                tracing::warn!(error = %e, "accepting an HTTP connection failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            // Closed at once rather than queued: a fresh probe succeeds as soon as a slot
            // frees, instead of waiting behind idle connections in the backlog. What the client
            // sent so far is read first (closing on unread data resets the connection before
            // it sees the answer); nothing here waits for it.
            Metrics::inc(&shared.metrics.http_connections_refused);
            let _ = stream.try_read(&mut [0u8; 4096]);
            let _ = stream.try_write(REFUSED);
            continue;
        };
        let (app, metrics) = (app.clone(), shared.metrics.clone());
        tokio::spawn(async move {
            let _open = GaugeGuard::new(&metrics.http_connections);
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(limits.header_timeout)
                .serve_connection(TokioIo::new(stream), TowerToHyperService::new(app));
            match tokio::time::timeout(MAX_CONNECTION_LIFETIME, conn).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => tracing::debug!(error = %e, "HTTP connection ended"),
                Err(_) => tracing::debug!("HTTP connection open too long; closed"),
            }
            drop(slot);
        });
    }
}

async fn bind_retrying(addr: SocketAddr) -> TcpListener {
    let mut logged: Option<Instant> = None;
    loop {
        match TcpListener::bind(addr).await {
            Ok(l) => {
                if logged.is_some() {
                    tracing::info!(%addr, "serving HTTP now that the address is free");
                }
                return l;
            }
            Err(e) => {
                if logged.is_none_or(|t| t.elapsed() >= BIND_LOG_EVERY) {
                    tracing::error!(%addr, error = %e, retry_every = ?BIND_RETRY,
                        "cannot serve HTTP (/healthz, /readyz, /metrics, /status); retrying. CNI, the lease and the data path work meanwhile");
                    logged = Some(Instant::now());
                }
                tokio::time::sleep(BIND_RETRY).await;
            }
        }
    }
}

pub fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/status", get(status))
        .with_state(shared)
}

async fn readyz(State(s): State<Arc<Shared>>) -> Response {
    let st = s.snapshot();
    if st.ready {
        (StatusCode::OK, "ready\n").into_response()
    } else {
        let why = st.waiting_for.unwrap_or_else(|| "starting".into());
        (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {why}\n"),
        )
            .into_response()
    }
}

async fn metrics(State(s): State<Arc<Shared>>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        s.metrics.render(),
    )
        .into_response()
}

async fn status(State(s): State<Arc<Shared>>) -> Response {
    Json(s.snapshot()).into_response()
}
