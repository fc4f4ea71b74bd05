//! The payment API over real HTTP, on a real SQLite file.

use std::time::Duration;

use outbox_payments::api::{ApiState, router};
use outbox_payments::{Db, open_db};
use reqwest::StatusCode;
use serde_json::{Value, json};

struct Api {
    base: String,
    http: reqwest::Client,
    db: Db,
    _dir: tempfile::TempDir,
}

async fn start() -> Api {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("pay.db").display());
    let db = open_db(&url, None).await.unwrap();
    db.migrate().await.unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let app = router(ApiState {
        db: db.clone(),
        write_events: true,
    });
    tokio::spawn(async move { axum::serve(listener, app).await });
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap();
    Api {
        base,
        http,
        db,
        _dir: dir,
    }
}

fn valid() -> Value {
    json!({"token_card": "tok_1", "amount": "19.99", "currency": "EUR",
           "card_holder_email": "ana@example.com", "card_holder_name": "Ana"})
}

impl Api {
    async fn post(
        &self,
        body: &str,
        content_type: &str,
        key: Option<&str>,
    ) -> (StatusCode, Option<String>, Value) {
        let mut req = self
            .http
            .post(format!("{}/api/payments", self.base))
            .header("content-type", content_type)
            .body(body.to_owned());
        if let Some(k) = key {
            req = req.header("Idempotency-Key", k);
        }
        let resp = req.send().await.unwrap();
        let status = resp.status();
        let location = resp
            .headers()
            .get("location")
            .map(|v| v.to_str().unwrap().to_owned());
        let ct = resp
            .headers()
            .get("content-type")
            .map(|v| v.to_str().unwrap().to_owned());
        let body: Value = resp.json().await.unwrap_or(Value::Null);
        if !status.is_success() {
            assert_eq!(
                ct.as_deref(),
                Some("application/problem+json"),
                "{status} {body}"
            );
            assert_eq!(body["status"], status.as_u16(), "{body}");
        }
        (status, location, body)
    }

    async fn get(&self, path: &str) -> (StatusCode, Value) {
        let resp = self
            .http
            .get(format!("{}{path}", self.base))
            .send()
            .await
            .unwrap();
        let status = resp.status();
        (status, resp.json().await.unwrap_or(Value::Null))
    }
}

#[tokio::test]
async fn a_purchase_is_accepted_with_its_event_in_the_outbox() {
    let api = start().await;
    let (status, location, body) = api
        .post(&valid().to_string(), "application/json", None)
        .await;
    assert_eq!(status, StatusCode::ACCEPTED);
    assert_eq!(body["status"], "pending");
    let id = body["payment_id"].as_str().unwrap();
    assert_eq!(
        location.as_deref(),
        Some(format!("/api/payments/{id}").as_str())
    );
    let (status, got) = api.get(&format!("/api/payments/{id}")).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        (
            got["status"].as_str(),
            got["amount"].as_str(),
            got["currency"].as_str()
        ),
        (Some("pending"), Some("19.99"), Some("EUR"))
    );
    assert_eq!(got["attempts"], 0);
    let claimed = api
        .db
        .store()
        .claim("t", 10, Duration::from_secs(30))
        .await
        .unwrap();
    assert_eq!(claimed.len(), 1);
    assert_eq!(claimed[0].message_type, "payment.created");
    assert_eq!(claimed[0].key.as_deref(), Some(id));
    assert_eq!(claimed[0].payload_value()["amount"], "19.99");
}

