//! A simulated payment gateway, served over real HTTP, and the worker's client for it.
//!
//! `POST /charges` with an `Idempotency-Key` (the payment id) answers after a random latency:
//! `200 {"status":"approved","charge_id"}` or `402 {"status":"declined","reason"}`. An approved
//! key is final: asking again returns the same charge and charges nothing, so a duplicated or
//! retried request never charges twice. A decline is not final: the card may be retried.
//! `GET /charges` lists the ledger.

use std::collections::HashMap;
use std::ops::RangeInclusive;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use axum::{Json, Router};
use rand::Rng;
use serde::{Deserialize, Serialize};

/// How the simulated gateway behaves.
#[derive(Debug, Clone)]
pub struct GatewayConfig {
    /// Each answer takes a random time in this range.
    pub latency_ms: RangeInclusive<u64>,
    /// Share of first attempts declined, 0.0 to 1.0.
    pub decline_rate: f64,
}

impl Default for GatewayConfig {
    fn default() -> Self {
        Self {
            latency_ms: 50..=300,
            decline_rate: 0.3,
        }
    }
}

/// One approved charge.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Charge {
    /// The gateway's id of the charge (`ch_…`).
    pub charge_id: String,
    /// The key the charge was made under: the payment id.
    pub idempotency_key: String,
    /// The amount charged, as a decimal string.
    pub amount: String,
    /// The currency charged in.
    pub currency: String,
}

/// The body of `POST /charges`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ChargeRequest {
    /// The amount to charge, as a decimal string.
    pub amount: String,
    /// The ISO 4217 currency code.
    pub currency: String,
    /// The card token to charge.
    pub token_card: String,
}

#[derive(Clone)]
struct GatewayState {
    config: GatewayConfig,
    ledger: Arc<Mutex<HashMap<String, Charge>>>,
}

const DECLINE_REASONS: &[&str] = &["insufficient_funds", "do_not_honor", "card_expired"];

/// The gateway's routes.
pub fn router(config: GatewayConfig) -> Router {
    let state = GatewayState {
        config,
        ledger: Arc::default(),
    };
    Router::new()
        .route("/charges", post(charge).get(ledger))
        .with_state(state)
}

async fn charge(
    State(state): State<GatewayState>,
    headers: HeaderMap,
    Json(req): Json<ChargeRequest>,
) -> (StatusCode, Json<serde_json::Value>) {
    let Some(key) = headers
        .get("idempotency-key")
        .and_then(|v| v.to_str().ok())
        .filter(|k| !k.is_empty())
    else {
        let body =
            serde_json::json!({"status": "error", "reason": "Idempotency-Key header required"});
        return (StatusCode::BAD_REQUEST, Json(body));
    };
    let (latency, declined, reason) = {
        let mut rng = rand::rng();
        let latency = rng.random_range(state.config.latency_ms.clone());
        let declined = rng.random_bool(state.config.decline_rate.clamp(0.0, 1.0));
        let reason = DECLINE_REASONS[rng.random_range(0..DECLINE_REASONS.len())];
        (latency, declined, reason)
    };
    tokio::time::sleep(Duration::from_millis(latency)).await;
    // Decide and record under one lock: two requests with one key never both charge.
    let mut ledger = state.ledger.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(existing) = ledger.get(key) {
        return approved(existing);
    }
    if declined {
        let body = serde_json::json!({"status": "declined", "reason": reason});
        return (StatusCode::PAYMENT_REQUIRED, Json(body));
    }
    let charge = Charge {
        charge_id: format!("ch_{}", uuid::Uuid::now_v7().simple()),
        idempotency_key: key.to_owned(),
        amount: req.amount,
        currency: req.currency,
    };
    let response = approved(&charge);
    ledger.insert(key.to_owned(), charge);
    response
}

fn approved(c: &Charge) -> (StatusCode, Json<serde_json::Value>) {
    let body = serde_json::json!({"status": "approved", "charge_id": c.charge_id});
    (StatusCode::OK, Json(body))
}

async fn ledger(State(state): State<GatewayState>) -> Json<Vec<Charge>> {
    let ledger = state.ledger.lock().unwrap_or_else(|p| p.into_inner());
    Json(ledger.values().cloned().collect())
}

/// What the gateway said about a charge.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChargeOutcome {
    /// The card was charged; asking again with the same key returns the same charge.
    Approved {
        /// The gateway's id of the charge.
        charge_id: String,
    },
    /// The card was declined; a later attempt may succeed.
    Declined {
        /// The gateway's reason (`insufficient_funds`, `do_not_honor`, …).
        reason: String,
    },
}

/// The gateway could not give an answer: retry later, this says nothing about the card.
#[derive(Debug, thiserror::Error)]
#[error("payment gateway unavailable: {0}")]
pub struct GatewayUnavailable(String);

/// The worker's HTTP client for a gateway.
#[derive(Debug, Clone)]
pub struct GatewayClient {
    http: reqwest::Client,
    url: String,
}

impl GatewayClient {
    /// A client for the gateway at `base_url` (its `/charges` route), each request bounded to 10 s.
    pub fn new(base_url: &str) -> anyhow::Result<Self> {
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .build()?;
        Ok(Self {
            http,
            url: format!("{}/charges", base_url.trim_end_matches('/')),
        })
    }

    /// Charges with `idempotency_key`; asking again with the same key never charges twice.
    pub async fn charge(
        &self,
        idempotency_key: &str,
        req: &ChargeRequest,
    ) -> Result<ChargeOutcome, GatewayUnavailable> {
        let unavailable =
            |e: reqwest::Error| GatewayUnavailable(outbox_core::redact(&e.to_string()));
        let resp = self
            .http
            .post(&self.url)
            .header("Idempotency-Key", idempotency_key)
            .json(req)
            .send()
            .await
            .map_err(unavailable)?;
        let status = resp.status();
        let body: serde_json::Value = resp.json().await.map_err(unavailable)?;
        let field = |name: &str| body[name].as_str().unwrap_or_default().to_owned();
        match status {
            StatusCode::OK => Ok(ChargeOutcome::Approved {
                charge_id: field("charge_id"),
            }),
            StatusCode::PAYMENT_REQUIRED => Ok(ChargeOutcome::Declined {
                reason: field("reason"),
            }),
            other => Err(GatewayUnavailable(format!("HTTP {other}: {body}"))),
        }
    }
}
