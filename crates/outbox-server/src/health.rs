//! `/health/live` and `/health/ready`.
//!
//! - **Live** answers whether the process is wedged: every relay it runs made progress within
//!   its [`stall_timeout`](outbox_core::RelayConfig::stall_timeout). A relay waiting for a
//!   database that is down is live (restarting it would not help); a stopped relay is not.
//! - **Ready** answers whether the process does its work: the database answers a ping
//!   within [`PING_TIMEOUT`] and every relay has started (its process may wait for the
//!   database to be migrated first) and not stopped. Sinks whose circuit is open are listed
//!   in the body, but do not fail readiness: the relay keeps their messages and retries them,
//!   and taking the process out of service would not bring the sink back. Warnings
//!   ([`Surface::warnings`](crate::Surface::warnings), such as a replication slot falling
//!   behind) are listed the same way.

use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use outbox_core::{RelayMonitor, RelayState, Store};
use serde_json::{Value, json};

use crate::Problem;

/// How long readiness waits for the database's answer.
pub const PING_TIMEOUT: Duration = Duration::from_secs(2);

/// Where readiness gets the warnings it lists without failing.
pub(crate) type Warnings = Arc<dyn Fn() -> Vec<String> + Send + Sync>;

/// What the health checks look at.
#[derive(Clone, Default)]
pub(crate) struct Checks {
    pub store: Option<Arc<dyn Store>>,
    pub relays: Vec<RelayMonitor>,
    pub warnings: Option<Warnings>,
}

fn relay_json(r: &RelayMonitor) -> Value {
    json!({
        "id": r.id(),
        "state": r.state().as_str(),
        "since_progress_seconds": r.since_progress().as_secs_f64(),
    })
}

pub(crate) async fn live(State(checks): State<Arc<Checks>>) -> Response {
    let relays: Vec<Value> = checks.relays.iter().map(relay_json).collect();
    let stuck: Vec<&str> = checks
        .relays
        .iter()
        .filter(|r| !r.is_live())
        .map(RelayMonitor::id)
        .collect();
    if stuck.is_empty() {
        return Json(json!({"status": "ok", "relays": relays})).into_response();
    }
    let detail = format!(
        "relay {} stopped or made no progress for too long",
        stuck.join(", ")
    );
    Problem::new(StatusCode::SERVICE_UNAVAILABLE, "Not live", detail)
        .with("relays", relays)
        .into_response()
}

pub(crate) async fn ready(State(checks): State<Arc<Checks>>) -> Response {
    let mut problems = Vec::new();
    let database = match &checks.store {
        None => "not used",
        Some(store) => match tokio::time::timeout(PING_TIMEOUT, store.ping()).await {
            Ok(Ok(())) => "ok",
            Ok(Err(e)) => {
                tracing::debug!(error = %e, "readiness: the database did not answer");
                problems.push("the database does not answer".to_owned());
                "down"
            }
            Err(_) => {
                problems.push(format!(
                    "the database did not answer within {PING_TIMEOUT:?}"
                ));
                "down"
            }
        },
    };
    for r in &checks.relays {
        match r.state() {
            RelayState::Stopped => problems.push(format!("relay {} has stopped", r.id())),
            RelayState::Starting => {
                problems.push(format!("relay {} has not started yet", r.id()));
            }
            _ => {}
        }
    }
    let circuits: Vec<_> = checks.relays.iter().flat_map(|r| r.circuits()).collect();
    let open: Vec<&str> = circuits
        .iter()
        .filter(|c| c.open)
        .map(|c| c.sink.as_str())
        .collect();
    let relays: Vec<Value> = checks.relays.iter().map(relay_json).collect();
    let warnings = checks.warnings.as_ref().map(|w| w()).unwrap_or_default();
    if problems.is_empty() {
        return Json(json!({
            "status": "ok",
            "database": database,
            "relays": relays,
            "open_circuits": open,
            "circuits": circuits,
            "warnings": warnings,
        }))
        .into_response();
    }
    Problem::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "Not ready",
        problems.join("; "),
    )
    .with("database", database)
    .with("relays", relays)
    .with("open_circuits", json!(open))
    .with("circuits", json!(circuits))
    .with("warnings", json!(warnings))
    .into_response()
}
