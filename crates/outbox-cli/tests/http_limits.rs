//! The HTTP servers of `outbox demo` (the payment API and the simulated gateway) against
//! clients that stall: half-sent requests are closed after the header-read timeout, a body
//! that never arrives is answered after the request timeout, connections over the cap wait
//! instead of piling up, and SIGTERM finishes within the shutdown timeout whatever the
//! clients do. The real binary, real sockets; every wait has a deadline.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A demo process serving one part; killed when dropped.
struct Server {
    child: Child,
    addr: String,
    _dir: tempfile::TempDir,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[derive(Clone, Copy, Debug)]
enum Part {
    Api,
    Gateway,
}

/// Starts `outbox demo --role api|gateway` with `limits` as `OUTBOX_*` variables.
fn start(part: Part, limits: &[(&str, &str)]) -> Server {
    let dir = tempfile::tempdir().unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_outbox"));
    cmd.arg("demo")
        .env(
            "OUTBOX_DATABASE_URL",
            format!("sqlite://{}", dir.path().join("demo.db").display()),
        )
        .env("OUTBOX_LOG", "warn")
        .envs(limits.iter().copied())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    match part {
        Part::Api => cmd.args(["--role", "api", "--listen", "127.0.0.1:0"]),
        Part::Gateway => cmd.args([
            "--role",
            "gateway",
            "--gateway-listen",
            "127.0.0.1:0",
            "--gateway-latency",
            "0-0",
        ]),
    };
    let mut child = cmd.spawn().unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut addr = None;
    for line in lines.by_ref() {
        let line = line.unwrap();
        if addr.is_none() {
            addr = line
                .split_whitespace()
                .find_map(|w| w.strip_prefix("http://"))
                .map(str::to_owned);
        }
        if line.starts_with("Ctrl-C stops.") {
            break;
        }
    }
    std::thread::spawn(move || lines.for_each(drop));
    Server {
        child,
        addr: addr.expect("the demo printed no URL"),
        _dir: dir,
    }
}

impl Server {
    /// A connection that sent the start of a request and then nothing.
    fn stalled(&self) -> TcpStream {
        let mut s = TcpStream::connect(&self.addr).unwrap();
        s.write_all(b"POST /api/payments HTTP/1.1\r\nHost: demo\r\nContent-Ty")
            .unwrap();
        s
    }

    fn terminate(&self) {
        let ok = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(ok.success());
    }

    /// Waits for the process to end; false if it is still running at the deadline.
    fn exits_within(&mut self, bound: Duration) -> bool {
        let deadline = Instant::now() + bound;
        while Instant::now() < deadline {
            if self.child.try_wait().unwrap().is_some() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    }
}

/// What the server sends on `s` until it closes it, or `None` if it is still open at the
/// deadline.
fn read_until_closed(s: &mut TcpStream, bound: Duration) -> Option<String> {
    let deadline = Instant::now() + bound;
    let mut got = Vec::new();
    let mut buf = [0u8; 1024];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return None;
        }
        s.set_read_timeout(Some(left)).unwrap();
        match s.read(&mut buf) {
            Ok(0) => return Some(String::from_utf8_lossy(&got).into_owned()),
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {
                return Some(String::from_utf8_lossy(&got).into_owned());
            }
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                return None;
            }
            Err(e) => panic!("read: {e}"),
        }
    }
}

fn half_sent_requests_are_closed_after_the_header_read_timeout(part: Part) {
    let server = start(part, &[("OUTBOX_HEADER_READ_TIMEOUT", "500ms")]);
    let mut stalled: Vec<TcpStream> = (0..8).map(|_| server.stalled()).collect();
    for (i, s) in stalled.iter_mut().enumerate() {
        assert!(
            read_until_closed(s, Duration::from_secs(15)).is_some(),
            "{part:?}: stalled connection {i} still open after 15 s"
        );
    }
}

#[test]
fn api_closes_half_sent_requests_after_the_header_read_timeout() {
    half_sent_requests_are_closed_after_the_header_read_timeout(Part::Api);
}

#[test]
fn gateway_closes_half_sent_requests_after_the_header_read_timeout() {
    half_sent_requests_are_closed_after_the_header_read_timeout(Part::Gateway);
}

#[test]
fn a_body_that_never_arrives_is_answered_after_the_request_timeout() {
    let server = start(Part::Api, &[("OUTBOX_REQUEST_TIMEOUT", "500ms")]);
    let mut s = TcpStream::connect(&server.addr).unwrap();
    s.write_all(
        b"POST /api/payments HTTP/1.1\r\nHost: demo\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"amount\":",
    )
    .unwrap();
    let answer = read_until_closed(&mut s, Duration::from_secs(15))
        .expect("no answer 15 s after a request whose body stopped");
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("application/problem+json"), "{answer}");
}

fn shutdown_is_bounded_with_stalled_connections_open(part: Part) {
    // Stalled clients are not closed by the header timeout here: only the shutdown bound
    // can end them.
    let mut server = start(
        part,
        &[
            ("OUTBOX_HEADER_READ_TIMEOUT", "10m"),
            ("OUTBOX_SHUTDOWN_TIMEOUT", "1s"),
        ],
    );
    let _stalled: Vec<TcpStream> = (0..8).map(|_| server.stalled()).collect();
    // The server has read the stalled requests' first bytes once a complete request on a
    // later connection is answered (connections are accepted in order).
    let mut probe = TcpStream::connect(&server.addr).unwrap();
    probe
        .write_all(b"GET /charges HTTP/1.1\r\nHost: demo\r\nConnection: close\r\n\r\n")
        .unwrap();
    assert!(read_until_closed(&mut probe, Duration::from_secs(15)).is_some());
    server.terminate();
    assert!(
        server.exits_within(Duration::from_secs(15)),
        "{part:?}: SIGTERM with stalled connections did not finish within 15 s (shutdown timeout 1 s)"
    );
}

#[test]
fn api_shutdown_is_bounded_with_stalled_connections_open() {
    shutdown_is_bounded_with_stalled_connections_open(Part::Api);
}

#[test]
fn gateway_shutdown_is_bounded_with_stalled_connections_open() {
    shutdown_is_bounded_with_stalled_connections_open(Part::Gateway);
}

#[test]
fn connections_over_the_cap_wait_for_a_free_slot_and_are_then_served() {
    let server = start(
        Part::Gateway,
        &[
            ("OUTBOX_MAX_CONNECTIONS", "2"),
            ("OUTBOX_HEADER_READ_TIMEOUT", "2s"),
        ],
    );
    // Two stalled clients hold both slots until the header timeout closes them.
    let _stalled: Vec<TcpStream> = (0..2).map(|_| server.stalled()).collect();
    let asked = Instant::now();
    let mut waiting = TcpStream::connect(&server.addr).unwrap();
    waiting
        .write_all(b"GET /charges HTTP/1.1\r\nHost: demo\r\nConnection: close\r\n\r\n")
        .unwrap();
    let answer = read_until_closed(&mut waiting, Duration::from_secs(20))
        .expect("a connection over the cap was never served");
    let waited = asked.elapsed();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(
        waited >= Duration::from_secs(1),
        "served after {waited:?} while both slots were taken: the cap was not applied"
    );
}
