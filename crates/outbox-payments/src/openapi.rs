//! The API's OpenAPI 3.1 document and its interactive docs (Swagger UI, assets vendored in the
//! binary: nothing is fetched at build or run time).

use axum::Router;
use serde_json::{Value, json};
use utoipa_swagger_ui::SwaggerUi;

/// Serves the document at `/api/openapi.json` and the docs at `/api/docs`.
pub fn docs<S: Clone + Send + Sync + 'static>() -> Router<S> {
    SwaggerUi::new("/api/docs")
        .external_url_unchecked("/api/openapi.json", document())
        .into()
}

fn problem() -> Value {
    json!({"content": {"application/problem+json": {"schema": {"$ref": "#/components/schemas/Problem"}}}})
}

pub fn document() -> Value {
    json!({
        "openapi": "3.1.0",
        "info": {
            "title": "outbox payment demo",
            "version": env!("CARGO_PKG_VERSION"),
            "description": "A purchase is written with its payment.created event in one transaction (the transactional outbox); a worker charges the gateway and e-mails the card holder."
        },
        "paths": {
            "/api/payments": {"post": {
                "summary": "Create a payment (accepted, charged in the background)",
                "parameters": [{"name": "Idempotency-Key", "in": "header", "required": false,
                    "schema": {"type": "string", "maxLength": 255},
                    "description": "A retried request with the same key and body returns the first answer and creates nothing."}],
                "requestBody": {"required": true, "content": {"application/json": {"schema": {"$ref": "#/components/schemas/NewPayment"}}}},
                "responses": {
                    "202": {"description": "Accepted, pending",
                        "headers": {"Location": {"schema": {"type": "string"}}},
                        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Accepted"}}}},
                    "400": merge(json!({"description": "Malformed JSON or wrong content type"}), problem()),
                    "413": merge(json!({"description": "Body too large"}), problem()),
                    "422": merge(json!({"description": "Invalid fields, or an idempotency key reused with another body"}), problem())
                }
            }},
            "/api/payments/{id}": {"get": {
                "summary": "A payment's status",
                "parameters": [{"name": "id", "in": "path", "required": true, "schema": {"type": "string", "format": "uuid"}}],
                "responses": {
                    "200": {"description": "The payment", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Payment"}}}},
                    "404": merge(json!({"description": "Unknown payment"}), problem())
                }
            }},
            "/health/live": {"get": {"summary": "The process is up", "responses": {"200": {"description": "ok"}}}},
            "/health/ready": {"get": {"summary": "The database answers", "responses": {"200": {"description": "ready"}, "503": merge(json!({"description": "not ready"}), problem())}}},
            "/metrics": {"get": {"summary": "Prometheus metrics", "responses": {"200": {"description": "text format", "content": {"text/plain": {}}}}}}
        },
        "components": {"schemas": {
            "NewPayment": {"type": "object",
                "required": ["token_card", "amount", "currency", "card_holder_email", "card_holder_name"],
                "properties": {
                    "token_card": {"type": "string", "maxLength": 128},
                    "amount": {"oneOf": [{"type": "string", "pattern": "^[0-9]+(\\.[0-9]+)?$"}, {"type": "number"}],
                        "description": "Positive decimal with no more decimals than the currency allows; parsed without floats.", "examples": ["10.50"]},
                    "currency": {"type": "string", "description": "ISO 4217 code", "examples": ["EUR"]},
                    "card_holder_email": {"type": "string", "format": "email"},
                    "card_holder_name": {"type": "string", "maxLength": 200}
                }},
            "Accepted": {"type": "object", "properties": {
                "payment_id": {"type": "string", "format": "uuid"},
                "status": {"type": "string", "enum": ["pending"]}}},
            "Payment": {"type": "object", "properties": {
                "payment_id": {"type": "string", "format": "uuid"},
                "status": {"type": "string", "enum": ["pending", "authorized", "paid", "rejected"]},
                "amount": {"type": "string"}, "currency": {"type": "string"},
                "attempts": {"type": "integer"}, "last_decline_reason": {"type": ["string", "null"]},
                "created_at": {"type": "string", "format": "date-time"},
                "updated_at": {"type": "string", "format": "date-time"}}},
            "Problem": {"type": "object", "properties": {
                "type": {"type": "string"}, "title": {"type": "string"}, "status": {"type": "integer"},
                "detail": {"type": "string"},
                "errors": {"type": "array", "items": {"type": "object", "properties": {
                    "field": {"type": "string"}, "detail": {"type": "string"}}}}}}
        }}
    })
}

fn merge(mut a: Value, b: Value) -> Value {
    if let (Some(a), Value::Object(b)) = (a.as_object_mut(), b) {
        a.extend(b);
    }
    a
}
