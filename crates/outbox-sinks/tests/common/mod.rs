//! A TCP proxy between a sink and its real server, to cut the network under a running relay.
#![allow(dead_code)]

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// Forwards connections to `upstream` while up. [`Proxy::cut`] drops every open connection and
/// then accepts and at once closes new ones, as a partition or a restarting server looks to a
/// client; [`Proxy::restore`] forwards again.
pub struct Proxy {
    pub port: u16,
    up: Arc<AtomicBool>,
    generation: watch::Sender<u64>,
    accepted: Arc<AtomicUsize>,
}

impl Proxy {
    pub async fn start(upstream: &str) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let up = Arc::new(AtomicBool::new(true));
        let generation = watch::Sender::new(0u64);
        let accepted = Arc::new(AtomicUsize::new(0));
        let (up2, gen2, accepted2) = (up.clone(), generation.clone(), accepted.clone());
        let upstream = upstream.to_owned();
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                // Subscribed before looking at `up`, so a cut racing this accept still ends it.
                let cut = gen2.subscribe();
                if !up2.load(Ordering::SeqCst) {
                    continue; // dropped at once: the client sees the connection close
                }
                accepted2.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(forward(client, upstream.clone(), cut));
            }
        });
        Self {
            port,
            up,
            generation,
            accepted,
        }
    }

    pub fn cut(&self) {
        self.up.store(false, Ordering::SeqCst);
        self.generation.send_modify(|g| *g += 1);
    }

    pub fn restore(&self) {
        self.up.store(true, Ordering::SeqCst);
    }

    /// Connections forwarded so far: a client that reconnected after a cut opened more.
    pub fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }
}

async fn forward(mut client: TcpStream, upstream: String, mut cut: watch::Receiver<u64>) {
    let Ok(mut server) = TcpStream::connect(&upstream).await else {
        return;
    };
    tokio::select! {
        _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
        _ = cut.changed() => {}
    }
}
