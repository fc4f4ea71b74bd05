//! MQTT 5: each message is published with QoS 1 to the topic named after its own topic (with
//! an optional prefix), the CloudEvents attributes as user properties and its content type.
//! A message counts as delivered when the broker's PUBACK arrives. rumqttc hands out no per
//! publish handle, so the sink pairs publishes with packet ids in the order the event loop
//! sends them. That pairing holds only while the client's request queue and the sink's
//! waiters stay in step: a publish is queued together with its waiter under one lock, and
//! when the connection fails every waiter fails and every queued or unacknowledged publish is
//! discarded under that same lock (the relay sends them again). Otherwise a publish queued
//! during an outage, already reported failed, would go out after the reconnection and its
//! PUBACK would be taken for a later message's, acking that one before the broker had it.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use outbox_core::{Delivery, Message, Sink, SinkError};
use rumqttc::Outgoing;
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::mqttbytes::v5::{Packet, PubAckReason, PublishProperties};
use rumqttc::v5::{AsyncClient, Event, EventLoop, MqttOptions};
use tokio::sync::oneshot;

use crate::cloudevents;

type Ack = oneshot::Sender<Result<(), String>>;

#[derive(Default)]
struct Pending {
    /// Submitted, not yet given a packet id by the event loop.
    queued: VecDeque<Ack>,
    /// Sent, waiting for PUBACK.
    sent: HashMap<u16, Ack>,
}

impl Pending {
    fn fail_all(&mut self, why: &str) {
        for ack in self
            .queued
            .drain(..)
            .chain(self.sent.drain().map(|(_, a)| a))
        {
            let _ = ack.send(Err(why.to_owned()));
        }
    }
}

/// Publishes to an MQTT 5 broker with QoS 1, a message delivered once its PUBACK arrives (see
/// the module docs); made with [`MqttSink::connect`] or from an `mqtt://` URL.
pub struct MqttSink {
    client: AsyncClient,
    pending: Arc<Mutex<Pending>>,
    prefix: String,
    ack_timeout: Duration,
}

impl MqttSink {
    /// How long a batch waits for its PUBACKs, unless told otherwise: below the relay's
    /// default 30 s lease, so the batch fails before it can be claimed again.
    pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(20);

    /// Connects to `host:port` as `client_id`. The event loop runs in a task of its own and
    /// reconnects after errors; messages caught in a disconnection fail and are retried.
    /// `timeout` bounds the wait for a batch's PUBACKs.
    pub fn connect(
        host: &str,
        port: u16,
        client_id: &str,
        prefix: &str,
        timeout: Duration,
    ) -> Self {
        let mut options = MqttOptions::new(client_id, host, port);
        options.set_keep_alive(Duration::from_secs(30));
        let (client, eventloop) = AsyncClient::new(options, 1024);
        let pending = Arc::new(Mutex::new(Pending::default()));
        tokio::spawn(drive(eventloop, pending.clone()));
        Self {
            client,
            pending,
            prefix: prefix.to_owned(),
            ack_timeout: timeout,
        }
    }

    fn properties(m: &Message) -> Result<PublishProperties, SinkError> {
        Ok(PublishProperties {
            content_type: Some(m.content_type.clone()),
            user_properties: cloudevents::headers(m, cloudevents::DEFAULT_SOURCE)?,
            ..PublishProperties::default()
        })
    }
}

impl MqttSink {
    /// Queues one publish with its waiter, atomically with respect to the event loop's
    /// failure handling (see the module docs).
    fn submit(&self, m: &Message) -> Result<oneshot::Receiver<Result<(), String>>, SinkError> {
        let properties = Self::properties(m)?;
        let (tx, rx) = oneshot::channel();
        let topic = format!("{}{}", self.prefix, m.topic);
        let mut pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        self.client
            .try_publish_with_properties(
                topic,
                QoS::AtLeastOnce,
                false,
                m.payload.clone(),
                properties,
            )
            .map_err(|e| SinkError::transient(format!("MQTT publish: {e} (queue full)")))?;
        pending.queued.push_back(tx);
        Ok(rx)
    }
}

/// Polls the event loop: pairs sent publishes with packet ids and resolves them on PUBACK.
async fn drive(mut eventloop: EventLoop, pending: Arc<Mutex<Pending>>) {
    loop {
        let event = eventloop.poll().await;
        let failed = {
            let mut p = pending.lock().unwrap_or_else(|e| e.into_inner());
            let failed = handle(event, &mut p);
            if failed {
                // The waiters just failed: their publishes must never be sent after all.
                eventloop.clean();
                eventloop.pending.clear();
            }
            failed
        };
        if failed {
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }
}

/// Applies one event; true when the connection failed.
fn handle(event: Result<Event, rumqttc::v5::ConnectionError>, p: &mut Pending) -> bool {
    match event {
        Ok(Event::Outgoing(Outgoing::Publish(pkid))) => {
            if let Some(ack) = p.queued.pop_front() {
                p.sent.insert(pkid, ack);
            }
        }
        Ok(Event::Incoming(Packet::PubAck(ack))) => {
            if let Some(waiter) = p.sent.remove(&ack.pkid) {
                let result = match ack.reason {
                    PubAckReason::Success | PubAckReason::NoMatchingSubscribers => Ok(()),
                    other => Err(format!("broker refused the publish: {other:?}")),
                };
                let _ = waiter.send(result);
            }
        }
        Ok(_) => {}
        Err(e) => {
            p.fail_all(&format!("MQTT connection: {e}"));
            return true;
        }
    }
    false
}

#[async_trait]
impl Sink for MqttSink {
    async fn publish(&self, batch: &[Message]) -> Vec<Delivery> {
        let acks: Vec<_> = batch.iter().map(|m| self.submit(m)).collect();
        // One deadline for the batch: waiting the timeout once per message would let a server
        // that stopped answering hold a batch of n for n timeouts.
        let deadline = tokio::time::Instant::now() + self.ack_timeout;
        let mut out = Vec::with_capacity(batch.len());
        for ack in acks {
            out.push(match ack {
                Err(e) => Err(e),
                Ok(rx) => match tokio::time::timeout_at(deadline, rx).await {
                    Ok(Ok(Ok(()))) => Ok(()),
                    Ok(Ok(Err(why))) => Err(SinkError::transient(why)),
                    Ok(Err(_)) | Err(_) => Err(SinkError::transient(format!(
                        "MQTT: no PUBACK within {:?}",
                        self.ack_timeout
                    ))),
                },
            });
        }
        out
    }

    fn name(&self) -> &str {
        "mqtt"
    }
}
