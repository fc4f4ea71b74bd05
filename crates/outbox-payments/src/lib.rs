//! # outbox-payments
//!
//! The payment system of the transactional outbox pattern, end to end, built only on the
//! library's public API. It is what `outbox demo` runs.
//!
//! 1. A client `POST`s a purchase to the **API**, which validates it and, in one transaction,
//!    writes the payment (`pending`) and the `payment.created` event, then answers `202`.
//! 2. The **worker** (a relay with in-process handlers) charges the **gateway** with the
//!    payment id as idempotency key, then marks the payment `paid` (or, after repeated declines,
//!    `rejected`) and enqueues `payment.paid` / `payment.rejected` in the same transaction.
//! 3. Those events e-mail the card holder (SMTP, or `.eml` files in a folder).
//!
//! Because every event is committed with the data it describes, a crash of the API or the
//! worker at any point loses nothing; because the gateway honours the idempotency key, a
//! redelivered or duplicated `payment.created` never charges twice.
//!
//! With a broker ([`DemoOptions::broker`], see [`broker`]) the same events travel through NATS
//! or RabbitMQ: a relay publishes them, and the worker consumes them through the consumer
//! inbox of `outbox-consumer`, writing each event's changes to the payments in the inbox
//! transaction. A declined charge is then retried by a delayed `payment.created` written in
//! that transaction, so the counted decline and the next attempt commit together.

pub mod api;
pub mod broker;
pub mod db;
pub mod gateway;
pub mod mail;
mod openapi;
pub mod validate;
pub mod worker;

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use anyhow::Context;
use metrics_exporter_prometheus::PrometheusHandle;
use outbox_core::{Relay, RelayMonitor};
use tokio::net::TcpListener;
use tokio::sync::watch;

pub use db::Db;
pub use gateway::GatewayConfig;
pub use outbox_server::ServerLimits;

/// Which parts of the system this process runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Everything in one process: API, worker, gateway (unless `gateway_url` is set) and, with a
    /// broker, the relay.
    All,
    /// Only the payment API, writing payments and their events.
    Api,
    /// Publishes the outbox to the broker (with `--broker` only).
    Relay,
    /// Only the worker: charges the gateway and e-mails the card holder.
    Worker,
    /// Only the simulated payment gateway.
    Gateway,
}

impl FromStr for Role {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Ok(match s {
            "all" => Role::All,
            "api" => Role::Api,
            "relay" => Role::Relay,
            "worker" => Role::Worker,
            "gateway" => Role::Gateway,
            other => {
                return Err(format!(
                    "unknown role {other:?}; expected all, api, relay, worker or gateway"
                ));
            }
        })
    }
}

/// How `outbox demo` runs: the database, the parts to run, their addresses and their
/// settings.
#[derive(Debug, Clone)]
pub struct DemoOptions {
    /// The database URL (`postgres://`, `mysql://` or `sqlite://`) of the payments and their
    /// outbox.
    pub database_url: String,
    /// PostgreSQL schema for the payment and outbox tables.
    pub schema: Option<String>,
    /// The parts this process runs.
    pub role: Role,
    /// Address of the payment API (with health and metrics).
    pub listen: SocketAddr,
    /// Where a process without the API (`--role worker` or `relay`) serves health and
    /// metrics; `None`: it serves nothing.
    pub operations_listen: Option<SocketAddr>,
    /// Where the simulated gateway listens, when this process starts it.
    pub gateway_listen: SocketAddr,
    /// Use this gateway instead of starting the simulated one.
    pub gateway_url: Option<String>,
    /// How the simulated gateway behaves.
    pub gateway: GatewayConfig,
    /// The folder the worker writes e-mails to as `.eml` files when there is no `smtp_url`.
    pub mail_dir: PathBuf,
    /// Send e-mails to this SMTP server (`smtp://host:port`) instead of writing them to
    /// `mail_dir`.
    pub smtp_url: Option<String>,
    /// Charge attempts before a payment is rejected (the seed: 4).
    pub max_declines: i64,
    /// The relay's polling fallback when no wake-up arrives.
    pub poll_interval: Duration,
    /// How long the worker holds a claimed event before another worker may take it over.
    pub lease: Duration,
    /// False only to measure the API without its outbox write: payments then never settle.
    pub write_events: bool,
    /// Deliver the events through this broker (`nats://…`, `amqp://…`) instead of to the
    /// worker in process: the relay publishes, the worker consumes through the inbox.
    pub broker: Option<String>,
    /// Timeouts and connection cap of the HTTP servers; the shutdown timeout also bounds the
    /// relay's last batch.
    pub limits: ServerLimits,
}

/// Opens the demo's database: `postgres://…`, `mysql://…` (or `mariadb://…`) or
/// `sqlite://PATH` (created when missing).
pub async fn open_db(url: &str, schema: Option<&str>) -> anyhow::Result<Db> {
    use outbox_any::{AnyStore, Backend, OpenOptions};
    // SQLite's writers take turns on one file: more connections would only wait.
    let connections = match Backend::from_url(url)? {
        Backend::Sqlite => 4,
        _ => 16,
    };
    let opts = OpenOptions::new()
        .max_connections(connections)
        .acquire_timeout(Duration::from_secs(10))
        .schema(schema.map(str::to_owned))
        .create_dirs(true);
    Ok(Db::new(AnyStore::open(url, &opts).await?))
}

