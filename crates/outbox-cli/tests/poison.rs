//! A poison message: one whose delivery kills the relay process every time. The real `outbox`
//! binary relays to a webhook served by this test, which SIGKILLs the relay whenever the poison
//! arrives; the test restarts the relay after each death, as a supervisor would.

use std::collections::HashSet;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::process::ExitStatusExt;
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;

fn pg_url() -> String {
    std::env::var("OUTBOX_TEST_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into())
}

/// An outbox in a fresh PostgreSQL schema, dropped at the end.
struct Db {
    schema: String,
    dir: tempfile::TempDir,
    url: String,
}

impl Db {
    fn postgres() -> Self {
        Self::at(pg_url())
    }

    fn at(url: String) -> Self {
        Self {
            schema: format!("cli_{}", uuid::Uuid::now_v7().simple()),
            dir: tempfile::tempdir().unwrap(),
            url,
        }
    }

    fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_outbox"));
        c.args(args)
            .env("OUTBOX_DATABASE_URL", &self.url)
            .env("OUTBOX_SCHEMA", &self.schema)
            .env("OUTBOX_LOG", "warn")
            .env_remove("OUTBOX_SINK")
            .env_remove("OUTBOX_WEBHOOK_SECRET")
            .stdin(Stdio::null());
        c
    }

    fn ok(&self, args: &[&str]) -> String {
        let out: Output = self.cmd(args).output().expect("run outbox");
        assert!(
            out.status.success(),
            "outbox {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    fn json(&self, args: &[&str]) -> Value {
        serde_json::from_str(&self.ok(args)).unwrap()
    }
}

impl Drop for Db {
    fn drop(&mut self) {
        let _ = Command::new("psql")
            .args([
                &self.url,
                "-qc",
                &format!("DROP SCHEMA IF EXISTS {} CASCADE", self.schema),
            ])
            .output();
    }
}

/// The running relay, shared with the webhook so that it can kill it.
type Relay = Arc<Mutex<Option<Child>>>;

/// A webhook receiver on loopback: answers 204 to every message and records its id, except
/// the poison, on which it SIGKILLs the relay and never answers.
struct Webhook {
    url: String,
    received: Arc<Mutex<Vec<String>>>,
    poison_hits: Arc<AtomicUsize>,
}

impl Webhook {
    fn start(poison: String, relay: Relay) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}/hook", listener.local_addr().unwrap());
        let received = Arc::new(Mutex::new(Vec::new()));
        let poison_hits = Arc::new(AtomicUsize::new(0));
        let (r, p) = (received.clone(), poison_hits.clone());
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let (r, p, relay, poison) = (r.clone(), p.clone(), relay.clone(), poison.clone());
                std::thread::spawn(move || serve(stream, &poison, &relay, &r, &p));
            }
        });
        Self {
            url,
            received,
            poison_hits,
        }
    }
}

/// Serves one keep-alive connection, request after request.
fn serve(
    stream: TcpStream,
    poison: &str,
    relay: &Relay,
    received: &Mutex<Vec<String>>,
    poison_hits: &AtomicUsize,
) {
    // Only a bound against a peer that neither sends nor closes.
    let _ = stream.set_read_timeout(Some(Duration::from_secs(120)));
    let mut writer = stream.try_clone().unwrap();
    let mut reader = BufReader::new(stream);
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).unwrap_or(0) == 0 {
            return;
        }
        let (mut id, mut length) = (String::new(), 0usize);
        loop {
            let mut header = String::new();
            if reader.read_line(&mut header).unwrap_or(0) == 0 {
                return;
            }
            let header = header.trim_end();
            if header.is_empty() {
                break;
            }
            if let Some((name, value)) = header.split_once(':') {
                match name.trim().to_ascii_lowercase().as_str() {
                    "webhook-id" => id = value.trim().to_owned(),
                    "content-length" => length = value.trim().parse().unwrap_or(0),
                    _ => {}
                }
            }
        }
        let mut body = vec![0; length];
        if reader.read_exact(&mut body).is_err() {
            return;
        }
        if id == poison {
            poison_hits.fetch_add(1, Ordering::SeqCst);
            if let Some(child) = relay.lock().unwrap().as_mut() {
                let _ = child.kill();
            }
            // No answer: hold the connection until the dead relay's socket closes.
            let _ = std::io::copy(&mut reader, &mut std::io::sink());
            return;
        }
        received.lock().unwrap().push(id);
        let answer = b"HTTP/1.1 204 No Content\r\ncontent-length: 0\r\n\r\n";
        if writer.write_all(answer).is_err() {
            return;
        }
    }
}

