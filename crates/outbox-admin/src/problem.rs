//! How the admin API's errors answer: as the RFC 9457 problems of every server
//! ([`outbox_server::Problem`]).

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use outbox_core::StoreError;

use crate::Error;

pub(crate) use outbox_server::Problem;

/// `401` for an API call without the admin token.
pub(crate) fn unauthorized() -> Response {
    Problem::unauthorized(
        "outbox-admin",
        "send the admin token as Authorization: Bearer <token>",
    )
}

impl From<Error> for Problem {
    fn from(e: Error) -> Self {
        match e {
            Error::NotFound(_) => Problem::new(StatusCode::NOT_FOUND, "Not found", e.to_string()),
            Error::BadRequest(_) => Problem::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "Invalid request",
                e.to_string(),
            ),
            Error::Store(StoreError::Config(detail)) => {
                Problem::new(StatusCode::NOT_IMPLEMENTED, "Not supported", detail)
            }
            Error::Store(e) => {
                tracing::warn!(error = %e, "admin request failed");
                Problem::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "Service unavailable",
                    "the database did not answer; retry later",
                )
            }
            Error::Exposed(_) => Problem::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "Misconfigured",
                e.to_string(),
            ),
        }
    }
}

impl IntoResponse for Error {
    fn into_response(self) -> Response {
        Problem::from(self).into_response()
    }
}