#[tokio::test]
async fn bad_input_gets_the_right_4xx_and_writes_nothing() {
    let api = start().await;
    let with = |field: &str, value: Value| {
        let mut v = valid();
        v[field] = value;
        v.to_string()
    };
    let big = "x".repeat(outbox_payments::api::BODY_LIMIT + 1);
    let cases: Vec<(String, &str, StatusCode, Option<&str>)> = vec![
        (
            "{not json".into(),
            "application/json",
            StatusCode::BAD_REQUEST,
            None,
        ),
        (
            "[1,2]".into(),
            "application/json",
            StatusCode::BAD_REQUEST,
            None,
        ),
        (
            valid().to_string(),
            "text/plain",
            StatusCode::BAD_REQUEST,
            None,
        ),
        (big, "application/json", StatusCode::PAYLOAD_TOO_LARGE, None),
        (
            with("amount", json!("-5")),
            "application/json",
            StatusCode::UNPROCESSABLE_ENTITY,
            Some("amount"),
        ),
        (
            with("amount", json!("1.234")),
            "application/json",
            StatusCode::UNPROCESSABLE_ENTITY,
            Some("amount"),
        ),
        (
            with("amount", json!(null)),
            "application/json",
            StatusCode::UNPROCESSABLE_ENTITY,
            Some("amount"),
        ),
        (
            with("currency", json!("EURO")),
            "application/json",
            StatusCode::UNPROCESSABLE_ENTITY,
            Some("currency"),
        ),
        (
            with("currency", json!("ZZZ")),
            "application/json",
            StatusCode::UNPROCESSABLE_ENTITY,
            Some("currency"),
        ),
        (
            with("card_holder_email", json!("ana@")),
            "application/json",
            StatusCode::UNPROCESSABLE_ENTITY,
            Some("card_holder_email"),
        ),
        (
            with("card_holder_name", json!("")),
            "application/json",
            StatusCode::UNPROCESSABLE_ENTITY,
            Some("card_holder_name"),
        ),
        (
            with("card_holder_name", json!("n".repeat(201))),
            "application/json",
            StatusCode::UNPROCESSABLE_ENTITY,
            Some("card_holder_name"),
        ),
        (
            with("token_card", json!(42)),
            "application/json",
            StatusCode::UNPROCESSABLE_ENTITY,
            Some("token_card"),
        ),
    ];
    for (body, ct, want, field) in cases {
        let (status, _, problem) = api.post(&body, ct, None).await;
        assert_eq!(status, want, "{problem}");
        if let Some(field) = field {
            let fields: Vec<&str> = problem["errors"]
                .as_array()
                .unwrap()
                .iter()
                .map(|e| e["field"].as_str().unwrap())
                .collect();
            assert_eq!(fields, vec![field], "{problem}");
        }
    }
    for path in [
        "/api/payments/not-a-uuid",
        "/api/payments/01a219b7-0329-75b3-829b-a4b0f8366762",
        "/nowhere",
    ] {
        let (status, body) = api.get(path).await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{path}");
        assert_eq!(body["status"], 404);
    }
    assert_eq!(
        api.db.store().status().await.unwrap().pending,
        0,
        "a rejected request wrote an event"
    );
}

#[tokio::test]
async fn an_idempotent_retry_returns_the_first_answer_and_creates_nothing() {
    let api = start().await;
    let body = valid().to_string();
    let (s1, l1, b1) = api.post(&body, "application/json", Some("order-77")).await;
    let (s2, l2, b2) = api.post(&body, "application/json", Some("order-77")).await;
    assert_eq!((s1, s2), (StatusCode::ACCEPTED, StatusCode::ACCEPTED));
    assert_eq!((l1, &b1), (l2, &b2));
    let other = {
        let mut v = valid();
        v["amount"] = json!("20.00");
        v.to_string()
    };
    let (s3, _, problem) = api.post(&other, "application/json", Some("order-77")).await;
    assert_eq!(s3, StatusCode::UNPROCESSABLE_ENTITY, "{problem}");
    assert_eq!(api.db.store().status().await.unwrap().pending, 1);

    // Concurrent retries of one request still create one payment.
    let posts = (0..10).map(|_| api.post(&body, "application/json", Some("order-78")));
    let answers = futures::future::join_all(posts).await;
    let ids: std::collections::HashSet<String> = answers
        .iter()
        .map(|(_, _, b)| b["payment_id"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(ids.len(), 1);
    assert_eq!(api.db.store().status().await.unwrap().pending, 2);
}

#[tokio::test]
async fn health_metrics_and_docs_are_served() {
    let api = start().await;
    assert_eq!(api.get("/health/live").await.0, StatusCode::OK);
    assert_eq!(api.get("/health/ready").await.1["status"], "ok");
    let (status, doc) = api.get("/api/openapi.json").await;
    assert_eq!(status, StatusCode::OK);
    assert!(doc["paths"]["/api/payments"]["post"].is_object());
    let docs = api
        .http
        .get(format!("{}/api/docs/", api.base))
        .send()
        .await
        .unwrap();
    assert_eq!(docs.status(), StatusCode::OK);
    assert!(docs.text().await.unwrap().contains("swagger"));
    api.post(&valid().to_string(), "application/json", None)
        .await;
    let metrics = api
        .http
        .get(format!("{}/metrics", api.base))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(metrics.contains("payments_created_total"), "{metrics}");
}
