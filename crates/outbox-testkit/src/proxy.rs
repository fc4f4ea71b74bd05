//! A TCP proxy for network faults between a client under test and its real server.
//!
//! [`Proxy::freeze`] models a silent partition: no FIN, no RST, every socket stays open and the
//! data simply stops, in both directions. Nothing is read while frozen, so the senders' kernel
//! buffers fill up as they would while TCP retransmits into a partition; [`Proxy::heal`] lets
//! everything through again, including what was sent during the freeze, as TCP delivers the
//! retransmitted bytes once the network is back. A connection opened while frozen is accepted
//! (the kernel completes the handshake) but reaches the server only after the heal.
//! [`Proxy::cut`] is the loud fault: every open connection is closed at once.
//!
//! A userspace proxy cannot hide its kernel's TCP acknowledgements, so TCP keepalives on either
//! side still see a live peer: a freeze exercises application timeouts, not keepalives.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// Whether data flows, and how many cuts happened (a connection ends at the next cut).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Link {
    flowing: bool,
    cuts: u64,
}

/// A proxy listening on a free loopback port and forwarding to one upstream address.
pub struct Proxy {
    port: u16,
    link: watch::Sender<Link>,
    accepted: Arc<AtomicUsize>,
    acceptor: JoinHandle<()>,
}

impl Proxy {
    /// Starts forwarding to `upstream` (`host:port`).
    pub async fn start(upstream: &str) -> std::io::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let port = listener.local_addr()?.port();
        let link = watch::Sender::new(Link {
            flowing: true,
            cuts: 0,
        });
        let accepted = Arc::new(AtomicUsize::new(0));
        let acceptor = tokio::spawn(accept(
            listener,
            upstream.to_owned(),
            link.clone(),
            accepted.clone(),
        ));
        Ok(Self {
            port,
            link,
            accepted,
            acceptor,
        })
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// `127.0.0.1:port`, the address clients connect to.
    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Stops forwarding in both directions, keeping every socket open.
    pub fn freeze(&self) {
        self.link.send_modify(|l| l.flowing = false);
    }

    /// Forwards again, starting with whatever was sent during the freeze.
    pub fn heal(&self) {
        self.link.send_modify(|l| l.flowing = true);
    }

    /// Closes every open connection (the client sees them end); new ones are forwarded.
    pub fn cut(&self) {
        self.link.send_modify(|l| l.cuts += 1);
    }

    /// Connections accepted so far: a client that reconnected opened more than one.
    pub fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.acceptor.abort();
        self.cut();
    }
}

async fn accept(
    listener: TcpListener,
    upstream: String,
    link: watch::Sender<Link>,
    accepted: Arc<AtomicUsize>,
) {
    while let Ok((client, _)) = listener.accept().await {
        accepted.fetch_add(1, Ordering::SeqCst);
        tokio::spawn(connection(client, upstream.clone(), link.subscribe()));
    }
}

/// One proxied connection: connects upstream once the link flows, then pumps both ways until
/// either side closes or the link is cut.
async fn connection(client: TcpStream, upstream: String, mut link: watch::Receiver<Link>) {
    let cuts = link.borrow().cuts;
    let cut = |l: &Link| l.cuts != cuts;
    let mut on_cut = link.clone();
    let mut setup_link = link.clone();
    let setup = async {
        flowing(&mut setup_link).await?;
        TcpStream::connect(&upstream).await.ok()
    };
    let server = tokio::select! {
        s = setup => s,
        _ = on_cut.wait_for(cut) => None,
    };
    let Some(server) = server else {
        return;
    };
    let (client_read, client_write) = client.into_split();
    let (server_read, server_write) = server.into_split();
    let up = pump(client_read, server_write, link.clone());
    let down = pump(server_read, client_write, link.clone());
    // Dropping the halves on a cut closes both sockets.
    tokio::select! {
        _ = futures::future::join(up, down) => {}
        _ = link.wait_for(cut) => {}
    }
}

/// Waits until data may flow; `None` when the proxy is gone.
async fn flowing(link: &mut watch::Receiver<Link>) -> Option<()> {
    link.wait_for(|l| l.flowing).await.ok().map(drop)
}

/// Copies one direction, reading only while the link flows and holding a chunk read just
/// before a freeze until the heal. An end of stream is passed on as a FIN, also only then.
async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut link: watch::Receiver<Link>,
) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        if flowing(&mut link).await.is_none() {
            return;
        }
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => 0,
            Ok(n) => n,
        };
        if flowing(&mut link).await.is_none() {
            return;
        }
        if n == 0 {
            let _ = to.shutdown().await;
            return;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}
