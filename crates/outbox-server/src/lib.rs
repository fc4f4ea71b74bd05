//! # outbox-server
//!
//! The HTTP surface every outbox server shares: the relay's (`outbox relay --listen`) and the
//! payment demo's. One [`Surface`] serves
//!
//! - `GET /health/live`: the process is not wedged (each relay's loop made progress within
//!   its [`stall_timeout`](outbox_core::RelayConfig::stall_timeout));
//! - `GET /health/ready`: the database answers and no relay has stopped; sinks whose circuit
//!   is open are listed in the body without failing readiness (see [`health`]);
//! - `GET /metrics`: Prometheus text, with the relay's counters and histograms (recorded by
//!   `outbox-core` through the `metrics` facade), the backlog per topic, circuits and process
//!   figures (see [`metrics`]);
//! - whatever routers the application merges in with [`Surface::with`] (the payment API, the
//!   admin API);
//! - `application/problem+json` (RFC 9457) for every error, unknown paths included
//!   ([`Problem`]).
//!
//! ## Guarantees
//!
//! - **Scrapes cannot load the database.** The backlog comes from one query per
//!   [`Surface::backlog_interval`] (5 s by default), whatever the number of scrapers; a scrape
//!   reads memory and `/proc` only.
//! - **Stalled clients cannot hold the server.** [`serve`] bounds the time to send headers
//!   and a whole request, caps the connections served at once (more wait in the backlog), and
//!   bounds shutdown ([`ServerLimits`]).
//!
//! ## Usage
//!
//! ```no_run
//! use std::sync::Arc;
//! use outbox_core::{Relay, RelayConfig, Sink, Store};
//! use outbox_server::{ServerLimits, Surface};
//!
//! async fn run(
//!     store: Arc<dyn Store>,
//!     sink: Arc<dyn Sink>,
//!     config: RelayConfig,
//!     admin_router: axum::Router,
//! ) -> std::io::Result<()> {
//!     let relay = Relay::with_config(store.clone(), sink, config);
//!     let surface = Surface::new()
//!         .store(store)
//!         .relay(relay.monitor())
//!         .with(admin_router); // any axum::Router, merged in
//!     let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
//!     println!("http://{}", listener.local_addr()?);
//!     let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
//!     let server = tokio::spawn(surface.serve(listener, ServerLimits::default(), async {
//!         let _ = stopped.await;
//!     }));
//!     relay.run(async { let _ = tokio::signal::ctrl_c().await; }).await;
//!     let _ = stop.send(());
//!     server.await?
//! }
//! ```

pub mod health;
pub mod metrics;
mod problem;
mod serve;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;
use metrics_exporter_prometheus::PrometheusHandle;
use outbox_core::{RelayMonitor, Store};
use tokio::net::TcpListener;

pub use metrics::recorder;
pub use problem::Problem;
pub use serve::{ServerLimits, serve};

/// An HTTP surface: health, metrics and merged routers, built up then served.
#[must_use]
pub struct Surface {
    handle: PrometheusHandle,
    store: Option<Arc<dyn Store>>,
    relays: Vec<RelayMonitor>,
    warnings: Option<health::Warnings>,
    extra: Router,
    backlog_interval: Duration,
}

impl Default for Surface {
    fn default() -> Self {
        Self::new()
    }
}

impl Surface {
    /// Health and metrics only, on the process-wide recorder ([`recorder`]).
    pub fn new() -> Self {
        Self {
            handle: recorder(),
            store: None,
            relays: Vec::new(),
            warnings: None,
            extra: Router::new(),
            backlog_interval: Duration::from_secs(5),
        }
    }

    /// The database: readiness pings it, and the backlog gauges are read from it.
    pub fn store(mut self, store: Arc<dyn Store>) -> Self {
        self.store = Some(store);
        self
    }

    /// A relay this process runs: liveness, readiness and circuits follow it.
    pub fn relay(mut self, relay: RelayMonitor) -> Self {
        self.relays.push(relay);
        self
    }

    /// What readiness lists under `warnings` without failing (a replication slot falling
    /// behind, say): called on every readiness request.
    pub fn warnings(mut self, source: impl Fn() -> Vec<String> + Send + Sync + 'static) -> Self {
        self.warnings = Some(Arc::new(source));
        self
    }

    /// Merges `router` in: its routes are served beside health and metrics, under the same
    /// limits and with the same problem+json fallback. It must not set a fallback of its own
    /// nor use the surface's paths.
    pub fn with(mut self, router: Router) -> Self {
        self.extra = self.extra.merge(router);
        self
    }

    /// How often the backlog gauges are refreshed from the database (default 5 s).
    pub fn backlog_interval(mut self, every: Duration) -> Self {
        self.backlog_interval = every.max(Duration::from_millis(100));
        self
    }

    /// The routes, for an application that serves them itself. Without [`Surface::serve`]
    /// the backlog gauges are not refreshed.
    pub fn router(&self) -> Router {
        let checks = Arc::new(health::Checks {
            store: self.store.clone(),
            relays: self.relays.clone(),
            warnings: self.warnings.clone(),
        });
        let scrape = Arc::new((self.handle.clone(), self.relays.clone()));
        let own = Router::new()
            .route("/health/live", get(health::live))
            .route("/health/ready", get(health::ready))
            .with_state(checks)
            .route("/metrics", get(render).with_state(scrape));
        own.merge(self.extra.clone())
            .fallback(|| async { Problem::not_found() })
            .method_not_allowed_fallback(|| async { Problem::method_not_allowed() })
    }

    /// Serves on `listener` within `limits`, refreshing the backlog on its timer, until `stop`.
    pub async fn serve(
        self,
        listener: TcpListener,
        limits: ServerLimits,
        stop: impl Future<Output = ()> + Send + 'static,
    ) -> std::io::Result<()> {
        let app = self.router();
        let (stopped_tx, stopped_rx) = tokio::sync::watch::channel(false);
        let stopped = move || {
            let mut rx = stopped_rx.clone();
            async move {
                let _ = rx.wait_for(|s| *s).await;
            }
        };
        let backlog = self.store.map(metrics::BacklogGauges::new);
        let upkeep = tokio::spawn(metrics::keep_up(
            self.handle,
            backlog,
            self.backlog_interval,
            stopped(),
        ));
        let result = serve(listener, app, limits, async move {
            stop.await;
            let _ = stopped_tx.send(true);
        })
        .await;
        let _ = upkeep.await;
        result
    }
}

async fn render(
    State(scrape): State<Arc<(PrometheusHandle, Vec<RelayMonitor>)>>,
) -> impl IntoResponse {
    let (handle, relays) = &*scrape;
    let headers = [(header::CONTENT_TYPE, "text/plain; version=0.0.4")];
    (headers, metrics::render(handle, relays))
}
