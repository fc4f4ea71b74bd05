//! The worker: the relay with in-process handlers for the payment events.
//!
//! - `payment.created`: charge the gateway with the payment id as idempotency key; approved →
//!   `paid` and `payment.paid`, in one transaction. A decline is retried with backoff up to
//!   `max_declines` charge attempts, then `rejected` and `payment.rejected`. A gateway that does
//!   not answer is not a decline: the message is retried and no attempt is counted.
//! - `payment.paid` / `payment.rejected`: e-mail the card holder.

use std::sync::Arc;

use outbox_core::{Delivery, HandlerSink, Message, Relay, RelayConfig, RetryPolicy, SinkError};

use crate::db::{Db, PaymentEvent, Tx};
use crate::gateway::{ChargeOutcome, ChargeRequest, GatewayClient};
use crate::mail::Mailer;

/// The handlers of the payment events; [`Worker::relay`] runs them on a relay.
pub struct Worker {
    /// The payments and their outbox.
    pub db: Db,
    /// The gateway charged for each `payment.created`.
    pub gateway: GatewayClient,
    /// Where the e-mails to the card holder go.
    pub mailer: Mailer,
    /// Charge attempts before a payment is rejected (the seed: 4).
    pub max_declines: i64,
}

impl Worker {
    /// A relay delivering the payment events to this worker's handlers.
    pub fn relay(self, config: RelayConfig) -> Relay {
        let worker = Arc::new(self);
        let store = worker.db.store();
        let sink = HandlerSink::new(move |m: Message| {
            let worker = worker.clone();
            async move { worker.handle(m).await }
        });
        Relay::with_config(store, Arc::new(sink), config)
    }

    /// Retries quickly (declines are part of the flow) and long enough to ride out a gateway
    /// restart before a message is set aside as dead.
    pub fn relay_config() -> RelayConfig {
        RelayConfig::default().retry(
            RetryPolicy::default()
                .max_attempts(50)
                .base_delay(std::time::Duration::from_millis(200))
                .max_delay(std::time::Duration::from_secs(10)),
        )
    }

    async fn handle(&self, m: Message) -> Delivery {
        let event: PaymentEvent = m
            .json()
            .map_err(|e| SinkError::permanent(format!("bad payload: {e}")))?;
        match m.message_type.as_str() {
            "payment.created" => self.charge(event).await,
            kind @ ("payment.paid" | "payment.rejected") => {
                self.mailer.send(kind, &event, m.id).await
            }
            other => Err(SinkError::permanent(format!("no handler for {other}"))),
        }
    }

    /// Handles a message received from a broker, writing every change to the payments in `tx`,
    /// the consumer's inbox transaction: a redelivery finds the message in the inbox and the
    /// payment as this delivery left it.
    pub async fn handle_in(&self, tx: &mut Tx<'_>, m: &Message) -> Delivery {
        let event: PaymentEvent = m
            .json()
            .map_err(|e| SinkError::permanent(format!("bad payload: {e}")))?;
        match m.message_type.as_str() {
            "payment.created" => self.charge_in(tx, event).await,
            kind @ ("payment.paid" | "payment.rejected") => {
                self.mailer.send(kind, &event, m.id).await
            }
            other => Err(SinkError::permanent(format!("no handler for {other}"))),
        }
    }

    /// Like `charge`, but a decline that is not final schedules the next attempt as a new
    /// `payment.created` event in `tx` instead of failing the delivery, so the counted decline
    /// commits with the inbox record.
    async fn charge_in(&self, tx: &mut Tx<'_>, mut event: PaymentEvent) -> Delivery {
        let transient = |e: anyhow::Error| SinkError::transient(e.to_string());
        let id = event.payment_id;
        let Some(payment) = self.db.get_in(tx, id).await.map_err(transient)? else {
            return Err(SinkError::permanent(format!("payment {id} does not exist")));
        };
        if payment.status != "pending" {
            return Ok(()); // an attempt scheduled before the payment was settled
        }
        let outcome = self.charge_gateway(&event).await?;
        let (status, reason) = match outcome {
            ChargeOutcome::Approved { charge_id } => {
                event.charge_id = Some(charge_id);
                ("paid", None)
            }
            ChargeOutcome::Declined { reason } if payment.attempts + 1 >= self.max_declines => {
                ("rejected", Some(reason))
            }
            ChargeOutcome::Declined { reason } => {
                let retry_in = decline_backoff(payment.attempts);
                self.db
                    .decline_in(tx, &event, &reason, retry_in)
                    .await
                    .map_err(transient)?;
                return Ok(());
            }
        };
        event.reason = reason;
        self.db
            .finish_in(tx, &event, status, true)
            .await
            .map_err(transient)?;
        Ok(())
    }

    /// Charges with the payment id as idempotency key; no answer is a transient error.
    async fn charge_gateway(&self, event: &PaymentEvent) -> Result<ChargeOutcome, SinkError> {
        let request = ChargeRequest {
            amount: event.amount.clone(),
            currency: event.currency.clone(),
            token_card: event.token_card.clone(),
        };
        self.gateway
            .charge(&event.payment_id.to_string(), &request)
            .await
            .map_err(|e| SinkError::transient(e.to_string()))
    }

    async fn charge(&self, mut event: PaymentEvent) -> Delivery {
        let transient = |e: anyhow::Error| SinkError::transient(e.to_string());
        let id = event.payment_id;
        let Some(payment) = self.db.get(id).await.map_err(transient)? else {
            return Err(SinkError::permanent(format!("payment {id} does not exist")));
        };
        if payment.status != "pending" {
            return Ok(()); // a duplicate delivery of a payment already settled
        }
        let outcome = self.charge_gateway(&event).await?;
        match outcome {
            ChargeOutcome::Approved { charge_id } => {
                event.charge_id = Some(charge_id);
                self.db
                    .finish(&event, "paid", true)
                    .await
                    .map_err(transient)?;
                Ok(())
            }
            ChargeOutcome::Declined { reason } if payment.attempts + 1 >= self.max_declines => {
                event.reason = Some(reason);
                self.db
                    .finish(&event, "rejected", true)
                    .await
                    .map_err(transient)?;
                Ok(())
            }
            ChargeOutcome::Declined { reason } => {
                self.db
                    .record_decline(id, &reason)
                    .await
                    .map_err(transient)?;
                Err(SinkError::transient(format!("declined: {reason}")))
            }
        }
    }
}

/// The wait before the next charge attempt after `declines` declines: 200 ms, doubling, at
/// most 10 s (the relay's retry policy for the in-process worker).
fn decline_backoff(declines: i64) -> std::time::Duration {
    let exp = u32::try_from(declines.clamp(0, 6)).unwrap_or(6);
    std::time::Duration::from_millis(200 * 2u64.pow(exp)).min(std::time::Duration::from_secs(10))
}
