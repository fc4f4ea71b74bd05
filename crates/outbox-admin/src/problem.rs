//! RFC 9457 problem responses.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use outbox_core::StoreError;
use serde_json::json;

use crate::Error;

/// An `application/problem+json` answer.
pub(crate) struct Problem {
    status: StatusCode,
    title: &'static str,
    detail: String,
}

impl Problem {
    pub fn new(status: StatusCode, title: &'static str, detail: impl Into<String>) -> Self {
        Self {
            status,
            title,
            detail: detail.into(),
        }
    }

    pub fn unauthorized() -> Response {
        let mut r = Self::new(
            StatusCode::UNAUTHORIZED,
            "Unauthorized",
            "send the admin token as Authorization: Bearer <token>",
        )
        .into_response();
        r.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            HeaderValue::from_static("Bearer realm=\"outbox-admin\""),
        );
        r
    }
}

impl IntoResponse for Problem {
    fn into_response(self) -> Response {
        let body = json!({
            "type": "about:blank",
            "title": self.title,
            "status": self.status.as_u16(),
            "detail": self.detail,
        });
        let headers = [(header::CONTENT_TYPE, "application/problem+json")];
        (self.status, headers, body.to_string()).into_response()
    }
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
