//! Somewhere for the broker scenario's messages to land. A NATS subject no stream captures and
//! a RabbitMQ message no queue is bound for are errors by design, so before draining to such a
//! sink the benchmark creates a stream or a queue for its topic, and removes it afterwards.

use anyhow::Context;
use async_nats::jetstream;
use lapin::options::{QueueBindOptions, QueueDeclareOptions, QueueDeleteOptions};
use lapin::types::FieldTable;
use lapin::{Connection, ConnectionProperties};
use outbox_sinks::SinkUrl;

/// What [`prepare`] created, to be removed by [`Topology::remove`].
pub enum Topology {
    None,
    Stream { address: String, name: String },
    Queue { uri: String, name: String },
}

pub async fn prepare(url: &str, topic: &str) -> anyhow::Result<Topology> {
    let name = format!("outbox_bench_{}", std::process::id());
    let Ok(sink) = SinkUrl::parse(url) else {
        // kafka://mock and the like: the sink itself reports what is wrong with its URL.
        return Ok(Topology::None);
    };
    if sink.scheme() == "nats" {
        let subject = format!("{}{topic}", sink.get("prefix").unwrap_or(""));
        let client = async_nats::connect(sink.address()).await.context("NATS")?;
        jetstream::new(client)
            .create_stream(jetstream::stream::Config {
                name: name.clone(),
                subjects: vec![subject],
                ..Default::default()
            })
            .await
            .context("creating the benchmark's JetStream stream")?;
        return Ok(Topology::Stream {
            address: sink.address().into(),
            name,
        });
    }
    if matches!(sink.scheme(), "amqp" | "amqps") {
        let exchange = sink.get("exchange").unwrap_or("outbox");
        let uri = sink.base().to_owned();
        let conn = Connection::connect(&uri, ConnectionProperties::default()).await?;
        let ch = conn.create_channel().await?;
        // The sink declares its exchange on connect; declare it here too so the binding works.
        let durable = lapin::options::ExchangeDeclareOptions {
            durable: true,
            ..Default::default()
        };
        ch.exchange_declare(
            exchange.into(),
            lapin::ExchangeKind::Topic,
            durable,
            FieldTable::default(),
        )
        .await?;
        ch.queue_declare(
            name.as_str().into(),
            QueueDeclareOptions::default(),
            FieldTable::default(),
        )
        .await?;
        ch.queue_bind(
            name.as_str().into(),
            exchange.into(),
            topic.into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await?;
        return Ok(Topology::Queue { uri, name });
    }
    Ok(Topology::None)
}

impl Topology {
    pub async fn remove(self) -> anyhow::Result<()> {
        match self {
            Topology::None => {}
            Topology::Stream { address, name } => {
                let client = async_nats::connect(address.as_str()).await?;
                jetstream::new(client).delete_stream(&name).await?;
            }
            Topology::Queue { uri, name } => {
                let conn = Connection::connect(&uri, ConnectionProperties::default()).await?;
                let ch = conn.create_channel().await?;
                ch.queue_delete(name.as_str().into(), QueueDeleteOptions::default())
                    .await?;
            }
        }
        Ok(())
    }
}