/// The process-wide Prometheus recorder (installed once, shared by every server).
pub fn metrics_handle() -> PrometheusHandle {
    outbox_server::recorder()
}

/// The relay's settings: the worker's retry policy with the demo's poll interval and lease.
fn relay_config(opts: &DemoOptions) -> outbox_core::RelayConfig {
    worker::Worker::relay_config()
        .poll_interval(opts.poll_interval)
        .lease(opts.lease)
        .shutdown_timeout(opts.limits.shutdown_timeout)
}

/// What a started demo serves.
#[derive(Debug, Clone, Default)]
pub struct Urls {
    /// The payment API's base URL, when this process serves it.
    pub api: Option<String>,
    /// The simulated gateway's base URL, when this process runs it.
    pub gateway: Option<String>,
    /// Health and metrics of a process that runs a relay or worker without the API (the API
    /// serves them itself).
    pub operations: Option<String>,
}

/// Starts the parts of `opts.role`, calls `ready` with their URLs, and serves until `shutdown`.
pub async fn run(
    opts: DemoOptions,
    ready: impl FnOnce(&Urls),
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut tasks = tokio::task::JoinSet::new();
    let mut urls = Urls::default();
    let stopped = move || {
        let mut rx = stop_rx.clone();
        async move {
            let _ = rx.wait_for(|s| *s).await;
        }
    };

    let runs = |r: Role| opts.role == Role::All || opts.role == r;
    if let Some(url) = &opts.broker {
        broker::check_url(url)?;
    } else if opts.role == Role::Relay {
        anyhow::bail!("--role relay publishes to a broker: add --broker nats://… or amqp://…");
    }
    if runs(Role::Gateway) && opts.gateway_url.is_none() {
        let listener = TcpListener::bind(opts.gateway_listen)
            .await
            .context("gateway listen address")?;
        urls.gateway = Some(format!("http://{}", listener.local_addr()?));
        let serving = outbox_server::serve(
            listener,
            gateway::router(opts.gateway.clone()),
            opts.limits,
            stopped(),
        );
        tasks.spawn(async move { Ok(serving.await?) });
    }
    let db = if runs(Role::Api) || runs(Role::Worker) || runs(Role::Relay) {
        let db = open_db(&opts.database_url, opts.schema.as_deref()).await?;
        db.migrate().await?;
        Some(db)
    } else {
        None
    };
    // The relays first, so that whatever serves health and metrics can follow them.
    let mut relays: Vec<Relay> = Vec::new();
    if let (true, Some(url), Some(db)) = (runs(Role::Relay), &opts.broker, &db) {
        relays.push(broker::relay(db, url, relay_config(&opts)).await?);
    }
    let mut consuming = None;
    if let (true, Some(db)) = (runs(Role::Worker), &db) {
        let gateway_url = opts
            .gateway_url
            .clone()
            .or(urls.gateway.clone())
            .context("the worker needs --gateway-url (or run the gateway in this process)")?;
        let worker = worker::Worker {
            db: db.clone(),
            gateway: gateway::GatewayClient::new(&gateway_url)?,
            mailer: mail::Mailer::new(opts.smtp_url.as_deref(), opts.mail_dir.clone())?,
            max_declines: opts.max_declines,
        };
        match opts.broker.clone() {
            Some(url) => {
                consuming = Some(broker::consume(worker, &url, opts.lease, stopped()).await?);
            }
            None => relays.push(worker.relay(relay_config(&opts))),
        }
    }
    let monitors: Vec<RelayMonitor> = relays.iter().map(Relay::monitor).collect();
    let listen = if runs(Role::Api) {
        Some(opts.listen)
    } else {
        opts.operations_listen
    };
    if let (Some(db), Some(listen)) = (&db, listen) {
        // The API's server carries health and metrics; without it, a relay or worker serves
        // them on their own.
        let surface = if runs(Role::Api) {
            api::surface(
                api::ApiState {
                    db: db.clone(),
                    write_events: opts.write_events,
                },
                &monitors,
            )
        } else {
            monitors
                .iter()
                .fold(outbox_server::Surface::new().store(db.store()), |s, r| {
                    s.relay(r.clone())
                })
        };
        let listener = TcpListener::bind(listen).await.context("listen address")?;
        let url = format!("http://{}", listener.local_addr()?);
        if runs(Role::Api) {
            urls.api = Some(url);
        } else {
            urls.operations = Some(url);
        }
        let serving = surface.serve(listener, opts.limits, stopped());
        tasks.spawn(async move { Ok(serving.await?) });
    }
    for relay in relays {
        let stop = stopped();
        tasks.spawn(async move {
            relay.run(stop).await;
            Ok(())
        });
    }
    if let Some(consuming) = consuming {
        tasks.spawn(consuming);
    }
    ready(&urls);
    shutdown.await;
    let _ = stop_tx.send(true);
    while let Some(done) = tasks.join_next().await {
        done.context("a demo task panicked")??;
    }
    Ok(())
}