/// Whether the relay exited or died; it is reaped here, while the webhook may still kill it.
fn exited(relay: &Relay) -> Option<ExitStatus> {
    let mut slot = relay.lock().unwrap();
    let status = slot.as_mut().and_then(|c| c.try_wait().unwrap());
    if status.is_some() {
        slot.take();
    }
    status
}

/// Kills a relay still running when the test ends, also when it fails.
struct Reaper(Relay);

impl Drop for Reaper {
    fn drop(&mut self) {
        let child = self.0.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(mut child) = child {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

#[test]
fn a_message_that_kills_the_relay_goes_dead_and_the_others_get_through() {
    const MAX_ATTEMPTS: usize = 3;
    const MAX_RESTARTS: usize = 15;
    const INNOCENT: usize = 30;

    let db = Db::postgres();
    // 30 innocent messages with the poison in the middle, one topic, one transaction.
    let file = db.dir.path().join("in.jsonl");
    let lines: String = (0..=INNOCENT)
        .map(|n| {
            let poison = n == INNOCENT / 2;
            format!("{{\"topic\":\"orders\",\"type\":\"order.created\",\"payload\":{{\"n\":{n},\"poison\":{poison}}}}}\n")
        })
        .collect();
    std::fs::write(&file, lines).unwrap();
    let mut ids: Vec<String> = db
        .ok(&["enqueue", "--file", file.to_str().unwrap()])
        .lines()
        .map(str::to_owned)
        .collect();
    assert_eq!(ids.len(), INNOCENT + 1);
    let poison = ids.remove(INNOCENT / 2);

    let relay: Relay = Arc::default();
    let hook = Webhook::start(poison.clone(), relay.clone());
    let max_attempts = MAX_ATTEMPTS.to_string();
    let args = [
        "relay",
        "--sink",
        &hook.url,
        "--max-attempts",
        &max_attempts,
        "--retry-base",
        "0",
        "--poll-interval",
        "100ms",
    ];
    // Run the relay until nothing is pending or in flight, restarting it after each death.
    let deadline = Instant::now() + Duration::from_secs(120);
    let reaper = Reaper(relay.clone());
    let mut deaths = 0;
    'runs: for run in 0.. {
        let log_path = db.dir.path().join(format!("relay-{run}.log"));
        let log = std::fs::File::create(&log_path).unwrap();
        let child = db
            .cmd(&args)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        let pid = child.id().to_string();
        *relay.lock().unwrap() = Some(child);
        loop {
            if let Some(status) = exited(&relay) {
                assert_eq!(
                    status.signal(),
                    Some(9),
                    "the relay ended by itself ({status}): {}",
                    std::fs::read_to_string(&log_path).unwrap_or_default()
                );
                deaths += 1;
                if deaths > MAX_RESTARTS {
                    break 'runs;
                }
                continue 'runs;
            }
            let s = db.json(&["status", "--json"]);
            if s["pending"] == 0 && s["in_flight"] == 0 {
                let term = Command::new("kill").args(["-TERM", &pid]).status();
                assert!(term.unwrap().success());
                while exited(&relay).is_none() {
                    assert!(Instant::now() < deadline, "the relay ignored SIGTERM");
                    std::thread::sleep(Duration::from_millis(20));
                }
                break 'runs;
            }
            assert!(
                Instant::now() < deadline,
                "the outbox did not drain within 120s ({deaths} relay deaths): {s}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    drop(reaper);

    let dead = db.json(&["dead", "list", "--json"]);
    let status = db.json(&["status", "--json"]);
    let dead_ids: Vec<&str> = dead
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|d| d["id"].as_str())
        .collect();
    assert!(
        dead_ids == [poison.as_str()],
        "the poison (alone) is not dead after {deaths} relay deaths ({MAX_RESTARTS} restarts at \
         most): the webhook got it {} times; status {status}; dead {dead}",
        hook.poison_hits.load(Ordering::SeqCst)
    );
    assert!(
        deaths <= MAX_ATTEMPTS + 2,
        "the poison killed the relay {deaths} times before it went dead (max attempts {MAX_ATTEMPTS})"
    );
    let received: HashSet<String> = hook.received.lock().unwrap().iter().cloned().collect();
    let missing: Vec<&String> = ids.iter().filter(|id| !received.contains(*id)).collect();
    assert!(
        missing.is_empty(),
        "{} innocent messages never reached the webhook: {missing:?}",
        missing.len()
    );
    assert_eq!(
        (status["pending"].as_i64(), status["in_flight"].as_i64()),
        (Some(0), Some(0)),
        "innocent messages left undelivered: {status}"
    );
}

/// The same poison with `--capture wal`: writers emit logical messages, the relay streams them
/// from a slot. A relay killed in the sink replays the poison's batch from the slot; the record
/// of the batch it had started tells the next relay that this delivery never ended, so the
/// batch goes to the table with its attempt counted, where the polling relay delivers the
/// poison alone until it is dead, and the innocent messages get through.
#[test]
fn with_wal_capture_a_message_that_kills_the_relay_goes_dead_and_the_others_get_through() {
    const MAX_ATTEMPTS: usize = 3;
    const MAX_RESTARTS: usize = 15;
    const INNOCENT: usize = 30;

    let cluster = outbox_testkit::cluster::PgCluster::start_with(&[
        "wal_level=logical",
        "max_wal_senders=10",
    ])
    .unwrap();
    cluster.create_database("outbox").unwrap();
    let db = Db::at(cluster.url("outbox"));
    db.ok(&["migrate", "--capture", "wal"]);
    let file = db.dir.path().join("in.jsonl");
    let lines: String = (0..=INNOCENT)
        .map(|n| {
            let poison = n == INNOCENT / 2;
            format!("{{\"topic\":\"orders\",\"type\":\"order.created\",\"payload\":{{\"n\":{n},\"poison\":{poison}}}}}\n")
        })
        .collect();
    std::fs::write(&file, lines).unwrap();
    let mut ids: Vec<String> = db
        .ok(&["enqueue", "--wal-message", "--file", file.to_str().unwrap()])
        .lines()
        .map(str::to_owned)
        .collect();
    assert_eq!(ids.len(), INNOCENT + 1);
    let poison = ids.remove(INNOCENT / 2);

    let relay: Relay = Arc::default();
    let hook = Webhook::start(poison.clone(), relay.clone());
    let max_attempts = MAX_ATTEMPTS.to_string();
    let args = [
        "relay",
        "--capture",
        "wal",
        "--sink",
        &hook.url,
        "--max-attempts",
        &max_attempts,
        "--retry-base",
        "0",
        "--poll-interval",
        "100ms",
    ];
    let deadline = Instant::now() + Duration::from_secs(120);
    let reaper = Reaper(relay.clone());
    let received =
        || -> HashSet<String> { hook.received.lock().unwrap().iter().cloned().collect() };
    let poison_dead = || {
        db.json(&["dead", "list", "--json"])
            .as_array()
            .is_some_and(|d| d.iter().any(|m| m["id"] == poison.as_str()))
    };
    let mut deaths = 0;
    'runs: for run in 0.. {
        let log_path = db.dir.path().join(format!("relay-{run}.log"));
        let log = std::fs::File::create(&log_path).unwrap();
        let child = db
            .cmd(&args)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        let pid = child.id().to_string();
        *relay.lock().unwrap() = Some(child);
        loop {
            if let Some(status) = exited(&relay) {
                assert_eq!(
                    status.signal(),
                    Some(9),
                    "the relay ended by itself ({status}): {}",
                    std::fs::read_to_string(&log_path).unwrap_or_default()
                );
                deaths += 1;
                if deaths > MAX_RESTARTS {
                    break 'runs;
                }
                continue 'runs;
            }
            let got = received();
            // Copies of messages already received may still wait in the table (at least once):
            // done once they are gone too.
            let settled = || db.json(&["status", "--json"])["pending"] == 0;
            if ids.iter().all(|id| got.contains(id)) && poison_dead() && settled() {
                let term = Command::new("kill").args(["-TERM", &pid]).status();
                assert!(term.unwrap().success());
                while exited(&relay).is_none() {
                    assert!(Instant::now() < deadline, "the relay ignored SIGTERM");
                    std::thread::sleep(Duration::from_millis(20));
                }
                break 'runs;
            }
            assert!(
                Instant::now() < deadline,
                "not done within 120s ({deaths} relay deaths, {} of {INNOCENT} innocent received)",
                got.len()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    drop(reaper);
    let status = db.json(&["status", "--json"]);
    assert!(
        poison_dead(),
        "the poison is not dead after {deaths} relay deaths ({MAX_RESTARTS} restarts at most): \
         the webhook got it {} times; status {status}",
        hook.poison_hits.load(Ordering::SeqCst)
    );
    let dead = db.json(&["dead", "list", "--json"]);
    assert_eq!(
        dead.as_array().map(Vec::len),
        Some(1),
        "only the poison is dead: {dead}"
    );
    assert!(
        deaths <= MAX_ATTEMPTS + 2,
        "the poison killed the relay {deaths} times before it went dead (max attempts {MAX_ATTEMPTS})"
    );
    let got = received();
    let missing: Vec<&String> = ids.iter().filter(|id| !got.contains(*id)).collect();
    assert!(
        missing.is_empty(),
        "innocent messages never reached the webhook: {missing:?}"
    );
    assert_eq!(
        status["pending"].as_i64(),
        Some(0),
        "left undelivered: {status}"
    );
}
