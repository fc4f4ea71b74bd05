//! Errors as `application/problem+json` (RFC 9457), the one error format of every server.

use axum::extract::rejection::{JsonRejection, PathRejection, QueryRejection};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Map, Value, json};

/// An RFC 9457 problem: a status, a short title, a detail for this occurrence, and any
/// extension members (such as the `errors` of a validation failure).
#[derive(Debug, Clone)]
pub struct Problem {
    status: StatusCode,
    title: &'static str,
    detail: String,
    extensions: Map<String, Value>,
}

impl Problem {
    /// A problem with `status`, a `title` that is the same for every occurrence of its kind, and
    /// the `detail` of this one.
    pub fn new(status: StatusCode, title: &'static str, detail: impl Into<String>) -> Self {
        Self {
            status,
            title,
            detail: detail.into(),
            extensions: Map::new(),
        }
    }

    /// Adds an extension member to the body.
    pub fn with(mut self, name: &str, value: impl Into<Value>) -> Self {
        self.extensions.insert(name.to_owned(), value.into());
        self
    }

    /// The HTTP status the response carries.
    pub fn status(&self) -> StatusCode {
        self.status
    }

    /// `404` for a path no route serves.
    pub fn not_found() -> Self {
        Self::new(StatusCode::NOT_FOUND, "Not found", "no such route")
    }

    /// `405` for a route that does not take the request's method.
    pub fn method_not_allowed() -> Self {
        Self::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "Method not allowed",
            "this route does not take that method",
        )
    }
}

impl Problem {
    /// `401` for a request without the bearer token of `realm`, with its `WWW-Authenticate`.
    pub fn unauthorized(realm: &str, detail: impl Into<String>) -> Response {
        let mut response =
            Self::new(StatusCode::UNAUTHORIZED, "Unauthorized", detail).into_response();
        if let Ok(challenge) = HeaderValue::from_str(&format!("Bearer realm=\"{realm}\"")) {
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, challenge);
        }
        response
    }

    /// A request an extractor refused (a bad query, path or body): always the client's doing,
    /// so never answered with a 5xx.
    fn rejected(status: StatusCode, detail: String) -> Self {
        if status.is_client_error() {
            Self::new(status, "Bad request", detail)
        } else {
            Self::new(StatusCode::BAD_REQUEST, "Bad request", detail)
        }
    }
}

impl From<QueryRejection> for Problem {
    fn from(r: QueryRejection) -> Self {
        Self::rejected(r.status(), r.body_text())
    }
}

impl From<PathRejection> for Problem {
    fn from(r: PathRejection) -> Self {
        Self::rejected(r.status(), r.body_text())
    }
}

impl From<JsonRejection> for Problem {
    fn from(r: JsonRejection) -> Self {
        Self::rejected(r.status(), r.body_text())
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
        if let Value::Object(members) = &mut body {
            members.extend(self.extensions);
        }
        let headers = [(header::CONTENT_TYPE, "application/problem+json")];
        (self.status, headers, body.to_string()).into_response()
    }
}
