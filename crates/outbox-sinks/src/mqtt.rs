//! MQTT 5: each message is published with QoS 1 to the topic named after its own topic (with
//! an optional prefix), the CloudEvents attributes as user properties and its content type.
//! A message counts as delivered when the broker's PUBACK arrives. rumqttc hands out no per
//! publish handle, so the sink pairs publishes with packet ids in the order the event loop
//! sends them (publishes of a batch are submitted under one lock, in order).

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

pub struct MqttSink {
    client: AsyncClient,
    pending: Arc<Mutex<Pending>>,
    submit: tokio::sync::Mutex<()>,
    prefix: String,
    ack_timeout: Duration,
}

impl MqttSink {
    /// Connects to `host:port` as `client_id`. The event loop runs in a task of its own and
    /// reconnects after errors; messages caught in a disconnection fail and are retried.
    pub fn connect(host: &str, port: u16, client_id: &str, prefix: &str) -> Self {
        let mut options = MqttOptions::new(client_id, host, port);
        options.set_keep_alive(Duration::from_secs(30));
        let (client, eventloop) = AsyncClient::new(options, 1024);
        let pending = Arc::new(Mutex::new(Pending::default()));
        tokio::spawn(drive(eventloop, pending.clone()));
        Self {
            client,
            pending,
            submit: tokio::sync::Mutex::new(()),
            prefix: prefix.to_owned(),
            ack_timeout: Duration::from_secs(30),
        }
    }

    fn properties(m: &Message) -> PublishProperties {
        PublishProperties {
            content_type: Some(m.content_type.clone()),
            user_properties: cloudevents::headers(m, cloudevents::DEFAULT_SOURCE),
            ..PublishProperties::default()
        }
    }
}

/// Polls the event loop: pairs sent publishes with packet ids and resolves them on PUBACK.
async fn drive(mut eventloop: EventLoop, pending: Arc<Mutex<Pending>>) {
    loop {
        let event = eventloop.poll().await;
        let failed = {
            let mut p = pending.lock().unwrap_or_else(|e| e.into_inner());
            handle(event, &mut p)
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
        let mut acks = Vec::with_capacity(batch.len());
        {
            let _order = self.submit.lock().await;
            for m in batch {
                let (tx, rx) = oneshot::channel();
                self.pending
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .queued
                    .push_back(tx);
                let topic = format!("{}{}", self.prefix, m.topic);
                let sent = self
                    .client
                    .publish_with_properties(
                        topic,
                        QoS::AtLeastOnce,
                        false,
                        m.payload.clone(),
                        Self::properties(m),
                    )
                    .await;
                acks.push((rx, sent));
            }
        }
        let mut out = Vec::with_capacity(batch.len());
        for (rx, sent) in acks {
            out.push(match sent {
                Err(e) => Err(SinkError::transient(format!("MQTT publish: {e}"))),
                Ok(()) => match tokio::time::timeout(self.ack_timeout, rx).await {
                    Ok(Ok(Ok(()))) => Ok(()),
                    Ok(Ok(Err(why))) => Err(SinkError::transient(why)),
                    Ok(Err(_)) | Err(_) => Err(SinkError::transient("MQTT: no PUBACK")),
                },
            });
        }
        out
    }

    fn name(&self) -> &str {
        "mqtt"
    }
}
