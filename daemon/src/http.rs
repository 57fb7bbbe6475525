//! /healthz, /readyz, /metrics and /status.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};

use crate::daemon::Shared;

/// Binds now (so a port clash is a start-up error) and serves in the background.
pub async fn spawn(addr: SocketAddr, shared: Arc<Shared>) -> std::io::Result<()> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let app = router(shared);
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!(error = %e, "HTTP server stopped");
        }
    });
    Ok(())
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
