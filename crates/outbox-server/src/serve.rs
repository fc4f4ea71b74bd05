//! How every server of the workspace serves HTTP (the relay's surface, the demo's payment API
//! and simulated gateway): with limits, so that clients that stall cannot hold the server or
//! its shutdown.
//!
//! - **Header-read timeout**: a connection must deliver a request's headers within this time
//!   of starting to read them, or it is closed. That also closes idle keep-alive connections,
//!   which start reading the next request's headers at once.
//! - **Request timeout**: a request (reading its body included) gets this long, then is
//!   answered `408` as `application/problem+json`.
//! - **Connection cap**: past it, new connections wait in the listen backlog until one closes.
//!   A burst is queued rather than refused, and the timeouts above free the slots that slow
//!   clients hold, so the queue always moves.
//! - **Bounded shutdown**: when told to stop, the server stops accepting, lets requests in
//!   progress finish, and closes whatever is still open when the shutdown timeout ends.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::{Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::serve::Listener;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

use crate::Problem;

/// The limits of one HTTP server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ServerLimits {
    /// Time for a request's headers to arrive once the server starts reading them.
    pub header_read_timeout: Duration,
    /// Time for a whole request, its body included, before it is answered `408`.
    pub request_timeout: Duration,
    /// Connections served at once; more wait until one closes.
    pub max_connections: usize,
    /// On stop, how long requests in progress may take before their connections are closed.
    pub shutdown_timeout: Duration,
}

impl Default for ServerLimits {
    fn default() -> Self {
        Self {
            header_read_timeout: Duration::from_secs(10),
            request_timeout: Duration::from_secs(30),
            max_connections: 1024,
            shutdown_timeout: Duration::from_secs(10),
        }
    }
}

/// Serves `app` on `listener` within `limits` until `stop` completes. Errors of single
/// connections (clients going away, timeouts) are not errors of the server: this returns
/// once the server has stopped.
pub async fn serve(
    mut listener: TcpListener,
    app: Router,
    limits: ServerLimits,
    stop: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let app = app.layer(middleware::from_fn_with_state(
        limits.request_timeout,
        time_limit,
    ));
    let mut http = http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout);
    let slots = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    let graceful = GracefulShutdown::new();
    let mut connections = JoinSet::new();
    let mut stop = std::pin::pin!(stop);
    loop {
        let (slot, (stream, _)) = tokio::select! {
            () = &mut stop => break,
            accepted = async {
                // The slot first: over the cap, connections stay in the backlog. (axum's
                // accept retries after errors such as running out of descriptors.)
                let slot = slots.clone().acquire_owned().await;
                (slot, Listener::accept(&mut listener).await)
            } => accepted,
        };
        let Ok(slot) = slot else { break };
        while connections.try_join_next().is_some() {}
        let service = TowerToHyperService::new(app.clone());
        let conn = graceful.watch(http.serve_connection(TokioIo::new(stream), service));
        connections.spawn(async move {
            // Errors here are clients going away or timing out: nothing to report.
            let _ = conn.await;
            drop(slot);
        });
    }
    drop(listener);
    if tokio::time::timeout(limits.shutdown_timeout, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!(
            open = connections.len(),
            "shutdown timeout: closing the connections still open"
        );
    }
    connections.shutdown().await;
    Ok(())
}

/// Answers `408` when a request (its body included) takes longer than `limit`.
async fn time_limit(State(limit): State<Duration>, req: Request, next: Next) -> Response {
    match tokio::time::timeout(limit, next.run(req)).await {
        Ok(response) => response,
        Err(_) => {
            let detail = format!("the request took longer than {limit:?}");
            let mut response = Problem::new(StatusCode::REQUEST_TIMEOUT, "Request timeout", detail)
                .into_response();
            // The rest of the body may still be on its way: do not read it as a request.
            response.headers_mut().insert(
                header::CONNECTION,
                header::HeaderValue::from_static("close"),
            );
            response
        }
    }
}
