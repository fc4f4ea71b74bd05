//! The payment API: `POST /api/payments`, `GET /api/payments/{id}` and the OpenAPI document,
//! served on an [`outbox_server::Surface`] with health and metrics. Every error is
//! `application/problem+json` (RFC 9457); nothing a client sends gets a 5xx.

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use outbox_core::RelayMonitor;
use outbox_server::{Problem, Surface};
use serde_json::json;
use tracing::Instrument;
use uuid::Uuid;

use crate::db::{Created, Db};
use crate::validate::{FieldError, RawPayment, validate};

/// Largest accepted request body.
pub const BODY_LIMIT: usize = 16 * 1024;

/// What the payment API's handlers share.
#[derive(Clone)]
pub struct ApiState {
    /// The payments and their outbox.
    pub db: Db,
    /// False only to measure the API without its outbox write (a benchmark baseline).
    pub write_events: bool,
}

fn internal(e: anyhow::Error) -> Problem {
    tracing::error!(error = %e, "request failed");
    Problem::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "Service unavailable",
        "the database did not answer; retry later",
    )
}

/// The API's own routes and the OpenAPI document, to merge into a [`Surface`].
pub fn routes(state: ApiState) -> Router {
    Router::new()
        .route("/api/payments", post(create_payment))
        .route("/api/payments/{id}", get(get_payment))
        .merge(crate::openapi::docs())
        .layer(DefaultBodyLimit::max(BODY_LIMIT))
        .layer(middleware::from_fn(traced))
        .with_state(state)
}

/// The API's surface: its routes, with health and metrics on its database and on the relays
/// of this process (`relays`).
pub fn surface(state: ApiState, relays: &[RelayMonitor]) -> Surface {
    let surface = Surface::new().store(state.db.store());
    relays
        .iter()
        .fold(surface, |s, r| s.relay(r.clone()))
        .with(routes(state))
}

/// Runs each request in a SERVER span named after its route, continuing the caller's trace
/// when the request carries a W3C `traceparent`; with the OpenTelemetry layer, the events a
/// payment enqueues hang under it.
async fn traced(req: axum::extract::Request, next: middleware::Next) -> Response {
    let route = req
        .extensions()
        .get::<axum::extract::MatchedPath>()
        .map(|p| p.as_str().to_owned());
    let method = req.method().as_str().to_owned();
    let span = tracing::info_span!(
        "request",
        otel.name = format!("{method} {}", route.as_deref().unwrap_or("")).trim_end(),
        otel.kind = "server",
        http.request.method = %method,
        http.route = route,
        url.path = %req.uri().path(),
        http.response.status_code = tracing::field::Empty,
        otel.status_code = tracing::field::Empty,
    );
    // `Body` is not `Sync`: no borrow of the request may live across the await below.
    let (parent, state) = {
        let header = |name: &str| {
            req.headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned)
        };
        (
            header(outbox_core::trace::TRACEPARENT),
            header(outbox_core::trace::TRACESTATE),
        )
    };
    outbox_core::trace::set_remote_parent(&span, parent.as_deref(), state.as_deref());
    let response = next.run(req).instrument(span.clone()).await;
    span.record("http.response.status_code", response.status().as_u16());
    if response.status().is_server_error() {
        span.record("otel.status_code", "ERROR");
    }
    response
}

/// Everything the API serves, for tests and embedders that serve it themselves (the backlog
/// gauges are then not refreshed: see [`Surface::serve`]).
pub fn router(state: ApiState) -> Router {
    surface(state, &[]).router()
}

fn accepted(id: Uuid) -> Response {
    let location = format!("/api/payments/{id}");
    let body = Json(json!({"payment_id": id, "status": "pending"}));
    (StatusCode::ACCEPTED, [(header::LOCATION, location)], body).into_response()
}

async fn create_payment(
    State(state): State<ApiState>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, Problem> {
    let body = body.map_err(|r| {
        let title = if r.status() == StatusCode::PAYLOAD_TOO_LARGE {
            "Payload too large"
        } else {
            "Bad request"
        };
        Problem::new(r.status(), title, format!("{r} (limit {BODY_LIMIT} bytes)"))
    })?;
    let is_json = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| {
            v.split(';')
                .next()
                .is_some_and(|m| m.trim().eq_ignore_ascii_case("application/json"))
        });
    if !is_json {
        return Err(Problem::new(
            StatusCode::BAD_REQUEST,
            "Bad request",
            "Content-Type must be application/json",
        ));
    }
    let raw: RawPayment = serde_json::from_slice(&body).map_err(|e| {
        Problem::new(
            StatusCode::BAD_REQUEST,
            "Malformed JSON",
            format!("the body is not a JSON object: {e}"),
        )
    })?;
    let payment = validate(&raw).map_err(|errors: Vec<FieldError>| {
        Problem::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "Invalid payment",
            "some fields are invalid; see errors",
        )
        .with("errors", json!(errors))
    })?;
    let key = idempotency_key(&headers)?;
    let fingerprint = serde_json::to_string(&payment).unwrap_or_default();
    let created = state
        .db
        .create(
            &payment,
            key.as_deref().map(|k| (k, fingerprint.as_str())),
            state.write_events,
        )
        .await
        .map_err(internal)?;
    match created {
        Created::New(id) => {
            metrics::counter!("payments_created_total").increment(1);
            Ok(accepted(id))
        }
        Created::Replay(id) => Ok(accepted(id)),
        Created::KeyReused => Err(Problem::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "Idempotency key reused",
            "this Idempotency-Key was already used with a different request",
        )),
    }
}

fn idempotency_key(headers: &HeaderMap) -> Result<Option<String>, Problem> {
    let Some(v) = headers.get("idempotency-key") else {
        return Ok(None);
    };
    match v.to_str() {
        Ok(k) if !k.trim().is_empty() && k.len() <= 255 => Ok(Some(k.trim().to_owned())),
        _ => Err(Problem::new(
            StatusCode::BAD_REQUEST,
            "Bad request",
            "Idempotency-Key must be 1 to 255 visible ASCII characters",
        )),
    }
}

async fn get_payment(
    State(state): State<ApiState>,
    Path(id): Path<String>,
) -> Result<Response, Problem> {
    let not_found = || {
        Problem::new(
            StatusCode::NOT_FOUND,
            "Not found",
            format!("no payment {id}"),
        )
    };
    let uuid = Uuid::parse_str(&id).map_err(|_| not_found())?;
    match state.db.get(uuid).await.map_err(internal)? {
        Some(p) => Ok(Json(p).into_response()),
        None => Err(not_found()),
    }
}
