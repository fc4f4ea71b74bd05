//! The relay loses its database (through a TCP proxy that we cut) and recovers by itself.

mod common;

use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use outbox_core::{HandlerSink, Message, Relay, RelayConfig, RelayState, Store};
use outbox_postgres::PgStore;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// Forwards connections to PostgreSQL while up; when cut, drops every open connection and
/// refuses new ones, as a network partition or a restarting server would.
struct Proxy {
    port: u16,
    up: Arc<AtomicBool>,
    generation: watch::Sender<u64>,
}

impl Proxy {
    async fn start(upstream: String) -> anyhow::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let port = listener.local_addr()?.port();
        let up = Arc::new(AtomicBool::new(true));
        let generation = watch::Sender::new(0u64);
        let (up2, gen2) = (up.clone(), generation.clone());
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                if !up2.load(Ordering::SeqCst) {
                    continue; // dropped: connection refused in effect
                }
                let mut cut = gen2.subscribe();
                let upstream = upstream.clone();
                tokio::spawn(async move {
                    let Ok(mut server) = TcpStream::connect(&upstream).await else {
                        return;
                    };
                    let mut client = client;
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
                        _ = cut.changed() => {}
                    }
                });
            }
        });
        Ok(Self {
            port,
            up,
            generation,
        })
    }

    fn cut(&self) {
        self.up.store(false, Ordering::SeqCst);
        self.generation.send_modify(|g| *g += 1);
    }

    fn restore(&self) {
        self.up.store(true, Ordering::SeqCst);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_backs_off_while_the_database_is_unreachable_and_resumes() -> anyhow::Result<()> {
    let direct = common::fresh_store().await?;
    direct.migrate().await?;
    let options = PgConnectOptions::from_str(&common::url())?;
    let proxy = Proxy::start(format!("{}:{}", options.get_host(), options.get_port())).await?;
    let pool = PgPoolOptions::new()
        .max_connections(4)
        .acquire_timeout(Duration::from_secs(1))
        .connect_lazy_with(options.port(proxy.port));
    let via_proxy = PgStore::with_config(pool, direct.config().clone())?;

    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<uuid::Uuid>();
    let sink = HandlerSink::new(move |m: Message| {
        let tx = tx.clone();
        async move {
            let _ = tx.send(m.id);
            Ok(())
        }
    });
    let config = RelayConfig::default().poll_interval(Duration::from_millis(100));
    let relay = Relay::with_config(Arc::new(via_proxy), Arc::new(sink), config);
    let mut state = relay.state();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let handle = tokio::spawn(relay.run(async move {
        let _ = stop_rx.await;
    }));

    let enqueue_one = |n| {
        let direct = direct.clone();
        async move {
            let m = outbox_testkit::msg("t", n);
            let mut tx = direct.pool().begin().await?;
            direct.outbox().enqueue(&mut tx, &m).await?;
            tx.commit().await?;
            anyhow::Ok(m.id())
        }
    };
    let bound = Duration::from_secs(60);
    let first = enqueue_one(1).await?;
    assert_eq!(tokio::time::timeout(bound, rx.recv()).await?, Some(first));

    proxy.cut();
    tokio::time::timeout(bound, state.wait_for(|s| *s == RelayState::DatabaseDown)).await??;
    // Committed while the relay cannot reach the database: delivered once it can.
    let during = enqueue_one(2).await?;
    proxy.restore();
    // The cut may land before the first batch's outcome was committed; that message is then
    // delivered again (at least once), and nothing else may arrive.
    loop {
        match tokio::time::timeout(bound, rx.recv()).await? {
            Some(id) if id == during => break,
            Some(id) => assert_eq!(id, first, "only a redelivery of the first message"),
            None => panic!("the relay stopped"),
        }
    }

    let _ = stop_tx.send(());
    handle.await?;
    common::drop_schema(&direct).await
}
