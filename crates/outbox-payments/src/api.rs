//! The payment API: `POST /api/payments`, `GET /api/payments/{id}`, health, metrics and the
//! OpenAPI document. Every error is `application/problem+json` (RFC 9457); nothing a client
//! sends gets a 5xx.

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use metrics_exporter_prometheus::PrometheusHandle;
use serde_json::json;
use uuid::Uuid;

use crate::db::{Created, Db};
use crate::validate::{FieldError, RawPayment, validate};

/// Largest accepted request body.
pub const BODY_LIMIT: usize = 16 * 1024;

#[derive(Clone)]
pub struct ApiState {
    pub db: Db,
    pub metrics: PrometheusHandle,
    /// False only to measure the API without its outbox write (a benchmark baseline).
    pub write_events: bool,
}

/// An RFC 9457 problem.
pub struct Problem {
    status: StatusCode,
    title: &'static str,
    detail: String,
    errors: Vec<FieldError>,
}

impl Problem {
    pub fn new(status: StatusCode, title: &'static str, detail: impl Into<String>) -> Self {
        Self {
            status,
            title,
            detail: detail.into(),
            errors: Vec::new(),
        }
    }
}

impl IntoResponse for Problem {
    fn into_response(self) -> Response {
        let mut body = json!({
            "type": "about:blank",
            "title": self.title,
            "status": self.status.as_u16(),
            "detail": self.detail,
        });
        if !self.errors.is_empty() {
            body["errors"] = json!(self.errors);
        }
        let headers = [(header::CONTENT_TYPE, "application/problem+json")];
        (self.status, headers, body.to_string()).into_response()
    }
}

fn internal(e: anyhow::Error) -> Problem {
    tracing::error!(error = %e, "request failed");
    Problem::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "Service unavailable",
        "the database did not answer; retry later",
    )
}

/// The API's routes, including `/health/*`, `/metrics` and the OpenAPI document.
pub fn router(state: ApiState) -> Router {
    Router::new()
        .route("/api/payments", post(create_payment))
        .route("/api/payments/{id}", get(get_payment))
        .route(
            "/health/live",
            get(|| async { Json(json!({"status": "ok"})) }),
        )
        .route("/health/ready", get(ready))
        .route("/metrics", get(metrics))
        .merge(crate::openapi::docs())
        .fallback(|| async { Problem::new(StatusCode::NOT_FOUND, "Not found", "no such route") })
        .method_not_allowed_fallback(|| async {
            Problem::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "Method not allowed",
                "this route does not take that method",
            )
        })
        .layer(DefaultBodyLimit::max(BODY_LIMIT))
        .with_state(state)
}

async fn ready(State(state): State<ApiState>) -> Response {
    if state.db.ping().await {
        Json(json!({"status": "ok"})).into_response()
    } else {
        Problem::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "Not ready",
            "the database does not answer",
        )
        .into_response()
    }
}

async fn metrics(State(state): State<ApiState>) -> Response {
    let headers = [(header::CONTENT_TYPE, "text/plain; version=0.0.4")];
    (headers, state.metrics.render()).into_response()
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
    let payment = validate(&raw).map_err(|errors| Problem {
        errors,
        ..Problem::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "Invalid payment",
            "some fields are invalid; see errors",
        )
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
