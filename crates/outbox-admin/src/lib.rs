//! # outbox-admin
//!
//! The operator's side of an outbox, over HTTP: an admin API and a web dashboard that the relay
//! serves next to its health and metrics endpoints, and the one implementation of the `outbox
//! status` and `outbox dead` commands ([`ops`]), so the CLI and the API can never disagree.
//!
//! ```no_run
//! # async fn mount(store: std::sync::Arc<dyn outbox_core::Store>) {
//! let state = outbox_admin::AdminState::new(store).with_token(std::env::var("OUTBOX_ADMIN_TOKEN").ok());
//! let app: axum::Router = axum::Router::new().nest_service("/admin", outbox_admin::router(state));
//! # }
//! ```
//!
//! Mount it with `nest_service`, not `nest`: axum's `nest` does not route `/admin/` (with the
//! slash) to a nested `/`, and the dashboard lives there (`/admin` redirects to it).
//!
//! ## What it serves (nested at `/admin`)
//!
//! - `GET /admin/` — the dashboard: plain HTML, CSS and JavaScript compiled into the binary, no
//!   CDN and no build step, so it works offline and behind any firewall.
//! - `GET /admin/api/status` — the counts of `outbox status`, the paused topics and, when the
//!   relay mounted it, the relay's own counters.
//! - `GET /admin/api/dead` — dead letters, filtered by `topic`, `type`, `key`, `error` (a
//!   case-insensitive substring) and `older_than` (`30m`, `7d`), paged by keyset: each page's
//!   `next` is the `after` of the following one, so pages stay correct while letters are
//!   retried or purged. `GET`/`DELETE /admin/api/dead/{id}` shows or purges one,
//!   `POST /admin/api/dead/{id}/retry` retries one, and `POST /admin/api/dead/retry` and
//!   `/purge` take a selection: `{"ids": [...]}`, a filter, or `{"all": true}`.
//! - `GET /admin/api/relays` — relays that reported within `within` seconds (default 60).
//! - `GET /admin/api/topics/paused`, `POST /admin/api/topics/{topic}/pause` and `/resume` —
//!   paused topics are not claimed (a key whose next message is paused waits, so order holds).
//!
//! ## Guarantees
//!
//! - **Access.** With a token ([`AdminState::with_token`]) every API call needs
//!   `Authorization: Bearer <token>`, compared in constant time; otherwise it is answered `401`
//!   with `WWW-Authenticate`. Without a token the API must only be reachable from the machine
//!   itself: [`check_exposure`] refuses any address that is not loopback, and the server that
//!   mounts the router calls it before it binds. The dashboard's files hold no data and are
//!   served to anyone; the page asks for the token and keeps it in `sessionStorage`.
//! - **Errors** are `application/problem+json` (RFC 9457). A client's mistake (bad filter,
//!   unknown id, malformed body) is a `4xx`; only a database that does not answer is a `503`.
//! - **Secrets.** Error texts pass through [`outbox_core::redact()`] before they are shown.

mod api;
mod assets;
mod auth;
pub mod ops;
mod problem;

use std::net::SocketAddr;
use std::sync::Arc;

use outbox_core::{RelayStats, Store, StoreError};
use uuid::Uuid;

pub use api::router;
pub use ops::{DeadEntry, DeadPage, Retried, Selection};

/// What the admin routes share: the store, the token, and optionally a relay's counters.
#[derive(Clone)]
pub struct AdminState {
    store: Arc<dyn Store>,
    token: Option<Arc<str>>,
    stats: Option<Arc<RelayStats>>,
}

impl AdminState {
    /// Admin state over `store`, with no token and no relay counters.
    pub fn new(store: Arc<dyn Store>) -> Self {
        Self {
            store,
            token: None,
            stats: None,
        }
    }

    /// Requires `Authorization: Bearer <token>` on every API call; `None` or an empty token
    /// requires nothing (serve on loopback only, see [`check_exposure`]).
    pub fn with_token(mut self, token: Option<String>) -> Self {
        self.token = token.filter(|t| !t.is_empty()).map(Arc::from);
        self
    }

    /// Adds the counters of the relay in this process to the status, for the dashboard's
    /// throughput.
    pub fn with_relay_stats(mut self, stats: Arc<RelayStats>) -> Self {
        self.stats = Some(stats);
        self
    }

    /// The store the admin operations act on.
    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }
}

/// Why an admin operation did not happen.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The store failed; the API answers 503, or 501 when the store cannot do the operation.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// No dead letter has this id: it does not exist, or it is not dead.
    #[error("no dead message with id {0}")]
    NotFound(Uuid),
    /// The request names nothing sensible; the text says what to change.
    #[error("{0}")]
    BadRequest(String),
    /// The admin API would be served on a non-loopback address (given here) without a token.
    #[error(
        "refusing to serve the admin API on {0} without a token: set OUTBOX_ADMIN_TOKEN, or listen on a loopback address such as 127.0.0.1"
    )]
    Exposed(SocketAddr),
}

/// Checks that the admin API may be served on `addr`: anywhere with a token, only on a
/// loopback address without one (`0.0.0.0` and `[::]` are not loopback).
pub fn check_exposure(addr: SocketAddr, token: Option<&str>) -> Result<(), Error> {
    let has_token = token.is_some_and(|t| !t.is_empty());
    if has_token || addr.ip().is_loopback() {
        Ok(())
    } else {
        Err(Error::Exposed(addr))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_loopback_is_served_without_a_token() {
        for ok in ["127.0.0.1:0", "127.0.0.5:8080", "[::1]:9000"] {
            check_exposure(ok.parse().unwrap(), None).unwrap();
        }
        for exposed in ["0.0.0.0:8080", "[::]:8080", "192.168.1.4:80"] {
            let addr: SocketAddr = exposed.parse().unwrap();
            let err = check_exposure(addr, None).unwrap_err().to_string();
            assert!(
                err.contains("OUTBOX_ADMIN_TOKEN") && !err.contains('\n'),
                "{err}"
            );
            assert!(
                check_exposure(addr, Some("")).is_err(),
                "an empty token counts"
            );
            check_exposure(addr, Some("secret")).unwrap();
        }
    }
}
